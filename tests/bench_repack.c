/*
 * bench_repack.c — the repacked kernels (kernels/repack.h) against the file-layout ones
 * (kernels/quant.h) on the same weights, for the decision of kernels/ops.c and the load:
 *  - decode: one token through a ~64 MiB matrix (TSR_BENCH_MB: set it above the L3 for
 *    figures from memory; this host's 480 MiB L3 holds 64 MiB, and the output buffer grows
 *    with it), tsr_vec_dot_rows vs tsr_repack_dot, 1 and 2 threads, in GB/s of weight bytes
 *    (the file layout's bytes for both, so the figures compare time);
 *  - prefill: 128 tokens through a 2048 x 2048 matrix (mostly L2/L3), tsr_vec_dot_tile vs
 *    tsr_repack_dot, one thread, in 32-element block dots per ns.
 * Medians of REPS passes (the machine is shared; run under flock /work/bench.lock).
 *
 * TSR_BENCH_TYPES=Q8_0,Q4_K limits the types, TSR_BENCH_ISAS=avx2 the instruction sets
 * (default: the best this CPU has), TSR_BENCH_MB the decode matrix size.
 *
 * Not a ctest: CMake builds it with the tests (tests/bench.cmake). Run:
 *   cmake --build build --target bench_repack && flock /work/bench.lock build/tests/bench_repack
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/quant.h"
#include "kernels/repack.h"
#include "tests/bench.h"

enum { N_COLS = 2048, REPS = 9, N_TOK = 128 };

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

typedef struct {
    uint32_t type;
    int packed; /* 0: rows of the file layout, 1: repacked */
    int64_t r0, nr;
    const uint8_t *w; /* rows (file layout) or the repacked matrix */
    size_t stride;
    int32_t n_tok;
    const uint8_t *x;
    size_t xs;
    float *y;
    size_t ys;
} job;

static void run(const job *j)
{
    if (j->packed) {
        tsr_repack_dot(j->type, N_COLS, j->w, j->r0, j->nr, j->n_tok, j->x, j->xs, j->y + j->r0,
                       j->ys);
    } else if (j->n_tok == 1) {
        tsr_vec_dot_rows(j->type, N_COLS, j->nr, j->w + (size_t)j->r0 * j->stride, j->stride, j->x,
                         j->y + j->r0);
    } else {
        tsr_vec_dot_tile(j->type, N_COLS, j->nr, j->w + (size_t)j->r0 * j->stride, j->stride,
                         j->n_tok, j->x, j->xs, j->y + j->r0, j->ys);
    }
}

static void *run_thread(void *arg)
{
    run(arg);
    return NULL;
}

/* Median seconds of one pass over rows [0, rows) with `threads` threads (halves). */
static double time_pass(job base, int64_t rows, int threads)
{
    double t[REPS];
    for (int rep = 0; rep < REPS; ++rep) {
        const double t0 = tsr_bench_now_s();
        if (threads == 1) {
            base.r0 = 0;
            base.nr = rows;
            run(&base);
        } else {
            job a = base, b = base;
            const int64_t half = rows / 2 / 4 * 4;
            a.r0 = 0;
            a.nr = half;
            b.r0 = half;
            b.nr = rows - half;
            pthread_t th;
            pthread_create(&th, NULL, run_thread, &b);
            run(&a);
            pthread_join(th, NULL);
        }
        t[rep] = tsr_bench_now_s() - t0;
    }
    return tsr_bench_median(t, REPS);
}

int main(void)
{
    static const uint32_t types[] = {TSR_TYPE_Q8_0, TSR_TYPE_Q4_0, TSR_TYPE_Q4_1, TSR_TYPE_Q5_0,
                                     TSR_TYPE_Q5_1, TSR_TYPE_Q2_K, TSR_TYPE_Q3_K, TSR_TYPE_Q4_K,
                                     TSR_TYPE_Q5_K, TSR_TYPE_Q6_K};
    static const char *const isas[] = {"avx512vnni", "avx2", "scalar"};
    const char *mb = getenv("TSR_BENCH_MB");
    const size_t matrix_bytes = (size_t)(mb && atof(mb) > 0 ? atof(mb) : 64.0) * (1 << 20);
    const int isa_env = getenv("TSR_BENCH_ISAS") && *getenv("TSR_BENCH_ISAS");
    printf("decode: GB/s of file-layout weight bytes (median of %d); prefill: %d tokens x 2048 "
           "rows, block dots/ns, 1 thread\n",
           REPS, N_TOK);
    printf("%-5s %-10s %9s %9s %9s %9s %9s %9s\n", "type", "isa", "rows/1t", "pack/1t", "rows/2t",
           "pack/2t", "tile/pp", "pack/pp");
    for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ++ti) {
        const uint32_t type = types[ti], xt = tsr_type_vec_dot_type(type);
        if (!selected("TSR_BENCH_TYPES", tsr_type_name(type))) continue;
        const size_t rb = tsr_row_bytes(type, N_COLS), xb = tsr_row_bytes(xt, N_COLS);
        const int64_t rows = (int64_t)(matrix_bytes / rb) / 4 * 4;
        const size_t pb = tsr_repack_bytes(type, N_COLS, rows);
        uint8_t *w = malloc((size_t)rows * rb), *p = aligned_alloc(64, (pb + 63) / 64 * 64);
        uint8_t *x = malloc(xb * N_TOK);
        float *f = malloc(sizeof(float) * N_COLS * 64);
        float *y = malloc(sizeof(float) * (size_t)rows * N_TOK);
        if (!w || !p || !x || !f || !y) return 1;
        uint64_t s = 88172645463325252ULL;
        for (int i = 0; i < N_COLS * 64; ++i) {
            s ^= s << 13, s ^= s >> 7, s ^= s << 17;
            f[i] = (float)((double)(s >> 11) * 0x1p-53 - 0.5);
        }
        for (int r = 0; r < 64; ++r)
            tsr_quant_row(type, f + (size_t)r * N_COLS, w + (size_t)r * rb, N_COLS);
        for (int64_t r = 64; r < rows; ++r)
            memcpy(w + (size_t)r * rb, w + (size_t)(r % 64) * rb, rb);
        for (int t = 0; t < N_TOK; ++t)
            tsr_quant_row(xt, f + (size_t)(t % 64) * N_COLS, x + (size_t)t * xb, N_COLS);
        tsr_repack(type, N_COLS, rows, w, rb, p);
        for (size_t k = 0; k < sizeof isas / sizeof isas[0]; ++k) {
            if (!selected("TSR_BENCH_ISAS", isas[k]) || !tsr_quant_set_isa(isas[k])) continue;
            const double gb = (double)rows * (double)rb * 1e-9;
            job jr = {type, 0, 0, 0, w, rb, 1, x, xb, y, (size_t)rows};
            job jp = jr;
            jp.packed = 1;
            jp.w = p;
            const double r1 = gb / time_pass(jr, rows, 1), p1 = gb / time_pass(jp, rows, 1);
            const double r2 = gb / time_pass(jr, rows, 2), p2 = gb / time_pass(jp, rows, 2);
            /* prefill on the first 2048 rows */
            const int64_t pr = rows < 2048 ? rows : 2048;
            const double dots = (double)pr * N_TOK * (N_COLS / 32) * 1e-9;
            jr.n_tok = jp.n_tok = N_TOK;
            jr.ys = jp.ys = (size_t)pr;
            const double tt = dots / time_pass(jr, pr, 1), tp = dots / time_pass(jp, pr, 1);
            printf("%-5s %-10s %9.1f %9.1f %9.1f %9.1f %9.2f %9.2f\n", tsr_type_name(type), isas[k],
                   r1, p1, r2, p2, tt, tp);
            fflush(stdout);
            if (!isa_env) break; /* the best ISA only, unless asked */
        }
        free(w);
        free(p);
        free(x);
        free(f);
        free(y);
    }
    return 0;
}
