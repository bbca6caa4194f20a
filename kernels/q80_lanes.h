/*
 * q80_lanes.h — Q8_0 matrices with 16 rows in the lanes of one vector, for CPUs with AVX-512
 * VNNI, and two summation orders over that layout: the "lanes" order (opt-in, whole-block
 * integer sums, below) and ggml's (the default there, tsr_q80l_dot_ggml at the end).
 *
 * Why: the default Q8_0 order (kernels/dot_ggml.h, ggml's x86 order, bit-identical to
 * llama.cpp) turns every 4-product lane of every block into a float and FMAs it: per 64
 * products (one 512-bit vpdpbusd) one conversion and one FMA, plus the per-block scale
 * products. On AMD Zen 4 (two 256-bit pipes shared by vpdpbusd and FMA) that caps the
 * several-token tiles at ~1.1 vpdpbusd per ns, so verifying 4 drafts or stepping 16
 * sequences costs nearly as much compute per token as one token costs memory. Summing a
 * whole block in integers first (exact) needs one conversion and one FMA per 512 products:
 * 8 vpdpbusd per row group x token x block (tests/bench_tile prints both).
 *
 * The order (every path here, every ISA, any number of tokens, any row split or thread
 * count; results never depend on them):
 *   y[r][t] = 0; for each block b in order:
 *     s = sum of the block's 32 products q_w * q_x (exact int32; |s| < 2^24, exact float)
 *     y[r][t] = fmaf((float)s, fp16(d_w[r][b]) * fp16(d_x[t][b]), y[r][t])
 * It differs from ggml's in the last bits (not llama.cpp's logits bit for bit; within the
 * tolerances of ../shared/models/expected), hence opt-in: TSR_Q80_ORDER=lanes in the
 * environment, or tsr_q80l_set(1) (the CLI's --q8-order lanes) before the model loads. The
 * load (worker/model_repack.c) then repacks every Q8_0 matrix of a CPU rank into the layout
 * below instead of its verbatim copy (the same bytes), and the matmul (kernels/ops.c) runs
 * those matrices here for one token and for many. It needs the repacked copy: --no-repack
 * turns it off; GPU ranks keep ggml's order.
 *
 * Layout of n_out rows of n elements (nb = n / 32): ceil(n_out / 16) groups of
 * tsr_q80l_group_bytes = nb * 544 bytes; group g, block b (544 bytes):
 *   uint16 d[16]           the fp16 scales of rows 16g .. 16g + 15
 *   uint8  q[8][16][4]     q[k][r][j] = (uint8)(quant 4k + j of row r) ^ 0x80 (unsigned for
 *                          vpdpbusd; 16 rows' 4 bytes = one 64-byte vector per k)
 * Rows past n_out in the last group are zero (computed, never stored).
 *
 * Activations: each token's Q8_0 row (tsr_quant_act_row) is laid out once per matmul
 * (tsr_q80l_prep): per block int32 c = -128 * sum(q_x) (undoes the ^ 0x80: the dot of
 * (q_w + 128) with q_x is s + 128 * sum(q_x)), float d_x, int8 q_x[32]: 40 bytes.
 *
 * All functions are pure and thread-safe but tsr_q80l_set. n is a multiple of 32.
 */
#ifndef TSR_Q80_LANES_H
#define TSR_Q80_LANES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TSR_Q80L_ROWS         16  /* rows per group; row splits of a lanes matrix are multiples */
#define TSR_Q80L_BLOCK_BYTES  544 /* a group's block: 16 fp16 scales + 16 x 32 quants */
#define TSR_Q80L_XBLOCK_BYTES 40  /* a prepared activation block: c, d, q[32] */

/* Whether the lanes order is on: tsr_q80l_set's value, else the environment variable
 * TSR_Q80_ORDER ("lanes": on; unset, "ggml": off; read once). */
bool tsr_q80l_on(void);
/* Set it: 1 on, 0 off, -1 back to the environment's choice. Before a model loads (the load
 * decides which matrices carry the layout), or in tests. */
void tsr_q80l_set(int on);
/* Whether this CPU runs the lanes order's SIMD kernel (AVX-512 VNNI, kernels/dot_ggml.h's
 * level). Without it the same bits come from a scalar loop, 20-40x slower than ggml's order
 * (AMD Zen 3, 100M Q8_0: decode 10 against 205 tokens/s); an AVX2 kernel of this order would
 * gain little there, as AVX2 multiplies int8 by int8 only by the sign trick (vpsignb,
 * vpmaddubsw, vpmaddwd per 32 products), within ~10 % of ggml's order. */
bool tsr_q80l_fast(void);
/* A warning for the user when the lanes order is on and the CPU runs it as a scalar loop
 * (a static string saying so and what to do), else NULL. The CLI prints it at start. */
const char *tsr_q80l_slow_note(void);
/* Whether `name` is one of the orders ("ggml", "lanes"); sets *on accordingly. */
bool tsr_q80l_parse(const char *name, bool *on);

size_t tsr_q80l_group_bytes(int64_t n);
size_t tsr_q80l_bytes(int64_t n, int64_t n_out);

/* Repack n_out Q8_0 rows of n elements (row r at src + r * src_stride bytes) into dst
 * (tsr_q80l_bytes(n, n_out) bytes, 64-byte aligned for best speed). Returns 0, or -1 when n
 * is not a positive multiple of 32. */
int tsr_q80l_repack(int64_t n, int64_t n_out, const void *src, size_t src_stride, void *dst);

/* Bytes of n_tok prepared activation rows, and one token's row (its Q8_0 row at xq, n / 32
 * blocks) into prep (tsr_q80l_prep_bytes(n, 1) bytes; tokens one after the other). */
size_t tsr_q80l_prep_bytes(int64_t n, int32_t n_tok);
void tsr_q80l_prep(int64_t n, const void *xq, void *prep);

/* y[t * y_stride + r] = dot(row r0 + r, token t) in the order above, for r < n_rows,
 * t < n_tok, over a lanes matrix `packed` (its first group); r0 is a multiple of
 * TSR_Q80L_ROWS. prep holds n_tok prepared rows. isa: kernels/dot_ggml.h's level (the
 * caller checked the CPU has it): TSR_GGML_VNNI runs the 512-bit kernel, others a scalar
 * loop; the results are the same bits. */
void tsr_q80l_dot(int isa, int64_t n, const void *packed, int64_t r0, int64_t n_rows, int32_t n_tok,
                  const void *prep, float *y, size_t y_stride);

/* ggml's order over the same layout: the default for Q8_0 on CPUs with AVX-512 VNNI.
 * tsr_q80l_ggml_chosen: whether the load puts Q8_0 matrices in the layout for it (the CPU has
 * AVX-512 VNNI, kernels/dot_ggml.h's level, and TSR_Q80_LANES is not "0", which keeps the
 * verbatim copy and ggml's kernels over it; read once). tsr_q80l_dot_ggml: y as tsr_q80l_dot's,
 * every y bit-identical to tsr_vec_dot(TSR_TYPE_Q8_0, ...) of that row and token (ggml's x86
 * order, kernels/dot_ggml.h); x: n_tok Q8_0 rows x_stride bytes apart, read as they are (no
 * prep). */
bool tsr_q80l_ggml_chosen(void);
void tsr_q80l_dot_ggml(int isa, int64_t n, const void *packed, int64_t r0, int64_t n_rows,
                       int32_t n_tok, const void *x, size_t x_stride, float *y, size_t y_stride);

#endif /* TSR_Q80_LANES_H */
