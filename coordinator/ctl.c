/*
 * ctl.c — `tessera ctl`: the operator's client of a coordinator's tessera.v1.Cluster
 * service (status, replicas, drain / undrain / remove, top) and of the planner (plan).
 *
 * Human tables by default, one JSON document with --json (cJSON). Exit status: 0 ok,
 * 1 runtime error (coordinator unreachable, unknown replica: the message says which),
 * 2 usage error. Every call has a deadline (--timeout, default 5 s).
 */
#include "coordinator/auth.h"
#include "coordinator/cli.h"
#include "coordinator/coord_server.h"
#include "coordinator/rpc.h"
#include "kernels/util.h"
#include "shard/gguf.h"
#include "shard/plan.h"
#include "worker/replica.h"

#include "tessera.pb-c.h"

#include <cjson/cJSON.h>
#include <grpc/grpc.h>

#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *ctl_help =
    "usage: tessera ctl [--coordinator HOST:PORT] [--json] COMMAND\n"
    "\n"
    "Operate a cluster through its coordinator ('tessera coordinator').\n"
    "\n"
    "commands:\n"
    "  status                   replicas up / draining / down, models, requests, failovers\n"
    "  replicas                 every replica: address, model, tp x pp, state, load, KV,\n"
    "                           tokens/s, last heartbeat\n"
    "  drain NAME               route no new request to NAME (running ones finish)\n"
    "  undrain NAME             route to NAME again\n"
    "  remove NAME              forget NAME (a launched replica is stopped)\n"
    "  plan MODEL --tp T --pp P how MODEL (a GGUF path) would be cut (the planner, locally)\n"
    "  top                      'replicas' refreshed every second (in place on a terminal;\n"
    "                           --count N to stop after N refreshes)\n"
    "\n"
    "      --coordinator ADDR   the coordinator (default " TSR_COORD_DEFAULT_LISTEN ")\n"
    "      --json               one JSON document instead of a table\n"
    "      --timeout MS         deadline of each call (default 5000)\n"
    "keys and TLS (a coordinator with --admin-key-file needs an admin "
    "key):\n" TSR_CLI_CLIENT_SECURITY_HELP "  -h, --help               this help\n"
    "\n"
    "exit status: 0 ok, 1 runtime error (unreachable coordinator, refused key, bad key or TLS\n"
    "file, unknown replica), 2 usage\n";

typedef struct {
    const char *addr;
    bool json;
    int64_t timeout_ms;
    grpc_channel *ch;
    char *authorization; /* "Bearer KEY" or NULL */
    bool tls;
} ctl;

/* One Cluster call; returns the reply bytes or NULL after printing the error. */
static uint8_t *call(ctl *k, const char *method, const ProtobufCMessage *req, size_t *len)
{
    uint8_t *resp = NULL;
    char det[1024];
    int code = tsr_rpc_unary_auth(k->ch, k->authorization, method, req, k->timeout_ms, &resp, len,
                                  det, sizeof det);
    if (code != 0) {
        if (code == GRPC_STATUS_UNAUTHENTICATED)
            fprintf(stderr,
                    "tessera ctl: the coordinator at %s refused the call: %s (give its key with "
                    "--api-key-file FILE or $TESSERA_API_KEY)\n",
                    k->addr, det);
        else if (code == GRPC_STATUS_PERMISSION_DENIED)
            fprintf(stderr,
                    "tessera ctl: the coordinator at %s refused the call: %s (ctl needs an admin "
                    "key: one of the coordinator's --admin-key-file)\n",
                    k->addr, det);
        else if (code == GRPC_STATUS_UNAVAILABLE && !k->tls)
            fprintf(stderr,
                    "tessera ctl: cannot reach the coordinator at %s (%s: %s); is 'tessera "
                    "coordinator' running there? (--coordinator HOST:PORT; a coordinator serving "
                    "TLS needs --tls-ca FILE)\n",
                    k->addr, tsr_rpc_code_name(code), det);
        else if (code == GRPC_STATUS_UNAVAILABLE || code == GRPC_STATUS_DEADLINE_EXCEEDED)
            fprintf(stderr,
                    "tessera ctl: cannot reach the coordinator at %s (%s: %s); is 'tessera "
                    "coordinator' running there? (--coordinator HOST:PORT)\n",
                    k->addr, tsr_rpc_code_name(code), det);
        else
            fprintf(stderr, "tessera ctl: %s\n", det);
        return NULL;
    }
    return resp;
}

static const char *state_name(int s)
{
    switch (s) {
    case TESSERA__V1__REPLICA_STATE__REPLICA_STATE_UP:
        return "up";
    case TESSERA__V1__REPLICA_STATE__REPLICA_STATE_DRAINING:
        return "draining";
    case TESSERA__V1__REPLICA_STATE__REPLICA_STATE_DOWN:
        return "down";
    case TESSERA__V1__REPLICA_STATE__REPLICA_STATE_STARTING:
        return "starting";
    default:
        return "unknown";
    }
}

static cJSON *replica_json(const Tessera__V1__ReplicaInfo *r)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "name", r->name ? r->name : "");
    cJSON_AddStringToObject(o, "address", r->address ? r->address : "");
    cJSON_AddStringToObject(o, "model", r->model ? r->model : "");
    cJSON_AddNumberToObject(o, "tp", r->tp);
    cJSON_AddNumberToObject(o, "pp", r->pp);
    cJSON_AddStringToObject(o, "state", state_name(r->state));
    cJSON_AddNumberToObject(o, "requests_running", r->requests_running);
    cJSON_AddNumberToObject(o, "requests_queued", r->requests_queued);
    cJSON_AddNumberToObject(o, "outstanding", r->outstanding);
    cJSON_AddNumberToObject(o, "kv_blocks_used", r->kv_blocks_used);
    cJSON_AddNumberToObject(o, "kv_blocks_total", r->kv_blocks_total);
    cJSON_AddNumberToObject(o, "tokens_per_second", r->tokens_per_second);
    cJSON_AddNumberToObject(o, "last_heartbeat_ms_ago", r->last_heartbeat_ms_ago);
    cJSON_AddBoolToObject(o, "launched", r->launched);
    cJSON_AddNumberToObject(o, "restarts", r->restarts);
    cJSON_AddNumberToObject(o, "requests_routed", (double)r->requests_routed);
    cJSON_AddStringToObject(o, "reason", r->reason ? r->reason : "");
    return o;
}

static void print_json(cJSON *o)
{
    char *s = cJSON_Print(o);
    if (s) puts(s);
    free(s);
    cJSON_Delete(o);
}

static void replicas_table(const Tessera__V1__ListReplicasResponse *a, FILE *f)
{
    fprintf(f, "%-16s %-21s %-16s %-5s %-9s %5s %5s %11s %8s %8s  %s\n", "NAME", "ADDRESS", "MODEL",
            "TPxPP", "STATE", "RUN", "QUEUE", "KV", "TOK/S", "HB_AGO", "REASON");
    for (size_t i = 0; i < a->n_replicas; i++) {
        const Tessera__V1__ReplicaInfo *r = a->replicas[i];
        char tpp[16], kv[32], hb[32];
        snprintf(tpp, sizeof tpp, "%dx%d", r->tp, r->pp);
        snprintf(kv, sizeof kv, "%d/%d", r->kv_blocks_used, r->kv_blocks_total);
        if (r->last_heartbeat_ms_ago < 0)
            snprintf(hb, sizeof hb, "never");
        else
            snprintf(hb, sizeof hb, "%.1fs", r->last_heartbeat_ms_ago / 1000.0);
        fprintf(f, "%-16s %-21s %-16s %-5s %-9s %5d %5d %11s %8.1f %8s  %s\n", r->name,
                r->address && r->address[0] ? r->address : "-", r->model, tpp, state_name(r->state),
                r->requests_running, r->requests_queued, kv, r->tokens_per_second, hb,
                r->reason ? r->reason : "");
    }
    if (a->n_replicas == 0) fprintf(f, "(no replica has joined)\n");
}

static int cmd_replicas(ctl *k, bool top, int64_t count)
{
    bool tty = top && isatty(1) && !k->json;
    for (int64_t it = 0; !top || count <= 0 || it < count; it++) {
        Tessera__V1__ListReplicasRequest q = TESSERA__V1__LIST_REPLICAS_REQUEST__INIT;
        size_t len;
        uint8_t *b = call(k, "/tessera.v1.Cluster/ListReplicas", &q.base, &len);
        if (!b) return 1;
        Tessera__V1__ListReplicasResponse *a =
            tessera__v1__list_replicas_response__unpack(NULL, len, b);
        free(b);
        if (!a) {
            fprintf(stderr, "tessera ctl: malformed reply from %s\n", k->addr);
            return 1;
        }
        if (k->json) {
            cJSON *o = cJSON_CreateObject();
            cJSON *arr = cJSON_AddArrayToObject(o, "replicas");
            for (size_t i = 0; i < a->n_replicas; i++)
                cJSON_AddItemToArray(arr, replica_json(a->replicas[i]));
            print_json(o);
        } else {
            if (tty) fputs("\033[H\033[2J", stdout);
            replicas_table(a, stdout);
            if (top) putchar('\n');
        }
        fflush(stdout);
        tessera__v1__list_replicas_response__free_unpacked(a, NULL);
        if (!top) break;
        sleep(1);
    }
    return 0;
}

static int cmd_status(ctl *k)
{
    Tessera__V1__ClusterStatusRequest q = TESSERA__V1__CLUSTER_STATUS_REQUEST__INIT;
    size_t len;
    uint8_t *b = call(k, "/tessera.v1.Cluster/ClusterStatus", &q.base, &len);
    if (!b) return 1;
    Tessera__V1__ClusterStatusResponse *a =
        tessera__v1__cluster_status_response__unpack(NULL, len, b);
    free(b);
    if (!a) {
        fprintf(stderr, "tessera ctl: malformed reply from %s\n", k->addr);
        return 1;
    }
    if (k->json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "coordinator", k->addr);
        cJSON_AddNumberToObject(o, "replicas", a->replicas);
        cJSON_AddNumberToObject(o, "replicas_up", a->replicas_up);
        cJSON_AddNumberToObject(o, "replicas_draining", a->replicas_draining);
        cJSON_AddNumberToObject(o, "replicas_down", a->replicas_down);
        cJSON *m = cJSON_AddArrayToObject(o, "models");
        for (size_t i = 0; i < a->n_models; i++)
            cJSON_AddItemToArray(m, cJSON_CreateString(a->models[i]));
        cJSON_AddNumberToObject(o, "requests_active", a->requests_active);
        cJSON_AddNumberToObject(o, "requests_total", (double)a->requests_total);
        cJSON_AddNumberToObject(o, "failovers", (double)a->failovers);
        cJSON_AddNumberToObject(o, "requests_failed", (double)a->requests_failed);
        cJSON_AddNumberToObject(o, "tokens_per_second", a->tokens_per_second);
        cJSON_AddNumberToObject(o, "uptime_s", a->uptime_s);
        print_json(o);
    } else {
        printf("coordinator  %s (up %.0f s)\n", k->addr, a->uptime_s);
        printf("replicas     %d: %d up, %d draining, %d down\n", a->replicas, a->replicas_up,
               a->replicas_draining, a->replicas_down);
        printf("models      ");
        for (size_t i = 0; i < a->n_models; i++) printf(" %s", a->models[i]);
        printf("%s\n", a->n_models ? "" : " (none up)");
        printf("requests     %d active, %llu total, %llu failed, %llu failovers\n",
               a->requests_active, (unsigned long long)a->requests_total,
               (unsigned long long)a->requests_failed, (unsigned long long)a->failovers);
        printf("tokens/s     %.1f\n", a->tokens_per_second);
    }
    tessera__v1__cluster_status_response__free_unpacked(a, NULL);
    return 0;
}

static int cmd_op(ctl *k, const char *what, const char *name)
{
    char method[64];
    snprintf(method, sizeof method, "/tessera.v1.Cluster/%s%sReplica",
             !strcmp(what, "drain")     ? "Drain"
             : !strcmp(what, "undrain") ? "Undrain"
                                        : "Remove",
             "");
    Tessera__V1__ReplicaRef q = TESSERA__V1__REPLICA_REF__INIT;
    q.name = (char *)name;
    size_t len;
    uint8_t *b = call(k, method, &q.base, &len);
    if (!b) return 1;
    Tessera__V1__ReplicaInfo *r = tessera__v1__replica_info__unpack(NULL, len, b);
    free(b);
    if (!r) {
        fprintf(stderr, "tessera ctl: malformed reply from %s\n", k->addr);
        return 1;
    }
    if (k->json) {
        cJSON *o = replica_json(r);
        cJSON_AddStringToObject(o, "action", what);
        print_json(o);
    } else {
        printf("%s: %s (%s, now %s)\n", what, r->name,
               r->address && r->address[0] ? r->address : "-",
               !strcmp(what, "remove") ? "removed" : state_name(r->state));
    }
    tessera__v1__replica_info__free_unpacked(r, NULL);
    return 0;
}

static int cmd_plan(ctl *k, const char *model, int64_t tp, int64_t pp)
{
    char err[1024];
    tsr_gguf *g;
    if (tsr_gguf_open(model, &g, err, sizeof err) != 0) {
        fprintf(stderr, "tessera ctl: %s\n", err);
        return 1;
    }
    tsr_plan_model pm;
    static tsr_plan plan;
    int rc = 1;
    if (tsr_replica_plan_model(g, &pm, err, sizeof err) != 0 ||
        tsr_plan_make(&pm, (int32_t)tp, (int32_t)pp, NULL, 0, 4096, &plan, err, sizeof err) != 0) {
        fprintf(stderr, "tessera ctl: plan %s --tp %lld --pp %lld: %s\n", model, (long long)tp,
                (long long)pp, err);
        goto done;
    }
    if (k->json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "model", model);
        cJSON_AddNumberToObject(o, "tp", (double)tp);
        cJSON_AddNumberToObject(o, "pp", (double)pp);
        cJSON *arr = cJSON_AddArrayToObject(o, "ranks");
        for (int32_t i = 0; i < plan.n_ranks; i++) {
            const tsr_plan_rank *r = &plan.ranks[i];
            cJSON *x = cJSON_CreateObject();
            cJSON_AddNumberToObject(x, "rank", r->rank);
            cJSON_AddNumberToObject(x, "stage", r->stage);
            cJSON_AddNumberToObject(x, "tp_rank", r->tp_rank);
            cJSON_AddNumberToObject(x, "layer_begin", r->layer_begin);
            cJSON_AddNumberToObject(x, "layer_end", r->layer_end);
            cJSON_AddNumberToObject(x, "head_begin", r->head_begin);
            cJSON_AddNumberToObject(x, "head_end", r->head_end);
            cJSON_AddNumberToObject(x, "bytes_weights", (double)r->n_bytes_weights);
            cJSON_AddItemToArray(arr, x);
        }
        print_json(o);
    } else {
        static char buf[1 << 16];
        tsr_plan_format(&plan, &pm, buf, sizeof buf);
        fputs(buf, stdout);
    }
    rc = 0;
done:
    tsr_gguf_close(g);
    return rc;
}

int tsr_cmd_ctl(int argc, char **argv)
{
    enum { O_COORD = 256, O_JSON, O_TIMEOUT, O_TP, O_PP, O_COUNT };
    static const struct option opts[] = {{"coordinator", required_argument, 0, O_COORD},
                                         {"json", no_argument, 0, O_JSON},
                                         {"timeout", required_argument, 0, O_TIMEOUT},
                                         {"tp", required_argument, 0, O_TP},
                                         {"pp", required_argument, 0, O_PP},
                                         {"count", required_argument, 0, O_COUNT},
                                         TSR_CLI_CLIENT_SECURITY_OPTS,
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    ctl k = {.addr = TSR_COORD_DEFAULT_LISTEN, .timeout_ms = 5000};
    int64_t tp = 1, pp = 1, count = 0;
    tsr_cli_client_security_opts so = {0};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        if (tsr_cli_client_security_flag(c, optarg, &so) == 0) continue;
        switch (c) {
        case O_COORD:
            if (!strchr(optarg, ':'))
                return tsr_cli_usage_error("ctl", "--coordinator needs HOST:PORT, got '%s'",
                                           optarg);
            k.addr = optarg;
            break;
        case O_JSON:
            k.json = true;
            break;
        case O_TIMEOUT:
            if (!tsr_cli_parse_i64(optarg, 1, 3600000, &k.timeout_ms))
                return tsr_cli_usage_error("ctl", "--timeout needs milliseconds, got '%s'", optarg);
            break;
        case O_TP:
            if (!tsr_cli_parse_i64(optarg, 1, 256, &tp))
                return tsr_cli_usage_error("ctl", "--tp needs an integer in 1..256, got '%s'",
                                           optarg);
            break;
        case O_PP:
            if (!tsr_cli_parse_i64(optarg, 1, 256, &pp))
                return tsr_cli_usage_error("ctl", "--pp needs an integer in 1..256, got '%s'",
                                           optarg);
            break;
        case O_COUNT:
            if (!tsr_cli_parse_i64(optarg, 1, 1000000, &count))
                return tsr_cli_usage_error("ctl", "--count needs an integer >= 1, got '%s'",
                                           optarg);
            break;
        case 'h':
            fputs(ctl_help, stdout);
            return 0;
        default:
            return tsr_cli_usage_error("ctl", "unknown flag");
        }
    }
    /* GNU getopt permutes: flags may come before or after the command. */
    int nargs = 0;
    char *args[4];
    for (int i = optind; i < argc; i++) {
        if (nargs >= 4) return tsr_cli_usage_error("ctl", "too many arguments");
        args[nargs++] = argv[i];
    }
    if (nargs == 0)
        return tsr_cli_usage_error(
            "ctl", "which command? status, replicas, drain, undrain, remove, plan or top");
    const char *cmd = args[0];
    int want = -1;
    if (!strcmp(cmd, "status") || !strcmp(cmd, "replicas") || !strcmp(cmd, "top"))
        want = 1;
    else if (!strcmp(cmd, "drain") || !strcmp(cmd, "undrain") || !strcmp(cmd, "remove") ||
             !strcmp(cmd, "plan"))
        want = 2;
    else
        return tsr_cli_usage_error("ctl",
                                   "unknown command '%s' (status, replicas, drain, undrain, "
                                   "remove, plan, top)",
                                   cmd);
    if (nargs != want)
        return tsr_cli_usage_error(
            "ctl", want == 1 ? "'%s' takes no argument" : "'%s' needs one argument (a %s)", cmd,
            !strcmp(cmd, "plan") ? "GGUF path" : "replica name");
    int src = tsr_cli_client_security_finish("ctl", &so);
    if (src != 0) return src;
    if (!strcmp(cmd, "plan")) return cmd_plan(&k, args[1], tp, pp);
    char err[1024];
    tsr_tls_client tls;
    if (tsr_cli_client_security_load(&so, "TESSERA_API_KEY", &k.authorization, &tls, err,
                                     sizeof err) != 0) {
        fprintf(stderr, "tessera ctl: %s\n", err);
        return 1;
    }
    k.tls = tsr_tls_client_enabled(&tls);
    grpc_init();
    k.ch = tsr_rpc_channel_tls(k.addr, &tls);
    int rc = 1;
    if (!k.ch) {
        fprintf(stderr, "tessera ctl: cannot create a channel to %s\n", k.addr);
    } else if (!strcmp(cmd, "status")) {
        rc = cmd_status(&k);
    } else if (!strcmp(cmd, "replicas")) {
        rc = cmd_replicas(&k, false, 0);
    } else if (!strcmp(cmd, "top")) {
        rc = cmd_replicas(&k, true, count);
    } else {
        rc = cmd_op(&k, cmd, args[1]);
    }
    if (k.ch) grpc_channel_destroy(k.ch);
    grpc_shutdown();
    tsr_tls_client_free(&tls);
    free(k.authorization);
    return rc;
}
