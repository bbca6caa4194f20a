/*
 * test_q6k_lanes.c — kernels/q6k_lanes: Q6_K matrices in the lanes layout (AVX-512 VNNI).
 *
 * - The kernels (AVX-512 VNNI where this CPU has it, and scalar) give, bit for bit, Q6_K's one
 *   order over the file layout (kernels/quant.c's Q6_K row dot, tsr_vec_dot), for 1..17
 *   tokens (tiles of up to 8, uneven splits), rows 1, 15, 16, 17, 40 (partial groups, masked
 *   stores), row starts 0 and 16, 1 and 8 super-blocks. Weights are random bytes (every 6-bit
 *   quant, scales of either sign, -128 included).
 * - The matmul (kernels/ops.c) over a weight carrying the layout gives the same bits as over
 *   the file layout and over the repacked groups, for 1..17 tokens at once or one at a time,
 *   alone and in tsr_matmul_multi beside a Q4_K weight, on 1, 2 and 3 threads.
 * - tsr_q6kl_chosen follows the CPU; a model loaded on such a CPU carries the layout on every
 *   Q6_K matrix (and not the groups) and keeps synth-tiny-q4_k_m's greedy reference.
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
#include "kernels/q4k_lanes.h"
#include "kernels/q6k_lanes.h"
#include "kernels/quant.h"
#include "kernels/repack.h"
#include "tests/util.h"
#include "worker/model.h"

enum { BLK = 210 };

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static const float k_scales[] = {6.0e-8f, 1.0e-4f, 0.0123f, 0.5f, 3.0f, -0.25f};

/* n_rows Q6_K rows of n elements: random bytes (ql, qh, scales; every 8th super-block has a
 * scale of -128), fp16 d from a spread of scales. */
static uint8_t *make_rows(int64_t n, int64_t n_rows)
{
    const int64_t nsb = n / 256;
    uint8_t *w = tsr_test_xmalloc((size_t)(nsb * n_rows) * BLK);
    for (int64_t i = 0; i < nsb * n_rows; i++) {
        uint8_t *b = w + (size_t)i * BLK;
        for (int e = 0; e < 208; e++) b[e] = (uint8_t)(tsr_test_xorshift64(&rng) >> 19);
        if (i % 8 == 3) b[192 + i % 16] = 0x80;
        const uint16_t hd = tsr_f32_to_f16(k_scales[tsr_test_xorshift64(&rng) % 6]);
        memcpy(b + 208, &hd, 2);
    }
    return w;
}

static const tsr_test_lanes_kernel k_kernel = {.type = TSR_TYPE_Q6_K,
                                               .make_rows = make_rows,
                                               .bytes = tsr_q6kl_bytes,
                                               .repack = tsr_q6kl_repack,
                                               .dot = tsr_q6kl_dot,
                                               .acts = tsr_test_q8_K_acts};

static void test_order(void **state)
{
    (void)state;
    int n_cases = 0;
    static const int64_t ns[] = {256, 2048};
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++)
        n_cases += tsr_test_lanes_order(&k_kernel, ns[ni], &rng);
    printf("Q6_K lanes: %d cases bit for bit with the row dot (%s)\n", n_cases,
           tsr_ggml_isa() == TSR_GGML_VNNI ? "avx512vnni and scalar"
                                           : "scalar only: no AVX-512 VNNI here");
}

/* The matmul over w.lanes = over the file layout = over the groups, alone and beside a Q4_K
 * weight (one Q8_K conversion for both). */
static void test_matmul(void **state)
{
    (void)state;
    const int64_t n = 512, n_out = 72, n_out4 = 40;
    const size_t rb4 = tsr_row_bytes(TSR_TYPE_Q4_K, n);
    uint8_t *wd = make_rows(n, n_out), *wd4 = tsr_test_q4_K_rows(&rng, n, n_out4);
    const tsr_weight w4 = {
        .type = TSR_TYPE_Q4_K, .n_in = n, .n_out = n_out4, .row_bytes = rb4, .data = wd4};
    tsr_test_lanes_matmul(&k_kernel, wd, n, n_out, &w4, &rng);
    free(wd4);
    free(wd);
}

static void test_api(void **state)
{
    (void)state;
    const bool off = tsr_test_env_off("TSR_Q6K_LANES");
    assert_int_equal(tsr_q6kl_chosen(), tsr_ggml_isa() == TSR_GGML_VNNI && !off);
    assert_int_equal(tsr_q6kl_repack(255, 1, NULL, 0, NULL), -1);
    assert_int_equal(tsr_q6kl_group_bytes(2048), 8 * 3392);
    assert_int_equal(tsr_q6kl_bytes(2048, 17), 2 * 8 * 3392);
    assert_int_equal(tsr_q6kl_bytes(2048, 0), 0);
}

/* A model loaded here carries the layout on every Q6_K matrix (on a CPU with AVX-512 VNNI;
 * elsewhere the groups) and keeps its greedy reference. */
static void test_model(void **state)
{
    (void)state;
    tsr_test_lanes_model("synthetic/synth-tiny-q4_k_m.gguf", TSR_TYPE_Q6_K, tsr_q6kl_chosen(),
                         offsetof(tsr_model, n_q6k_lanes));
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
