/*
 * quant.c — element types: block layouts, fp16/bf16 conversion, dequantize, quantize and
 * the dot-product kernels the matmul runs on (see quant.h for the contract).
 *
 * Why this shape:
 *  - Layouts, dequantization and the reference quantizers follow ggml (ggml-common.h,
 *    ggml-quants.c) operation by operation, so dequantized weights are bit-identical to
 *    ggml's to_float and our quantizers reproduce llama-quantize's bytes (checked against
 *    the synthetic GGUF files in the tests).
 *  - Dots are the decode hot loop: one token reads every weight byte once, so a kernel
 *    must keep up with memory bandwidth (~20-25 GB/s per core). Integer dots per block
 *    (vpmaddubsw / VNNI vpdpbusd), fp16 scales converted 8 blocks at a time with F16C,
 *    rows streamed one after the other (a single sequential stream, which the prefetchers
 *    follow best) with what they share about the activation computed once per call.
 *  - The file is compiled for baseline x86-64; SIMD kernels carry target attributes and
 *    are picked at run time (__builtin_cpu_supports), the scalar code is the reference
 *    and the fallback on other CPUs/architectures.
 *  - Dequantization stays scalar: it must round exactly like ggml (e.g. Q4_K's
 *    (d*sc)*q - (dmin*m) in float32; no FMA contraction, which ISO C mode -std=c11 keeps
 *    off) and it is not hot (embedding lookups, tests).
 */
#include "kernels/quant.h"

#include "kernels/dot_ggml.h"
#include "kernels/q40_gemm.h"
#include "kernels/q80_gemv.h"
#include "kernels/util.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define TSR_X86 1
#else
#define TSR_X86 0
#endif

/* ---------------------------------------------------------------------------------------
 * Block layouts (ggml-common.h). fp16 fields are stored as raw uint16 bits.
 * ------------------------------------------------------------------------------------- */

typedef struct {
    uint16_t d;           /* scale */
    int8_t qs[TSR_QK8_0]; /* x = d*q */
} blk_q8_0;

typedef struct {
    uint16_t d;                /* scale */
    uint8_t qs[TSR_QK4_0 / 2]; /* element j: low nibble of qs[j]; j+16: high nibble */
} blk_q4_0;

typedef struct {
    uint16_t d;                /* scale */
    uint16_t m;                /* min: x = d*q + m */
    uint8_t qs[TSR_QK4_0 / 2]; /* as Q4_0 */
} blk_q4_1;

typedef struct {
    uint16_t d;                /* scale: x = d*(q - 16) */
    uint8_t qh[4];             /* bit j: 5th bit of element j (little-endian uint32) */
    uint8_t qs[TSR_QK4_0 / 2]; /* low 4 bits, as Q4_0 */
} blk_q5_0;

typedef struct {
    uint16_t d; /* scale */
    uint16_t m; /* min: x = d*q + m */
    uint8_t qh[4];
    uint8_t qs[TSR_QK4_0 / 2];
} blk_q5_1;

typedef struct {
    uint16_t d;           /* scale */
    uint16_t s;           /* fp16(d_unrounded * sum(qs)): the min term of Q4_1 / Q5_1 dots */
    int8_t qs[TSR_QK8_0]; /* x = d*q */
} blk_q8_1;

typedef struct {
    uint8_t scales[TSR_QK_K / 16]; /* per 16 elements: scale (low 4 bits), min (high 4) */
    uint8_t qs[TSR_QK_K / 4];      /* 2-bit quants: 128 elements per 32 bytes, 4 shifts */
    uint16_t d;                    /* super-block scale of the scales */
    uint16_t dmin;                 /* super-block scale of the mins */
} blk_q2_K;

typedef struct {
    uint8_t hmask[TSR_QK_K / 8]; /* high bit; set = no -4 offset */
    uint8_t qs[TSR_QK_K / 4];    /* low 2 bits, as Q2_K */
    uint8_t scales[12];          /* 16 scales of 6 bits (offset 32) */
    uint16_t d;                  /* super-block scale */
} blk_q3_K;

typedef struct {
    uint16_t d; /* as Q4_K */
    uint16_t dmin;
    uint8_t scales[12];
    uint8_t qh[TSR_QK_K / 8]; /* 5th bit: element 64j+l bit 2j of qh[l], 64j+32+l 2j+1 */
    uint8_t qs[TSR_QK_K / 2]; /* low 4 bits, as Q4_K */
} blk_q5_K;

typedef struct {
    uint16_t d;               /* super-block scale of the 6-bit sub-block scales */
    uint16_t dmin;            /* super-block scale of the 6-bit sub-block mins */
    uint8_t scales[12];       /* 8 scales + 8 mins, 6 bits each (get_scale_min_k4) */
    uint8_t qs[TSR_QK_K / 2]; /* 4-bit quants; 64 elements per 32 bytes (low, high) */
} blk_q4_K;

typedef struct {
    uint8_t ql[TSR_QK_K / 2];     /* low 4 bits */
    uint8_t qh[TSR_QK_K / 4];     /* high 2 bits */
    int8_t scales[TSR_QK_K / 16]; /* one per 16 elements */
    uint16_t d;                   /* super-block scale */
} blk_q6_K;

typedef struct {
    float d;                      /* scale (negative when the largest-magnitude x > 0) */
    int8_t qs[TSR_QK_K];          /* quants in [-127, 127] */
    int16_t bsums[TSR_QK_K / 16]; /* sum of qs per 16 elements (for mins / offsets) */
} blk_q8_K;

_Static_assert(sizeof(blk_q8_0) == 34, "Q8_0 block");
_Static_assert(sizeof(blk_q4_0) == 18, "Q4_0 block");
_Static_assert(sizeof(blk_q4_1) == 20, "Q4_1 block");
_Static_assert(sizeof(blk_q5_0) == 22, "Q5_0 block");
_Static_assert(sizeof(blk_q5_1) == 24, "Q5_1 block");
_Static_assert(sizeof(blk_q8_1) == 36, "Q8_1 block");
_Static_assert(sizeof(blk_q2_K) == 84, "Q2_K block");
_Static_assert(sizeof(blk_q3_K) == 110, "Q3_K block");
_Static_assert(sizeof(blk_q4_K) == 144, "Q4_K block");
_Static_assert(sizeof(blk_q5_K) == 176, "Q5_K block");
_Static_assert(sizeof(blk_q6_K) == 210, "Q6_K block");
_Static_assert(sizeof(blk_q8_K) == 292, "Q8_K block");

/* ---------------------------------------------------------------------------------------
 * Type table
 * ------------------------------------------------------------------------------------- */

/* ggml's types by id (ggml.h, ggml-common.h): name, elements and bytes per block; a NULL
 * name = id removed / never defined. Sizes are ggml's sizeof(block_*) (Q8_1: 36). */
static const struct {
    const char *name;
    int64_t be;
    size_t bb;
} k_types[TSR_TYPE_COUNT] = {
    [0] = {"F32", 1, 4},         [1] = {"F16", 1, 2},         [2] = {"Q4_0", 32, 18},
    [3] = {"Q4_1", 32, 20},      [6] = {"Q5_0", 32, 22},      [7] = {"Q5_1", 32, 24},
    [8] = {"Q8_0", 32, 34},      [9] = {"Q8_1", 32, 36},      [10] = {"Q2_K", 256, 84},
    [11] = {"Q3_K", 256, 110},   [12] = {"Q4_K", 256, 144},   [13] = {"Q5_K", 256, 176},
    [14] = {"Q6_K", 256, 210},   [15] = {"Q8_K", 256, 292},   [16] = {"IQ2_XXS", 256, 66},
    [17] = {"IQ2_XS", 256, 74},  [18] = {"IQ3_XXS", 256, 98}, [19] = {"IQ1_S", 256, 50},
    [20] = {"IQ4_NL", 32, 18},   [21] = {"IQ3_S", 256, 110},  [22] = {"IQ2_S", 256, 82},
    [23] = {"IQ4_XS", 256, 136}, [24] = {"I8", 1, 1},         [25] = {"I16", 1, 2},
    [26] = {"I32", 1, 4},        [27] = {"I64", 1, 8},        [28] = {"F64", 1, 8},
    [29] = {"IQ1_M", 256, 56},   [30] = {"BF16", 1, 2},       [34] = {"TQ1_0", 256, 54},
    [35] = {"TQ2_0", 256, 66},   [39] = {"MXFP4", 32, 17},    [40] = {"NVFP4", 64, 36},
    [41] = {"Q1_0", 128, 18},
};

bool tsr_type_supported(uint32_t type)
{
    switch (type) {
    case TSR_TYPE_F32:
    case TSR_TYPE_F16:
    case TSR_TYPE_BF16:
    case TSR_TYPE_Q8_0:
    case TSR_TYPE_Q4_0:
    case TSR_TYPE_Q4_1:
    case TSR_TYPE_Q5_0:
    case TSR_TYPE_Q5_1:
    case TSR_TYPE_Q2_K:
    case TSR_TYPE_Q3_K:
    case TSR_TYPE_Q4_K:
    case TSR_TYPE_Q5_K:
    case TSR_TYPE_Q6_K:
        return true;
    default:
        return false;
    }
}

const char *tsr_type_supported_list(void)
{
    return "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";
}

const char *tsr_type_name(uint32_t type)
{
    if (type >= TSR_TYPE_COUNT || !k_types[type].name) return "unknown";
    return k_types[type].name;
}

bool tsr_type_ggml_block(uint32_t type, int64_t *block_elems, size_t *block_bytes)
{
    if (type >= TSR_TYPE_COUNT || !k_types[type].name) return false;
    if (block_elems) *block_elems = k_types[type].be;
    if (block_bytes) *block_bytes = k_types[type].bb;
    return true;
}

/* Weight types plus the two activation types have sizes; the rest 0 (see quant.h). */
static bool type_sized(uint32_t type)
{
    return tsr_type_supported(type) || type == TSR_TYPE_Q8_1 || type == TSR_TYPE_Q8_K;
}

int64_t tsr_type_block_elems(uint32_t type)
{
    return type_sized(type) ? k_types[type].be : 0;
}

size_t tsr_type_block_bytes(uint32_t type)
{
    return type_sized(type) ? k_types[type].bb : 0;
}

size_t tsr_row_bytes(uint32_t type, int64_t n)
{
    const int64_t be = tsr_type_block_elems(type);
    if (be == 0 || n < 0 || n % be != 0) return 0;
    return (size_t)(n / be) * tsr_type_block_bytes(type);
}

uint32_t tsr_type_vec_dot_type(uint32_t type)
{
    switch (type) {
    case TSR_TYPE_F32:
    case TSR_TYPE_F16:
    case TSR_TYPE_BF16:
        return TSR_TYPE_F32;
    case TSR_TYPE_Q8_0:
    case TSR_TYPE_Q4_0:
    case TSR_TYPE_Q5_0:
        return TSR_TYPE_Q8_0;
    case TSR_TYPE_Q4_1:
    case TSR_TYPE_Q5_1:
        return TSR_TYPE_Q8_1;
    case TSR_TYPE_Q2_K:
    case TSR_TYPE_Q3_K:
    case TSR_TYPE_Q4_K:
    case TSR_TYPE_Q5_K:
    case TSR_TYPE_Q6_K:
        return tsr_type_supported(type) ? TSR_TYPE_Q8_K : TSR_TYPE_COUNT;
    default:
        return TSR_TYPE_COUNT;
    }
}

/* ---------------------------------------------------------------------------------------
 * fp16 / bf16 scalar conversions
 * ------------------------------------------------------------------------------------- */

static inline uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float f32_from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float tsr_f16_to_f32(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000u | (man << 13)); /* inf, NaN */
    if (exp != 0) return f32_from_bits(sign | ((exp + 112u) << 23) | (man << 13));
    /* zero or subnormal: man * 2^-24, exact in float32 */
    return f32_from_bits(sign | f32_bits((float)man * 0x1p-24f));
}

uint16_t tsr_f32_to_f16(float f)
{
    const uint32_t x = f32_bits(f);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00u;  /* NaN -> quiet NaN, as ggml */
    if (ax >= 0x477ff000u) return sign | 0x7c00u; /* >= 65520 rounds to inf */
    if (ax < 0x38800000u) {
        /* below 2^-14: a half subnormal (or zero) = round(|f| / 2^-24). Adding 0.5 puts
         * the value where a float's ulp is 2^-24, so the FPU's own round-to-nearest-even
         * does the rounding; 2^-14 itself comes out as 0x400, the smallest normal. */
        const float t = f32_from_bits(ax) + 0.5f;
        return sign | (uint16_t)(f32_bits(t) - 0x3f000000u);
    }
    /* normal: rebias the exponent (-112 << 23) and round the 13 dropped bits to nearest
     * even; a carry out of the mantissa correctly bumps the exponent. */
    const uint32_t odd = (ax >> 13) & 1u;
    return sign | (uint16_t)((ax + 0xc8000fffu + odd) >> 13);
}

float tsr_bf16_to_f32(uint16_t h)
{
    return f32_from_bits((uint32_t)h << 16);
}

uint16_t tsr_f32_to_bf16(float f)
{
    const uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64u); /* quiet NaN */
    return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

static inline float f16(uint16_t h)
{
    return tsr_f16_to_f32(h);
}

/* ---------------------------------------------------------------------------------------
 * Dequantization (scalar, ggml's exact operation order)
 * ------------------------------------------------------------------------------------- */

/* Sub-block j (0..7) scale and min of a Q4_K block: 6 bits each, packed in 12 bytes. */
static inline void get_scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *m)
{
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

static void dequant_q8_0(const blk_q8_0 *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i) {
        const float d = f16(x[i].d);
        for (int j = 0; j < TSR_QK8_0; ++j) y[i * TSR_QK8_0 + j] = x[i].qs[j] * d;
    }
}

static void dequant_q4_0(const blk_q4_0 *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i) {
        const float d = f16(x[i].d);
        for (int j = 0; j < TSR_QK4_0 / 2; ++j) {
            const int x0 = (x[i].qs[j] & 0x0F) - 8;
            const int x1 = (x[i].qs[j] >> 4) - 8;
            y[i * TSR_QK4_0 + j] = x0 * d;
            y[i * TSR_QK4_0 + j + TSR_QK4_0 / 2] = x1 * d;
        }
    }
}

/* x = d*q + m in float32, two roundings (no FMA: ISO C mode keeps contraction off). */
static void dequant_q4_1(const blk_q4_1 *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i) {
        const float d = f16(x[i].d), m = f16(x[i].m);
        for (int j = 0; j < TSR_QK4_0 / 2; ++j) {
            const int x0 = x[i].qs[j] & 0x0F;
            const int x1 = x[i].qs[j] >> 4;
            y[i * TSR_QK4_0 + j] = x0 * d + m;
            y[i * TSR_QK4_0 + j + TSR_QK4_0 / 2] = x1 * d + m;
        }
    }
}

/* The 5-bit quants of a Q5_0 / Q5_1 block, element order, 0..31. */
static inline void q5_unpack(const uint8_t qh_bytes[4], const uint8_t qs[16], int q[32])
{
    uint32_t qh;
    memcpy(&qh, qh_bytes, 4);
    for (int j = 0; j < 16; ++j) {
        q[j] = (qs[j] & 0x0F) | (int)(((qh >> j) & 1u) << 4);
        q[j + 16] = (qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4);
    }
}

static void dequant_q5_0(const blk_q5_0 *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i) {
        const float d = f16(x[i].d);
        int q[32];
        q5_unpack(x[i].qh, x[i].qs, q);
        for (int j = 0; j < 32; ++j) y[i * 32 + j] = (q[j] - 16) * d;
    }
}

static void dequant_q5_1(const blk_q5_1 *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i) {
        const float d = f16(x[i].d), m = f16(x[i].m);
        int q[32];
        q5_unpack(x[i].qh, x[i].qs, q);
        for (int j = 0; j < 32; ++j) y[i * 32 + j] = q[j] * d + m;
    }
}

static void dequant_q8_1(const blk_q8_1 *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i) {
        const float d = f16(x[i].d);
        for (int j = 0; j < TSR_QK8_0; ++j) y[i * TSR_QK8_0 + j] = x[i].qs[j] * d;
    }
}

/* Q2_K: 16 groups of 16; group g of half h (128 elements) reads bits 2*(g/2 % 4) of
 * qs[32h + 16*(g%2) + l]; x = (d*sc)*q - (dmin*m). */
static void dequant_q2_K(const blk_q2_K *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i) {
        const float d = f16(x[i].d), min = f16(x[i].dmin);
        const uint8_t *q = x[i].qs;
        int is = 0;
        for (int half = 0; half < 2; ++half) {
            for (int shift = 0; shift < 8; shift += 2) {
                for (int k = 0; k < 2; ++k) {
                    const uint8_t sc = x[i].scales[is++];
                    const float dl = d * (sc & 0xF), ml = min * (sc >> 4);
                    for (int l = 0; l < 16; ++l) *y++ = dl * ((q[16 * k + l] >> shift) & 3) - ml;
                }
            }
            q += 32;
        }
    }
}

/* Q3_K's 16 6-bit scales (12 packed bytes) as signed values (offset 32 removed). */
static inline void q3_K_scales(const uint8_t packed[12], int8_t out[16])
{
    for (int j = 0; j < 16; ++j) {
        const int lo = j < 8 ? packed[j] & 0xF : packed[j - 8] >> 4;
        const int hi = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
        out[j] = (int8_t)((lo | (hi << 4)) - 32);
    }
}

/* Q3_K: x = (d*sc)*(q2 - (hmask bit ? 0 : 4)); the 2-bit layout is Q2_K's, the high bit
 * of element 32*k + l (k = 0..7) is bit k of hmask[l]. */
static void dequant_q3_K(const blk_q3_K *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i) {
        const float d_all = f16(x[i].d);
        int8_t sc[16];
        q3_K_scales(x[i].scales, sc);
        const uint8_t *q = x[i].qs, *hm = x[i].hmask;
        uint8_t m = 1;
        int is = 0;
        for (int half = 0; half < 2; ++half) {
            for (int shift = 0; shift < 8; shift += 2) {
                for (int k = 0; k < 2; ++k) {
                    const float dl = d_all * sc[is++];
                    for (int l = 0; l < 16; ++l) {
                        const int v =
                            ((q[16 * k + l] >> shift) & 3) - ((hm[16 * k + l] & m) ? 0 : 4);
                        *y++ = dl * v;
                    }
                }
                m <<= 1;
            }
            q += 32;
        }
    }
}

static void dequant_q5_K(const blk_q5_K *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i) {
        const uint8_t *ql = x[i].qs, *qh = x[i].qh;
        const float d = f16(x[i].d), min = f16(x[i].dmin);
        uint8_t u1 = 1, u2 = 2;
        for (int j = 0; j < TSR_QK_K / 64; ++j) {
            uint8_t sc, m;
            get_scale_min_k4(2 * j, x[i].scales, &sc, &m);
            const float d1 = d * sc, m1 = min * m;
            get_scale_min_k4(2 * j + 1, x[i].scales, &sc, &m);
            const float d2 = d * sc, m2 = min * m;
            for (int l = 0; l < 32; ++l) *y++ = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
            for (int l = 0; l < 32; ++l) *y++ = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
            ql += 32;
            u1 <<= 2;
            u2 <<= 2;
        }
    }
}

static void dequant_q4_K(const blk_q4_K *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i) {
        const uint8_t *q = x[i].qs;
        const float d = f16(x[i].d);
        const float min = f16(x[i].dmin);
        for (int j = 0; j < TSR_QK_K / 64; ++j) {
            uint8_t sc, m;
            get_scale_min_k4(2 * j, x[i].scales, &sc, &m);
            const float d1 = d * sc, m1 = min * m;
            get_scale_min_k4(2 * j + 1, x[i].scales, &sc, &m);
            const float d2 = d * sc, m2 = min * m;
            for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0xF) - m1;
            for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
            q += 32;
        }
    }
}

static void dequant_q6_K(const blk_q6_K *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i) {
        const float d = f16(x[i].d);
        const uint8_t *ql = x[i].ql;
        const uint8_t *qh = x[i].qh;
        const int8_t *sc = x[i].scales;
        for (int half = 0; half < 2; ++half) {
            for (int l = 0; l < 32; ++l) {
                const int is = l / 16;
                const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l + 0] = d * sc[is + 0] * q1;
                y[l + 32] = d * sc[is + 2] * q2;
                y[l + 64] = d * sc[is + 4] * q3;
                y[l + 96] = d * sc[is + 6] * q4;
            }
            y += 128;
            ql += 64;
            qh += 32;
            sc += 8;
        }
    }
}

static void dequant_q8_K(const blk_q8_K *x, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i) {
        for (int j = 0; j < TSR_QK_K; ++j) *y++ = x[i].d * x[i].qs[j];
    }
}

void tsr_dequant_row(uint32_t type, const void *src, float *dst, int64_t n)
{
    const int64_t be = tsr_type_block_elems(type);
    if (be == 0 || n <= 0) {
        if (n > 0) memset(dst, 0, (size_t)n * sizeof(float));
        return;
    }
    const int64_t nb = n / be;
    switch (type) {
    case TSR_TYPE_F32:
        memcpy(dst, src, (size_t)n * sizeof(float));
        break;
    case TSR_TYPE_F16: {
        const uint16_t *h = src;
        for (int64_t i = 0; i < n; ++i) dst[i] = tsr_f16_to_f32(h[i]);
        break;
    }
    case TSR_TYPE_BF16: {
        const uint16_t *h = src;
        for (int64_t i = 0; i < n; ++i) dst[i] = tsr_bf16_to_f32(h[i]);
        break;
    }
    case TSR_TYPE_Q8_0:
        dequant_q8_0(src, dst, nb);
        break;
    case TSR_TYPE_Q4_0:
        dequant_q4_0(src, dst, nb);
        break;
    case TSR_TYPE_Q4_1:
        dequant_q4_1(src, dst, nb);
        break;
    case TSR_TYPE_Q5_0:
        dequant_q5_0(src, dst, nb);
        break;
    case TSR_TYPE_Q5_1:
        dequant_q5_1(src, dst, nb);
        break;
    case TSR_TYPE_Q8_1:
        dequant_q8_1(src, dst, nb);
        break;
    case TSR_TYPE_Q2_K:
        dequant_q2_K(src, dst, nb);
        break;
    case TSR_TYPE_Q3_K:
        dequant_q3_K(src, dst, nb);
        break;
    case TSR_TYPE_Q4_K:
        dequant_q4_K(src, dst, nb);
        break;
    case TSR_TYPE_Q5_K:
        dequant_q5_K(src, dst, nb);
        break;
    case TSR_TYPE_Q6_K:
        dequant_q6_K(src, dst, nb);
        break;
    case TSR_TYPE_Q8_K:
        dequant_q8_K(src, dst, nb);
        break;
    default:
        break;
    }
}

/* ---------------------------------------------------------------------------------------
 * Quantization (ggml's quantize_row_*_ref, same float operation order)
 * ------------------------------------------------------------------------------------- */

#define GROUP_MAX_EPS 1e-15f

static inline int imin(int a, int b)
{
    return a < b ? a : b;
}

static inline int imax(int a, int b)
{
    return a > b ? a : b;
}

/* Round to nearest (ties to even) via the float adder: valid for |f| <= 4194303. */
static inline int nearest_int(float f)
{
    const float v = f + 12582912.f;
    return (int)(f32_bits(v) & 0x007fffffu) - 0x00400000;
}

static void quant_q8_0(const float *x, blk_q8_0 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i, x += TSR_QK8_0) {
        float amax = 0.0f;
        for (int j = 0; j < TSR_QK8_0; ++j) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = tsr_f32_to_f16(d);
        for (int j = 0; j < TSR_QK8_0; ++j) y[i].qs[j] = (int8_t)roundf(x[j] * id);
    }
}

static void quant_q4_0(const float *x, blk_q4_0 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i, x += TSR_QK4_0) {
        /* the signed value of largest magnitude maps to -8, so the full [-8, 7] is used */
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < TSR_QK4_0; ++j) {
            if (amax < fabsf(x[j])) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        }
        const float d = max / -8;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = tsr_f32_to_f16(d);
        for (int j = 0; j < TSR_QK4_0 / 2; ++j) {
            const int xi0 = imin(15, (int8_t)(x[j] * id + 8.5f));
            const int xi1 = imin(15, (int8_t)(x[j + TSR_QK4_0 / 2] * id + 8.5f));
            y[i].qs[j] = (uint8_t)(xi0 | (xi1 << 4));
        }
    }
}

/* Block min and max (ggml starts from +-FLT_MAX). */
static inline void block_min_max(const float *x, int n, float *mn, float *mx)
{
    float lo = 3.402823466e+38f, hi = -3.402823466e+38f;
    for (int j = 0; j < n; ++j) {
        if (x[j] < lo) lo = x[j];
        if (x[j] > hi) hi = x[j];
    }
    *mn = lo;
    *mx = hi;
}

static void quant_q4_1(const float *x, blk_q4_1 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i, x += 32) {
        float min, max;
        block_min_max(x, 32, &min, &max);
        const float d = (max - min) / 15;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = tsr_f32_to_f16(d);
        y[i].m = tsr_f32_to_f16(min);
        for (int j = 0; j < 16; ++j) {
            const int xi0 = imin(15, (int8_t)((x[j] - min) * id + 0.5f));
            const int xi1 = imin(15, (int8_t)((x[j + 16] - min) * id + 0.5f));
            y[i].qs[j] = (uint8_t)(xi0 | (xi1 << 4));
        }
    }
}

/* The low nibbles of q[0..31] into qs (element j low, j+16 high) and the 5th bits into qh. */
static inline void q5_pack(const int q[32], uint8_t qs[16], uint8_t qh_bytes[4])
{
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
        qs[j] = (uint8_t)((q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4));
        qh |= ((uint32_t)(q[j] & 0x10) >> 4) << j;
        qh |= ((uint32_t)(q[j + 16] & 0x10) >> 4) << (j + 16);
    }
    memcpy(qh_bytes, &qh, 4);
}

static void quant_q5_0(const float *x, blk_q5_0 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i, x += 32) {
        float amax = 0.0f, max = 0.0f; /* as Q4_0: the extreme maps to -16 */
        for (int j = 0; j < 32; ++j) {
            if (amax < fabsf(x[j])) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        }
        const float d = max / -16;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = tsr_f32_to_f16(d);
        int q[32];
        for (int j = 0; j < 32; ++j) q[j] = (uint8_t)imin(31, (int8_t)(x[j] * id + 16.5f));
        q5_pack(q, y[i].qs, y[i].qh);
    }
}

static void quant_q5_1(const float *x, blk_q5_1 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i, x += 32) {
        float min, max;
        block_min_max(x, 32, &min, &max);
        const float d = (max - min) / 31;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = tsr_f32_to_f16(d);
        y[i].m = tsr_f32_to_f16(min);
        int q[32];
        for (int j = 0; j < 32; ++j) q[j] = (uint8_t)((x[j] - min) * id + 0.5f); /* no clamp */
        q5_pack(q, y[i].qs, y[i].qh);
    }
}

static void quant_q8_1(const float *x, blk_q8_1 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i, x += TSR_QK8_0) {
        float amax = 0.0f;
        for (int j = 0; j < TSR_QK8_0; ++j) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = tsr_f32_to_f16(d);
        int sum = 0;
        for (int j = 0; j < TSR_QK8_0; ++j) {
            y[i].qs[j] = (int8_t)roundf(x[j] * id);
            sum += y[i].qs[j];
        }
        y[i].s = tsr_f32_to_f16((float)sum * d);
    }
}

static void quant_q8_K(const float *x, blk_q8_K *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i, x += TSR_QK_K) {
        float max = 0, amax = 0;
        for (int j = 0; j < TSR_QK_K; ++j) {
            const float ax = fabsf(x[j]);
            if (ax > amax) {
                amax = ax;
                max = x[j];
            }
        }
        if (!amax) {
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        /* ggml: -127/max with max the signed extreme, so d may be negative; the quants
         * stay in [-127, 127], which the sign-trick dot kernels need. */
        const float iscale = -127.f / max;
        for (int j = 0; j < TSR_QK_K; ++j)
            y[i].qs[j] = (int8_t)imin(127, nearest_int(iscale * x[j]));
        for (int j = 0; j < TSR_QK_K / 16; ++j) {
            int sum = 0;
            for (int l = 0; l < 16; ++l) sum += y[i].qs[j * 16 + l];
            y[i].bsums[j] = (int16_t)sum;
        }
        y[i].d = 1 / iscale;
    }
}

/* ggml's make_qkx2_quants: asymmetric (scale, min) fit of n values to L in [0, nmax]
 * minimizing the weighted squared (use_mad: absolute) error, trying nstep+1 scales around
 * nmax/(max-min). Returns the scale; *the_min = -min (>= 0). */
static float make_qkx2_quants(int n, int nmax, const float *x, const float *weights, uint8_t *L,
                              float *the_min, uint8_t *Laux, float rmin, float rdelta, int nstep,
                              bool use_mad)
{
    float min = x[0], max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        const float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; ++i) {
        const int l = nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)imax(0, imin(nmax, l));
        const float diff = scale * L[i] + min - x[i];
        best_error += weights[i] * (use_mad ? fabsf(diff) : diff * diff);
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * (x[i] - min));
            l = imax(0, imin(nmax, l));
            Laux[i] = (uint8_t)l;
            const float w = weights[i];
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; ++i) {
                const float diff = this_scale * Laux[i] + this_min - x[i];
                cur_error += weights[i] * (use_mad ? fabsf(diff) : diff * diff);
            }
            if (cur_error < best_error) {
                memcpy(L, Laux, (size_t)n);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* ggml's make_qx_quants with rmse_type 1 and no importance weights (w = x^2): symmetric
 * fit of n values to L - nmax in [-nmax, nmax-1], trying 19 scales. Returns the scale. */
static float make_qx_quants(int n, int nmax, const float *x, int8_t *L)
{
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        const float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = imax(-nmax, imin(nmax - 1, l));
        L[i] = (int8_t)(l + nmax);
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * x[i]);
            l = imax(-nmax, imin(nmax - 1, l));
            const float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; ++i) {
                const int l = nearest_int(iscale * x[i]);
                L[i] = (int8_t)(nmax + imax(-nmax, imin(nmax - 1, l)));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

static void quant_q4_K(const float *x, blk_q4_K *y, int64_t nb)
{
    uint8_t L[TSR_QK_K], Laux[32];
    float weights[32], mins[TSR_QK_K / 32], scales[TSR_QK_K / 32];
    for (int64_t i = 0; i < nb; ++i, x += TSR_QK_K) {
        float max_scale = 0, max_min = 0; /* mins are subtracted, so both are >= 0 */
        for (int j = 0; j < TSR_QK_K / 32; ++j) {
            float sum_x2 = 0;
            for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
            const float av_x = sqrtf(sum_x2 / 32);
            for (int l = 0; l < 32; ++l) weights[l] = av_x + fabsf(x[32 * j + l]);
            scales[j] = make_qkx2_quants(32, 15, x + 32 * j, weights, L + 32 * j, &mins[j], Laux,
                                         -1.f, 0.1f, 20, false);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        for (int j = 0; j < TSR_QK_K / 32; ++j) {
            const uint8_t ls = (uint8_t)imin(63, (uint8_t)nearest_int(inv_scale * scales[j]));
            const uint8_t lm = (uint8_t)imin(63, (uint8_t)nearest_int(inv_min * mins[j]));
            if (j < 4) {
                y[i].scales[j] = ls;
                y[i].scales[j + 4] = lm;
            } else {
                y[i].scales[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
                y[i].scales[j - 4] |= (uint8_t)((ls >> 4) << 6);
                y[i].scales[j - 0] |= (uint8_t)((lm >> 4) << 6);
            }
        }
        y[i].d = tsr_f32_to_f16(max_scale / 63.f);
        y[i].dmin = tsr_f32_to_f16(max_min / 63.f);
        /* requantize against the rounded 6-bit scales actually stored */
        for (int j = 0; j < TSR_QK_K / 32; ++j) {
            uint8_t sc, m;
            get_scale_min_k4(j, y[i].scales, &sc, &m);
            const float d = f16(y[i].d) * sc;
            if (!d) continue;
            const float dm = f16(y[i].dmin) * m;
            for (int l = 0; l < 32; ++l) {
                const int q = nearest_int((x[32 * j + l] + dm) / d);
                L[32 * j + l] = (uint8_t)imax(0, imin(15, q));
            }
        }
        for (int j = 0; j < TSR_QK_K / 64; ++j) {
            for (int l = 0; l < 32; ++l) {
                y[i].qs[32 * j + l] = (uint8_t)(L[64 * j + l] | (L[64 * j + l + 32] << 4));
            }
        }
    }
}

static void quant_q6_K(const float *x, blk_q6_K *y, int64_t nb)
{
    int8_t L[TSR_QK_K];
    float scales[TSR_QK_K / 16];
    for (int64_t i = 0; i < nb; ++i, x += TSR_QK_K) {
        float max_scale = 0, max_abs_scale = 0;
        for (int ib = 0; ib < TSR_QK_K / 16; ++ib) {
            scales[ib] = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib);
            if (fabsf(scales[ib]) > max_abs_scale) {
                max_abs_scale = fabsf(scales[ib]);
                max_scale = scales[ib];
            }
        }
        if (max_abs_scale < GROUP_MAX_EPS) {
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        const float iscale = -128.f / max_scale;
        y[i].d = tsr_f32_to_f16(1 / iscale);
        for (int ib = 0; ib < TSR_QK_K / 16; ++ib) {
            y[i].scales[ib] = (int8_t)imin(127, nearest_int(iscale * scales[ib]));
        }
        for (int j = 0; j < TSR_QK_K / 16; ++j) {
            const float d = f16(y[i].d) * y[i].scales[j];
            if (!d) continue;
            for (int l = 0; l < 16; ++l) {
                const int q = nearest_int(x[16 * j + l] / d);
                L[16 * j + l] = (int8_t)(imax(-32, imin(31, q)) + 32);
            }
        }
        uint8_t *ql = y[i].ql, *qh = y[i].qh;
        for (int j = 0; j < TSR_QK_K; j += 128) {
            for (int l = 0; l < 32; ++l) {
                const uint8_t q1 = (uint8_t)L[j + l + 0], q2 = (uint8_t)L[j + l + 32];
                const uint8_t q3 = (uint8_t)L[j + l + 64], q4 = (uint8_t)L[j + l + 96];
                ql[l + 0] = (uint8_t)((q1 & 0xF) | ((q3 & 0xF) << 4));
                ql[l + 32] = (uint8_t)((q2 & 0xF) | ((q4 & 0xF) << 4));
                qh[l] =
                    (uint8_t)((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
            }
            ql += 64;
            qh += 32;
        }
    }
}

/* ggml's make_q3_quants with do_rmse: symmetric fit to [-nmax, nmax-1] weighted by x^2,
 * then up to 5 passes moving single quants while that improves the fit. L gets l + nmax. */
static float make_q3_quants(int n, int nmax, const float *x, int8_t *L)
{
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        const float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < GROUP_MAX_EPS) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    const float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = imax(-nmax, imin(nmax - 1, l));
        L[i] = (int8_t)l;
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            const float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * L[i] * L[i];
                int new_l = nearest_int(x[i] * sl2 / slx);
                new_l = imax(-nmax, imin(nmax - 1, new_l));
                if (new_l != L[i]) {
                    slx += w * x[i] * new_l;
                    sl2 += w * new_l * new_l;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (int8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    for (int i = 0; i < n; ++i) L[i] = (int8_t)(L[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* 256 2-bit values (0..3) into Q2_K / Q3_K's qs layout. */
static void pack_2bit(const uint8_t *L, uint8_t *qs)
{
    for (int j = 0; j < TSR_QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) |
                                      (L[j + l + 96] << 6));
        }
    }
}

static void quant_q2_K(const float *x, blk_q2_K *y, int64_t nb)
{
    uint8_t L[TSR_QK_K], Laux[16];
    float weights[16], mins[TSR_QK_K / 16], scales[TSR_QK_K / 16];
    const float q4scale = 15.f;
    for (int64_t i = 0; i < nb; ++i, x += TSR_QK_K) {
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < TSR_QK_K / 16; ++j) {
            for (int l = 0; l < 16; ++l) weights[l] = fabsf(x[16 * j + l]);
            scales[j] = make_qkx2_quants(16, 3, x + 16 * j, weights, L + 16 * j, &mins[j], Laux,
                                         -0.5f, 0.1f, 15, true);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        if (max_scale > 0) {
            const float iscale = q4scale / max_scale;
            for (int j = 0; j < TSR_QK_K / 16; ++j)
                y[i].scales[j] = (uint8_t)nearest_int(iscale * scales[j]);
            y[i].d = tsr_f32_to_f16(max_scale / q4scale);
        } else {
            for (int j = 0; j < TSR_QK_K / 16; ++j) y[i].scales[j] = 0;
            y[i].d = tsr_f32_to_f16(0.f);
        }
        if (max_min > 0) {
            const float iscale = q4scale / max_min;
            for (int j = 0; j < TSR_QK_K / 16; ++j)
                y[i].scales[j] |= (uint8_t)(nearest_int(iscale * mins[j]) << 4);
            y[i].dmin = tsr_f32_to_f16(max_min / q4scale);
        } else {
            y[i].dmin = tsr_f32_to_f16(0.f);
        }
        for (int j = 0; j < TSR_QK_K / 16; ++j) {
            const float d = f16(y[i].d) * (y[i].scales[j] & 0xF);
            if (!d) continue;
            const float dm = f16(y[i].dmin) * (y[i].scales[j] >> 4);
            for (int l = 0; l < 16; ++l) {
                const int q = nearest_int((x[16 * j + l] + dm) / d);
                L[16 * j + l] = (uint8_t)imax(0, imin(3, q));
            }
        }
        pack_2bit(L, y[i].qs);
    }
}

static void quant_q3_K(const float *x, blk_q3_K *y, int64_t nb)
{
    int8_t L[TSR_QK_K];
    float scales[TSR_QK_K / 16];
    for (int64_t i = 0; i < nb; ++i, x += TSR_QK_K) {
        float max_scale = 0, amax = 0;
        for (int j = 0; j < TSR_QK_K / 16; ++j) {
            scales[j] = make_q3_quants(16, 4, x + 16 * j, L + 16 * j);
            const float scale = fabsf(scales[j]);
            if (scale > amax) {
                amax = scale;
                max_scale = scales[j];
            }
        }
        memset(y[i].scales, 0, 12);
        if (max_scale) {
            const float iscale = -32.f / max_scale;
            for (int j = 0; j < TSR_QK_K / 16; ++j) {
                int8_t l = (int8_t)nearest_int(iscale * scales[j]);
                l = (int8_t)(imax(-32, imin(31, l)) + 32);
                if (j < 8)
                    y[i].scales[j] = (uint8_t)(l & 0xF);
                else
                    y[i].scales[j - 8] |= (uint8_t)((l & 0xF) << 4);
                l = (int8_t)(l >> 4);
                y[i].scales[j % 4 + 8] |= (uint8_t)(l << (2 * (j / 4)));
            }
            y[i].d = tsr_f32_to_f16(1 / iscale);
        } else {
            y[i].d = tsr_f32_to_f16(0.f);
        }
        int8_t sc[16];
        q3_K_scales(y[i].scales, sc);
        for (int j = 0; j < TSR_QK_K / 16; ++j) {
            const float d = f16(y[i].d) * sc[j];
            if (!d) continue;
            for (int l = 0; l < 16; ++l) {
                const int q = nearest_int(x[16 * j + l] / d);
                L[16 * j + l] = (int8_t)(imax(-4, imin(3, q)) + 4);
            }
        }
        /* high bit of element j: bit j / 32 of hmask[j % 32] */
        memset(y[i].hmask, 0, TSR_QK_K / 8);
        for (int j = 0; j < TSR_QK_K; ++j) {
            if (L[j] > 3) {
                y[i].hmask[j % 32] |= (uint8_t)(1u << (j / 32));
                L[j] = (int8_t)(L[j] - 4);
            }
        }
        pack_2bit((const uint8_t *)L, y[i].qs);
    }
}

static void quant_q5_K(const float *x, blk_q5_K *y, int64_t nb)
{
    uint8_t L[TSR_QK_K], Laux[32];
    float weights[32], mins[TSR_QK_K / 32], scales[TSR_QK_K / 32];
    for (int64_t i = 0; i < nb; ++i, x += TSR_QK_K) {
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < TSR_QK_K / 32; ++j) {
            float sum_x2 = 0;
            for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
            const float av_x = sqrtf(sum_x2 / 32);
            for (int l = 0; l < 32; ++l) weights[l] = av_x + fabsf(x[32 * j + l]);
            scales[j] = make_qkx2_quants(32, 31, x + 32 * j, weights, L + 32 * j, &mins[j], Laux,
                                         -0.5f, 0.1f, 15, false);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        for (int j = 0; j < TSR_QK_K / 32; ++j) {
            const uint8_t ls = (uint8_t)imin(63, (uint8_t)nearest_int(inv_scale * scales[j]));
            const uint8_t lm = (uint8_t)imin(63, (uint8_t)nearest_int(inv_min * mins[j]));
            if (j < 4) {
                y[i].scales[j] = ls;
                y[i].scales[j + 4] = lm;
            } else {
                y[i].scales[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
                y[i].scales[j - 4] |= (uint8_t)((ls >> 4) << 6);
                y[i].scales[j - 0] |= (uint8_t)((lm >> 4) << 6);
            }
        }
        y[i].d = tsr_f32_to_f16(max_scale / 63.f);
        y[i].dmin = tsr_f32_to_f16(max_min / 63.f);
        for (int j = 0; j < TSR_QK_K / 32; ++j) {
            uint8_t sc, m;
            get_scale_min_k4(j, y[i].scales, &sc, &m);
            const float d = f16(y[i].d) * sc;
            if (!d) continue;
            const float dm = f16(y[i].dmin) * m;
            for (int l = 0; l < 32; ++l) {
                const int q = nearest_int((x[32 * j + l] + dm) / d);
                L[32 * j + l] = (uint8_t)imax(0, imin(31, q));
            }
        }
        memset(y[i].qh, 0, TSR_QK_K / 8);
        uint8_t *ql = y[i].qs;
        uint8_t m1 = 1, m2 = 2;
        for (int n = 0; n < TSR_QK_K; n += 64) {
            for (int j = 0; j < 32; ++j) {
                int l1 = L[n + j], l2 = L[n + j + 32];
                if (l1 > 15) {
                    l1 -= 16;
                    y[i].qh[j] |= m1;
                }
                if (l2 > 15) {
                    l2 -= 16;
                    y[i].qh[j] |= m2;
                }
                ql[j] = (uint8_t)(l1 | (l2 << 4));
            }
            m1 = (uint8_t)(m1 << 2);
            m2 = (uint8_t)(m2 << 2);
            ql += 32;
        }
    }
}

static void quant_q8_0_fast(const float *x, blk_q8_0 *y, int64_t nb); /* SIMD, same bytes */
static void quant_q8_1_fast(const float *x, blk_q8_1 *y, int64_t nb); /* SIMD, same bytes */
static void quant_q8_K_fast(const float *x, blk_q8_K *y, int64_t nb); /* SIMD, same bytes */

void tsr_quant_row(uint32_t type, const float *src, void *dst, int64_t n)
{
    const int64_t be = tsr_type_block_elems(type);
    if (be == 0 || n <= 0) return;
    const int64_t nb = n / be;
    switch (type) {
    case TSR_TYPE_F32:
        memcpy(dst, src, (size_t)n * sizeof(float));
        break;
    case TSR_TYPE_F16: {
        uint16_t *h = dst;
        for (int64_t i = 0; i < n; ++i) h[i] = tsr_f32_to_f16(src[i]);
        break;
    }
    case TSR_TYPE_BF16: {
        uint16_t *h = dst;
        for (int64_t i = 0; i < n; ++i) h[i] = tsr_f32_to_bf16(src[i]);
        break;
    }
    case TSR_TYPE_Q8_0:
        quant_q8_0_fast(src, dst, nb);
        break;
    case TSR_TYPE_Q4_0:
        quant_q4_0(src, dst, nb);
        break;
    case TSR_TYPE_Q4_1:
        quant_q4_1(src, dst, nb);
        break;
    case TSR_TYPE_Q5_0:
        quant_q5_0(src, dst, nb);
        break;
    case TSR_TYPE_Q5_1:
        quant_q5_1(src, dst, nb);
        break;
    case TSR_TYPE_Q8_1:
        quant_q8_1_fast(src, dst, nb);
        break;
    case TSR_TYPE_Q2_K:
        quant_q2_K(src, dst, nb);
        break;
    case TSR_TYPE_Q3_K:
        quant_q3_K(src, dst, nb);
        break;
    case TSR_TYPE_Q4_K:
        quant_q4_K(src, dst, nb);
        break;
    case TSR_TYPE_Q5_K:
        quant_q5_K(src, dst, nb);
        break;
    case TSR_TYPE_Q6_K:
        quant_q6_K(src, dst, nb);
        break;
    case TSR_TYPE_Q8_K:
        quant_q8_K_fast(src, dst, nb);
        break;
    default:
        break;
    }
}

/* ---------------------------------------------------------------------------------------
 * Dot kernels. Every kernel has the rows signature:
 *   y[r] = dot(row r of w, x) for r < nrows; row r starts at w + r*stride bytes.
 * ------------------------------------------------------------------------------------- */

typedef void (*rows_fn)(int64_t n, int64_t nrows, const uint8_t *w, size_t stride, const void *x,
                        float *y);

/* ---- scalar reference ---------------------------------------------------------------- */

/* Float rows accumulate in double: the reference should not depend on summation order. */
static float dot_f32_scalar(int64_t n, const void *vw, const void *vx)
{
    const float *w = vw, *x = vx;
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += (double)w[i] * x[i];
    return (float)s;
}

static float dot_f16_scalar(int64_t n, const void *vw, const void *vx)
{
    const uint16_t *w = vw;
    const float *x = vx;
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += (double)tsr_f16_to_f32(w[i]) * x[i];
    return (float)s;
}

static float dot_bf16_scalar(int64_t n, const void *vw, const void *vx)
{
    const uint16_t *w = vw;
    const float *x = vx;
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += (double)tsr_bf16_to_f32(w[i]) * x[i];
    return (float)s;
}

static float dot_q8_0_scalar(int64_t n, const void *vw, const void *vx)
{
    const blk_q8_0 *w = vw, *x = vx;
    float s = 0;
    for (int64_t i = 0; i < n / TSR_QK8_0; ++i) {
        int32_t si = 0;
        for (int j = 0; j < TSR_QK8_0; ++j) si += w[i].qs[j] * x[i].qs[j];
        s += f16(w[i].d) * f16(x[i].d) * (float)si;
    }
    return s;
}

/* Q4_0 x Q8_0 in llama.cpp's repacked Q4_0 GEMM / GEMV order (kernels/q40_gemm.h): per block
 * the exact int32, then one FMA with fp16(d_w) * fp16(d_y); the SIMD paths are q40_gemm.c's. */
static float dot_q4_0_scalar(int64_t n, const void *vw, const void *vx)
{
    const blk_q4_0 *w = vw;
    const blk_q8_0 *x = vx;
    float s = 0;
    for (int64_t i = 0; i < n / TSR_QK4_0; ++i) {
        int32_t si = 0;
        for (int j = 0; j < TSR_QK4_0 / 2; ++j) {
            si += ((w[i].qs[j] & 0xF) - 8) * x[i].qs[j];
            si += ((w[i].qs[j] >> 4) - 8) * x[i].qs[j + TSR_QK4_0 / 2];
        }
        s = fmaf((float)si, f16(w[i].d) * f16(x[i].d), s);
    }
    return s;
}

/* Q4_1 x Q8_1, as ggml: d_w*d_y*sum(q*y) + m_w*s_y per block. */
static float dot_q4_1_scalar(int64_t n, const void *vw, const void *vx)
{
    const blk_q4_1 *w = vw;
    const blk_q8_1 *x = vx;
    float s = 0;
    for (int64_t i = 0; i < n / 32; ++i) {
        int32_t si = 0;
        for (int j = 0; j < 16; ++j) {
            si += (w[i].qs[j] & 0xF) * x[i].qs[j];
            si += (w[i].qs[j] >> 4) * x[i].qs[j + 16];
        }
        s += f16(w[i].d) * f16(x[i].d) * (float)si + f16(w[i].m) * f16(x[i].s);
    }
    return s;
}

/* ggml's float order for the Q8_0-activation dots of Q5_0 (ggml_vec_dot_q5_0_q8_0 on AVX2 /
 * AVX-512 for one token, llamafile's tinyBLAS for several: the same per-element result):
 * 8 float lanes, lane k holding the exact int sum over elements 4k..4k+3 of each block,
 * acc_k = fma(float(lane_k), d_w*d_y, acc_k) block after block, then ggml's hsum8
 * (tsr_ggml_hsum8, dot_ggml.h). Every path (scalar, AVX2, AVX-512, repacked) computes exactly
 * this. */
static float dot_q5_0_scalar(int64_t n, const void *vw, const void *vx)
{
    const blk_q5_0 *w = vw;
    const blk_q8_0 *x = vx;
    float acc[8] = {0};
    for (int64_t i = 0; i < n / 32; ++i) {
        int q[32];
        q5_unpack(w[i].qh, w[i].qs, q);
        const float d = f16(w[i].d) * f16(x[i].d);
        for (int k = 0; k < 8; ++k) {
            int32_t si = 0;
            for (int j = 4 * k; j < 4 * k + 4; ++j) si += (q[j] - 16) * x[i].qs[j];
            acc[k] = fmaf((float)si, d, acc[k]);
        }
    }
    return tsr_ggml_hsum8(acc);
}

static float dot_q5_1_scalar(int64_t n, const void *vw, const void *vx)
{
    const blk_q5_1 *w = vw;
    const blk_q8_1 *x = vx;
    float s = 0;
    for (int64_t i = 0; i < n / 32; ++i) {
        int q[32];
        q5_unpack(w[i].qh, w[i].qs, q);
        int32_t si = 0;
        for (int j = 0; j < 32; ++j) si += q[j] * x[i].qs[j];
        s += f16(w[i].d) * f16(x[i].d) * (float)si + f16(w[i].m) * f16(x[i].s);
    }
    return s;
}

/* Q2_K x Q8_K: d*dy*sum_g sc_g*<q_g, y_g> - dmin*dy*sum_g m_g*bsum_g over 16 groups of 16
 * (group g = element / 16, the order of scales[] and of Q8_K's bsums). */
static float dot_q2_K_scalar(int64_t n, const void *vw, const void *vx)
{
    const blk_q2_K *w = vw;
    const blk_q8_K *x = vx;
    float s = 0;
    for (int64_t i = 0; i < n / TSR_QK_K; ++i) {
        int32_t sumi = 0, summ = 0;
        for (int g = 0; g < 16; ++g) {
            /* element 16g + l: half g/8, shift 2*((g/2) % 4), qs byte 32*(g/8) + 16*(g%2) + l */
            const uint8_t *q = w[i].qs + 32 * (g / 8) + 16 * (g % 2);
            const int shift = 2 * ((g / 2) % 4);
            const int8_t *y = x[i].qs + 16 * g;
            int32_t sg = 0;
            for (int l = 0; l < 16; ++l) sg += ((q[l] >> shift) & 3) * y[l];
            sumi += (w[i].scales[g] & 0xF) * sg;
            summ += (w[i].scales[g] >> 4) * x[i].bsums[g];
        }
        s += x[i].d * f16(w[i].d) * (float)sumi - x[i].d * f16(w[i].dmin) * (float)summ;
    }
    return s;
}

static float dot_q3_K_scalar(int64_t n, const void *vw, const void *vx)
{
    const blk_q3_K *w = vw;
    const blk_q8_K *x = vx;
    float s = 0;
    for (int64_t i = 0; i < n / TSR_QK_K; ++i) {
        int8_t sc[16];
        q3_K_scales(w[i].scales, sc);
        int32_t sumi = 0;
        for (int g = 0; g < 16; ++g) {
            const int off = 32 * (g / 8) + 16 * (g % 2);
            const int shift = 2 * ((g / 2) % 4);
            const int hbit = g / 2; /* element 32*hbit + (16*(g%2) + l): bit g/2 of hmask */
            const int8_t *y = x[i].qs + 16 * g;
            int32_t sg = 0;
            for (int l = 0; l < 16; ++l) {
                const int h = (w[i].hmask[16 * (g % 2) + l] >> hbit) & 1;
                sg += (((w[i].qs[off + l] >> shift) & 3) - (h ? 0 : 4)) * y[l];
            }
            sumi += sc[g] * sg;
        }
        s += f16(w[i].d) * x[i].d * (float)sumi;
    }
    return s;
}

void tsr_q4_K_scales_mins(const uint8_t *packed, uint8_t out[16])
{
    uint32_t u[4];
    memcpy(u, packed, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
    const uint32_t mins_lo = u[1] & 0x3f3f3f3fu;
    u[1] = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
    u[2] = mins_lo;
    u[0] &= 0x3f3f3f3fu;
    memcpy(out, u, 16);
}

/* Q4_K x Q8_K in the order of ggml's repacked Q4_K GEMV (ggml_gemv_q4_K_8x8_q8_K, what
 * llama.cpp runs for Q4_K on x86 with AVX2: every matrix whose row count is a multiple of 8):
 * per super-block the exact int32 sums isum = sum_g sc_g*<q_g, y_g> and imin = sum_g m_g *
 * sum(y_g), then sumf = fma(float(isum), d_w*d_y, sumf) and summ = fma(float(imin),
 * dmin_w*d_y, summ) in one chain each; the result sumf - summ. */
static float dot_q4_K_scalar(int64_t n, const void *vw, const void *vx)
{
    const blk_q4_K *w = vw;
    const blk_q8_K *x = vx;
    float sumf = 0, summf = 0;
    for (int64_t i = 0; i < n / TSR_QK_K; ++i) {
        uint8_t sm[16];
        tsr_q4_K_scales_mins(w[i].scales, sm);
        int32_t sumi = 0, summ = 0;
        for (int g = 0; g < 8; ++g) {
            const uint8_t *q = w[i].qs + 32 * (g / 2);
            const int shift = (g & 1) * 4;
            const int8_t *y = x[i].qs + 32 * g;
            int32_t sg = 0;
            for (int l = 0; l < 32; ++l) sg += ((q[l] >> shift) & 0xF) * y[l];
            sumi += sm[g] * sg;
            summ += sm[8 + g] * (x[i].bsums[2 * g] + x[i].bsums[2 * g + 1]);
        }
        sumf = fmaf((float)sumi, f16(w[i].d) * x[i].d, sumf);
        summf = fmaf((float)summ, f16(w[i].dmin) * x[i].d, summf);
    }
    return sumf - summf;
}

static float dot_q5_K_scalar(int64_t n, const void *vw, const void *vx)
{
    const blk_q5_K *w = vw;
    const blk_q8_K *x = vx;
    float s = 0;
    for (int64_t i = 0; i < n / TSR_QK_K; ++i) {
        uint8_t sm[16];
        tsr_q4_K_scales_mins(w[i].scales, sm);
        int32_t sumi = 0, summ = 0;
        for (int g = 0; g < 8; ++g) {
            const uint8_t *q = w[i].qs + 32 * (g / 2);
            const int shift = (g & 1) * 4;
            const int8_t *y = x[i].qs + 32 * g;
            int32_t sg = 0;
            for (int l = 0; l < 32; ++l)
                sg += (((q[l] >> shift) & 0xF) | (((w[i].qh[l] >> g) & 1) << 4)) * y[l];
            sumi += sm[g] * sg;
            summ += sm[8 + g] * (x[i].bsums[2 * g] + x[i].bsums[2 * g + 1]);
        }
        s += f16(w[i].d) * x[i].d * (float)sumi - f16(w[i].dmin) * x[i].d * (float)summ;
    }
    return s;
}

/* Q6_K x Q8_K in ggml_vec_dot_q6_K_q8_K's order (AVX2; llama.cpp does not repack Q6_K on
 * x86): 8 int32 lanes per super-block, lane k = sum over the 8 chunks of 32 elements of
 * sc*q*y for the chunk's elements 4k..4k+3 (q unsigned, 0..63), minus 32*(sc_2k*bsum_2k +
 * sc_2k+1*bsum_2k+1) (the offset, by 16-element groups 2k and 2k+1); acc_k = fma(float(
 * lane_k), d_y*d_w, acc_k) super-block after super-block; then hsum8. The lanes' int32
 * sums can pass 2^24, so which elements a lane holds matters for the float result. */
static float dot_q6_K_scalar(int64_t n, const void *vw, const void *vx)
{
    const blk_q6_K *w = vw;
    const blk_q8_K *x = vx;
    float acc[8] = {0};
    for (int64_t i = 0; i < n / TSR_QK_K; ++i) {
        uint8_t q[TSR_QK_K]; /* element order, unsigned 0..63 */
        for (int half = 0; half < 2; ++half) {
            const uint8_t *ql = w[i].ql + 64 * half, *qh = w[i].qh + 32 * half;
            uint8_t *o = q + 128 * half;
            for (int l = 0; l < 32; ++l) {
                o[l + 0] = (uint8_t)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4));
                o[l + 32] = (uint8_t)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4));
                o[l + 64] = (uint8_t)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
                o[l + 96] = (uint8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4));
            }
        }
        int32_t lane[8];
        for (int k = 0; k < 8; ++k)
            lane[k] = -32 * (w[i].scales[2 * k] * x[i].bsums[2 * k] +
                             w[i].scales[2 * k + 1] * x[i].bsums[2 * k + 1]);
        for (int e = 0; e < TSR_QK_K; ++e)
            lane[(e % 32) / 4] += w[i].scales[e / 16] * q[e] * x[i].qs[e];
        const float d = x[i].d * f16(w[i].d);
        for (int k = 0; k < 8; ++k) acc[k] = fmaf((float)lane[k], d, acc[k]);
    }
    return tsr_ggml_hsum8(acc);
}

typedef float (*dot_fn)(int64_t n, const void *w, const void *x);

static void rows_by_dot(dot_fn dot, int64_t n, int64_t nrows, const uint8_t *w, size_t stride,
                        const void *x, float *y)
{
    for (int64_t r = 0; r < nrows; ++r) y[r] = dot(n, w + (size_t)r * stride, x);
}

#define SCALAR_ROWS(name)                                                                          \
    static void rows_##name##_scalar(int64_t n, int64_t nrows, const uint8_t *w, size_t stride,    \
                                     const void *x, float *y)                                      \
    {                                                                                              \
        rows_by_dot(dot_##name##_scalar, n, nrows, w, stride, x, y);                               \
    }
/* clang-format off */
SCALAR_ROWS(f32)
SCALAR_ROWS(f16)
SCALAR_ROWS(bf16)
SCALAR_ROWS(q8_0)
SCALAR_ROWS(q4_0)
SCALAR_ROWS(q4_1)
SCALAR_ROWS(q5_0)
SCALAR_ROWS(q5_1)
SCALAR_ROWS(q2_K)
SCALAR_ROWS(q3_K)
SCALAR_ROWS(q4_K)
SCALAR_ROWS(q5_K)
SCALAR_ROWS(q6_K)
/* clang-format on */

/* ---- AVX2 + FMA + F16C ---------------------------------------------------------------- */
#if TSR_X86

#define TSR_AVX2   __attribute__((target("avx2,fma,f16c")))
#define TSR_INLINE static inline __attribute__((always_inline))
#include "kernels/x86hsum.h"

/* 32 nibbles of a Q4_0 block as bytes in element order: low nibbles (elements 0..15) in
 * the low lane, high nibbles (16..31) in the high lane. One broadcast load, a 64-bit
 * variable shift (the high lane by 4) and a mask. */
TSR_AVX2 TSR_INLINE __m256i q4_0_nibbles(const uint8_t *qs)
{
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    const __m256i sh = _mm256_srlv_epi64(v, _mm256_set_epi64x(4, 4, 0, 0));
    return _mm256_and_si256(sh, _mm256_set1_epi8(0x0F));
}

/* Rows are processed one after the other, each streamed start to end: the weight matrix
 * is then read as one sequential stream, which the hardware prefetchers follow best
 * (measured on Zen 4: 27 GB/s for one stream against 14-17 GB/s for 2-4 interleaved
 * streams of 2 KiB rows). What rows share is computed once per call instead (act_info). */

/* F32/F16/BF16 x F32: 4 FMA chains over 32 floats per step, scalar tail. */
TSR_AVX2 TSR_INLINE __m256 load_w8(uint32_t type, const uint8_t *row, int64_t i)
{
    if (type == TSR_TYPE_F32) return _mm256_loadu_ps((const float *)row + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + i));
    if (type == TSR_TYPE_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); /* BF16 */
}

TSR_AVX2 TSR_INLINE float load_w1(uint32_t type, const uint8_t *row, int64_t i)
{
    if (type == TSR_TYPE_F32) return ((const float *)row)[i];
    const uint16_t h = ((const uint16_t *)row)[i];
    if (type == TSR_TYPE_F16) return _cvtsh_ss(h);
    return tsr_bf16_to_f32(h);
}

TSR_AVX2 TSR_INLINE float float_row_avx2(uint32_t type, int64_t n, const uint8_t *w, const float *x)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(load_w8(type, w, i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(load_w8(type, w, i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(load_w8(type, w, i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(load_w8(type, w, i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8)
        a0 = _mm256_fmadd_ps(load_w8(type, w, i), _mm256_loadu_ps(x + i), a0);
    float s = tsr_hsum8_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; ++i) s += load_w1(type, w, i) * x[i];
    return s;
}

#define FLOAT_ROWS_AVX2(fname, TYPE)                                                               \
    TSR_AVX2 static void fname(int64_t n, int64_t nrows, const uint8_t *w, size_t stride,          \
                               const void *x, float *y)                                            \
    {                                                                                              \
        for (int64_t r = 0; r < nrows; ++r)                                                        \
            y[r] = float_row_avx2(TYPE, n, w + (size_t)r * stride, x);                             \
    }
/* clang-format off */
FLOAT_ROWS_AVX2(rows_f32_avx2, TSR_TYPE_F32)
FLOAT_ROWS_AVX2(rows_f16_avx2, TSR_TYPE_F16)
FLOAT_ROWS_AVX2(rows_bf16_avx2, TSR_TYPE_BF16)
/* clang-format on */

/* Per-block facts about the Q8_0 activation that every weight row needs, built once per
 * call (rows then load them instead of recomputing per (row, block)), padded with zeros
 * to a multiple of 8 blocks:
 *  - dy[b]: the fp16 scale as a float;
 *  - ey[b]: dy[b] * -mult*sum(y_b), the offset term of Q4_0's unsigned nibbles (mult 8):
 *    sum (q-8)*y = sum q*y - 8*sum y. A row adds sum_b d_w[b]*ey[b] with one FMA per 8
 *    blocks instead of a per-block integer correction (one load less per block; both
 *    terms have the magnitude of the dot itself, so nothing cancels badly). */
typedef struct {
    float *dy;
    float *ey;
} act_info;

enum { ACT_STACK_BLOCKS = 2048 }; /* rows up to 65536 elements use the stack (16 KiB) */

TSR_AVX2 static void act_info_build(const blk_q8_0 *x, int64_t nb, int32_t mult, act_info *ai)
{
    int64_t b = 0;
    for (; b < nb; ++b) {
        ai->dy[b] = _cvtsh_ss(x[b].d);
        if (!mult) continue;
        const int32_t sum = tsr_qsum32_i8(x[b].qs);
        ai->ey[b] = ai->dy[b] * (float)(-mult * sum);
    }
    if (!mult) memset(ai->ey, 0, sizeof(float) * (size_t)nb);
    for (; b % 8; ++b) ai->dy[b] = ai->ey[b] = 0.0f;
}

/* Q8_1 activations (Q4_1 / Q5_1 weights): dy[b] = fp16(d), ey[b] = fp16(s) = the block's
 * d*sum(y), which the rows multiply by their min m (ggml's m_w*s_y term). */
TSR_AVX2 static void act_info_build_q8_1(const blk_q8_1 *x, int64_t nb, int32_t mult, act_info *ai)
{
    (void)mult;
    int64_t b = 0;
    for (; b < nb; ++b) {
        ai->dy[b] = _cvtsh_ss(x[b].d);
        ai->ey[b] = _cvtsh_ss(x[b].s);
    }
    for (; b % 8; ++b) ai->dy[b] = ai->ey[b] = 0.0f;
}

/* The rows entry of a Q8_0-activation kernel: build act_info (stack, or heap for very long
 * rows; the scalar path if that allocation fails), then stream the rows one by one. */
#define ACT_ROWS(fname, ATTR, rowfn, mult, fallback)                                               \
    ACT_ROWS_B(fname, ATTR, rowfn, mult, fallback, act_info_build)
#define ACT_ROWS_B(fname, ATTR, rowfn, mult, fallback, BUILD)                                      \
    ATTR static void fname(int64_t n, int64_t nrows, const uint8_t *w, size_t stride,              \
                           const void *vx, float *y)                                               \
    {                                                                                              \
        const int64_t nb = n / TSR_QK8_0, nbp = (nb + 7) / 8 * 8;                                  \
        float stack_buf[2 * ACT_STACK_BLOCKS];                                                     \
        float *buf =                                                                               \
            nbp <= ACT_STACK_BLOCKS ? stack_buf : malloc(2 * sizeof(float) * (size_t)nbp);         \
        if (!buf) {                                                                                \
            fallback(n, nrows, w, stride, vx, y);                                                  \
            return;                                                                                \
        }                                                                                          \
        act_info ai = {buf, buf + nbp};                                                            \
        BUILD(vx, nb, mult, &ai);                                                                  \
        for (int64_t r = 0; r < nrows; ++r) y[r] = rowfn(nb, w + (size_t)r * stride, vx, &ai);     \
        if (buf != stack_buf) free(buf);                                                           \
    }

/* ACT_ROWS with a software prefetch of the row PF_ROWS ahead (all of its lines) before each
 * row: the hardware prefetchers alone left the Q4_0 row kernel waiting on memory (CPU time
 * per block streaming a 69 MB 2048-column matrix, one thread: 1.6 ns, 1.25-1.35 ns with 4
 * rows ahead; 8: 1.23-1.5, 16: 1.43). Prefetches past the matrix never fault. */
#define ACT_ROWS_PF(fname, ATTR, rowfn, mult, fallback, BLK, PF_ROWS)                              \
    ATTR static void fname(int64_t n, int64_t nrows, const uint8_t *w, size_t stride,              \
                           const void *vx, float *y)                                               \
    {                                                                                              \
        const int64_t nb = n / TSR_QK8_0, nbp = (nb + 7) / 8 * 8;                                  \
        float stack_buf[2 * ACT_STACK_BLOCKS];                                                     \
        float *buf =                                                                               \
            nbp <= ACT_STACK_BLOCKS ? stack_buf : malloc(2 * sizeof(float) * (size_t)nbp);         \
        if (!buf) {                                                                                \
            fallback(n, nrows, w, stride, vx, y);                                                  \
            return;                                                                                \
        }                                                                                          \
        act_info ai = {buf, buf + nbp};                                                            \
        act_info_build(vx, nb, mult, &ai);                                                         \
        const size_t row_bytes = (size_t)nb * sizeof(BLK);                                         \
        for (int64_t r = 0; r < nrows; ++r) {                                                      \
            const char *pf = (const char *)(w + (size_t)(r + (PF_ROWS)) * stride);                 \
            for (size_t off = 0; off < row_bytes; off += 64) _mm_prefetch(pf + off, _MM_HINT_T0);  \
            y[r] = rowfn(nb, w + (size_t)r * stride, vx, &ai);                                     \
        }                                                                                          \
        if (buf != stack_buf) free(buf);                                                           \
    }

/* fp16 scales of 8 consecutive blocks (m < 8: the first m, the rest 0) as floats. The
 * 16-bit loads and packing run on the integer side, leaving one vcvtph2ps per 8 blocks on
 * the vector pipes (a broadcast + convert per block cost ~25% of the Q4_0 kernel). */
TSR_AVX2 TSR_INLINE __m256 f16x8_strided(const uint16_t *d0, size_t stride, int m)
{
    const uint8_t *p = (const uint8_t *)d0;
    uint64_t h[2] = {0, 0};
    if (m == 8) {
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) {
            uint16_t v;
            memcpy(&v, p + (size_t)k * stride, 2);
            h[k / 4] |= (uint64_t)v << (16 * (k % 4));
        }
    } else {
        for (int k = 0; k < m; ++k) {
            uint16_t v;
            memcpy(&v, p + (size_t)k * stride, 2);
            h[k / 4] |= (uint64_t)v << (16 * (k % 4));
        }
    }
    return _mm256_cvtph_ps(_mm_set_epi64x((long long)h[1], (long long)h[0]));
}

/* One row (the body of the *_row_* functions below; INT_DOT(b) is block b's integer dot
 * as int32x8 lanes, OFFSET whether act_info's ey term applies): per group of 8 blocks the
 * 8 combined scales fp16(d_w)*d_y are made in one vector, then each block's dot is
 * converted and FMA'd with its scale, broadcast by an in-lane shuffle, into one of 4
 * accumulators (block k of the group -> k % 4, so the FMA latency never serializes).
 * A partial last group does the same operations in the same order. */
TSR_AVX2 TSR_INLINE __m256 bcast_lane(__m256 lo, __m256 hi, int k)
{
    const __m256 v = k < 4 ? lo : hi;
    switch (k & 3) {
    case 0:
        return _mm256_shuffle_ps(v, v, 0x00);
    case 1:
        return _mm256_shuffle_ps(v, v, 0x55);
    case 2:
        return _mm256_shuffle_ps(v, v, 0xAA);
    default:
        return _mm256_shuffle_ps(v, v, 0xFF);
    }
}

/* The offset term's per-block weight: d_w (Q4_0 / Q5_0: the -8 / -16 offset) or the min
 * m_w (Q4_1 / Q5_1, against Q8_1's s). */
#define OFFW_D(BLK, b, m, dw)            (dw)
#define OFFW_M(BLK, b, m, dw)            f16x8_strided(&w[b].m, sizeof(BLK), m)
#define BLOCK_LOOP(BLK, INT_DOT, OFFSET) BLOCK_LOOP_EX(BLK, INT_DOT, OFFSET, OFFW_D)
/* How BLOCK_LOOP_EX gathers 8 blocks' fp16 scales (a row kernel may redefine it around its
 * body, e.g. Q4_0 on AVX-512: two loads and one word permute). */
#define BL_DW8 f16x8_strided
/* The 4 accumulators are named registers, not an array: an array indexed by k & 3 in the
 * partial last group made gcc keep all four in memory, putting a store-forwarding round
 * trip into every FMA chain (about 2x slower, measured). The partial group comes after
 * the full ones, with the same operations in the same order. */
#define BL_FMA(k, bb, INT_DOT)                                                                     \
    do {                                                                                           \
        const __m256 t_ = _mm256_cvtepi32_ps(INT_DOT(bb));                                         \
        switch ((k)&3) {                                                                           \
        case 0:                                                                                    \
            a0 = _mm256_fmadd_ps(bcast_lane(lo, hi, (k)), t_, a0);                                 \
            break;                                                                                 \
        case 1:                                                                                    \
            a1 = _mm256_fmadd_ps(bcast_lane(lo, hi, (k)), t_, a1);                                 \
            break;                                                                                 \
        case 2:                                                                                    \
            a2 = _mm256_fmadd_ps(bcast_lane(lo, hi, (k)), t_, a2);                                 \
            break;                                                                                 \
        default:                                                                                   \
            a3 = _mm256_fmadd_ps(bcast_lane(lo, hi, (k)), t_, a3);                                 \
            break;                                                                                 \
        }                                                                                          \
    } while (0)
#define BLOCK_LOOP_EX(BLK, INT_DOT, OFFSET, OFFW)                                                  \
    const BLK *w = (const BLK *)vw;                                                                \
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                                     \
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();                                     \
    __m256 acc_off = _mm256_setzero_ps();                                                          \
    int64_t b = 0;                                                                                 \
    for (; b + 8 <= nb; b += 8) {                                                                  \
        const int m = 8;                                                                           \
        (void)m;                                                                                   \
        const __m256 dw = BL_DW8(&w[b].d, sizeof(BLK), 8);                                         \
        if (OFFSET)                                                                                \
            acc_off = _mm256_fmadd_ps(OFFW(BLK, b, m, dw), _mm256_loadu_ps(ai->ey + b), acc_off);  \
        const __m256 sc = _mm256_mul_ps(dw, _mm256_loadu_ps(ai->dy + b));                          \
        const __m256 lo = _mm256_permute2f128_ps(sc, sc, 0x00);                                    \
        const __m256 hi = _mm256_permute2f128_ps(sc, sc, 0x11);                                    \
        BL_FMA(0, b + 0, INT_DOT);                                                                 \
        BL_FMA(1, b + 1, INT_DOT);                                                                 \
        BL_FMA(2, b + 2, INT_DOT);                                                                 \
        BL_FMA(3, b + 3, INT_DOT);                                                                 \
        BL_FMA(4, b + 4, INT_DOT);                                                                 \
        BL_FMA(5, b + 5, INT_DOT);                                                                 \
        BL_FMA(6, b + 6, INT_DOT);                                                                 \
        BL_FMA(7, b + 7, INT_DOT);                                                                 \
    }                                                                                              \
    if (b < nb) {                                                                                  \
        const int m = (int)(nb - b);                                                               \
        const __m256 dw = BL_DW8(&w[b].d, sizeof(BLK), m);                                         \
        if (OFFSET)                                                                                \
            acc_off = _mm256_fmadd_ps(OFFW(BLK, b, m, dw), _mm256_loadu_ps(ai->ey + b), acc_off);  \
        const __m256 sc = _mm256_mul_ps(dw, _mm256_loadu_ps(ai->dy + b));                          \
        const __m256 lo = _mm256_permute2f128_ps(sc, sc, 0x00);                                    \
        const __m256 hi = _mm256_permute2f128_ps(sc, sc, 0x11);                                    \
        for (int k = 0; k < m; ++k) BL_FMA(k, b + k, INT_DOT);                                     \
    }                                                                                              \
    const __m256 sum4 = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));               \
    return tsr_hsum8_ps(_mm256_add_ps(sum4, acc_off));

/* Q8_0 x Q8_0, AVX2: sign trick |w| (unsigned) x sign(w)*y (signed) for vpmaddubsw; the
 * int16 pair sums (<= 2*128*127) cannot saturate. */
TSR_AVX2 TSR_INLINE __m256i q8_dot_avx2(const int8_t *wq, const int8_t *yq)
{
    const __m256i w = _mm256_loadu_si256((const __m256i *)wq);
    const __m256i y = _mm256_loadu_si256((const __m256i *)yq);
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

TSR_AVX2 static float q8_0_row_avx2(int64_t nb, const uint8_t *vw, const blk_q8_0 *x,
                                    const act_info *ai)
{
#define Q8_DOT_AVX2(bb) q8_dot_avx2(w[bb].qs, x[bb].qs)
    BLOCK_LOOP(blk_q8_0, Q8_DOT_AVX2, 0);
#undef Q8_DOT_AVX2
}

/* clang-format off */
ACT_ROWS(rows_q8_0_avx2, TSR_AVX2, q8_0_row_avx2, 0, rows_q8_0_scalar)
/* clang-format on */

/* Q4_1's nibbles q in [0, 15] x Q8_0 / Q8_1 bytes, AVX2: q unsigned, so vpmaddubsw(q, y)
 * directly. */
TSR_AVX2 TSR_INLINE __m256i q4_dot_avx2(const uint8_t *wq, const int8_t *yq)
{
    const __m256i y = _mm256_loadu_si256((const __m256i *)yq);
    const __m256i p16 = _mm256_maddubs_epi16(q4_0_nibbles(wq), y);
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

/* Q4_1 x Q8_1, AVX2: nibbles x y as Q4_0 (no offset: q is the value), plus m_w * s_y. */
TSR_AVX2 static float q4_1_row_avx2(int64_t nb, const uint8_t *vw, const blk_q8_1 *x,
                                    const act_info *ai)
{
#define Q41_DOT_AVX2(bb) q4_dot_avx2(w[bb].qs, x[bb].qs)
    BLOCK_LOOP_EX(blk_q4_1, Q41_DOT_AVX2, 1, OFFW_M);
#undef Q41_DOT_AVX2
}

/* 32 bits -> 32 bytes, 0xFF where the bit is set (byte j <- bit j): byte j/8 of the word
 * broadcast to byte j, ORed with all bits but j%8, compared with all ones. */
TSR_AVX2 TSR_INLINE __m256i bytes_from_bits_avx2(const uint8_t *p)
{
    uint32_t x32;
    memcpy(&x32, p, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                           0x0101010101010101, 0x0000000000000000);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x32), shuf);
    bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x((long long)0x7fbfdfeff7fbfdfeull));
    return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}

/* A Q5_0 / Q5_1 block's 32 quants as unsigned bytes 0..31 in element order. */
TSR_AVX2 TSR_INLINE __m256i q5_bytes_avx2(const uint8_t *qs, const uint8_t *qh)
{
    return _mm256_or_si256(q4_0_nibbles(qs),
                           _mm256_and_si256(bytes_from_bits_avx2(qh), _mm256_set1_epi8(0x10)));
}

TSR_AVX2 TSR_INLINE __m256i q5_dot_avx2(const uint8_t *qs, const uint8_t *qh, const int8_t *yq)
{
    const __m256i y = _mm256_loadu_si256((const __m256i *)yq);
    const __m256i p16 = _mm256_maddubs_epi16(q5_bytes_avx2(qs, qh), y);
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

/* Q5_0 x Q8_0 in ggml's order (dot_q5_0_scalar): signed q = q5 - 16, the sign trick
 * |q| x sign(y, q) into 8 int32 lanes of 4 elements, one FMA chain per row. Two rows at a
 * time so that two chains overlap. */
TSR_AVX2 TSR_INLINE __m256i q5_0_lanes_avx2(const blk_q5_0 *w, const int8_t *yq)
{
    const __m256i q = _mm256_sub_epi8(q5_bytes_avx2(w->qs, w->qh), _mm256_set1_epi8(16));
    const __m256i y = _mm256_loadu_si256((const __m256i *)yq);
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

TSR_AVX2 static void rows_q5_0_avx2(int64_t n, int64_t nrows, const uint8_t *w, size_t stride,
                                    const void *vx, float *y)
{
    const blk_q8_0 *x = vx;
    const int64_t nb = n / TSR_QK8_0;
    int64_t r = 0;
    for (; r + 2 <= nrows; r += 2) {
        const blk_q5_0 *w0 = (const blk_q5_0 *)(w + (size_t)r * stride);
        const blk_q5_0 *w1 = (const blk_q5_0 *)(w + (size_t)(r + 1) * stride);
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; ++b) {
            const float dy = _cvtsh_ss(x[b].d);
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w0[b].d) * dy),
                                 _mm256_cvtepi32_ps(q5_0_lanes_avx2(&w0[b], x[b].qs)), a0);
            a1 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w1[b].d) * dy),
                                 _mm256_cvtepi32_ps(q5_0_lanes_avx2(&w1[b], x[b].qs)), a1);
        }
        y[r] = tsr_hsum8_ps(a0);
        y[r + 1] = tsr_hsum8_ps(a1);
    }
    for (; r < nrows; ++r) {
        const blk_q5_0 *w0 = (const blk_q5_0 *)(w + (size_t)r * stride);
        __m256 a0 = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; ++b)
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w0[b].d) * _cvtsh_ss(x[b].d)),
                                 _mm256_cvtepi32_ps(q5_0_lanes_avx2(&w0[b], x[b].qs)), a0);
        y[r] = tsr_hsum8_ps(a0);
    }
}

TSR_AVX2 static float q5_1_row_avx2(int64_t nb, const uint8_t *vw, const blk_q8_1 *x,
                                    const act_info *ai)
{
#define Q51_DOT_AVX2(bb) q5_dot_avx2(w[bb].qs, w[bb].qh, x[bb].qs)
    BLOCK_LOOP_EX(blk_q5_1, Q51_DOT_AVX2, 1, OFFW_M);
#undef Q51_DOT_AVX2
}

/* clang-format off */
ACT_ROWS_B(rows_q4_1_avx2, TSR_AVX2, q4_1_row_avx2, 0, rows_q4_1_scalar, act_info_build_q8_1)
ACT_ROWS_B(rows_q5_1_avx2, TSR_AVX2, q5_1_row_avx2, 0, rows_q5_1_scalar, act_info_build_q8_1)
/* clang-format on */

#include "kernels/x86kquant.h"

/* K-quant kernels, one row each (rows are streamed one by one, see above). The integer
 * work per 32 (Q4_K) or 16 (Q6_K) elements is vpmaddubsw(q, y) into int16 pairs, then the
 * sub-block scale: vpmaddwd with the scale broadcast and an add (AVX2), or one vpdpwssd
 * (AVX-512 VNNI). SACC(acc, p16, scale16) is that step; both variants come from one body. */
#define SACC_AVX2(acc, p16, s16) _mm256_add_epi32(acc, _mm256_madd_epi16(p16, s16))
#define SACC_VNNI(acc, p16, s16) _mm256_dpwssd_epi32(acc, p16, s16)

/* The exact sum of 8 int32 lanes. */
TSR_AVX2 TSR_INLINE int32_t hsum_epi32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_cvtsi128_si32(s);
}

/* Q4_K x Q8_K in ggml's repacked-GEMV order (dot_q4_K_scalar). Per super-block: 8 groups
 * of 32 (low nibbles of qs[32j..], then high), each scaled by its 6-bit scale, summed in
 * int32 lanes, then exactly to one int; the mins term from the Q8_K bsums likewise; one
 * scalar FMA chain each. */
#define DEF_DOT_Q4_K(fname, ATTR, SACC)                                                            \
    ATTR static float fname(int64_t n, const uint8_t *vw, const void *vx)                          \
    {                                                                                              \
        const blk_q4_K *w = (const blk_q4_K *)vw;                                                  \
        const blk_q8_K *x = vx;                                                                    \
        const __m256i m4 = _mm256_set1_epi8(0x0F);                                                 \
        float sumf = 0, summf = 0;                                                                 \
        for (int64_t i = 0; i < n / TSR_QK_K; ++i) {                                               \
            const float d = x[i].d * _cvtsh_ss(w[i].d);                                            \
            const float dmin = x[i].d * _cvtsh_ss(w[i].dmin);                                      \
            /* 8 scales and 8 mins unpacked in registers (a store/reload of the unpacked           \
             * bytes stalls on store forwarding); int16 lanes: scales low, mins high */            \
            const __m256i sm16 = tsr_q4_K_sm_x16(w[i].scales);                                     \
            const __m256i sc = _mm256_permute2x128_si256(sm16, sm16, 0x00);                        \
            /* mins: each min twice, against the 16 bsums -> m_g*(bsum_2g + bsum_2g+1) */          \
            const __m256i mins2 =                                                                  \
                _mm256_shuffle_epi8(_mm256_permute2x128_si256(sm16, sm16, 0x11),                   \
                                    _mm256_loadu_si256((const __m256i *)tsr_k_dup16));             \
            const __m256i summ =                                                                   \
                _mm256_madd_epi16(mins2, _mm256_loadu_si256((const __m256i *)x[i].bsums));         \
            __m256i sumi = _mm256_setzero_si256();                                                 \
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j)                                    \
            {                                                                                      \
                const __m256i q4 = _mm256_loadu_si256((const __m256i *)(w[i].qs + 32 * j));        \
                const __m256i ql = _mm256_and_si256(q4, m4);                                       \
                const __m256i qh = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);                 \
                const __m256i yl = _mm256_loadu_si256((const __m256i *)(x[i].qs + 64 * j));        \
                const __m256i yh = _mm256_loadu_si256((const __m256i *)(x[i].qs + 64 * j + 32));   \
                const __m256i scl = _mm256_shuffle_epi8(                                           \
                    sc, _mm256_loadu_si256((const __m256i *)tsr_k_shuf_q4_K[2 * j]));              \
                const __m256i sch = _mm256_shuffle_epi8(                                           \
                    sc, _mm256_loadu_si256((const __m256i *)tsr_k_shuf_q4_K[2 * j + 1]));          \
                sumi = SACC(sumi, _mm256_maddubs_epi16(ql, yl), scl);                              \
                sumi = SACC(sumi, _mm256_maddubs_epi16(qh, yh), sch);                              \
            }                                                                                      \
            sumf = fmaf((float)hsum_epi32(sumi), d, sumf);                                         \
            summf = fmaf((float)hsum_epi32(summ), dmin, summf);                                    \
        }                                                                                          \
        return sumf - summf;                                                                       \
    }

/* Q6_K x Q8_K. 6-bit q = ql nibble | 2 qh bits << 4, unsigned [0, 63] for vpmaddubsw; the
 * -32 offset is taken out once per super-block as 32*sum_g sc_g*bsum_g (bsums cover
 * exactly Q6_K's 16-element groups). */
#define DEF_DOT_Q6_K(fname, ATTR, SACC)                                                            \
    ATTR static float fname(int64_t n, const uint8_t *vw, const void *vx)                          \
    {                                                                                              \
        const blk_q6_K *w = (const blk_q6_K *)vw;                                                  \
        const blk_q8_K *x = vx;                                                                    \
        const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);                       \
        __m256 acc = _mm256_setzero_ps();                                                          \
        for (int64_t i = 0; i < n / TSR_QK_K; ++i) {                                               \
            const float d = x[i].d * _cvtsh_ss(w[i].d);                                            \
            const __m256i sc16 =                                                                   \
                _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w[i].scales));               \
            const __m256i bs = _mm256_loadu_si256((const __m256i *)x[i].bsums);                    \
            __m256i sumi = _mm256_sub_epi32(_mm256_setzero_si256(),                                \
                                            _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5));    \
            _Pragma("GCC unroll 2") for (int h = 0; h < 2; ++h)                                    \
            {                                                                                      \
                const __m256i sch = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11)                \
                                      : _mm256_permute2x128_si256(sc16, sc16, 0x00);               \
                const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(w[i].ql + 64 * h));       \
                const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(w[i].ql + 64 * h + 32));  \
                const __m256i qhv = _mm256_loadu_si256((const __m256i *)(w[i].qh + 32 * h));       \
                const int8_t *yq = x[i].qs + 128 * h;                                              \
                __m256i q[4];                                                                      \
                q[0] = _mm256_or_si256(_mm256_and_si256(ql0, m4),                                  \
                                       _mm256_slli_epi16(_mm256_and_si256(qhv, m2), 4));           \
                q[1] = _mm256_or_si256(                                                            \
                    _mm256_and_si256(ql1, m4),                                                     \
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qhv, 2), m2), 4));        \
                q[2] = _mm256_or_si256(                                                            \
                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),                               \
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qhv, 4), m2), 4));        \
                q[3] = _mm256_or_si256(                                                            \
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),                               \
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qhv, 6), m2), 4));        \
                _Pragma("GCC unroll 4") for (int k = 0; k < 4; ++k)                                \
                {                                                                                  \
                    const __m256i yk = _mm256_loadu_si256((const __m256i *)(yq + 32 * k));         \
                    const __m256i s = _mm256_shuffle_epi8(                                         \
                        sch, _mm256_loadu_si256((const __m256i *)tsr_k_shuf_q6_K[k]));             \
                    sumi = SACC(sumi, _mm256_maddubs_epi16(q[k], yk), s);                          \
                }                                                                                  \
            }                                                                                      \
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);               \
        }                                                                                          \
        return tsr_hsum8_ps(acc);                                                                  \
    }

/* Q5_K x Q8_K: Q4_K's kernel with the 5th bit of each quant from qh (bit g of qh[l] for
 * element l of group g, as in dequant_q5_K) ORed in at bit 4; q is then unsigned 0..31. */
#define DEF_DOT_Q5_K(fname, ATTR, SACC)                                                            \
    ATTR static float fname(int64_t n, const uint8_t *vw, const void *vx)                          \
    {                                                                                              \
        const blk_q5_K *w = (const blk_q5_K *)vw;                                                  \
        const blk_q8_K *x = vx;                                                                    \
        const __m256i m4 = _mm256_set1_epi8(0x0F), m16 = _mm256_set1_epi8(0x10);                   \
        __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();                              \
        for (int64_t i = 0; i < n / TSR_QK_K; ++i) {                                               \
            const float d = x[i].d * _cvtsh_ss(w[i].d);                                            \
            const float dmin = x[i].d * _cvtsh_ss(w[i].dmin);                                      \
            const __m256i sm16 = tsr_q4_K_sm_x16(w[i].scales);                                     \
            const __m256i sc = _mm256_permute2x128_si256(sm16, sm16, 0x00);                        \
            const __m256i mins2 =                                                                  \
                _mm256_shuffle_epi8(_mm256_permute2x128_si256(sm16, sm16, 0x11),                   \
                                    _mm256_loadu_si256((const __m256i *)tsr_k_dup16));             \
            const __m256i summ =                                                                   \
                _mm256_madd_epi16(mins2, _mm256_loadu_si256((const __m256i *)x[i].bsums));         \
            accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(summ), accm);          \
            const __m256i hv = _mm256_loadu_si256((const __m256i *)w[i].qh);                       \
            __m256i sumi = _mm256_setzero_si256();                                                 \
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j)                                    \
            {                                                                                      \
                const __m256i q4 = _mm256_loadu_si256((const __m256i *)(w[i].qs + 32 * j));        \
                /* bit 2j (low nibbles) / 2j+1 (high) of each qh byte, moved to bit 4 */           \
                const __m256i hl =                                                                 \
                    _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(hv, 2 * j), 4), m16);     \
                const __m256i hh =                                                                 \
                    _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(hv, 2 * j + 1), 4), m16); \
                const __m256i ql = _mm256_or_si256(_mm256_and_si256(q4, m4), hl);                  \
                const __m256i qh =                                                                 \
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4, 4), m4), hh);           \
                const __m256i yl = _mm256_loadu_si256((const __m256i *)(x[i].qs + 64 * j));        \
                const __m256i yh = _mm256_loadu_si256((const __m256i *)(x[i].qs + 64 * j + 32));   \
                const __m256i scl = _mm256_shuffle_epi8(                                           \
                    sc, _mm256_loadu_si256((const __m256i *)tsr_k_shuf_q4_K[2 * j]));              \
                const __m256i sch = _mm256_shuffle_epi8(                                           \
                    sc, _mm256_loadu_si256((const __m256i *)tsr_k_shuf_q4_K[2 * j + 1]));          \
                sumi = SACC(sumi, _mm256_maddubs_epi16(ql, yl), scl);                              \
                sumi = SACC(sumi, _mm256_maddubs_epi16(qh, yh), sch);                              \
            }                                                                                      \
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);               \
        }                                                                                          \
        return tsr_hsum8_ps(_mm256_sub_ps(acc, accm));                                             \
    }

/* Q3_K x Q8_K. u = q2 | hbit<<2 is the quant + 4, unsigned 0..7, for vpmaddubsw; the -4
 * comes out once per super-block as 4*sum_g sc_g*bsum_g. Half h of the block: 32 qs bytes,
 * 4 shifts s of 2 bits = elements 128h + 32s + l, high bit 4h+s of hmask[l]; those 32
 * elements are groups 8h+2s (low lane) and 8h+2s+1 (high lane), as Q6_K's. */
#define DEF_DOT_Q3_K(fname, ATTR, SACC)                                                            \
    ATTR static float fname(int64_t n, const uint8_t *vw, const void *vx)                          \
    {                                                                                              \
        const blk_q3_K *w = (const blk_q3_K *)vw;                                                  \
        const blk_q8_K *x = vx;                                                                    \
        const __m256i m3 = _mm256_set1_epi8(3), m1 = _mm256_set1_epi8(1);                          \
        __m256 acc = _mm256_setzero_ps();                                                          \
        for (int64_t i = 0; i < n / TSR_QK_K; ++i) {                                               \
            const float d = x[i].d * _cvtsh_ss(w[i].d);                                            \
            const __m256i sc16 = tsr_q3_K_sc_x16(w[i].scales);                                     \
            const __m256i bs = _mm256_loadu_si256((const __m256i *)x[i].bsums);                    \
            __m256i sumi = _mm256_sub_epi32(_mm256_setzero_si256(),                                \
                                            _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 2));    \
            const __m256i hv = _mm256_loadu_si256((const __m256i *)w[i].hmask);                    \
            _Pragma("GCC unroll 2") for (int h = 0; h < 2; ++h)                                    \
            {                                                                                      \
                const __m256i sch = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11)                \
                                      : _mm256_permute2x128_si256(sc16, sc16, 0x00);               \
                const __m256i qv = _mm256_loadu_si256((const __m256i *)(w[i].qs + 32 * h));        \
                _Pragma("GCC unroll 4") for (int k = 0; k < 4; ++k)                                \
                {                                                                                  \
                    const __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(qv, 2 * k), m3);         \
                    const __m256i hb = _mm256_and_si256(_mm256_srli_epi16(hv, 4 * h + k), m1);     \
                    const __m256i u = _mm256_or_si256(q2, _mm256_slli_epi16(hb, 2));               \
                    const __m256i yk =                                                             \
                        _mm256_loadu_si256((const __m256i *)(x[i].qs + 128 * h + 32 * k));         \
                    const __m256i s = _mm256_shuffle_epi8(                                         \
                        sch, _mm256_loadu_si256((const __m256i *)tsr_k_shuf_q6_K[k]));             \
                    sumi = SACC(sumi, _mm256_maddubs_epi16(u, yk), s);                             \
                }                                                                                  \
            }                                                                                      \
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);               \
        }                                                                                          \
        return tsr_hsum8_ps(acc);                                                                  \
    }

/* Q2_K x Q8_K: Q3_K's layout without the high bit; 4-bit scales (low nibble) and mins (high
 * nibble) per 16-element group; the mins term uses the bsums as Q4_K's does. */
#define DEF_DOT_Q2_K(fname, ATTR, SACC)                                                            \
    ATTR static float fname(int64_t n, const uint8_t *vw, const void *vx)                          \
    {                                                                                              \
        const blk_q2_K *w = (const blk_q2_K *)vw;                                                  \
        const blk_q8_K *x = vx;                                                                    \
        const __m256i m3 = _mm256_set1_epi8(3);                                                    \
        const __m128i m4 = _mm_set1_epi8(0x0F);                                                    \
        __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();                              \
        for (int64_t i = 0; i < n / TSR_QK_K; ++i) {                                               \
            const float d = x[i].d * _cvtsh_ss(w[i].d);                                            \
            const float dmin = x[i].d * _cvtsh_ss(w[i].dmin);                                      \
            const __m128i raw = _mm_loadu_si128((const __m128i *)w[i].scales);                     \
            const __m256i sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(raw, m4));                     \
            const __m256i mn16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), m4));  \
            const __m256i summ =                                                                   \
                _mm256_madd_epi16(mn16, _mm256_loadu_si256((const __m256i *)x[i].bsums));          \
            accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(summ), accm);          \
            __m256i sumi = _mm256_setzero_si256();                                                 \
            _Pragma("GCC unroll 2") for (int h = 0; h < 2; ++h)                                    \
            {                                                                                      \
                const __m256i sch = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11)                \
                                      : _mm256_permute2x128_si256(sc16, sc16, 0x00);               \
                const __m256i qv = _mm256_loadu_si256((const __m256i *)(w[i].qs + 32 * h));        \
                _Pragma("GCC unroll 4") for (int k = 0; k < 4; ++k)                                \
                {                                                                                  \
                    const __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(qv, 2 * k), m3);         \
                    const __m256i yk =                                                             \
                        _mm256_loadu_si256((const __m256i *)(x[i].qs + 128 * h + 32 * k));         \
                    const __m256i s = _mm256_shuffle_epi8(                                         \
                        sch, _mm256_loadu_si256((const __m256i *)tsr_k_shuf_q6_K[k]));             \
                    sumi = SACC(sumi, _mm256_maddubs_epi16(q2, yk), s);                            \
                }                                                                                  \
            }                                                                                      \
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);               \
        }                                                                                          \
        return tsr_hsum8_ps(_mm256_sub_ps(acc, accm));                                             \
    }

/* ---- Q4_K / Q6_K GEMV over the repacked groups: 4 rows at a time -----------------------
 * Decode streams every weight byte once, so a row kernel must keep up with memory (~20-25
 * GB/s per core); the one-row dots above run at ~13-16 GB/s even from cache (~110
 * instructions per super-block). Four rows side by side share what depends on the
 * activation only (its 8 x 32 quants in registers, the Q8_K bsums, d_y), unpack the four
 * rows' scales with a few vector ops and reduce four rows' int32 lanes together: ~25 GB/s
 * per core from cache for Q4_K, ~33 for Q6_K. Each row keeps exactly its one-row dot's
 * arithmetic: the int32 sums are exact integers (whatever lanes and instruction order make
 * them), and every float operation is the one-row dot's, lane r of a vector standing for
 * row r's scalar (Q4_K) or its 8 lanes staying its own (Q6_K). Read from the repacked
 * groups (kernels/repack.h: super-block i of the 4 rows side by side), the 4 rows are one
 * linear stream, prefetched pf steps ahead spread over the loop (never in bursts; see
 * RQ_PREFETCH_LINE) into L2
 * (not L1): Q4_K RQ_PF_Q4_K steps of 4 x 144 bytes (16 KiB), Q6_K RQ_PF_Q6_K of 4 x 210
 * (13 KiB). Measured on the huge-page arena (worker/model_repack.c), 64 MiB, alternated in
 * one session, GB/s: into L1 (the old hint), Q6_K gained from 4 steps (21.1) to 12 (28-30,
 * 1 thread, 2048 columns) but sank to 21-23 at 8192 columns (L1 prefetches evicted the
 * 8.7 KiB activation row, as they did for Q4_0); into L2, Q6_K 16 steps: 1 thread 34.5
 * (2048) / 34.4 (8192) against 29.2 / 22.9 into L1 at 12 (8 steps 28, 20 steps 33);
 * 2 threads 60-61 / 63.5 against 56-58 / 49. Q4_K into L2 at 28 steps: 1 thread 28.0 /
 * 28.5 against 27.8 / 25.3 into L1 at 11 (16 steps 27.0 / 27.7, 40 steps 27.8 / 28.3);
 * 2 threads 50.6-53 / 52 against 46-51 / 50. (Q4_K from cache: 30.6, Q6_K 38.5.)
 * At low host bandwidth (15-33 GB/s plain 2-thread read) Q4_K needs further: 48 steps
 * (27 KiB) against 28, tests/bench_gemv_stream (1B layer matrices, 196 MiB, 2 threads, engine
 * claims), share of the plain read in the same run, 4 runs: 0.811 -> 0.880, 0.909 -> 0.898
 * (40: 0.920), 0.828 -> 0.852, 0.963 -> 1.011; 64-128 no better, prefetcht0 0.755, t2 as t1,
 * nta 0.41, none 0.70. Q6_K stays at 16 (0.95-1.0 of the read at 16-64). Those 196 MiB sat in
 * this host's 480 MiB L3; from 1 GiB (memory, 2026-12-05) Q4_K reads 0.78-0.80 of the plain
 * read at 28, 48 or 96 steps alike: the distance is not what holds it below the read. */
#define RQ_PF_Q4_K 48
#define RQ_PF_Q6_K 16
/* Q6_K on AMD CPUs: into L1, 2 steps (1680 bytes) ahead (see rq_kgemv_prefetch). */
#define RQ_PF_Q6_K_L1 2

/* Prefetch into L2 line `off` of the super-block pf steps ahead of block b in its stream
 * (blocks `bstride` bytes apart: pf * 4 blocks on in the repacked groups, one linear stream),
 * by tsr_prefetch_line_l2 (x86hsum.h). The GEMVs issue a row's lines one per step of its compute
 * (Q4_K: line j at step j of 4; Q6_K: two a half), not as one burst. tests/bench_gemv_stream (1
 * GiB, 2 threads, 2026-12-06), share of the faster read (kernels/membw.h): Q4_K 0.62-0.63 as a
 * burst, 0.68 as a burst from registers, 0.74 spread with the offsets folded, 0.74-0.78 spread from
 * registers; Q6_K 0.67-0.68, 0.67, 0.78, 0.80-0.83; 1B Q4_K_M decode 35.8 -> 42.5 tok/s.
 * Why the instruction form matters so much is not observable here (no hardware counters);
 * kernels/q40_gemm.c and q80_gemv.c measured the same. One past the matrix is harmless. */
#define RQ_PREFETCH_LINE(on, b, pf, bstride, off)                                                  \
    do {                                                                                           \
        if (on) tsr_prefetch_line_l2((const char *)(b) + (pf) * (bstride) + (off));                \
    } while (0)

/* vpshufb masks: byte g (0..7) of a 128-bit lane zero-extended to all 8 int16 slots. */
#define BCW(g)  (g), 0x80
#define BCW8(g) BCW(g), BCW(g), BCW(g), BCW(g), BCW(g), BCW(g), BCW(g), BCW(g)
static const uint8_t k_bcw_q4_K[8][32] __attribute__((aligned(32))) = {
    {BCW8(0), BCW8(0)}, {BCW8(1), BCW8(1)}, {BCW8(2), BCW8(2)}, {BCW8(3), BCW8(3)},
    {BCW8(4), BCW8(4)}, {BCW8(5), BCW8(5)}, {BCW8(6), BCW8(6)}, {BCW8(7), BCW8(7)},
};
/* Q4_K block bytes 0..15 (d, dmin, scales[12]; s_j = byte 4 + j) -> per lane: bytes
 * 0-3 s0..s3, 4-7 s8..s11, 8-11 s4..s7, 12-15 s8..s11 (their high nibbles used), and the
 * sources of the top 2 bits: 4-7 s0..s3, 12-15 s4..s7 (get_scale_min_k4). */
static const uint8_t k_q4_K_sm_a[32]
    __attribute__((aligned(32))) = {4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15,
                                    4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15};
static const uint8_t k_q4_K_sm_b[32] __attribute__((aligned(32))) = {
    0x80, 0x80, 0x80, 0x80, 4, 5, 6, 7, 0x80, 0x80, 0x80, 0x80, 8, 9, 10, 11,
    0x80, 0x80, 0x80, 0x80, 4, 5, 6, 7, 0x80, 0x80, 0x80, 0x80, 8, 9, 10, 11};
static const uint8_t k_q4_K_sm_lo[32] __attribute__((aligned(32))) = {
    0x3f, 0x3f, 0x3f, 0x3f, 0x0f, 0x0f, 0x0f, 0x0f, 0x3f, 0x3f, 0x3f, 0x3f, 0x0f, 0x0f, 0x0f, 0x0f,
    0x3f, 0x3f, 0x3f, 0x3f, 0x0f, 0x0f, 0x0f, 0x0f, 0x3f, 0x3f, 0x3f, 0x3f, 0x0f, 0x0f, 0x0f, 0x0f};
/* mins (bytes 8-15 of a lane) zero-extended to int16 */
static const uint8_t k_q4_K_mins16[32] __attribute__((aligned(32))) = {
    8, 0x80, 9, 0x80, 10, 0x80, 11, 0x80, 12, 0x80, 13, 0x80, 14, 0x80, 15, 0x80,
    8, 0x80, 9, 0x80, 10, 0x80, 11, 0x80, 12, 0x80, 13, 0x80, 14, 0x80, 15, 0x80};

/* Two rows' raw block heads (row a in the low lane, b in the high) -> per lane the 8
 * scales then the 8 mins as bytes (tsr_q4_K_scales_mins). */
TSR_AVX2 TSR_INLINE __m256i q4_K_sm_2rows(__m256i raw)
{
    const __m256i a = _mm256_shuffle_epi8(raw, _mm256_load_si256((const __m256i *)k_q4_K_sm_a));
    const __m256i b = _mm256_shuffle_epi8(raw, _mm256_load_si256((const __m256i *)k_q4_K_sm_b));
    /* bytes 12-15 of each lane: the high nibbles of s8..s11 */
    const __m256i c = _mm256_blend_epi32(a, _mm256_srli_epi16(a, 4), 0x88);
    const __m256i lo = _mm256_and_si256(c, _mm256_load_si256((const __m256i *)k_q4_K_sm_lo));
    /* (s >> 6) << 4: bits 6-7 to 4-5 (bytes where b is 0 get 0) */
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 2), _mm256_set1_epi8(0x30));
    return _mm256_or_si256(lo, hi);
}

/* Which software prefetch the Q4_K / Q6_K GEMVs issue: 0 none, 1 into L2 far ahead
 * (RQ_PREFETCH_LINE), 2 the same for Q4_K but Q6_K into L1 RQ_PF_Q6_K_L1 steps ahead.
 * - Intel (the Xeon measured above): 1. Without it Q4_K read 0.70 of the plain read against
 *   0.88.
 * - AMD Zen 4 (AVX-512): 0. Its hardware prefetchers follow the groups' one linear stream:
 *   tests/bench_gemv_stream (512 MiB, 2 threads, 2026-12-06), share of the plain read in the
 *   same run, medians of 16 alternated runs at a 29-33 GB/s read, with 1 -> without: Q4_K
 *   0.895 -> 0.907, Q6_K 0.857 -> 0.942 (a plain line loop there also read 23 GB/s on one
 *   thread with a prefetcht1 8 KiB ahead against 31 without).
 * - AMD Zen 3 (AVX2 only): 2. tests/bench_gemv_stream (1 GiB, 2 threads, 2026-12-07,
 *   alternated), Q6_K: none 0.74-0.78, 1 0.88-0.90, into L1 1 step ahead 0.86-0.90, 2 steps
 *   0.76-0.95 (median 0.93), 3 0.88-0.92, 4 0.87-0.94; 1B Q4_K_M decode (its head and 4 of
 *   its ffn_down are Q6_K), 8 alternated pairs: 34.8-43.4 against 31.4-41.2 tokens/s, 7 of 8
 *   faster. Q4_K's groups (which AVX2 CPUs load only with TSR_Q4K_LANES=0): 0.74-0.85 with
 *   against 0.59-0.75 without.
 * The Q4_0 GEMV keeps its prefetch everywhere (its pass reads four group streams: 0.44-0.57
 * of the read without it on Zen 4). TSR_KGEMV_PREFETCH=0 / 1 turns it off / on (the CPU's
 * form). Every choice runs the same arithmetic: outputs are identical. */
static _Atomic int g_kgemv_pf = -1;
static bool rq_amd(void)
{
    return __builtin_cpu_is("amd");
}
static bool rq_avx512(void)
{
    return __builtin_cpu_supports("avx512f");
}
static int rq_kgemv_prefetch(void)
{
    /* the on/off default per vendor is tsr_cpu_choice's; off only on AMD CPUs with AVX-512 */
    if (!tsr_cpu_choice(&g_kgemv_pf, "TSR_KGEMV_PREFETCH", !rq_avx512())) return 0;
    return rq_amd() ? 2 : 1;
}

/* fname##_kg: a 4-row kernel fname##_4 (block i of row r at w0 + r * stride + i * bstride)
 * over the repacked groups of kernels/repack.h (gb bytes apart, block i of the 4 rows side by
 * side: one linear stream; a short last group's missing rows repeat its last row there,
 * computed and not stored). The file layout keeps the one-row kernels: its 4 rows side by
 * side would be 4 streams, which measured slower from memory than one. */
#define DEF_ROWS_DRIVERS(fname, ATTR, BLK, dot1)                                                   \
    ATTR TSR_INLINE void fname##_kg_pf(const int pfo, int64_t n, int64_t nrows,                    \
                                       const uint8_t *groups, size_t gb, const void *vx, float *y) \
    {                                                                                              \
        for (int64_t r = 0; r < nrows; r += 4) {                                                   \
            float o[4];                                                                            \
            fname##_4(pfo, n / TSR_QK_K, groups + (size_t)(r / 4) * gb, sizeof(BLK),               \
                      4 * sizeof(BLK), (const blk_q8_K *)vx, o);                                   \
            for (int k = 0; k < 4 && r + k < nrows; ++k) y[r + k] = o[k];                          \
        }                                                                                          \
    }                                                                                              \
    /* a copy per software prefetch form (rq_kgemv_prefetch) */                                    \
    ATTR static void fname##_kg(int64_t n, int64_t nrows, const uint8_t *groups, size_t gb,        \
                                const void *vx, float *y)                                          \
    {                                                                                              \
        const int pf = rq_kgemv_prefetch();                                                        \
        if (pf == 2)                                                                               \
            fname##_kg_pf(2, n, nrows, groups, gb, vx, y);                                         \
        else if (pf == 1)                                                                          \
            fname##_kg_pf(1, n, nrows, groups, gb, vx, y);                                         \
        else                                                                                       \
            fname##_kg_pf(0, n, nrows, groups, gb, vx, y);                                         \
    }

/* How the 4-row Q4_K GEMV applies the 6-bit scales to its int16 pair sums (either way the
 * same exact int32 isum per row). SCALES(sm01, sm23, scb) writes what a super-block's scales
 * for the 4 rows need to scb (256 bytes), JSTEP(SACC, s, ql, qh, yl, yh, scb, sm01, sm23, r,
 * j) adds row r's j-th 64 elements to s.
 * _BCW (AVX2): vpmaddubsw pairs times the scale broadcast to all 16 words by a vpshufb of
 * the row's lane (scale broadcasts by loads measured 8% slower there from cache). */
#define Q4K_SC_BCW(sm01, sm23, scb) (void)(scb)
#define Q4K_J_BCW(SACC, s, ql, qh, yl, yh, scb, sm01, sm23, r, j)                                  \
    do {                                                                                           \
        const __m256i smx_ = (r) < 2 ? (sm01) : (sm23);                                            \
        const __m256i sc_ = ((r)&1) ? _mm256_permute2x128_si256(smx_, smx_, 0x11)                  \
                                    : _mm256_permute2x128_si256(smx_, smx_, 0x00);                 \
        s = SACC(                                                                                  \
            s, _mm256_maddubs_epi16(ql, yl),                                                       \
            _mm256_shuffle_epi8(sc_, _mm256_load_si256((const __m256i *)k_bcw_q4_K[2 * (j)])));    \
        s = SACC(s, _mm256_maddubs_epi16(qh, yh),                                                  \
                 _mm256_shuffle_epi8(                                                              \
                     sc_, _mm256_load_si256((const __m256i *)k_bcw_q4_K[2 * (j) + 1])));           \
    } while (0)
/* _PAIR (AVX-512 VNNI): vpdpbusd sums 4 products per int32 lane (|sum| <= 4 * 15 * 128, so
 * vpackssdw packs the low and the high nibbles' lanes into int16 exactly), then one vpdpwssd
 * against the 16-byte pattern (s_2j x4, s_2j+1 x4) of row r = 2p + o at scb[128p + 32j +
 * 16o]: 3 multiplies per 64 elements instead of 4. */
static const uint8_t k_q4_K_scp[4][32] __attribute__((aligned(32))) = {
#define SCP(a, b) a, 0x80, a, 0x80, a, 0x80, a, 0x80, b, 0x80, b, 0x80, b, 0x80, b, 0x80
    {SCP(0, 1), SCP(0, 1)},
    {SCP(2, 3), SCP(2, 3)},
    {SCP(4, 5), SCP(4, 5)},
    {SCP(6, 7), SCP(6, 7)},
#undef SCP
};
#define Q4K_SC_PAIR(sm01, sm23, scb)                                                               \
    do {                                                                                           \
        _Pragma("GCC unroll 4") for (int j_ = 0; j_ < 4; ++j_)                                     \
        {                                                                                          \
            const __m256i m_ = _mm256_load_si256((const __m256i *)k_q4_K_scp[j_]);                 \
            _mm256_store_si256((__m256i *)((scb) + 32 * j_), _mm256_shuffle_epi8(sm01, m_));       \
            _mm256_store_si256((__m256i *)((scb) + 128 + 32 * j_), _mm256_shuffle_epi8(sm23, m_)); \
        }                                                                                          \
        /* opaque to gcc, which otherwise forwards the stores through shuffles */                  \
        __asm__ volatile("" : "+m"(scb));                                                          \
    } while (0)
#define Q4K_J_PAIR(SACC, s, ql, qh, yl, yh, scb, sm01, sm23, r, j)                                 \
    do {                                                                                           \
        const __m256i p_ =                                                                         \
            _mm256_packs_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ql, yl),                \
                               _mm256_dpbusd_epi32(_mm256_setzero_si256(), qh, yh));               \
        s = _mm256_dpwssd_epi32(                                                                   \
            s, p_,                                                                                 \
            _mm256_broadcastsi128_si256(_mm_load_si128(                                            \
                (const __m128i *)((scb) + 128 * ((r) >> 1) + 32 * (j) + 16 * ((r)&1)))));          \
    } while (0)

/* Q4_K, 4 rows: per super-block row r's exact isum_r and imin_r (DEF_DOT_Q4_K's), then one
 * 8-lane FMA: lanes 0-3 the rows' sumf chains (isum_r * (d_y * d_r)), lanes 4-7 their summf
 * chains (imin_r * (d_y * dmin_r)); y_r = sumf_r - summf_r. */
#define DEF_ROWS_Q4_K(fname, ATTR, SACC, SCALES, JSTEP, dot1)                                      \
    ATTR TSR_INLINE void fname##_4(const int pfo, int64_t nb, const uint8_t *w0, size_t stride,    \
                                   size_t bstride, const blk_q8_K *x, float *out)                  \
    {                                                                                              \
        const __m256i m4 = _mm256_set1_epi8(0x0F);                                                 \
        /* fp16 d0..d3 then dmin0..dmin3 from the 4 rows' (d, dmin) dwords */                      \
        const __m128i dsel = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);  \
        {                                                                                          \
            __m256 acc = _mm256_setzero_ps();                                                      \
            for (int64_t i = 0; i < nb; ++i) {                                                     \
                const uint8_t *wi = w0 + (size_t)i * bstride;                                      \
                const blk_q4_K *b0 = (const blk_q4_K *)wi;                                         \
                const blk_q4_K *b1 = (const blk_q4_K *)(wi + stride);                              \
                const blk_q4_K *b2 = (const blk_q4_K *)(wi + 2 * stride);                          \
                const blk_q4_K *b3 = (const blk_q4_K *)(wi + 3 * stride);                          \
                const __m128i h0 = _mm_loadu_si128((const __m128i *)b0);                           \
                const __m128i h1 = _mm_loadu_si128((const __m128i *)b1);                           \
                const __m128i h2 = _mm_loadu_si128((const __m128i *)b2);                           \
                const __m128i h3 = _mm_loadu_si128((const __m128i *)b3);                           \
                const __m256i sm01 =                                                               \
                    q4_K_sm_2rows(_mm256_inserti128_si256(_mm256_castsi128_si256(h0), h1, 1));     \
                const __m256i sm23 =                                                               \
                    q4_K_sm_2rows(_mm256_inserti128_si256(_mm256_castsi128_si256(h2), h3, 1));     \
                /* bsum pairs bp_g = bsum_2g + bsum_2g+1 as int16 in both lanes */                 \
                const __m256i bs = _mm256_loadu_si256((const __m256i *)x[i].bsums);                \
                const __m256i bp = _mm256_permute4x64_epi64(_mm256_hadd_epi16(bs, bs), 0x88);      \
                const __m256i mm01 = _mm256_madd_epi16(                                            \
                    _mm256_shuffle_epi8(sm01, _mm256_load_si256((const __m256i *)k_q4_K_mins16)),  \
                    bp);                                                                           \
                const __m256i mm23 = _mm256_madd_epi16(                                            \
                    _mm256_shuffle_epi8(sm23, _mm256_load_si256((const __m256i *)k_q4_K_mins16)),  \
                    bp);                                                                           \
                uint8_t scb[256] __attribute__((aligned(32)));                                     \
                SCALES(sm01, sm23, scb);                                                           \
                __m256i sumi[4];                                                                   \
                _Pragma("GCC unroll 4") for (int rr = 0; rr < 4; ++rr)                             \
                {                                                                                  \
                    const blk_q4_K *bk = rr == 0 ? b0 : rr == 1 ? b1 : rr == 2 ? b2 : b3;          \
                    __m256i s = _mm256_setzero_si256();                                            \
                    _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j)                            \
                    {                                                                              \
                        if (j < 3) RQ_PREFETCH_LINE(pfo, bk, RQ_PF_Q4_K, bstride, 64 * j);         \
                        const __m256i q4 = _mm256_loadu_si256((const __m256i *)(bk->qs + 32 * j)); \
                        const __m256i ql = _mm256_and_si256(q4, m4);                               \
                        const __m256i qh = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);         \
                        const __m256i yl =                                                         \
                            _mm256_loadu_si256((const __m256i *)(x[i].qs + 64 * j));               \
                        const __m256i yh =                                                         \
                            _mm256_loadu_si256((const __m256i *)(x[i].qs + 64 * j + 32));          \
                        JSTEP(SACC, s, ql, qh, yl, yh, scb, sm01, sm23, rr, j);                    \
                    }                                                                              \
                    sumi[rr] = s;                                                                  \
                }                                                                                  \
                /* row r's isum in lane r, imin in lane 4 + r (exact int32 sums) */                \
                const __m256i hs = _mm256_hadd_epi32(_mm256_hadd_epi32(sumi[0], sumi[1]),          \
                                                     _mm256_hadd_epi32(sumi[2], sumi[3]));         \
                const __m128i is =                                                                 \
                    _mm_add_epi32(_mm256_castsi256_si128(hs), _mm256_extracti128_si256(hs, 1));    \
                __m256i hm = _mm256_hadd_epi32(mm01, mm23);                                        \
                hm = _mm256_hadd_epi32(hm, hm);                                                    \
                const __m128i im = _mm_unpacklo_epi32(_mm256_castsi256_si128(hm),                  \
                                                      _mm256_extracti128_si256(hm, 1));            \
                /* d_y * d_r, d_y * dmin_r */                                                      \
                const __m128i dd = _mm_shuffle_epi8(                                               \
                    _mm_unpacklo_epi64(_mm_unpacklo_epi32(h0, h1), _mm_unpacklo_epi32(h2, h3)),    \
                    dsel);                                                                         \
                const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(x[i].d), _mm256_cvtph_ps(dd));   \
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_inserti128_si256(                  \
                                          _mm256_castsi128_si256(is), im, 1)),                     \
                                      scale, acc);                                                 \
            }                                                                                      \
            _mm_storeu_ps(out,                                                                     \
                          _mm_sub_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1))); \
        }                                                                                          \
    }                                                                                              \
    DEF_ROWS_DRIVERS(fname, ATTR, blk_q4_K, dot1)

/* How the 4-row Q6_K GEMV adds half h (128 elements: q[k], k = 0..3, 32 unsigned 6-bit
 * quants each, against yq + 32k) of a row to its 8 int32 lanes sumi; lane 4L + e of q[k]
 * takes scale s_(8h + 2k + L). Either way each lane gets the same exact integer.
 * _SHUF (AVX2): vpmaddubsw pairs times the scale words (vpshufb of sch, the 8 scales of half
 * h in both lanes), DEF_DOT_Q6_K's instructions. */
#define Q6K_Q_SHUF(SACC, sumi, q, yq, sc16, sch, h)                                                \
    do {                                                                                           \
        _Pragma("GCC unroll 4") for (int k_ = 0; k_ < 4; ++k_)                                     \
        {                                                                                          \
            const __m256i yk_ = _mm256_loadu_si256((const __m256i *)((yq) + 32 * k_));             \
            const __m256i s_ = _mm256_shuffle_epi8(                                                \
                sch, _mm256_loadu_si256((const __m256i *)tsr_k_shuf_q6_K[k_]));                    \
            sumi = SACC(sumi, _mm256_maddubs_epi16(q[k_], yk_), s_);                               \
        }                                                                                          \
    } while (0)
/* _PAIR (AVX-512 VNNI): vpdpbusd sums 4 products per int32 lane (|sum| <= 4 * 63 * 128 fits
 * int16); two k's lanes as the int16 halves of one dword (k low, k + 1 high), one vpdpwssd
 * against (s_k, s_k+1) words per lane (vpermw of sc16): 3 multiplies per 64 elements
 * instead of 4 and 1 shuffle instead of 2. */
static const uint16_t k_q6_K_sp[4][16] __attribute__((aligned(32))) = {
#define SP(a, b) a, b, a, b, a, b, a, b
    {SP(0, 2), SP(1, 3)},
    {SP(4, 6), SP(5, 7)},
    {SP(8, 10), SP(9, 11)},
    {SP(12, 14), SP(13, 15)},
#undef SP
};
#define Q6K_Q_PAIR(SACC, sumi, q, yq, sc16, sch, h)                                                \
    do {                                                                                           \
        (void)(sch);                                                                               \
        _Pragma("GCC unroll 2") for (int p_ = 0; p_ < 2; ++p_)                                     \
        {                                                                                          \
            const __m256i r0_ =                                                                    \
                _mm256_dpbusd_epi32(_mm256_setzero_si256(), q[2 * p_],                             \
                                    _mm256_loadu_si256((const __m256i *)((yq) + 64 * p_)));        \
            const __m256i r1_ =                                                                    \
                _mm256_dpbusd_epi32(_mm256_setzero_si256(), q[2 * p_ + 1],                         \
                                    _mm256_loadu_si256((const __m256i *)((yq) + 64 * p_ + 32)));   \
            const __m256i t_ = _mm256_mask_blend_epi16(0xAAAA, r0_, _mm256_slli_epi32(r1_, 16));   \
            const __m256i s_ = _mm256_permutexvar_epi16(                                           \
                _mm256_load_si256((const __m256i *)k_q6_K_sp[2 * (h) + p_]), sc16);                \
            sumi = _mm256_dpwssd_epi32(sumi, t_, s_);                                              \
        }                                                                                          \
    } while (0)

/* Q6_K, 4 rows: each row's 8 int32 lanes and 8-lane float chain exactly DEF_DOT_Q6_K's
 * (lane k: elements 4k..4k+3 of every 32), the activation's quants loaded once for the 4. */
#define DEF_ROWS_Q6_K(fname, ATTR, SACC, QSTEP, dot1)                                              \
    ATTR TSR_INLINE void fname##_4(const int pfo, int64_t nb, const uint8_t *w0, size_t stride,    \
                                   size_t bstride, const blk_q8_K *x, float *out)                  \
    {                                                                                              \
        const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);                   \
        {                                                                                          \
            __m256 acc[4];                                                                         \
            _Pragma("GCC unroll 4") for (int rr = 0; rr < 4; ++rr) acc[rr] = _mm256_setzero_ps();  \
            for (int64_t i = 0; i < nb; ++i) {                                                     \
                const __m256i bs = _mm256_loadu_si256((const __m256i *)x[i].bsums);                \
                _Pragma("GCC unroll 4") for (int rr = 0; rr < 4; ++rr)                             \
                {                                                                                  \
                    const blk_q6_K *bk =                                                           \
                        (const blk_q6_K *)(w0 + (size_t)rr * stride + (size_t)i * bstride);        \
                    const float d = x[i].d * _cvtsh_ss(bk->d);                                     \
                    const __m256i sc16 =                                                           \
                        _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)bk->scales));        \
                    __m256i sumi =                                                                 \
                        _mm256_sub_epi32(_mm256_setzero_si256(),                                   \
                                         _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5));       \
                    _Pragma("GCC unroll 2") for (int h = 0; h < 2; ++h)                            \
                    {                                                                              \
                        if (pfo == 2) {                                                            \
                            const char *pl = (const char *)bk + RQ_PF_Q6_K_L1 * bstride + 128 * h; \
                            tsr_prefetch_line_l1(pl);                                              \
                            tsr_prefetch_line_l1(pl + 64);                                         \
                        } else {                                                                   \
                            RQ_PREFETCH_LINE(pfo, bk, RQ_PF_Q6_K, bstride, 128 * h);               \
                            RQ_PREFETCH_LINE(pfo, bk, RQ_PF_Q6_K, bstride, 128 * h + 64);          \
                        }                                                                          \
                        const __m256i sch = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11)        \
                                              : _mm256_permute2x128_si256(sc16, sc16, 0x00);       \
                        const __m256i ql0 =                                                        \
                            _mm256_loadu_si256((const __m256i *)(bk->ql + 64 * h));                \
                        const __m256i ql1 =                                                        \
                            _mm256_loadu_si256((const __m256i *)(bk->ql + 64 * h + 32));           \
                        const __m256i qhv =                                                        \
                            _mm256_loadu_si256((const __m256i *)(bk->qh + 32 * h));                \
                        const int8_t *yq = x[i].qs + 128 * h;                                      \
                        /* 6-bit q = low or high nibble of ql | 2 bits of qh at bits 4-5 */        \
                        __m256i q[4];                                                              \
                        q[0] = _mm256_or_si256(_mm256_and_si256(ql0, m4),                          \
                                               _mm256_and_si256(_mm256_slli_epi16(qhv, 4), m30));  \
                        q[1] = _mm256_or_si256(_mm256_and_si256(ql1, m4),                          \
                                               _mm256_and_si256(_mm256_slli_epi16(qhv, 2), m30));  \
                        q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),    \
                                               _mm256_and_si256(qhv, m30));                        \
                        q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),    \
                                               _mm256_and_si256(_mm256_srli_epi16(qhv, 2), m30));  \
                        QSTEP(SACC, sumi, q, yq, sc16, sch, h);                                    \
                    }                                                                              \
                    acc[rr] =                                                                      \
                        _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc[rr]);     \
                }                                                                                  \
            }                                                                                      \
            _Pragma("GCC unroll 4") for (int rr = 0; rr < 4; ++rr) out[rr] =                       \
                tsr_hsum8_ps(acc[rr]);                                                             \
        }                                                                                          \
    }                                                                                              \
    DEF_ROWS_DRIVERS(fname, ATTR, blk_q6_K, dot1)

#define DEF_ROWS_BY_DOT(fname, ATTR, dot)                                                          \
    ATTR static void fname(int64_t n, int64_t nrows, const uint8_t *w, size_t stride,              \
                           const void *x, float *y)                                                \
    {                                                                                              \
        for (int64_t r = 0; r < nrows; ++r) y[r] = dot(n, w + (size_t)r * stride, x);              \
    }

/* clang-format off */
DEF_DOT_Q2_K(dot_q2_K_avx2, TSR_AVX2, SACC_AVX2)
DEF_DOT_Q3_K(dot_q3_K_avx2, TSR_AVX2, SACC_AVX2)
DEF_DOT_Q4_K(dot_q4_K_avx2, TSR_AVX2, SACC_AVX2)
DEF_DOT_Q5_K(dot_q5_K_avx2, TSR_AVX2, SACC_AVX2)
DEF_DOT_Q6_K(dot_q6_K_avx2, TSR_AVX2, SACC_AVX2)
DEF_ROWS_BY_DOT(rows_q2_K_avx2, TSR_AVX2, dot_q2_K_avx2)
DEF_ROWS_BY_DOT(rows_q3_K_avx2, TSR_AVX2, dot_q3_K_avx2)
DEF_ROWS_Q4_K(kg_q4_K_avx2, TSR_AVX2, SACC_AVX2, Q4K_SC_BCW, Q4K_J_BCW, dot_q4_K_avx2)
DEF_ROWS_BY_DOT(rows_q4_K_avx2, TSR_AVX2, dot_q4_K_avx2)
DEF_ROWS_BY_DOT(rows_q5_K_avx2, TSR_AVX2, dot_q5_K_avx2)
DEF_ROWS_Q6_K(kg_q6_K_avx2, TSR_AVX2, SACC_AVX2, Q6K_Q_SHUF, dot_q6_K_avx2)
DEF_ROWS_BY_DOT(rows_q6_K_avx2, TSR_AVX2, dot_q6_K_avx2)
/* clang-format on */

/* ---- AVX-512 VNNI (256-bit vectors, EVEX vpdpbusd) -------------------------------------- */

#define TSR_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))

/* The mask of a masked load of the first nbytes (clamped to 0..64) of 64 bytes. */
TSR_VNNI TSR_INLINE uint64_t first_bytes_mask(int64_t nbytes)
{
    return nbytes >= 64 ? ~0ull : nbytes <= 0 ? 0 : (1ull << nbytes) - 1;
}

/* Q8_0 x Q8_0 with vpdpbusd (u8 x s8 summed into int32, no saturation): the sign trick,
 * |w| x sign(w)*y. (The w+128 alternative saves an op but needs a per-block correction
 * load, and loads are what this loop runs out of first.) */
TSR_VNNI TSR_INLINE __m256i q8_dot_vnni(const int8_t *wq, const int8_t *yq)
{
    const __m256i w = _mm256_loadu_si256((const __m256i *)wq);
    const __m256i y = _mm256_loadu_si256((const __m256i *)yq);
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(w), _mm256_sign_epi8(y, w));
}

TSR_VNNI static float q8_0_row_vnni(int64_t nb, const uint8_t *vw, const blk_q8_0 *x,
                                    const act_info *ai)
{
#define Q8_DOT_VNNI(bb) q8_dot_vnni(w[bb].qs, x[bb].qs)
    BLOCK_LOOP(blk_q8_0, Q8_DOT_VNNI, 0);
#undef Q8_DOT_VNNI
}

/* clang-format off */
ACT_ROWS(rows_q8_0_vnni, TSR_VNNI, q8_0_row_vnni, 0, rows_q8_0_scalar)
/* clang-format on */

/* Q4_1's nibbles [0, 15] (unsigned) against y with vpdpbusd. */
TSR_VNNI TSR_INLINE __m256i q4_dot_vnni(const uint8_t *wq, const int8_t *yq)
{
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), q4_0_nibbles(wq),
                               _mm256_loadu_si256((const __m256i *)yq));
}

TSR_VNNI static float q4_1_row_vnni(int64_t nb, const uint8_t *vw, const blk_q8_1 *x,
                                    const act_info *ai)
{
#define Q41_DOT_VNNI(bb) q4_dot_vnni(w[bb].qs, x[bb].qs)
    BLOCK_LOOP_EX(blk_q4_1, Q41_DOT_VNNI, 1, OFFW_M);
#undef Q41_DOT_VNNI
}

/* AVX-512 BW: the 5th bits straight from a mask register (vmovdqu8 with zeroing). */
TSR_VNNI TSR_INLINE __m256i q5_bytes_vnni(const uint8_t *qs, const uint8_t *qh)
{
    uint32_t bits;
    memcpy(&bits, qh, 4);
    return _mm256_or_si256(q4_0_nibbles(qs),
                           _mm256_maskz_mov_epi8((__mmask32)bits, _mm256_set1_epi8(0x10)));
}

TSR_VNNI TSR_INLINE __m256i q5_dot_vnni(const uint8_t *qs, const uint8_t *qh, const int8_t *yq)
{
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), q5_bytes_vnni(qs, qh),
                               _mm256_loadu_si256((const __m256i *)yq));
}

/* Q5_0 in ggml's order (rows_q5_0_avx2) with vpdpbusd for the lanes. */
TSR_VNNI TSR_INLINE __m256i q5_0_lanes_vnni(const blk_q5_0 *w, const int8_t *yq)
{
    const __m256i q = _mm256_sub_epi8(q5_bytes_vnni(w->qs, w->qh), _mm256_set1_epi8(16));
    const __m256i y = _mm256_loadu_si256((const __m256i *)yq);
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(q), _mm256_sign_epi8(y, q));
}

/* Two rows in one 512-bit register: block b of row A in the low 8 int32 lanes, of row B in
 * the high 8, each lane the exact sum over its 4 elements of (q5 - 16) * y, the same
 * integers as q5_0_lanes_vnni: vpdpbusd of the unsigned 5-bit quants onto -16 * (the
 * lane sums of y), ny2 (made once per block for all rows of a pass). The nibbles of both
 * rows come from two 16-byte broadcasts ([A, A, B, B], the high copies shifted by 4), the
 * 5th bits of both (64 bits) add 16 under a mask. */
TSR_VNNI TSR_INLINE __m512i q5_0_pair_lanes_512(const blk_q5_0 *a, const blk_q5_0 *b, __m512i y2,
                                                __m512i ny2)
{
    __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)a->qs));
    v = _mm512_mask_broadcast_i32x4(v, 0xFF00, _mm_loadu_si128((const __m128i *)b->qs));
    v = _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0)),
                         _mm512_set1_epi8(0x0F));
    uint32_t ha, hb;
    memcpy(&ha, a->qh, 4);
    memcpy(&hb, b->qh, 4);
    v = _mm512_mask_add_epi8(v, _cvtu64_mask64((uint64_t)ha | (uint64_t)hb << 32), v,
                             _mm512_set1_epi8(0x10));
    return _mm512_dpbusd_epi32(ny2, v, y2);
}

/* The fp16 scales of blocks 0..m-1 (m <= 8) of a Q5_0 row from blk on (the words at byte
 * 22k) as 8 words, 0 past m: three loads (masked past the group's bytes: nothing beyond
 * the row is read) and two word permutes. A scalar gather of the 8 words (f16x8_strided)
 * took about a third of this kernel's time. */
static const uint16_t k_q50_didx01[32] = {0, 11, 22, 33, 44, 55};
static const uint16_t k_q50_didx2[32] = {0, 0, 0, 0, 0, 0, 2, 13};

TSR_VNNI TSR_INLINE __m128i q5_0_d8(const blk_q5_0 *blk, int m)
{
    const uint8_t *p = (const uint8_t *)blk;
    __m512i z0, z1, z2;
    if (m == 8) {
        z0 = _mm512_loadu_si512(p);
        z1 = _mm512_loadu_si512(p + 64);
        z2 = _mm512_maskz_loadu_epi8(0x0FFFFFFF, p + 128);
    } else {
        const int64_t nbytes = (int64_t)sizeof(blk_q5_0) * m;
        z0 = _mm512_maskz_loadu_epi8(first_bytes_mask(nbytes), p);
        z1 = _mm512_maskz_loadu_epi8(first_bytes_mask(nbytes - 64), p + 64);
        z2 = _mm512_maskz_loadu_epi8(first_bytes_mask(nbytes - 128), p + 128);
    }
    __m512i t = _mm512_permutex2var_epi16(z0, _mm512_loadu_si512(k_q50_didx01), z1);
    t = _mm512_mask_permutexvar_epi16(t, 0xC0, _mm512_loadu_si512(k_q50_didx2), z2);
    return _mm512_castsi512_si128(t);
}

/* Scales fp16(d_w) * d_y of 8 blocks of rows A and B ([A 0..7 | B 0..7], dy16 = [d_y 0..7 |
 * d_y 0..7]); block k's pair of them broadcast to the two row halves by one vpermps. */
TSR_VNNI TSR_INLINE __m512 q5_0_pair_scales(const blk_q5_0 *a, const blk_q5_0 *b, __m512 dy16,
                                            int m)
{
    const __m256i dd =
        _mm256_inserti128_si256(_mm256_castsi128_si256(q5_0_d8(a, m)), q5_0_d8(b, m), 1);
    return _mm512_mul_ps(_mm512_cvtph_ps(dd), dy16);
}

TSR_VNNI TSR_INLINE __m512 q5_0_bcast_pair(__m512 sc, int k)
{
    return _mm512_permutexvar_ps(_mm512_set_epi32(8 + k, 8 + k, 8 + k, 8 + k, 8 + k, 8 + k, 8 + k,
                                                  8 + k, k, k, k, k, k, k, k, k),
                                 sc);
}

TSR_VNNI TSR_INLINE float hsum8_hi512(__m512 v)
{
    return tsr_hsum8_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

/* 8 floats at p in both halves of a 512-bit register. */
TSR_VNNI TSR_INLINE __m512 q50_bcast8_ps(const float *p)
{
    return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(p))));
}

/* Software prefetch of the rows 4 passes (16 rows) ahead, from each row's current block:
 * the hardware prefetchers alone left this kernel waiting on memory (CPU time per row-block
 * streaming a 62 MB matrix, one thread: 3.2 ns, 2.3 ns with it; 1, 2, 8, 16 passes ahead
 * measured 2.6-3.0, 2.6-2.7, 2.4-2.6, 2.4-2.7). Prefetches past the matrix never fault. */
#define Q50_PF_BYTES (16 * stride)

/* One block of a pass of P row pairs: y broadcast to both halves, -16 * its lane sums made
 * once for the pass. Named accumulators, not arrays: gcc kept an array in memory (a store
 * and a reload in every FMA chain). */
#define Q50P_BLOCK(k)                                                                              \
    do {                                                                                           \
        const __m512i y2_ =                                                                        \
            _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)x[b + (k)].qs));            \
        const __m512i ny2_ = _mm512_sub_epi32(                                                     \
            _mm512_setzero_si512(),                                                                \
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(0x10), y2_));             \
        if (((k)&1) == 0) { /* every line of the rows 4 passes ahead (44 bytes per row) */         \
            _mm_prefetch((const char *)&w0[b + (k)] + Q50_PF_BYTES, _MM_HINT_T0);                  \
            _mm_prefetch((const char *)&w1[b + (k)] + Q50_PF_BYTES, _MM_HINT_T0);                  \
            _mm_prefetch((const char *)&w2[b + (k)] + Q50_PF_BYTES, _MM_HINT_T0);                  \
            _mm_prefetch((const char *)&w3[b + (k)] + Q50_PF_BYTES, _MM_HINT_T0);                  \
        }                                                                                          \
        acc0 = _mm512_fmadd_ps(                                                                    \
            q5_0_bcast_pair(sc0, (k)),                                                             \
            _mm512_cvtepi32_ps(q5_0_pair_lanes_512(&w0[b + (k)], &w1[b + (k)], y2_, ny2_)), acc0); \
        if (P == 2)                                                                                \
            acc1 = _mm512_fmadd_ps(                                                                \
                q5_0_bcast_pair(sc1, (k)),                                                         \
                _mm512_cvtepi32_ps(q5_0_pair_lanes_512(&w2[b + (k)], &w3[b + (k)], y2_, ny2_)),    \
                acc1);                                                                             \
    } while (0)

/* 2P rows (P = 1 or 2, a constant after inlining) in ggml's order, each row's 8 lanes one FMA
 * chain over its blocks (acc = fma(d_w*d_y, float(lanes), acc)), then tsr_hsum8_ps: the
 * operations of rows_q5_0_avx2 per row, two rows per instruction. */
TSR_VNNI TSR_INLINE void q5_0_pass_512(const int P, int64_t nb, const uint8_t *w, size_t stride,
                                       const blk_q8_0 *x, const float *dy, float *y)
{
    const blk_q5_0 *w0 = (const blk_q5_0 *)w, *w1 = (const blk_q5_0 *)(w + stride);
    const blk_q5_0 *w2 = P == 2 ? (const blk_q5_0 *)(w + 2 * stride) : w0;
    const blk_q5_0 *w3 = P == 2 ? (const blk_q5_0 *)(w + 3 * stride) : w1;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m512 sc0, sc1 = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        const __m512 dy16 = q50_bcast8_ps(dy + b);
        sc0 = q5_0_pair_scales(&w0[b], &w1[b], dy16, 8);
        if (P == 2) sc1 = q5_0_pair_scales(&w2[b], &w3[b], dy16, 8);
        Q50P_BLOCK(0);
        Q50P_BLOCK(1);
        Q50P_BLOCK(2);
        Q50P_BLOCK(3);
        Q50P_BLOCK(4);
        Q50P_BLOCK(5);
        Q50P_BLOCK(6);
        Q50P_BLOCK(7);
    }
    if (b < nb) {
        const int m = (int)(nb - b);
        const __m512 dy16 = q50_bcast8_ps(dy + b);
        sc0 = q5_0_pair_scales(&w0[b], &w1[b], dy16, m);
        if (P == 2) sc1 = q5_0_pair_scales(&w2[b], &w3[b], dy16, m);
        for (int k = 0; k < m; ++k) Q50P_BLOCK(k);
    }
    y[0] = tsr_hsum8_ps(_mm512_castps512_ps256(acc0));
    y[1] = hsum8_hi512(acc0);
    if (P == 2) {
        y[2] = tsr_hsum8_ps(_mm512_castps512_ps256(acc1));
        y[3] = hsum8_hi512(acc1);
    }
}
#undef Q50P_BLOCK
#undef Q50_PF_BYTES

TSR_VNNI static void rows_q5_0_vnni(int64_t n, int64_t nrows, const uint8_t *w, size_t stride,
                                    const void *vx, float *y)
{
    const blk_q8_0 *x = vx;
    const int64_t nb = n / TSR_QK8_0, nbp = (nb + 7) / 8 * 8;
    float stack_dy[ACT_STACK_BLOCKS];
    float *dy = nbp <= ACT_STACK_BLOCKS ? stack_dy : malloc(sizeof(float) * (size_t)nbp);
    int64_t r = 0;
    if (dy) {
        for (int64_t b = 0; b < nb; ++b) dy[b] = _cvtsh_ss(x[b].d);
        for (int64_t b = nb; b < nbp; ++b) dy[b] = 0.0f;
        for (; r + 4 <= nrows; r += 4)
            q5_0_pass_512(2, nb, w + (size_t)r * stride, stride, x, dy, y + r);
        for (; r + 2 <= nrows; r += 2)
            q5_0_pass_512(1, nb, w + (size_t)r * stride, stride, x, dy, y + r);
        if (dy != stack_dy) free(dy);
    }
    /* the last row (or all of them if the heap failed): the same operations, 256 bits */
    for (; r < nrows; ++r) {
        const blk_q5_0 *w0 = (const blk_q5_0 *)(w + (size_t)r * stride);
        __m256 a0 = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; ++b)
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w0[b].d) * _cvtsh_ss(x[b].d)),
                                 _mm256_cvtepi32_ps(q5_0_lanes_vnni(&w0[b], x[b].qs)), a0);
        y[r] = tsr_hsum8_ps(a0);
    }
}

TSR_VNNI static float q5_1_row_vnni(int64_t nb, const uint8_t *vw, const blk_q8_1 *x,
                                    const act_info *ai)
{
#define Q51_DOT_VNNI(bb) q5_dot_vnni(w[bb].qs, w[bb].qh, x[bb].qs)
    BLOCK_LOOP_EX(blk_q5_1, Q51_DOT_VNNI, 1, OFFW_M);
#undef Q51_DOT_VNNI
}

/* clang-format off */
ACT_ROWS_B(rows_q4_1_vnni, TSR_VNNI, q4_1_row_vnni, 0, rows_q4_1_scalar, act_info_build_q8_1)
ACT_ROWS_B(rows_q5_1_vnni, TSR_VNNI, q5_1_row_vnni, 0, rows_q5_1_scalar, act_info_build_q8_1)
/* clang-format on */

/* clang-format off */
DEF_DOT_Q2_K(dot_q2_K_vnni, TSR_VNNI, SACC_VNNI)
DEF_DOT_Q3_K(dot_q3_K_vnni, TSR_VNNI, SACC_VNNI)
DEF_DOT_Q4_K(dot_q4_K_vnni, TSR_VNNI, SACC_VNNI)
DEF_DOT_Q5_K(dot_q5_K_vnni, TSR_VNNI, SACC_VNNI)
DEF_DOT_Q6_K(dot_q6_K_vnni, TSR_VNNI, SACC_VNNI)
DEF_ROWS_BY_DOT(rows_q2_K_vnni, TSR_VNNI, dot_q2_K_vnni)
DEF_ROWS_BY_DOT(rows_q3_K_vnni, TSR_VNNI, dot_q3_K_vnni)
DEF_ROWS_Q4_K(kg_q4_K_vnni, TSR_VNNI, SACC_VNNI, Q4K_SC_PAIR, Q4K_J_PAIR, dot_q4_K_vnni)
DEF_ROWS_BY_DOT(rows_q4_K_vnni, TSR_VNNI, dot_q4_K_vnni)
DEF_ROWS_BY_DOT(rows_q5_K_vnni, TSR_VNNI, dot_q5_K_vnni)
DEF_ROWS_Q6_K(kg_q6_K_vnni, TSR_VNNI, SACC_VNNI, Q6K_Q_PAIR, dot_q6_K_vnni)
DEF_ROWS_BY_DOT(rows_q6_K_vnni, TSR_VNNI, dot_q6_K_vnni)
/* clang-format on */

/* ---- Q8_0 quantization of activations --------------------------------------------------
 * Every token of every Q8_0/Q4_0 matmul is quantized first (~5% of a prefill in scalar
 * code, roundf being a libm call). Same bytes as quant_q8_0: the max of |x| is exact in
 * any order (NaN ignored like fmaxf: vmaxps returns its second operand then); d and 1/d
 * are the same scalar operations; x*id is the same product; roundf (half away from zero)
 * is trunc plus a carry of 1 when |fraction| >= 0.5 (the fraction is exact). */
/* One block: the quants into qs, returns the unrounded scale d = amax/127. */
TSR_AVX2 TSR_INLINE float q8_block_avx2(const float *x, int8_t *qs)
{
    const __m256 sign = _mm256_set1_ps(-0.0f), half = _mm256_set1_ps(0.5f);
    const __m256 one = _mm256_set1_ps(1.0f);
    {
        __m256 v[4], m = _mm256_setzero_ps();
        for (int k = 0; k < 4; ++k) {
            v[k] = _mm256_loadu_ps(x + 8 * k);
            m = _mm256_max_ps(_mm256_andnot_ps(sign, v[k]), m);
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float d = _mm_cvtss_f32(h) / 127;
        const float id = d ? 1.0f / d : 0.0f;
        __m256i q[4];
        for (int k = 0; k < 4; ++k) {
            const __m256 p = _mm256_mul_ps(v[k], _mm256_set1_ps(id));
            const __m256 t = _mm256_round_ps(p, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            const __m256 big =
                _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(p, t)), half, _CMP_GE_OQ);
            const __m256 carry = _mm256_or_ps(_mm256_and_ps(big, one), _mm256_and_ps(sign, p));
            q[k] = _mm256_cvtps_epi32(_mm256_add_ps(t, carry));
        }
        /* int32 -> int8: the low byte, as the scalar (int8_t) conversion stores it (also for
         * the 0x80000000 of inf/NaN products, e.g. a block of subnormals where 1/d
         * overflows); masked to [0, 255] the unsigned packs are exact. They interleave
         * 128-bit lanes, hence the permute. */
        const __m256i lo = _mm256_set1_epi32(0xFF);
        const __m256i b = _mm256_packus_epi16(
            _mm256_packus_epi32(_mm256_and_si256(q[0], lo), _mm256_and_si256(q[1], lo)),
            _mm256_packus_epi32(_mm256_and_si256(q[2], lo), _mm256_and_si256(q[3], lo)));
        _mm256_storeu_si256((__m256i *)qs, _mm256_permutevar8x32_epi32(
                                               b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        return d;
    }
}

TSR_AVX2 static void quant_q8_0_avx2(const float *x, blk_q8_0 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i, x += TSR_QK8_0)
        y[i].d = tsr_f32_to_f16(q8_block_avx2(x, y[i].qs));
}

/* Q8_1: the same quants and d, plus s = fp16(d * sum(q)) (the sum via vpsadbw on q^0x80). */
TSR_AVX2 static void quant_q8_1_avx2(const float *x, blk_q8_1 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; ++i, x += TSR_QK8_0) {
        const float d = q8_block_avx2(x, y[i].qs);
        y[i].d = tsr_f32_to_f16(d);
        const int32_t sum = tsr_qsum32_i8(y[i].qs);
        y[i].s = tsr_f32_to_f16((float)sum * d);
    }
}

/* Q8_K (the K-quants' activations: a Q4_K / Q6_K matmul's input, e.g. every ffn_down of
 * Qwen2.5-Coder-0.5B and of the 1B Q4_K_M file). The decode step quantizes it on the caller's
 * thread while the pool's other threads wait: quant_q8_K's scalar loops took 8.3 us a
 * 4864-element row here (1.7 ns an element; 24 rows a Qwen2.5 token, ~1 % of its step).
 * Same bytes as quant_q8_K on every input:
 * - the first element of the largest |x| (NaN ignored: vmaxps returns its second operand),
 *   found by comparing |x| with that maximum, which is what the scalar scan keeps;
 * - iscale, d = 1 / iscale: the same scalar operations;
 * - nearest_int(iscale * x) rounds to nearest even by the float adder; here vroundps does the
 *   same on the same product (|iscale * x| <= ~127.00004, where both agree; an inf / NaN
 *   product, from an inf x or an iscale that overflowed, is byte 0 both ways: the adder's
 *   masked bits give -0x400000, vcvtps2dq 0x80000000, both with a low byte of 0);
 * - min(127, q), stored as its low byte (the scalar (int8_t) conversion);
 * - bsums from the stored bytes: exact integer sums (vpmaddubsw of 1 x q, vpmaddwd, vphaddd).
 * The product is a separate vmulps: no FMA may fuse it with anything (nothing is added). */
TSR_AVX2 static void quant_q8_K_avx2(const float *x, blk_q8_K *y, int64_t nb)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i lo8 = _mm256_set1_epi32(0xFF), c127 = _mm256_set1_epi32(127);
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t i = 0; i < nb; ++i, x += TSR_QK_K) {
        __m256 m = _mm256_setzero_ps();
        for (int k = 0; k < TSR_QK_K / 8; ++k)
            m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + 8 * k)), m);
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float amax = _mm_cvtss_f32(h);
        if (!amax) {
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        const __m256 am = _mm256_set1_ps(amax);
        float max = 0.0f;
        for (int k = 0; k < TSR_QK_K / 8; ++k) {
            const __m256 v = _mm256_loadu_ps(x + 8 * k);
            const int hit =
                _mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, v), am, _CMP_EQ_OQ));
            if (hit) {
                max = x[8 * k + __builtin_ctz((unsigned)hit)];
                break;
            }
        }
        const float iscale = -127.f / max;
        const __m256 is = _mm256_set1_ps(iscale);
        for (int k = 0; k < TSR_QK_K / 32; ++k) {
            __m256i q[4];
            for (int j = 0; j < 4; ++j) {
                const __m256 p = _mm256_mul_ps(is, _mm256_loadu_ps(x + 32 * k + 8 * j));
                const __m256i r = _mm256_cvtps_epi32(
                    _mm256_round_ps(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                q[j] = _mm256_and_si256(_mm256_min_epi32(r, c127), lo8);
            }
            const __m256i b = _mm256_packus_epi16(_mm256_packus_epi32(q[0], q[1]),
                                                  _mm256_packus_epi32(q[2], q[3]));
            _mm256_storeu_si256((__m256i *)(y[i].qs + 32 * k),
                                _mm256_permutevar8x32_epi32(b, perm));
        }
        /* bsums, 128 bytes (groups g0..g7 of 16) at a time: per 32 bytes 8 int32 sums of 4
         * (vpmaddubsw by 1, vpmaddwd by 1); two vphaddd rounds leave [g0 g2 g4 g6 | g1 g3 g5
         * g7], permuted to g0..g7 and packed (|g| <= 2032) */
        for (int k = 0; k < TSR_QK_K / 128; ++k) {
            __m256i s[4];
            for (int j = 0; j < 4; ++j)
                s[j] = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(
                        ones8, _mm256_loadu_si256((const __m256i *)(y[i].qs + 128 * k + 32 * j))),
                    ones16);
            const __m256i g = _mm256_permutevar8x32_epi32(
                _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3])),
                perm);
            _mm_storeu_si128(
                (__m128i *)(y[i].bsums + 8 * k),
                _mm_packs_epi32(_mm256_castsi256_si128(g), _mm256_extracti128_si256(g, 1)));
        }
        y[i].d = 1 / iscale;
    }
}

/* ---- Multi-token tiles (prefill) -------------------------------------------------------
 *
 * y[t*ys + r] = dot(row r, token t) for a rows x tokens tile of Q8_0 / Q4_0 weights.
 *
 * Why: the row kernels above pay the whole per-block sequence (weight load and unpack,
 * activation load, integer dot, conversion, scale, FMA) for every (row, token) pair, so a
 * prefill of many tokens would run at decode's per-token compute cost with the weights
 * already in cache. A micro-tile of R rows x TILE_T tokens loads and unpacks each weight
 * block once for TILE_T tokens and each activation block once for R rows; per (row,
 * token, block) only the integer dot (vpdpbusd), its conversion and one FMA with a
 * broadcast scale remain. On Zen 4 the dot and the FMA share two pipes, so ~1 cycle per
 * (row, token, 32-element block) is the floor; the row kernels take ~3.5.
 *
 * Bit-identity with the row kernel of the same ISA (BLOCK_LOOP) holds output by output:
 * the int32 lanes of each block's dot are the same exact integers (sums over the same 4
 * elements per lane), the scale is the same product fp16(d_w)*d_y, block b goes into
 * accumulator b % 4 with the same FMA in increasing b, and the end is the same
 * (acc0+acc1)+(acc2+acc3)+acc_off and tsr_hsum8_ps. Only the schedule differs: 4 accumulators
 * for each of 16 outputs would need 64 registers, so a K chunk is walked chain-major
 * (blocks 0,4,8,.. into acc0 of every output of the tile, then 1,5,9,.. into acc1, ...),
 * one accumulator per output live, the other chains parked.
 *
 * Loop nest of one call:
 *   token chunks    act_info built once per chunk; <= 640 KiB of activations (128 tokens of
 *                   2048 or 64 of 8192 elements), which stay in Zen 4's 1 MiB L2 with their
 *                   act_info; the weights stream from memory once per chunk
 *   row groups (R)  weight scales made once per chunk, the next group prefetched
 *   K chunks        TILE_KC blocks: the group's K slice (R x 2 KiB of Q8_0) stays in L1 for
 *                   all the token chunk's micro-tiles
 *   micro-tiles     TILE_T tokens; accumulators parked in the workspace between K chunks
 *                   when a row is longer than TILE_KC blocks.
 * Edges: missing rows repeat the last row (computed, not stored); a token tail of 1-3 gets
 * a narrower micro-tile (its own instantiation). */
enum { TILE_T = 4, TILE_KC = 64, TILE_ACT_BYTES = 640 << 10 };

/* A micro-tile's state across K chunks: the 4 chains and Q4_0's offset accumulator. */
#define TILE_STATE_VECS(R) (5 * (R)*TILE_T)

/* y of a full 4-row x 2-token pair: v[k] is output (row k/2, token k%2) before tsr_hsum8_ps.
 * The 8 horizontal sums run side by side with exactly tsr_hsum8_ps's additions per output
 * ((v0+v4)+(v2+v6)) + ((v1+v5)+(v3+v7)), so the results are bit-identical to it. */
TSR_AVX2 TSR_INLINE void hsum_4x2_store(const __m256 v[8], float *y0, float *y1)
{
    __m256 a[4], b[2];
    for (int k = 0; k < 4; ++k) { /* lanes: lo(v)+hi(v) of v[2k] | of v[2k+1] */
        a[k] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * k], v[2 * k + 1], 0x20),
                             _mm256_permute2f128_ps(v[2 * k], v[2 * k + 1], 0x31));
    }
    for (int k = 0; k < 2; ++k) { /* per 128-bit lane: (x0+x2, x1+x3) of two outputs */
        b[k] = _mm256_add_ps(_mm256_shuffle_ps(a[2 * k], a[2 * k + 1], 0x44),
                             _mm256_shuffle_ps(a[2 * k], a[2 * k + 1], 0xEE));
    }
    /* lane k of the low half: row k, token 0; of the high half: row k, token 1 */
    const __m256 c =
        _mm256_add_ps(_mm256_shuffle_ps(b[0], b[1], 0x88), _mm256_shuffle_ps(b[0], b[1], 0xDD));
    _mm_storeu_ps(y0, _mm256_castps256_ps128(c));
    _mm_storeu_ps(y1, _mm256_extractf128_ps(c, 1));
}

/* The kernel for BLK weights, R rows (a constant of the instantiation) x T tokens (a
 * constant after inlining into the switch below):
 *  WPREP(wv, wa, blk)  loads/unpacks weight block blk into wv, and a helper into wa;
 *  YPREP(yv, blk)      loads an activation block;
 *  IDOT(wv, wa, yv)    the block's int32x8 dot, lanes as the row kernel's;
 *  CVT(i)              those lanes as floats (exactly vcvtdq2ps's values);
 *  MULT                Q4_0's offset term (act_info.ey), 0 for Q8_0;
 *  FALLBACK            the rows kernel, token by token, if the workspace malloc fails.
 * fname_mk runs blocks [k0, k0 + kc) of one micro-tile; first / last: the row's first /
 * last K chunk (start from zero / write y rather than park the state in st). */
#define DEF_TILE(fname, ATTR, BLK, R, MULT, WPREP, YPREP, IDOT, CVT, FALLBACK)                     \
    DEF_TILE_EX(fname, ATTR, BLK, blk_q8_0, R, MULT, 0, d, act_info_build, WPREP, YPREP, IDOT,     \
                CVT, FALLBACK)
#define DEF_TILE_EX(fname, ATTR, BLK, XBLK, R, MULT, HASMIN, MFIELD, BUILD, WPREP, YPREP, IDOT,    \
                    CVT, FALLBACK)                                                                 \
    ATTR TSR_INLINE void fname##_mk(                                                               \
        const int T, size_t k0, int kc, bool first, bool last, size_t nbp, const uint8_t *w,       \
        size_t ws, int nr, const uint8_t *x, size_t xs, const float *dy, const float *ey,          \
        const float *dwr, const float *mwr, __m256 *st, float *y, size_t ys)                       \
    {                                                                                              \
        const BLK *wr[R];                                                                          \
        const XBLK *xt[TILE_T];                                                                    \
        for (int r = 0; r < R; ++r) wr[r] = (const BLK *)(w + (size_t)(r < nr ? r : nr - 1) * ws); \
        for (int t = 0; t < T; ++t) xt[t] = (const XBLK *)(x + (size_t)t * xs);                    \
        float sc[R * TILE_T][TILE_KC] __attribute__((aligned(32)));                                \
        __m256 park[4][R * TILE_T], off[R * TILE_T];                                               \
        _Pragma("GCC unroll 16") for (int o = 0; o < R * T; ++o)                                   \
        {                                                                                          \
            off[o] = first ? _mm256_setzero_ps() : st[4 * R * TILE_T + o];                         \
        }                                                                                          \
        /* the K chunk's scales sc[o][j] = fp16(d_w)*d_y as BLOCK_LOOP makes them (both zero-      \
         * padded past nb), and Q4_0's offset FMA per 8 blocks */                                  \
        for (int g = 0; g < kc; g += 8) {                                                          \
            const size_t b = k0 + (size_t)g;                                                       \
            _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r)                                    \
            {                                                                                      \
                const __m256 dw = _mm256_loadu_ps(dwr + (size_t)r * nbp + b);                      \
                _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                                \
                {                                                                                  \
                    const int o = r * T + t;                                                       \
                    if (MULT || HASMIN) { /* the offset: d_w (Q4_0 / Q5_0) or m_w (Q4_1) */        \
                        const __m256 ow =                                                          \
                            HASMIN ? _mm256_loadu_ps(mwr + (size_t)r * nbp + b) : dw;              \
                        off[o] = _mm256_fmadd_ps(ow, _mm256_loadu_ps(ey + (size_t)t * nbp + b),    \
                                                 off[o]);                                          \
                    }                                                                              \
                    _mm256_store_ps(sc[o] + g,                                                     \
                                    _mm256_mul_ps(dw, _mm256_loadu_ps(dy + (size_t)t * nbp + b))); \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int c = 0; c < 4; ++c) {                                                              \
            __m256 acc[R * TILE_T];                                                                \
            _Pragma("GCC unroll 16") for (int o = 0; o < R * T; ++o)                               \
            {                                                                                      \
                acc[o] = first ? _mm256_setzero_ps() : st[c * R * TILE_T + o];                     \
            }                                                                                      \
            for (int j = c; j < kc; j += 4) {                                                      \
                const size_t b = k0 + (size_t)j;                                                   \
                __m256i wv[R], wa[R], yv[TILE_T];                                                  \
                _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r)                                \
                    WPREP(wv[r], wa[r], &wr[r][b]);                                                \
                _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t) YPREP(yv[t], &xt[t][b]);       \
                _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r)                                \
                {                                                                                  \
                    _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                            \
                    {                                                                              \
                        const int o = r * T + t;                                                   \
                        const __m256 f = CVT(IDOT(wv[r], wa[r], yv[t]));                           \
                        acc[o] = _mm256_fmadd_ps(_mm256_set1_ps(sc[o][j]), f, acc[o]);             \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
            _Pragma("GCC unroll 16") for (int o = 0; o < R * T; ++o) park[c][o] = acc[o];          \
        }                                                                                          \
        if (!last) {                                                                               \
            for (int o = 0; o < R * T; ++o) {                                                      \
                for (int c = 0; c < 4; ++c) st[c * R * TILE_T + o] = park[c][o];                   \
                st[4 * R * TILE_T + o] = off[o];                                                   \
            }                                                                                      \
            return;                                                                                \
        }                                                                                          \
        __m256 v[R * TILE_T];                                                                      \
        _Pragma("GCC unroll 16") for (int o = 0; o < R * T; ++o)                                   \
        {                                                                                          \
            const __m256 sum4 = _mm256_add_ps(_mm256_add_ps(park[0][o], park[1][o]),               \
                                              _mm256_add_ps(park[2][o], park[3][o]));              \
            v[o] = _mm256_add_ps(sum4, off[o]);                                                    \
        }                                                                                          \
        if (R == 4 && nr == 4 && T % 2 == 0) {                                                     \
            for (int t = 0; t < T; t += 2) {                                                       \
                const __m256 v8[8] = {v[t],         v[t + 1],        v[T + t],                     \
                                      v[T + t + 1], v[2 * T + t],    v[2 * T + t + 1],             \
                                      v[3 * T + t], v[3 * T + t + 1]};                             \
                hsum_4x2_store(v8, y + (size_t)t * ys, y + (size_t)(t + 1) * ys);                  \
            }                                                                                      \
            return;                                                                                \
        }                                                                                          \
        for (int r = 0; r < nr; ++r) {                                                             \
            for (int t = 0; t < T; ++t)                                                            \
                y[(size_t)t * ys + (size_t)r] = tsr_hsum8_ps(v[r * T + t]);                        \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    ATTR static void fname(int64_t n, int64_t nrows, const uint8_t *w, size_t ws, int32_t ntok,    \
                           const uint8_t *x, size_t xs, float *y, size_t ys)                       \
    {                                                                                              \
        const size_t nb = (size_t)n / TSR_QK8_0, nbp = (nb + 7) / 8 * 8;                           \
        /* tokens per chunk: activations within TILE_ACT_BYTES, a multiple of TILE_T, and          \
         * balanced (128 tokens as 64 + 64, not 120 + 8) */                                        \
        size_t tc = TILE_ACT_BYTES / (xs ? xs : 1) / TILE_T * TILE_T;                              \
        if (tc < TILE_T) tc = TILE_T;                                                              \
        const size_t n_chunks = ((size_t)ntok + tc - 1) / tc;                                      \
        tc = ((size_t)ntok + n_chunks - 1) / n_chunks;                                             \
        tc = (tc + TILE_T - 1) / TILE_T * TILE_T;                                                  \
        if (tc > (size_t)ntok) tc = (size_t)ntok;                                                  \
        /* workspace: the micro-tiles' parked state (rows longer than TILE_KC blocks), a row       \
         * group's weight scales, the token chunk's act_info */                                    \
        const size_t n_st = nb > TILE_KC ? (tc + TILE_T - 1) / TILE_T * TILE_STATE_VECS(R) : 0;    \
        const size_t n_fl = 2 * (size_t)R * nbp + 2 * tc * nbp;                                    \
        uint8_t *buf = malloc(sizeof(__m256) * n_st + sizeof(float) * n_fl + 32);                  \
        if (!buf) {                                                                                \
            for (int32_t t = 0; t < ntok; ++t)                                                     \
                FALLBACK(n, nrows, w, ws, x + (size_t)t * xs, y + (size_t)t * ys);                 \
            return;                                                                                \
        }                                                                                          \
        __m256 *st = (__m256 *)(buf + (32 - (uintptr_t)buf % 32));                                 \
        float *dw = (float *)(st + n_st), *dy = dw + (size_t)R * nbp, *ey = dy + tc * nbp;         \
        float *mw = ey + tc * nbp; /* the rows' mins (HASMIN) */                                   \
        for (size_t t0 = 0; t0 < (size_t)ntok; t0 += tc) {                                         \
            const int tcn = (size_t)ntok - t0 < tc ? (int)((size_t)ntok - t0) : (int)tc;           \
            for (int t = 0; t < tcn; ++t) {                                                        \
                act_info ai = {dy + (size_t)t * nbp, ey + (size_t)t * nbp};                        \
                BUILD((const XBLK *)(x + (t0 + (size_t)t) * xs), (int64_t)nb, MULT, &ai);          \
            }                                                                                      \
            for (int64_t r0 = 0; r0 < nrows; r0 += R) {                                            \
                const int nr = nrows - r0 < R ? (int)(nrows - r0) : R;                             \
                const uint8_t *wt = w + (size_t)r0 * ws;                                           \
                /* the next group's weights toward L2 now, so that its first touch (the next       \
                 * iteration's scale pass) does not wait on memory */                              \
                for (int64_t r = r0 + R; r < nrows && r < r0 + 2 * R; ++r) {                       \
                    const char *p = (const char *)(w + (size_t)r * ws);                            \
                    for (size_t off = 0; off < nb * sizeof(BLK); off += 64)                        \
                        _mm_prefetch(p + off, _MM_HINT_T1);                                        \
                }                                                                                  \
                /* the group's weight scales as floats (rows past nrows repeat the last) */        \
                for (int r = 0; r < R; ++r) {                                                      \
                    const BLK *rw = (const BLK *)(wt + (size_t)(r < nr ? r : nr - 1) * ws);        \
                    for (size_t b = 0; b < nb; b += 8) {                                           \
                        const int m = nb - b < 8 ? (int)(nb - b) : 8;                              \
                        _mm256_storeu_ps(dw + (size_t)r * nbp + b,                                 \
                                         f16x8_strided(&rw[b].d, sizeof(BLK), m));                 \
                        if (HASMIN)                                                                \
                            _mm256_storeu_ps(mw + (size_t)r * nbp + b,                             \
                                             f16x8_strided(&rw[b].MFIELD, sizeof(BLK), m));        \
                    }                                                                              \
                }                                                                                  \
                for (size_t k0 = 0; k0 < nb; k0 += TILE_KC) {                                      \
                    const int kc = nb - k0 < TILE_KC ? (int)(nb - k0) : TILE_KC;                   \
                    const bool first = k0 == 0, last = k0 + TILE_KC >= nb;                         \
                    for (int t = 0; t < tcn; t += TILE_T) {                                        \
                        const uint8_t *xt = x + (t0 + (size_t)t) * xs;                             \
                        const float *dyt = dy + (size_t)t * nbp, *eyt = ey + (size_t)t * nbp;      \
                        __m256 *stq = st + (size_t)(t / TILE_T) * TILE_STATE_VECS(R);              \
                        float *yt = y + (t0 + (size_t)t) * ys + (size_t)r0;                        \
                        switch (tcn - t) {                                                         \
                        case 1:                                                                    \
                            fname##_mk(1, k0, kc, first, last, nbp, wt, ws, nr, xt, xs, dyt, eyt,  \
                                       dw, mw, stq, yt, ys);                                       \
                            break;                                                                 \
                        case 2:                                                                    \
                            fname##_mk(2, k0, kc, first, last, nbp, wt, ws, nr, xt, xs, dyt, eyt,  \
                                       dw, mw, stq, yt, ys);                                       \
                            break;                                                                 \
                        case 3:                                                                    \
                            fname##_mk(3, k0, kc, first, last, nbp, wt, ws, nr, xt, xs, dyt, eyt,  \
                                       dw, mw, stq, yt, ys);                                       \
                            break;                                                                 \
                        default: /* the common case, with whole rows of <= TILE_KC blocks          \
                                    specialized: no parking */                                     \
                            if (nb <= TILE_KC)                                                     \
                                fname##_mk(4, 0, kc, true, true, nbp, wt, ws, nr, xt, xs, dyt,     \
                                           eyt, dw, mw, stq, yt, ys);                              \
                            else                                                                   \
                                fname##_mk(4, k0, kc, first, last, nbp, wt, ws, nr, xt, xs, dyt,   \
                                           eyt, dw, mw, stq, yt, ys);                              \
                            break;                                                                 \
                        }                                                                          \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        free(buf);                                                                                 \
    }

/* int32 lanes -> float. The VNNI kernels start each dot at 0x4B400000 (the bits of
 * 1.5*2^23) instead of 0, so the lanes come out as the float bits of 1.5*2^23 + dot,
 * exact for |dot| < 2^22 (ours are < 2^17); subtracting 1.5*2^23 leaves float(dot)
 * exactly, as vcvtdq2ps makes it, but on Zen 4's FP add pipes instead of the pipes that
 * the dot and the scale FMA already saturate. */
#define TILE_MAGIC        0x4B400000
#define TILE_CVT_AVX2(i)  _mm256_cvtepi32_ps(i)
#define TILE_CVT_MAGIC(i) _mm256_sub_ps(_mm256_castsi256_ps(i), _mm256_set1_ps(12582912.0f))

#define Q8T_Y(yv, blk) yv = _mm256_loadu_si256((const __m256i *)(blk)->qs)

/* Q8_0 x Q8_0, AVX2: the row kernel's sign trick; |w| once per weight block. */
#define Q8T_W_AVX2(wv, wa, blk)                                                                    \
    do {                                                                                           \
        wv = _mm256_loadu_si256((const __m256i *)(blk)->qs);                                       \
        wa = _mm256_sign_epi8(wv, wv);                                                             \
    } while (0)
#define Q8T_DOT_AVX2(wv, wa, yv)                                                                   \
    _mm256_madd_epi16(_mm256_maddubs_epi16(wa, _mm256_sign_epi8(yv, wv)), _mm256_set1_epi16(1))

/* Q8_0 x Q8_0, VNNI: y+128 (= y ^ 0x80) is unsigned, so vpdpbusd(u=y+128, s=w) needs no
 * per-pair sign op (vpsignb would take the dot's pipes); starting each dot at
 * MAGIC - 128*sum(w) per lane (wa, once per weight block) leaves MAGIC + sum(w*y): the
 * row kernel's lanes (activations are in [-127, 127] as tsr_quant_row makes them, where its
 * sign trick is exact too). A table of wa per row group measured slower: it doubles the
 * K slice's L1 footprint. */
#define Q8T_W_VNNI(wv, wa, blk)                                                                    \
    do {                                                                                           \
        wv = _mm256_loadu_si256((const __m256i *)(blk)->qs);                                       \
        wa = _mm256_sub_epi32(                                                                     \
            _mm256_set1_epi32(TILE_MAGIC),                                                         \
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8((char)0x80), wv));        \
    } while (0)
#define Q8T_Y_VNNI(yv, blk)                                                                        \
    yv = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(blk)->qs),                          \
                          _mm256_set1_epi8((char)0x80))
#define Q8T_DOT_VNNI(wv, wa, yv) _mm256_dpbusd_epi32(wa, yv, wv)

/* Q4_0 x Q8_0: nibbles once per weight block; the -8 offset via act_info.ey as in rows. */
#define Q4T_W(wv, wa, blk)                                                                         \
    do {                                                                                           \
        wv = q4_0_nibbles((blk)->qs);                                                              \
        wa = wv;                                                                                   \
    } while (0)
#define Q4T_DOT_AVX2(wv, wa, yv)                                                                   \
    _mm256_madd_epi16(_mm256_maddubs_epi16(((void)(wa), wv), yv), _mm256_set1_epi16(1))
#define Q4T_DOT_VNNI(wv, wa, yv)                                                                   \
    _mm256_dpbusd_epi32(_mm256_set1_epi32(TILE_MAGIC), ((void)(wa), wv), yv)

/* (Q5_0 has no tile kernel: its several-token work runs over the rows in ggml's order, or
 * over the repacked layout, kernels/repack.c.) */

typedef void (*tile_fn)(int64_t n, int64_t nrows, const uint8_t *w, size_t ws, int32_t ntok,
                        const uint8_t *x, size_t xs, float *y, size_t ys);

/* AVX2 has 16 vector registers: 2 rows x 4 tokens; AVX-512 VL's 32 hold 4 x 4. */
/* clang-format off */
DEF_TILE(tile_q8_0_avx2, TSR_AVX2, blk_q8_0, 2, 0, Q8T_W_AVX2, Q8T_Y, Q8T_DOT_AVX2, TILE_CVT_AVX2,
         rows_q8_0_avx2)
DEF_TILE_EX(tile_q4_1_avx2, TSR_AVX2, blk_q4_1, blk_q8_1, 2, 0, 1, m, act_info_build_q8_1, Q4T_W,
            Q8T_Y, Q4T_DOT_AVX2, TILE_CVT_AVX2, rows_q4_1_avx2)
DEF_TILE_EX(tile_q4_1_vnni, TSR_VNNI, blk_q4_1, blk_q8_1, 4, 0, 1, m, act_info_build_q8_1, Q4T_W,
            Q8T_Y, Q4T_DOT_VNNI, TILE_CVT_MAGIC, rows_q4_1_vnni)
DEF_TILE(tile_q8_0_vnni, TSR_VNNI, blk_q8_0, 4, 0, Q8T_W_VNNI, Q8T_Y_VNNI, Q8T_DOT_VNNI,
         TILE_CVT_MAGIC, rows_q8_0_vnni)
/* clang-format on */

#endif /* TSR_X86 */

/* ---------------------------------------------------------------------------------------
 * Dispatch
 * ------------------------------------------------------------------------------------- */

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512VNNI = 2, ISA_UNSET = -1 };
static const char *const k_isa_names[] = {"scalar", "avx2", "avx512vnni"};

static _Atomic int g_isa = ISA_UNSET;

static int isa_best(void)
{
#if TSR_X86
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return ISA_SCALAR;
    /* F16C has no __builtin_cpu_supports name in older compilers: CPUID.1:ECX bit 29. */
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_F16C)) return ISA_SCALAR;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni")) {
        return ISA_AVX512VNNI;
    }
    return ISA_AVX2;
#else
    return ISA_SCALAR;
#endif
}

static int isa_by_name(const char *name)
{
    for (int i = 0; i < (int)(sizeof k_isa_names / sizeof k_isa_names[0]); ++i) {
        if (strcmp(name, k_isa_names[i]) == 0) return i;
    }
    return ISA_UNSET;
}

/* First use: the best the CPU has, capped by TSR_ISA. Racing first calls compute the same
 * value, so a plain atomic store is enough. */
static int isa_get(void)
{
    int isa = atomic_load_explicit(&g_isa, memory_order_relaxed);
    if (isa != ISA_UNSET) return isa;
    isa = isa_best();
    const char *env = getenv("TSR_ISA");
    if (env && *env) {
        const int want = isa_by_name(env);
        if (want != ISA_UNSET && want < isa) isa = want;
    }
    atomic_store_explicit(&g_isa, isa, memory_order_relaxed);
    return isa;
}

static void quant_q8_0_fast(const float *x, blk_q8_0 *y, int64_t nb)
{
#if TSR_X86
    if (isa_get() >= ISA_AVX2) {
        quant_q8_0_avx2(x, y, nb);
        return;
    }
#endif
    quant_q8_0(x, y, nb);
}

static void quant_q8_1_fast(const float *x, blk_q8_1 *y, int64_t nb)
{
#if TSR_X86
    if (isa_get() >= ISA_AVX2) {
        quant_q8_1_avx2(x, y, nb);
        return;
    }
#endif
    quant_q8_1(x, y, nb);
}

static void quant_q8_K_fast(const float *x, blk_q8_K *y, int64_t nb)
{
#if TSR_X86
    if (isa_get() >= ISA_AVX2) {
        quant_q8_K_avx2(x, y, nb);
        return;
    }
#endif
    quant_q8_K(x, y, nb);
}

void tsr_quant_act_row(uint32_t type, const float *src, void *dst, int64_t n)
{
    if (type == TSR_TYPE_Q8_0 || type == TSR_TYPE_Q8_1)
        tsr_ggml_quant_act_row(type, isa_get(), src, dst, n);
    else
        tsr_quant_row(type, src, dst, n);
}

const char *tsr_quant_isa(void)
{
    return k_isa_names[isa_get()];
}

bool tsr_quant_set_isa(const char *isa)
{
    const int best = isa_best();
    const int want = (!isa || strcmp(isa, "auto") == 0) ? best : isa_by_name(isa);
    if (want == ISA_UNSET || want > best) return false;
    atomic_store_explicit(&g_isa, want, memory_order_relaxed);
    return true;
}

void tsr_quant_set_kgemv_prefetch(int on)
{
#if TSR_X86
    tsr_cpu_choice_set(&g_kgemv_pf, on, !rq_avx512());
#else
    (void)on;
#endif
}

/* Q4_1 and Q8_0: ggml's x86 order (kernels/dot_ggml.h), on every ISA. */
static void rows_q4_1_ggml(int64_t n, int64_t nrows, const uint8_t *w, size_t stride, const void *x,
                           float *y)
{
    tsr_ggml_dot_rows(TSR_TYPE_Q4_1, isa_get(), n, nrows, w, stride, x, y);
}
/* One Q8_0 token: which of the two kernels with ggml's bits streams a matrix faster.
 * kernels/q80_gemv.h's GEMV does less work per block (from cache, Zen 4, 2048 columns: 0.74
 * against 0.87 ns a block dot) and won on the Intel Xeon measured before (2048 columns
 * 1.05-1.22x). On AMD Zen 4 the row dots of kernels/dot_ggml.c (a few prefetches of the
 * next 4-row group before each block: into L1 for groups of up to 16 KiB, else into L2)
 * stream faster at every length: tests/bench_q80_gemv (1 GiB, AMD EPYC, 2026-12-06), GB/s
 * gemv / rows / plain read, 1 thread, 2048 columns 24.5 / 31.6 / 33.4, 8192 columns 25.3 /
 * 30.0 / 33.5; 2 threads 30.6 / 34.8 / 35.3 and 47.8 / 56.1 / 65.4; 576-4096 columns rows
 * 1.04-1.17x. 1B Q8_0 decode, 2 threads, five interleaved pairs: 83-87 -> 90-95 % of the
 * roofline when the memory reads ~32 GB/s, 66-69 -> 79-82 % at ~56 GB/s. Neither a prefetch
 * distance of 2-32 KiB, T0 instead of T1, the row dots' prefetch loop, nor dropping the
 * GEMV's scale gathers closed the gap (its scales kept in registers instead of a stack table:
 * 1 thread 24.5 -> 28, its compute 0.74 -> 0.84 ns); store-to-load forwarding of that table
 * is the likeliest remaining cause, unobservable without hardware counters here.
 * So: the row dots on AMD CPUs, the GEMV elsewhere; TSR_Q80_ROW_DOTS=1 / 0 overrides. The
 * outputs are the same bits either way. */
static _Atomic int g_q80_row_dots = -1;

void tsr_quant_set_q80_row_dots(int on)
{
    tsr_cpu_choice_set(&g_q80_row_dots, on, true);
}

static void rows_q8_0_ggml(int64_t n, int64_t nrows, const uint8_t *w, size_t stride, const void *x,
                           float *y)
{
    /* one token: kernels/q80_gemv.h's GEMV (the same bits, less work per block), or the row
     * dots where they stream faster (g_q80_row_dots, above) */
    if (!tsr_cpu_choice(&g_q80_row_dots, "TSR_Q80_ROW_DOTS", true) &&
        tsr_q80_gemv(isa_get(), n, nrows, w, stride, x, y))
        return;
    tsr_ggml_dot_rows(TSR_TYPE_Q8_0, isa_get(), n, nrows, w, stride, x, y);
}

/* Q4_0: llama.cpp's repacked GEMV order (kernels/q40_gemm.h), on every ISA. */
static void rows_q4_0_q40(int64_t n, int64_t nrows, const uint8_t *w, size_t stride, const void *x,
                          float *y)
{
    tsr_q40_gemm_dot(isa_get(), n, nrows, w, stride, 1, x, 0, y, 1);
}

static rows_fn rows_kernel(uint32_t type)
{
    const int isa = isa_get();
    if (type == TSR_TYPE_Q4_0) return isa > ISA_SCALAR ? rows_q4_0_q40 : rows_q4_0_scalar;
    if (type == TSR_TYPE_Q4_1) return rows_q4_1_ggml;
    if (type == TSR_TYPE_Q8_0) return rows_q8_0_ggml;
#if TSR_X86
    if (isa >= ISA_AVX2) {
        switch (type) {
        case TSR_TYPE_F32:
            return rows_f32_avx2;
        case TSR_TYPE_F16:
            return rows_f16_avx2;
        case TSR_TYPE_BF16:
            return rows_bf16_avx2;
        case TSR_TYPE_Q8_0:
            return isa >= ISA_AVX512VNNI ? rows_q8_0_vnni : rows_q8_0_avx2;
        case TSR_TYPE_Q4_1:
            return isa >= ISA_AVX512VNNI ? rows_q4_1_vnni : rows_q4_1_avx2;
        case TSR_TYPE_Q5_0:
            return isa >= ISA_AVX512VNNI ? rows_q5_0_vnni : rows_q5_0_avx2;
        case TSR_TYPE_Q5_1:
            return isa >= ISA_AVX512VNNI ? rows_q5_1_vnni : rows_q5_1_avx2;
        case TSR_TYPE_Q2_K:
            return isa >= ISA_AVX512VNNI ? rows_q2_K_vnni : rows_q2_K_avx2;
        case TSR_TYPE_Q3_K:
            return isa >= ISA_AVX512VNNI ? rows_q3_K_vnni : rows_q3_K_avx2;
        case TSR_TYPE_Q4_K:
            return isa >= ISA_AVX512VNNI ? rows_q4_K_vnni : rows_q4_K_avx2;
        case TSR_TYPE_Q5_K:
            return isa >= ISA_AVX512VNNI ? rows_q5_K_vnni : rows_q5_K_avx2;
        case TSR_TYPE_Q6_K:
            return isa >= ISA_AVX512VNNI ? rows_q6_K_vnni : rows_q6_K_avx2;
        default:
            return NULL;
        }
    }
#else
    (void)isa;
#endif
    switch (type) {
    case TSR_TYPE_F32:
        return rows_f32_scalar;
    case TSR_TYPE_F16:
        return rows_f16_scalar;
    case TSR_TYPE_BF16:
        return rows_bf16_scalar;
    case TSR_TYPE_Q8_0:
        return rows_q8_0_scalar;
    case TSR_TYPE_Q4_0:
        return rows_q4_0_scalar;
    case TSR_TYPE_Q4_1:
        return rows_q4_1_scalar;
    case TSR_TYPE_Q5_0:
        return rows_q5_0_scalar;
    case TSR_TYPE_Q5_1:
        return rows_q5_1_scalar;
    case TSR_TYPE_Q2_K:
        return rows_q2_K_scalar;
    case TSR_TYPE_Q3_K:
        return rows_q3_K_scalar;
    case TSR_TYPE_Q4_K:
        return rows_q4_K_scalar;
    case TSR_TYPE_Q5_K:
        return rows_q5_K_scalar;
    case TSR_TYPE_Q6_K:
        return rows_q6_K_scalar;
    default:
        return NULL;
    }
}

float tsr_vec_dot(uint32_t type, int64_t n, const void *w, const void *x)
{
    const rows_fn k = rows_kernel(type);
    if (!k) return NAN;
    float y = 0;
    k(n, 1, w, 0, x, &y);
    return y;
}

void tsr_vec_dot_rows(uint32_t type, int64_t n, int64_t n_rows, const void *w,
                      size_t w_stride_bytes, const void *x, float *y)
{
    const rows_fn k = rows_kernel(type);
    if (!k) {
        for (int64_t r = 0; r < n_rows; ++r) y[r] = NAN;
        return;
    }
    k(n, n_rows, w, w_stride_bytes, x, y);
}

bool tsr_vec_dot_kgroups(uint32_t type, int64_t n, int64_t n_rows, const void *groups, size_t gb,
                         const void *x, float *y)
{
#if TSR_X86
    const int isa = isa_get();
    if (isa < ISA_AVX2 || n_rows <= 0 || n % TSR_QK_K != 0) return false;
    const bool vnni = isa >= ISA_AVX512VNNI;
    if (type == TSR_TYPE_Q4_K) {
        (vnni ? kg_q4_K_vnni_kg : kg_q4_K_avx2_kg)(n, n_rows, groups, gb, x, y);
        return true;
    }
    if (type == TSR_TYPE_Q6_K) {
        (vnni ? kg_q6_K_vnni_kg : kg_q6_K_avx2_kg)(n, n_rows, groups, gb, x, y);
        return true;
    }
#else
    (void)type, (void)n, (void)n_rows, (void)groups, (void)gb, (void)x, (void)y;
#endif
    return false;
}

void tsr_vec_dot_tile(uint32_t type, int64_t n, int64_t n_rows, const void *w, size_t w_stride,
                      int32_t n_tok, const void *x, size_t x_stride, float *y, size_t y_stride)
{
    if (n_rows <= 0 || n_tok <= 0) return;
    if (tsr_ggml_dot_handles(type)) {
        tsr_ggml_dot_tile(type, isa_get(), n, n_rows, w, w_stride, n_tok, x, x_stride, y, y_stride);
        return;
    }
    if (type == TSR_TYPE_Q4_0) { /* one order for any token count (kernels/q40_gemm.h) */
        tsr_q40_gemm_dot(isa_get(), n, n_rows, w, w_stride, n_tok, x, x_stride, y, y_stride);
        return;
    }
#if TSR_X86
    const int isa = isa_get();
    tile_fn k = NULL;
    if (type == TSR_TYPE_Q8_0 && isa >= ISA_AVX2)
        k = isa >= ISA_AVX512VNNI ? tile_q8_0_vnni : tile_q8_0_avx2;
    else if (type == TSR_TYPE_Q4_1 && isa >= ISA_AVX2)
        k = isa >= ISA_AVX512VNNI ? tile_q4_1_vnni : tile_q4_1_avx2;
    if (k && n > 0 && n_tok > 1) {
        k(n, n_rows, w, w_stride, n_tok, x, x_stride, y, y_stride);
        return;
    }
#endif
    /* other types, the scalar path, a single token: token by token over the rows */
    for (int32_t t = 0; t < n_tok; ++t) {
        tsr_vec_dot_rows(type, n, n_rows, w, w_stride, (const uint8_t *)x + (size_t)t * x_stride,
                         y + (size_t)t * y_stride);
    }
}
