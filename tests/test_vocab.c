/*
 * test_vocab.c — tokenizer tests against llama.cpp's reference ids.
 *
 * What is checked and why:
 *   - llama.cpp's own tokenizer test vectors (vocab/ggml-vocab-*.gguf.inp/.out) for every
 *     vocab file that has them: exact ids, add_special = parse_special = false;
 *   - the Llama 3 and Qwen2 stand-ins (HF-layout BPE files turned into GGUF vocabularies
 *     with the tsr_gguf writer) against the llama-bpe and qwen2 vectors;
 *   - the prompts and greedy texts of stories260K and the synthetic llama (SPM, with BOS),
 *     through the streaming detokenizer;
 *   - detokenizer invariants (never half a UTF-8 character, never invalid UTF-8),
 *     parse_special, invalid UTF-8 input and corrupt metadata (an error, never a crash).
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

#include "shard/gguf.h"
#include "shard/vocab.h"
#include "tests/util.h"

/* ---- helpers ---- */

static tsr_vocab *open_vocab_path(const char *path)
{
    char err[512];
    tsr_gguf *g = NULL;
    int rc = tsr_gguf_open(path, &g, err, sizeof err);
    if (rc) fail_msg("tsr_gguf_open(%s): %s", path, err);
    tsr_vocab *v = NULL;
    rc = tsr_vocab_load(g, &v, err, sizeof err);
    tsr_gguf_close(g); /* the vocab must not depend on the file staying open */
    if (rc) fail_msg("tsr_vocab_load(%s): %s", path, err);
    return v;
}

static tsr_vocab *open_vocab(const char *rel)
{
    return open_vocab_path(tsr_test_model_path(rel));
}

static void print_escaped(const char *label, const char *s, size_t n)
{
    printf("%s\"", label);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '\n')
            printf("\\n");
        else if (c == '\t')
            printf("\\t");
        else if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20 || c == 0x7F)
            printf("\\x%02x", c);
        else
            putchar(c);
    }
    printf("\"\n");
}

static void print_ids(const char *label, const int32_t *ids, size_t n)
{
    printf("%s[", label);
    for (size_t i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
    printf("]\n");
}

/* Parse space-separated decimal ids. */
static size_t parse_ids(const char *s, size_t len, int32_t *ids, size_t cap)
{
    size_t n = 0, i = 0;
    while (i < len) {
        while (i < len && (s[i] == ' ' || s[i] == '\t' || s[i] == '\r')) i++;
        if (i >= len) break;
        long v = 0;
        bool neg = s[i] == '-';
        if (neg) i++;
        while (i < len && s[i] >= '0' && s[i] <= '9') v = v * 10 + (s[i++] - '0');
        if (n < cap) ids[n] = (int32_t)(neg ? -v : v);
        n++;
        while (i < len && s[i] != ' ' && s[i] != '\t' && s[i] != '\r') i++;
    }
    return n;
}

static bool ids_equal(const int32_t *a, size_t na, const int32_t *b, size_t nb)
{
    return na == nb && (na == 0 || memcmp(a, b, na * sizeof *a) == 0);
}

/* Strict UTF-8 validity (independent of the module's own checker). */
static bool utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t k;
        unsigned cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            k = 1, cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            k = 2, cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            k = 3, cp = c & 0x07;
        } else {
            return false;
        }
        if (i + k >= n) return false;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        if ((k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000))
            return false;
        if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
        i += k + 1;
    }
    return true;
}

/* ---- llama.cpp test vectors ---- */

static const char k_sep[] = "\n__ggml_vocab_test__\n";

/* Run every text of inp_rel through v and compare with the ids of out_rel (one line per
 * text), both relative to the models folder. */
static void check_vector_files(const tsr_vocab *v, const char *name, const char *inp_rel,
                               const char *out_rel)
{
    size_t inp_len, out_len;
    char *inp = tsr_test_read_file(tsr_test_model_path(inp_rel), &inp_len);
    char *out = tsr_test_read_file(tsr_test_model_path(out_rel), &out_len);
    assert_non_null(inp);
    assert_non_null(out);

    int n_cases = 0, n_fail = 0;
    size_t pos = 0, opos = 0, sep_len = strlen(k_sep);
    int32_t *want = malloc(65536 * sizeof *want);
    assert_non_null(want);
    while (pos < inp_len) {
        const char *hit = memmem(inp + pos, inp_len - pos, k_sep, sep_len);
        size_t tlen = hit ? (size_t)(hit - (inp + pos)) : inp_len - pos;
        const char *text = inp + pos;
        pos = hit ? pos + tlen + sep_len : inp_len;

        /* matching .out line */
        assert_true(opos <= out_len);
        const char *line = out + opos;
        const char *nl = memchr(line, '\n', out_len - opos);
        size_t llen = nl ? (size_t)(nl - line) : out_len - opos;
        opos = nl ? opos + llen + 1 : out_len;
        size_t nw = parse_ids(line, llen, want, 65536);

        int32_t *got = NULL;
        size_t ng = 0;
        char err[256];
        int rc = tsr_vocab_tokenize(v, text, tlen, false, false, &got, &ng, err, sizeof err);
        if (rc != 0 || !ids_equal(got, ng, want, nw)) {
            n_fail++;
            printf("[%s] case %d failed%s%s\n", name, n_cases, rc ? ": " : "", rc ? err : "");
            print_escaped("  input:    ", text, tlen);
            print_ids("  expected: ", want, nw);
            print_ids("  got:      ", got, ng);
        }
        free(got);
        n_cases++;
    }
    printf("[%s] %d/%d cases pass\n", name, n_cases - n_fail, n_cases);
    free(want);
    free(inp);
    free(out);
    assert_true(n_cases >= 40);
    assert_int_equal(n_fail, 0);
}

/* Run every case of vocab/ggml-vocab-<name>.gguf.inp/.out through v. */
static void check_vectors(const tsr_vocab *v, const char *name)
{
    char inp[256], out[256];
    snprintf(inp, sizeof inp, "vocab/ggml-vocab-%s.gguf.inp", name);
    snprintf(out, sizeof out, "vocab/ggml-vocab-%s.gguf.out", name);
    check_vector_files(v, name, inp, out);
}

/* ---- the real models' vocabularies (ops/fetch-model.sh) ----
 * expected/real-vocab/NAME.out: llama.cpp's ids of every text of the llama-bpe vectors in
 * that model's vocabulary: SmolLM2 (BPE, pre-tokenizer smollm = the starcoder expression),
 * Qwen2.5 (BPE, qwen2) and Gemma 3 (SentencePiece without the space prefix, byte
 * fallback, 262k tokens). */
/* The cached path of a real model (malloc'd). */
static char *real_model_path(const char *name)
{
    char cmd[1024], *out = NULL, *errs = NULL;
    snprintf(cmd, sizeof cmd, "%s %s", TSR_FETCH_MODEL, name);
    int rc = tsr_test_run(cmd, &out, &errs);
    if (rc != 0 || !out) fail_msg("%s failed (%d): %s", cmd, rc, errs ? errs : "");
    free(errs);
    size_t n = strlen(out);
    while (n && out[n - 1] == '\n') out[--n] = 0;
    char *last = strrchr(out, '\n');
    char *path = strdup(last ? last + 1 : out);
    free(out);
    return path;
}

static void run_real_vocab(const char *name)
{
    char *path = real_model_path(name);
    tsr_vocab *v = open_vocab_path(path);
    free(path);
    char rel[256];
    snprintf(rel, sizeof rel, "expected/real-vocab/%s.out", name);
    check_vector_files(v, name, "vocab/ggml-vocab-llama-bpe.gguf.inp", rel);
    tsr_vocab_free(v);
}

/* DeepSeek-R1-Distill-Qwen ships Qwen2.5's tokenizer under tokenizer.ggml.pre =
 * "deepseek-r1-qwen", which llama.cpp maps to the qwen2 expression: Qwen2.5's vocabulary
 * (every key copied from the real file, no tensors) relabelled so must give the same ids. */
static void test_real_deepseek_r1_qwen(void **state)
{
    (void)state;
    char err[512], *path = real_model_path("qwen2.5-coder-0.5b-instruct");
    tsr_gguf *g = NULL;
    if (tsr_gguf_open(path, &g, err, sizeof err)) fail_msg("%s: %s", path, err);
    free(path);
    tsr_gguf_writer *w = tsr_gguf_writer_new();
    assert_non_null(w);
    for (int64_t i = 0; i < tsr_gguf_n_kv(g); i++)
        if (!strncmp(tsr_gguf_kv_key(g, i), "tokenizer.", 10))
            assert_int_equal(tsr_gguf_writer_copy_kv(w, g, i), 0);
    tsr_gguf_close(g);
    assert_int_equal(tsr_gguf_writer_set_str(w, "tokenizer.ggml.pre", "deepseek-r1-qwen", 16), 0);
    char tmp[] = "/tmp/tsr_r1_qwen_XXXXXX";
    int fd = mkstemp(tmp);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(tsr_gguf_writer_save(w, tmp, err, sizeof err), 0);
    tsr_gguf_writer_free(w);
    tsr_vocab *v = open_vocab_path(tmp);
    unlink(tmp);
    assert_string_equal(tsr_vocab_pre(v), "deepseek-r1-qwen");
    check_vector_files(v, "deepseek-r1-qwen", "vocab/ggml-vocab-llama-bpe.gguf.inp",
                       "expected/real-vocab/qwen2.5-coder-0.5b-instruct.out");
    tsr_vocab_free(v);
}

static void test_real_smollm2(void **state)
{
    (void)state;
    run_real_vocab("smollm2-135m-instruct");
}
static void test_real_qwen25(void **state)
{
    (void)state;
    run_real_vocab("qwen2.5-coder-0.5b-instruct");
}
static void test_real_gemma3(void **state)
{
    (void)state;
    run_real_vocab("gemma-3-270m");
}

static void run_vocab_file(const char *name)
{
    char rel[256];
    snprintf(rel, sizeof rel, "vocab/ggml-vocab-%s.gguf", name);
    tsr_vocab *v = open_vocab(rel);
    check_vectors(v, name);
    tsr_vocab_free(v);
}

static void test_gpt2(void **state)
{
    run_vocab_file("gpt-2");
}
static void test_llama_spm(void **state)
{
    run_vocab_file("llama-spm");
}
static void test_phi3(void **state)
{
    run_vocab_file("phi-3");
}
static void test_mpt(void **state)
{
    run_vocab_file("mpt");
}
static void test_starcoder(void **state)
{
    run_vocab_file("starcoder");
}
static void test_deepseek_llm(void **state)
{
    run_vocab_file("deepseek-llm");
}

/* The other vocab files have no vectors: they must at least load and round-trip text. */
static void test_other_vocabs_load(void **state)
{
    const char *names[] = {"deepseek-coder", "falcon", "refact", "gpt-neox", "baichuan"};
    const char *text = "Hello world! 3333 \xc3\x84pfel, y'all \xe6\x88\x91";
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char rel[256];
        snprintf(rel, sizeof rel, "vocab/ggml-vocab-%s.gguf", names[i]);
        tsr_vocab *v = open_vocab(rel);
        int32_t *ids = NULL;
        size_t n = 0;
        char err[256];
        assert_int_equal(
            tsr_vocab_tokenize(v, text, strlen(text), false, false, &ids, &n, err, sizeof err), 0);
        assert_true(n > 0);
        char *back = NULL;
        assert_int_equal(
            tsr_vocab_detokenize(v, ids, n, TSR_DETOK_STRIP_LEADING_SPACE, &back, NULL), 0);
        assert_string_equal(back, text);
        free(back);
        free(ids);
        tsr_vocab_free(v);
    }
}

/* bert-bge is WordPiece: refused with a clear error. */
static void test_bert_unsupported(void **state)
{
    char err[512];
    tsr_gguf *g = NULL;
    assert_int_equal(
        tsr_gguf_open(tsr_test_model_path("vocab/ggml-vocab-bert-bge.gguf"), &g, err, sizeof err),
        0);
    tsr_vocab *v = (tsr_vocab *)1;
    int rc = tsr_vocab_load(g, &v, err, sizeof err);
    tsr_gguf_close(g);
    assert_int_equal(rc, TSR_VOCAB_ERR_UNSUPPORTED);
    assert_null(v);
    assert_non_null(strstr(err, "bert"));
}

/* ---- stand-in BPE vocabularies (HF file layout -> GGUF) ---- */

typedef struct {
    char **strs;
    size_t *lens;
    size_t n, cap;
} strlist;

static void sl_push(strlist *l, const char *s, size_t n)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 1024;
        l->strs = realloc(l->strs, l->cap * sizeof *l->strs);
        l->lens = realloc(l->lens, l->cap * sizeof *l->lens);
        assert_non_null(l->strs);
        assert_non_null(l->lens);
    }
    l->strs[l->n] = malloc(n + 1);
    memcpy(l->strs[l->n], s, n);
    l->strs[l->n][n] = 0;
    l->lens[l->n++] = n;
}

static void sl_free(strlist *l)
{
    for (size_t i = 0; i < l->n; i++) free(l->strs[i]);
    free(l->strs);
    free(l->lens);
    memset(l, 0, sizeof *l);
}

/* Write a gpt2-model GGUF vocabulary built from token->id JSON, a merges file (GPT-2
 * layout, optional "#version" header) and extra tokens (id order continues) to a temp
 * file; returns its malloc'd path. */
typedef struct {
    const char *text;
    int type; /* 3 control, 4 user-defined */
} extra_token;

static char *build_bpe_vocab(const char *vocab_rel, const char *merges_rel,
                             const extra_token *extra, size_t n_extra, const char *pre, int64_t bos,
                             int64_t eos)
{
    size_t jl;
    char *json = tsr_test_read_file(tsr_test_model_path(vocab_rel), &jl);
    assert_non_null(json);
    cJSON *root = cJSON_ParseWithLength(json, jl);
    free(json);
    assert_non_null(root);
    int n = cJSON_GetArraySize(root);
    size_t total = (size_t)n + n_extra;
    const char **strs = calloc(total, sizeof *strs);
    size_t *lens = calloc(total, sizeof *lens);
    int32_t *types = malloc(total * sizeof *types);
    assert_non_null(strs);
    assert_non_null(lens);
    assert_non_null(types);
    for (cJSON *it = root->child; it; it = it->next) {
        int id = it->valueint;
        assert_true(id >= 0 && id < n);
        assert_null(strs[id]);
        strs[id] = it->string;
        lens[id] = strlen(it->string);
        types[id] = 1;
    }
    for (size_t i = 0; i < n_extra; i++) {
        strs[n + i] = extra[i].text;
        lens[n + i] = strlen(extra[i].text);
        types[n + i] = extra[i].type;
    }
    for (size_t i = 0; i < total; i++) assert_non_null(strs[i]);

    size_t ml;
    char *merges = tsr_test_read_file(tsr_test_model_path(merges_rel), &ml);
    assert_non_null(merges);
    strlist mlist = {0};
    for (size_t p = 0; p < ml;) {
        const char *nl = memchr(merges + p, '\n', ml - p);
        size_t ll = nl ? (size_t)(nl - (merges + p)) : ml - p;
        if (ll && merges[p + ll - 1] == '\r') ll--;
        if (ll > 0 && !(ll >= 8 && memcmp(merges + p, "#version", 8) == 0))
            sl_push(&mlist, merges + p, ll);
        p += (nl ? (size_t)(nl - (merges + p)) + 1 : ml - p);
    }
    free(merges);

    tsr_gguf_writer *w = tsr_gguf_writer_new();
    assert_non_null(w);
    assert_int_equal(tsr_gguf_writer_set_str(w, "general.architecture", "llama", 5), 0);
    assert_int_equal(tsr_gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2", 4), 0);
    assert_int_equal(tsr_gguf_writer_set_str(w, "tokenizer.ggml.pre", pre, strlen(pre)), 0);
    assert_int_equal(
        tsr_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", strs, lens, (uint64_t)total), 0);
    assert_int_equal(tsr_gguf_writer_set_arr(w, "tokenizer.ggml.token_type", TSR_GGUF_INT32, types,
                                             (uint64_t)total),
                     0);
    assert_int_equal(tsr_gguf_writer_set_arr_str(w, "tokenizer.ggml.merges",
                                                 (const char *const *)mlist.strs, mlist.lens,
                                                 (uint64_t)mlist.n),
                     0);
    if (bos >= 0)
        assert_int_equal(
            tsr_gguf_writer_set_int(w, "tokenizer.ggml.bos_token_id", TSR_GGUF_UINT32, bos), 0);
    if (eos >= 0)
        assert_int_equal(
            tsr_gguf_writer_set_int(w, "tokenizer.ggml.eos_token_id", TSR_GGUF_UINT32, eos), 0);

    char *path = strdup("/tmp/tsr-test-vocab-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    char err[256];
    int rc = tsr_gguf_writer_save(w, path, err, sizeof err);
    if (rc) fail_msg("writer_save: %s", err);
    tsr_gguf_writer_free(w);
    sl_free(&mlist);
    free(strs);
    free(lens);
    free(types);
    cJSON_Delete(root);
    return path;
}

static void test_llama_bpe_standin(void **state)
{
    const extra_token extra[] = {{"<|begin_of_text|>", 3}, {"<|end_of_text|>", 3}};
    char *path = build_bpe_vocab("vocab/llama3-bpe/encoder.json", "vocab/llama3-bpe/vocab.bpe",
                                 extra, 2, "llama-bpe", 128000, 128001);
    tsr_vocab *v = open_vocab_path(path);
    unlink(path);
    free(path);
    assert_int_equal(tsr_vocab_n_tokens(v), 128002);
    assert_true(tsr_vocab_add_bos(v)); /* llama3 family default */
    check_vectors(v, "llama-bpe");

    /* add_special prepends <|begin_of_text|>; the EOS is an end-of-generation token */
    int32_t *ids = NULL;
    size_t n = 0;
    assert_int_equal(tsr_vocab_tokenize(v, "Hello", 5, true, false, &ids, &n, NULL, 0), 0);
    assert_true(n == 2 && ids[0] == 128000);
    free(ids);
    assert_true(tsr_vocab_is_eog(v, 128001));
    assert_false(tsr_vocab_is_eog(v, 128000));
    tsr_vocab_free(v);
}

static void test_qwen2_standin(void **state)
{
    size_t jl;
    char *json = tsr_test_read_file(tsr_test_model_path("vocab/qwen2-bpe/added_tokens.json"), &jl);
    assert_non_null(json);
    cJSON *added = cJSON_ParseWithLength(json, jl);
    free(json);
    assert_non_null(added);
    int na = cJSON_GetArraySize(added);
    extra_token *extra = calloc((size_t)na, sizeof *extra);
    assert_non_null(extra);
    for (int i = 0; i < na; i++) {
        cJSON *t = cJSON_GetArrayItem(added, i);
        assert_int_equal(cJSON_GetObjectItem(t, "id")->valueint, 151643 + i);
        extra[i].text = cJSON_GetObjectItem(t, "content")->valuestring;
        extra[i].type = cJSON_IsTrue(cJSON_GetObjectItem(t, "special")) ? 3 : 4;
    }
    char *path = build_bpe_vocab("vocab/qwen2-bpe/vocab.json", "vocab/qwen2-bpe/merges.txt", extra,
                                 (size_t)na, "qwen2", -1, 151643);
    free(extra);
    cJSON_Delete(added);
    tsr_vocab *v = open_vocab_path(path);
    unlink(path);
    free(path);
    assert_int_equal(tsr_vocab_n_tokens(v), 151669);
    assert_false(tsr_vocab_add_bos(v));
    check_vectors(v, "qwen2");

    /* control tokens only with parse_special; user-defined ones (<think>) always */
    int32_t *ids = NULL;
    size_t n = 0;
    const char *chat = "<|im_start|>user\n<think>hi</think><|im_end|>";
    assert_int_equal(tsr_vocab_tokenize(v, chat, strlen(chat), false, true, &ids, &n, NULL, 0), 0);
    assert_true(n >= 5);
    assert_int_equal(ids[0], 151644);
    assert_int_equal(ids[n - 1], 151645);
    bool think = false;
    for (size_t i = 0; i < n; i++) think |= ids[i] == 151667;
    assert_true(think);
    free(ids);
    assert_int_equal(tsr_vocab_tokenize(v, chat, strlen(chat), false, false, &ids, &n, NULL, 0), 0);
    think = false;
    for (size_t i = 0; i < n; i++) {
        assert_true(ids[i] != 151644 && ids[i] != 151645);
        think |= ids[i] == 151667;
    }
    assert_true(think);
    free(ids);
    assert_true(tsr_vocab_is_eog(v, 151645)); /* <|im_end|> */
    assert_true(tsr_vocab_is_eog(v, 151643)); /* <|endoftext|> */
    tsr_vocab_free(v);
}

/* ---- expected files (key: value blocks) ---- */

/* Value of `key` in the block [b, e), or NULL; *len gets its length. */
static const char *block_get(const char *b, const char *e, const char *key, size_t *len)
{
    size_t kl = strlen(key);
    for (const char *p = b; p < e;) {
        const char *nl = memchr(p, '\n', (size_t)(e - p));
        const char *le = nl ? nl : e;
        if ((size_t)(le - p) > kl + 1 && memcmp(p, key, kl) == 0 && p[kl] == ':' &&
            p[kl + 1] == ' ') {
            *len = (size_t)(le - (p + kl + 2));
            return p + kl + 2;
        }
        p = nl ? nl + 1 : e;
    }
    return NULL;
}

/* Decode a JSON string value into a malloc'd C string (*len bytes). */
static char *json_string(const char *s, size_t n, size_t *len)
{
    cJSON *j = cJSON_ParseWithLength(s, n);
    assert_non_null(j);
    assert_true(cJSON_IsString(j));
    char *r = strdup(j->valuestring);
    *len = strlen(r);
    cJSON_Delete(j);
    return r;
}

/* Check prompt_ids and decoded greedy texts of every block of an expected file. */
static void check_expected_file(const tsr_vocab *v, const char *rel, int *n_prompts, int *n_texts)
{
    size_t flen;
    char *file = tsr_test_read_file(tsr_test_model_path(rel), &flen);
    assert_non_null(file);
    int32_t *want = malloc(4096 * sizeof *want), *greedy = malloc(4096 * sizeof *greedy);
    assert_non_null(want);
    assert_non_null(greedy);
    *n_prompts = *n_texts = 0;
    for (const char *b = file, *end = file + flen; b < end;) {
        const char *e = strstr(b, "\n\n");
        e = e ? e + 1 : end;
        size_t pl, il, gl, tl;
        const char *prompt = block_get(b, e, "prompt", &pl);
        const char *pids = block_get(b, e, "prompt_ids", &il);
        if (prompt && pids) {
            size_t len;
            char *text = json_string(prompt, pl, &len);
            size_t nw = parse_ids(pids, il, want, 4096);
            int32_t *got = NULL;
            size_t ng = 0;
            char err[256];
            assert_int_equal(
                tsr_vocab_tokenize(v, text, len, true, false, &got, &ng, err, sizeof err), 0);
            if (!ids_equal(got, ng, want, nw)) {
                print_escaped("prompt: ", text, len);
                print_ids("  expected: ", want, nw);
                print_ids("  got:      ", got, ng);
                fail_msg("%s: prompt ids differ", rel);
            }
            (*n_prompts)++;
            free(got);
            free(text);
        }
        const char *gids = block_get(b, e, "greedy_ids", &gl);
        const char *etext = block_get(b, e, "expected_text", &tl);
        bool strip = etext != NULL; /* the llama2.c text: first piece without its space */
        if (!etext) etext = block_get(b, e, "text", &tl);
        if (gids && etext) {
            size_t len, ng = parse_ids(gids, gl, greedy, 4096), ol;
            char *text = json_string(etext, tl, &len), *got = NULL;
            assert_int_equal(tsr_vocab_detokenize(v, greedy, ng,
                                                  strip ? TSR_DETOK_STRIP_LEADING_SPACE : 0, &got,
                                                  &ol),
                             0);
            if (ol != len || memcmp(got, text, len) != 0) {
                print_escaped("expected: ", text, len);
                print_escaped("got:      ", got, ol);
                fail_msg("%s: decoded text differs", rel);
            }
            free(got);
            if (strip) { /* default keeps the space: " Once upon ..." */
                assert_int_equal(tsr_vocab_detokenize(v, greedy, ng, 0, &got, &ol), 0);
                assert_int_equal(ol, len + 1);
                assert_true(got[0] == ' ' && memcmp(got + 1, text, len) == 0);
                free(got);
            }
            (*n_texts)++;
            free(text);
        }
        b = e;
        while (b < end && *b == '\n') b++;
    }
    free(want);
    free(greedy);
    free(file);
}

static void test_stories260k(void **state)
{
    tsr_vocab *v = open_vocab("stories260K.gguf");
    assert_int_equal(tsr_vocab_n_tokens(v), 512);
    assert_int_equal(tsr_vocab_type_of(v), TSR_VOCAB_SPM);
    assert_int_equal(tsr_vocab_bos(v), 1);
    assert_int_equal(tsr_vocab_eos(v), 2);
    assert_true(tsr_vocab_add_bos(v));
    assert_false(tsr_vocab_add_eos(v));
    assert_true(tsr_vocab_is_eog(v, 2));
    assert_true(tsr_vocab_is_control(v, 1));
    assert_int_equal(tsr_vocab_pad(v), TSR_TOKEN_NULL); /* stored as 4294967295 */
    int np, nt;
    check_expected_file(v, "expected/stories260K-expected.txt", &np, &nt);
    printf("[stories260K] %d prompts, %d texts pass\n", np, nt);
    assert_int_equal(np, 8);
    assert_int_equal(nt, 4);
    tsr_vocab_free(v);
}

static void test_synth_tiny(void **state)
{
    tsr_vocab *v = open_vocab("synthetic/synth-tiny-f16.gguf");
    int np, nt;
    check_expected_file(v, "expected/synth-tiny-expected.txt", &np, &nt);
    printf("[synth-tiny] %d prompts, %d texts pass\n", np, nt);
    assert_int_equal(np, 15);
    assert_int_equal(nt, 15);
    tsr_vocab_free(v);
}

/* ---- pieces and streaming ---- */

static void test_token_to_piece(void **state)
{
    tsr_vocab *v = open_vocab("vocab/ggml-vocab-llama-spm.gguf");
    char buf[64];
    /* control tokens render only on request */
    assert_int_equal(tsr_vocab_token_to_piece(v, 1, buf, sizeof buf, false), 0);
    assert_int_equal(tsr_vocab_token_to_piece(v, 1, buf, sizeof buf, true), 3);
    assert_memory_equal(buf, "<s>", 3);
    /* U+2581 -> space; a too small buffer gets the needed size and no write */
    assert_int_equal(tsr_vocab_token_to_piece(v, 15043, buf, sizeof buf, false), 6);
    assert_memory_equal(buf, " Hello", 6);
    buf[0] = 'x';
    assert_int_equal(tsr_vocab_token_to_piece(v, 15043, buf, 3, false), 6);
    assert_int_equal(buf[0], 'x');
    /* <0x0A> -> a raw newline byte */
    int32_t nl = tsr_vocab_find(v, "<0x0A>", 6);
    assert_true(nl >= 0);
    assert_int_equal(tsr_vocab_token_to_piece(v, nl, buf, sizeof buf, false), 1);
    assert_int_equal(buf[0], '\n');
    assert_true(tsr_vocab_token_to_piece(v, -1, buf, sizeof buf, false) < 0);
    assert_true(tsr_vocab_token_to_piece(v, 32000, buf, sizeof buf, false) < 0);
    tsr_vocab_free(v);

    v = open_vocab("vocab/ggml-vocab-gpt-2.gguf");
    int32_t id = tsr_vocab_find(v,
                                "\xc4\xa0"
                                "Hello",
                                7); /* "ĠHello" */
    assert_true(id >= 0);
    assert_int_equal(tsr_vocab_token_to_piece(v, id, buf, sizeof buf, false), 6);
    assert_memory_equal(buf, " Hello", 6);
    id = tsr_vocab_find(v, "\xc4\x8a", 2); /* "Ċ" = newline */
    assert_int_equal(tsr_vocab_token_to_piece(v, id, buf, sizeof buf, false), 1);
    assert_int_equal(buf[0], '\n');
    tsr_vocab_free(v);
}

static void test_detok_split_char(void **state)
{
    tsr_vocab *v = open_vocab("vocab/ggml-vocab-llama-spm.gguf");
    tsr_detok d;
    assert_int_equal(tsr_detok_init(&d, v, 0), 0);
    const char *t;
    size_t n;
    const unsigned char euro[] = {0xE2, 0x82, 0xAC};
    int32_t ids[3];
    for (int i = 0; i < 3; i++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", euro[i]);
        ids[i] = tsr_vocab_find(v, name, 6);
        assert_true(ids[i] >= 0);
    }
    /* nothing until the character is complete */
    assert_int_equal(tsr_detok_push(&d, ids[0], &t, &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(tsr_detok_push(&d, ids[1], &t, &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(tsr_detok_push(&d, ids[2], &t, &n), 0);
    assert_int_equal(n, 3);
    assert_memory_equal(t, "\xE2\x82\xAC", 3);
    assert_int_equal(tsr_detok_flush(&d, &t, &n), 0);
    assert_int_equal(n, 0);

    /* an incomplete character at the end of the stream becomes U+FFFD */
    assert_int_equal(tsr_detok_push(&d, ids[0], &t, &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(tsr_detok_flush(&d, &t, &n), 0);
    assert_int_equal(n, 3);
    assert_memory_equal(t, "\xEF\xBF\xBD", 3);

    /* a lead byte followed by a non-continuation: U+FFFD, then the text */
    assert_int_equal(tsr_detok_push(&d, ids[0], &t, &n), 0);
    assert_int_equal(tsr_detok_push(&d, 15043, &t, &n), 0); /* " Hello" */
    assert_int_equal(n, 9);
    assert_memory_equal(t, "\xEF\xBF\xBD Hello", 9);
    /* a stray continuation byte: U+FFFD at once */
    assert_int_equal(tsr_detok_push(&d, ids[1], &t, &n), 0);
    assert_int_equal(n, 3);
    assert_memory_equal(t, "\xEF\xBF\xBD", 3);
    /* a bad id changes nothing */
    assert_int_equal(tsr_detok_push(&d, ids[0], &t, &n), 0);
    assert_true(tsr_detok_push(&d, 99999, &t, &n) < 0);
    assert_int_equal(tsr_detok_push(&d, ids[1], &t, &n), 0);
    assert_int_equal(tsr_detok_push(&d, ids[2], &t, &n), 0);
    assert_int_equal(n, 3);
    assert_memory_equal(t, "\xE2\x82\xAC", 3);

    /* leading space: kept by default, dropped once with the flag */
    tsr_detok_reset(&d);
    assert_int_equal(tsr_detok_push(&d, 1, &t, &n), 0); /* <s> renders nothing */
    assert_int_equal(tsr_detok_push(&d, 15043, &t, &n), 0);
    assert_int_equal(n, 6);
    tsr_detok_free(&d);
    assert_int_equal(tsr_detok_init(&d, v, TSR_DETOK_STRIP_LEADING_SPACE), 0);
    assert_int_equal(tsr_detok_push(&d, 1, &t, &n), 0);
    assert_int_equal(tsr_detok_push(&d, 15043, &t, &n), 0);
    assert_int_equal(n, 5);
    assert_memory_equal(t, "Hello", 5);
    assert_int_equal(tsr_detok_push(&d, 15043, &t, &n), 0);
    assert_int_equal(n, 6);
    tsr_detok_free(&d);
    /* render_special shows control tokens */
    assert_int_equal(tsr_detok_init(&d, v, TSR_DETOK_RENDER_SPECIAL), 0);
    assert_int_equal(tsr_detok_push(&d, 1, &t, &n), 0);
    assert_int_equal(n, 3);
    assert_memory_equal(t, "<s>", 3);
    tsr_detok_free(&d);
    tsr_vocab_free(v);
}

/* Random id streams: push + flush output is always valid UTF-8, and equals the plain
 * concatenation of the pieces whenever that concatenation is itself valid. */
static void random_streams(const char *rel, int32_t byte_lo, int32_t byte_hi)
{
    tsr_vocab *v = open_vocab(rel);
    int32_t nt = tsr_vocab_n_tokens(v);
    tsr_detok d;
    assert_int_equal(tsr_detok_init(&d, v, 0), 0);
    char *raw = malloc(1 << 16), *got = malloc(1 << 18);
    assert_non_null(raw);
    assert_non_null(got);
    uint64_t seed = 0x9E3779B97F4A7C15ull;
    int n_equal = 0;
    for (int round = 0; round < 2000; round++) {
        size_t rl = 0, gl = 0;
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        int len = 1 + (int)((seed >> 33) % 24);
        for (int k = 0; k < len; k++) {
            seed = seed * 6364136223846793005ull + 1442695040888963407ull;
            uint32_t r = (uint32_t)(seed >> 33);
            int32_t id = (r & 1) && byte_hi > byte_lo
                             ? byte_lo + (int32_t)((r >> 1) % (uint32_t)(byte_hi - byte_lo))
                             : (int32_t)((r >> 1) % (uint32_t)nt);
            int32_t pl = tsr_vocab_token_to_piece(v, id, raw + rl, 4096, false);
            assert_true(pl >= 0);
            rl += (size_t)pl;
            const char *t;
            size_t n;
            assert_int_equal(tsr_detok_push(&d, id, &t, &n), 0);
            assert_true(utf8_valid((const unsigned char *)t, n));
            memcpy(got + gl, t, n);
            gl += n;
        }
        const char *t;
        size_t n;
        assert_int_equal(tsr_detok_flush(&d, &t, &n), 0);
        memcpy(got + gl, t, n);
        gl += n;
        assert_true(utf8_valid((const unsigned char *)got, gl));
        if (utf8_valid((const unsigned char *)raw, rl)) {
            assert_int_equal(gl, rl);
            assert_memory_equal(got, raw, rl);
            n_equal++;
        }
    }
    printf("[%s] 2000 random streams valid UTF-8 (%d with valid raw bytes, identical)\n", rel,
           n_equal);
    free(raw);
    free(got);
    tsr_detok_free(&d);
    tsr_vocab_free(v);
}

static void test_detok_random_spm(void **state)
{
    random_streams("vocab/ggml-vocab-llama-spm.gguf", 3, 259); /* <0x00>..<0xFF> */
}

static void test_detok_random_bpe(void **state)
{
    random_streams("vocab/ggml-vocab-gpt-2.gguf", 0, 256);
}

/* ---- special tokens, invalid input ---- */

static void test_parse_special(void **state)
{
    tsr_vocab *v = open_vocab("vocab/ggml-vocab-llama-spm.gguf");
    int32_t *ids = NULL, *ref = NULL;
    size_t n = 0, nr = 0;
    assert_int_equal(tsr_vocab_tokenize(v, "<s>", 3, false, true, &ids, &n, NULL, 0), 0);
    assert_int_equal(n, 1);
    assert_int_equal(ids[0], 1);
    free(ids);
    /* text after a special token gets the space prefix again */
    assert_int_equal(tsr_vocab_tokenize(v, "<s>Hello", 8, false, true, &ids, &n, NULL, 0), 0);
    assert_int_equal(tsr_vocab_tokenize(v, "Hello", 5, false, false, &ref, &nr, NULL, 0), 0);
    assert_int_equal(n, nr + 1);
    assert_int_equal(ids[0], 1);
    assert_memory_equal(ids + 1, ref, nr * sizeof *ref);
    free(ids);
    free(ref);
    /* without parse_special "<s>" is plain text */
    assert_int_equal(tsr_vocab_tokenize(v, "<s>", 3, false, false, &ids, &n, NULL, 0), 0);
    assert_true(n > 1);
    for (size_t i = 0; i < n; i++) assert_true(ids[i] != 1);
    char *back;
    assert_int_equal(tsr_vocab_detokenize(v, ids, n, TSR_DETOK_STRIP_LEADING_SPACE, &back, NULL),
                     0);
    assert_string_equal(back, "<s>");
    free(back);
    free(ids);
    /* add_special: BOS, no EOS; empty text gives just BOS */
    assert_int_equal(tsr_vocab_tokenize(v, "", 0, true, false, &ids, &n, NULL, 0), 0);
    assert_int_equal(n, 1);
    assert_int_equal(ids[0], 1);
    free(ids);
    assert_int_equal(tsr_vocab_tokenize(v, "", 0, false, false, &ids, &n, NULL, 0), 0);
    assert_int_equal(n, 0);
    assert_null(ids);
    tsr_vocab_free(v);

    v = open_vocab("vocab/ggml-vocab-gpt-2.gguf");
    const char *s = "a<|endoftext|>b";
    assert_int_equal(tsr_vocab_tokenize(v, s, strlen(s), false, true, &ids, &n, NULL, 0), 0);
    assert_int_equal(n, 3);
    assert_int_equal(ids[1], 50256);
    free(ids);
    assert_int_equal(tsr_vocab_tokenize(v, s, strlen(s), false, false, &ids, &n, NULL, 0), 0);
    assert_true(n > 3);
    for (size_t i = 0; i < n; i++) assert_true(ids[i] != 50256);
    free(ids);
    assert_true(tsr_vocab_is_eog(v, 50256));
    assert_false(tsr_vocab_add_bos(v));
    tsr_vocab_free(v);
}

static void test_invalid_utf8(void **state)
{
    const char bad[] = "a\xE2\x82"
                       "b\x80\xFF\xC0\xAF\xED\xA0\x80 \xF0\x9F\x98";
    size_t bl = sizeof bad - 1;
    /* SPM: stray bytes become <0xNN> byte tokens; decoding gives the bytes back */
    tsr_vocab *v = open_vocab("vocab/ggml-vocab-llama-spm.gguf");
    int32_t *ids = NULL;
    size_t n = 0;
    assert_int_equal(tsr_vocab_tokenize(v, bad, bl, false, false, &ids, &n, NULL, 0), 0);
    assert_true(n > 0);
    char *raw = malloc(4096);
    size_t rl = 0;
    for (size_t i = 0; i < n; i++)
        rl += (size_t)tsr_vocab_token_to_piece(v, ids[i], raw + rl, 64, false);
    assert_int_equal(rl, bl + 1);
    assert_memory_equal(raw + 1, bad, bl); /* after the prefix space */
    char *back;
    size_t back_len;
    assert_int_equal(tsr_vocab_detokenize(v, ids, n, 0, &back, &back_len), 0);
    assert_true(utf8_valid((unsigned char *)back, back_len));
    free(back);
    free(raw);
    free(ids);
    tsr_vocab_free(v);

    /* BPE: every ill-formed byte is one U+FFFD */
    v = open_vocab("vocab/ggml-vocab-gpt-2.gguf");
    const char fixed[] = "a\xEF\xBF\xBD\xEF\xBF\xBD"
                         "b\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"
                         "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD \xEF\xBF\xBD"
                         "\xEF\xBF\xBD\xEF\xBF\xBD";
    int32_t *ref = NULL;
    size_t nr = 0;
    assert_int_equal(tsr_vocab_tokenize(v, bad, bl, false, false, &ids, &n, NULL, 0), 0);
    assert_int_equal(
        tsr_vocab_tokenize(v, fixed, sizeof fixed - 1, false, false, &ref, &nr, NULL, 0), 0);
    assert_true(ids_equal(ids, n, ref, nr));
    free(ids);
    free(ref);
    tsr_vocab_free(v);
}

/* Random text from a pool of pieces (ASCII, contractions, whitespace kinds, Latin-1, CJK,
 * Hangul, emoji, NBSP, NEL) must decode back to itself (byte-level BPE and SPM with byte
 * fallback are lossless), and random bytes must tokenize without error or crash. */
static void test_roundtrip_random(void **state)
{
    static const char *const pool[] = {"a",
                                       "b",
                                       "Zq",
                                       "hello",
                                       " ",
                                       "  ",
                                       "   ",
                                       "\n",
                                       "\n\n",
                                       "\t",
                                       "\r\n",
                                       "1",
                                       "23",
                                       "4567",
                                       "'s",
                                       "'ll",
                                       "'RE",
                                       "!",
                                       "?",
                                       ".",
                                       ",",
                                       "...",
                                       "-",
                                       "(",
                                       ")",
                                       "<",
                                       ">",
                                       "<s",
                                       "\xc3\xa4",
                                       "\xc3\xa9",
                                       "\xc3\x9f",
                                       "\xc3\xb6",
                                       "\xe6\x97\xa5\xe6\x9c\xac",
                                       "\xed\x95\x9c",
                                       "\xf0\x9f\xa6\x99",
                                       "\xf0\x9f\x98\x80",
                                       "\xe2\x80\x94",
                                       "\xe2\x82\xac",
                                       "\xc2\xa0",
                                       "\xc2\x85",
                                       "\xd0\xbd\xd0\xb5",
                                       "\xe1\x9e\x80",
                                       "\xef\xbd\x9e",
                                       "\xe3\x80\x80"};
    const size_t np = sizeof pool / sizeof pool[0];
    const char *names[] = {"gpt-2",        "llama-spm",      "phi-3",  "mpt",    "starcoder",
                           "deepseek-llm", "deepseek-coder", "falcon", "refact", "gpt-neox"};
    char *text = malloc(8192), *bytes = malloc(4096);
    assert_non_null(text);
    assert_non_null(bytes);
    uint64_t seed = 12345;
#define NEXT()                                                                                     \
    (seed = seed * 6364136223846793005ull + 1442695040888963407ull, (uint32_t)(seed >> 33))
    for (size_t f = 0; f < sizeof names / sizeof names[0]; f++) {
        char rel[256];
        snprintf(rel, sizeof rel, "vocab/ggml-vocab-%s.gguf", names[f]);
        tsr_vocab *v = open_vocab(rel);
        for (int round = 0; round < 300; round++) {
            size_t tl = 0;
            int k = 1 + (int)(NEXT() % 40);
            for (int i = 0; i < k; i++) {
                const char *p = pool[NEXT() % np];
                memcpy(text + tl, p, strlen(p));
                tl += strlen(p);
            }
            int32_t *ids = NULL;
            size_t n = 0;
            char err[256], *back = NULL;
            size_t bl;
            assert_int_equal(
                tsr_vocab_tokenize(v, text, tl, false, false, &ids, &n, err, sizeof err), 0);
            assert_int_equal(
                tsr_vocab_detokenize(v, ids, n, TSR_DETOK_STRIP_LEADING_SPACE, &back, &bl), 0);
            if (bl != tl || memcmp(back, text, tl) != 0) {
                print_escaped("text: ", text, tl);
                print_escaped("back: ", back, bl);
                fail_msg("%s: round trip differs", names[f]);
            }
            free(back);
            free(ids);
            /* random bytes, with and without special parsing and BOS/EOS */
            size_t nb = NEXT() % 300;
            for (size_t i = 0; i < nb; i++) bytes[i] = (char)NEXT();
            assert_int_equal(
                tsr_vocab_tokenize(v, bytes, nb, round & 1, round & 2, &ids, &n, err, sizeof err),
                0);
            for (size_t i = 0; i < n; i++)
                assert_true(ids[i] >= 0 && ids[i] < tsr_vocab_n_tokens(v));
            free(ids);
        }
        tsr_vocab_free(v);
    }
#undef NEXT
    free(text);
    free(bytes);
}

/* ---- corrupt metadata ---- */

enum {
    C_OK,
    C_NO_TOKENS,
    C_TOKENS_NOT_STRINGS,
    C_BOS_RANGE,
    C_BOS_STRING,
    C_MODEL_BERT,
    C_NO_MODEL,
    C_MODEL_INT,
    C_SHORT_SCORES,
    C_TYPES_STRINGS,
    C_DUP_TOKEN,
    C_ADD_BOS_STRING,
    C_BPE_NO_MERGES,
    C_BPE_BAD_PRE,
    C_ADD_BOS_NO_BOS,
    C_COUNT
};

static int load_case(int which, char *err, size_t err_len, tsr_vocab **out)
{
    const char *toks[] = {"<unk>", "<s>", "</s>",
                          "\xE2\x96\x81"
                          "a",
                          "a"};
    size_t lens[] = {5, 3, 4, 4, 1};
    float scores[] = {0, 0, 0, -1, -2};
    int32_t types[] = {2, 3, 3, 1, 1};
    tsr_gguf_writer *w = tsr_gguf_writer_new();
    assert_non_null(w);
    bool bpe = which == C_BPE_NO_MERGES || which == C_BPE_BAD_PRE;
    if (which == C_MODEL_BERT)
        tsr_gguf_writer_set_str(w, "tokenizer.ggml.model", "bert", 4);
    else if (which == C_MODEL_INT)
        tsr_gguf_writer_set_int(w, "tokenizer.ggml.model", TSR_GGUF_UINT32, 1);
    else if (which != C_NO_MODEL)
        tsr_gguf_writer_set_str(w, "tokenizer.ggml.model", bpe ? "gpt2" : "llama", bpe ? 4 : 5);
    if (which == C_BPE_BAD_PRE) tsr_gguf_writer_set_str(w, "tokenizer.ggml.pre", "nonsense", 8);
    if (which == C_DUP_TOKEN)
        toks[4] = "\xE2\x96\x81"
                  "a",
        lens[4] = 4;
    if (which == C_TOKENS_NOT_STRINGS)
        tsr_gguf_writer_set_arr(w, "tokenizer.ggml.tokens", TSR_GGUF_INT32, types, 5);
    else if (which != C_NO_TOKENS)
        tsr_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", toks, lens, 5);
    tsr_gguf_writer_set_arr(w, "tokenizer.ggml.scores", TSR_GGUF_FLOAT32, scores,
                            which == C_SHORT_SCORES ? 3 : 5);
    if (which == C_TYPES_STRINGS)
        tsr_gguf_writer_set_arr_str(w, "tokenizer.ggml.token_type", toks, lens, 5);
    else
        tsr_gguf_writer_set_arr(w, "tokenizer.ggml.token_type", TSR_GGUF_INT32, types, 5);
    if (which == C_BOS_STRING)
        tsr_gguf_writer_set_str(w, "tokenizer.ggml.bos_token_id", "1", 1);
    else if (which == C_ADD_BOS_NO_BOS)
        tsr_gguf_writer_set_int(w, "tokenizer.ggml.bos_token_id", TSR_GGUF_INT32, -1);
    else
        tsr_gguf_writer_set_int(w, "tokenizer.ggml.bos_token_id", TSR_GGUF_UINT32,
                                which == C_BOS_RANGE ? 99999 : 1);
    if (which == C_ADD_BOS_STRING)
        tsr_gguf_writer_set_str(w, "tokenizer.ggml.add_bos_token", "yes", 3);
    else
        tsr_gguf_writer_set_int(w, "tokenizer.ggml.add_bos_token", TSR_GGUF_BOOL, 1);

    char path[] = "/tmp/tsr-test-vocab-bad-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    char werr[256];
    int rc = tsr_gguf_writer_save(w, path, werr, sizeof werr);
    if (rc) fail_msg("writer_save: %s", werr);
    tsr_gguf_writer_free(w);
    tsr_gguf *g = NULL;
    rc = tsr_gguf_open(path, &g, werr, sizeof werr);
    unlink(path);
    if (rc) fail_msg("gguf_open: %s", werr);
    *out = (tsr_vocab *)1;
    rc = tsr_vocab_load(g, out, err, err_len);
    tsr_gguf_close(g);
    return rc;
}

static void test_corrupt_metadata(void **state)
{
    char err[512];
    tsr_vocab *v;
    assert_int_equal(load_case(C_OK, err, sizeof err, &v), 0);
    assert_non_null(v);
    int32_t *ids;
    size_t n;
    assert_int_equal(tsr_vocab_tokenize(v, "a a", 3, true, false, &ids, &n, NULL, 0), 0);
    assert_int_equal(n, 3);
    assert_true(ids[0] == 1 && ids[1] == 3 && ids[2] == 3);
    free(ids);
    tsr_vocab_free(v);

    static const char *const expect[C_COUNT] = {
        [C_NO_TOKENS] = "tokenizer.ggml.tokens",
        [C_TOKENS_NOT_STRINGS] = "tokenizer.ggml.tokens",
        [C_BOS_RANGE] = "bos_token_id",
        [C_BOS_STRING] = "bos_token_id",
        [C_MODEL_BERT] = "bert",
        [C_NO_MODEL] = "tokenizer.ggml.model",
        [C_MODEL_INT] = "tokenizer.ggml.model",
        [C_SHORT_SCORES] = "tokenizer.ggml.scores",
        [C_TYPES_STRINGS] = "tokenizer.ggml.token_type",
        [C_DUP_TOKEN] = "duplicate",
        [C_ADD_BOS_STRING] = "add_bos_token",
        [C_BPE_NO_MERGES] = "tokenizer.ggml.merges",
        [C_BPE_BAD_PRE] = "nonsense",
        [C_ADD_BOS_NO_BOS] = "BOS",
    };
    for (int c = 1; c < C_COUNT; c++) {
        err[0] = 0;
        int rc = load_case(c, err, sizeof err, &v);
        printf("corrupt case %d: rc %d: %s\n", c, rc, err);
        assert_true(rc < 0);
        assert_null(v);
        assert_non_null(strstr(err, expect[c]));
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gpt2),
        cmocka_unit_test(test_llama_spm),
        cmocka_unit_test(test_phi3),
        cmocka_unit_test(test_mpt),
        cmocka_unit_test(test_starcoder),
        cmocka_unit_test(test_deepseek_llm),
        cmocka_unit_test(test_real_smollm2),
        cmocka_unit_test(test_real_qwen25),
        cmocka_unit_test(test_real_gemma3),
        cmocka_unit_test(test_real_deepseek_r1_qwen),
        cmocka_unit_test(test_other_vocabs_load),
        cmocka_unit_test(test_bert_unsupported),
        cmocka_unit_test(test_llama_bpe_standin),
        cmocka_unit_test(test_qwen2_standin),
        cmocka_unit_test(test_stories260k),
        cmocka_unit_test(test_synth_tiny),
        cmocka_unit_test(test_token_to_piece),
        cmocka_unit_test(test_detok_split_char),
        cmocka_unit_test(test_detok_random_spm),
        cmocka_unit_test(test_detok_random_bpe),
        cmocka_unit_test(test_parse_special),
        cmocka_unit_test(test_invalid_utf8),
        cmocka_unit_test(test_roundtrip_random),
        cmocka_unit_test(test_corrupt_metadata),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
