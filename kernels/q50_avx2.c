/*
 * q50_avx2.c — Q5_0 matrices in the AVX2 layout (see q50_avx2.h): the repack and the
 * kernels (AVX2, scalar), which compute kernels/quant.c's Q5_0 row dot order (ggml's) bit
 * for bit.
 *
 * A half (8 rows) and a block give 8 ymm of unsigned quants 0..31, one per ggml lane l: the
 * nibbles (an and; a shift and an and for the high ones) or'd with the 5th bits (a shift of
 * the half's bit vector by l - 4 and an and by 0x10). Per token and lane: vpmaddubsw by the
 * token's 4 quants broadcast, vpmaddwd by ones, plus -16 x their sum (exactly
 * sum((q - 16) * y), ggml's lane), one conversion and one FMA by fp16(d_w) * fp16(d_x) into
 * lane l's chain of the 8 rows; the end ggml's hsum of the 8 chains, 8 rows at once.
 *
 * One token (decode) unpacks in registers as it goes, the 8 chains in registers. Several
 * unpack a run of blocks once into an L1 scratch and walk it once per token (its 8 chains in
 * registers, kept in memory between runs): the unpack costs a run once, not once per token.
 * Both are the same integers and the same FMAs in the same order: the same bits.
 */
#include "kernels/q50_avx2.h"

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
#define Q5A_X86 1
#else
#define Q5A_X86 0
#endif

/* BLK: a file block (fp16 d, qh[4], qs[16]); XBLK: a Q8_0 block (fp16 d, qs[32]); in a pair,
 * block e's quants at 160e, its 5th bits at 160e + OFF_HB, the scales at OFF_D + 16e. */
enum { BLK = 22, B_QH = 2, B_QS = 6, XBLK = 34, XQS = 2, E_BYTES = 160, OFF_HB = 128, OFF_D = 320 };
_Static_assert(OFF_D + 32 == TSR_Q50A_PAIR_BYTES, "Q5_0 AVX2 pair");

static _Atomic int g_chosen = -1;

bool tsr_q50a_chosen(void)
{
    return tsr_ggml_isa() == TSR_GGML_AVX2 &&
           tsr_ggml_isa_chosen("TSR_Q50_LANES", TSR_GGML_AVX2, &g_chosen);
}

static size_t half_bytes(int64_t nb)
{
    return (size_t)((nb + 1) / 2) * TSR_Q50A_PAIR_BYTES;
}

size_t tsr_q50a_group_bytes(int64_t n)
{
    if (n <= 0 || n % 32) return 0;
    return 2 * half_bytes(n / 32);
}

size_t tsr_q50a_bytes(int64_t n, int64_t n_out)
{
    if (n_out <= 0) return 0;
    return (size_t)((n_out + TSR_Q50A_ROWS - 1) / TSR_Q50A_ROWS) * tsr_q50a_group_bytes(n);
}

/* Block b of a half: its quants (lane j's 4 bytes of row r at + 32j + 4r), its bits at
 * + OFF_HB, and its 8 scales. */
static inline const uint8_t *blk_of(const uint8_t *half, int64_t b)
{
    return half + (size_t)(b / 2) * TSR_Q50A_PAIR_BYTES + E_BYTES * (size_t)(b % 2);
}
static inline const uint8_t *d_of(const uint8_t *half, int64_t b)
{
    return half + (size_t)(b / 2) * TSR_Q50A_PAIR_BYTES + OFF_D + 16 * (size_t)(b % 2);
}

/* A row's 5th bits in this layout: bit 8k + l = qh bit 4l + k (an 8 x 4 bit transpose). Per
 * k, qh's bits k of its 8 nibbles (bits 4l + k) gather into byte k in three folds (a loop
 * over the 32 bits took 0.4-1.2 s of Qwen2.5-Coder-0.5B's load for its 267 MB of Q5_0). */
static uint32_t hbits_of(uint32_t qh)
{
    uint32_t out = 0;
    for (int k = 0; k < 4; k++) {
        uint32_t x = (qh >> k) & 0x11111111u;        /* nibble l's bit at 4l */
        x = (x | (x >> 3)) & 0x03030303u;            /* l = 2i, 2i + 1 at bits 8i, 8i + 1 */
        x = (x | (x >> 6)) & 0x000F000Fu;            /* l = 0..3 at bits 0..3, 4..7 at 16..19 */
        out |= ((x | (x >> 12)) & 0xFFu) << (8 * k); /* l at bit l */
    }
    return out;
}

int tsr_q50a_repack(int64_t n, int64_t n_out, const void *src, size_t src_stride, void *dst)
{
    if (n <= 0 || n % 32 || n_out < 0) return -1;
    const int64_t nb = n / 32;
    const size_t gb = tsr_q50a_group_bytes(n), hb = half_bytes(nb);
    for (int64_t g = 0; g * TSR_Q50A_ROWS < n_out; g++) {
        uint8_t *grp = (uint8_t *)dst + (size_t)g * gb;
        memset(grp, 0, gb); /* rows past n_out, a padded block: d = 0, quants 0 */
        for (int r = 0; r < TSR_Q50A_ROWS; r++) {
            const int64_t row = g * TSR_Q50A_ROWS + r;
            if (row >= n_out) break;
            uint8_t *half = grp + (size_t)(r / 8) * hb;
            const int rr = r % 8;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk =
                    (const uint8_t *)src + (size_t)row * src_stride + (size_t)b * BLK;
                uint8_t *q = (uint8_t *)blk_of(half, b);
                memcpy((uint8_t *)d_of(half, b) + 2 * rr, blk, 2);
                for (int j = 0; j < 4; j++) memcpy(q + 32 * j + 4 * rr, blk + B_QS + 4 * j, 4);
                uint32_t qh;
                memcpy(&qh, blk + B_QH, 4);
                const uint32_t hbits = hbits_of(qh);
                memcpy(q + OFF_HB + 4 * rr, &hbits, 4);
            }
        }
    }
    return 0;
}

/* The scalar form: row r16 (0..15) of a group, in kernels/quant.c's Q5_0 order
 * (kernels/lanes.h's row function). */
static float dot_row_scalar(int64_t nb, const uint8_t *grp, int r16, const uint8_t *x)
{
    const uint8_t *half = grp + (size_t)(r16 / 8) * half_bytes(nb);
    const int rr = r16 % 8;
    float acc[8] = {0};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *xb = x + (size_t)b * XBLK;
        const int8_t *y = (const int8_t *)(xb + XQS);
        const uint8_t *q = blk_of(half, b);
        uint16_t hw, hx;
        uint32_t hbits;
        memcpy(&hw, d_of(half, b) + 2 * rr, 2);
        memcpy(&hx, xb, 2);
        memcpy(&hbits, q + OFF_HB + 4 * rr, 4);
        const float d = tsr_f16_to_f32(hw) * tsr_f16_to_f32(hx);
        for (int l = 0; l < 8; l++) {
            const uint8_t *qs = q + 32 * (l % 4) + 4 * rr;
            int32_t si = 0;
            for (int k = 0; k < 4; k++) {
                const int nib = l < 4 ? qs[k] & 0xF : qs[k] >> 4;
                const int v = nib | (int)(((hbits >> (8 * k + l)) & 1u) << 4);
                si += (v - 16) * y[4 * l + k];
            }
            acc[l] = fmaf((float)si, d, acc[l]);
        }
    }
    return tsr_ggml_hsum8(acc);
}

#if Q5A_X86
#define Q5A_AVX2   __attribute__((target("avx2,fma,f16c")))
#define Q5A_INLINE static inline __attribute__((always_inline))

/* A token's block facts, made once per call for all the rows: ny[l] = -16 x the sum of its
 * quants 4l..4l+3 (lane l's start), d its fp16 scale as float. */
typedef struct {
    int32_t ny[8];
    float d;
} q5a_act;

/* 512 blocks of one token (a row of 16384 elements) go on the stack; tokens per chunk keep
 * the facts within Q5A_ACT_BYTES */
enum { Q5A_STACK_BLOCKS = 512, Q5A_ACT_BYTES = 256 << 10, Q5A_TOK_MAX = 32, Q5A_RUN = 32 };

Q5A_AVX2 static void act_build(int64_t nb, const uint8_t *x, q5a_act *a)
{
    const __m256i s16 = _mm256_set1_epi8(16), neg1 = _mm256_set1_epi16(-1);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *xb = x + (size_t)b * XBLK;
        uint16_t hx;
        memcpy(&hx, xb, 2);
        a[b].d = _cvtsh_ss(hx);
        /* 16 * (y_2i + y_2i+1) in int16, then -(pair + pair): -16 x each lane's sum, exact */
        const __m256i yv = _mm256_loadu_si256((const __m256i *)(xb + XQS));
        _mm256_storeu_si256((__m256i *)a[b].ny,
                            _mm256_madd_epi16(_mm256_maddubs_epi16(s16, yv), neg1));
    }
}

/* Lane l's 5th bits of a half's block (bit vector hb) at bit 4 of their bytes. */
Q5A_INLINE Q5A_AVX2 __m256i bits_of(__m256i hb, int l)
{
    return l < 4 ? _mm256_slli_epi32(hb, 4 - l) : l == 4 ? hb : _mm256_srli_epi32(hb, l - 4);
}

/* Lanes j and j + 4 of a half's block q (bit vector hb): the unsigned 5-bit quants 0..31. */
Q5A_INLINE Q5A_AVX2 void unpack_pair(const uint8_t *q, __m256i hb, int j, __m256i *lo, __m256i *hi)
{
    const __m256i m4 = _mm256_set1_epi8(0x0F), m10 = _mm256_set1_epi8(0x10);
    const __m256i v = _mm256_loadu_si256((const __m256i *)(q + 32 * j));
    *lo = _mm256_or_si256(_mm256_and_si256(v, m4), _mm256_and_si256(bits_of(hb, j), m10));
    *hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
                          _mm256_and_si256(bits_of(hb, j + 4), m10));
}

/* One lane step: acc + (float)(sum(u * y4) - 16 * sum(y4)) x sc. */
Q5A_INLINE Q5A_AVX2 __m256 lane_step(__m256 acc, __m256i u, const uint8_t *y4, int32_t ny,
                                     __m256 sc)
{
    int32_t q4;
    memcpy(&q4, y4, 4);
    const __m256i s =
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_set1_epi32(q4)), _mm256_set1_epi16(1));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s, _mm256_set1_epi32(ny))), sc, acc);
}

/* One token prefetches Q5A_PF_BYTES ahead into L1, 3 lines a block (a half's block is 160
 * bytes and 16 of scales; the halves follow one another: one linear stream). A prototype
 * (2026-12-07, AMD Zen 3, 1 thread, 40 MB): 0.96-1.04x the groups' GEMV with no software
 * prefetch, 1.20-1.38x at 2-4 KiB ahead, 1.29-1.38x at 8 KiB. */
enum { Q5A_PF_BYTES = 2048 };

/* One token over one half: the rows' 8 results into out. */
Q5A_AVX2 static void half_tok1(int64_t nb, const uint8_t *half, const uint8_t *x, const q5a_act *a,
                               float *out)
{
    __m256 acc[8];
    for (int l = 0; l < 8; l++) acc[l] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = blk_of(half, b);
        _mm_prefetch((const char *)q + Q5A_PF_BYTES, _MM_HINT_T0);
        _mm_prefetch((const char *)q + Q5A_PF_BYTES + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)q + Q5A_PF_BYTES + 128, _MM_HINT_T0);
        const __m256 sc =
            _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)d_of(half, b))),
                          _mm256_set1_ps(a[b].d));
        const __m256i hb = _mm256_loadu_si256((const __m256i *)(q + OFF_HB));
        const uint8_t *y = x + (size_t)b * XBLK + XQS;
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            __m256i lo, hi;
            unpack_pair(q, hb, j, &lo, &hi);
            acc[j] = lane_step(acc[j], lo, y + 4 * j, a[b].ny[j], sc);
            acc[j + 4] = lane_step(acc[j + 4], hi, y + 16 + 4 * j, a[b].ny[j + 4], sc);
        }
    }
    _mm256_storeu_ps(out, tsr_hsum8_rows_ps(acc));
}

/* Several tokens over one half: runs of Q5A_RUN blocks unpacked once into u (8 lanes a block)
 * and dw (the rows' scales), then each token's 8 chains over the run, kept in acc[t] between
 * runs. out[t * 8 + r]: row r of token t. */
Q5A_AVX2 static void half_toks(int64_t nb, const uint8_t *half, int32_t n_tok, const uint8_t *x,
                               size_t x_stride, const q5a_act *a, __m256 (*acc)[8], float *out)
{
    __m256i u[Q5A_RUN][8];
    __m256 dw[Q5A_RUN];
    for (int32_t t = 0; t < n_tok; t++)
        for (int l = 0; l < 8; l++) acc[t][l] = _mm256_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += Q5A_RUN) {
        const int nr = nb - b0 < Q5A_RUN ? (int)(nb - b0) : Q5A_RUN;
        for (int i = 0; i < nr; i++) {
            const uint8_t *q = blk_of(half, b0 + i);
            dw[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)d_of(half, b0 + i)));
            const __m256i hb = _mm256_loadu_si256((const __m256i *)(q + OFF_HB));
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) unpack_pair(q, hb, j, &u[i][j], &u[i][j + 4]);
        }
        for (int32_t t = 0; t < n_tok; t++) {
            const uint8_t *xt = x + (size_t)t * x_stride + (size_t)b0 * XBLK + XQS;
            const q5a_act *at = a + (size_t)t * (size_t)nb + b0;
            __m256 c[8];
            for (int l = 0; l < 8; l++) c[l] = acc[t][l];
            for (int i = 0; i < nr; i++) {
                const __m256 sc = _mm256_mul_ps(dw[i], _mm256_set1_ps(at[i].d));
                const uint8_t *y = xt + (size_t)i * XBLK;
#pragma GCC unroll 8
                for (int l = 0; l < 8; l++)
                    c[l] = lane_step(c[l], u[i][l], y + 4 * l, at[i].ny[l], sc);
            }
            for (int l = 0; l < 8; l++) acc[t][l] = c[l];
        }
    }
    for (int32_t t = 0; t < n_tok; t++)
        _mm256_storeu_ps(out + 8 * (size_t)t, tsr_hsum8_rows_ps(acc[t]));
}

/* Returns -1 (nothing written) when the activation facts find no memory. */
Q5A_AVX2 static int dot_avx2(int64_t nb, const uint8_t *packed, int64_t r0, int64_t n_rows,
                             int32_t n_tok, const uint8_t *x, size_t x_stride, float *y,
                             size_t y_stride)
{
    const size_t gb = 2 * half_bytes(nb), hb = half_bytes(nb);
    const int32_t tc =
        tsr_lanes_tok_chunk(Q5A_ACT_BYTES, (size_t)nb * sizeof(q5a_act), Q5A_TOK_MAX, n_tok);
    q5a_act stack_act[Q5A_STACK_BLOCKS];
    const bool on_stack = (size_t)tc * (size_t)nb <= Q5A_STACK_BLOCKS;
    q5a_act *a = on_stack ? stack_act : malloc((size_t)tc * (size_t)nb * sizeof(q5a_act));
    if (!a) return -1;
    __m256 acc[Q5A_TOK_MAX][8];
    float out[Q5A_TOK_MAX * 16];
    for (int32_t t0 = 0; t0 < n_tok; t0 += tc) {
        const int32_t T = n_tok - t0 < tc ? n_tok - t0 : tc;
        const uint8_t *xt = x + (size_t)t0 * x_stride;
        for (int32_t t = 0; t < T; t++)
            act_build(nb, xt + (size_t)t * x_stride, a + (size_t)t * (size_t)nb);
        for (int64_t r = 0; r < n_rows; r += TSR_Q50A_ROWS) {
            const uint8_t *grp = packed + (size_t)((r0 + r) / TSR_Q50A_ROWS) * gb;
            const int64_t nr = n_rows - r < TSR_Q50A_ROWS ? n_rows - r : TSR_Q50A_ROWS;
            for (int h = 0; h < 2 && 8 * h < nr; h++) {
                if (T == 1)
                    half_tok1(nb, grp + (size_t)h * hb, xt, a, out + 8 * h);
                else
                    half_toks(nb, grp + (size_t)h * hb, T, xt, x_stride, a, acc,
                              out + 8 * (size_t)h * Q5A_TOK_MAX);
            }
            tsr_lanes_store_group(y, y_stride, t0, T, r, nr, out, Q5A_TOK_MAX);
        }
    }
    if (!on_stack) free(a);
    return 0;
}
#endif

void tsr_q50a_dot(int isa, int64_t n, const void *packed, int64_t r0, int64_t n_rows, int32_t n_tok,
                  const void *x, size_t x_stride, float *y, size_t y_stride)
{
    const int64_t nb = n / 32;
    if (n_rows <= 0 || n_tok <= 0) return;
#if Q5A_X86
    if (isa >= TSR_GGML_AVX2 &&
        dot_avx2(nb, packed, r0, n_rows, n_tok, x, x_stride, y, y_stride) == 0)
        return;
#endif
    (void)isa;
    tsr_lanes_run_scalar(dot_row_scalar, nb, 2 * half_bytes(nb), packed, r0, n_rows, n_tok, x,
                         x_stride, y, y_stride);
}
