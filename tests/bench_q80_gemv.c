/*
 * bench_q80_gemv.c — the one-token Q8_0 GEMV (kernels/q80_gemv.h) against the generic row
 * dots it replaced (tsr_ggml_dot_rows; on AMD CPUs still the choice, kernels/quant.h) and a
 * plain read of the same bytes.
 *
 * Streaming: a 1 GiB matrix (TSR_BENCH_MB; more than twice the largest L3 met here, 480 MiB:
 * at the former 64 MiB the "streaming" figures came from the L3, 46-50 GB/s at 2 threads), on
 * 2 MiB pages advised for transparent huge pages as the engine's weight arena is, one token, 1 and
 * 2 threads (rows split in halves, 4-row aligned), the three passes interleaved REPS times so that
 * the shared host's drifting load hits all of them alike; prints the medians in GB/s of weight
 * bytes and the median of the per-pass ratios (gemv / read: the share of the bandwidth the kernel
 * streams at; gemv / rows: the speed-up). The read is the faster of tsr_membw_probe_read's loops
 * (kernels/membw.h; until 2026-12-06 one loop of 8 scalar chains, a fifth slower here). From cache:
 * a 136 KiB matrix (64 rows of 2048, L2-resident), best of REPS, in ns per 32-element block dot:
 * the compute cost per block. Row lengths: 2048 (the 1B shape's q/k/v/o/gate/up) and 8192 (its
 * ffn_down); TSR_BENCH_COLS=N for one other. TSR_BENCH_ISAS=avx2 limits the ISAs.
 *
 * Not a ctest: CMake builds it with the tests (tests/bench.cmake). Run:
 *   cmake --build build --target bench_q80_gemv && uptime &&
 *   flock /work/bench.lock build/tests/bench_q80_gemv
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/dot_ggml.h"
#include "kernels/membw.h"
#include "kernels/quant.h"
#include "tests/bench.h"

enum { REPS = 15 };

typedef struct {
    int mode; /* 0: tsr_vec_dot_rows (the GEMV), 1: tsr_ggml_dot_rows, 2 + k: plain read with
                 tsr_membw_read_slice's loop k */
    int isa;
    int64_t n, rows;
    const uint8_t *w;
    size_t stride;
    const void *x;
    float *y;
    uint64_t sink;
} job;

static void *run_job(void *arg)
{
    job *j = arg;
    if (j->mode == 0) {
        tsr_vec_dot_rows(TSR_TYPE_Q8_0, j->n, j->rows, j->w, j->stride, j->x, j->y);
    } else if (j->mode == 1) {
        tsr_ggml_dot_rows(TSR_TYPE_Q8_0, j->isa, j->n, j->rows, j->w, j->stride, j->x, j->y);
    } else {
        j->sink = tsr_membw_read_slice(j->w, (size_t)j->rows * j->stride, j->mode - 2);
    }
    return NULL;
}

/* One pass over the matrix with `threads` threads (1 or 2); GB/s of weight bytes. */
static double pass(int mode, int isa, int threads, int64_t n, int64_t rows, const uint8_t *w,
                   size_t rb, const void *x, float *y)
{
    job j[2];
    const double t0 = tsr_bench_now_s();
    if (threads == 1) {
        j[0] = (job){mode, isa, n, rows, w, rb, x, y, 0};
        run_job(&j[0]);
    } else {
        const int64_t half = rows / 2 / 4 * 4;
        j[0] = (job){mode, isa, n, half, w, rb, x, y, 0};
        j[1] = (job){mode, isa, n, rows - half, w + (size_t)half * rb, rb, x, y + half, 0};
        pthread_t th;
        if (pthread_create(&th, NULL, run_job, &j[1]) != 0) {
            run_job(&j[1]); /* no second thread: run it here (the figure says less then) */
            run_job(&j[0]);
        } else {
            run_job(&j[0]);
            pthread_join(th, NULL);
        }
    }
    return (double)rows * (double)rb / (tsr_bench_now_s() - t0) * 1e-9;
}

/* A matrix of `rows` rows of n Q8_0 elements (64 distinct quantized rows repeated) and a
 * token; returns the row bytes. */
static size_t make(int64_t n, int64_t rows, uint8_t **w, uint8_t **x, float **y)
{
    const size_t rb = tsr_row_bytes(TSR_TYPE_Q8_0, n);
    *w = tsr_bench_huge_alloc((size_t)rows * rb, NULL);
    *x = malloc(rb);
    *y = malloc(sizeof(float) * (size_t)rows);
    float *f = malloc(sizeof(float) * (size_t)n);
    if (!*w || !*x || !*y || !f) {
        fprintf(stderr, "bench_q80_gemv: out of memory\n");
        exit(1);
    }
    uint64_t s = 88172645463325252ULL;
    for (int64_t r = 0; r <= 64 && r <= rows; ++r) {
        for (int64_t i = 0; i < n; ++i) {
            s ^= s << 13, s ^= s >> 7, s ^= s << 17;
            f[i] = (float)((double)(s >> 11) * 0x1p-53 - 0.5);
        }
        if (r < 64 && r < rows)
            tsr_quant_row(TSR_TYPE_Q8_0, f, *w + (size_t)r * rb, n);
        else
            tsr_quant_act_row(TSR_TYPE_Q8_0, f, *x, n);
    }
    for (int64_t r = 64; r < rows; ++r) memcpy(*w + (size_t)r * rb, *w + (size_t)(r % 64) * rb, rb);
    free(f);
    return rb;
}

static void bench_cols(int64_t n, const char *isa_name, int isa, size_t matrix_bytes)
{
    uint8_t *w, *x;
    float *y;
    /* streaming */
    const int64_t rows = (int64_t)(matrix_bytes / tsr_row_bytes(TSR_TYPE_Q8_0, n)) / 4 * 4;
    const size_t rb = make(n, rows, &w, &x, &y);
    for (int threads = 1; threads <= 2; ++threads) {
        double g[REPS], o[REPS], m[REPS], gm[REPS], go[REPS];
        for (int i = 0; i < REPS; ++i) {
            g[i] = pass(0, isa, threads, n, rows, w, rb, x, y);
            o[i] = pass(1, isa, threads, n, rows, w, rb, x, y);
            m[i] = 0.0; /* the faster of tsr_membw_probe_read's loops, as the engine's roofline */
            for (int k = 0; k < TSR_MEMBW_LOOPS; ++k) {
                const double r = pass(2 + k, isa, threads, n, rows, w, rb, x, y);
                if (r > m[i]) m[i] = r;
            }
            gm[i] = g[i] / m[i];
            go[i] = g[i] / o[i];
        }
        printf("%-11s %6lld  %d thr   %6.1f %6.1f %6.1f   %5.2f %5.3f\n", isa_name, (long long)n,
               threads, tsr_bench_median(g, REPS), tsr_bench_median(o, REPS),
               tsr_bench_median(m, REPS), tsr_bench_median(gm, REPS), tsr_bench_median(go, REPS));
        fflush(stdout);
    }
    free(w);
    free(x);
    free(y);
    /* from cache: 64 rows */
    const size_t rbc = make(n, 64, &w, &x, &y);
    double bg = 1e30, bo = 1e30;
    const int inner = (int)(2e7 / ((double)rbc * 64)) + 1;
    for (int i = 0; i < REPS; ++i) {
        double t0 = tsr_bench_now_s();
        for (int k = 0; k < inner; ++k) tsr_vec_dot_rows(TSR_TYPE_Q8_0, n, 64, w, rbc, x, y);
        const double dg = (tsr_bench_now_s() - t0) / inner;
        t0 = tsr_bench_now_s();
        for (int k = 0; k < inner; ++k) tsr_ggml_dot_rows(TSR_TYPE_Q8_0, isa, n, 64, w, rbc, x, y);
        const double dr = (tsr_bench_now_s() - t0) / inner;
        bg = dg < bg ? dg : bg;
        bo = dr < bo ? dr : bo;
    }
    const double dots = 64.0 * (double)(n / 32);
    printf("%-11s %6lld  cache    %6.3f %6.3f ns per block dot (64 rows, %.0f KiB)\n", isa_name,
           (long long)n, bg / dots * 1e9, bo / dots * 1e9, (double)rbc * 64 / 1024);
    fflush(stdout);
    free(w);
    free(x);
    free(y);
}

static int selected_isa(const char *name)
{
    const char *list = getenv("TSR_BENCH_ISAS");
    return !list || !*list || strstr(list, name) != NULL;
}

int main(void)
{
    static const char *const isas[] = {"avx512vnni", "avx2"};
    static const int levels[] = {TSR_GGML_VNNI, TSR_GGML_AVX2};
    const char *mb = getenv("TSR_BENCH_MB");
    const size_t matrix_bytes = (size_t)(mb && atof(mb) > 0 ? atof(mb) : 1024.0) * (1 << 20);
    const char *cols = getenv("TSR_BENCH_COLS");
    int64_t col_list[2] = {2048, 8192};
    int n_cols = 2;
    if (cols && atoi(cols) >= 32 && atoi(cols) % 32 == 0) col_list[0] = atoi(cols), n_cols = 1;
    /* "gemv": tsr_vec_dot_rows with the GEMV (on AMD CPUs its default is the row dots,
     * kernels/quant.h) */
    tsr_quant_set_q80_row_dots(0);
    printf("Q8_0 one token: gemv = tsr_vec_dot_rows (kernels/q80_gemv), rows = tsr_ggml_dot_rows,\n"
           "read = a plain read of the same bytes; streaming %zu MiB: medians of %d interleaved "
           "passes, GB/s\n",
           matrix_bytes >> 20, REPS);
    printf("%-11s %6s  %-7s %6s %6s %6s   %5s %5s\n", "isa", "cols", "", "gemv", "rows", "read",
           "g/rd", "g/row");
    for (size_t k = 0; k < sizeof isas / sizeof isas[0]; ++k) {
        if (!selected_isa(isas[k]) || !tsr_quant_set_isa(isas[k])) continue;
        for (int c = 0; c < n_cols; ++c) bench_cols(col_list[c], isas[k], levels[k], matrix_bytes);
    }
    tsr_quant_set_isa(NULL);
    tsr_quant_set_q80_row_dots(-1);
    return 0;
}
