/*
 * q4k_lanes.h — Q4_K matrices with 16 rows in the lanes of one AVX-512 register (or two
 * AVX2 ones), for CPUs with AVX2 or AVX-512 VNNI: the layout the load gives every Q4_K matrix
 * of a CPU rank there, and its kernels, in both of Q4_K's orders, bit for bit.
 *
 * Why: Q4_K has two orders (worker/model.h's order classes): generated tokens run ggml's
 * repacked GEMV order (kernels/quant.c's Q4_K row dot: per super-block one exact int32 of
 * the scaled sub-block dots and one of the mins, then one FMA each), prompt tokens its
 * repacked GEMM order (kernels/q4k_gemm.h: the same per 64 elements). Both are a chain per
 * (row, token) over exact integers, so rows can sit in vector lanes: 4 nibble bytes of each
 * of 16 rows in one 64-byte vector, each row's sub-block dot built up in its own int32 lane
 * by vpdpbusd, scaled by vpmulld, the mins term one vpdpwssd of the rows' (min, min) int16
 * pairs with the token's sub-block sums. The groups' GEMM (q4k_gemm.c) gathers and shuffles
 * its way to one lane per row instead. On AVX2 a ymm holds 8 of the 16 rows (vpmaddubsw
 * summed in int16, the scale one vpmaddwd by (s, s) pairs): AMD Zen 3, 2048 columns from L2,
 * 1 thread, against the groups' kernels, the generated order 1.6x for one token and 1.4x for
 * 4 and 128, the prompt order 1.8x for 4 tokens and 0.95-1.09x for 128 (q4k_lanes.c).
 *
 * Layout of n_out rows of n elements (nsb = n / 256): ceil(n_out / 16) groups of
 * tsr_q4kl_group_bytes = nsb * 2304 bytes (a 16-row slice of the file's bytes, rearranged);
 * group g, super-block i (2304 bytes):
 *   uint16 d[16], dmin[16]   the rows' fp16 scales
 *   uint32 u[3][16]          the rows' 12 packed scale bytes as three words (u[k][r] =
 *                            bytes 4k..4k+3 of row r's scales[12]), unpacked in registers
 *   uint8  q[32][16][4]      q[8sb + j][r][b] = qs[32sb + 4j + b] of row r (low nibble:
 *                            sub-block 2sb, element 4j + b; high nibble: sub-block 2sb + 1)
 * Rows past n_out in the last group are zero (computed, never stored).
 *
 * Activations: the Q8_K rows of the matmul's conversion (kernels/quant.h), read as they are.
 *
 * Pure and thread-safe. n is a multiple of 256.
 */
#ifndef TSR_Q4K_LANES_H
#define TSR_Q4K_LANES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TSR_Q4KL_ROWS     16   /* rows per group; row splits of a lanes matrix are multiples */
#define TSR_Q4KL_SB_BYTES 2304 /* a group's super-block: 16 x 144 bytes */

/* Whether the load puts Q4_K matrices in this layout: the CPU has AVX2 or AVX-512 VNNI
 * (kernels/dot_ggml.h's level) and TSR_Q4K_LANES is not "0" (read once; "0" keeps the
 * repacked groups, e.g. to compare). */
bool tsr_q4kl_chosen(void);

size_t tsr_q4kl_group_bytes(int64_t n);
size_t tsr_q4kl_bytes(int64_t n, int64_t n_out);

/* Repack n_out Q4_K rows of n elements (row r at src + r * src_stride bytes, ggml blocks of
 * 144 bytes) into dst (tsr_q4kl_bytes(n, n_out) bytes, 64-byte aligned for best speed).
 * Returns 0, or -1 when n is not a positive multiple of 256. */
int tsr_q4kl_repack(int64_t n, int64_t n_out, const void *src, size_t src_stride, void *dst);

/* y[t * y_stride + r] = dot(row r0 + r, token t) for r < n_rows, t < n_tok, over a lanes
 * matrix `packed` (its first group); r0 is a multiple of TSR_Q4KL_ROWS. x: n_tok Q8_K rows
 * x_stride bytes apart. gemm: the prompt order (kernels/q4k_gemm.h), else the generated
 * tokens' (kernels/quant.c's Q4_K row dot). isa: kernels/dot_ggml.h's level (the caller
 * checked the CPU has it): TSR_GGML_VNNI runs the 512-bit kernel, TSR_GGML_AVX2 the 256-bit
 * one, TSR_GGML_SCALAR a scalar loop; the same bits. */
void tsr_q4kl_dot(int isa, int64_t n, const void *packed, int64_t r0, int64_t n_rows, int32_t n_tok,
                  const void *x, size_t x_stride, bool gemm, float *y, size_t y_stride);

/* Whether n_tok tokens in the prompt order over a lanes matrix should rather run
 * kernels/q4k_gemm.c over the file layout, where the rank still has it (the same bits): on
 * AVX2 from TSR_Q4KL_AVX2_FILE_MIN_TOKENS, where q4k_gemm.c's 8-row kernel, which unpacks a
 * super-block once for every token, is faster than the 4-token lanes tiles, which split the
 * nibbles again for each tile (AMD Zen 3, 2048 x 2048, 1 thread, ns per (row, 32 elements,
 * token), file / lanes: 5 tokens 1.46-1.49 / 0.92, 8 1.26-1.29 / 1.03-1.04, 16 0.97-0.98 /
 * 1.04, 32 0.78-0.79 / 0.92-1.03, 128 0.55-0.56 / 0.52-0.57; 1B Q4_K_M prefill of 128 tokens,
 * 2 threads, 4 alternated pairs, lanes 65-73 against 72-88 tokens/s). kernels/ops.c asks. */
#define TSR_Q4KL_AVX2_FILE_MIN_TOKENS 16
bool tsr_q4kl_prompt_file_layout(int isa, int32_t n_tok);

#endif /* TSR_Q4K_LANES_H */
