/*
 * mkmodel.h — write a synthetic GGUF (llama, qwen2, qwen3 or gemma3 layout) with random
 * weights, of any shape and type.
 *
 * Why: tests need awkward shapes (n_head_kv 1, n_ff not a multiple of 256, odd layer
 * counts) and benchmarks need 100M- and 1B-scale models, none of which can be downloaded
 * here. The vocabulary (every tokenizer.* key) is copied from another GGUF so prompts
 * tokenize like a real model. Weights are N(0, std) from a seeded generator: the same
 * parameters give the same file, byte for byte.
 */
#ifndef TSR_MKMODEL_H
#define TSR_MKMODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    const char *out_path;
    const char *vocab_from; /* GGUF whose tokenizer.* keys are copied; sets n_vocab */
    int32_t n_layer, n_embd, n_head, n_head_kv, n_ff;
    int32_t n_ctx;    /* llama.context_length */
    const char *type; /* "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q6_K", "Q4_K_M" */
    bool tied;        /* no output.weight: the head reuses token_embd */
    uint64_t seed;
    float rope_freq_base;
    /* Architecture (NULL: "llama"): "qwen2" adds Q/K/V biases, "qwen3" per-head Q/K norms,
     * "gemma3" Q/K norms, post-attention/FFN norms, key_length and a sliding window. */
    const char *arch;
    int32_t head_dim; /* attention.key_length; 0: n_embd / n_head */
    int32_t n_swa;    /* {arch}.attention.sliding_window (0: none; gemma3 default 512) */
} tsr_mkmodel_params;

void tsr_mkmodel_params_default(tsr_mkmodel_params *p);

/* Writes the file. Shapes that a type cannot hold (a row length that is not a multiple of
 * its block size) fall back per tensor to Q8_0 (K-quants) or F16, as llama.cpp does; each
 * fallback is reported through `note` (may be NULL). Returns < 0 with a message on bad
 * parameters or I/O errors. */
int tsr_mkmodel(const tsr_mkmodel_params *p, void (*note)(const char *msg), char *err,
                size_t err_len);

#endif
