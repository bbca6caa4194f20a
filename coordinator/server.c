/*
 * server.c — the gRPC server of a replica leader (see server.h for the contract).
 *
 * gRPC core C API, one completion queue (CQ) served by one thread, protobuf-c messages.
 *
 * Per call: the CQ thread starts RECV_CLOSE_ON_SERVER (completes when the call is over:
 * our status went out, or the client cancelled / its deadline passed / it vanished) and
 * RECV_MESSAGE as soon as the call arrives. When the request message is in, unary methods
 * are answered at once with one {SEND_INITIAL_METADATA, SEND_MESSAGE, SEND_STATUS} batch;
 * Generate is validated, tokenized and submitted to the engine; Health.Watch sends the
 * current status and stays open.
 *
 * Generate output: the engine's callback (engine thread) appends token ids, text and
 * logprobs to the call's pending output and queues the call on the pump; the pump thread
 * (or the CQ thread, when the previous send completes) turns everything pending into ONE
 * GenerateResponse and starts its send. A step's TOKENS events queue quietly and the
 * engine's step hook (tsr_engine_add_step_hook) wakes the pump once after the step, so a
 * step of 16 sequences costs one pump wake, its sends started back to back, not 16. At most one
 * send batch is in flight per call (the gRPC core refuses a second SEND_MESSAGE), so tokens
 * produced meanwhile coalesce into the next message. The FINISH event's message carries the status
 * in the same batch.
 *
 * Locks: server.mu -> call.mu -> pump_mu (always in this order). The engine is never called
 * with a call lock held (its callback takes call.mu).
 *
 * Call lifetime: a call counts its holds (under call.mu), one per thing that will still
 * come back to it: the RECV_CLOSE batch, the RECV_MESSAGE batch, a send batch, the engine
 * request (until its FINISH), a place on the pump queue, and the handler running on it.
 * Each completion (in whatever order the CQ, the engine and the pump deliver them) does its
 * work and ends in call_put_unlock, which drops its hold and frees the call when that was
 * the last: a call is freed exactly once, by whichever completion comes last, and never
 * before RECV_CLOSE (the close hold), so a call that is over cannot be left behind.
 *
 * Output bounds (server.h): every change to a call's pending output or message in flight
 * goes through account(), which keeps the call's n_bytes_held and the server's total. The
 * engine callback flags a call over its own bound (the pump cancels it); the pump, when the
 * total is over its bound, cancels the calls holding the most; the CQ thread's tick cancels
 * calls whose send has waited longer than the slow-reader deadline. A cancelled call drops
 * its pending output at once; its message in flight is freed when gRPC fails the send.
 *
 * Shutdown (STACK.md §3 order, ASan clean): grpc_server_shutdown_and_notify; let open
 * Generate streams flush for the grace period; grpc_server_cancel_all_calls; drain the CQ
 * until the shutdown tag and every call are back; grpc_server_destroy; CQ shutdown and
 * drain; grpc_completion_queue_destroy; grpc_shutdown.
 */
#include "coordinator/server.h"
#include "coordinator/evbuf.h"
#include "coordinator/grpcutil.h"
#include "coordinator/tls.h"
#include "coordinator/cli.h"
#include "coordinator/pbcheck.h"
#include "kernels/util.h"

#include "health.pb-c.h"
#include "tessera.pb-c.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#define TICK_MS          200  /* CQ wake-up: health refresh, shutdown progress */
#define HARD_EXTRA_MS    5000 /* after the grace period, how long calls may still linger */
#define MAX_STOP_STRINGS TSR_ENGINE_MAX_STOPS
#define MAX_STOP_IDS     TSR_ENGINE_MAX_STOP_IDS
#define MAX_STOP_BYTES   1024
#define MAX_REQUEST_ID   256
#define MAX_LOGPROBS     20
/* Tokenize runs on the CQ thread: 64 KiB take ~15 ms (stories260K, this machine's 2 cores),
 * 1 MiB took ~440 ms, during which no other call moved. */
#define MAX_TOKENIZE_BYTES 65536
#define DEFAULT_MAX_TOKENS 16

typedef enum {
    M_UNKNOWN = 0,
    M_GENERATE,
    M_TOKENIZE,
    M_MODEL_INFO,
    M_STATUS,
    M_DRAIN,
    M_HEALTH_CHECK,
    M_HEALTH_WATCH,
} method_id;

static const struct {
    const char *path;
    method_id id;
} k_methods[] = {
    {"/tessera.v1.Inference/Generate", M_GENERATE},
    {"/tessera.v1.Inference/Tokenize", M_TOKENIZE},
    {"/tessera.v1.Inference/ModelInfo", M_MODEL_INFO},
    {"/tessera.v1.Admin/Status", M_STATUS},
    {"/tessera.v1.Admin/Drain", M_DRAIN},
    {"/grpc.health.v1.Health/Check", M_HEALTH_CHECK},
    {"/grpc.health.v1.Health/Watch", M_HEALTH_WATCH},
};

/* Health service names this server answers for. */
static const char *const k_health_services[] = {"", "tessera.v1.Inference", "tessera.v1.Admin",
                                                "grpc.health.v1.Health"};

typedef enum { T_NEW_CALL = 1, T_SHUTDOWN, T_CLOSE, T_RECV, T_SEND } tag_kind;

/* Why the server cancelled a call that holds too much unread output (0: it did not). */
enum { KILL_NONE = 0, KILL_CALL_BYTES, KILL_TOTAL_BYTES, KILL_SLOW_READER };

struct srv_call;
typedef struct {
    tag_kind kind;
    struct srv_call *c;
} tag;

typedef struct srv_call {
    tsr_server *s;
    tag t_close, t_recv, t_send;
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array md;
    grpc_byte_buffer *recv_bb;
    int cancelled; /* written by RECV_CLOSE_ON_SERVER */
    method_id m;
    struct srv_call *prev, *next; /* server's list (under server.mu) */
    struct srv_call *pump_next;   /* pump queue (under pump_mu) */

    pthread_mutex_t mu;
    /* --- under mu --- */
    int32_t holds; /* pending completions (see the file-top comment); 0: freed */
    bool recv_pending, send_pending, in_pump;
    bool closed;       /* RECV_CLOSE_ON_SERVER completed: nothing more can be sent */
    bool done_sending; /* the status went out (or the call is broken): send nothing more */
    bool md_sent;
    bool engine_active;  /* submitted, FINISH not seen yet */
    bool cancel_sent;    /* tsr_engine_cancel issued */
    uint64_t req_id;     /* the engine's id */
    int64_t deadline_ns; /* CLOCK_MONOTONIC, 0 none */
    char *request_id;    /* echoed in every GenerateResponse */
    grpc_slice status_details;
    bool has_status_details;
    /* pending Generate output (out.n_top: logprobs requested, top-n; < 0: none) */
    tsr_evbuf out;
    bool finished;
    int finish_reason;
    char *finish_error;
    int32_t n_prompt_tokens, n_completion_tokens, n_preempted;
    int32_t spec_drafted, spec_accepted;
    uint64_t t_queue_ns, t_first_token_ns, t_decode_ns;
    /* output held for the client (account()) */
    int64_t n_bytes_held;     /* pending output + message in flight, in the server's total */
    int64_t n_bytes_inflight; /* the message being sent */
    int64_t t_send_ns;        /* when that send started (CLOCK_MONOTONIC) */
    int kill;                 /* KILL_*: the server is cancelling the call */
    bool kill_sent;           /* grpc_call_cancel_with_status done */
    /* Health.Watch */
    int health_want, health_sent; /* HealthCheckResponse.ServingStatus; -1 none */
    bool health_known_service;
} srv_call;

struct tsr_server {
    grpc_server *srv;
    grpc_completion_queue *cq;
    tsr_engine *engine;
    const tsr_vocab *vocab;
    tsr_auth *auth;
    tsr_metrics *metrics;
    tsr_server_model_info info;
    size_t max_piece; /* longest token text in bytes: a prompt longer than n_ctx of them
                         cannot fit, whatever its tokenization (cheap pre-check) */
    char *arch, *name;
    char *model; /* the model name requests route by (GenerateRequest.model) */
    tag t_new, t_shutdown;
    srv_call *pending_new;  /* the call object request_call fills (CQ thread only) */
    bool new_call_armed;    /* CQ thread only */
    bool shutdown_tag_seen; /* CQ thread only */
    bool cancel_all_done;   /* CQ thread only */
    pthread_t cq_thread, pump_thread;
    uint64_t t_start_ns;
    atomic_uint_fast64_t next_req;
    atomic_bool stopping;    /* shutting down or not serving (readable under any lock) */
    int64_t last_refresh_ns; /* CQ thread only */
    int64_t max_total_bytes, max_call_bytes, slow_reader_ns; /* output bounds (server.h) */
    atomic_int_fast64_t n_bytes_buffered;                    /* sum of the calls' n_bytes_held */

    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* --- under mu --- */
    srv_call *calls;
    int32_t n_calls, n_generate_open;
    bool shutting_down, not_serving, cq_done, cq_timed_out;
    bool shutdown_called; /* grpc_server_shutdown_and_notify done: no new calls */
    int64_t grace_deadline_ns, hard_deadline_ns;
    int last_health;

    pthread_mutex_t pump_mu;
    pthread_cond_t pump_cv;
    srv_call *pump_head, *pump_tail;
    bool pump_stop;
    /* under pump_mu: the engine calls pump_step_hook after each step, so a step's TOKENS
     * events queue their calls quietly and the pump wakes once per step (not per token) */
    bool step_hooked;
};

/* ---- small helpers ---- */

static uint64_t random_seed(tsr_server *s)
{
    uint64_t x = 0;
    if (getrandom(&x, sizeof x, GRND_NONBLOCK) != (ssize_t)sizeof x)
        x = (uint64_t)(int64_t)tsr_now_ns() ^
            (atomic_fetch_add(&s->next_req, 0) * 0x9E3779B97F4A7C15ull);
    return x;
}

/* ---- call lifetime ---- */

static srv_call *call_new(tsr_server *s)
{
    srv_call *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    if (pthread_mutex_init(&c->mu, NULL) != 0) {
        free(c);
        return NULL;
    }
    c->s = s;
    c->t_close = (tag){T_CLOSE, c};
    c->t_recv = (tag){T_RECV, c};
    c->t_send = (tag){T_SEND, c};
    grpc_call_details_init(&c->details);
    grpc_metadata_array_init(&c->md);
    tsr_evbuf_init(&c->out, -1);
    c->health_want = c->health_sent = -1;
    return c;
}

static void call_destroy(srv_call *c)
{
    if (c->call) grpc_call_unref(c->call);
    if (c->recv_bb) grpc_byte_buffer_destroy(c->recv_bb);
    if (c->has_status_details) grpc_slice_unref(c->status_details);
    grpc_call_details_destroy(&c->details);
    grpc_metadata_array_destroy(&c->md);
    free(c->request_id);
    tsr_evbuf_free(&c->out);
    free(c->finish_error);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* Unlink and free (no call lock held; the caller dropped the last hold, so nothing else
 * refers to the call: no batch, no engine request, not queued, no handler). */
static void call_release(srv_call *c)
{
    tsr_server *s = c->s;
    pthread_mutex_lock(&s->mu);
    if (c->prev)
        c->prev->next = c->next;
    else
        s->calls = c->next;
    if (c->next) c->next->prev = c->prev;
    s->n_calls--;
    if (c->m == M_GENERATE) s->n_generate_open--;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    atomic_fetch_sub(&s->n_bytes_buffered, c->n_bytes_held);
    call_destroy(c);
}

/* Under c->mu: take one hold (a batch started, the engine request submitted, ...). */
static void call_hold(srv_call *c)
{
    c->holds++;
}

/* Under c->mu: drop one hold and unlock; free the call when that was the last hold. The
 * caller must not touch c afterwards. Every completion path of a call ends here. */
static void call_put_unlock(srv_call *c)
{
    bool last = --c->holds == 0;
    pthread_mutex_unlock(&c->mu);
    if (last) call_release(c);
}

/* ---- output bounds ---- */

/* Under c->mu: bytes of pending output (what the arrays hold for the next message). */
static int64_t pending_bytes(const srv_call *c)
{
    return tsr_evbuf_bytes(&c->out);
}

/* Under c->mu: bring the call's share of the server's total up to date. */
static void account(srv_call *c)
{
    int64_t held = pending_bytes(c) + c->n_bytes_inflight;
    int64_t d = held - c->n_bytes_held;
    if (d == 0) return;
    c->n_bytes_held = held;
    atomic_fetch_add(&c->s->n_bytes_buffered, d);
}

/* Under c->mu: drop the pending output and free its arrays (nothing will send it). */
static void drop_pending(srv_call *c)
{
    tsr_evbuf_free(&c->out);
    account(c);
}

/* Under c->mu, c->kill set: cancel the call with a status naming the limit. RECV_CLOSE then
 * fires (on_close cancels the engine request: its KV blocks are freed) and the send in
 * flight fails (its message is freed). */
static void kill_now(srv_call *c)
{
    if (c->kill_sent || c->closed) return;
    tsr_server *s = c->s;
    c->kill_sent = true;
    c->done_sending = true;
    int64_t held = c->n_bytes_held;
    drop_pending(c);
    char msg[400];
    switch (c->kill) {
    case KILL_CALL_BYTES:
        snprintf(msg, sizeof msg,
                 "the client is not reading this stream: its unread output passed the bound of "
                 "%lld bytes per call (--max-call-buffered-bytes); read the stream as it comes "
                 "or ask for fewer tokens or logprobs",
                 (long long)s->max_call_bytes);
        break;
    case KILL_TOTAL_BYTES:
        snprintf(msg, sizeof msg,
                 "the server's output buffers are full (--max-buffered-bytes %lld) and this "
                 "stream held the most unread output (%lld bytes); read streams as they come",
                 (long long)s->max_total_bytes, (long long)held);
        break;
    default:
        snprintf(msg, sizeof msg,
                 "the client did not read this stream's output for %lld ms "
                 "(--slow-reader-timeout): cancelled, its resources are freed",
                 (long long)(s->slow_reader_ns / 1000000));
        break;
    }
    grpc_call_cancel_with_status(c->call, GRPC_STATUS_RESOURCE_EXHAUSTED, msg, NULL);
}

/* No lock held: while all calls together hold more than the total bound, cancel the one
 * holding the most (calls already being cancelled do not count: their memory is on its
 * way out). At most 16 per pass; the next event or tick continues. */
static void enforce_total(tsr_server *s)
{
    for (int pass = 0; pass < 16; pass++) {
        if (atomic_load(&s->n_bytes_buffered) <= s->max_total_bytes) return;
        int64_t live = 0, big_n = 0;
        srv_call *big = NULL;
        pthread_mutex_lock(&s->mu);
        for (srv_call *c = s->calls; c; c = c->next) {
            pthread_mutex_lock(&c->mu);
            if (!c->kill && !c->closed) {
                live += c->n_bytes_held;
                if (c->n_bytes_held > big_n) {
                    big_n = c->n_bytes_held;
                    big = c;
                }
            }
            pthread_mutex_unlock(&c->mu);
        }
        bool done = live <= s->max_total_bytes || !big;
        if (!done) {
            pthread_mutex_lock(&big->mu);
            if (!big->kill && !big->closed) {
                big->kill = KILL_TOTAL_BYTES;
                kill_now(big);
            }
            pthread_mutex_unlock(&big->mu);
        }
        pthread_mutex_unlock(&s->mu);
        if (done) return;
    }
}

/* CQ thread tick: cancel calls whose send has waited for the client too long. */
static void sweep_slow_readers(tsr_server *s)
{
    int64_t now = (int64_t)tsr_now_ns();
    pthread_mutex_lock(&s->mu);
    for (srv_call *c = s->calls; c; c = c->next) {
        pthread_mutex_lock(&c->mu);
        if (!c->kill && !c->closed && c->send_pending && now - c->t_send_ns > s->slow_reader_ns) {
            c->kill = KILL_SLOW_READER;
            kill_now(c);
        }
        pthread_mutex_unlock(&c->mu);
    }
    pthread_mutex_unlock(&s->mu);
    enforce_total(s);
}

/* ---- sending ---- */

/*
 * Under c->mu, no send in flight: start one batch with the initial metadata (first time),
 * `msg` (may be NULL; destroyed here) and, when with_status, the final status. Any
 * start_batch error is fatal for the call: it is cancelled (RECV_CLOSE then fires).
 */
static void start_send(srv_call *c, grpc_byte_buffer *msg, bool with_status, grpc_status_code code,
                       const char *details)
{
    grpc_op ops[3];
    size_t n = 0;
    memset(ops, 0, sizeof ops);
    if (!c->md_sent) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        ops[n].data.send_initial_metadata.count = 0;
        n++;
    }
    if (msg) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = msg;
        n++;
    }
    if (with_status) {
        if (c->has_status_details) grpc_slice_unref(c->status_details);
        c->status_details = grpc_slice_from_copied_string(details ? details : "");
        c->has_status_details = true;
        ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
        ops[n].data.send_status_from_server.trailing_metadata_count = 0;
        ops[n].data.send_status_from_server.status = code;
        ops[n].data.send_status_from_server.status_details = &c->status_details;
        n++;
    }
    if (n == 0) {
        account(c);
        return;
    }
    int64_t n_bytes = msg ? (int64_t)grpc_byte_buffer_length(msg) : 0;
    grpc_call_error e = grpc_call_start_batch(c->call, ops, n, &c->t_send, NULL);
    if (msg) grpc_byte_buffer_destroy(msg);
    if (e != GRPC_CALL_OK) {
        fprintf(stderr, "tessera serve: start_batch failed (%d) on %s; cancelling the call\n",
                (int)e, c->m == M_GENERATE ? "Generate" : "a call");
        c->done_sending = true;
        grpc_call_cancel(c->call, NULL);
        account(c);
        return;
    }
    c->n_bytes_inflight = n_bytes; /* held by gRPC until the client's window takes it */
    c->t_send_ns = (int64_t)tsr_now_ns();
    account(c);
    c->md_sent = true;
    c->send_pending = true;
    call_hold(c); /* dropped by on_send_done */
    if (with_status) c->done_sending = true;
}

static Tessera__V1__FinishReason finish_to_proto(int r)
{
    switch (r) {
    case TSR_FINISH_LENGTH:
        return TESSERA__V1__FINISH_REASON__FINISH_REASON_LENGTH;
    case TSR_FINISH_STOP:
        return TESSERA__V1__FINISH_REASON__FINISH_REASON_STOP;
    case TSR_FINISH_EOS:
        return TESSERA__V1__FINISH_REASON__FINISH_REASON_EOS;
    case TSR_FINISH_CANCELLED:
        return TESSERA__V1__FINISH_REASON__FINISH_REASON_CANCELLED;
    }
    return TESSERA__V1__FINISH_REASON__FINISH_REASON_UNSPECIFIED;
}

/* Bytes of token id's text (special tokens rendered, as the HTTP front door names them);
 * 0 for an id outside the vocabulary (an alternative the engine did not fill: -1). */
static size_t piece_len(const tsr_vocab *v, int32_t id)
{
    int32_t n = tsr_vocab_token_to_piece(v, id, NULL, 0, true);
    return n > 0 ? (size_t)n : 0;
}

/* Token id's text into buf at *off (piece_len bytes were reserved), as a protobuf bytes. */
static ProtobufCBinaryData piece_put(const tsr_vocab *v, int32_t id, char *buf, size_t *off)
{
    size_t n = piece_len(v, id);
    ProtobufCBinaryData d = {n, (uint8_t *)buf + *off};
    if (n) tsr_vocab_token_to_piece(v, id, buf + *off, n, true);
    *off += n;
    return d;
}

/* Under c->mu: everything pending of a Generate call as one GenerateResponse (NULL on OOM).
 * Clears the pending ids / text / logprobs. */
static grpc_byte_buffer *build_generate_response(srv_call *c, bool last)
{
    Tessera__V1__GenerateResponse r = TESSERA__V1__GENERATE_RESPONSE__INIT;
    Tessera__V1__Usage usage = TESSERA__V1__USAGE__INIT;
    Tessera__V1__Timings tim = TESSERA__V1__TIMINGS__INIT;
    Tessera__V1__Logprobs *lps = NULL, **lpp = NULL;
    Tessera__V1__TokenLogprob *tops = NULL, **topp = NULL;
    char *pieces = NULL;
    grpc_byte_buffer *bb = NULL;
    r.n_token_ids = c->out.n_ids;
    r.token_ids = c->out.ids;
    r.text = c->out.text ? c->out.text : (char *)"";
    if (c->out.text) c->out.text[c->out.text_len] = '\0';
    r.request_id = c->request_id;
    if (c->out.n_top >= 0 && c->out.n_ids > 0) {
        size_t n = c->out.n_ids, k = (size_t)c->out.n_top;
        lps = calloc(n, sizeof *lps);
        lpp = calloc(n, sizeof *lpp);
        tops = calloc(n * k + 1, sizeof *tops);
        topp = calloc(n * k + 1, sizeof *topp);
        if (!lps || !lpp || !tops || !topp) goto done;
        /* The tokens' text (chosen and alternatives) so a client without the vocabulary —
         * the coordinator's HTTP front door — can name them: one buffer for the message. */
        const tsr_vocab *v = c->s->vocab;
        size_t n_bytes = 1;
        for (size_t i = 0; i < n; i++) {
            n_bytes += piece_len(v, c->out.ids[i]);
            for (size_t j = 0; j < k; j++) n_bytes += piece_len(v, c->out.lp_top[i * k + j].id);
        }
        pieces = malloc(n_bytes);
        if (!pieces) goto done;
        size_t off = 0;
        for (size_t i = 0; i < n; i++) {
            Tessera__V1__Logprobs init = TESSERA__V1__LOGPROBS__INIT;
            lps[i] = init;
            lps[i].has_logprob = true;
            lps[i].logprob = c->out.lp_chosen[i];
            lps[i].n_top = k;
            lps[i].top = topp + i * k;
            lps[i].has_token = true;
            lps[i].token = piece_put(v, c->out.ids[i], pieces, &off);
            for (size_t j = 0; j < k; j++) {
                Tessera__V1__TokenLogprob ti = TESSERA__V1__TOKEN_LOGPROB__INIT;
                tops[i * k + j] = ti;
                tops[i * k + j].has_id = tops[i * k + j].has_logprob = true;
                tops[i * k + j].id = c->out.lp_top[i * k + j].id;
                tops[i * k + j].logprob = c->out.lp_top[i * k + j].logprob;
                tops[i * k + j].has_token = true;
                tops[i * k + j].token = piece_put(v, tops[i * k + j].id, pieces, &off);
                topp[i * k + j] = &tops[i * k + j];
            }
            lpp[i] = &lps[i];
        }
        r.n_logprobs = n;
        r.logprobs = lpp;
    }
    if (last) {
        r.has_finish_reason = true;
        r.finish_reason = finish_to_proto(c->finish_reason);
        usage.has_prompt_tokens = usage.has_completion_tokens = usage.has_preemptions = true;
        usage.prompt_tokens = c->n_prompt_tokens;
        usage.completion_tokens = c->n_completion_tokens;
        usage.preemptions = c->n_preempted;
        usage.has_spec_drafted = usage.has_spec_accepted = true;
        usage.spec_drafted = c->spec_drafted;
        usage.spec_accepted = c->spec_accepted;
        r.usage = &usage;
        tim.has_queue_ms = tim.has_time_to_first_token_ms = tim.has_decode_ms = true;
        tim.queue_ms = (double)c->t_queue_ns / 1e6;
        tim.time_to_first_token_ms = (double)c->t_first_token_ns / 1e6;
        tim.decode_ms = (double)c->t_decode_ns / 1e6;
        r.timings = &tim;
    }
    bb = tsr_grpc_pack(&r.base);
    tsr_evbuf_clear(&c->out);
done:
    free(lps);
    free(lpp);
    free(tops);
    free(topp);
    free(pieces);
    return bb;
}

static grpc_byte_buffer *build_health(int status)
{
    Grpc__Health__V1__HealthCheckResponse r = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    r.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)status;
    return tsr_grpc_pack(&r.base);
}

/*
 * Under c->mu: send what is due, if nothing is in flight. Generate: the pending output as
 * one message, with the final status when the engine finished. Watch: the latest health.
 */
static void advance(srv_call *c)
{
    if (c->kill) {
        kill_now(c);
        return;
    }
    if (c->send_pending || c->done_sending || c->closed) return;
    if (c->m == M_GENERATE) {
        if (!c->finished && c->out.n_ids == 0 && c->out.text_len == 0) return;
        if (c->finished && c->out.oom) {
            start_send(c, NULL, true, GRPC_STATUS_RESOURCE_EXHAUSTED,
                       "the server ran out of memory while queuing this stream's output");
            return;
        }
        if (!c->finished) {
            start_send(c, build_generate_response(c, false), false, GRPC_STATUS_OK, NULL);
            return;
        }
        char msg[512];
        grpc_status_code code = GRPC_STATUS_OK;
        msg[0] = '\0';
        bool send_last = true;
        if (c->finish_reason == TSR_FINISH_ERROR) {
            code = GRPC_STATUS_UNAVAILABLE;
            snprintf(msg, sizeof msg, "the replica failed during this request: %s",
                     c->finish_error ? c->finish_error : "data plane error");
            send_last = c->out.n_ids > 0 || c->out.text_len > 0;
        } else if (c->finish_reason == TSR_FINISH_CANCELLED) {
            bool stopping = atomic_load(&c->s->stopping);
            if (c->deadline_ns && (int64_t)tsr_now_ns() >= c->deadline_ns) {
                code = GRPC_STATUS_DEADLINE_EXCEEDED;
                snprintf(msg, sizeof msg, "deadline exceeded after %d generated tokens",
                         c->n_completion_tokens);
            } else if (stopping) {
                code = GRPC_STATUS_UNAVAILABLE;
                snprintf(msg, sizeof msg,
                         "the server is shutting down: request cancelled after %d generated "
                         "tokens; retry on another replica",
                         c->n_completion_tokens);
            }
        }
        grpc_byte_buffer *bb = NULL;
        if (send_last) {
            bb = build_generate_response(c, c->finish_reason != TSR_FINISH_ERROR);
            if (!bb) {
                start_send(c, NULL, true, GRPC_STATUS_RESOURCE_EXHAUSTED,
                           "the server ran out of memory building the last message");
                return;
            }
        }
        start_send(c, bb, true, code, msg);
    } else if (c->m == M_HEALTH_WATCH) {
        if (c->health_want < 0 || c->health_want == c->health_sent) return;
        grpc_byte_buffer *bb = build_health(c->health_want);
        if (!bb) return;
        c->health_sent = c->health_want;
        start_send(c, bb, false, GRPC_STATUS_OK, NULL);
    }
}

/* ---- pump: engine events -> sends ---- */

/* Under c->mu: queue the call for the pump thread (once). `quiet` (a step's TOKENS event):
 * leave the wake to the engine's step hook when there is one. */
static void pump_enqueue(srv_call *c, bool quiet)
{
    if (c->in_pump) return;
    c->in_pump = true;
    call_hold(c); /* dropped by the pump */
    tsr_server *s = c->s;
    pthread_mutex_lock(&s->pump_mu);
    c->pump_next = NULL;
    if (s->pump_tail)
        s->pump_tail->pump_next = c;
    else
        s->pump_head = c;
    s->pump_tail = c;
    if (!quiet || !s->step_hooked) pthread_cond_signal(&s->pump_cv);
    pthread_mutex_unlock(&s->pump_mu);
}

/* The engine's step hook (engine thread, after a step's events): one wake for the calls the
 * step's tokens queued, so the pump starts their sends back to back (gRPC then writes them
 * together) and the sender threads take the CPU once per step, not once per token. */
static void pump_step_hook(void *ud)
{
    tsr_server *s = ud;
    pthread_mutex_lock(&s->pump_mu);
    if (s->pump_head) pthread_cond_signal(&s->pump_cv);
    pthread_mutex_unlock(&s->pump_mu);
}

static void *pump_main(void *arg)
{
    tsr_server *s = arg;
    for (;;) {
        pthread_mutex_lock(&s->pump_mu);
        while (!s->pump_head && !s->pump_stop) {
            struct timespec ts = tsr_grpc_abstime_in_ms(CLOCK_REALTIME, 1000);
            pthread_cond_timedwait(&s->pump_cv, &s->pump_mu, &ts);
        }
        srv_call *c = s->pump_head;
        if (!c) { /* stop requested and nothing queued */
            pthread_mutex_unlock(&s->pump_mu);
            break;
        }
        s->pump_head = c->pump_next;
        if (!s->pump_head) s->pump_tail = NULL;
        pthread_mutex_unlock(&s->pump_mu);

        pthread_mutex_lock(&c->mu);
        c->in_pump = false;
        advance(c);
        call_put_unlock(c);
        if (atomic_load(&s->n_bytes_buffered) > s->max_total_bytes) enforce_total(s);
    }
    return NULL;
}

/* The engine's callback (engine thread): copy, queue, return. */
static void on_engine_event(void *ud, const tsr_event *ev)
{
    srv_call *c = ud;
    pthread_mutex_lock(&c->mu);
    bool finish = false;
    if (ev->kind == TSR_EV_TOKENS) {
        if (!c->closed && !c->out.oom && !c->kill && ev->n_ids + ev->text_len > 0) {
            if (tsr_evbuf_append(&c->out, ev)) {
                account(c);
                /* Over its own bound: the pump cancels it (never the engine thread). */
                if (c->n_bytes_held > c->s->max_call_bytes) c->kill = KILL_CALL_BYTES;
            }
        }
    } else if (ev->kind == TSR_EV_FINISH && c->engine_active) {
        finish = true;
        c->finished = true;
        c->engine_active = false;
        c->finish_reason = ev->finish_reason;
        if (ev->error && !c->finish_error) c->finish_error = strdup(ev->error);
        c->n_prompt_tokens = ev->n_prompt_tokens;
        c->n_completion_tokens = ev->n_completion_tokens;
        c->n_preempted = ev->n_preempted;
        c->spec_drafted = ev->spec_drafted;
        c->spec_accepted = ev->spec_accepted;
        c->t_queue_ns = ev->t_queue_ns;
        c->t_first_token_ns = ev->t_first_token_ns;
        c->t_decode_ns = ev->t_decode_ns;
    }
    pump_enqueue(c, !finish);
    if (finish)
        call_put_unlock(c); /* the engine's hold; the pump's keeps the call alive */
    else
        pthread_mutex_unlock(&c->mu);
}

/* ---- health ---- */

static int health_now(tsr_server *s)
{
    tsr_engine_status st;
    tsr_engine_get_status(s->engine, &st);
    pthread_mutex_lock(&s->mu);
    bool down = s->not_serving || s->shutting_down;
    pthread_mutex_unlock(&s->mu);
    if (down || st.draining || !st.healthy)
        return GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
    return GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
}

/* CQ thread: tell Watch streams when the status changed. */
static void health_refresh(tsr_server *s)
{
    int h = health_now(s);
    pthread_mutex_lock(&s->mu);
    if (h != s->last_health) {
        s->last_health = h;
        for (srv_call *c = s->calls; c; c = c->next) {
            if (c->m != M_HEALTH_WATCH) continue;
            pthread_mutex_lock(&c->mu);
            if (c->health_known_service && c->health_want >= 0) {
                c->health_want = h;
                advance(c);
            }
            pthread_mutex_unlock(&c->mu);
        }
    }
    pthread_mutex_unlock(&s->mu);
}

static bool health_service_known(const char *name)
{
    for (size_t i = 0; i < sizeof k_health_services / sizeof *k_health_services; i++)
        if (!strcmp(name, k_health_services[i])) return true;
    return false;
}

/* ---- request handlers (CQ thread) ---- */

/* A unary answer: either a message (status OK) or an error status. */
typedef struct {
    grpc_byte_buffer *msg;
    grpc_status_code code;
    char details[768];
} reply;

static void reply_err(reply *r, grpc_status_code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void reply_err(reply *r, grpc_status_code code, const char *fmt, ...)
{
    va_list ap;
    r->code = code;
    va_start(ap, fmt);
    vsnprintf(r->details, sizeof r->details, fmt, ap);
    va_end(ap);
}

static void reply_msg(reply *r, const ProtobufCMessage *m)
{
    r->msg = tsr_grpc_pack(m);
    if (!r->msg) reply_err(r, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
}

#define MALFORMED(r, what)                                                                         \
    reply_err(r, GRPC_STATUS_INVALID_ARGUMENT,                                                     \
              "malformed " what ": the request bytes are not a valid protobuf message")

/* A request naming a model (GenerateRequest.model and friends) must name this replica's:
 * false with NOT_FOUND set otherwise. An empty or absent name is this replica's. */
static bool model_matches(tsr_server *s, const char *model, reply *r)
{
    if (!model || !model[0] || !strcmp(model, s->model)) return true;
    reply_err(r, GRPC_STATUS_NOT_FOUND, "model '%s' is not served here; this replica serves '%s'",
              model, s->model);
    return false;
}

static bool chat_prompt(tsr_server *s, const Tessera__V1__GenerateRequest *q, int32_t **ids,
                        size_t *n_ids, reply *r);

static void handle_tokenize(tsr_server *s, grpc_slice in, reply *r)
{
    Tessera__V1__TokenizeRequest *q = tessera__v1__tokenize_request__unpack(
        NULL, GRPC_SLICE_LENGTH(in), GRPC_SLICE_START_PTR(in));
    if (!q) {
        MALFORMED(r, "TokenizeRequest");
        return;
    }
    if (!model_matches(s, q->model, r)) {
        tessera__v1__tokenize_request__free_unpacked(q, NULL);
        return;
    }
    if (q->n_messages > 0) {
        /* The prompt ids of a conversation, as Generate renders it (a coordinator resuming
         * a chat request after a failover needs them). */
        Tessera__V1__GenerateRequest g = TESSERA__V1__GENERATE_REQUEST__INIT;
        g.n_messages = q->n_messages;
        g.messages = q->messages;
        int32_t *cids = NULL;
        size_t cn = 0;
        if (chat_prompt(s, &g, &cids, &cn, r)) {
            Tessera__V1__TokenizeResponse a = TESSERA__V1__TOKENIZE_RESPONSE__INIT;
            a.n_ids = cn;
            a.ids = cids;
            reply_msg(r, &a.base);
        }
        free(cids);
        tessera__v1__tokenize_request__free_unpacked(q, NULL);
        return;
    }
    const char *text = q->text ? q->text : "";
    size_t n_text = strlen(text);
    if (n_text > MAX_TOKENIZE_BYTES) {
        reply_err(r, GRPC_STATUS_INVALID_ARGUMENT,
                  "text: %zu bytes; Tokenize takes at most %d bytes per call (split the text)",
                  n_text, MAX_TOKENIZE_BYTES);
        tessera__v1__tokenize_request__free_unpacked(q, NULL);
        return;
    }
    bool add_special = q->has_add_special_tokens ? q->add_special_tokens : true;
    bool parse_special = q->has_parse_special ? q->parse_special : true;
    int32_t *ids = NULL;
    size_t n = 0;
    char err[512];
    if (tsr_vocab_tokenize(s->vocab, text, n_text, add_special, parse_special, &ids, &n, err,
                           sizeof err) != 0) {
        reply_err(r, GRPC_STATUS_INVALID_ARGUMENT, "text: %s", err);
    } else {
        Tessera__V1__TokenizeResponse a = TESSERA__V1__TOKENIZE_RESPONSE__INIT;
        a.n_ids = n;
        a.ids = ids;
        reply_msg(r, &a.base);
    }
    free(ids);
    tessera__v1__tokenize_request__free_unpacked(q, NULL);
}

static void handle_model_info(tsr_server *s, grpc_slice in, reply *r)
{
    Tessera__V1__ModelInfoRequest *q = tessera__v1__model_info_request__unpack(
        NULL, GRPC_SLICE_LENGTH(in), GRPC_SLICE_START_PTR(in));
    if (!q) {
        MALFORMED(r, "ModelInfoRequest");
        return;
    }
    bool model_ok = model_matches(s, q->model, r);
    tessera__v1__model_info_request__free_unpacked(q, NULL);
    if (!model_ok) return;
    const tsr_server_model_info *i = &s->info;
    Tessera__V1__ModelInfoResponse a = TESSERA__V1__MODEL_INFO_RESPONSE__INIT;
    a.architecture = s->arch;
    a.name = s->name;
    a.model = s->model;
#define SETF(f, v)                                                                                 \
    do {                                                                                           \
        a.has_##f = true;                                                                          \
        a.f = (v);                                                                                 \
    } while (0)
    SETF(context_length, i->n_ctx);
    SETF(context_length_train, i->n_ctx_train);
    SETF(vocab_size, i->n_vocab);
    SETF(n_layer, i->n_layer);
    SETF(n_embd, i->n_embd);
    SETF(n_head, i->n_head);
    SETF(n_head_kv, i->n_head_kv);
    SETF(tp, i->tp);
    SETF(pp, i->pp);
    SETF(bos_id, tsr_vocab_bos(s->vocab));
    SETF(eos_id, tsr_vocab_eos(s->vocab));
    SETF(kv_capacity_tokens, i->kv_capacity_tokens);
    SETF(kv_block_tokens, i->kv_block_tokens);
    SETF(max_batch_tokens, i->max_batch_tokens);
    SETF(max_queue, i->max_queue);
#undef SETF
    if (i->chat) a.chat_template = (char *)tsr_chat_template_name(i->chat);
    const int32_t *eog;
    a.n_eog_ids = tsr_vocab_eog_ids(s->vocab, &eog);
    a.eog_ids = (int32_t *)eog;
    reply_msg(r, &a.base);
}

static void handle_status(tsr_server *s, grpc_slice in, reply *r)
{
    Tessera__V1__StatusRequest *q =
        tessera__v1__status_request__unpack(NULL, GRPC_SLICE_LENGTH(in), GRPC_SLICE_START_PTR(in));
    if (!q) {
        MALFORMED(r, "StatusRequest");
        return;
    }
    tessera__v1__status_request__free_unpacked(q, NULL);
    tsr_engine_status st;
    tsr_engine_get_status(s->engine, &st);
    pthread_mutex_lock(&s->mu);
    int32_t active = s->n_generate_open;
    pthread_mutex_unlock(&s->mu);
    Tessera__V1__StatusResponse a = TESSERA__V1__STATUS_RESPONSE__INIT;
#define SETF(f, v)                                                                                 \
    do {                                                                                           \
        a.has_##f = true;                                                                          \
        a.f = (v);                                                                                 \
    } while (0)
    SETF(requests_running, st.n_running);
    SETF(requests_queued, st.n_waiting);
    SETF(kv_blocks_used, st.kv_blocks_used);
    SETF(kv_blocks_free, st.kv_blocks_free);
    SETF(kv_blocks_total, st.kv_blocks_total);
    SETF(kv_block_tokens, st.kv_block_tokens);
    SETF(tokens_per_second, st.tokens_per_s);
    SETF(preemptions, st.n_preemptions);
    SETF(requests_done, st.n_requests_done);
    SETF(tokens_generated, st.n_tokens_generated);
    SETF(draining, st.draining);
    SETF(healthy, st.healthy);
    SETF(step_ms_mean, st.step_ms_mean);
    SETF(n_ranks, st.n_ranks);
    SETF(active_streams, active);
    SETF(uptime_s, (double)((int64_t)tsr_now_ns() - (int64_t)s->t_start_ns) / 1e9);
    SETF(spec_drafted, st.spec_drafted);
    SETF(spec_accepted, st.spec_accepted);
    SETF(spec_acceptance, st.spec_acceptance);
    Tessera__V1__RankStatus rs[64], *rsp[64];
    for (int32_t k = 0; k < st.n_rank_stats && k < 64; k++) {
        const tsr_rank_stats *q = &st.rank_stats[k];
        Tessera__V1__RankStatus x = TESSERA__V1__RANK_STATUS__INIT;
        double steps = q->n_steps ? (double)q->n_steps : 1.0;
        x.has_rank = x.has_stage = x.has_tp_rank = x.has_steps = true;
        x.rank = q->rank;
        x.stage = q->stage;
        x.tp_rank = q->tp_rank;
        x.steps = q->n_steps;
        x.has_compute_ms_per_step = x.has_comm_ms_per_step = x.has_bytes_sent = true;
        x.compute_ms_per_step = (double)q->t_compute_ns / 1e6 / steps;
        x.comm_ms_per_step = (double)q->t_comm_ns / 1e6 / steps;
        x.bytes_sent = q->n_bytes_sent;
        rs[k] = x;
        rsp[k] = &rs[k];
    }
    a.n_rank_status = (size_t)(st.n_rank_stats < 64 ? st.n_rank_stats : 64);
    a.rank_status = rsp;
    SETF(kv_blocks_needed, st.kv_blocks_needed);
    SETF(prefix_cache, st.prefix_cache);
    SETF(kv_blocks_cached, st.kv_blocks_cached);
    SETF(prefix_cache_lookups, st.prefix_cache_lookups);
    SETF(prefix_cache_hits, st.prefix_cache_hits);
    SETF(prefix_cache_hit_tokens, st.prefix_cache_hit_tokens);
    SETF(prefix_cache_evictions, st.prefix_cache_evictions);
    SETF(prefix_cache_copies, st.prefix_cache_copies);
#undef SETF
    reply_msg(r, &a.base);
}

static void handle_drain(tsr_server *s, grpc_slice in, reply *r)
{
    Tessera__V1__DrainRequest *q =
        tessera__v1__drain_request__unpack(NULL, GRPC_SLICE_LENGTH(in), GRPC_SLICE_START_PTR(in));
    if (!q) {
        MALFORMED(r, "DrainRequest");
        return;
    }
    tessera__v1__drain_request__free_unpacked(q, NULL);
    tsr_engine_drain(s->engine);
    health_refresh(s);
    tsr_engine_status st;
    tsr_engine_get_status(s->engine, &st);
    Tessera__V1__DrainResponse a = TESSERA__V1__DRAIN_RESPONSE__INIT;
    a.has_requests_running = a.has_requests_queued = true;
    a.requests_running = st.n_running;
    a.requests_queued = st.n_waiting;
    fprintf(stderr, "tessera serve: draining (%d running, %d queued)\n", st.n_running,
            st.n_waiting);
    reply_msg(r, &a.base);
}

static void handle_health_check(tsr_server *s, grpc_slice in, reply *r)
{
    Grpc__Health__V1__HealthCheckRequest *q = grpc__health__v1__health_check_request__unpack(
        NULL, GRPC_SLICE_LENGTH(in), GRPC_SLICE_START_PTR(in));
    if (!q) {
        MALFORMED(r, "HealthCheckRequest");
        return;
    }
    const char *svc = q->service ? q->service : "";
    if (!health_service_known(svc)) {
        reply_err(r, GRPC_STATUS_NOT_FOUND,
                  "unknown service '%.200s' (this server answers for '', tessera.v1.Inference, "
                  "tessera.v1.Admin)",
                  svc);
    } else {
        r->msg = build_health(health_now(s));
        if (!r->msg) reply_err(r, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    }
    grpc__health__v1__health_check_request__free_unpacked(q, NULL);
}

/* GenerateRequest.messages -> the prompt ids: rendered with the model's chat template and
 * tokenized with special tokens parsed. Returns false with r set. */
static bool chat_prompt(tsr_server *s, const Tessera__V1__GenerateRequest *q, int32_t **ids,
                        size_t *n_ids, reply *r)
{
    if (!s->info.chat) {
        reply_err(r, GRPC_STATUS_FAILED_PRECONDITION,
                  "messages: the model has no chat template; send prompt or prompt_ids, or "
                  "start the server with --chat-template NAME");
        return false;
    }
    tsr_chat_msg *m = calloc(q->n_messages, sizeof *m);
    if (!m) {
        reply_err(r, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        return false;
    }
    size_t total = 0;
    for (size_t i = 0; i < q->n_messages; i++) {
        const Tessera__V1__ChatMessage *cm = q->messages[i];
        m[i].role = cm->role ? cm->role : "";
        m[i].content = cm->content ? cm->content : "";
        total += strlen(m[i].content);
    }
    char err[512], *text = NULL;
    size_t len = 0;
    bool ok = false;
    if (s->info.n_ctx > 0 && total / s->max_piece > (size_t)s->info.n_ctx) {
        reply_err(r, GRPC_STATUS_INVALID_ARGUMENT,
                  "messages: %zu bytes cannot fit the context of %d tokens; shorten them", total,
                  s->info.n_ctx);
    } else if (tsr_chat_render(s->info.chat, m, q->n_messages, true, &text, &len, err,
                               sizeof err) != 0) {
        reply_err(r, GRPC_STATUS_INVALID_ARGUMENT, "messages: %s", err);
    } else if (tsr_chat_tokenize(s->vocab, text, len, ids, n_ids, err, sizeof err) != 0) {
        reply_err(r, GRPC_STATUS_INVALID_ARGUMENT, "messages: cannot tokenize: %s", err);
    } else {
        ok = true;
    }
    free(text);
    free(m);
    return ok;
}

/* Validate a GenerateRequest into an engine request. Returns false with r set. The prompt
 * ids are malloc'd into *ids (freed by the caller). */
static bool generate_params(tsr_server *s, const Tessera__V1__GenerateRequest *q,
                            tsr_engine_request *er, int32_t **ids, size_t *n_ids, reply *r)
{
    const int32_t n_vocab = tsr_vocab_n_tokens(s->vocab);
    if (!model_matches(s, q->model, r)) return false;
    if (q->has_resumed_tokens) {
        if (q->resumed_tokens < 0 || (size_t)q->resumed_tokens >= q->n_prompt_ids) {
            reply_err(r, GRPC_STATUS_INVALID_ARGUMENT,
                      "resumed_tokens must be in 0..%zu (prompt_ids minus at least one real "
                      "prompt token), got %d",
                      q->n_prompt_ids > 0 ? q->n_prompt_ids - 1 : 0, q->resumed_tokens);
            return false;
        }
        er->n_resumed = q->resumed_tokens;
    }
    bool has_text = q->prompt && q->prompt[0];
    int n_inputs = has_text + (q->n_prompt_ids > 0) + (q->n_messages > 0);
    if (n_inputs > 1) {
        reply_err(r, GRPC_STATUS_INVALID_ARGUMENT,
                  "prompt, prompt_ids and messages: set exactly one of them (%d are set)",
                  n_inputs);
        return false;
    }
    if (n_inputs == 0) {
        reply_err(r, GRPC_STATUS_INVALID_ARGUMENT,
                  "prompt: empty; set exactly one of prompt (text), prompt_ids (token ids) and "
                  "messages (a conversation)");
        return false;
    }
    if (q->n_messages > 0) {
        if (!chat_prompt(s, q, ids, n_ids, r)) return false;
    } else if (has_text) {
        size_t len = strlen(q->prompt);
        if (s->info.n_ctx > 0 && len / s->max_piece > (size_t)s->info.n_ctx) {
            reply_err(r, GRPC_STATUS_INVALID_ARGUMENT,
                      "prompt: %zu bytes cannot fit the context of %d tokens; shorten the prompt",
                      len, s->info.n_ctx);
            return false;
        }
        char err[512];
        bool add_special = q->has_add_special_tokens ? q->add_special_tokens : true;
        if (tsr_vocab_tokenize(s->vocab, q->prompt, strlen(q->prompt), add_special, true, ids,
                               n_ids, err, sizeof err) != 0) {
            reply_err(r, GRPC_STATUS_INVALID_ARGUMENT, "prompt: cannot tokenize: %s", err);
            return false;
        }
        if (*n_ids == 0) {
            reply_err(r, GRPC_STATUS_INVALID_ARGUMENT, "prompt: tokenizes to no tokens");
            return false;
        }
    } else {
        if (s->info.n_ctx > 0 && q->n_prompt_ids >= (size_t)s->info.n_ctx) {
            reply_err(r, GRPC_STATUS_INVALID_ARGUMENT,
                      "prompt_ids: %zu tokens do not fit the context of %d tokens (at least one "
                      "position must be left to generate); shorten the prompt",
                      q->n_prompt_ids, s->info.n_ctx);
            return false;
        }
        for (size_t i = 0; i < q->n_prompt_ids; i++) {
            if (q->prompt_ids[i] < 0 || q->prompt_ids[i] >= n_vocab) {
                reply_err(r, GRPC_STATUS_INVALID_ARGUMENT,
                          "prompt_ids[%zu]: token id %d is outside the vocabulary [0, %d)", i,
                          q->prompt_ids[i], n_vocab);
                return false;
            }
        }
        *ids = malloc(q->n_prompt_ids * sizeof(int32_t));
        if (!*ids) {
            reply_err(r, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
            return false;
        }
        memcpy(*ids, q->prompt_ids, q->n_prompt_ids * sizeof(int32_t));
        *n_ids = q->n_prompt_ids;
    }
    if (s->info.n_ctx > 0 && *n_ids >= (size_t)s->info.n_ctx) {
        reply_err(r, GRPC_STATUS_INVALID_ARGUMENT,
                  "prompt: %zu tokens do not fit the context of %d tokens (at least one "
                  "position must be left to generate); shorten the prompt",
                  *n_ids, s->info.n_ctx);
        return false;
    }
    er->prompt_ids = *ids;
    er->n_prompt = *n_ids;

    tsr_gen_params *g = &er->gen;
    g->max_tokens = q->has_max_tokens ? q->max_tokens : DEFAULT_MAX_TOKENS;
    if (g->max_tokens < 1) {
        reply_err(r, GRPC_STATUS_INVALID_ARGUMENT, "max_tokens must be >= 1, got %d",
                  g->max_tokens);
        return false;
    }
    tsr_sampling_params *sp = &g->sampling;
    tsr_sampling_params_default(sp);
    if (q->has_temperature) sp->temperature = q->temperature;
    if (q->has_top_p) sp->top_p = q->top_p;
    if (q->has_top_k) {
        if (q->top_k < -1) {
            reply_err(r, GRPC_STATUS_INVALID_ARGUMENT,
                      "top_k must be -1 or 0 (off) or >= 1, got %d", q->top_k);
            return false;
        }
        sp->top_k = q->top_k < 0 ? 0 : q->top_k;
    }
    if (q->has_min_p) sp->min_p = q->min_p;
    if (q->has_repetition_penalty) sp->repetition_penalty = q->repetition_penalty;
    if (q->has_presence_penalty) sp->presence_penalty = q->presence_penalty;
    if (q->has_frequency_penalty) sp->frequency_penalty = q->frequency_penalty;
    sp->seed = q->has_seed ? q->seed : random_seed(s);
    char err[512];
    if (tsr_sampling_params_validate(sp, err, sizeof err) != 0) {
        reply_err(r, GRPC_STATUS_INVALID_ARGUMENT, "%s", err);
        return false;
    }
    if (q->n_stop > MAX_STOP_STRINGS) {
        reply_err(r, GRPC_STATUS_INVALID_ARGUMENT, "stop: at most %d strings, got %zu",
                  MAX_STOP_STRINGS, q->n_stop);
        return false;
    }
    for (size_t i = 0; i < q->n_stop; i++) {
        size_t len = q->stop[i] ? strlen(q->stop[i]) : 0;
        if (len == 0 || len > MAX_STOP_BYTES) {
            reply_err(r, GRPC_STATUS_INVALID_ARGUMENT,
                      "stop[%zu]: a stop string must be 1..%d bytes, got %zu", i, MAX_STOP_BYTES,
                      len);
            return false;
        }
    }
    g->stop = (const char *const *)q->stop;
    g->n_stop = q->n_stop;
    if (q->n_stop_token_ids > MAX_STOP_IDS) {
        reply_err(r, GRPC_STATUS_INVALID_ARGUMENT, "stop_token_ids: at most %d ids, got %zu",
                  MAX_STOP_IDS, q->n_stop_token_ids);
        return false;
    }
    for (size_t i = 0; i < q->n_stop_token_ids; i++) {
        if (q->stop_token_ids[i] < 0 || q->stop_token_ids[i] >= n_vocab) {
            reply_err(r, GRPC_STATUS_INVALID_ARGUMENT,
                      "stop_token_ids[%zu]: token id %d is outside the vocabulary [0, %d)", i,
                      q->stop_token_ids[i], n_vocab);
            return false;
        }
    }
    g->stop_ids = q->stop_token_ids;
    g->n_stop_ids = q->n_stop_token_ids;
    g->ignore_eos = q->has_ignore_eos && q->ignore_eos;
    er->logprobs = q->has_logprobs ? q->logprobs : 0;
    er->speculation = -1;
    if (q->has_speculation) {
        if (q->speculation == TESSERA__V1__SPECULATION__SPECULATION_OFF)
            er->speculation = 0;
        else if (q->speculation == TESSERA__V1__SPECULATION__SPECULATION_AUTO)
            er->speculation = 1;
        else if (q->speculation != TESSERA__V1__SPECULATION__SPECULATION_DEFAULT) {
            reply_err(r, GRPC_STATUS_INVALID_ARGUMENT,
                      "speculation: unknown value %d (use DEFAULT, OFF or AUTO)",
                      (int)q->speculation);
            return false;
        }
    }
    if (er->logprobs < 0 || er->logprobs > MAX_LOGPROBS) {
        reply_err(r, GRPC_STATUS_INVALID_ARGUMENT, "logprobs must be in 0..%d, got %d",
                  MAX_LOGPROBS, er->logprobs);
        return false;
    }
    if (q->request_id && strlen(q->request_id) > MAX_REQUEST_ID) {
        reply_err(r, GRPC_STATUS_INVALID_ARGUMENT, "request_id: at most %d bytes, got %zu",
                  MAX_REQUEST_ID, strlen(q->request_id));
        return false;
    }
    return true;
}

/* Generate: validate, submit; on error r is set and false returned. */
static bool handle_generate(tsr_server *s, srv_call *c, grpc_slice in, reply *r)
{
    Tessera__V1__GenerateRequest *q = tessera__v1__generate_request__unpack(
        NULL, GRPC_SLICE_LENGTH(in), GRPC_SLICE_START_PTR(in));
    if (!q) {
        MALFORMED(r, "GenerateRequest");
        return false;
    }
    bool ok = false;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    tsr_engine_request er;
    memset(&er, 0, sizeof er);
    er.speculation = -1; /* the server's default */
    pthread_mutex_lock(&s->mu);
    bool stopping = s->shutting_down;
    pthread_mutex_unlock(&s->mu);
    if (stopping) {
        reply_err(r, GRPC_STATUS_UNAVAILABLE,
                  "the server is shutting down; retry on another replica");
        goto done;
    }
    if (!generate_params(s, q, &er, &ids, &n_ids, r)) goto done;

    /* The deadline, as an absolute CLOCK_MONOTONIC time. */
    int64_t deadline_ns = 0;
    gpr_timespec dl = gpr_convert_clock_type(c->details.deadline, GPR_CLOCK_MONOTONIC);
    if (gpr_time_cmp(dl, gpr_inf_future(GPR_CLOCK_MONOTONIC)) < 0) {
        gpr_timespec rem = gpr_time_sub(dl, gpr_now(GPR_CLOCK_MONOTONIC));
        int64_t rem_ns = (int64_t)rem.tv_sec * 1000000000 + rem.tv_nsec;
        if (rem_ns <= 0) {
            reply_err(r, GRPC_STATUS_DEADLINE_EXCEEDED, "deadline exceeded before scheduling");
            goto done;
        }
        deadline_ns = (int64_t)tsr_now_ns() + rem_ns;
    }
    er.deadline_ns = deadline_ns;
    er.on_event = on_engine_event;
    er.ud = c;

    char rid[64];
    snprintf(rid, sizeof rid, "tsr-%" PRIu64, (uint64_t)atomic_fetch_add(&s->next_req, 1));
    pthread_mutex_lock(&c->mu);
    free(c->request_id);
    c->request_id = strdup(q->request_id ? q->request_id : rid);
    c->out.n_top = er.logprobs > 0 ? er.logprobs : -1;
    c->deadline_ns = deadline_ns;
    bool closed = c->closed;
    if (!closed) {
        c->engine_active = true; /* events may arrive before submit returns */
        call_hold(c);            /* dropped by the FINISH event, or below if submit fails */
    }
    pthread_mutex_unlock(&c->mu);
    if (closed) goto done; /* the client is already gone */
    if (!c->request_id) {
        reply_err(r, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        goto done_inactive;
    }

    char err[512];
    err[0] = '\0';
    uint64_t id = 0;
    int rc = tsr_metrics_submit(s->metrics, s->engine, &er, &id, err, sizeof err);
    if (rc != TSR_ENGINE_OK) {
        switch (rc) {
        case TSR_ENGINE_EINVAL:
            reply_err(r, GRPC_STATUS_INVALID_ARGUMENT, "%s", err);
            break;
        case TSR_ENGINE_EQUEUE_FULL:
            reply_err(r, GRPC_STATUS_RESOURCE_EXHAUSTED,
                      "the request queue is full (%d waiting): retry later or on another "
                      "replica%s%s",
                      s->info.max_queue, err[0] ? "; " : "", err);
            break;
        case TSR_ENGINE_EDRAINING:
            reply_err(r, GRPC_STATUS_UNAVAILABLE,
                      "the server is draining and accepts no new requests; retry on another "
                      "replica");
            break;
        case TSR_ENGINE_EDOWN:
            reply_err(r, GRPC_STATUS_UNAVAILABLE, "the replica's data plane is down: %s",
                      err[0] ? err : "a rank failed");
            break;
        case TSR_ENGINE_ENOMEM: /* err says what and what to do */
            reply_err(r, GRPC_STATUS_RESOURCE_EXHAUSTED, "%s", err);
            break;
        default:
            reply_err(r, GRPC_STATUS_INTERNAL, "engine error %d: %s", rc, err);
            break;
        }
        goto done_inactive;
    }
    pthread_mutex_lock(&c->mu);
    c->req_id = id;
    pthread_mutex_unlock(&c->mu);
    ok = true;
    goto done;

done_inactive:
    pthread_mutex_lock(&c->mu);
    c->engine_active = false;
    call_put_unlock(c); /* never the last: on_recv's hold is still held */
done:
    free(ids);
    tessera__v1__generate_request__free_unpacked(q, NULL);
    return ok;
}

/* The request message type of a method, for the string checks (NULL: none). */
static const ProtobufCMessageDescriptor *request_descriptor(method_id m)
{
    switch (m) {
    case M_GENERATE:
        return &tessera__v1__generate_request__descriptor;
    case M_TOKENIZE:
        return &tessera__v1__tokenize_request__descriptor;
    case M_HEALTH_CHECK:
    case M_HEALTH_WATCH:
        return &grpc__health__v1__health_check_request__descriptor;
    default:
        return NULL;
    }
}

/* RECV_MESSAGE completed. The receive's hold is kept while the request is handled and
 * dropped at the end, whatever happened meanwhile (the close may have come first). */
static void on_recv(tsr_server *s, srv_call *c, bool success)
{
    pthread_mutex_lock(&c->mu);
    c->recv_pending = false;
    grpc_byte_buffer *bb = c->recv_bb;
    c->recv_bb = NULL;
    bool closed = c->closed;
    pthread_mutex_unlock(&c->mu);

    reply r;
    memset(&r, 0, sizeof r);
    r.code = GRPC_STATUS_OK;
    bool streaming_started = false;
    if (!success || closed) {
        /* The call died before its message was handled: nothing to answer. */
        if (bb) grpc_byte_buffer_destroy(bb);
        pthread_mutex_lock(&c->mu);
        call_put_unlock(c);
        return;
    }
    if (!bb) {
        reply_err(&r, GRPC_STATUS_INVALID_ARGUMENT,
                  "no request message: the client closed the call without sending one");
    } else {
        grpc_slice in = tsr_grpc_read_all(bb);
        grpc_byte_buffer_destroy(bb);
        char serr[512];
        /* Every string field: no NUL (protobuf-c would cut it there), valid UTF-8. */
        method_id m = c->m;
        if (tsr_pbcheck_strings(request_descriptor(m), GRPC_SLICE_START_PTR(in),
                                GRPC_SLICE_LENGTH(in), serr, sizeof serr) != 0) {
            reply_err(&r, GRPC_STATUS_INVALID_ARGUMENT, "%s", serr);
            m = M_UNKNOWN; /* answered: handle nothing */
        }
        switch (m) {
        case M_GENERATE:
            streaming_started = handle_generate(s, c, in, &r);
            break;
        case M_TOKENIZE:
            handle_tokenize(s, in, &r);
            break;
        case M_MODEL_INFO:
            handle_model_info(s, in, &r);
            break;
        case M_STATUS:
            handle_status(s, in, &r);
            break;
        case M_DRAIN:
            handle_drain(s, in, &r);
            break;
        case M_HEALTH_CHECK:
            handle_health_check(s, in, &r);
            break;
        case M_HEALTH_WATCH: {
            Grpc__Health__V1__HealthCheckRequest *q =
                grpc__health__v1__health_check_request__unpack(NULL, GRPC_SLICE_LENGTH(in),
                                                               GRPC_SLICE_START_PTR(in));
            if (!q) {
                MALFORMED(&r, "HealthCheckRequest");
                break;
            }
            bool known = health_service_known(q->service ? q->service : "");
            grpc__health__v1__health_check_request__free_unpacked(q, NULL);
            int h = known
                        ? health_now(s)
                        : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN;
            pthread_mutex_lock(&c->mu);
            c->health_known_service = known;
            c->health_want = h;
            advance(c);
            pthread_mutex_unlock(&c->mu);
            streaming_started = true;
            break;
        }
        default:
            break;
        }
        grpc_slice_unref(in);
    }
    if (streaming_started) {
        pthread_mutex_lock(&c->mu);
        call_put_unlock(c);
        return;
    }
    pthread_mutex_lock(&c->mu);
    if (!c->closed && !c->done_sending && !c->send_pending) {
        if (r.code == GRPC_STATUS_OK && r.msg) {
            start_send(c, r.msg, true, GRPC_STATUS_OK, "");
            r.msg = NULL;
        } else {
            start_send(c, NULL, true, r.code, r.details);
        }
    }
    call_put_unlock(c);
    if (r.msg) grpc_byte_buffer_destroy(r.msg);
}

/* A new call arrived (request_call completed). */
static void on_new_call(tsr_server *s, srv_call *c)
{
    c->m = M_UNKNOWN;
    for (size_t i = 0; i < sizeof k_methods / sizeof *k_methods; i++)
        if (grpc_slice_str_cmp(c->details.method, k_methods[i].path) == 0) c->m = k_methods[i].id;
    pthread_mutex_lock(&s->mu);
    c->next = s->calls;
    c->prev = NULL;
    if (s->calls) s->calls->prev = c;
    s->calls = c;
    s->n_calls++;
    if (c->m == M_GENERATE) s->n_generate_open++;
    pthread_mutex_unlock(&s->mu);

    pthread_mutex_lock(&c->mu);
    c->holds = 1; /* this handler's, dropped at the end */
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->cancelled;
    if (grpc_call_start_batch(c->call, &op, 1, &c->t_close, NULL) != GRPC_CALL_OK) {
        /* Cannot track the call's end: cancel it and let it go. */
        c->closed = true;
        c->done_sending = true;
        grpc_call_cancel(c->call, NULL);
        call_put_unlock(c);
        return;
    }
    call_hold(c); /* dropped by on_close */
    if (c->m == M_UNKNOWN) {
        char *path = grpc_slice_to_c_string(c->details.method);
        char msg[512];
        snprintf(msg, sizeof msg,
                 "unknown method %.300s: this server implements tessera.v1.Inference "
                 "(Generate, Tokenize, ModelInfo), tessera.v1.Admin (Status, Drain) and "
                 "grpc.health.v1.Health (Check, Watch)",
                 path ? path : "?");
        gpr_free(path);
        start_send(c, NULL, true, GRPC_STATUS_UNIMPLEMENTED, msg);
        call_put_unlock(c);
        return;
    }
    if (c->m != M_HEALTH_CHECK && c->m != M_HEALTH_WATCH && tsr_auth_enabled(s->auth)) {
        /* API keys (auth.h): the `authorization` metadata, "Bearer KEY" */
        size_t len = 0;
        const char *val = tsr_grpc_md_get(&c->md, "authorization", &len);
        char why[256];
        tsr_auth_verdict v =
            tsr_auth_check(s->auth, val, len, c->m == M_STATUS || c->m == M_DRAIN, why, sizeof why);
        if (v != TSR_AUTH_ALLOW) {
            start_send(c, NULL, true,
                       v == TSR_AUTH_FORBIDDEN ? GRPC_STATUS_PERMISSION_DENIED
                                               : GRPC_STATUS_UNAUTHENTICATED,
                       why);
            call_put_unlock(c);
            return;
        }
    }
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->recv_bb;
    if (grpc_call_start_batch(c->call, &op, 1, &c->t_recv, NULL) != GRPC_CALL_OK) {
        grpc_call_cancel(c->call, NULL);
        c->done_sending = true;
    } else {
        c->recv_pending = true;
        call_hold(c); /* dropped at the end of on_recv */
    }
    call_put_unlock(c);
}

/* RECV_CLOSE_ON_SERVER completed: the call is over. */
static void on_close(tsr_server *s, srv_call *c)
{
    pthread_mutex_lock(&c->mu);
    c->closed = true;
    bool cancel = c->engine_active && !c->cancel_sent;
    if (cancel) c->cancel_sent = true;
    uint64_t id = c->req_id;
    /* Nothing can be sent any more: drop pending output. */
    drop_pending(c);
    call_put_unlock(c); /* the close's hold; c may be gone now */
    /* Client cancel, deadline, or a dead client: free its KV blocks now. */
    if (cancel) tsr_engine_cancel(s->engine, id);
}

static void on_send_done(srv_call *c, bool success)
{
    pthread_mutex_lock(&c->mu);
    c->send_pending = false;
    c->n_bytes_inflight = 0;
    account(c);
    if (c->has_status_details) {
        grpc_slice_unref(c->status_details);
        c->has_status_details = false;
    }
    if (!success) c->done_sending = true; /* cancelled meanwhile: RECV_CLOSE follows */
    advance(c);
    call_put_unlock(c); /* the send's hold */
}

/* Arm request_call with a fresh call object (CQ thread). */
static void arm_new_call(tsr_server *s)
{
    pthread_mutex_lock(&s->mu);
    bool stopping = s->shutting_down;
    pthread_mutex_unlock(&s->mu);
    if (stopping || s->new_call_armed) return;
    srv_call *c = call_new(s);
    if (!c) {
        fprintf(stderr, "tessera serve: out of memory accepting a call; retrying\n");
        return; /* retried on the next tick */
    }
    grpc_call_error e =
        grpc_server_request_call(s->srv, &c->call, &c->details, &c->md, s->cq, s->cq, &s->t_new);
    if (e != GRPC_CALL_OK) {
        call_destroy(c);
        return;
    }
    s->pending_new = c;
    s->new_call_armed = true;
}

static void *cq_main(void *arg)
{
    tsr_server *s = arg;
    bool timed_out = false;
    arm_new_call(s);
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(s->cq, tsr_grpc_in_ms(TICK_MS), NULL);
        if (ev.type == GRPC_OP_COMPLETE) {
            tag *t = ev.tag;
            switch (t->kind) {
            case T_NEW_CALL: {
                srv_call *c = s->pending_new;
                s->pending_new = NULL;
                s->new_call_armed = false;
                if (ev.success && c && c->call)
                    on_new_call(s, c);
                else if (c)
                    call_destroy(c);
                arm_new_call(s);
                break;
            }
            case T_SHUTDOWN:
                s->shutdown_tag_seen = true;
                break;
            case T_CLOSE:
                on_close(s, t->c);
                break;
            case T_RECV:
                on_recv(s, t->c, ev.success);
                break;
            case T_SEND:
                on_send_done(t->c, ev.success);
                break;
            }
        } else if (ev.type == GRPC_QUEUE_SHUTDOWN) {
            break; /* not expected before we shut the queue down */
        }
        if (!s->new_call_armed) arm_new_call(s);
        int64_t tnow = (int64_t)tsr_now_ns();
        if (tnow - s->last_refresh_ns >= (int64_t)TICK_MS * 1000000 / 2) {
            s->last_refresh_ns = tnow;
            health_refresh(s);
            sweep_slow_readers(s);
        }

        pthread_mutex_lock(&s->mu);
        bool stopping = s->shutting_down, no_new_calls = s->shutdown_called;
        int64_t grace = s->grace_deadline_ns, hard = s->hard_deadline_ns;
        int32_t n_gen = s->n_generate_open, n_calls = s->n_calls;
        pthread_mutex_unlock(&s->mu);
        if (!stopping) continue;
        int64_t t = (int64_t)tsr_now_ns();
        if (!s->cancel_all_done && no_new_calls && (n_gen == 0 || t >= grace)) {
            grpc_server_cancel_all_calls(s->srv);
            s->cancel_all_done = true;
        }
        if (s->shutdown_tag_seen && n_calls == 0 && !s->new_call_armed) break;
        if (t >= hard) {
            timed_out = true;
            break;
        }
    }
    if (!timed_out) {
        grpc_server_destroy(s->srv);
        grpc_completion_queue_shutdown(s->cq);
        int64_t until = (int64_t)tsr_now_ns() + 5000000000LL;
        for (;;) {
            grpc_event ev = grpc_completion_queue_next(s->cq, tsr_grpc_in_ms(TICK_MS), NULL);
            if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
            if ((int64_t)tsr_now_ns() >= until) {
                timed_out = true;
                break;
            }
        }
        if (!timed_out) grpc_completion_queue_destroy(s->cq);
    }
    pthread_mutex_lock(&s->mu);
    s->cq_done = true;
    s->cq_timed_out = timed_out;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ---- public API ---- */

int tsr_server_start(const tsr_server_params *p, tsr_engine *engine, const tsr_vocab *vocab,
                     const tsr_server_model_info *info, tsr_server **out, int *bound_port,
                     char *err, size_t err_len)
{
    *out = NULL;
    if (bound_port) *bound_port = 0;
    if (!engine || !vocab || !info) {
        tsr_set_err(err, err_len, "tsr_server_start: engine, vocab and info are required");
        return TSR_SERVER_EINVAL;
    }
    const char *listen = p && p->listen ? p->listen : TSR_SERVER_DEFAULT_LISTEN;
    if (!tsr_cli_parse_hostport(listen, NULL, 0, NULL)) {
        tsr_set_err(err, err_len,
                    "--listen needs HOST:PORT with a port in 0..65535 (0: any free port), got "
                    "'%s'",
                    listen);
        return TSR_SERVER_EINVAL;
    }
    int rc = TSR_SERVER_ENOMEM;
    tsr_server *s = calloc(1, sizeof *s);
    if (!s) {
        tsr_set_err(err, err_len, "out of memory");
        return TSR_SERVER_ENOMEM;
    }
    s->engine = engine;
    s->vocab = vocab;
    s->auth = p ? p->auth : NULL;
    s->metrics = p ? p->metrics : NULL;
    s->info = *info;
    s->arch = strdup(info->architecture ? info->architecture : "llama");
    s->name = info->name ? strdup(info->name) : NULL;
    s->model = strdup(info->model ? info->model : "");
    s->t_new = (tag){T_NEW_CALL, NULL};
    s->t_shutdown = (tag){T_SHUTDOWN, NULL};
    s->last_health = -1;
    s->max_piece = 1;
    for (int32_t id = 0; id < tsr_vocab_n_tokens(vocab); id++) {
        size_t len = 0;
        if (tsr_vocab_token_text(vocab, id, &len) && len + 1 > s->max_piece) s->max_piece = len + 1;
    }
    s->t_start_ns = (uint64_t)(int64_t)tsr_now_ns();
    s->max_total_bytes = p && p->max_buffered_bytes > 0 ? p->max_buffered_bytes
                                                        : TSR_SERVER_DEFAULT_MAX_BUFFERED_BYTES;
    s->max_call_bytes = p && p->max_call_buffered_bytes > 0
                            ? p->max_call_buffered_bytes
                            : TSR_SERVER_DEFAULT_MAX_CALL_BUFFERED_BYTES;
    s->slow_reader_ns =
        (p && p->slow_reader_ms > 0 ? p->slow_reader_ms : TSR_SERVER_DEFAULT_SLOW_READER_MS) *
        1000000;
    atomic_init(&s->n_bytes_buffered, 0);
    atomic_init(&s->next_req, 1);
    atomic_init(&s->stopping, false);
    bool mu_ok = false, pump_mu_ok = false, grpc_ok = false, started = false;
    if (!s->arch || (info->name && !s->name) || !s->model) {
        tsr_set_err(err, err_len, "out of memory");
        goto fail;
    }
    if (pthread_mutex_init(&s->mu, NULL) || pthread_cond_init(&s->cv, NULL)) goto fail_mem;
    mu_ok = true;
    if (pthread_mutex_init(&s->pump_mu, NULL) || pthread_cond_init(&s->pump_cv, NULL))
        goto fail_mem;
    pump_mu_ok = true;

    grpc_init();
    grpc_ok = true;
    grpc_arg args[2];
    size_t n_args = 0;
    memset(args, 0, sizeof args);
    args[n_args].type = GRPC_ARG_INTEGER;
    args[n_args].key = (char *)GRPC_ARG_ALLOW_REUSEPORT;
    args[n_args].value.integer = 0;
    n_args++;
    if (p && p->max_message_bytes > 0) {
        args[n_args].type = GRPC_ARG_INTEGER;
        args[n_args].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
        args[n_args].value.integer = p->max_message_bytes;
        n_args++;
    }
    grpc_channel_args cargs = {n_args, args};
    s->srv = grpc_server_create(&cargs, NULL);
    s->cq = grpc_completion_queue_create_for_next(NULL);
    if (!s->srv || !s->cq) goto fail_mem;
    grpc_server_register_completion_queue(s->srv, s->cq, NULL);
    tsr_tls_server tls = {p ? (char *)p->tls_cert_pem : NULL, p ? (char *)p->tls_key_pem : NULL,
                          p ? (char *)p->tls_client_ca_pem : NULL};
    grpc_server_credentials *creds = tsr_tls_grpc_server_credentials(&tls);
    if (!creds) {
        tsr_set_err(err, err_len, "cannot create the gRPC TLS credentials (--tls-cert/--tls-key)");
        rc = TSR_SERVER_EINVAL;
        goto fail;
    }
    int port = grpc_server_add_http2_port(s->srv, listen, creds);
    grpc_server_credentials_release(creds);
    if (port == 0) {
        tsr_set_err(err, err_len,
                    "cannot listen on %s: the address is in use or not local (pick another "
                    "--listen, e.g. 127.0.0.1:0 for any free port)",
                    listen);
        rc = TSR_SERVER_EBIND;
        goto fail;
    }
    grpc_server_start(s->srv);
    started = true;
    if (pthread_create(&s->pump_thread, NULL, pump_main, s) != 0) {
        tsr_set_err(err, err_len, "cannot start the server's pump thread");
        rc = TSR_SERVER_ETHREAD;
        goto fail;
    }
    if (pthread_create(&s->cq_thread, NULL, cq_main, s) != 0) {
        pthread_mutex_lock(&s->pump_mu);
        s->pump_stop = true;
        pthread_cond_signal(&s->pump_cv);
        pthread_mutex_unlock(&s->pump_mu);
        pthread_join(s->pump_thread, NULL);
        tsr_set_err(err, err_len, "cannot start the server's completion-queue thread");
        rc = TSR_SERVER_ETHREAD;
        goto fail;
    }
    /* Last (nothing after it can fail): without a free hook slot the events wake the pump
     * one by one, as before. */
    if (tsr_engine_add_step_hook(engine, pump_step_hook, s) == 0) {
        pthread_mutex_lock(&s->pump_mu);
        s->step_hooked = true;
        pthread_mutex_unlock(&s->pump_mu);
    }
    if (bound_port) *bound_port = port;
    *out = s;
    return TSR_SERVER_OK;

fail_mem:
    tsr_set_err(err, err_len, "out of memory starting the gRPC server");
    rc = TSR_SERVER_ENOMEM;
fail:
    if (s->srv) {
        if (started) {
            grpc_server_shutdown_and_notify(s->srv, s->cq, &s->t_shutdown);
            grpc_server_cancel_all_calls(s->srv);
            for (int i = 0; i < 50; i++) { /* bounded: 10 s */
                grpc_event ev = grpc_completion_queue_next(s->cq, tsr_grpc_in_ms(TICK_MS), NULL);
                if (ev.type == GRPC_OP_COMPLETE && ev.tag == &s->t_shutdown) break;
            }
        }
        grpc_server_destroy(s->srv);
    }
    if (s->cq) {
        grpc_completion_queue_shutdown(s->cq);
        for (int i = 0; i < 50; i++) {
            grpc_event ev = grpc_completion_queue_next(s->cq, tsr_grpc_in_ms(TICK_MS), NULL);
            if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        }
        grpc_completion_queue_destroy(s->cq);
    }
    if (grpc_ok) grpc_shutdown();
    if (pump_mu_ok) {
        pthread_mutex_destroy(&s->pump_mu);
        pthread_cond_destroy(&s->pump_cv);
    }
    if (mu_ok) {
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
    }
    free(s->arch);
    free(s->name);
    free(s->model);
    free(s);
    return rc;
}

void tsr_server_set_not_serving(tsr_server *s)
{
    if (!s) return;
    pthread_mutex_lock(&s->mu);
    s->not_serving = true;
    pthread_mutex_unlock(&s->mu);
    atomic_store(&s->stopping, true);
    /* The CQ thread's next tick (<= 200 ms) tells the Watch streams. */
}

int tsr_server_shutdown(tsr_server *s, int64_t grace_ms, char *err, size_t err_len)
{
    if (!s) return TSR_SERVER_OK;
    if (grace_ms < 0) grace_ms = 0;
    /* Back to one wake per event (under pump_mu: an event queued quietly before this is
     * woken here, one after it wakes itself); then no hook call can reach s any more. */
    pthread_mutex_lock(&s->pump_mu);
    s->step_hooked = false;
    pthread_cond_signal(&s->pump_cv);
    pthread_mutex_unlock(&s->pump_mu);
    tsr_engine_remove_step_hook(s->engine, pump_step_hook, s);
    pthread_mutex_lock(&s->mu);
    s->shutting_down = true;
    s->not_serving = true;
    s->grace_deadline_ns = (int64_t)tsr_now_ns() + grace_ms * 1000000;
    s->hard_deadline_ns = s->grace_deadline_ns + (int64_t)HARD_EXTRA_MS * 1000000;
    pthread_mutex_unlock(&s->mu);
    atomic_store(&s->stopping, true);
    grpc_server_shutdown_and_notify(s->srv, s->cq, &s->t_shutdown);
    pthread_mutex_lock(&s->mu);
    s->shutdown_called = true;
    pthread_mutex_unlock(&s->mu);

    /* The CQ thread finishes the shutdown; wait for it, bounded. */
    int64_t wait_ms = grace_ms + HARD_EXTRA_MS + 8000;
    struct timespec until = tsr_grpc_abstime_in_ms(CLOCK_REALTIME, wait_ms);
    pthread_mutex_lock(&s->mu);
    while (!s->cq_done) {
        if (pthread_cond_timedwait(&s->cv, &s->mu, &until) == ETIMEDOUT) break;
    }
    bool done = s->cq_done, timed_out = s->cq_timed_out;
    int32_t left = s->n_calls;
    pthread_mutex_unlock(&s->mu);
    if (!done) {
        tsr_set_err(err, err_len, "the gRPC server did not stop within %lld ms; leaving it",
                    (long long)wait_ms);
        return TSR_SERVER_ETIMEOUT;
    }
    pthread_join(s->cq_thread, NULL);
    pthread_mutex_lock(&s->pump_mu);
    s->pump_stop = true;
    pthread_cond_signal(&s->pump_cv);
    pthread_mutex_unlock(&s->pump_mu);
    pthread_join(s->pump_thread, NULL);
    if (timed_out) {
        tsr_set_err(err, err_len,
                    "%d call(s) still open %d ms after the grace period (an engine request never "
                    "finished?); the server's memory is left allocated",
                    left, HARD_EXTRA_MS);
        return TSR_SERVER_ETIMEOUT;
    }
    grpc_shutdown();
    pthread_mutex_destroy(&s->pump_mu);
    pthread_cond_destroy(&s->pump_cv);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s->arch);
    free(s->name);
    free(s->model);
    free(s);
    return TSR_SERVER_OK;
}
