/*
 * pool.h — a persistent pool of worker threads for data-parallel kernels.
 *
 * Why: a decode step runs ~5 pool runs per layer, each a few tens of microseconds on a
 * small model; creating threads per call would cost more than the work, and so would a
 * syscall per run. Why this design: the machine is shared, so any thread of the pool may
 * be descheduled at any moment. A run is a set of nth tasks (ith = 0..nth-1) that any
 * participant claims from one atomic word — the caller claims tasks too, so when a worker
 * has not woken up yet (descheduled, or asleep) the caller runs its task itself and never
 * waits for a thread that has nothing in hand. The caller waits only for tasks already
 * started by a worker. Every wait is a bounded spin (pause, then sched_yield so a thread
 * sharing the core can run) followed by a futex sleep, so an oversubscribed or idle pool
 * costs no CPU and a busy one costs no syscalls.
 *
 * tsr_pool_run(pool, fn, arg) calls fn(arg, ith, nth) exactly once for every ith in
 * [0, nth), nth = tsr_pool_n_threads(pool), on whichever threads claim them (the caller
 * usually runs ith 0; any thread may run any ith, several of them in turn), and returns
 * when all have finished, with their writes visible to the caller. fn must therefore give
 * the same result whichever thread runs an ith (split work by ith/nth or by an atomic
 * chunk counter; never by thread identity). Not re-entrant: one run at a time per pool
 * (callers serialize); fn must not call tsr_pool_run on the same pool.
 */
#ifndef TSR_POOL_H
#define TSR_POOL_H

#include <stdint.h>

typedef struct tsr_pool tsr_pool;
typedef void (*tsr_pool_fn)(void *arg, int ith, int nth);

/* n_threads >= 1 (1: no extra threads, runs inline). Returns NULL on failure. If the
 * system refuses some threads the pool keeps those it got (tsr_pool_n_threads says). */
tsr_pool *tsr_pool_new(int n_threads);
void tsr_pool_free(tsr_pool *p);
int tsr_pool_n_threads(const tsr_pool *p);
void tsr_pool_run(tsr_pool *p, tsr_pool_fn fn, void *arg);

/* Counters since tsr_pool_new, for profiling (not synchronized with runs in flight). */
typedef struct {
    uint64_t n_runs;          /* tsr_pool_run calls with more than one thread */
    uint64_t n_tasks_caller;  /* tasks the calling thread ran itself */
    uint64_t n_caller_sleeps; /* times the caller slept waiting for a worker's task */
    uint64_t n_worker_sleeps; /* times a worker went to sleep (idle past its spin) */
} tsr_pool_stats;
void tsr_pool_get_stats(const tsr_pool *p, tsr_pool_stats *out);

#endif
