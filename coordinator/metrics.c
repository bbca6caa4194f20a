/*
 * metrics.c — Prometheus metrics (see metrics.h). Histograms have fixed bucket bounds
 * (upper bounds in base units) chosen to cover a tiny CPU model and a large GPU one; counts
 * are cumulative only at render time (stored per bucket).
 */
#include "coordinator/metrics.h"
#include "kernels/util.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BUCKETS 24

typedef struct {
    const char *name, *help;
    const double *bounds; /* upper bounds, increasing; +Inf is implicit */
    int n_bounds;
    uint64_t counts[MAX_BUCKETS + 1]; /* per bucket (not cumulative); last = +Inf */
    double sum;
    uint64_t count;
} histogram;

static const double k_latency_s[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075,
                                     0.1,   0.25,   0.5,   0.75, 1.0,   2.5,  5.0,
                                     7.5,   10.0,   20.0,  40.0, 80.0};
static const double k_itl_s[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025,
                                 0.05,   0.075, 0.1,    0.25,  0.5,  1.0,   2.5};
static const double k_e2e_s[] = {0.01, 0.025, 0.05, 0.1,  0.25, 0.5,   1.0,  2.5,
                                 5.0,  10.0,  20.0, 40.0, 60.0, 120.0, 300.0};
static const double k_tokens[] = {1,   2,   4,    8,    16,   32,   64,    128,
                                  256, 512, 1024, 2048, 4096, 8192, 16384, 32768};

enum { H_TTFT, H_ITL, H_E2E, H_QUEUE, H_PROMPT, H_GEN, N_HIST };

/* finish reasons: tsr_finish_reason 0..2 and the engine's extensions 3..4 */
static const char *const k_finish_names[] = {"length", "stop", "eos", "cancelled", "error"};
#define N_FINISH 5

enum { R_INVALID, R_QUEUE_FULL, R_DRAINING, R_DOWN, R_NOMEM, R_OTHER, N_REJECT };
static const char *const k_reject_names[] = {"invalid", "queue_full", "draining",
                                             "down",    "nomem",      "other"};

#define N_HTTP_CODES 16
typedef struct {
    int code;
    uint64_t n;
} http_count;

struct tsr_metrics {
    pthread_mutex_t mu;
    /* --- under mu --- */
    histogram h[N_HIST];
    uint64_t finished[N_FINISH];
    uint64_t rejected[N_REJECT];
    http_count http[N_HTTP_CODES];
    int n_http;
};

/* One request's observer state (engine thread only once submitted). */
struct tsr_metrics_req {
    tsr_metrics *m;
    tsr_event_fn fn; /* NULL: nothing to forward to (tsr_metrics_req_begin) */
    void *ud;
    uint64_t t_submit_ns, t_last_ns;
    bool have_token;
};
typedef struct tsr_metrics_req observer;

static void hist_init(histogram *h, const char *name, const char *help, const double *bounds, int n)
{
    memset(h, 0, sizeof *h);
    h->name = name;
    h->help = help;
    h->bounds = bounds;
    h->n_bounds = n;
}

/* Under m->mu. */
static void hist_observe(histogram *h, double v, uint64_t times)
{
    int b = 0;
    while (b < h->n_bounds && v > h->bounds[b]) b++;
    h->counts[b] += times;
    h->count += times;
    h->sum += v * (double)times;
}

int tsr_metrics_new(tsr_metrics **out)
{
    *out = NULL;
    tsr_metrics *m = calloc(1, sizeof *m);
    if (!m) return -1;
    if (pthread_mutex_init(&m->mu, NULL) != 0) {
        free(m);
        return -1;
    }
#define N(a) ((int)(sizeof a / sizeof *a))
    hist_init(&m->h[H_TTFT], "tessera_time_to_first_token_seconds",
              "Time from the request's submission to its first generated token.", k_latency_s,
              N(k_latency_s));
    hist_init(&m->h[H_ITL], "tessera_inter_token_latency_seconds",
              "Time between consecutive generated tokens of a request (per token).", k_itl_s,
              N(k_itl_s));
    hist_init(&m->h[H_E2E], "tessera_e2e_request_latency_seconds",
              "Time from the request's submission to its end.", k_e2e_s, N(k_e2e_s));
    hist_init(&m->h[H_QUEUE], "tessera_request_queue_time_seconds",
              "Time from the request's submission until it was first scheduled.", k_latency_s,
              N(k_latency_s));
    hist_init(&m->h[H_PROMPT], "tessera_request_prompt_tokens",
              "Prompt length of finished requests, in tokens.", k_tokens, N(k_tokens));
    hist_init(&m->h[H_GEN], "tessera_request_generation_tokens",
              "Generated length of finished requests, in tokens.", k_tokens, N(k_tokens));
#undef N
    *out = m;
    return 0;
}

void tsr_metrics_free(tsr_metrics *m)
{
    if (!m) return;
    pthread_mutex_destroy(&m->mu);
    free(m);
}

/* The engine's callback of an observed request: record, then forward. */
static void observe_event(void *ud, const tsr_event *ev)
{
    observer *o = ud;
    tsr_metrics *m = o->m;
    uint64_t now = tsr_now_ns();
    if (ev->kind == TSR_EV_TOKENS && ev->n_ids > 0) {
        pthread_mutex_lock(&m->mu);
        if (!o->have_token) {
            hist_observe(&m->h[H_TTFT], (double)(now - o->t_submit_ns) / 1e9, 1);
            if (ev->n_ids > 1)
                hist_observe(&m->h[H_ITL], 0.0, ev->n_ids - 1); /* same step: no gap */
        } else {
            /* k tokens arriving together after a gap t: k gaps of t/k */
            double gap = (double)(now - o->t_last_ns) / 1e9 / (double)ev->n_ids;
            hist_observe(&m->h[H_ITL], gap, ev->n_ids);
        }
        pthread_mutex_unlock(&m->mu);
        o->have_token = true;
        o->t_last_ns = now;
    }
    if (ev->kind == TSR_EV_FINISH) {
        pthread_mutex_lock(&m->mu);
        int r = ev->finish_reason;
        if (r >= 0 && r < N_FINISH) m->finished[r]++;
        hist_observe(&m->h[H_E2E], (double)(now - o->t_submit_ns) / 1e9, 1);
        if (r != TSR_FINISH_ERROR && (ev->t_queue_ns > 0 || ev->n_completion_tokens > 0))
            hist_observe(&m->h[H_QUEUE], (double)ev->t_queue_ns / 1e9, 1);
        hist_observe(&m->h[H_PROMPT], (double)ev->n_prompt_tokens, 1);
        hist_observe(&m->h[H_GEN], (double)ev->n_completion_tokens, 1);
        pthread_mutex_unlock(&m->mu);
        tsr_event_fn fn = o->fn;
        void *cud = o->ud;
        free(o);
        if (fn) fn(cud, ev);
        return;
    }
    if (o->fn) o->fn(o->ud, ev);
}

static int reject_reason(int rc)
{
    return rc == TSR_ENGINE_EINVAL        ? R_INVALID
           : rc == TSR_ENGINE_EQUEUE_FULL ? R_QUEUE_FULL
           : rc == TSR_ENGINE_EDRAINING   ? R_DRAINING
           : rc == TSR_ENGINE_EDOWN       ? R_DOWN
           : rc == TSR_ENGINE_ENOMEM      ? R_NOMEM
                                          : R_OTHER;
}

tsr_metrics_req *tsr_metrics_req_begin(tsr_metrics *m)
{
    if (!m) return NULL;
    observer *o = calloc(1, sizeof *o);
    if (!o) return NULL;
    o->m = m;
    o->t_submit_ns = tsr_now_ns();
    return o;
}

void tsr_metrics_req_event(tsr_metrics_req *r, const tsr_event *ev)
{
    if (r) observe_event(r, ev);
}

void tsr_metrics_req_rejected(tsr_metrics_req *r, int engine_rc)
{
    if (!r) return;
    pthread_mutex_lock(&r->m->mu);
    r->m->rejected[reject_reason(engine_rc)]++;
    pthread_mutex_unlock(&r->m->mu);
    free(r);
}

static int submit_engine(void *ctx, const tsr_engine_request *rq, uint64_t *id, char *err,
                         size_t err_len)
{
    return tsr_engine_submit(ctx, rq, id, err, err_len);
}

int tsr_metrics_submit(tsr_metrics *m, tsr_engine *e, const tsr_engine_request *rq, uint64_t *id,
                       char *err, size_t err_len)
{
    return tsr_metrics_submit_with(m, submit_engine, e, rq, id, err, err_len);
}

int tsr_metrics_submit_with(tsr_metrics *m, tsr_metrics_submit_fn fn, void *ctx,
                            const tsr_engine_request *rq, uint64_t *id, char *err, size_t err_len)
{
    if (!m) return fn(ctx, rq, id, err, err_len);
    observer *o = calloc(1, sizeof *o);
    if (!o) {
        tsr_set_err(err, err_len, "out of memory");
        return TSR_ENGINE_ENOMEM;
    }
    o->m = m;
    o->fn = rq->on_event;
    o->ud = rq->ud;
    o->t_submit_ns = tsr_now_ns();
    tsr_engine_request r = *rq;
    r.on_event = observe_event;
    r.ud = o;
    int rc = fn(ctx, &r, id, err, err_len);
    if (rc != TSR_ENGINE_OK) {
        free(o); /* no event follows a refused submit */
        int why = reject_reason(rc);
        pthread_mutex_lock(&m->mu);
        m->rejected[why]++;
        pthread_mutex_unlock(&m->mu);
    }
    return rc;
}

void tsr_metrics_count_http(tsr_metrics *m, int status)
{
    if (!m) return;
    pthread_mutex_lock(&m->mu);
    int i = 0;
    while (i < m->n_http && m->http[i].code != status) i++;
    if (i == m->n_http && m->n_http < N_HTTP_CODES) m->http[m->n_http++] = (http_count){status, 0};
    if (i < m->n_http) m->http[i].n++;
    pthread_mutex_unlock(&m->mu);
}

static void family(FILE *f, const char *name, const char *type, const char *help)
{
    fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Prometheus floats: %.17g round-trips; +Inf spelled the Prometheus way. */
static void put_le(FILE *f, double v)
{
    fprintf(f, "%.10g", v);
}

int tsr_metrics_render(tsr_metrics *m, tsr_engine *e, char **out, size_t *len)
{
    *out = NULL;
    *len = 0;
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    if (!f) return -1;
    tsr_engine_status st;
    memset(&st, 0, sizeof st);
    if (e) tsr_engine_get_status(e, &st);

    if (m) {
        /* Copy under the lock, format outside it: the engine thread never waits on I/O. */
        pthread_mutex_lock(&m->mu);
        histogram h[N_HIST];
        memcpy(h, m->h, sizeof h);
        uint64_t fin[N_FINISH], rej[N_REJECT];
        memcpy(fin, m->finished, sizeof fin);
        memcpy(rej, m->rejected, sizeof rej);
        http_count http[N_HTTP_CODES];
        int n_http = m->n_http;
        memcpy(http, m->http, sizeof http);
        pthread_mutex_unlock(&m->mu);

        family(f, "tessera_requests_total", "counter", "Requests that finished, by finish reason.");
        for (int i = 0; i < N_FINISH; i++)
            fprintf(f, "tessera_requests_total{finish_reason=\"%s\"} %" PRIu64 "\n",
                    k_finish_names[i], fin[i]);
        family(f, "tessera_requests_rejected_total", "counter",
               "Requests refused at submission, by reason.");
        for (int i = 0; i < N_REJECT; i++)
            fprintf(f, "tessera_requests_rejected_total{reason=\"%s\"} %" PRIu64 "\n",
                    k_reject_names[i], rej[i]);
        for (int k = 0; k < N_HIST; k++) {
            const histogram *x = &h[k];
            family(f, x->name, "histogram", x->help);
            uint64_t cum = 0;
            for (int b = 0; b < x->n_bounds; b++) {
                cum += x->counts[b];
                fprintf(f, "%s_bucket{le=\"", x->name);
                put_le(f, x->bounds[b]);
                fprintf(f, "\"} %" PRIu64 "\n", cum);
            }
            cum += x->counts[x->n_bounds];
            fprintf(f, "%s_bucket{le=\"+Inf\"} %" PRIu64 "\n", x->name, cum);
            fprintf(f, "%s_sum %.17g\n%s_count %" PRIu64 "\n", x->name, x->sum, x->name, x->count);
        }
        if (n_http > 0) {
            family(f, "tessera_http_responses_total", "counter",
                   "HTTP responses of the OpenAI-compatible front door, by status code.");
            for (int i = 0; i < n_http; i++)
                fprintf(f, "tessera_http_responses_total{code=\"%d\"} %" PRIu64 "\n", http[i].code,
                        http[i].n);
        }
    }
    if (e) {
        family(f, "tessera_requests_running", "gauge", "Requests being generated now.");
        fprintf(f, "tessera_requests_running %d\n", st.n_running);
        family(f, "tessera_requests_waiting", "gauge", "Requests queued, not yet scheduled.");
        fprintf(f, "tessera_requests_waiting %d\n", st.n_waiting);
        family(f, "tessera_kv_blocks_used", "gauge",
               "KV cache blocks referenced by running requests.");
        fprintf(f, "tessera_kv_blocks_used %d\n", st.kv_blocks_used);
        family(f, "tessera_kv_blocks_capacity", "gauge", "KV cache blocks in the pool.");
        fprintf(f, "tessera_kv_blocks_capacity %d\n", st.kv_blocks_total);
        family(f, "tessera_kv_block_tokens", "gauge", "Token positions per KV block.");
        fprintf(f, "tessera_kv_block_tokens %d\n", st.kv_block_tokens);
        family(f, "tessera_preemptions_total", "counter",
               "Requests preempted (KV blocks freed, recomputed later).");
        fprintf(f, "tessera_preemptions_total %" PRIu64 "\n", st.n_preemptions);
        family(f, "tessera_generation_tokens_total", "counter", "Tokens generated.");
        fprintf(f, "tessera_generation_tokens_total %" PRIu64 "\n", st.n_tokens_generated);
        family(f, "tessera_spec_draft_tokens_total", "counter",
               "Speculative draft tokens proposed.");
        fprintf(f, "tessera_spec_draft_tokens_total %" PRIu64 "\n", st.spec_drafted);
        family(f, "tessera_spec_accepted_tokens_total", "counter",
               "Speculative draft tokens accepted by the model.");
        fprintf(f, "tessera_spec_accepted_tokens_total %" PRIu64 "\n", st.spec_accepted);
        family(f, "tessera_kv_blocks_cached", "gauge",
               "KV cache blocks holding cached prompt prefixes (referenced or not).");
        fprintf(f, "tessera_kv_blocks_cached %d\n", st.kv_blocks_cached);
        family(f, "tessera_prefix_cache_lookups_total", "counter",
               "Requests admitted with a prefix cache lookup (again after a preemption).");
        fprintf(f, "tessera_prefix_cache_lookups_total %" PRIu64 "\n", st.prefix_cache_lookups);
        family(f, "tessera_prefix_cache_hits_total", "counter",
               "Prefix cache lookups that reused at least one KV block.");
        fprintf(f, "tessera_prefix_cache_hits_total %" PRIu64 "\n", st.prefix_cache_hits);
        family(f, "tessera_prefix_cache_hit_tokens_total", "counter",
               "Prompt tokens whose KV came from the prefix cache instead of being computed.");
        fprintf(f, "tessera_prefix_cache_hit_tokens_total %" PRIu64 "\n",
                st.prefix_cache_hit_tokens);
        family(f, "tessera_prefix_cache_evictions_total", "counter",
               "Cached prefix blocks evicted to make room (least recently used first).");
        fprintf(f, "tessera_prefix_cache_evictions_total %" PRIu64 "\n", st.prefix_cache_evictions);
        family(f, "tessera_prefix_cache_copies_total", "counter",
               "Copy-on-write copies of a cached block that a wholly cached prompt's last token "
               "writes.");
        fprintf(f, "tessera_prefix_cache_copies_total %" PRIu64 "\n", st.prefix_cache_copies);
        family(f, "tessera_healthy", "gauge", "1 while the data plane completes steps.");
        fprintf(f, "tessera_healthy %d\n", st.healthy ? 1 : 0);
        family(f, "tessera_draining", "gauge", "1 once draining: no new requests.");
        fprintf(f, "tessera_draining %d\n", st.draining ? 1 : 0);
        family(f, "tessera_replica_ranks", "gauge", "Ranks of the replica (tp x pp).");
        fprintf(f, "tessera_replica_ranks %d\n", st.n_ranks);
        static const struct {
            const char *name, *help;
        } k_rank[] = {
            {"tessera_rank_compute_seconds_total",
             "Forward-pass time of the rank minus its communication."},
            {"tessera_rank_comm_seconds_total",
             "Communication time of the rank (all-reduces, pipeline sends, gathers)."},
            {"tessera_rank_sent_bytes_total", "Bytes the rank sent to other ranks."},
            {"tessera_rank_steps_total", "Steps the rank completed."},
        };
        int nr = st.n_rank_stats < 64 ? st.n_rank_stats : 64;
        for (int k = 0; k < 4 && nr > 0; k++) {
            family(f, k_rank[k].name, "counter", k_rank[k].help);
            for (int i = 0; i < nr; i++) {
                const tsr_rank_stats *q = &st.rank_stats[i];
                fprintf(f, "%s{rank=\"%d\",stage=\"%d\",tp_rank=\"%d\"} ", k_rank[k].name, q->rank,
                        q->stage, q->tp_rank);
                if (k == 0)
                    fprintf(f, "%.9f\n", (double)q->t_compute_ns / 1e9);
                else if (k == 1)
                    fprintf(f, "%.9f\n", (double)q->t_comm_ns / 1e9);
                else if (k == 2)
                    fprintf(f, "%" PRIu64 "\n", q->n_bytes_sent);
                else
                    fprintf(f, "%" PRIu64 "\n", q->n_steps);
            }
        }
    }
    if (fclose(f) != 0 || !buf) {
        free(buf);
        return -1;
    }
    *out = buf;
    *len = n;
    return 0;
}
