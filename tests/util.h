/*
 * util.h — helpers shared by the tests: where the models are, reading whole files.
 * A missing models folder fails the test (never skips it into a green run).
 */
#ifndef TSR_TEST_UTIL_H
#define TSR_TEST_UTIL_H

#include <stddef.h>
#include <stdint.h>

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
