/*
 * test_batch.c — coordinator/batch: key sets, request-line parsing (both line formats,
 * every kind of bad line), deterministic result lines, the output scan that makes a run
 * resumable (a torn last line is cut, a foreign line refused), the line reader's length
 * limit and the merge of shard outputs (each key once, every input line answered).
 * No model: the end-to-end runs are tests/python/test_batch.py (ctest batch_e2e).
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

#include "coordinator/batch.h"
#include "tests/util.h"

static char g_dir[256];

static const char *tmp_path(const char *name)
{
    static char buf[4][512];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", g_dir, name);
    return buf[k];
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_keyset(void **state)
{
    (void)state;
    tsr_batch_keyset *s = tsr_batch_keyset_new();
    assert_non_null(s);
    char k[32];
    for (int i = 0; i < 5000; i++) {
        int n = snprintf(k, sizeof k, "id-%d", i);
        assert_int_equal(tsr_batch_keyset_add(s, k, (size_t)n), 1);
    }
    assert_int_equal(tsr_batch_keyset_add(s, "id-42", 5), 0);
    assert_true(tsr_batch_keyset_has(s, "id-4999", 7));
    assert_false(tsr_batch_keyset_has(s, "id-5000", 7));
    assert_false(tsr_batch_keyset_has(s, "id-4", 3) && !tsr_batch_keyset_has(s, "id-4", 4));
    assert_int_equal(tsr_batch_keyset_count(s), 5000);
    /* ~16 bytes of table per key at load <= 1/2, plus the bytes: well under 1 KiB/key. */
    size_t b = tsr_batch_keyset_bytes(s);
    if (b > 5000 * 100) fail_msg("key set of 5000 short ids holds %zu bytes", b);
    char lk[64];
    size_t n = tsr_batch_line_key(12, lk, sizeof lk);
    assert_int_equal(tsr_batch_keyset_add(s, lk, n), 1);
    assert_false(tsr_batch_keyset_has(s, "line:12", 7));
    tsr_batch_keyset_free(s);
}

static int parse(const char *line, tsr_batch_request *rq, const char **code, char *err)
{
    return tsr_batch_parse_line(line, strlen(line), rq, code, err, 512);
}

static void test_parse_good(void **state)
{
    (void)state;
    tsr_batch_request rq;
    const char *code;
    char err[512];
    int rc = parse("{\"custom_id\":\"a\",\"method\":\"POST\",\"url\":\"/v1/completions\","
                   "\"body\":{\"model\":\"m\",\"prompt\":\"Hello\",\"max_tokens\":7,"
                   "\"temperature\":0.5,\"top_k\":-1,\"top_p\":0.9,\"min_p\":0.1,\"seed\":42,"
                   "\"stop\":[\".\",\"!\"],\"stop_token_ids\":[2],\"logprobs\":3,"
                   "\"presence_penalty\":0.5,\"ignore_eos\":true,\"n\":1,\"stream\":false}}",
                   &rq, &code, err);
    if (rc != 0) fail_msg("expected a good line, got: %s", err);
    assert_string_equal(rq.custom_id, "a");
    assert_int_equal(rq.kind, TSR_BATCH_COMPLETION);
    assert_string_equal(rq.prompt, "Hello");
    assert_string_equal(rq.model, "m");
    assert_int_equal(rq.gen.max_tokens, 7);
    assert_true(rq.gen.sampling.temperature == 0.5f);
    assert_int_equal(rq.gen.sampling.top_k, 0);
    assert_true(rq.has_seed && rq.gen.sampling.seed == 42);
    assert_int_equal(rq.gen.n_stop, 2);
    assert_string_equal(rq.gen.stop[1], "!");
    assert_int_equal(rq.gen.n_stop_ids, 1);
    assert_true(rq.want_logprobs && rq.logprobs == 3);
    assert_true(rq.gen.ignore_eos);
    tsr_batch_request_free(&rq);

    /* Plain line, token-id prompt, defaults (OpenAI's: 16 tokens, temperature 1). */
    rc = parse("{\"custom_id\":\"b\",\"prompt\":[1,2,3]}", &rq, &code, err);
    if (rc != 0) fail_msg("expected a good line, got: %s", err);
    assert_int_equal(rq.n_prompt_ids, 3);
    assert_int_equal(rq.gen.max_tokens, TSR_BATCH_DEFAULT_MAX_TOKENS);
    assert_true(rq.gen.sampling.temperature == 1.0f);
    assert_false(rq.has_seed);
    assert_true(rq.add_special);
    tsr_batch_request_free(&rq);

    rc = parse("{\"custom_id\":\"c\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\","
               "\"body\":{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
               "\"logprobs\":true,\"top_logprobs\":2,\"max_completion_tokens\":5}}",
               &rq, &code, err);
    if (rc != 0) fail_msg("expected a good chat line, got: %s", err);
    assert_int_equal(rq.kind, TSR_BATCH_CHAT);
    assert_non_null(strstr(rq.messages_json, "\"user\""));
    assert_int_equal(rq.logprobs, 2);
    assert_int_equal(rq.gen.max_tokens, 5);
    tsr_batch_request_free(&rq);
}

static void expect_bad(const char *line, const char *want_code, const char *needle,
                       const char *want_cid)
{
    tsr_batch_request rq;
    const char *code;
    char err[512];
    int rc = parse(line, &rq, &code, err);
    if (rc != TSR_BATCH_EINVAL)
        fail_msg("line %s: expected an error with '%s', got status %d", line, needle, rc);
    if (strcmp(code, want_code) || !strstr(err, needle))
        fail_msg("line %s:\n  expected code %s and a message with '%s'\n  got %s: %s", line,
                 want_code, needle, code, err);
    if (want_cid && (!rq.custom_id || strcmp(rq.custom_id, want_cid)))
        fail_msg("line %s: the error should keep custom_id %s, got %s", line, want_cid,
                 rq.custom_id ? rq.custom_id : "(none)");
    if (!want_cid) assert_null(rq.custom_id);
    tsr_batch_request_free(&rq);
}

static void test_parse_bad(void **state)
{
    (void)state;
    expect_bad("not json", "invalid_json", "not valid JSON", NULL);
    expect_bad("{\"custom_id\":\"a\",\"prompt\":\"x\"} trailing", "invalid_json", "after", NULL);
    expect_bad("[1,2]", "invalid_request", "JSON object", NULL);
    expect_bad("{\"prompt\":\"x\"}", "invalid_request", "custom_id is missing", NULL);
    expect_bad("{\"custom_id\":7,\"prompt\":\"x\"}", "invalid_request", "custom_id must", NULL);
    expect_bad("{\"custom_id\":\"a\\u0001b\",\"prompt\":\"x\"}", "invalid_request",
               "control characters", NULL);
    expect_bad("{\"custom_id\":\"a\",\"prompt\":\"x\",\"temprature\":1}", "invalid_request",
               "unknown field 'temprature'", "a");
    expect_bad("{\"custom_id\":\"a\",\"method\":\"POST\",\"url\":\"/v1/completions\","
               "\"body\":{\"prompt\":\"x\"},\"extra\":1}",
               "invalid_request", "unknown field 'extra'", "a");
    expect_bad("{\"custom_id\":\"a\",\"method\":\"GET\",\"url\":\"/v1/completions\","
               "\"body\":{\"prompt\":\"x\"}}",
               "invalid_request", "POST", "a");
    expect_bad("{\"custom_id\":\"a\",\"url\":\"/v1/embeddings\",\"body\":{}}", "invalid_request",
               "not supported", "a");
    expect_bad("{\"custom_id\":\"a\",\"prompt\":\"\"}", "invalid_request", "empty", "a");
    expect_bad("{\"custom_id\":\"a\"}", "invalid_request", "prompt is missing", "a");
    expect_bad("{\"custom_id\":\"a\",\"prompt\":\"x\",\"max_tokens\":0}", "invalid_request",
               "max_tokens", "a");
    expect_bad("{\"custom_id\":\"a\",\"prompt\":\"x\",\"max_tokens\":1.5}", "invalid_request",
               "integer", "a");
    expect_bad("{\"custom_id\":\"a\",\"prompt\":\"x\",\"temperature\":-1}", "invalid_request",
               "temperature", "a");
    expect_bad("{\"custom_id\":\"a\",\"prompt\":\"x\",\"top_p\":0}", "invalid_request", "top_p",
               "a");
    expect_bad("{\"custom_id\":\"a\",\"prompt\":\"x\",\"seed\":-3}", "invalid_request", "seed",
               "a");
    expect_bad("{\"custom_id\":\"a\",\"prompt\":\"x\",\"stop\":[\"\"]}", "invalid_request", "stop",
               "a");
    expect_bad("{\"custom_id\":\"a\",\"prompt\":\"x\",\"logprobs\":21}", "invalid_request",
               "logprobs", "a");
    expect_bad("{\"custom_id\":\"a\",\"prompt\":\"x\",\"n\":2}", "invalid_request", "n:", "a");
    expect_bad("{\"custom_id\":\"a\",\"prompt\":\"x\",\"stream\":true}", "invalid_request",
               "stream", "a");
    expect_bad("{\"custom_id\":\"a\",\"prompt\":[\"x\",\"y\"]}", "invalid_request", "prompt", "a");
    expect_bad("{\"custom_id\":\"a\",\"url\":\"/v1/chat/completions\",\"body\":{\"messages\":[]}}",
               "invalid_request", "messages", "a");
    expect_bad("{\"custom_id\":\"a\",\"url\":\"/v1/chat/completions\",\"body\":{\"messages\":"
               "[{\"role\":\"user\",\"content\":\"x\"}],\"prompt\":\"x\"}}",
               "invalid_request", "unknown field 'prompt'", "a");
}

static void test_input_key(void **state)
{
    (void)state;
    char *k;
    size_t n;
    assert_int_equal(tsr_batch_input_key("{\"custom_id\":\"zz\",\"x\":1}", 24, 5, &k, &n), 0);
    assert_string_equal(k, "zz");
    free(k);
    assert_int_equal(tsr_batch_input_key("garbage", 7, 5, &k, &n), 0);
    char want[64];
    size_t wn = tsr_batch_line_key(5, want, sizeof want);
    assert_int_equal(n, wn);
    assert_memory_equal(k, want, n);
    free(k);
}

static void test_format(void **state)
{
    (void)state;
    int32_t ids[] = {5, 6};
    tsr_batch_result r = {.custom_id = "q1",
                          .model = "m",
                          .text = "a\0b",
                          .text_len = 3,
                          .ids = ids,
                          .n_ids = 2,
                          .finish_reason = TSR_FINISH_EOS,
                          .n_prompt_tokens = 4};
    char *a, *b;
    size_t na, nb;
    assert_int_equal(tsr_batch_format_result(&r, &a, &na), 0);
    assert_int_equal(tsr_batch_format_result(&r, &b, &nb), 0);
    assert_int_equal(na, nb);
    assert_memory_equal(a, b, na); /* deterministic: outputs of two runs compare as sets */
    assert_int_equal(a[na - 1], '\n');
    assert_null(memchr(a, '\n', na - 1));
    const char *want[] = {"\"custom_id\":\"q1\"",
                          "\"status_code\":200",
                          "\"text\":\"a\xef\xbf\xbd"
                          "b\"",
                          "\"finish_reason\":\"stop\"",
                          "\"token_ids\":[5,6]",
                          "\"total_tokens\":6",
                          "\"error\":null",
                          "\"object\":\"text_completion\""};
    for (size_t i = 0; i < sizeof want / sizeof *want; i++)
        if (!strstr(a, want[i])) fail_msg("result line lacks %s:\n%s", want[i], a);
    free(a);
    free(b);
    assert_int_equal(tsr_batch_format_error(NULL, 9, "invalid_json", "bad \"x\"", &a, &na), 0);
    if (!strstr(a, "\"custom_id\":null") || !strstr(a, "\"line\":9") ||
        !strstr(a, "\"response\":null") || !strstr(a, "bad \\\"x\\\""))
        fail_msg("error line: %s", a);
    free(a);
}

static void test_reader_limit(void **state)
{
    (void)state;
    const char *p = tmp_path("reader.jsonl");
    FILE *f = fopen(p, "wb");
    fputs("short\n", f);
    for (int i = 0; i < 1000; i++) fputc('x', f);
    fputs("\nlast", f);
    fclose(f);
    f = fopen(p, "rb");
    tsr_batch_reader r;
    assert_int_equal(tsr_batch_reader_init(&r, f, 100), 0);
    assert_int_equal(tsr_batch_reader_next(&r), 1);
    assert_string_equal(r.buf, "short");
    assert_int_equal(tsr_batch_reader_next(&r), 1);
    assert_true(r.too_long);
    assert_int_equal(r.line_no, 2);
    assert_int_equal(tsr_batch_reader_next(&r), 1);
    assert_false(r.too_long);
    assert_string_equal(r.buf, "last");
    assert_int_equal(tsr_batch_reader_next(&r), 0);
    tsr_batch_reader_free(&r);
    fclose(f);
}

static void test_scan_output(void **state)
{
    (void)state;
    char err[512];
    uint64_t n, torn;
    const char *p = tmp_path("out.jsonl");
    const char *good = "{\"custom_id\":\"a\",\"response\":{},\"error\":null}\n"
                       "{\"custom_id\":null,\"response\":null,\"error\":{},\"line\":7}\n";
    /* A torn last line is cut away; the complete ones are done. */
    char buf[1024];
    snprintf(buf, sizeof buf, "%s{\"custom_id\":\"b\",\"resp", good);
    write_file(p, buf);
    tsr_batch_keyset *s = tsr_batch_keyset_new();
    int rc = tsr_batch_scan_output(p, true, s, &n, &torn, err, sizeof err);
    if (rc != 0) fail_msg("scan: %s", err);
    assert_int_equal(n, 2);
    assert_int_equal(torn, strlen("{\"custom_id\":\"b\",\"resp"));
    size_t len;
    char *back = tsr_test_read_file(p, &len);
    assert_string_equal(back, good);
    free(back);
    assert_true(tsr_batch_keyset_has(s, "a", 1));
    char lk[64];
    size_t lkn = tsr_batch_line_key(7, lk, sizeof lk);
    assert_true(tsr_batch_keyset_has(s, lk, lkn));
    assert_false(tsr_batch_keyset_has(s, "b", 1));
    tsr_batch_keyset_free(s);

    /* A complete line without its newline is torn too (the newline is the commit). */
    snprintf(buf, sizeof buf, "%s{\"custom_id\":\"b\",\"error\":null}", good);
    write_file(p, buf);
    s = tsr_batch_keyset_new();
    assert_int_equal(tsr_batch_scan_output(p, true, s, &n, &torn, err, sizeof err), 0);
    assert_int_equal(n, 2);
    tsr_batch_keyset_free(s);

    /* Without truncation (merge), a torn line is an error. */
    write_file(p, "{\"custom_id\":\"a\",\"error\":null}\n{\"cus");
    s = tsr_batch_keyset_new();
    rc = tsr_batch_scan_output(p, false, s, &n, &torn, err, sizeof err);
    assert_int_equal(rc, TSR_BATCH_ECORRUPT);
    assert_non_null(strstr(err, "torn"));
    tsr_batch_keyset_free(s);

    /* A foreign line before the end: refused, the file left alone. */
    write_file(p, "hello\n{\"custom_id\":\"a\",\"error\":null}\n");
    s = tsr_batch_keyset_new();
    rc = tsr_batch_scan_output(p, true, s, &n, &torn, err, sizeof err);
    if (rc != TSR_BATCH_ECORRUPT || !strstr(err, "not written by tessera batch"))
        fail_msg("expected ECORRUPT naming a foreign file, got %d: %s", rc, err);
    tsr_batch_keyset_free(s);

    /* A key twice. */
    write_file(p, "{\"custom_id\":\"a\",\"error\":null}\n{\"custom_id\":\"a\",\"error\":null}\n");
    s = tsr_batch_keyset_new();
    rc = tsr_batch_scan_output(p, true, s, &n, &torn, err, sizeof err);
    assert_int_equal(rc, TSR_BATCH_ECORRUPT);
    assert_non_null(strstr(err, "twice"));
    tsr_batch_keyset_free(s);

    /* A missing file is an empty output. */
    s = tsr_batch_keyset_new();
    assert_int_equal(
        tsr_batch_scan_output(tmp_path("nope.jsonl"), true, s, &n, &torn, err, sizeof err), 0);
    assert_int_equal(n, 0);
    tsr_batch_keyset_free(s);
}

static void test_out_append(void **state)
{
    (void)state;
    const char *p = tmp_path("append.jsonl");
    unlink(p);
    char err[512];
    tsr_batch_out o;
    assert_int_equal(tsr_batch_out_open(&o, p, err, sizeof err), 0);
    assert_int_equal(tsr_batch_out_add(&o, "{\"custom_id\":\"a\"}\n", 18), 0);
    assert_int_equal(tsr_batch_out_flush(&o, err, sizeof err), 0);
    assert_int_equal(tsr_batch_out_add(&o, "{\"custom_id\":\"b\"}\n", 18), 0);
    assert_int_equal(tsr_batch_out_close(&o, err, sizeof err), 0);
    assert_int_equal(o.n_lines_written, 2);
    size_t len;
    char *back = tsr_test_read_file(p, &len);
    assert_string_equal(back, "{\"custom_id\":\"a\"}\n{\"custom_id\":\"b\"}\n");
    free(back);
}

static void test_merge(void **state)
{
    (void)state;
    char err[512];
    uint64_t n;
    const char *a = tmp_path("s0.jsonl"), *b = tmp_path("s1.jsonl");
    write_file(a, "{\"custom_id\":\"x\",\"error\":null}\n"
                  "{\"custom_id\":null,\"error\":{},\"line\":3}\n");
    write_file(b, "{\"custom_id\":\"y\",\"error\":null}\n");
    const char *in = tmp_path("in.jsonl");
    write_file(in, "{\"custom_id\":\"x\"}\n{\"custom_id\":\"y\"}\nbroken\n\n");
    const char *out = tmp_path("merged.jsonl");
    const char *ins[] = {a, b, a};
    int rc = tsr_batch_merge(out, ins, 2, in, &n, err, sizeof err);
    if (rc != 0) fail_msg("merge: %s", err);
    assert_int_equal(n, 3);
    size_t len;
    char *back = tsr_test_read_file(out, &len);
    assert_non_null(strstr(back, "\"y\""));
    free(back);
    unlink(out);
    /* The same shard twice: a key twice. */
    rc = tsr_batch_merge(out, ins, 3, NULL, &n, err, sizeof err);
    if (rc != TSR_BATCH_EDUP || !strstr(err, "twice"))
        fail_msg("expected EDUP, got %d: %s", rc, err);
    assert_int_equal(access(out, F_OK), -1);
    /* A shard missing: an input line without output. */
    rc = tsr_batch_merge(out, ins, 1, in, &n, err, sizeof err);
    if (rc != TSR_BATCH_EMISSING || !strstr(err, "line 2"))
        fail_msg("expected EMISSING naming line 2, got %d: %s", rc, err);
    assert_int_equal(access(out, F_OK), -1);
}

int main(void)
{
    snprintf(g_dir, sizeof g_dir, "/tmp/tsr-test-batch-XXXXXX");
    if (!mkdtemp(g_dir)) return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keyset),      cmocka_unit_test(test_parse_good),
        cmocka_unit_test(test_parse_bad),   cmocka_unit_test(test_input_key),
        cmocka_unit_test(test_format),      cmocka_unit_test(test_reader_limit),
        cmocka_unit_test(test_scan_output), cmocka_unit_test(test_out_append),
        cmocka_unit_test(test_merge),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    return rc;
}
