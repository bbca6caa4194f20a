/*
 * sampler.h — next-token sampling: penalties, temperature, top-k / top-p / min-p, seeded RNG.
 *
 * Why: the coordinator turns the last position's logits into one token id per step, with the
 * knobs of the OpenAI / vLLM APIs and the same semantics, so that a request sent to tessera
 * behaves as it would against vLLM, up to the random stream: draws are not those of vLLM's
 * torch RNG, but for a given seed and logits they are the same on every build of tessera
 * (the RNG is integer-only and the exp is tessera's own, in plain IEEE float operations;
 * checked identical across gcc / clang, -O0..-O3, SSE2 / AVX2, with and without FMA
 * contraction).
 *
 * Order of operations per step (as vLLM's sampler):
 *   1. penalties    repetition (over prompt + generated tokens, HF rule:
 *                   logit > 0 ? logit / r : logit * r), then frequency and presence (over
 *                   generated tokens only, OpenAI rule: logit -= f * count + p * (count > 0));
 *   2. greedy       if temperature < TSR_SAMPLER_GREEDY_EPS (vLLM's 1e-5, so 0 = greedy):
 *                   argmax, ties to the lowest id; top-k / top-p / min-p are ignored;
 *   3. temperature  logits /= temperature;
 *   4. top-k        keep the k highest (ties at the boundary go to the lowest ids, so exactly
 *                   k are kept);
 *   5. top-p        over the softmax of the top-k set, keep the smallest prefix of the
 *                   descending order whose cumulative probability is >= top_p;
 *   6. min-p        drop tokens with p < min_p * p_max (a ratio, so renormalising after
 *                   top-k / top-p does not change it);
 *   7. draw         one token from the renormalised survivors with a uniform that is a hash
 *                   of (seed, position of the generated token, draw index at that
 *                   position): counter-based, so a request resumed elsewhere with its
 *                   generated prefix accepted draws the same numbers for the next token.
 *
 * After top-k the candidates carry probabilities (w = exp(l - max), as vLLM's probs): top-p
 * and min-p compare those (min-p: w >= min_p), and ties in probability go to the lowest id.
 *
 * Cost for a 150k vocabulary: penalties are O(distinct tokens seen); everything else is
 * O(n_vocab) expected and never sorts the vocabulary: top-k <= 4096 is a bounded heap (about
 * one comparison per token), larger k a quickselect; top-p first drops the tokens that cannot
 * be in the nucleus (w <= (1 - p) z / n_vocab), then runs a weighted quickselect (partition,
 * recurse into the side holding the cumulative-p boundary) on the rest; min-p is a filter;
 * the draw walks the survivors in whatever order selection left them (deterministic for a
 * given input). The full-vocabulary passes are 4-wide vectors. Measured on one EPYC core
 * (151936 tokens, realistic logits): greedy 0.04 ms, plain 0.25 ms, top-k 40 + top-p 0.9
 * 0.16 ms, top-p 0.9 alone 0.45 ms.
 *
 * Logits that are NaN count as -inf. A sampler is single-threaded state (one per request).
 */
#ifndef TSR_SAMPLER_H
#define TSR_SAMPLER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Temperatures below this are greedy (vLLM's _SAMPLING_EPS). */
#define TSR_SAMPLER_GREEDY_EPS 1e-5f

typedef struct {
    float temperature;        /* >= 0, finite; < 1e-5 = greedy (argmax; ties -> lowest id) */
    int32_t top_k;            /* <= 0: off; >= n_vocab is off too */
    float top_p;              /* (0, 1]; 1: off */
    float min_p;              /* [0, 1]; 0: off */
    float repetition_penalty; /* > 0, finite; 1: off. Over prompt + generated tokens:
                                 logit > 0 ? logit / r : logit * r (vLLM / HF) */
    float presence_penalty;   /* [-2, 2]; 0: off. Generated tokens only (OpenAI):
                                 logit -= presence * (count > 0) */
    float frequency_penalty;  /* [-2, 2]; 0: off. Generated tokens only: logit -= f * count */
    uint64_t seed;            /* same seed + same logits sequence -> same tokens */
} tsr_sampling_params;

typedef struct tsr_sampler tsr_sampler;

/* Defaults of the OpenAI API / vLLM: temperature 1 (plain sampling from the model's
 * distribution: the default is NOT greedy), top_k off (0), top_p 1, min_p 0, repetition 1,
 * presence 0, frequency 0, seed 0. Callers that want a different stream per request must set
 * the seed themselves (e.g. from the clock or /dev/urandom when the request gives none). */
void tsr_sampling_params_default(tsr_sampling_params *p);

/* 0 when every field is in its range above; otherwise negative with a message in err (may
 * be NULL) naming the first bad field, its allowed range and the value given, e.g.
 * "top_p must be in (0, 1], got 0". */
int tsr_sampling_params_validate(const tsr_sampling_params *p, char *err, size_t err_len);

/* Create a sampler for a vocabulary of n_vocab (> 0) tokens; the params are validated and
 * copied. Allocates about 17 bytes per vocabulary entry. 0 ok; negative with err on bad
 * params, bad n_vocab or out of memory (*out is then NULL). */
int tsr_sampler_new(const tsr_sampling_params *p, int32_t n_vocab, tsr_sampler **out, char *err,
                    size_t err_len);
void tsr_sampler_free(tsr_sampler *s); /* NULL is a no-op */

/* The prompt's ids: they count for the repetition penalty only. May be called more than
 * once (appends). Ids outside [0, n_vocab) are ignored. */
void tsr_sampler_add_prompt(tsr_sampler *s, const int32_t *ids, size_t n);

/* A generated token (normally the one just returned by tsr_sampler_sample, but the caller
 * decides, e.g. after a forced token, or the tokens a resumed request already generated
 * elsewhere): counts for all three penalties and moves the RNG to the next position (the
 * draws for generated token i are a function of (seed, i) only). Ids outside [0, n_vocab)
 * count for no penalty but still move the position. tsr_sampler_sample does NOT call this
 * itself. */
void tsr_sampler_accept(tsr_sampler *s, int32_t id);

/* Index of the first largest of logits[0..n) (NaN never wins; 0 when none is above -inf):
 * the greedy sampler's choice, by a vector pass for the maximum and a scan for its first
 * occurrence. For callers that take the greedy token without a sampler (the drafter's greedy
 * drafts, `tessera bench`'s decode loop). n > 0. */
int32_t tsr_sampler_argmax(const float *logits, int32_t n);

/* The unnormalised distribution every non-greedy draw starts from: logits[0..n) divided by
 * temp (> 0; 1 leaves them) and NaN made -inf, in place; w[i] = exp(logits[i] - max) (w may
 * be NULL, or logits itself); returns the sum of the w (0 when no logit is finite, w then
 * untouched). The sampler's own passes (tests compare its SIMD paths with it). */
double tsr_sampler_weights(float *logits, int32_t n, float temp, float *w);

/* Which passes over the vocabulary run (tests): 1 the AVX2 ones where the CPU has AVX2, 0
 * the portable 4-lane ones, -1 back to the CPU's choice (AVX2 where present). Both give the
 * same weights, sums and draws (sampler.c says why); not thread-safe against running
 * samplers. */
void tsr_sampler_set_avx2(int on);

/* Apply step 1 (the penalties) to logits[n_vocab] in place. tsr_sampler_sample does this
 * itself; exposed for tests and for callers that want the penalised logits. */
void tsr_sampler_apply_penalties(const tsr_sampler *s, float *logits);

/* Sample the next token from logits[n_vocab]. The array is scratch: it is modified in place
 * (penalised, scaled). Returns an id in [0, n_vocab). Each non-greedy call takes the next
 * draw index at the current position (greedy calls do not touch the RNG). */
int32_t tsr_sampler_sample(tsr_sampler *s, float *logits);

/* Whether tsr_sampler_sample leaves logits untouched (greedy without penalties): then
 * tsr_sampler_sample_read_only gives the same id from logits it only reads (the caller
 * needs no scratch copy). Predicate of the parameters only. */
bool tsr_sampler_read_only(const tsr_sampler *s);
int32_t tsr_sampler_sample_read_only(const tsr_sampler *s, const float *logits);

/* As tsr_sampler_sample, and also report log-probabilities for the OpenAI `logprobs`
 * fields, taken from log_softmax of the logits after penalties and temperature (temperature
 * 1 when greedy) and before top-k / top-p / min-p:
 *   *chosen_logprob (may be NULL): that of the returned token;
 *   top_ids[n_top], top_logprobs[n_top]: the n_top most likely tokens, most likely first
 *   (ties to the lowest id). n_top is clamped to n_vocab; returns the id and writes
 *   min(n_top, n_vocab) entries. n_top may be 0 (the arrays may then be NULL). */
int32_t tsr_sampler_sample_logprobs(tsr_sampler *s, float *logits, int32_t n_top, int32_t *top_ids,
                                    float *top_logprobs, float *chosen_logprob);

/* Speculative decoding: verify a draft token that the drafter proposed with probability 1
 * (a one-hot draft distribution). Greedy: returns the argmax and *accepted = (argmax ==
 * draft). Sampling (Leviathan et al. / Chen et al. rejection rule): with p the sampling
 * distribution of tsr_sampler_sample (penalties, temperature, top-k, top-p, min-p), accept
 * the draft with probability min(1, p(draft) / 1) = p(draft) and return it; otherwise
 * return a draw from normalize(max(0, p - q)), i.e. p without the draft token. The tokens
 * returned are then distributed exactly as tsr_sampler_sample's. logits are scratch. */
int32_t tsr_sampler_sample_spec(tsr_sampler *s, float *logits, int32_t draft, bool *accepted);

/* Undo one tsr_sampler_accept of `id` (a speculative token that was rolled back), so the
 * penalties see exactly the accepted history; the position moves back by one. */
void tsr_sampler_unaccept(tsr_sampler *s, int32_t id);

#endif
