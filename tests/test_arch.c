/*
 * test_arch.c — the architectures of worker/model (llama, qwen2, qwen3, gemma3, llama with a
 * sliding window) on small synthetic files made by shard/mkmodel: each loads and runs;
 * the sliding window limits what a token sees; and a file missing any of an
 * architecture's keys or tensors, truncated anywhere, or with bytes flipped in its header,
 * is refused with a message naming what is wrong, never a crash (this test runs in the
 * ASan+UBSan tree too). The numbers of the real models are checked against llama.cpp by
 * tests/real_models_check.c; the layouts against one process by tests/replica_check.c.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "shard/gguf.h"
#include "shard/mkmodel.h"
#include "tests/util.h"
#include "worker/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void make(const char *path, const char *arch, int32_t head_dim, int32_t n_swa,
                 int32_t n_layer)
{
    tsr_mkmodel_params p;
    tsr_mkmodel_params_default(&p);
    p.out_path = path;
    p.vocab_from = tsr_test_model_path("stories260K.gguf");
    p.arch = arch;
    p.n_layer = n_layer;
    p.n_embd = 64;
    p.n_head = 4;
    p.n_head_kv = 2;
    p.n_ff = 96;
    p.type = "F32";
    p.head_dim = head_dim;
    p.n_swa = n_swa;
    p.seed = 7;
    char err[512];
    if (tsr_mkmodel(&p, NULL, err, sizeof err) != 0) fail_msg("mkmodel %s: %s", arch, err);
}

/* Open and load; returns 0 or < 0 with err. */
static int try_load(const char *path, char *err, size_t len)
{
    tsr_gguf *g = NULL;
    tsr_model *m = NULL;
    int rc = tsr_gguf_open(path, &g, err, len);
    if (rc == 0) rc = tsr_model_load(g, &m, err, len);
    if (rc == 0) {
        /* A loaded model must also run. */
        tsr_ctx *c;
        const float *logits;
        int32_t toks[3] = {1, 2, 3};
        rc = tsr_ctx_new(m, 32, 8, 1, &c, err, len);
        if (rc == 0) rc = tsr_forward(c, toks, 3, 0, false, &logits, err, len);
        tsr_ctx_free(c);
    }
    tsr_model_free(m);
    tsr_gguf_close(g);
    return rc;
}

static void tmp_path(char *buf, size_t n, const char *tag)
{
    snprintf(buf, n, "/tmp/tsr-test-arch-%d-%s.gguf", (int)getpid(), tag);
}

static void test_each_arch_loads_and_runs(void **state)
{
    (void)state;
    static const char *archs[] = {"llama", "qwen2", "qwen3", "gemma3"};
    for (size_t a = 0; a < 4; a++) {
        char path[256], err[512];
        tmp_path(path, sizeof path, archs[a]);
        make(path, archs[a], a == 3 ? 32 : 0, a == 3 ? 4 : 0, 2);
        tsr_gguf *g;
        tsr_model *m;
        assert_int_equal(tsr_gguf_open(path, &g, err, sizeof err), 0);
        if (tsr_model_load(g, &m, err, sizeof err) != 0) fail_msg("%s: %s", archs[a], err);
        assert_string_equal(tsr_arch_name(m->hp.arch), archs[a]);
        const tsr_hparams *hp = &m->hp;
        assert_int_equal(hp->rope_neox, a != 0);
        assert_int_equal(hp->qk_norm, a >= 2);
        assert_int_equal(hp->post_norms, a == 3);
        assert_int_equal(hp->ffn_gelu, a == 3);
        assert_int_equal(m->layers[0].bq != NULL, a == 1);
        if (a == 3) {
            assert_int_equal(hp->head_dim, 32); /* key_length, not n_embd / n_head = 16 */
            assert_true(fabsf(hp->embd_scale - 8.0f) < 1e-6f);
            assert_true(fabsf(hp->attn_scale - 1.0f / sqrtf(32.0f)) < 1e-7f);
            assert_int_equal(hp->n_swa, 4);
            /* llama.cpp's gemma3 pattern: 5 local layers, then 1 global. */
            for (int32_t il = 0; il < 12; il++)
                assert_int_equal(tsr_hparams_layer_swa(hp, il), il % 6 < 5);
            assert_true(hp->rope_freq_base_swa == 10000.0f);
        }
        tsr_ctx *c;
        const float *logits;
        int32_t toks[5] = {1, 403, 407, 261, 378};
        assert_int_equal(tsr_ctx_new(m, 64, 8, 2, &c, err, sizeof err), 0);
        assert_int_equal(tsr_forward(c, toks, 5, 0, false, &logits, err, sizeof err), 0);
        for (int32_t v = 0; v < hp->n_vocab; v++) assert_true(isfinite(logits[v]));
        tsr_ctx_free(c);
        tsr_model_free(m);
        tsr_gguf_close(g);
        unlink(path);
    }
}

/* Logits of the last of `n` tokens. */
static void last_logits(const tsr_model *m, const int32_t *toks, int n, float *out)
{
    char err[512];
    tsr_ctx *c;
    const float *logits;
    assert_int_equal(tsr_ctx_new(m, 64, 4, 1, &c, err, sizeof err), 0);
    if (tsr_forward(c, toks, n, 0, false, &logits, err, sizeof err) != 0) fail_msg("%s", err);
    memcpy(out, logits, sizeof(float) * (size_t)m->hp.n_vocab);
    tsr_ctx_free(c);
}

/* Mistral-style llama with window 3 on both of its 2 layers: the last token at position p
 * sees tokens >= p - 2 in layer 1, which saw tokens >= p - 4: changing token 0 of a
 * 10-token prompt must not change the last logits at all; without the window it must. */
static void test_sliding_window_limits_what_a_token_sees(void **state)
{
    (void)state;
    char path[256], path_full[256], err[512];
    tmp_path(path, sizeof path, "swa");
    tmp_path(path_full, sizeof path_full, "noswa");
    make(path, "llama", 0, 3, 2);
    make(path_full, "llama", 0, 0, 2);
    const char *paths[2] = {path, path_full};
    for (int k = 0; k < 2; k++) {
        tsr_gguf *g;
        tsr_model *m;
        assert_int_equal(tsr_gguf_open(paths[k], &g, err, sizeof err), 0);
        assert_int_equal(tsr_model_load(g, &m, err, sizeof err), 0);
        assert_int_equal(m->hp.n_swa, k == 0 ? 3 : 0);
        const int32_t V = m->hp.n_vocab;
        float *a = malloc(sizeof(float) * (size_t)V), *b = malloc(sizeof(float) * (size_t)V);
        int32_t t1[10] = {1, 403, 407, 261, 378, 300, 301, 302, 303, 304};
        int32_t t2[10] = {5, 403, 407, 261, 378, 300, 301, 302, 303, 304};
        last_logits(m, t1, 10, a);
        last_logits(m, t2, 10, b);
        double diff = 0;
        for (int32_t v = 0; v < V; v++) diff = fmax(diff, fabs((double)a[v] - b[v]));
        if (k == 0 && diff != 0.0)
            fail_msg("window 3: token 0 changed the logits at position 9 by %g (expected 0)", diff);
        if (k == 1 && !(diff > 1e-6))
            fail_msg("no window: token 0 should change the logits at position 9 (diff %g)", diff);
        free(a);
        free(b);
        tsr_model_free(m);
        tsr_gguf_close(g);
    }
    unlink(path);
    unlink(path_full);
}

/* A copy of `src` with the first occurrence of `from` replaced by `to` (same length). */
static void copy_replacing(const char *src, const char *dst, const char *from, const char *to)
{
    size_t n;
    char *buf = tsr_test_read_file(src, &n);
    assert_non_null(buf);
    size_t fl = strlen(from);
    assert_int_equal(fl, strlen(to));
    char *hit = NULL;
    for (size_t i = 0; i + fl <= n && !hit; i++)
        if (memcmp(buf + i, from, fl) == 0) hit = buf + i;
    if (!hit) fail_msg("'%s' not found in %s", from, src);
    memcpy(hit, to, fl);
    FILE *f = fopen(dst, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(buf, 1, n, f), n);
    fclose(f);
    free(buf);
}

/* Every required key and tensor of each architecture, removed (renamed) one at a time:
 * refused with a message naming it. */
static void test_missing_fields_are_named(void **state)
{
    (void)state;
    static const struct {
        const char *arch;
        const char *field; /* as stored; renamed by changing its last character */
        const char *named; /* what the error must contain */
    } cases[] = {
        {"qwen2", "qwen2.block_count", "qwen2.block_count"},
        {"qwen2", "qwen2.embedding_length", "qwen2.embedding_length"},
        {"qwen2", "qwen2.attention.head_count", "qwen2.attention.head_count"},
        {"qwen2", "qwen2.feed_forward_length", "qwen2.feed_forward_length"},
        {"qwen2", "qwen2.attention.layer_norm_rms_epsilon",
         "qwen2.attention.layer_norm_rms_epsilon"},
        {"qwen2", "general.architecture", "general.architecture"},
        {"qwen2", "blk.1.attn_k.weight", "blk.1.attn_k.weight"},
        {"qwen3", "qwen3.attention.layer_norm_rms_epsilon",
         "qwen3.attention.layer_norm_rms_epsilon"},
        {"qwen3", "qwen3.block_count", "qwen3.block_count"},
        {"qwen3", "blk.0.attn_q_norm.weight", "blk.0.attn_q_norm.weight"},
        {"qwen3", "blk.1.attn_k_norm.weight", "blk.1.attn_k_norm.weight"},
        {"gemma3", "gemma3.attention.layer_norm_rms_epsilon",
         "gemma3.attention.layer_norm_rms_epsilon"},
        {"gemma3", "gemma3.embedding_length", "gemma3.embedding_length"},
        {"gemma3", "gemma3.attention.head_count", "gemma3.attention.head_count"},
        {"gemma3", "blk.0.post_attention_norm.weight", "blk.0.post_attention_norm.weight"},
        {"gemma3", "blk.1.post_ffw_norm.weight", "blk.1.post_ffw_norm.weight"},
        {"gemma3", "blk.0.attn_k_norm.weight", "blk.0.attn_k_norm.weight"},
        {"gemma3", "output_norm.weight", "output_norm.weight"},
    };
    const char *made = "";
    char src[256], dst[256], err[512];
    tmp_path(dst, sizeof dst, "missing");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        if (strcmp(made, cases[i].arch) != 0) {
            tmp_path(src, sizeof src, cases[i].arch);
            make(src, cases[i].arch, strcmp(cases[i].arch, "gemma3") ? 0 : 32, 0, 2);
            made = cases[i].arch;
        }
        /* Rename by changing the last character: the name is then unknown to the loader. */
        char to[128];
        snprintf(to, sizeof to, "%s", cases[i].field);
        to[strlen(to) - 1] = to[strlen(to) - 1] == 'X' ? 'Y' : 'X';
        copy_replacing(src, dst, cases[i].field, to);
        int rc = try_load(dst, err, sizeof err);
        if (rc == 0) fail_msg("%s without %s was accepted", cases[i].arch, cases[i].field);
        if (!strstr(err, cases[i].named))
            fail_msg("%s without %s: the error does not name it: %s", cases[i].arch, cases[i].field,
                     err);
        print_message("refused: %s\n", err);
    }
    unlink(dst);
    unlink(src);
}

/* Truncated at many lengths and with header bytes flipped: open+load+run either fails
 * with a message or (for harmless flips) succeeds; never crashes. */
static void test_truncated_and_fuzzed_files_never_crash(void **state)
{
    (void)state;
    static const char *archs[] = {"qwen2", "qwen3", "gemma3"};
    char src[256], dst[256], err[512];
    tmp_path(dst, sizeof dst, "fuzz");
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (size_t a = 0; a < 3; a++) {
        tmp_path(src, sizeof src, archs[a]);
        make(src, archs[a], a == 2 ? 32 : 0, a == 2 ? 4 : 0, 1);
        size_t n;
        char *buf = tsr_test_read_file(src, &n);
        assert_non_null(buf);
        int n_refused = 0, n_runs = 0;
        /* Truncations: every 97 bytes through the header and metadata, then coarser. */
        for (size_t len = 0; len < n; len += len < 40000 ? 97 : 9973) {
            FILE *f = fopen(dst, "wb");
            assert_non_null(f);
            assert_int_equal(fwrite(buf, 1, len, f), len);
            fclose(f);
            err[0] = 0;
            if (try_load(dst, err, sizeof err) == 0)
                fail_msg("%s truncated to %zu of %zu bytes was accepted", archs[a], len, n);
            assert_true(strlen(err) > 0);
            n_refused++;
        }
        /* Header fuzz: 300 copies with 1-4 random bytes of the first 4 KiB changed. */
        char *mut = malloc(n);
        for (int r = 0; r < 300; r++) {
            memcpy(mut, buf, n);
            int k = 1 + (int)(x % 4);
            for (int j = 0; j < k; j++) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                size_t off = (size_t)(x % (n < 4096 ? n : 4096));
                mut[off] = (char)(x >> 40);
            }
            FILE *f = fopen(dst, "wb");
            assert_non_null(f);
            assert_int_equal(fwrite(mut, 1, n, f), n);
            fclose(f);
            err[0] = 0;
            if (try_load(dst, err, sizeof err) != 0) {
                assert_true(strlen(err) > 0);
                n_refused++;
            } else {
                n_runs++;
            }
        }
        print_message("%s: %d files refused with a message, %d fuzzed ones still ran\n", archs[a],
                      n_refused, n_runs);
        free(mut);
        free(buf);
        unlink(src);
    }
    unlink(dst);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_each_arch_loads_and_runs),
        cmocka_unit_test(test_sliding_window_limits_what_a_token_sees),
        cmocka_unit_test(test_missing_fields_are_named),
        cmocka_unit_test(test_truncated_and_fuzzed_files_never_crash),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
