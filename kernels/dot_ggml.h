/*
 * dot_ggml.h — row dots and activation quantizers in the exact order of ggml's x86 CPU
 * kernels (llama.cpp built for AVX2 or better), so a matmul's every output float is
 * bit-identical to llama.cpp's.
 *
 * Why: the real-model references (../shared/models/expected) are llama.cpp's greedy ids.
 * Small models amplify a last-bit difference through their layers until a near-tie flips;
 * only the same floating-point operations in the same order give the same ids.
 *
 * The order (ggml_vec_dot_q4_1_q8_1 / ggml_vec_dot_q8_0_q8_0 under __AVX2__, the same with
 * AVX-512 VNNI, which only changes how the exact integer lane sums are formed):
 *   per 32-element block b, 8 integer lanes, lane l = sum of the 4 products of elements
 *   4l..4l+3 (exact); acc[l] = fma(fp16(w.d) * fp16(x.d), (float)lane[l], acc[l]), blocks
 *   in order, one accumulator; Q4_1 also summs = fma(fp16(w.m), fp16(x.s), summs) per block
 *   (GCC contracts ggml's `summs += m*s`); result = hsum8(acc) (+ summs), hsum8 =
 *   ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)) as ggml's hsum_float_8.
 * Every ISA path here (scalar, AVX2, AVX-512 VNNI) and every shape (rows for one token,
 * tiles for several) computes each (row, token) element exactly so: results never depend
 * on the ISA, thread count, batch size or tiling.
 *
 * Activations (ggml's x86 quantize_row_q8_0 / q8_1, not the reference quantizers): per
 * block amax = max |x|, d = amax / 127, multiplier id = 127 / amax (0 if amax is 0),
 * q = x * id rounded half to even; Q8_1's s = fp16(d * (float)sum(q)).
 *
 * All functions are pure and thread-safe. n is a multiple of 32.
 */
#ifndef TSR_DOT_GGML_H
#define TSR_DOT_GGML_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ggml's hsum_float_8 of a row dot's 8 float chains, ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)): the
 * end of the order above, and of every scalar form that computes it (quant.c, repack.c, the
 * lanes layouts). The vector forms are kernels/x86hsum.h's. */
static inline float tsr_ggml_hsum8(const float a[8])
{
    const float t0 = a[0] + a[4], t1 = a[1] + a[5], t2 = a[2] + a[6], t3 = a[3] + a[7];
    return (t0 + t2) + (t1 + t3);
}

/* ISA levels, as kernels/quant.c's dispatcher numbers them. */
enum { TSR_GGML_SCALAR = 0, TSR_GGML_AVX2 = 1, TSR_GGML_VNNI = 2 };

/* true for the weight types whose dots this module computes (Q4_1, Q8_0). */
bool tsr_ggml_dot_handles(uint32_t type);

/* y[r] = dot(row r, x) for n_rows rows of n elements, w_stride bytes apart; x holds the
 * activation row in the type's dot type (Q8_1 for Q4_1, Q8_0 for Q8_0). isa: one of the
 * levels above (the caller checked the CPU has it). */
void tsr_ggml_dot_rows(uint32_t type, int isa, int64_t n, int64_t n_rows, const void *w,
                       size_t w_stride, const void *x, float *y);

/* y[t * y_stride + r] = dot(row r, token t) for n_tok tokens x_stride bytes apart:
 * bit-identical to tsr_ggml_dot_rows per token. */
void tsr_ggml_dot_tile(uint32_t type, int isa, int64_t n, int64_t n_rows, const void *w,
                       size_t w_stride, int32_t n_tok, const void *x, size_t x_stride, float *y,
                       size_t y_stride);

/* The VNNI Q8_0 tiles lay out their tokens' activations (the prep: quants + 128 duplicated
 * for vpdpbusd, scales as floats) before any row; a matmul that calls the tiles for many row
 * chunks lays them out once instead (worker threads pay the layout per call otherwise: with
 * 16 tokens about 1 us of every call's few dozen).
 *   tsr_ggml_tile_prep_bytes: bytes of the prep of n_tok tokens of n elements of type (0
 *     when the type has no such tile here: only Q8_0 on x86; a multiple of 64). Does not
 *     depend on the ISA level, so scratch sized with it fits whatever level runs.
 *   tsr_ggml_tile_prep_used: whether tiles at ISA level isa for n_tok tokens take a prep
 *     (Q8_0, VNNI, 2+ tokens). The two functions below run AVX-512 VNNI code: call them only
 *     where this is true for tsr_ggml_isa() (kernels/ops.c asks it once per matmul).
 *   tsr_ggml_tile_prep: token t of n_tok (its Q8_0 row at x) into prep (64-byte aligned,
 *     tsr_ggml_tile_prep_bytes(TSR_TYPE_Q8_0, n, n_tok) bytes); tokens are independent, so
 *     threads may lay out different ones.
 *   tsr_ggml_dot_tile_prep: tsr_ggml_dot_tile of a Q8_0 matrix at VNNI for tokens
 *     t0..t0 + n_tok - 1 of a prep of n_all tokens, bit-identical to it; x / x_stride (the
 *     same tokens' Q8_0 rows) serve the fallback when its workspace cannot be allocated. */
size_t tsr_ggml_tile_prep_bytes(uint32_t type, int64_t n, int32_t n_tok);
/* The VNNI Q8_0 tiles come in two register forms with the same bits: 512-bit (two rows'
 * chains per zmm, up to 8 tokens a tile) and 256-bit (one chain per ymm, up to 5 tokens),
 * the 256-bit one on AMD CPUs (their 512-bit ops run as two halves; dot_ggml.c says what
 * was measured). The environment variable TSR_Q80_TILE_YMM=1 / 0 overrides (read once);
 * this sets the choice: on (1), off (0), or the CPU's default (-1, ignoring the variable).
 * For tests and benchmarks. */
void tsr_ggml_dot_set_tile_ymm(int on);
bool tsr_ggml_tile_prep_used(uint32_t type, int isa, int64_t n, int32_t n_tok);
void tsr_ggml_tile_prep(int64_t n, int32_t n_tok, int32_t t, const void *x, void *prep);
void tsr_ggml_dot_tile_prep(int64_t n, int64_t n_rows, const void *w, size_t w_stride,
                            int32_t n_all, int32_t t0, int32_t n_tok, const void *prep,
                            const void *x, size_t x_stride, float *y, size_t y_stride);

/* One activation row of n floats into Q8_0 (type 8) or Q8_1 (type 9) blocks at dst, as
 * ggml's x86 from_float (above). Same bytes on every ISA. */
void tsr_ggml_quant_act_row(uint32_t type, int isa, const float *src, void *dst, int64_t n);

/* gate[i] = silu(gate[i]) * up[i] for one row of n values, as ggml_vec_swiglu_f32 on
 * AVX-512: ggml_v_expf's AVX-512 polynomial for each whole 16 elements, libm expf for the
 * rest (so call it per row). The same bits on every ISA. */
void tsr_ggml_swiglu(int isa, float *gate, const float *up, int64_t n);

/* Tests: on = false keeps the VNNI Q8_0 tiles off AVX-512 VBMI (its scale extraction) on a CPU
 * that has it, so both forms are checked; true (the default) uses it where the CPU has it.
 * x86 only; elsewhere nothing. */
void tsr_ggml_dot_set_vbmi(bool on);

/* The ISA level kernels/quant.c dispatches to now (from tsr_quant_isa). */
int tsr_ggml_isa(void);

/* Whether a layout made for CPUs of ISA level min_isa or above is chosen: tsr_ggml_isa() is
 * at least min_isa and the environment variable `env` is not "0" (which keeps the repacked
 * groups, e.g. to compare). Decided once into *cache (-1 until then): tsr_q40l_chosen and
 * tsr_q4kl_chosen (AVX2 and up), tsr_q6kl_chosen and tsr_q50l_chosen (AVX-512 VNNI only,
 * through tsr_ggml_vnni_chosen: min_isa TSR_GGML_VNNI), tsr_q50a_chosen (AVX2 exactly). */
bool tsr_ggml_isa_chosen(const char *env, int min_isa, _Atomic int *cache);
bool tsr_ggml_vnni_chosen(const char *env, _Atomic int *cache);

#endif
