/*
 * quant.h — tensor element types and their row kernels: dequantize, quantize, dot.
 *
 * Why: weights stay in their file type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K,
 * Q3_K, Q4_K, Q5_K, Q6_K) and the
 * matmul works on the quantized blocks directly, so a model costs its file size in
 * memory and decode reads the fewest bytes per token. Block layouts and rounding follow
 * ggml exactly (dequantized values are bit-identical to ggml's to_float).
 *
 * Dot products: for each weight type W, activations are first converted once per token
 * into tsr_type_vec_dot_type(W) (Q8_0 for Q8_0/Q4_0/Q5_0, Q8_1 for Q4_1/Q5_1, Q8_K for the
 * K-quants, F32 for F32/F16/BF16: ggml's choices), then tsr_vec_dot() multiplies one weight row
 * with that row. CPU feature dispatch (AVX2/FMA/F16C, AVX-512 VNNI where present) happens inside;
 * the scalar path is the reference and gives the same answers up to float summation order.
 *
 * All functions are thread-safe (pure). n is always a multiple of the type's block size.
 */
#ifndef TSR_QUANT_H
#define TSR_QUANT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ggml type ids (the numbers stored in GGUF tensor infos). */
typedef enum {
    TSR_TYPE_F32 = 0,
    TSR_TYPE_F16 = 1,
    TSR_TYPE_Q4_0 = 2,
    TSR_TYPE_Q4_1 = 3,
    TSR_TYPE_Q5_0 = 6,
    TSR_TYPE_Q5_1 = 7,
    TSR_TYPE_Q8_0 = 8,
    TSR_TYPE_Q8_1 = 9, /* activation type of the Q4_1 / Q5_1 dots; never a weight here */
    TSR_TYPE_Q2_K = 10,
    TSR_TYPE_Q3_K = 11,
    TSR_TYPE_Q4_K = 12,
    TSR_TYPE_Q5_K = 13,
    TSR_TYPE_Q6_K = 14,
    TSR_TYPE_Q8_K = 15, /* activation type of the K-quant dots; never a weight here */
    TSR_TYPE_BF16 = 30,
    TSR_TYPE_COUNT = 42, /* ids >= this are unknown to ggml as of this writing */
} tsr_type;

#define TSR_QK8_0 32
#define TSR_QK4_0 32
#define TSR_QK_K  256

/* True for the types this engine can load as weights (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
 * Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K). Any other id (a valid ggml type we do not
 * implement, or garbage) is false. */
bool tsr_type_supported(uint32_t type);
/* Comma-separated names of the supported weight types, for error messages. */
const char *tsr_type_supported_list(void);
/* ggml's name ("Q4_K"; also for ggml types we do not implement, e.g. "IQ2_XXS"), "unknown"
 * for ids ggml does not define (removed ids, >= TSR_TYPE_COUNT). Never NULL. */
const char *tsr_type_name(uint32_t type);
/* ggml's block geometry of ANY type ggml defines (IQ*, TQ*, MXFP4, I8..., also those this
 * engine cannot compute with): true and elements / bytes per block, or false for ids
 * ggml does not define. For reading the layout of any GGUF file (`inspect`). */
bool tsr_type_ggml_block(uint32_t type, int64_t *block_elems, size_t *block_bytes);
/* Elements per block (1 for float types) and bytes per block; 0 for unsupported ids.
 * Q8_1 and Q8_K (activation types) are not weights but have their sizes here too. */
int64_t tsr_type_block_elems(uint32_t type);
size_t tsr_type_block_bytes(uint32_t type);
/* Bytes of a row of n elements; 0 when n is not a multiple of the block size or the
 * type is unsupported (Q8_K has sizes, see above). */
size_t tsr_row_bytes(uint32_t type, int64_t n);

/* A Q4_K / Q5_K block's 12 packed scale bytes unpacked as ggml does: the 8 six-bit scales
 * (out[0..7]) and 8 mins (out[8..15]). The scalar form of every Q4_K kernel's unpack. */
void tsr_q4_K_scales_mins(const uint8_t *packed, uint8_t out[16]);

/* fp16 / bf16 scalar conversions (IEEE round to nearest even, as ggml). */
float tsr_f16_to_f32(uint16_t h);
uint16_t tsr_f32_to_f16(float f);
float tsr_bf16_to_f32(uint16_t h);
uint16_t tsr_f32_to_bf16(float f);

/* Dequantize n elements (one or more whole rows) of `type` at src into dst. Supported
 * for every weight type and for Q8_1 / Q8_K. */
void tsr_dequant_row(uint32_t type, const void *src, float *dst, int64_t n);

/* Quantize n floats into `type` (every weight type, plus Q8_1 / Q8_K). Rounding matches ggml's
 * reference quantizers (quantize_row_*_ref), so quantize(dequant(q)) round-trips. */
void tsr_quant_row(uint32_t type, const float *src, void *dst, int64_t n);

/* Convert n floats of an activation row into the dot type `type` as ggml's CPU backend
 * does before a matmul (its x86 from_float): for Q8_0 / Q8_1 that is not the reference
 * quantizer above (scale 127/amax, quants rounded half to even; kernels/dot_ggml.h), for
 * other types tsr_quant_row. Every matmul uses it; the same bytes on every ISA. */
void tsr_quant_act_row(uint32_t type, const float *src, void *dst, int64_t n);

/* Activation type for dots with weights of `type`; TSR_TYPE_COUNT for unsupported ids. */
uint32_t tsr_type_vec_dot_type(uint32_t type);

/* sum_i w[i]*x[i] over n elements: w is a row of `type`, x a row of
 * tsr_type_vec_dot_type(type). Rows must be aligned to their block's field alignment
 * (2 bytes; 4 for F32 and Q8_K), which GGUF data (aligned to >= 8) always is. Q4_1 / Q5_1
 * use Q8_1's stored s = fp16(d * sum(q)) for the min term, as ggml does. NaN for an
 * unsupported type. */
float tsr_vec_dot(uint32_t type, int64_t n, const void *w, const void *x);

/* Several rows at once: y[r] = dot(w + r*w_stride_bytes, x) for r < n_rows (the decode
 * hot loop). Per-call work on x is shared by all rows; rows are streamed one after the
 * other. y[r] is bit-identical to tsr_vec_dot of that row, so results never depend on how
 * a matmul splits its rows (threads, shards). Uses up to ~16 KiB of stack (heap beyond
 * 65536-element rows). */
void tsr_vec_dot_rows(uint32_t type, int64_t n, int64_t n_rows, const void *w,
                      size_t w_stride_bytes, const void *x, float *y);

/* The same rows of Q4_K / Q6_K weights repacked in groups of 4 rows (kernels/repack.h's
 * K-quant layout: group g, gb bytes after group g - 1, holds super-block i of its rows 0..3
 * side by side; a short last group repeats its last row): y[r] = dot(row r, x) for r <
 * n_rows, bit-identical to tsr_vec_dot of that row. Returns false (nothing written) for
 * other types and where only the scalar reference runs; the caller then uses its own loop.
 * Software prefetch of the stream: off on AMD CPUs with AVX-512 (their hardware prefetchers
 * serve it better), on elsewhere (Q6_K into L1 a short way ahead on AMD CPUs, into L2 far
 * ahead on the others; quant.c's rq_kgemv_prefetch has the figures); the environment
 * variable TSR_KGEMV_PREFETCH=0 / 1 overrides (read once). The output is the same either
 * way. */
bool tsr_vec_dot_kgroups(uint32_t type, int64_t n, int64_t n_rows, const void *groups, size_t gb,
                         const void *x, float *y);

/* A tile of rows x tokens (the prefill matmul): y[t*y_stride + r] = dot(w + r*w_stride, x +
 * t*x_stride) for r < n_rows, t < n_tok (strides in bytes for w and x, in floats for y).
 * Each weight block is loaded and unpacked once for several tokens and each activation
 * block once for several rows (register-blocked Q8_0 / Q4_0 / Q4_1 kernels; other types and
 * the scalar path loop over tsr_vec_dot_rows). Every y element is bit-identical to tsr_vec_dot of
 * its row and token (for activations made by tsr_quant_row), so answers never depend on how a
 * matmul groups rows and tokens. Allocates a heap workspace per call (8 bytes per activation block
 * for up to 640 KiB of activations at a time, plus parked accumulators when n > 2048: under 400
 * KiB) and degrades to the row kernels if that fails. */
void tsr_vec_dot_tile(uint32_t type, int64_t n, int64_t n_rows, const void *w, size_t w_stride,
                      int32_t n_tok, const void *x, size_t x_stride, float *y, size_t y_stride);

/* Name of the instruction set the dots dispatched to ("avx512vnni", "avx2", "scalar").
 * Chosen once from the CPU; the environment variable TSR_ISA (same names) caps it, e.g.
 * TSR_ISA=scalar forces the reference path. */
const char *tsr_quant_isa(void);

/* Switch the dots to instruction set `isa` ("scalar", "avx2", "avx512vnni"; NULL or
 * "auto" = the best this CPU has, ignoring TSR_ISA). Returns false and changes nothing
 * when the name is unknown or the CPU lacks it. For tests and benchmarks that compare
 * paths; threads running dots meanwhile see one path or the other (both correct). */
bool tsr_quant_set_isa(const char *isa);

/* Turn the Q4_K / Q6_K group GEMVs' software prefetch (tsr_vec_dot_kgroups) on (1) or off
 * (0), or back to the CPU's default (-1, ignoring TSR_KGEMV_PREFETCH). For tests and
 * benchmarks that compare the two; outputs are the same. */
void tsr_quant_set_kgemv_prefetch(int on);

/* One Q8_0 token through tsr_vec_dot_rows takes kernels/q80_gemv.h's GEMV, except on AMD
 * CPUs, where kernels/dot_ggml.c's row dots stream faster (quant.c says what was measured).
 * The environment variable TSR_Q80_ROW_DOTS=1 / 0 overrides (read once): 1 the row dots on
 * any CPU, 0 the GEMV everywhere. This sets the same choice: on (1), off (0), or the CPU's
 * default (-1, ignoring the variable). For tests and benchmarks; the same bits either way. */
void tsr_quant_set_q80_row_dots(int on);

#endif /* TSR_QUANT_H */
