/*
 * test_repack.c — kernels/repack: the repacked GEMV / GEMM against tsr_vec_dot, bit for
 * bit, for every repacked type, on every instruction set this CPU has (scalar, AVX2, AVX-512
 * VNNI, forced with tsr_quant_set_isa), for token counts 1..9 and 16, odd row counts, row
 * ranges starting inside the matrix, block counts that leave a partial group of 8, and on
 * the real tensors of the shared model files (synth-tiny in every repacked quant type:
 * Q4_0 / Q5_0 / Q5_1 / Q2_K / Q3_K_M / Q4_K_M / Q5_K_M). Q8_0 and Q4_1 are not repacked
 * (their dots follow ggml's x86 order, which ggml runs unrepacked).
 * A failure prints the row, token, both values and their bits.
 *
 * Model level: logits of a model loaded with and without repacking (every supported type, the
 * default, and once only Q5_1 / K-quants, TSR_REPACK_ALL=0) are bit-identical, for
 * a batch (prefill, all logits) and for single tokens, and single tokens equal the batch's
 * rows (stories260K Q8_0, the synth-tiny files above and their Q8_0 / Q4_1 ones, where it
 * checks tiles against rows; `test_repack MODEL` checks MODEL only:
 * the release tree passes the real Qwen2.5 this way).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/quant.h"
#include "kernels/repack.h"
#include "shard/gguf.h"
#include "tests/util.h"
#include "worker/model.h"

static const char *const k_isas[] = {"scalar", "avx2", "avx512vnni"};

/* uniform in [-1, 1), rounded once from double */
static float rng_f(uint64_t *s)
{
    return (float)(tsr_test_unit(tsr_test_xorshift64s(s)) * 2.0 - 1.0);
}

/* rows: n_out rows of `type` (row_bytes apart); checks every token count of k_ntok over
 * row ranges [r0, r0 + nr) on every ISA. Returns the number of outputs compared. */
static size_t check_matrix(uint32_t type, int64_t n, int64_t n_out, const uint8_t *rows,
                           size_t row_bytes, const char *what)
{
    static const int32_t k_ntok[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 16};
    const int32_t max_tok = 16;
    const uint32_t vt = tsr_type_vec_dot_type(type);
    const size_t xs = tsr_row_bytes(vt, n);
    uint64_t seed = 0x9E3779B97F4A7C15ULL ^ (uint64_t)n ^ ((uint64_t)n_out << 20);
    float *xf = malloc(sizeof(float) * (size_t)n);
    uint8_t *x = malloc(xs * (size_t)max_tok);
    const size_t pb = tsr_repack_bytes(type, n, n_out);
    uint8_t *packed = aligned_alloc(64, (pb + 63) / 64 * 64);
    float *ref = malloc(sizeof(float) * (size_t)n_out * (size_t)max_tok);
    float *got = malloc(sizeof(float) * (size_t)n_out * (size_t)max_tok);
    float *ref0 = malloc(sizeof(float) * (size_t)n_out * (size_t)max_tok);
    assert_non_null(ref0);
    assert_non_null(xf);
    assert_non_null(x);
    assert_non_null(packed);
    assert_non_null(ref);
    assert_non_null(got);
    for (int32_t t = 0; t < max_tok; ++t) {
        /* activations of varied scale, some blocks all zero */
        const float scale = 0.01f + 3.0f * (float)t;
        for (int64_t i = 0; i < n; ++i) xf[i] = scale * rng_f(&seed);
        if (t == 3)
            for (int64_t i = 0; i < n && i < 64; ++i) xf[i] = 0.0f;
        tsr_quant_row(vt, xf, x + (size_t)t * xs, n);
    }
    assert_int_equal(tsr_repack(type, n, n_out, rows, row_bytes, packed), 0);
    size_t n_cmp = 0;
    for (size_t ii = 0; ii < sizeof k_isas / sizeof k_isas[0]; ++ii) {
        if (!tsr_quant_set_isa(k_isas[ii])) continue; /* this CPU lacks it */
        for (int64_t r = 0; r < n_out; ++r)
            for (int32_t t = 0; t < max_tok; ++t)
                ref[(size_t)t * (size_t)n_out + (size_t)r] =
                    tsr_vec_dot(type, n, rows + (size_t)r * row_bytes, x + (size_t)t * xs);
        /* Q5_0 / Q4_K / Q6_K sum in ggml's order on every instruction set: the references
         * of all of them equal the scalar one bit for bit */
        const bool one_order =
            type == TSR_TYPE_Q5_0 || type == TSR_TYPE_Q4_K || type == TSR_TYPE_Q6_K;
        const size_t n_ref = (size_t)n_out * (size_t)max_tok;
        if (ii == 0) memcpy(ref0, ref, sizeof(float) * n_ref);
        for (size_t e = 0; one_order && e < n_ref; ++e)
            if (tsr_test_fbits(ref[e]) != tsr_test_fbits(ref0[e]))
                fail_msg("%s %s n=%" PRId64 ": row %zu token %zu: %s %.9g (0x%08x) vs scalar "
                         "%.9g (0x%08x): must be bit-identical",
                         what, tsr_type_name(type), n, e % (size_t)n_out, e / (size_t)n_out,
                         k_isas[ii], (double)ref[e], tsr_test_fbits(ref[e]), (double)ref0[e],
                         tsr_test_fbits(ref0[e]));
        /* whole matrix, and a range starting at group 1 with an odd length; Q4_K / Q6_K with
         * their one-token GEMV's software prefetch on and off (the same arithmetic) */
        const int64_t ranges[2][2] = {{0, n_out}, {4, n_out > 4 ? (n_out - 4) / 2 * 2 + 1 : 0}};
        const int n_pf = type == TSR_TYPE_Q4_K || type == TSR_TYPE_Q6_K ? 2 : 1;
        for (int kp = 0; kp < 2 * n_pf; ++kp) {
            const int k = kp % 2;
            if (n_pf == 2) tsr_quant_set_kgemv_prefetch(kp / 2);
            const int64_t r0 = ranges[k][0];
            int64_t nr = ranges[k][1];
            if (r0 + nr > n_out) nr = n_out - r0;
            if (nr <= 0) continue;
            for (size_t ti = 0; ti < sizeof k_ntok / sizeof k_ntok[0]; ++ti) {
                const int32_t nt = k_ntok[ti];
                memset(got, 0xFF, sizeof(float) * (size_t)n_out * (size_t)max_tok);
                tsr_repack_dot(type, n, packed, r0, nr, nt, x, xs, got + r0, (size_t)n_out);
                for (int32_t t = 0; t < nt; ++t) {
                    for (int64_t r = r0; r < r0 + nr; ++r) {
                        const float e = ref[(size_t)t * (size_t)n_out + (size_t)r];
                        const float g = got[(size_t)t * (size_t)n_out + (size_t)r];
                        if (tsr_test_fbits(e) != tsr_test_fbits(g))
                            fail_msg("%s %s n=%" PRId64 " isa=%s tokens=%d rows [%" PRId64
                                     ", +%" PRId64 "): row %" PRId64 " token %d: expected %.9g "
                                     "(0x%08x, tsr_vec_dot), got %.9g (0x%08x, repacked%s)",
                                     what, tsr_type_name(type), n, k_isas[ii], nt, r0, nr, r, t,
                                     (double)e, tsr_test_fbits(e), (double)g, tsr_test_fbits(g),
                                     n_pf == 2 ? (kp / 2 ? ", prefetch on" : ", prefetch off")
                                               : "");
                        n_cmp++;
                    }
                    /* rows outside the range are untouched */
                    if (r0 > 0) {
                        const float g = got[(size_t)t * (size_t)n_out + (size_t)r0 - 1];
                        if (tsr_test_fbits(g) != 0xFFFFFFFFu)
                            fail_msg("%s: row %" PRId64 " outside the range was written", what,
                                     r0 - 1);
                    }
                }
            }
        }
    }
    tsr_quant_set_isa(NULL);
    tsr_quant_set_kgemv_prefetch(-1);
    free(xf);
    free(x);
    free(packed);
    free(ref);
    free(ref0);
    free(got);
    return n_cmp;
}

/* Random weights quantized by tsr_quant_row: shapes with partial groups of 8 blocks, odd
 * row counts, a single row, long rows. */
static void test_random(void **state)
{
    (void)state;
    static const uint32_t types[] = {TSR_TYPE_Q4_0, TSR_TYPE_Q5_0, TSR_TYPE_Q5_1, TSR_TYPE_Q2_K,
                                     TSR_TYPE_Q3_K, TSR_TYPE_Q4_K, TSR_TYPE_Q5_K, TSR_TYPE_Q6_K};
    static const int64_t shapes[][2] = {{32, 1},   {32, 7},   {96, 5},   {256, 4}, {288, 13},
                                        {2048, 9}, {2208, 6}, {8192, 5}, {640, 3}, {4864, 11},
                                        {96, 64},  {768, 13}, {256, 1}};
    uint64_t seed = 42;
    for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ++ti) {
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; ++si) {
            const int64_t n = shapes[si][0], n_out = shapes[si][1];
#ifdef __SANITIZE_ADDRESS__
            /* the sanitizer tree skips the long rows (8192, 4864: ~60% of the work, 10
             * types x 3 ISAs); the release tree runs them */
            if (n * n_out > 20000) continue;
#endif
            const size_t rb = tsr_row_bytes(types[ti], n);
            if (rb == 0) continue; /* not a whole number of Q4_K super-blocks */
            float *wf = malloc(sizeof(float) * (size_t)n);
            uint8_t *w = malloc(rb * (size_t)n_out);
            assert_non_null(wf);
            assert_non_null(w);
            for (int64_t r = 0; r < n_out; ++r) {
                const float scale = r % 5 == 4 ? 0.0f : 0.05f * (float)(r + 1);
                for (int64_t i = 0; i < n; ++i) wf[i] = scale * rng_f(&seed);
                tsr_quant_row(types[ti], wf, w + (size_t)r * rb, n);
            }
            char what[64];
            snprintf(what, sizeof what, "random %" PRId64 "x%" PRId64, n_out, n);
            assert_true(check_matrix(types[ti], n, n_out, w, rb, what) > 0);
            free(wf);
            free(w);
        }
    }
}

/* Every repacked-type matrix of the shared model files (the first 64 rows of large ones). */
static void check_file(const char *rel)
{
    const char *path = tsr_test_model_path(rel);
    tsr_gguf *g = NULL;
    char err[512];
    if (tsr_gguf_open(path, &g, err, sizeof err) != 0) fail_msg("open %s: %s", path, err);
    size_t n_mat = 0;
    for (int64_t i = 0; i < tsr_gguf_n_tensors(g); ++i) {
        const tsr_gguf_tensor *t = tsr_gguf_tensor_at(g, i);
        if (!tsr_repack_supported(t->type) || t->ne[1] < 1) continue;
        int64_t rows = t->ne[1];
        for (uint32_t d = 2; d < TSR_GGUF_MAX_DIMS; ++d) rows *= t->ne[d] ? t->ne[d] : 1;
        if (rows > 64) rows = 64;
        check_matrix(t->type, t->ne[0], rows, t->data, tsr_row_bytes(t->type, t->ne[0]), t->name);
        n_mat++;
    }
    tsr_gguf_close(g);
    if (n_mat == 0) fail_msg("%s has no matrix of a repacked type", rel);
}

static void test_model_tensors(void **state)
{
    (void)state;
    check_file("synthetic/synth-tiny-q4_0.gguf");
    check_file("synthetic/synth-tiny-q4_k_m.gguf");
    check_file("synthetic/synth-tiny-q5_0.gguf");
    check_file("synthetic/synth-tiny-q5_1.gguf");
    check_file("synthetic/synth-tiny-q2_k.gguf");
    check_file("synthetic/synth-tiny-q3_k_m.gguf");
    check_file("synthetic/synth-tiny-q5_k_m.gguf");
}

static void test_sizes(void **state)
{
    (void)state;
    assert_false(tsr_repack_supported(TSR_TYPE_F16));
    assert_false(tsr_repack_supported(TSR_TYPE_F32));
    assert_int_equal(tsr_repack_bytes(TSR_TYPE_F16, 256, 4), 0);
    /* every quantized weight type of the real-models issue is repacked but Q8_0 and Q4_1 */
    static const uint32_t k_all[] = {TSR_TYPE_Q4_0, TSR_TYPE_Q5_0, TSR_TYPE_Q5_1, TSR_TYPE_Q2_K,
                                     TSR_TYPE_Q3_K, TSR_TYPE_Q4_K, TSR_TYPE_Q5_K, TSR_TYPE_Q6_K};
    for (size_t i = 0; i < sizeof k_all / sizeof k_all[0]; ++i)
        assert_true(tsr_repack_supported(k_all[i]));
    /* Q5_1, 64 elements: 2 blocks; d and m of 4 rows padded to 8 blocks + 2 x 4 x 20 quants */
    assert_int_equal(tsr_repack_group_bytes(TSR_TYPE_Q5_1, 64),
                     (2 * 4 * 8 * 2 + 2 * 4 * 20 + 63) / 64 * 64);
    /* Q3_K: 110-byte super-blocks, 4 rows side by side */
    assert_int_equal(tsr_repack_group_bytes(TSR_TYPE_Q3_K, 256), (4 * 110 + 63) / 64 * 64);
    /* Q4_K: whole super-blocks, 4 rows side by side */
    assert_int_equal(tsr_repack_group_bytes(TSR_TYPE_Q4_K, 512), (2 * 4 * 144 + 63) / 64 * 64);
    assert_false(tsr_repack_supported(TSR_TYPE_Q8_0)); /* ggml's x86 order, unrepacked */
    assert_false(tsr_repack_supported(TSR_TYPE_Q4_1));
    assert_int_equal(tsr_repack_group_bytes(TSR_TYPE_Q8_0, 2048), 0);
    assert_int_equal(tsr_repack_group_bytes(TSR_TYPE_Q4_0, 33), 0);
    /* 5 rows: 2 groups */
    assert_int_equal(tsr_repack_bytes(TSR_TYPE_Q4_0, 2048, 5), 2 * (4 * 64 * 2 + 64 * 4 * 16));
    /* 3 blocks: scales padded to 8 */
    assert_int_equal(tsr_repack_group_bytes(TSR_TYPE_Q4_0, 96),
                     (4 * 8 * 2 + 3 * 4 * 16 + 63) / 64 * 64);
    assert_int_equal(tsr_repack(TSR_TYPE_F16, 256, 1, NULL, 0, NULL), -1);
    /* the load's choice: every type, or Q5_0, Q5_1 and the K-quants (no file-layout tile); the
     * matmul's: the file layout for 1 token, and for long batches of types with a tile */
    for (size_t i = 0; i < sizeof k_all / sizeof k_all[0]; ++i) {
        const uint32_t t = k_all[i];
        const bool tile = t == TSR_TYPE_Q8_0 || t == TSR_TYPE_Q4_0 || t == TSR_TYPE_Q4_1;
        tsr_repack_set_all(false);
        if (tsr_repack_chosen(t) != !tile)
            fail_msg("tsr_repack_chosen(%s), light choice: expected %d, got %d", tsr_type_name(t),
                     !tile, tile);
        tsr_repack_set_all(true);
        assert_true(tsr_repack_chosen(t));
        /* one token: the file layout, except Q4_K / Q6_K / Q5_0 (their 4-row GEMVs stream
         * the groups) and Q4_0 (q40_gemm.c reads a group's 4 rows with one load, any token
         * count) */
        const bool one_file =
            t != TSR_TYPE_Q4_K && t != TSR_TYPE_Q6_K && t != TSR_TYPE_Q5_0 && t != TSR_TYPE_Q4_0;
        if (tsr_repack_use_file_layout(t, 1) != one_file)
            fail_msg("tsr_repack_use_file_layout(%s, 1): expected %d", tsr_type_name(t), one_file);
        assert_false(tsr_repack_use_file_layout(t, 2));
        assert_false(tsr_repack_use_file_layout(t, 16));
        const bool long_file = tile && t != TSR_TYPE_Q4_0;
        if (tsr_repack_use_file_layout(t, TSR_REPACK_TILE_MIN_TOKENS) != long_file)
            fail_msg("tsr_repack_use_file_layout(%s, %d): expected %d", tsr_type_name(t),
                     TSR_REPACK_TILE_MIN_TOKENS, long_file);
    }
    assert_false(tsr_repack_chosen(TSR_TYPE_F16));
}

/* ---- model level ------------------------------------------------------------------------ */

enum { MT_PROMPT = 12, MT_DECODE = 4 };

/* All logits of a 12-token batch, then of 4 single-token steps, into out[(12 + 4) * V]. */
static void run_model(tsr_model *m, int n_threads, bool one_by_one, float *out)
{
    char err[512] = "";
    tsr_ctx *c = NULL;
    if (tsr_ctx_new(m, 64, 16, n_threads, &c, err, sizeof err) != 0) fail_msg("ctx: %s", err);
    const int32_t V = m->hp.n_vocab;
    int32_t toks[MT_PROMPT + MT_DECODE];
    for (int i = 0; i < MT_PROMPT + MT_DECODE; ++i) toks[i] = (int32_t)((i * 7919 + 13) % V);
    const float *lg = NULL;
    if (one_by_one) {
        for (int i = 0; i < MT_PROMPT; ++i) {
            if (tsr_forward(c, toks + i, 1, i, false, &lg, err, sizeof err) != 0)
                fail_msg("forward: %s", err);
            memcpy(out + (size_t)i * (size_t)V, lg, sizeof(float) * (size_t)V);
        }
    } else {
        if (tsr_forward(c, toks, MT_PROMPT, 0, true, &lg, err, sizeof err) != 0)
            fail_msg("forward: %s", err);
        memcpy(out, lg, sizeof(float) * (size_t)V * MT_PROMPT);
    }
    for (int i = MT_PROMPT; i < MT_PROMPT + MT_DECODE; ++i) {
        if (tsr_forward(c, toks + i, 1, i, false, &lg, err, sizeof err) != 0)
            fail_msg("forward: %s", err);
        memcpy(out + (size_t)i * (size_t)V, lg, sizeof(float) * (size_t)V);
    }
    tsr_ctx_free(c);
}

static void compare_logits(const char *what, const float *a, const float *b, int32_t V)
{
    for (int i = 0; i < MT_PROMPT + MT_DECODE; ++i) {
        for (int32_t v = 0; v < V; ++v) {
            const float x = a[(size_t)i * (size_t)V + (size_t)v];
            const float y = b[(size_t)i * (size_t)V + (size_t)v];
            if (tsr_test_fbits(x) != tsr_test_fbits(y))
                fail_msg("%s: token %d (%s) logit %d: expected %.9g (0x%08x), got %.9g (0x%08x)",
                         what, i, i < MT_PROMPT ? "prompt" : "decode", v, (double)x,
                         tsr_test_fbits(x), (double)y, tsr_test_fbits(y));
        }
    }
}

/* expect_repack: false for files of unrepacked types (Q4_1), where the check is
 * batch tiles vs single-token rows and thread counts; all: every supported type (the
 * default), else the light choice (Q5_1, K-quants). */
static void check_model_on_off_ex(const char *path, bool expect_repack, bool all)
{
    char err[512] = "";
    tsr_gguf *g = NULL;
    tsr_model *off = NULL, *on = NULL;
    if (tsr_gguf_open(path, &g, err, sizeof err) != 0) fail_msg("open %s: %s", path, err);
    if (tsr_model_load_shard(g, NULL, &off, err, sizeof err) != 0 ||
        tsr_model_load_shard(g, NULL, &on, err, sizeof err) != 0)
        fail_msg("load %s: %s", path, err);
    tsr_repack_set_all(all);
    if (tsr_model_repack(on, err, sizeof err) != 0) fail_msg("repack %s: %s", path, err);
    tsr_repack_set_all(true);
    if (expect_repack && on->n_repacked == 0) fail_msg("%s: no matrix was repacked", path);
    /* Q8_0: in the lanes layout, ggml's order (AVX-512 VNNI, kernels/q80_lanes.h), or copied
     * verbatim onto the huge-page arena and read from there (model_repack.c) */
    if (on->layers[0].wq.type == TSR_TYPE_Q8_0 && !on->layers[0].wq.lanes &&
        on->layers[0].wq.data == off->layers[0].wq.data)
        fail_msg("%s: the Q8_0 attn_q still reads the file's mapping after the repack", path);
    assert_int_equal(off->n_repacked, 0);
    /* worker/model_repack.c's arena: every slice keeps the kernels' 64-byte alignment, and a
     * second call repacks nothing (model.h's contract) */
    for (int32_t li = 0; li < on->n_layer_local; li++) {
        const tsr_layer *L = &on->layers[li];
        const tsr_weight *lw[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
        for (int k = 0; k < 7; k++)
            if (lw[k]->packed && ((uintptr_t)lw[k]->packed & 63) != 0)
                fail_msg("%s: layer %d matrix %d: repacked copy at %p, expected 64-byte aligned",
                         path, (int)li, k, lw[k]->packed);
    }
    const int32_t n_repacked = on->n_repacked;
    if (tsr_model_repack(on, err, sizeof err) != 0 || on->n_repacked != n_repacked)
        fail_msg("%s: a second repack: expected %d matrices and no error, got %d (%s)", path,
                 (int)n_repacked, (int)on->n_repacked, err);
    print_message("%s: %d matrices repacked, %.1f MiB, %.1f ms\n", path, on->n_repacked,
                  (double)on->n_bytes_repacked / 1048576.0, (double)on->t_repack_ns / 1e6);
    const int32_t V = on->hp.n_vocab;
    const size_t nl = (size_t)V * (MT_PROMPT + MT_DECODE);
    float *a = malloc(sizeof(float) * nl), *b = malloc(sizeof(float) * nl);
    assert_non_null(a);
    assert_non_null(b);
    char what[600];
    run_model(off, 1, false, a);
    run_model(on, 2, false, b);
    snprintf(what, sizeof what, "%s: batch, repack off (1 thread) vs on (2 threads)", path);
    compare_logits(what, a, b, V);
    run_model(on, 1, true, b);
    snprintf(what, sizeof what, "%s: repack on, batch vs one token at a time", path);
    compare_logits(what, a, b, V);
    free(a);
    free(b);
    tsr_model_free(off);
    tsr_model_free(on);
    tsr_gguf_close(g);
}

static void check_model_on_off(const char *path, bool expect_repack)
{
    check_model_on_off_ex(path, expect_repack, true);
}

static void test_model_on_off(void **state)
{
    (void)state;
    check_model_on_off(tsr_test_model_path("derived/stories260K-q8_0.gguf"), true);
    check_model_on_off(tsr_test_model_path("synthetic/synth-tiny-q8_0.gguf"), true);
    check_model_on_off(tsr_test_model_path("synthetic/synth-tiny-q4_0.gguf"), true);
    check_model_on_off(tsr_test_model_path("synthetic/synth-tiny-q4_k_m.gguf"), true);
    check_model_on_off(tsr_test_model_path("synthetic/synth-tiny-q5_0.gguf"), true);
    check_model_on_off(tsr_test_model_path("synthetic/synth-tiny-q4_1.gguf"), false);
    check_model_on_off(tsr_test_model_path("synthetic/synth-tiny-q5_1.gguf"), true);
    check_model_on_off(tsr_test_model_path("synthetic/synth-tiny-q2_k.gguf"), true);
    check_model_on_off(tsr_test_model_path("synthetic/synth-tiny-q3_k_m.gguf"), true);
    check_model_on_off(tsr_test_model_path("synthetic/synth-tiny-q5_k_m.gguf"), true);
    /* the light choice (Q5_1 and K-quants only) */
    check_model_on_off_ex(tsr_test_model_path("synthetic/synth-tiny-q4_k_m.gguf"), true, false);
}

static const char *g_model_arg;

static void test_model_arg(void **state)
{
    (void)state;
    check_model_on_off(g_model_arg, true);
}

int main(int argc, char **argv)
{
    if (argc > 1) {
        g_model_arg = argv[1];
        const struct CMUnitTest one[] = {cmocka_unit_test(test_model_arg)};
        return cmocka_run_group_tests(one, NULL, NULL);
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sizes),
        cmocka_unit_test(test_random),
        cmocka_unit_test(test_model_tensors),
        cmocka_unit_test(test_model_on_off),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
