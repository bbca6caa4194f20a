/*
 * q41_avx2.h — Q4_1 matrices laid out for AVX2 CPUs without AVX-512 VNNI: 8 rows in the
 * lanes of a ymm, so that one token's block costs no horizontal work and its unpacking serves
 * 8 rows at once. The layout the load gives every Q4_1 matrix of a CPU rank there, and its
 * kernels, in Q4_1's one order (ggml's x86 vec_dot_q4_1_q8_1), bit for bit.
 *
 * Why: Q4_1 is SmolLM2-135M's type (210 of its 211 matrices). Its matrices are not repacked
 * (kernels/repack.h: ggml runs Q4_1 unrepacked on x86, and its order is what the references
 * hold), so one token ran kernels/dot_ggml.c's row dots, 4 rows at a time, each block a
 * nibble split across 128-bit lanes, a convert of its scale pair, a permute per row, and
 * the row's own min term: ~10-11 vector ops a row and block, compute-bound on a Zen 3 core
 * (tests/bench_quant, 576 columns: 8.6-10.9 GB/s a thread where Q8_0's rows read 14.7-18;
 * SmolLM2's decode read 45 % of its roofline). Here a row and block cost ~6 ops.
 *
 * The order, per (row, token): blocks b = 0 .. n/32 - 1 in order,
 *   summs  = fma(fp16(w.m), fp16(y.s), summs)
 *   acc[l] = fma(fp16(w.d) * fp16(y.d), (float)sum_{k<4} q[4l+k] * y[4l+k], acc[l])  (l < 8)
 * with q[e] the low nibble of qs[e] for e < 16, the high one of qs[e - 16] above; then
 * result = ggml's hsum of acc (tsr_ggml_hsum8) + summs. Activations are Q8_1 rows (fp16 d,
 * fp16 s, 32 quants: kernels/quant.h's activation quantizer), read as they are.
 *
 * Layout of n_out rows of n elements (nb = n / 32 blocks): ceil(n_out / 16) groups of
 * tsr_q41a_group_bytes(n) = 2 * nb * 160 bytes (16 rows x 20 bytes x nb: the file's size). A
 * group is two halves, rows 8h..8h+7 (h = 0, 1), one after the other, each nb blocks of 160
 * bytes (every vector 32-byte aligned when the group is). Block b of a half, rows r:
 *   uint8  qs[4][8][4]  at 32j + 4r + k: the file's qs[4j + k] (low nibble element 4j + k,
 *                       ggml lane j; high nibble element 16 + 4j + k, lane j + 4)
 *   uint16 d[8]         at 128 + 2r: the rows' fp16 scales
 *   uint16 m[8]         at 144 + 2r: the rows' fp16 mins
 * Rows past n_out in the last group are zero (computed, never stored).
 *
 * Pure and thread-safe. n is a multiple of 32.
 */
#ifndef TSR_Q41_AVX2_H
#define TSR_Q41_AVX2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TSR_Q41A_ROWS      16  /* rows per group; row splits of such a matrix are multiples */
#define TSR_Q41A_BLK_BYTES 160 /* one block of a half: 8 x 20 bytes */

/* Whether the load puts Q4_1 matrices in this layout: the CPU has AVX2 but not AVX-512 VNNI
 * (kernels/dot_ggml.h's level; with VNNI the row dots' vpdpbusd serve) and TSR_Q41_LANES is
 * not "0" (read once; "0" keeps the file layout's row dots, e.g. to compare). */
bool tsr_q41a_chosen(void);

size_t tsr_q41a_group_bytes(int64_t n);
size_t tsr_q41a_bytes(int64_t n, int64_t n_out);

/* Repack n_out Q4_1 rows of n elements (row r at src + r * src_stride bytes, ggml blocks of
 * 20 bytes) into dst (tsr_q41a_bytes(n, n_out) bytes, 32-byte aligned for best speed).
 * Returns 0, or -1 when n is not a positive multiple of 32. */
int tsr_q41a_repack(int64_t n, int64_t n_out, const void *src, size_t src_stride, void *dst);

/* y[t * y_stride + r] = dot(row r0 + r, token t) for r < n_rows, t < n_tok, over a matrix
 * `packed` in this layout (its first group); r0 is a multiple of TSR_Q41A_ROWS. x: n_tok Q8_1
 * rows x_stride bytes apart. Every y is bit-identical to tsr_vec_dot(TSR_TYPE_Q4_1, ...) of
 * that row and token. isa: kernels/dot_ggml.h's level (the caller checked the CPU has it):
 * TSR_GGML_AVX2 and up run the AVX2 kernels, TSR_GGML_SCALAR a scalar loop; the same bits. */
void tsr_q41a_dot(int isa, int64_t n, const void *packed, int64_t r0, int64_t n_rows, int32_t n_tok,
                  const void *x, size_t x_stride, float *y, size_t y_stride);

#endif /* TSR_Q41_AVX2_H */
