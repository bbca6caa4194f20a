/*
 * http.c — the OpenAI-compatible HTTP front door (see http.h for the contract).
 *
 * One request = one hreq, owned by two references: libmicrohttpd's (dropped in the
 * request-completed callback) and the engine's (taken at submit, dropped by the FINISH
 * event). The engine callback runs on the engine thread: it appends ids, text and
 * logprobs to the hreq under its mutex and signals its condition variable, nothing more.
 * The connection thread (thread per connection) either waits for FINISH and answers one
 * JSON body, or, streaming, returns Server-Sent Events from the response's content reader
 * as output arrives (tokens produced between two reads coalesce into one chunk).
 */
#include "coordinator/http.h"
#include "coordinator/evbuf.h"
#include "coordinator/grpcutil.h"
#include "kernels/util.h"

#include <cjson/cJSON.h>
#include <gnutls/gnutls.h>
#include <microhttpd.h>

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define WAIT_SLICE_MS      50
#define KEEPALIVE_NS       10000000000LL /* SSE comment after 10 s of silence */
#define STOP_EXTRA_NS      5000000000LL  /* after shutdown began: how long a wait may last */
#define MAX_STOP_STRINGS   64
#define MAX_STOP_BYTES     1024
#define MAX_LOGPROBS       20
#define DEFAULT_MAX_TOKENS 16
#define SSE_BLOCK          (16 * 1024)

struct tsr_http {
    struct MHD_Daemon *d;
    int listen_fd;
    tsr_http_backend be;
    tsr_engine *engine; /* the engine backend's (NULL for another backend) */
    const tsr_vocab *vocab;
    tsr_auth *auth;
    tsr_metrics *metrics;
    const tsr_chat_template *chat;
    char *model_id;
    int32_t n_ctx, max_queue;
    size_t max_piece;
    int64_t max_body;
    bool tls, mtls;
    char *cert, *key, *ca;
    int64_t created_s;
    atomic_bool not_serving;
    atomic_bool stopping;
    atomic_llong stop_ns; /* when shutdown began (tsr_now_ns) */
};

typedef enum { RT_UNKNOWN, RT_COMPLETIONS, RT_CHAT, RT_MODELS, RT_HEALTH, RT_METRICS } route;

typedef struct hreq {
    tsr_http *h;
    struct MHD_Connection *conn;
    route rt;
    bool responded; /* a response was queued */
    /* body */
    char *body;
    size_t body_len, body_cap;
    bool too_big;
    /* the request */
    bool chat, stream, include_usage;
    bool return_token_ids; /* vLLM extension: choices[].token_ids */
    bool want_logprobs;
    char id[48];
    char model[128]; /* the "model" of responses */
    int64_t created_s;

    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* --- under mu --- */
    int refs;
    bool engine_active, cancel_sent;
    uint64_t req_id;
    bool finished;
    int finish_reason;
    char *finish_error;
    int32_t n_prompt_tokens, n_completion_tokens;
    bool oom;
    /* pending output (streaming: since the last chunk; otherwise: everything);
     * pend.n_top: logprob alternatives asked, -1: no logprobs */
    tsr_evbuf pend;
    size_t text_offset; /* completions logprobs: bytes of text before the pending ones */
    /* SSE output (connection thread only) */
    char *out;
    size_t out_len, out_off, out_cap;
    bool sse_role_sent, sse_done;
    int64_t last_write_ns;
    int64_t next_check_ns; /* when to look at the client's socket next */
} hreq;

/* ---- small helpers ---- */

/* Copy s[0..n) as valid UTF-8 (ill-formed bytes -> U+FFFD) into a NUL-terminated buffer of
 * at least 3n+1 bytes. Token pieces can be parts of characters. */
static void utf8_sanitize(const char *s, size_t n, char *out)
{
    size_t o = 0;
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        unsigned c = u[i];
        size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        bool ok = len > 0 && i + len <= n && !(c >= 0xC0 && c < 0xC2) && c <= 0xF4;
        for (size_t k = 1; ok && k < len; k++) ok = (u[i + k] & 0xC0) == 0x80;
        if (ok) {
            memcpy(out + o, s + i, len);
            o += len;
            i += len;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    out[o] = '\0';
}

/* A token's text as a JSON-safe string (caller frees; NULL on OOM), and its raw bytes when
 * raw is set (caller frees). The text comes from the vocabulary when the front door has
 * one, else from the pending output's token text (b: what the replica sent through the
 * coordinator; span sp of b->pieces), else it is empty. */
static char *token_text(const tsr_vocab *v, int32_t id, const tsr_evbuf *b, tsr_evbuf_span sp,
                        unsigned char **raw, size_t *raw_len)
{
    char small[256];
    int32_t n = 0;
    char *piece = small;
    char *big = NULL;
    if (v) {
        n = tsr_vocab_token_to_piece(v, id, small, sizeof small, true);
        if (n < 0) n = 0;
        if ((size_t)n > sizeof small) {
            big = malloc((size_t)n);
            if (!big) return NULL;
            tsr_vocab_token_to_piece(v, id, big, (size_t)n, true);
            piece = big;
        }
    } else if (b->has_pieces) {
        piece = b->pieces + sp.off;
        n = (int32_t)sp.len;
    }
    char *out = malloc((size_t)n * 3 + 1);
    if (out) utf8_sanitize(piece, (size_t)n, out);
    if (raw) {
        *raw = malloc((size_t)n + 1);
        if (*raw) memcpy(*raw, piece, (size_t)n);
        *raw_len = (size_t)n;
    }
    free(big);
    return out;
}

/* ---- responses ---- */

static enum MHD_Result queue_buf(hreq *r, struct MHD_Connection *c, unsigned status, char *body,
                                 size_t len, const char *ctype, bool www_auth)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    if (www_auth) MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    enum MHD_Result ret = MHD_queue_response(c, status, resp);
    MHD_destroy_response(resp);
    if (r) r->responded = true;
    tsr_metrics_count_http(r ? r->h->metrics : NULL, (int)status);
    return ret;
}

static enum MHD_Result queue_json(hreq *r, struct MHD_Connection *c, unsigned status, cJSON *j)
{
    char *s = j ? cJSON_PrintUnformatted(j) : NULL;
    cJSON_Delete(j);
    if (!s) {
        static const char oom[] =
            "{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\",\"param\":null,"
            "\"code\":null}}";
        s = strdup(oom);
        status = MHD_HTTP_INTERNAL_SERVER_ERROR;
        if (!s) return MHD_NO;
    }
    return queue_buf(r, c, status, s, strlen(s), "application/json", false);
}

/* An OpenAI error body. */
typedef struct {
    unsigned status;
    const char *type;
    char param[64];
    const char *code;
    char msg[768];
} herr;

static void set_err(herr *e, unsigned status, const char *type, const char *param, const char *code,
                    const char *fmt, ...) __attribute__((format(printf, 6, 7)));
static void set_err(herr *e, unsigned status, const char *type, const char *param, const char *code,
                    const char *fmt, ...)
{
    e->status = status;
    e->type = type;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    e->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
}

#define BAD(e, param, ...) set_err(e, 400, "invalid_request_error", param, NULL, __VA_ARGS__)

static cJSON *error_json(const herr *e)
{
    cJSON *root = cJSON_CreateObject(), *o = cJSON_CreateObject();
    if (!root || !o) {
        cJSON_Delete(root);
        cJSON_Delete(o);
        return NULL;
    }
    cJSON_AddItemToObject(root, "error", o);
    cJSON_AddStringToObject(o, "message", e->msg);
    cJSON_AddStringToObject(o, "type", e->type);
    if (e->param[0])
        cJSON_AddStringToObject(o, "param", e->param);
    else
        cJSON_AddNullToObject(o, "param");
    if (e->code)
        cJSON_AddStringToObject(o, "code", e->code);
    else
        cJSON_AddNullToObject(o, "code");
    return root;
}

static enum MHD_Result queue_err(hreq *r, struct MHD_Connection *c, const herr *e)
{
    char *s = NULL;
    cJSON *j = error_json(e);
    if (j) s = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    if (!s) return MHD_NO;
    return queue_buf(r, c, e->status, s, strlen(s), "application/json", e->status == 401);
}

/* ---- request objects ---- */

static hreq *hreq_new(tsr_http *h, struct MHD_Connection *c)
{
    hreq *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    if (pthread_mutex_init(&r->mu, NULL) != 0) {
        free(r);
        return NULL;
    }
    if (pthread_cond_init(&r->cv, NULL) != 0) {
        pthread_mutex_destroy(&r->mu);
        free(r);
        return NULL;
    }
    r->h = h;
    r->conn = c;
    r->refs = 1; /* libmicrohttpd's */
    tsr_evbuf_init(&r->pend, -1);
    return r;
}

static void hreq_free(hreq *r)
{
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    free(r->body);
    free(r->finish_error);
    tsr_evbuf_free(&r->pend);
    free(r->out);
    free(r);
}

static void hreq_unref(hreq *r)
{
    pthread_mutex_lock(&r->mu);
    bool last = --r->refs == 0;
    pthread_mutex_unlock(&r->mu);
    if (last) hreq_free(r);
}

/* The engine's callback (engine thread): copy, signal, return. */
static void on_engine_event(void *ud, const tsr_event *ev)
{
    hreq *r = ud;
    pthread_mutex_lock(&r->mu);
    if (ev->kind == TSR_EV_TOKENS) {
        tsr_evbuf_append(&r->pend, ev); /* on OOM: r->pend.oom, the request fails */
        pthread_cond_broadcast(&r->cv);
        pthread_mutex_unlock(&r->mu);
        return;
    }
    /* FINISH: the engine's reference ends here. */
    r->finished = true;
    r->engine_active = false;
    r->finish_reason = ev->finish_reason;
    if (ev->error && !r->finish_error) r->finish_error = strdup(ev->error);
    r->n_prompt_tokens = ev->n_prompt_tokens;
    r->n_completion_tokens = ev->n_completion_tokens;
    pthread_cond_broadcast(&r->cv);
    bool last = --r->refs == 0;
    pthread_mutex_unlock(&r->mu);
    if (last) hreq_free(r);
}

/* Has the client closed its side (or the socket failed)? Cheap: poll with no wait. */
static bool client_gone(struct MHD_Connection *c)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci) return false;
    struct pollfd p = {.fd = ci->connect_fd, .events = POLLIN | POLLRDHUP};
    if (poll(&p, 1, 0) <= 0) return false;
    return (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

/* Under r->mu: cancel the engine request (once). */
static void cancel_locked(hreq *r)
{
    if (r->engine_active && !r->cancel_sent) {
        r->cancel_sent = true;
        r->h->be.cancel(r->h->be.ctx, r->req_id); /* thread-safe, never blocks on a step */
    }
}

static const char *finish_name(int reason)
{
    switch (reason) {
    case TSR_FINISH_LENGTH:
        return "length";
    case TSR_FINISH_STOP:
    case TSR_FINISH_EOS:
        return "stop";
    default:
        return NULL;
    }
}

/* ---- output JSON ---- */

/* Logprobs of ids [0, n) of the pending output: the legacy completions object, or the chat
 * "content" list. NULL when none were asked (or on OOM). Under r->mu. */
static cJSON *logprobs_json(hreq *r, size_t n)
{
    if (r->pend.n_top < 0 || !r->want_logprobs) return NULL;
    const tsr_vocab *v = r->h->vocab;
    const tsr_evbuf *b = &r->pend;
    const tsr_evbuf_span none = {0, 0};
    size_t k = (size_t)r->pend.n_top;
    if (r->chat) {
        cJSON *o = cJSON_CreateObject(), *content = cJSON_AddArrayToObject(o, "content");
        for (size_t i = 0; i < n && content; i++) {
            cJSON *t = cJSON_CreateObject();
            cJSON_AddItemToArray(content, t);
            unsigned char *raw = NULL;
            size_t raw_len = 0;
            char *s = token_text(v, r->pend.ids[i], b, b->has_pieces ? b->chosen_piece[i] : none,
                                 &raw, &raw_len);
            cJSON_AddStringToObject(t, "token", s ? s : "");
            cJSON_AddNumberToObject(t, "logprob", r->pend.lp_chosen[i]);
            cJSON *bytes = cJSON_AddArrayToObject(t, "bytes");
            for (size_t b = 0; raw && b < raw_len; b++)
                cJSON_AddItemToArray(bytes, cJSON_CreateNumber(raw[b]));
            free(s);
            free(raw);
            cJSON *tops = cJSON_AddArrayToObject(t, "top_logprobs");
            for (size_t j = 0; j < k; j++) {
                tsr_logprob lp = r->pend.lp_top[i * k + j];
                if (lp.id < 0) continue;
                cJSON *x = cJSON_CreateObject();
                cJSON_AddItemToArray(tops, x);
                raw = NULL;
                s = token_text(v, lp.id, b, b->has_pieces ? b->top_piece[i * k + j] : none, &raw,
                               &raw_len);
                cJSON_AddStringToObject(x, "token", s ? s : "");
                cJSON_AddNumberToObject(x, "logprob", lp.logprob);
                cJSON *xb = cJSON_AddArrayToObject(x, "bytes");
                for (size_t b = 0; raw && b < raw_len; b++)
                    cJSON_AddItemToArray(xb, cJSON_CreateNumber(raw[b]));
                free(s);
                free(raw);
            }
        }
        return o;
    }
    cJSON *o = cJSON_CreateObject();
    cJSON *toks = cJSON_AddArrayToObject(o, "tokens");
    cJSON *lps = cJSON_AddArrayToObject(o, "token_logprobs");
    cJSON *tops = cJSON_AddArrayToObject(o, "top_logprobs");
    cJSON *offs = cJSON_AddArrayToObject(o, "text_offset");
    for (size_t i = 0; i < n && offs; i++) {
        unsigned char *raw = NULL;
        size_t raw_len = 0;
        char *s = token_text(v, r->pend.ids[i], b, b->has_pieces ? b->chosen_piece[i] : none, &raw,
                             &raw_len);
        cJSON_AddItemToArray(toks, cJSON_CreateString(s ? s : ""));
        cJSON_AddItemToArray(lps, cJSON_CreateNumber(r->pend.lp_chosen[i]));
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)r->text_offset));
        r->text_offset += raw_len;
        free(s);
        free(raw);
        cJSON *t = cJSON_CreateObject();
        cJSON_AddItemToArray(tops, t);
        for (size_t j = 0; j < k; j++) {
            tsr_logprob lp = r->pend.lp_top[i * k + j];
            if (lp.id < 0) continue;
            char *ts =
                token_text(v, lp.id, b, b->has_pieces ? b->top_piece[i * k + j] : none, NULL, NULL);
            if (ts && !cJSON_GetObjectItemCaseSensitive(t, ts))
                cJSON_AddNumberToObject(t, ts, lp.logprob);
            free(ts);
        }
    }
    return o;
}

static cJSON *usage_json(const hreq *r)
{
    cJSON *u = cJSON_CreateObject();
    cJSON_AddNumberToObject(u, "prompt_tokens", r->n_prompt_tokens);
    cJSON_AddNumberToObject(u, "completion_tokens", r->n_completion_tokens);
    cJSON_AddNumberToObject(u, "total_tokens", r->n_prompt_tokens + r->n_completion_tokens);
    return u;
}

static cJSON *envelope(const hreq *r, const char *object)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", r->id);
    cJSON_AddStringToObject(o, "object", object);
    cJSON_AddNumberToObject(o, "created", (double)r->created_s);
    cJSON_AddStringToObject(o, "model", r->model[0] ? r->model : r->h->model_id);
    return o;
}

/* Under r->mu: one choice with the pending text (and logprobs), finish_reason when done. */
static cJSON *choice_json(hreq *r, bool with_finish, bool stream)
{
    cJSON *c = cJSON_CreateObject();
    cJSON_AddNumberToObject(c, "index", 0);
    const char *txt = r->pend.text ? r->pend.text : "";
    if (r->pend.text) r->pend.text[r->pend.text_len] = '\0';
    if (r->chat) {
        cJSON *m = cJSON_AddObjectToObject(c, stream ? "delta" : "message");
        if (!stream || !r->sse_role_sent) cJSON_AddStringToObject(m, "role", "assistant");
        if (!stream || r->pend.text_len > 0 || !with_finish)
            cJSON_AddStringToObject(m, "content", txt);
        r->sse_role_sent = true;
    } else {
        cJSON_AddStringToObject(c, "text", txt);
    }
    if (r->return_token_ids) {
        cJSON *ids = cJSON_AddArrayToObject(c, "token_ids");
        for (size_t i = 0; ids && i < r->pend.n_ids; i++)
            cJSON_AddItemToArray(ids, cJSON_CreateNumber(r->pend.ids[i]));
    }
    cJSON *lp = logprobs_json(r, r->pend.n_ids);
    if (lp)
        cJSON_AddItemToObject(c, "logprobs", lp);
    else
        cJSON_AddNullToObject(c, "logprobs");
    const char *fin = with_finish ? finish_name(r->finish_reason) : NULL;
    if (fin)
        cJSON_AddStringToObject(c, "finish_reason", fin);
    else
        cJSON_AddNullToObject(c, "finish_reason");
    tsr_evbuf_clear(&r->pend);
    return c;
}

/* ---- SSE ---- */

/* Connection thread: append "data: <json>\n\n" (frees j). false on OOM. */
static bool sse_append(hreq *r, cJSON *j, const char *raw)
{
    char *s = raw ? NULL : cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    const char *body = raw ? raw : s;
    if (!body) return false;
    size_t n = strlen(body);
    bool ok = tsr_evbuf_grow((void **)&r->out, &r->out_cap, r->out_len + n + 9, 1);
    if (ok) {
        memcpy(r->out + r->out_len, "data: ", 6);
        memcpy(r->out + r->out_len + 6, body, n);
        memcpy(r->out + r->out_len + 6 + n, "\n\n", 2);
        r->out_len += n + 8;
    }
    free(s);
    return ok;
}

static cJSON *chunk_json(hreq *r, bool with_finish)
{
    cJSON *o = envelope(r, r->chat ? "chat.completion.chunk" : "text_completion");
    cJSON *ch = cJSON_AddArrayToObject(o, "choices");
    cJSON_AddItemToArray(ch, choice_json(r, with_finish, true));
    if (r->include_usage) cJSON_AddNullToObject(o, "usage");
    return o;
}

/* Under r->mu: the error event of a stream that failed after it started. */
static cJSON *stream_error_json(hreq *r)
{
    herr e;
    if (r->pend.oom)
        set_err(&e, 500, "server_error", NULL, "out_of_memory",
                "the server ran out of memory while queuing this stream's output");
    else if (r->finish_reason == TSR_FINISH_ERROR)
        set_err(&e, 503, "service_unavailable", NULL, "replica_failed",
                "the replica failed during this request: %s",
                r->finish_error ? r->finish_error : "data plane error");
    else
        set_err(&e, 503, "service_unavailable", NULL, "cancelled",
                "the server is shutting down: request cancelled after %d generated tokens; "
                "retry on another replica",
                r->n_completion_tokens);
    return error_json(&e);
}

static ssize_t sse_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    hreq *r = cls;
    tsr_http *h = r->h;
    pthread_mutex_lock(&r->mu);
    for (;;) {
        /* Look at the socket every slice, whether output flows or not: tokens that keep
         * coming must not hide a client that left. */
        int64_t now = (int64_t)tsr_now_ns();
        if (now >= r->next_check_ns && !r->sse_done) {
            r->next_check_ns = now + (int64_t)WAIT_SLICE_MS * 1000000;
            if (client_gone(r->conn)) {
                cancel_locked(r); /* frees its KV blocks at the next step */
                pthread_mutex_unlock(&r->mu);
                return MHD_CONTENT_READER_END_WITH_ERROR;
            }
        }
        if (r->out_off < r->out_len) {
            size_t n = r->out_len - r->out_off;
            if (n > max) n = max;
            memcpy(buf, r->out + r->out_off, n);
            r->out_off += n;
            if (r->out_off == r->out_len) r->out_off = r->out_len = 0;
            r->last_write_ns = (int64_t)tsr_now_ns();
            pthread_mutex_unlock(&r->mu);
            return (ssize_t)n;
        }
        if (r->sse_done) {
            pthread_mutex_unlock(&r->mu);
            return MHD_CONTENT_READER_END_OF_STREAM;
        }
        bool ok = true;
        if (r->finished && (r->pend.oom || (r->finish_reason != TSR_FINISH_LENGTH &&
                                            r->finish_reason != TSR_FINISH_STOP &&
                                            r->finish_reason != TSR_FINISH_EOS))) {
            if (!r->pend.oom && (r->pend.n_ids > 0 || r->pend.text_len > 0))
                ok = sse_append(r, chunk_json(r, false), NULL);
            ok = ok && sse_append(r, stream_error_json(r), NULL);
            r->sse_done = true;
            if (!ok) {
                pthread_mutex_unlock(&r->mu);
                return MHD_CONTENT_READER_END_WITH_ERROR;
            }
            continue;
        }
        if (r->finished) {
            ok = sse_append(r, chunk_json(r, true), NULL);
            if (ok && r->include_usage) {
                cJSON *u = envelope(r, r->chat ? "chat.completion.chunk" : "text_completion");
                cJSON_AddArrayToObject(u, "choices");
                cJSON_AddItemToObject(u, "usage", usage_json(r));
                ok = sse_append(r, u, NULL);
            }
            ok = ok && sse_append(r, NULL, "[DONE]");
            r->sse_done = true;
            if (!ok) {
                pthread_mutex_unlock(&r->mu);
                return MHD_CONTENT_READER_END_WITH_ERROR;
            }
            continue;
        }
        if (r->pend.n_ids > 0 || r->pend.text_len > 0) {
            if (!sse_append(r, chunk_json(r, false), NULL)) {
                pthread_mutex_unlock(&r->mu);
                return MHD_CONTENT_READER_END_WITH_ERROR;
            }
            continue;
        }
        if (now - r->last_write_ns >= KEEPALIVE_NS) {
            static const char ka[] = ": keep-alive\n\n";
            if (tsr_evbuf_grow((void **)&r->out, &r->out_cap, r->out_len + sizeof ka, 1)) {
                memcpy(r->out + r->out_len, ka, sizeof ka - 1);
                r->out_len += sizeof ka - 1;
                continue;
            }
        }
        if (atomic_load(&h->stopping) && now - atomic_load(&h->stop_ns) > STOP_EXTRA_NS) {
            cancel_locked(r);
            pthread_mutex_unlock(&r->mu);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
        struct timespec ts = tsr_grpc_abstime_in_ms(CLOCK_REALTIME, WAIT_SLICE_MS);
        pthread_cond_timedwait(&r->cv, &r->mu, &ts);
    }
}

/* ---- request parsing ---- */

static bool is_int(const cJSON *x)
{
    return cJSON_IsNumber(x) && isfinite(x->valuedouble) && x->valuedouble == floor(x->valuedouble);
}

/* The field or NULL when absent or JSON null. */
static const cJSON *field(const cJSON *o, const char *name)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, name);
    return cJSON_IsNull(x) ? NULL : x;
}

static bool get_num(const cJSON *o, const char *name, float *dst, herr *e)
{
    const cJSON *x = field(o, name);
    if (!x) return true;
    if (!cJSON_IsNumber(x) || !isfinite(x->valuedouble)) {
        BAD(e, name, "%s must be a number", name);
        return false;
    }
    *dst = (float)x->valuedouble;
    return true;
}

static bool get_int(const cJSON *o, const char *name, double lo, double hi, bool *present,
                    int64_t *dst, herr *e)
{
    const cJSON *x = field(o, name);
    if (present) *present = x != NULL;
    if (!x) return true;
    if (!is_int(x)) {
        BAD(e, name, "%s must be an integer", name);
        return false;
    }
    if (x->valuedouble < lo || x->valuedouble > hi) {
        BAD(e, name, "%s must be in %.0f..%.0f, got %.0f", name, lo, hi, x->valuedouble);
        return false;
    }
    *dst = (int64_t)x->valuedouble;
    return true;
}

static bool get_bool(const cJSON *o, const char *name, bool *dst, herr *e)
{
    const cJSON *x = field(o, name);
    if (!x) return true;
    if (!cJSON_IsBool(x)) {
        BAD(e, name, "%s must be true or false", name);
        return false;
    }
    *dst = cJSON_IsTrue(x);
    return true;
}

/* A validated request: what the engine gets, plus what the response needs. */
typedef struct {
    tsr_engine_request er;
    int32_t *ids;
    size_t n_ids;
    const char *stop[MAX_STOP_STRINGS];
    int32_t *stop_ids;
    /* pass-through prompts (a backend without a vocabulary) */
    const char *prompt_text; /* borrowed from the request's JSON */
    tsr_chat_msg *messages;
    char **message_bufs;
    size_t n_messages;
    const char *model;
} parsed;

static void parsed_free(parsed *p)
{
    free(p->ids);
    free(p->stop_ids);
    for (size_t k = 0; p->message_bufs && k < p->n_messages; k++) free(p->message_bufs[k]);
    free(p->message_bufs);
    free(p->messages);
}

/* The prompt of /v1/completions: a string, [string], token ids or [token ids]. */
static bool parse_prompt(tsr_http *h, const cJSON *root, parsed *p, herr *e)
{
    const cJSON *x = field(root, "prompt");
    if (!x) {
        BAD(e, "prompt", "prompt is required (a string or a list of token ids)");
        return false;
    }
    if (cJSON_IsArray(x) && cJSON_GetArraySize(x) == 1 &&
        (cJSON_IsString(x->child) || cJSON_IsArray(x->child)))
        x = x->child; /* a batch of one */
    if (cJSON_IsArray(x) && cJSON_GetArraySize(x) > 0 &&
        (cJSON_IsString(x->child) || cJSON_IsArray(x->child))) {
        BAD(e, "prompt",
            "prompt: batches of %d prompts are not supported; send one prompt per request",
            cJSON_GetArraySize(x));
        return false;
    }
    const int32_t n_vocab = h->vocab ? tsr_vocab_n_tokens(h->vocab) : INT32_MAX;
    if (cJSON_IsString(x)) {
        const char *s = x->valuestring;
        size_t len = strlen(s);
        if (len == 0) {
            BAD(e, "prompt", "prompt is empty");
            return false;
        }
        if (!h->vocab) { /* passed through: the replica tokenizes */
            p->prompt_text = s;
            return true;
        }
        if (h->n_ctx > 0 && len / h->max_piece > (size_t)h->n_ctx) {
            BAD(e, "prompt", "prompt: %zu bytes cannot fit the context of %d tokens", len,
                h->n_ctx);
            return false;
        }
        char err[512];
        if (tsr_vocab_tokenize(h->vocab, s, len, true, true, &p->ids, &p->n_ids, err, sizeof err) !=
            0) {
            BAD(e, "prompt", "prompt: cannot tokenize: %s", err);
            return false;
        }
    } else if (cJSON_IsArray(x)) {
        int n = cJSON_GetArraySize(x);
        if (n == 0) {
            BAD(e, "prompt", "prompt is an empty list");
            return false;
        }
        if (h->n_ctx > 0 && n >= h->n_ctx) {
            BAD(e, "prompt", "prompt: %d tokens do not fit the context of %d tokens", n, h->n_ctx);
            return false;
        }
        p->ids = malloc((size_t)n * sizeof(int32_t));
        if (!p->ids) {
            set_err(e, 500, "server_error", NULL, NULL, "out of memory");
            return false;
        }
        int i = 0;
        for (const cJSON *t = x->child; t; t = t->next, i++) {
            if (!is_int(t) || t->valuedouble < 0 || t->valuedouble >= n_vocab) {
                BAD(e, "prompt", "prompt[%d]: token ids must be integers in [0, %d)", i, n_vocab);
                return false;
            }
            p->ids[i] = (int32_t)t->valuedouble;
        }
        p->n_ids = (size_t)n;
        if (!h->vocab) return true; /* the replica checks the ids against its vocabulary */
    } else {
        BAD(e, "prompt", "prompt must be a string or a list of token ids");
        return false;
    }
    if (p->n_ids == 0) {
        BAD(e, "prompt", "prompt tokenizes to no tokens");
        return false;
    }
    if (h->n_ctx > 0 && p->n_ids >= (size_t)h->n_ctx) {
        BAD(e, "prompt",
            "prompt: %zu tokens do not fit the context of %d tokens (at least one position must "
            "be left to generate); shorten the prompt",
            p->n_ids, h->n_ctx);
        return false;
    }
    return true;
}

/* One message's content: a string, or a list of {"type": "text", "text": ...} parts
 * (concatenated into *buf, which the caller frees). NULL with e set when neither. */
static const char *message_content(const cJSON *c, int i, char **buf, herr *e)
{
    if (cJSON_IsString(c)) return c->valuestring;
    if (!cJSON_IsArray(c)) {
        BAD(e, "messages", "messages[%d].content must be a string or a list of text parts", i);
        return NULL;
    }
    size_t len = 0, cap = 0;
    int k = 0;
    for (const cJSON *part = c->child; part; part = part->next, k++) {
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(part, "text");
        if (!cJSON_IsString(type) || strcmp(type->valuestring, "text") != 0 ||
            !cJSON_IsString(text)) {
            BAD(e, "messages",
                "messages[%d].content[%d]: only {\"type\": \"text\", \"text\": ...} parts "
                "are supported",
                i, k);
            return NULL;
        }
        size_t n = strlen(text->valuestring);
        if (!tsr_evbuf_grow((void **)buf, &cap, len + n + 1, 1)) {
            set_err(e, 500, "server_error", NULL, NULL, "out of memory");
            return NULL;
        }
        memcpy(*buf + len, text->valuestring, n);
        len += n;
        (*buf)[len] = '\0';
    }
    return *buf ? *buf : "";
}

/* The prompt of /v1/chat/completions: messages rendered with the model's chat template and
 * tokenized with special tokens parsed (coordinator/chat.h). */
static bool parse_messages(tsr_http *h, const cJSON *root, parsed *p, herr *e)
{
    const cJSON *x = field(root, "messages");
    if (!x || !cJSON_IsArray(x) || cJSON_GetArraySize(x) == 0) {
        BAD(e, "messages", "messages must be a non-empty list of {role, content} objects");
        return false;
    }
    if (!h->chat && h->vocab) {
        BAD(e, "messages",
            "the model has no chat template: use /v1/completions, or start the server with "
            "--chat-template NAME");
        return false;
    }
    int n = cJSON_GetArraySize(x);
    tsr_chat_msg *m = calloc((size_t)n, sizeof *m);
    char **bufs = calloc((size_t)n, sizeof *bufs);
    char *text = NULL, err[512];
    size_t len = 0, total = 0;
    bool ok = false;
    if (!m || !bufs) {
        set_err(e, 500, "server_error", NULL, NULL, "out of memory");
        goto done;
    }
    int i = 0;
    for (const cJSON *msg = x->child; msg; msg = msg->next, i++) {
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(msg, "role");
        if (!cJSON_IsObject(msg) || !cJSON_IsString(role)) {
            BAD(e, "messages", "messages[%d] must be an object with a string role", i);
            goto done;
        }
        const cJSON *content = field(msg, "content");
        if (!content) {
            BAD(e, "messages", "messages[%d].content is required", i);
            goto done;
        }
        m[i].role = role->valuestring;
        m[i].content = message_content(content, i, &bufs[i], e);
        if (!m[i].content) goto done;
        total += strlen(m[i].content);
    }
    if (!h->vocab) { /* passed through: the replica renders its own template */
        p->messages = m;
        p->message_bufs = bufs;
        p->n_messages = (size_t)n;
        return true;
    }
    if (h->n_ctx > 0 && total / h->max_piece > (size_t)h->n_ctx) {
        BAD(e, "messages", "messages: %zu bytes cannot fit the context of %d tokens", total,
            h->n_ctx);
        goto done;
    }
    if (tsr_chat_render(h->chat, m, (size_t)n, true, &text, &len, err, sizeof err) != 0) {
        BAD(e, "messages", "messages: %s", err);
        goto done;
    }
    if (tsr_chat_tokenize(h->vocab, text, len, &p->ids, &p->n_ids, err, sizeof err) != 0) {
        BAD(e, "messages", "messages: cannot tokenize: %s", err);
        goto done;
    }
    if (h->n_ctx > 0 && p->n_ids >= (size_t)h->n_ctx) {
        BAD(e, "messages",
            "messages: %zu tokens do not fit the context of %d tokens (at least one position "
            "must be left to generate); shorten them",
            p->n_ids, h->n_ctx);
        goto done;
    }
    ok = true;
done:
    for (int k = 0; bufs && k < n; k++) free(bufs[k]);
    free(bufs);
    free(m);
    free(text);
    return ok;
}

/* Fields shared by completions and chat. Returns false with e set. */
static bool parse_request(tsr_http *h, hreq *r, const cJSON *root, parsed *p, herr *e)
{
    memset(p, 0, sizeof *p);
    tsr_engine_request *er = &p->er;
    er->speculation = -1;
    const cJSON *x;

    x = field(root, "model");
    if (x && !cJSON_IsString(x)) {
        BAD(e, "model", "model must be a string");
        return false;
    }
    if (x) p->model = x->valuestring;
    if (x && h->vocab && strcmp(x->valuestring, h->model_id) != 0) {
        set_err(e, 404, "invalid_request_error", "model", "model_not_found",
                "the model '%.200s' does not exist: this server serves '%.200s' (GET /v1/models)",
                x->valuestring, h->model_id);
        return false;
    }
    /* Features this server does not have are refused rather than silently ignored. */
    int64_t n = 1;
    if (!get_int(root, "n", 1, 1e9, NULL, &n, e)) return false;
    if (n != 1) {
        BAD(e, "n", "n must be 1: one choice per request (send %" PRId64 " requests)", n);
        return false;
    }
    if (!r->chat) {
        int64_t best_of = 1;
        if (!get_int(root, "best_of", 1, 1e9, NULL, &best_of, e)) return false;
        if (best_of != 1) {
            BAD(e, "best_of", "best_of must be 1 (not supported)");
            return false;
        }
        bool echo = false;
        if (!get_bool(root, "echo", &echo, e)) return false;
        if (echo) {
            BAD(e, "echo", "echo is not supported");
            return false;
        }
        if (field(root, "suffix")) {
            BAD(e, "suffix", "suffix is not supported");
            return false;
        }
    } else {
        static const char *const unsupported[] = {"tools", "functions", "tool_choice",
                                                  "function_call", "response_format"};
        for (size_t i = 0; i < sizeof unsupported / sizeof *unsupported; i++) {
            if (field(root, unsupported[i])) {
                BAD(e, unsupported[i], "%s is not supported by this server", unsupported[i]);
                return false;
            }
        }
    }
    x = field(root, "logit_bias");
    if (x && !(cJSON_IsObject(x) && cJSON_GetArraySize(x) == 0)) {
        BAD(e, "logit_bias", "logit_bias is not supported");
        return false;
    }
    x = field(root, "user");
    if (x && !cJSON_IsString(x)) {
        BAD(e, "user", "user must be a string");
        return false;
    }

    /* lengths */
    int64_t max_tokens = DEFAULT_MAX_TOKENS;
    bool has_mt = false, has_mct = false;
    int64_t mct = 0;
    if (!get_int(root, "max_tokens", 1, 1e9, &has_mt, &max_tokens, e)) return false;
    if (r->chat) {
        if (!get_int(root, "max_completion_tokens", 1, 1e9, &has_mct, &mct, e)) return false;
        if (has_mct) max_tokens = mct;
        if (!has_mt && !has_mct) max_tokens = h->n_ctx > 0 ? h->n_ctx : 1 << 20; /* to the end */
    }
    er->gen.max_tokens = (int32_t)(max_tokens > INT32_MAX ? INT32_MAX : max_tokens);

    /* sampling */
    tsr_sampling_params *sp = &er->gen.sampling;
    tsr_sampling_params_default(sp);
    if (!get_num(root, "temperature", &sp->temperature, e) ||
        !get_num(root, "top_p", &sp->top_p, e) || !get_num(root, "min_p", &sp->min_p, e) ||
        !get_num(root, "repetition_penalty", &sp->repetition_penalty, e) ||
        !get_num(root, "presence_penalty", &sp->presence_penalty, e) ||
        !get_num(root, "frequency_penalty", &sp->frequency_penalty, e))
        return false;
    int64_t top_k = 0;
    bool has_top_k = false;
    if (!get_int(root, "top_k", -1, 1e9, &has_top_k, &top_k, e)) return false;
    sp->top_k = top_k < 0 ? 0 : (int32_t)top_k;
    int64_t seed = 0;
    bool has_seed = false;
    if (!get_int(root, "seed", -9.2e18, 1.8e19, &has_seed, &seed, e)) return false;
    if (has_seed) {
        const cJSON *s = field(root, "seed");
        sp->seed = s->valuedouble >= 9.2e18 ? (uint64_t)s->valuedouble : (uint64_t)seed;
    } else {
        uint64_t rnd = 0;
        if (getrandom(&rnd, sizeof rnd, GRND_NONBLOCK) != (ssize_t)sizeof rnd)
            rnd = tsr_now_ns() * 0x9E3779B97F4A7C15ull;
        sp->seed = rnd;
    }
    char err[512];
    if (tsr_sampling_params_validate(sp, err, sizeof err) != 0) {
        /* the sampler's message starts with the field's name (OpenAI / vLLM names) */
        char param[64];
        size_t k = 0;
        while (err[k] && err[k] != ' ' && k < sizeof param - 1) {
            param[k] = err[k];
            k++;
        }
        param[k] = '\0';
        BAD(e, param, "%s", err);
        return false;
    }
    bool ignore_eos = false;
    if (!get_bool(root, "ignore_eos", &ignore_eos, e)) return false;
    if (!get_bool(root, "return_token_ids", &r->return_token_ids, e)) return false;
    er->gen.ignore_eos = ignore_eos;

    /* stop */
    x = field(root, "stop");
    if (x) {
        if (cJSON_IsString(x)) {
            p->stop[0] = x->valuestring;
            er->gen.n_stop = 1;
        } else if (cJSON_IsArray(x)) {
            int ns = cJSON_GetArraySize(x);
            if (ns > MAX_STOP_STRINGS) {
                BAD(e, "stop", "stop: at most %d strings, got %d", MAX_STOP_STRINGS, ns);
                return false;
            }
            int i = 0;
            for (const cJSON *s = x->child; s; s = s->next, i++) {
                if (!cJSON_IsString(s)) {
                    BAD(e, "stop", "stop[%d] must be a string", i);
                    return false;
                }
                p->stop[i] = s->valuestring;
            }
            er->gen.n_stop = (size_t)ns;
        } else {
            BAD(e, "stop", "stop must be a string or a list of strings");
            return false;
        }
        for (size_t i = 0; i < er->gen.n_stop; i++) {
            size_t len = strlen(p->stop[i]);
            if (len == 0 || len > MAX_STOP_BYTES) {
                BAD(e, "stop", "stop[%zu]: a stop string must be 1..%d bytes, got %zu", i,
                    MAX_STOP_BYTES, len);
                return false;
            }
        }
        er->gen.stop = p->stop;
    }
    x = field(root, "stop_token_ids");
    if (x) {
        int nv = h->vocab ? tsr_vocab_n_tokens(h->vocab) : INT32_MAX;
        if (!cJSON_IsArray(x) || cJSON_GetArraySize(x) > 1024) {
            BAD(e, "stop_token_ids", "stop_token_ids must be a list of at most 1024 token ids");
            return false;
        }
        int ns = cJSON_GetArraySize(x), i = 0;
        p->stop_ids = malloc((size_t)(ns ? ns : 1) * sizeof(int32_t));
        if (!p->stop_ids) {
            set_err(e, 500, "server_error", NULL, NULL, "out of memory");
            return false;
        }
        for (const cJSON *t = x->child; t; t = t->next, i++) {
            if (!is_int(t) || t->valuedouble < 0 || t->valuedouble >= nv) {
                BAD(e, "stop_token_ids", "stop_token_ids[%d]: token ids are integers in [0, %d)", i,
                    nv);
                return false;
            }
            p->stop_ids[i] = (int32_t)t->valuedouble;
        }
        er->gen.stop_ids = p->stop_ids;
        er->gen.n_stop_ids = (size_t)ns;
    }

    /* logprobs */
    if (r->chat) {
        bool lp = false;
        if (!get_bool(root, "logprobs", &lp, e)) return false;
        int64_t top = 0;
        bool has_top = false;
        if (!get_int(root, "top_logprobs", 0, MAX_LOGPROBS, &has_top, &top, e)) return false;
        if (has_top && !lp) {
            BAD(e, "top_logprobs", "top_logprobs needs logprobs: true");
            return false;
        }
        if (lp) {
            r->want_logprobs = true;
            r->pend.n_top = (int32_t)top;
        }
    } else {
        int64_t lp = 0;
        bool has_lp = false;
        if (!get_int(root, "logprobs", 0, MAX_LOGPROBS, &has_lp, &lp, e)) return false;
        if (has_lp) {
            r->want_logprobs = true;
            r->pend.n_top = (int32_t)lp;
        }
    }
    /* the engine reports the chosen token's logprob only with alternatives: ask for one */
    er->logprobs = r->want_logprobs ? (r->pend.n_top > 0 ? r->pend.n_top : 1) : 0;

    /* streaming */
    bool stream = false;
    if (!get_bool(root, "stream", &stream, e)) return false;
    r->stream = stream;
    x = field(root, "stream_options");
    if (x) {
        if (!stream) {
            BAD(e, "stream_options", "stream_options is only allowed with stream: true");
            return false;
        }
        if (!cJSON_IsObject(x)) {
            BAD(e, "stream_options", "stream_options must be an object");
            return false;
        }
        bool inc = false;
        if (!get_bool(x, "include_usage", &inc, e)) {
            snprintf(e->param, sizeof e->param, "stream_options.include_usage");
            return false;
        }
        r->include_usage = inc;
    }

    /* the prompt last: it is the expensive part */
    if (r->chat ? !parse_messages(h, root, p, e) : !parse_prompt(h, root, p, e)) return false;
    er->prompt_ids = p->ids;
    er->n_prompt = p->n_ids;
    return true;
}

/* ---- handlers ---- */

static void new_id(hreq *r, const char *prefix)
{
    uint64_t x = 0;
    if (getrandom(&x, sizeof x, GRND_NONBLOCK) != (ssize_t)sizeof x)
        x = tsr_now_ns() * 0x9E3779B97F4A7C15ull;
    snprintf(r->id, sizeof r->id, "%s-%016" PRIx64, prefix, x);
    r->created_s = (int64_t)time(NULL);
}

static void submit_error(tsr_http *h, int rc, const char *err, herr *e)
{
    switch (rc) {
    case TSR_ENGINE_EINVAL:
        BAD(e, NULL, "%s", err);
        break;
    case TSR_ENGINE_EQUEUE_FULL:
        set_err(e, 429, "rate_limit_error", NULL, "queue_full",
                "the request queue is full (%d waiting): retry later or on another replica",
                h->max_queue);
        break;
    case TSR_ENGINE_EDRAINING:
        set_err(e, 503, "service_unavailable", NULL, "draining",
                "the server is draining and accepts no new requests; retry on another replica");
        break;
    case TSR_ENGINE_EDOWN:
        if (h->vocab)
            set_err(e, 503, "service_unavailable", NULL, "replica_down",
                    "the replica's data plane is down: %s", err[0] ? err : "a rank failed");
        else
            set_err(e, 503, "service_unavailable", NULL, "no_replica", "%s", err);
        break;
    case TSR_HTTP_BACKEND_ENOMODEL:
        set_err(e, 404, "invalid_request_error", "model", "model_not_found", "%s", err);
        break;
    default:
        set_err(e, 500, "server_error", NULL, NULL, "engine error %d: %s", rc, err);
        break;
    }
}

static enum MHD_Result handle_generate(tsr_http *h, hreq *r, struct MHD_Connection *c)
{
    herr e;
    memset(&e, 0, sizeof e);
    if (r->too_big) {
        set_err(&e, 413, "invalid_request_error", NULL, "request_too_large",
                "request body larger than %" PRId64 " bytes", h->max_body);
        return queue_err(r, c, &e);
    }
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(r->body ? r->body : "", r->body_len, &end, false);
    if (!root) {
        size_t at = end && r->body ? (size_t)(end - r->body) : 0;
        BAD(&e, NULL, "the body is not valid JSON (error near byte %zu)", at);
        return queue_err(r, c, &e);
    }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        BAD(&e, NULL, "the body must be a JSON object");
        return queue_err(r, c, &e);
    }
    parsed p;
    if (!parse_request(h, r, root, &p, &e)) {
        parsed_free(&p);
        cJSON_Delete(root);
        return queue_err(r, c, &e);
    }
    new_id(r, r->chat ? "chatcmpl" : "cmpl");
    if (p.model) {
        snprintf(r->model, sizeof r->model, "%s", p.model);
    } else if (h->be.models) { /* a cluster: the model it routes a request without one to */
        char names[1][128];
        if (h->be.models(h->be.ctx, names, 1) == 1)
            snprintf(r->model, sizeof r->model, "%s", names[0]);
    }
    p.er.on_event = on_engine_event;
    p.er.ud = r;
    pthread_mutex_lock(&r->mu);
    r->refs++; /* the engine's, dropped by FINISH */
    r->engine_active = true;
    pthread_mutex_unlock(&r->mu);
    char err[512];
    err[0] = '\0';
    uint64_t id = 0;
    tsr_http_gen g = {.er = p.er,
                      .prompt_text = p.prompt_text,
                      .messages = p.messages,
                      .n_messages = p.n_messages,
                      .model = p.model};
    int rc = h->be.submit(h->be.ctx, &g, &id, err, sizeof err);
    parsed_free(&p);
    cJSON_Delete(root); /* the engine copied the stop strings */
    if (rc != TSR_ENGINE_OK) {
        pthread_mutex_lock(&r->mu);
        r->refs--;
        r->engine_active = false;
        pthread_mutex_unlock(&r->mu);
        submit_error(h, rc, err, &e);
        return queue_err(r, c, &e);
    }
    pthread_mutex_lock(&r->mu);
    r->req_id = id;
    pthread_mutex_unlock(&r->mu);

    if (r->stream) {
        r->last_write_ns = (int64_t)tsr_now_ns();
        struct MHD_Response *resp =
            MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, SSE_BLOCK, sse_reader, r, NULL);
        if (!resp) {
            pthread_mutex_lock(&r->mu);
            cancel_locked(r);
            pthread_mutex_unlock(&r->mu);
            return MHD_NO;
        }
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        enum MHD_Result ret = MHD_queue_response(c, MHD_HTTP_OK, resp);
        MHD_destroy_response(resp);
        r->responded = true;
        tsr_metrics_count_http(h->metrics, 200);
        return ret;
    }

    /* Not streaming: wait for FINISH in slices, watching the client. */
    pthread_mutex_lock(&r->mu);
    while (!r->finished) {
        struct timespec ts = tsr_grpc_abstime_in_ms(CLOCK_REALTIME, WAIT_SLICE_MS);
        pthread_cond_timedwait(&r->cv, &r->mu, &ts);
        int64_t now = (int64_t)tsr_now_ns();
        if (now >= r->next_check_ns) { /* every slice, even while tokens keep arriving */
            r->next_check_ns = now + (int64_t)WAIT_SLICE_MS * 1000000;
            if (!r->cancel_sent && client_gone(c)) cancel_locked(r);
        }
        if (atomic_load(&h->stopping) &&
            (int64_t)tsr_now_ns() - atomic_load(&h->stop_ns) > STOP_EXTRA_NS) {
            cancel_locked(r);
            pthread_mutex_unlock(&r->mu);
            return MHD_NO;
        }
    }
    if (r->cancel_sent && r->finish_reason == TSR_FINISH_CANCELLED) {
        pthread_mutex_unlock(&r->mu);
        return MHD_NO; /* the client is gone: nobody to answer */
    }
    if (r->pend.oom ||
        (r->finish_reason != TSR_FINISH_LENGTH && r->finish_reason != TSR_FINISH_STOP &&
         r->finish_reason != TSR_FINISH_EOS)) {
        cJSON *j = stream_error_json(r);
        unsigned st = r->pend.oom ? 500 : 503;
        pthread_mutex_unlock(&r->mu);
        return queue_json(r, c, st, j);
    }
    cJSON *o = envelope(r, r->chat ? "chat.completion" : "text_completion");
    cJSON *ch = cJSON_AddArrayToObject(o, "choices");
    cJSON_AddItemToArray(ch, choice_json(r, true, false));
    cJSON_AddItemToObject(o, "usage", usage_json(r));
    pthread_mutex_unlock(&r->mu);
    return queue_json(r, c, 200, o);
}

static enum MHD_Result handle_models(tsr_http *h, hreq *r, struct MHD_Connection *c)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "object", "list");
    cJSON *data = cJSON_AddArrayToObject(o, "data");
    static char names[64][128];
    static pthread_mutex_t names_mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_mutex_lock(&names_mu);
    size_t n = 1;
    if (h->be.models) {
        n = h->be.models(h->be.ctx, names, 64);
        if (n > 64) n = 64;
    } else {
        snprintf(names[0], sizeof names[0], "%s", h->model_id);
    }
    for (size_t i = 0; i < n; i++) {
        cJSON *m = cJSON_CreateObject();
        cJSON_AddItemToArray(data, m);
        cJSON_AddStringToObject(m, "id", names[i]);
        cJSON_AddStringToObject(m, "object", "model");
        cJSON_AddNumberToObject(m, "created", (double)h->created_s);
        cJSON_AddStringToObject(m, "owned_by", "tessera");
        if (h->n_ctx > 0) cJSON_AddNumberToObject(m, "max_model_len", h->n_ctx);
    }
    pthread_mutex_unlock(&names_mu);
    return queue_json(r, c, 200, o);
}

static enum MHD_Result handle_health(tsr_http *h, hreq *r, struct MHD_Connection *c)
{
    int hs = h->be.health(h->be.ctx);
    const char *why = NULL;
    if (hs == 2)
        why = "down";
    else if (hs == 1 || atomic_load(&h->not_serving))
        why = "draining";
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "status", why ? why : "ok");
    return queue_json(r, c, why ? 503 : 200, o);
}

static enum MHD_Result handle_metrics(tsr_http *h, hreq *r, struct MHD_Connection *c)
{
    char *text = NULL;
    size_t len = 0;
    tsr_metrics_count_http(h->metrics, 200); /* counted before rendering: shows itself */
    if (h->be.metrics(h->be.ctx, &text, &len) != 0) {
        herr e;
        set_err(&e, 500, "server_error", NULL, NULL, "out of memory rendering metrics");
        return queue_err(r, c, &e);
    }
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(text);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8");
    enum MHD_Result ret = MHD_queue_response(c, 200, resp);
    MHD_destroy_response(resp);
    r->responded = true;
    return ret;
}

/* Mutual TLS: did the client present a certificate that verifies against the CA? */
static bool client_cert_ok(struct MHD_Connection *c)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_GNUTLS_SESSION);
    if (!ci || !ci->tls_session) return false;
    gnutls_session_t s = (gnutls_session_t)ci->tls_session;
    unsigned int list_size = 0;
    if (!gnutls_certificate_get_peers(s, &list_size) || list_size == 0) return false;
    unsigned int status = 0;
    if (gnutls_certificate_verify_peers2(s, &status) != GNUTLS_E_SUCCESS) return false;
    return status == 0;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    (void)version;
    tsr_http *h = cls;
    hreq *r = *con_cls;
    herr e;
    memset(&e, 0, sizeof e);
    if (!r) {
        r = hreq_new(h, c);
        if (!r) return MHD_NO;
        *con_cls = r;
        bool post = !strcmp(method, MHD_HTTP_METHOD_POST);
        bool get = !strcmp(method, MHD_HTTP_METHOD_GET);
        const char *allow = "GET";
        if (!strcmp(url, "/v1/completions")) {
            r->rt = RT_COMPLETIONS;
            allow = "POST";
        } else if (!strcmp(url, "/v1/chat/completions")) {
            r->rt = RT_CHAT;
            r->chat = true;
            allow = "POST";
        } else if (!strcmp(url, "/v1/models")) {
            r->rt = RT_MODELS;
        } else if (!strcmp(url, "/health")) {
            r->rt = RT_HEALTH;
        } else if (!strcmp(url, "/metrics")) {
            r->rt = RT_METRICS;
        }
        if (r->rt == RT_UNKNOWN) {
            set_err(&e, 404, "invalid_request_error", NULL, "unknown_route",
                    "unknown route %.16s %.200s: this server serves POST /v1/completions, POST "
                    "/v1/chat/completions, GET /v1/models, GET /health and GET /metrics",
                    method, url);
            return queue_err(r, c, &e);
        }
        if ((!strcmp(allow, "POST") && !post) || (!strcmp(allow, "GET") && !get)) {
            set_err(&e, 405, "invalid_request_error", NULL, "method_not_allowed",
                    "%.16s %.200s: use %s", method, url, allow);
            char *s = NULL;
            cJSON *j = error_json(&e);
            if (j) s = cJSON_PrintUnformatted(j);
            cJSON_Delete(j);
            if (!s) return MHD_NO;
            struct MHD_Response *resp =
                MHD_create_response_from_buffer(strlen(s), s, MHD_RESPMEM_MUST_FREE);
            if (!resp) return MHD_NO;
            MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
            MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, allow);
            enum MHD_Result ret = MHD_queue_response(c, 405, resp);
            MHD_destroy_response(resp);
            r->responded = true;
            tsr_metrics_count_http(h->metrics, 405);
            return ret;
        }
        if (h->mtls && !client_cert_ok(c)) {
            set_err(&e, 403, "permission_error", NULL, "client_certificate_required",
                    "this server requires a client certificate signed by its --tls-client-ca");
            return queue_err(r, c, &e);
        }
        if (r->rt != RT_HEALTH) {
            const char *authz =
                MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
            char why[256];
            tsr_auth_verdict v = tsr_auth_check(h->auth, authz, authz ? strlen(authz) : 0,
                                                r->rt == RT_METRICS, why, sizeof why);
            if (v == TSR_AUTH_UNAUTHENTICATED) {
                set_err(&e, 401, "authentication_error", NULL, "invalid_api_key", "%s", why);
                return queue_err(r, c, &e);
            }
            if (v == TSR_AUTH_FORBIDDEN) {
                set_err(&e, 403, "permission_error", NULL, "admin_key_required", "%s", why);
                return queue_err(r, c, &e);
            }
        }
        /* GET: answered on the next call, once libmicrohttpd has the whole request (a
         * response queued earlier closes the connection instead of keeping it alive) */
        if (get) return MHD_YES;
        /* POST: refuse an announced body over the limit before reading it */
        const char *cl =
            MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl) {
            char *endp = NULL;
            errno = 0;
            unsigned long long n = strtoull(cl, &endp, 10);
            if (errno == 0 && endp != cl && n > (unsigned long long)h->max_body) {
                set_err(&e, 413, "invalid_request_error", NULL, "request_too_large",
                        "request body of %llu bytes is larger than the limit of %" PRId64 " bytes",
                        n, h->max_body);
                return queue_err(r, c, &e);
            }
        }
        return MHD_YES;
    }
    if (r->responded) {
        *upload_data_size = 0; /* discard */
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        size_t n = *upload_data_size;
        *upload_data_size = 0;
        if (r->too_big || r->body_len + n > (size_t)h->max_body) {
            r->too_big = true; /* keep reading (discarding) to answer 413 at the end */
            return MHD_YES;
        }
        if (!tsr_evbuf_grow((void **)&r->body, &r->body_cap, r->body_len + n + 1, 1)) return MHD_NO;
        memcpy(r->body + r->body_len, upload_data, n);
        r->body_len += n;
        r->body[r->body_len] = '\0';
        return MHD_YES;
    }
    switch (r->rt) {
    case RT_MODELS:
        return handle_models(h, r, c);
    case RT_HEALTH:
        return handle_health(h, r, c);
    case RT_METRICS:
        return handle_metrics(h, r, c);
    default:
        return handle_generate(h, r, c);
    }
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)cls;
    (void)c;
    (void)toe;
    hreq *r = *con_cls;
    if (!r) return;
    *con_cls = NULL;
    pthread_mutex_lock(&r->mu);
    cancel_locked(r); /* a client gone mid-request: free its KV blocks */
    pthread_mutex_unlock(&r->mu);
    hreq_unref(r);
}

/* Low latency for SSE: every chunk goes out at once (no Nagle). */
static void on_connection(void *cls, struct MHD_Connection *c, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
    (void)cls;
    (void)socket_context;
    if (toe != MHD_CONNECTION_NOTIFY_STARTED) return;
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci) return;
    int one = 1;
    setsockopt(ci->connect_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char buf[512];
    vsnprintf(buf, sizeof buf, fmt, ap);
    size_t n = strlen(buf);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r')) buf[--n] = '\0';
    fprintf(stderr, "tessera serve: http: %s\n", buf);
}

/* Bind host:port ourselves: clear errors, IPv6, and the bound port. */
static int bind_listen(const char *listen_addr, int *fd_out, int *port_out, char *err,
                       size_t err_len)
{
    char host[256];
    const char *colon = strrchr(listen_addr, ':');
    if (!colon || colon == listen_addr || !colon[1]) {
        tsr_set_err(err, err_len, "--http needs HOST:PORT (e.g. 127.0.0.1:8080), got '%s'",
                    listen_addr);
        return TSR_HTTP_EINVAL;
    }
    size_t hn = (size_t)(colon - listen_addr);
    if (hn >= sizeof host) hn = sizeof host - 1;
    memcpy(host, listen_addr, hn);
    host[hn] = '\0';
    if (host[0] == '[' && hn >= 2 && host[hn - 1] == ']') {
        memmove(host, host + 1, hn - 2);
        host[hn - 2] = '\0';
    }
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    int g = getaddrinfo(host[0] ? host : NULL, colon + 1, &hints, &res);
    if (g != 0) {
        tsr_set_err(err, err_len, "--http %s: %s", listen_addr, gai_strerror(g));
        return TSR_HTTP_EINVAL;
    }
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        tsr_set_err(err, err_len, "--http %s: socket: %s", listen_addr, strerror(errno));
        freeaddrinfo(res);
        return TSR_HTTP_EBIND;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, 128) != 0) {
        tsr_set_err(err, err_len,
                    "cannot listen on %s: %s (pick another --http, e.g. 127.0.0.1:0 for any free "
                    "port)",
                    listen_addr, strerror(errno));
        close(fd);
        freeaddrinfo(res);
        return TSR_HTTP_EBIND;
    }
    freeaddrinfo(res);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    int port = 0;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0)
        port = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                        : ntohs(((struct sockaddr_in *)&ss)->sin_port);
    *fd_out = fd;
    *port_out = port;
    return TSR_HTTP_OK;
}

/* ---- the engine backend (tessera serve) ---- */

static int eng_submit(void *ctx, const tsr_http_gen *g, uint64_t *id, char *err, size_t err_len)
{
    tsr_http *h = ctx;
    return tsr_metrics_submit(h->metrics, h->engine, &g->er, id, err, err_len);
}

static void eng_cancel(void *ctx, uint64_t id)
{
    tsr_http *h = ctx;
    tsr_engine_cancel(h->engine, id);
}

static int eng_health(void *ctx)
{
    tsr_http *h = ctx;
    tsr_engine_status st;
    tsr_engine_get_status(h->engine, &st);
    return !st.healthy ? 2 : st.draining ? 1 : 0;
}

static int eng_metrics(void *ctx, char **out, size_t *len)
{
    tsr_http *h = ctx;
    return tsr_metrics_render(h->metrics, h->engine, out, len);
}

static int http_start(const tsr_http_params *p, const tsr_http_backend *be, tsr_engine *engine,
                      tsr_http **out, int *port, char *err, size_t err_len);

int tsr_http_start(const tsr_http_params *p, tsr_engine *engine, const tsr_vocab *vocab,
                   tsr_http **out, int *port, char *err, size_t err_len)
{
    tsr_http_backend be = {.ctx = NULL, /* the server itself, set by http_start */
                           .vocab = vocab,
                           .submit = eng_submit,
                           .cancel = eng_cancel,
                           .health = eng_health,
                           .models = NULL,
                           .metrics = eng_metrics};
    return http_start(p, &be, engine, out, port, err, err_len);
}

int tsr_http_start_backend(const tsr_http_params *p, const tsr_http_backend *be, tsr_http **out,
                           int *port, char *err, size_t err_len)
{
    return http_start(p, be, NULL, out, port, err, err_len);
}

static int http_start(const tsr_http_params *p, const tsr_http_backend *be, tsr_engine *engine,
                      tsr_http **out, int *port, char *err, size_t err_len)
{
    const tsr_vocab *vocab = be->vocab;
    *out = NULL;
    if (port) *port = 0;
    if (!p || !p->listen || !be->submit || !be->cancel || !be->health || !be->metrics ||
        (engine && !vocab)) {
        tsr_set_err(err, err_len, "tsr_http_start: listen and a complete backend are required");
        return TSR_HTTP_EINVAL;
    }
    if ((p->tls_cert_pem != NULL) != (p->tls_key_pem != NULL)) {
        tsr_set_err(err, err_len, "HTTPS needs both --tls-cert and --tls-key");
        return TSR_HTTP_EINVAL;
    }
    if (p->tls_client_ca_pem && !p->tls_cert_pem) {
        tsr_set_err(err, err_len, "--tls-client-ca needs --tls-cert and --tls-key");
        return TSR_HTTP_EINVAL;
    }
    if (p->tls_cert_pem && !MHD_is_feature_supported(MHD_FEATURE_TLS)) {
        tsr_set_err(err, err_len, "this libmicrohttpd was built without TLS");
        return TSR_HTTP_EINVAL;
    }
    tsr_http *h = calloc(1, sizeof *h);
    if (!h) {
        tsr_set_err(err, err_len, "out of memory");
        return TSR_HTTP_ENOMEM;
    }
    int rc = TSR_HTTP_ENOMEM;
    h->listen_fd = -1;
    h->be = *be;
    if (engine) h->be.ctx = h;
    h->engine = engine;
    h->vocab = vocab;
    h->auth = p->auth;
    h->metrics = p->metrics;
    h->chat = p->chat;
    h->n_ctx = p->n_ctx;
    h->max_queue = p->max_queue;
    h->max_body = p->max_body_bytes > 0 ? p->max_body_bytes : TSR_HTTP_DEFAULT_MAX_BODY;
    h->created_s = (int64_t)time(NULL);
    h->model_id = strdup(p->model_id ? p->model_id : "tessera");
    h->cert = p->tls_cert_pem ? strdup(p->tls_cert_pem) : NULL;
    h->key = p->tls_key_pem ? strdup(p->tls_key_pem) : NULL;
    h->ca = p->tls_client_ca_pem ? strdup(p->tls_client_ca_pem) : NULL;
    atomic_init(&h->not_serving, false);
    atomic_init(&h->stopping, false);
    atomic_init(&h->stop_ns, 0);
    if (!h->model_id || (p->tls_cert_pem && (!h->cert || !h->key)) ||
        (p->tls_client_ca_pem && !h->ca)) {
        tsr_set_err(err, err_len, "out of memory");
        goto fail;
    }
    h->tls = h->cert != NULL;
    h->mtls = h->ca != NULL;
    h->max_piece = 1;
    for (int32_t id = 0; vocab && id < tsr_vocab_n_tokens(vocab); id++) {
        size_t len = 0;
        if (tsr_vocab_token_text(vocab, id, &len) && len + 1 > h->max_piece) h->max_piece = len + 1;
    }
    int bound = 0;
    if ((rc = bind_listen(p->listen, &h->listen_fd, &bound, err, err_len)) != 0) goto fail;

    unsigned int flags =
        MHD_USE_THREAD_PER_CONNECTION | MHD_USE_POLL_INTERNAL_THREAD | MHD_USE_ERROR_LOG;
    if (h->tls) flags |= MHD_USE_TLS;
    struct MHD_OptionItem ops[16];
    int n = 0;
    ops[n++] = (struct MHD_OptionItem){MHD_OPTION_EXTERNAL_LOGGER, (intptr_t)mhd_log, NULL};
    ops[n++] = (struct MHD_OptionItem){MHD_OPTION_LISTEN_SOCKET, h->listen_fd, NULL};
    ops[n++] = (struct MHD_OptionItem){MHD_OPTION_NOTIFY_COMPLETED, (intptr_t)on_completed, h};
    ops[n++] = (struct MHD_OptionItem){MHD_OPTION_NOTIFY_CONNECTION, (intptr_t)on_connection, h};
    ops[n++] = (struct MHD_OptionItem){MHD_OPTION_CONNECTION_LIMIT,
                                       p->connection_limit ? p->connection_limit : 256, NULL};
    ops[n++] = (struct MHD_OptionItem){MHD_OPTION_CONNECTION_TIMEOUT,
                                       p->timeout_s ? p->timeout_s : 60, NULL};
    if (h->tls) {
        ops[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_CERT, 0, h->cert};
        ops[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_KEY, 0, h->key};
        if (h->mtls) ops[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_TRUST, 0, h->ca};
    }
    ops[n++] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
    h->d = MHD_start_daemon(flags, 0, NULL, NULL, on_request, h, MHD_OPTION_ARRAY, ops,
                            MHD_OPTION_END);
    if (!h->d) {
        tsr_set_err(err, err_len, "cannot start the HTTP server on %s%s", p->listen,
                    h->tls ? ": is --tls-key the key of --tls-cert (PEM, unencrypted)?" : "");
        rc = TSR_HTTP_ESTART;
        goto fail;
    }
    if (port) *port = bound;
    *out = h;
    return TSR_HTTP_OK;
fail:
    if (h->listen_fd >= 0) close(h->listen_fd);
    free(h->model_id);
    free(h->cert);
    if (h->key) {
        memset(h->key, 0, strlen(h->key));
        free(h->key);
    }
    free(h->ca);
    free(h);
    return rc;
}

void tsr_http_set_not_serving(tsr_http *h)
{
    if (h) atomic_store(&h->not_serving, true);
}

int tsr_http_shutdown(tsr_http *h, int64_t grace_ms, char *err, size_t err_len)
{
    (void)err;
    (void)err_len;
    if (!h) return TSR_HTTP_OK;
    atomic_store(&h->not_serving, true);
    /* Streams whose request already finished in the engine flush what they have; every
     * wait of a connection thread ends at the latest STOP_EXTRA_NS after this (they check
     * stopping), so MHD_stop_daemon's joins are bounded. MHD closes the listening socket. */
    (void)grace_ms;
    atomic_store(&h->stop_ns, (long long)tsr_now_ns());
    atomic_store(&h->stopping, true);
    MHD_stop_daemon(h->d);
    free(h->model_id);
    free(h->cert);
    if (h->key) {
        memset(h->key, 0, strlen(h->key));
        free(h->key);
    }
    free(h->ca);
    free(h);
    return TSR_HTTP_OK;
}
