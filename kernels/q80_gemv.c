/* q80_gemv.c — see q80_gemv.h. A call converts the token's block scales once (xd, and for
 * VNNI the lane offsets xc), then walks the rows in groups of 4 (the last group repeats its
 * last row, computed but not stored), 8 blocks at a time: the 4 rows' scale products for
 * those 8 blocks into a small stack table, then per block the token's quants loaded once
 * for the 4 rows. */
#include "kernels/q80_gemv.h"

#include "kernels/dot_ggml.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include "kernels/x86hsum.h"

#define QG_AVX2   __attribute__((target("avx2,fma,f16c")))
#define QG_VNNI   __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))
#define QG_INLINE static inline __attribute__((always_inline))

enum {
    QG_BLK = 34,  /* bytes of a Q8_0 block: fp16 d, then 32 int8 quants */
    QG_CHUNK = 8, /* blocks per scale table (one vcvtph2ps) */
    /* Prefetch distance: at least this many bytes ahead, in whole 4-row groups, into L2
     * (prefetcht1). Measured against kernels/dot_ggml.c's row dots (prefetcht0, one group
     * ahead), one and two threads streaming 64 MiB, interleaved passes, noisy shared host:
     * 2048 columns 1.05-1.22x, 8192 columns 1.8-1.9x (their 34 KiB group prefetched into
     * the 32 KiB L1 evicted itself: 0.48 of a plain read's GB/s, here 0.85-0.95). T0 here
     * streamed at 0.4-0.6 of a read. */
    QG_PF_BYTES = 32768
};

/* Byte offsets of the fp16 d of 8 consecutive blocks of a row. */
#define QG_D_OFFSETS _mm256_setr_epi32(0, 34, 68, 102, 136, 170, 204, 238)

/* The fp16 d of blocks b0..b0+kn-1 of a row (kn <= 8; lanes past kn 0) as 8 float lanes:
 * 8 16-bit loads (34 bytes apart) inserted into one vector, one vcvtph2ps. (A vpgatherdd
 * costs ~11 cycles on Zen 4: the row dots' whole per-block scale work.) */
QG_AVX2 QG_INLINE uint16_t qg_h(const uint8_t *p)
{
    uint16_t h;
    __builtin_memcpy(&h, p, 2);
    return h;
}
QG_AVX2 QG_INLINE __m256 qg_d8_avx2(const uint8_t *row, int kn)
{
    __m128i h;
    if (kn == QG_CHUNK) {
        h = _mm_setr_epi16((short)qg_h(row), (short)qg_h(row + 34), (short)qg_h(row + 68),
                           (short)qg_h(row + 102), (short)qg_h(row + 136), (short)qg_h(row + 170),
                           (short)qg_h(row + 204), (short)qg_h(row + 238));
    } else {
        uint16_t v[QG_CHUNK] = {0};
        for (int k = 0; k < kn; ++k) v[k] = qg_h(row + (size_t)k * QG_BLK);
        h = _mm_loadu_si128((const __m128i *)v);
    }
    return _mm256_cvtph_ps(h);
}
QG_VNNI QG_INLINE __m256 qg_d8_vnni(const uint8_t *row, int kn)
{
    return qg_d8_avx2(row, kn);
}

/* The integer lanes of one (row block, token block) pair: ggml's 8 exact sums of 4
 * products. AVX2: its sign trick. VNNI: (w + 128) x x from c = -128 * 4-sums of x. */
QG_AVX2 QG_INLINE __m256i qg_lanes_avx2(const uint8_t *wq, __m256i xq, const __m256i *c)
{
    (void)c;
    const __m256i v = _mm256_loadu_si256((const __m256i *)wq);
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(xq, v));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}
QG_VNNI QG_INLINE __m256i qg_lanes_vnni(const uint8_t *wq, __m256i xq, const __m256i *c)
{
    const __m256i u =
        _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)wq), _mm256_set1_epi8((char)0x80));
    return _mm256_dpbusd_epi32(_mm256_load_si256(c), u, xq);
}

/* QG_ROWS4's prefetch (tsr_prefetch_line_l2) issues a block's two lines beside its rows 0
 * and 2, not together before the block: bench_q80_gemv (1 GiB, 2026-12-06), share of the faster
 * read (kernels/membw.h), 2 threads, 2048 / 8192 columns, two runs: VNNI 0.72-0.81 / 0.69-0.70
 * before, 0.88 / 0.89 now (25.8 -> 33 GB/s); AVX2 0.66 / 0.67 -> 0.88 / 0.88; 1B Q8_0 decode
 * 21.4 -> 27.3 tok/s. Why the instruction form matters so much is not observable here (no
 * hardware counters); the Q4_0, Q4_K and Q6_K GEMVs measured the same (q40_gemm.c,
 * quant.c's RQ_PREFETCH_LINE). */
/* Block k of the chunk at b0 (token quants xb) into the 4 rows' accumulators: the token's
 * quants loaded once, then per row its exact lanes and one FMA with the scale product. */
#define QG_BLOCK(LANES, k, PF)                                                                     \
    do {                                                                                           \
        const __m256i xq = _mm256_loadu_si256((const __m256i *)(xb + (k)*QG_BLK));                 \
        _Pragma("GCC unroll 4") for (int r = 0; r < 4; ++r)                                        \
        {                                                                                          \
            if ((PF) && (r == 0 || r == 2))                                                        \
                tsr_prefetch_line_l2((const char *)pp + 128 * (k) + 32 * r);                       \
            const __m256i l = LANES(wr[r] + (size_t)(b0 + (k)) * QG_BLK + 2, xq, xc + b0 + (k));   \
            acc[r] =                                                                               \
                _mm256_fmadd_ps(_mm256_broadcast_ss(&sc[r][k]), _mm256_cvtepi32_ps(l), acc[r]);    \
        }                                                                                          \
    } while (0)

/* Rows wr[0..3] (nr of them real) against the token: x its blocks, xd its scales as floats
 * (zero-padded to a multiple of 8), xc its VNNI lane offsets per block. pf: a group further
 * on (4 * nb blocks from there) to prefetch into L2 over this one, or NULL. */
#define QG_ROWS4(NAME, ATTR, D8, LANES)                                                            \
    ATTR static void NAME(int64_t nb, const uint8_t *const *wr, int nr, const uint8_t *x,          \
                          const float *xd, const __m256i *xc, float *y, const uint8_t *pf)         \
    {                                                                                              \
        __m256 acc[4];                                                                             \
        _Pragma("GCC unroll 4") for (int r = 0; r < 4; ++r) acc[r] = _mm256_setzero_ps();          \
        float sc[4][QG_CHUNK] __attribute__((aligned(32)));                                        \
        const uint8_t *pp = pf, *pend;                                                             \
        for (int64_t b0 = 0; b0 < nb; b0 += QG_CHUNK) {                                            \
            const int kn = nb - b0 < QG_CHUNK ? (int)(nb - b0) : QG_CHUNK;                         \
            if (pf && kn < QG_CHUNK) {                                                             \
                pend = pp + (size_t)4 * QG_BLK * (size_t)kn;                                       \
                for (; pp < pend; pp += 64) _mm_prefetch((const char *)pp, _MM_HINT_T1);           \
            }                                                                                      \
            /* fp16(d_w) * fp16(d_x) for the chunk's blocks, each row's 8 at once */               \
            const __m256 xd8 = _mm256_loadu_ps(xd + b0);                                           \
            _Pragma("GCC unroll 4") for (int r = 0; r < 4; ++r)                                    \
                _mm256_store_ps(sc[r], _mm256_mul_ps(D8(wr[r] + (size_t)b0 * QG_BLK, kn), xd8));   \
            const uint8_t *xb = x + (size_t)b0 * QG_BLK + 2;                                       \
            if (kn == QG_CHUNK) {                                                                  \
                _Pragma("GCC unroll 8") for (int k = 0; k < QG_CHUNK; ++k)                         \
                {                                                                                  \
                    /* 17 lines per chunk (4 x 8 x 34 bytes): two a block, beside rows 0 and 2 */  \
                    QG_BLOCK(LANES, k, pf);                                                        \
                    if (pf && k == QG_CHUNK - 1) tsr_prefetch_line_l2((const char *)pp + 1024);    \
                }                                                                                  \
                pp += 4 * QG_BLK * QG_CHUNK;                                                       \
            } else {                                                                               \
                for (int k = 0; k < kn; ++k) {                                                     \
                    QG_BLOCK(LANES, k, 0);                                                         \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        _Pragma("GCC unroll 4") for (int r = 0; r < 4; ++r)                                        \
        {                                                                                          \
            const float v = tsr_hsum8_ps(acc[r]);                                                  \
            if (r < nr) y[r] = v;                                                                  \
        }                                                                                          \
    }

QG_ROWS4(qg_rows4_avx2, QG_AVX2, qg_d8_avx2, qg_lanes_avx2)
QG_ROWS4(qg_rows4_vnni, QG_VNNI, qg_d8_vnni, qg_lanes_vnni)

/* xc[b] = -128 * (the 8 4-sums of x's block b), the start of each VNNI block dot. */
QG_VNNI static void qg_offsets_vnni(int64_t nb, const uint8_t *x, __m256i *xc)
{
    for (int64_t b = 0; b < nb; ++b) {
        const __m256i xq = _mm256_loadu_si256((const __m256i *)(x + (size_t)b * QG_BLK + 2));
        const __m256i s =
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8((char)0x80), xq);
        _mm256_store_si256(&xc[b], _mm256_sub_epi32(_mm256_setzero_si256(), s));
    }
}

QG_AVX2 static void qg_scales(int64_t nb, const uint8_t *x, float *xd)
{
    int64_t b = 0;
    for (; b < nb; ++b) {
        uint16_t h;
        __builtin_memcpy(&h, x + (size_t)b * QG_BLK, 2);
        xd[b] = _cvtsh_ss(h);
    }
    for (; b % QG_CHUNK; ++b) xd[b] = 0.0f;
}
#endif

bool tsr_q80_gemv(int isa, int64_t n, int64_t n_rows, const void *w, size_t w_stride, const void *x,
                  float *y)
{
#if defined(__x86_64__) || defined(__i386__)
    const int64_t nb = n / 32;
    if (isa < TSR_GGML_AVX2 || nb <= 0 || nb > TSR_Q80_GEMV_MAX_BLOCKS || n % 32 != 0) return false;
    if (n_rows <= 0) return true;
    const bool vnni = isa >= TSR_GGML_VNNI;
    float xd[TSR_Q80_GEMV_MAX_BLOCKS + QG_CHUNK] __attribute__((aligned(32)));
    __m256i xc[TSR_Q80_GEMV_MAX_BLOCKS]; /* VNNI only */
    qg_scales(nb, x, xd);
    if (vnni) qg_offsets_vnni(nb, x, xc);
    const uint8_t *wb = w;
    const size_t gbytes = 4 * w_stride;
    const int64_t ahead = gbytes ? 4 * (int64_t)((QG_PF_BYTES + gbytes - 1) / gbytes)
                                 : n_rows; /* stride 0: one row, nothing to prefetch */
    for (int64_t r = 0; r < n_rows; r += 4) {
        const int nr = n_rows - r < 4 ? (int)(n_rows - r) : 4;
        const uint8_t *wr[4];
        for (int k = 0; k < 4; ++k) wr[k] = wb + (size_t)(r + (k < nr ? k : nr - 1)) * w_stride;
        /* the group `ahead` rows on, while it lies inside these rows (the hardware
         * prefetchers cover the last ones) */
        const uint8_t *pf = r + ahead + 4 <= n_rows ? wb + (size_t)(r + ahead) * w_stride : NULL;
        if (vnni)
            qg_rows4_vnni(nb, wr, nr, x, xd, xc, y + r, pf);
        else
            qg_rows4_avx2(nb, wr, nr, x, xd, xc, y + r, pf);
    }
    return true;
#else
    (void)isa, (void)n, (void)n_rows, (void)w, (void)w_stride, (void)x, (void)y;
    return false;
#endif
}
