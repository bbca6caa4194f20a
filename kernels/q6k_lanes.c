/*
 * q6k_lanes.c — Q6_K matrices in the lanes layout (see q6k_lanes.h): the repack and the
 * kernels (AVX-512 VNNI, scalar), which compute kernels/quant.c's Q6_K row dot order bit
 * for bit.
 *
 * The VNNI kernel takes tiles of up to 8 tokens over a group of 16 rows. Per super-block it
 * widens the rows' 16 scales once for the tile (int16 words with a zero high word, so that
 * one vpdpwssd multiplies an int32 lane by its row's scale); per ggml lane m it starts each
 * token's int32 lane at -32 * (s[2m] * bsum[2m] + s[2m + 1] * bsum[2m + 1]) (one vpdpwssd),
 * unpacks the 8 quant vectors of lane m (4 elements of each of 16 rows, 6 bits in a byte)
 * once for the tile, and per vector and token runs one vpdpbusd (the 4 products of each row,
 * |sum| <= 4 * 63 * 128 < 2^15: exact as an int16) and one vpdpwssd by the scales; then one
 * FMA per lane into the token's 8 float chains (kept in L1: 8 x 8 registers would not fit).
 */
#include "kernels/q6k_lanes.h"

#include "kernels/dot_ggml.h"
#include "kernels/lanes.h"
#include "kernels/quant.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>

#include "kernels/x86lanes.h"
_Static_assert(TSR_Q6KL_ROWS == TSR_LANES_ROWS, "the tile driver's groups");
#define Q6L_X86 1
#else
#define Q6L_X86 0
#endif

/* BLK: a file block (ql[128], qh[64], scales[16], fp16 d); XBLK: a Q8_K block (float d,
 * qs[256], int16 bsums[16]); a lanes super-block: d at 0, sc at OFF_SC, q at OFF_Q. */
enum {
    BLK = 210,
    B_QH = 128,
    B_SC = 192,
    B_D = 208,
    XBLK = 292,
    XQS = 4,
    XBSUMS = 260,
    OFF_SC = 64,
    OFF_Q = 320
};
_Static_assert(OFF_Q + 8 * 2 * 3 * 64 == TSR_Q6KL_SB_BYTES, "Q6_K lanes super-block");

static _Atomic int g_chosen = -1;

bool tsr_q6kl_chosen(void)
{
    return tsr_ggml_vnni_chosen("TSR_Q6K_LANES", &g_chosen);
}

size_t tsr_q6kl_group_bytes(int64_t n)
{
    if (n <= 0 || n % 256) return 0;
    return (size_t)(n / 256) * TSR_Q6KL_SB_BYTES;
}

size_t tsr_q6kl_bytes(int64_t n, int64_t n_out)
{
    if (n_out <= 0) return 0;
    return (size_t)((n_out + TSR_Q6KL_ROWS - 1) / TSR_Q6KL_ROWS) * tsr_q6kl_group_bytes(n);
}

/* Byte offset, in a lanes super-block, of q[m][H][k][r][0]. */
static inline size_t q_off(int m, int H, int k, int r)
{
    return OFF_Q + (size_t)64 * (3 * (2 * m + H) + k) + 4 * (size_t)r;
}

int tsr_q6kl_repack(int64_t n, int64_t n_out, const void *src, size_t src_stride, void *dst)
{
    if (n <= 0 || n % 256 || n_out < 0) return -1;
    const int64_t nsb = n / 256;
    const size_t gb = tsr_q6kl_group_bytes(n);
    for (int64_t g = 0; g * TSR_Q6KL_ROWS < n_out; g++) {
        uint8_t *grp = (uint8_t *)dst + (size_t)g * gb;
        for (int64_t i = 0; i < nsb; i++) {
            uint8_t *sb = grp + (size_t)i * TSR_Q6KL_SB_BYTES;
            memset(sb, 0, TSR_Q6KL_SB_BYTES); /* rows past n_out: d = 0, quants 0 */
            for (int r = 0; r < TSR_Q6KL_ROWS; r++) {
                const int64_t row = g * TSR_Q6KL_ROWS + r;
                if (row >= n_out) continue;
                const uint8_t *b =
                    (const uint8_t *)src + (size_t)row * src_stride + (size_t)i * BLK;
                memcpy(sb + 2 * r, b + B_D, 2);
                for (int k = 0; k < 8; k++) { /* k = 4H + 2p + h */
                    const int j = 8 * (k / 4) + 4 * ((k / 2) % 2) + k % 2;
                    sb[OFF_SC + 32 * k + 2 * r] = b[B_SC + j];
                    sb[OFF_SC + 32 * k + 2 * r + 1] = b[B_SC + j + 2];
                }
                for (int m = 0; m < 8; m++) {
                    for (int H = 0; H < 2; H++) {
                        memcpy(sb + q_off(m, H, 0, r), b + 64 * H + 4 * m, 4);
                        memcpy(sb + q_off(m, H, 1, r), b + 64 * H + 32 + 4 * m, 4);
                        memcpy(sb + q_off(m, H, 2, r), b + B_QH + 32 * H + 4 * m, 4);
                    }
                }
            }
        }
    }
    return 0;
}

/* The scalar form: row rr of a group's super-blocks, in kernels/quant.c's Q6_K order. */
static float dot_row_scalar(int64_t nsb, const uint8_t *grp, int rr, const uint8_t *x)
{
    float acc[8] = {0};
    for (int64_t i = 0; i < nsb; i++) {
        const uint8_t *sb = grp + (size_t)i * TSR_Q6KL_SB_BYTES;
        const uint8_t *xb = x + (size_t)i * XBLK;
        uint16_t hd;
        memcpy(&hd, sb + 2 * rr, 2);
        float yd;
        memcpy(&yd, xb, 4);
        const int8_t *y = (const int8_t *)(xb + XQS);
        int16_t bs[16];
        memcpy(bs, xb + XBSUMS, sizeof bs);
        int8_t s[16];
        for (int k = 0; k < 8; k++) {
            const int j = 8 * (k / 4) + 4 * ((k / 2) % 2) + k % 2;
            s[j] = (int8_t)sb[OFF_SC + 32 * k + 2 * rr];
            s[j + 2] = (int8_t)sb[OFF_SC + 32 * k + 2 * rr + 1];
        }
        for (int m = 0; m < 8; m++) {
            int32_t lane = -32 * (s[2 * m] * bs[2 * m] + s[2 * m + 1] * bs[2 * m + 1]);
            for (int H = 0; H < 2; H++) {
                const uint8_t *l0 = sb + q_off(m, H, 0, rr), *l1 = sb + q_off(m, H, 1, rr),
                              *qh = sb + q_off(m, H, 2, rr);
                for (int b = 0; b < 4; b++) {
                    const int q[4] = {(l0[b] & 0xF) | ((qh[b] & 3) << 4),
                                      (l1[b] & 0xF) | (((qh[b] >> 2) & 3) << 4),
                                      (l0[b] >> 4) | (((qh[b] >> 4) & 3) << 4),
                                      (l1[b] >> 4) | (((qh[b] >> 6) & 3) << 4)};
                    for (int c = 0; c < 4; c++) /* element 128H + 32c + 4m + b */
                        lane += s[8 * H + 2 * c + m / 4] * q[c] * y[128 * H + 32 * c + 4 * m + b];
                }
            }
            acc[m] = fmaf((float)lane, yd * tsr_f16_to_f32(hd), acc[m]);
        }
    }
    return tsr_ggml_hsum8(acc);
}

#if Q6L_X86
#define Q6L_VNNI TSR_LANES_VNNI
#define Q6L_TMAX 8

static inline int32_t rd32(const uint8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* One tile: T tokens (x: the first, x_stride bytes apart) x one group of 16 rows, all nsb
 * super-blocks. */
static inline __attribute__((always_inline)) Q6L_VNNI void
tile(const int T, int64_t nsb, const uint8_t *grp, const uint8_t *x, size_t x_stride, __m512 *out)
{
    const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30),
                  zero = _mm512_setzero_si512();
    __m512 acc[8][Q6L_TMAX]; /* [ggml lane][token] */
    for (int m = 0; m < 8; m++)
        for (int t = 0; t < T; t++) acc[m][t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nsb; i++) {
        const uint8_t *blk = grp + (size_t)i * TSR_Q6KL_SB_BYTES;
        const uint8_t *xb = x + (size_t)i * XBLK;
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
        __m512 dd[Q6L_TMAX];
        for (int t = 0; t < T; t++) {
            float yd;
            memcpy(&yd, xb + (size_t)t * x_stride, 4);
            dd[t] = _mm512_mul_ps(_mm512_set1_ps(yd), dw);
        }
        /* the rows' scales: sp[H][p][h] = (s[8H + 4p + h], s[8H + 4p + 2 + h]) int16 pairs (as
         * stored), sn[m] = (-32 s[2m], -32 s[2m + 1]) */
        __m512i sp[8], sn[8];
        for (int k = 0; k < 8; k++)
            sp[k] =
                _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(blk + OFF_SC + 32 * k)));
        for (int H = 0; H < 2; H++)
            for (int p = 0; p < 2; p++) {
                /* sub-blocks j = 8H + 4p + (0, 1, 2, 3): lanes m = 4H + 2p, 4H + 2p + 1 */
                const __m512i A = sp[4 * H + 2 * p], B = sp[4 * H + 2 * p + 1];
                const __m512i e = _mm512_mask_blend_epi16(0xAAAAAAAAu, A, _mm512_slli_epi32(B, 16));
                const __m512i o = _mm512_mask_blend_epi16(0xAAAAAAAAu, _mm512_srli_epi32(A, 16), B);
                sn[4 * H + 2 * p] = _mm512_slli_epi16(_mm512_sub_epi16(zero, e), 5);
                sn[4 * H + 2 * p + 1] = _mm512_slli_epi16(_mm512_sub_epi16(zero, o), 5);
            }
        for (int m = 0; m < 8; m++) {
            __m512i s[Q6L_TMAX];
#pragma GCC unroll 8
            for (int t = 0; t < T; t++)
                s[t] = _mm512_dpwssd_epi32(
                    zero, sn[m],
                    _mm512_set1_epi32(rd32(xb + (size_t)t * x_stride + XBSUMS + 4 * m)));
#pragma GCC unroll 2
            for (int H = 0; H < 2; H++) {
                const uint8_t *qv = blk + q_off(m, H, 0, 0);
                const __m512i l0 = _mm512_loadu_si512(qv), l1 = _mm512_loadu_si512(qv + 64),
                              qh = _mm512_loadu_si512(qv + 128);
                /* (a & m4) | b: ternary-logic 0xEC */
                const __m512i q[4] = {
                    _mm512_ternarylogic_epi32(l0, _mm512_and_si512(_mm512_slli_epi16(qh, 4), m30),
                                              m4, 0xEC),
                    _mm512_ternarylogic_epi32(l1, _mm512_and_si512(_mm512_slli_epi16(qh, 2), m30),
                                              m4, 0xEC),
                    _mm512_ternarylogic_epi32(_mm512_srli_epi16(l0, 4), _mm512_and_si512(qh, m30),
                                              m4, 0xEC),
                    _mm512_ternarylogic_epi32(_mm512_srli_epi16(l1, 4),
                                              _mm512_and_si512(_mm512_srli_epi16(qh, 2), m30), m4,
                                              0xEC)};
#pragma GCC unroll 2
                for (int p = 0; p < 2; p++) {
                    /* chunks c = 2p, 2p + 1: one vpdpwssd of both products (int16 words of a
                     * dword) with the pair (s[8H + 4p + m / 4], s[8H + 4p + 2 + m / 4]) */
                    const __m512i S = sp[4 * H + 2 * p + m / 4];
                    const int yo = XQS + 128 * H + 64 * p + 4 * m;
#pragma GCC unroll 8
                    for (int t = 0; t < T; t++) {
                        const uint8_t *yt = xb + (size_t)t * x_stride + yo;
                        const __m512i pa =
                            _mm512_dpbusd_epi32(zero, q[2 * p], _mm512_set1_epi32(rd32(yt)));
                        const __m512i pb = _mm512_dpbusd_epi32(zero, q[2 * p + 1],
                                                               _mm512_set1_epi32(rd32(yt + 32)));
                        s[t] = _mm512_dpwssd_epi32(
                            s[t],
                            _mm512_mask_blend_epi16(0xAAAAAAAAu, pa, _mm512_slli_epi32(pb, 16)), S);
                    }
                }
            }
#pragma GCC unroll 8
            for (int t = 0; t < T; t++)
                acc[m][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]), dd[t], acc[m][t]);
        }
    }
    for (int t = 0; t < T; t++) out[t] = tsr_lanes_hsum8(&acc[0][t], Q6L_TMAX);
}

#define Q6L_TILE(T, name)                                                                          \
    static Q6L_VNNI void name(int64_t nsb, const uint8_t *grp, const uint8_t *x, size_t xs,        \
                              __m512 *out, bool first)                                             \
    {                                                                                              \
        (void)first;                                                                               \
        tile(T, nsb, grp, x, xs, out);                                                             \
    }
Q6L_TILE(1, t1)
Q6L_TILE(2, t2)
Q6L_TILE(3, t3)
Q6L_TILE(4, t4)
Q6L_TILE(5, t5)
Q6L_TILE(6, t6)
Q6L_TILE(7, t7)
Q6L_TILE(8, t8)

static const tsr_lanes_tile_fn k_tiles[Q6L_TMAX + 1] = {NULL, t1, t2, t3, t4, t5, t6, t7, t8};

static Q6L_VNNI void dot_vnni(int64_t nsb, const uint8_t *packed, int64_t r0, int64_t n_rows,
                              int32_t n_tok, const uint8_t *x, size_t x_stride, float *y,
                              size_t y_stride)
{
    tsr_lanes_run(k_tiles, Q6L_TMAX, nsb, (size_t)nsb * TSR_Q6KL_SB_BYTES, packed, r0, n_rows,
                  n_tok, x, x_stride, y, y_stride);
}
#endif

void tsr_q6kl_dot(int isa, int64_t n, const void *packed, int64_t r0, int64_t n_rows, int32_t n_tok,
                  const void *x, size_t x_stride, float *y, size_t y_stride)
{
    const int64_t nsb = n / 256;
    if (n_rows <= 0 || n_tok <= 0) return;
#if Q6L_X86
    if (isa == TSR_GGML_VNNI) {
        dot_vnni(nsb, packed, r0, n_rows, n_tok, x, x_stride, y, y_stride);
        return;
    }
#endif
    (void)isa;
    tsr_lanes_run_scalar(dot_row_scalar, nsb, tsr_q6kl_group_bytes(n), packed, r0, n_rows, n_tok, x,
                         x_stride, y, y_stride);
}
