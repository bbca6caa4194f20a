/*
 * q80_gemv.h — the one-token Q8_0 GEMV (decode) over the file's block layout, in ggml's x86
 * order, with less work per block than the generic row dots of kernels/dot_ggml.c.
 *
 * Why: one-token decode of a Q8_0 model spends ~80% of its time in this GEMV, and on a
 * 2-core host it is compute-bound per byte when the memory is fast (1B Q8_0 at ~58 GB/s:
 * 62% of the roofline). ggml's order (kernels/dot_ggml.h) fixes what is summed where, not
 * how: here the 4 rows of a group share the work that does not depend on the row.
 *   - Block scale products fp16(d_w) * fp16(d_x) come 8 blocks x 1 row at a time: the 8
 *     fp16 d of a row gathered (34 bytes apart), converted by one vcvtph2ps, multiplied by
 *     the token's 8 float scales (the same float product ggml forms), then broadcast from
 *     memory per block (a load, no ALU work), where the row dots convert and broadcast one
 *     scale per block and row.
 *   - AVX-512 VNNI: the integer lanes as vpdpbusd(c_b, w ^ 0x80, x_b): the weights made
 *     unsigned (w + 128), the token signed, the accumulator starting at c_b = -128 * (the
 *     4-sums of x_b), made once per token: sum((w + 128) * x) - 128 * sum(x) = sum(w * x),
 *     exact for every byte (no saturation), lane l over elements 4l..4l+3 as ggml's. One
 *     xor instead of ggml's two vpsignb per row and block.
 *   - AVX2: ggml's sign trick (vpmaddubsw on |w| and sign(x, w), vpmaddwd by 1), the lanes
 *     it needs; only the scale work is shared.
 * Each (row, token) pair is then acc = fma(scale_b, float(lanes_b), acc) for b in order and
 * ggml's hsum_float_8: bit-identical to tsr_ggml_dot_rows (and llama.cpp) on every ISA.
 *
 * The next 4-row group is prefetched over the current one's blocks (the hardware
 * prefetchers do not follow 4 interleaved row streams well).
 *
 * tsr_vec_dot_rows runs it for one Q8_0 token, except on AMD CPUs, where kernels/dot_ggml.c's
 * row dots stream faster (kernels/quant.h, tsr_quant_set_q80_row_dots; kernels/quant.c says
 * what was measured).
 */
#ifndef TSR_Q80_GEMV_H
#define TSR_Q80_GEMV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Blocks (of 32) per row this GEMV takes; longer rows return false from tsr_q80_gemv. */
#define TSR_Q80_GEMV_MAX_BLOCKS 1024

/* y[r] = dot(row r, x) for r < n_rows: rows of n Q8_0 elements (n a multiple of 32) at
 * w + r * w_stride, x one Q8_0 activation row (kernels/dot_ggml.h's quantizer). isa: a
 * kernels/dot_ggml.h level the CPU has. Returns false (y untouched) when there is no SIMD
 * kernel for the case (scalar ISA, a non-x86 build, n / 32 > TSR_Q80_GEMV_MAX_BLOCKS); the
 * caller then runs tsr_ggml_dot_rows, which gives the same bits. */
bool tsr_q80_gemv(int isa, int64_t n, int64_t n_rows, const void *w, size_t w_stride, const void *x,
                  float *y);

#endif
