/*
 * test_kvblocks.c — the KV block manager and its prefix cache (coordinator/kvblocks.h):
 * chain keys, hits verified by token ids and parent (with a degenerate hash too), shared
 * blocks' reference counts, LRU eviction order (a chain from its tail), an evicted parent
 * making its children unreachable, duplicate commits, copy-on-write of a fully cached
 * sequence's last block, tags (blocks found only under the tag they were committed with), the
 * cache turned off, and a random
 * workload whose invariants are checked after every operation and whose references all
 * return to zero at the end.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/kvblocks.h"

#define B TSR_KV_BLOCK_SIZE

static tsr_kvblocks *mk(int32_t n, bool caching)
{
    char err[256];
    tsr_kvblocks *m = NULL;
    int rc = tsr_kvblocks_new(n, caching, &m, err, sizeof err);
    if (rc != 0) fail_msg("tsr_kvblocks_new(%d): %s", n, err);
    return m;
}

/* tokens of a prompt: block i of chain `c` holds c * 1000 + i * 16 + j, unless given. */
static void fill(int32_t *t, int32_t n_blocks, int32_t c)
{
    for (int32_t i = 0; i < n_blocks * B; i++) t[i] = c * 1000 + i;
}

/* Allocate n blocks and commit them as a chain over tokens: what a sequence does after
 * computing its prompt. */
static void compute(tsr_kvblocks *m, const int32_t *tokens, int32_t n, int32_t *blocks)
{
    assert_true(tsr_kvblocks_alloc(m, n, blocks));
    tsr_kvblocks_chain ch = {0};
    for (int32_t i = 0; i < n; i++)
        assert_true(tsr_kvblocks_commit(m, &ch, blocks[i], tokens + (size_t)i * B));
    assert_int_equal(ch.n_blocks, n);
}

static void check_invariants(const tsr_kvblocks *m)
{
    tsr_kvblocks_stats st;
    tsr_kvblocks_get_stats(m, &st);
    if (st.n_used + st.n_free + st.n_evictable != st.n_total)
        fail_msg("used %d + free %d + evictable %d != total %d", st.n_used, st.n_free,
                 st.n_evictable, st.n_total);
    int32_t used = 0, cached = 0;
    for (int32_t b = 0; b < st.n_total; b++) {
        used += tsr_kvblocks_refcount(m, b) > 0;
        cached += tsr_kvblocks_is_cached(m, b);
    }
    assert_int_equal(used, st.n_used);
    assert_int_equal(cached, st.n_cached);
    assert_true(st.n_evictable <= st.n_cached);
}

static void test_hash_chain(void **state)
{
    (void)state;
    int32_t a[2 * B], b[2 * B];
    fill(a, 2, 1);
    memcpy(b, a, sizeof a);
    uint64_t ka0 = tsr_kvblocks_hash(0, a), kb0 = tsr_kvblocks_hash(0, b);
    assert_true(ka0 == kb0);
    assert_true(tsr_kvblocks_hash(ka0, a + B) == tsr_kvblocks_hash(kb0, b + B));
    /* Every token and the parent change the key; so does the order of tokens. */
    for (int i = 0; i < B; i++) {
        b[i]++;
        assert_true(tsr_kvblocks_hash(0, b) != ka0);
        b[i]--;
    }
    assert_true(tsr_kvblocks_hash(1, a) != ka0);
    int32_t t = b[0];
    b[0] = b[1];
    b[1] = t;
    assert_true(tsr_kvblocks_hash(0, b) != ka0);
}

static void test_hit_and_refcounts(void **state)
{
    (void)state;
    tsr_kvblocks *m = mk(8, true);
    int32_t toks[3 * B], blocks[3], got[3];
    fill(toks, 3, 7);
    compute(m, toks, 3, blocks);
    /* A second sequence with the same prompt finds all three, shared (refcount 2). */
    tsr_kvblocks_chain ch;
    assert_int_equal(tsr_kvblocks_match(m, toks, 3, got, &ch), 3);
    assert_int_equal(ch.n_blocks, 3);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(got[i], blocks[i]);
        assert_int_equal(tsr_kvblocks_refcount(m, blocks[i]), 2);
    }
    tsr_kvblocks_count_lookup(m, 3);
    check_invariants(m);
    /* The first ends: still referenced by the second, nothing evictable. */
    tsr_kvblocks_release(m, blocks, 3);
    tsr_kvblocks_stats st;
    tsr_kvblocks_get_stats(m, &st);
    assert_int_equal(st.n_used, 3);
    assert_int_equal(st.n_evictable, 0);
    assert_int_equal(tsr_kvblocks_n_available(m), 5);
    /* The second ends: the blocks stay cached, evictable, and count as available. */
    tsr_kvblocks_release(m, got, 3);
    tsr_kvblocks_get_stats(m, &st);
    assert_int_equal(st.n_used, 0);
    assert_int_equal(st.n_evictable, 3);
    assert_int_equal(st.n_cached, 3);
    assert_int_equal(tsr_kvblocks_n_available(m), 8);
    /* A prefix of two blocks, then a different third block: 2 hits. */
    int32_t other[3 * B];
    memcpy(other, toks, sizeof toks);
    other[2 * B + 5] = 99999;
    assert_int_equal(tsr_kvblocks_match(m, other, 3, got, &ch), 2);
    tsr_kvblocks_count_lookup(m, 2);
    /* max_blocks bounds the walk (the block of the last prompt token is computed). */
    int32_t got2[3];
    tsr_kvblocks_chain ch2;
    assert_int_equal(tsr_kvblocks_match(m, toks, 1, got2, &ch2), 1);
    tsr_kvblocks_count_lookup(m, 1);
    assert_int_equal(tsr_kvblocks_refcount(m, blocks[0]), 2);
    /* A miss: a different first token. */
    int32_t miss[B];
    fill(miss, 1, 8);
    tsr_kvblocks_chain ch3;
    assert_int_equal(tsr_kvblocks_match(m, miss, 1, got2 + 1, &ch3), 0);
    tsr_kvblocks_count_lookup(m, 0);
    tsr_kvblocks_get_stats(m, &st);
    assert_int_equal(st.n_lookups, 4);
    assert_int_equal(st.n_hits, 3);
    assert_int_equal(st.n_hit_tokens, (uint64_t)(3 + 2 + 1) * B);
    tsr_kvblocks_release(m, got, 2);
    tsr_kvblocks_release(m, got2, 1);
    check_invariants(m);
    tsr_kvblocks_get_stats(m, &st);
    assert_int_equal(st.n_used, 0);
    tsr_kvblocks_free(m);
}

/* A block's place in the chain matters: the same 16 tokens under another parent, or at
 * depth 0, are not a hit. */
static void test_parent_verified(void **state)
{
    (void)state;
    tsr_kvblocks *m = mk(8, true);
    int32_t a[2 * B], blocks[2], got[2];
    fill(a, 2, 1);
    compute(m, a, 2, blocks);
    tsr_kvblocks_release(m, blocks, 2);
    int32_t b[2 * B];
    fill(b, 1, 2);                             /* another first block */
    memcpy(b + B, a + B, sizeof(int32_t) * B); /* the same second block */
    tsr_kvblocks_chain ch;
    assert_int_equal(tsr_kvblocks_match(m, b, 2, got, &ch), 0);
    assert_int_equal(tsr_kvblocks_match(m, a + B, 1, got, &ch), 0);
    check_invariants(m);
    tsr_kvblocks_free(m);
}

static uint64_t constant_hash(uint64_t parent, const int32_t *t)
{
    (void)parent;
    (void)t;
    return 42;
}

/* With every key equal, only the token ids and parents tell entries apart. */
static void test_hit_verified_by_tokens(void **state)
{
    (void)state;
    tsr_kvblocks *m = mk(16, true);
    tsr_kvblocks_set_hash(m, constant_hash);
    int32_t p[4][2 * B], blocks[4][2], got[2];
    for (int c = 0; c < 4; c++) {
        fill(p[c], 2, c + 1);
        compute(m, p[c], 2, blocks[c]);
        tsr_kvblocks_release(m, blocks[c], 2);
    }
    for (int c = 0; c < 4; c++) {
        tsr_kvblocks_chain ch;
        assert_int_equal(tsr_kvblocks_match(m, p[c], 2, got, &ch), 2);
        assert_int_equal(got[0], blocks[c][0]);
        assert_int_equal(got[1], blocks[c][1]);
        tsr_kvblocks_release(m, got, 2);
    }
    /* One token off in the second block: only the first is found. */
    int32_t q[2 * B];
    memcpy(q, p[2], sizeof q);
    q[2 * B - 1] ^= 1;
    tsr_kvblocks_chain ch;
    assert_int_equal(tsr_kvblocks_match(m, q, 2, got, &ch), 1);
    assert_int_equal(got[0], blocks[2][0]);
    tsr_kvblocks_release(m, got, 1);
    /* Chain 1's second block under chain 3's first: not a hit. */
    memcpy(q, p[3], sizeof(int32_t) * B);
    memcpy(q + B, p[1] + B, sizeof(int32_t) * B);
    assert_int_equal(tsr_kvblocks_match(m, q, 2, got, &ch), 1);
    assert_int_equal(got[0], blocks[3][0]);
    tsr_kvblocks_release(m, got, 1);
    check_invariants(m);
    tsr_kvblocks_free(m);
}

/* Tags (the engine's order classes): an entry is found only under the tag it was committed
 * with, even when every hash is the same; tag 0 is the untagged functions' entry, and the
 * same tokens may be cached once per tag. */
static void test_tags(void **state)
{
    (void)state;
    for (int degenerate = 0; degenerate < 2; degenerate++) {
        tsr_kvblocks *m = mk(16, true);
        if (degenerate) tsr_kvblocks_set_hash(m, constant_hash);
        int32_t p[3 * B], blocks[3], got[3];
        fill(p, 3, 7);
        const uint8_t tags[3] = {16, 4, 0}; /* a prompt block, a mixed one, a generated one */
        assert_true(tsr_kvblocks_alloc(m, 3, blocks));
        tsr_kvblocks_chain ch = {0};
        for (int32_t i = 0; i < 3; i++)
            assert_true(tsr_kvblocks_commit_tagged(m, &ch, blocks[i], p + (size_t)i * B, tags[i]));
        tsr_kvblocks_release(m, blocks, 3);
        /* the same tags: all three */
        assert_int_equal(tsr_kvblocks_match_tagged(m, p, tags, 3, got, &ch), 3);
        tsr_kvblocks_release(m, got, 3);
        /* a later prompt computes blocks 1 and 2 as prompt tokens (tag 16): block 0 only */
        const uint8_t prompt_tags[3] = {16, 16, 16};
        assert_int_equal(tsr_kvblocks_match_tagged(m, p, prompt_tags, 3, got, &ch), 1);
        assert_int_equal(got[0], blocks[0]);
        /* ... computes them and caches them under its tags, beside the others */
        int32_t mine[2];
        assert_true(tsr_kvblocks_alloc(m, 2, mine));
        for (int32_t i = 1; i < 3; i++)
            assert_true(
                tsr_kvblocks_commit_tagged(m, &ch, mine[i - 1], p + (size_t)i * B, prompt_tags[i]));
        tsr_kvblocks_release(m, got, 1);
        tsr_kvblocks_release(m, mine, 2);
        assert_int_equal(tsr_kvblocks_match_tagged(m, p, prompt_tags, 3, got, &ch), 3);
        assert_int_equal(got[1], mine[0]);
        assert_int_equal(got[2], mine[1]);
        tsr_kvblocks_release(m, got, 3);
        assert_int_equal(tsr_kvblocks_match_tagged(m, p, tags, 3, got, &ch), 3);
        assert_int_equal(got[1], blocks[1]);
        tsr_kvblocks_release(m, got, 3);
        /* untagged lookups see tag 0 only: block 0 was tag 16 */
        assert_int_equal(tsr_kvblocks_match(m, p, 3, got, &ch), 0);
        check_invariants(m);
        tsr_kvblocks_free(m);
    }
}

/* Free blocks go first; then the least recently used cached ones, a chain from its tail. */
static void test_lru_eviction_order(void **state)
{
    (void)state;
    tsr_kvblocks *m = mk(8, true);
    int32_t a[3 * B], b[3 * B], ba[3], bb[3], got[3];
    fill(a, 3, 1);
    fill(b, 3, 2);
    compute(m, a, 3, ba); /* chain A, released first: older */
    compute(m, b, 3, bb);
    tsr_kvblocks_release(m, ba, 3);
    tsr_kvblocks_release(m, bb, 3);
    /* Touch A again (a hit), release it: now A is the more recent chain. */
    tsr_kvblocks_chain ch;
    assert_int_equal(tsr_kvblocks_match(m, a, 3, got, &ch), 3);
    tsr_kvblocks_release(m, got, 3);
    tsr_kvblocks_stats st;
    tsr_kvblocks_get_stats(m, &st);
    assert_int_equal(st.n_free, 2);
    assert_int_equal(st.n_evictable, 6);
    /* Two blocks: the free ones, no eviction. */
    int32_t x[8];
    assert_true(tsr_kvblocks_alloc(m, 2, x));
    tsr_kvblocks_get_stats(m, &st);
    assert_int_equal(st.n_evictions, 0);
    /* Then B's blocks from the tail: B2, B1, B0; then A2. */
    const int32_t order[4] = {bb[2], bb[1], bb[0], ba[2]};
    for (int i = 0; i < 4; i++) {
        int32_t y;
        assert_true(tsr_kvblocks_alloc(m, 1, &y));
        assert_int_equal(y, order[i]);
        assert_false(tsr_kvblocks_is_cached(m, y));
        x[2 + i] = y;
    }
    tsr_kvblocks_get_stats(m, &st);
    assert_int_equal(st.n_evictions, 4);
    /* A is found up to its evicted tail; B not at all. */
    assert_int_equal(tsr_kvblocks_match(m, a, 3, got, &ch), 2);
    tsr_kvblocks_release(m, got, 2);
    assert_int_equal(tsr_kvblocks_match(m, b, 3, got, &ch), 0);
    /* Not enough: nothing taken. */
    int32_t z[3];
    assert_false(tsr_kvblocks_alloc(m, 3, z));
    assert_int_equal(tsr_kvblocks_n_available(m), 2);
    tsr_kvblocks_release(m, x, 6);
    check_invariants(m);
    tsr_kvblocks_get_stats(m, &st);
    assert_int_equal(st.n_used, 0);
    tsr_kvblocks_free(m);
}

/* A parent evicted before its child (released in that order): the child can no longer be
 * reached, even when the parent's block is reused for the very same tokens. */
static void test_evicted_parent(void **state)
{
    (void)state;
    tsr_kvblocks *m = mk(2, true);
    int32_t a[2 * B], bl[2], got[2];
    fill(a, 2, 1);
    compute(m, a, 2, bl);
    tsr_kvblocks_release(m, &bl[0], 1); /* parent first: the older in the LRU list */
    tsr_kvblocks_release(m, &bl[1], 1);
    int32_t y;
    assert_true(tsr_kvblocks_alloc(m, 1, &y));
    assert_int_equal(y, bl[0]);
    tsr_kvblocks_chain ch = {0};
    assert_true(tsr_kvblocks_commit(m, &ch, y, a)); /* recomputed: a new entry */
    tsr_kvblocks_release(m, &y, 1);
    assert_int_equal(tsr_kvblocks_match(m, a, 2, got, &ch), 1);
    assert_int_equal(got[0], bl[0]);
    tsr_kvblocks_release(m, got, 1);
    check_invariants(m);
    tsr_kvblocks_free(m);
}

/* Two sequences compute the same prefix at once: the second's blocks stay private (freed,
 * not cached, when it ends) and its chain continues on the first's entries. */
static void test_duplicate_commit(void **state)
{
    (void)state;
    tsr_kvblocks *m = mk(8, true);
    int32_t a[3 * B], s1[2], s2[3], got[3];
    fill(a, 3, 5);
    compute(m, a, 2, s1);
    assert_true(tsr_kvblocks_alloc(m, 3, s2));
    tsr_kvblocks_chain ch = {0};
    assert_false(tsr_kvblocks_commit(m, &ch, s2[0], a));
    assert_false(tsr_kvblocks_commit(m, &ch, s2[1], a + B));
    assert_true(tsr_kvblocks_commit(m, &ch, s2[2], a + 2 * B)); /* new: under s1's chain */
    assert_false(tsr_kvblocks_is_cached(m, s2[0]));
    tsr_kvblocks_release(m, s2, 3);
    tsr_kvblocks_stats st;
    tsr_kvblocks_get_stats(m, &st);
    assert_int_equal(st.n_free, 8 - 2 - 1);
    assert_int_equal(st.n_used, 2);
    tsr_kvblocks_release(m, s1, 2);
    assert_int_equal(tsr_kvblocks_match(m, a, 3, got, &ch), 3);
    assert_int_equal(got[0], s1[0]);
    assert_int_equal(got[1], s1[1]);
    assert_int_equal(got[2], s2[2]);
    tsr_kvblocks_release(m, got, 3);
    check_invariants(m);
    tsr_kvblocks_free(m);
}

static void test_cache_off(void **state)
{
    (void)state;
    tsr_kvblocks *m = mk(4, false);
    assert_false(tsr_kvblocks_caching(m));
    int32_t a[2 * B], bl[2], got[2];
    fill(a, 2, 1);
    assert_true(tsr_kvblocks_alloc(m, 2, bl));
    assert_int_equal(bl[0], 0); /* lowest ids first, as the engine's free list had them */
    assert_int_equal(bl[1], 1);
    tsr_kvblocks_chain ch = {0};
    assert_false(tsr_kvblocks_commit(m, &ch, bl[0], a));
    assert_int_equal(ch.n_blocks, 1);
    tsr_kvblocks_release(m, bl, 2);
    assert_int_equal(tsr_kvblocks_match(m, a, 2, got, &ch), 0);
    tsr_kvblocks_count_lookup(m, 0);
    tsr_kvblocks_stats st;
    tsr_kvblocks_get_stats(m, &st);
    assert_int_equal(st.n_free, 4);
    assert_int_equal(st.n_cached, 0);
    assert_int_equal(st.n_lookups, 0);
    check_invariants(m);
    tsr_kvblocks_free(m);
}

/* Sequences come and go at random over a few shared prefixes, in a pool too small for all
 * of them; every hit must carry the tokens asked for, the invariants hold after every
 * operation, and when everything has ended every reference is back to zero. */
#define R_SEQS 6
static void test_random_workload(void **state)
{
    (void)state;
    const int32_t n_pool = 24;
    tsr_kvblocks *m = mk(n_pool, true);
    tsr_kvblocks_set_hash(m, NULL);
    /* What each cached block holds, as the engine would have written it: its chain. */
    int32_t content[24][4 * B];
    int32_t depth[24];
    memset(depth, -1, sizeof depth);
    struct {
        bool live;
        int32_t toks[4 * B];
        int32_t blocks[4];
        int32_t n;
    } s[R_SEQS];
    memset(s, 0, sizeof s);
    unsigned rng = 12345;
#define RND() (rng = rng * 1103515245u + 12345u, (rng >> 16) & 0x7fff)
    for (int it = 0; it < 4000; it++) {
        int k = (int)(RND() % R_SEQS);
        if (s[k].live) {
            tsr_kvblocks_release(m, s[k].blocks, s[k].n);
            s[k].live = false;
        } else {
            /* Prompt: one of 3 families; blocks from the family up to a random depth, then
             * a random tail. */
            int fam = (int)(RND() % 3), same = (int)(RND() % 5), n = 1 + (int)(RND() % 4);
            for (int i = 0; i < n * B; i++)
                s[k].toks[i] = i / B < same ? fam * 100 + i : 1000 + (int32_t)(RND() % 7);
            tsr_kvblocks_chain ch;
            int32_t hit = tsr_kvblocks_match(m, s[k].toks, n - 1, s[k].blocks, &ch);
            for (int32_t i = 0; i < hit; i++) {
                int32_t b = s[k].blocks[i];
                if (depth[b] != i || memcmp(content[b], s[k].toks, sizeof(int32_t) * (i + 1) * B))
                    fail_msg("iteration %d: block %d found at depth %d holds another chain", it, b,
                             i);
            }
            if (!tsr_kvblocks_alloc(m, n - hit, s[k].blocks + hit)) {
                tsr_kvblocks_release(m, s[k].blocks, hit);
                check_invariants(m);
                continue;
            }
            for (int32_t i = hit; i < n; i++) {
                int32_t b = s[k].blocks[i];
                if (tsr_kvblocks_commit(m, &ch, b, s[k].toks + (size_t)i * B)) {
                    depth[b] = i;
                    memcpy(content[b], s[k].toks, sizeof(int32_t) * (i + 1) * B);
                }
            }
            s[k].n = n;
            s[k].live = true;
        }
        check_invariants(m);
    }
    for (int k = 0; k < R_SEQS; k++)
        if (s[k].live) tsr_kvblocks_release(m, s[k].blocks, s[k].n);
    check_invariants(m);
    tsr_kvblocks_stats st;
    tsr_kvblocks_get_stats(m, &st);
    assert_int_equal(st.n_used, 0);
    for (int32_t b = 0; b < n_pool; b++) assert_int_equal(tsr_kvblocks_refcount(m, b), 0);
    if (st.n_evictions == 0 || st.n_inserted == 0)
        fail_msg("the workload should insert and evict: inserted %llu, evicted %llu",
                 (unsigned long long)st.n_inserted, (unsigned long long)st.n_evictions);
    tsr_kvblocks_free(m);
}

/* Copy-on-write (tsr_kvblocks_cow): a sequence whose tokens are all cached must write the
 * last token's row; it gets a private copy of the last block, holds the shared one until
 * its copy is made, and its chain steps back so that committing the copy continues on the
 * shared entry (or caches the copy when the entry was evicted meanwhile). With no block to
 * spare the last block is dropped instead. */
static void test_copy_on_write(void **state)
{
    (void)state;
    tsr_kvblocks *m = mk(4, true);
    int32_t toks[2 * B], blocks[2], got[2], one[1];
    fill(toks, 2, 3);
    compute(m, toks, 2, blocks);
    tsr_kvblocks_release(m, blocks, 2);
    /* the chain after the first block, for comparison */
    tsr_kvblocks_chain ch1;
    assert_int_equal(tsr_kvblocks_match(m, toks, 1, one, &ch1), 1);
    tsr_kvblocks_release(m, one, 1);

    tsr_kvblocks_chain ch;
    assert_int_equal(tsr_kvblocks_match(m, toks, 2, got, &ch), 2);
    int32_t src = -2, dst = -2;
    assert_int_equal(tsr_kvblocks_cow(m, &ch, got, &src, &dst), 1);
    assert_int_equal(src, blocks[1]);
    assert_true(dst != blocks[0] && dst != blocks[1] && dst >= 0);
    assert_int_equal(got[0], blocks[0]);
    assert_int_equal(got[1], dst);
    assert_int_equal(ch.n_blocks, 1);
    if (ch.key != ch1.key || ch.serial != ch1.serial)
        fail_msg("chain after cow: expected key %llx serial %llu (one block), got %llx %llu",
                 (unsigned long long)ch1.key, (unsigned long long)ch1.serial,
                 (unsigned long long)ch.key, (unsigned long long)ch.serial);
    assert_int_equal(tsr_kvblocks_refcount(m, src), 1); /* the caller's, until copied */
    assert_int_equal(tsr_kvblocks_refcount(m, dst), 1);
    assert_false(tsr_kvblocks_is_cached(m, dst));
    check_invariants(m);
    /* copied: the shared block goes back to the LRU list; the copy, once computed, finds
     * the shared entry (the copy stays private) and the chain continues there */
    tsr_kvblocks_release(m, &src, 1);
    assert_false(tsr_kvblocks_commit(m, &ch, dst, toks + B));
    assert_int_equal(ch.n_blocks, 2);
    assert_false(tsr_kvblocks_is_cached(m, dst));
    tsr_kvblocks_stats st;
    tsr_kvblocks_get_stats(m, &st);
    assert_int_equal(st.n_copies, 1);
    tsr_kvblocks_release(m, got, 2);
    check_invariants(m);

    /* Shared entry evicted before the copy is committed: the copy is cached instead, under
     * the same parent, and a later match finds it. */
    assert_int_equal(tsr_kvblocks_match(m, toks, 2, got, &ch), 2);
    assert_int_equal(tsr_kvblocks_cow(m, &ch, got, &src, &dst), 1);
    tsr_kvblocks_release(m, &src, 1);
    int32_t fill_blocks[2];
    assert_true(tsr_kvblocks_alloc(m, 2, fill_blocks)); /* takes the free one, evicts src */
    assert_false(tsr_kvblocks_is_cached(m, src));
    assert_true(tsr_kvblocks_commit(m, &ch, dst, toks + B));
    tsr_kvblocks_release(m, fill_blocks, 2);
    tsr_kvblocks_release(m, got, 2);
    int32_t again[2];
    tsr_kvblocks_chain ch2;
    assert_int_equal(tsr_kvblocks_match(m, toks, 2, again, &ch2), 2);
    assert_int_equal(again[1], dst);
    tsr_kvblocks_release(m, again, 2);

    /* No block to spare: every other block referenced. The last block is dropped (it
     * stays cached, evictable) and the chain steps back. */
    int32_t hold[2];
    assert_int_equal(tsr_kvblocks_match(m, toks, 2, got, &ch), 2);
    assert_true(tsr_kvblocks_alloc(m, 2, hold));
    assert_int_equal(tsr_kvblocks_n_available(m), 0);
    assert_int_equal(tsr_kvblocks_cow(m, &ch, got, &src, &dst), 0);
    assert_int_equal(src, -1);
    assert_int_equal(dst, -1);
    assert_int_equal(ch.n_blocks, 1);
    assert_int_equal(tsr_kvblocks_refcount(m, again[1]), 0);
    assert_true(tsr_kvblocks_is_cached(m, again[1]));
    tsr_kvblocks_release(m, got, 1);
    tsr_kvblocks_release(m, hold, 2);
    check_invariants(m);
    tsr_kvblocks_get_stats(m, &st);
    assert_int_equal(st.n_used, 0);
    assert_int_equal(st.n_copies, 2);
    tsr_kvblocks_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hash_chain),
        cmocka_unit_test(test_hit_and_refcounts),
        cmocka_unit_test(test_parent_verified),
        cmocka_unit_test(test_hit_verified_by_tokens),
        cmocka_unit_test(test_lru_eviction_order),
        cmocka_unit_test(test_evicted_parent),
        cmocka_unit_test(test_duplicate_commit),
        cmocka_unit_test(test_cache_off),
        cmocka_unit_test(test_random_workload),
        cmocka_unit_test(test_copy_on_write),
        cmocka_unit_test(test_tags),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
