/*
 * ops.h — the CPU compute backend: the operations of a llama forward pass on float32
 * activations, with matmuls over weights of any supported type (kernels/quant.h).
 *
 * Shapes follow ggml: a weight of ne = [n_in, n_out] is n_out rows of n_in values;
 * activations are row-major [n_tokens][width]. All functions take caller-owned buffers;
 * nothing here allocates except tsr_matmul_scratch_bytes-sized scratch given by callers.
 */
#ifndef TSR_OPS_H
#define TSR_OPS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/pool.h"

/* A 2-D weight view into a mapped file: n_out rows of n_in elements of `type`. */
typedef struct {
    uint32_t type;
    int64_t n_in;  /* ne[0] */
    int64_t n_out; /* ne[1] */
    size_t row_bytes;
    const void *data;   /* the file's block layout (NULL for a column slice once repacked) */
    const void *packed; /* kernels/repack.h layout of the same rows, or NULL: the matmul then
                           reads it instead of data (bit-identical results) */
    const void *lanes;  /* a lanes layout of the same rows (16 a group), or NULL; when set,
                           the matmul computes every token count from it. Q8_0:
                           kernels/q80_lanes.h, in the lanes order (--q8-order lanes,
                           tsr_q80l_on) or, lanes_ggml set, in ggml's (AVX-512 VNNI,
                           tsr_q80l_ggml_chosen: the same bits as data). Q4_0, Q4_K, Q6_K,
                           Q5_0: kernels/q40_lanes.h, q4k_lanes.h, q6k_lanes.h, q50_lanes.h
                           (AVX-512 VNNI) or q50_avx2.h (lanes_avx2), in the type's orders
                           (the same bits as data or packed). Other types: NULL */
    bool lanes_ggml;    /* Q8_0 lanes: ggml's order (tsr_q80l_dot_ggml), not the lanes order */
    bool lanes_avx2;    /* Q5_0 lanes: kernels/q50_avx2.h's layout (AVX2 CPUs), not
                           q50_lanes.h's */
} tsr_weight;

/* y[t][r] = sum_i W[r][i] * x[t][i] for t < n_tok, r < W.n_out. `scratch` must hold
 * tsr_matmul_scratch_bytes(W, n_tok) bytes (activations converted to the dot type, and for
 * Q8_0 the tiles' layout of them, kernels/dot_ggml.h's prep, made once per call).
 * Rows are spread over the pool's threads; the result does not depend on the thread
 * count (each output element is computed by one dot product). */
size_t tsr_matmul_scratch_bytes(const tsr_weight *w, int n_tok);
void tsr_matmul(tsr_pool *pool, const tsr_weight *w, const float *x, int n_tok, float *y,
                void *scratch);

/* Several weights with the same input in one pool run (Q/K/V; gate/up): y[k] = W[k] x, up
 * to 4, of any types (weights whose dot types agree share one activation conversion).
 * `scratch` must hold tsr_matmul_multi_scratch_bytes(w, n_w, n_tok) bytes. */
size_t tsr_matmul_multi_scratch_bytes(const tsr_weight *const *w, int n_w, int n_tok);
void tsr_matmul_multi(tsr_pool *pool, const tsr_weight *const *w, float *const *y, int n_w,
                      const float *x, int n_tok, void *scratch);

/* tsr_matmul_multi with an order class per token (ord[t], NULL: all 0). Class 1 computes
 * Q4_K weights in llama.cpp's prompt (GEMM) order (kernels/q4k_gemm.h) instead of the row
 * dots' order; other types ignore it (Q4_0 has one order, kernels/q40_gemm.h). A token's
 * result depends on its class, never on
 * the other tokens of the call. */
void tsr_matmul_multi_ord(tsr_pool *pool, const tsr_weight *const *w, float *const *y, int n_w,
                          const float *x, int n_tok, const uint8_t *ord, void *scratch);

/* out[i] = x[i] / sqrt(mean(x^2) + eps) * weight[i], for n_tok rows of n values. */
void tsr_rmsnorm(float *out, const float *x, const float *weight, int n_tok, int n, float eps);

/* Rotary embedding, "NORM" mode (llama): rotates adjacent pairs (2i, 2i+1) of the first
 * n_rot values of each head by pos * theta_i, theta_i = freq_scale * base^(-2i/n_rot) /
 * freq_factors[i] (freq_factors may be NULL). x is [n_tok][n_head][head_dim]. */
void tsr_rope(float *x, const int32_t *pos, int n_tok, int n_head, int head_dim, int n_rot,
              float freq_base, float freq_scale, const float *freq_factors);

/* Rotary embedding as ggml computes it (ggml_rope_cache_init): theta_0 = pos, theta_{i+1} =
 * theta_i * base^(-2/n_rot) (a running product, in float), divided by freq_factors[i] when
 * given, times freq_scale. neox: rotates the pairs (i, i + n_rot/2) (GPT-NeoX; llama.cpp's
 * LLAMA_ROPE_TYPE_NEOX, used by qwen2, qwen3, gemma3); otherwise adjacent pairs (2i, 2i+1).
 * x is [n_tok][n_head][head_dim]; values past n_rot in each head are left alone. */
void tsr_rope_ext(float *x, const int32_t *pos, int n_tok, int n_head, int head_dim, int n_rot,
                  float freq_base, float freq_scale, const float *freq_factors, int neox);

/* x[i] = silu(gate[i]) * up[i] (SwiGLU), in place in gate, in ggml's order for one row of n
 * (kernels/dot_ggml.h tsr_ggml_swiglu: its AVX-512 vector expf on whole 16s, libm expf on the
 * rest), so call it per row. */
void tsr_swiglu(float *gate, const float *up, int64_t n);

/* gate[i] = gelu_tanh(gate[i]) * up[i] (GEGLU, gemma), as ggml's CPU backend computes it:
 * the GELU of the input rounded to fp16, rounded to fp16 again (its 64K-entry table), with
 * gelu(x) = 0 for x <= -10 and x for x >= 10. In place in gate. */
void tsr_geglu(float *gate, const float *up, int64_t n);

/* In-place softmax of n values. */
void tsr_softmax(float *x, int n);

#endif
