/*
 * test_q4k_lanes.c — kernels/q4k_lanes: Q4_K matrices in the lanes layout (AVX-512 VNNI).
 *
 * - The kernels (AVX-512 VNNI where this CPU has it, and scalar) give, bit for bit, both of
 *   Q4_K's orders over the file layout: the prompt order of kernels/q4k_gemm.c (its scalar
 *   reference) and the generated tokens' order of kernels/quant.c's Q4_K row dot
 *   (tsr_vec_dot), for 1..9 tokens (tiles of up to 4, uneven splits), rows 1, 15, 16, 17, 40
 *   (partial groups, masked stores), row starts 0 and 16, 1 and 8 super-blocks. Weights are
 *   random bytes (every nibble, every 6-bit scale and min, scales of either sign).
 * - The matmul (kernels/ops.c) over a weight carrying the layout (with the file layout beside
 *   it, and alone) gives the same bits as over the file layout and over the repacked groups,
 *   for 1..24 tokens at once or one at a time, in tsr_matmul_multi_ord with tokens of both
 *   classes mixed and then a run of 16 prompt tokens, on 1, 2 and 3 threads.
 * - tsr_q4kl_chosen follows the CPU; a model loaded on such a CPU carries the layout on every
 *   Q4_K matrix (and not the groups) and keeps synth-tiny-q4_k_m's greedy reference.
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
#include "kernels/q4k_gemm.h"
#include "kernels/q4k_lanes.h"
#include "kernels/quant.h"
#include "kernels/repack.h"
#include "tests/util.h"
#include "worker/model.h"

enum { BLK = 144 };

static uint64_t rng = 0xD1B54A32D192ED03ull;

static void test_order(void **state)
{
    (void)state;
    static const int64_t ns[] = {256, 2048};
    static const int64_t rows[] = {1, 15, 16, 17, 40};
    int n_cases = 0;
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++) {
        const int64_t n = ns[ni];
        const size_t rb = tsr_row_bytes(TSR_TYPE_Q4_K, n), xb = tsr_row_bytes(TSR_TYPE_Q8_K, n);
        for (size_t ri = 0; ri < sizeof rows / sizeof rows[0]; ri++) {
            const int64_t n_out = rows[ri];
            uint8_t *w = tsr_test_q4_K_rows(&rng, n, n_out);
            uint8_t *packed = tsr_test_xmalloc(tsr_q4kl_bytes(n, n_out));
            assert_int_equal(tsr_q4kl_repack(n, n_out, w, rb, packed), 0);
            for (int32_t n_tok = 1; n_tok <= 9; n_tok++) {
                uint8_t *x = tsr_test_q8_K_acts(&rng, n, n_tok);
                const size_t ny = (size_t)(n_out * n_tok);
                float *want[2], *y = tsr_test_xmalloc(sizeof(float) * ny);
                for (int g = 0; g < 2; g++) want[g] = tsr_test_xmalloc(sizeof(float) * ny);
                /* generated tokens: the row dot; prompt: q4k_gemm's scalar reference */
                for (int32_t t = 0; t < n_tok; t++)
                    for (int64_t r = 0; r < n_out; r++)
                        want[0][(size_t)t * n_out + r] =
                            tsr_vec_dot(TSR_TYPE_Q4_K, n, w + (size_t)r * rb, x + (size_t)t * xb);
                tsr_q4k_gemm_dot(TSR_GGML_SCALAR, n, n_out, w, rb, BLK, n_tok, x, xb, want[1],
                                 (size_t)n_out);
                for (int g = 0; g < 2; g++)
                    for (int lvl = TSR_GGML_SCALAR; lvl <= TSR_GGML_VNNI; lvl++) {
                        if (lvl > tsr_ggml_isa()) continue;
                        for (int64_t r0 = 0; r0 < n_out; r0 += (n_out > 16 ? 16 : n_out)) {
                            memset(y, 0xff, sizeof(float) * ny);
                            tsr_q4kl_dot(lvl, n, packed, r0, n_out - r0, n_tok, x, xb, g != 0,
                                         y + r0, (size_t)n_out);
                            tsr_test_lanes_expect(g ? "Q4_K lanes, prompt order"
                                                    : "Q4_K lanes, generated order",
                                                  n, n_out, r0, n_tok, lvl, want[g], y);
                            n_cases++;
                        }
                    }
                free(y);
                free(want[0]);
                free(want[1]);
                free(x);
            }
            free(packed);
            free(w);
        }
    }
    static const char *const levels[] = {"scalar only: no AVX2 here", "avx2 and scalar",
                                         "avx512vnni, avx2 and scalar"};
    printf("Q4_K lanes: %d cases bit for bit with both orders (%s)\n", n_cases,
           levels[tsr_ggml_isa()]);
}

/* The matmul over w.lanes = over the file layout = over the groups, classes mixed. */
static void test_matmul(void **state)
{
    (void)state;
    const int64_t n = 512, n_out = 72;
    uint8_t *wd = tsr_test_q4_K_rows(&rng, n, n_out);
    tsr_test_lanes_set set;
    tsr_test_lanes_set_make(&set, TSR_TYPE_Q4_K, wd, n, n_out, tsr_q4kl_bytes, tsr_q4kl_repack);
    const tsr_weight wf = set.file, wl = set.lanes, wg = set.groups;
    tsr_weight wlo = set.lanes; /* the lanes layout alone (no file layout to fall back on) */
    wlo.data = NULL;
    /* 9 tokens of mixed classes, then a run of 16 prompt tokens (8..23): from
     * TSR_Q4KL_AVX2_FILE_MIN_TOKENS on AVX2 the prompt order reads the file layout when there
     * is one (tsr_q4kl_prompt_file_layout), else the lanes */
    const int32_t max_tok = 24;
    float *x = tsr_test_xmalloc(sizeof(float) * (size_t)(n * max_tok));
    for (int i = 0; i < n * max_tok; i++) x[i] = tsr_test_gauss(&rng);
    uint8_t ord[24];
    for (int t = 0; t < max_tok; t++)
        ord[t] = (uint8_t)(t >= 9 || t % 3 != 1); /* 1 0 1 1 0 1 1 0 1 1.. */
    /* one token at a time, one thread, the file layout: the reference */
    float *ref = tsr_test_xmalloc(sizeof(float) * (size_t)(n_out * max_tok));
    tsr_pool *p1 = tsr_pool_new(1);
    assert_non_null(p1);
    const tsr_weight *w1[1] = {&wf};
    void *sc = tsr_test_xmalloc(tsr_matmul_multi_scratch_bytes(w1, 1, max_tok) + 64);
    for (int32_t t = 0; t < max_tok; t++) {
        float *ys[1] = {ref + (size_t)t * n_out};
        tsr_matmul_multi_ord(p1, w1, ys, 1, x + (size_t)t * n, 1, &ord[t], sc);
    }
    float *got = tsr_test_xmalloc(sizeof(float) * (size_t)(n_out * max_tok));
    char what[200];
    for (int nth = 1; nth <= 3; nth++) {
        tsr_pool *p = tsr_pool_new(nth);
        assert_non_null(p);
        for (int32_t n_tok = 1; n_tok <= max_tok; n_tok++) {
            const tsr_weight *lay[4] = {&wl, &wg, &wf, &wlo};
            static const char *const names[4] = {"lanes", "groups", "file layout", "lanes only"};
            for (int li = 0; li < 4; li++) {
                const tsr_weight *ws[1] = {lay[li]};
                float *ys[1] = {got};
                memset(got, 0, sizeof(float) * (size_t)(n_out * n_tok));
                tsr_matmul_multi_ord(p, ws, ys, 1, x, n_tok, ord, sc);
                snprintf(what, sizeof what,
                         "Q4_K matmul (%s), %d tokens of mixed classes, %d threads", names[li],
                         n_tok, nth);
                tsr_test_check_same(what, ref, got, (size_t)(n_out * n_tok));
            }
        }
        tsr_pool_free(p);
    }
    tsr_pool_free(p1);
    free(got);
    free(ref);
    free(sc);
    free(x);
    tsr_test_lanes_set_free(&set);
    free(wd);
}

static void test_api(void **state)
{
    (void)state;
    const bool off = tsr_test_env_off("TSR_Q4K_LANES");
    assert_int_equal(tsr_q4kl_chosen(), tsr_ggml_isa() >= TSR_GGML_AVX2 && !off);
    assert_int_equal(tsr_q4kl_repack(255, 1, NULL, 0, NULL), -1);
    assert_int_equal(tsr_q4kl_group_bytes(2048), 8 * 2304);
    assert_int_equal(tsr_q4kl_bytes(2048, 17), 2 * 8 * 2304);
    assert_int_equal(tsr_q4kl_bytes(2048, 0), 0);
}

/* A model loaded here carries the layout on every Q4_K matrix (on a CPU with AVX-512 VNNI;
 * elsewhere the groups) and keeps its greedy reference. */
static void test_model(void **state)
{
    (void)state;
    tsr_test_lanes_model("synthetic/synth-tiny-q4_k_m.gguf", TSR_TYPE_Q4_K, tsr_q4kl_chosen(),
                         offsetof(tsr_model, n_q4k_lanes));
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
