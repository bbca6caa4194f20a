/* bench.h — what the kernel micro-benchmarks (tests/bench_*.c, tests/bench.cmake) share: one
 * clock in seconds, the median of a run's repetitions, weights on huge pages and random Q8_0
 * blocks. Header-only (static inline): the benchmarks link tessera_core alone, and the library
 * has no use for any of it.
 */
#ifndef TSR_TESTS_BENCH_H
#define TSR_TESTS_BENCH_H

#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "kernels/util.h"

/* CLOCK_MONOTONIC in seconds (tsr_now_ns), for timing prints. */
static inline double tsr_bench_now_s(void)
{
    return 1e-9 * (double)tsr_now_ns();
}

static inline int tsr_bench_cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The median of v[0..n-1] (v[n / 2] after sorting: the upper one for even n). Sorts v in
 * place. */
static inline double tsr_bench_median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, tsr_bench_cmp_double);
    return v[n / 2];
}

/* n_bytes rounded up to whole 2 MiB pages (*n_alloc gets that size), 2 MiB aligned and
 * advised for transparent huge pages, as worker/model_repack.c lays out the engine's weights
 * (advice only: the kernel may keep 4 KiB pages). NULL when out of memory; free() it. */
static inline void *tsr_bench_huge_alloc(size_t n_bytes, size_t *n_alloc)
{
    const size_t huge = (size_t)2 << 20, n = (n_bytes + huge - 1) / huge * huge;
    void *p = aligned_alloc(huge, n);
    if (p) (void)madvise(p, n, MADV_HUGEPAGE);
    if (n_alloc) *n_alloc = n;
    return p;
}

/* One Q8_0 block as GGUF stores it (34 bytes). */
typedef struct {
    uint16_t d;
    int8_t qs[32];
} tsr_bench_q8_0;
_Static_assert(sizeof(tsr_bench_q8_0) == 34, "Q8_0 block");

/* The next 32 random bits of the xorshift state *s. */
static inline uint32_t tsr_bench_rnd(uint64_t *s)
{
    *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
    return (uint32_t)(*s >> 32);
}

/* n random Q8_0 blocks from the state *s (each benchmark keeps its own): fp16 scales around
 * 0.008, quants uniform in -127..127. */
static inline void tsr_bench_fill_q8_0(tsr_bench_q8_0 *b, size_t n, uint64_t *s)
{
    for (size_t i = 0; i < n; i++) {
        b[i].d = (uint16_t)(0x2000 + (tsr_bench_rnd(s) & 0x3ff));
        for (int j = 0; j < 32; j++) b[i].qs[j] = (int8_t)((int)(tsr_bench_rnd(s) % 255) - 127);
    }
}

#endif
