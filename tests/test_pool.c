/*
 * test_pool.c — kernels/pool: every ith of every run runs exactly once with the pool's nth,
 * over many runs, for pools of more threads than cores; a slow task (a worker that stalls
 * mid-run) still ends the run only when it is done; runs after the workers have gone to
 * sleep wake them; several pools oversubscribing the cores at once all finish; the
 * dispatch's counters add up.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "kernels/pool.h"

#define MAX_TH 32

typedef struct {
    _Atomic int count[MAX_TH]; /* times each ith ran this run */
    _Atomic int bad_nth;       /* calls with nth != the pool's */
    int nth;
    int slow_ith; /* this ith sleeps slow_us (-1: none) */
    int slow_us;
    _Atomic int finished; /* tasks past their sleep */
} job;

static void sleep_us(int us)
{
    struct timespec ts = {us / 1000000, (long)(us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

static void count_fn(void *arg, int ith, int nth)
{
    job *j = arg;
    if (nth != j->nth) atomic_fetch_add(&j->bad_nth, 1);
    if (ith == j->slow_ith) sleep_us(j->slow_us);
    atomic_fetch_add(&j->count[ith], 1);
    atomic_fetch_add(&j->finished, 1);
}

/* n_runs runs of count_fn; every count must be exactly 1 after each run returns. */
static void check_runs(tsr_pool *p, int n_runs, int slow_ith, int slow_us)
{
    const int nth = tsr_pool_n_threads(p);
    job j;
    for (int r = 0; r < n_runs; r++) {
        memset(&j, 0, sizeof j);
        j.nth = nth;
        j.slow_ith = slow_ith;
        j.slow_us = slow_us;
        tsr_pool_run(p, count_fn, &j);
        /* The run returned: every task has finished (the slow one too). */
        if (atomic_load(&j.finished) != nth)
            fail_msg("run %d of a %d-thread pool returned with %d of %d tasks finished", r, nth,
                     atomic_load(&j.finished), nth);
        for (int i = 0; i < nth; i++)
            if (atomic_load(&j.count[i]) != 1)
                fail_msg("run %d of a %d-thread pool: ith %d ran %d times, expected once", r, nth,
                         i, atomic_load(&j.count[i]));
        if (atomic_load(&j.bad_nth) != 0)
            fail_msg("run %d: %d calls got an nth other than %d", r, atomic_load(&j.bad_nth), nth);
    }
}

static void test_exactly_once(void **state)
{
    (void)state;
    static const int sizes[] = {1, 2, 3, 4, 8, 16};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        tsr_pool *p = tsr_pool_new(sizes[s]);
        assert_non_null(p);
        assert_int_equal(tsr_pool_n_threads(p), sizes[s]);
        check_runs(p, sizes[s] <= 4 ? 20000 : 3000, -1, 0);
        tsr_pool_stats st;
        tsr_pool_get_stats(p, &st);
        /* Counted runs exclude the inline 1-thread case. */
        assert_int_equal(st.n_runs, sizes[s] == 1 ? 0 : (sizes[s] <= 4 ? 20000 : 3000));
        tsr_pool_free(p);
    }
}

/* A task that stalls (as a descheduled worker would): the run waits for it, and the
 * others still run exactly once. ith 0 slow: the caller (or whoever takes it) stalls;
 * the last ith slow: typically a worker's. */
static void test_slow_task(void **state)
{
    (void)state;
    tsr_pool *p = tsr_pool_new(3);
    assert_non_null(p);
    check_runs(p, 20, 0, 2000);
    check_runs(p, 20, 2, 2000);
    check_runs(p, 200, 1, 50);
    tsr_pool_free(p);
}

/* Runs separated by idle gaps long enough for the workers to sleep on the futex. */
static void test_wake_after_sleep(void **state)
{
    (void)state;
    tsr_pool *p = tsr_pool_new(4);
    assert_non_null(p);
    for (int r = 0; r < 10; r++) {
        sleep_us(5000);
        check_runs(p, 3, -1, 0);
    }
    tsr_pool_stats st;
    tsr_pool_get_stats(p, &st);
    assert_int_equal(st.n_runs, 30);
    /* 2 ms idle is past the spin budget, so the workers normally slept (and were woken by
     * the next run); not asserted: on a loaded machine a worker may not get the CPU for
     * the whole gap. */
    printf("wake after sleep: workers slept %llu times in 10 idle gaps\n",
           (unsigned long long)st.n_worker_sleeps);
    /* Freeing a pool whose workers sleep must not hang. */
    tsr_pool_free(p);
}

typedef struct {
    int n_threads;
    int n_runs;
} storm_arg;

static void *storm_main(void *arg)
{
    storm_arg *a = arg;
    tsr_pool *p = tsr_pool_new(a->n_threads);
    if (!p) return (void *)1;
    check_runs(p, a->n_runs, -1, 0);
    tsr_pool_free(p);
    return NULL;
}

/* Four 4-thread pools driven at once: 16 threads on a machine of (here) 2 cores. Every
 * thread is descheduled often; each run must still complete exactly once per ith, and
 * the whole must end (ctest's timeout is the deadline; the time is printed). */
static void test_oversubscribed(void **state)
{
    (void)state;
    pthread_t th[4];
    storm_arg a = {.n_threads = 4, .n_runs = 5000};
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < 4; i++) assert_int_equal(pthread_create(&th[i], NULL, storm_main, &a), 0);
    for (int i = 0; i < 4; i++) {
        void *r;
        pthread_join(th[i], &r);
        assert_null(r);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    printf("oversubscribed: 4 pools x 4 threads x %d runs in %.2f s (%.1f us per run)\n", a.n_runs,
           s, 1e6 * s / a.n_runs);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exactly_once),
        cmocka_unit_test(test_slow_task),
        cmocka_unit_test(test_wake_after_sleep),
        cmocka_unit_test(test_oversubscribed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
