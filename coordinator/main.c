/*
 * main.c — the `tessera` command line: inspect, tokenize, generate, mkmodel, bench.
 *
 * Each subcommand parses its own flags (getopt_long) and documents every flag in its
 * --help. Exit status: 0 ok, 1 runtime error (bad model file, out of memory, ...),
 * 2 usage error (unknown flag, bad value) — with a message that says what to fix.
 */
#include "coordinator/batch.h"
#include "coordinator/chat.h"
#include "coordinator/cli.h"
#include "coordinator/drafter.h"
#include "kernels/util.h"
#include "coordinator/engine.h"
#include "coordinator/generate.h"
#include "coordinator/sampler.h"
#include "coordinator/server.h"
#include "coordinator/coord_server.h"
#include "kernels/dot_ggml.h"
#include "kernels/membw.h"
#include "kernels/q80_lanes.h"
#include "kernels/quant.h"
#include "shard/gguf.h"
#include "shard/mkmodel.h"
#include "shard/vocab.h"
#include "worker/model.h"
#include "worker/replica.h"

#include <cjson/cJSON.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_MODEL "../shared/models/stories260K.gguf"

#define REPLICA_HELP TSR_CLI_REPLICA_HELP

static const char *g_prog = "tessera";

#define INT_FLAG(cmd, name, lo, hi, dst)                                                           \
    do {                                                                                           \
        int64_t v_;                                                                                \
        if (!tsr_cli_parse_i64(optarg, lo, hi, &v_))                                               \
            return tsr_cli_usage_error(cmd, "%s needs an integer in %lld..%lld, got '%s'", name,   \
                                       (long long)(lo), (long long)(hi), optarg);                  \
        (dst) = v_;                                                                                \
    } while (0)

#define FLOAT_FLAG(cmd, name, dst)                                                                 \
    do {                                                                                           \
        if (!tsr_cli_parse_f32(optarg, &(dst)))                                                    \
            return tsr_cli_usage_error(cmd, "%s needs a number, got '%s'", name, optarg);          \
    } while (0)

/* ---- inspect ---- */

static const char *inspect_help =
    "usage: tessera inspect FILE\n"
    "\n"
    "Print a GGUF file's header: version, every metadata key (arrays as their type,\n"
    "length and first elements) and the tensor table (name, type, shape, offset, bytes),\n"
    "whatever the file's architecture and tensor types (bytes '?' for a type id ggml does\n"
    "not define), then whether Tessera can run it: 'tessera can run this file: yes', or\n"
    "'no — ' and the reason (a tensor type it cannot compute with, an architecture or\n"
    "hyperparameter the model loader refuses). The file is fully validated first; a corrupt\n"
    "file is reported with the field at fault.\n"
    "\n"
    "  -h, --help   this help\n";

static void print_str(const tsr_gguf_str *s, size_t max)
{
    putchar('"');
    for (uint64_t i = 0; i < s->len && i < max; i++) {
        unsigned char ch = (unsigned char)s->ptr[i];
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch == '\n')
            printf("\\n");
        else if (ch < 0x20)
            printf("\\x%02x", ch);
        else
            putchar(ch);
    }
    putchar('"');
    if (s->len > max) printf("... (%" PRIu64 " bytes)", s->len);
}

static void print_scalar_at(const tsr_gguf *g, int64_t i, int64_t j, tsr_gguf_vtype t)
{
    int64_t iv;
    double fv;
    tsr_gguf_str sv;
    if (t == TSR_GGUF_STRING) {
        if (j < 0 ? tsr_gguf_kv_str(g, i, &sv) : tsr_gguf_arr_str(g, i, (uint64_t)j, &sv))
            print_str(&sv, j < 0 ? 200 : 40);
    } else if (t == TSR_GGUF_FLOAT32 || t == TSR_GGUF_FLOAT64) {
        if (j < 0 ? tsr_gguf_kv_float(g, i, &fv) : tsr_gguf_arr_float(g, i, (uint64_t)j, &fv))
            printf("%.9g", fv);
    } else if (t == TSR_GGUF_BOOL) {
        if (j < 0 ? tsr_gguf_kv_int(g, i, &iv) : tsr_gguf_arr_int(g, i, (uint64_t)j, &iv))
            printf("%s", iv ? "true" : "false");
    } else if (t == TSR_GGUF_UINT64) {
        if (j < 0 ? tsr_gguf_kv_int(g, i, &iv) : tsr_gguf_arr_int(g, i, (uint64_t)j, &iv))
            printf("%" PRId64, iv);
        else
            printf("(> INT64_MAX)");
    } else if (t != TSR_GGUF_ARRAY) {
        if (j < 0 ? tsr_gguf_kv_int(g, i, &iv) : tsr_gguf_arr_int(g, i, (uint64_t)j, &iv))
            printf("%" PRId64, iv);
    } else {
        printf("[...]");
    }
}

static int cmd_inspect(int argc, char **argv)
{
    static const struct option opts[] = {{"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        if (c == 'h') {
            fputs(inspect_help, stdout);
            return 0;
        }
        return tsr_cli_usage_error("inspect", "unknown flag");
    }
    if (optind != argc - 1) return tsr_cli_usage_error("inspect", "needs exactly one FILE");
    char err[512];
    tsr_gguf *g;
    if (tsr_gguf_open_ex(argv[optind], TSR_GGUF_OPEN_ANY_TYPE, &g, err, sizeof err) != 0) {
        fprintf(stderr, "tessera inspect: %s\n", err);
        return 1;
    }
    printf("file: %s\nGGUF version: %u\nfile size: %" PRIu64 " bytes\nalignment: %" PRIu64
           "\ndata offset: %" PRIu64 "\n",
           argv[optind], tsr_gguf_version(g), tsr_gguf_file_size(g), tsr_gguf_alignment(g),
           tsr_gguf_data_offset(g));
    printf("\nmetadata (%" PRId64 " keys):\n", tsr_gguf_n_kv(g));
    for (int64_t i = 0; i < tsr_gguf_n_kv(g); i++) {
        tsr_gguf_vtype t = tsr_gguf_kv_type(g, i);
        tsr_gguf_vtype et;
        uint64_t n;
        printf("  %-45s ", tsr_gguf_kv_key(g, i));
        if (tsr_gguf_kv_arr(g, i, &et, &n)) {
            printf("arr[%s; %" PRIu64 "] = [", tsr_gguf_vtype_name(et), n);
            for (uint64_t j = 0; j < n && j < 8; j++) {
                if (j) printf(", ");
                print_scalar_at(g, i, (int64_t)j, et);
            }
            printf(n > 8 ? ", ...]\n" : "]\n");
        } else {
            printf("%-6s = ", tsr_gguf_vtype_name(t));
            print_scalar_at(g, i, -1, t);
            putchar('\n');
        }
    }
    printf("\ntensors (%" PRId64 "):\n", tsr_gguf_n_tensors(g));
    printf("  %-4s %-32s %-7s %-26s %12s %12s\n", "#", "name", "type", "shape", "offset", "bytes");
    uint64_t total = 0;
    for (int64_t i = 0; i < tsr_gguf_n_tensors(g); i++) {
        const tsr_gguf_tensor *t = tsr_gguf_tensor_at(g, i);
        char shape[96];
        int k = snprintf(shape, sizeof shape, "[");
        for (uint32_t d = 0; d < t->n_dims; d++)
            k += snprintf(shape + k, sizeof shape - (size_t)k, "%s%" PRId64, d ? ", " : "",
                          t->ne[d]);
        snprintf(shape + k, sizeof shape - (size_t)k, "]");
        char bytes[24] = "?"; /* a type id ggml does not define: size unknown */
        if (t->n_bytes) snprintf(bytes, sizeof bytes, "%" PRIu64, t->n_bytes);
        char type[32];
        snprintf(type, sizeof type, "%s", tsr_type_name(t->type));
        if (strcmp(type, "unknown") == 0) snprintf(type, sizeof type, "id %u", t->type);
        printf("  %-4" PRId64 " %-32s %-7s %-26s %12" PRIu64 " %12s\n", i, t->name, type, shape,
               t->offset, bytes);
        total += t->n_bytes;
    }
    printf("  total tensor data: %" PRIu64 " bytes (%.2f MiB)\n", total, total / 1048576.0);
    /* What Tessera cannot run: tensor types first (a clearer reason than the loader's),
     * then whatever the model loader refuses (architecture, hyperparameters, tensors). */
    tsr_model *m = NULL;
    if (tsr_gguf_check_types(g, err, sizeof err) == 0 &&
        tsr_model_load(g, &m, err, sizeof err) == 0) {
        printf("\ntessera can run this file: yes\n");
        tsr_model_free(m);
    } else {
        printf("\ntessera can run this file: no — %s\n", err);
    }
    tsr_gguf_close(g);
    return 0;
}

/* ---- shared model opening ---- */

typedef struct {
    tsr_gguf *g;
    tsr_vocab *vocab;
    tsr_model *model;
    tsr_ctx *ctx;
} loaded;

static void unload(loaded *l)
{
    tsr_ctx_free(l->ctx);
    tsr_model_free(l->model);
    tsr_vocab_free(l->vocab);
    tsr_gguf_close(l->g);
    memset(l, 0, sizeof *l);
}

/* Open the file and its vocabulary; with want_model also the weights and a context. */
static int load(const char *cmd, const char *path, bool want_model, int32_t n_ctx, int n_threads,
                loaded *l)
{
    char err[512];
    memset(l, 0, sizeof *l);
    if (tsr_gguf_open(path, &l->g, err, sizeof err) != 0) goto fail;
    if (tsr_vocab_load(l->g, &l->vocab, err, sizeof err) != 0) goto fail;
    if (want_model) {
        if (tsr_model_load(l->g, &l->model, err, sizeof err) != 0) goto fail;
        if (tsr_vocab_n_tokens(l->vocab) != l->model->hp.n_vocab) {
            snprintf(err, sizeof err,
                     "the vocabulary has %d tokens but token_embd.weight has %d rows",
                     tsr_vocab_n_tokens(l->vocab), l->model->hp.n_vocab);
            goto fail;
        }
        if (tsr_ctx_new(l->model, n_ctx, 0, n_threads, &l->ctx, err, sizeof err) != 0) goto fail;
    }
    return 0;
fail:
    fprintf(stderr, "tessera %s: %s\n", cmd, err);
    unload(l);
    return 1;
}

/* ---- tokenize ---- */

static const char *tokenize_help =
    "usage: tessera tokenize -m MODEL [--no-bos] [--special] TEXT\n"
    "\n"
    "Print the token ids of TEXT on one line, separated by spaces. Works on any GGUF with\n"
    "a vocabulary, including vocabulary-only files (no tensors).\n"
    "\n"
    "  -m, --model PATH  GGUF file (default " DEFAULT_MODEL ")\n"
    "      --no-bos      add no BOS/EOS tokens, and do not parse special-token text\n"
    "                    (e.g. '<s>' is tokenized as plain text)\n"
    "      --special     parse special-token text such as '<s>' as the special token\n"
    "                    (default: on, unless --no-bos)\n"
    "  -h, --help        this help\n";

static int cmd_tokenize(int argc, char **argv)
{
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                         {"no-bos", no_argument, 0, 'B'},
                                         {"special", no_argument, 0, 'S'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *model = DEFAULT_MODEL;
    bool add_special = true;
    int parse_special = -1;
    int c;
    while ((c = getopt_long(argc, argv, "m:h", opts, NULL)) != -1) {
        switch (c) {
        case 'm':
            model = optarg;
            break;
        case 'B':
            add_special = false;
            break;
        case 'S':
            parse_special = 1;
            break;
        case 'h':
            fputs(tokenize_help, stdout);
            return 0;
        default:
            return tsr_cli_usage_error("tokenize", "unknown flag");
        }
    }
    if (optind != argc - 1)
        return tsr_cli_usage_error("tokenize", "needs exactly one TEXT argument");
    if (parse_special < 0) parse_special = add_special;
    loaded l;
    if (load("tokenize", model, false, 0, 1, &l) != 0) return 1;
    const char *text = argv[optind];
    int32_t *ids = NULL;
    size_t n = 0;
    char err[512];
    if (tsr_vocab_tokenize(l.vocab, text, strlen(text), add_special, parse_special, &ids, &n, err,
                           sizeof err) != 0) {
        fprintf(stderr, "tessera tokenize: %s\n", err);
        unload(&l);
        return 1;
    }
    for (size_t i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
    putchar('\n');
    free(ids);
    unload(&l);
    return 0;
}

/* ---- generate ---- */

static const char *generate_help =
    "usage: tessera generate -m MODEL -p PROMPT [flags]\n"
    "\n"
    "Generate a continuation of PROMPT and stream it to stdout.\n"
    "\n"
    "  -p, --prompt TEXT           the prompt (BOS is added when the model asks for "
    "it)\n" TSR_CLI_GEN_HELP(
        DEFAULT_MODEL) "      --json                  print one JSON object instead of streaming "
                       "text:\n"
                       "                              prompt_ids, ids, text, finish_reason,\n"
                       "                              prefill_tokens_per_s, decode_tokens_per_s, "
                       "ranks\n" REPLICA_HELP "  -h, --help                  this help\n";

#define REPLICA_OPTS TSR_CLI_REPLICA_OPTS

/* Parse one replica flag into rp; returns -1 when c is not one, 0 ok, 2 usage error. */
static int replica_flag(const char *cmd, int c, tsr_replica_params *rp)
{
    return tsr_cli_replica_flag(cmd, c, optarg, rp);
}

/* Open the replica on every rank; on error print it (every rank) and return 1. */
static int open_replica(const char *cmd, const char *model, tsr_replica_params *rp,
                        tsr_replica **out)
{
    return tsr_cli_replica_open(cmd, model, rp, out) != 0 ? 1 : 0;
}

static int follow(const char *cmd, tsr_replica *rep)
{
    return tsr_cli_follow(cmd, rep);
}

static cJSON *ranks_json(const tsr_rank_stats *st, int n)
{
    return tsr_cli_ranks_json(st, n);
}

static int run_generate(const char *prompt, tsr_cli_gen_opts *o, bool json);

static int cmd_generate(int argc, char **argv)
{
    enum { O_JSON = 400 };
    static const struct option opts[] = {TSR_CLI_GEN_OPTS,
                                         {"prompt", required_argument, 0, 'p'},
                                         {"json", no_argument, 0, O_JSON},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *prompt = NULL;
    bool json = false;
    tsr_cli_gen_opts o;
    tsr_cli_gen_defaults(&o, DEFAULT_MODEL);
    int c;
    while ((c = getopt_long(argc, argv, TSR_CLI_GEN_SHORTOPTS "p:h", opts, NULL)) != -1) {
        switch (c) {
        case 'p':
            prompt = optarg;
            break;
        case O_JSON:
            json = true;
            break;
        case 'h':
            fputs(generate_help, stdout);
            return 0;
        default: {
            int r = tsr_cli_gen_flag("generate", c, optarg, &o);
            if (r >= 0) {
                if (r) return r;
                break;
            }
            return tsr_cli_usage_error("generate", "unknown flag");
        }
        }
    }
    if (optind != argc)
        return tsr_cli_usage_error(
            "generate", "unexpected argument '%s' (the prompt goes after -p)", argv[optind]);
    if (!prompt) return tsr_cli_usage_error("generate", "needs a prompt: -p TEXT");
    int r = tsr_cli_gen_finish("generate", &o);
    if (r) return r;
    return run_generate(prompt, &o, json);
}

/* ---- generate through the serving engine (one request) ---- */

typedef struct {
    bool json;
    int32_t *ids;
    size_t n_ids, cap;
    char *text;
    size_t text_len, text_cap;
    tsr_event fin;
    bool done;
    char error[512];
} gen_sink;

static void gen_on_event(void *ud, const tsr_event *ev)
{
    gen_sink *g = ud;
    if (ev->kind == TSR_EV_TOKENS) {
        for (size_t i = 0; i < ev->n_ids; i++) {
            if (g->n_ids == g->cap) {
                size_t cap = g->cap ? 2 * g->cap : 256;
                int32_t *p = realloc(g->ids, cap * sizeof *p);
                if (!p) return;
                g->ids = p;
                g->cap = cap;
            }
            g->ids[g->n_ids++] = ev->ids[i];
        }
        if (ev->text_len) {
            if (g->text_len + ev->text_len + 1 > g->text_cap) {
                size_t cap = g->text_cap ? 2 * g->text_cap : 1024;
                while (cap < g->text_len + ev->text_len + 1) cap *= 2;
                char *p = realloc(g->text, cap);
                if (!p) return;
                g->text = p;
                g->text_cap = cap;
            }
            memcpy(g->text + g->text_len, ev->text, ev->text_len);
            g->text_len += ev->text_len;
            g->text[g->text_len] = 0;
            if (!g->json) {
                fwrite(ev->text, 1, ev->text_len, stdout);
                fflush(stdout);
            }
        }
    } else {
        g->fin = *ev;
        g->done = true;
        if (ev->error) snprintf(g->error, sizeof g->error, "%s", ev->error);
    }
}

#define finish_name tsr_cli_finish_name

static int run_generate(const char *prompt, tsr_cli_gen_opts *o, bool json)
{
    tsr_replica_params *rp = &o->rp;
    const tsr_gen_params *gp = &o->gp;
    const int64_t n_threads = o->n_threads;
    const char *model = o->model;
    /* A paged replica (the engine's layout) holding one full context. */
    rp->n_kv_blocks = TSR_REPLICA_KV_ONE_CONTEXT;
    tsr_replica *rep;
    if (open_replica("generate", model, rp, &rep) != 0) return 1;
    const int32_t n_ctx = tsr_replica_n_ctx(rep);
    if (!tsr_replica_is_leader(rep)) return follow("generate", rep);
    const tsr_vocab *vocab = tsr_replica_vocab(rep);
    char err[1024];
    int rc = 1;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    tsr_drafter *drafter = NULL;
    tsr_engine *eng = NULL;
    gen_sink sink;
    memset(&sink, 0, sizeof sink);
    sink.json = json;
    tsr_rank_stats *st = calloc((size_t)tsr_replica_size(rep), sizeof *st);
    bool ok = false;
    if (!st) {
        snprintf(err, sizeof err, "out of memory");
        goto stop;
    }
    if (tsr_cli_gen_drafter(o, rep, &drafter, err, sizeof err) != 0) goto stop;
    tsr_engine_params ep = {.max_batch_tokens = tsr_replica_n_batch(rep),
                            .max_seqs = 4,
                            .max_queue = 4,
                            .drafter = drafter,
                            .spec_k = (int32_t)o->spec_k,
                            .spec_default_on = true};
    if (tsr_engine_new(rep, &ep, &eng, err, sizeof err) != 0) goto stop;
    if (tsr_vocab_tokenize(vocab, prompt, strlen(prompt), true, true, &ids, &n_ids, err,
                           sizeof err) != 0)
        goto stop;
    if (n_ids == 0) {
        snprintf(err, sizeof err, "the prompt is empty: give some text");
        goto stop;
    }
    tsr_engine_request rq = {.prompt_ids = ids,
                             .n_prompt = n_ids,
                             .gen = *gp,
                             .speculation = drafter ? 1 : 0,
                             .on_event = gen_on_event,
                             .ud = &sink};
    /* The context bounds max_tokens: generate what fits, finish "length". */
    if ((size_t)rq.gen.max_tokens + n_ids > (size_t)n_ctx && n_ids < (size_t)n_ctx)
        rq.gen.max_tokens = n_ctx - (int32_t)n_ids;
    if (rq.gen.max_tokens == 0) {
        ok = true; /* nothing to generate */
        goto stop;
    }
    if (tsr_engine_submit(eng, &rq, NULL, err, sizeof err) != 0) goto stop;
    tsr_engine_stop(eng, false);
    if (tsr_engine_run(eng, err, sizeof err) != 0) goto stop;
    if (!sink.done || sink.fin.finish_reason == TSR_FINISH_ERROR) {
        snprintf(err, sizeof err, "generation failed: %s", sink.error[0] ? sink.error : "?");
        goto stop;
    }
    ok = true;
stop:;
    char err2[512];
    if (tsr_replica_shutdown(rep, err2, sizeof err2) != 0 ||
        tsr_replica_stats(rep, st, err2, sizeof err2) != 0) {
        fprintf(stderr, "tessera generate: %s\n", err2);
        tsr_comm_mpi_abort(1);
        goto done;
    }
    if (!ok) {
        fprintf(stderr, "tessera generate: %s\n", err);
        goto done;
    }
    /* The first token comes from the prefill; decode covers the rest. */
    double t_prefill = sink.fin.t_first_token_ns / 1e9;
    double pf = t_prefill > 0 ? (double)n_ids / t_prefill : 0.0;
    double dc = sink.n_ids > 1 && sink.fin.t_decode_ns
                    ? (double)(sink.n_ids - 1) * 1e9 / (double)sink.fin.t_decode_ns
                    : 0.0;
    if (json) {
        cJSON *o = cJSON_CreateObject();
        cJSON *pi = cJSON_AddArrayToObject(o, "prompt_ids");
        for (size_t i = 0; i < n_ids; i++) cJSON_AddItemToArray(pi, cJSON_CreateNumber(ids[i]));
        cJSON *gi = cJSON_AddArrayToObject(o, "ids");
        for (size_t i = 0; i < sink.n_ids; i++)
            cJSON_AddItemToArray(gi, cJSON_CreateNumber(sink.ids[i]));
        cJSON_AddStringToObject(o, "text", sink.text ? sink.text : "");
        cJSON_AddStringToObject(o, "finish_reason",
                                sink.done ? finish_name(sink.fin.finish_reason) : "length");
        cJSON_AddNumberToObject(o, "prefill_tokens_per_s", pf);
        cJSON_AddNumberToObject(o, "decode_tokens_per_s", dc);
        cJSON_AddNumberToObject(o, "spec_drafted", sink.fin.spec_drafted);
        cJSON_AddNumberToObject(o, "spec_accepted", sink.fin.spec_accepted);
        cJSON_AddNumberToObject(o, "seed", (double)gp->sampling.seed);
        cJSON_AddNumberToObject(o, "threads", (double)n_threads);
        cJSON_AddNumberToObject(o, "tp", rp->tp);
        cJSON_AddNumberToObject(o, "pp", rp->pp);
        cJSON_AddItemToObject(o, "ranks", ranks_json(st, tsr_replica_size(rep)));
        char *s = cJSON_PrintUnformatted(o);
        if (s) puts(s);
        free(s);
        cJSON_Delete(o);
    } else {
        putchar('\n');
        fprintf(stderr,
                "[%zu prompt tokens, %zu generated, finish: %s; prefill %.1f tokens/s, decode "
                "%.1f tokens/s",
                n_ids, sink.n_ids, sink.done ? finish_name(sink.fin.finish_reason) : "length", pf,
                dc);
        if (drafter)
            fprintf(stderr, "; speculation: %d drafted, %d accepted", sink.fin.spec_drafted,
                    sink.fin.spec_accepted);
        fprintf(stderr, "]\n");
    }
    rc = 0;
done:
    tsr_engine_free(eng);
    tsr_drafter_free(drafter);
    free(sink.ids);
    free(sink.text);
    free(ids);
    free(st);
    tsr_replica_close(rep);
    return rc;
}

/* ---- mkmodel ---- */

static const char *mkmodel_help =
    "usage: tessera mkmodel -o OUT.gguf --vocab-from VOCAB.gguf [flags]\n"
    "\n"
    "Write a llama GGUF with random weights (seeded, reproducible) of any shape and type.\n"
    "Every tokenizer.* key is copied from VOCAB.gguf, which sets the vocabulary size.\n"
    "\n"
    "  -o, --output PATH       file to write\n"
    "      --vocab-from PATH   GGUF to copy the vocabulary from (a vocab-only file works)\n"
    "      --n-layer N         layers (default 2)\n"
    "      --n-embd N          embedding width (default 256)\n"
    "      --n-head N          attention heads (default 4)\n"
    "      --n-head-kv N       KV heads, divides n_head (default: n_head)\n"
    "      --n-ff N            MLP width (default 768)\n"
    "      --n-ctx N           context length metadata (default 2048)\n"
    "      --type T            F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q3_K, Q4_K, Q5_K,\n"
    "                          Q6_K (every matrix that type), or a llama-quantize mix: Q2_K,\n"
    "                          Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M (default\n"
    "                          F16); rows a type cannot hold fall back as llama-quantize does\n"
    "                          (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, ...) or to F16 "
    "(reported)\n"
    "      --tied              no output.weight: the head reuses token_embd\n"
    "      --seed S            random seed (default 1)\n"
    "      --rope-base F       rope frequency base (default 10000)\n"
    "      --arch A            llama (default), qwen2, qwen3 or gemma3 (their extra tensors)\n"
    "      --head-dim N        head size (key_length; default n_embd / n_head)\n"
    "      --sliding-window N  attention window (gemma3 default 512; llama: Mistral-style)\n"
    "  -h, --help              this help\n"
    "\n"
    "Shapes used by the benchmarks:\n"
    "  1B-like:   --n-layer 16 --n-embd 2048 --n-head 32 --n-head-kv 8 --n-ff 8192\n"
    "  100M-like: --n-layer 12 --n-embd 768 --n-head 12 --n-ff 2048\n"
    "  (with --vocab-from ../shared/models/vocab/ggml-vocab-llama-spm.gguf: 32000 tokens)\n";

static void print_note(const char *msg)
{
    fprintf(stderr, "tessera mkmodel: note: %s\n", msg);
}

static int cmd_mkmodel(int argc, char **argv)
{
    enum {
        O_VOCAB = 256,
        O_NL,
        O_NE,
        O_NH,
        O_NHKV,
        O_NFF,
        O_NCTX,
        O_TYPE,
        O_TIED,
        O_SEED,
        O_ROPE,
        O_ARCH,
        O_HD,
        O_SWA
    };
    static const struct option opts[] = {{"output", required_argument, 0, 'o'},
                                         {"vocab-from", required_argument, 0, O_VOCAB},
                                         {"n-layer", required_argument, 0, O_NL},
                                         {"n-embd", required_argument, 0, O_NE},
                                         {"n-head", required_argument, 0, O_NH},
                                         {"n-head-kv", required_argument, 0, O_NHKV},
                                         {"n-ff", required_argument, 0, O_NFF},
                                         {"n-ctx", required_argument, 0, O_NCTX},
                                         {"type", required_argument, 0, O_TYPE},
                                         {"tied", no_argument, 0, O_TIED},
                                         {"seed", required_argument, 0, O_SEED},
                                         {"rope-base", required_argument, 0, O_ROPE},
                                         {"arch", required_argument, 0, O_ARCH},
                                         {"head-dim", required_argument, 0, O_HD},
                                         {"sliding-window", required_argument, 0, O_SWA},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    tsr_mkmodel_params p;
    tsr_mkmodel_params_default(&p);
    int64_t head_kv = -1;
    int c;
    while ((c = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
        switch (c) {
        case 'o':
            p.out_path = optarg;
            break;
        case O_VOCAB:
            p.vocab_from = optarg;
            break;
        case O_NL:
            INT_FLAG("mkmodel", "--n-layer", 1, 4096, p.n_layer);
            break;
        case O_NE:
            INT_FLAG("mkmodel", "--n-embd", 2, 1 << 16, p.n_embd);
            break;
        case O_NH:
            INT_FLAG("mkmodel", "--n-head", 1, 1024, p.n_head);
            break;
        case O_NHKV:
            INT_FLAG("mkmodel", "--n-head-kv", 1, 1024, head_kv);
            break;
        case O_NFF:
            INT_FLAG("mkmodel", "--n-ff", 1, 1 << 18, p.n_ff);
            break;
        case O_NCTX:
            INT_FLAG("mkmodel", "--n-ctx", 1, 1 << 24, p.n_ctx);
            break;
        case O_TYPE:
            p.type = optarg;
            break;
        case O_TIED:
            p.tied = true;
            break;
        case O_SEED:
            if (!tsr_cli_parse_u64(optarg, &p.seed))
                return tsr_cli_usage_error("mkmodel", "--seed needs a non-negative integer");
            break;
        case O_ROPE:
            FLOAT_FLAG("mkmodel", "--rope-base", p.rope_freq_base);
            break;
        case O_ARCH:
            p.arch = optarg;
            break;
        case O_HD:
            INT_FLAG("mkmodel", "--head-dim", 2, 1 << 14, p.head_dim);
            break;
        case O_SWA:
            INT_FLAG("mkmodel", "--sliding-window", 1, 1 << 24, p.n_swa);
            break;
        case 'h':
            fputs(mkmodel_help, stdout);
            return 0;
        default:
            return tsr_cli_usage_error("mkmodel", "unknown flag");
        }
    }
    if (optind != argc)
        return tsr_cli_usage_error("mkmodel", "unexpected argument '%s'", argv[optind]);
    if (!p.out_path) return tsr_cli_usage_error("mkmodel", "needs an output file: -o OUT.gguf");
    if (!p.vocab_from) return tsr_cli_usage_error("mkmodel", "needs --vocab-from VOCAB.gguf");
    p.n_head_kv = head_kv > 0 ? (int32_t)head_kv : p.n_head;
    char err[512];
    if (tsr_mkmodel(&p, print_note, err, sizeof err) != 0) {
        fprintf(stderr, "tessera mkmodel: %s\n", err);
        return 1;
    }
    fprintf(stderr, "tessera mkmodel: wrote %s\n", p.out_path);
    return 0;
}

/* ---- bench ---- */

static const char *bench_help =
    "usage: tessera bench -m MODEL [-t THREADS] [-p 128] [-n 64] [-r REPS] [--json]\n"
    "\n"
    "Measure prefill and decode speed, peak memory, the machine's memory read bandwidth,\n"
    "and the decode roofline: bandwidth / bytes read per token (every weight once, plus\n"
    "the KV cache), with the fraction of it achieved. Each figure is the median of REPS\n"
    "runs; the bandwidth is measured in the same run with the same thread count.\n"
    "\n"
    "  -m, --model PATH    GGUF model (default " DEFAULT_MODEL ")\n"
    "  -t, --threads N     CPU threads (default: all cores)\n"
    "  -p, --prompt-len N  prefill tokens (default 128)\n"
    "  -n, --gen-len N     decode tokens (default 64)\n"
    "  -r, --reps N        repetitions (default 3)\n"
    "      --json          one JSON object instead of text (with per-rank compute and\n"
    "                      communication time per token and bytes sent)\n"
    "\nspeculative decoding (each adds a greedy decode of -n tokens through the engine,\n"
    "without and with speculation: tokens/s, acceptance rate, mean accepted length):\n"
    "      --draft-model PATH  a draft model\n"
    "      --spec ngram|oracle n-gram lookup, or an oracle that proposes the model's own\n"
    "                          greedy tokens (100%% acceptance: the ceiling)\n"
    "      --spec-k K          draft tokens per step (default 4)\n"
    "      --verify-cost       time one step of k+1 query tokens / one step of 1 token,\n"
    "                          k = 1, 2, 4, 8\n" REPLICA_HELP "  -h, --help          this help\n";

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* One greedy request through the engine; fills the finish event. */
static int bench_engine_run(tsr_replica *rep, tsr_drafter *d, int32_t spec_k, const int32_t *prompt,
                            int32_t n_prompt, int32_t n_gen, gen_sink *sink, char *err,
                            size_t err_len)
{
    tsr_engine_params ep = {.max_batch_tokens = tsr_replica_n_batch(rep),
                            .max_seqs = 4,
                            .max_queue = 4,
                            .drafter = d,
                            .spec_k = spec_k,
                            .spec_default_on = true,
                            .spec_no_probe = true};
    tsr_engine *e;
    if (tsr_engine_new(rep, &ep, &e, err, err_len) != 0) return -1;
    memset(sink, 0, sizeof *sink);
    sink->json = true; /* collect, do not print */
    tsr_engine_request rq = {.prompt_ids = prompt,
                             .n_prompt = (size_t)n_prompt,
                             .speculation = d ? 1 : 0,
                             .on_event = gen_on_event,
                             .ud = sink};
    tsr_sampling_params_default(&rq.gen.sampling);
    rq.gen.sampling.temperature = 0.0f;
    rq.gen.max_tokens = n_gen;
    rq.gen.ignore_eos = true;
    int rc = tsr_engine_submit(e, &rq, NULL, err, err_len);
    if (rc == 0) {
        tsr_engine_stop(e, false);
        rc = tsr_engine_run(e, err, err_len);
    }
    tsr_engine_free(e);
    return rc;
}

static int cmd_bench(int argc, char **argv)
{
    enum { O_JSON = 256, O_DRAFT, O_SPEC, O_SPEC_K, O_VERIFY };
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                         {"threads", required_argument, 0, 't'},
                                         {"prompt-len", required_argument, 0, 'p'},
                                         {"gen-len", required_argument, 0, 'n'},
                                         {"reps", required_argument, 0, 'r'},
                                         {"json", no_argument, 0, O_JSON},
                                         {"help", no_argument, 0, 'h'},
                                         {"draft-model", required_argument, 0, O_DRAFT},
                                         {"spec", required_argument, 0, O_SPEC},
                                         {"spec-k", required_argument, 0, O_SPEC_K},
                                         {"verify-cost", no_argument, 0, O_VERIFY},
                                         REPLICA_OPTS,
                                         {0, 0, 0, 0}};
    const char *model = DEFAULT_MODEL, *draft_model = NULL, *spec = NULL;
    bool verify_cost = false;
    int64_t spec_k = 4;
    tsr_replica_params rp = {.tp = 1, .pp = 1};
    int64_t n_threads = tsr_cli_default_threads(), n_prompt = 128, n_gen = 64, reps = 3;
    bool json = false;
    int c;
    while ((c = getopt_long(argc, argv, "m:t:p:n:r:h", opts, NULL)) != -1) {
        switch (c) {
        case 'm':
            model = optarg;
            break;
        case 't':
            INT_FLAG("bench", "--threads", 1, 256, n_threads);
            break;
        case 'p':
            INT_FLAG("bench", "--prompt-len", 1, 1 << 16, n_prompt);
            break;
        case 'n':
            INT_FLAG("bench", "--gen-len", 1, 1 << 16, n_gen);
            break;
        case 'r':
            INT_FLAG("bench", "--reps", 1, 1000, reps);
            break;
        case O_JSON:
            json = true;
            break;
        case O_DRAFT:
            draft_model = optarg;
            break;
        case O_SPEC:
            if (strcmp(optarg, "ngram") && strcmp(optarg, "oracle"))
                return tsr_cli_usage_error("bench", "--spec takes 'ngram' or 'oracle', got '%s'",
                                           optarg);
            spec = optarg;
            break;
        case O_SPEC_K:
            INT_FLAG("bench", "--spec-k", 1, 16, spec_k);
            break;
        case O_VERIFY:
            verify_cost = true;
            break;
        case 'h':
            fputs(bench_help, stdout);
            return 0;
        default: {
            int r = replica_flag("bench", c, &rp);
            if (r >= 0) {
                if (r) return r;
                break;
            }
            return tsr_cli_usage_error("bench", "unknown flag");
        }
        }
    }
    if (optind != argc)
        return tsr_cli_usage_error("bench", "unexpected argument '%s'", argv[optind]);
    if (draft_model && spec)
        return tsr_cli_usage_error("bench", "choose one of --draft-model and --spec");
    rp.n_threads = (int)n_threads;
    /* Room for the prompt, the generated tokens and up to 16 drafts past them. */
    rp.n_ctx = (int32_t)(n_prompt + n_gen + 24);
    rp.n_kv_blocks = TSR_REPLICA_KV_ONE_CONTEXT;
    rp.n_batch = n_prompt > 128 ? (int32_t)n_prompt : 128;
    tsr_replica *rep;
    if (open_replica("bench", model, &rp, &rep) != 0) return 1;
    if (!tsr_replica_is_leader(rep)) return follow("bench", rep);
    const tsr_hparams *hp = tsr_replica_hparams(rep);
    const int n_ranks = tsr_replica_size(rep);
    char err[512];
    int rc = 1;
    bool ok = false;
    int32_t *toks = malloc(sizeof(int32_t) * (size_t)n_prompt);
    double *pf = calloc((size_t)reps, sizeof(double)), *dc = calloc((size_t)reps, sizeof(double));
    double *roofr = calloc((size_t)reps, sizeof(double)),
           *rd = calloc((size_t)reps, sizeof(double));
    tsr_rank_stats *st = calloc((size_t)n_ranks, sizeof *st);
    /* The roofline's bandwidth, read right after each repetition's decode (see below) */
    tsr_pool *bw_pool = NULL;
    tsr_membw_probe *bw_probe = NULL;
    double rss_kib_before_probe = 0.0;
    if (!toks || !pf || !dc || !roofr || !rd || !st) {
        snprintf(err, sizeof err, "out of memory");
        goto stop;
    }
    /* Deterministic pseudo-random prompt ids (content does not change the cost). */
    uint32_t x = 12345;
    for (int64_t i = 0; i < n_prompt; i++) {
        x = x * 1103515245u + 12345u;
        toks[i] = (int32_t)((x >> 8) % (uint32_t)hp->n_vocab);
    }
    const float *logits;
    /* The prompt in its order classes (prompt tokens as llama.cpp multiplies them,
     * worker/model.h tsr_order_class). Warm-up, as llama-bench's: the whole prompt once and
     * one generated token, so that the first repetition does not pay for faulting in the
     * weights, the KV cache's pages and the step buffers (first touches of anonymous memory
     * cost ~4-16 % of a 1B prefill on this VM host, whose page clearing is slow). */
    tsr_replica_set_prompt_len(rep, (int32_t)n_prompt);
    if (tsr_replica_forward(rep, toks, (int32_t)n_prompt, 0, &logits, err, sizeof err) != 0 ||
        tsr_replica_forward(rep, toks, 1, (int32_t)n_prompt, &logits, err, sizeof err) != 0)
        goto stop;
    for (int64_t r = 0; r < reps; r++) {
        uint64_t t0 = tsr_now_ns();
        if (tsr_replica_forward(rep, toks, (int32_t)n_prompt, 0, &logits, err, sizeof err))
            goto stop;
        pf[r] = (double)n_prompt * 1e9 / (double)(tsr_now_ns() - t0);
        int32_t tok = toks[0];
        t0 = tsr_now_ns();
        for (int64_t i = 0; i < n_gen; i++) {
            if (tsr_replica_forward(rep, &tok, 1, (int32_t)(n_prompt + i), &logits, err,
                                    sizeof err))
                goto stop;
            /* the engine's greedy choice (a scalar loop here cost 0.63 ms a token over
             * Qwen2.5's 151936 logits, ~3.5 % of its decode step) */
            tok = tsr_sampler_argmax(logits, (int32_t)hp->n_vocab);
        }
        dc[r] = (double)n_gen * 1e9 / (double)(tsr_now_ns() - t0);
        /* The memory bandwidth of this moment. A shared host's bandwidth drifts over seconds
         * with other tenants' traffic (the AMD EPYC host of 2026-12-06: 21-36 GB/s, now and then
         * 58, over a minute of the same read), so one figure taken at another moment can put a
         * decode above 100 % of its "roofline". The memory is read after each decode, and
         * each decode is compared with the better of the reads on either side of it (the one
         * after the previous decode, which its prefill follows, and the one after it): a
         * roofline is the best read measured around the decode, never a lower one. The probe
         * (1 GiB: past every L3 met here) is made after the first repetition and held to the
         * end, so the peak RSS below is the engine's: the high-water mark before it, or the
         * one at the end less the probe (every page faulted in, never dropped). */
        if (r == 0) {
            struct rusage ru0;
            getrusage(RUSAGE_SELF, &ru0);
            rss_kib_before_probe = (double)ru0.ru_maxrss;
            bw_pool = tsr_pool_new((int)n_threads);
            bw_probe = bw_pool ? tsr_membw_probe_new((size_t)1 << 30) : NULL;
        }
        rd[r] = bw_probe ? tsr_membw_probe_read(bw_probe, bw_pool, 2) : 0.0;
    }
    /* Verify cost: one step of k+1 query tokens of one sequence vs one of 1 token. */
    double vc[5] = {0};
    static const int32_t vk[5] = {0, 1, 2, 4, 8};
    if (verify_cost) {
        int32_t n_tab = tsr_replica_n_kv_blocks(rep);
        int32_t *table = malloc(sizeof(int32_t) * (size_t)n_tab);
        if (!table) goto stop;
        for (int32_t i = 0; i < n_tab; i++) table[i] = i;
        /* The five widths interleaved rep by rep (a shared machine's load drifts over a
         * run; back-to-back reps of one width would fold the drift into the ratios). */
        double best[5][7];
        for (int r = 0; r < 7; r++) {
            for (int ki = 0; ki < 5; ki++) {
                /* the step's tokens: the prompt's, repeated where it is shorter than k + 1 */
                int32_t k1 = vk[ki] + 1, pos[9], sq[9] = {0}, vt[9];
                uint8_t want[9];
                for (int32_t i = 0; i < k1; i++) {
                    pos[i] = (int32_t)n_prompt + i;
                    vt[i] = toks[i % n_prompt];
                    want[i] = 1;
                }
                const int32_t *tabs[1] = {table};
                tsr_batch b = {.n_tokens = k1,
                               .tokens = vt,
                               .pos = pos,
                               .seq = sq,
                               .want_logits = want,
                               .n_seqs = 1,
                               .block_tables = tabs,
                               .n_blocks = &n_tab};
                uint64_t t0 = tsr_now_ns();
                if (tsr_replica_step(rep, &b, &logits, err, sizeof err) != 0) {
                    free(table);
                    goto stop;
                }
                best[ki][r] = (double)(tsr_now_ns() - t0);
            }
        }
        for (int ki = 0; ki < 5; ki++) {
            qsort(best[ki], 7, sizeof(double), cmp_double);
            vc[ki] = best[ki][3];
        }
        free(table);
    }
    /* Speculation: the same greedy decode through the engine without and with drafts. */
    double sp_plain = 0, sp_spec = 0, sp_acc = 0, sp_len = 0;
    int32_t sp_drafted = 0, sp_accepted = 0;
    if (draft_model || spec) {
        gen_sink sink;
        tsr_drafter *d = NULL;
        double *a = calloc((size_t)reps, sizeof(double)),
               *b2 = calloc((size_t)reps, sizeof(double));
        if (!a || !b2) {
            free(a);
            free(b2);
            goto stop;
        }
        for (int64_t r = 0; r < reps; r++) {
            if (bench_engine_run(rep, NULL, 1, toks, (int32_t)n_prompt, (int32_t)n_gen, &sink, err,
                                 sizeof err) != 0)
                goto spec_fail;
            a[r] =
                sink.n_ids > 1 ? (double)(sink.n_ids - 1) * 1e9 / (double)sink.fin.t_decode_ns : 0;
            if (r == 0) {
                if (draft_model) {
                    if (tsr_drafter_model_new_for(draft_model, rep,
                                                  tsr_replica_n_kv_blocks(rep) + 8, (int)n_threads,
                                                  &d, err, sizeof err) != 0)
                        goto spec_fail;
                } else if (!strcmp(spec, "ngram")) {
                    if (tsr_drafter_ngram_new(1, 3, &d, err, sizeof err) != 0) goto spec_fail;
                } else {
                    /* The oracle knows the greedy continuation just computed. */
                    size_t n_all = (size_t)n_prompt + sink.n_ids;
                    int32_t *all = malloc(sizeof(int32_t) * n_all);
                    if (!all) goto spec_fail;
                    memcpy(all, toks, sizeof(int32_t) * (size_t)n_prompt);
                    memcpy(all + n_prompt, sink.ids, sizeof(int32_t) * sink.n_ids);
                    int rc2 = tsr_drafter_oracle_new(all, (int32_t)n_all, &d, err, sizeof err);
                    free(all);
                    if (rc2 != 0) goto spec_fail;
                }
            }
            free(sink.ids);
            free(sink.text);
            if (bench_engine_run(rep, d, (int32_t)spec_k, toks, (int32_t)n_prompt, (int32_t)n_gen,
                                 &sink, err, sizeof err) != 0)
                goto spec_fail;
            b2[r] =
                sink.n_ids > 1 ? (double)(sink.n_ids - 1) * 1e9 / (double)sink.fin.t_decode_ns : 0;
            sp_drafted = sink.fin.spec_drafted;
            sp_accepted = sink.fin.spec_accepted;
            sp_len = sink.fin.n_steps > 1
                         ? (double)(sink.n_ids - 1) / (double)(sink.fin.n_steps - 1)
                         : 0.0;
            free(sink.ids);
            free(sink.text);
        }
        qsort(a, (size_t)reps, sizeof(double), cmp_double);
        qsort(b2, (size_t)reps, sizeof(double), cmp_double);
        sp_plain = a[reps / 2];
        sp_spec = b2[reps / 2];
        sp_acc = sp_drafted ? (double)sp_accepted / (double)sp_drafted : 0.0;
        free(a);
        free(b2);
        tsr_drafter_free(d);
        goto spec_done;
    spec_fail:
        free(a);
        free(b2);
        tsr_drafter_free(d);
        goto stop;
    }
spec_done:
    ok = true;
stop:;
    char err2[512];
    if (tsr_replica_shutdown(rep, err2, sizeof err2) != 0 ||
        tsr_replica_stats(rep, st, err2, sizeof err2) != 0) {
        fprintf(stderr, "tessera bench: %s\n", err2);
        tsr_comm_mpi_abort(1);
        goto done;
    }
    if (!ok) goto fail;
    memcpy(roofr, dc, sizeof(double) * (size_t)reps); /* each decode, in its read's order */
    qsort(pf, (size_t)reps, sizeof(double), cmp_double);
    qsort(dc, (size_t)reps, sizeof(double), cmp_double);
    double pf_med = pf[reps / 2], dc_med = dc[reps / 2];

    /* Bytes read per decode token by the whole replica: all weights once, plus K and V of
     * the mean context. */
    uint64_t w_bytes = 0;
    {
        /* The whole model's views over the leader's mapping (no data is read): the leader
         * holds only its own shard. */
        tsr_model *m;
        if (tsr_model_load(tsr_replica_gguf(rep), &m, err, sizeof err) == 0) {
            w_bytes = m->n_bytes_weights;
            tsr_model_free(m);
        }
    }
    /* K and V of every cached position, in the cache's type, over the mean context */
    const tsr_kv_type kv_type = tsr_replica_kv_type(rep);
    double kv_per_tok = (double)tsr_kv_block_bytes(hp, hp->n_layer, hp->n_head_kv, kv_type) /
                        TSR_KV_BLOCK_SIZE * ((double)n_prompt + (double)n_gen / 2.0);
    double bytes_tok = (double)w_bytes + kv_per_tok + (double)hp->n_embd * 4.0;
    /* Each repetition against the better read on either side of it: the fraction is the
     * median of the repetitions' fractions; the bandwidth printed the median read, with the
     * range of all reads. */
    int n_roof = 0;
    for (int64_t r = 0; r < reps; r++) {
        const double bw_r = r > 0 && rd[r - 1] > rd[r] ? rd[r - 1] : rd[r];
        if (bw_r > 0) roofr[n_roof++] = roofr[r] / (bw_r / bytes_tok);
    }
    qsort(roofr, (size_t)n_roof, sizeof(double), cmp_double);
    qsort(rd, (size_t)reps, sizeof(double), cmp_double);
    const double bw = rd[reps / 2], bw_lo = rd[0], bw_hi = rd[reps - 1];
    const double roof = bw > 0 ? bw / bytes_tok : 0.0;
    const double roof_ratio = n_roof ? roofr[n_roof / 2] : 0.0;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double rss_kib = (double)ru.ru_maxrss;
    if (bw_probe) {
        rss_kib -= (double)tsr_membw_probe_bytes(bw_probe) / 1024.0;
        if (rss_kib < rss_kib_before_probe) rss_kib = rss_kib_before_probe;
    }
    const double rss_mib = rss_kib / 1024.0;
    if (json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "model", model);
        cJSON_AddNumberToObject(o, "threads", (double)n_threads);
        cJSON_AddNumberToObject(o, "tp", rp.tp);
        cJSON_AddNumberToObject(o, "pp", rp.pp);
        cJSON_AddStringToObject(o, "isa", tsr_quant_isa());
        cJSON_AddNumberToObject(o, "prompt_tokens", (double)n_prompt);
        cJSON_AddNumberToObject(o, "gen_tokens", (double)n_gen);
        cJSON_AddNumberToObject(o, "prefill_tokens_per_s", pf_med);
        cJSON_AddNumberToObject(o, "decode_tokens_per_s", dc_med);
        cJSON_AddNumberToObject(o, "weight_bytes", (double)w_bytes);
        cJSON_AddNumberToObject(o, "bytes_per_token", bytes_tok);
        cJSON_AddStringToObject(o, "kv_type", tsr_kv_type_name(kv_type));
        cJSON_AddNumberToObject(o, "kv_bytes_per_token", kv_per_tok);
        cJSON_AddNumberToObject(o, "mem_bw_gb_s", bw / 1e9);
        cJSON_AddNumberToObject(o, "mem_bw_gb_s_min", bw_lo / 1e9);
        cJSON_AddNumberToObject(o, "mem_bw_gb_s_max", bw_hi / 1e9);
        cJSON_AddNumberToObject(o, "roofline_tokens_per_s", roof);
        cJSON_AddNumberToObject(o, "decode_roofline_ratio", roof_ratio);
        cJSON_AddNumberToObject(o, "peak_rss_mib_leader", rss_mib);
        cJSON_AddNumberToObject(o, "repacked_mib_leader", st[0].n_bytes_repacked / 1048576.0);
        cJSON_AddNumberToObject(o, "repack_ms_leader", st[0].t_repack_ns / 1e6);
        cJSON_AddNumberToObject(o, "q80_lanes_leader", st[0].n_q80_lanes);
        cJSON_AddNumberToObject(o, "q40_lanes_leader", st[0].n_q40_lanes);
        cJSON_AddNumberToObject(o, "q4k_lanes_leader", st[0].n_q4k_lanes);
        cJSON_AddNumberToObject(o, "q6k_lanes_leader", st[0].n_q6k_lanes);
        cJSON_AddNumberToObject(o, "q50_lanes_leader", st[0].n_q50_lanes);
        cJSON_AddNumberToObject(o, "q41_lanes_leader", st[0].n_q41_lanes);
        cJSON_AddNumberToObject(o, "q80_ggml_lanes_leader", st[0].n_q80g_lanes);
        if (verify_cost) {
            cJSON *v = cJSON_AddObjectToObject(o, "verify_cost");
            for (int ki = 1; ki < 5; ki++) {
                char key[16];
                snprintf(key, sizeof key, "k%d", vk[ki]);
                cJSON_AddNumberToObject(v, key, vc[0] > 0 ? vc[ki] / vc[0] : 0.0);
            }
            cJSON_AddNumberToObject(v, "step_1_token_ms", vc[0] / 1e6);
        }
        if (draft_model || spec) {
            cJSON *v = cJSON_AddObjectToObject(o, "speculation");
            cJSON_AddStringToObject(v, "drafter", draft_model ? draft_model : spec);
            cJSON_AddNumberToObject(v, "spec_k", (double)spec_k);
            cJSON_AddNumberToObject(v, "decode_tokens_per_s_plain", sp_plain);
            cJSON_AddNumberToObject(v, "decode_tokens_per_s_spec", sp_spec);
            cJSON_AddNumberToObject(v, "speedup", sp_plain > 0 ? sp_spec / sp_plain : 0.0);
            cJSON_AddNumberToObject(v, "drafted", sp_drafted);
            cJSON_AddNumberToObject(v, "accepted", sp_accepted);
            cJSON_AddNumberToObject(v, "acceptance_rate", sp_acc);
            cJSON_AddNumberToObject(v, "mean_accepted_length", sp_len);
        }
        cJSON_AddItemToObject(o, "ranks", ranks_json(st, n_ranks));
        char *s = cJSON_PrintUnformatted(o);
        if (s) puts(s);
        free(s);
        cJSON_Delete(o);
    } else {
        printf("model:            %s\n", model);
        printf("shape:            n_layer %d, n_embd %d, n_head %d/%d kv, n_ff %d, vocab %d\n",
               hp->n_layer, hp->n_embd, hp->n_head, hp->n_head_kv, hp->n_ff, hp->n_vocab);
        printf("layout:           tp %d, pp %d; %" PRId64 " threads per rank (kernels: %s)\n",
               rp.tp, rp.pp, n_threads, tsr_quant_isa());
        printf("prefill:          %.1f tokens/s (%" PRId64 " tokens, median of %" PRId64 ")\n",
               pf_med, n_prompt, reps);
        printf("decode:           %.2f tokens/s (%" PRId64 " tokens, median of %" PRId64 ")\n",
               dc_med, n_gen, reps);
        printf("bytes per token:  %.1f MiB (weights %.1f MiB, KV cache %.2f MiB in %s)\n",
               bytes_tok / 1048576.0, (double)w_bytes / 1048576.0, kv_per_tok / 1048576.0,
               tsr_kv_type_name(kv_type));
        printf("memory bandwidth: %.1f GB/s (read, %" PRId64 " threads, median of %" PRId64
               " reads, one after each decode: %.1f-%.1f)\n",
               bw / 1e9, n_threads, reps, bw_lo / 1e9, bw_hi / 1e9);
        printf("decode roofline:  %.2f tokens/s; achieved %.1f%% (median of each decode over "
               "the better read on either side of it)\n",
               roof, 100.0 * roof_ratio);
        printf("peak RSS:         %.1f MiB (leader)\n", rss_mib);
        printf("repacked weights: %.1f MiB in %.0f ms at load (leader; --no-repack: none)\n",
               st[0].n_bytes_repacked / 1048576.0, st[0].t_repack_ns / 1e6);
        if (st[0].n_q80_lanes > 0)
            printf("Q8_0 order:       lanes (--q8-order lanes: %d matrices on the leader%s)\n",
                   st[0].n_q80_lanes,
                   tsr_q80l_fast() ? "" : "; a scalar loop here: no AVX-512 VNNI");
        const struct {
            const char *type, *env, *keeps;
            int32_t n;
        } lay[] = {{"Q4_0", "TSR_Q40_LANES", "the groups", st[0].n_q40_lanes},
                   {"Q4_K", "TSR_Q4K_LANES", "the groups", st[0].n_q4k_lanes},
                   {"Q6_K", "TSR_Q6K_LANES", "the groups", st[0].n_q6k_lanes},
                   {"Q5_0", "TSR_Q50_LANES", "the groups", st[0].n_q50_lanes},
                   {"Q4_1", "TSR_Q41_LANES", "the file layout", st[0].n_q41_lanes},
                   {"Q8_0", "TSR_Q80_LANES", "the file layout", st[0].n_q80g_lanes}};
        for (size_t i = 0; i < sizeof lay / sizeof lay[0]; i++)
            if (lay[i].n > 0)
                printf("%s layout:      lanes (%s, %s=0 for %s: %d matrices on the leader)\n",
                       lay[i].type, tsr_ggml_isa() == TSR_GGML_VNNI ? "AVX-512 VNNI" : "AVX2",
                       lay[i].env, lay[i].keeps, lay[i].n);
        if (verify_cost) {
            printf("verify cost:      step of k+1 tokens / step of 1 (%.2f ms):", vc[0] / 1e6);
            for (int ki = 1; ki < 5; ki++)
                printf(" k=%d %.2f", vk[ki], vc[0] > 0 ? vc[ki] / vc[0] : 0.0);
            printf("\n");
        }
        if (draft_model || spec) {
            printf("speculation:      %s, k %" PRId64 ": decode %.2f tokens/s vs %.2f without "
                   "(x%.2f); acceptance %.1f%% (%d/%d), %.2f tokens per target step\n",
                   draft_model ? draft_model : spec, spec_k, sp_spec, sp_plain,
                   sp_plain > 0 ? sp_spec / sp_plain : 0.0, 100.0 * sp_acc, sp_accepted, sp_drafted,
                   sp_len);
        }
        if (n_ranks > 1) {
            printf("per rank (all steps): rank stage tp  compute_us/tok  comm_us/tok  "
                   "bytes_sent/tok  loaded_MiB\n");
            for (int i = 0; i < n_ranks; i++) {
                double t = st[i].n_tokens ? (double)st[i].n_tokens : 1.0;
                printf("                      %4d %5d %2d  %14.1f %12.1f %15.0f %11.1f\n",
                       st[i].rank, st[i].stage, st[i].tp_rank, st[i].t_compute_ns / 1e3 / t,
                       st[i].t_comm_ns / 1e3 / t, (double)st[i].n_bytes_sent / t,
                       st[i].n_bytes_loaded / 1048576.0);
            }
        }
    }
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "tessera bench: %s\n", err);
done:
    free(toks);
    free(pf);
    free(dc);
    free(roofr);
    free(rd);
    free(st);
    tsr_membw_probe_free(bw_probe);
    tsr_pool_free(bw_pool);
    tsr_replica_close(rep);
    return rc;
}

/* ---- plan ---- */

static const char *plan_help =
    "usage: tessera plan -m MODEL --tp T --pp P [--layers A-B,...] [--mem BYTES] [-c N]\n"
    "\n"
    "Print how MODEL is cut over tp x pp ranks: each rank's layers, heads, KV heads, MLP\n"
    "columns and vocabulary rows, with its bytes of weights and KV cache. Impossible\n"
    "layouts are refused with the reason and what would work. Runs without MPI.\n"
    "\n"
    "  -m, --model PATH     GGUF model (default " DEFAULT_MODEL ")\n"
    "      --tp N           tensor-parallel ranks per stage (default 1)\n"
    "      --pp N           pipeline stages (default 1)\n"
    "      --layers SPEC    layers of each stage, e.g. 0-7,8-15\n"
    "      --mem BYTES      per-rank budget for weights + KV cache (0 = none)\n"
    "  -c, --ctx-size N     context tokens for the KV budget (default 4096)\n"
    "  -h, --help           this help\n";

static int cmd_plan(int argc, char **argv)
{
    enum { O_MEM = 256 };
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                         {"mem", required_argument, 0, O_MEM},
                                         {"ctx-size", required_argument, 0, 'c'},
                                         {"help", no_argument, 0, 'h'},
                                         REPLICA_OPTS,
                                         {0, 0, 0, 0}};
    const char *model = DEFAULT_MODEL;
    tsr_replica_params rp = {.tp = 1, .pp = 1};
    uint64_t mem = 0;
    int64_t n_ctx = 4096;
    int c;
    while ((c = getopt_long(argc, argv, "m:c:h", opts, NULL)) != -1) {
        switch (c) {
        case 'm':
            model = optarg;
            break;
        case 'c':
            INT_FLAG("plan", "--ctx-size", 1, 1 << 24, n_ctx);
            break;
        case O_MEM:
            if (!tsr_cli_parse_u64(optarg, &mem))
                return tsr_cli_usage_error("plan", "--mem needs a byte count, got '%s'", optarg);
            break;
        case 'h':
            fputs(plan_help, stdout);
            return 0;
        default: {
            int r = replica_flag("plan", c, &rp);
            if (r >= 0) {
                if (r) return r;
                break;
            }
            return tsr_cli_usage_error("plan", "unknown flag");
        }
        }
    }
    if (optind != argc)
        return tsr_cli_usage_error("plan", "unexpected argument '%s'", argv[optind]);
    char err[1024];
    tsr_gguf *g;
    if (tsr_gguf_open(model, &g, err, sizeof err) != 0) {
        fprintf(stderr, "tessera plan: %s\n", err);
        return 1;
    }
    tsr_plan_model pm;
    static tsr_plan plan;
    int rc = 1;
    if (tsr_replica_plan_model_kv(g, tsr_replica_params_kv_type(&rp), &pm, err, sizeof err) != 0 ||
        tsr_plan_make(&pm, rp.tp, rp.pp, rp.layers, mem, (int32_t)n_ctx, &plan, err, sizeof err) !=
            0) {
        fprintf(stderr, "tessera plan: %s\n", err);
        goto done;
    }
    static char buf[1 << 16];
    tsr_plan_format(&plan, &pm, buf, sizeof buf);
    fputs(buf, stdout);
    rc = 0;
done:
    tsr_gguf_close(g);
    return rc;
}

/* ---- main ---- */

static const char *main_help =
    "usage: tessera COMMAND [flags]\n"
    "\n"
    "Tessera: distributed LLM inference (single-node engine).\n"
    "\n"
    "commands:\n"
    "  generate   generate text from a prompt with a GGUF llama model\n"
    "  tokenize   print the token ids of a text\n"
    "  inspect    print a GGUF file's metadata and tensor table\n"
    "  mkmodel    write a random-weight llama GGUF of any shape and type\n"
    "  bench      measure prefill/decode speed against the memory-bandwidth roofline\n"
    "  plan       print how a model is cut over tensor- and pipeline-parallel ranks\n"
    "  serve      serve a model over gRPC (continuous batching, paged KV cache)\n"
    "  chat       chat with an instruct model (its chat template; interactive on a terminal)\n"
    "  batch      run a JSONL file of requests (OpenAI Batch format), resumable\n"
    "  coordinator  one front door over many replicas (routing, failover, cluster file)\n"
    "  ctl        operate a cluster through its coordinator\n"
    "\n"
    "Run 'tessera COMMAND --help' for the flags of each command.\n";

int main(int argc, char **argv)
{
    if (argc < 2) {
        fputs(main_help, stderr);
        return TSR_CLI_EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
        fputs(main_help, stdout);
        return 0;
    }
    if (!strcmp(cmd, "--version")) {
        puts("tessera 0.1.0");
        return 0;
    }
    /* Subcommand parsing: argv[1..] with the command as argv[0] of getopt. */
    argc -= 1;
    argv += 1;
    optind = 1;
    if (!strcmp(cmd, "inspect")) return cmd_inspect(argc, argv);
    if (!strcmp(cmd, "tokenize")) return cmd_tokenize(argc, argv);
    if (!strcmp(cmd, "generate")) return cmd_generate(argc, argv);
    if (!strcmp(cmd, "mkmodel")) return cmd_mkmodel(argc, argv);
    if (!strcmp(cmd, "bench")) return cmd_bench(argc, argv);
    if (!strcmp(cmd, "plan")) return cmd_plan(argc, argv);
    if (!strcmp(cmd, "serve")) return tsr_cmd_serve(argc, argv);
    if (!strcmp(cmd, "chat")) return tsr_cmd_chat(argc, argv);
    if (!strcmp(cmd, "batch")) return tsr_cmd_batch(argc, argv);
    if (!strcmp(cmd, "coordinator")) return tsr_cmd_coordinator(argc, argv);
    if (!strcmp(cmd, "ctl")) return tsr_cmd_ctl(argc, argv);
    fprintf(stderr, "%s: unknown command '%s'\n\n%s", g_prog, cmd, main_help);
    return TSR_CLI_EXIT_USAGE;
}
