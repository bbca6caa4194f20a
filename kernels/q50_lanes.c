/*
 * q50_lanes.c — Q5_0 matrices in the lanes layout (see q50_lanes.h): the repack and the
 * kernels (AVX-512 VNNI, scalar), which compute kernels/quant.c's Q5_0 row dot order (ggml's)
 * bit for bit.
 *
 * The VNNI kernel takes tiles of up to Q5L_TMAX tokens over a group of 16 rows. Per block it
 * unpacks the 16 rows' quants once for the tile (4 vectors of nibble bytes give lanes j and
 * j + 4: an and, a shift and an and; the 5th bits a masked add of 16 under the lane's 64-bit
 * mask), and per token and lane runs one vpdpbusd (unsigned 0..31 by the token's 4 signed
 * quants, starting at -16 x their sum: exactly sum((q - 16) * y)), one conversion and one FMA
 * by the rows' fp16(d_w) * fp16(d_x) into the token's 8 float chains.
 */
#include "kernels/q50_lanes.h"

#include "kernels/dot_ggml.h"
#include "kernels/lanes.h"
#include "kernels/quant.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>

#include "kernels/x86hsum.h"
#include "kernels/x86lanes.h"
_Static_assert(TSR_Q50L_ROWS == TSR_LANES_ROWS, "the tile driver's groups");
#define Q5L_X86 1
#else
#define Q5L_X86 0
#endif

/* BLK: a file block (fp16 d, qh[4], qs[16]); XBLK: a Q8_0 block (fp16 d, qs[32]); a pair of
 * lanes blocks: qs at 0, qh masks at OFF_QH, d at OFF_D. */
enum { BLK = 22, B_QH = 2, B_QS = 6, XBLK = 34, XQS = 2, OFF_QH = 512, OFF_D = 640 };
_Static_assert(OFF_D + 64 == TSR_Q50L_PAIR_BYTES, "Q5_0 lanes pair");

static _Atomic int g_chosen = -1;

bool tsr_q50l_chosen(void)
{
    return tsr_ggml_vnni_chosen("TSR_Q50_LANES", &g_chosen);
}

size_t tsr_q50l_group_bytes(int64_t n)
{
    if (n <= 0 || n % 32) return 0;
    return (size_t)((n / 32 + 1) / 2) * TSR_Q50L_PAIR_BYTES;
}

size_t tsr_q50l_bytes(int64_t n, int64_t n_out)
{
    if (n_out <= 0) return 0;
    return (size_t)((n_out + TSR_Q50L_ROWS - 1) / TSR_Q50L_ROWS) * tsr_q50l_group_bytes(n);
}

/* Offsets, in a group, of block b's qs vector j (row r's 4 bytes at + 4r), its lane-l mask
 * and its 16 scales. */
static inline size_t qs_off(int64_t b, int j)
{
    return (size_t)(b / 2) * TSR_Q50L_PAIR_BYTES + 256 * (size_t)(b % 2) + 64 * (size_t)j;
}
static inline size_t qh_off(int64_t b, int l)
{
    return (size_t)(b / 2) * TSR_Q50L_PAIR_BYTES + OFF_QH + 64 * (size_t)(b % 2) + 8 * (size_t)l;
}
static inline size_t d_off(int64_t b)
{
    return (size_t)(b / 2) * TSR_Q50L_PAIR_BYTES + OFF_D + 32 * (size_t)(b % 2);
}

int tsr_q50l_repack(int64_t n, int64_t n_out, const void *src, size_t src_stride, void *dst)
{
    if (n <= 0 || n % 32 || n_out < 0) return -1;
    const int64_t nb = n / 32;
    const size_t gb = tsr_q50l_group_bytes(n);
    for (int64_t g = 0; g * TSR_Q50L_ROWS < n_out; g++) {
        uint8_t *grp = (uint8_t *)dst + (size_t)g * gb;
        memset(grp, 0, gb); /* rows past n_out, a padded block: d = 0, quants 0 */
        for (int64_t b = 0; b < nb; b++) {
            uint64_t mask[8] = {0};
            for (int r = 0; r < TSR_Q50L_ROWS; r++) {
                const int64_t row = g * TSR_Q50L_ROWS + r;
                if (row >= n_out) continue;
                const uint8_t *blk =
                    (const uint8_t *)src + (size_t)row * src_stride + (size_t)b * BLK;
                memcpy(grp + d_off(b) + 2 * r, blk, 2);
                for (int j = 0; j < 4; j++)
                    memcpy(grp + qs_off(b, j) + 4 * r, blk + B_QS + 4 * j, 4);
                uint32_t qh;
                memcpy(&qh, blk + B_QH, 4);
                for (int l = 0; l < 8; l++)
                    mask[l] |= (uint64_t)((qh >> (4 * l)) & 0xFu) << (4 * r);
            }
            for (int l = 0; l < 8; l++) memcpy(grp + qh_off(b, l), &mask[l], 8);
        }
    }
    return 0;
}

/* The scalar form: row rr of a group, in kernels/quant.c's Q5_0 order. */
static float dot_row_scalar(int64_t nb, const uint8_t *grp, int rr, const uint8_t *x)
{
    float acc[8] = {0};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *xb = x + (size_t)b * XBLK;
        const int8_t *y = (const int8_t *)(xb + XQS);
        uint16_t hw, hx;
        memcpy(&hw, grp + d_off(b) + 2 * rr, 2);
        memcpy(&hx, xb, 2);
        const float d = tsr_f16_to_f32(hw) * tsr_f16_to_f32(hx);
        for (int l = 0; l < 8; l++) {
            uint64_t mask;
            memcpy(&mask, grp + qh_off(b, l), 8);
            const uint8_t *qs = grp + qs_off(b, l % 4) + 4 * rr;
            int32_t si = 0;
            for (int k = 0; k < 4; k++) {
                const int nib = l < 4 ? qs[k] & 0xF : qs[k] >> 4;
                const int q = nib | (int)(((mask >> (4 * rr + k)) & 1u) << 4);
                si += (q - 16) * y[4 * l + k];
            }
            acc[l] = fmaf((float)si, d, acc[l]);
        }
    }
    return tsr_ggml_hsum8(acc);
}

#if Q5L_X86
#define Q5L_VNNI TSR_LANES_VNNI
/* Tiles of up to 3 tokens: every chain in registers (tiles of 8 spilled 64 chains to L1:
 * below). */
#define Q5L_TMAX TSR_LANES_RTMAX

static inline int32_t rd32(const uint8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* One tile: T tokens (x: the first, x_stride bytes apart) x one group of 16 rows, all nb
 * blocks. A group's first tile prefetches the block 8 pairs on into L1 (5.5 KiB; past the
 * group's end, the next group's) and 24 pairs on into L2: this kernel's compute per byte
 * leaves the hardware prefetchers behind (tests/bench_gemv_stream, 2 threads, ~32 GB/s read:
 * 0.72-0.82 of the read without any, 0.92-0.97 with 4 pairs on into L1).
 *
 * The ring, 3-token tiles and the farther prefetches against tiles of up to 8 tokens that
 * laid out each block's starts just before reading them, prefetching 4 pairs on into L1: a
 * prototype, 1 thread, Qwen2.5's 896 / 4864 columns, the two alternated, best of 9, GB/s of
 * the file's bytes times the tokens, from L2 / streaming 1 GiB: 1 token 31 / 19-23 -> 37-39 /
 * 21-22; 2 tokens 33-37 / 27-31 -> 40-50 / 36-45; 3 tokens 36-37 / 30-35 -> 48-50 / 45; 4
 * tokens 35-38 / 34-36 -> 48-50 / 46; 8 tokens 41-43 / 40-43 -> 48-51 / 46-50; 16 tokens 42-43
 * / 39-42 -> 41-51 / 40-49. The ring alone with tiles of 8: 8 tokens 35-43 (their 64 chains
 * spill); 4-token tiles 45-48. */
static inline __attribute__((always_inline)) Q5L_VNNI void tile(const int T, int64_t nb,
                                                                const uint8_t *grp,
                                                                const uint8_t *x, size_t x_stride,
                                                                __m512 *out, bool first)
{
    const __m512i m4 = _mm512_set1_epi8(0x0F), k16 = _mm512_set1_epi8(16);
    __m512 acc[8][Q5L_TMAX]; /* [ggml lane][token] */
    tsr_lanes_slot ring[TSR_LANES_RING];
    for (int l = 0; l < 8; l++)
        for (int t = 0; t < T; t++) acc[l][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < TSR_LANES_AHEAD && b < nb; b++)
        tsr_lanes_slot_fill(T, &ring[b], x, x_stride, b, 16);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *pb = grp + (size_t)(b / 2) * TSR_Q50L_PAIR_BYTES;
        const int h = (int)(b % 2);
        if (b + TSR_LANES_AHEAD < nb)
            tsr_lanes_slot_fill(T, &ring[(b + TSR_LANES_AHEAD) % TSR_LANES_RING], x, x_stride,
                                b + TSR_LANES_AHEAD, 16);
        if (first)
#pragma GCC unroll 6
            for (int i = 0; i < 6; i++)
                if (384 * h + 64 * i < TSR_Q50L_PAIR_BYTES) {
                    const char *l = (const char *)pb + 384 * h + 64 * i;
                    _mm_prefetch(l + 8 * TSR_Q50L_PAIR_BYTES, _MM_HINT_T0);
                    _mm_prefetch(l + 24 * TSR_Q50L_PAIR_BYTES, _MM_HINT_T1);
                }
        const __m512 dw =
            _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(pb + OFF_D + 32 * h)));
        /* the 16 rows' quants 0..31 of lane l (4 bytes a row) */
        __m512i u[8];
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            const __m512i v = _mm512_loadu_si512(pb + 256 * h + 64 * j);
            const __m512i lo = _mm512_and_si512(v, m4);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            uint64_t ml, mh;
            memcpy(&ml, pb + OFF_QH + 64 * h + 8 * j, 8);
            memcpy(&mh, pb + OFF_QH + 64 * h + 8 * (j + 4), 8);
            u[j] = _mm512_mask_add_epi8(lo, _cvtu64_mask64(ml), lo, k16);
            u[j + 4] = _mm512_mask_add_epi8(hi, _cvtu64_mask64(mh), hi, k16);
        }
        const tsr_lanes_slot *sl = &ring[b % TSR_LANES_RING];
#pragma GCC unroll 3
        for (int t = 0; t < T; t++) {
            const uint8_t *xb = x + (size_t)t * x_stride + (size_t)b * XBLK;
            const __m512 dd = _mm512_mul_ps(dw, _mm512_set1_ps(sl->dx[t]));
#pragma GCC unroll 8
            for (int l = 0; l < 8; l++)
                acc[l][t] =
                    tsr_lanes_step(acc[l][t], u[l], sl->c[t][l], rd32(xb + XQS + 4 * l), dd);
        }
    }
    for (int t = 0; t < T; t++) out[t] = tsr_lanes_hsum8(&acc[0][t], Q5L_TMAX);
}

#define Q5L_TILE(T, name)                                                                          \
    static Q5L_VNNI void name(int64_t nb, const uint8_t *grp, const uint8_t *x, size_t xs,         \
                              __m512 *out, bool first)                                             \
    {                                                                                              \
        tile(T, nb, grp, x, xs, out, first);                                                       \
    }
Q5L_TILE(1, t1)
Q5L_TILE(2, t2)
Q5L_TILE(3, t3)

static const tsr_lanes_tile_fn k_tiles[Q5L_TMAX + 1] = {NULL, t1, t2, t3};

static Q5L_VNNI void dot_vnni(int64_t nb, const uint8_t *packed, int64_t r0, int64_t n_rows,
                              int32_t n_tok, const uint8_t *x, size_t x_stride, float *y,
                              size_t y_stride)
{
    tsr_lanes_run(k_tiles, Q5L_TMAX, nb, tsr_q50l_group_bytes(nb * 32), packed, r0, n_rows, n_tok,
                  x, x_stride, y, y_stride);
}
#endif

void tsr_q50l_dot(int isa, int64_t n, const void *packed, int64_t r0, int64_t n_rows, int32_t n_tok,
                  const void *x, size_t x_stride, float *y, size_t y_stride)
{
    const int64_t nb = n / 32;
    if (n_rows <= 0 || n_tok <= 0) return;
#if Q5L_X86
    if (isa == TSR_GGML_VNNI) {
        dot_vnni(nb, packed, r0, n_rows, n_tok, x, x_stride, y, y_stride);
        return;
    }
#endif
    (void)isa;
    tsr_lanes_run_scalar(dot_row_scalar, nb, tsr_q50l_group_bytes(n), packed, r0, n_rows, n_tok, x,
                         x_stride, y, y_stride);
}
