/* bench_verify.c — the matmuls of a speculative verification step on the 1B Q8_0 shape
 * (n_embd 2048, n_ff 8192, 8 KV heads of 64): per layer wq+wk+wv (one multi-matmul), wo,
 * gate+up, down, over L layers of weights distinct in memory (more than the last-level cache,
 * so every step streams them as decode does), for 1..8 tokens through tsr_matmul_multi with a
 * pool of -t threads. Prints ms per pass and the cost relative to one token: the matmul part
 * of `tessera bench --verify-cost` without attention, norms or the head.
 *
 *   bench_verify [THREADS] [LAYERS]     (defaults 2, 8; ~380 MB of weights)
 *   TSR_Q80_ORDER=lanes bench_verify    the same in the lanes order (kernels/q80_lanes.h)
 *   TSR_Q80_LANES=0 bench_verify        ggml's order over the file layout, not the lanes
 *                                       layout AVX-512 VNNI CPUs load
 *
 * A program that prints figures, not a test: run it under `flock /work/bench.lock` and print
 * `uptime` beside its figures (the machine is shared). */
#include "kernels/ops.h"
#include "kernels/q80_lanes.h"
#include "kernels/pool.h"
#include "kernels/quant.h"
#include "tests/bench.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { N_EMBD = 2048, N_FF = 8192, N_KV = 512, MAX_TOK = 8, REPS = 7 };

static uint64_t g_s = 88172645463325252ULL;
static float rnd(void)
{
    g_s ^= g_s << 13, g_s ^= g_s >> 7, g_s ^= g_s << 17;
    return (float)((double)(g_s >> 11) * 0x1p-53 - 0.5);
}

/* n_out rows of n_in Q8_0 values, random. */
static tsr_weight mkw(int64_t n_in, int64_t n_out)
{
    tsr_weight w = {.type = TSR_TYPE_Q8_0, .n_in = n_in, .n_out = n_out};
    w.row_bytes = tsr_row_bytes(TSR_TYPE_Q8_0, n_in);
    uint8_t *d = malloc(w.row_bytes * (size_t)n_out);
    float *f = malloc(sizeof(float) * (size_t)n_in);
    if (!d || !f) {
        fprintf(stderr, "bench_verify: out of memory\n");
        exit(1);
    }
    for (int64_t r = 0; r < n_out; ++r) {
        for (int64_t i = 0; i < n_in; ++i) f[i] = rnd();
        tsr_quant_row(TSR_TYPE_Q8_0, f, d + (size_t)r * w.row_bytes, n_in);
    }
    free(f);
    w.data = d;
    /* TSR_Q80_ORDER=lanes, or ggml's order on AVX-512 VNNI (TSR_Q80_LANES=0: the file
     * layout): the lanes layout, as a load would make */
    if (tsr_q80l_on() || tsr_q80l_ggml_chosen()) {
        void *l = aligned_alloc(64, (tsr_q80l_bytes(n_in, n_out) + 63) / 64 * 64);
        if (!l || tsr_q80l_repack(n_in, n_out, d, w.row_bytes, l) != 0) {
            fprintf(stderr, "bench_verify: out of memory\n");
            exit(1);
        }
        w.lanes = l;
        w.lanes_ggml = !tsr_q80l_on();
    }
    return w;
}

int main(int argc, char **argv)
{
    const int n_th = argc > 1 ? atoi(argv[1]) : 2, n_l = argc > 2 ? atoi(argv[2]) : 8;
    if (n_th < 1 || n_l < 1) {
        fprintf(stderr, "usage: bench_verify [THREADS] [LAYERS]\n");
        return 2;
    }
    tsr_pool *pool = tsr_pool_new(n_th);
    /* per layer: [0] wq [1] wk [2] wv [3] wo [4] gate [5] up [6] down */
    tsr_weight(*lw)[7] = malloc(sizeof *lw * (size_t)n_l);
    if (!pool || !lw) return 1;
    for (int l = 0; l < n_l; ++l) {
        lw[l][0] = mkw(N_EMBD, N_EMBD), lw[l][1] = mkw(N_EMBD, N_KV), lw[l][2] = mkw(N_EMBD, N_KV);
        lw[l][3] = mkw(N_EMBD, N_EMBD), lw[l][4] = mkw(N_EMBD, N_FF), lw[l][5] = mkw(N_EMBD, N_FF);
        lw[l][6] = mkw(N_FF, N_EMBD);
    }
    float *x = malloc(sizeof(float) * N_FF * MAX_TOK), *y[3];
    for (int k = 0; k < 3; ++k) y[k] = malloc(sizeof(float) * N_FF * MAX_TOK);
    /* the largest of the four matmuls' scratch (conversion and the Q8_0 tiles' prep) */
    const tsr_weight *sq[3] = {&lw[0][0], &lw[0][1], &lw[0][2]}, *sg[2] = {&lw[0][4], &lw[0][5]};
    size_t sc_bytes = tsr_matmul_multi_scratch_bytes(sq, 3, MAX_TOK);
    const size_t sc_more[3] = {tsr_matmul_multi_scratch_bytes(sg, 2, MAX_TOK),
                               tsr_matmul_scratch_bytes(&lw[0][3], MAX_TOK),
                               tsr_matmul_scratch_bytes(&lw[0][6], MAX_TOK)};
    for (int k = 0; k < 3; ++k) sc_bytes = sc_more[k] > sc_bytes ? sc_more[k] : sc_bytes;
    void *scratch = malloc(sc_bytes);
    for (int i = 0; i < N_FF * MAX_TOK; ++i) x[i] = rnd();
    size_t n_bytes = 0;
    for (int k = 0; k < 7; ++k) n_bytes += lw[0][k].row_bytes * (size_t)lw[0][k].n_out;
    n_bytes *= (size_t)n_l;
    printf("bench_verify: %d threads, %d layers of the 1B Q8_0 shape (%.0f MB), isa %s, "
           "median of %d, Q8_0 order %s (%s)\n",
           n_th, n_l, (double)n_bytes / 1e6, tsr_quant_isa(), REPS,
           tsr_q80l_on() ? "lanes" : "ggml",
           tsr_q80l_on() || tsr_q80l_ggml_chosen() ? "lanes layout" : "file layout");
    printf("%6s %10s %8s %8s\n", "tokens", "ms", "GB/s", "x 1 tok");
    double t1 = 0;
    if (getenv("TSR_BENCH_STREAM")) { /* the kernels alone over the layers' gate weights */
        const size_t xb = tsr_row_bytes(TSR_TYPE_Q8_0, N_EMBD);
        void *xq = malloc(xb * MAX_TOK);
        for (int t = 0; t < MAX_TOK; ++t)
            tsr_quant_act_row(TSR_TYPE_Q8_0, x + (size_t)t * N_EMBD, (uint8_t *)xq + t * xb,
                              N_EMBD);
        for (int mode = 0; mode < 2; ++mode)
            for (int nt = 1; nt <= 5; ++nt) {
                double best = 1e30;
                for (int rep = 0; rep < REPS; ++rep) {
                    const double t0 = tsr_bench_now_s();
                    for (int l = 0; l < n_l; ++l) {
                        const tsr_weight *g = &lw[l][4];
                        if (mode == 0)
                            for (int t = 0; t < nt; ++t)
                                tsr_vec_dot_rows(TSR_TYPE_Q8_0, N_EMBD, g->n_out, g->data,
                                                 g->row_bytes, (uint8_t *)xq + t * xb, y[0]);
                        else
                            tsr_vec_dot_tile(TSR_TYPE_Q8_0, N_EMBD, g->n_out, g->data, g->row_bytes,
                                             nt, xq, xb, y[0], g->n_out);
                    }
                    const double dt = tsr_bench_now_s() - t0;
                    if (dt < best) best = dt;
                }
                printf("stream %s nt %d: %.2f ms\n", mode ? "tile" : "rows", nt, best * 1e3);
            }
        return 0;
    }
    const char *only = getenv("TSR_BENCH_NT"); /* one token count only (profiling) */
    for (int nt = 1; nt <= MAX_TOK; ++nt) {
        if (only && atoi(only) != nt) continue;
        double ts[REPS];
        for (int rep = 0; rep < REPS; ++rep) {
            const double t0 = tsr_bench_now_s();
            for (int l = 0; l < n_l; ++l) {
                const tsr_weight *qkv[3] = {&lw[l][0], &lw[l][1], &lw[l][2]};
                tsr_matmul_multi(pool, qkv, y, 3, x, nt, scratch);
                tsr_matmul(pool, &lw[l][3], x, nt, y[0], scratch);
                const tsr_weight *gu[2] = {&lw[l][4], &lw[l][5]};
                tsr_matmul_multi(pool, gu, y, 2, x, nt, scratch);
                tsr_matmul(pool, &lw[l][6], x, nt, y[0], scratch);
            }
            ts[rep] = tsr_bench_now_s() - t0;
        }
        const double t = tsr_bench_median(ts, REPS);
        if (nt == 1 || t1 == 0) t1 = t;
        printf("%6d %10.2f %8.2f %8.2f\n", nt, t * 1e3, (double)n_bytes / t * 1e-9, t / t1);
        fflush(stdout);
    }
    /* The kernels alone: one thread, 512 rows of 2048 (1.1 MB, cache-resident), repeated. */
    printf("cache-resident, 1 thread, 512 x 2048: 32-element block dots per ns\n");
    {
        tsr_weight h = mkw(N_EMBD, 512);
        void *xq = malloc(tsr_row_bytes(TSR_TYPE_Q8_0, N_EMBD) * MAX_TOK);
        const size_t xb = tsr_row_bytes(TSR_TYPE_Q8_0, N_EMBD);
        for (int t = 0; t < MAX_TOK; ++t)
            tsr_quant_act_row(TSR_TYPE_Q8_0, x + (size_t)t * N_EMBD, (uint8_t *)xq + t * xb,
                              N_EMBD);
        for (int nt = 1; nt <= MAX_TOK; ++nt) {
            double ts[REPS];
            for (int rep = 0; rep < REPS; ++rep) {
                const double t0 = tsr_bench_now_s();
                for (int it = 0; it < 20; ++it) {
                    if (nt == 1)
                        tsr_vec_dot_rows(TSR_TYPE_Q8_0, N_EMBD, 512, h.data, h.row_bytes, xq, y[0]);
                    else
                        tsr_vec_dot_tile(TSR_TYPE_Q8_0, N_EMBD, 512, h.data, h.row_bytes, nt, xq,
                                         xb, y[0], 512);
                }
                ts[rep] = tsr_bench_now_s() - t0;
            }
            printf("%6d %8.2f\n", nt,
                   20.0 * 512 * (N_EMBD / 32) * nt / tsr_bench_median(ts, REPS) * 1e-9);
        }
    }
    tsr_pool_free(pool);
    return 0;
}
