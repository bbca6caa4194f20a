/*
 * test_chat.c — chat templates (coordinator/chat.h) against the models' own Jinja output.
 *
 * What is checked and why:
 *   - the chat cases of ../shared/models/expected/real-models.json: SmolLM2's and
 *     Qwen2.5's templates (read from the real GGUFs, fetched by ops/fetch-model.sh) render
 *     each conversation to the text Hugging Face's Jinja renders (`rendered`), and that text
 *     tokenizes to llama.cpp's prompt_ids; the raw cases' prompts tokenize to theirs (all
 *     three models); the greedy ids of the chat cases end on an end-of-generation token;
 *   - every other family against outputs documented elsewhere: llama.cpp's
 *     tests/test-chat-template.cpp (ggml-org/llama.cpp, the templates of real models and
 *     the Jinja output for its six-message conversation), Meta's Llama 2 prompt format
 *     (huggingface.co/blog/llama2#how-to-prompt-llama-2), Meta's Llama 3 format
 *     (llama.com/docs/model-cards-and-prompt-formats/meta-llama-3), Zephyr's model card
 *     (huggingface.co/HuggingFaceH4/zephyr-7b-beta) and Gemma's formatting guide
 *     (ai.google.dev/gemma/docs/core/prompt-structure);
 *   - detection, unknown templates and names (a clear error listing the families), bad
 *     roles, BOS written by the template and not added twice.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/chat.h"
#include "shard/gguf.h"
#include "shard/vocab.h"
#include "tests/util.h"

#ifndef TSR_FETCH_MODEL
#error "TSR_FETCH_MODEL (ops/fetch-model.sh) must be defined by CMake"
#endif

/* ---- helpers ---- */

/* The cached path of a real model (ops/fetch-model.sh NAME prints it last). */
static char *real_model(const char *name)
{
    char cmd[1024], *out = NULL, *errs = NULL;
    snprintf(cmd, sizeof cmd, "%s %s", TSR_FETCH_MODEL, name);
    int rc = tsr_test_run(cmd, &out, &errs);
    if (rc != 0 || !out) fail_msg("%s failed (%d): %s", cmd, rc, errs ? errs : "");
    free(errs);
    size_t n = strlen(out);
    while (n && (out[n - 1] == '\n' || out[n - 1] == '\r')) out[--n] = 0;
    char *last = strrchr(out, '\n');
    char *path = strdup(last ? last + 1 : out);
    free(out);
    return path;
}

typedef struct {
    tsr_gguf *g;
    tsr_vocab *v;
} model;

static model open_model(const char *name)
{
    model m = {0};
    char err[512];
    char *path = real_model(name);
    if (tsr_gguf_open(path, &m.g, err, sizeof err)) fail_msg("open %s: %s", path, err);
    if (tsr_vocab_load(m.g, &m.v, err, sizeof err)) fail_msg("vocab of %s: %s", path, err);
    free(path);
    return m;
}

static void close_model(model *m)
{
    tsr_vocab_free(m->v);
    tsr_gguf_close(m->g);
}

static void print_escaped(const char *label, const char *s)
{
    printf("%s\"", label);
    for (; s && *s; s++) {
        if (*s == '\n')
            printf("\\n");
        else
            putchar(*s);
    }
    printf("\"\n");
}

static void expect_str(const char *what, const char *want, const char *got)
{
    if (strcmp(want, got) != 0) {
        printf("%s: rendered text differs\n", what);
        print_escaped("  expected: ", want);
        print_escaped("  got:      ", got);
        fail_msg("%s", what);
    }
}

static void expect_ids(const char *what, const cJSON *want, const int32_t *got, size_t n)
{
    bool ok = cJSON_GetArraySize(want) == (int)n;
    for (size_t i = 0; ok && i < n; i++) ok = cJSON_GetArrayItem(want, (int)i)->valueint == got[i];
    if (!ok) {
        char *w = cJSON_PrintUnformatted(want);
        printf("%s: ids differ\n  expected: %s\n  got:      [", what, w);
        for (size_t i = 0; i < n; i++) printf(i ? ",%d" : "%d", got[i]);
        printf("]\n");
        free(w);
        fail_msg("%s", what);
    }
}

static cJSON *load_json(void)
{
    size_t len;
    char *s = tsr_test_read_file(tsr_test_model_path("expected/real-models.json"), &len);
    assert_non_null(s);
    cJSON *j = cJSON_Parse(s);
    free(s);
    assert_non_null(j);
    return j;
}

/* ---- real models ---- */

static void check_model_cases(const char *name, int n_chat_min)
{
    cJSON *j = load_json();
    cJSON *cases =
        cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "models"), name), "cases");
    assert_non_null(cases);
    model m = open_model(name);
    tsr_chat_template *t = NULL;
    char err[512];
    int n_chat = 0, n_raw = 0;
    cJSON *c;
    cJSON_ArrayForEach(c, cases)
    {
        const char *kind = cJSON_GetObjectItem(c, "kind")->valuestring;
        char what[160];
        int32_t *ids = NULL;
        size_t n_ids = 0;
        if (!strcmp(kind, "raw")) {
            const char *p = cJSON_GetObjectItem(c, "prompt")->valuestring;
            snprintf(what, sizeof what, "%s raw '%s'", name, p);
            assert_int_equal(
                tsr_vocab_tokenize(m.v, p, strlen(p), true, true, &ids, &n_ids, err, sizeof err),
                0);
            expect_ids(what, cJSON_GetObjectItem(c, "prompt_ids"), ids, n_ids);
            free(ids);
            n_raw++;
            continue;
        }
        if (!t && tsr_chat_template_for_model(m.g, m.v, NULL, &t, err, sizeof err))
            fail_msg("%s: template: %s", name, err);
        cJSON *msgs = cJSON_GetObjectItem(c, "messages");
        size_t n = (size_t)cJSON_GetArraySize(msgs);
        tsr_chat_msg *cm = calloc(n, sizeof *cm);
        for (size_t i = 0; i < n; i++) {
            cJSON *mi = cJSON_GetArrayItem(msgs, (int)i);
            cm[i].role = cJSON_GetObjectItem(mi, "role")->valuestring;
            cm[i].content = cJSON_GetObjectItem(mi, "content")->valuestring;
        }
        snprintf(what, sizeof what, "%s chat case %d", name, n_chat);
        char *text = NULL;
        size_t len = 0;
        if (tsr_chat_render(t, cm, n, true, &text, &len, err, sizeof err))
            fail_msg("%s: %s", what, err);
        expect_str(what, cJSON_GetObjectItem(c, "rendered")->valuestring, text);
        if (tsr_chat_tokenize(m.v, text, len, &ids, &n_ids, err, sizeof err))
            fail_msg("%s: %s", what, err);
        expect_ids(what, cJSON_GetObjectItem(c, "prompt_ids"), ids, n_ids);
        /* llama.cpp stopped on its end-of-generation set: ours must contain that token,
         * and none of the ids before it. */
        cJSON *gen = cJSON_GetObjectItem(c, "ids");
        int ng = cJSON_GetArraySize(gen);
        for (int i = 0; i < ng; i++) {
            int32_t id = cJSON_GetArrayItem(gen, i)->valueint;
            bool last_eog = cJSON_IsTrue(cJSON_GetObjectItem(c, "eog")) && i == ng - 1;
            if (tsr_vocab_is_eog(m.v, id) != last_eog)
                fail_msg("%s: generated id %d at %d: is_eog %d, expected %d", what, id, i,
                         tsr_vocab_is_eog(m.v, id), last_eog);
        }
        free(ids);
        free(text);
        free(cm);
        n_chat++;
    }
    printf("[%s] %d raw and %d chat cases match (template %s)\n", name, n_raw, n_chat,
           t ? tsr_chat_template_name(t) : "-");
    assert_true(n_raw >= 3);
    assert_true(n_chat >= n_chat_min);
    tsr_chat_template_free(t);
    close_model(&m);
    cJSON_Delete(j);
}

static void test_smollm2_cases(void **state)
{
    (void)state;
    check_model_cases("smollm2-135m-instruct", 3);
}

static void test_qwen25_cases(void **state)
{
    (void)state;
    check_model_cases("qwen2.5-coder-0.5b-instruct", 2);
}

static void test_gemma3_cases(void **state)
{
    (void)state;
    check_model_cases("gemma-3-270m", 0); /* base model: raw cases only */
}

/* The end-of-generation sets llama.cpp derives for the three vocabularies. */
static void expect_eog(const char *name, const char *const *texts, size_t n_expected)
{
    model m = open_model(name);
    const int32_t *ids;
    size_t n = tsr_vocab_eog_ids(m.v, &ids);
    printf("[%s] end of generation:", name);
    for (size_t i = 0; i < n; i++) printf(" %d '%s'", ids[i], tsr_vocab_token_text(m.v, ids[i], 0));
    printf("\n");
    for (size_t i = 0; texts[i]; i++) {
        int32_t id = tsr_vocab_find(m.v, texts[i], strlen(texts[i]));
        if (id < 0 || !tsr_vocab_is_eog(m.v, id))
            fail_msg("%s: '%s' (id %d) should end generation", name, texts[i], id);
        assert_true(tsr_vocab_is_control(m.v, id));
    }
    assert_int_equal(n, n_expected);
    for (size_t i = 0; i < n; i++) {
        assert_true(tsr_vocab_is_eog(m.v, ids[i]));
        if (i) assert_true(ids[i] > ids[i - 1]);
    }
    close_model(&m);
}

static void test_eog_sets(void **state)
{
    (void)state;
    /* SmolLM2: eos_token_id 2 = <|im_end|>, <|endoftext|> (0) by text, and <reponame>
     * (4), which llama.cpp takes for the FIM repository token. */
    const char *smol[] = {"<|im_end|>", "<|endoftext|>", "<reponame>", NULL};
    expect_eog("smollm2-135m-instruct", smol, 3);
    /* Qwen2.5: <|im_end|> (EOS), <|endoftext|>, the FIM pad / repo / file-sep tokens, and
     * the plain-text token "</s>" (128247), which current llama.cpp ends generation on for
     * every vocabulary but Gemma 4's (ggml-org/llama.cpp PR 21492). */
    const char *qwen[] = {"<|im_end|>",   "<|endoftext|>", "<|fim_pad|>", "<|repo_name|>",
                          "<|file_sep|>", "</s>",          NULL};
    expect_eog("qwen2.5-coder-0.5b-instruct", qwen, 6);
    /* Gemma 3: <eos>, <end_of_turn> and "</s>" (212, as above). */
    const char *gemma[] = {"<eos>", "<end_of_turn>", "</s>", NULL};
    expect_eog("gemma-3-270m", gemma, 3);
}

/* ---- the other families ---- */

/* llama.cpp's conversation (tests/test-chat-template.cpp). */
static const tsr_chat_msg k_conv[] = {
    {"system", "You are a helpful assistant"},
    {"user", "Hello"},
    {"assistant", "Hi there"},
    {"user", "Who are you"},
    {"assistant", "   I am an assistant   "},
    {"user", "Another question"},
};
#define N_CONV (sizeof k_conv / sizeof k_conv[0])

typedef struct {
    const char *name; /* the model the template comes from */
    const char *family;
    const char *tmpl;
    const char *bos, *eos;
    const char *expected;
} family_case;

/* Template texts and Jinja outputs copied from llama.cpp tests/test-chat-template.cpp
 * (expected_output_jinja where it has one, else expected_output), with its bos/eos. */
static const family_case k_cases[] = {
    {"teknium/OpenHermes-2.5-Mistral-7B", "chatml",
     "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
     "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ "
     "'<|im_start|>assistant\\n' }}{% endif %}",
     "", "",
     "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>"
     "\n<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you<|im_end|>\n<|im_"
     "start|>assistant\n   I am an assistant   <|im_end|>\n<|im_start|>user\nAnother "
     "question<|im_end|>\n<|im_start|>assistant\n"},
    {"mistralai/Mistral-7B-Instruct-v0.2 (pre-v1)", "llama2",
     "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
     "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
     "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ "
     "'[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ "
     "message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles "
     "are supported!') }}{% endif %}{% endfor %}",
     "", "</s>",
     "[INST] You are a helpful assistant\nHello [/INST]Hi there</s>[INST] Who are you [/INST]   "
     "I am an assistant   </s>[INST] Another question [/INST]"},
    {"bofenghuang/vigogne-2-70b-chat", "llama2-sys-strip",
     "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] "
     "%}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages "
     "%}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if "
     "loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
     "system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = "
     "message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
     "content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + "
     "content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
     "", "</s>",
     "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST] Hi there </s>[INST] "
     "Who are you [/INST] I am an assistant </s>[INST] Another question [/INST]"},
    {"mlabonne/AlphaMonarch-7B", "monarch",
     "{% for message in messages %}{{bos_token + message['role'] + '\\n' + message['content'] + "
     "eos_token + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant\\n' "
     "}}{% endif %}",
     "<s>", "</s>",
     "<s>system\nYou are a helpful assistant</s>\n<s>user\nHello</s>\n<s>assistant\nHi "
     "there</s>\n<s>user\nWho are you</s>\n<s>assistant\n   I am an assistant   "
     "</s>\n<s>user\nAnother question</s>\n<s>assistant\n"},
    {"openchat/openchat-3.5-0106", "openchat",
     "{{ bos_token }}{% for message in messages %}{{ 'GPT4 Correct ' + message['role'].title() + "
     "': ' + message['content'] + '<|end_of_turn|>'}}{% endfor %}{% if add_generation_prompt %}{{ "
     "'GPT4 Correct Assistant:' }}{% endif %}",
     "", "",
     "GPT4 Correct System: You are a helpful assistant<|end_of_turn|>GPT4 Correct User: "
     "Hello<|end_of_turn|>GPT4 Correct Assistant: Hi there<|end_of_turn|>GPT4 Correct User: Who "
     "are you<|end_of_turn|>GPT4 Correct Assistant:    I am an assistant   <|end_of_turn|>GPT4 "
     "Correct User: Another question<|end_of_turn|>GPT4 Correct Assistant:"},
    {"deepseek-ai/deepseek-coder-33b-instruct", "deepseek",
     "{% if not add_generation_prompt is defined %}\n{% set add_generation_prompt = false %}\n{% "
     "endif %}\n{%- set ns = namespace(found=false) -%}\n{%- for message in messages -%}\n    {%- "
     "if message['role'] == 'system' -%}\n        {%- set ns.found = true -%}\n    {%- endif "
     "-%}\n{%- endfor -%}\n{{bos_token}}{%- if not ns.found -%}\n{{'You are an AI programming "
     "assistant, utilizing the Deepseek Coder model, developed by Deepseek Company, and you only "
     "answer questions related to computer science. For politically sensitive questions, "
     "security and privacy issues, and other non-computer science questions, you will refuse to "
     "answer\\n'}}\n{%- endif %}\n{%- for message in messages %}\n    {%- if message['role'] == "
     "'system' %}\n{{ message['content'] }}\n    {%- else %}\n        {%- if message['role'] == "
     "'user' %}\n{{'### Instruction:\\n' + message['content'] + '\\n'}}\n        {%- else "
     "%}\n{{'### Response:\\n' + message['content'] + '\\n<|EOT|>\\n'}}\n        {%- endif %}\n    "
     "{%- endif %}\n{%- endfor %}\n{% if add_generation_prompt %}\n{{'### Response:'}}\n{% endif "
     "%}",
     "", "",
     "You are a helpful assistant### Instruction:\nHello\n### Response:\nHi there\n<|EOT|>\n### "
     "Instruction:\nWho are you\n### Response:\n   I am an assistant   \n<|EOT|>\n### "
     "Instruction:\nAnother question\n### Response:\n"},
    {"eachadea/vicuna-13b-1.1", "vicuna",
     "{%- for message in messages %}{%- if message['role'] == 'system' -%}{{- '' + "
     "message['content'] + '\n\n' -}}{%- else -%}{%- if message['role'] == 'user' -%}{{-'USER: ' "
     "+ message['content'] + '\n'-}}{%- else -%}{{-'ASSISTANT: ' + message['content'] + '</s>\n' "
     "-}}{%- endif -%}{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{-'ASSISTANT:'-}}"
     "{%- endif -%}",
     "", "",
     "You are a helpful assistant\n\nUSER: Hello\nASSISTANT: Hi there</s>\nUSER: Who are "
     "you\nASSISTANT:    I am an assistant   </s>\nUSER: Another question\nASSISTANT:"},
    {"CohereForAI/c4ai-command-r-plus", "command-r",
     "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] "
     "%}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages "
     "%}{% set system_message = false %}{% endif %}{% if system_message != false %}{{ "
     "'<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + system_message + '<|END_OF_TURN_TOKEN|>' }}{% "
     "endif %}{% for message in loop_messages %}{% set content = message['content'] %}{% if "
     "message['role'] == 'user' %}{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + content.strip() + "
     "'<|END_OF_TURN_TOKEN|>' }}{% elif message['role'] == 'assistant' %}{{ "
     "'<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>'  + content.strip() + '<|END_OF_TURN_TOKEN|>' }}{% "
     "endif %}{% endfor %}{% if add_generation_prompt %}{{ "
     "'<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}",
     "", "",
     "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are a helpful "
     "assistant<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hello<|END_OF_TURN_TOKEN|>"
     "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hi "
     "there<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Who are "
     "you<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>I am an "
     "assistant<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Another "
     "question<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"},
    {"Llama-3", "llama3",
     "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
     "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
     "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif "
     "%}{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}",
     "", "",
     "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful "
     "assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_"
     "header_id|>assistant<|end_header_id|>\n\nHi "
     "there<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWho are "
     "you<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nI am an "
     "assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnother "
     "question<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"},
    {"Phi-3-small", "phi3",
     "{{ bos_token }}{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + "
     "message['content'] + '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ "
     "'<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
     "", "",
     "<|system|>\nYou are a helpful assistant<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\nHi "
     "there<|end|>\n<|user|>\nWho are you<|end|>\n<|assistant|>\n   I am an assistant   "
     "<|end|>\n<|user|>\nAnother question<|end|>\n<|assistant|>\n"},
    {"ChatGLM3", "chatglm3",
     "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n {{ "
     "message['content'] }}{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif "
     "%}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
     "", "",
     "[gMASK]sop<|system|>\n You are a helpful assistant<|user|>\n Hello<|assistant|>\n Hi "
     "there<|user|>\n Who are you<|assistant|>\n    I am an assistant   <|user|>\n Another "
     "question<|assistant|>"},
    {"DeepSeek-V2", "deepseek2",
     "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif "
     "%}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' "
     "+ message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' "
     "+ message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ "
     "message['content'] + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ "
     "'Assistant:' }}{% endif %}",
     "",
     "<\xEF\xBD\x9C"
     "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>",
     "You are a helpful assistant\n\nUser: Hello\n\nAssistant: Hi "
     "there<\xEF\xBD\x9C"
     "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>User: Who are you\n\nAssistant:    I am "
     "an assistant   <\xEF\xBD\x9C"
     "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>User: Another question\n\nAssistant:"},
    {"mistralai 'v1' template with a system prompt", "mistral-v1",
     "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = "
     "messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- "
     "set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n{%- for message in "
     "loop_messages %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first and "
     "system_message is defined %}\n            {{- ' [INST] ' + system_message + '\\n\\n' + "
     "message['content'] + ' [/INST]' }}\n        {%- else %}\n            {{- ' [INST] ' + "
     "message['content'] + ' [/INST]' }}\n        {%- endif %}\n    {%- elif message['role'] == "
     "'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- endif %}\n{%- "
     "endfor %}\n",
     "", "</s>",
     " [INST] You are a helpful assistant\n\nHello [/INST] Hi there</s> [INST] Who are you "
     "[/INST]    I am an assistant   </s> [INST] Another question [/INST]"},
    {"Mistral-Large-Instruct-2411 (v7)", "mistral-v7",
     "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
     "message['content'] + '[/INST]' }}{% elif message['role'] == 'system' %}{{ '[SYSTEM_PROMPT] ' "
     "+ message['content'] + '[/SYSTEM_PROMPT]' }}{% elif message['role'] == 'assistant' %}{{ ' ' "
     "+ message['content'] + eos_token }}{% endif %}{% endfor %}",
     "", "</s>",
     "[SYSTEM_PROMPT] You are a helpful assistant[/SYSTEM_PROMPT][INST] Hello[/INST] Hi "
     "there</s>[INST] Who are you[/INST]    I am an assistant   </s>[INST] Another "
     "question[/INST]"},
    {"ibm-granite/granite-3.0-8b-instruct", "granite",
     "{%- for message in messages %}\n    {%- if message['role'] == 'system' %}\n    {{- "
     "'<|start_of_role|>system<|end_of_role|>' + message['content'] + '<|end_of_text|>\n' }}\n    "
     "{%- elif message['role'] == 'user' %}\n    {{- '<|start_of_role|>user<|end_of_role|>' + "
     "message['content'] + '<|end_of_text|>\n' }}\n    {%- elif message['role'] == 'assistant' "
     "%}\n    {{- '<|start_of_role|>assistant<|end_of_role|>'  + message['content'] + "
     "'<|end_of_text|>\n' }}\n    {%- endif %}\n    {%- if loop.last and add_generation_prompt "
     "%}\n    {{- '<|start_of_role|>assistant<|end_of_role|>' }}\n    {%- endif %}\n{%- endfor %}",
     "", "",
     "<|start_of_role|>system<|end_of_role|>You are a helpful "
     "assistant<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>Hello<|end_of_text|>\n<|start_"
     "of_role|>assistant<|end_of_role|>Hi "
     "there<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>Who are "
     "you<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>   I am an assistant   "
     "<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>Another "
     "question<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"},
    {"phi-4", "phi4",
     "{% for message in messages %}{% if (message['role'] == 'system') "
     "%}{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}{% elif "
     "(message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + "
     "'<|im_end|><|im_start|>assistant<|im_sep|>'}}{% elif (message['role'] == 'assistant') "
     "%}{{message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}",
     "", "",
     "<|im_start|>system<|im_sep|>You are a helpful "
     "assistant<|im_end|><|im_start|>user<|im_sep|>Hello<|im_end|><|im_start|>assistant<|im_sep|>"
     "Hi there<|im_end|><|im_start|>user<|im_sep|>Who are "
     "you<|im_end|><|im_start|>assistant<|im_sep|>   I am an assistant   "
     "<|im_end|><|im_start|>user<|im_sep|>Another "
     "question<|im_end|><|im_start|>assistant<|im_sep|>"},
    {"inclusionAI/Ling-lite", "bailing",
     "{% for message in messages %}{% set role = message['role'] | lower %}{% if role == 'user' "
     "%}{% set role = 'HUMAN' %}{% endif %}{% set role = role | upper %}{{ '<role>' + role + "
     "'</role>' + message['content'] }}{% endfor %}{% if add_generation_prompt %}{{ "
     "'<role>ASSISTANT</role>' }}{% endif %}",
     "", "",
     "<role>SYSTEM</role>You are a helpful assistant<role>HUMAN</role>Hello<role>ASSISTANT</"
     "role>Hi there<role>HUMAN</role>Who are you<role>ASSISTANT</role>   I am an assistant   "
     "<role>HUMAN</role>Another question<role>ASSISTANT</role>"},
};

static void test_families_llamacpp_vectors(void **state)
{
    (void)state;
    int n_fail = 0;
    for (size_t k = 0; k < sizeof k_cases / sizeof k_cases[0]; k++) {
        const family_case *c = &k_cases[k];
        tsr_chat_template *t = NULL;
        char err[512], *out = NULL;
        if (tsr_chat_template_new(c->tmpl, c->bos, c->eos, &t, err, sizeof err)) {
            printf("%s: %s\n", c->name, err);
            n_fail++;
            continue;
        }
        assert_int_equal(tsr_chat_render(t, k_conv, N_CONV, true, &out, NULL, err, sizeof err), 0);
        bool ok = !strcmp(tsr_chat_template_name(t), c->family) && !strcmp(out, c->expected);
        if (!ok) {
            printf("%s: family %s (expected %s)\n", c->name, tsr_chat_template_name(t), c->family);
            print_escaped("  expected: ", c->expected);
            print_escaped("  got:      ", out);
            n_fail++;
        }
        free(out);
        tsr_chat_template_free(t);
    }
    printf("%zu llama.cpp template vectors, %d failed\n", sizeof k_cases / sizeof k_cases[0],
           n_fail);
    assert_int_equal(n_fail, 0);
}

static void render_expect(const char *tmpl, const char *bos, const char *eos, const tsr_chat_msg *m,
                          size_t n, const char *family, const char *expected)
{
    tsr_chat_template *t = NULL;
    char err[512], *out = NULL;
    if (tsr_chat_template_new(tmpl, bos, eos, &t, err, sizeof err)) fail_msg("%s", err);
    assert_string_equal(tsr_chat_template_name(t), family);
    assert_int_equal(tsr_chat_render(t, m, n, true, &out, NULL, err, sizeof err), 0);
    expect_str(family, expected, out);
    free(out);
    tsr_chat_template_free(t);
}

/* Meta's Llama 2 chat template (meta-llama/Llama-2-7b-chat-hf tokenizer_config.json) and
 * the format Meta documents for it (huggingface.co/blog/llama2#how-to-prompt-llama-2):
 * "<s>[INST] <<SYS>>\n{{ system_prompt }}\n<</SYS>>\n\n{{ user_msg_1 }} [/INST] {{
 * model_answer_1 }} </s><s>[INST] {{ user_msg_2 }} [/INST]". */
static void test_llama2_documented(void **state)
{
    (void)state;
    const char *tmpl =
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set "
        "system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% "
        "set system_message = false %}{% endif %}{% for message in loop_messages %}{% if "
        "(message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation "
        "roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 "
        "== 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
        "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] "
        "%}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
        "content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + "
        "content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";
    const tsr_chat_msg m[] = {
        {"system", "SYS"}, {"user", "U1"}, {"assistant", "A1"}, {"user", "U2"}};
    render_expect(tmpl, "<s>", "</s>", m, 4, "llama2-sys-strip",
                  "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST]");
}

/* Meta Llama 3 Instruct (meta-llama/Meta-Llama-3-8B-Instruct) and Meta's documented
 * format: "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{{ system_prompt
 * }}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{{ user_message }}<|eot_id|>
 * <|start_header_id|>assistant<|end_header_id|>\n\n". */
static void test_llama3_documented(void **state)
{
    (void)state;
    const char *tmpl =
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
        "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% "
        "endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
        "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
    const tsr_chat_msg m[] = {{"system", "You are a helpful AI assistant"},
                              {"user", "What is France's capital?"}};
    render_expect(
        tmpl, "<|begin_of_text|>", "<|eot_id|>", m, 2, "llama3",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a "
        "helpful AI assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat "
        "is France's capital?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
}

/* HuggingFaceH4/zephyr-7b-beta: template and the model card's example output. */
static void test_zephyr_documented(void **state)
{
    (void)state;
    const char *tmpl =
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + "
        "message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ "
        "'<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == "
        "'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif "
        "%}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% "
        "endfor %}";
    const tsr_chat_msg m[] = {
        {"system", "You are a friendly chatbot who always responds in the style of a pirate"},
        {"user", "How many helicopters can a human eat in one sitting?"}};
    render_expect(tmpl, "<s>", "</s>", m, 2, "zephyr",
                  "<|system|>\nYou are a friendly chatbot who always responds in the style of a "
                  "pirate</s>\n<|user|>\nHow many helicopters can a human eat in one "
                  "sitting?</s>\n<|assistant|>\n");
}

/* Gemma 3 instruct (google/gemma-3-*-it chat_template): BOS, a system message as the
 * prefix of the first user turn, "model" for the assistant; Google's formatting guide:
 * "<start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n". */
static void test_gemma_documented(void **state)
{
    (void)state;
    const char *tmpl =
        "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- set "
        "first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- set loop_messages = "
        "messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n    {%- set "
        "loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n    "
        "{%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n    "
        "{%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n    {{ "
        "'<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n    "
        "{{ message['content'] | trim }}\n    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if "
        "add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n";
    const tsr_chat_msg m[] = {{"system", "Be brief."},
                              {"user", " Hello "},
                              {"assistant", "Hi there"},
                              {"user", "Who are you"}};
    render_expect(tmpl, "<bos>", "<eos>", m, 4, "gemma",
                  "<bos><start_of_turn>user\nBe brief.\n\nHello<end_of_turn>\n<start_of_turn>"
                  "model\nHi there<end_of_turn>\n<start_of_turn>user\nWho are "
                  "you<end_of_turn>\n<start_of_turn>model\n");
}

/* Mistral v3 (Mistral-Large-Instruct-2407, in llama.cpp's vectors): the system prompt goes
 * into the last user message. */
static void test_mistral_v3_system_last(void **state)
{
    (void)state;
    const char *tmpl = "{%- if messages[0][\"role\"] == \"system\" %}{%- set system_message = "
                       "messages[0][\"content\"] %}{%- endif %}{{- \"[AVAILABLE_TOOLS] [\" }}"
                       "{{- \"[INST] \" + message[\"content\"] + \"[/INST]\" }}"
                       "{{- \" \" + message[\"content\"]|trim + eos_token}}";
    render_expect(tmpl, "", "</s>", k_conv, N_CONV, "mistral-v3",
                  "[INST] Hello[/INST] Hi there</s>[INST] Who are you[/INST] I am an "
                  "assistant</s>[INST] You are a helpful assistant\n\nAnother question[/INST]");
}

/* Phi-3 mini's own template (the one in vocab/ggml-vocab-phi-3.gguf) has only user and
 * assistant branches: Jinja renders nothing for a system message, and every user turn is
 * followed by the assistant's header. */
static void test_phi3_mini_vocab(void **state)
{
    (void)state;
    char err[512], *out = NULL;
    tsr_gguf *g = NULL;
    tsr_vocab *v = NULL;
    assert_int_equal(
        tsr_gguf_open(tsr_test_model_path("vocab/ggml-vocab-phi-3.gguf"), &g, err, sizeof err), 0);
    assert_int_equal(tsr_vocab_load(g, &v, err, sizeof err), 0);
    tsr_chat_template *t = NULL;
    assert_int_equal(tsr_chat_template_for_model(g, v, NULL, &t, err, sizeof err), 0);
    assert_string_equal(tsr_chat_template_name(t), "phi3");
    size_t len;
    assert_int_equal(tsr_chat_render(t, k_conv, 4, true, &out, &len, err, sizeof err), 0);
    expect_str("phi3 mini",
               "<s><|user|>\nHello<|end|>\n<|assistant|>\nHi there<|end|>\n<|user|>\nWho are "
               "you<|end|>\n<|assistant|>\n",
               out);
    /* <s> written by the template: one BOS, and the markers are single tokens */
    int32_t *ids = NULL;
    size_t n = 0;
    assert_int_equal(tsr_chat_tokenize(v, out, len, &ids, &n, err, sizeof err), 0);
    assert_int_equal(ids[0], tsr_vocab_bos(v));
    assert_int_equal(ids[1], tsr_vocab_find(v, "<|user|>", 8));
    free(ids);
    free(out);
    tsr_chat_template_free(t);
    tsr_vocab_free(v);
    tsr_gguf_close(g);
}

static void test_names_and_errors(void **state)
{
    (void)state;
    tsr_chat_template *t = NULL;
    char err[1024];
    /* every advertised name works */
    char names[1024];
    snprintf(names, sizeof names, "%s", tsr_chat_family_names());
    int n_names = 0;
    for (char *s = strtok(names, ", "); s; s = strtok(NULL, ", ")) {
        assert_int_equal(tsr_chat_template_new(s, "<s>", "</s>", &t, err, sizeof err), 0);
        assert_string_equal(tsr_chat_template_name(t), s);
        char *out = NULL;
        const tsr_chat_msg m[] = {{"user", "hi"}};
        assert_int_equal(tsr_chat_render(t, m, 1, true, &out, NULL, err, sizeof err), 0);
        assert_non_null(strstr(out, "hi"));
        free(out);
        tsr_chat_template_free(t);
        n_names++;
    }
    assert_true(n_names >= 20);
    /* a named template writes no BOS text */
    assert_int_equal(
        tsr_chat_template_new("llama3", "<|begin_of_text|>", NULL, &t, err, sizeof err), 0);
    char *out = NULL;
    const tsr_chat_msg one[] = {{"user", "hi"}};
    assert_int_equal(tsr_chat_render(t, one, 1, false, &out, NULL, err, sizeof err), 0);
    assert_string_equal(out, "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>");
    free(out);
    /* a bad role is an error naming it */
    const tsr_chat_msg bad[] = {{"user", "x"}, {"robot", "y"}};
    assert_int_equal(tsr_chat_render(t, bad, 2, true, &out, NULL, err, sizeof err),
                     TSR_CHAT_ERR_ARG);
    assert_null(out);
    assert_non_null(strstr(err, "robot"));
    tsr_chat_template_free(t);
    /* unknown name / unknown template: the error lists the families */
    assert_int_equal(tsr_chat_template_new("klingon", NULL, NULL, &t, err, sizeof err),
                     TSR_CHAT_ERR_UNKNOWN);
    assert_null(t);
    assert_non_null(strstr(err, "klingon"));
    assert_non_null(strstr(err, "chatml"));
    assert_non_null(strstr(err, "llama3"));
    assert_int_equal(tsr_chat_template_new("{% for m in messages %}{{ m.content }}{% endfor %}",
                                           NULL, NULL, &t, err, sizeof err),
                     TSR_CHAT_ERR_UNKNOWN);
    assert_non_null(strstr(err, "--chat-template"));
    assert_non_null(strstr(err, "gemma"));
    assert_null(tsr_chat_detect("{{ messages }}"));
    assert_string_equal(tsr_chat_detect("<|im_start|>{{ x }}"), "chatml");
}

/* A model without tokenizer.chat_template (stories260K) needs --chat-template. */
static void test_model_without_template(void **state)
{
    (void)state;
    char err[1024];
    tsr_gguf *g = NULL;
    tsr_vocab *v = NULL;
    assert_int_equal(tsr_gguf_open(tsr_test_model_path("stories260K.gguf"), &g, err, sizeof err),
                     0);
    assert_int_equal(tsr_vocab_load(g, &v, err, sizeof err), 0);
    tsr_chat_template *t = NULL;
    assert_int_equal(tsr_chat_template_for_model(g, v, NULL, &t, err, sizeof err),
                     TSR_CHAT_ERR_UNKNOWN);
    assert_non_null(strstr(err, "--chat-template"));
    assert_int_equal(tsr_chat_template_for_model(g, v, "chatml", &t, err, sizeof err), 0);
    assert_string_equal(tsr_chat_template_name(t), "chatml");
    tsr_chat_template_free(t);
    tsr_vocab_free(v);
    tsr_gguf_close(g);
}

/* A template that writes bos_token: the BOS is in the text, and the tokenizer (Gemma adds
 * BOS) must not add a second one. */
static void test_bos_not_doubled(void **state)
{
    (void)state;
    model m = open_model("gemma-3-270m");
    char err[512], *out = NULL;
    tsr_chat_template *t = NULL;
    assert_int_equal(tsr_chat_template_for_model(m.g, m.v, "{{ bos_token }}<start_of_turn>{{ m }}",
                                                 &t, err, sizeof err),
                     0);
    const tsr_chat_msg one[] = {{"user", "Hello"}};
    size_t len;
    assert_int_equal(tsr_chat_render(t, one, 1, true, &out, &len, err, sizeof err), 0);
    assert_string_equal(out,
                        "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n");
    int32_t *ids = NULL;
    size_t n = 0;
    assert_int_equal(tsr_chat_tokenize(m.v, out, len, &ids, &n, err, sizeof err), 0);
    assert_true(n > 3);
    assert_int_equal(ids[0], tsr_vocab_bos(m.v));
    assert_int_not_equal(ids[1], tsr_vocab_bos(m.v));
    /* <start_of_turn> is one (control) token */
    assert_int_equal(ids[1], tsr_vocab_find(m.v, "<start_of_turn>", 15));
    free(ids);
    free(out);
    tsr_chat_template_free(t);
    close_model(&m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_families_llamacpp_vectors),
        cmocka_unit_test(test_llama2_documented),
        cmocka_unit_test(test_llama3_documented),
        cmocka_unit_test(test_zephyr_documented),
        cmocka_unit_test(test_gemma_documented),
        cmocka_unit_test(test_mistral_v3_system_last),
        cmocka_unit_test(test_phi3_mini_vocab),
        cmocka_unit_test(test_names_and_errors),
        cmocka_unit_test(test_model_without_template),
        cmocka_unit_test(test_smollm2_cases),
        cmocka_unit_test(test_qwen25_cases),
        cmocka_unit_test(test_gemma3_cases),
        cmocka_unit_test(test_eog_sets),
        cmocka_unit_test(test_bos_not_doubled),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
