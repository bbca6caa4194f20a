/*
 * serve.c — `tessera serve`: one replica (tp × pp ranks under mpirun/srun, or one plain
 * process) behind the gRPC server of coordinator/server.h.
 *
 * Every rank opens the replica with a paged KV pool sized from --kv-memory; followers
 * serve steps (tsr_replica_follow) until the leader shuts the replica down. The leader
 * creates the engine, starts the gRPC server (its own threads) and runs the engine's step
 * loop on the main thread, because MPI is used funneled: only the thread that initialized
 * it communicates. A control thread turns SIGTERM / SIGINT into the shutdown sequence:
 * health NOT_SERVING, drain (running and queued requests finish) for up to
 * --shutdown-grace, then cancel what is left and stop the step loop; the main thread then
 * shuts the server down (every stream gets its status), releases the followers and exits 0.
 * A second signal skips the rest of the grace period.
 *
 * KV sizing: one block holds TSR_KV_BLOCK_SIZE token positions of K and V for every layer
 * and KV head of the model, float32: n_layer × 2 × n_head_kv × head_dim × 4 × 16 bytes.
 * --kv-memory is the budget of the whole replica; n_kv_blocks = budget / that, and each
 * rank holds its share of every block (its layers, its KV heads). With tp > n_head_kv the
 * KV heads are replicated across ranks, so the real total is somewhat larger.
 */
#include "coordinator/cli.h"
#include "kernels/q80_lanes.h"
#include "kernels/util.h"
#include "coordinator/drafter.h"
#include "coordinator/auth.h"
#include "coordinator/tls.h"
#include "coordinator/http.h"
#include "coordinator/metrics.h"
#include "coordinator/join.h"
#include "coordinator/server.h"

#include "worker/comm.h"
#include "worker/model.h"
#include "worker/replica.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_MODEL     "../shared/models/stories260K.gguf"
#define DEFAULT_KV_MEMORY (1ull << 30) /* upper bound; see default_kv_blocks */
#define DEFAULT_GRACE_MS  10000
#define SERVER_FLUSH_MS   3000 /* after the step loop ended: time for streams to flush */

/* clang-format off */
static const char *serve_help =
    "usage: tessera serve -m MODEL [--tp T --pp P] [--listen HOST:PORT] [flags]\n"
    "\n"
    "Serve MODEL over gRPC (tessera.v1.Inference, tessera.v1.Admin, grpc.health.v1.Health;\n"
    "see proto/) with continuous batching over a paged KV cache. Prints 'listening on\n"
    "HOST:PORT' on stderr once it accepts calls. SIGTERM / SIGINT: health turns\n"
    "NOT_SERVING, new requests are refused, running ones get --shutdown-grace to finish,\n"
    "the rest are cancelled, then it exits 0 (a second signal cuts the grace short).\n"
    "\n"
    "  -m, --model PATH          GGUF model (default " DEFAULT_MODEL ")\n"
    "      --listen HOST:PORT    address to serve on (default " TSR_SERVER_DEFAULT_LISTEN ");\n"
    "                            port 0 picks a free port (printed)\n"
    "      --max-queue N         waiting requests before RESOURCE_EXHAUSTED (default 256)\n"
    TSR_CLI_ENGINE_HELP("256", "64", "enough for --max-seqs full contexts, at most 1G")
    "      --kv-type T           KV cache element type: f32, f16 or q8_0 (default f16,\n"
    "                            f32 on CUDA; README: KV cache types)\n"
    "      --shutdown-grace MS   on SIGTERM, how long running requests may finish before\n"
    "                            they are cancelled (default 10000)\n"
    "      --chat-template NAME  template of GenerateRequest.messages instead of the\n"
    "                            model's tokenizer.chat_template (chatml, llama3, ...)\n"
    "\n"
    "HTTP, keys and TLS (the same keys and certificate serve gRPC and HTTP):\n"
    "      --http HOST:PORT      also serve the OpenAI-compatible API (/v1/completions,\n"
    "                            /v1/chat/completions, /v1/models, /health, /metrics);\n"
    "                            port 0 picks a free port (printed)\n"
    "      --model-name NAME     the model's name in the API and in a cluster (requests\n"
    "                            route by it: GenerateRequest.model; default: the file\n"
    "                            name without .gguf)\n"
    "      --http-max-body BYTES largest request body (default 4M; beyond: 413)\n"
    TSR_CLI_SECURITY_HELP
    "output held for clients that read slowly or not at all (beyond: the stream is\n"
    "cancelled with RESOURCE_EXHAUSTED and its KV blocks are freed):\n"
    "      --max-call-buffered-bytes BYTES  unread output of one call (default 1M)\n"
    "      --max-buffered-bytes BYTES       of all calls together; the call holding the\n"
    "                            most goes first (default 64M)\n"
    "      --slow-reader-timeout MS  a message the client's flow control has not taken\n"
    "                            after this long (default 30000)\n"
    "\n"
    "speculative decoding (per request: the 'speculation' field, default auto):\n"
    "      --draft-model PATH    draft model with the same vocabulary, run by rank 0\n"
    "      --spec ngram          n-gram prompt lookup instead (no model)\n"
    "      --spec oracle:PATH    (benchmarks) propose the tokens of a 'generate --json'\n"
    "                            output: the ceiling of speculation\n"
    "      --spec-k K            most draft tokens per step (default 4; adapts below)\n"
    "      --spec-max-batch N    speculate only while at most N sequences decode\n"
    "                            (default 4: larger batches already fill a step)\n"
    "\n"
    "distributed (run under 'mpirun -np TP*PP' or 'srun -n TP*PP'; rank 0 serves gRPC):\n"
    "      --tp N                tensor-parallel ranks per stage (default 1)\n"
    "      --pp N                pipeline stages (default 1)\n"
    "      --layers A-B,C-D      layers of each stage (default: balanced by cost)\n"
    "      --comm-timeout MS     deadline of every wait between ranks (default 30000)\n"
    "      --no-repack           keep the weights in the file's layout only (default: each\n"
    "                            CPU rank also repacks its quantized tiles at load for\n"
    "                            faster batches: same results, a private copy of them)\n"
    "      --q8-order ggml|lanes summation order of Q8_0 matrices (default ggml:\n"
    "                            llama.cpp's bits; lanes: whole-block integer sums, ~2x\n"
    "                            faster batches and verification on AVX-512 VNNI, other\n"
    "                            last bits; README: Q8_0 orders)\n"
    "\n"
    "cluster (see 'tessera coordinator'):\n"
    "      --join HOST:PORT      register with a coordinator and heartbeat every 500 ms\n"
    "                            with this replica's load; rejoins after a coordinator\n"
    "                            restart\n"
    "      --name NAME           this replica's name in the cluster (default: its address)\n"
    "      --advertise HOST:PORT the address the coordinator dials (default: the bound\n"
    "                            listen address)\n"
    "      --join-key-file FILE  heartbeats carry the first key of FILE (an admin key of a\n"
    "                            coordinator with keys)\n"
    "      --join-tls-ca FILE    the coordinator serves TLS: verify it with this CA\n"
    "      --join-tls-cert FILE, --join-tls-key FILE  client certificate for a coordinator\n"
    "                            with mutual TLS\n"
    "  -h, --help                this help\n";
/* clang-format on */

/* ---- signals -> control thread ---- */

/* Lock-free atomics are async-signal-safe and, unlike volatile sig_atomic_t, also safe to
 * read from the control thread. */
static sem_t g_sig_sem;
static atomic_int g_sig_count;
static atomic_int g_sig_last;
static atomic_int g_sig_hup; /* SIGHUPs not yet handled: re-read the key files */

static void on_signal(int sig)
{
    if (sig == SIGHUP) {
        atomic_fetch_add(&g_sig_hup, 1);
        sem_post(&g_sig_sem);
        return;
    }
    atomic_store(&g_sig_last, sig);
    atomic_fetch_add(&g_sig_count, 1);
    sem_post(&g_sig_sem); /* async-signal-safe */
}

typedef struct {
    tsr_engine *engine;
    tsr_server *server;
    tsr_http *http;
    tsr_auth *auth;
    int64_t grace_ms;
    pthread_mutex_t mu;
    bool quit; /* under mu: the main thread is done with the step loop */
} control;

static bool control_quit(control *ctl)
{
    pthread_mutex_lock(&ctl->mu);
    bool q = ctl->quit;
    pthread_mutex_unlock(&ctl->mu);
    return q;
}

/* Wait for a signal or quit, up to ms. */
static void control_wait(int ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += (long)ms * 1000000L;
    ts.tv_sec += ts.tv_nsec / 1000000000L;
    ts.tv_nsec %= 1000000000L;
    while (sem_timedwait(&g_sig_sem, &ts) != 0 && errno == EINTR) {
    }
}

/* SIGHUP: re-read the key files (the old keys stay on error). Never prints a key. */
static void control_reload_keys(control *ctl)
{
    if (atomic_exchange(&g_sig_hup, 0) == 0 || !ctl->auth) return;
    char err[1024];
    int n_api = 0, n_admin = 0;
    if (tsr_auth_reload(ctl->auth, &n_api, &n_admin, err, sizeof err) != 0)
        fprintf(stderr, "tessera serve: SIGHUP: keeping the previous keys: %s\n", err);
    else
        fprintf(stderr, "tessera serve: SIGHUP: key files re-read (%d inference, %d admin keys)\n",
                n_api, n_admin);
}

static void *control_main(void *arg)
{
    control *ctl = arg;
    while (atomic_load(&g_sig_count) == 0) {
        if (control_quit(ctl)) return NULL;
        control_reload_keys(ctl);
        control_wait(200);
    }
    int sig = atomic_load(&g_sig_last);
    fprintf(stderr, "tessera serve: %s: draining (up to %" PRId64 " ms), then stopping\n",
            sig == SIGINT ? "SIGINT" : "SIGTERM", ctl->grace_ms);
    tsr_server_set_not_serving(ctl->server);
    tsr_http_set_not_serving(ctl->http);
    tsr_engine_drain(ctl->engine);
    int64_t until = (int64_t)(tsr_now_ns() / 1000000u) + ctl->grace_ms;
    for (;;) {
        if (control_quit(ctl)) return NULL;
        tsr_engine_status st;
        tsr_engine_get_status(ctl->engine, &st);
        if (st.n_running + st.n_waiting == 0) break;
        if ((int64_t)(tsr_now_ns() / 1000000u) >= until) {
            fprintf(stderr,
                    "tessera serve: grace period over: cancelling %d running and %d "
                    "queued requests\n",
                    st.n_running, st.n_waiting);
            break;
        }
        if (atomic_load(&g_sig_count) > 1) {
            fprintf(stderr,
                    "tessera serve: second signal: cancelling %d running and %d "
                    "queued requests\n",
                    st.n_running, st.n_waiting);
            break;
        }
        control_wait(50);
    }
    tsr_engine_stop(ctl->engine, true);
    return NULL;
}

/* ---- replica helpers ---- */

typedef struct {
    tsr_hparams hp;
    char arch[64];
    char name[256];
    bool has_name;
} model_meta;

static int read_meta(const char *path, model_meta *m, char *err, size_t err_len)
{
    tsr_gguf *g;
    memset(m, 0, sizeof *m);
    if (tsr_gguf_open(path, &g, err, err_len) != 0) return -1;
    int rc = tsr_model_read_hparams(g, &m->hp, err, err_len);
    tsr_gguf_str s;
    snprintf(m->arch, sizeof m->arch, "llama");
    if (tsr_gguf_get_str(g, "general.architecture", &s))
        snprintf(m->arch, sizeof m->arch, "%.*s", (int)(s.len < 63 ? s.len : 63), s.ptr);
    if (tsr_gguf_get_str(g, "general.name", &s)) {
        snprintf(m->name, sizeof m->name, "%.*s", (int)(s.len < 255 ? s.len : 255), s.ptr);
        m->has_name = true;
    }
    tsr_gguf_close(g);
    return rc;
}

/* Leader: release the followers and close. Returns false when the replica could not be
 * shut down cleanly (the MPI job is then aborted). */
static bool leader_close(tsr_replica *rep)
{
    char err[1024];
    tsr_rank_stats *st = calloc((size_t)tsr_replica_size(rep), sizeof *st);
    if (!st || tsr_replica_shutdown(rep, err, sizeof err) != 0 ||
        tsr_replica_stats(rep, st, err, sizeof err) != 0) {
        fprintf(stderr, "tessera serve: shutting the replica down: %s\n",
                st ? err : "out of memory");
        free(st);
        tsr_comm_mpi_abort(1);
        return false;
    }
    free(st);
    tsr_replica_close(rep);
    return true;
}

/* The API's model name: the file name without directory and .gguf. */
static void default_model_name(const char *path, char *out, size_t cap)
{
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    size_t n = strlen(b);
    if (n > 5 && !strcmp(b + n - 5, ".gguf")) n -= 5;
    if (n >= cap) n = cap - 1;
    memcpy(out, b, n);
    out[n] = '\0';
}

/* Split "host:port" for printing (IPv6 "[::1]:0" too). */
static void listen_host(const char *listen, char *host, size_t cap)
{
    const char *colon = strrchr(listen, ':');
    size_t n = colon ? (size_t)(colon - listen) : strlen(listen);
    if (n >= cap) n = cap - 1;
    memcpy(host, listen, n);
    host[n] = '\0';
}

int tsr_cmd_serve(int argc, char **argv)
{
    enum {
        O_LISTEN = 256,
        O_MAX_QUEUE,
        O_GRACE,
        O_TP,
        O_PP,
        O_LAYERS,
        O_COMM_TIMEOUT,
        O_DRAFT,
        O_SPEC,
        O_SPEC_K,
        O_SPEC_MAX_BATCH,
        O_HTTP,
        O_MODEL_NAME,
        O_HTTP_MAX_BODY,
        O_CHAT_TEMPLATE,
        O_MAX_BUFFERED,
        O_MAX_CALL_BUFFERED,
        O_SLOW_READER,
        O_JOIN,
        O_NAME,
        O_ADVERTISE,
        O_JOIN_KEY,
        O_JOIN_CA,
        O_JOIN_CERT,
        O_JOIN_TLSKEY,
    };
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},
        {"listen", required_argument, 0, O_LISTEN},
        {"max-queue", required_argument, 0, O_MAX_QUEUE},
        TSR_CLI_ENGINE_OPTS,
        {"shutdown-grace", required_argument, 0, O_GRACE},
        {"tp", required_argument, 0, O_TP},
        {"pp", required_argument, 0, O_PP},
        {"layers", required_argument, 0, O_LAYERS},
        {"comm-timeout", required_argument, 0, O_COMM_TIMEOUT},
        {"kv-type", required_argument, 0, TSR_CLI_O_KV_TYPE},
        {"no-repack", no_argument, 0, TSR_CLI_O_NO_REPACK},
        {"q8-order", required_argument, 0, TSR_CLI_O_Q8_ORDER},
        {"draft-model", required_argument, 0, O_DRAFT},
        {"spec", required_argument, 0, O_SPEC},
        {"spec-k", required_argument, 0, O_SPEC_K},
        {"spec-max-batch", required_argument, 0, O_SPEC_MAX_BATCH},
        {"chat-template", required_argument, 0, O_CHAT_TEMPLATE},
        {"max-buffered-bytes", required_argument, 0, O_MAX_BUFFERED},
        {"max-call-buffered-bytes", required_argument, 0, O_MAX_CALL_BUFFERED},
        {"slow-reader-timeout", required_argument, 0, O_SLOW_READER},
        {"http", required_argument, 0, O_HTTP},
        {"model-name", required_argument, 0, O_MODEL_NAME},
        {"http-max-body", required_argument, 0, O_HTTP_MAX_BODY},
        TSR_CLI_SECURITY_OPTS,
        {"join", required_argument, 0, O_JOIN},
        {"name", required_argument, 0, O_NAME},
        {"advertise", required_argument, 0, O_ADVERTISE},
        {"join-key-file", required_argument, 0, O_JOIN_KEY},
        {"join-tls-ca", required_argument, 0, O_JOIN_CA},
        {"join-tls-cert", required_argument, 0, O_JOIN_CERT},
        {"join-tls-key", required_argument, 0, O_JOIN_TLSKEY},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    const char *model = DEFAULT_MODEL, *listen = TSR_SERVER_DEFAULT_LISTEN;
    const char *join = NULL, *join_name = NULL, *advertise = NULL;
    const char *join_key = NULL, *join_ca = NULL, *join_cert = NULL, *join_tlskey = NULL;
    tsr_replica_params rp = {.tp = 1, .pp = 1};
    tsr_cli_engine_opts eo;
    tsr_cli_engine_defaults(&eo, 256, 64);
    int64_t max_queue = 256, grace_ms = DEFAULT_GRACE_MS, v;
    const char *draft_model = NULL;
    bool spec_ngram = false;
    const char *spec_oracle = NULL;
    int64_t spec_k = 4, spec_max_batch = 4;
    const char *http_listen = NULL, *model_name = NULL;
    tsr_cli_security_opts so = {0};
    uint64_t http_max_body = TSR_HTTP_DEFAULT_MAX_BODY;
    uint64_t max_buffered = TSR_SERVER_DEFAULT_MAX_BUFFERED_BYTES,
             max_call_buffered = TSR_SERVER_DEFAULT_MAX_CALL_BUFFERED_BYTES;
    int64_t slow_reader_ms = TSR_SERVER_DEFAULT_SLOW_READER_MS;
    const char *chat_template = NULL;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:h" TSR_CLI_ENGINE_SHORTOPTS, opts, NULL)) != -1) {
        int erc = tsr_cli_engine_flag("serve", c, optarg, &eo);
        if (erc >= 0) {
            if (erc != 0) return erc;
            continue;
        }
        if (tsr_cli_security_flag(c, optarg, &so) == 0) continue;
        switch (c) {
        case 'm':
            model = optarg;
            break;
        case O_LISTEN:
            if (!tsr_cli_parse_hostport(optarg, NULL, 0, NULL))
                return tsr_cli_usage_error("serve",
                                           "--listen needs HOST:PORT with a port in 0..65535 "
                                           "(0: any free port), e.g. 127.0.0.1:50051; got '%s'",
                                           optarg);
            listen = optarg;
            break;
#define INT_FLAG(name, lo, hi, dst)                                                                \
    do {                                                                                           \
        if (!tsr_cli_parse_i64(optarg, lo, hi, &v))                                                \
            return tsr_cli_usage_error("serve", "%s needs an integer in %lld..%lld, got '%s'",     \
                                       name, (long long)(lo), (long long)(hi), optarg);            \
        (dst) = v;                                                                                 \
    } while (0)
        case O_MAX_QUEUE:
            INT_FLAG("--max-queue", 0, 1 << 24, max_queue);
            break;
        case O_GRACE:
            INT_FLAG("--shutdown-grace", 0, 86400000, grace_ms);
            break;
        case O_TP:
            INT_FLAG("--tp", 1, 256, rp.tp);
            break;
        case O_PP:
            INT_FLAG("--pp", 1, 256, rp.pp);
            break;
        case O_COMM_TIMEOUT:
            INT_FLAG("--comm-timeout", 1, 86400000, rp.timeout_ms);
            break;
        case O_SLOW_READER:
            INT_FLAG("--slow-reader-timeout", 1, 86400000, slow_reader_ms);
            break;
#undef INT_FLAG
        case O_LAYERS:
            rp.layers = optarg;
            break;
        case TSR_CLI_O_KV_TYPE:
            if (tsr_cli_kv_type_flag("serve", optarg, &rp) != 0) return TSR_CLI_EXIT_USAGE;
            break;
        case TSR_CLI_O_NO_REPACK:
        case TSR_CLI_O_Q8_ORDER:
            if (tsr_cli_replica_flag("serve", c, optarg, &rp) != 0) return TSR_CLI_EXIT_USAGE;
            break;
        case O_DRAFT:
            draft_model = optarg;
            break;
        case O_SPEC:
            if (!strcmp(optarg, "ngram"))
                spec_ngram = true;
            else if (!strncmp(optarg, "oracle:", 7))
                spec_oracle = optarg + 7;
            else if (strcmp(optarg, "off") != 0)
                return tsr_cli_usage_error(
                    "serve", "--spec takes 'ngram', 'oracle:PATH' or 'off', got '%s'", optarg);
            break;
        case O_SPEC_K:
            if (!tsr_cli_parse_i64(optarg, 1, 16, &spec_k))
                return tsr_cli_usage_error("serve", "--spec-k needs an integer in 1..16, got '%s'",
                                           optarg);
            break;
        case O_SPEC_MAX_BATCH:
            if (!tsr_cli_parse_i64(optarg, 1, 4096, &spec_max_batch))
                return tsr_cli_usage_error(
                    "serve", "--spec-max-batch needs an integer in 1..4096, got '%s'", optarg);
            break;
        case O_CHAT_TEMPLATE: {
            tsr_chat_template *t = NULL;
            char e[1024];
            if (tsr_chat_template_new(optarg, NULL, NULL, &t, e, sizeof e) != 0)
                return tsr_cli_usage_error("serve", "%s", e);
            tsr_chat_template_free(t);
            chat_template = optarg;
            break;
        }
        case O_HTTP:
            if (!strchr(optarg, ':'))
                return tsr_cli_usage_error(
                    "serve", "--http needs HOST:PORT (e.g. 127.0.0.1:8080), got '%s'", optarg);
            http_listen = optarg;
            break;
        case O_MODEL_NAME:
            if (!optarg[0] || strlen(optarg) > 200)
                return tsr_cli_usage_error("serve", "--model-name needs 1..200 characters");
            model_name = optarg;
            break;
        case O_HTTP_MAX_BODY:
            if (!tsr_cli_parse_bytes(optarg, &http_max_body) || http_max_body < 1024 ||
                http_max_body > (1ull << 30))
                return tsr_cli_usage_error(
                    "serve", "--http-max-body needs a byte count in 1K..1G, got '%s'", optarg);
            break;
        case O_MAX_BUFFERED:
        case O_MAX_CALL_BUFFERED: {
            uint64_t b = 0;
            const char *name =
                c == O_MAX_BUFFERED ? "--max-buffered-bytes" : "--max-call-buffered-bytes";
            if (!tsr_cli_parse_bytes(optarg, &b) || b < 4096 || b > (1ull << 40))
                return tsr_cli_usage_error("serve",
                                           "%s needs a byte count in 4K..1T such as 1M or 64M, "
                                           "got '%s'",
                                           name, optarg);
            *(c == O_MAX_BUFFERED ? &max_buffered : &max_call_buffered) = b;
            break;
        }
        case O_JOIN:
            if (!strchr(optarg, ':'))
                return tsr_cli_usage_error(
                    "serve", "--join needs the coordinator's HOST:PORT, got '%s'", optarg);
            join = optarg;
            break;
        case O_NAME:
            if (!optarg[0]) return tsr_cli_usage_error("serve", "--name must not be empty");
            join_name = optarg;
            break;
        case O_ADVERTISE:
            if (!strchr(optarg, ':'))
                return tsr_cli_usage_error("serve", "--advertise needs HOST:PORT, got '%s'",
                                           optarg);
            advertise = optarg;
            break;
        case O_JOIN_KEY:
            join_key = optarg;
            break;
        case O_JOIN_CA:
            join_ca = optarg;
            break;
        case O_JOIN_CERT:
            join_cert = optarg;
            break;
        case O_JOIN_TLSKEY:
            join_tlskey = optarg;
            break;
        case 'h':
            fputs(serve_help, stdout);
            return 0;
        default:
            return tsr_cli_usage_error("serve", "unknown flag");
        }
    }
    if (optind != argc)
        return tsr_cli_usage_error("serve", "unexpected argument '%s'", argv[optind]);
    const int64_t max_batch = eo.max_batch_tokens, max_seqs = eo.max_seqs, n_ctx = eo.n_ctx,
                  n_threads = eo.n_threads;
    const uint64_t kv_memory = eo.n_bytes_kv;
    if ((join_name || advertise || join_key || join_ca || join_cert || join_tlskey) && !join)
        return tsr_cli_usage_error("serve",
                                   "--name, --advertise and --join-* go with --join COORDINATOR");
    if ((join_cert != NULL) != (join_tlskey != NULL))
        return tsr_cli_usage_error("serve", "--join-tls-cert and --join-tls-key go together");
    if (join_cert && !join_ca)
        return tsr_cli_usage_error("serve", "--join-tls-cert / --join-tls-key need --join-tls-ca");
    char model_name_buf[256];
    if (!model_name) {
        default_model_name(model, model_name_buf, sizeof model_name_buf);
        model_name = model_name_buf;
    }
    if ((draft_model != NULL) + spec_ngram + (spec_oracle != NULL) > 1)
        return tsr_cli_usage_error("serve", "choose one of --draft-model and --spec");
    const char *listens[2] = {listen, http_listen};
    int src = tsr_cli_security_finish("serve", &so, listens, 2);
    if (src != 0) return src;

    char err[1024];
    model_meta meta;
    if (read_meta(model, &meta, err, sizeof err) != 0) {
        fprintf(stderr, "tessera serve: %s\n", err);
        return 1;
    }
    /* Keys and TLS files: read and checked before anything starts (every rank reads them:
     * a follower that cannot must fail the same way as the leader). */
    tsr_auth *auth = NULL;
    tsr_metrics *metrics = NULL;
    tsr_tls_server tls;
    tsr_tls_client join_tls;
    char *join_auth = NULL;
    memset(&tls, 0, sizeof tls);
    memset(&join_tls, 0, sizeof join_tls);
    if (tsr_cli_security_load(&so, &auth, &tls, err, sizeof err) != 0 ||
        tsr_tls_client_load("--join-tls-", join_ca, join_cert, join_tlskey, &join_tls, err,
                            sizeof err) != 0 ||
        tsr_auth_client_header("--join-key-file", join_key, NULL, &join_auth, err, sizeof err) !=
            0) {
        fprintf(stderr, "tessera serve: %s\n", err);
        tsr_auth_free(auth);
        tsr_tls_server_free(&tls);
        tsr_tls_client_free(&join_tls);
        return 1;
    }
    char *cert_pem = tls.cert_pem, *key_pem = tls.key_pem, *ca_pem = tls.client_ca_pem;
    const tsr_hparams *hp = &meta.hp;
    const tsr_kv_type kv_type = tsr_replica_params_kv_type(&rp);
    uint64_t block_bytes = tsr_kv_block_bytes(hp, hp->n_layer, hp->n_head_kv, kv_type);
    int64_t ctx_tokens =
        n_ctx > 0 ? n_ctx
                  : (hp->n_ctx_train > 0 && hp->n_ctx_train < 4096 ? hp->n_ctx_train : 4096);
    uint64_t blocks_per_seq = (uint64_t)(ctx_tokens + TSR_KV_BLOCK_SIZE - 1) / TSR_KV_BLOCK_SIZE;
    uint64_t n_blocks;
    if (kv_memory) {
        n_blocks = kv_memory / block_bytes;
        if (n_blocks == 0) {
            fprintf(stderr,
                    "tessera serve: --kv-memory %" PRIu64 " is less than one KV block of this "
                    "model (%" PRIu64 " bytes = %d layers x 2 x %d KV heads x %d values x %d "
                    "tokens in %s)\n",
                    kv_memory, block_bytes, hp->n_layer, hp->n_head_kv, hp->head_dim,
                    TSR_KV_BLOCK_SIZE, tsr_kv_type_name(kv_type));
            return 1;
        }
    } else {
        n_blocks = DEFAULT_KV_MEMORY / block_bytes;
        if (n_blocks > blocks_per_seq * (uint64_t)max_seqs)
            n_blocks = blocks_per_seq * (uint64_t)max_seqs;
        if (n_blocks == 0) n_blocks = 1;
    }
    if (n_blocks > INT32_MAX / TSR_KV_BLOCK_SIZE) n_blocks = INT32_MAX / TSR_KV_BLOCK_SIZE;

    rp.n_threads = (int)n_threads;
    rp.n_ctx = (int32_t)n_ctx;
    rp.n_batch = (int32_t)max_batch;
    rp.n_kv_blocks = (int32_t)n_blocks;
    tsr_replica *rep;
    if (tsr_cli_replica_open("serve", model, &rp, &rep) != 0) return 1;
    if (!tsr_replica_is_leader(rep)) {
        tsr_auth_free(auth);
        free(cert_pem);
        free(key_pem);
        free(ca_pem);
        tsr_tls_client_free(&join_tls);
        free(join_auth);
        /* The leader coordinates the shutdown; a signal forwarded by the launcher must
         * not kill a follower in the middle of it. */
        signal(SIGTERM, SIG_IGN);
        signal(SIGINT, SIG_IGN);
        return tsr_cli_follow("serve", rep);
    }

    int exit_code = 1;
    tsr_engine *engine = NULL;
    tsr_server *server = NULL;
    tsr_http *http = NULL;
    control ctl;
    memset(&ctl, 0, sizeof ctl);
    bool ctl_started = false, sem_ok = false;
    tsr_join *joined = NULL;
    pthread_t ctl_thread;

    tsr_drafter *drafter = NULL;
    tsr_chat_template *chat = NULL;
    if (spec_oracle && tsr_drafter_oracle_load(spec_oracle, &drafter, err, sizeof err) != 0) {
        fprintf(stderr, "tessera serve: %s\n", err);
        goto release;
    }
    if (spec_ngram && tsr_drafter_ngram_new(1, 3, &drafter, err, sizeof err) != 0) {
        fprintf(stderr, "tessera serve: %s\n", err);
        goto release;
    }
    if (draft_model && tsr_drafter_model_new_for(draft_model, rep, (int32_t)n_blocks + 16,
                                                 (int)n_threads, &drafter, err, sizeof err) != 0) {
        fprintf(stderr, "tessera serve: %s\n", err);
        goto release;
    }

    tsr_engine_params ep = {
        .drafter = drafter,
        .spec_k = (int32_t)spec_k,
        .spec_max_batch = (int32_t)spec_max_batch,
        .spec_default_on = true,
        .max_batch_tokens = (int32_t)max_batch,
        .max_seqs = (int32_t)max_seqs,
        .max_queue = (int32_t)max_queue,
        .n_kv_blocks =
            tsr_replica_n_kv_blocks(rep) > 0 ? tsr_replica_n_kv_blocks(rep) : (int32_t)n_blocks,
        .idle_heartbeat_ms = 1000,
    };
    ep.no_prefix_cache = eo.no_prefix_cache;
    int64_t comm_timeout = rp.timeout_ms > 0 ? rp.timeout_ms : 30000;
    if (ep.idle_heartbeat_ms > comm_timeout / 4) ep.idle_heartbeat_ms = comm_timeout / 4;
    if (ep.idle_heartbeat_ms < 1) ep.idle_heartbeat_ms = 1;
    if (tsr_engine_new(rep, &ep, &engine, err, sizeof err) != 0) {
        fprintf(stderr, "tessera serve: %s\n", err);
        goto release;
    }

    const tsr_vocab *vocab = tsr_replica_vocab(rep);
    tsr_server_model_info info = {
        .architecture = meta.arch,
        .name = meta.has_name ? meta.name : NULL,
        .model = model_name,
        .n_ctx = tsr_replica_n_ctx(rep),
        .n_ctx_train = hp->n_ctx_train,
        .n_vocab = tsr_vocab_n_tokens(vocab),
        .n_layer = hp->n_layer,
        .n_embd = hp->n_embd,
        .n_head = hp->n_head,
        .n_head_kv = hp->n_head_kv,
        .tp = rp.tp,
        .pp = rp.pp,
        .kv_capacity_tokens = (int64_t)ep.n_kv_blocks * TSR_KV_BLOCK_SIZE,
        .kv_block_tokens = TSR_KV_BLOCK_SIZE,
        .max_batch_tokens = (int32_t)max_batch,
        .max_queue = (int32_t)max_queue,
    };
    /* GenerateRequest.messages: the model's chat template, or --chat-template; a model
     * without one serves prompts only. */
    if (tsr_chat_template_for_model(tsr_replica_gguf(rep), vocab, chat_template, &chat, err,
                                    sizeof err) != 0)
        fprintf(stderr, "tessera serve: chat messages are refused: %s\n", err);
    info.chat = chat;
    if (sem_init(&g_sig_sem, 0, 0) != 0) {
        fprintf(stderr, "tessera serve: sem_init: %s\n", strerror(errno));
        goto release;
    }
    sem_ok = true;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);

    if (tsr_metrics_new(&metrics) != 0) {
        fprintf(stderr, "tessera serve: out of memory\n");
        goto release;
    }
    tsr_server_params sp = {.listen = listen,
                            .max_buffered_bytes = (int64_t)max_buffered,
                            .max_call_buffered_bytes = (int64_t)max_call_buffered,
                            .slow_reader_ms = slow_reader_ms,
                            .auth = auth,
                            .metrics = metrics,
                            .tls_cert_pem = cert_pem,
                            .tls_key_pem = key_pem,
                            .tls_client_ca_pem = ca_pem};
    int port = 0;
    if (tsr_server_start(&sp, engine, vocab, &info, &server, &port, err, sizeof err) != 0) {
        fprintf(stderr, "tessera serve: %s\n", err);
        goto release;
    }
    int http_port = 0;
    char api_name[256];
    default_model_name(model, api_name, sizeof api_name);
    if (http_listen) {
        tsr_http_params hp_ = {.listen = http_listen,
                               .model_id = model_name ? model_name : api_name,
                               .n_ctx = info.n_ctx,
                               .max_queue = (int32_t)max_queue,
                               .max_body_bytes = (int64_t)http_max_body,
                               .tls_cert_pem = cert_pem,
                               .tls_key_pem = key_pem,
                               .tls_client_ca_pem = ca_pem,
                               .auth = auth,
                               .metrics = metrics,
                               .chat = chat};
        if (tsr_http_start(&hp_, engine, vocab, &http, &http_port, err, sizeof err) != 0) {
            fprintf(stderr, "tessera serve: %s\n", err);
            tsr_engine_stop(engine, true);
            goto stop_server;
        }
    }
    ctl.engine = engine;
    ctl.server = server;
    ctl.http = http;
    ctl.auth = auth;
    ctl.grace_ms = grace_ms;
    pthread_mutex_init(&ctl.mu, NULL);
    if (pthread_create(&ctl_thread, NULL, control_main, &ctl) != 0) {
        fprintf(stderr, "tessera serve: cannot start the control thread\n");
        pthread_mutex_destroy(&ctl.mu);
        goto stop_server;
    }
    ctl_started = true;

    char host[256];
    listen_host(listen, host, sizeof host);
    fprintf(stderr,
            "tessera serve: %s, tp %d x pp %d, context %d, KV %d blocks (%" PRId64
            " tokens, %.1f MiB), max batch %" PRId64 " tokens, queue %" PRId64 "\n",
            model, rp.tp, rp.pp, info.n_ctx, ep.n_kv_blocks, info.kv_capacity_tokens,
            (double)ep.n_kv_blocks * (double)block_bytes / 1048576.0, max_batch, max_queue);
    if (tsr_q80l_on())
        fprintf(stderr, "tessera serve: Q8_0 matrices in the lanes order (--q8-order lanes): "
                        "outputs differ from llama.cpp's in the last bits\n");
    if (!so.api_keys && !so.admin_keys)
        fprintf(stderr, "tessera serve: no --api-key-file: serving without authentication%s\n",
                so.insecure ? " (--insecure-listen)" : " (loopback addresses only)");
    else
        fprintf(stderr, "tessera serve: API keys required (%s%s%s)\n",
                so.api_keys ? "--api-key-file" : "", so.api_keys && so.admin_keys ? ", " : "",
                so.admin_keys ? "--admin-key-file" : "");
    if (cert_pem)
        fprintf(stderr, "tessera serve: TLS on%s\n",
                ca_pem ? ", client certificates required (mutual TLS)" : "");
    if (http) {
        char hhost[256];
        listen_host(http_listen, hhost, sizeof hhost);
        fprintf(stderr, "tessera serve: http listening on %s:%d (model '%s')\n", hhost, http_port,
                model_name ? model_name : api_name);
    }
    fprintf(stderr, "tessera serve: listening on %s:%d\n", host, port);
    fflush(stderr);
    if (join) {
        char addr[300];
        if (advertise)
            snprintf(addr, sizeof addr, "%s", advertise);
        else
            snprintf(addr, sizeof addr, "%s:%d",
                     !strcmp(host, "0.0.0.0") || !strcmp(host, "[::]") ? "127.0.0.1" : host, port);
        tsr_join_params jp = {.coordinator = join,
                              .name = join_name ? join_name : addr,
                              .address = addr,
                              .model = model_name,
                              .tp = rp.tp,
                              .pp = rp.pp,
                              .max_queue = (int32_t)max_queue,
                              .context_length = info.n_ctx,
                              .serves_tls = cert_pem != NULL,
                              .authorization = join_auth,
                              .tls = &join_tls};
        if (tsr_join_start(&jp, engine, &joined, err, sizeof err) != 0) {
            fprintf(stderr, "tessera serve: %s\n", err);
            tsr_engine_stop(engine, true);
        }
    }

    /* The step loop, on the MPI thread, until the control thread stops it. */
    int run_rc = tsr_engine_run(engine, err, sizeof err);
    if (run_rc != 0) {
        fprintf(stderr, "tessera serve: the engine stopped: %s\n", err);
        tsr_server_set_not_serving(server);
        tsr_http_set_not_serving(http);
    }
    exit_code = run_rc == 0 ? 0 : 1;

stop_server:
    tsr_join_stop(joined);
    joined = NULL;
    if (ctl_started) {
        pthread_mutex_lock(&ctl.mu);
        ctl.quit = true;
        pthread_mutex_unlock(&ctl.mu);
        sem_post(&g_sig_sem);
        pthread_join(ctl_thread, NULL);
        pthread_mutex_destroy(&ctl.mu);
    }
    if (http) {
        if (!ctl_started) tsr_engine_stop(engine, true);
        if (tsr_http_shutdown(http, SERVER_FLUSH_MS, err, sizeof err) != 0) {
            fprintf(stderr, "tessera serve: %s\n", err);
            exit_code = 1;
        }
        http = NULL;
    }
    if (server) {
        /* A server that never started the step loop (thread failure) still has requests
         * queued in the engine: stop it so they finish as cancelled. */
        if (!ctl_started) tsr_engine_stop(engine, true);
        if (tsr_server_shutdown(server, SERVER_FLUSH_MS, err, sizeof err) != 0) {
            fprintf(stderr, "tessera serve: %s\n", err);
            exit_code = 1;
            engine = NULL; /* the server may still call into it: leak rather than free */
        }
        server = NULL;
    }
release:
    if (engine) tsr_engine_free(engine);
    if (engine || !server) { /* (leaked with a stuck server) */
        tsr_drafter_free(drafter);
        tsr_chat_template_free(chat);
    }
    if (!leader_close(rep)) exit_code = 1;
    if (engine || !server) { /* (leaked with a stuck server, which may still use them) */
        tsr_metrics_free(metrics);
        tsr_auth_free(auth);
    }
    free(cert_pem);
    if (key_pem) {
        memset(key_pem, 0, strlen(key_pem));
        free(key_pem);
    }
    free(ca_pem);
    tsr_tls_client_free(&join_tls);
    free(join_auth);
    if (sem_ok) {
        signal(SIGTERM, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        signal(SIGHUP, SIG_DFL);
        sem_destroy(&g_sig_sem);
    }
    if (exit_code == 0) fprintf(stderr, "tessera serve: stopped\n");
    return exit_code;
}
