/*
 * numerics.h — the arithmetic of every CUDA kernel, as __host__ __device__ functions.
 *
 * Why: there is no GPU where Tessera is built and tested, so everything a kernel computes
 * per element or per block lives here, in code that compiles both as C11 (the host test
 * tests/test_cuda_numerics.c checks it against the CPU kernels of kernels/quant.c and
 * kernels/ops.c on the shared models' tensors) and as CUDA C++ (kernels/cuda/kernels.cu
 * calls the very same functions on the device). What a host run cannot check is what lies
 * around these functions: thread indexing, shared memory, warp reductions, launches.
 *
 * Bit-exactness: the library is compiled by nvcc with --fmad=false, so a*b+c is never
 * contracted into an FMA on the device; the host C11 build does not contract either
 * (ISO C mode). Integer parts are exact everywhere. Hence dequantization, activation
 * quantization and per-block dot contributions are bit-identical on host and device;
 * only float sums over blocks, threads or positions (whose order a GPU chooses) and the
 * libm functions (expf, powf, sinf, cosf, tanhf: CUDA's are within 1-2 ulp of glibc's)
 * may differ.
 *
 * Block layouts and operation order follow ggml (ggml-common.h, ggml-quants.c) and
 * kernels/quant.c. Pointers to blocks may be 2-byte aligned (GGUF rows of 34-byte Q8_0
 * blocks); 4-byte fields are read with memcpy.
 */
#ifndef TSR_CUDA_NUMERICS_H
#define TSR_CUDA_NUMERICS_H

#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define TSR_CUDA_HD static __host__ __device__ __forceinline__
#else
#define TSR_CUDA_HD static inline
#endif

/* ggml type ids (as in GGUF tensor infos and kernels/quant.h). */
enum {
    TSR_CUDA_F32 = 0,
    TSR_CUDA_F16 = 1,
    TSR_CUDA_Q4_0 = 2,
    TSR_CUDA_Q4_1 = 3,
    TSR_CUDA_Q5_0 = 6,
    TSR_CUDA_Q5_1 = 7,
    TSR_CUDA_Q8_0 = 8,
    TSR_CUDA_Q8_1 = 9,
    TSR_CUDA_Q2_K = 10,
    TSR_CUDA_Q3_K = 11,
    TSR_CUDA_Q4_K = 12,
    TSR_CUDA_Q5_K = 13,
    TSR_CUDA_Q6_K = 14,
    TSR_CUDA_Q8_K = 15,
    TSR_CUDA_BF16 = 30,
};

#define TSR_CUDA_QK32 32
#define TSR_CUDA_QKK  256

/* ---- block layouts (ggml-common.h); fp16 fields as raw uint16 bits ---- */
typedef struct {
    uint16_t d;
    int8_t qs[32];
} tsr_cuda_q8_0; /* 34 bytes */
typedef struct {
    uint16_t d, s; /* s = d * sum(qs) (fp16) */
    int8_t qs[32];
} tsr_cuda_q8_1; /* 36 */
typedef struct {
    uint16_t d;
    uint8_t qs[16];
} tsr_cuda_q4_0; /* 18 */
typedef struct {
    uint16_t d, m;
    uint8_t qs[16];
} tsr_cuda_q4_1; /* 20 */
typedef struct {
    uint16_t d;
    uint8_t qh[4];
    uint8_t qs[16];
} tsr_cuda_q5_0; /* 22 */
typedef struct {
    uint16_t d, m;
    uint8_t qh[4];
    uint8_t qs[16];
} tsr_cuda_q5_1; /* 24 */
typedef struct {
    uint8_t scales[16]; /* low 4 bits scale, high 4 bits min, per 16 elements */
    uint8_t qs[64];
    uint16_t d, dmin;
} tsr_cuda_q2_K; /* 84 */
typedef struct {
    uint8_t hmask[32];
    uint8_t qs[64];
    uint8_t scales[12]; /* 16 6-bit scales, offset 32 */
    uint16_t d;
} tsr_cuda_q3_K; /* 110 */
typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qs[128];
} tsr_cuda_q4_K; /* 144 */
typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qh[32];
    uint8_t qs[128];
} tsr_cuda_q5_K; /* 176 */
typedef struct {
    uint8_t ql[128];
    uint8_t qh[64];
    int8_t scales[16];
    uint16_t d;
} tsr_cuda_q6_K; /* 210 */
typedef struct {
    float d;
    int8_t qs[256];
    int16_t bsums[16];
} tsr_cuda_q8_K; /* 292 */

/* ---- scalar helpers ---- */

TSR_CUDA_HD uint32_t tsr_cuda_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

TSR_CUDA_HD float tsr_cuda_f32_from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* fp16 -> fp32 (exact). */
TSR_CUDA_HD float tsr_cuda_f16_to_f32(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t ex = (h >> 10) & 0x1fu;
    const uint32_t man = h & 0x3ffu;
    if (ex == 0x1f) return tsr_cuda_f32_from_bits(sign | 0x7f800000u | (man << 13));
    if (ex != 0) return tsr_cuda_f32_from_bits(sign | ((ex + 112u) << 23) | (man << 13));
    return tsr_cuda_f32_from_bits(sign | tsr_cuda_f32_bits((float)man * 5.9604644775390625e-8f));
}

/* fp32 -> fp16, round to nearest even (the algorithm of kernels/quant.c). */
TSR_CUDA_HD uint16_t tsr_cuda_f32_to_f16(float f)
{
    const uint32_t x = tsr_cuda_f32_bits(f);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) {
        const float t = tsr_cuda_f32_from_bits(ax) + 0.5f;
        return (uint16_t)(sign | (uint16_t)(tsr_cuda_f32_bits(t) - 0x3f000000u));
    }
    const uint32_t odd = (ax >> 13) & 1u;
    return (uint16_t)(sign | (uint16_t)((ax + 0xc8000fffu + odd) >> 13));
}

TSR_CUDA_HD float tsr_cuda_bf16_to_f32(uint16_t h)
{
    return tsr_cuda_f32_from_bits((uint32_t)h << 16);
}

/* Elements and bytes per block; 0 for types the backend does not run. */
TSR_CUDA_HD int32_t tsr_cuda_block_elems(uint32_t type)
{
    switch (type) {
    case TSR_CUDA_F32:
    case TSR_CUDA_F16:
    case TSR_CUDA_BF16:
        return 1;
    case TSR_CUDA_Q4_0:
    case TSR_CUDA_Q4_1:
    case TSR_CUDA_Q5_0:
    case TSR_CUDA_Q5_1:
    case TSR_CUDA_Q8_0:
    case TSR_CUDA_Q8_1:
        return 32;
    case TSR_CUDA_Q2_K:
    case TSR_CUDA_Q3_K:
    case TSR_CUDA_Q4_K:
    case TSR_CUDA_Q5_K:
    case TSR_CUDA_Q6_K:
    case TSR_CUDA_Q8_K:
        return 256;
    default:
        return 0;
    }
}

TSR_CUDA_HD int32_t tsr_cuda_block_bytes(uint32_t type)
{
    switch (type) {
    case TSR_CUDA_F32:
        return 4;
    case TSR_CUDA_F16:
    case TSR_CUDA_BF16:
        return 2;
    case TSR_CUDA_Q4_0:
        return 18;
    case TSR_CUDA_Q4_1:
        return 20;
    case TSR_CUDA_Q5_0:
        return 22;
    case TSR_CUDA_Q5_1:
        return 24;
    case TSR_CUDA_Q8_0:
        return 34;
    case TSR_CUDA_Q8_1:
        return 36;
    case TSR_CUDA_Q2_K:
        return 84;
    case TSR_CUDA_Q3_K:
        return 110;
    case TSR_CUDA_Q4_K:
        return 144;
    case TSR_CUDA_Q5_K:
        return 176;
    case TSR_CUDA_Q6_K:
        return 210;
    case TSR_CUDA_Q8_K:
        return 292;
    default:
        return 0;
    }
}

/* Activation type of the dot with weights of `type` (ggml's vec_dot_type): Q8_0 for
 * Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K for the K-quants, F32 for float weights. */
TSR_CUDA_HD uint32_t tsr_cuda_dot_type(uint32_t type)
{
    switch (type) {
    case TSR_CUDA_Q4_0:
    case TSR_CUDA_Q5_0:
    case TSR_CUDA_Q8_0:
        return TSR_CUDA_Q8_0;
    case TSR_CUDA_Q4_1:
    case TSR_CUDA_Q5_1:
        return TSR_CUDA_Q8_1;
    case TSR_CUDA_Q2_K:
    case TSR_CUDA_Q3_K:
    case TSR_CUDA_Q4_K:
    case TSR_CUDA_Q5_K:
    case TSR_CUDA_Q6_K:
        return TSR_CUDA_Q8_K;
    default:
        return TSR_CUDA_F32;
    }
}

/* 6-bit scale and min j (0..7) of a Q4_K / Q5_K block (ggml get_scale_min_k4). */
TSR_CUDA_HD void tsr_cuda_scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *m)
{
    if (j < 4) {
        *sc = (uint8_t)(q[j] & 63);
        *m = (uint8_t)(q[j + 4] & 63);
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* Signed 6-bit scale j (0..15) of a Q3_K block, offset removed: [-32, 31]. */
TSR_CUDA_HD int tsr_cuda_q3_K_scale(const uint8_t *s, int j)
{
    /* ggml packs the low 4 bits of scales 0..7 in s[0..7] low nibbles, 8..15 in the high
     * nibbles, and the top 2 bits in s[8..11], 2 bits per scale. */
    const int lo = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
    const int hi = (s[8 + (j % 4)] >> (2 * (j / 4))) & 3;
    return (lo | (hi << 4)) - 32;
}

/* Element j of the block at blk of `type`, dequantized in ggml's exact operation order
 * (bit-identical to tsr_dequant_row). For float types blk points at the element itself
 * and j must be 0. */
TSR_CUDA_HD float tsr_cuda_dequant(uint32_t type, const void *blk, int j)
{
    const uint8_t *p = (const uint8_t *)blk;
    switch (type) {
    case TSR_CUDA_F32: {
        float f;
        memcpy(&f, p, 4);
        return f;
    }
    case TSR_CUDA_F16: {
        uint16_t h;
        memcpy(&h, p, 2);
        return tsr_cuda_f16_to_f32(h);
    }
    case TSR_CUDA_BF16: {
        uint16_t h;
        memcpy(&h, p, 2);
        return tsr_cuda_bf16_to_f32(h);
    }
    case TSR_CUDA_Q8_0: {
        const tsr_cuda_q8_0 *b = (const tsr_cuda_q8_0 *)blk;
        return b->qs[j] * tsr_cuda_f16_to_f32(b->d);
    }
    case TSR_CUDA_Q4_0: {
        const tsr_cuda_q4_0 *b = (const tsr_cuda_q4_0 *)blk;
        const int q = j < 16 ? (b->qs[j] & 0xF) - 8 : (b->qs[j - 16] >> 4) - 8;
        return q * tsr_cuda_f16_to_f32(b->d);
    }
    case TSR_CUDA_Q4_1: {
        const tsr_cuda_q4_1 *b = (const tsr_cuda_q4_1 *)blk;
        const int q = j < 16 ? (b->qs[j] & 0xF) : (b->qs[j - 16] >> 4);
        return q * tsr_cuda_f16_to_f32(b->d) + tsr_cuda_f16_to_f32(b->m);
    }
    case TSR_CUDA_Q5_0:
    case TSR_CUDA_Q5_1: {
        const bool one = type == TSR_CUDA_Q5_1;
        const uint8_t *qh8 =
            one ? ((const tsr_cuda_q5_1 *)blk)->qh : ((const tsr_cuda_q5_0 *)blk)->qh;
        const uint8_t *qs =
            one ? ((const tsr_cuda_q5_1 *)blk)->qs : ((const tsr_cuda_q5_0 *)blk)->qs;
        uint32_t qh;
        memcpy(&qh, qh8, 4);
        int q;
        if (j < 16)
            q = (qs[j] & 0xF) | (int)(((qh >> j) << 4) & 0x10);
        else
            q = (qs[j - 16] >> 4) | (int)((qh >> (j - 16 + 12)) & 0x10);
        if (!one) return (q - 16) * tsr_cuda_f16_to_f32(((const tsr_cuda_q5_0 *)blk)->d);
        const tsr_cuda_q5_1 *b = (const tsr_cuda_q5_1 *)blk;
        return q * tsr_cuda_f16_to_f32(b->d) + tsr_cuda_f16_to_f32(b->m);
    }
    case TSR_CUDA_Q2_K: {
        const tsr_cuda_q2_K *b = (const tsr_cuda_q2_K *)blk;
        /* 128-element halves; in each, 4 shifts x (16 + 16) elements, one scale per 16 */
        const int half = j / 128, r = j % 128, shift = 2 * (r / 32), l = r % 32;
        const uint8_t sc = b->scales[half * 8 + (r / 16)];
        const float dl = tsr_cuda_f16_to_f32(b->d) * (sc & 0xF);
        const float ml = tsr_cuda_f16_to_f32(b->dmin) * (sc >> 4);
        return dl * (int8_t)((b->qs[half * 32 + l] >> shift) & 3) - ml;
    }
    case TSR_CUDA_Q3_K: {
        const tsr_cuda_q3_K *b = (const tsr_cuda_q3_K *)blk;
        const int half = j / 128, r = j % 128, shift = 2 * (r / 32), l = r % 32;
        const float dl =
            tsr_cuda_f16_to_f32(b->d) * (float)tsr_cuda_q3_K_scale(b->scales, half * 8 + (r / 16));
        const uint8_t m = (uint8_t)(1u << (half * 4 + r / 32));
        const int q = (int8_t)((b->qs[half * 32 + l] >> shift) & 3) - ((b->hmask[l] & m) ? 0 : 4);
        return dl * q;
    }
    case TSR_CUDA_Q4_K: {
        const tsr_cuda_q4_K *b = (const tsr_cuda_q4_K *)blk;
        const int g = j / 32, l = j % 32;
        uint8_t sc, m;
        tsr_cuda_scale_min_k4(g, b->scales, &sc, &m);
        const float d1 = tsr_cuda_f16_to_f32(b->d) * sc, m1 = tsr_cuda_f16_to_f32(b->dmin) * m;
        return d1 * ((b->qs[32 * (g / 2) + l] >> (4 * (g & 1))) & 0xF) - m1;
    }
    case TSR_CUDA_Q5_K: {
        const tsr_cuda_q5_K *b = (const tsr_cuda_q5_K *)blk;
        const int g = j / 32, l = j % 32;
        uint8_t sc, m;
        tsr_cuda_scale_min_k4(g, b->scales, &sc, &m);
        const float d1 = tsr_cuda_f16_to_f32(b->d) * sc, m1 = tsr_cuda_f16_to_f32(b->dmin) * m;
        const int q =
            ((b->qs[32 * (g / 2) + l] >> (4 * (g & 1))) & 0xF) + ((b->qh[l] & (1u << g)) ? 16 : 0);
        return d1 * q - m1;
    }
    case TSR_CUDA_Q6_K: {
        const tsr_cuda_q6_K *b = (const tsr_cuda_q6_K *)blk;
        const int half = j / 128, r = j % 128, quarter = r / 32, l = r % 32;
        const uint8_t *ql = b->ql + 64 * half, *qh = b->qh + 32 * half;
        const int lo = (quarter & 1) ? ql[l + 32] : ql[l];
        const int q =
            (((quarter < 2) ? (lo & 0xF) : (lo >> 4)) | (((qh[l] >> (2 * quarter)) & 3) << 4)) - 32;
        const float d = tsr_cuda_f16_to_f32(b->d);
        return d * b->scales[8 * half + l / 16 + 2 * quarter] * q;
    }
    case TSR_CUDA_Q8_K: {
        const tsr_cuda_q8_K *b = (const tsr_cuda_q8_K *)blk;
        return b->d * b->qs[j];
    }
    default:
        return NAN;
    }
}

/* ---- activation quantizers (ggml quantize_row_*_ref; kernels/quant.c gives the same
 * bytes). The device runs them one block per warp, with the same per-element steps and
 * an order-free max (see tsr_cuda_amax_pick). ---- */

/* Round to nearest, ties to even, through the float adder (|f| <= 4194303). */
TSR_CUDA_HD int tsr_cuda_nearest_int(float f)
{
    const float v = f + 12582912.f;
    return (int)(tsr_cuda_f32_bits(v) & 0x007fffffu) - 0x00400000;
}

/* The max-|x| pick of Q8_K: larger |x| wins; on a tie the lower index (ggml scans in
 * order and keeps the first). Returns true when (a, ia) beats (b, ib). */
TSR_CUDA_HD bool tsr_cuda_amax_pick(float a, int ia, float b, int ib)
{
    const float fa = fabsf(a), fb = fabsf(b);
    return fa > fb || (fa == fb && ia < ib);
}

/* Q8_0 block from x[32] given amax = max |x| (any order: max is exact). */
TSR_CUDA_HD void tsr_cuda_q8_0_scale(float amax, float *d, float *id)
{
    *d = amax / 127;
    *id = *d ? 1.0f / *d : 0.0f;
}

TSR_CUDA_HD int8_t tsr_cuda_q8_0_elem(float x, float id)
{
    return (int8_t)roundf(x * id);
}

TSR_CUDA_HD void tsr_cuda_quant_q8_0(const float *x, tsr_cuda_q8_0 *y)
{
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(x[j]));
    float d, id;
    tsr_cuda_q8_0_scale(amax, &d, &id);
    y->d = tsr_cuda_f32_to_f16(d);
    for (int j = 0; j < 32; ++j) y->qs[j] = tsr_cuda_q8_0_elem(x[j], id);
}

/* Q8_1: as Q8_0 plus s = fp16(d * sum(qs)) (sum over ints: exact in any order). */
TSR_CUDA_HD uint16_t tsr_cuda_q8_1_s(int32_t sum_qs, float d)
{
    return tsr_cuda_f32_to_f16((float)sum_qs * d);
}

TSR_CUDA_HD void tsr_cuda_quant_q8_1(const float *x, tsr_cuda_q8_1 *y)
{
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(x[j]));
    float d, id;
    tsr_cuda_q8_0_scale(amax, &d, &id);
    int32_t sum = 0;
    for (int j = 0; j < 32; ++j) {
        y->qs[j] = tsr_cuda_q8_0_elem(x[j], id);
        sum += y->qs[j];
    }
    y->d = tsr_cuda_f32_to_f16(d);
    y->s = tsr_cuda_q8_1_s(sum, d);
}

/* Q8_K element given iscale = -127 / (signed x of largest |x|). */
TSR_CUDA_HD int8_t tsr_cuda_q8_K_elem(float x, float iscale)
{
    const int q = tsr_cuda_nearest_int(iscale * x);
    return (int8_t)(q < 127 ? q : 127);
}

TSR_CUDA_HD void tsr_cuda_quant_q8_K(const float *x, tsr_cuda_q8_K *y)
{
    float max = 0.0f;
    int imax = 0;
    for (int j = 1; j < 256; ++j)
        if (tsr_cuda_amax_pick(x[j], j, x[imax], imax)) imax = j;
    max = x[imax];
    if (fabsf(max) == 0.0f) {
        memset(y, 0, sizeof *y);
        return;
    }
    const float iscale = -127.f / max;
    for (int j = 0; j < 256; ++j) y->qs[j] = tsr_cuda_q8_K_elem(x[j], iscale);
    for (int j = 0; j < 16; ++j) {
        int sum = 0;
        for (int l = 0; l < 16; ++l) sum += y->qs[j * 16 + l];
        y->bsums[j] = (int16_t)sum;
    }
    y->d = 1 / iscale;
}

/* ---- block dots ----
 * 32-element types: the float contribution of one weight block times one activation block,
 * (d_w * d_x) * sumi [+ m_w * s_x], with the integer sum exact: bit-identical to the
 * per-block term of the CPU scalar dots. A row dot sums these over blocks (the GPU in a
 * warp-reduction order). */

TSR_CUDA_HD int32_t tsr_cuda_isum_q8_0(const int8_t *w, const int8_t *x)
{
    int32_t s = 0;
    for (int j = 0; j < 32; ++j) s += w[j] * x[j];
    return s;
}

TSR_CUDA_HD float tsr_cuda_dot_blk32(uint32_t type, const void *wb, const void *xb)
{
    const uint8_t *w = (const uint8_t *)wb;
    switch (type) {
    case TSR_CUDA_Q8_0: {
        const tsr_cuda_q8_0 *a = (const tsr_cuda_q8_0 *)wb, *x = (const tsr_cuda_q8_0 *)xb;
        const int32_t si = tsr_cuda_isum_q8_0(a->qs, x->qs);
        return tsr_cuda_f16_to_f32(a->d) * tsr_cuda_f16_to_f32(x->d) * (float)si;
    }
    case TSR_CUDA_Q4_0: {
        const tsr_cuda_q4_0 *a = (const tsr_cuda_q4_0 *)wb;
        const tsr_cuda_q8_0 *x = (const tsr_cuda_q8_0 *)xb;
        int32_t si = 0;
        for (int j = 0; j < 16; ++j) {
            si += ((a->qs[j] & 0xF) - 8) * x->qs[j];
            si += ((a->qs[j] >> 4) - 8) * x->qs[j + 16];
        }
        return tsr_cuda_f16_to_f32(a->d) * tsr_cuda_f16_to_f32(x->d) * (float)si;
    }
    case TSR_CUDA_Q4_1: {
        const tsr_cuda_q4_1 *a = (const tsr_cuda_q4_1 *)wb;
        const tsr_cuda_q8_1 *x = (const tsr_cuda_q8_1 *)xb;
        int32_t si = 0;
        for (int j = 0; j < 16; ++j) {
            si += (a->qs[j] & 0xF) * x->qs[j];
            si += (a->qs[j] >> 4) * x->qs[j + 16];
        }
        return tsr_cuda_f16_to_f32(a->d) * tsr_cuda_f16_to_f32(x->d) * (float)si +
               tsr_cuda_f16_to_f32(a->m) * tsr_cuda_f16_to_f32(x->s);
    }
    case TSR_CUDA_Q5_0:
    case TSR_CUDA_Q5_1: {
        const bool one = type == TSR_CUDA_Q5_1;
        const uint8_t *qh8 = w + (one ? 4 : 2), *qs = qh8 + 4;
        const int off = one ? 0 : 16;
        const int8_t *xq = one ? ((const tsr_cuda_q8_1 *)xb)->qs : ((const tsr_cuda_q8_0 *)xb)->qs;
        uint32_t qh;
        memcpy(&qh, qh8, 4);
        int32_t si = 0;
        for (int j = 0; j < 16; ++j) {
            const int x0 = ((qs[j] & 0xF) | (int)(((qh >> j) << 4) & 0x10)) - off;
            const int x1 = ((qs[j] >> 4) | (int)((qh >> (j + 12)) & 0x10)) - off;
            si += x0 * xq[j] + x1 * xq[j + 16];
        }
        if (!one) {
            const tsr_cuda_q5_0 *a = (const tsr_cuda_q5_0 *)wb;
            return tsr_cuda_f16_to_f32(a->d) * tsr_cuda_f16_to_f32(((const tsr_cuda_q8_0 *)xb)->d) *
                   (float)si;
        }
        const tsr_cuda_q5_1 *a = (const tsr_cuda_q5_1 *)wb;
        const tsr_cuda_q8_1 *x = (const tsr_cuda_q8_1 *)xb;
        return tsr_cuda_f16_to_f32(a->d) * tsr_cuda_f16_to_f32(x->d) * (float)si +
               tsr_cuda_f16_to_f32(a->m) * tsr_cuda_f16_to_f32(x->s);
    }
    default:
        return NAN;
    }
}

/* 32-element blocks split over 4 lanes (the matvec kernel): part q (0..3) of a block gives
 * an exact integer partial sum, the 4 partials add exactly in any order, and one lane
 * combines them: the result is bit-identical to tsr_cuda_dot_blk32. Part q covers elements
 * 8q..8q+7 for Q8_0, and bytes 4q..4q+3 (elements j and j+16) for the 4- and 5-bit types. */
TSR_CUDA_HD int32_t tsr_cuda_isum_part32(uint32_t type, const void *wb, const void *xb, int q)
{
    const uint8_t *w = (const uint8_t *)wb;
    int32_t si = 0;
    switch (type) {
    case TSR_CUDA_Q8_0: {
        const int8_t *a = ((const tsr_cuda_q8_0 *)wb)->qs + 8 * q;
        const int8_t *x = ((const tsr_cuda_q8_0 *)xb)->qs + 8 * q;
        for (int j = 0; j < 8; ++j) si += a[j] * x[j];
        break;
    }
    case TSR_CUDA_Q4_0:
    case TSR_CUDA_Q4_1: {
        const bool one = type == TSR_CUDA_Q4_1;
        const uint8_t *qs = w + (one ? 4 : 2);
        const int8_t *x = one ? ((const tsr_cuda_q8_1 *)xb)->qs : ((const tsr_cuda_q8_0 *)xb)->qs;
        const int off = one ? 0 : 8;
        for (int j = 4 * q; j < 4 * q + 4; ++j) {
            si += ((qs[j] & 0xF) - off) * x[j];
            si += ((qs[j] >> 4) - off) * x[j + 16];
        }
        break;
    }
    case TSR_CUDA_Q5_0:
    case TSR_CUDA_Q5_1: {
        const bool one = type == TSR_CUDA_Q5_1;
        const uint8_t *qh8 = w + (one ? 4 : 2), *qs = qh8 + 4;
        const int off = one ? 0 : 16;
        const int8_t *x = one ? ((const tsr_cuda_q8_1 *)xb)->qs : ((const tsr_cuda_q8_0 *)xb)->qs;
        uint32_t qh;
        memcpy(&qh, qh8, 4);
        for (int j = 4 * q; j < 4 * q + 4; ++j) {
            const int x0 = ((qs[j] & 0xF) | (int)(((qh >> j) << 4) & 0x10)) - off;
            const int x1 = ((qs[j] >> 4) | (int)((qh >> (j + 12)) & 0x10)) - off;
            si += x0 * x[j] + x1 * x[j + 16];
        }
        break;
    }
    default:
        break;
    }
    return si;
}

/* The block's float contribution from its summed integer (as tsr_cuda_dot_blk32). */
TSR_CUDA_HD float tsr_cuda_dot_combine32(uint32_t type, const void *wb, const void *xb, int32_t si)
{
    const uint16_t dw = *(const uint16_t *)wb; /* d is the first field of every 32-block */
    const bool one = type == TSR_CUDA_Q4_1 || type == TSR_CUDA_Q5_1;
    if (!one)
        return tsr_cuda_f16_to_f32(dw) * tsr_cuda_f16_to_f32(((const tsr_cuda_q8_0 *)xb)->d) *
               (float)si;
    const uint16_t mw = ((const uint16_t *)wb)[1];
    const tsr_cuda_q8_1 *x = (const tsr_cuda_q8_1 *)xb;
    return tsr_cuda_f16_to_f32(dw) * tsr_cuda_f16_to_f32(x->d) * (float)si +
           tsr_cuda_f16_to_f32(mw) * tsr_cuda_f16_to_f32(x->s);
}

/* K-quants: a super-block of 256 is cut into 8 groups of 32; group g (0..7) yields two
 * exact integers, sumi (sum of scale * <q, x>) and summ (sum of min * bsum; K-types with
 * mins only). The device spreads the groups over 8 lanes and adds the integers with
 * shuffles (exact in any order), then one lane combines:
 *   (d_w * d_x) * sumi - (dmin_w * d_x) * summ.   */
TSR_CUDA_HD void tsr_cuda_dot_group_k(uint32_t type, const void *wb, const tsr_cuda_q8_K *x, int g,
                                      int32_t *sumi, int32_t *summ)
{
    const int8_t *y = x->qs + 32 * g;
    int32_t si = 0, sm = 0;
    switch (type) {
    case TSR_CUDA_Q2_K: {
        const tsr_cuda_q2_K *a = (const tsr_cuda_q2_K *)wb;
        const int half = g / 4, shift = 2 * (g % 4);
        const uint8_t *q = a->qs + 32 * half;
        for (int k = 0; k < 2; ++k) { /* two 16-element scale groups */
            const uint8_t sc = a->scales[half * 8 + 2 * (g % 4) + k];
            int32_t s = 0;
            for (int l = 0; l < 16; ++l) s += ((q[16 * k + l] >> shift) & 3) * y[16 * k + l];
            si += (sc & 0xF) * s;
            sm += (sc >> 4) * x->bsums[2 * g + k];
        }
        break;
    }
    case TSR_CUDA_Q3_K: {
        const tsr_cuda_q3_K *a = (const tsr_cuda_q3_K *)wb;
        const int half = g / 4, shift = 2 * (g % 4);
        const uint8_t *q = a->qs + 32 * half;
        const uint8_t m = (uint8_t)(1u << g);
        for (int k = 0; k < 2; ++k) {
            const int sc = tsr_cuda_q3_K_scale(a->scales, half * 8 + 2 * (g % 4) + k);
            int32_t s = 0;
            for (int l = 0; l < 16; ++l) {
                const int li = 16 * k + l;
                const int qv = ((q[li] >> shift) & 3) - ((a->hmask[li] & m) ? 0 : 4);
                s += qv * y[li];
            }
            si += sc * s;
        }
        break;
    }
    case TSR_CUDA_Q4_K:
    case TSR_CUDA_Q5_K: {
        const bool five = type == TSR_CUDA_Q5_K;
        const uint8_t *scales =
            five ? ((const tsr_cuda_q5_K *)wb)->scales : ((const tsr_cuda_q4_K *)wb)->scales;
        const uint8_t *qs =
            (five ? ((const tsr_cuda_q5_K *)wb)->qs : ((const tsr_cuda_q4_K *)wb)->qs) +
            32 * (g / 2);
        const uint8_t *qh = five ? ((const tsr_cuda_q5_K *)wb)->qh : NULL;
        uint8_t sc, m;
        tsr_cuda_scale_min_k4(g, scales, &sc, &m);
        const int shift = 4 * (g & 1);
        int32_t s = 0;
        for (int l = 0; l < 32; ++l) {
            int qv = (qs[l] >> shift) & 0xF;
            if (five && (qh[l] & (1u << g))) qv += 16;
            s += qv * y[l];
        }
        si = sc * s;
        sm = m * (x->bsums[2 * g] + x->bsums[2 * g + 1]);
        break;
    }
    case TSR_CUDA_Q6_K: {
        const tsr_cuda_q6_K *a = (const tsr_cuda_q6_K *)wb;
        const int half = g / 4, quarter = g % 4;
        const uint8_t *ql = a->ql + 64 * half, *qh = a->qh + 32 * half;
        for (int k = 0; k < 2; ++k) {
            int32_t s = 0;
            for (int l = 16 * k; l < 16 * k + 16; ++l) {
                const int lo = (quarter & 1) ? ql[l + 32] : ql[l];
                const int qv = (((quarter < 2) ? (lo & 0xF) : (lo >> 4)) |
                                (((qh[l] >> (2 * quarter)) & 3) << 4)) -
                               32;
                s += qv * y[l];
            }
            si += a->scales[8 * half + 2 * quarter + k] * s;
        }
        break;
    }
    default:
        break;
    }
    *sumi = si;
    *summ = sm;
}

/* The super-block's float contribution from its summed integers. */
TSR_CUDA_HD float tsr_cuda_dot_combine_k(uint32_t type, const void *wb, const tsr_cuda_q8_K *x,
                                         int32_t sumi, int32_t summ)
{
    uint16_t d, dmin = 0;
    switch (type) {
    case TSR_CUDA_Q2_K:
        d = ((const tsr_cuda_q2_K *)wb)->d;
        dmin = ((const tsr_cuda_q2_K *)wb)->dmin;
        break;
    case TSR_CUDA_Q3_K:
        d = ((const tsr_cuda_q3_K *)wb)->d;
        break;
    case TSR_CUDA_Q4_K:
        d = ((const tsr_cuda_q4_K *)wb)->d;
        dmin = ((const tsr_cuda_q4_K *)wb)->dmin;
        break;
    case TSR_CUDA_Q5_K:
        d = ((const tsr_cuda_q5_K *)wb)->d;
        dmin = ((const tsr_cuda_q5_K *)wb)->dmin;
        break;
    case TSR_CUDA_Q6_K:
        d = ((const tsr_cuda_q6_K *)wb)->d;
        break;
    default:
        return NAN;
    }
    const float r = tsr_cuda_f16_to_f32(d) * x->d * (float)sumi;
    if (type == TSR_CUDA_Q3_K || type == TSR_CUDA_Q6_K) return r;
    return r - tsr_cuda_f16_to_f32(dmin) * x->d * (float)summ;
}

/* Whole super-block (host reference of what 8 lanes compute together). */
TSR_CUDA_HD float tsr_cuda_dot_blk_k(uint32_t type, const void *wb, const tsr_cuda_q8_K *x)
{
    int32_t si = 0, sm = 0;
    for (int g = 0; g < 8; ++g) {
        int32_t a, b;
        tsr_cuda_dot_group_k(type, wb, x, g, &a, &b);
        si += a;
        sm += b;
    }
    return tsr_cuda_dot_combine_k(type, wb, x, si, sm);
}

/* ---- norms, softmax, rope, gated units ---- */

/* RMSNorm: the sum of squares accumulates in double (as kernels/ops.c and ggml); the scale
 * and the per-element product are float, in this order. */
TSR_CUDA_HD float tsr_cuda_rms_scale(double sum_sq, int n, float eps)
{
    return 1.0f / sqrtf((float)(sum_sq / n) + eps);
}

TSR_CUDA_HD float tsr_cuda_rms_apply(float x, float scale, float w)
{
    return x * scale * w;
}

/* Online softmax (flash attention): running max m, running sum l, and the factor by which
 * the running output accumulator is rescaled when a chunk of scores raises the max. The
 * final weights are exp(s - m) / l; a two-pass softmax (kernels/ops.c) gives the same
 * values up to float rounding of the rescalings (|rel. error| <= ~4 ulp per chunk). */
typedef struct {
    float m; /* running max (-INFINITY before the first score) */
    float l; /* running sum of exp(s - m) */
} tsr_cuda_softmax_state;

TSR_CUDA_HD void tsr_cuda_softmax_init(tsr_cuda_softmax_state *st)
{
    st->m = -INFINITY;
    st->l = 0.0f;
}

/* Fold a chunk whose max is chunk_max: returns the factor for the accumulator (0 when the
 * state was empty) and moves the max; then add exp(s - st->m) for each score. */
TSR_CUDA_HD float tsr_cuda_softmax_rescale(tsr_cuda_softmax_state *st, float chunk_max)
{
    const float m_new = chunk_max > st->m ? chunk_max : st->m;
    const float corr = st->m == -INFINITY ? 0.0f : expf(st->m - m_new);
    st->l *= corr;
    st->m = m_new;
    return corr;
}

TSR_CUDA_HD float tsr_cuda_softmax_weight(const tsr_cuda_softmax_state *st, float s)
{
    return s == -INFINITY ? 0.0f : expf(s - st->m);
}

/* Split attention (flash-decoding): the KV chunks of one (token, head) are cut into n_split
 * contiguous ranges, each folded into its own state (m_s, l_s, acc_s); then merged in
 * split order: m = max m_s, l = sum l_s e^(m_s - m), out = sum acc_s e^(m_s - m) / l.
 * tsr_cuda_attn_splits picks n_split so that about TSR_CUDA_ATT_TARGET_BLOCKS thread blocks
 * run (never more than half the chunks, at most TSR_CUDA_ATT_MAX_SPLITS). */
#define TSR_CUDA_ATT_TARGET_BLOCKS 256
#define TSR_CUDA_ATT_MAX_SPLITS    32

TSR_CUDA_HD int32_t tsr_cuda_attn_splits(int32_t n_tok, int32_t n_head, int32_t max_chunks)
{
    const int64_t blocks = (int64_t)n_tok * n_head;
    int64_t s = (TSR_CUDA_ATT_TARGET_BLOCKS + blocks - 1) / (blocks > 0 ? blocks : 1);
    if (s > max_chunks / 2) s = max_chunks / 2;
    if (s > TSR_CUDA_ATT_MAX_SPLITS) s = TSR_CUDA_ATT_MAX_SPLITS;
    return s < 1 ? 1 : (int32_t)s;
}

/* Chunks [*c0, *c1) of split `split` out of n_split over chunks [first, last]. */
TSR_CUDA_HD void tsr_cuda_attn_split_range(int32_t first, int32_t last, int32_t split,
                                           int32_t n_split, int32_t *c0, int32_t *c1)
{
    const int32_t n = last - first + 1;
    *c0 = first + (int32_t)((int64_t)n * split / n_split);
    *c1 = first + (int32_t)((int64_t)n * (split + 1) / n_split);
}

/* Factor of split s's accumulator and sum in the merge (0 for an empty split). */
TSR_CUDA_HD float tsr_cuda_attn_merge_factor(float m_s, float m)
{
    return m_s == -INFINITY ? 0.0f : expf(m_s - m);
}

/* ---- KV cache element types ----
 * The device KV pool stores K and V as float32 (type 0, ggml's F32 id), fp16 (type 1, F16)
 * or Q8_0 blocks (type 8, Q8_0), as the CPU's --kv-type f32 / f16 / q8_0
 * (kernels/kvcache.h).
 *
 * fp16 follows the CPU's f16 KV path (llama.cpp's F16 cache without flash attention): K and
 * V are rounded to nearest even when stored; Q is rounded to fp16 before q·k, whose products
 * of fp16 values are summed in float; the softmax is float; each probability
 * exp(s - max) * (1 / sum) is rounded to fp16 before it weighs V, and the weighted V rows are
 * summed in float. The device reaches the normalized probabilities with two passes over the
 * KV blocks (pass 1: the online max and sum; pass 2: the probabilities and the V sum), so
 * every fp16 rounding point is the CPU's; only the float summation orders differ (lanes of a
 * warp vs the CPU's 16 FMA lanes; the online sum vs a sequential one).
 *
 * Q8_0 follows the CPU's q8_0 path operation for operation, in the order of its scalar
 * reference (kernels/kvcache.c attn_q8_0 with kernels/quant.c's scalar Q8_0 dot): K and V
 * rows are quantized as 32-value blocks when stored (tsr_cuda_quant_q8_0: d = amax / 127,
 * q = roundf(x / d), the bytes of tsr_kv_store), and so is q before q·k; a score is the
 * blocks' contributions (d_k * d_q) * sum(k_q * q_q) (exact integer sums) added in block
 * order, times the scale; the softmax takes the max, then the sum of exp(s - max) in
 * position order, then exp(s - max) * (1 / sum); each output value is an FMA chain over
 * the positions in order, fmaf(d_v * q_v, p, acc). The device runs three passes over the
 * KV blocks (max; sum; probabilities and V) with every sum in the CPU's order, so on the
 * host this arithmetic is bit-identical to the CPU's scalar path; on a GPU only expf (CUDA's
 * is within 2 ulp of glibc's) can differ, and the CPU's AVX2 / AVX-512 Q8_0 dots add the
 * block terms in another float order than its scalar one. */
#define TSR_CUDA_KV_F32  0u
#define TSR_CUDA_KV_F16  1u
#define TSR_CUDA_KV_Q8_0 8u

/* Whether the device pool can store type with heads of head_dim values (Q8_0: whole
 * 32-value blocks per head). */
TSR_CUDA_HD bool tsr_cuda_kv_type_ok(uint32_t type, int32_t head_dim)
{
    if (type == TSR_CUDA_KV_F32 || type == TSR_CUDA_KV_F16) return head_dim > 0;
    return type == TSR_CUDA_KV_Q8_0 && head_dim > 0 && head_dim % 32 == 0;
}

/* Bytes of n values of a KV row stored as type (0: unsupported type, or Q8_0 with n not a
 * multiple of 32); as tsr_kv_row_bytes. */
TSR_CUDA_HD size_t tsr_cuda_kv_row_bytes(uint32_t type, int64_t n)
{
    if (n < 0) return 0u;
    if (type == TSR_CUDA_KV_F32) return (size_t)n * 4u;
    if (type == TSR_CUDA_KV_F16) return (size_t)n * 2u;
    if (type == TSR_CUDA_KV_Q8_0 && n % 32 == 0) return (size_t)(n / 32) * sizeof(tsr_cuda_q8_0);
    return 0u;
}

/* Element i of a KV row stored as type (F32 or F16; Q8_0: d * q of its block). */
TSR_CUDA_HD float tsr_cuda_kv_get(uint32_t type, const void *row, int64_t i)
{
    if (type == TSR_CUDA_KV_F16) return tsr_cuda_f16_to_f32(((const uint16_t *)row)[i]);
    if (type == TSR_CUDA_KV_Q8_0) {
        const tsr_cuda_q8_0 *b = (const tsr_cuda_q8_0 *)row + i / 32;
        return tsr_cuda_f16_to_f32(b->d) * (float)b->qs[i % 32];
    }
    return ((const float *)row)[i];
}

/* Store x as element i of a KV row of type F32 or F16 (fp16: round to nearest even). Q8_0
 * rows are stored a block at a time (tsr_cuda_quant_q8_0). */
TSR_CUDA_HD void tsr_cuda_kv_put(uint32_t type, void *row, int64_t i, float x)
{
    if (type == TSR_CUDA_KV_F16)
        ((uint16_t *)row)[i] = tsr_cuda_f32_to_f16(x);
    else
        ((float *)row)[i] = x;
}

/* x rounded to fp16 and back (the f16 path's Q and probabilities). */
TSR_CUDA_HD float tsr_cuda_round_f16(float x)
{
    return tsr_cuda_f16_to_f32(tsr_cuda_f32_to_f16(x));
}

/* The f16 path's weight of a score s: exp(s - m) * inv_sum rounded to fp16 (0 for masked
 * positions, s = -INFINITY), m the max and inv_sum = 1 / sum of exp(s - m). */
TSR_CUDA_HD float tsr_cuda_attn_prob_f16(float s, float m, float inv_sum)
{
    return s == -INFINITY ? 0.0f : tsr_cuda_round_f16(expf(s - m) * inv_sum);
}

/* Q8_0 q·k of one head: block b's contribution from its exact integer sum si[b] (the device
 * adds the 4 lane parts of tsr_cuda_isum_part32 first), added in block order as the CPU's
 * scalar Q8_0 dot; times scale. k, q: nb blocks. */
TSR_CUDA_HD float tsr_cuda_kv_q8_0_score(const tsr_cuda_q8_0 *k, const tsr_cuda_q8_0 *q,
                                         const int32_t *si, int nb, float scale)
{
    float s = 0.0f;
    for (int b = 0; b < nb; ++b) s += tsr_cuda_dot_combine32(TSR_CUDA_Q8_0, &k[b], &q[b], si[b]);
    return s * scale;
}

/* The Q8_0 path's softmax steps (the CPU's tsr_softmax): e = exp(s - m) (0 for masked
 * positions), the sum of the e in position order, then the probability e * (1 / sum). */
TSR_CUDA_HD float tsr_cuda_attn_exp(float s, float m)
{
    return s == -INFINITY ? 0.0f : expf(s - m);
}

/* One step of output value i's FMA chain over the positions: acc + (d_v * q_v) * p, fused
 * (the CPU's fmaf in kernels/kvcache.c v_q8_0_*). */
TSR_CUDA_HD float tsr_cuda_kv_q8_0_v_fma(const tsr_cuda_q8_0 *v, int i, float p, float acc)
{
    const tsr_cuda_q8_0 *b = v + i / 32;
    return fmaf(tsr_cuda_f16_to_f32(b->d) * (float)b->qs[i % 32], p, acc);
}

/* RoPE. Modes: NORM rotates adjacent pairs (2i, 2i+1) (llama); NEOX rotates (i, i + n_rot/2)
 * (qwen2/3, gemma3). The angle of pair i (i0 = 2i) comes in the two float orders the CPU
 * uses: theta = pos * freq_scale * base^(-i0/n_rot) / freq_factor[i] with powf per pair
 * (kernels/ops.c tsr_rope), or ggml's running product (tsr_rope_ext, ggml_rope_cache_init):
 * t_0 = pos, t_{k+1} = t_k * base^(-2/n_rot), theta = freq_scale * (t_i / freq_factor[i]).
 * freq_factors: llama3 / longrope tables (NULL -> 1). YaRN (ext_factor != 0) mixes the
 * interpolated and extrapolated angles with ggml's ramp over corr_dims and scales by mscale
 * (ggml rope_yarn); attn_factor scales sin and cos (1 otherwise). */
enum { TSR_CUDA_ROPE_NORM = 0, TSR_CUDA_ROPE_NEOX = 2 };

typedef struct {
    int32_t mode; /* TSR_CUDA_ROPE_NORM / _NEOX */
    int32_t n_rot;
    float freq_base;
    float freq_scale;
    float ext_factor;   /* YaRN mix (0: off) */
    float attn_factor;  /* YaRN magnitude scale (1: none) */
    float corr_dims[2]; /* YaRN ramp (ggml_rope_yarn_corr_dims) */
    int32_t ggml_theta; /* 1: ggml's running-product angles; 0: powf per pair */
} tsr_cuda_rope_params;

TSR_CUDA_HD void tsr_cuda_rope_cs(const tsr_cuda_rope_params *rp, int32_t pos, int i0, float ff,
                                  float *c, float *s)
{
    float theta, extrap, mscale = rp->attn_factor;
    if (rp->ggml_theta) {
        const float theta_scale = powf(rp->freq_base, -2.0f / (float)rp->n_rot);
        float t = (float)pos;
        for (int k = 0; k < i0 / 2; ++k) t *= theta_scale;
        extrap = t / ff;
        theta = rp->freq_scale * extrap;
    } else {
        const float inv = powf(rp->freq_base, -(float)i0 / (float)rp->n_rot);
        theta = (float)pos * rp->freq_scale * inv / ff;
        extrap = (float)pos * inv / ff;
    }
    if (rp->ext_factor != 0.0f) {
        const float interp = rp->freq_scale * extrap;
        const float den = rp->corr_dims[1] - rp->corr_dims[0];
        const float y = ((float)(i0 / 2) - rp->corr_dims[0]) / (den > 0.001f ? den : 0.001f);
        const float ramp = 1.0f - fminf(1.0f, fmaxf(0.0f, y));
        const float mix = ramp * rp->ext_factor;
        theta = interp * (1 - mix) + extrap * mix;
        mscale *= 1.0f + 0.1f * logf(1.0f / rp->freq_scale);
    }
    *c = cosf(theta) * mscale;
    *s = sinf(theta) * mscale;
}

/* Indices of the two values pair i0 (even, < n_rot) rotates within a head. */
TSR_CUDA_HD void tsr_cuda_rope_pair(int32_t mode, int32_t n_rot, int i0, int *a, int *b)
{
    if (mode == TSR_CUDA_ROPE_NEOX) {
        *a = i0 / 2;
        *b = i0 / 2 + n_rot / 2;
    } else {
        *a = i0;
        *b = i0 + 1;
    }
}

TSR_CUDA_HD void tsr_cuda_rope_rotate(float *x0, float *x1, float c, float s)
{
    const float a = *x0, b = *x1;
    /* as kernels/ops.c (ggml's rotate_pairs as GCC contracts it) */
    *x0 = fmaf(a, c, -(b * s));
    *x1 = fmaf(a, s, b * c);
}

/* Final logit soft-capping (worker/model.c): cap * tanh(x / cap). */
TSR_CUDA_HD float tsr_cuda_softcap_value(float x, float cap)
{
    return cap * tanhf(x / cap);
}

/* ggml_v_expf's AVX-512 polynomial for one float (kernels/dot_ggml.c gg_expf_scalar). */
TSR_CUDA_HD float tsr_cuda_ggml_expf(float x)
{
    const float r = 0x1.8p23f;
    const float z = fmaf(x, 0x1.715476p+0f, r);
    const float n = z - r;
    const float b = fmaf(-n, 0x1.7f7d1cp-20f, fmaf(-n, 0x1.62e4p-1f, x));
    const float u = b * b;
    const float j = fmaf(fmaf(fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u,
                              fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f)),
                         u, fmaf(0x1.ffffecp-1f, b, 1.0f));
    if (fabsf(n) > 192.0f) return n <= 0.0f ? 0.0f : INFINITY;
    return ldexpf(j, (int)n);
}

/* Gated units: SwiGLU silu(g)*u as kernels/ops.c for rows of whole 16s (ggml's vector expf;
 * the CPU uses libm expf for the elements past a row's last whole 16, which no model here
 * has), GeGLU with ggml's tanh GELU. */
TSR_CUDA_HD float tsr_cuda_swiglu(float g, float u)
{
    return g / (1.0f + tsr_cuda_ggml_expf(0.0f - g)) * u;
}

TSR_CUDA_HD float tsr_cuda_gelu_tanh(float x)
{
    const float k_sqrt_2_over_pi = 0.79788456080286535587989211986876f;
    const float k_coef_a = 0.044715f;
    return 0.5f * x * (1.0f + tanhf(k_sqrt_2_over_pi * x * (1.0f + k_coef_a * x * x)));
}

/* GeGLU as ggml's CPU backend (and kernels/ops.c tsr_geglu) computes it: the GELU of the
 * input rounded to fp16, rounded to fp16 again (ggml's 64K-entry table), 0 for g <= -10 and
 * g for g >= 10; times up. */
TSR_CUDA_HD float tsr_cuda_geglu(float g, float u)
{
    float y;
    if (g <= -10.0f)
        y = 0.0f;
    else if (g >= 10.0f)
        y = g;
    else
        y = tsr_cuda_f16_to_f32(
            tsr_cuda_f32_to_f16(tsr_cuda_gelu_tanh(tsr_cuda_f16_to_f32(tsr_cuda_f32_to_f16(g)))));
    return y * u;
}

#endif /* TSR_CUDA_NUMERICS_H */
