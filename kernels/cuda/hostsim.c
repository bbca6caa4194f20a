/*
 * hostsim.c — cuda_backend.h implemented on the host, for tests only (never linked into
 * tessera): "device memory" is host memory, each operation runs the numerics.h functions in
 * the order its kernel in kernels.cu uses (one warp per matvec row with the lane layout and
 * butterfly of the kernel, the 256-thread RMSNorm tree, the chunked online-softmax
 * attention over 16-position KV blocks, F16 rounding of both GEMM operands on the cuBLAS
 * path).
 *
 * Why: no GPU is available where Tessera is built, so the orchestration of the device
 * forward pass (worker/gpu.c: buffers, the step descriptor, block tables, the order of
 * operations, tensor-parallel sums) is run end to end through this simulator against the
 * CPU backend (tests/test_gpu_sim.c), in both build trees. What it cannot check is the CUDA
 * code itself: launches, thread indexing, shared memory, synchronisation.
 *
 * Errors follow the real backend's wording for the cap ("needs ... MiB of GPU memory").
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/numerics.h"
#include "kernels/quant.h"

struct tsr_cuda_dev {
    int32_t ordinal;
    uint64_t cap, used;
};

static void errf(char *err, size_t err_len, const char *fmt, ...)
{
    if (!err || !err_len) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
}

bool tsr_cuda_built(void)
{
    return true;
}

int32_t tsr_cuda_device_count(char *why, size_t why_len)
{
    (void)why;
    (void)why_len;
    return 1;
}

int32_t tsr_cuda_pick_device(int32_t n_devices)
{
    return n_devices > 0 ? 0 : -1;
}

int tsr_cuda_device_info_get(int32_t ordinal, tsr_cuda_device_info *out, char *err, size_t err_len)
{
    memset(out, 0, sizeof *out);
    out->ordinal = ordinal;
    snprintf(out->name, sizeof out->name, "host simulator");
    return 0;
}

int tsr_cuda_open(int32_t ordinal, uint64_t n_bytes_cap, tsr_cuda_dev **out, char *err,
                  size_t err_len)
{
    tsr_cuda_dev *d = calloc(1, sizeof *d);
    if (!d) {
        errf(err, err_len, "out of host memory");
        return TSR_CUDA_ENOMEM;
    }
    d->ordinal = ordinal;
    d->cap = n_bytes_cap ? n_bytes_cap : (uint64_t)1 << 40;
    *out = d;
    return 0;
}

void tsr_cuda_close(tsr_cuda_dev *d)
{
    free(d);
}

int32_t tsr_cuda_ordinal(const tsr_cuda_dev *d)
{
    return d->ordinal;
}

uint64_t tsr_cuda_n_bytes_used(const tsr_cuda_dev *d)
{
    return d->used;
}

uint64_t tsr_cuda_n_bytes_cap(const tsr_cuda_dev *d)
{
    return d->cap;
}

int tsr_cuda_activate(tsr_cuda_dev *d, char *err, size_t err_len)
{
    return 0;
}

void *tsr_cuda_stream(tsr_cuda_dev *d)
{
    (void)d;
    return NULL;
}

int tsr_cuda_alloc(tsr_cuda_dev *d, size_t n_bytes, const char *what, void **out, char *err,
                   size_t err_len)
{
    *out = NULL;
    if (n_bytes == 0) n_bytes = 1;
    if (d->used + n_bytes > d->cap) {
        errf(err, err_len,
             "%s needs %.1f MiB of GPU memory on CUDA device %d, but %.1f MiB of the %.1f MiB cap "
             "are in use (raise --gpu-memory, or spread the model over more ranks: --tp / --pp)",
             what, n_bytes / 1048576.0, d->ordinal, d->used / 1048576.0, d->cap / 1048576.0);
        return TSR_CUDA_ENOMEM;
    }
    /* poison: a kernel that reads what nobody wrote sees NaN */
    void *p = malloc(n_bytes);
    if (!p) {
        errf(err, err_len, "cudaMalloc(%zu bytes for %s) failed on CUDA device %d (host sim)",
             n_bytes, what, d->ordinal);
        return TSR_CUDA_ENOMEM;
    }
    memset(p, 0xff, n_bytes);
    d->used += n_bytes;
    *out = p;
    return 0;
}

void tsr_cuda_free(tsr_cuda_dev *d, void *p, size_t n_bytes)
{
    if (!p) return;
    free(p);
    if (n_bytes == 0) n_bytes = 1;
    d->used = d->used >= n_bytes ? d->used - n_bytes : 0;
}

int tsr_cuda_upload(tsr_cuda_dev *d, void *dst, const void *src, size_t n, char *err,
                    size_t err_len)
{
    if (n) memcpy(dst, src, n);
    return 0;
}

int tsr_cuda_download(tsr_cuda_dev *d, void *dst, const void *src, size_t n, char *err,
                      size_t err_len)
{
    if (n) memcpy(dst, src, n);
    return 0;
}

int tsr_cuda_copy(tsr_cuda_dev *d, void *dst, const void *src, size_t n, char *err, size_t err_len)
{
    if (n) memmove(dst, src, n);
    return 0;
}

int tsr_cuda_copy_2d(tsr_cuda_dev *d, void *dst, size_t dst_pitch, const void *src,
                     size_t src_pitch, size_t width_bytes, size_t rows, char *err, size_t err_len)
{
    for (size_t r = 0; r < rows; r++)
        memmove((char *)dst + r * dst_pitch, (const char *)src + r * src_pitch, width_bytes);
    return 0;
}

bool tsr_cuda_host_addressable(void)
{
    return true;
}

int tsr_cuda_sync(tsr_cuda_dev *d, char *err, size_t err_len)
{
    return 0;
}

bool tsr_cuda_type_supported(uint32_t type)
{
    return type != TSR_CUDA_Q8_1 && type != TSR_CUDA_Q8_K && tsr_cuda_block_elems(type) > 0;
}

static float warp_sum(float *v)
{
    float nv[32];
    for (int off = 16; off >= 1; off /= 2) {
        for (int l = 0; l < 32; ++l) nv[l] = v[l] + v[l ^ off];
        memcpy(v, nv, sizeof nv);
    }
    return v[0];
}

/* k_quant_32 / k_quant_k: the per-block quantizers (the kernels give the same bytes). */
static void quant_act(uint32_t dt, const float *x, int64_t n, uint8_t *xq)
{
    const int32_t be = tsr_cuda_block_elems(dt), bb = tsr_cuda_block_bytes(dt);
    for (int64_t b = 0; b < n / be; ++b) {
        if (dt == TSR_CUDA_Q8_0) tsr_cuda_quant_q8_0(x + b * be, (tsr_cuda_q8_0 *)(xq + b * bb));
        if (dt == TSR_CUDA_Q8_1) tsr_cuda_quant_q8_1(x + b * be, (tsr_cuda_q8_1 *)(xq + b * bb));
        if (dt == TSR_CUDA_Q8_K) tsr_cuda_quant_q8_K(x + b * be, (tsr_cuda_q8_K *)(xq + b * bb));
    }
}

/* k_matvec: one warp per row, lanes as in kernels.cu */
static float row_dot(uint32_t type, int64_t n, const uint8_t *w, const void *xr)
{
    float lanes[32] = {0};
    const int32_t be = tsr_cuda_block_elems(type), bb = tsr_cuda_block_bytes(type);
    if (be == 1) {
        const float *x = xr;
        for (int64_t i = 0; i < n; ++i)
            lanes[i % 32] += tsr_cuda_dequant(type, w + (size_t)i * bb, 0) * x[i];
    } else if (be == 32) {
        const int32_t xb = tsr_cuda_block_bytes(tsr_cuda_dot_type(type));
        for (int64_t b = 0; b < n / 32; ++b) { /* 4 lanes per block (exact integer parts) */
            const uint8_t *wbk = w + (size_t)b * bb, *xbk = (const uint8_t *)xr + b * xb;
            int32_t si = 0;
            for (int q = 0; q < 4; ++q) si += tsr_cuda_isum_part32(type, wbk, xbk, q);
            lanes[(b % 8) * 4] += tsr_cuda_dot_combine32(type, wbk, xbk, si);
        }
    } else {
        const tsr_cuda_q8_K *x = xr;
        for (int64_t b = 0; b < n / 256; ++b) {
            int32_t si = 0, sm = 0;
            for (int g = 0; g < 8; ++g) {
                int32_t a, c;
                tsr_cuda_dot_group_k(type, w + (size_t)b * bb, &x[b], g, &a, &c);
                si += a;
                sm += c;
            }
            lanes[(b % 4) * 8] += tsr_cuda_dot_combine_k(type, w + (size_t)b * bb, &x[b], si, sm);
        }
    }
    return warp_sum(lanes);
}

static float f16_round(float x)
{
    return tsr_cuda_f16_to_f32(tsr_cuda_f32_to_f16(x));
}

/* TSR_CUDA_GEMM_MIN_TOKENS (environment) overrides the batch size from which matmuls go to
 * cuBLAS (for benchmarks and checks; read once). */
static int32_t tsr_cuda_gemm_min_tokens(void)
{
    static int32_t v = -1;
    if (v < 0) {
        const char *e = getenv("TSR_CUDA_GEMM_MIN_TOKENS");
        const long x = e && *e ? strtol(e, NULL, 10) : 0;
        v = x >= 1 ? (int32_t)x : TSR_CUDA_GEMM_MIN_TOKENS;
    }
    return v;
}

int tsr_cuda_matmul(tsr_cuda_dev *d, const tsr_cuda_weight *w, const float *x, int32_t n_tok,
                    float *y, char *err, size_t err_len)
{
    const int32_t be = tsr_cuda_block_elems(w->type);
    if (!tsr_cuda_type_supported(w->type) || w->n_in % be != 0 || n_tok < 1) {
        errf(err, err_len, "cuda matmul: unsupported weight (type %u) or batch of %d tokens",
             w->type, n_tok);
        return TSR_CUDA_EINVAL;
    }
    const int64_t n = w->n_in;
    const uint8_t *wd = w->data;
    if (n_tok >= tsr_cuda_gemm_min_tokens()) {
        /* cuBLAS: F32 weights in FP32; others F16 operands, FP32 accumulation */
        const int32_t bb = tsr_cuda_block_bytes(w->type);
        float *wr = malloc(sizeof(float) * (size_t)n);
        if (!wr) {
            errf(err, err_len, "out of host memory");
            return TSR_CUDA_ENOMEM;
        }
        for (int64_t r = 0; r < w->n_out; ++r) {
            const uint8_t *row = wd + (size_t)r * w->row_bytes;
            for (int64_t i = 0; i < n; ++i) {
                const float v =
                    tsr_cuda_dequant(w->type, row + (size_t)(i / be) * bb, (int)(i % be));
                wr[i] = w->type == TSR_CUDA_F32 ? v : f16_round(v);
            }
            for (int32_t t = 0; t < n_tok; ++t) {
                double s = 0;
                const float *xt = x + (size_t)t * n;
                for (int64_t i = 0; i < n; ++i)
                    s += (double)wr[i] * (w->type == TSR_CUDA_F32 ? xt[i] : f16_round(xt[i]));
                y[(size_t)t * w->n_out + r] = (float)s;
            }
        }
        free(wr);
        return 0;
    }
    const uint32_t dt = tsr_cuda_dot_type(w->type);
    const size_t xs = be == 1 ? sizeof(float) * (size_t)n
                              : (size_t)(n / tsr_cuda_block_elems(dt)) * tsr_cuda_block_bytes(dt);
    uint8_t *xq = malloc(xs * (size_t)n_tok);
    if (!xq) {
        errf(err, err_len, "out of host memory");
        return TSR_CUDA_ENOMEM;
    }
    for (int32_t t = 0; t < n_tok; ++t) {
        if (be == 1)
            memcpy(xq + t * xs, x + (size_t)t * n, xs);
        else
            quant_act(dt, x + (size_t)t * n, n, xq + t * xs);
    }
    for (int32_t t = 0; t < n_tok; ++t)
        for (int64_t r = 0; r < w->n_out; ++r)
            y[(size_t)t * w->n_out + r] =
                row_dot(w->type, n, wd + (size_t)r * w->row_bytes, xq + t * xs);
    free(xq);
    return 0;
}

int tsr_cuda_embed(tsr_cuda_dev *d, const tsr_cuda_weight *emb, const int32_t *tokens,
                   int32_t n_tok, float *x, char *err, size_t err_len)
{
    const int32_t be = tsr_cuda_block_elems(emb->type), bb = tsr_cuda_block_bytes(emb->type);
    for (int32_t t = 0; t < n_tok; ++t) {
        const int32_t tok = tokens[t];
        const uint8_t *row = (const uint8_t *)emb->data + (size_t)tok * emb->row_bytes;
        for (int64_t i = 0; i < emb->n_in; ++i)
            x[(size_t)t * emb->n_in + i] =
                tok < 0 || tok >= emb->n_out
                    ? NAN
                    : tsr_cuda_dequant(emb->type, row + (size_t)(i / be) * bb, (int)(i % be));
    }
    return 0;
}

int tsr_cuda_rmsnorm(tsr_cuda_dev *d, float *out, const float *x, const float *w, int32_t n_rows,
                     int32_t n, float eps, char *err, size_t err_len)
{
    for (int32_t r = 0; r < n_rows; ++r) {
        const float *xr = x + (size_t)r * n;
        double part[256] = {0};
        for (int32_t i = 0; i < n; ++i) part[i % 256] += (double)xr[i] * xr[i];
        for (int half = 128; half >= 1; half /= 2)
            for (int k = 0; k < half; ++k) part[k] += part[k + half];
        const float sc = tsr_cuda_rms_scale(part[0], n, eps);
        for (int32_t i = 0; i < n; ++i)
            out[(size_t)r * n + i] = tsr_cuda_rms_apply(xr[i], sc, w[i]);
    }
    return 0;
}

int tsr_cuda_rope(tsr_cuda_dev *d, float *x, const int32_t *pos, int32_t n_tok, int32_t n_head,
                  int32_t head_dim, const tsr_cuda_rope_cfg *cfg, const float *ff, char *err,
                  size_t err_len)
{
    if (cfg->n_rot > head_dim || cfg->n_rot % 2 != 0) {
        errf(err, err_len, "cuda rope: n_rot %d, head_dim %d", cfg->n_rot, head_dim);
        return TSR_CUDA_EINVAL;
    }
    const tsr_cuda_rope_params rp = {cfg->mode,
                                     cfg->n_rot,
                                     cfg->freq_base,
                                     cfg->freq_scale,
                                     cfg->ext_factor,
                                     cfg->attn_factor,
                                     {cfg->corr_dims[0], cfg->corr_dims[1]},
                                     cfg->ggml_theta};
    for (int32_t t = 0; t < n_tok; ++t)
        for (int32_t h = 0; h < n_head; ++h) {
            float *v = x + ((size_t)t * n_head + h) * head_dim;
            for (int i0 = 0; i0 < rp.n_rot; i0 += 2) {
                float c, s;
                tsr_cuda_rope_cs(&rp, pos[t], i0, ff ? ff[i0 / 2] : 1.0f, &c, &s);
                int a, b;
                tsr_cuda_rope_pair(rp.mode, rp.n_rot, i0, &a, &b);
                tsr_cuda_rope_rotate(&v[a], &v[b], c, s);
            }
        }
    return 0;
}

int tsr_cuda_glu(tsr_cuda_dev *d, int kind, float *gate, const float *up, int64_t n, char *err,
                 size_t err_len)
{
    for (int64_t i = 0; i < n; ++i)
        gate[i] = kind == TSR_CUDA_GLU_GEGLU ? tsr_cuda_geglu(gate[i], up[i])
                                             : tsr_cuda_swiglu(gate[i], up[i]);
    return 0;
}

int tsr_cuda_add(tsr_cuda_dev *d, float *x, const float *y, int64_t n, char *err, size_t err_len)
{
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];
    return 0;
}

int tsr_cuda_add_rows(tsr_cuda_dev *d, float *x, const float *b, int32_t n_rows, int32_t n,
                      char *err, size_t err_len)
{
    if (!b) return 0;
    for (int64_t i = 0; i < (int64_t)n_rows * n; ++i) x[i] += b[i % n];
    return 0;
}

int tsr_cuda_scale(tsr_cuda_dev *d, float *x, float s, int64_t n, char *err, size_t err_len)
{
    for (int64_t i = 0; i < n; ++i) x[i] *= s;
    return 0;
}

int tsr_cuda_softcap(tsr_cuda_dev *d, float *x, float cap, int64_t n, char *err, size_t err_len)
{
    for (int64_t i = 0; i < n; ++i) x[i] = tsr_cuda_softcap_value(x[i], cap);
    return 0;
}

int tsr_cuda_softmax(tsr_cuda_dev *d, float *x, int32_t n_rows, int32_t n, char *err,
                     size_t err_len)
{
    for (int32_t r = 0; r < n_rows; ++r) {
        float *xr = x + (size_t)r * n, m = -INFINITY, part[256] = {0};
        for (int32_t i = 0; i < n; ++i) m = fmaxf(m, xr[i]);
        for (int32_t i = 0; i < n; ++i) {
            xr[i] = expf(xr[i] - m);
            part[i % 256] += xr[i];
        }
        for (int half = 128; half >= 1; half /= 2)
            for (int k = 0; k < half; ++k) part[k] += part[k + half];
        const float inv = 1.0f / part[0];
        for (int32_t i = 0; i < n; ++i) xr[i] *= inv;
    }
    return 0;
}

/* k_attention_f16 for one (token, head): pass 1 folds every chunk's scores into the
 * online max and sum, pass 2 recomputes them and adds each V row weighted by its fp16
 * probability (numerics.h, "KV cache element types"). Scores as the kernel: q rounded to
 * fp16, lane i % 32 of a warp sums q_i k_i, then the butterfly. */
static void att_head_f16(const tsr_cuda_attn_args *a, const float *q, const int32_t *table,
                         int32_t p_first, int32_t pos, int kvh, float *o)
{
    const int hd = a->head_dim;
    float qh[TSR_CUDA_MAX_HEAD_DIM], acc[TSR_CUDA_MAX_HEAD_DIM] = {0};
    for (int i = 0; i < hd; ++i) qh[i] = tsr_cuda_round_f16(q[i]);
    const int32_t c0 = p_first / TSR_CUDA_KV_BLOCK, c1 = pos / TSR_CUDA_KV_BLOCK + 1;
    tsr_cuda_softmax_state st;
    tsr_cuda_softmax_init(&st);
    float inv = 0.0f;
    for (int pass = 0; pass < 2; ++pass) {
        for (int32_t c = c0; c < c1; ++c) {
            const size_t row0 = (size_t)table[c] * TSR_CUDA_KV_BLOCK;
            float sc[TSR_CUDA_KV_BLOCK], cmax = -INFINITY;
            for (int j = 0; j < TSR_CUDA_KV_BLOCK; ++j) {
                const int32_t p = c * TSR_CUDA_KV_BLOCK + j;
                const uint16_t *kr =
                    (const uint16_t *)a->k_cache + (row0 + j) * a->kv_dim + (size_t)kvh * hd;
                float lanes[32] = {0};
                const bool in = p >= p_first && p <= pos;
                if (in)
                    for (int i = 0; i < hd; ++i)
                        lanes[i % 32] += qh[i] * tsr_cuda_kv_get(TSR_CUDA_KV_F16, kr, i);
                const float s = warp_sum(lanes);
                sc[j] = in ? s * a->scale : -INFINITY;
            }
            if (pass == 0) {
                for (int j = 0; j < TSR_CUDA_KV_BLOCK; ++j) cmax = fmaxf(cmax, sc[j]);
                tsr_cuda_softmax_rescale(&st, cmax);
                for (int j = 0; j < TSR_CUDA_KV_BLOCK; ++j)
                    st.l += tsr_cuda_softmax_weight(&st, sc[j]);
                continue;
            }
            for (int j = 0; j < TSR_CUDA_KV_BLOCK; ++j) {
                const float pw = tsr_cuda_attn_prob_f16(sc[j], st.m, inv);
                if (pw == 0.0f) continue;
                const uint16_t *vr =
                    (const uint16_t *)a->v_cache + (row0 + j) * a->kv_dim + (size_t)kvh * hd;
                for (int i = 0; i < hd; ++i) acc[i] += pw * tsr_cuda_kv_get(TSR_CUDA_KV_F16, vr, i);
            }
        }
        inv = 1.0f / st.l;
    }
    for (int i = 0; i < hd; ++i) o[i] = acc[i];
}

/* k_attention_q8_0 for one (token, head): q quantized to Q8_0, each score from the blocks'
 * integer sums (the kernel's 4 lane quarters, added exactly) in block order; pass 1 the
 * max, pass 2 the sum of exp(s - max) in position order, pass 3 the probabilities and each
 * output value's FMA chain over the positions (numerics.h, "KV cache element types"). */
static void att_head_q8_0(const tsr_cuda_attn_args *a, const float *q, const int32_t *table,
                          int32_t p_first, int32_t pos, int kvh, float *o)
{
    const int hd = a->head_dim, nb = hd / 32;
    const size_t rb = tsr_cuda_kv_row_bytes(TSR_CUDA_KV_Q8_0, a->kv_dim);
    tsr_cuda_q8_0 qq[TSR_CUDA_MAX_HEAD_DIM / 32];
    for (int b = 0; b < nb; ++b) tsr_cuda_quant_q8_0(q + 32 * b, &qq[b]);
    float acc[TSR_CUDA_MAX_HEAD_DIM] = {0};
    float m = -INFINITY, sum = 0.0f, inv = 0.0f;
    const int32_t c0 = p_first / TSR_CUDA_KV_BLOCK, c1 = pos / TSR_CUDA_KV_BLOCK + 1;
    for (int pass = 0; pass < 3; ++pass) {
        for (int32_t c = c0; c < c1; ++c) {
            const size_t row0 = (size_t)table[c] * TSR_CUDA_KV_BLOCK;
            for (int j = 0; j < TSR_CUDA_KV_BLOCK; ++j) {
                const int32_t p = c * TSR_CUDA_KV_BLOCK + j;
                if (p < p_first || p > pos) continue;
                const tsr_cuda_q8_0 *kr =
                    (const tsr_cuda_q8_0 *)((const uint8_t *)a->k_cache + (row0 + j) * rb) +
                    (size_t)kvh * nb;
                int32_t si[TSR_CUDA_MAX_HEAD_DIM / 32];
                for (int b = 0; b < nb; ++b) {
                    si[b] = 0;
                    for (int part = 0; part < 4; ++part)
                        si[b] += tsr_cuda_isum_part32(TSR_CUDA_Q8_0, &kr[b], &qq[b], part);
                }
                const float s = tsr_cuda_kv_q8_0_score(kr, qq, si, nb, a->scale);
                if (pass == 0) {
                    m = s > m ? s : m;
                } else if (pass == 1) {
                    sum += tsr_cuda_attn_exp(s, m);
                } else {
                    const float pw = tsr_cuda_attn_exp(s, m) * inv;
                    const tsr_cuda_q8_0 *vr =
                        (const tsr_cuda_q8_0 *)((const uint8_t *)a->v_cache + (row0 + j) * rb) +
                        (size_t)kvh * nb;
                    for (int i = 0; i < hd; ++i) acc[i] = tsr_cuda_kv_q8_0_v_fma(vr, i, pw, acc[i]);
                }
            }
        }
        if (pass == 1) inv = 1.0f / sum;
    }
    for (int i = 0; i < hd; ++i) o[i] = acc[i];
}

int tsr_cuda_attention(tsr_cuda_dev *d, const tsr_cuda_attn_args *a, char *err, size_t err_len)
{
    if (!tsr_cuda_kv_type_ok(a->kv_type, a->head_dim)) {
        errf(err, err_len,
             "cuda attention: KV type %u with head_dim %d is not supported on the device (f32, "
             "f16, or q8_0 with head_dim a multiple of 32)",
             a->kv_type, a->head_dim);
        return TSR_CUDA_EINVAL;
    }
    if (a->head_dim < 1 || a->head_dim > TSR_CUDA_MAX_HEAD_DIM || a->group < 1) {
        errf(err, err_len, "cuda attention: head_dim %d (max %d), group %d", a->head_dim,
             TSR_CUDA_MAX_HEAD_DIM, a->group);
        return TSR_CUDA_EINVAL;
    }
    const int hd = a->head_dim;
    const int32_t n_split = tsr_cuda_attn_splits(a->n_tok, a->n_head_local, a->max_chunks);
    for (int32_t t = 0; t < a->n_tok; ++t)
        for (int32_t hl = 0; hl < a->n_head_local; ++hl) {
            const int kvh = (a->head_begin + hl) / a->group - a->kv_head_begin;
            const int32_t pos = a->pos[t];
            const int32_t *table = a->tables + (size_t)a->seq[t] * a->max_blocks;
            const int32_t p_first =
                a->window > 0 && pos - a->window + 1 > 0 ? pos - a->window + 1 : 0;
            const float *q = a->q + ((size_t)t * a->n_head_local + hl) * hd;
            if (a->kv_type == TSR_CUDA_KV_Q8_0) {
                att_head_q8_0(a, q, table, p_first, pos, kvh,
                              a->out + ((size_t)t * a->n_head_local + hl) * hd);
                continue;
            }
            if (a->kv_type == TSR_CUDA_KV_F16) {
                att_head_f16(a, q, table, p_first, pos, kvh,
                             a->out + ((size_t)t * a->n_head_local + hl) * hd);
                continue;
            }
            float ms[TSR_CUDA_ATT_MAX_SPLITS], ls[TSR_CUDA_ATT_MAX_SPLITS];
            static float accs[TSR_CUDA_ATT_MAX_SPLITS][TSR_CUDA_MAX_HEAD_DIM];
            for (int32_t sp = 0; sp < n_split; ++sp) {
                int32_t c0, c1;
                tsr_cuda_attn_split_range(p_first / TSR_CUDA_KV_BLOCK, pos / TSR_CUDA_KV_BLOCK, sp,
                                          n_split, &c0, &c1);
                float *acc = accs[sp];
                memset(acc, 0, sizeof(float) * (size_t)hd);
                tsr_cuda_softmax_state st;
                tsr_cuda_softmax_init(&st);
                for (int32_t c = c0; c < c1; ++c) {
                    const size_t row0 = (size_t)table[c] * TSR_CUDA_KV_BLOCK;
                    float sc[TSR_CUDA_KV_BLOCK], cmax = -INFINITY;
                    for (int j = 0; j < TSR_CUDA_KV_BLOCK; ++j) {
                        const int32_t p = c * TSR_CUDA_KV_BLOCK + j;
                        const float *kr =
                            (const float *)a->k_cache + (row0 + j) * a->kv_dim + (size_t)kvh * hd;
                        float lanes[32] = {0};
                        const bool in = p >= p_first && p <= pos;
                        if (in)
                            for (int i = 0; i < hd; ++i) lanes[i % 32] += q[i] * kr[i];
                        const float s = warp_sum(lanes);
                        sc[j] = in ? s * a->scale : -INFINITY;
                    }
                    for (int j = 0; j < TSR_CUDA_KV_BLOCK; ++j) cmax = fmaxf(cmax, sc[j]);
                    const float corr = tsr_cuda_softmax_rescale(&st, cmax);
                    for (int i = 0; i < hd; ++i) acc[i] *= corr;
                    for (int j = 0; j < TSR_CUDA_KV_BLOCK; ++j) {
                        const float pw = tsr_cuda_softmax_weight(&st, sc[j]);
                        st.l += pw;
                        if (pw == 0.0f) continue;
                        const float *vr =
                            (const float *)a->v_cache + (row0 + j) * a->kv_dim + (size_t)kvh * hd;
                        for (int i = 0; i < hd; ++i) acc[i] += pw * vr[i];
                    }
                }
                ms[sp] = st.m;
                ls[sp] = st.l;
            }
            float *o = a->out + ((size_t)t * a->n_head_local + hl) * hd;
            if (n_split == 1) {
                for (int i = 0; i < hd; ++i) o[i] = accs[0][i] / ls[0];
                continue;
            }
            /* k_attn_merge */
            float m = -INFINITY, l = 0.0f;
            for (int32_t sp = 0; sp < n_split; ++sp) m = fmaxf(m, ms[sp]);
            for (int32_t sp = 0; sp < n_split; ++sp)
                l += ls[sp] * tsr_cuda_attn_merge_factor(ms[sp], m);
            for (int i = 0; i < hd; ++i) {
                float v = 0.0f;
                for (int32_t sp = 0; sp < n_split; ++sp)
                    v += accs[sp][i] * tsr_cuda_attn_merge_factor(ms[sp], m);
                o[i] = v / l;
            }
        }
    return 0;
}

int tsr_cuda_kv_store(tsr_cuda_dev *d, void *k_cache, void *v_cache, const float *k, const float *v,
                      const int32_t *rows, int32_t n_tok, int32_t kv_dim, uint32_t kv_type,
                      char *err, size_t err_len)
{
    const size_t rb = tsr_cuda_kv_row_bytes(kv_type, kv_dim);
    if (!rb) {
        errf(err, err_len,
             "cuda kv store: KV type %u with rows of %d values is not supported on the device",
             kv_type, kv_dim);
        return TSR_CUDA_EINVAL;
    }
    for (int32_t t = 0; t < n_tok; ++t) {
        uint8_t *kr = (uint8_t *)k_cache + (size_t)rows[t] * rb;
        uint8_t *vr = (uint8_t *)v_cache + (size_t)rows[t] * rb;
        if (kv_type == TSR_CUDA_KV_Q8_0) { /* k_kv_store_q8_0: one warp per block */
            for (int32_t b = 0; b < kv_dim / 32; ++b) {
                tsr_cuda_quant_q8_0(k + (size_t)t * kv_dim + 32 * b, (tsr_cuda_q8_0 *)kr + b);
                tsr_cuda_quant_q8_0(v + (size_t)t * kv_dim + 32 * b, (tsr_cuda_q8_0 *)vr + b);
            }
            continue;
        }
        for (int32_t i = 0; i < kv_dim; ++i) {
            tsr_cuda_kv_put(kv_type, kr, i, k[(size_t)t * kv_dim + i]);
            tsr_cuda_kv_put(kv_type, vr, i, v[(size_t)t * kv_dim + i]);
        }
    }
    return 0;
}

int tsr_cuda_gather_rows(tsr_cuda_dev *d, float *dst, const float *src, const int32_t *idx,
                         int32_t n_rows, int32_t n, char *err, size_t err_len)
{
    for (int32_t r = 0; r < n_rows; ++r)
        memcpy(dst + (size_t)r * n, src + (size_t)idx[r] * n, sizeof(float) * (size_t)n);
    return 0;
}
