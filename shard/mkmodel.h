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
    const char *type; /* a type ("F16", "Q5_0", "Q4_K", ...: every matrix that type) or a
                         llama-quantize mix ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_S", ...) */
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

/* Writes the file. A mix gives each tensor the type llama-quantize gives it (llama arch,
 * no imatrix): e.g. Q4_K_M raises attn_v / ffn_down of some layers to Q6_K and the head
 * (output.weight, or token_embd when tied) to Q6_K (Q8_0 when n_embd is not a multiple of
 * 256). Shapes that a type cannot hold (a row length that is not a multiple of its block
 * size) fall back per tensor as llama-quantize does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K ->
 * Q8_0; Q2_K / Q3_K -> Q4_0 where llama.cpp would pick IQ4_NL), or to F16; each fallback
 * is reported through `note` (may be NULL). Returns < 0 with a message on bad parameters
 * or I/O errors. */
int tsr_mkmodel(const tsr_mkmodel_params *p, void (*note)(const char *msg), char *err,
                size_t err_len);

#endif
