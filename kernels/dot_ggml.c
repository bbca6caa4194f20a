/* dot_ggml.c — see dot_ggml.h. One (weight row, activation row) pair is always summed by
 * the same steps; the kernels differ only in how many independent pairs they interleave to
 * hide the FMA latency of the single accumulator chain ggml's order imposes, and in how
 * they feed them: decode (rows4_*) walks 4-row groups with the next group prefetched (the
 * hardware prefetchers do not follow 4 interleaved row streams: 1 thread, 2 KiB Q8_0 rows,
 * 7.7 GB/s without, 16.9 with) and the token's scales converted once; several tokens
 * (tile_*) run as register tiles of 4 rows x several tokens (Q8_0 with VNNI up to 8 in zmm
 * registers, two rows' chains per register, the pairs' scale products 8 blocks at a time, or on
 * AMD CPUs up to 5 in ymm registers, one chain each; Q4_1 up to 4; AVX2 Q8_0 5, Q4_1 2), weight
 * and activation blocks loaded once per tile (AVX2 Q8_0's activation blocks: once per row),
 * scales as floats. No repacked layout: the file's blocks suffice. */
#include "kernels/dot_ggml.h"

#include "kernels/quant.h"
#include "kernels/util.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define GG_X86 1
#include <immintrin.h>
#else
#define GG_X86 0
#endif

typedef struct {
    uint16_t d;
    uint16_t m;
    uint8_t qs[16]; /* element j: low nibble of qs[j]; j+16: high nibble */
} gg_q4_1;

typedef struct {
    uint16_t d;
    int8_t qs[32];
} gg_q8_0;

typedef struct {
    uint16_t d;
    uint16_t s;
    int8_t qs[32];
} gg_q8_1;

_Static_assert(sizeof(gg_q4_1) == 20, "Q4_1 block");
_Static_assert(sizeof(gg_q8_0) == 34, "Q8_0 block");
_Static_assert(sizeof(gg_q8_1) == 36, "Q8_1 block");

bool tsr_ggml_dot_handles(uint32_t type)
{
    return type == TSR_TYPE_Q4_1 || type == TSR_TYPE_Q8_0;
}

/* Which register form the VNNI Q8_0 tiles take: the ymm one (GG_TILEY_Q80) on AMD CPUs, whose
 * 512-bit ops run as two halves, the zmm one (GG_TILEV_Q80) elsewhere (on the Intel Xeon
 * measured before, two 512-bit ports: 256-bit tiles 1.42-1.61 against 2.06-2.44 block dots per
 * ns). TSR_Q80_TILE_YMM=1 / 0 overrides; tsr_ggml_dot_set_tile_ymm for tests. Same bits.
 * Read with tsr_cpu_choice (kernels/util.h): 0 zmm, 1 ymm. */
static _Atomic int g_tile_ymm = -1;
void tsr_ggml_dot_set_tile_ymm(int on)
{
    tsr_cpu_choice_set(&g_tile_ymm, on, true);
}

/* Set by tests only (tsr_ggml_dot_set_vbmi): the VNNI Q8_0 tiles' scale extraction without VBMI. */
static int g_vbmi_off;
void tsr_ggml_dot_set_vbmi(bool on)
{
    g_vbmi_off = !on;
}

/* ---- scalar: the reference of the order ------------------------------------------------ */

static float dot_q4_1_scalar(int64_t nb, const gg_q4_1 *w, const gg_q8_1 *x)
{
    float acc[8] = {0};
    float summs = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
        summs = fmaf(tsr_f16_to_f32(w[b].m), tsr_f16_to_f32(x[b].s), summs);
        const float dd = tsr_f16_to_f32(w[b].d) * tsr_f16_to_f32(x[b].d);
        for (int l = 0; l < 8; ++l) {
            int32_t s = 0;
            for (int k = 0; k < 4; ++k) {
                const int e = 4 * l + k;
                const int q = e < 16 ? w[b].qs[e] & 0xF : w[b].qs[e - 16] >> 4;
                s += q * x[b].qs[e];
            }
            acc[l] = fmaf(dd, (float)s, acc[l]);
        }
    }
    return tsr_ggml_hsum8(acc) + summs;
}

static float dot_q8_0_scalar(int64_t nb, const gg_q8_0 *w, const gg_q8_0 *x)
{
    float acc[8] = {0};
    for (int64_t b = 0; b < nb; ++b) {
        const float dd = tsr_f16_to_f32(w[b].d) * tsr_f16_to_f32(x[b].d);
        for (int l = 0; l < 8; ++l) {
            int32_t s = 0;
            for (int k = 0; k < 4; ++k) s += w[b].qs[4 * l + k] * x[b].qs[4 * l + k];
            acc[l] = fmaf(dd, (float)s, acc[l]);
        }
    }
    return tsr_ggml_hsum8(acc);
}

static float dot_scalar(uint32_t type, int64_t nb, const void *w, const void *x)
{
    return type == TSR_TYPE_Q4_1 ? dot_q4_1_scalar(nb, w, x) : dot_q8_0_scalar(nb, w, x);
}

/* ---- AVX2 / AVX-512 VNNI ------------------------------------------------------------------ */
#if GG_X86

#define GG_AVX2   __attribute__((target("avx2,fma,f16c")))
#define GG_VNNI   __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))
#define GG_INLINE static inline __attribute__((always_inline))
/* Blocks per row of the tiles' float scale arrays: nb padded to 8 (zeros) for 8-wide loads. */
#define GG_NBP(nb) (((size_t)(nb) + 7) & ~(size_t)7)
/* Widest VNNI Q8_0 tile, in tokens: 8 x 2 zmm accumulators + 8 token registers + the row
 * pair's weights, dot start and constants fit the 32 registers (7 and 8 tokens as one tile,
 * not 4 + 3 / 4 + 4: one thread, 512 x 2048 from cache, 1.85 -> 2.29 and 1.97 -> 2.44 block
 * dots per ns; 16 tokens as 8 + 8, not 6 + 5 + 5: 2.31 -> 2.40). */
#define GG_TV_MAX 8
/* Widest AVX2 Q8_0 tile, in tokens (GG_TILE_Q80), and the fewest tokens of a call from which
 * the tiles are at most 4 wide. 5 tokens (speculative verification of 4 drafts) run as one
 * 5-wide tile instead of 3 + 2: 2.58-2.73 cycles a pair against 2.78-3.17 (AMD Zen 3, 1
 * thread, 2048 columns, 43 MB of rows, alternated; the stream of bench_verify's gate weights,
 * 1 thread, 19.2-20.2 -> 17.8-18.5 ms in four alternations); so do the 3-wide tiles of 9, 10
 * and 13-15 tokens. From 16 tokens on (serving batches, prompts) 4-wide tiles: 120 tokens in
 * 5-wide ones measured 2.52-2.86 against 2.43-2.66. Below 16 tokens a 5-wide limit changes
 * only those splits (6 = 3 + 3, 7 = 4 + 3, 8 = 4 + 4, 11 = 4 + 4 + 3 either way). */
#define GG_T80_AVX2_MAX  5
#define GG_T80_AVX2_WIDE 16
/* Fewest tokens for which the VNNI Q8_0 tiles of a row group share its rows' scales and dot
 * starts (MODE 1 / 2 of GG_TILEV_Q80): every count that takes more than one tile. Measured
 * first with the 256-bit tiles of up to 6 tokens (one thread, block dots per ns, 2048- and
 * 768-element rows from cache, medians of 7, this against each tile forming its own): 8 tokens
 * (4 + 4) 2.14 -> 2.05 and 2.03 -> 2.01, 10 (5 + 5) 2.22 -> 2.14 and 2.13 -> 2.10, 12 (6 + 6)
 * 2.07 -> 2.21, 16 (6 + 5 + 5) 2.08 -> 2.24 (so from 12); with the zmm tiles of up to 8, 9
 * tokens (5 + 4) streamed from memory share too: 1B Q8_0 verify step of k = 8, 2 threads,
 * interleaved, 2.15-2.19 -> 2.07-2.13 single steps (100M, 10 tokens from L3: unchanged). */
#define GG_SAVE_MIN_TOK (GG_TV_MAX + 1)

#include "kernels/x86hsum.h"

GG_AVX2 GG_INLINE float gg_h2f(uint16_t h)
{
    return _cvtsh_ss(h);
}

/* Q4_1 quants as 32 unsigned bytes: low nibbles (elements 0..15), then high (16..31). */
GG_AVX2 GG_INLINE __m256i gg_nibbles(const uint8_t *qs)
{
    const __m128i t = _mm_loadu_si128((const __m128i *)qs);
    const __m256i b = _mm256_insertf128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
    return _mm256_and_si256(b, _mm256_set1_epi8(0x0F));
}

/* 8 lanes of exact int32 sums of 4 adjacent products u8 x s8 (ggml mul_sum_us8_pairs). */
GG_AVX2 GG_INLINE __m256i gg_us8_avx2(__m256i u, __m256i s)
{
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
GG_VNNI GG_INLINE __m256i gg_us8_vnni(__m256i u, __m256i s)
{
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
}

/* One block's float lanes for each type and ISA: (float)int lanes. */
#define GG_Q41_LANES(US8, wb, xb)                                                                  \
    _mm256_cvtepi32_ps(US8(gg_nibbles((wb)->qs), _mm256_loadu_si256((const __m256i *)(xb)->qs)))
#define GG_Q80_LANES(US8, wb, xb) _mm256_cvtepi32_ps(US8##_q80((wb)->qs, (xb)->qs))
/* |w| (unsigned) x sign(w)*x (signed): the products w*x exactly (|q| <= 127 here). */
GG_AVX2 GG_INLINE __m256i gg_us8_avx2_q80(const int8_t *wq, const int8_t *xq)
{
    const __m256i w = _mm256_loadu_si256((const __m256i *)wq);
    const __m256i x = _mm256_loadu_si256((const __m256i *)xq);
    return gg_us8_avx2(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}
GG_VNNI GG_INLINE __m256i gg_us8_vnni_q80(const int8_t *wq, const int8_t *xq)
{
    const __m256i w = _mm256_loadu_si256((const __m256i *)wq);
    const __m256i x = _mm256_loadu_si256((const __m256i *)xq);
    return gg_us8_vnni(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

/* Four independent pairs (w0,x0)..(w3,x3), each in ggml's order; out[k] gets pair k. */
#define GG_DOT4_Q41(NAME, ATTR, US8)                                                               \
    ATTR static void NAME(int64_t nb, const gg_q4_1 *const *w, const gg_q8_1 *const *x,            \
                          float *out)                                                              \
    {                                                                                              \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                \
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;                                          \
        const gg_q4_1 *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];                              \
        const gg_q8_1 *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];                              \
        for (int64_t b = 0; b < nb; ++b) {                                                         \
            s0 = fmaf(gg_h2f(w0[b].m), gg_h2f(x0[b].s), s0);                                       \
            s1 = fmaf(gg_h2f(w1[b].m), gg_h2f(x1[b].s), s1);                                       \
            s2 = fmaf(gg_h2f(w2[b].m), gg_h2f(x2[b].s), s2);                                       \
            s3 = fmaf(gg_h2f(w3[b].m), gg_h2f(x3[b].s), s3);                                       \
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(gg_h2f(w0[b].d) * gg_h2f(x0[b].d)),                \
                                 GG_Q41_LANES(US8, &w0[b], &x0[b]), a0);                           \
            a1 = _mm256_fmadd_ps(_mm256_set1_ps(gg_h2f(w1[b].d) * gg_h2f(x1[b].d)),                \
                                 GG_Q41_LANES(US8, &w1[b], &x1[b]), a1);                           \
            a2 = _mm256_fmadd_ps(_mm256_set1_ps(gg_h2f(w2[b].d) * gg_h2f(x2[b].d)),                \
                                 GG_Q41_LANES(US8, &w2[b], &x2[b]), a2);                           \
            a3 = _mm256_fmadd_ps(_mm256_set1_ps(gg_h2f(w3[b].d) * gg_h2f(x3[b].d)),                \
                                 GG_Q41_LANES(US8, &w3[b], &x3[b]), a3);                           \
        }                                                                                          \
        out[0] = tsr_hsum8_ps(a0) + s0;                                                            \
        out[1] = tsr_hsum8_ps(a1) + s1;                                                            \
        out[2] = tsr_hsum8_ps(a2) + s2;                                                            \
        out[3] = tsr_hsum8_ps(a3) + s3;                                                            \
    }

#define GG_DOT4_Q80(NAME, ATTR, US8)                                                               \
    ATTR static void NAME(int64_t nb, const gg_q8_0 *const *w, const gg_q8_0 *const *x,            \
                          float *out)                                                              \
    {                                                                                              \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                \
        const gg_q8_0 *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];                              \
        const gg_q8_0 *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];                              \
        for (int64_t b = 0; b < nb; ++b) {                                                         \
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(gg_h2f(w0[b].d) * gg_h2f(x0[b].d)),                \
                                 GG_Q80_LANES(US8, &w0[b], &x0[b]), a0);                           \
            a1 = _mm256_fmadd_ps(_mm256_set1_ps(gg_h2f(w1[b].d) * gg_h2f(x1[b].d)),                \
                                 GG_Q80_LANES(US8, &w1[b], &x1[b]), a1);                           \
            a2 = _mm256_fmadd_ps(_mm256_set1_ps(gg_h2f(w2[b].d) * gg_h2f(x2[b].d)),                \
                                 GG_Q80_LANES(US8, &w2[b], &x2[b]), a2);                           \
            a3 = _mm256_fmadd_ps(_mm256_set1_ps(gg_h2f(w3[b].d) * gg_h2f(x3[b].d)),                \
                                 GG_Q80_LANES(US8, &w3[b], &x3[b]), a3);                           \
        }                                                                                          \
        out[0] = tsr_hsum8_ps(a0);                                                                 \
        out[1] = tsr_hsum8_ps(a1);                                                                 \
        out[2] = tsr_hsum8_ps(a2);                                                                 \
        out[3] = tsr_hsum8_ps(a3);                                                                 \
    }

/* The row dots' prefetch of the next 4-row group: into L1 (prefetcht0) when the group is at
 * most GG_PF_L1_MAX_BYTES, else into L2 (tsr_prefetch_line_l2): a group near the L1's size
 * prefetched into it evicts itself before it is read. AMD EPYC (Zen 4, 32 KiB L1),
 * tests/bench_q80_gemv, Q8_0, 1 thread, GB/s of a ~33.5 read, T0 -> T1: 2048 columns (8.5 KiB
 * groups) 31-32 -> 22-23, 3072 (12.8 KiB) 30.1 -> 26.0, 4096 (17 KiB) 25.0 -> 29.2, 8192 (34
 * KiB) 15.4 -> 30.0 (2 threads 29.7 -> 56.1 of 63); the Intel Xeon measured before read 0.48
 * of a plain read with 34 KiB groups into L1. */
#define GG_PF_L1_MAX_BYTES 16384
GG_AVX2 GG_INLINE void gg_prefetch_group_line(const char *p, bool l2)
{
    if (l2)
        tsr_prefetch_line_l2(p);
    else
        _mm_prefetch(p, _MM_HINT_T0);
}

/* Decode GEMV of Q8_0: 4 consecutive rows r..r+3 (w, w + ws, ..) against one token, each
 * row in ggml's order (its own accumulator, blocks in order, scale fp16(d_w) * fp16(d_x)
 * with the token's scales converted once per call into xd), while the next 4 rows (the
 * 4 * ws bytes at pf, NULL for none) are prefetched into L1 (L2 for large groups, l2:
 * gg_prefetch_group_line): 4 interleaved row streams are not followed well by the hardware
 * prefetchers, the explicit prefetch one group ahead keeps the memory busy. */
#define GG_ROWS4_Q80(NAME, ATTR, US8)                                                              \
    ATTR static void NAME(int64_t nb, const uint8_t *w, size_t ws, const gg_q8_0 *x,               \
                          const float *xd, float *out, const uint8_t *pf, bool l2)                 \
    {                                                                                              \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                \
        const gg_q8_0 *w0 = (const gg_q8_0 *)w, *w1 = (const gg_q8_0 *)(w + ws);                   \
        const gg_q8_0 *w2 = (const gg_q8_0 *)(w + 2 * ws), *w3 = (const gg_q8_0 *)(w + 3 * ws);    \
        const uint8_t *pp = pf, *pend = pf;                                                        \
        for (int64_t b = 0; b < nb; ++b) {                                                         \
            if (pf) {                                                                              \
                pend += 4 * sizeof(gg_q8_0);                                                       \
                for (; pp < pend; pp += 64) gg_prefetch_group_line((const char *)pp, l2);          \
            }                                                                                      \
            const __m256 xs = _mm256_set1_ps(xd[b]);                                               \
            a0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(gg_h2f(w0[b].d)), xs),               \
                                 GG_Q80_LANES(US8, &w0[b], &x[b]), a0);                            \
            a1 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(gg_h2f(w1[b].d)), xs),               \
                                 GG_Q80_LANES(US8, &w1[b], &x[b]), a1);                            \
            a2 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(gg_h2f(w2[b].d)), xs),               \
                                 GG_Q80_LANES(US8, &w2[b], &x[b]), a2);                            \
            a3 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(gg_h2f(w3[b].d)), xs),               \
                                 GG_Q80_LANES(US8, &w3[b], &x[b]), a3);                            \
        }                                                                                          \
        out[0] = tsr_hsum8_ps(a0);                                                                 \
        out[1] = tsr_hsum8_ps(a1);                                                                 \
        out[2] = tsr_hsum8_ps(a2);                                                                 \
        out[3] = tsr_hsum8_ps(a3);                                                                 \
    }

/* The same for Q4_1 (x: Q8_1 with its d and s converted once per call into xd, xs). */
#define GG_ROWS4_Q41(NAME, ATTR, US8)                                                              \
    ATTR static void NAME(int64_t nb, const uint8_t *w, size_t ws, const gg_q8_1 *x,               \
                          const float *xd, const float *xsm, float *out, const uint8_t *pf,        \
                          bool l2)                                                                 \
    {                                                                                              \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                \
        __m256 sv = a0; /* odd lanes: the 4 rows' summs */                                         \
        const gg_q4_1 *w0 = (const gg_q4_1 *)w, *w1 = (const gg_q4_1 *)(w + ws);                   \
        const gg_q4_1 *w2 = (const gg_q4_1 *)(w + 2 * ws), *w3 = (const gg_q4_1 *)(w + 3 * ws);    \
        const uint8_t *pp = pf, *pend = pf;                                                        \
        for (int64_t b = 0; b < nb; ++b) {                                                         \
            if (pf) {                                                                              \
                pend += 4 * sizeof(gg_q4_1);                                                       \
                for (; pp < pend; pp += 64) gg_prefetch_group_line((const char *)pp, l2);          \
            }                                                                                      \
            /* the 4 rows' (d, m) fp16 pairs converted in one step: lanes d0 m0 d1 m1 .. */        \
            uint32_t dm[4];                                                                        \
            memcpy(&dm[0], &w0[b], 4), memcpy(&dm[1], &w1[b], 4);                                  \
            memcpy(&dm[2], &w2[b], 4), memcpy(&dm[3], &w3[b], 4);                                  \
            const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dm));                \
            /* odd lanes: summs_r = fma(m_r, s_x, summs_r), each lane the scalar chain's fmaf */   \
            sv = _mm256_fmadd_ps(f, _mm256_set1_ps(xsm[b]), sv);                                   \
            /* even lanes: fp16(d_r) * fp16(d_x) */                                                \
            const __m256 dd = _mm256_mul_ps(f, _mm256_set1_ps(xd[b]));                             \
            const __m256i qx = _mm256_loadu_si256((const __m256i *)x[b].qs);                       \
            a0 = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(dd, _mm256_set1_epi32(0)),               \
                                 _mm256_cvtepi32_ps(US8(gg_nibbles(w0[b].qs), qx)), a0);           \
            a1 = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(dd, _mm256_set1_epi32(2)),               \
                                 _mm256_cvtepi32_ps(US8(gg_nibbles(w1[b].qs), qx)), a1);           \
            a2 = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(dd, _mm256_set1_epi32(4)),               \
                                 _mm256_cvtepi32_ps(US8(gg_nibbles(w2[b].qs), qx)), a2);           \
            a3 = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(dd, _mm256_set1_epi32(6)),               \
                                 _mm256_cvtepi32_ps(US8(gg_nibbles(w3[b].qs), qx)), a3);           \
        }                                                                                          \
        float sl[8];                                                                               \
        _mm256_storeu_ps(sl, sv);                                                                  \
        const float s0 = sl[1], s1 = sl[3], s2 = sl[5], s3 = sl[7];                                \
        out[0] = tsr_hsum8_ps(a0) + s0;                                                            \
        out[1] = tsr_hsum8_ps(a1) + s1;                                                            \
        out[2] = tsr_hsum8_ps(a2) + s2;                                                            \
        out[3] = tsr_hsum8_ps(a3) + s3;                                                            \
    }

/* Register tiles for several tokens: 4 rows x T tokens (T = 1..4) per call, each pair
 * (row, token) in ggml's order with its own accumulator: acc[r][t] = fma(dw[r][b] * dx[t][b],
 * float(lanes), acc[r][t]) for b in order, hsum8 at the end (+ Q4_1's summs, its own fma
 * chain per pair). The weight block is loaded once for the T tokens and the activation
 * block once for the 4 rows (the AVX2 Q8_0 tile: once per row, GG_TILE_Q80); scales come
 * as floats (dw: the 4 rows' [nb], dx: each token's [nb]), converted once per row group / per
 * call. Row pointers: rows past the matrix repeat
 * the last one (computed, not stored: y gets nr rows). pf: the next row group (4 rows of
 * ws bytes) to prefetch over the K loop, or NULL.
 *
 * The integer lanes are exact in every form: VNNI uses (x + 128) as the unsigned operand and
 * the weight as the signed one, starting each dot at -128 * (the weights' 4-sums), so
 * sum((x + 128) * w) - 128 * sum(w) = sum(x * w) (every byte value, no saturation); AVX2
 * keeps ggml's sign trick (|w| x sign(x, w) through vpmaddubsw, exact for |w|, |x| <= 127). */
#define GG_TILE_HEAD(T)                                                                            \
    __m256 acc[4][T];                                                                              \
    _Pragma("GCC unroll 4") for (int r = 0; r < 4; ++r)                                            \
        _Pragma("GCC unroll 8") for (int t = 0; t < (T); ++t) acc[r][t] = _mm256_setzero_ps();     \
    const uint8_t *pp = pf, *pend = pf

/* The tile's end: each (row, token) chain's 8 lanes summed into y, rows past nr dropped
 * (constant indices only, unrolled, so acc stays in registers in the loop before it). */
#define GG_TILE_STORE(T)                                                                           \
    _Pragma("GCC unroll 4") for (int r = 0; r < 4; ++r)                                            \
        _Pragma("GCC unroll 8") for (int t = 0; t < (T); ++t)                                      \
    {                                                                                              \
        const float v = tsr_hsum8_ps(acc[r][t]);                                                   \
        if (r < nr) y[(size_t)t * ys + r] = v;                                                     \
    }

/* The next row group prefetched into L1 over the K loop (the Q4_1 and AVX2 tiles; the VNNI
 * Q8_0 tile issues its lines one at a time into L2, below). */
#define GG_TILE_PREFETCH(BLK)                                                                      \
    if (pf) {                                                                                      \
        pend += 4 * sizeof(BLK);                                                                   \
        for (; pp < pend; pp += 64) _mm_prefetch((const char *)pp, _MM_HINT_T0);                   \
    }

/* The pairs' scale products dd[r][t][j] = dw[r][b0 + j] * dx[t][b0 + j] for 8 blocks from b0
 * (the same single rounding as one product per pair and block, 8 at a time; rows of dw and dx
 * padded to GG_NBP(nb)), and the loop over those blocks (b = b0 + j). */
#define GG_DD_CHUNK(T)                                                                             \
    const int m = nb - b0 < 8 ? (int)(nb - b0) : 8;                                                \
    _Pragma("GCC unroll 4") for (int r = 0; r < 4; ++r)                                            \
    {                                                                                              \
        const __m256 sw_ = _mm256_loadu_ps(dw + (size_t)r * GG_NBP(nb) + b0);                      \
        _Pragma("GCC unroll 8") for (int t = 0; t < (T); ++t)                                      \
            _mm256_store_ps(dd[r][t], _mm256_mul_ps(sw_, _mm256_loadu_ps(dx[t] + b0)));            \
    }

/* The AVX2 Q8_0 tile, 4 rows x T tokens (T = 1..4). Each token's quants are loaded where
 * they are used, once per row (an asm load gcc cannot hoist): kept in registers beside the
 * 4 x T accumulators, |w| and the temporaries they made gcc spill accumulators (load, FMA,
 * store per pair from 4 x 3 on), and 4 x 4 spilled so much that the tiles stopped at 3; per
 * use they cost a load, which the load ports absorb, and no vector op. Same ops, same bits:
 * 1 thread, 2048 columns streaming 36-142 MB, best of 5-9, alternated, block dots per ns,
 * AMD Zen 3: 3-token tiles of this form equal the register form's (1.00-1.07 both), and
 * 4-token tiles (2 + 2 -> 4, 3 + 3 + 2 -> 4 + 4, 3 + 3 + 3 + 3 + 2 + 2 -> 4 x 4) give 4
 * tokens 1.01-1.04 -> 1.12-1.16, 8 1.09-1.16 -> 1.16-1.23, 16 1.10-1.18 -> 1.21-1.25, 128
 * +2-5 % in three runs of four (-2 % in one); 768 columns (the 100M shape) 4 tokens
 * 1.01-1.02 -> 1.09-1.10, 8 1.02-1.10 -> 1.08-1.10, 16 1.08-1.13 -> 1.12-1.20. */
#define GG_TILE_Q80(NAME, T)                                                                       \
    GG_AVX2 static void NAME(int64_t nb, const uint8_t *const *wr, const uint8_t *const *xr,       \
                             const float *dw, const float *const *dx, float *y, size_t ys, int nr, \
                             const uint8_t *pf)                                                    \
    {                                                                                              \
        GG_TILE_HEAD(T);                                                                           \
        float dd[4][T][8] __attribute__((aligned(32)));                                            \
        for (int64_t b0 = 0; b0 < nb; b0 += 8) {                                                   \
            GG_DD_CHUNK(T)                                                                         \
            for (int j = 0; j < m; ++j) {                                                          \
                const int64_t b = b0 + j;                                                          \
                GG_TILE_PREFETCH(gg_q8_0)                                                          \
                /* row by row: one row's weight registers live beside the accumulators */          \
                _Pragma("GCC unroll 4") for (int r = 0; r < 4; ++r)                                \
                {                                                                                  \
                    const __m256i wq =                                                             \
                        _mm256_loadu_si256((const __m256i *)((const gg_q8_0 *)wr[r])[b].qs);       \
                    const __m256i wa = _mm256_sign_epi8(wq, wq); /* |w| */                         \
                    _Pragma("GCC unroll 8") for (int t = 0; t < (T); ++t)                          \
                    {                                                                              \
                        __m256i xq;                                                                \
                        __asm__("vmovdqu %1, %0"                                                   \
                                : "=x"(xq)                                                         \
                                : "m"(*(const __m256i *)((const gg_q8_0 *)xr[t])[b].qs));          \
                        const __m256i l =                                                          \
                            _mm256_madd_epi16(_mm256_maddubs_epi16(wa, _mm256_sign_epi8(xq, wq)),  \
                                              _mm256_set1_epi16(1));                               \
                        acc[r][t] = _mm256_fmadd_ps(_mm256_broadcast_ss(&dd[r][t][j]),             \
                                                    _mm256_cvtepi32_ps(l), acc[r][t]);             \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        GG_TILE_STORE(T);                                                                          \
    }

/* The fp16 scales d of 8 consecutive Q8_0 blocks (m < 8: the first m, the rest 0), read from
 * the weights themselves as the tile reaches them (a separate pass over a row group's scales
 * before its tile waited on the memory the tile's prefetch had not brought yet). Whole chunks:
 * the 272 bytes as four 64-byte loads, d of block k at 16-bit word 17k picked by two vpermt2w
 * (blocks 0-3 from the first 128 bytes, 4-7 from the next 128). */
/* The same on AVX2: whole chunks packed in two general registers (eight 16-bit loads, shifts
 * and ors: cheap scalar ops beside the vector work), a partial one through a zeroed array. */
GG_AVX2 GG_INLINE __m128i gg_row_h8_avx2(const gg_q8_0 *w, int m)
{
    if (m == 8) {
        const uint64_t lo = (uint64_t)w[0].d | (uint64_t)w[1].d << 16 | (uint64_t)w[2].d << 32 |
                            (uint64_t)w[3].d << 48;
        const uint64_t hi = (uint64_t)w[4].d | (uint64_t)w[5].d << 16 | (uint64_t)w[6].d << 32 |
                            (uint64_t)w[7].d << 48;
        return _mm_insert_epi64(_mm_cvtsi64_si128((long long)lo), (long long)hi, 1);
    }
    uint16_t h[8] = {0};
    for (int k = 0; k < m; ++k) h[k] = w[k].d;
    return _mm_loadu_si128((const __m128i *)h);
}

GG_VNNI GG_INLINE __m128i gg_row_h8(const gg_q8_0 *w, int m)
{
    if (m == 8) {
        const uint8_t *p = (const uint8_t *)w;
        static const uint16_t k_idx[32] = {0, 17, 34, 51, 4, 21, 38, 55};
        const __m512i idx = _mm512_loadu_si512(k_idx);
        const __m512i lo =
            _mm512_permutex2var_epi16(_mm512_loadu_si512(p), idx, _mm512_loadu_si512(p + 64));
        const __m512i hi = _mm512_permutex2var_epi16(_mm512_loadu_si512(p + 128), idx,
                                                     _mm512_loadu_si512(p + 192));
        return _mm512_castsi512_si128(_mm512_mask_mov_epi16(lo, 0xF0, hi));
    }
    return gg_row_h8_avx2(w, m);
}

#define GG_VBMI                                                                                    \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni,avx512vbmi")))
/* Two rows' fp16 scales of 8 consecutive blocks interleaved ({row a, row b} per block, 16
 * halves) as floats. VBMI (vpermt2b: one uop, where vpermt2w is three on Intel cores): each
 * row's 272 bytes as four 64-byte loads, four byte permutes placing d of block k (bytes 34k,
 * 34k + 1) at word 2k (row a) or 2k + 1 (row b), zeroing the rest, and two ORs; else
 * gg_row_h8 per row and an unpack. m < 8: the first m blocks, the rest 0. */
#define GG_PAIR_D16(NAME, ATTR, VBMI)                                                              \
    ATTR GG_INLINE __m512 NAME(const gg_q8_0 *wa_, const gg_q8_0 *wb_, int m)                      \
    {                                                                                              \
        if (VBMI && m == 8) {                                                                      \
            const uint8_t *a = (const uint8_t *)wa_, *b = (const uint8_t *)wb_;                    \
            /* bytes 4k + {0, 1} (row a) / 4k + {2, 3} (row b) take d of block k: from the         \
             * first 128 bytes (offset 34k) for k < 4, from the next 128 (34k - 128) for k >= 4 */ \
            static const uint8_t k_i[64] = {0,  1,   0,   1,   34,  35, 34,  35,  68,  69, 68,     \
                                            69, 102, 103, 102, 103, 8,  9,   8,   9,   42, 43,     \
                                            42, 43,  76,  77,  76,  77, 110, 111, 110, 111};       \
            const __m512i idx = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)k_i));  \
            const __mmask64 lo = 0x3333, hi = 0x33330000, lo_b = lo << 2, hi_b = hi << 2;          \
            const __m512i a0 = _mm512_maskz_permutex2var_epi8(lo, _mm512_loadu_si512(a), idx,      \
                                                              _mm512_loadu_si512(a + 64));         \
            const __m512i a1 = _mm512_maskz_permutex2var_epi8(hi, _mm512_loadu_si512(a + 128),     \
                                                              idx, _mm512_loadu_si512(a + 192));   \
            const __m512i b0 = _mm512_maskz_permutex2var_epi8(lo_b, _mm512_loadu_si512(b), idx,    \
                                                              _mm512_loadu_si512(b + 64));         \
            const __m512i b1 = _mm512_maskz_permutex2var_epi8(hi_b, _mm512_loadu_si512(b + 128),   \
                                                              idx, _mm512_loadu_si512(b + 192));   \
            const __m512i d = _mm512_or_si512(_mm512_ternarylogic_epi32(a0, a1, b0, 0xFE), b1);    \
            return _mm512_cvtph_ps(_mm512_castsi512_si256(d));                                     \
        }                                                                                          \
        const __m128i h0 = gg_row_h8(wa_, m), h1 = gg_row_h8(wb_, m);                              \
        return _mm512_cvtph_ps(                                                                    \
            _mm256_set_m128i(_mm_unpackhi_epi16(h0, h1), _mm_unpacklo_epi16(h0, h1)));             \
    }
GG_PAIR_D16(gg_pair_d16, GG_VNNI, 0)
GG_PAIR_D16(gg_pair_d16_vbmi, GG_VBMI, 1)

/* The Q8_0 tile with VNNI, 4 rows x T tokens (T = 1..GG_TV_MAX), each pair in ggml's order as
 * above, in 512-bit registers: a zmm holds two rows' 8-lane chains for one token, interleaved
 * (lane 2i: row 2p's lane i, lane 2i+1: row 2p+1's), so one vpdpbusd, float conversion and
 * FMA serve two pairs. Intel cores with two 512-bit FMA ports (this host: Sapphire Rapids class)
 * issue the three at two per cycle in either width, so the 512-bit form does twice the lanes per
 * instruction (1 thread, microbenchmark: vpdpbusd + vcvtdq2ps + FMA 2.6 per ns in ymm, 2.3 per
 * ns in zmm = 4.7 ymm-equivalents). The operands:
 *  - xd[b * xn + t]: token t's block b, its 32 quants + 128 (unsigned), each 4-byte group
 *    twice (64 bytes), formed once per call (gg_tile_q80_vnni), so no per-block xor or
 *    shuffle for tokens; token-interleaved, so the tile reads every token from one base (one
 *    pointer per token kept GCC spilling them to xmm registers);
 *  - W: rows 2p and 2p+1 of block b interleaved by 4-byte groups, one vpermt2d per row pair;
 *  - the dot start TSR_I2F_MAGIC_I - 128 x the weights' 4-sums (sum((x + 128) w) -
 *    128 sum(w) = sum(x w), exact for every byte value), one vpdpbusd + vpsubd per row pair
 *    and block; the dots leave it as floats by one vsubps (kernels/x86hsum.h; |dot| <=
 *    4 x 128 x 128 < 2^22), not vcvtdq2ps: with port 0 taking every vpdpbusd, the three ops
 *    per vpdpbusd spread over ports 0 and 5 (1.5 cycles, the bound of this order: a bare loop
 *    of the three reaches 1.6 here, this tile from L2 2.3-2.7 with 16 tokens and 2.8-3.2
 *    with 5, from memory 2.8-2.9 and 4.4-4.6 (1 thread) — tests/bench_tile; the dot starts,
 *    the scale products and the permute below are the rest: ~15, ~12 and 5-7 % in a
 *    microbenchmark of the 8-token tile from L1; an unsigned-weights form with per-token dot
 *    starts in the prep measured no faster). bench_verify, 1 thread, from cache, three
 *    interleaved runs, block dots per ns: 5 tokens 2.03-2.21 -> 2.24-2.39, 8 tokens
 *    2.29-2.47 -> 2.38-2.56;
 *  - the pairs' scales fp16(d_w) * fp16(d_x) (the same single rounding), 8 blocks at a time as
 *    {row 2p, row 2p+1} float pairs, each FMA taking its pair as a 64-bit broadcast load.
 * The rows' scales come from the weights chunk by chunk (gg_pair_d16); the next group is
 * prefetched into L2 (L1 holds this group, the tokens' blocks and dd), three lines a block,
 * one beside each row pair's work and one after, each from a register of its own
 * (tsr_prefetch_line_l2; a loop of 2-3 folded-offset prefetches before the block until
 * 2026-12-06: bench_verify, 2 threads, streaming, 5 tokens 28.3-28.5 -> 26.5-27.1 ms, 2 tokens
 * 23.9-24.6 -> 21.6-23.0; 1B Q8_0 prefill 118 -> 126 tok/s). Against the 256-bit tile
 * (one token's chain per ymm, up to 6 tokens), bench_verify, one thread, 512 x 2048 from cache,
 * block dots per ns: 4 tokens 1.42 -> 2.06, 5 tokens 1.47-1.51 -> 2.31, 6 tokens 1.55-1.61 ->
 * 2.44. Tried and not faster here: the next chunk's scales formed a chunk ahead (double-buffered
 * dd: 2.19 -> 2.08), the prefetch issued per chunk instead of per block (2.14 -> 2.03), the next
 * group but one prefetched (streamed verify step unchanged). Left: without the prefetch the
 * 5-token tile runs 8% faster from cache and without the scale extraction 15% (the inner loop
 * alone, from L1: 3.3 block dots per ns).
 * MODE: a row group's tokens in more than one tile (GG_SAVE_MIN_TOK+ tokens: a 16-sequence
 * decode step, prompts) form the rows' float scales and dot starts once: the group's first
 * tile (MODE 1) saves them to dwb ([2][2 GG_NBP(nb)] floats, row pairs interleaved) and wab
 * ([2][nb] zmm), the later ones (MODE 2) load them; MODE 0: one tile, nothing saved. */
#define GG_TILEV_Q80(NAME, T, MODE, ATTR, PAIR_D16)                                                \
    ATTR static void NAME(int64_t nb, const uint8_t *const *wr, const __m512i *xd, size_t xn,      \
                          float *dwb, __m512i *wab, const float *dx2, float *y, size_t ys, int nr, \
                          const uint8_t *pf)                                                       \
    {                                                                                              \
        __m512 acc[2][T];                                                                          \
        _Pragma("GCC unroll 2") for (int p = 0; p < 2; ++p)                                        \
            _Pragma("GCC unroll 8") for (int t = 0; t < (T); ++t) acc[p][t] = _mm512_setzero_ps(); \
        const gg_q8_0 *w[4] = {(const gg_q8_0 *)wr[0], (const gg_q8_0 *)wr[1],                     \
                               (const gg_q8_0 *)wr[2], (const gg_q8_0 *)wr[3]};                    \
        double dd[2][T][8] __attribute__((aligned(64))); /* float pairs {row 2p, row 2p + 1} */    \
        const __m512i k80 = _mm512_set1_epi8(-128);                                                \
        const __m512i kmi = _mm512_set1_epi32(TSR_I2F_MAGIC_I);                                    \
        const __m512 kmf = _mm512_set1_ps(TSR_I2F_MAGIC_F);                                        \
        const __m512i il =                                                                         \
            _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);              \
        for (int64_t b0 = 0; b0 < nb; b0 += 8) {                                                   \
            const int m = nb - b0 < 8 ? (int)(nb - b0) : 8;                                        \
            _Pragma("GCC unroll 2") for (int p = 0; p < 2; ++p)                                    \
            {                                                                                      \
                __m512 sw_; /* {d(row 2p, b), d(row 2p + 1, b)} for b = b0..b0 + 7 */              \
                if ((MODE) == 2) {                                                                 \
                    sw_ = _mm512_loadu_ps(dwb + (size_t)p * 2 * GG_NBP(nb) + 2 * b0);              \
                } else {                                                                           \
                    sw_ = PAIR_D16(w[2 * p] + b0, w[2 * p + 1] + b0, m);                           \
                    if ((MODE) == 1)                                                               \
                        _mm512_storeu_ps(dwb + (size_t)p * 2 * GG_NBP(nb) + 2 * b0, sw_);          \
                }                                                                                  \
                _Pragma("GCC unroll 8") for (int t = 0; t < (T); ++t) _mm512_store_ps(             \
                    (float *)dd[p][t],                                                             \
                    _mm512_mul_ps(sw_, _mm512_loadu_ps(dx2 + ((size_t)b0 / 8 * xn + t) * 16)));    \
            }                                                                                      \
            for (int j = 0; j < m; ++j) {                                                          \
                const int64_t b = b0 + j;                                                          \
                /* the next group's block b (4 x 34 bytes) as three lines, one beside each row     \
                 * pair's work and one after (tsr_prefetch_line_l2) */                             \
                const char *pfb = pf ? (const char *)pf + 4 * sizeof(gg_q8_0) * (size_t)b : NULL;  \
                __m512i xq[T];                                                                     \
                _Pragma("GCC unroll 8") for (int t = 0; t < (T); ++t) xq[t] =                      \
                    _mm512_load_si512(xd + (size_t)b * xn + t);                                    \
                _Pragma("GCC unroll 2") for (int p = 0; p < 2; ++p)                                \
                {                                                                                  \
                    if (pfb) tsr_prefetch_line_l2(pfb + 64 * p);                                   \
                    const __m512i wq = _mm512_permutex2var_epi32(                                  \
                        _mm512_castsi256_si512(                                                    \
                            _mm256_loadu_si256((const __m256i *)w[2 * p][b].qs)),                  \
                        il,                                                                        \
                        _mm512_castsi256_si512(                                                    \
                            _mm256_loadu_si256((const __m256i *)w[2 * p + 1][b].qs)));             \
                    __m512i wa;                                                                    \
                    if ((MODE) == 2) {                                                             \
                        wa = _mm512_load_si512(wab + (size_t)p * nb + b);                          \
                    } else {                                                                       \
                        wa = _mm512_sub_epi32(                                                     \
                            kmi, _mm512_dpbusd_epi32(_mm512_setzero_si512(), k80, wq));            \
                        if ((MODE) == 1) _mm512_store_si512(wab + (size_t)p * nb + b, wa);         \
                    }                                                                              \
                    _Pragma("GCC unroll 8") for (int t = 0; t < (T); ++t) acc[p][t] =              \
                        _mm512_fmadd_ps(                                                           \
                            _mm512_castpd_ps(_mm512_set1_pd(dd[p][t][j])),                         \
                            _mm512_sub_ps(_mm512_castsi512_ps(_mm512_dpbusd_epi32(wa, xq[t], wq)), \
                                          kmf),                                                    \
                            acc[p][t]);                                                            \
                }                                                                                  \
                if (pfb) tsr_prefetch_line_l2(pfb + 128);                                          \
            }                                                                                      \
        }                                                                                          \
        /* both rows' hsum8 at once (row 2p in the even lanes, 2p + 1 in the odd) */               \
        _Pragma("GCC unroll 2") for (int p = 0; p < 2; ++p)                                        \
            _Pragma("GCC unroll 8") for (int t = 0; t < (T); ++t)                                  \
        {                                                                                          \
            float v0, v1;                                                                          \
            tsr_hsum8_pair_ps(acc[p][t], &v0, &v1);                                                \
            if (2 * p < nr) y[(size_t)t * ys + 2 * p] = v0;                                        \
            if (2 * p + 1 < nr) y[(size_t)t * ys + 2 * p + 1] = v1;                                \
        }                                                                                          \
    }
/* The fp16 d of 8 consecutive Q8_0 blocks of a row (m < 8: gg_row_h8) as eight 16-bit loads
 * inserted into one vector: on AMD Zen 4 cheaper than gg_row_h8's two vpermt2w (the ymm tile
 * below, 5 tokens from L2, 1 thread: 1.10 -> 1.18 vpdpbusd-pairs per ns). */
GG_VNNI GG_INLINE __m128i gg_row_h8_ins(const gg_q8_0 *w, int m)
{
    if (m != 8) return gg_row_h8(w, m);
    return _mm_setr_epi16((short)w[0].d, (short)w[1].d, (short)w[2].d, (short)w[3].d, (short)w[4].d,
                          (short)w[5].d, (short)w[6].d, (short)w[7].d);
}

/* The Q8_0 tile with VNNI in 256-bit registers, 4 rows x T tokens (T = 1..GG_TY_MAX), each
 * (row, token) chain in ggml's order in one ymm: the same exact lanes (the dot start
 * TSR_I2F_MAGIC_I - 128 x the weights' 4-sums, vpdpbusd of the token's quants + 128 and the
 * weights, vsubps of the magic), the same scale product fp16(d_w) * fp16(d_x) and FMA per block
 * as GG_TILEV_Q80, so the same bits. Why a second form: AMD Zen 4 executes a 512-bit op as two
 * 256-bit halves, so a zmm holding two rows' chains does no more work per cycle than two ymm,
 * and the zmm tile's vpermt2d interleaving the row pair costs there (about a tenth of the
 * 5-token tile). This one reads each row's block with one plain load, each token's with a load
 * and an xor (once for the 4 rows), and the scales of the tokens from the prep's dx2 (its
 * duplicated {d, d} pairs narrowed by vpmovqd). Measured on the AMD EPYC (Zen 4) host,
 * tests/bench_tile, 2048 columns, 1 thread, vpdpbusd-pairs per ns, zmm -> ymm: from L2 2
 * tokens 0.73 -> 0.89, 5 tokens 0.91 -> 1.18, 8 tokens 1.00 -> 1.13, 16 tokens 1.09 -> 1.13;
 * streaming 5 tokens 0.87 -> 1.08. Tried there and not faster: weights made unsigned with
 * per-token dot starts from memory (0.88 at 5 tokens), the next chunk's scales formed a chunk
 * ahead (1.10 against 1.12). The scale products are what is left (without them 1.35).
 * MODE as GG_TILEV_Q80's, the saved forms here wab [4][nb] ymm (a row's dot starts) and dwb
 * [4][GG_NBP(nb)] floats (a row's scales): the same bytes as the zmm tiles'. */
#define GG_TY_MAX 5
#define GG_TILEY_Q80(NAME, T, MODE)                                                                \
    GG_VNNI static void NAME(int64_t nb, const uint8_t *const *wr, const uint8_t *x, size_t xs,    \
                             const float *dx2, size_t xn, float *dwb, __m256i *wab, float *y,      \
                             size_t ys, int nr, const uint8_t *pf)                                 \
    {                                                                                              \
        __m256 acc[4][T];                                                                          \
        _Pragma("GCC unroll 4") for (int r = 0; r < 4; ++r)                                        \
            _Pragma("GCC unroll 8") for (int t = 0; t < (T); ++t) acc[r][t] = _mm256_setzero_ps(); \
        const gg_q8_0 *w[4] = {(const gg_q8_0 *)wr[0], (const gg_q8_0 *)wr[1],                     \
                               (const gg_q8_0 *)wr[2], (const gg_q8_0 *)wr[3]};                    \
        float dd[4][T][8] __attribute__((aligned(32)));                                            \
        const __m256i k80 = _mm256_set1_epi8(-128);                                                \
        const __m256i kmi = _mm256_set1_epi32(TSR_I2F_MAGIC_I);                                    \
        const __m256 kmf = _mm256_set1_ps(TSR_I2F_MAGIC_F);                                        \
        for (int64_t b0 = 0; b0 < nb; b0 += 8) {                                                   \
            const int m = nb - b0 < 8 ? (int)(nb - b0) : 8;                                        \
            __m256 dxt[T];                                                                         \
            _Pragma("GCC unroll 8") for (int t = 0; t < (T); ++t) dxt[t] = _mm256_castsi256_ps(    \
                _mm512_cvtepi64_epi32(_mm512_loadu_si512(dx2 + ((size_t)b0 / 8 * xn + t) * 16)));  \
            _Pragma("GCC unroll 4") for (int r = 0; r < 4; ++r)                                    \
            {                                                                                      \
                __m256 sw_; /* d(row r, b) for b = b0..b0 + 7 */                                   \
                if ((MODE) == 2) {                                                                 \
                    sw_ = _mm256_loadu_ps(dwb + (size_t)r * GG_NBP(nb) + b0);                      \
                } else {                                                                           \
                    sw_ = _mm256_cvtph_ps(gg_row_h8_ins(w[r] + b0, m));                            \
                    if ((MODE) == 1) _mm256_storeu_ps(dwb + (size_t)r * GG_NBP(nb) + b0, sw_);     \
                }                                                                                  \
                _Pragma("GCC unroll 8") for (int t = 0; t < (T); ++t)                              \
                    _mm256_store_ps(dd[r][t], _mm256_mul_ps(sw_, dxt[t]));                         \
            }                                                                                      \
            for (int j = 0; j < m; ++j) {                                                          \
                const int64_t b = b0 + j;                                                          \
                /* the next group's block b (4 x 34 bytes) as three lines, as the zmm tile's */    \
                const char *pfb = pf ? (const char *)pf + 4 * sizeof(gg_q8_0) * (size_t)b : NULL;  \
                __m256i xq[T];                                                                     \
                _Pragma("GCC unroll 8") for (int t = 0; t < (T); ++t) xq[t] = _mm256_xor_si256(    \
                    _mm256_loadu_si256(                                                            \
                        (const __m256i *)((const gg_q8_0 *)(x + (size_t)t * xs))[b].qs),           \
                    k80);                                                                          \
                _Pragma("GCC unroll 4") for (int r = 0; r < 4; ++r)                                \
                {                                                                                  \
                    if (pfb && (r & 1) == 0) tsr_prefetch_line_l2(pfb + 32 * r);                   \
                    const __m256i wq = _mm256_loadu_si256((const __m256i *)w[r][b].qs);            \
                    __m256i wa;                                                                    \
                    if ((MODE) == 2) {                                                             \
                        wa = _mm256_load_si256(wab + (size_t)r * nb + b);                          \
                    } else {                                                                       \
                        wa = _mm256_sub_epi32(                                                     \
                            kmi, _mm256_dpbusd_epi32(_mm256_setzero_si256(), k80, wq));            \
                        if ((MODE) == 1) _mm256_store_si256(wab + (size_t)r * nb + b, wa);         \
                    }                                                                              \
                    _Pragma("GCC unroll 8") for (int t = 0; t < (T); ++t) acc[r][t] =              \
                        _mm256_fmadd_ps(                                                           \
                            _mm256_broadcast_ss(&dd[r][t][j]),                                     \
                            _mm256_sub_ps(_mm256_castsi256_ps(_mm256_dpbusd_epi32(wa, xq[t], wq)), \
                                          kmf),                                                    \
                            acc[r][t]);                                                            \
                }                                                                                  \
                if (pfb) tsr_prefetch_line_l2(pfb + 128);                                          \
            }                                                                                      \
        }                                                                                          \
        GG_TILE_STORE(T);                                                                          \
    }

/* Q4_1 x Q8_1: nibbles (unsigned) x activation quants (signed) need no trick; summs per pair
 * in a 4-lane vector per row (lane t: fma(m_w, s_t, summs) exactly as the scalar chain), sx
 * holding the T tokens' s of block b side by side at sx + 4 * b. */
#define GG_TILE_Q41(NAME, ATTR, T, VNNI)                                                           \
    ATTR static void NAME(int64_t nb, const uint8_t *const *wr, const uint8_t *const *xr,          \
                          const float *dw, const float *const *dx, const float *mw,                \
                          const float *sx, float *y, size_t ys, int nr, const uint8_t *pf)         \
    {                                                                                              \
        GG_TILE_HEAD(T);                                                                           \
        __m128 sm[4] = {_mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps()};   \
        float dd[4][T][8] __attribute__((aligned(32)));                                            \
        for (int64_t b0 = 0; b0 < nb; b0 += 8) {                                                   \
            GG_DD_CHUNK(T)                                                                         \
            for (int j = 0; j < m; ++j) {                                                          \
                const int64_t b = b0 + j;                                                          \
                GG_TILE_PREFETCH(gg_q4_1)                                                          \
                __m256i wq[4], xq[T];                                                              \
                const __m128 sxb = _mm_loadu_ps(sx + 4 * b);                                       \
                _Pragma("GCC unroll 4") for (int r = 0; r < 4; ++r)                                \
                {                                                                                  \
                    wq[r] = gg_nibbles(((const gg_q4_1 *)wr[r])[b].qs);                            \
                    sm[r] = _mm_fmadd_ps(_mm_broadcast_ss(mw + (size_t)r * GG_NBP(nb) + b), sxb,   \
                                         sm[r]);                                                   \
                }                                                                                  \
                _Pragma("GCC unroll 4") for (int t = 0; t < (T); ++t) xq[t] =                      \
                    _mm256_loadu_si256((const __m256i *)((const gg_q8_1 *)xr[t])[b].qs);           \
                _Pragma("GCC unroll 4") for (int r = 0; r < 4; ++r)                                \
                {                                                                                  \
                    _Pragma("GCC unroll 4") for (int t = 0; t < (T); ++t)                          \
                    {                                                                              \
                        __m256i l;                                                                 \
                        if (VNNI)                                                                  \
                            l = GG_DPBUSD(_mm256_setzero_si256(), wq[r], xq[t]);                   \
                        else                                                                       \
                            l = _mm256_madd_epi16(_mm256_maddubs_epi16(wq[r], xq[t]),              \
                                                  _mm256_set1_epi16(1));                           \
                        acc[r][t] = _mm256_fmadd_ps(_mm256_broadcast_ss(&dd[r][t][j]),             \
                                                    _mm256_cvtepi32_ps(l), acc[r][t]);             \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        _Pragma("GCC unroll 4") for (int r = 0; r < 4; ++r)                                        \
        {                                                                                          \
            float s4[4];                                                                           \
            _mm_storeu_ps(s4, sm[r]);                                                              \
            _Pragma("GCC unroll 4") for (int t = 0; t < (T); ++t)                                  \
            {                                                                                      \
                const float v = tsr_hsum8_ps(acc[r][t]) + s4[t];                                   \
                if (r < nr) y[(size_t)t * ys + r] = v;                                             \
            }                                                                                      \
        }                                                                                          \
    }

/* vpdpbusd in the VNNI instantiations only (the AVX2 ones never reach it: VNNI is 0). */
#define GG_DPBUSD(acc, u, s) gg_dpbusd_vnni(acc, u, s)

/* One pair (the remainder of a 4-group). */
#define GG_DOT1_Q41(NAME, ATTR, US8)                                                               \
    ATTR static float NAME(int64_t nb, const gg_q4_1 *w, const gg_q8_1 *x)                         \
    {                                                                                              \
        __m256 a = _mm256_setzero_ps();                                                            \
        float s = 0.0f;                                                                            \
        for (int64_t b = 0; b < nb; ++b) {                                                         \
            s = fmaf(gg_h2f(w[b].m), gg_h2f(x[b].s), s);                                           \
            a = _mm256_fmadd_ps(_mm256_set1_ps(gg_h2f(w[b].d) * gg_h2f(x[b].d)),                   \
                                GG_Q41_LANES(US8, &w[b], &x[b]), a);                               \
        }                                                                                          \
        return tsr_hsum8_ps(a) + s;                                                                \
    }
#define GG_DOT1_Q80(NAME, ATTR, US8)                                                               \
    ATTR static float NAME(int64_t nb, const gg_q8_0 *w, const gg_q8_0 *x)                         \
    {                                                                                              \
        __m256 a = _mm256_setzero_ps();                                                            \
        for (int64_t b = 0; b < nb; ++b)                                                           \
            a = _mm256_fmadd_ps(_mm256_set1_ps(gg_h2f(w[b].d) * gg_h2f(x[b].d)),                   \
                                GG_Q80_LANES(US8, &w[b], &x[b]), a);                               \
        return tsr_hsum8_ps(a);                                                                    \
    }

/* One weight row, four tokens: the same per-pair operations as GG_DOT4_*, the weight block
 * unpacked once for the four (prefill tiles). */
#define GG_TILE4_Q41(NAME, ATTR, US8)                                                              \
    ATTR static void NAME(int64_t nb, const gg_q4_1 *w, const gg_q8_1 *const *x, float *out)       \
    {                                                                                              \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                \
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;                                          \
        const gg_q8_1 *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];                              \
        for (int64_t b = 0; b < nb; ++b) {                                                         \
            const float dw = gg_h2f(w[b].d), mw = gg_h2f(w[b].m);                                  \
            const __m256i qw = gg_nibbles(w[b].qs);                                                \
            s0 = fmaf(mw, gg_h2f(x0[b].s), s0);                                                    \
            s1 = fmaf(mw, gg_h2f(x1[b].s), s1);                                                    \
            s2 = fmaf(mw, gg_h2f(x2[b].s), s2);                                                    \
            s3 = fmaf(mw, gg_h2f(x3[b].s), s3);                                                    \
            a0 = _mm256_fmadd_ps(                                                                  \
                _mm256_set1_ps(dw * gg_h2f(x0[b].d)),                                              \
                _mm256_cvtepi32_ps(US8(qw, _mm256_loadu_si256((const __m256i *)x0[b].qs))), a0);   \
            a1 = _mm256_fmadd_ps(                                                                  \
                _mm256_set1_ps(dw * gg_h2f(x1[b].d)),                                              \
                _mm256_cvtepi32_ps(US8(qw, _mm256_loadu_si256((const __m256i *)x1[b].qs))), a1);   \
            a2 = _mm256_fmadd_ps(                                                                  \
                _mm256_set1_ps(dw * gg_h2f(x2[b].d)),                                              \
                _mm256_cvtepi32_ps(US8(qw, _mm256_loadu_si256((const __m256i *)x2[b].qs))), a2);   \
            a3 = _mm256_fmadd_ps(                                                                  \
                _mm256_set1_ps(dw * gg_h2f(x3[b].d)),                                              \
                _mm256_cvtepi32_ps(US8(qw, _mm256_loadu_si256((const __m256i *)x3[b].qs))), a3);   \
        }                                                                                          \
        out[0] = tsr_hsum8_ps(a0) + s0;                                                            \
        out[1] = tsr_hsum8_ps(a1) + s1;                                                            \
        out[2] = tsr_hsum8_ps(a2) + s2;                                                            \
        out[3] = tsr_hsum8_ps(a3) + s3;                                                            \
    }

GG_TILE4_Q41(tile4_q4_1_avx2, GG_AVX2, gg_us8_avx2)
GG_TILE4_Q41(tile4_q4_1_vnni, GG_VNNI, gg_us8_vnni)
GG_DOT4_Q41(dot4_q4_1_avx2, GG_AVX2, gg_us8_avx2)
GG_DOT4_Q41(dot4_q4_1_vnni, GG_VNNI, gg_us8_vnni)
GG_DOT4_Q80(dot4_q8_0_avx2, GG_AVX2, gg_us8_avx2)
GG_DOT4_Q80(dot4_q8_0_vnni, GG_VNNI, gg_us8_vnni)
GG_ROWS4_Q80(rows4_q8_0_avx2, GG_AVX2, gg_us8_avx2)
GG_ROWS4_Q80(rows4_q8_0_vnni, GG_VNNI, gg_us8_vnni)
GG_ROWS4_Q41(rows4_q4_1_avx2, GG_AVX2, gg_us8_avx2)
GG_ROWS4_Q41(rows4_q4_1_vnni, GG_VNNI, gg_us8_vnni)
GG_DOT1_Q41(dot1_q4_1_avx2, GG_AVX2, gg_us8_avx2)
GG_DOT1_Q41(dot1_q4_1_vnni, GG_VNNI, gg_us8_vnni)
GG_DOT1_Q80(dot1_q8_0_avx2, GG_AVX2, gg_us8_avx2)
GG_DOT1_Q80(dot1_q8_0_vnni, GG_VNNI, gg_us8_vnni)

GG_VNNI GG_INLINE __m256i gg_dpbusd_vnni(__m256i acc, __m256i u, __m256i s)
{
    return _mm256_dpbusd_epi32(acc, u, s);
}
GG_TILEV_Q80(tile_q8_0_vnni_1, 1, 0, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_2, 2, 0, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_3, 3, 0, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_4, 4, 0, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_5, 5, 0, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_6, 6, 0, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_7, 7, 0, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_8, 8, 0, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_1_save, 1, 1, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_2_save, 2, 1, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_3_save, 3, 1, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_4_save, 4, 1, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_5_save, 5, 1, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_6_save, 6, 1, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_7_save, 7, 1, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_8_save, 8, 1, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_1_use, 1, 2, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_2_use, 2, 2, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_3_use, 3, 2, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_4_use, 4, 2, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_5_use, 5, 2, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_6_use, 6, 2, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_7_use, 7, 2, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_8_use, 8, 2, GG_VNNI, gg_pair_d16)
GG_TILEV_Q80(tile_q8_0_vnni_1_vbmi, 1, 0, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_2_vbmi, 2, 0, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_3_vbmi, 3, 0, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_4_vbmi, 4, 0, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_5_vbmi, 5, 0, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_6_vbmi, 6, 0, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_7_vbmi, 7, 0, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_8_vbmi, 8, 0, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_1_save_vbmi, 1, 1, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_2_save_vbmi, 2, 1, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_3_save_vbmi, 3, 1, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_4_save_vbmi, 4, 1, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_5_save_vbmi, 5, 1, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_6_save_vbmi, 6, 1, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_7_save_vbmi, 7, 1, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_8_save_vbmi, 8, 1, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_1_use_vbmi, 1, 2, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_2_use_vbmi, 2, 2, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_3_use_vbmi, 3, 2, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_4_use_vbmi, 4, 2, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_5_use_vbmi, 5, 2, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_6_use_vbmi, 6, 2, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_7_use_vbmi, 7, 2, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEV_Q80(tile_q8_0_vnni_8_use_vbmi, 8, 2, GG_VBMI, gg_pair_d16_vbmi)
GG_TILEY_Q80(tiley_q8_0_1, 1, 0)
GG_TILEY_Q80(tiley_q8_0_2, 2, 0)
GG_TILEY_Q80(tiley_q8_0_3, 3, 0)
GG_TILEY_Q80(tiley_q8_0_4, 4, 0)
GG_TILEY_Q80(tiley_q8_0_5, 5, 0)
GG_TILEY_Q80(tiley_q8_0_1_save, 1, 1)
GG_TILEY_Q80(tiley_q8_0_2_save, 2, 1)
GG_TILEY_Q80(tiley_q8_0_3_save, 3, 1)
GG_TILEY_Q80(tiley_q8_0_4_save, 4, 1)
GG_TILEY_Q80(tiley_q8_0_5_save, 5, 1)
GG_TILEY_Q80(tiley_q8_0_1_use, 1, 2)
GG_TILEY_Q80(tiley_q8_0_2_use, 2, 2)
GG_TILEY_Q80(tiley_q8_0_3_use, 3, 2)
GG_TILEY_Q80(tiley_q8_0_4_use, 4, 2)
GG_TILEY_Q80(tiley_q8_0_5_use, 5, 2)
GG_TILE_Q41(tile_q4_1_vnni_1, GG_VNNI, 1, 1)
GG_TILE_Q41(tile_q4_1_vnni_2, GG_VNNI, 2, 1)
GG_TILE_Q41(tile_q4_1_vnni_3, GG_VNNI, 3, 1)
GG_TILE_Q41(tile_q4_1_vnni_4, GG_VNNI, 4, 1)
#undef GG_DPBUSD
#define GG_DPBUSD(acc, u, s) (acc)
GG_TILE_Q80(tile_q8_0_avx2_1, 1)
GG_TILE_Q80(tile_q8_0_avx2_2, 2)
GG_TILE_Q80(tile_q8_0_avx2_3, 3)
GG_TILE_Q80(tile_q8_0_avx2_4, 4)
GG_TILE_Q80(tile_q8_0_avx2_5, 5)
GG_TILE_Q41(tile_q4_1_avx2_1, GG_AVX2, 1, 0)
GG_TILE_Q41(tile_q4_1_avx2_2, GG_AVX2, 2, 0)

typedef void (*gg_tile80_fn)(int64_t, const uint8_t *const *, const uint8_t *const *, const float *,
                             const float *const *, float *, size_t, int, const uint8_t *);
typedef void (*gg_tile41_fn)(int64_t, const uint8_t *const *, const uint8_t *const *, const float *,
                             const float *const *, const float *, const float *, float *, size_t,
                             int, const uint8_t *);
typedef void (*gg_tilev80_fn)(int64_t, const uint8_t *const *, const __m512i *, size_t, float *,
                              __m512i *, const float *, float *, size_t, int, const uint8_t *);
/* [VBMI][0]: a group's only tile, [1]: the first of several (saves the rows' scales and dot
 * starts it forms), [2]: the later ones (read them back) */
static const gg_tilev80_fn k_tile80_vnni[2][3][GG_TV_MAX] = {
    {{tile_q8_0_vnni_1, tile_q8_0_vnni_2, tile_q8_0_vnni_3, tile_q8_0_vnni_4, tile_q8_0_vnni_5,
      tile_q8_0_vnni_6, tile_q8_0_vnni_7, tile_q8_0_vnni_8},
     {tile_q8_0_vnni_1_save, tile_q8_0_vnni_2_save, tile_q8_0_vnni_3_save, tile_q8_0_vnni_4_save,
      tile_q8_0_vnni_5_save, tile_q8_0_vnni_6_save, tile_q8_0_vnni_7_save, tile_q8_0_vnni_8_save},
     {tile_q8_0_vnni_1_use, tile_q8_0_vnni_2_use, tile_q8_0_vnni_3_use, tile_q8_0_vnni_4_use,
      tile_q8_0_vnni_5_use, tile_q8_0_vnni_6_use, tile_q8_0_vnni_7_use, tile_q8_0_vnni_8_use}},
    {{tile_q8_0_vnni_1_vbmi, tile_q8_0_vnni_2_vbmi, tile_q8_0_vnni_3_vbmi, tile_q8_0_vnni_4_vbmi,
      tile_q8_0_vnni_5_vbmi, tile_q8_0_vnni_6_vbmi, tile_q8_0_vnni_7_vbmi, tile_q8_0_vnni_8_vbmi},
     {tile_q8_0_vnni_1_save_vbmi, tile_q8_0_vnni_2_save_vbmi, tile_q8_0_vnni_3_save_vbmi,
      tile_q8_0_vnni_4_save_vbmi, tile_q8_0_vnni_5_save_vbmi, tile_q8_0_vnni_6_save_vbmi,
      tile_q8_0_vnni_7_save_vbmi, tile_q8_0_vnni_8_save_vbmi},
     {tile_q8_0_vnni_1_use_vbmi, tile_q8_0_vnni_2_use_vbmi, tile_q8_0_vnni_3_use_vbmi,
      tile_q8_0_vnni_4_use_vbmi, tile_q8_0_vnni_5_use_vbmi, tile_q8_0_vnni_6_use_vbmi,
      tile_q8_0_vnni_7_use_vbmi, tile_q8_0_vnni_8_use_vbmi}},
};
typedef void (*gg_tiley80_fn)(int64_t, const uint8_t *const *, const uint8_t *, size_t,
                              const float *, size_t, float *, __m256i *, float *, size_t, int,
                              const uint8_t *);
/* [0]: a group's only tile, [1]: the first of several, [2]: the later ones (as above) */
static const gg_tiley80_fn k_tiley80[3][GG_TY_MAX] = {
    {tiley_q8_0_1, tiley_q8_0_2, tiley_q8_0_3, tiley_q8_0_4, tiley_q8_0_5},
    {tiley_q8_0_1_save, tiley_q8_0_2_save, tiley_q8_0_3_save, tiley_q8_0_4_save, tiley_q8_0_5_save},
    {tiley_q8_0_1_use, tiley_q8_0_2_use, tiley_q8_0_3_use, tiley_q8_0_4_use, tiley_q8_0_5_use},
};
static const gg_tile80_fn k_tile80_avx2[GG_T80_AVX2_MAX] = {
    tile_q8_0_avx2_1, tile_q8_0_avx2_2, tile_q8_0_avx2_3, tile_q8_0_avx2_4, tile_q8_0_avx2_5};
static const gg_tile41_fn k_tile41_vnni[4] = {tile_q4_1_vnni_1, tile_q4_1_vnni_2, tile_q4_1_vnni_3,
                                              tile_q4_1_vnni_4};
static const gg_tile41_fn k_tile41_avx2[2] = {tile_q4_1_avx2_1, tile_q4_1_avx2_2};

#endif /* GG_X86 */

/* Largest row (in blocks) whose activation scales the GEMV converts on the stack. */
#define GG_XD_MAX 4096
/* How far ahead the GEMV prefetches: whole 4-row groups, at least this many bytes (one
 * group of the 1B shape's 2 KiB rows; measured on Zen 4, 1 thread, 2048-element Q8_0 rows:
 * 7.7 -> 16.9 GB/s with one group ahead, 2-8 groups ahead no better). */
#define GG_PF_BYTES 2048

/* ---- dispatch ----------------------------------------------------------------------------- */

typedef void (*dot4_fn)(int64_t nb, const void *const *w, const void *const *x, float *out);
typedef float (*dot1_fn)(int64_t nb, const void *w, const void *x);

static void pick(uint32_t type, int isa, dot4_fn *d4, dot1_fn *d1)
{
    *d4 = NULL;
    *d1 = NULL;
#if GG_X86
    if (isa >= TSR_GGML_VNNI) {
        *d4 = type == TSR_TYPE_Q4_1 ? (dot4_fn)dot4_q4_1_vnni : (dot4_fn)dot4_q8_0_vnni;
        *d1 = type == TSR_TYPE_Q4_1 ? (dot1_fn)dot1_q4_1_vnni : (dot1_fn)dot1_q8_0_vnni;
    } else if (isa >= TSR_GGML_AVX2) {
        *d4 = type == TSR_TYPE_Q4_1 ? (dot4_fn)dot4_q4_1_avx2 : (dot4_fn)dot4_q8_0_avx2;
        *d1 = type == TSR_TYPE_Q4_1 ? (dot1_fn)dot1_q4_1_avx2 : (dot1_fn)dot1_q8_0_avx2;
    }
#else
    (void)type;
    (void)isa;
#endif
}

void tsr_ggml_dot_rows(uint32_t type, int isa, int64_t n, int64_t n_rows, const void *w,
                       size_t w_stride, const void *x, float *y)
{
    const int64_t nb = n / 32;
    dot4_fn d4;
    dot1_fn d1;
    pick(type, isa, &d4, &d1);
    const uint8_t *wr = w;
    int64_t r = 0;
#if GG_X86
    if (isa >= TSR_GGML_AVX2 && nb <= GG_XD_MAX) {
        /* the token's scales as floats once (and Q8_1's s), then 4-row groups with the next
         * group prefetched; rows past the last whole group one by one */
        float xd[GG_XD_MAX], xsm[type == TSR_TYPE_Q4_1 ? GG_XD_MAX : 1];
        const bool q41 = type == TSR_TYPE_Q4_1;
        for (int64_t b = 0; b < nb; ++b) {
            if (q41) {
                xd[b] = tsr_f16_to_f32(((const gg_q8_1 *)x)[b].d);
                xsm[b] = tsr_f16_to_f32(((const gg_q8_1 *)x)[b].s);
            } else {
                xd[b] = tsr_f16_to_f32(((const gg_q8_0 *)x)[b].d);
            }
        }
        const size_t gbytes = 4 * w_stride;
        const int64_t ahead = gbytes ? 4 * (int64_t)((GG_PF_BYTES + gbytes - 1) / gbytes)
                                     : n_rows; /* stride 0: one row */
        const bool vnni = isa >= TSR_GGML_VNNI;
        const bool l2 = gbytes > GG_PF_L1_MAX_BYTES;
        for (; r + 4 <= n_rows; r += 4) {
            const uint8_t *g = wr + (size_t)r * w_stride;
            const uint8_t *pf = r + ahead + 4 <= n_rows ? g + (size_t)ahead * w_stride : NULL;
            if (q41)
                (vnni ? rows4_q4_1_vnni : rows4_q4_1_avx2)(nb, g, w_stride, x, xd, xsm, y + r, pf,
                                                           l2);
            else
                (vnni ? rows4_q8_0_vnni : rows4_q8_0_avx2)(nb, g, w_stride, x, xd, y + r, pf, l2);
        }
        for (; r < n_rows; ++r) y[r] = d1(nb, wr + (size_t)r * w_stride, x);
        return;
    }
#endif
    if (d4) {
        for (; r + 4 <= n_rows; r += 4) {
            const void *ws[4] = {wr + (size_t)r * w_stride, wr + (size_t)(r + 1) * w_stride,
                                 wr + (size_t)(r + 2) * w_stride, wr + (size_t)(r + 3) * w_stride};
            const void *xs[4] = {x, x, x, x};
            d4(nb, ws, xs, y + r);
        }
        for (; r < n_rows; ++r) y[r] = d1(nb, wr + (size_t)r * w_stride, x);
        return;
    }
    for (; r < n_rows; ++r) y[r] = dot_scalar(type, nb, wr + (size_t)r * w_stride, x);
}

#if GG_X86
/* VBMI for the tiles' scale extraction: the CPU has it and tsr_ggml_dot_vbmi has not turned
 * it off (tests run both forms). */
static int gg_vbmi_ok(void)
{
    return !g_vbmi_off && __builtin_cpu_supports("avx512vbmi");
}

/* The VNNI Q8_0 tiles' activations (the prep): the tokens' quants + 128 with each 4-byte group
 * twice (xd [nb][n_tok] zmm, 64 bytes per block) and their scales twice (dx2, after xd: per
 * chunk of 8 blocks, per token, {d, d} per block: 16 floats, zeros past nb). Token t of n_tok
 * (its Q8_0 row at x); tokens are independent (threads may lay out different ones). */
static size_t gg_prep_dx2_off(int64_t nb, int32_t n_tok)
{
    return sizeof(__m512i) * (size_t)nb * (size_t)n_tok;
}
GG_VNNI static void gg_prep_q80_token(int64_t nb, int32_t n_tok, int32_t t, const uint8_t *x,
                                      void *prep)
{
    __m512i *xd = prep;
    float *dx2 = (float *)((uint8_t *)prep + gg_prep_dx2_off(nb, n_tok));
    const __m512i dup = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const gg_q8_0 *xt = (const gg_q8_0 *)x;
    for (int64_t b = 0; b < (int64_t)GG_NBP(nb); ++b) {
        float *d2 = dx2 + ((size_t)b / 8 * n_tok + t) * 16 + 2 * (b % 8);
        if (b >= nb) {
            d2[0] = d2[1] = 0.0f;
            continue;
        }
        const __m256i q =
            _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)xt[b].qs), _mm256_set1_epi8(-128));
        xd[(size_t)b * n_tok + t] = _mm512_permutexvar_epi32(dup, _mm512_castsi256_si512(q));
        d2[0] = d2[1] = gg_h2f(xt[b].d);
    }
}

/* Largest row (blocks) whose shared-tile workspace (wab, dwb) lives on the stack. */
#define GG_WAB_STACK_NB 256

/* The VNNI Q8_0 tiles over rows [0, n_rows) and tokens t0..t0 + n_tok - 1 of a prep of n_all
 * (x: those tokens' Q8_0 rows, xs bytes apart, which the ymm tiles read): row groups of 4, each
 * against the tokens in ceil(n_tok / GG_TV_MAX) zmm tiles, or ceil(n_tok / GG_TY_MAX) ymm ones,
 * as even as can be (zmm: 5 = one tile, 9 = 5 + 4, 16 = 8 + 8; ymm: 8 = 4 + 4, 16 = 4 x 4),
 * the next group prefetched during the first. Returns -1 (nothing done) when the workspace of
 * shared tiles cannot be allocated. */
GG_VNNI static int gg_tile_q80_vnni_run(int64_t nb, int64_t n_rows, const uint8_t *w, size_t ws,
                                        int32_t n_all, int32_t t0, int32_t n_tok, const void *prep,
                                        const uint8_t *x, size_t xs, float *y, size_t ys)
{
    const size_t nbp = GG_NBP(nb);
    const bool ymm = tsr_cpu_choice(&g_tile_ymm, "TSR_Q80_TILE_YMM", true);
    const int t_max = ymm ? GG_TY_MAX : GG_TV_MAX;
    const bool share = n_tok > t_max;
    const int vbmi = gg_vbmi_ok();
    const __m512i *xd = (const __m512i *)prep + t0;
    const float *dx2 =
        (const float *)((const uint8_t *)prep + gg_prep_dx2_off(nb, n_all)) + (size_t)t0 * 16;
    /* shared tiles: wab [2][nb] zmm, dwb [2][2 nbp] floats (ymm: [4][nb] ymm, [4][nbp]) */
    __m512i wab_s[share && nb <= GG_WAB_STACK_NB ? 2 * GG_WAB_STACK_NB : 1];
    float dwb_s[share && nb <= GG_WAB_STACK_NB ? 4 * GG_WAB_STACK_NB : 1];
    __m512i *wab = NULL, *wab_heap = NULL;
    float *dwb = NULL;
    if (share && nb <= GG_WAB_STACK_NB) {
        wab = wab_s;
        dwb = dwb_s;
    } else if (share) {
        wab = wab_heap = aligned_alloc(64, sizeof(__m512i) * 2 * (size_t)nb + 16 * nbp);
        if (!wab) return -1;
        dwb = (float *)(wab + 2 * (size_t)nb);
    }
    const int n_tt = (n_tok + t_max - 1) / t_max;
    const size_t gbytes = 4 * ws;
    const int64_t ahead = gbytes ? 4 * (int64_t)((GG_PF_BYTES + gbytes - 1) / gbytes)
                                 : n_rows; /* stride 0: one row */
    for (int64_t r0 = 0; r0 < n_rows; r0 += 4) {
        const int nr = n_rows - r0 < 4 ? (int)(n_rows - r0) : 4;
        const uint8_t *wr[4];
        for (int r = 0; r < 4; ++r) wr[r] = w + (size_t)(r0 + (r < nr ? r : nr - 1)) * ws;
        const uint8_t *pf = r0 + ahead + 4 <= n_rows ? w + (size_t)(r0 + ahead) * ws : NULL;
        for (int32_t tt = 0, k = 0; tt < n_tok; ++k) {
            /* tile k of n_tt: the first (n_tok % n_tt) tiles one token wider */
            const int tn = n_tok / n_tt + (k < n_tok % n_tt ? 1 : 0);
            /* several tiles: the first saves the rows' scales and dot starts */
            const int mode = !share ? 0 : k == 0 ? 1 : 2;
            if (ymm)
                k_tiley80[mode][tn - 1](nb, wr, x + (size_t)tt * xs, xs, dx2 + (size_t)tt * 16,
                                        (size_t)n_all, dwb, (__m256i *)wab,
                                        y + (size_t)tt * ys + r0, ys, nr, pf);
            else
                k_tile80_vnni[vbmi][mode][tn - 1](nb, wr, xd + tt, (size_t)n_all, dwb, wab,
                                                  dx2 + (size_t)tt * 16, y + (size_t)tt * ys + r0,
                                                  ys, nr, pf);
            pf = NULL;
            tt += tn;
        }
    }
    free(wab_heap);
    return 0;
}

/* The VNNI Q8_0 tiles over a whole call: the prep of every token (above) in a workspace of
 * its own, then the tiles. Returns -1 (nothing done) when it cannot be allocated. (Matmuls
 * lay out the prep once for all their calls: tsr_ggml_tile_prep.) */
GG_VNNI static int gg_tile_q80_vnni(int64_t nb, int64_t n_rows, const uint8_t *w, size_t ws,
                                    int32_t n_tok, const uint8_t *x, size_t xs, float *y, size_t ys)
{
    void *prep = aligned_alloc(64, tsr_ggml_tile_prep_bytes(TSR_TYPE_Q8_0, nb * 32, n_tok));
    if (!prep) return -1;
    for (int32_t t = 0; t < n_tok; ++t) gg_prep_q80_token(nb, n_tok, t, x + (size_t)t * xs, prep);
    const int rc = gg_tile_q80_vnni_run(nb, n_rows, w, ws, n_tok, 0, n_tok, prep, x, xs, y, ys);
    free(prep);
    return rc;
}

/* The fp16 d of a Q8_0 row's nb blocks (34 bytes apart) as floats into out[GG_NBP(nb)], zero
 * past nb: 8 at a time (gg_row_h8_avx2) converted by one vcvtph2ps, where one scalar convert
 * each cost a tenth of a 16-token step (the tile's row-group prep, perf of bench_batch -s 16 on
 * AMD Zen 3). Exact conversions: the same floats. */
GG_AVX2 static void gg_q80_row_d(const gg_q8_0 *w, int64_t nb, float *out)
{
    for (int64_t b0 = 0; b0 < nb; b0 += 8)
        _mm256_storeu_ps(out + b0,
                         _mm256_cvtph_ps(gg_row_h8_avx2(w + b0, nb - b0 < 8 ? (int)(nb - b0) : 8)));
}

/* The register tiles over a whole call (F16C's conversions inline: the library's scalar
 * tsr_f16_to_f32 took a quarter of a 2-5 token step): scales as floats once (tokens: per call;
 * rows: per group of 4, except the VNNI Q8_0 tile, which converts them itself as it goes; each
 * row of scales nb floats padded with zeros to GG_NBP(nb)), then row
 * groups, each against the tokens in tiles (the group's blocks stay in L1 for all the tokens),
 * the next group prefetched during the first token tile. Returns -1 (nothing done) when the
 * workspace cannot be allocated. */
GG_AVX2 static int gg_tile_simd(uint32_t type, int isa, int64_t nb, int64_t n_rows,
                                const uint8_t *w, size_t ws, int32_t n_tok, const uint8_t *x,
                                size_t xs, float *y, size_t ys)
{
    const bool q41 = type == TSR_TYPE_Q4_1, vnni = isa >= TSR_GGML_VNNI;
    if (vnni && !q41) return gg_tile_q80_vnni(nb, n_rows, w, ws, n_tok, x, xs, y, ys);
    const size_t nbp = GG_NBP(nb);
    const size_t n_tg = ((size_t)n_tok + 3) / 4; /* token groups of 4 for Q4_1's s */
    const size_t n_fl = nbp * ((size_t)n_tok + 8) + (q41 ? (size_t)nb * 4 * n_tg : 0) + 4;
    float *buf = calloc(n_fl, sizeof(float)); /* zero pads: no NaN / subnormal in the muls */
    if (!buf) return -1;
    float *dx = buf, *dw = dx + (size_t)n_tok * nbp, *mw = dw + 4 * nbp;
    float *sx = mw + 4 * nbp; /* Q4_1: [token group][nb][4] */
    for (int32_t t = 0; t < n_tok; ++t) {
        const uint8_t *xt = x + (size_t)t * xs;
        if (!q41) {
            gg_q80_row_d((const gg_q8_0 *)xt, nb, dx + (size_t)t * nbp);
            continue;
        }
        for (int64_t b = 0; b < nb; ++b) {
            const gg_q8_1 *xb = (const gg_q8_1 *)xt + b;
            dx[(size_t)t * nbp + b] = gg_h2f(xb->d);
            sx[((size_t)(t / 4) * nb + b) * 4 + t % 4] = gg_h2f(xb->s);
        }
    }
    /* Token tiles: Q4_1 up to 4 (VNNI) / 2 tokens; AVX2 Q8_0 up to 5 below GG_T80_AVX2_WIDE
     * tokens, else 4, as even as can be (5 = one tile, 8 = 4 + 4, 9 = 5 + 4, 16 = 4 x 4:
     * GG_TILE_Q80's and GG_T80_AVX2_MAX's measures; before them, 3-token tiles ran 4-7 %
     * faster than 2-token ones). VNNI Q8_0 (gg_tile_q80_vnni) splits n_tok into
     * ceil(n_tok / GG_TV_MAX) tiles as even as can be (5 = one tile, 7 = 4 + 3, 16 = 6 + 5 +
     * 5). */
    const int tmax = q41 ? (vnni ? 4 : 2) : n_tok < GG_T80_AVX2_WIDE ? GG_T80_AVX2_MAX : 4;
    const int n_tt = (n_tok + tmax - 1) / tmax;
    const size_t gbytes = 4 * ws;
    const int64_t ahead = gbytes ? 4 * (int64_t)((GG_PF_BYTES + gbytes - 1) / gbytes)
                                 : n_rows; /* stride 0: one row */
    for (int64_t r0 = 0; r0 < n_rows; r0 += 4) {
        const int nr = n_rows - r0 < 4 ? (int)(n_rows - r0) : 4;
        const uint8_t *wr[4];
        for (int r = 0; r < 4; ++r) {
            wr[r] = w + (size_t)(r0 + (r < nr ? r : nr - 1)) * ws;
            if (!q41) {
                gg_q80_row_d((const gg_q8_0 *)wr[r], nb, dw + (size_t)r * nbp);
                continue;
            }
            for (int64_t b = 0; b < nb; ++b) {
                dw[(size_t)r * nbp + b] = gg_h2f(((const gg_q4_1 *)wr[r])[b].d);
                mw[(size_t)r * nbp + b] = gg_h2f(((const gg_q4_1 *)wr[r])[b].m);
            }
        }
        const uint8_t *pf = r0 + ahead + 4 <= n_rows ? w + (size_t)(r0 + ahead) * ws : NULL;
        for (int32_t t0 = 0, k = 0; t0 < n_tok; ++k) {
            /* tile k of n_tt: the first (n_tok % n_tt) tiles one token wider */
            const int tn = q41 ? (n_tok - t0 < tmax ? n_tok - t0 : tmax)
                               : n_tok / n_tt + (k < n_tok % n_tt ? 1 : 0);
            const uint8_t *xr[GG_TV_MAX];
            const float *dxr[GG_TV_MAX];
            for (int t = 0; t < tn; ++t) {
                xr[t] = x + (size_t)(t0 + t) * xs;
                dxr[t] = dx + (size_t)(t0 + t) * nbp;
            }
            float *yt = y + (size_t)t0 * ys + r0;
            if (q41) {
                /* sx lanes: this tile's tokens start at lane t0 % 4 of group t0 / 4 (a
                 * 2-token AVX2 tile may start at lane 2: the 4-lane loads then read 2 lanes
                 * of the next block, unused; the buffer has 4 floats to spare at its end) */
                const float *sxt = sx + (size_t)(t0 / 4) * nb * 4 + t0 % 4;
                (vnni ? k_tile41_vnni : k_tile41_avx2)[tn - 1](nb, wr, xr, dw, dxr, mw, sxt, yt, ys,
                                                               nr, pf);
            } else {
                k_tile80_avx2[tn - 1](nb, wr, xr, dw, dxr, yt, ys, nr, pf);
            }
            pf = NULL;
            t0 += tn;
        }
    }
    free(buf);
    return 0;
}
#endif

void tsr_ggml_dot_tile(uint32_t type, int isa, int64_t n, int64_t n_rows, const void *w,
                       size_t w_stride, int32_t n_tok, const void *x, size_t x_stride, float *y,
                       size_t y_stride)
{
    const int64_t nb = n / 32;
    dot4_fn d4;
    dot1_fn d1;
    pick(type, isa, &d4, &d1);
    const uint8_t *wr = w, *xr = x;
#if GG_X86
    if (d4 &&
        gg_tile_simd(type, isa, nb, n_rows, wr, w_stride, n_tok, xr, x_stride, y, y_stride) == 0)
        return;
#endif
    if (!d4) {
        for (int32_t t = 0; t < n_tok; ++t)
            for (int64_t r = 0; r < n_rows; ++r)
                y[(size_t)t * y_stride + r] =
                    dot_scalar(type, nb, wr + (size_t)r * w_stride, xr + (size_t)t * x_stride);
        return;
    }
    /* Row by row (its blocks stay in L1 for all tokens), 4 tokens at a time; Q4_1's weight
     * block unpacked once for the 4. */
    void (*t4)(int64_t, const gg_q4_1 *, const gg_q8_1 *const *, float *) = NULL;
#if GG_X86
    if (type == TSR_TYPE_Q4_1) t4 = isa >= TSR_GGML_VNNI ? tile4_q4_1_vnni : tile4_q4_1_avx2;
#endif
    for (int64_t r = 0; r < n_rows; ++r) {
        const void *wrow = wr + (size_t)r * w_stride;
        int32_t t = 0;
        for (; t + 4 <= n_tok; t += 4) {
            const void *ws[4] = {wrow, wrow, wrow, wrow};
            const void *xs[4] = {xr + (size_t)t * x_stride, xr + (size_t)(t + 1) * x_stride,
                                 xr + (size_t)(t + 2) * x_stride, xr + (size_t)(t + 3) * x_stride};
            float out[4];
            if (t4)
                t4(nb, wrow, (const gg_q8_1 *const *)xs, out);
            else
                d4(nb, ws, xs, out);
            for (int k = 0; k < 4; ++k) y[(size_t)(t + k) * y_stride + r] = out[k];
        }
        for (; t < n_tok; ++t)
            y[(size_t)t * y_stride + r] = d1(nb, wrow, xr + (size_t)t * x_stride);
    }
}

/* ---- activation quantizer ----------------------------------------------------------------- */

/* Round to nearest, ties to even, through the float adder (|f| <= 2^22). */
static int gg_nearest_int(float f)
{
    float v = f + 12582912.f;
    int32_t i;
    memcpy(&i, &v, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

/* One block: quants into qs, returns d (unrounded) and the quants' sum. */
static float act_block_scalar(const float *x, int8_t *qs, int32_t *sum)
{
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.f;
    const float id = amax != 0.0f ? 127.f / amax : 0.0f;
    int32_t s = 0;
    for (int j = 0; j < 32; ++j) {
        const float v = x[j] * id;
        /* |v| <= 127 up to rounding; out of range (inf/NaN inputs) saturates as the packs */
        qs[j] = v != v         ? (int8_t)-128
                : v >= 127.0f  ? (int8_t)127
                : v <= -128.0f ? (int8_t)-128
                               : (int8_t)gg_nearest_int(v);
        s += qs[j];
    }
    *sum = s;
    return d;
}

#if GG_X86
/* The same with AVX2: vroundps to nearest even, converted and packed with saturation. */
GG_AVX2 static float act_block_avx2(const float *x, int8_t *qs, int32_t *sum)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], m = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
        v[k] = _mm256_loadu_ps(x + 8 * k);
        m = _mm256_max_ps(_mm256_andnot_ps(sign, v[k]), m);
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float amax = _mm_cvtss_f32(h);
    const float d = amax / 127.f;
    const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.f / amax : 0.0f);
    __m256i q[4];
    for (int k = 0; k < 4; ++k)
        q[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[k], id),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
    s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 1));
    *sum = _mm_cvtsi128_si32(s4);
    const __m256i b =
        _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256((__m256i *)qs,
                        _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    return d;
}
#endif

void tsr_ggml_quant_act_row(uint32_t type, int isa, const float *src, void *dst, int64_t n)
{
    const int64_t nb = n / 32;
    float (*blk)(const float *, int8_t *, int32_t *) = act_block_scalar;
#if GG_X86
    if (isa >= TSR_GGML_AVX2) blk = act_block_avx2;
#else
    (void)isa;
#endif
    if (type == TSR_TYPE_Q8_1) {
        gg_q8_1 *y = dst;
        for (int64_t i = 0; i < nb; ++i, src += 32) {
            int32_t sum;
            const float d = blk(src, y[i].qs, &sum);
            y[i].d = tsr_f32_to_f16(d);
            y[i].s = tsr_f32_to_f16(d * (float)sum);
        }
    } else {
        gg_q8_0 *y = dst;
        for (int64_t i = 0; i < nb; ++i, src += 32) {
            int32_t sum;
            y[i].d = tsr_f32_to_f16(blk(src, y[i].qs, &sum));
        }
    }
}

/* ---- SiLU / SwiGLU ------------------------------------------------------------------------
 * ggml_vec_swiglu_f32 on AVX-512 (the references' machine): per group of 16 elements
 * y = x / (1 + v_expf(0 - x)) * g with ggml_v_expf's AVX-512 polynomial (below); the
 * elements past the last whole 16 use libm: x / (1 + expf(-x)) * g. The AVX2 build of ggml
 * uses another final step (k + k*j instead of scalef(j, n)), which rounds differently: we
 * follow the AVX-512 one on every ISA. */

/* ggml_v_expf (AVX-512) for one float: n = round(x * log2 e) by the 1.5 * 2^23 trick,
 * b = x - n * ln2 (hi, lo), j = polynomial(b), result = j * 2^n (scalef), and 0 / inf when
 * |n| > 192. */
static float gg_expf_scalar(float x)
{
    const float r = 0x1.8p23f;
    const float z = fmaf(x, 0x1.715476p+0f, r);
    const float n = z - r;
    const float b = fmaf(-n, 0x1.7f7d1cp-20f, fmaf(-n, 0x1.62e4p-1f, x));
    const float u = b * b;
    const float j = fmaf(
        fmaf(fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u, fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f)),
        u, fmaf(0x1.ffffecp-1f, b, 1.0f));
    if (fabsf(n) > 192.0f) return n <= 0.0f ? 0.0f : INFINITY;
    return ldexpf(j, (int)n);
}

static void swiglu_scalar(float *gate, const float *up, int64_t n)
{
    for (int64_t i = 0; i < n; ++i) {
        const float x = gate[i];
        gate[i] = x / (1.0f + gg_expf_scalar(0.0f - x)) * up[i];
    }
}

#if GG_X86
/* The same with AVX2: scalef as two exact power-of-two multiplies (2^n split so both
 * factors are normal floats; only results below 2^-126 could round twice, and those give
 * 1 + e == 1 in SiLU either way). */
GG_AVX2 GG_INLINE __m256 gg_pow2i_avx2(__m256i e)
{
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
}

GG_AVX2 static __m256 gg_expf_avx2(__m256 x)
{
    const __m256 r = _mm256_set1_ps(0x1.8p23f);
    const __m256 z = _mm256_fmadd_ps(x, _mm256_set1_ps(0x1.715476p+0f), r);
    const __m256 n = _mm256_sub_ps(z, r);
    const __m256 b = _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.7f7d1cp-20f),
                                      _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.62e4p-1f), x));
    const __m256 u = _mm256_mul_ps(b, b);
    const __m256 j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(
            _mm256_fmadd_ps(_mm256_set1_ps(0x1.0e4020p-7f), b, _mm256_set1_ps(0x1.573e2ep-5f)), u,
            _mm256_fmadd_ps(_mm256_set1_ps(0x1.555e66p-3f), b, _mm256_set1_ps(0x1.fffdb6p-2f))),
        u, _mm256_fmadd_ps(_mm256_set1_ps(0x1.ffffecp-1f), b, _mm256_set1_ps(1.0f)));
    /* n in [-192, 192] here (larger |n| is replaced below): n = h1 + h2, each in [-96, 96] */
    const __m256 nc =
        _mm256_max_ps(_mm256_min_ps(n, _mm256_set1_ps(192.0f)), _mm256_set1_ps(-192.0f));
    const __m256i ni = _mm256_cvtps_epi32(nc);
    const __m256i h1 = _mm256_srai_epi32(ni, 1);
    const __m256i h2 = _mm256_sub_epi32(ni, h1);
    const __m256 res = _mm256_mul_ps(_mm256_mul_ps(j, gg_pow2i_avx2(h1)), gg_pow2i_avx2(h2));
    const __m256 big = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), n),
                                     _mm256_set1_ps(192.0f), _CMP_GT_OQ);
    const __m256 alt = _mm256_andnot_ps(_mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_LE_OQ),
                                        _mm256_set1_ps(INFINITY));
    return _mm256_blendv_ps(res, alt, big);
}

GG_AVX2 static void swiglu_avx2(float *gate, const float *up, int64_t n)
{
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 8) {
        const __m256 x = _mm256_loadu_ps(gate + i);
        const __m256 e = gg_expf_avx2(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)),
                                                 _mm256_loadu_ps(up + i)));
    }
}
#endif

void tsr_ggml_swiglu(int isa, float *gate, const float *up, int64_t n)
{
    const int64_t n16 = n & ~(int64_t)15;
#if GG_X86
    if (isa >= TSR_GGML_AVX2)
        swiglu_avx2(gate, up, n16);
    else
        swiglu_scalar(gate, up, n16);
#else
    (void)isa;
    swiglu_scalar(gate, up, n16);
#endif
    for (int64_t i = n16; i < n; ++i) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

size_t tsr_ggml_tile_prep_bytes(uint32_t type, int64_t n, int32_t n_tok)
{
#if GG_X86
    if (type != TSR_TYPE_Q8_0 || n_tok < 1 || n % 32 != 0) return 0;
    const int64_t nb = n / 32;
    const size_t b = gg_prep_dx2_off(nb, n_tok) + sizeof(float) * 2 * GG_NBP(nb) * (size_t)n_tok;
    return (b + 63) & ~(size_t)63;
#else
    (void)type, (void)n, (void)n_tok;
    return 0;
#endif
}

bool tsr_ggml_tile_prep_used(uint32_t type, int isa, int64_t n, int32_t n_tok)
{
    return tsr_ggml_tile_prep_bytes(type, n, n_tok) > 0 && isa >= TSR_GGML_VNNI && n_tok >= 2;
}

void tsr_ggml_tile_prep(int64_t n, int32_t n_tok, int32_t t, const void *x, void *prep)
{
#if GG_X86
    gg_prep_q80_token(n / 32, n_tok, t, x, prep);
#else
    (void)n, (void)n_tok, (void)t, (void)x, (void)prep;
#endif
}

void tsr_ggml_dot_tile_prep(int64_t n, int64_t n_rows, const void *w, size_t w_stride,
                            int32_t n_all, int32_t t0, int32_t n_tok, const void *prep,
                            const void *x, size_t x_stride, float *y, size_t y_stride)
{
    if (n_rows <= 0 || n_tok <= 0) return;
#if GG_X86
    if (gg_tile_q80_vnni_run(n / 32, n_rows, w, w_stride, n_all, t0, n_tok, prep, x, x_stride, y,
                             y_stride) == 0)
        return;
#else
    (void)n_all, (void)t0, (void)prep;
#endif
    tsr_ggml_dot_tile(TSR_TYPE_Q8_0, tsr_ggml_isa(), n, n_rows, w, w_stride, n_tok, x, x_stride, y,
                      y_stride);
}

int tsr_ggml_isa(void)
{
    const char *s = tsr_quant_isa();
    return strcmp(s, "avx512vnni") == 0 ? TSR_GGML_VNNI
           : strcmp(s, "avx2") == 0     ? TSR_GGML_AVX2
                                        : TSR_GGML_SCALAR;
}

bool tsr_ggml_vnni_chosen(const char *env, _Atomic int *cache)
{
    return tsr_ggml_isa_chosen(env, TSR_GGML_VNNI, cache);
}

bool tsr_ggml_isa_chosen(const char *env, int min_isa, _Atomic int *cache)
{
    int v = atomic_load_explicit(cache, memory_order_relaxed);
    if (v < 0) {
        const char *e = getenv(env);
        v = tsr_ggml_isa() >= min_isa && !(e && strcmp(e, "0") == 0);
        atomic_store_explicit(cache, v, memory_order_relaxed);
    }
    return v != 0;
}
