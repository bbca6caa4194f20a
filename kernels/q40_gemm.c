/* q40_gemm.c — see q40_gemm.h. SIMD kernels, all in the reference's order, one vector
 * lane per weight row (as ggml's 8x8 GEMM: no horizontal sums):
 * - AVX-512 VNNI (gemm_z512): tiles of 32 rows (two sets of 16, one zmm lane per row) x 4
 *   tokens. A chunk of 8 blocks of the tile is unpacked once (gathers: any row layout) into
 *   nibble vectors (L1) that every token of an L2-sized token block then multiplies with
 *   vpdpbusd (8 per block, the token's 4 bytes broadcast from memory), starting from the
 *   token's -8 * sum(y) so the offset costs nothing; then one convert and one FMA per 16 rows.
 * - AVX2 (gemm_avx2): the same walk with 8 rows per ymm x 4 tokens; vpmaddubsw pairs summed
 *   in int16 (exact: 8 * 2 * 15 * 128 < 32768), one vpmaddwd per block.
 * - one token (gemv_z512 / gemv_avx2, below): rows in lanes without the unpacking, each
 *   row's block reduced to its int32 by integer shuffles (see "One token").
 * All read the file layout or the repacked groups through one description (q40_layout). */
#include "kernels/q40_gemm.h"

#include "kernels/dot_ggml.h"
#include "kernels/quant.h"
#include "kernels/repack.h"

#include <math.h>
#include <stdbool.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define QG_X86 1
#include <immintrin.h>

#include "kernels/x86hsum.h"
#else
#define QG_X86 0
#endif

enum { Q4_BLK = 18, Q8_BLK = 34 };

/* Where row r's block b lies: its fp16 d at w + roff(r) + d_off + b * d_blk, its 16 nibble
 * bytes at w + roff(r, q) + q_off + b * q_blk, with roff(r) = (r / rpg) * group_stride +
 * (r % rpg) * {d,q}_row. */
typedef struct {
    int64_t rpg;
    size_t group_stride;
    size_t d_row, d_off, d_blk;
    size_t q_row, q_off, q_blk;
} q40_layout;

static inline size_t off_d(const q40_layout *L, int64_t r)
{
    return (size_t)(r / L->rpg) * L->group_stride + (size_t)(r % L->rpg) * L->d_row + L->d_off;
}

static inline size_t off_q(const q40_layout *L, int64_t r)
{
    return (size_t)(r / L->rpg) * L->group_stride + (size_t)(r % L->rpg) * L->q_row + L->q_off;
}

static inline uint16_t rd16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* The reference: one (row, token) pair in the order of q40_gemm.h. */
static float dot_scalar(int64_t nb, const uint8_t *wd, const uint8_t *wq, const q40_layout *L,
                        const uint8_t *x)
{
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = wq + (size_t)b * L->q_blk, *xb = x + (size_t)b * Q8_BLK;
        const int8_t *y = (const int8_t *)(xb + 2);
        int32_t isum = 0;
        for (int l = 0; l < 16; l++)
            isum += ((q[l] & 0xF) - 8) * y[l] + ((q[l] >> 4) - 8) * y[l + 16];
        const float dd = tsr_f16_to_f32(rd16(wd + (size_t)b * L->d_blk)) * tsr_f16_to_f32(rd16(xb));
        acc = fmaf((float)isum, dd, acc);
    }
    return acc;
}

#if QG_X86

#define QG_INLINE static inline __attribute__((always_inline))

/* Whether L is the repacked groups of kernels/repack.h, whole from row 0 (4 rows a group, each
 * block's 4 rows of 16 nibble bytes one 64-byte run, each row's nb fp16 scales contiguous and
 * zero-padded to a multiple of 8): the layout the loads-and-shuffles paths read. */
static bool q40_groups(const q40_layout *L, int64_t nb)
{
    return L->rpg == 4 && L->q_row == 16 && L->q_blk == 64 && L->d_blk == 2 &&
           L->d_row == (size_t)(nb + 7) / 8 * 16 && L->d_off == 0;
}

enum {
    QT = 4,        /* tokens per register tile */
    QKB = 8,       /* blocks unpacked per chunk */
    QMAX_TB = 128, /* tokens per block at most */
    QACT = 16384,  /* (token, block) entries of the per-token block facts (128 KiB) */
};

/* Tokens t0 .. t0 + nt - 1 of a token block from block k0 on: their activation blocks
 * (x_stride bytes a token), scales dy and -8·Σy terms ny ([token][nb]); the QT - nt unused
 * slots repeat token t0 (their results are never stored). */
QG_INLINE void tile_tokens(int32_t t0, int nt, int64_t k0, int64_t nb, const uint8_t *xt0,
                           size_t x_stride, const float *dy, const int32_t *ny,
                           const uint8_t *xb[QT], const float *dyp[QT], const int32_t *nyp[QT])
{
    for (int t = 0; t < QT; t++) {
        const int32_t tt = t0 + (t < nt ? t : 0);
        xb[t] = xt0 + (size_t)tt * x_stride + (size_t)k0 * Q8_BLK;
        dyp[t] = dy + (size_t)tt * (size_t)nb + (size_t)k0;
        nyp[t] = ny + (size_t)tt * (size_t)nb + (size_t)k0;
    }
}

/* Per (token, block) of a token block: dy = fp16(y.d) as float, ny = -8 * sum(y) (the Q4_0
 * offset: sum (q - 8) y = sum q y + ny, exact). Entry [t * nb + b]. Returns the token count of
 * the block: activations in L2 (640 KiB), facts in QACT, a multiple of QT. */
static int32_t token_block(int64_t nb)
{
    int32_t tb = (int32_t)((640 << 10) / ((size_t)nb * Q8_BLK));
    if (tb > QACT / nb) tb = (int32_t)(QACT / nb);
    if (tb > QMAX_TB) tb = QMAX_TB;
    tb = tb / QT * QT;
    return tb < QT ? QT : tb;
}

__attribute__((target("avx2,f16c"))) static void act_facts(int64_t nb, int32_t bn, const uint8_t *x,
                                                           size_t x_stride, float *dy, int32_t *ny)
{
    for (int32_t t = 0; t < bn; t++) {
        const uint8_t *xt = x + (size_t)t * x_stride;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *xb = xt + (size_t)b * Q8_BLK;
            const int32_t sum = tsr_qsum32_i8(xb + 2);
            dy[(size_t)t * (size_t)nb + (size_t)b] = _cvtsh_ss(rd16(xb));
            ny[(size_t)t * (size_t)nb + (size_t)b] = -8 * sum;
        }
    }
}

static inline int32_t bcast4(const uint8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* ---- AVX-512 VNNI ---------------------------------------------------------------------- */

#define QG_Z512                                                                                    \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512dq,avx512vnni")))

/* One block of 16 rows, unpacked (lane r: row r). q[k]: the row's elements 4k .. 4k + 3 as
 * unsigned nibbles (k < 4: low nibbles of bytes 4k..; k >= 4: high nibbles of bytes 4(k-4)..),
 * matching the activation's bytes 4k .. 4k + 3. */
typedef struct {
    __m512i q[8];
    __m512 d;
} qz_blk;

QG_Z512 QG_INLINE void qz_unpack(const uint8_t *bd, const uint8_t *bq, __m512i offd, __m512i offq,
                                 qz_blk *s)
{
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    s->d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_i32gather_epi32(offd, bd, 1)));
    _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++)
    {
        const __m512i q = _mm512_i32gather_epi32(offq, bq + 4 * c, 1);
        s->q[c] = _mm512_and_si512(q, m4);
        s->q[4 + c] = _mm512_and_si512(_mm512_srli_epi32(q, 4), m4);
    }
}

/* The same from the repacked groups when the 16 rows are 4 whole groups (no gathers for the
 * quants; s->d is set by qz_unpack_groups_d): g0 is the first group's block (64 bytes: rows
 * 0..3 x 16 bytes, dword 4j + c = row j's bytes 4c..4c + 3), the others gstride apart; a
 * 4 x 4 dword transpose per group pair, then 128-bit lane shuffles, put row 4g + j's dword c
 * in lane 4g + j of vector c. */
QG_Z512 QG_INLINE void qz_unpack_groups(const uint8_t *g0, size_t gstride, qz_blk *s)
{
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i i01 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    const __m512i i23 =
        _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
    const __m512i G0 = _mm512_loadu_si512(g0), G1 = _mm512_loadu_si512(g0 + gstride);
    const __m512i G2 = _mm512_loadu_si512(g0 + 2 * gstride);
    const __m512i G3 = _mm512_loadu_si512(g0 + 3 * gstride);
    /* lanes 0..7: dword c of rows 0..7 of the pair, lanes 8..15: dword c + 1 */
    const __m512i a01 = _mm512_permutex2var_epi32(G0, i01, G1);
    const __m512i a23 = _mm512_permutex2var_epi32(G0, i23, G1);
    const __m512i b01 = _mm512_permutex2var_epi32(G2, i01, G3);
    const __m512i b23 = _mm512_permutex2var_epi32(G2, i23, G3);
    const __m512i q[4] = {
        _mm512_shuffle_i64x2(a01, b01, 0x44), _mm512_shuffle_i64x2(a01, b01, 0xEE),
        _mm512_shuffle_i64x2(a23, b23, 0x44), _mm512_shuffle_i64x2(a23, b23, 0xEE)};
    _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++)
    {
        s->q[c] = _mm512_and_si512(q[c], m4);
        s->q[4 + c] = _mm512_and_si512(_mm512_srli_epi32(q[c], 4), m4);
    }
}

/* The fp16 scales of blocks 0..3 of 16 rows of repacked groups (each row's scales contiguous:
 * row r's at bd + off[r]) into s[0..n-1].d, n <= 4: two 8-byte gathers (4 blocks x 8 rows
 * each) and a word permute per block, instead of a 16-lane gather per block. The 8 bytes may
 * run past the row's last block into its zero padding (d[4][nbp], nbp a multiple of 8). */
QG_Z512 QG_INLINE void qz_unpack_groups_d(const uint8_t *bd, __m512i off, int n, qz_blk *s)
{
    const __m512i lo = _mm512_i32gather_epi64(_mm512_castsi512_si256(off), bd, 1);
    const __m512i hi = _mm512_i32gather_epi64(_mm512_extracti64x4_epi64(off, 1), bd, 1);
    for (int i = 0; i < n; i++) {
        /* word 4r + i of lo (rows 0..7), then of hi (bit 5 of an index picks hi) */
        const __m512i idx = _mm512_add_epi16(_mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                              0, 0, 0, 60, 56, 52, 48, 44, 40, 36,
                                                              32, 28, 24, 20, 16, 12, 8, 4, 0),
                                             _mm512_set1_epi16((short)i));
        s[i].d = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi16(lo, idx, hi)));
    }
}

/* R row sets of 16 (s[q][kb]) x T tokens over kn blocks: token t's Q8_0 blocks at xb[t], its
 * facts at dy[t] / ny[t] (all from the chunk's first block), its accumulators acc[t][0..R-1]. */
QG_Z512 QG_INLINE void qz_tile_r(const int R, const int T, int kn, const qz_blk (*s)[QKB],
                                 const uint8_t *const xb[QT], const float *const dy[QT],
                                 const int32_t *const ny[QT], __m512 (*acc)[2])
{
    __m512 a[QT][2];
    _Pragma("GCC unroll 4") for (int t = 0; t < T; t++)
        _Pragma("GCC unroll 2") for (int q = 0; q < R; q++) a[t][q] = acc[t][q];
    for (int kb = 0; kb < kn; kb++) {
        __m512i si[2][QT];
        _Pragma("GCC unroll 4") for (int t = 0; t < T; t++)
        {
            const __m512i n0 = _mm512_set1_epi32(ny[t][kb]);
            _Pragma("GCC unroll 2") for (int q = 0; q < R; q++) si[q][t] = n0;
        }
        _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++)
        {
            __m512i w[2];
            _Pragma("GCC unroll 2") for (int q = 0; q < R; q++) w[q] = s[q][kb].q[k];
            _Pragma("GCC unroll 4") for (int t = 0; t < T; t++)
            {
                const __m512i y =
                    _mm512_set1_epi32(bcast4(xb[t] + (size_t)kb * Q8_BLK + 2 + 4 * k));
                _Pragma("GCC unroll 2") for (int q = 0; q < R; q++) si[q][t] =
                    _mm512_dpbusd_epi32(si[q][t], w[q], y);
            }
        }
        _Pragma("GCC unroll 4") for (int t = 0; t < T; t++)
        {
            const __m512 dyt = _mm512_set1_ps(dy[t][kb]);
            _Pragma("GCC unroll 2") for (int q = 0; q < R; q++) a[t][q] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(si[q][t]), _mm512_mul_ps(s[q][kb].d, dyt), a[t][q]);
        }
    }
    _Pragma("GCC unroll 4") for (int t = 0; t < T; t++)
        _Pragma("GCC unroll 2") for (int q = 0; q < R; q++) acc[t][q] = a[t][q];
}

QG_Z512 static void qz_tile(int R, int T, int kn, const qz_blk (*s)[QKB],
                            const uint8_t *const xb[QT], const float *const dy[QT],
                            const int32_t *const ny[QT], __m512 (*acc)[2])
{
#define QZ_CASE(r, t)                                                                              \
    case 4 * (r) + (t):                                                                            \
        qz_tile_r(r, t, kn, s, xb, dy, ny, acc);                                                   \
        break;
    switch (4 * R + T) {
        QZ_CASE(2, 4)
        QZ_CASE(2, 3)
        QZ_CASE(2, 2)
        QZ_CASE(2, 1)
        QZ_CASE(1, 4)
        QZ_CASE(1, 3)
        QZ_CASE(1, 2)
    default:
        qz_tile_r(1, 1, kn, s, xb, dy, ny, acc);
        break;
    }
#undef QZ_CASE
}

enum { QZ_ROWS = 16 };

QG_Z512 static void gemm_z512(int64_t nb, const uint8_t *w, const q40_layout *L, int64_t n_rows,
                              int32_t n_tok, const uint8_t *x, size_t x_stride, float *y,
                              size_t y_stride)
{
    const int32_t tb = token_block(nb);
    float dy[QACT];
    int32_t ny[QACT];
    __m512 acc[QMAX_TB][2];
    qz_blk sb[2][QKB];
    for (int32_t b0 = 0; b0 < n_tok; b0 += tb) {
        const int32_t bn = n_tok - b0 < tb ? n_tok - b0 : tb;
        const uint8_t *xt0 = x + (size_t)b0 * x_stride;
        act_facts(nb, bn, xt0, x_stride, dy, ny);
        for (int64_t r0 = 0; r0 < n_rows;) {
            const int R = n_rows - r0 > QZ_ROWS ? 2 : 1;
            __m512i offd[2], offq[2];
            const uint8_t *wd[2], *wq[2];
            int nr[2] = {0, 0};
            bool grp[2] = {false, false};
            for (int q = 0; q < R; q++) {
                const int64_t rq = r0 + q * QZ_ROWS;
                nr[q] = n_rows - rq < QZ_ROWS ? (int)(n_rows - rq) : QZ_ROWS;
                /* 4 whole repacked groups of 16-byte quants: loads and shuffles */
                grp[q] = q40_groups(L, nb) && rq % 4 == 0 && nr[q] == QZ_ROWS;
                /* rows past n_rows repeat the last one (computed, never stored) */
                const size_t bd = off_d(L, rq), bq = off_q(L, rq);
                int32_t od[QZ_ROWS], oq[QZ_ROWS];
                for (int r = 0; r < QZ_ROWS; r++) {
                    const int64_t rr = rq + (r < nr[q] ? r : nr[q] - 1);
                    od[r] = (int32_t)(off_d(L, rr) - bd);
                    oq[r] = (int32_t)(off_q(L, rr) - bq);
                }
                offd[q] = _mm512_loadu_si512(od);
                offq[q] = _mm512_loadu_si512(oq);
                wd[q] = w + bd;
                wq[q] = w + bq;
            }
            for (int32_t t = 0; t < bn; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
            for (int64_t k0 = 0; k0 < nb; k0 += QKB) {
                const int kn = nb - k0 < QKB ? (int)(nb - k0) : QKB;
                for (int q = 0; q < R; q++) {
                    if (grp[q]) {
                        for (int kb = 0; kb < kn; kb += 4)
                            qz_unpack_groups_d(wd[q] + (size_t)(k0 + kb) * L->d_blk, offd[q],
                                               kn - kb < 4 ? kn - kb : 4, &sb[q][kb]);
                        for (int kb = 0; kb < kn; kb++)
                            qz_unpack_groups(wq[q] + (size_t)(k0 + kb) * L->q_blk, L->group_stride,
                                             &sb[q][kb]);
                    } else
                        for (int kb = 0; kb < kn; kb++)
                            qz_unpack(wd[q] + (size_t)(k0 + kb) * L->d_blk,
                                      wq[q] + (size_t)(k0 + kb) * L->q_blk, offd[q], offq[q],
                                      &sb[q][kb]);
                }
                for (int32_t t0 = 0; t0 < bn; t0 += QT) {
                    const int nt = bn - t0 < QT ? (int)(bn - t0) : QT;
                    const uint8_t *xb[QT];
                    const float *dyp[QT];
                    const int32_t *nyp[QT];
                    tile_tokens(t0, nt, k0, nb, xt0, x_stride, dy, ny, xb, dyp, nyp);
                    qz_tile(R, nt, kn, (const qz_blk(*)[QKB])sb, xb, dyp, nyp, acc + t0);
                }
            }
            for (int q = 0; q < R; q++) {
                const __mmask16 mask = (__mmask16)((1u << nr[q]) - 1u);
                for (int32_t t = 0; t < bn; t++)
                    _mm512_mask_storeu_ps(y + (size_t)(b0 + t) * y_stride +
                                              (size_t)(r0 + q * QZ_ROWS),
                                          mask, acc[t][q]);
            }
            r0 += (int64_t)R * QZ_ROWS;
        }
    }
}

/* ---- AVX2 ------------------------------------------------------------------------------ */

#define QG_AVX2 __attribute__((target("avx2,fma,f16c")))

/* One block of 8 rows (lane r: row r), as qz_blk. */
typedef struct {
    __m256i q[8];
    __m256 d;
} qa_blk;

enum { QA_ROWS = 8 };

/* The fp16 scales of 8 consecutive blocks of 8 rows (lane i's 8 at wd + od[i], contiguous as
 * in the repacked groups, padded with zeros to a multiple of 8 blocks) as floats, out[j]: block
 * j's 8 lanes. One 16-byte load and convert per row and an 8 x 8 transpose: a vpgatherdd per
 * block cost 12-24 cycles on AMD Zen 3. */
QG_AVX2 QG_INLINE void qv_scales8_avx2(const uint8_t *wd, const int32_t od[8], float out[8][8])
{
    __m256i r[8], t[8];
    for (int i = 0; i < 8; i++)
        r[i] = _mm256_castps_si256(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wd + od[i]))));
    tsr_transpose8x8_epi32(r, t);
    for (int j = 0; j < 8; j++) _mm256_store_ps(out[j], _mm256_castsi256_ps(t[j]));
}

/* Lane i of the groups' kernels holds row k_avx2_row[i] (vphaddd's order in the GEMV, the
 * dword unpacks' order in qa_unpack_groups); row r sits in lane (r % 2) * 4 + r / 2. */
static const int32_t k_avx2_row[8] = {0, 2, 4, 6, 1, 3, 5, 7};

/* od[i]: where lane i's row's scales start in two groups of L from the first group's d. */
static void avx2_group_d_offsets(const q40_layout *L, int32_t od[8])
{
    for (int i = 0; i < 8; i++)
        od[i] = (int32_t)((size_t)(k_avx2_row[i] / 4) * L->group_stride +
                          (size_t)(k_avx2_row[i] % 4) * L->d_row);
}

/* Block b of 8 rows in two repacked groups (rows 0-3 at bq, 4-7 at bq + gs: each block 4
 * rows x 16 nibble bytes, 64 bytes), as qa_unpack makes it but in the lanes of k_avx2_row:
 * four 32-byte loads and 8 dword / qword unpacks for the 4 dwords of each row, where
 * qa_unpack gathers (a vpgatherdd costs 12-24 cycles on AMD Zen 3). d: from dwb (the 8
 * blocks' scales of qv_scales8_avx2, lanes already in that order). */
QG_AVX2 QG_INLINE void qa_unpack_groups(const uint8_t *bq, size_t gs, const float *dwb, qa_blk *s)
{
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i a01 = _mm256_loadu_si256((const __m256i *)bq);
    const __m256i a23 = _mm256_loadu_si256((const __m256i *)(bq + 32));
    const __m256i a45 = _mm256_loadu_si256((const __m256i *)(bq + gs));
    const __m256i a67 = _mm256_loadu_si256((const __m256i *)(bq + gs + 32));
    const __m256i t0 = _mm256_unpacklo_epi32(a01, a23), t1 = _mm256_unpackhi_epi32(a01, a23);
    const __m256i t2 = _mm256_unpacklo_epi32(a45, a67), t3 = _mm256_unpackhi_epi32(a45, a67);
    /* dword c of rows [0 2 4 6 | 1 3 5 7] */
    const __m256i q[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                          _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
    s->d = _mm256_load_ps(dwb);
    _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++)
    {
        s->q[c] = _mm256_and_si256(q[c], m4);
        s->q[4 + c] = _mm256_and_si256(_mm256_srli_epi32(q[c], 4), m4);
    }
}

QG_AVX2 QG_INLINE void qa_unpack(const uint8_t *bd, const uint8_t *bq, __m256i offd, __m256i offq,
                                 qa_blk *s)
{
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    /* the low 16 bits of each dword lane: fp16 d */
    const __m256i dd = _mm256_i32gather_epi32((const int *)bd, offd, 1);
    const __m256i d16 = _mm256_packus_epi32(_mm256_and_si256(dd, _mm256_set1_epi32(0xFFFF)),
                                            _mm256_setzero_si256()); /* [0..3 x 4..7 x] */
    const __m256i d16p = _mm256_permute4x64_epi64(d16, 0x08);        /* [0..3 4..7 x x] */
    s->d = _mm256_cvtph_ps(_mm256_castsi256_si128(d16p));
    _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++)
    {
        const __m256i q = _mm256_i32gather_epi32((const int *)(bq + 4 * c), offq, 1);
        s->q[c] = _mm256_and_si256(q, m4);
        s->q[4 + c] = _mm256_and_si256(_mm256_srli_epi32(q, 4), m4);
    }
}

/* One row set of 8 x T tokens over kn blocks (as qz_tile_r). */
QG_AVX2 QG_INLINE void qa_tile_t(const int T, int kn, const qa_blk *s, const uint8_t *const xb[QT],
                                 const float *const dy[QT], const int32_t *const ny[QT],
                                 __m256 *acc)
{
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 a[QT];
    _Pragma("GCC unroll 4") for (int t = 0; t < T; t++) a[t] = acc[t];
    for (int kb = 0; kb < kn; kb++) {
        __m256i s16[QT];
        _Pragma("GCC unroll 4") for (int t = 0; t < T; t++) s16[t] = _mm256_setzero_si256();
        _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++)
        {
            const __m256i wk = s[kb].q[k];
            _Pragma("GCC unroll 4") for (int t = 0; t < T; t++)
            {
                const __m256i yk =
                    _mm256_set1_epi32(bcast4(xb[t] + (size_t)kb * Q8_BLK + 2 + 4 * k));
                s16[t] = _mm256_add_epi16(s16[t], _mm256_maddubs_epi16(wk, yk));
            }
        }
        _Pragma("GCC unroll 4") for (int t = 0; t < T; t++)
        {
            const __m256i i32 =
                _mm256_add_epi32(_mm256_madd_epi16(s16[t], ones), _mm256_set1_epi32(ny[t][kb]));
            a[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32),
                                   _mm256_mul_ps(s[kb].d, _mm256_set1_ps(dy[t][kb])), a[t]);
        }
    }
    _Pragma("GCC unroll 4") for (int t = 0; t < T; t++) acc[t] = a[t];
}

QG_AVX2 static void qa_tile(int T, int kn, const qa_blk *s, const uint8_t *const xb[QT],
                            const float *const dy[QT], const int32_t *const ny[QT], __m256 *acc)
{
    switch (T) {
    case 4:
        qa_tile_t(4, kn, s, xb, dy, ny, acc);
        break;
    case 3:
        qa_tile_t(3, kn, s, xb, dy, ny, acc);
        break;
    case 2:
        qa_tile_t(2, kn, s, xb, dy, ny, acc);
        break;
    default:
        qa_tile_t(1, kn, s, xb, dy, ny, acc);
        break;
    }
}

QG_AVX2 static void gemm_avx2(int64_t nb, const uint8_t *w, const q40_layout *L, int64_t n_rows,
                              int32_t n_tok, const uint8_t *x, size_t x_stride, float *y,
                              size_t y_stride)
{
    const int32_t tb = token_block(nb);
    const bool groups = q40_groups(L, nb);
    int32_t odl[QA_ROWS]; /* the groups: lane i's scales at the row set's d + odl[i] */
    if (groups) avx2_group_d_offsets(L, odl);
    float dy[QACT];
    int32_t ny[QACT];
    __m256 acc[QMAX_TB];
    qa_blk sb[QKB];
    for (int32_t b0 = 0; b0 < n_tok; b0 += tb) {
        const int32_t bn = n_tok - b0 < tb ? n_tok - b0 : tb;
        const uint8_t *xt0 = x + (size_t)b0 * x_stride;
        act_facts(nb, bn, xt0, x_stride, dy, ny);
        for (int64_t r0 = 0; r0 < n_rows; r0 += QA_ROWS) {
            const int nr = n_rows - r0 < QA_ROWS ? (int)(n_rows - r0) : QA_ROWS;
            const size_t bd = off_d(L, r0), bq = off_q(L, r0);
            int32_t od[QA_ROWS], oq[QA_ROWS];
            for (int r = 0; r < QA_ROWS; r++) {
                const int64_t rr = r0 + (r < nr ? r : nr - 1);
                od[r] = (int32_t)(off_d(L, rr) - bd);
                oq[r] = (int32_t)(off_q(L, rr) - bq);
            }
            const __m256i offd = _mm256_loadu_si256((const __m256i *)od);
            const __m256i offq = _mm256_loadu_si256((const __m256i *)oq);
            /* two whole repacked groups: loads and unpacks in the lanes of k_avx2_row (the
             * scales padded with zeros to 8 blocks), else gathers in row order */
            const bool grp = groups && r0 % 8 == 0 && r0 + 4 < n_rows;
            float dwb[QKB][8] __attribute__((aligned(32)));
            for (int32_t t = 0; t < bn; t++) acc[t] = _mm256_setzero_ps();
            for (int64_t k0 = 0; k0 < nb; k0 += QKB) {
                const int kn = nb - k0 < QKB ? (int)(nb - k0) : QKB;
                if (grp) qv_scales8_avx2(w + bd + (size_t)k0 * 2, odl, dwb);
                for (int kb = 0; kb < kn; kb++) {
                    if (grp)
                        qa_unpack_groups(w + bq + (size_t)(k0 + kb) * L->q_blk, L->group_stride,
                                         dwb[kb], &sb[kb]);
                    else
                        qa_unpack(w + bd + (size_t)(k0 + kb) * L->d_blk,
                                  w + bq + (size_t)(k0 + kb) * L->q_blk, offd, offq, &sb[kb]);
                }
                for (int32_t t0 = 0; t0 < bn; t0 += QT) {
                    const int nt = bn - t0 < QT ? (int)(bn - t0) : QT;
                    const uint8_t *xb[QT];
                    const float *dyp[QT];
                    const int32_t *nyp[QT];
                    tile_tokens(t0, nt, k0, nb, xt0, x_stride, dy, ny, xb, dyp, nyp);
                    qa_tile(nt, kn, sb, xb, dyp, nyp, acc + t0);
                }
            }
            for (int32_t t = 0; t < bn; t++) {
                float out[QA_ROWS];
                /* groups: back to row order, row r from lane (r % 2) * 4 + r / 2 */
                _mm256_storeu_ps(out, grp ? _mm256_permutevar8x32_ps(
                                                acc[t], _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
                                          : acc[t]);
                memcpy(y + (size_t)(b0 + t) * y_stride + (size_t)r0, out,
                       sizeof(float) * (size_t)nr);
            }
        }
    }
}

/* ---- One token (GEMV) -------------------------------------------------------------------
 * The same order per (row, block), for one token, rows in vector lanes for the FMA. The
 * weight bytes are read as they lie: a quad of 4 rows' 16-byte nibble blocks (one 64-byte
 * load from a repacked group, four 16-byte loads from the file layout); low and high nibbles
 * against the activation's two 16-byte halves broadcast to every 128-bit lane: vpdpbusd
 * (AVX-512) or vpmaddubsw + vpmaddwd (AVX2) leave each row's block as 4 int32 parts (bytes
 * 4c..4c+3 of both halves), which permutes and adds (AVX-512) or vphaddd (AVX2) reduce to the
 * row's int32 (the parts of an exact integer sum add in any order). The -8 offset enters as
 * -8·Σy (the GEMM's ny; AVX-512: a quarter of it in each part). Then one convert and one FMA
 * per block for 16 (8) rows, the scale fp16(d_w)·d_y made per lane as the GEMM makes it: the
 * GEMM's operations per output, without its unpacking into per-row lanes (gathers /
 * transposes), which a single token cannot amortize. */

enum {
    QV_MAXB = 4096, /* blocks of a row at most (n <= 131072; longer rows: the GEMM) */
};

/* Quad q of a pass: 4 rows' nibbles (block 0) at qp[j]; rows[j] the row each lane computes
 * (rows past n_rows repeat the last one: computed, never stored); grp: one repacked group
 * (block b of the 4 rows: 64 contiguous bytes at qp[0] + 64 b). */
typedef struct {
    const uint8_t *qp[4];
    int64_t rows[4];
    bool grp;
} qv_quad;

static void qv_quad_init(const uint8_t *w, const q40_layout *L, int64_t rq, int64_t n_rows,
                         qv_quad *Q)
{
    const int64_t last = n_rows - 1;
    Q->grp = L->rpg == 4 && L->q_row == 16 && L->q_blk == 64 && rq % 4 == 0;
    if (rq > last) rq = Q->grp ? last / 4 * 4 : last;
    for (int j = 0; j < 4; j++) {
        /* a group's rows lie in its memory even past n_rows (the matrix's last group repeats
         * its last row; other rows belong to other claims): read whole */
        Q->rows[j] = Q->grp ? rq + j : (rq + j <= last ? rq + j : last);
        Q->qp[j] = w + off_q(L, Q->rows[j]);
    }
}

/* Software prefetch, into L2, of the next pass's rows (pass_bytes from nxt: its 4 groups, or
 * its 16 / 8 rows of the file layout, one after another), spread over this pass's nb blocks:
 * a pass prefetches the next one whole, as one linear stream; block b's share starts at
 * qv_prefetch_at (NULL: no next pass), its lines issued by tsr_prefetch_line_l2. Measured (bench of
 * 64 MiB matrices, 1 and 2 threads, 2048 and 8192 columns, CPU time per byte on a loaded machine):
 * 24-35 GB/s per thread against 17-27 for a prefetch in each group's stream 64 blocks ahead
 * (4 streams a pass) and 24-26 for the former one-stream 4-row GEMV. (64 MiB sits in this
 * host's 480 MiB L3; from memory, tests/bench_gemv_stream's 1 GiB at 2 threads, the next pass,
 * the one after it or the third ahead give 0.80-0.82 of a plain read alike, 2026-12-05.) */
QG_INLINE const char *qv_prefetch_at(const char *nxt, size_t pass_bytes, int64_t b, int64_t nb)
{
    return nxt ? nxt + pass_bytes * (size_t)b / (size_t)nb : NULL;
}

/* The lines of that stream (tsr_prefetch_line_l2): the AVX-512 GEMV issues its five lines a
 * block one beside each quad's load and the fifth after the block's
 * FMA, not as one burst: 1B Q4_0 decode (2 threads, tessera bench, three interleaved runs of
 * each, 2026-12-06) 38.2-39.7 tok/s as a burst, 40.7-41.5 spread with the offsets folded,
 * 40.9-43.2 spread from registers; tests/bench_gemv_stream 0.81-0.82 -> 0.87-0.88 of the
 * former four-chain read. Why the instruction form matters is not observable here (no
 * hardware counters): other arrangements of the same five prefetches measured 0.82-0.93 of
 * that read, so the figure rests on how GCC 12 schedules this code. The AVX2 GEMV spreads its
 * three lines a block likewise (beside the scale gather and each quad pair's load): with
 * TSR_ISA=avx2, bench_gemv_stream 18.8-19.3 -> 21.2-22.0 GB/s, 1B Q4_0 decode 30.5-33.1 ->
 * 34.5-35.8 tok/s. */

/* ---- AVX-512 VNNI GEMV: 16 rows (4 quads, lane 4q + j: row j of quad q) a pass ---- */

QG_Z512 QG_INLINE __m512i qv_load_z512(const qv_quad *Q, bool grp, size_t b, size_t q_blk)
{
    if (grp) return _mm512_loadu_si512(Q->qp[0] + b * 64);
    const __m256i v01 = _mm256_loadu2_m128i((const __m128i *)(Q->qp[1] + b * q_blk),
                                            (const __m128i *)(Q->qp[0] + b * q_blk));
    const __m256i v23 = _mm256_loadu2_m128i((const __m128i *)(Q->qp[3] + b * q_blk),
                                            (const __m128i *)(Q->qp[2] + b * q_blk));
    return _mm512_inserti64x4(_mm512_castsi256_si512(v01), v23, 1);
}

/* The pass's 16 lanes after the reduction below: lane 4k + g holds row 4g + k (row k of quad
 * g), the order vpackssdw / vpmaddwd leave. */
static inline int qz_lane_row(int lane)
{
    return 4 * (lane % 4) + lane / 4;
}

/* Word permutes of qz_groups_sc8 (below). */
static const int16_t k_sc8_w[2][32] __attribute__((aligned(64))) = {
    {0, 32, 8,  40, 16, 48, 24, 56, 1, 33, 9,  41, 17, 49, 25, 57,
     2, 34, 10, 42, 18, 50, 26, 58, 3, 35, 11, 43, 19, 51, 27, 59},
    {4, 36, 12, 44, 20, 52, 28, 60, 5, 37, 13, 45, 21, 53, 29, 61,
     6, 38, 14, 46, 22, 54, 30, 62, 7, 39, 15, 47, 23, 55, 31, 63},
};
static const int16_t k_sc8_v[4][32] __attribute__((aligned(64))) = {
    {0, 1, 32, 33, 2, 3, 34, 35, 4, 5, 36, 37, 6, 7, 38, 39,
     0, 1, 32, 33, 2, 3, 34, 35, 4, 5, 36, 37, 6, 7, 38, 39},
    {8, 9, 40, 41, 10, 11, 42, 43, 12, 13, 44, 45, 14, 15, 46, 47,
     8, 9, 40, 41, 10, 11, 42, 43, 12, 13, 44, 45, 14, 15, 46, 47},
    {16, 17, 48, 49, 18, 19, 50, 51, 20, 21, 52, 53, 22, 23, 54, 55,
     16, 17, 48, 49, 18, 19, 50, 51, 20, 21, 52, 53, 22, 23, 54, 55},
    {24, 25, 56, 57, 26, 27, 58, 59, 28, 29, 60, 61, 30, 31, 62, 63,
     24, 25, 56, 57, 26, 27, 58, 59, 28, 29, 60, 61, 30, 31, 62, 63},
};

/* The fp16 scales of blocks b0..b0+7 of 16 rows of 4 whole repacked groups (row j of group g
 * at wd + goff[g] + 2 j nbp, 8 contiguous fp16 from b0 on: nbp is a multiple of 8) times dy,
 * lane 4k + g: 16 16-byte loads, 12 word permutes, 8 converts. */
QG_Z512 QG_INLINE void qz_groups_sc8(const uint8_t *wd, const size_t goff[4], size_t nbp,
                                     int64_t b0, const float *dy, int kn, __m512 sc[8])
{
    __m512i Z[4];
    _Pragma("GCC unroll 4") for (int g = 0; g < 4; g++)
    {
        const uint8_t *p = wd + goff[g] + (size_t)b0 * 2;
        __m512i z = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)p));
        z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(p + 2 * nbp)), 1);
        z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(p + 4 * nbp)), 2);
        Z[g] = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(p + 6 * nbp)), 3);
    }
    /* Z[g] word 8k + b: row k, block b0 + b. W[h][p] word 8b' + 2k + g' (b = 4h + b'): quads
     * 2p + g' (k_sc8_w[h]); block b's 16 words, lane 4k + g, from W[b / 4] (k_sc8_v[b % 4]) */
    __m512i W[2][2];
    _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++)
    {
        const __m512i I = _mm512_load_si512(k_sc8_w[h]);
        W[h][0] = _mm512_permutex2var_epi16(Z[0], I, Z[1]);
        W[h][1] = _mm512_permutex2var_epi16(Z[2], I, Z[3]);
    }
    _Pragma("GCC unroll 8") for (int b = 0; b < 8; b++)
    {
        if (b >= kn) break;
        const __m512i V =
            _mm512_permutex2var_epi16(W[b / 4][0], _mm512_load_si512(k_sc8_v[b % 4]), W[b / 4][1]);
        sc[b] =
            _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(V)), _mm512_set1_ps(dy[b0 + b]));
    }
}

QG_Z512 QG_INLINE __m512 gemv_z512_pass(const bool grp, int64_t nb, const q40_layout *L,
                                        const qv_quad Q[4], __m512i offd, const size_t goff[4],
                                        size_t nbp, const uint8_t *wd, const uint8_t *x,
                                        const float *dy, const int32_t *ny, const char *pfn,
                                        size_t pass_bytes)
{
    const __m512i m4 = _mm512_set1_epi8(0x0F), ones = _mm512_set1_epi16(1);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
        const int kn = nb - b0 < 8 ? (int)(nb - b0) : 8;
        __m512 sc[8] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                        _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                        _mm512_setzero_ps(), _mm512_setzero_ps()};
        if (grp)
            qz_groups_sc8(wd, goff, nbp, b0, dy, kn, sc);
        else
            for (int k = 0; k < kn; k++)
                sc[k] = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_i32gather_epi32(
                                          offd, wd + (size_t)(b0 + k) * L->d_blk, 1))),
                                      _mm512_set1_ps(dy[b0 + k]));
        _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++)
        {
            if (k >= kn) break;
            const int64_t b = b0 + k;
            /* 16 rows x 18 bytes (4 groups' 64 + 8) a block: 4.5 lines, prefetched as 5, one
             * beside each quad's load and the last after the FMA (tsr_prefetch_line_l2) */
            const char *pfb = qv_prefetch_at(pfn, pass_bytes, b, nb);
            const uint8_t *xb = x + (size_t)b * Q8_BLK + 2;
            const __m512i yl = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)xb));
            const __m512i yh = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xb + 16)));
            /* P[q] lane 4k + c: part c (bytes 4c..4c+3, both nibbles) of row k of quad q:
             * |part| <= 8 * 15 * 128 = 15360, so two parts fit an int16 (no saturation) */
            __m512i P[4];
            _Pragma("GCC unroll 4") for (int q = 0; q < 4; q++)
            {
                if (pfb) tsr_prefetch_line_l2(pfb + 64 * q);
                const __m512i v = qv_load_z512(&Q[q], grp, (size_t)b, L->q_blk);
                const __m512i lo = _mm512_and_si512(v, m4);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                P[q] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, yl), hi,
                                           yh);
            }
            /* lane k of 128 bits: [P0 k (c0+c1), (c2+c3), P1 k ...], then [P0 k, P1 k, P2 k,
             * P3 k]: lane 4k + q */
            const __m512i A01 = _mm512_madd_epi16(_mm512_packs_epi32(P[0], P[1]), ones);
            const __m512i A23 = _mm512_madd_epi16(_mm512_packs_epi32(P[2], P[3]), ones);
            const __m512i S = _mm512_add_epi32(
                _mm512_madd_epi16(_mm512_packs_epi32(A01, A23), ones), _mm512_set1_epi32(ny[b]));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(S), sc[k], acc);
            if (pfb) tsr_prefetch_line_l2(pfb + 256);
        }
    }
    return acc;
}

QG_Z512 static void gemv_z512(int64_t nb, const uint8_t *w, const q40_layout *L, int64_t n_rows,
                              const uint8_t *x, float *y)
{
    float dy[QV_MAXB];
    int32_t ny[QV_MAXB];
    act_facts(nb, 1, x, 0, dy, ny);
    const size_t nbp = (size_t)(nb + 7) / 8 * 8;
    int32_t rowidx[16];
    for (int r = 0; r < 16; r++) rowidx[r] = 4 * (r % 4) + r / 4; /* row r <- lane */
    const __m512i back = _mm512_loadu_si512(rowidx);
    /* the repacked groups (kernels/repack.h), whole from row 0: no per-row offsets */
    const bool groups = q40_groups(L, nb);
    const int64_t last_g = (n_rows - 1) / 4;
    const size_t gs = L->group_stride;
    for (int64_t r0 = 0; r0 < n_rows; r0 += 16) {
        qv_quad Q[4];
        size_t goff[4];
        __m512i offd = _mm512_setzero_si512();
        size_t bd;
        if (groups) { /* quads past the last group repeat it (computed, never stored) */
            const int64_t g0 = r0 / 4;
            bd = (size_t)g0 * gs;
            for (int q = 0; q < 4; q++) {
                const int64_t g = g0 + q <= last_g ? g0 + q : last_g;
                goff[q] = (size_t)(g - g0) * gs;
                Q[q].qp[0] = w + bd + goff[q] + L->q_off;
                Q[q].grp = true;
            }
        } else {
            int32_t od[16];
            for (int q = 0; q < 4; q++) qv_quad_init(w, L, r0 + 4 * q, n_rows, &Q[q]);
            bd = off_d(L, r0);
            for (int l = 0; l < 16; l++) {
                const int r = qz_lane_row(l);
                od[l] = (int32_t)(off_d(L, Q[r / 4].rows[r % 4]) - bd);
            }
            for (int q = 0; q < 4; q++) goff[q] = 0;
            offd = _mm512_loadu_si512(od);
        }
        /* the next pass, when there is one */
        const char *pfn = r0 + 16 < n_rows ? (const char *)w + off_q(L, r0 + 16) - L->q_off : NULL;
        const size_t pass_bytes = (size_t)(16 / L->rpg) * gs;
        const __m512 acc = groups ? gemv_z512_pass(true, nb, L, Q, offd, goff, nbp, w + bd, x, dy,
                                                   ny, pfn, pass_bytes)
                                  : gemv_z512_pass(false, nb, L, Q, offd, goff, nbp, w + bd, x, dy,
                                                   ny, pfn, pass_bytes);
        const int64_t left = n_rows - r0;
        _mm512_mask_storeu_ps(y + r0, (__mmask16)(left >= 16 ? 0xFFFFu : (1u << left) - 1u),
                              _mm512_permutexvar_ps(back, acc));
    }
}

/* ---- AVX2 GEMV: 8 rows (2 quads) a pass; lane i holds row k_avx2_row[i] (vphaddd's order) */

QG_AVX2 QG_INLINE void qv_load_avx2(const qv_quad *Q, bool grp, size_t b, size_t q_blk,
                                    __m256i *v01, __m256i *v23)
{
    if (grp) {
        *v01 = _mm256_loadu_si256((const __m256i *)(Q->qp[0] + b * 64));
        *v23 = _mm256_loadu_si256((const __m256i *)(Q->qp[0] + b * 64 + 32));
        return;
    }
    *v01 = _mm256_loadu2_m128i((const __m128i *)(Q->qp[1] + b * q_blk),
                               (const __m128i *)(Q->qp[0] + b * q_blk));
    *v23 = _mm256_loadu2_m128i((const __m128i *)(Q->qp[3] + b * q_blk),
                               (const __m128i *)(Q->qp[2] + b * q_blk));
}

/* Two rows' block (128-bit lane r: row r) as 4 int32 parts each. */
QG_AVX2 QG_INLINE __m256i qv_parts_avx2(__m256i v, __m256i yl, __m256i yh)
{
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(v, m4);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    /* int16 pairs: |2 * 15 * 128| each, two of them < 32768 (exact) */
    const __m256i p16 =
        _mm256_add_epi16(_mm256_maddubs_epi16(lo, yl), _mm256_maddubs_epi16(hi, yh));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

/* grp: the repacked groups (scales by qv_scales8_avx2 from od, 8 blocks at a time), else the
 * file layout (a gather from offd per block). */
QG_AVX2 QG_INLINE __m256 gemv_avx2_pass(const bool grp, int64_t nb, const q40_layout *L,
                                        const qv_quad Q[2], __m256i offd, const int32_t od[8],
                                        const uint8_t *wd, const uint8_t *x, const float *dy,
                                        const int32_t *ny, const char *pfn, size_t pass_bytes)
{
    __m256 acc = _mm256_setzero_ps();
    float dwb[8][8] __attribute__((aligned(32)));
    for (int64_t b = 0; b < nb; b++) {
        /* 8 rows x 18 bytes a block: 3 lines, spread (tsr_prefetch_line_l2) */
        const char *pfb = qv_prefetch_at(pfn, pass_bytes, b, nb);
        if (pfb) tsr_prefetch_line_l2(pfb);
        __m256 dw;
        if (grp) {
            if ((b & 7) == 0) qv_scales8_avx2(wd + (size_t)b * 2, od, dwb);
            dw = _mm256_load_ps(dwb[b & 7]);
        } else {
            const __m256i dd =
                _mm256_i32gather_epi32((const int *)(wd + (size_t)b * L->d_blk), offd, 1);
            const __m256i d16 = _mm256_packus_epi32(_mm256_and_si256(dd, _mm256_set1_epi32(0xFFFF)),
                                                    _mm256_setzero_si256());
            dw = _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(d16, 0x08)));
        }
        const uint8_t *xb = x + (size_t)b * Q8_BLK + 2;
        const __m256i yl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)xb));
        const __m256i yh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xb + 16)));
        __m256i v[4];
        if (pfb) tsr_prefetch_line_l2(pfb + 64);
        qv_load_avx2(&Q[0], grp, (size_t)b, L->q_blk, &v[0], &v[1]);
        if (pfb) tsr_prefetch_line_l2(pfb + 128);
        qv_load_avx2(&Q[1], grp, (size_t)b, L->q_blk, &v[2], &v[3]);
        /* [r0 r2 r4 r6 | r1 r3 r5 r7] */
        const __m256i h = _mm256_hadd_epi32(
            _mm256_hadd_epi32(qv_parts_avx2(v[0], yl, yh), qv_parts_avx2(v[1], yl, yh)),
            _mm256_hadd_epi32(qv_parts_avx2(v[2], yl, yh), qv_parts_avx2(v[3], yl, yh)));
        const __m256i I = _mm256_add_epi32(h, _mm256_set1_epi32(ny[b]));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(I), _mm256_mul_ps(dw, _mm256_set1_ps(dy[b])), acc);
    }
    return acc;
}

QG_AVX2 static void gemv_avx2(int64_t nb, const uint8_t *w, const q40_layout *L, int64_t n_rows,
                              const uint8_t *x, float *y)
{
    float dy[QV_MAXB];
    int32_t ny[QV_MAXB];
    act_facts(nb, 1, x, 0, dy, ny);
    /* the repacked groups (kernels/repack.h), whole from row 0: the 8 rows' scale offsets are
     * the same in every pass but a last one with a single group */
    const bool groups = q40_groups(L, nb);
    const size_t gs = L->group_stride;
    int32_t od_g[8];
    avx2_group_d_offsets(L, od_g);
    const __m256i offd_g = _mm256_loadu_si256((const __m256i *)od_g);
    for (int64_t r0 = 0; r0 < n_rows; r0 += 8) {
        qv_quad Q[2];
        bool grp;
        size_t bd;
        __m256i offd;
        int32_t od[8]; /* lane i's scales at w + bd + od[i] */
        if (groups && r0 + 4 < n_rows) {
            bd = (size_t)(r0 / 4) * gs;
            Q[0].qp[0] = w + bd + L->q_off;
            Q[1].qp[0] = Q[0].qp[0] + gs;
            grp = true;
            offd = offd_g;
            memcpy(od, od_g, sizeof od);
        } else {
            for (int q = 0; q < 2; q++) qv_quad_init(w, L, r0 + 4 * q, n_rows, &Q[q]);
            grp = Q[0].grp; /* the groups: d_blk 2 */
            bd = off_d(L, r0);
            for (int i = 0; i < 8; i++) {
                const int r = k_avx2_row[i];
                od[i] = (int32_t)(off_d(L, Q[r / 4].rows[r % 4]) - bd);
            }
            offd = _mm256_loadu_si256((const __m256i *)od);
        }
        const char *pfn = r0 + 8 < n_rows ? (const char *)w + off_q(L, r0 + 8) - L->q_off : NULL;
        const size_t pass_bytes = (size_t)(8 / L->rpg) * L->group_stride;
        const __m256 acc =
            grp ? gemv_avx2_pass(true, nb, L, Q, offd, od, w + bd, x, dy, ny, pfn, pass_bytes)
                : gemv_avx2_pass(false, nb, L, Q, offd, od, w + bd, x, dy, ny, pfn, pass_bytes);
        /* back to row order: row r from lane (r % 2) * 4 + r / 2 */
        float out[8];
        _mm256_storeu_ps(out,
                         _mm256_permutevar8x32_ps(acc, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        const int64_t left = n_rows - r0;
        memcpy(y + r0, out, sizeof(float) * (size_t)(left < 8 ? left : 8));
    }
}

#endif /* QG_X86 */

static void gemm(int isa, int64_t n, const uint8_t *w, const q40_layout *L, int64_t n_rows,
                 int32_t n_tok, const uint8_t *x, size_t x_stride, float *y, size_t y_stride)
{
    const int64_t nb = n / 32;
    if (n_rows <= 0 || n_tok <= 0) return;
#if QG_X86
    if (n_tok == 1 && nb <= QV_MAXB && isa >= TSR_GGML_AVX2) {
        (isa >= TSR_GGML_VNNI ? gemv_z512 : gemv_avx2)(nb, w, L, n_rows, x, y);
        return;
    }
    if (isa >= TSR_GGML_VNNI) {
        gemm_z512(nb, w, L, n_rows, n_tok, x, x_stride, y, y_stride);
        return;
    }
    if (isa >= TSR_GGML_AVX2) {
        gemm_avx2(nb, w, L, n_rows, n_tok, x, x_stride, y, y_stride);
        return;
    }
#endif
    (void)isa;
    for (int32_t t = 0; t < n_tok; t++) {
        const uint8_t *xt = x + (size_t)t * x_stride;
        for (int64_t r = 0; r < n_rows; r++)
            y[(size_t)t * y_stride + (size_t)r] =
                dot_scalar(nb, w + off_d(L, r), w + off_q(L, r), L, xt);
    }
}

void tsr_q40_gemm_dot(int isa, int64_t n, int64_t n_rows, const void *w, size_t row_stride,
                      int32_t n_tok, const void *x, size_t x_stride, float *y, size_t y_stride)
{
    const q40_layout L = {.rpg = 1,
                          .group_stride = row_stride,
                          .d_row = 0,
                          .d_off = 0,
                          .d_blk = Q4_BLK,
                          .q_row = 0,
                          .q_off = 2,
                          .q_blk = Q4_BLK};
    gemm(isa, n, w, &L, n_rows, n_tok, x, x_stride, y, y_stride);
}

void tsr_q40_gemm_dot_repacked(int isa, int64_t n, int64_t n_rows, const void *packed,
                               int32_t n_tok, const void *x, size_t x_stride, float *y,
                               size_t y_stride)
{
    const size_t nb = (size_t)n / 32, nbp = (nb + 7) / 8 * 8;
    const q40_layout L = {.rpg = TSR_REPACK_ROWS,
                          .group_stride = tsr_repack_group_bytes(TSR_TYPE_Q4_0, n),
                          .d_row = nbp * 2,
                          .d_off = 0,
                          .d_blk = 2,
                          .q_row = 16,
                          .q_off = TSR_REPACK_ROWS * nbp * 2,
                          .q_blk = TSR_REPACK_ROWS * 16};
    gemm(isa, n, packed, &L, n_rows, n_tok, x, x_stride, y, y_stride);
}
