/* x86hsum.h — the one horizontal sum of 8 float lanes that every AVX2 kernel uses (and its
 * form for two interleaved chains in a 512-bit register), the integer sum of a Q8_0 block's
 * 32 quants (the Q4_0 / Q8_1 activation facts of quant.c, repack.c and q40_gemm.c), and the
 * int32 -> float conversion of the VNNI kernels' dots; the one form of software prefetch
 * the streaming kernels issue (tsr_prefetch_line_l2); and the 8 x 8 dword transpose that the
 * AVX2 rows-in-lanes kernels unpack with (tsr_transpose8x8_epi32).
 *
 * Its order is part of the numerics: it is ggml's hsum_float_8, ((v0+v4)+(v2+v6)) +
 * ((v1+v5)+(v3+v7)), which the ggml-exact dots (kernels/dot_ggml.c, kernels/quant.c), the
 * repacked kernels that must equal them bit for bit (kernels/repack.c) and the KV attention
 * (kernels/kvcache.c) all rely on, so it lives in one place. Include only from x86 code
 * (immintrin.h already included). */
#ifndef TSR_X86HSUM_H
#define TSR_X86HSUM_H

#include <stdint.h>

/* int32 -> float without vcvtdq2ps, which Intel cores run on port 0 only, the port of every
 * vpdpbusd: a dot whose int32 accumulator starts at TSR_I2F_MAGIC_I (the bits of 1.5 x 2^23)
 * ends as the bits of the float 1.5 x 2^23 + dot when |dot| < 2^22 (floats in [2^23, 2^24)
 * are the integers), and one vsubps of TSR_I2F_MAGIC_F (port 0 or 5) leaves the float dot,
 * exactly what vcvtdq2ps gives. Every user states its dots' bound next to the use. */
#define TSR_I2F_MAGIC_I 0x4B400000
#define TSR_I2F_MAGIC_F 12582912.0f

__attribute__((target("avx2,fma,f16c"))) static inline __attribute__((always_inline)) float
tsr_hsum8_ps(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* tsr_hsum8_ps's tree over 8 chains whose lanes are 8 rows (the AVX2 rows-in-lanes kernels,
 * q50_avx2.c and q41_avx2.c: acc[l] holds ggml lane l of 8 rows): lane i of the result is
 * tsr_hsum8_ps of row i's 8 chains, ((c0+c4)+(c2+c6)) + ((c1+c5)+(c3+c7)), bit for bit. */
__attribute__((target("avx2,fma,f16c"))) static inline __attribute__((always_inline)) __m256
tsr_hsum8_rows_ps(const __m256 acc[8])
{
    const __m256 t0 = _mm256_add_ps(acc[0], acc[4]), t1 = _mm256_add_ps(acc[1], acc[5]),
                 t2 = _mm256_add_ps(acc[2], acc[6]), t3 = _mm256_add_ps(acc[3], acc[7]);
    return _mm256_add_ps(_mm256_add_ps(t0, t2), _mm256_add_ps(t1, t3));
}

/* tsr_hsum8_ps's tree for two 8-lane chains in one 512-bit register, chain a in the even
 * lanes and chain b in the odd (the layout of the VNNI Q8_0 / Q5_0 tiles, two rows per
 * register): lanes i + (i + 4), then (0 + 2), (1 + 3), then their sum, for both at once;
 * *a and *b are bit for bit tsr_hsum8_ps of each chain alone. */
__attribute__((target("avx2,fma,f16c,avx512f"))) static inline __attribute__((always_inline)) void
tsr_hsum8_pair_ps(__m512 v, float *a, float *b)
{
    const __m256 h4 =
        _mm256_add_ps(_mm512_castps512_ps256(v),
                      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    const __m128 h2 = _mm_add_ps(_mm256_castps256_ps128(h4), _mm256_extractf128_ps(h4, 1));
    const __m128 h1 = _mm_add_ps(h2, _mm_movehl_ps(h2, h2));
    *a = _mm_cvtss_f32(h1);
    *b = _mm_cvtss_f32(_mm_shuffle_ps(h1, h1, 1));
}

/* Sum of the 32 signed bytes at q (exact): the bytes ^ 0x80 summed as unsigned by vpsadbw,
 * less 32 * 128. */
__attribute__((target("avx2"))) static inline __attribute__((always_inline)) int32_t
tsr_qsum32_i8(const void *q)
{
    const __m256i u =
        _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)q), _mm256_set1_epi8((char)0x80));
    const __m256i s4 = _mm256_sad_epu8(u, _mm256_setzero_si256());
    const __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
    return _mm_cvtsi128_si32(_mm_add_epi64(s2, _mm_unpackhi_epi64(s2, s2))) - 32 * 128;
}

/* out[c] lane r = dword c of v[r]: an 8 x 8 transpose of 32-bit elements in 24 unpacks and
 * lane permutes, no gather (a vpgatherdd costs 12-24 cycles on AMD Zen 3). The AVX2 kernels
 * that put one row in each ymm lane unpack with it: q4k_gemm.c's Q4_K super-blocks, q40_gemm.c's
 * Q4_0 scales (floats, cast). */
__attribute__((target("avx2"))) static inline __attribute__((always_inline)) void
tsr_transpose8x8_epi32(const __m256i v[8], __m256i out[8])
{
    __m256i t[8], u[8];
    for (int p = 0; p < 4; p++) {
        t[2 * p] = _mm256_unpacklo_epi32(v[2 * p], v[2 * p + 1]);
        t[2 * p + 1] = _mm256_unpackhi_epi32(v[2 * p], v[2 * p + 1]);
    }
    for (int h = 0; h < 2; h++) { /* rows 4h .. 4h + 3 */
        u[4 * h + 0] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
        u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
    }
    for (int c = 0; c < 4; c++) {
        out[c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x20);
        out[4 + c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x31);
    }
}

/* Prefetch into L2 the line at p from a register of its own: the empty asm keeps GCC from
 * folding an offset into the instruction. The decode GEMVs (kernels/q80_gemv.c, q40_gemm.c,
 * quant.c's Q4_K / Q6_K) and the VNNI Q8_0 tile (dot_ggml.c) issue their lines this way, one
 * at a time, spread through a block's compute, not as a burst before it: on this host
 * (2026-12-06) that streams a fifth to a quarter faster than the same lines as a burst or with
 * folded offsets, and either change alone gains little (figures beside each kernel). Why the
 * instruction form matters is not observable here (no hardware counters). A prefetch never
 * faults. */
static inline __attribute__((always_inline)) void tsr_prefetch_line_l2(const char *p)
{
    __asm__ volatile("" : "+r"(p));
    _mm_prefetch(p, _MM_HINT_T1);
}

/* The same into L1 (quant.c's Q6_K GEMV on AMD CPUs, a short distance ahead). */
static inline __attribute__((always_inline)) void tsr_prefetch_line_l1(const char *p)
{
    __asm__ volatile("" : "+r"(p));
    _mm_prefetch(p, _MM_HINT_T0);
}

#endif
