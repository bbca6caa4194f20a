/* util.c — see util.h. */
#include "tests/util.h"

#include "kernels/dot_ggml.h"
#include "kernels/ops.h"
#include "kernels/pool.h"
#include "kernels/quant.h"
#include "kernels/repack.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdbool.h>
#include <sys/stat.h>

#include <cmocka.h>

const char *tsr_test_model_path(const char *rel)
{
    static char bufs[8][4096];
    static int slot;
    char *buf = bufs[slot++ & 7];
    const char *dir = getenv("TESSERA_MODELS");
    if (!dir || !*dir) dir = TSR_MODELS_DIR;
    snprintf(buf, sizeof bufs[0], "%s/%s", dir, rel);
    struct stat st;
    if (stat(buf, &st) != 0) {
        fail_msg("test model file missing: %s (set TESSERA_MODELS or check out ../shared/models)",
                 buf);
    }
    return buf;
}

void *tsr_test_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) fail_msg("out of memory (%zu bytes)", n);
    return p;
}

char *tsr_test_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) {
        buf[n] = 0;
        if (len) *len = (size_t)n;
    }
    return buf;
}

#include <cjson/cJSON.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static char *dup_range(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    memcpy(d, s, n);
    d[n] = 0;
    return d;
}

size_t tsr_test_parse_blocks(const char *path, tsr_test_block **out)
{
    size_t len;
    char *txt = tsr_test_read_file(path, &len);
    *out = NULL;
    if (!txt) return 0;
    tsr_test_block *blocks = NULL;
    size_t nb = 0;
    bool in_block = false;
    char *line = txt;
    while (line && *line) {
        char *nl = strchr(line, '\n');
        size_t ll = nl ? (size_t)(nl - line) : strlen(line);
        if (ll == 0) {
            in_block = false;
        } else if (line[0] != '#') {
            char *colon = memchr(line, ':', ll);
            if (colon) {
                if (!in_block) {
                    blocks = realloc(blocks, (nb + 1) * sizeof *blocks);
                    memset(&blocks[nb], 0, sizeof *blocks);
                    nb++;
                    in_block = true;
                }
                tsr_test_block *b = &blocks[nb - 1];
                b->keys = realloc(b->keys, (b->n + 1) * sizeof(char *));
                b->vals = realloc(b->vals, (b->n + 1) * sizeof(char *));
                b->keys[b->n] = dup_range(line, (size_t)(colon - line));
                const char *v = colon + 1;
                if (*v == ' ') v++;
                b->vals[b->n] = dup_range(v, (size_t)(line + ll - v));
                b->n++;
            }
        }
        line = nl ? nl + 1 : NULL;
    }
    free(txt);
    *out = blocks;
    return nb;
}

void tsr_test_blocks_free(tsr_test_block *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        for (size_t k = 0; k < b[i].n; k++) {
            free(b[i].keys[k]);
            free(b[i].vals[k]);
        }
        free(b[i].keys);
        free(b[i].vals);
    }
    free(b);
}

const tsr_test_block *tsr_test_find_block(const tsr_test_block *b, size_t n, const char *model,
                                          const char *prompt, const char *key)
{
    for (size_t i = 0; i < n; i++) {
        const char *p = tsr_test_block_get(&b[i], "prompt");
        const char *m = tsr_test_block_get(&b[i], "model");
        if (p && strcmp(p, prompt) == 0 && tsr_test_block_get(&b[i], key) &&
            (!model || (m && strcmp(m, model) == 0)))
            return &b[i];
    }
    return NULL;
}

int tsr_test_count_lanes(const tsr_model *m, uint32_t type, int *n_type)
{
    int n = 0;
    *n_type = 0;
    for (int32_t li = 0; li < m->n_layer_local; li++) {
        const tsr_layer *L = &m->layers[li];
        const tsr_weight *lw[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
        for (int k = 0; k < 7; k++) {
            if (lw[k]->lanes && lw[k]->type != TSR_TYPE_Q8_0 && lw[k]->type != TSR_TYPE_Q4_0 &&
                lw[k]->type != TSR_TYPE_Q4_K && lw[k]->type != TSR_TYPE_Q6_K &&
                lw[k]->type != TSR_TYPE_Q5_0 && lw[k]->type != TSR_TYPE_Q4_1)
                fail_msg(
                    "layer %d matrix %d: a lanes layout on a matrix of type %u, which has none", li,
                    k, lw[k]->type);
            if (lw[k]->type != type) continue;
            (*n_type)++;
            n += lw[k]->lanes != NULL;
            if (lw[k]->lanes && lw[k]->packed)
                fail_msg("layer %d matrix %d: both the lanes layout and the groups", li, k);
        }
    }
    return n;
}

void tsr_test_lanes_expect(const char *what, int64_t n, int64_t n_out, int64_t r0, int32_t n_tok,
                           int lvl, const float *want, const float *y)
{
    const char *isa = lvl == TSR_GGML_VNNI   ? "avx512vnni"
                      : lvl == TSR_GGML_AVX2 ? "avx2"
                                             : "scalar";
    for (int32_t t = 0; t < n_tok; t++)
        for (int64_t r = r0; r < n_out; r++) {
            const float e = want[(size_t)t * n_out + r];
            const float got = y[(size_t)t * n_out + r];
            if (tsr_test_fbits(e) != tsr_test_fbits(got))
                fail_msg("%s: n %lld rows %lld from %lld, %d tokens, %s: row %lld token %d: "
                         "expected %.9g (0x%08x), got %.9g (0x%08x)",
                         what, (long long)n, (long long)n_out, (long long)r0, n_tok, isa,
                         (long long)r, t, e, tsr_test_fbits(e), got, tsr_test_fbits(got));
        }
}

bool tsr_test_env_off(const char *name)
{
    const char *e = getenv(name);
    return e && strcmp(e, "0") == 0;
}

int tsr_test_lanes_order(const tsr_test_lanes_kernel *k, int64_t n, uint64_t *rng)
{
    static const int64_t rows[] = {1, 15, 16, 17, 40};
    const bool vnni = tsr_ggml_isa() == TSR_GGML_VNNI,
               avx2 = k->lanes_avx2 && tsr_ggml_isa() >= TSR_GGML_AVX2;
    const size_t rb = tsr_row_bytes(k->type, n),
                 xb = tsr_row_bytes(tsr_type_vec_dot_type(k->type), n);
    int n_cases = 0;
    for (size_t ri = 0; ri < sizeof rows / sizeof rows[0]; ri++) {
        const int64_t n_out = rows[ri];
        uint8_t *w = k->make_rows(n, n_out);
        uint8_t *packed = tsr_test_xmalloc(k->bytes(n, n_out));
        assert_int_equal(k->repack(n, n_out, w, rb, packed), 0);
        for (int32_t n_tok = 1; n_tok <= 17; n_tok++) {
            uint8_t *x = k->acts(rng, n, n_tok);
            const size_t ny = (size_t)(n_out * n_tok);
            float *want = tsr_test_xmalloc(sizeof(float) * ny),
                  *y = tsr_test_xmalloc(sizeof(float) * ny);
            for (int32_t t = 0; t < n_tok; t++)
                for (int64_t r = 0; r < n_out; r++)
                    want[(size_t)t * n_out + r] =
                        tsr_vec_dot(k->type, n, w + (size_t)r * rb, x + (size_t)t * xb);
            for (int isa = 0; isa < 3; isa++) {
                if ((isa == 1 && !avx2) || (isa == 2 && !vnni)) continue;
                const int lvl = isa == 2 ? TSR_GGML_VNNI : isa ? TSR_GGML_AVX2 : TSR_GGML_SCALAR;
                for (int64_t r0 = 0; r0 < n_out; r0 += (n_out > 16 ? 16 : n_out)) {
                    memset(y, 0xff, sizeof(float) * ny);
                    k->dot(lvl, n, packed, r0, n_out - r0, n_tok, x, xb, y + r0, (size_t)n_out);
                    char what[64];
                    snprintf(what, sizeof what, "%s lanes", tsr_type_name(k->type));
                    tsr_test_lanes_expect(what, n, n_out, r0, n_tok, lvl, want, y);
                    n_cases++;
                }
            }
            free(y);
            free(want);
            free(x);
        }
        free(packed);
        free(w);
    }
    return n_cases;
}

void tsr_test_lanes_set_make(tsr_test_lanes_set *s, uint32_t type, const uint8_t *wd, int64_t n,
                             int64_t n_out, size_t (*bytes)(int64_t n, int64_t n_out),
                             int (*repack)(int64_t n, int64_t n_out, const void *src,
                                           size_t src_stride, void *dst))
{
    const size_t rb = tsr_row_bytes(type, n);
    s->file = (tsr_weight){.type = type, .n_in = n, .n_out = n_out, .row_bytes = rb, .data = wd};
    void *lanes = tsr_test_xmalloc(bytes(n, n_out));
    assert_int_equal(repack(n, n_out, wd, rb, lanes), 0);
    s->lanes = s->file;
    s->lanes.lanes = lanes;
    s->has_groups = tsr_repack_supported(type);
    s->groups = s->file;
    s->groups.data = NULL;
    if (s->has_groups) {
        void *groups = tsr_test_xmalloc(tsr_repack_bytes(type, n, n_out));
        assert_int_equal(tsr_repack(type, n, n_out, wd, rb, groups), 0);
        s->groups.packed = groups;
    }
}

void tsr_test_lanes_set_free(tsr_test_lanes_set *s)
{
    free((void *)s->lanes.lanes);
    free((void *)s->groups.packed);
}

void tsr_test_lanes_matmul(const tsr_test_lanes_kernel *k, const uint8_t *wd, int64_t n,
                           int64_t n_out, const tsr_weight *other, uint64_t *rng)
{
    enum { MAX_TOK = 17 };
    tsr_test_lanes_set set;
    tsr_test_lanes_set_make(&set, k->type, wd, n, n_out, k->bytes, k->repack);
    set.lanes.lanes_ggml = k->lanes_ggml;
    set.lanes.lanes_avx2 = k->lanes_avx2;
    const tsr_weight *wl = &set.lanes, *wg = set.has_groups ? &set.groups : NULL, *wf = &set.file;
    float *x = tsr_test_xmalloc(sizeof(float) * (size_t)(n * MAX_TOK));
    for (int64_t i = 0; i < n * MAX_TOK; i++) x[i] = tsr_test_gauss(rng);
    const int64_t n_out2 = other->n_out;
    const char *tn = tsr_type_name(wf->type), *tn2 = tsr_type_name(other->type);
    /* one token at a time, one thread, the file layout: the reference */
    float *ref = tsr_test_xmalloc(sizeof(float) * (size_t)(n_out * MAX_TOK));
    float *ref2 = tsr_test_xmalloc(sizeof(float) * (size_t)(n_out2 * MAX_TOK));
    tsr_pool *p1 = tsr_pool_new(1);
    assert_non_null(p1);
    const tsr_weight *w2[2] = {wf, other};
    void *sc = tsr_test_xmalloc(tsr_matmul_multi_scratch_bytes(w2, 2, MAX_TOK) + 64);
    for (int32_t t = 0; t < MAX_TOK; t++) {
        float *ys[2] = {ref + (size_t)t * n_out, ref2 + (size_t)t * n_out2};
        tsr_matmul_multi(p1, w2, ys, 2, x + (size_t)t * n, 1, sc);
    }
    float *got = tsr_test_xmalloc(sizeof(float) * (size_t)(n_out * MAX_TOK));
    float *got2 = tsr_test_xmalloc(sizeof(float) * (size_t)(n_out2 * MAX_TOK));
    char what[200];
    for (int nth = 1; nth <= 3; nth++) {
        tsr_pool *p = tsr_pool_new(nth);
        assert_non_null(p);
        for (int32_t n_tok = 1; n_tok <= MAX_TOK; n_tok++) {
            const tsr_weight *lay[3] = {wl, wg, wf};
            static const char *const names[3] = {"lanes", "groups", "file layout"};
            for (int li = 0; li < 3; li++) {
                if (!lay[li]) continue;
                for (int with2 = 0; with2 < 2; with2++) {
                    const tsr_weight *ws[2] = {lay[li], other};
                    float *ys[2] = {got, got2};
                    memset(got, 0, sizeof(float) * (size_t)(n_out * n_tok));
                    tsr_matmul_multi(p, ws, ys, 1 + with2, x, n_tok, sc);
                    snprintf(what, sizeof what, "%s matmul (%s%s%s), %d tokens, %d threads", tn,
                             names[li], with2 ? ", beside " : "", with2 ? tn2 : "", n_tok, nth);
                    tsr_test_check_same(what, ref, got, (size_t)(n_out * n_tok));
                    if (with2) {
                        snprintf(what, sizeof what, "%s beside %s (%s), %d tokens, %d threads", tn2,
                                 tn, names[li], n_tok, nth);
                        tsr_test_check_same(what, ref2, got2, (size_t)(n_out2 * n_tok));
                    }
                }
            }
        }
        tsr_pool_free(p);
    }
    tsr_pool_free(p1);
    free(got2);
    free(got);
    free(ref2);
    free(ref);
    free(sc);
    free(x);
    tsr_test_lanes_set_free(&set);
}

tsr_weight tsr_test_q8_0_weight(int64_t n, int64_t n_out, uint64_t *rng)
{
    const size_t rb = tsr_row_bytes(TSR_TYPE_Q8_0, n);
    uint8_t *wd = tsr_test_xmalloc(rb * (size_t)n_out);
    float *f = tsr_test_xmalloc(sizeof(float) * (size_t)n);
    for (int64_t r = 0; r < n_out; r++) {
        for (int64_t i = 0; i < n; i++) f[i] = tsr_test_gauss(rng);
        tsr_quant_row(TSR_TYPE_Q8_0, f, wd + (size_t)r * rb, n);
    }
    free(f);
    return (tsr_weight){
        .type = TSR_TYPE_Q8_0, .n_in = n, .n_out = n_out, .row_bytes = rb, .data = wd};
}

/* cases[k].key of synth-tiny-more-quants.json's file `rel` whose prompt is `prompt`, as a
 * malloc'd array of ids (*n). */
static int32_t *json_ids_of(const cJSON *a, size_t *n)
{
    *n = (size_t)cJSON_GetArraySize(a);
    int32_t *ids = tsr_test_xmalloc(sizeof(int32_t) * (*n ? *n : 1));
    size_t i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, a) ids[i++] = (int32_t)e->valuedouble;
    return ids;
}

/* The prompt and greedy ids of `prompt` for the synthetic file `rel` in
 * expected/synth-tiny-more-quants.json (the quant types synth-tiny-expected.txt lacks): true
 * when found. */
static bool more_quants_case(const char *rel, const char *prompt, int32_t **prompt_ids,
                             size_t *n_prompt, int32_t **greedy, size_t *n_greedy)
{
    size_t len = 0;
    char *text =
        tsr_test_read_file(tsr_test_model_path("expected/synth-tiny-more-quants.json"), &len);
    if (!text) return false;
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    const cJSON *file =
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, "files"), rel);
    const cJSON *c;
    bool found = false;
    cJSON_ArrayForEach(c, cJSON_GetObjectItemCaseSensitive(file, "cases"))
    {
        const char *p = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "prompt"));
        if (!p || strcmp(p, prompt) != 0) continue;
        *prompt_ids = json_ids_of(cJSON_GetObjectItemCaseSensitive(c, "prompt_ids"), n_prompt);
        *greedy = json_ids_of(cJSON_GetObjectItemCaseSensitive(c, "greedy_ids"), n_greedy);
        found = true;
        break;
    }
    cJSON_Delete(root);
    return found;
}

void tsr_test_lanes_model(const char *rel, uint32_t type, bool chosen, size_t tally_offset)
{
    const char *tn = tsr_type_name(type);
    tsr_test_model f;
    tsr_test_model_open(&f, tsr_test_model_path(rel), 512, 64, 2, TSR_KV_F32);
    int n_type = 0;
    const int n_lanes = tsr_test_count_lanes(f.m, type, &n_type);
    const int want_lanes = chosen && tsr_model_repack_default() ? n_type : 0;
    if (n_type == 0 || n_lanes != want_lanes)
        fail_msg("%s: expected %d of its %d %s layer matrices in the lanes layout, got %d", rel,
                 want_lanes, n_type, tn, n_lanes);
    int32_t tally;
    memcpy(&tally, (const char *)f.m + tally_offset, sizeof tally);
    const int want_tally = n_lanes + (f.m->output.lanes != NULL && f.m->output.type == type);
    if (tally != want_tally)
        fail_msg("%s: the model counts %d %s matrices in the lanes layout, expected %d", rel,
                 (int)tally, tn, want_tally);
    tsr_test_block *b;
    size_t nb = tsr_test_parse_blocks(tsr_test_model_path("expected/synth-tiny-expected.txt"), &b);
    const tsr_test_block *blk =
        tsr_test_find_block(b, nb, rel, "\"Once upon a time\"", "greedy_ids");
    int32_t *want = NULL, *prompt = NULL;
    size_t n_want = 0, n_prompt = 0;
    if (blk) {
        n_want = tsr_test_parse_ids(tsr_test_block_get(blk, "greedy_ids"), &want);
        n_prompt = tsr_test_parse_ids(tsr_test_block_get(blk, "prompt_ids"), &prompt);
    } else if (!more_quants_case(rel, "Once upon a time", &prompt, &n_prompt, &want, &n_want)) {
        fail_msg("%s: no greedy reference in expected/synth-tiny-expected.txt or "
                 "expected/synth-tiny-more-quants.json",
                 rel);
    }
    const size_t n_check = n_want < 32 ? n_want : 32;
    int32_t *got = tsr_test_xmalloc(sizeof(int32_t) * n_check);
    tsr_test_greedy(&f, prompt, n_prompt, (int32_t)n_check, got, NULL);
    char what[256];
    snprintf(what, sizeof what, "%s (%s lanes), greedy", rel, tn);
    tsr_test_check_ids(what, want, got, n_check);
    printf("%s: %d of %d %s layer matrices in the lanes layout, %zu greedy ids as expected\n", rel,
           n_lanes, n_type, tn, n_check);
    free(got);
    free(prompt);
    free(want);
    tsr_test_blocks_free(b, nb);
    tsr_test_model_close(&f);
}

const char *tsr_test_block_get(const tsr_test_block *b, const char *key)
{
    for (size_t k = 0; k < b->n; k++)
        if (strcmp(b->keys[k], key) == 0) return b->vals[k];
    return NULL;
}

size_t tsr_test_parse_ids(const char *s, int32_t **out)
{
    size_t n = 0, cap = 16;
    int32_t *ids = malloc(cap * sizeof *ids);
    char *end;
    for (;;) {
        while (*s == ' ') s++;
        if (!*s) break;
        long v = strtol(s, &end, 10);
        if (end == s) break;
        if (n == cap) ids = realloc(ids, (cap *= 2) * sizeof *ids);
        ids[n++] = (int32_t)v;
        s = end;
    }
    *out = ids;
    return n;
}

char *tsr_test_json_string(const char *s)
{
    cJSON *j = cJSON_Parse(s);
    if (!j || !cJSON_IsString(j)) {
        cJSON_Delete(j);
        return NULL;
    }
    char *r = strdup(j->valuestring);
    cJSON_Delete(j);
    return r;
}

size_t tsr_test_parse_logits(const char *s, int32_t *ids, float *vals, size_t max)
{
    size_t n = 0;
    char *end;
    while (n < max) {
        while (*s == ' ') s++;
        long id = strtol(s, &end, 10);
        if (end == s || *end != ':') break;
        s = end + 1;
        float v = strtof(s, &end);
        if (end == s) break;
        ids[n] = (int32_t)id;
        vals[n] = v;
        n++;
        s = end;
    }
    return n;
}

/* Read all of fd into a malloc'd string. */
static char *slurp_fd(int fd)
{
    size_t n = 0, cap = 4096;
    char *b = malloc(cap);
    for (;;) {
        if (n + 1024 > cap) b = realloc(b, cap *= 2);
        ssize_t r = read(fd, b + n, cap - n - 1);
        if (r <= 0) break;
        n += (size_t)r;
    }
    b[n] = 0;
    return b;
}

int tsr_test_run(const char *cmdline, char **out, char **errout)
{
    char errpath[] = "/tmp/tsr_test_stderr_XXXXXX";
    int efd = mkstemp(errpath);
    if (efd < 0) return -1;
    int pfd[2];
    if (pipe(pfd) != 0) return -1;
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        dup2(pfd[1], 1);
        dup2(efd, 2);
        close(pfd[0]);
        close(pfd[1]);
        execl("/bin/sh", "sh", "-c", cmdline, (char *)NULL);
        _exit(127);
    }
    close(pfd[1]);
    char *o = slurp_fd(pfd[0]);
    close(pfd[0]);
    int st;
    waitpid(pid, &st, 0);
    lseek(efd, 0, SEEK_SET);
    char *e = slurp_fd(efd);
    close(efd);
    unlink(errpath);
    if (out)
        *out = o;
    else
        free(o);
    if (errout)
        *errout = e;
    else
        free(e);
    if (WIFEXITED(st)) return WEXITSTATUS(st);
    if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
    return -1;
}

/* ---- a model on one context, greedy decoding ---- */

void tsr_test_model_load(tsr_test_model *f, const char *path)
{
    char err[512] = "";
    f->c = NULL;
    if (tsr_gguf_open(path, &f->g, err, sizeof err) != 0) fail_msg("open %s: %s", path, err);
    if (tsr_model_load(f->g, &f->m, err, sizeof err) != 0) fail_msg("load %s: %s", path, err);
}

void tsr_test_model_open(tsr_test_model *f, const char *path, int32_t n_ctx, int32_t n_batch,
                         int n_threads, tsr_kv_type kv_type)
{
    char err[512] = "";
    tsr_test_model_load(f, path);
    if (tsr_ctx_new_kv(f->m, n_ctx, n_batch, n_threads, kv_type, &f->c, err, sizeof err) != 0)
        fail_msg("ctx %s (%s): %s", path, tsr_kv_type_name(kv_type), err);
    assert_int_equal(tsr_ctx_kv_type(f->c), kv_type);
}

void tsr_test_model_close(tsr_test_model *f)
{
    tsr_ctx_free(f->c);
    tsr_model_free(f->m);
    tsr_gguf_close(f->g);
}

int32_t tsr_test_argmax(const float *x, int32_t n)
{
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

void tsr_test_greedy(tsr_test_model *f, const int32_t *prompt, size_t n_prompt, int32_t n,
                     int32_t *out, float *logits_after_prompt)
{
    char err[512];
    const float *lg;
    int32_t V = f->m->hp.n_vocab;
    if (tsr_forward(f->c, prompt, (int32_t)n_prompt, 0, false, &lg, err, sizeof err) != 0)
        fail_msg("forward: %s", err);
    if (logits_after_prompt) memcpy(logits_after_prompt, lg, sizeof(float) * (size_t)V);
    for (int32_t i = 0; i < n; i++) {
        out[i] = tsr_test_argmax(lg, V);
        if (i + 1 < n &&
            tsr_forward(f->c, &out[i], 1, (int32_t)n_prompt + i, false, &lg, err, sizeof err))
            fail_msg("forward: %s", err);
    }
}

void tsr_test_check_ids(const char *what, const int32_t *want, const int32_t *got, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (want[i] != got[i]) {
            fprintf(stderr, "%s: first difference at generated index %zu\n  expected:", what, i);
            for (size_t k = i; k < n && k < i + 10; k++) fprintf(stderr, " %d", want[k]);
            fprintf(stderr, "\n  got:     ");
            for (size_t k = i; k < n && k < i + 10; k++) fprintf(stderr, " %d", got[k]);
            fprintf(stderr, "\n");
            fail_msg("%s: greedy ids differ at index %zu (expected %d, got %d)", what, i, want[i],
                     got[i]);
        }
    }
}

float tsr_test_check_logits(const char *what, const char *ref, const float *lg, float tol)
{
    int32_t ids[8];
    float vals[8];
    const size_t n = tsr_test_parse_logits(ref, ids, vals, 8);
    if (n < 5) fail_msg("%s: expected at least 5 reference logits, got %zu in '%s'", what, n, ref);
    float worst = 0.0f;
    for (size_t k = 0; k < n; k++) {
        const float d = fabsf(lg[ids[k]] - vals[k]);
        worst = d > worst ? d : worst;
        if (!(d <= tol))
            fail_msg("%s: logit of token %d: expected %.4f, got %.4f (tolerance %g)", what, ids[k],
                     vals[k], lg[ids[k]], tol);
    }
    return worst;
}

void tsr_test_check_same(const char *what, const float *a, const float *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof(float)) != 0)
            fail_msg("%s: value %zu differs: %.9g vs %.9g", what, i, a[i], b[i]);
}

/* ---- deterministic data ---- */

uint64_t tsr_test_xorshift64(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

uint64_t tsr_test_xorshift64s(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1DULL;
}

double tsr_test_unit(uint64_t r)
{
    return (double)(r >> 11) * 0x1p-53;
}

float tsr_test_frand(uint64_t *s)
{
    return (float)tsr_test_unit(tsr_test_xorshift64(s)) * 2.0f - 1.0f;
}

float tsr_test_gauss(uint64_t *s)
{
    const double u1 = tsr_test_unit(tsr_test_xorshift64s(s)) + 1e-300;
    const double u2 = tsr_test_unit(tsr_test_xorshift64s(s));
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* n_tok activation rows of `type` (Q8_0, Q8_K) of n gaussian draws times t + 1; zero_b1: the
 * second 32-element block all zero */
static uint8_t *test_acts(uint64_t *s, uint32_t type, int64_t n, int32_t n_tok, bool zero_b1)
{
    float *f = tsr_test_xmalloc(sizeof(float) * (size_t)n);
    const size_t rb = tsr_row_bytes(type, n);
    uint8_t *x = tsr_test_xmalloc(rb * (size_t)n_tok);
    for (int32_t t = 0; t < n_tok; t++) {
        for (int64_t i = 0; i < n; i++) f[i] = tsr_test_gauss(s) * (t + 1);
        if (zero_b1 && n >= 64)
            for (int i = 0; i < 32; i++) f[32 + i] = 0.0f;
        tsr_quant_act_row(type, f, x + (size_t)t * rb, n);
    }
    free(f);
    return x;
}

uint8_t *tsr_test_q8_0_acts(uint64_t *s, int64_t n, int32_t n_tok)
{
    return test_acts(s, TSR_TYPE_Q8_0, n, n_tok, true);
}

uint8_t *tsr_test_q8_1_acts(uint64_t *s, int64_t n, int32_t n_tok)
{
    return test_acts(s, TSR_TYPE_Q8_1, n, n_tok, true);
}

uint8_t *tsr_test_q8_K_acts(uint64_t *s, int64_t n, int32_t n_tok)
{
    return test_acts(s, TSR_TYPE_Q8_K, n, n_tok, false);
}

uint8_t *tsr_test_q4_K_rows(uint64_t *s, int64_t n, int64_t n_rows)
{
    enum { BLK = 144 };
    static const float scales[] = {6.0e-8f, 1.0e-4f, 0.0123f, 0.5f, 3.0f, -0.25f};
    const int64_t nsb = n / 256;
    uint8_t *w = tsr_test_xmalloc((size_t)(nsb * n_rows) * BLK);
    for (int64_t i = 0; i < nsb * n_rows; i++) {
        uint8_t *b = w + (size_t)i * BLK;
        for (int e = 4; e < BLK; e++) b[e] = (uint8_t)(tsr_test_xorshift64(s) >> 19);
        const uint16_t hd = tsr_f32_to_f16(scales[tsr_test_xorshift64(s) % 6]);
        const uint16_t hm = tsr_f32_to_f16(scales[tsr_test_xorshift64(s) % 6]);
        memcpy(b, &hd, 2);
        memcpy(b + 2, &hm, 2);
    }
    return w;
}

uint32_t tsr_test_fbits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

float tsr_test_ffrom(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

void tsr_test_check_layouts(const char *isa, int64_t n, int n_rows, int n_tok, int r, int t,
                            float e, float a, float b, float c)
{
    if (tsr_test_fbits(a) != tsr_test_fbits(e) || tsr_test_fbits(b) != tsr_test_fbits(e) ||
        tsr_test_fbits(c) != tsr_test_fbits(e))
        fail_msg("%s n %lld %d rows x %d tokens, row %d token %d: expected %.9g (0x%08x), got "
                 "%.9g (0x%08x) from the file layout, %.9g (0x%08x) repacked by group, %.9g "
                 "(0x%08x) over the groups",
                 isa, (long long)n, n_rows, n_tok, r, t, (double)e, tsr_test_fbits(e), (double)a,
                 tsr_test_fbits(a), (double)b, tsr_test_fbits(b), (double)c, tsr_test_fbits(c));
}
