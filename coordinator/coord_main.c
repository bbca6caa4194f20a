/*
 * coord_main.c — `tessera coordinator`: the front door of a cluster (coord_server.h over
 * the registry of coord.h), and the supervisor of the replicas of a cluster file.
 *
 * Cluster file (JSON, read with cJSON):
 *   {"replicas": [{"name": "a", "model": "m.gguf", "model_name": "stories",
 *                  "tp": 2, "pp": 1, "threads": 1, "args": ["--kv-memory", "64M"],
 *                  "launch": "mpirun --oversubscribe -np {ranks} {tessera} serve {serve_args}"}]}
 * Every replica is planned with the partition planner first (a layout that cannot work
 * is refused before anything starts, with the planner's reason). The launch template
 * (default: "{tessera} serve {serve_args}" for one rank, "mpirun -np {ranks} --bind-to none
 * {tessera} serve {serve_args}" for more) has its placeholders replaced — {ranks} {tp} {pp}
 * {threads} {model} {name} {coordinator} {tessera} {serve_args} — and runs under /bin/sh
 * in a process group of its own. {serve_args} is "-m MODEL --tp T --pp P -t THREADS
 * --listen 127.0.0.1:0 --join COORD --name NAME --model-name M ARGS...", shell-quoted.
 * A replica whose process exits is marked down and restarted after a backoff (1 s,
 * doubling to 30 s; reset after 60 s of life); SIGTERM / SIGINT stops them all (SIGTERM to
 * each group, SIGKILL after 10 s) and then the coordinator.
 */
#include "coordinator/auth.h"
#include "coordinator/cli.h"
#include "coordinator/coord.h"
#include "coordinator/coord_server.h"
#include "coordinator/http.h"
#include "coordinator/metrics.h"
#include "coordinator/tls.h"
#include "kernels/util.h"
#include "shard/gguf.h"
#include "shard/plan.h"
#include "worker/replica.h"

#include <cjson/cJSON.h>
#include <grpc/grpc.h>

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <semaphore.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_LAUNCHED   64
#define BACKOFF_MIN_MS 1000
#define BACKOFF_MAX_MS 30000
#define STOP_KILL_MS   10000

static const char *coord_help =
    "usage: tessera coordinator [--listen HOST:PORT] [--cluster FILE [--dry-run]]\n"
    "\n"
    "One front door over many replicas: serves tessera.v1.Inference (Generate, Tokenize,\n"
    "ModelInfo, routed by the request's 'model' to the least-loaded replica, with failover:\n"
    "a request whose replica dies is retried or resumed on another one, exactly), the\n"
    "tessera.v1.Cluster admin service ('tessera ctl') and grpc.health.v1.Health. Replicas\n"
    "join with 'tessera serve --join HOST:PORT' or are launched from a cluster file.\n"
    "Prints 'listening on HOST:PORT' on stderr once it accepts calls.\n"
    "\n"
    "      --listen HOST:PORT    address to serve on (default " TSR_COORD_DEFAULT_LISTEN
    "; port 0\n"
    "                            picks a free port)\n"
    "      --cluster FILE        launch and supervise the replicas of FILE (JSON; see README)\n"
    "      --dry-run             with --cluster: print every replica's plan and launch\n"
    "                            command, start nothing\n"
    "      --tessera PATH        the tessera binary launched replicas run (default: this one)\n"
    "      --down-after MS       a replica without a heartbeat this long is down (default 3000)\n"
    "      --shutdown-grace MS   on SIGTERM, how long open streams may finish (default 10000)\n"
    "      --http HOST:PORT      also serve the OpenAI HTTP API (/v1/completions,\n"
    "                            /v1/chat/completions, /v1/models, /health, /metrics) through\n"
    "                            the same routing and failover; port 0 picks a free port\n"
    "\n"
    "keys and TLS (as 'tessera serve'; the --http port too):\n" TSR_CLI_SECURITY_HELP
    "      --replica-key-file FILE  send the first key of FILE to replicas (their\n"
    "                            --api-key-file); launched replicas get it as theirs\n"
    "      --replica-tls-ca FILE verify replicas that serve TLS with this CA\n"
    "      --replica-tls-cert FILE, --replica-tls-key FILE  client certificate for replicas\n"
    "                            with mutual TLS\n"
    "  -h, --help                this help\n";

/* ---- signals ---- */

static sem_t g_sem;
static atomic_int g_signals;

static atomic_int g_hups; /* SIGHUPs not yet handled: re-read the key files */

static void on_signal(int sig)
{
    if (sig == SIGHUP)
        atomic_fetch_add(&g_hups, 1);
    else
        atomic_fetch_add(&g_signals, 1);
    sem_post(&g_sem);
}

/* ---- cluster file ---- */

typedef struct {
    char name[128];
    char model[1024];
    char model_name[128];
    int32_t tp, pp, threads;
    char *launch; /* template */
    char **args;
    int n_args;
    char *cmd; /* the expanded command */
    pid_t pid; /* process group leader; 0 when not running */
    int64_t t_started_ms, t_restart_ms;
    int64_t backoff_ms;
} launched;

/* Append s to a growable buffer, shell-quoted when `quote`. */
static bool buf_add(char **buf, size_t *len, size_t *cap, const char *s, bool quote)
{
    size_t need = strlen(s) * 4 + 3;
    if (*len + need + 1 > *cap) {
        size_t nc = (*cap ? *cap * 2 : 256) + need;
        char *p = realloc(*buf, nc);
        if (!p) return false;
        *buf = p;
        *cap = nc;
    }
    char *o = *buf + *len;
    if (quote) {
        *o++ = '\'';
        for (const char *p = s; *p; p++) {
            if (*p == '\'') {
                memcpy(o, "'\\''", 4);
                o += 4;
            } else {
                *o++ = *p;
            }
        }
        *o++ = '\'';
    } else {
        size_t n = strlen(s);
        memcpy(o, s, n);
        o += n;
    }
    *o = 0;
    *len = (size_t)(o - *buf);
    return true;
}

/* `extra`: serve arguments the coordinator adds (already shell-quoted), or "". */
static char *expand(const launched *r, const char *tessera, const char *coordinator,
                    const char *extra)
{
    char *serve = NULL, *out = NULL;
    size_t sl = 0, sc = 0, ol = 0, oc = 0;
    char num[32];
    bool ok = buf_add(&serve, &sl, &sc, "-m ", false) && buf_add(&serve, &sl, &sc, r->model, true);
    snprintf(num, sizeof num, " --tp %d --pp %d -t %d", r->tp, r->pp, r->threads);
    ok = ok && buf_add(&serve, &sl, &sc, num, false) &&
         buf_add(&serve, &sl, &sc, " --listen 127.0.0.1:0 --join ", false) &&
         buf_add(&serve, &sl, &sc, coordinator, true) &&
         buf_add(&serve, &sl, &sc, " --name ", false) && buf_add(&serve, &sl, &sc, r->name, true) &&
         buf_add(&serve, &sl, &sc, " --model-name ", false) &&
         buf_add(&serve, &sl, &sc, r->model_name, true) && buf_add(&serve, &sl, &sc, extra, false);
    for (int i = 0; ok && i < r->n_args; i++)
        ok = buf_add(&serve, &sl, &sc, " ", false) && buf_add(&serve, &sl, &sc, r->args[i], true);
    const char *t = r->launch;
    char dflt[256];
    if (!t) {
        snprintf(dflt, sizeof dflt, "%s",
                 r->tp * r->pp > 1
                     ? "mpirun -np {ranks} --bind-to none {tessera} serve {serve_args}"
                     : "{tessera} serve {serve_args}");
        t = dflt;
    }
    while (ok && *t) {
        const char *b = strchr(t, '{');
        if (!b) {
            ok = buf_add(&out, &ol, &oc, t, false);
            break;
        }
        char lit[4096];
        size_t n = (size_t)(b - t) < sizeof lit - 1 ? (size_t)(b - t) : sizeof lit - 1;
        memcpy(lit, t, n);
        lit[n] = 0;
        ok = buf_add(&out, &ol, &oc, lit, false);
        const char *e = strchr(b, '}');
        if (!e) {
            ok = ok && buf_add(&out, &ol, &oc, b, false);
            break;
        }
        char key[64];
        size_t kn = (size_t)(e - b - 1) < sizeof key - 1 ? (size_t)(e - b - 1) : sizeof key - 1;
        memcpy(key, b + 1, kn);
        key[kn] = 0;
        if (!strcmp(key, "ranks"))
            snprintf(num, sizeof num, "%d", r->tp * r->pp),
                ok = ok && buf_add(&out, &ol, &oc, num, false);
        else if (!strcmp(key, "tp"))
            snprintf(num, sizeof num, "%d", r->tp), ok = ok && buf_add(&out, &ol, &oc, num, false);
        else if (!strcmp(key, "pp"))
            snprintf(num, sizeof num, "%d", r->pp), ok = ok && buf_add(&out, &ol, &oc, num, false);
        else if (!strcmp(key, "threads"))
            snprintf(num, sizeof num, "%d", r->threads),
                ok = ok && buf_add(&out, &ol, &oc, num, false);
        else if (!strcmp(key, "model"))
            ok = ok && buf_add(&out, &ol, &oc, r->model, true);
        else if (!strcmp(key, "name"))
            ok = ok && buf_add(&out, &ol, &oc, r->name, true);
        else if (!strcmp(key, "coordinator"))
            ok = ok && buf_add(&out, &ol, &oc, coordinator, true);
        else if (!strcmp(key, "tessera"))
            ok = ok && buf_add(&out, &ol, &oc, tessera, true);
        else if (!strcmp(key, "serve_args"))
            ok = ok && buf_add(&out, &ol, &oc, serve, false);
        else
            ok = ok && buf_add(&out, &ol, &oc, b, false) && false; /* unknown: refused below */
        t = e + 1;
    }
    free(serve);
    if (!ok) {
        free(out);
        return NULL;
    }
    return out;
}

static void launched_free(launched *r, int n)
{
    for (int i = 0; i < n; i++) {
        free(r[i].launch);
        for (int k = 0; k < r[i].n_args; k++) free(r[i].args[k]);
        free(r[i].args);
        free(r[i].cmd);
    }
}

static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

/* Parse and plan the cluster file. Returns the number of replicas, or -1 with err. */
static int read_cluster(const char *path, launched *out, char *err, size_t err_len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        tsr_set_err(err, err_len, "--cluster %s: %s", path, strerror(errno));
        return -1;
    }
    char *text = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 4096 > cap) {
            cap = cap ? cap * 2 : 8192;
            char *p = realloc(text, cap);
            if (!p) {
                free(text);
                fclose(f);
                tsr_set_err(err, err_len, "out of memory reading %s", path);
                return -1;
            }
            text = p;
        }
        size_t n = fread(text + len, 1, cap - len - 1, f);
        len += n;
        if (n == 0) break;
    }
    fclose(f);
    text[len] = 0;
    cJSON *root = cJSON_ParseWithLength(text, len);
    int n = -1;
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        int line = 1;
        for (const char *p = text; at && p < at && *p; p++) line += *p == '\n';
        tsr_set_err(err, err_len, "--cluster %s: not valid JSON (line %d)", path, line);
        goto done;
    }
    cJSON *reps = cJSON_GetObjectItemCaseSensitive(root, "replicas");
    if (!cJSON_IsArray(reps) || cJSON_GetArraySize(reps) == 0) {
        tsr_set_err(err, err_len, "--cluster %s: needs a non-empty array \"replicas\"", path);
        goto done;
    }
    if (cJSON_GetArraySize(reps) > MAX_LAUNCHED) {
        tsr_set_err(err, err_len, "--cluster %s: at most %d replicas", path, MAX_LAUNCHED);
        goto done;
    }
    int i = 0;
    cJSON *r;
    cJSON_ArrayForEach(r, reps)
    {
        launched *L = &out[i];
        memset(L, 0, sizeof *L);
        cJSON *name = cJSON_GetObjectItemCaseSensitive(r, "name");
        cJSON *model = cJSON_GetObjectItemCaseSensitive(r, "model");
        cJSON *mname = cJSON_GetObjectItemCaseSensitive(r, "model_name");
        cJSON *launch = cJSON_GetObjectItemCaseSensitive(r, "launch");
        cJSON *args = cJSON_GetObjectItemCaseSensitive(r, "args");
        if (!cJSON_IsString(model) || !model->valuestring[0]) {
            tsr_set_err(err, err_len,
                        "--cluster %s: replicas[%d]: \"model\" (a GGUF path) is required", path, i);
            goto bad;
        }
        snprintf(L->model, sizeof L->model, "%s", model->valuestring);
        if (cJSON_IsString(name) && name->valuestring[0])
            snprintf(L->name, sizeof L->name, "%s", name->valuestring);
        else
            snprintf(L->name, sizeof L->name, "replica-%d", i);
        if (cJSON_IsString(mname) && mname->valuestring[0]) {
            snprintf(L->model_name, sizeof L->model_name, "%s", mname->valuestring);
        } else {
            const char *b = strrchr(L->model, '/');
            b = b ? b + 1 : L->model;
            snprintf(L->model_name, sizeof L->model_name, "%.127s", b);
            size_t k = strlen(L->model_name);
            if (k > 5 && !strcmp(L->model_name + k - 5, ".gguf")) L->model_name[k - 5] = 0;
        }
        const char *keys[3] = {"tp", "pp", "threads"};
        int32_t *dst[3] = {&L->tp, &L->pp, &L->threads};
        for (int k = 0; k < 3; k++) {
            cJSON *v = cJSON_GetObjectItemCaseSensitive(r, keys[k]);
            *dst[k] = 1;
            if (!v) continue;
            if (!cJSON_IsNumber(v) || v->valuedouble < 1 || v->valuedouble > 256 ||
                v->valuedouble != (double)(int)v->valuedouble) {
                tsr_set_err(err, err_len,
                            "--cluster %s: replicas[%d] (%s): \"%s\" must be an integer in 1..256",
                            path, i, L->name, keys[k]);
                goto bad;
            }
            *dst[k] = (int32_t)v->valueint;
        }
        if (launch && !cJSON_IsString(launch)) {
            tsr_set_err(err, err_len,
                        "--cluster %s: replicas[%d] (%s): \"launch\" must be a string", path, i,
                        L->name);
            goto bad;
        }
        if (launch) L->launch = dup_str(launch->valuestring);
        if (args) {
            if (!cJSON_IsArray(args)) {
                tsr_set_err(err, err_len,
                            "--cluster %s: replicas[%d] (%s): \"args\" must be an array of strings",
                            path, i, L->name);
                goto bad;
            }
            L->args = calloc((size_t)cJSON_GetArraySize(args) + 1, sizeof *L->args);
            cJSON *a;
            cJSON_ArrayForEach(a, args)
            {
                if (!cJSON_IsString(a)) {
                    tsr_set_err(err, err_len,
                                "--cluster %s: replicas[%d] (%s): \"args\" must be strings", path,
                                i, L->name);
                    i++;
                    goto bad;
                }
                L->args[L->n_args++] = dup_str(a->valuestring);
            }
        }
        for (int k = 0; k < i; k++) {
            if (!strcmp(out[k].name, L->name)) {
                tsr_set_err(err, err_len, "--cluster %s: two replicas are named '%s'", path,
                            L->name);
                i++;
                goto bad;
            }
        }
        i++;
    }
    n = i;
    goto done;
bad:
    launched_free(out, i + 1 > MAX_LAUNCHED ? MAX_LAUNCHED : i + 1);
    n = -1;
done:
    cJSON_Delete(root);
    free(text);
    return n;
}

/* Plan one replica with the planner; 0, or -1 with the planner's reason. */
static int plan_replica(const launched *L, tsr_plan *plan, tsr_plan_model *pm, char *err,
                        size_t err_len)
{
    tsr_gguf *g;
    char e[1024];
    if (tsr_gguf_open(L->model, &g, e, sizeof e) != 0) {
        tsr_set_err(err, err_len, "replica '%s': %s", L->name, e);
        return -1;
    }
    int rc = 0;
    if (tsr_replica_plan_model(g, pm, e, sizeof e) != 0 ||
        tsr_plan_make(pm, L->tp, L->pp, NULL, 0, 4096, plan, e, sizeof e) != 0) {
        tsr_set_err(err, err_len, "replica '%s' (%s, tp %d x pp %d): %s", L->name, L->model, L->tp,
                    L->pp, e);
        rc = -1;
    }
    tsr_gguf_close(g);
    return rc;
}

static pid_t spawn(launched *L)
{
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        setpgid(0, 0);
        signal(SIGTERM, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        execl("/bin/sh", "sh", "-c", L->cmd, (char *)NULL);
        _exit(127);
    }
    setpgid(pid, pid);
    L->pid = pid;
    L->t_started_ms = tsr_coord_now_ms();
    return pid;
}

static void describe_exit(int status, char *buf, size_t cap)
{
    if (WIFEXITED(status))
        snprintf(buf, cap, "its process exited with status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(buf, cap, "its process was killed by signal %d", WTERMSIG(status));
    else
        snprintf(buf, cap, "its process ended");
}

/* ---- the subcommand ---- */

int tsr_cmd_coordinator(int argc, char **argv)
{
    enum {
        O_LISTEN = 256,
        O_CLUSTER,
        O_DRY,
        O_TESSERA,
        O_DOWN,
        O_GRACE,
        O_R_KEY,
        O_R_CA,
        O_R_CERT,
        O_R_TLSKEY,
        O_HTTP
    };
    static const struct option opts[] = {{"listen", required_argument, 0, O_LISTEN},
                                         {"cluster", required_argument, 0, O_CLUSTER},
                                         {"dry-run", no_argument, 0, O_DRY},
                                         {"tessera", required_argument, 0, O_TESSERA},
                                         {"down-after", required_argument, 0, O_DOWN},
                                         {"shutdown-grace", required_argument, 0, O_GRACE},
                                         TSR_CLI_SECURITY_OPTS,
                                         {"replica-key-file", required_argument, 0, O_R_KEY},
                                         {"replica-tls-ca", required_argument, 0, O_R_CA},
                                         {"replica-tls-cert", required_argument, 0, O_R_CERT},
                                         {"replica-tls-key", required_argument, 0, O_R_TLSKEY},
                                         {"http", required_argument, 0, O_HTTP},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *listen = TSR_COORD_DEFAULT_LISTEN, *cluster = NULL, *tessera = NULL;
    const char *r_key = NULL, *r_ca = NULL, *r_cert = NULL, *r_tlskey = NULL, *http_listen = NULL;
    tsr_cli_security_opts so = {0};
    bool dry = false;
    int64_t down_ms = 3000, grace_ms = 10000;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        if (tsr_cli_security_flag(c, optarg, &so) == 0) continue;
        switch (c) {
        case O_LISTEN:
            if (!strchr(optarg, ':'))
                return tsr_cli_usage_error(
                    "coordinator", "--listen needs HOST:PORT (e.g. 127.0.0.1:50050), got '%s'",
                    optarg);
            listen = optarg;
            break;
        case O_CLUSTER:
            cluster = optarg;
            break;
        case O_DRY:
            dry = true;
            break;
        case O_TESSERA:
            tessera = optarg;
            break;
        case O_DOWN:
            if (!tsr_cli_parse_i64(optarg, 100, 600000, &down_ms))
                return tsr_cli_usage_error(
                    "coordinator", "--down-after needs milliseconds in 100..600000, got '%s'",
                    optarg);
            break;
        case O_GRACE:
            if (!tsr_cli_parse_i64(optarg, 0, 86400000, &grace_ms))
                return tsr_cli_usage_error("coordinator",
                                           "--shutdown-grace needs milliseconds, got '%s'", optarg);
            break;
        case O_R_KEY:
            r_key = optarg;
            break;
        case O_R_CA:
            r_ca = optarg;
            break;
        case O_R_CERT:
            r_cert = optarg;
            break;
        case O_R_TLSKEY:
            r_tlskey = optarg;
            break;
        case O_HTTP:
            if (!strchr(optarg, ':'))
                return tsr_cli_usage_error("coordinator", "--http needs HOST:PORT, got '%s'",
                                           optarg);
            http_listen = optarg;
            break;
        case 'h':
            fputs(coord_help, stdout);
            return 0;
        default:
            return tsr_cli_usage_error("coordinator", "unknown flag");
        }
    }
    if (optind != argc)
        return tsr_cli_usage_error("coordinator", "unexpected argument '%s'", argv[optind]);
    if (dry && !cluster)
        return tsr_cli_usage_error("coordinator", "--dry-run goes with --cluster FILE");
    if ((r_cert != NULL) != (r_tlskey != NULL))
        return tsr_cli_usage_error("coordinator",
                                   "--replica-tls-cert and --replica-tls-key go together");
    if (r_cert && !r_ca)
        return tsr_cli_usage_error("coordinator",
                                   "--replica-tls-cert / --replica-tls-key need --replica-tls-ca");
    const char *listens[2] = {listen, http_listen};
    int src = tsr_cli_security_finish("coordinator", &so, listens, 2);
    if (src != 0) return src;

    char err[2048];
    char self[4096];
    /* Keys and TLS files: read and checked before anything starts. */
    tsr_auth *auth = NULL;
    tsr_tls_server tls;
    tsr_tls_client rtls;
    char *r_auth = NULL;
    memset(&tls, 0, sizeof tls);
    memset(&rtls, 0, sizeof rtls);
    if (tsr_cli_security_load(&so, &auth, &tls, err, sizeof err) != 0 ||
        tsr_tls_client_load("--replica-tls-", r_ca, r_cert, r_tlskey, &rtls, err, sizeof err) !=
            0 ||
        tsr_auth_client_header("--replica-key-file", r_key, NULL, &r_auth, err, sizeof err) != 0) {
        fprintf(stderr, "tessera coordinator: %s\n", err);
        tsr_auth_free(auth);
        tsr_tls_server_free(&tls);
        tsr_tls_client_free(&rtls);
        return 1;
    }
    /* Launched replicas join with an admin key and serve with the replica key. */
    char *launch_extra = NULL;
    size_t le_len = 0, le_cap = 0;
    bool le_ok = buf_add(&launch_extra, &le_len, &le_cap, "", false);
    if (le_ok && so.admin_keys)
        le_ok = buf_add(&launch_extra, &le_len, &le_cap, " --join-key-file ", false) &&
                buf_add(&launch_extra, &le_len, &le_cap, so.admin_keys, true);
    if (le_ok && r_key)
        le_ok = buf_add(&launch_extra, &le_len, &le_cap, " --api-key-file ", false) &&
                buf_add(&launch_extra, &le_len, &le_cap, r_key, true);
    if (le_ok && so.tls_cert && so.tls_client_ca)
        le_ok = buf_add(&launch_extra, &le_len, &le_cap, " --join-tls-ca ", false) &&
                buf_add(&launch_extra, &le_len, &le_cap, so.tls_client_ca, true);
    int early_rc = 1;
    if (!le_ok) {
        fprintf(stderr, "tessera coordinator: out of memory\n");
        goto fail_keys;
    }
    if (!tessera) {
        ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
        if (n <= 0) {
            fprintf(stderr, "tessera coordinator: cannot find this binary; pass --tessera PATH\n");
            goto fail_keys;
        }
        self[n] = 0;
        tessera = self;
    }
    static launched L[MAX_LAUNCHED];
    int n_launched = 0;
    if (cluster) {
        n_launched = read_cluster(cluster, L, err, sizeof err);
        if (n_launched < 0) {
            fprintf(stderr, "tessera coordinator: %s\n", err);
            goto fail_keys;
        }
        /* Plan every replica before starting any. */
        static tsr_plan plan;
        tsr_plan_model pm;
        for (int i = 0; i < n_launched; i++) {
            if (plan_replica(&L[i], &plan, &pm, err, sizeof err) != 0) {
                fprintf(stderr, "tessera coordinator: %s\n", err);
                launched_free(L, n_launched);
                goto fail_keys;
            }
            if (dry) {
                static char buf[1 << 16];
                tsr_plan_format(&plan, &pm, buf, sizeof buf);
                L[i].cmd = expand(&L[i], tessera, listen, launch_extra);
                printf("replica %s: model %s (%s), tp %d x pp %d, %d threads per rank\n", L[i].name,
                       L[i].model_name, L[i].model, L[i].tp, L[i].pp, L[i].threads);
                printf("  launch: %s\n", L[i].cmd ? L[i].cmd : "(bad template)");
                fputs(buf, stdout);
                if (!L[i].cmd) {
                    fprintf(stderr,
                            "tessera coordinator: replica '%s': the launch template has an "
                            "unknown {placeholder}; use {ranks} {tp} {pp} {threads} {model} "
                            "{name} {coordinator} {tessera} {serve_args}\n",
                            L[i].name);
                    launched_free(L, n_launched);
                    goto fail_keys;
                }
            }
        }
        if (dry) {
            launched_free(L, n_launched);
            early_rc = 0;
            goto fail_keys;
        }
    }

    grpc_init(); /* held until the registry's channels are gone */
    tsr_coord *coord;
    tsr_coord_params cp = {
        .down_after_ms = down_ms, .heartbeat_interval_ms = 500, .replica_tls = &rtls};
    if (tsr_coord_new(&cp, &coord, err, sizeof err) != 0) {
        fprintf(stderr, "tessera coordinator: %s\n", err);
        grpc_shutdown();
        goto fail_keys;
    }
    tsr_coord_server *srv;
    int port = 0;
    tsr_coord_server_params sp = {
        .listen = listen, .auth = auth, .tls = &tls, .replica_authorization = r_auth};
    if (tsr_coord_server_start(&sp, coord, &srv, &port, err, sizeof err) != 0) {
        fprintf(stderr, "tessera coordinator: %s\n", err);
        tsr_coord_free(coord);
        grpc_shutdown();
        launched_free(L, n_launched);
        goto fail_keys;
    }
    tsr_metrics *metrics = NULL;
    tsr_http *http = NULL;
    int http_bound = 0;
    if (http_listen) {
        tsr_http_backend be;
        int http_port = 0;
        if (tsr_metrics_new(&metrics) != 0) {
            fprintf(stderr, "tessera coordinator: out of memory\n");
            http_listen = NULL;
        } else {
            tsr_coord_server_http_backend(srv, metrics, &be);
            tsr_http_params hp = {.listen = http_listen,
                                  .model_id = "",
                                  .tls_cert_pem = tls.cert_pem,
                                  .tls_key_pem = tls.key_pem,
                                  .tls_client_ca_pem = tls.client_ca_pem,
                                  .auth = auth,
                                  .metrics = metrics};
            if (tsr_http_start_backend(&hp, &be, &http, &http_port, err, sizeof err) != 0) {
                fprintf(stderr, "tessera coordinator: --http %s: %s\n", http_listen, err);
                tsr_coord_server_shutdown(srv, 0, err, sizeof err);
                tsr_coord_free(coord);
                grpc_shutdown();
                tsr_metrics_free(metrics);
                launched_free(L, n_launched);
                goto fail_keys;
            }
            http_bound = http_port;
        }
    }
    sem_init(&g_sem, 0, 0);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);

    char host[256];
    const char *colon = strrchr(listen, ':');
    snprintf(host, sizeof host, "%.*s", (int)(colon - listen), listen);
    char self_addr[300];
    snprintf(self_addr, sizeof self_addr, "%s:%d",
             !strcmp(host, "0.0.0.0") || !strcmp(host, "[::]") ? "127.0.0.1" : host, port);
    if (!tsr_auth_enabled(auth))
        fprintf(stderr,
                "tessera coordinator: no --api-key-file: serving without authentication%s\n",
                so.insecure ? " (--insecure-listen)" : " (loopback addresses only)");
    else
        fprintf(stderr, "tessera coordinator: keys required (%s%s%s)\n",
                so.api_keys ? "--api-key-file" : "", so.api_keys && so.admin_keys ? ", " : "",
                so.admin_keys ? "--admin-key-file" : "");
    if (tsr_tls_server_enabled(&tls))
        fprintf(stderr, "tessera coordinator: TLS on%s\n",
                tls.client_ca_pem ? " (mutual TLS: client certificates required)" : "");
    fprintf(stderr, "tessera coordinator: listening on %s:%d\n", host, port);
    if (http) {
        /* after the gRPC line: scripts take the first "listening on" as the gRPC port */
        char hhost[256];
        const char *hc = strrchr(http_listen, ':');
        snprintf(hhost, sizeof hhost, "%.*s", (int)(hc - http_listen), http_listen);
        fprintf(stderr, "tessera coordinator: http listening on %s:%d\n", hhost, http_bound);
    }
    fflush(stderr);

    for (int i = 0; i < n_launched; i++) {
        L[i].cmd = expand(&L[i], tessera, self_addr, launch_extra);
        if (!L[i].cmd) {
            fprintf(stderr,
                    "tessera coordinator: replica '%s': the launch template has an unknown "
                    "{placeholder}\n",
                    L[i].name);
            continue;
        }
        tsr_coord_add_launched(coord, L[i].name, L[i].model_name, L[i].tp, L[i].pp, err,
                               sizeof err);
        L[i].backoff_ms = BACKOFF_MIN_MS;
        if (spawn(&L[i]) < 0)
            fprintf(stderr, "tessera coordinator: replica '%s': fork: %s\n", L[i].name,
                    strerror(errno));
        else
            fprintf(stderr, "tessera coordinator: launched replica '%s' (pid %d): %s\n", L[i].name,
                    (int)L[i].pid, L[i].cmd);
    }
    fflush(stderr);

    /* Supervise: tick the registry, reap and restart replicas, until a signal. */
    while (atomic_load(&g_signals) == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 100 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        while (sem_timedwait(&g_sem, &ts) != 0 && errno == EINTR) {
        }
        if (atomic_exchange(&g_hups, 0) > 0 && auth) {
            int n_api = 0, n_admin = 0;
            if (tsr_auth_reload(auth, &n_api, &n_admin, err, sizeof err) != 0)
                fprintf(stderr, "tessera coordinator: SIGHUP: keeping the previous keys: %s\n",
                        err);
            else
                fprintf(stderr,
                        "tessera coordinator: SIGHUP: key files re-read (%d inference, %d admin "
                        "keys)\n",
                        n_api, n_admin);
        }
        tsr_coord_tick(coord);
        const int64_t t = tsr_coord_now_ms();
        for (int i = 0; i < n_launched; i++) {
            if (L[i].pid > 0) {
                int status;
                pid_t w = waitpid(L[i].pid, &status, WNOHANG);
                if (w == L[i].pid) {
                    char why[128];
                    describe_exit(status, why, sizeof why);
                    killpg(L[i].pid, SIGKILL); /* leftovers of the group (other ranks) */
                    L[i].pid = 0;
                    if (t - L[i].t_started_ms > 60000) L[i].backoff_ms = BACKOFF_MIN_MS;
                    L[i].t_restart_ms = t + L[i].backoff_ms;
                    tsr_coord_launched_exit(coord, L[i].name, why);
                    fprintf(stderr, "tessera coordinator: replica '%s' %s; restarting in %lld ms\n",
                            L[i].name, why, (long long)L[i].backoff_ms);
                    L[i].backoff_ms =
                        L[i].backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : L[i].backoff_ms * 2;
                }
            } else if (L[i].cmd && L[i].t_restart_ms && t >= L[i].t_restart_ms) {
                if (tsr_coord_is_removed(coord, L[i].name)) {
                    L[i].t_restart_ms = 0;
                    continue;
                }
                L[i].t_restart_ms = 0;
                tsr_coord_add_launched(coord, L[i].name, L[i].model_name, L[i].tp, L[i].pp, err,
                                       sizeof err);
                if (spawn(&L[i]) > 0)
                    fprintf(stderr, "tessera coordinator: restarted replica '%s' (pid %d)\n",
                            L[i].name, (int)L[i].pid);
            }
            if (L[i].pid > 0 && tsr_coord_is_removed(coord, L[i].name)) {
                fprintf(stderr, "tessera coordinator: replica '%s' removed: stopping it\n",
                        L[i].name);
                killpg(L[i].pid, SIGTERM);
            }
        }
        fflush(stderr);
    }
    fprintf(stderr, "tessera coordinator: stopping: replicas first, then the front door\n");
    for (int i = 0; i < n_launched; i++)
        if (L[i].pid > 0) killpg(L[i].pid, SIGTERM);
    int64_t until = tsr_coord_now_ms() + STOP_KILL_MS;
    for (;;) {
        bool any = false;
        for (int i = 0; i < n_launched; i++) {
            if (L[i].pid <= 0) continue;
            int status;
            if (waitpid(L[i].pid, &status, WNOHANG) == L[i].pid) {
                killpg(L[i].pid, SIGKILL);
                L[i].pid = 0;
            } else {
                any = true;
            }
        }
        if (!any) break;
        if (tsr_coord_now_ms() >= until) {
            for (int i = 0; i < n_launched; i++) {
                if (L[i].pid > 0) {
                    killpg(L[i].pid, SIGKILL);
                    waitpid(L[i].pid, NULL, 0);
                    L[i].pid = 0;
                }
            }
            break;
        }
        usleep(50000);
    }
    int rc = 0;
    if (http) {
        /* First the HTTP front door: its open requests get the grace period while the
         * proxy still runs; what is left is cancelled (each gets its FINISH when the
         * coordinator's server below ends its thread). */
        tsr_http_set_not_serving(http);
        if (tsr_http_shutdown(http, grace_ms, err, sizeof err) != 0) {
            fprintf(stderr, "tessera coordinator: %s\n", err);
            rc = 1;
        }
        http = NULL;
    }
    if (tsr_coord_server_shutdown(srv, grace_ms, err, sizeof err) != 0) {
        fprintf(stderr, "tessera coordinator: %s\n", err);
        rc = 1;
    } else {
        tsr_coord_free(coord);
        grpc_shutdown();
        tsr_metrics_free(metrics); /* after every request's FINISH */
    }
    launched_free(L, n_launched);
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGHUP, SIG_DFL);
    sem_destroy(&g_sem);
    if (rc == 0) {
        tsr_auth_free(auth);
        tsr_tls_client_free(&rtls);
    }
    tsr_tls_server_free(&tls);
    free(r_auth);
    free(launch_extra);
    if (rc == 0) fprintf(stderr, "tessera coordinator: stopped\n");
    return rc;
fail_keys:
    tsr_auth_free(auth);
    tsr_tls_server_free(&tls);
    tsr_tls_client_free(&rtls);
    free(r_auth);
    free(launch_extra);
    return early_rc;
}
