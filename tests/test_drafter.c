/*
 * test_drafter.c — the drafters of coordinator/drafter.h.
 *
 * n-gram lookup on hand-made histories; the draft model against an independent greedy
 * computation with the plain single-sequence forward pass (several k, interleaved
 * sequences, rollbacks, histories that change under it, a history longer than a batch);
 * its acceptance along the target's greedy path (stories260K with its Q8_0 copy, a 4-layer
 * cut and itself as drafts); vocabulary mismatches refused with a message; KV pool
 * exhaustion; the oracle.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "coordinator/drafter.h"
#include "shard/gguf.h"
#include "shard/mkmodel.h"
#include "shard/vocab.h"
#include "tests/util.h"
#include "worker/model.h"

#define TARGET_PATH "stories260K.gguf"
#define Q8_PATH     "derived/stories260K-q8_0.gguf"
#define LAYER4_PATH "derived/stories260K-4layer-draft.gguf"
#define PATH_LEN    100 /* target greedy tokens after BOS */
#define REF_CTX     512
#define MAX_K       16

/* ---- helpers ---- */

static void fmt_tokens(char *buf, size_t cap, const int32_t *t, int n)
{
    size_t o = 0;
    buf[0] = 0;
    for (int i = 0; i < n && o + 16 < cap; i++)
        o += (size_t)snprintf(buf + o, cap - o, "%s%d", i ? " " : "", t[i]);
}

/* Fails with both sequences printed unless got[0..n_got) == exp[0..n_exp). */
static void expect_tokens(const char *what, const int32_t *exp, int n_exp, const int32_t *got,
                          int n_got)
{
    if (n_exp == n_got && (n_exp == 0 || memcmp(exp, got, sizeof(int32_t) * n_exp) == 0)) return;
    char e[2048], g[2048];
    fmt_tokens(e, sizeof e, exp, n_exp);
    fmt_tokens(g, sizeof g, got, n_got < 0 ? 0 : n_got);
    fail_msg("%s: expected %d tokens [%s], got %d [%s]", what, n_exp, e, n_got, g);
}

/* BOS + PATH_LEN greedy tokens of the target. */
static void target_path(int32_t *path)
{
    tsr_test_model t;
    char err[512];
    tsr_test_model_open(&t, tsr_test_model_path(TARGET_PATH), REF_CTX, 64, 1, TSR_KV_F32);
    tsr_vocab *v;
    if (tsr_vocab_load(t.g, &v, err, sizeof err) != 0) fail_msg("vocab: %s", err);
    path[0] = tsr_vocab_bos(v);
    tsr_vocab_free(v);
    tsr_test_greedy(&t, path, 1, PATH_LEN, path + 1, NULL);
    tsr_test_model_close(&t);
}

static uint32_t lcg_next(uint32_t *s)
{
    *s = *s * 1664525u + 1013904223u;
    return *s >> 8;
}

static void random_tokens(int32_t *t, int n, uint32_t seed, int32_t n_vocab)
{
    for (int i = 0; i < n; i++) t[i] = (int32_t)(lcg_next(&seed) % (uint32_t)n_vocab);
}

/* Propose and compare with the independent greedy continuation. */
static void propose_check(tsr_drafter *d, tsr_test_model *ref, uint64_t seq, const int32_t *hist,
                          int32_t n, int32_t k, const char *what)
{
    char err[512] = "", label[256];
    int32_t got[MAX_K], exp[MAX_K];
    int r = d->vt->propose(d, seq, hist, n, k, got, err, sizeof err);
    if (r < 0) fail_msg("%s: propose failed: %s", what, err);
    tsr_test_greedy(ref, hist, n, k, exp, NULL);
    snprintf(label, sizeof label, "%s (seq %llu, history %d, k %d)", what, (unsigned long long)seq,
             n, k);
    expect_tokens(label, exp, k, got, r);
}

static tsr_drafter *draft_new(const char *rel, const tsr_gguf *target, int32_t n_blocks)
{
    char err[512] = "";
    tsr_drafter *d = NULL;
    if (tsr_drafter_model_new(tsr_test_model_path(rel), target, n_blocks, 1, &d, err, sizeof err) !=
        0)
        fail_msg("draft model %s: %s", rel, err);
    return d;
}

/* ---- n-gram ---- */

static void ngram_expect(int32_t min_n, int32_t max_n, const int32_t *hist, int n, int k,
                         const int32_t *exp, int n_exp, const char *what)
{
    char err[256] = "";
    tsr_drafter *d = NULL;
    assert_int_equal(tsr_drafter_ngram_new(min_n, max_n, &d, err, sizeof err), 0);
    assert_string_equal(d->vt->name, "ngram");
    int32_t out[MAX_K];
    int r = d->vt->propose(d, 7, hist, n, k, out, err, sizeof err);
    if (r < 0) fail_msg("%s: propose failed: %s", what, err);
    expect_tokens(what, exp, n_exp, out, r);
    /* stateless: rollback and release change nothing */
    d->vt->rollback(d, 7, 1);
    d->vt->release(d, 7);
    r = d->vt->propose(d, 7, hist, n, k, out, err, sizeof err);
    expect_tokens(what, exp, n_exp, out, r);
    tsr_drafter_free(d);
}

static void test_ngram(void **state)
{
    (void)state;
    {
        const int32_t h[] = {1, 2, 3, 4, 1, 2, 3};
        const int32_t e[] = {4, 1, 2, 3};
        ngram_expect(1, 3, h, 7, 5, e, 4, "repeat, stops at the history end");
        ngram_expect(1, 3, h, 7, 2, e, 2, "repeat, k limits");
        ngram_expect(1, 3, h, 7, 0, NULL, 0, "k 0");
    }
    {
        const int32_t h[] = {1, 2, 3, 4, 5};
        ngram_expect(1, 3, h, 5, 4, NULL, 0, "no repeat");
        ngram_expect(1, 3, h, 1, 4, NULL, 0, "one token");
        ngram_expect(1, 3, h, 0, 4, NULL, 0, "empty history");
    }
    {
        const int32_t h[] = {7, 7, 7, 7};
        const int32_t e[] = {7};
        ngram_expect(2, 2, h, 4, 4, e, 1, "overlapping run: latest occurrence, then the end");
    }
    {
        const int32_t h[] = {1, 2, 1, 2, 1};
        const int32_t e[] = {2, 1};
        ngram_expect(3, 3, h, 5, 5, e, 2, "3-gram overlapping its own suffix");
    }
    {
        const int32_t h[] = {1, 2, 5, 1, 2, 6, 1, 2};
        const int32_t e[] = {6, 1, 2};
        ngram_expect(1, 2, h, 8, 3, e, 3, "latest occurrence preferred");
        ngram_expect(1, 2, h, 8, 1, e, 1, "latest occurrence, k 1");
    }
    {
        const int32_t h[] = {3, 1, 2, 9, 4, 1, 2, 8, 3, 1, 2};
        const int32_t e3[] = {9, 4};
        const int32_t e2[] = {8, 3};
        ngram_expect(1, 3, h, 11, 2, e3, 2, "longest n-gram preferred");
        ngram_expect(1, 2, h, 11, 2, e2, 2, "max_n 2 finds the latest 2-gram");
    }
    {
        const int32_t h[] = {1, 2, 3, 1};
        const int32_t e[] = {2, 3, 1};
        ngram_expect(2, 3, h, 4, 3, NULL, 0, "min_n 2: a 1-gram match is not used");
        ngram_expect(1, 3, h, 4, 3, e, 3, "min_n 1: the 1-gram match");
    }
    {
        const int32_t h[] = {5, 6, 5};
        const int32_t e[] = {6, 5};
        ngram_expect(1, 4, h, 3, 10, e, 2, "max_n longer than the history");
    }
    char err[256] = "";
    tsr_drafter *d = NULL;
    assert_int_not_equal(tsr_drafter_ngram_new(0, 3, &d, err, sizeof err), 0);
    assert_null(d);
    assert_non_null(strstr(err, "n-gram"));
    assert_int_not_equal(tsr_drafter_ngram_new(3, 2, &d, err, sizeof err), 0);
    assert_null(d);
}

/* ---- oracle ---- */

static void test_oracle(void **state)
{
    (void)state;
    char err[256] = "";
    tsr_drafter *d = NULL;
    const int32_t seq[] = {5, 6, 7, 8, 9};
    assert_int_equal(tsr_drafter_oracle_new(seq, 5, &d, err, sizeof err), 0);
    assert_string_equal(d->vt->name, "oracle");
    int32_t out[MAX_K];
    int r = d->vt->propose(d, 1, seq, 2, 2, out, err, sizeof err);
    expect_tokens("oracle k 2", seq + 2, 2, out, r);
    r = d->vt->propose(d, 1, seq, 2, 10, out, err, sizeof err);
    expect_tokens("oracle up to the end", seq + 2, 3, out, r);
    r = d->vt->propose(d, 1, NULL, 0, 3, out, err, sizeof err);
    expect_tokens("oracle from nothing", seq, 3, out, r);
    const int32_t off[] = {5, 7};
    r = d->vt->propose(d, 1, off, 2, 3, out, err, sizeof err);
    expect_tokens("oracle off the path", NULL, 0, out, r);
    r = d->vt->propose(d, 1, seq, 5, 3, out, err, sizeof err);
    expect_tokens("oracle at the end", NULL, 0, out, r);
    d->vt->rollback(d, 1, 0);
    d->vt->release(d, 1);
    tsr_drafter_free(d);
    assert_int_not_equal(tsr_drafter_oracle_new(NULL, 3, &d, err, sizeof err), 0);
}

/* ---- draft model: exactness ---- */

static void check_model_exact(const char *rel)
{
    int32_t path[PATH_LEN + 1];
    target_path(path);
    tsr_gguf *tg;
    char err[512];
    assert_int_equal(tsr_gguf_open(tsr_test_model_path(TARGET_PATH), &tg, err, sizeof err), 0);
    tsr_test_model ref;
    tsr_test_model_open(&ref, tsr_test_model_path(rel), REF_CTX, 64, 1, TSR_KV_F32);
    const int32_t n_blocks = 64;
    tsr_drafter *d = draft_new(rel, tg, n_blocks);
    assert_string_equal(d->vt->name, "draft-model");
    assert_int_equal(tsr_drafter_model_n_free_blocks(d), n_blocks);

    int32_t rnd[300];
    random_tokens(rnd, 300, 42, ref.m->hp.n_vocab);
    rnd[0] = path[0];

    /* Interleaved: seq 1 walks the target's path, seq 2 random tokens, seq 3 the path
     * again, with growing histories, several k and rollbacks to earlier points. */
    static const int32_t ks[] = {1, 2, 3, 5, 8, 4};
    int32_t n1 = 1, n2 = 3, n3 = 20;
    for (int step = 0; step < 12; step++) {
        int32_t k = ks[step % 6];
        propose_check(d, &ref, 1, path, n1, k, rel);
        propose_check(d, &ref, 2, rnd, n2, k, rel);
        propose_check(d, &ref, 3, path, n3, ks[(step + 3) % 6], rel);
        /* seq 1 accepts part of its draft; seq 2 grows by several tokens without a
         * rollback; seq 3 goes back to an earlier point. */
        n1 += 1 + step % 3;
        d->vt->rollback(d, 1, n1 - 1);
        n2 += 5;
        if (step % 4 == 3) {
            n3 -= 9;
            d->vt->rollback(d, 3, n3);
        } else {
            n3 += 2;
            d->vt->rollback(d, 3, n3);
        }
    }
    /* Rollback to a point, then propose again: same as a fresh computation. */
    for (int32_t back = 40; back >= 1; back -= 13) {
        d->vt->rollback(d, 1, back);
        propose_check(d, &ref, 1, path, back, 6, "after rollback");
    }
    /* A history that changes under the drafter without any rollback (seq 2 switches from
     * random tokens to the path after the shared BOS): the stale cache must not leak. */
    propose_check(d, &ref, 2, path, 30, 5, "history changed without rollback");
    /* Catch-up longer than a batch (128 tokens). */
    propose_check(d, &ref, 4, rnd, 300, 7, "long catch-up");
    propose_check(d, &ref, 4, rnd, 300, 3, "same history again");

    for (uint64_t s = 1; s <= 4; s++) d->vt->release(d, s);
    d->vt->release(d, 99); /* unknown: nothing happens */
    assert_int_equal(tsr_drafter_model_n_free_blocks(d), n_blocks);
    tsr_drafter_free(d);
    tsr_test_model_close(&ref);
    tsr_gguf_close(tg);
}

static void test_model_exact_q8(void **state)
{
    (void)state;
    check_model_exact(Q8_PATH);
}

static void test_model_exact_4layer(void **state)
{
    (void)state;
    check_model_exact(LAYER4_PATH);
}

/* ---- draft model: acceptance along the target's greedy path ---- */

typedef struct {
    double per_token; /* top-1 agreement: k 1 at every position */
    double spec;      /* accepted / proposed in a k-4 speculative loop */
} rates;

static rates measure(const char *rel)
{
    int32_t path[PATH_LEN + 1];
    target_path(path);
    tsr_gguf *tg;
    char err[512] = "";
    assert_int_equal(tsr_gguf_open(tsr_test_model_path(TARGET_PATH), &tg, err, sizeof err), 0);
    tsr_drafter *d = draft_new(rel, tg, 32);
    int32_t out[MAX_K];
    int agree = 0;
    for (int32_t n = 1; n <= PATH_LEN; n++) {
        int r = d->vt->propose(d, 1, path, n, 1, out, err, sizeof err);
        if (r != 1) fail_msg("%s: propose at %d gave %d: %s", rel, n, r, err);
        agree += out[0] == path[n];
        d->vt->rollback(d, 1, n);
    }
    d->vt->release(d, 1);
    /* Speculative loop as the engine runs it: propose k, keep the matching prefix plus
     * the target's own next token, roll the drafter back to the accepted tokens. */
    int proposed = 0, accepted = 0;
    for (int32_t n = 1; n <= PATH_LEN;) {
        int32_t k = PATH_LEN + 1 - n < 4 ? PATH_LEN + 1 - n : 4;
        int r = d->vt->propose(d, 2, path, n, k, out, err, sizeof err);
        if (r != k) fail_msg("%s: propose at %d gave %d: %s", rel, n, r, err);
        int j = 0;
        while (j < r && out[j] == path[n + j]) j++;
        proposed += r;
        accepted += j;
        d->vt->rollback(d, 2, n + j);
        n += j + 1;
    }
    d->vt->release(d, 2);
    assert_int_equal(tsr_drafter_model_n_free_blocks(d), 32);
    tsr_drafter_free(d);
    tsr_gguf_close(tg);
    rates rt = {(double)agree / PATH_LEN, (double)accepted / proposed};
    printf("[ drafter  ] %-40s top-1 agreement %d/%d (%.0f%%), k-4 speculative acceptance "
           "%d/%d (%.0f%%)\n",
           rel, agree, PATH_LEN, 100.0 * rt.per_token, accepted, proposed, 100.0 * rt.spec);
    return rt;
}

static void expect_rate(const char *what, double got, double lo, double hi)
{
    if (got < lo || got > hi)
        fail_msg("%s: expected an acceptance rate in [%.2f, %.2f], got %.3f", what, lo, hi, got);
}

static void test_acceptance(void **state)
{
    (void)state;
    rates q8 = measure(Q8_PATH);
    expect_rate("Q8_0 copy, top-1", q8.per_token, 0.9, 1.0);
    expect_rate("Q8_0 copy, speculative", q8.spec, 0.85, 1.0);
    rates l4 = measure(LAYER4_PATH);
    expect_rate("4-layer draft, top-1", l4.per_token, 0.3, 0.8);
    expect_rate("4-layer draft, speculative", l4.spec, 0.15, 0.8);
    rates self = measure(TARGET_PATH);
    expect_rate("the target itself, top-1", self.per_token, 1.0, 1.0);
    expect_rate("the target itself, speculative", self.spec, 1.0, 1.0);
}

/* ---- vocabulary mismatch ---- */

static char tmpdir[64];

static void expect_refused(const char *path, const tsr_gguf *tg, const char *needle)
{
    char err[512] = "";
    tsr_drafter *d = NULL;
    int rc = tsr_drafter_model_new(path, tg, 8, 1, &d, err, sizeof err);
    if (rc == 0) {
        tsr_drafter_free(d);
        fail_msg("draft %s: expected a refusal mentioning '%s', got success", path, needle);
    }
    assert_null(d);
    if (!strstr(err, "vocabulary") || !strstr(err, needle))
        fail_msg("draft %s: expected a message mentioning the vocabulary and '%s', got: %s", path,
                 needle, err);
    printf("[ drafter  ] refused: %s\n", err);
}

/* A vocabulary-only GGUF: the target's tokenizer.* keys, with token `tok` renamed (when
 * >= 0) and the EOS id replaced (when >= 0). */
static void write_vocab(const char *out, const tsr_gguf *tg, int64_t tok, int64_t eos)
{
    char err[512];
    tsr_gguf_writer *w = tsr_gguf_writer_new();
    assert_non_null(w);
    int64_t itok = tsr_gguf_find_key(tg, "tokenizer.ggml.tokens");
    for (int64_t i = 0; i < tsr_gguf_n_kv(tg); i++)
        if (strncmp(tsr_gguf_kv_key(tg, i), "tokenizer.", 10) == 0)
            assert_int_equal(tsr_gguf_writer_copy_kv(w, tg, i), 0);
    if (tok >= 0) {
        uint64_t n;
        assert_true(tsr_gguf_kv_arr(tg, itok, NULL, &n));
        const char **strs = calloc(n, sizeof *strs);
        size_t *lens = calloc(n, sizeof *lens);
        assert_true(strs && lens);
        for (uint64_t j = 0; j < n; j++) {
            tsr_gguf_str s;
            assert_true(tsr_gguf_arr_str(tg, itok, j, &s));
            strs[j] = s.ptr;
            lens[j] = s.len;
        }
        strs[tok] = "<renamed>";
        lens[tok] = strlen(strs[tok]);
        assert_int_equal(tsr_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", strs, lens, n), 0);
        free(strs);
        free(lens);
    }
    if (eos >= 0)
        assert_int_equal(
            tsr_gguf_writer_set_int(w, "tokenizer.ggml.eos_token_id", TSR_GGUF_UINT32, eos), 0);
    if (tsr_gguf_writer_save(w, out, err, sizeof err) != 0) fail_msg("save %s: %s", out, err);
    tsr_gguf_writer_free(w);
}

static void make_model(const char *out, const char *vocab_from)
{
    char err[512];
    tsr_mkmodel_params p;
    tsr_mkmodel_params_default(&p);
    p.out_path = out;
    p.vocab_from = vocab_from;
    p.n_layer = 1;
    p.n_embd = 64;
    p.n_head = 4;
    p.n_head_kv = 4;
    p.n_ff = 128;
    p.n_ctx = 256;
    p.type = "Q8_0";
    p.tied = true;
    if (tsr_mkmodel(&p, NULL, err, sizeof err) != 0) fail_msg("mkmodel %s: %s", out, err);
}

static void test_vocab_mismatch(void **state)
{
    (void)state;
    char err[512];
    tsr_gguf *tg;
    assert_int_equal(tsr_gguf_open(tsr_test_model_path(TARGET_PATH), &tg, err, sizeof err), 0);
    snprintf(tmpdir, sizeof tmpdir, "/tmp/tsr_drafter_XXXXXX");
    assert_non_null(mkdtemp(tmpdir));
    char vocab_path[128], model_path[128];

    /* Same tokenizer type, 32000 tokens against 512. */
    expect_refused(tsr_test_model_path("synthetic/synth-tiny-q8_0.gguf"), tg, "32000");
    /* Byte-level BPE (gpt2) vocabulary. */
    snprintf(model_path, sizeof model_path, "%s/gpt2-draft.gguf", tmpdir);
    make_model(model_path, tsr_test_model_path("vocab/ggml-vocab-gpt-2.gguf"));
    expect_refused(model_path, tg, "gpt2");
    unlink(model_path);
    /* Same size, one token renamed. */
    snprintf(vocab_path, sizeof vocab_path, "%s/renamed.gguf", tmpdir);
    snprintf(model_path, sizeof model_path, "%s/renamed-draft.gguf", tmpdir);
    write_vocab(vocab_path, tg, 100, -1);
    make_model(model_path, vocab_path);
    expect_refused(model_path, tg, "token 100");
    unlink(vocab_path);
    unlink(model_path);
    /* Same tokens, another EOS id. */
    snprintf(vocab_path, sizeof vocab_path, "%s/eos.gguf", tmpdir);
    snprintf(model_path, sizeof model_path, "%s/eos-draft.gguf", tmpdir);
    write_vocab(vocab_path, tg, -1, 5);
    make_model(model_path, vocab_path);
    expect_refused(model_path, tg, "EOS");
    unlink(model_path);
    /* The same vocabulary written the same way is accepted (the checks above are not
     * refusing every synthetic file). */
    write_vocab(vocab_path, tg, -1, -1);
    make_model(model_path, vocab_path);
    tsr_drafter *d = NULL;
    if (tsr_drafter_model_new(model_path, tg, 8, 1, &d, err, sizeof err) != 0)
        fail_msg("an identical vocabulary was refused: %s", err);
    tsr_drafter_free(d);
    unlink(vocab_path);
    unlink(model_path);
    rmdir(tmpdir);
    /* A missing file is an error too, naming the file. */
    d = NULL;
    assert_int_not_equal(
        tsr_drafter_model_new("/nonexistent/draft.gguf", tg, 8, 1, &d, err, sizeof err), 0);
    assert_null(d);
    assert_non_null(strstr(err, "/nonexistent/draft.gguf"));
    tsr_gguf_close(tg);
}

/* ---- KV pool exhaustion ---- */

static void expect_none(tsr_drafter *d, uint64_t seq, const int32_t *hist, int32_t n, int32_t k,
                        const char *what)
{
    char err[256] = "";
    int32_t out[MAX_K];
    int r = d->vt->propose(d, seq, hist, n, k, out, err, sizeof err);
    if (r != 0) fail_msg("%s: expected 0 tokens (pool exhausted), got %d (%s)", what, r, err);
}

static void test_pool_exhaustion(void **state)
{
    (void)state;
    int32_t path[PATH_LEN + 1];
    target_path(path);
    char err[512];
    tsr_gguf *tg;
    assert_int_equal(tsr_gguf_open(tsr_test_model_path(TARGET_PATH), &tg, err, sizeof err), 0);
    tsr_test_model ref;
    tsr_test_model_open(&ref, tsr_test_model_path(LAYER4_PATH), REF_CTX, 64, 1, TSR_KV_F32);
    int32_t rnd[64];
    random_tokens(rnd, 64, 7, ref.m->hp.n_vocab);
    /* 4 blocks: 64 positions in all. */
    tsr_drafter *d = draft_new(LAYER4_PATH, tg, 4);
    propose_check(d, &ref, 1, path, 40, 4, "A takes 3 blocks"); /* positions 0..42 */
    assert_int_equal(tsr_drafter_model_n_free_blocks(d), 1);
    expect_none(d, 2, rnd, 30, 4, "B needs 3 blocks, 1 free");
    assert_int_equal(tsr_drafter_model_n_free_blocks(d), 1);
    propose_check(d, &ref, 2, rnd, 10, 4, "B fits in the last block");
    assert_int_equal(tsr_drafter_model_n_free_blocks(d), 0);
    expect_none(d, 2, rnd, 30, 4, "B grows past the pool: its state is freed");
    assert_int_equal(tsr_drafter_model_n_free_blocks(d), 1);
    expect_none(d, 3, path, 80, 2, "C longer than the whole pool");
    propose_check(d, &ref, 1, path, 44, 4, "A unaffected");
    d->vt->release(d, 1);
    assert_int_equal(tsr_drafter_model_n_free_blocks(d), 4);
    propose_check(d, &ref, 2, rnd, 30, 4, "B after A's release");
    propose_check(d, &ref, 2, rnd, 49, 4, "B grows");
    d->vt->rollback(d, 2, 10);
    assert_int_equal(tsr_drafter_model_n_free_blocks(d), 3);
    propose_check(d, &ref, 2, rnd, 12, 2, "B after a rollback that freed blocks");
    d->vt->release(d, 2);
    d->vt->release(d, 3);
    assert_int_equal(tsr_drafter_model_n_free_blocks(d), 4);
    tsr_drafter_free(d);
    tsr_test_model_close(&ref);
    tsr_gguf_close(tg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ngram),           cmocka_unit_test(test_oracle),
        cmocka_unit_test(test_model_exact_q8),  cmocka_unit_test(test_model_exact_4layer),
        cmocka_unit_test(test_acceptance),      cmocka_unit_test(test_vocab_mismatch),
        cmocka_unit_test(test_pool_exhaustion),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
