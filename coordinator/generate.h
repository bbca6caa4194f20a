/*
 * generate.h — one sequence, start to finish: prefill the prompt, then sample, detokenize
 * and stop, streaming text through a callback. This is what `tessera generate` runs; the
 * server's batched scheduler reuses the same pieces (sampler, stop matcher, detokenizer).
 *
 * Stop conditions, in order of precedence per step: an end-of-generation token (unless
 * ignore_eos; the token is not emitted as text), a stop string (text before it is emitted,
 * the string itself is not), stop token ids, max_tokens. Text is emitted only in whole
 * UTF-8 characters.
 */
#ifndef TSR_GENERATE_H
#define TSR_GENERATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "coordinator/sampler.h"
#include "shard/vocab.h"
#include "worker/replica.h"

typedef enum {
    TSR_FINISH_LENGTH = 0, /* max_tokens reached (or the context is full) */
    TSR_FINISH_STOP = 1,   /* a stop string or stop token id */
    TSR_FINISH_EOS = 2,    /* the model produced an end-of-generation token */
} tsr_finish_reason;

const char *tsr_finish_reason_name(tsr_finish_reason r);

typedef struct {
    int32_t max_tokens; /* >= 0 */
    tsr_sampling_params sampling;
    const char *const *stop; /* stop strings, may be NULL */
    size_t n_stop;
    const int32_t *stop_ids; /* stop token ids, may be NULL */
    size_t n_stop_ids;
    bool ignore_eos;
} tsr_gen_params;

/* Called with each piece of text that is safe to emit (never half a character). Return
 * non-zero to stop generating (counts as TSR_FINISH_STOP). */
typedef int (*tsr_gen_text_fn)(void *ud, const char *text, size_t len);

typedef struct {
    int32_t *ids; /* generated ids, malloc'd: free with tsr_gen_result_free */
    size_t n_ids;
    char *text; /* everything emitted, NUL-terminated, malloc'd */
    size_t text_len;
    tsr_finish_reason finish;
    uint64_t t_prefill_ns;
    uint64_t t_decode_ns;
} tsr_gen_result;

/* Generates from `prompt` (already tokenized, BOS included as the caller wants) on the
 * replica's leader (positions start at 0: earlier cache contents are overwritten). Returns 0, or <
 * 0 with `err` (bad parameters, prompt too long for the context, out of memory). */
int tsr_generate(tsr_replica *rep, const tsr_vocab *vocab, const int32_t *prompt, size_t n_prompt,
                 const tsr_gen_params *p, tsr_gen_text_fn on_text, void *ud, tsr_gen_result *res,
                 char *err, size_t err_len);

void tsr_gen_result_free(tsr_gen_result *r);

#endif
