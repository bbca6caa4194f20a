/* q4k_gemm.c — see q4k_gemm.h. Two SIMD kernels, both in the reference's order:
 * - AVX-512 VNNI (gemm_z512): one zmm lane per weight row, tiles of 32 rows x 4 tokens. A
 *   tile's super-block is unpacked once (gathers: any row layout) into nibble vectors that
 *   every token of an L2-sized block then multiplies with vpdpbusd, so no horizontal sums and
 *   one fma per 16 rows; 2.1x the AVX2 tile's speed (2048 x 2048 x 128 tokens, 1 thread: 5.0-5.3
 *   vs 11.2 ms).
 * - AVX2 (tile_avx2): tiles of 2 weight rows x 4 tokens: a row's nibbles and scales are
 *   unpacked once per super-block for the 4 tokens, each activation load serves both rows,
 *   and the 4 tokens' accumulator chains of a row run in the 4 lanes of one float vector
 *   (each lane is one token's sequential chain, so the lanes hide each other's FMA latency
 *   without changing any order). */
#include "kernels/q4k_gemm.h"

#include "kernels/dot_ggml.h"
#include "kernels/quant.h"

#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define QG_X86 1
#include <immintrin.h>
#else
#define QG_X86 0
#endif

typedef struct {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[12];
    uint8_t qs[128];
} qg_q4_K;

typedef struct {
    float d;
    int8_t qs[256];
    int16_t bsums[16];
} qg_q8_K;

_Static_assert(sizeof(qg_q4_K) == 144, "Q4_K block");
_Static_assert(sizeof(qg_q8_K) == 292, "Q8_K block");

/* Byte offset of row r's first super-block. */
static inline size_t row_off(int64_t r, int64_t rpg, size_t group_stride, size_t row_stride)
{
    return (size_t)(r / rpg) * group_stride + (size_t)(r % rpg) * row_stride;
}

/* The AVX2 kernel for n_tok tokens: gemm_y256 from QY_MIN_TOKENS (it unpacks each
 * super-block of 8 rows once, which a few tokens do not repay: 2048 x 512, 1 thread, AMD Zen 3,
 * against tile_avx2: 4 tokens 0.86x, 5 1.5x, 8 1.2x, 16 1.5x, 128 1.8-2.0x), else tile_avx2.
 * g_y256: -1 not read yet, 0 tile_avx2 always (environment TSR_Q4K_Y256=0), 1 the default,
 * 2 gemm_y256 for every token count (tests). */
enum { QY_MIN_TOKENS = 5 };
static _Atomic int g_y256 = -1;

void tsr_q4k_gemm_set_y256(int mode)
{
    atomic_store_explicit(&g_y256, mode < 0 ? -1 : mode > 2 ? 2 : mode, memory_order_relaxed);
}

static bool qy_use(int32_t n_tok)
{
    int v = atomic_load_explicit(&g_y256, memory_order_relaxed);
    if (v < 0) {
        const char *e = getenv("TSR_Q4K_Y256");
        v = e && strcmp(e, "0") == 0 ? 0 : 1;
        atomic_store_explicit(&g_y256, v, memory_order_relaxed);
    }
    return v == 2 || (v == 1 && n_tok >= QY_MIN_TOKENS);
}

/* The reference: one (row, token) pair in the order of q4k_gemm.h. */
static float dot_scalar(int64_t nsb, const uint8_t *wrow, size_t blk_stride, const qg_q8_K *x)
{
    float acc = 0.0f, accm = 0.0f;
    for (int64_t i = 0; i < nsb; i++) {
        const qg_q4_K *w = (const qg_q4_K *)(wrow + (size_t)i * blk_stride);
        uint8_t sm[16];
        tsr_q4_K_scales_mins(w->scales, sm);
        const float dd = tsr_f16_to_f32(w->d) * x[i].d;
        const float dm = tsr_f16_to_f32(w->dmin) * x[i].d;
        for (int sb = 0; sb < 4; sb++) {
            int32_t isum = 0, imin = 0;
            for (int h = 0; h < 2; h++) {
                const int g = 2 * sb + h;
                const int8_t *y = x[i].qs + 32 * g;
                int32_t s = 0;
                for (int l = 0; l < 32; l++) s += ((w->qs[32 * sb + l] >> (4 * h)) & 0xF) * y[l];
                isum += sm[g] * s;
                imin += sm[8 + g] * (x[i].bsums[2 * g] + x[i].bsums[2 * g + 1]);
            }
            acc = fmaf((float)isum, dd, acc);
            accm = fmaf((float)imin, dm, accm);
        }
    }
    return acc - accm;
}

#if QG_X86

#define QG_AVX2   __attribute__((target("avx2,fma,f16c")))
#define QG_INLINE static inline __attribute__((always_inline))

#include "kernels/x86kquant.h"
#include "kernels/x86hsum.h"

/* fname##_r(R, T, ...) for the runtime T (1..4), R a constant: QG_DEF_RT's body per row set */
#define QG_CALL_T(fname, R, T)                                                                     \
    do {                                                                                           \
        if ((T) == 4)                                                                              \
            fname##_r(R, 4, s, xb, acc);                                                           \
        else if ((T) == 3)                                                                         \
            fname##_r(R, 3, s, xb, acc);                                                           \
        else if ((T) == 2)                                                                         \
            fname##_r(R, 2, s, xb, acc);                                                           \
        else                                                                                       \
            fname##_r(R, 1, s, xb, acc);                                                           \
    } while (0)
/* fname(R, T, ...) for the rows-in-lanes kernels: fname##_r(R, T, ...) with the row sets R
 * (1, 2) and tokens T (1..4) constants after inlining, so each shape gets its loops unrolled
 * and its accumulators in registers. SBLK: the unpacked super-block type, VEC the lanes'. */
#define QG_DEF_RT(fname, ATTR, SBLK, VEC)                                                          \
    ATTR static void fname(int R, int T, const SBLK *const s[2], const qg_q8_K *const xb[4],       \
                           VEC(*acc)[2][2])                                                        \
    {                                                                                              \
        if (R == 2)                                                                                \
            QG_CALL_T(fname, 2, T);                                                                \
        else                                                                                       \
            QG_CALL_T(fname, 1, T);                                                                \
    }

/* Tokens per block of a kernel's walk: as many Q8_K rows of nsb super-blocks as 640 KiB (L2)
 * holds, a multiple of 4 (the tiles' tokens), at least 4 and at most max_tb. */
static int32_t qg_token_block(int64_t nsb, int32_t max_tb)
{
    int32_t tb = (int32_t)((640 << 10) / ((size_t)nsb * sizeof(qg_q8_K)) / 4 * 4);
    if (tb < 4) tb = 4;
    return tb > max_tb ? max_tb : tb;
}

/* A row set of n rows from row rq, nr of them in the matrix (the rest repeat its last row:
 * computed, never stored): off[r] = the byte offset of row r's first super-block from the
 * set's first row's, whose offset from the matrix start it returns. */
static size_t qg_set_offsets(int64_t rq, int nr, int n, int64_t rpg, size_t group_stride,
                             size_t row_stride, int32_t *off)
{
    const size_t base = row_off(rq, rpg, group_stride, row_stride);
    for (int r = 0; r < n; r++)
        off[r] =
            (int32_t)(row_off(rq + (r < nr ? r : nr - 1), rpg, group_stride, row_stride) - base);
    return base;
}

/* [sum(a), sum(b), sum(c), sum(d)] of four vectors of 8 int32 lanes (exact). */
QG_AVX2 QG_INLINE __m128i qg_hsum4(__m256i a, __m256i b, __m256i c, __m256i d)
{
    const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

#define QG_SACC_AVX2(acc, p16, s16) _mm256_add_epi32(acc, _mm256_madd_epi16(p16, s16))

/* R rows (1 or 2, a constant after inlining; row r's super-block i at w[r] + i * blk_stride)
 * against 4 tokens x[0..3] (rows of Q8_K; repeat a pointer for fewer tokens): out[r][t] =
 * GEMM-order dot. Integer work as quant.c's Q4_K row dot (vpmaddubsw into int16 pairs, then
 * the sub-block scale); per 64 elements the 4 tokens' int32 lanes are reduced to one lane per
 * token and FMAed into that row's chain (lane t = token t's sequential chain). Two rows share
 * each activation load. */
#define DEF_TILE(fname, ATTR, SACC)                                                                \
    ATTR QG_INLINE void fname##_r(const int R, int64_t nsb, const uint8_t *const w0[2],            \
                                  size_t blk_stride, const qg_q8_K *const x[4], float out[2][4])   \
    {                                                                                              \
        const __m256i m4 = _mm256_set1_epi8(0x0F);                                                 \
        const __m256i dup16 = _mm256_load_si256((const __m256i *)tsr_k_dup16);                     \
        __m128 acc[2], accm[2];                                                                    \
        for (int r = 0; r < R; r++) acc[r] = accm[r] = _mm_setzero_ps();                           \
        for (int64_t i = 0; i < nsb; i++) {                                                        \
            const __m128 dx = _mm_set_ps(x[3][i].d, x[2][i].d, x[1][i].d, x[0][i].d);              \
            __m256i bs[4];                                                                         \
            _Pragma("GCC unroll 4") for (int t = 0; t < 4; t++) bs[t] =                            \
                _mm256_loadu_si256((const __m256i *)x[t][i].bsums);                                \
            const qg_q4_K *w[2];                                                                   \
            __m256i sc[2];                                                                         \
            __m128 dd[2], dm[2];                                                                   \
            __m128i msb[2][4];                                                                     \
            _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)                                    \
            {                                                                                      \
                w[r] = (const qg_q4_K *)(w0[r] + (size_t)i * blk_stride);                          \
                const __m256i sm16 = tsr_q4_K_sm_x16(w[r]->scales);                                \
                sc[r] = _mm256_permute2x128_si256(sm16, sm16, 0x00);                               \
                const __m256i mins2 =                                                              \
                    _mm256_shuffle_epi8(_mm256_permute2x128_si256(sm16, sm16, 0x11), dup16);       \
                dd[r] = _mm_mul_ps(_mm_set1_ps(_cvtsh_ss(w[r]->d)), dx);                           \
                dm[r] = _mm_mul_ps(_mm_set1_ps(_cvtsh_ss(w[r]->dmin)), dx);                        \
                /* mins: lane g of madd = mn_g * (bsum_2g + bsum_2g+1); per 128-bit lane of m01:   \
                 * [t0 M(2k), t0 M(2k+1), t1 .., t1 ..] (k = 0 low, 1 high) */                     \
                const __m256 m01 = _mm256_castsi256_ps(_mm256_hadd_epi32(                          \
                    _mm256_madd_epi16(mins2, bs[0]), _mm256_madd_epi16(mins2, bs[1])));            \
                const __m256 m23 = _mm256_castsi256_ps(_mm256_hadd_epi32(                          \
                    _mm256_madd_epi16(mins2, bs[2]), _mm256_madd_epi16(mins2, bs[3])));            \
                const __m256 me = _mm256_shuffle_ps(m01, m23, _MM_SHUFFLE(2, 0, 2, 0));            \
                const __m256 mo = _mm256_shuffle_ps(m01, m23, _MM_SHUFFLE(3, 1, 3, 1));            \
                msb[r][0] = _mm_castps_si128(_mm256_castps256_ps128(me));   /* sb 0 */             \
                msb[r][1] = _mm_castps_si128(_mm256_castps256_ps128(mo));   /* sb 1 */             \
                msb[r][2] = _mm_castps_si128(_mm256_extractf128_ps(me, 1)); /* sb 2 */             \
                msb[r][3] = _mm_castps_si128(_mm256_extractf128_ps(mo, 1)); /* sb 3 */             \
            }                                                                                      \
            _Pragma("GCC unroll 4") for (int sb = 0; sb < 4; sb++)                                 \
            {                                                                                      \
                const __m256i shl = _mm256_load_si256((const __m256i *)tsr_k_shuf_q4_K[2 * sb]);   \
                const __m256i shh =                                                                \
                    _mm256_load_si256((const __m256i *)tsr_k_shuf_q4_K[2 * sb + 1]);               \
                __m256i ql[2], qh[2], scl[2], sch[2], p[2][4];                                     \
                _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)                                \
                {                                                                                  \
                    const __m256i q4 = _mm256_loadu_si256((const __m256i *)(w[r]->qs + 32 * sb));  \
                    ql[r] = _mm256_and_si256(q4, m4);                                              \
                    qh[r] = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);                        \
                    scl[r] = _mm256_shuffle_epi8(sc[r], shl);                                      \
                    sch[r] = _mm256_shuffle_epi8(sc[r], shh);                                      \
                }                                                                                  \
                _Pragma("GCC unroll 4") for (int t = 0; t < 4; t++)                                \
                {                                                                                  \
                    const int8_t *y = x[t][i].qs + 64 * sb;                                        \
                    const __m256i yl = _mm256_loadu_si256((const __m256i *)y);                     \
                    const __m256i yh = _mm256_loadu_si256((const __m256i *)(y + 32));              \
                    _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)                            \
                    {                                                                              \
                        const __m256i s0 =                                                         \
                            SACC(_mm256_setzero_si256(), _mm256_maddubs_epi16(ql[r], yl), scl[r]); \
                        p[r][t] = SACC(s0, _mm256_maddubs_epi16(qh[r], yh), sch[r]);               \
                    }                                                                              \
                }                                                                                  \
                _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)                                \
                {                                                                                  \
                    const __m128i isb = qg_hsum4(p[r][0], p[r][1], p[r][2], p[r][3]);              \
                    acc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(isb), dd[r], acc[r]);                    \
                    accm[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(msb[r][sb]), dm[r], accm[r]);           \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int r = 0; r < R; r++) _mm_storeu_ps(out[r], _mm_sub_ps(acc[r], accm[r]));            \
    }                                                                                              \
    ATTR static void fname(int R, int64_t nsb, const uint8_t *const w0[2], size_t blk_stride,      \
                           const qg_q8_K *const x[4], float out[2][4])                             \
    {                                                                                              \
        if (R == 2)                                                                                \
            fname##_r(2, nsb, w0, blk_stride, x, out);                                             \
        else                                                                                       \
            fname##_r(1, nsb, w0, blk_stride, x, out);                                             \
    }

DEF_TILE(tile_avx2, QG_AVX2, QG_SACC_AVX2)

/* AVX2, several tokens: tiles of 16 rows (two sets of 8, one 32-bit ymm lane per row) x 4
 * tokens, the structure of gemm_z512 below without VNNI. Per super-block a tile's rows are
 * unpacked once into qy_sblk (L1), then every token of an L2-sized block runs over it:
 * S_g = <q[g], y[g]> as 8 vpmaddubsw of the row's 4 nibbles (lane r) by the token's 4 bytes
 * (broadcast from memory), summed in int16 (each vpmaddubsw pair is at most 2 * 15 * 128 =
 * 3840 in magnitude, 8 of them 30720 < 2^15: exact), then vpmaddwd by the pair (sc_g, sc_g)
 * gives sc_g * S_g in int32; I = the two sub-blocks' sum (exact int32, as the reference);
 * M = vpmaddwd of the row's (mn[2sb], mn[2sb+1]) by the token's bsum pair sums; then the two
 * fma chains of q4k_gemm.h per lane in the reference's order. Against tile_avx2 (2 rows x 4
 * tokens, whose sums need horizontal adds): no horizontal work and one fma per 8 rows. */
enum { QY_ROWS = 8, QY_TOK = 4, QY_MAX_TB = 128 };
_Static_assert(QY_TOK == 4, "QG_DEF_RT dispatches 1..4 tokens");

/* One super-block of 8 rows, unpacked (lane r: row r). */
typedef struct {
    __m256i q[8][8]; /* [g][k]: sub-block g's elements 32g + 4k .. + 3 as bytes 0..15 */
    __m256i sc[8];   /* [g]: int16 pair (sc_g, sc_g) */
    __m256i mp[4];   /* [sb]: int16 pair (mn[2sb], mn[2sb+1]) */
    __m256 d, dmin;
} qy_sblk;

/* Unpack super-block i of 8 rows: row r's block at base + off[r] (byte offsets). Loads and
 * transposes (gathers were 2-3x slower on AMD Zen 3). */
QG_AVX2 QG_INLINE void qy_unpack(const uint8_t *base, const int32_t off[QY_ROWS], qy_sblk *s)
{
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const qg_q4_K *w[QY_ROWS];
    for (int r = 0; r < QY_ROWS; r++) w[r] = (const qg_q4_K *)(base + off[r]);
    __m256i v[8], o[8];
    /* d | dmin << 16 per row, split into the two fp16 halves */
    uint32_t dm[QY_ROWS];
    for (int r = 0; r < QY_ROWS; r++) memcpy(&dm[r], w[r], 4);
    const __m256i dmv = _mm256_loadu_si256((const __m256i *)dm);
    const __m256i pk = _mm256_permute4x64_epi64(
        _mm256_packus_epi32(_mm256_and_si256(dmv, _mm256_set1_epi32(0xFFFF)),
                            _mm256_srli_epi32(dmv, 16)),
        _MM_SHUFFLE(3, 1, 2, 0));
    s->d = _mm256_cvtph_ps(_mm256_castsi256_si128(pk));
    s->dmin = _mm256_cvtph_ps(_mm256_extracti128_si256(pk, 1));
    /* scales: row r's dword g = (sc_g, sc_g); mins: dword sb = (mn[2sb], mn[2sb+1]) */
    __m256i mins[QY_ROWS];
    for (int r = 0; r < QY_ROWS; r++) {
        const __m256i sm16 = tsr_q4_K_sm_x16(w[r]->scales);
        const __m256i sc = _mm256_permute4x64_epi64(sm16, _MM_SHUFFLE(1, 1, 0, 0));
        v[r] = _mm256_unpacklo_epi16(sc, sc); /* lane-wise: g 0-3 low, 4-7 high */
        mins[r] = sm16;
    }
    tsr_transpose8x8_epi32(v, s->sc);
    for (int r = 0; r < 4; r++) /* [row r's 4 min pairs | row r + 4's] */
        v[r] = _mm256_permute2x128_si256(mins[r], mins[r + 4], 0x31);
    {
        const __m256i t0 = _mm256_unpacklo_epi32(v[0], v[1]),
                      t1 = _mm256_unpackhi_epi32(v[0], v[1]);
        const __m256i t2 = _mm256_unpacklo_epi32(v[2], v[3]),
                      t3 = _mm256_unpackhi_epi32(v[2], v[3]);
        /* lanes per 128 bits: rows 0-3 (low) / 4-7 (high) of dword sb */
        const __m256i a0 = _mm256_unpacklo_epi64(t0, t2), a1 = _mm256_unpackhi_epi64(t0, t2);
        const __m256i a2 = _mm256_unpacklo_epi64(t1, t3), a3 = _mm256_unpackhi_epi64(t1, t3);
        /* row order 0, 1, 2, 3 | 4, 5, 6, 7 is lane r already */
        s->mp[0] = a0;
        s->mp[1] = a1;
        s->mp[2] = a2;
        s->mp[3] = a3;
    }
    /* qs byte 32j + l: low nibble element 64j + l (sub-block 2j), high 64j + 32 + l */
    for (int j = 0; j < 4; j++) {
        for (int r = 0; r < QY_ROWS; r++)
            v[r] = _mm256_loadu_si256((const __m256i *)(w[r]->qs + 32 * j));
        tsr_transpose8x8_epi32(v, o);
        for (int c = 0; c < 8; c++) {
            s->q[2 * j][c] = _mm256_and_si256(o[c], m4);
            s->q[2 * j + 1][c] = _mm256_and_si256(_mm256_srli_epi16(o[c], 4), m4);
        }
    }
}

/* R row sets of 8 (s[0..R-1]) x T tokens (constants after inlining) over one super-block:
 * xb[t] is token t's Q8_K block of it; acc[t][r][0] / [1] the acc / accm chains of token t
 * and row set r. Each activation broadcast serves the R row sets, each weight load the T
 * tokens. */
QG_AVX2 QG_INLINE void qy_tok_r(const int R, const int T, const qy_sblk *const s[2],
                                const qg_q8_K *const xb[QY_TOK], __m256 (*acc)[2][2])
{
    for (int t = 0; t < T; t++) {
        const qg_q8_K *x = xb[t];
        /* bsum pair sums of the 8 sub-blocks: int16 (g 2sb, 2sb+1) = dword sb */
        uint32_t bp[4];
        const __m128i b = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)x->bsums),
                                         _mm_loadu_si128((const __m128i *)(x->bsums + 8)));
        _mm_storeu_si128((__m128i *)bp, b);
        const __m256 dy = _mm256_set1_ps(x->d);
        __m256 a0[2], a1[2];
        _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)
        {
            a0[r] = acc[t][r][0];
            a1[r] = acc[t][r][1];
        }
        for (int sb = 0; sb < 4; sb++) {
            __m256i isb[2];
            _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++)
            {
                const int g = 2 * sb + h;
                __m256i s16[2];
                _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++)
                {
                    int32_t v;
                    memcpy(&v, x->qs + 32 * g + 4 * k, 4);
                    const __m256i y = _mm256_set1_epi32(v);
                    _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)
                    {
                        const __m256i p = _mm256_maddubs_epi16(s[r]->q[g][k], y);
                        s16[r] = k == 0 ? p : _mm256_add_epi16(s16[r], p);
                    }
                }
                _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)
                {
                    const __m256i m = _mm256_madd_epi16(s16[r], s[r]->sc[g]);
                    isb[r] = h == 0 ? m : _mm256_add_epi32(isb[r], m);
                }
            }
            const __m256i bpt = _mm256_set1_epi32((int32_t)bp[sb]);
            _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)
            {
                a0[r] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(isb[r]), _mm256_mul_ps(s[r]->d, dy), a0[r]);
                const __m256i m = _mm256_madd_epi16(s[r]->mp[sb], bpt);
                a1[r] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), _mm256_mul_ps(s[r]->dmin, dy), a1[r]);
            }
        }
        _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)
        {
            acc[t][r][0] = a0[r];
            acc[t][r][1] = a1[r];
        }
    }
}

QG_DEF_RT(qy_tok, QG_AVX2, qy_sblk, __m256)

/* The whole product on AVX2 for several tokens; row r's super-block i at w + row_off(r) +
 * i * blk_stride. Tiles of 16 rows (two sets of 8), 8 for a last short tile. */
QG_AVX2 static void gemm_y256(int64_t nsb, const uint8_t *w, int64_t rpg, size_t group_stride,
                              size_t row_stride, size_t blk_stride, int64_t n_rows, int32_t n_tok,
                              const uint8_t *x, size_t x_stride, float *y, size_t y_stride)
{
    /* Tokens in blocks whose activations stay in L2 (as tile_avx2) and whose accumulators
     * (4 ymm per token) stay in L1. */
    const int32_t tb = qg_token_block(nsb, QY_MAX_TB);
    __m256 acc[QY_MAX_TB][2][2];
    qy_sblk sblk[2];
    const qy_sblk *const sp[2] = {&sblk[0], &sblk[1]};
    for (int32_t b0 = 0; b0 < n_tok; b0 += tb) {
        const int32_t bn = n_tok - b0 < tb ? n_tok - b0 : tb;
        for (int64_t r0 = 0; r0 < n_rows;) {
            const int R = n_rows - r0 > QY_ROWS ? 2 : 1;
            int32_t off[2][QY_ROWS];
            const uint8_t *wt[2];
            int nr[2] = {0, 0};
            for (int q = 0; q < R; q++) {
                const int64_t rq = r0 + q * QY_ROWS;
                nr[q] = n_rows - rq < QY_ROWS ? (int)(n_rows - rq) : QY_ROWS;
                wt[q] =
                    w + qg_set_offsets(rq, nr[q], QY_ROWS, rpg, group_stride, row_stride, off[q]);
            }
            for (int32_t t = 0; t < bn; t++)
                for (int q = 0; q < 2; q++) acc[t][q][0] = acc[t][q][1] = _mm256_setzero_ps();
            for (int64_t i = 0; i < nsb; i++) {
                for (int q = 0; q < R; q++)
                    qy_unpack(wt[q] + (size_t)i * blk_stride, off[q], &sblk[q]);
                for (int32_t t0 = 0; t0 < bn; t0 += QY_TOK) {
                    const int nt = bn - t0 < QY_TOK ? bn - t0 : QY_TOK;
                    const qg_q8_K *xb[QY_TOK];
                    for (int t = 0; t < QY_TOK; t++)
                        xb[t] =
                            (const qg_q8_K *)(x + (size_t)(b0 + t0 + (t < nt ? t : 0)) * x_stride) +
                            i;
                    qy_tok(R, nt, sp, xb, acc + t0);
                }
            }
            for (int q = 0; q < R; q++) {
                for (int32_t t = 0; t < bn; t++) {
                    float v[QY_ROWS];
                    _mm256_storeu_ps(v, _mm256_sub_ps(acc[t][q][0], acc[t][q][1]));
                    float *yt = y + (size_t)(b0 + t) * y_stride + (size_t)(r0 + q * QY_ROWS);
                    for (int r = 0; r < nr[q]; r++) yt[r] = v[r];
                }
            }
            r0 += (int64_t)R * QY_ROWS;
        }
    }
}

/* AVX-512 VNNI: tiles of 32 rows (two sets of 16, one zmm lane per row) x 4 tokens. Per
 * super-block a tile's rows are unpacked once into qz_sblk (L1) by gathers, whatever the source
 * layout, then every token of the block runs over it: S_g  = <q[g], y[g]> with vpdpbusd: lane r
 * holds 4 nibbles of row r, the token's 4 bytes broadcast from memory; 8 dpbusd per 32-element
 * sub-block, exact int32; (float)I = fma(S_{2sb+1}, sc[2sb+1], S_2sb * sc[2sb]) in float, exact:
 * |S| <= 15 * 128 * 32 = 61440, each product <= 3.9e6 and the sum <= 7.8e6 < 2^24 are integers that
 * a float holds exactly, so this is the int32 I converted (no rounding anywhere); M    = vpmaddwd
 * of the row's (mn[2sb], mn[2sb+1]) with the token's two bsum pair sums (each |sum| <= 4096 fits
 * int16), exact; then the two fma chains of q4k_gemm.h per lane, super-block by super-block, sb by
 * sb: the order of every (row, token) is the reference's. */
#define QG_Z512                                                                                    \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512dq,avx512vnni")))

enum { QZ_ROWS = 16, QZ_TOK = 4, QZ_MAX_TB = 128 };
_Static_assert(QZ_TOK == 4, "QG_DEF_RT dispatches 1..4 tokens");

/* One super-block of 16 rows, unpacked (lane r: row r). */
typedef struct {
    __m512i q[8][8]; /* [g][k]: sub-block g's elements 32g + 4k .. + 3 as bytes 0..15 */
    __m512 sc[8];    /* sub-block scales as float */
    __m512i mp[4];   /* [sb]: int16 pair (mn[2sb], mn[2sb+1]) */
    __m512 d, dmin;
} qz_sblk;

/* Unpack super-block i of 16 rows: row r's block at base + off[r] (byte offsets). */
QG_Z512 QG_INLINE void qz_unpack(const uint8_t *base, __m512i off, qz_sblk *s)
{
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i lo8 = _mm512_set1_epi32(0xFF);
    const __m512i dm = _mm512_i32gather_epi32(off, base, 1); /* d | dmin << 16 */
    s->d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
    s->dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16)));
    const __m512i u0 = _mm512_i32gather_epi32(off, base + 4, 1);
    const __m512i u1 = _mm512_i32gather_epi32(off, base + 8, 1);
    const __m512i u2 = _mm512_i32gather_epi32(off, base + 12, 1);
    /* get_scale_min_k4 on 16 rows at once: bytes of sc[0] = scales 0..3, sc[1] 4..7, mn[*] */
    __m512i sc[2], mns[2];
    tsr_q4_K_scales_mins_x16(u0, u1, u2, sc, mns);
    for (int g = 0; g < 4; g++) {
        s->sc[g] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(sc[0], 8 * g), lo8));
        s->sc[4 + g] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(sc[1], 8 * g), lo8));
    }
    for (int h = 0; h < 2; h++) {
        const __m512i mn = mns[h];
        s->mp[2 * h] =
            _mm512_or_si512(_mm512_and_si512(mn, lo8),
                            _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(mn, 8), lo8), 16));
        s->mp[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(mn, 16), lo8),
                                           _mm512_slli_epi32(_mm512_srli_epi32(mn, 24), 16));
    }
    /* qs byte 32sb + l: low nibble element 64sb + l (sub-block 2sb), high 64sb + 32 + l */
    _Pragma("GCC unroll 32") for (int c = 0; c < 32; c++)
    {
        const __m512i q = _mm512_i32gather_epi32(off, base + 16 + 4 * c, 1);
        s->q[2 * (c / 8)][c % 8] = _mm512_and_si512(q, m4);
        s->q[2 * (c / 8) + 1][c % 8] = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
    }
}

QG_Z512 QG_INLINE __m512i qz_bcast(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* R row sets of 16 (s[0..R-1]) x T tokens (constants after inlining) over one super-block:
 * xb[t] is token t's Q8_K block of it; acc[t][r][0] / [1] the acc / accm chains of token t
 * and row set r. Each activation broadcast serves the R row sets, each weight load the T
 * tokens; a sub-block's int32 sums are turned into float before the next sub-block starts
 * (few live registers). */
QG_Z512 QG_INLINE void qz_tok_r(const int R, const int T, const qz_sblk *const s[2],
                                const qg_q8_K *const xb[QZ_TOK], __m512 (*acc)[2][2])
{
    uint32_t bp[QZ_TOK][4];
    _Pragma("GCC unroll 4") for (int t = 0; t < T; t++)
    {
        /* bsum pair sums of the 8 sub-blocks: int16 (g 2sb, 2sb+1) = dword sb */
        const __m128i b = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)xb[t]->bsums),
                                         _mm_loadu_si128((const __m128i *)(xb[t]->bsums + 8)));
        _mm_storeu_si128((__m128i *)bp[t], b);
    }
    _Pragma("GCC unroll 4") for (int sb = 0; sb < 4; sb++)
    {
        __m512 fi[2][QZ_TOK];
        _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++)
        {
            const int g = 2 * sb + h;
            __m512i si[2][QZ_TOK];
            _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)
                _Pragma("GCC unroll 4") for (int t = 0; t < T; t++) si[r][t] =
                    _mm512_set1_epi32(TSR_I2F_MAGIC_I); /* x86hsum.h; |S| <= 61440 */
            _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++)
            {
                __m512i w[2];
                _Pragma("GCC unroll 2") for (int r = 0; r < R; r++) w[r] = s[r]->q[g][k];
                _Pragma("GCC unroll 4") for (int t = 0; t < T; t++)
                {
                    const __m512i y = qz_bcast(xb[t]->qs + 32 * g + 4 * k);
                    _Pragma("GCC unroll 2") for (int r = 0; r < R; r++) si[r][t] =
                        _mm512_dpbusd_epi32(si[r][t], w[r], y);
                }
            }
            _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)
                _Pragma("GCC unroll 4") for (int t = 0; t < T; t++)
            {
                const __m512 f =
                    _mm512_sub_ps(_mm512_castsi512_ps(si[r][t]), _mm512_set1_ps(TSR_I2F_MAGIC_F));
                fi[r][t] = h == 0 ? _mm512_mul_ps(f, s[r]->sc[g])
                                  : _mm512_fmadd_ps(f, s[r]->sc[g], fi[r][t]);
            }
        }
        _Pragma("GCC unroll 4") for (int t = 0; t < T; t++)
        {
            const __m512 dy = _mm512_set1_ps(xb[t]->d);
            const __m512i bpt = _mm512_set1_epi32((int32_t)bp[t][sb]);
            _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)
            {
                acc[t][r][0] = _mm512_fmadd_ps(fi[r][t], _mm512_mul_ps(s[r]->d, dy), acc[t][r][0]);
                /* M by vpdpwssd from the magic start (|M| <= 2 * 63 * 4096 < 2^22): one port-0
                 * op where vpmaddwd + vcvtdq2ps were two */
                const __m512i m =
                    _mm512_dpwssd_epi32(_mm512_set1_epi32(TSR_I2F_MAGIC_I), s[r]->mp[sb], bpt);
                acc[t][r][1] = _mm512_fmadd_ps(
                    _mm512_sub_ps(_mm512_castsi512_ps(m), _mm512_set1_ps(TSR_I2F_MAGIC_F)),
                    _mm512_mul_ps(s[r]->dmin, dy), acc[t][r][1]);
            }
        }
    }
}

QG_DEF_RT(qz_tok, QG_Z512, qz_sblk, __m512)

/* The whole product on AVX-512 VNNI; row r's super-block i at w + row_off(r) + i * blk_stride.
 * Tiles of 32 rows (two sets of 16), 16 for a last short tile. */
QG_Z512 static void gemm_z512(int64_t nsb, const uint8_t *w, int64_t rpg, size_t group_stride,
                              size_t row_stride, size_t blk_stride, int64_t n_rows, int32_t n_tok,
                              const uint8_t *x, size_t x_stride, float *y, size_t y_stride)
{
    /* Tokens in blocks whose activations stay in L2 (as tile_avx2) and whose accumulators
     * (4 zmm per token) stay in L1. */
    const int32_t tb = qg_token_block(nsb, QZ_MAX_TB);
    __m512 acc[QZ_MAX_TB][2][2];
    qz_sblk sblk[2];
    const qz_sblk *const sp[2] = {&sblk[0], &sblk[1]};
    for (int32_t b0 = 0; b0 < n_tok; b0 += tb) {
        const int32_t bn = n_tok - b0 < tb ? n_tok - b0 : tb;
        for (int64_t r0 = 0; r0 < n_rows;) {
            const int R = n_rows - r0 > QZ_ROWS ? 2 : 1;
            __m512i voff[2];
            const uint8_t *wt[2];
            int nr[2] = {0, 0};
            for (int q = 0; q < R; q++) {
                const int64_t rq = r0 + q * QZ_ROWS;
                nr[q] = n_rows - rq < QZ_ROWS ? (int)(n_rows - rq) : QZ_ROWS;
                int32_t off[QZ_ROWS];
                wt[q] = w + qg_set_offsets(rq, nr[q], QZ_ROWS, rpg, group_stride, row_stride, off);
                voff[q] = _mm512_loadu_si512(off);
            }
            for (int32_t t = 0; t < bn; t++)
                for (int q = 0; q < 2; q++) acc[t][q][0] = acc[t][q][1] = _mm512_setzero_ps();
            for (int64_t i = 0; i < nsb; i++) {
                for (int q = 0; q < R; q++)
                    qz_unpack(wt[q] + (size_t)i * blk_stride, voff[q], &sblk[q]);
                for (int32_t t0 = 0; t0 < bn; t0 += QZ_TOK) {
                    const int nt = bn - t0 < QZ_TOK ? bn - t0 : QZ_TOK;
                    const qg_q8_K *xb[QZ_TOK];
                    for (int t = 0; t < QZ_TOK; t++)
                        xb[t] =
                            (const qg_q8_K *)(x + (size_t)(b0 + t0 + (t < nt ? t : 0)) * x_stride) +
                            i;
                    qz_tok(R, nt, sp, xb, acc + t0);
                }
            }
            for (int q = 0; q < R; q++) {
                const __mmask16 mask = (__mmask16)((1u << nr[q]) - 1u);
                for (int32_t t = 0; t < bn; t++)
                    _mm512_mask_storeu_ps(y + (size_t)(b0 + t) * y_stride +
                                              (size_t)(r0 + q * QZ_ROWS),
                                          mask, _mm512_sub_ps(acc[t][q][0], acc[t][q][1]));
            }
            r0 += (int64_t)R * QZ_ROWS;
        }
    }
}

#endif /* QG_X86 */

void tsr_q4k_gemm_dot_grouped(int isa, int64_t n, int64_t n_rows, const void *w,
                              int64_t rows_per_group, size_t group_stride, size_t row_stride,
                              size_t blk_stride, int32_t n_tok, const void *x, size_t x_stride,
                              float *y, size_t y_stride)
{
    const int64_t nsb = n / 256, rpg = rows_per_group;
    const uint8_t *wb = w;
    const uint8_t *xb = x;
#if QG_X86
    if (isa >= TSR_GGML_VNNI) {
        gemm_z512(nsb, wb, rpg, group_stride, row_stride, blk_stride, n_rows, n_tok, xb, x_stride,
                  y, y_stride);
        return;
    }
    if (isa >= TSR_GGML_AVX2 && qy_use(n_tok)) {
        gemm_y256(nsb, wb, rpg, group_stride, row_stride, blk_stride, n_rows, n_tok, xb, x_stride,
                  y, y_stride);
        return;
    }
    if (isa >= TSR_GGML_AVX2) {
        /* Tokens in blocks whose activations stay in L2 (640 KiB, a multiple of 4 tokens);
         * within a block, each row pair meets every token while its weights are in L1. */
        const int32_t tb = qg_token_block(nsb, INT32_MAX);
        for (int32_t b0 = 0; b0 < n_tok; b0 += tb) {
            const int32_t bn = n_tok - b0 < tb ? n_tok - b0 : tb;
            for (int64_t r = 0; r < n_rows; r += 2) {
                const int nr = n_rows - r < 2 ? 1 : 2;
                const uint8_t *w0[2] = {wb + row_off(r, rpg, group_stride, row_stride),
                                        wb + row_off(r + nr - 1, rpg, group_stride, row_stride)};
                if (r + 2 < n_rows) /* the next pair's first super-blocks */
                    for (int k = 0; k < 2 && r + 2 + k < n_rows; k++)
                        _mm_prefetch(
                            (const char *)(wb + row_off(r + 2 + k, rpg, group_stride, row_stride)),
                            _MM_HINT_T0);
                for (int32_t t0 = b0; t0 < b0 + bn; t0 += 4) {
                    const int32_t nt = b0 + bn - t0 < 4 ? b0 + bn - t0 : 4;
                    const qg_q8_K *xs[4];
                    for (int t = 0; t < 4; t++) /* missing tokens repeat the first (discarded) */
                        xs[t] = (const qg_q8_K *)(xb + (size_t)(t0 + (t < nt ? t : 0)) * x_stride);
                    float out[2][4];
                    tile_avx2(nr, nsb, w0, blk_stride, xs, out);
                    for (int k = 0; k < nr; k++)
                        for (int t = 0; t < nt; t++)
                            y[(size_t)(t0 + t) * y_stride + (size_t)(r + k)] = out[k][t];
                }
            }
        }
        return;
    }
#endif
    (void)isa;
    for (int32_t t = 0; t < n_tok; t++) {
        const qg_q8_K *xt = (const qg_q8_K *)(xb + (size_t)t * x_stride);
        for (int64_t r = 0; r < n_rows; r++)
            y[(size_t)t * y_stride + (size_t)r] =
                dot_scalar(nsb, wb + row_off(r, rpg, group_stride, row_stride), blk_stride, xt);
    }
}

void tsr_q4k_gemm_dot(int isa, int64_t n, int64_t n_rows, const void *w, size_t row_stride,
                      size_t blk_stride, int32_t n_tok, const void *x, size_t x_stride, float *y,
                      size_t y_stride)
{
    tsr_q4k_gemm_dot_grouped(isa, n, n_rows, w, 1, row_stride, row_stride, blk_stride, n_tok, x,
                             x_stride, y, y_stride);
}
