/*
 * comm_mpi.c — the MPI implementation of the communication seam (see comm.h): CPU buffers
 * over Open MPI, started by mpirun or srun --mpi=pmix.
 *
 * Deadlines: MPI's blocking calls wait forever for a dead or stuck peer, so every operation
 * is posted non-blocking (MPI_Isend/Irecv/Iallreduce/Iallgather(v)/Ibcast/Ibarrier) and
 * polled with MPI_Test (tsr_comm_poll_pause backs off from spinning to yielding to short
 * sleeps) until it completes or the communicator's deadline passes. A timed-out receive is
 * cancelled (when that works, the communicator stays usable); any other timed-out request
 * cannot be taken back: it is kept in a process-wide orphan list, the communicator is marked
 * broken, and tsr_comm_mpi_finalize skips MPI_Finalize when an orphan is still pending (it
 * would wait for the dead peer); the launcher then ends the job.
 *
 * Errors: MPI_ERRORS_RETURN on every communicator, so a failing transport gives an error
 * code with MPI's message instead of aborting the process. (Open MPI still ends the whole
 * job when a rank dies: mpirun kills the survivors ~1–2 s later.)
 *
 * Threads: MPI_THREAD_FUNNELED. Multi-threaded MPI is unusably slow on small hosts (see
 * docs/STACK), so one communication thread per rank makes every MPI call: the thread that
 * called tsr_comm_mpi_world. Calls from other threads are refused with TSR_COMM_EINVAL.
 *
 * Without TSR_HAVE_MPI (no MPI at build time) the constructors return TSR_COMM_ERR "built
 * without MPI"; tsr_comm_mpi_launched still reads the environment.
 */
#include "worker/comm.h"
#include "kernels/util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Launched by an MPI launcher? Only environment variables, no MPI call (so it is safe before
 * deciding whether to initialize MPI at all):
 *   OMPI_COMM_WORLD_SIZE  Open MPI's mpirun/orterun, set in every rank (also for -np 1);
 *   PMIX_RANK             any PMIx launcher: Open MPI ≥ 4 mpirun, srun --mpi=pmix;
 *   PMI_RANK / PMI_SIZE   PMI-1/2 launchers (MPICH hydra, srun --mpi=pmi2);
 *   SLURM_STEP_ID with SLURM_STEP_NUM_TASKS (or SLURM_NTASKS) > 1: a multi-task srun step
 *                         without an MPI plugin. Counted as launched on purpose: running N
 *                         independent one-rank replicas would be silently wrong, whereas
 *                         MPI_Init then fails loudly ("OMPI was not built with SLURM's PMI
 *                         support": use srun --mpi=pmix).
 * A plain sbatch script has no SLURM_STEP_ID, so `mpirun` inside it is what counts. A child
 * process started by a rank inherits these variables: do not call this from helpers that a
 * rank spawns. */
static bool env_set(const char *name)
{
    const char *v = getenv(name);
    return v && *v;
}

static long env_long(const char *name)
{
    const char *v = getenv(name);
    if (!v || !*v) return -1;
    char *end = NULL;
    long x = strtol(v, &end, 10);
    return end && *end == '\0' ? x : -1;
}

bool tsr_comm_mpi_launched(void)
{
    if (env_set("OMPI_COMM_WORLD_SIZE") || env_set("PMIX_RANK") || env_set("PMI_RANK") ||
        env_set("PMI_SIZE"))
        return true;
    if (env_set("SLURM_STEP_ID")) {
        long n = env_long("SLURM_STEP_NUM_TASKS");
        if (n < 0) n = env_long("SLURM_NTASKS");
        if (n > 1) return true;
    }
    return false;
}

#ifdef TSR_HAVE_MPI

#include <limits.h>
#include <mpi.h>
#include <pthread.h>

/* A timed-out receive gets this long to confirm its cancellation. */
#define CANCEL_GRACE_NS 1000000000u
/* tsr_comm_mpi_finalize waits this long for orphaned requests before giving up on
 * MPI_Finalize. */
#define ORPHAN_GRACE_NS 1000000000u

typedef struct {
    MPI_Comm comm;
    int *world_ranks; /* world rank of each rank of comm (for messages) */
    int *icounts;     /* allgatherv scratch, size entries each */
    int *idispls;
    bool broken; /* an operation timed out or failed mid-collective */
} mpi_impl;

static struct {
    bool initialized;    /* MPI is up (by us or by the host program) */
    bool we_initialized; /* ... by us: we finalize */
    bool finalized;
    pthread_t thread; /* the thread that initialized MPI (FUNNELED) */
    int tag_ub;
    MPI_Request *orphans; /* timed-out requests that could not be cancelled */
    size_t n_orphans, cap_orphans;
} g_mpi;

static const tsr_comm_vtable mpi_vt;

static void mpi_errstr(int code, char *buf, size_t len)
{
    char s[MPI_MAX_ERROR_STRING];
    int n = 0;
    if (MPI_Error_string(code, s, &n) == MPI_SUCCESS && n > 0)
        snprintf(buf, len, "%.*s", n, s);
    else
        snprintf(buf, len, "MPI error %d", code);
}

static int fail_mpi(tsr_comm *c, int code, const char *op, char *err, size_t err_len)
{
    char s[MPI_MAX_ERROR_STRING + 16];
    mpi_errstr(code, s, sizeof s);
    if (c)
        tsr_set_err(err, err_len, "%s on MPI communicator of %d ranks failed: %s", op, c->size, s);
    else
        tsr_set_err(err, err_len, "%s failed: %s", op, s);
    return TSR_COMM_ERR;
}

static void orphan(MPI_Request req)
{
    if (req == MPI_REQUEST_NULL) return;
    if (g_mpi.n_orphans == g_mpi.cap_orphans) {
        size_t cap = g_mpi.cap_orphans ? 2 * g_mpi.cap_orphans : 8;
        MPI_Request *p = realloc(g_mpi.orphans, cap * sizeof *p);
        if (!p) return; /* forgotten: finalize may then wait for it */
        g_mpi.orphans = p;
        g_mpi.cap_orphans = cap;
    }
    g_mpi.orphans[g_mpi.n_orphans++] = req;
}

/* Poll req until it completes or deadline_ns (0 = none) passes. Returns MPI's code; *done
 * tells which. */
static int poll_request(MPI_Request *req, MPI_Status *st, uint64_t deadline_ns, int *done)
{
    uint64_t t0 = tsr_now_ns();
    for (;;) {
        *done = 0;
        int rc = MPI_Test(req, done, st);
        if (rc != MPI_SUCCESS || *done) return rc;
        uint64_t now = tsr_now_ns();
        if (deadline_ns && now >= deadline_ns) return MPI_SUCCESS;
        tsr_comm_poll_pause(now - t0);
    }
}

/* Usable from this thread, not broken? */
static int check_usable(tsr_comm *c, const char *op, char *err, size_t err_len)
{
    mpi_impl *m = c->impl;
    if (!pthread_equal(pthread_self(), g_mpi.thread)) {
        tsr_set_err(err, err_len,
                    "%s: MPI communicator used from a thread other than the one that "
                    "initialized MPI (MPI_THREAD_FUNNELED)",
                    op);
        return TSR_COMM_EINVAL;
    }
    if (g_mpi.finalized) {
        tsr_set_err(err, err_len, "%s: MPI was already finalized", op);
        return TSR_COMM_ERR;
    }
    if (m->broken) {
        tsr_set_err(err, err_len,
                    "%s: MPI communicator is unusable after an earlier timeout or failure", op);
        return TSR_COMM_ERR;
    }
    return TSR_COMM_OK;
}

static int check_count(size_t n, const char *op, const char *unit, char *err, size_t err_len)
{
    if (n > (size_t)INT_MAX) {
        tsr_set_err(err, err_len, "%s: %zu %s exceed MPI's limit of %d per call", op, n, unit,
                    INT_MAX);
        return TSR_COMM_EINVAL;
    }
    return TSR_COMM_OK;
}

/* Wait for a collective request; on timeout or failure the communicator is broken. */
static int wait_coll(tsr_comm *c, MPI_Request *req, const char *op, const char *detail, char *err,
                     size_t err_len)
{
    mpi_impl *m = c->impl;
    MPI_Status st;
    int done = 0;
    int rc = poll_request(req, &st, tsr_comm_deadline_ns(c), &done);
    if (rc != MPI_SUCCESS) {
        m->broken = true;
        orphan(*req);
        return fail_mpi(c, rc, op, err, err_len);
    }
    if (done) return TSR_COMM_OK;
    m->broken = true;
    orphan(*req);
    tsr_set_err(err, err_len,
                "%s (%s) over %d ranks: no answer from the group within %lld ms; the "
                "communicator is unusable now",
                op, detail, c->size, (long long)c->timeout_ms);
    return TSR_COMM_ETIMEOUT;
}

/* " (world rank N)" when it differs from the rank in c. */
static void world_suffix(const tsr_comm *c, int peer, char *buf, size_t len)
{
    const mpi_impl *m = c->impl;
    buf[0] = '\0';
    if (m->world_ranks[peer] != peer && m->world_ranks[peer] != MPI_UNDEFINED)
        snprintf(buf, len, " (world rank %d)", m->world_ranks[peer]);
}

/* Wait for a point-to-point request. A timed-out receive is cancelled; the communicator
 * stays usable when that succeeds. */
static int wait_p2p(tsr_comm *c, MPI_Request *req, MPI_Status *st, const char *op, int peer,
                    int tag, size_t n_bytes, bool is_recv, char *err, size_t err_len)
{
    mpi_impl *m = c->impl;
    char who[48];
    world_suffix(c, peer, who, sizeof who);
    int done = 0;
    int rc = poll_request(req, st, tsr_comm_deadline_ns(c), &done);
    if (rc != MPI_SUCCESS) {
        if (!done) {
            m->broken = true;
            orphan(*req);
        }
        char s[MPI_MAX_ERROR_STRING + 16];
        mpi_errstr(rc, s, sizeof s);
        tsr_set_err(err, err_len, "%s %s rank %d%s (tag %d, %zu bytes) failed: %s", op,
                    is_recv ? "from" : "to", peer, who, tag, n_bytes, s);
        return TSR_COMM_ERR;
    }
    if (done) return TSR_COMM_OK;

    bool cancelled = false;
    if (is_recv && MPI_Cancel(req) == MPI_SUCCESS) {
        rc = poll_request(req, st, tsr_now_ns() + CANCEL_GRACE_NS, &done);
        if (rc == MPI_SUCCESS && done) {
            int flag = 0;
            MPI_Test_cancelled(st, &flag);
            if (!flag) return TSR_COMM_OK; /* the message arrived while cancelling */
            cancelled = true;
        }
    }
    if (!cancelled) {
        m->broken = true;
        orphan(*req);
    }
    tsr_set_err(err, err_len, "%s: rank %d%s did not answer within %lld ms (tag %d, %zu bytes)%s",
                op, peer, who, (long long)c->timeout_ms, tag, n_bytes,
                cancelled ? "; the receive was cancelled" : "; the communicator is unusable now");
    return TSR_COMM_ETIMEOUT;
}

/* ---- operations ---- */

static int mpi_allreduce(tsr_comm *c, float *buf, size_t n, char *err, size_t err_len)
{
    mpi_impl *m = c->impl;
    int rc = check_usable(c, "allreduce", err, err_len);
    if (rc || (rc = check_count(n, "allreduce", "floats", err, err_len))) return rc;
    MPI_Request req = MPI_REQUEST_NULL;
    int mrc = MPI_Iallreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, m->comm, &req);
    if (mrc != MPI_SUCCESS) {
        m->broken = true;
        return fail_mpi(c, mrc, "MPI_Iallreduce", err, err_len);
    }
    char detail[48];
    snprintf(detail, sizeof detail, "%zu floats", n);
    return wait_coll(c, &req, "allreduce", detail, err, err_len);
}

static int mpi_allgather(tsr_comm *c, const void *send, void *recv, size_t n_bytes, char *err,
                         size_t err_len)
{
    mpi_impl *m = c->impl;
    int rc = check_usable(c, "allgather", err, err_len);
    if (rc || (rc = check_count(n_bytes * (size_t)c->size, "allgather", "bytes", err, err_len)))
        return rc;
    /* MPI forbids aliased buffers; the in-place form covers send == own slot of recv. */
    const void *sbuf = send == (const char *)recv + (size_t)c->rank * n_bytes ? MPI_IN_PLACE : send;
    MPI_Request req = MPI_REQUEST_NULL;
    int mrc =
        MPI_Iallgather(sbuf, (int)n_bytes, MPI_BYTE, recv, (int)n_bytes, MPI_BYTE, m->comm, &req);
    if (mrc != MPI_SUCCESS) {
        m->broken = true;
        return fail_mpi(c, mrc, "MPI_Iallgather", err, err_len);
    }
    char detail[48];
    snprintf(detail, sizeof detail, "%zu bytes per rank", n_bytes);
    return wait_coll(c, &req, "allgather", detail, err, err_len);
}

static int mpi_allgatherv(tsr_comm *c, const void *send, size_t n_bytes, void *recv,
                          const size_t *counts, const size_t *displs, char *err, size_t err_len)
{
    mpi_impl *m = c->impl;
    int rc = check_usable(c, "allgatherv", err, err_len);
    if (rc) return rc;
    for (int r = 0; r < c->size; r++) {
        if ((rc = check_count(counts[r], "allgatherv", "bytes (a count)", err, err_len)) ||
            (rc = check_count(displs[r], "allgatherv", "bytes (a displacement)", err, err_len)))
            return rc;
        m->icounts[r] = (int)counts[r];
        m->idispls[r] = (int)displs[r];
    }
    const void *sbuf = send == (const char *)recv + displs[c->rank] ? MPI_IN_PLACE : send;
    MPI_Request req = MPI_REQUEST_NULL;
    int mrc = MPI_Iallgatherv(sbuf, (int)n_bytes, MPI_BYTE, recv, m->icounts, m->idispls, MPI_BYTE,
                              m->comm, &req);
    if (mrc != MPI_SUCCESS) {
        m->broken = true;
        return fail_mpi(c, mrc, "MPI_Iallgatherv", err, err_len);
    }
    char detail[48];
    snprintf(detail, sizeof detail, "%zu bytes from this rank", n_bytes);
    return wait_coll(c, &req, "allgatherv", detail, err, err_len);
}

static int check_tag(int tag, const char *op, char *err, size_t err_len)
{
    if (tag > g_mpi.tag_ub) {
        tsr_set_err(err, err_len, "%s: tag %d above MPI_TAG_UB (%d)", op, tag, g_mpi.tag_ub);
        return TSR_COMM_EINVAL;
    }
    return TSR_COMM_OK;
}

static int mpi_send(tsr_comm *c, const void *buf, size_t n_bytes, int peer, int tag, char *err,
                    size_t err_len)
{
    mpi_impl *m = c->impl;
    int rc = check_usable(c, "send", err, err_len);
    if (rc || (rc = check_count(n_bytes, "send", "bytes", err, err_len)) ||
        (rc = check_tag(tag, "send", err, err_len)))
        return rc;
    MPI_Request req = MPI_REQUEST_NULL;
    int mrc = MPI_Isend(buf, (int)n_bytes, MPI_BYTE, peer, tag, m->comm, &req);
    if (mrc != MPI_SUCCESS) return fail_mpi(c, mrc, "MPI_Isend", err, err_len);
    MPI_Status st;
    return wait_p2p(c, &req, &st, "send", peer, tag, n_bytes, false, err, err_len);
}

static int mpi_recv(tsr_comm *c, void *buf, size_t n_bytes, int peer, int tag, char *err,
                    size_t err_len)
{
    mpi_impl *m = c->impl;
    int rc = check_usable(c, "recv", err, err_len);
    if (rc || (rc = check_count(n_bytes, "recv", "bytes", err, err_len)) ||
        (rc = check_tag(tag, "recv", err, err_len)))
        return rc;
    MPI_Request req = MPI_REQUEST_NULL;
    int mrc = MPI_Irecv(buf, (int)n_bytes, MPI_BYTE, peer, tag, m->comm, &req);
    if (mrc != MPI_SUCCESS) return fail_mpi(c, mrc, "MPI_Irecv", err, err_len);
    MPI_Status st;
    rc = wait_p2p(c, &req, &st, "recv", peer, tag, n_bytes, true, err, err_len);
    if (rc) return rc;
    int got = 0;
    if (MPI_Get_count(&st, MPI_BYTE, &got) != MPI_SUCCESS || (size_t)got != n_bytes) {
        char who[48];
        world_suffix(c, peer, who, sizeof who);
        tsr_set_err(err, err_len, "recv: rank %d%s sent %d bytes with tag %d, expected exactly %zu",
                    peer, who, got, tag, n_bytes);
        return TSR_COMM_ERR;
    }
    return TSR_COMM_OK;
}

static int mpi_bcast(tsr_comm *c, void *buf, size_t n_bytes, int root, char *err, size_t err_len)
{
    mpi_impl *m = c->impl;
    int rc = check_usable(c, "bcast", err, err_len);
    if (rc || (rc = check_count(n_bytes, "bcast", "bytes", err, err_len))) return rc;
    MPI_Request req = MPI_REQUEST_NULL;
    int mrc = MPI_Ibcast(buf, (int)n_bytes, MPI_BYTE, root, m->comm, &req);
    if (mrc != MPI_SUCCESS) {
        m->broken = true;
        return fail_mpi(c, mrc, "MPI_Ibcast", err, err_len);
    }
    char detail[64];
    snprintf(detail, sizeof detail, "%zu bytes from root %d", n_bytes, root);
    return wait_coll(c, &req, "bcast", detail, err, err_len);
}

static int mpi_barrier(tsr_comm *c, char *err, size_t err_len)
{
    mpi_impl *m = c->impl;
    int rc = check_usable(c, "barrier", err, err_len);
    if (rc) return rc;
    MPI_Request req = MPI_REQUEST_NULL;
    int mrc = MPI_Ibarrier(m->comm, &req);
    if (mrc != MPI_SUCCESS) {
        m->broken = true;
        return fail_mpi(c, mrc, "MPI_Ibarrier", err, err_len);
    }
    return wait_coll(c, &req, "barrier", "no data", err, err_len);
}

/* Wrap comm (which this takes over) into *out. */
static int mpi_wrap(MPI_Comm comm, tsr_comm **out, char *err, size_t err_len)
{
    int rank = 0, size = 0, rc = TSR_COMM_ERR;
    MPI_Group grp = MPI_GROUP_NULL, wgrp = MPI_GROUP_NULL;
    mpi_impl *m = calloc(1, sizeof *m);
    if (!m) goto oom;
    m->comm = comm;
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    m->world_ranks = malloc((size_t)size * sizeof(int));
    m->icounts = malloc((size_t)size * sizeof(int));
    m->idispls = malloc((size_t)size * sizeof(int));
    if (!m->world_ranks || !m->icounts || !m->idispls) goto oom;
    for (int r = 0; r < size; r++) m->icounts[r] = r;
    if (MPI_Comm_group(comm, &grp) != MPI_SUCCESS ||
        MPI_Comm_group(MPI_COMM_WORLD, &wgrp) != MPI_SUCCESS ||
        MPI_Group_translate_ranks(grp, size, m->icounts, wgrp, m->world_ranks) != MPI_SUCCESS) {
        tsr_set_err(err, err_len, "MPI: cannot translate ranks to MPI_COMM_WORLD");
        goto fail;
    }
    *out = tsr_comm_alloc(&mpi_vt, rank, size, m);
    if (!*out) goto oom;
    MPI_Group_free(&grp);
    MPI_Group_free(&wgrp);
    return TSR_COMM_OK;

oom:
    tsr_set_err(err, err_len, "MPI communicator: out of memory");
fail:
    if (grp != MPI_GROUP_NULL) MPI_Group_free(&grp);
    if (wgrp != MPI_GROUP_NULL) MPI_Group_free(&wgrp);
    MPI_Comm_free(&comm);
    if (m) {
        free(m->world_ranks);
        free(m->icounts);
        free(m->idispls);
        free(m);
    }
    return rc;
}

/* The (color, key) exchange runs under the deadline, so a dead or stuck rank is found there;
 * MPI_Comm_split itself (blocking, there is no non-blocking form) follows right after every
 * rank has answered. */
static int mpi_split(tsr_comm *c, int color, int key, tsr_comm **out, char *err, size_t err_len)
{
    mpi_impl *m = c->impl;
    int rc = check_usable(c, "split", err, err_len);
    if (rc) return rc;
    int mine[2] = {color, key};
    int *all = malloc((size_t)c->size * 2 * sizeof(int));
    if (!all) {
        tsr_set_err(err, err_len, "split: out of memory");
        return TSR_COMM_ERR;
    }
    MPI_Request req = MPI_REQUEST_NULL;
    int mrc = MPI_Iallgather(mine, 2, MPI_INT, all, 2, MPI_INT, m->comm, &req);
    if (mrc != MPI_SUCCESS) {
        m->broken = true;
        rc = fail_mpi(c, mrc, "MPI_Iallgather (split)", err, err_len);
        goto done;
    }
    rc = wait_coll(c, &req, "split", "color/key exchange", err, err_len);
    if (rc) {
        all = NULL; /* a pending request may still write into it: leave it allocated */
        goto done;
    }
    MPI_Comm sub = MPI_COMM_NULL;
    mrc = MPI_Comm_split(m->comm, color, key, &sub);
    if (mrc != MPI_SUCCESS) {
        m->broken = true;
        rc = fail_mpi(c, mrc, "MPI_Comm_split", err, err_len);
        goto done;
    }
    rc = mpi_wrap(sub, out, err, err_len);
done:
    free(all);
    return rc;
}

static void mpi_free(tsr_comm *c)
{
    mpi_impl *m = c->impl;
    if (!m) return;
    /* MPI_Comm_free only marks the communicator; pending (orphaned) requests keep it alive.
     * After finalize, or from a foreign thread, MPI must not be called: leave it. */
    if (g_mpi.initialized && !g_mpi.finalized && pthread_equal(pthread_self(), g_mpi.thread))
        MPI_Comm_free(&m->comm);
    free(m->world_ranks);
    free(m->icounts);
    free(m->idispls);
    free(m);
    c->impl = NULL;
}

static const tsr_comm_vtable mpi_vt = {
    .name = "mpi",
    .allreduce_sum_f32 = mpi_allreduce,
    .allgather = mpi_allgather,
    .allgatherv = mpi_allgatherv,
    .send = mpi_send,
    .recv = mpi_recv,
    .bcast = mpi_bcast,
    .barrier = mpi_barrier,
    .split = mpi_split,
    .free = mpi_free,
};

/* ---- process-wide ---- */

static int mpi_init_once(char *err, size_t err_len)
{
    if (g_mpi.finalized) {
        tsr_set_err(err, err_len, "MPI was already finalized in this process");
        return TSR_COMM_ERR;
    }
    if (g_mpi.initialized) {
        if (!pthread_equal(pthread_self(), g_mpi.thread)) {
            tsr_set_err(err, err_len,
                        "tsr_comm_mpi_world: called from a thread other than the one that "
                        "initialized MPI (MPI_THREAD_FUNNELED)");
            return TSR_COMM_EINVAL;
        }
        return TSR_COMM_OK;
    }
    int inited = 0, fin = 0, provided = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&fin);
    if (fin) {
        tsr_set_err(err, err_len, "MPI was already finalized in this process");
        return TSR_COMM_ERR;
    }
    if (!inited) {
        /* Open MPI reports (and ends the process) itself when the launch environment is
         * broken; a returned error is all we can see here. */
        int rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided);
        if (rc != MPI_SUCCESS) return fail_mpi(NULL, rc, "MPI_Init_thread", err, err_len);
        g_mpi.we_initialized = true;
    } else {
        MPI_Query_thread(&provided);
    }
    g_mpi.initialized = true;
    g_mpi.thread = pthread_self();
    if (provided < MPI_THREAD_FUNNELED) {
        tsr_set_err(err, err_len, "MPI provides thread level %d, below MPI_THREAD_FUNNELED",
                    provided);
        return TSR_COMM_ERR;
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    int *ub = NULL, flag = 0;
    MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &ub, &flag);
    g_mpi.tag_ub = flag && ub ? *ub : 32767; /* 32767 is the minimum the standard allows */
    return TSR_COMM_OK;
}

int tsr_comm_mpi_world(tsr_comm **out, char *err, size_t err_len)
{
    if (!out) {
        tsr_set_err(err, err_len, "tsr_comm_mpi_world: out is NULL");
        return TSR_COMM_EINVAL;
    }
    *out = NULL;
    int rc = mpi_init_once(err, err_len);
    if (rc) return rc;
    /* A duplicate keeps our traffic apart from any other user of MPI_COMM_WORLD; idup lets
     * the (collective) duplication run under the default deadline. */
    MPI_Comm dup = MPI_COMM_NULL;
    MPI_Request req = MPI_REQUEST_NULL;
    MPI_Status st;
    int done = 0;
    int mrc = MPI_Comm_idup(MPI_COMM_WORLD, &dup, &req);
    if (mrc == MPI_SUCCESS)
        mrc =
            poll_request(&req, &st, tsr_now_ns() + TSR_COMM_DEFAULT_TIMEOUT_MS * 1000000ull, &done);
    if (mrc != MPI_SUCCESS)
        return fail_mpi(NULL, mrc, "MPI_Comm_idup(MPI_COMM_WORLD)", err, err_len);
    if (!done) {
        orphan(req);
        tsr_set_err(err, err_len,
                    "MPI_Comm_idup(MPI_COMM_WORLD): no answer from the group within %d ms",
                    TSR_COMM_DEFAULT_TIMEOUT_MS);
        return TSR_COMM_ETIMEOUT;
    }
    return mpi_wrap(dup, out, err, err_len);
}

void tsr_comm_mpi_finalize(void)
{
    if (!g_mpi.initialized || g_mpi.finalized) return;
    g_mpi.finalized = true;
    bool pending = false;
    if (g_mpi.n_orphans) {
        /* Requests that timed out may still complete (a slow peer); a dead peer never
         * answers, and MPI_Finalize would then wait for it forever. */
        uint64_t t0 = tsr_now_ns();
        for (;;) {
            int all = 0;
            if (MPI_Testall((int)g_mpi.n_orphans, g_mpi.orphans, &all, MPI_STATUSES_IGNORE) !=
                MPI_SUCCESS) {
                pending = true;
                break;
            }
            if (all) break;
            uint64_t now = tsr_now_ns();
            if (now - t0 >= ORPHAN_GRACE_NS) {
                pending = true;
                break;
            }
            tsr_comm_poll_pause(now - t0);
        }
    }
    free(g_mpi.orphans);
    g_mpi.orphans = NULL;
    g_mpi.n_orphans = g_mpi.cap_orphans = 0;
    if (g_mpi.we_initialized && !pending) MPI_Finalize();
}

void tsr_comm_mpi_abort(int code)
{
    int inited = 0, fin = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&fin);
    if (inited && !fin) MPI_Abort(MPI_COMM_WORLD, code);
    exit(code); /* no MPI job to end: end this process */
}

#else /* !TSR_HAVE_MPI */

int tsr_comm_mpi_world(tsr_comm **out, char *err, size_t err_len)
{
    if (out) *out = NULL;
    tsr_set_err(err, err_len, "tsr_comm_mpi_world: built without MPI");
    return TSR_COMM_ERR;
}

void tsr_comm_mpi_finalize(void) {}

void tsr_comm_mpi_abort(int code)
{
    exit(code);
}

#endif
