/*
 * bench_batch.c — the cost of a decode step of many sequences against one of a single
 * sequence: the ceiling of `tessera serve`'s throughput at concurrency S over concurrency 1
 * (ops/bench/serving.sh measures the real thing through gRPC; this times the forward pass
 * alone, without the scheduler, sampling or the network). A benchmark, not a test: it
 * prints figures and checks nothing.
 *
 *   bench_batch -m MODEL [-t THREADS] [-s SEQS] [-c CONTEXT] [-r REPS] [-w WARM_MS]
 *
 * A paged f16 KV cache (as serve) holds SEQS sequences of CONTEXT cached tokens each
 * (default 16 sequences of 40: the middle of serving.sh's 64-token requests); then one
 * decode step of 1 sequence and one of all SEQS sequences (one token each, logits for
 * every token) are timed REPS times each, interleaved, each after WARM_MS (default 1000)
 * milliseconds of untimed steps of its own width, so that it finds the machine as a server
 * at that concurrency keeps it. Prints the medians, the time per token and the ratio
 * SEQS * t(1) / t(SEQS), the tokens/s a batch of SEQS gives over one, from the wall time and
 * from the process's CPU time (with -t 1 that is the work itself, less disturbed by a busy
 * machine; with more threads it counts their waits too). Timings on a shared machine are
 * noisy: take the median of several runs.
 */
#include "kernels/kvcache.h"
#include "kernels/util.h"
#include "worker/model.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* CPU time of the process (all threads), ns: with -t 1 the work itself, which a busy shared
 * machine disturbs less than the wall time. */
static uint64_t cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Untimed steps of batch b for warm_ns (at least one), then one timed: its wall and CPU time
 * (ns) into *wall and *cpu. Returns tsr_forward_batch's status (err filled on failure). */
static int step_timed(tsr_ctx *ctx, const tsr_batch *b, uint64_t warm_ns, float *x, float *logits,
                      uint64_t *wall, uint64_t *cpu, char *err, size_t err_len)
{
    const uint64_t t_warm = tsr_now_ns();
    do {
        if (tsr_forward_batch(ctx, b, x, logits, err, err_len)) return -1;
    } while (tsr_now_ns() - t_warm < warm_ns);
    const uint64_t a = tsr_now_ns(), ca = cpu_ns();
    if (tsr_forward_batch(ctx, b, x, logits, err, err_len)) return -1;
    *wall = tsr_now_ns() - a;
    *cpu = cpu_ns() - ca;
    return 0;
}

int main(int argc, char **argv)
{
    const char *model = NULL;
    int n_threads = 2, n_seqs = 16, n_ctx = 40, reps = 21, warm_ms = 1000, c;
    while ((c = getopt(argc, argv, "m:t:s:c:r:w:")) != -1) {
        if (c == 'm')
            model = optarg;
        else if (c == 't')
            n_threads = atoi(optarg);
        else if (c == 's')
            n_seqs = atoi(optarg);
        else if (c == 'c')
            n_ctx = atoi(optarg);
        else if (c == 'r')
            reps = atoi(optarg);
        else if (c == 'w')
            warm_ms = atoi(optarg);
        else
            return 2;
    }
    if (!model || n_threads < 1 || n_seqs < 1 || n_ctx < 1 || reps < 1 || warm_ms < 0) {
        fprintf(stderr, "usage: bench_batch -m MODEL [-t THREADS] [-s SEQS] [-c CONTEXT] "
                        "[-r REPS] [-w WARM_MS]\n");
        return 2;
    }
    const int32_t bps = (n_ctx + 1 + TSR_KV_BLOCK_SIZE - 1) / TSR_KV_BLOCK_SIZE;
    const int32_t n_batch = n_ctx > n_seqs ? n_ctx : n_seqs;
    char err[512];
    tsr_gguf *g;
    tsr_model *m;
    tsr_ctx *ctx;
    if (tsr_gguf_open(model, &g, err, sizeof err) || tsr_model_load(g, &m, err, sizeof err) ||
        tsr_ctx_new_paged_kv(m, n_seqs * bps, n_batch, n_threads, TSR_KV_F16, &ctx, err,
                             sizeof err)) {
        fprintf(stderr, "bench_batch: %s\n", err);
        return 1;
    }
    const int32_t nb = n_batch;
    int32_t *tables = malloc(sizeof(int32_t) * (size_t)(n_seqs * bps));
    const int32_t **tabs = malloc(sizeof(int32_t *) * (size_t)n_seqs);
    int32_t *n_blocks = malloc(sizeof(int32_t) * (size_t)n_seqs);
    int32_t *toks = malloc(sizeof(int32_t) * (size_t)nb),
            *pos = malloc(sizeof(int32_t) * (size_t)nb), *sq = malloc(sizeof(int32_t) * (size_t)nb);
    uint8_t *want = malloc((size_t)nb);
    float *x = malloc(sizeof(float) * (size_t)nb * (size_t)m->hp.n_embd);
    float *logits = malloc(sizeof(float) * (size_t)nb * (size_t)m->hp.n_vocab);
    uint64_t *t1 = malloc(sizeof(uint64_t) * (size_t)reps),
             *ts = malloc(sizeof(uint64_t) * (size_t)reps);
    uint64_t *c1 = malloc(sizeof(uint64_t) * (size_t)reps),
             *cs = malloc(sizeof(uint64_t) * (size_t)reps);
    if (!tables || !tabs || !n_blocks || !toks || !pos || !sq || !want || !x || !logits || !t1 ||
        !ts || !c1 || !cs) {
        fprintf(stderr, "bench_batch: out of memory\n");
        return 1;
    }
    /* blocks of the sequences interleaved over the pool, as a busy server's end up */
    for (int32_t s = 0; s < n_seqs; s++) {
        for (int32_t k = 0; k < bps; k++) tables[s * bps + k] = k * n_seqs + s;
        tabs[s] = tables + s * bps;
        n_blocks[s] = bps;
    }
    /* the prompts: one batch per sequence, pseudo-random ids */
    uint32_t r = 12345;
    for (int32_t s = 0; s < n_seqs; s++) {
        for (int32_t i = 0; i < n_ctx; i++) {
            r = r * 1103515245u + 12345u;
            toks[i] = (int32_t)((r >> 8) % (uint32_t)m->hp.n_vocab);
            pos[i] = i;
            sq[i] = s;
            want[i] = i == n_ctx - 1;
        }
        tsr_batch b = {.n_tokens = n_ctx,
                       .tokens = toks,
                       .pos = pos,
                       .seq = sq,
                       .want_logits = want,
                       .n_seqs = n_seqs,
                       .block_tables = tabs,
                       .n_blocks = n_blocks};
        if (tsr_forward_batch(ctx, &b, x, logits, err, sizeof err)) {
            fprintf(stderr, "bench_batch: %s\n", err);
            return 1;
        }
    }
    for (int32_t s = 0; s < n_seqs; s++) {
        toks[s] = (int32_t)((s * 7919 + 11) % m->hp.n_vocab);
        pos[s] = n_ctx;
        sq[s] = s;
        want[s] = 1;
    }
    tsr_batch b1 = {.n_tokens = 1,
                    .tokens = toks,
                    .pos = pos,
                    .seq = sq,
                    .want_logits = want,
                    .n_seqs = n_seqs,
                    .block_tables = tabs,
                    .n_blocks = n_blocks};
    tsr_batch bs = b1;
    bs.n_tokens = n_seqs;
    /* Each rep: steps of 1 sequence for warm_ms, then one timed; the same for all the
     * sequences. The widths interleave (a shared machine's load drifts over a run), but a
     * step after those of the other width finds the machine as that width left it, for a
     * while: 100M Q8_0, 2 threads, the 1-sequence step ran 4.1-4.5 ms right after a
     * 16-sequence one, 3.8-4.2 after 6 or 12 steps of its own, 3.4 after 30, 3.0-3.2 after
     * 100-300 (0.3-1 s), as a run of them alone (serve at concurrency 1) does: timed early,
     * it overstated the ratio (4.0-4.8x for 3.1-3.3x). */
    for (int i = 0; i < reps + 1; i++) { /* the first of each: warm-up */
        uint64_t w1, wc1, ws, wcs;
        if (step_timed(ctx, &b1, (uint64_t)warm_ms * 1000000u, x, logits, &w1, &wc1, err,
                       sizeof err) ||
            step_timed(ctx, &bs, (uint64_t)warm_ms * 1000000u, x, logits, &ws, &wcs, err,
                       sizeof err))
            goto fail;
        if (i > 0) {
            t1[i - 1] = w1;
            ts[i - 1] = ws;
            c1[i - 1] = wc1;
            cs[i - 1] = wcs;
        }
    }
    qsort(t1, (size_t)reps, sizeof *t1, cmp_u64);
    qsort(ts, (size_t)reps, sizeof *ts, cmp_u64);
    qsort(c1, (size_t)reps, sizeof *c1, cmp_u64);
    qsort(cs, (size_t)reps, sizeof *cs, cmp_u64);
    const double ms1 = t1[reps / 2] / 1e6, mss = ts[reps / 2] / 1e6;
    const double cms1 = c1[reps / 2] / 1e6, cmss = cs[reps / 2] / 1e6;
    printf("%s: %d threads, %d sequences of %d cached tokens, f16 KV, attention %s, median of %d\n",
           model, n_threads, n_seqs, n_ctx, tsr_attn_isa(), reps);
    printf("  step of 1 sequence    %8.2f ms   CPU %8.2f ms\n", ms1, cms1);
    printf("  step of %2d sequences  %8.2f ms   CPU %8.2f ms  (%.2f ms per token)\n", n_seqs, mss,
           cmss, mss / n_seqs);
    printf("  throughput ratio      %8.2f x  (%d x t(1) / t(%d): the ceiling of serve's c%d/c1)\n",
           n_seqs * ms1 / mss, n_seqs, n_seqs, n_seqs);
    printf("  CPU time ratio        %8.2f x  (the same from CPU time: with -t 1, the work)\n",
           n_seqs * cms1 / cmss);
    tsr_ctx_free(ctx);
    tsr_model_free(m);
    tsr_gguf_close(g);
    return 0;
fail:
    fprintf(stderr, "bench_batch: %s\n", err);
    return 1;
}
