/*
 * chat.c — chat template families: detection from the Jinja text and rendering in C.
 *
 * Detection follows the order of llama.cpp's llm_chat_detect_template (the first family
 * whose tell-tale strings the template contains wins), so a template is read the same way
 * as llama.cpp reads it. Rendering follows each family's own Jinja template (see chat.h):
 * where llama.cpp's built-in renderer and the Jinja output differ (Llama 2 spaces around
 * answers, Mistral v3 system prompt in the last user turn, BOS texts), the Jinja output is
 * what is reproduced.
 */
#include "coordinator/chat.h"

#include "kernels/util.h"

#include <ctype.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum {
    FAM_CHATML,
    FAM_LLAMA2,
    FAM_LLAMA2_SYS,
    FAM_LLAMA2_SYS_BOS,
    FAM_LLAMA2_SYS_STRIP,
    FAM_MISTRAL_V1,
    FAM_MISTRAL_V3,
    FAM_MISTRAL_V3_TEKKEN,
    FAM_MISTRAL_V7,
    FAM_LLAMA3,
    FAM_GEMMA,
    FAM_PHI3,
    FAM_PHI4,
    FAM_ZEPHYR,
    FAM_MONARCH,
    FAM_DEEPSEEK,
    FAM_DEEPSEEK2,
    FAM_DEEPSEEK3,
    FAM_VICUNA,
    FAM_VICUNA_ORCA,
    FAM_COMMAND_R,
    FAM_OPENCHAT,
    FAM_CHATGLM3,
    FAM_CHATGLM4,
    FAM_GLMEDGE,
    FAM_MINICPM,
    FAM_GRANITE,
    FAM_MEGREZ,
    FAM_BAILING,
    FAM_SEED_OSS,
    FAM_COUNT
} family;

/* The names llama.cpp gives the same families (--chat-template NAME). */
static const char *const k_names[FAM_COUNT] = {
    [FAM_CHATML] = "chatml",
    [FAM_LLAMA2] = "llama2",
    [FAM_LLAMA2_SYS] = "llama2-sys",
    [FAM_LLAMA2_SYS_BOS] = "llama2-sys-bos",
    [FAM_LLAMA2_SYS_STRIP] = "llama2-sys-strip",
    [FAM_MISTRAL_V1] = "mistral-v1",
    [FAM_MISTRAL_V3] = "mistral-v3",
    [FAM_MISTRAL_V3_TEKKEN] = "mistral-v3-tekken",
    [FAM_MISTRAL_V7] = "mistral-v7",
    [FAM_LLAMA3] = "llama3",
    [FAM_GEMMA] = "gemma",
    [FAM_PHI3] = "phi3",
    [FAM_PHI4] = "phi4",
    [FAM_ZEPHYR] = "zephyr",
    [FAM_MONARCH] = "monarch",
    [FAM_DEEPSEEK] = "deepseek",
    [FAM_DEEPSEEK2] = "deepseek2",
    [FAM_DEEPSEEK3] = "deepseek3",
    [FAM_VICUNA] = "vicuna",
    [FAM_VICUNA_ORCA] = "vicuna-orca",
    [FAM_COMMAND_R] = "command-r",
    [FAM_OPENCHAT] = "openchat",
    [FAM_CHATGLM3] = "chatglm3",
    [FAM_CHATGLM4] = "chatglm4",
    [FAM_GLMEDGE] = "glmedge",
    [FAM_MINICPM] = "minicpm",
    [FAM_GRANITE] = "granite",
    [FAM_MEGREZ] = "megrez",
    [FAM_BAILING] = "bailing",
    [FAM_SEED_OSS] = "seed_oss",
};

#define U_USER                                                                                     \
    "<\xEF\xBD\x9C"                                                                                \
    "User\xEF\xBD\x9C>" /* <｜User｜> */
#define U_ASSISTANT                                                                                \
    "<\xEF\xBD\x9C"                                                                                \
    "Assistant\xEF\xBD\x9C>" /* <｜Assistant｜> */
#define U_EOS                                                                                      \
    "<\xEF\xBD\x9C"                                                                                \
    "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>"
#define U_MINICPM_USER "<\xE7\x94\xA8\xE6\x88\xB7>" /* <用户> */

struct tsr_chat_template {
    family fam;
    char *bos; /* text written where the template writes bos_token ("" when it does not) */
    char *eos; /* text of eos_token ("</s>" when the vocabulary has none) */
    char *eot; /* zephyr: "<|endoftext|>" or the EOS text */
    char *default_system; /* NULL when the template has none */
    bool bos_turns;       /* Llama 2: every user turn starts with bos_token */
    bool user_assistant;  /* Phi-3 mini/medium: only user and assistant branches (system
                             messages render nothing; each user turn opens the answer) */
};

static char g_names[512];
static pthread_once_t g_names_once = PTHREAD_ONCE_INIT;

static void names_init(void)
{
    size_t o = 0;
    for (int f = 0; f < FAM_COUNT; f++)
        o += (size_t)snprintf(g_names + o, sizeof g_names - o, "%s%s", f ? ", " : "", k_names[f]);
}

const char *tsr_chat_family_names(void)
{
    pthread_once(&g_names_once, names_init); /* server threads may ask at once */
    return g_names;
}

/* ---- detection ---- */

static bool has(const char *t, const char *s)
{
    return strstr(t, s) != NULL;
}

static int detect(const char *t)
{
    if (has(t, "<|im_start|>")) {
        if (has(t, "<|im_sep|>")) return FAM_PHI4;
        if (has(t, "<end_of_utterance>")) return -1; /* SmolVLM: <|im_start|> but not ChatML */
        return FAM_CHATML;
    }
    if (strncmp(t, "mistral", 7) == 0 || has(t, "[INST]")) {
        if (has(t, "[SYSTEM_PROMPT]")) return FAM_MISTRAL_V7;
        if (has(t, "' [INST] ' + system_message") || has(t, "[AVAILABLE_TOOLS]")) {
            if (has(t, " [INST]")) return FAM_MISTRAL_V1;
            if (has(t, "\"[INST]\"")) return FAM_MISTRAL_V3_TEKKEN;
            return FAM_MISTRAL_V3;
        }
        if (has(t, "content.strip()")) return FAM_LLAMA2_SYS_STRIP;
        if (has(t, "bos_token + '[INST]")) return FAM_LLAMA2_SYS_BOS;
        if (has(t, "<<SYS>>")) return FAM_LLAMA2_SYS;
        return FAM_LLAMA2;
    }
    if (has(t, "<|assistant|>") && has(t, "<|end|>")) return FAM_PHI3;
    if (has(t, "[gMASK]<sop>")) return FAM_CHATGLM4;
    /* Zephyr writes each turn's end as eos_token (HuggingFaceH4/zephyr-7b-beta) or as
     * <|endoftext|> (stablelm-zephyr); llama.cpp only knows the latter and reads the former
     * as GLM-Edge, which renders no end-of-turn at all. */
    if (has(t, "<|user|>") && has(t, "<|assistant|>") && has(t, "eos_token") && !has(t, "</s>"))
        return FAM_ZEPHYR;
    if (has(t, "<|assistant|>") && has(t, "<|user|>"))
        return has(t, "</s>") ? -1 /* falcon3: not rendered here */ : FAM_GLMEDGE;
    if (has(t, "<|{{ item['role'] }}|>") && has(t, "<|begin_of_image|>")) return FAM_GLMEDGE;
    if (has(t, "<|user|>") && has(t, "<|endoftext|>")) return FAM_ZEPHYR;
    if (has(t, "bos_token + message['role']")) return FAM_MONARCH;
    if (has(t, "<start_of_turn>")) return FAM_GEMMA;
    if (has(t, "'\\n\\nAssistant: ' + eos_token")) return -1; /* orion */
    if (has(t, "GPT4 Correct ")) return FAM_OPENCHAT;
    if (has(t, "USER: ") && has(t, "ASSISTANT: "))
        return has(t, "SYSTEM: ") ? FAM_VICUNA_ORCA : FAM_VICUNA;
    if (has(t, "### Instruction:") && has(t, "<|EOT|>")) return FAM_DEEPSEEK;
    if (has(t, "<|START_OF_TURN_TOKEN|>") && has(t, "<|USER_TOKEN|>")) return FAM_COMMAND_R;
    if (has(t, "<|start_header_id|>") && has(t, "<|end_header_id|>")) return FAM_LLAMA3;
    if (has(t, "[gMASK]sop")) return FAM_CHATGLM3;
    if (has(t, U_MINICPM_USER)) return FAM_MINICPM;
    if (has(t, "'Assistant: ' + message['content'] + eos_token")) return FAM_DEEPSEEK2;
    if (has(t, U_ASSISTANT) && has(t, U_USER) && has(t, U_EOS)) return FAM_DEEPSEEK3;
    if (has(t, "<|start_of_role|>")) return FAM_GRANITE;
    if (has(t, "<|role_start|>")) return FAM_MEGREZ;
    if (has(t, "<role>ASSISTANT</role>") && has(t, "'HUMAN'")) return FAM_BAILING;
    if (has(t, "<seed:bos>")) return FAM_SEED_OSS;
    return -1;
}

const char *tsr_chat_detect(const char *jinja)
{
    int f = jinja ? detect(jinja) : -1;
    return f < 0 ? NULL : k_names[f];
}

/* ---- default system prompts written in the template ---- */

/* Decode the Jinja string literal that starts at s (at its opening quote) into a malloc'd
 * string; *end gets the position after the closing quote. NULL when malformed. */
static char *jinja_literal(const char *s, const char **end)
{
    char q = *s;
    if (q != '\'' && q != '"') return NULL;
    size_t n = 0, cap = 64;
    char *out = malloc(cap);
    if (!out) return NULL;
    for (s++; *s && *s != q; s++) {
        char c = *s;
        if (c == '\\' && s[1]) {
            s++;
            switch (*s) {
            case 'n':
                c = '\n';
                break;
            case 't':
                c = '\t';
                break;
            case 'r':
                c = '\r';
                break;
            default:
                c = *s;
                break; /* \' \" \\ */
            }
        }
        if (n + 2 > cap) {
            char *p = realloc(out, cap *= 2);
            if (!p) {
                free(out);
                return NULL;
            }
            out = p;
        }
        out[n++] = c;
    }
    if (*s != q) {
        free(out);
        return NULL;
    }
    out[n] = 0;
    *end = s + 1;
    return out;
}

/* A literal that begins with `prefix` and ends with `suffix` ("<|im_start|>system\n...
 * <|im_end|>\n"): the text between them is the default system prompt. Only literals with
 * text after the prefix count ('<|im_start|>system\n' + messages[0]['content'] does not). */
static char *find_default_system(const char *t, const char *prefix, const char *suffix)
{
    size_t pl = strlen(prefix), sl = strlen(suffix);
    for (const char *p = t; (p = strpbrk(p, "'\"")) != NULL;) {
        const char *end;
        char *lit = jinja_literal(p, &end);
        if (!lit) return NULL;
        size_t n = strlen(lit);
        if (n > pl + sl && !strncmp(lit, prefix, pl)) {
            char *e = strstr(lit + pl, suffix);
            if (e && e > lit + pl) {
                size_t len = (size_t)(e - (lit + pl));
                memmove(lit, lit + pl, len);
                lit[len] = 0;
                return lit;
            }
        }
        free(lit);
        p = end;
    }
    return NULL;
}

/* The literal written right after `marker` (DeepSeek Coder: after "if not ns.found"). */
static char *literal_after(const char *t, const char *marker)
{
    const char *p = strstr(t, marker);
    if (!p) return NULL;
    p = strpbrk(p + strlen(marker), "'\"");
    const char *end;
    return p ? jinja_literal(p, &end) : NULL;
}

/* ---- creation ---- */

static char *dup_or(const char *s, const char *dflt)
{
    return strdup(s ? s : dflt);
}

static int name_to_family(const char *s)
{
    for (int f = 0; f < FAM_COUNT; f++)
        if (!strcmp(s, k_names[f])) return f;
    if (!strcmp(s, "mistral")) return FAM_LLAMA2; /* llama.cpp's name for pre-v1 Mistral */
    if (!strcmp(s, "llama3.1") || !strcmp(s, "llama-3")) return FAM_LLAMA3;
    if (!strcmp(s, "qwen2") || !strcmp(s, "smollm")) return FAM_CHATML;
    return -1;
}

int tsr_chat_template_new(const char *spec, const char *bos_text, const char *eos_text,
                          tsr_chat_template **out, char *err, size_t err_len)
{
    if (err && err_len) err[0] = 0;
    *out = NULL;
    if (!spec || !*spec)
        return tsr_fail(err, err_len, TSR_CHAT_ERR_UNKNOWN,
                        "empty chat template; pass --chat-template NAME, one of: %s",
                        tsr_chat_family_names());
    bool is_name = !strstr(spec, "{%") && !strstr(spec, "{{");
    int f = is_name ? name_to_family(spec) : detect(spec);
    if (f < 0) {
        if (is_name)
            return tsr_fail(err, err_len, TSR_CHAT_ERR_UNKNOWN,
                            "unknown chat template '%.64s'; known families: %s", spec,
                            tsr_chat_family_names());
        return tsr_fail(err, err_len, TSR_CHAT_ERR_UNKNOWN,
                        "the model's chat template is of no family Tessera knows; pass "
                        "--chat-template NAME, one of: %s",
                        tsr_chat_family_names());
    }
    tsr_chat_template *t = calloc(1, sizeof *t);
    if (!t) return tsr_fail(err, err_len, TSR_CHAT_ERR_NOMEM, "out of memory");
    t->fam = (family)f;
    /* A template that writes bos_token starts with it; a family name gets none (the
     * tokenizer adds BOS as the vocabulary says, as llama.cpp's named templates do). */
    bool writes_bos = !is_name && strstr(spec, "bos_token") != NULL;
    t->bos = dup_or(writes_bos ? bos_text : NULL, "");
    t->eos = dup_or(eos_text, "</s>");
    t->eot = strdup(!is_name && t->fam == FAM_ZEPHYR && !strstr(spec, "<|endoftext|>")
                        ? t->eos
                        : "<|endoftext|>");
    if (!t->bos || !t->eos || !t->eot) {
        tsr_chat_template_free(t);
        return tsr_fail(err, err_len, TSR_CHAT_ERR_NOMEM, "out of memory");
    }
    if (!is_name) {
        t->bos_turns = strstr(spec, "bos_token + '[INST]") != NULL;
        t->user_assistant =
            t->fam == FAM_PHI3 && !strstr(spec, "system") && !strstr(spec, "+ message['role'] +");
        if (t->fam == FAM_CHATML)
            t->default_system = find_default_system(spec, "<|im_start|>system\n", "<|im_end|>");
        else if (t->fam == FAM_MEGREZ)
            t->default_system =
                find_default_system(spec, "<|role_start|>system<|role_end|>", "<|turn_end|>");
        else if (t->fam == FAM_DEEPSEEK)
            t->default_system = literal_after(spec, "if not ns.found");
    }
    *out = t;
    return 0;
}

/* The text of token id, or NULL (no token). */
static const char *token_text(const tsr_vocab *v, int32_t id)
{
    return id >= 0 ? tsr_vocab_token_text(v, id, NULL) : NULL;
}

int tsr_chat_template_for_model(const tsr_gguf *g, const tsr_vocab *v, const char *override,
                                tsr_chat_template **out, char *err, size_t err_len)
{
    *out = NULL;
    const char *bos = token_text(v, tsr_vocab_bos(v)), *eos = token_text(v, tsr_vocab_eos(v));
    if (override) return tsr_chat_template_new(override, bos, eos, out, err, err_len);
    tsr_gguf_str s;
    if (!tsr_gguf_get_str(g, "tokenizer.chat_template", &s))
        return tsr_fail(err, err_len, TSR_CHAT_ERR_UNKNOWN,
                        "the model has no chat template (no tokenizer.chat_template key): pass "
                        "--chat-template NAME, one of: %s",
                        tsr_chat_family_names());
    char *text = malloc(s.len + 1);
    if (!text) return tsr_fail(err, err_len, TSR_CHAT_ERR_NOMEM, "out of memory");
    memcpy(text, s.ptr, s.len);
    text[s.len] = 0;
    int rc =
        strlen(text) != s.len
            ? tsr_fail(err, err_len, TSR_CHAT_ERR_UNKNOWN,
                       "tokenizer.chat_template contains a NUL byte; pass --chat-template NAME")
            : tsr_chat_template_new(text, bos, eos, out, err, err_len);
    free(text);
    return rc;
}

void tsr_chat_template_free(tsr_chat_template *t)
{
    if (!t) return;
    free(t->bos);
    free(t->eos);
    free(t->eot);
    free(t->default_system);
    free(t);
}

const char *tsr_chat_template_name(const tsr_chat_template *t)
{
    return k_names[t->fam];
}

/* ---- rendering ---- */

typedef struct {
    char *a;
    size_t n, cap;
    bool oom;
} sbuf;

static void put_n(sbuf *b, const char *s, size_t n)
{
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->a, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->a = p;
        b->cap = cap;
    }
    memcpy(b->a + b->n, s, n);
    b->n += n;
    b->a[b->n] = 0;
}

static void put(sbuf *b, const char *s)
{
    put_n(b, s, strlen(s));
}

/* Several strings, NULL-terminated. */
static void puts_(sbuf *b, ...)
{
    va_list ap;
    va_start(ap, b);
    for (const char *s; (s = va_arg(ap, const char *)) != NULL;) put(b, s);
    va_end(ap);
}
#define PUT(b, ...) puts_(b, __VA_ARGS__, (const char *)NULL)

/* Jinja's trim / Python's str.strip(): whitespace off both ends. */
static void put_trim(sbuf *b, const char *s)
{
    size_t n = strlen(s);
    while (n && isspace((unsigned char)*s)) s++, n--;
    while (n && isspace((unsigned char)s[n - 1])) n--;
    put_n(b, s, n);
}

typedef enum { R_SYSTEM, R_USER, R_ASSISTANT } role;

static int roles_of(const tsr_chat_msg *m, size_t n, role *r, char *err, size_t err_len)
{
    for (size_t i = 0; i < n; i++) {
        if (!m[i].role || !m[i].content)
            return tsr_fail(err, err_len, TSR_CHAT_ERR_ARG, "message %zu has no %s", i,
                            m[i].role ? "content" : "role");
        if (!strcmp(m[i].role, "system"))
            r[i] = R_SYSTEM;
        else if (!strcmp(m[i].role, "user"))
            r[i] = R_USER;
        else if (!strcmp(m[i].role, "assistant"))
            r[i] = R_ASSISTANT;
        else
            return tsr_fail(err, err_len, TSR_CHAT_ERR_ARG,
                            "message %zu: role '%.32s' is not one of system, user, assistant", i,
                            m[i].role);
    }
    return 0;
}

static void render_llama2(const tsr_chat_template *t, const tsr_chat_msg *m, const role *r,
                          size_t n, sbuf *b)
{
    family f = t->fam;
    bool sys = f != FAM_LLAMA2, bos_turns = f == FAM_LLAMA2_SYS_BOS || t->bos_turns,
         strip = f == FAM_LLAMA2_SYS_STRIP;
    PUT(b, t->bos, "[INST] ");
    bool in_turn = true;
    for (size_t i = 0; i < n; i++) {
        if (!in_turn) {
            in_turn = true;
            PUT(b, bos_turns ? t->bos : "", "[INST] ");
        }
        if (r[i] == R_SYSTEM) {
            put(b, sys ? "<<SYS>>\n" : "");
            strip ? put_trim(b, m[i].content) : put(b, m[i].content);
            put(b, sys ? "\n<</SYS>>\n\n" : "\n");
        } else if (r[i] == R_USER) {
            strip ? put_trim(b, m[i].content) : put(b, m[i].content);
            put(b, " [/INST]");
        } else {
            /* Meta's template: ' ' + content.strip() + ' ' + eos_token */
            if (strip) {
                put(b, " ");
                put_trim(b, m[i].content);
                PUT(b, " ", t->eos);
            } else {
                PUT(b, m[i].content, t->eos);
            }
            in_turn = false;
        }
    }
}

static void render_mistral(const tsr_chat_template *t, const tsr_chat_msg *m, const role *r,
                           size_t n, sbuf *b)
{
    put(b, t->bos);
    if (t->fam == FAM_MISTRAL_V1) {
        /* ' [INST] ' + system + '\n\n' + user + ' [/INST]', ' ' + answer + eos */
        const char *system = NULL;
        size_t i = 0;
        if (n && r[0] == R_SYSTEM) system = m[i++].content;
        for (bool first = true; i < n; i++) {
            if (r[i] == R_USER) {
                put(b, " [INST] ");
                if (first && system) PUT(b, system, "\n\n");
                PUT(b, m[i].content, " [/INST]");
            } else if (r[i] == R_ASSISTANT) {
                PUT(b, " ", m[i].content, t->eos);
            }
            first = false;
        }
        return;
    }
    if (t->fam == FAM_MISTRAL_V7) {
        for (size_t i = 0; i < n; i++) {
            if (r[i] == R_SYSTEM)
                PUT(b, "[SYSTEM_PROMPT] ", m[i].content, "[/SYSTEM_PROMPT]");
            else if (r[i] == R_USER)
                PUT(b, "[INST] ", m[i].content, "[/INST]");
            else
                PUT(b, " ", m[i].content, t->eos);
        }
        return;
    }
    /* v3 / v3-tekken: the system prompt goes into the last message, when it is a user's */
    bool tekken = t->fam == FAM_MISTRAL_V3_TEKKEN;
    const char *system = NULL;
    size_t i0 = 0;
    if (n && r[0] == R_SYSTEM) system = m[i0++].content;
    for (size_t i = i0; i < n; i++) {
        if (r[i] == R_USER) {
            put(b, tekken ? "[INST]" : "[INST] ");
            if (i == n - 1 && system) PUT(b, system, "\n\n");
            PUT(b, m[i].content, "[/INST]");
        } else if (r[i] == R_ASSISTANT) {
            if (tekken) {
                PUT(b, m[i].content, t->eos);
            } else {
                put(b, " ");
                put_trim(b, m[i].content);
                put(b, t->eos);
            }
        }
    }
}

static void render_gemma(const tsr_chat_template *t, const tsr_chat_msg *m, const role *r, size_t n,
                         sbuf *b)
{
    /* Gemma 3: a leading system message becomes the prefix of the first turn:
     * first_user_prefix = system + '\n\n'; roles user / model; content | trim. */
    put(b, t->bos);
    size_t i = 0;
    const char *prefix = NULL;
    if (n && r[0] == R_SYSTEM) prefix = m[i++].content;
    for (bool first = true; i < n; i++, first = false) {
        if (r[i] == R_SYSTEM) continue; /* only a leading system message has a place */
        PUT(b, "<start_of_turn>", r[i] == R_ASSISTANT ? "model" : "user", "\n");
        if (first && prefix) PUT(b, prefix, "\n\n");
        put_trim(b, m[i].content);
        put(b, "<end_of_turn>\n");
    }
}

static void render_deepseek3(const tsr_chat_template *t, const tsr_chat_msg *m, const role *r,
                             size_t n, sbuf *b)
{
    /* All system prompts joined by '\n\n' right after BOS, then the turns. */
    put(b, t->bos);
    bool first_sp = true;
    for (size_t i = 0; i < n; i++)
        if (r[i] == R_SYSTEM) {
            PUT(b, first_sp ? "" : "\n\n", m[i].content);
            first_sp = false;
        }
    for (size_t i = 0; i < n; i++) {
        if (r[i] == R_USER)
            PUT(b, U_USER, m[i].content);
        else if (r[i] == R_ASSISTANT)
            PUT(b, U_ASSISTANT, m[i].content, U_EOS);
    }
}

int tsr_chat_render(const tsr_chat_template *t, const tsr_chat_msg *m, size_t n, bool add_gen,
                    char **out, size_t *out_len, char *err, size_t err_len)
{
    if (err && err_len) err[0] = 0;
    *out = NULL;
    if (out_len) *out_len = 0;
    role *r = calloc(n ? n : 1, sizeof *r);
    if (!r) return tsr_fail(err, err_len, TSR_CHAT_ERR_NOMEM, "out of memory");
    int rc = roles_of(m, n, r, err, err_len);
    if (rc) {
        free(r);
        return rc;
    }
    sbuf b = {0};
    put(&b, ""); /* an empty conversation still gives a string */
    const char *gen = NULL;
    switch (t->fam) {
    case FAM_CHATML:
        put(&b, t->bos);
        if (t->default_system && (n == 0 || r[0] != R_SYSTEM))
            PUT(&b, "<|im_start|>system\n", t->default_system, "<|im_end|>\n");
        for (size_t i = 0; i < n; i++)
            PUT(&b, "<|im_start|>", m[i].role, "\n", m[i].content, "<|im_end|>\n");
        gen = "<|im_start|>assistant\n";
        break;
    case FAM_LLAMA2:
    case FAM_LLAMA2_SYS:
    case FAM_LLAMA2_SYS_BOS:
    case FAM_LLAMA2_SYS_STRIP:
        render_llama2(t, m, r, n, &b);
        break;
    case FAM_MISTRAL_V1:
    case FAM_MISTRAL_V3:
    case FAM_MISTRAL_V3_TEKKEN:
    case FAM_MISTRAL_V7:
        render_mistral(t, m, r, n, &b);
        break;
    case FAM_LLAMA3:
        for (size_t i = 0; i < n; i++) {
            PUT(&b, i == 0 ? t->bos : "", "<|start_header_id|>", m[i].role,
                "<|end_header_id|>\n\n");
            put_trim(&b, m[i].content);
            put(&b, "<|eot_id|>");
        }
        gen = "<|start_header_id|>assistant<|end_header_id|>\n\n";
        break;
    case FAM_GEMMA:
        render_gemma(t, m, r, n, &b);
        gen = "<start_of_turn>model\n";
        break;
    case FAM_PHI3:
        put(&b, t->bos);
        if (t->user_assistant) {
            for (size_t i = 0; i < n; i++) {
                if (r[i] == R_USER)
                    PUT(&b, "<|user|>\n", m[i].content, "<|end|>\n<|assistant|>\n");
                else if (r[i] == R_ASSISTANT)
                    PUT(&b, m[i].content, "<|end|>\n");
            }
            break;
        }
        for (size_t i = 0; i < n; i++) PUT(&b, "<|", m[i].role, "|>\n", m[i].content, "<|end|>\n");
        gen = "<|assistant|>\n";
        break;
    case FAM_PHI4:
        for (size_t i = 0; i < n; i++)
            PUT(&b, "<|im_start|>", m[i].role, "<|im_sep|>", m[i].content, "<|im_end|>");
        gen = "<|im_start|>assistant<|im_sep|>";
        break;
    case FAM_ZEPHYR:
        put(&b, t->bos);
        for (size_t i = 0; i < n; i++) PUT(&b, "<|", m[i].role, "|>\n", m[i].content, t->eot, "\n");
        gen = "<|assistant|>\n";
        break;
    case FAM_MONARCH:
        for (size_t i = 0; i < n; i++) PUT(&b, t->bos, m[i].role, "\n", m[i].content, t->eos, "\n");
        if (add_gen) PUT(&b, t->bos, "assistant\n");
        break;
    case FAM_DEEPSEEK: {
        put(&b, t->bos);
        bool has_system = false;
        for (size_t i = 0; i < n; i++) has_system |= r[i] == R_SYSTEM;
        if (!has_system && t->default_system) put(&b, t->default_system);
        for (size_t i = 0; i < n; i++) {
            if (r[i] == R_SYSTEM)
                put(&b, m[i].content);
            else if (r[i] == R_USER)
                PUT(&b, "### Instruction:\n", m[i].content, "\n");
            else
                PUT(&b, "### Response:\n", m[i].content, "\n<|EOT|>\n");
        }
        gen = "### Response:\n";
        break;
    }
    case FAM_DEEPSEEK2:
        put(&b, t->bos);
        for (size_t i = 0; i < n; i++) {
            if (r[i] == R_SYSTEM)
                PUT(&b, m[i].content, "\n\n");
            else if (r[i] == R_USER)
                PUT(&b, "User: ", m[i].content, "\n\n");
            else
                PUT(&b, "Assistant: ", m[i].content, t->eos);
        }
        gen = "Assistant:";
        break;
    case FAM_DEEPSEEK3:
        render_deepseek3(t, m, r, n, &b);
        gen = U_ASSISTANT;
        break;
    case FAM_VICUNA:
    case FAM_VICUNA_ORCA:
        for (size_t i = 0; i < n; i++) {
            if (r[i] == R_SYSTEM)
                PUT(&b, t->fam == FAM_VICUNA_ORCA ? "SYSTEM: " : "", m[i].content,
                    t->fam == FAM_VICUNA_ORCA ? "\n" : "\n\n");
            else if (r[i] == R_USER)
                PUT(&b, "USER: ", m[i].content, "\n");
            else
                PUT(&b, "ASSISTANT: ", m[i].content, "</s>\n");
        }
        gen = "ASSISTANT:";
        break;
    case FAM_COMMAND_R: {
        static const char *const tok[] = {"<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>",
                                          "<|CHATBOT_TOKEN|>"};
        put(&b, t->bos);
        for (size_t i = 0; i < n; i++) {
            PUT(&b, "<|START_OF_TURN_TOKEN|>", tok[r[i]]);
            put_trim(&b, m[i].content);
            put(&b, "<|END_OF_TURN_TOKEN|>");
        }
        gen = "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>";
        break;
    }
    case FAM_OPENCHAT: {
        static const char *const title[] = {"System", "User", "Assistant"};
        put(&b, t->bos);
        for (size_t i = 0; i < n; i++)
            PUT(&b, "GPT4 Correct ", title[r[i]], ": ", m[i].content, "<|end_of_turn|>");
        gen = "GPT4 Correct Assistant:";
        break;
    }
    case FAM_CHATGLM3:
        put(&b, "[gMASK]sop");
        for (size_t i = 0; i < n; i++) PUT(&b, "<|", m[i].role, "|>\n ", m[i].content);
        gen = "<|assistant|>";
        break;
    case FAM_CHATGLM4:
        put(&b, "[gMASK]<sop>");
        for (size_t i = 0; i < n; i++) PUT(&b, "<|", m[i].role, "|>\n", m[i].content);
        gen = "<|assistant|>\n";
        break;
    case FAM_GLMEDGE:
        for (size_t i = 0; i < n; i++) PUT(&b, "<|", m[i].role, "|>\n", m[i].content);
        gen = "<|assistant|>";
        break;
    case FAM_MINICPM:
        for (size_t i = 0; i < n; i++) {
            if (r[i] == R_USER) put(&b, U_MINICPM_USER);
            put_trim(&b, m[i].content);
            if (r[i] == R_USER) put(&b, "<AI>");
        }
        break;
    case FAM_GRANITE:
        for (size_t i = 0; i < n; i++)
            PUT(&b, "<|start_of_role|>", m[i].role, "<|end_of_role|>", m[i].content,
                "<|end_of_text|>\n");
        gen = "<|start_of_role|>assistant<|end_of_role|>";
        break;
    case FAM_MEGREZ:
        if (t->default_system && (n == 0 || r[0] != R_SYSTEM))
            PUT(&b, "<|role_start|>system<|role_end|>", t->default_system, "<|turn_end|>");
        for (size_t i = 0; i < n; i++)
            PUT(&b, "<|role_start|>", m[i].role, "<|role_end|>", m[i].content, "<|turn_end|>");
        gen = "<|role_start|>assistant<|role_end|>";
        break;
    case FAM_BAILING: {
        static const char *const up[] = {"SYSTEM", "HUMAN", "ASSISTANT"};
        for (size_t i = 0; i < n; i++) PUT(&b, "<role>", up[r[i]], "</role>", m[i].content);
        gen = "<role>ASSISTANT</role>";
        break;
    }
    case FAM_SEED_OSS:
        for (size_t i = 0; i < n; i++) {
            PUT(&b, "<seed:bos>", m[i].role, "\n");
            r[i] == R_ASSISTANT ? put_trim(&b, m[i].content) : put(&b, m[i].content);
            put(&b, "<seed:eos>");
        }
        gen = "<seed:bos>assistant\n";
        break;
    case FAM_COUNT:
        break;
    }
    if (add_gen && gen) put(&b, gen);
    free(r);
    if (b.oom) {
        free(b.a);
        return tsr_fail(err, err_len, TSR_CHAT_ERR_NOMEM, "out of memory");
    }
    *out = b.a;
    if (out_len) *out_len = b.n;
    return 0;
}

int tsr_chat_tokenize(const tsr_vocab *v, const char *text, size_t len, int32_t **ids,
                      size_t *n_ids, char *err, size_t err_len)
{
    int rc = tsr_vocab_tokenize(v, text, len, true, true, ids, n_ids, err, err_len);
    if (rc) return TSR_CHAT_ERR_TOKENIZE;
    /* The template wrote bos_token and the vocabulary added BOS too: keep one. */
    int32_t bos = tsr_vocab_bos(v);
    if (bos >= 0 && tsr_vocab_add_bos(v) && *n_ids >= 2 && (*ids)[0] == bos && (*ids)[1] == bos) {
        memmove(*ids, *ids + 1, (*n_ids - 1) * sizeof **ids);
        (*n_ids)--;
    }
    return 0;
}
