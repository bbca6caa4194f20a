/*
 * kvcache.h — element types of the paged KV cache and the attention kernels that read them.
 *
 * Why: the KV cache is the part of memory that grows with context and concurrency; storing
 * K and V in fp16 halves it and q8_0 cuts it to 34/128 of float32, so a memory budget holds
 * 2× / ~3.76× the token positions, and decode at long context reads that much fewer bytes.
 *
 * Types (`--kv-type`):
 *   f32   float32. Head sizes that are a multiple of 16: q·k in the order of ggml's
 *         llamafile tinyBLAS<16> (the f16 path's order below, without its roundings: 16
 *         lanes, lane l an FMA chain over the elements l ≡ i mod 16, then the 16-lane tree),
 *         softmax, V accumulated per output value by FMA in position order. Other head sizes
 *         keep the original engine's loops (sequential dot products, o += p·v).
 *   f16   IEEE half. Numerics follow llama.cpp's CPU graph with F16 K/V and flash attention
 *         off (llama-cpp-python's default; real-models.json was made with it on, see
 *         docs/architecture.md "llama.cpp's numerics"): Q is rounded to fp16, each q·k is a float
 * dot product of fp16 values, softmax in float32, the probabilities are rounded to fp16 and
 *         multiplied with the fp16 V, accumulating in float. The summation order is that of
 *         ggml's llamafile tinyBLAS F16 kernel on AVX-512 (16 float lanes, each an FMA chain
 *         over the elements l ≡ lane mod 16, then _mm512_reduce_add_ps's tree: (i, i+8),
 *         (i, i+4), (i, i+2), (0, 1)); for the V product the "elements" are positions, so
 *         position p goes to lane p mod 16. A head size that is not a multiple of 16 makes
 *         ggml fall back to ggml_vec_dot_f16 for q·k (4 × 16 lanes over each 64, the rest
 *         in double), which the kernel reproduces too. Every ISA path (AVX-512, AVX2+F16C,
 *         scalar) computes exactly this order, so all three give bit-identical results.
 *   q8_0  ggml's Q8_0 blocks (32 values, one fp16 scale) along the head dimension, as
 *         llama.cpp's q8_0 K/V cache (which requires flash attention): Q is quantized to
 *         Q8_0 (tsr_quant_row) and dotted with K in integers, in the order of ggml's x86
 *         ggml_vec_dot_q8_0_q8_0 (8 float lanes, lane l the exact integer sum of values
 *         4l..4l+3 of a block, times d_k·d_q by FMA block after block, then hsum_float_8's
 *         tree), one kernel call for all positions of a head (vpdpbusd with AVX-512 VNNI);
 *         softmax in float32; V dequantized (d × q, exact in float) and accumulated in
 *         float with FMA in position order, 64 output values held in registers across
 *         positions. The head size must be a multiple of 32.
 *
 * Layout (owned by the caller, worker/model.c): per layer, a pool of slots (block b,
 * offset o -> slot b * block_size + o), each slot one row of tsr_kv_row_bytes(type,
 * kv_dim) bytes holding every local KV head of one position, head h at h * the bytes of
 * head_dim values.
 *
 * Every type computes one order on every ISA path, so all three give bit-identical results
 * (test_kvcache). Dispatch follows kernels/quant.h's instruction set (tsr_quant_isa /
 * tsr_quant_set_isa / TSR_ISA), so tests and benchmarks force AVX2 or scalar the same way.
 * Pure functions, thread-safe.
 */
#ifndef TSR_KVCACHE_H
#define TSR_KVCACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
    TSR_KV_F32 = 0,
    TSR_KV_F16 = 1,
    TSR_KV_Q8_0 = 2,
} tsr_kv_type;

#define TSR_KV_TYPE_COUNT 3

/* The type a CPU replica stores when none is asked for: f16, the fastest type that keeps
 * every greedy reference of ../shared/models/expected (README "KV cache types"). */
#define TSR_KV_DEFAULT TSR_KV_F16

/* "f32", "f16", "q8_0"; "?" for anything else. */
const char *tsr_kv_type_name(tsr_kv_type t);
/* Parse a name as above (exact, lower case). False for anything else. */
bool tsr_kv_type_parse(const char *s, tsr_kv_type *out);

/* Bytes of n values of type t: n*4, n*2, n/32*34 (0 when q8_0 and n % 32 != 0, or t is
 * unknown). */
size_t tsr_kv_row_bytes(tsr_kv_type t, int64_t n);

/* Whether heads of head_dim values can be stored as t (q8_0: head_dim % 32 == 0). On
 * false, err says why and what to use instead. */
bool tsr_kv_type_fits(tsr_kv_type t, int32_t head_dim, char *err, size_t err_len);

/* Convert n floats (one or more whole heads) into the cache's type at dst (q8_0: n % 32 ==
 * 0, blocks along the row). f16 rounds to nearest even (ggml's fp32_to_fp16). */
void tsr_kv_store(tsr_kv_type t, const float *src, void *dst, int64_t n);
/* The inverse: n values of type t at src as floats. */
void tsr_kv_load(tsr_kv_type t, const void *src, float *dst, int64_t n);

/* One layer's cache as an attention kernel reads it for one KV head. */
typedef struct {
    tsr_kv_type type;
    int32_t head_dim;
    int32_t block_size;         /* positions per block (TSR_KV_BLOCK_SIZE) */
    const uint8_t *k, *v;       /* slot 0 of the layer's K / V pool */
    size_t row_bytes;           /* bytes per slot (all local KV heads of one position) */
    size_t head_offset;         /* bytes from a slot's start to this head */
    const int32_t *block_table; /* position p lives in slot table[p / bs] * bs + p % bs */
} tsr_kv_view;

/* Per-thread scratch tsr_attn_head needs for heads of head_dim values (bytes, 64-aligned
 * size; pass memory aligned to 64). */
size_t tsr_attn_scratch_bytes(int32_t head_dim);

/* Attention of one query head over positions p0..p1 (inclusive) of one sequence:
 * out[head_dim] = sum_p softmax_p(scale * q·k_p) v_p, in the numerics of kv->type (see
 * above). q: [head_dim] floats; scores: p1 - p0 + 1 floats of caller scratch (left holding
 * the probabilities with f32 and q8_0, the scaled scores q·k with f16); scratch:
 * tsr_attn_scratch_bytes(head_dim) bytes. */
void tsr_attn_head(const tsr_kv_view *kv, const float *q, float scale, int32_t p0, int32_t p1,
                   float *scores, void *scratch, float *out);

/* Per-thread scratch tsr_attn_group needs for up to n_q query heads of head_dim values
 * (bytes, 64-aligned size, at least tsr_attn_scratch_bytes(head_dim); pass memory aligned
 * to 64). */
size_t tsr_attn_group_scratch_bytes(int32_t head_dim, int32_t n_q);

/* Attention of n_q query heads that read the same KV head (a GQA group, or part of one)
 * over positions p0..p1 of one sequence: out[h * head_dim ..] is, bit for bit, what
 * tsr_attn_head gives for q + h * head_dim (q, out: [n_q][head_dim] floats). Each K and V
 * row is read once for all n_q heads: with f16 (head sizes that are a multiple of 64, AVX2
 * or AVX-512) the heads' fp16 accumulator chains are interleaved, which is most of its speed
 * (one head's chain waits on a convert-FMA-convert latency at every position); with f32 and
 * q8_0 the positions are walked in chunks for all heads in turn, so a long context's rows
 * come from memory once per group instead of once per head. scores: n_q * (p1 - p0 + 1)
 * floats of caller scratch, left holding per head what tsr_attn_head leaves; scratch:
 * tsr_attn_group_scratch_bytes(head_dim, n_q) bytes. */
void tsr_attn_group(const tsr_kv_view *kv, int32_t n_q, const float *q, float scale, int32_t p0,
                    int32_t p1, float *scores, void *scratch, float *out);

/* Attention of n_kv KV heads that lie side by side in the row (kv->head_offset: the first;
 * KV head i is i * head_dim values further) with group query heads each, over positions
 * p0..p1 of one sequence: out[(i * group + g) * head_dim ..] is, bit for bit, what
 * tsr_attn_group gives for KV head i and q + (i * group + g) * head_dim (q, out: [n_kv *
 * group][head_dim] floats). With f16 (head sizes a multiple of 64, AVX2 or AVX-512) the
 * positions go in chunks for all heads at once, so one sequence's K and V rows are read
 * whole, chunk after chunk, instead of one head's slice of every row per call; with one
 * query head per KV head (MHA) and AVX-512 the V chains of up to 4 KV heads are interleaved
 * (one head's chain alone waits on a convert-FMA-convert latency at every position). Other
 * types: tsr_attn_group per KV head. scores: group * (p1 - p0 + 1) floats of caller
 * scratch, left holding what tsr_attn_group leaves for the last KV head; scratch:
 * tsr_attn_group_scratch_bytes(head_dim, n_kv * group) bytes. */
void tsr_attn_heads(const tsr_kv_view *kv, int32_t n_kv, int32_t group, const float *q,
                    float scale, int32_t p0, int32_t p1, float *scores, void *scratch, float *out);

/* The path tsr_attn_head takes now: "avx512", "avx2" or "scalar" (from tsr_quant_isa). */
const char *tsr_attn_isa(void);

#endif /* TSR_KVCACHE_H */
