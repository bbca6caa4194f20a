/*
 * test_q50_lanes.c — kernels/q50_lanes and q50_avx2: Q5_0 matrices in the lanes layouts
 * (AVX-512 VNNI; AVX2 CPUs without it).
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
 *   Q5_0 matrix (and not the groups; on an AVX2 CPU without AVX-512 VNNI, kernels/q50_avx2.h's)
 *   and keeps synth-tiny-q5_0's greedy reference.
 * - The same for kernels/q50_avx2's layout and kernels (AVX2 where this CPU has it, and scalar;
 *   also 70 blocks, more than one of its runs of 32 blocks); tsr_q50a_chosen follows the CPU
 *   (AVX2 without AVX-512 VNNI), never beside tsr_q50l_chosen, and a model loaded here carries
 *   it (w->lanes_avx2) on every Q5_0 layer matrix exactly when it is chosen.
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
#include "kernels/q50_avx2.h"
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

static const tsr_test_lanes_kernel k_avx2 = {.type = TSR_TYPE_Q5_0,
                                             .make_rows = make_rows,
                                             .bytes = tsr_q50a_bytes,
                                             .repack = tsr_q50a_repack,
                                             .dot = tsr_q50a_dot,
                                             .acts = tsr_test_q8_0_acts,
                                             .lanes_avx2 = true};

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

/* kernels/q50_avx2's layout: 70 blocks are more than one run of 32 */
static void test_order_avx2(void **state)
{
    (void)state;
    int n_cases = 0;
    static const int64_t ns[] = {32, 96, 896, 2240};
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++)
        n_cases += tsr_test_lanes_order(&k_avx2, ns[ni], &rng);
    printf("Q5_0 AVX2 layout: %d cases bit for bit with the row dot (%s)\n", n_cases,
           tsr_ggml_isa() >= TSR_GGML_AVX2 ? "avx2 and scalar" : "scalar only: no AVX2 here");
}

/* The matmul over w.lanes (either layout) = over the file layout = over the groups, alone and
 * beside a Q8_0 weight (one Q8_0 conversion for both). */
static void test_matmul(void **state)
{
    (void)state;
    const int64_t n = 320, n_out = 72;
    uint8_t *wd = make_rows(n, n_out);
    const tsr_weight w8 = tsr_test_q8_0_weight(n, 40, &rng);
    tsr_test_lanes_matmul(&k_kernel, wd, n, n_out, &w8, &rng);
    tsr_test_lanes_matmul(&k_avx2, wd, n, n_out, &w8, &rng);
    free((void *)w8.data);
    free(wd);
}

static void test_api(void **state)
{
    (void)state;
    const bool off = tsr_test_env_off("TSR_Q50_LANES");
    assert_int_equal(tsr_q50l_chosen(), tsr_ggml_isa() == TSR_GGML_VNNI && !off);
    assert_int_equal(tsr_q50l_repack(48, 1, NULL, 0, NULL), -1);
    assert_int_equal(tsr_q50l_group_bytes(896), 14 * 704);
    assert_int_equal(tsr_q50l_group_bytes(96), 2 * 704); /* 3 blocks: a pair and a half */
    assert_int_equal(tsr_q50l_bytes(896, 17), 2 * 14 * 704);
    assert_int_equal(tsr_q50l_bytes(896, 0), 0);
    assert_int_equal(tsr_q50a_chosen(), tsr_ggml_isa() == TSR_GGML_AVX2 && !off);
    assert_false(tsr_q50a_chosen() && tsr_q50l_chosen());
    assert_int_equal(tsr_q50a_repack(48, 1, NULL, 0, NULL), -1);
    assert_int_equal(tsr_q50a_group_bytes(896), 14 * 704); /* the size of the VNNI layout's */
    assert_int_equal(tsr_q50a_group_bytes(96), 2 * 704);
    assert_int_equal(tsr_q50a_group_bytes(100), 0);
    assert_int_equal(tsr_q50a_bytes(896, 17), 2 * 14 * 704);
    assert_int_equal(tsr_q50a_bytes(896, 0), 0);
}

/* A model loaded here carries a lanes layout on every Q5_0 matrix (this one on a CPU with
 * AVX-512 VNNI, kernels/q50_avx2.h's on an AVX2 CPU without it: test_q50_avx2 tells which;
 * elsewhere the groups) and keeps its greedy reference. */
static void test_model(void **state)
{
    (void)state;
    tsr_test_lanes_model("synthetic/synth-tiny-q5_0.gguf", TSR_TYPE_Q5_0,
                         tsr_q50l_chosen() || tsr_q50a_chosen(), offsetof(tsr_model, n_q50_lanes));
    /* which of the two: the AVX2 one exactly when it is chosen */
    tsr_test_model f;
    tsr_test_model_load(&f, tsr_test_model_path("synthetic/synth-tiny-q5_0.gguf"));
    int n_q5 = 0, n_avx2 = 0;
    for (int32_t li = 0; li < f.m->n_layer_local; li++) {
        const tsr_layer *l = &f.m->layers[li];
        const tsr_weight *ws[] = {&l->wq, &l->wk, &l->wv, &l->wo, &l->w_gate, &l->w_up, &l->w_down};
        for (size_t k = 0; k < sizeof ws / sizeof ws[0]; k++) {
            if (ws[k]->type != TSR_TYPE_Q5_0) continue;
            n_q5++;
            if (ws[k]->lanes && ws[k]->lanes_avx2) n_avx2++;
        }
    }
    const int want = tsr_q50a_chosen() && tsr_model_repack_default() ? n_q5 : 0;
    printf("synth-tiny-q5_0: %d of %d Q5_0 layer matrices in the AVX2 layout (want %d)\n", n_avx2,
           n_q5, want);
    assert_true(n_q5 > 0);
    assert_int_equal(n_avx2, want);
    tsr_test_model_close(&f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_order),  cmocka_unit_test(test_order_avx2),
        cmocka_unit_test(test_matmul), cmocka_unit_test(test_api),
        cmocka_unit_test(test_model),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
