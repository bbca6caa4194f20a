/*
 * genclient.c — asynchronous Generate calls on one completion queue (see genclient.h).
 *
 * One call = three batches on the client's queue, each with its own tag:
 *   A {SEND_INITIAL_METADATA (authorization), SEND_MESSAGE, SEND_CLOSE_FROM_CLIENT,
 *      RECV_INITIAL_METADATA}
 *   S {RECV_STATUS_ON_CLIENT}
 *   R {RECV_MESSAGE}, started again after each message until the stream ends.
 * The call counts its outstanding batches; when the last one is back (the status has
 * come and the receive loop has ended) on_done runs and the call is freed — only then may
 * gRPC's call be unreferenced (STACK.md §3). Messages are delivered in arrival order from
 * R's completions, so on_done always follows the last message.
 */
#include "coordinator/genclient.h"

#include "kernels/util.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { TAG_SEND = 0, TAG_STATUS = 1, TAG_RECV = 2 };

typedef struct {
    tsr_gencall *call;
    int kind;
} gtag;

struct tsr_gencall {
    tsr_genclient *gc;
    tsr_gencall *prev, *next; /* the client's list of running calls */
    grpc_call *call;
    gtag tags[3];
    int n_pending; /* batches started and not yet completed */
    grpc_byte_buffer *send_bb, *recv_bb;
    grpc_metadata md_auth;
    size_t n_md;
    grpc_metadata_array md_init, md_trail;
    grpc_status_code code;
    grpc_slice details;
    const char *error_string;
    bool cancelled;   /* by the caller: deliver no more messages */
    bool bad_message; /* a message did not unpack */
    tsr_genclient_msg_fn on_message;
    tsr_genclient_done_fn on_done;
    void *ud;
};

struct tsr_genclient {
    grpc_channel *ch;
    grpc_completion_queue *cq;
    char *auth_value; /* "Bearer KEY" or NULL */
    tsr_gencall *calls;
    size_t n_calls;
};

/* ---- the client ---- */

int tsr_genclient_new(const tsr_genclient_opts *o, tsr_genclient **out, char *err, size_t err_len)
{
    *out = NULL;
    tsr_genclient *gc = calloc(1, sizeof *gc);
    if (!gc || (o->authorization && !(gc->auth_value = strdup(o->authorization)))) {
        free(gc);
        tsr_set_err(err, err_len, "out of memory");
        return TSR_GENCLIENT_ENOMEM;
    }
    grpc_init();
    grpc_channel_credentials *cr = tsr_tls_grpc_channel_credentials(o->tls);
    /* Reconnect fast: a coordinator that comes back is reached within a second, not after
     * gRPC's default backoff of up to 2 minutes. The minimum backoff is also the deadline of
     * a connection attempt: TLS handshakes on a loaded machine need more than 100 ms (as
     * rpc.c). */
    grpc_arg args[3];
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)GRPC_ARG_MAX_RECONNECT_BACKOFF_MS;
    args[0].value.integer = 1000;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = (char *)GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS;
    args[1].value.integer = 100;
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = (char *)GRPC_ARG_MIN_RECONNECT_BACKOFF_MS;
    args[2].value.integer = tsr_tls_client_enabled(o->tls) ? 5000 : 100;
    grpc_channel_args ca_args = {.num_args = 3, .args = args};
    gc->ch = cr ? grpc_channel_create(o->target, cr, &ca_args) : NULL;
    if (cr) grpc_channel_credentials_release(cr);
    gc->cq = grpc_completion_queue_create_for_next(NULL);
    if (!gc->ch || !gc->cq) {
        tsr_set_err(err, err_len, "cannot create a gRPC channel to %s", o->target);
        tsr_genclient_free(gc);
        return TSR_GENCLIENT_EINVAL;
    }
    *out = gc;
    return 0;
}

size_t tsr_genclient_n_calls(const tsr_genclient *gc)
{
    return gc ? gc->n_calls : 0;
}

void tsr_genclient_cancel(tsr_gencall *c)
{
    if (!c || c->cancelled) return;
    c->cancelled = true;
    grpc_call_cancel(c->call, NULL);
}

void tsr_genclient_cancel_all(tsr_genclient *gc)
{
    for (tsr_gencall *c = gc ? gc->calls : NULL; c; c = c->next) tsr_genclient_cancel(c);
}

void tsr_genclient_free(tsr_genclient *gc)
{
    if (!gc) return;
    if (gc->cq) {
        tsr_genclient_cancel_all(gc);
        /* Cancelled calls complete at once; the bound only guards a misbehaving core. */
        uint64_t until = tsr_now_ns() + 10ull * 1000000000ull;
        while (gc->n_calls > 0 && tsr_now_ns() < until) tsr_genclient_poll(gc, 100);
    }
    if (gc->ch) grpc_channel_destroy(gc->ch);
    if (gc->cq) {
        grpc_completion_queue_shutdown(gc->cq);
        while (grpc_completion_queue_next(gc->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
               GRPC_QUEUE_SHUTDOWN) {
        }
        grpc_completion_queue_destroy(gc->cq);
    }
    grpc_shutdown();
    free(gc->auth_value);
    free(gc);
}

/* ---- calls ---- */

static void call_free(tsr_gencall *c)
{
    if (c->send_bb) grpc_byte_buffer_destroy(c->send_bb);
    if (c->recv_bb) grpc_byte_buffer_destroy(c->recv_bb);
    if (c->n_md) {
        grpc_slice_unref(c->md_auth.key);
        grpc_slice_unref(c->md_auth.value);
    }
    grpc_metadata_array_destroy(&c->md_init);
    grpc_metadata_array_destroy(&c->md_trail);
    grpc_slice_unref(c->details);
    gpr_free((void *)c->error_string);
    if (c->call) grpc_call_unref(c->call);
    free(c);
}

static bool start_recv(tsr_gencall *c)
{
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->recv_bb;
    if (grpc_call_start_batch(c->call, &op, 1, &c->tags[TAG_RECV], NULL) != GRPC_CALL_OK)
        return false;
    c->n_pending++;
    return true;
}

int tsr_genclient_generate(tsr_genclient *gc, const Tessera__V1__GenerateRequest *req,
                           int64_t timeout_ms, tsr_genclient_msg_fn on_message,
                           tsr_genclient_done_fn on_done, void *ud, tsr_gencall **out, char *err,
                           size_t err_len)
{
    if (out) *out = NULL;
    tsr_gencall *c = calloc(1, sizeof *c);
    size_t n = tessera__v1__generate_request__get_packed_size(req);
    uint8_t *buf = malloc(n ? n : 1);
    if (!c || !buf) {
        free(c);
        free(buf);
        tsr_set_err(err, err_len, "out of memory");
        return TSR_GENCLIENT_ENOMEM;
    }
    tessera__v1__generate_request__pack(req, buf);
    grpc_slice s = grpc_slice_from_copied_buffer((const char *)buf, n);
    free(buf);
    c->send_bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    c->gc = gc;
    c->on_message = on_message;
    c->on_done = on_done;
    c->ud = ud;
    c->details = grpc_empty_slice();
    c->code = GRPC_STATUS_UNKNOWN;
    grpc_metadata_array_init(&c->md_init);
    grpc_metadata_array_init(&c->md_trail);
    for (int k = 0; k < 3; k++) c->tags[k] = (gtag){.call = c, .kind = k};
    if (gc->auth_value) {
        c->md_auth.key = grpc_slice_from_static_string("authorization");
        c->md_auth.value = grpc_slice_from_copied_string(gc->auth_value);
        c->n_md = 1;
    }
    gpr_timespec deadline =
        gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(timeout_ms, GPR_TIMESPAN));
    grpc_slice method = grpc_slice_from_static_string("/tessera.v1.Inference/Generate");
    c->call = grpc_channel_create_call(gc->ch, NULL, GRPC_PROPAGATE_DEFAULTS, gc->cq, method, NULL,
                                       deadline, NULL);
    grpc_slice_unref(method);
    if (!c->call) {
        call_free(c);
        tsr_set_err(err, err_len, "cannot create a gRPC call");
        return TSR_GENCLIENT_ECALL;
    }
    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = c->n_md;
    ops[0].data.send_initial_metadata.metadata = c->n_md ? &c->md_auth : NULL;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = c->send_bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &c->md_init;
    grpc_op st;
    memset(&st, 0, sizeof st);
    st.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    st.data.recv_status_on_client.trailing_metadata = &c->md_trail;
    st.data.recv_status_on_client.status = &c->code;
    st.data.recv_status_on_client.status_details = &c->details;
    st.data.recv_status_on_client.error_string = &c->error_string;
    if (grpc_call_start_batch(c->call, ops, 4, &c->tags[TAG_SEND], NULL) != GRPC_CALL_OK) {
        call_free(c);
        tsr_set_err(err, err_len, "cannot start the Generate call");
        return TSR_GENCLIENT_ECALL;
    }
    c->n_pending = 1;
    bool ok = grpc_call_start_batch(c->call, &st, 1, &c->tags[TAG_STATUS], NULL) == GRPC_CALL_OK;
    if (ok) c->n_pending++;
    if (ok) ok = start_recv(c);
    /* Linked in any case: the batches already started complete on the queue. */
    c->next = gc->calls;
    if (gc->calls) gc->calls->prev = c;
    gc->calls = c;
    gc->n_calls++;
    if (!ok) {
        /* Cannot happen with a fresh call; if it does, end it through the queue. */
        c->bad_message = true;
        grpc_call_cancel(c->call, NULL);
    }
    if (out) *out = c;
    return 0;
}

static void call_end(tsr_gencall *c)
{
    tsr_genclient *gc = c->gc;
    if (c->prev)
        c->prev->next = c->next;
    else
        gc->calls = c->next;
    if (c->next) c->next->prev = c->prev;
    gc->n_calls--;
    int code = (int)c->code;
    char msg[1024];
    char *d = grpc_slice_to_c_string(c->details);
    snprintf(msg, sizeof msg, "%s", d ? d : "");
    gpr_free(d);
    if (code == GRPC_STATUS_OK && c->bad_message) {
        code = GRPC_STATUS_INTERNAL;
        snprintf(msg, sizeof msg, "the server sent a message that is not a GenerateResponse");
    }
    if (c->cancelled && code == GRPC_STATUS_OK) code = GRPC_STATUS_CANCELLED;
    tsr_genclient_done_fn done = c->on_done;
    void *ud = c->ud;
    call_free(c);
    if (done) done(ud, code, msg);
}

static void on_completion(tsr_gencall *c, int kind, bool success)
{
    if (kind == TAG_RECV) {
        if (success && c->recv_bb) {
            grpc_byte_buffer_reader rd;
            Tessera__V1__GenerateResponse *m = NULL;
            if (grpc_byte_buffer_reader_init(&rd, c->recv_bb)) {
                grpc_slice all = grpc_byte_buffer_reader_readall(&rd);
                grpc_byte_buffer_reader_destroy(&rd);
                m = tessera__v1__generate_response__unpack(NULL, GRPC_SLICE_LENGTH(all),
                                                           GRPC_SLICE_START_PTR(all));
                grpc_slice_unref(all);
            }
            grpc_byte_buffer_destroy(c->recv_bb);
            c->recv_bb = NULL;
            if (!m) {
                c->bad_message = true;
                tsr_genclient_cancel(c);
            } else {
                if (!c->cancelled && c->on_message) c->on_message(c->ud, m);
                tessera__v1__generate_response__free_unpacked(m, NULL);
            }
            if (!c->cancelled && !start_recv(c)) tsr_genclient_cancel(c);
        }
        /* else: the stream ended (NULL message) or the call failed; the status says how. */
    }
    if (--c->n_pending == 0) call_end(c);
}

int tsr_genclient_poll(tsr_genclient *gc, int64_t timeout_ms)
{
    int n = 0;
    gpr_timespec until =
        gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(timeout_ms, GPR_TIMESPAN));
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(gc->cq, until, NULL);
        if (ev.type != GRPC_OP_COMPLETE) break;
        gtag *t = ev.tag;
        on_completion(t->call, t->kind, ev.success != 0);
        n++;
        /* Deliver whatever else is ready without waiting again. */
        until = gpr_inf_past(GPR_CLOCK_MONOTONIC);
    }
    return n;
}

bool tsr_genclient_code_transient(int code)
{
    return code == GRPC_STATUS_UNAVAILABLE || code == GRPC_STATUS_RESOURCE_EXHAUSTED ||
           code == GRPC_STATUS_DEADLINE_EXCEEDED || code == GRPC_STATUS_ABORTED ||
           code == GRPC_STATUS_CANCELLED;
}

/* ---- ModelInfo (blocking, its own pluck queue) ---- */

int tsr_genclient_model_info(tsr_genclient *gc, const char *model, int64_t timeout_ms,
                             Tessera__V1__ModelInfoResponse **out, char *details,
                             size_t details_len)
{
    *out = NULL;
    if (details_len) details[0] = '\0';
    Tessera__V1__ModelInfoRequest rq = TESSERA__V1__MODEL_INFO_REQUEST__INIT;
    rq.model = (char *)model;
    size_t n = tessera__v1__model_info_request__get_packed_size(&rq);
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf) {
        tsr_set_err(details, details_len, "out of memory");
        return GRPC_STATUS_INTERNAL;
    }
    tessera__v1__model_info_request__pack(&rq, buf);
    grpc_slice s = grpc_slice_from_copied_buffer((const char *)buf, n);
    free(buf);
    grpc_byte_buffer *send_bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    gpr_timespec deadline =
        gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(timeout_ms, GPR_TIMESPAN));
    grpc_slice method = grpc_slice_from_static_string("/tessera.v1.Inference/ModelInfo");
    grpc_call *call = grpc_channel_create_call(gc->ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method,
                                               NULL, deadline, NULL);
    grpc_slice_unref(method);
    grpc_metadata md;
    size_t n_md = 0;
    if (gc->auth_value) {
        md.key = grpc_slice_from_static_string("authorization");
        md.value = grpc_slice_from_copied_string(gc->auth_value);
        n_md = 1;
    }
    grpc_metadata_array md_init, md_trail;
    grpc_metadata_array_init(&md_init);
    grpc_metadata_array_init(&md_trail);
    grpc_byte_buffer *recv_bb = NULL;
    grpc_status_code code = GRPC_STATUS_UNKNOWN;
    grpc_slice st_details = grpc_empty_slice();
    const char *error_string = NULL;
    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = n_md;
    ops[0].data.send_initial_metadata.metadata = n_md ? &md : NULL;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send_bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &md_init;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recv_bb;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &md_trail;
    ops[5].data.recv_status_on_client.status = &code;
    ops[5].data.recv_status_on_client.status_details = &st_details;
    ops[5].data.recv_status_on_client.error_string = &error_string;
    int rc = GRPC_STATUS_INTERNAL;
    if (!call || grpc_call_start_batch(call, ops, 6, (void *)1, NULL) != GRPC_CALL_OK) {
        tsr_set_err(details, details_len, "cannot start the ModelInfo call");
    } else {
        /* The core ends the call at its deadline; the margin bounds a misbehaving core. */
        gpr_timespec until = gpr_time_add(deadline, gpr_time_from_millis(2000, GPR_TIMESPAN));
        if (grpc_completion_queue_pluck(cq, (void *)1, until, NULL).type != GRPC_OP_COMPLETE) {
            grpc_call_cancel(call, NULL);
            grpc_completion_queue_pluck(cq, (void *)1, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
            tsr_set_err(details, details_len, "ModelInfo: no answer past the deadline");
            rc = GRPC_STATUS_DEADLINE_EXCEEDED;
        } else if (code != GRPC_STATUS_OK) {
            char *d = grpc_slice_to_c_string(st_details);
            tsr_set_err(details, details_len, "%s", d ? d : "");
            gpr_free(d);
            rc = (int)code;
        } else if (recv_bb) {
            grpc_byte_buffer_reader rd;
            if (grpc_byte_buffer_reader_init(&rd, recv_bb)) {
                grpc_slice all = grpc_byte_buffer_reader_readall(&rd);
                grpc_byte_buffer_reader_destroy(&rd);
                *out = tessera__v1__model_info_response__unpack(NULL, GRPC_SLICE_LENGTH(all),
                                                                GRPC_SLICE_START_PTR(all));
                grpc_slice_unref(all);
            }
            if (*out)
                rc = GRPC_STATUS_OK;
            else
                tsr_set_err(details, details_len, "ModelInfo: malformed reply");
        } else {
            tsr_set_err(details, details_len, "ModelInfo answered OK without a message");
        }
    }
    if (recv_bb) grpc_byte_buffer_destroy(recv_bb);
    grpc_byte_buffer_destroy(send_bb);
    if (n_md) {
        grpc_slice_unref(md.key);
        grpc_slice_unref(md.value);
    }
    grpc_slice_unref(st_details);
    gpr_free((void *)error_string);
    grpc_metadata_array_destroy(&md_init);
    grpc_metadata_array_destroy(&md_trail);
    if (call) grpc_call_unref(call);
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(cq);
    return rc;
}
