/*
 * test_q80_lanes.c — kernels/q80_lanes: the opt-in lanes order for Q8_0.
 *
 * - The kernels (AVX-512 VNNI where this CPU has it, and scalar) give, bit for bit, the order
 *   q80_lanes.h states, spelled out here from the file's Q8_0 blocks: per block the exact
 *   integer sum of its 32 products, acc = fmaf((float)sum, fp16(d_w) * fp16(d_x), acc). Every
 *   shape their loops split differently: 1..17 tokens (tiles of up to 8, uneven splits),
 *   rows 1, 15, 16, 17, 40 (partial groups, masked stores), row starts 0 and 16, 1, 3 and 64
 *   blocks. Weights hold the extremes -128 and 127 and scales from subnormal to large; the
 *   activations all-zero blocks and +-127.
 * - They stay within 1e-6 of the sum of |products| of ggml's order (tsr_vec_dot): the same
 *   dot, other roundings.
 * - The matmul (kernels/ops.c) over a weight carrying the layout (w.lanes) gives the same bits
 *   for 1..17 tokens at once or one at a time, on 1, 2 and 3 threads, alone and beside other
 *   weights in tsr_matmul_multi: one order whatever the batch, split or thread count.
 * - TSR_Q80_ORDER / tsr_q80l_set / tsr_q80l_parse; a model loaded with the order on carries the
 *   layout on every Q8_0 matrix and keeps the greedy reference of its expected file
 *   (stories260K-q8_0, the first 114 tokens of bos-200; synth-tiny-q8_0's greedy ids).
 * - ggml's order over the same layout (tsr_q80l_dot_ggml, the default on AVX-512 VNNI): the
 *   kernels (both ISAs, rows 1-40, 1-17 tokens, 1, 3 and 64 blocks) and the matmul (beside a
 *   Q5_0 weight, 1-3 threads) bit for bit tsr_vec_dot / the file layout; a model loaded with
 *   the lanes order off carries it on every Q8_0 matrix exactly when tsr_q80l_ggml_chosen and
 *   keeps synth-tiny-q8_0's greedy ids (llama.cpp's).
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
#include "kernels/q80_lanes.h"
#include "kernels/quant.h"
#include "kernels/repack.h"
#include "tests/util.h"
#include "worker/model.h"

enum { BLK = 34 };

static uint64_t rng = 0x2545F4914F6CDD1Dull;

/* n_rows Q8_0 rows of n elements with extremes and a spread of scales. */
static uint8_t *make_rows(int64_t n, int64_t n_rows)
{
    const int64_t nb = n / 32;
    uint8_t *w = tsr_test_xmalloc((size_t)(nb * n_rows) * BLK);
    static const float scales[] = {6.0e-8f, 1.0e-4f, 0.0123f, 0.5f, 3.0f, 1000.0f};
    for (int64_t i = 0; i < nb * n_rows; i++) {
        uint8_t *b = w + (size_t)i * BLK;
        const uint16_t h = tsr_f32_to_f16(scales[tsr_test_xorshift64(&rng) % 6]);
        memcpy(b, &h, 2);
        for (int e = 0; e < 32; e++) {
            const uint64_t r = tsr_test_xorshift64(&rng);
            b[2 + e] = (uint8_t)(r % 7 == 0 ? -128 : r % 7 == 1 ? 127 : (int8_t)(r >> 8));
        }
    }
    return w;
}

/* The lanes order spelled out over the file's blocks. */
static float lanes_order(int64_t nb, const uint8_t *w, const uint8_t *x)
{
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++, w += BLK, x += BLK) {
        uint16_t hw, hx;
        memcpy(&hw, w, 2), memcpy(&hx, x, 2);
        int32_t s = 0;
        for (int e = 0; e < 32; e++) s += (int32_t)(int8_t)w[2 + e] * (int32_t)(int8_t)x[2 + e];
        acc = fmaf((float)s, tsr_f16_to_f32(hw) * tsr_f16_to_f32(hx), acc);
    }
    return acc;
}

/* sum over blocks of |fp16(d_w) * fp16(d_x)| * sum |q_w * q_x|: the scale of the rounding
 * differences between two orders of the same dot. */
static float abs_dot(int64_t nb, const uint8_t *w, const uint8_t *x)
{
    double acc = 0.0;
    for (int64_t b = 0; b < nb; b++, w += BLK, x += BLK) {
        uint16_t hw, hx;
        memcpy(&hw, w, 2), memcpy(&hx, x, 2);
        int64_t s = 0;
        for (int e = 0; e < 32; e++) s += llabs((int64_t)(int8_t)w[2 + e] * (int8_t)x[2 + e]);
        acc += fabs((double)tsr_f16_to_f32(hw) * tsr_f16_to_f32(hx)) * (double)s;
    }
    return (float)acc;
}

static void test_order(void **state)
{
    (void)state;
    static const int64_t ns[] = {32, 96, 2048};
    static const int64_t rows[] = {1, 15, 16, 17, 40};
    const bool vnni = strcmp(tsr_quant_isa(), "avx512vnni") == 0;
    int n_cases = 0;
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++) {
        const int64_t n = ns[ni], nb = n / 32;
        const size_t rb = tsr_row_bytes(TSR_TYPE_Q8_0, n);
        for (size_t ri = 0; ri < sizeof rows / sizeof rows[0]; ri++) {
            const int64_t n_out = rows[ri];
            uint8_t *w = make_rows(n, n_out);
            uint8_t *packed = tsr_test_xmalloc(tsr_q80l_bytes(n, n_out));
            assert_int_equal(tsr_q80l_repack(n, n_out, w, rb, packed), 0);
            for (int32_t n_tok = 1; n_tok <= 17; n_tok += (n == 2048 ? 4 : 1)) {
                uint8_t *x = tsr_test_q8_0_acts(&rng, n, n_tok);
                uint8_t *prep = tsr_test_xmalloc(tsr_q80l_prep_bytes(n, n_tok));
                for (int32_t t = 0; t < n_tok; t++)
                    tsr_q80l_prep(n, x + (size_t)t * rb,
                                  prep + (size_t)t * tsr_q80l_prep_bytes(n, 1));
                float *y = tsr_test_xmalloc(sizeof(float) * (size_t)(n_out * n_tok));
                for (int isa = 0; isa < 2; isa++) {
                    if (isa == 1 && !vnni) continue;
                    const int lvl = isa ? TSR_GGML_VNNI : TSR_GGML_SCALAR;
                    for (int64_t r0 = 0; r0 < n_out; r0 += (n_out > 16 ? 16 : n_out)) {
                        memset(y, 0xff, sizeof(float) * (size_t)(n_out * n_tok));
                        /* rows r0.. (a row split at a group boundary) */
                        tsr_q80l_dot(lvl, n, packed, r0, n_out - r0, n_tok, prep, y + r0,
                                     (size_t)n_out);
                        for (int32_t t = 0; t < n_tok; t++)
                            for (int64_t r = r0; r < n_out; r++) {
                                const float want =
                                    lanes_order(nb, w + (size_t)r * rb, x + (size_t)t * rb);
                                const float got = y[(size_t)t * n_out + r];
                                if (tsr_test_fbits(want) != tsr_test_fbits(got))
                                    fail_msg("n %lld rows %lld from %lld, %d tokens, %s: row %lld "
                                             "token %d: expected %.9g (0x%08x), got %.9g (0x%08x)",
                                             (long long)n, (long long)n_out, (long long)r0, n_tok,
                                             isa ? "avx512vnni" : "scalar", (long long)r, t, want,
                                             tsr_test_fbits(want), got, tsr_test_fbits(got));
                                /* near ggml's order: the same dot, other roundings */
                                const float g = tsr_vec_dot(TSR_TYPE_Q8_0, n, w + (size_t)r * rb,
                                                            x + (size_t)t * rb);
                                const float a = abs_dot(nb, w + (size_t)r * rb, x + (size_t)t * rb);
                                if (fabsf(g - got) > 1e-6f * a + 1e-30f)
                                    fail_msg("n %lld row %lld token %d: lanes %.9g, ggml %.9g "
                                             "(sum of |products| %.9g)",
                                             (long long)n, (long long)r, t, got, g, a);
                            }
                        n_cases++;
                    }
                }
                free(y);
                free(prep);
                free(x);
            }
            free(packed);
            free(w);
        }
    }
    printf("lanes order: %d cases bit for bit (%s)\n", n_cases,
           vnni ? "avx512vnni and scalar" : "scalar only: no AVX-512 VNNI here");
}

/* The matmul with w.lanes set: 1..17 tokens at once = one at a time, any thread count, alone
 * or in tsr_matmul_multi beside a Q4_K weight (its own conversion) and a Q8_0 weight in ggml's
 * order (the same conversion, the tiles' prep beside the lanes prep). */
static void test_matmul(void **state)
{
    (void)state;
    const int64_t n = 512, n_out = 200;
    const size_t rb = tsr_row_bytes(TSR_TYPE_Q8_0, n);
    uint8_t *wd = make_rows(n, n_out);
    void *packed = tsr_test_xmalloc(tsr_q80l_bytes(n, n_out));
    assert_int_equal(tsr_q80l_repack(n, n_out, wd, rb, packed), 0);
    tsr_weight wl = {.type = TSR_TYPE_Q8_0,
                     .n_in = n,
                     .n_out = n_out,
                     .row_bytes = rb,
                     .data = wd,
                     .lanes = packed};
    tsr_weight wg = wl;
    wg.lanes = NULL;
    const size_t kb = tsr_row_bytes(TSR_TYPE_Q4_K, n);
    uint8_t *kd = tsr_test_xmalloc(kb * 24);
    float fr[512];
    for (int r = 0; r < 24; r++) {
        for (int i = 0; i < 512; i++) fr[i] = tsr_test_frand(&rng);
        tsr_quant_row(TSR_TYPE_Q4_K, fr, kd + (size_t)r * kb, n);
    }
    tsr_weight wk = {.type = TSR_TYPE_Q4_K, .n_in = n, .n_out = 24, .row_bytes = kb, .data = kd};
    const int32_t max_tok = 17;
    float *x = tsr_test_xmalloc(sizeof(float) * (size_t)(n * max_tok));
    for (int i = 0; i < n * max_tok; i++) x[i] = tsr_test_gauss(&rng);
    /* one token at a time, one thread: the reference */
    float *ref = tsr_test_xmalloc(sizeof(float) * (size_t)(n_out * max_tok));
    tsr_pool *p1 = tsr_pool_new(1);
    assert_non_null(p1);
    void *sc = tsr_test_xmalloc(tsr_matmul_scratch_bytes(&wl, max_tok) + 64);
    for (int32_t t = 0; t < max_tok; t++)
        tsr_matmul(p1, &wl, x + (size_t)t * n, 1, ref + (size_t)t * n_out, sc);
    /* ... in the lanes order, not ggml's (the matmul reads w.lanes) */
    uint8_t *xq = tsr_test_xmalloc(rb);
    for (int32_t t = 0; t < max_tok; t++) {
        tsr_quant_act_row(TSR_TYPE_Q8_0, x + (size_t)t * n, xq, n);
        for (int64_t r = 0; r < n_out; r++) {
            const float want = lanes_order(n / 32, wd + (size_t)r * rb, xq);
            const float have = ref[(size_t)t * n_out + r];
            if (tsr_test_fbits(want) != tsr_test_fbits(have))
                fail_msg("matmul over w.lanes, token %d row %lld: expected %.9g, got %.9g", t,
                         (long long)r, want, have);
        }
    }
    free(xq);
    float *got = tsr_test_xmalloc(sizeof(float) * (size_t)(n_out * max_tok));
    float *gg = tsr_test_xmalloc(sizeof(float) * (size_t)(n_out * max_tok));
    float *gk = tsr_test_xmalloc(sizeof(float) * (size_t)(24 * max_tok));
    char what[200];
    for (int nth = 1; nth <= 3; nth++) {
        tsr_pool *p = tsr_pool_new(nth);
        assert_non_null(p);
        for (int32_t n_tok = 1; n_tok <= max_tok; n_tok++) {
            tsr_matmul(p, &wl, x, n_tok, got, sc);
            snprintf(what, sizeof what, "lanes matmul, %d tokens, %d threads", n_tok, nth);
            tsr_test_check_same(what, ref, got, (size_t)(n_out * n_tok));
            const tsr_weight *ws[3] = {&wk, &wl, &wg};
            float *ys[3] = {gk, got, gg};
            void *msc = tsr_test_xmalloc(tsr_matmul_multi_scratch_bytes(ws, 3, n_tok) + 64);
            memset(got, 0, sizeof(float) * (size_t)(n_out * n_tok));
            tsr_matmul_multi(p, ws, ys, 3, x, n_tok, msc);
            snprintf(what, sizeof what, "lanes in matmul_multi, %d tokens, %d threads", n_tok, nth);
            tsr_test_check_same(what, ref, got, (size_t)(n_out * n_tok));
            free(msc);
        }
        tsr_pool_free(p);
    }
    tsr_pool_free(p1);
    free(gk);
    free(gg);
    free(got);
    free(ref);
    free(sc);
    free(x);
    free(kd);
    free(packed);
    free(wd);
}

static void test_switch(void **state)
{
    (void)state;
    bool on = true;
    assert_true(tsr_q80l_parse("ggml", &on) && !on);
    assert_true(tsr_q80l_parse("lanes", &on) && on);
    assert_false(tsr_q80l_parse("fast", &on));
    assert_false(tsr_q80l_parse(NULL, &on));
    setenv("TSR_Q80_ORDER", "lanes", 1);
    tsr_q80l_set(-1);
    assert_true(tsr_q80l_on());
    setenv("TSR_Q80_ORDER", "ggml", 1);
    tsr_q80l_set(-1);
    assert_false(tsr_q80l_on());
    tsr_q80l_set(1);
    assert_true(tsr_q80l_on());
    tsr_q80l_set(0);
    assert_false(tsr_q80l_on());
    unsetenv("TSR_Q80_ORDER");
    tsr_q80l_set(-1);
    assert_false(tsr_q80l_on());
    assert_int_equal(tsr_q80l_repack(33, 1, NULL, 0, NULL), -1);
}

static void check_greedy(const char *rel, const char *expected, const char *model_key,
                         const char *prompt_key, size_t n_check)
{
    tsr_test_model f;
    tsr_test_model_open(&f, tsr_test_model_path(rel), 512, 64, 2, TSR_KV_F32);
    int n_q8 = 0;
    const int n_lanes = tsr_test_count_lanes(f.m, TSR_TYPE_Q8_0, &n_q8);
    if (n_q8 == 0 || n_lanes != n_q8)
        fail_msg("%s: expected all %d Q8_0 layer matrices in the lanes layout, got %d", rel, n_q8,
                 n_lanes);
    if (f.m->n_q80g_lanes != 0 || f.m->n_q80_lanes < n_q8)
        fail_msg("%s: expected its Q8_0 matrices in the lanes order, got %d in ggml's", rel,
                 (int)f.m->n_q80g_lanes);
    tsr_test_block *b;
    size_t nb = tsr_test_parse_blocks(tsr_test_model_path(expected), &b);
    const tsr_test_block *blk = tsr_test_find_block(b, nb, model_key, prompt_key, "greedy_ids");
    assert_non_null(blk);
    int32_t *want, *prompt;
    const size_t n_want = tsr_test_parse_ids(tsr_test_block_get(blk, "greedy_ids"), &want);
    size_t n_prompt = 1;
    int32_t bos = 1;
    prompt = &bos;
    int32_t *pids = NULL;
    if (tsr_test_block_get(blk, "prompt_ids")) {
        n_prompt = tsr_test_parse_ids(tsr_test_block_get(blk, "prompt_ids"), &pids);
        prompt = pids;
    }
    if (n_check > n_want) n_check = n_want;
    int32_t *got = tsr_test_xmalloc(sizeof(int32_t) * n_check);
    tsr_test_greedy(&f, prompt, n_prompt, (int32_t)n_check, got, NULL);
    char what[200];
    snprintf(what, sizeof what, "%s in the lanes order, greedy", rel);
    tsr_test_check_ids(what, want, got, n_check);
    printf("%s: %d Q8_0 matrices in the lanes layout, %zu greedy ids as expected\n", rel, n_lanes,
           n_check);
    free(got);
    free(want);
    free(pids);
    tsr_test_blocks_free(b, nb);
    tsr_test_model_close(&f);
}

/* ggml's order over the layout (tsr_q80l_dot_ggml, the default on AVX-512 VNNI CPUs) */
static const tsr_test_lanes_kernel k_ggml = {.type = TSR_TYPE_Q8_0,
                                             .make_rows = make_rows,
                                             .bytes = tsr_q80l_bytes,
                                             .repack = tsr_q80l_repack,
                                             .dot = tsr_q80l_dot_ggml,
                                             .acts = tsr_test_q8_0_acts,
                                             .lanes_ggml = true};

/* ... bit for bit tsr_vec_dot (ggml's x86 order), kernels and matmul. */
static void test_ggml_order(void **state)
{
    (void)state;
    int n_cases = 0;
    static const int64_t ns[] = {32, 96, 2048};
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++)
        n_cases += tsr_test_lanes_order(&k_ggml, ns[ni], &rng);
    printf("Q8_0 lanes layout in ggml's order: %d cases bit for bit with the row dot (%s)\n",
           n_cases,
           tsr_ggml_isa() == TSR_GGML_VNNI ? "avx512vnni and scalar"
                                           : "scalar only: no AVX-512 VNNI here");
}

/* The matmul over the layout in ggml's order = over the file layout, alone and beside a Q5_0
 * weight (one Q8_0 conversion for both), 1..17 tokens, 1..3 threads. */
static void test_ggml_matmul(void **state)
{
    (void)state;
    const int64_t n = 320, n_out = 72, n_out5 = 40;
    const size_t rb5 = tsr_row_bytes(TSR_TYPE_Q5_0, n);
    uint8_t *wd = make_rows(n, n_out), *wd5 = tsr_test_xmalloc(rb5 * (size_t)n_out5);
    float *f = tsr_test_xmalloc(sizeof(float) * (size_t)n);
    for (int64_t r = 0; r < n_out5; r++) {
        for (int64_t i = 0; i < n; i++) f[i] = tsr_test_gauss(&rng);
        tsr_quant_row(TSR_TYPE_Q5_0, f, wd5 + (size_t)r * rb5, n);
    }
    free(f);
    const tsr_weight w5 = {
        .type = TSR_TYPE_Q5_0, .n_in = n, .n_out = n_out5, .row_bytes = rb5, .data = wd5};
    tsr_test_lanes_matmul(&k_ggml, wd, n, n_out, &w5, &rng);
    free(wd5);
    free(wd);
}

static void test_models(void **state)
{
    (void)state;
    tsr_q80l_set(1);
    check_greedy("derived/stories260K-q8_0.gguf", "expected/stories260K-expected.txt", NULL, "\"\"",
                 114);
    check_greedy("synthetic/synth-tiny-q8_0.gguf", "expected/synth-tiny-expected.txt",
                 "synthetic/synth-tiny-q8_0.gguf", "\"Once upon a time\"", 32);
    /* the order off: the layout in ggml's order where the CPU takes it (the same greedy ids,
     * llama.cpp's), else the file layout */
    tsr_q80l_set(0);
    tsr_test_lanes_model("synthetic/synth-tiny-q8_0.gguf", TSR_TYPE_Q8_0,
                         tsr_q80l_ggml_chosen() && tsr_repack_all(),
                         offsetof(tsr_model, n_q80g_lanes));
    tsr_q80l_set(-1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_order),       cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_switch),      cmocka_unit_test(test_ggml_order),
        cmocka_unit_test(test_ggml_matmul), cmocka_unit_test(test_models),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
