/*
 * http.h — the HTTP front door of a serving process: the OpenAI-compatible API on
 * libmicrohttpd (JSON by cJSON), over the engine seam (coordinator/engine.h), next to the
 * gRPC server and sharing its engine, keys (coordinator/auth.h) and metrics
 * (coordinator/metrics.h). Written for `tessera serve` and reusable by the coordinator
 * daemon: it only needs an engine, a vocabulary and the model's limits.
 *
 * Routes:
 *   POST /v1/completions       prompt (string, [string], token ids, [token ids]) -> text
 *   POST /v1/chat/completions  messages -> the model's chat template (coordinator/chat.h)
 *                              -> text (400 when the model has no template)
 *   GET  /v1/models            the one model served
 *   GET  /health               200 {"status":"ok"} while the data plane steps and the
 *                              server is not draining; 503 otherwise (no key needed)
 *   GET  /metrics              Prometheus text format 0.0.4 (admin key when keys are on)
 * Request fields: model, prompt / messages, max_tokens (chat: max_completion_tokens),
 * temperature, top_p, n (1 only), stop (string or list), seed, presence_penalty,
 * frequency_penalty, logprobs (completions: 0..20 alternatives; chat: bool with
 * top_logprobs 0..20), stream (Server-Sent Events: `data: {json}` chunks, `data: [DONE]`),
 * stream_options.include_usage, and the vLLM extensions top_k, min_p, repetition_penalty,
 * ignore_eos, stop_token_ids, return_token_ids (choices[].token_ids: the generated ids). Fields
 * this server cannot honour (n > 1, best_of > 1, echo, suffix, logit_bias, tools, response_format)
 * are refused, never silently ignored; other unknown fields are ignored as the OpenAI API does.
 *
 * Errors are OpenAI error bodies {"error": {"message", "type", "param", "code"}}:
 * 400 bad JSON or field (param names it), 401 missing / wrong key, 403 key without the
 * right (admin), 404 unknown route or model, 405 wrong method, 413 body over the limit,
 * 429 queue full, 503 draining / data plane down, 500 out of memory.
 *
 * Threads: one thread per connection (libmicrohttpd's THREAD_PER_CONNECTION), bounded by
 * connection_limit. A connection thread never waits without a deadline: waits for engine
 * output are 50 ms slices that also look at the socket, so a client that disconnects has
 * its engine request cancelled (and its KV blocks freed) within about 50 ms, whether it
 * was streaming or not. Idle streams get an SSE comment every 10 s (keeps proxies and the
 * connection timeout happy, and finds vanished clients). Request bodies are bounded by
 * max_body_bytes (413); a client that stops sending mid-body is dropped after
 * timeout_s of silence.
 *
 * Status codes of this module: 0 ok, negative TSR_HTTP_E* with a message in err.
 */
#ifndef TSR_HTTP_H
#define TSR_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "coordinator/auth.h"
#include "coordinator/chat.h"
#include "coordinator/engine.h"
#include "coordinator/metrics.h"
#include "shard/vocab.h"

#define TSR_HTTP_OK     0
#define TSR_HTTP_EINVAL -1 /* bad parameters (address, TLS material) */
#define TSR_HTTP_EBIND  -2 /* the address could not be bound */
#define TSR_HTTP_ENOMEM -3
#define TSR_HTTP_ESTART -4 /* libmicrohttpd refused to start (TLS key/cert mismatch, ...) */

#define TSR_HTTP_DEFAULT_MAX_BODY (4 << 20)

typedef struct {
    const char *listen;        /* "host:port" (port 0: ephemeral), "[::1]:port" */
    const char *model_id;      /* the name clients use in "model" (and /v1/models) */
    int32_t n_ctx;             /* tokens per sequence (prompt + generated) */
    int32_t max_queue;         /* for the 429 message */
    int64_t max_body_bytes;    /* 0: TSR_HTTP_DEFAULT_MAX_BODY */
    uint32_t connection_limit; /* 0: 256 */
    uint32_t timeout_s;        /* idle connection timeout (0: 60) */
    /* HTTPS when cert and key are set (PEM text, not paths); client_ca: mutual TLS (clients
     * must present a certificate signed by it). Copied. */
    const char *tls_cert_pem, *tls_key_pem, *tls_client_ca_pem;
    tsr_auth *auth;       /* borrowed, may be NULL (no keys) */
    tsr_metrics *metrics; /* borrowed, may be NULL */
    /* The chat template of /v1/chat/completions (borrowed, must outlive the server); NULL:
     * the model has none and chat requests answer 400 naming `messages`. */
    const tsr_chat_template *chat;
} tsr_http_params;

typedef struct tsr_http tsr_http;

/*
 * The backend seam: what runs the requests the front door parsed. One implementation is
 * the local engine (tsr_http_start: `tessera serve`), another the coordinator's proxy with
 * failover (coordinator/coord_server.h: `tessera coordinator --http`). The front door does
 * the HTTP, the OpenAI JSON, SSE, keys and the validation of every field; the backend
 * submits and emits engine events (engine.h: TOKENS..., then exactly one FINISH on another
 * thread, through g->er.on_event) and cancels.
 *
 * Prompt: with a vocabulary (vocab set) the front door tokenizes the prompt / renders the
 * chat template itself and g->er carries the ids. Without one (the coordinator has no
 * model) it passes the prompt through as the client sent it: exactly one of prompt_text,
 * g->er.prompt_ids (a list of ids, not checked against a vocabulary) or messages. Logprobs
 * then name their tokens with the text the events carry (tsr_event.chosen_pieces /
 * top_pieces: the replica's vocabulary, sent in the GenerateResponse).
 */
typedef struct {
    tsr_engine_request er; /* parameters, callback; prompt ids (see above) */
    const char *prompt_text;
    const tsr_chat_msg *messages;
    size_t n_messages;
    const char *model; /* the request's "model" (NULL: none given) */
} tsr_http_gen;

#define TSR_HTTP_BACKEND_ENOMODEL -100 /* submit: no such model (404 model_not_found) */

typedef struct {
    void *ctx;
    const tsr_vocab *vocab; /* NULL: prompts pass through (see above) */
    /* TSR_ENGINE_OK with *id, or TSR_ENGINE_E* / TSR_HTTP_BACKEND_ENOMODEL with err. On OK
     * exactly one FINISH follows. Observes metrics itself (metrics.h). */
    int (*submit)(void *ctx, const tsr_http_gen *g, uint64_t *id, char *err, size_t err_len);
    void (*cancel)(void *ctx, uint64_t id); /* thread-safe; unknown ids ignored */
    /* /health: 0 serving, 1 draining, 2 down */
    int (*health)(void *ctx);
    /* /v1/models: fills up to cap names (128 bytes each), returns how many there are.
     * NULL: the one model_id of the params. */
    size_t (*models)(void *ctx, char (*names)[128], size_t cap);
    /* /metrics: the exposition text (malloc'd), 0 or negative on out of memory. */
    int (*metrics)(void *ctx, char **out, size_t *len);
} tsr_http_backend;

/* Bind and start over the local engine. The engine and vocab are borrowed and must outlive
 * the server (tsr_http_shutdown before tsr_engine_free). *port is the port actually bound. */
int tsr_http_start(const tsr_http_params *p, tsr_engine *engine, const tsr_vocab *vocab,
                   tsr_http **out, int *port, char *err, size_t err_len);

/* Bind and start over another backend (copied; its ctx must outlive the server). */
int tsr_http_start_backend(const tsr_http_params *p, const tsr_http_backend *be, tsr_http **out,
                           int *port, char *err, size_t err_len);

/* Thread-safe: /health answers 503 from now on (shutdown begun, data plane failed). */
void tsr_http_set_not_serving(tsr_http *h);

/* Stop: close the listening socket and every connection, after open requests had up to
 * grace_ms to finish (call after the engine's step loop ended, so every request has its
 * FINISH). Bounded. s must not be used after. 0, or negative with err. */
int tsr_http_shutdown(tsr_http *h, int64_t grace_ms, char *err, size_t err_len);

#endif
