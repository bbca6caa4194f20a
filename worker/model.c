/*
 * model.c — llama model loading and the single-sequence forward pass (see model.h).
 *
 * The hot loop is the matmul (kernels/ops.c + kernels/quant.c); everything here is
 * bookkeeping around it, kept in the order llama.cpp's llm_build_llama runs so that
 * numerical differences stay at float rounding level.
 */
#include "worker/model.h"

#include "kernels/quant.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void set_err(char *err, size_t err_len, const char *fmt, ...)
{
    if (!err || !err_len) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
}

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
            set_err(err, err_len, "missing required metadata key '%s'", key);
            return -1;
        }
        *out = (int32_t)def;
        return 0;
    }
    if (!tsr_gguf_kv_int(g, i, &v)) {
        set_err(err, err_len, "metadata key '%s' must be an integer, found %s", key,
                tsr_gguf_vtype_name(tsr_gguf_kv_type(g, i)));
        return -1;
    }
    if (v < 1 || v > max) {
        set_err(err, err_len, "metadata key '%s' = %" PRId64 " is out of range (1..%" PRId64 ")",
                key, v, max);
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
        set_err(err, err_len, "metadata key '%s' must be a finite float", key);
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
        set_err(err, err_len, "missing tensor '%s'", name);
        return -1;
    }
    int64_t rest = 1;
    for (uint32_t d = 2; d < TSR_GGUF_MAX_DIMS; d++) rest *= t->ne[d];
    if (t->ne[0] != n_in || t->ne[1] != n_out || rest != 1) {
        set_err(err, err_len,
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
    m->n_bytes_weights += t->n_bytes;
    return 0;
}

/* A 1-D vector of n values of any type, copied to float. */
static int bind_vec(tsr_model *m, const char *name, int64_t n, float **out, char *err,
                    size_t err_len)
{
    const tsr_gguf_tensor *t = tsr_gguf_find_tensor(m->gguf, name);
    if (!t) {
        set_err(err, err_len, "missing tensor '%s'", name);
        return -1;
    }
    if (t->ne[0] != n || t->ne[1] * t->ne[2] * t->ne[3] != 1) {
        set_err(err, err_len, "tensor '%s' has %" PRId64 " values, expected %" PRId64, name,
                t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3], n);
        return -1;
    }
    *out = malloc((size_t)n * sizeof(float));
    if (!*out) {
        set_err(err, err_len, "out of memory");
        return -1;
    }
    tsr_dequant_row(t->type, t->data, *out, n);
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
        if (wavelen < high_wavelen) f = 1.0f;
        else if (wavelen > low_wavelen) f = factor;
        else {
            float smooth = (orig_ctx / wavelen - low_ff) / (high_ff - low_ff);
            f = 1.0f / ((1.0f - smooth) / factor + smooth);
        }
        ff[i / 2] = f;
    }
}

int tsr_model_load(const tsr_gguf *g, tsr_model **out, char *err, size_t err_len)
{
    *out = NULL;
    tsr_model *m = calloc(1, sizeof *m);
    if (!m) {
        set_err(err, err_len, "out of memory");
        return -1;
    }
    m->gguf = g;
    tsr_hparams *hp = &m->hp;
    char arch[64];
    char name[160];
    tsr_gguf_str s;

    if (!tsr_gguf_get_str(g, "general.architecture", &s)) {
        set_err(err, err_len, "missing metadata key 'general.architecture' (string)");
        goto fail;
    }
    if (s.len != 5 || memcmp(s.ptr, "llama", 5) != 0) {
        set_err(err, err_len,
                "unsupported architecture '%.*s': Tessera runs 'llama' models (Llama, "
                "TinyLlama, Mistral-style GQA)",
                (int)(s.len > 40 ? 40 : s.len), s.ptr);
        goto fail;
    }
    snprintf(arch, sizeof arch, "llama");

    if (get_hp_int(g, arch, "block_count", -1, 4096, &hp->n_layer, err, err_len) ||
        get_hp_int(g, arch, "embedding_length", -1, 1 << 20, &hp->n_embd, err, err_len) ||
        get_hp_int(g, arch, "attention.head_count", -1, 4096, &hp->n_head, err, err_len) ||
        get_hp_int(g, arch, "attention.head_count_kv", hp->n_head, 4096, &hp->n_head_kv, err,
                   err_len) ||
        get_hp_int(g, arch, "feed_forward_length", -1, 1 << 22, &hp->n_ff, err, err_len) ||
        get_hp_int(g, arch, "context_length", 2048, 1 << 24, &hp->n_ctx_train, err, err_len))
        goto fail;
    if (hp->n_embd % hp->n_head != 0) {
        set_err(err, err_len, "embedding_length %d is not divisible by head_count %d",
                hp->n_embd, hp->n_head);
        goto fail;
    }
    if (hp->n_head % hp->n_head_kv != 0) {
        set_err(err, err_len, "head_count %d is not a multiple of head_count_kv %d",
                hp->n_head, hp->n_head_kv);
        goto fail;
    }
    if (get_hp_int(g, arch, "attention.key_length", hp->n_embd / hp->n_head, 1 << 16,
                   &hp->head_dim, err, err_len) ||
        get_hp_int(g, arch, "rope.dimension_count", hp->head_dim, hp->head_dim, &hp->n_rot, err,
                   err_len))
        goto fail;
    if (hp->n_rot % 2 != 0) {
        set_err(err, err_len, "rope.dimension_count %d must be even", hp->n_rot);
        goto fail;
    }
    if (get_hp_float(g, arch, "attention.layer_norm_rms_epsilon", 1e-5, &hp->rms_eps, err,
                     err_len) ||
        get_hp_float(g, arch, "rope.freq_base", 10000.0, &hp->rope_freq_base, err, err_len))
        goto fail;
    hp->rope_freq_scale = 1.0f;
    {
        float factor = 1.0f;
        tsr_gguf_str st = {0};
        snprintf(name, sizeof name, "%s.rope.scaling.type", arch);
        bool has_type = tsr_gguf_get_str(g, name, &st);
        if (get_hp_float(g, arch, "rope.scaling.factor", 1.0, &factor, err, err_len)) goto fail;
        if (!(factor > 0.0f)) {
            set_err(err, err_len, "%s.rope.scaling.factor must be > 0", arch);
            goto fail;
        }
        if (has_type && st.len == 6 && memcmp(st.ptr, "linear", 6) == 0)
            hp->rope_freq_scale = 1.0f / factor;
        /* llama3: the converter usually stores the factors as rope_freqs.weight; compute
         * them from the keys when only the keys are present. */
        const tsr_gguf_tensor *rf = tsr_gguf_find_tensor(g, "rope_freqs.weight");
        if (rf) {
            if (bind_vec(m, "rope_freqs.weight", hp->n_rot / 2, &m->freq_factors, err, err_len))
                goto fail;
            hp->rope_llama3 = true;
        } else if (has_type && st.len == 6 && memcmp(st.ptr, "llama3", 6) == 0) {
            float low = 1.0f, high = 4.0f;
            int32_t orig = 8192;
            if (get_hp_float(g, arch, "rope.scaling.low_freq_factor", 1.0, &low, err, err_len) ||
                get_hp_float(g, arch, "rope.scaling.high_freq_factor", 4.0, &high, err,
                             err_len) ||
                get_hp_int(g, arch, "rope.scaling.original_context_length", 8192, 1 << 24,
                           &orig, err, err_len))
                goto fail;
            m->freq_factors = malloc(sizeof(float) * (size_t)(hp->n_rot / 2));
            if (!m->freq_factors) goto oom;
            llama3_factors(m->freq_factors, hp->n_rot, hp->rope_freq_base, factor, low, high,
                           (float)orig);
            hp->rope_llama3 = true;
        }
    }

    /* Vocabulary size: the embedding's row count is the truth for the forward pass. */
    const tsr_gguf_tensor *te = tsr_gguf_find_tensor(g, "token_embd.weight");
    if (!te) {
        set_err(err, err_len, "missing tensor 'token_embd.weight' (is this a vocabulary-only "
                              "GGUF? 'tessera tokenize' works on those)");
        goto fail;
    }
    if (te->ne[1] < 1 || te->ne[1] > INT32_MAX) {
        set_err(err, err_len, "token_embd.weight has an invalid row count");
        goto fail;
    }
    hp->n_vocab = (int32_t)te->ne[1];

    const int64_t q_dim = (int64_t)hp->n_head * hp->head_dim;
    const int64_t kv_dim = (int64_t)hp->n_head_kv * hp->head_dim;
    if (bind(m, "token_embd.weight", hp->n_embd, hp->n_vocab, &m->tok_embd, false, err,
             err_len))
        goto fail;
    m->n_bytes_weights -= te->n_bytes; /* only n_tok rows are read per step */
    int rc = bind(m, "output.weight", hp->n_embd, hp->n_vocab, &m->output, true, err, err_len);
    if (rc < 0) goto fail;
    if (rc == 1) {
        m->output = m->tok_embd;
        m->tied = true;
        m->n_bytes_weights += te->n_bytes;
    }
    if (bind_vec(m, "output_norm.weight", hp->n_embd, &m->output_norm, err, err_len)) goto fail;

    m->layers = calloc((size_t)hp->n_layer, sizeof *m->layers);
    if (!m->layers) goto oom;
    for (int32_t l = 0; l < hp->n_layer; l++) {
        tsr_layer *L = &m->layers[l];
#define BIND(field, nm, nin, nout)                                                             \
    do {                                                                                       \
        snprintf(name, sizeof name, "blk.%d." nm ".weight", l);                                \
        if (bind(m, name, nin, nout, &L->field, false, err, err_len)) goto fail;               \
    } while (0)
        BIND(wq, "attn_q", hp->n_embd, q_dim);
        BIND(wk, "attn_k", hp->n_embd, kv_dim);
        BIND(wv, "attn_v", hp->n_embd, kv_dim);
        BIND(wo, "attn_output", q_dim, hp->n_embd);
        BIND(w_gate, "ffn_gate", hp->n_embd, hp->n_ff);
        BIND(w_up, "ffn_up", hp->n_embd, hp->n_ff);
        BIND(w_down, "ffn_down", hp->n_ff, hp->n_embd);
#undef BIND
        snprintf(name, sizeof name, "blk.%d.attn_norm.weight", l);
        if (bind_vec(m, name, hp->n_embd, &L->attn_norm, err, err_len)) goto fail;
        snprintf(name, sizeof name, "blk.%d.ffn_norm.weight", l);
        if (bind_vec(m, name, hp->n_embd, &L->ffn_norm, err, err_len)) goto fail;
    }
    *out = m;
    return 0;
oom:
    set_err(err, err_len, "out of memory");
fail:
    tsr_model_free(m);
    return -1;
}

void tsr_model_free(tsr_model *m)
{
    if (!m) return;
    if (m->layers) {
        for (int32_t l = 0; l < m->hp.n_layer; l++) {
            free(m->layers[l].attn_norm);
            free(m->layers[l].ffn_norm);
        }
    }
    free(m->layers);
    free(m->output_norm);
    free(m->freq_factors);
    free(m);
}

/* ---- context ---- */

struct tsr_ctx {
    const tsr_model *m;
    tsr_pool *pool;
    int32_t n_ctx, n_batch;
    /* KV cache: [n_layer][n_ctx][kv_dim] float32 each. */
    float *k_cache, *v_cache;
    /* Activations, [n_batch][width]. */
    float *x, *xb, *xb2, *q, *k, *v, *att_out, *hb, *hb2;
    float *att_scores; /* [n_threads][n_ctx] */
    float *logits;     /* [n_batch][n_vocab] */
    int32_t *pos;      /* [n_batch] */
    void *scratch;
    uint64_t t_forward_ns;
};

int32_t tsr_ctx_n_ctx(const tsr_ctx *c) { return c->n_ctx; }
uint64_t tsr_ctx_forward_ns(const tsr_ctx *c) { return c->t_forward_ns; }

int tsr_ctx_new(const tsr_model *m, int32_t n_ctx, int32_t n_batch, int n_threads,
                tsr_ctx **out, char *err, size_t err_len)
{
    *out = NULL;
    const tsr_hparams *hp = &m->hp;
    if (n_ctx <= 0) n_ctx = hp->n_ctx_train < 4096 ? hp->n_ctx_train : 4096;
    if (n_batch <= 0) n_batch = 128;
    if (n_batch > n_ctx) n_batch = n_ctx;
    if (n_threads < 1 || n_threads > 256) {
        set_err(err, err_len, "thread count %d is out of range (1..256)", n_threads);
        return -1;
    }
    tsr_ctx *c = calloc(1, sizeof *c);
    if (!c) goto oom;
    c->m = m;
    c->n_ctx = n_ctx;
    c->n_batch = n_batch;
    const size_t q_dim = (size_t)hp->n_head * hp->head_dim;
    const size_t kv_dim = (size_t)hp->n_head_kv * hp->head_dim;
    const size_t nb = (size_t)n_batch;
    size_t kv_elems = (size_t)hp->n_layer * (size_t)n_ctx * kv_dim;
    c->k_cache = calloc(kv_elems, sizeof(float));
    c->v_cache = calloc(kv_elems, sizeof(float));
    size_t wide = q_dim > (size_t)hp->n_embd ? q_dim : (size_t)hp->n_embd;
    c->x = malloc(nb * hp->n_embd * sizeof(float));
    c->xb = malloc(nb * wide * sizeof(float));
    c->xb2 = malloc(nb * hp->n_embd * sizeof(float));
    c->q = malloc(nb * q_dim * sizeof(float));
    c->k = malloc(nb * kv_dim * sizeof(float));
    c->v = malloc(nb * kv_dim * sizeof(float));
    c->att_out = malloc(nb * q_dim * sizeof(float));
    c->hb = malloc(nb * hp->n_ff * sizeof(float));
    c->hb2 = malloc(nb * hp->n_ff * sizeof(float));
    c->att_scores = malloc((size_t)n_threads * n_ctx * sizeof(float));
    c->logits = malloc(nb * hp->n_vocab * sizeof(float));
    c->pos = malloc(nb * sizeof(int32_t));
    /* Scratch for converted activations: the largest of all matmul inputs. */
    size_t scratch = 0;
    const tsr_layer *L0 = &m->layers[0];
    const tsr_weight *ws[] = {&L0->wq, &L0->wo, &L0->w_gate, &L0->w_down, &m->output};
    for (size_t i = 0; i < sizeof ws / sizeof ws[0]; i++) {
        for (int32_t l = 0; l < hp->n_layer && i < 4; l++) {
            const tsr_layer *L = &m->layers[l];
            const tsr_weight *lw[] = {&L->wq, &L->wk, &L->wv, &L->wo,
                                      &L->w_gate, &L->w_up, &L->w_down};
            for (size_t k = 0; k < 7; k++) {
                size_t s = tsr_matmul_scratch_bytes(lw[k], n_batch);
                if (s > scratch) scratch = s;
            }
        }
        size_t s = tsr_matmul_scratch_bytes(ws[i], n_batch);
        if (s > scratch) scratch = s;
    }
    c->scratch = malloc(scratch ? scratch : 1);
    c->pool = tsr_pool_new(n_threads);
    if (!c->k_cache || !c->v_cache || !c->x || !c->xb || !c->xb2 || !c->q || !c->k || !c->v ||
        !c->att_out || !c->hb || !c->hb2 || !c->att_scores || !c->logits || !c->pos ||
        !c->scratch || !c->pool)
        goto oom;
    *out = c;
    return 0;
oom:
    set_err(err, err_len, "out of memory creating a context of %d tokens", n_ctx);
    tsr_ctx_free(c);
    return -1;
}

void tsr_ctx_free(tsr_ctx *c)
{
    if (!c) return;
    if (c->pool) tsr_pool_free(c->pool);
    free(c->k_cache);
    free(c->v_cache);
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
    free(c->logits);
    free(c->pos);
    free(c->scratch);
    free(c);
}

/* ---- attention ---- */

typedef struct {
    tsr_ctx *c;
    int layer;
    int n_tok;
    _Atomic int next;
} attn_job;

/* One (token, head) pair per work item: scores over positions 0..pos, softmax, sum of V. */
static void attn_run(void *arg, int ith, int nth)
{
    attn_job *j = arg;
    tsr_ctx *c = j->c;
    const tsr_hparams *hp = &c->m->hp;
    const int hd = hp->head_dim;
    const int kv_dim = hp->n_head_kv * hd;
    const int group = hp->n_head / hp->n_head_kv;
    const float scale = 1.0f / sqrtf((float)hd);
    const float *kc = c->k_cache + (size_t)j->layer * c->n_ctx * kv_dim;
    const float *vc = c->v_cache + (size_t)j->layer * c->n_ctx * kv_dim;
    float *att = c->att_scores + (size_t)ith * c->n_ctx;
    const int n_items = j->n_tok * hp->n_head;
    for (;;) {
        int it = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (it >= n_items) break;
        int t = it / hp->n_head, h = it % hp->n_head;
        int kvh = h / group;
        int pos = c->pos[t];
        const float *q = c->q + ((size_t)t * hp->n_head + h) * hd;
        for (int p = 0; p <= pos; p++) {
            const float *k = kc + (size_t)p * kv_dim + (size_t)kvh * hd;
            float s = 0.0f;
            for (int i = 0; i < hd; i++) s += q[i] * k[i];
            att[p] = s * scale;
        }
        tsr_softmax(att, pos + 1);
        float *o = c->att_out + ((size_t)t * hp->n_head + h) * hd;
        memset(o, 0, sizeof(float) * (size_t)hd);
        for (int p = 0; p <= pos; p++) {
            const float *v = vc + (size_t)p * kv_dim + (size_t)kvh * hd;
            const float a = att[p];
            for (int i = 0; i < hd; i++) o[i] += a * v[i];
        }
    }
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* n <= n_batch tokens. */
static void forward_chunk(tsr_ctx *c, const int32_t *tokens, int n, int32_t pos0,
                          bool all_logits)
{
    const tsr_model *m = c->m;
    const tsr_hparams *hp = &m->hp;
    const int E = hp->n_embd;
    const int hd = hp->head_dim;
    const size_t q_dim = (size_t)hp->n_head * hd;
    const size_t kv_dim = (size_t)hp->n_head_kv * hd;

    for (int t = 0; t < n; t++) {
        c->pos[t] = pos0 + t;
        const uint8_t *row =
            (const uint8_t *)m->tok_embd.data + (size_t)tokens[t] * m->tok_embd.row_bytes;
        tsr_dequant_row(m->tok_embd.type, row, c->x + (size_t)t * E, E);
    }

    for (int l = 0; l < hp->n_layer; l++) {
        const tsr_layer *L = &m->layers[l];
        tsr_rmsnorm(c->xb, c->x, L->attn_norm, n, E, hp->rms_eps);
        if (tsr_type_vec_dot_type(L->wq.type) == tsr_type_vec_dot_type(L->wk.type) &&
            tsr_type_vec_dot_type(L->wq.type) == tsr_type_vec_dot_type(L->wv.type)) {
            const tsr_weight *ws[3] = {&L->wq, &L->wk, &L->wv};
            float *ys[3] = {c->q, c->k, c->v};
            tsr_matmul_multi(c->pool, ws, ys, 3, c->xb, n, c->scratch);
        } else {
            tsr_matmul(c->pool, &L->wq, c->xb, n, c->q, c->scratch);
            tsr_matmul(c->pool, &L->wk, c->xb, n, c->k, c->scratch);
            tsr_matmul(c->pool, &L->wv, c->xb, n, c->v, c->scratch);
        }
        tsr_rope(c->q, c->pos, n, hp->n_head, hd, hp->n_rot, hp->rope_freq_base,
                 hp->rope_freq_scale, m->freq_factors);
        tsr_rope(c->k, c->pos, n, hp->n_head_kv, hd, hp->n_rot, hp->rope_freq_base,
                 hp->rope_freq_scale, m->freq_factors);
        float *kc = c->k_cache + ((size_t)l * c->n_ctx + (size_t)pos0) * kv_dim;
        float *vc = c->v_cache + ((size_t)l * c->n_ctx + (size_t)pos0) * kv_dim;
        memcpy(kc, c->k, (size_t)n * kv_dim * sizeof(float));
        memcpy(vc, c->v, (size_t)n * kv_dim * sizeof(float));

        attn_job aj = {.c = c, .layer = l, .n_tok = n};
        atomic_store(&aj.next, 0);
        tsr_pool_run(c->pool, attn_run, &aj);

        tsr_matmul(c->pool, &L->wo, c->att_out, n, c->xb2, c->scratch);
        for (size_t i = 0; i < (size_t)n * E; i++) c->x[i] += c->xb2[i];
        (void)q_dim;

        tsr_rmsnorm(c->xb, c->x, L->ffn_norm, n, E, hp->rms_eps);
        if (tsr_type_vec_dot_type(L->w_gate.type) == tsr_type_vec_dot_type(L->w_up.type)) {
            const tsr_weight *ws[2] = {&L->w_gate, &L->w_up};
            float *ys[2] = {c->hb, c->hb2};
            tsr_matmul_multi(c->pool, ws, ys, 2, c->xb, n, c->scratch);
        } else {
            tsr_matmul(c->pool, &L->w_gate, c->xb, n, c->hb, c->scratch);
            tsr_matmul(c->pool, &L->w_up, c->xb, n, c->hb2, c->scratch);
        }
        tsr_swiglu(c->hb, c->hb2, (int64_t)n * hp->n_ff);
        tsr_matmul(c->pool, &L->w_down, c->hb, n, c->xb2, c->scratch);
        for (size_t i = 0; i < (size_t)n * E; i++) c->x[i] += c->xb2[i];
    }

    if (all_logits) {
        tsr_rmsnorm(c->xb, c->x, m->output_norm, n, E, hp->rms_eps);
        tsr_matmul(c->pool, &m->output, c->xb, n, c->logits, c->scratch);
    } else {
        tsr_rmsnorm(c->xb, c->x + (size_t)(n - 1) * E, m->output_norm, 1, E, hp->rms_eps);
        tsr_matmul(c->pool, &m->output, c->xb, 1, c->logits, c->scratch);
    }
}

int tsr_forward(tsr_ctx *c, const int32_t *tokens, int32_t n, int32_t pos0, bool all_logits,
                const float **logits, char *err, size_t err_len)
{
    const tsr_hparams *hp = &c->m->hp;
    if (n <= 0) {
        set_err(err, err_len, "forward needs at least one token");
        return -1;
    }
    if (pos0 < 0 || n > c->n_ctx - pos0) {
        set_err(err, err_len,
                "positions %d..%d exceed the context size %d (the prompt plus generated "
                "tokens must fit; use a larger context or a shorter prompt)",
                pos0, pos0 + n - 1, c->n_ctx);
        return -1;
    }
    if (all_logits && n > c->n_batch) {
        set_err(err, err_len, "all_logits needs n (%d) <= n_batch (%d)", n, c->n_batch);
        return -1;
    }
    for (int32_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= hp->n_vocab) {
            set_err(err, err_len, "token id %d at index %d is out of range (vocabulary has %d)",
                    tokens[i], i, hp->n_vocab);
            return -1;
        }
    }
    uint64_t t0 = now_ns();
    for (int32_t done = 0; done < n;) {
        int32_t k = n - done < c->n_batch ? n - done : c->n_batch;
        forward_chunk(c, tokens + done, k, pos0 + done, all_logits);
        done += k;
    }
    c->t_forward_ns += now_ns() - t0;
    *logits = c->logits;
    return 0;
}
