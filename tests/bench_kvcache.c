/*
 * bench_kvcache.c — time of the attention kernel (kernels/kvcache.h) per KV cache type and
 * instruction set at long context: one query head over N cached positions, as a decode
 * step runs it (n_head of them per layer).
 *
 *   bench_kvcache [-d HEAD_DIM] [-n POSITIONS] [-r REPS] [-g GROUP] [-t TYPE] [-i ISA]
 *
 * -g: query heads per KV head (tsr_attn_group of GROUP heads; 1, the default, times
 * tsr_attn_head); the time printed is per query head either way.
 * -t (f32, f16, q8_0) and -i (avx512vnni, avx2, scalar) time one type / one ISA only (for
 * perf record).
 *
 * Prints, per type and ISA, the median time of one head over N positions (microseconds),
 * the bytes of K and V it reads and the rate (GB/s). A benchmark, not a test: timings on a
 * shared machine are noisy; the median of REPS runs of 64 heads each.
 */
#include "kernels/kvcache.h"
#include "kernels/quant.h"
#include "kernels/util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    int hd = 64, n_pos = 4096, reps = 9, group = 1, c;
    const char *only_type = NULL, *only_isa = NULL;
    while ((c = getopt(argc, argv, "d:n:r:g:t:i:")) != -1) {
        if (c == 'd')
            hd = atoi(optarg);
        else if (c == 'n')
            n_pos = atoi(optarg);
        else if (c == 'r')
            reps = atoi(optarg);
        else if (c == 'g')
            group = atoi(optarg);
        else if (c == 't')
            only_type = optarg;
        else if (c == 'i')
            only_isa = optarg;
        else {
            fprintf(stderr, "usage: bench_kvcache [-d HEAD_DIM] [-n POSITIONS] [-r REPS] "
                            "[-g GROUP] [-t f32|f16|q8_0] [-i avx512vnni|avx2|scalar]\n");
            return 2;
        }
    }
    if (hd < 32 || hd % 32 || n_pos < 1 || reps < 1 || group < 1 || group > 64) {
        fprintf(stderr, "bench_kvcache: head size a multiple of 32, positions and reps >= 1, "
                        "group 1..64\n");
        return 2;
    }
    enum { BS = 16, HEADS = 64 };
    const int n_blocks = (n_pos + BS - 1) / BS;
    int32_t *table = malloc(sizeof(int32_t) * (size_t)n_blocks);
    float *x = malloc(sizeof(float) * (size_t)hd);
    float *q = malloc(sizeof(float) * (size_t)hd * group);
    float *out = malloc(sizeof(float) * (size_t)hd * group);
    float *scores = malloc(sizeof(float) * (size_t)n_pos * group);
    void *scratch = aligned_alloc(64, tsr_attn_group_scratch_bytes(hd, group));
    uint64_t *t = malloc(sizeof(uint64_t) * (size_t)reps);
    if (!table || !x || !q || !out || !scores || !scratch || !t) return 1;
    for (int i = 0; i < n_blocks; i++) table[i] = i;
    for (int i = 0; i < hd * group; i++) q[i] = (float)((i * 37) % 17) / 17.0f - 0.5f;
    static const char *const isas[] = {"avx512vnni", "avx2", "scalar"};
    const int calls = (HEADS + group - 1) / group;
    printf("attention of one head over %d positions, head size %d, %s (median of %d x %d "
           "heads)\n",
           n_pos, hd, group == 1 ? "tsr_attn_head" : "tsr_attn_group", reps, calls * group);
    if (group > 1) printf("  groups of %d query heads per KV head\n", group);
    for (int ty = 0; ty < TSR_KV_TYPE_COUNT; ty++) {
        if (only_type && strcmp(only_type, tsr_kv_type_name((tsr_kv_type)ty)) != 0) continue;
        const size_t row = tsr_kv_row_bytes((tsr_kv_type)ty, hd);
        uint8_t *k = malloc((size_t)n_blocks * BS * row), *v = malloc((size_t)n_blocks * BS * row);
        if (!k || !v) return 1;
        for (int p = 0; p < n_blocks * BS; p++) {
            for (int i = 0; i < hd; i++) x[i] = (float)(((p + 3) * (i + 5)) % 29) / 29.0f - 0.5f;
            tsr_kv_store((tsr_kv_type)ty, x, k + (size_t)p * row, hd);
            tsr_kv_store((tsr_kv_type)ty, x, v + (size_t)p * row, hd);
        }
        tsr_kv_view kv = {.type = (tsr_kv_type)ty,
                          .head_dim = hd,
                          .block_size = BS,
                          .k = k,
                          .v = v,
                          .row_bytes = row,
                          .head_offset = 0,
                          .block_table = table};
        for (size_t s = 0; s < sizeof isas / sizeof isas[0]; s++) {
            if (only_isa && strcmp(only_isa, isas[s]) != 0) continue;
            if (!tsr_quant_set_isa(isas[s])) continue;
            for (int r = 0; r < reps; r++) {
                uint64_t t0 = tsr_now_ns();
                for (int h = 0; h < calls; h++) {
                    if (group == 1)
                        tsr_attn_head(&kv, q, 0.125f, 0, n_pos - 1, scores, scratch, out);
                    else
                        tsr_attn_group(&kv, group, q, 0.125f, 0, n_pos - 1, scores, scratch, out);
                }
                t[r] = (tsr_now_ns() - t0) / ((uint64_t)calls * (uint64_t)group);
            }
            qsort(t, (size_t)reps, sizeof t[0], cmp_u64);
            const double us = (double)t[reps / 2] / 1e3;
            const double bytes = 2.0 * (double)row * n_pos;
            printf("  %-5s %-7s %9.1f us  K+V %7.1f KiB  %6.2f GB/s\n",
                   tsr_kv_type_name((tsr_kv_type)ty), tsr_attn_isa(), us, bytes / 1024.0,
                   bytes / (us * 1e3));
        }
        tsr_quant_set_isa(NULL);
        free(k);
        free(v);
    }
    free(table);
    free(x);
    free(q);
    free(out);
    free(scores);
    free(scratch);
    free(t);
    return 0;
}
