/*
 * q40_lanes.c — Q4_0 matrices in the lanes layout (see q40_lanes.h): the repack and the
 * kernels (AVX-512 VNNI, AVX2, scalar), which compute the same bits as kernels/q40_gemm.c.
 *
 * The VNNI kernel keeps one zmm accumulator per token of a tile (16 rows in its lanes) and,
 * per block, the group's 8 nibble vectors (4 loads, each split into low and high nibbles)
 * in registers: per token 8 vpdpbusd with the token's 4 quant bytes broadcast, started from
 * -8 * sum(q_y), then one conversion, one scale product (the 16 rows' d_w by the token's
 * d_y) and one FMA. Tokens go in tiles of up to 8, each tile one pass over the group's
 * blocks (a 2048-column group is 18 KiB: a second tile reads it from L2). The AVX2 kernel
 * (below) walks the same way with the 16 rows as two ymm halves, tiles of up to 4 tokens.
 */
#include "kernels/q40_lanes.h"

#include "kernels/dot_ggml.h"
#include "kernels/q80_lanes.h"
#include "kernels/quant.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>

#include "kernels/x86lanes.h"
_Static_assert(TSR_Q40L_ROWS == TSR_LANES_ROWS, "the tile driver's groups");
#define Q4L_X86 1
#else
#define Q4L_X86 0
#endif

/* The Q8_0 lanes prep's block (q80_lanes.h). */
typedef struct {
    int32_t c; /* -128 * sum(q) */
    float d;   /* fp16 scale as float */
    int8_t q[32];
} q4l_xblk;
_Static_assert(sizeof(q4l_xblk) == TSR_Q80L_XBLOCK_BYTES, "prepared block size");
_Static_assert(TSR_Q40L_ROWS == TSR_Q80L_ROWS, "ops.c splits rows of both in one multiple");

/* -1: not decided yet. */
static _Atomic int g_chosen = -1;

bool tsr_q40l_chosen(void)
{
    return tsr_ggml_isa_chosen("TSR_Q40_LANES", TSR_GGML_AVX2, &g_chosen);
}

size_t tsr_q40l_group_bytes(int64_t n)
{
    if (n <= 0 || n % 32) return 0;
    return (size_t)(n / 32) * TSR_Q40L_BLOCK_BYTES;
}

size_t tsr_q40l_bytes(int64_t n, int64_t n_out)
{
    if (n_out <= 0) return 0;
    return (size_t)((n_out + TSR_Q40L_ROWS - 1) / TSR_Q40L_ROWS) * tsr_q40l_group_bytes(n);
}

int tsr_q40l_repack(int64_t n, int64_t n_out, const void *src, size_t src_stride, void *dst)
{
    if (n <= 0 || n % 32 || n_out < 0) return -1;
    const int64_t nb = n / 32;
    const size_t gb = tsr_q40l_group_bytes(n);
    for (int64_t g = 0; g * TSR_Q40L_ROWS < n_out; g++) {
        uint8_t *grp = (uint8_t *)dst + (size_t)g * gb;
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *blk = grp + (size_t)b * TSR_Q40L_BLOCK_BYTES;
            uint16_t d[TSR_Q40L_ROWS];
            for (int r = 0; r < TSR_Q40L_ROWS; r++) {
                const int64_t row = g * TSR_Q40L_ROWS + r;
                uint8_t *q = blk + 32 + 4 * r; /* q[k][r][j] at 32 + 64k + 4r + j */
                if (row >= n_out) {
                    d[r] = 0;
                    for (int k = 0; k < 4; k++) memset(q + 64 * k, 0x88, 4); /* quants 0 */
                    continue;
                }
                /* a Q4_0 block: fp16 d, 16 bytes of nibbles (18 bytes) */
                const uint8_t *sb =
                    (const uint8_t *)src + (size_t)row * src_stride + (size_t)b * 18;
                memcpy(&d[r], sb, 2);
                for (int k = 0; k < 4; k++) memcpy(q + 64 * k, sb + 2 + 4 * k, 4);
            }
            memcpy(blk, d, sizeof d);
        }
    }
    return 0;
}

/* The scalar form: rows r0..r0 + n_rows - 1 of the group layout, one at a time. */
static void dot_scalar(int64_t nb, const uint8_t *packed, int64_t r0, int64_t n_rows, int32_t n_tok,
                       const q4l_xblk *x, float *y, size_t y_stride)
{
    const size_t gb = (size_t)nb * TSR_Q40L_BLOCK_BYTES;
    for (int64_t r = 0; r < n_rows; r++) {
        const int64_t row = r0 + r;
        const uint8_t *grp = packed + (size_t)(row / TSR_Q40L_ROWS) * gb;
        const int rr = (int)(row % TSR_Q40L_ROWS);
        for (int32_t t = 0; t < n_tok; t++) {
            const q4l_xblk *xt = x + (size_t)t * (size_t)nb;
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = grp + (size_t)b * TSR_Q40L_BLOCK_BYTES;
                uint16_t h;
                memcpy(&h, blk + 2 * rr, 2);
                int32_t s = 0;
                for (int k = 0; k < 4; k++)
                    for (int j = 0; j < 4; j++) {
                        const uint8_t v = blk[32 + 64 * k + 4 * rr + j];
                        s += ((int32_t)(v & 15) - 8) * xt[b].q[4 * k + j] +
                             ((int32_t)(v >> 4) - 8) * xt[b].q[16 + 4 * k + j];
                    }
                const float sc = tsr_f16_to_f32(h) * xt[b].d;
                acc = fmaf((float)s, sc, acc);
            }
            y[(size_t)t * y_stride + (size_t)r] = acc;
        }
    }
}

#if Q4L_X86
#define Q4L_VNNI TSR_LANES_VNNI

/* Prefetch. One token: none (the hardware prefetchers alone stream it faster: a prototype
 * streaming 1 GiB on 2 threads, at a ~50 GB/s read, 1.03 of a plain read without, 0.83 /
 * 0.85 / 0.92 with 4 / 8 / 16 blocks ahead into L1). Several tokens, as the Q8_0 lanes
 * tiles: 8 blocks ahead into L1 (the block's 5 lines), and from 4 tokens in a group's first
 * tile also 32 blocks ahead into L2. */
#define Q4L_PF_BYTES         (8 * TSR_Q40L_BLOCK_BYTES)
#define Q4L_PF_L2_BYTES      (32 * TSR_Q40L_BLOCK_BYTES)
#define Q4L_PF_L2_MIN_TOKENS 4

static inline __attribute__((always_inline)) Q4L_VNNI void tile(const int T, int64_t nb,
                                                                const uint8_t *grp,
                                                                const q4l_xblk *x, size_t x_stride,
                                                                __m512 *out, bool first)
{
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512 acc[8];
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = grp + (size_t)b * TSR_Q40L_BLOCK_BYTES;
        if (T > 1)
#pragma GCC unroll 5
            for (int l = 0; l < TSR_Q40L_BLOCK_BYTES; l += 64)
                _mm_prefetch((const char *)blk + Q4L_PF_BYTES + l, _MM_HINT_T0);
        if (T >= Q4L_PF_L2_MIN_TOKENS && first)
#pragma GCC unroll 5
            for (int l = 0; l < TSR_Q40L_BLOCK_BYTES; l += 64)
                _mm_prefetch((const char *)blk + Q4L_PF_L2_BYTES + l, _MM_HINT_T1);
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
        /* named registers, not an array (gcc spilled arrays of them in the Q8_0 tiles) */
        const __m512i v0 = _mm512_loadu_si512(blk + 32), v1 = _mm512_loadu_si512(blk + 96);
        const __m512i v2 = _mm512_loadu_si512(blk + 160), v3 = _mm512_loadu_si512(blk + 224);
        const __m512i l0 = _mm512_and_si512(v0, m4),
                      h0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), m4);
        const __m512i l1 = _mm512_and_si512(v1, m4),
                      h1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4);
        const __m512i l2 = _mm512_and_si512(v2, m4),
                      h2 = _mm512_and_si512(_mm512_srli_epi16(v2, 4), m4);
        const __m512i l3 = _mm512_and_si512(v3, m4),
                      h3 = _mm512_and_si512(_mm512_srli_epi16(v3, 4), m4);
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            const q4l_xblk *xb = x + (size_t)t * x_stride + b;
            const int32_t *q4 = (const int32_t *)(const void *)xb->q; /* 4-byte aligned */
            /* two chains (exact integer sums: their order is free); c / 16 = -8 * sum(q_y)
             * (c is a multiple of 128: the shift is exact) */
            __m512i s0 =
                _mm512_dpbusd_epi32(_mm512_set1_epi32(xb->c >> 4), l0, _mm512_set1_epi32(q4[0]));
            __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), h0, _mm512_set1_epi32(q4[4]));
            s0 = _mm512_dpbusd_epi32(s0, l1, _mm512_set1_epi32(q4[1]));
            s1 = _mm512_dpbusd_epi32(s1, h1, _mm512_set1_epi32(q4[5]));
            s0 = _mm512_dpbusd_epi32(s0, l2, _mm512_set1_epi32(q4[2]));
            s1 = _mm512_dpbusd_epi32(s1, h2, _mm512_set1_epi32(q4[6]));
            s0 = _mm512_dpbusd_epi32(s0, l3, _mm512_set1_epi32(q4[3]));
            s1 = _mm512_dpbusd_epi32(s1, h3, _mm512_set1_epi32(q4[7]));
            const __m512 sc = _mm512_mul_ps(dw, _mm512_set1_ps(xb->d));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), sc, acc[t]);
        }
    }
    for (int t = 0; t < T; t++) out[t] = acc[t];
}

/* ---- AVX2: the same walk, a group's 16 rows as two ymm halves of 8 ----
 * Per block and half: 4 loads (rows 8h..8h+7 of q[k]), each split into low and high
 * nibbles; per token 8 vpmaddubsw (nibbles 0..15 by the token's 4 quants broadcast) summed
 * in int16 (exact: each is at most 2 * 15 * 128 = 3840, eight of them 30720 < 32768), one
 * vpmaddwd by ones to the 8 rows' int32 block sums, plus c / 16 = -8 * sum(q_y), then one
 * conversion, one scale product and one FMA: Q4_0's order, the same bits. Both halves in
 * one block step, so that the group streams once, in order. Where the groups' GEMV
 * (q40_gemm.c) gathers each row's block from a 128-bit lane with 3 vphaddd per 8 rows and
 * converts the scales by an 8 x 8 transpose every 8 blocks, here the rows' sums build up in
 * their own lanes and a half's 8 scales are one 16-byte load: on AMD Zen 3, 2048 columns
 * from L2, 1 thread, one token 2.4 against 5.6 cycles a (row, block) (2.3x), 4 tokens
 * 1.4x, 128 tokens 1.0-1.1x the groups' GEMM (a prototype against
 * tsr_q40_gemm_dot_repacked, 2026-12-07). Every tile prefetches 8 blocks ahead into L1, as
 * the VNNI tiles of several tokens do: streaming 1 GiB on 2 threads (tests/bench_gemv_stream,
 * 2026-12-07, alternated) one token read 0.71-0.85 of a plain read without it, 0.89-0.95 with
 * it (2, 4, 16 or 32 blocks ahead: 0.78-0.93, 0.86-0.88, 0.83-0.86); 1B Q4_0 decode, 2
 * threads, three pairs: 43.1-44.0 -> 45.8-51.0 tokens/s, prefill unchanged. */
#define Q4L_AVX2      __attribute__((target("avx2,fma,f16c")))
#define Q4L_AVX2_TMAX 4 /* 8 nibble vectors + 2 x 4 accumulators: 16 ymm */
_Static_assert(Q4L_AVX2_TMAX <= TSR_LANES_AVX2_TMAX, "x86lanes.h's AVX2 tiles");

static inline __attribute__((always_inline)) Q4L_AVX2 void
tile_avx2(const int T, int64_t nb, const uint8_t *grp, const q4l_xblk *x, size_t x_stride,
          __m256 out[][2])
{
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[Q4L_AVX2_TMAX][2];
    for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = grp + (size_t)b * TSR_Q40L_BLOCK_BYTES;
        /* 8 blocks ahead into L1, every tile (Zen 3, unlike Zen 4's one-token VNNI tile: see
         * the top) */
#pragma GCC unroll 5
        for (int l = 0; l < TSR_Q40L_BLOCK_BYTES; l += 64)
            _mm_prefetch((const char *)blk + Q4L_PF_BYTES + l, _MM_HINT_T0);
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16 * h)));
            const uint8_t *q = blk + 32 + 32 * h; /* q[k] of rows 8h..8h+7 at q + 64k */
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)q),
                          v1 = _mm256_loadu_si256((const __m256i *)(q + 64)),
                          v2 = _mm256_loadu_si256((const __m256i *)(q + 128)),
                          v3 = _mm256_loadu_si256((const __m256i *)(q + 192));
            const __m256i l0 = _mm256_and_si256(v0, m4),
                          h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4);
            const __m256i l1 = _mm256_and_si256(v1, m4),
                          h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4);
            const __m256i l2 = _mm256_and_si256(v2, m4),
                          h2 = _mm256_and_si256(_mm256_srli_epi16(v2, 4), m4);
            const __m256i l3 = _mm256_and_si256(v3, m4),
                          h3 = _mm256_and_si256(_mm256_srli_epi16(v3, 4), m4);
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) {
                const q4l_xblk *xb = x + (size_t)t * x_stride + b;
                const int32_t *q4 = (const int32_t *)(const void *)xb->q; /* 4-byte aligned */
                /* int16 pairs (u_l * y_l + u_l+1 * y_l+1), exact sums in any order */
                const __m256i s0 =
                    _mm256_add_epi16(_mm256_maddubs_epi16(l0, _mm256_set1_epi32(q4[0])),
                                     _mm256_maddubs_epi16(h0, _mm256_set1_epi32(q4[4])));
                const __m256i s1 =
                    _mm256_add_epi16(_mm256_maddubs_epi16(l1, _mm256_set1_epi32(q4[1])),
                                     _mm256_maddubs_epi16(h1, _mm256_set1_epi32(q4[5])));
                const __m256i s2 =
                    _mm256_add_epi16(_mm256_maddubs_epi16(l2, _mm256_set1_epi32(q4[2])),
                                     _mm256_maddubs_epi16(h2, _mm256_set1_epi32(q4[6])));
                const __m256i s3 =
                    _mm256_add_epi16(_mm256_maddubs_epi16(l3, _mm256_set1_epi32(q4[3])),
                                     _mm256_maddubs_epi16(h3, _mm256_set1_epi32(q4[7])));
                const __m256i s16 =
                    _mm256_add_epi16(_mm256_add_epi16(s0, s1), _mm256_add_epi16(s2, s3));
                /* c is a multiple of 128: c >> 4 = -8 * sum(q_y) exactly */
                const __m256i I =
                    _mm256_add_epi32(_mm256_madd_epi16(s16, ones), _mm256_set1_epi32(xb->c >> 4));
                const __m256 sc = _mm256_mul_ps(dw, _mm256_set1_ps(xb->d));
                acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(I), sc, acc[t][h]);
            }
        }
    }
    for (int t = 0; t < T; t++) {
        out[t][0] = acc[t][0];
        out[t][1] = acc[t][1];
    }
}

/* kernels/x86lanes.h's AVX2 tile: x_stride in bytes, tile_avx2()'s in blocks */
#define Q4L_TILE_AVX2(T)                                                                           \
    static Q4L_AVX2 void tile_avx2_##T(int64_t nb, const uint8_t *grp, const uint8_t *x,           \
                                       size_t x_stride, __m256 out[][2])                           \
    {                                                                                              \
        tile_avx2(T, nb, grp, (const q4l_xblk *)x, x_stride / sizeof(q4l_xblk), out);              \
    }
Q4L_TILE_AVX2(1)
Q4L_TILE_AVX2(2)
Q4L_TILE_AVX2(3)
Q4L_TILE_AVX2(4)

static const tsr_lanes_tile_avx2_fn k_tiles_avx2[Q4L_AVX2_TMAX + 1] = {
    NULL, tile_avx2_1, tile_avx2_2, tile_avx2_3, tile_avx2_4};

static Q4L_AVX2 void dot_avx2(int64_t nb, const uint8_t *packed, int64_t r0, int64_t n_rows,
                              int32_t n_tok, const q4l_xblk *x, float *y, size_t y_stride)
{
    tsr_lanes_run_avx2(k_tiles_avx2, Q4L_AVX2_TMAX, nb, (size_t)nb * TSR_Q40L_BLOCK_BYTES, packed,
                       r0, n_rows, n_tok, (const uint8_t *)x, (size_t)nb * sizeof(q4l_xblk), y,
                       y_stride);
}

/* kernels/x86lanes.h's tile: x_stride in bytes, tile()'s in blocks */
#define Q4L_TILE(T)                                                                                \
    static Q4L_VNNI void tile##T(int64_t nb, const uint8_t *grp, const uint8_t *x,                 \
                                 size_t x_stride, __m512 *out, bool first)                         \
    {                                                                                              \
        tile(T, nb, grp, (const q4l_xblk *)x, x_stride / sizeof(q4l_xblk), out, first);            \
    }
Q4L_TILE(1)
Q4L_TILE(2)
Q4L_TILE(3)
Q4L_TILE(4)
Q4L_TILE(5)
Q4L_TILE(6)
Q4L_TILE(7)
Q4L_TILE(8)

static const tsr_lanes_tile_fn k_tiles[9] = {NULL,  tile1, tile2, tile3, tile4,
                                             tile5, tile6, tile7, tile8};

static Q4L_VNNI void dot_vnni(int64_t nb, const uint8_t *packed, int64_t r0, int64_t n_rows,
                              int32_t n_tok, const q4l_xblk *x, float *y, size_t y_stride)
{
    tsr_lanes_run(k_tiles, 8, nb, (size_t)nb * TSR_Q40L_BLOCK_BYTES, packed, r0, n_rows, n_tok,
                  (const uint8_t *)x, (size_t)nb * sizeof(q4l_xblk), y, y_stride);
}
#endif

void tsr_q40l_dot(int isa, int64_t n, const void *packed, int64_t r0, int64_t n_rows, int32_t n_tok,
                  const void *prep, float *y, size_t y_stride)
{
    const int64_t nb = n / 32;
    if (n_rows <= 0 || n_tok <= 0) return;
#if Q4L_X86
    if (isa == TSR_GGML_VNNI) {
        dot_vnni(nb, packed, r0, n_rows, n_tok, prep, y, y_stride);
        return;
    }
    if (isa == TSR_GGML_AVX2) {
        dot_avx2(nb, packed, r0, n_rows, n_tok, prep, y, y_stride);
        return;
    }
#endif
    (void)isa;
    dot_scalar(nb, packed, r0, n_rows, n_tok, prep, y, y_stride);
}
