/*
 * batch.c — JSONL request parsing, result formatting, key sets, the resumable output file
 * and the merge of shard outputs for `tessera batch` (see batch.h for the contract).
 *
 * JSON goes through cJSON (Debian's libcjson): requests are parsed with it, results built
 * with it and printed unformatted, so every output line is one compact JSON object.
 */
#include "coordinator/batch.h"

#include "kernels/util.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- key sets: open addressing (linear probing) over offsets into one byte arena ---- */

typedef struct {
    uint64_t hash;
    uint64_t off; /* into arena: 4-byte length then the bytes; 0 = empty slot (arena[0] is
                     reserved so that no key starts at 0) */
} slot;

struct tsr_batch_keyset {
    slot *slots;
    size_t n_slots, n_keys;
    char *arena;
    size_t arena_len, arena_cap;
};

static uint64_t fnv1a(const char *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 1099511628211ull;
    }
    return h;
}

tsr_batch_keyset *tsr_batch_keyset_new(void)
{
    tsr_batch_keyset *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->n_slots = 1024;
    s->slots = calloc(s->n_slots, sizeof *s->slots);
    s->arena_cap = 16384;
    s->arena = malloc(s->arena_cap);
    if (!s->slots || !s->arena) {
        tsr_batch_keyset_free(s);
        return NULL;
    }
    s->arena_len = 1;
    return s;
}

void tsr_batch_keyset_free(tsr_batch_keyset *s)
{
    if (!s) return;
    free(s->slots);
    free(s->arena);
    free(s);
}

static bool slot_eq(const tsr_batch_keyset *s, const slot *sl, uint64_t h, const char *key,
                    size_t len)
{
    if (sl->hash != h) return false;
    uint32_t n;
    memcpy(&n, s->arena + sl->off, 4);
    return n == len && memcmp(s->arena + sl->off + 4, key, len) == 0;
}

static int keyset_grow(tsr_batch_keyset *s)
{
    size_t n = s->n_slots * 2;
    slot *ns = calloc(n, sizeof *ns);
    if (!ns) return TSR_BATCH_ENOMEM;
    for (size_t i = 0; i < s->n_slots; i++) {
        if (!s->slots[i].off) continue;
        size_t j = s->slots[i].hash & (n - 1);
        while (ns[j].off) j = (j + 1) & (n - 1);
        ns[j] = s->slots[i];
    }
    free(s->slots);
    s->slots = ns;
    s->n_slots = n;
    return 0;
}

int tsr_batch_keyset_add(tsr_batch_keyset *s, const char *key, size_t len)
{
    if (len > UINT32_MAX) return TSR_BATCH_ENOMEM;
    uint64_t h = fnv1a(key, len);
    size_t j = h & (s->n_slots - 1);
    while (s->slots[j].off) {
        if (slot_eq(s, &s->slots[j], h, key, len)) return 0;
        j = (j + 1) & (s->n_slots - 1);
    }
    /* Load factor at most 1/2: probes stay short. */
    if ((s->n_keys + 1) * 2 > s->n_slots) {
        if (keyset_grow(s) != 0) return TSR_BATCH_ENOMEM;
        j = h & (s->n_slots - 1);
        while (s->slots[j].off) j = (j + 1) & (s->n_slots - 1);
    }
    if (s->arena_len + 4 + len > s->arena_cap) {
        size_t cap = s->arena_cap * 2;
        while (cap < s->arena_len + 4 + len) cap *= 2;
        char *a = realloc(s->arena, cap);
        if (!a) return TSR_BATCH_ENOMEM;
        s->arena = a;
        s->arena_cap = cap;
    }
    uint32_t n = (uint32_t)len;
    memcpy(s->arena + s->arena_len, &n, 4);
    memcpy(s->arena + s->arena_len + 4, key, len);
    s->slots[j].hash = h;
    s->slots[j].off = s->arena_len;
    s->arena_len += 4 + len;
    s->n_keys++;
    return 1;
}

bool tsr_batch_keyset_has(const tsr_batch_keyset *s, const char *key, size_t len)
{
    uint64_t h = fnv1a(key, len);
    size_t j = h & (s->n_slots - 1);
    while (s->slots[j].off) {
        if (slot_eq(s, &s->slots[j], h, key, len)) return true;
        j = (j + 1) & (s->n_slots - 1);
    }
    return false;
}

size_t tsr_batch_keyset_count(const tsr_batch_keyset *s)
{
    return s->n_keys;
}

size_t tsr_batch_keyset_bytes(const tsr_batch_keyset *s)
{
    return sizeof *s + s->n_slots * sizeof(slot) + s->arena_cap;
}

size_t tsr_batch_line_key(int64_t line_no, char *buf, size_t cap)
{
    int n = snprintf(buf, cap, "\x01line:%" PRId64, line_no);
    return n < 0 ? 0 : (size_t)n < cap ? (size_t)n : cap - 1;
}

/* ---- the line reader ---- */

int tsr_batch_reader_init(tsr_batch_reader *r, FILE *f, size_t max_bytes)
{
    memset(r, 0, sizeof *r);
    r->f = f;
    r->max_bytes = max_bytes;
    r->cap = 4096;
    r->buf = malloc(r->cap);
    return r->buf ? 0 : TSR_BATCH_ENOMEM;
}

void tsr_batch_reader_free(tsr_batch_reader *r)
{
    free(r->buf);
    r->buf = NULL;
}

int tsr_batch_reader_next(tsr_batch_reader *r)
{
    r->len = 0;
    r->too_long = false;
    bool any = false;
    int c;
    /* getc_unlocked: one reader thread owns the FILE. */
    while ((c = getc_unlocked(r->f)) != EOF) {
        any = true;
        r->n_bytes_read++;
        if (c == '\n') break;
        if (r->too_long) continue;
        if (r->len >= r->max_bytes) {
            r->too_long = true;
            r->len = 0;
            continue;
        }
        if (r->len + 1 >= r->cap) {
            size_t cap = r->cap * 2;
            char *b = realloc(r->buf, cap);
            if (!b) return TSR_BATCH_ENOMEM;
            r->buf = b;
            r->cap = cap;
        }
        r->buf[r->len++] = (char)c;
    }
    if (ferror(r->f)) return TSR_BATCH_EIO;
    if (!any) return 0;
    r->buf[r->len] = '\0';
    r->line_no++;
    return 1;
}

bool tsr_batch_line_blank(const char *line, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (line[i] != ' ' && line[i] != '\t' && line[i] != '\r') return false;
    return true;
}

/* ---- parsing ---- */

void tsr_batch_request_free(tsr_batch_request *rq)
{
    free(rq->custom_id);
    free(rq->prompt);
    free(rq->prompt_ids);
    free(rq->messages_json);
    free(rq->model);
    for (size_t i = 0; i < rq->n_stop; i++) free(rq->stop[i]);
    free(rq->stop);
    free(rq->stop_ids);
    memset(rq, 0, sizeof *rq);
}

static bool valid_custom_id(const cJSON *c)
{
    if (!cJSON_IsString(c) || !c->valuestring || !c->valuestring[0]) return false;
    for (const unsigned char *p = (const unsigned char *)c->valuestring; *p; p++)
        if (*p < 0x20 || *p == 0x7f) return false;
    return true;
}

#define BAD(...)                                                                                   \
    do {                                                                                           \
        tsr_set_err(err, err_len, __VA_ARGS__);                                                    \
        return false;                                                                              \
    } while (0)

static bool get_int(const cJSON *v, const char *name, int64_t lo, int64_t hi, int64_t *out,
                    char *err, size_t err_len)
{
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) ||
        v->valuedouble < (double)lo || v->valuedouble > (double)hi)
        BAD("%s must be an integer in %" PRId64 "..%" PRId64, name, lo, hi);
    *out = (int64_t)v->valuedouble;
    return true;
}

static bool get_float(const cJSON *v, const char *name, float *out, char *err, size_t err_len)
{
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble)) BAD("%s must be a number", name);
    *out = (float)v->valuedouble;
    return true;
}

static bool get_bool(const cJSON *v, const char *name, bool *out, char *err, size_t err_len)
{
    if (!cJSON_IsBool(v)) BAD("%s must be true or false", name);
    *out = cJSON_IsTrue(v);
    return true;
}

static bool add_stop(tsr_batch_request *rq, const cJSON *v, char *err, size_t err_len)
{
    if (!cJSON_IsString(v)) BAD("stop must be a string or an array of strings");
    size_t n = strlen(v->valuestring);
    if (n == 0 || n > TSR_BATCH_MAX_STOP_LEN)
        BAD("stop: a stop string must be 1..%d bytes, got %zu", TSR_BATCH_MAX_STOP_LEN, n);
    if (rq->n_stop == TSR_BATCH_MAX_STOP) BAD("stop: at most %d strings", TSR_BATCH_MAX_STOP);
    if (!rq->stop) {
        rq->stop = calloc(TSR_BATCH_MAX_STOP, sizeof *rq->stop);
        if (!rq->stop) BAD("out of memory");
    }
    rq->stop[rq->n_stop] = strdup(v->valuestring);
    if (!rq->stop[rq->n_stop]) BAD("out of memory");
    rq->n_stop++;
    return true;
}

/* The body fields (of a /v1/completions or /v1/chat/completions body, or of a plain line
 * minus custom_id). Unknown fields are an error: a typo must not silently change what is
 * generated. */
static bool parse_body(const cJSON *body, tsr_batch_request *rq, bool plain, char *err,
                       size_t err_len)
{
    const bool chat = rq->kind == TSR_BATCH_CHAT;
    tsr_sampling_params_default(&rq->gen.sampling);
    rq->gen.max_tokens = TSR_BATCH_DEFAULT_MAX_TOKENS;
    rq->add_special = true;
    bool have_prompt = false, top_logprobs_set = false;
    int64_t top_logprobs = 0;
    for (const cJSON *f = body->child; f; f = f->next) {
        const char *k = f->string;
        int64_t iv;
        if (!strcmp(k, "custom_id") && plain) {
            continue;
        } else if (!strcmp(k, "model")) {
            if (!cJSON_IsString(f)) BAD("model must be a string");
            free(rq->model);
            rq->model = strdup(f->valuestring);
            if (!rq->model) BAD("out of memory");
        } else if (!strcmp(k, "prompt") && !chat) {
            have_prompt = true;
            const cJSON *p = f;
            /* A one-element array of one prompt is the same prompt (OpenAI allows arrays
             * of prompts; a batch line is one request, so exactly one). */
            if (cJSON_IsArray(p) && cJSON_GetArraySize(p) == 1 &&
                cJSON_IsString(cJSON_GetArrayItem(p, 0)))
                p = cJSON_GetArrayItem(p, 0);
            if (cJSON_IsString(p)) {
                if (!p->valuestring[0]) BAD("prompt is empty");
                rq->prompt = strdup(p->valuestring);
                if (!rq->prompt) BAD("out of memory");
            } else if (cJSON_IsArray(p)) {
                int n = cJSON_GetArraySize(p);
                if (n == 0) BAD("prompt is empty");
                rq->prompt_ids = malloc(sizeof(int32_t) * (size_t)n);
                if (!rq->prompt_ids) BAD("out of memory");
                int i = 0;
                for (const cJSON *e = p->child; e; e = e->next, i++) {
                    if (!get_int(e, "prompt (token ids)", 0, INT32_MAX, &iv, err, err_len))
                        BAD("prompt must be a string, or an array of token ids (integers >= "
                            "0); one request per line");
                    rq->prompt_ids[i] = (int32_t)iv;
                }
                rq->n_prompt_ids = (size_t)n;
            } else {
                BAD("prompt must be a string or an array of token ids");
            }
        } else if (!strcmp(k, "messages") && chat) {
            if (!cJSON_IsArray(f) || cJSON_GetArraySize(f) == 0)
                BAD("messages must be a non-empty array of {role, content}");
            for (const cJSON *m = f->child; m; m = m->next) {
                if (!cJSON_IsObject(m) || !cJSON_IsString(cJSON_GetObjectItem(m, "role")))
                    BAD("messages: every message needs a string role");
            }
            have_prompt = true;
            rq->messages_json = cJSON_PrintUnformatted(f);
            if (!rq->messages_json) BAD("out of memory");
        } else if (!strcmp(k, "max_tokens") || (chat && !strcmp(k, "max_completion_tokens"))) {
            if (!get_int(f, k, 1, 1 << 24, &iv, err, err_len)) return false;
            rq->gen.max_tokens = (int32_t)iv;
        } else if (!strcmp(k, "temperature")) {
            if (!get_float(f, k, &rq->gen.sampling.temperature, err, err_len)) return false;
        } else if (!strcmp(k, "top_p")) {
            if (!get_float(f, k, &rq->gen.sampling.top_p, err, err_len)) return false;
        } else if (!strcmp(k, "top_k")) {
            if (!get_int(f, k, -1, INT32_MAX, &iv, err, err_len)) return false;
            rq->gen.sampling.top_k = iv < 0 ? 0 : (int32_t)iv;
        } else if (!strcmp(k, "min_p")) {
            if (!get_float(f, k, &rq->gen.sampling.min_p, err, err_len)) return false;
        } else if (!strcmp(k, "repetition_penalty")) {
            if (!get_float(f, k, &rq->gen.sampling.repetition_penalty, err, err_len)) return false;
        } else if (!strcmp(k, "presence_penalty")) {
            if (!get_float(f, k, &rq->gen.sampling.presence_penalty, err, err_len)) return false;
        } else if (!strcmp(k, "frequency_penalty")) {
            if (!get_float(f, k, &rq->gen.sampling.frequency_penalty, err, err_len)) return false;
        } else if (!strcmp(k, "seed")) {
            /* JSON numbers are doubles: integers are exact up to 2^53. */
            if (!get_int(f, k, 0, (int64_t)1 << 53, &iv, err, err_len)) return false;
            rq->gen.sampling.seed = (uint64_t)iv;
            rq->has_seed = true;
        } else if (!strcmp(k, "stop")) {
            if (cJSON_IsArray(f)) {
                for (const cJSON *e = f->child; e; e = e->next)
                    if (!add_stop(rq, e, err, err_len)) return false;
            } else if (!cJSON_IsNull(f)) {
                if (!add_stop(rq, f, err, err_len)) return false;
            }
        } else if (!strcmp(k, "stop_token_ids")) {
            if (!cJSON_IsArray(f)) BAD("stop_token_ids must be an array of token ids");
            int n = cJSON_GetArraySize(f);
            free(rq->stop_ids);
            rq->stop_ids = n ? malloc(sizeof(int32_t) * (size_t)n) : NULL;
            if (n && !rq->stop_ids) BAD("out of memory");
            int i = 0;
            for (const cJSON *e = f->child; e; e = e->next, i++) {
                if (!get_int(e, "stop_token_ids[]", 0, INT32_MAX, &iv, err, err_len)) return false;
                rq->stop_ids[i] = (int32_t)iv;
            }
            rq->n_stop_ids = (size_t)n;
        } else if (!strcmp(k, "ignore_eos")) {
            if (!get_bool(f, k, &rq->gen.ignore_eos, err, err_len)) return false;
        } else if (!strcmp(k, "add_special_tokens")) {
            if (!get_bool(f, k, &rq->add_special, err, err_len)) return false;
        } else if (!strcmp(k, "logprobs")) {
            if (chat) {
                if (!get_bool(f, k, &rq->want_logprobs, err, err_len)) return false;
            } else if (!cJSON_IsNull(f)) {
                if (!get_int(f, k, 0, TSR_BATCH_MAX_LOGPROBS, &iv, err, err_len)) return false;
                rq->logprobs = (int32_t)iv;
                rq->want_logprobs = true;
            }
        } else if (!strcmp(k, "top_logprobs") && chat) {
            if (!get_int(f, k, 0, TSR_BATCH_MAX_LOGPROBS, &top_logprobs, err, err_len))
                return false;
            top_logprobs_set = true;
        } else if (!strcmp(k, "n")) {
            if (!get_int(f, k, 1, 1, &iv, err, err_len))
                BAD("n: only 1 choice per line is supported (write one line per sample)");
        } else if (!strcmp(k, "stream")) {
            bool st;
            if (!get_bool(f, k, &st, err, err_len)) return false;
            if (st) BAD("stream: true is not supported in a batch (results are whole lines)");
        } else if (!strcmp(k, "echo")) {
            bool e;
            if (!get_bool(f, k, &e, err, err_len)) return false;
            if (e) BAD("echo: true is not supported");
        } else if (!strcmp(k, "user")) {
            if (!cJSON_IsString(f)) BAD("user must be a string");
        } else {
            BAD("unknown field '%s'%s; accepted: model, %s, max_tokens, temperature, top_p, "
                "top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty, seed, "
                "stop, stop_token_ids, ignore_eos, add_special_tokens, logprobs%s, n, stream, "
                "echo, user",
                k, plain ? " in the line" : " in the body", chat ? "messages" : "prompt",
                chat ? ", top_logprobs, max_completion_tokens" : "");
        }
    }
    if (!have_prompt) BAD(chat ? "messages is missing" : "prompt is missing");
    if (chat) {
        if (top_logprobs_set && !rq->want_logprobs) BAD("top_logprobs needs logprobs: true");
        rq->logprobs = (int32_t)top_logprobs;
    }
    rq->gen.stop = (const char *const *)rq->stop;
    rq->gen.n_stop = rq->n_stop;
    rq->gen.stop_ids = rq->stop_ids;
    rq->gen.n_stop_ids = rq->n_stop_ids;
    if (tsr_sampling_params_validate(&rq->gen.sampling, err, err_len) != 0) return false;
    return true;
}

int tsr_batch_parse_line(const char *line, size_t len, tsr_batch_request *rq, const char **code,
                         char *err, size_t err_len)
{
    memset(rq, 0, sizeof *rq);
    *code = "invalid_request";
    const char *end = NULL;
    cJSON *j = cJSON_ParseWithLengthOpts(line, len, &end, false);
    if (!j) {
        *code = "invalid_json";
        size_t at = end && end >= line ? (size_t)(end - line) : 0;
        tsr_set_err(err, err_len, "not valid JSON (error near byte %zu of the line)", at + 1);
        return TSR_BATCH_EINVAL;
    }
    /* Nothing but whitespace may follow the object. */
    for (const char *p = end; p && p < line + len; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\r') {
            *code = "invalid_json";
            tsr_set_err(err, err_len, "not valid JSON: text after the object at byte %zu",
                        (size_t)(p - line) + 1);
            cJSON_Delete(j);
            return TSR_BATCH_EINVAL;
        }
    }
    bool ok = false;
    if (!cJSON_IsObject(j)) {
        tsr_set_err(err, err_len, "a line must be a JSON object");
        goto done;
    }
    const cJSON *cid = cJSON_GetObjectItemCaseSensitive(j, "custom_id");
    if (valid_custom_id(cid)) {
        rq->custom_id = strdup(cid->valuestring);
        if (!rq->custom_id) {
            tsr_set_err(err, err_len, "out of memory");
            goto done;
        }
    } else {
        tsr_set_err(err, err_len,
                    cid ? "custom_id must be a non-empty string without control characters"
                        : "custom_id is missing: every line needs a unique string custom_id");
        goto done;
    }
    const cJSON *url = cJSON_GetObjectItemCaseSensitive(j, "url");
    const cJSON *body = cJSON_GetObjectItemCaseSensitive(j, "body");
    if (url || body || cJSON_GetObjectItemCaseSensitive(j, "method")) {
        /* OpenAI Batch API line: custom_id, method, url, body and nothing else. */
        for (const cJSON *f = j->child; f; f = f->next) {
            if (strcmp(f->string, "custom_id") && strcmp(f->string, "method") &&
                strcmp(f->string, "url") && strcmp(f->string, "body")) {
                tsr_set_err(err, err_len,
                            "unknown field '%s' in the line; a Batch API line has custom_id, "
                            "method, url and body",
                            f->string);
                goto done;
            }
        }
        const cJSON *method = cJSON_GetObjectItemCaseSensitive(j, "method");
        if (method && !(cJSON_IsString(method) && !strcmp(method->valuestring, "POST"))) {
            tsr_set_err(err, err_len, "method must be \"POST\"");
            goto done;
        }
        if (!cJSON_IsString(url)) {
            tsr_set_err(err, err_len,
                        "url is missing: \"/v1/completions\" or \"/v1/chat/completions\"");
            goto done;
        }
        if (!strcmp(url->valuestring, "/v1/completions"))
            rq->kind = TSR_BATCH_COMPLETION;
        else if (!strcmp(url->valuestring, "/v1/chat/completions"))
            rq->kind = TSR_BATCH_CHAT;
        else {
            tsr_set_err(err, err_len,
                        "url '%.100s' is not supported: use \"/v1/completions\" or "
                        "\"/v1/chat/completions\"",
                        url->valuestring);
            goto done;
        }
        if (!cJSON_IsObject(body)) {
            tsr_set_err(err, err_len, "body must be a JSON object");
            goto done;
        }
        if (!parse_body(body, rq, false, err, err_len)) goto done;
    } else {
        rq->kind = TSR_BATCH_COMPLETION;
        if (!parse_body(j, rq, true, err, err_len)) goto done;
    }
    ok = true;
done:
    cJSON_Delete(j);
    if (!ok) {
        /* Keep custom_id (the error line carries it); drop the rest. */
        char *keep = rq->custom_id;
        rq->custom_id = NULL;
        tsr_batch_request_free(rq);
        rq->custom_id = keep;
        return TSR_BATCH_EINVAL;
    }
    return TSR_BATCH_OK;
}

int tsr_batch_input_key(const char *line, size_t len, int64_t line_no, char **key, size_t *key_len)
{
    cJSON *j = cJSON_ParseWithLengthOpts(line, len, NULL, false);
    const cJSON *cid = j ? cJSON_GetObjectItemCaseSensitive(j, "custom_id") : NULL;
    if (cJSON_IsObject(j) && valid_custom_id(cid)) {
        *key = strdup(cid->valuestring);
        *key_len = *key ? strlen(*key) : 0;
    } else {
        char buf[64];
        size_t n = tsr_batch_line_key(line_no, buf, sizeof buf);
        *key = malloc(n + 1);
        if (*key) memcpy(*key, buf, n + 1);
        *key_len = n;
    }
    cJSON_Delete(j);
    return *key ? 0 : TSR_BATCH_ENOMEM;
}

/* ---- formatting ---- */

static int print_line(cJSON *o, char **out, size_t *out_len)
{
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!s) return TSR_BATCH_ENOMEM;
    size_t n = strlen(s);
    char *l = realloc(s, n + 2);
    if (!l) {
        free(s);
        return TSR_BATCH_ENOMEM;
    }
    l[n] = '\n';
    l[n + 1] = '\0';
    *out = l;
    *out_len = n + 1;
    return 0;
}

static void request_ids(const char *key, size_t len, char *out, size_t cap, const char *prefix)
{
    snprintf(out, cap, "%s%016" PRIx64, prefix, fnv1a(key, len));
}

/* cJSON strings are NUL-terminated, but generated text can hold a NUL byte (an SPM <0x00>
 * byte token): each becomes U+FFFD, so the line stays valid JSON and nothing is cut. */
static char *text_copy(const char *t, size_t n)
{
    size_t nul = 0;
    for (size_t i = 0; i < n; i++) nul += t[i] == '\0';
    char *s = malloc(n + 2 * nul + 1), *p = s;
    if (!s) return NULL;
    for (size_t i = 0; i < n; i++) {
        if (t[i] == '\0') {
            memcpy(p, "\xef\xbf\xbd", 3);
            p += 3;
        } else {
            *p++ = t[i];
        }
    }
    *p = '\0';
    return s;
}

static cJSON *logprobs_json(const tsr_batch_result *r)
{
    cJSON *lp = cJSON_CreateObject();
    if (r->chat) {
        cJSON *content = cJSON_AddArrayToObject(lp, "content");
        for (size_t i = 0; i < r->n_ids; i++) {
            cJSON *t = cJSON_CreateObject();
            cJSON_AddStringToObject(t, "token", r->pieces[i]);
            cJSON_AddNumberToObject(t, "logprob", r->chosen[i]);
            cJSON *top = cJSON_AddArrayToObject(t, "top_logprobs");
            for (int32_t k = 0; k < r->n_top; k++) {
                size_t at = i * (size_t)r->n_top + (size_t)k;
                cJSON *e = cJSON_CreateObject();
                cJSON_AddStringToObject(e, "token", r->top_pieces[at]);
                cJSON_AddNumberToObject(e, "logprob", r->top_lps[at]);
                cJSON_AddItemToArray(top, e);
            }
            cJSON_AddItemToArray(content, t);
        }
        return lp;
    }
    cJSON *toks = cJSON_AddArrayToObject(lp, "tokens");
    cJSON *tlp = cJSON_AddArrayToObject(lp, "token_logprobs");
    cJSON *top = cJSON_AddArrayToObject(lp, "top_logprobs");
    cJSON *off = cJSON_AddArrayToObject(lp, "text_offset");
    size_t at_text = 0;
    for (size_t i = 0; i < r->n_ids; i++) {
        cJSON_AddItemToArray(toks, cJSON_CreateString(r->pieces[i]));
        cJSON_AddItemToArray(tlp, cJSON_CreateNumber(r->chosen[i]));
        cJSON_AddItemToArray(off, cJSON_CreateNumber((double)at_text));
        at_text += strlen(r->pieces[i]);
        cJSON *m = cJSON_CreateObject();
        for (int32_t k = 0; k < r->n_top; k++) {
            size_t at = i * (size_t)r->n_top + (size_t)k;
            /* Two ids with the same text keep the more likely (listed first). */
            if (!cJSON_GetObjectItemCaseSensitive(m, r->top_pieces[at]))
                cJSON_AddNumberToObject(m, r->top_pieces[at], r->top_lps[at]);
        }
        cJSON_AddItemToArray(top, m);
    }
    return lp;
}

int tsr_batch_format_result(const tsr_batch_result *r, char **out, size_t *out_len)
{
    size_t klen = strlen(r->custom_id);
    char id[64], cmpl[64];
    request_ids(r->custom_id, klen, id, sizeof id, "batch_req_");
    request_ids(r->custom_id, klen, cmpl, sizeof cmpl, r->chat ? "chatcmpl-" : "cmpl-");
    char *text = text_copy(r->text ? r->text : "", r->text ? r->text_len : 0);
    if (!text) return TSR_BATCH_ENOMEM;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", id);
    cJSON_AddStringToObject(o, "custom_id", r->custom_id);
    cJSON *resp = cJSON_AddObjectToObject(o, "response");
    cJSON_AddNumberToObject(resp, "status_code", 200);
    cJSON_AddStringToObject(resp, "request_id", id);
    cJSON *b = cJSON_AddObjectToObject(resp, "body");
    cJSON_AddStringToObject(b, "id", cmpl);
    cJSON_AddStringToObject(b, "object", r->chat ? "chat.completion" : "text_completion");
    cJSON_AddStringToObject(b, "model", r->model ? r->model : "");
    cJSON *choices = cJSON_AddArrayToObject(b, "choices");
    cJSON *c = cJSON_CreateObject();
    cJSON_AddNumberToObject(c, "index", 0);
    if (r->chat) {
        cJSON *m = cJSON_AddObjectToObject(c, "message");
        cJSON_AddStringToObject(m, "role", "assistant");
        cJSON_AddStringToObject(m, "content", text);
    } else {
        cJSON_AddStringToObject(c, "text", text);
    }
    free(text);
    if (r->want_logprobs)
        cJSON_AddItemToObject(c, "logprobs", logprobs_json(r));
    else
        cJSON_AddNullToObject(c, "logprobs");
    /* OpenAI has "stop" for a stop sequence and for the end-of-generation token alike. */
    cJSON_AddStringToObject(c, "finish_reason",
                            r->finish_reason == TSR_FINISH_LENGTH ? "length" : "stop");
    cJSON *ids = cJSON_AddArrayToObject(c, "token_ids"); /* vLLM's extension */
    for (size_t i = 0; i < r->n_ids; i++) cJSON_AddItemToArray(ids, cJSON_CreateNumber(r->ids[i]));
    cJSON_AddItemToArray(choices, c);
    cJSON *u = cJSON_AddObjectToObject(b, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", r->n_prompt_tokens);
    cJSON_AddNumberToObject(u, "completion_tokens", (double)r->n_ids);
    cJSON_AddNumberToObject(u, "total_tokens", (double)r->n_prompt_tokens + (double)r->n_ids);
    cJSON_AddNullToObject(o, "error");
    return print_line(o, out, out_len);
}

int tsr_batch_format_error(const char *custom_id, int64_t line_no, const char *code,
                           const char *message, char **out, size_t *out_len)
{
    char key[64], id[64];
    size_t klen;
    if (custom_id) {
        klen = strlen(custom_id);
        request_ids(custom_id, klen, id, sizeof id, "batch_req_");
    } else {
        klen = tsr_batch_line_key(line_no, key, sizeof key);
        request_ids(key, klen, id, sizeof id, "batch_req_");
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", id);
    if (custom_id)
        cJSON_AddStringToObject(o, "custom_id", custom_id);
    else
        cJSON_AddNullToObject(o, "custom_id");
    cJSON_AddNullToObject(o, "response");
    cJSON *e = cJSON_AddObjectToObject(o, "error");
    cJSON_AddStringToObject(e, "code", code);
    cJSON_AddStringToObject(e, "message", message);
    cJSON_AddNumberToObject(o, "line", (double)line_no);
    return print_line(o, out, out_len);
}

/* ---- scanning an output file ---- */

/* The key of an output line; false when the line is not one of ours. */
static bool output_key(const char *line, size_t len, char *kbuf, size_t kcap, const char **key,
                       size_t *key_len, cJSON **hold)
{
    cJSON *j = cJSON_ParseWithLengthOpts(line, len, NULL, false);
    *hold = j;
    if (!cJSON_IsObject(j)) return false;
    const cJSON *cid = cJSON_GetObjectItemCaseSensitive(j, "custom_id");
    if (valid_custom_id(cid)) {
        *key = cid->valuestring;
        *key_len = strlen(cid->valuestring);
        return true;
    }
    const cJSON *ln = cJSON_GetObjectItemCaseSensitive(j, "line");
    if (cJSON_IsNull(cid) && cJSON_IsNumber(ln) && ln->valuedouble >= 1) {
        *key_len = tsr_batch_line_key((int64_t)ln->valuedouble, kbuf, kcap);
        *key = kbuf;
        return true;
    }
    return false;
}

/* Read every line of path, calling fn on each complete, valid one; stops at the first bad
 * line. *good_end gets the byte offset after the last good line, *bad_line the 1-based
 * number of a bad line (0: none) and *bad_is_last whether it was the last. */
typedef int (*line_fn)(void *ud, const char *key, size_t key_len, const char *line, size_t len,
                       int64_t line_no);

static int scan_lines(const char *path, bool missing_ok, line_fn fn, void *ud, uint64_t *n_lines,
                      uint64_t *good_end, int64_t *bad_line, bool *bad_is_last, char *err,
                      size_t err_len)
{
    *n_lines = 0;
    *good_end = 0;
    *bad_line = 0;
    *bad_is_last = false;
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (errno == ENOENT && missing_ok) return 0;
        tsr_set_err(err, err_len, "cannot read %s: %s", path, strerror(errno));
        return TSR_BATCH_EIO;
    }
    tsr_batch_reader r;
    if (tsr_batch_reader_init(&r, f, (size_t)1 << 30) != 0) {
        fclose(f);
        tsr_set_err(err, err_len, "out of memory");
        return TSR_BATCH_ENOMEM;
    }
    int rc = 0, k;
    uint64_t off = 0;
    while ((k = tsr_batch_reader_next(&r)) == 1) {
        bool has_nl = r.n_bytes_read - off == r.len + 1;
        char kbuf[64];
        const char *key = NULL;
        size_t key_len = 0;
        cJSON *hold = NULL;
        bool ok = has_nl && !r.too_long &&
                  output_key(r.buf, r.len, kbuf, sizeof kbuf, &key, &key_len, &hold);
        if (!ok) {
            cJSON_Delete(hold);
            *bad_line = r.line_no;
            /* The last line? Look for more bytes. */
            int c = getc_unlocked(f);
            *bad_is_last = c == EOF;
            break;
        }
        rc = fn(ud, key, key_len, r.buf, r.len, r.line_no);
        cJSON_Delete(hold);
        if (rc != 0) break;
        off = r.n_bytes_read;
        *good_end = off;
        (*n_lines)++;
    }
    if (k < 0) {
        tsr_set_err(err, err_len, "cannot read %s: %s", path, strerror(errno));
        rc = TSR_BATCH_EIO;
    }
    tsr_batch_reader_free(&r);
    fclose(f);
    return rc;
}

typedef struct {
    tsr_batch_keyset *set;
    const char *path;
    char *err;
    size_t err_len;
    /* merge: where lines go */
    FILE *out;
} scan_ctx;

static int add_key(void *ud, const char *key, size_t key_len, const char *line, size_t len,
                   int64_t line_no)
{
    scan_ctx *c = ud;
    int r = tsr_batch_keyset_add(c->set, key, key_len);
    if (r < 0) {
        tsr_set_err(c->err, c->err_len, "out of memory");
        return r;
    }
    if (r == 0) {
        if (key[0] == '\x01')
            tsr_set_err(c->err, c->err_len,
                        "%s line %" PRId64 ": the error of input %s is there twice", c->path,
                        line_no, key + 1);
        else
            tsr_set_err(c->err, c->err_len,
                        "%s line %" PRId64 ": custom_id '%.200s' is there twice", c->path, line_no,
                        key);
        return TSR_BATCH_EDUP;
    }
    if (c->out && (fwrite(line, 1, len, c->out) != len || fputc('\n', c->out) == EOF)) {
        tsr_set_err(c->err, c->err_len, "cannot write: %s", strerror(errno));
        return TSR_BATCH_EIO;
    }
    return 0;
}

int tsr_batch_scan_output(const char *path, bool truncate_torn, tsr_batch_keyset *done,
                          uint64_t *n_lines, uint64_t *n_bytes_torn, char *err, size_t err_len)
{
    scan_ctx c = {.set = done, .path = path, .err = err, .err_len = err_len};
    uint64_t good_end;
    int64_t bad;
    bool bad_last;
    *n_bytes_torn = 0;
    int rc = scan_lines(path, true, add_key, &c, n_lines, &good_end, &bad, &bad_last, err, err_len);
    if (rc == TSR_BATCH_EDUP) return TSR_BATCH_ECORRUPT;
    if (rc != 0) return rc;
    if (!bad) return 0;
    if (!bad_last) {
        tsr_set_err(err, err_len,
                    "%s line %" PRId64 " is not a result line of tessera batch, and more lines "
                    "follow: this output file was not written by tessera batch (or was edited); "
                    "move it away or name another -o",
                    path, bad);
        return TSR_BATCH_ECORRUPT;
    }
    struct stat st;
    if (stat(path, &st) != 0) {
        tsr_set_err(err, err_len, "cannot stat %s: %s", path, strerror(errno));
        return TSR_BATCH_EIO;
    }
    if (!truncate_torn) {
        tsr_set_err(err, err_len,
                    "%s: the last line (%" PRId64 ") is torn (cut short by a crash): the run that "
                    "writes this file did not finish; rerun it (it repairs the file) before "
                    "merging",
                    path, bad);
        return TSR_BATCH_ECORRUPT;
    }
    *n_bytes_torn = (uint64_t)st.st_size - good_end;
    if (truncate(path, (off_t)good_end) != 0) {
        tsr_set_err(err, err_len, "cannot cut the torn last line of %s: %s", path, strerror(errno));
        return TSR_BATCH_EIO;
    }
    return 0;
}

/* ---- the output file ---- */

int tsr_batch_out_open(tsr_batch_out *o, const char *path, char *err, size_t err_len)
{
    memset(o, 0, sizeof *o);
    o->fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (o->fd < 0) {
        tsr_set_err(err, err_len, "cannot open %s for appending: %s", path, strerror(errno));
        return TSR_BATCH_EIO;
    }
    return 0;
}

int tsr_batch_out_add(tsr_batch_out *o, const char *line, size_t len)
{
    if (o->len + len > o->cap) {
        size_t cap = o->cap ? o->cap * 2 : 65536;
        while (cap < o->len + len) cap *= 2;
        char *b = realloc(o->buf, cap);
        if (!b) return TSR_BATCH_ENOMEM;
        o->buf = b;
        o->cap = cap;
    }
    memcpy(o->buf + o->len, line, len);
    o->len += len;
    o->n_lines_buffered++;
    return 0;
}

int tsr_batch_out_flush(tsr_batch_out *o, char *err, size_t err_len)
{
    if (o->fd < 0) return 0;
    size_t at = 0;
    while (at < o->len) {
        ssize_t w = write(o->fd, o->buf + at, o->len - at);
        if (w < 0) {
            if (errno == EINTR) continue;
            tsr_set_err(err, err_len, "cannot write the output: %s", strerror(errno));
            /* Keep what was not written: a later flush may succeed (ENOSPC cleared). The
             * part already written may end in a torn line; a rerun cuts it away. */
            memmove(o->buf, o->buf + at, o->len - at);
            o->len -= at;
            return TSR_BATCH_EIO;
        }
        at += (size_t)w;
    }
    o->len = 0;
    if (fsync(o->fd) != 0 && errno != EINVAL) {
        tsr_set_err(err, err_len, "cannot fsync the output: %s", strerror(errno));
        return TSR_BATCH_EIO;
    }
    o->n_lines_written += o->n_lines_buffered;
    o->n_lines_buffered = 0;
    o->n_flushes++;
    return 0;
}

int tsr_batch_out_close(tsr_batch_out *o, char *err, size_t err_len)
{
    int rc = tsr_batch_out_flush(o, err, err_len);
    if (o->fd >= 0 && close(o->fd) != 0 && rc == 0) {
        tsr_set_err(err, err_len, "cannot close the output: %s", strerror(errno));
        rc = TSR_BATCH_EIO;
    }
    o->fd = -1;
    free(o->buf);
    o->buf = NULL;
    o->len = o->cap = 0;
    return rc;
}

/* ---- merge ---- */

int tsr_batch_merge(const char *out_path, const char *const *in_paths, size_t n_in,
                    const char *input_path, uint64_t *n_lines, char *err, size_t err_len)
{
    *n_lines = 0;
    size_t plen = strlen(out_path);
    char *tmp = malloc(plen + 5);
    tsr_batch_keyset *set = tsr_batch_keyset_new();
    FILE *out = NULL;
    int rc = TSR_BATCH_ENOMEM;
    if (!tmp || !set) {
        tsr_set_err(err, err_len, "out of memory");
        goto done;
    }
    memcpy(tmp, out_path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    out = fopen(tmp, "wb");
    if (!out) {
        tsr_set_err(err, err_len, "cannot create %s: %s", tmp, strerror(errno));
        rc = TSR_BATCH_EIO;
        goto done;
    }
    for (size_t i = 0; i < n_in; i++) {
        scan_ctx c = {.set = set, .path = in_paths[i], .err = err, .err_len = err_len, .out = out};
        uint64_t n, good_end;
        int64_t bad;
        bool bad_last;
        rc = scan_lines(in_paths[i], false, add_key, &c, &n, &good_end, &bad, &bad_last, err,
                        err_len);
        if (rc != 0) goto done;
        if (bad) {
            tsr_set_err(err, err_len,
                        bad_last ? "%s line %" PRId64 " is torn (cut short by a crash): that shard "
                                   "did not finish; rerun it, then merge"
                                 : "%s line %" PRId64 " is not a result line of tessera batch",
                        in_paths[i], bad);
            rc = TSR_BATCH_ECORRUPT;
            goto done;
        }
        *n_lines += n;
    }
    if (input_path) {
        /* Every line of the input needs its output line. */
        FILE *in = fopen(input_path, "rb");
        if (!in) {
            tsr_set_err(err, err_len, "cannot read %s: %s", input_path, strerror(errno));
            rc = TSR_BATCH_EIO;
            goto done;
        }
        tsr_batch_reader r;
        if (tsr_batch_reader_init(&r, in, (size_t)64 << 20) != 0) {
            fclose(in);
            rc = TSR_BATCH_ENOMEM;
            goto done;
        }
        uint64_t missing = 0, n_in_lines = 0;
        int64_t first_missing = 0;
        int k;
        rc = 0;
        while ((k = tsr_batch_reader_next(&r)) == 1) {
            if (!r.too_long && tsr_batch_line_blank(r.buf, r.len)) continue;
            n_in_lines++;
            char *key;
            size_t klen;
            if (r.too_long) {
                char b[64];
                klen = tsr_batch_line_key(r.line_no, b, sizeof b);
                key = malloc(klen + 1);
                if (key) memcpy(key, b, klen + 1);
            } else if (tsr_batch_input_key(r.buf, r.len, r.line_no, &key, &klen) != 0) {
                key = NULL;
            }
            if (!key) {
                rc = TSR_BATCH_ENOMEM;
                break;
            }
            if (!tsr_batch_keyset_has(set, key, klen) && missing++ == 0) first_missing = r.line_no;
            free(key);
        }
        tsr_batch_reader_free(&r);
        fclose(in);
        if (rc == 0 && k < 0) rc = TSR_BATCH_EIO;
        if (rc != 0) {
            tsr_set_err(err, err_len, "cannot read %s", input_path);
            goto done;
        }
        if (missing) {
            tsr_set_err(err, err_len,
                        "%" PRIu64 " of the %" PRIu64 " lines of %s have no output line (the "
                        "first: line %" PRId64 "); rerun the shards that did not finish",
                        missing, n_in_lines, input_path, first_missing);
            rc = TSR_BATCH_EMISSING;
            goto done;
        }
        if (n_in_lines != *n_lines) {
            tsr_set_err(err, err_len,
                        "the outputs hold %" PRIu64 " lines but %s has %" PRIu64
                        ": some output lines answer no line of this input",
                        *n_lines, input_path, n_in_lines);
            rc = TSR_BATCH_ECORRUPT;
            goto done;
        }
    }
    if (fflush(out) != 0 || fsync(fileno(out)) != 0) {
        tsr_set_err(err, err_len, "cannot write %s: %s", tmp, strerror(errno));
        rc = TSR_BATCH_EIO;
        goto done;
    }
    if (fclose(out) != 0) {
        out = NULL;
        tsr_set_err(err, err_len, "cannot write %s: %s", tmp, strerror(errno));
        rc = TSR_BATCH_EIO;
        goto done;
    }
    out = NULL;
    if (rename(tmp, out_path) != 0) {
        tsr_set_err(err, err_len, "cannot rename %s to %s: %s", tmp, out_path, strerror(errno));
        rc = TSR_BATCH_EIO;
        goto done;
    }
    rc = 0;
done:
    if (out) fclose(out);
    if (rc != 0 && tmp) unlink(tmp);
    free(tmp);
    tsr_batch_keyset_free(set);
    return rc;
}
