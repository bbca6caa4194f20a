/*
 * pool.c — see pool.h.
 *
 * One run: the caller writes fn/arg, zeroes `done`, publishes `claim` = (run << 32) | 0 and
 * bumps `seq` (the futex word sleeping workers wait on). Every participant then claims
 * tasks by compare-and-swap on `claim`: a claim succeeds only while the run number in the
 * high half is the current one and the task index in the low half is below nth, so a
 * worker that wakes late can never take a task of a later run, nor run one twice. Each
 * finished task adds one to `done`; the caller returns when done == nth. fn/arg are read
 * only after a successful claim and rewritten only after done == nth, so plain fields do.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "kernels/pool.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Waits spin with `pause` for SPIN_PAUSE_NS (the gap between two runs of a decode step is
 * a few µs of serial work), then call sched_yield until SPIN_YIELD_NS (gives the core to
 * a thread that shares it: under oversubscription that is often the very thread we wait
 * for), then sleep on the futex. */
#define SPIN_PAUSE_NS 30000
#define SPIN_YIELD_NS 300000
/* A futex sleep re-checks at least this often (a safety net; wakes are not lost). */
#define SLEEP_MAX_NS 50000000

#define CACHE_LINE 64

typedef struct {
    struct tsr_pool *pool;
    pthread_t tid;
} worker;

struct tsr_pool {
    int n;
    worker *w;
    tsr_pool_fn fn;
    void *arg;
    uint32_t run; /* number of the current run (caller-owned) */
    uint64_t n_runs, n_tasks_caller, n_caller_sleeps;
    _Alignas(CACHE_LINE) _Atomic uint64_t claim; /* (run << 32) | next task index */
    _Alignas(CACHE_LINE) _Atomic uint32_t seq;   /* futex: bumped per run and at stop */
    _Atomic int n_sleepers;                      /* workers asleep (or going) on seq */
    _Atomic bool stop;
    _Alignas(CACHE_LINE) _Atomic uint32_t done; /* futex: tasks finished this run */
    _Atomic int caller_sleeping;
    _Atomic uint64_t n_worker_sleeps;
};

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void futex_wait(_Atomic uint32_t *addr, uint32_t val)
{
    struct timespec ts = {0, SLEEP_MAX_NS};
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_PRIVATE, val, &ts, NULL, 0);
}

static void futex_wake_all(_Atomic uint32_t *addr)
{
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* Spin-then-yield until *addr != val or the spin budget is spent; true if it changed. */
static bool spin_until_changed(_Atomic uint32_t *addr, uint32_t val)
{
    uint64_t t0 = 0;
    for (uint32_t i = 1;; i++) {
        if (atomic_load_explicit(addr, memory_order_acquire) != val) return true;
        if ((i & 31) != 0) {
            cpu_relax();
            continue;
        }
        uint64_t t = now_ns();
        if (t0 == 0) t0 = t;
        uint64_t waited = t - t0;
        if (waited >= SPIN_YIELD_NS) return false;
        if (waited >= SPIN_PAUSE_NS) sched_yield();
    }
}

/* Claims and runs tasks of run `run` until none is left; returns how many it ran. */
static int run_tasks(tsr_pool *p, uint32_t run)
{
    int n_ran = 0;
    uint64_t v = atomic_load_explicit(&p->claim, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(v >> 32) != run || (uint32_t)v >= (uint32_t)p->n) return n_ran;
        if (!atomic_compare_exchange_weak_explicit(&p->claim, &v, v + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue; /* v holds the fresh value */
        p->fn(p->arg, (int)(uint32_t)v, p->n);
        n_ran++;
        /* seq_cst pairs with the caller's store of caller_sleeping (no lost wake-up). */
        uint32_t d = atomic_fetch_add(&p->done, 1) + 1;
        if (d == (uint32_t)p->n && atomic_load(&p->caller_sleeping)) futex_wake_all(&p->done);
        v = atomic_load_explicit(&p->claim, memory_order_acquire);
    }
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    tsr_pool *p = w->pool;
    uint32_t seen = 0; /* seq value whose runs this worker has served */
    for (;;) {
        if (!spin_until_changed(&p->seq, seen)) {
            atomic_fetch_add(&p->n_sleepers, 1);
            atomic_fetch_add_explicit(&p->n_worker_sleeps, 1, memory_order_relaxed);
            /* seq_cst: the caller bumps seq, then reads n_sleepers; we did the reverse. */
            while (atomic_load(&p->seq) == seen) futex_wait(&p->seq, seen);
            atomic_fetch_sub(&p->n_sleepers, 1);
        }
        seen = atomic_load_explicit(&p->seq, memory_order_acquire);
        if (atomic_load(&p->stop)) return NULL;
        uint64_t v = atomic_load_explicit(&p->claim, memory_order_acquire);
        run_tasks(p, (uint32_t)(v >> 32));
    }
}

tsr_pool *tsr_pool_new(int n_threads)
{
    if (n_threads < 1) n_threads = 1;
    tsr_pool *p = aligned_alloc(CACHE_LINE, (sizeof *p + CACHE_LINE - 1) / CACHE_LINE * CACHE_LINE);
    if (!p) return NULL;
    memset(p, 0, sizeof *p);
    p->n = n_threads;
    atomic_init(&p->claim, (uint32_t)n_threads); /* run 0, no task left */
    atomic_init(&p->seq, 0);
    atomic_init(&p->n_sleepers, 0);
    atomic_init(&p->stop, false);
    atomic_init(&p->done, 0);
    atomic_init(&p->caller_sleeping, 0);
    atomic_init(&p->n_worker_sleeps, 0);
    p->w = calloc((size_t)n_threads, sizeof *p->w);
    if (!p->w) {
        free(p);
        return NULL;
    }
    for (int i = 1; i < n_threads; i++) {
        p->w[i].pool = p;
        if (pthread_create(&p->w[i].tid, NULL, worker_main, &p->w[i]) != 0) {
            /* Run with the threads we got. No run has started, so no worker has read n. */
            p->n = i;
            atomic_store(&p->claim, (uint64_t)(uint32_t)i);
            break;
        }
    }
    return p;
}

void tsr_pool_free(tsr_pool *p)
{
    if (!p) return;
    atomic_store(&p->stop, true);
    atomic_fetch_add(&p->seq, 1);
    futex_wake_all(&p->seq);
    for (int i = 1; i < p->n; i++) pthread_join(p->w[i].tid, NULL);
    free(p->w);
    free(p);
}

int tsr_pool_n_threads(const tsr_pool *p)
{
    return p->n;
}

void tsr_pool_get_stats(const tsr_pool *p, tsr_pool_stats *out)
{
    out->n_runs = p->n_runs;
    out->n_tasks_caller = p->n_tasks_caller;
    out->n_caller_sleeps = p->n_caller_sleeps;
    out->n_worker_sleeps = atomic_load_explicit(&p->n_worker_sleeps, memory_order_relaxed);
}

void tsr_pool_run(tsr_pool *p, tsr_pool_fn fn, void *arg)
{
    if (p->n == 1) {
        fn(arg, 0, 1);
        return;
    }
    const uint32_t run = ++p->run;
    p->fn = fn;
    p->arg = arg;
    p->n_runs++;
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    /* Release: fn, arg and done = 0 are visible to whoever claims a task of this run. */
    atomic_store_explicit(&p->claim, (uint64_t)run << 32, memory_order_release);
    atomic_fetch_add(&p->seq, 1);
    if (atomic_load(&p->n_sleepers) > 0) futex_wake_all(&p->seq);
    p->n_tasks_caller += (uint64_t)run_tasks(p, run);
    /* What is left are tasks a worker has started: wait for them. */
    const uint32_t n = (uint32_t)p->n;
    for (;;) {
        uint32_t d = atomic_load_explicit(&p->done, memory_order_acquire);
        if (d == n) break;
        if (spin_until_changed(&p->done, d)) continue;
        atomic_store(&p->caller_sleeping, 1);
        d = atomic_load(&p->done);
        if (d != n) {
            p->n_caller_sleeps++;
            futex_wait(&p->done, d);
        }
        atomic_store(&p->caller_sleeping, 0);
    }
}
