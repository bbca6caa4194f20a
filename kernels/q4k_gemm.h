/*
 * q4k_gemm.h — Q4_K x Q8_K dots in the order of llama.cpp's repacked Q4_K GEMM
 * (ggml_gemm_q4_K_8x8_q8_K, x86 AVX2 / AVX-512), the "prompt order" of a token.
 *
 * Why: on x86 llama.cpp repacks every Q4_K matrix whose row count is a multiple of 8 and
 * multiplies a batch of n tokens with two kernels: the first n - n % 4 tokens with the GEMM
 * (4 tokens x 8 rows per tile), the remaining ones with the GEMV (kernels/quant.c's Q4_K
 * row dot is that GEMV's order). The two sum the same exact integers but apply the float
 * scale at different granularity, so the same token gives different last bits in the two
 * kernels, and a small model (Gemma 3 270M) turns that into a different greedy token. To
 * equal llama.cpp, a token that llama.cpp runs through the GEMM must be computed here.
 *
 * The GEMM order, per (row, token), super-block i in order, then sb = 0..3 (64 elements,
 * sub-blocks g = 2sb and 2sb+1, 32 elements each):
 *   I  = sc[2sb] * <q[2sb], y[2sb]> + sc[2sb+1] * <q[2sb+1], y[2sb+1]>     (exact int32)
 *   M  = mn[2sb] * sum(y[2sb]) + mn[2sb+1] * sum(y[2sb+1])                   (exact int32)
 *   acc  = fma((float)I, fp16(w.d)    * y.d, acc)
 *   accm = fma((float)M, fp16(w.dmin) * y.d, accm)
 * result = acc - accm. (The GEMV order does the same with one fma per super-block on the
 * sums over its four sb.) Q8_K activations are tsr_quant_row's (ggml's quantize_row_q8_K);
 * ggml's ggml_quantize_mat_q8_K_4x8 makes the same quants, or all of a block's quants and
 * its scale negated when its largest |x| occurs both positive and negative first as a
 * negative value, which leaves every product above, and so the result, bit-identical.
 *
 * Every ISA path (scalar reference, AVX2, AVX-512 VNNI) computes exactly this, for any row
 * and token grouping, so results do not depend on the ISA, threads or batch.
 *
 * Pure and thread-safe. n is a multiple of 256.
 */
#ifndef TSR_Q4K_GEMM_H
#define TSR_Q4K_GEMM_H

#include <stddef.h>
#include <stdint.h>

/* y[t * y_stride + r] = GEMM-order dot(row r, token t) for r < n_rows, t < n_tok.
 * Super-block i of row r lies at w + r * row_stride + i * blk_stride bytes: the file layout
 * is (row_bytes, 144), a repacked group (kernels/repack.h) (144, 4 * 144). x holds n_tok
 * Q8_K rows x_stride bytes apart. isa: TSR_GGML_SCALAR / _AVX2 / _VNNI (kernels/dot_ggml.h;
 * the caller checked the CPU has it). */
void tsr_q4k_gemm_dot(int isa, int64_t n, int64_t n_rows, const void *w, size_t row_stride,
                      size_t blk_stride, int32_t n_tok, const void *x, size_t x_stride, float *y,
                      size_t y_stride);

/* The same over rows in groups (a repacked matrix, kernels/repack.h): super-block i of row r
 * lies at w + (r / rows_per_group) * group_stride + (r % rows_per_group) * row_stride +
 * i * blk_stride bytes. tsr_q4k_gemm_dot is rows_per_group 1, group_stride row_stride; the
 * repacked groups are (TSR_REPACK_ROWS, tsr_repack_group_bytes, 144, TSR_REPACK_ROWS * 144),
 * so one call covers a whole row range (the AVX-512 tiles take 16 rows at a time). */
void tsr_q4k_gemm_dot_grouped(int isa, int64_t n, int64_t n_rows, const void *w,
                              int64_t rows_per_group, size_t group_stride, size_t row_stride,
                              size_t blk_stride, int32_t n_tok, const void *x, size_t x_stride,
                              float *y, size_t y_stride);

/* Which AVX2 kernel runs several tokens (the results are the same bits): 1 the default (the
 * 8-row lanes kernel from 5 tokens, the 2-row tile below that), 0 the 2-row tile always (also
 * the environment variable TSR_Q4K_Y256=0, read once), 2 the lanes kernel for every token
 * count (tests), -1 back to the environment's choice. */
void tsr_q4k_gemm_set_y256(int mode);

#endif /* TSR_Q4K_GEMM_H */
