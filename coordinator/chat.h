/*
 * chat.h — chat templates: messages (system / user / assistant) -> the prompt text an
 * instruct model was trained on.
 *
 * Why: an instruct model only answers well when the conversation is laid out exactly as in
 * its training data, and that layout is the Jinja template in the GGUF key
 * `tokenizer.chat_template`. Tessera does not run Jinja; like llama.cpp
 * (llm_chat_detect_template) it recognizes the family of the template by its tell-tale
 * strings and renders that family in C. Each renderer reproduces what the family's own
 * template renders through Jinja (Hugging Face transformers: trim_blocks, lstrip_blocks,
 * add_generation_prompt) byte for byte, including
 *   - the BOS text when the template starts with `bos_token` (the tokenizer then must not
 *     add a second one: use tsr_chat_tokenize),
 *   - the EOS text after assistant turns when the template writes `eos_token`,
 *   - a default system prompt written literally in the template for conversations without
 *     a system message (SmolLM2 and Qwen2.5 ChatML, Megrez, DeepSeek Coder).
 * Where a family's template has no system role (Gemma) the system message is merged into
 * the first user turn as that family's newer templates do.
 *
 * Ownership: a tsr_chat_template owns copies of everything it needs (the BOS/EOS texts and
 * the default system prompt); it is immutable after creation and may be shared by threads.
 * Status codes: 0 ok; TSR_CHAT_ERR_* < 0 with a one-line message in err.
 */
#ifndef TSR_CHAT_H
#define TSR_CHAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "shard/gguf.h"
#include "shard/vocab.h"

#define TSR_CHAT_OK           0
#define TSR_CHAT_ERR_UNKNOWN  -1 /* no template, or one of no known family (message lists them) */
#define TSR_CHAT_ERR_ARG      -2 /* bad message (role, missing content) */
#define TSR_CHAT_ERR_NOMEM    -3
#define TSR_CHAT_ERR_TOKENIZE -4

typedef struct {
    const char *role; /* "system", "user" or "assistant" */
    const char *content;
} tsr_chat_msg;

typedef struct tsr_chat_template tsr_chat_template;

/*
 * Build a template from `spec`: a family name (tsr_chat_family_names(), e.g. "chatml",
 * "llama3") or a Jinja template text whose family is detected. bos_text / eos_text are the
 * vocabulary's BOS and EOS token texts (NULL when the model has none); they are what the
 * Jinja `bos_token` / `eos_token` variables hold. A name renders without BOS text (the
 * tokenizer adds BOS as the vocabulary says) and without a default system prompt.
 * Returns 0, or TSR_CHAT_ERR_UNKNOWN naming the known families.
 */
int tsr_chat_template_new(const char *spec, const char *bos_text, const char *eos_text,
                          tsr_chat_template **out, char *err, size_t err_len);

/*
 * The template of a model: `override` (a name or Jinja text, as above) when not NULL,
 * else the GGUF's `tokenizer.chat_template`. A model without one is TSR_CHAT_ERR_UNKNOWN
 * with a message that says to pass --chat-template NAME and lists the names.
 */
int tsr_chat_template_for_model(const tsr_gguf *g, const tsr_vocab *v, const char *override,
                                tsr_chat_template **out, char *err, size_t err_len);

void tsr_chat_template_free(tsr_chat_template *t); /* NULL is fine */

/* The family's name (one of tsr_chat_family_names()); owned by the template. */
const char *tsr_chat_template_name(const tsr_chat_template *t);

/* Every family name, comma-separated, for messages and --help (static storage). */
const char *tsr_chat_family_names(void);

/* The family name detected in a Jinja text, or NULL when none matches (pure: the detection
 * tsr_chat_template_for_model runs, without a GGUF; for tests). */
const char *tsr_chat_detect(const char *jinja);

/*
 * Render msgs[0..n) with the template; add_generation_prompt appends the header of the
 * assistant's turn. Roles must be "system", "user" or "assistant" (else TSR_CHAT_ERR_ARG
 * naming the message). *out is a malloc'd NUL-terminated string the caller frees, *out_len
 * its length (out_len may be NULL).
 */
int tsr_chat_render(const tsr_chat_template *t, const tsr_chat_msg *msgs, size_t n,
                    bool add_generation_prompt, char **out, size_t *out_len, char *err,
                    size_t err_len);

/*
 * Tokenize a rendered prompt as llama.cpp does for chat: special-token text is parsed and
 * BOS is added when the vocabulary adds it, unless the text already begins with the BOS
 * token (a template that writes bos_token). *ids is malloc'd (caller frees).
 */
int tsr_chat_tokenize(const tsr_vocab *v, const char *text, size_t len, int32_t **ids,
                      size_t *n_ids, char *err, size_t err_len);

/* `tessera chat` (coordinator/chat_main.c): returns the process exit status (0 ok, 1 error,
 * 2 usage error). */
int tsr_cmd_chat(int argc, char **argv);

#endif /* TSR_CHAT_H */
