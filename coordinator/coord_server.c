/*
 * coord_server.c — the coordinator's gRPC front (see coord_server.h for the contract).
 *
 * gRPC core C API. Every batch of every call (the client's call to us, and our call to a
 * replica) completes on one completion queue drained by one thread; a completion only sets
 * a bit in its call's `done` mask and signals the call's condition variable. The call's
 * own thread starts batches and waits for bits, so the protocol of one call reads as
 * straight-line code. Bits are cleared before a batch is started and each tag has at most
 * one batch in flight.
 *
 * Lifetime: a call object is freed by its thread once every batch it started has
 * completed (RECV_CLOSE_ON_SERVER last: it completes after our status went out, or when
 * the client went away). The server counts live calls; shutdown waits for them.
 */
#include "coordinator/coord_server.h"
#include "coordinator/grpcutil.h"
#include "coordinator/rpc.h"
#include "coordinator/tls.h"
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
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#define TICK_MS            100   /* call threads re-check client, replica and shutdown */
#define UNARY_TIMEOUT_MS   10000 /* Tokenize / ModelInfo to a replica, when the client has none */
#define NO_REPLICA_WAIT_MS 10000 /* how long a request waits for a replica to come back */
#define DEFAULT_MAX_TOKENS 16
#define CLOSE_WAIT_MS      10000 /* after our status: bound on RECV_CLOSE (never seen slow) */

enum {
    B_CLOSE = 1u << 0,
    B_RECV = 1u << 1,
    B_SEND = 1u << 2,
    B_UP_A = 1u << 3,
    B_UP_ST = 1u << 4,
    B_UP_RECV = 1u << 5,
};

struct ccall;
typedef struct {
    struct ccall *c;
    unsigned bit;
} ctag;

struct tsr_coord_server;

typedef struct ccall {
    struct tsr_coord_server *s;
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array md;
    grpc_byte_buffer *recv_bb;
    int cancelled;
    ctag t[6];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    unsigned done, ok;   /* under mu: completed tags and their success */
    unsigned inflight;   /* call thread only: tags with a batch started, not yet seen done */
    bool md_sent;        /* call thread only */
    grpc_slice st_slice; /* status details of the last status batch */
    bool has_st_slice;
    /* The replica call (call thread only, except the fields the CQ thread writes). */
    grpc_call *up;
    grpc_metadata_array up_md_init, up_md_trail;
    grpc_byte_buffer *up_send_bb, *up_recv_bb;
    grpc_status_code up_code;
    grpc_slice up_details;
    const char *up_error_string;
    struct ccall *next_new;   /* request_call chain */
    struct hsink *sink;       /* HTTP front door: replies go to it, not to a gRPC call */
    grpc_status_code st_code; /* the error status reply_status sent (st_error) */
    bool st_error;
} ccall;

struct tsr_coord_server {
    grpc_server *srv;
    grpc_completion_queue *cq;
    tsr_coord *coord;
    tsr_auth *auth;              /* borrowed, NULL: no keys */
    char *replica_authorization; /* "Bearer KEY" sent to replicas, or NULL */
    grpc_metadata replica_md;    /* authorization: replica_authorization */
    pthread_t cq_thread;
    int shutdown_tag, new_tag;
    ccall *pending;         /* the call request_call fills (CQ thread) */
    atomic_bool stopping;   /* no new work: cancel what waits */
    atomic_bool cancel_all; /* grace over: call threads cancel their replica calls */
    uint64_t t_start_ns;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* --- under mu --- */
    int32_t n_calls, n_generate;
    bool cq_done, shutdown_seen;
    uint64_t n_requests, n_failovers, n_failed;
    struct hsink *sinks;  /* HTTP requests in flight (cancel by id) */
    tsr_metrics *metrics; /* HTTP requests' observer (borrowed, may be NULL) */
    atomic_uint_fast64_t next_id;
};

/* ---- helpers ---- */

/* Remaining ms to the client's deadline (INT64_MAX: none). */
static int64_t deadline_left_ms(const ccall *c)
{
    gpr_timespec dl = gpr_convert_clock_type(c->details.deadline, GPR_CLOCK_MONOTONIC);
    if (gpr_time_cmp(dl, gpr_inf_future(GPR_CLOCK_MONOTONIC)) >= 0) return INT64_MAX;
    gpr_timespec rem = gpr_time_sub(dl, gpr_now(GPR_CLOCK_MONOTONIC));
    return (int64_t)rem.tv_sec * 1000 + rem.tv_nsec / 1000000;
}

/* ---- tags and waits ---- */

static void tag_done(ctag *t, bool success)
{
    ccall *c = t->c;
    pthread_mutex_lock(&c->mu);
    c->done |= t->bit;
    if (success)
        c->ok |= t->bit;
    else
        c->ok &= ~t->bit;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

static unsigned done_bits(ccall *c)
{
    pthread_mutex_lock(&c->mu);
    unsigned d = c->done;
    pthread_mutex_unlock(&c->mu);
    return d;
}

/* Wait until any bit of `mask` is done or ms passed (ms < 0: one tick). Returns done. */
static unsigned wait_any(ccall *c, unsigned mask, int64_t ms)
{
    struct timespec ts = tsr_grpc_abstime_in_ms(CLOCK_MONOTONIC, ms < 0 ? TICK_MS : ms);
    pthread_mutex_lock(&c->mu);
    while (!(c->done & mask)) {
        if (pthread_cond_timedwait(&c->cv, &c->mu, &ts) == ETIMEDOUT) break;
    }
    unsigned d = c->done;
    pthread_mutex_unlock(&c->mu);
    return d;
}

static bool start(ccall *c, unsigned bit, const grpc_op *ops, size_t n, grpc_call *call)
{
    pthread_mutex_lock(&c->mu);
    c->done &= ~bit;
    c->ok &= ~bit;
    pthread_mutex_unlock(&c->mu);
    int idx = __builtin_ctz(bit);
    if (grpc_call_start_batch(call, ops, n, &c->t[idx], NULL) != GRPC_CALL_OK) return false;
    c->inflight |= bit;
    return true;
}

/* Wait (bounded by ms) for every in-flight tag in mask; false when some did not come. */
static bool settle(ccall *c, unsigned mask, int64_t ms)
{
    struct timespec ts = tsr_grpc_abstime_in_ms(CLOCK_MONOTONIC, ms);
    pthread_mutex_lock(&c->mu);
    while ((c->done & c->inflight & mask) != (c->inflight & mask)) {
        if (pthread_cond_timedwait(&c->cv, &c->mu, &ts) == ETIMEDOUT) break;
    }
    bool all = (c->done & c->inflight & mask) == (c->inflight & mask);
    if (all) c->inflight &= ~mask;
    pthread_mutex_unlock(&c->mu);
    return all;
}

/* ---- replies to the client ---- */

static void free_st_slice(ccall *c)
{
    if (c->has_st_slice) {
        grpc_slice_unref(c->st_slice);
        c->has_st_slice = false;
    }
}

/* One batch: [initial metadata] [message] [status]. Waits for it (or for the client to go
 * away). Returns true when it went out. */
static bool sink_deliver(ccall *c, grpc_byte_buffer *msg, bool with_status, grpc_status_code code,
                         const char *details);

static bool send_ops(ccall *c, grpc_byte_buffer *msg, bool with_status, grpc_status_code code,
                     const char *details)
{
    if (c->sink) return sink_deliver(c, msg, with_status, code, details);
    if (done_bits(c) & B_CLOSE) {
        if (msg) grpc_byte_buffer_destroy(msg);
        return false;
    }
    grpc_op ops[3];
    size_t n = 0;
    memset(ops, 0, sizeof ops);
    if (!c->md_sent) {
        ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
        c->md_sent = true;
    }
    if (msg) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = msg;
    }
    if (with_status) {
        free_st_slice(c);
        c->st_slice = grpc_slice_from_copied_string(details ? details : "");
        c->has_st_slice = true;
        ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
        ops[n].data.send_status_from_server.status = code;
        ops[n++].data.send_status_from_server.status_details = &c->st_slice;
    }
    bool ok = start(c, B_SEND, ops, n, c->call);
    if (msg) grpc_byte_buffer_destroy(msg);
    if (!ok) return false;
    for (;;) {
        unsigned d = wait_any(c, B_SEND, -1);
        if (d & B_SEND) break;
    }
    settle(c, B_SEND, 0);
    pthread_mutex_lock(&c->mu);
    bool sent = c->ok & B_SEND;
    pthread_mutex_unlock(&c->mu);
    return sent;
}

static void reply_status(ccall *c, grpc_status_code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void reply_status(ccall *c, grpc_status_code code, const char *fmt, ...)
{
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (code != GRPC_STATUS_OK) {
        c->st_code = code;
        c->st_error = true;
        pthread_mutex_lock(&c->s->mu);
        c->s->n_failed++;
        pthread_mutex_unlock(&c->s->mu);
    }
    send_ops(c, NULL, true, code, buf);
}

static void reply_msg(ccall *c, const ProtobufCMessage *m)
{
    send_ops(c, tsr_grpc_pack(m), true, GRPC_STATUS_OK, "");
}

/* ---- replica calls ---- */

typedef enum { UP_MSG, UP_END, UP_CLIENT_GONE, UP_REPLICA_DOWN, UP_STOPPING } up_event;

static bool up_start(ccall *c, grpc_channel *ch, const char *method, const ProtobufCMessage *req)
{
    gpr_timespec dl = gpr_convert_clock_type(c->details.deadline, GPR_CLOCK_MONOTONIC);
    grpc_slice m = grpc_slice_from_static_string(method);
    c->up =
        grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, c->s->cq, m, NULL, dl, NULL);
    grpc_slice_unref(m);
    if (!c->up) return false;
    grpc_metadata_array_init(&c->up_md_init);
    grpc_metadata_array_init(&c->up_md_trail);
    c->up_code = GRPC_STATUS_UNKNOWN;
    c->up_details = grpc_empty_slice();
    c->up_error_string = NULL;
    c->up_recv_bb = NULL;
    c->up_send_bb = tsr_grpc_pack(req);
    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (c->s->replica_authorization) {
        /* The slices live in the server (static key, value copied once at start). */
        ops[0].data.send_initial_metadata.count = 1;
        ops[0].data.send_initial_metadata.metadata = &c->s->replica_md;
    }
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = c->up_send_bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &c->up_md_init;
    grpc_op st;
    memset(&st, 0, sizeof st);
    st.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    st.data.recv_status_on_client.trailing_metadata = &c->up_md_trail;
    st.data.recv_status_on_client.status = &c->up_code;
    st.data.recv_status_on_client.status_details = &c->up_details;
    st.data.recv_status_on_client.error_string = &c->up_error_string;
    bool ok = start(c, B_UP_A, ops, 4, c->up);
    ok = start(c, B_UP_ST, &st, 1, c->up) && ok;
    if (!ok) grpc_call_cancel(c->up, NULL);
    return ok;
}

/* The next message of the replica's stream (*bb, the caller destroys it), or why none. */
static up_event up_next(ccall *c, const tsr_coord_lease *lease, grpc_byte_buffer **bb)
{
    *bb = NULL;
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->up_recv_bb;
    c->up_recv_bb = NULL;
    if (!start(c, B_UP_RECV, &op, 1, c->up)) return UP_END;
    for (;;) {
        unsigned d = wait_any(c, B_UP_RECV | B_CLOSE, -1);
        if (d & B_UP_RECV) break;
        if (d & B_CLOSE) return UP_CLIENT_GONE;
        if (atomic_load(&c->s->cancel_all)) return UP_STOPPING;
        if (lease && tsr_coord_lease_down(c->s->coord, lease)) return UP_REPLICA_DOWN;
    }
    settle(c, B_UP_RECV, 0);
    *bb = c->up_recv_bb;
    c->up_recv_bb = NULL;
    return *bb ? UP_MSG : UP_END;
}

/* End the replica call: cancel it unless its status is in, wait for every batch, release.
 * Returns its status code (details into buf). */
static grpc_status_code up_end(ccall *c, bool cancel, char *buf, size_t cap)
{
    if (!c->up) return GRPC_STATUS_INTERNAL;
    if (cancel || !(done_bits(c) & B_UP_ST)) {
        if (cancel) grpc_call_cancel(c->up, NULL);
        /* Without a cancel the status follows the end of the stream within ms; with one,
         * at once. Bound the wait anyway, then cancel. */
        if (!cancel) {
            wait_any(c, B_UP_ST, 2000);
            if (!(done_bits(c) & B_UP_ST)) grpc_call_cancel(c->up, NULL);
        }
    }
    bool settled = settle(c, B_UP_A | B_UP_ST | B_UP_RECV, CLOSE_WAIT_MS);
    grpc_status_code code = c->up_code;
    char *d = grpc_slice_to_c_string(c->up_details);
    snprintf(buf, cap, "%s", d && d[0] ? d : tsr_rpc_code_name((int)code));
    gpr_free(d);
    if (!settled) {
        /* The core never left a batch pending this long; leak rather than free under it. */
        fprintf(stderr, "tessera coordinator: a replica call did not settle; leaking it\n");
        c->up = NULL;
        return GRPC_STATUS_UNAVAILABLE;
    }
    if (c->up_recv_bb) grpc_byte_buffer_destroy(c->up_recv_bb);
    c->up_recv_bb = NULL;
    if (c->up_send_bb) grpc_byte_buffer_destroy(c->up_send_bb);
    c->up_send_bb = NULL;
    grpc_slice_unref(c->up_details);
    gpr_free((void *)c->up_error_string);
    grpc_metadata_array_destroy(&c->up_md_init);
    grpc_metadata_array_destroy(&c->up_md_trail);
    grpc_call_unref(c->up);
    c->up = NULL;
    return code;
}

/* ---- picking with a wait for a replica to come back ---- */

/* Pick a replica of `model`; while none can take it (ENOREPLICA), wait up to
 * NO_REPLICA_WAIT_MS within the deadline. On failure the client got its status (NOT_FOUND,
 * INVALID_ARGUMENT, UNAVAILABLE, DEADLINE_EXCEEDED) unless it went away; returns false. */
static bool pick(ccall *c, const char *model, const tsr_coord_excl *excl, size_t n_excl,
                 int64_t cost, tsr_coord_lease *lease, const char *what_failed)
{
    char err[1536];
    int64_t waited = 0;
    for (;;) {
        int rc = tsr_coord_pick(c->s->coord, model, excl, n_excl, cost, lease, err, sizeof err);
        if (rc == 0) return true;
        if (rc == TSR_COORD_ENOMODEL) {
            reply_status(c, GRPC_STATUS_NOT_FOUND, "%s", err);
            return false;
        }
        if (rc == TSR_COORD_EINVAL) {
            reply_status(c, GRPC_STATUS_INVALID_ARGUMENT, "%s", err);
            return false;
        }
        if (rc != TSR_COORD_ENOREPLICA) {
            reply_status(c, GRPC_STATUS_INTERNAL, "%s", err);
            return false;
        }
        if (waited >= NO_REPLICA_WAIT_MS || atomic_load(&c->s->stopping)) {
            reply_status(c, GRPC_STATUS_UNAVAILABLE, "%s%s", what_failed ? what_failed : "", err);
            return false;
        }
        if (deadline_left_ms(c) <= TICK_MS) {
            reply_status(c, GRPC_STATUS_DEADLINE_EXCEEDED,
                         "deadline exceeded waiting for a replica: %s", err);
            return false;
        }
        if (wait_any(c, B_CLOSE, TICK_MS) & B_CLOSE) return false; /* client gone */
        waited += TICK_MS;
    }
}

/* ---- Generate ---- */

typedef struct {
    int32_t *ids;
    size_t n, cap;
} idvec;

static bool idvec_push(idvec *v, const int32_t *ids, size_t n)
{
    if (n == 0) return true;
    if (v->n + n > v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 256;
        while (cap < v->n + n) cap *= 2;
        int32_t *p = realloc(v->ids, cap * sizeof *p);
        if (!p) return false;
        v->ids = p;
        v->cap = cap;
    }
    memcpy(v->ids + v->n, ids, n * sizeof *ids);
    v->n += n;
    return true;
}

/* Is this replica status the replica's failure (fail over) rather than the request's? */
static bool replica_fault(grpc_status_code code)
{
    switch (code) {
    case GRPC_STATUS_INVALID_ARGUMENT:
    case GRPC_STATUS_NOT_FOUND:
    case GRPC_STATUS_FAILED_PRECONDITION:
    case GRPC_STATUS_OUT_OF_RANGE:
    case GRPC_STATUS_UNIMPLEMENTED:
    case GRPC_STATUS_ALREADY_EXISTS:
        return false;
    /* UNAUTHENTICATED / PERMISSION_DENIED from a replica refuse the coordinator's own key
     * (--replica-key-file), not the client's (checked here already): that replica cannot
     * serve through this coordinator, so the request goes elsewhere. */
    default:
        return true;
    }
}

/* The final message of a request whose replica died after streaming its last token. */
static void send_lost_finish(ccall *c, char *request_id, Tessera__V1__FinishReason reason,
                             int32_t n_completion, int32_t failovers)
{
    Tessera__V1__GenerateResponse m = TESSERA__V1__GENERATE_RESPONSE__INIT;
    Tessera__V1__Usage u = TESSERA__V1__USAGE__INIT;
    m.request_id = request_id;
    m.has_finish_reason = true;
    m.finish_reason = reason;
    u.has_completion_tokens = true;
    u.completion_tokens = n_completion;
    u.has_failovers = true;
    u.failovers = failovers;
    m.usage = &u;
    send_ops(c, tsr_grpc_pack(&m.base), true, GRPC_STATUS_OK, "");
}

/* Did token `last` end the request (a stop token id; an end-of-generation token of the
 * model, unless ignore_eos)? The finish reason, or -1. Asks the replica for its EOG ids. */
static int finished_by(const Tessera__V1__GenerateRequest *q, grpc_channel *ch, const char *auth,
                       int32_t last)
{
    for (size_t i = 0; i < q->n_stop_token_ids; i++)
        if (q->stop_token_ids[i] == last) return TESSERA__V1__FINISH_REASON__FINISH_REASON_STOP;
    if (q->has_ignore_eos && q->ignore_eos) return -1;
    Tessera__V1__ModelInfoRequest mq = TESSERA__V1__MODEL_INFO_REQUEST__INIT;
    mq.model = q->model;
    uint8_t *resp = NULL;
    size_t len = 0;
    char det[256];
    int reason = -1;
    if (tsr_rpc_unary_auth(ch, auth, "/tessera.v1.Inference/ModelInfo", &mq.base, UNARY_TIMEOUT_MS,
                           &resp, &len, det, sizeof det) == 0) {
        Tessera__V1__ModelInfoResponse *a =
            tessera__v1__model_info_response__unpack(NULL, len, resp);
        if (a) {
            for (size_t i = 0; i < a->n_eog_ids; i++)
                if (a->eog_ids[i] == last) reason = TESSERA__V1__FINISH_REASON__FINISH_REASON_EOS;
            if (a->n_eog_ids == 0 && a->has_eos_id && a->eos_id == last)
                reason = TESSERA__V1__FINISH_REASON__FINISH_REASON_EOS;
            tessera__v1__model_info_response__free_unpacked(a, NULL);
        }
    }
    free(resp);
    return reason;
}

static int code_to_engine(grpc_status_code code);
static int finish_from_proto(Tessera__V1__FinishReason r);

/* The metrics observation of a gRPC Generate call (the HTTP front door's calls are
 * observed at its submit): a TOKENS event for ids, or the FINISH that ends it. */
static void obs_tokens(tsr_metrics_req *mr, const int32_t *ids, size_t n)
{
    if (!mr || n == 0) return;
    tsr_event ev;
    memset(&ev, 0, sizeof ev);
    ev.kind = TSR_EV_TOKENS;
    ev.ids = ids;
    ev.n_ids = n;
    tsr_metrics_req_event(mr, &ev);
}

static void obs_finish(tsr_metrics_req **mr, int reason, const Tessera__V1__GenerateResponse *fin,
                       int32_t n_completion)
{
    if (!*mr) return;
    tsr_event ev;
    memset(&ev, 0, sizeof ev);
    ev.kind = TSR_EV_FINISH;
    ev.finish_reason = reason;
    ev.n_completion_tokens = n_completion;
    if (fin && fin->usage) {
        ev.n_prompt_tokens = fin->usage->prompt_tokens;
        ev.n_completion_tokens = fin->usage->completion_tokens;
    }
    if (fin && fin->timings && fin->timings->has_queue_ms)
        ev.t_queue_ns = (uint64_t)(fin->timings->queue_ms * 1e6);
    tsr_metrics_req_event(*mr, &ev); /* frees it */
    *mr = NULL;
}

static void handle_generate(ccall *c, grpc_slice in)
{
    tsr_coord_server *s = c->s;
    Tessera__V1__GenerateRequest *q = tessera__v1__generate_request__unpack(
        NULL, GRPC_SLICE_LENGTH(in), GRPC_SLICE_START_PTR(in));
    if (!q) {
        reply_status(c, GRPC_STATUS_INVALID_ARGUMENT,
                     "malformed GenerateRequest: the message is not valid protobuf");
        return;
    }
    const uint64_t t0 = tsr_now_ns();
    uint64_t t_first = 0;
    idvec base = {0}, streamed = {0};
    tsr_coord_excl excl[64];
    size_t n_excl = 0;
    int32_t failovers = 0;
    char last_fail[1024] = "";
    char rid[64];
    int32_t *attempt_ids = NULL;
    pthread_mutex_lock(&s->mu);
    s->n_requests++;
    s->n_generate++;
    /* gRPC calls enter the request histograms here (HTTP ones at the front door's submit) */
    tsr_metrics_req *mr = c->sink ? NULL : tsr_metrics_req_begin(s->metrics);
    pthread_mutex_unlock(&s->mu);

    /* Make the request reproducible wherever it runs: a seed and an id of our own. */
    const bool greedy = q->has_temperature && q->temperature < 1e-5f;
    if (!q->has_seed && !greedy) {
        uint64_t x = 0;
        if (getrandom(&x, sizeof x, GRND_NONBLOCK) != (ssize_t)sizeof x)
            x = tsr_now_ns() * 0x9E3779B97F4A7C15ull;
        q->has_seed = true;
        q->seed = x;
    }
    char *orig_rid = q->request_id;
    if (!q->request_id || !q->request_id[0]) {
        snprintf(rid, sizeof rid, "coord-%" PRIu64, (uint64_t)atomic_fetch_add(&s->next_id, 1));
        q->request_id = rid;
    }
    char *orig_prompt = q->prompt;
    const size_t orig_n_messages = q->n_messages;
    int32_t *orig_ids = q->prompt_ids;
    size_t orig_n_ids = q->n_prompt_ids;
    const int32_t max_tokens = q->has_max_tokens ? q->max_tokens : DEFAULT_MAX_TOKENS;
    const int32_t resumed0 = q->has_resumed_tokens ? q->resumed_tokens : 0;
    const bool text_prompt = q->prompt && q->prompt[0];
    if (!text_prompt && !idvec_push(&base, q->prompt_ids, q->n_prompt_ids)) {
        reply_status(c, GRPC_STATUS_INTERNAL, "out of memory");
        goto done;
    }
    const int64_t prompt_cost =
        text_prompt ? (int64_t)strlen(q->prompt) / 4 + 1 : (int64_t)q->n_prompt_ids;

    for (;;) {
        tsr_coord_lease lease;
        const int64_t cost = prompt_cost + (max_tokens - (int64_t)streamed.n);
        if (!pick(c, q->model, excl, n_excl, cost, &lease, last_fail[0] ? last_fail : NULL))
            goto done;
        /* Resuming: prompt ids + what was streamed, the budget left. */
        if (streamed.n > 0) {
            if ((text_prompt || q->n_messages > 0) && base.n == 0) {
                Tessera__V1__TokenizeRequest tq = TESSERA__V1__TOKENIZE_REQUEST__INIT;
                tq.text = orig_prompt;
                tq.n_messages = q->n_messages;
                tq.messages = q->messages;
                tq.has_add_special_tokens = true;
                tq.add_special_tokens = q->has_add_special_tokens ? q->add_special_tokens : true;
                tq.has_parse_special = true;
                tq.parse_special = true;
                tq.model = q->model;
                uint8_t *resp = NULL;
                size_t resp_len = 0;
                char det[512];
                int code = tsr_rpc_unary_auth(lease.channel, s->replica_authorization,
                                              "/tessera.v1.Inference/Tokenize", &tq.base,
                                              UNARY_TIMEOUT_MS, &resp, &resp_len, det, sizeof det);
                Tessera__V1__TokenizeResponse *tr =
                    code == 0 ? tessera__v1__tokenize_response__unpack(NULL, resp_len, resp) : NULL;
                free(resp);
                if (!tr) {
                    snprintf(last_fail, sizeof last_fail, "resuming on %s: Tokenize: %s; ",
                             lease.name, det);
                    if (n_excl < 64)
                        excl[n_excl++] = (tsr_coord_excl){.generation = lease.generation};
                    snprintf(excl[n_excl - 1].name, sizeof excl[0].name, "%s", lease.name);
                    tsr_coord_release(s->coord, &lease);
                    continue;
                }
                bool okp = idvec_push(&base, tr->ids, tr->n_ids);
                tessera__v1__tokenize_response__free_unpacked(tr, NULL);
                if (!okp) {
                    tsr_coord_release(s->coord, &lease);
                    reply_status(c, GRPC_STATUS_INTERNAL, "out of memory");
                    goto done;
                }
            }
            /* The last token streamed may have ended the request, its finish lost with the
             * replica: an end-of-generation token or a stop token id. */
            int lost = finished_by(q, lease.channel, s->replica_authorization,
                                   streamed.ids[streamed.n - 1]);
            if (lost >= 0) {
                obs_finish(&mr, finish_from_proto((Tessera__V1__FinishReason)lost), NULL,
                           (int32_t)streamed.n);
                tsr_coord_release(s->coord, &lease);
                send_lost_finish(c, q->request_id, (Tessera__V1__FinishReason)lost,
                                 (int32_t)streamed.n, failovers);
                goto done;
            }
            free(attempt_ids);
            attempt_ids = malloc((base.n + streamed.n) * sizeof *attempt_ids);
            if (!attempt_ids) {
                tsr_coord_release(s->coord, &lease);
                reply_status(c, GRPC_STATUS_INTERNAL, "out of memory");
                goto done;
            }
            if (base.n) memcpy(attempt_ids, base.ids, base.n * sizeof *attempt_ids);
            memcpy(attempt_ids + base.n, streamed.ids, streamed.n * sizeof *attempt_ids);
            q->prompt = NULL;
            q->n_messages = 0; /* the conversation is in the ids now */
            q->prompt_ids = attempt_ids;
            q->n_prompt_ids = base.n + streamed.n;
            q->has_resumed_tokens = true;
            q->resumed_tokens = resumed0 + (int32_t)streamed.n;
            q->has_max_tokens = true;
            q->max_tokens = max_tokens - (int32_t)streamed.n;
        }
        if (!up_start(c, lease.channel, "/tessera.v1.Inference/Generate", &q->base)) {
            char det[256];
            up_end(c, true, det, sizeof det);
            tsr_coord_release(s->coord, &lease);
            reply_status(c, GRPC_STATUS_INTERNAL, "cannot start a call to replica %s", lease.name);
            goto done;
        }
        /* Relay the stream. The final message (finish_reason) is held until the status. */
        Tessera__V1__GenerateResponse *final = NULL;
        up_event ev;
        bool client_gone = false;
        for (;;) {
            grpc_byte_buffer *bb;
            ev = up_next(c, &lease, &bb);
            if (ev != UP_MSG) break;
            grpc_slice sl = tsr_grpc_read_all(bb);
            grpc_byte_buffer_destroy(bb);
            Tessera__V1__GenerateResponse *m = tessera__v1__generate_response__unpack(
                NULL, GRPC_SLICE_LENGTH(sl), GRPC_SLICE_START_PTR(sl));
            if (!m) {
                grpc_slice_unref(sl);
                ev = UP_END; /* a replica that speaks garbage: fail over */
                break;
            }
            if (m->n_token_ids && !t_first) t_first = tsr_now_ns();
            obs_tokens(mr, m->token_ids, m->n_token_ids);
            if (!idvec_push(&streamed, m->token_ids, m->n_token_ids)) {
                tessera__v1__generate_response__free_unpacked(m, NULL);
                grpc_slice_unref(sl);
                ev = UP_STOPPING;
                break;
            }
            tsr_coord_lease_cost(s->coord, &lease, prompt_cost + max_tokens - (int64_t)streamed.n);
            if (m->has_finish_reason) {
                final = m;
                grpc_slice_unref(sl);
                continue; /* the status follows */
            }
            tessera__v1__generate_response__free_unpacked(m, NULL);
            /* Forward as received (the request_id is ours, so it is already right). */
            bool sent = send_ops(c, tsr_grpc_bytes(GRPC_SLICE_START_PTR(sl), GRPC_SLICE_LENGTH(sl)),
                                 false, GRPC_STATUS_OK, NULL);
            grpc_slice_unref(sl);
            if (!sent) {
                client_gone = true;
                break;
            }
        }
        if (ev == UP_CLIENT_GONE) client_gone = true;
        char det[1024];
        const bool cancel = client_gone || ev == UP_REPLICA_DOWN || ev == UP_STOPPING;
        grpc_status_code code = up_end(c, cancel, det, sizeof det);
        if (client_gone) {
            if (final) tessera__v1__generate_response__free_unpacked(final, NULL);
            tsr_coord_release(s->coord, &lease);
            goto done;
        }
        if (ev == UP_STOPPING) {
            if (final) tessera__v1__generate_response__free_unpacked(final, NULL);
            tsr_coord_release(s->coord, &lease);
            reply_status(c, GRPC_STATUS_UNAVAILABLE, "the coordinator is shutting down");
            goto done;
        }
        if (final && ev == UP_END && code == GRPC_STATUS_OK) {
            /* Done: the usage says how many failovers; timings are the client's view. */
            Tessera__V1__Usage u = TESSERA__V1__USAGE__INIT;
            if (!final->usage) final->usage = &u;
            final->usage->has_failovers = true;
            final->usage->failovers = failovers;
            Tessera__V1__Timings tm = TESSERA__V1__TIMINGS__INIT;
            if (!final->timings) final->timings = &tm;
            const uint64_t t_end = tsr_now_ns();
            if (t_first) {
                final->timings->has_time_to_first_token_ms = true;
                final->timings->time_to_first_token_ms = (double)(t_first - t0) / 1e6;
                final->timings->has_decode_ms = true;
                final->timings->decode_ms = (double)(t_end - t_first) / 1e6;
            }
            grpc_byte_buffer *out = tsr_grpc_pack(&final->base);
            obs_finish(&mr, finish_from_proto(final->finish_reason), final, (int32_t)streamed.n);
            if (final->usage == &u) final->usage = NULL;
            if (final->timings == &tm) final->timings = NULL;
            tessera__v1__generate_response__free_unpacked(final, NULL);
            tsr_coord_release(s->coord, &lease);
            send_ops(c, out, true, GRPC_STATUS_OK, "");
            goto done;
        }
        if (final) tessera__v1__generate_response__free_unpacked(final, NULL);
        /* The replica ended the request without a finish. Whose fault? */
        if (ev == UP_END && code == GRPC_STATUS_DEADLINE_EXCEEDED && deadline_left_ms(c) <= 0) {
            tsr_coord_release(s->coord, &lease);
            reply_status(c, GRPC_STATUS_DEADLINE_EXCEEDED, "deadline exceeded");
            goto done;
        }
        if (ev == UP_END && code != GRPC_STATUS_OK && !replica_fault(code)) {
            /* The request's own error (bad parameter, unknown model): the client's. */
            tsr_coord_release(s->coord, &lease);
            reply_status(c, code, "%s", det);
            goto done;
        }
        if (ev == UP_END && code == GRPC_STATUS_RESOURCE_EXHAUSTED && streamed.n == 0) {
            /* That replica's queue is full: another one, unless all are. */
            snprintf(last_fail, sizeof last_fail, "every replica's queue is full; ");
            if (n_excl < 64) {
                excl[n_excl] = (tsr_coord_excl){.generation = lease.generation};
                snprintf(excl[n_excl].name, sizeof excl[0].name, "%s", lease.name);
                n_excl++;
            }
            tsr_coord_release(s->coord, &lease);
            char err[256];
            tsr_coord_lease probe;
            if (tsr_coord_pick(s->coord, q->model, excl, n_excl, 0, &probe, err, sizeof err) != 0) {
                reply_status(c, GRPC_STATUS_RESOURCE_EXHAUSTED,
                             "every replica of the model has a full queue (last: %s: %s); retry "
                             "later",
                             lease.name, det);
                goto done;
            }
            tsr_coord_release(s->coord, &probe);
            continue;
        }
        /* The replica failed under the request: fail over. */
        char why[256];
        snprintf(why, sizeof why, "%.200s", ev == UP_REPLICA_DOWN ? "the replica went down" : det);
        tsr_coord_report_failure(s->coord, &lease, why);
        snprintf(last_fail, sizeof last_fail, "replica %s failed (%s); ", lease.name, why);
        if (n_excl < 64) {
            excl[n_excl] = (tsr_coord_excl){.generation = lease.generation};
            snprintf(excl[n_excl].name, sizeof excl[0].name, "%s", lease.name);
            n_excl++;
        }
        fprintf(stderr,
                "tessera coordinator: request %s: replica %s failed after %zu tokens (%s); "
                "failing over\n",
                q->request_id, lease.name, streamed.n, why);
        tsr_coord_release(s->coord, &lease);
        failovers++;
        pthread_mutex_lock(&s->mu);
        s->n_failovers++;
        pthread_mutex_unlock(&s->mu);
        if ((int64_t)streamed.n >= max_tokens) {
            /* Every token is out; only the finish was lost: it ended by length. */
            obs_finish(&mr, TSR_FINISH_LENGTH, NULL, (int32_t)streamed.n);
            send_lost_finish(c, q->request_id, TESSERA__V1__FINISH_REASON__FINISH_REASON_LENGTH,
                             (int32_t)streamed.n, failovers);
            goto done;
        }
    }
done:
    if (mr) {
        /* No finish went out: refused before any token (counted by reason), the client
         * went away or ran out of time (cancelled), or it failed mid-stream (error). */
        const bool timeout = c->st_error && (c->st_code == GRPC_STATUS_DEADLINE_EXCEEDED ||
                                             c->st_code == GRPC_STATUS_CANCELLED);
        if (c->st_error && !timeout && streamed.n == 0) {
            tsr_metrics_req_rejected(mr, code_to_engine(c->st_code));
            mr = NULL;
        } else {
            obs_finish(&mr, c->st_error && !timeout ? TSR_FINISH_ERROR : TSR_FINISH_CANCELLED, NULL,
                       (int32_t)streamed.n);
        }
    }
    q->prompt = orig_prompt;
    q->n_messages = orig_n_messages;
    if (q->prompt_ids == attempt_ids) {
        q->prompt_ids = orig_ids;
        q->n_prompt_ids = orig_n_ids;
    }
    q->request_id = orig_rid;
    free(attempt_ids);
    free(base.ids);
    free(streamed.ids);
    tessera__v1__generate_request__free_unpacked(q, NULL);
    pthread_mutex_lock(&s->mu);
    s->n_generate--;
    pthread_mutex_unlock(&s->mu);
}

/* ---- Tokenize, ModelInfo: unary, to any replica of the model ---- */

static void proxy_unary(ccall *c, const char *method, const char *model,
                        const ProtobufCMessage *req)
{
    tsr_coord_excl excl[16];
    size_t n_excl = 0;
    char last[1024] = "";
    for (;;) {
        tsr_coord_lease lease;
        if (!pick(c, model, excl, n_excl, 0, &lease, last[0] ? last : NULL)) return;
        int64_t left = deadline_left_ms(c);
        uint8_t *resp = NULL;
        size_t resp_len = 0;
        char det[1024];
        int code = tsr_rpc_unary_auth(lease.channel, c->s->replica_authorization, method, req,
                                      left < UNARY_TIMEOUT_MS ? left : UNARY_TIMEOUT_MS, &resp,
                                      &resp_len, det, sizeof det);
        if (code == GRPC_STATUS_OK) {
            tsr_coord_release(c->s->coord, &lease);
            send_ops(c, tsr_grpc_bytes(resp, resp_len), true, GRPC_STATUS_OK, "");
            free(resp);
            return;
        }
        free(resp);
        if (!replica_fault((grpc_status_code)code) ||
            (code == GRPC_STATUS_DEADLINE_EXCEEDED && deadline_left_ms(c) <= 0)) {
            tsr_coord_release(c->s->coord, &lease);
            reply_status(c, (grpc_status_code)code, "%s", det);
            return;
        }
        snprintf(last, sizeof last, "replica %s failed (%.600s); ", lease.name, det);
        if (n_excl < 16) {
            excl[n_excl] = (tsr_coord_excl){.generation = lease.generation};
            snprintf(excl[n_excl].name, sizeof excl[0].name, "%s", lease.name);
            n_excl++;
        }
        tsr_coord_release(c->s->coord, &lease);
    }
}

static void handle_tokenize(ccall *c, grpc_slice in)
{
    Tessera__V1__TokenizeRequest *q = tessera__v1__tokenize_request__unpack(
        NULL, GRPC_SLICE_LENGTH(in), GRPC_SLICE_START_PTR(in));
    if (!q) {
        reply_status(c, GRPC_STATUS_INVALID_ARGUMENT, "malformed TokenizeRequest");
        return;
    }
    proxy_unary(c, "/tessera.v1.Inference/Tokenize", q->model, &q->base);
    tessera__v1__tokenize_request__free_unpacked(q, NULL);
}

static void handle_model_info(ccall *c, grpc_slice in)
{
    Tessera__V1__ModelInfoRequest *q = tessera__v1__model_info_request__unpack(
        NULL, GRPC_SLICE_LENGTH(in), GRPC_SLICE_START_PTR(in));
    if (!q) {
        reply_status(c, GRPC_STATUS_INVALID_ARGUMENT, "malformed ModelInfoRequest");
        return;
    }
    proxy_unary(c, "/tessera.v1.Inference/ModelInfo", q->model, &q->base);
    tessera__v1__model_info_request__free_unpacked(q, NULL);
}

/* ---- Health ---- */

static int health_of(tsr_coord_server *s, const char *service)
{
    if (!strcmp(service, "tessera.v1.Cluster") || !strcmp(service, "grpc.health.v1.Health"))
        return atomic_load(&s->stopping)
                   ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING
                   : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
    if (strcmp(service, "") != 0 && strcmp(service, "tessera.v1.Inference") != 0) return -1;
    char m[1][128];
    bool up = tsr_coord_models(s->coord, m, 1, true) > 0 && !atomic_load(&s->stopping);
    return up ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
              : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
}

static void handle_health(ccall *c, grpc_slice in, bool watch)
{
    Grpc__Health__V1__HealthCheckRequest *q = grpc__health__v1__health_check_request__unpack(
        NULL, GRPC_SLICE_LENGTH(in), GRPC_SLICE_START_PTR(in));
    if (!q) {
        reply_status(c, GRPC_STATUS_INVALID_ARGUMENT, "malformed HealthCheckRequest");
        return;
    }
    char service[256];
    snprintf(service, sizeof service, "%s", q->service ? q->service : "");
    grpc__health__v1__health_check_request__free_unpacked(q, NULL);
    int st = health_of(c->s, service);
    if (!watch) {
        if (st < 0) {
            reply_status(c, GRPC_STATUS_NOT_FOUND, "unknown service '%s'", service);
            return;
        }
        Grpc__Health__V1__HealthCheckResponse a = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
        a.status = st;
        reply_msg(c, &a.base);
        return;
    }
    int sent = -2;
    for (;;) {
        st = health_of(c->s, service);
        if (st < 0) st = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN;
        if (st != sent) {
            Grpc__Health__V1__HealthCheckResponse a = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
            a.status = st;
            if (!send_ops(c, tsr_grpc_pack(&a.base), false, GRPC_STATUS_OK, NULL)) return;
            sent = st;
        }
        if (wait_any(c, B_CLOSE, 200) & B_CLOSE) return;
        if (atomic_load(&c->s->stopping)) {
            reply_status(c, GRPC_STATUS_UNAVAILABLE, "the coordinator is shutting down");
            return;
        }
    }
}

/* ---- Cluster ---- */

static void fill_info(Tessera__V1__ReplicaInfo *a, const tsr_replica_info *r)
{
    a->name = (char *)r->name;
    a->address = (char *)r->address;
    a->model = (char *)r->model;
#define SETF(f, v)                                                                                 \
    do {                                                                                           \
        a->has_##f = true;                                                                         \
        a->f = (v);                                                                                \
    } while (0)
    SETF(tp, r->tp);
    SETF(pp, r->pp);
    SETF(state, (Tessera__V1__ReplicaState)r->state);
    SETF(requests_running, r->requests_running);
    SETF(requests_queued, r->requests_queued);
    SETF(kv_blocks_used, r->kv_blocks_used);
    SETF(kv_blocks_total, r->kv_blocks_total);
    SETF(tokens_per_second, r->tokens_per_second);
    SETF(last_heartbeat_ms_ago, r->last_heartbeat_ms_ago);
    SETF(outstanding, r->outstanding);
    SETF(outstanding_tokens, r->outstanding_tokens);
    SETF(launched, r->launched);
    SETF(restarts, r->restarts);
    SETF(requests_routed, r->requests_routed);
    SETF(max_queue, r->max_queue);
#undef SETF
    a->reason = (char *)r->reason;
}

static void handle_list(ccall *c)
{
    tsr_replica_info *list;
    size_t n;
    if (tsr_coord_list(c->s->coord, &list, &n) != 0) {
        reply_status(c, GRPC_STATUS_INTERNAL, "out of memory");
        return;
    }
    Tessera__V1__ReplicaInfo *infos = calloc(n ? n : 1, sizeof *infos);
    Tessera__V1__ReplicaInfo **ptrs = calloc(n ? n : 1, sizeof *ptrs);
    if (!infos || !ptrs) {
        free(infos);
        free(ptrs);
        free(list);
        reply_status(c, GRPC_STATUS_INTERNAL, "out of memory");
        return;
    }
    for (size_t i = 0; i < n; i++) {
        tessera__v1__replica_info__init(&infos[i]);
        fill_info(&infos[i], &list[i]);
        ptrs[i] = &infos[i];
    }
    Tessera__V1__ListReplicasResponse a = TESSERA__V1__LIST_REPLICAS_RESPONSE__INIT;
    a.n_replicas = n;
    a.replicas = ptrs;
    reply_msg(c, &a.base);
    free(infos);
    free(ptrs);
    free(list);
}

static void handle_replica_op(ccall *c, grpc_slice in, int op)
{
    Tessera__V1__ReplicaRef *q =
        tessera__v1__replica_ref__unpack(NULL, GRPC_SLICE_LENGTH(in), GRPC_SLICE_START_PTR(in));
    if (!q) {
        reply_status(c, GRPC_STATUS_INVALID_ARGUMENT, "malformed ReplicaRef");
        return;
    }
    if (!q->name || !q->name[0]) {
        tessera__v1__replica_ref__free_unpacked(q, NULL);
        reply_status(c, GRPC_STATUS_INVALID_ARGUMENT, "name: which replica? (empty)");
        return;
    }
    tsr_replica_info info;
    char err[512];
    int rc = op == 2 ? tsr_coord_remove(c->s->coord, q->name, &info, err, sizeof err)
                     : tsr_coord_drain(c->s->coord, q->name, op == 0, &info, err, sizeof err);
    tessera__v1__replica_ref__free_unpacked(q, NULL);
    if (rc == TSR_COORD_ENOTFOUND) {
        reply_status(c, GRPC_STATUS_NOT_FOUND, "%s", err);
        return;
    }
    if (rc != 0) {
        reply_status(c, GRPC_STATUS_INTERNAL, "%s", err);
        return;
    }
    Tessera__V1__ReplicaInfo a = TESSERA__V1__REPLICA_INFO__INIT;
    fill_info(&a, &info);
    reply_msg(c, &a.base);
}

static void handle_cluster_status(ccall *c)
{
    tsr_coord_server *s = c->s;
    tsr_replica_info *list;
    size_t n;
    if (tsr_coord_list(s->coord, &list, &n) != 0) {
        reply_status(c, GRPC_STATUS_INTERNAL, "out of memory");
        return;
    }
    Tessera__V1__ClusterStatusResponse a = TESSERA__V1__CLUSTER_STATUS_RESPONSE__INIT;
    a.has_replicas = a.has_replicas_up = a.has_replicas_draining = a.has_replicas_down = true;
    a.replicas = (int32_t)n;
    double tps = 0;
    for (size_t i = 0; i < n; i++) {
        if (list[i].state == TSR_REPLICA_UP) {
            a.replicas_up++;
            tps += list[i].tokens_per_second;
        } else if (list[i].state == TSR_REPLICA_DRAINING) {
            a.replicas_draining++;
            tps += list[i].tokens_per_second;
        } else {
            a.replicas_down++;
        }
    }
    free(list);
    char models[64][128];
    char *mp[64];
    size_t nm = tsr_coord_models(s->coord, models, 64, true);
    if (nm > 64) nm = 64;
    for (size_t i = 0; i < nm; i++) mp[i] = models[i];
    a.n_models = nm;
    a.models = mp;
    pthread_mutex_lock(&s->mu);
    a.has_requests_active = a.has_requests_total = a.has_failovers = a.has_requests_failed = true;
    a.requests_active = s->n_generate;
    a.requests_total = s->n_requests;
    a.failovers = s->n_failovers;
    a.requests_failed = s->n_failed;
    pthread_mutex_unlock(&s->mu);
    a.has_uptime_s = a.has_tokens_per_second = true;
    a.uptime_s = (double)(tsr_now_ns() - s->t_start_ns) / 1e9;
    a.tokens_per_second = tps;
    reply_msg(c, &a.base);
}

static void handle_heartbeat(ccall *c, grpc_slice in)
{
    Tessera__V1__HeartbeatRequest *q = tessera__v1__heartbeat_request__unpack(
        NULL, GRPC_SLICE_LENGTH(in), GRPC_SLICE_START_PTR(in));
    if (!q) {
        reply_status(c, GRPC_STATUS_INVALID_ARGUMENT, "malformed HeartbeatRequest");
        return;
    }
    tsr_replica_info hb;
    memset(&hb, 0, sizeof hb);
    snprintf(hb.name, sizeof hb.name, "%s", q->name ? q->name : "");
    snprintf(hb.address, sizeof hb.address, "%s", q->address ? q->address : "");
    snprintf(hb.model, sizeof hb.model, "%s", q->model ? q->model : "");
    hb.tp = q->tp;
    hb.pp = q->pp;
    hb.requests_running = q->requests_running;
    hb.requests_queued = q->requests_queued;
    hb.kv_blocks_used = q->kv_blocks_used;
    hb.kv_blocks_total = q->kv_blocks_total;
    hb.tokens_per_second = q->tokens_per_second;
    hb.healthy = q->has_healthy ? q->healthy : true;
    hb.draining = q->draining;
    hb.max_queue = q->max_queue;
    hb.context_length = q->context_length;
    hb.tls = q->has_tls && q->tls;
    tessera__v1__heartbeat_request__free_unpacked(q, NULL);
    bool removed = false;
    char err[512];
    int rc = tsr_coord_heartbeat(c->s->coord, &hb, &removed, err, sizeof err);
    if (rc == TSR_COORD_EEXIST) {
        reply_status(c, GRPC_STATUS_ALREADY_EXISTS, "%s", err);
        return;
    }
    if (rc == TSR_COORD_EINVAL) {
        reply_status(c, GRPC_STATUS_INVALID_ARGUMENT, "%s", err);
        return;
    }
    if (rc != 0) {
        reply_status(c, GRPC_STATUS_INTERNAL, "%s", err);
        return;
    }
    Tessera__V1__HeartbeatResponse a = TESSERA__V1__HEARTBEAT_RESPONSE__INIT;
    a.has_heartbeat_interval_ms = a.has_removed = true;
    a.heartbeat_interval_ms = 500;
    a.removed = removed;
    reply_msg(c, &a.base);
}

/* ---- per-call thread ---- */

static void call_free(ccall *c)
{
    free_st_slice(c);
    if (c->recv_bb) grpc_byte_buffer_destroy(c->recv_bb);
    grpc_call_details_destroy(&c->details);
    grpc_metadata_array_destroy(&c->md);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
    free(c);
}

/* Keys (auth.h) before the request is read: every method but Health needs one, Cluster
 * (ctl, heartbeats) an admin key. false: the client got UNAUTHENTICATED / PERMISSION_DENIED. */
static bool call_authorized(ccall *c)
{
    if (!tsr_auth_enabled(c->s->auth)) return true;
    if (grpc_slice_buf_start_eq(c->details.method, "/grpc.health.v1.Health/", 23)) return true;
    size_t len = 0;
    const char *val = tsr_grpc_md_get(&c->md, "authorization", &len);
    bool admin = grpc_slice_buf_start_eq(c->details.method, "/tessera.v1.Cluster/", 20);
    char why[512];
    tsr_auth_verdict v = tsr_auth_check(c->s->auth, val, len, admin, why, sizeof why);
    if (v == TSR_AUTH_ALLOW) return true;
    reply_status(
        c, v == TSR_AUTH_FORBIDDEN ? GRPC_STATUS_PERMISSION_DENIED : GRPC_STATUS_UNAUTHENTICATED,
        "%s", why);
    return false;
}

static void *call_main(void *arg)
{
    ccall *c = arg;
    tsr_coord_server *s = c->s;
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->cancelled;
    bool ok = start(c, B_CLOSE, &op, 1, c->call);
    if (ok && !call_authorized(c)) ok = false; /* answered: no request is read */
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->recv_bb;
    ok = ok && start(c, B_RECV, &op, 1, c->call);
    if (ok) {
        unsigned d = 0;
        while (!((d = wait_any(c, B_RECV | B_CLOSE, -1)) & (B_RECV | B_CLOSE))) {
        }
        if (d & B_RECV) {
            settle(c, B_RECV, 0);
            char *method = grpc_slice_to_c_string(c->details.method);
            if (!c->recv_bb) {
                reply_status(c, GRPC_STATUS_INVALID_ARGUMENT, "no request message");
            } else {
                grpc_slice in = tsr_grpc_read_all(c->recv_bb);
                if (!strcmp(method, "/tessera.v1.Inference/Generate"))
                    handle_generate(c, in);
                else if (!strcmp(method, "/tessera.v1.Inference/Tokenize"))
                    handle_tokenize(c, in);
                else if (!strcmp(method, "/tessera.v1.Inference/ModelInfo"))
                    handle_model_info(c, in);
                else if (!strcmp(method, "/grpc.health.v1.Health/Check"))
                    handle_health(c, in, false);
                else if (!strcmp(method, "/grpc.health.v1.Health/Watch"))
                    handle_health(c, in, true);
                else if (!strcmp(method, "/tessera.v1.Cluster/ListReplicas"))
                    handle_list(c);
                else if (!strcmp(method, "/tessera.v1.Cluster/DrainReplica"))
                    handle_replica_op(c, in, 0);
                else if (!strcmp(method, "/tessera.v1.Cluster/UndrainReplica"))
                    handle_replica_op(c, in, 1);
                else if (!strcmp(method, "/tessera.v1.Cluster/RemoveReplica"))
                    handle_replica_op(c, in, 2);
                else if (!strcmp(method, "/tessera.v1.Cluster/ClusterStatus"))
                    handle_cluster_status(c);
                else if (!strcmp(method, "/tessera.v1.Cluster/Heartbeat"))
                    handle_heartbeat(c, in);
                else
                    reply_status(c, GRPC_STATUS_UNIMPLEMENTED,
                                 "unknown method %s (the coordinator serves tessera.v1.Inference, "
                                 "tessera.v1.Cluster and grpc.health.v1.Health)",
                                 method);
                grpc_slice_unref(in);
            }
            gpr_free(method);
        }
    }
    /* Done with the call: make sure it ends, then wait for every batch. */
    if (!(done_bits(c) & B_CLOSE)) wait_any(c, B_CLOSE, 2000);
    if (!(done_bits(c) & B_CLOSE)) grpc_call_cancel(c->call, NULL);
    bool settled = settle(c, B_CLOSE | B_RECV | B_SEND, CLOSE_WAIT_MS);
    if (settled) {
        grpc_call_unref(c->call);
        call_free(c);
    } else {
        fprintf(stderr, "tessera coordinator: a call did not settle; leaking it\n");
    }
    pthread_mutex_lock(&s->mu);
    s->n_calls--;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ---- CQ thread ---- */

static ccall *call_new(tsr_coord_server *s)
{
    ccall *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->s = s;
    for (int i = 0; i < 6; i++) c->t[i] = (ctag){c, 1u << i};
    pthread_mutex_init(&c->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->cv, &ca);
    pthread_condattr_destroy(&ca);
    grpc_call_details_init(&c->details);
    grpc_metadata_array_init(&c->md);
    return c;
}

static void arm(tsr_coord_server *s)
{
    if (s->pending || atomic_load(&s->stopping)) return;
    ccall *c = call_new(s);
    if (!c) return; /* retried next tick */
    if (grpc_server_request_call(s->srv, &c->call, &c->details, &c->md, s->cq, s->cq,
                                 &s->new_tag) != GRPC_CALL_OK) {
        call_free(c);
        return;
    }
    s->pending = c;
}

static void *cq_main(void *arg)
{
    tsr_coord_server *s = arg;
    arm(s);
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(s->cq, tsr_grpc_in_ms(TICK_MS), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        if (ev.type == GRPC_OP_COMPLETE) {
            if (ev.tag == &s->new_tag) {
                ccall *c = s->pending;
                s->pending = NULL;
                if (ev.success && c && c->call) {
                    pthread_mutex_lock(&s->mu);
                    s->n_calls++;
                    pthread_mutex_unlock(&s->mu);
                    pthread_t th;
                    pthread_attr_t at;
                    pthread_attr_init(&at);
                    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
                    pthread_attr_setstacksize(&at, 512 * 1024);
                    if (pthread_create(&th, &at, call_main, c) != 0) {
                        fprintf(stderr, "tessera coordinator: cannot start a call thread\n");
                        grpc_call_cancel(c->call, NULL);
                        /* Nothing was started on it: release at once. */
                        grpc_call_unref(c->call);
                        call_free(c);
                        pthread_mutex_lock(&s->mu);
                        s->n_calls--;
                        pthread_mutex_unlock(&s->mu);
                    }
                    pthread_attr_destroy(&at);
                } else if (c) {
                    call_free(c);
                }
            } else if (ev.tag == &s->shutdown_tag) {
                pthread_mutex_lock(&s->mu);
                s->shutdown_seen = true;
                pthread_cond_broadcast(&s->cv);
                pthread_mutex_unlock(&s->mu);
            } else {
                tag_done(ev.tag, ev.success);
            }
        }
        arm(s);
    }
    pthread_mutex_lock(&s->mu);
    s->cq_done = true;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ---- start / shutdown ---- */

int tsr_coord_server_start(const tsr_coord_server_params *p, tsr_coord *coord,
                           tsr_coord_server **out, int *bound_port, char *err, size_t err_len)
{
    *out = NULL;
    const char *listen = p->listen ? p->listen : TSR_COORD_DEFAULT_LISTEN;
    tsr_coord_server *s = calloc(1, sizeof *s);
    if (!s) {
        tsr_set_err(err, err_len, "out of memory");
        return -1;
    }
    s->coord = coord;
    s->auth = p->auth;
    if (p->replica_authorization) {
        s->replica_authorization = strdup(p->replica_authorization);
        if (!s->replica_authorization) {
            free(s);
            tsr_set_err(err, err_len, "out of memory");
            return -1;
        }
        s->replica_md.key = grpc_slice_from_static_string("authorization");
        s->replica_md.value = grpc_slice_from_static_string(s->replica_authorization);
    }
    s->t_start_ns = tsr_now_ns();
    atomic_init(&s->next_id, 1);
    pthread_mutex_init(&s->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cv, &ca);
    pthread_condattr_destroy(&ca);
    grpc_init();
    grpc_arg args[1];
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)GRPC_ARG_ALLOW_REUSEPORT;
    args[0].value.integer = 0;
    grpc_channel_args ch_args = {.num_args = 1, .args = args};
    s->srv = grpc_server_create(&ch_args, NULL);
    s->cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(s->srv, s->cq, NULL);
    grpc_server_credentials *cr = tsr_tls_grpc_server_credentials(p->tls);
    int port = cr ? grpc_server_add_http2_port(s->srv, listen, cr) : 0;
    if (cr) grpc_server_credentials_release(cr);
    if (port == 0) {
        if (cr)
            tsr_set_err(err, err_len,
                        "cannot listen on '%s' (address in use, or not a valid HOST:PORT)", listen);
        else
            tsr_set_err(err, err_len, "cannot create the gRPC TLS credentials (--tls-cert)");
        free(s->replica_authorization);
        grpc_server_destroy(s->srv);
        grpc_completion_queue_shutdown(s->cq);
        while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
               GRPC_QUEUE_SHUTDOWN) {
        }
        grpc_completion_queue_destroy(s->cq);
        grpc_shutdown();
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
        free(s);
        return -1;
    }
    grpc_server_start(s->srv);
    if (pthread_create(&s->cq_thread, NULL, cq_main, s) != 0) {
        tsr_set_err(err, err_len, "cannot start the completion-queue thread");
        grpc_server_shutdown_and_notify(s->srv, s->cq, &s->shutdown_tag);
        grpc_server_cancel_all_calls(s->srv);
        for (;;) {
            grpc_event ev = grpc_completion_queue_next(s->cq, tsr_grpc_in_ms(1000), NULL);
            if (ev.type == GRPC_OP_COMPLETE && ev.tag == &s->shutdown_tag) break;
            if (ev.type == GRPC_QUEUE_TIMEOUT) break;
        }
        grpc_server_destroy(s->srv);
        grpc_completion_queue_shutdown(s->cq);
        while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
               GRPC_QUEUE_SHUTDOWN) {
        }
        grpc_completion_queue_destroy(s->cq);
        grpc_shutdown();
        free(s->replica_authorization);
        free(s);
        return -1;
    }
    *bound_port = port;
    *out = s;
    return 0;
}

int tsr_coord_server_shutdown(tsr_coord_server *s, int64_t grace_ms, char *err, size_t err_len)
{
    atomic_store(&s->stopping, true);
    grpc_server_shutdown_and_notify(s->srv, s->cq, &s->shutdown_tag);
    /* Open streams get the grace period; then every call is cancelled. */
    struct timespec ts = tsr_grpc_abstime_in_ms(CLOCK_MONOTONIC, grace_ms);
    pthread_mutex_lock(&s->mu);
    while (s->n_generate > 0 && pthread_cond_timedwait(&s->cv, &s->mu, &ts) != ETIMEDOUT) {
    }
    pthread_mutex_unlock(&s->mu);
    atomic_store(&s->cancel_all, true);
    grpc_server_cancel_all_calls(s->srv);
    ts = tsr_grpc_abstime_in_ms(CLOCK_MONOTONIC, CLOSE_WAIT_MS + 5000);
    pthread_mutex_lock(&s->mu);
    bool timed_out = false;
    while ((s->n_calls > 0 || !s->shutdown_seen) && !timed_out)
        timed_out = pthread_cond_timedwait(&s->cv, &s->mu, &ts) == ETIMEDOUT;
    pthread_mutex_unlock(&s->mu);
    if (timed_out) {
        tsr_set_err(err, err_len, "shutdown: %d calls still open after the grace period",
                    (int)s->n_calls);
        return -1;
    }
    /* The pending request_call comes back failed once the server is shut. */
    grpc_server_destroy(s->srv);
    grpc_completion_queue_shutdown(s->cq);
    pthread_join(s->cq_thread, NULL);
    if (s->pending) call_free(s->pending);
    grpc_completion_queue_destroy(s->cq);
    grpc_shutdown();
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s->replica_authorization);
    free(s);
    return 0;
}

/* ---- the HTTP front door's backend (coordinator --http) ----
 *
 * An HTTP request runs handle_generate on a thread of its own with a ccall that has no
 * gRPC call: its replies (send_ops) go to the sink, which turns each GenerateResponse into
 * the engine events the front door consumes (http.h), and the front door's cancel sets
 * the call's B_CLOSE bit, as a client that went away does. submit waits for the first
 * reply, so a request refused before any token (unknown model, bad parameter, every queue
 * full, no replica) gets its HTTP status rather than a stream that fails. */

typedef struct hsink {
    tsr_coord_server *s;
    ccall *c;
    uint64_t id;
    tsr_event_fn fn;
    void *ud;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs;      /* the submitter's and the thread's */
    bool first;    /* a reply came (submit may return) */
    int submit_rc; /* refused before any token: the TSR_ENGINE_* code */
    char submit_err[512];
    bool finished; /* FINISH delivered */
    bool cancelled;
    int32_t n_top;      /* logprobs asked: alternatives per token (0: none) */
    grpc_slice in;      /* the packed GenerateRequest */
    struct hsink *next; /* s->sinks, under s->mu */
} hsink;

static void sink_unref(hsink *k)
{
    pthread_mutex_lock(&k->mu);
    bool last = --k->refs == 0;
    pthread_mutex_unlock(&k->mu);
    if (!last) return;
    pthread_mutex_destroy(&k->mu);
    pthread_cond_destroy(&k->cv);
    grpc_slice_unref(k->in);
    free(k);
}

static int code_to_engine(grpc_status_code code)
{
    switch (code) {
    case GRPC_STATUS_INVALID_ARGUMENT:
    case GRPC_STATUS_FAILED_PRECONDITION:
    case GRPC_STATUS_OUT_OF_RANGE:
        return TSR_ENGINE_EINVAL;
    case GRPC_STATUS_NOT_FOUND:
        return TSR_HTTP_BACKEND_ENOMODEL;
    case GRPC_STATUS_RESOURCE_EXHAUSTED:
        return TSR_ENGINE_EQUEUE_FULL;
    default:
        return TSR_ENGINE_EDOWN;
    }
}

static int finish_from_proto(Tessera__V1__FinishReason r)
{
    switch (r) {
    case TESSERA__V1__FINISH_REASON__FINISH_REASON_LENGTH:
        return TSR_FINISH_LENGTH;
    case TESSERA__V1__FINISH_REASON__FINISH_REASON_STOP:
        return TSR_FINISH_STOP;
    case TESSERA__V1__FINISH_REASON__FINISH_REASON_EOS:
        return TSR_FINISH_EOS;
    case TESSERA__V1__FINISH_REASON__FINISH_REASON_CANCELLED:
        return TSR_FINISH_CANCELLED;
    default:
        return TSR_FINISH_ERROR;
    }
}

/* A GenerateResponse's logprobs as the engine event's arrays (n ids × k alternatives, the
 * token text the replica sent with them). Pointers into m: valid while m is. */
typedef struct {
    float *chosen;
    tsr_logprob *top;
    tsr_token_piece *chosen_pieces, *top_pieces;
} sink_logprobs;

static void sink_logprobs_free(sink_logprobs *lp)
{
    free(lp->chosen);
    free(lp->top);
    free(lp->chosen_pieces);
    free(lp->top_pieces);
    memset(lp, 0, sizeof *lp);
}

/* Fill lp from m (k alternatives per token); false on out of memory (lp empty). */
static bool sink_logprobs_fill(sink_logprobs *lp, const Tessera__V1__GenerateResponse *m, int32_t k)
{
    const size_t n = m->n_token_ids, kk = (size_t)k;
    lp->chosen = malloc((n + 1) * sizeof *lp->chosen);
    lp->top = malloc((n * kk + 1) * sizeof *lp->top);
    lp->chosen_pieces = calloc(n + 1, sizeof *lp->chosen_pieces);
    lp->top_pieces = calloc(n * kk + 1, sizeof *lp->top_pieces);
    if (!lp->chosen || !lp->top || !lp->chosen_pieces || !lp->top_pieces) {
        sink_logprobs_free(lp);
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        const Tessera__V1__Logprobs *l = i < m->n_logprobs ? m->logprobs[i] : NULL;
        lp->chosen[i] = l && l->has_logprob ? l->logprob : NAN;
        if (l && l->has_token)
            lp->chosen_pieces[i] = (tsr_token_piece){(const char *)l->token.data, l->token.len};
        for (size_t j = 0; j < kk; j++) {
            const Tessera__V1__TokenLogprob *t = l && j < l->n_top ? l->top[j] : NULL;
            lp->top[i * kk + j] =
                (tsr_logprob){t && t->has_id ? t->id : -1, t && t->has_logprob ? t->logprob : NAN};
            if (t && t->has_token)
                lp->top_pieces[i * kk + j] =
                    (tsr_token_piece){(const char *)t->token.data, t->token.len};
        }
    }
    return true;
}

/* One reply of handle_generate: a message (TOKENS, and FINISH when it is the last) and/or
 * a status. Runs on the request's thread; the front door's callback only copies. */
static bool sink_deliver(ccall *c, grpc_byte_buffer *msg, bool with_status, grpc_status_code code,
                         const char *details)
{
    hsink *k = c->sink;
    bool gone = done_bits(c) & B_CLOSE;
    Tessera__V1__GenerateResponse *m = NULL;
    if (msg) {
        grpc_slice sl = tsr_grpc_read_all(msg);
        grpc_byte_buffer_destroy(msg);
        m = tessera__v1__generate_response__unpack(NULL, GRPC_SLICE_LENGTH(sl),
                                                   GRPC_SLICE_START_PTR(sl));
        grpc_slice_unref(sl);
    }
    pthread_mutex_lock(&k->mu);
    bool first = k->first, finished = k->finished;
    if (!first && with_status && code != GRPC_STATUS_OK && !m) {
        /* Refused before any token: submit reports it; no event follows. */
        k->submit_rc = code_to_engine(code);
        snprintf(k->submit_err, sizeof k->submit_err, "%s", details ? details : "");
        k->finished = true;
        finished = true;
    }
    k->first = true;
    pthread_cond_broadcast(&k->cv);
    pthread_mutex_unlock(&k->mu);
    if (finished) {
        if (m) tessera__v1__generate_response__free_unpacked(m, NULL);
        return false;
    }
    if (m && (m->n_token_ids || (m->text && m->text[0]))) {
        tsr_event ev;
        memset(&ev, 0, sizeof ev);
        ev.kind = TSR_EV_TOKENS;
        ev.request_id = k->id;
        ev.ids = m->token_ids;
        ev.n_ids = m->n_token_ids;
        ev.text = m->text ? m->text : "";
        ev.text_len = m->text ? strlen(m->text) : 0;
        sink_logprobs lp = {0};
        if (k->n_top > 0 && m->n_logprobs > 0 && sink_logprobs_fill(&lp, m, k->n_top)) {
            ev.chosen_logprobs = lp.chosen;
            ev.top_logprobs = lp.top;
            ev.n_top = k->n_top;
            ev.chosen_pieces = lp.chosen_pieces;
            ev.top_pieces = lp.top_pieces;
        }
        k->fn(k->ud, &ev); /* on OOM above: the event without logprobs (NaN, no text) */
        sink_logprobs_free(&lp);
    }
    bool end = with_status || (m && m->has_finish_reason);
    if (end) {
        tsr_event ev;
        memset(&ev, 0, sizeof ev);
        ev.kind = TSR_EV_FINISH;
        ev.request_id = k->id;
        char why[600];
        if (m && m->has_finish_reason && (!with_status || code == GRPC_STATUS_OK)) {
            ev.finish_reason = finish_from_proto(m->finish_reason);
        } else if (k->cancelled || gone) {
            ev.finish_reason = TSR_FINISH_CANCELLED;
        } else {
            ev.finish_reason = TSR_FINISH_ERROR;
            snprintf(why, sizeof why, "%s: %s", tsr_rpc_code_name((int)code),
                     details && details[0] ? details : "the request failed");
            ev.error = why;
        }
        if (m && m->usage) {
            ev.n_prompt_tokens = m->usage->prompt_tokens;
            ev.n_completion_tokens = m->usage->completion_tokens;
        }
        pthread_mutex_lock(&k->mu);
        k->finished = true;
        pthread_mutex_unlock(&k->mu);
        k->fn(k->ud, &ev); /* the last event: k->ud may be freed by it */
    }
    if (m) tessera__v1__generate_response__free_unpacked(m, NULL);
    return !gone;
}

static void *http_call_main(void *arg)
{
    hsink *k = arg;
    ccall *c = k->c;
    tsr_coord_server *s = k->s;
    handle_generate(c, k->in);
    /* Ended without a status (the front door cancelled, the coordinator is stopping). */
    pthread_mutex_lock(&k->mu);
    bool first = k->first, finished = k->finished;
    if (!first) {
        k->submit_rc = TSR_ENGINE_EDOWN;
        snprintf(k->submit_err, sizeof k->submit_err, "the coordinator is shutting down");
        k->first = finished = k->finished = true;
        pthread_cond_broadcast(&k->cv);
    }
    pthread_mutex_unlock(&k->mu);
    if (!finished) {
        tsr_event ev;
        memset(&ev, 0, sizeof ev);
        ev.kind = TSR_EV_FINISH;
        ev.request_id = k->id;
        ev.finish_reason = TSR_FINISH_CANCELLED;
        pthread_mutex_lock(&k->mu);
        k->finished = true;
        pthread_mutex_unlock(&k->mu);
        k->fn(k->ud, &ev);
    }
    pthread_mutex_lock(&s->mu);
    for (hsink **pp = &s->sinks; *pp; pp = &(*pp)->next) {
        if (*pp == k) {
            *pp = k->next;
            break;
        }
    }
    s->n_calls--;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    call_free(c);
    sink_unref(k);
    return NULL;
}

typedef struct {
    tsr_coord_server *s;
    const tsr_http_gen *g;
} http_submit_ctx;

/* Submit (through the metrics observer): the GenerateRequest the front door's fields make,
 * on a thread of its own; wait for its first reply. */
static int http_submit_raw(void *ctx, const tsr_engine_request *rq, uint64_t *id, char *err,
                           size_t err_len)
{
    http_submit_ctx *x = ctx;
    tsr_coord_server *s = x->s;
    const tsr_http_gen *g = x->g;
    if (atomic_load(&s->stopping)) {
        tsr_set_err(err, err_len, "the coordinator is shutting down");
        return TSR_ENGINE_EDRAINING;
    }
    Tessera__V1__GenerateRequest q = TESSERA__V1__GENERATE_REQUEST__INIT;
    Tessera__V1__ChatMessage *msgs = NULL, **msgp = NULL;
    if (g->prompt_text) {
        q.prompt = (char *)g->prompt_text;
    } else if (g->n_messages) {
        msgs = calloc(g->n_messages, sizeof *msgs);
        msgp = calloc(g->n_messages, sizeof *msgp);
        if (!msgs || !msgp) {
            free(msgs);
            free(msgp);
            tsr_set_err(err, err_len, "out of memory");
            return TSR_ENGINE_ENOMEM;
        }
        for (size_t i = 0; i < g->n_messages; i++) {
            Tessera__V1__ChatMessage init = TESSERA__V1__CHAT_MESSAGE__INIT;
            msgs[i] = init;
            msgs[i].role = (char *)g->messages[i].role;
            msgs[i].content = (char *)g->messages[i].content;
            msgp[i] = &msgs[i];
        }
        q.n_messages = g->n_messages;
        q.messages = msgp;
    } else {
        q.prompt_ids = (int32_t *)rq->prompt_ids;
        q.n_prompt_ids = rq->n_prompt;
    }
    const tsr_sampling_params *sp = &rq->gen.sampling;
    q.has_max_tokens = q.has_temperature = q.has_top_p = q.has_top_k = q.has_min_p = true;
    q.has_repetition_penalty = q.has_presence_penalty = q.has_frequency_penalty = true;
    q.has_seed = q.has_ignore_eos = true;
    q.max_tokens = rq->gen.max_tokens;
    q.temperature = sp->temperature;
    q.top_p = sp->top_p;
    q.top_k = sp->top_k;
    q.min_p = sp->min_p;
    q.repetition_penalty = sp->repetition_penalty;
    q.presence_penalty = sp->presence_penalty;
    q.frequency_penalty = sp->frequency_penalty;
    q.seed = sp->seed;
    q.ignore_eos = rq->gen.ignore_eos;
    q.n_stop = rq->gen.n_stop;
    q.stop = (char **)rq->gen.stop;
    q.n_stop_token_ids = rq->gen.n_stop_ids;
    q.stop_token_ids = (int32_t *)rq->gen.stop_ids;
    q.model = (char *)(g->model ? g->model : "");
    if (rq->logprobs > 0) {
        q.has_logprobs = true;
        q.logprobs = rq->logprobs;
    }
    size_t n = protobuf_c_message_get_packed_size(&q.base);
    grpc_slice in = grpc_slice_malloc(n);
    protobuf_c_message_pack(&q.base, GRPC_SLICE_START_PTR(in));
    free(msgs);
    free(msgp);

    hsink *k = calloc(1, sizeof *k);
    ccall *c = k ? call_new(s) : NULL;
    if (!k || !c) {
        free(k);
        grpc_slice_unref(in);
        tsr_set_err(err, err_len, "out of memory");
        return TSR_ENGINE_ENOMEM;
    }
    k->s = s;
    k->c = c;
    k->fn = rq->on_event;
    k->ud = rq->ud;
    k->in = in;
    k->n_top = rq->logprobs;
    k->refs = 2;
    k->id = atomic_fetch_add(&s->next_id, 1);
    pthread_mutex_init(&k->mu, NULL);
    pthread_cond_init(&k->cv, NULL);
    c->sink = k;
    /* The client's deadline (engine: CLOCK_MONOTONIC ns) as the replica calls' deadline. */
    if (rq->deadline_ns > 0) {
        int64_t left_ms = (rq->deadline_ns - (int64_t)tsr_now_ns()) / 1000000;
        c->details.deadline = tsr_grpc_in_ms(left_ms > 0 ? left_ms : 1);
    } else {
        c->details.deadline = gpr_inf_future(GPR_CLOCK_MONOTONIC);
    }
    pthread_mutex_lock(&s->mu);
    s->n_calls++;
    k->next = s->sinks;
    s->sinks = k;
    pthread_mutex_unlock(&s->mu);
    *id = k->id;
    pthread_t th;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&at, 512 * 1024);
    if (pthread_create(&th, &at, http_call_main, k) != 0) {
        pthread_attr_destroy(&at);
        pthread_mutex_lock(&s->mu);
        s->sinks = k->next;
        s->n_calls--;
        pthread_mutex_unlock(&s->mu);
        call_free(c);
        k->refs = 1;
        sink_unref(k);
        tsr_set_err(err, err_len, "cannot start a request thread");
        return TSR_ENGINE_ENOMEM;
    }
    pthread_attr_destroy(&at);
    /* Bounded by the request's own path: pick waits at most NO_REPLICA_WAIT_MS for a
     * replica, replica calls carry the deadline, shutdown cancels everything. */
    pthread_mutex_lock(&k->mu);
    while (!k->first) pthread_cond_wait(&k->cv, &k->mu);
    int rc = k->submit_rc;
    if (rc != 0) tsr_set_err(err, err_len, "%s", k->submit_err);
    pthread_mutex_unlock(&k->mu);
    sink_unref(k);
    return rc;
}

static int http_submit(void *ctx, const tsr_http_gen *g, uint64_t *id, char *err, size_t err_len)
{
    http_submit_ctx x = {ctx, g};
    tsr_coord_server *s = ctx;
    return tsr_metrics_submit_with(s->metrics, http_submit_raw, &x, &g->er, id, err, err_len);
}

static void http_cancel(void *ctx, uint64_t id)
{
    tsr_coord_server *s = ctx;
    pthread_mutex_lock(&s->mu);
    for (hsink *k = s->sinks; k; k = k->next) {
        if (k->id == id) {
            k->cancelled = true;
            tag_done(&k->c->t[0], false); /* B_CLOSE: the client went away */
            break;
        }
    }
    pthread_mutex_unlock(&s->mu);
}

static int http_health(void *ctx)
{
    tsr_coord_server *s = ctx;
    if (atomic_load(&s->stopping)) return 1;
    return health_of(s, "") == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING ? 0
                                                                                                : 2;
}

static size_t http_models(void *ctx, char (*names)[128], size_t cap)
{
    tsr_coord_server *s = ctx;
    return tsr_coord_models(s->coord, names, cap, false);
}

static void label(FILE *f, const char *v)
{
    for (; *v; v++) {
        if (*v == '"' || *v == '\\')
            fprintf(f, "\\%c", *v);
        else if (*v == '\n')
            fputs("\\n", f);
        else
            fputc(*v, f);
    }
}

static int http_metrics(void *ctx, char **out, size_t *len)
{
    tsr_coord_server *s = ctx;
    char *reqs = NULL;
    size_t n_reqs = 0;
    if (tsr_metrics_render(s->metrics, NULL, &reqs, &n_reqs) != 0) return -1;
    tsr_replica_info *reps = NULL;
    size_t n = 0;
    if (tsr_coord_list(s->coord, &reps, &n) != 0) {
        free(reqs);
        return -1;
    }
    pthread_mutex_lock(&s->mu);
    uint64_t n_failovers = s->n_failovers, n_requests = s->n_requests, n_failed = s->n_failed;
    int32_t n_active = s->n_generate;
    pthread_mutex_unlock(&s->mu);
    char *buf = NULL;
    size_t blen = 0;
    FILE *f = open_memstream(&buf, &blen);
    if (!f) {
        free(reqs);
        free(reps);
        return -1;
    }
    fwrite(reqs, 1, n_reqs, f);
    free(reqs);
    fprintf(f,
            "# HELP tessera_failovers_total Requests moved to another replica after theirs "
            "failed (gRPC and HTTP).\n# TYPE tessera_failovers_total counter\n"
            "tessera_failovers_total %" PRIu64 "\n",
            n_failovers);
    fprintf(f,
            "# HELP tessera_coordinator_requests_total Generate requests the coordinator "
            "routed (gRPC and HTTP).\n# TYPE tessera_coordinator_requests_total counter\n"
            "tessera_coordinator_requests_total %" PRIu64 "\n",
            n_requests);
    fprintf(f,
            "# HELP tessera_coordinator_requests_failed_total Requests answered with an "
            "error status.\n# TYPE tessera_coordinator_requests_failed_total counter\n"
            "tessera_coordinator_requests_failed_total %" PRIu64 "\n",
            n_failed);
    fprintf(f,
            "# HELP tessera_coordinator_requests_active Generate requests in flight.\n"
            "# TYPE tessera_coordinator_requests_active gauge\n"
            "tessera_coordinator_requests_active %d\n",
            n_active);
    static const char *const states[] = {"up", "draining", "down", "starting"};
    static const struct {
        const char *name, *type, *help;
    } fam[] = {
        {"tessera_replica_state", "gauge",
         "1 for the replica's state (up, draining, down, starting), 0 for the others."},
        {"tessera_replica_outstanding_requests", "gauge",
         "Requests the coordinator has on the replica now."},
        {"tessera_replica_requests_running", "gauge", "Running requests the replica reports."},
        {"tessera_replica_requests_queued", "gauge", "Queued requests the replica reports."},
        {"tessera_replica_kv_blocks_used", "gauge", "KV blocks in use the replica reports."},
        {"tessera_replica_tokens_per_second", "gauge", "Generated tokens/s the replica reports."},
        {"tessera_replica_requests_routed_total", "counter",
         "Requests the coordinator routed to the replica."},
    };
    for (size_t k = 0; k < sizeof fam / sizeof *fam; k++) {
        fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", fam[k].name, fam[k].help, fam[k].name,
                fam[k].type);
        for (size_t i = 0; i < n; i++) {
            const tsr_replica_info *r = &reps[i];
            for (int st = 0; st < (k == 0 ? 4 : 1); st++) {
                fprintf(f, "%s{replica=\"", fam[k].name);
                label(f, r->name);
                fputs("\",model=\"", f);
                label(f, r->model);
                if (k == 0) fprintf(f, "\",state=\"%s", states[st]);
                fputs("\"} ", f);
                switch (k) {
                case 0:
                    fprintf(f, "%d\n", (int)r->state == st + 1 ? 1 : 0);
                    break;
                case 1:
                    fprintf(f, "%d\n", r->outstanding);
                    break;
                case 2:
                    fprintf(f, "%d\n", r->requests_running);
                    break;
                case 3:
                    fprintf(f, "%d\n", r->requests_queued);
                    break;
                case 4:
                    fprintf(f, "%d\n", r->kv_blocks_used);
                    break;
                case 5:
                    fprintf(f, "%.17g\n", r->tokens_per_second);
                    break;
                default:
                    fprintf(f, "%" PRIu64 "\n", r->requests_routed);
                    break;
                }
            }
        }
    }
    free(reps);
    if (fclose(f) != 0 || !buf) {
        free(buf);
        return -1;
    }
    *out = buf;
    *len = blen;
    return 0;
}

void tsr_coord_server_http_backend(tsr_coord_server *s, tsr_metrics *m, tsr_http_backend *out)
{
    pthread_mutex_lock(&s->mu); /* gRPC calls may already read it */
    s->metrics = m;
    pthread_mutex_unlock(&s->mu);
    memset(out, 0, sizeof *out);
    out->ctx = s;
    out->vocab = NULL;
    out->submit = http_submit;
    out->cancel = http_cancel;
    out->health = http_health;
    out->models = http_models;
    out->metrics = http_metrics;
}
