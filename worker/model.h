/*
 * model.h — a llama-architecture model over a mapped GGUF, and its forward pass.
 *
 * The model is llama.cpp's `llama`: token embedding → n_layer × [RMSNorm → GQA attention
 * with NORM RoPE → residual → RMSNorm → SwiGLU MLP → residual] → RMSNorm → output head
 * (tied to token_embd when output.weight is absent). Weights stay in their file type and
 * are read in place from the mapping; only the small norm vectors are copied to float.
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

#include "kernels/ops.h"
#include "shard/gguf.h"

typedef struct {
    int32_t n_vocab;
    int32_t n_embd;
    int32_t n_layer;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t head_dim;    /* n_embd / n_head */
    int32_t n_ff;
    int32_t n_rot;       /* rotary dims per head (<= head_dim) */
    int32_t n_ctx_train; /* llama.context_length */
    float rms_eps;
    float rope_freq_base;
    float rope_freq_scale; /* 1 / linear scaling factor */
    bool rope_llama3;      /* freq_factors derived from llama3 scaling keys or rope_freqs */
} tsr_hparams;

typedef struct {
    float *attn_norm;        /* [n_embd] */
    tsr_weight wq;           /* [n_embd] -> [n_head * head_dim] */
    tsr_weight wk, wv;       /* [n_embd] -> [n_head_kv * head_dim] */
    tsr_weight wo;           /* [n_head * head_dim] -> [n_embd] */
    float *ffn_norm;         /* [n_embd] */
    tsr_weight w_gate, w_up; /* [n_embd] -> [n_ff] */
    tsr_weight w_down;       /* [n_ff] -> [n_embd] */
} tsr_layer;

typedef struct {
    tsr_hparams hp;
    tsr_weight tok_embd;   /* [n_embd] x n_vocab rows */
    float *output_norm;    /* [n_embd] */
    tsr_weight output;     /* [n_embd] -> [n_vocab]; == tok_embd when tied */
    bool tied;
    float *freq_factors;   /* [n_rot/2] or NULL */
    tsr_layer *layers;     /* [n_layer] */
    uint64_t n_bytes_weights; /* bytes of tensor data the forward pass reads */
    const tsr_gguf *gguf;
} tsr_model;

/* Reads hyperparameters and binds every tensor, validating shapes and types. Returns < 0
 * with a message naming the key or tensor on error. */
int tsr_model_load(const tsr_gguf *g, tsr_model **out, char *err, size_t err_len);
void tsr_model_free(tsr_model *m);

typedef struct tsr_ctx tsr_ctx;

/* A context for sequences of up to n_ctx tokens (0: the model's n_ctx_train, capped at
 * 4096), batches of up to n_batch tokens, using n_threads threads. */
int tsr_ctx_new(const tsr_model *m, int32_t n_ctx, int32_t n_batch, int n_threads,
                tsr_ctx **out, char *err, size_t err_len);
void tsr_ctx_free(tsr_ctx *c);
int32_t tsr_ctx_n_ctx(const tsr_ctx *c);

/* Run n tokens at positions pos0 .. pos0+n-1 (earlier positions must already be in the KV
 * cache). n may exceed n_batch: it is processed in chunks. On success returns 0 and
 * *logits points at the logits (owned by the context, valid until the next call): the last
 * token's [n_vocab], or, when all_logits, [n][n_vocab] (n <= n_batch then). */
int tsr_forward(tsr_ctx *c, const int32_t *tokens, int32_t n, int32_t pos0, bool all_logits,
                const float **logits, char *err, size_t err_len);

/* Time spent in the forward pass since creation, in nanoseconds (for benchmarks). */
uint64_t tsr_ctx_forward_ns(const tsr_ctx *c);

#endif
