/*
 * generate.h — what a generation request asks for, and how it can end. Shared by the
 * serving engine (coordinator/engine.h), which runs every generation — `tessera generate`
 * submits one request, `tessera serve` one per gRPC call.
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

typedef enum {
    TSR_FINISH_LENGTH = 0, /* max_tokens reached (or the context is full) */
    TSR_FINISH_STOP = 1,   /* a stop string or stop token id */
    TSR_FINISH_EOS = 2,    /* the model produced an end-of-generation token */
} tsr_finish_reason;

const char *tsr_finish_reason_name(tsr_finish_reason r);

typedef struct {
    int32_t max_tokens; /* >= 1 */
    tsr_sampling_params sampling;
    const char *const *stop; /* stop strings, may be NULL */
    size_t n_stop;
    const int32_t *stop_ids; /* stop token ids, may be NULL */
    size_t n_stop_ids;
    bool ignore_eos;
} tsr_gen_params;

#endif
