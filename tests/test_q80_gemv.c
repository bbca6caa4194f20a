/*
 * test_q80_gemv.c — kernels/q80_gemv: the one-token Q8_0 GEMV gives ggml's bits.
 *
 * Every shape the GEMV's loops split differently (rows 1..13 and 41: partial 4-row groups
 * and the prefetched ones; 1..9, 18, 64, 256, 1024 blocks: partial and whole 8-block scale
 * chunks, the largest row it takes; 1025 blocks: declined, the caller's fallback), row
 * strides longer than a row and 0, on every instruction set this CPU has: each output
 * equals, bit for bit, ggml's x86 order spelled out here from ggml_vec_dot_q8_0_q8_0 (8
 * exact int lanes of 4 products per block, acc = fma(fp16(d_w) * fp16(d_x), lanes, acc),
 * hsum_float_8), and tsr_vec_dot_rows / tsr_ggml_dot_rows. The weights hold the extremes
 * -128 and 127 (a file may store -128; ggml's quantizer never writes it) and fp16 scales
 * from subnormal to large; the activation has all-zero blocks (d = 0) and +-127.
 * tsr_vec_dot_rows runs with both choices of tsr_quant_set_q80_row_dots (the row dots or
 * the GEMV for rows of up to 4096 elements).
 * A failure prints the case, what was expected and what came.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/dot_ggml.h"
#include "kernels/q80_gemv.h"
#include "kernels/quant.h"
#include "tests/util.h"

enum { BLK = 34 };

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t next_u32(void)
{
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 32);
}

/* ggml_vec_dot_q8_0_q8_0's order (x86), one row against one token. */
static float ggml_order(int64_t nb, const uint8_t *w, const uint8_t *x)
{
    float acc[8] = {0};
    for (int64_t b = 0; b < nb; ++b, w += BLK, x += BLK) {
        uint16_t hw, hx;
        memcpy(&hw, w, 2), memcpy(&hx, x, 2);
        const float dd = tsr_f16_to_f32(hw) * tsr_f16_to_f32(hx);
        for (int l = 0; l < 8; ++l) {
            int32_t lane = 0;
            for (int e = 4 * l; e < 4 * l + 4; ++e)
                lane += (int32_t)(int8_t)w[2 + e] * (int32_t)(int8_t)x[2 + e];
            acc[l] = fmaf(dd, (float)lane, acc[l]);
        }
    }
    float r[4];
    for (int i = 0; i < 4; ++i) r[i] = acc[4 + i] + acc[i];
    return (r[0] + r[2]) + (r[1] + r[3]);
}

/* A weight block: a finite fp16 scale (subnormal .. ~1e3, both signs) and quants with the
 * extremes; row r block b. */
static void fill_weight_block(uint8_t *blk)
{
    const uint32_t u = next_u32();
    uint16_t h = (uint16_t)(((u & 1) << 15) | (u >> 1) % 0x6400); /* exponent < 25: finite */
    memcpy(blk, &h, 2);
    for (int e = 0; e < 32; ++e) {
        const uint32_t v = next_u32() % 16;
        blk[2 + e] = (uint8_t)(v == 0 ? 0x80 : v == 1 ? 0x7F : (uint8_t)next_u32()); /* -128, 127 */
    }
}

/* The token: ggml's quantizer on random floats, some blocks zero, some at +-127. */
static void make_token(int64_t n, uint8_t *x)
{
    float *f = malloc(sizeof(float) * (size_t)n);
    assert_non_null(f);
    for (int64_t i = 0; i < n; ++i) f[i] = tsr_test_frand(&rng) * 3.0f;
    for (int64_t i = 32; i < 64 && i < n; ++i) f[i] = 0.0f; /* block 1: d = 0 */
    tsr_quant_act_row(TSR_TYPE_Q8_0, f, x, n);
    free(f);
}

static void check_case(int64_t nb, int64_t rows, size_t stride_pad, bool zero_stride)
{
    static const char *const isas[] = {"scalar", "avx2", "avx512vnni"};
    const int64_t n = nb * 32;
    const size_t rb = (size_t)nb * BLK, stride = zero_stride ? 0 : rb + stride_pad;
    const int64_t stored = zero_stride ? 1 : rows;
    uint8_t *w = malloc(stride * (size_t)(stored - 1) + rb), *x = malloc(rb);
    float *ref = malloc(sizeof(float) * (size_t)rows), *got = malloc(sizeof(float) * (size_t)rows);
    assert_true(w && x && ref && got);
    memset(w, 0x5A, stride * (size_t)(stored - 1) + rb); /* the padding: never read as data */
    for (int64_t r = 0; r < stored; ++r)
        for (int64_t b = 0; b < nb; ++b)
            fill_weight_block(w + (size_t)r * stride + (size_t)b * BLK);
    make_token(n, x);
    for (int64_t r = 0; r < rows; ++r) ref[r] = ggml_order(nb, w + (size_t)r * stride, x);
    for (int i = 0; i < 3; ++i) {
        if (!tsr_quant_set_isa(isas[i])) continue;
        for (int via = 0; via < 4; ++via) {
            for (int64_t r = 0; r < rows; ++r) got[r] = -12345.0f;
            const char *how = via == 0   ? "tsr_vec_dot_rows (row dots)"
                              : via == 1 ? "tsr_q80_gemv"
                              : via == 2 ? "tsr_ggml_dot_rows"
                                         : "tsr_vec_dot_rows (GEMV)";
            if (via == 0 || via == 3) {
                /* both choices of the one-token kernel (kernels/quant.h) */
                tsr_quant_set_q80_row_dots(via == 0);
                tsr_vec_dot_rows(TSR_TYPE_Q8_0, n, rows, w, stride, x, got);
                tsr_quant_set_q80_row_dots(-1);
            } else if (via == 1) {
                const bool took = tsr_q80_gemv(i, n, rows, w, stride, x, got);
                const bool want = i >= TSR_GGML_AVX2 && nb <= TSR_Q80_GEMV_MAX_BLOCKS;
                if (took != want)
                    fail_msg("%s, %s, %lld blocks: expected it to %s the case, it %s", how, isas[i],
                             (long long)nb, want ? "take" : "decline",
                             took ? "took it" : "declined");
                if (!took) continue;
            } else {
                tsr_ggml_dot_rows(TSR_TYPE_Q8_0, i, n, rows, w, stride, x, got);
            }
            for (int64_t r = 0; r < rows; ++r)
                if (tsr_test_fbits(got[r]) != tsr_test_fbits(ref[r]))
                    fail_msg("%s, %s, %lld blocks x %lld rows, stride %zu: row %lld: ggml's order "
                             "%.9g (0x%08x), got %.9g (0x%08x)",
                             how, isas[i], (long long)nb, (long long)rows, stride, (long long)r,
                             (double)ref[r], tsr_test_fbits(ref[r]), (double)got[r],
                             tsr_test_fbits(got[r]));
        }
    }
    tsr_quant_set_isa(NULL);
    free(w);
    free(x);
    free(ref);
    free(got);
}

static void test_shapes(void **state)
{
    (void)state;
    static const int64_t nbs[] = {1, 2, 3, 7, 8, 9, 18, 64};
    int n_cases = 0;
    for (size_t i = 0; i < sizeof nbs / sizeof nbs[0]; ++i)
        for (int64_t rows = 1; rows <= 13; ++rows, ++n_cases) check_case(nbs[i], rows, 0, false);
    /* prefetching groups (2048 columns: 16 rows ahead), a longer stride, stride 0 */
    check_case(64, 41, 0, false);
    check_case(18, 41, 34 * 5 + 6, false);
    check_case(9, 7, 0, true);
    n_cases += 3;
    printf("%d shapes x every ISA: bit-identical to ggml's order\n", n_cases);
}

static void test_long_rows(void **state)
{
    (void)state;
    check_case(256, 6, 0, false);                         /* the 1B shape's ffn_down */
    check_case(TSR_Q80_GEMV_MAX_BLOCKS, 5, 0, false);     /* the longest row it takes */
    check_case(TSR_Q80_GEMV_MAX_BLOCKS + 1, 3, 0, false); /* declined: the row dots */
    printf("rows of 256, %d and %d blocks: bit-identical to ggml's order\n",
           TSR_Q80_GEMV_MAX_BLOCKS, TSR_Q80_GEMV_MAX_BLOCKS + 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shapes),
        cmocka_unit_test(test_long_rows),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
