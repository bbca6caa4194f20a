/*
 * q4k_lanes.c — Q4_K matrices in the lanes layout (see q4k_lanes.h): the repack and the
 * kernels (AVX-512 VNNI, AVX2, scalar), which compute kernels/q4k_gemm.c's prompt order and
 * kernels/quant.c's Q4_K row dot order bit for bit.
 *
 * The VNNI kernel takes tiles of up to 4 tokens over a group of 16 rows. Per super-block it
 * unpacks the 16 rows' 6-bit scales and mins in registers (the scalar unpack's word
 * operations, 16 rows at once); per 64 elements (sub-blocks 2sb, 2sb + 1) it loads the 8
 * nibble vectors once for the tile's tokens and runs, per token, 16 vpdpbusd into two int32
 * lanes per row (one per sub-block), 2 vpmulld by the sub-blocks' scales, and one vpdpwssd
 * of the (min, min) pairs with the token's two sub-block sums; the prompt order then
 * converts and FMAs per 64 elements, the generated tokens' order sums the integers over the
 * super-block first. The AVX2 kernel (below) walks the same way with the 16 rows as two ymm
 * halves.
 */
#include "kernels/q4k_lanes.h"

#include "kernels/dot_ggml.h"
#include "kernels/q80_lanes.h"
#include "kernels/quant.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>

#include "kernels/x86kquant.h"
#include "kernels/x86lanes.h"
_Static_assert(TSR_Q4KL_ROWS == TSR_LANES_ROWS, "the tile driver's groups");
#define QKL_X86 1
#else
#define QKL_X86 0
#endif

_Static_assert(TSR_Q4KL_ROWS == TSR_Q80L_ROWS, "ops.c splits rows of every lanes layout alike");

enum { BLK = 144, XBLK = 292, XQS = 4, XBSUMS = 260, OFF_U = 64, OFF_Q = 256 };

static _Atomic int g_chosen = -1;

bool tsr_q4kl_chosen(void)
{
    return tsr_ggml_isa_chosen("TSR_Q4K_LANES", TSR_GGML_AVX2, &g_chosen);
}

size_t tsr_q4kl_group_bytes(int64_t n)
{
    if (n <= 0 || n % 256) return 0;
    return (size_t)(n / 256) * TSR_Q4KL_SB_BYTES;
}

size_t tsr_q4kl_bytes(int64_t n, int64_t n_out)
{
    if (n_out <= 0) return 0;
    return (size_t)((n_out + TSR_Q4KL_ROWS - 1) / TSR_Q4KL_ROWS) * tsr_q4kl_group_bytes(n);
}

int tsr_q4kl_repack(int64_t n, int64_t n_out, const void *src, size_t src_stride, void *dst)
{
    if (n <= 0 || n % 256 || n_out < 0) return -1;
    const int64_t nsb = n / 256;
    const size_t gb = tsr_q4kl_group_bytes(n);
    for (int64_t g = 0; g * TSR_Q4KL_ROWS < n_out; g++) {
        uint8_t *grp = (uint8_t *)dst + (size_t)g * gb;
        for (int64_t i = 0; i < nsb; i++) {
            uint8_t *sb = grp + (size_t)i * TSR_Q4KL_SB_BYTES;
            memset(sb, 0, TSR_Q4KL_SB_BYTES); /* rows past n_out: d = dmin = 0, quants 0 */
            for (int r = 0; r < TSR_Q4KL_ROWS; r++) {
                const int64_t row = g * TSR_Q4KL_ROWS + r;
                if (row >= n_out) continue;
                /* a Q4_K block: fp16 d, fp16 dmin, scales[12], qs[128] */
                const uint8_t *b =
                    (const uint8_t *)src + (size_t)row * src_stride + (size_t)i * BLK;
                memcpy(sb + 2 * r, b, 2);
                memcpy(sb + 32 + 2 * r, b + 2, 2);
                for (int k = 0; k < 3; k++) memcpy(sb + OFF_U + 64 * k + 4 * r, b + 4 + 4 * k, 4);
                for (int k = 0; k < 32; k++) memcpy(sb + OFF_Q + 64 * k + 4 * r, b + 16 + 4 * k, 4);
            }
        }
    }
    return 0;
}

/* The scalar form: row rr of a group's super-block back into a file block, then the order. */
static float dot_row_scalar(int64_t nsb, const uint8_t *grp, int rr, const uint8_t *x, bool gemm)
{
    float acc = 0.0f, accm = 0.0f;
    for (int64_t i = 0; i < nsb; i++) {
        const uint8_t *sb = grp + (size_t)i * TSR_Q4KL_SB_BYTES;
        const uint8_t *xb = x + (size_t)i * XBLK;
        uint16_t hd, hm;
        memcpy(&hd, sb + 2 * rr, 2);
        memcpy(&hm, sb + 32 + 2 * rr, 2);
        uint8_t sc12[12], qs[128], sm[16];
        for (int k = 0; k < 3; k++) memcpy(sc12 + 4 * k, sb + OFF_U + 64 * k + 4 * rr, 4);
        for (int k = 0; k < 32; k++) memcpy(qs + 4 * k, sb + OFF_Q + 64 * k + 4 * rr, 4);
        tsr_q4_K_scales_mins(sc12, sm);
        float yd;
        memcpy(&yd, xb, 4);
        const int8_t *y = (const int8_t *)(xb + XQS);
        int16_t bs[16];
        memcpy(bs, xb + XBSUMS, sizeof bs);
        const float dd = tsr_f16_to_f32(hd) * yd, dm = tsr_f16_to_f32(hm) * yd;
        int32_t itot = 0, mtot = 0;
        for (int s = 0; s < 4; s++) {
            int32_t isum = 0, imin = 0;
            for (int h = 0; h < 2; h++) {
                const int g = 2 * s + h;
                int32_t d = 0;
                for (int l = 0; l < 32; l++)
                    d += ((qs[32 * s + l] >> (4 * h)) & 0xF) * y[32 * g + l];
                isum += sm[g] * d;
                imin += sm[8 + g] * (bs[2 * g] + bs[2 * g + 1]);
            }
            if (gemm) { /* kernels/q4k_gemm.h: one FMA each per 64 elements */
                acc = fmaf((float)isum, dd, acc);
                accm = fmaf((float)imin, dm, accm);
            } else {
                itot += isum;
                mtot += imin;
            }
        }
        if (!gemm) { /* kernels/quant.c's Q4_K row dot: one FMA each per super-block */
            acc = fmaf((float)itot, dd, acc);
            accm = fmaf((float)mtot, dm, accm);
        }
    }
    return acc - accm;
}

static void dot_scalar(int64_t nsb, const uint8_t *packed, int64_t r0, int64_t n_rows,
                       int32_t n_tok, const uint8_t *x, size_t x_stride, bool gemm, float *y,
                       size_t y_stride)
{
    const size_t gb = (size_t)nsb * TSR_Q4KL_SB_BYTES;
    for (int64_t r = 0; r < n_rows; r++) {
        const int64_t row = r0 + r;
        const uint8_t *grp = packed + (size_t)(row / TSR_Q4KL_ROWS) * gb;
        for (int32_t t = 0; t < n_tok; t++)
            y[(size_t)t * y_stride + (size_t)r] = dot_row_scalar(
                nsb, grp, (int)(row % TSR_Q4KL_ROWS), x + (size_t)t * x_stride, gemm);
    }
}

#if QKL_X86
#define QKL_VNNI TSR_LANES_VNNI

/* vpshufb masks, per 128-bit lane, for the scale words of sub-blocks (2sb, 2sb + 1), k =
 * 2 (sb % 2) the byte of sub-block 2sb in each row's word: k_sc[h][0] the int32 of byte k,
 * k_sc[h][1] of byte k + 1, k_mn[h] the int16 pair (byte k, byte k + 1). */
static uint8_t k_sc[2][2][64] __attribute__((aligned(64)));
static uint8_t k_mn[2][64] __attribute__((aligned(64)));

__attribute__((constructor)) static void qkl_masks(void)
{
    for (int h = 0; h < 2; h++)
        for (int p = 0; p < 64; p++) {
            const int base = ((p % 16) / 4) * 4 + 2 * h; /* lane-relative dword, byte k */
            k_sc[h][0][p] = p % 4 == 0 ? (uint8_t)base : 0x80;
            k_sc[h][1][p] = p % 4 == 0 ? (uint8_t)(base + 1) : 0x80;
            k_mn[h][p] = p % 4 == 0 ? (uint8_t)base : p % 4 == 2 ? (uint8_t)(base + 1) : 0x80;
        }
}

static inline int32_t rd32(const uint8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* One tile: T tokens (x: the first, x_stride bytes apart) x one group of 16 rows, all nsb
 * super-blocks, in the prompt order (G) or the generated tokens' order. */
static inline __attribute__((always_inline)) QKL_VNNI void tile(const int T, const bool G,
                                                                int64_t nsb, const uint8_t *grp,
                                                                const uint8_t *x, size_t x_stride,
                                                                __m512 *out, bool first)
{
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512 acc[4], accm[4];
    for (int t = 0; t < T; t++) acc[t] = accm[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nsb; i++) {
        const uint8_t *blk = grp + (size_t)i * TSR_Q4KL_SB_BYTES;
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
        const __m512 dmw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)));
        const __m512i U0 = _mm512_loadu_si512(blk + OFF_U);
        const __m512i U1 = _mm512_loadu_si512(blk + OFF_U + 64);
        const __m512i U2 = _mm512_loadu_si512(blk + OFF_U + 128);
        /* tsr_q4_K_scales_mins on 16 rows' words: SC[0]/SC[1] scales 0-3/4-7, MN[0]/MN[1] mins */
        __m512i SC[2], MN[2];
        tsr_q4_K_scales_mins_x16(U0, U1, U2, SC, MN);
        __m512 dd[4], dm[4];
        __m512i itot[4], mtot[4];
        int32_t sp[4][4]; /* [token][sb]: (sum of sub-block 2sb, of 2sb + 1) as int16s */
        for (int t = 0; t < T; t++) {
            const uint8_t *xb = x + (size_t)t * x_stride + (size_t)i * XBLK;
            float yd;
            memcpy(&yd, xb, 4);
            dd[t] = _mm512_mul_ps(dw, _mm512_set1_ps(yd));
            dm[t] = _mm512_mul_ps(dmw, _mm512_set1_ps(yd));
            /* the 16 bsums pairwise (|sum| <= 4064: exact in int16): per 128-bit half S(0..3),
             * S(4..7) in its low 8 bytes, so dwords (S(2s), S(2s + 1)) in sb order */
            const __m256i bs = _mm256_loadu_si256((const __m256i *)(xb + XBSUMS));
            const __m256i h = _mm256_hadd_epi16(bs, bs);
            _mm_storel_epi64((__m128i *)&sp[t][0], _mm256_castsi256_si128(h));
            _mm_storel_epi64((__m128i *)&sp[t][2], _mm256_extracti128_si256(h, 1));
            itot[t] = mtot[t] = _mm512_setzero_si512();
        }
        for (int s = 0; s < 4; s++) {
            const __m512i SW = SC[s / 2], MW = MN[s / 2];
            const __m512i sc0 = _mm512_shuffle_epi8(SW, _mm512_load_si512(k_sc[s % 2][0]));
            const __m512i sc1 = _mm512_shuffle_epi8(SW, _mm512_load_si512(k_sc[s % 2][1]));
            const __m512i mnp = _mm512_shuffle_epi8(MW, _mm512_load_si512(k_mn[s % 2]));
            /* several tokens, a group's first tile (the later ones find it in L1 / L2): the next
             * super-block (for the last, the next group's), 9 lines a sb */
            if (T > 1 && first)
#pragma GCC unroll 9
                for (int l = 0; l < 9; l++)
                    _mm_prefetch((const char *)blk + TSR_Q4KL_SB_BYTES + 64 * (9 * s + l),
                                 _MM_HINT_T0);
            __m512i d0[4], d1[4];
            for (int t = 0; t < T; t++) d0[t] = d1[t] = _mm512_setzero_si512();
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                const __m512i v = _mm512_loadu_si512(blk + OFF_Q + 64 * (8 * s + j));
                const __m512i lo = _mm512_and_si512(v, m4);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
#pragma GCC unroll 4
                for (int t = 0; t < T; t++) {
                    const uint8_t *y = x + (size_t)t * x_stride + (size_t)i * XBLK + XQS + 64 * s;
                    d0[t] = _mm512_dpbusd_epi32(d0[t], lo, _mm512_set1_epi32(rd32(y + 4 * j)));
                    d1[t] = _mm512_dpbusd_epi32(d1[t], hi, _mm512_set1_epi32(rd32(y + 32 + 4 * j)));
                }
            }
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) {
                const __m512i I = _mm512_add_epi32(_mm512_mullo_epi32(d0[t], sc0),
                                                   _mm512_mullo_epi32(d1[t], sc1));
                const __m512i M =
                    _mm512_dpwssd_epi32(_mm512_setzero_si512(), mnp, _mm512_set1_epi32(sp[t][s]));
                if (G) {
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(I), dd[t], acc[t]);
                    accm[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(M), dm[t], accm[t]);
                } else {
                    itot[t] = _mm512_add_epi32(itot[t], I);
                    mtot[t] = _mm512_add_epi32(mtot[t], M);
                }
            }
        }
        if (!G)
            for (int t = 0; t < T; t++) {
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(itot[t]), dd[t], acc[t]);
                accm[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(mtot[t]), dm[t], accm[t]);
            }
    }
    for (int t = 0; t < T; t++) out[t] = _mm512_sub_ps(acc[t], accm[t]);
}

/* ---- AVX2: the same walk, a group's 16 rows as two ymm halves of 8 ----
 * Per super-block and half: the 8 rows' scales and mins unpacked as above (8 rows a ymm);
 * per 64 elements the 8 nibble vectors split once for the tile's tokens; per token 8
 * vpmaddubsw for each sub-block summed in int16 (exact: each at most 2 * 15 * 128 = 3840,
 * eight of them 30720 < 32768), one vpmaddwd of the sums by the (scale, scale) int16 pair
 * of each row (the scaled sub-block dot, exact: no vpmulld), one vpmaddwd of the (min, min)
 * pairs with the token's two sub-block sums; then the orders as above. Exact integers
 * throughout, so the same bits. Both halves in one super-block step (one stream, in order).
 * Every tile prefetches into L1 ahead of its stream: AMD Zen 3, one token streaming 38 MB,
 * 1 thread, 1.04-1.20 -> 0.76-0.85 ns per (row, 32 elements) with 2 super-blocks ahead (1
 * ahead 0.80, 4 ahead 1.07-1.09); 1B Q4_K_M decode, 2 threads, 7 alternated pairs:
 * 34.0-40.6 against 32.7-37.6 tokens/s (6 of 7 faster), 2026-12-07. Those 36 lines went
 * out as one burst in the first half's steps, none in the second's; spread over all 8 steps
 * (4 or 5 lines each), 1.5 super-blocks ahead, the stream reads faster again
 * (tests/bench_gemv_stream, 1 GiB, alternated, one token's share of the plain read: 2
 * threads 0.69-0.82 as a burst against 0.81-0.90 spread 2 ahead and 0.82-0.87 spread 1.5
 * ahead (1 ahead 0.69-0.93, 3 ahead 0.75, 4 ahead 0.73-0.78); 1 thread 0.73 against
 * 0.78-0.90); 1B Q4_K_M decode, 2 threads, 4 alternated pairs: 36.2-39.0 against 30.7-35.4
 * tokens/s (2026-12-07). */
#define QKL_AVX2          __attribute__((target("avx2,fma,f16c")))
#define QKL_AVX2_TMAX     TSR_LANES_AVX2_TMAX
#define QKL_AVX2_PF_BYTES (3 * TSR_Q4KL_SB_BYTES / 2)

/* vpshufb masks (per 128-bit lane) giving each row's dword the int16 pair (s, s) of scale
 * byte k = 2 (sb % 2) (k_sp[h][0]) or k + 1 (k_sp[h][1]) of its scale word. */
static uint8_t k_sp[2][2][32] __attribute__((aligned(32)));

__attribute__((constructor)) static void qkl_masks_avx2(void)
{
    for (int h = 0; h < 2; h++)
        for (int p = 0; p < 32; p++) {
            const int base = ((p % 16) / 4) * 4 + 2 * h;
            k_sp[h][0][p] = p % 2 == 0 ? (uint8_t)base : 0x80;
            k_sp[h][1][p] = p % 2 == 0 ? (uint8_t)(base + 1) : 0x80;
        }
}

static inline __attribute__((always_inline)) QKL_AVX2 void
tile_avx2(const int T, const bool G, int64_t nsb, const uint8_t *grp, const uint8_t *x,
          size_t x_stride, __m256 out[][2])
{
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc[QKL_AVX2_TMAX][2], accm[QKL_AVX2_TMAX][2];
    for (int t = 0; t < T; t++)
        for (int h = 0; h < 2; h++) acc[t][h] = accm[t][h] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nsb; i++) {
        const uint8_t *blk = grp + (size_t)i * TSR_Q4KL_SB_BYTES;
        int32_t sp[QKL_AVX2_TMAX][4]; /* [token][sb]: (sum of sub-block 2sb, of 2sb + 1) */
        float yd[QKL_AVX2_TMAX];
        for (int t = 0; t < T; t++) {
            const uint8_t *xb = x + (size_t)t * x_stride + (size_t)i * XBLK;
            memcpy(&yd[t], xb, 4);
            const __m256i bs = _mm256_loadu_si256((const __m256i *)(xb + XBSUMS));
            const __m256i hs = _mm256_hadd_epi16(bs, bs);
            _mm_storel_epi64((__m128i *)&sp[t][0], _mm256_castsi256_si128(hs));
            _mm_storel_epi64((__m128i *)&sp[t][2], _mm256_extracti128_si256(hs, 1));
        }
#pragma GCC unroll 1
        for (int h = 0; h < 2; h++) {
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16 * h)));
            const __m256 dmw =
                _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 32 + 16 * h)));
            const uint8_t *bu = blk + OFF_U + 32 * h;
            __m256i SC[2], MN[2];
            tsr_q4_K_scales_mins_x8(_mm256_loadu_si256((const __m256i *)bu),
                                    _mm256_loadu_si256((const __m256i *)(bu + 64)),
                                    _mm256_loadu_si256((const __m256i *)(bu + 128)), SC, MN);
            /* the scale products d_w * d_y and dmin_w * d_y of the half's 8 rows, per token */
            __m256 dd[QKL_AVX2_TMAX], dm[QKL_AVX2_TMAX];
            __m256i itot[QKL_AVX2_TMAX], mtot[QKL_AVX2_TMAX];
            for (int t = 0; t < T; t++) {
                dd[t] = _mm256_mul_ps(dw, _mm256_set1_ps(yd[t]));
                dm[t] = _mm256_mul_ps(dmw, _mm256_set1_ps(yd[t]));
                itot[t] = mtot[t] = _mm256_setzero_si256();
            }
#pragma GCC unroll 1
            for (int s = 0; s < 4; s++) {
                const __m256i SW = SC[s / 2], MW = MN[s / 2];
                const __m256i sc0 =
                    _mm256_shuffle_epi8(SW, _mm256_load_si256((const __m256i *)k_sp[s % 2][0]));
                const __m256i sc1 =
                    _mm256_shuffle_epi8(SW, _mm256_load_si256((const __m256i *)k_sp[s % 2][1]));
                const __m256i mnp =
                    _mm256_shuffle_epi8(MW, _mm256_load_si256((const __m256i *)k_mn[s % 2]));
                __m256i d0[QKL_AVX2_TMAX], d1[QKL_AVX2_TMAX];
                for (int t = 0; t < T; t++) d0[t] = d1[t] = _mm256_setzero_si256();
                const uint8_t *bq = blk + OFF_Q + 64 * 8 * s + 32 * h;
                /* 1.5 super-blocks ahead into L1, the 36 lines spread over the 8 (half,
                 * 64 elements) steps: 4 or 5 a step */
                const int u = 4 * h + s;
                for (int l = u * 36 / 8; l < (u + 1) * 36 / 8; l++)
                    _mm_prefetch((const char *)blk + QKL_AVX2_PF_BYTES + 64 * l, _MM_HINT_T0);
#pragma GCC unroll 8
                for (int j = 0; j < 8; j++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(bq + 64 * j));
                    const __m256i lo = _mm256_and_si256(v, m4);
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
#pragma GCC unroll 4
                    for (int t = 0; t < T; t++) {
                        const uint8_t *y =
                            x + (size_t)t * x_stride + (size_t)i * XBLK + XQS + 64 * s;
                        d0[t] = _mm256_add_epi16(
                            d0[t], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(rd32(y + 4 * j))));
                        d1[t] = _mm256_add_epi16(
                            d1[t],
                            _mm256_maddubs_epi16(hi, _mm256_set1_epi32(rd32(y + 32 + 4 * j))));
                    }
                }
#pragma GCC unroll 4
                for (int t = 0; t < T; t++) {
                    const __m256i I = _mm256_add_epi32(_mm256_madd_epi16(d0[t], sc0),
                                                       _mm256_madd_epi16(d1[t], sc1));
                    const __m256i M = _mm256_madd_epi16(mnp, _mm256_set1_epi32(sp[t][s]));
                    if (G) {
                        acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(I), dd[t], acc[t][h]);
                        accm[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(M), dm[t], accm[t][h]);
                    } else {
                        itot[t] = _mm256_add_epi32(itot[t], I);
                        mtot[t] = _mm256_add_epi32(mtot[t], M);
                    }
                }
            }
            if (!G)
                for (int t = 0; t < T; t++) {
                    acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(itot[t]), dd[t], acc[t][h]);
                    accm[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mtot[t]), dm[t], accm[t][h]);
                }
        }
    }
    for (int t = 0; t < T; t++)
        for (int h = 0; h < 2; h++) out[t][h] = _mm256_sub_ps(acc[t][h], accm[t][h]);
}

#define QKL_TILE_AVX2(T, G, name)                                                                  \
    static QKL_AVX2 void name(int64_t nsb, const uint8_t *grp, const uint8_t *x, size_t xs,        \
                              __m256 out[][2])                                                     \
    {                                                                                              \
        tile_avx2(T, G, nsb, grp, x, xs, out);                                                     \
    }
QKL_TILE_AVX2(1, false, tav1)
QKL_TILE_AVX2(2, false, tav2)
QKL_TILE_AVX2(3, false, tav3)
QKL_TILE_AVX2(4, false, tav4)
QKL_TILE_AVX2(1, true, tag1)
QKL_TILE_AVX2(2, true, tag2)
QKL_TILE_AVX2(3, true, tag3)
QKL_TILE_AVX2(4, true, tag4)

static const tsr_lanes_tile_avx2_fn k_tiles_avx2[2][QKL_AVX2_TMAX + 1] = {
    {NULL, tav1, tav2, tav3, tav4}, {NULL, tag1, tag2, tag3, tag4}};

static QKL_AVX2 void dot_avx2(int64_t nsb, const uint8_t *packed, int64_t r0, int64_t n_rows,
                              int32_t n_tok, const uint8_t *x, size_t x_stride, bool gemm, float *y,
                              size_t y_stride)
{
    tsr_lanes_run_avx2(k_tiles_avx2[gemm], QKL_AVX2_TMAX, nsb, (size_t)nsb * TSR_Q4KL_SB_BYTES,
                       packed, r0, n_rows, n_tok, x, x_stride, y, y_stride);
}

#define QKL_TILE(T, G, name)                                                                       \
    static QKL_VNNI void name(int64_t nsb, const uint8_t *grp, const uint8_t *x, size_t xs,        \
                              __m512 *out, bool first)                                             \
    {                                                                                              \
        tile(T, G, nsb, grp, x, xs, out, first);                                                   \
    }
QKL_TILE(1, false, tv1)
QKL_TILE(2, false, tv2)
QKL_TILE(3, false, tv3)
QKL_TILE(4, false, tv4)
QKL_TILE(1, true, tg1)
QKL_TILE(2, true, tg2)
QKL_TILE(3, true, tg3)
QKL_TILE(4, true, tg4)

static const tsr_lanes_tile_fn k_tiles[2][5] = {{NULL, tv1, tv2, tv3, tv4},
                                                {NULL, tg1, tg2, tg3, tg4}};

/* tiles of at most 4 tokens (8 spill), as even as can be (9 -> 3 + 3 + 3) */
static QKL_VNNI void dot_vnni(int64_t nsb, const uint8_t *packed, int64_t r0, int64_t n_rows,
                              int32_t n_tok, const uint8_t *x, size_t x_stride, bool gemm, float *y,
                              size_t y_stride)
{
    tsr_lanes_run(k_tiles[gemm], 4, nsb, (size_t)nsb * TSR_Q4KL_SB_BYTES, packed, r0, n_rows, n_tok,
                  x, x_stride, y, y_stride);
}
#endif

bool tsr_q4kl_prompt_file_layout(int isa, int32_t n_tok)
{
    return isa == TSR_GGML_AVX2 && n_tok >= TSR_Q4KL_AVX2_FILE_MIN_TOKENS;
}

void tsr_q4kl_dot(int isa, int64_t n, const void *packed, int64_t r0, int64_t n_rows, int32_t n_tok,
                  const void *x, size_t x_stride, bool gemm, float *y, size_t y_stride)
{
    const int64_t nsb = n / 256;
    if (n_rows <= 0 || n_tok <= 0) return;
#if QKL_X86
    if (isa == TSR_GGML_VNNI) {
        dot_vnni(nsb, packed, r0, n_rows, n_tok, x, x_stride, gemm, y, y_stride);
        return;
    }
    if (isa == TSR_GGML_AVX2) {
        dot_avx2(nsb, packed, r0, n_rows, n_tok, x, x_stride, gemm, y, y_stride);
        return;
    }
#endif
    (void)isa;
    dot_scalar(nsb, packed, r0, n_rows, n_tok, x, x_stride, gemm, y, y_stride);
}
