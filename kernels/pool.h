/*
 * pool.h — a persistent pool of worker threads for data-parallel kernels.
 *
 * Why: a decode step runs ~7 matmuls per layer, each a few tens of microseconds on a
 * small model; creating threads per call would cost more than the work. Workers spin
 * briefly on an atomic generation counter and then sleep on a condition variable, so a
 * burst of calls costs no syscalls and an idle pool costs no CPU.
 *
 * tsr_pool_run(pool, fn, arg) calls fn(arg, ith, nth) once for every ith in [0, nth) —
 * ith 0 on the calling thread — and returns when all have finished. fn splits its work
 * by ith/nth. Not re-entrant: one run at a time per pool (callers serialize).
 */
#ifndef TSR_POOL_H
#define TSR_POOL_H

#include <stdint.h>

typedef struct tsr_pool tsr_pool;
typedef void (*tsr_pool_fn)(void *arg, int ith, int nth);

/* n_threads >= 1 (1: no extra threads, runs inline). Returns NULL on failure. */
tsr_pool *tsr_pool_new(int n_threads);
void tsr_pool_free(tsr_pool *p);
int tsr_pool_n_threads(const tsr_pool *p);
void tsr_pool_run(tsr_pool *p, tsr_pool_fn fn, void *arg);

#endif
