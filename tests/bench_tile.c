/*
 * bench_tile.c — the VNNI Q8_0 register tile (kernels/dot_ggml.h, tsr_ggml_dot_tile_prep: the
 * several-token matmul of serving batches, speculative verification and prefill) against the
 * bound that ggml's order allows, measured in the same run.
 *
 * ggml's Q8_0 order needs every 4-product lane as a float: per vpdpbusd (a row pair x one
 * block x one token, 64 products) one float conversion and one FMA, three vector ops: where
 * 512-bit work has two ports, vpdpbusd on one of them (the Intel Xeon), at best 1.5 cycles a
 * vpdpbusd; on AMD Zen 4, whose vpdpbusd and FMA share two 256-bit pipes, 2 cycles.
 *
 *   clock      a chain of dependent integer adds (one a cycle): the core clock. (Until
 *              2026-12-06 512-bit FMA throughput / 2, right on the Intel Xeon's two 512-bit
 *              FMA ports but half the clock on AMD Zen 4, which issues one a cycle.)
 *   bare loop  the tile's inner three ops (vpdpbusd from a dot start, vsubps, FMA with a
 *              broadcast scale) over 2 row pairs x 8 tokens in L1, nothing else: the bound
 *   tile       the library's tile from cache (256 rows, L2) and streaming (1 GiB of rows on
 *              2 MiB pages advised for huge pages, as the engine's weight arena: more than
 *              twice this host's 480 MiB L3, which held the former 64 MiB), for 2..16 tokens
 * Beside them the lanes layout (kernels/q80_lanes.h) over the same rows repacked, counted the
 * same way (products / 64): its lanes order (opt-in), and ggml's order over it ("lanes, ggml":
 * what Q8_0 runs by default on AVX-512 VNNI CPUs, the same bound as the tile).
 * The tile in both register forms (kernels/dot_ggml.h: zmm, two rows' chains a register, the
 * default on Intel; ymm, one chain a register, the default on AMD), each counted in 512-bit
 * vpdpbusd equivalents (a ymm vpdpbusd counts half).
 * Each as vpdpbusd per ns and cycles per vpdpbusd at the measured clock, 1 thread, best of
 * REPS passes. The gap between "bare loop" and "tile" is what the tile spends besides the
 * three ops (the dot starts -128·Σw of each row pair and block, the scale products, the
 * row-pair permute, the loop); the gap to the forward pass (bench_batch) is what a matmul
 * adds around it.
 *
 *   bench_tile [COLS]      (default: 768 and 2048, the 100M shape's two row lengths)
 *
 * Not a ctest: CMake builds it with the tests (tests/bench.cmake). x86 with AVX-512 VNNI
 * only (elsewhere it says so and exits 0). Run it under `flock /work/bench.lock` and print
 * `uptime` beside its figures (the machine is shared).
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/dot_ggml.h"
#include "kernels/q80_lanes.h"
#include "kernels/quant.h"
#include "tests/bench.h"

enum { REPS = 9 };

#if defined(__x86_64__)
#include <immintrin.h>

#define TSR_BT_AVX512 __attribute__((target("fma,avx512f,avx512bw,avx512vnni"), noinline))

/* n iterations of 4 dependent one-cycle adds: 4 * n cycles. */
__attribute__((noinline)) static int64_t add_chain(int64_t n)
{
    int64_t x = 0;
    for (int64_t k = 0; k < n; k++)
        __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
    return x;
}

/* The tile's inner step alone: per iteration 2 row pairs x 8 tokens of
 * acc += scale * (float bits of (dot start + vpdpbusd) - magic): 16 vpdpbusd. */
TSR_BT_AVX512 static float bare_loop(int64_t n, const __m512i *x, const __m512i *w,
                                     const double *dd)
{
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    const __m512 kmf = _mm512_set1_ps(12582912.0f);
    for (int64_t k = 0; k < n; k++) {
        const __m512i w0 = w[(k & 7) * 2], w1 = w[(k & 7) * 2 + 1];
        const __m512i s0 = w[16 + (k & 7) * 2], s1 = w[17 + (k & 7) * 2];
#pragma GCC unroll 8
        for (int t = 0; t < 8; t++) {
            const __m512i xq = x[(k & 7) * 8 + t];
            acc[t] = _mm512_fmadd_ps(
                _mm512_castpd_ps(_mm512_set1_pd(dd[t])),
                _mm512_sub_ps(_mm512_castsi512_ps(_mm512_dpbusd_epi32(s0, xq, w0)), kmf), acc[t]);
            acc[8 + t] = _mm512_fmadd_ps(
                _mm512_castpd_ps(_mm512_set1_pd(dd[8 + t])),
                _mm512_sub_ps(_mm512_castsi512_ps(_mm512_dpbusd_epi32(s1, xq, w1)), kmf),
                acc[8 + t]);
        }
    }
    __m512 s = acc[0];
    for (int i = 1; i < 16; i++) s = _mm512_add_ps(s, acc[i]);
    return _mm512_reduce_add_ps(s);
}

static uint64_t g_s = 0x9E3779B97F4A7C15ull; /* tsr_bench_fill_q8_0's state */

/* Best of REPS single-thread passes of the tile over rows x n_tok, in vpdpbusd per ns
 * (rows / 2 pairs x blocks x tokens a pass). */
static double tile_rate(int64_t n, int64_t rows, const tsr_bench_q8_0 *w, int32_t n_tok,
                        const tsr_bench_q8_0 *x, const void *prep, float *y)
{
    const int64_t nb = n / 32;
    const size_t rb = sizeof(tsr_bench_q8_0) * (size_t)nb;
    const int reps = rows > 4096 ? REPS : 40 * REPS;
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        const double t0 = tsr_bench_now_s();
        tsr_ggml_dot_tile_prep(n, rows, w, rb, n_tok, 0, n_tok, prep, x, rb, y, (size_t)rows);
        const double t = tsr_bench_now_s() - t0;
        if (t < best) best = t;
    }
    return (double)rows / 2 * (double)nb * n_tok / best * 1e-9;
}

/* The same for the lanes layout (kernels/q80_lanes.h) over the same rows repacked: the lanes
 * order (ggml: false), or ggml's order over it (the default on AVX-512 VNNI; lprep is then
 * the tokens' Q8_0 rows as they are). */
static double lanes_rate(int64_t n, int64_t rows, const void *lanes, int32_t n_tok,
                         const void *lprep, bool ggml, float *y)
{
    const int64_t nb = n / 32;
    const int reps = rows > 4096 ? REPS : 40 * REPS;
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        const double t0 = tsr_bench_now_s();
        if (ggml)
            tsr_q80l_dot_ggml(TSR_GGML_VNNI, n, lanes, 0, rows, n_tok, lprep,
                              sizeof(tsr_bench_q8_0) * (size_t)nb, y, (size_t)rows);
        else
            tsr_q80l_dot(TSR_GGML_VNNI, n, lanes, 0, rows, n_tok, lprep, y, (size_t)rows);
        const double t = tsr_bench_now_s() - t0;
        if (t < best) best = t;
    }
    return (double)rows / 2 * (double)nb * n_tok / best * 1e-9;
}

int main(int argc, char **argv)
{
    if (!__builtin_cpu_supports("avx512vnni") || !__builtin_cpu_supports("avx512bw") ||
        tsr_ggml_isa() < TSR_GGML_VNNI) {
        printf("bench_tile: this CPU has no AVX-512 VNNI (or the kernels do not use it): the "
               "VNNI Q8_0 tile does not run here\n");
        return 0;
    }
    int64_t cols[2] = {768, 2048};
    int n_cols = 2;
    if (argc > 1) {
        cols[0] = atoll(argv[1]);
        n_cols = 1;
        if (cols[0] < 32 || cols[0] % 32 != 0 || cols[0] > 65536) {
            fprintf(stderr, "bench_tile: COLS must be a multiple of 32 in 32..65536, got '%s'\n",
                    argv[1]);
            return 2;
        }
    }
    const int64_t nf = 20000000;
    double clk = 0, bare = 0;
    for (int r = 0; r < 3; r++) {
        double t0 = tsr_bench_now_s();
        volatile int64_t f = add_chain(nf);
        (void)f;
        const double c = 4.0 * (double)nf / (tsr_bench_now_s() - t0) * 1e-9;
        if (c > clk) clk = c;
        static __m512i xs[64], ws[32];
        static double dd[16];
        for (int i = 0; i < 16; i++) dd[i] = 1e-3;
        t0 = tsr_bench_now_s();
        volatile float g = bare_loop(nf, xs, ws, dd);
        (void)g;
        const double b = 16.0 * (double)nf / (tsr_bench_now_s() - t0) * 1e-9;
        if (b > bare) bare = b;
    }
    printf("bench_tile: 1 thread, best of %d passes; clock %.2f GHz (a chain of dependent adds)\n",
           REPS, clk);
    printf("  bare loop (the bound: vpdpbusd + vsubps + FMA, in L1)  %5.2f vpdpbusd/ns  "
           "%4.2f cycles each\n",
           bare, clk / bare);
    static const int32_t toks[] = {1, 2, 5, 8, 9, 16};
    for (int c = 0; c < n_cols; c++) {
        const int64_t n = cols[c], nb = n / 32;
        const int64_t big = ((int64_t)1 << 30) / (int64_t)(sizeof(tsr_bench_q8_0) * nb) / 4 * 4;
        tsr_bench_q8_0 *w = tsr_bench_huge_alloc(sizeof(tsr_bench_q8_0) * (size_t)(nb * big), NULL);
        tsr_bench_q8_0 *x = malloc(sizeof(tsr_bench_q8_0) * (size_t)(nb * 16));
        void *prep =
            aligned_alloc(64, (tsr_ggml_tile_prep_bytes(TSR_TYPE_Q8_0, n, 16) + 63) / 64 * 64);
        float *y = malloc(sizeof(float) * (size_t)big * 16);
        /* the same rows in the lanes layout, and the tokens' lanes prep */
        void *lanes = tsr_bench_huge_alloc(tsr_q80l_bytes(n, big), NULL);
        void *lprep = aligned_alloc(64, (tsr_q80l_prep_bytes(n, 16) + 63) / 64 * 64);
        if (!w || !x || !prep || !y || !lanes || !lprep) {
            fprintf(stderr, "bench_tile: out of memory\n");
            return 1;
        }
        tsr_bench_fill_q8_0(w, (size_t)(nb * big), &g_s);
        tsr_bench_fill_q8_0(x, (size_t)(nb * 16), &g_s);
        tsr_q80l_repack(n, big, w, sizeof(tsr_bench_q8_0) * (size_t)nb, lanes);
        for (int32_t t = 0; t < 16; t++)
            tsr_q80l_prep(n, x + t * nb, (uint8_t *)lprep + (size_t)t * tsr_q80l_prep_bytes(n, 1));
        printf("  tile, %lld columns    tokens   L2 (256 rows)          streaming (%lld rows, "
               "1 GiB)\n",
               (long long)n, (long long)big);
        for (size_t i = 0; i < sizeof toks / sizeof *toks; i++) {
            const int32_t nt = toks[i];
            for (int32_t t = 0; t < nt; t++) tsr_ggml_tile_prep(n, nt, t, x + t * nb, prep);
            for (int ymm = 0; ymm <= 1; ymm++) { /* both register forms (dot_ggml.h) */
                tsr_ggml_dot_set_tile_ymm(ymm);
                const double a = tile_rate(n, 256, w, nt, x, prep, y);
                const double s = tile_rate(n, big, w, nt, x, prep, y);
                printf("                     %s %4d   %5.2f /ns %4.2f cycles   %5.2f /ns %4.2f "
                       "cycles\n",
                       ymm ? "ymm" : "zmm", nt, a, clk / a, s, clk / s);
            }
            tsr_ggml_dot_set_tile_ymm(-1);
            for (int g = 0; g <= 1; g++) {
                const double a = lanes_rate(n, 256, lanes, nt, g ? (const void *)x : lprep, g, y);
                const double s = lanes_rate(n, big, lanes, nt, g ? (const void *)x : lprep, g, y);
                printf("          %s %4d   %5.2f /ns %4.2f cycles   %5.2f /ns %4.2f "
                       "cycles\n",
                       g ? "lanes, ggml" : "     lanes", nt, a, clk / a, s, clk / s);
            }
        }
        free(w);
        free(x);
        free(prep);
        free(y);
        free(lprep);
        free(lanes);
    }
    return 0;
}
#else
int main(void)
{
    printf("bench_tile: x86 only (the VNNI Q8_0 tile)\n");
    return 0;
}
#endif
