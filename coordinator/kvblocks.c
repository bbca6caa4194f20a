/*
 * kvblocks.c — KV block manager and prefix cache (see kvblocks.h).
 *
 * Per block: a reference count, and when cached its entry (chain key, serial, parent
 * serial, 16 token ids), a link in its hash bucket and, while unreferenced, a place in the
 * LRU list. Free blocks sit on a stack (lowest ids on top, as the engine's free list had
 * them). The hash table has a power-of-two number of buckets >= 2 × n_blocks, chained
 * through the blocks themselves, so nothing is allocated after creation.
 */
#include "coordinator/kvblocks.h"
#include "kernels/util.h"

#include <stdlib.h>
#include <string.h>

#define NIL (-1)
/* A chain whose last block could not be cached under a valid parent: nothing above it is
 * cached (a serial no entry ever gets). */
#define SERIAL_DEAD UINT64_MAX

struct tsr_kvblocks {
    int32_t n_blocks;
    bool caching;
    int32_t *refcount;
    /* cache entries (serial 0: the block holds none) */
    uint64_t *key, *serial, *parent_serial;
    uint64_t *parent_key; /* the parent entry's chain key (0 at the root): tsr_kvblocks_cow */
    int32_t *tokens;      /* [n_blocks][TSR_KV_BLOCK_SIZE] */
    uint8_t *tag;         /* the entry's tag (tsr_kvblocks_match_tagged), compared on lookup */
    int32_t *bucket;      /* [n_buckets] first block of the bucket, or NIL */
    int32_t *hnext;       /* next block in the same bucket */
    uint64_t bucket_mask;
    /* LRU list of evictable blocks: head = least recently used */
    int32_t *lru_prev, *lru_next;
    int32_t lru_head, lru_tail;
    /* free stack */
    int32_t *free_stack;
    int32_t n_free;
    int32_t n_used, n_evictable, n_cached;
    uint64_t next_serial;
    uint64_t n_lookups, n_hits, n_hit_tokens, n_evictions, n_inserted, n_copies;
    tsr_kvblocks_hash_fn hash;
};

uint64_t tsr_kvblocks_hash(uint64_t parent_key, const int32_t *tokens)
{
    uint64_t h = tsr_mix64(parent_key ^ 0x9e3779b97f4a7c15ull);
    for (int32_t i = 0; i < TSR_KV_BLOCK_SIZE; i++)
        h = tsr_mix64(h ^ ((uint64_t)(uint32_t)tokens[i] | ((uint64_t)(uint32_t)i << 32)));
    return h;
}

int tsr_kvblocks_new(int32_t n_blocks, bool prefix_cache, tsr_kvblocks **out, char *err,
                     size_t err_len)
{
    *out = NULL;
    if (n_blocks < 1) {
        tsr_set_err(err, err_len, "KV block manager: a pool of %d blocks is too small", n_blocks);
        return -1;
    }
    tsr_kvblocks *m = calloc(1, sizeof *m);
    if (!m) goto oom;
    m->n_blocks = n_blocks;
    m->caching = prefix_cache;
    m->hash = tsr_kvblocks_hash;
    const size_t n = (size_t)n_blocks;
    uint64_t n_buckets = 16;
    while (n_buckets < 2 * (uint64_t)n_blocks) n_buckets *= 2;
    m->bucket_mask = n_buckets - 1;
    m->refcount = calloc(n, sizeof(int32_t));
    m->free_stack = malloc(n * sizeof(int32_t));
    if (!m->refcount || !m->free_stack) goto oom;
    if (prefix_cache) {
        m->key = calloc(n, sizeof(uint64_t));
        m->serial = calloc(n, sizeof(uint64_t));
        m->parent_serial = calloc(n, sizeof(uint64_t));
        m->parent_key = calloc(n, sizeof(uint64_t));
        m->tokens = calloc(n * TSR_KV_BLOCK_SIZE, sizeof(int32_t));
        m->tag = calloc(n, 1);
        m->bucket = malloc((size_t)n_buckets * sizeof(int32_t));
        m->hnext = malloc(n * sizeof(int32_t));
        m->lru_prev = malloc(n * sizeof(int32_t));
        m->lru_next = malloc(n * sizeof(int32_t));
        if (!m->key || !m->serial || !m->parent_serial || !m->parent_key || !m->tokens || !m->tag ||
            !m->bucket || !m->hnext || !m->lru_prev || !m->lru_next)
            goto oom;
        for (uint64_t b = 0; b < n_buckets; b++) m->bucket[b] = NIL;
        for (size_t i = 0; i < n; i++) m->hnext[i] = m->lru_prev[i] = m->lru_next[i] = NIL;
    }
    m->lru_head = m->lru_tail = NIL;
    for (int32_t i = 0; i < n_blocks; i++) m->free_stack[i] = n_blocks - 1 - i;
    m->n_free = n_blocks;
    *out = m;
    return 0;
oom:
    tsr_set_err(err, err_len, "out of memory for the KV block manager (%d blocks)", n_blocks);
    tsr_kvblocks_free(m);
    return -1;
}

void tsr_kvblocks_free(tsr_kvblocks *m)
{
    if (!m) return;
    free(m->refcount);
    free(m->key);
    free(m->serial);
    free(m->parent_serial);
    free(m->parent_key);
    free(m->tokens);
    free(m->tag);
    free(m->bucket);
    free(m->hnext);
    free(m->lru_prev);
    free(m->lru_next);
    free(m->free_stack);
    free(m);
}

void tsr_kvblocks_set_hash(tsr_kvblocks *m, tsr_kvblocks_hash_fn fn)
{
    m->hash = fn ? fn : tsr_kvblocks_hash;
}

bool tsr_kvblocks_caching(const tsr_kvblocks *m)
{
    return m->caching;
}

int32_t tsr_kvblocks_n_available(const tsr_kvblocks *m)
{
    return m->n_free + m->n_evictable;
}

static void lru_remove(tsr_kvblocks *m, int32_t b)
{
    int32_t p = m->lru_prev[b], n = m->lru_next[b];
    if (p != NIL)
        m->lru_next[p] = n;
    else
        m->lru_head = n;
    if (n != NIL)
        m->lru_prev[n] = p;
    else
        m->lru_tail = p;
    m->lru_prev[b] = m->lru_next[b] = NIL;
    m->n_evictable--;
}

static void lru_append(tsr_kvblocks *m, int32_t b)
{
    m->lru_prev[b] = m->lru_tail;
    m->lru_next[b] = NIL;
    if (m->lru_tail != NIL)
        m->lru_next[m->lru_tail] = b;
    else
        m->lru_head = b;
    m->lru_tail = b;
    m->n_evictable++;
}

/* Drop b's cache entry (b is unreferenced and already out of the LRU list). */
static void uncache(tsr_kvblocks *m, int32_t b)
{
    int32_t *link = &m->bucket[m->key[b] & m->bucket_mask];
    while (*link != NIL && *link != b) link = &m->hnext[*link];
    if (*link == b) *link = m->hnext[b];
    m->hnext[b] = NIL;
    m->serial[b] = 0;
    m->n_cached--;
}

/* The chain key of a block with these tokens and tag under parent_key (tag 0: the plain
 * hash, so a custom hash function sees what it always saw). */
static uint64_t key_of(const tsr_kvblocks *m, uint64_t parent_key, const int32_t *tokens,
                       uint8_t tag)
{
    return m->hash(tag ? parent_key ^ tsr_mix64(0x7f4a7c159e3779b9ull + tag) : parent_key, tokens);
}

/* The cached entry with this key, parent, tokens and tag, or NIL. */
static int32_t find(const tsr_kvblocks *m, uint64_t key, uint64_t parent_serial,
                    const int32_t *tokens, uint8_t tag)
{
    for (int32_t b = m->bucket[key & m->bucket_mask]; b != NIL; b = m->hnext[b]) {
        if (m->key[b] == key && m->parent_serial[b] == parent_serial && m->tag[b] == tag &&
            !memcmp(&m->tokens[(size_t)b * TSR_KV_BLOCK_SIZE], tokens,
                    sizeof(int32_t) * TSR_KV_BLOCK_SIZE))
            return b;
    }
    return NIL;
}

bool tsr_kvblocks_alloc(tsr_kvblocks *m, int32_t n, int32_t *out)
{
    if (n <= 0) return true;
    if (n > m->n_free + m->n_evictable) return false;
    for (int32_t i = 0; i < n; i++) {
        int32_t b;
        if (m->n_free > 0) {
            b = m->free_stack[--m->n_free];
        } else {
            b = m->lru_head;
            lru_remove(m, b);
            uncache(m, b);
            m->n_evictions++;
        }
        m->refcount[b] = 1;
        m->n_used++;
        out[i] = b;
    }
    return true;
}

void tsr_kvblocks_release(tsr_kvblocks *m, const int32_t *blocks, int32_t n)
{
    for (int32_t i = n - 1; i >= 0; i--) {
        int32_t b = blocks[i];
        if (b < 0 || b >= m->n_blocks || m->refcount[b] <= 0) continue; /* not held: ignore */
        if (--m->refcount[b] > 0) continue;
        m->n_used--;
        if (m->caching && m->serial[b] != 0)
            lru_append(m, b);
        else
            m->free_stack[m->n_free++] = b;
    }
}

int32_t tsr_kvblocks_match(tsr_kvblocks *m, const int32_t *tokens, int32_t max_blocks,
                           int32_t *out_blocks, tsr_kvblocks_chain *chain)
{
    return tsr_kvblocks_match_tagged(m, tokens, NULL, max_blocks, out_blocks, chain);
}

int32_t tsr_kvblocks_match_tagged(tsr_kvblocks *m, const int32_t *tokens, const uint8_t *tags,
                                  int32_t max_blocks, int32_t *out_blocks,
                                  tsr_kvblocks_chain *chain)
{
    memset(chain, 0, sizeof *chain);
    if (!m->caching) return 0;
    int32_t n = 0;
    for (; n < max_blocks; n++) {
        const int32_t *t = tokens + (size_t)n * TSR_KV_BLOCK_SIZE;
        const uint8_t tag = tags ? tags[n] : 0;
        uint64_t k = key_of(m, chain->key, t, tag);
        int32_t b = find(m, k, chain->serial, t, tag);
        if (b == NIL) break;
        if (m->refcount[b] == 0) {
            lru_remove(m, b);
            m->n_used++;
        }
        m->refcount[b]++;
        out_blocks[n] = b;
        chain->key = k;
        chain->serial = m->serial[b];
    }
    chain->n_blocks = n;
    return n;
}

int tsr_kvblocks_cow(tsr_kvblocks *m, tsr_kvblocks_chain *chain, int32_t *blocks, int32_t *src,
                     int32_t *dst)
{
    *src = *dst = NIL;
    const int32_t n = chain->n_blocks;
    if (!m->caching || n <= 0) return 0;
    const int32_t shared = blocks[n - 1];
    /* Step the chain back to the parent of the last block: the copy is private, and the
     * caller's commit of that position finds the shared entry again (or caches the copy if
     * the entry was evicted meanwhile). */
    chain->n_blocks = n - 1;
    chain->key = m->parent_key[shared];
    chain->serial = m->parent_serial[shared];
    int32_t fresh;
    if (!tsr_kvblocks_alloc(m, 1, &fresh)) {
        tsr_kvblocks_release(m, &shared, 1);
        return 0;
    }
    blocks[n - 1] = fresh;
    *src = shared;
    *dst = fresh;
    m->n_copies++;
    return 1;
}

void tsr_kvblocks_count_lookup(tsr_kvblocks *m, int32_t n_blocks)
{
    if (!m->caching) return;
    m->n_lookups++;
    if (n_blocks > 0) {
        m->n_hits++;
        m->n_hit_tokens += (uint64_t)n_blocks * TSR_KV_BLOCK_SIZE;
    }
}

bool tsr_kvblocks_commit(tsr_kvblocks *m, tsr_kvblocks_chain *chain, int32_t block,
                         const int32_t *tokens)
{
    return tsr_kvblocks_commit_tagged(m, chain, block, tokens, 0);
}

bool tsr_kvblocks_commit_tagged(tsr_kvblocks *m, tsr_kvblocks_chain *chain, int32_t block,
                                const int32_t *tokens, uint8_t tag)
{
    chain->n_blocks++;
    if (!m->caching || chain->serial == SERIAL_DEAD) return false;
    uint64_t k = key_of(m, chain->key, tokens, tag);
    int32_t e = find(m, k, chain->serial, tokens, tag);
    if (e != NIL) {
        /* Cached already (another sequence computed the same prefix): continue the chain
         * on that entry; this copy stays private and is freed with its sequence. */
        chain->key = k;
        chain->serial = m->serial[e];
        return e == block;
    }
    if (block < 0 || block >= m->n_blocks || m->refcount[block] <= 0 || m->serial[block] != 0) {
        /* Not the caller's private block (a misuse): cache nothing on this chain any more
         * rather than guess a parent. */
        chain->serial = SERIAL_DEAD;
        return false;
    }
    m->key[block] = k;
    m->tag[block] = tag;
    m->serial[block] = ++m->next_serial;
    m->parent_serial[block] = chain->serial;
    m->parent_key[block] = chain->key;
    memcpy(&m->tokens[(size_t)block * TSR_KV_BLOCK_SIZE], tokens,
           sizeof(int32_t) * TSR_KV_BLOCK_SIZE);
    int32_t *head = &m->bucket[k & m->bucket_mask];
    m->hnext[block] = *head;
    *head = block;
    m->n_cached++;
    m->n_inserted++;
    chain->key = k;
    chain->serial = m->serial[block];
    return true;
}

int32_t tsr_kvblocks_refcount(const tsr_kvblocks *m, int32_t block)
{
    return block >= 0 && block < m->n_blocks ? m->refcount[block] : 0;
}

bool tsr_kvblocks_is_cached(const tsr_kvblocks *m, int32_t block)
{
    return m->caching && block >= 0 && block < m->n_blocks && m->serial[block] != 0;
}

void tsr_kvblocks_get_stats(const tsr_kvblocks *m, tsr_kvblocks_stats *st)
{
    memset(st, 0, sizeof *st);
    st->n_total = m->n_blocks;
    st->n_used = m->n_used;
    st->n_free = m->n_free;
    st->n_evictable = m->n_evictable;
    st->n_cached = m->n_cached;
    st->n_lookups = m->n_lookups;
    st->n_hits = m->n_hits;
    st->n_hit_tokens = m->n_hit_tokens;
    st->n_evictions = m->n_evictions;
    st->n_inserted = m->n_inserted;
    st->n_copies = m->n_copies;
}
