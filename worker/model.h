/*
 * model.h — a decoder-only transformer over a mapped GGUF, and its forward pass.
 *
 * The architectures are llama.cpp's, read from `general.architecture`, each with the
 * hyperparameter keys llama.cpp reads for it (`{arch}.block_count`, ...):
 *   llama  token embedding → n_layer × [RMSNorm → GQA attention with NORM RoPE (adjacent
 *          pairs) → residual → RMSNorm → SwiGLU MLP → residual] → RMSNorm → output head
 *          (tied to token_embd when output.weight is absent; SmolLM2). A
 *          `llama.attention.sliding_window` key (Mistral-style files) windows every layer.
 *   qwen2  llama + optional biases on Q/K/V, NEOX RoPE (pairs (i, i + n_rot/2)).
 *   qwen3  llama + per-head RMSNorm on Q and K before RoPE (attn_q_norm/attn_k_norm), NEOX.
 *   gemma3 embeddings × sqrt(n_embd); per-head Q/K RMSNorm; NEOX RoPE; Q × attention scale
 *          (1/sqrt(key_length)); post-attention and post-FFN RMSNorms before each residual
 *          add; GELU(tanh)-gated FFN; interleaved sliding-window attention (layer il is
 *          local iff il % 6 < 5, window `attention.sliding_window`, rope base 10000 and
 *          scale 1 there; global layers use rope.freq_base and rope scaling); optional
 *          final logit soft-capping. Norm weights are used as stored (the GGUF converter
 *          already added gemma's +1).
 * Weights stay in their file type and are read in place from the mapping; only the small
 * norm and bias vectors are copied to float.
 *
 * tsr_model: immutable after load, shareable by several contexts (threads).
 * tsr_ctx: one sequence's state: KV cache, scratch buffers and a thread pool.
 *
 * Ownership: tsr_model_load borrows the tsr_gguf, which must outlive the model.
 */
#ifndef TSR_MODEL_H
#define TSR_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/kvcache.h"
#include "kernels/ops.h"
#include "shard/gguf.h"
#include "worker/comm.h"

typedef enum {
    TSR_ARCH_LLAMA = 0,
    TSR_ARCH_QWEN2,
    TSR_ARCH_QWEN3,
    TSR_ARCH_GEMMA3,
} tsr_arch;

typedef struct {
    tsr_arch arch;
    int32_t n_vocab;
    int32_t n_embd;
    int32_t n_layer;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t head_dim; /* attention.key_length (= value_length), default n_embd / n_head */
    int32_t n_ff;
    int32_t n_rot;       /* rotary dims per head (<= head_dim) */
    int32_t n_ctx_train; /* llama.context_length */
    float rms_eps;
    float rope_freq_base;
    float rope_freq_scale; /* 1 / linear scaling factor */
    bool rope_llama3;      /* freq_factors derived from llama3 scaling keys or rope_freqs */
    bool rope_neox;        /* rotate pairs (i, i + n_rot/2) instead of (2i, 2i+1) */
    /* Sliding-window attention: a token at position p attends to positions > p - n_swa
     * (llama.cpp's LLAMA_SWA_TYPE_STANDARD) on the layers tsr_hparams_layer_swa names. */
    int32_t n_swa;             /* 0: no window */
    int32_t swa_pattern;       /* 0: every layer; p: layer il is windowed iff il % p < p - 1 */
    float rope_freq_base_swa;  /* rope of windowed layers (gemma3: 10000) */
    float rope_freq_scale_swa; /* (gemma3: 1, no scaling) */
    float attn_scale;          /* multiplies q·k: 1/sqrt(head_dim) (gemma3 27B: n_head/n_embd) */
    float embd_scale;          /* multiplies the token embedding (gemma3: sqrt(n_embd)) */
    float final_logit_softcap; /* logits = c * tanh(logits / c); 0: none */
    bool qk_norm;              /* per-head RMSNorm of Q and K (qwen3, gemma3) */
    bool post_norms;           /* RMSNorm of attention and FFN outputs (gemma3) */
    bool ffn_gelu;             /* GELU(tanh)-gated FFN instead of SwiGLU (gemma3) */
} tsr_hparams;

/* The architecture's name as in general.architecture ("llama", "qwen2", ...). */
const char *tsr_arch_name(tsr_arch a);

/* Whether layer il uses the sliding window (and the windowed layers' rope). */
bool tsr_hparams_layer_swa(const tsr_hparams *hp, int32_t il);

/* The part of the model one rank holds (shard/plan.h computes it). Ranges are half-open.
 * Query heads [head_begin, head_end) must map into KV heads [kv_head_begin, kv_head_end). */
typedef struct {
    int32_t layer_begin, layer_end;
    int32_t head_begin, head_end;
    int32_t kv_head_begin, kv_head_end;
    int32_t ff_begin, ff_end;
    int32_t vocab_begin, vocab_end; /* empty unless this rank computes (part of) the head */
} tsr_shard;

typedef struct {
    float *attn_norm;        /* [n_embd] */
    float *bq, *bk, *bv;     /* this rank's rows of the Q/K/V biases, or NULL (qwen2) */
    float *bo;               /* [n_embd] attention output bias (added after the all-reduce) */
    float *q_norm, *k_norm;  /* [head_dim] per-head RMSNorm weights, or NULL */
    float *post_attn_norm;   /* [n_embd] or NULL (gemma3) */
    float *post_ffn_norm;    /* [n_embd] or NULL (gemma3) */
    tsr_weight wq;           /* [n_embd] -> [n_head * head_dim] */
    tsr_weight wk, wv;       /* [n_embd] -> [n_head_kv * head_dim] */
    tsr_weight wo;           /* [n_head * head_dim] -> [n_embd] */
    float *ffn_norm;         /* [n_embd] */
    tsr_weight w_gate, w_up; /* [n_embd] -> [n_ff] */
    tsr_weight w_down;       /* [n_ff] -> [n_embd] */
} tsr_layer;

typedef struct {
    tsr_hparams hp;
    tsr_shard shard;
    bool first_stage;      /* holds the embedding (layer_begin == 0) */
    bool last_stage;       /* holds the output head (layer_end == n_layer) */
    int32_t n_layer_local; /* layer_end - layer_begin */
    tsr_weight tok_embd;   /* [n_embd] x n_vocab rows */
    float *output_norm;    /* [n_embd] */
    tsr_weight output;     /* [n_embd] -> [n_vocab]; == tok_embd when tied */
    bool tied;
    float *freq_factors;      /* [n_rot/2] or NULL */
    tsr_layer *layers;        /* [n_layer_local]: layer layer_begin + i */
    uint64_t n_bytes_weights; /* bytes of tensor data the forward pass reads per token */
    uint64_t n_bytes_loaded;  /* bytes of the file this rank's views and copies cover */
    void **owned;             /* private copies of column slices (tensor parallelism) and
                                 repacked weights */
    int32_t n_owned;
    uint64_t n_bytes_repacked; /* anonymous memory of repacked weights (tsr_model_repack) */
    uint64_t t_repack_ns;      /* load time spent repacking */
    int32_t n_repacked;        /* matrices repacked */
    int32_t n_q80_lanes;       /* of them, Q8_0 matrices in the lanes order (q80_lanes.h) */
    int32_t n_q40_lanes;       /* of them, Q4_0 matrices in the lanes layout (q40_lanes.h) */
    int32_t n_q4k_lanes;       /* of them, Q4_K matrices in the lanes layout (q4k_lanes.h) */
    int32_t n_q6k_lanes;       /* of them, Q6_K matrices in the lanes layout (q6k_lanes.h) */
    int32_t n_q50_lanes;       /* of them, Q5_0 matrices in the lanes layout (q50_lanes.h) */
    int32_t n_q41_lanes;       /* of them, Q4_1 matrices in the AVX2 layout (q41_avx2.h) */
    int32_t n_q80g_lanes;      /* of them, Q8_0 in the lanes layout in ggml's order (q80_lanes.h) */
    const tsr_gguf *gguf;
} tsr_model;

/* Hyperparameters only (validated), without binding tensors: what the planner needs. */
int tsr_model_read_hparams(const tsr_gguf *g, tsr_hparams *hp, char *err, size_t err_len);

/* The whole model as one shard. */
void tsr_shard_full(const tsr_hparams *hp, tsr_shard *s);

/* Load the part of the model in `shard` (NULL: everything). Row slices (attn_q/k/v,
 * ffn_gate/up, output rows) are views into the mapping; column slices (attn_output,
 * ffn_down under tensor parallelism) are copied out of the file with pread, row piece by
 * row piece, so a rank never touches the bytes of another rank's tiles. A column split
 * must fall on block boundaries of the tensor's type (refused otherwise). */
int tsr_model_load_shard(const tsr_gguf *g, const tsr_shard *shard, tsr_model **out, char *err,
                         size_t err_len);

/* Repack this rank's matrices of the types tsr_repack_chosen picks (kernels/repack.h: every
 * quantized type by default) into its interleaved-row layout, in anonymous memory owned by
 * the model (w->packed; the matmul picks per token count, tsr_repack_use_file_layout, with
 * bit-identical results). Row slices are read with pread; w->data (a view of the mapping,
 * or a column slice's private copy) stays, but for Q8_0 views of the mapping: those are
 * copied verbatim into the same huge-page memory (owned by the model) and w->data points
 * at the copy. Other types keep their file layout only. Adds
 * to n_bytes_repacked / t_repack_ns /
 * n_repacked; repacked weights are skipped, so a second call does nothing. Returns < 0 with
 * err when memory runs out (the message suggests --no-repack). CPU backend only: a GPU rank
 * uploads the file's blocks (worker/gpu.h) and must not be repacked. */
int tsr_model_repack(tsr_model *m, char *err, size_t err_len);

/* 0 when the Q8_0 order chosen (kernels/q80_lanes.h, tsr_q80l_on) can run on a rank that
 * repacks (or not) on the CPU (or a GPU); -1 with err otherwise: the lanes order needs the
 * repacked layout of a CPU rank (a GPU rank, or --no-repack, would silently keep ggml's). */
int tsr_model_check_q80_order(bool repack, bool gpu, char *err, size_t err_len);

/* Whether tsr_model_load repacks (and the replica repacks its CPU ranks): true unless
 * tsr_model_set_repack_default(false) was called (`--no-repack`) or, before any such call,
 * the environment variable TSR_NO_REPACK is set (non-empty, not "0"). */
bool tsr_model_repack_default(void);
void tsr_model_set_repack_default(bool on);

/* Reads hyperparameters and binds every tensor (the whole model), validating shapes and
 * types, then repacks when tsr_model_repack_default(). Returns < 0 with a message naming the
 * key or tensor on error. */
int tsr_model_load(const tsr_gguf *g, tsr_model **out, char *err, size_t err_len);
void tsr_model_free(tsr_model *m);

typedef struct tsr_ctx tsr_ctx;

/* KV cache geometry: a pool of n_blocks blocks of block_size token positions each, per
 * layer of this rank, for its KV heads, stored as the context's tsr_kv_type (float32, fp16
 * or q8_0; kernels/kvcache.h says how each is stored and how attention reads it). A sequence owns a
 * list of blocks (its block table); position p of the sequence lives in block table[p / block_size]
 * at offset p % block_size. Who owns which block is the caller's business (the leader's scheduler);
 * the context only stores and reads. */
#define TSR_KV_BLOCK_SIZE 16

/* A context for one sequence of up to n_ctx tokens (0: the model's n_ctx_train, capped at
 * 4096; its block table is 0, 1, 2, ...), batches of up to n_batch tokens, n_threads
 * threads. */
int tsr_ctx_new(const tsr_model *m, int32_t n_ctx, int32_t n_batch, int n_threads, tsr_ctx **out,
                char *err, size_t err_len);

/* As tsr_ctx_new (which stores float32), with K and V stored as kv_type; the _paged_ form
 * makes a KV pool of n_kv_blocks blocks for many sequences (serving). Fails with a message
 * when the model's heads cannot be stored so (q8_0 needs head_dim % 32 == 0:
 * tsr_kv_type_fits). */
int tsr_ctx_new_kv(const tsr_model *m, int32_t n_ctx, int32_t n_batch, int n_threads,
                   tsr_kv_type kv_type, tsr_ctx **out, char *err, size_t err_len);
int tsr_ctx_new_paged_kv(const tsr_model *m, int32_t n_kv_blocks, int32_t n_batch, int n_threads,
                         tsr_kv_type kv_type, tsr_ctx **out, char *err, size_t err_len);
tsr_kv_type tsr_ctx_kv_type(const tsr_ctx *c);

/* Bytes of one KV block (K and V, TSR_KV_BLOCK_SIZE positions) over n_layer layers of
 * n_head_kv heads stored as t: what a --kv-memory budget is divided by. */
uint64_t tsr_kv_block_bytes(const tsr_hparams *hp, int32_t n_layer, int32_t n_head_kv,
                            tsr_kv_type t);
int32_t tsr_ctx_n_kv_blocks(const tsr_ctx *c);
int32_t tsr_ctx_n_batch(const tsr_ctx *c);

/* Tensor parallelism: the group whose partial sums are all-reduced after attn_output and
 * ffn_down (NULL or a size-1 group: none). Borrowed; must outlive the context. */
void tsr_ctx_set_tp_comm(tsr_ctx *c, tsr_comm *tp);

/* One step over several sequences. Token i belongs to sequence seq[i] (an index into
 * block_tables) at position pos[i]; all earlier positions of that sequence must already be
 * in the cache (or earlier in this batch). want_logits[i] marks the tokens whose logits
 * are returned, in batch order. */
typedef struct {
    int32_t n_tokens;
    const int32_t *tokens;      /* [n_tokens] */
    const int32_t *pos;         /* [n_tokens] */
    const int32_t *seq;         /* [n_tokens] */
    const uint8_t *want_logits; /* [n_tokens] */
    int32_t n_seqs;
    const int32_t *const *block_tables; /* [n_seqs][n_blocks[s]] */
    const int32_t *n_blocks;            /* [n_seqs] */
    /* [n_tokens] order class of each token, or NULL (all 0). 1: a prompt token that
     * llama.cpp multiplies with its repacked Q4_K GEMM: position p < 4 * floor(L / 4) of a
     * sequence whose prompt has L tokens (tsr_order_class). Q4_K matmuls then sum in
     * llama.cpp's GEMM order (kernels/q4k_gemm.h), others ignore it (Q4_0 sums every token
     * in the order of llama.cpp's Q4_0 GEMM and GEMV, which agree: kernels/q40_gemm.h);
     * 0: the GEMV order (the prompt's
     * tail, generated tokens, drafts). The class is part of the token's identity: its
     * results depend on it and never on the rest of the batch. */
    const uint8_t *order;
} tsr_batch;

/* The order class of position pos in a sequence whose prompt has n_prompt tokens (the
 * engine's rule, llama.cpp's as it runs a prompt in ubatches of 512 then one token per step:
 * the GEMM gets the first n - n % 4 tokens of every ubatch). */
static inline uint8_t tsr_order_class(int32_t pos, int32_t n_prompt)
{
    return pos < (n_prompt / 4) * 4 ? 1 : 0;
}

/* The compute backend seam. A context computes on the CPU (kernels/ops.h) unless a backend
 * is attached; then tsr_forward_batch validates the batch and hands it to the backend, which
 * keeps its own weights and KV pool (worker/gpu.h: CUDA). The engine, sampling and the
 * replica's communication around a step do not change. Members:
 *   forward_batch  required: tsr_forward_batch's contract on a validated batch;
 *   set_tp_comm    optional (NULL: the backend ignores tensor parallelism, valid for tp 1);
 *   free           optional: releases state when the context is freed;
 *   kv_copy        optional (NULL: tsr_ctx_kv_copy refuses): tsr_ctx_kv_copy on validated
 *                  block ids. */
typedef struct {
    const char *name; /* "cuda" */
    int (*forward_batch)(void *state, const tsr_batch *b, float *hidden, float *logits, char *err,
                         size_t err_len);
    void (*set_tp_comm)(void *state, tsr_comm *tp);
    void (*free)(void *state);
    int (*kv_copy)(void *state, const int32_t *src, const int32_t *dst, int32_t n, char *err,
                   size_t err_len);
} tsr_backend;

/* Attach a backend (the context owns state from now on; it passes on the tp communicator
 * set before or after). The context's host KV pool is released: the backend holds its own. */
void tsr_ctx_set_backend(tsr_ctx *c, const tsr_backend *be, void *state);
/* The attached backend's name, "cpu" without one. */
const char *tsr_ctx_backend_name(const tsr_ctx *c);
/* The attached backend and its state (NULL, NULL without one). */
const tsr_backend *tsr_ctx_backend(const tsr_ctx *c);
void *tsr_ctx_backend_state(const tsr_ctx *c);

/* Run one batch (n_tokens <= n_batch) through this rank's part of the model.
 * hidden: [n_tokens][n_embd]; on the first stage it is filled from the embedding,
 * otherwise it must hold the previous stage's output; on return it holds this stage's
 * output, except on the last stage: there the last layer computes its post-attention part
 * (norms, FFN) only for the tokens that want logits, as llama.cpp does (inp_out_ids), and
 * hidden holds their rows only, first n_want rows in batch order; every token runs that
 * part in the GEMV order (class 0), as llama.cpp's single output row does. On the last stage,
 * logits receives [n_want][vocab_end - vocab_begin] rows (this rank's vocabulary slice) for the
 * marked tokens; pass NULL elsewhere. Returns 0 or < 0 with err (bad ids/positions/blocks,
 * communication failure). */
int tsr_forward_batch(tsr_ctx *c, const tsr_batch *b, float *hidden, float *logits, char *err,
                      size_t err_len);

/* Copy-on-write of KV blocks (coordinator/kvblocks.h tsr_kvblocks_cow): block dst[i] of
 * the pool gets the K and V of block src[i], all TSR_KV_BLOCK_SIZE positions, on every
 * layer and head this rank holds, byte for byte (so attention over the copy gives exactly
 * what it gives over the original). Copies run in order; a dst must not be a src of a later
 * pair. Returns 0, or < 0 with err (a block id outside the pool, a backend without
 * kv_copy). */
int tsr_ctx_kv_copy(tsr_ctx *c, const int32_t *src, const int32_t *dst, int32_t n, char *err,
                    size_t err_len);

/* Scratch for hidden states, [n_batch][n_embd], owned by the context. */
float *tsr_ctx_hidden(tsr_ctx *c);

void tsr_ctx_free(tsr_ctx *c);

/* Order classes for tsr_forward: positions below 4 * floor(n_prompt / 4) run as prompt
 * tokens (tsr_order_class). 0 (the default) runs every token in the GEMV order. Set it to the
 * prompt's length before feeding the prompt to get llama.cpp's results. */
void tsr_ctx_set_prompt_len(tsr_ctx *c, int32_t n_prompt);

/* Single sequence, single process (whole model): run n tokens at positions
 * pos0 .. pos0+n-1 (earlier positions must already be in the KV cache). n may exceed n_batch: it is
 * processed in chunks. On success returns 0 and *logits points at the logits (owned by the context,
 * valid until the next call): the last token's [n_vocab], or, when all_logits, [n][n_vocab] (n <=
 * n_batch then). */
int tsr_forward(tsr_ctx *c, const int32_t *tokens, int32_t n, int32_t pos0, bool all_logits,
                const float **logits, char *err, size_t err_len);

#endif
