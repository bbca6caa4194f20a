/*
 * genclient.h — an asynchronous client of tessera.v1.Inference/Generate (a replica's
 * `tessera serve` or a `tessera coordinator`): many streaming calls in flight on one
 * channel and one completion queue, driven by one thread, every call under a deadline.
 *
 * Why: `tessera batch --coordinator` keeps up to --concurrency (64 by default) streams in
 * flight; a thread per call would cost a stack and a blocking wait each, and the blocking
 * helpers of rpc.h take one call per completion queue. Here the caller's own loop calls
 * tsr_genclient_poll, which runs the queue and delivers each call's messages and its end
 * as callbacks on the caller's thread: no locks, no threads of our own (gRPC core keeps its
 * internal ones). Other clients of the cluster (load generators, a coordinator's proxy)
 * can reuse it.
 *
 * Security: the shared client material of tls.h (TLS with a CA, mutual TLS with a client
 * certificate) and auth.h's client header (an API key sent as the `authorization: Bearer
 * KEY` metadata of every call), as `tessera ctl` and `serve --join` use them.
 *
 * A call's life: tsr_genclient_generate starts it; on_message runs once per
 * GenerateResponse (token ids, text, logprobs; the last one has finish_reason and usage);
 * on_done runs exactly once, last, with the call's gRPC status (0 OK) — after it the call
 * handle is gone. tsr_genclient_cancel ends a call early (on_done then reports CANCELLED
 * and no more messages are delivered). A dead peer ends calls with UNAVAILABLE, a hung one
 * with DEADLINE_EXCEEDED at the deadline: a call never outlives its deadline.
 *
 * Threads: every function but tsr_genclient_new must be called from one thread at a time
 * (the one that polls); callbacks may start and cancel calls.
 */
#ifndef TSR_GENCLIENT_H
#define TSR_GENCLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "coordinator/tls.h"
#include "tessera.pb-c.h"

#define TSR_GENCLIENT_OK     0
#define TSR_GENCLIENT_EINVAL -1 /* a bad option or file (the message names it) */
#define TSR_GENCLIENT_ECALL  -2 /* gRPC refused to start the call */
#define TSR_GENCLIENT_ENOMEM -3

typedef struct {
    const char *target;        /* "host:port" of the server */
    const tsr_tls_client *tls; /* NULL or without a CA: plaintext (tls.h, borrowed) */
    const char *authorization; /* "Bearer KEY" (tsr_auth_client_header), NULL: none; copied */
} tsr_genclient_opts;

typedef struct tsr_genclient tsr_genclient;
typedef struct tsr_gencall tsr_gencall;

/* One message of the stream; msg is freed when the callback returns. */
typedef void (*tsr_genclient_msg_fn)(void *ud, const Tessera__V1__GenerateResponse *msg);
/* The call's end: code is the gRPC status (GRPC_STATUS_OK = 0, UNAVAILABLE = 14, ...),
 * details its message (never NULL; "" when none). */
typedef void (*tsr_genclient_done_fn)(void *ud, int code, const char *details);

/* Open a channel to o->target (no connection is made until the first call). */
int tsr_genclient_new(const tsr_genclient_opts *o, tsr_genclient **out, char *err, size_t err_len);
/* Cancels the calls still running (their on_done runs, with CANCELLED), waits for them
 * (bounded: cancelled calls end at once) and closes the channel. NULL-safe. */
void tsr_genclient_free(tsr_genclient *gc);

/* Start a Generate call that ends at the latest timeout_ms from now. On success *out (may
 * be NULL) is the call handle, valid until its on_done. Errors (nothing will be
 * delivered): TSR_GENCLIENT_ENOMEM, TSR_GENCLIENT_ECALL. */
int tsr_genclient_generate(tsr_genclient *gc, const Tessera__V1__GenerateRequest *req,
                           int64_t timeout_ms, tsr_genclient_msg_fn on_message,
                           tsr_genclient_done_fn on_done, void *ud, tsr_gencall **out, char *err,
                           size_t err_len);
/* Cancel a running call: no more on_message; on_done follows (CANCELLED) from a poll. */
void tsr_genclient_cancel(tsr_gencall *c);
/* Cancel every running call. */
void tsr_genclient_cancel_all(tsr_genclient *gc);

/* Wait up to timeout_ms for completions and deliver them (and whatever else is ready).
 * Returns the number of completions handled (0: the wait timed out). */
int tsr_genclient_poll(tsr_genclient *gc, int64_t timeout_ms);
/* Calls started and not yet ended (on_done not yet run). */
size_t tsr_genclient_n_calls(const tsr_genclient *gc);

/* Blocking ModelInfo (for `model`, may be NULL) under the same credentials. Returns the
 * gRPC status (0 OK: *out is set; free it with tessera__v1__model_info_response__free_unpacked)
 * or, on a local failure, GRPC_STATUS_INTERNAL with details. */
int tsr_genclient_model_info(tsr_genclient *gc, const char *model, int64_t timeout_ms,
                             Tessera__V1__ModelInfoResponse **out, char *details,
                             size_t details_len);

/* Transient statuses, worth a retry later: UNAVAILABLE (peer down or draining, no replica
 * left), RESOURCE_EXHAUSTED (queues full), DEADLINE_EXCEEDED, ABORTED and CANCELLED (a
 * server shutting down cancels its calls; a call the caller cancelled is not retried by
 * anyone). The rest (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, UNAUTHENTICATED,
 * PERMISSION_DENIED, INTERNAL, ...) would fail again: they are the request's answer. */
bool tsr_genclient_code_transient(int code);

#endif
