/*
 * q50_lanes.h — Q5_0 matrices with 16 rows in the lanes of one AVX-512 register, for CPUs
 * with AVX-512 VNNI: the layout the load gives every Q5_0 matrix of a CPU rank there, and
 * its kernel, in Q5_0's one order (ggml's), bit for bit.
 *
 * Why: Q5_0 has one order for every token (kernels/quant.c's dot_q5_0_scalar, ggml's x86
 * vec_dot_q5_0_q8_0): per 32-element block 8 exact int32 lanes a row, lane l the 4 products
 * of elements 4l..4l+3 of (q - 16) and the token's quants, then acc[l] = fma((float)lane,
 * fp16(d_w) * fp16(d_x), acc[l]), blocks in order, and ggml's hsum of the 8 chains. That
 * is compute-heavy per byte: the repacked groups (kernels/repack.h) run it two rows a
 * register at ~23 GB/s a thread from cache on the Zen 4 host, below what decode needs of
 * one thread when the memory reads fast (Qwen2.5's 133 Q5_0 matrices: ~44 % of its bytes).
 * Here lane l of 16 rows is one vpdpbusd (the rows' 5-bit quants, unsigned 0..31, by the
 * token's 4 quants broadcast, from -16 x their sum), one conversion and one FMA; the 5th
 * bits come in as a 64-bit mask (one masked add of 16 per lane), and a block's quants
 * unpack once for the tile's tokens.
 *
 * Layout of n_out rows of n elements (nb = n / 32 blocks): ceil(n_out / 16) groups of
 * tsr_q50l_group_bytes = ceil(nb / 2) * 704 bytes: blocks in pairs, so that every vector
 * stays 64-byte aligned with no padding (16 x 22 bytes a block, the file's bytes
 * rearranged). Pair p of a group holds blocks 2p + h, h = 0, 1:
 *   uint8  qs[2][4][16][4]  qs[h][j][r][k] = the file's qs[4j + k] of row r: low nibble
 *                           element 4j + k (lane j), high nibble 16 + 4j + k (lane j + 4)
 *   uint64 qh[2][8]         qh[h][l] bit 4r + k = the file's qh bit 4l + k of row r (the 5th
 *                           bit of element 4l + k)
 *   uint16 d[2][16]         the rows' fp16 scales
 * The second block of a last pair of an odd nb, and rows past n_out in the last group, are
 * zero (computed, never stored; a padded block is never read).
 *
 * Activations: the Q8_0 rows of the matmul's conversion (kernels/dot_ggml.h's quantizer), read
 * as they are.
 *
 * Pure and thread-safe. n is a multiple of 32.
 */
#ifndef TSR_Q50_LANES_H
#define TSR_Q50_LANES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TSR_Q50L_ROWS       16  /* rows per group; row splits of a lanes matrix are multiples */
#define TSR_Q50L_PAIR_BYTES 704 /* two blocks of a group: 2 x 16 x 22 bytes */

/* Whether the load puts Q5_0 matrices in this layout: the CPU has AVX-512 VNNI
 * (kernels/dot_ggml.h's level) and TSR_Q50_LANES is not "0" (read once; "0" keeps the
 * repacked groups, e.g. to compare). */
bool tsr_q50l_chosen(void);

size_t tsr_q50l_group_bytes(int64_t n);
size_t tsr_q50l_bytes(int64_t n, int64_t n_out);

/* Repack n_out Q5_0 rows of n elements (row r at src + r * src_stride bytes, ggml blocks of
 * 22 bytes) into dst (tsr_q50l_bytes(n, n_out) bytes, 64-byte aligned for best speed).
 * Returns 0, or -1 when n is not a positive multiple of 32. */
int tsr_q50l_repack(int64_t n, int64_t n_out, const void *src, size_t src_stride, void *dst);

/* y[t * y_stride + r] = dot(row r0 + r, token t) for r < n_rows, t < n_tok, over a lanes
 * matrix `packed` (its first group); r0 is a multiple of TSR_Q50L_ROWS. x: n_tok Q8_0 rows
 * x_stride bytes apart. Every y is bit-identical to tsr_vec_dot(TSR_TYPE_Q5_0, ...) of that
 * row and token. isa: kernels/dot_ggml.h's level (the caller checked the CPU has it):
 * TSR_GGML_VNNI runs the 512-bit kernel, others a scalar loop; the same bits. */
void tsr_q50l_dot(int isa, int64_t n, const void *packed, int64_t r0, int64_t n_rows, int32_t n_tok,
                  const void *x, size_t x_stride, float *y, size_t y_stride);

#endif /* TSR_Q50_LANES_H */
