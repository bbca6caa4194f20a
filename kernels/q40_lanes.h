/*
 * q40_lanes.h — Q4_0 matrices with 16 rows in the lanes of one AVX-512 register (or two
 * AVX2 ones), for CPUs with AVX2 or AVX-512 VNNI: the layout the load gives every Q4_0 matrix
 * of a CPU rank there, and its kernels, in Q4_0's one order (kernels/q40_gemm.h), bit for bit.
 *
 * Why: the repacked Q4_0 groups (kernels/repack.h: 4 rows, each row's 16 nibble bytes of a
 * block side by side) put a row in each 128-bit lane, so every block's four partial sums of
 * a row must be gathered into one lane before its float FMA (3 packs + 3 multiply-adds per
 * 16 rows and block), and the rows' fp16 scales, stored per row, take 12 word permutes per
 * 8 blocks. Here a 64-byte vector holds 4 nibble bytes of each of 16 rows, so each row's
 * block sum builds up in its own 32-bit lane (8 vpdpbusd per 16 rows, token and block) and
 * the 16 scales of a block are one 32-byte load: the form of the Q8_0 lanes kernel
 * (kernels/q80_lanes.h) with a nibble split. On AMD Zen 4, 2048 columns from L2, 1 thread:
 * 121 / 172 / 180 / 182 G multiply-adds per s for 1 / 2 / 4 / 8 tokens against the groups'
 * GEMV and GEMM tiles' 71 / 66 / 102 / 127 (a prototype against tsr_q40_gemm_dot_repacked).
 * On AVX2 a ymm holds 8 of the 16 rows (`vpmaddubsw` in place of `vpdpbusd`, summed in
 * int16): on AMD Zen 3, the same measure, one token 2.3x the groups' GEMV, 4 tokens 1.4x,
 * 128 tokens 1.0-1.1x their GEMM; 1B Q4_0, 2 threads, decode 37.4-37.7 -> 44.7-46.2 tokens/s,
 * prefill 92-103 -> 102-114 (q40_lanes.c).
 *
 * The order is Q4_0's, unchanged (q40_gemm.h): per (row, token), blocks in order,
 *   I = sum_{l < 32} (q_l - 8) * y_l (exact int32), acc = fmaf((float)I, d_w * d_y, acc),
 * so results are the same bits as the file layout's and the groups', on every ISA.
 *
 * Layout of n_out rows of n elements (nb = n / 32): ceil(n_out / 16) groups of
 * tsr_q40l_group_bytes = nb * 288 bytes; group g, block b (288 bytes):
 *   uint16 d[16]          the fp16 scales of rows 16g .. 16g + 15
 *   uint8  q[4][16][4]    q[k][r][j] = nibble byte 4k + j of row r's block (low nibble:
 *                         element 4k + j, high nibble: element 16 + 4k + j)
 * Rows past n_out in the last group are zero (computed, never stored).
 *
 * Activations: the Q8_0 lanes prep (tsr_q80l_prep: per block c = -128 * sum(q_y), d_y,
 * q_y[32]); the kernels take c / 16 = -8 * sum(q_y), which undoes the nibbles' offset of 8.
 *
 * Pure and thread-safe. n is a multiple of 32.
 */
#ifndef TSR_Q40_LANES_H
#define TSR_Q40_LANES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TSR_Q40L_ROWS        16  /* rows per group; row splits of a lanes matrix are multiples */
#define TSR_Q40L_BLOCK_BYTES 288 /* a group's block: 16 fp16 scales + 16 x 16 nibble bytes */

/* Whether the load puts Q4_0 matrices in this layout: the CPU has AVX2 or AVX-512 VNNI
 * (kernels/dot_ggml.h's level) and TSR_Q40_LANES is not "0" (read once; "0" keeps the
 * repacked groups, e.g. to compare). */
bool tsr_q40l_chosen(void);

size_t tsr_q40l_group_bytes(int64_t n);
size_t tsr_q40l_bytes(int64_t n, int64_t n_out);

/* Repack n_out Q4_0 rows of n elements (row r at src + r * src_stride bytes, ggml blocks of
 * 18 bytes) into dst (tsr_q40l_bytes(n, n_out) bytes, 64-byte aligned for best speed).
 * Returns 0, or -1 when n is not a positive multiple of 32. */
int tsr_q40l_repack(int64_t n, int64_t n_out, const void *src, size_t src_stride, void *dst);

/* y[t * y_stride + r] = dot(row r0 + r, token t) in Q4_0's order, for r < n_rows,
 * t < n_tok, over a lanes matrix `packed` (its first group); r0 is a multiple of
 * TSR_Q40L_ROWS. prep holds n_tok rows of tsr_q80l_prep (tsr_q80l_prep_bytes(n, 1) bytes
 * each). isa: kernels/dot_ggml.h's level (the caller checked the CPU has it): TSR_GGML_VNNI
 * runs the 512-bit kernel, TSR_GGML_AVX2 the 256-bit one, TSR_GGML_SCALAR a scalar loop; the
 * same bits. */
void tsr_q40l_dot(int isa, int64_t n, const void *packed, int64_t r0, int64_t n_rows, int32_t n_tok,
                  const void *prep, float *y, size_t y_stride);

#endif /* TSR_Q40_LANES_H */
