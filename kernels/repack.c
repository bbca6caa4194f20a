/*
 * repack.c — interleaved-row weights and their GEMV / GEMM kernels (see repack.h).
 *
 * Every kernel here reproduces, output by output, the arithmetic of the row kernel of
 * kernels/quant.c on the same instruction set; only where the bytes come from and the
 * schedule differ:
 *  - scalar: s += fp16(d_w) * fp16(d_x) * (float)sum_i(q_w * q_x) block after block
 *    (dot_q8_0_scalar, dot_q4_0_scalar);
 *  - AVX2 / AVX-512 VNNI (quant.c's BLOCK_LOOP): per block an int32x8 dot whose lane l sums
 *    elements 4l..4l+3 (exact integers, however they are made), the scale fp16(d_w) * d_y
 *    made 8 blocks at a time, block b FMA'd into chain b % 4; Q4_0's -8 offset as
 *    fma(d_w, ey, off) per 8 blocks (ey = d_y * -8 * sum(y)); the end is
 *    hsum((c0 + c1) + (c2 + c3) + off).
 * The GEMM walks the chains one after the other (chain-major, as quant.c's tiles do) so a
 * micro-tile of rows x tokens keeps one accumulator per output in registers; the chains
 * are independent sums, so the order inside each is unchanged.
 *
 * The small helpers (block structs, nibble unpacking, the activation facts) are local
 * copies of quant.c's: quant.c keeps them static, and tests/test_repack.c checks every
 * kernel here against tsr_vec_dot bit for bit, so a change on either side is caught.
 */
#include "kernels/repack.h"

#include "kernels/dot_ggml.h"
#include "kernels/q40_gemm.h"
#include "kernels/quant.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TSR_RP_X86 1
#else
#define TSR_RP_X86 0
#endif

enum {
    RP_Q8_0_QB = 32,
    RP_Q4_0_QB = 16,
    RP_Q5_0_QB = 20, /* qh[4] (5th bits) then qs[16], as the block stores them */
    RP_XBLK = 34,    /* a Q8_0 activation block */
    RP_X1BLK = 36    /* a Q8_1 activation block (Q4_1's) */
};

/* K-quant super-blocks move whole: [nsb][4 rows][block]. */
static bool is_kquant(uint32_t type)
{
    return type == TSR_TYPE_Q2_K || type == TSR_TYPE_Q3_K || type == TSR_TYPE_Q4_K ||
           type == TSR_TYPE_Q5_K || type == TSR_TYPE_Q6_K;
}

bool tsr_repack_supported(uint32_t type)
{
    /* Not Q8_0 / Q4_1: their dots follow ggml's x86 order (kernels/dot_ggml.h), which
     * ggml itself runs unrepacked on x86 (their repack kernels below stay for the tests
     * of the layout but no weight uses them). */
    return type == TSR_TYPE_Q4_0 || type == TSR_TYPE_Q5_0 || type == TSR_TYPE_Q5_1 ||
           is_kquant(type);
}

/* Q8_1 activations (d, s, qs): the types with a min (x = d*q + m). */
static bool has_min(uint32_t type)
{
    return type == TSR_TYPE_Q4_1 || type == TSR_TYPE_Q5_1;
}

/* Quant bytes per block (the bytes after the fp16 scale, and the min). */
static size_t quant_bytes(uint32_t type)
{
    return type == TSR_TYPE_Q8_0                            ? RP_Q8_0_QB
           : type == TSR_TYPE_Q5_0 || type == TSR_TYPE_Q5_1 ? RP_Q5_0_QB
                                                            : RP_Q4_0_QB;
}

/* fp16 arrays in front of a group's quants: d, and m for Q4_1 / Q5_1 (x = d*q + m). */
static size_t n_scales(uint32_t type)
{
    return has_min(type) ? 2 : 1;
}

/* -1: not decided yet (the environment decides at the first call). */
static _Atomic int g_repack_all = -1;

void tsr_repack_set_all(bool all)
{
    atomic_store(&g_repack_all, all ? 1 : 0);
}

bool tsr_repack_all(void)
{
    int all = atomic_load(&g_repack_all);
    if (all < 0) {
        const char *e = getenv("TSR_REPACK_ALL");
        all = (e && strcmp(e, "0") == 0) ? 0 : 1;
        atomic_store(&g_repack_all, all);
    }
    return all != 0;
}

bool tsr_repack_chosen(uint32_t type)
{
    if (!tsr_repack_supported(type)) return false;
    return tsr_repack_all() || type == TSR_TYPE_Q5_0 || type == TSR_TYPE_Q5_1 || is_kquant(type);
}

bool tsr_repack_use_file_layout(uint32_t type, int32_t n_tok)
{
    /* Q4_K / Q6_K: one token reads the groups too (tsr_vec_dot_kgroups: 4 rows at once in
     * one linear stream, where the file layout's 4 rows are 4 streams). Q5_0 too: its
     * one-token GEMV over the groups (repack_dot_q50_simd, 4 rows per pass, scales of 8
     * blocks read as one vector) beat the row dots' 4-rows-in-2-registers unpacking, which
     * is compute-bound (bench_repack, 896 and 2048 columns, 1 thread: 10-15 vs 6-8 GB/s).
     * Q4_0: every token count reads the groups when there are any (kernels/q40_gemm.c: a
     * group's block of 4 rows is one 64-byte load, where the file layout costs 4 loads, or
     * gathers in the GEMM). */
    if (type == TSR_TYPE_Q4_0) return false;
    if (n_tok <= 1) return type != TSR_TYPE_Q4_K && type != TSR_TYPE_Q6_K && type != TSR_TYPE_Q5_0;
    /* (Q5_0 has no file-layout tile: quant.c would run a long batch token by token, about
     * 2x the CPU time of the repacked GEMM: 1.45 vs 0.65 ns per block dot, 896 x 1024 x 128) */
    const bool file_tile = type == TSR_TYPE_Q8_0 || type == TSR_TYPE_Q4_1;
    return file_tile && n_tok >= TSR_REPACK_TILE_MIN_TOKENS;
}

size_t tsr_repack_group_bytes(uint32_t type, int64_t n)
{
    if (is_kquant(type)) {
        if (n <= 0 || n % TSR_QK_K != 0) return 0;
        const size_t bytes = (size_t)(n / TSR_QK_K) * TSR_REPACK_ROWS * tsr_type_block_bytes(type);
        return (bytes + 63) / 64 * 64;
    }
    if (!tsr_repack_supported(type) || n <= 0 || n % 32 != 0) return 0;
    const size_t nb = (size_t)n / 32, nbp = (nb + 7) / 8 * 8;
    const size_t bytes =
        TSR_REPACK_ROWS * nbp * 2 * n_scales(type) + nb * TSR_REPACK_ROWS * quant_bytes(type);
    return (bytes + 63) / 64 * 64;
}

size_t tsr_repack_bytes(uint32_t type, int64_t n, int64_t n_out)
{
    if (n_out <= 0) return 0;
    return tsr_repack_group_bytes(type, n) *
           (size_t)((n_out + TSR_REPACK_ROWS - 1) / TSR_REPACK_ROWS);
}

int tsr_repack(uint32_t type, int64_t n, int64_t n_out, const void *src, size_t src_stride,
               void *dst)
{
    const size_t gb = tsr_repack_group_bytes(type, n);
    if (!gb || n_out <= 0) return -1;
    if (is_kquant(type)) {
        const size_t nsb = (size_t)n / TSR_QK_K, bb = tsr_type_block_bytes(type);
        const int64_t n_groups = (n_out + TSR_REPACK_ROWS - 1) / TSR_REPACK_ROWS;
        for (int64_t g = 0; g < n_groups; ++g) {
            uint8_t *grp = (uint8_t *)dst + (size_t)g * gb;
            memset(grp, 0, gb);
            for (int r = 0; r < TSR_REPACK_ROWS; ++r) {
                int64_t row = g * TSR_REPACK_ROWS + r;
                if (row >= n_out) row = n_out - 1;
                const uint8_t *s = (const uint8_t *)src + (size_t)row * src_stride;
                for (size_t b = 0; b < nsb; ++b)
                    memcpy(grp + (b * TSR_REPACK_ROWS + (size_t)r) * bb, s + b * bb, bb);
            }
        }
        return 0;
    }
    const size_t nb = (size_t)n / 32, nbp = (nb + 7) / 8 * 8, qb = quant_bytes(type);
    const size_t ns = n_scales(type);
    const size_t bb = 2 * ns + qb; /* source block bytes: fp16 d (and m), then the quants */
    const int64_t n_groups = (n_out + TSR_REPACK_ROWS - 1) / TSR_REPACK_ROWS;
    for (int64_t g = 0; g < n_groups; ++g) {
        uint8_t *grp = (uint8_t *)dst + (size_t)g * gb;
        memset(grp, 0, gb);
        uint16_t *d16 = (uint16_t *)grp;
        uint16_t *m16 = d16 + TSR_REPACK_ROWS * nbp;
        uint8_t *q = grp + TSR_REPACK_ROWS * nbp * 2 * ns;
        for (int r = 0; r < TSR_REPACK_ROWS; ++r) {
            int64_t row = g * TSR_REPACK_ROWS + r;
            if (row >= n_out) row = n_out - 1;
            const uint8_t *s = (const uint8_t *)src + (size_t)row * src_stride;
            for (size_t b = 0; b < nb; ++b) {
                memcpy(&d16[(size_t)r * nbp + b], s + b * bb, 2);
                if (ns == 2) memcpy(&m16[(size_t)r * nbp + b], s + b * bb + 2, 2);
                memcpy(q + (b * TSR_REPACK_ROWS + (size_t)r) * qb, s + b * bb + 2 * ns, qb);
            }
        }
    }
    return 0;
}

/* ---- scalar reference ------------------------------------------------------------------ */

/* Q5_0 (quant.c's dot_q5_0_scalar: ggml's order): 8 lanes of 4 elements per block, one FMA
 * chain per lane, ggml's hsum_float_8. */
static float dot_q5_0_scalar(size_t nb, size_t nbp, const uint8_t *grp, int rr, const uint8_t *x)
{
    const uint16_t *d16 = (const uint16_t *)grp + (size_t)rr * nbp;
    const uint8_t *q = grp + TSR_REPACK_ROWS * nbp * 2 + (size_t)rr * 20;
    float acc[8] = {0};
    for (size_t b = 0; b < nb; ++b) {
        const uint8_t *wq = q + b * TSR_REPACK_ROWS * 20, *xb = x + b * RP_XBLK;
        uint16_t xd;
        memcpy(&xd, xb, 2);
        const int8_t *xq = (const int8_t *)(xb + 2);
        uint32_t qh;
        memcpy(&qh, wq, 4);
        const uint8_t *qs = wq + 4;
        int v[32];
        for (int j = 0; j < 16; ++j) {
            v[j] = ((qs[j] & 0x0F) | (int)(((qh >> j) & 1u) << 4)) - 16;
            v[j + 16] = ((qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4)) - 16;
        }
        const float d = tsr_f16_to_f32(d16[b]) * tsr_f16_to_f32(xd);
        for (int k = 0; k < 8; ++k) {
            int32_t si = 0;
            for (int j = 4 * k; j < 4 * k + 4; ++j) si += v[j] * xq[j];
            acc[k] = fmaf((float)si, d, acc[k]);
        }
    }
    return tsr_ggml_hsum8(acc);
}

/* One row (group row rr) x one token, in dot_q8_0_scalar / dot_q4_0_scalar's order. */
static float dot_scalar(uint32_t type, size_t nb, size_t nbp, const uint8_t *grp, int rr,
                        const uint8_t *x)
{
    const uint16_t *d16 = (const uint16_t *)grp + (size_t)rr * nbp;
    const uint16_t *m16 = d16 + TSR_REPACK_ROWS * nbp;
    const size_t qb = quant_bytes(type);
    const uint8_t *q = grp + TSR_REPACK_ROWS * nbp * 2 * n_scales(type) + (size_t)rr * qb;
    const bool q41 = has_min(type); /* Q8_1 activations: d, s, then qs */
    const size_t xbb = q41 ? RP_X1BLK : RP_XBLK;
    float s = 0;
    for (size_t b = 0; b < nb; ++b) {
        const uint8_t *wq = q + b * TSR_REPACK_ROWS * qb;
        const uint8_t *xb = x + b * xbb;
        uint16_t xd, xsum;
        memcpy(&xd, xb, 2);
        memcpy(&xsum, xb + 2, 2);
        const int8_t *xq = (const int8_t *)(xb + (q41 ? 4 : 2));
        int32_t si = 0;
        if (type == TSR_TYPE_Q5_1) { /* dot_q5_1_scalar: Q4_1's with q5_unpack's quants */
            uint32_t qh;
            memcpy(&qh, wq, 4);
            const uint8_t *qs = wq + 4;
            for (int j = 0; j < 16; ++j) {
                si += ((qs[j] & 0x0F) | (int)(((qh >> j) & 1u) << 4)) * xq[j];
                si += ((qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1u) << 4)) * xq[j + 16];
            }
            s += tsr_f16_to_f32(d16[b]) * tsr_f16_to_f32(xd) * (float)si +
                 tsr_f16_to_f32(m16[b]) * tsr_f16_to_f32(xsum);
            continue;
        }
        if (q41) { /* dot_q4_1_scalar: d_w*d_y*sum(q*y) + m_w*s_y */
            for (int j = 0; j < 16; ++j) {
                si += (wq[j] & 0xF) * xq[j];
                si += (wq[j] >> 4) * xq[j + 16];
            }
            s += tsr_f16_to_f32(d16[b]) * tsr_f16_to_f32(xd) * (float)si +
                 tsr_f16_to_f32(m16[b]) * tsr_f16_to_f32(xsum);
            continue;
        }
        if (type == TSR_TYPE_Q8_0) {
            for (int j = 0; j < 32; ++j) si += (int8_t)wq[j] * xq[j];
        } else {
            for (int j = 0; j < 16; ++j) {
                si += ((wq[j] & 0xF) - 8) * xq[j];
                si += ((wq[j] >> 4) - 8) * xq[j + 16];
            }
        }
        s += tsr_f16_to_f32(d16[b]) * tsr_f16_to_f32(xd) * (float)si;
    }
    return s;
}

static void repack_dot_scalar(uint32_t type, size_t nb, size_t nbp, size_t gb,
                              const uint8_t *packed, int64_t n_rows, int32_t n_tok,
                              const uint8_t *x, size_t xs, float *y, size_t ys)
{
    for (int64_t r = 0; r < n_rows; ++r) {
        const uint8_t *grp = packed + (size_t)(r / TSR_REPACK_ROWS) * gb;
        for (int32_t t = 0; t < n_tok; ++t)
            y[(size_t)t * ys + (size_t)r] =
                type == TSR_TYPE_Q5_0
                    ? dot_q5_0_scalar(nb, nbp, grp, (int)(r % TSR_REPACK_ROWS), x + (size_t)t * xs)
                    : dot_scalar(type, nb, nbp, grp, (int)(r % TSR_REPACK_ROWS),
                                 x + (size_t)t * xs);
    }
}

#if TSR_RP_X86

#define RP_AVX2 __attribute__((target("avx2,fma,f16c")))
#define RP_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))
/* the same features; marks the kernels that work in 512-bit registers */
#define RP_Z512   RP_VNNI
#define RP_INLINE static inline __attribute__((always_inline))
#include "kernels/x86hsum.h"

/* The micro-kernels are written for T tokens (T <= 4) and inlined with T a constant, so each
 * width gets its loops unrolled and its accumulators in registers: fname(T, ...) calls
 * fname##_mk(1..4, ...). PARAMS / ARGS are the parameters after T, parenthesized. */
#define RP_UNPAREN(...) __VA_ARGS__
#define RP_DEF_T_SWITCH(fname, ATTR, PARAMS, ARGS)                                                 \
    ATTR static void fname(int T, RP_UNPAREN PARAMS)                                               \
    {                                                                                              \
        switch (T) {                                                                               \
        case 1:                                                                                    \
            fname##_mk(1, RP_UNPAREN ARGS);                                                        \
            break;                                                                                 \
        case 2:                                                                                    \
            fname##_mk(2, RP_UNPAREN ARGS);                                                        \
            break;                                                                                 \
        case 3:                                                                                    \
            fname##_mk(3, RP_UNPAREN ARGS);                                                        \
            break;                                                                                 \
        default:                                                                                   \
            fname##_mk(4, RP_UNPAREN ARGS);                                                        \
            break;                                                                                 \
        }                                                                                          \
    }
#define RP_GEMM_PARAMS                                                                             \
    (size_t nb, size_t nbp, const uint8_t *grp, int rr, int nr, const uint8_t *x, size_t xs,       \
     const float *dy, const float *ey, float *sc, float *y, size_t ys, const char *pf,             \
     size_t pf_bytes)
#define RP_GEMM_ARGS (nb, nbp, grp, rr, nr, x, xs, dy, ey, sc, y, ys, pf, pf_bytes)
#define RP_K_PARAMS                                                                                \
    (size_t nsb, const uint8_t *grp, int r, const uint8_t *x, size_t xs, float *y, size_t ys)
#define RP_K_ARGS (nsb, grp, r, x, xs, y, ys)

/* A Q4_0 block's 32 nibbles as bytes in element order (quant.c's q4_0_nibbles). */
RP_AVX2 RP_INLINE __m256i q4_nibbles(const uint8_t *qs)
{
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    const __m256i sh = _mm256_srlv_epi64(v, _mm256_set_epi64x(4, 4, 0, 0));
    return _mm256_and_si256(sh, _mm256_set1_epi8(0x0F));
}

/* A Q5_0 block's 32 quants as unsigned bytes 0..31 (quant.c's q5_bytes_avx2 / _vnni); qp
 * points at qh[4] then qs[16]. */
RP_AVX2 RP_INLINE __m256i q5_bytes_avx2(const uint8_t *qp)
{
    uint32_t x32;
    memcpy(&x32, qp, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                           0x0101010101010101, 0x0000000000000000);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x32), shuf);
    bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x((long long)0x7fbfdfeff7fbfdfeull));
    const __m256i bits = _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
    return _mm256_or_si256(q4_nibbles(qp + 4), _mm256_and_si256(bits, _mm256_set1_epi8(0x10)));
}
RP_VNNI RP_INLINE __m256i q5_bytes_vnni(const uint8_t *qp)
{
    uint32_t bits;
    memcpy(&bits, qp, 4);
    return _mm256_or_si256(q4_nibbles(qp + 4),
                           _mm256_maskz_mov_epi8((__mmask32)bits, _mm256_set1_epi8(0x10)));
}

/* The activation facts of quant.c's act_info_build: dy[b] = fp16 scale, ey[b] = dy[b] *
 * -mult * sum(y_b) (mult 8 for Q4_0, 0 for Q8_0: zeros), both zero-padded to nbp. */
RP_AVX2 static void act_build(const uint8_t *x, size_t nb, size_t nbp, int32_t mult, float *dy,
                              float *ey)
{
    size_t b = 0;
    for (; b < nb; ++b) {
        const uint8_t *xb = x + b * RP_XBLK;
        uint16_t d;
        memcpy(&d, xb, 2);
        dy[b] = _cvtsh_ss(d);
        if (!mult) {
            ey[b] = 0.0f;
            continue;
        }
        const int32_t sum = tsr_qsum32_i8(xb + 2);
        ey[b] = dy[b] * (float)(-mult * sum);
    }
    for (; b < nbp; ++b) dy[b] = ey[b] = 0.0f;
}

/* Q8_1 activations (Q4_1): dy[b] = fp16 d, ey[b] = fp16 s (quant.c's act_info_build_q8_1). */
RP_AVX2 static void act_build_q8_1(const uint8_t *x, size_t nb, size_t nbp, int32_t mult, float *dy,
                                   float *ey)
{
    (void)mult;
    size_t b = 0;
    for (; b < nb; ++b) {
        uint16_t d, s;
        memcpy(&d, x + b * RP_X1BLK, 2);
        memcpy(&s, x + b * RP_X1BLK + 2, 2);
        dy[b] = _cvtsh_ss(d);
        ey[b] = _cvtsh_ss(s);
    }
    for (; b < nbp; ++b) dy[b] = ey[b] = 0.0f;
}

/* ---- integer block dots: int32x8, lane l = elements 4l..4l+3 (quant.c's lanes) ---------- */

#define XQ(xb) _mm256_loadu_si256((const __m256i *)((xb) + 2))

/* GEMV (one token): the row kernels' own operations. */
RP_AVX2 RP_INLINE __m256i q8_idot_avx2(const uint8_t *qp, __m256i yv)
{
    const __m256i w = _mm256_loadu_si256((const __m256i *)qp);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(yv, w)),
                             _mm256_set1_epi16(1));
}
RP_VNNI RP_INLINE __m256i q8_idot_vnni(const uint8_t *qp, __m256i yv)
{
    const __m256i w = _mm256_loadu_si256((const __m256i *)qp);
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(w), _mm256_sign_epi8(yv, w));
}
#define Q8_IDOT_AVX2(qp, yv) q8_idot_avx2(qp, yv)
#define Q8_IDOT_VNNI(qp, yv) q8_idot_vnni(qp, yv)
#define Q4_IDOT_AVX2(qp, yv)                                                                       \
    _mm256_madd_epi16(_mm256_maddubs_epi16(q4_nibbles(qp), yv), _mm256_set1_epi16(1))
#define Q4_IDOT_VNNI(qp, yv) _mm256_dpbusd_epi32(_mm256_setzero_si256(), q4_nibbles(qp), yv)
#define Q5_IDOT_AVX2(qp, yv)                                                                       \
    _mm256_madd_epi16(_mm256_maddubs_epi16(q5_bytes_avx2(qp), yv), _mm256_set1_epi16(1))
#define Q5_IDOT_VNNI(qp, yv) _mm256_dpbusd_epi32(_mm256_setzero_si256(), q5_bytes_vnni(qp), yv)

/* GEMV over R rows of a group (rows rr..rr+R-1; nr of them stored): 4 chains per row kept
 * in registers, the 8 scales of each row per 8 blocks in a small aligned array (broadcast
 * from memory per block). */
#define DEF_GEMV(fname, ATTR, R, QB, OFFSET, HASMIN, XB, XO, IDOT)                                 \
    ATTR static void fname(size_t nb, size_t nbp, const uint8_t *grp, int rr, int nr,              \
                           const uint8_t *x, const float *dy, const float *ey, float *y)           \
    {                                                                                              \
        const uint16_t *d16 = (const uint16_t *)grp + (size_t)rr * nbp;                            \
        const uint16_t *m16 = (const uint16_t *)grp + TSR_REPACK_ROWS * nbp + (size_t)rr * nbp;    \
        const uint8_t *q =                                                                         \
            grp + TSR_REPACK_ROWS * nbp * 2 * ((HASMIN) ? 2 : 1) + (size_t)rr * (QB);              \
        (void)m16;                                                                                 \
        __m256 a0[R], a1[R], a2[R], a3[R], off[R];                                                 \
        float sc[R][8] __attribute__((aligned(32)));                                               \
        _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r)                                        \
        {                                                                                          \
            a0[r] = a1[r] = a2[r] = a3[r] = off[r] = _mm256_setzero_ps();                          \
        }                                                                                          \
        for (size_t b = 0; b < nb; b += 8) {                                                       \
            const int m = nb - b < 8 ? (int)(nb - b) : 8;                                          \
            _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r)                                    \
            {                                                                                      \
                const __m256 dw = _mm256_cvtph_ps(                                                 \
                    _mm_loadu_si128((const __m128i *)(d16 + (size_t)r * nbp + b)));                \
                if (OFFSET || HASMIN)                                                              \
                    off[r] = _mm256_fmadd_ps(                                                      \
                        (HASMIN) ? _mm256_cvtph_ps(_mm_loadu_si128(                                \
                                       (const __m128i *)(m16 + (size_t)r * nbp + b)))              \
                                 : dw,                                                             \
                        _mm256_loadu_ps(ey + b), off[r]);                                          \
                _mm256_store_ps(sc[r], _mm256_mul_ps(dw, _mm256_loadu_ps(dy + b)));                \
            }                                                                                      \
            _Pragma("GCC unroll 8") for (int k = 0; k < 8; ++k)                                    \
            {                                                                                      \
                if (k >= m) break;                                                                 \
                const __m256i yv =                                                                 \
                    _mm256_loadu_si256((const __m256i *)(x + (b + (size_t)k) * (XB) + (XO)));      \
                const uint8_t *qb = q + (b + (size_t)k) * TSR_REPACK_ROWS * (QB);                  \
                _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r)                                \
                {                                                                                  \
                    const __m256 f = _mm256_cvtepi32_ps(IDOT(qb + (size_t)r * (QB), yv));          \
                    const __m256 s = _mm256_broadcast_ss(&sc[r][k]);                               \
                    switch (k & 3) {                                                               \
                    case 0:                                                                        \
                        a0[r] = _mm256_fmadd_ps(s, f, a0[r]);                                      \
                        break;                                                                     \
                    case 1:                                                                        \
                        a1[r] = _mm256_fmadd_ps(s, f, a1[r]);                                      \
                        break;                                                                     \
                    case 2:                                                                        \
                        a2[r] = _mm256_fmadd_ps(s, f, a2[r]);                                      \
                        break;                                                                     \
                    default:                                                                       \
                        a3[r] = _mm256_fmadd_ps(s, f, a3[r]);                                      \
                        break;                                                                     \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int r = 0; r < nr; ++r) {                                                             \
            const __m256 sum4 =                                                                    \
                _mm256_add_ps(_mm256_add_ps(a0[r], a1[r]), _mm256_add_ps(a2[r], a3[r]));           \
            y[r] = tsr_hsum8_ps(_mm256_add_ps(sum4, off[r]));                                      \
        }                                                                                          \
    }

/* clang-format off */
DEF_GEMV(gemv_q8_0_avx2, RP_AVX2, 2, RP_Q8_0_QB, 0, 0, RP_XBLK, 2, Q8_IDOT_AVX2)
DEF_GEMV(gemv_q8_0_vnni, RP_VNNI, 4, RP_Q8_0_QB, 0, 0, RP_XBLK, 2, Q8_IDOT_VNNI)
DEF_GEMV(gemv_q5_0_avx2, RP_AVX2, 2, RP_Q5_0_QB, 1, 0, RP_XBLK, 2, Q5_IDOT_AVX2)
DEF_GEMV(gemv_q5_0_vnni, RP_VNNI, 4, RP_Q5_0_QB, 1, 0, RP_XBLK, 2, Q5_IDOT_VNNI)
DEF_GEMV(gemv_q4_1_avx2, RP_AVX2, 2, RP_Q4_0_QB, 0, 1, RP_X1BLK, 4, Q4_IDOT_AVX2)
DEF_GEMV(gemv_q4_1_vnni, RP_VNNI, 4, RP_Q4_0_QB, 0, 1, RP_X1BLK, 4, Q4_IDOT_VNNI)
DEF_GEMV(gemv_q5_1_avx2, RP_AVX2, 2, RP_Q5_0_QB, 0, 1, RP_X1BLK, 4, Q5_IDOT_AVX2)
DEF_GEMV(gemv_q5_1_vnni, RP_VNNI, 4, RP_Q5_0_QB, 0, 1, RP_X1BLK, 4, Q5_IDOT_VNNI)
/* clang-format on */

/* ---- GEMM micro-kernels: R rows x T tokens (T <= 4), chain-major --------------------------
 * WPREP(wv, wa, qp)  a weight block, unpacked once for the T tokens (wa: a helper);
 * YPREP(yv, xb)      an activation block;
 * IDOT(wv, wa, yv)   the block's int32x8 lanes, CVT them as floats (exactly vcvtdq2ps's).
 * VNNI: the dots start at 0x4B400000 (the bits of 1.5*2^23), so the lanes read as the
 * floats 1.5*2^23 + dot, exact for |dot| < 2^22 (ours < 2^17), and subtracting 1.5*2^23
 * gives float(dot) on the FP add pipes; Q8_0 feeds y+128 (unsigned) and starts each dot at
 * MAGIC - 128*sum(w) per lane (quant.c's tile trick: no per-pair sign op). */
#define RP_MAGIC         TSR_I2F_MAGIC_I /* kernels/x86hsum.h */
#define RP_CVT_AVX2(i)   _mm256_cvtepi32_ps(i)
#define RP_CVT_MAGIC(i)  _mm256_sub_ps(_mm256_castsi256_ps(i), _mm256_set1_ps(TSR_I2F_MAGIC_F))
#define RP_Y(yv, xb)     yv = XQ(xb)
#define RP_Y1(yv, xb)    yv = _mm256_loadu_si256((const __m256i *)((xb) + 4)) /* Q8_1 */
#define RP_Y_X80(yv, xb) yv = _mm256_xor_si256(XQ(xb), _mm256_set1_epi8((char)0x80))
#define Q8W_AVX2(wv, wa, qp)                                                                       \
    do {                                                                                           \
        wv = _mm256_loadu_si256((const __m256i *)(qp));                                            \
        wa = _mm256_sign_epi8(wv, wv);                                                             \
    } while (0)
#define Q8D_AVX2(wv, wa, yv)                                                                       \
    _mm256_madd_epi16(_mm256_maddubs_epi16(wa, _mm256_sign_epi8(yv, wv)), _mm256_set1_epi16(1))
#define Q8W_VNNI(wv, wa, qp)                                                                       \
    do {                                                                                           \
        wv = _mm256_loadu_si256((const __m256i *)(qp));                                            \
        wa = _mm256_sub_epi32(                                                                     \
            _mm256_set1_epi32(RP_MAGIC),                                                           \
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8((char)0x80), wv));        \
    } while (0)
#define Q8D_VNNI(wv, wa, yv) _mm256_dpbusd_epi32(wa, yv, wv)
#define Q4W(wv, wa, qp)                                                                            \
    do {                                                                                           \
        wv = q4_nibbles(qp);                                                                       \
        wa = wv;                                                                                   \
    } while (0)
#define Q4D_AVX2(wv, wa, yv)                                                                       \
    _mm256_madd_epi16(_mm256_maddubs_epi16(((void)(wa), wv), yv), _mm256_set1_epi16(1))
#define Q4D_VNNI(wv, wa, yv) _mm256_dpbusd_epi32(_mm256_set1_epi32(RP_MAGIC), ((void)(wa), wv), yv)
#define Q5W_AVX2(wv, wa, qp)                                                                       \
    do {                                                                                           \
        wv = q5_bytes_avx2(qp);                                                                    \
        wa = wv;                                                                                   \
    } while (0)
#define Q5W_VNNI(wv, wa, qp)                                                                       \
    do {                                                                                           \
        wv = q5_bytes_vnni(qp);                                                                    \
        wa = wv;                                                                                   \
    } while (0)

/* sc[o * nbp + b] = fp16(d_w(row r, b)) * dy_t[b] and off[o] (Q4_0) for o = r*T + t, made 8
 * blocks at a time exactly as the row kernel makes them; then the chains. */
#define DEF_GEMM(fname, ATTR, R, QB, OFFSET, HASMIN, XB, WPREP, YPREP, IDOT, CVT)                  \
    ATTR RP_INLINE void fname##_mk(const int T, size_t nb, size_t nbp, const uint8_t *grp, int rr, \
                                   int nr, const uint8_t *x, size_t xs, const float *dy,           \
                                   const float *ey, float *sc, float *y, size_t ys,                \
                                   const char *pf, size_t pf_bytes)                                \
    {                                                                                              \
        const uint16_t *d16 = (const uint16_t *)grp + (size_t)rr * nbp;                            \
        const uint16_t *m16 = (const uint16_t *)grp + TSR_REPACK_ROWS * nbp + (size_t)rr * nbp;    \
        const uint8_t *q =                                                                         \
            grp + TSR_REPACK_ROWS * nbp * 2 * ((HASMIN) ? 2 : 1) + (size_t)rr * (QB);              \
        (void)m16;                                                                                 \
        __m256 off[R * 4];                                                                         \
        _Pragma("GCC unroll 16") for (int o = 0; o < R * T; ++o) off[o] = _mm256_setzero_ps();     \
        for (size_t b = 0; b < nbp; b += 8) {                                                      \
            _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r)                                    \
            {                                                                                      \
                const __m256 dw = _mm256_cvtph_ps(                                                 \
                    _mm_loadu_si128((const __m128i *)(d16 + (size_t)r * nbp + b)));                \
                _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                                \
                {                                                                                  \
                    const int o = r * T + t;                                                       \
                    if (OFFSET || HASMIN)                                                          \
                        off[o] = _mm256_fmadd_ps(                                                  \
                            (HASMIN) ? _mm256_cvtph_ps(_mm_loadu_si128(                            \
                                           (const __m128i *)(m16 + (size_t)r * nbp + b)))          \
                                     : dw,                                                         \
                            _mm256_loadu_ps(ey + (size_t)t * nbp + b), off[o]);                    \
                    _mm256_store_ps(sc + (size_t)o * nbp + b,                                      \
                                    _mm256_mul_ps(dw, _mm256_loadu_ps(dy + (size_t)t * nbp + b))); \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        __m256 park[4][R * 4];                                                                     \
        /* pf: the next group, pf_bytes of it, drawn toward L2 a few lines per block over          \
         * this call (see repack_dot_simd) */                                                      \
        const char *pf_end = pf ? pf + pf_bytes : NULL;                                            \
        const size_t pf_step = pf ? (pf_bytes / 64 + nb - 1) / nb : 0;                             \
        for (int c = 0; c < 4; ++c) {                                                              \
            __m256 acc[R * 4];                                                                     \
            _Pragma("GCC unroll 16") for (int o = 0; o < R * T; ++o) acc[o] = _mm256_setzero_ps(); \
            for (size_t b = (size_t)c; b < nb; b += 4) {                                           \
                __m256i wv[R], wa[R], yv[4];                                                       \
                const uint8_t *qb = q + b * TSR_REPACK_ROWS * (QB);                                \
                for (size_t i = 0; i < pf_step && pf < pf_end; ++i, pf += 64)                      \
                    _mm_prefetch(pf, _MM_HINT_T1);                                                 \
                _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r)                                \
                    WPREP(wv[r], wa[r], qb + (size_t)r * (QB));                                    \
                _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                                \
                    YPREP(yv[t], x + (size_t)t * xs + b * (XB));                                   \
                _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r)                                \
                {                                                                                  \
                    _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                            \
                    {                                                                              \
                        const int o = r * T + t;                                                   \
                        const __m256 f = CVT(IDOT(wv[r], wa[r], yv[t]));                           \
                        acc[o] = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + (size_t)o * nbp + b), f, \
                                                 acc[o]);                                          \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
            _Pragma("GCC unroll 16") for (int o = 0; o < R * T; ++o) park[c][o] = acc[o];          \
        }                                                                                          \
        for (int r = 0; r < nr; ++r) {                                                             \
            for (int t = 0; t < T; ++t) {                                                          \
                const int o = r * T + t;                                                           \
                const __m256 sum4 = _mm256_add_ps(_mm256_add_ps(park[0][o], park[1][o]),           \
                                                  _mm256_add_ps(park[2][o], park[3][o]));          \
                y[(size_t)t * ys + (size_t)r] = tsr_hsum8_ps(_mm256_add_ps(sum4, off[o]));         \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    RP_DEF_T_SWITCH(fname, ATTR, RP_GEMM_PARAMS, RP_GEMM_ARGS)

/* AVX2's 16 vector registers hold 2 rows x 4 tokens; AVX-512 VL's 32 hold 4 x 4. */
/* clang-format off */
DEF_GEMM(gemm_q8_0_avx2, RP_AVX2, 2, RP_Q8_0_QB, 0, 0, RP_XBLK, Q8W_AVX2, RP_Y, Q8D_AVX2, RP_CVT_AVX2)
DEF_GEMM(gemm_q8_0_vnni, RP_VNNI, 4, RP_Q8_0_QB, 0, 0, RP_XBLK, Q8W_VNNI, RP_Y_X80, Q8D_VNNI,
         RP_CVT_MAGIC)
DEF_GEMM(gemm_q5_0_avx2, RP_AVX2, 2, RP_Q5_0_QB, 1, 0, RP_XBLK, Q5W_AVX2, RP_Y, Q4D_AVX2,
         RP_CVT_AVX2)
DEF_GEMM(gemm_q5_0_vnni, RP_VNNI, 4, RP_Q5_0_QB, 1, 0, RP_XBLK, Q5W_VNNI, RP_Y, Q4D_VNNI,
         RP_CVT_MAGIC)
DEF_GEMM(gemm_q4_1_avx2, RP_AVX2, 2, RP_Q4_0_QB, 0, 1, RP_X1BLK, Q4W, RP_Y1, Q4D_AVX2, RP_CVT_AVX2)
DEF_GEMM(gemm_q4_1_vnni, RP_VNNI, 4, RP_Q4_0_QB, 0, 1, RP_X1BLK, Q4W, RP_Y1, Q4D_VNNI,
         RP_CVT_MAGIC)
DEF_GEMM(gemm_q5_1_avx2, RP_AVX2, 2, RP_Q5_0_QB, 0, 1, RP_X1BLK, Q5W_AVX2, RP_Y1, Q4D_AVX2,
         RP_CVT_AVX2)
DEF_GEMM(gemm_q5_1_vnni, RP_VNNI, 4, RP_Q5_0_QB, 0, 1, RP_X1BLK, Q5W_VNNI, RP_Y1, Q4D_VNNI,
         RP_CVT_MAGIC)
/* clang-format on */

/* ---- Q5_0 in ggml's order (quant.c's dot_q5_0_scalar) --------------------------------------
 * AVX2, R group rows x T tokens (constants after inlining): per block, lane k = sum over
 * elements 4k..4k+3 of (q5 - 16) * y, made from the unsigned 5-bit quants (vpmaddubsw,
 * vpmaddwd) onto -16 * sum(y) (the same exact integers as the sign trick; the -16 * lane sums
 * of y are made once per token and block, in the workspace, for all rows), then
 * acc = fma(d_w*d_y, float(lanes), acc); the end tsr_hsum8_ps. One FMA chain per (row,
 * token). AVX-512 VNNI runs q50z below, the same lanes and chains in zmm registers. */
#define RP_Q50_LANES_AVX2(ny, qu, y)                                                               \
    _mm256_add_epi32(ny, _mm256_madd_epi16(_mm256_maddubs_epi16(qu, y), _mm256_set1_epi16(1)))
RP_AVX2 RP_INLINE void q50_avx2_mk(const int T, const int R, size_t nb, size_t nbp,
                                   const uint8_t *grp, int rr, int nr, const uint8_t *x, size_t xs,
                                   const float *dyw, const __m256i *nyw, float *y, size_t ys,
                                   size_t pfd)
{
    const uint16_t *d16 = (const uint16_t *)grp;
    const uint8_t *q = grp + TSR_REPACK_ROWS * nbp * 2;
    __m256 acc[4][4];
    /* d_w*d_y of 8 blocks per (row, token), made 8 at a time (the same float products),
     * broadcast from L1 into the FMAs: no scalar convert, multiply or shuffle per output */
    float sc[4][4][8] __attribute__((aligned(32)));
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
    /* one loop over the blocks (a nested per-8 loop made gcc store every accumulator to
     * the stack after each FMA) */
    for (size_t b = 0; b < nb; ++b) {
        if ((b & 7) == 0) {
            _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r)
            {
                const __m256 dw8 = _mm256_cvtph_ps(
                    _mm_loadu_si128((const __m128i *)(d16 + (size_t)(rr + r) * nbp + b)));
                _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t) _mm256_store_ps(
                    sc[r][t], _mm256_mul_ps(dw8, _mm256_loadu_ps(dyw + (size_t)t * nbp + b)));
            }
        }
        if (pfd) { /* pfd bytes ahead of this block's 4 x 20 quant bytes: every line */
            const char *pf_ = (const char *)(q + b * TSR_REPACK_ROWS * 20) + pfd;
            _mm_prefetch(pf_, _MM_HINT_T0);
            _mm_prefetch(pf_ + 40, _MM_HINT_T0);
        }
        __m256i yv[4];
        _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t) yv[t] =
            _mm256_loadu_si256((const __m256i *)(x + (size_t)t * xs + b * RP_XBLK + 2));
        _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r)
        {
            const __m256i qu = q5_bytes_avx2(q + (b * TSR_REPACK_ROWS + (size_t)(rr + r)) * 20);
            _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)
            {
                const __m256i lanes = RP_Q50_LANES_AVX2(nyw[(size_t)t * nb + b], qu, yv[t]);
                acc[r][t] = _mm256_fmadd_ps(_mm256_broadcast_ss(&sc[r][t][b & 7]),
                                            _mm256_cvtepi32_ps(lanes), acc[r][t]);
            }
        }
    }
    /* constant indices only (a loop to nr kept acc in memory, stored after every FMA) */
    _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r)
    {
        _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t) if (r < nr)
            y[(size_t)t * ys + (size_t)r] = tsr_hsum8_ps(acc[r][t]);
    }
}
/* One token: 4 rows a pass (with its prefetch); several: 2 rows x up to 4 tokens (AVX2's 16
 * registers). */
RP_AVX2 static void q50_avx2(int T, int R, size_t nb, size_t nbp, const uint8_t *grp, int rr,
                             int nr, const uint8_t *x, size_t xs, const float *dyw,
                             const __m256i *nyw, float *y, size_t ys, size_t pfd)
{
    if (R == 4) {
        q50_avx2_mk(1, 4, nb, nbp, grp, rr, nr, x, xs, dyw, nyw, y, ys, pfd);
        return;
    }
    switch (T) {
    case 1:
        q50_avx2_mk(1, 2, nb, nbp, grp, rr, nr, x, xs, dyw, nyw, y, ys, 0);
        break;
    case 2:
        q50_avx2_mk(2, 2, nb, nbp, grp, rr, nr, x, xs, dyw, nyw, y, ys, 0);
        break;
    case 3:
        q50_avx2_mk(3, 2, nb, nbp, grp, rr, nr, x, xs, dyw, nyw, y, ys, 0);
        break;
    default:
        q50_avx2_mk(4, 2, nb, nbp, grp, rr, nr, x, xs, dyw, nyw, y, ys, 0);
        break;
    }
}

/* -16 * the 4-element lane sums of an activation block's quants y (exact ints): Q5_0's lanes
 * start from them (q50_avx2, q50z). */
RP_AVX2 RP_INLINE __m256i q50_ny(__m256i yv)
{
    const __m256i s =
        _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), yv), _mm256_set1_epi16(1));
    return _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(s, 4));
}

/* A token's per-block d_y as float (zero from nb to nbp) and -16 * (4-element lane sums of y)
 * (exact ints). */
RP_AVX2 static void q50_act_build(const uint8_t *x, size_t nb, size_t nbp, float *dy, __m256i *ny)
{
    for (size_t b = nb; b < nbp; ++b) dy[b] = 0.0f;
    for (size_t b = 0; b < nb; ++b) {
        uint16_t xd;
        memcpy(&xd, x + b * RP_XBLK, 2);
        dy[b] = _cvtsh_ss(xd);
        _mm256_store_si256(ny + b,
                           q50_ny(_mm256_loadu_si256((const __m256i *)(x + b * RP_XBLK + 2))));
    }
}

enum { RP_ACT_BYTES = 640 << 10, RP_STACK_BLOCKS = 1024, RP_Q50_STACK_BLOCKS = 256 };

/* One token's software prefetch distance: the bytes ahead of the block being read (the
 * groups are one linear stream). A burst of prefetches of the whole next group at each
 * group's start (the GEMM's way) stalled the core: 14% of a Qwen2.5-0.5B decode step sat on
 * it. Per block, 8 KiB ahead (3 groups of 896 columns): 17.3-17.6 GB/s of one thread's CPU
 * time against 13.1-13.9 without software prefetch (16 KiB: 16.9-17.1; 0.5-4 KiB less). */
enum { RP_Q50_PF_BYTES = 8192 };

/* Q5_0 on AVX-512 VNNI, any number of tokens: the integer lanes and FMA chains of q50_avx2
 * (vpdpbusd onto -16 * sum(y) makes the same exact lanes) for a group's 4 rows as 2 row
 * pairs in zmm registers, each pair's two 8-lane chains in alternate lanes (lane 2i: row 2p's
 * lane i, 2i + 1: row 2p + 1's), as kernels/dot_ggml.c's Q8_0 tile: the pair's quants
 * interleaved by 4-byte groups (one vpermt2d), each token's quants and -16 x lane sums with
 * every 4-byte group twice (y2, ny2: made once per call), the scales {d_w(2p) d_y, d_w(2p+1)
 * d_y} (the same float products) as one 64-bit broadcast per FMA, the lanes leaving vpdpbusd
 * as floats by TSR_I2F_MAGIC (x86hsum.h; |lane| <= 4 x 16 x 127), and ggml's hsum8 tree for
 * both rows at the end. Every lane is q50_avx2's integer and FMA chain: bit-identical. */
enum { Q50Z_TOK = 8 }; /* tokens a tile at most: 2 x 8 accumulators */
RP_Z512 RP_INLINE void q50z_mk(const int T, size_t nb, size_t nbp, const uint8_t *grp, int nr,
                               const __m512i *y2, const __m512i *ny2, const float *dy2, float *y,
                               size_t ys, size_t pfd)
{
    const uint16_t *d16 = (const uint16_t *)grp;
    const uint8_t *q = grp + TSR_REPACK_ROWS * nbp * 2;
    const __m512i il = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512 kmf = _mm512_set1_ps(TSR_I2F_MAGIC_F);
    __m512 acc[2][Q50Z_TOK];
    double dd[2][Q50Z_TOK][8] __attribute__((aligned(64))); /* float pairs {row 2p, 2p + 1} */
    for (int p = 0; p < 2; ++p)
        for (int t = 0; t < T; ++t) acc[p][t] = _mm512_setzero_ps();
    for (size_t b = 0; b < nb; ++b) {
        if ((b & 7) == 0) {
            _Pragma("GCC unroll 2") for (int p = 0; p < 2; ++p)
            {
                const __m256 da =
                    _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d16 + 2 * p * nbp + b)));
                const __m256 db = _mm256_cvtph_ps(
                    _mm_loadu_si128((const __m128i *)(d16 + (2 * p + 1) * nbp + b)));
                const __m512 sw = _mm512_permutex2var_ps(_mm512_castps256_ps512(da), il,
                                                         _mm512_castps256_ps512(db));
                _Pragma("GCC unroll 8") for (int t = 0; t < T; ++t) _mm512_store_ps(
                    (float *)dd[p][t],
                    _mm512_mul_ps(sw, _mm512_loadu_ps(dy2 + (size_t)t * 2 * nbp + 2 * b)));
            }
        }
        if (pfd) { /* one token: pfd bytes ahead of this block's 4 x 20 quant bytes */
            const char *pf_ = (const char *)(q + b * TSR_REPACK_ROWS * 20) + pfd;
            _mm_prefetch(pf_, _MM_HINT_T0);
            _mm_prefetch(pf_ + 40, _MM_HINT_T0);
        }
        __m512i qu[2];
        _Pragma("GCC unroll 2") for (int p = 0; p < 2; ++p) qu[p] = _mm512_permutex2var_epi32(
            _mm512_castsi256_si512(q5_bytes_vnni(q + (b * TSR_REPACK_ROWS + 2 * p) * 20)), il,
            _mm512_castsi256_si512(q5_bytes_vnni(q + (b * TSR_REPACK_ROWS + 2 * p + 1) * 20)));
        _Pragma("GCC unroll 8") for (int t = 0; t < T; ++t)
        {
            const __m512i yt = _mm512_load_si512(y2 + (size_t)t * nb + b);
            const __m512i nt = _mm512_load_si512(ny2 + (size_t)t * nb + b);
            _Pragma("GCC unroll 2") for (int p = 0; p < 2; ++p) acc[p][t] = _mm512_fmadd_ps(
                _mm512_castpd_ps(_mm512_set1_pd(dd[p][t][b & 7])),
                _mm512_sub_ps(_mm512_castsi512_ps(_mm512_dpbusd_epi32(nt, qu[p], yt)), kmf),
                acc[p][t]);
        }
    }
    /* both rows' hsum8 at once (row 2p in the even lanes, 2p + 1 in the odd) */
    _Pragma("GCC unroll 2") for (int p = 0; p < 2; ++p)
        _Pragma("GCC unroll 8") for (int t = 0; t < T; ++t)
    {
        float v0, v1;
        tsr_hsum8_pair_ps(acc[p][t], &v0, &v1);
        if (2 * p < nr) y[(size_t)t * ys + 2 * p] = v0;
        if (2 * p + 1 < nr) y[(size_t)t * ys + 2 * p + 1] = v1;
    }
}

RP_Z512 static void q50z(int T, size_t nb, size_t nbp, const uint8_t *grp, int nr,
                         const __m512i *y2, const __m512i *ny2, const float *dy2, float *y,
                         size_t ys, size_t pfd)
{
#define Q50Z_CASE(n)                                                                               \
    case n:                                                                                        \
        q50z_mk(n, nb, nbp, grp, nr, y2, ny2, dy2, y, ys, 0);                                      \
        break;
    switch (T) {
    case 1:
        q50z_mk(1, nb, nbp, grp, nr, y2, ny2, dy2, y, ys, pfd);
        break;
        Q50Z_CASE(2)
        Q50Z_CASE(3)
        Q50Z_CASE(4)
        Q50Z_CASE(5)
        Q50Z_CASE(6)
        Q50Z_CASE(7)
    default:
        q50z_mk(8, nb, nbp, grp, nr, y2, ny2, dy2, y, ys, 0);
        break;
    }
#undef Q50Z_CASE
}

/* The driver of q50z: tokens in chunks whose y2 / ny2 / dy2 (2 x 64 bytes + 8 a block) stay
 * in L2; several tokens prefetch the next group into L2 while one runs, one token (decode,
 * its workspace on the stack up to 8192 columns) prefetches RP_Q50_PF_BYTES ahead per block
 * as q50_avx2 does. Returns -1 (nothing done) when the workspace cannot be allocated. */
RP_Z512 static int repack_dot_q50_z512(size_t nb, size_t nbp, size_t gb, const uint8_t *packed,
                                       int64_t n_rows, int32_t n_tok, const uint8_t *x, size_t xs,
                                       float *y, size_t ys)
{
    size_t tc = RP_ACT_BYTES / (nb * 136) / 4 * 4;
    if (tc < 4) tc = 4;
    if (tc > (size_t)n_tok) tc = (size_t)n_tok;
    const size_t n_z = 2 * tc * nb + (tc * 2 * nbp * sizeof(float) + 63) / 64;
    /* one token of a row up to 8192 elements (decode) works on the stack */
    __m512i stack_ws[2 * RP_Q50_STACK_BLOCKS + RP_Q50_STACK_BLOCKS / 32];
    const bool on_stack = n_z <= sizeof stack_ws / sizeof stack_ws[0];
    __m512i *y2 = on_stack ? stack_ws : aligned_alloc(64, n_z * sizeof(__m512i));
    if (!y2) return -1;
    __m512i *ny2 = y2 + tc * nb;
    float *dy2 = (float *)(ny2 + tc * nb);
    const __m512i dup = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i kmi = _mm512_set1_epi32(TSR_I2F_MAGIC_I);
    const int64_t n_groups = (n_rows + TSR_REPACK_ROWS - 1) / TSR_REPACK_ROWS;
    for (size_t t0 = 0; t0 < (size_t)n_tok; t0 += tc) {
        const size_t tcn = (size_t)n_tok - t0 < tc ? (size_t)n_tok - t0 : tc;
        for (size_t t = 0; t < tcn; ++t) {
            const uint8_t *xt = x + (t0 + t) * xs;
            float *d2 = dy2 + t * 2 * nbp;
            for (size_t b = nb; b < nbp; ++b) d2[2 * b] = d2[2 * b + 1] = 0.0f;
            for (size_t b = 0; b < nb; ++b) {
                uint16_t xd;
                memcpy(&xd, xt + b * RP_XBLK, 2);
                d2[2 * b] = d2[2 * b + 1] = _cvtsh_ss(xd);
                const __m256i yv = _mm256_loadu_si256((const __m256i *)(xt + b * RP_XBLK + 2));
                const __m256i ny = q50_ny(yv);
                y2[t * nb + b] = _mm512_permutexvar_epi32(dup, _mm512_castsi256_si512(yv));
                ny2[t * nb + b] = _mm512_add_epi32(
                    _mm512_permutexvar_epi32(dup, _mm512_castsi256_si512(ny)), kmi);
            }
        }
        for (int64_t g = 0; g < n_groups; ++g) {
            const uint8_t *grp = packed + (size_t)g * gb;
            if (n_tok > 1 && g + 1 < n_groups) {
                const char *p = (const char *)(grp + gb);
                for (size_t off = 0; off < gb; off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
            }
            const int64_t left = n_rows - g * TSR_REPACK_ROWS;
            const int nr = left < TSR_REPACK_ROWS ? (int)left : TSR_REPACK_ROWS;
            for (size_t t = 0; t < tcn; t += Q50Z_TOK) {
                const int T = tcn - t < Q50Z_TOK ? (int)(tcn - t) : Q50Z_TOK;
                q50z(T, nb, nbp, grp, nr, y2 + t * nb, ny2 + t * nb, dy2 + t * 2 * nbp,
                     y + (t0 + t) * ys + (size_t)g * TSR_REPACK_ROWS, ys,
                     n_tok == 1 ? RP_Q50_PF_BYTES : 0);
            }
        }
    }
    if (!on_stack) free(y2);
    return 0;
}

/* AVX-512 VNNI: q50z (repack_dot_q50_z512). AVX2: one token 4 rows per pass (4 chains);
 * several: tokens in chunks whose activations stay in L2, 2 x 4 micro-tiles. The workspace
 * holds the chunk's d_y and -16 * lane sums (36 bytes per token and block); without it (or
 * without q50z's), the scalar path (same bits). */
static void repack_dot_q50_simd(bool vnni, size_t nb, size_t nbp, size_t gb, const uint8_t *packed,
                                int64_t n_rows, int32_t n_tok, const uint8_t *x, size_t xs,
                                float *y, size_t ys)
{
    /* AVX-512 VNNI: q50z for every token count (Qwen2.5-Coder-0.5B, 2 threads, interleaved:
     * decode 54.0-56.9 -> 58.4-59.0 tokens/s against the former 256-bit VNNI kernel's 4 rows
     * a pass, prefill 212-248 -> 298-313) */
    if (vnni) {
        if (repack_dot_q50_z512(nb, nbp, gb, packed, n_rows, n_tok, x, xs, y, ys) != 0)
            repack_dot_scalar(TSR_TYPE_Q5_0, nb, nbp, gb, packed, n_rows, n_tok, x, xs, y, ys);
        return;
    }
    const int R = n_tok == 1 ? 4 : 2;
    size_t tc = RP_ACT_BYTES / (nb * RP_XBLK) / 4 * 4;
    if (tc < 4) tc = 4;
    if (tc > (size_t)n_tok) tc = (size_t)n_tok;
    /* one token of a row up to 8192 elements (decode: one call per chunk of rows) works on
     * the stack, not the heap */
    __m256i stack_ws[RP_Q50_STACK_BLOCKS + RP_Q50_STACK_BLOCKS / 8 + 1];
    const bool on_stack =
        tc * nb <= RP_Q50_STACK_BLOCKS && tc * nbp <= 8 * (RP_Q50_STACK_BLOCKS / 8 + 1);
    __m256i *nyw =
        on_stack ? stack_ws
                 : aligned_alloc(32, (tc * nb * sizeof(__m256i) + tc * nbp * sizeof(float) + 31) /
                                         32 * 32);
    if (!nyw) {
        repack_dot_scalar(TSR_TYPE_Q5_0, nb, nbp, gb, packed, n_rows, n_tok, x, xs, y, ys);
        return;
    }
    float *dyw = (float *)(nyw + tc * nb);
    const int64_t n_groups = (n_rows + TSR_REPACK_ROWS - 1) / TSR_REPACK_ROWS;
    for (size_t t0 = 0; t0 < (size_t)n_tok; t0 += tc) {
        const size_t tcn = (size_t)n_tok - t0 < tc ? (size_t)n_tok - t0 : tc;
        for (size_t t = 0; t < tcn; ++t)
            q50_act_build(x + (t0 + t) * xs, nb, nbp, dyw + t * nbp, nyw + t * nb);
        for (int64_t g = 0; g < n_groups; ++g) {
            const uint8_t *grp = packed + (size_t)g * gb;
            if (n_tok > 1 && g + 1 < n_groups) {
                const char *p = (const char *)(grp + gb);
                for (size_t off = 0; off < gb; off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
            }
            for (int rr = 0; rr < TSR_REPACK_ROWS; rr += R) {
                const int64_t left = n_rows - g * TSR_REPACK_ROWS - rr;
                if (left <= 0) break;
                const int nr = left < R ? (int)left : R;
                for (size_t t = 0; t < tcn; t += 4) {
                    const int T = tcn - t < 4 ? (int)(tcn - t) : 4;
                    q50_avx2(T, R, nb, nbp, grp, rr, nr, x + (t0 + t) * xs, xs, dyw + t * nbp,
                             nyw + t * nb,
                             y + (t0 + t) * ys + (size_t)g * TSR_REPACK_ROWS + (size_t)rr, ys,
                             n_tok == 1 ? RP_Q50_PF_BYTES : 0);
                }
            }
        }
    }
    if (!on_stack) free(nyw);
}

typedef void (*gemv_fn)(size_t nb, size_t nbp, const uint8_t *grp, int rr, int nr, const uint8_t *x,
                        const float *dy, const float *ey, float *y);
typedef void (*gemm_fn)(int T, size_t nb, size_t nbp, const uint8_t *grp, int rr, int nr,
                        const uint8_t *x, size_t xs, const float *dy, const float *ey, float *sc,
                        float *y, size_t ys, const char *pf, size_t pf_bytes);

/* The SIMD path: one token through the GEMV, several through the GEMM in token chunks whose
 * activations stay in L2 (the group's weights stream from memory once per chunk). */
static void repack_dot_simd(bool vnni, uint32_t type, size_t nb, size_t nbp, size_t gb,
                            const uint8_t *packed, int64_t n_rows, int32_t n_tok, const uint8_t *x,
                            size_t xs, float *y, size_t ys)
{
    if (type == TSR_TYPE_Q5_0) {
        repack_dot_q50_simd(vnni, nb, nbp, gb, packed, n_rows, n_tok, x, xs, y, ys);
        return;
    }
    const int R = vnni ? 4 : 2;
    /* the offset of the unsigned quants: -16 (Q5_0), none (Q8_0); Q4_0 runs q40_gemm.c */
    const int32_t mult = type == TSR_TYPE_Q5_0 ? 16 : 0;
    gemv_fn gv;
    gemm_fn gm;
    switch (type) {
    case TSR_TYPE_Q5_0:
        gv = vnni ? gemv_q5_0_vnni : gemv_q5_0_avx2;
        gm = vnni ? gemm_q5_0_vnni : gemm_q5_0_avx2;
        break;
    case TSR_TYPE_Q4_1:
        gv = vnni ? gemv_q4_1_vnni : gemv_q4_1_avx2;
        gm = vnni ? gemm_q4_1_vnni : gemm_q4_1_avx2;
        break;
    case TSR_TYPE_Q5_1:
        gv = vnni ? gemv_q5_1_vnni : gemv_q5_1_avx2;
        gm = vnni ? gemm_q5_1_vnni : gemm_q5_1_avx2;
        break;
    default:
        gv = vnni ? gemv_q8_0_vnni : gemv_q8_0_avx2;
        gm = vnni ? gemm_q8_0_vnni : gemm_q8_0_avx2;
        break;
    }
    void (*build)(const uint8_t *, size_t, size_t, int32_t, float *, float *) =
        has_min(type) ? act_build_q8_1 : act_build;
    const int64_t n_groups = (n_rows + TSR_REPACK_ROWS - 1) / TSR_REPACK_ROWS;
    if (n_tok == 1) {
        float stack_buf[2 * RP_STACK_BLOCKS] __attribute__((aligned(32)));
        float *buf = nbp <= RP_STACK_BLOCKS ? stack_buf : malloc(2 * sizeof(float) * nbp);
        if (!buf) {
            repack_dot_scalar(type, nb, nbp, gb, packed, n_rows, 1, x, xs, y, ys);
            return;
        }
        float *dy = buf, *ey = buf + nbp;
        build(x, nb, nbp, mult, dy, ey);
        for (int64_t g = 0; g < n_groups; ++g) {
            const uint8_t *grp = packed + (size_t)g * gb;
            for (int rr = 0; rr < TSR_REPACK_ROWS; rr += R) {
                const int64_t left = n_rows - g * TSR_REPACK_ROWS - rr;
                if (left <= 0) break;
                gv(nb, nbp, grp, rr, left < R ? (int)left : R, x, dy, ey,
                   y + (size_t)g * TSR_REPACK_ROWS + (size_t)rr);
            }
        }
        if (buf != stack_buf) free(buf);
        return;
    }
    /* tokens per chunk: activations within RP_ACT_BYTES, a multiple of 4, balanced */
    size_t tc = RP_ACT_BYTES / (nb * (has_min(type) ? RP_X1BLK : RP_XBLK)) / 4 * 4;
    if (tc < 4) tc = 4;
    const size_t n_chunks = ((size_t)n_tok + tc - 1) / tc;
    tc = ((size_t)n_tok + n_chunks - 1) / n_chunks;
    tc = (tc + 3) / 4 * 4;
    if (tc > (size_t)n_tok) tc = (size_t)n_tok;
    /* workspace: the chunk's dy / ey, a micro-tile's scales [R*4][nbp] */
    const size_t n_fl = 2 * tc * nbp + (size_t)R * 4 * nbp;
    float *buf = aligned_alloc(32, (sizeof(float) * n_fl + 31) / 32 * 32);
    if (!buf) {
        for (int32_t t = 0; t < n_tok; ++t)
            repack_dot_simd(vnni, type, nb, nbp, gb, packed, n_rows, 1, x + (size_t)t * xs, xs,
                            y + (size_t)t * ys, ys);
        return;
    }
    float *dy = buf, *ey = dy + tc * nbp, *sc = ey + tc * nbp;
    for (size_t t0 = 0; t0 < (size_t)n_tok; t0 += tc) {
        const size_t tcn = (size_t)n_tok - t0 < tc ? (size_t)n_tok - t0 : tc;
        for (size_t t = 0; t < tcn; ++t)
            build(x + (t0 + t) * xs, nb, nbp, mult, dy + t * nbp, ey + t * nbp);
        for (int64_t g = 0; g < n_groups; ++g) {
            const uint8_t *grp = packed + (size_t)g * gb;
            /* The next group toward L2 while this one computes, spread over the first
             * micro-tile's blocks: a burst of prefetches at the group's start stalls the core
             * until memory answers (measured: 2-token GEMM 2.5x a GEMV that way, 1.3-1.4x
             * spread), spread they overlap the arithmetic. */
            const char *pf = g + 1 < n_groups ? (const char *)(grp + gb) : NULL;
            for (int rr = 0; rr < TSR_REPACK_ROWS; rr += R) {
                const int64_t left = n_rows - g * TSR_REPACK_ROWS - rr;
                if (left <= 0) break;
                const int nr = left < R ? (int)left : R;
                for (size_t t = 0; t < tcn; t += 4) {
                    const int T = tcn - t < 4 ? (int)(tcn - t) : 4;
                    gm(T, nb, nbp, grp, rr, nr, x + (t0 + t) * xs, xs, dy + t * nbp, ey + t * nbp,
                       sc, y + (t0 + t) * ys + (size_t)g * TSR_REPACK_ROWS + rr, ys, pf,
                       pf ? gb : 0);
                    pf = NULL;
                }
            }
        }
    }
    free(buf);
}

#endif /* TSR_RP_X86 */

/* ---- K-quants: super-blocks of 4 rows side by side ------------------------------------
 * The row dot (quant.c's dot_q4_K_scalar / DEF_DOT_Q4_K) per super-block i: an exact int32
 * sum of sc_g * <q_g, y_g> (8 lanes on SIMD), acc += d * float(sumi) and accm += dmin *
 * float(summ) in one chain each, the end hsum(acc - accm). The GEMM shares a super-block's
 * unpacking (scales, mins, nibbles, the scale shuffles) among 4 tokens. */

typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qs[TSR_QK_K / 2];
} rp_q4_K;

typedef struct {
    float d;
    int8_t qs[TSR_QK_K];
    int16_t bsums[TSR_QK_K / 16];
} rp_q8_K;

typedef struct {
    uint8_t ql[TSR_QK_K / 2];
    uint8_t qh[TSR_QK_K / 4];
    int8_t scales[TSR_QK_K / 16];
    uint16_t d;
} rp_q6_K;

typedef struct {
    uint8_t scales[TSR_QK_K / 16]; /* scale (low 4 bits), min (high 4) per 16 elements */
    uint8_t qs[TSR_QK_K / 4];
    uint16_t d, dmin;
} rp_q2_K;

typedef struct {
    uint8_t hmask[TSR_QK_K / 8];
    uint8_t qs[TSR_QK_K / 4];
    uint8_t scales[12];
    uint16_t d;
} rp_q3_K;

typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qh[TSR_QK_K / 8];
    uint8_t qs[TSR_QK_K / 2];
} rp_q5_K;

_Static_assert(sizeof(rp_q2_K) == 84, "Q2_K block");
_Static_assert(sizeof(rp_q3_K) == 110, "Q3_K block");
_Static_assert(sizeof(rp_q5_K) == 176, "Q5_K block");
_Static_assert(sizeof(rp_q6_K) == 210, "Q6_K block");
_Static_assert(sizeof(rp_q4_K) == 144, "Q4_K block");
_Static_assert(sizeof(rp_q8_K) == 292, "Q8_K block");

#define RP_KB(grp, i, r) ((const rp_q4_K *)(grp) + (size_t)(i)*TSR_REPACK_ROWS + (size_t)(r))
#define RP_K6(grp, i, r) ((const rp_q6_K *)(grp) + (size_t)(i)*TSR_REPACK_ROWS + (size_t)(r))
/* super-block i of group row r, for any K-quant block struct */
#define RP_KX(BLK, grp, i, r) ((const BLK *)(grp) + (size_t)(i)*TSR_REPACK_ROWS + (size_t)(r))

/* quant.c's dot_q4_K_scalar (ggml's repacked GEMV order) */
static float dot_q4_K_scalar(size_t nsb, const uint8_t *grp, int r, const rp_q8_K *x)
{
    float sumf = 0, summf = 0;
    for (size_t i = 0; i < nsb; ++i) {
        const rp_q4_K *w = RP_KB(grp, i, r);
        uint8_t sm[16];
        tsr_q4_K_scales_mins(w->scales, sm);
        int32_t sumi = 0, summ = 0;
        for (int g = 0; g < 8; ++g) {
            const uint8_t *q = w->qs + 32 * (g / 2);
            const int shift = (g & 1) * 4;
            const int8_t *y = x[i].qs + 32 * g;
            int32_t sg = 0;
            for (int l = 0; l < 32; ++l) sg += ((q[l] >> shift) & 0xF) * y[l];
            sumi += sm[g] * sg;
            summ += sm[8 + g] * (x[i].bsums[2 * g] + x[i].bsums[2 * g + 1]);
        }
        sumf = fmaf((float)sumi, tsr_f16_to_f32(w->d) * x[i].d, sumf);
        summf = fmaf((float)summ, tsr_f16_to_f32(w->dmin) * x[i].d, summf);
    }
    return sumf - summf;
}

/* quant.c's dot_q6_K_scalar (ggml_vec_dot_q6_K_q8_K's lanes) */
static float dot_q6_K_scalar(size_t nsb, const uint8_t *grp, int r, const rp_q8_K *x)
{
    float acc[8] = {0};
    for (size_t i = 0; i < nsb; ++i) {
        const rp_q6_K *w = RP_K6(grp, i, r);
        uint8_t q[TSR_QK_K];
        for (int half = 0; half < 2; ++half) {
            const uint8_t *ql = w->ql + 64 * half, *qh = w->qh + 32 * half;
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
            lane[k] = -32 * (w->scales[2 * k] * x[i].bsums[2 * k] +
                             w->scales[2 * k + 1] * x[i].bsums[2 * k + 1]);
        for (int e = 0; e < TSR_QK_K; ++e)
            lane[(e % 32) / 4] += w->scales[e / 16] * q[e] * x[i].qs[e];
        const float d = x[i].d * tsr_f16_to_f32(w->d);
        for (int k = 0; k < 8; ++k) acc[k] = fmaf((float)lane[k], d, acc[k]);
    }
    return tsr_ggml_hsum8(acc);
}

/* quant.c's dot_q5_K_scalar: Q4_K's with the 5th bit of element l of group g from bit g
 * of qh[l]. */
static float dot_q5_K_scalar(size_t nsb, const uint8_t *grp, int r, const rp_q8_K *x)
{
    float s = 0;
    for (size_t i = 0; i < nsb; ++i) {
        const rp_q5_K *w = RP_KX(rp_q5_K, grp, i, r);
        uint8_t sm[16];
        tsr_q4_K_scales_mins(w->scales, sm);
        int32_t sumi = 0, summ = 0;
        for (int g = 0; g < 8; ++g) {
            const uint8_t *q = w->qs + 32 * (g / 2);
            const int shift = (g & 1) * 4;
            const int8_t *y = x[i].qs + 32 * g;
            int32_t sg = 0;
            for (int l = 0; l < 32; ++l)
                sg += (((q[l] >> shift) & 0xF) | (((w->qh[l] >> g) & 1) << 4)) * y[l];
            sumi += sm[g] * sg;
            summ += sm[8 + g] * (x[i].bsums[2 * g] + x[i].bsums[2 * g + 1]);
        }
        s += tsr_f16_to_f32(w->d) * x[i].d * (float)sumi -
             tsr_f16_to_f32(w->dmin) * x[i].d * (float)summ;
    }
    return s;
}

/* quant.c's dot_q2_K_scalar: 16 groups of 16, 4-bit scale and min per group. */
static float dot_q2_K_scalar(size_t nsb, const uint8_t *grp, int r, const rp_q8_K *x)
{
    float s = 0;
    for (size_t i = 0; i < nsb; ++i) {
        const rp_q2_K *w = RP_KX(rp_q2_K, grp, i, r);
        int32_t sumi = 0, summ = 0;
        for (int g = 0; g < 16; ++g) {
            const uint8_t *q = w->qs + 32 * (g / 8) + 16 * (g % 2);
            const int shift = 2 * ((g / 2) % 4);
            const int8_t *y = x[i].qs + 16 * g;
            int32_t sg = 0;
            for (int l = 0; l < 16; ++l) sg += ((q[l] >> shift) & 3) * y[l];
            sumi += (w->scales[g] & 0xF) * sg;
            summ += (w->scales[g] >> 4) * x[i].bsums[g];
        }
        s += x[i].d * tsr_f16_to_f32(w->d) * (float)sumi -
             x[i].d * tsr_f16_to_f32(w->dmin) * (float)summ;
    }
    return s;
}

/* quant.c's q3_K_scales: 16 6-bit scales, offset 32 removed. */
static inline void q3_K_sc(const uint8_t packed[12], int8_t out[16])
{
    for (int j = 0; j < 16; ++j) {
        const int lo = j < 8 ? packed[j] & 0xF : packed[j - 8] >> 4;
        const int hi = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
        out[j] = (int8_t)((lo | (hi << 4)) - 32);
    }
}

/* quant.c's dot_q3_K_scalar */
static float dot_q3_K_scalar(size_t nsb, const uint8_t *grp, int r, const rp_q8_K *x)
{
    float s = 0;
    for (size_t i = 0; i < nsb; ++i) {
        const rp_q3_K *w = RP_KX(rp_q3_K, grp, i, r);
        int8_t sc[16];
        q3_K_sc(w->scales, sc);
        int32_t sumi = 0;
        for (int g = 0; g < 16; ++g) {
            const int off = 32 * (g / 8) + 16 * (g % 2);
            const int shift = 2 * ((g / 2) % 4);
            const int hbit = g / 2;
            const int8_t *y = x[i].qs + 16 * g;
            int32_t sg = 0;
            for (int l = 0; l < 16; ++l) {
                const int h = (w->hmask[16 * (g % 2) + l] >> hbit) & 1;
                sg += (((w->qs[off + l] >> shift) & 3) - (h ? 0 : 4)) * y[l];
            }
            sumi += sc[g] * sg;
        }
        s += tsr_f16_to_f32(w->d) * x[i].d * (float)sumi;
    }
    return s;
}

static float dot_k_scalar(uint32_t type, size_t nsb, const uint8_t *grp, int r, const rp_q8_K *x)
{
    switch (type) {
    case TSR_TYPE_Q2_K:
        return dot_q2_K_scalar(nsb, grp, r, x);
    case TSR_TYPE_Q3_K:
        return dot_q3_K_scalar(nsb, grp, r, x);
    case TSR_TYPE_Q5_K:
        return dot_q5_K_scalar(nsb, grp, r, x);
    case TSR_TYPE_Q6_K:
        return dot_q6_K_scalar(nsb, grp, r, x);
    default:
        return dot_q4_K_scalar(nsb, grp, r, x);
    }
}

static void repack_dot_k_scalar(uint32_t type, size_t nsb, size_t gb, const uint8_t *packed,
                                int64_t n_rows, int32_t n_tok, const uint8_t *x, size_t xs,
                                float *y, size_t ys)
{
    for (int64_t r = 0; r < n_rows; ++r) {
        const uint8_t *grp = packed + (size_t)(r / TSR_REPACK_ROWS) * gb;
        const int rr = (int)(r % TSR_REPACK_ROWS);
        for (int32_t t = 0; t < n_tok; ++t) {
            const rp_q8_K *xt = (const rp_q8_K *)(x + (size_t)t * xs);
            y[(size_t)t * ys + (size_t)r] = dot_k_scalar(type, nsb, grp, rr, xt);
        }
    }
}

#if TSR_RP_X86

#include "kernels/x86kquant.h"

/* The exact sum of 8 int32 lanes. */
RP_AVX2 RP_INLINE int32_t rp_hsum_epi32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_cvtsi128_si32(s);
}

#define RP_SACC_AVX2(acc, p16, s16) _mm256_add_epi32(acc, _mm256_madd_epi16(p16, s16))
#define RP_SACC_VNNI(acc, p16, s16) _mm256_dpwssd_epi32(acc, p16, s16)

/* One row (group row r) x T tokens (T <= 4, a constant after inlining): each super-block
 * unpacked once, then per token the row dot's operations. */
/* 4 rows' int32 lane vectors -> their 4 exact sums, row r in lane r. */
RP_AVX2 RP_INLINE __m128i rp_hsum4_epi32(__m256i s0, __m256i s1, __m256i s2, __m256i s3)
{
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(s0, s1), _mm256_hadd_epi32(s2, s3));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* Q4_K: the group's 4 rows x T tokens (T <= 4, a constant after inlining), ggml's repacked
 * GEMV order (quant.c's DEF_DOT_Q4_K): per super-block and row the exact int32 lanes of
 * sum_g sc_g*<q_g, y_g> and of sum_g m_g*bsum_g, reduced to one int per row with the 4 rows
 * side by side (row r in lane r), then per token one 4-lane FMA for the 4 rows' scale chains
 * and one for their min chains: lane r is exactly the row dot's scalar fma. */
#define DEF_K4(fname, ATTR, SACC)                                                                  \
    ATTR RP_INLINE void fname##_mk(const int T, size_t nsb, const uint8_t *grp, int nr,            \
                                   const uint8_t *x, size_t xs, float *y, size_t ys)               \
    {                                                                                              \
        const __m256i m4 = _mm256_set1_epi8(0x0F);                                                 \
        __m128 acc[4], accm[4];                                                                    \
        const rp_q8_K *xt[4];                                                                      \
        for (int t = 0; t < T; ++t) {                                                              \
            acc[t] = accm[t] = _mm_setzero_ps();                                                   \
            xt[t] = (const rp_q8_K *)(x + (size_t)t * xs);                                         \
        }                                                                                          \
        for (size_t i = 0; i < nsb; ++i) {                                                         \
            __m256i sumi[4][4], summ[4][4]; /* [row][token] */                                     \
            uint16_t dh[4], dmh[4];                                                                \
            _Pragma("GCC unroll 4") for (int r = 0; r < TSR_REPACK_ROWS; ++r)                      \
            {                                                                                      \
                const rp_q4_K *w = RP_KB(grp, i, r);                                               \
                dh[r] = w->d;                                                                      \
                dmh[r] = w->dmin;                                                                  \
                const __m256i sm16 = tsr_q4_K_sm_x16(w->scales);                                   \
                const __m256i sc = _mm256_permute2x128_si256(sm16, sm16, 0x00);                    \
                const __m256i mins2 =                                                              \
                    _mm256_shuffle_epi8(_mm256_permute2x128_si256(sm16, sm16, 0x11),               \
                                        _mm256_load_si256((const __m256i *)tsr_k_dup16));          \
                _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                                \
                {                                                                                  \
                    summ[r][t] = _mm256_madd_epi16(                                                \
                        mins2, _mm256_loadu_si256((const __m256i *)xt[t][i].bsums));               \
                    sumi[r][t] = _mm256_setzero_si256();                                           \
                }                                                                                  \
                _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j)                                \
                {                                                                                  \
                    const __m256i q4 = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * j));      \
                    const __m256i ql = _mm256_and_si256(q4, m4);                                   \
                    const __m256i qh = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);             \
                    const __m256i scl = _mm256_shuffle_epi8(                                       \
                        sc, _mm256_load_si256((const __m256i *)tsr_k_shuf_q4_K[2 * j]));           \
                    const __m256i sch = _mm256_shuffle_epi8(                                       \
                        sc, _mm256_load_si256((const __m256i *)tsr_k_shuf_q4_K[2 * j + 1]));       \
                    _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                            \
                    {                                                                              \
                        const __m256i yl =                                                         \
                            _mm256_loadu_si256((const __m256i *)(xt[t][i].qs + 64 * j));           \
                        const __m256i yh =                                                         \
                            _mm256_loadu_si256((const __m256i *)(xt[t][i].qs + 64 * j + 32));      \
                        sumi[r][t] = SACC(sumi[r][t], _mm256_maddubs_epi16(ql, yl), scl);          \
                        sumi[r][t] = SACC(sumi[r][t], _mm256_maddubs_epi16(qh, yh), sch);          \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
            uint64_t d64, dm64;                                                                    \
            memcpy(&d64, dh, 8);                                                                   \
            memcpy(&dm64, dmh, 8);                                                                 \
            const __m128 wd = _mm_cvtph_ps(_mm_cvtsi64_si128((long long)d64));                     \
            const __m128 wdmin = _mm_cvtph_ps(_mm_cvtsi64_si128((long long)dm64));                 \
            _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                                    \
            {                                                                                      \
                const __m128 dy = _mm_set1_ps(xt[t][i].d);                                         \
                const __m128i is = rp_hsum4_epi32(sumi[0][t], sumi[1][t], sumi[2][t], sumi[3][t]); \
                const __m128i im = rp_hsum4_epi32(summ[0][t], summ[1][t], summ[2][t], summ[3][t]); \
                acc[t] = _mm_fmadd_ps(_mm_cvtepi32_ps(is), _mm_mul_ps(wd, dy), acc[t]);            \
                accm[t] = _mm_fmadd_ps(_mm_cvtepi32_ps(im), _mm_mul_ps(wdmin, dy), accm[t]);       \
            }                                                                                      \
        }                                                                                          \
        for (int t = 0; t < T; ++t) {                                                              \
            float o[4];                                                                            \
            _mm_storeu_ps(o, _mm_sub_ps(acc[t], accm[t]));                                         \
            for (int r = 0; r < nr; ++r) y[(size_t)t * ys + (size_t)r] = o[r];                     \
        }                                                                                          \
    }                                                                                              \
    RP_DEF_T_SWITCH(fname, ATTR, RP_K_PARAMS, RP_K_ARGS)

/* Q6_K (quant.c's DEF_DOT_Q6_K): the -32 offset as -32 * sum_g sc_g * bsum_g per token, the
 * 6-bit quants built once per super-block half for T tokens. */
#define DEF_K6(fname, ATTR, SACC)                                                                  \
    ATTR RP_INLINE void fname##_mk(const int T, size_t nsb, const uint8_t *grp, int r,             \
                                   const uint8_t *x, size_t xs, float *y, size_t ys)               \
    {                                                                                              \
        const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);                       \
        __m256 acc[4];                                                                             \
        const rp_q8_K *xt[4];                                                                      \
        for (int t = 0; t < T; ++t) {                                                              \
            acc[t] = _mm256_setzero_ps();                                                          \
            xt[t] = (const rp_q8_K *)(x + (size_t)t * xs);                                         \
        }                                                                                          \
        for (size_t i = 0; i < nsb; ++i) {                                                         \
            const rp_q6_K *w = RP_K6(grp, i, r);                                                   \
            const float wd = _cvtsh_ss(w->d);                                                      \
            const __m256i sc16 =                                                                   \
                _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w->scales));                 \
            __m256i sumi[4];                                                                       \
            _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                                    \
            {                                                                                      \
                const __m256i bs = _mm256_loadu_si256((const __m256i *)xt[t][i].bsums);            \
                sumi[t] = _mm256_sub_epi32(_mm256_setzero_si256(),                                 \
                                           _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5));     \
            }                                                                                      \
            _Pragma("GCC unroll 2") for (int h = 0; h < 2; ++h)                                    \
            {                                                                                      \
                const __m256i sch = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11)                \
                                      : _mm256_permute2x128_si256(sc16, sc16, 0x00);               \
                const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * h));         \
                const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * h + 32));    \
                const __m256i qhv = _mm256_loadu_si256((const __m256i *)(w->qh + 32 * h));         \
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
                    const __m256i s = _mm256_shuffle_epi8(                                         \
                        sch, _mm256_load_si256((const __m256i *)tsr_k_shuf_q6_K[k]));              \
                    _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                            \
                    {                                                                              \
                        const __m256i yk =                                                         \
                            _mm256_loadu_si256((const __m256i *)(xt[t][i].qs + 128 * h + 32 * k)); \
                        sumi[t] = SACC(sumi[t], _mm256_maddubs_epi16(q[k], yk), s);                \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
            _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                                    \
            {                                                                                      \
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(xt[t][i].d * wd),                          \
                                         _mm256_cvtepi32_ps(sumi[t]), acc[t]);                     \
            }                                                                                      \
        }                                                                                          \
        for (int t = 0; t < T; ++t) y[(size_t)t * ys] = tsr_hsum8_ps(acc[t]);                      \
    }                                                                                              \
    RP_DEF_T_SWITCH(fname, ATTR, RP_K_PARAMS, RP_K_ARGS)

/* Q5_K (quant.c's DEF_DOT_Q5_K): Q4_K's kernel with the 5th bits from qh. */
#define DEF_K5(fname, ATTR, SACC)                                                                  \
    ATTR RP_INLINE void fname##_mk(const int T, size_t nsb, const uint8_t *grp, int r,             \
                                   const uint8_t *x, size_t xs, float *y, size_t ys)               \
    {                                                                                              \
        const __m256i m4 = _mm256_set1_epi8(0x0F), m16 = _mm256_set1_epi8(0x10);                   \
        __m256 acc[4], accm[4];                                                                    \
        const rp_q8_K *xt[4];                                                                      \
        for (int t = 0; t < T; ++t) {                                                              \
            acc[t] = accm[t] = _mm256_setzero_ps();                                                \
            xt[t] = (const rp_q8_K *)(x + (size_t)t * xs);                                         \
        }                                                                                          \
        for (size_t i = 0; i < nsb; ++i) {                                                         \
            const rp_q5_K *w = RP_KX(rp_q5_K, grp, i, r);                                          \
            const float wd = _cvtsh_ss(w->d), wdmin = _cvtsh_ss(w->dmin);                          \
            const __m256i sm16 = tsr_q4_K_sm_x16(w->scales);                                       \
            const __m256i sc = _mm256_permute2x128_si256(sm16, sm16, 0x00);                        \
            const __m256i mins2 =                                                                  \
                _mm256_shuffle_epi8(_mm256_permute2x128_si256(sm16, sm16, 0x11),                   \
                                    _mm256_load_si256((const __m256i *)tsr_k_dup16));              \
            __m256i sumi[4];                                                                       \
            _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                                    \
            {                                                                                      \
                const __m256i summ =                                                               \
                    _mm256_madd_epi16(mins2, _mm256_loadu_si256((const __m256i *)xt[t][i].bsums)); \
                accm[t] = _mm256_fmadd_ps(_mm256_set1_ps(xt[t][i].d * wdmin),                      \
                                          _mm256_cvtepi32_ps(summ), accm[t]);                      \
                sumi[t] = _mm256_setzero_si256();                                                  \
            }                                                                                      \
            const __m256i hv = _mm256_loadu_si256((const __m256i *)w->qh);                         \
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j)                                    \
            {                                                                                      \
                const __m256i q4 = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * j));          \
                const __m256i hl =                                                                 \
                    _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(hv, 2 * j), 4), m16);     \
                const __m256i hh =                                                                 \
                    _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(hv, 2 * j + 1), 4), m16); \
                const __m256i ql = _mm256_or_si256(_mm256_and_si256(q4, m4), hl);                  \
                const __m256i qh =                                                                 \
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4, 4), m4), hh);           \
                const __m256i scl = _mm256_shuffle_epi8(                                           \
                    sc, _mm256_load_si256((const __m256i *)tsr_k_shuf_q4_K[2 * j]));               \
                const __m256i sch = _mm256_shuffle_epi8(                                           \
                    sc, _mm256_load_si256((const __m256i *)tsr_k_shuf_q4_K[2 * j + 1]));           \
                _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                                \
                {                                                                                  \
                    const __m256i yl =                                                             \
                        _mm256_loadu_si256((const __m256i *)(xt[t][i].qs + 64 * j));               \
                    const __m256i yh =                                                             \
                        _mm256_loadu_si256((const __m256i *)(xt[t][i].qs + 64 * j + 32));          \
                    sumi[t] = SACC(sumi[t], _mm256_maddubs_epi16(ql, yl), scl);                    \
                    sumi[t] = SACC(sumi[t], _mm256_maddubs_epi16(qh, yh), sch);                    \
                }                                                                                  \
            }                                                                                      \
            _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                                    \
            {                                                                                      \
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(xt[t][i].d * wd),                          \
                                         _mm256_cvtepi32_ps(sumi[t]), acc[t]);                     \
            }                                                                                      \
        }                                                                                          \
        for (int t = 0; t < T; ++t)                                                                \
            y[(size_t)t * ys] = tsr_hsum8_ps(_mm256_sub_ps(acc[t], accm[t]));                      \
    }                                                                                              \
    RP_DEF_T_SWITCH(fname, ATTR, RP_K_PARAMS, RP_K_ARGS)

/* Q3_K (quant.c's DEF_DOT_Q3_K): u = q2 | hbit << 2 (the quant + 4) against y, the -4 as
 * -4 * sum_g sc_g * bsum_g per token. */
#define DEF_K3(fname, ATTR, SACC)                                                                  \
    ATTR RP_INLINE void fname##_mk(const int T, size_t nsb, const uint8_t *grp, int r,             \
                                   const uint8_t *x, size_t xs, float *y, size_t ys)               \
    {                                                                                              \
        const __m256i m3 = _mm256_set1_epi8(3), m1 = _mm256_set1_epi8(1);                          \
        __m256 acc[4];                                                                             \
        const rp_q8_K *xt[4];                                                                      \
        for (int t = 0; t < T; ++t) {                                                              \
            acc[t] = _mm256_setzero_ps();                                                          \
            xt[t] = (const rp_q8_K *)(x + (size_t)t * xs);                                         \
        }                                                                                          \
        for (size_t i = 0; i < nsb; ++i) {                                                         \
            const rp_q3_K *w = RP_KX(rp_q3_K, grp, i, r);                                          \
            const float wd = _cvtsh_ss(w->d);                                                      \
            const __m256i sc16 = tsr_q3_K_sc_x16(w->scales);                                       \
            __m256i sumi[4];                                                                       \
            _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                                    \
            {                                                                                      \
                const __m256i bs = _mm256_loadu_si256((const __m256i *)xt[t][i].bsums);            \
                sumi[t] = _mm256_sub_epi32(_mm256_setzero_si256(),                                 \
                                           _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 2));     \
            }                                                                                      \
            const __m256i hv = _mm256_loadu_si256((const __m256i *)w->hmask);                      \
            _Pragma("GCC unroll 2") for (int h = 0; h < 2; ++h)                                    \
            {                                                                                      \
                const __m256i sch = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11)                \
                                      : _mm256_permute2x128_si256(sc16, sc16, 0x00);               \
                const __m256i qv = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * h));          \
                _Pragma("GCC unroll 4") for (int k = 0; k < 4; ++k)                                \
                {                                                                                  \
                    const __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(qv, 2 * k), m3);         \
                    const __m256i hb = _mm256_and_si256(_mm256_srli_epi16(hv, 4 * h + k), m1);     \
                    const __m256i u = _mm256_or_si256(q2, _mm256_slli_epi16(hb, 2));               \
                    const __m256i s = _mm256_shuffle_epi8(                                         \
                        sch, _mm256_load_si256((const __m256i *)tsr_k_shuf_q6_K[k]));              \
                    _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                            \
                    {                                                                              \
                        const __m256i yk =                                                         \
                            _mm256_loadu_si256((const __m256i *)(xt[t][i].qs + 128 * h + 32 * k)); \
                        sumi[t] = SACC(sumi[t], _mm256_maddubs_epi16(u, yk), s);                   \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
            _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                                    \
            {                                                                                      \
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(xt[t][i].d * wd),                          \
                                         _mm256_cvtepi32_ps(sumi[t]), acc[t]);                     \
            }                                                                                      \
        }                                                                                          \
        for (int t = 0; t < T; ++t) y[(size_t)t * ys] = tsr_hsum8_ps(acc[t]);                      \
    }                                                                                              \
    RP_DEF_T_SWITCH(fname, ATTR, RP_K_PARAMS, RP_K_ARGS)

/* Q2_K (quant.c's DEF_DOT_Q2_K): Q3_K's layout without the high bit, 4-bit scales and mins
 * per 16 elements, the mins term from the bsums as Q4_K's. */
#define DEF_K2(fname, ATTR, SACC)                                                                  \
    ATTR RP_INLINE void fname##_mk(const int T, size_t nsb, const uint8_t *grp, int r,             \
                                   const uint8_t *x, size_t xs, float *y, size_t ys)               \
    {                                                                                              \
        const __m256i m3 = _mm256_set1_epi8(3);                                                    \
        const __m128i m4 = _mm_set1_epi8(0x0F);                                                    \
        __m256 acc[4], accm[4];                                                                    \
        const rp_q8_K *xt[4];                                                                      \
        for (int t = 0; t < T; ++t) {                                                              \
            acc[t] = accm[t] = _mm256_setzero_ps();                                                \
            xt[t] = (const rp_q8_K *)(x + (size_t)t * xs);                                         \
        }                                                                                          \
        for (size_t i = 0; i < nsb; ++i) {                                                         \
            const rp_q2_K *w = RP_KX(rp_q2_K, grp, i, r);                                          \
            const float wd = _cvtsh_ss(w->d), wdmin = _cvtsh_ss(w->dmin);                          \
            const __m128i raw = _mm_loadu_si128((const __m128i *)w->scales);                       \
            const __m256i sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(raw, m4));                     \
            const __m256i mn16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), m4));  \
            __m256i sumi[4];                                                                       \
            _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                                    \
            {                                                                                      \
                const __m256i summ =                                                               \
                    _mm256_madd_epi16(mn16, _mm256_loadu_si256((const __m256i *)xt[t][i].bsums));  \
                accm[t] = _mm256_fmadd_ps(_mm256_set1_ps(xt[t][i].d * wdmin),                      \
                                          _mm256_cvtepi32_ps(summ), accm[t]);                      \
                sumi[t] = _mm256_setzero_si256();                                                  \
            }                                                                                      \
            _Pragma("GCC unroll 2") for (int h = 0; h < 2; ++h)                                    \
            {                                                                                      \
                const __m256i sch = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11)                \
                                      : _mm256_permute2x128_si256(sc16, sc16, 0x00);               \
                const __m256i qv = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * h));          \
                _Pragma("GCC unroll 4") for (int k = 0; k < 4; ++k)                                \
                {                                                                                  \
                    const __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(qv, 2 * k), m3);         \
                    const __m256i s = _mm256_shuffle_epi8(                                         \
                        sch, _mm256_load_si256((const __m256i *)tsr_k_shuf_q6_K[k]));              \
                    _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                            \
                    {                                                                              \
                        const __m256i yk =                                                         \
                            _mm256_loadu_si256((const __m256i *)(xt[t][i].qs + 128 * h + 32 * k)); \
                        sumi[t] = SACC(sumi[t], _mm256_maddubs_epi16(q2, yk), s);                  \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
            _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)                                    \
            {                                                                                      \
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(xt[t][i].d * wd),                          \
                                         _mm256_cvtepi32_ps(sumi[t]), acc[t]);                     \
            }                                                                                      \
        }                                                                                          \
        for (int t = 0; t < T; ++t)                                                                \
            y[(size_t)t * ys] = tsr_hsum8_ps(_mm256_sub_ps(acc[t], accm[t]));                      \
    }                                                                                              \
    RP_DEF_T_SWITCH(fname, ATTR, RP_K_PARAMS, RP_K_ARGS)

/* clang-format off */
DEF_K2(k2_avx2, RP_AVX2, RP_SACC_AVX2)
DEF_K2(k2_vnni, RP_VNNI, RP_SACC_VNNI)
DEF_K3(k3_avx2, RP_AVX2, RP_SACC_AVX2)
DEF_K3(k3_vnni, RP_VNNI, RP_SACC_VNNI)
DEF_K5(k5_avx2, RP_AVX2, RP_SACC_AVX2)
DEF_K5(k5_vnni, RP_VNNI, RP_SACC_VNNI)
/* clang-format on */

/* clang-format off */
DEF_K6(k6_avx2, RP_AVX2, RP_SACC_AVX2)
DEF_K6(k6_vnni, RP_VNNI, RP_SACC_VNNI)
/* clang-format on */

/* Q6_K on AVX-512 VNNI, two rows of a group (r, r + 1) x T tokens: k6_vnni's operations on
 * both rows at once, row r in the low 256 bits of every zmm and row r + 1 in the high 256
 * (each token's quants broadcast to both halves). Every integer op is lane-local, so each
 * half's lanes are k6_vnni's for its row bit for bit, and the float steps (one FMA per
 * super-block with fp16(d_x) * fp16(d_w), ggml's hsum8 per half) are the same. On Intel the
 * 512-bit vpmaddubsw / vpdpwssd do twice the lanes of the 256-bit ones at the same issue rate
 * (bench_q4k_gemm's Q4_K_M model prefill: ffn_down's Q6_K was a fifth of it). */
RP_Z512 RP_INLINE __m512i rp_z_pair256(const uint8_t *a, const uint8_t *b)
{
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                              _mm256_loadu_si256((const __m256i *)b), 1);
}
RP_Z512 RP_INLINE void k6_z512_mk(const int T, size_t nsb, const uint8_t *grp, int r,
                                  const uint8_t *x, size_t xs, float *y, size_t ys)
{
    const __m512i m4 = _mm512_set1_epi8(0x0F), m2 = _mm512_set1_epi8(3);
    __m512 acc[4];
    const rp_q8_K *xt[4];
    for (int t = 0; t < T; ++t) {
        acc[t] = _mm512_setzero_ps();
        xt[t] = (const rp_q8_K *)(x + (size_t)t * xs);
    }
    __m512i shuf[4];
    for (int k = 0; k < 4; ++k)
        shuf[k] = _mm512_broadcast_i64x4(_mm256_load_si256((const __m256i *)tsr_k_shuf_q6_K[k]));
    for (size_t i = 0; i < nsb; ++i) {
        const rp_q6_K *wa = RP_K6(grp, i, r), *wb = RP_K6(grp, i, r + 1);
        const float da = _cvtsh_ss(wa->d), db = _cvtsh_ss(wb->d);
        const __m512i sc16 = _mm512_inserti64x4(
            _mm512_castsi256_si512(
                _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wa->scales))),
            _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wb->scales)), 1);
        __m512i sumi[4];
        _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)
        {
            const __m512i bs =
                _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)xt[t][i].bsums));
            sumi[t] = _mm512_sub_epi32(_mm512_setzero_si512(),
                                       _mm512_slli_epi32(_mm512_madd_epi16(sc16, bs), 5));
        }
        _Pragma("GCC unroll 2") for (int h = 0; h < 2; ++h)
        {
            /* each half: its row's scales 0-7 (h = 0) or 8-15 in both 128-bit lanes */
            const __m512i sch =
                h ? _mm512_shuffle_i64x2(sc16, sc16, 0xF5) : _mm512_shuffle_i64x2(sc16, sc16, 0xA0);
            const __m512i ql0 = rp_z_pair256(wa->ql + 64 * h, wb->ql + 64 * h);
            const __m512i ql1 = rp_z_pair256(wa->ql + 64 * h + 32, wb->ql + 64 * h + 32);
            const __m512i qhv = rp_z_pair256(wa->qh + 32 * h, wb->qh + 32 * h);
            __m512i q[4];
            q[0] = _mm512_or_si512(_mm512_and_si512(ql0, m4),
                                   _mm512_slli_epi16(_mm512_and_si512(qhv, m2), 4));
            q[1] = _mm512_or_si512(
                _mm512_and_si512(ql1, m4),
                _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(qhv, 2), m2), 4));
            q[2] = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16(ql0, 4), m4),
                _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(qhv, 4), m2), 4));
            q[3] = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16(ql1, 4), m4),
                _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(qhv, 6), m2), 4));
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; ++k)
            {
                const __m512i sk = _mm512_shuffle_epi8(sch, shuf[k]);
                _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)
                {
                    const __m512i yk = _mm512_broadcast_i64x4(
                        _mm256_loadu_si256((const __m256i *)(xt[t][i].qs + 128 * h + 32 * k)));
                    sumi[t] = _mm512_dpwssd_epi32(sumi[t], _mm512_maddubs_epi16(q[k], yk), sk);
                }
            }
        }
        _Pragma("GCC unroll 4") for (int t = 0; t < T; ++t)
        {
            const __m512 d2 = _mm512_castpd_ps(
                _mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(xt[t][i].d * da)),
                                   _mm256_castps_pd(_mm256_set1_ps(xt[t][i].d * db)), 1));
            acc[t] = _mm512_fmadd_ps(d2, _mm512_cvtepi32_ps(sumi[t]), acc[t]);
        }
    }
    for (int t = 0; t < T; ++t) {
        y[(size_t)t * ys] = tsr_hsum8_ps(_mm512_castps512_ps256(acc[t]));
        y[(size_t)t * ys + 1] =
            tsr_hsum8_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[t]), 1)));
    }
}
RP_DEF_T_SWITCH(k6_z512, RP_Z512, RP_K_PARAMS, RP_K_ARGS)

/* clang-format off */
DEF_K4(k4_avx2, RP_AVX2, RP_SACC_AVX2)
DEF_K4(k4_vnni, RP_VNNI, RP_SACC_VNNI)
/* clang-format on */

typedef void (*k4_fn)(int T, size_t nsb, const uint8_t *grp, int r, const uint8_t *x, size_t xs,
                      float *y, size_t ys);

/* Tokens in micro-tiles of 4, in chunks whose activations stay in L2; the group's rows one
 * by one (a group's super-blocks, 4 x 144 bytes each, stay in L1 across its 4 rows' passes
 * only partly; they are re-read from L2). */
static void repack_dot_k_simd(bool vnni, uint32_t type, size_t nsb, size_t gb,
                              const uint8_t *packed, int64_t n_rows, int32_t n_tok,
                              const uint8_t *x, size_t xs, float *y, size_t ys)
{
    k4_fn f;
    switch (type) {
    case TSR_TYPE_Q2_K:
        f = vnni ? k2_vnni : k2_avx2;
        break;
    case TSR_TYPE_Q3_K:
        f = vnni ? k3_vnni : k3_avx2;
        break;
    case TSR_TYPE_Q5_K:
        f = vnni ? k5_vnni : k5_avx2;
        break;
    case TSR_TYPE_Q6_K:
        f = vnni ? k6_vnni : k6_avx2;
        break;
    default:
        f = vnni ? k4_vnni : k4_avx2;
        break;
    }
    const bool z6 = vnni && type == TSR_TYPE_Q6_K;
    size_t tc = RP_ACT_BYTES / (nsb * sizeof(rp_q8_K)) / 4 * 4;
    if (tc < 4) tc = 4;
    const int64_t n_groups = (n_rows + TSR_REPACK_ROWS - 1) / TSR_REPACK_ROWS;
    for (size_t t0 = 0; t0 < (size_t)n_tok; t0 += tc) {
        const size_t tcn = (size_t)n_tok - t0 < tc ? (size_t)n_tok - t0 : tc;
        for (int64_t g = 0; g < n_groups; ++g) {
            const uint8_t *grp = packed + (size_t)g * gb;
            if (n_tok > 1 && g + 1 < n_groups) {
                const char *p = (const char *)(grp + gb);
                for (size_t off = 0; off < gb; off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
            }
            if (type == TSR_TYPE_Q4_K) { /* the group's 4 rows at once (r: their count) */
                const int64_t left = n_rows - g * TSR_REPACK_ROWS;
                const int nr = left < TSR_REPACK_ROWS ? (int)left : TSR_REPACK_ROWS;
                for (size_t t = 0; t < tcn; t += 4) {
                    const int T = tcn - t < 4 ? (int)(tcn - t) : 4;
                    f(T, nsb, grp, nr, x + (t0 + t) * xs, xs,
                      y + (t0 + t) * ys + (size_t)g * TSR_REPACK_ROWS, ys);
                }
                continue;
            }
            for (int r = 0; r < TSR_REPACK_ROWS && g * TSR_REPACK_ROWS + r < n_rows; ++r) {
                if (z6 && r + 1 < TSR_REPACK_ROWS && g * TSR_REPACK_ROWS + r + 1 < n_rows) {
                    /* Q6_K: two rows a pass (k6_z512) */
                    for (size_t t = 0; t < tcn; t += 4) {
                        const int T = tcn - t < 4 ? (int)(tcn - t) : 4;
                        k6_z512(T, nsb, grp, r, x + (t0 + t) * xs, xs,
                                y + (t0 + t) * ys + (size_t)g * TSR_REPACK_ROWS + (size_t)r, ys);
                    }
                    ++r;
                    continue;
                }
                for (size_t t = 0; t < tcn; t += 4) {
                    const int T = tcn - t < 4 ? (int)(tcn - t) : 4;
                    f(T, nsb, grp, r, x + (t0 + t) * xs, xs,
                      y + (t0 + t) * ys + (size_t)g * TSR_REPACK_ROWS + (size_t)r, ys);
                }
            }
        }
    }
}

#endif /* TSR_RP_X86 */

void tsr_repack_dot(uint32_t type, int64_t n, const void *packed, int64_t r0, int64_t n_rows,
                    int32_t n_tok, const void *x, size_t x_stride, float *y, size_t y_stride)
{
    const size_t gb = tsr_repack_group_bytes(type, n);
    if (!gb || n_rows <= 0 || n_tok <= 0) return;
    const size_t nb = (size_t)n / 32, nbp = (nb + 7) / 8 * 8;
    const uint8_t *p = (const uint8_t *)packed + (size_t)(r0 / TSR_REPACK_ROWS) * gb;
    const char *isa = tsr_quant_isa();
    if (type == TSR_TYPE_Q4_0) { /* one order for any token count (kernels/q40_gemm.h) */
        tsr_q40_gemm_dot_repacked(tsr_ggml_isa(), n, n_rows, p, n_tok, x, x_stride, y, y_stride);
        return;
    }
    if (is_kquant(type)) {
        const size_t nsb = (size_t)n / TSR_QK_K;
        /* one token of Q4_K / Q6_K: quant.c's 4-row GEMV (the row dots' arithmetic) */
        if (n_tok == 1 && tsr_vec_dot_kgroups(type, n, n_rows, p, gb, x, y)) return;
#if TSR_RP_X86
        if (strcmp(isa, "scalar") != 0) {
            repack_dot_k_simd(strcmp(isa, "avx512vnni") == 0, type, nsb, gb, p, n_rows, n_tok,
                              (const uint8_t *)x, x_stride, y, y_stride);
            return;
        }
#endif
        repack_dot_k_scalar(type, nsb, gb, p, n_rows, n_tok, (const uint8_t *)x, x_stride, y,
                            y_stride);
        return;
    }
#if TSR_RP_X86
    if (strcmp(isa, "scalar") != 0) {
        repack_dot_simd(strcmp(isa, "avx512vnni") == 0, type, nb, nbp, gb, p, n_rows, n_tok, x,
                        x_stride, y, y_stride);
        return;
    }
#else
    (void)isa;
#endif
    repack_dot_scalar(type, nb, nbp, gb, p, n_rows, n_tok, x, x_stride, y, y_stride);
}
