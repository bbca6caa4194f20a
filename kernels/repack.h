/*
 * repack.h — weights repacked at load into an interleaved-row layout, and the GEMV / GEMM
 * kernels that read it.
 *
 * Why: the row kernels of quant.h read each weight row on its own, in the file's block
 * layout, and convert every group of 8 fp16 block scales with a strided gather; the tile
 * kernels add one more pass per call to collect those scales. A rank's tiles are copied
 * once at load (anonymous memory, this rank's rows only) into groups of 4 rows: the 4
 * rows' fp16 scales contiguous per row (one load + vcvtph2ps per 8 blocks), then block
 * b of rows 0..3 side by side (one sequential stream for the 4 rows). GEMV (one token)
 * and GEMM (any number of tokens: 2-8 for speculative verification, 16 for decode batches,
 * prefill) run over that layout.
 *
 * Exactness (the property the engine relies on): every output y[t][r] is computed with
 * the same operations, in the same order, as tsr_vec_dot of that row and token on the
 * same instruction set (kernels/quant.c: the scalar reference's sequential sum; the SIMD
 * kernels' per-lane float chains, block b into chain b % 4, the same final additions; Q4_0:
 * kernels/q40_gemm.h's one order, from the file layout and the groups alike). So results are
 * bit-identical with and without repacking, for one token or many, whatever the thread
 * count or row split.
 *
 * Repacked types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (every quantized
 * weight type). Others keep the row / tile kernels of quant.h (tsr_repack_supported is false
 * for them); which supported types the load repacks: tsr_repack_chosen.
 *
 * Layout of a repacked matrix of n_out rows x n elements (nb = n / 32 blocks, nbp = nb
 * rounded up to 8): ceil(n_out / 4) groups of tsr_repack_group_bytes bytes; a group holds
 *   uint16 d[4][nbp]   the fp16 block scales of its 4 rows (zero past nb)
 *   uint16 m[4][nbp]   Q4_1 / Q5_1 only: the rows' fp16 block mins
 *   quants [nb][4][Q]  block b's quant bytes of row 0, 1, 2, 3 (Q = 32 for Q8_0, 16 for
 *                      Q4_0 / Q4_1, 20 for Q5_0 / Q5_1: the bytes after d (and m), as
 *                      stored)
 * padded to 64 bytes. K-quants (Q2_K .. Q6_K): ceil(n_out / 4) groups of [n / 256][4] whole
 * super-blocks (block i of rows 0..3 side by side), padded to 64 bytes. Rows past n_out in
 * the last group repeat the last row (computed, never stored).
 */
#ifndef TSR_REPACK_H
#define TSR_REPACK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TSR_REPACK_ROWS 4 /* rows per group; row splits of a repacked matrix are multiples */

/* Whether weights of `type` have a repacked layout and kernels (the quantized types above). */
bool tsr_repack_supported(uint32_t type);

/* Whether the load repacks weights of `type`: every supported type (the default), or, after
 * tsr_repack_set_all(false) or with the environment variable TSR_REPACK_ALL=0, only Q5_0, Q5_1 and
 * the K-quants, whose file layout has no register-blocked tile (quant.c): the repacked copy
 * is then kept only where several tokens gain most from it. */
bool tsr_repack_chosen(uint32_t type);
void tsr_repack_set_all(bool all);
/* Whether every supported type is repacked (the default; not after tsr_repack_set_all(false)
 * or TSR_REPACK_ALL=0): also whether a load lays Q8_0 out anew (kernels/q80_lanes.h's layout
 * in ggml's order, worker/model_repack.c) rather than keeping its file layout. */
bool tsr_repack_all(void);

/* Tokens from which a batch of Q8_0 / Q4_1 runs on the file layout's tile
 * (quant.c) rather than the repacked GEMM. Measured, 1B Q8_0, 2 threads: the repacked GEMM
 * wins for 2-9 tokens (verification of k drafts, step of k+1 / step of 1: k=1 1.07 vs 1.6-2.0,
 * k=4 1.9 vs 2.4-3.4, k=8 3.1-3.2 vs 3.9), the tile for a 128-token prefill (79 vs 72-78
 * tokens/s; Q4_0 108 vs 91 on a quiet machine); 64 lies between the measured points. */
#define TSR_REPACK_TILE_MIN_TOKENS 64

/* Whether n_tok tokens through a `type` matrix should read the file layout (when the rank
 * still has it): one token of any type but Q4_K / Q6_K / Q5_0 / Q4_0 (the row dots stream
 * memory faster than the generic repacked GEMV: 1B Q4_K_M decode 45.6 vs 26.7 tokens/s; one
 * Q4_K / Q6_K token runs quant.c's 4-row GEMV over the groups, tsr_vec_dot_kgroups, one
 * linear stream; one Q5_0 token the groups' own ggml-order GEMV, cheaper than the row dots;
 * Q4_0 any number of tokens kernels/q40_gemm.c over the groups: a group's block of 4 rows
 * is one 64-byte load), and TSR_REPACK_TILE_MIN_TOKENS or more of Q8_0 / Q4_1 (a
 * file-layout tile). kernels/ops.c's one choice point. */
bool tsr_repack_use_file_layout(uint32_t type, int32_t n_tok);

/* Bytes of one group of TSR_REPACK_ROWS rows of n elements, and of a whole matrix of
 * n_out rows; 0 when the type is not supported or n is not a multiple of its block. */
size_t tsr_repack_group_bytes(uint32_t type, int64_t n);
size_t tsr_repack_bytes(uint32_t type, int64_t n, int64_t n_out);

/* Repack n_out rows of n elements (row r at src + r * src_stride bytes, the file's block
 * layout) into dst, which holds tsr_repack_bytes(type, n, n_out) bytes (64-byte aligned
 * for best speed). Returns 0, or -1 when the type is not supported. */
int tsr_repack(uint32_t type, int64_t n, int64_t n_out, const void *src, size_t src_stride,
               void *dst);

/* y[t * y_stride + r] = dot(row r0 + r, token t) for r < n_rows, t < n_tok, over a repacked
 * matrix `packed` (its first group); r0 must be a multiple of TSR_REPACK_ROWS. x holds n_tok
 * activation rows of tsr_type_vec_dot_type(type) made by tsr_quant_row, x_stride bytes
 * apart. Every y is bit-identical to tsr_vec_dot(type, n, row, x_t) on the instruction set
 * tsr_quant_isa() names. Allocates a small heap workspace when n_tok > 1 (falls back to one
 * token at a time if that fails). */
void tsr_repack_dot(uint32_t type, int64_t n, const void *packed, int64_t r0, int64_t n_rows,
                    int32_t n_tok, const void *x, size_t x_stride, float *y, size_t y_stride);

#endif /* TSR_REPACK_H */
