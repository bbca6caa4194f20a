/*
 * util.h — helpers shared by the tests: where the models are, reading whole files and the
 * reference files, running commands, and a model opened on one context with greedy
 * decoding (test_model, test_kvcache, test_drafter compare against references with it).
 * A missing models folder fails the test (never skips it into a green run).
 */
#ifndef TSR_TEST_UTIL_H
#define TSR_TEST_UTIL_H

#include <stddef.h>
#include <stdint.h>

#include "worker/model.h"

/* Path of `rel` under the models folder (TESSERA_MODELS or ../shared/models), in a static
 * buffer rotated over 8 slots. Fails the current test (cmocka) if the file is missing. */
const char *tsr_test_model_path(const char *rel);

/* Read a whole file into a malloc'd NUL-terminated buffer; NULL on error. */
char *tsr_test_read_file(const char *path, size_t *len);

#endif

/* The reference files in ../shared/models/expected are blocks of 'key: value' lines
 * separated by blank lines; '#' lines are comments. */
typedef struct {
    char **keys;
    char **vals;
    size_t n;
} tsr_test_block;

/* Parse a whole file; returns the number of blocks (0 on error). Free with
 * tsr_test_blocks_free. */
size_t tsr_test_parse_blocks(const char *path, tsr_test_block **out);
void tsr_test_blocks_free(tsr_test_block *b, size_t n);
/* Value of `key` in the block, or NULL. */
const char *tsr_test_block_get(const tsr_test_block *b, const char *key);
/* Space-separated decimal ids -> malloc'd array; returns the count. */
size_t tsr_test_parse_ids(const char *s, int32_t **out);
/* A JSON string literal ("...") -> malloc'd UTF-8 string, NULL if malformed. */
char *tsr_test_json_string(const char *s);
/* 'id:logit id:logit ...' -> up to max pairs; returns the count. */
size_t tsr_test_parse_logits(const char *s, int32_t *ids, float *vals, size_t max);

/* Run a command line through /bin/sh, capturing stdout (malloc'd, NUL-terminated, in
 * *out when out != NULL) and stderr (likewise in *errout). Returns the exit status
 * (128 + signal when killed), or -1 when it could not run. */
int tsr_test_run(const char *cmdline, char **out, char **errout);

/* A whole model on one single-sequence context: the GGUF (mapped), its weights, the
 * context. Owned by the struct; tsr_test_model_close frees all three. */
typedef struct {
    tsr_gguf *g;
    tsr_model *m;
    tsr_ctx *c;
} tsr_test_model;

/* Open `path` (a full path: tsr_test_model_path for one under the models folder), load it
 * and make a context of n_ctx positions, n_batch tokens per forward, n_threads threads, K
 * and V stored as kv_type (TSR_KV_F32: what tsr_ctx_new makes). Fails the current test
 * (cmocka) with the step and the message on any error. */
void tsr_test_model_open(tsr_test_model *f, const char *path, int32_t n_ctx, int32_t n_batch,
                         int n_threads, tsr_kv_type kv_type);
void tsr_test_model_close(tsr_test_model *f);

/* Index of the largest of x[0..n) (the first one on ties). */
int32_t tsr_test_argmax(const float *x, int32_t n);

/* Prefill prompt[0..n_prompt) at position 0, then greedy-decode n tokens into out (each
 * argmax fed back, the last not forwarded). logits_after_prompt (n_vocab floats) receives
 * the logits after the prompt when not NULL. Fails the current test on a forward error. */
void tsr_test_greedy(tsr_test_model *f, const int32_t *prompt, size_t n_prompt, int32_t n,
                     int32_t *out, float *logits_after_prompt);

/* Fails the current test unless got[0..n) == want[0..n), printing both from the first
 * difference (up to 10 ids) and naming `what`. */
void tsr_test_check_ids(const char *what, const int32_t *want, const int32_t *got, size_t n);
