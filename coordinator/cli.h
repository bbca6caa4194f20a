/*
 * cli.h — what every `tessera` subcommand needs to read its flags: number parsing that
 * rejects garbage, the usage-error convention (a message, a pointer to --help, exit
 * status 2) and the default thread count. Shared by coordinator/main.c and serve.c.
 *
 * It also holds the security flags (keys and TLS) of the servers (`serve`, `coordinator`)
 * and of the clients (`ctl`, `batch --coordinator`), so each is parsed, checked and
 * documented once. And the flags of a generation (`generate`, `chat`, ...): sampling, stop
 * strings, speculation, threads, context and the distributed layout, parsed once here so
 * every subcommand that generates takes the same flags with the same checks, plus the
 * replica plumbing those subcommands share (follower loop, per-rank stats as JSON).
 */
#ifndef TSR_CLI_H
#define TSR_CLI_H

#include <getopt.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "coordinator/auth.h"
#include "coordinator/drafter.h"
#include "coordinator/generate.h"
#include "coordinator/tls.h"
#include "worker/replica.h"

#define TSR_CLI_EXIT_USAGE 2

/* Prints "tessera CMD: <message>" and "Run 'tessera CMD --help' for the flags." on stderr;
 * returns TSR_CLI_EXIT_USAGE for the caller to return from main. */
int tsr_cli_usage_error(const char *cmd, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Whole strings only: trailing characters, overflow or an out-of-range value give false. */
bool tsr_cli_parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out);
bool tsr_cli_parse_u64(const char *s, uint64_t *out); /* no sign */
bool tsr_cli_parse_f32(const char *s, float *out);    /* finite */
/* "123", "64K", "512M", "2G", "2GiB", "1.5G" -> bytes (K, M, G, T = 1024^n). */
bool tsr_cli_parse_bytes(const char *s, uint64_t *out);

/* A network address "HOST:PORT" (IPv6: "[::1]:PORT"): a non-empty host, then a port of
 * 1..5 decimal digits in 0..65535 (0: the system picks a free port); nothing else ("", ":1",
 * "h:", "h:65537", "h:+1", "h:1x" are false). When host is not NULL it receives the host
 * part (brackets kept, truncated to host_cap - 1 bytes); *port the port. Every command
 * that takes an address (--listen, ...) parses it with this. */
bool tsr_cli_parse_hostport(const char *s, char *host, size_t host_cap, int32_t *port);

/* Online cores, clamped to 1..64. */
int tsr_cli_default_threads(void);

/* ---- the distributed layout: --tp, --pp, --layers, --comm-timeout ---- */

/* --kv-type, also taken by serve and batch (which list their own flags). */
#define TSR_CLI_KV_TYPE_HELP                                                                       \
    "      --kv-type f32|f16|q8_0  element type of the KV cache (default f16, f32 on CUDA; f16\n"  \
    "                              halves f32, q8_0 is 34/128 of it; CUDA: f32 or f16)\n"

#define TSR_CLI_REPLICA_HELP                                                                       \
    "\ndistributed (run under 'mpirun -np TP*PP' or 'srun -n TP*PP'):\n"                           \
    "      --tp N                  tensor-parallel ranks per stage (default 1)\n"                  \
    "      --pp N                  pipeline stages (default 1)\n"                                  \
    "      --layers A-B,C-D        layers of each stage (default: balanced by cost)\n"             \
    "      --comm-timeout MS       deadline of every wait between ranks (default 30000)\n"         \
    "      --device cpu|cuda|auto  compute backend of every rank (default $TESSERA_DEVICE, else\n" \
    "                              auto: cuda when every rank sees a GPU; a rank uses GPU\n"       \
    "                              local-rank mod count)\n" TSR_CLI_KV_TYPE_HELP                   \
    "      --gpu-memory BYTES      device memory per rank for weights + KV + buffers (default:\n"  \
    "                              what is free; K/M/G suffixes); the planner fits layouts in "    \
    "it\n"                                                                                         \
    "      --no-repack             keep the weights in the file's layout only (default: each\n"    \
    "                              CPU rank also repacks its quantized tiles at load for\n"        \
    "                              faster batches: same results, a private copy of them)\n"        \
    "      --q8-order ggml|lanes   summation order of Q8_0 matrices (default ggml: llama.cpp's\n"  \
    "                              bits; lanes: whole-block integer sums, ~2x faster several-\n"   \
    "                              token steps on AVX-512 VNNI, other last bits; CPU ranks\n"      \
    "                              that repack; README: Q8_0 orders)\n"

enum {
    TSR_CLI_O_TP = 300,
    TSR_CLI_O_PP,
    TSR_CLI_O_LAYERS,
    TSR_CLI_O_COMM_TIMEOUT,
    TSR_CLI_O_DEVICE,
    TSR_CLI_O_GPU_MEMORY,
    TSR_CLI_O_KV_TYPE,
    TSR_CLI_O_NO_REPACK,
    TSR_CLI_O_Q8_ORDER
};

/* struct option entries (getopt_long) of the layout flags. */
#define TSR_CLI_REPLICA_OPTS                                                                       \
    {"tp", required_argument, 0, TSR_CLI_O_TP}, {"pp", required_argument, 0, TSR_CLI_O_PP},        \
        {"layers", required_argument, 0, TSR_CLI_O_LAYERS},                                        \
        {"comm-timeout", required_argument, 0, TSR_CLI_O_COMM_TIMEOUT},                            \
        {"device", required_argument, 0, TSR_CLI_O_DEVICE},                                        \
        {"kv-type", required_argument, 0, TSR_CLI_O_KV_TYPE},                                      \
        {"no-repack", no_argument, 0, TSR_CLI_O_NO_REPACK},                                        \
        {"q8-order", required_argument, 0, TSR_CLI_O_Q8_ORDER},                                    \
    {                                                                                              \
        "gpu-memory", required_argument, 0, TSR_CLI_O_GPU_MEMORY                                   \
    }

/* Parse layout flag c (argument arg) into rp (--kv-type included): -1 when c is not one, 0
 * ok, 2 usage error (printed). */
int tsr_cli_replica_flag(const char *cmd, int c, const char *arg, tsr_replica_params *rp);
/* Open the replica of `cmd` (tsr_replica_open) on this rank: 0, or -1 after printing the
 * error as "tessera CMD: ...". Before it, tsr_q80l_slow_note() (kernels/q80_lanes.h) as a
 * warning to stderr, once per process, when there is one: the lanes order of Q8_0, from
 * --q8-order lanes or TSR_Q80_ORDER=lanes, on a CPU that runs it as a scalar loop. */
int tsr_cli_replica_open(const char *cmd, const char *model, const tsr_replica_params *rp,
                         tsr_replica **out);
/* --kv-type's argument into rp->kv_type: 0, or 2 after printing the usage error. */
int tsr_cli_kv_type_flag(const char *cmd, const char *arg, tsr_replica_params *rp);

/* ---- engine flags: the serving engine's sizes, shared by `serve` and `batch` ---- */

/* One block of help for the engine flags. The commands' defaults differ (a server keeps
 * latency low, a batch job fills the machine), so they come in as strings; kv_default is
 * the text after "Default:" for --kv-memory. New engine flags (--kv-type, ...)
 * go here, in TSR_CLI_ENGINE_OPTS, tsr_cli_engine_opts and tsr_cli_engine_flag. */
#define TSR_CLI_ENGINE_HELP(max_batch, max_seqs, kv_default)                                       \
    "      --max-batch-tokens N  token budget of one engine step: decode tokens plus\n"            \
    "                            prefill chunks (default " max_batch ")\n"                         \
    "      --max-seqs N          sequences running at once (default " max_seqs ")\n"               \
    "      --kv-memory BYTES     KV cache budget of the whole replica, e.g. 512M, 2G\n"            \
    "                            (suffixes K, M, G = 1024^n). One block of 16 tokens costs\n"      \
    "                            n_layer x 2 x n_head_kv x head_dim x 16 values of\n"              \
    "                            --kv-type (4, 2 or 34/32 bytes each); each\n"                     \
    "                            rank holds its share of every block. Default:\n"                  \
    "                            " kv_default "\n"                                                 \
    "  -c, --ctx-size N          tokens per sequence, prompt + output (default: the\n"             \
    "                            model's, max 4096)\n"                                             \
    "  -t, --threads N           CPU threads per rank (default: all cores)\n"                      \
    "      --no-prefix-cache     compute every prompt in full (default: KV blocks of full\n"       \
    "                            16-token prompt blocks stay cached, and later requests\n"         \
    "                            with the same prefix reuse them)\n"

enum {
    TSR_CLI_O_MAX_BATCH = 340,
    TSR_CLI_O_MAX_SEQS,
    TSR_CLI_O_KV_MEMORY,
    TSR_CLI_O_NO_PREFIX_CACHE,
};

/* Short options of the engine flags (append the command's own). */
#define TSR_CLI_ENGINE_SHORTOPTS "c:t:"

/* struct option entries (getopt_long) of the engine flags. */
/* clang-format off */
#define TSR_CLI_ENGINE_OPTS                                                                        \
    {"max-batch-tokens", required_argument, 0, TSR_CLI_O_MAX_BATCH},                               \
    {"max-seqs", required_argument, 0, TSR_CLI_O_MAX_SEQS},                                        \
    {"kv-memory", required_argument, 0, TSR_CLI_O_KV_MEMORY},                                      \
    {"ctx-size", required_argument, 0, 'c'},                                                       \
    {"threads", required_argument, 0, 't'},                                                        \
    {"no-prefix-cache", no_argument, 0, TSR_CLI_O_NO_PREFIX_CACHE}
/* clang-format on */

/* What the engine flags say. */
typedef struct {
    int64_t max_batch_tokens; /* token budget of one step */
    int64_t max_seqs;         /* sequences running at once */
    uint64_t n_bytes_kv;      /* --kv-memory; 0: the command's default sizing */
    int64_t n_ctx;            /* 0: the model's, at most 4096 */
    int64_t n_threads;        /* per rank */
    bool no_prefix_cache;     /* --no-prefix-cache */
} tsr_cli_engine_opts;

/* Defaults: the command's batch budget and sequences, no KV budget, the model's context,
 * every core. */
void tsr_cli_engine_defaults(tsr_cli_engine_opts *o, int64_t max_batch_tokens, int64_t max_seqs);
/* Parse engine flag c (getopt's optarg in arg): -1 when c is not one, 0 ok, 2 usage error
 * (printed). */
int tsr_cli_engine_flag(const char *cmd, int c, const char *arg, tsr_cli_engine_opts *o);

/* ---- security flags of a server (`serve`, `coordinator`): keys and TLS ---- */

/* clang-format off */
#define TSR_CLI_SECURITY_HELP                                                                      \
    "      --api-key-file FILE   inference needs 'Authorization: Bearer KEY' (gRPC: the\n"         \
    "                            'authorization' metadata) with a key of FILE, one per line;\n"    \
    "                            SIGHUP re-reads the key files\n"                                  \
    "      --admin-key-file FILE keys for the admin services (Admin; Cluster: ctl and replica\n"   \
    "                            heartbeats) and /metrics; they also work for inference\n"         \
    "      --insecure-listen     allow non-loopback addresses without key files\n"                 \
    "      --tls-cert FILE       serve TLS (gRPC and HTTPS) with this PEM certificate chain\n"     \
    "      --tls-key FILE        and this PEM private key (unencrypted)\n"                         \
    "      --tls-client-ca FILE  mutual TLS: clients need a certificate signed by this CA\n"

enum {
    TSR_CLI_O_API_KEYS = 380,
    TSR_CLI_O_ADMIN_KEYS,
    TSR_CLI_O_INSECURE,
    TSR_CLI_O_TLS_CERT,
    TSR_CLI_O_TLS_KEY,
    TSR_CLI_O_TLS_CLIENT_CA,
};

#define TSR_CLI_SECURITY_OPTS                                                                      \
    {"api-key-file", required_argument, 0, TSR_CLI_O_API_KEYS},                                    \
    {"admin-key-file", required_argument, 0, TSR_CLI_O_ADMIN_KEYS},                                \
    {"insecure-listen", no_argument, 0, TSR_CLI_O_INSECURE},                                       \
    {"tls-cert", required_argument, 0, TSR_CLI_O_TLS_CERT},                                        \
    {"tls-key", required_argument, 0, TSR_CLI_O_TLS_KEY},                                          \
    {"tls-client-ca", required_argument, 0, TSR_CLI_O_TLS_CLIENT_CA}
/* clang-format on */

/* What the security flags say (paths point into argv; NULL: not given). */
typedef struct {
    const char *api_keys, *admin_keys;              /* --api-key-file, --admin-key-file */
    const char *tls_cert, *tls_key, *tls_client_ca; /* --tls-cert, --tls-key, --tls-client-ca */
    bool insecure;                                  /* --insecure-listen */
} tsr_cli_security_opts;

/* Parse security flag c (getopt's optarg in arg) into o (zeroed before the first flag): -1
 * when c is not one, 0 ok. */
int tsr_cli_security_flag(int c, const char *arg, tsr_cli_security_opts *o);
/* After the last flag: --tls-cert and --tls-key together, --tls-client-ca only with them,
 * and no open address among listens[0..n) (NULL entries skipped) without key files unless
 * --insecure-listen. 0, or 2 after printing the usage error. */
int tsr_cli_security_finish(const char *cmd, const tsr_cli_security_opts *o,
                            const char *const *listens, size_t n);
/* Read and check the files: *auth the keys (NULL without key files; tsr_auth_free), *tls the
 * TLS material (tsr_tls_server_free; empty without --tls-cert). 0, or negative with err
 * naming the flag and the file (nothing is left allocated). */
int tsr_cli_security_load(const tsr_cli_security_opts *o, tsr_auth **auth, tsr_tls_server *tls,
                          char *err, size_t err_len);

/* ---- security flags of a client (`ctl`, `batch --coordinator`) ---- */

/* clang-format off */
#define TSR_CLI_CLIENT_SECURITY_HELP                                                               \
    "      --api-key-file FILE   send the first key of FILE as 'authorization: Bearer KEY'\n"      \
    "                            (without it: the key in $TESSERA_API_KEY if set)\n"               \
    "      --tls-ca FILE         connect with TLS, verifying the server's certificate with\n"      \
    "                            this CA (PEM)\n"                                                  \
    "      --tls-cert FILE       mutual TLS: this client certificate (PEM) ...\n"                  \
    "      --tls-key FILE        ... and its unencrypted key (PEM)\n"

enum {
    TSR_CLI_O_CLIENT_API_KEY = 390,
    TSR_CLI_O_CLIENT_TLS_CA,
    TSR_CLI_O_CLIENT_TLS_CERT,
    TSR_CLI_O_CLIENT_TLS_KEY,
};

#define TSR_CLI_CLIENT_SECURITY_OPTS                                                               \
    {"api-key-file", required_argument, 0, TSR_CLI_O_CLIENT_API_KEY},                              \
    {"tls-ca", required_argument, 0, TSR_CLI_O_CLIENT_TLS_CA},                                     \
    {"tls-cert", required_argument, 0, TSR_CLI_O_CLIENT_TLS_CERT},                                 \
    {"tls-key", required_argument, 0, TSR_CLI_O_CLIENT_TLS_KEY}
/* clang-format on */

/* What a client's security flags say (paths point into argv; NULL: not given). */
typedef struct {
    const char *api_key_file, *tls_ca, *tls_cert, *tls_key;
} tsr_cli_client_security_opts;

/* Parse client security flag c into o (zeroed before the first flag): -1 when c is not one,
 * 0 ok. */
int tsr_cli_client_security_flag(int c, const char *arg, tsr_cli_client_security_opts *o);
/* Was any of them given? */
bool tsr_cli_client_security_given(const tsr_cli_client_security_opts *o);
/* After the last flag: --tls-cert and --tls-key together, and only with --tls-ca. 0, or 2
 * after printing the usage error. */
int tsr_cli_client_security_finish(const char *cmd, const tsr_cli_client_security_opts *o);
/* Read the files: *authorization "Bearer KEY" from --api-key-file, else from $env_name (may
 * be NULL), else NULL (free it); *tls the client's TLS material (tsr_tls_client_free). 0, or
 * negative with err naming the flag and the file (nothing is left allocated). */
int tsr_cli_client_security_load(const tsr_cli_client_security_opts *o, const char *env_name,
                                 char **authorization, tsr_tls_client *tls, char *err,
                                 size_t err_len);

/* ---- the flags of a generation ---- */

#define TSR_CLI_MAX_STOPS 16

/* Every flag `generate` takes besides -p (and --json, which each command documents). */
#define TSR_CLI_GEN_HELP(default_model)                                                            \
    "  -m, --model PATH            GGUF model (default " default_model ")\n"                       \
    "  -n, --max-tokens N          tokens to generate (default 128)\n"                             \
    "      --temperature T         0 = greedy; default 0.8\n"                                      \
    "      --top-k K               keep the K most likely tokens (0 = off, default 40)\n"          \
    "      --top-p P               nucleus sampling, (0, 1] (default 0.95)\n"                      \
    "      --min-p P               drop tokens below P x the top probability (default 0.05)\n"     \
    "      --repetition-penalty R  > 0, 1 = off (vLLM semantics; default 1)\n"                     \
    "      --presence-penalty X    [-2, 2] (OpenAI semantics; default 0)\n"                        \
    "      --frequency-penalty X   [-2, 2] (OpenAI semantics; default 0)\n"                        \
    "      --seed S                random seed (default: from the clock); the same seed and\n"     \
    "                              input give the same output\n"                                   \
    "      --stop STR              stop before STR (repeatable); STR is not printed\n"             \
    "      --ignore-eos            keep going past end-of-generation tokens\n"                     \
    "      --draft-model PATH      speculative decoding with a draft model (same vocabulary)\n"    \
    "      --spec ngram            speculative decoding with n-gram prompt lookup\n"               \
    "      --spec oracle:PATH      (benchmarks) an oracle proposing the tokens of a\n"             \
    "                              'generate --json' output: the ceiling of speculation\n"         \
    "      --spec-k K              most draft tokens per step (default 4; adapts below)\n"         \
    "  -c, --ctx-size N            context size in tokens (default: the model's, max 4096)\n"      \
    "  -t, --threads N             CPU threads per rank (default: all cores)\n"

enum {
    TSR_CLI_O_TEMP = 256,
    TSR_CLI_O_TOPK,
    TSR_CLI_O_TOPP,
    TSR_CLI_O_MINP,
    TSR_CLI_O_REP,
    TSR_CLI_O_PRES,
    TSR_CLI_O_FREQ,
    TSR_CLI_O_SEED,
    TSR_CLI_O_STOP,
    TSR_CLI_O_IGNORE_EOS,
    TSR_CLI_O_DRAFT,
    TSR_CLI_O_SPEC,
    TSR_CLI_O_SPEC_K,
};

/* Short options of the generation flags (append the command's own). */
#define TSR_CLI_GEN_SHORTOPTS "m:n:c:t:"

/* struct option entries of the generation flags, the layout flags included. */
#define TSR_CLI_GEN_OPTS                                                                           \
    {"model", required_argument, 0, 'm'}, {"max-tokens", required_argument, 0, 'n'},               \
        {"n-predict", required_argument, 0, 'n'},                                                  \
        {"temperature", required_argument, 0, TSR_CLI_O_TEMP},                                     \
        {"temp", required_argument, 0, TSR_CLI_O_TEMP},                                            \
        {"top-k", required_argument, 0, TSR_CLI_O_TOPK},                                           \
        {"top-p", required_argument, 0, TSR_CLI_O_TOPP},                                           \
        {"min-p", required_argument, 0, TSR_CLI_O_MINP},                                           \
        {"repetition-penalty", required_argument, 0, TSR_CLI_O_REP},                               \
        {"presence-penalty", required_argument, 0, TSR_CLI_O_PRES},                                \
        {"frequency-penalty", required_argument, 0, TSR_CLI_O_FREQ},                               \
        {"seed", required_argument, 0, TSR_CLI_O_SEED},                                            \
        {"stop", required_argument, 0, TSR_CLI_O_STOP},                                            \
        {"ignore-eos", no_argument, 0, TSR_CLI_O_IGNORE_EOS},                                      \
        {"draft-model", required_argument, 0, TSR_CLI_O_DRAFT},                                    \
        {"spec", required_argument, 0, TSR_CLI_O_SPEC},                                            \
        {"spec-k", required_argument, 0, TSR_CLI_O_SPEC_K},                                        \
        {"ctx-size", required_argument, 0, 'c'}, {"threads", required_argument, 0, 't'},           \
        TSR_CLI_REPLICA_OPTS

/* What the generation flags say. Strings point into argv (not copied). */
typedef struct {
    const char *model;
    const char *draft_model; /* --draft-model */
    bool spec_ngram;         /* --spec ngram */
    const char *spec_oracle; /* --spec oracle:PATH */
    int64_t spec_k;
    tsr_replica_params rp; /* tp, pp, layers, comm timeout; n_threads and n_ctx after
                              tsr_cli_gen_finish */
    int64_t n_predict, n_ctx, n_threads;
    bool seed_set;
    const char *stops[TSR_CLI_MAX_STOPS];
    size_t n_stops;
    tsr_gen_params gp; /* sampling (generate's defaults), max_tokens and stops after finish */
} tsr_cli_gen_opts;

/* generate's defaults: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, 128 tokens. */
void tsr_cli_gen_defaults(tsr_cli_gen_opts *o, const char *default_model);
/* Parse generation flag c (getopt's optarg in arg): -1 when c is not one, 0 ok, 2 usage
 * error (printed). */
int tsr_cli_gen_flag(const char *cmd, int c, const char *arg, tsr_cli_gen_opts *o);
/* After the last flag: seed from the clock unless --seed, validate the sampling
 * parameters and the speculation choice, fill gp (max_tokens, stops) and rp (n_threads,
 * n_ctx). 0, or 2 after printing the usage error. */
int tsr_cli_gen_finish(const char *cmd, tsr_cli_gen_opts *o);
/* The drafter the flags ask for (NULL when none) for a replica opened on rep; 0 or < 0
 * with err. */
int tsr_cli_gen_drafter(const tsr_cli_gen_opts *o, tsr_replica *rep, tsr_drafter **out, char *err,
                        size_t err_len);

/* ---- replica plumbing ---- */

/* A follower's life: serve steps until shutdown, then the stats collective. Returns the
 * exit status (1 after printing the error). */
int tsr_cli_follow(const char *cmd, tsr_replica *rep);
/* Per-rank stats as a JSON array (rank, stage, tp_rank, steps, tokens, compute/comm ms,
 * bytes). The caller owns the result. */
cJSON *tsr_cli_ranks_json(const tsr_rank_stats *st, int n);
/* "length", "stop", "eos", "cancelled", "error". */
const char *tsr_cli_finish_name(int reason);

#endif
