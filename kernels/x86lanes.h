/* x86lanes.h — the one tile driver of the lanes layouts' AVX-512 VNNI kernels
 * (kernels/q80_lanes.c, q40_lanes.c, q4k_lanes.c, q6k_lanes.c): 16 rows a group, each row's
 * result in one float lane of a zmm, tokens in tiles; and the AVX2 kernels' (q40_lanes.c,
 * q4k_lanes.c), with the 16 rows in two ymm.
 *
 * Why one: the four modules' tiles differ (their blocks, activations and orders), but they
 * walk a matrix alike: a group at a time, its tokens split into tiles of at most tmax, as even
 * as can be (so no tile is much narrower than the rest: 9 -> 5 + 4 for tmax 8, 3 + 3 + 3 for
 * tmax 4), or, for Q8_0 in ggml's order, the first tile the widest and the later ones from
 * tiles made for a group in cache (9 -> 4 + 3 + 2, 16 -> 4 + 3 + 3 + 3 + 3), each tile's 16 row
 * results stored under a mask where the group is partial. The split does not change results (every
 * token's order is its own). Include only from x86 code (immintrin.h already included). */
#ifndef TSR_X86LANES_H
#define TSR_X86LANES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kernels/x86hsum.h"

#define TSR_LANES_ROWS 16 /* rows per group of every lanes layout */
#define TSR_LANES_TMAX 8  /* the widest tile any of them takes */

/* One tile: T tokens (T is the tile function's own) over one group `grp` of nb blocks
 * (super-blocks), the tile's first token's activations at x, the next x_stride bytes on;
 * out[t]: the group's 16 row results for token t. first: the group's first tile (a kernel may
 * prefetch what the later tiles find in cache). */
typedef void (*tsr_lanes_tile_fn)(int64_t nb, const uint8_t *grp, const uint8_t *x, size_t x_stride,
                                  __m512 *out, bool first);

/* y[t * y_stride + r] for r < n_rows, t < n_tok: rows r0.. (r0 a multiple of 16) of a lanes
 * matrix `packed` (groups of gb bytes), tiles[T] (T = 1..tmax, tmax <= TSR_LANES_TMAX) for a
 * tile of T tokens; x: the first token's activations, x_stride bytes apart. later: NULL, every
 * tile from `tiles` and as even as can be; else a group's first tile takes min(n_tok, tmax)
 * tokens from `tiles` and the rest run through later[T] (T = 1..later_tmax) as evenly as can
 * be (tmax 4, later_tmax 3: 5 -> 4 + 1, 16 -> 4 + 3 + 3 + 3 + 3): for a kernel whose first
 * tile streams the group from memory (and prefetches it) and whose later tiles, finding the
 * group in cache, are made for that (Q8_0 in ggml's order, q80_lanes.c). */
__attribute__((target("avx512f"))) static inline void
tsr_lanes_run_split(const tsr_lanes_tile_fn *tiles, int tmax, const tsr_lanes_tile_fn *later,
                    int later_tmax, int64_t nb, size_t gb, const uint8_t *packed, int64_t r0,
                    int64_t n_rows, int32_t n_tok, const uint8_t *x, size_t x_stride, float *y,
                    size_t y_stride)
{
    const bool first_wide = later != NULL;
    const int32_t t_first = first_wide ? (n_tok < tmax ? n_tok : tmax) : 0;
    const int32_t n_tiles = first_wide ? 1 + (n_tok - t_first + later_tmax - 1) / later_tmax
                                       : (n_tok + tmax - 1) / tmax;
    for (int64_t r = 0; r < n_rows; r += TSR_LANES_ROWS) {
        const uint8_t *grp = packed + (size_t)((r0 + r) / TSR_LANES_ROWS) * gb;
        const int64_t nr = n_rows - r < TSR_LANES_ROWS ? n_rows - r : TSR_LANES_ROWS;
        const __mmask16 m = (__mmask16)((1u << nr) - 1u);
        for (int32_t k = 0, t0 = 0; k < n_tiles; k++) {
            const int32_t T =
                first_wide && k == 0 ? t_first : (n_tok - t0 + (n_tiles - k) - 1) / (n_tiles - k);
            __m512 out[TSR_LANES_TMAX];
            (first_wide && k > 0 ? later : tiles)[T](nb, grp, x + (size_t)t0 * x_stride, x_stride,
                                                     out, k == 0);
            for (int32_t t = 0; t < T; t++)
                _mm512_mask_storeu_ps(y + (size_t)(t0 + t) * y_stride + (size_t)r, m, out[t]);
            t0 += T;
        }
    }
}

/* tsr_lanes_run_split with every tile as even as can be (the lanes layouts but Q8_0's in
 * ggml's order). */
__attribute__((target("avx512f"))) static inline void
tsr_lanes_run(const tsr_lanes_tile_fn *tiles, int tmax, int64_t nb, size_t gb,
              const uint8_t *packed, int64_t r0, int64_t n_rows, int32_t n_tok, const uint8_t *x,
              size_t x_stride, float *y, size_t y_stride)
{
    tsr_lanes_run_split(tiles, tmax, NULL, 0, nb, gb, packed, r0, n_rows, n_tok, x, x_stride, y,
                        y_stride);
}

/* ---- The AVX2 kernels' walk (kernels/q40_lanes.c, q4k_lanes.c): the same groups of 16
 * rows, as two ymm halves of 8. A tile: T tokens (T is the tile function's own, at most
 * TSR_LANES_AVX2_TMAX) over one group `grp`, the first token's activations at x, the next
 * x_stride bytes on; out[t][h]: rows 8h..8h+7 of token t. */
#define TSR_LANES_AVX2_TMAX 4
typedef void (*tsr_lanes_tile_avx2_fn)(int64_t nb, const uint8_t *grp, const uint8_t *x,
                                       size_t x_stride, __m256 out[][2]);

/* y[t * y_stride + r] for r < n_rows, t < n_tok: rows r0.. (r0 a multiple of 16) of a lanes
 * matrix `packed` (groups of gb bytes), a group at a time, its tokens in tiles of at most tmax
 * as even as can be (tsr_lanes_run's split), tiles[T] for T tokens; a partial last group's
 * rows past n_rows are not stored. */
__attribute__((target("avx2"))) static inline void
tsr_lanes_run_avx2(const tsr_lanes_tile_avx2_fn *tiles, int tmax, int64_t nb, size_t gb,
                   const uint8_t *packed, int64_t r0, int64_t n_rows, int32_t n_tok,
                   const uint8_t *x, size_t x_stride, float *y, size_t y_stride)
{
    const int32_t n_tiles = (n_tok + tmax - 1) / tmax;
    for (int64_t r = 0; r < n_rows; r += TSR_LANES_ROWS) {
        const uint8_t *grp = packed + (size_t)((r0 + r) / TSR_LANES_ROWS) * gb;
        const int64_t nr = n_rows - r < TSR_LANES_ROWS ? n_rows - r : TSR_LANES_ROWS;
        for (int32_t k = 0, t0 = 0; k < n_tiles; k++) {
            const int32_t T = (n_tok - t0 + (n_tiles - k) - 1) / (n_tiles - k);
            __m256 out[TSR_LANES_AVX2_TMAX][2];
            tiles[T](nb, grp, x + (size_t)t0 * x_stride, x_stride, out);
            for (int32_t t = 0; t < T; t++) {
                float *yt = y + (size_t)(t0 + t) * y_stride + (size_t)r;
                if (nr == TSR_LANES_ROWS) {
                    _mm256_storeu_ps(yt, out[t][0]);
                    _mm256_storeu_ps(yt + 8, out[t][1]);
                } else { /* a partial last group */
                    float v[TSR_LANES_ROWS];
                    _mm256_storeu_ps(v, out[t][0]);
                    _mm256_storeu_ps(v + 8, out[t][1]);
                    memcpy(yt, v, sizeof(float) * (size_t)nr);
                }
            }
            t0 += T;
        }
    }
}

/* ggml's hsum of 8 chains, ((c0 + c4) + (c2 + c6)) + ((c1 + c5) + (c3 + c7)), for 16 rows at
 * once: the end of the lanes kernels that keep ggml's 8 float chains a row (q6k_lanes.c,
 * q50_lanes.c, q80_lanes.c's ggml order), acc[k * stride] chain k. */
__attribute__((target("avx512f"))) static inline __m512 tsr_lanes_hsum8(const __m512 *acc,
                                                                        size_t stride)
{
    const __m512 t0 = _mm512_add_ps(acc[0], acc[4 * stride]),
                 t1 = _mm512_add_ps(acc[stride], acc[5 * stride]),
                 t2 = _mm512_add_ps(acc[2 * stride], acc[6 * stride]),
                 t3 = _mm512_add_ps(acc[3 * stride], acc[7 * stride]);
    return _mm512_add_ps(_mm512_add_ps(t0, t2), _mm512_add_ps(t1, t3));
}

/* ---- ggml's lane order for Q8_0 activations (q80_lanes.c's ggml order, q50_lanes.c) ----
 * A weight block's 16 rows' quants of ggml lane k as unsigned bytes (the file's plus a bias:
 * 128 for Q8_0's, 16 for Q5_0's), the token's 4 quants of the lane broadcast: one vpdpbusd from
 * the start TSR_I2F_MAGIC_I - bias x (the token's 4-sum) leaves the bits of MAGIC_F + the
 * lane's exact dot (|dot| < 2^22; x86hsum.h), one vsubps its float, one FMA by the scale
 * product into the token's chain k: ggml's `mul_sum_i8_pairs_float` + FMA, 16 rows at once. */
#define TSR_LANES_RTMAX 3 /* tokens of a ring tile (every chain in registers) */
#define TSR_LANES_AHEAD 4 /* blocks between laying out a slot and reading it */
#define TSR_LANES_RING  8 /* slots, a power of two above TSR_LANES_AHEAD */
/* the target of every lanes module's VNNI kernels (q40, q4k, q50, q6k, q80_lanes.c) */
#define TSR_LANES_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))

/* The 8 lanes' starts of one token's block: q32, its 32 signed quants; bias: the weights'. */
TSR_LANES_VNNI static inline __attribute__((always_inline)) __m256i
tsr_lanes_starts(const uint8_t *q32, int8_t bias)
{
    return _mm256_sub_epi32(_mm256_set1_epi32(TSR_I2F_MAGIC_I),
                            _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(bias),
                                                _mm256_loadu_si256((const __m256i *)q32)));
}

/* One lane step: acc + (float)(dot of u with the 4 quants q4 from start c) x dd. */
TSR_LANES_VNNI static inline __attribute__((always_inline)) __m512
tsr_lanes_step(__m512 acc, __m512i u, int32_t c, int32_t q4, __m512 dd)
{
    const __m512i s = _mm512_dpbusd_epi32(_mm512_set1_epi32(c), u, _mm512_set1_epi32(q4));
    return _mm512_fmadd_ps(_mm512_sub_ps(_mm512_castsi512_ps(s), _mm512_set1_ps(TSR_I2F_MAGIC_F)),
                           dd, acc);
}

/* A block's token side for a ring tile, laid out TSR_LANES_AHEAD blocks before the tile reads
 * it, so that no broadcast of a start waits on the store that just wrote it (a store-to-load
 * forward of a 4-byte broadcast out of a 32-byte store: the ring tiles ran 15-30 % faster than
 * tiles laying the starts out just before use, q80_lanes.c and q50_lanes.c give figures). */
typedef struct {
    int32_t c[TSR_LANES_RTMAX][8]; /* the tokens' lane starts */
    float dx[TSR_LANES_RTMAX];     /* the tokens' d_x */
} tsr_lanes_slot;

/* Slot of block b for T tokens of Q8_0 rows (34-byte blocks) at x, x_stride bytes apart. */
TSR_LANES_VNNI static inline __attribute__((always_inline)) void
tsr_lanes_slot_fill(const int T, tsr_lanes_slot *s, const uint8_t *x, size_t x_stride, int64_t b,
                    int8_t bias)
{
    for (int t = 0; t < T; t++) {
        const uint8_t *xb = x + (size_t)t * x_stride + (size_t)b * 34;
        uint16_t hx;
        memcpy(&hx, xb, 2);
        s->dx[t] = _cvtsh_ss(hx);
        _mm256_storeu_si256((__m256i *)s->c[t], tsr_lanes_starts(xb + 2, bias));
    }
}

#endif
