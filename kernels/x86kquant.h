/* x86kquant.h — the K-quants' scale unpacking and vpshufb masks on x86, one copy for the
 * row dots (kernels/quant.c), the repacked kernels (kernels/repack.c) and Q4_K's prompt-order
 * GEMM (kernels/q4k_gemm.c), which each kept an identical copy.
 *
 * Include only from x86 code (immintrin.h already included). The tables are static: each
 * file that includes this gets its own 32-byte-aligned copy (aligned and unaligned loads
 * both work on them). */
#ifndef TSR_X86KQUANT_H
#define TSR_X86KQUANT_H

#include <stdint.h>
#include <string.h>

/* vpshufb masks broadcasting int16 element g (0..7) of a 128-bit lane to all 8 slots. */
#define TSR_SHUF16(g) 2 * (g), 2 * (g) + 1
#define TSR_SHUF16x8(g)                                                                            \
    TSR_SHUF16(g), TSR_SHUF16(g), TSR_SHUF16(g), TSR_SHUF16(g), TSR_SHUF16(g), TSR_SHUF16(g),      \
        TSR_SHUF16(g), TSR_SHUF16(g)

/* Q4_K: int16 element g in both lanes (a 32-element sub-block's scale or min). */
static const uint8_t tsr_k_shuf_q4_K[8][32] __attribute__((aligned(32))) = {
    {TSR_SHUF16x8(0), TSR_SHUF16x8(0)}, {TSR_SHUF16x8(1), TSR_SHUF16x8(1)},
    {TSR_SHUF16x8(2), TSR_SHUF16x8(2)}, {TSR_SHUF16x8(3), TSR_SHUF16x8(3)},
    {TSR_SHUF16x8(4), TSR_SHUF16x8(4)}, {TSR_SHUF16x8(5), TSR_SHUF16x8(5)},
    {TSR_SHUF16x8(6), TSR_SHUF16x8(6)}, {TSR_SHUF16x8(7), TSR_SHUF16x8(7)},
};
/* Q6_K: 32 elements span two 16-element groups: int16 2k in the low lane, 2k+1 high. */
static const uint8_t tsr_k_shuf_q6_K[4][32] __attribute__((aligned(32))) = {
    {TSR_SHUF16x8(0), TSR_SHUF16x8(1)},
    {TSR_SHUF16x8(2), TSR_SHUF16x8(3)},
    {TSR_SHUF16x8(4), TSR_SHUF16x8(5)},
    {TSR_SHUF16x8(6), TSR_SHUF16x8(7)},
};
/* int16 element k of a lane (k = 0..3 low lane, 4..7 high lane) twice (the mins against
 * the 16 bsums). */
static const uint8_t tsr_k_dup16[32]
    __attribute__((aligned(32))) = {0, 1, 0, 1, 2,  3,  2,  3,  4,  5,  4,  5,  6,  7,  6,  7,
                                    8, 9, 8, 9, 10, 11, 10, 11, 12, 13, 12, 13, 14, 15, 14, 15};

/* Q4_K's 12 packed bytes -> 8 scales then 8 mins as 16 int16 lanes (get_scale_min_k4 done on
 * general registers, widened once). */
__attribute__((target("avx2,fma,f16c"))) static inline __attribute__((always_inline)) __m256i
tsr_q4_K_sm_x16(const uint8_t *packed)
{
    uint32_t u[3];
    memcpy(u, packed, 12);
    const uint32_t u3 = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
    const uint32_t u2 = u[1] & 0x3f3f3f3fu;
    const uint32_t u1 = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
    const uint32_t u0 = u[0] & 0x3f3f3f3fu;
    return _mm256_cvtepu8_epi16(
        _mm_set_epi64x((long long)((uint64_t)u3 << 32 | u2), (long long)((uint64_t)u1 << 32 | u0)));
}

/* Q3_K's 16 6-bit scales, offset 32 removed, as int16 lanes (ggml's 32-bit unpacking),
 * built in registers: a store of the words and a 128-bit reload of them would stall on
 * store forwarding (measured 3x slower). */
__attribute__((target("avx2,fma,f16c"))) static inline __attribute__((always_inline)) __m256i
tsr_q3_K_sc_x16(const uint8_t *packed)
{
    uint32_t a[3];
    memcpy(a, packed, 12);
    const uint32_t k1 = 0x03030303u, k2 = 0x0f0f0f0fu;
    const uint32_t u2 = ((a[0] >> 4) & k2) | (((a[2] >> 4) & k1) << 4);
    const uint32_t u3 = ((a[1] >> 4) & k2) | (((a[2] >> 6) & k1) << 4);
    const uint32_t u0 = (a[0] & k2) | (((a[2] >> 0) & k1) << 4);
    const uint32_t u1 = (a[1] & k2) | (((a[2] >> 2) & k1) << 4);
    const __m128i u = _mm_set_epi32((int)u3, (int)u2, (int)u1, (int)u0);
    return _mm256_cvtepi8_epi16(_mm_sub_epi8(u, _mm_set1_epi8(32)));
}

/* Q4_K's 12 packed scale bytes of 16 rows at once, as the three words u0, u1, u2 of each row
 * (bytes 0-3, 4-7, 8-11, one row a dword lane): get_scale_min_k4's word operations, leaving
 * in each row's dword the bytes of scales 0-3 (sc[0]), scales 4-7 (sc[1]), mins 0-3 (mn[0])
 * and mins 4-7 (mn[1]). kernels/q4k_gemm.c's gathered rows and kernels/q4k_lanes.c's layout. */
__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void
tsr_q4_K_scales_mins_x16(__m512i u0, __m512i u1, __m512i u2, __m512i sc[2], __m512i mn[2])
{
    const __m512i k3f = _mm512_set1_epi32(0x3f3f3f3f), k0f = _mm512_set1_epi32(0x0f0f0f0f),
                  k03 = _mm512_set1_epi32(0x03030303);
    sc[0] = _mm512_and_si512(u0, k3f);
    sc[1] = _mm512_or_si512(_mm512_and_si512(u2, k0f),
                            _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(u0, 6), k03), 4));
    mn[0] = _mm512_and_si512(u1, k3f);
    mn[1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u2, 4), k0f),
                            _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(u1, 6), k03), 4));
}

/* The same for 8 rows, one a dword lane of a ymm (kernels/q4k_lanes.c's AVX2 kernel). */
__attribute__((target("avx2"))) static inline __attribute__((always_inline)) void
tsr_q4_K_scales_mins_x8(__m256i u0, __m256i u1, __m256i u2, __m256i sc[2], __m256i mn[2])
{
    const __m256i k3f = _mm256_set1_epi32(0x3f3f3f3f), k0f = _mm256_set1_epi32(0x0f0f0f0f),
                  k03 = _mm256_set1_epi32(0x03030303);
    sc[0] = _mm256_and_si256(u0, k3f);
    sc[1] = _mm256_or_si256(_mm256_and_si256(u2, k0f),
                            _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u0, 6), k03), 4));
    mn[0] = _mm256_and_si256(u1, k3f);
    mn[1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u2, 4), k0f),
                            _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u1, 6), k03), 4));
}

#endif
