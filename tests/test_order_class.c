/*
 * test_order_class.c — the per-token order class (worker/model.h tsr_order_class) on a model
 * with Q4_K weights (synth-tiny Q4_K_M): a prompt token's logits depend on its class only,
 * never on how it is batched.
 *
 * A sequence of a 14-token prompt (positions 0..11 in the prompt class, 12..13 its tail in
 * the GEMV class) and 3 generated tokens gives the same logits, bit for bit:
 *   - prompt in one batch (all logits), token by token, in chunks of 5, 5, 4;
 *   - with 1 and 2 threads, with repacking on and off (`--no-repack`);
 *   - inside one batch of two sequences with different prompt lengths (so different class
 *     boundaries) and as each sequence alone.
 * And the class is not vacuous: the same prompt with every token in the GEMV class (prompt
 * length 0) differs in some logit of a position below 12, and not at all at the tail.
 * A failure prints the position, logit, and both values.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"
#include "worker/model.h"

enum { L = 14, N_GEN = 3, T = L + N_GEN };
static const char *k_model = "synthetic/synth-tiny-q4_k_m.gguf";

static int32_t k_toks[T];

typedef enum { M_BATCH, M_SINGLE, M_CHUNK } run_mode;

/* Logits of every position of the sequence into out[T][V]. */
static void run(run_mode mode, bool repack, int n_threads, int32_t prompt_len, float *out)
{
    tsr_model_set_repack_default(repack);
    tsr_test_model f;
    tsr_test_model_open(&f, tsr_test_model_path(k_model), 64, mode == M_CHUNK ? 5 : 16, n_threads,
                        TSR_KV_F32);
    tsr_model_set_repack_default(true);
    const int32_t V = f.m->hp.n_vocab;
    tsr_ctx_set_prompt_len(f.c, prompt_len);
    char err[512] = "";
    const float *lg;
    int32_t done = 0;
    while (done < L) {
        const int32_t k = mode == M_BATCH    ? L
                          : mode == M_SINGLE ? 1
                                             : (L - done < 5 ? L - done : 5);
        if (tsr_forward(f.c, k_toks + done, k, done, true, &lg, err, sizeof err) != 0)
            fail_msg("forward: %s", err);
        memcpy(out + (size_t)done * (size_t)V, lg, sizeof(float) * (size_t)V * (size_t)k);
        done += k;
    }
    for (int32_t i = L; i < T; i++) {
        if (tsr_forward(f.c, k_toks + i, 1, i, false, &lg, err, sizeof err) != 0)
            fail_msg("forward: %s", err);
        memcpy(out + (size_t)i * (size_t)V, lg, sizeof(float) * (size_t)V);
    }
    tsr_test_model_close(&f);
}

static void compare(const char *what, const float *a, const float *b, int32_t V, int32_t n_pos)
{
    for (int32_t i = 0; i < n_pos; i++)
        for (int32_t v = 0; v < V; v++) {
            const float x = a[(size_t)i * (size_t)V + (size_t)v];
            const float y = b[(size_t)i * (size_t)V + (size_t)v];
            if (tsr_test_fbits(x) != tsr_test_fbits(y))
                fail_msg("%s: position %d logit %d: expected %.9g (0x%08x), got %.9g (0x%08x)",
                         what, i, v, (double)x, tsr_test_fbits(x), (double)y, tsr_test_fbits(y));
        }
}

static int32_t n_vocab(void)
{
    tsr_test_model f;
    tsr_test_model_open(&f, tsr_test_model_path(k_model), 16, 1, 1, TSR_KV_F32);
    const int32_t V = f.m->hp.n_vocab;
    tsr_test_model_close(&f);
    for (int i = 0; i < T; i++) k_toks[i] = (int32_t)((i * 7919 + 101) % V);
    return V;
}

static void test_batching_does_not_matter(void **state)
{
    (void)state;
    const int32_t V = n_vocab();
    const size_t sz = sizeof(float) * (size_t)T * (size_t)V;
    float *ref = malloc(sz), *got = malloc(sz);
    run(M_BATCH, true, 2, L, ref);
    run(M_SINGLE, true, 2, L, got);
    compare("token by token vs one batch", ref, got, V, T);
    run(M_CHUNK, true, 2, L, got);
    compare("chunks of 5 vs one batch", ref, got, V, T);
    run(M_BATCH, true, 1, L, got);
    compare("1 thread vs 2", ref, got, V, T);
    run(M_BATCH, false, 2, L, got);
    compare("--no-repack vs repacked", ref, got, V, T);
    run(M_SINGLE, false, 1, L, got);
    compare("--no-repack token by token, 1 thread vs repacked batch", ref, got, V, T);

    /* every token in the GEMV class: the prompt class changed something below position 12,
     * and the tail (GEMV in both) nothing */
    run(M_BATCH, true, 2, 0, got);
    int n_diff = 0;
    for (int32_t i = 0; i < (L / 4) * 4; i++)
        for (int32_t v = 0; v < V; v++)
            n_diff +=
                tsr_test_fbits(ref[(size_t)i * V + v]) != tsr_test_fbits(got[(size_t)i * V + v]);
    printf("  prompt class vs GEMV class: %d of %d logits of positions 0..11 differ\n", n_diff,
           (L / 4) * 4 * V);
    if (n_diff == 0) fail_msg("the order class changed no logit: the test cannot tell the classes");
    compare("the prompt's tail (GEMV class either way)", ref + (size_t)12 * V, got + (size_t)12 * V,
            V, 2);
    free(ref);
    free(got);
}

/* Two sequences (prompts of 14 and 7 tokens: classes 1 x 12, 0 x 2 and 1 x 4, 0 x 3) in one
 * batch of a paged context, tokens interleaved, against each alone. */
static void test_mixed_batch(void **state)
{
    (void)state;
    const int32_t V = n_vocab();
    enum { L2 = 7 };
    float *a = malloc(sizeof(float) * (size_t)T * (size_t)V);
    float *b = malloc(sizeof(float) * (size_t)T * (size_t)V);
    run(M_BATCH, true, 2, L, a);
    {
        tsr_test_model f;
        tsr_test_model_open(&f, tsr_test_model_path(k_model), 64, 16, 2, TSR_KV_F32);
        tsr_ctx_set_prompt_len(f.c, L2);
        char err[512] = "";
        const float *lg;
        if (tsr_forward(f.c, k_toks + 5, L2, 0, true, &lg, err, sizeof err) != 0)
            fail_msg("forward: %s", err);
        memcpy(b, lg, sizeof(float) * (size_t)L2 * (size_t)V);
        tsr_test_model_close(&f);
    }
    tsr_gguf *g = NULL;
    tsr_model *m = NULL;
    tsr_ctx *c = NULL;
    char err[512] = "";
    if (tsr_gguf_open(tsr_test_model_path(k_model), &g, err, sizeof err) != 0 ||
        tsr_model_load(g, &m, err, sizeof err) != 0 ||
        tsr_ctx_new_paged_kv(m, 8, 32, 2, TSR_KV_F32, &c, err, sizeof err) != 0)
        fail_msg("open: %s", err);
    enum { N = L + L2 };
    int32_t tok[N], pos[N], seq[N];
    uint8_t want[N], ord[N];
    int32_t row_of[N];
    for (int32_t i = 0, ia = 0, ib = 0; i < N; i++) { /* a a b a a b ... */
        const bool take_a = ib >= L2 || (ia < L && i % 3 != 2);
        const int32_t s = take_a ? 0 : 1, p = take_a ? ia++ : ib++;
        tok[i] = s == 0 ? k_toks[p] : k_toks[5 + p];
        pos[i] = p;
        seq[i] = s;
        want[i] = 1;
        ord[i] = tsr_order_class(p, s == 0 ? L : L2);
        row_of[i] = p;
    }
    const int32_t tab0[4] = {0, 1, 2, 3}, tab1[4] = {4, 5, 6, 7};
    const int32_t *tabs[2] = {tab0, tab1};
    const int32_t nblk[2] = {4, 4};
    tsr_batch bt = {.n_tokens = N,
                    .tokens = tok,
                    .pos = pos,
                    .seq = seq,
                    .want_logits = want,
                    .n_seqs = 2,
                    .block_tables = tabs,
                    .n_blocks = nblk,
                    .order = ord};
    float *logits = malloc(sizeof(float) * (size_t)N * (size_t)V);
    if (tsr_forward_batch(c, &bt, tsr_ctx_hidden(c), logits, err, sizeof err) != 0)
        fail_msg("forward_batch: %s", err);
    for (int32_t i = 0; i < N; i++) {
        const float *want_row = (seq[i] == 0 ? a : b) + (size_t)row_of[i] * (size_t)V;
        char what[96];
        snprintf(what, sizeof what, "sequence %d position %d (class %d) in a mixed batch", seq[i],
                 pos[i], ord[i]);
        compare(what, want_row, logits + (size_t)i * (size_t)V, V, 1);
    }
    free(logits);
    tsr_ctx_free(c);
    tsr_model_free(m);
    tsr_gguf_close(g);
    free(a);
    free(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batching_does_not_matter),
        cmocka_unit_test(test_mixed_batch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
