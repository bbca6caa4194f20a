/*
 * engine.c — continuous batching over a paged KV cache (see engine.h).
 *
 * Each step the scheduler builds one batch within the token budget:
 *   1. running sequences, oldest first: one token each when decoding, the next chunk of
 *      their prompt when still prefilling (chunked prefill);
 *   2. then waiting sequences, first come first served, while the budget, the sequence
 *      limit and the free KV blocks allow (their first chunk).
 * A sequence's tokens are prompt + generated; n_computed of them are in the KV cache; a
 * step feeds tokens[n_computed .. n_computed + chunk) and asks for logits only when the
 * chunk reaches the last token. When a running sequence needs a block and none is free,
 * the newest running sequence is preempted: its block references are dropped and it goes
 * back to the head of the queue with n_computed = 0, to be recomputed later (vLLM's
 * recompute policy). Because every output of the forward pass is computed independently
 * per token, neither batching nor recomputation changes a greedy answer.
 *
 * Prefix caching (coordinator/kvblocks.h): after each step a sequence commits its full
 * blocks whose K/V are all computed to the cache — prompt and generated tokens alike, so a
 * multi-turn chat that sends the previous answer back reuses it, and a preempted sequence
 * finds its own blocks again if they were not evicted; when a sequence is admitted with
 * nothing computed (new, or preempted), it takes references on the longest cached chain of
 * its tokens' full blocks and starts computing after it. The same per-token independence
 * makes a chunk that starts at a cached offset give exactly what the cold run gives. Shared
 * blocks are never written: a sequence writes only at positions >= n_computed, committed
 * blocks lie below it, and n_computed never moves back while the sequence holds them
 * (rejected drafts lie at or after it, and verification moves it forward). One exception,
 * handled by copy-on-write: when every token lies in cached blocks (the tokens end on a
 * block boundary), the last token must still run to give logits, and it writes its K/V row
 * in the last block; that block is then replaced by a private copy (tsr_kvblocks_cow), the
 * copy made on every rank before the step (tsr_replica_kv_copy), and only that one token
 * runs.
 *
 * Speculative decoding: a decoding sequence may feed, instead of its one last token, that
 * token plus k draft tokens from the drafter, with logits for all k+1 positions. The
 * drafts are verified in order (greedy: equal to the target's argmax; sampling: the
 * rejection rule of tsr_sampler_sample_spec) and the first rejection is replaced by the
 * target's own token; if all pass, the last row gives one more token. The KV rows of
 * rejected drafts are simply left behind: n_computed stops before them, blocks past the
 * sequence's end go back to the pool, and the next step overwrites them. k adapts per
 * sequence (all accepted: k+1 up to the cap; else accepted+1), a sequence whose recent
 * acceptance stays below 30% pauses speculation for 16 steps, and no sequence speculates
 * while more than spec_max_batch sequences decode. On top, "auto" is measured, not
 * assumed: the engine keeps the mean time per generated token of pure decode steps with
 * drafts (step + drafting time) and without, runs 32 steps in the better mode and 8 in the
 * other to keep both figures fresh (the plain phase doubling up to 1024 steps while plain
 * keeps winning), so a drafter that costs more than it saves (a slow draft model, a prompt
 * that never repeats) turns itself off.
 */
#include "coordinator/engine.h"
#include "coordinator/kvblocks.h"
#include "kernels/util.h"

#include "coordinator/stop.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_LOGPROBS 20

typedef struct seq {
    uint64_t id;
    int32_t *tokens; /* prompt + generated */
    int32_t n_prompt, n_tokens, cap;
    int32_t n_computed; /* tokens whose K/V are cached */
    int32_t *blocks;
    int32_t n_blocks, blocks_cap;
    tsr_kvblocks_chain chain; /* leading blocks found in or committed to the prefix cache */
    tsr_sampler *smp;
    tsr_stop stop;
    tsr_detok dt;
    int32_t max_tokens;
    int32_t *stop_ids;
    size_t n_stop_ids;
    bool ignore_eos;
    int32_t logprobs;
    int64_t deadline_ns;
    tsr_event_fn on_event;
    void *ud;
    uint64_t t_submit, t_scheduled, t_first_token;
    int32_t n_generated, n_preempted;
    int32_t n_resumed; /* generated elsewhere before a failover (the prompt's tail) */
    /* speculation */
    bool spec;
    int32_t spec_k, n_draft, spec_pause, n_verify;
    int32_t *draft;
    float acc_ema;
    int32_t spec_drafted, spec_accepted;
    int32_t n_steps; /* steps that produced tokens */
    bool cancel;
    struct seq *next;
} seq;

struct tsr_engine {
    tsr_replica *rep;
    tsr_engine_params p;
    int32_t n_vocab, n_ctx, n_batch;
    /* Shared with request threads (mu). */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    seq *inbox_head, *inbox_tail;
    int32_t n_inbox;
    uint64_t *cancels;
    size_t n_cancels, cap_cancels;
    bool draining, stopping, cancel_all, healthy;
    uint64_t next_id;
    tsr_engine_status snap;
    /* Step-loop state. */
    seq **running;
    int32_t n_running;
    seq **waiting; /* FIFO ring as an array: waiting[0] is the oldest */
    int32_t n_waiting, cap_waiting;
    tsr_kvblocks *kvb; /* block manager and prefix cache */
    /* copy-on-write copies of this step's admissions, made before the step; the engine
     * holds a reference on each src until then ([max_seqs] each) */
    int32_t *cow_src, *cow_dst;
    int32_t n_cow;
    /* Batch scratch. */
    int32_t *b_tokens, *b_pos, *b_seq;
    uint8_t *b_want;
    uint8_t *b_order;     /* order class of each token (worker/model.h tsr_order_class) */
    bool order_sensitive; /* the classes change results (Q4_K): tag cached blocks */
    uint8_t *tags;        /* [n_ctx / TSR_KV_BLOCK_SIZE + 1] prefix-cache tags of a lookup */
    const int32_t **b_tables;
    int32_t *b_nblocks;
    seq **b_seqs;     /* sequence of each batch sequence index */
    int32_t *b_chunk; /* tokens fed per batch sequence */
    float *lg;        /* one row of logits (scratch for the sampler) */
    uint64_t n_preemptions, n_done, n_generated_total;
    double step_ms_mean;
    uint64_t rate_t0, rate_n0;
    double rate;
    uint64_t spec_drafted, spec_accepted;
    uint64_t t_rank_stats;
    /* auto mode: ms per generated token of decode steps, with and without drafts */
    double ms_tok_spec, ms_tok_plain;
    bool mode_spec;        /* current mode */
    int32_t mode_steps;    /* steps in the current phase */
    bool probing;          /* in the short phase of the other mode */
    int32_t phase_len;     /* steps of the main phase: doubles (to 1024) while plain keeps
                              winning, since each probe of a draft model pays its catch-up */
    uint64_t t_draft_ns;   /* drafting time of the step being built */
    int32_t step_tokens;   /* tokens generated by the last step */
    bool step_decode_only; /* every sequence of the step was decoding (no prefill chunk) */
    tsr_rank_stats *rank_stats;
    int32_t n_rank_stats;
    /* step hooks (tsr_engine_add_step_hook), under hook_mu: held while they run */
    pthread_mutex_t hook_mu;
    tsr_step_hook_fn hook_fn[TSR_ENGINE_MAX_STEP_HOOKS];
    void *hook_ud[TSR_ENGINE_MAX_STEP_HOOKS];
};

int tsr_engine_new(tsr_replica *rep, const tsr_engine_params *p, tsr_engine **out, char *err,
                   size_t err_len)
{
    *out = NULL;
    tsr_engine *e = calloc(1, sizeof *e);
    if (!e) goto oom;
    e->rep = rep;
    e->p = *p;
    if (e->p.max_batch_tokens <= 0) e->p.max_batch_tokens = 256;
    if (e->p.max_seqs <= 0) e->p.max_seqs = 64;
    if (e->p.max_queue <= 0) e->p.max_queue = 256;
    if (e->p.idle_heartbeat_ms <= 0) e->p.idle_heartbeat_ms = 1000;
    if (e->p.spec_k <= 0) e->p.spec_k = 4;
    if (e->p.spec_k > 16) e->p.spec_k = 16;
    if (e->p.spec_max_batch <= 0) e->p.spec_max_batch = 4;
    e->n_batch = tsr_replica_n_batch(rep);
    if (e->p.max_batch_tokens > e->n_batch) e->p.max_batch_tokens = e->n_batch;
    e->p.n_kv_blocks = tsr_replica_n_kv_blocks(rep);
    e->n_vocab = tsr_replica_hparams(rep)->n_vocab;
    e->n_ctx = tsr_replica_n_ctx(rep);
    if (e->n_ctx > e->p.n_kv_blocks * TSR_KV_BLOCK_SIZE)
        e->n_ctx = e->p.n_kv_blocks * TSR_KV_BLOCK_SIZE;
    pthread_mutex_init(&e->mu, NULL);
    pthread_mutex_init(&e->hook_mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    e->healthy = true;
    e->next_id = 1;
    const int32_t ms = e->p.max_seqs, nb = e->n_batch;
    e->running = calloc((size_t)ms, sizeof(seq *));
    e->cap_waiting = e->p.max_queue + ms + 1;
    e->waiting = calloc((size_t)e->cap_waiting, sizeof(seq *));
    e->b_tokens = malloc(sizeof(int32_t) * (size_t)nb);
    e->b_pos = malloc(sizeof(int32_t) * (size_t)nb);
    e->b_seq = malloc(sizeof(int32_t) * (size_t)nb);
    e->b_want = malloc((size_t)nb);
    e->b_order = malloc((size_t)nb);
    e->tags = calloc((size_t)(e->n_ctx / TSR_KV_BLOCK_SIZE + 2), 1);
    e->order_sensitive = tsr_replica_order_sensitive(e->rep);
    e->b_tables = calloc((size_t)ms, sizeof(int32_t *));
    e->b_nblocks = calloc((size_t)ms, sizeof(int32_t));
    e->cow_src = calloc((size_t)ms, sizeof(int32_t));
    e->cow_dst = calloc((size_t)ms, sizeof(int32_t));
    e->b_seqs = calloc((size_t)ms, sizeof(seq *));
    e->b_chunk = calloc((size_t)ms, sizeof(int32_t));
    e->lg = malloc(sizeof(float) * (size_t)e->n_vocab);
    if (!e->running || !e->waiting || !e->b_tokens || !e->b_pos || !e->b_seq || !e->b_want ||
        !e->b_order || !e->tags || !e->b_tables || !e->b_nblocks || !e->cow_src || !e->cow_dst ||
        !e->b_seqs || !e->b_chunk || !e->lg)
        goto oom;
    /* --no-prefix-cache covers the draft model's pool too */
    if (e->p.drafter && e->p.no_prefix_cache &&
        tsr_drafter_model_set_prefix_cache(e->p.drafter, false, err, err_len) != 0) {
        tsr_engine_free(e);
        return TSR_ENGINE_EINVAL;
    }
    if (tsr_kvblocks_new(e->p.n_kv_blocks, !e->p.no_prefix_cache, &e->kvb, err, err_len) != 0) {
        tsr_engine_free(e);
        return TSR_ENGINE_ENOMEM;
    }
    e->rate_t0 = tsr_now_ns();
    e->mode_spec = true;
    e->phase_len = 32;
    e->n_rank_stats = tsr_replica_size(rep) < 64 ? tsr_replica_size(rep) : 64;
    e->rank_stats = calloc((size_t)tsr_replica_size(rep), sizeof(tsr_rank_stats));
    if (!e->rank_stats) goto oom;
    *out = e;
    return 0;
oom:
    tsr_set_err(err, err_len, "out of memory creating the engine");
    tsr_engine_free(e);
    return TSR_ENGINE_ENOMEM;
}

static void seq_free(seq *s)
{
    if (!s) return;
    free(s->tokens);
    free(s->blocks);
    free(s->stop_ids);
    free(s->draft);
    tsr_sampler_free(s->smp);
    tsr_stop_free(&s->stop);
    tsr_detok_free(&s->dt);
    free(s);
}

void tsr_engine_free(tsr_engine *e)
{
    if (!e) return;
    for (seq *s = e->inbox_head; s;) {
        seq *n = s->next;
        seq_free(s);
        s = n;
    }
    for (int32_t i = 0; i < e->n_running; i++) seq_free(e->running[i]);
    for (int32_t i = 0; i < e->n_waiting; i++) seq_free(e->waiting[i]);
    pthread_mutex_destroy(&e->mu);
    pthread_mutex_destroy(&e->hook_mu);
    pthread_cond_destroy(&e->cv);
    free(e->running);
    free(e->waiting);
    tsr_kvblocks_free(e->kvb);
    free(e->cancels);
    free(e->b_tokens);
    free(e->b_pos);
    free(e->b_seq);
    free(e->b_want);
    free(e->b_order);
    free(e->tags);
    free(e->b_tables);
    free(e->b_nblocks);
    free(e->cow_src);
    free(e->cow_dst);
    free(e->b_seqs);
    free(e->b_chunk);
    free(e->lg);
    free(e->rank_stats);
    free(e);
}

/* ---- submission (request threads) ---- */

/* A resumed request: run the tokens generated before the failover through the detokenizer
 * and the stop matcher, dropping the text they release (the client has it already) and
 * keeping what they hold back (an incomplete UTF-8 character, a possible start of a stop
 * string), exactly as the first run held it after those tokens: what the matcher holds is a
 * function of the text so far, not of how it was cut. End-of-generation tokens were never
 * text. 0, or -1 out of memory. */
static int resume_replay(tsr_engine *e, seq *s, const int32_t *ids)
{
    const tsr_vocab *vocab = tsr_replica_vocab(e->rep);
    for (int32_t i = 0; i < s->n_resumed; i++) {
        const char *piece, *out;
        size_t piece_len, out_len;
        if (tsr_vocab_is_eog(vocab, ids[i])) continue;
        if (tsr_detok_push(&s->dt, ids[i], &piece, &piece_len) != 0) continue;
        if (tsr_stop_push(&s->stop, piece, piece_len, &out, &out_len) < 0) return -1;
    }
    return 0;
}

int tsr_engine_submit(tsr_engine *e, const tsr_engine_request *rq, uint64_t *id, char *err,
                      size_t err_len)
{
    const tsr_gen_params *g = &rq->gen;
    if (rq->n_prompt == 0) {
        tsr_set_err(err, err_len, "prompt: the prompt is empty");
        return TSR_ENGINE_EINVAL;
    }
    if (rq->n_prompt >= (size_t)e->n_ctx) {
        tsr_set_err(err, err_len,
                    "prompt: %zu tokens do not fit the context of %d tokens (prompt plus at least "
                    "one generated token); shorten it",
                    rq->n_prompt, e->n_ctx);
        return TSR_ENGINE_EINVAL;
    }
    for (size_t i = 0; i < rq->n_prompt; i++) {
        if (rq->prompt_ids[i] < 0 || rq->prompt_ids[i] >= e->n_vocab) {
            tsr_set_err(err, err_len,
                        "prompt_ids: id %d at index %zu is not in the vocabulary (0..%d)",
                        rq->prompt_ids[i], i, e->n_vocab - 1);
            return TSR_ENGINE_EINVAL;
        }
    }
    if (g->max_tokens < 1) {
        tsr_set_err(err, err_len, "max_tokens must be >= 1, got %d", g->max_tokens);
        return TSR_ENGINE_EINVAL;
    }
    if (rq->speculation < -1 || rq->speculation > 1) {
        tsr_set_err(err, err_len, "speculation must be off (0) or auto (1), got %d",
                    rq->speculation);
        return TSR_ENGINE_EINVAL;
    }
    if (rq->logprobs < 0 || rq->logprobs > MAX_LOGPROBS) {
        tsr_set_err(err, err_len, "logprobs must be in 0..%d, got %d", MAX_LOGPROBS, rq->logprobs);
        return TSR_ENGINE_EINVAL;
    }
    if (g->n_stop_ids > TSR_ENGINE_MAX_STOP_IDS || g->n_stop > TSR_ENGINE_MAX_STOPS) {
        tsr_set_err(err, err_len, "%s: at most %d per request, got %zu",
                    g->n_stop_ids > TSR_ENGINE_MAX_STOP_IDS ? "stop_token_ids" : "stop",
                    g->n_stop_ids > TSR_ENGINE_MAX_STOP_IDS ? TSR_ENGINE_MAX_STOP_IDS
                                                            : TSR_ENGINE_MAX_STOPS,
                    g->n_stop_ids > TSR_ENGINE_MAX_STOP_IDS ? g->n_stop_ids : g->n_stop);
        return TSR_ENGINE_EINVAL;
    }
    for (size_t i = 0; i < g->n_stop_ids; i++) {
        if (g->stop_ids[i] < 0 || g->stop_ids[i] >= e->n_vocab) {
            tsr_set_err(err, err_len, "stop_token_ids: id %d is not in the vocabulary (0..%d)",
                        g->stop_ids[i], e->n_vocab - 1);
            return TSR_ENGINE_EINVAL;
        }
    }
    if (tsr_sampling_params_validate(&g->sampling, err, err_len) != 0) return TSR_ENGINE_EINVAL;
    if (rq->n_resumed < 0 || (size_t)rq->n_resumed >= rq->n_prompt) {
        tsr_set_err(err, err_len,
                    "resumed_tokens must be in 0..%zu (the prompt ids minus at least one real "
                    "prompt token), got %d",
                    rq->n_prompt - 1, rq->n_resumed);
        return TSR_ENGINE_EINVAL;
    }

    seq *s = calloc(1, sizeof *s);
    if (!s) goto oom;
    /* Sizes in 64 bits: max_tokens may be anything up to 2^31 - 1, and beyond the context
     * it means "until the context is full" (finish reason length). n_prompt < n_ctx. */
    int64_t cap = (int64_t)rq->n_prompt + (int64_t)g->max_tokens + 1;
    if (cap > (int64_t)e->n_ctx + 1) cap = (int64_t)e->n_ctx + 1;
    s->cap = (int32_t)cap;
    s->tokens = malloc(sizeof(int32_t) * (size_t)s->cap);
    s->blocks_cap = (s->cap + TSR_KV_BLOCK_SIZE - 1) / TSR_KV_BLOCK_SIZE + 1;
    s->blocks = malloc(sizeof(int32_t) * (size_t)s->blocks_cap);
    if (!s->tokens || !s->blocks) goto oom_s;
    memcpy(s->tokens, rq->prompt_ids, sizeof(int32_t) * rq->n_prompt);
    s->n_prompt = s->n_tokens = (int32_t)rq->n_prompt;
    if (tsr_sampler_new(&g->sampling, e->n_vocab, &s->smp, err, err_len) != 0) {
        seq_free(s);
        return TSR_ENGINE_EINVAL;
    }
    const size_t n_real_prompt = rq->n_prompt - (size_t)rq->n_resumed;
    tsr_sampler_add_prompt(s->smp, rq->prompt_ids, n_real_prompt);
    for (size_t i = n_real_prompt; i < rq->n_prompt; i++)
        tsr_sampler_accept(s->smp, rq->prompt_ids[i]);
    if (tsr_stop_init(&s->stop, g->stop, g->n_stop, err, err_len) != 0) {
        tsr_sampler_free(s->smp);
        free(s->tokens);
        free(s->blocks);
        free(s);
        return TSR_ENGINE_EINVAL;
    }
    if (tsr_detok_init(&s->dt, tsr_replica_vocab(e->rep), 0) != 0) {
        tsr_sampler_free(s->smp);
        tsr_stop_free(&s->stop);
        free(s->tokens);
        free(s->blocks);
        free(s);
        goto oom;
    }
    if (g->n_stop_ids) {
        s->stop_ids = malloc(sizeof(int32_t) * g->n_stop_ids);
        if (!s->stop_ids) goto oom_s;
        memcpy(s->stop_ids, g->stop_ids, sizeof(int32_t) * g->n_stop_ids);
        s->n_stop_ids = g->n_stop_ids;
    }
    s->max_tokens = g->max_tokens;
    s->ignore_eos = g->ignore_eos;
    s->n_resumed = rq->n_resumed;
    if (rq->n_resumed > 0 && resume_replay(e, s, rq->prompt_ids + n_real_prompt) != 0) goto oom_s;
    s->spec = e->p.drafter && rq->logprobs == 0 &&
              (rq->speculation > 0 || (rq->speculation < 0 && e->p.spec_default_on));
    if (s->spec) {
        s->draft = malloc(sizeof(int32_t) * (size_t)e->p.spec_k);
        if (!s->draft) goto oom_s;
        s->spec_k = e->p.spec_k < 2 ? e->p.spec_k : 2;
        s->acc_ema = 0.5f;
    }
    s->logprobs = rq->logprobs;
    s->deadline_ns = rq->deadline_ns;
    s->on_event = rq->on_event;
    s->ud = rq->ud;
    s->t_submit = tsr_now_ns();

    pthread_mutex_lock(&e->mu);
    int rc = TSR_ENGINE_OK;
    if (!e->healthy) {
        tsr_set_err(err, err_len, "the replica's data plane is down; retry on another replica");
        rc = TSR_ENGINE_EDOWN;
    } else if (e->draining || e->stopping) {
        tsr_set_err(err, err_len, "the server is draining and accepts no new requests");
        rc = TSR_ENGINE_EDRAINING;
    } else if (e->snap.n_waiting >= e->p.max_queue) {
        tsr_set_err(err, err_len, "the queue is full (%d waiting requests); retry later",
                    e->p.max_queue);
        rc = TSR_ENGINE_EQUEUE_FULL;
    }
    if (rc == TSR_ENGINE_OK) {
        s->id = e->next_id++;
        if (e->inbox_tail)
            e->inbox_tail->next = s;
        else
            e->inbox_head = s;
        e->inbox_tail = s;
        e->n_inbox++;
        e->snap.n_waiting++; /* visible to status at once */
        if (id) *id = s->id;
        pthread_cond_signal(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
    if (rc != TSR_ENGINE_OK) seq_free(s);
    return rc;
oom_s:
    seq_free(s);
oom:
    tsr_set_err(err, err_len,
                "out of memory queuing the request (prompt of %zu tokens); retry later or on "
                "another replica",
                rq->n_prompt);
    return TSR_ENGINE_ENOMEM;
}

void tsr_engine_cancel(tsr_engine *e, uint64_t id)
{
    pthread_mutex_lock(&e->mu);
    if (e->n_cancels == e->cap_cancels) {
        size_t cap = e->cap_cancels ? 2 * e->cap_cancels : 16;
        uint64_t *c = realloc(e->cancels, cap * sizeof *c);
        if (c) {
            e->cancels = c;
            e->cap_cancels = cap;
        }
    }
    if (e->n_cancels < e->cap_cancels) e->cancels[e->n_cancels++] = id;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

void tsr_engine_drain(tsr_engine *e)
{
    pthread_mutex_lock(&e->mu);
    e->draining = true;
    e->snap.draining = true;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

void tsr_engine_stop(tsr_engine *e, bool cancel_all)
{
    pthread_mutex_lock(&e->mu);
    e->stopping = true;
    e->draining = true;
    e->snap.draining = true;
    if (cancel_all) e->cancel_all = true;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

void tsr_engine_get_status(tsr_engine *e, tsr_engine_status *st)
{
    pthread_mutex_lock(&e->mu);
    *st = e->snap;
    st->healthy = e->healthy;
    st->draining = e->draining;
    pthread_mutex_unlock(&e->mu);
}

/* ---- the step loop ---- */

/* Drop s's references to its blocks (shared prefix blocks stay cached for others). */
static void blocks_release(tsr_engine *e, seq *s)
{
    tsr_kvblocks_release(e->kvb, s->blocks, s->n_blocks);
    s->n_blocks = 0;
    s->n_computed = 0;
    memset(&s->chain, 0, sizeof s->chain);
}

/* Make sure s has blocks for its first `upto` positions; false when the pool is short
 * (free blocks and cached blocks nobody references both count). */
static bool blocks_reserve(tsr_engine *e, seq *s, int32_t upto)
{
    int32_t need = (upto + TSR_KV_BLOCK_SIZE - 1) / TSR_KV_BLOCK_SIZE;
    if (need <= s->n_blocks) return true;
    if (!tsr_kvblocks_alloc(e->kvb, need - s->n_blocks, s->blocks + s->n_blocks)) return false;
    s->n_blocks = need;
    return true;
}

/* The length of s's prompt for the order classes: the real prompt (tokens resumed after a
 * failover were generated, and keep the generated tokens' class). */
static int32_t order_prompt_len(const seq *s)
{
    return s->n_prompt - s->n_resumed;
}

/* The prefix-cache tag of s's block i: how many of its positions run as prompt tokens (0..16)
 * on a model whose results depend on the order class, else 0. A block is reused only by a
 * sequence that computes it in the same classes (a cold run's), so the previous answer of a
 * chat, computed as generated tokens, is not reused as the next turn's prompt there. */
static uint8_t block_tag(const tsr_engine *e, const seq *s, int32_t i)
{
    if (!e->order_sensitive) return 0;
    const int32_t c = (order_prompt_len(s) / 4) * 4 - i * TSR_KV_BLOCK_SIZE;
    return (uint8_t)(c < 0 ? 0 : c > TSR_KV_BLOCK_SIZE ? TSR_KV_BLOCK_SIZE : c);
}

/* A sequence about to be admitted with nothing computed: reuse the longest cached chain of
 * its tokens' full blocks. When that covers every token (they end on a block boundary),
 * the last token must still run for its logits and writes into the last block: that block
 * becomes a private copy (copy-on-write; cow_src and cow_dst get the pair, the caller copies
 * and then releases src), or, with no block to spare, is dropped and recomputed. */
static void prefix_match(tsr_engine *e, seq *s, int32_t *cow_src, int32_t *cow_dst)
{
    *cow_src = *cow_dst = -1;
    if (s->n_blocks > 0 || !tsr_kvblocks_caching(e->kvb)) return;
    const int32_t full = s->n_tokens / TSR_KV_BLOCK_SIZE;
    for (int32_t i = 0; i < full; i++) e->tags[i] = block_tag(e, s, i);
    int32_t n = tsr_kvblocks_match_tagged(e->kvb, s->tokens, e->tags, full, s->blocks, &s->chain);
    s->n_blocks = n;
    s->n_computed = n * TSR_KV_BLOCK_SIZE;
    if (n > 0 && s->n_computed >= s->n_tokens) {
        if (tsr_kvblocks_cow(e->kvb, &s->chain, s->blocks, cow_src, cow_dst)) {
            s->n_computed = s->n_tokens - 1;
        } else {
            s->n_blocks = n - 1;
            s->n_computed = (n - 1) * TSR_KV_BLOCK_SIZE;
        }
    }
}

/* Cache s's full blocks whose K/V are all computed now (prompt and generated tokens). They
 * are final: s only writes at positions >= n_computed, and never moves n_computed back
 * while it holds them. */
static void prefix_commit(tsr_engine *e, seq *s)
{
    if (!tsr_kvblocks_caching(e->kvb)) return;
    int32_t upto = s->n_computed;
    while (s->chain.n_blocks < upto / TSR_KV_BLOCK_SIZE) {
        int32_t i = s->chain.n_blocks;
        tsr_kvblocks_commit_tagged(e->kvb, &s->chain, s->blocks[i],
                                   s->tokens + (size_t)i * TSR_KV_BLOCK_SIZE, block_tag(e, s, i));
    }
}

static void finish(tsr_engine *e, seq *s, int reason, const char *error)
{
    /* Flush held-back text on natural ends (not on cancel/error). */
    if (reason == TSR_FINISH_LENGTH || reason == TSR_FINISH_EOS) {
        const char *piece, *out;
        size_t piece_len, out_len;
        if (tsr_stop_matched(&s->stop) < 0 && tsr_detok_flush(&s->dt, &piece, &piece_len) == 0) {
            int sr = tsr_stop_push(&s->stop, piece, piece_len, &out, &out_len);
            if (sr >= 0 && out_len > 0) {
                tsr_event ev = {
                    .kind = TSR_EV_TOKENS, .request_id = s->id, .text = out, .text_len = out_len};
                s->on_event(s->ud, &ev);
            }
            if (sr == 1)
                reason = TSR_FINISH_STOP;
            else {
                tsr_stop_flush(&s->stop, &out, &out_len);
                if (out_len > 0) {
                    tsr_event ev = {.kind = TSR_EV_TOKENS,
                                    .request_id = s->id,
                                    .text = out,
                                    .text_len = out_len};
                    s->on_event(s->ud, &ev);
                }
            }
        }
    }
    uint64_t t = tsr_now_ns();
    tsr_event ev = {.kind = TSR_EV_FINISH,
                    .request_id = s->id,
                    .finish_reason = reason,
                    .error = error,
                    .n_prompt_tokens = s->n_prompt - s->n_resumed,
                    .n_completion_tokens = s->n_resumed + s->n_generated,
                    .t_queue_ns = s->t_scheduled ? s->t_scheduled - s->t_submit : t - s->t_submit,
                    .t_first_token_ns = s->t_first_token ? s->t_first_token - s->t_submit : 0,
                    .t_decode_ns = s->t_first_token ? t - s->t_first_token : 0,
                    .n_preempted = s->n_preempted,
                    .spec_drafted = s->spec_drafted,
                    .spec_accepted = s->spec_accepted,
                    .n_steps = s->n_steps};
    s->on_event(s->ud, &ev);
    if (s->spec) e->p.drafter->vt->release(e->p.drafter, s->id);
    blocks_release(e, s);
    e->n_done++;
    seq_free(s);
}

static void remove_running(tsr_engine *e, int32_t i)
{
    memmove(&e->running[i], &e->running[i + 1], sizeof(seq *) * (size_t)(e->n_running - i - 1));
    e->n_running--;
}

static void remove_waiting(tsr_engine *e, int32_t i)
{
    memmove(&e->waiting[i], &e->waiting[i + 1], sizeof(seq *) * (size_t)(e->n_waiting - i - 1));
    e->n_waiting--;
}

static void push_waiting_front(tsr_engine *e, seq *s)
{
    memmove(&e->waiting[1], &e->waiting[0], sizeof(seq *) * (size_t)e->n_waiting);
    e->waiting[0] = s;
    e->n_waiting++;
}

/* Take new requests and cancellations from the request threads. */
static void intake(tsr_engine *e, bool *stop, bool *cancel_all)
{
    pthread_mutex_lock(&e->mu);
    seq *in = e->inbox_head;
    e->inbox_head = e->inbox_tail = NULL;
    e->n_inbox = 0;
    size_t nc = e->n_cancels;
    uint64_t cancels[256];
    if (nc > 256) nc = 256;
    if (nc > 0) {
        memcpy(cancels, e->cancels, nc * sizeof(uint64_t));
        memmove(e->cancels, e->cancels + nc, (e->n_cancels - nc) * sizeof(uint64_t));
        e->n_cancels -= nc;
    }
    *stop = e->stopping;
    *cancel_all = e->cancel_all;
    pthread_mutex_unlock(&e->mu);
    for (seq *s = in; s;) {
        seq *n = s->next;
        s->next = NULL;
        e->waiting[e->n_waiting++] = s; /* capacity: max_queue + max_seqs + 1 */
        s = n;
    }
    uint64_t t = tsr_now_ns();
    for (int32_t i = 0; i < e->n_running; i++) {
        seq *s = e->running[i];
        for (size_t k = 0; k < nc; k++) s->cancel |= cancels[k] == s->id;
        if (*cancel_all || (s->deadline_ns && (int64_t)t > s->deadline_ns)) s->cancel = true;
        if (s->cancel) {
            remove_running(e, i--);
            finish(e, s, TSR_FINISH_CANCELLED, NULL);
        }
    }
    for (int32_t i = 0; i < e->n_waiting; i++) {
        seq *s = e->waiting[i];
        for (size_t k = 0; k < nc; k++) s->cancel |= cancels[k] == s->id;
        if (*cancel_all || (s->deadline_ns && (int64_t)t > s->deadline_ns)) s->cancel = true;
        if (s->cancel) {
            remove_waiting(e, i--);
            finish(e, s, TSR_FINISH_CANCELLED, NULL);
        }
    }
}

static void publish_status(tsr_engine *e)
{
    uint64_t t = tsr_now_ns();
    if (t - e->t_rank_stats > 2000000000ull) {
        /* Every rank's compute/communication split, for Admin.Status. A failure here
         * shows up in the next step as well; ignore it. */
        char err[256];
        e->t_rank_stats = t;
        (void)tsr_replica_poll_stats(e->rep, e->rank_stats, err, sizeof err);
    }
    if (t - e->rate_t0 > 2000000000ull) {
        e->rate = (double)(e->n_generated_total - e->rate_n0) * 1e9 / (double)(t - e->rate_t0);
        e->rate_t0 = t;
        e->rate_n0 = e->n_generated_total;
    }
    int32_t needed = 0;
    for (int32_t i = 0; i < e->n_running; i++)
        needed += (e->running[i]->n_tokens + TSR_KV_BLOCK_SIZE - 1) / TSR_KV_BLOCK_SIZE;
    pthread_mutex_lock(&e->mu);
    e->snap.kv_blocks_needed = needed;
    e->snap.n_rank_stats = e->n_rank_stats;
    memcpy(e->snap.rank_stats, e->rank_stats, sizeof(tsr_rank_stats) * (size_t)e->n_rank_stats);
    e->snap.n_running = e->n_running;
    e->snap.n_waiting = e->n_waiting + e->n_inbox;
    tsr_kvblocks_stats kst;
    tsr_kvblocks_get_stats(e->kvb, &kst);
    e->snap.kv_blocks_total = e->p.n_kv_blocks;
    e->snap.kv_blocks_free = kst.n_total - kst.n_used;
    e->snap.kv_blocks_used = kst.n_used;
    e->snap.kv_blocks_cached = kst.n_cached;
    e->snap.prefix_cache = tsr_kvblocks_caching(e->kvb);
    e->snap.prefix_cache_lookups = kst.n_lookups;
    e->snap.prefix_cache_hits = kst.n_hits;
    e->snap.prefix_cache_hit_tokens = kst.n_hit_tokens;
    e->snap.prefix_cache_evictions = kst.n_evictions;
    e->snap.prefix_cache_copies = kst.n_copies;
    e->snap.kv_block_tokens = TSR_KV_BLOCK_SIZE;
    e->snap.n_preemptions = e->n_preemptions;
    e->snap.n_requests_done = e->n_done;
    e->snap.n_tokens_generated = e->n_generated_total;
    e->snap.tokens_per_s = e->rate;
    e->snap.step_ms_mean = e->step_ms_mean;
    e->snap.n_ranks = tsr_replica_size(e->rep);
    e->snap.spec_drafted = e->spec_drafted;
    e->snap.spec_accepted = e->spec_accepted;
    e->snap.spec_acceptance =
        e->spec_drafted ? (double)e->spec_accepted / (double)e->spec_drafted : 0.0;
    pthread_mutex_unlock(&e->mu);
}

/* Preempt the newest running sequence (index n_running - 1). */
static void preempt_newest(tsr_engine *e)
{
    seq *v = e->running[e->n_running - 1];
    e->n_running--;
    blocks_release(e, v);
    v->n_preempted++;
    e->n_preemptions++;
    push_waiting_front(e, v);
}

/* Build the next batch; returns its token count (0: nothing to do). */
static int32_t schedule(tsr_engine *e, int32_t *n_bseq)
{
    int32_t budget = e->p.max_batch_tokens, n = 0, k = 0;
    int32_t n_decoding = 0;
    for (int32_t i = 0; i < e->n_running; i++)
        n_decoding += e->running[i]->n_tokens - e->running[i]->n_computed == 1;
    const bool spec_step =
        e->p.drafter && n_decoding <= e->p.spec_max_batch && (e->mode_spec || e->p.spec_no_probe);
    e->t_draft_ns = 0;
    /* 1. running sequences, oldest first */
    for (int32_t i = 0; i < e->n_running && budget > 0; i++) {
        seq *s = e->running[i];
        int32_t want = s->n_tokens - s->n_computed;
        s->n_draft = 0;
        if (want == 1 && s->spec && spec_step && budget > 1) {
            if (s->spec_pause > 0) {
                s->spec_pause--;
            } else {
                int32_t kk = s->spec_k < budget - 1 ? s->spec_k : budget - 1;
                int32_t remain = s->max_tokens - s->n_generated - 1;
                if (kk > remain) kk = remain;
                if (s->n_tokens + kk >= e->n_ctx) kk = e->n_ctx - s->n_tokens - 1;
                char derr[256];
                /* Drafts of an earlier step that were never verified (preempted, cut by
                 * the budget) must not linger in the drafter. */
                uint64_t td = tsr_now_ns();
                e->p.drafter->vt->rollback(e->p.drafter, s->id, s->n_tokens);
                int m = kk > 0
                            ? e->p.drafter->vt->propose(e->p.drafter, s->id, s->tokens, s->n_tokens,
                                                        kk, s->draft, derr, sizeof derr)
                            : 0;
                e->t_draft_ns += tsr_now_ns() - td;
                if (m > 0) s->n_draft = m;
            }
        }
        want += s->n_draft;
        int32_t chunk = want < budget ? want : budget;
        while (!blocks_reserve(e, s, s->n_computed + chunk)) {
            /* Out of blocks: preempt the newest running sequence (maybe s itself). */
            bool self = i == e->n_running - 1;
            preempt_newest(e);
            if (self) {
                chunk = 0;
                break;
            }
        }
        if (chunk == 0) break;
        if (s->n_draft > 0 && chunk < want) s->n_draft = chunk - 1; /* budget-limited */
        e->b_seqs[k] = s;
        e->b_chunk[k] = chunk;
        k++;
        n += chunk;
        budget -= chunk;
    }
    /* 2. waiting sequences, FIFO, while they fit */
    while (e->n_waiting > 0 && budget > 0 && e->n_running < e->p.max_seqs) {
        seq *s = e->waiting[0];
        s->n_draft = 0;
        int32_t cow_src, cow_dst;
        prefix_match(e, s, &cow_src, &cow_dst);
        int32_t want = s->n_tokens - s->n_computed;
        int32_t chunk = want < budget ? want : budget;
        if (!blocks_reserve(e, s, s->n_computed + chunk)) {
            /* the prefix found, if any: looked up again next step */
            if (cow_src >= 0) tsr_kvblocks_release(e->kvb, &cow_src, 1);
            blocks_release(e, s);
            break;
        }
        if (cow_src >= 0) {
            e->cow_src[e->n_cow] = cow_src;
            e->cow_dst[e->n_cow] = cow_dst;
            e->n_cow++;
        }
        tsr_kvblocks_count_lookup(e->kvb,
                                  (s->n_computed + TSR_KV_BLOCK_SIZE - 1) / TSR_KV_BLOCK_SIZE);
        remove_waiting(e, 0);
        e->running[e->n_running++] = s;
        if (!s->t_scheduled) s->t_scheduled = tsr_now_ns();
        e->b_seqs[k] = s;
        e->b_chunk[k] = chunk;
        k++;
        n += chunk;
        budget -= chunk;
    }
    /* Lay out the batch. */
    int32_t t = 0;
    e->step_decode_only = true;
    for (int32_t j = 0; j < k; j++)
        if (e->b_chunk[j] != 1 + e->b_seqs[j]->n_draft) e->step_decode_only = false;
    for (int32_t j = 0; j < k; j++) {
        seq *s = e->b_seqs[j];
        for (int32_t c = 0; c < e->b_chunk[j]; c++, t++) {
            int32_t p = s->n_computed + c;
            e->b_tokens[t] = p < s->n_tokens ? s->tokens[p] : s->draft[p - s->n_tokens];
            e->b_pos[t] = p;
            e->b_seq[t] = j;
            e->b_want[t] = p >= s->n_tokens - 1;
            e->b_order[t] = tsr_order_class(p, order_prompt_len(s));
        }
        e->b_tables[j] = s->blocks;
        e->b_nblocks[j] = s->n_blocks;
    }
    *n_bseq = k;
    return n;
}

static int find_running(tsr_engine *e, seq *s)
{
    for (int32_t i = 0; i < e->n_running; i++)
        if (e->running[i] == s) return i;
    return -1;
}

/* Give blocks past what `upto` positions need back to the pool. */
static void blocks_trim(tsr_engine *e, seq *s, int32_t upto)
{
    int32_t need = (upto + TSR_KV_BLOCK_SIZE - 1) / TSR_KV_BLOCK_SIZE;
    if (need < s->chain.n_blocks) need = s->chain.n_blocks; /* never a shared prompt block */
    if (s->n_blocks <= need) return;
    tsr_kvblocks_release(e->kvb, s->blocks + need, s->n_blocks - need);
    s->n_blocks = need;
}

/* Append a sampled token, emit its text; returns a finish reason or -1. */
static int emit_token(tsr_engine *e, seq *s, int32_t id, const float *chosen,
                      const tsr_logprob *tops)
{
    const tsr_vocab *vocab = tsr_replica_vocab(e->rep);
    tsr_sampler_accept(s->smp, id);
    s->tokens[s->n_tokens++] = id;
    s->n_generated++;
    e->n_generated_total++;
    e->step_tokens++;
    if (!s->t_first_token) s->t_first_token = tsr_now_ns();
    int reason = -1;
    const char *out = "";
    size_t out_len = 0;
    if (!s->ignore_eos && tsr_vocab_is_eog(vocab, id)) {
        reason = TSR_FINISH_EOS;
    } else {
        const char *piece;
        size_t piece_len;
        int sr = 0;
        if (tsr_detok_push(&s->dt, id, &piece, &piece_len) == 0)
            sr = tsr_stop_push(&s->stop, piece, piece_len, &out, &out_len);
        if (sr == 1) reason = TSR_FINISH_STOP;
        for (size_t k = 0; k < s->n_stop_ids; k++)
            if (s->stop_ids[k] == id) reason = TSR_FINISH_STOP;
    }
    tsr_event ev = {.kind = TSR_EV_TOKENS,
                    .request_id = s->id,
                    .ids = &s->tokens[s->n_tokens - 1],
                    .n_ids = 1,
                    .text = out,
                    .text_len = out_len,
                    .chosen_logprobs = tops ? chosen : NULL,
                    .top_logprobs = tops,
                    .n_top = tops ? s->logprobs : 0};
    s->on_event(s->ud, &ev);
    if (reason < 0 && (s->n_generated >= s->max_tokens || s->n_tokens >= e->n_ctx))
        reason = TSR_FINISH_LENGTH;
    return reason;
}

/* Adapt a sequence's draft length after verifying m drafts of which a were accepted. */
static void spec_adapt(tsr_engine *e, seq *s, int32_t m, int32_t a)
{
    s->spec_drafted += m;
    s->spec_accepted += a;
    e->spec_drafted += (uint64_t)m;
    e->spec_accepted += (uint64_t)a;
    s->acc_ema = 0.7f * s->acc_ema + 0.3f * ((float)a / (float)m);
    s->n_verify++;
    if (a == m)
        s->spec_k = s->spec_k + 1 <= e->p.spec_k ? s->spec_k + 1 : e->p.spec_k;
    else
        s->spec_k = a + 1;
    if (s->n_verify >= 4 && s->acc_ema < 0.3f) {
        /* Drafts mostly wasted: decode plainly for a while, then probe again. */
        s->spec_pause = 16;
        s->spec_k = 1;
        s->acc_ema = 0.5f;
        s->n_verify = 0;
    }
}

/* Sample and emit for each sequence that got logits; finish the ended ones. */
static void after_step(tsr_engine *e, int32_t n_bseq, const float *logits)
{
    int32_t row = 0;
    const size_t V = (size_t)e->n_vocab;
    for (int32_t j = 0; j < n_bseq; j++) {
        seq *s = e->b_seqs[j];
        const int32_t m = s->n_draft;
        const int32_t n_tokens_before = s->n_tokens;
        s->n_computed += e->b_chunk[j] - m;
        prefix_commit(e, s);
        if (s->n_computed < s->n_tokens) continue; /* still prefilling */
        s->n_steps++;
        int reason = -1;
        int32_t accepted = 0;
        for (int32_t i = 0; i <= m && reason < 0; i++) {
            const float *row_i = logits + (size_t)(row + i) * V;
            int32_t id;
            if (i == m && s->logprobs == 0 && tsr_sampler_read_only(s->smp)) {
                /* greedy, no penalties: the argmax of the step's row, no scratch copy */
                id = tsr_sampler_sample_read_only(s->smp, row_i);
                reason = emit_token(e, s, id, NULL, NULL);
                continue;
            }
            memcpy(e->lg, row_i, sizeof(float) * V);
            if (i < m) {
                bool ok;
                id = tsr_sampler_sample_spec(s->smp, e->lg, s->draft[i], &ok);
                reason = emit_token(e, s, id, NULL, NULL);
                if (!ok) break;
                accepted++;
            } else if (s->logprobs > 0) {
                float chosen = 0.0f;
                int32_t top_ids[MAX_LOGPROBS];
                float top_lp[MAX_LOGPROBS];
                tsr_logprob tops[MAX_LOGPROBS];
                id = tsr_sampler_sample_logprobs(s->smp, e->lg, s->logprobs, top_ids, top_lp,
                                                 &chosen);
                for (int32_t k = 0; k < s->logprobs; k++) {
                    tops[k].id = top_ids[k];
                    tops[k].logprob = top_lp[k];
                }
                reason = emit_token(e, s, id, &chosen, tops);
            } else {
                id = tsr_sampler_sample(s->smp, e->lg);
                reason = emit_token(e, s, id, NULL, NULL);
            }
        }
        row += 1 + m;
        if (m > 0) {
            /* Valid KV: everything up to the last accepted draft; the token just sampled
             * after it is fed next step. */
            s->n_computed = n_tokens_before + accepted;
            blocks_trim(e, s, s->n_computed + 1);
            e->p.drafter->vt->rollback(e->p.drafter, s->id, s->n_computed);
            spec_adapt(e, s, m, accepted);
            s->n_draft = 0;
        }
        if (reason >= 0) {
            int i = find_running(e, s);
            if (i >= 0) remove_running(e, i);
            finish(e, s, reason, NULL);
        }
    }
}

/* Auto speculation: learn the time per generated token with and without drafts from pure
 * decode steps (every sequence decoding: prefill chunks would blur the figure). */
static void auto_mode(tsr_engine *e, int32_t n_tokens, int32_t n_bseq, double ms)
{
    if (!e->p.drafter || e->p.spec_no_probe || e->step_tokens == 0) return;
    const bool decode_only = e->step_decode_only, drafted = e->t_draft_ns > 0;
    (void)n_tokens;
    (void)n_bseq;
    if (decode_only) {
        double v = ms / (double)e->step_tokens;
        double *m = drafted ? &e->ms_tok_spec : &e->ms_tok_plain;
        *m = *m == 0.0 ? v : 0.8 * *m + 0.2 * v;
    }
    e->mode_steps++;
    if (e->probing ? e->mode_steps >= 8 : e->mode_steps >= e->phase_len) {
        if (e->probing) {
            /* End of a probe: keep the faster mode (unknown counts as worth trying). */
            e->probing = false;
            if (e->ms_tok_spec > 0.0 && e->ms_tok_plain > 0.0)
                e->mode_spec = e->ms_tok_spec < e->ms_tok_plain;
            if (e->mode_spec)
                e->phase_len = 32;
            else if (e->phase_len < 1024)
                e->phase_len *= 2;
        } else {
            e->probing = true;
            e->mode_spec = !e->mode_spec;
        }
        e->mode_steps = 0;
    }
}

int tsr_engine_add_step_hook(tsr_engine *e, tsr_step_hook_fn fn, void *ud)
{
    int rc = -1;
    pthread_mutex_lock(&e->hook_mu);
    for (int i = 0; i < TSR_ENGINE_MAX_STEP_HOOKS && rc != 0; i++)
        if (!e->hook_fn[i]) {
            e->hook_fn[i] = fn;
            e->hook_ud[i] = ud;
            rc = 0;
        }
    pthread_mutex_unlock(&e->hook_mu);
    return rc;
}

void tsr_engine_remove_step_hook(tsr_engine *e, tsr_step_hook_fn fn, void *ud)
{
    pthread_mutex_lock(&e->hook_mu);
    for (int i = 0; i < TSR_ENGINE_MAX_STEP_HOOKS; i++)
        if (e->hook_fn[i] == fn && e->hook_ud[i] == ud) e->hook_fn[i] = NULL;
    pthread_mutex_unlock(&e->hook_mu);
}

/* After a step's events (and before waiting or returning): the front ends' step hooks. */
static void step_hooks(tsr_engine *e)
{
    pthread_mutex_lock(&e->hook_mu);
    for (int i = 0; i < TSR_ENGINE_MAX_STEP_HOOKS; i++)
        if (e->hook_fn[i]) e->hook_fn[i](e->hook_ud[i]);
    pthread_mutex_unlock(&e->hook_mu);
}

/* The end of every turn of the run loop (a step, an idle turn, the loop's exit): the
 * Admin.Status figures first, then the front ends' hooks, so a woken sender sees them. */
static void end_turn(tsr_engine *e)
{
    publish_status(e);
    step_hooks(e);
}

static void fail_all(tsr_engine *e, const char *error)
{
    while (e->n_running > 0) {
        seq *s = e->running[e->n_running - 1];
        e->n_running--;
        finish(e, s, TSR_FINISH_ERROR, error);
    }
    while (e->n_waiting > 0) {
        seq *s = e->waiting[e->n_waiting - 1];
        e->n_waiting--;
        finish(e, s, TSR_FINISH_ERROR, error);
    }
}

int tsr_engine_run(tsr_engine *e, char *err, size_t err_len)
{
    for (;;) {
        bool stop, cancel_all;
        intake(e, &stop, &cancel_all);
        if (stop && (cancel_all || (e->n_running == 0 && e->n_waiting == 0))) break;
        int32_t n_bseq = 0;
        int32_t n = schedule(e, &n_bseq);
        if (n == 0) {
            end_turn(e);
            /* Idle (or blocked on KV with nothing running: cannot happen, a lone sequence
             * always fits since submit checks the prompt against the pool). Sleep until
             * work arrives or the heartbeat is due. */
            pthread_mutex_lock(&e->mu);
            if (!e->inbox_head && e->n_cancels == 0 && !e->stopping) {
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                int64_t ns = ts.tv_nsec + e->p.idle_heartbeat_ms * 1000000ll;
                ts.tv_sec += ns / 1000000000ll;
                ts.tv_nsec = ns % 1000000000ll;
                int rc = pthread_cond_timedwait(&e->cv, &e->mu, &ts);
                pthread_mutex_unlock(&e->mu);
                if (rc == ETIMEDOUT && tsr_replica_heartbeat(e->rep, err, err_len) != 0) goto down;
            } else {
                pthread_mutex_unlock(&e->mu);
            }
            continue;
        }
        tsr_batch b = {.n_tokens = n,
                       .tokens = e->b_tokens,
                       .pos = e->b_pos,
                       .seq = e->b_seq,
                       .want_logits = e->b_want,
                       .n_seqs = n_bseq,
                       .block_tables = e->b_tables,
                       .n_blocks = e->b_nblocks,
                       .order = e->b_order};
        const float *logits;
        uint64_t t0 = tsr_now_ns();
        if (e->n_cow > 0) {
            /* copy-on-write blocks of this step's admissions, on every rank, before the
             * step reads them; then the shared originals are no longer needed */
            int rc = tsr_replica_kv_copy(e->rep, e->cow_src, e->cow_dst, e->n_cow, err, err_len);
            tsr_kvblocks_release(e->kvb, e->cow_src, e->n_cow);
            e->n_cow = 0;
            if (rc != 0) goto down;
        }
        if (tsr_replica_step(e->rep, &b, &logits, err, err_len) != 0) goto down;
        double ms = (double)(tsr_now_ns() - t0) / 1e6;
        e->step_ms_mean = e->step_ms_mean == 0.0 ? ms : 0.9 * e->step_ms_mean + 0.1 * ms;
        e->step_tokens = 0;
        after_step(e, n_bseq, logits);
        auto_mode(e, n, n_bseq, ms + (double)e->t_draft_ns / 1e6);
        end_turn(e);
    }
    end_turn(e);
    return 0;
down:
    pthread_mutex_lock(&e->mu);
    e->healthy = false;
    pthread_mutex_unlock(&e->mu);
    fail_all(e, err);
    end_turn(e);
    return -1;
}
