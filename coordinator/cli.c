/* cli.c — see cli.h. */
#include "coordinator/cli.h"

#include "coordinator/engine.h"
#include "kernels/q80_lanes.h"
#include "worker/comm.h"

#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int tsr_cli_usage_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "tessera %s: ", cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nRun 'tessera %s --help' for the flags.\n", cmd);
    return TSR_CLI_EXIT_USAGE;
}

bool tsr_cli_parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return false;
    *out = v;
    return true;
}

bool tsr_cli_parse_u64(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    if (*s == '-') return false;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end) return false;
    *out = v;
    return true;
}

bool tsr_cli_parse_f32(const char *s, float *out)
{
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end || !isfinite(v)) return false;
    *out = v;
    return true;
}

bool tsr_cli_parse_bytes(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    if (*s == '-') return false;
    double v = strtod(s, &end);
    if (errno || end == s || !(v >= 0)) return false;
    double mul = 1;
    switch (*end) {
    case 'k':
    case 'K':
        mul = 1024.0;
        end++;
        break;
    case 'm':
    case 'M':
        mul = 1048576.0;
        end++;
        break;
    case 'g':
    case 'G':
        mul = 1073741824.0;
        end++;
        break;
    case 't':
    case 'T':
        mul = 1099511627776.0;
        end++;
        break;
    default:
        break;
    }
    if (mul > 1 && (!strcmp(end, "iB") || !strcmp(end, "B"))) end += strlen(end);
    if (mul == 1 && !strcmp(end, "B")) end++;
    if (*end) return false;
    double b = v * mul;
    if (b > 9.0e18) return false;
    *out = (uint64_t)b;
    return true;
}

bool tsr_cli_parse_hostport(const char *s, char *host, size_t host_cap, int32_t *port)
{
    if (!s) return false;
    const char *colon = strrchr(s, ':');
    if (!colon || colon == s) return false;
    size_t n_host = (size_t)(colon - s);
    if (s[0] == '[' && s[n_host - 1] != ']') return false;   /* "[::1" */
    if (s[0] == '[' && n_host < 3) return false;             /* "[]" */
    if (s[0] != '[' && memchr(s, ':', n_host)) return false; /* bare IPv6 needs [] */
    const char *p = colon + 1;
    size_t n_digits = strlen(p);
    if (n_digits == 0 || n_digits > 5) return false;
    int32_t v = 0;
    for (size_t i = 0; i < n_digits; i++) {
        if (p[i] < '0' || p[i] > '9') return false;
        v = v * 10 + (p[i] - '0');
    }
    if (v > 65535) return false;
    if (host && host_cap > 0) {
        size_t n = n_host < host_cap - 1 ? n_host : host_cap - 1;
        memcpy(host, s, n);
        host[n] = '\0';
    }
    if (port) *port = v;
    return true;
}

int tsr_cli_default_threads(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > 64 ? 64 : (int)n);
}

/* ---- the distributed layout ---- */

int tsr_cli_replica_flag(const char *cmd, int c, const char *arg, tsr_replica_params *rp)
{
    int64_t v;
    switch (c) {
    case TSR_CLI_O_TP:
        if (!tsr_cli_parse_i64(arg, 1, 256, &v))
            return tsr_cli_usage_error(cmd, "--tp needs an integer in 1..256, got '%s'", arg);
        rp->tp = (int32_t)v;
        return 0;
    case TSR_CLI_O_PP:
        if (!tsr_cli_parse_i64(arg, 1, 256, &v))
            return tsr_cli_usage_error(cmd, "--pp needs an integer in 1..256, got '%s'", arg);
        rp->pp = (int32_t)v;
        return 0;
    case TSR_CLI_O_LAYERS:
        rp->layers = arg;
        return 0;
    case TSR_CLI_O_COMM_TIMEOUT:
        if (!tsr_cli_parse_i64(arg, 1, 86400000, &v))
            return tsr_cli_usage_error(
                cmd, "--comm-timeout needs milliseconds in 1..86400000, got '%s'", arg);
        rp->timeout_ms = v;
        return 0;
    case TSR_CLI_O_DEVICE:
        if (strcmp(arg, "cpu") != 0 && strcmp(arg, "cuda") != 0 && strcmp(arg, "auto") != 0)
            return tsr_cli_usage_error(cmd, "--device must be cpu, cuda or auto, got '%s'", arg);
        rp->device = arg;
        return 0;
    case TSR_CLI_O_NO_REPACK:
        /* the process-wide default too, so a draft model loaded later follows it */
        rp->no_repack = true;
        tsr_model_set_repack_default(false);
        return 0;
    case TSR_CLI_O_Q8_ORDER: {
        /* process-wide (kernels/q80_lanes.h), before any model loads: every rank parses it */
        bool on = false;
        if (!tsr_q80l_parse(arg, &on))
            return tsr_cli_usage_error(cmd, "--q8-order must be ggml or lanes, got '%s'", arg);
        tsr_q80l_set(on);
        return 0;
    }
    case TSR_CLI_O_GPU_MEMORY:
        if (!tsr_cli_parse_bytes(arg, &rp->gpu_memory) || rp->gpu_memory == 0)
            return tsr_cli_usage_error(cmd, "--gpu-memory needs a byte count (e.g. 20G), got '%s'",
                                       arg);
        return 0;
    case TSR_CLI_O_KV_TYPE:
        return tsr_cli_kv_type_flag(cmd, arg, rp);
    }
    return -1;
}

int tsr_cli_replica_open(const char *cmd, const char *model, const tsr_replica_params *rp,
                         tsr_replica **out)
{
    static atomic_bool said;
    const char *note = tsr_q80l_slow_note();
    if (note && !atomic_exchange(&said, true))
        fprintf(stderr, "tessera %s: warning: %s\n", cmd, note);
    char err[1024];
    if (tsr_replica_open(model, rp, out, err, sizeof err) != 0) {
        fprintf(stderr, "tessera %s: %s\n", cmd, err);
        return -1;
    }
    return 0;
}

int tsr_cli_kv_type_flag(const char *cmd, const char *arg, tsr_replica_params *rp)
{
    tsr_kv_type t;
    if (!tsr_kv_type_parse(arg, &t))
        return tsr_cli_usage_error(cmd, "--kv-type must be f32, f16 or q8_0, got '%s'", arg);
    rp->kv_type = arg;
    return 0;
}

/* ---- engine flags ---- */

void tsr_cli_engine_defaults(tsr_cli_engine_opts *o, int64_t max_batch_tokens, int64_t max_seqs)
{
    memset(o, 0, sizeof *o);
    o->max_batch_tokens = max_batch_tokens;
    o->max_seqs = max_seqs;
    o->n_threads = tsr_cli_default_threads();
}

static int int_flag(const char *cmd, const char *name, const char *arg, int64_t lo, int64_t hi,
                    int64_t *dst)
{
    if (!tsr_cli_parse_i64(arg, lo, hi, dst))
        return tsr_cli_usage_error(cmd, "%s needs an integer in %lld..%lld, got '%s'", name,
                                   (long long)lo, (long long)hi, arg);
    return 0;
}

int tsr_cli_engine_flag(const char *cmd, int c, const char *arg, tsr_cli_engine_opts *o)
{
    switch (c) {
    case TSR_CLI_O_MAX_BATCH:
        return int_flag(cmd, "--max-batch-tokens", arg, 1, 1 << 20, &o->max_batch_tokens);
    case TSR_CLI_O_MAX_SEQS:
        return int_flag(cmd, "--max-seqs", arg, 1, 1 << 16, &o->max_seqs);
    case 'c':
        return int_flag(cmd, "--ctx-size", arg, 1, 1 << 24, &o->n_ctx);
    case 't':
        return int_flag(cmd, "--threads", arg, 1, 256, &o->n_threads);
    case TSR_CLI_O_NO_PREFIX_CACHE:
        o->no_prefix_cache = true;
        return 0;
    case TSR_CLI_O_KV_MEMORY:
        if (!tsr_cli_parse_bytes(arg, &o->n_bytes_kv) || o->n_bytes_kv == 0)
            return tsr_cli_usage_error(
                cmd, "--kv-memory needs a byte count > 0 such as 512M or 2G, got '%s'", arg);
        return 0;
    }
    return -1;
}

/* ---- the flags of a generation ---- */

void tsr_cli_gen_defaults(tsr_cli_gen_opts *o, const char *default_model)
{
    memset(o, 0, sizeof *o);
    o->model = default_model;
    o->spec_k = 4;
    o->rp.tp = 1;
    o->rp.pp = 1;
    o->n_predict = 128;
    o->n_threads = tsr_cli_default_threads();
    tsr_sampling_params_default(&o->gp.sampling);
    o->gp.sampling.temperature = 0.8f;
    o->gp.sampling.top_k = 40;
    o->gp.sampling.top_p = 0.95f;
    o->gp.sampling.min_p = 0.05f;
}

static int float_flag(const char *cmd, const char *name, const char *arg, float *dst)
{
    if (!tsr_cli_parse_f32(arg, dst))
        return tsr_cli_usage_error(cmd, "%s needs a number, got '%s'", name, arg);
    return 0;
}

int tsr_cli_gen_flag(const char *cmd, int c, const char *arg, tsr_cli_gen_opts *o)
{
    tsr_sampling_params *sp = &o->gp.sampling;
    int64_t v;
    switch (c) {
    case 'm':
        o->model = arg;
        return 0;
    case 'n':
        return int_flag(cmd, "--max-tokens", arg, 0, 1 << 24, &o->n_predict);
    case 'c':
        return int_flag(cmd, "--ctx-size", arg, 1, 1 << 24, &o->n_ctx);
    case 't':
        return int_flag(cmd, "--threads", arg, 1, 256, &o->n_threads);
    case TSR_CLI_O_TEMP:
        return float_flag(cmd, "--temperature", arg, &sp->temperature);
    case TSR_CLI_O_TOPK:
        if (int_flag(cmd, "--top-k", arg, 0, INT32_MAX, &v)) return TSR_CLI_EXIT_USAGE;
        sp->top_k = (int32_t)v;
        return 0;
    case TSR_CLI_O_TOPP:
        return float_flag(cmd, "--top-p", arg, &sp->top_p);
    case TSR_CLI_O_MINP:
        return float_flag(cmd, "--min-p", arg, &sp->min_p);
    case TSR_CLI_O_REP:
        return float_flag(cmd, "--repetition-penalty", arg, &sp->repetition_penalty);
    case TSR_CLI_O_PRES:
        return float_flag(cmd, "--presence-penalty", arg, &sp->presence_penalty);
    case TSR_CLI_O_FREQ:
        return float_flag(cmd, "--frequency-penalty", arg, &sp->frequency_penalty);
    case TSR_CLI_O_SEED:
        if (!tsr_cli_parse_u64(arg, &sp->seed))
            return tsr_cli_usage_error(cmd, "--seed needs a non-negative integer, got '%s'", arg);
        o->seed_set = true;
        return 0;
    case TSR_CLI_O_STOP:
        if (o->n_stops == TSR_CLI_MAX_STOPS)
            return tsr_cli_usage_error(cmd, "at most %d --stop strings", TSR_CLI_MAX_STOPS);
        if (!*arg) return tsr_cli_usage_error(cmd, "--stop needs a non-empty string");
        o->stops[o->n_stops++] = arg;
        return 0;
    case TSR_CLI_O_IGNORE_EOS:
        o->gp.ignore_eos = true;
        return 0;
    case TSR_CLI_O_DRAFT:
        o->draft_model = arg;
        return 0;
    case TSR_CLI_O_SPEC:
        if (!strcmp(arg, "ngram"))
            o->spec_ngram = true;
        else if (!strncmp(arg, "oracle:", 7))
            o->spec_oracle = arg + 7;
        else if (strcmp(arg, "off") != 0)
            return tsr_cli_usage_error(
                cmd, "--spec takes 'ngram', 'oracle:PATH' or 'off', got '%s'", arg);
        return 0;
    case TSR_CLI_O_SPEC_K:
        return int_flag(cmd, "--spec-k", arg, 1, 16, &o->spec_k);
    }
    return tsr_cli_replica_flag(cmd, c, arg, &o->rp);
}

int tsr_cli_gen_finish(const char *cmd, tsr_cli_gen_opts *o)
{
    if (!o->seed_set) o->gp.sampling.seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    char err[512];
    if (tsr_sampling_params_validate(&o->gp.sampling, err, sizeof err) != 0)
        return tsr_cli_usage_error(cmd, "%s", err);
    if ((o->draft_model != NULL) + o->spec_ngram + (o->spec_oracle != NULL) > 1)
        return tsr_cli_usage_error(cmd, "choose one of --draft-model and --spec");
    o->gp.max_tokens = (int32_t)o->n_predict;
    o->gp.stop = o->stops;
    o->gp.n_stop = o->n_stops;
    o->rp.n_threads = (int)o->n_threads;
    o->rp.n_ctx = (int32_t)o->n_ctx;
    return 0;
}

int tsr_cli_gen_drafter(const tsr_cli_gen_opts *o, tsr_replica *rep, tsr_drafter **out, char *err,
                        size_t err_len)
{
    *out = NULL;
    if (o->spec_ngram) return tsr_drafter_ngram_new(1, 3, out, err, err_len);
    if (o->spec_oracle) return tsr_drafter_oracle_load(o->spec_oracle, out, err, err_len);
    if (o->draft_model)
        return tsr_drafter_model_new_for(o->draft_model, rep, tsr_replica_n_kv_blocks(rep) + 8,
                                         (int)o->n_threads, out, err, err_len);
    return 0;
}

/* ---- replica plumbing ---- */

int tsr_cli_follow(const char *cmd, tsr_replica *rep)
{
    char err[1024];
    if (tsr_replica_follow(rep, err, sizeof err) != 0) {
        fprintf(stderr, "tessera %s: rank %d: %s\n", cmd, tsr_replica_rank(rep), err);
        tsr_comm_mpi_abort(1);
        return 1;
    }
    if (tsr_replica_stats(rep, NULL, err, sizeof err) != 0) {
        fprintf(stderr, "tessera %s: rank %d: %s\n", cmd, tsr_replica_rank(rep), err);
        return 1;
    }
    tsr_replica_close(rep);
    return 0;
}

cJSON *tsr_cli_ranks_json(const tsr_rank_stats *st, int n)
{
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < n; i++) {
        cJSON *o = cJSON_CreateObject();
        double toks = st[i].n_tokens ? (double)st[i].n_tokens : 1.0;
        cJSON_AddNumberToObject(o, "rank", st[i].rank);
        cJSON_AddNumberToObject(o, "stage", st[i].stage);
        cJSON_AddNumberToObject(o, "tp_rank", st[i].tp_rank);
        cJSON_AddNumberToObject(o, "steps", (double)st[i].n_steps);
        cJSON_AddNumberToObject(o, "tokens", (double)st[i].n_tokens);
        cJSON_AddNumberToObject(o, "compute_ms", st[i].t_compute_ns / 1e6);
        cJSON_AddNumberToObject(o, "comm_ms", st[i].t_comm_ns / 1e6);
        cJSON_AddNumberToObject(o, "compute_us_per_token", st[i].t_compute_ns / 1e3 / toks);
        cJSON_AddNumberToObject(o, "comm_us_per_token", st[i].t_comm_ns / 1e3 / toks);
        cJSON_AddNumberToObject(o, "bytes_sent", (double)st[i].n_bytes_sent);
        cJSON_AddNumberToObject(o, "bytes_sent_per_token", (double)st[i].n_bytes_sent / toks);
        cJSON_AddNumberToObject(o, "bytes_loaded", (double)st[i].n_bytes_loaded);
        cJSON_AddItemToArray(a, o);
    }
    return a;
}

const char *tsr_cli_finish_name(int r)
{
    if (r == TSR_FINISH_CANCELLED) return "cancelled";
    if (r == TSR_FINISH_ERROR) return "error";
    return tsr_finish_reason_name((tsr_finish_reason)r);
}

/* ---- security flags ---- */

int tsr_cli_security_flag(int c, const char *arg, tsr_cli_security_opts *o)
{
    switch (c) {
    case TSR_CLI_O_API_KEYS:
        o->api_keys = arg;
        return 0;
    case TSR_CLI_O_ADMIN_KEYS:
        o->admin_keys = arg;
        return 0;
    case TSR_CLI_O_INSECURE:
        o->insecure = true;
        return 0;
    case TSR_CLI_O_TLS_CERT:
        o->tls_cert = arg;
        return 0;
    case TSR_CLI_O_TLS_KEY:
        o->tls_key = arg;
        return 0;
    case TSR_CLI_O_TLS_CLIENT_CA:
        o->tls_client_ca = arg;
        return 0;
    default:
        return -1;
    }
}

int tsr_cli_security_finish(const char *cmd, const tsr_cli_security_opts *o,
                            const char *const *listens, size_t n)
{
    if ((o->tls_cert != NULL) != (o->tls_key != NULL))
        return tsr_cli_usage_error(cmd, "--tls-cert and --tls-key go together");
    if (o->tls_client_ca && !o->tls_cert)
        return tsr_cli_usage_error(cmd, "--tls-client-ca needs --tls-cert and --tls-key");
    const char *open_addr = tsr_auth_open_address(listens, n);
    if (!o->api_keys && !o->admin_keys && !o->insecure && open_addr)
        return tsr_cli_usage_error(
            cmd,
            "refusing to serve %s without authentication: give --api-key-file (and "
            "--admin-key-file), or --insecure-listen to serve it open anyway",
            open_addr);
    return 0;
}

int tsr_cli_security_load(const tsr_cli_security_opts *o, tsr_auth **auth, tsr_tls_server *tls,
                          char *err, size_t err_len)
{
    *auth = NULL;
    memset(tls, 0, sizeof *tls);
    int rc = tsr_auth_new(o->api_keys, o->admin_keys, auth, err, err_len);
    if (rc != 0) goto fail;
    rc =
        tsr_tls_server_load("--tls-", o->tls_cert, o->tls_key, o->tls_client_ca, tls, err, err_len);
    if (rc != 0) goto fail;
    return 0;
fail:
    tsr_auth_free(*auth);
    *auth = NULL;
    tsr_tls_server_free(tls);
    return rc < 0 ? rc : -1;
}

int tsr_cli_client_security_flag(int c, const char *arg, tsr_cli_client_security_opts *o)
{
    switch (c) {
    case TSR_CLI_O_CLIENT_API_KEY:
        o->api_key_file = arg;
        return 0;
    case TSR_CLI_O_CLIENT_TLS_CA:
        o->tls_ca = arg;
        return 0;
    case TSR_CLI_O_CLIENT_TLS_CERT:
        o->tls_cert = arg;
        return 0;
    case TSR_CLI_O_CLIENT_TLS_KEY:
        o->tls_key = arg;
        return 0;
    default:
        return -1;
    }
}

bool tsr_cli_client_security_given(const tsr_cli_client_security_opts *o)
{
    return o->api_key_file || o->tls_ca || o->tls_cert || o->tls_key;
}

int tsr_cli_client_security_finish(const char *cmd, const tsr_cli_client_security_opts *o)
{
    if ((o->tls_cert != NULL) != (o->tls_key != NULL))
        return tsr_cli_usage_error(cmd, "--tls-cert and --tls-key go together");
    if (o->tls_cert && !o->tls_ca)
        return tsr_cli_usage_error(
            cmd, "--tls-cert / --tls-key need --tls-ca (the CA of the server's certificate)");
    return 0;
}

int tsr_cli_client_security_load(const tsr_cli_client_security_opts *o, const char *env_name,
                                 char **authorization, tsr_tls_client *tls, char *err,
                                 size_t err_len)
{
    *authorization = NULL;
    memset(tls, 0, sizeof *tls);
    int rc = tsr_auth_client_header("--api-key-file", o->api_key_file, env_name, authorization, err,
                                    err_len);
    if (rc == 0)
        rc = tsr_tls_client_load("--tls-", o->tls_ca, o->tls_cert, o->tls_key, tls, err, err_len);
    if (rc != 0) {
        free(*authorization);
        *authorization = NULL;
        tsr_tls_client_free(tls);
        return rc < 0 ? rc : -1;
    }
    return 0;
}
