/*
 * test_gguf.c — the GGUF reader and writer.
 *
 * Reads every model file of ../shared/models and checks what models/README.md states about
 * them; round-trips every value type through the writer; and feeds the reader a header
 * truncated at every byte and thousands of random byte flips: each must give an error or a
 * consistent file, never a crash (run under ASan/UBSan by the sanitizer build).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/quant.h"
#include "shard/gguf.h"
#include "shard/vocab.h"
#include "tests/util.h"
#include "worker/model.h"

static tsr_gguf *open_or_fail(const char *rel)
{
    char err[512];
    tsr_gguf *g;
    const char *path = tsr_test_model_path(rel);
    if (tsr_gguf_open(path, &g, err, sizeof err) != 0) fail_msg("%s: %s", path, err);
    return g;
}

static void test_stories_header(void **state)
{
    (void)state;
    tsr_gguf *g = open_or_fail("stories260K.gguf");
    assert_int_equal(tsr_gguf_version(g), 3);
    assert_int_equal(tsr_gguf_alignment(g), 32);
    assert_int_equal(tsr_gguf_data_offset(g), 14176);
    assert_int_equal(tsr_gguf_n_tensors(g), 48);
    int64_t v;
    assert_true(tsr_gguf_get_int(g, "llama.block_count", &v));
    assert_int_equal(v, 5);
    assert_true(tsr_gguf_get_int(g, "llama.embedding_length", &v));
    assert_int_equal(v, 64);
    assert_true(tsr_gguf_get_int(g, "llama.attention.head_count_kv", &v));
    assert_int_equal(v, 4);
    assert_true(tsr_gguf_get_int(g, "tokenizer.ggml.seperator_token_id", &v));
    assert_int_equal(v, 4294967295LL);
    double eps;
    assert_true(tsr_gguf_get_float(g, "llama.attention.layer_norm_rms_epsilon", &eps));
    assert_true(eps > 0.99e-5 && eps < 1.01e-5);
    tsr_gguf_str s;
    assert_true(tsr_gguf_get_str(g, "general.architecture", &s));
    assert_int_equal(s.len, 5);
    assert_memory_equal(s.ptr, "llama", 5);
    assert_false(tsr_gguf_get_str(g, "llama.block_count", &s)); /* wrong type */
    assert_false(tsr_gguf_get_int(g, "no.such.key", &v));
    int64_t it = tsr_gguf_find_key(g, "tokenizer.ggml.tokens");
    tsr_gguf_vtype et;
    uint64_t n;
    assert_true(tsr_gguf_kv_arr(g, it, &et, &n));
    assert_int_equal(et, TSR_GGUF_STRING);
    assert_int_equal(n, 512);
    assert_true(tsr_gguf_arr_str(g, it, 1, &s));
    assert_int_equal(s.len, 3);
    assert_memory_equal(s.ptr, "<s>", 3);
    assert_false(tsr_gguf_arr_str(g, it, 512, &s)); /* out of range */
    int64_t isc = tsr_gguf_find_key(g, "tokenizer.ggml.scores");
    double sc;
    assert_true(tsr_gguf_arr_float(g, isc, 260, &sc));
    assert_true(sc == -1.0);
    const tsr_gguf_tensor *t = tsr_gguf_find_tensor(g, "blk.0.ffn_gate.weight");
    assert_non_null(t);
    assert_int_equal(t->type, TSR_TYPE_F32);
    assert_int_equal(t->ne[0], 64);
    assert_int_equal(t->ne[1], 172);
    assert_int_equal(t->n_bytes, 64 * 172 * 4);
    assert_null(tsr_gguf_find_tensor(g, "blk.9.ffn_gate.weight"));
    tsr_gguf_close(g);
}

/* Every file of the collection opens; spot checks from models/README.md. */
static void test_all_files_open(void **state)
{
    (void)state;
    static const char *files[] = {
        "derived/stories260K-q8_0.gguf",      "derived/stories260K-4layer-draft.gguf",
        "random/llama-2-tiny-random.gguf",    "synthetic/synth-tiny-f16.gguf",
        "synthetic/synth-tiny-q8_0.gguf",     "synthetic/synth-tiny-q4_k_m.gguf",
        "synthetic/synth-tiny-q4_0.gguf",     "synthetic/synth-tiny-bf16.gguf",
        "synthetic/synth-tiny-q4_1.gguf",     "synthetic/synth-tiny-q5_0.gguf",
        "synthetic/synth-tiny-q5_1.gguf",     "synthetic/synth-tiny-q2_k.gguf",
        "synthetic/synth-tiny-q3_k_m.gguf",   "synthetic/synth-tiny-q5_k_m.gguf",
        "vocab/ggml-vocab-llama-spm.gguf",    "vocab/ggml-vocab-gpt-2.gguf",
        "vocab/ggml-vocab-deepseek-llm.gguf", "vocab/ggml-vocab-bert-bge.gguf",
    };
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        tsr_gguf *g = open_or_fail(files[i]);
        tsr_gguf_close(g);
    }
    tsr_gguf *g = open_or_fail("synthetic/synth-tiny-q4_k_m.gguf");
    assert_int_equal(tsr_gguf_find_tensor(g, "token_embd.weight")->type, TSR_TYPE_Q6_K);
    assert_int_equal(tsr_gguf_find_tensor(g, "blk.0.attn_q.weight")->type, TSR_TYPE_Q4_K);
    assert_int_equal(tsr_gguf_find_tensor(g, "blk.1.ffn_down.weight")->type, TSR_TYPE_Q6_K);
    assert_null(tsr_gguf_find_tensor(g, "output.weight"));
    tsr_gguf_close(g);
    g = open_or_fail("vocab/ggml-vocab-llama-spm.gguf");
    assert_int_equal(tsr_gguf_n_tensors(g), 0);
    tsr_gguf_close(g);
}

static void test_writer_roundtrip(void **state)
{
    (void)state;
    char path[] = "/tmp/tsr_gguf_rt_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    tsr_gguf_writer *w = tsr_gguf_writer_new();
    assert_non_null(w);
    assert_int_equal(tsr_gguf_writer_set_int(w, "u8", TSR_GGUF_UINT8, 200), 0);
    assert_int_equal(tsr_gguf_writer_set_int(w, "i8", TSR_GGUF_INT8, -100), 0);
    assert_int_equal(tsr_gguf_writer_set_int(w, "u16", TSR_GGUF_UINT16, 60000), 0);
    assert_int_equal(tsr_gguf_writer_set_int(w, "i16", TSR_GGUF_INT16, -30000), 0);
    assert_int_equal(tsr_gguf_writer_set_int(w, "u32", TSR_GGUF_UINT32, 4000000000LL), 0);
    assert_int_equal(tsr_gguf_writer_set_int(w, "i32", TSR_GGUF_INT32, -2000000000LL), 0);
    assert_int_equal(tsr_gguf_writer_set_int(w, "u64", TSR_GGUF_UINT64, 1LL << 40), 0);
    assert_int_equal(tsr_gguf_writer_set_int(w, "i64", TSR_GGUF_INT64, -(1LL << 50)), 0);
    assert_int_equal(tsr_gguf_writer_set_int(w, "b", TSR_GGUF_BOOL, 1), 0);
    assert_int_equal(tsr_gguf_writer_set_float(w, "f32", TSR_GGUF_FLOAT32, 0.5), 0);
    assert_int_equal(tsr_gguf_writer_set_float(w, "f64", TSR_GGUF_FLOAT64, 1e-300), 0);
    assert_int_equal(tsr_gguf_writer_set_str(w, "s", "h\0llo", 5), 0);
    int32_t arr[3] = {7, -8, 9};
    assert_int_equal(tsr_gguf_writer_set_arr(w, "ai32", TSR_GGUF_INT32, arr, 3), 0);
    const char *strs[2] = {"ab", ""};
    size_t lens[2] = {2, 0};
    assert_int_equal(tsr_gguf_writer_set_arr_str(w, "astr", strs, lens, 2), 0);
    assert_int_equal(tsr_gguf_writer_set_int(w, "u8", TSR_GGUF_UINT8, 201), 0); /* replace */
    float data[2 * 32];
    for (int i = 0; i < 64; i++) data[i] = (float)i;
    int64_t ne[2] = {32, 2};
    assert_int_equal(tsr_gguf_writer_add_tensor(w, "t.f32", TSR_TYPE_F32, 2, ne, data, sizeof data),
                     0);
    uint8_t q8[2 * 34];
    tsr_quant_row(TSR_TYPE_Q8_0, data, q8, 64);
    int64_t ne1[1] = {64};
    assert_int_equal(tsr_gguf_writer_add_tensor(w, "t.q8", TSR_TYPE_Q8_0, 1, ne1, q8, sizeof q8),
                     0);
    char err[512];
    assert_int_equal(tsr_gguf_writer_save(w, path, err, sizeof err), 0);
    tsr_gguf_writer_free(w);

    tsr_gguf *g;
    if (tsr_gguf_open(path, &g, err, sizeof err) != 0) fail_msg("%s", err);
    int64_t v;
    double d;
    bool b;
    tsr_gguf_str s;
    assert_int_equal(tsr_gguf_n_kv(g), 14);
    assert_string_equal(tsr_gguf_kv_key(g, 0), "u8");
    assert_true(tsr_gguf_get_int(g, "u8", &v) && v == 201);
    assert_true(tsr_gguf_get_int(g, "i8", &v) && v == -100);
    assert_true(tsr_gguf_get_int(g, "u16", &v) && v == 60000);
    assert_true(tsr_gguf_get_int(g, "i16", &v) && v == -30000);
    assert_true(tsr_gguf_get_int(g, "u32", &v) && v == 4000000000LL);
    assert_true(tsr_gguf_get_int(g, "i32", &v) && v == -2000000000LL);
    assert_true(tsr_gguf_get_int(g, "u64", &v) && v == (1LL << 40));
    assert_true(tsr_gguf_get_int(g, "i64", &v) && v == -(1LL << 50));
    assert_true(tsr_gguf_get_bool(g, "b", &b) && b);
    assert_true(tsr_gguf_get_float(g, "f32", &d) && d == 0.5);
    assert_true(tsr_gguf_get_float(g, "f64", &d) && d == 1e-300);
    assert_true(tsr_gguf_get_str(g, "s", &s) && s.len == 5 && memcmp(s.ptr, "h\0llo", 5) == 0);
    int64_t ia = tsr_gguf_find_key(g, "ai32");
    assert_true(tsr_gguf_arr_int(g, ia, 1, &v) && v == -8);
    int64_t is = tsr_gguf_find_key(g, "astr");
    assert_true(tsr_gguf_arr_str(g, is, 0, &s) && s.len == 2);
    assert_true(tsr_gguf_arr_str(g, is, 1, &s) && s.len == 0);
    const tsr_gguf_tensor *t = tsr_gguf_find_tensor(g, "t.f32");
    assert_non_null(t);
    assert_int_equal(t->offset % 32, 0);
    assert_memory_equal(t->data, data, sizeof data);
    t = tsr_gguf_find_tensor(g, "t.q8");
    assert_non_null(t);
    assert_int_equal(t->offset % 32, 0);
    assert_memory_equal(t->data, q8, sizeof q8);
    /* copy_kv reproduces values of any type. */
    tsr_gguf_writer *w2 = tsr_gguf_writer_new();
    for (int64_t i = 0; i < tsr_gguf_n_kv(g); i++)
        assert_int_equal(tsr_gguf_writer_copy_kv(w2, g, i), 0);
    assert_int_equal(tsr_gguf_writer_save(w2, path, err, sizeof err), 0);
    tsr_gguf_writer_free(w2);
    tsr_gguf_close(g);
    if (tsr_gguf_open(path, &g, err, sizeof err) != 0) fail_msg("%s", err);
    assert_true(tsr_gguf_get_str(g, "s", &s) && s.len == 5);
    is = tsr_gguf_find_key(g, "astr");
    assert_true(tsr_gguf_arr_str(g, is, 0, &s) && s.len == 2 && memcmp(s.ptr, "ab", 2) == 0);
    tsr_gguf_close(g);

    /* A wrong byte count is refused at save. */
    w = tsr_gguf_writer_new();
    assert_int_equal(tsr_gguf_writer_add_tensor(w, "bad", TSR_TYPE_Q8_0, 1, ne1, q8, 10), 0);
    assert_true(tsr_gguf_writer_save(w, path, err, sizeof err) < 0);
    assert_non_null(strstr(err, "bad"));
    tsr_gguf_writer_free(w);
    unlink(path);
}

/* After a successful open of a damaged file, using it must be safe too. */
static void exercise(const tsr_gguf *g)
{
    char err[256];
    tsr_vocab *v = NULL;
    if (tsr_vocab_load(g, &v, err, sizeof err) == 0) {
        int32_t *ids = NULL;
        size_t n = 0;
        if (tsr_vocab_tokenize(v, "Hello world", 11, true, true, &ids, &n, err, sizeof err) == 0)
            free(ids);
        tsr_vocab_free(v);
    }
    tsr_model *m = NULL;
    if (tsr_model_load(g, &m, err, sizeof err) == 0) {
        tsr_ctx *c = NULL;
        if (tsr_ctx_new(m, 8, 4, 1, &c, err, sizeof err) == 0) {
            int32_t tok[2] = {1, 2};
            const float *lg;
            (void)tsr_forward(c, tok, 2, 0, false, &lg, err, sizeof err);
            tsr_ctx_free(c);
        }
        tsr_model_free(m);
    }
}

/* Set the type id of tensor `name` in a GGUF image (the first occurrence of the name is
 * its tensor info: name, n_dims, ne[n_dims], then the type). */
static void set_tensor_type(char *buf, size_t len, const char *name, uint32_t type)
{
    const size_t nl = strlen(name);
    char *p = memmem(buf, len, name, nl);
    assert_non_null(p);
    uint32_t n_dims;
    memcpy(&n_dims, p + nl, 4);
    memcpy(p + nl + 4 + 8 * (size_t)n_dims, &type, 4);
}

/* TSR_GGUF_OPEN_ANY_TYPE: types Tessera cannot compute with (IQ2_XXS) and ids ggml does not
 * define are accepted, sized where ggml defines them and bounds-checked; the default open
 * and tsr_gguf_check_types name the tensor and the type. */
static void test_any_type(void **state)
{
    (void)state;
    size_t len;
    char *buf = tsr_test_read_file(tsr_test_model_path("synthetic/synth-tiny-q4_k_m.gguf"), &len);
    assert_non_null(buf);
    char err[512];
    tsr_gguf *g = NULL;
    set_tensor_type(buf, len, "blk.0.attn_q.weight", 16); /* IQ2_XXS: 66 bytes per 256 */
    assert_true(tsr_gguf_open_memory(buf, len, &g, err, sizeof err) < 0);
    assert_null(g);
    if (!strstr(err, "blk.0.attn_q.weight") || !strstr(err, "IQ2_XXS"))
        fail_msg("strict open of an IQ2_XXS tensor: expected its name and type, got: %s", err);
    assert_int_equal(tsr_gguf_open_memory_ex(buf, len, TSR_GGUF_OPEN_ANY_TYPE, &g, err, sizeof err),
                     0);
    const tsr_gguf_tensor *t = tsr_gguf_find_tensor(g, "blk.0.attn_q.weight");
    assert_int_equal(t->type, 16);
    assert_int_equal(t->n_bytes, 256 / 256 * 66 * 256); /* [256, 256] */
    assert_true(tsr_gguf_check_types(g, err, sizeof err) < 0);
    assert_non_null(strstr(err, "tensor blk.0.attn_q.weight has type IQ2_XXS"));
    tsr_gguf_close(g);
    /* an id ggml does not define: size unknown (0), still listed */
    set_tensor_type(buf, len, "blk.1.attn_q.weight", 99);
    assert_int_equal(tsr_gguf_open_memory_ex(buf, len, TSR_GGUF_OPEN_ANY_TYPE, &g, err, sizeof err),
                     0);
    assert_int_equal(tsr_gguf_find_tensor(g, "blk.1.attn_q.weight")->n_bytes, 0);
    tsr_gguf_close(g);
    /* the last tensor as F32 (4 bytes a value, not 144 per 256) runs past the end of the
     * file, which ANY_TYPE still refuses */
    set_tensor_type(buf, len, "blk.1.ffn_up.weight", TSR_TYPE_F32);
    assert_true(tsr_gguf_open_memory_ex(buf, len, TSR_GGUF_OPEN_ANY_TYPE, &g, err, sizeof err) < 0);
    assert_non_null(strstr(err, "blk.1.ffn_up.weight"));
    assert_null(g);
    /* every byte of a truncated header is still refused in ANY_TYPE mode (ASan checks reads) */
    for (size_t cut = 0; cut < 4096; cut += 97) {
        char *copy = malloc(cut ? cut : 1);
        memcpy(copy, buf, cut);
        assert_true(
            tsr_gguf_open_memory_ex(copy, cut, TSR_GGUF_OPEN_ANY_TYPE, &g, err, sizeof err) < 0);
        free(copy);
    }
    free(buf);
}

static void test_truncated_every_byte(void **state)
{
    (void)state;
    size_t len;
    char *buf = tsr_test_read_file(tsr_test_model_path("stories260K.gguf"), &len);
    assert_non_null(buf);
    const size_t header = 14176; /* data offset: header + metadata + tensor infos */
    char err[512];
    for (size_t cut = 0; cut < header + 64; cut++) {
        /* A fresh exact-size copy, so ASan sees any read past the cut. */
        char *copy = malloc(cut ? cut : 1);
        memcpy(copy, buf, cut);
        tsr_gguf *g = NULL;
        err[0] = 0;
        int rc = tsr_gguf_open_memory(copy, cut, &g, err, sizeof err);
        if (rc == 0) fail_msg("a file truncated to %zu bytes was accepted", cut);
        if (!err[0]) fail_msg("truncated to %zu bytes: no error message", cut);
        assert_null(g);
        free(copy);
    }
    /* Truncated inside the data section: the tensor that runs past the end is named. */
    tsr_gguf *g = NULL;
    assert_true(tsr_gguf_open_memory(buf, len - 1, &g, err, sizeof err) < 0);
    assert_non_null(strstr(err, "tensor"));
    assert_true(tsr_gguf_open_memory(buf, len, &g, err, sizeof err) == 0);
    tsr_gguf_close(g);
    free(buf);
}

static void test_random_flips(void **state)
{
    (void)state;
    size_t len;
    char *orig = tsr_test_read_file(tsr_test_model_path("stories260K.gguf"), &len);
    assert_non_null(orig);
    char *buf = malloc(len);
    const size_t header = 14176;
    uint64_t x = 0x9e3779b97f4a7c15ull;
    int n_ok = 0, n_err = 0;
    const int n_trials = 3000;
    char err[512];
    for (int trial = 0; trial < n_trials; trial++) {
        memcpy(buf, orig, len);
        int flips = 1 + trial % 4;
        for (int k = 0; k < flips; k++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            size_t pos = (size_t)(x % header);
            /* Bias towards the small fixed header and counts, where flips hurt most. */
            if (trial % 3 == 0) pos = (size_t)(x % 64);
            buf[pos] ^= (char)(1u << ((x >> 32) % 8));
        }
        tsr_gguf *g = NULL;
        if (tsr_gguf_open_memory(buf, len, &g, err, sizeof err) == 0) {
            exercise(g);
            tsr_gguf_close(g);
            n_ok++;
        } else {
            assert_true(err[0] != 0);
            n_err++;
        }
    }
    /* Both outcomes must occur, or the test is not testing anything. */
    print_message("random flips: %d opened (and were exercised), %d rejected\n", n_ok, n_err);
    assert_true(n_err > 100);
    assert_true(n_ok > 100);
    free(buf);
    free(orig);
}

static void test_bad_files(void **state)
{
    (void)state;
    char err[512];
    tsr_gguf *g;
    assert_int_equal(tsr_gguf_open("/nonexistent/x.gguf", &g, err, sizeof err), TSR_GGUF_ERR_IO);
    assert_non_null(strstr(err, "/nonexistent/x.gguf"));
    const char notgguf[32] = "GGML not a gguf file at all....";
    assert_true(tsr_gguf_open_memory(notgguf, sizeof notgguf, &g, err, sizeof err) < 0);
    assert_non_null(strstr(err, "magic"));
    /* Version 4, huge counts, bad alignment. */
    uint8_t h[64] = {'G', 'G', 'U', 'F', 4, 0, 0, 0};
    assert_true(tsr_gguf_open_memory(h, sizeof h, &g, err, sizeof err) < 0);
    assert_non_null(strstr(err, "version"));
    h[4] = 3;
    memset(h + 8, 0xff, 8); /* n_tensors */
    assert_true(tsr_gguf_open_memory(h, sizeof h, &g, err, sizeof err) < 0);
    assert_non_null(strstr(err, "tensor count"));
    tsr_gguf_writer *w = tsr_gguf_writer_new();
    tsr_gguf_writer_set_int(w, "general.alignment", TSR_GGUF_UINT32, 33);
    char path[] = "/tmp/tsr_gguf_bad_XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    assert_int_equal(tsr_gguf_writer_save(w, path, err, sizeof err), 0);
    tsr_gguf_writer_free(w);
    assert_true(tsr_gguf_open(path, &g, err, sizeof err) < 0);
    assert_non_null(strstr(err, "general.alignment"));
    unlink(path);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stories_header),   cmocka_unit_test(test_all_files_open),
        cmocka_unit_test(test_writer_roundtrip), cmocka_unit_test(test_truncated_every_byte),
        cmocka_unit_test(test_random_flips),     cmocka_unit_test(test_bad_files),
        cmocka_unit_test(test_any_type),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
