/*
 * chat_main.c — `tessera chat`: talk to an instruct model with chat messages.
 *
 * The conversation (an optional --system message, then user and assistant turns) is
 * rendered with the model's chat template (coordinator/chat.h), tokenized with special
 * tokens parsed, and generated through the serving engine like `generate`, with the same
 * flags (coordinator/cli.h). Three ways to run:
 *   - `-p MESSAGE`: one answer on stdout;
 *   - stdin is a terminal: an interactive session that streams each answer, keeps the
 *     history, understands /reset and /quit, and where Ctrl-C stops the answer being
 *     generated (not the session);
 *   - stdin is not a terminal: one user message per line, one answer per line.
 *
 * Threads: the engine's step loop must run on the main thread (it owns MPI on a tp × pp
 * replica), so the conversation runs on a second thread that submits one turn at a time
 * and waits for its end; interactive sessions have a third that takes SIGINT (blocked in
 * every thread) with sigwait and cancels the answer in flight.
 */
#include "coordinator/chat.h"
#include "coordinator/cli.h"
#include "coordinator/engine.h"
#include "worker/comm.h"
#include "worker/replica.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DEFAULT_MODEL "../shared/models/stories260K.gguf"

static const char *chat_help =
    "usage: tessera chat -m MODEL [--system TEXT] [-p MESSAGE] [--json] [flags]\n"
    "\n"
    "Chat with an instruct model. The conversation is laid out with the model's chat\n"
    "template (tokenizer.chat_template) and generation stops at the model's\n"
    "end-of-generation tokens.\n"
    "  with -p:               one answer to MESSAGE on stdout\n"
    "  on a terminal:         an interactive session: answers stream as they are\n"
    "                         generated, the history is kept; /reset forgets it, /quit\n"
    "                         (or Ctrl-D) ends; Ctrl-C stops the answer being generated\n"
    "  otherwise:             one message per line of stdin, one answer per line\n"
    "\n"
    "  -p, --prompt MESSAGE        the user's message (one answer, then exit)\n"
    "  -s, --system TEXT           the system message (default: the template's own, if any)\n"
    "      --chat-template NAME    use template family NAME (or a Jinja text) instead of\n"
    "                              the model's: chatml, llama2, llama3, gemma, phi3,\n"
    "                              zephyr, deepseek, mistral-v7, ... (an unknown NAME lists\n"
    "                              them all)\n"
    "      --no-prefix-cache       recompute the whole conversation every turn (default:\n"
    "                              the earlier turns' full 16-token prompt blocks are "
    "reused)\n" TSR_CLI_GEN_HELP(
        DEFAULT_MODEL) "      --json                  print one JSON object per answer (after the "
                       "session):\n"
                       "                              the keys of 'generate --json' plus prompt "
                       "(the rendered\n"
                       "                              conversation) and "
                       "template\n" TSR_CLI_REPLICA_HELP
                       "  -h, --help                  this help\n";

/* ---- one answer ---- */

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stream; /* write text to stdout as it comes */
    int32_t *ids;
    size_t n_ids, cap;
    char *text;
    size_t text_len, text_cap;
    bool oom;
    tsr_event fin;
    bool done;
    char error[512];
} turn_sink;

static void sink_reset(turn_sink *s)
{
    s->n_ids = 0;
    s->text_len = 0;
    if (s->text) s->text[0] = 0;
    s->oom = false;
    s->done = false;
    s->error[0] = 0;
    memset(&s->fin, 0, sizeof s->fin);
}

/* Engine callback (step-loop thread): copy, print, signal the end; never blocks long. */
static void sink_on_event(void *ud, const tsr_event *ev)
{
    turn_sink *s = ud;
    pthread_mutex_lock(&s->mu);
    if (ev->kind == TSR_EV_TOKENS) {
        if (s->n_ids + ev->n_ids > s->cap) {
            size_t cap = s->cap ? 2 * s->cap : 256;
            while (cap < s->n_ids + ev->n_ids) cap *= 2;
            int32_t *p = realloc(s->ids, cap * sizeof *p);
            if (p) {
                s->ids = p;
                s->cap = cap;
            }
        }
        if (s->n_ids + ev->n_ids <= s->cap) {
            memcpy(s->ids + s->n_ids, ev->ids, ev->n_ids * sizeof *ev->ids);
            s->n_ids += ev->n_ids;
        } else {
            s->oom = true;
        }
        if (ev->text_len) {
            if (s->text_len + ev->text_len + 1 > s->text_cap) {
                size_t cap = s->text_cap ? 2 * s->text_cap : 1024;
                while (cap < s->text_len + ev->text_len + 1) cap *= 2;
                char *p = realloc(s->text, cap);
                if (p) {
                    s->text = p;
                    s->text_cap = cap;
                }
            }
            if (s->text_len + ev->text_len + 1 <= s->text_cap) {
                memcpy(s->text + s->text_len, ev->text, ev->text_len);
                s->text_len += ev->text_len;
                s->text[s->text_len] = 0;
            } else {
                s->oom = true;
            }
            if (s->stream) {
                fwrite(ev->text, 1, ev->text_len, stdout);
                fflush(stdout);
            }
        }
    } else {
        s->fin = *ev;
        s->fin.ids = NULL;
        s->fin.text = NULL;
        s->fin.error = NULL;
        if (ev->error) snprintf(s->error, sizeof s->error, "%s", ev->error);
        s->done = true;
        pthread_cond_broadcast(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
}

/* ---- the session ---- */

typedef enum { MODE_ONE, MODE_INTERACTIVE, MODE_LINES } chat_mode;

typedef struct {
    tsr_engine *eng;
    const tsr_vocab *vocab;
    const tsr_chat_template *tmpl;
    tsr_cli_gen_opts *o;
    int32_t n_ctx;
    bool has_drafter;
    chat_mode mode;
    bool json;
    const char *system;
    const char *prompt; /* MODE_ONE */

    tsr_chat_msg *msgs; /* the history; contents owned (strdup) */
    size_t n_msgs, cap_msgs;

    turn_sink sink;
    pthread_mutex_t mu; /* guards in_flight / req_id (the signal thread reads them) */
    bool in_flight;
    uint64_t req_id;

    cJSON *answers; /* --json: one object per answer */
    int rc;         /* exit status of the session */
    char err[1024];
} chat_session;

static int history_add(chat_session *c, const char *role, const char *content)
{
    if (c->n_msgs == c->cap_msgs) {
        size_t cap = c->cap_msgs ? 2 * c->cap_msgs : 16;
        tsr_chat_msg *p = realloc(c->msgs, cap * sizeof *p);
        if (!p) return -1;
        c->msgs = p;
        c->cap_msgs = cap;
    }
    char *dup = strdup(content);
    if (!dup) return -1;
    c->msgs[c->n_msgs].role = role;
    c->msgs[c->n_msgs].content = dup;
    c->n_msgs++;
    return 0;
}

static void history_reset(chat_session *c)
{
    for (size_t i = 0; i < c->n_msgs; i++) free((char *)c->msgs[i].content);
    c->n_msgs = 0;
    if (c->system) history_add(c, "system", c->system);
}

/* Print to stderr in the session's voice. */
static void say(const char *fmt, const char *arg)
{
    fprintf(stderr, "tessera chat: ");
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
}

/*
 * One turn: add the user's message, render, generate, add the answer. Returns 0 on an
 * answer (also a cancelled one), 1 when the turn could not run but the session may go on
 * (context full: the message is dropped again), -1 when the session must end (c->err).
 */
static int chat_turn(chat_session *c, const char *message)
{
    int32_t *ids = NULL;
    size_t n_ids = 0;
    char *text = NULL;
    size_t len = 0;
    if (history_add(c, "user", message) != 0) {
        snprintf(c->err, sizeof c->err, "out of memory");
        return -1;
    }
    if (tsr_chat_render(c->tmpl, c->msgs, c->n_msgs, true, &text, &len, c->err, sizeof c->err) ||
        tsr_chat_tokenize(c->vocab, text, len, &ids, &n_ids, c->err, sizeof c->err)) {
        free(text);
        return -1;
    }
    if (n_ids >= (size_t)c->n_ctx) {
        snprintf(c->err, sizeof c->err,
                 "the conversation is %zu tokens and the context holds %d: /reset it (or start "
                 "with a larger --ctx-size)",
                 n_ids, c->n_ctx);
        free(text);
        free(ids);
        c->n_msgs--;
        free((char *)c->msgs[c->n_msgs].content);
        return 1;
    }
    tsr_engine_request rq = {.prompt_ids = ids,
                             .n_prompt = n_ids,
                             .gen = c->o->gp,
                             .speculation = c->has_drafter ? 1 : 0,
                             .on_event = sink_on_event,
                             .ud = &c->sink};
    /* The context bounds max_tokens: generate what fits, finish "length". */
    if ((size_t)rq.gen.max_tokens + n_ids > (size_t)c->n_ctx)
        rq.gen.max_tokens = c->n_ctx - (int32_t)n_ids;
    pthread_mutex_lock(&c->sink.mu);
    sink_reset(&c->sink);
    c->sink.stream = !c->json;
    pthread_mutex_unlock(&c->sink.mu);
    if (rq.gen.max_tokens > 0) {
        pthread_mutex_lock(&c->mu);
        int src = tsr_engine_submit(c->eng, &rq, &c->req_id, c->err, sizeof c->err);
        c->in_flight = src == 0;
        pthread_mutex_unlock(&c->mu);
        if (src != 0) {
            free(text);
            free(ids);
            return -1;
        }
        pthread_mutex_lock(&c->sink.mu);
        while (!c->sink.done) pthread_cond_wait(&c->sink.cv, &c->sink.mu);
        pthread_mutex_unlock(&c->sink.mu);
        pthread_mutex_lock(&c->mu);
        c->in_flight = false;
        pthread_mutex_unlock(&c->mu);
    } else {
        c->sink.done = true; /* nothing to generate (-n 0) */
        c->sink.fin.finish_reason = TSR_FINISH_LENGTH;
    }
    turn_sink *s = &c->sink;
    int reason = s->fin.finish_reason;
    if (reason == TSR_FINISH_ERROR || s->oom) {
        snprintf(c->err, sizeof c->err, "generation failed: %s",
                 s->oom ? "out of memory" : (s->error[0] ? s->error : "?"));
        free(text);
        free(ids);
        return -1;
    }
    if (!c->json) {
        putchar('\n');
        fflush(stdout);
        if (reason == TSR_FINISH_CANCELLED) fprintf(stderr, "[stopped]\n");
        if (c->mode != MODE_INTERACTIVE) {
            double tp = s->fin.t_first_token_ns / 1e9;
            double dc = s->n_ids > 1 && s->fin.t_decode_ns
                            ? (double)(s->n_ids - 1) * 1e9 / (double)s->fin.t_decode_ns
                            : 0.0;
            fprintf(stderr,
                    "[%zu prompt tokens, %zu generated, finish: %s; prefill %.1f tokens/s, "
                    "decode %.1f tokens/s]\n",
                    n_ids, s->n_ids, tsr_cli_finish_name(reason), tp > 0 ? n_ids / tp : 0.0, dc);
        }
    } else {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "prompt", text);
        cJSON_AddStringToObject(o, "template", tsr_chat_template_name(c->tmpl));
        cJSON *pi = cJSON_AddArrayToObject(o, "prompt_ids");
        for (size_t i = 0; i < n_ids; i++) cJSON_AddItemToArray(pi, cJSON_CreateNumber(ids[i]));
        cJSON *gi = cJSON_AddArrayToObject(o, "ids");
        for (size_t i = 0; i < s->n_ids; i++)
            cJSON_AddItemToArray(gi, cJSON_CreateNumber(s->ids[i]));
        cJSON_AddStringToObject(o, "text", s->text ? s->text : "");
        cJSON_AddStringToObject(o, "finish_reason", tsr_cli_finish_name(reason));
        double tp = s->fin.t_first_token_ns / 1e9;
        cJSON_AddNumberToObject(o, "prefill_tokens_per_s", tp > 0 ? (double)n_ids / tp : 0.0);
        cJSON_AddNumberToObject(o, "decode_tokens_per_s",
                                s->n_ids > 1 && s->fin.t_decode_ns
                                    ? (double)(s->n_ids - 1) * 1e9 / (double)s->fin.t_decode_ns
                                    : 0.0);
        cJSON_AddNumberToObject(o, "spec_drafted", s->fin.spec_drafted);
        cJSON_AddNumberToObject(o, "spec_accepted", s->fin.spec_accepted);
        cJSON_AddNumberToObject(o, "seed", (double)c->o->gp.sampling.seed);
        cJSON_AddNumberToObject(o, "threads", (double)c->o->n_threads);
        cJSON_AddNumberToObject(o, "tp", c->o->rp.tp);
        cJSON_AddNumberToObject(o, "pp", c->o->rp.pp);
        cJSON_AddItemToArray(c->answers, o);
    }
    free(text);
    free(ids);
    if (history_add(c, "assistant", s->text ? s->text : "") != 0) {
        snprintf(c->err, sizeof c->err, "out of memory");
        return -1;
    }
    return 0;
}

/* A line without its end-of-line characters. */
static void chomp(char *s)
{
    size_t n = strlen(s);
    while (n && (s[n - 1] == '\n' || s[n - 1] == '\r')) s[--n] = 0;
}

static void *conversation(void *arg)
{
    chat_session *c = arg;
    history_reset(c);
    if (c->mode == MODE_ONE) {
        int r = chat_turn(c, c->prompt);
        if (r != 0) c->rc = 1;
        goto done;
    }
    char *line = NULL;
    size_t cap = 0;
    for (;;) {
        if (c->mode == MODE_INTERACTIVE) {
            fputs("> ", stdout);
            fflush(stdout);
        }
        errno = 0;
        ssize_t n = getline(&line, &cap, stdin);
        if (n < 0) {
            if (c->mode == MODE_INTERACTIVE) putchar('\n');
            break; /* end of input (Ctrl-D) */
        }
        chomp(line);
        if (c->mode == MODE_INTERACTIVE) {
            if (!strcmp(line, "/quit") || !strcmp(line, "/exit")) break;
            if (!strcmp(line, "/reset")) {
                history_reset(c);
                fputs("(conversation reset)\n", stdout);
                continue;
            }
            if (line[0] == '/') {
                fputs("(commands: /reset forgets the conversation, /quit ends; Ctrl-C stops "
                      "an answer)\n",
                      stdout);
                continue;
            }
            if (!line[0]) continue;
        }
        int r = chat_turn(c, line);
        if (r < 0) {
            c->rc = 1;
            break;
        }
        if (r > 0) say("%s", c->err);
    }
    free(line);
done:
    tsr_engine_stop(c->eng, false);
    return NULL;
}

/* Interactive sessions: SIGINT (blocked everywhere) stops the answer in flight. */
static void *sigint_thread(void *arg)
{
    chat_session *c = arg;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    for (;;) {
        int sig;
        if (sigwait(&set, &sig) != 0) continue;
        pthread_mutex_lock(&c->mu);
        bool busy = c->in_flight;
        uint64_t id = c->req_id;
        pthread_mutex_unlock(&c->mu);
        if (busy) {
            tsr_engine_cancel(c->eng, id);
        } else {
            fputs("\n(/quit or Ctrl-D ends the session)\n> ", stdout);
            fflush(stdout);
        }
    }
    return NULL;
}

int tsr_cmd_chat(int argc, char **argv)
{
    enum { O_JSON = 400, O_TEMPLATE, O_NO_PREFIX_CACHE };
    static const struct option opts[] = {TSR_CLI_GEN_OPTS,
                                         {"prompt", required_argument, 0, 'p'},
                                         {"system", required_argument, 0, 's'},
                                         {"chat-template", required_argument, 0, O_TEMPLATE},
                                         {"json", no_argument, 0, O_JSON},
                                         {"no-prefix-cache", no_argument, 0, O_NO_PREFIX_CACHE},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    tsr_cli_gen_opts o;
    tsr_cli_gen_defaults(&o, DEFAULT_MODEL);
    chat_session c;
    memset(&c, 0, sizeof c);
    const char *tmpl_override = NULL;
    bool no_prefix_cache = false;
    int ch;
    while ((ch = getopt_long(argc, argv, TSR_CLI_GEN_SHORTOPTS "p:s:h", opts, NULL)) != -1) {
        switch (ch) {
        case 'p':
            c.prompt = optarg;
            break;
        case 's':
            c.system = optarg;
            break;
        case O_TEMPLATE:
            tmpl_override = optarg;
            break;
        case O_JSON:
            c.json = true;
            break;
        case O_NO_PREFIX_CACHE:
            no_prefix_cache = true;
            break;
        case 'h':
            fputs(chat_help, stdout);
            return 0;
        default: {
            int r = tsr_cli_gen_flag("chat", ch, optarg, &o);
            if (r >= 0) {
                if (r) return r;
                break;
            }
            return tsr_cli_usage_error("chat", "unknown flag");
        }
        }
    }
    if (optind != argc)
        return tsr_cli_usage_error("chat", "unexpected argument '%s' (the message goes after -p)",
                                   argv[optind]);
    if (c.prompt && !*c.prompt) return tsr_cli_usage_error("chat", "-p needs a non-empty message");
    int r = tsr_cli_gen_finish("chat", &o);
    if (r) return r;
    if (tmpl_override) { /* a bad name is a usage error, before the model is loaded */
        tsr_chat_template *t = NULL;
        char e[1024];
        if (tsr_chat_template_new(tmpl_override, NULL, NULL, &t, e, sizeof e) != 0)
            return tsr_cli_usage_error("chat", "%s", e);
        tsr_chat_template_free(t);
    }
    c.o = &o;
    c.mode = c.prompt ? MODE_ONE : isatty(STDIN_FILENO) ? MODE_INTERACTIVE : MODE_LINES;

    /* A paged replica (the engine's layout) holding one full context. */
    o.rp.n_kv_blocks = TSR_REPLICA_KV_ONE_CONTEXT;
    tsr_replica *rep;
    if (tsr_cli_replica_open("chat", o.model, &o.rp, &rep) != 0) return 1;
    if (!tsr_replica_is_leader(rep)) return tsr_cli_follow("chat", rep);

    char err[1024];
    int rc = 1;
    bool ok = false;
    tsr_chat_template *tmpl = NULL;
    tsr_drafter *drafter = NULL;
    tsr_rank_stats *st = calloc((size_t)tsr_replica_size(rep), sizeof *st);
    pthread_t conv_thread, sig_thread;
    bool conv_started = false, sig_started = false;
    pthread_mutex_init(&c.mu, NULL);
    pthread_mutex_init(&c.sink.mu, NULL);
    pthread_cond_init(&c.sink.cv, NULL);
    c.answers = cJSON_CreateArray();
    c.vocab = tsr_replica_vocab(rep);
    c.n_ctx = tsr_replica_n_ctx(rep);
    if (!st || !c.answers) {
        snprintf(err, sizeof err, "out of memory");
        goto stop;
    }
    if (tsr_chat_template_for_model(tsr_replica_gguf(rep), c.vocab, tmpl_override, &tmpl, err,
                                    sizeof err) != 0)
        goto stop;
    c.tmpl = tmpl;
    if (tsr_cli_gen_drafter(&o, rep, &drafter, err, sizeof err) != 0) goto stop;
    c.has_drafter = drafter != NULL;
    tsr_engine_params ep = {.max_batch_tokens = tsr_replica_n_batch(rep),
                            .max_seqs = 4,
                            .max_queue = 4,
                            .drafter = drafter,
                            .spec_k = (int32_t)o.spec_k,
                            .spec_default_on = true,
                            .no_prefix_cache = no_prefix_cache};
    if (tsr_engine_new(rep, &ep, &c.eng, err, sizeof err) != 0) goto stop;

    if (c.mode == MODE_INTERACTIVE) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGINT);
        pthread_sigmask(SIG_BLOCK, &set, NULL); /* inherited by the threads below */
        if (pthread_create(&sig_thread, NULL, sigint_thread, &c) != 0) {
            snprintf(err, sizeof err, "cannot start a thread");
            goto stop;
        }
        sig_started = true;
        fprintf(stderr,
                "tessera chat: %s, template %s. /reset forgets the conversation, /quit ends; "
                "Ctrl-C stops an answer.\n",
                o.model, tsr_chat_template_name(tmpl));
    }
    if (pthread_create(&conv_thread, NULL, conversation, &c) != 0) {
        snprintf(err, sizeof err, "cannot start a thread");
        goto stop;
    }
    conv_started = true;
    if (tsr_engine_run(c.eng, err, sizeof err) != 0) {
        /* Every open request got a FINISH with an error: the conversation ends too. */
        pthread_join(conv_thread, NULL);
        conv_started = false;
        goto stop;
    }
    pthread_join(conv_thread, NULL);
    conv_started = false;
    if (c.rc != 0) {
        snprintf(err, sizeof err, "%s", c.err);
        goto stop;
    }
    ok = true;
stop:
    if (conv_started) { /* the engine never ran: nothing will answer */
        tsr_engine_stop(c.eng, true);
        pthread_join(conv_thread, NULL);
    }
    if (sig_started) {
        pthread_cancel(sig_thread);
        pthread_join(sig_thread, NULL);
    }
    char err2[512];
    if (tsr_replica_shutdown(rep, err2, sizeof err2) != 0 ||
        tsr_replica_stats(rep, st, err2, sizeof err2) != 0) {
        fprintf(stderr, "tessera chat: %s\n", err2);
        tsr_comm_mpi_abort(1);
        goto done;
    }
    if (!ok) {
        fprintf(stderr, "tessera chat: %s\n", err);
        goto done;
    }
    if (c.json) {
        cJSON *a;
        cJSON_ArrayForEach(a, c.answers)
        {
            cJSON_AddItemToObject(a, "ranks", tsr_cli_ranks_json(st, tsr_replica_size(rep)));
            char *s = cJSON_PrintUnformatted(a);
            if (s) puts(s);
            free(s);
        }
    }
    rc = 0;
done:
    for (size_t i = 0; i < c.n_msgs; i++) free((char *)c.msgs[i].content);
    free(c.msgs);
    free(c.sink.ids);
    free(c.sink.text);
    cJSON_Delete(c.answers);
    tsr_engine_free(c.eng);
    tsr_drafter_free(drafter);
    tsr_chat_template_free(tmpl);
    free(st);
    pthread_cond_destroy(&c.sink.cv);
    pthread_mutex_destroy(&c.sink.mu);
    pthread_mutex_destroy(&c.mu);
    tsr_replica_close(rep);
    return rc;
}
