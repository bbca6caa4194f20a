/*
 * kernels.cu — the device kernels of the forward pass and their launchers (the operations
 * of cuda_backend.h). The arithmetic of each kernel is in numerics.h (host-tested); this
 * file holds the parallel structure, which tests/test_cuda_numerics.c emulates lane by lane
 * where the summation order matters (warp butterflies, chunked online softmax).
 *
 * Matvec (decode, speculative verification, batches below TSR_CUDA_GEMM_MIN_TOKENS): the
 * activations are quantized once per token into the weight type's dot type (Q8_0 / Q8_1 /
 * Q8_K, the bytes the CPU makes), then one warp per weight row reads the quantized blocks
 * in place: lanes 4k..4k+3 share block k, k+8, ... (32-element types, a quarter block each;
 * K-quants: lanes 8k..8k+7 share super-block k, k+4, ..., one 32-group each), the integer
 * partial sums of a block added with shuffles (exact), a butterfly adds the lanes. Float weights:
 * lane l takes elements l, l+32, ....
 *
 * Compiled with --fmad=false (see numerics.h: no FMA contraction, so the host test's
 * results are the device's).
 */
#include <cuda_fp16.h>
#include <math.h>
#include <stdlib.h>

#include "kernels/cuda/internal.h"
#include "kernels/cuda/numerics.h"

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_sum(float v)
{
    for (int off = 16; off >= 1; off /= 2) v += __shfl_xor_sync(FULL_MASK, v, off);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
    for (int off = 16; off >= 1; off /= 2) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, off));
    return v;
}

__device__ __forceinline__ int32_t warp_isum(int32_t v, int width)
{
    for (int off = width / 2; off >= 1; off /= 2) v += __shfl_xor_sync(FULL_MASK, v, off);
    return v;
}

/* Blocks for n elements of a grid-stride loop, at most cap. */
static unsigned grid_cap(int64_t n, int threads, int64_t cap)
{
    const int64_t b = (n + threads - 1) / threads;
    return (unsigned)(b > cap ? cap : b < 1 ? 1 : b);
}

/* ---- activation quantization: one warp per block -------------------------------------- */

__global__ void k_quant_32(uint32_t dt, const float *x, int64_t n, uint8_t *xq, size_t xq_stride,
                           int32_t n_tok)
{
    const int lane = threadIdx.x % 32;
    const int64_t nb = n / 32;
    const int64_t gw = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int32_t t = blockIdx.y;
    if (gw >= nb || t >= n_tok) return;
    const float v = x[(size_t)t * n + gw * 32 + lane];
    const float amax = warp_max(fabsf(v));
    float d, id;
    tsr_cuda_q8_0_scale(amax, &d, &id);
    const int8_t q = tsr_cuda_q8_0_elem(v, id);
    uint8_t *row = xq + (size_t)t * xq_stride;
    if (dt == TSR_CUDA_Q8_0) {
        tsr_cuda_q8_0 *b = (tsr_cuda_q8_0 *)(row + gw * sizeof(tsr_cuda_q8_0));
        b->qs[lane] = q;
        if (lane == 0) b->d = tsr_cuda_f32_to_f16(d);
    } else {
        tsr_cuda_q8_1 *b = (tsr_cuda_q8_1 *)(row + gw * sizeof(tsr_cuda_q8_1));
        const int32_t sum = warp_isum(q, 32);
        b->qs[lane] = q;
        if (lane == 0) {
            b->d = tsr_cuda_f32_to_f16(d);
            b->s = tsr_cuda_q8_1_s(sum, d);
        }
    }
}

__global__ void k_quant_k(const float *x, int64_t n, uint8_t *xq, size_t xq_stride, int32_t n_tok)
{
    const int lane = threadIdx.x % 32;
    const int64_t nb = n / 256;
    const int64_t gw = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int32_t t = blockIdx.y;
    if (gw >= nb || t >= n_tok) return;
    const float *xb = x + (size_t)t * n + gw * 256;
    float v[8];
    int best = lane;
    for (int k = 0; k < 8; ++k) {
        v[k] = xb[lane + 32 * k];
        if (tsr_cuda_amax_pick(v[k], lane + 32 * k, xb[best], best)) best = lane + 32 * k;
    }
    float bv = xb[best];
    for (int off = 16; off >= 1; off /= 2) {
        const float ov = __shfl_xor_sync(FULL_MASK, bv, off);
        const int oi = __shfl_xor_sync(FULL_MASK, best, off);
        if (tsr_cuda_amax_pick(ov, oi, bv, best)) {
            bv = ov;
            best = oi;
        }
    }
    tsr_cuda_q8_K *b = (tsr_cuda_q8_K *)(xq + (size_t)t * xq_stride + gw * sizeof(tsr_cuda_q8_K));
    if (fabsf(bv) == 0.0f) {
        for (int k = 0; k < 8; ++k) b->qs[lane + 32 * k] = 0;
        if (lane < 16) b->bsums[lane] = 0;
        if (lane == 0) b->d = 0.0f;
        return;
    }
    const float iscale = -127.f / bv;
    for (int k = 0; k < 8; ++k) {
        const int8_t q = tsr_cuda_q8_K_elem(v[k], iscale);
        b->qs[lane + 32 * k] = q;
        /* element lane + 32k is in 16-group 2k + lane/16: add over the half-warp */
        const int32_t s = warp_isum(q, 16);
        if ((lane % 16) == 0) b->bsums[2 * k + lane / 16] = (int16_t)s;
    }
    if (lane == 0) b->d = 1 / iscale;
}

/* ---- matvec: one warp per row ---------------------------------------------------------- */

/* KIND 0: float weights (x float); 1: 32-element blocks; 2: K-quants. */
template <int KIND>
__global__ void k_matvec(uint32_t type, const uint8_t *w, size_t row_bytes, int64_t n_out,
                         int64_t n_in, const void *x, size_t x_stride, int32_t n_tok, float *y)
{
    const int lane = threadIdx.x % 32;
    const int64_t r = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int32_t t = blockIdx.y;
    if (r >= n_out || t >= n_tok) return;
    const uint8_t *wr = w + (size_t)r * row_bytes;
    const uint8_t *xr = (const uint8_t *)x + (size_t)t * x_stride;
    float acc = 0.0f;
    if (KIND == 0) {
        const int32_t bb = tsr_cuda_block_bytes(type);
        const float *xf = (const float *)xr;
        for (int64_t i = lane; i < n_in; i += 32)
            acc += tsr_cuda_dequant(type, wr + (size_t)i * bb, 0) * xf[i];
    } else if (KIND == 1) {
        /* lanes 4k..4k+3 share block b0 + k (a quarter each: adjacent bytes, so one load
         * instruction of the warp covers 8 consecutive blocks); blocks b0 + 8i */
        const int32_t bb = tsr_cuda_block_bytes(type);
        const int32_t xb = tsr_cuda_block_bytes(tsr_cuda_dot_type(type));
        const int64_t nb = n_in / 32;
        const int part = lane % 4;
        for (int64_t b0 = 0; b0 < nb; b0 += 8) {
            const int64_t b = b0 + lane / 4;
            int32_t si = 0;
            if (b < nb)
                si = tsr_cuda_isum_part32(type, wr + (size_t)b * bb, xr + (size_t)b * xb, part);
            si = warp_isum(si, 4);
            if (b < nb && part == 0)
                acc += tsr_cuda_dot_combine32(type, wr + (size_t)b * bb, xr + (size_t)b * xb, si);
        }
    } else {
        const int32_t bb = tsr_cuda_block_bytes(type);
        const int64_t nb = n_in / 256;
        const int g = lane % 8;
        /* every lane runs the same trip count so the shuffles see all 32 lanes */
        for (int64_t b0 = 0; b0 < nb; b0 += 4) {
            const int64_t b = b0 + lane / 8;
            int32_t si = 0, sm = 0;
            const tsr_cuda_q8_K *xk = (const tsr_cuda_q8_K *)xr + b;
            if (b < nb) tsr_cuda_dot_group_k(type, wr + (size_t)b * bb, xk, g, &si, &sm);
            si = warp_isum(si, 8);
            sm = warp_isum(sm, 8);
            if (b < nb && g == 0)
                acc += tsr_cuda_dot_combine_k(type, wr + (size_t)b * bb, xk, si, sm);
        }
    }
    acc = warp_sum(acc);
    if (lane == 0) y[(size_t)t * n_out + r] = acc;
}

/* ---- cuBLAS path helpers ------------------------------------------------------------- */

__global__ void k_f32_to_f16(const float *x, __half *y, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] = __float2half_rn(x[i]);
}

/* rows [r0, r0 + n_rows) of w dequantized (numerics.h, exact) then rounded to F16 */
__global__ void k_dequant_f16(uint32_t type, const uint8_t *w, size_t row_bytes, int64_t n_in,
                              int64_t r0, int64_t n_rows, __half *tile)
{
    const int32_t be = tsr_cuda_block_elems(type), bb = tsr_cuda_block_bytes(type);
    const int64_t total = n_rows * n_in;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / n_in, c = i % n_in;
        const uint8_t *blk = w + (size_t)(r0 + r) * row_bytes + (size_t)(c / be) * bb;
        tile[i] = __float2half_rn(tsr_cuda_dequant(type, blk, (int)(c % be)));
    }
}

static int cublas_fail(tsr_cuda_dev *d, cublasStatus_t s, const char *call, char *err,
                       size_t err_len)
{
    tsr_cuda_errf(err, err_len, "%s failed on CUDA device %d: %s (%s)", call, d->ordinal,
                  d->blas->status_name(s), d->blas->status_string(s));
    return TSR_CUDA_ERR;
}

#define CUBLAS_CHECK(call)                                                                         \
    do {                                                                                           \
        cublasStatus_t s_ = (call);                                                                \
        if (s_ != CUBLAS_STATUS_SUCCESS) return cublas_fail(d, s_, #call, err, err_len);           \
    } while (0)

static int matmul_cublas(tsr_cuda_dev *d, const tsr_cuda_weight *w, const float *x, int32_t n_tok,
                         float *y, char *err, size_t err_len)
{
    const float one = 1.0f, zero = 0.0f;
    const int n_in = (int)w->n_in, n_out = (int)w->n_out;
    if (w->type == TSR_CUDA_F32) {
        /* y^T (n_out x n_tok, col-major) = W (rows of n_in: col-major n_in x n_out, op T) x^T */
        CUBLAS_CHECK(d->blas->sgemm(d->cublas, CUBLAS_OP_T, CUBLAS_OP_N, n_out, n_tok, n_in, &one,
                                    (const float *)w->data, n_in, x, n_in, &zero, y, n_out));
        return 0;
    }
    const size_t xh_bytes = sizeof(__half) * (size_t)n_tok * (size_t)n_in;
    if (tsr_cuda_scratch(d, &d->xh, &d->xh_bytes, xh_bytes, "F16 activations", err, err_len) != 0)
        return TSR_CUDA_ENOMEM;
    const int64_t nx = (int64_t)n_tok * n_in;
    k_f32_to_f16<<<grid_cap(nx, 256, 4096), 256, 0, d->stream>>>(x, (__half *)d->xh, nx);
    if (tsr_cuda_launched(d, "k_f32_to_f16", err, err_len) != 0) return TSR_CUDA_ERR;
    if (w->type == TSR_CUDA_F16) {
        CUBLAS_CHECK(d->blas->gemm_ex(d->cublas, CUBLAS_OP_T, CUBLAS_OP_N, n_out, n_tok, n_in, &one,
                                      w->data, CUDA_R_16F, n_in, d->xh, CUDA_R_16F, n_in, &zero, y,
                                      CUDA_R_32F, n_out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        return 0;
    }
    int64_t rows_per_tile = (int64_t)(TSR_CUDA_TILE_BYTES / (sizeof(__half) * (size_t)n_in));
    if (rows_per_tile > n_out) rows_per_tile = n_out;
    if (rows_per_tile < 1) rows_per_tile = 1;
    const size_t tile_bytes = sizeof(__half) * (size_t)rows_per_tile * (size_t)n_in;
    if (tsr_cuda_scratch(d, &d->tile, &d->tile_bytes, tile_bytes, "F16 weight tile", err,
                         err_len) != 0)
        return TSR_CUDA_ENOMEM;
    for (int64_t r0 = 0; r0 < n_out; r0 += rows_per_tile) {
        const int64_t nr = n_out - r0 < rows_per_tile ? n_out - r0 : rows_per_tile;
        const int64_t ne = nr * n_in;
        const unsigned blocks = grid_cap(ne, 256, 8192);
        k_dequant_f16<<<blocks, 256, 0, d->stream>>>(w->type, (const uint8_t *)w->data,
                                                     w->row_bytes, n_in, r0, nr, (__half *)d->tile);
        if (tsr_cuda_launched(d, "k_dequant_f16", err, err_len) != 0) return TSR_CUDA_ERR;
        CUBLAS_CHECK(d->blas->gemm_ex(d->cublas, CUBLAS_OP_T, CUBLAS_OP_N, (int)nr, n_tok, n_in,
                                      &one, d->tile, CUDA_R_16F, n_in, d->xh, CUDA_R_16F, n_in,
                                      &zero, y + r0, CUDA_R_32F, n_out, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
    }
    return 0;
}

extern "C" bool tsr_cuda_type_supported(uint32_t type)
{
    return type != TSR_CUDA_Q8_1 && type != TSR_CUDA_Q8_K && tsr_cuda_block_elems(type) > 0;
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

extern "C" int tsr_cuda_matmul(tsr_cuda_dev *d, const tsr_cuda_weight *w, const float *x,
                               int32_t n_tok, float *y, char *err, size_t err_len)
{
    const int32_t be = tsr_cuda_block_elems(w->type);
    if (!tsr_cuda_type_supported(w->type) || w->n_in % be != 0 || n_tok < 1 ||
        w->n_in > INT32_MAX || w->n_out > INT32_MAX || n_tok > 65535) {
        tsr_cuda_errf(
            err, err_len,
            "cuda matmul: unsupported weight (type %u, %lld x %lld) or batch of %d tokens", w->type,
            (long long)w->n_in, (long long)w->n_out, n_tok);
        return TSR_CUDA_EINVAL;
    }
    if (n_tok >= tsr_cuda_gemm_min_tokens()) return matmul_cublas(d, w, x, n_tok, y, err, err_len);
    const int threads = 256, warps = threads / 32;
    const dim3 grid((unsigned)((w->n_out + warps - 1) / warps), (unsigned)n_tok);
    if (be == 1) {
        k_matvec<0><<<grid, threads, 0, d->stream>>>(w->type, (const uint8_t *)w->data,
                                                     w->row_bytes, w->n_out, w->n_in, x,
                                                     sizeof(float) * (size_t)w->n_in, n_tok, y);
        return tsr_cuda_launched(d, "k_matvec<float>", err, err_len);
    }
    const uint32_t dt = tsr_cuda_dot_type(w->type);
    const size_t xq_stride =
        (size_t)(w->n_in / tsr_cuda_block_elems(dt)) * tsr_cuda_block_bytes(dt);
    if (tsr_cuda_scratch(d, &d->xq, &d->xq_bytes, xq_stride * (size_t)n_tok,
                         "quantized activations", err, err_len) != 0)
        return TSR_CUDA_ENOMEM;
    const int64_t nb = w->n_in / tsr_cuda_block_elems(dt);
    const dim3 qgrid((unsigned)((nb + warps - 1) / warps), (unsigned)n_tok);
    if (dt == TSR_CUDA_Q8_K)
        k_quant_k<<<qgrid, threads, 0, d->stream>>>(x, w->n_in, (uint8_t *)d->xq, xq_stride, n_tok);
    else
        k_quant_32<<<qgrid, threads, 0, d->stream>>>(dt, x, w->n_in, (uint8_t *)d->xq, xq_stride,
                                                     n_tok);
    if (tsr_cuda_launched(d, "k_quant", err, err_len) != 0) return TSR_CUDA_ERR;
    if (be == 32)
        k_matvec<1><<<grid, threads, 0, d->stream>>>(w->type, (const uint8_t *)w->data,
                                                     w->row_bytes, w->n_out, w->n_in, d->xq,
                                                     xq_stride, n_tok, y);
    else
        k_matvec<2><<<grid, threads, 0, d->stream>>>(w->type, (const uint8_t *)w->data,
                                                     w->row_bytes, w->n_out, w->n_in, d->xq,
                                                     xq_stride, n_tok, y);
    return tsr_cuda_launched(d, "k_matvec", err, err_len);
}

/* ---- embedding, norms, rope, gated units, elementwise ------------------------------------ */

__global__ void k_embed(uint32_t type, const uint8_t *emb, size_t row_bytes, int64_t n_rows,
                        int64_t n, const int32_t *tokens, float *x)
{
    const int32_t t = blockIdx.x;
    const int32_t tok = tokens[t];
    const int32_t be = tsr_cuda_block_elems(type), bb = tsr_cuda_block_bytes(type);
    if (tok < 0 || tok >= n_rows) { /* checked on the host; a NaN row makes a miss visible */
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) x[(size_t)t * n + i] = NAN;
        return;
    }
    const uint8_t *row = emb + (size_t)tok * row_bytes;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        x[(size_t)t * n + i] = tsr_cuda_dequant(type, row + (size_t)(i / be) * bb, (int)(i % be));
}

/* 256 threads per row: strided double partial sums, then a tree (test_rmsnorm emulates it) */
__global__ void k_rmsnorm(float *out, const float *x, const float *w, int32_t n, float eps)
{
    __shared__ double part[256];
    const size_t r = blockIdx.x;
    const float *xr = x + r * (size_t)n;
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += 256) s += (double)xr[i] * xr[i];
    part[threadIdx.x] = s;
    __syncthreads();
    for (int half = 128; half >= 1; half /= 2) {
        if ((int)threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
        __syncthreads();
    }
    const float sc = tsr_cuda_rms_scale(part[0], n, eps);
    for (int i = threadIdx.x; i < n; i += 256)
        out[r * (size_t)n + i] = tsr_cuda_rms_apply(xr[i], sc, w[i]);
}

__global__ void k_rope(float *x, const int32_t *pos, int32_t n_head, int32_t hd,
                       tsr_cuda_rope_params rp, const float *ff)
{
    const int32_t t = blockIdx.x, h = blockIdx.y;
    float *v = x + ((size_t)t * n_head + h) * hd;
    for (int i0 = 2 * threadIdx.x; i0 < rp.n_rot; i0 += 2 * blockDim.x) {
        float c, s;
        tsr_cuda_rope_cs(&rp, pos[t], i0, ff ? ff[i0 / 2] : 1.0f, &c, &s);
        int a, b;
        tsr_cuda_rope_pair(rp.mode, rp.n_rot, i0, &a, &b);
        tsr_cuda_rope_rotate(&v[a], &v[b], c, s);
    }
}

__global__ void k_glu(int kind, float *g, const float *u, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        g[i] =
            kind == TSR_CUDA_GLU_GEGLU ? tsr_cuda_geglu(g[i], u[i]) : tsr_cuda_swiglu(g[i], u[i]);
}

__global__ void k_add(float *x, const float *y, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] += y[i];
}

__global__ void k_add_rows(float *x, const float *b, int64_t n_rows, int32_t n)
{
    const int64_t total = n_rows * n;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] += b[i % n];
}

__global__ void k_softcap(float *x, float cap, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] = tsr_cuda_softcap_value(x[i], cap);
}

__global__ void k_scale(float *x, float s, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] *= s;
}

/* one block of 256 per row: max, then exp and a float sum (strided partials, tree) */
__global__ void k_softmax(float *x, int32_t n)
{
    __shared__ float red[256];
    float *xr = x + (size_t)blockIdx.x * n;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += 256) m = fmaxf(m, xr[i]);
    red[threadIdx.x] = m;
    __syncthreads();
    for (int half = 128; half >= 1; half /= 2) {
        if ((int)threadIdx.x < half)
            red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + half]);
        __syncthreads();
    }
    m = red[0];
    __syncthreads();
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += 256) {
        xr[i] = expf(xr[i] - m);
        s += xr[i];
    }
    red[threadIdx.x] = s;
    __syncthreads();
    for (int half = 128; half >= 1; half /= 2) {
        if ((int)threadIdx.x < half) red[threadIdx.x] += red[threadIdx.x + half];
        __syncthreads();
    }
    const float inv = 1.0f / red[0];
    for (int i = threadIdx.x; i < n; i += 256) xr[i] *= inv;
}

__global__ void k_kv_store(void *kc, void *vc, const float *k, const float *v, const int32_t *rows,
                           int32_t kv_dim, uint32_t kv_type)
{
    const int32_t t = blockIdx.x;
    const size_t rb = tsr_cuda_kv_row_bytes(kv_type, kv_dim);
    uint8_t *kr = (uint8_t *)kc + (size_t)rows[t] * rb;
    uint8_t *vr = (uint8_t *)vc + (size_t)rows[t] * rb;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        tsr_cuda_kv_put(kv_type, kr, i, k[(size_t)t * kv_dim + i]);
        tsr_cuda_kv_put(kv_type, vr, i, v[(size_t)t * kv_dim + i]);
    }
}

/* Q8_0 KV rows: one warp per 32-value block of K or V (lane j: value j), the block's max |x|
 * with a warp max (exact in any order), then tsr_cuda_quant_q8_0's steps per value: the
 * bytes the CPU's tsr_kv_store writes. */
__global__ void k_kv_store_q8_0(void *kc, void *vc, const float *k, const float *v,
                                const int32_t *rows, int32_t kv_dim)
{
    const int32_t t = blockIdx.x;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    const int32_t nb = kv_dim / 32;
    const size_t rb = tsr_cuda_kv_row_bytes(TSR_CUDA_KV_Q8_0, kv_dim);
    for (int32_t g = warp; g < 2 * nb; g += n_warps) {
        const bool is_v = g >= nb;
        const int32_t b = is_v ? g - nb : g;
        const float x = (is_v ? v : k)[(size_t)t * kv_dim + 32 * b + lane];
        const float amax = warp_max(fabsf(x));
        float d, id;
        tsr_cuda_q8_0_scale(amax, &d, &id);
        tsr_cuda_q8_0 *blk =
            (tsr_cuda_q8_0 *)((uint8_t *)(is_v ? vc : kc) + (size_t)rows[t] * rb) + b;
        blk->qs[lane] = tsr_cuda_q8_0_elem(x, id);
        if (lane == 0) blk->d = tsr_cuda_f32_to_f16(d);
    }
}

__global__ void k_gather_rows(float *dst, const float *src, const int32_t *idx, int32_t n)
{
    const int32_t r = blockIdx.x;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        dst[(size_t)r * n + i] = src[(size_t)idx[r] * n + i];
}

/* ---- paged attention ------------------------------------------------------------------
 * One block of 128 threads per (token, local head, split). The KV positions are visited one
 * 16-position KV block (chunk) at a time: warp w scores positions w, w+4, w+8, w+12 of the
 * chunk (lanes split the head dimension, butterfly sum), then every thread folds the chunk
 * into its copy of the online-softmax state (identical in all threads) and into the output
 * dimensions it owns (threadIdx.x + 128 k). With one split the block writes the output;
 * with several (decode of long contexts: few (token, head) pairs, many chunks) each writes
 * its state (m, l, acc) to part[], and k_attn_merge combines them in split order. */
#define ATT_THREADS 128
#define ATT_DIMS    (TSR_CUDA_MAX_HEAD_DIM / ATT_THREADS)

__global__ void k_attention(tsr_cuda_attn_args a, int32_t n_split, float *part)
{
    __shared__ float qs[TSR_CUDA_MAX_HEAD_DIM];
    __shared__ float sc[TSR_CUDA_KV_BLOCK];
    const int32_t t = blockIdx.x, hl = blockIdx.y, split = blockIdx.z;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int hd = a.head_dim;
    const int kvh = (a.head_begin + hl) / a.group - a.kv_head_begin;
    const int32_t pos = a.pos[t];
    const int32_t *table = a.tables + (size_t)a.seq[t] * a.max_blocks;
    const int32_t p_first = a.window > 0 && pos - a.window + 1 > 0 ? pos - a.window + 1 : 0;
    int32_t c0, c1;
    tsr_cuda_attn_split_range(p_first / TSR_CUDA_KV_BLOCK, pos / TSR_CUDA_KV_BLOCK, split, n_split,
                              &c0, &c1);
    const float *q = a.q + ((size_t)t * a.n_head_local + hl) * hd;
    for (int i = threadIdx.x; i < hd; i += ATT_THREADS) qs[i] = q[i];
    float acc[ATT_DIMS];
    for (int k = 0; k < ATT_DIMS; ++k) acc[k] = 0.0f;
    tsr_cuda_softmax_state st;
    tsr_cuda_softmax_init(&st);
    __syncthreads();
    for (int32_t c = c0; c < c1; ++c) {
        const size_t row0 = (size_t)table[c] * TSR_CUDA_KV_BLOCK;
        for (int j = warp; j < TSR_CUDA_KV_BLOCK; j += ATT_THREADS / 32) {
            const int32_t p = c * TSR_CUDA_KV_BLOCK + j;
            const float *kr = (const float *)a.k_cache + (row0 + j) * a.kv_dim + (size_t)kvh * hd;
            float s = 0.0f;
            if (p >= p_first && p <= pos)
                for (int i = lane; i < hd; i += 32) s += qs[i] * kr[i];
            s = warp_sum(s);
            if (lane == 0) sc[j] = (p >= p_first && p <= pos) ? s * a.scale : -INFINITY;
        }
        __syncthreads();
        float cmax = -INFINITY;
        for (int j = 0; j < TSR_CUDA_KV_BLOCK; ++j) cmax = fmaxf(cmax, sc[j]);
        const float corr = tsr_cuda_softmax_rescale(&st, cmax);
        for (int k = 0; k < ATT_DIMS; ++k) acc[k] *= corr;
        for (int j = 0; j < TSR_CUDA_KV_BLOCK; ++j) {
            const float pw = tsr_cuda_softmax_weight(&st, sc[j]);
            st.l += pw;
            if (pw == 0.0f) continue;
            const float *vr = (const float *)a.v_cache + (row0 + j) * a.kv_dim + (size_t)kvh * hd;
            for (int k = 0; k < ATT_DIMS; ++k) {
                const int i = threadIdx.x + ATT_THREADS * k;
                if (i < hd) acc[k] += pw * vr[i];
            }
        }
        __syncthreads(); /* sc is rewritten by the next chunk */
    }
    if (n_split == 1) {
        float *o = a.out + ((size_t)t * a.n_head_local + hl) * hd;
        for (int k = 0; k < ATT_DIMS; ++k) {
            const int i = threadIdx.x + ATT_THREADS * k;
            if (i < hd) o[i] = acc[k] / st.l;
        }
        return;
    }
    /* part: [n_tok][n_head_local][n_split][2 + head_dim] = m, l, acc */
    float *pp = part + (((size_t)t * a.n_head_local + hl) * n_split + split) * (size_t)(2 + hd);
    if (threadIdx.x == 0) {
        pp[0] = st.m;
        pp[1] = st.l;
    }
    for (int k = 0; k < ATT_DIMS; ++k) {
        const int i = threadIdx.x + ATT_THREADS * k;
        if (i < hd) pp[2 + i] = acc[k];
    }
}

/* fp16 KV (numerics.h, "KV cache element types"): one block of 128 threads per (token,
 * local head), never split. Pass 1 folds the chunks' scores into the online max and sum;
 * pass 2 recomputes the scores and adds each V row weighted by its fp16 probability
 * exp(s - m) / l. Scores as k_attention, from q rounded to fp16 and fp16 K. */
__global__ void k_attention_f16(tsr_cuda_attn_args a)
{
    __shared__ float qs[TSR_CUDA_MAX_HEAD_DIM];
    __shared__ float sc[TSR_CUDA_KV_BLOCK];
    const int32_t t = blockIdx.x, hl = blockIdx.y;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int hd = a.head_dim;
    const int kvh = (a.head_begin + hl) / a.group - a.kv_head_begin;
    const int32_t pos = a.pos[t];
    const int32_t *table = a.tables + (size_t)a.seq[t] * a.max_blocks;
    const int32_t p_first = a.window > 0 && pos - a.window + 1 > 0 ? pos - a.window + 1 : 0;
    const int32_t c0 = p_first / TSR_CUDA_KV_BLOCK, c1 = pos / TSR_CUDA_KV_BLOCK + 1;
    const float *q = a.q + ((size_t)t * a.n_head_local + hl) * hd;
    for (int i = threadIdx.x; i < hd; i += ATT_THREADS) qs[i] = tsr_cuda_round_f16(q[i]);
    float acc[ATT_DIMS];
    for (int k = 0; k < ATT_DIMS; ++k) acc[k] = 0.0f;
    tsr_cuda_softmax_state st;
    tsr_cuda_softmax_init(&st);
    float inv = 0.0f;
    __syncthreads();
    for (int pass = 0; pass < 2; ++pass) {
        for (int32_t c = c0; c < c1; ++c) {
            const size_t row0 = (size_t)table[c] * TSR_CUDA_KV_BLOCK;
            for (int j = warp; j < TSR_CUDA_KV_BLOCK; j += ATT_THREADS / 32) {
                const int32_t p = c * TSR_CUDA_KV_BLOCK + j;
                const uint16_t *kr =
                    (const uint16_t *)a.k_cache + (row0 + j) * a.kv_dim + (size_t)kvh * hd;
                float s = 0.0f;
                if (p >= p_first && p <= pos)
                    for (int i = lane; i < hd; i += 32)
                        s += qs[i] * tsr_cuda_kv_get(TSR_CUDA_KV_F16, kr, i);
                s = warp_sum(s);
                if (lane == 0) sc[j] = (p >= p_first && p <= pos) ? s * a.scale : -INFINITY;
            }
            __syncthreads();
            if (pass == 0) {
                float cmax = -INFINITY;
                for (int j = 0; j < TSR_CUDA_KV_BLOCK; ++j) cmax = fmaxf(cmax, sc[j]);
                tsr_cuda_softmax_rescale(&st, cmax);
                for (int j = 0; j < TSR_CUDA_KV_BLOCK; ++j)
                    st.l += tsr_cuda_softmax_weight(&st, sc[j]);
            } else {
                for (int j = 0; j < TSR_CUDA_KV_BLOCK; ++j) {
                    const float pw = tsr_cuda_attn_prob_f16(sc[j], st.m, inv);
                    if (pw == 0.0f) continue;
                    const uint16_t *vr =
                        (const uint16_t *)a.v_cache + (row0 + j) * a.kv_dim + (size_t)kvh * hd;
                    for (int k = 0; k < ATT_DIMS; ++k) {
                        const int i = threadIdx.x + ATT_THREADS * k;
                        if (i < hd) acc[k] += pw * tsr_cuda_kv_get(TSR_CUDA_KV_F16, vr, i);
                    }
                }
            }
            __syncthreads(); /* sc is rewritten by the next chunk */
        }
        inv = 1.0f / st.l;
    }
    float *o = a.out + ((size_t)t * a.n_head_local + hl) * hd;
    for (int k = 0; k < ATT_DIMS; ++k) {
        const int i = threadIdx.x + ATT_THREADS * k;
        if (i < hd) o[i] = acc[k];
    }
}

/* Q8_0 KV (numerics.h, "KV cache element types"): one block of 128 threads per (token,
 * local head), never split. q is quantized into Q8_0 blocks in shared memory (warp w: blocks
 * w, w+4, ...). A score is computed by one warp: lane l takes quarter l % 4 of block
 * g + l / 4 (groups of 8 blocks), the quarters' exact integers are added with shuffles, and
 * the block terms are added in block order (tsr_cuda_kv_q8_0_score, the CPU's scalar order).
 * Three passes over the KV blocks: the max; the sum of exp(s - max) in position order; the
 * probabilities exp(s - max) / sum and, per output value, the FMA chain over the positions in
 * order (tsr_cuda_kv_q8_0_v_fma). Every thread keeps the same max and sum. */
__global__ void k_attention_q8_0(tsr_cuda_attn_args a)
{
    __shared__ tsr_cuda_q8_0 qq[TSR_CUDA_MAX_HEAD_DIM / 32];
    __shared__ float sc[TSR_CUDA_KV_BLOCK];
    const int32_t t = blockIdx.x, hl = blockIdx.y;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int hd = a.head_dim, nb = hd / 32;
    const int kvh = (a.head_begin + hl) / a.group - a.kv_head_begin;
    const int32_t pos = a.pos[t];
    const int32_t *table = a.tables + (size_t)a.seq[t] * a.max_blocks;
    const int32_t p_first = a.window > 0 && pos - a.window + 1 > 0 ? pos - a.window + 1 : 0;
    const int32_t c0 = p_first / TSR_CUDA_KV_BLOCK, c1 = pos / TSR_CUDA_KV_BLOCK + 1;
    const size_t rb = tsr_cuda_kv_row_bytes(TSR_CUDA_KV_Q8_0, a.kv_dim);
    const float *q = a.q + ((size_t)t * a.n_head_local + hl) * hd;
    for (int b = warp; b < nb; b += ATT_THREADS / 32) {
        const float x = q[32 * b + lane];
        float d, id;
        tsr_cuda_q8_0_scale(warp_max(fabsf(x)), &d, &id);
        qq[b].qs[lane] = tsr_cuda_q8_0_elem(x, id);
        if (lane == 0) qq[b].d = tsr_cuda_f32_to_f16(d);
    }
    float acc[ATT_DIMS];
    for (int k = 0; k < ATT_DIMS; ++k) acc[k] = 0.0f;
    float m = -INFINITY, sum = 0.0f, inv = 0.0f;
    __syncthreads();
    for (int pass = 0; pass < 3; ++pass) {
        for (int32_t c = c0; c < c1; ++c) {
            const size_t row0 = (size_t)table[c] * TSR_CUDA_KV_BLOCK;
            for (int j = warp; j < TSR_CUDA_KV_BLOCK; j += ATT_THREADS / 32) {
                const int32_t p = c * TSR_CUDA_KV_BLOCK + j;
                if (p < p_first || p > pos) { /* warp-uniform */
                    if (lane == 0) sc[j] = -INFINITY;
                    continue;
                }
                const tsr_cuda_q8_0 *kr =
                    (const tsr_cuda_q8_0 *)((const uint8_t *)a.k_cache + (row0 + j) * rb) +
                    (size_t)kvh * nb;
                int32_t si[TSR_CUDA_MAX_HEAD_DIM / 32];
                for (int g = 0; g < nb; g += 8) {
                    const int b = g + lane / 4;
                    int32_t part =
                        b < nb ? tsr_cuda_isum_part32(TSR_CUDA_Q8_0, &kr[b], &qq[b], lane % 4) : 0;
                    part = warp_isum(part, 4);
                    for (int k = 0; k < 8; ++k) {
                        const int32_t sk = __shfl_sync(FULL_MASK, part, 4 * k);
                        if (g + k < nb) si[g + k] = sk;
                    }
                }
                const float s = tsr_cuda_kv_q8_0_score(kr, qq, si, nb, a.scale);
                if (lane == 0) sc[j] = s;
            }
            __syncthreads();
            if (pass == 0) {
                for (int j = 0; j < TSR_CUDA_KV_BLOCK; ++j) m = sc[j] > m ? sc[j] : m;
            } else if (pass == 1) {
                for (int j = 0; j < TSR_CUDA_KV_BLOCK; ++j) sum += tsr_cuda_attn_exp(sc[j], m);
            } else {
                for (int j = 0; j < TSR_CUDA_KV_BLOCK; ++j) {
                    if (sc[j] == -INFINITY) continue; /* masked (outside the window) */
                    const float pw = tsr_cuda_attn_exp(sc[j], m) * inv;
                    const tsr_cuda_q8_0 *vr =
                        (const tsr_cuda_q8_0 *)((const uint8_t *)a.v_cache + (row0 + j) * rb) +
                        (size_t)kvh * nb;
                    for (int k = 0; k < ATT_DIMS; ++k) {
                        const int i = threadIdx.x + ATT_THREADS * k;
                        if (i < hd) acc[k] = tsr_cuda_kv_q8_0_v_fma(vr, i, pw, acc[k]);
                    }
                }
            }
            __syncthreads(); /* sc is rewritten by the next chunk */
        }
        if (pass == 1) inv = 1.0f / sum;
    }
    float *o = a.out + ((size_t)t * a.n_head_local + hl) * hd;
    for (int k = 0; k < ATT_DIMS; ++k) {
        const int i = threadIdx.x + ATT_THREADS * k;
        if (i < hd) o[i] = acc[k];
    }
}

__global__ void k_attn_merge(tsr_cuda_attn_args a, int32_t n_split, const float *part)
{
    const int32_t t = blockIdx.x, hl = blockIdx.y;
    const int hd = a.head_dim;
    const float *pp = part + ((size_t)t * a.n_head_local + hl) * n_split * (size_t)(2 + hd);
    float m = -INFINITY;
    for (int s = 0; s < n_split; ++s) m = fmaxf(m, pp[(size_t)s * (2 + hd)]);
    float l = 0.0f;
    for (int s = 0; s < n_split; ++s)
        l += pp[(size_t)s * (2 + hd) + 1] * tsr_cuda_attn_merge_factor(pp[(size_t)s * (2 + hd)], m);
    float *o = a.out + ((size_t)t * a.n_head_local + hl) * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float v = 0.0f;
        for (int s = 0; s < n_split; ++s)
            v += pp[(size_t)s * (2 + hd) + 2 + i] *
                 tsr_cuda_attn_merge_factor(pp[(size_t)s * (2 + hd)], m);
        o[i] = v / l;
    }
}

/* ---- launchers ------------------------------------------------------------------------ */

extern "C" int tsr_cuda_embed(tsr_cuda_dev *d, const tsr_cuda_weight *emb, const int32_t *tokens,
                              int32_t n_tok, float *x, char *err, size_t err_len)
{
    if (!tsr_cuda_type_supported(emb->type) || n_tok < 1) {
        tsr_cuda_errf(err, err_len, "cuda embed: unsupported type %u or %d tokens", emb->type,
                      n_tok);
        return TSR_CUDA_EINVAL;
    }
    k_embed<<<(unsigned)n_tok, 256, 0, d->stream>>>(
        emb->type, (const uint8_t *)emb->data, emb->row_bytes, emb->n_out, emb->n_in, tokens, x);
    return tsr_cuda_launched(d, "k_embed", err, err_len);
}

extern "C" int tsr_cuda_rmsnorm(tsr_cuda_dev *d, float *out, const float *x, const float *w,
                                int32_t n_rows, int32_t n, float eps, char *err, size_t err_len)
{
    if (n_rows < 1) return 0;
    k_rmsnorm<<<(unsigned)n_rows, 256, 0, d->stream>>>(out, x, w, n, eps);
    return tsr_cuda_launched(d, "k_rmsnorm", err, err_len);
}

extern "C" int tsr_cuda_rope(tsr_cuda_dev *d, float *x, const int32_t *pos, int32_t n_tok,
                             int32_t n_head, int32_t head_dim, const tsr_cuda_rope_cfg *cfg,
                             const float *freq_factors, char *err, size_t err_len)
{
    if (cfg->n_rot > head_dim || cfg->n_rot % 2 != 0 || n_head > 65535) {
        tsr_cuda_errf(err, err_len, "cuda rope: n_rot %d, head_dim %d, %d heads", cfg->n_rot,
                      head_dim, n_head);
        return TSR_CUDA_EINVAL;
    }
    if (n_tok < 1 || n_head < 1 || cfg->n_rot == 0) return 0;
    tsr_cuda_rope_params rp = {cfg->mode,
                               cfg->n_rot,
                               cfg->freq_base,
                               cfg->freq_scale,
                               cfg->ext_factor,
                               cfg->attn_factor,
                               {cfg->corr_dims[0], cfg->corr_dims[1]},
                               cfg->ggml_theta};
    k_rope<<<dim3((unsigned)n_tok, (unsigned)n_head), 64, 0, d->stream>>>(x, pos, n_head, head_dim,
                                                                          rp, freq_factors);
    return tsr_cuda_launched(d, "k_rope", err, err_len);
}

extern "C" int tsr_cuda_glu(tsr_cuda_dev *d, int kind, float *gate, const float *up, int64_t n,
                            char *err, size_t err_len)
{
    if (n < 1) return 0;
    k_glu<<<grid_cap(n, 256, 8192), 256, 0, d->stream>>>(kind, gate, up, n);
    return tsr_cuda_launched(d, "k_glu", err, err_len);
}

extern "C" int tsr_cuda_add(tsr_cuda_dev *d, float *x, const float *y, int64_t n, char *err,
                            size_t err_len)
{
    if (n < 1) return 0;
    k_add<<<grid_cap(n, 256, 8192), 256, 0, d->stream>>>(x, y, n);
    return tsr_cuda_launched(d, "k_add", err, err_len);
}

extern "C" int tsr_cuda_add_rows(tsr_cuda_dev *d, float *x, const float *b, int32_t n_rows,
                                 int32_t n, char *err, size_t err_len)
{
    if (!b || n_rows < 1 || n < 1) return 0;
    const int64_t total = (int64_t)n_rows * n;
    k_add_rows<<<grid_cap(total, 256, 8192), 256, 0, d->stream>>>(x, b, n_rows, n);
    return tsr_cuda_launched(d, "k_add_rows", err, err_len);
}

extern "C" int tsr_cuda_scale(tsr_cuda_dev *d, float *x, float s, int64_t n, char *err,
                              size_t err_len)
{
    if (n < 1) return 0;
    k_scale<<<grid_cap(n, 256, 8192), 256, 0, d->stream>>>(x, s, n);
    return tsr_cuda_launched(d, "k_scale", err, err_len);
}

extern "C" int tsr_cuda_softcap(tsr_cuda_dev *d, float *x, float cap, int64_t n, char *err,
                                size_t err_len)
{
    if (n < 1) return 0;
    k_softcap<<<grid_cap(n, 256, 8192), 256, 0, d->stream>>>(x, cap, n);
    return tsr_cuda_launched(d, "k_softcap", err, err_len);
}

extern "C" int tsr_cuda_softmax(tsr_cuda_dev *d, float *x, int32_t n_rows, int32_t n, char *err,
                                size_t err_len)
{
    if (n_rows < 1 || n < 1) return 0;
    k_softmax<<<(unsigned)n_rows, 256, 0, d->stream>>>(x, n);
    return tsr_cuda_launched(d, "k_softmax", err, err_len);
}

extern "C" int tsr_cuda_attention(tsr_cuda_dev *d, const tsr_cuda_attn_args *a, char *err,
                                  size_t err_len)
{
    if (a->head_dim < 1 || a->head_dim > TSR_CUDA_MAX_HEAD_DIM || a->group < 1 ||
        a->n_head_local > 65535 || a->n_tok < 0) {
        tsr_cuda_errf(err, err_len, "cuda attention: head_dim %d (max %d), group %d, %d heads",
                      a->head_dim, TSR_CUDA_MAX_HEAD_DIM, a->group, a->n_head_local);
        return TSR_CUDA_EINVAL;
    }
    if (!tsr_cuda_kv_type_ok(a->kv_type, a->head_dim)) {
        tsr_cuda_errf(err, err_len,
                      "cuda attention: KV type %u with head_dim %d is not supported on the device "
                      "(f32, f16, or q8_0 with head_dim a multiple of 32)",
                      a->kv_type, a->head_dim);
        return TSR_CUDA_EINVAL;
    }
    if (a->n_tok == 0 || a->n_head_local == 0) return 0;
    if (a->kv_type == TSR_CUDA_KV_Q8_0) {
        const dim3 grid((unsigned)a->n_tok, (unsigned)a->n_head_local);
        k_attention_q8_0<<<grid, ATT_THREADS, 0, d->stream>>>(*a);
        return tsr_cuda_launched(d, "k_attention_q8_0", err, err_len);
    }
    if (a->kv_type == TSR_CUDA_KV_F16) {
        const dim3 grid((unsigned)a->n_tok, (unsigned)a->n_head_local);
        k_attention_f16<<<grid, ATT_THREADS, 0, d->stream>>>(*a);
        return tsr_cuda_launched(d, "k_attention_f16", err, err_len);
    }
    const int32_t n_split = tsr_cuda_attn_splits(a->n_tok, a->n_head_local, a->max_chunks);
    const dim3 grid((unsigned)a->n_tok, (unsigned)a->n_head_local, (unsigned)n_split);
    float *part = NULL;
    if (n_split > 1) {
        const size_t n_bytes = sizeof(float) * (size_t)a->n_tok * (size_t)a->n_head_local *
                               (size_t)n_split * (size_t)(2 + a->head_dim);
        if (tsr_cuda_scratch(d, &d->att_part, &d->att_part_bytes, n_bytes, "attention splits", err,
                             err_len) != 0)
            return TSR_CUDA_ENOMEM;
        part = (float *)d->att_part;
    }
    k_attention<<<grid, ATT_THREADS, 0, d->stream>>>(*a, n_split, part);
    if (n_split > 1) {
        if (tsr_cuda_launched(d, "k_attention", err, err_len) != 0) return TSR_CUDA_ERR;
        const dim3 mgrid((unsigned)a->n_tok, (unsigned)a->n_head_local);
        k_attn_merge<<<mgrid, 128, 0, d->stream>>>(*a, n_split, part);
        return tsr_cuda_launched(d, "k_attn_merge", err, err_len);
    }
    return tsr_cuda_launched(d, "k_attention", err, err_len);
}

extern "C" int tsr_cuda_kv_store(tsr_cuda_dev *d, void *k_cache, void *v_cache, const float *k,
                                 const float *v, const int32_t *rows, int32_t n_tok, int32_t kv_dim,
                                 uint32_t kv_type, char *err, size_t err_len)
{
    if (!tsr_cuda_kv_row_bytes(kv_type, kv_dim)) {
        tsr_cuda_errf(err, err_len,
                      "cuda kv store: KV type %u with rows of %d values is not supported on the "
                      "device",
                      kv_type, kv_dim);
        return TSR_CUDA_EINVAL;
    }
    if (n_tok < 1 || kv_dim < 1) return 0;
    if (kv_type == TSR_CUDA_KV_Q8_0) {
        k_kv_store_q8_0<<<(unsigned)n_tok, 256, 0, d->stream>>>(k_cache, v_cache, k, v, rows,
                                                                kv_dim);
        return tsr_cuda_launched(d, "k_kv_store_q8_0", err, err_len);
    }
    k_kv_store<<<(unsigned)n_tok, 256, 0, d->stream>>>(k_cache, v_cache, k, v, rows, kv_dim,
                                                       kv_type);
    return tsr_cuda_launched(d, "k_kv_store", err, err_len);
}

extern "C" int tsr_cuda_gather_rows(tsr_cuda_dev *d, float *dst, const float *src,
                                    const int32_t *idx, int32_t n_rows, int32_t n, char *err,
                                    size_t err_len)
{
    if (n_rows < 1 || n < 1) return 0;
    k_gather_rows<<<(unsigned)n_rows, 256, 0, d->stream>>>(dst, src, idx, n);
    return tsr_cuda_launched(d, "k_gather_rows", err, err_len);
}
