/*
 * q41_avx2.c — Q4_1 matrices in the AVX2 layout (see q41_avx2.h): the repack and the kernels
 * (AVX2, scalar), which compute kernels/dot_ggml.c's Q4_1 order (ggml's) bit for bit.
 *
 * A half (8 rows) and a block give 8 ymm of unsigned quants 0..15, one per ggml lane l: lane
 * j's nibbles by an and, lane j + 4's by a shift and an and. Per token and lane: vpmaddubsw by
 * the token's 4 quants broadcast, vpmaddwd by ones (exactly the int32 of ggml's lane), one
 * conversion and one FMA by fp16(d_w) * fp16(d_x) into lane l's chain of the 8 rows; per
 * block one FMA of the 8 rows' fp16 mins by the token's fp16 s into their summs; the end
 * ggml's hsum of the 8 chains plus summs, 8 rows at once.
 *
 * One token (decode) unpacks in registers as it goes, the 8 chains in registers. Several
 * unpack a run of blocks once into an L1 scratch and walk it once per token (its chains in
 * registers, kept in memory between runs). Both are the same integers and the same FMAs in
 * the same order: the same bits.
 */
#include "kernels/q41_avx2.h"

#include "kernels/dot_ggml.h"
#include "kernels/lanes.h"
#include "kernels/quant.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>

#include "kernels/x86hsum.h"
#define Q41A_X86 1
#else
#define Q41A_X86 0
#endif

/* BLK: a file block (fp16 d, fp16 m, qs[16]); XBLK: a Q8_1 block (fp16 d, fp16 s, qs[32]);
 * in a half's block of 160 bytes the quants at 0, d at OFF_D, m at OFF_M. */
enum { BLK = 20, B_QS = 4, XBLK = 36, XQS = 4, OFF_D = 128, OFF_M = 144 };
_Static_assert(OFF_M + 16 == TSR_Q41A_BLK_BYTES, "Q4_1 AVX2 block");

static _Atomic int g_chosen = -1;

bool tsr_q41a_chosen(void)
{
    return tsr_ggml_isa() == TSR_GGML_AVX2 &&
           tsr_ggml_isa_chosen("TSR_Q41_LANES", TSR_GGML_AVX2, &g_chosen);
}

static size_t half_bytes(int64_t nb)
{
    return (size_t)nb * TSR_Q41A_BLK_BYTES;
}

size_t tsr_q41a_group_bytes(int64_t n)
{
    if (n <= 0 || n % 32) return 0;
    return 2 * half_bytes(n / 32);
}

size_t tsr_q41a_bytes(int64_t n, int64_t n_out)
{
    if (n_out <= 0) return 0;
    return (size_t)((n_out + TSR_Q41A_ROWS - 1) / TSR_Q41A_ROWS) * tsr_q41a_group_bytes(n);
}

int tsr_q41a_repack(int64_t n, int64_t n_out, const void *src, size_t src_stride, void *dst)
{
    if (n <= 0 || n % 32 || n_out < 0) return -1;
    const int64_t nb = n / 32;
    const size_t gb = tsr_q41a_group_bytes(n), hb = half_bytes(nb);
    for (int64_t g = 0; g * TSR_Q41A_ROWS < n_out; g++) {
        uint8_t *grp = (uint8_t *)dst + (size_t)g * gb;
        memset(grp, 0, gb); /* rows past n_out: d = m = 0, quants 0 */
        for (int r = 0; r < TSR_Q41A_ROWS; r++) {
            const int64_t row = g * TSR_Q41A_ROWS + r;
            if (row >= n_out) break;
            uint8_t *half = grp + (size_t)(r / 8) * hb;
            const int rr = r % 8;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk =
                    (const uint8_t *)src + (size_t)row * src_stride + (size_t)b * BLK;
                uint8_t *q = half + (size_t)b * TSR_Q41A_BLK_BYTES;
                memcpy(q + OFF_D + 2 * rr, blk, 2);
                memcpy(q + OFF_M + 2 * rr, blk + 2, 2);
                for (int j = 0; j < 4; j++) memcpy(q + 32 * j + 4 * rr, blk + B_QS + 4 * j, 4);
            }
        }
    }
    return 0;
}

/* The scalar form: row r16 (0..15) of a group, in kernels/dot_ggml.c's Q4_1 order
 * (kernels/lanes.h's row function). */
static float dot_row_scalar(int64_t nb, const uint8_t *grp, int r16, const uint8_t *x)
{
    const uint8_t *half = grp + (size_t)(r16 / 8) * half_bytes(nb);
    const int rr = r16 % 8;
    float acc[8] = {0}, summs = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *xb = x + (size_t)b * XBLK;
        const int8_t *y = (const int8_t *)(xb + XQS);
        const uint8_t *q = half + (size_t)b * TSR_Q41A_BLK_BYTES;
        uint16_t hd, hm, hx, hs;
        memcpy(&hd, q + OFF_D + 2 * rr, 2);
        memcpy(&hm, q + OFF_M + 2 * rr, 2);
        memcpy(&hx, xb, 2);
        memcpy(&hs, xb + 2, 2);
        summs = fmaf(tsr_f16_to_f32(hm), tsr_f16_to_f32(hs), summs);
        const float dd = tsr_f16_to_f32(hd) * tsr_f16_to_f32(hx);
        for (int l = 0; l < 8; l++) {
            const uint8_t *qs = q + 32 * (l % 4) + 4 * rr;
            int32_t si = 0;
            for (int k = 0; k < 4; k++) si += (l < 4 ? qs[k] & 0xF : qs[k] >> 4) * y[4 * l + k];
            acc[l] = fmaf(dd, (float)si, acc[l]);
        }
    }
    return tsr_ggml_hsum8(acc) + summs;
}

#if Q41A_X86
#define Q41A_AVX2   __attribute__((target("avx2,fma,f16c")))
#define Q41A_INLINE static inline __attribute__((always_inline))

/* A token's block scales, made once per call for all the rows: d and s as floats. */
typedef struct {
    float d, s;
} q41a_act;

/* Up to 2048 blocks of scales (16 KiB) go on the stack, more are malloc'd; tokens per chunk
 * keep them within Q41A_ACT_BYTES */
enum { Q41A_STACK_BLOCKS = 2048, Q41A_ACT_BYTES = 64 << 10, Q41A_TOK_MAX = 32, Q41A_RUN = 32 };

static void act_build(int64_t nb, const uint8_t *x, q41a_act *a)
{
    for (int64_t b = 0; b < nb; b++) {
        uint16_t hx, hs;
        memcpy(&hx, x + (size_t)b * XBLK, 2);
        memcpy(&hs, x + (size_t)b * XBLK + 2, 2);
        a[b].d = tsr_f16_to_f32(hx);
        a[b].s = tsr_f16_to_f32(hs);
    }
}

/* One lane step: fma(sc, (float)sum(u * y4), acc) (dot_q4_1_scalar's fmaf(dd, s, acc)). */
Q41A_INLINE Q41A_AVX2 __m256 lane_step(__m256 acc, __m256i u, const int8_t *y4, __m256 sc)
{
    int32_t q4;
    memcpy(&q4, y4, 4);
    const __m256i s =
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_set1_epi32(q4)), _mm256_set1_epi16(1));
    return _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(s), acc);
}

/* One token prefetches Q41A_PF_BYTES ahead into L1, 3 lines a block of 160 bytes (the halves
 * follow one another: one linear stream), as q50_avx2.c's. */
enum { Q41A_PF_BYTES = 2048 };

/* One token over one half: the rows' 8 results into out. */
Q41A_AVX2 static void half_tok1(int64_t nb, const uint8_t *half, const uint8_t *x,
                                const q41a_act *a, float *out)
{
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc[8], sv = _mm256_setzero_ps();
    for (int l = 0; l < 8; l++) acc[l] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = half + (size_t)b * TSR_Q41A_BLK_BYTES;
        _mm_prefetch((const char *)q + Q41A_PF_BYTES, _MM_HINT_T0);
        _mm_prefetch((const char *)q + Q41A_PF_BYTES + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)q + Q41A_PF_BYTES + 128, _MM_HINT_T0);
        /* summs = fma(m, s, summs); dd = d_w * d_x (as floats: fp16 values, exact) */
        sv = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(q + OFF_M))),
                             _mm256_set1_ps(a[b].s), sv);
        const __m256 sc = _mm256_mul_ps(
            _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(q + OFF_D))), _mm256_set1_ps(a[b].d));
        const int8_t *y = (const int8_t *)(x + (size_t)b * XBLK + XQS);
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(q + 32 * j));
            acc[j] = lane_step(acc[j], _mm256_and_si256(v, m4), y + 4 * j, sc);
            acc[j + 4] = lane_step(acc[j + 4], _mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
                                   y + 16 + 4 * j, sc);
        }
    }
    _mm256_storeu_ps(out, _mm256_add_ps(tsr_hsum8_rows_ps(acc), sv));
}

/* Several tokens over one half: runs of Q41A_RUN blocks unpacked once into u (8 lanes a
 * block), dw and dm (the rows' scales and mins), then each token's chains over the run, kept
 * in acc[t] / sv[t] between runs. out[t * 8 + r]: row r of token t. */
Q41A_AVX2 static void half_toks(int64_t nb, const uint8_t *half, int32_t n_tok, const uint8_t *x,
                                size_t x_stride, const q41a_act *a, __m256 (*acc)[8], __m256 *sv,
                                float *out)
{
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256i u[Q41A_RUN][8];
    __m256 dw[Q41A_RUN], dm[Q41A_RUN];
    for (int32_t t = 0; t < n_tok; t++) {
        sv[t] = _mm256_setzero_ps();
        for (int l = 0; l < 8; l++) acc[t][l] = _mm256_setzero_ps();
    }
    for (int64_t b0 = 0; b0 < nb; b0 += Q41A_RUN) {
        const int nr = nb - b0 < Q41A_RUN ? (int)(nb - b0) : Q41A_RUN;
        for (int i = 0; i < nr; i++) {
            const uint8_t *q = half + (size_t)(b0 + i) * TSR_Q41A_BLK_BYTES;
            dw[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(q + OFF_D)));
            dm[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(q + OFF_M)));
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(q + 32 * j));
                u[i][j] = _mm256_and_si256(v, m4);
                u[i][j + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            }
        }
        for (int32_t t = 0; t < n_tok; t++) {
            const uint8_t *xt = x + (size_t)t * x_stride + (size_t)b0 * XBLK + XQS;
            const q41a_act *at = a + (size_t)t * (size_t)nb + b0;
            __m256 c[8], s = sv[t];
            for (int l = 0; l < 8; l++) c[l] = acc[t][l];
            for (int i = 0; i < nr; i++) {
                s = _mm256_fmadd_ps(dm[i], _mm256_set1_ps(at[i].s), s);
                const __m256 sc = _mm256_mul_ps(dw[i], _mm256_set1_ps(at[i].d));
                const int8_t *y = (const int8_t *)(xt + (size_t)i * XBLK);
#pragma GCC unroll 8
                for (int l = 0; l < 8; l++) c[l] = lane_step(c[l], u[i][l], y + 4 * l, sc);
            }
            for (int l = 0; l < 8; l++) acc[t][l] = c[l];
            sv[t] = s;
        }
    }
    for (int32_t t = 0; t < n_tok; t++)
        _mm256_storeu_ps(out + 8 * (size_t)t, _mm256_add_ps(tsr_hsum8_rows_ps(acc[t]), sv[t]));
}

/* Returns -1 (nothing written) when the activation scales find no memory. */
Q41A_AVX2 static int dot_avx2(int64_t nb, const uint8_t *packed, int64_t r0, int64_t n_rows,
                              int32_t n_tok, const uint8_t *x, size_t x_stride, float *y,
                              size_t y_stride)
{
    const size_t gb = 2 * half_bytes(nb), hb = half_bytes(nb);
    const int32_t tc =
        tsr_lanes_tok_chunk(Q41A_ACT_BYTES, (size_t)nb * sizeof(q41a_act), Q41A_TOK_MAX, n_tok);
    q41a_act stack_act[Q41A_STACK_BLOCKS];
    const bool on_stack = (size_t)tc * (size_t)nb <= Q41A_STACK_BLOCKS;
    q41a_act *a = on_stack ? stack_act : malloc((size_t)tc * (size_t)nb * sizeof(q41a_act));
    if (!a) return -1;
    __m256 acc[Q41A_TOK_MAX][8], sv[Q41A_TOK_MAX];
    float out[Q41A_TOK_MAX * 16];
    for (int32_t t0 = 0; t0 < n_tok; t0 += tc) {
        const int32_t T = n_tok - t0 < tc ? n_tok - t0 : tc;
        const uint8_t *xt = x + (size_t)t0 * x_stride;
        for (int32_t t = 0; t < T; t++)
            act_build(nb, xt + (size_t)t * x_stride, a + (size_t)t * (size_t)nb);
        for (int64_t r = 0; r < n_rows; r += TSR_Q41A_ROWS) {
            const uint8_t *grp = packed + (size_t)((r0 + r) / TSR_Q41A_ROWS) * gb;
            const int64_t nr = n_rows - r < TSR_Q41A_ROWS ? n_rows - r : TSR_Q41A_ROWS;
            for (int h = 0; h < 2 && 8 * h < nr; h++) {
                if (T == 1)
                    half_tok1(nb, grp + (size_t)h * hb, xt, a, out + 8 * h);
                else
                    half_toks(nb, grp + (size_t)h * hb, T, xt, x_stride, a, acc, sv,
                              out + 8 * (size_t)h * Q41A_TOK_MAX);
            }
            tsr_lanes_store_group(y, y_stride, t0, T, r, nr, out, Q41A_TOK_MAX);
        }
    }
    if (!on_stack) free(a);
    return 0;
}
#endif

void tsr_q41a_dot(int isa, int64_t n, const void *packed, int64_t r0, int64_t n_rows, int32_t n_tok,
                  const void *x, size_t x_stride, float *y, size_t y_stride)
{
    const int64_t nb = n / 32;
    if (n_rows <= 0 || n_tok <= 0) return;
#if Q41A_X86
    if (isa >= TSR_GGML_AVX2 &&
        dot_avx2(nb, packed, r0, n_rows, n_tok, x, x_stride, y, y_stride) == 0)
        return;
#endif
    (void)isa;
    tsr_lanes_run_scalar(dot_row_scalar, nb, 2 * half_bytes(nb), packed, r0, n_rows, n_tok, x,
                         x_stride, y, y_stride);
}
