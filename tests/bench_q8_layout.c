/*
 * bench_q8_layout.c — a measured route for the several-token Q8_0 matmul that the engine
 * does not take (yet): the weights of 16 rows laid out lane-transposed, with a VNNI kernel
 * and an AMX one, against the library's tile (tsr_ggml_dot_tile_prep on the file layout) in
 * the same run, from L2 and from memory.
 *
 * Why: ggml's Q8_0 order (kernels/dot_ggml.h) makes every 4-product lane of every block a
 * float FMA, so the tile spends three vector ops per 64 products (vpdpbusd, vsubps, FMA) and,
 * on the file layout, a row-pair permute, the dot starts -128·Σw and the scale extraction
 * besides (tests/bench_tile). Laid out as the AMX B operand is, none of those remain:
 *
 *   group of 16 rows, per chunk of 8 blocks (4352 bytes, the file's 16 x 8 x 34):
 *     uint16 d[8][16]          block j's fp16 scales of rows 0..15
 *     uint8  q[8][8][16][4]    block j, lane k (elements 4k..4k+3) of rows 0..15
 *
 *   - VNNI: a zmm load of q[j][k] is lane k of 16 rows; one vpdpbusd against token t's 4
 *     quants broadcast gives the 16 rows' lane k, exactly as ggml sums it. Weights stored
 *     +128 (unsigned) and the dot start MAGIC - 128·Σx of the token's lane made once per
 *     token, so no per-block start; the scales d_w·d_x of 16 rows one vmulps per block and
 *     token. Accumulators: acc[t][k] over 16 rows, 8 per token, at most 3 tokens a pass;
 *     the end is ggml's hsum8 tree across acc[t][0..7], 16 rows at once.
 *   - AMX (s8 weights): C[(t, k)][row] = TDPBSSD of A = two tokens' blocks spread one lane
 *     per row (A[(t, k)][4k..4k+3] = x_t's lane k, zeros elsewhere: 1/8 of the products
 *     used) and B = q[j] (8 rows of 64 bytes); C stored and read back as 16 zmm, converted
 *     and FMA'd as above.
 * The two new kernels (not the library's tile) are checked bit for bit against
 * tsr_ggml_dot_rows, for 1..16 tokens, before anything is timed.
 *
 * Measured (2026-12-05, 1 thread, vpdpbusd-equivalents per ns, i.e. 64 products; library
 * tile / transposed VNNI / AMX; two runs), 2048 columns: from cache (256 rows), 5 tokens
 * 1.26-1.27 / 1.44-1.49 / 0.60, 16 tokens 1.34-1.36 / 1.44-1.66 / 0.72-0.81; streaming 1
 * GiB, 5 tokens 0.80 / 0.78-0.79 / 0.50, 8 tokens 1.04-1.05 / 1.05-1.08 / 0.61, 16 tokens
 * 1.13-1.22 / 1.30-1.42 / 0.65-0.69; one token 11.3 (the row dots) / 14.0-14.1 GB/s. So the
 * layout makes the tile 7-22 % faster where it computes from cache (16 tokens)
 * and gains nothing where verification needs it (5 tokens from memory: compute and the weight
 * stream still overlap only partly). AMX loses: a TDPBSSD takes ~17 cycles for 16 x 16
 * outputs, its tile store ~16 more, and reading C back into vector registers right after the
 * store stalls. 768 columns (the 100M shape, whose weights this host's L3 holds), 128 MiB
 * streamed: 16 tokens 1.22 -> 1.38, 8 tokens 0.95 -> 1.09, 5 tokens 0.73 -> 0.81 (1 thread
 * streams the L3 no faster than memory here). Taken into the engine, the 16-sequence decode
 * step (69 % tiles, +13 %) would be about 8 % shorter (15 -> ~13.8 ms), short of the ~12 ms
 * that serving's 4x at concurrency 16 needs.
 *
 *   bench_q8_layout [COLS]   (default 2048 and 768, the 1B and 100M shapes' row lengths;
 *                            TSR_BENCH_MB the streamed size in MiB, 16 or more, default 1024)
 *
 * Not a ctest (tests/bench.cmake). x86 with AVX-512 VNNI only; the AMX part where the CPU
 * has AMX-INT8 and the kernel grants the tile state (arch_prctl). Run it under
 * `flock /work/bench.lock` and print `uptime` beside its figures.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/dot_ggml.h"
#include "kernels/quant.h"
#include "tests/bench.h"

#if defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BQ_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))
#define BQ_AMX                                                                                     \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni,amx-tile,amx-"       \
                          "int8")))
#define BQ_INLINE static inline __attribute__((always_inline))

enum {
    BQ_ROWS = 16,                  /* rows per group */
    BQ_CH = 8,                     /* blocks per chunk */
    BQ_CHB = 8 * 16 * 2 + 8 * 512, /* bytes per chunk: scales, then quants */
    BQ_TMAX = 3,                   /* tokens per VNNI pass: 8 accumulators each */
    BQ_REPS = 7
};
#define BQ_MAGIC_I 0x4B400000
#define BQ_MAGIC_F 12582912.0f

static size_t bq_group_bytes(int64_t nb)
{
    return (size_t)((nb + BQ_CH - 1) / BQ_CH) * BQ_CHB;
}

/* Rows 0..15 of w (nb blocks each, file layout) into group g; quants xor `flip` (0x80: the
 * unsigned form the VNNI kernel multiplies, 0: signed for AMX). */
static void bq_pack(int64_t nb, const tsr_bench_q8_0 *w, uint8_t flip, uint8_t *g)
{
    memset(g, 0, bq_group_bytes(nb));
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *ch = g + (size_t)(b / BQ_CH) * BQ_CHB;
        const int j = (int)(b % BQ_CH);
        for (int r = 0; r < BQ_ROWS; r++) {
            const tsr_bench_q8_0 *blk = w + (size_t)r * (size_t)nb + (size_t)b;
            memcpy(ch + (j * BQ_ROWS + r) * 2, &blk->d, 2);
            for (int k = 0; k < 8; k++)
                for (int e = 0; e < 4; e++)
                    ch[256 + ((j * 8 + k) * BQ_ROWS + r) * 4 + e] =
                        (uint8_t)(blk->qs[4 * k + e] ^ flip);
        }
    }
}

/* One token's operands: per block 8 dot starts (MAGIC - 128 x its lane's sum) and its 8
 * lanes of quants (int32 each), d_x as floats; for AMX, a token pair's A tiles. */
typedef struct {
    int32_t *sx; /* [nb][16]: starts 0..7, quants 8..15 */
    float *dx;   /* [nb] */
} bq_tok;

static void bq_tok_make(int64_t nb, const tsr_bench_q8_0 *x, bq_tok *t)
{
    for (int64_t b = 0; b < nb; b++) {
        for (int k = 0; k < 8; k++) {
            int32_t s = 0;
            for (int e = 0; e < 4; e++) s += x[b].qs[4 * k + e];
            t->sx[b * 16 + k] = BQ_MAGIC_I - 128 * s;
            memcpy(&t->sx[b * 16 + 8 + k], &x[b].qs[4 * k], 4);
        }
        t->dx[b] = tsr_f16_to_f32(x[b].d);
    }
}

/* A tiles of tokens x0, x1 (x1 NULL: zeros): [nb][16 rows (t, k)][32 bytes]. */
static void bq_amx_a(int64_t nb, const tsr_bench_q8_0 *x0, const tsr_bench_q8_0 *x1, int8_t *a)
{
    memset(a, 0, (size_t)nb * 512);
    for (int64_t b = 0; b < nb; b++)
        for (int tt = 0; tt < 2; tt++) {
            const tsr_bench_q8_0 *x = tt ? x1 : x0;
            if (!x) continue;
            for (int k = 0; k < 8; k++)
                memcpy(a + b * 512 + (tt * 8 + k) * 32 + 4 * k, &x[b].qs[4 * k], 4);
        }
}

/* ggml's hsum8 tree across a token's 8 lane accumulators, 16 rows at once. */
BQ_VNNI BQ_INLINE void bq_hsum_store(const __m512 *a, float *y)
{
    const __m512 s =
        _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
                      _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7])));
    _mm512_storeu_ps(y, s);
}

/* The prefetch of what comes next: pf_n lines per block from *pf up to pf_end (T1: L2). */
typedef struct {
    const char *p, *end;
    int n;
} bq_pf;

/* T tokens (1..BQ_TMAX) over a whole group; pfd > 0: one token, every line of the quants pfd
 * bytes ahead into L1 (decode; pfd = BQ_CHB: the next chunk, whose scales go with block 0..3
 * of this one); else the spread prefetch pf. */
#define BQ_PASS(T)                                                                                 \
    BQ_VNNI static void bq_pass_##T(int64_t nb, const uint8_t *g, const bq_tok *tk, float *y,      \
                                    size_t ys, size_t pfd, bq_pf *pf)                              \
    {                                                                                              \
        __m512 acc[T][8];                                                                          \
        const __m512 kmf = _mm512_set1_ps(BQ_MAGIC_F);                                             \
        for (int t = 0; t < (T); t++)                                                              \
            for (int k = 0; k < 8; k++) acc[t][k] = _mm512_setzero_ps();                           \
        for (int64_t b = 0; b < nb; b++) {                                                         \
            const uint8_t *ch = g + (size_t)(b / BQ_CH) * BQ_CHB;                                  \
            const int j = (int)(b % BQ_CH);                                                        \
            const __m512 dw = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(ch + j * 32)));  \
            __m512 dd[T];                                                                          \
            for (int t = 0; t < (T); t++) dd[t] = _mm512_mul_ps(dw, _mm512_set1_ps(tk[t].dx[b]));  \
            const uint8_t *q = ch + 256 + j * 512;                                                 \
            if (pfd) {                                                                             \
                for (int i = 0; i < 8; i++)                                                        \
                    _mm_prefetch((const char *)q + pfd + 64 * i, _MM_HINT_T0);                     \
                if (j < 4) _mm_prefetch((const char *)ch + pfd + 64 * j, _MM_HINT_T0);             \
            }                                                                                      \
            for (int i = 0; i < pf->n && pf->p < pf->end; i++, pf->p += 64)                        \
                _mm_prefetch(pf->p, _MM_HINT_T1);                                                  \
            _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++)                                    \
            {                                                                                      \
                const __m512i wv = _mm512_load_si512(q + k * 64);                                  \
                _Pragma("GCC unroll 4") for (int t = 0; t < (T); t++)                              \
                {                                                                                  \
                    const __m512i l =                                                              \
                        _mm512_dpbusd_epi32(_mm512_set1_epi32(tk[t].sx[b * 16 + k]), wv,           \
                                            _mm512_set1_epi32(tk[t].sx[b * 16 + 8 + k]));          \
                    acc[t][k] = _mm512_fmadd_ps(dd[t], _mm512_sub_ps(_mm512_castsi512_ps(l), kmf), \
                                                acc[t][k]);                                        \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int t = 0; t < (T); t++) bq_hsum_store(acc[t], y + (size_t)t * ys);                   \
    }
BQ_PASS(1)
BQ_PASS(2)
BQ_PASS(3)

/* One group x n_tok tokens (y: 16 rows of token t at y + t * ys): passes of up to BQ_TMAX
 * tokens, the next group prefetched over all of them (the first pass alone streaming it
 * left memory idle during the others: 16 tokens 1.07 -> 1.36 per ns). */
static void bq_vnni_group(int64_t nb, const uint8_t *g, size_t gb, int n_tok, const bq_tok *tk,
                          float *y, size_t ys)
{
    static void (*const pass[4])(int64_t, const uint8_t *, const bq_tok *, float *, size_t, size_t,
                                 bq_pf *) = {NULL, bq_pass_1, bq_pass_2, bq_pass_3};
    const int n_pass = (n_tok + BQ_TMAX - 1) / BQ_TMAX;
    bq_pf pf = {(const char *)g + gb, (const char *)g + 2 * gb,
                n_tok == 1 ? 0
                           : (int)((gb / 64 + (size_t)n_pass * (size_t)nb - 1) /
                                   ((size_t)n_pass * (size_t)nb))};
    for (int t0 = 0; t0 < n_tok; t0 += BQ_TMAX) {
        const int T = n_tok - t0 < BQ_TMAX ? n_tok - t0 : BQ_TMAX;
        pass[T](nb, g, tk + t0, y + (size_t)t0 * ys, ys, n_tok == 1 ? BQ_CHB : 0, &pf);
    }
}

/* ---- AMX --------------------------------------------------------------------------------- */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} bq_tilecfg;

/* Tiles: 0, 3 B (8 x 64 bytes), 1, 4 A (16 x 32), 2, 5, 6, 7 C (16 x 64). Per thread. */
static bool bq_amx_init(void)
{
    if (!__builtin_cpu_supports("amx-int8") || !__builtin_cpu_supports("amx-tile")) return false;
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0)
        return false;
    bq_tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) c.rows[i] = 16, c.colsb[i] = 64;
    c.rows[0] = c.rows[3] = 8;
    c.colsb[1] = c.colsb[4] = 32;
    __asm__ volatile("ldtilecfg %0" ::"m"(c));
    return true;
}

/* One group x n_tok tokens: per chunk and token pair, the chunk's 8 TDPBSSDs into 4 rotating
 * C tiles, stored to cb, then read back, converted and FMA'd into the pair's 16 lane
 * accumulators (kept in acc_all between chunks). a[p]: pair p's A tiles. */
BQ_AMX static void bq_amx_group(int64_t nb, const uint8_t *g, size_t gb, int n_tok,
                                const bq_tok *tk, int8_t *const *a, float *y, size_t ys)
{
    static int32_t cb[8][256] __attribute__((aligned(64)));
    __m512 acc_all[8][16];
    const int n_pair = (n_tok + 1) / 2;
    bq_pf pf = {(const char *)g + gb, (const char *)g + 2 * gb,
                (int)((gb / 64 + (size_t)n_pair * (size_t)nb - 1) / ((size_t)n_pair * (size_t)nb))};
    for (int64_t c0 = 0; c0 < nb; c0 += BQ_CH) {
        const uint8_t *ch = g + (size_t)(c0 / BQ_CH) * BQ_CHB;
        const int m = nb - c0 < BQ_CH ? (int)(nb - c0) : BQ_CH;
        for (int p = 0; p < n_pair; p++) {
            const float *dx0 = tk[2 * p].dx, *dx1 = tk[2 * p + 1 < n_tok ? 2 * p + 1 : 2 * p].dx;
            const int8_t *ap = a[p] + c0 * 512;
            __m512 acc[16];
            for (int i = 0; i < 16; i++) acc[i] = c0 ? acc_all[p][i] : _mm512_setzero_ps();
#define BQ_STAGE(J, TA, TB, TC)                                                                    \
    if ((J) < m) {                                                                                 \
        _tile_zero(TC);                                                                            \
        _tile_loadd(TA, ap + (J)*512, 32);                                                         \
        _tile_loadd(TB, ch + 256 + (J)*512, 64);                                                   \
        _tile_dpbssd(TC, TA, TB);                                                                  \
        _tile_stored(TC, cb[J], 64);                                                               \
    }
            BQ_STAGE(0, 1, 0, 2)
            BQ_STAGE(1, 4, 3, 5)
            BQ_STAGE(2, 1, 0, 6)
            BQ_STAGE(3, 4, 3, 7)
            BQ_STAGE(4, 1, 0, 2)
            BQ_STAGE(5, 4, 3, 5)
            BQ_STAGE(6, 1, 0, 6)
            BQ_STAGE(7, 4, 3, 7)
#undef BQ_STAGE
            /* the stores above are asm without a memory clobber in GCC 12: order them before
             * the loads below */
            __asm__ volatile("" ::: "memory");
            for (int j = 0; j < m; j++) {
                for (int i = 0; i < pf.n && pf.p < pf.end; i++, pf.p += 64)
                    _mm_prefetch(pf.p, _MM_HINT_T1);
                const __m512 dw =
                    _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(ch + j * 32)));
                const __m512 d0 = _mm512_mul_ps(dw, _mm512_set1_ps(dx0[c0 + j]));
                const __m512 d1 = _mm512_mul_ps(dw, _mm512_set1_ps(dx1[c0 + j]));
                _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++)
                {
                    acc[k] = _mm512_fmadd_ps(
                        d0, _mm512_cvtepi32_ps(_mm512_load_si512(cb[j] + 16 * k)), acc[k]);
                    acc[8 + k] = _mm512_fmadd_ps(
                        d1, _mm512_cvtepi32_ps(_mm512_load_si512(cb[j] + 16 * (8 + k))),
                        acc[8 + k]);
                }
            }
            for (int i = 0; i < 16; i++) acc_all[p][i] = acc[i];
        }
    }
    for (int t = 0; t < n_tok; t++) bq_hsum_store(acc_all[t / 2] + (t % 2) * 8, y + (size_t)t * ys);
}

/* ---- driver ------------------------------------------------------------------------------ */
static uint64_t g_s = 0x9E3779B97F4A7C15ull; /* tsr_bench_fill_q8_0's state */

enum { K_LIB, K_VNNI, K_AMX };

typedef struct {
    int64_t nb;
    size_t gb;
    const tsr_bench_q8_0 *wf; /* file layout */
    const uint8_t *wv, *wa;   /* the two packed forms */
    const bq_tok *tk;
    int8_t *const *ap;
    const void *prep; /* the library tile's token layout */
    const tsr_bench_q8_0 *x;
} bq_case;

static void run_kernel(int kind, const bq_case *c, int64_t rows, int n_tok, float *y)
{
    const int64_t n = c->nb * 32;
    if (kind == K_LIB) {
        const size_t rb = sizeof(tsr_bench_q8_0) * (size_t)c->nb;
        if (n_tok == 1)
            tsr_ggml_dot_rows(TSR_TYPE_Q8_0, TSR_GGML_VNNI, n, rows, c->wf, rb, c->x, y);
        else
            tsr_ggml_dot_tile_prep(n, rows, c->wf, rb, n_tok, 0, n_tok, c->prep, c->x, rb, y,
                                   (size_t)rows);
        return;
    }
    for (int64_t g = 0; g < rows / BQ_ROWS; g++) {
        if (kind == K_VNNI)
            bq_vnni_group(c->nb, c->wv + (size_t)g * c->gb, c->gb, n_tok, c->tk, y + g * BQ_ROWS,
                          (size_t)rows);
        else
            bq_amx_group(c->nb, c->wa + (size_t)g * c->gb, c->gb, n_tok, c->tk, c->ap,
                         y + g * BQ_ROWS, (size_t)rows);
    }
}

/* Best of the passes, in vpdpbusd-equivalents (64 products) per ns. */
static double rate(int kind, const bq_case *c, int64_t rows, int n_tok, float *y)
{
    const int reps = rows > 4096 ? BQ_REPS : 40 * BQ_REPS;
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        const double t0 = tsr_bench_now_s();
        run_kernel(kind, c, rows, n_tok, y);
        const double t = tsr_bench_now_s() - t0;
        if (t < best) best = t;
    }
    return (double)rows / 2 * (double)c->nb * n_tok / best * 1e-9;
}

int main(int argc, char **argv)
{
    if (!__builtin_cpu_supports("avx512vnni") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("f16c") || tsr_ggml_isa() < TSR_GGML_VNNI) {
        printf("bench_q8_layout: this CPU has no AVX-512 VNNI: nothing to measure here\n");
        return 0;
    }
    int64_t cols[2] = {2048, 768};
    int n_cols = 2;
    if (argc > 1) {
        cols[0] = atoll(argv[1]);
        n_cols = 1;
        if (cols[0] < 256 || cols[0] % 256 != 0 || cols[0] > 65536) {
            fprintf(stderr,
                    "bench_q8_layout: COLS must be a multiple of 256 in 256..65536, got "
                    "'%s'\n",
                    argv[1]);
            return 2;
        }
    }
    const char *mbs = getenv("TSR_BENCH_MB");
    const double mb_f = mbs && *mbs ? atof(mbs) : 1024.0;
    if (mb_f < 16 || mb_f > 65536) {
        fprintf(stderr, "bench_q8_layout: TSR_BENCH_MB must be 16..65536 (MiB), got '%s'\n", mbs);
        return 2;
    }
    const size_t mb = (size_t)mb_f;
    const bool amx = bq_amx_init();
    printf("bench_q8_layout: 1 thread, best of %d passes (%d for the 256 rows from cache), "
           "vpdpbusd-equivalents (64 products) per ns; library tile (file layout) / transposed "
           "VNNI / AMX%s\n",
           BQ_REPS, 40 * BQ_REPS, amx ? "" : " (no AMX here)");
    static const int toks[] = {1, 2, 5, 8, 16};
    for (int ci = 0; ci < n_cols; ci++) {
        const int64_t n = cols[ci], nb = n / 32;
        const size_t gb = bq_group_bytes(nb);
        /* 1 GiB (TSR_BENCH_MB: e.g. 128 for weights the L3 holds, as the 100M shape's) */
        const int64_t rows = (int64_t)(mb << 20) / (int64_t)gb * BQ_ROWS;
        if (rows < 256) {
            fprintf(stderr,
                    "bench_q8_layout: %zu MiB holds %lld rows of %lld columns, fewer than the 256 "
                    "of the cache runs: raise TSR_BENCH_MB\n",
                    mb, (long long)rows, (long long)n);
            return 2;
        }
        /* the packed forms get 2 groups of slack: the last group's prefetches point there */
        tsr_bench_q8_0 *wf =
            tsr_bench_huge_alloc(sizeof(tsr_bench_q8_0) * (size_t)(nb * rows), NULL);
        uint8_t *wv = tsr_bench_huge_alloc(gb * (size_t)(rows / BQ_ROWS + 2), NULL);
        uint8_t *wa = amx ? tsr_bench_huge_alloc(gb * (size_t)(rows / BQ_ROWS + 2), NULL) : NULL;
        tsr_bench_q8_0 *x = malloc(sizeof(tsr_bench_q8_0) * (size_t)(nb * 16));
        void *prep = aligned_alloc(64, tsr_ggml_tile_prep_bytes(TSR_TYPE_Q8_0, n, 16) + 64);
        float *y = malloc(sizeof(float) * (size_t)rows * 16), ref[16 * 64];
        bq_tok tk[16];
        int8_t *ap[8];
        if (!wf || !wv || (amx && !wa) || !x || !prep || !y) goto oom;
        for (int t = 0; t < 16; t++) {
            tk[t].sx = aligned_alloc(64, (size_t)nb * 64);
            tk[t].dx = malloc(sizeof(float) * (size_t)nb);
            if (!tk[t].sx || !tk[t].dx) goto oom;
        }
        for (int p = 0; p < 8; p++)
            if (!(ap[p] = aligned_alloc(64, (size_t)nb * 512))) goto oom;
        tsr_bench_fill_q8_0(wf, (size_t)(nb * rows), &g_s);
        tsr_bench_fill_q8_0(x, (size_t)(nb * 16), &g_s);
        for (int64_t g = 0; g < rows / BQ_ROWS; g++) {
            bq_pack(nb, wf + g * BQ_ROWS * nb, 0x80, wv + (size_t)g * gb);
            if (amx) bq_pack(nb, wf + g * BQ_ROWS * nb, 0, wa + (size_t)g * gb);
        }
        for (int t = 0; t < 16; t++) bq_tok_make(nb, x + t * nb, &tk[t]);
        for (int p = 0; p < 8; p++) bq_amx_a(nb, x + 2 * p * nb, x + (2 * p + 1) * nb, ap[p]);
        const bq_case c = {nb, gb, wf, wv, wa, tk, ap, prep, x};
        /* bit for bit against the library's row dots: 64 rows, 1..16 tokens */
        for (int t = 0; t < 16; t++)
            tsr_ggml_dot_rows(TSR_TYPE_Q8_0, TSR_GGML_VNNI, n, 64, wf,
                              sizeof(tsr_bench_q8_0) * (size_t)nb, x + t * nb, ref + t * 64);
        for (int kind = K_VNNI; kind <= (amx ? K_AMX : K_VNNI); kind++)
            for (int nt = 1; nt <= 16; nt++) {
                for (int64_t g = 0; g < 4; g++) {
                    if (kind == K_VNNI)
                        bq_vnni_group(nb, wv + (size_t)g * gb, gb, nt, tk, y + g * BQ_ROWS, 64);
                    else
                        bq_amx_group(nb, wa + (size_t)g * gb, gb, nt, tk, ap, y + g * BQ_ROWS, 64);
                }
                for (int i = 0; i < nt * 64; i++)
                    if (memcmp(&y[i], &ref[i], sizeof(float)) != 0) {
                        fprintf(stderr,
                                "bench_q8_layout: %s kernel, %d tokens, token %d row %d: expected "
                                "%.9g (tsr_ggml_dot_rows), got %.9g\n",
                                kind == K_VNNI ? "VNNI" : "AMX", nt, i / 64, i % 64, ref[i], y[i]);
                        return 1;
                    }
            }
        printf("  %lld columns: %s bit-identical to tsr_ggml_dot_rows (1..16 tokens)\n"
               "    tokens   cache (256 rows)              streaming (%lld rows, %zu MiB)\n",
               (long long)n, amx ? "both new kernels" : "the VNNI kernel", (long long)rows, mb);
        for (size_t i = 0; i < sizeof toks / sizeof *toks; i++) {
            const int nt = toks[i];
            for (int t = 0; t < nt; t++) tsr_ggml_tile_prep(n, nt, t, x + t * nb, prep);
            double r2[3] = {0}, rm[3] = {0};
            for (int kind = K_LIB; kind <= (amx ? K_AMX : K_VNNI); kind++) {
                r2[kind] = rate(kind, &c, 256, nt, y);
                rm[kind] = rate(kind, &c, rows, nt, y);
            }
            printf("    %4d     %5.2f / %5.2f / %5.2f     %5.2f / %5.2f / %5.2f  (%.1f / %.1f GB/s "
                   "of weights)\n",
                   nt, r2[0], r2[1], r2[2], rm[0], rm[1], rm[2], rm[0] * 64 * 34 / 32 / nt,
                   rm[1] * 64 * 34 / 32 / nt);
        }
        for (int t = 0; t < 16; t++) free(tk[t].sx), free(tk[t].dx);
        for (int p = 0; p < 8; p++) free(ap[p]);
        free(wf), free(wv), free(wa), free(x), free(prep), free(y);
    }
    return 0;
oom:
    fprintf(stderr, "bench_q8_layout: out of memory (it needs about 3 x TSR_BENCH_MB, 3 GiB by "
                    "default)\n");
    return 1;
}
#else
int main(void)
{
    printf("bench_q8_layout: x86-64 Linux only (AVX-512 VNNI, AMX)\n");
    return 0;
}
#endif
