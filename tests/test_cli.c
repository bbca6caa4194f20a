/*
 * test_cli.c — the `tessera` command line, run as a user would (a real process).
 *
 * Usage errors exit 2 with a message; every subcommand's --help documents its flags;
 * generate --json carries the documented fields and reproduces the reference greedy
 * output; tokenize prints the reference ids; mkmodel writes deterministic models that
 * load and generate deterministically under a seed.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/quant.h"
#include "shard/gguf.h"
#include "tests/util.h"

static const char *bin = TSR_TESSERA_BIN;

static int run(char **out, char **err, const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(cmd, sizeof cmd, "%s ", bin);
    vsnprintf(cmd + n, sizeof cmd - (size_t)n, fmt, ap);
    va_end(ap);
    return tsr_test_run(cmd, out, err);
}

static void expect_usage_error(const char *args, const char *needle)
{
    char *out, *err;
    int rc = run(&out, &err, "%s", args);
    if (rc != 2)
        fail_msg("'tessera %s': expected exit status 2, got %d (stderr: %s)", args, rc, err);
    if (needle && !strstr(err, needle))
        fail_msg("'tessera %s': stderr should mention '%s', got: %s", args, needle, err);
    free(out);
    free(err);
}

static void test_usage_errors(void **state)
{
    (void)state;
    const char *m = tsr_test_model_path("stories260K.gguf");
    char args[1024];
    expect_usage_error("", "usage");
    expect_usage_error("frobnicate", "unknown command");
    /* --listen: a port in 0..65535 or a usage error (never a wrapped or default port). */
    const char *bad_listen[] = {
        "127.0.0.1:65537", "127.0.0.1:99999", "127.0.0.1:",      ":50051",
        "127.0.0.1",       "127.0.0.1:-1",    "127.0.0.1:+80",   "127.0.0.1:80x",
        "::1:80",          "[::1:80",         "127.0.0.1:000000"};
    for (size_t i = 0; i < sizeof bad_listen / sizeof *bad_listen; i++) {
        snprintf(args, sizeof args, "serve -m %s --listen '%s'", m, bad_listen[i]);
        expect_usage_error(args, "--listen");
    }
    expect_usage_error("generate --bogus", "unknown flag");
    snprintf(args, sizeof args, "generate -m %s", m);
    expect_usage_error(args, "-p");
    snprintf(args, sizeof args, "generate -m %s -p hi -n abc", m);
    expect_usage_error(args, "--max-tokens");
    snprintf(args, sizeof args, "generate -m %s -p hi --temperature -1", m);
    expect_usage_error(args, "temperature");
    snprintf(args, sizeof args, "generate -m %s -p hi --top-p 0", m);
    expect_usage_error(args, "top_p");
    snprintf(args, sizeof args, "generate -m %s -p hi -t 0", m);
    expect_usage_error(args, "--threads");
    /* Engine flags: parsed once (cli.c) for serve and batch. */
    snprintf(args, sizeof args, "serve -m %s --max-seqs 0", m);
    expect_usage_error(args, "--max-seqs");
    snprintf(args, sizeof args, "batch -m %s -i x -o y --max-batch-tokens 12x", m);
    expect_usage_error(args, "--max-batch-tokens");
    snprintf(args, sizeof args, "batch -m %s -i x -o y --kv-memory -1", m);
    expect_usage_error(args, "--kv-memory");
    /* batch --coordinator: an address, and no local engine flags. */
    expect_usage_error("batch --coordinator nowhere -i x -o y", "--coordinator");
    expect_usage_error("batch --coordinator 127.0.0.1:1 -i x -o y -t 2", "--coordinator");
    expect_usage_error("batch --coordinator 127.0.0.1:1 -i x -o y --tls-cert c.pem", "--tls-key");
    expect_usage_error("batch -i x -o y --api-key-file k", "--coordinator");
    /* Security flags: one parser (cli.c) for serve and coordinator, one for the clients. */
    snprintf(args, sizeof args, "serve -m %s --listen 0.0.0.0:0", m);
    expect_usage_error(args, "without authentication");
    snprintf(args, sizeof args, "serve -m %s --tls-key k.pem", m);
    expect_usage_error(args, "--tls-cert and --tls-key go together");
    expect_usage_error("coordinator --listen 127.0.0.1:0 --tls-client-ca ca.pem",
                       "--tls-client-ca needs --tls-cert");
    expect_usage_error("coordinator --listen 127.0.0.1:0 --http 0.0.0.0:0",
                       "refusing to serve 0.0.0.0:0");
    expect_usage_error("ctl --tls-cert c.pem --tls-key k.pem status", "need --tls-ca");
    expect_usage_error("tokenize", "TEXT");
    expect_usage_error("inspect", "FILE");
    expect_usage_error("mkmodel -o /tmp/x.gguf", "--vocab-from");
    expect_usage_error("bench -n 0", "--gen-len");
}

static void test_help(void **state)
{
    (void)state;
    static const struct {
        const char *cmd;
        const char *flags[12];
    } cases[] = {
        {"generate",
         {"--model", "--prompt", "--max-tokens", "--temperature", "--top-k", "--top-p", "--min-p",
          "--seed", "--threads", "--json", "--stop", NULL}},
        {"tokenize", {"--model", "--no-bos", NULL}},
        {"inspect", {"--help", NULL}},
        {"mkmodel",
         {"--n-layer", "--n-embd", "--n-head", "--n-head-kv", "--n-ff", "--type", "--vocab-from",
          "--seed", NULL}},
        {"bench", {"--threads", "--prompt-len", "--gen-len", "--json", NULL}},
        {"serve",
         {"--api-key-file", "--admin-key-file", "--insecure-listen", "--tls-cert", "--tls-key",
          "--tls-client-ca", NULL}},
        {"coordinator",
         {"--api-key-file", "--admin-key-file", "--insecure-listen", "--tls-cert", "--tls-key",
          "--tls-client-ca", NULL}},
        {"ctl", {"--api-key-file", "--tls-ca", "--tls-cert", "--tls-key", NULL}},
        {"batch", {"--api-key-file", "--tls-ca", "--tls-cert", "--tls-key", NULL}},
    };
    char *out;
    assert_int_equal(run(&out, NULL, "--help"), 0);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        assert_non_null(strstr(out, cases[i].cmd));
    }
    free(out);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        assert_int_equal(run(&out, NULL, "%s --help", cases[i].cmd), 0);
        for (size_t k = 0; cases[i].flags[k]; k++)
            if (!strstr(out, cases[i].flags[k]))
                fail_msg("'tessera %s --help' does not document %s", cases[i].cmd,
                         cases[i].flags[k]);
        free(out);
    }
}

static void test_generate_json(void **state)
{
    (void)state;
    char *out, *err;
    int rc =
        run(&out, &err, "generate -m %s -p 'Once upon a time' -n 32 --temperature 0 --json -t 2",
            tsr_test_model_path("stories260K.gguf"));
    if (rc != 0) fail_msg("generate failed (%d): %s", rc, err);
    cJSON *o = cJSON_Parse(out);
    if (!o) fail_msg("generate --json printed no JSON: %s", out);
    const char *fields[] = {"prompt_ids",          "ids",          "text", "prefill_tokens_per_s",
                            "decode_tokens_per_s", "finish_reason"};
    for (size_t i = 0; i < 6; i++)
        if (!cJSON_GetObjectItem(o, fields[i])) fail_msg("--json lacks '%s': %s", fields[i], out);
    cJSON *pi = cJSON_GetObjectItem(o, "prompt_ids");
    int want_prompt[5] = {1, 403, 407, 261, 378};
    assert_int_equal(cJSON_GetArraySize(pi), 5);
    for (int i = 0; i < 5; i++)
        assert_int_equal(cJSON_GetArrayItem(pi, i)->valueint, want_prompt[i]);
    const char *text = cJSON_GetObjectItem(o, "text")->valuestring;
    const char *want =
        ", there was a little girl named Lily. She loved to play outside in the park. One day, "
        "she saw";
    if (strcmp(text, want) != 0) fail_msg("text:\n expected: %s\n got:      %s", want, text);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(o, "ids")), 32);
    assert_string_equal(cJSON_GetObjectItem(o, "finish_reason")->valuestring, "length");
    assert_true(cJSON_GetObjectItem(o, "decode_tokens_per_s")->valuedouble > 0);
    cJSON_Delete(o);
    free(out);
    free(err);

    /* Streaming text is the same text. */
    rc = run(&out, &err, "generate -m %s -p 'Once upon a time' -n 32 --temperature 0",
             tsr_test_model_path("stories260K.gguf"));
    assert_int_equal(rc, 0);
    if (strncmp(out, want, strlen(want)) != 0) fail_msg("streamed text: %s", out);
    free(out);
    free(err);

    /* A stop string ends generation before it; the string is not printed. */
    rc = run(&out, &err,
             "generate -m %s -p 'Once upon a time' -n 32 --temperature 0 --stop Lily --json",
             tsr_test_model_path("stories260K.gguf"));
    assert_int_equal(rc, 0);
    o = cJSON_Parse(out);
    assert_non_null(o);
    assert_string_equal(cJSON_GetObjectItem(o, "text")->valuestring,
                        ", there was a little girl named ");
    assert_string_equal(cJSON_GetObjectItem(o, "finish_reason")->valuestring, "stop");
    cJSON_Delete(o);
    free(out);
    free(err);
}

/* bench --json: its documented fields, and a roofline taken beside each decode: the median
 * bandwidth lies within its range, and the fraction is each decode over its own read (so
 * positive and finite whatever the host's drift). Tiny model, 3 reps: the 1 GiB probe is
 * most of its second. */
static void test_bench_json(void **state)
{
    (void)state;
    char *out, *err;
    int rc = run(&out, &err, "bench -m %s -t 2 -p 8 -n 8 -r 3 --json",
                 tsr_test_model_path("stories260K.gguf"));
    if (rc != 0) fail_msg("bench failed (%d): %s", rc, err);
    cJSON *o = cJSON_Parse(out);
    if (!o) fail_msg("bench --json printed no JSON: %s", out);
    const char *fields[] = {
        "prefill_tokens_per_s",  "decode_tokens_per_s",   "bytes_per_token",
        "mem_bw_gb_s",           "mem_bw_gb_s_min",       "mem_bw_gb_s_max",
        "roofline_tokens_per_s", "decode_roofline_ratio", "peak_rss_mib_leader"};
    double v[9];
    for (size_t i = 0; i < 9; i++) {
        const cJSON *f = cJSON_GetObjectItem(o, fields[i]);
        if (!cJSON_IsNumber(f)) fail_msg("--json lacks the number '%s': %s", fields[i], out);
        v[i] = f->valuedouble;
        if (!(v[i] > 0) || v[i] > 1e12)
            fail_msg("'%s' = %g, expected > 0: %s", fields[i], v[i], out);
    }
    if (!(v[4] <= v[3] && v[3] <= v[5]))
        fail_msg("bandwidth median %g outside its range %g-%g: %s", v[3], v[4], v[5], out);
    /* the roofline is the median read over the bytes a token reads */
    const double roof = v[3] * 1e9 / v[2];
    if (v[6] < roof * 0.999 || v[6] > roof * 1.001)
        fail_msg("roofline %g tok/s, expected %g (bandwidth / bytes per token)", v[6], roof);
    cJSON_Delete(o);
    free(out);
    free(err);
}

static void test_generate_seeded(void **state)
{
    (void)state;
    char *a, *b, *c;
    const char *m = tsr_test_model_path("stories260K.gguf");
    assert_int_equal(
        run(&a, NULL, "generate -m %s -p 'One day' -n 40 --temperature 1 --seed 7 --json", m), 0);
    assert_int_equal(
        run(&b, NULL, "generate -m %s -p 'One day' -n 40 --temperature 1 --seed 7 --json -t 1", m),
        0);
    assert_int_equal(
        run(&c, NULL, "generate -m %s -p 'One day' -n 40 --temperature 1 --seed 8 --json", m), 0);
    cJSON *ja = cJSON_Parse(a), *jb = cJSON_Parse(b), *jc = cJSON_Parse(c);
    char *ia = cJSON_PrintUnformatted(cJSON_GetObjectItem(ja, "ids"));
    char *ib = cJSON_PrintUnformatted(cJSON_GetObjectItem(jb, "ids"));
    char *ic = cJSON_PrintUnformatted(cJSON_GetObjectItem(jc, "ids"));
    if (strcmp(ia, ib) != 0) fail_msg("same seed, different output:\n %s\n %s", ia, ib);
    if (strcmp(ia, ic) == 0) fail_msg("seeds 7 and 8 gave the same 40 tokens: %s", ia);
    free(ia);
    free(ib);
    free(ic);
    cJSON_Delete(ja);
    cJSON_Delete(jb);
    cJSON_Delete(jc);
    free(a);
    free(b);
    free(c);
}

static void test_tokenize(void **state)
{
    (void)state;
    char *out;
    const char *m = tsr_test_model_path("stories260K.gguf");
    assert_int_equal(run(&out, NULL, "tokenize -m %s 'Hi how are you'", m), 0);
    assert_string_equal(out, "1 320 417 270 327 261 276 364\n");
    free(out);
    assert_int_equal(run(&out, NULL, "tokenize -m %s --no-bos 'Hi how are you'", m), 0);
    assert_string_equal(out, "320 417 270 327 261 276 364\n");
    free(out);
    /* Vocabulary-only GGUF. */
    assert_int_equal(run(&out, NULL, "tokenize -m %s --no-bos 'Hello world'",
                         tsr_test_model_path("vocab/ggml-vocab-gpt-2.gguf")),
                     0);
    assert_string_equal(out, "15496 995\n");
    free(out);
}

static void test_inspect(void **state)
{
    (void)state;
    char *out, *err;
    assert_int_equal(
        run(&out, NULL, "inspect %s", tsr_test_model_path("synthetic/synth-tiny-q4_k_m.gguf")), 0);
    assert_non_null(strstr(out, "general.architecture"));
    assert_non_null(strstr(out, "blk.1.ffn_down.weight"));
    assert_non_null(strstr(out, "Q6_K"));
    assert_non_null(strstr(out, "[256, 32000]"));
    free(out);
    /* Any tensor type: a copy with blk.0.attn_q a type Tessera cannot compute with
     * (IQ2_XXS, 66 bytes per 256 values: fits in the Q4_K bytes) and blk.1.attn_q a type id
     * ggml does not define. inspect prints it all and says what cannot run; loading it is
     * refused with the tensor and type named. */
    size_t len;
    char *data = tsr_test_read_file(tsr_test_model_path("synthetic/synth-tiny-q4_k_m.gguf"), &len);
    assert_non_null(data);
    static const struct {
        const char *name;
        uint32_t type;
    } patch[] = {{"blk.0.attn_q.weight", 16}, {"blk.1.attn_q.weight", 99}};
    for (size_t k = 0; k < 2; k++) {
        const size_t nl = strlen(patch[k].name);
        char *p = memmem(data, len, patch[k].name, nl); /* the first: tensor infos */
        assert_non_null(p);
        uint32_t n_dims;
        memcpy(&n_dims, p + nl, 4);
        assert_int_equal(n_dims, 2);
        memcpy(p + nl + 4 + 8 * n_dims, &patch[k].type, 4); /* after name, n_dims, ne[] */
    }
    char any[] = "/tmp/tsr_cli_any_XXXXXX";
    int afd = mkstemp(any);
    assert_true(write(afd, data, len) == (ssize_t)len);
    close(afd);
    free(data);
    assert_int_equal(run(&out, &err, "inspect %s", any), 0);
    if (!strstr(out, "IQ2_XXS") || !strstr(out, "id 99") ||
        !strstr(out, "tessera can run this file: no — tensor blk.0.attn_q.weight has type "
                     "IQ2_XXS"))
        fail_msg("inspect of a file with IQ2_XXS / unknown types: got\n%s", out);
    free(out);
    free(err);
    assert_int_equal(run(&out, &err, "generate -m %s -p hi -n 1", any), 1);
    if (!strstr(err, "blk.0.attn_q.weight") || !strstr(err, "IQ2_XXS"))
        fail_msg("generate on an IQ2_XXS file: expected the tensor and type named, got: %s", err);
    free(out);
    free(err);
    unlink(any);
    assert_int_equal(
        run(&out, NULL, "inspect %s", tsr_test_model_path("synthetic/synth-tiny-q5_k_m.gguf")), 0);
    assert_non_null(strstr(out, "Q5_K"));
    assert_non_null(strstr(out, "tessera can run this file: yes"));
    free(out);
    /* A corrupt file: exit 1 and a message naming the problem. */
    char path[] = "/tmp/tsr_cli_bad_XXXXXX";
    int fd = mkstemp(path);
    assert_true(write(fd, "GGUF\3\0\0\0", 8) == 8);
    close(fd);
    assert_int_equal(run(&out, &err, "inspect %s", path), 1);
    assert_non_null(strstr(err, "truncated"));
    free(out);
    free(err);
    unlink(path);
}

static void test_mkmodel(void **state)
{
    (void)state;
    char a[] = "/tmp/tsr_mk_a_XXXXXX", b[] = "/tmp/tsr_mk_b_XXXXXX";
    close(mkstemp(a));
    close(mkstemp(b));
    const char *vocab = tsr_test_model_path("stories260K.gguf");
    const char *shape = "--n-layer 3 --n-embd 64 --n-head 4 --n-head-kv 1 --n-ff 96";
    char *out, *err;
    static const char *types[] = {"F32",  "F16",  "BF16", "Q8_0",   "Q4_0",
                                  "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q5_K_S"};
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        assert_int_equal(run(NULL, &err, "mkmodel -o %s --vocab-from %s %s --type %s --seed 3", a,
                             vocab, shape, types[i]),
                         0);
        free(err);
        assert_int_equal(run(NULL, NULL, "mkmodel -o %s --vocab-from %s %s --type %s --seed 3", b,
                             vocab, shape, types[i]),
                         0);
        size_t la, lb;
        char *da = tsr_test_read_file(a, &la), *db = tsr_test_read_file(b, &lb);
        if (la != lb || memcmp(da, db, la) != 0)
            fail_msg("mkmodel %s is not deterministic", types[i]);
        free(da);
        free(db);
        /* It loads and generates, deterministically under a seed. */
        char *g1, *g2;
        int rc = run(&g1, &err,
                     "generate -m %s -p 'Once upon' -n 12 --temperature 0.9 --seed 5 --json", a);
        if (rc != 0) fail_msg("generate on mkmodel %s output failed: %s", types[i], err);
        free(err);
        assert_int_equal(
            run(&g2, NULL, "generate -m %s -p 'Once upon' -n 12 --temperature 0.9 --seed 5 --json",
                a),
            0);
        cJSON *j1 = cJSON_Parse(g1), *j2 = cJSON_Parse(g2);
        assert_non_null(j1);
        assert_non_null(j2);
        char *s1 = cJSON_PrintUnformatted(cJSON_GetObjectItem(j1, "ids"));
        char *s2 = cJSON_PrintUnformatted(cJSON_GetObjectItem(j2, "ids"));
        assert_string_equal(s1, s2);
        assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(j1, "ids")), 12);
        free(s1);
        free(s2);
        cJSON_Delete(j1);
        cJSON_Delete(j2);
        free(g1);
        free(g2);
    }
    /* The mixes give every tensor the type llama-quantize gave it in the synthetic files
     * (same shape: 2 layers, 256 wide, 4 heads / 2 KV heads, n_ff 768, tied head). */
    static const struct {
        const char *type, *file;
    } mixes[] = {
        {"Q2_K", "q2_k"}, {"Q3_K_M", "q3_k_m"}, {"Q4_K_M", "q4_k_m"}, {"Q5_K_M", "q5_k_m"}};
    for (size_t i = 0; i < sizeof mixes / sizeof mixes[0]; i++) {
        assert_int_equal(run(NULL, NULL,
                             "mkmodel -o %s --vocab-from %s --n-layer 2 --n-embd 256 --n-head 4 "
                             "--n-head-kv 2 --n-ff 768 --tied --type %s",
                             a, vocab, mixes[i].type),
                         0);
        char rel[96], e[512];
        snprintf(rel, sizeof rel, "synthetic/synth-tiny-%s.gguf", mixes[i].file);
        tsr_gguf *mine, *ref;
        assert_int_equal(tsr_gguf_open(a, &mine, e, sizeof e), 0);
        assert_int_equal(tsr_gguf_open(tsr_test_model_path(rel), &ref, e, sizeof e), 0);
        assert_int_equal(tsr_gguf_n_tensors(mine), tsr_gguf_n_tensors(ref));
        for (int64_t k = 0; k < tsr_gguf_n_tensors(ref); k++) {
            const tsr_gguf_tensor *tr = tsr_gguf_tensor_at(ref, k);
            const tsr_gguf_tensor *tm = tsr_gguf_find_tensor(mine, tr->name);
            if (!tm || tm->type != tr->type)
                fail_msg("mkmodel --type %s: %s expected %s (llama-quantize) got %s", mixes[i].type,
                         tr->name, tsr_type_name(tr->type),
                         tm ? tsr_type_name(tm->type) : "(missing)");
        }
        tsr_gguf_close(mine);
        tsr_gguf_close(ref);
    }
    /* n_ff 96 cannot hold Q4_K rows (256): reported fallback, still a valid model. */
    assert_int_equal(
        run(&out, &err, "mkmodel -o %s --vocab-from %s %s --type Q4_K", a, vocab, shape), 0);
    assert_non_null(strstr(err, "using"));
    free(out);
    free(err);
    assert_int_equal(
        run(&out, &err, "mkmodel -o %s --vocab-from %s --n-embd 60 --n-head 7", a, vocab), 1);
    assert_non_null(strstr(err, "n_head"));
    free(out);
    free(err);
    unlink(a);
    unlink(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_usage_errors),  cmocka_unit_test(test_help),
        cmocka_unit_test(test_generate_json), cmocka_unit_test(test_generate_seeded),
        cmocka_unit_test(test_tokenize),      cmocka_unit_test(test_inspect),
        cmocka_unit_test(test_mkmodel),       cmocka_unit_test(test_bench_json),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
