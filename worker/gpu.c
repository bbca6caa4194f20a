/*
 * gpu.c — a rank's model tiles on a CUDA device and the forward pass over them (gpu.h).
 *
 * The sequence of operations mirrors tsr_forward_batch in worker/model.c step by step, for
 * every architecture it runs (embedding [× scale], per layer: RMSNorm → Q/K/V [+ biases]
 * [→ per-head Q/K RMSNorm] → RoPE (NORM or NEOX, windowed layers' base) [→ Q × scale] → KV
 * store → paged attention [sliding window] → output projection → tp all-reduce [+ bias]
 * [→ post-attention RMSNorm] → residual → RMSNorm → gate/up → SwiGLU or GeGLU → down →
 * all-reduce [→ post-FFN RMSNorm] → residual; then the head for the rows that want logits
 * [soft-capped]), with the device kernels of
 * kernels/cuda/ (cuda_backend.h). Per step the host uploads one packed int32 descriptor
 * (tokens, positions, sequences, cache rows, logit rows, block tables) and downloads the
 * logits and the stage's hidden states.
 *
 * Compiled to stubs without TSR_HAVE_CUDA (the CPU build needs no CUDA at all).
 */
#include "worker/gpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/util.h"

#ifdef TSR_HAVE_CUDA

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/numerics.h" /* KV element types */

typedef struct {
    float *attn_norm, *ffn_norm;
    float *bq, *bk, *bv, *bo;              /* biases (qwen2) or NULL */
    float *q_norm, *k_norm;                /* per-head norms (qwen3, gemma3) or NULL */
    float *post_attn_norm, *post_ffn_norm; /* gemma3 or NULL */
    tsr_cuda_weight wq, wk, wv, wo, w_gate, w_up, w_down;
} gpu_layer;

struct tsr_gpu_model {
    const tsr_model *m;
    tsr_cuda_dev *dev;
    tsr_cuda_weight tok_embd, output;
    float *output_norm;
    float *freq_factors;
    gpu_layer *layers;
    /* every allocation, to free them: pointers and sizes */
    void **allocs;
    size_t *alloc_bytes;
    int32_t n_allocs, cap_allocs;
};

struct tsr_gpu_ctx {
    tsr_gpu_model *gm;
    tsr_comm *tp;
    int32_t n_kv_blocks, n_batch, kv_dim, q_dim, n_ff, n_vocab_local;
    uint32_t kv_type;         /* element type of the KV pool: 0 F32, 1 F16, 8 Q8_0 (numerics.h) */
    size_t kv_row_bytes;      /* bytes of one pool row (one position, all local KV heads) */
    float *k_cache, *v_cache; /* [n_layer_local][n_kv_blocks * 16] rows of kv_row_bytes */
    float *x, *xb, *xb2, *q, *k, *v, *att, *hb, *hb2, *head_in, *logits;
    void *bufs[16]; /* the buffers above and their sizes, to give back */
    size_t buf_bytes[16];
    int32_t n_bufs;
    int32_t *desc;      /* device: packed step descriptor */
    int32_t desc_cap;   /* int32s */
    int32_t *desc_host; /* host staging of the descriptor */
    float *host_buf;    /* host staging of tp all-reduces over a non-NCCL communicator */
    /* device-direct transport (tsr_gpu_ctx_set_pipe) */
    bool direct;
    tsr_comm *pipe;
    int prev_peer, next_peer, pipe_tag;
    int32_t want_done;  /* logits rows of this step so far (direct: they stay in logits) */
    float *logits_full; /* [rows][n_vocab]: interleaved (last stage) or received (leader) */
    size_t logits_full_floats;
    float *logits_parts; /* the tp slices received by tp rank 0 of the last stage */
    size_t logits_parts_floats;
};

static const tsr_backend k_gpu_backend;

bool tsr_gpu_built(void)
{
    return true;
}

int32_t tsr_gpu_device_count(char *why, size_t why_len)
{
    return tsr_cuda_device_count(why, why_len);
}

int32_t tsr_gpu_pick_device(char *why, size_t why_len)
{
    return tsr_cuda_pick_device(tsr_cuda_device_count(why, why_len));
}

static int track(tsr_gpu_model *gm, size_t n_bytes, const char *what, void **out, char *err,
                 size_t err_len)
{
    if (gm->n_allocs == gm->cap_allocs) {
        int32_t cap = gm->cap_allocs ? 2 * gm->cap_allocs : 64;
        void **a = realloc(gm->allocs, sizeof(void *) * (size_t)cap);
        if (!a) goto oom;
        gm->allocs = a;
        size_t *b = realloc(gm->alloc_bytes, sizeof(size_t) * (size_t)cap);
        if (!b) goto oom;
        gm->alloc_bytes = b;
        gm->cap_allocs = cap;
    }
    if (tsr_cuda_alloc(gm->dev, n_bytes, what, out, err, err_len) != 0) return -1;
    gm->allocs[gm->n_allocs] = *out;
    gm->alloc_bytes[gm->n_allocs++] = n_bytes;
    return 0;
oom:
    tsr_set_err(err, err_len, "out of host memory");
    return -1;
}

static int up_weight(tsr_gpu_model *gm, const tsr_weight *w, const char *what, tsr_cuda_weight *out,
                     char *err, size_t err_len)
{
    if (!tsr_cuda_type_supported(w->type)) {
        tsr_set_err(err, err_len, "%s: weight type %u is not supported by the CUDA backend", what,
                    w->type);
        return -1;
    }
    if (!w->data) { /* a column slice repacked for the CPU kernels (worker/model.h) */
        tsr_set_err(err, err_len,
                    "%s: the weights were repacked for the CPU and their file layout freed; a "
                    "GPU rank needs the model loaded without repacking (--no-repack)",
                    what);
        return -1;
    }
    const size_t n = w->row_bytes * (size_t)w->n_out;
    void *p;
    if (track(gm, n, what, &p, err, err_len) != 0) return -1;
    if (tsr_cuda_upload(gm->dev, p, w->data, n, err, err_len) != 0) return -1;
    *out = (tsr_cuda_weight){
        .type = w->type, .n_in = w->n_in, .n_out = w->n_out, .row_bytes = w->row_bytes, .data = p};
    return 0;
}

static int up_floats(tsr_gpu_model *gm, const float *v, int64_t n, const char *what, float **out,
                     char *err, size_t err_len)
{
    *out = NULL;
    if (!v) return 0;
    void *p;
    if (track(gm, sizeof(float) * (size_t)n, what, &p, err, err_len) != 0) return -1;
    if (tsr_cuda_upload(gm->dev, p, v, sizeof(float) * (size_t)n, err, err_len) != 0) return -1;
    *out = p;
    return 0;
}

static uint64_t weight_bytes(const tsr_weight *w)
{
    return (uint64_t)w->row_bytes * (uint64_t)w->n_out;
}

uint64_t tsr_gpu_bytes_needed(const tsr_model *m, int32_t n_kv_blocks, int32_t n_batch)
{
    const tsr_hparams *hp = &m->hp;
    const tsr_shard *sh = &m->shard;
    uint64_t n = 0;
    if (m->first_stage) n += weight_bytes(&m->tok_embd);
    if (m->last_stage && !(m->first_stage && m->output.data == m->tok_embd.data &&
                           m->output.n_out == m->tok_embd.n_out))
        n += weight_bytes(&m->output);
    for (int32_t l = 0; l < m->n_layer_local; l++) {
        const tsr_layer *L = &m->layers[l];
        n += weight_bytes(&L->wq) + weight_bytes(&L->wk) + weight_bytes(&L->wv) +
             weight_bytes(&L->wo) + weight_bytes(&L->w_gate) + weight_bytes(&L->w_up) +
             weight_bytes(&L->w_down) + 4u * (uint64_t)hp->n_embd * 5u + /* norms, bo */
             4u *
                 (uint64_t)((sh->head_end - sh->head_begin) +
                            2 * (sh->kv_head_end - sh->kv_head_begin) + 2) *
                 (uint64_t)hp->head_dim; /* q/k/v biases, q/k norms */
    }
    const uint64_t kv_dim = (uint64_t)(sh->kv_head_end - sh->kv_head_begin) * hp->head_dim;
    n += 2ull * 4ull * (uint64_t)m->n_layer_local * (uint64_t)n_kv_blocks * 16ull * kv_dim;
    const uint64_t q_dim = (uint64_t)(sh->head_end - sh->head_begin) * hp->head_dim;
    const uint64_t ff = (uint64_t)(sh->ff_end - sh->ff_begin);
    const uint64_t vl = (uint64_t)(sh->vocab_end - sh->vocab_begin);
    const uint64_t E = (uint64_t)hp->n_embd;
    n += 4ull * (uint64_t)n_batch * (4 * E + 2 * q_dim + 2 * kv_dim + 2 * ff + vl);
    n += (uint64_t)64 << 20; /* cuBLAS F16 weight tile */
    return n;
}

void tsr_gpu_model_free(tsr_gpu_model *gm)
{
    if (!gm) return;
    if (gm->dev) tsr_cuda_activate(gm->dev, NULL, 0);
    for (int32_t i = 0; i < gm->n_allocs; i++)
        tsr_cuda_free(gm->dev, gm->allocs[i], gm->alloc_bytes[i]);
    tsr_cuda_close(gm->dev);
    free(gm->allocs);
    free(gm->alloc_bytes);
    free(gm->layers);
    free(gm);
}

int tsr_gpu_model_upload(const tsr_model *m, int32_t device, uint64_t n_bytes_cap,
                         tsr_gpu_model **out, char *err, size_t err_len)
{
    *out = NULL;
    tsr_gpu_model *gm = calloc(1, sizeof *gm);
    if (!gm) {
        tsr_set_err(err, err_len, "out of host memory");
        return -1;
    }
    gm->m = m;
    const int32_t E = m->hp.n_embd;
    if (tsr_cuda_open(device, n_bytes_cap, &gm->dev, err, err_len) != 0) goto fail;
    gm->layers = calloc((size_t)(m->n_layer_local > 0 ? m->n_layer_local : 1), sizeof(gpu_layer));
    if (!gm->layers) {
        tsr_set_err(err, err_len, "out of host memory");
        goto fail;
    }
    if (m->first_stage && up_weight(gm, &m->tok_embd, "token_embd", &gm->tok_embd, err, err_len))
        goto fail;
    if (m->last_stage) {
        /* tied heads share the embedding's bytes only when this rank holds the whole
         * vocabulary (under tp the head is a row slice of token_embd) */
        if (m->first_stage && m->output.data == m->tok_embd.data &&
            m->output.n_out == m->tok_embd.n_out)
            gm->output = gm->tok_embd;
        else if (up_weight(gm, &m->output, "output", &gm->output, err, err_len))
            goto fail;
        if (up_floats(gm, m->output_norm, E, "output_norm", &gm->output_norm, err, err_len))
            goto fail;
    }
    if (up_floats(gm, m->freq_factors, m->hp.n_rot / 2, "rope_freqs", &gm->freq_factors, err,
                  err_len))
        goto fail;
    for (int32_t l = 0; l < m->n_layer_local; l++) {
        const tsr_layer *L = &m->layers[l];
        gpu_layer *G = &gm->layers[l];
        const int32_t hd = m->hp.head_dim;
        const int32_t q_dim = (m->shard.head_end - m->shard.head_begin) * hd;
        const int32_t kv_dim = (m->shard.kv_head_end - m->shard.kv_head_begin) * hd;
        if (up_floats(gm, L->attn_norm, E, "attn_norm", &G->attn_norm, err, err_len) ||
            up_floats(gm, L->ffn_norm, E, "ffn_norm", &G->ffn_norm, err, err_len) ||
            up_floats(gm, L->bq, q_dim, "attn_q.bias", &G->bq, err, err_len) ||
            up_floats(gm, L->bk, kv_dim, "attn_k.bias", &G->bk, err, err_len) ||
            up_floats(gm, L->bv, kv_dim, "attn_v.bias", &G->bv, err, err_len) ||
            up_floats(gm, L->bo, E, "attn_output.bias", &G->bo, err, err_len) ||
            up_floats(gm, L->q_norm, hd, "attn_q_norm", &G->q_norm, err, err_len) ||
            up_floats(gm, L->k_norm, hd, "attn_k_norm", &G->k_norm, err, err_len) ||
            up_floats(gm, L->post_attn_norm, E, "post_attention_norm", &G->post_attn_norm, err,
                      err_len) ||
            up_floats(gm, L->post_ffn_norm, E, "post_ffw_norm", &G->post_ffn_norm, err, err_len) ||
            up_weight(gm, &L->wq, "attn_q", &G->wq, err, err_len) ||
            up_weight(gm, &L->wk, "attn_k", &G->wk, err, err_len) ||
            up_weight(gm, &L->wv, "attn_v", &G->wv, err, err_len) ||
            up_weight(gm, &L->wo, "attn_output", &G->wo, err, err_len) ||
            up_weight(gm, &L->w_gate, "ffn_gate", &G->w_gate, err, err_len) ||
            up_weight(gm, &L->w_up, "ffn_up", &G->w_up, err, err_len) ||
            up_weight(gm, &L->w_down, "ffn_down", &G->w_down, err, err_len))
            goto fail;
    }
    *out = gm;
    return 0;
fail:
    tsr_gpu_model_free(gm);
    return -1;
}

uint64_t tsr_gpu_model_bytes(const tsr_gpu_model *gm)
{
    return tsr_cuda_n_bytes_used(gm->dev);
}

int32_t tsr_gpu_model_device(const tsr_gpu_model *gm)
{
    return tsr_cuda_ordinal(gm->dev);
}

/* ---- context ---- */

void tsr_gpu_ctx_free(tsr_gpu_ctx *gc)
{
    if (!gc) return;
    tsr_cuda_dev *d = gc->gm->dev;
    for (int32_t i = 0; i < gc->n_bufs; i++) tsr_cuda_free(d, gc->bufs[i], gc->buf_bytes[i]);
    tsr_cuda_free(d, gc->desc, sizeof(int32_t) * (size_t)gc->desc_cap);
    tsr_cuda_free(d, gc->logits_full, sizeof(float) * gc->logits_full_floats);
    tsr_cuda_free(d, gc->logits_parts, sizeof(float) * gc->logits_parts_floats);
    free(gc->desc_host);
    free(gc->host_buf);
    free(gc);
}

static int ctx_buf(tsr_gpu_ctx *gc, size_t n_floats, const char *what, float **out, char *err,
                   size_t err_len)
{
    void *p;
    const size_t n_bytes = sizeof(float) * (n_floats ? n_floats : 1);
    if (gc->n_bufs == 16) {
        tsr_set_err(err, err_len, "internal: too many GPU context buffers");
        return -1;
    }
    if (tsr_cuda_alloc(gc->gm->dev, n_bytes, what, &p, err, err_len) != 0) return -1;
    gc->bufs[gc->n_bufs] = p;
    gc->buf_bytes[gc->n_bufs++] = n_bytes;
    *out = p;
    return 0;
}

int tsr_gpu_ctx_new(tsr_gpu_model *gm, int32_t n_kv_blocks, int32_t n_batch, uint32_t kv_type,
                    tsr_gpu_ctx **out, char *err, size_t err_len)
{
    *out = NULL;
    const tsr_model *m = gm->m;
    const tsr_hparams *hp = &m->hp;
    const tsr_shard *sh = &m->shard;
    if (!tsr_cuda_kv_type_ok(kv_type, hp->head_dim)) {
        tsr_set_err(err, err_len,
                    kv_type == TSR_CUDA_KV_Q8_0
                        ? "--kv-type q8_0 stores K and V in blocks of 32 values along the head, "
                          "but this model's heads have %d values; use --kv-type f16 or f32"
                        : "KV cache type %d is not supported on the GPU: use --kv-type f32, f16 "
                          "or q8_0",
                    kv_type == TSR_CUDA_KV_Q8_0 ? hp->head_dim : (int)kv_type);
        return -1;
    }
    if (n_kv_blocks < 1 || n_batch < 1 || n_batch > 65535) {
        tsr_set_err(err, err_len, "a GPU context needs >= 1 KV block and 1..65535 batch tokens");
        return -1;
    }
    if (hp->head_dim > TSR_CUDA_MAX_HEAD_DIM) {
        tsr_set_err(err, err_len, "head dimension %d exceeds the CUDA attention kernel's %d",
                    hp->head_dim, TSR_CUDA_MAX_HEAD_DIM);
        return -1;
    }
    tsr_gpu_ctx *gc = calloc(1, sizeof *gc);
    if (!gc) {
        tsr_set_err(err, err_len, "out of host memory");
        return -1;
    }
    gc->gm = gm;
    if (tsr_cuda_activate(gm->dev, err, err_len) != 0) {
        free(gc);
        return -1;
    }
    gc->n_kv_blocks = n_kv_blocks;
    gc->n_batch = n_batch;
    gc->kv_type = kv_type;
    gc->kv_dim = (sh->kv_head_end - sh->kv_head_begin) * hp->head_dim;
    gc->kv_row_bytes = tsr_cuda_kv_row_bytes(kv_type, gc->kv_dim);
    gc->q_dim = (sh->head_end - sh->head_begin) * hp->head_dim;
    gc->n_ff = sh->ff_end - sh->ff_begin;
    gc->n_vocab_local = sh->vocab_end - sh->vocab_begin;
    const size_t nb = (size_t)n_batch, E = (size_t)hp->n_embd;
    /* in floats of 4 bytes (the pool holds rows of kv_row_bytes; 16 positions per block keep
     * the count whole: 16 x 2 bytes, 16 x 34 bytes per Q8_0 block) */
    const size_t kv = (size_t)m->n_layer_local * (size_t)n_kv_blocks * TSR_KV_BLOCK_SIZE *
                      gc->kv_row_bytes / sizeof(float);
    const size_t qd = (size_t)gc->q_dim;
    if (ctx_buf(gc, kv, "KV cache (K)", &gc->k_cache, err, err_len) ||
        ctx_buf(gc, kv, "KV cache (V)", &gc->v_cache, err, err_len) ||
        ctx_buf(gc, nb * E, "hidden", &gc->x, err, err_len) ||
        ctx_buf(gc, nb * (qd > E ? qd : E), "activations", &gc->xb, err, err_len) ||
        ctx_buf(gc, nb * E, "activations", &gc->xb2, err, err_len) ||
        ctx_buf(gc, nb * qd, "queries", &gc->q, err, err_len) ||
        ctx_buf(gc, nb * (size_t)gc->kv_dim, "keys", &gc->k, err, err_len) ||
        ctx_buf(gc, nb * (size_t)gc->kv_dim, "values", &gc->v, err, err_len) ||
        ctx_buf(gc, nb * qd, "attention output", &gc->att, err, err_len) ||
        ctx_buf(gc, nb * (size_t)gc->n_ff, "feed-forward", &gc->hb, err, err_len) ||
        ctx_buf(gc, nb * (size_t)gc->n_ff, "feed-forward", &gc->hb2, err, err_len) ||
        ctx_buf(gc, nb * E, "head input", &gc->head_in, err, err_len) ||
        ctx_buf(gc, nb * (size_t)gc->n_vocab_local, "logits", &gc->logits, err, err_len))
        goto fail;
    gc->host_buf = malloc(sizeof(float) * nb * E);
    if (!gc->host_buf) {
        tsr_set_err(err, err_len, "out of host memory");
        goto fail;
    }
    *out = gc;
    return 0;
fail:
    tsr_gpu_ctx_free(gc);
    return -1;
}

void tsr_gpu_ctx_set_tp_comm(tsr_gpu_ctx *gc, tsr_comm *tp)
{
    gc->tp = tp;
}

bool tsr_gpu_host_addressable(void)
{
    return tsr_cuda_host_addressable();
}

void tsr_gpu_ctx_set_pipe(tsr_gpu_ctx *gc, tsr_comm *pipe, int prev_peer, int next_peer, int tag)
{
    gc->direct = true;
    gc->pipe = pipe;
    gc->prev_peer = pipe ? prev_peer : -1;
    gc->next_peer = pipe ? next_peer : -1;
    gc->pipe_tag = tag;
}

void tsr_gpu_ctx_step_begin(tsr_gpu_ctx *gc)
{
    gc->want_done = 0;
}

/* Grow a device buffer of the context to n floats (contents not kept). */
static int grow(tsr_gpu_ctx *gc, float **buf, size_t *have, size_t n, const char *what, char *err,
                size_t err_len)
{
    if (n <= *have) return 0;
    tsr_cuda_dev *d = gc->gm->dev;
    if (*buf) {
        if (tsr_cuda_sync(d, err, err_len) != 0) return -1;
        tsr_cuda_free(d, *buf, sizeof(float) * *have);
    }
    *buf = NULL;
    *have = 0;
    void *p;
    if (tsr_cuda_alloc(d, sizeof(float) * n, what, &p, err, err_len) != 0) return -1;
    *buf = p;
    *have = n;
    return 0;
}

int tsr_gpu_ctx_logits_out(tsr_gpu_ctx *gc, tsr_comm *tp, const int32_t *vocab_begin,
                           const int32_t *vocab_n, int32_t n_want, int tag, float *host_out,
                           int leader_peer, char *err, size_t err_len)
{
    tsr_cuda_dev *d = gc->gm->dev;
    const size_t V = (size_t)gc->gm->m->hp.n_vocab;
    const int n_tp = tp ? tp->size : 1, me = tp ? tp->rank : 0;
    if (n_want <= 0) return 0;
    if (!gc->direct || n_want != gc->want_done) {
        tsr_set_err(err, err_len,
                    "logits out: the step computed %d logits rows on the device, %d were asked for",
                    gc->want_done, n_want);
        return -1;
    }
    if (tsr_cuda_activate(d, err, err_len) != 0 || tsr_cuda_sync(d, err, err_len) != 0) return -1;
    int rc = 0;
    float *full = gc->logits; /* tp 1: this rank's slice is the whole vocabulary */
    if (n_tp > 1 && me != 0) {
        /* [n_want][vocab_n[me]] to tp rank 0 */
        return tsr_comm_send(tp, gc->logits, sizeof(float) * (size_t)n_want * (size_t)vocab_n[me],
                             0, tag, err, err_len);
    }
    if (n_tp > 1) {
        /* tp rank 0: receive the others' slices back to back, then interleave every rank's
         * [n_want][vocab_n[k]] block into the columns [vocab_begin[k], +vocab_n[k]) of
         * [n_want][V] rows (one 2-D copy per rank) */
        size_t parts = 0;
        for (int k = 1; k < n_tp; k++) parts += (size_t)n_want * (size_t)vocab_n[k];
        if (grow(gc, &gc->logits_parts, &gc->logits_parts_floats, parts, "tp logits slices", err,
                 err_len) != 0 ||
            grow(gc, &gc->logits_full, &gc->logits_full_floats, (size_t)n_want * V, "logits", err,
                 err_len) != 0)
            return -1;
        full = gc->logits_full;
        size_t off = 0;
        for (int k = 0; k < n_tp && rc == 0; k++) {
            const float *src = gc->logits;
            if (k > 0) {
                const size_t n_k = (size_t)n_want * (size_t)vocab_n[k];
                rc = tsr_comm_recv(tp, gc->logits_parts + off, sizeof(float) * n_k, k, tag, err,
                                   err_len);
                src = gc->logits_parts + off;
                off += n_k;
            }
            if (rc == 0)
                rc = tsr_cuda_copy_2d(d, full + vocab_begin[k], sizeof(float) * V, src,
                                      sizeof(float) * (size_t)vocab_n[k],
                                      sizeof(float) * (size_t)vocab_n[k], (size_t)n_want, err,
                                      err_len);
        }
        if (rc == 0) rc = tsr_cuda_sync(d, err, err_len);
    }
    if (rc == 0) {
        if (host_out)
            rc = tsr_cuda_download(d, host_out, full, sizeof(float) * (size_t)n_want * V, err,
                                   err_len);
        else
            rc = tsr_comm_send(gc->pipe, full, sizeof(float) * (size_t)n_want * V, leader_peer, tag,
                               err, err_len);
    }
    return rc;
}

int tsr_gpu_ctx_logits_in(tsr_gpu_ctx *gc, int peer, int tag, int32_t n_want, float *host_out,
                          char *err, size_t err_len)
{
    tsr_cuda_dev *d = gc->gm->dev;
    const size_t n = (size_t)n_want * (size_t)gc->gm->m->hp.n_vocab;
    if (n_want <= 0) return 0;
    if (!gc->direct || !gc->pipe) {
        tsr_set_err(err, err_len, "logits in: the context has no device-direct pipeline");
        return -1;
    }
    if (tsr_cuda_activate(d, err, err_len) != 0) return -1;
    if (grow(gc, &gc->logits_full, &gc->logits_full_floats, n, "logits", err, err_len) != 0)
        return -1;
    int rc = tsr_comm_recv(gc->pipe, gc->logits_full, sizeof(float) * n, peer, tag, err, err_len);
    if (rc == 0)
        rc = tsr_cuda_download(d, host_out, gc->logits_full, sizeof(float) * n, err, err_len);
    return rc;
}

uint64_t tsr_gpu_ctx_device_bytes(const tsr_gpu_ctx *gc)
{
    return gc ? tsr_cuda_n_bytes_used(gc->gm->dev) : 0;
}

tsr_gpu_ctx *tsr_gpu_ctx_of(tsr_ctx *c)
{
    return tsr_ctx_backend(c) == &k_gpu_backend ? tsr_ctx_backend_state(c) : NULL;
}

/* Sum x [n floats, device] over the tp group. */
static int tp_allreduce(tsr_gpu_ctx *gc, float *x, size_t n, char *err, size_t err_len)
{
    if (!gc->tp || gc->tp->size <= 1) return 0;
    tsr_cuda_dev *d = gc->gm->dev;
    if (tsr_cuda_sync(d, err, err_len) != 0) return -1;
    int rc;
    if (gc->direct || strcmp(gc->tp->vt->name, "nccl") == 0) {
        rc = tsr_comm_allreduce_sum_f32(gc->tp, x, n, err, err_len);
    } else {
        rc = tsr_cuda_download(d, gc->host_buf, x, sizeof(float) * n, err, err_len);
        if (rc == 0) rc = tsr_comm_allreduce_sum_f32(gc->tp, gc->host_buf, n, err, err_len);
        if (rc == 0) rc = tsr_cuda_upload(d, x, gc->host_buf, sizeof(float) * n, err, err_len);
    }
    return rc;
}

/* Pack the step descriptor: tokens, pos, seq, rows, logit rows [n each], then the block
 * tables [n_seqs][max_blocks]; upload it in one copy. */
static int upload_desc(tsr_gpu_ctx *gc, const tsr_batch *b, int32_t *n_want, int32_t *max_blocks,
                       int32_t *max_pos, char *err, size_t err_len)
{
    const int32_t n = b->n_tokens;
    int32_t mb = 1;
    for (int32_t s = 0; s < b->n_seqs; s++)
        if (b->n_blocks[s] > mb) mb = b->n_blocks[s];
    const int64_t need = 5 * (int64_t)n + (int64_t)b->n_seqs * mb;
    if (need > INT32_MAX) {
        tsr_set_err(err, err_len, "step descriptor too large");
        return -1;
    }
    tsr_cuda_dev *d = gc->gm->dev;
    if (need > gc->desc_cap) {
        if (gc->desc) tsr_cuda_sync(d, NULL, 0);
        tsr_cuda_free(d, gc->desc, sizeof(int32_t) * (size_t)gc->desc_cap);
        free(gc->desc_host);
        gc->desc = NULL;
        gc->desc_cap = 0;
        gc->desc_host = malloc(sizeof(int32_t) * (size_t)need);
        if (!gc->desc_host) {
            tsr_set_err(err, err_len, "out of host memory");
            return -1;
        }
        void *p;
        if (tsr_cuda_alloc(d, sizeof(int32_t) * (size_t)need, "step descriptor", &p, err,
                           err_len) != 0)
            return -1;
        gc->desc = p;
        gc->desc_cap = (int32_t)need;
    }
    int32_t *h = gc->desc_host;
    int32_t w = 0;
    for (int32_t t = 0; t < n; t++) {
        h[t] = b->tokens ? b->tokens[t] : 0;
        h[n + t] = b->pos[t];
        h[2 * n + t] = b->seq[t];
        const int32_t p = b->pos[t];
        h[3 * n + t] = b->block_tables[b->seq[t]][p / TSR_KV_BLOCK_SIZE] * TSR_KV_BLOCK_SIZE +
                       p % TSR_KV_BLOCK_SIZE;
        if (b->want_logits[t]) h[4 * n + w++] = t;
    }
    for (int32_t s = 0; s < b->n_seqs; s++)
        for (int32_t k = 0; k < mb; k++)
            h[5 * n + s * mb + k] = k < b->n_blocks[s] ? b->block_tables[s][k] : 0;
    int32_t mp = 0;
    for (int32_t t = 0; t < n; t++)
        if (b->pos[t] > mp) mp = b->pos[t];
    *n_want = w;
    *max_blocks = mb;
    *max_pos = mp;
    return tsr_cuda_upload(d, gc->desc, h, sizeof(int32_t) * (size_t)need, err, err_len);
}

int tsr_gpu_forward_batch(tsr_gpu_ctx *gc, const tsr_batch *b, float *hidden, float *logits,
                          char *err, size_t err_len)
{
    tsr_gpu_model *gm = gc->gm;
    const tsr_model *m = gm->m;
    const tsr_hparams *hp = &m->hp;
    const tsr_shard *sh = &m->shard;
    tsr_cuda_dev *d = gm->dev;
    const int32_t n = b->n_tokens, E = hp->n_embd, hd = hp->head_dim;
    const int32_t n_head_local = sh->head_end - sh->head_begin;
    const int32_t n_kv_local = sh->kv_head_end - sh->kv_head_begin;
    if (n < 1 || n > gc->n_batch) {
        tsr_set_err(err, err_len, "a GPU batch holds 1..%d tokens, got %d", gc->n_batch, n);
        return -1;
    }
    if (tsr_cuda_activate(d, err, err_len) != 0) return -1; /* steps may run on any thread */
    int32_t n_want = 0, mb = 1, max_pos = 0;
    if (upload_desc(gc, b, &n_want, &mb, &max_pos, err, err_len) != 0) return -1;
    const int32_t *d_tok = gc->desc, *d_pos = gc->desc + n, *d_seq = gc->desc + 2 * n;
    const int32_t *d_rows = gc->desc + 3 * n, *d_want = gc->desc + 4 * n;
    const int32_t *d_tables = gc->desc + 5 * n;
    const size_t nE = (size_t)n * (size_t)E;
#define CK(call)                                                                                   \
    do {                                                                                           \
        if ((call) != 0) return -1;                                                                \
    } while (0)
    if (m->first_stage) {
        CK(tsr_cuda_embed(d, &gm->tok_embd, d_tok, n, gc->x, err, err_len));
        if (hp->embd_scale != 1.0f)
            CK(tsr_cuda_scale(d, gc->x, hp->embd_scale, (int64_t)nE, err, err_len));
    } else if (gc->direct && gc->prev_peer >= 0) {
        /* the previous stage's output, device to device (kernels of the last step are done:
         * the previous send or download waited for them) */
        CK(tsr_comm_recv(gc->pipe, gc->x, sizeof(float) * nE, gc->prev_peer, gc->pipe_tag, err,
                         err_len));
    } else {
        CK(tsr_cuda_upload(d, gc->x, hidden, sizeof(float) * nE, err, err_len));
    }
    const size_t kv_layer =
        (size_t)gc->n_kv_blocks * TSR_KV_BLOCK_SIZE * gc->kv_row_bytes; /* bytes */
    const int32_t q_dim = n_head_local * hd;
    for (int32_t l = 0; l < m->n_layer_local; l++) {
        const gpu_layer *G = &gm->layers[l];
        void *kc = (uint8_t *)gc->k_cache + (size_t)l * kv_layer;
        void *vc = (uint8_t *)gc->v_cache + (size_t)l * kv_layer;
        CK(tsr_cuda_rmsnorm(d, gc->xb, gc->x, G->attn_norm, n, E, hp->rms_eps, err, err_len));
        CK(tsr_cuda_matmul(d, &G->wq, gc->xb, n, gc->q, err, err_len));
        CK(tsr_cuda_matmul(d, &G->wk, gc->xb, n, gc->k, err, err_len));
        CK(tsr_cuda_matmul(d, &G->wv, gc->xb, n, gc->v, err, err_len));
        CK(tsr_cuda_add_rows(d, gc->q, G->bq, n, q_dim, err, err_len)); /* NULL: no bias */
        CK(tsr_cuda_add_rows(d, gc->k, G->bk, n, gc->kv_dim, err, err_len));
        CK(tsr_cuda_add_rows(d, gc->v, G->bv, n, gc->kv_dim, err, err_len));
        if (G->q_norm) { /* per head: [n * heads] rows of head_dim */
            CK(tsr_cuda_rmsnorm(d, gc->q, gc->q, G->q_norm, n * n_head_local, hd, hp->rms_eps, err,
                                err_len));
            CK(tsr_cuda_rmsnorm(d, gc->k, gc->k, G->k_norm, n * n_kv_local, hd, hp->rms_eps, err,
                                err_len));
        }
        const bool swa = tsr_hparams_layer_swa(hp, sh->layer_begin + l);
        int32_t max_chunks = max_pos / TSR_KV_BLOCK_SIZE + 1;
        if (swa && hp->n_swa / TSR_KV_BLOCK_SIZE + 2 < max_chunks)
            max_chunks = hp->n_swa / TSR_KV_BLOCK_SIZE + 2;
        /* both pairings with ggml's running-product angles, as the CPU's tsr_rope_ext */
        const tsr_cuda_rope_cfg rope = {
            .mode = hp->rope_neox ? 2 : 0,
            .n_rot = hp->n_rot,
            .freq_base = swa ? hp->rope_freq_base_swa : hp->rope_freq_base,
            .freq_scale = swa ? hp->rope_freq_scale_swa : hp->rope_freq_scale,
            .ext_factor = 0.0f,
            .attn_factor = 1.0f,
            .ggml_theta = 1};
        CK(tsr_cuda_rope(d, gc->q, d_pos, n, n_head_local, hd, &rope, gm->freq_factors, err,
                         err_len));
        CK(tsr_cuda_rope(d, gc->k, d_pos, n, n_kv_local, hd, &rope, gm->freq_factors, err,
                         err_len));
        /* gemma3 scales Q before the product and uses a unit score scale (as model.c) */
        const bool q_scaled = hp->arch == TSR_ARCH_GEMMA3;
        if (q_scaled)
            CK(tsr_cuda_scale(d, gc->q, hp->attn_scale, (int64_t)n * q_dim, err, err_len));
        CK(tsr_cuda_kv_store(d, kc, vc, gc->k, gc->v, d_rows, n, gc->kv_dim, gc->kv_type, err,
                             err_len));
        const tsr_cuda_attn_args aa = {.q = gc->q,
                                       .k_cache = kc,
                                       .v_cache = vc,
                                       .kv_type = gc->kv_type,
                                       .out = gc->att,
                                       .pos = d_pos,
                                       .seq = d_seq,
                                       .tables = d_tables,
                                       .max_blocks = mb,
                                       .max_chunks = max_chunks,
                                       .n_tok = n,
                                       .n_head_local = n_head_local,
                                       .head_dim = hd,
                                       .kv_dim = gc->kv_dim,
                                       .head_begin = sh->head_begin,
                                       .group = hp->n_head / hp->n_head_kv,
                                       .kv_head_begin = sh->kv_head_begin,
                                       .window = swa ? hp->n_swa : 0,
                                       .scale = q_scaled ? 1.0f : hp->attn_scale};
        CK(tsr_cuda_attention(d, &aa, err, err_len));
        CK(tsr_cuda_matmul(d, &G->wo, gc->att, n, gc->xb2, err, err_len));
        CK(tp_allreduce(gc, gc->xb2, nE, err, err_len));
        CK(tsr_cuda_add_rows(d, gc->xb2, G->bo, n, E, err, err_len));
        if (G->post_attn_norm)
            CK(tsr_cuda_rmsnorm(d, gc->xb2, gc->xb2, G->post_attn_norm, n, E, hp->rms_eps, err,
                                err_len));
        CK(tsr_cuda_add(d, gc->x, gc->xb2, (int64_t)nE, err, err_len));
        CK(tsr_cuda_rmsnorm(d, gc->xb, gc->x, G->ffn_norm, n, E, hp->rms_eps, err, err_len));
        CK(tsr_cuda_matmul(d, &G->w_gate, gc->xb, n, gc->hb, err, err_len));
        CK(tsr_cuda_matmul(d, &G->w_up, gc->xb, n, gc->hb2, err, err_len));
        CK(tsr_cuda_glu(d, hp->ffn_gelu ? TSR_CUDA_GLU_GEGLU : TSR_CUDA_GLU_SWIGLU, gc->hb, gc->hb2,
                        (int64_t)n * gc->n_ff, err, err_len));
        CK(tsr_cuda_matmul(d, &G->w_down, gc->hb, n, gc->xb2, err, err_len));
        CK(tp_allreduce(gc, gc->xb2, nE, err, err_len));
        if (G->post_ffn_norm)
            CK(tsr_cuda_rmsnorm(d, gc->xb2, gc->xb2, G->post_ffn_norm, n, E, hp->rms_eps, err,
                                err_len));
        CK(tsr_cuda_add(d, gc->x, gc->xb2, (int64_t)nE, err, err_len));
    }
    if (m->last_stage && (logits || gc->direct) && n_want > 0) {
        const int64_t n_l = (int64_t)n_want * gc->n_vocab_local;
        /* direct: the step's rows stay on the device, appended after the earlier
         * micro-batches' (tsr_gpu_ctx_logits_out takes them from there) */
        const int32_t row0 = gc->direct ? gc->want_done : 0;
        if (row0 + n_want > gc->n_batch) {
            tsr_set_err(err, err_len, "%d logits rows in one step exceed the batch of %d",
                        row0 + n_want, gc->n_batch);
            return -1;
        }
        float *lg = gc->logits + (size_t)row0 * (size_t)gc->n_vocab_local;
        CK(tsr_cuda_gather_rows(d, gc->xb, gc->x, d_want, n_want, E, err, err_len));
        CK(tsr_cuda_rmsnorm(d, gc->head_in, gc->xb, gm->output_norm, n_want, E, hp->rms_eps, err,
                            err_len));
        CK(tsr_cuda_matmul(d, &gm->output, gc->head_in, n_want, lg, err, err_len));
        if (hp->final_logit_softcap > 0.0f)
            CK(tsr_cuda_softcap(d, lg, hp->final_logit_softcap, n_l, err, err_len));
        if (gc->direct)
            gc->want_done += n_want;
        else
            CK(tsr_cuda_download(d, logits, lg, sizeof(float) * (size_t)n_l, err, err_len));
    }
    if (gc->direct && gc->next_peer >= 0) {
        /* to the next stage, device to device (NCCL runs on its own stream: wait for ours) */
        CK(tsr_cuda_sync(d, err, err_len));
        CK(tsr_comm_send(gc->pipe, gc->x, sizeof(float) * nE, gc->next_peer, gc->pipe_tag, err,
                         err_len));
    } else if (!gc->direct) {
        CK(tsr_cuda_download(d, hidden, gc->x, sizeof(float) * nE, err, err_len));
    } else {
        CK(tsr_cuda_sync(d, err, err_len)); /* errors of this step's kernels surface here */
    }
#undef CK
    return 0;
}

/* ---- the backend seam ---- */

static int be_forward(void *state, const tsr_batch *b, float *hidden, float *logits, char *err,
                      size_t err_len)
{
    return tsr_gpu_forward_batch(state, b, hidden, logits, err, err_len);
}

static void be_set_tp(void *state, tsr_comm *tp)
{
    tsr_gpu_ctx_set_tp_comm(state, tp);
}

static void be_free(void *state)
{
    tsr_gpu_ctx *gc = state;
    tsr_gpu_model *gm = gc->gm;
    tsr_gpu_ctx_free(gc);
    tsr_gpu_model_free(gm);
}

/* Copy-on-write of KV blocks (tsr_ctx_kv_copy): a block is TSR_KV_BLOCK_SIZE consecutive
 * rows of each layer's K and V pool, copied device to device on the context's stream, so
 * the next step's kernels see it. */
static int be_kv_copy(void *state, const int32_t *src, const int32_t *dst, int32_t n, char *err,
                      size_t err_len)
{
    tsr_gpu_ctx *gc = state;
    tsr_cuda_dev *d = gc->gm->dev;
    const size_t kv_layer = (size_t)gc->n_kv_blocks * TSR_KV_BLOCK_SIZE *
                            gc->kv_row_bytes; /* bytes, as tsr_gpu_forward_batch lays it out */
    const size_t block_bytes = kv_layer / (size_t)gc->n_kv_blocks;
    if (tsr_cuda_activate(d, err, err_len) != 0) return -1; /* steps may run on any thread */
    for (int32_t l = 0; l < gc->gm->m->n_layer_local; l++) {
        uint8_t *kc = (uint8_t *)gc->k_cache + (size_t)l * kv_layer;
        uint8_t *vc = (uint8_t *)gc->v_cache + (size_t)l * kv_layer;
        for (int32_t i = 0; i < n; i++) {
            const size_t so = (size_t)src[i] * block_bytes, dof = (size_t)dst[i] * block_bytes;
            if (tsr_cuda_copy(d, kc + dof, kc + so, block_bytes, err, err_len) != 0 ||
                tsr_cuda_copy(d, vc + dof, vc + so, block_bytes, err, err_len) != 0)
                return -1;
        }
    }
    return 0;
}

static const tsr_backend k_gpu_backend = {
    .name = "cuda",
    .forward_batch = be_forward,
    .set_tp_comm = be_set_tp,
    .free = be_free,
    .kv_copy = be_kv_copy,
};

const tsr_backend *tsr_gpu_backend(void)
{
    return &k_gpu_backend;
}

int tsr_gpu_attach(tsr_ctx *c, const tsr_model *m, int32_t device, uint64_t n_bytes_cap, char *err,
                   size_t err_len)
{
    tsr_gpu_model *gm = NULL;
    tsr_gpu_ctx *gc = NULL;
    if (tsr_gpu_model_upload(m, device, n_bytes_cap, &gm, err, err_len) != 0) return -1;
    /* the device pool stores what the context stores (kernels/kvcache.h -> numerics.h ids) */
    const tsr_kv_type kt = tsr_ctx_kv_type(c);
    const uint32_t kv_type = kt == TSR_KV_F32   ? TSR_CUDA_KV_F32
                             : kt == TSR_KV_F16 ? TSR_CUDA_KV_F16
                                                : TSR_CUDA_KV_Q8_0;
    if (tsr_gpu_ctx_new(gm, tsr_ctx_n_kv_blocks(c), tsr_ctx_n_batch(c), kv_type, &gc, err,
                        err_len) != 0) {
        tsr_gpu_model_free(gm);
        return -1;
    }
    tsr_ctx_set_backend(c, &k_gpu_backend, gc);
    return 0;
}

#else /* !TSR_HAVE_CUDA */

#define NO_CUDA                                                                                    \
    "this build has no CUDA backend (configure with -DTESSERA_CUDA=ON where nvcc is installed)"

bool tsr_gpu_built(void)
{
    return false;
}

int32_t tsr_gpu_device_count(char *why, size_t why_len)
{
    tsr_set_err(why, why_len, "%s", NO_CUDA);
    return 0;
}

int32_t tsr_gpu_pick_device(char *why, size_t why_len)
{
    tsr_set_err(why, why_len, "%s", NO_CUDA);
    return -1;
}

uint64_t tsr_gpu_bytes_needed(const tsr_model *m, int32_t n_kv_blocks, int32_t n_batch)
{
    (void)m;
    (void)n_kv_blocks;
    (void)n_batch;
    return 0;
}

int tsr_gpu_model_upload(const tsr_model *m, int32_t device, uint64_t n_bytes_cap,
                         tsr_gpu_model **out, char *err, size_t err_len)
{
    *out = NULL;
    tsr_set_err(err, err_len, "%s", NO_CUDA);
    return -1;
}

void tsr_gpu_model_free(tsr_gpu_model *gm)
{
    (void)gm;
}

uint64_t tsr_gpu_model_bytes(const tsr_gpu_model *gm)
{
    return 0;
}

uint64_t tsr_gpu_ctx_device_bytes(const tsr_gpu_ctx *gc)
{
    (void)gc;
    return 0;
}

int32_t tsr_gpu_model_device(const tsr_gpu_model *gm)
{
    return -1;
}

int tsr_gpu_ctx_new(tsr_gpu_model *gm, int32_t n_kv_blocks, int32_t n_batch, uint32_t kv_type,
                    tsr_gpu_ctx **out, char *err, size_t err_len)
{
    *out = NULL;
    tsr_set_err(err, err_len, "%s", NO_CUDA);
    return -1;
}

void tsr_gpu_ctx_free(tsr_gpu_ctx *gc)
{
    (void)gc;
}

void tsr_gpu_ctx_set_tp_comm(tsr_gpu_ctx *gc, tsr_comm *tp) {}

int tsr_gpu_forward_batch(tsr_gpu_ctx *gc, const tsr_batch *b, float *hidden, float *logits,
                          char *err, size_t err_len)
{
    tsr_set_err(err, err_len, "%s", NO_CUDA);
    return -1;
}

const tsr_backend *tsr_gpu_backend(void)
{
    return NULL;
}

bool tsr_gpu_host_addressable(void)
{
    return false;
}

void tsr_gpu_ctx_set_pipe(tsr_gpu_ctx *gc, tsr_comm *pipe, int prev_peer, int next_peer, int tag) {}

void tsr_gpu_ctx_step_begin(tsr_gpu_ctx *gc) {}

int tsr_gpu_ctx_logits_out(tsr_gpu_ctx *gc, tsr_comm *tp, const int32_t *vocab_begin,
                           const int32_t *vocab_n, int32_t n_want, int tag, float *host_out,
                           int leader_peer, char *err, size_t err_len)
{
    tsr_set_err(err, err_len, "%s", NO_CUDA);
    return -1;
}

int tsr_gpu_ctx_logits_in(tsr_gpu_ctx *gc, int peer, int tag, int32_t n_want, float *host_out,
                          char *err, size_t err_len)
{
    tsr_set_err(err, err_len, "%s", NO_CUDA);
    return -1;
}

tsr_gpu_ctx *tsr_gpu_ctx_of(tsr_ctx *c)
{
    return NULL;
}

int tsr_gpu_attach(tsr_ctx *c, const tsr_model *m, int32_t device, uint64_t n_bytes_cap, char *err,
                   size_t err_len)
{
    tsr_set_err(err, err_len, "%s", NO_CUDA);
    return -1;
}

#endif
