/*
 * engine.h — the serving engine of a replica leader: continuous batching over a paged KV
 * cache, driven by one step loop, fed by any number of request threads.
 *
 * The gRPC server (coordinator/server.c) is one client of this seam: it validates and
 * tokenizes a request, submits it, and relays the events the engine emits. The engine
 * owns the scheduler (which sequences run each step, chunked prefill within a token
 * budget, preemption when KV blocks run out), the KV block manager, sampling, stop
 * conditions and detokenization; it drives the replica (worker/replica.h) one step at a
 * time, so every rank of a tp × pp replica follows along.
 *
 * Threads: tsr_engine_run() is the step loop and must run on the thread that owns MPI
 * (the process's main thread). submit / cancel / status / drain are thread-safe and never
 * block on a step. Events are delivered on the step-loop thread through the request's
 * callback, which must not block (copy, queue, return).
 */
#ifndef TSR_ENGINE_H
#define TSR_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "coordinator/drafter.h"
#include "coordinator/generate.h"
#include "coordinator/sampler.h"
#include "worker/replica.h"

#define TSR_ENGINE_OK          0
#define TSR_ENGINE_EINVAL      -1 /* bad parameters (message names the field) */
#define TSR_ENGINE_EQUEUE_FULL -2 /* the waiting queue is at --max-queue */
#define TSR_ENGINE_EDRAINING   -3 /* draining or shutting down: no new requests */
#define TSR_ENGINE_EDOWN       -4 /* the data plane failed: the replica cannot step */
#define TSR_ENGINE_ENOMEM      -5

/* Per-request caps (EINVAL beyond): stop token ids are checked for every generated token,
 * stop strings against every piece of text. */
#define TSR_ENGINE_MAX_STOP_IDS 1024
#define TSR_ENGINE_MAX_STOPS    64

typedef enum {
    TSR_FINISH_CANCELLED = 3, /* extends tsr_finish_reason: client cancel / deadline */
    TSR_FINISH_ERROR = 4,     /* the replica failed mid-request */
} tsr_finish_reason_ext;

typedef struct {
    int32_t id;
    float logprob;
} tsr_logprob;

typedef enum { TSR_EV_TOKENS = 1, TSR_EV_FINISH = 2 } tsr_event_kind;

/* One event of a request. Pointers are valid during the callback only. */
typedef struct {
    tsr_event_kind kind;
    uint64_t request_id;
    /* TOKENS: newly generated ids and the text they completed (whole UTF-8 characters,
     * stop strings withheld). The text may be empty while bytes are held back. */
    const int32_t *ids;
    size_t n_ids;
    const char *text;
    size_t text_len;
    /* Per id (when the request asked for logprobs): the chosen token's logprob and the
     * top-n alternatives (n_top entries per id, row-major). */
    const float *chosen_logprobs;
    const tsr_logprob *top_logprobs;
    int32_t n_top;
    /* FINISH */
    int finish_reason; /* tsr_finish_reason or tsr_finish_reason_ext */
    const char *error; /* TSR_FINISH_ERROR: what failed */
    int32_t n_prompt_tokens;
    int32_t n_completion_tokens;
    uint64_t t_queue_ns;       /* submit → first scheduled */
    uint64_t t_first_token_ns; /* submit → first token */
    uint64_t t_decode_ns;      /* first token → finish */
    int32_t n_preempted;       /* times this request was preempted and recomputed */
    int32_t spec_drafted;      /* draft tokens proposed for this request */
    int32_t spec_accepted;     /* of which the target accepted */
    int32_t n_steps;           /* target steps that produced tokens for this request: with
                                  speculation, n_completion_tokens / n_steps is the mean
                                  accepted length (tokens per target step) */
} tsr_event;

typedef void (*tsr_event_fn)(void *ud, const tsr_event *ev);

typedef struct {
    const int32_t *prompt_ids; /* copied by submit */
    size_t n_prompt;
    tsr_gen_params gen;  /* max_tokens, sampling, stop strings (copied), ... */
    int32_t logprobs;    /* 0: none; n > 0: top-n per token (<= 20) */
    int64_t deadline_ns; /* CLOCK_MONOTONIC absolute; 0 = none */
    int32_t speculation; /* -1: the server's default; 0: off; 1: auto (when the
                            engine has a drafter; not with logprobs) */
    tsr_event_fn on_event;
    void *ud;
} tsr_engine_request;

typedef struct {
    int32_t max_batch_tokens;  /* token budget of one step (default 256) */
    int32_t max_seqs;          /* sequences running at once (default 64) */
    int32_t max_queue;         /* waiting requests before RESOURCE_EXHAUSTED (default 256) */
    int32_t n_kv_blocks;       /* KV pool size in blocks (from --kv-memory) */
    int64_t idle_heartbeat_ms; /* leader → followers keep-alive when idle (default 1000) */
    /* Speculative decoding (NULL drafter: off). Borrowed; must outlive the engine. */
    tsr_drafter *drafter;
    int32_t spec_k;         /* cap on draft tokens per step (default 4) */
    int32_t spec_max_batch; /* speculate only while at most this many sequences decode
                               (default 4): beyond, the batch already fills the step and
                               verification would cost more than it saves */
    bool spec_default_on;   /* requests with speculation -1 speculate (default true) */
    bool spec_no_probe;     /* false (default): auto mode measures the time per generated
                               token of decode steps with and without drafts and keeps the
                               faster (re-probing the other every 40 steps); true: always
                               draft when allowed (tests of the verification itself) */
} tsr_engine_params;

typedef struct {
    int32_t n_running, n_waiting;
    int32_t kv_blocks_used, kv_blocks_free, kv_blocks_total;
    int32_t kv_blocks_needed; /* what the running sequences' tokens need: used <= needed
                                 always (more would be a leak, e.g. of rolled-back drafts) */
    int32_t kv_block_tokens;
    uint64_t n_preemptions;
    uint64_t n_requests_done;
    uint64_t n_tokens_generated;
    double tokens_per_s; /* generated tokens per second over the last ~5 s */
    bool draining;
    bool healthy;        /* the data plane completes steps */
    double step_ms_mean; /* leader step time, recent mean */
    int32_t n_ranks;
    /* Per rank (refreshed every ~2 s; n_rank_stats entries, at most 64). */
    int32_t n_rank_stats;
    tsr_rank_stats rank_stats[64];
    uint64_t spec_drafted;  /* draft tokens proposed, all requests */
    uint64_t spec_accepted; /* of which accepted */
    double spec_acceptance; /* accepted / drafted (0 when none) */
} tsr_engine_status;

typedef struct tsr_engine tsr_engine;

/* The replica must have been opened with a paged context (see tsr_replica_open_paged). */
int tsr_engine_new(tsr_replica *rep, const tsr_engine_params *p, tsr_engine **out, char *err,
                   size_t err_len);
void tsr_engine_free(tsr_engine *e);

/* Thread-safe. Returns TSR_ENGINE_OK and the request id, or a negative status with err:
 * EINVAL (prompt empty or longer than the context, ids out of range, more than
 * TSR_ENGINE_MAX_STOP_IDS stop ids or TSR_ENGINE_MAX_STOPS stop strings, bad sampling
 * parameters — naming the field), EQUEUE_FULL, EDRAINING, EDOWN, ENOMEM. max_tokens
 * (>= 1) may exceed what the context leaves: generation then ends when the context is
 * full, with finish reason length. On success exactly one
 * FINISH event will follow (possibly after TOKENS events). */
int tsr_engine_submit(tsr_engine *e, const tsr_engine_request *rq, uint64_t *id, char *err,
                      size_t err_len);

/* Thread-safe: cancel a request (client gone, deadline). Its KV blocks are freed at the
 * start of the next step and a FINISH event with TSR_FINISH_CANCELLED follows. Unknown or
 * finished ids are ignored. */
void tsr_engine_cancel(tsr_engine *e, uint64_t id);

/* Thread-safe: stop accepting requests; running and queued ones finish. */
void tsr_engine_drain(tsr_engine *e);

/* Thread-safe: end the step loop (after draining, or at once with cancel_all). */
void tsr_engine_stop(tsr_engine *e, bool cancel_all);

void tsr_engine_get_status(tsr_engine *e, tsr_engine_status *st);

/* The step loop: runs until tsr_engine_stop. Returns 0, or < 0 when the replica failed
 * (every open request then gets a FINISH with TSR_FINISH_ERROR). */
int tsr_engine_run(tsr_engine *e, char *err, size_t err_len);

#endif
