/*
 * bench_quant.c — throughput of tsr_vec_dot_rows in GB/s of weight bytes, the decode
 * matmul's inner loop: a ~64 MiB weight matrix (rows x 2048, larger than the L3 cache, so
 * this measures streaming from memory) times one activation row, single thread and two
 * threads (rows split in halves), for every instruction set this CPU has.
 *
 * Then the prefill kernel: tsr_vec_dot_tile over 128 tokens against the same tokens one by
 * one through tsr_vec_dot_rows, in 32-element block dots per nanosecond (one thread, a
 * matrix of TSR_BENCH_TILE_ROWS rows, default 2048: 4.4 MiB of Q8_0, mostly in L3).
 *
 * TSR_BENCH_TYPES=Q5_0,Q4_K (names, comma-separated) limits the types; TSR_BENCH_ISAS=avx2
 * the instruction sets; TSR_BENCH_MB the decode matrix size; TSR_BENCH_COLS the row length
 * (default 2048; 8192 is the 1B shape's ffn_down, 896 Qwen2.5-0.5B's rows: types whose block
 * does not divide it are skipped).
 *
 * Not a ctest: CMake builds it with the tests (tests/bench.cmake). Run:
 *   cmake --build build --target bench_quant && flock /work/bench.lock build/tests/bench_quant
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/quant.h"
#include "tests/bench.h"

enum { REPS = 12 };
/* elements per row: TSR_BENCH_COLS (default 2048; a multiple of 32) */
static int64_t N_COLS = 2048;

typedef struct {
    uint32_t type;
    int64_t rows;
    const uint8_t *w;
    size_t stride;
    const void *x;
    float *y;
} job;

static void *run_job(void *arg)
{
    const job *j = arg;
    tsr_vec_dot_rows(j->type, N_COLS, j->rows, j->w, j->stride, j->x, j->y);
    return NULL;
}

/* Median and best of REPS times for one pass over the matrix with `threads` threads (the
 * best is the better estimate on a shared, noisy machine). */
static void time_pass(uint32_t type, int64_t rows, const uint8_t *w, size_t stride, const void *x,
                      float *y, int threads, double *median, double *best)
{
    double t[REPS];
    for (int rep = 0; rep < REPS; ++rep) {
        const double t0 = tsr_bench_now_s();
        if (threads == 1) {
            tsr_vec_dot_rows(type, N_COLS, rows, w, stride, x, y);
        } else {
            job jobs[2];
            pthread_t th;
            const int64_t half = rows / 2 / 4 * 4;
            jobs[0] = (job){type, half, w, stride, x, y};
            jobs[1] = (job){type, rows - half, w + (size_t)half * stride, stride, x, y + half};
            pthread_create(&th, NULL, run_job, &jobs[1]);
            run_job(&jobs[0]);
            pthread_join(th, NULL);
        }
        t[rep] = tsr_bench_now_s() - t0;
    }
    *median = tsr_bench_median(t, REPS); /* sorts t */
    *best = t[0];
}

/* Prefill: rows x 128 tokens of Q8_0 / Q4_0 / Q4_1 / Q5_0 at n = N_COLS, best of REPS, in
 * block dots/ns. */
/* Whether `name` is selected by the comma-separated list in environment variable `var`
 * (unset: everything). */
static int selected(const char *var, const char *name)
{
    const char *list = getenv(var);
    if (!list || !*list) return 1;
    const size_t n = strlen(name);
    for (const char *p = list; *p;) {
        const char *e = strchr(p, ',');
        const size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && strncmp(p, name, n) == 0) return 1;
        p += len + (e ? 1 : 0);
    }
    return 0;
}

static void bench_tiles(void)
{
    enum { N_TOK = 128 };
    static const uint32_t types[] = {TSR_TYPE_Q8_0, TSR_TYPE_Q4_0, TSR_TYPE_Q4_1, TSR_TYPE_Q5_0};
    static const char *const isas[] = {"avx512vnni", "avx2", "scalar"};
    const char *env = getenv("TSR_BENCH_TILE_ROWS");
    const int64_t rows = env && atoi(env) > 0 ? atoi(env) : 2048;
    printf("\nprefill, %lld rows x %d tokens: 32-element block dots per ns, best of %d\n",
           (long long)rows, N_TOK, REPS);
    printf("%-6s %-11s %10s %10s\n", "type", "isa", "tile", "rows");
    for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ++ti) {
        const uint32_t type = types[ti];
        if (!selected("TSR_BENCH_TYPES", tsr_type_name(type))) continue;
        const uint32_t xtype = tsr_type_vec_dot_type(type);
        const size_t rb = tsr_row_bytes(type, N_COLS), xb = tsr_row_bytes(xtype, N_COLS);
        uint8_t *w = malloc((size_t)rows * rb), *x = malloc(xb * N_TOK);
        float *f = malloc(sizeof(float) * N_COLS), *y = malloc(sizeof(float) * rows * N_TOK);
        if (!w || !x || !f || !y) exit(1);
        uint64_t s = 88172645463325252ULL;
        for (int64_t r = 0; r < rows + N_TOK; ++r) {
            for (int i = 0; i < N_COLS; ++i) {
                s ^= s << 13, s ^= s >> 7, s ^= s << 17;
                f[i] = (float)((double)(s >> 11) * 0x1p-53 - 0.5);
            }
            if (r < rows)
                tsr_quant_row(type, f, w + (size_t)r * rb, N_COLS);
            else
                tsr_quant_row(xtype, f, x + (size_t)(r - rows) * xb, N_COLS);
        }
        const double dots = (double)rows * N_TOK * (N_COLS / 32);
        for (size_t k = 0; k < sizeof isas / sizeof isas[0]; ++k) {
            if (!selected("TSR_BENCH_ISAS", isas[k]) || !tsr_quant_set_isa(isas[k])) continue;
            double best_tile = 1e30, best_rows = 1e30;
            for (int rep = 0; rep < REPS; ++rep) {
                double t0 = tsr_bench_now_s();
                tsr_vec_dot_tile(type, N_COLS, rows, w, rb, N_TOK, x, xb, y, (size_t)rows);
                const double dt = tsr_bench_now_s() - t0;
                if (dt < best_tile) best_tile = dt;
                t0 = tsr_bench_now_s();
                for (int t = 0; t < N_TOK; ++t)
                    tsr_vec_dot_rows(type, N_COLS, rows, w, rb, x + (size_t)t * xb,
                                     y + (size_t)t * rows);
                const double dr = tsr_bench_now_s() - t0;
                if (dr < best_rows) best_rows = dr;
                if (k == 2) break; /* scalar: one pass is plenty */
            }
            printf("%-6s %-11s %10.2f %10.2f\n", tsr_type_name(type), isas[k],
                   dots / best_tile * 1e-9, dots / best_rows * 1e-9);
            fflush(stdout);
        }
        free(w);
        free(x);
        free(f);
        free(y);
    }
    tsr_quant_set_isa(NULL);
}

int main(void)
{
    static const uint32_t types[] = {TSR_TYPE_Q8_0, TSR_TYPE_Q4_0, TSR_TYPE_Q4_1, TSR_TYPE_Q5_0,
                                     TSR_TYPE_Q5_1, TSR_TYPE_Q2_K, TSR_TYPE_Q3_K, TSR_TYPE_Q4_K,
                                     TSR_TYPE_Q5_K, TSR_TYPE_Q6_K, TSR_TYPE_F16,  TSR_TYPE_BF16,
                                     TSR_TYPE_F32};
    static const char *const isas[] = {"avx512vnni", "avx2", "scalar"};
    /* TSR_BENCH_MB: matrix size (default 64 MiB; e.g. 1 to measure in-cache compute) */
    const char *mb = getenv("TSR_BENCH_MB");
    const size_t matrix_bytes = (size_t)(mb && atof(mb) > 0 ? atof(mb) : 64.0) * (1 << 20);
    const char *cols = getenv("TSR_BENCH_COLS");
    if (cols && atoi(cols) >= 32 && atoi(cols) % 32 == 0) N_COLS = atoi(cols);
    printf("GB/s of weight bytes, median / best of %d passes\n", REPS);
    printf("%-6s %-11s %8s %15s %15s\n", "type", "isa", "rows", "1 thread", "2 threads");
    for (size_t t = 0; t < sizeof types / sizeof types[0]; ++t) {
        const uint32_t type = types[t], xtype = tsr_type_vec_dot_type(type);
        if (!selected("TSR_BENCH_TYPES", tsr_type_name(type))) continue;
        const size_t rb = tsr_row_bytes(type, N_COLS);
        if (!rb) continue; /* N_COLS is not a multiple of this type's block */
        const int64_t rows = (int64_t)(matrix_bytes / rb) / 4 * 4;
        uint8_t *w = malloc((size_t)rows * rb);
        float *f = malloc(sizeof(float) * N_COLS * 64);
        uint8_t *x = malloc(tsr_row_bytes(xtype, N_COLS));
        float *y = malloc(sizeof(float) * (size_t)rows);
        if (!w || !f || !x || !y) return 1;
        uint64_t s = 88172645463325252ULL;
        for (int i = 0; i < N_COLS * 64; ++i) {
            s ^= s << 13, s ^= s >> 7, s ^= s << 17;
            f[i] = (float)((double)(s >> 11) * 0x1p-53 - 0.5);
        }
        /* quantize 64 distinct rows, repeat them over the matrix (quantizing 64 MiB of
         * K-quants would take longer than the benchmark) */
        for (int r = 0; r < 64; ++r)
            tsr_quant_row(type, f + (size_t)r * N_COLS, w + (size_t)r * rb, N_COLS);
        for (int64_t r = 64; r < rows; ++r)
            memcpy(w + (size_t)r * rb, w + (size_t)(r % 64) * rb, rb);
        tsr_quant_row(xtype, f, x, N_COLS);
        for (size_t k = 0; k < sizeof isas / sizeof isas[0]; ++k) {
            if (!selected("TSR_BENCH_ISAS", isas[k]) || !tsr_quant_set_isa(isas[k])) continue;
            const double bytes = (double)rows * (double)rb;
            double m1, b1, m2, b2;
            time_pass(type, rows, w, rb, x, y, 1, &m1, &b1);
            time_pass(type, rows, w, rb, x, y, 2, &m2, &b2);
            printf("%-6s %-11s %8lld %7.1f / %5.1f %7.1f / %5.1f\n", tsr_type_name(type), isas[k],
                   (long long)rows, bytes / m1 * 1e-9, bytes / b1 * 1e-9, bytes / m2 * 1e-9,
                   bytes / b2 * 1e-9);
            fflush(stdout);
        }
        free(w);
        free(f);
        free(x);
        free(y);
    }
    tsr_quant_set_isa(NULL);
    bench_tiles();
    return 0;
}
