/*
 * model.c — llama model loading and the single-sequence forward pass (see model.h).
 *
 * The hot loop is the matmul (kernels/ops.c + kernels/quant.c); everything here is
 * bookkeeping around it, kept in the order llama.cpp's llm_build_llama runs so that
 * numerical differences stay at float rounding level.
 */
#include "worker/model.h"
#include "kernels/util.h"

#include "kernels/kvcache.h"
#include "kernels/quant.h"
#include "kernels/rope.h"
#include "worker/tdump.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- loading ---- */

/* Integer hyperparameter `<arch>.<name>`; `def` < 0 means required. */
static int get_hp_int(const tsr_gguf *g, const char *arch, const char *name, int64_t def,
                      int64_t max, int32_t *out, char *err, size_t err_len)
{
    char key[160];
    int64_t v;
    snprintf(key, sizeof key, "%s.%s", arch, name);
    int64_t i = tsr_gguf_find_key(g, key);
    if (i < 0) {
        if (def < 0) {
            tsr_set_err(err, err_len, "missing required metadata key '%s'", key);
            return -1;
        }
        *out = (int32_t)def;
        return 0;
    }
    if (!tsr_gguf_kv_int(g, i, &v)) {
        tsr_set_err(err, err_len, "metadata key '%s' must be an integer, found %s", key,
                    tsr_gguf_vtype_name(tsr_gguf_kv_type(g, i)));
        return -1;
    }
    if (v < 1 || v > max) {
        tsr_set_err(err, err_len,
                    "metadata key '%s' = %" PRId64 " is out of range (1..%" PRId64 ")", key, v,
                    max);
        return -1;
    }
    *out = (int32_t)v;
    return 0;
}

static int get_hp_float(const tsr_gguf *g, const char *arch, const char *name, double def,
                        float *out, char *err, size_t err_len)
{
    char key[160];
    double v;
    snprintf(key, sizeof key, "%s.%s", arch, name);
    int64_t i = tsr_gguf_find_key(g, key);
    if (i < 0) {
        *out = (float)def;
        return 0;
    }
    if (!tsr_gguf_kv_float(g, i, &v) || !isfinite(v)) {
        tsr_set_err(err, err_len, "metadata key '%s' must be a finite float", key);
        return -1;
    }
    *out = (float)v;
    return 0;
}

/* Bind tensor `name` as a matrix of n_out rows × n_in (ne = [n_in, n_out]). */
static int bind(tsr_model *m, const char *name, int64_t n_in, int64_t n_out, tsr_weight *w,
                bool optional, char *err, size_t err_len)
{
    const tsr_gguf_tensor *t = tsr_gguf_find_tensor(m->gguf, name);
    if (!t) {
        if (optional) return 1;
        tsr_set_err(err, err_len, "missing tensor '%s'", name);
        return -1;
    }
    int64_t rest = 1;
    for (uint32_t d = 2; d < TSR_GGUF_MAX_DIMS; d++) rest *= t->ne[d];
    if (t->ne[0] != n_in || t->ne[1] != n_out || rest != 1) {
        tsr_set_err(err, err_len,
                    "tensor '%s' has shape [%" PRId64 ", %" PRId64 "], expected [%" PRId64
                    ", %" PRId64 "] from the model's hyperparameters",
                    name, t->ne[0], t->ne[1], n_in, n_out);
        return -1;
    }
    w->type = t->type;
    w->n_in = n_in;
    w->n_out = n_out;
    w->row_bytes = tsr_row_bytes(t->type, n_in);
    w->data = t->data;
    w->packed = NULL;
    w->lanes = NULL;
    w->lanes_ggml = false;
    w->lanes_avx2 = false;
    m->n_bytes_weights += t->n_bytes;
    m->n_bytes_loaded += t->n_bytes;
    return 0;
}

/* A 1-D vector of n values of any type, copied to float. */
static int bind_vec(tsr_model *m, const char *name, int64_t n, float **out, char *err,
                    size_t err_len)
{
    const tsr_gguf_tensor *t = tsr_gguf_find_tensor(m->gguf, name);
    if (!t) {
        tsr_set_err(err, err_len, "missing tensor '%s'", name);
        return -1;
    }
    if (t->ne[0] != n || t->ne[1] * t->ne[2] * t->ne[3] != 1) {
        tsr_set_err(err, err_len, "tensor '%s' has %" PRId64 " values, expected %" PRId64, name,
                    t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3], n);
        return -1;
    }
    *out = malloc((size_t)n * sizeof(float));
    if (!*out) {
        tsr_set_err(err, err_len, "out of memory");
        return -1;
    }
    tsr_dequant_row(t->type, t->data, *out, n);
    return 0;
}

/* Values [r0, r1) of a 1-D vector of n values of any type, copied to float. */
static int bind_vec_slice(tsr_model *m, const char *name, int64_t n, int64_t r0, int64_t r1,
                          float **out, char *err, size_t err_len)
{
    float *full = NULL;
    if (bind_vec(m, name, n, &full, err, err_len)) return -1;
    if (r0 == 0 && r1 == n) {
        *out = full;
        return 0;
    }
    *out = malloc((size_t)(r1 - r0 > 0 ? r1 - r0 : 1) * sizeof(float));
    if (!*out) {
        free(full);
        tsr_set_err(err, err_len, "out of memory");
        return -1;
    }
    memcpy(*out, full + r0, (size_t)(r1 - r0) * sizeof(float));
    free(full);
    return 0;
}

/* llama3-style rope scaling (as llama.cpp's converter computes rope_freqs). */
static void llama3_factors(float *ff, int n_rot, float base, float factor, float low_ff,
                           float high_ff, float orig_ctx)
{
    const float low_wavelen = orig_ctx / low_ff;
    const float high_wavelen = orig_ctx / high_ff;
    for (int i = 0; i < n_rot; i += 2) {
        float freq = 1.0f / powf(base, (float)i / (float)n_rot);
        float wavelen = 2.0f * (float)M_PI / freq;
        float f;
        if (wavelen < high_wavelen)
            f = 1.0f;
        else if (wavelen > low_wavelen)
            f = factor;
        else {
            float smooth = (orig_ctx / wavelen - low_ff) / (high_ff - low_ff);
            f = 1.0f / ((1.0f - smooth) / factor + smooth);
        }
        ff[i / 2] = f;
    }
}

static const char *const arch_names[] = {"llama", "qwen2", "qwen3", "gemma3"};

const char *tsr_arch_name(tsr_arch a)
{
    return (unsigned)a < sizeof arch_names / sizeof arch_names[0] ? arch_names[a] : "?";
}

bool tsr_hparams_layer_swa(const tsr_hparams *hp, int32_t il)
{
    if (hp->n_swa <= 0) return false;
    if (hp->swa_pattern <= 0) return true;
    return il % hp->swa_pattern < hp->swa_pattern - 1;
}

/* A required float hyperparameter: as get_hp_float, but a missing key is an error. */
static int need_hp_float(const tsr_gguf *g, const char *arch, const char *name, float *out,
                         char *err, size_t err_len)
{
    char key[160];
    snprintf(key, sizeof key, "%s.%s", arch, name);
    if (tsr_gguf_find_key(g, key) < 0) {
        tsr_set_err(err, err_len, "missing required metadata key '%s'", key);
        return -1;
    }
    return get_hp_float(g, arch, name, 0.0, out, err, err_len);
}

int tsr_model_read_hparams(const tsr_gguf *g, tsr_hparams *hp, char *err, size_t err_len)
{
    char name[160];
    tsr_gguf_str s;
    memset(hp, 0, sizeof *hp);
    if (!tsr_gguf_get_str(g, "general.architecture", &s)) {
        tsr_set_err(err, err_len, "missing metadata key 'general.architecture' (string)");
        return -1;
    }
    bool known = false;
    for (size_t a = 0; a < sizeof arch_names / sizeof arch_names[0]; a++) {
        if (s.len == strlen(arch_names[a]) && memcmp(s.ptr, arch_names[a], s.len) == 0) {
            hp->arch = (tsr_arch)a;
            known = true;
        }
    }
    if (!known) {
        tsr_set_err(err, err_len,
                    "unsupported architecture '%.*s': Tessera runs 'llama' (Llama, TinyLlama, "
                    "Mistral-style, SmolLM2), 'qwen2', 'qwen3' and 'gemma3' models",
                    (int)(s.len > 40 ? 40 : s.len), s.ptr);
        return -1;
    }
    const char *arch = arch_names[hp->arch];
    const bool is_llama = hp->arch == TSR_ARCH_LLAMA;
    if (get_hp_int(g, arch, "block_count", -1, 4096, &hp->n_layer, err, err_len) ||
        get_hp_int(g, arch, "embedding_length", -1, 1 << 20, &hp->n_embd, err, err_len) ||
        get_hp_int(g, arch, "attention.head_count", -1, 4096, &hp->n_head, err, err_len) ||
        get_hp_int(g, arch, "attention.head_count_kv", hp->n_head, 4096, &hp->n_head_kv, err,
                   err_len) ||
        get_hp_int(g, arch, "feed_forward_length", -1, 1 << 22, &hp->n_ff, err, err_len) ||
        get_hp_int(g, arch, "context_length", 2048, 1 << 24, &hp->n_ctx_train, err, err_len))
        return -1;
    if (hp->n_head % hp->n_head_kv != 0) {
        tsr_set_err(err, err_len,
                    "%s.attention.head_count %d is not a multiple of head_count_kv %d", arch,
                    hp->n_head, hp->n_head_kv);
        return -1;
    }
    /* Head size: attention.key_length, else n_embd / n_head (which must then divide). */
    snprintf(name, sizeof name, "%s.attention.key_length", arch);
    if (tsr_gguf_find_key(g, name) < 0 && hp->n_embd % hp->n_head != 0) {
        tsr_set_err(err, err_len,
                    "%s.embedding_length %d is not divisible by head_count %d and there is no "
                    "'%s' key",
                    arch, hp->n_embd, hp->n_head, name);
        return -1;
    }
    int32_t v_len = 0;
    if (get_hp_int(g, arch, "attention.key_length", hp->n_embd / hp->n_head, 1 << 16, &hp->head_dim,
                   err, err_len) ||
        get_hp_int(g, arch, "attention.value_length", hp->head_dim, 1 << 16, &v_len, err,
                   err_len) ||
        get_hp_int(g, arch, "rope.dimension_count", hp->head_dim, hp->head_dim, &hp->n_rot, err,
                   err_len))
        return -1;
    if (v_len != hp->head_dim) {
        tsr_set_err(err, err_len,
                    "%s.attention.value_length %d differs from key_length %d (not supported)", arch,
                    v_len, hp->head_dim);
        return -1;
    }
    if (hp->n_rot % 2 != 0) {
        tsr_set_err(err, err_len, "%s.rope.dimension_count %d must be even", arch, hp->n_rot);
        return -1;
    }
    /* llama.cpp requires the epsilon for every architecture; old llama files get 1e-5. */
    if ((is_llama ? get_hp_float(g, arch, "attention.layer_norm_rms_epsilon", 1e-5, &hp->rms_eps,
                                 err, err_len)
                  : need_hp_float(g, arch, "attention.layer_norm_rms_epsilon", &hp->rms_eps, err,
                                  err_len)) ||
        get_hp_float(g, arch, "rope.freq_base", 10000.0, &hp->rope_freq_base, err, err_len))
        return -1;
    if (!(hp->rms_eps > 0.0f) || !(hp->rope_freq_base > 0.0f)) {
        tsr_set_err(err, err_len,
                    "%s.attention.layer_norm_rms_epsilon and %s.rope.freq_base must be > 0", arch,
                    arch);
        return -1;
    }
    hp->rope_freq_scale = 1.0f;
    float factor = 1.0f;
    tsr_gguf_str st = {0};
    snprintf(name, sizeof name, "%s.rope.scaling.type", arch);
    bool has_type = tsr_gguf_get_str(g, name, &st);
    if (get_hp_float(g, arch, "rope.scaling.factor", 1.0, &factor, err, err_len)) return -1;
    if (!(factor > 0.0f)) {
        tsr_set_err(err, err_len, "%s.rope.scaling.factor must be > 0", arch);
        return -1;
    }
    if (has_type && st.len == 6 && memcmp(st.ptr, "linear", 6) == 0)
        hp->rope_freq_scale = 1.0f / factor;
    if (tsr_gguf_find_tensor(g, "rope_freqs.weight") ||
        (has_type && st.len == 6 && memcmp(st.ptr, "llama3", 6) == 0))
        hp->rope_llama3 = true;

    /* Per-architecture graph details (llama.cpp's load_hparams and src/models/<arch>.cpp). */
    hp->attn_scale = 1.0f / sqrtf((float)hp->head_dim);
    hp->embd_scale = 1.0f;
    hp->rope_freq_base_swa = hp->rope_freq_base;
    hp->rope_freq_scale_swa = hp->rope_freq_scale;
    switch (hp->arch) {
    case TSR_ARCH_LLAMA:
        /* Mistral-style files: a window on every layer when the file says so. */
        if (get_hp_int(g, arch, "attention.sliding_window", 0, 1 << 24, &hp->n_swa, err, err_len))
            return -1;
        break;
    case TSR_ARCH_QWEN2:
        hp->rope_neox = true;
        break;
    case TSR_ARCH_QWEN3:
        hp->rope_neox = true;
        hp->qk_norm = true;
        break;
    case TSR_ARCH_GEMMA3:
        hp->rope_neox = true;
        hp->qk_norm = true;
        hp->post_norms = true;
        hp->ffn_gelu = true;
        hp->embd_scale = sqrtf((float)hp->n_embd);
        if (get_hp_int(g, arch, "attention.sliding_window", 0, 1 << 24, &hp->n_swa, err, err_len) ||
            get_hp_int(g, arch, "attention.sliding_window_pattern", 6, 4096, &hp->swa_pattern, err,
                       err_len) ||
            get_hp_float(g, arch, "final_logit_softcapping", 0.0, &hp->final_logit_softcap, err,
                         err_len))
            return -1;
        if (hp->n_swa > 0) {
            hp->rope_freq_base_swa = 10000.0f;
            hp->rope_freq_scale_swa = 1.0f;
        }
        if (hp->final_logit_softcap < 0.0f) {
            tsr_set_err(err, err_len, "%s.final_logit_softcapping must be >= 0", arch);
            return -1;
        }
        /* gemma_pytorch's query_pre_attn_scalar: n_embd / n_head for the 27B (62 layers),
         * the head size otherwise. */
        if (hp->n_layer == 62) hp->attn_scale = 1.0f / sqrtf((float)(hp->n_embd / hp->n_head));
        break;
    }
    /* Vocabulary size: the embedding's row count is the truth for the forward pass. */
    const tsr_gguf_tensor *te = tsr_gguf_find_tensor(g, "token_embd.weight");
    if (!te) {
        tsr_set_err(err, err_len,
                    "missing tensor 'token_embd.weight' (is this a vocabulary-only "
                    "GGUF? 'tessera tokenize' works on those)");
        return -1;
    }
    if (te->ne[1] < 1 || te->ne[1] > INT32_MAX) {
        tsr_set_err(err, err_len, "token_embd.weight has an invalid row count");
        return -1;
    }
    hp->n_vocab = (int32_t)te->ne[1];
    return 0;
}

void tsr_shard_full(const tsr_hparams *hp, tsr_shard *s)
{
    s->layer_begin = 0;
    s->layer_end = hp->n_layer;
    s->head_begin = 0;
    s->head_end = hp->n_head;
    s->kv_head_begin = 0;
    s->kv_head_end = hp->n_head_kv;
    s->ff_begin = 0;
    s->ff_end = hp->n_ff;
    s->vocab_begin = 0;
    s->vocab_end = hp->n_vocab;
}

/* Columns [c0, c1) of every row of a matrix, copied out of the file with pread: only those
 * bytes are read, and the mapping is not touched. */
static int bind_cols(tsr_model *m, const char *name, int64_t n_in, int64_t n_out, int64_t c0,
                     int64_t c1, tsr_weight *w, char *err, size_t err_len)
{
    tsr_weight full = {0};
    if (bind(m, name, n_in, n_out, &full, false, err, err_len)) return -1;
    m->n_bytes_weights -= (uint64_t)full.row_bytes * (uint64_t)n_out;
    m->n_bytes_loaded -= (uint64_t)full.row_bytes * (uint64_t)n_out;
    if (c0 == 0 && c1 == n_in) {
        *w = full;
        m->n_bytes_weights += (uint64_t)full.row_bytes * (uint64_t)n_out;
        m->n_bytes_loaded += (uint64_t)full.row_bytes * (uint64_t)n_out;
        return 0;
    }
    int64_t blk = tsr_type_block_elems(full.type);
    if (c0 % blk != 0 || c1 % blk != 0) {
        tsr_set_err(err, err_len,
                    "%s is %s (blocks of %" PRId64 " values): columns %" PRId64 "..%" PRId64
                    " cut a block; choose a tensor-parallel size whose slices fall on block "
                    "boundaries",
                    name, tsr_type_name(full.type), blk, c0, c1);
        return -1;
    }
    size_t off = tsr_row_bytes(full.type, c0);
    size_t piece = tsr_row_bytes(full.type, c1 - c0);
    uint8_t *buf = malloc(piece * (size_t)n_out);
    void **owned = realloc(m->owned, sizeof(void *) * (size_t)(m->n_owned + 1));
    if (!buf || !owned) {
        free(buf);
        if (owned) m->owned = owned;
        tsr_set_err(err, err_len, "out of memory copying %s", name);
        return -1;
    }
    m->owned = owned;
    m->owned[m->n_owned++] = buf;
    const uint64_t base =
        (uint64_t)((const uint8_t *)full.data - (const uint8_t *)tsr_gguf_base(m->gguf));
    for (int64_t r = 0; r < n_out; r++) {
        if (tsr_gguf_pread(m->gguf, base + (uint64_t)r * full.row_bytes + off,
                           buf + (size_t)r * piece, piece) != 0) {
            tsr_set_err(err, err_len, "reading %s from the file failed", name);
            return -1;
        }
    }
    w->type = full.type;
    w->n_in = c1 - c0;
    w->n_out = n_out;
    w->row_bytes = piece;
    w->data = buf;
    m->n_bytes_weights += piece * (uint64_t)n_out;
    m->n_bytes_loaded += piece * (uint64_t)n_out;
    return 0;
}

/* Rows [r0, r1) of a matrix: a view into the mapping. */
static int bind_rows(tsr_model *m, const char *name, int64_t n_in, int64_t n_out, int64_t r0,
                     int64_t r1, tsr_weight *w, bool optional, char *err, size_t err_len)
{
    tsr_weight full = {0};
    int rc = bind(m, name, n_in, n_out, &full, optional, err, err_len);
    if (rc != 0) return rc;
    m->n_bytes_weights -= (uint64_t)full.row_bytes * (uint64_t)(n_out - (r1 - r0));
    m->n_bytes_loaded -= (uint64_t)full.row_bytes * (uint64_t)(n_out - (r1 - r0));
    *w = full;
    w->n_out = r1 - r0;
    w->data = (const uint8_t *)full.data + (size_t)r0 * full.row_bytes;
    return 0;
}

static bool range_ok(int32_t b, int32_t e, int32_t n)
{
    return 0 <= b && b <= e && e <= n;
}

int tsr_model_load_shard(const tsr_gguf *g, const tsr_shard *shard, tsr_model **out, char *err,
                         size_t err_len)
{
    *out = NULL;
    tsr_model *m = calloc(1, sizeof *m);
    if (!m) {
        tsr_set_err(err, err_len, "out of memory");
        return -1;
    }
    m->gguf = g;
    tsr_hparams *hp = &m->hp;
    char name[160];
    if (tsr_model_read_hparams(g, hp, err, err_len) != 0) goto fail;
    if (shard)
        m->shard = *shard;
    else
        tsr_shard_full(hp, &m->shard);
    const tsr_shard *sh = &m->shard;
    const int32_t group = hp->n_head / hp->n_head_kv;
    if (!range_ok(sh->layer_begin, sh->layer_end, hp->n_layer) ||
        sh->layer_begin == sh->layer_end || !range_ok(sh->head_begin, sh->head_end, hp->n_head) ||
        sh->head_begin == sh->head_end ||
        !range_ok(sh->kv_head_begin, sh->kv_head_end, hp->n_head_kv) ||
        !range_ok(sh->ff_begin, sh->ff_end, hp->n_ff) || sh->ff_begin == sh->ff_end ||
        !range_ok(sh->vocab_begin, sh->vocab_end, hp->n_vocab) ||
        sh->head_begin / group < sh->kv_head_begin ||
        (sh->head_end - 1) / group >= sh->kv_head_end) {
        tsr_set_err(err, err_len,
                    "invalid shard for this model (layers %d-%d, heads %d-%d, kv heads "
                    "%d-%d, ff %d-%d, vocab %d-%d)",
                    sh->layer_begin, sh->layer_end, sh->head_begin, sh->head_end, sh->kv_head_begin,
                    sh->kv_head_end, sh->ff_begin, sh->ff_end, sh->vocab_begin, sh->vocab_end);
        goto fail;
    }
    m->first_stage = sh->layer_begin == 0;
    m->last_stage = sh->layer_end == hp->n_layer;
    m->n_layer_local = sh->layer_end - sh->layer_begin;

    if (m->last_stage && sh->vocab_begin == sh->vocab_end) {
        tsr_set_err(err, err_len, "the last stage needs a vocabulary slice");
        goto fail;
    }
    const tsr_gguf_tensor *rf = tsr_gguf_find_tensor(g, "rope_freqs.weight");
    if (rf) {
        if (bind_vec(m, "rope_freqs.weight", hp->n_rot / 2, &m->freq_factors, err, err_len))
            goto fail;
    } else if (hp->rope_llama3) {
        float factor = 1.0f, low = 1.0f, high = 4.0f;
        int32_t orig = 8192;
        const char *arch = tsr_arch_name(hp->arch);
        if (get_hp_float(g, arch, "rope.scaling.factor", 1.0, &factor, err, err_len) ||
            get_hp_float(g, arch, "rope.scaling.low_freq_factor", 1.0, &low, err, err_len) ||
            get_hp_float(g, arch, "rope.scaling.high_freq_factor", 4.0, &high, err, err_len) ||
            get_hp_int(g, arch, "rope.scaling.original_context_length", 8192, 1 << 24, &orig, err,
                       err_len))
            goto fail;
        m->freq_factors = malloc(sizeof(float) * (size_t)(hp->n_rot / 2));
        if (!m->freq_factors) goto oom;
        llama3_factors(m->freq_factors, hp->n_rot, hp->rope_freq_base, factor, low, high,
                       (float)orig);
    }

    const int64_t E = hp->n_embd, hd = hp->head_dim;
    const int64_t q_dim = (int64_t)hp->n_head * hd;
    const int64_t kv_dim = (int64_t)hp->n_head_kv * hd;
    const tsr_gguf_tensor *te = tsr_gguf_find_tensor(g, "token_embd.weight");
    /* The embedding is read a row per token (first stage) and is the head when tied. */
    if (bind(m, "token_embd.weight", E, hp->n_vocab, &m->tok_embd, false, err, err_len)) goto fail;
    m->n_bytes_weights -= te->n_bytes;
    m->n_bytes_loaded -= te->n_bytes;
    if (m->first_stage) m->n_bytes_loaded += te->n_bytes; /* rows on demand; count all */
    if (m->last_stage) {
        int rc = bind_rows(m, "output.weight", E, hp->n_vocab, sh->vocab_begin, sh->vocab_end,
                           &m->output, true, err, err_len);
        if (rc < 0) goto fail;
        if (rc == 1) {
            m->tied = true;
            m->output = m->tok_embd;
            m->output.n_out = sh->vocab_end - sh->vocab_begin;
            m->output.data =
                (const uint8_t *)m->tok_embd.data + (size_t)sh->vocab_begin * m->tok_embd.row_bytes;
            uint64_t nb = (uint64_t)m->output.n_out * m->output.row_bytes;
            m->n_bytes_weights += nb;
            if (!m->first_stage) m->n_bytes_loaded += nb;
        }
        if (bind_vec(m, "output_norm.weight", E, &m->output_norm, err, err_len)) goto fail;
    }

    m->layers = calloc((size_t)m->n_layer_local, sizeof *m->layers);
    if (!m->layers) goto oom;
    const int64_t h0 = sh->head_begin * hd, h1 = sh->head_end * hd;
    const int64_t k0 = sh->kv_head_begin * hd, k1 = sh->kv_head_end * hd;
    for (int32_t li = 0; li < m->n_layer_local; li++) {
        const int32_t l = sh->layer_begin + li;
        tsr_layer *L = &m->layers[li];
#define ROWS(field, nm, nin, nout, r0, r1)                                                         \
    do {                                                                                           \
        snprintf(name, sizeof name, "blk.%d." nm ".weight", l);                                    \
        if (bind_rows(m, name, nin, nout, r0, r1, &L->field, false, err, err_len)) goto fail;      \
    } while (0)
#define COLS(field, nm, nin, nout, c0, c1)                                                         \
    do {                                                                                           \
        snprintf(name, sizeof name, "blk.%d." nm ".weight", l);                                    \
        if (bind_cols(m, name, nin, nout, c0, c1, &L->field, err, err_len)) goto fail;             \
    } while (0)
        ROWS(wq, "attn_q", E, q_dim, h0, h1);
        ROWS(wk, "attn_k", E, kv_dim, k0, k1);
        ROWS(wv, "attn_v", E, kv_dim, k0, k1);
        COLS(wo, "attn_output", q_dim, E, h0, h1);
        ROWS(w_gate, "ffn_gate", E, hp->n_ff, sh->ff_begin, sh->ff_end);
        ROWS(w_up, "ffn_up", E, hp->n_ff, sh->ff_begin, sh->ff_end);
        COLS(w_down, "ffn_down", hp->n_ff, E, sh->ff_begin, sh->ff_end);
#undef ROWS
#undef COLS
        snprintf(name, sizeof name, "blk.%d.attn_norm.weight", l);
        if (bind_vec(m, name, E, &L->attn_norm, err, err_len)) goto fail;
        snprintf(name, sizeof name, "blk.%d.ffn_norm.weight", l);
        if (bind_vec(m, name, E, &L->ffn_norm, err, err_len)) goto fail;
            /* Biases (optional, as in llama.cpp): Q/K/V split by rows with their weights. */
#define BIAS(field, nm, n, r0, r1)                                                                 \
    do {                                                                                           \
        snprintf(name, sizeof name, "blk.%d." nm ".bias", l);                                      \
        if (tsr_gguf_find_tensor(g, name) &&                                                       \
            bind_vec_slice(m, name, n, r0, r1, &L->field, err, err_len))                           \
            goto fail;                                                                             \
    } while (0)
        BIAS(bq, "attn_q", q_dim, h0, h1);
        BIAS(bk, "attn_k", kv_dim, k0, k1);
        BIAS(bv, "attn_v", kv_dim, k0, k1);
        BIAS(bo, "attn_output", E, 0, E);
#undef BIAS
        if (hp->qk_norm) {
            snprintf(name, sizeof name, "blk.%d.attn_q_norm.weight", l);
            if (bind_vec(m, name, hd, &L->q_norm, err, err_len)) goto fail;
            snprintf(name, sizeof name, "blk.%d.attn_k_norm.weight", l);
            if (bind_vec(m, name, hd, &L->k_norm, err, err_len)) goto fail;
        }
        if (hp->post_norms) {
            snprintf(name, sizeof name, "blk.%d.post_attention_norm.weight", l);
            if (bind_vec(m, name, E, &L->post_attn_norm, err, err_len)) goto fail;
            snprintf(name, sizeof name, "blk.%d.post_ffw_norm.weight", l);
            if (bind_vec(m, name, E, &L->post_ffn_norm, err, err_len)) goto fail;
        }
    }
    *out = m;
    return 0;
oom:
    tsr_set_err(err, err_len, "out of memory");
fail:
    tsr_model_free(m);
    return -1;
}

int tsr_model_load(const tsr_gguf *g, tsr_model **out, char *err, size_t err_len)
{
    if (tsr_model_check_q80_order(tsr_model_repack_default(), false, err, err_len) != 0)
        return -1;
    if (tsr_model_load_shard(g, NULL, out, err, err_len) != 0) return -1;
    if (tsr_model_repack_default() && tsr_model_repack(*out, err, err_len) != 0) {
        tsr_model_free(*out);
        *out = NULL;
        return -1;
    }
    return 0;
}

void tsr_model_free(tsr_model *m)
{
    if (!m) return;
    if (m->layers) {
        for (int32_t l = 0; l < m->n_layer_local; l++) {
            tsr_layer *L = &m->layers[l];
            free(L->attn_norm);
            free(L->ffn_norm);
            free(L->bq);
            free(L->bk);
            free(L->bv);
            free(L->bo);
            free(L->q_norm);
            free(L->k_norm);
            free(L->post_attn_norm);
            free(L->post_ffn_norm);
        }
    }
    for (int32_t i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    free(m->layers);
    free(m->output_norm);
    free(m->freq_factors);
    free(m);
}

/* ---- context ---- */

/* KV heads per attention piece when a batch has enough tokens (attn_pieces): 4 keeps one
 * piece's V chains in registers (kernels/kvcache.c, side by side) and leaves a batch of 16
 * sequences of a 12-head model 48 pieces to balance over the threads. */
#define ATTN_RUN_KV 4

struct tsr_ctx {
    const tsr_model *m;
    tsr_pool *pool;
    tsr_comm *tp;  /* tensor-parallel group, or NULL */
    int32_t n_ctx; /* single-sequence contexts: max positions; else 0 */
    int32_t n_batch;
    int32_t n_kv_blocks;
    int32_t kv_dim; /* local: (kv_head_end - kv_head_begin) * head_dim */
    /* KV pool: [n_layer_local][n_kv_blocks * TSR_KV_BLOCK_SIZE] rows of kv_row_bytes each
     * (kv_dim values of kv_type; kernels/kvcache.h). */
    uint8_t *k_cache, *v_cache;
    tsr_kv_type kv_type;
    size_t kv_row_bytes;
    uint8_t *attn_scratch; /* [n_threads][attn_scratch_bytes] (kernels/kvcache.h) */
    size_t attn_scratch_bytes;
    /* Attention work pieces of one token: query heads of one KV head or of a run of whole KV
     * groups, [i][0] the first local head, [i][1] the count (attn_pieces); [n_head_local][2]. */
    int32_t (*attn_piece)[2];
    int32_t n_attn_pieces;
    int32_t *ident_table; /* single sequence: block table 0, 1, 2, ... */
    /* Activations, [n_batch][width]. */
    float *x, *xb, *xb2, *q, *k, *v, *att_out, *hb, *hb2;
    float *att_scores; /* [n_threads][GQA group][max positions] */
    int32_t max_pos;   /* positions a sequence may reach (att_scores size) */
    float *logits;     /* [n_batch][vocab slice] */
    float *head_in;    /* [n_batch][n_embd]: normed hidden of tokens that want logits */
    /* RoPE cos/sin of the batch's positions (kernels/rope.h), [n_batch][n_rot] each: [0] for
     * the global layers' base/scale, [1] for sliding-window layers' (when they differ);
     * made once per forward pass instead of per layer and per Q and K */
    float *rope_cs[2];
    void *scratch;
    const tsr_batch *b;    /* the batch in flight (attention workers read it) */
    int32_t prompt_len;    /* tsr_forward's order classes (tsr_ctx_set_prompt_len) */
    const tsr_backend *be; /* NULL: the CPU path below (see tsr_ctx_set_backend) */
    void *be_state;
};

int32_t tsr_ctx_n_kv_blocks(const tsr_ctx *c)
{
    return c->n_kv_blocks;
}
int32_t tsr_ctx_n_batch(const tsr_ctx *c)
{
    return c->n_batch;
}
void tsr_ctx_set_prompt_len(tsr_ctx *c, int32_t n_prompt)
{
    c->prompt_len = n_prompt;
}
float *tsr_ctx_hidden(tsr_ctx *c)
{
    return c->x;
}
void tsr_ctx_set_tp_comm(tsr_ctx *c, tsr_comm *tp)
{
    c->tp = tp;
    if (c->be && c->be->set_tp_comm) c->be->set_tp_comm(c->be_state, tp);
}

void tsr_ctx_set_backend(tsr_ctx *c, const tsr_backend *be, void *state)
{
    c->be = be;
    c->be_state = state;
    if (be && be->set_tp_comm) be->set_tp_comm(state, c->tp);
    free(c->k_cache);
    free(c->v_cache);
    c->k_cache = c->v_cache = NULL;
}

const char *tsr_ctx_backend_name(const tsr_ctx *c)
{
    return c->be ? c->be->name : "cpu";
}

uint64_t tsr_kv_block_bytes(const tsr_hparams *hp, int32_t n_layer, int32_t n_head_kv,
                            tsr_kv_type t)
{
    return 2ull * (uint64_t)n_layer * TSR_KV_BLOCK_SIZE *
           (uint64_t)tsr_kv_row_bytes(t, (int64_t)n_head_kv * hp->head_dim);
}

tsr_kv_type tsr_ctx_kv_type(const tsr_ctx *c)
{
    return c->kv_type;
}

const tsr_backend *tsr_ctx_backend(const tsr_ctx *c)
{
    return c->be;
}

void *tsr_ctx_backend_state(const tsr_ctx *c)
{
    return c->be ? c->be_state : NULL;
}

static int ctx_alloc(const tsr_model *m, int32_t n_kv_blocks, int32_t n_batch, int n_threads,
                     tsr_kv_type kv_type, tsr_ctx **out, char *err, size_t err_len)
{
    *out = NULL;
    const tsr_hparams *hp = &m->hp;
    const tsr_shard *sh = &m->shard;
    if (!tsr_kv_type_fits(kv_type, hp->head_dim, err, err_len)) return -1;
    if (n_threads < 1 || n_threads > 256) {
        tsr_set_err(err, err_len, "thread count %d is out of range (1..256)", n_threads);
        return -1;
    }
    if (n_kv_blocks < 1 || n_batch < 1) {
        tsr_set_err(err, err_len, "a context needs at least one KV block and a batch of one token");
        return -1;
    }
    tsr_ctx *c = calloc(1, sizeof *c);
    if (!c) goto oom;
    c->m = m;
    c->n_batch = n_batch;
    c->n_kv_blocks = n_kv_blocks;
    c->kv_dim = (sh->kv_head_end - sh->kv_head_begin) * hp->head_dim;
    c->max_pos = n_kv_blocks * TSR_KV_BLOCK_SIZE;
    c->kv_type = kv_type;
    c->kv_row_bytes = tsr_kv_row_bytes(kv_type, c->kv_dim);
    const size_t hd = (size_t)hp->head_dim;
    const size_t q_dim = (size_t)(sh->head_end - sh->head_begin) * hd;
    const size_t kv_dim = (size_t)c->kv_dim;
    const size_t n_ff = (size_t)(sh->ff_end - sh->ff_begin);
    const size_t nb = (size_t)n_batch;
    const size_t E = (size_t)hp->n_embd;
    size_t kv_bytes = (size_t)m->n_layer_local * (size_t)c->max_pos * c->kv_row_bytes;
    c->k_cache = calloc(kv_bytes ? kv_bytes : 1, 1);
    c->v_cache = calloc(kv_bytes ? kv_bytes : 1, 1);
    /* up to ATTN_RUN_KV KV heads' query heads per tsr_attn_heads call (attn_pieces) */
    const int32_t n_head_local = sh->head_end - sh->head_begin;
    const int32_t group = hp->n_head_kv > 0 ? hp->n_head / hp->n_head_kv : 1;
    c->attn_scratch_bytes = tsr_attn_group_scratch_bytes(hp->head_dim, ATTN_RUN_KV * group);
    c->attn_piece = malloc(sizeof *c->attn_piece * (size_t)(n_head_local > 0 ? n_head_local : 1));
    c->attn_scratch = aligned_alloc(64, (size_t)n_threads * c->attn_scratch_bytes);
    c->x = malloc(nb * E * sizeof(float));
    c->xb = malloc(nb * (q_dim > E ? q_dim : E) * sizeof(float));
    c->xb2 = malloc(nb * E * sizeof(float));
    c->q = malloc(nb * (q_dim ? q_dim : 1) * sizeof(float));
    c->k = malloc(nb * (kv_dim ? kv_dim : 1) * sizeof(float));
    c->v = malloc(nb * (kv_dim ? kv_dim : 1) * sizeof(float));
    c->att_out = malloc(nb * (q_dim ? q_dim : 1) * sizeof(float));
    c->hb = malloc(nb * n_ff * sizeof(float));
    c->hb2 = malloc(nb * n_ff * sizeof(float));
    c->att_scores = malloc((size_t)n_threads * (size_t)group * (size_t)c->max_pos * sizeof(float));
    size_t n_vocab_local = (size_t)(sh->vocab_end - sh->vocab_begin);
    c->logits = malloc(nb * (n_vocab_local ? n_vocab_local : 1) * sizeof(float));
    c->head_in = malloc(nb * E * sizeof(float));
    for (int r = 0; r < 2; r++) c->rope_cs[r] = malloc(nb * (size_t)hp->n_rot * sizeof(float));
    /* Scratch for converted activations: the largest of all matmul inputs. */
    size_t scratch = 0;
    for (int32_t l = 0; l < m->n_layer_local; l++) {
        const tsr_layer *L = &m->layers[l];
        /* Q/K/V and gate/up run as one multi-matmul each (one conversion per dot type). */
        const tsr_weight *qkv[] = {&L->wq, &L->wk, &L->wv}, *gu[] = {&L->w_gate, &L->w_up};
        size_t sz[4] = {tsr_matmul_multi_scratch_bytes(qkv, 3, n_batch),
                        tsr_matmul_multi_scratch_bytes(gu, 2, n_batch),
                        tsr_matmul_scratch_bytes(&L->wo, n_batch),
                        tsr_matmul_scratch_bytes(&L->w_down, n_batch)};
        for (size_t k = 0; k < 4; k++)
            if (sz[k] > scratch) scratch = sz[k];
    }
    if (m->last_stage) {
        size_t sz = tsr_matmul_scratch_bytes(&m->output, n_batch);
        if (sz > scratch) scratch = sz;
    }
    c->scratch = malloc(scratch ? scratch : 1);
    c->pool = tsr_pool_new(n_threads);
    if (!c->k_cache || !c->v_cache || !c->x || !c->xb || !c->xb2 || !c->q || !c->k || !c->v ||
        !c->att_out || !c->hb || !c->hb2 || !c->att_scores || !c->logits || !c->head_in ||
        !c->scratch || !c->pool || !c->attn_scratch || !c->attn_piece || !c->rope_cs[0] ||
        !c->rope_cs[1])
        goto oom;
    *out = c;
    return 0;
oom:
    tsr_set_err(err, err_len, "out of memory creating a context (%d KV blocks of %d tokens, %s)",
                n_kv_blocks, TSR_KV_BLOCK_SIZE, tsr_kv_type_name(kv_type));
    tsr_ctx_free(c);
    return -1;
}

int tsr_ctx_new_paged_kv(const tsr_model *m, int32_t n_kv_blocks, int32_t n_batch, int n_threads,
                         tsr_kv_type kv_type, tsr_ctx **out, char *err, size_t err_len)
{
    return ctx_alloc(m, n_kv_blocks, n_batch, n_threads, kv_type, out, err, err_len);
}

int tsr_ctx_new(const tsr_model *m, int32_t n_ctx, int32_t n_batch, int n_threads, tsr_ctx **out,
                char *err, size_t err_len)
{
    return tsr_ctx_new_kv(m, n_ctx, n_batch, n_threads, TSR_KV_F32, out, err, err_len);
}

int tsr_ctx_new_kv(const tsr_model *m, int32_t n_ctx, int32_t n_batch, int n_threads,
                   tsr_kv_type kv_type, tsr_ctx **out, char *err, size_t err_len)
{
    const tsr_hparams *hp = &m->hp;
    if (n_ctx <= 0) n_ctx = hp->n_ctx_train < 4096 ? hp->n_ctx_train : 4096;
    if (n_batch <= 0) n_batch = 128;
    if (n_batch > n_ctx) n_batch = n_ctx;
    int32_t n_blocks = (n_ctx + TSR_KV_BLOCK_SIZE - 1) / TSR_KV_BLOCK_SIZE;
    if (ctx_alloc(m, n_blocks, n_batch, n_threads, kv_type, out, err, err_len) != 0) return -1;
    tsr_ctx *c = *out;
    c->n_ctx = n_ctx;
    c->ident_table = malloc(sizeof(int32_t) * (size_t)n_blocks);
    if (!c->ident_table) {
        tsr_ctx_free(c);
        *out = NULL;
        tsr_set_err(err, err_len, "out of memory");
        return -1;
    }
    for (int32_t i = 0; i < n_blocks; i++) c->ident_table[i] = i;
    return 0;
}

void tsr_ctx_free(tsr_ctx *c)
{
    if (!c) return;
    if (c->be && c->be->free) c->be->free(c->be_state);
    if (c->pool) tsr_pool_free(c->pool);
    free(c->k_cache);
    free(c->v_cache);
    free(c->attn_scratch);
    free(c->ident_table);
    free(c->x);
    free(c->xb);
    free(c->xb2);
    free(c->q);
    free(c->k);
    free(c->v);
    free(c->att_out);
    free(c->hb);
    free(c->hb2);
    free(c->att_scores);
    free(c->attn_piece);
    free(c->logits);
    free(c->head_in);
    free(c->rope_cs[0]);
    free(c->rope_cs[1]);
    free(c->scratch);
    free(c);
}

/* ---- attention ---- */

typedef struct {
    tsr_ctx *c;
    int layer; /* local layer index */
    _Atomic int next;
} attn_job;

/* Cache row of position p of sequence s (block table lookup). */
static inline size_t kv_row(const tsr_batch *b, int32_t s, int32_t p)
{
    return (size_t)b->block_tables[s][p / TSR_KV_BLOCK_SIZE] * TSR_KV_BLOCK_SIZE +
           (size_t)(p % TSR_KV_BLOCK_SIZE);
}

/* Split each token's local query heads into the pieces attn_run hands out. Runs of up to
 * ATTN_RUN_KV whole KV groups, the longest that still make two pieces per thread (many
 * tokens: a batch of sequences, a prompt; or one token of a model with many KV heads, 1B
 * decode: 4 runs of 2): tsr_attn_heads reads a sequence's K/V rows across those heads chunk
 * by chunk (adjacent 128-byte slices of each row together) and, with one query head per KV
 * head, interleaves their fp16 accumulator chains. In decode the rows come from memory (the
 * weights' stream evicted them): 1B Q4_0, 2 threads, runs of 2 instead of single GQA groups
 * took the layers' attention from 1.06 to 0.92 ms a token at 128-288 positions and from 3.35
 * to 2.94 at 512-632 (the step 1% shorter there; in-process step alternation, p25). Otherwise runs
 * of heads that read the same KV head (a GQA group; tsr_attn_group reads each K/V row once for all
 * of them and interleaves their chains), cut into equal parts only when the batch has fewer than
 * two groups per thread (decode of a model with few KV heads). Each head's result is the same
 * whichever piece computes it (kernels/kvcache.h). */
static void attn_pieces(tsr_ctx *c, int n_tokens)
{
    const tsr_hparams *hp = &c->m->hp;
    const tsr_shard *sh = &c->m->shard;
    const int group = hp->n_head / hp->n_head_kv;
    const int n_head_local = sh->head_end - sh->head_begin;
    const int n_kv_local = sh->kv_head_end - sh->kv_head_begin;
    const int nth = tsr_pool_n_threads(c->pool);
    /* at least two pieces per thread, so that the atomic hand-out can balance them */
    int run = n_kv_local < ATTN_RUN_KV ? n_kv_local : ATTN_RUN_KV;
    while (run > 1 && (int64_t)n_tokens * ((n_kv_local + run - 1) / run) < 2 * nth) run--;
    if (run > 1 && sh->head_begin % group == 0 && n_head_local == n_kv_local * group) {
        c->n_attn_pieces = 0;
        for (int kl = 0; kl < n_kv_local; kl += run) {
            c->attn_piece[c->n_attn_pieces][0] = kl * group;
            c->attn_piece[c->n_attn_pieces][1] =
                (n_kv_local - kl < run ? n_kv_local - kl : run) * group;
            c->n_attn_pieces++;
        }
        return;
    }
    const int64_t n_groups = (int64_t)n_tokens * n_kv_local;
    int split = 1;
    if (n_groups < 2 * nth) split = (int)((2 * nth + n_groups - 1) / n_groups);
    int sub = (group + split - 1) / split;
    if (sub < 1) sub = 1;
    c->n_attn_pieces = 0;
    for (int hl = 0; hl < n_head_local;) {
        const int kvh = (sh->head_begin + hl) / group;
        int n = 0;
        while (hl + n < n_head_local && (sh->head_begin + hl + n) / group == kvh && n < sub) n++;
        c->attn_piece[c->n_attn_pieces][0] = hl;
        c->attn_piece[c->n_attn_pieces][1] = n;
        c->n_attn_pieces++;
        hl += n;
    }
}

/* One (token, piece of local heads sharing a KV head) per work item: scores over positions
 * 0..pos of the token's sequence, softmax, weighted sum of V, in the numerics of the cache's
 * type (kernels/kvcache.h). */
static void attn_run(void *arg, int ith, int nth)
{
    attn_job *j = arg;
    tsr_ctx *c = j->c;
    const tsr_batch *b = c->b;
    const tsr_hparams *hp = &c->m->hp;
    const tsr_shard *sh = &c->m->shard;
    const int hd = hp->head_dim;
    const int group = hp->n_head / hp->n_head_kv;
    const int n_head_local = sh->head_end - sh->head_begin;
    /* gemma3 scales Q before the product (llama.cpp: ggml_scale on Qcur, kq_scale 1). */
    const float scale = hp->arch == TSR_ARCH_GEMMA3 ? 1.0f : hp->attn_scale;
    const bool swa = tsr_hparams_layer_swa(hp, sh->layer_begin + j->layer);
    const size_t layer_bytes = (size_t)c->max_pos * c->kv_row_bytes;
    float *att = c->att_scores + (size_t)ith * group * c->max_pos;
    void *scratch = c->attn_scratch + (size_t)ith * c->attn_scratch_bytes;
    const int n_items = b->n_tokens * c->n_attn_pieces;
    (void)nth;
    for (;;) {
        int it = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (it >= n_items) break;
        const int t = it / c->n_attn_pieces;
        const int32_t *piece = c->attn_piece[it % c->n_attn_pieces];
        const int hl = piece[0];
        int kvh = (sh->head_begin + hl) / group - sh->kv_head_begin;
        int32_t pos = b->pos[t], s = b->seq[t];
        /* Positions p0..pos: all earlier ones, or the last n_swa on windowed layers. */
        const int32_t p0 = swa && pos - hp->n_swa + 1 > 0 ? pos - hp->n_swa + 1 : 0;
        const tsr_kv_view kv = {
            .type = c->kv_type,
            .head_dim = hd,
            .block_size = TSR_KV_BLOCK_SIZE,
            .k = c->k_cache + (size_t)j->layer * layer_bytes,
            .v = c->v_cache + (size_t)j->layer * layer_bytes,
            .row_bytes = c->kv_row_bytes,
            .head_offset = tsr_kv_row_bytes(c->kv_type, (int64_t)kvh * hd),
            .block_table = b->block_tables[s],
        };
        const size_t at = ((size_t)t * n_head_local + hl) * hd;
        if (piece[1] > group) /* whole KV groups (attn_pieces) */
            tsr_attn_heads(&kv, piece[1] / group, group, c->q + at, scale, p0, pos, att, scratch,
                           c->att_out + at);
        else
            tsr_attn_group(&kv, piece[1], c->q + at, scale, p0, pos, att, scratch, c->att_out + at);
    }
}

/* x[t][i] += bias[i] for n_tok rows of n values. */
static void add_bias(float *x, const float *bias, int n_tok, int n)
{
    for (int t = 0; t < n_tok; t++)
        for (int i = 0; i < n; i++) x[(size_t)t * n + i] += bias[i];
}

/* Sum partial results over the tensor-parallel group (no-op without one). */
static int tp_allreduce(tsr_ctx *c, float *buf, size_t n, char *err, size_t err_len)
{
    if (!c->tp || c->tp->size <= 1) return 0;
    return tsr_comm_allreduce_sum_f32(c->tp, buf, n, err, err_len);
}

static int check_batch(const tsr_ctx *c, const tsr_batch *b, char *err, size_t err_len)
{
    const tsr_hparams *hp = &c->m->hp;
    if (b->n_tokens < 1 || b->n_tokens > c->n_batch) {
        tsr_set_err(err, err_len, "a batch holds 1..%d tokens, got %d", c->n_batch, b->n_tokens);
        return -1;
    }
    for (int32_t i = 0; i < b->n_tokens; i++) {
        if (c->m->first_stage && (b->tokens[i] < 0 || b->tokens[i] >= hp->n_vocab)) {
            tsr_set_err(err, err_len, "token id %d at index %d is out of range (vocabulary has %d)",
                        b->tokens[i], i, hp->n_vocab);
            return -1;
        }
        int32_t s = b->seq[i];
        if (s < 0 || s >= b->n_seqs) {
            tsr_set_err(err, err_len, "token %d names sequence %d of %d", i, s, b->n_seqs);
            return -1;
        }
        int32_t p = b->pos[i];
        if (p < 0 || p / TSR_KV_BLOCK_SIZE >= b->n_blocks[s] || p >= c->max_pos) {
            tsr_set_err(err, err_len,
                        "position %d of sequence %d is beyond its %d KV blocks (context full: the "
                        "prompt plus generated tokens must fit the context)",
                        p, s, b->n_blocks[s]);
            return -1;
        }
        for (int32_t k = 0; k <= p / TSR_KV_BLOCK_SIZE; k++) {
            int32_t blk = b->block_tables[s][k];
            if (blk < 0 || blk >= c->n_kv_blocks) {
                tsr_set_err(err, err_len, "sequence %d uses KV block %d of a pool of %d", s, blk,
                            c->n_kv_blocks);
                return -1;
            }
        }
    }
    return 0;
}

/* ---- per-token work on the pool ----
 * The steps between the matmuls (norms, biases, RoPE, the K/V store, residual adds, SwiGLU)
 * act on each token's rows alone, so a batch of many tokens (many sequences decoding, a
 * prompt) splits them by token over the threads instead of leaving all but one waiting:
 * every row gets the very operations it gets serially. One token runs inline. */
typedef struct {
    tsr_ctx *c;
    const tsr_batch *b;
    const tsr_layer *L;
    float *x;
    int layer, n, stage;    /* stage: TOK_* */
    const float *rope_cs;   /* c->rope_cs[] of this layer's rope setting */
    const float *next_norm; /* TOK_OUT: the next layer's attn_norm, applied to x into xb */
} tok_job;

/* TOK_QKV_STORE: both, in one pool run (tensor dumps off); TOK_IN: the first attn_norm */
enum {
    TOK_QKV = 0,
    TOK_STORE = 1,
    TOK_FFN_IN = 2,
    TOK_ACT = 3,
    TOK_OUT = 4,
    TOK_QKV_STORE = 5,
    TOK_IN = 6
};

static void tok_rows(const tok_job *j, int t0, int t1)
{
    tsr_ctx *c = j->c;
    const tsr_model *m = c->m;
    const tsr_hparams *hp = &m->hp;
    const tsr_shard *sh = &m->shard;
    const tsr_layer *L = j->L;
    const int E = hp->n_embd, hd = hp->head_dim, nt = t1 - t0;
    const int n_head_local = sh->head_end - sh->head_begin;
    const int n_kv_local = sh->kv_head_end - sh->kv_head_begin;
    const size_t qd = (size_t)n_head_local * hd, kd = (size_t)c->kv_dim;
    const int64_t n_ff = sh->ff_end - sh->ff_begin;
    float *q = c->q + (size_t)t0 * qd, *k = c->k + (size_t)t0 * kd, *v = c->v + (size_t)t0 * kd;
    switch (j->stage) {
    case TOK_IN: /* the first layer's attention norm */
        tsr_rmsnorm(c->xb + (size_t)t0 * E, j->x + (size_t)t0 * E, L->attn_norm, nt, E,
                    hp->rms_eps);
        break;
    case TOK_QKV_STORE:
    case TOK_QKV: /* biases, Q/K norms, RoPE */
        if (L->bq) add_bias(q, L->bq, nt, (int)qd);
        if (L->bk) add_bias(k, L->bk, nt, (int)kd);
        if (L->bv) add_bias(v, L->bv, nt, (int)kd);
        if (L->q_norm) { /* per head: [n * heads] rows of head_dim */
            tsr_rmsnorm(q, q, L->q_norm, nt * n_head_local, hd, hp->rms_eps);
            tsr_rmsnorm(k, k, L->k_norm, nt * n_kv_local, hd, hp->rms_eps);
        }
        /* ggml's angles (a running product of base^(-2/n_rot), as ggml_rope_cache_init) for
         * both pairings: NEOX (i, i + n_rot/2) and NORM (2i, 2i+1), from the table made at
         * the start of the forward pass (tsr_rope_ext's values, kernels/rope.h). */
        tsr_rope_apply(q, j->rope_cs + (size_t)t0 * hp->n_rot, nt, n_head_local, hd, hp->n_rot,
                       hp->rope_neox ? 1 : 0);
        tsr_rope_apply(k, j->rope_cs + (size_t)t0 * hp->n_rot, nt, n_kv_local, hd, hp->n_rot,
                       hp->rope_neox ? 1 : 0);
        if (j->stage == TOK_QKV) break;
        __attribute__((fallthrough)); /* TOK_QKV_STORE: the store too */
    case TOK_STORE: { /* gemma's Q scale; this batch's K and V rows in the cache's type */
        if (hp->arch == TSR_ARCH_GEMMA3)
            for (size_t i = 0; i < (size_t)nt * qd; i++) q[i] *= hp->attn_scale;
        uint8_t *kc = c->k_cache + (size_t)j->layer * c->max_pos * c->kv_row_bytes;
        uint8_t *vc = c->v_cache + (size_t)j->layer * c->max_pos * c->kv_row_bytes;
        for (int t = t0; t < t1; t++) {
            size_t row = kv_row(j->b, j->b->seq[t], j->b->pos[t]);
            tsr_kv_store(c->kv_type, c->k + (size_t)t * kd, kc + row * c->kv_row_bytes,
                         (int64_t)kd);
            tsr_kv_store(c->kv_type, c->v + (size_t)t * kd, vc + row * c->kv_row_bytes,
                         (int64_t)kd);
        }
        break;
    }
    case TOK_FFN_IN: { /* post-attention norm, residual, FFN norm */
        float *x = j->x + (size_t)t0 * E, *a = c->xb2 + (size_t)t0 * E;
        if (L->post_attn_norm) tsr_rmsnorm(a, a, L->post_attn_norm, nt, E, hp->rms_eps);
        for (size_t i = 0; i < (size_t)nt * E; i++) x[i] += a[i];
        tsr_rmsnorm(c->xb + (size_t)t0 * E, x, L->ffn_norm, nt, E, hp->rms_eps);
        break;
    }
    case TOK_ACT: /* per row: ggml's vector / scalar split is per row */
        for (int t = t0; t < t1; t++)
            tsr_swiglu(c->hb + (size_t)t * n_ff, c->hb2 + (size_t)t * n_ff, n_ff);
        break;
    case TOK_OUT: { /* post-FFN norm, residual */
        float *x = j->x + (size_t)t0 * E, *a = c->xb2 + (size_t)t0 * E;
        if (L->post_ffn_norm) tsr_rmsnorm(a, a, L->post_ffn_norm, nt, E, hp->rms_eps);
        for (size_t i = 0; i < (size_t)nt * E; i++) x[i] += a[i];
        if (j->next_norm) /* the next layer's attention norm, while the rows are in cache */
            tsr_rmsnorm(c->xb + (size_t)t0 * E, x, j->next_norm, nt, E, hp->rms_eps);
        break;
    }
    }
}

static void tok_run(void *arg, int ith, int nth)
{
    const tok_job *j = arg;
    const int t0 = (int)((int64_t)j->n * ith / nth), t1 = (int)((int64_t)j->n * (ith + 1) / nth);
    if (t1 > t0) tok_rows(j, t0, t1);
}

static void per_token(tsr_ctx *c, tok_job *j, int stage)
{
    j->stage = stage;
    if (j->n < 2 || tsr_pool_n_threads(c->pool) < 2)
        tok_rows(j, 0, j->n);
    else
        tsr_pool_run(c->pool, tok_run, j);
}

int tsr_forward_batch(tsr_ctx *c, const tsr_batch *b, float *x, float *logits, char *err,
                      size_t err_len)
{
    const tsr_model *m = c->m;
    const tsr_hparams *hp = &m->hp;
    const tsr_shard *sh = &m->shard;
    const int E = hp->n_embd;
    const int hd = hp->head_dim;
    int n = b->n_tokens; /* rows in flight: all tokens, then after the last layer's cut the
                            tokens that want logits */
    const uint8_t *ord = b->order;
    bool cut = false;
    const int n_head_local = sh->head_end - sh->head_begin;
    const int64_t n_ff = sh->ff_end - sh->ff_begin;
    if (check_batch(c, b, err, err_len) != 0) return -1;
    if (c->be) return c->be->forward_batch(c->be_state, b, x, logits, err, err_len);
    c->b = b;
    tsr_tdump_begin_call();

    if (m->first_stage) {
        for (int t = 0; t < n; t++) {
            const uint8_t *row =
                (const uint8_t *)m->tok_embd.data + (size_t)b->tokens[t] * m->tok_embd.row_bytes;
            tsr_dequant_row(m->tok_embd.type, row, x + (size_t)t * E, E);
            if (hp->embd_scale != 1.0f)
                for (int i = 0; i < E; i++) x[(size_t)t * E + i] *= hp->embd_scale;
        }
    }

    attn_pieces(c, n);
    /* RoPE tables of this batch's positions: global layers', and sliding-window layers' when
     * their base or scale differ (gemma3) */
    const bool rope_swa_own = hp->rope_freq_base_swa != hp->rope_freq_base ||
                              hp->rope_freq_scale_swa != hp->rope_freq_scale;
    {
        bool need[2] = {false, false};
        for (int l = 0; l < m->n_layer_local; l++)
            need[rope_swa_own && tsr_hparams_layer_swa(hp, sh->layer_begin + l)] = true;
        if (need[0])
            tsr_rope_table(c->rope_cs[0], b->pos, n, hp->n_rot, hp->rope_freq_base,
                           hp->rope_freq_scale, m->freq_factors);
        if (need[1])
            tsr_rope_table(c->rope_cs[1], b->pos, n, hp->n_rot, hp->rope_freq_base_swa,
                           hp->rope_freq_scale_swa, m->freq_factors);
    }
    /* the first layer's attention norm (the others' run in the previous layer's TOK_OUT) */
    if (m->n_layer_local > 0) {
        TSR_TDUMP("inp", sh->layer_begin, x, (size_t)n * E);
        tok_job tj0 = {.c = c, .b = b, .L = &m->layers[0], .x = x, .layer = 0, .n = n};
        per_token(c, &tj0, TOK_IN);
    }
    for (int l = 0; l < m->n_layer_local; l++) {
        const tsr_layer *L = &m->layers[l];
        const int il = sh->layer_begin + l;
        if (l > 0) TSR_TDUMP("inp", il, x, (size_t)n * E);
        TSR_TDUMP("attn_norm", il, c->xb, (size_t)n * E);
        {
            const tsr_weight *ws[3] = {&L->wq, &L->wk, &L->wv};
            float *ys[3] = {c->q, c->k, c->v};
            tsr_matmul_multi_ord(c->pool, ws, ys, 3, c->xb, n, ord, c->scratch);
        }
        const int q_dim_local = n_head_local * hd;
        TSR_TDUMP("q_mm", il, c->q, (size_t)n * q_dim_local);
        TSR_TDUMP("k_mm", il, c->k, (size_t)n * c->kv_dim);
        TSR_TDUMP("v_mm", il, c->v, (size_t)n * c->kv_dim);
        const bool swa = tsr_hparams_layer_swa(hp, sh->layer_begin + l);
        tok_job tj = {.c = c,
                      .b = b,
                      .L = L,
                      .x = x,
                      .layer = l,
                      .n = n,
                      .rope_cs = c->rope_cs[rope_swa_own && swa]};
        if (tsr_tdump_active) {
            per_token(c, &tj, TOK_QKV);
            TSR_TDUMP("Qcur", il, c->q, (size_t)n * q_dim_local);
            TSR_TDUMP("Kcur", il, c->k, (size_t)n * c->kv_dim);
            TSR_TDUMP("Vcur", il, c->v, (size_t)n * c->kv_dim);
            per_token(c, &tj, TOK_STORE);
        } else {
            per_token(c, &tj, TOK_QKV_STORE);
        }

        attn_job aj = {.c = c, .layer = l};
        atomic_store(&aj.next, 0);
        tsr_pool_run(c->pool, attn_run, &aj);

        TSR_TDUMP("kqv_out", il, c->att_out, (size_t)n * q_dim_local);
        {
            const tsr_weight *ws[1] = {&L->wo};
            float *ys[1] = {c->xb2};
            tsr_matmul_multi_ord(c->pool, ws, ys, 1, c->att_out, n, ord, c->scratch);
        }
        TSR_TDUMP("attn_out", il, c->xb2, (size_t)n * E);
        if (tp_allreduce(c, c->xb2, (size_t)n * E, err, err_len) != 0) goto fail;
        if (L->bo) add_bias(c->xb2, L->bo, n, E);
        if (il == hp->n_layer - 1 && m->last_stage) {
            /* The last layer's cut (llama.cpp's inp_out_ids, after the attention output):
             * only the tokens that want logits go on, in the GEMV order. Nothing else reads
             * the other rows: their K/V of this layer are stored already. */
            int n_keep = 0;
            for (int t = 0; t < n; t++) {
                if (!b->want_logits[t]) continue;
                if (t != n_keep) {
                    memmove(x + (size_t)n_keep * E, x + (size_t)t * E, sizeof(float) * E);
                    memmove(c->xb2 + (size_t)n_keep * E, c->xb2 + (size_t)t * E, sizeof(float) * E);
                }
                n_keep++;
            }
            n = n_keep;
            ord = NULL;
            cut = true;
            if (n == 0) break;
        }
        tj.n = n; /* after the cut: the tokens that want logits */
        per_token(c, &tj, TOK_FFN_IN);
        TSR_TDUMP("ffn_inp", il, x, (size_t)n * E);
        TSR_TDUMP("ffn_norm", il, c->xb, (size_t)n * E);
        {
            const tsr_weight *ws[2] = {&L->w_gate, &L->w_up};
            float *ys[2] = {c->hb, c->hb2};
            tsr_matmul_multi_ord(c->pool, ws, ys, 2, c->xb, n, ord, c->scratch);
        }
        TSR_TDUMP("ffn_gate", il, c->hb, (size_t)n * n_ff);
        TSR_TDUMP("ffn_up", il, c->hb2, (size_t)n * n_ff);
        if (hp->ffn_gelu)
            tsr_geglu(c->hb, c->hb2, (int64_t)n * n_ff);
        else
            per_token(c, &tj, TOK_ACT);
        TSR_TDUMP("ffn_act", il, c->hb, (size_t)n * n_ff);
        {
            const tsr_weight *ws[1] = {&L->w_down};
            float *ys[1] = {c->xb2};
            tsr_matmul_multi_ord(c->pool, ws, ys, 1, c->hb, n, ord, c->scratch);
        }
        TSR_TDUMP("ffn_out", il, c->xb2, (size_t)n * E);
        if (tp_allreduce(c, c->xb2, (size_t)n * E, err, err_len) != 0) goto fail;
        tj.next_norm = l + 1 < m->n_layer_local ? m->layers[l + 1].attn_norm : NULL;
        per_token(c, &tj, TOK_OUT);
        TSR_TDUMP("l_out", il, x, (size_t)n * E);
    }

    if (m->last_stage && logits) {
        int n_want = 0;
        for (int t = 0; t < n; t++) { /* after the cut every row wants logits */
            if (!cut && !b->want_logits[t]) continue;
            tsr_rmsnorm(c->head_in + (size_t)n_want * E, x + (size_t)t * E, m->output_norm, 1, E,
                        hp->rms_eps);
            n_want++;
        }
        TSR_TDUMP("result_norm", -1, c->head_in, (size_t)n_want * E);
        if (n_want > 0) tsr_matmul(c->pool, &m->output, c->head_in, n_want, logits, c->scratch);
        TSR_TDUMP("result_output", -1, logits, (size_t)n_want * m->output.n_out);
        if (n_want > 0 && hp->final_logit_softcap > 0.0f) {
            const float cap = hp->final_logit_softcap;
            const size_t n_l = (size_t)n_want * (size_t)m->output.n_out;
            for (size_t i = 0; i < n_l; i++) logits[i] = cap * tanhf(logits[i] / cap);
        }
    }
    c->b = NULL;
    return 0;
fail:
    c->b = NULL;
    return -1;
}

int tsr_forward(tsr_ctx *c, const int32_t *tokens, int32_t n, int32_t pos0, bool all_logits,
                const float **logits, char *err, size_t err_len)
{
    const tsr_model *m = c->m;
    if (!m->first_stage || !m->last_stage || !c->ident_table) {
        tsr_set_err(err, err_len, "tsr_forward needs the whole model in a single-sequence context");
        return -1;
    }
    if (n <= 0) {
        tsr_set_err(err, err_len, "forward needs at least one token");
        return -1;
    }
    if (pos0 < 0 || n > c->n_ctx - pos0) {
        tsr_set_err(err, err_len,
                    "positions %d..%d exceed the context size %d (the prompt plus generated "
                    "tokens must fit; use a larger context or a shorter prompt)",
                    pos0, pos0 + n - 1, c->n_ctx);
        return -1;
    }
    if (all_logits && n > c->n_batch) {
        tsr_set_err(err, err_len, "all_logits needs n (%d) <= n_batch (%d)", n, c->n_batch);
        return -1;
    }
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)c->n_batch);
    int32_t *seq = calloc((size_t)c->n_batch, sizeof(int32_t));
    uint8_t *want = calloc((size_t)c->n_batch, 1);
    uint8_t *ord = calloc((size_t)c->n_batch, 1);
    if (!pos || !seq || !want || !ord) {
        free(pos);
        free(seq);
        free(want);
        free(ord);
        tsr_set_err(err, err_len, "out of memory");
        return -1;
    }
    const int32_t *tables[1] = {c->ident_table};
    int32_t n_blocks = c->n_kv_blocks;
    int rc = 0;
    for (int32_t done = 0; done < n && rc == 0;) {
        int32_t k = n - done < c->n_batch ? n - done : c->n_batch;
        for (int32_t i = 0; i < k; i++) {
            pos[i] = pos0 + done + i;
            want[i] = all_logits || done + i == n - 1;
            ord[i] = tsr_order_class(pos[i], c->prompt_len);
        }
        tsr_batch b = {.n_tokens = k,
                       .tokens = tokens + done,
                       .pos = pos,
                       .seq = seq,
                       .want_logits = want,
                       .n_seqs = 1,
                       .block_tables = tables,
                       .n_blocks = &n_blocks,
                       .order = ord};
        rc = tsr_forward_batch(c, &b, c->x, c->logits, err, err_len);
        done += k;
    }
    free(pos);
    free(seq);
    free(want);
    free(ord);
    *logits = c->logits;
    return rc;
}

int tsr_ctx_kv_copy(tsr_ctx *c, const int32_t *src, const int32_t *dst, int32_t n, char *err,
                    size_t err_len)
{
    for (int32_t i = 0; i < n; i++) {
        if (src[i] < 0 || src[i] >= c->n_kv_blocks || dst[i] < 0 || dst[i] >= c->n_kv_blocks) {
            tsr_set_err(err, err_len, "KV block copy %d -> %d is outside the pool of %d blocks",
                        src[i], dst[i], c->n_kv_blocks);
            return -1;
        }
    }
    if (c->be) {
        if (!c->be->kv_copy) {
            tsr_set_err(err, err_len, "the %s backend cannot copy KV blocks", c->be->name);
            return -1;
        }
        return n > 0 ? c->be->kv_copy(c->be_state, src, dst, n, err, err_len) : 0;
    }
    /* A block's positions are consecutive slots: TSR_KV_BLOCK_SIZE rows of one layer. */
    const size_t block_bytes = (size_t)TSR_KV_BLOCK_SIZE * c->kv_row_bytes;
    const size_t layer_bytes = (size_t)c->max_pos * c->kv_row_bytes;
    for (int32_t l = 0; l < c->m->n_layer_local; l++) {
        for (int32_t i = 0; i < n; i++) {
            const size_t so = (size_t)l * layer_bytes + (size_t)src[i] * block_bytes;
            const size_t d0 = (size_t)l * layer_bytes + (size_t)dst[i] * block_bytes;
            memcpy(c->k_cache + d0, c->k_cache + so, block_bytes);
            memcpy(c->v_cache + d0, c->v_cache + so, block_bytes);
        }
    }
    return 0;
}
