/* mkmodel.c — see mkmodel.h. */
#include "shard/mkmodel.h"
#include "kernels/util.h"

#include "kernels/quant.h"
#include "shard/gguf.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

void tsr_mkmodel_params_default(tsr_mkmodel_params *p)
{
    memset(p, 0, sizeof *p);
    p->n_layer = 2;
    p->n_embd = 256;
    p->n_head = 4;
    p->n_head_kv = 4;
    p->n_ff = 768;
    p->n_ctx = 2048;
    p->type = "F16";
    p->seed = 1;
    p->rope_freq_base = 10000.0f;
}

/* xoshiro256** seeded by splitmix64: fast, and identical on every platform. */
typedef struct {
    uint64_t s[4];
} rng_t;

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t rng_next(rng_t *r)
{
    uint64_t *s = r->s;
    uint64_t res = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return res;
}

/* Approximately N(0,1): sum of 4 uniforms, rescaled (cheap, smooth, bounded tails). */
static float rng_normal(rng_t *r)
{
    uint64_t a = rng_next(r), b = rng_next(r);
    float s =
        (float)(a & 0xffffffffu) + (float)(a >> 32) + (float)(b & 0xffffffffu) + (float)(b >> 32);
    return (s / 4294967296.0f - 2.0f) * 1.7320508f; /* var of sum of 4 U(0,1) = 1/3 */
}

static bool is_block_type(uint32_t t)
{
    return tsr_type_block_elems(t) > 1;
}

/* llama-quantize's mixes (llama_tensor_get_type, llama arch, no imatrix): a base type
 * for most matrices, some raised per tensor role and layer. MIX_NONE: one type for all. */
typedef enum {
    MIX_NONE,
    MIX_Q2_K,
    MIX_Q3_K_S,
    MIX_Q3_K_M,
    MIX_Q3_K_L,
    MIX_Q4_K_S,
    MIX_Q4_K_M,
    MIX_Q5_K_S,
    MIX_Q5_K_M,
} mix_t;

#define TYPE_NAMES                                                                                 \
    "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q3_K, Q4_K, Q5_K, Q6_K (every matrix that "     \
    "type) or the llama-quantize mixes Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, "     \
    "Q5_K_M"

static int parse_type(const char *s, uint32_t *t, mix_t *mix)
{
    static const struct {
        const char *name;
        uint32_t t;
        mix_t mix;
    } types[] = {
        {"F32", TSR_TYPE_F32, MIX_NONE},       {"F16", TSR_TYPE_F16, MIX_NONE},
        {"BF16", TSR_TYPE_BF16, MIX_NONE},     {"Q8_0", TSR_TYPE_Q8_0, MIX_NONE},
        {"Q4_0", TSR_TYPE_Q4_0, MIX_NONE},     {"Q4_1", TSR_TYPE_Q4_1, MIX_NONE},
        {"Q5_0", TSR_TYPE_Q5_0, MIX_NONE},     {"Q5_1", TSR_TYPE_Q5_1, MIX_NONE},
        {"Q3_K", TSR_TYPE_Q3_K, MIX_NONE},     {"Q4_K", TSR_TYPE_Q4_K, MIX_NONE},
        {"Q5_K", TSR_TYPE_Q5_K, MIX_NONE},     {"Q6_K", TSR_TYPE_Q6_K, MIX_NONE},
        {"Q2_K", TSR_TYPE_Q2_K, MIX_Q2_K},     {"Q3_K_S", TSR_TYPE_Q3_K, MIX_Q3_K_S},
        {"Q3_K_M", TSR_TYPE_Q3_K, MIX_Q3_K_M}, {"Q3_K_L", TSR_TYPE_Q3_K, MIX_Q3_K_L},
        {"Q4_K_S", TSR_TYPE_Q4_K, MIX_Q4_K_S}, {"Q4_K_M", TSR_TYPE_Q4_K, MIX_Q4_K_M},
        {"Q5_K_S", TSR_TYPE_Q5_K, MIX_Q5_K_S}, {"Q5_K_M", TSR_TYPE_Q5_K, MIX_Q5_K_M},
    };
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        if (strcasecmp(s, types[i].name) == 0) {
            *t = types[i].t;
            *mix = types[i].mix;
            return 0;
        }
    }
    return -1;
}

/* llama.cpp's use_more_bits: which layers of attn_v / ffn_down get more bits in the _M
 * mixes. */
static bool more_bits(int i, int n)
{
    return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
}

typedef enum { ROLE_OTHER, ROLE_HEAD, ROLE_ATTN_V, ROLE_ATTN_OUTPUT, ROLE_FFN_DOWN } role_t;

/* The type llama-quantize gives a tensor of `role` in layer l of n in a mix based on type
 * `base` (n_gqa = n_head / n_head_kv; n_embd: the head's row length). */
static uint32_t mix_type(mix_t mix, uint32_t base, role_t role, int l, int n, int n_gqa,
                         int64_t n_embd)
{
    if (mix == MIX_NONE) return base;
    switch (role) {
    case ROLE_HEAD: /* output.weight, or token_embd when the head is tied to it */
        return n_embd % TSR_QK_K != 0 ? TSR_TYPE_Q8_0 : TSR_TYPE_Q6_K;
    case ROLE_ATTN_V:
        switch (mix) {
        case MIX_Q2_K:
            return n_gqa >= 4 ? TSR_TYPE_Q4_K : TSR_TYPE_Q3_K;
        case MIX_Q3_K_M:
            return l < 2 ? TSR_TYPE_Q5_K : TSR_TYPE_Q4_K;
        case MIX_Q3_K_L:
            return TSR_TYPE_Q5_K;
        case MIX_Q4_K_M:
        case MIX_Q5_K_M:
            return more_bits(l, n) ? TSR_TYPE_Q6_K : base;
        case MIX_Q4_K_S:
            return l < 4 ? TSR_TYPE_Q5_K : base;
        default:
            return base;
        }
    case ROLE_FFN_DOWN:
        switch (mix) {
        case MIX_Q2_K:
            return TSR_TYPE_Q3_K;
        case MIX_Q3_K_M: /* llama arch: Q4_K beyond the first sixteenth */
            return l < n / 16 ? TSR_TYPE_Q5_K : TSR_TYPE_Q4_K;
        case MIX_Q3_K_L:
            return TSR_TYPE_Q5_K;
        case MIX_Q4_K_M:
        case MIX_Q5_K_M:
            return more_bits(l, n) ? TSR_TYPE_Q6_K : base;
        case MIX_Q4_K_S:
            return l < n / 8 ? TSR_TYPE_Q5_K : base;
        default:
            return base;
        }
    case ROLE_ATTN_OUTPUT:
        switch (mix) {
        case MIX_Q2_K:
            return TSR_TYPE_Q3_K;
        case MIX_Q3_K_M:
            return TSR_TYPE_Q4_K;
        case MIX_Q3_K_L:
            return TSR_TYPE_Q5_K;
        default:
            return base;
        }
    default:
        return base;
    }
}

/* llama-quantize's replacement for a type whose blocks do not fit a row length (the caller
 * falls back to F16 when that one does not fit either). IQ4_NL, its choice for Q2_K/Q3_K,
 * is not a type Tessera computes with: Q4_0 (the same 4.5 bits per weight) instead. */
static uint32_t fallback_type(uint32_t t)
{
    switch (t) {
    case TSR_TYPE_Q2_K:
    case TSR_TYPE_Q3_K:
        return TSR_TYPE_Q4_0;
    case TSR_TYPE_Q4_K:
        return TSR_TYPE_Q5_0;
    case TSR_TYPE_Q5_K:
        return TSR_TYPE_Q5_1;
    default:
        return TSR_TYPE_Q8_0;
    }
}

typedef struct {
    tsr_gguf_writer *w;
    rng_t rng;
    float *buf;
    void (*note)(const char *);
    char *err;
    size_t err_len;
} mk_t;

/* A random matrix ne = [n_in, n_out] of type t (with fallback), values N(0, std). */
static int add_matrix(mk_t *mk, const char *name, int64_t n_in, int64_t n_out, uint32_t t,
                      float std)
{
    if (is_block_type(t) && n_in % tsr_type_block_elems(t) != 0) {
        uint32_t fb = fallback_type(t);
        if (n_in % tsr_type_block_elems(fb) != 0) fb = TSR_TYPE_F16;
        if (mk->note) {
            char msg[256];
            snprintf(msg, sizeof msg,
                     "%s: row length %lld is not a multiple of the %s block size; using %s", name,
                     (long long)n_in, tsr_type_name(t), tsr_type_name(fb));
            mk->note(msg);
        }
        t = fb;
    }
    size_t row = tsr_row_bytes(t, n_in);
    size_t n_bytes = row * (size_t)n_out;
    uint8_t *data = malloc(n_bytes);
    float *tmp = malloc(sizeof(float) * (size_t)n_in);
    if (!data || !tmp) {
        free(data);
        free(tmp);
        tsr_set_err(mk->err, mk->err_len, "out of memory making %s", name);
        return -1;
    }
    for (int64_t r = 0; r < n_out; r++) {
        for (int64_t i = 0; i < n_in; i++) tmp[i] = std * rng_normal(&mk->rng);
        tsr_quant_row(t, tmp, data + (size_t)r * row, n_in);
    }
    int64_t ne[2] = {n_in, n_out};
    int rc = tsr_gguf_writer_add_tensor(mk->w, name, t, 2, ne, data, n_bytes);
    free(data);
    free(tmp);
    if (rc) tsr_set_err(mk->err, mk->err_len, "out of memory adding %s", name);
    return rc;
}

/* A norm vector: F32, values around 1. */
static int add_norm(mk_t *mk, const char *name, int64_t n)
{
    float *v = malloc(sizeof(float) * (size_t)n);
    if (!v) return -1;
    for (int64_t i = 0; i < n; i++) v[i] = 1.0f + 0.1f * rng_normal(&mk->rng);
    int64_t ne[1] = {n};
    int rc = tsr_gguf_writer_add_tensor(mk->w, name, TSR_TYPE_F32, 1, ne, v, sizeof(float) * n);
    free(v);
    return rc;
}

int tsr_mkmodel(const tsr_mkmodel_params *p, void (*note)(const char *msg), char *err,
                size_t err_len)
{
    int rc = -1;
    tsr_gguf *vg = NULL;
    mk_t mk = {0};
    uint32_t type;
    mix_t mix;
    char name[128];

    if (!p->out_path || !p->vocab_from) {
        tsr_set_err(err, err_len, "mkmodel needs an output path and a vocabulary GGUF");
        return -1;
    }
    if (parse_type(p->type, &type, &mix) != 0) {
        tsr_set_err(err, err_len, "unknown type '%s' (use " TYPE_NAMES ")", p->type);
        return -1;
    }
    if (p->n_layer < 1 || p->n_embd < 1 || p->n_head < 1 || p->n_head_kv < 1 || p->n_ff < 1 ||
        p->n_ctx < 1) {
        tsr_set_err(err, err_len,
                    "n_layer, n_embd, n_head, n_head_kv, n_ff and n_ctx must be >= 1");
        return -1;
    }
    const char *arch = p->arch ? p->arch : "llama";
    const bool qwen2 = !strcmp(arch, "qwen2"), qwen3 = !strcmp(arch, "qwen3"),
               gemma3 = !strcmp(arch, "gemma3");
    if (!qwen2 && !qwen3 && !gemma3 && strcmp(arch, "llama") != 0) {
        tsr_set_err(err, err_len, "unknown architecture '%s' (use llama, qwen2, qwen3, gemma3)",
                    arch);
        return -1;
    }
    if (p->head_dim > 0 && p->head_dim % 2 != 0) {
        tsr_set_err(err, err_len, "head size %d must be even", p->head_dim);
        return -1;
    }
    if (p->head_dim <= 0 && (p->n_embd % p->n_head != 0 || (p->n_embd / p->n_head) % 2 != 0)) {
        tsr_set_err(err, err_len,
                    "n_embd %d must be a multiple of n_head %d with an even head size", p->n_embd,
                    p->n_head);
        return -1;
    }
    if (p->n_head % p->n_head_kv != 0) {
        tsr_set_err(err, err_len, "n_head %d must be a multiple of n_head_kv %d", p->n_head,
                    p->n_head_kv);
        return -1;
    }
    if (tsr_gguf_open(p->vocab_from, &vg, err, err_len) != 0) return -1;
    int64_t itok = tsr_gguf_find_key(vg, "tokenizer.ggml.tokens");
    uint64_t n_vocab = 0;
    if (!tsr_gguf_kv_arr(vg, itok, NULL, &n_vocab) || n_vocab == 0 || n_vocab > INT32_MAX) {
        tsr_set_err(err, err_len, "%s has no tokenizer.ggml.tokens array to copy", p->vocab_from);
        goto done;
    }
    mk.w = tsr_gguf_writer_new();
    if (!mk.w) goto oom;
    mk.note = note;
    mk.err = err;
    mk.err_len = err_len;
    uint64_t x = p->seed;
    for (int i = 0; i < 4; i++) mk.rng.s[i] = tsr_splitmix64(&x);

    const int32_t head_dim = p->head_dim > 0 ? p->head_dim : p->n_embd / p->n_head;
    tsr_gguf_writer *w = mk.w;
    char desc[256];
    snprintf(desc, sizeof desc,
             "synthetic random-weight %s made by tessera mkmodel (seed %llu), not trained",
             p->arch ? p->arch : "llama", (unsigned long long)p->seed);
    char key[128];
#define KEY(nm) (snprintf(key, sizeof key, "%s." nm, arch), key)
    if (tsr_gguf_writer_set_str(w, "general.architecture", arch, strlen(arch)) ||
        tsr_gguf_writer_set_str(w, "general.name", "tessera-synthetic", 17) ||
        tsr_gguf_writer_set_str(w, "general.description", desc, strlen(desc)) ||
        tsr_gguf_writer_set_int(w, "general.alignment", TSR_GGUF_UINT32, 32) ||
        tsr_gguf_writer_set_int(w, KEY("context_length"), TSR_GGUF_UINT32, p->n_ctx) ||
        tsr_gguf_writer_set_int(w, KEY("embedding_length"), TSR_GGUF_UINT32, p->n_embd) ||
        tsr_gguf_writer_set_int(w, KEY("block_count"), TSR_GGUF_UINT32, p->n_layer) ||
        tsr_gguf_writer_set_int(w, KEY("feed_forward_length"), TSR_GGUF_UINT32, p->n_ff) ||
        tsr_gguf_writer_set_int(w, KEY("attention.head_count"), TSR_GGUF_UINT32, p->n_head) ||
        tsr_gguf_writer_set_int(w, KEY("attention.head_count_kv"), TSR_GGUF_UINT32, p->n_head_kv) ||
        tsr_gguf_writer_set_int(w, KEY("rope.dimension_count"), TSR_GGUF_UINT32, head_dim) ||
        tsr_gguf_writer_set_float(w, KEY("rope.freq_base"), TSR_GGUF_FLOAT32, p->rope_freq_base) ||
        tsr_gguf_writer_set_float(w, KEY("attention.layer_norm_rms_epsilon"), TSR_GGUF_FLOAT32,
                                  1e-5) ||
        tsr_gguf_writer_set_int(w, KEY("vocab_size"), TSR_GGUF_UINT32, (int64_t)n_vocab))
        goto oom;
    if (p->head_dim > 0 &&
        (tsr_gguf_writer_set_int(w, KEY("attention.key_length"), TSR_GGUF_UINT32, head_dim) ||
         tsr_gguf_writer_set_int(w, KEY("attention.value_length"), TSR_GGUF_UINT32, head_dim)))
        goto oom;
    const int32_t n_swa = p->n_swa > 0 ? p->n_swa : (gemma3 ? 512 : 0);
    if (n_swa > 0 &&
        tsr_gguf_writer_set_int(w, KEY("attention.sliding_window"), TSR_GGUF_UINT32, n_swa))
        goto oom;
#undef KEY
    for (int64_t i = 0; i < tsr_gguf_n_kv(vg); i++) {
        const char *k = tsr_gguf_kv_key(vg, i);
        if (strncmp(k, "tokenizer.", 10) == 0 && tsr_gguf_writer_copy_kv(w, vg, i) != 0) goto oom;
    }

    const int64_t E = p->n_embd, Q = (int64_t)p->n_head * head_dim,
                  KV = (int64_t)p->n_head_kv * head_dim, F = p->n_ff, V = (int64_t)n_vocab;
    const float std_in = 1.0f / sqrtf((float)E), std_ff = 1.0f / sqrtf((float)F);
    const int n_gqa = p->n_head / p->n_head_kv;
    uint32_t head_t = mix_type(mix, type, ROLE_HEAD, 0, p->n_layer, n_gqa, E);
    if (add_matrix(&mk, "token_embd.weight", E, V, p->tied ? head_t : type, 1.0f)) goto done;
    if (add_norm(&mk, "output_norm.weight", E)) goto oom;
    if (!p->tied && add_matrix(&mk, "output.weight", E, V, head_t, std_in)) goto done;
    for (int32_t l = 0; l < p->n_layer; l++) {
        const uint32_t tv = mix_type(mix, type, ROLE_ATTN_V, l, p->n_layer, n_gqa, E);
        const uint32_t to = mix_type(mix, type, ROLE_ATTN_OUTPUT, l, p->n_layer, n_gqa, E);
        const uint32_t td = mix_type(mix, type, ROLE_FFN_DOWN, l, p->n_layer, n_gqa, E);
#define M(nm, nin, nout, t, sd)                                                                    \
    do {                                                                                           \
        snprintf(name, sizeof name, "blk.%d." nm ".weight", l);                                    \
        if (add_matrix(&mk, name, nin, nout, t, sd)) goto done;                                    \
    } while (0)
        snprintf(name, sizeof name, "blk.%d.attn_norm.weight", l);
        if (add_norm(&mk, name, E)) goto oom;
        M("attn_q", E, Q, type, std_in);
        M("attn_k", E, KV, type, std_in);
        M("attn_v", E, KV, tv, std_in);
        M("attn_output", Q, E, to, std_in);
        snprintf(name, sizeof name, "blk.%d.ffn_norm.weight", l);
        if (add_norm(&mk, name, E)) goto oom;
        M("ffn_gate", E, F, type, std_in);
        M("ffn_up", E, F, type, std_in);
        M("ffn_down", F, E, td, std_ff);
#undef M
#define NORM(nm, n)                                                                                \
    do {                                                                                           \
        snprintf(name, sizeof name, "blk.%d." nm, l);                                              \
        if (add_norm(&mk, name, n)) goto oom;                                                      \
    } while (0)
        if (qwen2) { /* biases: values around 1 are as good as any to test them */
            NORM("attn_q.bias", Q);
            NORM("attn_k.bias", KV);
            NORM("attn_v.bias", KV);
        }
        if (qwen3 || gemma3) {
            NORM("attn_q_norm.weight", head_dim);
            NORM("attn_k_norm.weight", head_dim);
        }
        if (gemma3) {
            NORM("post_attention_norm.weight", E);
            NORM("post_ffw_norm.weight", E);
        }
#undef NORM
    }
    rc = tsr_gguf_writer_save(w, p->out_path, err, err_len);
    goto done;
oom:
    tsr_set_err(err, err_len, "out of memory building the model");
    rc = -1;
done:
    tsr_gguf_writer_free(mk.w);
    tsr_gguf_close(vg);
    return rc;
}
