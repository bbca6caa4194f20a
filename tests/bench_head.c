/*
 * bench_head.c — what share of a decode step the output projection takes (a benchmark,
 * not a test: it prints figures and checks nothing).
 *
 *   bench_head -m MODEL [-t THREADS] [-n STEPS]
 *
 * Large-vocabulary models (Qwen2.5: 151936 rows, Gemma 3: 262144) spend a large part of
 * each decode step in the head; it must run at the same bandwidth as the layers, not be
 * the bottleneck. Prints, as medians over STEPS decode steps after a 16-token prompt: the
 * step time, the head's matmul time (same pool size, same activation), the head's bytes
 * and its share of the step's weight bytes, and the bandwidth each achieves.
 */
#include "kernels/ops.h"
#include "kernels/pool.h"
#include "kernels/util.h"
#include "worker/model.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    const char *model = NULL;
    int n_threads = 2, n_steps = 32, c;
    while ((c = getopt(argc, argv, "m:t:n:")) != -1) {
        if (c == 'm')
            model = optarg;
        else if (c == 't')
            n_threads = atoi(optarg);
        else if (c == 'n')
            n_steps = atoi(optarg);
        else
            return 2;
    }
    if (!model || n_steps < 1) {
        fprintf(stderr, "usage: bench_head -m MODEL [-t THREADS] [-n STEPS]\n");
        return 2;
    }
    char err[512];
    tsr_gguf *g;
    tsr_model *m;
    tsr_ctx *ctx;
    if (tsr_gguf_open(model, &g, err, sizeof err) || tsr_model_load(g, &m, err, sizeof err) ||
        tsr_ctx_new(m, 16 + n_steps + 1, 16, n_threads, &ctx, err, sizeof err)) {
        fprintf(stderr, "bench_head: %s\n", err);
        return 1;
    }
    const int E = m->hp.n_embd;
    int32_t toks[16];
    for (int i = 0; i < 16; i++) toks[i] = (int32_t)((i * 7919 + 11) % m->hp.n_vocab);
    const float *logits;
    if (tsr_forward(ctx, toks, 16, 0, false, &logits, err, sizeof err)) {
        fprintf(stderr, "bench_head: %s\n", err);
        return 1;
    }
    uint64_t *t_step = malloc(sizeof(uint64_t) * (size_t)n_steps);
    uint64_t *t_head = malloc(sizeof(uint64_t) * (size_t)n_steps);
    float *x = malloc(sizeof(float) * (size_t)E);
    float *y = malloc(sizeof(float) * (size_t)m->output.n_out);
    void *scratch = malloc(tsr_matmul_scratch_bytes(&m->output, 1));
    tsr_pool *pool = tsr_pool_new(n_threads);
    for (int i = 0; i < E; i++) x[i] = (float)((i % 17) - 8) / 8.0f;
    for (int s = 0; s < n_steps; s++) {
        int32_t tok = (int32_t)((s * 104729 + 3) % m->hp.n_vocab);
        uint64_t t0 = tsr_now_ns();
        if (tsr_forward(ctx, &tok, 1, 16 + s, false, &logits, err, sizeof err)) {
            fprintf(stderr, "bench_head: %s\n", err);
            return 1;
        }
        uint64_t t1 = tsr_now_ns();
        tsr_matmul(pool, &m->output, x, 1, y, scratch);
        t_head[s] = tsr_now_ns() - t1;
        t_step[s] = t1 - t0;
    }
    qsort(t_step, (size_t)n_steps, sizeof *t_step, cmp_u64);
    qsort(t_head, (size_t)n_steps, sizeof *t_head, cmp_u64);
    const double step_ms = t_step[n_steps / 2] / 1e6, head_ms = t_head[n_steps / 2] / 1e6;
    const double head_bytes = (double)m->output.row_bytes * (double)m->output.n_out;
    const double all_bytes = (double)m->n_bytes_weights;
    printf("%s (%s): %d threads, median of %d decode steps\n", model, tsr_arch_name(m->hp.arch),
           n_threads, n_steps);
    printf("  decode step      %8.2f ms  %7.1f MB of weights  %6.2f GB/s\n", step_ms,
           all_bytes / 1e6, all_bytes / (step_ms * 1e6));
    printf("  output head      %8.2f ms  %7.1f MB (%d rows)     %6.2f GB/s\n", head_ms,
           head_bytes / 1e6, (int)m->output.n_out, head_bytes / (head_ms * 1e6));
    printf("  head share       %8.1f %% of the step time, %.1f %% of the weight bytes\n",
           100.0 * head_ms / step_ms, 100.0 * head_bytes / all_bytes);
    tsr_pool_free(pool);
    free(scratch);
    free(x);
    free(y);
    free(t_step);
    free(t_head);
    tsr_ctx_free(ctx);
    tsr_model_free(m);
    tsr_gguf_close(g);
    return 0;
}
