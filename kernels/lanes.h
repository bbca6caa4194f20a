/* lanes.h — the scalar row walk of the lanes layouts (kernels/q6k_lanes.c, q50_lanes.c,
 * q50_avx2.c, q41_avx2.c, q80_lanes.c's ggml order): rows r0.. of a matrix in groups of 16
 * rows, each (row, token) dot computed by the layout's scalar row function. Portable (the
 * forms the kernels run where the CPU lacks their instruction set, and the tests' second
 * reference). And the AVX2 rows-in-lanes kernels' store of a group's results. */
#ifndef TSR_LANES_H
#define TSR_LANES_H

#include <stddef.h>
#include <stdint.h>

/* The dot of row rr (0..15) of group `grp` (nb blocks or super-blocks) with the token whose
 * activations start at x. */
typedef float (*tsr_lanes_row_fn)(int64_t nb, const uint8_t *grp, int rr, const uint8_t *x);

/* y[t * y_stride + r] = row(row r0 + r, token t) for r < n_rows, t < n_tok: groups of gb bytes
 * from `packed`, tokens x_stride bytes apart from x. */
static inline void tsr_lanes_run_scalar(tsr_lanes_row_fn row, int64_t nb, size_t gb,
                                        const uint8_t *packed, int64_t r0, int64_t n_rows,
                                        int32_t n_tok, const uint8_t *x, size_t x_stride, float *y,
                                        size_t y_stride)
{
    for (int64_t r = 0; r < n_rows; r++) {
        const int64_t g = (r0 + r) / 16;
        const int rr = (int)((r0 + r) % 16);
        for (int32_t t = 0; t < n_tok; t++)
            y[(size_t)t * y_stride + (size_t)r] =
                row(nb, packed + (size_t)g * gb, rr, x + (size_t)t * x_stride);
    }
}

/* The AVX2 rows-in-lanes kernels' (q50_avx2.c, q41_avx2.c) tokens per chunk: as many as
 * budget_bytes of per-token activation facts (tok_bytes each) hold, within 1 .. tok_max and at
 * most n_tok. */
static inline int32_t tsr_lanes_tok_chunk(size_t budget_bytes, size_t tok_bytes, int32_t tok_max,
                                          int32_t n_tok)
{
    int32_t tc = (int32_t)(budget_bytes / tok_bytes);
    if (tc > tok_max) tc = tok_max;
    if (tc < 1) tc = 1;
    return tc > n_tok ? n_tok : tc;
}

/* The AVX2 rows-in-lanes kernels' (q50_avx2.c, q41_avx2.c) results of one 16-row group, rows
 * r .. r + nr - 1 (nr <= 16) of tokens t0 .. t0 + T - 1, into y[(t0 + t) * y_stride + r + i]:
 * out holds the group's rows in order for one token (T == 1); for several, half h's row j of
 * token t at out[h * 8 * tok_max + 8 t + j]. */
static inline void tsr_lanes_store_group(float *y, size_t y_stride, int32_t t0, int32_t T,
                                         int64_t r, int64_t nr, const float *out, int tok_max)
{
    for (int32_t t = 0; t < T; t++)
        for (int64_t i = 0; i < nr; i++)
            y[(size_t)(t0 + t) * y_stride + (size_t)(r + i)] =
                T == 1 ? out[i]
                       : out[(size_t)(i / 8) * 8 * (size_t)tok_max + 8 * (size_t)t + i % 8];
}

#endif
