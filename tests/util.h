/*
 * util.h — helpers shared by the tests: where the models are, reading whole files and the
 * reference files, running commands, a model opened on one context with greedy decoding
 * (test_model, test_kvcache, test_drafter compare against references with it), and the
 * random data and float bits of the kernel tests.
 * A missing models folder fails the test (never skips it into a green run).
 */
#ifndef TSR_TEST_UTIL_H
#define TSR_TEST_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/model.h"

/* Path of `rel` under the models folder (TESSERA_MODELS or ../shared/models), in a static
 * buffer rotated over 8 slots. Fails the current test (cmocka) if the file is missing. */
const char *tsr_test_model_path(const char *rel);

/* malloc(n) (at least 1 byte) that fails the current test when out of memory. */
void *tsr_test_xmalloc(size_t n);

/* Read a whole file into a malloc'd NUL-terminated buffer; NULL on error. */
char *tsr_test_read_file(const char *path, size_t *len);

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
/* The first of b[0..n) whose "prompt" is `prompt`, whose "model" is `model` (any model when
 * NULL) and which has `key`; NULL when none is. */
const tsr_test_block *tsr_test_find_block(const tsr_test_block *b, size_t n, const char *model,
                                          const char *prompt, const char *key);
/* The lanes tests (test_q80_lanes, test_q40_lanes, test_q4k_lanes, test_q6k_lanes,
 * test_q50_lanes): the layer matrices of m whose type is `type` (*n_type), and how many of them
 * carry a lanes layout (the return). Fails the current test when a matrix of a type without a
 * lanes layout (not Q8_0, Q4_0, Q4_K, Q6_K, Q5_0) carries one, or one of `type` carries both it
 * and the repacked groups. */
int tsr_test_count_lanes(const tsr_model *m, uint32_t type, int *n_type);
/* The lanes tests' model check (test_q40_lanes, test_q4k_lanes, test_q6k_lanes, test_q50_lanes):
 * loads the synthetic file `rel` (under the models folder) and fails the current test unless
 * each of its layer matrices of `type` carries a lanes layout exactly when `chosen` (the layout's
 * tsr_*_chosen) and the default repack hold, the model's tally of them (the int32_t field at
 * `tally_offset` of tsr_model: offsetof(tsr_model, n_q40_lanes), ...) counts those and the
 * head when it is of `type` and in the layout, and the greedy decode of "Once upon a time"
 * gives the first 32 ids of expected/synth-tiny-expected.txt (of
 * expected/synth-tiny-more-quants.json for the types that file lacks). */
void tsr_test_lanes_model(const char *rel, uint32_t type, bool chosen, size_t tally_offset);
/* Whether the environment variable `name` is set to "0" (a layout's off switch, e.g.
 * TSR_Q41_LANES=0). */
bool tsr_test_env_off(const char *name);
/* The order check of the lanes tests whose kernels take the activations as they are
 * (test_q6k_lanes, test_q50_lanes): for rows 1, 15, 16, 17, 40 (partial groups,
 * masked stores) of n elements made by make_rows(n, n_rows) (file blocks of `type`), repacked by
 * `repack` into `bytes(n, n_rows)` bytes, and 1..17 tokens of activations from acts(rng, n, n_tok),
 * fails the current test unless dot (at TSR_GGML_SCALAR, TSR_GGML_AVX2 for lanes_avx2 and
 * TSR_GGML_VNNI where the CPU has them; row starts 0 and 16) gives tsr_vec_dot's bits for every row
 * and token. Returns the cases run. */
typedef struct {
    uint32_t type;
    uint8_t *(*make_rows)(int64_t n, int64_t n_rows);
    size_t (*bytes)(int64_t n, int64_t n_out);
    int (*repack)(int64_t n, int64_t n_out, const void *src, size_t src_stride, void *dst);
    void (*dot)(int isa, int64_t n, const void *packed, int64_t r0, int64_t n_rows, int32_t n_tok,
                const void *x, size_t x_stride, float *y, size_t y_stride);
    uint8_t *(*acts)(uint64_t *s, int64_t n, int32_t n_tok);
    bool lanes_ggml; /* Q8_0's layout in ggml's order (tsr_weight.lanes_ggml) */
    bool lanes_avx2; /* an AVX2 layout (Q5_0: tsr_weight.lanes_avx2; Q4_1): the order check runs
                        TSR_GGML_AVX2 too, where the CPU has it */
} tsr_test_lanes_kernel;
int tsr_test_lanes_order(const tsr_test_lanes_kernel *k, int64_t n, uint64_t *rng);
/* The lanes tests' bit check of one kernel call: rows r0..n_out - 1 of y against want (both
 * [n_tok][n_out]) for every token; fails the current test at the first difference, the message
 * led by `what` and naming n, the rows, the token count, the kernel level (lvl: a TSR_GGML_*
 * level of kernels/dot_ggml.h), the row, the token and both values with their bits. */
void tsr_test_lanes_expect(const char *what, int64_t n, int64_t n_out, int64_t r0, int32_t n_tok,
                           int lvl, const float *want, const float *y);
/* The lanes tests' three weights over the same n_out rows of n elements (file blocks of `type`
 * at wd, which the caller keeps): the file layout (file), the lanes layout that repack makes in
 * bytes(n, n_out) bytes (lanes), and the repacked groups where the type has them (groups,
 * has_groups; kernels/repack.h). tsr_test_lanes_set_free frees the two copies. */
typedef struct {
    tsr_weight file, lanes, groups;
    bool has_groups;
} tsr_test_lanes_set;
void tsr_test_lanes_set_make(tsr_test_lanes_set *s, uint32_t type, const uint8_t *wd, int64_t n,
                             int64_t n_out, size_t (*bytes)(int64_t n, int64_t n_out),
                             int (*repack)(int64_t n, int64_t n_out, const void *src,
                                           size_t src_stride, void *dst));
void tsr_test_lanes_set_free(tsr_test_lanes_set *s);
/* The lanes tests' matmul check (test_q6k_lanes, test_q50_lanes, test_q80_lanes): k's type,
 * n_out rows of n elements at wd, in the lanes layout, the repacked groups (where the type has
 * them) and the file layout (tsr_test_lanes_set_make), each alone and beside `other`
 * (tsr_matmul_multi, one activation conversion for both), for 1..17 tokens at once (17 rows of
 * tsr_test_gauss(rng)) on 1, 2 and 3 threads; fails the current test unless every output is
 * bit-identical to one token at a time, one thread, over the file layout. */
void tsr_test_lanes_matmul(const tsr_test_lanes_kernel *k, const uint8_t *wd, int64_t n,
                           int64_t n_out, const tsr_weight *other, uint64_t *rng);
/* The Q8_0 weight the lanes matmul checks run beside (tsr_test_lanes_matmul's `other`):
 * n_out rows of n elements quantized from tsr_test_gauss(rng) draws, row by row; its data is
 * malloc'd (the caller frees w.data). */
tsr_weight tsr_test_q8_0_weight(int64_t n, int64_t n_out, uint64_t *rng);
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
/* The GGUF and the weights only (f->c = NULL: the test makes its own contexts, or checks
 * that one is refused). Fails the current test on an error, as tsr_test_model_open. */
void tsr_test_model_load(tsr_test_model *f, const char *path);
/* Frees what either opened (a NULL context is fine). */
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

/* Fails the current test unless every logit of the reference list `ref` ('id:logit ...',
 * at least 5 pairs: a top-5 line of the expected files) is within tol of lg[id], naming
 * `what`, the id and both values. Returns the largest difference. */
float tsr_test_check_logits(const char *what, const char *ref, const float *lg, float tol);

/* Fails the current test unless a[0..n) and b[0..n) are the same floats bit for bit (two
 * thread counts, two layouts), naming `what` and the first index that differs. */
void tsr_test_check_same(const char *what, const float *a, const float *b, size_t n);

/* The prompt-order GEMM tests (test_q4k_gemm, test_q40_gemm): fails the current test
 * unless the results a (file layout), b (repacked, group by group) and c (repacked, all
 * groups in one call) of row r, token t are the expected e bit for bit, printing all four
 * with the ISA, n, the tile's rows x tokens and (r, t). */
void tsr_test_check_layouts(const char *isa, int64_t n, int n_rows, int n_tok, int r, int t,
                            float e, float a, float b, float c);

/* ---- deterministic data for the kernel tests ----
 * Each test keeps its own generator state (a nonzero uint64_t it seeds), so its data stay
 * what they have always been; these are the one copy of the generators and conversions. */

/* xorshift64 (shifts 13, 7, 17): advances *s and returns the new state. */
uint64_t tsr_test_xorshift64(uint64_t *s);
/* xorshift64* (shifts 12, 25, 27; the state times 0x2545F4914F6CDD1D is the output). */
uint64_t tsr_test_xorshift64s(uint64_t *s);
/* The top 53 bits of r as a double in [0, 1) (exact). */
double tsr_test_unit(uint64_t r);
/* Uniform in [-1, 1) from xorshift64: float(tsr_test_unit) * 2 - 1 in float arithmetic. */
float tsr_test_frand(uint64_t *s);
/* Standard normal from two xorshift64* draws (Box-Muller, the first draw kept off 0). */
float tsr_test_gauss(uint64_t *s);
/* n_tok Q8_0 activation rows of n elements (tsr_quant_act_row; malloc'd): row t is n draws
 * of tsr_test_gauss(s) times t + 1, its second block all zero when n >= 64. */
uint8_t *tsr_test_q8_0_acts(uint64_t *s, int64_t n, int32_t n_tok);
/* The same as Q8_1 rows (Q4_1's activations: d, s and the quants). */
uint8_t *tsr_test_q8_1_acts(uint64_t *s, int64_t n, int32_t n_tok);
/* n_tok Q8_K activation rows of n elements (a multiple of 256; malloc'd): row t is n draws of
 * tsr_test_gauss(s) times t + 1. */
uint8_t *tsr_test_q8_K_acts(uint64_t *s, int64_t n, int32_t n_tok);
/* n_rows Q4_K rows of n elements (malloc'd): random bytes for the scales and quants (every
 * nibble, every 6-bit scale and min), fp16 d and dmin each one of 6.0e-8, 1.0e-4, 0.0123,
 * 0.5, 3.0, -0.25. */
uint8_t *tsr_test_q4_K_rows(uint64_t *s, int64_t n, int64_t n_rows);
/* The bits of a float, and the float of bits (bit-identity checks print and compare them). */
uint32_t tsr_test_fbits(float f);
float tsr_test_ffrom(uint32_t u);

#endif
