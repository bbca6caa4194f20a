/*
 * test_comm.c — worker/comm: the generic layer, the local communicator, MPI and NCCL.
 *
 * Run as a plain process it tests the local (one-rank) communicator only and says so. Run
 * under an MPI launcher (ctest's test_comm_mpi2 / test_comm_mpi3:
 * `mpirun --allow-run-as-root --oversubscribe -np 3 test_comm`) every rank also runs the MPI
 * tests on MPI_COMM_WORLD: exact allreduce, allgather(v) order, a send/recv ring, bcast from
 * a non-zero root, split by parity, counters, and deadlines (a recv from a silent peer and a
 * barrier with a late rank both time out within ~timeout and the job still finalizes).
 *
 * Every rank runs the same test sequence; assertions that could leave one rank behind are
 * made after the collective that ends each test, and the world deadline is 5 s, so a failure
 * is reported rather than hanging the job.
 *
 * NCCL: tsr_comm_nccl_available() must match the build. Without a GPU tsr_comm_nccl_new must
 * fail cleanly (an error message, no crash, no hang); with one (TSR_TEST_EXPECT_GPU=1 makes a
 * GPU mandatory) a one-rank NCCL communicator is exercised on device buffers.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "worker/comm.h"
#include "kernels/util.h"

#ifdef TSR_HAVE_NCCL
#include <cuda_runtime.h>
#endif

static tsr_comm *g_world; /* MPI_COMM_WORLD when launched by mpirun, else NULL */

#define WORLD_TIMEOUT_MS 5000

/* Run a tsr_comm call that uses the local `err` buffer; fail with its message. */
#define assert_comm_ok(call)                                                                       \
    do {                                                                                           \
        err[0] = '\0';                                                                             \
        int rc_ = (call);                                                                          \
        if (rc_ != TSR_COMM_OK) fail_msg("%s -> %s: %s", #call, tsr_comm_status_name(rc_), err);   \
    } while (0)

#define assert_comm_rc(expected, call)                                                             \
    do {                                                                                           \
        err[0] = '\0';                                                                             \
        int rc_ = (call);                                                                          \
        if (rc_ != (expected))                                                                     \
            fail_msg("%s -> %s (expected %s): %s", #call, tsr_comm_status_name(rc_),               \
                     tsr_comm_status_name(expected), err);                                         \
        if (rc_ != TSR_COMM_OK && !err[0]) fail_msg("%s: no error message", #call);                \
    } while (0)

#define assert_contains(haystack, needle)                                                          \
    do {                                                                                           \
        if (!strstr((haystack), (needle)))                                                         \
            fail_msg("expected \"%s\" in \"%s\"", (needle), (haystack));                           \
    } while (0)

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static double secs_since(uint64_t t0)
{
    return (double)(tsr_now_ns() - t0) * 1e-9;
}

/* ---- local communicator (every mode) ---- */

static void test_local_collectives(void **state)
{
    char err[512];
    tsr_comm *c = NULL;
    assert_comm_ok(tsr_comm_local_new(&c, err, sizeof err));
    assert_int_equal(c->rank, 0);
    assert_int_equal(c->size, 1);
    assert_int_equal(c->timeout_ms, TSR_COMM_DEFAULT_TIMEOUT_MS);
    assert_string_equal(c->vt->name, "local");

    float v[3] = {1.5f, -2.0f, 3.0f};
    assert_comm_ok(tsr_comm_allreduce_sum_f32(c, v, 3, err, sizeof err));
    assert_true(v[0] == 1.5f && v[1] == -2.0f && v[2] == 3.0f);

    char send[5] = "abcd", recv[8] = "";
    assert_comm_ok(tsr_comm_allgather(c, send, recv, 5, err, sizeof err));
    assert_string_equal(recv, "abcd");
    assert_comm_ok(tsr_comm_allgather(c, recv, recv, 5, err, sizeof err)); /* in place */
    assert_string_equal(recv, "abcd");

    char out[12];
    memset(out, '.', sizeof out);
    size_t counts[1] = {4}, displs[1] = {3};
    assert_comm_ok(tsr_comm_allgatherv(c, "wxyz", 4, out, counts, displs, err, sizeof err));
    assert_memory_equal(out, "...wxyz.....", 12);

    assert_comm_ok(tsr_comm_bcast(c, send, 5, 0, err, sizeof err));
    assert_string_equal(send, "abcd");
    assert_comm_ok(tsr_comm_barrier(c, err, sizeof err));

    tsr_comm *sub = NULL;
    tsr_comm_set_timeout_ms(c, 1234);
    assert_comm_ok(tsr_comm_split(c, 7, 0, &sub, err, sizeof err));
    assert_non_null(sub);
    assert_int_equal(sub->size, 1);
    assert_int_equal(sub->rank, 0);
    assert_int_equal(sub->timeout_ms, 1234);
    assert_comm_ok(tsr_comm_barrier(sub, err, sizeof err));
    tsr_comm_free(sub);
    tsr_comm_free(c);
}

static void test_local_errors(void **state)
{
    char err[512];
    tsr_comm *c = NULL;
    assert_comm_ok(tsr_comm_local_new(&c, err, sizeof err));
    uint8_t b[4] = {0};

    /* send/recv to self: refused, and named */
    assert_comm_rc(TSR_COMM_EINVAL, tsr_comm_send(c, b, 4, 0, 0, err, sizeof err));
    assert_contains(err, "peer 0");
    assert_comm_rc(TSR_COMM_EINVAL, tsr_comm_recv(c, b, 4, 0, 0, err, sizeof err));
    assert_comm_rc(TSR_COMM_EINVAL, tsr_comm_send(c, b, 4, 1, 0, err, sizeof err));
    assert_contains(err, "out of range");
    assert_comm_rc(TSR_COMM_EINVAL, tsr_comm_bcast(c, b, 4, 1, err, sizeof err));
    assert_contains(err, "root 1");
    assert_comm_rc(TSR_COMM_EINVAL, tsr_comm_allreduce_sum_f32(c, NULL, 4, err, sizeof err));
    assert_contains(err, "NULL");
    assert_comm_ok(tsr_comm_allreduce_sum_f32(c, NULL, 0, err, sizeof err)); /* nothing to do */
    assert_comm_rc(TSR_COMM_EINVAL, tsr_comm_barrier(NULL, err, sizeof err));
    assert_comm_rc(TSR_COMM_EINVAL, tsr_comm_allgather(c, b, NULL, 4, err, sizeof err));
    size_t counts[1] = {3}, displs[1] = {0};
    assert_comm_rc(TSR_COMM_EINVAL,
                   tsr_comm_allgatherv(c, b, 4, b, counts, displs, err, sizeof err));
    assert_contains(err, "counts[0]");
    assert_comm_rc(TSR_COMM_EINVAL, tsr_comm_allgatherv(c, b, 4, b, NULL, displs, err, sizeof err));
    tsr_comm *sub = (tsr_comm *)&sub;
    assert_comm_rc(TSR_COMM_EINVAL, tsr_comm_split(c, -1, 0, &sub, err, sizeof err));
    assert_null(sub);
    assert_comm_rc(TSR_COMM_EINVAL, tsr_comm_send(c, b, 4, 0, -5, err, sizeof err));
    /* errors without an err buffer must not crash */
    assert_int_equal(tsr_comm_send(c, b, 4, 3, 0, NULL, 0), TSR_COMM_EINVAL);
    tsr_comm_free(NULL);
    tsr_comm_free(c);
}

static void test_local_stats(void **state)
{
    char err[512];
    tsr_comm *c = NULL;
    assert_comm_ok(tsr_comm_local_new(&c, err, sizeof err));
    assert_int_equal(c->stats.n_calls, 0);
    float v[16] = {0};
    assert_comm_ok(tsr_comm_allreduce_sum_f32(c, v, 16, err, sizeof err));
    assert_comm_ok(tsr_comm_barrier(c, err, sizeof err));
    assert_int_equal(c->stats.n_calls, 2);
    /* one rank moves no bytes */
    assert_int_equal(c->stats.n_bytes_sent, 0);
    assert_int_equal(c->stats.n_bytes_recv, 0);
    uint64_t t = c->stats.t_comm_ns;
    assert_comm_rc(TSR_COMM_EINVAL, tsr_comm_bcast(c, v, 4, 2, err, sizeof err));
    assert_int_equal(c->stats.n_calls, 2); /* rejected before the call */
    assert_true(c->stats.t_comm_ns >= t);
    tsr_comm_free(c);

    assert_string_equal(tsr_comm_status_name(TSR_COMM_OK), "ok");
    assert_string_equal(tsr_comm_status_name(TSR_COMM_ETIMEOUT), "timeout");
    assert_string_equal(tsr_comm_status_name(TSR_COMM_EINVAL), "invalid argument");
}

/* tsr_comm_mpi_launched reads only the environment: check its rules on a cleaned one. */
static void test_mpi_launched_env(void **state)
{
    static const char *const vars[] = {
        "OMPI_COMM_WORLD_SIZE", "PMIX_RANK",           "PMI_RANK", "PMI_SIZE", "SLURM_STEP_ID",
        "SLURM_NTASKS",         "SLURM_STEP_NUM_TASKS"};
    enum { N = sizeof vars / sizeof vars[0] };
    char *saved[N];
    for (int i = 0; i < N; i++) {
        const char *v = getenv(vars[i]);
        saved[i] = v ? strdup(v) : NULL;
        unsetenv(vars[i]);
    }
    bool none = tsr_comm_mpi_launched();
    setenv("OMPI_COMM_WORLD_SIZE", "1", 1);
    bool ompi = tsr_comm_mpi_launched();
    unsetenv("OMPI_COMM_WORLD_SIZE");
    setenv("PMIX_RANK", "0", 1);
    bool pmix = tsr_comm_mpi_launched();
    unsetenv("PMIX_RANK");
    setenv("SLURM_STEP_ID", "0", 1);
    setenv("SLURM_NTASKS", "1", 1);
    bool slurm1 = tsr_comm_mpi_launched();
    setenv("SLURM_STEP_NUM_TASKS", "4", 1);
    bool slurm4 = tsr_comm_mpi_launched();
    unsetenv("SLURM_STEP_ID");
    bool batch4 = tsr_comm_mpi_launched(); /* an sbatch script: no step id */
    for (int i = 0; i < N; i++) {
        if (saved[i])
            setenv(vars[i], saved[i], 1);
        else
            unsetenv(vars[i]);
        free(saved[i]);
    }
    assert_false(none);
    assert_true(ompi);
    assert_true(pmix);
    assert_false(slurm1);
    assert_true(slurm4);
    assert_false(batch4);
}

#ifdef TSR_HAVE_NCCL
/* A working one-rank NCCL communicator (only on a host with a GPU). */
static void exercise_nccl(tsr_comm *nc)
{
    char err[512];
    enum { N = 4096 };
    float *h = malloc(N * sizeof *h), *d = NULL;
    assert_non_null(h);
    for (int i = 0; i < N; i++) h[i] = (float)(i % 977);
    assert_int_equal(cudaMalloc((void **)&d, 2 * N * sizeof *d), cudaSuccess);
    assert_int_equal(cudaMemcpy(d, h, N * sizeof *d, cudaMemcpyHostToDevice), cudaSuccess);
    assert_comm_ok(tsr_comm_allreduce_sum_f32(nc, d, N, err, sizeof err));
    assert_comm_ok(tsr_comm_allgather(nc, d, d + N, N * sizeof *d, err, sizeof err));
    assert_comm_ok(tsr_comm_bcast(nc, d, N * sizeof *d, 0, err, sizeof err));
    assert_comm_ok(tsr_comm_barrier(nc, err, sizeof err));
    float *back = malloc(N * sizeof *back);
    assert_non_null(back);
    assert_int_equal(cudaMemcpy(back, d + N, N * sizeof *d, cudaMemcpyDeviceToHost), cudaSuccess);
    for (int i = 0; i < N; i++)
        if (back[i] != h[i] * (float)nc->size) fail_msg("nccl: element %d = %g", i, back[i]);
    cudaFree(d);
    free(back);
    free(h);
}
#endif

/* NCCL over `boot`: available() matches the build; without a GPU the constructor fails with
 * a message, promptly, on every rank. */
static void check_nccl_over(tsr_comm *boot)
{
    char err[512] = "";
#ifdef TSR_HAVE_NCCL
    assert_true(tsr_comm_nccl_available());
#else
    assert_false(tsr_comm_nccl_available());
#endif
    tsr_comm *nc = (tsr_comm *)&nc;
    uint64_t t0 = tsr_now_ns();
    int rc = tsr_comm_nccl_new(boot, 0, &nc, err, sizeof err);
    double dt = secs_since(t0);
    const char *want_gpu = getenv("TSR_TEST_EXPECT_GPU");
    if (rc == TSR_COMM_OK) {
#ifdef TSR_HAVE_NCCL
        assert_non_null(nc);
        print_message("nccl: communicator of %d ranks on a GPU; exercising it\n", nc->size);
        exercise_nccl(nc);
        tsr_comm_free(nc);
        return;
#else
        fail_msg("tsr_comm_nccl_new succeeded in a build without NCCL");
#endif
    }
    print_message("nccl (rank %d): tsr_comm_nccl_new -> %s in %.3f s: %s\n", boot->rank,
                  tsr_comm_status_name(rc), dt, err);
    assert_int_equal(rc, TSR_COMM_ERR);
    assert_null(nc);
    assert_true(err[0] != '\0');
    assert_true(dt < 10.0);
#ifndef TSR_HAVE_NCCL
    assert_contains(err, "built without NCCL");
#endif
    if (want_gpu && strcmp(want_gpu, "1") == 0)
        fail_msg("TSR_TEST_EXPECT_GPU=1 but NCCL could not start: %s", err);
}

static void test_nccl_local(void **state)
{
    char err[512];
    tsr_comm *c = NULL;
    assert_comm_ok(tsr_comm_local_new(&c, err, sizeof err));
    check_nccl_over(c);
    tsr_comm_free(c);
}

/* ---- MPI (under mpirun) ---- */

static void test_mpi_world(void **state)
{
    tsr_comm *w = g_world;
    assert_string_equal(w->vt->name, "mpi");
    assert_true(w->size >= 1);
    assert_true(w->rank >= 0 && w->rank < w->size);
    const char *sz = getenv("OMPI_COMM_WORLD_SIZE"), *rk = getenv("OMPI_COMM_WORLD_RANK");
    if (sz) assert_int_equal(w->size, atoi(sz));
    if (rk) assert_int_equal(w->rank, atoi(rk));
    /* a second world communicator is independent and equal in shape */
    char err[512];
    tsr_comm *w2 = NULL;
    assert_comm_ok(tsr_comm_mpi_world(&w2, err, sizeof err));
    assert_int_equal(w2->rank, w->rank);
    assert_int_equal(w2->size, w->size);
    assert_comm_ok(tsr_comm_barrier(w2, err, sizeof err));
    tsr_comm_free(w2);
}

/* Small integers in floats sum exactly in any order. */
static void test_mpi_allreduce_exact(void **state)
{
    tsr_comm *w = g_world;
    char err[512];
    enum { N = 100003 }; /* well past the eager limit, odd */
    float *v = malloc(N * sizeof *v);
    assert_non_null(v);
    for (int i = 0; i < N; i++)
        v[i] = (float)((i * 7 + w->rank * 13) % 1000) - (float)(w->rank * (i % 5));
    assert_comm_ok(tsr_comm_allreduce_sum_f32(w, v, N, err, sizeof err));
    for (int i = 0; i < N; i++) {
        int64_t want = 0;
        for (int r = 0; r < w->size; r++) want += (i * 7 + r * 13) % 1000 - r * (i % 5);
        if (v[i] != (float)want)
            fail_msg("allreduce[%d] = %.1f, expected %lld", i, v[i], (long long)want);
    }
    float one = 1.0f;
    assert_comm_ok(tsr_comm_allreduce_sum_f32(w, &one, 1, err, sizeof err));
    assert_true(one == (float)w->size);
    free(v);
}

static void test_mpi_allgather_order(void **state)
{
    tsr_comm *w = g_world;
    char err[512];
    enum { B = 24 };
    uint8_t mine[B], *all = malloc((size_t)w->size * B);
    assert_non_null(all);
    for (int j = 0; j < B; j++) mine[j] = (uint8_t)(w->rank * 31 + j);
    assert_comm_ok(tsr_comm_allgather(w, mine, all, B, err, sizeof err));
    for (int r = 0; r < w->size; r++)
        for (int j = 0; j < B; j++)
            if (all[r * B + j] != (uint8_t)(r * 31 + j))
                fail_msg("allgather: byte %d of rank %d = %u", j, r, all[r * B + j]);
    /* in place: this rank's slot already holds its part */
    memset(all, 0, (size_t)w->size * B);
    memcpy(all + (size_t)w->rank * B, mine, B);
    assert_comm_ok(tsr_comm_allgather(w, all + (size_t)w->rank * B, all, B, err, sizeof err));
    for (int r = 0; r < w->size; r++)
        if (all[r * B + 5] != (uint8_t)(r * 31 + 5)) fail_msg("in-place allgather: rank %d", r);
    free(all);
}

/* Rank r contributes 5r bytes (rank 0: none), laid out in reverse rank order with 3-byte
 * gaps that must stay untouched. */
static void test_mpi_allgatherv_order(void **state)
{
    tsr_comm *w = g_world;
    char err[512];
    size_t *counts = calloc((size_t)w->size, sizeof *counts);
    size_t *displs = calloc((size_t)w->size, sizeof *displs);
    assert_true(counts && displs);
    size_t off = 0;
    for (int r = w->size - 1; r >= 0; r--) {
        counts[r] = 5u * (size_t)r;
        displs[r] = off;
        off += counts[r] + 3;
    }
    uint8_t *recv = malloc(off), *mine = malloc(counts[w->rank] + 1);
    assert_true(recv && mine);
    memset(recv, 0xEE, off);
    for (size_t j = 0; j < counts[w->rank]; j++) mine[j] = (uint8_t)(w->rank * 17 + (int)j);
    assert_comm_ok(
        tsr_comm_allgatherv(w, mine, counts[w->rank], recv, counts, displs, err, sizeof err));
    for (int r = 0; r < w->size; r++) {
        for (size_t j = 0; j < counts[r]; j++)
            if (recv[displs[r] + j] != (uint8_t)(r * 17 + (int)j))
                fail_msg("allgatherv: byte %zu of rank %d = %u", j, r, recv[displs[r] + j]);
        for (size_t j = 0; j < 3; j++)
            if (recv[displs[r] + counts[r] + j] != 0xEE) fail_msg("allgatherv wrote a gap");
    }
    free(recv);
    free(mine);
    free(counts);
    free(displs);
}

static void test_mpi_sendrecv_ring(void **state)
{
    tsr_comm *w = g_world;
    char err[512];
    if (w->size < 2) skip();
    int next = (w->rank + 1) % w->size, prev = (w->rank + w->size - 1) % w->size;

    /* small: everyone sends first (eager), then receives */
    int32_t msg[2] = {w->rank, 1000 + w->rank}, got[2] = {-1, -1};
    assert_comm_ok(tsr_comm_send(w, msg, sizeof msg, next, 11, err, sizeof err));
    assert_comm_ok(tsr_comm_recv(w, got, sizeof got, prev, 11, err, sizeof err));
    assert_int_equal(got[0], prev);
    assert_int_equal(got[1], 1000 + prev);

    /* 1 MiB (rendezvous): even ranks send first, odd ranks receive first */
    enum { M = 1 << 20 };
    uint8_t *out = malloc(M), *in = malloc(M);
    assert_true(out && in);
    for (int j = 0; j < M; j++) out[j] = (uint8_t)(w->rank * 7 + j * 3);
    if (w->rank % 2 == 0) {
        assert_comm_ok(tsr_comm_send(w, out, M, next, 12, err, sizeof err));
        assert_comm_ok(tsr_comm_recv(w, in, M, prev, 12, err, sizeof err));
    } else {
        assert_comm_ok(tsr_comm_recv(w, in, M, prev, 12, err, sizeof err));
        assert_comm_ok(tsr_comm_send(w, out, M, next, 12, err, sizeof err));
    }
    for (int j = 0; j < M; j++)
        if (in[j] != (uint8_t)(prev * 7 + j * 3)) fail_msg("ring: byte %d from rank %d", j, prev);
    free(out);
    free(in);

    /* a message of the wrong size is an error that names the peer, not a silent short read */
    int rc = TSR_COMM_OK;
    char rerr[512] = "";
    uint8_t small[8] = {1, 2, 3, 4, 5, 6, 7, 8}, big[16];
    if (w->rank == 0) assert_comm_ok(tsr_comm_send(w, small, 8, 1, 13, err, sizeof err));
    if (w->rank == 1) rc = tsr_comm_recv(w, big, 16, 0, 13, rerr, sizeof rerr);
    assert_comm_ok(tsr_comm_barrier(w, err, sizeof err));
    if (w->rank == 1) {
        assert_int_equal(rc, TSR_COMM_ERR);
        assert_contains(rerr, "rank 0");
        assert_contains(rerr, "sent 8 bytes");
    }
}

static void test_mpi_bcast_nonzero_root(void **state)
{
    tsr_comm *w = g_world;
    char err[512];
    enum { B = 4099 };
    uint8_t buf[B];
    int roots[2] = {w->size - 1, 1 % w->size};
    for (int k = 0; k < 2; k++) {
        int root = roots[k];
        for (int j = 0; j < B; j++) buf[j] = w->rank == root ? (uint8_t)(root * 5 + j) : 0;
        assert_comm_ok(tsr_comm_bcast(w, buf, B, root, err, sizeof err));
        for (int j = 0; j < B; j++)
            if (buf[j] != (uint8_t)(root * 5 + j)) fail_msg("bcast root %d: byte %d", root, j);
    }
}

/* Colors by parity, keys reversed: each group is ordered from its highest world rank. */
static void test_mpi_split_parity(void **state)
{
    tsr_comm *w = g_world;
    char err[512];
    tsr_comm *sub = NULL;
    assert_comm_ok(tsr_comm_split(w, w->rank % 2, w->size - w->rank, &sub, err, sizeof err));
    assert_non_null(sub);
    int want_size = 0, want_rank = 0;
    float want_sum = 0.0f;
    for (int r = 0; r < w->size; r++) {
        if (r % 2 != w->rank % 2) continue;
        want_size++;
        want_sum += (float)(r + 1);
        if (r > w->rank) want_rank++;
    }
    assert_int_equal(sub->size, want_size);
    assert_int_equal(sub->rank, want_rank);
    assert_int_equal(sub->timeout_ms, w->timeout_ms);
    float v = (float)(w->rank + 1);
    assert_comm_ok(tsr_comm_allreduce_sum_f32(sub, &v, 1, err, sizeof err));
    assert_true(v == want_sum);
    int32_t me = w->rank, *all = malloc((size_t)sub->size * sizeof *all);
    assert_non_null(all);
    assert_comm_ok(tsr_comm_allgather(sub, &me, all, sizeof me, err, sizeof err));
    for (int i = 1; i < sub->size; i++) assert_true(all[i] < all[i - 1]);
    free(all);
    tsr_comm_free(sub);
    assert_comm_ok(tsr_comm_barrier(w, err, sizeof err));
}

static void test_mpi_stats(void **state)
{
    tsr_comm *w = g_world;
    char err[512];
    tsr_comm_stats s0 = w->stats;
    float v[256] = {0};
    assert_comm_ok(tsr_comm_allreduce_sum_f32(w, v, 256, err, sizeof err));
    tsr_comm_stats s1 = w->stats;
    assert_int_equal(s1.n_calls, s0.n_calls + 1);
    assert_true(s1.t_comm_ns > s0.t_comm_ns);
    uint64_t b = w->size > 1 ? sizeof v : 0;
    assert_int_equal(s1.n_bytes_sent, s0.n_bytes_sent + b);
    assert_int_equal(s1.n_bytes_recv, s0.n_bytes_recv + b);
    uint8_t buf[100] = {0};
    assert_comm_ok(tsr_comm_bcast(w, buf, sizeof buf, 0, err, sizeof err));
    tsr_comm_stats s2 = w->stats;
    assert_int_equal(s2.n_calls, s1.n_calls + 1);
    if (w->size > 1) {
        assert_int_equal(s2.n_bytes_sent - s1.n_bytes_sent, w->rank == 0 ? 100 : 0);
        assert_int_equal(s2.n_bytes_recv - s1.n_bytes_recv, w->rank == 0 ? 0 : 100);
    }
}

/* Rank 1 waits for a message rank 0 never sends (its own tag): the recv times out within
 * ~300 ms naming rank 0, is cancelled, and the world communicator stays usable. */
static void test_mpi_recv_deadline(void **state)
{
    tsr_comm *w = g_world;
    char err[512], rerr[512] = "";
    if (w->size < 2) skip();
    int rc = TSR_COMM_OK;
    double dt = 0;
    if (w->rank == 1) {
        uint8_t buf[16];
        tsr_comm_set_timeout_ms(w, 300);
        uint64_t t0 = tsr_now_ns();
        rc = tsr_comm_recv(w, buf, sizeof buf, 0, 4242, rerr, sizeof rerr);
        dt = secs_since(t0);
        tsr_comm_set_timeout_ms(w, WORLD_TIMEOUT_MS);
        print_message("rank 1: recv -> %s after %.3f s: %s\n", tsr_comm_status_name(rc), dt, rerr);
    }
    assert_comm_ok(tsr_comm_barrier(w, err, sizeof err)); /* still usable everywhere */
    if (w->rank == 1) {
        assert_int_equal(rc, TSR_COMM_ETIMEOUT);
        assert_true(dt >= 0.299 && dt < 0.8);
        assert_contains(rerr, "recv: rank 0 did not answer within 300 ms");
        assert_contains(rerr, "cancelled");
    }
}

/* A barrier on a copy of the world where rank 0 arrives 1 s late: the others time out within
 * ~300 ms ("no answer from the group"), their copy refuses further use, rank 0's late barrier
 * still completes, and MPI finalizes cleanly afterwards. */
static void test_mpi_collective_deadline(void **state)
{
    tsr_comm *w = g_world;
    char err[512], rerr[512] = "", rerr2[512] = "";
    if (w->size < 2) skip();
    tsr_comm *copy = NULL;
    assert_comm_ok(tsr_comm_split(w, 0, w->rank, &copy, err, sizeof err));
    int rc = TSR_COMM_OK, rc2 = TSR_COMM_OK;
    double dt = 0;
    if (w->rank == 0) {
        sleep_ms(1000);
        rc = tsr_comm_barrier(copy, rerr, sizeof rerr);
    } else {
        tsr_comm_set_timeout_ms(copy, 300);
        uint64_t t0 = tsr_now_ns();
        rc = tsr_comm_barrier(copy, rerr, sizeof rerr);
        dt = secs_since(t0);
        rc2 = tsr_comm_barrier(copy, rerr2, sizeof rerr2);
        print_message("rank %d: barrier -> %s after %.3f s: %s\n", w->rank,
                      tsr_comm_status_name(rc), dt, rerr);
    }
    assert_comm_ok(tsr_comm_barrier(w, err, sizeof err));
    tsr_comm_free(copy);
    if (w->rank == 0) {
        if (rc != TSR_COMM_OK) fail_msg("late barrier: %s", rerr);
    } else {
        assert_int_equal(rc, TSR_COMM_ETIMEOUT);
        assert_true(dt >= 0.299 && dt < 0.8);
        assert_contains(rerr, "no answer from the group within 300 ms");
        assert_int_equal(rc2, TSR_COMM_ERR);
        assert_contains(rerr2, "unusable");
    }
}

static void test_mpi_nccl(void **state)
{
    char err[512];
    check_nccl_over(g_world);
    assert_comm_ok(tsr_comm_barrier(g_world, err, sizeof err));
}

int main(void)
{
    const struct CMUnitTest local_tests[] = {
        cmocka_unit_test(test_local_collectives), cmocka_unit_test(test_local_errors),
        cmocka_unit_test(test_local_stats),       cmocka_unit_test(test_mpi_launched_env),
        cmocka_unit_test(test_nccl_local),
    };
    const struct CMUnitTest mpi_tests[] = {
        cmocka_unit_test(test_mpi_world),
        cmocka_unit_test(test_mpi_allreduce_exact),
        cmocka_unit_test(test_mpi_allgather_order),
        cmocka_unit_test(test_mpi_allgatherv_order),
        cmocka_unit_test(test_mpi_sendrecv_ring),
        cmocka_unit_test(test_mpi_bcast_nonzero_root),
        cmocka_unit_test(test_mpi_split_parity),
        cmocka_unit_test(test_mpi_stats),
        cmocka_unit_test(test_mpi_recv_deadline),
        cmocka_unit_test(test_mpi_collective_deadline),
        cmocka_unit_test(test_mpi_nccl),
    };
    if (!tsr_comm_mpi_launched()) {
        printf("test_comm: not started by an MPI launcher: testing the local communicator only "
               "(run it under `mpirun -np N` for the MPI tests)\n");
        return cmocka_run_group_tests_name("comm_local", local_tests, NULL, NULL) ? 1 : 0;
    }
    char err[512] = "";
    int rc = tsr_comm_mpi_world(&g_world, err, sizeof err);
    if (rc != TSR_COMM_OK) {
        fprintf(stderr, "test_comm: tsr_comm_mpi_world: %s\n", err);
        return 1;
    }
    tsr_comm_set_timeout_ms(g_world, WORLD_TIMEOUT_MS);
    printf("test_comm: rank %d of %d (MPI)\n", g_world->rank, g_world->size);
    int failed = cmocka_run_group_tests_name("comm_local", local_tests, NULL, NULL);
    failed += cmocka_run_group_tests_name("comm_mpi", mpi_tests, NULL, NULL);
    tsr_comm_free(g_world);
    tsr_comm_mpi_finalize();
    return failed ? 1 : 0;
}
