/*
 * q80_lanes.c — Q8_0 matrices in the lanes layout (see q80_lanes.h): the repack, the
 * activation prep, the kernels of the lanes order (AVX-512 VNNI, scalar), which compute the
 * same bits, and those of ggml's order over the layout (tsr_q80l_dot_ggml, further down).
 *
 * The VNNI kernel keeps one zmm accumulator per token of a tile (16 rows in its lanes) and,
 * per block, the group's 8 quant vectors in registers: per token 8 vpdpbusd with the
 * token's 4 quant bytes broadcast from memory, started from c = -128 * sum(q_x), then one
 * conversion, one scale product (the 16 rows' d_w by the token's d_x) and one FMA. Tokens
 * go in tiles of up to 8 (8 accumulators + 8 weight vectors + temporaries fit the 32
 * registers), each tile one pass over the group's blocks: a group of a 2048-column matrix
 * is 34 KiB, so a second tile reads it from L2.
 *
 * Measured on this host (AMD EPYC Zen 4, 1 thread, 2048 columns, zmm vpdpbusd per ns,
 * tests/bench_tile, which prints both orders): from L2, 2 / 5 / 8 / 16 tokens 1.80 / 2.68-2.78
 * / 2.73-2.82 / 2.73-2.81 against ggml's order 0.91 / 1.19 / 1.14 / 1.18 (its 256-bit tile);
 * streaming 1 GiB with the prefetches below 0.83 (0.68-0.71 before 2 tokens went 8 blocks
 * ahead) / 1.72-2.28 / 2.52-2.61 / 2.55-2.58 against
 * 0.65 / 1.09 / 1.08 / 1.12.
 */
#include "kernels/q80_lanes.h"

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
_Static_assert(TSR_Q80L_ROWS == TSR_LANES_ROWS, "the tile driver's groups");
#define Q8L_X86 1
#else
#define Q8L_X86 0
#endif

/* A prepared activation block (q80_lanes.h). */
typedef struct {
    int32_t c; /* -128 * sum(q) */
    float d;   /* fp16 scale as float */
    int8_t q[32];
} q8l_xblk;
_Static_assert(sizeof(q8l_xblk) == TSR_Q80L_XBLOCK_BYTES, "prepared block size");

/* -1: not read yet (the environment decides on first use). */
static _Atomic int g_on = -1;

bool tsr_q80l_parse(const char *name, bool *on)
{
    if (!name) return false;
    if (strcmp(name, "lanes") == 0) {
        *on = true;
        return true;
    }
    if (strcmp(name, "ggml") == 0) {
        *on = false;
        return true;
    }
    return false;
}

bool tsr_q80l_fast(void)
{
    return tsr_ggml_isa() == TSR_GGML_VNNI;
}

const char *tsr_q80l_slow_note(void)
{
    return tsr_q80l_on() && !tsr_q80l_fast()
               ? "this CPU has no AVX-512 VNNI, so the lanes order of Q8_0 runs a scalar loop "
                 "here, 20-40x slower than the default order (--q8-order ggml)"
               : NULL;
}

bool tsr_q80l_on(void)
{
    int v = atomic_load_explicit(&g_on, memory_order_relaxed);
    if (v < 0) {
        bool on = false;
        const char *e = getenv("TSR_Q80_ORDER");
        if (e && !tsr_q80l_parse(e, &on)) on = false;
        v = on;
        atomic_store_explicit(&g_on, v, memory_order_relaxed);
    }
    return v != 0;
}

void tsr_q80l_set(int on)
{
    atomic_store_explicit(&g_on, on < 0 ? -1 : on != 0, memory_order_relaxed);
}

size_t tsr_q80l_group_bytes(int64_t n)
{
    if (n <= 0 || n % 32) return 0;
    return (size_t)(n / 32) * TSR_Q80L_BLOCK_BYTES;
}

size_t tsr_q80l_bytes(int64_t n, int64_t n_out)
{
    if (n_out <= 0) return 0;
    return (size_t)((n_out + TSR_Q80L_ROWS - 1) / TSR_Q80L_ROWS) * tsr_q80l_group_bytes(n);
}

int tsr_q80l_repack(int64_t n, int64_t n_out, const void *src, size_t src_stride, void *dst)
{
    if (n <= 0 || n % 32 || n_out < 0) return -1;
    const int64_t nb = n / 32;
    const size_t gb = tsr_q80l_group_bytes(n);
    for (int64_t g = 0; g * TSR_Q80L_ROWS < n_out; g++) {
        uint8_t *grp = (uint8_t *)dst + (size_t)g * gb;
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *blk = grp + (size_t)b * TSR_Q80L_BLOCK_BYTES;
            uint16_t d[TSR_Q80L_ROWS];
            for (int r = 0; r < TSR_Q80L_ROWS; r++) {
                const int64_t row = g * TSR_Q80L_ROWS + r;
                uint8_t *q = blk + 32 + 4 * r; /* q[k][r][j] at 32 + 64k + 4r + j */
                if (row >= n_out) {
                    d[r] = 0;
                    for (int k = 0; k < 8; k++) memset(q + 64 * k, 0x80, 4); /* quant 0 */
                    continue;
                }
                /* a Q8_0 block: fp16 d, int8 qs[32] (34 bytes) */
                const uint8_t *sb =
                    (const uint8_t *)src + (size_t)row * src_stride + (size_t)b * 34;
                memcpy(&d[r], sb, 2);
                for (int k = 0; k < 8; k++)
                    for (int j = 0; j < 4; j++) q[64 * k + j] = sb[2 + 4 * k + j] ^ 0x80;
            }
            memcpy(blk, d, sizeof d);
        }
    }
    return 0;
}

size_t tsr_q80l_prep_bytes(int64_t n, int32_t n_tok)
{
    return (size_t)(n / 32) * TSR_Q80L_XBLOCK_BYTES * (size_t)(n_tok > 0 ? n_tok : 0);
}

void tsr_q80l_prep(int64_t n, const void *xq, void *prep)
{
    const uint8_t *x = xq;
    q8l_xblk *p = prep;
    for (int64_t b = 0; b < n / 32; b++, x += 34) {
        uint16_t h;
        memcpy(&h, x, 2);
        memcpy(p[b].q, x + 2, 32);
        int32_t s = 0;
        for (int i = 0; i < 32; i++) s += p[b].q[i];
        p[b].c = -128 * s;
        p[b].d = tsr_f16_to_f32(h);
    }
}

/* The scalar form: rows r0..r0 + n_rows - 1 of the group layout, one at a time. */
static void dot_scalar(int64_t nb, const uint8_t *packed, int64_t r0, int64_t n_rows, int32_t n_tok,
                       const q8l_xblk *x, float *y, size_t y_stride)
{
    const size_t gb = (size_t)nb * TSR_Q80L_BLOCK_BYTES;
    for (int64_t r = 0; r < n_rows; r++) {
        const int64_t row = r0 + r;
        const uint8_t *grp = packed + (size_t)(row / TSR_Q80L_ROWS) * gb;
        const int rr = (int)(row % TSR_Q80L_ROWS);
        for (int32_t t = 0; t < n_tok; t++) {
            const q8l_xblk *xt = x + (size_t)t * (size_t)nb;
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = grp + (size_t)b * TSR_Q80L_BLOCK_BYTES;
                uint16_t h;
                memcpy(&h, blk + 2 * rr, 2);
                int32_t s = 0;
                for (int k = 0; k < 8; k++)
                    for (int j = 0; j < 4; j++)
                        s += (int32_t)(int8_t)(blk[32 + 64 * k + 4 * rr + j] ^ 0x80) *
                             xt[b].q[4 * k + j];
                const float sc = tsr_f16_to_f32(h) * xt[b].d;
                acc = fmaf((float)s, sc, acc);
            }
            y[(size_t)t * y_stride + (size_t)r] = acc;
        }
    }
}

/* ggml's order over the layout, scalar: row rr of a group, 8 float lanes a row (lane k: the
 * exact sum of elements 4k..4k+3 of a block, FMA'd with fp16(d_w) * fp16(d_x)), ggml's hsum
 * of 8 (kernels/dot_ggml.h). x: the token's Q8_0 row. */
static float dot_row_ggml_scalar(int64_t nb, const uint8_t *grp, int rr, const uint8_t *x)
{
    float acc[8] = {0};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = grp + (size_t)b * TSR_Q80L_BLOCK_BYTES;
        const uint8_t *xb = x + (size_t)b * 34;
        uint16_t hw, hx;
        memcpy(&hw, blk + 2 * rr, 2);
        memcpy(&hx, xb, 2);
        const float d = tsr_f16_to_f32(hw) * tsr_f16_to_f32(hx);
        for (int k = 0; k < 8; k++) {
            int32_t s = 0;
            for (int j = 0; j < 4; j++)
                s += (int32_t)(int8_t)(blk[32 + 64 * k + 4 * rr + j] ^ 0x80) *
                     (int8_t)xb[2 + 4 * k + j];
            acc[k] = fmaf((float)s, d, acc[k]);
        }
    }
    return tsr_ggml_hsum8(acc);
}

#if Q8L_X86
#define Q8L_VNNI TSR_LANES_VNNI

/* Prefetch for several tokens: 4 blocks ahead (2176 bytes) into L1, the whole block (9
 * lines). Streaming 1 GiB, 1 thread, 5 / 8 tokens: 1.38 / 1.56 zmm vpdpbusd per ns without,
 * 1.66 / 1.98 with (8 blocks ahead: 1.50 / 1.95); 1B Q8_0, 2 threads, a 5-token step
 * 33.8-36.6 ms with it (4 or 8 blocks ahead), 38 ms without, 45-47 ms into L2 only. One
 * token goes without: 1B Q8_0 decode, 3 interleaved triples, 46.1-49.4 tokens/s without,
 * 37.6-44.3 with (ggml's order 39.6-45.6 in the same runs). */
#define Q8L_PF_BYTES (4 * TSR_Q80L_BLOCK_BYTES)

/* Two tokens: 8 blocks ahead (4352 bytes), the 9 lines issued unrolled (gcc keeps the loop
 * above as a loop). 1B Q8_0, 2 threads, tessera bench --verify-cost, 7 interleaved runs of
 * each at a ~52-62 GB/s read (2026-12-06): a 2-token step 1.23-1.29 -> 1.12-1.25 of one
 * token's (slower reads: 1.01-1.12 both). A prototype streaming 1 GiB on 2 threads, 2048 /
 * 8192 columns, at the fast read: 0.85-0.91 of a plain read with 4 blocks ahead, 0.96-0.97
 * with 8 unrolled. With 3 or more tokens neither change measured a difference above the
 * noise (unrolled, 5 tokens: 1.34-1.39 -> 1.43-1.48 in two pairs), so they keep the above. */
#define Q8L_PF2_BYTES (8 * TSR_Q80L_BLOCK_BYTES)

/* ... and from 4 tokens also 32 blocks ahead (17408 bytes) into L2: a stream slowed by this
 * much compute keeps too few lines in flight on the hardware prefetchers. bench_tile, 2048
 * columns, 1 thread, streaming: 5 / 8 / 16 tokens 1.64 / 2.13 / 2.28 -> 2.15-2.28 / 2.56-2.60 /
 * 2.57 vpdpbusd per ns (16 or 48 blocks ahead: the same; 768 columns 1.99 / 2.31 / 1.88 ->
 * 2.17 / 2.48 / 2.48); 2 tokens 0.76 -> 0.65, hence not below 4. bench_verify, 2 threads,
 * memory at ~53 GB/s: the 5-token matmuls 1.45 -> 1.20 of one token's. */
#define Q8L_PF_L2_BYTES      (32 * TSR_Q80L_BLOCK_BYTES)
#define Q8L_PF_L2_MIN_TOKENS 4

/* The prefetches of a tile of T tokens at block blk (the constants above; both orders' tiles
 * take them): none for one token, which streams faster on the hardware prefetchers alone. */
static inline __attribute__((always_inline)) void prefetch(const int T, const uint8_t *blk,
                                                           bool first)
{
    if (T == 2)
#pragma GCC unroll 9
        for (int l = 0; l < TSR_Q80L_BLOCK_BYTES; l += 64)
            _mm_prefetch((const char *)blk + Q8L_PF2_BYTES + l, _MM_HINT_T0);
    if (T > 2)
        for (int l = 0; l < TSR_Q80L_BLOCK_BYTES; l += 64)
            _mm_prefetch((const char *)blk + Q8L_PF_BYTES + l, _MM_HINT_T0);
    if (T >= Q8L_PF_L2_MIN_TOKENS && first)
        for (int l = 0; l < TSR_Q80L_BLOCK_BYTES; l += 64)
            _mm_prefetch((const char *)blk + Q8L_PF_L2_BYTES + l, _MM_HINT_T1);
}

/* One tile: T tokens (x: the first, x_stride blocks between tokens) x one group of 16
 * rows, all nb blocks; the 16 sums of token t into out[t * 16 ..]. first: the group's first
 * tile (the later ones find it in L2: no prefetch into L2 for them). */
static inline __attribute__((always_inline)) Q8L_VNNI void tile(const int T, int64_t nb,
                                                                const uint8_t *grp,
                                                                const q8l_xblk *x, size_t x_stride,
                                                                __m512 *out, bool first)
{
    __m512 acc[8];
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = grp + (size_t)b * TSR_Q80L_BLOCK_BYTES;
        prefetch(T, blk, first);
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
        /* named registers, not an array: gcc spilled an array of them to the stack */
        const __m512i w0 = _mm512_loadu_si512(blk + 32), w1 = _mm512_loadu_si512(blk + 96);
        const __m512i w2 = _mm512_loadu_si512(blk + 160), w3 = _mm512_loadu_si512(blk + 224);
        const __m512i w4 = _mm512_loadu_si512(blk + 288), w5 = _mm512_loadu_si512(blk + 352);
        const __m512i w6 = _mm512_loadu_si512(blk + 416), w7 = _mm512_loadu_si512(blk + 480);
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            const q8l_xblk *xb = x + (size_t)t * x_stride + b;
            const int32_t *q4 = (const int32_t *)(const void *)xb->q; /* 4-byte aligned */
            /* two chains of 4 (exact integer sums: their order is free), so one token is not
             * bound by vpdpbusd's latency */
            __m512i s0 =
                _mm512_dpbusd_epi32(_mm512_set1_epi32(xb->c), w0, _mm512_set1_epi32(q4[0]));
            __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, _mm512_set1_epi32(q4[1]));
            s0 = _mm512_dpbusd_epi32(s0, w2, _mm512_set1_epi32(q4[2]));
            s1 = _mm512_dpbusd_epi32(s1, w3, _mm512_set1_epi32(q4[3]));
            s0 = _mm512_dpbusd_epi32(s0, w4, _mm512_set1_epi32(q4[4]));
            s1 = _mm512_dpbusd_epi32(s1, w5, _mm512_set1_epi32(q4[5]));
            s0 = _mm512_dpbusd_epi32(s0, w6, _mm512_set1_epi32(q4[6]));
            s1 = _mm512_dpbusd_epi32(s1, w7, _mm512_set1_epi32(q4[7]));
            const __m512 sc = _mm512_mul_ps(dw, _mm512_set1_ps(xb->d));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), sc, acc[t]);
        }
    }
    for (int t = 0; t < T; t++) out[t] = acc[t];
}

/* kernels/x86lanes.h's tile: x_stride in bytes, tile()'s in blocks */
#define Q8L_TILE(T)                                                                                \
    static Q8L_VNNI void tile##T(int64_t nb, const uint8_t *grp, const uint8_t *x,                 \
                                 size_t x_stride, __m512 *out, bool first)                         \
    {                                                                                              \
        tile(T, nb, grp, (const q8l_xblk *)x, x_stride / sizeof(q8l_xblk), out, first);            \
    }
Q8L_TILE(1)
Q8L_TILE(2)
Q8L_TILE(3)
Q8L_TILE(4)
Q8L_TILE(5)
Q8L_TILE(6)
Q8L_TILE(7)
Q8L_TILE(8)

static const tsr_lanes_tile_fn k_tiles[9] = {NULL,  tile1, tile2, tile3, tile4,
                                             tile5, tile6, tile7, tile8};

static Q8L_VNNI void dot_vnni(int64_t nb, const uint8_t *packed, int64_t r0, int64_t n_rows,
                              int32_t n_tok, const q8l_xblk *x, float *y, size_t y_stride)
{
    tsr_lanes_run(k_tiles, 8, nb, (size_t)nb * TSR_Q80L_BLOCK_BYTES, packed, r0, n_rows, n_tok,
                  (const uint8_t *)x, (size_t)nb * sizeof(q8l_xblk), y, y_stride);
}

/* ggml's order over the layout (tsr_q80l_dot_ggml): per block the tile's tokens' lane starts
 * TSR_I2F_MAGIC_I - 128 x their 4-sums (undoing the ^ 0x80, so that the dot's bits less
 * TSR_I2F_MAGIC_F are its float value: |dot| <= 65536, exact) and scale products, then per
 * ggml lane k the 16 rows' quant vector loaded once and, per token, one vpdpbusd by the
 * token's 4 quants broadcast, one vsubps and one FMA into the token's chain k (8 chains a
 * token). Two kinds of tile, the same operations:
 * - tile_g, a group's first tile of 1, 2 or 4 tokens: each block's lane starts laid out on
 *   the stack just before they are read (4 tokens: 32 chains, some in L1), the lanes order's
 *   prefetches (none for one token, which streams fastest on the hardware prefetchers alone;
 *   for 4 also 32 blocks ahead into L2).
 * - tile_r, up to 3 tokens: the lane starts and d_x laid out TSR_LANES_AHEAD blocks before they are
 *   read, in a ring, so no broadcast of a start waits on the store that just wrote it; every
 *   chain in registers. A group's first tile of 3 tokens (prefetching 4 blocks ahead into L1
 *   and 32 into L2, as it streams the group from memory), and all the later tiles of a group
 *   (from cache), 3 at most and as even as can be: 5 tokens 4 + 1, 9 tokens 4 + 3 + 2, 16
 *   tokens 4 + 3 + 3 + 3 + 3.
 * The first tile stays 4 wide where it can: when the memory reads slowly it hides the most
 * compute under the stream. tests/bench_verify's matmuls (2 threads, 8 layers of the 1B
 * shape), against tile_g for every tile (3 + 2 for 5 tokens, 4 + 3 + 3 + 3 + 3 for 16), the
 * variants alternated in one process, medians of 11 rounds, ms for 3 / 5 / 6 / 8 tokens: at a
 * fast read (one token 10.3-11.0 ms) 14.7 / 19.5 / 22.9 / 29.4 -> 11.9 / 18.8 / 21.2 / 27.1,
 * at a slow one (15.5-15.8 ms) 17.1 / 21.3 / 23.9 / 28.9 -> 17.9 / 20.3 / 22.0 / 26.5. A first
 * tile of 3 (5 tokens 3 + 2) was faster at the fast read (17.6 ms for 5 tokens, 25.7 for 8)
 * but slower at the slow one (4 tokens 1.23 against 1.12 of a token's step, 5 tokens 1.37
 * against 1.33). bench_tile, 1 thread, 2048 columns, cycles a vpdpbusd from L2 / streaming 1
 * GiB (bound 2.00): 1 tile_g 3.5 / 8.1, tile_r 2.8-2.9 / 8.2-8.4; 2 tile_g 3.3 / 5.3-5.5,
 * tile_r 2.4-2.5 / 5.9-6.2; 3 tile_g 2.9 / 4.0-4.2, tile_r 2.4-2.5 / 3.25; 4 tile_g 3.0-3.1 /
 * 3.2-3.3, tile_r 3.2-3.3 / 3.4-3.9 (chains spill). */
static inline __attribute__((always_inline)) Q8L_VNNI void tile_g(const int T, int64_t nb,
                                                                  const uint8_t *grp,
                                                                  const uint8_t *x, size_t x_stride,
                                                                  __m512 *out, bool first)
{
    __m512 acc[8][4]; /* [ggml lane][token] */
    for (int k = 0; k < 8; k++)
        for (int t = 0; t < T; t++) acc[k][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = grp + (size_t)b * TSR_Q80L_BLOCK_BYTES;
        prefetch(T, blk, first);
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
        __m512 dd[4];
        int32_t c[4][8] __attribute__((aligned(32)));
        for (int t = 0; t < T; t++) {
            const uint8_t *xb = x + (size_t)t * x_stride + (size_t)b * 34;
            uint16_t hx;
            memcpy(&hx, xb, 2);
            dd[t] = _mm512_mul_ps(dw, _mm512_set1_ps(_cvtsh_ss(hx)));
            _mm256_store_si256((__m256i *)c[t], tsr_lanes_starts(xb + 2, (int8_t)0x80));
        }
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) {
            const __m512i u = _mm512_loadu_si512(blk + 32 + 64 * k);
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) {
                int32_t q4;
                memcpy(&q4, x + (size_t)t * x_stride + (size_t)b * 34 + 2 + 4 * k, 4);
                acc[k][t] = tsr_lanes_step(acc[k][t], u, c[t][k], q4, dd[t]);
            }
        }
    }
    for (int t = 0; t < T; t++) out[t] = tsr_lanes_hsum8(&acc[0][t], 4);
}

#define Q8G_RTMAX TSR_LANES_RTMAX

static inline __attribute__((always_inline)) Q8L_VNNI void tile_r(const int T, int64_t nb,
                                                                  const uint8_t *grp,
                                                                  const uint8_t *x, size_t x_stride,
                                                                  __m512 *out, bool first)
{
    __m512 acc[8][Q8G_RTMAX]; /* [ggml lane][token] */
    tsr_lanes_slot ring[TSR_LANES_RING];
    for (int k = 0; k < 8; k++)
        for (int t = 0; t < T; t++) acc[k][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < TSR_LANES_AHEAD && b < nb; b++)
        tsr_lanes_slot_fill(T, &ring[b], x, x_stride, b, (int8_t)0x80);
    for (int64_t b = 0; b < nb; b++) {
        if (b + TSR_LANES_AHEAD < nb)
            tsr_lanes_slot_fill(T, &ring[(b + TSR_LANES_AHEAD) % TSR_LANES_RING], x, x_stride,
                                b + TSR_LANES_AHEAD, (int8_t)0x80);
        const tsr_lanes_slot *s = &ring[b % TSR_LANES_RING];
        const uint8_t *blk = grp + (size_t)b * TSR_Q80L_BLOCK_BYTES;
        prefetch(T, blk, false);
        if (first)
            for (int l = 0; l < TSR_Q80L_BLOCK_BYTES; l += 64)
                _mm_prefetch((const char *)blk + Q8L_PF_L2_BYTES + l, _MM_HINT_T1);
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
        __m512 dd[Q8G_RTMAX];
        for (int t = 0; t < T; t++) dd[t] = _mm512_mul_ps(dw, _mm512_set1_ps(s->dx[t]));
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) {
            const __m512i u = _mm512_loadu_si512(blk + 32 + 64 * k);
#pragma GCC unroll 3
            for (int t = 0; t < T; t++) {
                int32_t q4;
                memcpy(&q4, x + (size_t)t * x_stride + (size_t)b * 34 + 2 + 4 * k, 4);
                acc[k][t] = tsr_lanes_step(acc[k][t], u, s->c[t][k], q4, dd[t]);
            }
        }
    }
    for (int t = 0; t < T; t++) out[t] = tsr_lanes_hsum8(&acc[0][t], Q8G_RTMAX);
}

#define Q8G_TILE(kind, T)                                                                          \
    static Q8L_VNNI void kind##T(int64_t nb, const uint8_t *grp, const uint8_t *x,                 \
                                 size_t x_stride, __m512 *out, bool first)                         \
    {                                                                                              \
        kind(T, nb, grp, x, x_stride, out, first);                                                 \
    }
Q8G_TILE(tile_g, 1)
Q8G_TILE(tile_g, 2)
Q8G_TILE(tile_g, 4)
Q8G_TILE(tile_r, 1)
Q8G_TILE(tile_r, 2)
Q8G_TILE(tile_r, 3)

/* A group's first tile (tile_g alone for 1 or 2 tokens), and its later ones. */
static const tsr_lanes_tile_fn k_tiles_g[5] = {NULL, tile_g1, tile_g2, tile_r3, tile_g4};
static const tsr_lanes_tile_fn k_tiles_r[Q8G_RTMAX + 1] = {NULL, tile_r1, tile_r2, tile_r3};
#endif

void tsr_q80l_dot(int isa, int64_t n, const void *packed, int64_t r0, int64_t n_rows, int32_t n_tok,
                  const void *prep, float *y, size_t y_stride)
{
    const int64_t nb = n / 32;
    if (n_rows <= 0 || n_tok <= 0) return;
#if Q8L_X86
    if (isa == TSR_GGML_VNNI) {
        dot_vnni(nb, packed, r0, n_rows, n_tok, prep, y, y_stride);
        return;
    }
#endif
    (void)isa;
    dot_scalar(nb, packed, r0, n_rows, n_tok, prep, y, y_stride);
}

static _Atomic int g_ggml_chosen = -1;

bool tsr_q80l_ggml_chosen(void)
{
    return tsr_ggml_vnni_chosen("TSR_Q80_LANES", &g_ggml_chosen);
}

void tsr_q80l_dot_ggml(int isa, int64_t n, const void *packed, int64_t r0, int64_t n_rows,
                       int32_t n_tok, const void *x, size_t x_stride, float *y, size_t y_stride)
{
    const int64_t nb = n / 32;
    if (n_rows <= 0 || n_tok <= 0) return;
#if Q8L_X86
    if (isa == TSR_GGML_VNNI) {
        tsr_lanes_run_split(k_tiles_g, 4, k_tiles_r, Q8G_RTMAX, nb,
                            (size_t)nb * TSR_Q80L_BLOCK_BYTES, packed, r0, n_rows, n_tok, x,
                            x_stride, y, y_stride);
        return;
    }
#endif
    (void)isa;
    tsr_lanes_run_scalar(dot_row_ggml_scalar, nb, (size_t)nb * TSR_Q80L_BLOCK_BYTES, packed, r0,
                         n_rows, n_tok, x, x_stride, y, y_stride);
}
