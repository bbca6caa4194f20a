/*
 * server.h — the gRPC front of a replica leader: tessera.v1.Inference (Generate, Tokenize,
 * ModelInfo), tessera.v1.Admin (Status, Drain) and grpc.health.v1.Health (Check, Watch),
 * over the gRPC core C API with protobuf-c messages (proto/tessera.proto, proto/health.proto).
 *
 * Why this shape: the engine (coordinator/engine.h) owns scheduling and runs its step loop
 * on the MPI thread; the server only validates, tokenizes, submits and relays. It runs two
 * threads of its own:
 *   - the completion-queue thread: accepts calls, runs each call's state machine (receive
 *     the request, answer unary calls, submit Generate requests, react to client cancel /
 *     deadline by cancelling the engine request so its KV blocks are freed), and sends the
 *     next queued message when the previous send completes;
 *   - the pump thread: engine events arrive on the engine thread through a callback that
 *     only appends to the call's pending output (ids, text, logprobs, finish) and queues the
 *     call; the pump starts the send. Tokens that arrive while a send is in flight are
 *     merged into the next message, so a call never has more than one SEND_MESSAGE in flight
 *     (a gRPC core rule) and a slow client never stalls the engine.
 * Health.Watch streams are refreshed from the engine status on a 200 ms tick and on Drain.
 *
 * Errors are gRPC statuses with one-line messages naming what to fix: INVALID_ARGUMENT
 * (names the field: "temperature must be >= 0 ...", "prompt_ids[3]: ...", malformed
 * protobuf), RESOURCE_EXHAUSTED (queue full), UNAVAILABLE (draining, shutting down, data
 * plane failed), DEADLINE_EXCEEDED / CANCELLED (the client's; the engine request is
 * cancelled), UNIMPLEMENTED (unknown method), INTERNAL (out of memory).
 *
 * Status codes of this module: 0 ok, negative TSR_SERVER_E* with a message in err.
 */
#ifndef TSR_SERVER_H
#define TSR_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "coordinator/auth.h"
#include "coordinator/chat.h"
#include "coordinator/engine.h"
#include "coordinator/metrics.h"
#include "shard/vocab.h"

#define TSR_SERVER_OK       0
#define TSR_SERVER_EINVAL   -1 /* bad parameters (listen address, ...) */
#define TSR_SERVER_EBIND    -2 /* the address could not be bound (in use, bad host) */
#define TSR_SERVER_ENOMEM   -3
#define TSR_SERVER_ETHREAD  -4 /* a thread could not be started */
#define TSR_SERVER_ETIMEOUT -5 /* shutdown did not complete within its deadline */

#define TSR_SERVER_DEFAULT_LISTEN "127.0.0.1:50051"

/* What ModelInfo reports and what requests are validated against. Strings are copied. */
typedef struct {
    const char *architecture; /* "llama" */
    const char *name;         /* general.name, or NULL */
    const char *model;        /* the model name requests route by (GenerateRequest.model:
                                 another name is NOT_FOUND); NULL = "" (accept any) */
    int32_t n_ctx;            /* tokens per sequence (prompt + generated) */
    int32_t n_ctx_train;
    int32_t n_vocab;
    int32_t n_layer, n_embd, n_head, n_head_kv;
    int32_t tp, pp;
    int64_t kv_capacity_tokens; /* KV pool size in tokens (blocks x block size) */
    int32_t kv_block_tokens;
    int32_t max_batch_tokens;
    int32_t max_queue;
    /* The chat template of GenerateRequest.messages (borrowed: must outlive the server);
     * NULL: the model has none and messages are refused. */
    const tsr_chat_template *chat;
} tsr_server_model_info;

/*
 * Output held for clients that do not read. A message is handed to gRPC only when the
 * previous one was taken by the client's HTTP/2 flow control, so what a call holds is its
 * pending output (tokens, text, logprobs produced meanwhile) plus the one message in flight.
 * A call over max_call_buffered_bytes, the call holding the most when all calls together
 * exceed max_buffered_bytes, and a call whose client has not taken a message for
 * slow_reader_ms are cancelled with RESOURCE_EXHAUSTED (the message names the limit); the
 * engine request is cancelled with it, so its KV blocks and buffers are freed. The engine
 * never waits for a client.
 */
#define TSR_SERVER_DEFAULT_MAX_BUFFERED_BYTES      (64ll << 20)
#define TSR_SERVER_DEFAULT_MAX_CALL_BUFFERED_BYTES (1ll << 20)
#define TSR_SERVER_DEFAULT_SLOW_READER_MS          30000

typedef struct {
    const char *listen;              /* "host:port" (port 0: ephemeral); NULL = 127.0.0.1:50051 */
    int32_t max_message_bytes;       /* receive limit per message (0: gRPC's 4 MiB) */
    int64_t max_buffered_bytes;      /* all calls together (0: the default above) */
    int64_t max_call_buffered_bytes; /* one call (0: the default above) */
    int64_t slow_reader_ms;          /* (0: the default above) */
    /* Keys (borrowed, NULL: none): every call but Health needs the `authorization`
     * metadata "Bearer KEY" (UNAUTHENTICATED otherwise); Admin needs an admin key
     * (PERMISSION_DENIED for an inference key). */
    tsr_auth *auth;
    tsr_metrics *metrics; /* borrowed, NULL: requests are not observed */
    /* TLS when cert and key are set (PEM text); client_ca: mutual TLS, clients must
     * present a certificate signed by it. */
    const char *tls_cert_pem, *tls_key_pem, *tls_client_ca_pem;
} tsr_server_params;

typedef struct tsr_server tsr_server;

/*
 * Start serving: grpc_init, bind `listen` (SO_REUSEPORT off, so a port in use is an error,
 * never silently shared), start the threads. The engine and vocab are borrowed and must
 * outlive the server (tsr_server_shutdown before tsr_engine_free); `info` is copied. The
 * engine may or may not be running yet: requests queue in it until tsr_engine_run steps.
 * On success *out is the server and *bound_port the port actually bound. Returns 0, or
 * TSR_SERVER_EBIND / EINVAL / ENOMEM / ETHREAD with err (nothing is left running then).
 */
int tsr_server_start(const tsr_server_params *p, tsr_engine *engine, const tsr_vocab *vocab,
                     const tsr_server_model_info *info, tsr_server **out, int *bound_port,
                     char *err, size_t err_len);

/* Thread-safe: health turns NOT_SERVING for good (shutdown begun, or the data plane
 * failed); Watch streams are told within 200 ms. Calls keep being served until shutdown. */
void tsr_server_set_not_serving(tsr_server *s);

/*
 * Thread-safe, call once: stop accepting calls, give open calls up to grace_ms to send what
 * they have (engine events already delivered are flushed; call this after tsr_engine_run
 * returned so every Generate has its FINISH), then cancel the rest (Health.Watch streams,
 * stragglers), wait for every call to be released, destroy the server and grpc_shutdown.
 * Every wait is bounded: when calls are still held after grace_ms + 5 s (an engine request
 * that never finished), returns TSR_SERVER_ETIMEOUT and leaks the server rather than
 * freeing memory the gRPC core may still touch. 0 otherwise. s must not be used after.
 */
int tsr_server_shutdown(tsr_server *s, int64_t grace_ms, char *err, size_t err_len);

/* `tessera serve`: the subcommand (argv[0] is "serve"). Opens the replica on every rank
 * (followers serve steps), and on the leader runs the engine's step loop on the main thread
 * with this server in front, until SIGTERM / SIGINT: then health NOT_SERVING, drain for
 * --shutdown-grace, cancel the rest, shut the server and the replica down, exit 0.
 * Returns the process exit status: 0, 1 runtime error, 2 usage error. */
int tsr_cmd_serve(int argc, char **argv);

#endif
