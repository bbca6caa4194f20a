/*
 * q6k_lanes.h — Q6_K matrices with 16 rows in the lanes of one AVX-512 register, for CPUs
 * with AVX-512 VNNI: the layout the load gives every Q6_K matrix of a CPU rank there, and
 * its kernel, in Q6_K's one order, bit for bit.
 *
 * Why: Q6_K has one order for every token (kernels/quant.c's Q6_K row dot, ggml's
 * vec_dot_q6_K_q8_K): per super-block 8 exact int32 lanes a row, lane m holding elements
 * 32c + 4m .. 32c + 4m + 3 of every 32-element chunk c, each 4 scaled by its 16-element
 * sub-block's scale, less 32 * (s[2m] * bsum[2m] + s[2m + 1] * bsum[2m + 1]); then one FMA
 * per lane and super-block into 8 float chains, added at the end as ggml's hsum of 8. The
 * groups (kernels/repack.h, k6_z512) run that order two rows a register with vpmaddubsw and
 * unpack each row's 6-bit quants on their own; here the 4 elements of lane m of chunk c are
 * one vpdpbusd for 16 rows at once (one int32 lane per row), scaled by one vpdpwssd with the
 * rows' scales, and the quants of 16 rows unpack in one pass per tile.
 *
 * Layout of n_out rows of n elements (nsb = n / 256): ceil(n_out / 16) groups of
 * tsr_q6kl_group_bytes = nsb * 3392 bytes (a 16-row slice of the file's bytes, rearranged,
 * and 32 bytes of padding a super-block so that its vectors stay 64-byte aligned); group g,
 * super-block i (3392 bytes):
 *   uint16 d[16]            the rows' fp16 scales (then 32 bytes of zeros)
 *   int8   sc[8][16][2]     sc[m][r] = the row's scales 2m, 2m + 1
 *   uint8  q[8][2][3][16][4] q[m][H][k][r][b], H the super-block's half (128 elements):
 *                           k = 0: ql[64H + 4m + b], k = 1: ql[64H + 32 + 4m + b],
 *                           k = 2: qh[32H + 4m + b] of row r (the file's bytes)
 * Rows past n_out in the last group are zero (computed, never stored).
 *
 * Activations: the Q8_K rows of the matmul's conversion (kernels/quant.h), read as they are.
 *
 * Pure and thread-safe. n is a multiple of 256.
 */
#ifndef TSR_Q6K_LANES_H
#define TSR_Q6K_LANES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TSR_Q6KL_ROWS     16   /* rows per group; row splits of a lanes matrix are multiples */
#define TSR_Q6KL_SB_BYTES 3392 /* a group's super-block: 16 x 210 bytes and 32 of padding */

/* Whether the load puts Q6_K matrices in this layout: the CPU has AVX-512 VNNI
 * (kernels/dot_ggml.h's level) and TSR_Q6K_LANES is not "0" (read once; "0" keeps the
 * repacked groups, e.g. to compare). */
bool tsr_q6kl_chosen(void);

size_t tsr_q6kl_group_bytes(int64_t n);
size_t tsr_q6kl_bytes(int64_t n, int64_t n_out);

/* Repack n_out Q6_K rows of n elements (row r at src + r * src_stride bytes, ggml blocks of
 * 210 bytes) into dst (tsr_q6kl_bytes(n, n_out) bytes, 64-byte aligned for best speed).
 * Returns 0, or -1 when n is not a positive multiple of 256. */
int tsr_q6kl_repack(int64_t n, int64_t n_out, const void *src, size_t src_stride, void *dst);

/* y[t * y_stride + r] = dot(row r0 + r, token t) for r < n_rows, t < n_tok, over a lanes
 * matrix `packed` (its first group); r0 is a multiple of TSR_Q6KL_ROWS. x: n_tok Q8_K rows
 * x_stride bytes apart. Every y is bit-identical to tsr_vec_dot(TSR_TYPE_Q6_K, ...) of that
 * row and token. isa: kernels/dot_ggml.h's level (the caller checked the CPU has it):
 * TSR_GGML_VNNI runs the 512-bit kernel, others a scalar loop; the same bits. */
void tsr_q6kl_dot(int isa, int64_t n, const void *packed, int64_t r0, int64_t n_rows, int32_t n_tok,
                  const void *x, size_t x_stride, float *y, size_t y_stride);

#endif /* TSR_Q6K_LANES_H */
