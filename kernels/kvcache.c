/*
 * kvcache.c — KV cache element types and attention kernels (see kvcache.h).
 *
 * Every path of one type computes the same operations in the same order (the scalar code is
 * the reference and spells the order out; the AVX2 and AVX-512 code vectorizes it without
 * reassociating), so every type is bit-identical across instruction sets. The f32 and q8_0
 * kernels walk a head's positions in runs of one block-table block (consecutive rows), all
 * positions in one call. f16 is llama.cpp's CPU flash attention, operation for operation.
 */
#include "kernels/kvcache.h"

#include "kernels/ops.h"
#include "kernels/quant.h"
#include "kernels/util.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

#define LANES 16 /* float lanes of ggml's AVX-512 tinyBLAS F16 kernel */

typedef struct {
    uint16_t d;
    int8_t qs[TSR_QK8_0];
} kv_q8_0;

static const char *const kv_names[TSR_KV_TYPE_COUNT] = {"f32", "f16", "q8_0"};

const char *tsr_kv_type_name(tsr_kv_type t)
{
    return (unsigned)t < TSR_KV_TYPE_COUNT ? kv_names[t] : "?";
}

bool tsr_kv_type_parse(const char *s, tsr_kv_type *out)
{
    for (int i = 0; s && i < TSR_KV_TYPE_COUNT; i++)
        if (strcmp(s, kv_names[i]) == 0) {
            *out = (tsr_kv_type)i;
            return true;
        }
    return false;
}

size_t tsr_kv_row_bytes(tsr_kv_type t, int64_t n)
{
    if (n < 0) return 0;
    switch (t) {
    case TSR_KV_F32:
        return (size_t)n * 4u;
    case TSR_KV_F16:
        return (size_t)n * 2u;
    case TSR_KV_Q8_0:
        return n % TSR_QK8_0 ? 0 : (size_t)(n / TSR_QK8_0) * sizeof(kv_q8_0);
    }
    return 0;
}

bool tsr_kv_type_fits(tsr_kv_type t, int32_t head_dim, char *err, size_t err_len)
{
    if ((unsigned)t >= TSR_KV_TYPE_COUNT) {
        tsr_set_err(err, err_len, "unknown KV cache type %d (f32, f16 or q8_0)", (int)t);
        return false;
    }
    if (t == TSR_KV_Q8_0 && head_dim % TSR_QK8_0 != 0) {
        tsr_set_err(err, err_len,
                    "--kv-type q8_0 stores K and V in blocks of %d values along the head, but "
                    "this model's heads have %d values; use --kv-type f16 or f32",
                    TSR_QK8_0, head_dim);
        return false;
    }
    return true;
}

static int kv_isa(void);

/* tsr_f32_to_f16 over n values with F16C (round to nearest even as there; a NaN becomes
 * its sign | 0x7e00 as there, where F16C would keep part of its payload). */
__attribute__((target("avx2,fma,f16c"))) static void kv_store_f16_f16c(const float *src,
                                                                       uint16_t *h, int64_t n)
{
    const __m128i sign = _mm_set1_epi16((short)0x8000), qnan = _mm_set1_epi16(0x7e00);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(src + i);
        __m128i y = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        const __m128i nan16 =
            _mm_packs_epi32(_mm256_castsi256_si128(nan), _mm256_extracti128_si256(nan, 1));
        y = _mm_blendv_epi8(y, _mm_or_si128(_mm_and_si128(y, sign), qnan), nan16);
        _mm_storeu_si128((__m128i *)(h + i), y);
    }
    for (; i < n; i++) h[i] = tsr_f32_to_f16(src[i]);
}

void tsr_kv_store(tsr_kv_type t, const float *src, void *dst, int64_t n)
{
    switch (t) {
    case TSR_KV_F32:
        memcpy(dst, src, (size_t)n * sizeof(float));
        break;
    case TSR_KV_F16: {
        uint16_t *h = dst;
        if (kv_isa() != 0) { /* AVX2 or AVX-512: F16C */
            kv_store_f16_f16c(src, h, n);
            break;
        }
        for (int64_t i = 0; i < n; i++) h[i] = tsr_f32_to_f16(src[i]);
        break;
    }
    case TSR_KV_Q8_0:
        tsr_quant_row(TSR_TYPE_Q8_0, src, dst, n);
        break;
    }
}

void tsr_kv_load(tsr_kv_type t, const void *src, float *dst, int64_t n)
{
    switch (t) {
    case TSR_KV_F32:
        memcpy(dst, src, (size_t)n * sizeof(float));
        break;
    case TSR_KV_F16:
        tsr_dequant_row(TSR_TYPE_F16, src, dst, n);
        break;
    case TSR_KV_Q8_0:
        tsr_dequant_row(TSR_TYPE_Q8_0, src, dst, n);
        break;
    }
}

/* ---- instruction set ---- */

enum { KV_SCALAR = 0, KV_AVX2 = 1, KV_AVX512 = 2 };

static int kv_isa(void)
{
    const char *isa = tsr_quant_isa();
    if (strcmp(isa, "avx512vnni") == 0) return KV_AVX512;
    if (strcmp(isa, "avx2") == 0) return KV_AVX2;
    return KV_SCALAR;
}

/* One instruction set's kernels, a const table each (at the end of the file): the paths
 * below take the table of the CPU's ISA (kv_kernels_now) instead of testing the ISA at
 * every call. */
struct fa_kernels;
typedef struct {
    const char *name; /* tsr_attn_isa's */
    /* f32: the scores att[p - p0] = q·k_p * scale, and o += sum of att · v_p */
    void (*qk_f32)(const tsr_kv_view *kv, const float *q, float scale, int32_t p0, int32_t p1,
                   float *att);
    void (*v_f32)(const tsr_kv_view *kv, const float *att, int32_t p0, int32_t p1, float *o);
    /* f16, one head (attn_f16 with this ISA's q·k and accumulator step) */
    void (*attn_f16)(const tsr_kv_view *kv, const float *q, float scale, int32_t p0, int32_t p1,
                     float *att, void *scratch, float *o);
    /* f16, a group of heads with head sizes % 64 == 0 (attn_f16_group); NULL: none */
    const struct fa_kernels *fa;
    /* q8_0: as f32, q quantized to Q8_0 rows */
    void (*qk_q8_0)(const tsr_kv_view *kv, const kv_q8_0 *qq, float scale, int32_t p0, int32_t p1,
                    float *att);
    void (*v_q8_0)(const tsr_kv_view *kv, const float *att, int32_t p0, int32_t p1, float *o);
} kv_kernels;

static const kv_kernels *kv_kernels_now(void);

const char *tsr_attn_isa(void)
{
    return kv_kernels_now()->name;
}

/* Scratch: [qh: head_dim fp16 | qq: head_dim/32 Q8_0 blocks][acc: LANES * head_dim floats],
 * each part rounded up to 64 bytes. */
static size_t up64(size_t n)
{
    return (n + 63u) & ~(size_t)63u;
}

/* Bytes before the lane accumulators (the fp16 or Q8_0 copy of q). */
static size_t q_part_bytes(size_t hd)
{
    size_t q = up64(hd * 2u);
    size_t qq = up64((hd / TSR_QK8_0 + 1u) * sizeof(kv_q8_0));
    return q > qq ? q : qq;
}

/* Bytes of the single-head part (attn_f16, attn_q8_0); the group path's part follows it. */
static size_t head_scratch_bytes(size_t hd)
{
    return q_part_bytes(hd) + up64(LANES * hd * sizeof(float));
}

static size_t fa_scratch_bytes(size_t hd, size_t n_q);

size_t tsr_attn_scratch_bytes(int32_t head_dim)
{
    return tsr_attn_group_scratch_bytes(head_dim, 1);
}

static inline const uint8_t *kv_at(const tsr_kv_view *kv, const uint8_t *base, int32_t p)
{
    const int32_t bs = kv->block_size;
    const size_t slot = (size_t)kv->block_table[p / bs] * (size_t)bs + (size_t)(p % bs);
    return base + slot * kv->row_bytes + kv->head_offset;
}

/* _mm512_reduce_add_ps's tree over 16 lanes (GCC): (i, i+8), (i, i+4), (i, i+2), (0, 1). */
static inline float reduce16(const float *l)
{
    float t8[8], t4[4];
    for (int i = 0; i < 8; i++) t8[i] = l[i + 8] + l[i];
    for (int i = 0; i < 4; i++) t4[i] = t8[i + 4] + t8[i];
    return (t4[0] + t4[2]) + (t4[1] + t4[3]);
}

/* Walk positions p0..p1 in runs that share a block-table block: within a run, rows are
 * consecutive slots, row_bytes apart. The body (the variadic part) sees ROW (the run's
 * first row, at the head's offset), N (its length) and I0 (its first index from p0). */
#define KV_RUNS(kv, base, p0, p1, ROW, N, I0, ...)                                                 \
    do {                                                                                           \
        const int32_t bs_ = (kv)->block_size;                                                      \
        for (int32_t p_ = (p0); p_ <= (p1);) {                                                     \
            const int32_t off_ = p_ % bs_;                                                         \
            int32_t N = bs_ - off_;                                                                \
            if (N > (p1)-p_ + 1) N = (p1)-p_ + 1;                                                  \
            const uint8_t *ROW =                                                                   \
                (base) +                                                                           \
                ((size_t)(kv)->block_table[p_ / bs_] * (size_t)bs_ + (size_t)off_) *               \
                    (kv)->row_bytes +                                                              \
                (kv)->head_offset;                                                                 \
            const int32_t I0 = p_ - (p0);                                                          \
            __VA_ARGS__                                                                            \
            p_ += N;                                                                               \
        }                                                                                          \
    } while (0)

/* ---- f32 ----
 * Head sizes that are a multiple of 16: q·k in tinyBLAS<16>'s order (the f16 path's, without
 * its fp16 roundings: lane l an FMA chain over i ≡ l mod 16, then the 16-lane tree), V
 * accumulated per output value with FMA in position order; every ISA path computes exactly
 * this. Other head sizes keep the engine's original loops (a sequential dot, then
 * o += a·v in position order). */

static void attn_f32_seq(const tsr_kv_view *kv, const float *q, float scale, int32_t p0, int32_t p1,
                         float *att, float *o)
{
    const int hd = kv->head_dim;
    for (int32_t p = p0; p <= p1; p++) {
        const float *k = (const float *)kv_at(kv, kv->k, p);
        float dot = 0.0f;
        for (int i = 0; i < hd; i++) dot += q[i] * k[i];
        att[p - p0] = dot * scale;
    }
    tsr_softmax(att, p1 - p0 + 1);
    memset(o, 0, sizeof(float) * (size_t)hd);
    for (int32_t p = p0; p <= p1; p++) {
        const float *v = (const float *)kv_at(kv, kv->v, p);
        const float a = att[p - p0];
        for (int i = 0; i < hd; i++) o[i] += a * v[i];
    }
}

static void qk_f32_scalar(const tsr_kv_view *kv, const float *q, float scale, int32_t p0,
                          int32_t p1, float *att)
{
    const int hd = kv->head_dim;
    KV_RUNS(kv, kv->k, p0, p1, row, n, i0, {
        for (int32_t j = 0; j < n; j++) {
            const float *k = (const float *)(row + (size_t)j * kv->row_bytes);
            float l16[LANES] = {0};
            for (int i = 0; i < hd; i += LANES)
                for (int l = 0; l < LANES; l++) l16[l] = fmaf(k[i + l], q[i + l], l16[l]);
            att[i0 + j] = reduce16(l16) * scale;
        }
    });
}

static void v_f32_scalar(const tsr_kv_view *kv, const float *att, int32_t p0, int32_t p1, float *o)
{
    const int hd = kv->head_dim;
    KV_RUNS(kv, kv->v, p0, p1, row, n, i0, {
        for (int32_t j = 0; j < n; j++) {
            const float *v = (const float *)(row + (size_t)j * kv->row_bytes);
            const float a = att[i0 + j];
            for (int i = 0; i < hd; i++) o[i] = fmaf(v[i], a, o[i]);
        }
    });
}

/* ---- f16, scalar reference ---- */

/* q·k of fp16 rows in ggml_vec_dot_f16's order on AVX-512 (the K·Q of llama.cpp's CPU
 * flash attention): 4 × 16 lanes over each whole 64 (element i: accumulator (i / 16) % 4,
 * lane i % 16, an FMA chain), sums (0+2, 1+3), (0+1), the 16-lane tree, then the rest
 * added in double. Products of fp16 values are exact in float. */
static float dot_f16_vecdot_scalar(const uint16_t *k, const uint16_t *q, int hd)
{
    float s[4][LANES] = {{0}};
    const int np = hd & ~63;
    for (int i = 0; i < np; i += 64)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < LANES; l++)
                s[j][l] = fmaf(tsr_f16_to_f32(k[i + j * LANES + l]),
                               tsr_f16_to_f32(q[i + j * LANES + l]), s[j][l]);
    for (int l = 0; l < LANES; l++) {
        s[0][l] = s[0][l] + s[2][l];
        s[1][l] = s[1][l] + s[3][l];
        s[0][l] = s[0][l] + s[1][l];
    }
    double sum = (double)reduce16(s[0]);
    for (int i = np; i < hd; i++) sum += (double)(tsr_f16_to_f32(k[i]) * tsr_f16_to_f32(q[i]));
    return (float)sum;
}

/* acc = fp16(acc * ms) (ggml_vec_scale_f16), then acc = fp16(fma(v, vs, acc))
 * (ggml_vec_mad_f16): element by element, so every ISA gives the same bits. */
static void fa_v_scalar(uint16_t *acc, const uint16_t *v, int hd, bool rescale, float ms, float vs)
{
    if (rescale)
        for (int i = 0; i < hd; i++) acc[i] = tsr_f32_to_f16(tsr_f16_to_f32(acc[i]) * ms);
    for (int i = 0; i < hd; i++)
        acc[i] = tsr_f32_to_f16(fmaf(tsr_f16_to_f32(v[i]), vs, tsr_f16_to_f32(acc[i])));
}

/* ---- f16, AVX2 + F16C and AVX-512 ---- */

#define TSR_KV_AVX2   __attribute__((target("avx2,fma,f16c")))
#define TSR_KV_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw")))
#include "kernels/x86hsum.h"

TSR_KV_AVX2 static inline __m256 ld8_f16(const uint16_t *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* dot_f16_vecdot_scalar with the 16 lanes as two 8-float halves. */
TSR_KV_AVX2 static float dot_f16_avx2(const uint16_t *k, const uint16_t *q, int hd)
{
    __m256 lo[4], hi[4];
    for (int j = 0; j < 4; j++) lo[j] = hi[j] = _mm256_setzero_ps();
    const int np = hd & ~63;
    for (int i = 0; i < np; i += 64)
        for (int j = 0; j < 4; j++) {
            lo[j] = _mm256_fmadd_ps(ld8_f16(k + i + 16 * j), ld8_f16(q + i + 16 * j), lo[j]);
            hi[j] =
                _mm256_fmadd_ps(ld8_f16(k + i + 16 * j + 8), ld8_f16(q + i + 16 * j + 8), hi[j]);
        }
    const __m256 l0 = _mm256_add_ps(_mm256_add_ps(lo[0], lo[2]), _mm256_add_ps(lo[1], lo[3]));
    const __m256 h0 = _mm256_add_ps(_mm256_add_ps(hi[0], hi[2]), _mm256_add_ps(hi[1], hi[3]));
    /* reduce16: (i, i+8), (i, i+4), (i, i+2), (0, 1) */
    const __m256 t8 = _mm256_add_ps(h0, l0);
    const __m128 t4 = _mm_add_ps(_mm256_extractf128_ps(t8, 1), _mm256_castps256_ps128(t8));
    const __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
    double sum = (double)(_mm_cvtss_f32(t2) + _mm_cvtss_f32(_mm_shuffle_ps(t2, t2, 1)));
    for (int i = np; i < hd; i++) sum += (double)(tsr_f16_to_f32(k[i]) * tsr_f16_to_f32(q[i]));
    return (float)sum;
}

TSR_KV_AVX512 static float dot_f16_avx512(const uint16_t *k, const uint16_t *q, int hd)
{
    __m512 s[4];
    for (int j = 0; j < 4; j++) s[j] = _mm512_setzero_ps();
    const int np = hd & ~63;
    for (int i = 0; i < np; i += 64)
        for (int j = 0; j < 4; j++)
            s[j] = _mm512_fmadd_ps(
                _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(k + i + 16 * j))),
                _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(q + i + 16 * j))), s[j]);
    const __m512 r = _mm512_add_ps(_mm512_add_ps(s[0], s[2]), _mm512_add_ps(s[1], s[3]));
    double sum = (double)_mm512_reduce_add_ps(r);
    for (int i = np; i < hd; i++) sum += (double)(tsr_f16_to_f32(k[i]) * tsr_f16_to_f32(q[i]));
    return (float)sum;
}

TSR_KV_AVX2 static void fa_v_avx2(uint16_t *acc, const uint16_t *v, int hd, bool rescale, float ms,
                                  float vs)
{
    const int n8 = hd & ~7;
    if (rescale) {
        const __m256 m = _mm256_set1_ps(ms);
        for (int i = 0; i < n8; i += 8)
            _mm_storeu_si128((__m128i *)(acc + i),
                             _mm256_cvtps_ph(_mm256_mul_ps(ld8_f16(acc + i), m),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    const __m256 w = _mm256_set1_ps(vs);
    for (int i = 0; i < n8; i += 8)
        _mm_storeu_si128((__m128i *)(acc + i),
                         _mm256_cvtps_ph(_mm256_fmadd_ps(ld8_f16(v + i), w, ld8_f16(acc + i)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (n8 < hd) fa_v_scalar(acc + n8, v + n8, hd - n8, rescale, ms, vs);
}

/* ---- f32, AVX2 and AVX-512 (the scalar order above) ---- */

TSR_KV_AVX2 static void qk_f32_avx2(const tsr_kv_view *kv, const float *q, float scale, int32_t p0,
                                    int32_t p1, float *att)
{
    const int hd = kv->head_dim;
    KV_RUNS(kv, kv->k, p0, p1, row, n, i0, {
        for (int32_t j = 0; j < n; j++) {
            const float *k = (const float *)(row + (size_t)j * kv->row_bytes);
            __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
            for (int i = 0; i < hd; i += LANES) {
                lo = _mm256_fmadd_ps(_mm256_loadu_ps(k + i), _mm256_loadu_ps(q + i), lo);
                hi = _mm256_fmadd_ps(_mm256_loadu_ps(k + i + 8), _mm256_loadu_ps(q + i + 8), hi);
            }
            /* reduce16: (i, i+8), (i, i+4), (0+2) + (1+3) */
            __m256 t3 = _mm256_add_ps(hi, lo);
            __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
            __m128 t8 = _mm_add_ps(t6, _mm_movehl_ps(t6, t6));
            att[i0 + j] = (_mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, 1))) * scale;
        }
    });
}

/* V: up to 64 output values in registers over all positions (as v_q8_0_avx2). */
TSR_KV_AVX2 static void v_f32_avx2(const tsr_kv_view *kv, const float *att, int32_t p0, int32_t p1,
                                   float *o)
{
    const int hd = kv->head_dim;
    for (int c0 = 0; c0 < hd; c0 += 64) {
        const int nr = (hd - c0 >= 64 ? 64 : hd - c0) / 8; /* hd % 16 == 0 */
        __m256 acc[8];
        for (int r = 0; r < nr; r++) acc[r] = _mm256_loadu_ps(o + c0 + 8 * r);
        KV_RUNS(kv, kv->v, p0, p1, row, n, i0, {
            for (int32_t j = 0; j < n; j++) {
                const float *v = (const float *)(row + (size_t)j * kv->row_bytes) + c0;
                const __m256 a = _mm256_set1_ps(att[i0 + j]);
                for (int r = 0; r < nr; r++)
                    acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(v + 8 * r), a, acc[r]);
            }
        });
        for (int r = 0; r < nr; r++) _mm256_storeu_ps(o + c0 + 8 * r, acc[r]);
    }
}

TSR_KV_AVX512 static void qk_f32_avx512(const tsr_kv_view *kv, const float *q, float scale,
                                        int32_t p0, int32_t p1, float *att)
{
    const int hd = kv->head_dim;
    KV_RUNS(kv, kv->k, p0, p1, row, n, i0, {
        for (int32_t j = 0; j < n; j++) {
            const float *k = (const float *)(row + (size_t)j * kv->row_bytes);
            __m512 acc = _mm512_setzero_ps();
            for (int i = 0; i < hd; i += LANES)
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(k + i), _mm512_loadu_ps(q + i), acc);
            att[i0 + j] = _mm512_reduce_add_ps(acc) * scale; /* reduce16's tree (GCC) */
        }
    });
}

TSR_KV_AVX512 static void v_f32_avx512(const tsr_kv_view *kv, const float *att, int32_t p0,
                                       int32_t p1, float *o)
{
    const int hd = kv->head_dim;
    for (int c0 = 0; c0 < hd; c0 += 64) {
        const int nr = (hd - c0 >= 64 ? 64 : hd - c0) / LANES;
        __m512 acc[4];
        for (int r = 0; r < nr; r++) acc[r] = _mm512_loadu_ps(o + c0 + LANES * r);
        KV_RUNS(kv, kv->v, p0, p1, row, n, i0, {
            for (int32_t j = 0; j < n; j++) {
                const float *v = (const float *)(row + (size_t)j * kv->row_bytes) + c0;
                const __m512 a = _mm512_set1_ps(att[i0 + j]);
                for (int r = 0; r < nr; r++)
                    acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(v + LANES * r), a, acc[r]);
            }
        });
        for (int r = 0; r < nr; r++) _mm512_storeu_ps(o + c0 + LANES * r, acc[r]);
    }
}

static void attn_f32(const tsr_kv_view *kv, const float *q, float scale, int32_t p0, int32_t p1,
                     float *att, float *o, const kv_kernels *K)
{
    const int hd = kv->head_dim;
    if (hd % LANES != 0) {
        attn_f32_seq(kv, q, scale, p0, p1, att, o);
        return;
    }
    K->qk_f32(kv, q, scale, p0, p1, att);
    tsr_softmax(att, p1 - p0 + 1);
    memset(o, 0, sizeof(float) * (size_t)hd);
    K->v_f32(kv, att, p0, p1, o);
}

/* llama.cpp's CPU flash attention over an F16 cache (ggml_compute_forward_flash_attn_ext_f16
 * one_chunk, the path of every reference in ../shared/models/expected): Q rounded to fp16;
 * per position in order s = fp16 dot(K, Q) * scale; an online softmax (running max M, sum
 * S = fma(S, ms, vs), libm expf) whose output accumulator is fp16, rescaled and added to
 * with a rounding after each step; finally acc / S. scores[p - p0] is left holding s. */
static inline __attribute__((always_inline)) void
attn_f16(const tsr_kv_view *kv, const float *q, float scale, int32_t p0, int32_t p1, float *att,
         void *scratch, float *o, float (*dot_f16)(const uint16_t *, const uint16_t *, int),
         void (*fa_v)(uint16_t *, const uint16_t *, int, bool, float, float))
{
    const int hd = kv->head_dim;
    uint16_t *qh = scratch;
    uint16_t *acc = (uint16_t *)((uint8_t *)scratch + q_part_bytes((size_t)hd));
    for (int i = 0; i < hd; i++) qh[i] = tsr_f32_to_f16(q[i]);
    memset(acc, 0, sizeof(uint16_t) * (size_t)hd);
    float M = -INFINITY, S = 0.0f;
    for (int32_t p = p0; p <= p1; p++) {
        const uint16_t *k = (const uint16_t *)kv_at(kv, kv->k, p);
        const float s = dot_f16(k, qh, hd) * scale;
        att[p - p0] = s;
        float ms = 1.0f, vs = 1.0f;
        const bool rescale = s > M;
        if (rescale) {
            const float m_old = M;
            M = s;
            ms = expf(m_old - M);
        } else {
            vs = expf(s - M);
        }
        const uint16_t *v = (const uint16_t *)kv_at(kv, kv->v, p);
        fa_v(acc, v, hd, rescale, ms, vs);
        S = fmaf(S, ms, vs);
    }
    const float s_inv = S == 0.0f ? 0.0f : 1.0f / S;
    for (int i = 0; i < hd; i++) o[i] = tsr_f16_to_f32(acc[i]) * s_inv;
}

/* attn_f16 per ISA with its kernels as constants (direct calls, no pointer per position) */
static void attn_f16_scalar(const tsr_kv_view *kv, const float *q, float scale, int32_t p0,
                            int32_t p1, float *att, void *scratch, float *o)
{
    attn_f16(kv, q, scale, p0, p1, att, scratch, o, dot_f16_vecdot_scalar, fa_v_scalar);
}

static void attn_f16_avx2(const tsr_kv_view *kv, const float *q, float scale, int32_t p0,
                          int32_t p1, float *att, void *scratch, float *o)
{
    attn_f16(kv, q, scale, p0, p1, att, scratch, o, dot_f16_avx2, fa_v_avx2);
}

/* the accumulator step is AVX2's on AVX-512 too (fa_v_avx2 has no AVX-512 twin) */
static void attn_f16_avx512(const tsr_kv_view *kv, const float *q, float scale, int32_t p0,
                            int32_t p1, float *att, void *scratch, float *o)
{
    attn_f16(kv, q, scale, p0, p1, att, scratch, o, dot_f16_avx512, fa_v_avx2);
}

/* ---- f16, a group of query heads over one KV head (AVX2 + F16C, AVX-512) ----
 *
 * tsr_attn_group's f16 path for head sizes that are a multiple of 64: for every query head
 * exactly attn_f16's operations (the scalar reference), restructured so the CPU is busy:
 *   - positions go in chunks of FA_CHUNK; within a chunk, first every head's scores (q·k of
 *     16 positions at once, the 16-lane trees of 16 dots interleaved: the same additions
 *     of the same pairs, see fa_tree16_avx512), then every head's online softmax step by step
 *     (the same M, S, expf calls, in position order), then V: each output value's fp16
 *     accumulator chain in position order, as attn_f16, with the chains of up to
 *     max_heads heads × one column tile interleaved (one chain alone waits on the
 *     convert-FMA-convert latency at every position) and the V row converted once for all
 *     of them;
 *   - between chunks each head keeps M, S and its accumulator (fp16 values, held as floats:
 *     exact).
 * A rescale multiplies the accumulator by ms = expf(Mold - M) and rounds; ms == 1.0f
 * (no new maximum, or one so close that expf rounds to 1) leaves every fp16 value as it is,
 * so the scale is skipped exactly then. */

#define FA_CHUNK   64 /* positions per chunk */
#define FA_QK_SIDE 8  /* KV heads whose scores go block by block together (attn_f16_heads) */
#define FA_KBLK    16 /* positions whose K rows are converted to float at once */

/* Scratch of the group path after the single-head part: qf [n_q][hd] (q rounded to fp16, as
 * floats), acc [n_q][hd], w [n_q][FA_CHUNK] (scores, then the weight vs of V), ms
 * [n_q][FA_CHUNK] (the rescale factor, 1 when none), m/s [n_q] (running max and sum), kf
 * [FA_KBLK][hd] (K rows as floats, exact), the chunk's K and V row pointers. */
typedef struct {
    float *qf, *acc, *w, *ms, *m, *s, *kf;
    const uint16_t **kp, **vp;
    const uint16_t **kph, **vph; /* kp, vp moved to another KV head (tsr_attn_heads) */
} fa_scratch;

static size_t fa_scratch_bytes(size_t hd, size_t n_q)
{
    return up64(n_q * hd * 4u) * 2u + up64(n_q * FA_CHUNK * 4u) * 2u + up64(n_q * 4u) * 2u +
           up64(FA_KBLK * hd * 4u) + up64(FA_CHUNK * sizeof(void *)) * 4u;
}

static fa_scratch fa_scratch_at(uint8_t *p, size_t hd, size_t n_q)
{
    fa_scratch f;
    f.qf = (float *)p;
    p += up64(n_q * hd * 4u);
    f.acc = (float *)p;
    p += up64(n_q * hd * 4u);
    f.w = (float *)p;
    p += up64(n_q * FA_CHUNK * 4u);
    f.ms = (float *)p;
    p += up64(n_q * FA_CHUNK * 4u);
    f.m = (float *)p;
    p += up64(n_q * 4u);
    f.s = (float *)p;
    p += up64(n_q * 4u);
    f.kf = (float *)p;
    p += up64(FA_KBLK * hd * 4u);
    f.kp = (const uint16_t **)p;
    p += up64(FA_CHUNK * sizeof(void *));
    f.vp = (const uint16_t **)p;
    p += up64(FA_CHUNK * sizeof(void *));
    f.kph = (const uint16_t **)p;
    p += up64(FA_CHUNK * sizeof(void *));
    f.vph = (const uint16_t **)p;
    return f;
}

/* The online softmax of one head over n scores of a chunk (attn_f16's steps): w[j] becomes
 * vs (1 on a new maximum), ms[j] the accumulator's rescale factor (1 when none). (Running
 * the expf calls in a separate loop of their own measured slower.) */
TSR_KV_AVX2 static void fa_softmax_chunk(float *w, float *ms, int n, float *m_io, float *s_io)
{
    float M = *m_io, S = *s_io;
    for (int j = 0; j < n; j++) {
        const float s = w[j];
        float m = 1.0f, vs = 1.0f;
        if (s > M) {
            const float m_old = M;
            M = s;
            m = expf(m_old - M);
        } else {
            vs = expf(s - M);
        }
        S = fmaf(S, m, vs);
        w[j] = vs;
        ms[j] = m;
    }
    *m_io = M;
    *s_io = S;
}

/* K and V row pointers of positions p..p+n-1 (block-table runs). */
static void fa_rows(const tsr_kv_view *kv, int32_t p, int n, const uint16_t **kp,
                    const uint16_t **vp)
{
    KV_RUNS(kv, kv->k, p, p + n - 1, row, nr, i0, {
        const size_t d = (size_t)(row - kv->k);
        for (int32_t j = 0; j < nr; j++) {
            kp[i0 + j] = (const uint16_t *)(kv->k + d + (size_t)j * kv->row_bytes);
            vp[i0 + j] = (const uint16_t *)(kv->v + d + (size_t)j * kv->row_bytes);
        }
    });
}

#define KV_INLINE        static inline __attribute__((always_inline))
#define FA_MAX_SIDE_TILE 4 /* KV heads of one side-by-side V tile (fa_vs_tile_avx512) */

/* AVX-512: the 16 lanes of one q·k before its tree (dot_f16_avx512: 4 chains over each 64,
 * then (0+2) + (1+3)); k and q as floats (exact fp16 values). */
TSR_KV_AVX512 KV_INLINE __m512 fa_lanes_avx512(const float *k, const float *qf, int hd)
{
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int i = 0; i < hd; i += 64) {
        s0 = _mm512_fmadd_ps(_mm512_load_ps(k + i), _mm512_loadu_ps(qf + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_load_ps(k + i + 16), _mm512_loadu_ps(qf + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_load_ps(k + i + 32), _mm512_loadu_ps(qf + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_load_ps(k + i + 48), _mm512_loadu_ps(qf + i + 48), s3);
    }
    return _mm512_add_ps(_mm512_add_ps(s0, s2), _mm512_add_ps(s1, s3));
}

/* reduce16 of 16 vectors at once, each pair of lanes added exactly as reduce16 adds it:
 * (i, i+8) by 256-bit halves of two vectors, (i, i+4) by 128-bit quarters of two, (0, 2)
 * and (1, 3) within quarters, then (0+2) + (1+3). Lane 4k + i of the result is vector
 * k + 4i's sum. */
TSR_KV_AVX512 KV_INLINE __m512 fa_tree16_avx512(const __m512 *r)
{
    __m512 c[8], d[4], e[2];
#pragma GCC unroll 8
    for (int m = 0; m < 8; m++)
        c[m] = _mm512_add_ps(_mm512_shuffle_f32x4(r[2 * m], r[2 * m + 1], 0xEE),
                             _mm512_shuffle_f32x4(r[2 * m], r[2 * m + 1], 0x44));
#pragma GCC unroll 4
    for (int m = 0; m < 4; m++)
        d[m] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * m], c[2 * m + 1], 0xDD),
                             _mm512_shuffle_f32x4(c[2 * m], c[2 * m + 1], 0x88));
#pragma GCC unroll 2
    for (int m = 0; m < 2; m++)
        e[m] = _mm512_add_ps(_mm512_shuffle_ps(d[2 * m], d[2 * m + 1], 0x44),
                             _mm512_shuffle_ps(d[2 * m], d[2 * m + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88), _mm512_shuffle_ps(e[0], e[1], 0xDD));
}

/* Scores of n_q heads for n positions of a chunk: w[h][j] = dot(k_j, q_h) * scale. K rows
 * are converted to float once per FA_KBLK positions for all heads. */
TSR_KV_AVX512 KV_INLINE void fa_qk_body_avx512(const uint16_t *const *kp, int n, int n_q,
                                               const float *qf, const int hd, float scale,
                                               float *kf, float *w)
{
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512 sc = _mm512_set1_ps(scale);
    for (int j0 = 0; j0 < n; j0 += FA_KBLK) {
        const int nj = n - j0 < FA_KBLK ? n - j0 : FA_KBLK;
        for (int j = 0; j < nj; j++)
            for (int i = 0; i < hd; i += 16)
                _mm512_store_ps(kf + (size_t)j * hd + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                                             (const __m256i *)(kp[j0 + j] + i))));
        for (int j = nj; j < FA_KBLK; j++) /* rows past the chunk: zeros, their dots unused */
            for (int i = 0; i < hd; i += 16)
                _mm512_store_ps(kf + (size_t)j * hd + i, _mm512_setzero_ps());
        for (int h = 0; h < n_q; h++) {
            const float *q = qf + (size_t)h * hd;
            __m512 r[16];
#pragma GCC unroll 16
            for (int j = 0; j < 16; j++) r[j] = fa_lanes_avx512(kf + (size_t)j * hd, q, hd);
            const __m512 x = _mm512_mul_ps(_mm512_permutexvar_ps(order, fa_tree16_avx512(r)), sc);
            _mm512_mask_storeu_ps(w + (size_t)h * FA_CHUNK + j0, (__mmask16)((1u << nj) - 1u), x);
        }
    }
}

/* fa_qk_body_avx512 for one query head: each K row converted as the dot reads it (the same
 * exact values; with one head a float copy of the rows would be read once only), q held
 * in registers. */
TSR_KV_AVX512 KV_INLINE void fa_qk1_body_avx512(const uint16_t *const *kp, int n, const float *qf,
                                                const int hd, float scale, float *w)
{
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512 sc = _mm512_set1_ps(scale);
    for (int j0 = 0; j0 < n; j0 += FA_KBLK) {
        const int nj = n - j0 < FA_KBLK ? n - j0 : FA_KBLK;
        __m512 r[16];
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++) {
            if (j >= nj) { /* rows past the chunk: their dots unused */
                r[j] = _mm512_setzero_ps();
                continue;
            }
            const uint16_t *k = kp[j0 + j];
            __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
            for (int i = 0; i < hd; i += 64) {
                s0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(k + i))),
                                     _mm512_loadu_ps(qf + i), s0);
                s1 = _mm512_fmadd_ps(
                    _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(k + i + 16))),
                    _mm512_loadu_ps(qf + i + 16), s1);
                s2 = _mm512_fmadd_ps(
                    _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(k + i + 32))),
                    _mm512_loadu_ps(qf + i + 32), s2);
                s3 = _mm512_fmadd_ps(
                    _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(k + i + 48))),
                    _mm512_loadu_ps(qf + i + 48), s3);
            }
            r[j] = _mm512_add_ps(_mm512_add_ps(s0, s2), _mm512_add_ps(s1, s3));
        }
        const __m512 x = _mm512_mul_ps(_mm512_permutexvar_ps(order, fa_tree16_avx512(r)), sc);
        _mm512_mask_storeu_ps(w + j0, (__mmask16)((1u << nj) - 1u), x);
    }
}

TSR_KV_AVX512 KV_INLINE __m512 fa_round_avx512(__m512 x)
{
    return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* The V product of NH heads for CV × 16 output values from c0 (compile-time counts) over
 * the n positions of a chunk: per head and value, acc = fp16(acc · ms) on a rescale, then
 * acc = fp16(fma(v, vs, acc)), position after position (fa_v_scalar's order). SIDE 0: the
 * heads share one V row (a GQA group's query heads), converted once for all of them; SIDE
 * 1: NH KV heads side by side, one query head each (tsr_attn_heads with one query head per
 * KV head, as in MHA): head h reads its own V slice, hd values after head h - 1's in the
 * same row (each value's chain the same, the heads' chains interleaved). acc, w and ms: the
 * heads' rows, strides hd and FA_CHUNK. */
TSR_KV_AVX512 KV_INLINE void fa_vt_avx512(const int NH, const int CV, const int SIDE, float *acc,
                                          int hd, int c0, const uint16_t *const *vp, int n,
                                          const float *w, const float *ms)
{
    __m512 a[8][4];
#pragma GCC unroll 8
    for (int h = 0; h < NH; h++)
#pragma GCC unroll 4
        for (int r = 0; r < CV; r++) a[h][r] = _mm512_loadu_ps(acc + h * hd + c0 + 16 * r);
    for (int j = 0; j < n; j++) {
        __m512 x[4];
#pragma GCC unroll 8
        for (int h = 0; h < NH; h++) {
            if (h == 0 || SIDE) {
                const uint16_t *v = vp[j] + (SIDE ? h * hd : 0) + c0;
#pragma GCC unroll 4
                for (int r = 0; r < CV; r++)
                    x[r] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + 16 * r)));
            }
            const float m = ms[h * FA_CHUNK + j];
            if (m != 1.0f) {
                const __m512 mm = _mm512_set1_ps(m);
#pragma GCC unroll 4
                for (int r = 0; r < CV; r++) a[h][r] = fa_round_avx512(_mm512_mul_ps(a[h][r], mm));
            }
            const __m512 ww = _mm512_set1_ps(w[h * FA_CHUNK + j]);
#pragma GCC unroll 4
            for (int r = 0; r < CV; r++)
                a[h][r] = fa_round_avx512(_mm512_fmadd_ps(x[r], ww, a[h][r]));
        }
    }
#pragma GCC unroll 8
    for (int h = 0; h < NH; h++)
#pragma GCC unroll 4
        for (int r = 0; r < CV; r++) _mm512_storeu_ps(acc + h * hd + c0 + 16 * r, a[h][r]);
}
#define fa_v_tile_avx512(NH, CV, ...)  fa_vt_avx512(NH, CV, 0, __VA_ARGS__)
#define fa_vs_tile_avx512(NH, CV, ...) fa_vt_avx512(NH, CV, 1, __VA_ARGS__)

/* AVX2: the 16 lanes as two halves, added to the 8 lanes of reduce16's first step
 * ((i+8) + i), as dot_f16_avx2. */
TSR_KV_AVX2 KV_INLINE __m256 fa_lanes8_avx2(const float *k, const float *qf, int hd)
{
    const __m256 z = _mm256_setzero_ps();
    if (hd == 64) {
        /* One product per chain: lo[j] = fma(k, q, +0) is the exact product (k and q are fp16
         * values, whose products float holds exactly; a -0 product gives +0), so lo[0] +
         * lo[2] is fma(k_2, q_2, lo[0]): the same exact operands, the same rounding (and a -0
         * product again adds to +0). 8 FMAs and 3 adds instead of 8 FMAs and 7 adds. */
#define FA_P(o) _mm256_load_ps(k + (o)), _mm256_loadu_ps(qf + (o))
        const __m256 l02 = _mm256_fmadd_ps(FA_P(32), _mm256_fmadd_ps(FA_P(0), z));
        const __m256 l13 = _mm256_fmadd_ps(FA_P(48), _mm256_fmadd_ps(FA_P(16), z));
        const __m256 h02 = _mm256_fmadd_ps(FA_P(40), _mm256_fmadd_ps(FA_P(8), z));
        const __m256 h13 = _mm256_fmadd_ps(FA_P(56), _mm256_fmadd_ps(FA_P(24), z));
#undef FA_P
        return _mm256_add_ps(_mm256_add_ps(h02, h13), _mm256_add_ps(l02, l13));
    }
    /* unrolled, so that the 8 chains stay in registers (the loop over j kept them on the stack) */
    __m256 lo[4], hi[4];
    for (int j = 0; j < 4; j++) lo[j] = hi[j] = z;
#pragma GCC unroll 4
    for (int i = 0; i < hd; i += 64)
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            lo[j] = _mm256_fmadd_ps(_mm256_load_ps(k + i + 16 * j),
                                    _mm256_loadu_ps(qf + i + 16 * j), lo[j]);
            hi[j] = _mm256_fmadd_ps(_mm256_load_ps(k + i + 16 * j + 8),
                                    _mm256_loadu_ps(qf + i + 16 * j + 8), hi[j]);
        }
    const __m256 l0 = _mm256_add_ps(_mm256_add_ps(lo[0], lo[2]), _mm256_add_ps(lo[1], lo[3]));
    const __m256 h0 = _mm256_add_ps(_mm256_add_ps(hi[0], hi[2]), _mm256_add_ps(hi[1], hi[3]));
    return _mm256_add_ps(h0, l0);
}

/* The rest of reduce16 for 8 vectors at once: (i, i+4) by 128-bit halves of two vectors,
 * (0, 2) and (1, 3) within halves, then (0+2) + (1+3). Lane 4k + i is vector k + 2i's. */
TSR_KV_AVX2 KV_INLINE __m256 fa_tree8_avx2(const __m256 *t)
{
    __m256 d[4], e[2];
#pragma GCC unroll 4
    for (int m = 0; m < 4; m++)
        d[m] = _mm256_add_ps(_mm256_permute2f128_ps(t[2 * m], t[2 * m + 1], 0x31),
                             _mm256_permute2f128_ps(t[2 * m], t[2 * m + 1], 0x20));
#pragma GCC unroll 2
    for (int m = 0; m < 2; m++)
        e[m] = _mm256_add_ps(_mm256_shuffle_ps(d[2 * m], d[2 * m + 1], 0x44),
                             _mm256_shuffle_ps(d[2 * m], d[2 * m + 1], 0xEE));
    return _mm256_add_ps(_mm256_shuffle_ps(e[0], e[1], 0x88), _mm256_shuffle_ps(e[0], e[1], 0xDD));
}

TSR_KV_AVX2 KV_INLINE void fa_qk_body_avx2(const uint16_t *const *kp, int n, int n_q,
                                           const float *qf, const int hd, float scale, float *kf,
                                           float *w)
{
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256 sc = _mm256_set1_ps(scale);
    for (int j0 = 0; j0 < n; j0 += 8) {
        const int nj = n - j0 < 8 ? n - j0 : 8;
        for (int j = 0; j < nj; j++)
            for (int i = 0; i < hd; i += 8)
                _mm256_store_ps(kf + (size_t)j * hd + i, ld8_f16(kp[j0 + j] + i));
        for (int j = nj; j < 8; j++) /* rows past the chunk: zeros, their dots unused */
            for (int i = 0; i < hd; i += 8)
                _mm256_store_ps(kf + (size_t)j * hd + i, _mm256_setzero_ps());
        for (int h = 0; h < n_q; h++) {
            const float *q = qf + (size_t)h * hd;
            __m256 t[8];
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) t[j] = fa_lanes8_avx2(kf + (size_t)j * hd, q, hd);
            const __m256 x = _mm256_mul_ps(_mm256_permutevar8x32_ps(fa_tree8_avx2(t), order), sc);
            float *o = w + (size_t)h * FA_CHUNK + j0;
            if (nj == 8) {
                _mm256_storeu_ps(o, x);
            } else {
                float tmp[8];
                _mm256_storeu_ps(tmp, x);
                memcpy(o, tmp, sizeof(float) * (size_t)nj);
            }
        }
    }
}

TSR_KV_AVX2 KV_INLINE __m256 fa_round_avx2(__m256 x)
{
    return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* fa_v_tile_avx512 with CV × 8 output values per tile (16 ymm registers). */
TSR_KV_AVX2 KV_INLINE void fa_v_tile_avx2(const int NH, const int CV, float *acc, int hd, int c0,
                                          const uint16_t *const *vp, int n, const float *w,
                                          const float *ms)
{
    __m256 a[6][8];
#pragma GCC unroll 6
    for (int h = 0; h < NH; h++)
#pragma GCC unroll 8
        for (int r = 0; r < CV; r++) a[h][r] = _mm256_loadu_ps(acc + h * hd + c0 + 8 * r);
    for (int j = 0; j < n; j++) {
        const uint16_t *v = vp[j] + c0;
#pragma GCC unroll 8
        for (int r = 0; r < CV; r++) {
            const __m256 x = ld8_f16(v + 8 * r);
#pragma GCC unroll 6
            for (int h = 0; h < NH; h++) {
                const float m = ms[h * FA_CHUNK + j];
                if (m != 1.0f) a[h][r] = fa_round_avx2(_mm256_mul_ps(a[h][r], _mm256_set1_ps(m)));
                a[h][r] =
                    fa_round_avx2(_mm256_fmadd_ps(x, _mm256_set1_ps(w[h * FA_CHUNK + j]), a[h][r]));
            }
        }
    }
#pragma GCC unroll 6
    for (int h = 0; h < NH; h++)
#pragma GCC unroll 8
        for (int r = 0; r < CV; r++) _mm256_storeu_ps(acc + h * hd + c0 + 8 * r, a[h][r]);
}

/* ---- the ISAs' kernels behind one dispatcher ----
 * An ISA's kernels for attn_f16_group: qk, the scores of a chunk (its fa_qk_body with the
 * common head sizes as constants, loops unrolled), and v[k], the V product of k heads
 * (1..max_heads) over all hd values, in tiles of its fa_v_tile with k and the tile width as
 * constants. fa_vg walks the heads in groups of max_heads with them. */
typedef void (*fa_qk_fn)(const uint16_t *const *kp, int n, int n_q, const float *qf, int hd,
                         float scale, float *kf, float *w);
typedef void (*fa_v_fn)(float *acc, int hd, const uint16_t *const *vp, int n, const float *w,
                        const float *ms);
#define FA_MAX_HEADS 8
#define FA_MAX_SIDE  FA_MAX_SIDE_TILE
typedef struct fa_kernels {
    fa_qk_fn qk;
    int max_heads;
    fa_v_fn v[FA_MAX_HEADS + 1]; /* v[k]: k heads; v[0] unused */
    /* vs[k]: k KV heads side by side, one query head each (fa_vs_tile); NULL: none */
    int max_side;
    fa_v_fn vs[FA_MAX_SIDE + 1];
} fa_kernels;

#define FA_QK_DEFINE(ATTR, NAME, BODY)                                                             \
    ATTR static void NAME(const uint16_t *const *kp, int n, int n_q, const float *qf, int hd,      \
                          float scale, float *kf, float *w)                                        \
    {                                                                                              \
        if (hd == 64)                                                                              \
            BODY(kp, n, n_q, qf, 64, scale, kf, w);                                                \
        else if (hd == 128)                                                                        \
            BODY(kp, n, n_q, qf, 128, scale, kf, w);                                               \
        else                                                                                       \
            BODY(kp, n, n_q, qf, hd, scale, kf, w);                                                \
    }

/* NH heads, tiles of CV vectors of VW floats (hd is a multiple of 64, so of the width) */
#define FA_V_DEFINE(ATTR, NAME, TILE, NH, CV, VW)                                                  \
    ATTR static void NAME(float *acc, int hd, const uint16_t *const *vp, int n, const float *w,    \
                          const float *ms)                                                         \
    {                                                                                              \
        for (int c0 = 0; c0 < hd; c0 += (CV) * (VW)) TILE(NH, CV, acc, hd, c0, vp, n, w, ms);      \
    }

/* AVX-512: tiles of up to 8 heads, 64 values wide for up to 6 heads (24 accumulators), 32
 * for 7 or 8 (enough independent chains either way to keep the converters busy). */
FA_QK_DEFINE(TSR_KV_AVX512, fa_qkn_avx512, fa_qk_body_avx512)
TSR_KV_AVX512 static void fa_qk_avx512(const uint16_t *const *kp, int n, int n_q, const float *qf,
                                       int hd, float scale, float *kf, float *w)
{
    if (n_q > 1)
        fa_qkn_avx512(kp, n, n_q, qf, hd, scale, kf, w);
    else if (hd == 64)
        fa_qk1_body_avx512(kp, n, qf, 64, scale, w);
    else
        fa_qk1_body_avx512(kp, n, qf, hd, scale, w);
}
FA_V_DEFINE(TSR_KV_AVX512, fa_v1_avx512, fa_v_tile_avx512, 1, 4, 16)
FA_V_DEFINE(TSR_KV_AVX512, fa_v2_avx512, fa_v_tile_avx512, 2, 4, 16)
FA_V_DEFINE(TSR_KV_AVX512, fa_v3_avx512, fa_v_tile_avx512, 3, 4, 16)
FA_V_DEFINE(TSR_KV_AVX512, fa_v4_avx512, fa_v_tile_avx512, 4, 4, 16)
FA_V_DEFINE(TSR_KV_AVX512, fa_v5_avx512, fa_v_tile_avx512, 5, 4, 16)
FA_V_DEFINE(TSR_KV_AVX512, fa_v6_avx512, fa_v_tile_avx512, 6, 4, 16)
FA_V_DEFINE(TSR_KV_AVX512, fa_v7_avx512, fa_v_tile_avx512, 7, 2, 16)
FA_V_DEFINE(TSR_KV_AVX512, fa_v8_avx512, fa_v_tile_avx512, 8, 2, 16)
/* Side by side (tsr_attn_heads, one query head per KV head): up to 4 heads, 64 values wide
 * (16 accumulators; each head converts its own V slice). */
FA_V_DEFINE(TSR_KV_AVX512, fa_vs2_avx512, fa_vs_tile_avx512, 2, 4, 16)
FA_V_DEFINE(TSR_KV_AVX512, fa_vs3_avx512, fa_vs_tile_avx512, 3, 4, 16)
FA_V_DEFINE(TSR_KV_AVX512, fa_vs4_avx512, fa_vs_tile_avx512, 4, 4, 16)
static const fa_kernels k_fa_avx512 = {
    .qk = fa_qk_avx512,
    .max_heads = 8,
    .v = {NULL, fa_v1_avx512, fa_v2_avx512, fa_v3_avx512, fa_v4_avx512, fa_v5_avx512, fa_v6_avx512,
          fa_v7_avx512, fa_v8_avx512},
    .max_side = 4,
    .vs = {NULL, fa_v1_avx512, fa_vs2_avx512, fa_vs3_avx512, fa_vs4_avx512}};

/* AVX2 (16 ymm registers): tiles of up to 6 heads, 64 values wide for 1 head, 32 for 2 or 3,
 * 16 for 4 to 6. */
FA_QK_DEFINE(TSR_KV_AVX2, fa_qk_avx2, fa_qk_body_avx2)
FA_V_DEFINE(TSR_KV_AVX2, fa_v1_avx2, fa_v_tile_avx2, 1, 8, 8)
FA_V_DEFINE(TSR_KV_AVX2, fa_v2_avx2, fa_v_tile_avx2, 2, 4, 8)
FA_V_DEFINE(TSR_KV_AVX2, fa_v3_avx2, fa_v_tile_avx2, 3, 4, 8)
FA_V_DEFINE(TSR_KV_AVX2, fa_v4_avx2, fa_v_tile_avx2, 4, 2, 8)
FA_V_DEFINE(TSR_KV_AVX2, fa_v5_avx2, fa_v_tile_avx2, 5, 2, 8)
FA_V_DEFINE(TSR_KV_AVX2, fa_v6_avx2, fa_v_tile_avx2, 6, 2, 8)
static const fa_kernels k_fa_avx2 = {
    .qk = fa_qk_avx2,
    .max_heads = 6,
    .v = {NULL, fa_v1_avx2, fa_v2_avx2, fa_v3_avx2, fa_v4_avx2, fa_v5_avx2, fa_v6_avx2}};

/* The V product of nh heads: groups of up to max_heads, each by the ISA's tile of its size. */
static void fa_vg(const fa_kernels *K, int nh, float *acc, int hd, const uint16_t *const *vp, int n,
                  const float *w, const float *ms)
{
    for (int h = 0; h < nh; h += K->max_heads) {
        const int k = nh - h < K->max_heads ? nh - h : K->max_heads;
        K->v[k](acc + (size_t)h * hd, hd, vp, n, w + (size_t)h * FA_CHUNK,
                ms + (size_t)h * FA_CHUNK);
    }
}

/* q rounded to fp16 and back, as tsr_f16_to_f32(tsr_f32_to_f16(q[i])) (F16C rounds to
 * nearest even as tsr_f32_to_f16 does; a NaN becomes its quiet NaN 0x7e00 as there). */
TSR_KV_AVX2 static void fa_round_q(const float *q, float *qf, size_t n)
{
    const __m256 sign = _mm256_set1_ps(-0.0f),
                 qnan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000));
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(q + i);
        const __m256 y =
            _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const __m256 nan = _mm256_or_ps(_mm256_and_ps(x, sign), qnan);
        _mm256_storeu_ps(qf + i, _mm256_blendv_ps(y, nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    }
    for (; i < n; i++) qf[i] = tsr_f16_to_f32(tsr_f32_to_f16(q[i]));
}

/* attn_f16 for n_kv KV heads side by side in the row (kv->head_offset: the first) with group
 * query heads each (head_dim % 64 == 0, AVX2 or AVX-512): chunk after chunk, every head's
 * scores, then every head's softmax steps, then every head's V (with one query head per KV
 * head and K->vs, up to max_side KV heads' chains interleaved). n_kv == 1 is
 * tsr_attn_group's path. scores: [group][p1 - p0 + 1], the last KV head's. */
static void attn_f16_heads(const tsr_kv_view *kv, int32_t n_kv, int32_t group, const float *q,
                           float scale, int32_t p0, int32_t p1, float *scores, void *scratch,
                           float *o, const fa_kernels *K)
{
    const int hd = kv->head_dim, n_q = n_kv * group;
    fa_scratch f =
        fa_scratch_at((uint8_t *)scratch + head_scratch_bytes((size_t)hd), (size_t)hd, (size_t)n_q);
    fa_round_q(q, f.qf, (size_t)n_q * hd);
    memset(f.acc, 0, sizeof(float) * (size_t)n_q * hd);
    for (int h = 0; h < n_q; h++) {
        f.m[h] = -INFINITY;
        f.s[h] = 0.0f;
    }
    const bool side = group == 1 && n_kv > 1 && K->max_side > 1;
    for (int32_t c = p0; c <= p1; c += FA_CHUNK) {
        const int n = p1 - c + 1 < FA_CHUNK ? p1 - c + 1 : FA_CHUNK;
        fa_rows(kv, c, n, f.kp, f.vp);
        if (n_kv > 1 && n_kv <= FA_QK_SIDE) {
            /* Several KV heads side by side: each 16-position block for all of them before
             * the next block, so a row's slices of the heads (adjacent lines) are read
             * together instead of one head's pass over all rows after another's (each
             * score the same dot either way). */
            const uint16_t *kpi[FA_QK_SIDE][FA_CHUNK];
            for (int i = 0; i < n_kv; i++)
                for (int j = 0; j < n; j++) kpi[i][j] = f.kp[j] + (size_t)i * hd;
            for (int j0 = 0; j0 < n; j0 += FA_KBLK) {
                const int nj = n - j0 < FA_KBLK ? n - j0 : FA_KBLK;
                for (int i = 0; i < n_kv; i++)
                    K->qk(kpi[i] + j0, nj, group, f.qf + (size_t)i * group * hd, hd, scale, f.kf,
                          f.w + (size_t)i * group * FA_CHUNK + j0);
            }
        } else {
            for (int i = 0; i < n_kv; i++) {
                const uint16_t *const *kp = f.kp;
                if (i > 0) {
                    for (int j = 0; j < n; j++) f.kph[j] = f.kp[j] + (size_t)i * hd;
                    kp = f.kph;
                }
                K->qk(kp, n, group, f.qf + (size_t)i * group * hd, hd, scale, f.kf,
                      f.w + (size_t)i * group * FA_CHUNK);
            }
        }
        { /* leave the last KV head's scores as attn_f16 does */
            const float *w = f.w + (size_t)(n_kv - 1) * group * FA_CHUNK;
            for (int h = 0; h < group; h++)
                memcpy(scores + (size_t)h * (size_t)(p1 - p0 + 1) + (size_t)(c - p0),
                       w + (size_t)h * FA_CHUNK, sizeof(float) * (size_t)n);
        }
        for (int h = 0; h < n_q; h++)
            fa_softmax_chunk(f.w + (size_t)h * FA_CHUNK, f.ms + (size_t)h * FA_CHUNK, n, &f.m[h],
                             &f.s[h]);
        if (side) {
            for (int i = 0; i < n_kv; i += K->max_side) {
                const int k = n_kv - i < K->max_side ? n_kv - i : K->max_side;
                const uint16_t *const *vp = f.vp;
                if (i > 0) {
                    for (int j = 0; j < n; j++) f.vph[j] = f.vp[j] + (size_t)i * hd;
                    vp = f.vph;
                }
                K->vs[k](f.acc + (size_t)i * hd, hd, vp, n, f.w + (size_t)i * FA_CHUNK,
                         f.ms + (size_t)i * FA_CHUNK);
            }
        } else {
            for (int i = 0; i < n_kv; i++) {
                const uint16_t *const *vp = f.vp;
                if (i > 0) {
                    for (int j = 0; j < n; j++) f.vph[j] = f.vp[j] + (size_t)i * hd;
                    vp = f.vph;
                }
                fa_vg(K, group, f.acc + (size_t)i * group * hd, hd, vp, n,
                      f.w + (size_t)i * group * FA_CHUNK, f.ms + (size_t)i * group * FA_CHUNK);
            }
        }
    }
    for (int h = 0; h < n_q; h++) {
        const float S = f.s[h], s_inv = S == 0.0f ? 0.0f : 1.0f / S;
        for (int i = 0; i < hd; i++) o[(size_t)h * hd + i] = f.acc[(size_t)h * hd + i] * s_inv;
    }
}

static void attn_f16_group(const tsr_kv_view *kv, int32_t n_q, const float *q, float scale,
                           int32_t p0, int32_t p1, float *scores, void *scratch, float *o,
                           const fa_kernels *K)
{
    attn_f16_heads(kv, 1, n_q, q, scale, p0, p1, scores, scratch, o, K);
}

/* ---- q8_0 ---- */

static void v_q8_0_scalar(const tsr_kv_view *kv, const float *att, int32_t p0, int32_t p1, float *o)
{
    const int nb = kv->head_dim / TSR_QK8_0;
    for (int32_t p = p0; p <= p1; p++) {
        const kv_q8_0 *v = (const kv_q8_0 *)kv_at(kv, kv->v, p);
        const float pr = att[p - p0];
        for (int b = 0; b < nb; b++) {
            const float d = tsr_f16_to_f32(v[b].d);
            float *ob = o + b * TSR_QK8_0;
            for (int j = 0; j < TSR_QK8_0; j++) ob[j] = fmaf(d * (float)v[b].qs[j], pr, ob[j]);
        }
    }
}

/* The V product keeps a chunk of up to 64 output values in registers over all positions
 * (the same per-value FMA chain in position order as the scalar code, without a store and a
 * reload per position), chunk after chunk. */
TSR_KV_AVX2 static void v_q8_0_avx2(const tsr_kv_view *kv, const float *att, int32_t p0, int32_t p1,
                                    float *o)
{
    const int hd = kv->head_dim;
    for (int c0 = 0; c0 < hd; c0 += 64) {
        const int nbc = hd - c0 >= 64 ? 2 : 1; /* Q8_0 blocks in this chunk */
        const int b0 = c0 / TSR_QK8_0;
        __m256 acc[8];
        for (int r = 0; r < 4 * nbc; r++) acc[r] = _mm256_loadu_ps(o + c0 + 8 * r);
        KV_RUNS(kv, kv->v, p0, p1, row, n, i0, {
            for (int32_t j = 0; j < n; j++) {
                const kv_q8_0 *v = (const kv_q8_0 *)(row + (size_t)j * kv->row_bytes) + b0;
                const __m256 pr = _mm256_set1_ps(att[i0 + j]);
                for (int b = 0; b < nbc; b++) {
                    const __m256 d = _mm256_set1_ps(_cvtsh_ss(v[b].d));
                    for (int r = 0; r < 4; r++) {
                        __m128i q8 = _mm_loadl_epi64((const __m128i *)(v[b].qs + 8 * r));
                        __m256 x = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)));
                        acc[4 * b + r] = _mm256_fmadd_ps(x, pr, acc[4 * b + r]);
                    }
                }
            }
        });
        for (int r = 0; r < 4 * nbc; r++) _mm256_storeu_ps(o + c0 + 8 * r, acc[r]);
    }
}

TSR_KV_AVX512 static void v_q8_0_avx512(const tsr_kv_view *kv, const float *att, int32_t p0,
                                        int32_t p1, float *o)
{
    const int hd = kv->head_dim;
    for (int c0 = 0; c0 < hd; c0 += 64) {
        const int nbc = hd - c0 >= 64 ? 2 : 1;
        const int b0 = c0 / TSR_QK8_0;
        __m512 acc[4];
        for (int r = 0; r < 2 * nbc; r++) acc[r] = _mm512_loadu_ps(o + c0 + LANES * r);
        KV_RUNS(kv, kv->v, p0, p1, row, n, i0, {
            for (int32_t j = 0; j < n; j++) {
                const kv_q8_0 *v = (const kv_q8_0 *)(row + (size_t)j * kv->row_bytes) + b0;
                const __m512 pr = _mm512_set1_ps(att[i0 + j]);
                for (int b = 0; b < nbc; b++) {
                    const __m512 d = _mm512_set1_ps(_cvtsh_ss(v[b].d));
                    for (int r = 0; r < 2; r++) {
                        __m128i q8 = _mm_loadu_si128((const __m128i *)(v[b].qs + LANES * r));
                        __m512 x = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q8)));
                        acc[2 * b + r] = _mm512_fmadd_ps(x, pr, acc[2 * b + r]);
                    }
                }
            }
        });
        for (int r = 0; r < 2 * nbc; r++) _mm512_storeu_ps(o + c0 + LANES * r, acc[r]);
    }
}

/* q·k of Q8_0 rows, many positions per call, in ggml's x86 order for a Q8_0 dot
 * (ggml_vec_dot_q8_0_q8_0 on AVX2): 8 float lanes, lane l takes the integer sum of the
 * products of values 4l .. 4l+3 of each block (exact), converted to float, times the
 * block's d_k · d_q (one float product), by FMA in block order; then hsum_float_8's tree
 * ((l, l+4), then (0+2) + (1+3)). Every ISA path computes exactly this. */
static inline float hsum8(const float *l)
{
    const float t0 = l[4] + l[0], t1 = l[5] + l[1], t2 = l[6] + l[2], t3 = l[7] + l[3];
    return (t0 + t2) + (t1 + t3);
}

static void qk_q8_0_scalar(const tsr_kv_view *kv, const kv_q8_0 *qq, float scale, int32_t p0,
                           int32_t p1, float *att)
{
    const int nb = kv->head_dim / TSR_QK8_0;
    KV_RUNS(kv, kv->k, p0, p1, row, n, i0, {
        for (int32_t j = 0; j < n; j++) {
            const kv_q8_0 *k = (const kv_q8_0 *)(row + (size_t)j * kv->row_bytes);
            float l8[8] = {0};
            for (int b = 0; b < nb; b++) {
                const float d = tsr_f16_to_f32(k[b].d) * tsr_f16_to_f32(qq[b].d);
                for (int l = 0; l < 8; l++) {
                    int32_t si = 0;
                    for (int e = 4 * l; e < 4 * l + 4; e++) si += k[b].qs[e] * qq[b].qs[e];
                    l8[l] = fmaf(d, (float)si, l8[l]);
                }
            }
            att[i0 + j] = hsum8(l8) * scale;
        }
    });
}

/* The 8 int32 sums of 4 products each of one block (maddubs on |k| and sign(k)·q: exact,
 * |pair sum| <= 2·128·127 < 2^15). */
TSR_KV_AVX2 static inline __m256 q8_block_sums_avx2(__m256i k, __m256i q, __m256i ones)
{
    const __m256i ak = _mm256_sign_epi8(k, k), sq = _mm256_sign_epi8(q, k);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(ak, sq), ones));
}

TSR_KV_AVX2 static void qk_q8_0_avx2(const tsr_kv_view *kv, const kv_q8_0 *qq, float scale,
                                     int32_t p0, int32_t p1, float *att)
{
    const int nb = kv->head_dim / TSR_QK8_0;
    const __m256i ones = _mm256_set1_epi16(1);
    KV_RUNS(kv, kv->k, p0, p1, row, n, i0, {
        for (int32_t j = 0; j < n; j++) {
            const kv_q8_0 *k = (const kv_q8_0 *)(row + (size_t)j * kv->row_bytes);
            __m256 acc = _mm256_setzero_ps();
            for (int b = 0; b < nb; b++) {
                const __m256 s =
                    q8_block_sums_avx2(_mm256_loadu_si256((const __m256i *)k[b].qs),
                                       _mm256_loadu_si256((const __m256i *)qq[b].qs), ones);
                const __m256 d = _mm256_set1_ps(_cvtsh_ss(k[b].d) * _cvtsh_ss(qq[b].d));
                acc = _mm256_fmadd_ps(d, s, acc);
            }
            att[i0 + j] = tsr_hsum8_ps(acc) * scale;
        }
    });
}

/* With AVX-512 VNNI: the 8 sums of 4 products in one vpdpbusd (the same exact integers). */
#define TSR_KV_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))
TSR_KV_VNNI static void qk_q8_0_vnni(const tsr_kv_view *kv, const kv_q8_0 *qq, float scale,
                                     int32_t p0, int32_t p1, float *att)
{
    const int nb = kv->head_dim / TSR_QK8_0;
    KV_RUNS(kv, kv->k, p0, p1, row, n, i0, {
        for (int32_t j = 0; j < n; j++) {
            const kv_q8_0 *k = (const kv_q8_0 *)(row + (size_t)j * kv->row_bytes);
            __m256 acc = _mm256_setzero_ps();
            for (int b = 0; b < nb; b++) {
                const __m256i kb = _mm256_loadu_si256((const __m256i *)k[b].qs);
                const __m256i qb = _mm256_loadu_si256((const __m256i *)qq[b].qs);
                const __m256 s = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(
                    _mm256_setzero_si256(), _mm256_sign_epi8(kb, kb), _mm256_sign_epi8(qb, kb)));
                const __m256 d = _mm256_set1_ps(_cvtsh_ss(k[b].d) * _cvtsh_ss(qq[b].d));
                acc = _mm256_fmadd_ps(d, s, acc);
            }
            att[i0 + j] = tsr_hsum8_ps(acc) * scale;
        }
    });
}

static void attn_q8_0(const tsr_kv_view *kv, const float *q, float scale, int32_t p0, int32_t p1,
                      float *att, void *scratch, float *o, const kv_kernels *K)
{
    const int hd = kv->head_dim;
    kv_q8_0 *qq = scratch;
    tsr_quant_row(TSR_TYPE_Q8_0, q, qq, hd);
    K->qk_q8_0(kv, qq, scale, p0, p1, att);
    tsr_softmax(att, p1 - p0 + 1);
    memset(o, 0, sizeof(float) * (size_t)hd);
    K->v_q8_0(kv, att, p0, p1, o);
}

size_t tsr_attn_group_scratch_bytes(int32_t head_dim, int32_t n_q)
{
    const size_t hd = head_dim > 0 ? (size_t)head_dim : 1u;
    return head_scratch_bytes(hd) + fa_scratch_bytes(hd, n_q > 0 ? (size_t)n_q : 1u);
}

/* ---- f32 and q8_0, a group of query heads ----
 * attn_f32 / attn_q8_0 per head, with the positions walked in chunks of GQ_CHUNK for all
 * heads in turn: each K and V row comes from memory once per group, not once per head (at
 * long context a KV head's rows outgrow the caches). Per head the operations and their
 * order are attn_f32's / attn_q8_0's: the scores are independent per position, and V's
 * per-value FMA chains continue in position order from chunk to chunk through out. */

#define GQ_CHUNK 64

/* f32 (head size a multiple of 16) or q8_0 for n_q heads; scores [n_q][p1 - p0 + 1]; qq: n_q
 * Q8_0 rows of q (q8_0 only). */
static void attn_group_2pass(const tsr_kv_view *kv, int32_t n_q, const float *q, float scale,
                             int32_t p0, int32_t p1, float *scores, kv_q8_0 *qq, float *o,
                             const kv_kernels *K)
{
    const int hd = kv->head_dim;
    const size_t n = (size_t)(p1 - p0 + 1), nb = (size_t)hd / TSR_QK8_0;
    const bool q8 = kv->type == TSR_KV_Q8_0;
    if (q8)
        for (int32_t h = 0; h < n_q; h++)
            tsr_quant_row(TSR_TYPE_Q8_0, q + (size_t)h * hd, qq + (size_t)h * nb, hd);
    for (int32_t c = p0; c <= p1; c += GQ_CHUNK) {
        const int32_t ce = p1 - c < GQ_CHUNK ? p1 : c + GQ_CHUNK - 1;
        for (int32_t h = 0; h < n_q; h++) {
            float *att = scores + (size_t)h * n + (size_t)(c - p0);
            if (q8)
                K->qk_q8_0(kv, qq + (size_t)h * nb, scale, c, ce, att);
            else
                K->qk_f32(kv, q + (size_t)h * hd, scale, c, ce, att);
        }
    }
    for (int32_t h = 0; h < n_q; h++) tsr_softmax(scores + (size_t)h * n, (int)n);
    memset(o, 0, sizeof(float) * (size_t)n_q * (size_t)hd);
    for (int32_t c = p0; c <= p1; c += GQ_CHUNK) {
        const int32_t ce = p1 - c < GQ_CHUNK ? p1 : c + GQ_CHUNK - 1;
        for (int32_t h = 0; h < n_q; h++) {
            const float *att = scores + (size_t)h * n + (size_t)(c - p0);
            if (q8)
                K->v_q8_0(kv, att, c, ce, o + (size_t)h * hd);
            else
                K->v_f32(kv, att, c, ce, o + (size_t)h * hd);
        }
    }
}

/* ---- the tables ---- */

static const kv_kernels k_kv_scalar = {.name = "scalar",
                                       .qk_f32 = qk_f32_scalar,
                                       .v_f32 = v_f32_scalar,
                                       .attn_f16 = attn_f16_scalar,
                                       .fa = NULL,
                                       .qk_q8_0 = qk_q8_0_scalar,
                                       .v_q8_0 = v_q8_0_scalar};
static const kv_kernels k_kv_avx2 = {.name = "avx2",
                                     .qk_f32 = qk_f32_avx2,
                                     .v_f32 = v_f32_avx2,
                                     .attn_f16 = attn_f16_avx2,
                                     .fa = &k_fa_avx2,
                                     .qk_q8_0 = qk_q8_0_avx2,
                                     .v_q8_0 = v_q8_0_avx2};
/* AVX-512: the q8_0 scores use VNNI. */
static const kv_kernels k_kv_avx512 = {.name = "avx512",
                                       .qk_f32 = qk_f32_avx512,
                                       .v_f32 = v_f32_avx512,
                                       .attn_f16 = attn_f16_avx512,
                                       .fa = &k_fa_avx512,
                                       .qk_q8_0 = qk_q8_0_vnni,
                                       .v_q8_0 = v_q8_0_avx512};

static const kv_kernels *kv_kernels_now(void)
{
    switch (kv_isa()) {
    case KV_AVX512:
        return &k_kv_avx512;
    case KV_AVX2:
        return &k_kv_avx2;
    default:
        return &k_kv_scalar;
    }
}

void tsr_attn_group(const tsr_kv_view *kv, int32_t n_q, const float *q, float scale, int32_t p0,
                    int32_t p1, float *scores, void *scratch, float *out)
{
    const kv_kernels *K = kv_kernels_now();
    const int hd = kv->head_dim;
    if (kv->type == TSR_KV_F16 && K->fa && hd % 64 == 0) {
        attn_f16_group(kv, n_q, q, scale, p0, p1, scores, scratch, out, K->fa);
        return;
    }
    if ((kv->type == TSR_KV_F32 && hd % LANES == 0) || kv->type == TSR_KV_Q8_0) {
        /* the group part's qf region holds n_q Q8_0 rows (34 bytes per 32 values < 4 per value) */
        fa_scratch f = fa_scratch_at((uint8_t *)scratch + head_scratch_bytes((size_t)hd),
                                     (size_t)hd, (size_t)n_q);
        attn_group_2pass(kv, n_q, q, scale, p0, p1, scores, (kv_q8_0 *)f.qf, out, K);
        return;
    }
    for (int32_t h = 0; h < n_q; h++)
        tsr_attn_head(kv, q + (size_t)h * hd, scale, p0, p1,
                      scores + (size_t)h * (size_t)(p1 - p0 + 1), scratch, out + (size_t)h * hd);
}

void tsr_attn_heads(const tsr_kv_view *kv, int32_t n_kv, int32_t group, const float *q, float scale,
                    int32_t p0, int32_t p1, float *scores, void *scratch, float *out)
{
    const kv_kernels *K = kv_kernels_now();
    const int hd = kv->head_dim;
    if (kv->type == TSR_KV_F16 && K->fa && hd % 64 == 0) {
        attn_f16_heads(kv, n_kv, group, q, scale, p0, p1, scores, scratch, out, K->fa);
        return;
    }
    tsr_kv_view one = *kv;
    for (int32_t i = 0; i < n_kv; i++) {
        one.head_offset = kv->head_offset + tsr_kv_row_bytes(kv->type, (int64_t)i * hd);
        const size_t at = (size_t)i * (size_t)group * (size_t)hd;
        tsr_attn_group(&one, group, q + at, scale, p0, p1, scores, scratch, out + at);
    }
}

void tsr_attn_head(const tsr_kv_view *kv, const float *q, float scale, int32_t p0, int32_t p1,
                   float *scores, void *scratch, float *out)
{
    const kv_kernels *K = kv_kernels_now();
    switch (kv->type) {
    case TSR_KV_F32:
        attn_f32(kv, q, scale, p0, p1, scores, out, K);
        break;
    case TSR_KV_F16:
        if (K->fa && kv->head_dim % 64 == 0)
            attn_f16_group(kv, 1, q, scale, p0, p1, scores, scratch, out, K->fa);
        else
            K->attn_f16(kv, q, scale, p0, p1, scores, scratch, out);
        break;
    case TSR_KV_Q8_0:
        attn_q8_0(kv, q, scale, p0, p1, scores, scratch, out, K);
        break;
    }
}
