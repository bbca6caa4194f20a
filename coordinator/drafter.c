/*
 * drafter.c — the drafters of drafter.h: n-gram prompt lookup, a greedy draft model with
 * its own paged KV cache, and an oracle for benchmarks.
 *
 * Why these three: prompt lookup costs nothing and wins big on outputs that copy their
 * input (code edits, summaries, extraction); a small model with the target's vocabulary
 * wins on free-running text; the oracle gives the ceiling against which both are judged.
 *
 * The draft model keeps, per sequence, a block table over its own KV pool and the tokens
 * whose K/V it holds (`fed`). Its KV cache must always describe a prefix of the sequence
 * the engine has; two mechanisms keep it so:
 *   - rollback(n_final) cuts the cache back to the final tokens after each verification
 *     and returns blocks no longer needed to the pool;
 *   - propose() compares `fed` with the history it is given and drops everything from the
 *     first difference, so a rollback that was never called (or called with a count that
 *     still covers a rejected draft) can cost recomputation, never a wrong draft.
 * Running out of KV blocks is not an error: the sequence's draft state is dropped and the
 * call proposes nothing, so the request goes on without speculation.
 *
 * The draft pool has its own prefix cache (coordinator/kvblocks.h, as the engine's): a new
 * sequence takes the longest cached chain of its history's full blocks (copy-on-write of
 * the last one when the whole history is cached, since its last token is fed again) and
 * computes only the rest. Blocks are committed once nothing can write them again: during
 * propose, the full blocks before the block of the last history token (drafts and the
 * re-fed last token are written at or after it, and history only grows); at release, every
 * full block it computed (the KV of exactly the tokens it names, drafts or not).
 */
#include "coordinator/drafter.h"
#include "coordinator/kvblocks.h"
#include "coordinator/sampler.h"
#include "kernels/util.h"

#include "shard/gguf.h"
#include "shard/vocab.h"
#include "worker/gpu.h"
#include "worker/model.h"
#include "worker/replica.h"

#include <inttypes.h>
#include <stdarg.h>
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Largest chunk of history the draft model takes in one forward call when catching up
 * with a long prompt: the batch buffers of its context scale with it. */
#define TSR_DRAFTER_N_BATCH 128

void tsr_drafter_free(tsr_drafter *d)
{
    if (d) d->vt->free(d);
}

/* Rollback and release for drafters that keep no per-sequence state. */
static void tsr_drafter_nop_rollback(tsr_drafter *d, uint64_t seq_id, int32_t n_final)
{
    (void)d;
    (void)seq_id;
    (void)n_final;
}

static void tsr_drafter_nop_release(tsr_drafter *d, uint64_t seq_id)
{
    (void)d;
    (void)seq_id;
}

static int tsr_drafter_new_shell(const tsr_drafter_vtable *vt, void *impl, tsr_drafter **out,
                                 char *err, size_t err_len)
{
    tsr_drafter *d = malloc(sizeof *d);
    if (!d) {
        tsr_set_err(err, err_len, "out of memory creating the %s drafter", vt->name);
        return -1;
    }
    d->vt = vt;
    d->impl = impl;
    *out = d;
    return 0;
}

/* ---- n-gram prompt lookup ---- */

typedef struct {
    int32_t min_n, max_n;
} tsr_drafter_ngram;

static int tsr_drafter_ngram_propose(tsr_drafter *d, uint64_t seq_id, const int32_t *tokens,
                                     int32_t n_tokens, int32_t k, int32_t *out, char *err,
                                     size_t err_len)
{
    (void)seq_id;
    const tsr_drafter_ngram *g = d->impl;
    if (k <= 0 || n_tokens < 2) return 0;
    if (!tokens || !out) {
        tsr_set_err(err, err_len, "ngram drafter: NULL tokens or output");
        return -1;
    }
    /* An earlier occurrence must start at i <= n_tokens - n - 1 (so it is not the suffix
     * itself and at least one token follows it), hence n <= n_tokens - 1. Longer n-grams
     * first: a longer match is stronger evidence that the continuation repeats too. */
    int32_t n = g->max_n < n_tokens - 1 ? g->max_n : n_tokens - 1;
    for (; n >= g->min_n; n--) {
        const int32_t *suf = tokens + n_tokens - n;
        const int32_t last = suf[n - 1];
        /* Backward scan: the latest occurrence is the most likely to be continued the
         * same way (it reflects the most recent context). Occurrences may overlap the
         * suffix. */
        for (int32_t i = n_tokens - n - 1; i >= 0; i--) {
            if (tokens[i + n - 1] != last) continue;
            if (memcmp(tokens + i, suf, sizeof(int32_t) * (size_t)n) != 0) continue;
            int32_t avail = n_tokens - (i + n);
            int32_t m = k < avail ? k : avail;
            memcpy(out, tokens + i + n, sizeof(int32_t) * (size_t)m);
            return m;
        }
    }
    return 0;
}

static void tsr_drafter_ngram_free(tsr_drafter *d)
{
    free(d->impl);
    free(d);
}

static const tsr_drafter_vtable tsr_drafter_ngram_vt = {
    .name = "ngram",
    .propose = tsr_drafter_ngram_propose,
    .rollback = tsr_drafter_nop_rollback,
    .release = tsr_drafter_nop_release,
    .free = tsr_drafter_ngram_free,
};

int tsr_drafter_ngram_new(int32_t min_n, int32_t max_n, tsr_drafter **out, char *err,
                          size_t err_len)
{
    *out = NULL;
    if (min_n < 1 || max_n < min_n) {
        tsr_set_err(err, err_len,
                    "ngram drafter: n-gram sizes %d..%d are invalid (need 1 <= min <= max)", min_n,
                    max_n);
        return -1;
    }
    tsr_drafter_ngram *g = malloc(sizeof *g);
    if (!g) {
        tsr_set_err(err, err_len, "out of memory creating the ngram drafter");
        return -1;
    }
    g->min_n = min_n;
    g->max_n = max_n;
    if (tsr_drafter_new_shell(&tsr_drafter_ngram_vt, g, out, err, err_len) != 0) {
        free(g);
        return -1;
    }
    return 0;
}

/* ---- oracle ---- */

typedef struct {
    int32_t *tokens;
    int32_t n_tokens;
} tsr_drafter_oracle;

static int tsr_drafter_oracle_propose(tsr_drafter *d, uint64_t seq_id, const int32_t *tokens,
                                      int32_t n_tokens, int32_t k, int32_t *out, char *err,
                                      size_t err_len)
{
    (void)seq_id;
    const tsr_drafter_oracle *o = d->impl;
    if (k <= 0 || n_tokens < 0 || n_tokens >= o->n_tokens) return 0;
    if ((n_tokens > 0 && !tokens) || !out) {
        tsr_set_err(err, err_len, "oracle drafter: NULL tokens or output");
        return -1;
    }
    if (n_tokens > 0 && memcmp(tokens, o->tokens, sizeof(int32_t) * (size_t)n_tokens) != 0)
        return 0;
    int32_t avail = o->n_tokens - n_tokens;
    int32_t m = k < avail ? k : avail;
    memcpy(out, o->tokens + n_tokens, sizeof(int32_t) * (size_t)m);
    return m;
}

static void tsr_drafter_oracle_free(tsr_drafter *d)
{
    tsr_drafter_oracle *o = d->impl;
    free(o->tokens);
    free(o);
    free(d);
}

static const tsr_drafter_vtable tsr_drafter_oracle_vt = {
    .name = "oracle",
    .propose = tsr_drafter_oracle_propose,
    .rollback = tsr_drafter_nop_rollback,
    .release = tsr_drafter_nop_release,
    .free = tsr_drafter_oracle_free,
};

int tsr_drafter_oracle_new(const int32_t *tokens, int32_t n_tokens, tsr_drafter **out, char *err,
                           size_t err_len)
{
    *out = NULL;
    if (n_tokens < 0 || (n_tokens > 0 && !tokens)) {
        tsr_set_err(err, err_len, "oracle drafter: bad token sequence (%d tokens)", n_tokens);
        return -1;
    }
    tsr_drafter_oracle *o = calloc(1, sizeof *o);
    if (!o) goto oom;
    o->tokens = malloc(sizeof(int32_t) * (size_t)(n_tokens > 0 ? n_tokens : 1));
    if (!o->tokens) goto oom_o;
    if (n_tokens > 0) memcpy(o->tokens, tokens, sizeof(int32_t) * (size_t)n_tokens);
    o->n_tokens = n_tokens;
    if (tsr_drafter_new_shell(&tsr_drafter_oracle_vt, o, out, err, err_len) != 0) goto fail_o;
    return 0;
oom_o:
    tsr_set_err(err, err_len, "out of memory creating the oracle drafter");
fail_o:
    free(o->tokens);
    free(o);
    return -1;
oom:
    tsr_set_err(err, err_len, "out of memory creating the oracle drafter");
    return -1;
}

/* ---- draft model ---- */

typedef struct {
    uint64_t id;
    int32_t *blocks; /* block table: blocks of the drafter's pool, in position order */
    int32_t n_blocks, cap_blocks;
    int32_t *fed;             /* [cap_blocks * TSR_KV_BLOCK_SIZE]: the tokens in the KV cache */
    int32_t n_computed;       /* positions 0..n_computed-1 hold fed[0..n_computed) */
    tsr_kvblocks_chain chain; /* leading blocks found in or committed to the prefix cache */
} tsr_drafter_seq;

typedef struct {
    tsr_gguf *g;
    tsr_model *m;
    tsr_ctx *c;
    int32_t n_vocab;
    int32_t n_batch;
    int32_t n_kv_blocks;
    tsr_kvblocks *kvb; /* the pool's blocks and its prefix cache */
    /* Live sequences: a small array searched linearly — the engine runs tens of
     * sequences at most, and a forward step dwarfs the scan. */
    tsr_drafter_seq *seqs;
    int32_t n_seqs, cap_seqs;
    /* Batch scratch, [n_batch] each, and one row of logits. */
    int32_t *b_pos, *b_seq;
    uint8_t *b_want;
    float *logits;
} tsr_drafter_model;

static tsr_drafter_seq *tsr_drafter_model_find(tsr_drafter_model *dm, uint64_t id)
{
    for (int32_t i = 0; i < dm->n_seqs; i++)
        if (dm->seqs[i].id == id) return &dm->seqs[i];
    return NULL;
}

/* Give all of a sequence's blocks back to the pool (its cache becomes empty; blocks in the
 * prefix cache stay there, evictable). */
static void tsr_drafter_model_drop(tsr_drafter_model *dm, tsr_drafter_seq *s)
{
    tsr_kvblocks_release(dm->kvb, s->blocks, s->n_blocks);
    s->n_blocks = 0;
    s->n_computed = 0;
    memset(&s->chain, 0, sizeof s->chain);
}

/* Room in the block table and `fed` for n_blocks blocks. 0 or -1 out of memory. */
static int tsr_drafter_model_cap(tsr_drafter_seq *s, int32_t n_blocks)
{
    if (n_blocks <= s->cap_blocks) return 0;
    int32_t cap = s->cap_blocks ? s->cap_blocks : 4;
    while (cap < n_blocks) cap *= 2;
    int32_t *blocks = realloc(s->blocks, sizeof(int32_t) * (size_t)cap);
    if (!blocks) return -1;
    s->blocks = blocks;
    int32_t *fed = realloc(s->fed, sizeof(int32_t) * (size_t)cap * TSR_KV_BLOCK_SIZE);
    if (!fed) return -1;
    s->fed = fed;
    s->cap_blocks = cap;
    return 0;
}

/* Make room for positions 0..n_pos-1. Returns 0, 1 when the pool has too few blocks to
 * spare (nothing taken), -1 out of memory. */
static int tsr_drafter_model_reserve(tsr_drafter_model *dm, tsr_drafter_seq *s, int32_t n_pos)
{
    int32_t need = (n_pos + TSR_KV_BLOCK_SIZE - 1) / TSR_KV_BLOCK_SIZE;
    if (need <= s->n_blocks) return 0;
    if (need - s->n_blocks > tsr_kvblocks_n_available(dm->kvb)) return 1;
    if (tsr_drafter_model_cap(s, need) != 0) return -1;
    if (!tsr_kvblocks_alloc(dm->kvb, need - s->n_blocks, s->blocks + s->n_blocks)) return 1;
    s->n_blocks = need;
    return 0;
}

/* Commit s's full blocks below position upto (their tokens in fed) to the prefix cache. */
static void tsr_drafter_model_commit(tsr_drafter_model *dm, tsr_drafter_seq *s, int32_t upto)
{
    if (upto > s->n_computed) upto = s->n_computed;
    while (s->chain.n_blocks < upto / TSR_KV_BLOCK_SIZE && s->chain.n_blocks < s->n_blocks) {
        const int32_t i = s->chain.n_blocks;
        tsr_kvblocks_commit(dm->kvb, &s->chain, s->blocks[i],
                            s->fed + (size_t)i * TSR_KV_BLOCK_SIZE);
    }
}

/* A sequence with nothing computed (s->n_blocks == 0): take the longest cached chain of the
 * full blocks of tokens[0..n_avail) that positions 0..upto-1 need. When it reaches past
 * upto, position upto (the last token, fed again for its logits, or the first after a
 * rollback) is written into the last block: that block becomes a private copy (or, with no
 * block to spare, is dropped). tokens may be s->fed. Returns 0 or -1 (out of memory, copy
 * failed; err set). */
static int tsr_drafter_model_match(tsr_drafter_model *dm, tsr_drafter_seq *s, const int32_t *tokens,
                                   int32_t n_avail, int32_t upto, char *err, size_t err_len)
{
    if (!tsr_kvblocks_caching(dm->kvb)) return 0;
    int32_t full = (upto + TSR_KV_BLOCK_SIZE - 1) / TSR_KV_BLOCK_SIZE;
    if (full > n_avail / TSR_KV_BLOCK_SIZE) full = n_avail / TSR_KV_BLOCK_SIZE;
    if (tsr_drafter_model_cap(s, full + 1) != 0) {
        tsr_set_err(err, err_len, "draft model: out of memory");
        return -1;
    }
    int32_t n = tsr_kvblocks_match(dm->kvb, tokens, full, s->blocks, &s->chain);
    s->n_blocks = n;
    s->n_computed = n * TSR_KV_BLOCK_SIZE;
    if (n > 0 && s->n_computed > upto) {
        int32_t src, dst;
        if (tsr_kvblocks_cow(dm->kvb, &s->chain, s->blocks, &src, &dst)) {
            int rc = tsr_ctx_kv_copy(dm->c, &src, &dst, 1, err, err_len);
            tsr_kvblocks_release(dm->kvb, &src, 1);
            if (rc != 0) {
                tsr_drafter_model_drop(dm, s);
                return -1;
            }
            s->n_computed = upto;
        } else {
            s->n_blocks = n - 1;
            s->n_computed = (n - 1) * TSR_KV_BLOCK_SIZE;
        }
    }
    if (tokens != s->fed) memcpy(s->fed, tokens, sizeof(int32_t) * (size_t)s->n_computed);
    tsr_kvblocks_count_lookup(dm->kvb, (s->n_computed + TSR_KV_BLOCK_SIZE - 1) / TSR_KV_BLOCK_SIZE);
    return 0;
}

/* Keep only the blocks that positions 0..n_computed-1 need. A rollback into the chain's
 * blocks (which may be shared, and are not written in place) takes the chain again up to
 * n_computed from the cache, with a private copy of the block it will write next; if that
 * fails, the state is dropped (the next propose recomputes it). */
static void tsr_drafter_model_trim(tsr_drafter_model *dm, tsr_drafter_seq *s)
{
    if (s->n_computed < s->chain.n_blocks * TSR_KV_BLOCK_SIZE) {
        const int32_t upto = s->n_computed, n_avail = s->n_blocks * TSR_KV_BLOCK_SIZE;
        tsr_kvblocks_release(dm->kvb, s->blocks, s->n_blocks);
        s->n_blocks = 0;
        memset(&s->chain, 0, sizeof s->chain);
        char err[256];
        if (tsr_drafter_model_match(dm, s, s->fed, n_avail, upto, err, sizeof err) != 0)
            tsr_drafter_model_drop(dm, s);
        return;
    }
    int32_t need = (s->n_computed + TSR_KV_BLOCK_SIZE - 1) / TSR_KV_BLOCK_SIZE;
    if (s->n_blocks > need) {
        tsr_kvblocks_release(dm->kvb, s->blocks + need, s->n_blocks - need);
        s->n_blocks = need;
    }
}

/* Feed toks[0..n) at positions pos0.. of sequence s (n <= n_batch), with logits for the
 * last one when want_last. */
static int tsr_drafter_model_feed(tsr_drafter_model *dm, tsr_drafter_seq *s, const int32_t *toks,
                                  int32_t n, int32_t pos0, bool want_last, char *err,
                                  size_t err_len)
{
    for (int32_t i = 0; i < n; i++) {
        dm->b_pos[i] = pos0 + i;
        dm->b_want[i] = want_last && i == n - 1;
    }
    const int32_t *tables[1] = {s->blocks};
    tsr_batch b = {.n_tokens = n,
                   .tokens = toks,
                   .pos = dm->b_pos,
                   .seq = dm->b_seq,
                   .want_logits = dm->b_want,
                   .n_seqs = 1,
                   .block_tables = tables,
                   .n_blocks = &s->n_blocks};
    return tsr_forward_batch(dm->c, &b, tsr_ctx_hidden(dm->c), dm->logits, err, err_len);
}

static int tsr_drafter_model_propose(tsr_drafter *d, uint64_t seq_id, const int32_t *tokens,
                                     int32_t n_tokens, int32_t k, int32_t *out, char *err,
                                     size_t err_len)
{
    tsr_drafter_model *dm = d->impl;
    if (k <= 0 || n_tokens <= 0) return 0;
    if (!tokens || !out) {
        tsr_set_err(err, err_len, "draft model: NULL tokens or output");
        return -1;
    }
    /* Positions the call writes: the history, then every draft but the last. A sequence
     * that cannot fit the whole pool gets no guess (and no state). */
    if ((int64_t)n_tokens + k - 1 > (int64_t)dm->n_kv_blocks * TSR_KV_BLOCK_SIZE) {
        tsr_drafter_seq *s = tsr_drafter_model_find(dm, seq_id);
        if (s) tsr_drafter_model_drop(dm, s);
        return 0;
    }
    const int32_t n_pos = n_tokens + k - 1;
    tsr_drafter_seq *s = tsr_drafter_model_find(dm, seq_id);
    if (!s) {
        if (dm->n_seqs == dm->cap_seqs) {
            int32_t cap = dm->cap_seqs ? dm->cap_seqs * 2 : 16;
            tsr_drafter_seq *seqs = realloc(dm->seqs, sizeof *seqs * (size_t)cap);
            if (!seqs) goto oom;
            dm->seqs = seqs;
            dm->cap_seqs = cap;
        }
        s = &dm->seqs[dm->n_seqs++];
        memset(s, 0, sizeof *s);
        s->id = seq_id;
    }
    /* The cache stays valid up to the first token that differs from the history; the
     * last history token is always fed again, as its logits start the draft. */
    int32_t valid = s->n_computed < n_tokens - 1 ? s->n_computed : n_tokens - 1;
    for (int32_t i = 0; i < valid; i++) {
        if (s->fed[i] != tokens[i]) {
            valid = i;
            break;
        }
    }
    s->n_computed = valid;
    if (valid < s->chain.n_blocks * TSR_KV_BLOCK_SIZE) {
        /* would write into a block that may be shared: start over (never happens while the
         * history only grows; a safety net) */
        tsr_drafter_model_drop(dm, s);
    }
    if (s->n_blocks == 0 &&
        tsr_drafter_model_match(dm, s, tokens, n_tokens, n_tokens - 1, err, err_len) != 0)
        return -1;
    int rc = tsr_drafter_model_reserve(dm, s, n_pos);
    if (rc < 0) goto oom;
    if (rc > 0) {
        /* Pool exhausted: free this sequence's blocks for the others; it retries from
         * scratch on its next call. */
        tsr_drafter_model_drop(dm, s);
        return 0;
    }
    /* Catch up with the history, chunk by chunk. n_computed advances only over chunks
     * that went through, so a failure leaves a consistent cache. */
    while (s->n_computed < n_tokens) {
        int32_t n = n_tokens - s->n_computed;
        if (n > dm->n_batch) n = dm->n_batch;
        const int32_t *toks = tokens + s->n_computed;
        if (tsr_drafter_model_feed(dm, s, toks, n, s->n_computed, s->n_computed + n == n_tokens,
                                   err, err_len) != 0)
            return -1;
        memcpy(s->fed + s->n_computed, toks, sizeof(int32_t) * (size_t)n);
        s->n_computed += n;
    }
    /* Final from here on: the blocks before the last history token's (it and the drafts
     * are written at or after it, now and in every later call). */
    tsr_drafter_model_commit(dm, s, ((n_tokens - 1) / TSR_KV_BLOCK_SIZE) * TSR_KV_BLOCK_SIZE);
    /* Greedy drafts; each but the last is fed back for the next one's logits. */
    for (int32_t i = 0; i < k; i++) {
        out[i] = tsr_sampler_argmax(dm->logits, dm->n_vocab);
        if (i == k - 1) break;
        if (tsr_drafter_model_feed(dm, s, &out[i], 1, s->n_computed, true, err, err_len) != 0)
            return -1;
        s->fed[s->n_computed++] = out[i];
    }
    return k;
oom:
    tsr_set_err(err, err_len, "draft model: out of memory for sequence %" PRIu64, seq_id);
    return -1;
}

static void tsr_drafter_model_rollback(tsr_drafter *d, uint64_t seq_id, int32_t n_final)
{
    tsr_drafter_model *dm = d->impl;
    tsr_drafter_seq *s = tsr_drafter_model_find(dm, seq_id);
    if (!s) return;
    if (n_final < 0) n_final = 0;
    if (n_final < s->n_computed) s->n_computed = n_final;
    tsr_drafter_model_trim(dm, s);
}

static void tsr_drafter_model_release(tsr_drafter *d, uint64_t seq_id)
{
    tsr_drafter_model *dm = d->impl;
    tsr_drafter_seq *s = tsr_drafter_model_find(dm, seq_id);
    if (!s) return;
    /* Nothing writes these blocks any more: cache every full one (the KV of exactly the
     * tokens in fed), so a later request with this history reuses it. */
    tsr_drafter_model_commit(dm, s, s->n_computed);
    tsr_drafter_model_drop(dm, s);
    free(s->blocks);
    free(s->fed);
    *s = dm->seqs[--dm->n_seqs]; /* swap-remove: order carries no meaning */
}

static void tsr_drafter_model_destroy(tsr_drafter_model *dm)
{
    if (!dm) return;
    for (int32_t i = 0; i < dm->n_seqs; i++) {
        free(dm->seqs[i].blocks);
        free(dm->seqs[i].fed);
    }
    free(dm->seqs);
    tsr_kvblocks_free(dm->kvb);
    free(dm->b_pos);
    free(dm->b_seq);
    free(dm->b_want);
    free(dm->logits);
    tsr_ctx_free(dm->c);
    tsr_model_free(dm->m);
    if (dm->g) tsr_gguf_close(dm->g);
    free(dm);
}

static void tsr_drafter_model_free(tsr_drafter *d)
{
    tsr_drafter_model_destroy(d->impl);
    free(d);
}

static const tsr_drafter_vtable tsr_drafter_model_vt = {
    .name = "draft-model",
    .propose = tsr_drafter_model_propose,
    .rollback = tsr_drafter_model_rollback,
    .release = tsr_drafter_model_release,
    .free = tsr_drafter_model_free,
};

int32_t tsr_drafter_model_n_free_blocks(const tsr_drafter *d)
{
    if (!d || d->vt != &tsr_drafter_model_vt) return -1;
    const tsr_drafter_model *dm = d->impl;
    return tsr_kvblocks_n_available(dm->kvb);
}

int tsr_drafter_model_prefix_stats(const tsr_drafter *d, tsr_kvblocks_stats *st)
{
    if (!d || d->vt != &tsr_drafter_model_vt) return -1;
    const tsr_drafter_model *dm = d->impl;
    tsr_kvblocks_get_stats(dm->kvb, st);
    return 0;
}

int tsr_drafter_model_set_prefix_cache(tsr_drafter *d, bool on, char *err, size_t err_len)
{
    if (!d || d->vt != &tsr_drafter_model_vt) return 0;
    tsr_drafter_model *dm = d->impl;
    if (tsr_kvblocks_caching(dm->kvb) == on) return 0;
    if (dm->n_seqs > 0) {
        tsr_set_err(err, err_len, "draft model: the prefix cache is switched before any sequence");
        return -1;
    }
    tsr_kvblocks *kvb;
    if (tsr_kvblocks_new(dm->n_kv_blocks, on, &kvb, err, err_len) != 0) return -1;
    tsr_kvblocks_free(dm->kvb);
    dm->kvb = kvb;
    return 0;
}

int tsr_drafter_model_use_gpu(tsr_drafter *d, int32_t device, uint64_t n_bytes_cap, char *err,
                              size_t err_len)
{
    if (!d || d->vt != &tsr_drafter_model_vt) {
        tsr_set_err(err, err_len, "only a draft model can run on a GPU");
        return -1;
    }
    tsr_drafter_model *dm = d->impl;
    char gerr[512];
    if (tsr_gpu_attach(dm->c, dm->m, device, n_bytes_cap, gerr, sizeof gerr) != 0) {
        tsr_set_err(err, err_len, "draft model on CUDA device %d: %s", device, gerr);
        return -1;
    }
    return 0;
}

const char *tsr_drafter_model_backend(const tsr_drafter *d)
{
    if (!d || d->vt != &tsr_drafter_model_vt) return NULL;
    const tsr_drafter_model *dm = d->impl;
    return tsr_ctx_backend_name(dm->c);
}

int tsr_drafter_model_new_for(const char *path, const tsr_replica *target, int32_t n_kv_blocks,
                              int n_threads, tsr_drafter **out, char *err, size_t err_len)
{
    /* the draft's cache in the target's KV type (f32 on GPU ranks) */
    if (tsr_drafter_model_new_kv(path, tsr_replica_gguf(target), n_kv_blocks, n_threads,
                                 tsr_replica_kv_type(target), out, err, err_len) != 0)
        return -1;
    const int32_t device = tsr_replica_device(target);
    if (device >= 0 && tsr_drafter_model_use_gpu(*out, device, 0, err, err_len) != 0) {
        tsr_drafter_free(*out);
        *out = NULL;
        return -1;
    }
    return 0;
}

/* Printable prefix of a GGUF string for messages. */
static int tsr_drafter_str_len(const tsr_gguf_str *s)
{
    return s->len > 64 ? 64 : (int)s->len;
}

/* The draft's vocabulary must be the target's: a token id has to mean the same text in
 * both, or every draft is a guess in another language. Compared: tokenizer.ggml.model,
 * the token count and every token string in order (from the files, without building
 * tokenizers), then the BOS/EOS ids as the tokenizer resolves them (absent keys take the
 * model type's defaults). */
static int tsr_drafter_vocab_check(const char *path, const tsr_gguf *dg, const tsr_gguf *tg,
                                   char *err, size_t err_len)
{
    int rc = -1;
    tsr_vocab *dv = NULL, *tv = NULL;
    char verr[256];
    tsr_gguf_str dmod, tmod;
    if (!tsr_gguf_get_str(tg, "tokenizer.ggml.model", &tmod)) {
        tsr_set_err(err, err_len,
                    "the target has no tokenizer.ggml.model: cannot check the draft "
                    "vocabulary");
        return -1;
    }
    if (!tsr_gguf_get_str(dg, "tokenizer.ggml.model", &dmod)) {
        tsr_set_err(err, err_len,
                    "%s: the draft vocabulary has no tokenizer.ggml.model (the "
                    "target's is '%.*s')",
                    path, tsr_drafter_str_len(&tmod), tmod.ptr);
        return -1;
    }
    if (dmod.len != tmod.len || memcmp(dmod.ptr, tmod.ptr, dmod.len) != 0) {
        tsr_set_err(err, err_len,
                    "%s: the draft vocabulary is of type '%.*s', the target's is '%.*s'", path,
                    tsr_drafter_str_len(&dmod), dmod.ptr, tsr_drafter_str_len(&tmod), tmod.ptr);
        return -1;
    }
    int64_t dk = tsr_gguf_find_key(dg, "tokenizer.ggml.tokens");
    int64_t tk = tsr_gguf_find_key(tg, "tokenizer.ggml.tokens");
    tsr_gguf_vtype det = TSR_GGUF_STRING, tet = TSR_GGUF_STRING;
    uint64_t dn = 0, tn = 0;
    if (tk < 0 || !tsr_gguf_kv_arr(tg, tk, &tet, &tn) || tet != TSR_GGUF_STRING) {
        tsr_set_err(err, err_len,
                    "the target has no tokenizer.ggml.tokens string array: cannot "
                    "check the draft vocabulary");
        return -1;
    }
    if (dk < 0 || !tsr_gguf_kv_arr(dg, dk, &det, &dn) || det != TSR_GGUF_STRING) {
        tsr_set_err(err, err_len,
                    "%s: the draft vocabulary has no tokenizer.ggml.tokens string array", path);
        return -1;
    }
    if (dn != tn) {
        tsr_set_err(err, err_len,
                    "%s: the draft vocabulary has %" PRIu64 " tokens, the target's has %" PRIu64,
                    path, dn, tn);
        return -1;
    }
    for (uint64_t j = 0; j < tn; j++) {
        tsr_gguf_str ds, ts;
        if (!tsr_gguf_arr_str(dg, dk, j, &ds) || !tsr_gguf_arr_str(tg, tk, j, &ts)) {
            tsr_set_err(err, err_len, "%s: token %" PRIu64 " of the vocabulary is unreadable", path,
                        j);
            return -1;
        }
        if (ds.len != ts.len || memcmp(ds.ptr, ts.ptr, ds.len) != 0) {
            tsr_set_err(err, err_len,
                        "%s: the draft vocabulary differs from the target's at token %" PRIu64
                        ": '%.*s' vs '%.*s'",
                        path, j, tsr_drafter_str_len(&ds), ds.ptr, tsr_drafter_str_len(&ts),
                        ts.ptr);
            return -1;
        }
    }
    if (tsr_vocab_load(dg, &dv, verr, sizeof verr) != 0) {
        tsr_set_err(err, err_len, "%s: the draft vocabulary does not load: %s", path, verr);
        goto done;
    }
    if (tsr_vocab_load(tg, &tv, verr, sizeof verr) != 0) {
        tsr_set_err(err, err_len, "the target vocabulary does not load: %s", verr);
        goto done;
    }
    if (tsr_vocab_bos(dv) != tsr_vocab_bos(tv)) {
        tsr_set_err(err, err_len, "%s: the draft vocabulary's BOS token is %d, the target's is %d",
                    path, tsr_vocab_bos(dv), tsr_vocab_bos(tv));
        goto done;
    }
    if (tsr_vocab_eos(dv) != tsr_vocab_eos(tv)) {
        tsr_set_err(err, err_len, "%s: the draft vocabulary's EOS token is %d, the target's is %d",
                    path, tsr_vocab_eos(dv), tsr_vocab_eos(tv));
        goto done;
    }
    rc = 0;
done:
    tsr_vocab_free(tv);
    tsr_vocab_free(dv);
    return rc;
}

int tsr_drafter_model_new(const char *path, const tsr_gguf *target_gguf, int32_t n_kv_blocks,
                          int n_threads, tsr_drafter **out, char *err, size_t err_len)
{
    return tsr_drafter_model_new_kv(path, target_gguf, n_kv_blocks, n_threads, TSR_KV_F32, out, err,
                                    err_len);
}

int tsr_drafter_model_new_kv(const char *path, const tsr_gguf *target_gguf, int32_t n_kv_blocks,
                             int n_threads, tsr_kv_type kv_type, tsr_drafter **out, char *err,
                             size_t err_len)
{
    *out = NULL;
    char merr[512];
    if (!path || !target_gguf) {
        tsr_set_err(err, err_len, "draft model: no path or no target model");
        return -1;
    }
    if (n_kv_blocks < 1) {
        tsr_set_err(err, err_len, "draft model: a KV pool of %d blocks is too small", n_kv_blocks);
        return -1;
    }
    tsr_drafter_model *dm = calloc(1, sizeof *dm);
    if (!dm) goto oom;
    if (tsr_gguf_open(path, &dm->g, merr, sizeof merr) != 0) {
        tsr_set_err(err, err_len, "draft model: %s", merr);
        goto fail;
    }
    if (tsr_drafter_vocab_check(path, dm->g, target_gguf, err, err_len) != 0) goto fail;
    if (tsr_model_load(dm->g, &dm->m, merr, sizeof merr) != 0) {
        tsr_set_err(err, err_len, "draft model %s: %s", path, merr);
        goto fail;
    }
    dm->n_vocab = dm->m->hp.n_vocab;
    dm->n_batch = TSR_DRAFTER_N_BATCH;
    dm->n_kv_blocks = n_kv_blocks;
    /* A draft whose heads cannot be q8_0 (head_dim % 32) keeps f16: drafts are proposals. */
    if (!tsr_kv_type_fits(kv_type, dm->m->hp.head_dim, NULL, 0)) kv_type = TSR_KV_F16;
    if (tsr_ctx_new_paged_kv(dm->m, n_kv_blocks, dm->n_batch, n_threads, kv_type, &dm->c, merr,
                             sizeof merr) != 0) {
        tsr_set_err(err, err_len, "draft model %s: %s", path, merr);
        goto fail;
    }
    if (tsr_kvblocks_new(n_kv_blocks, true, &dm->kvb, err, err_len) != 0) goto fail;
    dm->b_pos = malloc(sizeof(int32_t) * (size_t)dm->n_batch);
    dm->b_seq = calloc((size_t)dm->n_batch, sizeof(int32_t)); /* one sequence: index 0 */
    dm->b_want = malloc((size_t)dm->n_batch);
    dm->logits = malloc(sizeof(float) * (size_t)dm->n_vocab);
    if (!dm->b_pos || !dm->b_seq || !dm->b_want || !dm->logits) goto oom;
    if (tsr_drafter_new_shell(&tsr_drafter_model_vt, dm, out, err, err_len) != 0) goto fail;
    return 0;
oom:
    tsr_set_err(err, err_len, "draft model: out of memory");
fail:
    tsr_drafter_model_destroy(dm);
    return -1;
}

int tsr_drafter_oracle_load(const char *path, tsr_drafter **out, char *err, size_t err_len)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, err_len, "cannot open oracle file '%s'", path);
        return -1;
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = n > 0 ? malloc((size_t)n + 1) : NULL;
    size_t got = buf ? fread(buf, 1, (size_t)n, f) : 0;
    fclose(f);
    if (!buf || got != (size_t)n) {
        free(buf);
        snprintf(err, err_len, "cannot read oracle file '%s'", path);
        return -1;
    }
    buf[n] = 0;
    cJSON *j = cJSON_Parse(buf);
    free(buf);
    cJSON *pi = cJSON_GetObjectItem(j, "prompt_ids"), *gi = cJSON_GetObjectItem(j, "ids");
    int rc = -1;
    if (!cJSON_IsArray(pi) || !cJSON_IsArray(gi)) {
        snprintf(err, err_len,
                 "oracle file '%s' is not the JSON of 'tessera generate --json' (needs "
                 "prompt_ids and ids)",
                 path);
        goto done;
    }
    int np = cJSON_GetArraySize(pi), ng = cJSON_GetArraySize(gi);
    int32_t *all = malloc(sizeof(int32_t) * (size_t)(np + ng + 1));
    if (!all) {
        snprintf(err, err_len, "out of memory");
        goto done;
    }
    for (int i = 0; i < np; i++) all[i] = cJSON_GetArrayItem(pi, i)->valueint;
    for (int i = 0; i < ng; i++) all[np + i] = cJSON_GetArrayItem(gi, i)->valueint;
    rc = tsr_drafter_oracle_new(all, np + ng, out, err, err_len);
    free(all);
done:
    cJSON_Delete(j);
    return rc;
}
