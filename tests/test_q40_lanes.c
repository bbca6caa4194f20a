/*
 * test_q40_lanes.c — kernels/q40_lanes: Q4_0 matrices in the lanes layout (AVX2, AVX-512 VNNI).
 *
 * - The kernels (AVX-512 VNNI and AVX2 where this CPU has them, and scalar) give, bit for
 *   bit, Q4_0's order as kernels/q40_gemm.c's scalar reference computes it over the file
 *   layout: every shape their loops split differently: 1..17 tokens (tiles of up to 8 or 4,
 *   uneven splits), rows 1, 15, 16, 17, 40 (partial groups, masked stores), row starts 0 and
 *   16, 1, 3 and 64 blocks. Weights hold every nibble value and scales from subnormal to
 *   large; the activations an all-zero block.
 * - The matmul (kernels/ops.c) over a weight carrying the layout (w.lanes) gives the same bits
 *   as over the file layout and over the repacked groups, for 1..17 tokens at once or one at
 *   a time, on 1, 2 and 3 threads, alone and in tsr_matmul_multi beside a Q4_K weight (its
 *   own conversion) and a Q8_0 weight (the same conversion: the tiles' prep and the lanes
 *   prep side by side).
 * - tsr_q40l_chosen follows the CPU; a model loaded on such a CPU carries the layout on every
 *   Q4_0 matrix (and not the groups) and keeps synth-tiny-q4_0's greedy reference.
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
#include "kernels/q40_gemm.h"
#include "kernels/q40_lanes.h"
#include "kernels/q80_lanes.h"
#include "kernels/quant.h"
#include "kernels/repack.h"
#include "tests/util.h"
#include "worker/model.h"

enum { BLK = 18 };

static uint64_t rng = 0x9E3779B97F4A7C15ull;

/* n_rows Q4_0 rows of n elements: random nibble bytes (every value), a spread of scales. */
static uint8_t *make_rows(int64_t n, int64_t n_rows)
{
    const int64_t nb = n / 32;
    uint8_t *w = tsr_test_xmalloc((size_t)(nb * n_rows) * BLK);
    static const float scales[] = {6.0e-8f, 1.0e-4f, 0.0123f, 0.5f, 3.0f, 1000.0f, -0.25f};
    for (int64_t i = 0; i < nb * n_rows; i++) {
        uint8_t *b = w + (size_t)i * BLK;
        const uint16_t h = tsr_f32_to_f16(scales[tsr_test_xorshift64(&rng) % 7]);
        memcpy(b, &h, 2);
        for (int e = 0; e < 16; e++) b[2 + e] = (uint8_t)(tsr_test_xorshift64(&rng) >> 17);
    }
    return w;
}

static void test_order(void **state)
{
    (void)state;
    static const int64_t ns[] = {32, 96, 2048};
    static const int64_t rows[] = {1, 15, 16, 17, 40};
    int n_cases = 0;
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++) {
        const int64_t n = ns[ni];
        const size_t rb = tsr_row_bytes(TSR_TYPE_Q4_0, n), xb = tsr_row_bytes(TSR_TYPE_Q8_0, n);
        for (size_t ri = 0; ri < sizeof rows / sizeof rows[0]; ri++) {
            const int64_t n_out = rows[ri];
            uint8_t *w = make_rows(n, n_out);
            uint8_t *packed = tsr_test_xmalloc(tsr_q40l_bytes(n, n_out));
            assert_int_equal(tsr_q40l_repack(n, n_out, w, rb, packed), 0);
            for (int32_t n_tok = 1; n_tok <= 17; n_tok += (n == 2048 ? 4 : 1)) {
                uint8_t *x = tsr_test_q8_0_acts(&rng, n, n_tok);
                uint8_t *prep = tsr_test_xmalloc(tsr_q80l_prep_bytes(n, n_tok));
                for (int32_t t = 0; t < n_tok; t++)
                    tsr_q80l_prep(n, x + (size_t)t * xb,
                                  prep + (size_t)t * tsr_q80l_prep_bytes(n, 1));
                const size_t ny = (size_t)(n_out * n_tok);
                float *want = tsr_test_xmalloc(sizeof(float) * ny);
                float *y = tsr_test_xmalloc(sizeof(float) * ny);
                /* Q4_0's order, the scalar reference over the file layout */
                tsr_q40_gemm_dot(TSR_GGML_SCALAR, n, n_out, w, rb, n_tok, x, xb, want,
                                 (size_t)n_out);
                for (int lvl = TSR_GGML_SCALAR; lvl <= TSR_GGML_VNNI; lvl++) {
                    if (lvl > tsr_ggml_isa()) continue;
                    for (int64_t r0 = 0; r0 < n_out; r0 += (n_out > 16 ? 16 : n_out)) {
                        memset(y, 0xff, sizeof(float) * ny);
                        /* rows r0.. (a row split at a group boundary) */
                        tsr_q40l_dot(lvl, n, packed, r0, n_out - r0, n_tok, prep, y + r0,
                                     (size_t)n_out);
                        tsr_test_lanes_expect("Q4_0 lanes", n, n_out, r0, n_tok, lvl, want, y);
                        n_cases++;
                    }
                }
                free(y);
                free(want);
                free(prep);
                free(x);
            }
            free(packed);
            free(w);
        }
    }
    static const char *const levels[] = {"scalar only: no AVX2 here", "avx2 and scalar",
                                         "avx512vnni, avx2 and scalar"};
    printf("Q4_0 lanes: %d cases bit for bit with Q4_0's order (%s)\n", n_cases,
           levels[tsr_ggml_isa()]);
}

/* The matmul over w.lanes = over the file layout = over the groups, any batch and threads. */
static void test_matmul(void **state)
{
    (void)state;
    const int64_t n = 512, n_out = 200;
    uint8_t *wd = make_rows(n, n_out);
    tsr_test_lanes_set set;
    tsr_test_lanes_set_make(&set, TSR_TYPE_Q4_0, wd, n, n_out, tsr_q40l_bytes, tsr_q40l_repack);
    const tsr_weight wf = set.file, wl = set.lanes, wg = set.groups;
    /* beside them: a Q4_K weight (its own conversion), a Q8_0 one (the same conversion) */
    const size_t kb = tsr_row_bytes(TSR_TYPE_Q4_K, n), qb = tsr_row_bytes(TSR_TYPE_Q8_0, n);
    uint8_t *kd = tsr_test_xmalloc(kb * 24), *qd = tsr_test_xmalloc(qb * 40);
    float fr[512];
    for (int r = 0; r < 40; r++) {
        for (int i = 0; i < 512; i++) fr[i] = tsr_test_frand(&rng);
        if (r < 24) tsr_quant_row(TSR_TYPE_Q4_K, fr, kd + (size_t)r * kb, n);
        tsr_quant_row(TSR_TYPE_Q8_0, fr, qd + (size_t)r * qb, n);
    }
    tsr_weight wk = {.type = TSR_TYPE_Q4_K, .n_in = n, .n_out = 24, .row_bytes = kb, .data = kd};
    tsr_weight wq = {.type = TSR_TYPE_Q8_0, .n_in = n, .n_out = 40, .row_bytes = qb, .data = qd};
    const int32_t max_tok = 17;
    float *x = tsr_test_xmalloc(sizeof(float) * (size_t)(n * max_tok));
    for (int i = 0; i < n * max_tok; i++) x[i] = tsr_test_gauss(&rng);
    /* one token at a time, one thread, the file layout: the reference */
    float *ref = tsr_test_xmalloc(sizeof(float) * (size_t)(n_out * max_tok));
    tsr_pool *p1 = tsr_pool_new(1);
    assert_non_null(p1);
    void *sc = tsr_test_xmalloc(tsr_matmul_scratch_bytes(&wl, max_tok) + 64);
    for (int32_t t = 0; t < max_tok; t++)
        tsr_matmul(p1, &wf, x + (size_t)t * n, 1, ref + (size_t)t * n_out, sc);
    float *got = tsr_test_xmalloc(sizeof(float) * (size_t)(n_out * max_tok));
    float *gk = tsr_test_xmalloc(sizeof(float) * (size_t)(24 * max_tok));
    float *gq = tsr_test_xmalloc(sizeof(float) * (size_t)(40 * max_tok));
    char what[200];
    for (int nth = 1; nth <= 3; nth++) {
        tsr_pool *p = tsr_pool_new(nth);
        assert_non_null(p);
        for (int32_t n_tok = 1; n_tok <= max_tok; n_tok++) {
            const tsr_weight *lay[3] = {&wl, &wg, &wf};
            static const char *const names[3] = {"lanes", "groups", "file layout"};
            for (int li = 0; li < 3; li++) {
                memset(got, 0, sizeof(float) * (size_t)(n_out * n_tok));
                tsr_matmul(p, lay[li], x, n_tok, got, sc);
                snprintf(what, sizeof what, "Q4_0 matmul (%s), %d tokens, %d threads", names[li],
                         n_tok, nth);
                tsr_test_check_same(what, ref, got, (size_t)(n_out * n_tok));
            }
            const tsr_weight *ws[3] = {&wk, &wl, &wq};
            float *ys[3] = {gk, got, gq};
            void *msc = tsr_test_xmalloc(tsr_matmul_multi_scratch_bytes(ws, 3, n_tok) + 64);
            memset(got, 0, sizeof(float) * (size_t)(n_out * n_tok));
            tsr_matmul_multi(p, ws, ys, 3, x, n_tok, msc);
            snprintf(what, sizeof what, "Q4_0 lanes in matmul_multi, %d tokens, %d threads", n_tok,
                     nth);
            tsr_test_check_same(what, ref, got, (size_t)(n_out * n_tok));
            free(msc);
        }
        tsr_pool_free(p);
    }
    tsr_pool_free(p1);
    free(gq);
    free(gk);
    free(got);
    free(ref);
    free(sc);
    free(x);
    free(qd);
    free(kd);
    tsr_test_lanes_set_free(&set);
    free(wd);
}

static void test_api(void **state)
{
    (void)state;
    const bool off = tsr_test_env_off("TSR_Q40_LANES");
    assert_int_equal(tsr_q40l_chosen(), tsr_ggml_isa() >= TSR_GGML_AVX2 && !off);
    assert_int_equal(tsr_q40l_repack(33, 1, NULL, 0, NULL), -1);
    assert_int_equal(tsr_q40l_group_bytes(2048), 64 * 288);
    assert_int_equal(tsr_q40l_bytes(2048, 17), 2 * 64 * 288);
    assert_int_equal(tsr_q40l_bytes(2048, 0), 0);
}

/* A model loaded here carries the layout on every Q4_0 matrix (on a CPU with AVX-512 VNNI;
 * elsewhere the groups) and keeps its greedy reference. */
static void test_model(void **state)
{
    (void)state;
    tsr_test_lanes_model("synthetic/synth-tiny-q4_0.gguf", TSR_TYPE_Q4_0, tsr_q40l_chosen(),
                         offsetof(tsr_model, n_q40_lanes));
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
