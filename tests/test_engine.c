/*
 * test_engine.c — the serving engine (continuous batching, paged KV, preemption) in one
 * process: batched greedy answers equal single-sequence ones, a pool too small for all
 * requests still completes them through preemption, cancellation frees KV blocks, bad
 * requests are refused naming the field, prefix caching gives exactly the cold run's tokens
 * and logprobs (with preemption, eviction and speculation), also when a prompt is wholly
 * cached (copy-on-write of its last block) or resends a previous answer (generated blocks);
 * step hooks run after every step's events (a front end's one wake per step) and not after
 * their removal.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/engine.h"
#include "tests/util.h"

#define N_REQ 32

typedef struct {
    int32_t ids[256];
    int n_ids;
    char text[4096];
    size_t text_len;
    int finish;
    int n_finish;
    int n_preempted;
    size_t text_at[256]; /* text_len after the event that carried ids[i] */
    int n_prompt_tokens, n_completion_tokens;
    float lp[256]; /* chosen logprob per id, when asked for */
} result;

static void on_event(void *ud, const tsr_event *ev)
{
    result *r = ud;
    if (ev->kind == TSR_EV_TOKENS) {
        if (r->text_len + ev->text_len < sizeof r->text) {
            memcpy(r->text + r->text_len, ev->text, ev->text_len);
            r->text_len += ev->text_len;
        }
        for (size_t i = 0; i < ev->n_ids && r->n_ids < 256; i++) {
            r->text_at[r->n_ids] = r->text_len;
            if (ev->chosen_logprobs) r->lp[r->n_ids] = ev->chosen_logprobs[i];
            r->ids[r->n_ids++] = ev->ids[i];
        }
    } else {
        r->finish = ev->finish_reason;
        r->n_finish++;
        r->n_preempted = ev->n_preempted;
        r->n_prompt_tokens = ev->n_prompt_tokens;
        r->n_completion_tokens = ev->n_completion_tokens;
    }
}

/* Greedy reference: the single-sequence path. */
static void reference(const char *model, const int32_t *prompt, int n_prompt, int n, int32_t *out)
{
    char err[512];
    tsr_gguf *g;
    tsr_model *m;
    tsr_ctx *c;
    assert_int_equal(tsr_gguf_open(model, &g, err, sizeof err), 0);
    assert_int_equal(tsr_model_load(g, &m, err, sizeof err), 0);
    /* the engine's replica stores the default KV type: so does its reference */
    assert_int_equal(tsr_ctx_new_kv(m, 512, 64, 1, TSR_KV_DEFAULT, &c, err, sizeof err), 0);
    const float *lg;
    assert_int_equal(tsr_forward(c, prompt, n_prompt, 0, false, &lg, err, sizeof err), 0);
    for (int i = 0; i < n; i++) {
        int32_t best = 0;
        for (int32_t v = 1; v < m->hp.n_vocab; v++)
            if (lg[v] > lg[best]) best = v;
        out[i] = best;
        if (i + 1 < n)
            assert_int_equal(tsr_forward(c, &best, 1, n_prompt + i, false, &lg, err, sizeof err),
                             0);
    }
    tsr_ctx_free(c);
    tsr_model_free(m);
    tsr_gguf_close(g);
}

static void make_prompt(int k, int32_t *p, int *n)
{
    /* Different lengths (2..41) and contents, BOS first; stories260K ids 259..511 are text. */
    *n = 2 + (k * 7) % 40;
    p[0] = 1;
    for (int i = 1; i < *n; i++) p[i] = 259 + (k * 31 + i * 17) % 253;
}

static void run_batch(int32_t n_kv_blocks, int32_t max_batch_tokens, bool expect_preempt)
{
    const char *model = tsr_test_model_path("stories260K.gguf");
    char err[512];
    tsr_replica_params rp = {
        .tp = 1, .pp = 1, .n_threads = 2, .n_ctx = 512, .n_batch = 64, .n_kv_blocks = n_kv_blocks};
    tsr_replica *rep;
    if (tsr_replica_open(model, &rp, &rep, err, sizeof err) != 0) fail_msg("%s", err);
    tsr_engine_params ep = {.max_batch_tokens = max_batch_tokens, .max_seqs = 64, .max_queue = 64};
    tsr_engine *e;
    assert_int_equal(tsr_engine_new(rep, &ep, &e, err, sizeof err), 0);
    static result res[N_REQ];
    memset(res, 0, sizeof res);
    int32_t prompts[N_REQ][48];
    int plen[N_REQ], nmax[N_REQ];
    for (int k = 0; k < N_REQ; k++) {
        make_prompt(k, prompts[k], &plen[k]);
        nmax[k] = 4 + (k * 13) % 40;
        tsr_engine_request rq = {.prompt_ids = prompts[k],
                                 .n_prompt = (size_t)plen[k],
                                 .on_event = on_event,
                                 .ud = &res[k]};
        tsr_sampling_params_default(&rq.gen.sampling);
        rq.gen.sampling.temperature = 0.0f;
        rq.gen.max_tokens = nmax[k];
        rq.gen.ignore_eos = true;
        uint64_t id;
        if (tsr_engine_submit(e, &rq, &id, err, sizeof err) != 0) fail_msg("submit: %s", err);
    }
    tsr_engine_stop(e, false); /* finish what was submitted, then return */
    assert_int_equal(tsr_engine_run(e, err, sizeof err), 0);
    tsr_engine_status st;
    tsr_engine_get_status(e, &st);
    for (int k = 0; k < N_REQ; k++) {
        int32_t want[64];
        reference(model, prompts[k], plen[k], nmax[k], want);
        assert_int_equal(res[k].n_finish, 1);
        assert_int_equal(res[k].finish, TSR_FINISH_LENGTH);
        if (res[k].n_ids != nmax[k])
            fail_msg("request %d: expected %d tokens, got %d", k, nmax[k], res[k].n_ids);
        for (int i = 0; i < nmax[k]; i++)
            if (res[k].ids[i] != want[i])
                fail_msg("request %d (prompt of %d tokens): token %d expected %d, got %d", k,
                         plen[k], i, want[i], res[k].ids[i]);
    }
    assert_int_equal(st.kv_blocks_used, 0);
    assert_int_equal(st.n_requests_done, N_REQ);
    print_message("pool %d blocks, budget %d: %llu preemptions\n", n_kv_blocks, max_batch_tokens,
                  (unsigned long long)st.n_preemptions);
    if (expect_preempt) assert_true(st.n_preemptions > 0);
    tsr_engine_free(e);
    tsr_replica_close(rep);
}

/* Step hooks: called after each step's events, so no token waits for a later step's call. */
typedef struct {
    int n_tokens;     /* TOKENS events so far (engine thread) */
    int n_calls;      /* hook calls */
    int seen_at_last; /* n_tokens at the last call */
    int max_between;  /* most TOKENS events between two calls */
} hook_state;

static hook_state g_hooks;

static void hook_on_event(void *ud, const tsr_event *ev)
{
    on_event(ud, ev);
    if (ev->kind == TSR_EV_TOKENS) g_hooks.n_tokens++;
}

static void hook_count(void *ud)
{
    hook_state *h = ud;
    const int between = h->n_tokens - h->seen_at_last;
    if (between > h->max_between) h->max_between = between;
    h->seen_at_last = h->n_tokens;
    h->n_calls++;
}

static int g_removed_calls;
static char slot_ud[TSR_ENGINE_MAX_STEP_HOOKS]; /* distinct uds for the slots filled */
static void hook_removed(void *ud)
{
    (void)ud;
    g_removed_calls++;
}

static void test_step_hooks(void **state)
{
    (void)state;
    const char *model = tsr_test_model_path("stories260K.gguf");
    char err[512];
    tsr_replica_params rp = {
        .tp = 1, .pp = 1, .n_threads = 2, .n_ctx = 512, .n_batch = 64, .n_kv_blocks = 64};
    tsr_replica *rep;
    if (tsr_replica_open(model, &rp, &rep, err, sizeof err) != 0) fail_msg("%s", err);
    tsr_engine_params ep = {.max_batch_tokens = 64, .max_seqs = 4, .max_queue = 8};
    tsr_engine *e;
    assert_int_equal(tsr_engine_new(rep, &ep, &e, err, sizeof err), 0);
    memset(&g_hooks, 0, sizeof g_hooks);
    g_removed_calls = 0;
    assert_int_equal(tsr_engine_add_step_hook(e, hook_removed, NULL), 0);
    assert_int_equal(tsr_engine_add_step_hook(e, hook_count, &g_hooks), 0);
    for (int i = 2; i < TSR_ENGINE_MAX_STEP_HOOKS; i++)
        assert_int_equal(tsr_engine_add_step_hook(e, hook_removed, &slot_ud[i]), 0);
    if (tsr_engine_add_step_hook(e, hook_removed, NULL) != -1)
        fail_msg("a hook beyond the %d slots: expected -1, got 0", TSR_ENGINE_MAX_STEP_HOOKS);
    for (int i = 2; i < TSR_ENGINE_MAX_STEP_HOOKS; i++)
        tsr_engine_remove_step_hook(e, hook_removed, &slot_ud[i]);
    tsr_engine_remove_step_hook(e, hook_removed, NULL);
    static result res[4];
    memset(res, 0, sizeof res);
    int32_t prompts[4][48];
    int plen[4];
    for (int k = 0; k < 4; k++) {
        make_prompt(k, prompts[k], &plen[k]);
        tsr_engine_request rq = {.prompt_ids = prompts[k],
                                 .n_prompt = (size_t)plen[k],
                                 .on_event = hook_on_event,
                                 .ud = &res[k]};
        tsr_sampling_params_default(&rq.gen.sampling);
        rq.gen.sampling.temperature = 0.0f;
        rq.gen.max_tokens = 12;
        rq.gen.ignore_eos = true;
        uint64_t id;
        if (tsr_engine_submit(e, &rq, &id, err, sizeof err) != 0) fail_msg("submit: %s", err);
    }
    tsr_engine_stop(e, false);
    assert_int_equal(tsr_engine_run(e, err, sizeof err), 0);
    if (g_hooks.n_tokens != 4 * 12)
        fail_msg("expected %d TOKENS events, got %d", 4 * 12, g_hooks.n_tokens);
    /* every token was followed by a call; a call per step: at most one token per sequence
     * between two calls (no speculation here), and at least 12 steps */
    if (g_hooks.seen_at_last != g_hooks.n_tokens)
        fail_msg("the last hook call saw %d of %d tokens", g_hooks.seen_at_last, g_hooks.n_tokens);
    if (g_hooks.max_between > 4)
        fail_msg("expected at most 4 tokens (one per sequence) between hook calls, got %d",
                 g_hooks.max_between);
    if (g_hooks.n_calls < 12) fail_msg("expected >= 12 hook calls, got %d", g_hooks.n_calls);
    assert_int_equal(g_removed_calls, 0);
    tsr_engine_free(e);
    tsr_replica_close(rep);
}

static void test_batched_equals_single(void **state)
{
    (void)state;
    run_batch(512, 64, false);
}

static void test_preemption(void **state)
{
    (void)state;
    /* 12 blocks = 192 token positions for 32 requests of up to ~80 tokens each. */
    run_batch(12, 48, true);
}

static void test_cancel_and_errors(void **state)
{
    (void)state;
    const char *model = tsr_test_model_path("stories260K.gguf");
    char err[512];
    tsr_replica_params rp = {
        .tp = 1, .pp = 1, .n_threads = 1, .n_ctx = 256, .n_batch = 32, .n_kv_blocks = 64};
    tsr_replica *rep;
    assert_int_equal(tsr_replica_open(model, &rp, &rep, err, sizeof err), 0);
    tsr_engine_params ep = {.max_queue = 2};
    tsr_engine *e;
    assert_int_equal(tsr_engine_new(rep, &ep, &e, err, sizeof err), 0);
    int32_t prompt[3] = {1, 403, 407};
    result r1, r2;
    memset(&r1, 0, sizeof r1);
    memset(&r2, 0, sizeof r2);
    tsr_engine_request rq = {.prompt_ids = prompt, .n_prompt = 3, .on_event = on_event, .ud = &r1};
    tsr_sampling_params_default(&rq.gen.sampling);
    rq.gen.max_tokens = 100;
    uint64_t id1, id2;
    assert_int_equal(tsr_engine_submit(e, &rq, &id1, err, sizeof err), 0);
    rq.ud = &r2;
    assert_int_equal(tsr_engine_submit(e, &rq, &id2, err, sizeof err), 0);
    /* Queue full. */
    assert_int_equal(tsr_engine_submit(e, &rq, NULL, err, sizeof err), TSR_ENGINE_EQUEUE_FULL);
    tsr_engine_cancel(e, id1);
    /* Bad requests name the field. */
    rq.n_prompt = 0;
    assert_int_equal(tsr_engine_submit(e, &rq, NULL, err, sizeof err), TSR_ENGINE_EINVAL);
    assert_non_null(strstr(err, "prompt"));
    rq.n_prompt = 3;
    rq.gen.sampling.top_p = 0.0f;
    assert_int_equal(tsr_engine_submit(e, &rq, NULL, err, sizeof err), TSR_ENGINE_EINVAL);
    assert_non_null(strstr(err, "top_p"));
    rq.gen.sampling.top_p = 1.0f;
    int32_t bad[2] = {1, 9999};
    rq.prompt_ids = bad;
    rq.n_prompt = 2;
    assert_int_equal(tsr_engine_submit(e, &rq, NULL, err, sizeof err), TSR_ENGINE_EINVAL);
    assert_non_null(strstr(err, "prompt_ids"));
    static int32_t longp[300];
    for (int i = 0; i < 300; i++) longp[i] = 300;
    rq.prompt_ids = longp;
    rq.n_prompt = 300;
    assert_int_equal(tsr_engine_submit(e, &rq, NULL, err, sizeof err), TSR_ENGINE_EINVAL);
    assert_non_null(strstr(err, "context"));
    tsr_engine_stop(e, false);
    assert_int_equal(tsr_engine_run(e, err, sizeof err), 0);
    assert_int_equal(r1.n_finish, 1);
    assert_int_equal(r1.finish, TSR_FINISH_CANCELLED);
    assert_int_equal(r2.n_finish, 1);
    assert_true(r2.finish == TSR_FINISH_LENGTH || r2.finish == TSR_FINISH_EOS);
    tsr_engine_status st;
    tsr_engine_get_status(e, &st);
    assert_int_equal(st.kv_blocks_used, 0);
    /* Draining refuses new work. */
    tsr_engine_drain(e);
    rq.prompt_ids = prompt;
    rq.n_prompt = 3;
    assert_int_equal(tsr_engine_submit(e, &rq, NULL, err, sizeof err), TSR_ENGINE_EDRAINING);
    tsr_engine_free(e);
    tsr_replica_close(rep);
}

/* Failover resume: a request handed its prompt plus the first K tokens an earlier run
 * generated (n_resumed = K) and the budget left continues exactly as the undisturbed run:
 * seeded sampling draws the same numbers, the penalties count those K tokens as output, the
 * stop matcher holds back what the first run held back after K tokens (its text is not
 * emitted again), and usage counts the K tokens as completion tokens. */
static void test_resume(void **state)
{
    (void)state;
    const char *model = tsr_test_model_path("stories260K.gguf");
    char err[512];
    tsr_replica_params rp = {
        .tp = 1, .pp = 1, .n_threads = 1, .n_ctx = 256, .n_batch = 64, .n_kv_blocks = 128};
    tsr_replica *rep;
    if (tsr_replica_open(model, &rp, &rep, err, sizeof err) != 0) fail_msg("%s", err);
    tsr_engine_params ep = {.max_batch_tokens = 64, .max_seqs = 16, .max_queue = 16};
    tsr_engine *e;
    assert_int_equal(tsr_engine_new(rep, &ep, &e, err, sizeof err), 0);
    enum { N = 60, N_CUTS = 4 };
    const int cuts[N_CUTS] = {1, 9, 23, 59};
    static const char *const stops[1] = {"the little dog flew"}; /* held back: "the ..." */
    int32_t prompt[64 + N];
    int n_prompt;
    make_prompt(5, prompt, &n_prompt);
    static result full, part[N_CUTS];
    memset(&full, 0, sizeof full);
    memset(part, 0, sizeof part);
    tsr_engine_request rq = {
        .prompt_ids = prompt, .n_prompt = (size_t)n_prompt, .on_event = on_event, .ud = &full};
    tsr_sampling_params_default(&rq.gen.sampling);
    rq.gen.sampling.temperature = 0.9f;
    rq.gen.sampling.seed = 4242;
    rq.gen.sampling.frequency_penalty = 0.4f;
    rq.gen.sampling.presence_penalty = 0.2f;
    rq.gen.sampling.repetition_penalty = 1.1f;
    rq.gen.max_tokens = N;
    rq.gen.ignore_eos = true;
    rq.gen.stop = stops;
    rq.gen.n_stop = 1;
    uint64_t id;
    if (tsr_engine_submit(e, &rq, &id, err, sizeof err) != 0) fail_msg("submit: %s", err);
    tsr_engine_stop(e, false);
    assert_int_equal(tsr_engine_run(e, err, sizeof err), 0);
    assert_int_equal(full.n_ids, N);
    tsr_engine_free(e);
    assert_int_equal(tsr_engine_new(rep, &ep, &e, err, sizeof err), 0);
    int32_t rprompt[N_CUTS][64 + N];
    for (int c = 0; c < N_CUTS; c++) {
        const int k = cuts[c];
        memcpy(rprompt[c], prompt, sizeof(int32_t) * (size_t)n_prompt);
        memcpy(rprompt[c] + n_prompt, full.ids, sizeof(int32_t) * (size_t)k);
        rq.prompt_ids = rprompt[c];
        rq.n_prompt = (size_t)(n_prompt + k);
        rq.n_resumed = k;
        rq.gen.max_tokens = N - k;
        rq.ud = &part[c];
        if (tsr_engine_submit(e, &rq, &id, err, sizeof err) != 0) fail_msg("resume: %s", err);
    }
    /* A resumed prefix must leave a real prompt token. */
    rq.n_resumed = (int32_t)rq.n_prompt;
    assert_int_equal(tsr_engine_submit(e, &rq, NULL, err, sizeof err), TSR_ENGINE_EINVAL);
    assert_non_null(strstr(err, "resumed_tokens"));
    tsr_engine_stop(e, false);
    assert_int_equal(tsr_engine_run(e, err, sizeof err), 0);
    for (int c = 0; c < N_CUTS; c++) {
        const int k = cuts[c];
        const result *r = &part[c];
        if (r->n_ids != N - k) fail_msg("cut %d: expected %d tokens, got %d", k, N - k, r->n_ids);
        for (int i = 0; i < N - k; i++)
            if (r->ids[i] != full.ids[k + i])
                fail_msg("cut %d: token %d expected %d (undisturbed run), got %d", k, k + i,
                         full.ids[k + i], r->ids[i]);
        /* The text streamed before the cut plus the resumed run's text is the whole text. */
        const size_t before = full.text_at[k - 1];
        if (before + r->text_len != full.text_len ||
            memcmp(full.text + before, r->text, r->text_len) != 0)
            fail_msg("cut %d: text after the cut expected '%.*s', got '%.*s'", k,
                     (int)(full.text_len - before), full.text + before, (int)r->text_len, r->text);
        assert_int_equal(r->n_prompt_tokens, n_prompt);
        assert_int_equal(r->n_completion_tokens, N);
    }
    tsr_engine_free(e);
    tsr_replica_close(rep);
}

/* Prefix caching: 48 requests whose prompts share prefixes of 0, 16, 40 and 100 tokens
 * (differing suffixes), greedy and seeded, with logprobs or with n-gram speculation, in a
 * pool small enough to preempt and evict, give exactly the tokens and logprobs (bit for
 * bit) of the same engine with --no-prefix-cache; hits are counted, and no block stays
 * referenced at the end. */
#define N_PFX 48
static void run_prefix(bool cache, result *res, tsr_engine_status *st)
{
    const char *model = tsr_test_model_path("stories260K.gguf");
    char err[512];
    tsr_replica_params rp = {
        .tp = 1, .pp = 1, .n_threads = 2, .n_ctx = 512, .n_batch = 48, .n_kv_blocks = 40};
    tsr_replica *rep;
    if (tsr_replica_open(model, &rp, &rep, err, sizeof err) != 0) fail_msg("%s", err);
    tsr_drafter *d;
    assert_int_equal(tsr_drafter_ngram_new(1, 3, &d, err, sizeof err), 0);
    tsr_engine_params ep = {.max_batch_tokens = 48,
                            .max_seqs = 16,
                            .max_queue = 64,
                            .drafter = d,
                            .spec_no_probe = true,
                            .spec_max_batch = 16,
                            .no_prefix_cache = !cache};
    tsr_engine *e;
    assert_int_equal(tsr_engine_new(rep, &ep, &e, err, sizeof err), 0);
    static const int32_t shared[4] = {0, 16, 40, 100};
    for (int k = 0; k < N_PFX; k++) {
        int32_t prompt[160];
        int n = 0, sh = shared[k % 4];
        prompt[n++] = 1;
        for (int i = 1; i < sh; i++) prompt[n++] = 259 + (i * 37 + (k % 4) * 11) % 253;
        for (int i = 0; i < 3 + (k * 5) % 21; i++) prompt[n++] = 259 + (k * 29 + i * 13) % 253;
        tsr_engine_request rq = {
            .prompt_ids = prompt, .n_prompt = (size_t)n, .on_event = on_event, .ud = &res[k]};
        tsr_sampling_params_default(&rq.gen.sampling);
        rq.gen.sampling.temperature = k % 3 == 0 ? 0.0f : 0.8f;
        rq.gen.sampling.seed = 1000 + (uint64_t)k;
        rq.gen.max_tokens = 8 + (k * 7) % 17;
        rq.gen.ignore_eos = true;
        /* Speculation on the greedy requests without logprobs (sampled ones with drafts are
         * correctly distributed but depend on how many drafts each step verifies, which
         * scheduling decides); logprobs on the others. */
        if (k % 2) rq.logprobs = 1;
        rq.speculation = k % 2 == 0 && k % 3 == 0 ? 1 : 0;
        uint64_t id;
        if (tsr_engine_submit(e, &rq, &id, err, sizeof err) != 0) fail_msg("submit: %s", err);
    }
    tsr_engine_stop(e, false);
    assert_int_equal(tsr_engine_run(e, err, sizeof err), 0);
    tsr_engine_get_status(e, st);
    tsr_engine_free(e);
    tsr_drafter_free(d);
    tsr_replica_close(rep);
}

static void test_prefix_cache(void **state)
{
    (void)state;
    static result cold[N_PFX], warm[N_PFX];
    memset(cold, 0, sizeof cold);
    memset(warm, 0, sizeof warm);
    tsr_engine_status sc, sw;
    run_prefix(false, cold, &sc);
    run_prefix(true, warm, &sw);
    for (int k = 0; k < N_PFX; k++) {
        assert_int_equal(warm[k].n_finish, 1);
        if (warm[k].n_ids != cold[k].n_ids)
            fail_msg("request %d: cold run %d tokens, cached %d", k, cold[k].n_ids, warm[k].n_ids);
        for (int i = 0; i < cold[k].n_ids; i++) {
            if (warm[k].ids[i] != cold[k].ids[i])
                fail_msg("request %d token %d: cold run %d, cached %d", k, i, cold[k].ids[i],
                         warm[k].ids[i]);
            if (memcmp(&warm[k].lp[i], &cold[k].lp[i], sizeof(float)) != 0)
                fail_msg("request %d token %d: logprob cold %.9g, cached %.9g", k, i,
                         (double)cold[k].lp[i], (double)warm[k].lp[i]);
        }
    }
    print_message("prefix cache: %llu lookups, %llu hits, %llu hit tokens, %llu evictions, "
                  "%llu preemptions (cold: %llu)\n",
                  (unsigned long long)sw.prefix_cache_lookups,
                  (unsigned long long)sw.prefix_cache_hits,
                  (unsigned long long)sw.prefix_cache_hit_tokens,
                  (unsigned long long)sw.prefix_cache_evictions,
                  (unsigned long long)sw.n_preemptions, (unsigned long long)sc.n_preemptions);
    assert_true(sw.prefix_cache && !sc.prefix_cache);
    assert_true(sw.prefix_cache_hits > 0 && sw.prefix_cache_hit_tokens > 0);
    assert_true(sw.prefix_cache_evictions > 0);
    assert_true(sw.n_preemptions > 0 && sc.n_preemptions > 0);
    assert_true(sw.spec_accepted > 0);
    assert_int_equal(sc.prefix_cache_lookups, 0);
    assert_int_equal(sc.kv_blocks_cached, 0);
    assert_int_equal(sw.kv_blocks_used, 0);
    assert_int_equal(sc.kv_blocks_used, 0);
    assert_true(sw.kv_blocks_cached > 0);
    assert_int_equal(sw.kv_blocks_free, sw.kv_blocks_total);
}

/* Copy-on-write and generated blocks in the cache. A request list run on one engine, cold
 * (--no-prefix-cache) and warm, must give the same tokens and logprobs bit for bit. */
typedef struct {
    const int32_t *prompt;
    int n_prompt, max_tokens, logprobs;
    float temperature;
} cow_req;

static void run_cow_model(const char *model, const char *kv_type, bool cache, int32_t max_seqs,
                          int32_t n_kv_blocks, const cow_req *rq_list, int n_req, result *res,
                          tsr_engine_status *st)
{
    char err[512];
    tsr_replica_params rp = {.tp = 1,
                             .pp = 1,
                             .n_threads = 2,
                             .n_ctx = 512,
                             .n_batch = 48,
                             .n_kv_blocks = n_kv_blocks,
                             .kv_type = kv_type};
    tsr_replica *rep;
    if (tsr_replica_open(model, &rp, &rep, err, sizeof err) != 0) fail_msg("%s", err);
    tsr_engine_params ep = {
        .max_batch_tokens = 48, .max_seqs = max_seqs, .max_queue = 64, .no_prefix_cache = !cache};
    tsr_engine *e;
    assert_int_equal(tsr_engine_new(rep, &ep, &e, err, sizeof err), 0);
    for (int k = 0; k < n_req; k++) {
        tsr_engine_request rq = {.prompt_ids = rq_list[k].prompt,
                                 .n_prompt = (size_t)rq_list[k].n_prompt,
                                 .on_event = on_event,
                                 .ud = &res[k],
                                 .logprobs = rq_list[k].logprobs};
        tsr_sampling_params_default(&rq.gen.sampling);
        rq.gen.sampling.temperature = rq_list[k].temperature;
        rq.gen.sampling.seed = 500 + (uint64_t)k;
        rq.gen.max_tokens = rq_list[k].max_tokens;
        rq.gen.ignore_eos = true;
        uint64_t id;
        if (tsr_engine_submit(e, &rq, &id, err, sizeof err) != 0) fail_msg("submit: %s", err);
    }
    tsr_engine_stop(e, false);
    assert_int_equal(tsr_engine_run(e, err, sizeof err), 0);
    tsr_engine_get_status(e, st);
    tsr_engine_free(e);
    tsr_replica_close(rep);
}

static void run_cow(bool cache, int32_t max_seqs, int32_t n_kv_blocks, const cow_req *rq_list,
                    int n_req, result *res, tsr_engine_status *st)
{
    run_cow_model(tsr_test_model_path("stories260K.gguf"), NULL, cache, max_seqs, n_kv_blocks,
                  rq_list, n_req, res, st);
}

static void compare_runs(const char *what, const result *cold, const result *warm, int n)
{
    for (int k = 0; k < n; k++) {
        assert_int_equal(warm[k].n_finish, 1);
        if (warm[k].n_ids != cold[k].n_ids)
            fail_msg("%s, request %d: cold run %d tokens, cached %d", what, k, cold[k].n_ids,
                     warm[k].n_ids);
        for (int i = 0; i < cold[k].n_ids; i++) {
            if (warm[k].ids[i] != cold[k].ids[i])
                fail_msg("%s, request %d token %d: cold run %d, cached %d", what, k, i,
                         cold[k].ids[i], warm[k].ids[i]);
            if (memcmp(&warm[k].lp[i], &cold[k].lp[i], sizeof(float)) != 0)
                fail_msg("%s, request %d token %d: logprob cold %.9g, cached %.9g", what, k, i,
                         (double)cold[k].lp[i], (double)warm[k].lp[i]);
        }
    }
}

/* Multi-turn and wholly cached prompts, one request at a time: r0 generates 27 tokens after
 * a 37-token prompt P (63 positions computed: 3 full blocks cached, generated tokens
 * included); r1 sends P + r0's answer + 5 more (hits those 3 blocks: 48 tokens, 16 of them
 * generated); r2 sends P + answer (64 tokens: all 4 blocks cached, the last copied); r3 the
 * first 32 tokens of P (2 blocks, copied), sampled with logprobs; r4 = r2 sampled with
 * logprobs. Then, with a pool small enough to preempt, 16 concurrent requests whose prompts
 * are 16, 32, 48 or 64 tokens of one text (each wholly cached once computed). */
static void test_prefix_cow(void **state)
{
    (void)state;
    const char *model = tsr_test_model_path("stories260K.gguf");
    int32_t turn[80];
    int n = 0;
    turn[n++] = 1;
    for (int i = 1; i < 37; i++) turn[n++] = 259 + (i * 41 + 7) % 253;
    reference(model, turn, 37, 27, turn + 37); /* r0's greedy answer */
    for (int i = 0; i < 5; i++) turn[64 + i] = 300 + i * 19;
    const cow_req seq_reqs[5] = {
        {turn, 37, 27, 0, 0.0f}, {turn, 69, 12, 0, 0.0f}, {turn, 64, 12, 0, 0.0f},
        {turn, 32, 12, 1, 0.8f}, {turn, 64, 12, 1, 0.8f},
    };
    static result cold[16], warm[16];
    tsr_engine_status sc, sw;
    memset(cold, 0, sizeof cold);
    memset(warm, 0, sizeof warm);
    run_cow(false, 1, 40, seq_reqs, 5, cold, &sc);
    run_cow(true, 1, 40, seq_reqs, 5, warm, &sw);
    for (int i = 0; i < 27; i++)
        if (cold[0].ids[i] != turn[37 + i])
            fail_msg("r0 token %d: reference %d, engine %d", i, turn[37 + i], cold[0].ids[i]);
    compare_runs("sequential", cold, warm, 5);
    print_message("prefix cow, sequential: %llu hits, %llu hit tokens, %llu copies\n",
                  (unsigned long long)sw.prefix_cache_hits,
                  (unsigned long long)sw.prefix_cache_hit_tokens,
                  (unsigned long long)sw.prefix_cache_copies);
    assert_int_equal(sw.prefix_cache_lookups, 5);
    assert_int_equal(sw.prefix_cache_hits, 4);
    assert_int_equal(sw.prefix_cache_hit_tokens, (3 + 4 + 2 + 4) * 16);
    assert_int_equal(sw.prefix_cache_copies, 3);
    assert_int_equal(sw.kv_blocks_used, 0);
    assert_int_equal(sc.prefix_cache_copies, 0);

    /* Concurrent, preempted: 16 requests over 14 blocks (a 64-token prompt and its 20
     * tokens need 6). */
    int32_t text[64];
    text[0] = 1;
    for (int i = 1; i < 64; i++) text[i] = 259 + (i * 23 + 3) % 253;
    cow_req conc[16];
    for (int k = 0; k < 16; k++) {
        conc[k] = (cow_req){text, 16 * (1 + (k * 3) % 4), 8 + (k * 5) % 13, k % 2,
                            k % 3 == 0 ? 0.0f : 0.8f};
    }
    memset(cold, 0, sizeof cold);
    memset(warm, 0, sizeof warm);
    run_cow(false, 8, 14, conc, 16, cold, &sc);
    run_cow(true, 8, 14, conc, 16, warm, &sw);
    compare_runs("concurrent", cold, warm, 16);
    print_message(
        "prefix cow, concurrent: %llu hits, %llu hit tokens, %llu copies, %llu "
        "evictions, %llu preemptions (cold: %llu)\n",
        (unsigned long long)sw.prefix_cache_hits, (unsigned long long)sw.prefix_cache_hit_tokens,
        (unsigned long long)sw.prefix_cache_copies, (unsigned long long)sw.prefix_cache_evictions,
        (unsigned long long)sw.n_preemptions, (unsigned long long)sc.n_preemptions);
    assert_true(sw.prefix_cache_copies > 0);
    assert_true(sw.n_preemptions > 0 && sc.n_preemptions > 0);
    assert_int_equal(sw.kv_blocks_used, 0);
    assert_int_equal(sw.kv_blocks_free, sw.kv_blocks_total);
}

/* Order classes (worker/model.h) and the prefix cache, on a model with Q4_K weights, where a
 * token's class changes its bits: r0 generates 27 tokens after a 37-token prompt P (classes:
 * positions 0..35 prompt, 36.. GEMV); r1 sends P + r0's answer + 5 (69 tokens: positions
 * 0..67 in the prompt class in a cold run) and r2 P + the answer (64). A block r0 computed
 * with other classes than r1's cold run (block 2: 4 of 16 positions in the prompt class;
 * block 3: none) must not be reused: r1 hits blocks 0-1 only, computes 2-3 as prompt
 * tokens and caches them, r2 then hits all 4 (the last copied). Warm equals cold bit for
 * bit (ids and logprobs), and r0 equals the single-sequence greedy run with the prompt's
 * classes (tsr_ctx_set_prompt_len). Then batching and preemption on the same model. */
static void test_prefix_order_class(void **state)
{
    (void)state;
    const char *model = tsr_test_model_path("synthetic/synth-tiny-q4_k_m.gguf");
    int32_t turn[80];
    turn[0] = 1;
    for (int i = 1; i < 37; i++) turn[i] = 259 + (i * 41 + 7) % 253;
    {
        char err[512];
        tsr_gguf *g;
        tsr_model *m;
        tsr_ctx *c;
        assert_int_equal(tsr_gguf_open(model, &g, err, sizeof err), 0);
        assert_int_equal(tsr_model_load(g, &m, err, sizeof err), 0);
        assert_int_equal(tsr_ctx_new_kv(m, 512, 64, 1, TSR_KV_F32, &c, err, sizeof err), 0);
        tsr_ctx_set_prompt_len(c, 37);
        const float *lg;
        assert_int_equal(tsr_forward(c, turn, 37, 0, false, &lg, err, sizeof err), 0);
        for (int i = 0; i < 27; i++) {
            turn[37 + i] = tsr_test_argmax(lg, m->hp.n_vocab);
            assert_int_equal(tsr_forward(c, &turn[37 + i], 1, 37 + i, false, &lg, err, sizeof err),
                             0);
        }
        tsr_ctx_free(c);
        tsr_model_free(m);
        tsr_gguf_close(g);
    }
    for (int i = 0; i < 5; i++) turn[64 + i] = 300 + i * 19;
    const cow_req reqs[3] = {
        {turn, 37, 27, 1, 0.0f}, {turn, 69, 12, 1, 0.0f}, {turn, 64, 12, 1, 0.0f}};
    static result cold[3], warm[3];
    tsr_engine_status sc, sw;
    memset(cold, 0, sizeof cold);
    memset(warm, 0, sizeof warm);
    /* an f32 cache: f16 would round most of a K/V row's class difference away */
    run_cow_model(model, "f32", false, 1, 40, reqs, 3, cold, &sc);
    run_cow_model(model, "f32", true, 1, 40, reqs, 3, warm, &sw);
    for (int i = 0; i < 27; i++)
        if (cold[0].ids[i] != turn[37 + i])
            fail_msg("r0 token %d: reference %d, engine %d", i, turn[37 + i], cold[0].ids[i]);
    compare_runs("order classes", cold, warm, 3);
    print_message("prefix order classes: %llu hits, %llu hit tokens, %llu copies\n",
                  (unsigned long long)sw.prefix_cache_hits,
                  (unsigned long long)sw.prefix_cache_hit_tokens,
                  (unsigned long long)sw.prefix_cache_copies);
    assert_int_equal(sw.prefix_cache_hits, 2);
    assert_int_equal(sw.prefix_cache_hit_tokens, (2 + 4) * 16);
    assert_int_equal(sw.kv_blocks_used, 0);

    /* Batched, preempted, recomputed, cached: 16 concurrent requests over 14 blocks, whose
     * prompts are 16..64 tokens of one text, against one request at a time in a large pool
     * without the cache (no batching, no preemption): the same ids and logprobs. */
    int32_t text[64];
    text[0] = 1;
    for (int i = 1; i < 64; i++) text[i] = 259 + (i * 23 + 3) % 253;
    cow_req conc[16];
    for (int k = 0; k < 16; k++)
        conc[k] = (cow_req){text, 16 * (1 + (k * 3) % 4) - (k % 4), 8 + (k * 5) % 13, 1,
                            k % 3 == 0 ? 0.0f : 0.8f};
    static result alone[16], busy[16];
    memset(alone, 0, sizeof alone);
    memset(busy, 0, sizeof busy);
    run_cow_model(model, "f32", false, 1, 200, conc, 16, alone, &sc);
    run_cow_model(model, "f32", true, 8, 14, conc, 16, busy, &sw);
    compare_runs("order classes, concurrent", alone, busy, 16);
    print_message("prefix order classes, concurrent: %llu hits, %llu preemptions\n",
                  (unsigned long long)sw.prefix_cache_hits, (unsigned long long)sw.n_preemptions);
    assert_true(sw.n_preemptions > 0 && sc.n_preemptions == 0);
    assert_int_equal(sw.kv_blocks_used, 0);
}

/* The draft model's pool has its own prefix cache: one request at a time with a draft model
 * (greedy, speculation on), r1 sharing 2 blocks of r0's prompt, r2 = exactly r0's first 32
 * tokens (wholly cached in the target's pool: copy-on-write there), r3 = r0's first 31
 * tokens, whose greedy answer starts with r0's 32nd (the drafter's first history is then
 * r0's first 32 tokens, all cached in the draft pool: copy-on-write there). The
 * answers equal the greedy reference and a cold engine (--no-prefix-cache, which turns the
 * draft pool's cache off too), and so do the counts of drafted and accepted tokens (the same
 * drafts); both pools count hits, the draft pool copies, and every
 * block of both returns. */
static void run_draft(bool cache, const int32_t *const *prompts, const int *n_prompt, int n_req,
                      result *res, tsr_engine_status *st, tsr_kvblocks_stats *dst)
{
    const char *model = tsr_test_model_path("stories260K.gguf");
    char err[512];
    tsr_replica_params rp = {
        .tp = 1, .pp = 1, .n_threads = 2, .n_ctx = 512, .n_batch = 48, .n_kv_blocks = 40};
    tsr_replica *rep;
    if (tsr_replica_open(model, &rp, &rep, err, sizeof err) != 0) fail_msg("%s", err);
    tsr_drafter *d;
    if (tsr_drafter_model_new_kv(tsr_test_model_path("derived/stories260K-4layer-draft.gguf"),
                                 tsr_replica_gguf(rep), 24, 1, tsr_replica_kv_type(rep), &d, err,
                                 sizeof err) != 0)
        fail_msg("draft model: %s", err);
    tsr_engine_params ep = {.max_batch_tokens = 48,
                            .max_seqs = 1,
                            .max_queue = 64,
                            .drafter = d,
                            .spec_k = 3,
                            .spec_no_probe = true,
                            .spec_max_batch = 16,
                            .no_prefix_cache = !cache};
    tsr_engine *e;
    assert_int_equal(tsr_engine_new(rep, &ep, &e, err, sizeof err), 0);
    for (int k = 0; k < n_req; k++) {
        tsr_engine_request rq = {.prompt_ids = prompts[k],
                                 .n_prompt = (size_t)n_prompt[k],
                                 .on_event = on_event,
                                 .ud = &res[k],
                                 .speculation = 1};
        tsr_sampling_params_default(&rq.gen.sampling);
        rq.gen.sampling.temperature = 0.0f;
        rq.gen.max_tokens = 20;
        rq.gen.ignore_eos = true;
        uint64_t id;
        if (tsr_engine_submit(e, &rq, &id, err, sizeof err) != 0) fail_msg("submit: %s", err);
    }
    tsr_engine_stop(e, false);
    assert_int_equal(tsr_engine_run(e, err, sizeof err), 0);
    tsr_engine_get_status(e, st);
    assert_int_equal(tsr_drafter_model_prefix_stats(d, dst), 0);
    assert_int_equal(tsr_drafter_model_n_free_blocks(d), 24);
    tsr_engine_free(e);
    tsr_drafter_free(d);
    tsr_replica_close(rep);
}

static void test_prefix_draft(void **state)
{
    (void)state;
    const char *model = tsr_test_model_path("stories260K.gguf");
    int32_t p0[40], p1[41];
    p0[0] = p1[0] = 1;
    for (int i = 1; i < 40; i++) p0[i] = 259 + (i * 53 + 11) % 253;
    /* token 31 is the greedy continuation of the first 31: r3's first drafting history */
    reference(model, p0, 31, 1, p0 + 31);
    memcpy(p1, p0, sizeof(int32_t) * 32);
    for (int i = 32; i < 41; i++) p1[i] = 300 + (i * 7) % 200;
    const int32_t *prompts[4] = {p0, p1, p0, p0};
    const int n_prompt[4] = {40, 41, 32, 31};
    static result cold[4], warm[4];
    memset(cold, 0, sizeof cold);
    memset(warm, 0, sizeof warm);
    tsr_engine_status sc, sw;
    tsr_kvblocks_stats dc, dw;
    run_draft(false, prompts, n_prompt, 4, cold, &sc, &dc);
    run_draft(true, prompts, n_prompt, 4, warm, &sw, &dw);
    for (int k = 0; k < 4; k++) {
        int32_t want[20];
        reference(model, prompts[k], n_prompt[k], 20, want);
        assert_int_equal(cold[k].n_ids, 20);
        for (int i = 0; i < 20; i++)
            if (cold[k].ids[i] != want[i])
                fail_msg("cold, request %d token %d: reference %d, engine %d", k, i, want[i],
                         cold[k].ids[i]);
    }
    compare_runs("draft model", cold, warm, 4);
    print_message("prefix draft: target %llu hits / %llu hit tokens / %llu copies; draft pool "
                  "%llu lookups, %llu hits, %llu hit tokens, %llu copies; accepted %llu of "
                  "%llu drafts\n",
                  (unsigned long long)sw.prefix_cache_hits,
                  (unsigned long long)sw.prefix_cache_hit_tokens,
                  (unsigned long long)sw.prefix_cache_copies, (unsigned long long)dw.n_lookups,
                  (unsigned long long)dw.n_hits, (unsigned long long)dw.n_hit_tokens,
                  (unsigned long long)dw.n_copies, (unsigned long long)sw.spec_accepted,
                  (unsigned long long)sw.spec_drafted);
    assert_true(sw.spec_accepted > 0);
    /* the drafts themselves are those of a cold draft pool (the answers would not show a
     * wrong draft: the target verifies them) */
    if (sw.spec_drafted != sc.spec_drafted || sw.spec_accepted != sc.spec_accepted)
        fail_msg("drafts: cold %llu drafted / %llu accepted, cached %llu / %llu",
                 (unsigned long long)sc.spec_drafted, (unsigned long long)sc.spec_accepted,
                 (unsigned long long)sw.spec_drafted, (unsigned long long)sw.spec_accepted);
    assert_true(sw.prefix_cache_hits >= 3 && sw.prefix_cache_copies >= 1);
    assert_true(dw.n_hits >= 3 && dw.n_copies >= 1);
    assert_true(dw.n_hit_tokens >= (2 + 2 + 2) * 16);
    assert_int_equal(dw.n_used, 0);
    assert_int_equal(dc.n_lookups, 0);
    assert_int_equal(dc.n_cached, 0);
    assert_int_equal(sw.kv_blocks_used, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batched_equals_single),
        cmocka_unit_test(test_preemption),
        cmocka_unit_test(test_step_hooks),
        cmocka_unit_test(test_cancel_and_errors),
        cmocka_unit_test(test_resume),
        cmocka_unit_test(test_prefix_cache),
        cmocka_unit_test(test_prefix_cow),
        cmocka_unit_test(test_prefix_draft),
        cmocka_unit_test(test_prefix_order_class),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
