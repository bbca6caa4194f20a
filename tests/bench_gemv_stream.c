/*
 * bench_gemv_stream.c — the one-token GEMVs of the repacked Q4_0, Q4_K, Q5_0 and Q6_K groups
 * (kernels/q40_gemm.c, quant.c's 4-row group GEMV, repack.c) and of their lanes layouts
 * (kernels/q40_lanes.h, q4k_lanes.h, q50_lanes.h, q50_avx2.h, q6k_lanes.h) streaming from memory,
 * against a plain read of the same bytes, measured interleaved in one run.
 *
 * The weights are a 1B layer's matrices (q 2048x2048, k/v 512x2048, o 2048x2048,
 * gate/up 8192x2048, down 2048x8192) repeated over enough layers for TSR_BENCH_MB (default
 * 1024) MiB of repacked weights, in one 2 MiB-aligned MADV_HUGEPAGE arena as
 * worker/model_repack.c's, so that nothing of a pass is left in cache from the last one: more
 * than twice the largest L3 met here (480 MiB). The former default, 192 MiB, sat in that L3
 * and measured it, not memory (2026-12-05, 2 threads, gemv/read: Q4_0 0.90 there against
 * 0.81-0.82 from 1 GiB, Q4_K 0.88 against 0.79-0.83, Q6_K 0.92 against 0.90; the plain read
 * 34 GB/s against 31). A
 * pass is one decode step's matmuls as the engine issues them (tsr_matmul_multi: qkv, o,
 * gate+up, down; 2 threads, guided claims); the plain read is the same arena read by the
 * same pool, each thread one half, with each of tsr_membw_probe_read's loops (kernels/membw.h),
 * the faster taken, as the engine's roofline takes it. Prints per type the medians of REPS
 * interleaved passes in GB/s and the median of the per-pass ratios gemv / read (the
 * from-memory fraction). Until 2026-12-06 the read was one loop of four independent chains,
 * which reads a fifth slower here than a loop of one line an iteration (membw.c): against it
 * the GEMVs read 0.80-0.83 (Q4_0, Q4_K) and 0.89-0.90 (Q6_K); against the faster read, the
 * same GEMVs 0.63, 0.65 and 0.69 (2 threads, 38 GB/s).
 *
 * Not a ctest: CMake builds it with the tests (tests/bench.cmake). Run:
 *   cmake --build build --target bench_gemv_stream && uptime &&
 *   flock /work/bench.lock build/tests/bench_gemv_stream
 * TSR_BENCH_TYPES=q4_0,q4_0l,q4_k,q4_kl,q4_1,q4_1l,q5_0,q5_0l,q6_k,q6_kl selects types (a type is
 * selected when the list contains its name: q4_0l selects q4_0 too; q4_0l, q4_kl, q5_0l, q6_kl:
 * the lanes layouts that AVX-512 VNNI CPUs load instead of the groups, only there, but q4_0l
 * and q4_kl, which AVX2 CPUs load too, and q5_0l, which on AVX2 CPUs is q50_avx2.h's layout;
 * q4_1: the file layout's row dots, q4_1l: q41_avx2.h's layout, on AVX2 CPUs without VNNI);
 * TSR_BENCH_THREADS=n the pool size; TSR_BENCH_SHAPE=qwen Qwen2.5-Coder-0.5B's layer instead
 * of the 1B one, smollm2 SmolLM2-135M's (Q4_0, Q4_1, Q5_0, Q8_0 only). With TSR_BENCH_THREADS=1 and
 * TSR_BENCH_MB=8 the Qwen shape's layers sit in a 32 MiB L3: the kernels' compute speed, not
 * memory's.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/membw.h"
#include "kernels/ops.h"
#include "kernels/dot_ggml.h"
#include "kernels/pool.h"
#include "kernels/q40_lanes.h"
#include "kernels/q41_avx2.h"
#include "kernels/q4k_lanes.h"
#include "kernels/q50_avx2.h"
#include "kernels/q50_lanes.h"
#include "kernels/q6k_lanes.h"
#include "kernels/q80_lanes.h"
#include "kernels/quant.h"
#include "kernels/repack.h"
#include "tests/bench.h"

enum { REPS = 11, N_MAT = 7, MAX_LAYERS = 512 /* 1 GiB of the SmolLM2 shape's Q4_1 */ };

static const int64_t k_shape_1b[N_MAT][2] = {/* n_in, n_out */
                                             {2048, 2048}, {2048, 512},  {2048, 512}, {2048, 2048},
                                             {2048, 8192}, {2048, 8192}, {8192, 2048}};
/* TSR_BENCH_SHAPE=qwen: Qwen2.5-Coder-0.5B's layer (n_embd 896, 2 KV heads of 64, n_ff 4864):
 * rows of 28 blocks against the 1B shape's 64 (per-pass costs weigh more); 896 is no multiple
 * of 256, so only for the 32-element types (q4_0, q5_0, q8_0) */
static const int64_t k_shape_qwen[N_MAT][2] = {{896, 896},  {896, 128},  {896, 128}, {896, 896},
                                               {896, 4864}, {896, 4864}, {4864, 896}};
/* TSR_BENCH_SHAPE=smollm2: SmolLM2-135M's (n_embd 576, 3 KV heads of 64, n_ff 1536; 18 blocks) */
static const int64_t k_shape_smol[N_MAT][2] = {{576, 576},  {576, 192},  {576, 192}, {576, 576},
                                               {576, 1536}, {576, 1536}, {1536, 576}};
static const int64_t (*k_shape)[2] = k_shape_1b;

typedef struct {
    const uint8_t *buf;
    size_t n;
    int loop; /* tsr_membw_read_slice's */
    volatile uint64_t sink[2];
} rd_job;

static void rd_run(void *arg, int ith, int nth)
{
    rd_job *j = arg;
    const size_t per = (j->n / (size_t)nth) & ~(size_t)127;
    j->sink[ith & 1] = tsr_membw_read_slice(j->buf + per * (size_t)ith, per, j->loop);
}

static int selected(const char *name)
{
    const char *list = getenv("TSR_BENCH_TYPES");
    return !list || !*list || strstr(list, name) != NULL;
}

/* Q5_0's lanes layout on this CPU: q50_lanes.h's (AVX-512 VNNI) or q50_avx2.h's (AVX2) */
static bool q50_avx2(void)
{
    return tsr_ggml_isa() != TSR_GGML_VNNI;
}

/* lanes: the type's lanes layout (kernels/q40_lanes.h, q4k_lanes.h, q6k_lanes.h, q50_lanes.h /
 * q50_avx2.h: what the load makes on this CPU) instead of the groups */
static size_t mat_bytes(uint32_t type, bool lanes, int64_t n, int64_t rows)
{
    if (type == TSR_TYPE_Q8_0) /* the file layout (verbatim), or the lanes layout */
        return lanes ? tsr_q80l_bytes(n, rows) : tsr_row_bytes(type, n) * (size_t)rows;
    if (type == TSR_TYPE_Q4_1) /* the file layout (Q4_1 has no groups), or its AVX2 layout */
        return lanes ? tsr_q41a_bytes(n, rows) : tsr_row_bytes(type, n) * (size_t)rows;
    if (!lanes) return tsr_repack_bytes(type, n, rows);
    return type == TSR_TYPE_Q4_0   ? tsr_q40l_bytes(n, rows)
           : type == TSR_TYPE_Q4_K ? tsr_q4kl_bytes(n, rows)
           : type == TSR_TYPE_Q5_0
               ? (q50_avx2() ? tsr_q50a_bytes(n, rows) : tsr_q50l_bytes(n, rows))
               : tsr_q6kl_bytes(n, rows);
}

static void mat_repack(uint32_t type, bool lanes, int64_t n, int64_t rows, const void *src,
                       size_t rb, void *dst)
{
    if ((type == TSR_TYPE_Q8_0 || type == TSR_TYPE_Q4_1) && !lanes)
        memcpy(dst, src, rb * (size_t)rows);
    else if (type == TSR_TYPE_Q4_1)
        tsr_q41a_repack(n, rows, src, rb, dst);
    else if (type == TSR_TYPE_Q8_0)
        tsr_q80l_repack(n, rows, src, rb, dst);
    else if (!lanes)
        tsr_repack(type, n, rows, src, rb, dst);
    else if (type == TSR_TYPE_Q4_0)
        tsr_q40l_repack(n, rows, src, rb, dst);
    else if (type == TSR_TYPE_Q4_K)
        tsr_q4kl_repack(n, rows, src, rb, dst);
    else if (type == TSR_TYPE_Q5_0 && q50_avx2())
        tsr_q50a_repack(n, rows, src, rb, dst);
    else if (type == TSR_TYPE_Q5_0)
        tsr_q50l_repack(n, rows, src, rb, dst);
    else
        tsr_q6kl_repack(n, rows, src, rb, dst);
}

static void bench_type(tsr_pool *pool, uint32_t type, bool lanes, const char *name, size_t want)
{
    size_t layer = 0, mb[N_MAT];
    for (int m = 0; m < N_MAT; m++) {
        mb[m] = (mat_bytes(type, lanes, k_shape[m][0], k_shape[m][1]) + 4095) / 4096 * 4096;
        layer += mb[m];
    }
    const int n_layers = (int)((want + layer - 1) / layer);
    if (n_layers > MAX_LAYERS) {
        fprintf(stderr,
                "bench_gemv_stream: %s: %zu MiB asked is %d layers of %zu MiB; at most %d: lower "
                "TSR_BENCH_MB\n",
                name, want >> 20, n_layers, layer >> 20, MAX_LAYERS);
        exit(2);
    }
    size_t total;
    uint8_t *arena = tsr_bench_huge_alloc((size_t)n_layers * layer, &total);
    if (!arena) {
        fprintf(stderr, "bench_gemv_stream: out of memory\n");
        exit(1);
    }
    memset(arena, 0, total);
    /* 64 distinct quantized rows repeated, repacked into each layer's place */
    const int64_t n_max = 8192, r_max = 8192;
    float *f = malloc(sizeof(float) * (size_t)n_max);
    float *x = malloc(sizeof(float) * (size_t)n_max);
    uint8_t *src = malloc(tsr_row_bytes(type, n_max) * (size_t)r_max);
    uint64_t s = 88172645463325252ULL;
    tsr_weight w[MAX_LAYERS][N_MAT];
    size_t off = 0;
    for (int m = 0; m < N_MAT; m++) {
        const int64_t n = k_shape[m][0], rows = k_shape[m][1];
        const size_t rb = tsr_row_bytes(type, n);
        for (int64_t r = 0; r < 64; r++) {
            for (int64_t i = 0; i < n; i++) {
                s ^= s << 13, s ^= s >> 7, s ^= s << 17;
                f[i] = (float)((double)(s >> 11) * 0x1p-53 - 0.5);
            }
            tsr_quant_row(type, f, src + (size_t)r * rb, n);
        }
        for (int64_t r = 64; r < rows; r++)
            memcpy(src + (size_t)r * rb, src + (size_t)(r % 64) * rb, rb);
        for (int l = 0; l < n_layers; l++) {
            uint8_t *dst = arena + (size_t)l * layer + off;
            mat_repack(type, lanes, n, rows, src, rb, dst);
            w[l][m] = (tsr_weight){
                .type = type,
                .n_in = n,
                .n_out = rows,
                .row_bytes = rb,
                .data = (type == TSR_TYPE_Q8_0 || type == TSR_TYPE_Q4_1) && !lanes ? dst : NULL,
                .packed = lanes || type == TSR_TYPE_Q8_0 || type == TSR_TYPE_Q4_1 ? NULL : dst,
                .lanes = lanes ? dst : NULL,
                .lanes_ggml = lanes && type == TSR_TYPE_Q8_0,
                .lanes_avx2 = lanes && type == TSR_TYPE_Q5_0 && q50_avx2()};
        }
        off += mb[m];
    }
    for (int64_t i = 0; i < n_max; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        x[i] = (float)((double)(s >> 11) * 0x1p-53 - 0.5);
    }
    float *y[4];
    for (int k = 0; k < 4; k++) y[k] = malloc(sizeof(float) * 8192);
    const tsr_weight *ws[4] = {&w[0][0], &w[0][1], &w[0][2], NULL};
    void *scratch = malloc(tsr_matmul_multi_scratch_bytes(ws, 3, 1) + 65536);
    size_t bytes = 0;
    for (int m = 0; m < N_MAT; m++) bytes += mat_bytes(type, lanes, k_shape[m][0], k_shape[m][1]);
    bytes *= (size_t)n_layers;
    double g[REPS], r[REPS], q[REPS];
    rd_job rj = {.buf = arena, .n = (size_t)n_layers * layer};
    for (int it = -1; it < REPS; it++) {
        double t0 = tsr_bench_now_s();
        for (int l = 0; l < n_layers; l++) {
            const tsr_weight *qkv[3] = {&w[l][0], &w[l][1], &w[l][2]};
            tsr_matmul_multi(pool, qkv, y, 3, x, 1, scratch);
            tsr_matmul(pool, &w[l][3], x, 1, y[0], scratch);
            const tsr_weight *gu[2] = {&w[l][4], &w[l][5]};
            tsr_matmul_multi(pool, gu, y, 2, x, 1, scratch);
            tsr_matmul(pool, &w[l][6], x, 1, y[0], scratch);
        }
        const double tg = tsr_bench_now_s() - t0;
        double tr = 0.0; /* the faster of tsr_membw_probe_read's loops, as its roofline */
        for (rj.loop = 0; rj.loop < TSR_MEMBW_LOOPS; rj.loop++) {
            t0 = tsr_bench_now_s();
            tsr_pool_run(pool, rd_run, &rj);
            const double t = tsr_bench_now_s() - t0;
            if (rj.loop == 0 || t < tr) tr = t;
        }
        if (it < 0) continue; /* warm-up */
        g[it] = (double)bytes / tg * 1e-9;
        r[it] = (double)rj.n / tr * 1e-9;
        q[it] = g[it] / r[it];
    }
    printf("%-5s %3d layers %6.1f MiB  gemv %6.1f  read %6.1f GB/s  gemv/read %5.3f\n", name,
           n_layers, (double)bytes / 1048576.0, tsr_bench_median(g, REPS),
           tsr_bench_median(r, REPS), tsr_bench_median(q, REPS));
    fflush(stdout);
    for (int k = 0; k < 4; k++) free(y[k]);
    free(scratch);
    free(src);
    free(x);
    free(f);
    free(arena);
}

int main(void)
{
    const char *mbs = getenv("TSR_BENCH_MB");
    const size_t want = (size_t)(mbs && atof(mbs) > 0 ? atof(mbs) : 1024.0) * (1 << 20);
    const char *ths = getenv("TSR_BENCH_THREADS");
    const char *shape = getenv("TSR_BENCH_SHAPE");
    const bool smol = shape && strcmp(shape, "smollm2") == 0;
    const bool qwen = smol || (shape && strcmp(shape, "qwen") == 0); /* no K-quants either */
    if (qwen) k_shape = smol ? k_shape_smol : k_shape_qwen;
    tsr_pool *pool = tsr_pool_new(ths && atoi(ths) > 0 ? atoi(ths) : 2);
    printf("one-token GEMV of the repacked layouts, %s layer matrices, %d threads, ISA %s; "
           "medians of %d interleaved passes\n",
           smol   ? "SmolLM2-135M"
           : qwen ? "Qwen2.5-0.5B"
                  : "1B",
           tsr_pool_n_threads(pool), tsr_quant_isa(), REPS);
    if (selected("q4_0")) bench_type(pool, TSR_TYPE_Q4_0, false, "q4_0", want);
    if (selected("q4_0l") && tsr_ggml_isa() >= TSR_GGML_AVX2)
        bench_type(pool, TSR_TYPE_Q4_0, true, "q4_0l", want);
    if (!qwen && selected("q4_k")) bench_type(pool, TSR_TYPE_Q4_K, false, "q4_k", want);
    if (!qwen && selected("q4_kl") && tsr_ggml_isa() >= TSR_GGML_AVX2)
        bench_type(pool, TSR_TYPE_Q4_K, true, "q4_kl", want);
    if (selected("q8_0")) bench_type(pool, TSR_TYPE_Q8_0, false, "q8_0", want);
    if (selected("q8_0l") && tsr_ggml_isa() == TSR_GGML_VNNI)
        bench_type(pool, TSR_TYPE_Q8_0, true, "q8_0l", want);
    if (selected("q4_1")) bench_type(pool, TSR_TYPE_Q4_1, false, "q4_1", want);
    if (selected("q4_1l") && tsr_ggml_isa() == TSR_GGML_AVX2)
        bench_type(pool, TSR_TYPE_Q4_1, true, "q4_1l", want);
    if (selected("q5_0")) bench_type(pool, TSR_TYPE_Q5_0, false, "q5_0", want);
    if (selected("q5_0l") && tsr_ggml_isa() >= TSR_GGML_AVX2)
        bench_type(pool, TSR_TYPE_Q5_0, true, "q5_0l", want);
    if (!qwen && selected("q6_k")) bench_type(pool, TSR_TYPE_Q6_K, false, "q6_k", want);
    if (!qwen && selected("q6_kl") && tsr_ggml_isa() == TSR_GGML_VNNI)
        bench_type(pool, TSR_TYPE_Q6_K, true, "q6_kl", want);
    tsr_pool_free(pool);
    return 0;
}
