/*
 * test_q50_lanes.c — kernels/q50_lanes: Q5_0 matrices in the lanes layout (AVX-512 VNNI).
 *
 * - The kernels (AVX-512 VNNI where this CPU has it, and scalar) give, bit for bit, Q5_0's one
 *   order over the file layout (kernels/quant.c's Q5_0 row dot, ggml's, tsr_vec_dot), for
 *   1..17 tokens (tiles of up to 3, uneven splits), rows 1, 15, 16, 17, 40 (partial groups,
 *   masked stores), row starts 0 and 16, 1, 3 and 28 blocks (an odd count leaves half a pair).
 *   Weights are random bytes (every 5-bit quant), activations Q8_0 rows with a zero block.
 * - The matmul (kernels/ops.c) over a weight carrying the layout gives the same bits as over
 *   the file layout and over the repacked groups, for 1..17 tokens at once or one at a time,
 *   alone and in tsr_matmul_multi beside a Q8_0 weight (one Q8_0 conversion for both, the Q8_0
 *   tiles' prep laid out beside it), on 1, 2 and 3 threads.
 * - tsr_q50l_chosen follows the CPU; a model loaded on such a CPU carries the layout on every
 *   Q5_0 matrix (and not the groups) and keeps synth-tiny-q5_0's greedy reference.
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
#include "kernels/ops.h"
#include "kernels/q50_lanes.h"
#include "kernels/quant.h"
#include "kernels/repack.h"
#include "tests/util.h"
#include "worker/model.h"

enum { BLK = 22 };

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static const float k_scales[] = {6.0e-8f, 1.0e-4f, 0.0123f, 0.5f, 3.0f, -0.25f};

/* n_rows Q5_0 rows of n elements: random qh and qs bytes, fp16 d from a spread of scales. */
static uint8_t *make_rows(int64_t n, int64_t n_rows)
{
    const int64_t nb = n / 32;
    uint8_t *w = tsr_test_xmalloc((size_t)(nb * n_rows) * BLK);
    for (int64_t i = 0; i < nb * n_rows; i++) {
        uint8_t *b = w + (size_t)i * BLK;
        const uint16_t hd = tsr_f32_to_f16(k_scales[tsr_test_xorshift64(&rng) % 6]);
        memcpy(b, &hd, 2);
        for (int e = 2; e < BLK; e++) b[e] = (uint8_t)(tsr_test_xorshift64(&rng) >> 19);
    }
    return w;
}

static const tsr_test_lanes_kernel k_kernel = {.type = TSR_TYPE_Q5_0,
                                               .make_rows = make_rows,
                                               .bytes = tsr_q50l_bytes,
                                               .repack = tsr_q50l_repack,
                                               .dot = tsr_q50l_dot,
                                               .acts = tsr_test_q8_0_acts};

static void test_order(void **state)
{
    (void)state;
    int n_cases = 0;
    static const int64_t ns[] = {32, 96, 896};
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++)
        n_cases += tsr_test_lanes_order(&k_kernel, ns[ni], &rng);
    printf("Q5_0 lanes: %d cases bit for bit with the row dot (%s)\n", n_cases,
           tsr_ggml_isa() == TSR_GGML_VNNI ? "avx512vnni and scalar"
                                           : "scalar only: no AVX-512 VNNI here");
}

/* The matmul over w.lanes = over the file layout = over the groups, alone and beside a Q8_0
 * weight (one Q8_0 conversion for both). */
static void test_matmul(void **state)
{
    (void)state;
    const int64_t n = 320, n_out = 72, n_out8 = 40;
    const size_t rb8 = tsr_row_bytes(TSR_TYPE_Q8_0, n);
    uint8_t *wd = make_rows(n, n_out), *wd8 = tsr_test_xmalloc(rb8 * (size_t)n_out8);
    float *f = tsr_test_xmalloc(sizeof(float) * (size_t)n);
    for (int64_t r = 0; r < n_out8; r++) {
        for (int64_t i = 0; i < n; i++) f[i] = tsr_test_gauss(&rng);
        tsr_quant_row(TSR_TYPE_Q8_0, f, wd8 + (size_t)r * rb8, n);
    }
    free(f);
    const tsr_weight w8 = {
        .type = TSR_TYPE_Q8_0, .n_in = n, .n_out = n_out8, .row_bytes = rb8, .data = wd8};
    tsr_test_lanes_matmul(&k_kernel, wd, n, n_out, &w8, &rng);
    free(wd8);
    free(wd);
}

static void test_api(void **state)
{
    (void)state;
    const char *e = getenv("TSR_Q50_LANES");
    const bool off = e && strcmp(e, "0") == 0;
    assert_int_equal(tsr_q50l_chosen(), tsr_ggml_isa() == TSR_GGML_VNNI && !off);
    assert_int_equal(tsr_q50l_repack(48, 1, NULL, 0, NULL), -1);
    assert_int_equal(tsr_q50l_group_bytes(896), 14 * 704);
    assert_int_equal(tsr_q50l_group_bytes(96), 2 * 704); /* 3 blocks: a pair and a half */
    assert_int_equal(tsr_q50l_bytes(896, 17), 2 * 14 * 704);
    assert_int_equal(tsr_q50l_bytes(896, 0), 0);
}

/* A model loaded here carries the layout on every Q5_0 matrix (on a CPU with AVX-512 VNNI;
 * elsewhere the groups) and keeps its greedy reference. */
static void test_model(void **state)
{
    (void)state;
    tsr_test_lanes_model("synthetic/synth-tiny-q5_0.gguf", TSR_TYPE_Q5_0, tsr_q50l_chosen(),
                         offsetof(tsr_model, n_q50_lanes));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_order),
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_api),
        cmocka_unit_test(test_model),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
