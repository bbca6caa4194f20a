/*
 * batch_main.c — `tessera batch`: a JSONL file of requests through one replica's serving
 * engine (continuous batching, paged KV), results appended to a JSONL file; resumable,
 * shardable, stoppable by signal; and `tessera batch --merge` for shard outputs.
 *
 * Threads (on the leader rank; followers serve steps as under `serve`):
 *   - the main thread runs the engine's step loop (it owns MPI: funneled use), from the
 *     moment the replica is open, so followers always get steps or heartbeats;
 *   - the driver thread does the rest: scans the output (resume), pre-scans the input
 *     (duplicate custom_ids, totals), then streams the input — parse, tokenize, submit —
 *     keeping at most `window` lines in flight, writes each finished line, flushes and
 *     fsyncs in groups, prints progress, and handles SIGTERM / SIGUSR1 / SIGINT: stop
 *     admitting, let running lines finish for up to --shutdown-grace, cancel the rest
 *     (they are not written: a rerun does them), flush, exit 3 ("incomplete").
 * Engine events arrive on the step-loop thread; the callback only appends to the line's
 * buffers and, at FINISH, queues the line for the driver (never blocks on I/O).
 *
 * Memory: the lines in flight (window = 2 × --max-seqs by default), the output buffer of
 * one flush group, and two key sets (custom_ids already in the output, and those of the
 * input while it is checked for duplicates) — never the input itself.
 */
#include "coordinator/batch.h"

#include "coordinator/auth.h"
#include "coordinator/chat.h"
#include "coordinator/cli.h"
#include "coordinator/engine.h"
#include "coordinator/evbuf.h"
#include "coordinator/genclient.h"
#include "coordinator/rpc.h"
#include "kernels/util.h"
#include "shard/gguf.h"
#include "shard/vocab.h"
#include "worker/comm.h"
#include "worker/model.h"
#include "worker/replica.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <grpc/grpc.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_MODEL              "../shared/models/stories260K.gguf"
#define DEFAULT_GRACE_MS           60000
#define DEFAULT_FLUSH_LINES        64
#define DEFAULT_FLUSH_MS           2000
#define DEFAULT_MAX_LINE_BYTES     ((size_t)8 << 20)
#define DEFAULT_KV_CAP             ((uint64_t)8 << 30)
#define DEFAULT_CONCURRENCY        64
#define DEFAULT_REQUEST_TIMEOUT_MS 600000
#define DEFAULT_RETRY_TIMEOUT_MS   60000
#define DEFAULT_MAX_RETRIES        8
#define MODEL_INFO_TIMEOUT_MS      10000

/* clang-format off */
static const char *batch_help =
    "usage: tessera batch -m MODEL -i INPUT.jsonl -o OUTPUT.jsonl [flags]\n"
    "       tessera batch --coordinator HOST:PORT -i INPUT.jsonl -o OUTPUT.jsonl [flags]\n"
    "       tessera batch --merge OUT.jsonl IN.jsonl... [-i INPUT.jsonl]\n"
    "\n"
    "Run every request line of INPUT through one replica with continuous batching (or, with\n"
    "--coordinator, through a running Tessera cluster) and append one result line per\n"
    "request to OUTPUT. Input lines: the OpenAI Batch API format\n"
    "{\"custom_id\", \"method\": \"POST\", \"url\": \"/v1/completions\" or\n"
    "\"/v1/chat/completions\", \"body\": {...}}, or plain {\"custom_id\", \"prompt\", ...}\n"
    "lines; body fields as the gRPC request (max_tokens, temperature, top_p, top_k, min_p,\n"
    "seed, stop, stop_token_ids, penalties, logprobs, ignore_eos, ...). A bad line gets an\n"
    "error line and the run goes on. Rerun the same command after a crash or a signal: the\n"
    "custom_ids already in OUTPUT are skipped (a torn last line is cut away).\n"
    "\n"
    "  -m, --model PATH          GGUF model (default " DEFAULT_MODEL ")\n"
    "  -i, --input PATH          request lines (JSONL), read as a stream\n"
    "  -o, --output PATH         result lines (JSONL), appended\n"
    "      --ordered             write results in input order (default: as they finish)\n"
    "      --shard I/N           only the lines whose 0-based line number mod N is I\n"
    "      --seed S              seed of lines without one: derived from S and the\n"
    "                            custom_id (reproducible); default: random per line\n"
    "      --progress-interval S without a terminal on stderr, a progress line every S\n"
    "                            seconds (default 30; 0 = none); on a terminal, a bar\n"
    "      --shutdown-grace MS   on SIGTERM / SIGUSR1 / SIGINT, how long running lines may\n"
    "                            finish before they are dropped (default 60000)\n"
    "      --flush-lines N       fsync the output every N lines (default 64) ...\n"
    "      --flush-interval MS   ... or every MS milliseconds (default 2000)\n"
    "      --max-line-bytes N    longer input lines get an error line (default 8M)\n"
    "      --chat-template NAME  chat lines: template family NAME (chatml, llama3, ...) or a\n"
    "                            Jinja text instead of the model's (a model without one\n"
    "                            answers chat lines with error lines)\n"
    "\n"
    "engine:\n"
    TSR_CLI_ENGINE_HELP("512", "128", "--max-seqs full contexts, at most a quarter\n"
                        "                            of the free memory and 8G")
    "      --kv-type T           KV cache element type: f32, f16 or q8_0 (default f16,\n"
    "                            f32 on CUDA; README: KV cache types)\n"
    "\n"
    "distributed (run under 'mpirun -np TP*PP' or 'srun --mpi=pmix -n TP*PP'):\n"
    "      --tp N, --pp N, --layers A-B,C-D, --comm-timeout MS, --no-repack,\n"
    "      --q8-order ggml|lanes     as in 'tessera generate'\n"
    "\n"
    "cluster (no model is loaded; engine, layout and --chat-template flags do not apply):\n"
    "      --coordinator HOST:PORT  send the lines to this 'tessera coordinator' (or any\n"
    "                            'tessera serve') as Generate calls; output lines are those\n"
    "                            of a local run\n"
    "      --concurrency N       Generate calls in flight (default 64)\n"
    "      --request-timeout MS  deadline of each call (default 600000)\n"
    "      --max-retries N       tries again per line after UNAVAILABLE, RESOURCE_EXHAUSTED,\n"
    "                            DEADLINE_EXCEEDED, ABORTED or CANCELLED, backing off\n"
    "                            0.25 s doubling to 8 s (default 8); then the run stops,\n"
    "                            exit 3. Other statuses become the line's error line\n"
    "      --retry-timeout MS    the cluster answering nothing this long while lines wait\n"
    "                            to be retried: stop, exit 3 (default 60000)\n"
    "      --model-name NAME     the model to route to (GenerateRequest.model; default:\n"
    "                            the cluster's only one)\n"
    "  -m, --model PATH          optional here: checks the cluster serves this vocabulary\n"
    "                            (logprobs' token strings come with the answers)\n"
    TSR_CLI_CLIENT_SECURITY_HELP
    "\n"
    "merge:\n"
    "      --merge OUT IN...     merge shard outputs into OUT: each custom_id exactly once;\n"
    "                            with -i INPUT also every line of INPUT answered\n"
    "\n"
    "exit status: 0 every line has a result or error line; 1 runtime error; 2 usage error,\n"
    "duplicate custom_ids in INPUT, or an OUTPUT this command did not write; 3 incomplete:\n"
    "stopped by a signal, or the cluster stopped answering: rerun the same command to\n"
    "continue.\n"
    "  -h, --help                this help\n";
/* clang-format on */

/* ---- signals ---- */

static atomic_int g_sig_count;
static atomic_int g_sig_last;

static void on_signal(int sig)
{
    atomic_store(&g_sig_last, sig);
    atomic_fetch_add(&g_sig_count, 1);
}

/* The stop signals (SIGTERM, SIGUSR1, SIGINT) counted by on_signal, for the driver to
 * see: both modes' leader, once the job is set up. restore_signals puts the default back,
 * only where install_signals ran; ignore_signals is for followers (the leader coordinates
 * the stop; a signal forwarded by the launcher must not kill them). */
static bool g_sig_installed;

static void install_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    g_sig_installed = true;
}

static void restore_signals(void)
{
    if (!g_sig_installed) return;
    signal(SIGTERM, SIG_DFL);
    signal(SIGUSR1, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    g_sig_installed = false;
}

static void ignore_signals(void)
{
    signal(SIGTERM, SIG_IGN);
    signal(SIGINT, SIG_IGN);
    signal(SIGUSR1, SIG_IGN);
}

static const char *sig_name(int sig)
{
    return sig == SIGTERM   ? "SIGTERM"
           : sig == SIGUSR1 ? "SIGUSR1"
           : sig == SIGINT  ? "SIGINT"
                            : "a signal";
}

/* ---- one line in flight ---- */

typedef struct bslot {
    struct bslot *next; /* in the finished queue */
    void *job;          /* the job (the callback queues the slot there) */
    uint64_t seq;       /* order of admission in this run (for --ordered) */
    int64_t line_no;
    char *custom_id;
    char *model; /* the body's "model", echoed (NULL: the GGUF's name) */
    bool chat, want_logprobs;
    int32_t n_top;
    int32_t n_prompt;
    /* Filled by the engine callback. */
    int32_t *ids;
    size_t n_ids, cap;
    char *text;
    size_t text_len, text_cap;
    float *chosen;
    int32_t *top_ids;
    float *top_lps;
    /* --coordinator with logprobs (want_pieces): the token text the replicas sent with them
     * (Logprobs.token, TokenLogprob.token), so no vocabulary is needed here: chosen token
     * i's bytes are pieces[chosen_piece[i].off ..+ .len], alternative (i, k)'s those of
     * top_piece[i × n_top + k]; len PIECE_ABSENT: the message carried none. */
    bool want_pieces;
    tsr_evbuf_span *chosen_piece, *top_piece;
    char *pieces;
    size_t pieces_len, pieces_cap;
    int finish_reason;
    bool oom;
    bool drop; /* cancelled or failed: no output line, a rerun does it */
    /* Error lines (and results once formatted). */
    char *line;
    size_t line_len;
    bool is_error;
    /* --coordinator: the request as parsed and as sent (kept for retries), the call. */
    tsr_batch_request rq;
    bool has_rq;
    Tessera__V1__GenerateRequest greq;
    Tessera__V1__ChatMessage *msgs;
    Tessera__V1__ChatMessage **msgp;
    char **msg_parts;
    size_t n_msgs;
    cJSON *msg_tree;
    tsr_gencall *call;
    int32_t attempts;  /* calls started for this line */
    uint64_t t_due_ns; /* waiting for a retry: when */
    bool got_finish;   /* the last message (finish_reason) arrived */
} bslot;

static void slot_free(bslot *s)
{
    if (!s) return;
    free(s->custom_id);
    free(s->model);
    free(s->ids);
    free(s->text);
    free(s->chosen);
    free(s->top_ids);
    free(s->top_lps);
    free(s->chosen_piece);
    free(s->top_piece);
    free(s->pieces);
    free(s->line);
    if (s->has_rq) tsr_batch_request_free(&s->rq);
    if (s->msg_parts)
        for (size_t i = 0; i < s->n_msgs; i++) free(s->msg_parts[i]);
    free(s->msg_parts);
    free(s->msgs);
    free(s->msgp);
    cJSON_Delete(s->msg_tree);
    free(s);
}

typedef struct {
    /* configuration */
    const char *model_name;
    const char *in_path, *out_path;
    bool ordered;
    int64_t shard_i, shard_n;
    bool seed_set;
    uint64_t seed_base;
    double progress_s;
    int64_t grace_ms, flush_lines, flush_ms;
    size_t max_line_bytes;
    int32_t window;
    const tsr_chat_template *chat; /* NULL: chat lines get an error line (chat_err) */
    char chat_err[512];
    tsr_engine *eng;        /* local mode */
    const tsr_vocab *vocab; /* local mode; --coordinator: from -m, else NULL */
    int32_t n_ctx, n_vocab;
    /* --coordinator: the cluster's Generate client, driven by the driver thread alone */
    bool remote;
    tsr_genclient *gc;
    const char *coord_addr;
    const char *route_model; /* GenerateRequest.model (--model-name), NULL: any */
    int64_t request_timeout_ms, retry_timeout_ms;
    int32_t max_retries;
    bslot *retry_head;         /* lines waiting to be sent again (counted in inflight) */
    uint64_t t_last_answer_ns; /* the cluster last answered something */
    uint64_t n_retries;
    bool cancelling; /* calls ending now are dropped, not retried */
    bool gave_up;    /* a line ran out of retries, or the cluster is gone */
    bool fatal;      /* the cluster refused our credentials */
    char last_transient[512];
    /* step-loop -> driver */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool sync_init; /* mu and cv initialised (job_init) */
    bslot *fin_head, *fin_tail;
    bool engine_ended; /* under mu */
    /* driver state */
    bslot **ring; /* --ordered: finished lines by seq % window */
    uint64_t seq_next, seq_out;
    int32_t inflight;
    tsr_batch_out out;
    tsr_batch_keyset *done;
    uint64_t n_total, n_resumed, n_ok, n_failed, n_dropped;
    uint64_t n_prompt_tokens, n_gen_tokens;
    uint64_t t_start_ns, t_last_flush_ns, t_last_progress_ns;
    bool tty;
    size_t keyset_peak_bytes;
    uint64_t rng;
    int exit_code;
    char err[1024];
} job;

/* The job's resources, the same in both modes, once its configuration (window, ordered)
 * is filled in: the output not yet open, the random state of lines without a seed, the key
 * set of custom_ids already done, the --ordered ring (window slots) and the step-loop ->
 * driver lock. 0, or -1 with j->err filled (out of memory). job_cleanup undoes it, also
 * after a failure or on a zeroed job. */
static int job_init(job *j)
{
    j->tty = isatty(STDERR_FILENO);
    j->out.fd = -1;
    j->rng = tsr_now_ns() ^ ((uint64_t)getpid() << 32);
    j->done = tsr_batch_keyset_new();
    j->ring = j->ordered ? calloc((size_t)j->window, sizeof *j->ring) : NULL;
    if (!j->done || (j->ordered && !j->ring)) {
        snprintf(j->err, sizeof j->err, "out of memory");
        return -1;
    }
    pthread_mutex_init(&j->mu, NULL);
    pthread_cond_init(&j->cv, NULL);
    j->sync_init = true;
    return 0;
}

static void job_cleanup(job *j)
{
    if (j->sync_init) {
        pthread_mutex_destroy(&j->mu);
        pthread_cond_destroy(&j->cv);
        j->sync_init = false;
    }
    free(j->ring);
    j->ring = NULL;
    tsr_batch_keyset_free(j->done);
    j->done = NULL;
}

/* ---- engine callback (step-loop thread) ---- */

/* Room for n generated tokens (ids, and logprobs when asked). */
static bool slot_reserve(bslot *s, size_t n)
{
    size_t cap = s->cap;
    if (!tsr_evbuf_grow((void **)&s->ids, &cap, n, sizeof(int32_t))) return false;
    if (s->want_logprobs) {
        size_t c2 = s->cap;
        if (!tsr_evbuf_grow((void **)&s->chosen, &c2, n, sizeof(float))) return false;
        if (s->n_top > 0) {
            c2 = s->cap;
            if (!tsr_evbuf_grow((void **)&s->top_ids, &c2, n, sizeof(int32_t) * (size_t)s->n_top))
                return false;
            c2 = s->cap;
            if (!tsr_evbuf_grow((void **)&s->top_lps, &c2, n, sizeof(float) * (size_t)s->n_top))
                return false;
        }
    }
    if (s->want_pieces) {
        size_t c2 = s->cap;
        if (!tsr_evbuf_grow((void **)&s->chosen_piece, &c2, n, sizeof(tsr_evbuf_span)))
            return false;
        if (s->n_top > 0) {
            c2 = s->cap;
            if (!tsr_evbuf_grow((void **)&s->top_piece, &c2, n,
                                sizeof(tsr_evbuf_span) * (size_t)s->n_top))
                return false;
        }
    }
    s->cap = cap;
    return true;
}

static bool slot_add_text(bslot *s, const char *text, size_t len)
{
    if (!len) return true;
    if (!tsr_evbuf_grow((void **)&s->text, &s->text_cap, s->text_len + len + 1, 1)) return false;
    memcpy(s->text + s->text_len, text, len);
    s->text_len += len;
    s->text[s->text_len] = '\0';
    return true;
}

/* Hand a finished line to the driver (engine thread in local mode; the driver itself with
 * --coordinator). */
static void queue_finished(job *j, bslot *s)
{
    pthread_mutex_lock(&j->mu);
    s->next = NULL;
    if (j->fin_tail)
        j->fin_tail->next = s;
    else
        j->fin_head = s;
    j->fin_tail = s;
    pthread_cond_signal(&j->cv);
    pthread_mutex_unlock(&j->mu);
}

static void on_event(void *ud, const tsr_event *ev)
{
    bslot *s = ud;
    job *j = s->job;
    if (ev->kind == TSR_EV_TOKENS) {
        if (s->oom) return;
        size_t n = s->n_ids + ev->n_ids;
        if (!slot_reserve(s, n)) goto oom;
        for (size_t i = 0; i < ev->n_ids; i++) {
            size_t at = s->n_ids + i;
            s->ids[at] = ev->ids[i];
            if (s->want_logprobs) {
                s->chosen[at] = ev->chosen_logprobs ? ev->chosen_logprobs[i] : NAN;
                for (int32_t k = 0; k < s->n_top; k++) {
                    bool have = ev->top_logprobs && k < ev->n_top;
                    size_t o = at * (size_t)s->n_top + (size_t)k;
                    s->top_ids[o] =
                        have ? ev->top_logprobs[i * (size_t)ev->n_top + (size_t)k].id : -1;
                    s->top_lps[o] =
                        have ? ev->top_logprobs[i * (size_t)ev->n_top + (size_t)k].logprob : NAN;
                }
            }
        }
        s->n_ids = n;
        if (!slot_add_text(s, ev->text, ev->text_len)) goto oom;
        return;
    oom:
        s->oom = true;
        return;
    }
    s->finish_reason = ev->finish_reason;
    s->n_prompt = ev->n_prompt_tokens;
    if (ev->finish_reason == TSR_FINISH_CANCELLED || ev->finish_reason == TSR_FINISH_ERROR)
        s->drop = true;
    queue_finished(j, s);
}

/* ---- driver helpers ---- */

static int complete(job *j, bslot *s);
static bslot *error_slot(job *j, char *custom_id, int64_t line_no, const char *code,
                         const char *msg);

static uint64_t fnv(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static long peak_rss_kib(void)
{
    struct rusage ru;
    return getrusage(RUSAGE_SELF, &ru) == 0 ? ru.ru_maxrss : 0;
}

/* A token's text as the output line shows it: a NUL-terminated copy of p[0..n) (NULL when
 * memory ran out). Pieces can be part of a UTF-8 character: cJSON would copy the bytes as
 * they are, making the line invalid UTF-8; such bytes are replaced by '?'. */
static char *piece_copy(const char *p, size_t n)
{
    char *s = malloc(n + 1);
    if (!s) return NULL;
    for (size_t i = 0; i < n; i++) s[i] = (unsigned char)p[i] >= 0x80 ? '?' : p[i];
    s[n] = '\0';
    return s;
}

/* Token id's text from the vocabulary (what the replicas send as Logprobs.token). */
static char *piece_of(const tsr_vocab *v, int32_t id)
{
    char buf[256];
    if (id < 0) return strdup("");
    int32_t n = tsr_vocab_token_to_piece(v, id, buf, sizeof buf, true);
    if (n < 0) n = 0;
    if ((size_t)n <= sizeof buf) return piece_copy(buf, (size_t)n);
    char *big = malloc((size_t)n);
    if (!big) return NULL;
    tsr_vocab_token_to_piece(v, id, big, (size_t)n, true);
    char *s = piece_copy(big, (size_t)n);
    free(big);
    return s;
}

#define PIECE_ABSENT UINT32_MAX

/* The text of token id at a logprobs entry: the bytes the replica sent (sp, --coordinator),
 * else the vocabulary's. *missing when neither is there (a replica that sends no token
 * text, and no -m). NULL: out of memory. */
static char *entry_piece(const job *j, const bslot *s, int32_t id, const tsr_evbuf_span *sp,
                         bool *missing)
{
    if (id < 0) return strdup(""); /* an alternative the replica did not have */
    if (sp && sp->len != PIECE_ABSENT) return piece_copy(s->pieces + sp->off, sp->len);
    if (j->vocab) return piece_of(j->vocab, id);
    *missing = true;
    return strdup("");
}

static void slot_to_error(bslot *s, const char *code, const char *msg);

/* Format a finished completion into s->line. */
static int format_done(job *j, bslot *s)
{
    char **pieces = NULL, **top_pieces = NULL;
    size_t n_top_all = s->want_logprobs ? s->n_ids * (size_t)(s->n_top > 0 ? s->n_top : 0) : 0;
    int rc = TSR_BATCH_ENOMEM;
    if (s->want_logprobs) {
        bool missing = false;
        pieces = calloc(s->n_ids + 1, sizeof *pieces);
        top_pieces = calloc(n_top_all + 1, sizeof *top_pieces);
        if (!pieces || !top_pieces) goto done;
        for (size_t i = 0; i < s->n_ids; i++)
            if (!(pieces[i] = entry_piece(j, s, s->ids[i],
                                          s->want_pieces ? &s->chosen_piece[i] : NULL, &missing)))
                goto done;
        for (size_t i = 0; i < n_top_all; i++)
            if (!(top_pieces[i] = entry_piece(j, s, s->top_ids[i],
                                              s->want_pieces ? &s->top_piece[i] : NULL, &missing)))
                goto done;
        if (missing) {
            slot_to_error(s, "unsupported",
                          "the cluster sent logprobs without their token text (replicas older "
                          "than this client): pass -m MODEL.gguf (the file the cluster serves) "
                          "for the token strings");
            rc = s->oom ? TSR_BATCH_ENOMEM : 0;
            goto done;
        }
    }
    tsr_batch_result r = {.custom_id = s->custom_id,
                          .model = s->model ? s->model : j->model_name,
                          .text = s->text,
                          .text_len = s->text_len,
                          .ids = s->ids,
                          .n_ids = s->n_ids,
                          .finish_reason = s->finish_reason,
                          .n_prompt_tokens = s->n_prompt,
                          .want_logprobs = s->want_logprobs,
                          .chat = s->chat,
                          .pieces = (const char *const *)pieces,
                          .chosen = s->chosen,
                          .top_ids = s->top_ids,
                          .top_lps = s->top_lps,
                          .top_pieces = (const char *const *)top_pieces,
                          .n_top = s->n_top};
    rc = tsr_batch_format_result(&r, &s->line, &s->line_len);
done:
    if (pieces)
        for (size_t i = 0; i < s->n_ids; i++) free(pieces[i]);
    if (top_pieces)
        for (size_t i = 0; i < n_top_all; i++) free(top_pieces[i]);
    free(pieces);
    free(top_pieces);
    return rc;
}

static int emit(job *j, bslot *s)
{
    if (!s->drop) {
        if (tsr_batch_out_add(&j->out, s->line, s->line_len) != 0) return TSR_BATCH_ENOMEM;
        if (s->is_error)
            j->n_failed++;
        else
            j->n_ok++;
    } else {
        j->n_dropped++;
    }
    slot_free(s);
    return 0;
}

/* A finished line (result, error or dropped) in admission order or as it comes. */
static int complete(job *j, bslot *s)
{
    if (!s->drop && !s->is_error) {
        if (s->oom) {
            s->drop = true;
        } else {
            j->n_gen_tokens += s->n_ids;
            j->n_prompt_tokens += (uint64_t)s->n_prompt;
            if (format_done(j, s) != 0) return TSR_BATCH_ENOMEM;
        }
    }
    if (!j->ordered) return emit(j, s);
    j->ring[s->seq % (uint64_t)j->window] = s;
    while (j->seq_out < j->seq_next) {
        bslot **at = &j->ring[j->seq_out % (uint64_t)j->window];
        if (!*at) break;
        int rc = emit(j, *at);
        *at = NULL;
        j->seq_out++;
        if (rc != 0) return rc;
    }
    return 0;
}

static bslot *error_slot(job *j, char *custom_id, int64_t line_no, const char *code,
                         const char *msg)
{
    bslot *s = calloc(1, sizeof *s);
    if (!s) {
        free(custom_id);
        return NULL;
    }
    s->seq = j->seq_next++;
    s->line_no = line_no;
    s->custom_id = custom_id;
    s->is_error = true;
    if (tsr_batch_format_error(custom_id, line_no, code, msg, &s->line, &s->line_len) != 0) {
        slot_free(s);
        return NULL;
    }
    return s;
}

static void progress(job *j, bool final)
{
    uint64_t t = tsr_now_ns();
    double el = (double)(t - j->t_start_ns) / 1e9;
    uint64_t done = j->n_resumed + j->n_ok + j->n_failed;
    uint64_t this_run = j->n_ok + j->n_failed;
    double tps = el > 0 ? (double)j->n_gen_tokens / el : 0;
    double lps = el > 0 ? (double)this_run / el : 0;
    double eta = lps > 0 && j->n_total > done ? (double)(j->n_total - done) / lps : 0;
    double pct = j->n_total ? 100.0 * (double)done / (double)j->n_total : 100.0;
    char etab[32];
    if (lps > 0 || done >= j->n_total)
        snprintf(etab, sizeof etab, "%d:%02d:%02d", (int)(eta / 3600), (int)fmod(eta / 60, 60),
                 (int)fmod(eta, 60));
    else
        snprintf(etab, sizeof etab, "?");
    if (j->tty) {
        char bar[31];
        int fill = (int)(pct * 30 / 100);
        for (int i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
        bar[30] = '\0';
        fprintf(stderr,
                "\r\033[K[%s] %" PRIu64 "/%" PRIu64 " lines %3.0f%%  %" PRIu64
                " failed  %.1f tok/s  ETA %s%s",
                bar, done, j->n_total, pct, j->n_failed, tps, etab, final ? "\n" : "");
    } else if (!final) {
        fprintf(stderr,
                "tessera batch: %" PRIu64 "/%" PRIu64 " lines (%.1f%%), %" PRIu64
                " failed, %" PRIu64 " prompt + %" PRIu64
                " generated tokens, %.1f generated tokens/s, elapsed %.0f s, ETA %s\n",
                done, j->n_total, pct, j->n_failed, j->n_prompt_tokens, j->n_gen_tokens, tps, el,
                etab);
    }
    fflush(stderr);
    j->t_last_progress_ns = t;
}

static int flush_out(job *j)
{
    if (j->out.n_lines_buffered == 0) return 0;
    j->t_last_flush_ns = tsr_now_ns();
    if (tsr_batch_out_flush(&j->out, j->err, sizeof j->err) != 0) return TSR_BATCH_EIO;
    return 0;
}

/* The key of the line the reader holds (see batch.h: its custom_id, or its line key), as
 * the output will carry it; malloc'd, NULL when out of memory. The pre-scan and the
 * admission loop must agree on it, so both take it from here. */
static char *line_key(const tsr_batch_reader *r, size_t *klen)
{
    char *key = NULL;
    *klen = 0;
    if (r->too_long) {
        char b[64];
        *klen = tsr_batch_line_key(r->line_no, b, sizeof b);
        key = strdup(b);
    } else if (tsr_batch_input_key(r->buf, r->len, r->line_no, &key, klen) != 0) {
        key = NULL;
    }
    return key;
}

/* Pre-scan: count the lines of this shard, the ones already done, and refuse duplicate
 * custom_ids (in the whole file: shards must agree). */
static int prescan(job *j)
{
    FILE *f = fopen(j->in_path, "rb");
    if (!f) {
        tsr_set_err(j->err, sizeof j->err, "cannot read %s: %s", j->in_path, strerror(errno));
        return TSR_BATCH_EIO;
    }
    tsr_batch_reader r;
    tsr_batch_keyset *seen = tsr_batch_keyset_new();
    int rc = TSR_BATCH_ENOMEM, k;
    uint64_t n_dup = 0;
    if (!seen || tsr_batch_reader_init(&r, f, j->max_line_bytes) != 0) {
        tsr_batch_keyset_free(seen);
        fclose(f);
        tsr_set_err(j->err, sizeof j->err, "out of memory");
        return rc;
    }
    rc = 0;
    while ((k = tsr_batch_reader_next(&r)) == 1) {
        if (!r.too_long && tsr_batch_line_blank(r.buf, r.len)) continue;
        char *key;
        size_t klen;
        if (!(key = line_key(&r, &klen))) {
            rc = TSR_BATCH_ENOMEM;
            break;
        }
        int a = tsr_batch_keyset_add(seen, key, klen);
        if (a < 0) {
            free(key);
            rc = a;
            break;
        }
        if (a == 0) {
            if (n_dup++ < 5)
                fprintf(stderr, "tessera batch: %s line %" PRId64 ": custom_id '%.200s' again\n",
                        j->in_path, r.line_no, key);
        } else if ((r.line_no - 1) % j->shard_n == j->shard_i) {
            j->n_total++;
            if (tsr_batch_keyset_has(j->done, key, klen)) j->n_resumed++;
        }
        free(key);
    }
    if (rc == 0 && k < 0) rc = TSR_BATCH_EIO;
    size_t b = tsr_batch_keyset_bytes(seen) + tsr_batch_keyset_bytes(j->done);
    if (b > j->keyset_peak_bytes) j->keyset_peak_bytes = b;
    tsr_batch_keyset_free(seen);
    tsr_batch_reader_free(&r);
    fclose(f);
    if (rc == TSR_BATCH_EIO)
        tsr_set_err(j->err, sizeof j->err, "cannot read %s: %s", j->in_path, strerror(errno));
    else if (rc != 0)
        tsr_set_err(j->err, sizeof j->err, "out of memory");
    else if (n_dup) {
        tsr_set_err(j->err, sizeof j->err,
                    "%s has %" PRIu64 " duplicate custom_id%s (listed above, at most 5): every "
                    "line needs its own custom_id, or a rerun could not tell which are done; "
                    "fix the input",
                    j->in_path, n_dup, n_dup > 1 ? "s" : "");
        rc = TSR_BATCH_EDUP;
    }
    return rc;
}

/* A chat line's messages (compact JSON: [{role, content}, ...], checked by the parser;
 * content a string, or an array of {"type": "text", "text"} parts, joined) as role /
 * content pairs. *m points into *tree and *parts (all three the caller's to free, *parts
 * with its *n entries). */
static int parse_messages(const char *messages_json, tsr_chat_msg **m_out, char ***parts_out,
                          cJSON **tree_out, int *n_out, char *err, size_t err_len)
{
    cJSON *a = cJSON_Parse(messages_json);
    int n = cJSON_GetArraySize(a);
    tsr_chat_msg *m = n > 0 ? calloc((size_t)n, sizeof *m) : NULL;
    char **parts = n > 0 ? calloc((size_t)n, sizeof *parts) : NULL;
    *m_out = m;
    *parts_out = parts;
    *tree_out = a;
    *n_out = n;
    if (!a || !m || !parts) {
        tsr_set_err(err, err_len, "out of memory");
        return -1;
    }
    int i = 0;
    for (const cJSON *e = a->child; e; e = e->next, i++) {
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(e, "role");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(e, "content");
        m[i].role = role->valuestring;
        if (cJSON_IsString(content)) {
            m[i].content = content->valuestring;
        } else if (cJSON_IsArray(content)) {
            size_t total = 1;
            for (const cJSON *p = content->child; p; p = p->next) {
                const cJSON *t = cJSON_GetObjectItemCaseSensitive(p, "text");
                const cJSON *ty = cJSON_GetObjectItemCaseSensitive(p, "type");
                if (!cJSON_IsString(t) || !cJSON_IsString(ty) || strcmp(ty->valuestring, "text")) {
                    tsr_set_err(err, err_len,
                                "messages[%d].content: only {\"type\": \"text\", \"text\"} "
                                "parts are supported",
                                i);
                    return -1;
                }
                total += strlen(t->valuestring);
            }
            if (!(parts[i] = malloc(total))) {
                tsr_set_err(err, err_len, "out of memory");
                return -1;
            }
            parts[i][0] = '\0';
            for (const cJSON *p = content->child; p; p = p->next)
                strcat(parts[i], cJSON_GetObjectItemCaseSensitive(p, "text")->valuestring);
            m[i].content = parts[i];
        } else {
            tsr_set_err(err, err_len, "messages[%d].content must be a string or text parts", i);
            return -1;
        }
    }
    return 0;
}

static void free_messages(tsr_chat_msg *m, char **parts, cJSON *tree, int n)
{
    if (parts)
        for (int k = 0; k < n; k++) free(parts[k]);
    free(parts);
    free(m);
    cJSON_Delete(tree);
}

/* A chat line's messages rendered with the model's chat template (add_generation_prompt)
 * and tokenized as chat prompts are. */
static int chat_prompt(job *j, const char *messages_json, int32_t **ids, size_t *n_ids, char *err,
                       size_t err_len)
{
    int rc = -1, n = 0;
    tsr_chat_msg *m = NULL;
    char **parts = NULL, *text = NULL;
    cJSON *tree = NULL;
    size_t len = 0;
    if (parse_messages(messages_json, &m, &parts, &tree, &n, err, err_len) != 0) goto done;
    if (tsr_chat_render(j->chat, m, (size_t)n, true, &text, &len, err, err_len) != 0) goto done;
    if (len > (size_t)j->n_ctx * 64) {
        tsr_set_err(err, err_len, "%zu bytes cannot fit the context of %d tokens", len, j->n_ctx);
        goto done;
    }
    if (tsr_chat_tokenize(j->vocab, text, len, ids, n_ids, err, err_len) != 0) goto done;
    rc = 0;
done:
    free_messages(m, parts, tree, n);
    free(text);
    return rc;
}

/* ---- --coordinator: lines as Generate calls to the cluster ---- */

static int map_finish(Tessera__V1__FinishReason r)
{
    switch (r) {
    case TESSERA__V1__FINISH_REASON__FINISH_REASON_STOP:
        return TSR_FINISH_STOP;
    case TESSERA__V1__FINISH_REASON__FINISH_REASON_EOS:
        return TSR_FINISH_EOS;
    case TESSERA__V1__FINISH_REASON__FINISH_REASON_LENGTH:
        return TSR_FINISH_LENGTH;
    default:
        return TSR_FINISH_CANCELLED;
    }
}

/* Keep a token text of the message (NULL: it carried none) in s->pieces; false on out of
 * memory. */
static bool put_piece(bslot *s, const ProtobufCBinaryData *b, tsr_evbuf_span *sp)
{
    if (!b) {
        *sp = (tsr_evbuf_span){0, PIECE_ABSENT};
        return true;
    }
    if (b->len >= PIECE_ABSENT || s->pieces_len + b->len >= PIECE_ABSENT ||
        !tsr_evbuf_grow((void **)&s->pieces, &s->pieces_cap, s->pieces_len + b->len + 1, 1))
        return false;
    if (b->len) memcpy(s->pieces + s->pieces_len, b->data, b->len);
    *sp = (tsr_evbuf_span){(uint32_t)s->pieces_len, (uint32_t)b->len};
    s->pieces_len += b->len;
    return true;
}

static void on_remote_message(void *ud, const Tessera__V1__GenerateResponse *m)
{
    bslot *s = ud;
    job *j = s->job;
    j->t_last_answer_ns = tsr_now_ns();
    if (s->oom) return;
    size_t n = s->n_ids + m->n_token_ids;
    if (!slot_reserve(s, n)) goto oom;
    for (size_t i = 0; i < m->n_token_ids; i++) {
        size_t at = s->n_ids + i;
        s->ids[at] = m->token_ids[i];
        if (s->want_logprobs) {
            const Tessera__V1__Logprobs *lp = i < m->n_logprobs ? m->logprobs[i] : NULL;
            s->chosen[at] = lp && lp->has_logprob ? lp->logprob : NAN;
            if (s->want_pieces &&
                !put_piece(s, lp && lp->has_token ? &lp->token : NULL, &s->chosen_piece[at]))
                goto oom;
            for (int32_t k = 0; k < s->n_top; k++) {
                const Tessera__V1__TokenLogprob *t =
                    lp && (size_t)k < lp->n_top ? lp->top[k] : NULL;
                size_t o = at * (size_t)s->n_top + (size_t)k;
                s->top_ids[o] = t && t->has_id ? t->id : -1;
                s->top_lps[o] = t && t->has_logprob ? t->logprob : NAN;
                if (s->want_pieces &&
                    !put_piece(s, t && t->has_token ? &t->token : NULL, &s->top_piece[o]))
                    goto oom;
            }
        }
    }
    s->n_ids = n;
    if (m->text && !slot_add_text(s, m->text, strlen(m->text))) goto oom;
    if (m->has_finish_reason) {
        s->got_finish = true;
        s->finish_reason = map_finish(m->finish_reason);
        if (m->usage && m->usage->has_prompt_tokens) s->n_prompt = m->usage->prompt_tokens;
    }
    return;
oom:
    s->oom = true;
}

/* The line's answer is an error line (a status of the cluster that another try would not
 * change). */
static void slot_to_error(bslot *s, const char *code, const char *msg)
{
    free(s->line);
    s->line = NULL;
    s->is_error = true;
    if (tsr_batch_format_error(s->custom_id, s->line_no, code, msg, &s->line, &s->line_len) != 0)
        s->oom = true; /* dropped: a rerun does it */
}

static void on_remote_done(void *ud, int code, const char *details)
{
    bslot *s = ud;
    job *j = s->job;
    s->call = NULL;
    uint64_t now = tsr_now_ns();
    if (code == GRPC_STATUS_OK && s->got_finish) {
        j->t_last_answer_ns = now;
        if (s->finish_reason == TSR_FINISH_CANCELLED) s->drop = true;
        queue_finished(j, s);
        return;
    }
    if (code == GRPC_STATUS_OK) {
        code = GRPC_STATUS_UNAVAILABLE;
        details = "the stream ended without its last message";
    }
    if (j->cancelling) {
        s->drop = true;
        queue_finished(j, s);
        return;
    }
    if (tsr_genclient_code_transient(code)) {
        snprintf(j->last_transient, sizeof j->last_transient, "%s: %s", tsr_rpc_code_name(code),
                 details[0] ? details : "(no message)");
        if (s->attempts <= j->max_retries) {
            /* Back off 0.25 s, doubling to 8 s, jittered by up to +25%: the lines that
             * failed together (a replica or the coordinator gone) do not come back in
             * lockstep. */
            int sh = s->attempts - 1 < 5 ? s->attempts - 1 : 5;
            uint64_t d = 250000000ull << sh;
            d += tsr_splitmix64(&j->rng) % (d / 4 + 1);
            s->t_due_ns = now + d;
            s->n_ids = 0;
            s->text_len = 0;
            s->pieces_len = 0;
            s->oom = false;
            s->got_finish = false;
            s->next = j->retry_head;
            j->retry_head = s;
            j->n_retries++;
            return;
        }
        fprintf(stderr,
                "tessera batch: line %" PRId64 " (%s): %s after %d tries; stopping (rerun to "
                "continue)\n",
                s->line_no, s->custom_id ? s->custom_id : "?", j->last_transient, s->attempts);
        j->gave_up = true;
        s->drop = true;
        queue_finished(j, s);
        return;
    }
    j->t_last_answer_ns = now;
    if (code == GRPC_STATUS_UNAUTHENTICATED || code == GRPC_STATUS_PERMISSION_DENIED) {
        /* Every line would get the same answer: stop instead of writing error lines. */
        if (!j->fatal)
            snprintf(j->err, sizeof j->err,
                     "%s refused the credentials (%s: %s); check --api-key-file / "
                     "TESSERA_API_KEY and the TLS flags",
                     j->coord_addr, tsr_rpc_code_name(code), details);
        j->fatal = true;
        s->drop = true;
        queue_finished(j, s);
        return;
    }
    char msg[1200];
    const char *ecode = "server_error";
    if (code == GRPC_STATUS_FAILED_PRECONDITION && s->chat) {
        ecode = "unsupported";
        snprintf(msg, sizeof msg, "line %" PRId64 ": chat completions: %s", s->line_no, details);
    } else {
        if (code == GRPC_STATUS_INVALID_ARGUMENT && strstr(details, "do not fit the context"))
            ecode = "prompt_too_long"; /* as local mode's code for it */
        else if (code == GRPC_STATUS_INVALID_ARGUMENT || code == GRPC_STATUS_OUT_OF_RANGE)
            ecode = "invalid_request";
        else if (code == GRPC_STATUS_NOT_FOUND)
            ecode = "model_not_found";
        else if (code == GRPC_STATUS_FAILED_PRECONDITION)
            ecode = "unsupported";
        snprintf(msg, sizeof msg, "line %" PRId64 ": %s (%s from %s)", s->line_no, details,
                 tsr_rpc_code_name(code), j->coord_addr);
    }
    slot_to_error(s, ecode, msg);
    queue_finished(j, s);
}

/* Send (or send again) a line's request. */
static int remote_start(job *j, bslot *s)
{
    char err[256];
    s->attempts++;
    s->n_ids = 0;
    s->text_len = 0;
    s->got_finish = false;
    int rc = tsr_genclient_generate(j->gc, &s->greq, j->request_timeout_ms, on_remote_message,
                                    on_remote_done, s, &s->call, err, sizeof err);
    if (rc == TSR_GENCLIENT_ENOMEM) return TSR_BATCH_ENOMEM;
    if (rc != 0) {
        /* Not started: as a transient failure, it is tried again later. */
        on_remote_done(s, GRPC_STATUS_UNAVAILABLE, err);
    }
    return 0;
}

/* Lines whose retry is due. */
static int remote_retry_due(job *j)
{
    uint64_t now = tsr_now_ns();
    bslot **pp = &j->retry_head;
    bslot *due = NULL;
    while (*pp) {
        bslot *s = *pp;
        if (s->t_due_ns <= now) {
            *pp = s->next;
            s->next = due;
            due = s;
        } else {
            pp = &s->next;
        }
    }
    while (due) {
        bslot *s = due;
        due = s->next;
        s->next = NULL;
        int rc = remote_start(j, s);
        if (rc != 0) return rc;
    }
    return 0;
}

/* Stop every call and every retry: their lines are dropped (a rerun does them). */
static void remote_cancel(job *j)
{
    j->cancelling = true;
    tsr_genclient_cancel_all(j->gc);
    while (j->retry_head) {
        bslot *s = j->retry_head;
        j->retry_head = s->next;
        s->drop = true;
        queue_finished(j, s);
    }
}

/* The GenerateRequest of a parsed line. Takes rq; error lines complete at once. */
static int admit_remote(job *j, tsr_batch_request *rq, int64_t ln)
{
    char emsg[1024], perr[768];
    const char *code = "invalid_request";
    bslot *s = calloc(1, sizeof *s);
    if (!s) {
        tsr_batch_request_free(rq);
        return TSR_BATCH_ENOMEM;
    }
    s->rq = *rq;
    s->has_rq = true;
    memset(rq, 0, sizeof *rq);
    rq = &s->rq;
    s->line_no = ln;
    s->job = j;
    s->custom_id = rq->custom_id;
    rq->custom_id = NULL;
    s->model = rq->model;
    rq->model = NULL;
    s->chat = rq->kind == TSR_BATCH_CHAT;
    s->want_logprobs = rq->want_logprobs;
    s->n_top = rq->want_logprobs ? rq->logprobs : 0;
    Tessera__V1__GenerateRequest *g = &s->greq;
    tessera__v1__generate_request__init(g);
    s->want_pieces = s->want_logprobs;
    if (s->chat) {
        tsr_chat_msg *m = NULL;
        int n = 0;
        if (parse_messages(rq->messages_json, &m, &s->msg_parts, &s->msg_tree, &n, perr,
                           sizeof perr) != 0) {
            s->n_msgs = (size_t)n;
            free(m);
            snprintf(emsg, sizeof emsg, "line %" PRId64 ": messages: %s", ln, perr);
            goto line_error;
        }
        s->n_msgs = (size_t)n;
        s->msgs = calloc((size_t)n, sizeof *s->msgs);
        s->msgp = calloc((size_t)n, sizeof *s->msgp);
        if (!s->msgs || !s->msgp) {
            free(m);
            slot_free(s);
            return TSR_BATCH_ENOMEM;
        }
        for (int i = 0; i < n; i++) {
            tessera__v1__chat_message__init(&s->msgs[i]);
            s->msgs[i].role = (char *)m[i].role;
            s->msgs[i].content = (char *)m[i].content;
            s->msgp[i] = &s->msgs[i];
        }
        free(m);
        g->n_messages = (size_t)n;
        g->messages = s->msgp;
    } else if (rq->prompt) {
        /* The same early refusal as local mode (a prompt of more bytes than 64 per
         * position of the context cannot fit); the cluster checks the tokens. */
        size_t len = strlen(rq->prompt);
        if (len > (size_t)j->n_ctx * 64) {
            snprintf(emsg, sizeof emsg,
                     "line %" PRId64 ": prompt: %zu bytes cannot fit the context of %d tokens; "
                     "shorten the prompt",
                     ln, len, j->n_ctx);
            code = "prompt_too_long";
            goto line_error;
        }
        g->prompt = rq->prompt;
        g->has_add_special_tokens = 1;
        g->add_special_tokens = rq->add_special;
    } else {
        for (size_t i = 0; i < rq->n_prompt_ids; i++) {
            if (rq->prompt_ids[i] >= j->n_vocab) {
                snprintf(emsg, sizeof emsg,
                         "line %" PRId64 ": prompt[%zu]: token id %d is outside the vocabulary "
                         "[0, %d)",
                         ln, i, rq->prompt_ids[i], j->n_vocab);
                goto line_error;
            }
        }
        g->n_prompt_ids = rq->n_prompt_ids;
        g->prompt_ids = rq->prompt_ids;
    }
    if (!rq->has_seed) {
        if (j->seed_set) {
            uint64_t x = j->seed_base ^ fnv(s->custom_id);
            rq->gen.sampling.seed = tsr_splitmix64(&x);
        } else {
            rq->gen.sampling.seed = tsr_splitmix64(&j->rng);
        }
    }
    /* Every parameter explicitly: the parser's defaults are the gRPC request's, and a retry
     * (on whatever replica) must sample exactly as the first try. */
    const tsr_sampling_params *sp = &rq->gen.sampling;
    g->has_max_tokens = 1;
    g->max_tokens = rq->gen.max_tokens;
    g->has_temperature = 1;
    g->temperature = sp->temperature;
    g->has_top_p = 1;
    g->top_p = sp->top_p;
    g->has_top_k = 1;
    g->top_k = sp->top_k;
    g->has_min_p = 1;
    g->min_p = sp->min_p;
    g->has_repetition_penalty = 1;
    g->repetition_penalty = sp->repetition_penalty;
    g->has_presence_penalty = 1;
    g->presence_penalty = sp->presence_penalty;
    g->has_frequency_penalty = 1;
    g->frequency_penalty = sp->frequency_penalty;
    g->has_seed = 1;
    g->seed = sp->seed;
    g->n_stop = rq->n_stop;
    g->stop = rq->stop;
    g->n_stop_token_ids = rq->n_stop_ids;
    g->stop_token_ids = rq->stop_ids;
    g->has_ignore_eos = 1;
    g->ignore_eos = rq->gen.ignore_eos;
    if (rq->want_logprobs) {
        /* As local mode: top-n, and 1 (chosen logprobs only, no alternatives kept) for 0. */
        g->has_logprobs = 1;
        g->logprobs = rq->logprobs > 0 ? rq->logprobs : 1;
    }
    if (j->route_model) g->model = (char *)j->route_model;

    s->seq = j->seq_next++;
    j->inflight++;
    return remote_start(j, s);

line_error : {
    char *cid = s->custom_id;
    s->custom_id = NULL;
    slot_free(s);
    bslot *es = error_slot(j, cid, ln, code, emsg);
    return es ? complete(j, es) : TSR_BATCH_ENOMEM;
}
}

#define ADMIT_REFUSED (-100) /* the engine takes no more work (draining, down) */

/* Parse, tokenize and submit one line; error lines complete at once. Returns 0, or < 0
 * when the engine refuses work (draining / down: stop admitting). */
static int admit(job *j, tsr_batch_reader *r)
{
    char emsg[1024];
    int64_t ln = r->line_no;
    bslot *es = NULL;
    if (r->too_long) {
        snprintf(emsg, sizeof emsg,
                 "line %" PRId64
                 " is longer than --max-line-bytes (%zu bytes); shorten it or raise "
                 "the limit",
                 ln, j->max_line_bytes);
        es = error_slot(j, NULL, ln, "line_too_long", emsg);
        return es ? complete(j, es) : TSR_BATCH_ENOMEM;
    }
    tsr_batch_request rq;
    const char *code;
    char perr[768];
    if (tsr_batch_parse_line(r->buf, r->len, &rq, &code, perr, sizeof perr) != 0) {
        snprintf(emsg, sizeof emsg, "line %" PRId64 ": %s", ln, perr);
        es = error_slot(j, rq.custom_id, ln, code, emsg);
        return es ? complete(j, es) : TSR_BATCH_ENOMEM;
    }
    if (j->remote) return admit_remote(j, &rq, ln);
    int32_t *ids = NULL;
    size_t n_ids = 0;
    if (rq.kind == TSR_BATCH_CHAT) {
        if (!j->chat) {
            snprintf(emsg, sizeof emsg, "line %" PRId64 ": chat completions: %s", ln, j->chat_err);
            code = "unsupported";
            goto line_error;
        }
        if (chat_prompt(j, rq.messages_json, &ids, &n_ids, perr, sizeof perr) != 0) {
            snprintf(emsg, sizeof emsg, "line %" PRId64 ": messages: %s", ln, perr);
            goto line_error;
        }
        if (n_ids == 0) {
            snprintf(emsg, sizeof emsg, "line %" PRId64 ": messages: render to no tokens", ln);
            goto line_error;
        }
    } else if (rq.prompt) {
        char terr[512];
        /* A prompt longer than n_ctx tokens of at least one byte each cannot fit: refuse
         * before tokenizing megabytes. */
        size_t len = strlen(rq.prompt);
        if (len > (size_t)j->n_ctx * 64) {
            snprintf(emsg, sizeof emsg,
                     "line %" PRId64 ": prompt: %zu bytes cannot fit the context of %d tokens; "
                     "shorten the prompt",
                     ln, len, j->n_ctx);
            code = "prompt_too_long";
            goto line_error;
        }
        if (tsr_vocab_tokenize(j->vocab, rq.prompt, len, rq.add_special, true, &ids, &n_ids, terr,
                               sizeof terr) != 0) {
            snprintf(emsg, sizeof emsg, "line %" PRId64 ": prompt: cannot tokenize: %s", ln, terr);
            goto line_error;
        }
        if (n_ids == 0) {
            snprintf(emsg, sizeof emsg, "line %" PRId64 ": prompt: tokenizes to no tokens", ln);
            goto line_error;
        }
    } else {
        ids = rq.prompt_ids;
        n_ids = rq.n_prompt_ids;
        rq.prompt_ids = NULL;
        for (size_t i = 0; i < n_ids; i++) {
            if (ids[i] >= j->n_vocab) {
                snprintf(emsg, sizeof emsg,
                         "line %" PRId64 ": prompt[%zu]: token id %d is outside the vocabulary "
                         "[0, %d)",
                         ln, i, ids[i], j->n_vocab);
                goto line_error;
            }
        }
    }
    if (n_ids >= (size_t)j->n_ctx) {
        snprintf(emsg, sizeof emsg,
                 "line %" PRId64 ": prompt: %zu tokens do not fit the context of %d tokens (at "
                 "least one position must be left to generate); shorten the prompt or raise "
                 "--ctx-size",
                 ln, n_ids, j->n_ctx);
        code = "prompt_too_long";
        goto line_error;
    }
    if (!rq.has_seed) {
        if (j->seed_set) {
            uint64_t x = j->seed_base ^ fnv(rq.custom_id);
            rq.gen.sampling.seed = tsr_splitmix64(&x);
        } else {
            rq.gen.sampling.seed = tsr_splitmix64(&j->rng);
        }
    }
    /* The context bounds max_tokens, as in `tessera generate`: what fits, then "length". */
    if ((size_t)rq.gen.max_tokens + n_ids > (size_t)j->n_ctx)
        rq.gen.max_tokens = j->n_ctx - (int32_t)n_ids;

    bslot *s = calloc(1, sizeof *s);
    if (!s) {
        free(ids);
        tsr_batch_request_free(&rq);
        return TSR_BATCH_ENOMEM;
    }
    s->line_no = ln;
    s->custom_id = rq.custom_id;
    rq.custom_id = NULL;
    s->model = rq.model;
    rq.model = NULL;
    s->chat = rq.kind == TSR_BATCH_CHAT;
    s->want_logprobs = rq.want_logprobs;
    s->n_top = rq.want_logprobs ? rq.logprobs : 0;
    s->n_prompt = (int32_t)n_ids;
    s->job = j;
    tsr_engine_request er = {.prompt_ids = ids,
                             .n_prompt = n_ids,
                             .gen = rq.gen,
                             /* the engine's logprobs = top-n; chosen logprobs come with any
                                n >= 1, so logprobs 0 asks for 1 and keeps no alternatives */
                             .logprobs = rq.want_logprobs ? (rq.logprobs > 0 ? rq.logprobs : 1) : 0,
                             .speculation = 0,
                             .on_event = on_event,
                             .ud = s};
    char serr[512];
    s->seq = j->seq_next; /* before submit: events may come at once */
    int rc = tsr_engine_submit(j->eng, &er, NULL, serr, sizeof serr);
    /* The engine's queue count is published after each step, so it can lag behind the
     * lines this driver saw finish: a full queue here is transient. Retry for a while. */
    for (int tries = 0; rc == TSR_ENGINE_EQUEUE_FULL && tries < 5000; tries++) {
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
        rc = tsr_engine_submit(j->eng, &er, NULL, serr, sizeof serr);
    }
    free(ids);
    ids = NULL;
    if (rc == TSR_ENGINE_EINVAL) {
        char *cid = s->custom_id;
        s->custom_id = NULL;
        slot_free(s);
        snprintf(emsg, sizeof emsg, "line %" PRId64 ": %s", ln, serr);
        tsr_batch_request_free(&rq);
        es = error_slot(j, cid, ln, "invalid_request", emsg);
        return es ? complete(j, es) : TSR_BATCH_ENOMEM;
    }
    if (rc != 0) {
        slot_free(s);
        tsr_batch_request_free(&rq);
        snprintf(j->err, sizeof j->err, "the engine refused line %" PRId64 ": %s", ln, serr);
        return rc == TSR_ENGINE_ENOMEM ? TSR_BATCH_ENOMEM : ADMIT_REFUSED;
    }
    j->seq_next++;
    j->inflight++;
    tsr_batch_request_free(&rq);
    return 0;

line_error:
    free(ids);
    {
        char *cid = rq.custom_id;
        rq.custom_id = NULL;
        tsr_batch_request_free(&rq);
        es = error_slot(j, cid, ln, code, emsg);
    }
    return es ? complete(j, es) : TSR_BATCH_ENOMEM;
}

/* The lines finished since the last call, waiting up to wait_ms for one when lines are in
 * flight: local mode on the engine's condition variable, --coordinator by running the
 * client's completion queue (its callbacks queue the lines) or sleeping until the next
 * retry is due. *ended: the engine's step loop is gone (local mode). */
static bslot *take_finished(job *j, int64_t wait_ms, bool *ended)
{
    if (j->remote && j->fin_head == NULL && j->inflight > 0) {
        if (tsr_genclient_n_calls(j->gc) > 0) {
            tsr_genclient_poll(j->gc, wait_ms);
        } else if (j->retry_head) {
            uint64_t now = tsr_now_ns(), due = UINT64_MAX;
            for (bslot *s = j->retry_head; s; s = s->next)
                if (s->t_due_ns < due) due = s->t_due_ns;
            uint64_t w = due > now ? due - now : 0;
            if (w > (uint64_t)wait_ms * 1000000u) w = (uint64_t)wait_ms * 1000000u;
            struct timespec ts = {(time_t)(w / 1000000000u), (long)(w % 1000000000u)};
            nanosleep(&ts, NULL);
        }
    }
    pthread_mutex_lock(&j->mu);
    bslot *fin = j->fin_head;
    j->fin_head = j->fin_tail = NULL;
    *ended = j->engine_ended;
    if (!j->remote && !fin && j->inflight > 0 && !*ended && wait_ms > 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += wait_ms / 1000;
        ts.tv_nsec += (wait_ms % 1000) * 1000000L;
        ts.tv_sec += ts.tv_nsec / 1000000000L;
        ts.tv_nsec %= 1000000000L;
        pthread_cond_timedwait(&j->cv, &j->mu, &ts);
        fin = j->fin_head;
        j->fin_head = j->fin_tail = NULL;
        *ended = j->engine_ended;
    }
    pthread_mutex_unlock(&j->mu);
    return fin;
}

/* Stop what runs: its lines end (dropped) through take_finished. */
static void cancel_running(job *j)
{
    if (j->remote)
        remote_cancel(j);
    else
        tsr_engine_stop(j->eng, true);
}

/* The driver: resume scan, pre-scan, then the admission / completion loop. */
static void *driver_main(void *arg)
{
    job *j = arg;
    FILE *in = NULL;
    tsr_batch_reader r;
    bool reader_ok = false, out_ok = false;
    j->exit_code = TSR_BATCH_EXIT_ERROR;
    uint64_t n_out_lines = 0, n_torn = 0;
    int rc = tsr_batch_scan_output(j->out_path, true, j->done, &n_out_lines, &n_torn, j->err,
                                   sizeof j->err);
    if (rc != 0) {
        if (rc == TSR_BATCH_ECORRUPT) j->exit_code = TSR_BATCH_EXIT_USAGE;
        goto end;
    }
    if (n_torn)
        fprintf(stderr,
                "tessera batch: %s: cut a torn last line (%" PRIu64
                " bytes) left by an interrupted run\n",
                j->out_path, n_torn);
    rc = prescan(j);
    if (rc != 0) {
        if (rc == TSR_BATCH_EDUP) j->exit_code = TSR_BATCH_EXIT_USAGE;
        goto end;
    }
    if (n_out_lines)
        fprintf(stderr,
                "tessera batch: resuming: %s has %" PRIu64 " lines, %" PRIu64
                " of them answer lines of this %s\n",
                j->out_path, n_out_lines, j->n_resumed, j->shard_n > 1 ? "shard" : "input");
    fprintf(stderr,
            "tessera batch: %" PRIu64 " lines%s, %" PRIu64 " to do; window %d lines in flight%s\n",
            j->n_total, j->shard_n > 1 ? " in this shard" : "", j->n_total - j->n_resumed,
            j->window, j->ordered ? ", ordered output" : "");
    if (tsr_batch_out_open(&j->out, j->out_path, j->err, sizeof j->err) != 0) goto end;
    out_ok = true;
    in = fopen(j->in_path, "rb");
    if (!in || tsr_batch_reader_init(&r, in, j->max_line_bytes) != 0) {
        tsr_set_err(j->err, sizeof j->err, "cannot read %s: %s", j->in_path,
                    in ? "out of memory" : strerror(errno));
        goto end;
    }
    reader_ok = true;
    j->t_start_ns = j->t_last_flush_ns = j->t_last_progress_ns = tsr_now_ns();
    j->t_last_answer_ns = j->t_start_ns;
    if (j->tty) progress(j, false);

    bool eof = false, stopping = false, cancelled = false, refused = false;
    int stop_sig = 0;
    uint64_t stop_deadline = 0;
    rc = 0;
    for (;;) {
        /* Signals: stop admitting; after the grace period (or a second signal) cancel. */
        int nsig = atomic_load(&g_sig_count);
        if (nsig > 0 && !stopping) {
            stopping = true;
            stop_sig = atomic_load(&g_sig_last);
            stop_deadline = tsr_now_ns() + (uint64_t)j->grace_ms * 1000000u;
            if (j->tty) fputc('\n', stderr);
            fprintf(stderr,
                    "tessera batch: %s: no new lines; %d running may finish within %" PRId64
                    " ms, then the output is flushed and the run stops (exit 3: rerun to "
                    "continue)\n",
                    sig_name(stop_sig), j->inflight, j->grace_ms);
        }
        if (stopping && !cancelled && j->inflight > 0 &&
            (tsr_now_ns() >= stop_deadline || nsig > 1)) {
            fprintf(stderr, "tessera batch: %s: dropping %d running lines (a rerun does them)\n",
                    nsig > 1 ? "second signal" : "grace period over", j->inflight);
            cancel_running(j);
            cancelled = true;
        }
        if (j->remote && !cancelled) {
            /* The cluster is gone when lines wait for retries and it has answered nothing
             * for --retry-timeout; a line out of retries, or credentials refused, end the
             * run too. Stop now: the rerun continues. */
            bool lost = j->retry_head && tsr_now_ns() - j->t_last_answer_ns >=
                                             (uint64_t)j->retry_timeout_ms * 1000000u;
            if (lost || j->gave_up || j->fatal) {
                if (lost) {
                    fprintf(stderr,
                            "tessera batch: %s has answered nothing for %" PRId64
                            " ms (last: %s); dropping %d lines in flight (a rerun does them)\n",
                            j->coord_addr, j->retry_timeout_ms, j->last_transient, j->inflight);
                    j->gave_up = true;
                }
                stopping = true;
                cancel_running(j);
                cancelled = true;
            }
        }
        if (j->remote && !cancelled && (rc = remote_retry_due(j)) != 0) {
            tsr_set_err(j->err, sizeof j->err, "out of memory");
            break;
        }
        /* Admit. */
        while (!stopping && !refused && !eof && rc == 0 && j->inflight < j->window &&
               (!j->ordered || j->seq_next < j->seq_out + (uint64_t)j->window)) {
            int k = tsr_batch_reader_next(&r);
            if (k < 0) {
                tsr_set_err(j->err, sizeof j->err, "cannot read %s: %s", j->in_path,
                            strerror(errno));
                rc = k;
                break;
            }
            if (k == 0) {
                eof = true;
                break;
            }
            if (!r.too_long && tsr_batch_line_blank(r.buf, r.len)) continue;
            if ((r.line_no - 1) % j->shard_n != j->shard_i) continue;
            size_t klen;
            char *key = line_key(&r, &klen);
            if (!key) {
                rc = TSR_BATCH_ENOMEM;
                break;
            }
            bool skip = tsr_batch_keyset_has(j->done, key, klen);
            free(key);
            if (skip) continue;
            int a = admit(j, &r);
            if (a == ADMIT_REFUSED) {
                refused = true; /* the engine is draining or down */
            } else if (a != 0) {
                rc = a;
                if (a == TSR_BATCH_ENOMEM) tsr_set_err(j->err, sizeof j->err, "out of memory");
            }
        }
        if (rc != 0) break;
        /* Collect what finished. */
        bool ended;
        bslot *fin = take_finished(j, 50, &ended);
        while (fin) {
            bslot *nx = fin->next;
            j->inflight--;
            int c = complete(j, fin);
            if (c != 0 && rc == 0) {
                rc = c;
                tsr_set_err(j->err, sizeof j->err, "out of memory");
            }
            fin = nx;
        }
        if (rc != 0) break;
        uint64_t t = tsr_now_ns();
        if (j->out.n_lines_buffered >= (size_t)j->flush_lines ||
            (j->out.n_lines_buffered &&
             t - j->t_last_flush_ns >= (uint64_t)j->flush_ms * 1000000u)) {
            if ((rc = flush_out(j)) != 0) break;
        }
        if (j->tty
                ? t - j->t_last_progress_ns >= 250000000u
                : j->progress_s > 0 && (double)(t - j->t_last_progress_ns) / 1e9 >= j->progress_s)
            progress(j, false);
        if (j->inflight == 0 && (eof || stopping || refused || ended)) break;
        if (ended && j->inflight > 0) {
            /* The step loop is gone: nothing will finish these. */
            break;
        }
    }
    if (rc == 0) rc = flush_out(j);
    if (j->tty) progress(j, true);
    pthread_mutex_lock(&j->mu);
    bool ended = j->engine_ended;
    pthread_mutex_unlock(&j->mu);
    if (rc != 0) goto end;
    if (refused || ended) {
        if (!j->err[0]) snprintf(j->err, sizeof j->err, "the engine stopped");
        goto end;
    }
    if (j->fatal) goto end; /* the cluster refused the credentials: j->err says so */
    double el = (double)(tsr_now_ns() - j->t_start_ns) / 1e9;
    bool complete_run = eof && j->n_dropped == 0;
    fprintf(stderr,
            "tessera batch: %s: %" PRIu64 " lines ok, %" PRIu64 " failed, %" PRIu64
            " resumed (already in %s), %" PRIu64 " dropped; %" PRIu64 " prompt + %" PRIu64
            " generated tokens in %.2f s: %.1f generated tokens/s, %.1f total tokens/s; peak "
            "RSS %.1f MiB, custom_id sets %.1f MiB\n",
            complete_run ? "done" : "INCOMPLETE", j->n_ok, j->n_failed, j->n_resumed, j->out_path,
            j->n_dropped, j->n_prompt_tokens, j->n_gen_tokens, el,
            el > 0 ? (double)j->n_gen_tokens / el : 0.0,
            el > 0 ? (double)(j->n_gen_tokens + j->n_prompt_tokens) / el : 0.0,
            (double)peak_rss_kib() / 1024.0, (double)j->keyset_peak_bytes / 1048576.0);
    if (j->remote)
        fprintf(stderr, "tessera batch: %s: %" PRIu64 " retries of transient errors (%s)\n",
                j->coord_addr, j->n_retries, j->n_retries ? j->last_transient : "none");
    if (complete_run) {
        j->exit_code = TSR_BATCH_EXIT_OK;
    } else {
        uint64_t done = j->n_resumed + j->n_ok + j->n_failed;
        char why[700];
        if (stop_sig)
            snprintf(why, sizeof why, "%s", sig_name(stop_sig));
        else if (j->gave_up)
            snprintf(why, sizeof why, "the cluster at %s: %s", j->coord_addr, j->last_transient);
        else
            snprintf(why, sizeof why, "stopped");
        fprintf(stderr,
                "tessera batch: incomplete (%s): %" PRIu64 " of %" PRIu64 " lines done; rerun "
                "the same command to continue (exit status 3)\n",
                why, done, j->n_total);
        j->exit_code = TSR_BATCH_EXIT_INCOMPLETE;
    }
end:
    if (j->exit_code != TSR_BATCH_EXIT_OK && j->exit_code != TSR_BATCH_EXIT_INCOMPLETE)
        fprintf(stderr, "tessera batch: %s\n", j->err[0] ? j->err : "failed");
    if (out_ok) {
        char e2[512];
        if (tsr_batch_out_close(&j->out, e2, sizeof e2) != 0) {
            fprintf(stderr, "tessera batch: %s\n", e2);
            j->exit_code = TSR_BATCH_EXIT_ERROR;
        }
    }
    if (reader_ok) tsr_batch_reader_free(&r);
    if (in) fclose(in);
    /* Lines still in flight (an error above): cancel them and wait for their FINISH, so
     * no callback touches a freed slot. */
    if (j->remote) {
        if (j->inflight > 0) remote_cancel(j);
    } else {
        tsr_engine_stop(j->eng, j->inflight > 0 || j->exit_code != TSR_BATCH_EXIT_OK);
    }
    for (;;) {
        bool ended;
        bslot *fin = take_finished(j, 1000, &ended);
        while (fin) {
            bslot *nx = fin->next;
            j->inflight--;
            slot_free(fin);
            fin = nx;
        }
        if (j->inflight <= 0 || ended) break;
    }
    if (j->ring)
        for (int32_t i = 0; i < j->window; i++) slot_free(j->ring[i]);
    return NULL;
}

/* ---- merge mode ---- */

static int run_merge(int argc, char **argv, int first, const char *input)
{
    if (argc - first < 2)
        return tsr_cli_usage_error("batch", "--merge needs OUT and at least one IN file");
    const char *out = argv[first];
    char err[1024];
    uint64_t n = 0;
    int rc = tsr_batch_merge(out, (const char *const *)argv + first + 1, (size_t)(argc - first - 1),
                             input, &n, err, sizeof err);
    if (rc != 0) {
        fprintf(stderr, "tessera batch --merge: %s (nothing written)\n", err);
        return TSR_BATCH_EXIT_ERROR;
    }
    fprintf(stderr, "tessera batch --merge: %" PRIu64 " lines from %d files into %s%s\n", n,
            argc - first - 1, out, input ? " (every input line answered once)" : "");
    return 0;
}

/* ---- KV sizing (as `serve`, but bounded by free memory) ---- */

static uint64_t mem_available_bytes(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return 0;
    char line[256];
    uint64_t kb = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %" SCNu64 " kB", &kb) == 1) break;
    fclose(f);
    return kb * 1024u;
}

static int read_hparams(const char *path, tsr_hparams *hp, char *name, size_t name_cap, char *err,
                        size_t err_len)
{
    tsr_gguf *g;
    if (tsr_gguf_open(path, &g, err, err_len) != 0) return -1;
    int rc = tsr_model_read_hparams(g, hp, err, err_len);
    tsr_gguf_str s;
    if (tsr_gguf_get_str(g, "general.name", &s) && s.len > 0) {
        snprintf(name, name_cap, "%.*s", (int)(s.len < name_cap - 1 ? s.len : name_cap - 1), s.ptr);
    } else {
        const char *b = strrchr(path, '/');
        snprintf(name, name_cap, "%s", b ? b + 1 : path);
    }
    tsr_gguf_close(g);
    return rc;
}

/* ---- --coordinator: the same job against a running cluster ---- */

typedef struct {
    const char *coordinator, *vocab_model, *route_model;
    tsr_cli_client_security_opts sec; /* --api-key-file, --tls-* */
    const char *in_path, *out_path;
    bool ordered;
    int64_t shard_i, shard_n;
    bool seed_set;
    uint64_t seed;
    float progress_s;
    int64_t grace_ms, flush_lines, flush_ms;
    uint64_t max_line;
    int64_t concurrency, request_timeout_ms, retry_timeout_ms, max_retries;
} remote_args;

/* No model here: the driver runs on this thread, its lines are Generate calls in flight on
 * one completion queue (genclient.h). ModelInfo first: the model's name for the output
 * lines (as local mode: general.name, else the served name), the context and vocabulary
 * sizes for the same early checks as local mode — and a clear error when the cluster
 * cannot be reached or refuses the credentials. */
static int run_remote(const remote_args *a)
{
    char err[1024], model_name[256];
    int exit_code = TSR_BATCH_EXIT_ERROR;
    char *auth = NULL;
    tsr_tls_client tls = {0};
    tsr_gguf *g = NULL;
    tsr_vocab *vocab = NULL;
    tsr_genclient *gc = NULL;
    Tessera__V1__ModelInfoResponse *mi = NULL;
    job j;
    memset(&j, 0, sizeof j);
    if (tsr_cli_client_security_load(&a->sec, "TESSERA_API_KEY", &auth, &tls, err, sizeof err) !=
        0) {
        fprintf(stderr, "tessera batch: %s\n", err);
        return TSR_BATCH_EXIT_USAGE;
    }
    tsr_genclient_opts o = {.target = a->coordinator, .tls = &tls, .authorization = auth};
    if (tsr_genclient_new(&o, &gc, err, sizeof err) != 0) {
        fprintf(stderr, "tessera batch: %s\n", err);
        tsr_tls_client_free(&tls);
        free(auth);
        return TSR_BATCH_EXIT_ERROR;
    }
    if (a->vocab_model) {
        /* The vocabulary only (logprobs' token strings): the GGUF is mapped, no weights are
         * read. */
        if (tsr_gguf_open(a->vocab_model, &g, err, sizeof err) != 0 ||
            tsr_vocab_load(g, &vocab, err, sizeof err) != 0) {
            fprintf(stderr, "tessera batch: -m %s: %s\n", a->vocab_model, err);
            goto release;
        }
    }
    /* The cluster may be starting (a requeued job, replicas still loading): ask for up to
     * --retry-timeout while it answers a transient status. */
    uint64_t t0 = tsr_now_ns();
    for (int tries = 0;; tries++) {
        int code = tsr_genclient_model_info(gc, a->route_model, MODEL_INFO_TIMEOUT_MS, &mi, err,
                                            sizeof err);
        if (code == GRPC_STATUS_OK) break;
        if (!tsr_genclient_code_transient(code) ||
            tsr_now_ns() - t0 >= (uint64_t)a->retry_timeout_ms * 1000000u) {
            fprintf(stderr, "tessera batch: --coordinator %s: ModelInfo: %s: %s%s\n",
                    a->coordinator, tsr_rpc_code_name(code), err,
                    tsr_genclient_code_transient(code)
                        ? " (is the coordinator running and a replica up? rerun to continue)"
                        : "");
            if (tsr_genclient_code_transient(code)) exit_code = TSR_BATCH_EXIT_INCOMPLETE;
            goto release;
        }
        struct timespec ts = {0, (tries < 4 ? 100000000L << tries : 1000000000L) % 1000000000L};
        if (tries >= 4) ts.tv_sec = 1;
        nanosleep(&ts, NULL);
    }
    if (mi->name && mi->name[0])
        snprintf(model_name, sizeof model_name, "%s", mi->name);
    else
        snprintf(model_name, sizeof model_name, "%s", mi->model ? mi->model : "");
    if (vocab && mi->has_vocab_size && tsr_vocab_n_tokens(vocab) != mi->vocab_size) {
        fprintf(stderr,
                "tessera batch: -m %s has %d tokens but the cluster's model has %d: pass the "
                "file the cluster serves\n",
                a->vocab_model, tsr_vocab_n_tokens(vocab), mi->vocab_size);
        goto release;
    }
    j.remote = true;
    j.gc = gc;
    j.coord_addr = a->coordinator;
    j.route_model = a->route_model;
    j.request_timeout_ms = a->request_timeout_ms;
    j.retry_timeout_ms = a->retry_timeout_ms;
    j.max_retries = (int32_t)a->max_retries;
    j.model_name = model_name;
    j.in_path = a->in_path;
    j.out_path = a->out_path;
    j.ordered = a->ordered;
    j.shard_i = a->shard_i;
    j.shard_n = a->shard_n;
    j.seed_set = a->seed_set;
    j.seed_base = a->seed;
    j.progress_s = a->progress_s;
    j.grace_ms = a->grace_ms;
    j.flush_lines = a->flush_lines;
    j.flush_ms = a->flush_ms;
    j.max_line_bytes = (size_t)a->max_line;
    j.window = (int32_t)a->concurrency;
    j.vocab = vocab;
    j.n_vocab = mi->has_vocab_size ? mi->vocab_size : INT32_MAX;
    j.n_ctx =
        mi->has_context_length && mi->context_length > 0 ? mi->context_length : INT32_MAX / 64;
    if (job_init(&j) != 0) {
        fprintf(stderr, "tessera batch: %s\n", j.err);
        goto release;
    }
    install_signals();
    fprintf(stderr,
            "tessera batch: --coordinator %s%s: model '%s' (context %d), %" PRId64
            " calls in flight, request timeout %" PRId64 " ms, retries up to %" PRId64
            " per line, give up after %" PRId64 " ms without an answer\n",
            a->coordinator, tsr_tls_client_enabled(&tls) ? " (TLS)" : "", model_name,
            mi->has_context_length ? mi->context_length : 0, a->concurrency, a->request_timeout_ms,
            a->max_retries, a->retry_timeout_ms);
    driver_main(&j);
    exit_code = j.exit_code;

release:
    job_cleanup(&j);
    restore_signals();
    if (mi) tessera__v1__model_info_response__free_unpacked(mi, NULL);
    tsr_genclient_free(gc);
    tsr_vocab_free(vocab);
    if (g) tsr_gguf_close(g);
    tsr_tls_client_free(&tls);
    free(auth);
    return exit_code;
}

/* ---- the command ---- */

int tsr_cmd_batch(int argc, char **argv)
{
    enum {
        O_ORDERED = 256,
        O_SHARD,
        O_SEED,
        O_PROGRESS,
        O_GRACE,
        O_FLUSH_LINES,
        O_FLUSH_MS,
        O_MAX_LINE,
        O_TP,
        O_PP,
        O_LAYERS,
        O_COMM_TIMEOUT,
        O_MERGE,
        O_CHAT_TEMPLATE,
        O_COORDINATOR,
        O_CONCURRENCY,
        O_REQUEST_TIMEOUT,
        O_RETRY_TIMEOUT,
        O_MAX_RETRIES,
        O_MODEL_NAME,
    };
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},
        {"input", required_argument, 0, 'i'},
        {"output", required_argument, 0, 'o'},
        {"ordered", no_argument, 0, O_ORDERED},
        {"shard", required_argument, 0, O_SHARD},
        {"seed", required_argument, 0, O_SEED},
        {"progress-interval", required_argument, 0, O_PROGRESS},
        {"shutdown-grace", required_argument, 0, O_GRACE},
        {"flush-lines", required_argument, 0, O_FLUSH_LINES},
        {"flush-interval", required_argument, 0, O_FLUSH_MS},
        {"max-line-bytes", required_argument, 0, O_MAX_LINE},
        TSR_CLI_ENGINE_OPTS,
        {"tp", required_argument, 0, O_TP},
        {"kv-type", required_argument, 0, TSR_CLI_O_KV_TYPE},
        {"no-repack", no_argument, 0, TSR_CLI_O_NO_REPACK},
        {"q8-order", required_argument, 0, TSR_CLI_O_Q8_ORDER},
        {"pp", required_argument, 0, O_PP},
        {"layers", required_argument, 0, O_LAYERS},
        {"comm-timeout", required_argument, 0, O_COMM_TIMEOUT},
        {"merge", no_argument, 0, O_MERGE},
        {"chat-template", required_argument, 0, O_CHAT_TEMPLATE},
        {"coordinator", required_argument, 0, O_COORDINATOR},
        {"concurrency", required_argument, 0, O_CONCURRENCY},
        {"request-timeout", required_argument, 0, O_REQUEST_TIMEOUT},
        {"retry-timeout", required_argument, 0, O_RETRY_TIMEOUT},
        {"max-retries", required_argument, 0, O_MAX_RETRIES},
        {"model-name", required_argument, 0, O_MODEL_NAME},
        TSR_CLI_CLIENT_SECURITY_OPTS,
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    const char *model = DEFAULT_MODEL, *in_path = NULL, *out_path = NULL;
    bool model_given = false;
    tsr_replica_params rp = {.tp = 1, .pp = 1};
    tsr_cli_engine_opts eo;
    tsr_cli_engine_defaults(&eo, 512, 128);
    int64_t grace_ms = DEFAULT_GRACE_MS, flush_lines = DEFAULT_FLUSH_LINES,
            flush_ms = DEFAULT_FLUSH_MS, v;
    int64_t shard_i = 0, shard_n = 1;
    uint64_t max_line = DEFAULT_MAX_LINE_BYTES, seed = 0;
    bool ordered = false, seed_set = false, merge = false;
    const char *chat_template = NULL;
    const char *coordinator = NULL, *route_model = NULL;
    tsr_cli_client_security_opts sec = {0};
    int64_t concurrency = DEFAULT_CONCURRENCY, request_timeout_ms = DEFAULT_REQUEST_TIMEOUT_MS,
            retry_timeout_ms = DEFAULT_RETRY_TIMEOUT_MS, max_retries = DEFAULT_MAX_RETRIES;
    bool local_only_flag = false; /* an engine / layout flag: meaningless with --coordinator */
    float progress_s = 30.0f;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:i:o:h" TSR_CLI_ENGINE_SHORTOPTS, opts, NULL)) != -1) {
        int erc = tsr_cli_engine_flag("batch", c, optarg, &eo);
        if (erc >= 0) {
            if (erc != 0) return erc;
            local_only_flag = true;
            continue;
        }
        if (tsr_cli_client_security_flag(c, optarg, &sec) == 0) continue;
        switch (c) {
#define INT_FLAG(name, lo, hi, dst)                                                                \
    do {                                                                                           \
        if (!tsr_cli_parse_i64(optarg, lo, hi, &v))                                                \
            return tsr_cli_usage_error("batch", "%s needs an integer in %lld..%lld, got '%s'",     \
                                       name, (long long)(lo), (long long)(hi), optarg);            \
        (dst) = v;                                                                                 \
    } while (0)
        case 'm':
            model = optarg;
            model_given = true;
            break;
        case 'i':
            in_path = optarg;
            break;
        case 'o':
            out_path = optarg;
            break;
        case O_ORDERED:
            ordered = true;
            break;
        case O_MERGE:
            merge = true;
            break;
        case O_CHAT_TEMPLATE:
            chat_template = optarg;
            local_only_flag = true;
            break;
        case O_SHARD: {
            const char *slash = strchr(optarg, '/');
            char ib[32];
            if (!slash || (size_t)(slash - optarg) >= sizeof ib)
                return tsr_cli_usage_error("batch", "--shard needs I/N (e.g. 0/3), got '%s'",
                                           optarg);
            memcpy(ib, optarg, (size_t)(slash - optarg));
            ib[slash - optarg] = '\0';
            if (!tsr_cli_parse_i64(slash + 1, 1, 1 << 20, &shard_n) ||
                !tsr_cli_parse_i64(ib, 0, shard_n - 1, &shard_i))
                return tsr_cli_usage_error(
                    "batch", "--shard needs I/N with 0 <= I < N (e.g. 0/3), got '%s'", optarg);
            break;
        }
        case O_SEED:
            if (!tsr_cli_parse_u64(optarg, &seed))
                return tsr_cli_usage_error("batch", "--seed needs a non-negative integer, got '%s'",
                                           optarg);
            seed_set = true;
            break;
        case O_PROGRESS:
            if (!tsr_cli_parse_f32(optarg, &progress_s) || progress_s < 0)
                return tsr_cli_usage_error(
                    "batch", "--progress-interval needs seconds >= 0 (e.g. 30, 0.5), got '%s'",
                    optarg);
            break;
        case O_GRACE:
            INT_FLAG("--shutdown-grace", 0, 86400000, grace_ms);
            break;
        case O_FLUSH_LINES:
            INT_FLAG("--flush-lines", 1, 1 << 20, flush_lines);
            break;
        case O_FLUSH_MS:
            INT_FLAG("--flush-interval", 0, 86400000, flush_ms);
            break;
        case O_MAX_LINE:
            if (!tsr_cli_parse_bytes(optarg, &max_line) || max_line < 16 || max_line > (1ull << 30))
                return tsr_cli_usage_error(
                    "batch", "--max-line-bytes needs a size in 16..1G (e.g. 8M), got '%s'", optarg);
            break;
        case O_TP:
            INT_FLAG("--tp", 1, 256, rp.tp);
            local_only_flag = true;
            break;
        case O_PP:
            INT_FLAG("--pp", 1, 256, rp.pp);
            local_only_flag = true;
            break;
        case O_COMM_TIMEOUT:
            INT_FLAG("--comm-timeout", 1, 86400000, rp.timeout_ms);
            local_only_flag = true;
            break;
        case O_CONCURRENCY:
            INT_FLAG("--concurrency", 1, 65536, concurrency);
            break;
        case O_REQUEST_TIMEOUT:
            INT_FLAG("--request-timeout", 1, 86400000, request_timeout_ms);
            break;
        case O_RETRY_TIMEOUT:
            INT_FLAG("--retry-timeout", 1, 86400000, retry_timeout_ms);
            break;
        case O_MAX_RETRIES:
            INT_FLAG("--max-retries", 0, 1000000, max_retries);
            break;
#undef INT_FLAG
        case O_LAYERS:
            rp.layers = optarg;
            local_only_flag = true;
            break;
        case TSR_CLI_O_KV_TYPE:
            if (tsr_cli_kv_type_flag("batch", optarg, &rp) != 0) return TSR_CLI_EXIT_USAGE;
            local_only_flag = true;
            break;
        case TSR_CLI_O_NO_REPACK:
        case TSR_CLI_O_Q8_ORDER:
            if (tsr_cli_replica_flag("batch", c, optarg, &rp) != 0) return TSR_CLI_EXIT_USAGE;
            local_only_flag = true;
            break;
        case O_COORDINATOR:
            if (!tsr_cli_parse_hostport(optarg, NULL, 0, NULL))
                return tsr_cli_usage_error(
                    "batch", "--coordinator needs HOST:PORT (e.g. 127.0.0.1:50050), got '%s'",
                    optarg);
            coordinator = optarg;
            break;
        case O_MODEL_NAME:
            if (!optarg[0] || strlen(optarg) > 200)
                return tsr_cli_usage_error("batch", "--model-name needs 1..200 characters");
            route_model = optarg;
            break;
        case 'h':
            fputs(batch_help, stdout);
            return 0;
        default:
            return tsr_cli_usage_error("batch", "unknown flag");
        }
    }
    if (merge) return run_merge(argc, argv, optind, in_path);
    if (optind != argc)
        return tsr_cli_usage_error("batch", "unexpected argument '%s'", argv[optind]);
    if (!in_path) return tsr_cli_usage_error("batch", "needs an input file: -i INPUT.jsonl");
    if (!out_path) return tsr_cli_usage_error("batch", "needs an output file: -o OUTPUT.jsonl");
    if (!strcmp(in_path, out_path))
        return tsr_cli_usage_error("batch", "-i and -o name the same file");
    if (coordinator) {
        if (local_only_flag)
            return tsr_cli_usage_error(
                "batch", "engine, layout and --chat-template flags configure a local replica; with "
                         "--coordinator the cluster's replicas have their own (drop them)");
        int src = tsr_cli_client_security_finish("batch", &sec);
        if (src != 0) return src;
        return run_remote(&(remote_args){.coordinator = coordinator,
                                         .vocab_model = model_given ? model : NULL,
                                         .route_model = route_model,
                                         .sec = sec,
                                         .in_path = in_path,
                                         .out_path = out_path,
                                         .ordered = ordered,
                                         .shard_i = shard_i,
                                         .shard_n = shard_n,
                                         .seed_set = seed_set,
                                         .seed = seed,
                                         .progress_s = progress_s,
                                         .grace_ms = grace_ms,
                                         .flush_lines = flush_lines,
                                         .flush_ms = flush_ms,
                                         .max_line = max_line,
                                         .concurrency = concurrency,
                                         .request_timeout_ms = request_timeout_ms,
                                         .retry_timeout_ms = retry_timeout_ms,
                                         .max_retries = max_retries});
    }
    if (route_model || tsr_cli_client_security_given(&sec))
        return tsr_cli_usage_error("batch", "--model-name, --tls-* and --api-key-file go with "
                                            "--coordinator ADDR");
    const int64_t max_batch = eo.max_batch_tokens, max_seqs = eo.max_seqs, n_ctx = eo.n_ctx,
                  n_threads = eo.n_threads;
    const uint64_t kv_memory = eo.n_bytes_kv;

    char err[1024], model_name[256];
    tsr_hparams hp;
    if (read_hparams(model, &hp, model_name, sizeof model_name, err, sizeof err) != 0) {
        fprintf(stderr, "tessera batch: %s\n", err);
        return TSR_BATCH_EXIT_ERROR;
    }
    /* KV pool: one block = TSR_KV_BLOCK_SIZE positions of K and V, every layer and KV
     * head, in --kv-type. Default: --max-seqs full contexts, at most a quarter of the free
     * memory and DEFAULT_KV_CAP, at least one context. */
    uint64_t block_bytes =
        tsr_kv_block_bytes(&hp, hp.n_layer, hp.n_head_kv, tsr_replica_params_kv_type(&rp));
    int64_t ctx_tokens =
        n_ctx > 0 ? n_ctx : (hp.n_ctx_train > 0 && hp.n_ctx_train < 4096 ? hp.n_ctx_train : 4096);
    uint64_t blocks_per_seq = (uint64_t)(ctx_tokens + TSR_KV_BLOCK_SIZE - 1) / TSR_KV_BLOCK_SIZE;
    uint64_t n_blocks;
    if (kv_memory) {
        n_blocks = kv_memory / block_bytes;
    } else {
        uint64_t cap = mem_available_bytes() / 4;
        if (cap == 0 || cap > DEFAULT_KV_CAP) cap = DEFAULT_KV_CAP;
        n_blocks = blocks_per_seq * (uint64_t)max_seqs;
        if (n_blocks > cap / block_bytes) n_blocks = cap / block_bytes;
    }
    if (n_blocks < blocks_per_seq) {
        if (kv_memory) {
            fprintf(stderr,
                    "tessera batch: --kv-memory %" PRIu64 " holds %" PRIu64 " KV blocks but one "
                    "context of %" PRId64 " tokens needs %" PRIu64 " (%" PRIu64
                    " bytes each); raise it or lower --ctx-size\n",
                    kv_memory, n_blocks, ctx_tokens, blocks_per_seq, block_bytes);
            return TSR_BATCH_EXIT_ERROR;
        }
        n_blocks = blocks_per_seq;
    }
    if (n_blocks > INT32_MAX / TSR_KV_BLOCK_SIZE) n_blocks = INT32_MAX / TSR_KV_BLOCK_SIZE;

    rp.n_threads = (int)n_threads;
    rp.n_ctx = (int32_t)n_ctx;
    rp.n_batch = (int32_t)max_batch;
    rp.n_kv_blocks = (int32_t)n_blocks;
    tsr_replica *rep;
    if (tsr_cli_replica_open("batch", model, &rp, &rep) != 0) return TSR_BATCH_EXIT_ERROR;
    const uint64_t t_run_ns = tsr_now_ns();
    if (!tsr_replica_is_leader(rep)) {
        /* The leader coordinates the stop; a signal forwarded by the launcher (srun
         * forwards SIGTERM to every task, mpirun SIGUSR1) must not kill a follower. */
        ignore_signals();
        return tsr_cli_follow("batch", rep); /* 1 = TSR_BATCH_EXIT_ERROR on failure */
    }

    int exit_code = TSR_BATCH_EXIT_ERROR;
    tsr_engine *eng = NULL;
    tsr_chat_template *chat = NULL;
    job j;
    memset(&j, 0, sizeof j);
    bool driver_started = false;
    pthread_t driver;
    tsr_engine_params ep = {
        .max_batch_tokens = (int32_t)max_batch,
        .max_seqs = (int32_t)max_seqs,
        /* The driver keeps at most 2 x max_seqs lines in flight; the slack covers the
           engine's queue count lagging by a step. */
        .max_queue = (int32_t)(4 * max_seqs + 16),
        .n_kv_blocks =
            tsr_replica_n_kv_blocks(rep) > 0 ? tsr_replica_n_kv_blocks(rep) : (int32_t)n_blocks,
        .idle_heartbeat_ms = 1000,
        .spec_default_on = false,
    };
    ep.no_prefix_cache = eo.no_prefix_cache;
    int64_t comm_timeout = rp.timeout_ms > 0 ? rp.timeout_ms : 30000;
    if (ep.idle_heartbeat_ms > comm_timeout / 4) ep.idle_heartbeat_ms = comm_timeout / 4;
    if (ep.idle_heartbeat_ms < 1) ep.idle_heartbeat_ms = 1;
    if (tsr_engine_new(rep, &ep, &eng, err, sizeof err) != 0) {
        fprintf(stderr, "tessera batch: %s\n", err);
        goto release;
    }
    j.model_name = model_name;
    j.in_path = in_path;
    j.out_path = out_path;
    j.ordered = ordered;
    j.shard_i = shard_i;
    j.shard_n = shard_n;
    j.seed_set = seed_set;
    j.seed_base = seed;
    j.progress_s = progress_s;
    j.grace_ms = grace_ms;
    j.flush_lines = flush_lines;
    j.flush_ms = flush_ms;
    j.max_line_bytes = (size_t)max_line;
    j.window = (int32_t)(2 * max_seqs);
    j.eng = eng;
    j.vocab = tsr_replica_vocab(rep);
    j.n_vocab = tsr_vocab_n_tokens(j.vocab);
    j.n_ctx = tsr_replica_n_ctx(rep);
    if (j.n_ctx > ep.n_kv_blocks * TSR_KV_BLOCK_SIZE) j.n_ctx = ep.n_kv_blocks * TSR_KV_BLOCK_SIZE;
    /* Chat lines: the model's chat template, or --chat-template; without one they get
     * error lines (the completions still run). */
    if (tsr_chat_template_for_model(tsr_replica_gguf(rep), j.vocab, chat_template, &chat,
                                    j.chat_err, sizeof j.chat_err) != 0) {
        if (chat_template) {
            fprintf(stderr, "tessera batch: --chat-template: %s\n", j.chat_err);
            goto release;
        }
    }
    j.chat = chat;
    if (job_init(&j) != 0) {
        fprintf(stderr, "tessera batch: %s\n", j.err);
        goto release;
    }
    install_signals();

    fprintf(stderr,
            "tessera batch: %s, tp %d x pp %d, context %d, KV %d blocks (%.1f MiB), max batch "
            "%" PRId64 " tokens, %" PRId64 " sequences, %" PRId64 " threads\n",
            model, rp.tp, rp.pp, j.n_ctx, ep.n_kv_blocks,
            (double)ep.n_kv_blocks * (double)block_bytes / 1048576.0, max_batch, max_seqs,
            n_threads);
    if (pthread_create(&driver, NULL, driver_main, &j) != 0) {
        fprintf(stderr, "tessera batch: cannot start the driver thread\n");
        goto release;
    }
    driver_started = true;
    /* The step loop on the MPI thread until the driver stops it. */
    int run_rc = tsr_engine_run(eng, err, sizeof err);
    pthread_mutex_lock(&j.mu);
    j.engine_ended = true;
    pthread_cond_signal(&j.cv);
    pthread_mutex_unlock(&j.mu);
    pthread_join(driver, NULL);
    driver_started = false;
    exit_code = j.exit_code;
    if (run_rc != 0) {
        fprintf(stderr, "tessera batch: the engine stopped: %s\n", err);
        if (exit_code == TSR_BATCH_EXIT_OK || exit_code == TSR_BATCH_EXIT_INCOMPLETE)
            exit_code = TSR_BATCH_EXIT_ERROR;
    }

release:
    if (driver_started) {
        tsr_engine_stop(eng, true);
        pthread_join(driver, NULL);
    }
    tsr_engine_free(eng);
    tsr_chat_template_free(chat);
    job_cleanup(&j);
    {
        tsr_rank_stats *st = calloc((size_t)tsr_replica_size(rep), sizeof *st);
        if (!st || tsr_replica_shutdown(rep, err, sizeof err) != 0 ||
            tsr_replica_stats(rep, st, err, sizeof err) != 0) {
            fprintf(stderr, "tessera batch: shutting the replica down: %s\n",
                    st ? err : "out of memory");
            free(st);
            tsr_comm_mpi_abort(1);
            return TSR_BATCH_EXIT_ERROR;
        }
        /* Where the time went, per rank: forward passes (compute), waiting on other ranks
         * (comm); the rest of the wall time is the leader's sampling, scheduling and I/O. */
        double wall_s = (double)(tsr_now_ns() - t_run_ns) / 1e9;
        for (int r = 0; r < tsr_replica_size(rep) && r < 16 && st[r].n_steps; r++)
            fprintf(stderr,
                    "tessera batch: rank %d: %" PRIu64 " steps, %" PRIu64
                    " tokens (%.1f per step), compute %.1f s, comm %.1f s of %.1f s wall\n",
                    st[r].rank, st[r].n_steps, st[r].n_tokens,
                    (double)st[r].n_tokens / (double)st[r].n_steps, st[r].t_compute_ns / 1e9,
                    st[r].t_comm_ns / 1e9, wall_s);
        free(st);
    }
    tsr_replica_close(rep);
    restore_signals();
    return exit_code;
}
