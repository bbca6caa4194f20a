/*
 * kvblocks.h — the leader's KV block manager: who owns which block of the paged KV pool,
 * and the prefix cache that keeps the blocks of full prompt prefixes after their request
 * ends, so that a later request with the same prefix reuses them instead of recomputing.
 *
 * The pool has n_blocks blocks of TSR_KV_BLOCK_SIZE (16) token positions (worker/model.h
 * stores them on every rank; this module only does the bookkeeping, on the leader, and the
 * block tables travel with each step). Every block is in one of three states:
 *   free       no reference, no cached content: the first choice of an allocation;
 *   used       referenced by one or more running sequences (refcount > 0);
 *   evictable  no reference but cached content (refcount 0, in the LRU list): an allocation
 *              takes one only when no free block is left, least recently used first, and
 *              its cache entry is dropped then (an eviction).
 *
 * Cached content: block i of a sequence (positions 16i .. 16i+15) holds K/V that depend on
 * every token of positions 0 .. 16i+15, so a cache entry names the whole chain: its key is
 * a hash of the parent block's key and its own 16 token ids, and a lookup walks the chain
 * from position 0. A hit is never trusted to the hash: the entry's 16 token ids are
 * compared, and so is the identity of its parent entry (a serial number that is never
 * reused, so an entry whose parent was evicted can no longer be reached even if the
 * parent's block is reused for the same or another chain). Only full blocks whose K/V are
 * final are cached (tsr_kvblocks_commit: the engine commits every full block below its
 * sequence's computed length, prompt or generated tokens; rejected speculative drafts lie
 * at or after that length), and the engine never writes into a block below its computed
 * length, so a shared block is read-only while shared. The one write into a shared block —
 * the last token of a sequence whose tokens end on a block boundary and are all cached,
 * run again for its logits — goes to a private copy instead (tsr_kvblocks_cow).
 *
 * Eviction order: releasing a sequence's blocks last block first puts the deeper blocks of
 * a chain before their parents in the LRU list, so a chain is evicted from its tail and a
 * cached child is never left behind an evicted parent in normal operation (if it were, it
 * would only be unreachable, never wrong).
 *
 * With the cache off (tsr_kvblocks_new(.., false, ..)) lookups find nothing, commits keep
 * nothing, and the manager is the plain free list the engine had before.
 *
 * Not thread-safe: only the engine's step loop calls it.
 */
#ifndef TSR_KVBLOCKS_H
#define TSR_KVBLOCKS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/model.h" /* TSR_KV_BLOCK_SIZE */

typedef struct tsr_kvblocks tsr_kvblocks;

/* Where a sequence stands in the chain of cached blocks: its first n_blocks blocks are
 * accounted for (found in the cache or committed), and key/serial name the entry of the
 * last of them (0/0 before the first block). Zero-initialize it for a new sequence. */
typedef struct {
    int32_t n_blocks;
    uint64_t key;
    uint64_t serial;
} tsr_kvblocks_chain;

/* Counters since creation (Admin.Status, /metrics) and the pool's state now. */
typedef struct {
    int32_t n_total;
    int32_t n_used;      /* referenced by running sequences */
    int32_t n_free;      /* unreferenced, nothing cached */
    int32_t n_evictable; /* unreferenced, cached (LRU list) */
    int32_t n_cached;    /* blocks with a cache entry, referenced or not */
    uint64_t n_lookups;  /* tsr_kvblocks_match calls counted by tsr_kvblocks_count_lookup */
    uint64_t n_hits;     /* of which reused >= 1 block */
    uint64_t n_hit_tokens;
    uint64_t n_evictions; /* cache entries dropped to reuse their block */
    uint64_t n_inserted;  /* cache entries made by commits */
    uint64_t n_copies;    /* copy-on-write block copies (tsr_kvblocks_cow) */
} tsr_kvblocks_stats;

/* A manager of n_blocks blocks (>= 1), all free; prefix_cache false turns caching off.
 * Returns 0, or < 0 with err (out of memory, bad size). */
int tsr_kvblocks_new(int32_t n_blocks, bool prefix_cache, tsr_kvblocks **out, char *err,
                     size_t err_len);
void tsr_kvblocks_free(tsr_kvblocks *m);

bool tsr_kvblocks_caching(const tsr_kvblocks *m);

/* Blocks an allocation can get now: free + evictable. */
int32_t tsr_kvblocks_n_available(const tsr_kvblocks *m);

/* Take n blocks for the caller (refcount 1 each, nothing cached in them), free ones first,
 * then evicting the least recently used cached ones. Writes their ids to out[0..n).
 * Returns false, taking nothing, when fewer than n are available. */
bool tsr_kvblocks_alloc(tsr_kvblocks *m, int32_t n, int32_t *out);

/* Drop the caller's reference to blocks[0..n) (a block table or its tail), last first. A
 * block left without references becomes free, or evictable (LRU tail) when cached. */
void tsr_kvblocks_release(tsr_kvblocks *m, const int32_t *blocks, int32_t n);

/* The longest cached chain for tokens[0 .. 16 * max_blocks): walks block by block from
 * position 0, each hit verified by its token ids and its parent entry. Takes a reference
 * on every block found (they are no longer evictable), writes their ids to out_blocks and
 * sets *chain to the last one (chain->n_blocks = the count, also returned). The caller
 * bounds max_blocks to its full blocks; when the block of a token it must compute is among
 * those found, it calls tsr_kvblocks_cow. With caching off: 0. */
int32_t tsr_kvblocks_match(tsr_kvblocks *m, const int32_t *tokens, int32_t max_blocks,
                           int32_t *out_blocks, tsr_kvblocks_chain *chain);

/* Copy-on-write of the last block a match found, for a sequence that must write into it:
 * its tokens end on a block boundary and every block is cached, but the last token must
 * run again to give logits, and running it writes its K/V row in that (shared) block.
 * chain: as tsr_kvblocks_match left it (chain->n_blocks >= 1); blocks: the matched ids.
 * Takes a fresh private block (free first, else evicting; the shared one is referenced so
 * it is not a candidate) and puts it in blocks[n - 1]; *src = the shared block, whose
 * reference now belongs to the caller's copy: it copies src's K/V into *dst on every rank
 * (tsr_replica_kv_copy / tsr_ctx_kv_copy) before anything reads dst, then releases src.
 * The chain steps back to the parent of the last block (the copy is private; committing it
 * after it is computed finds the shared entry and continues the chain there). Returns 1
 * then. Returns 0 when no block is available (or caching is off): the shared last block
 * is released and the chain stepped back the same way, so the caller recomputes that block
 * as before copy-on-write existed (*src = *dst = -1). */
int tsr_kvblocks_cow(tsr_kvblocks *m, tsr_kvblocks_chain *chain, int32_t *blocks, int32_t *src,
                     int32_t *dst);

/* Count one lookup that reused n_blocks blocks (the engine counts when a request is
 * admitted, not when an admission is retried for want of blocks). */
void tsr_kvblocks_count_lookup(tsr_kvblocks *m, int32_t n_blocks);

/* The caller's block `block` (referenced by it) now holds the final K/V of tokens
 * [16 * chain->n_blocks, +16) on top of the chain: cache it under the chain, or, when an
 * entry with the same tokens and parent is cached already (another sequence computed it
 * too), leave `block` private and continue the chain on that entry. Advances *chain by one
 * block. Returns true when `block` itself was cached. With caching off: false (the chain
 * still advances). The block must not be written again while it stays cached: the caller
 * commits only full blocks below its computed length whose tokens are final. */
bool tsr_kvblocks_commit(tsr_kvblocks *m, tsr_kvblocks_chain *chain, int32_t block,
                         const int32_t *tokens);

/* As tsr_kvblocks_match / tsr_kvblocks_commit, with a tag per block (tags[i] for block i of
 * the lookup; tags NULL: all 0) that is part of the entry: a lookup finds only entries
 * committed with the same tag. The engine tags a block with how the numerics computed it
 * (the order classes of its positions, worker/model.h tsr_order_class), so a block computed
 * as generated tokens is never handed to a prompt that a cold run computes as prompt
 * tokens. Tag 0 is the untagged functions' entry. */
int32_t tsr_kvblocks_match_tagged(tsr_kvblocks *m, const int32_t *tokens, const uint8_t *tags,
                                  int32_t max_blocks, int32_t *out_blocks,
                                  tsr_kvblocks_chain *chain);
bool tsr_kvblocks_commit_tagged(tsr_kvblocks *m, tsr_kvblocks_chain *chain, int32_t block,
                                const int32_t *tokens, uint8_t tag);

/* References held on a block (tests, leak checks). */
int32_t tsr_kvblocks_refcount(const tsr_kvblocks *m, int32_t block);
/* Whether a block holds a cache entry. */
bool tsr_kvblocks_is_cached(const tsr_kvblocks *m, int32_t block);

void tsr_kvblocks_get_stats(const tsr_kvblocks *m, tsr_kvblocks_stats *st);

/* The chain key of a block of 16 tokens on top of parent_key (exposed for tests). */
uint64_t tsr_kvblocks_hash(uint64_t parent_key, const int32_t *tokens);

/* Tests: replace the chain hash (before any commit), e.g. by a constant one, to show that
 * hits are verified by tokens and parents, not by the key. NULL restores the default. */
typedef uint64_t (*tsr_kvblocks_hash_fn)(uint64_t parent_key, const int32_t *tokens);
void tsr_kvblocks_set_hash(tsr_kvblocks *m, tsr_kvblocks_hash_fn fn);

#endif
