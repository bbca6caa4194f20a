/*
 * bench_q4k_gemm.c — the Q4_K and the Q4_0 matmul of a prefill in the two order classes
 * (worker/model.h tsr_order_class): 128 tokens through a 2048 x 2048 matrix (the 1B shape's
 * attn_q), tsr_matmul_multi_ord with every token in class 1 (llama.cpp's GEMM order,
 * kernels/q4k_gemm.c, kernels/q40_gemm.c) vs class 0 (the row dots' order: the repacked GEMM of
 * kernels/repack.c, or the file layout's rows), with and without a repacked copy, 1 and 2
 * threads. Prints the median wall and CPU time per pass (CPU time: all threads, less
 * sensitive to the other processes of the machine); the classes' ratio is what (Q4_K) a
 * prefill pays for the prompt order or (Q4_0) gains by it. Medians of REPS passes (the machine is
 * shared; run under flock /work/bench.lock and print uptime next to the figures).
 *
 * Not a ctest: CMake builds it with the tests (tests/bench.cmake). Run:
 *   cmake --build build --target bench_q4k_gemm && flock /work/bench.lock
 * build/tests/bench_q4k_gemm
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/ops.h"
#include "kernels/pool.h"
#include "kernels/quant.h"
#include "kernels/repack.h"
#include "tests/bench.h"

enum { N_IN = 2048, N_OUT = 2048, N_TOK = 128, REPS = 9 };

/* CPU time of the process (all threads): less sensitive than wall time to the other
 * processes of a shared machine. */
static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void bench_type(uint32_t type, const char *name)
{
    const size_t row_b = tsr_row_bytes(type, N_IN);
    uint8_t *w = malloc(row_b * N_OUT);
    float *f = malloc(sizeof(float) * N_IN * (size_t)N_TOK);
    uint32_t s = 1;
    for (int r = 0; r < N_OUT; r++) {
        for (int i = 0; i < N_IN; i++) {
            s = s * 1103515245u + 12345u;
            f[i] = (float)((int32_t)(s >> 8) % 2001 - 1000) / 1000.0f;
        }
        tsr_quant_row(type, f, w + (size_t)r * row_b, N_IN);
    }
    for (size_t i = 0; i < (size_t)N_IN * N_TOK; i++) {
        s = s * 1103515245u + 12345u;
        f[i] = (float)((int32_t)(s >> 8) % 2001 - 1000) / 500.0f;
    }
    const size_t pk_b = (tsr_repack_bytes(type, N_IN, N_OUT) + 63) / 64 * 64;
    uint8_t *pk = aligned_alloc(64, pk_b);
    tsr_repack(type, N_IN, N_OUT, w, row_b, pk);
    float *y = malloc(sizeof(float) * N_OUT * (size_t)N_TOK);
    uint8_t ord1[N_TOK], ord0[N_TOK];
    memset(ord1, 1, sizeof ord1);
    memset(ord0, 0, sizeof ord0);
    printf("%s %d x %d, %d tokens, ISA %s: median of %d passes\n", name, N_OUT, N_IN, N_TOK,
           tsr_quant_isa(), REPS);
    for (int nth = 1; nth <= 2; nth++) {
        tsr_pool *pool = tsr_pool_new(nth);
        for (int packed = 1; packed >= 0; packed--) {
            tsr_weight wt = {.type = type,
                             .n_in = N_IN,
                             .n_out = N_OUT,
                             .row_bytes = row_b,
                             .data = w,
                             .packed = packed ? pk : NULL};
            const tsr_weight *ws[1] = {&wt};
            float *ys[1] = {y};
            void *scratch = malloc(tsr_matmul_multi_scratch_bytes(ws, 1, N_TOK));
            double med[2], cpu[2];
            for (int cls = 0; cls < 2; cls++) {
                double t[REPS], c[REPS];
                for (int r = 0; r < REPS; r++) {
                    const double t0 = tsr_bench_now_s(), c0 = cpu_s();
                    tsr_matmul_multi_ord(pool, ws, ys, 1, f, N_TOK, cls ? ord1 : ord0, scratch);
                    t[r] = tsr_bench_now_s() - t0;
                    c[r] = cpu_s() - c0;
                }
                med[cls] = tsr_bench_median(t, REPS);
                cpu[cls] = tsr_bench_median(c, REPS);
            }
            printf("  %d thread%s, %-16s class 0 (GEMV order) %6.2f ms, CPU %6.2f ms | class 1 "
                   "(GEMM order) %6.2f ms, CPU %6.2f ms | class 1 / class 0: time %.2f, CPU %.2f\n",
                   nth, nth > 1 ? "s" : " ",
                   packed ? "repacked copy:" : "file layout:", 1e3 * med[0], 1e3 * cpu[0],
                   1e3 * med[1], 1e3 * cpu[1], med[1] / med[0], cpu[1] / cpu[0]);
            free(scratch);
        }
        tsr_pool_free(pool);
    }
    free(pk);
    free(y);
    free(f);
    free(w);
}

int main(void)
{
    bench_type(TSR_TYPE_Q4_K, "Q4_K");
    bench_type(TSR_TYPE_Q4_0, "Q4_0");
    return 0;
}
