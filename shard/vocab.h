/*
 * vocab.h — the tokenizer of a model, built from the `tokenizer.ggml.*` keys of its GGUF.
 *
 * Why: prompts must become exactly the token ids the model was trained on, and generated
 * ids must become text again, byte for byte what llama.cpp produces for the same file (the
 * reference data in ../shared/models was produced with llama.cpp). Two tokenizer families
 * cover the generation models Tessera serves:
 *
 *   - `tokenizer.ggml.model = "llama"`: SentencePiece-style (SPM). Spaces become U+2581,
 *     a space is prepended to the text (add_space_prefix), pieces are merged greedily by
 *     score, and characters that are not in the vocabulary fall back to `<0xNN>` byte tokens.
 *   - `tokenizer.ggml.model = "gpt2"`: byte-level BPE. The text is split into words by the
 *     pre-tokenizer regexes that `tokenizer.ggml.pre` selects (gpt-2, llama-bpe/llama3,
 *     qwen2, deepseek-llm, deepseek-coder, falcon, starcoder, refact, mpt, ... as in
 *     llama.cpp), every byte is mapped to its GPT-2 "byte-unicode" character, and merges are
 *     applied lowest rank first.
 *
 * Special tokens (control, user-defined) are cut out of the text before either algorithm
 * runs, longest token text first, as llama.cpp's tokenizer_st_partition does: user-defined
 * tokens always, control/unknown tokens only when the caller asks for parse_special.
 *
 * Ownership: a tsr_vocab copies everything it needs out of the GGUF; the tsr_gguf may be
 * closed right after tsr_vocab_load(). A loaded vocab is immutable, so one vocab may be used
 * by several threads at once (every tokenize call allocates its own scratch memory).
 *
 * Status codes: 0 is success; a negative TSR_VOCAB_ERR_* is an error, and functions that
 * take `err`/`err_len` then write a one-line, NUL-terminated explanation there (err may be
 * NULL when the caller does not want it).
 */
#ifndef TSR_VOCAB_H
#define TSR_VOCAB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "shard/gguf.h"

#define TSR_VOCAB_OK              0
#define TSR_VOCAB_ERR_FORMAT      -1 /* missing, mistyped or inconsistent tokenizer metadata */
#define TSR_VOCAB_ERR_UNSUPPORTED -2 /* tokenizer model / pre-tokenizer Tessera does not do */
#define TSR_VOCAB_ERR_NOMEM       -3
#define TSR_VOCAB_ERR_ARG         -4 /* bad argument: token id out of range, NULL pointer */
#define TSR_VOCAB_ERR_INTERNAL    -5 /* regex engine failure (e.g. match limit on odd input) */

/* "No token" (an absent BOS, EOS, ...). */
#define TSR_TOKEN_NULL (-1)

typedef enum {
    TSR_VOCAB_SPM = 1, /* tokenizer.ggml.model "llama" */
    TSR_VOCAB_BPE = 2, /* tokenizer.ggml.model "gpt2" */
} tsr_vocab_type;

/* Token attributes (a bit set), as llama.cpp derives them from `tokenizer.ggml.token_type`
 * (1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE; anything else is
 * UNDEFINED = 0) plus its by-name fix-ups: tokens whose text says end-of-turn
 * ("<|eot_id|>", "<|im_end|>", ...) get CONTROL; Phi-3 special tokens get RSTRIP. */
#define TSR_VOCAB_ATTR_UNDEFINED    0u
#define TSR_VOCAB_ATTR_UNKNOWN      (1u << 0)
#define TSR_VOCAB_ATTR_UNUSED       (1u << 1)
#define TSR_VOCAB_ATTR_NORMAL       (1u << 2)
#define TSR_VOCAB_ATTR_CONTROL      (1u << 3)
#define TSR_VOCAB_ATTR_USER_DEFINED (1u << 4)
#define TSR_VOCAB_ATTR_BYTE         (1u << 5)
#define TSR_VOCAB_ATTR_LSTRIP       (1u << 7) /* eat whitespace left of it when parsed */
#define TSR_VOCAB_ATTR_RSTRIP       (1u << 8) /* eat whitespace right of it when parsed */

typedef struct tsr_vocab tsr_vocab;

/*
 * Build the tokenizer from g's metadata. Reads tokenizer.ggml.model (required: "llama" or
 * "gpt2"; "bert", "t5", ... give TSR_VOCAB_ERR_UNSUPPORTED), .tokens (required string
 * array), .scores (optional, float or int32, at least one per token), .token_type (optional
 * integer array), .merges (required for gpt2), .pre (gpt2 only; absent = "default"),
 * .bos/eos/eot/eom/unknown/seperator/padding_token_id (absent = llama.cpp's default for the
 * model type; -1 or 4294967295 = none; any other id outside the vocabulary is an error),
 * .add_bos_token / .add_eos_token / .add_space_prefix (absent = llama.cpp's default: SPM adds
 * BOS and a space prefix, BPE adds neither except the llama3 family which adds BOS).
 * Works on vocab-only files (no tensors). On error returns < 0, *out is NULL and `err` names
 * the key and the problem. The result is freed with tsr_vocab_free().
 */
int tsr_vocab_load(const tsr_gguf *g, tsr_vocab **out, char *err, size_t err_len);
void tsr_vocab_free(tsr_vocab *v); /* NULL is fine */

/* ---- properties ---- */
tsr_vocab_type tsr_vocab_type_of(const tsr_vocab *v);
/* Pre-tokenizer in use: the `tokenizer.ggml.pre` value ("default" when absent; "default"
 * for SPM too). Owned by v. */
const char *tsr_vocab_pre(const tsr_vocab *v);
int32_t tsr_vocab_n_tokens(const tsr_vocab *v);
int32_t tsr_vocab_bos(const tsr_vocab *v); /* TSR_TOKEN_NULL when the model has none */
int32_t tsr_vocab_eos(const tsr_vocab *v);
int32_t tsr_vocab_pad(const tsr_vocab *v);
bool tsr_vocab_add_bos(const tsr_vocab *v); /* tokenize(add_special) prepends BOS */
bool tsr_vocab_add_eos(const tsr_vocab *v); /* tokenize(add_special) appends EOS */

/* ---- per token (false / 0 / NULL for an id outside [0, n_tokens)) ---- */
/* End of generation: the set llama.cpp derives from the vocabulary (special_eog_ids):
 * EOS, EOT, EOM, the FIM pad/repo/sep tokens and the tokens recognized by text
 * ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
 * "<|end_of_text|>", "<EOT>", "<end_of_utterance>", ...), less llama.cpp's exceptions
 * (<|end|> next to gpt-oss's <|return|>/<|call|>, </s> next to Gemma 4's tool tokens).
 * Such tokens are also marked CONTROL, as llama.cpp does. */
bool tsr_vocab_is_eog(const tsr_vocab *v, int32_t id);
/* The same set as a list: *ids (owned by v, ascending) gets the ids; returns the count. */
size_t tsr_vocab_eog_ids(const tsr_vocab *v, const int32_t **ids);
bool tsr_vocab_is_control(const tsr_vocab *v, int32_t id);
/* The token's text as stored in the vocabulary (SPM: with U+2581; BPE: byte-unicode
 * characters), NUL-terminated, owned by v; *len (if len is not NULL) gets its byte length. */
const char *tsr_vocab_token_text(const tsr_vocab *v, int32_t id, size_t *len);
/* Id of the token whose vocabulary text is exactly text[0..len), or TSR_TOKEN_NULL. */
int32_t tsr_vocab_find(const tsr_vocab *v, const char *text, size_t len);

/* ---- text -> ids ----
 * Tokenize text[0..len) (need not be NUL-terminated; len 0 gives no tokens, or just the
 * BOS/EOS that add_special adds). add_special: prepend BOS / append EOS as the vocab says
 * (tsr_vocab_add_bos/eos). parse_special: text of control tokens (e.g. "<s>",
 * "<|endoftext|>") becomes those tokens; without it such text is tokenized as plain text.
 * Invalid UTF-8 never crashes: SPM turns stray bytes into <0xNN> byte tokens, BPE first
 * replaces every byte of an ill-formed sequence with U+FFFD, as llama.cpp does.
 * On success *ids is a malloc'd array the caller frees (NULL when *n_ids is 0); on error
 * *ids is NULL, *n_ids is 0 and the return is negative. */
int tsr_vocab_tokenize(const tsr_vocab *v, const char *text, size_t len, bool add_special,
                       bool parse_special, int32_t **ids, size_t *n_ids, char *err, size_t err_len);

/* ---- id -> text ----
 * The bytes of token `id` as text: SPM U+2581 -> ' ' and <0xNN> -> that raw byte; BPE
 * byte-unicode characters -> the bytes they stand for; control and user-defined tokens
 * -> their text verbatim. Control and unknown tokens give nothing (0) unless
 * render_special. A piece may be part of a UTF-8 character (byte tokens); use tsr_detok to
 * assemble text for display. Returns the piece length n; the piece is copied to buf only
 * when n <= cap (no NUL is added), so call again with a bigger buffer when n > cap.
 * Returns TSR_VOCAB_ERR_ARG for an id outside the vocabulary. */
int32_t tsr_vocab_token_to_piece(const tsr_vocab *v, int32_t id, char *buf, size_t cap,
                                 bool render_special);

/* ---- streaming detokenizer ----
 * Turns a stream of ids into text that is always valid UTF-8, emitting as early as
 * possible: push(id) appends the token's piece to the bytes still pending and hands back
 * every complete UTF-8 character; the incomplete tail of a character split across byte
 * tokens is held back until the next push. Ill-formed bytes (a stray continuation byte, a
 * lead byte followed by a non-continuation byte, overlong forms, surrogates) are replaced
 * by U+FFFD, one per maximal ill-formed subpart (the Unicode recommendation, as Python's
 * errors="replace"); at flush an incomplete tail also becomes one U+FFFD.
 *
 * Leading space: an SPM vocab prepends a space to the prompt, so the first piece after
 * BOS carries a leading space (stories260K generates "▁Once" -> " Once"). By default that
 * space is kept, which is what llama.cpp's common_token_to_piece / llama-simple print.
 * With TSR_DETOK_STRIP_LEADING_SPACE, one leading ' ' is dropped from the first non-empty
 * piece of the stream when the vocab has add_space_prefix (what llama2.c's run.c prints
 * and llama_detokenize does for a sequence without BOS).
 *
 * The detok keeps a pointer to the vocab (which must outlive it) and its own buffer; the
 * text handed back stays valid until the next push/flush/free on the same detok. */
#define TSR_DETOK_RENDER_SPECIAL      (1u << 0) /* render control tokens (e.g. "<s>") */
#define TSR_DETOK_STRIP_LEADING_SPACE (1u << 1)

typedef struct {
    const tsr_vocab *v;
    uint32_t flags;
    bool started;       /* a non-empty piece has been seen (for the leading space) */
    uint8_t pending[4]; /* bytes of an incomplete UTF-8 character */
    uint32_t n_pending;
    char *buf; /* output scratch, big enough for the pending bytes plus any piece */
    size_t cap;
} tsr_detok;

/* 0, or TSR_VOCAB_ERR_NOMEM / TSR_VOCAB_ERR_ARG (v NULL); free with tsr_detok_free. */
int tsr_detok_init(tsr_detok *d, const tsr_vocab *v, uint32_t flags);
void tsr_detok_free(tsr_detok *d);
/* Start a new stream (drops pending bytes, re-arms the leading-space rule). */
void tsr_detok_reset(tsr_detok *d);
/* Append token id; *text and *len get the newly complete text (possibly empty). A bad id
 * returns TSR_VOCAB_ERR_ARG and leaves the state unchanged. */
int tsr_detok_push(tsr_detok *d, int32_t id, const char **text, size_t *len);
/* End of stream: the pending bytes (as U+FFFD) and a reset. */
int tsr_detok_flush(tsr_detok *d, const char **text, size_t *len);

/* Whole-sequence convenience over tsr_detok: decode ids[0..n) with `flags` into a malloc'd
 * NUL-terminated string (*out, length *out_len). Returns 0 or a negative status. */
int tsr_vocab_detokenize(const tsr_vocab *v, const int32_t *ids, size_t n, uint32_t flags,
                         char **out, size_t *out_len);

#endif /* TSR_VOCAB_H */
