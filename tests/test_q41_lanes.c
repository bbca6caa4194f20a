/*
 * test_q41_lanes.c — kernels/q41_avx2: Q4_1 matrices in the AVX2 layout (AVX2 CPUs without
 * AVX-512 VNNI).
 *
 * - The kernels (AVX2 where this CPU has it, and scalar) give, bit for bit, Q4_1's one order
 *   over the file layout (kernels/dot_ggml.c's Q4_1 row dot, ggml's, tsr_vec_dot), for 1..17
 *   tokens, rows 1, 15, 16, 17, 40 (partial groups), row starts 0 and 16, 1, 3, 18, 28 and 70
 *   blocks (70: more than one run of 32 blocks). Weights are random bytes (every nibble, mins
 *   of both signs), activations Q8_1 rows with a zero block.
 * - The matmul (kernels/ops.c) over a weight carrying the layout gives the same bits as over
 *   the file layout, for 1..17 tokens at once or one at a time, alone and in
 *   tsr_matmul_multi beside a Q8_0 weight, on 1, 2 and 3 threads.
 * - tsr_q41a_chosen follows the CPU (AVX2 without AVX-512 VNNI, TSR_Q41_LANES); a model loaded
 *   here carries the layout on every Q4_1 matrix exactly when it is chosen and keeps
 *   synth-tiny-q4_1's greedy reference.
 * A failure prints the case, what was expected and what came.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/dot_ggml.h"
#include "kernels/ops.h"
#include "kernels/q41_avx2.h"
#include "kernels/quant.h"
#include "tests/util.h"
#include "worker/model.h"

enum { BLK = 20 };

static uint64_t rng = 0x2545F4914F6CDD1Dull;

static const float k_scales[] = {6.0e-8f, 1.0e-4f, 0.0123f, 0.5f, 3.0f, -0.25f};

/* n_rows Q4_1 rows of n elements: random qs bytes, fp16 d and m from a spread of scales. */
static uint8_t *make_rows(int64_t n, int64_t n_rows)
{
    const int64_t nb = n / 32;
    uint8_t *w = tsr_test_xmalloc((size_t)(nb * n_rows) * BLK);
    for (int64_t i = 0; i < nb * n_rows; i++) {
        uint8_t *b = w + (size_t)i * BLK;
        const uint16_t hd = tsr_f32_to_f16(k_scales[tsr_test_xorshift64(&rng) % 6]);
        const uint16_t hm = tsr_f32_to_f16(-k_scales[tsr_test_xorshift64(&rng) % 6] * 4.0f);
        memcpy(b, &hd, 2);
        memcpy(b + 2, &hm, 2);
        for (int e = 4; e < BLK; e++) b[e] = (uint8_t)(tsr_test_xorshift64(&rng) >> 19);
    }
    return w;
}

static const tsr_test_lanes_kernel k_avx2 = {.type = TSR_TYPE_Q4_1,
                                             .make_rows = make_rows,
                                             .bytes = tsr_q41a_bytes,
                                             .repack = tsr_q41a_repack,
                                             .dot = tsr_q41a_dot,
                                             .acts = tsr_test_q8_1_acts,
                                             .lanes_avx2 = true};

static void test_order(void **state)
{
    (void)state;
    int n_cases = 0;
    static const int64_t ns[] = {32, 96, 576, 896, 2240};
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++)
        n_cases += tsr_test_lanes_order(&k_avx2, ns[ni], &rng);
    printf("Q4_1 AVX2 layout: %d cases bit for bit with the row dot (%s)\n", n_cases,
           tsr_ggml_isa() >= TSR_GGML_AVX2 ? "avx2 and scalar" : "scalar only: no AVX2 here");
}

/* The matmul over w.lanes = over the file layout, alone and beside a Q8_0 weight. */
static void test_matmul(void **state)
{
    (void)state;
    const int64_t n = 576, n_out = 72;
    uint8_t *wd = make_rows(n, n_out);
    const tsr_weight w8 = tsr_test_q8_0_weight(n, 40, &rng);
    tsr_test_lanes_matmul(&k_avx2, wd, n, n_out, &w8, &rng);
    free((void *)w8.data);
    free(wd);
}

static void test_api(void **state)
{
    (void)state;
    const bool off = tsr_test_env_off("TSR_Q41_LANES");
    assert_int_equal(tsr_q41a_chosen(), tsr_ggml_isa() == TSR_GGML_AVX2 && !off);
    assert_int_equal(tsr_q41a_repack(48, 1, NULL, 0, NULL), -1);
    assert_int_equal(tsr_q41a_group_bytes(576), 16 * 20 * 18); /* the file's bytes */
    assert_int_equal(tsr_q41a_group_bytes(100), 0);
    assert_int_equal(tsr_q41a_bytes(576, 17), 2 * 16 * 20 * 18);
    assert_int_equal(tsr_q41a_bytes(576, 0), 0);
}

/* A model loaded here carries the layout on every Q4_1 matrix exactly when it is chosen, and
 * keeps its greedy reference. */
static void test_model(void **state)
{
    (void)state;
    tsr_test_lanes_model("synthetic/synth-tiny-q4_1.gguf", TSR_TYPE_Q4_1, tsr_q41a_chosen(),
                         offsetof(tsr_model, n_q41_lanes));
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
