/*
 * test_spec.c — speculative sampling keeps the target's output distribution exactly.
 *
 * The test statistic: Pearson's chi-square (goodness of fit, or two-sample homogeneity),
 * categories with expected count < 5 pooled, rejected at significance 0.001 (critical value
 * by the Wilson–Hilferty approximation).
 *   1. Sampler level: tsr_sampler_sample_spec with a one-hot draft against the exact
 *      softmax / top-k distribution, over many draws, for several draft tokens; two
 *      deliberately wrong rules (accept any candidate draft; on rejection resample from p
 *      instead of the residual) must FAIL the same test — the test has teeth.
 *   2. Engine level: a random target and an early-exit draft of it (partial acceptance),
 * temperature 1 with top-k 8, 3000 seeds: the tokens at generated positions 1 and 2 (both verified
 * speculatively) are distributed the same with and without speculation (two-sample test).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "coordinator/drafter.h"
#include "coordinator/engine.h"
#include "shard/mkmodel.h"
#include "tests/util.h"

/* Critical value of chi-square with df degrees of freedom at significance 0.001. */
static double chi2_crit(int df)
{
    const double z = 3.0902; /* upper 0.001 normal quantile */
    double k = df, a = 2.0 / (9.0 * k);
    return k * pow(1.0 - a + z * sqrt(a), 3.0);
}

/* Goodness of fit of counts[n] to probs[n]; pools categories with expected < 5. */
static double chi2_fit(const long *counts, const double *probs, int n, long total, int *df)
{
    double stat = 0.0, pool_o = 0.0, pool_e = 0.0;
    int k = 0;
    for (int i = 0; i < n; i++) {
        double e = probs[i] * (double)total;
        if (e < 5.0) {
            pool_o += (double)counts[i];
            pool_e += e;
            continue;
        }
        stat += ((double)counts[i] - e) * ((double)counts[i] - e) / e;
        k++;
    }
    if (pool_e >= 5.0) {
        stat += (pool_o - pool_e) * (pool_o - pool_e) / pool_e;
        k++;
    } else if (pool_o > 0 && pool_e == 0.0) {
        stat = INFINITY; /* a token of probability 0 was drawn */
    }
    *df = k - 1;
    return stat;
}

/* Two-sample homogeneity over n categories. */
static double chi2_two(const long *a, const long *b, int n, int *df)
{
    long na = 0, nb = 0;
    for (int i = 0; i < n; i++) {
        na += a[i];
        nb += b[i];
    }
    double stat = 0.0, pa = 0.0, pb = 0.0;
    int k = 0;
    const double ra = sqrt((double)nb / (double)na), rb = sqrt((double)na / (double)nb);
    for (int i = 0; i < n; i++) {
        double tot = (double)(a[i] + b[i]);
        if (tot == 0) continue;
        /* expected count in the smaller sample < 5: pool */
        if (tot * (double)(na < nb ? na : nb) / (double)(na + nb) < 5.0) {
            pa += (double)a[i];
            pb += (double)b[i];
            continue;
        }
        double d = (double)a[i] * ra - (double)b[i] * rb;
        stat += d * d / tot;
        k++;
    }
    if (pa + pb > 0) {
        double d = pa * ra - pb * rb;
        stat += d * d / (pa + pb);
        k++;
    }
    *df = k - 1;
    return stat;
}

/* ---- 1. sampler level ---- */

typedef enum { RULE_RIGHT, RULE_ACCEPT_CANDIDATE, RULE_RESAMPLE_P } rule;

/* The exact distribution of the sampler for these params: softmax(l / T) over the top-k. */
static void exact_probs(const float *l, int n, float temp, int top_k, double *p)
{
    double mx = -INFINITY, z = 0.0;
    int idx[64];
    for (int i = 0; i < n; i++) idx[i] = i;
    for (int i = 0; i < n; i++) /* sort indices by logit, descending */
        for (int j = i + 1; j < n; j++)
            if (l[idx[j]] > l[idx[i]]) {
                int t = idx[i];
                idx[i] = idx[j];
                idx[j] = t;
            }
    for (int i = 0; i < n; i++) p[i] = 0.0;
    for (int r = 0; r < top_k; r++) mx = fmax(mx, (double)l[idx[r]] / temp);
    for (int r = 0; r < top_k; r++) z += exp((double)l[idx[r]] / temp - mx);
    for (int r = 0; r < top_k; r++) p[idx[r]] = exp((double)l[idx[r]] / temp - mx) / z;
}

static int32_t draw(tsr_sampler *s, const float *l, int n, int32_t draft, rule r)
{
    float buf[64];
    memcpy(buf, l, sizeof(float) * (size_t)n);
    bool ok;
    if (r == RULE_RIGHT) return tsr_sampler_sample_spec(s, buf, draft, &ok);
    /* Wrong rules, built from the plain sampler. */
    int32_t x = tsr_sampler_sample(s, buf);
    if (r == RULE_ACCEPT_CANDIDATE) {
        /* "the draft is plausible (x would be any candidate): accept it" — accept the draft
         * whenever a fresh draw lands among the top half of candidates. */
        return (x % 2 == 0) ? draft : x;
    }
    /* RULE_RESAMPLE_P: accept with p(draft), else sample from p (not the residual). */
    memcpy(buf, l, sizeof(float) * (size_t)n);
    int32_t y = tsr_sampler_sample_spec(s, buf, draft, &ok);
    return ok ? y : x;
}

static double sampler_stat(rule r, int32_t draft, int *df)
{
    const int n = 12;
    const float l[12] = {2.0f, 1.5f, 1.4f, 0.3f, -0.2f, 1.0f, 0.9f, -1.0f, 0.0f, 0.5f, 2.2f, -3.0f};
    tsr_sampling_params sp;
    tsr_sampling_params_default(&sp);
    sp.temperature = 0.8f;
    sp.top_k = 8;
    sp.seed = 1234 + (uint64_t)draft;
    tsr_sampler *s;
    char err[256];
    assert_int_equal(tsr_sampler_new(&sp, n, &s, err, sizeof err), 0);
    double p[12];
    exact_probs(l, n, sp.temperature, sp.top_k, p);
    long counts[12] = {0};
    const long N = 40000;
    for (long i = 0; i < N; i++) counts[draw(s, l, n, draft, r)]++;
    tsr_sampler_free(s);
    return chi2_fit(counts, p, n, N, df);
}

static void test_sampler_rule(void **state)
{
    (void)state;
    /* Drafts: the most likely token, a mid one, one outside the top-k (p = 0). */
    const int32_t drafts[3] = {10, 6, 11};
    for (int d = 0; d < 3; d++) {
        int df;
        double stat = sampler_stat(RULE_RIGHT, drafts[d], &df);
        print_message("right rule, draft %d: chi2 %.1f (df %d, critical %.1f)\n", drafts[d], stat,
                      df, chi2_crit(df));
        if (!(stat < chi2_crit(df)))
            fail_msg("rejection rule with draft %d: chi2 %.1f >= critical %.1f (df %d)", drafts[d],
                     stat, chi2_crit(df), df);
        double w1 = sampler_stat(RULE_ACCEPT_CANDIDATE, drafts[d], &df);
        double c1 = chi2_crit(df);
        double w2 = sampler_stat(RULE_RESAMPLE_P, drafts[d], &df);
        double c2 = chi2_crit(df);
        print_message("wrong rules, draft %d: chi2 %.1f (critical %.1f), %.1f (critical %.1f)\n",
                      drafts[d], w1, c1, w2, c2);
        if (!(w1 > c1)) fail_msg("the test did not catch wrong rule 1 (draft %d)", drafts[d]);
        if (drafts[d] != 11 && !(w2 > c2))
            fail_msg("the test did not catch wrong rule 2 (draft %d)", drafts[d]);
    }
}

/* ---- 2. engine level ---- */

typedef struct {
    int32_t ids[4];
    int n;
} sample;

static void on_event(void *ud, const tsr_event *ev)
{
    sample *s = ud;
    if (ev->kind == TSR_EV_TOKENS)
        for (size_t i = 0; i < ev->n_ids && s->n < 4; i++) s->ids[s->n++] = ev->ids[i];
}

static void collect(tsr_replica *rep, tsr_drafter *d, int n_seeds, sample *out)
{
    char err[512];
    tsr_engine_params ep = {.max_batch_tokens = 128,
                            .max_seqs = 32,
                            .max_queue = 4096,
                            .drafter = d,
                            .spec_k = 3,
                            .spec_max_batch = 64,
                            .spec_default_on = true,
                            .spec_no_probe = true};
    tsr_engine *e;
    assert_int_equal(tsr_engine_new(rep, &ep, &e, err, sizeof err), 0);
    static const int32_t prompt[4] = {1, 403, 407, 261};
    for (int i = 0; i < n_seeds; i++) {
        tsr_engine_request rq = {.prompt_ids = prompt,
                                 .n_prompt = 4,
                                 .speculation = d ? 1 : 0,
                                 .on_event = on_event,
                                 .ud = &out[i]};
        tsr_sampling_params_default(&rq.gen.sampling);
        rq.gen.sampling.temperature = 1.0f;
        rq.gen.sampling.top_k = 8;
        rq.gen.sampling.seed = 1000003ull * (uint64_t)i + 7;
        rq.gen.max_tokens = 3;
        rq.gen.ignore_eos = true;
        if (tsr_engine_submit(e, &rq, NULL, err, sizeof err) != 0) fail_msg("submit: %s", err);
    }
    tsr_engine_stop(e, false);
    assert_int_equal(tsr_engine_run(e, err, sizeof err), 0);
    tsr_engine_status st;
    tsr_engine_get_status(e, &st);
    print_message("%s: %llu drafted, %llu accepted\n", d ? "speculative" : "plain",
                  (unsigned long long)st.spec_drafted, (unsigned long long)st.spec_accepted);
    if (d)
        assert_true(st.spec_drafted > 1000 && st.spec_accepted > 100 &&
                    st.spec_accepted < st.spec_drafted);
    tsr_engine_free(e);
}

static void test_engine_distribution(void **state)
{
    (void)state;
    char target[] = "/tmp/tsr_spec_target_XXXXXX", draft[] = "/tmp/tsr_spec_draft_XXXXXX";
    close(mkstemp(target));
    close(mkstemp(draft));
    char err[512];
    tsr_mkmodel_params mp;
    tsr_mkmodel_params_default(&mp);
    mp.vocab_from = tsr_test_model_path("stories260K.gguf");
    mp.n_layer = 2;
    mp.n_embd = 64;
    mp.n_head = 4;
    mp.n_head_kv = 2;
    mp.n_ff = 128;
    mp.type = "F32";
    mp.out_path = target;
    mp.seed = 21;
    assert_int_equal(tsr_mkmodel(&mp, NULL, err, sizeof err), 0);
    /* The draft: the same seed with one layer — the target's embedding, head and first
     * layer (mkmodel draws tensors in file order), an early-exit draft that agrees often
     * but not always. */
    mp.out_path = draft;
    mp.n_layer = 1;
    assert_int_equal(tsr_mkmodel(&mp, NULL, err, sizeof err), 0);

    tsr_replica_params rp = {
        .tp = 1, .pp = 1, .n_threads = 1, .n_ctx = 64, .n_batch = 128, .n_kv_blocks = 256};
    tsr_replica *rep;
    if (tsr_replica_open(target, &rp, &rep, err, sizeof err) != 0) fail_msg("%s", err);
    const int N = 3000;
    sample *plain = calloc((size_t)N, sizeof *plain), *spec = calloc((size_t)N, sizeof *spec);
    collect(rep, NULL, N, plain);
    tsr_drafter *d;
    if (tsr_drafter_model_new(draft, tsr_replica_gguf(rep), 512, 1, &d, err, sizeof err) != 0)
        fail_msg("%s", err);
    collect(rep, d, N, spec);
    tsr_drafter_free(d);
    const int V = 512;
    long *a = calloc((size_t)V, sizeof(long)), *b = calloc((size_t)V, sizeof(long));
    for (int pos = 1; pos <= 2; pos++) {
        memset(a, 0, sizeof(long) * V);
        memset(b, 0, sizeof(long) * V);
        for (int i = 0; i < N; i++) {
            assert_int_equal(plain[i].n, 3);
            assert_int_equal(spec[i].n, 3);
            a[plain[i].ids[pos]]++;
            b[spec[i].ids[pos]]++;
        }
        int df;
        double stat = chi2_two(a, b, V, &df);
        print_message("generated position %d: two-sample chi2 %.1f (df %d, critical %.1f)\n", pos,
                      stat, df, chi2_crit(df));
        if (!(stat < chi2_crit(df)))
            fail_msg("position %d: distributions with and without speculation differ: chi2 "
                     "%.1f >= %.1f (df %d, significance 0.001)",
                     pos, stat, chi2_crit(df), df);
    }
    free(a);
    free(b);
    free(plain);
    free(spec);
    tsr_replica_close(rep);
    unlink(target);
    unlink(draft);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sampler_rule),
        cmocka_unit_test(test_engine_distribution),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
