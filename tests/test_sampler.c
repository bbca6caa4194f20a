/*
 * test_sampler.c — coordinator/sampler (penalties, temperature, top-k/p, min-p, seeded draws)
 * and coordinator/stop (stop strings over streamed deltas).
 *
 * Statistical checks use fixed seeds, so they are deterministic; their tolerances are still
 * several standard deviations wide so that any correct RNG stream would pass. No model files
 * are needed.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/sampler.h"
#include "coordinator/stop.h"
#include "tests/util.h"

/* ---- helpers */

#define assert_near(expected, got, tol, what)                                                      \
    do {                                                                                           \
        double e_ = (expected), g_ = (got);                                                        \
        if (!(fabs(e_ - g_) <= (tol)))                                                             \
            fail_msg("%s: expected %.6f, got %.6f (tolerance %g)", (what), e_, g_, (double)(tol)); \
    } while (0)

#define assert_mem_str(got, got_len, expected)                                                     \
    do {                                                                                           \
        const char *ex_ = (expected);                                                              \
        size_t gl_ = (got_len);                                                                    \
        if (gl_ != strlen(ex_) || memcmp((got), ex_, gl_) != 0)                                    \
            fail_msg("expected \"%s\" (%zu bytes), got \"%.*s\" (%zu bytes)", ex_, strlen(ex_),    \
                     (int)gl_, (const char *)(got), gl_);                                          \
    } while (0)

static tsr_sampler *make_sampler(const tsr_sampling_params *p, int32_t n_vocab)
{
    tsr_sampler *s = NULL;
    char err[256] = "";
    int rc = tsr_sampler_new(p, n_vocab, &s, err, sizeof err);
    if (rc != 0) fail_msg("tsr_sampler_new: %s", err);
    assert_non_null(s);
    return s;
}

/* Sample from a copy of `logits` (the sampler scribbles on its input). */
static int32_t draw(tsr_sampler *s, const float *logits, int32_t n, float *scratch)
{
    memcpy(scratch, logits, (size_t)n * sizeof *scratch);
    int32_t id = tsr_sampler_sample(s, scratch);
    if (id < 0 || id >= n) fail_msg("sampled id %d outside [0, %d)", (int)id, (int)n);
    return id;
}

/* softmax(l / T) in double */
static void softmax(const float *l, int32_t n, double T, double *out)
{
    double mx = -INFINITY, sum = 0.0;
    for (int32_t i = 0; i < n; i++) mx = fmax(mx, (double)l[i] / T);
    for (int32_t i = 0; i < n; i++) sum += (out[i] = exp((double)l[i] / T - mx));
    for (int32_t i = 0; i < n; i++) out[i] /= sum;
}

/* deterministic test data (independent of the sampler's RNG) */
static uint64_t lcg_state;
static float lcg_uniform(void)
{
    lcg_state = lcg_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((lcg_state >> 40) * 0x1.0p-24);
}
static void random_logits(float *l, int32_t n, float scale, uint64_t seed)
{
    lcg_state = seed;
    for (int32_t i = 0; i < n; i++) l[i] = (lcg_uniform() * 2.0f - 1.0f) * scale;
}

/* rank[id] = position of id in (value desc, id asc) order */
static const float *g_rank_vals;
static int cmp_rank(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    float vx = g_rank_vals[x], vy = g_rank_vals[y];
    if (vx != vy) return vx > vy ? -1 : 1;
    return x < y ? -1 : (x > y);
}
static void ranks(const float *l, int32_t n, int32_t *order, int32_t *rank)
{
    for (int32_t i = 0; i < n; i++) order[i] = i;
    g_rank_vals = l;
    qsort(order, (size_t)n, sizeof *order, cmp_rank);
    for (int32_t i = 0; i < n; i++) rank[order[i]] = i;
}

/* Empirical frequencies of `n_draws` draws, compared with `expect` (max abs error). */
static void check_distribution(tsr_sampler *s, const float *l, int32_t n, int32_t n_draws,
                               const double *expect, double tol)
{
    float scratch[16];
    int32_t counts[16] = {0};
    assert_true(n <= 16);
    for (int32_t d = 0; d < n_draws; d++) counts[draw(s, l, n, scratch)]++;
    for (int32_t i = 0; i < n; i++) {
        char what[64];
        snprintf(what, sizeof what, "frequency of token %d", (int)i);
        assert_near(expect[i], (double)counts[i] / n_draws, tol, what);
    }
}

/* ---- greedy */

static void test_greedy_argmax(void **state)
{
    tsr_sampling_params p;
    tsr_sampling_params_default(&p);
    p.temperature = 0.0f;
    tsr_sampler *s = make_sampler(&p, 5);
    float scratch[5];
    const float l[5] = {0.1f, 3.0f, -1.0f, 3.0f, 2.9f};
    assert_int_equal(1, draw(s, l, 5, scratch)); /* tie 1 vs 3 -> lowest id */
    const float neg[5] = {-5.0f, -2.0f, -2.0f, -3.0f, -9.0f};
    assert_int_equal(1, draw(s, neg, 5, scratch));
    const float with_nan[5] = {NAN, 0.5f, 0.7f, NAN, 0.6f};
    assert_int_equal(2, draw(s, with_nan, 5, scratch));
    const float all_inf[5] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    assert_int_equal(0, draw(s, all_inf, 5, scratch));
    tsr_sampler_free(s);

    /* temperature 0 ignores top-k / top-p / min-p (which would exclude nothing here anyway,
     * but must not change the argmax either) and is the same for every seed */
    p.top_k = 3;
    p.top_p = 0.1f;
    p.min_p = 0.9f;
    for (uint64_t seed = 0; seed < 5; seed++) {
        p.seed = seed;
        s = make_sampler(&p, 5);
        for (int i = 0; i < 20; i++) assert_int_equal(1, draw(s, l, 5, scratch));
        tsr_sampler_free(s);
    }
}

static void test_greedy_large_vocab(void **state)
{
    enum { N = 151936 };
    float *l = malloc(N * sizeof *l), *scratch = malloc(N * sizeof *scratch);
    random_logits(l, N, 10.0f, 7);
    int32_t best = 0;
    for (int32_t i = 1; i < N; i++)
        if (l[i] > l[best]) best = i;
    tsr_sampling_params p;
    tsr_sampling_params_default(&p);
    p.temperature = 0.0f;
    tsr_sampler *s = make_sampler(&p, N);
    assert_int_equal(best, draw(s, l, N, scratch));
    tsr_sampler_free(s);
    free(l);
    free(scratch);
}

/* The argmax (8 lanes with AVX2, 4 otherwise: both paths, tsr_sampler_set_avx2; also as
 * tsr_sampler_argmax, which the drafter and `tessera bench` call) and the read-only path against a
 * scalar first-maximum over sizes around the vector widths: ties across lanes and the tail, NaNs
 * everywhere (kind 7: one after the maximum in its lane), signed zeros, +inf, all -inf / NaN (->
 * 0). tsr_sampler_read_only only for greedy without penalties. */
static void test_greedy_read_only(void **state)
{
    (void)state;
    tsr_sampling_params p;
    tsr_sampling_params_default(&p);
    p.temperature = 0.0f;
    uint64_t r = 99;
    for (int32_t n = 1; n <= 70; n++) {
        tsr_sampler *s = make_sampler(&p, n);
        assert_true(tsr_sampler_read_only(s));
        float *l = malloc(sizeof(float) * (size_t)n), *scratch = malloc(sizeof(float) * (size_t)n);
        for (int kind = 0; kind < 8; kind++) {
            for (int32_t i = 0; i < n; i++) {
                r = r * 6364136223846793005ull + 1442695040888963407ull;
                const int v = (int)(r >> 59); /* 0..31: few values, many ties */
                l[i] = kind == 0   ? (float)(v % 5)
                       : kind == 1 ? (v < 8 ? NAN : (float)(v % 3))
                       : kind == 2 ? (v < 16 ? -0.0f : 0.0f)
                       : kind == 3 ? (v == 0 ? INFINITY : (float)v)
                       : kind == 4 ? -INFINITY
                       : kind == 5 ? NAN
                       : kind == 6 ? (v < 16 ? NAN : -INFINITY)
                                   : (i == 0        ? 5.0f
                                      : i % 16 == 0 ? NAN
                                                    : 1.0f);
            }
            int32_t want = 0;
            float mx = -INFINITY;
            for (int32_t i = 0; i < n; i++)
                if (l[i] > mx) {
                    mx = l[i];
                    want = i;
                }
            for (int avx2 = 0; avx2 < 2; avx2++) { /* the portable and the AVX2 argmax */
                tsr_sampler_set_avx2(avx2);
                const int32_t ro = tsr_sampler_sample_read_only(s, l);
                const int32_t am = tsr_sampler_argmax(l, n);
                const int32_t got = draw(s, l, n, scratch);
                tsr_sampler_set_avx2(-1);
                if (ro != want || am != want || got != want)
                    fail_msg("greedy over %d logits (kind %d, %s): read-only %d, "
                             "tsr_sampler_argmax %d, sample %d, the first maximum is %d",
                             (int)n, kind, avx2 ? "AVX2" : "portable", (int)ro, (int)am, (int)got,
                             (int)want);
            }
        }
        free(l);
        free(scratch);
        tsr_sampler_free(s);
    }
    p.repetition_penalty = 1.1f;
    tsr_sampler *s = make_sampler(&p, 5);
    assert_false(tsr_sampler_read_only(s));
    tsr_sampler_free(s);
    tsr_sampling_params_default(&p);
    p.temperature = 0.7f;
    s = make_sampler(&p, 5);
    assert_false(tsr_sampler_read_only(s));
    tsr_sampler_free(s);
}

/* ---- seeds */

static void run_sequence(const tsr_sampling_params *p, const float *l, int32_t n, int32_t *out,
                         int32_t len)
{
    float *scratch = malloc((size_t)n * sizeof *scratch);
    tsr_sampler *s = make_sampler(p, n);
    for (int32_t i = 0; i < len; i++) {
        out[i] = draw(s, l, n, scratch);
        tsr_sampler_accept(s, out[i]);
    }
    tsr_sampler_free(s);
    free(scratch);
}

static void test_seed_determinism(void **state)
{
    enum { N = 1000, LEN = 200 };
    float l[N];
    random_logits(l, N, 3.0f, 11);
    tsr_sampling_params p;
    tsr_sampling_params_default(&p);
    int32_t a[LEN], b[LEN], c[LEN];
    const float top_ps[3] = {1.0f, 0.9f, 0.9f};
    const int32_t top_ks[3] = {0, 0, 50};
    for (int cfg = 0; cfg < 3; cfg++) {
        p.top_p = top_ps[cfg];
        p.top_k = top_ks[cfg];
        p.frequency_penalty = 0.3f;
        p.seed = 42;
        run_sequence(&p, l, N, a, LEN);
        run_sequence(&p, l, N, b, LEN);
        for (int32_t i = 0; i < LEN; i++) {
            if (a[i] != b[i])
                fail_msg("config %d, step %d: same seed gave %d then %d", cfg, (int)i, (int)a[i],
                         (int)b[i]);
        }
        p.seed = 43;
        run_sequence(&p, l, N, c, LEN);
        int32_t differ = 0;
        for (int32_t i = 0; i < LEN; i++) differ += a[i] != c[i];
        if (differ < LEN / 2)
            fail_msg("config %d: seeds 42 and 43 agree on %d of %d steps (expected < %d)", cfg,
                     (int)(LEN - differ), LEN, LEN / 2);
    }
}

/* The draws for generated token i depend on (seed, i) only: a sampler that is handed the
 * first K tokens of a run (as a request resumed after a failover is) draws the rest of that
 * run exactly, with the penalties counting those K tokens as output. */
static void test_resume_same_draws(void **state)
{
    enum { N = 1000, LEN = 120, K = 47 };
    float l[N], scratch[N];
    random_logits(l, N, 3.0f, 12);
    tsr_sampling_params p;
    tsr_sampling_params_default(&p);
    p.top_p = 0.95f;
    p.frequency_penalty = 0.5f;
    p.presence_penalty = 0.3f;
    p.repetition_penalty = 1.2f;
    p.seed = 777;
    int32_t a[LEN], b[LEN];
    run_sequence(&p, l, N, a, LEN);
    tsr_sampler *s = make_sampler(&p, N);
    for (int32_t i = 0; i < K; i++) tsr_sampler_accept(s, a[i]);
    for (int32_t i = K; i < LEN; i++) {
        b[i] = draw(s, l, N, scratch);
        tsr_sampler_accept(s, b[i]);
        if (b[i] != a[i])
            fail_msg("resumed at %d: step %d expected %d (undisturbed run), got %d", K, (int)i,
                     (int)a[i], (int)b[i]);
    }
    tsr_sampler_free(s);
}

/* ---- top-k */

static void test_top_k_one_is_greedy(void **state)
{
    enum { N = 3000 };
    float l[N], scratch[N];
    tsr_sampling_params p;
    tsr_sampling_params_default(&p);
    p.top_k = 1;
    p.temperature = 1.5f;
    tsr_sampler *s = make_sampler(&p, N);
    for (int t = 0; t < 50; t++) {
        random_logits(l, N, 2.0f, 100 + (uint64_t)t);
        l[(t * 37) % N] = 5.0f; /* also a tie, lower id must win */
        l[(t * 37 + 11) % N] = 5.0f;
        int32_t best = 0;
        for (int32_t i = 1; i < N; i++)
            if (l[i] > l[best]) best = i;
        assert_int_equal(best, draw(s, l, N, scratch));
    }
    tsr_sampler_free(s);
}

/* every_rank: also require each of the k to be drawn at least once */
static void check_top_k(int32_t n, int32_t k, float temperature, int32_t n_draws, bool every_rank)
{
    float *l = malloc((size_t)n * sizeof *l), *scratch = malloc((size_t)n * sizeof *scratch);
    int32_t *order = malloc((size_t)n * sizeof *order), *rank = malloc((size_t)n * sizeof *rank);
    random_logits(l, n, 1.0f, 5 + (uint64_t)n);
    ranks(l, n, order, rank);
    tsr_sampling_params p;
    tsr_sampling_params_default(&p);
    p.top_k = k;
    p.temperature = temperature;
    p.seed = 9;
    tsr_sampler *s = make_sampler(&p, n);
    int32_t *hits = calloc((size_t)k, sizeof *hits);
    for (int32_t d = 0; d < n_draws; d++) {
        int32_t id = draw(s, l, n, scratch);
        if (rank[id] >= k)
            fail_msg("top_k=%d over %d tokens: draw %d sampled id %d of rank %d (expected rank "
                     "< %d)",
                     (int)k, (int)n, (int)d, (int)id, (int)rank[id], (int)k);
        hits[rank[id]]++;
    }
    /* nearly flat logits: every one of the k should show up (or, for large k, ranks near
     * the boundary) */
    int32_t max_rank = 0;
    for (int32_t r = 0; r < k; r++) {
        if (hits[r] == 0 && every_rank)
            fail_msg("top_k=%d: rank %d never sampled in %d draws", (int)k, (int)r, (int)n_draws);
        if (hits[r]) max_rank = r;
    }
    if (max_rank < k * 9 / 10)
        fail_msg("top_k=%d: highest sampled rank %d (expected near %d)", (int)k, (int)max_rank,
                 (int)k);
    tsr_sampler_free(s);
    free(hits);
    free(l);
    free(scratch);
    free(order);
    free(rank);
}

static void test_top_k_set(void **state)
{
    check_top_k(5000, 10, 1.0f, 5000, true);
    check_top_k(151936, 40, 2.0f, 400, true);    /* bounded heap on a real-size vocabulary */
    check_top_k(20000, 6000, 1.0f, 2000, false); /* large k: quickselect */
}

static void test_top_k_ties_at_boundary(void **state)
{
    /* ids 1..4 tie for second place; top_k=3 keeps id 0 and the two lowest tied ids */
    const float l[6] = {2.0f, 1.0f, 1.0f, 1.0f, 1.0f, -3.0f};
    float scratch[6];
    tsr_sampling_params p;
    tsr_sampling_params_default(&p);
    p.top_k = 3;
    tsr_sampler *s = make_sampler(&p, 6);
    int32_t counts[6] = {0};
    for (int d = 0; d < 20000; d++) counts[draw(s, l, 6, scratch)]++;
    for (int i = 3; i < 6; i++) assert_int_equal(0, counts[i]);
    for (int i = 0; i < 3; i++) assert_true(counts[i] > 0);
    tsr_sampler_free(s);
}

/* ---- top-p / min-p */

static void test_top_p_hand_built(void **state)
{
    /* probabilities in shuffled id order: sorted they are 0.4 (id 1), 0.3 (id 3), 0.15 (id 4),
     * 0.1 (id 2), 0.05 (id 0) */
    const double probs[5] = {0.05, 0.4, 0.1, 0.3, 0.15};
    float l[5];
    for (int i = 0; i < 5; i++) l[i] = (float)log(probs[i]);
    struct {
        float top_p;
        double expect[5]; /* renormalised nucleus */
    } cases[] = {
        {0.3f, {0, 1, 0, 0, 0}},
        {0.65f, {0, 0.4 / 0.7, 0, 0.3 / 0.7, 0}},
        {0.75f, {0, 0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85}},
        {0.9f, {0, 0.4 / 0.95, 0.1 / 0.95, 0.3 / 0.95, 0.15 / 0.95}},
        {0.99f, {0.05, 0.4, 0.1, 0.3, 0.15}},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        tsr_sampling_params p;
        tsr_sampling_params_default(&p);
        p.top_p = cases[c].top_p;
        p.seed = 1000 + c;
        tsr_sampler *s = make_sampler(&p, 5);
        /* tokens outside the nucleus must have count exactly 0: expect 0 with tolerance 0 */
        float scratch[5];
        int32_t counts[5] = {0};
        const int32_t n_draws = 60000;
        for (int32_t d = 0; d < n_draws; d++) counts[draw(s, l, 5, scratch)]++;
        for (int i = 0; i < 5; i++) {
            char what[96];
            snprintf(what, sizeof what, "top_p=%.2f: frequency of token %d", cases[c].top_p, i);
            if (cases[c].expect[i] == 0.0)
                assert_near(0.0, (double)counts[i] / n_draws, 0.0, what);
            else
                assert_near(cases[c].expect[i], (double)counts[i] / n_draws, 0.008, what);
        }
        tsr_sampler_free(s);
    }
}

/* Reference nucleus size over the tokens in `order` (already restricted to the first m). */
static int32_t ref_nucleus(const float *l, const int32_t *order, int32_t m, double top_p)
{
    double mx = l[order[0]], z = 0.0, cum = 0.0;
    for (int32_t i = 0; i < m; i++) z += exp((double)l[order[i]] - mx);
    for (int32_t i = 0; i < m; i++) {
        cum += exp((double)l[order[i]] - mx);
        if (cum >= top_p * z) return i + 1;
    }
    return m;
}

static void check_top_p_large(int32_t n, int32_t top_k, float top_p, int32_t n_draws)
{
    float *l = malloc((size_t)n * sizeof *l), *scratch = malloc((size_t)n * sizeof *scratch);
    int32_t *order = malloc((size_t)n * sizeof *order), *rank = malloc((size_t)n * sizeof *rank);
    random_logits(l, n, 1.0f, 77); /* nearly flat: the nucleus holds thousands of tokens */
    ranks(l, n, order, rank);
    int32_t m = top_k > 0 && top_k < n ? top_k : n;
    int32_t cut = ref_nucleus(l, order, m, top_p);
    tsr_sampling_params p;
    tsr_sampling_params_default(&p);
    p.top_p = top_p;
    p.top_k = top_k;
    p.seed = 3;
    tsr_sampler *s = make_sampler(&p, n);
    int32_t max_rank = 0;
    for (int32_t d = 0; d < n_draws; d++) {
        int32_t id = draw(s, l, n, scratch);
        /* one token of slack at the boundary for float vs double summation */
        if (rank[id] > cut)
            fail_msg("top_p=%.2f top_k=%d: sampled rank %d, nucleus is ranks [0, %d)",
                     (double)top_p, (int)top_k, (int)rank[id], (int)cut);
        if (rank[id] > max_rank) max_rank = rank[id];
    }
    if (max_rank < cut * 8 / 10)
        fail_msg("top_p=%.2f top_k=%d: highest sampled rank %d, nucleus is ranks [0, %d): "
                 "cut too early?",
                 (double)top_p, (int)top_k, (int)max_rank, (int)cut);
    tsr_sampler_free(s);
    free(l);
    free(scratch);
    free(order);
    free(rank);
}

static void test_top_p_large_vocab(void **state)
{
    check_top_p_large(20000, 0, 0.5f, 3000);   /* growing sorted head: 256, 1024, ... */
    check_top_p_large(20000, 300, 0.5f, 3000); /* top-k first, then top-p over its softmax */
    check_top_p_large(151936, 0, 0.02f, 500);
}

static void test_min_p(void **state)
{
    /* p_max = 0.5, min_p = 0.2 -> floor 0.1: tokens 0..2 kept, 3..5 (0.09, 0.05, 0.04) never */
    const double probs[6] = {0.5, 0.2, 0.12, 0.09, 0.05, 0.04};
    float l[6];
    for (int i = 0; i < 6; i++) l[i] = (float)log(probs[i]);
    const double kept = 0.5 + 0.2 + 0.12;
    const double expect[6] = {0.5 / kept, 0.2 / kept, 0.12 / kept, 0, 0, 0};
    /* the same set through each code path: min-p alone, with top-k, with top-p */
    const int32_t top_ks[3] = {0, 5, 0};
    const float top_ps[3] = {1.0f, 1.0f, 0.99f};
    for (int c = 0; c < 3; c++) {
        tsr_sampling_params p;
        tsr_sampling_params_default(&p);
        p.min_p = 0.2f;
        p.top_k = top_ks[c];
        p.top_p = top_ps[c];
        p.seed = 50 + (uint64_t)c;
        tsr_sampler *s = make_sampler(&p, 6);
        float scratch[6];
        int32_t counts[6] = {0};
        const int32_t n_draws = 60000;
        for (int32_t d = 0; d < n_draws; d++) counts[draw(s, l, 6, scratch)]++;
        for (int i = 0; i < 6; i++) {
            char what[96];
            snprintf(what, sizeof what, "min_p path %d: frequency of token %d", c, i);
            assert_near(expect[i], (double)counts[i] / n_draws, expect[i] == 0 ? 0.0 : 0.008, what);
        }
        tsr_sampler_free(s);
    }
    /* min_p = 1: only the max */
    tsr_sampling_params p;
    tsr_sampling_params_default(&p);
    p.min_p = 1.0f;
    tsr_sampler *s = make_sampler(&p, 6);
    float scratch[6];
    for (int d = 0; d < 1000; d++) assert_int_equal(0, draw(s, l, 6, scratch));
    tsr_sampler_free(s);
}

/* Masked logits (-inf, as a grammar would leave them), NaN and +inf through every path. */
static void test_masked_logits(void **state)
{
    enum { N = 1000 };
    static float l[N], scratch[N];
    const float cfgs[][4] = {
        /* temperature, top_k, top_p, min_p */
        {0.0f, 0, 1.0f, 0.0f}, {1.0f, 0, 1.0f, 0.0f}, {1.0f, 5, 1.0f, 0.0f},
        {1.0f, 0, 0.9f, 0.0f}, {1.0f, 0, 1.0f, 0.1f}, {0.7f, 50, 0.95f, 0.05f},
    };
    for (size_t c = 0; c < sizeof cfgs / sizeof cfgs[0]; c++) {
        tsr_sampling_params p;
        tsr_sampling_params_default(&p);
        p.temperature = cfgs[c][0];
        p.top_k = (int32_t)cfgs[c][1];
        p.top_p = cfgs[c][2];
        p.min_p = cfgs[c][3];
        tsr_sampler *s = make_sampler(&p, N);
        /* two allowed tokens, the rest -inf or NaN */
        for (int32_t i = 0; i < N; i++) l[i] = (i % 3) ? -INFINITY : NAN;
        l[417] = 1.0f;
        l[903] = 1.2f;
        int32_t seen417 = 0;
        for (int d = 0; d < 300; d++) {
            int32_t id = draw(s, l, N, scratch);
            if (id != 417 && id != 903)
                fail_msg("config %zu: sampled masked token %d (expected 417 or 903)", c, (int)id);
            seen417 += id == 417;
        }
        if (p.temperature == 0.0f) assert_int_equal(0, seen417);
        /* nothing allowed: id 0 (documented), never a crash */
        for (int32_t i = 0; i < N; i++) l[i] = -INFINITY;
        assert_int_equal(0, draw(s, l, N, scratch));
        /* +inf: the first of them */
        l[10] = 3.0f;
        l[600] = INFINITY;
        l[700] = INFINITY;
        assert_int_equal(600, draw(s, l, N, scratch));
        tsr_sampler_free(s);
    }
}

/* ---- distributions */

static void test_distribution_temperature_1(void **state)
{
    const float l[5] = {1.0f, 2.0f, 0.5f, -1.0f, 1.5f};
    double expect[5];
    softmax(l, 5, 1.0, expect);
    tsr_sampling_params p;
    tsr_sampling_params_default(&p);
    p.seed = 2024;
    tsr_sampler *s = make_sampler(&p, 5);
    check_distribution(s, l, 5, 200000, expect, 0.005);
    tsr_sampler_free(s);
}

static void test_temperature_scaling(void **state)
{
    const float l[5] = {1.0f, 2.0f, 0.5f, -1.0f, 1.5f};
    const float temps[3] = {0.5f, 2.0f, 0.25f};
    for (int t = 0; t < 3; t++) {
        double expect[5];
        softmax(l, 5, temps[t], expect);
        tsr_sampling_params p;
        tsr_sampling_params_default(&p);
        p.temperature = temps[t];
        p.seed = 99 + (uint64_t)t;
        tsr_sampler *s = make_sampler(&p, 5);
        check_distribution(s, l, 5, 200000, expect, 0.005);
        tsr_sampler_free(s);
    }
    /* T = 0.5 squares the odds: p1/p0 = e^(2*(2-1)) */
    double e[5];
    softmax(l, 5, 0.5, e);
    assert_near(exp(2.0), e[1] / e[0], 1e-9, "odds at T=0.5");
}

/* ---- penalties */

static void test_penalties_exact(void **state)
{
    tsr_sampling_params p;
    tsr_sampling_params_default(&p);
    p.repetition_penalty = 2.0f;
    p.presence_penalty = 0.5f;
    p.frequency_penalty = 0.25f;
    tsr_sampler *s = make_sampler(&p, 6);
    const int32_t prompt[3] = {0, 4, 4};
    tsr_sampler_add_prompt(s, prompt, 3);
    tsr_sampler_accept(s, 1);
    tsr_sampler_accept(s, 1);
    tsr_sampler_accept(s, 5);
    tsr_sampler_accept(s, 99); /* out of range: ignored */
    tsr_sampler_accept(s, -1);
    float l[6] = {2.0f, -2.0f, 1.0f, 0.5f, -1.5f, 3.0f};
    tsr_sampler_apply_penalties(s, l);
    const float expect[6] = {
        2.0f / 2.0f,                        /* prompt only: repetition, positive -> divide */
        -2.0f * 2.0f - 0.25f * 2.0f - 0.5f, /* generated twice, negative -> multiply */
        1.0f,                               /* never seen */
        0.5f,                               /* never seen */
        -1.5f * 2.0f,                       /* prompt only (twice): counts once */
        3.0f / 2.0f - 0.25f - 0.5f,         /* generated once */
    };
    for (int i = 0; i < 6; i++) {
        char what[64];
        snprintf(what, sizeof what, "penalised logit of token %d", i);
        assert_near(expect[i], l[i], 0.0, what);
    }
    tsr_sampler_free(s);

    /* presence / frequency do not apply to prompt tokens */
    tsr_sampling_params_default(&p);
    p.presence_penalty = 2.0f;
    p.frequency_penalty = 2.0f;
    s = make_sampler(&p, 3);
    tsr_sampler_add_prompt(s, (const int32_t[]){0, 0, 0}, 3);
    float l2[3] = {1.0f, 0.0f, 0.0f};
    tsr_sampler_apply_penalties(s, l2);
    assert_near(1.0, l2[0], 0.0, "prompt token under presence/frequency");
    tsr_sampler_free(s);

    /* negative presence/frequency encourage repeats */
    tsr_sampling_params_default(&p);
    p.presence_penalty = -1.0f;
    p.frequency_penalty = -0.5f;
    s = make_sampler(&p, 3);
    tsr_sampler_accept(s, 2);
    tsr_sampler_accept(s, 2);
    tsr_sampler_accept(s, 2);
    float l3[3] = {0.0f, 0.0f, 0.0f};
    tsr_sampler_apply_penalties(s, l3);
    assert_near(0.0 + 0.5 * 3 + 1.0, l3[2], 0.0, "negative penalties on a generated token");
    tsr_sampler_free(s);
}

static void test_penalties_through_greedy(void **state)
{
    const float l[3] = {1.0f, 0.9f, 0.1f};
    float scratch[3];
    tsr_sampling_params p;
    tsr_sampling_params_default(&p);
    p.temperature = 0.0f;
    p.presence_penalty = 0.2f;
    tsr_sampler *s = make_sampler(&p, 3);
    assert_int_equal(0, draw(s, l, 3, scratch));
    tsr_sampler_accept(s, 0); /* 1.0 - 0.2 = 0.8 < 0.9 */
    assert_int_equal(1, draw(s, l, 3, scratch));
    tsr_sampler_free(s);

    /* repetition penalty from the prompt alone flips the choice */
    tsr_sampling_params_default(&p);
    p.temperature = 0.0f;
    p.repetition_penalty = 1.2f; /* 1.0 / 1.2 = 0.833 < 0.9 */
    s = make_sampler(&p, 3);
    tsr_sampler_add_prompt(s, (const int32_t[]){0}, 1);
    assert_int_equal(1, draw(s, l, 3, scratch));
    tsr_sampler_free(s);

    /* frequency grows with the count: 1.0 - 0.04 * n drops below 0.9 after 3 */
    tsr_sampling_params_default(&p);
    p.temperature = 0.0f;
    p.frequency_penalty = 0.04f;
    s = make_sampler(&p, 3);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(0, draw(s, l, 3, scratch));
        tsr_sampler_accept(s, 0);
    }
    assert_int_equal(0, draw(s, l, 3, scratch)); /* 0.92 */
    tsr_sampler_accept(s, 0);
    assert_int_equal(1, draw(s, l, 3, scratch)); /* 0.88 */
    tsr_sampler_free(s);
}

/* ---- the AVX2 passes against the portable ones */

/* The AVX2 passes (sampler.c: exp, sums, max, the candidate scans) against the portable
 * 4-lane ones: the same weights and sums bit for bit (tsr_sampler_weights), and every
 * filter's path drawn with each from the same seed: the same ids, the same
 * log-probabilities bit for bit, and the same speculative verdicts, over vocabulary sizes
 * around the vector widths and the sums' 64-blocks, logits with NaN, +-inf and signed zeros
 * sprinkled in, and a peaked vocabulary of Qwen2.5's size. */
static void test_avx2_paths_agree(void **state)
{
    (void)state;
    static const int32_t sizes[] = {1,  3,  4,  5,  7,  8,   9,   12,   15,    16,
                                    17, 63, 64, 65, 68, 127, 129, 1000, 151936};
    struct {
        float temp, top_p, min_p;
        int32_t top_k;
    } ps[] = {{1.0f, 1.0f, 0.0f, 0},  {0.7f, 0.9f, 0.0f, 0},  {0.7f, 0.95f, 0.0f, 40},
              {0.8f, 1.0f, 0.05f, 0}, {1.3f, 0.5f, 0.02f, 0}, {0.9f, 1.0f, 0.0f, 3}};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        const int32_t n = sizes[si];
        float *l = malloc(sizeof(float) * (size_t)n), *a = malloc(sizeof(float) * (size_t)n),
              *b = malloc(sizeof(float) * (size_t)n);
        for (int kind = 0; kind < 2; kind++) {
            random_logits(l, n, kind ? 4.0f : 10.0f, 1000 + (uint64_t)n);
            if (kind == 1) { /* peaked, as a model's: a few tokens far above the rest */
                for (int32_t i = 0; i < n; i += 997) l[i] += 25.0f;
            } else {
                for (int32_t i = 5; i < n; i += 11)
                    l[i] = (i / 11) % 4 == 0   ? NAN
                           : (i / 11) % 4 == 1 ? -INFINITY
                           : (i / 11) % 4 == 2 ? -0.0f
                                               : 0.0f;
            }
            for (int ti = 0; ti < 2; ti++) { /* the weights and their sum, bit for bit */
                double z[2];
                for (int v = 0; v < 2; v++) {
                    float *sc = v ? b : a;
                    memcpy(sc, l, sizeof(float) * (size_t)n);
                    tsr_sampler_set_avx2(v);
                    z[v] = tsr_sampler_weights(sc, n, ti ? 0.7f : 1.0f, sc);
                }
                tsr_sampler_set_avx2(-1);
                if (memcmp(&z[0], &z[1], sizeof z[0]) != 0 ||
                    memcmp(a, b, sizeof(float) * (size_t)n) != 0)
                    fail_msg("n %d, logits %d, temperature %s: portable sum %.17g, AVX2 %.17g%s",
                             (int)n, kind, ti ? "0.7" : "1", z[0], z[1],
                             z[0] == z[1] ? " (the weights differ)" : "");
            }
            for (size_t pi = 0; pi < sizeof ps / sizeof ps[0]; pi++) {
                tsr_sampling_params p;
                tsr_sampling_params_default(&p);
                p.temperature = ps[pi].temp;
                p.top_p = ps[pi].top_p;
                p.min_p = ps[pi].min_p;
                p.top_k = ps[pi].top_k;
                p.seed = 7 + pi;
                tsr_sampler *sa = make_sampler(&p, n), *sb = make_sampler(&p, n);
                for (int d = 0; d < 6; d++) {
                    int32_t ids[2], tops[2][4] = {{0}}; /* n < 4: the rest stays 0 */
                    float lps[2][4] = {{0}}, chosen[2] = {0, 0};
                    bool ok[2];
                    int32_t spec[2];
                    tsr_sampler *ss[2] = {sa, sb};
                    float *sc[2] = {a, b};
                    for (int v = 0; v < 2; v++) {
                        tsr_sampler_set_avx2(v);
                        memcpy(sc[v], l, sizeof(float) * (size_t)n);
                        ids[v] = d % 2 ? tsr_sampler_sample(ss[v], sc[v])
                                       : tsr_sampler_sample_logprobs(ss[v], sc[v], 4, tops[v],
                                                                     lps[v], &chosen[v]);
                        tsr_sampler_accept(ss[v], ids[v]);
                        memcpy(sc[v], l, sizeof(float) * (size_t)n);
                        spec[v] =
                            tsr_sampler_sample_spec(ss[v], sc[v], (int32_t)(d * 31) % n, &ok[v]);
                        tsr_sampler_accept(ss[v], spec[v]);
                    }
                    tsr_sampler_set_avx2(-1);
                    if (ids[0] != ids[1] || spec[0] != spec[1] || ok[0] != ok[1])
                        fail_msg("n %d, logits %d, params %zu, draw %d: portable id %d / spec %d "
                                 "(%d), AVX2 id %d / spec %d (%d)",
                                 (int)n, kind, pi, d, (int)ids[0], (int)spec[0], (int)ok[0],
                                 (int)ids[1], (int)spec[1], (int)ok[1]);
                    if (d % 2 == 0 && (memcmp(&chosen[0], &chosen[1], sizeof(float)) != 0 ||
                                       memcmp(tops[0], tops[1], sizeof tops[0]) != 0 ||
                                       memcmp(lps[0], lps[1], sizeof lps[0]) != 0))
                        fail_msg("n %d, logits %d, params %zu, draw %d: log-probabilities differ "
                                 "(chosen %.9g portable, %.9g AVX2)",
                                 (int)n, kind, pi, d, (double)chosen[0], (double)chosen[1]);
                }
                tsr_sampler_free(sa);
                tsr_sampler_free(sb);
            }
        }
        free(l);
        free(a);
        free(b);
    }
}

/* ---- logprobs */

static void test_logprobs(void **state)
{
    const float l[4] = {1.0f, 3.0f, 2.0f, 3.0f};
    tsr_sampling_params p;
    tsr_sampling_params_default(&p);
    p.temperature = 2.0f;
    p.top_k = 2;
    tsr_sampler *s = make_sampler(&p, 4);
    double sm[4];
    softmax(l, 4, 2.0, sm);
    for (int d = 0; d < 20; d++) {
        float scratch[4], top_lp[3], chosen;
        int32_t top_ids[3];
        memcpy(scratch, l, sizeof l);
        int32_t id = tsr_sampler_sample_logprobs(s, scratch, 3, top_ids, top_lp, &chosen);
        assert_true(id == 1 || id == 3);
        assert_int_equal(1, top_ids[0]); /* tie: lowest id first */
        assert_int_equal(3, top_ids[1]);
        assert_int_equal(2, top_ids[2]);
        for (int i = 0; i < 3; i++)
            assert_near(log(sm[top_ids[i]]), top_lp[i], 1e-5, "top logprob");
        assert_near(log(sm[id]), chosen, 1e-5, "chosen logprob");
    }
    tsr_sampler_free(s);

    /* every sampling path (plain, top-p, min-p, top-k + top-p) reports the same logprobs,
     * those of the full distribution at the temperature */
    const float l5[5] = {0.5f, -1.0f, 2.5f, 2.0f, 0.0f};
    double sm5[5];
    softmax(l5, 5, 0.8, sm5);
    const float paths[4][3] = {{0, 1.0f, 0.0f}, {0, 0.9f, 0.0f}, {0, 1.0f, 0.1f}, {3, 0.8f, 0}};
    for (int c = 0; c < 4; c++) {
        tsr_sampling_params_default(&p);
        p.temperature = 0.8f;
        p.top_k = (int32_t)paths[c][0];
        p.top_p = paths[c][1];
        p.min_p = paths[c][2];
        s = make_sampler(&p, 5);
        for (int d = 0; d < 50; d++) {
            float scratch[5], top_lp[2], chosen;
            int32_t top_ids[2];
            memcpy(scratch, l5, sizeof l5);
            int32_t id = tsr_sampler_sample_logprobs(s, scratch, 2, top_ids, top_lp, &chosen);
            char what[64];
            snprintf(what, sizeof what, "path %d: chosen logprob of token %d", c, (int)id);
            assert_near(log(sm5[id]), chosen, 1e-5, what);
            assert_int_equal(2, top_ids[0]);
            assert_int_equal(3, top_ids[1]);
            assert_near(log(sm5[2]), top_lp[0], 1e-5, "top logprob");
        }
        tsr_sampler_free(s);
    }

    /* greedy: logprobs at temperature 1 */
    tsr_sampling_params_default(&p);
    p.temperature = 0.0f;
    s = make_sampler(&p, 4);
    softmax(l, 4, 1.0, sm);
    float scratch[4], top_lp[8], chosen;
    int32_t top_ids[8];
    memcpy(scratch, l, sizeof l);
    assert_int_equal(1, tsr_sampler_sample_logprobs(s, scratch, 8, top_ids, top_lp, &chosen));
    assert_near(log(sm[1]), chosen, 1e-5, "greedy chosen logprob");
    assert_int_equal(0, top_ids[3]);
    assert_near(log(sm[0]), top_lp[3], 1e-5, "greedy last logprob");
    tsr_sampler_free(s);
}

/* ---- validation */

static void expect_invalid(const tsr_sampling_params *p, const char *field)
{
    char err[256] = "";
    int rc = tsr_sampling_params_validate(p, err, sizeof err);
    if (rc >= 0) fail_msg("bad %s: expected a negative status, got %d", field, rc);
    if (!strstr(err, field)) fail_msg("bad %s: error \"%s\" does not name the field", field, err);
    tsr_sampler *s = (tsr_sampler *)1;
    err[0] = 0;
    rc = tsr_sampler_new(p, 10, &s, err, sizeof err);
    if (rc >= 0 || s != NULL || !strstr(err, field))
        fail_msg("tsr_sampler_new with bad %s: rc %d, err \"%s\"", field, rc, err);
}

static void test_validation(void **state)
{
    tsr_sampling_params p, d;
    tsr_sampling_params_default(&d);
    char err[256];
    assert_int_equal(0, tsr_sampling_params_validate(&d, err, sizeof err));
    assert_near(1.0, d.temperature, 0.0, "default temperature");

    struct {
        const char *field;
        float *slot;
        float bad[4];
        int n_bad;
    } cases[] = {
        {"temperature", &p.temperature, {-0.1f, NAN, INFINITY}, 3},
        {"top_p", &p.top_p, {0.0f, 1.01f, -0.5f, NAN}, 4},
        {"min_p", &p.min_p, {-0.01f, 1.01f, NAN}, 3},
        {"repetition_penalty", &p.repetition_penalty, {0.0f, -1.0f, INFINITY, NAN}, 4},
        {"presence_penalty", &p.presence_penalty, {-2.01f, 2.01f, NAN}, 3},
        {"frequency_penalty", &p.frequency_penalty, {-2.5f, 2.5f, NAN}, 3},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        for (int i = 0; i < cases[c].n_bad; i++) {
            p = d;
            *cases[c].slot = cases[c].bad[i];
            expect_invalid(&p, cases[c].field);
        }
    }
    /* the edges that are allowed */
    p = d;
    p.temperature = 0.0f;
    p.top_p = 1.0f;
    p.min_p = 1.0f;
    p.presence_penalty = -2.0f;
    p.frequency_penalty = 2.0f;
    p.repetition_penalty = 0.01f;
    p.top_k = -5;
    assert_int_equal(0, tsr_sampling_params_validate(&p, err, sizeof err));

    tsr_sampler *s = NULL;
    assert_true(tsr_sampler_new(&d, 0, &s, err, sizeof err) < 0);
    assert_null(s);
    assert_non_null(strstr(err, "n_vocab"));
    tsr_sampler_free(NULL);
}

/* ---- stop strings */

typedef struct {
    char text[1024];
    size_t len;
} sink;

static int push(tsr_stop *st, sink *k, const char *delta)
{
    const char *out;
    size_t n;
    int rc = tsr_stop_push(st, delta, strlen(delta), &out, &n);
    assert_true(rc >= 0);
    assert_non_null(out);
    assert_true(k->len + n < sizeof k->text);
    memcpy(k->text + k->len, out, n);
    k->len += n;
    k->text[k->len] = 0;
    return rc;
}

static void flush(tsr_stop *st, sink *k)
{
    const char *out;
    size_t n;
    tsr_stop_flush(st, &out, &n);
    assert_non_null(out);
    memcpy(k->text + k->len, out, n);
    k->len += n;
    k->text[k->len] = 0;
}

static void init_stops(tsr_stop *st, const char *const *stops, size_t n)
{
    char err[128] = "";
    if (tsr_stop_init(st, stops, n, err, sizeof err) != 0) fail_msg("tsr_stop_init: %s", err);
}

static void test_stop_split_across_deltas(void **state)
{
    const char *stops[] = {"</answer>"};
    tsr_stop st;
    init_stops(&st, stops, 1);
    sink k = {0};
    assert_int_equal(0, push(&st, &k, "The result is 42<"));
    assert_mem_str(k.text, k.len, "The result is 42");
    assert_int_equal(1, tsr_stop_held(&st));
    assert_int_equal(0, push(&st, &k, "/ans"));
    assert_mem_str(k.text, k.len, "The result is 42");
    assert_int_equal(1, push(&st, &k, "wer> and more"));
    assert_mem_str(k.text, k.len, "The result is 42");
    assert_int_equal(0, tsr_stop_matched(&st));
    /* after the stop: nothing more, flush gives nothing */
    assert_int_equal(1, push(&st, &k, "tail"));
    flush(&st, &k);
    assert_mem_str(k.text, k.len, "The result is 42");
    tsr_stop_free(&st);
}

static void test_stop_partial_released(void **state)
{
    const char *stops[] = {"STOP"};
    tsr_stop st;
    init_stops(&st, stops, 1);
    sink k = {0};
    assert_int_equal(0, push(&st, &k, "ab ST"));
    assert_mem_str(k.text, k.len, "ab ");
    assert_int_equal(0, push(&st, &k, "O"));
    assert_mem_str(k.text, k.len, "ab ");
    assert_int_equal(0, push(&st, &k, "Xy S"));
    assert_mem_str(k.text, k.len, "ab STOXy ");
    assert_int_equal(0, push(&st, &k, "SSTO")); /* "S" released, "STO" held */
    assert_mem_str(k.text, k.len, "ab STOXy SS");
    assert_int_equal(0, push(&st, &k, ""));
    assert_int_equal(3, tsr_stop_held(&st));
    flush(&st, &k);
    assert_mem_str(k.text, k.len, "ab STOXy SSSTO");
    assert_int_equal(-1, tsr_stop_matched(&st));
    tsr_stop_free(&st);
}

static void test_stop_multiple(void **state)
{
    const char *stops[] = {"###", "\n\n", "User:"};
    tsr_stop st;
    init_stops(&st, stops, 3);
    sink k = {0};
    assert_int_equal(0, push(&st, &k, "line one\n"));
    assert_mem_str(k.text, k.len, "line one");
    assert_int_equal(1, push(&st, &k, "\nmore ### text"));
    assert_mem_str(k.text, k.len, "line one");
    assert_int_equal(1, tsr_stop_matched(&st));
    tsr_stop_free(&st);

    /* the match that ends first wins, whatever the chunking: "bc" ends before "abcd" */
    const char *ov[] = {"abcd", "bc"};
    init_stops(&st, ov, 2);
    sink a = {0};
    assert_int_equal(1, push(&st, &a, "xabcd"));
    assert_mem_str(a.text, a.len, "xa");
    assert_int_equal(1, tsr_stop_matched(&st));
    tsr_stop_free(&st);

    /* same end: the longer one (starts first) */
    const char *same_end[] = {"cd", "bcd"};
    init_stops(&st, same_end, 2);
    sink b = {0};
    assert_int_equal(0, push(&st, &b, "ab"));
    assert_int_equal(1, push(&st, &b, "cd!"));
    assert_mem_str(b.text, b.len, "a");
    assert_int_equal(1, tsr_stop_matched(&st));
    tsr_stop_free(&st);
}

static void test_stop_at_start(void **state)
{
    const char *stops[] = {"<|end|>"};
    tsr_stop st;
    init_stops(&st, stops, 1);
    sink k = {0};
    assert_int_equal(1, push(&st, &k, "<|end|>rest"));
    assert_int_equal(0, k.len);
    tsr_stop_free(&st);

    init_stops(&st, stops, 1);
    sink k2 = {0};
    assert_int_equal(0, push(&st, &k2, "<|"));
    assert_int_equal(0, push(&st, &k2, "en"));
    assert_int_equal(1, push(&st, &k2, "d|>"));
    assert_int_equal(0, k2.len);
    tsr_stop_free(&st);
}

static void test_stop_utf8(void **state)
{
    /* "终止" = E7 BB 88 E6 AD A2 */
    const char *stops[] = {"终止", "🛑"};
    tsr_stop st;
    init_stops(&st, stops, 2);
    sink k = {0};
    assert_int_equal(0, push(&st, &k, "好的终"));
    assert_mem_str(k.text, k.len, "好的");
    assert_int_equal(3, tsr_stop_held(&st));
    assert_int_equal(0, push(&st, &k, "\xe6")); /* first byte of 止 */
    assert_mem_str(k.text, k.len, "好的");
    assert_int_equal(1, push(&st, &k, "\xad\xa2。"));
    assert_mem_str(k.text, k.len, "好的");
    assert_int_equal(0, tsr_stop_matched(&st));
    tsr_stop_free(&st);

    /* a shared first character, then something else: released whole */
    init_stops(&st, stops, 2);
    sink k2 = {0};
    assert_int_equal(0, push(&st, &k2, "起点和终"));
    assert_int_equal(0, push(&st, &k2, "点"));
    assert_mem_str(k2.text, k2.len, "起点和终点");
    /* a 4-byte emoji fed byte by byte */
    const char *emoji = "🛑";
    for (int i = 0; i < 3; i++) {
        char b[2] = {emoji[i], 0};
        assert_int_equal(0, push(&st, &k2, b));
    }
    assert_mem_str(k2.text, k2.len, "起点和终点");
    char last[2] = {emoji[3], 0};
    assert_int_equal(1, push(&st, &k2, last));
    assert_mem_str(k2.text, k2.len, "起点和终点");
    assert_int_equal(1, tsr_stop_matched(&st));
    tsr_stop_free(&st);
}

static void test_stop_flush_and_edge_cases(void **state)
{
    const char *stops[] = {"</s>"};
    tsr_stop st;
    init_stops(&st, stops, 1);
    sink k = {0};
    assert_int_equal(0, push(&st, &k, "abc</"));
    assert_mem_str(k.text, k.len, "abc");
    flush(&st, &k);
    assert_mem_str(k.text, k.len, "abc</");
    assert_int_equal(0, tsr_stop_held(&st));
    flush(&st, &k); /* twice: nothing more */
    assert_mem_str(k.text, k.len, "abc</");
    tsr_stop_free(&st);

    /* no stop strings: pass-through */
    init_stops(&st, NULL, 0);
    sink k2 = {0};
    assert_int_equal(0, push(&st, &k2, "anything </s>"));
    assert_mem_str(k2.text, k2.len, "anything </s>");
    flush(&st, &k2);
    assert_mem_str(k2.text, k2.len, "anything </s>");
    tsr_stop_free(&st);

    /* flush before any push */
    init_stops(&st, stops, 1);
    sink k3 = {0};
    flush(&st, &k3);
    assert_int_equal(0, k3.len);
    tsr_stop_free(&st);

    /* empty or NULL stop strings are errors that name the index */
    char err[128] = "";
    const char *bad[] = {"ok", ""};
    assert_true(tsr_stop_init(&st, bad, 2, err, sizeof err) < 0);
    assert_non_null(strstr(err, "stop string 1"));
    const char *bad2[] = {NULL};
    assert_true(tsr_stop_init(&st, bad2, 1, err, sizeof err) < 0);
}

/* Randomised: random text over a tiny alphabet, random stops, random chunking; the emitted
 * text must equal the reference cut (earliest-ending match, longest on ties), whatever the
 * chunking, and nothing is ever emitted past it. */
static void test_stop_random_chunking(void **state)
{
    lcg_state = 12345;
    for (int trial = 0; trial < 3000; trial++) {
        char text[200];
        size_t tlen = 1 + (size_t)(lcg_uniform() * 150);
        for (size_t i = 0; i < tlen; i++) text[i] = "abc"[(int)(lcg_uniform() * 3) % 3];
        text[tlen] = 0;
        char stop_buf[3][8];
        const char *stops[3];
        size_t n_stops = 1 + (size_t)(lcg_uniform() * 3) % 3;
        for (size_t j = 0; j < n_stops; j++) {
            size_t L = 1 + (size_t)(lcg_uniform() * 5) % 5;
            for (size_t i = 0; i < L; i++) stop_buf[j][i] = "abc"[(int)(lcg_uniform() * 3) % 3];
            stop_buf[j][L] = 0;
            stops[j] = stop_buf[j];
        }
        /* reference */
        size_t ref_cut = tlen;
        bool ref_stop = false;
        for (size_t end = 1; end <= tlen && !ref_stop; end++) {
            size_t best_len = 0;
            for (size_t j = 0; j < n_stops; j++) {
                size_t L = strlen(stops[j]);
                if (L <= end && memcmp(text + end - L, stops[j], L) == 0 && L > best_len)
                    best_len = L;
            }
            if (best_len) {
                ref_stop = true;
                ref_cut = end - best_len;
            }
        }
        tsr_stop st;
        init_stops(&st, stops, n_stops);
        sink k = {0};
        size_t pos = 0;
        int rc = 0;
        while (pos < tlen && rc == 0) {
            size_t chunk = (size_t)(lcg_uniform() * 6);
            if (chunk > tlen - pos) chunk = tlen - pos;
            char d[8];
            memcpy(d, text + pos, chunk);
            d[chunk] = 0;
            pos += chunk;
            rc = push(&st, &k, d);
            if (k.len > ref_cut)
                fail_msg("trial %d: emitted %zu bytes, beyond the cut at %zu", trial, k.len,
                         ref_cut);
        }
        if (rc == 0) flush(&st, &k);
        if ((rc == 1) != ref_stop || k.len != ref_cut || memcmp(k.text, text, k.len) != 0)
            fail_msg("trial %d: text \"%s\", stops \"%s\" \"%s\" \"%s\": expected stop=%d cut %zu, "
                     "got stop=%d \"%s\"",
                     trial, text, stops[0], n_stops > 1 ? stops[1] : "",
                     n_stops > 2 ? stops[2] : "", ref_stop, ref_cut, rc, k.text);
        tsr_stop_free(&st);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_argmax),
        cmocka_unit_test(test_greedy_large_vocab),
        cmocka_unit_test(test_greedy_read_only),
        cmocka_unit_test(test_seed_determinism),
        cmocka_unit_test(test_resume_same_draws),
        cmocka_unit_test(test_top_k_one_is_greedy),
        cmocka_unit_test(test_top_k_set),
        cmocka_unit_test(test_top_k_ties_at_boundary),
        cmocka_unit_test(test_top_p_hand_built),
        cmocka_unit_test(test_top_p_large_vocab),
        cmocka_unit_test(test_min_p),
        cmocka_unit_test(test_masked_logits),
        cmocka_unit_test(test_distribution_temperature_1),
        cmocka_unit_test(test_temperature_scaling),
        cmocka_unit_test(test_penalties_exact),
        cmocka_unit_test(test_penalties_through_greedy),
        cmocka_unit_test(test_logprobs),
        cmocka_unit_test(test_avx2_paths_agree),
        cmocka_unit_test(test_validation),
        cmocka_unit_test(test_stop_split_across_deltas),
        cmocka_unit_test(test_stop_partial_released),
        cmocka_unit_test(test_stop_multiple),
        cmocka_unit_test(test_stop_at_start),
        cmocka_unit_test(test_stop_utf8),
        cmocka_unit_test(test_stop_flush_and_edge_cases),
        cmocka_unit_test(test_stop_random_chunking),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
