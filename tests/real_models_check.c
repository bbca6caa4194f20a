/*
 * real_models_check.c — a real model's greedy ids against llama.cpp's.
 *
 *   real_models_check --expected real-models.json --name qwen2.5-coder-0.5b-instruct \
 *                     -m MODEL.gguf [-t THREADS] [--case K] [--steps N] [--batch B] [--print]
 *
 * For every case of the model in the expected file (../shared/models/README.md section
 * 9.2), raw and chat alike, the prompt is fed as its `prompt_ids` (the check does not
 * depend on the tokenizer) and the model generates greedily (argmax, ties to the lowest
 * id), free-running: each step continues from our own id, as llama.cpp did. The ids must
 * equal llama.cpp's for the first `reliable` steps (the first step whose llama.cpp top-2
 * margin is below 0.01, or all of them up to and including the end-of-generation token;
 * at most --steps). No tolerance: the forward pass follows ggml's CPU numerics (F16 KV
 * cache and attention roundings, ggml's activation quantizers, its summation orders where
 * they matter; docs/architecture.md), so a difference is a bug. On a difference the step,
 * both ids, llama.cpp's margin there and ours are printed and the case fails.
 * --print also prints each case's ids and top-2 margins ("case K ids ...", "case K
 * margins ...") for comparisons by hand. Exit 0 when every case matches.
 */
#include "worker/model.h"

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char *read_file(const char *path)
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
    if (buf) buf[n] = 0;
    fclose(f);
    return buf;
}

/* ids of a JSON array into a fresh int32 array; returns the count or -1. */
static int json_ids(const cJSON *arr, int32_t **out)
{
    if (!cJSON_IsArray(arr)) return -1;
    int n = cJSON_GetArraySize(arr);
    *out = malloc(sizeof(int32_t) * (size_t)(n > 0 ? n : 1));
    int i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, arr)
    {
        if (!cJSON_IsNumber(e)) return -1;
        (*out)[i++] = (int32_t)e->valuedouble;
    }
    return n;
}

/* Top-1 minus top-2 logit, top-1 being x[best]. */
static float margin(const float *x, int32_t n, int32_t best)
{
    float second = -INFINITY;
    for (int32_t i = 0; i < n; i++)
        if (i != best && x[i] > second) second = x[i];
    return x[best] - second;
}

static int32_t argmax(const float *x, int32_t n)
{
    int32_t b = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"expected", required_argument, 0, 'e'}, {"name", required_argument, 0, 'N'},
        {"model", required_argument, 0, 'm'},    {"threads", required_argument, 0, 't'},
        {"case", required_argument, 0, 'k'},     {"batch", required_argument, 0, 'b'},
        {"print", no_argument, 0, 'P'},
        {"steps", required_argument, 0, 'S'},    {0, 0, 0, 0}};
    const char *expected = NULL, *name = NULL, *model = NULL;
    int n_threads = 2, only_case = -1, n_batch = 64, c;
    bool print = false;
    int max_steps = 1 << 30;
    while ((c = getopt_long(argc, argv, "m:t:", opts, NULL)) != -1) {
        switch (c) {
        case 'e':
            expected = optarg;
            break;
        case 'N':
            name = optarg;
            break;
        case 'm':
            model = optarg;
            break;
        case 't':
            n_threads = atoi(optarg);
            break;
        case 'k':
            only_case = atoi(optarg);
            break;
        case 'b':
            n_batch = atoi(optarg);
            break;
        case 'P':
            print = true;
            break;
        case 'S':
            max_steps = atoi(optarg);
            break;
        default:
            return 2;
        }
    }
    if (!expected || !name || !model) {
        fprintf(stderr, "usage: real_models_check --expected JSON --name NAME -m MODEL\n");
        return 2;
    }
    char *text = read_file(expected);
    if (!text) {
        fprintf(stderr, "real_models_check: cannot read %s\n", expected);
        return 1;
    }
    cJSON *root = cJSON_Parse(text);
    const cJSON *entry =
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, "models"), name);
    const cJSON *cases = cJSON_GetObjectItemCaseSensitive(entry, "cases");
    if (!cJSON_IsArray(cases) || cJSON_GetArraySize(cases) == 0) {
        fprintf(stderr, "real_models_check: no cases for '%s' in %s\n", name, expected);
        return 1;
    }
    char err[1024];
    tsr_gguf *g;
    tsr_model *m;
    if (tsr_gguf_open(model, &g, err, sizeof err) || tsr_model_load(g, &m, err, sizeof err)) {
        fprintf(stderr, "real_models_check: %s: %s\n", model, err);
        return 1;
    }
    printf("%s: %s, %d layers, n_embd %d, %d/%d heads of %d, vocab %d\n", name,
           tsr_arch_name(m->hp.arch), m->hp.n_layer, m->hp.n_embd, m->hp.n_head, m->hp.n_head_kv,
           m->hp.head_dim, m->hp.n_vocab);
    int n_fail = 0, k = -1;
    const cJSON *cs;
    cJSON_ArrayForEach(cs, cases)
    {
        k++;
        if (only_case >= 0 && k != only_case) continue;
        int32_t *prompt = NULL, *ids = NULL;
        int n_prompt = json_ids(cJSON_GetObjectItemCaseSensitive(cs, "prompt_ids"), &prompt);
        int n_ids = json_ids(cJSON_GetObjectItemCaseSensitive(cs, "ids"), &ids);
        const cJSON *rel = cJSON_GetObjectItemCaseSensitive(cs, "reliable");
        if (n_prompt < 1 || n_ids < 0 || !cJSON_IsNumber(rel)) {
            fprintf(stderr, "real_models_check: case %d: malformed (prompt_ids, ids, reliable)\n",
                    k);
            return 1;
        }
        const cJSON *margins = cJSON_GetObjectItemCaseSensitive(cs, "margins");
        if (cJSON_GetArraySize(margins) != n_ids) {
            fprintf(stderr, "real_models_check: case %d: margins and ids differ in length\n", k);
            return 1;
        }
        int n_cmp = (int)rel->valuedouble < n_ids ? (int)rel->valuedouble : n_ids;
        if (n_cmp > max_steps) n_cmp = max_steps;
        tsr_ctx *ctx;
        if (tsr_ctx_new(m, n_prompt + n_cmp + 16, n_batch, n_threads, &ctx, err, sizeof err)) {
            fprintf(stderr, "real_models_check: %s\n", err);
            return 1;
        }
        const float *logits;
        int32_t *got = malloc(sizeof(int32_t) * (size_t)(n_cmp > 0 ? n_cmp : 1));
        float *our_margin = malloc(sizeof(float) * (size_t)(n_cmp > 0 ? n_cmp : 1));
        int first_diff = -1;
        int rc = tsr_forward(ctx, prompt, n_prompt, 0, false, &logits, err, sizeof err);
        for (int i = 0; rc == 0 && i < n_cmp; i++) {
            got[i] = argmax(logits, m->hp.n_vocab);
            our_margin[i] = margin(logits, m->hp.n_vocab, got[i]);
            if (got[i] != ids[i] && first_diff < 0) first_diff = i;
            if (i + 1 < n_cmp)
                rc = tsr_forward(ctx, &got[i], 1, n_prompt + i, false, &logits, err, sizeof err);
        }
        if (rc != 0) {
            fprintf(stderr, "real_models_check: case %d: forward: %s\n", k, err);
            return 1;
        }
        if (print) {
            printf("case %d ids", k);
            for (int i = 0; i < n_cmp; i++) printf(" %d", got[i]);
            printf("\ncase %d margins", k);
            for (int i = 0; i < n_cmp; i++) printf(" %.4f", our_margin[i]);
            printf("\n");
        }
        if (first_diff >= 0) {
            n_fail++;
            printf("case %d FAILED: %d prompt ids; step %d of %d: expected id %d (llama.cpp's "
                   "top-2 margin %.3f), got %d (our margin %.4f)\n",
                   k, n_prompt, first_diff, n_cmp, ids[first_diff],
                   cJSON_GetArrayItem(margins, first_diff)->valuedouble, got[first_diff],
                   our_margin[first_diff]);
        } else {
            printf("case %d ok: %d prompt ids; %d greedy ids equal llama.cpp's%s\n", k, n_prompt,
                   n_cmp, n_cmp == n_ids ? "" : " (up to its first near-tie)");
        }
        free(got);
        free(our_margin);
        fflush(stdout);
        free(prompt);
        free(ids);
        tsr_ctx_free(ctx);
    }
    tsr_model_free(m);
    tsr_gguf_close(g);
    cJSON_Delete(root);
    free(text);
    if (n_fail) fprintf(stderr, "real_models_check: %s: %d case(s) FAILED\n", name, n_fail);
    return n_fail ? 1 : 0;
}
