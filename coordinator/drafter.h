/*
 * drafter.h — proposers of draft tokens for speculative decoding.
 *
 * A drafter guesses the next k tokens of a sequence cheaply; the engine verifies all of
 * them with one target forward pass of k+1 query positions and keeps the longest correct
 * prefix (coordinator/engine.c). Two drafters implement this interface:
 *   - n-gram prompt lookup (tsr_drafter_ngram_new): finds the latest earlier occurrence of
 *     the sequence's last n-gram (n = max_n down to min_n) in its own prompt and output, and
 *     proposes the tokens that followed it; no model needed;
 *   - a draft model (tsr_drafter_model_new): a smaller GGUF with the same vocabulary, run in
 *     this process (the replica leader) with its own paged KV cache per sequence; greedy.
 * Both are deterministic: each proposed token has draft probability 1 (q is one-hot), which
 * the rejection rule of the sampling path accounts for exactly.
 *
 * Sequences are identified by the engine's request id. The drafter keeps per-sequence
 * state (the draft model's KV cache) and is told through `rollback` how many of the
 * sequence's tokens are final after each verification, so its cache rolls back with the
 * target's. Not thread-safe: only the engine's step loop calls it.
 */
#ifndef TSR_DRAFTER_H
#define TSR_DRAFTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "coordinator/kvblocks.h"
#include "kernels/kvcache.h"

typedef struct tsr_drafter tsr_drafter;

typedef struct {
    const char *name; /* "ngram", "draft-model" */
    /* Propose up to k tokens continuing tokens[0..n_tokens) (prompt + generated, the last
     * one included). Writes them to out[] and returns how many (0..k; 0 = no guess), or
     * < 0 with err. */
    int (*propose)(tsr_drafter *d, uint64_t seq_id, const int32_t *tokens, int32_t n_tokens,
                   int32_t k, int32_t *out, char *err, size_t err_len);
    /* The first n_final tokens of the sequence are final (accepted); anything the drafter
     * holds beyond them (e.g. draft KV entries of rejected tokens) must be dropped. */
    void (*rollback)(tsr_drafter *d, uint64_t seq_id, int32_t n_final);
    /* The sequence is finished: free its state. */
    void (*release)(tsr_drafter *d, uint64_t seq_id);
    void (*free)(tsr_drafter *d);
} tsr_drafter_vtable;

struct tsr_drafter {
    const tsr_drafter_vtable *vt;
    void *impl;
};

/* n-gram prompt lookup: match the last n tokens for n = max_n .. min_n (e.g. 3 .. 1). */
int tsr_drafter_ngram_new(int32_t min_n, int32_t max_n, tsr_drafter **out, char *err,
                          size_t err_len);

/* Draft model at `path`. Its vocabulary must equal the target's (`target_gguf`): the same
 * tokens in the same order, same model type and BOS/EOS; a mismatch is refused with a
 * message saying what differs. n_kv_blocks sizes its KV pool (blocks of TSR_KV_BLOCK_SIZE
 * positions shared by all sequences); n_threads its compute threads. */
typedef struct tsr_gguf tsr_gguf;
int tsr_drafter_model_new(const char *path, const tsr_gguf *target_gguf, int32_t n_kv_blocks,
                          int n_threads, tsr_drafter **out, char *err, size_t err_len);
/* The same with its KV cache stored as kv_type (kernels/kvcache.h; the target's type, so
 * --kv-type covers the draft too). A draft model whose heads cannot be q8_0 (head_dim % 32
 * != 0) keeps f16. tsr_drafter_model_new stores float32. */
int tsr_drafter_model_new_kv(const char *path, const tsr_gguf *target_gguf, int32_t n_kv_blocks,
                             int n_threads, tsr_kv_type kv_type, tsr_drafter **out, char *err,
                             size_t err_len);

/* The draft model of a target replica: as tsr_drafter_model_new, and on the leader's GPU
 * when the target runs there (tsr_replica_device >= 0; the draft's weights and KV pool then
 * live on that device, under what it has free; an error names the device). Speculation
 * stays on the host: only the draft's forward passes move. */
typedef struct tsr_replica tsr_replica;
int tsr_drafter_model_new_for(const char *path, const tsr_replica *target, int32_t n_kv_blocks,
                              int n_threads, tsr_drafter **out, char *err, size_t err_len);
/* Move a draft model's forward pass to CUDA device `device` (n_bytes_cap: 0 = what is free
 * less a reserve). -1 with err when d is not a draft model or the device refuses. */
int tsr_drafter_model_use_gpu(tsr_drafter *d, int32_t device, uint64_t n_bytes_cap, char *err,
                              size_t err_len);
/* "cpu" or "cuda" for a draft model, NULL for other drafters. */
const char *tsr_drafter_model_backend(const tsr_drafter *d);

/* Blocks no sequence holds in a draft model's KV pool (free or cached and evictable: stats,
 * leak checks), or -1 when d is not a draft-model drafter. When the pool runs out, propose
 * frees that sequence's blocks and proposes nothing (0, not an error). propose also
 * re-checks the tokens its cache holds against the history it is given, so a missed or
 * generous rollback costs recomputation, never a wrong draft.
 *
 * Prefix cache of the draft pool (coordinator/kvblocks.h; on by default): a new sequence
 * reuses the cached blocks of its history's longest cached prefix (copy-on-write of the
 * last block when all of it is cached); blocks are committed when final and at release.
 * Drafts stay exactly those of a cold pool. */
int32_t tsr_drafter_model_n_free_blocks(const tsr_drafter *d);

/* The draft pool's block and prefix-cache counters (lookups, hits, hit tokens, copies, ...).
 * -1 when d is not a draft model. */
int tsr_drafter_model_prefix_stats(const tsr_drafter *d, tsr_kvblocks_stats *st);

/* Turn the draft pool's prefix cache on or off (the engine follows --no-prefix-cache), before
 * any sequence. 0 (also for drafters without a pool), or -1 with err. */
int tsr_drafter_model_set_prefix_cache(tsr_drafter *d, bool on, char *err, size_t err_len);

/* Oracle (benchmarks only): proposes from a known continuation. `tokens` is the complete
 * expected sequence (prompt + output, copied); a sequence whose history is a prefix of it
 * gets the next k tokens of it, any other gets none. With the target's own greedy output
 * this measures the ceiling of speculation (100% acceptance). */
int tsr_drafter_oracle_new(const int32_t *tokens, int32_t n_tokens, tsr_drafter **out, char *err,
                           size_t err_len);

/* Oracle from a file written by `tessera generate --json` (its prompt_ids + ids): for
 * measuring the ceiling of speculation through generate and serve (`--spec oracle:PATH`). */
int tsr_drafter_oracle_load(const char *path, tsr_drafter **out, char *err, size_t err_len);

void tsr_drafter_free(tsr_drafter *d);

#endif
