/*
 * q50_avx2.h — Q5_0 matrices laid out for AVX2 CPUs without AVX-512 VNNI: 8 rows in the
 * lanes of a ymm, each row's 5th bits in one 32-bit lane placed so that one shift and one
 * and bring the bits of any ggml lane to bit 4 of its bytes. The layout the load gives every
 * Q5_0 matrix of a CPU rank there, and its kernels, in Q5_0's one order (ggml's), bit for bit.
 *
 * Why: Q5_0 has one order for every token (kernels/quant.c's dot_q5_0_scalar, ggml's x86
 * vec_dot_q5_0_q8_0): per 32-element block 8 exact int32 lanes a row, lane l the 4 products
 * of elements 4l..4l+3 of (q - 16) and the token's quants, then acc[l] = fma((float)lane,
 * fp16(d_w) * fp16(d_x), acc[l]), blocks in order, and ggml's hsum of the 8 chains. Over the
 * repacked groups (kernels/repack.h) a row's block is one ymm: its 32 quants made from the
 * nibbles and the 5th bits (a broadcast, a shuffle, an or, a compare, and the nibble split:
 * ~9 vector ops) before the 5 of the dot. Q5_0 is 267 of Qwen2.5-Coder-0.5B's 491 MB and
 * about half its decode. kernels/q50_lanes.h's layout serves AVX-512 VNNI, whose 5th bits
 * are mask registers; spreading its bits to bytes on AVX2 cost as much as the groups' expansion
 * (0.82-1.08x, tried 2026-12-07). Here the 8 lanes of 8 rows are 8 ymm made from 4 nibble
 * vectors and one of bits, ~4.5 ops a row and block, and a block's quants unpack once for
 * many tokens.
 *
 * Layout of n_out rows of n elements (nb = n / 32 blocks): ceil(n_out / 16) groups of
 * tsr_q50a_group_bytes(n) = 2 * ceil(nb / 2) * 352 bytes (the size of q50_lanes.h's groups).
 * A group is two halves, rows 8h..8h+7 (h = 0, 1), one after the other, each ceil(nb / 2)
 * pairs of 352 bytes (every vector 32-byte aligned). Pair p of a half holds blocks 2p + e,
 * e = 0, 1, of its 8 rows r:
 *   uint8  qs[e][4][8][4]  at 160e + 32j + 4r + k: the file's qs[4j + k] (low nibble element
 *                          4j + k, lane j; high nibble element 16 + 4j + k, lane j + 4)
 *   uint32 hb[e][8]        at 160e + 128 + 4r: bit 8k + l = the file's qh bit 4l + k (the 5th
 *                          bit of element 4l + k): lane l's bits at bit 4 of the 4 bytes
 *                          after a shift by l - 4
 *   uint16 d[e][8]         at 320 + 16e + 2r: the rows' fp16 scales
 * The second block of a last pair of an odd nb, and rows past n_out in the last group, are
 * zero (computed, never stored).
 *
 * Activations: the Q8_0 rows of the matmul's conversion (kernels/dot_ggml.h's quantizer), read
 * as they are.
 *
 * Pure and thread-safe. n is a multiple of 32.
 */
#ifndef TSR_Q50_AVX2_H
#define TSR_Q50_AVX2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TSR_Q50A_ROWS       16  /* rows per group; row splits of such a matrix are multiples */
#define TSR_Q50A_PAIR_BYTES 352 /* two blocks of a half: 2 x 8 x 22 bytes */

/* Whether the load puts Q5_0 matrices in this layout: the CPU has AVX2 but not AVX-512 VNNI
 * (kernels/dot_ggml.h's level; there q50_lanes.h's layout serves) and TSR_Q50_LANES is not
 * "0" (read once; "0" keeps the repacked groups, e.g. to compare). */
bool tsr_q50a_chosen(void);

size_t tsr_q50a_group_bytes(int64_t n);
size_t tsr_q50a_bytes(int64_t n, int64_t n_out);

/* Repack n_out Q5_0 rows of n elements (row r at src + r * src_stride bytes, ggml blocks of
 * 22 bytes) into dst (tsr_q50a_bytes(n, n_out) bytes, 32-byte aligned for best speed). Returns 0,
 * or -1 when n is not a positive multiple of 32. */
int tsr_q50a_repack(int64_t n, int64_t n_out, const void *src, size_t src_stride, void *dst);

/* y[t * y_stride + r] = dot(row r0 + r, token t) for r < n_rows, t < n_tok, over a matrix
 * `packed` in this layout (its first group); r0 is a multiple of TSR_Q50A_ROWS. x: n_tok Q8_0
 * rows x_stride bytes apart. Every y is bit-identical to tsr_vec_dot(TSR_TYPE_Q5_0, ...) of
 * that row and token. isa: kernels/dot_ggml.h's level (the caller checked the CPU has it):
 * TSR_GGML_AVX2 and up run the AVX2 kernels, TSR_GGML_SCALAR a scalar loop; the same bits. */
void tsr_q50a_dot(int isa, int64_t n, const void *packed, int64_t r0, int64_t n_rows, int32_t n_tok,
                  const void *x, size_t x_stride, float *y, size_t y_stride);

#endif /* TSR_Q50_AVX2_H */
