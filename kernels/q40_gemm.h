/*
 * q40_gemm.h — every Q4_0 x Q8_0 dot of the engine, in the order of llama.cpp's repacked Q4_0
 * GEMM and GEMV (ggml_gemm_q4_0_8x8_q8_0 / ggml_gemv_q4_0_8x8_q8_0, x86 AVX2 / AVX-512:
 * gemm_q4_b32_8x8_q8_0_lut_avx / gemv_q4_b32_8x8_q8_0_lut_avx, the same order per output):
 * prompt and generated tokens alike (Q4_0 ignores the order class of worker/model.h).
 *
 * Why: on x86 with AVX2 llama.cpp repacks every Q4_0 matrix whose row count is a multiple of
 * 8 (block_q4_0x8) and multiplies a prompt's tokens with that GEMM, a generated token with
 * that GEMV. Both reduce each 32-element block of a (row, token) pair to one exact integer
 * and apply the float scales once per block, rows in the lanes of a vector: no horizontal
 * sums. Tessera's former Q4_0 row order (8-lane float chains, the -8 offset per 8 blocks)
 * cost a float FMA per 8 elements and was slower at prefill (1B Q4_0 pp128 0.87-0.91x
 * llama.cpp), and it was not llama.cpp's. With one order Q4_0 is exact against llama.cpp
 * for prompts and generation, and nothing depends on a token's class. kernels/quant.c
 * (tsr_vec_dot*, whose scalar reference is this order) and kernels/repack.c
 * (tsr_repack_dot) call this module for Q4_0.
 *
 * The order, per (row, token), blocks b = 0 .. n/32 - 1 in order:
 *   I   = sum_{l < 32} (q_l - 8) * y_l                        (exact int32: |I| <= 32512)
 *   acc = fma((float)I, fp16(w.d) * fp16(y.d), acc)            (acc starts at +0.0f)
 * result = acc. Q8_0 activations are tsr_quant_act_row's (ggml's x86 quantize_row_q8_0);
 * ggml's ggml_quantize_mat_q8_0_4x8 (AVX2) makes the same bytes (the same max |x|, d =
 * max / 127, id = 127 / max, round to nearest even).
 *
 * Every ISA path (scalar reference, AVX2, AVX-512 VNNI) computes exactly this, for any row
 * and token grouping and either weight layout, so results do not depend on the ISA, the
 * threads, the batch or repacking.
 *
 * One token runs a GEMV (16 rows a pass on AVX-512 VNNI, 8 on AVX2; rows in lanes, each
 * row's block reduced to its int32 before the one FMA), several tokens the GEMM tiles.
 *
 * Pure and thread-safe. n is a multiple of 32. Uses up to ~200 KiB of the caller's stack.
 */
#ifndef TSR_Q40_GEMM_H
#define TSR_Q40_GEMM_H

#include <stddef.h>
#include <stdint.h>

/* y[t * y_stride + r] = GEMM-order dot(row r, token t) for r < n_rows, t < n_tok, from the
 * file layout: row r at w + r * row_stride bytes (ggml blocks of 18 bytes: fp16 d, 16 bytes
 * of nibbles). x holds n_tok Q8_0 rows (34-byte blocks) x_stride bytes apart. isa:
 * TSR_GGML_SCALAR / _AVX2 / _VNNI (kernels/dot_ggml.h; the caller checked the CPU has it). */
void tsr_q40_gemm_dot(int isa, int64_t n, int64_t n_rows, const void *w, size_t row_stride,
                      int32_t n_tok, const void *x, size_t x_stride, float *y, size_t y_stride);

/* The same from a repacked matrix (kernels/repack.h: groups of TSR_REPACK_ROWS rows, the
 * rows' fp16 scales d[4][nbp] then block b's nibbles of the 4 rows side by side): row r lies
 * in the group at packed + (r / TSR_REPACK_ROWS) * tsr_repack_group_bytes(Q4_0, n), so
 * packed is the group that holds row 0 of the call. */
void tsr_q40_gemm_dot_repacked(int isa, int64_t n, int64_t n_rows, const void *packed,
                               int32_t n_tok, const void *x, size_t x_stride, float *y,
                               size_t y_stride);

#endif /* TSR_Q40_GEMM_H */
