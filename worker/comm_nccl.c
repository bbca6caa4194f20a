/*
 * comm_nccl.c — the NCCL implementation of the communication seam (see comm.h): buffers are
 * CUDA device pointers on the communicator's device, one CUDA stream per communicator.
 *
 * Deadlines: communicators are created non-blocking (ncclConfig_t.blocking = 0), so neither
 * initialization nor an operation can park the calling thread inside NCCL. After enqueuing,
 * the call polls ncclCommGetAsyncError (until the enqueue is no longer ncclInProgress) and
 * cudaStreamQuery (until the stream has drained) with tsr_comm_poll_pause between polls; when
 * the deadline passes the communicator is aborted (ncclCommAbort, which also stops its
 * kernels) and is unusable afterwards.
 *
 * Bootstrap: every rank first checks its GPU (cudaGetDeviceCount, cudaSetDevice, a stream);
 * an allreduce over the bootstrap communicator tells every rank whether all are ready, so a
 * host without a GPU or driver fails on all ranks at once (no rank waits for a unique id that
 * never comes). Then rank 0's ncclGetUniqueId is broadcast and ncclCommInitRankConfig runs.
 *
 * Mapping: allgatherv = a group of ncclBroadcast calls (NCCL has no allgatherv); barrier = a
 * one-float allreduce on a device scratch word; send/recv ignore the tag (NCCL matches the
 * messages between two ranks in order); split = ncclCommSplit.
 *
 * Compiled fully only with TSR_HAVE_NCCL (CMake found the CUDA toolkit and NCCL); otherwise
 * the constructor returns TSR_COMM_ERR "built without NCCL".
 */
#include "worker/comm.h"
#include "kernels/util.h"

#ifdef TSR_HAVE_NCCL

#include <cuda_runtime.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    ncclComm_t comm; /* NULL after an abort */
    cudaStream_t stream;
    int device;
    float *scratch; /* one device float (barrier) */
    bool broken;
} nccl_impl;

static const tsr_comm_vtable nccl_vt;

bool tsr_comm_nccl_available(void)
{
    return true;
}

static void nccl_abort(nccl_impl *n)
{
    if (n->comm) ncclCommAbort(n->comm);
    n->comm = NULL;
    n->broken = true;
}

/* Wait until comm's pending enqueue and (when stream is set) the stream are done. peer >= 0
 * names the peer of a point-to-point operation in the timeout message. */
static int wait_done(ncclComm_t comm, cudaStream_t stream, uint64_t deadline_ns, int64_t timeout_ms,
                     const char *op, int peer, int size, char *err, size_t err_len)
{
    uint64_t t0 = tsr_now_ns();
    for (;;) {
        ncclResult_t async = ncclSuccess;
        ncclResult_t r = ncclCommGetAsyncError(comm, &async);
        if (r != ncclSuccess) async = r;
        if (async != ncclSuccess && async != ncclInProgress) {
            tsr_set_err(err, err_len, "%s: NCCL error: %s (%s)", op, ncclGetErrorString(async),
                        ncclGetLastError(comm));
            return TSR_COMM_ERR;
        }
        if (async == ncclSuccess) {
            if (!stream) return TSR_COMM_OK;
            cudaError_t ce = cudaStreamQuery(stream);
            if (ce == cudaSuccess) return TSR_COMM_OK;
            if (ce != cudaErrorNotReady) {
                tsr_set_err(err, err_len, "%s: CUDA error: %s", op, cudaGetErrorString(ce));
                return TSR_COMM_ERR;
            }
        }
        uint64_t now = tsr_now_ns();
        if (deadline_ns && now >= deadline_ns) break;
        tsr_comm_poll_pause(now - t0);
    }
    if (peer >= 0)
        tsr_set_err(err, err_len,
                    "%s: rank %d did not answer within %lld ms; the NCCL communicator was "
                    "aborted",
                    op, peer, (long long)timeout_ms);
    else
        tsr_set_err(err, err_len,
                    "%s over %d ranks: no answer from the group within %lld ms; the NCCL "
                    "communicator was aborted",
                    op, size, (long long)timeout_ms);
    return TSR_COMM_ETIMEOUT;
}

/* Ready to enqueue on c? Sets the device of the calling thread. */
static int begin(tsr_comm *c, const char *op, char *err, size_t err_len)
{
    nccl_impl *n = c->impl;
    if (n->broken || !n->comm) {
        tsr_set_err(err, err_len,
                    "%s: NCCL communicator is unusable after an earlier timeout or failure", op);
        return TSR_COMM_ERR;
    }
    cudaError_t ce = cudaSetDevice(n->device);
    if (ce != cudaSuccess) {
        tsr_set_err(err, err_len, "%s: cudaSetDevice(%d): %s", op, n->device,
                    cudaGetErrorString(ce));
        return TSR_COMM_ERR;
    }
    return TSR_COMM_OK;
}

/* After enqueuing with result r: wait for completion, abort on failure or timeout. */
static int finish(tsr_comm *c, ncclResult_t r, const char *op, int peer, char *err, size_t err_len)
{
    nccl_impl *n = c->impl;
    int rc;
    if (r != ncclSuccess && r != ncclInProgress) {
        tsr_set_err(err, err_len, "%s: %s (%s)", op, ncclGetErrorString(r),
                    ncclGetLastError(n->comm));
        rc = TSR_COMM_ERR;
    } else {
        rc = wait_done(n->comm, n->stream, tsr_comm_deadline_ns(c), c->timeout_ms, op, peer,
                       c->size, err, err_len);
    }
    if (rc) nccl_abort(n);
    return rc;
}

static int nccl_allreduce(tsr_comm *c, float *buf, size_t n, char *err, size_t err_len)
{
    nccl_impl *m = c->impl;
    int rc = begin(c, "allreduce", err, err_len);
    if (rc) return rc;
    ncclResult_t r = ncclAllReduce(buf, buf, n, ncclFloat32, ncclSum, m->comm, m->stream);
    return finish(c, r, "allreduce", -1, err, err_len);
}

static int nccl_allgather(tsr_comm *c, const void *send, void *recv, size_t n_bytes, char *err,
                          size_t err_len)
{
    nccl_impl *m = c->impl;
    int rc = begin(c, "allgather", err, err_len);
    if (rc) return rc;
    ncclResult_t r = ncclAllGather(send, recv, n_bytes, ncclUint8, m->comm, m->stream);
    return finish(c, r, "allgather", -1, err, err_len);
}

static int nccl_allgatherv(tsr_comm *c, const void *send, size_t n_bytes, void *recv,
                           const size_t *counts, const size_t *displs, char *err, size_t err_len)
{
    nccl_impl *m = c->impl;
    int rc = begin(c, "allgatherv", err, err_len);
    if (rc) return rc;
    ncclResult_t r = ncclGroupStart();
    for (int root = 0; root < c->size && (r == ncclSuccess || r == ncclInProgress); root++) {
        if (!counts[root]) continue; /* counts agree on every rank: all skip it */
        char *dst = (char *)recv + displs[root];
        r = ncclBroadcast(root == c->rank ? send : dst, dst, counts[root], ncclUint8, root, m->comm,
                          m->stream);
    }
    ncclResult_t r2 = ncclGroupEnd();
    if (r == ncclSuccess || r == ncclInProgress) r = r2;
    return finish(c, r, "allgatherv", -1, err, err_len);
}

static int nccl_send(tsr_comm *c, const void *buf, size_t n_bytes, int peer, int tag, char *err,
                     size_t err_len)
{
    nccl_impl *m = c->impl;
    int rc = begin(c, "send", err, err_len);
    if (rc) return rc;
    ncclResult_t r = ncclSend(buf, n_bytes, ncclUint8, peer, m->comm, m->stream);
    return finish(c, r, "send", peer, err, err_len);
}

static int nccl_recv(tsr_comm *c, void *buf, size_t n_bytes, int peer, int tag, char *err,
                     size_t err_len)
{
    nccl_impl *m = c->impl;
    int rc = begin(c, "recv", err, err_len);
    if (rc) return rc;
    ncclResult_t r = ncclRecv(buf, n_bytes, ncclUint8, peer, m->comm, m->stream);
    return finish(c, r, "recv", peer, err, err_len);
}

static int nccl_bcast(tsr_comm *c, void *buf, size_t n_bytes, int root, char *err, size_t err_len)
{
    nccl_impl *m = c->impl;
    int rc = begin(c, "bcast", err, err_len);
    if (rc) return rc;
    ncclResult_t r = ncclBroadcast(buf, buf, n_bytes, ncclUint8, root, m->comm, m->stream);
    return finish(c, r, "bcast", -1, err, err_len);
}

static int nccl_barrier(tsr_comm *c, char *err, size_t err_len)
{
    nccl_impl *m = c->impl;
    int rc = begin(c, "barrier", err, err_len);
    if (rc) return rc;
    ncclResult_t r =
        ncclAllReduce(m->scratch, m->scratch, 1, ncclFloat32, ncclSum, m->comm, m->stream);
    return finish(c, r, "barrier", -1, err, err_len);
}

/* Stream + scratch for a communicator on the current device; *out owns comm from here. */
static int wrap(ncclComm_t comm, int device, int rank, int size, tsr_comm **out, char *err,
                size_t err_len)
{
    nccl_impl *n = calloc(1, sizeof *n);
    cudaError_t ce = cudaSuccess;
    if (!n) {
        tsr_set_err(err, err_len, "NCCL communicator: out of memory");
        goto fail;
    }
    n->comm = comm;
    n->device = device;
    if ((ce = cudaStreamCreateWithFlags(&n->stream, cudaStreamNonBlocking)) != cudaSuccess ||
        (ce = cudaMalloc((void **)&n->scratch, sizeof(float))) != cudaSuccess) {
        tsr_set_err(err, err_len, "NCCL communicator: %s", cudaGetErrorString(ce));
        goto fail;
    }
    *out = tsr_comm_alloc(&nccl_vt, rank, size, n);
    if (!*out) {
        tsr_set_err(err, err_len, "NCCL communicator: out of memory");
        goto fail;
    }
    return TSR_COMM_OK;

fail:
    if (comm) ncclCommAbort(comm);
    if (n) {
        if (n->scratch) cudaFree(n->scratch);
        if (n->stream) cudaStreamDestroy(n->stream);
        free(n);
    }
    return TSR_COMM_ERR;
}

static int nccl_split(tsr_comm *c, int color, int key, tsr_comm **out, char *err, size_t err_len)
{
    nccl_impl *m = c->impl;
    int rc = begin(c, "split", err, err_len);
    if (rc) return rc;
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    ncclComm_t sub = NULL;
    ncclResult_t r = ncclCommSplit(m->comm, color, key, &sub, &cfg);
    if (r != ncclSuccess && r != ncclInProgress) {
        tsr_set_err(err, err_len, "split: ncclCommSplit: %s (%s)", ncclGetErrorString(r),
                    ncclGetLastError(m->comm));
        nccl_abort(m);
        return TSR_COMM_ERR;
    }
    uint64_t deadline = tsr_comm_deadline_ns(c);
    if ((rc = wait_done(m->comm, NULL, deadline, c->timeout_ms, "split", -1, c->size, err,
                        err_len)) ||
        (sub && (rc = wait_done(sub, NULL, deadline, c->timeout_ms, "split", -1, c->size, err,
                                err_len)))) {
        if (sub) ncclCommAbort(sub);
        nccl_abort(m);
        return rc;
    }
    int sub_rank = 0, sub_size = 0;
    if (!sub || ncclCommUserRank(sub, &sub_rank) != ncclSuccess ||
        ncclCommCount(sub, &sub_size) != ncclSuccess) {
        tsr_set_err(err, err_len, "split: ncclCommSplit gave no usable communicator");
        if (sub) ncclCommAbort(sub);
        return TSR_COMM_ERR;
    }
    return wrap(sub, m->device, sub_rank, sub_size, out, err, err_len);
}

static void nccl_free(tsr_comm *c)
{
    nccl_impl *n = c->impl;
    if (!n) return;
    cudaSetDevice(n->device);
    if (n->comm) {
        /* Finalize flushes outstanding work; bounded by the communicator's deadline. */
        ncclResult_t r = ncclCommFinalize(n->comm);
        char ignored[8];
        if ((r == ncclSuccess || r == ncclInProgress) &&
            wait_done(n->comm, NULL, tsr_comm_deadline_ns(c), c->timeout_ms, "free", -1, c->size,
                      ignored, sizeof ignored) == TSR_COMM_OK)
            ncclCommDestroy(n->comm);
        else
            ncclCommAbort(n->comm);
    }
    if (n->scratch) cudaFree(n->scratch);
    if (n->stream) cudaStreamDestroy(n->stream);
    free(n);
    c->impl = NULL;
}

static const tsr_comm_vtable nccl_vt = {
    .name = "nccl",
    .allreduce_sum_f32 = nccl_allreduce,
    .allgather = nccl_allgather,
    .allgatherv = nccl_allgatherv,
    .send = nccl_send,
    .recv = nccl_recv,
    .bcast = nccl_bcast,
    .barrier = nccl_barrier,
    .split = nccl_split,
    .free = nccl_free,
};

/* This rank's CUDA readiness; a message in why when not ready. */
static bool gpu_ready(int device, char *why, size_t why_len)
{
    int ndev = 0;
    cudaError_t ce = cudaGetDeviceCount(&ndev);
    if (ce != cudaSuccess) {
        tsr_set_err(why, why_len, "no usable CUDA device: cudaGetDeviceCount: %s (%s)",
                    cudaGetErrorString(ce), cudaGetErrorName(ce));
        return false;
    }
    if (ndev <= 0) {
        tsr_set_err(why, why_len, "no usable CUDA device: cudaGetDeviceCount found none");
        return false;
    }
    if (device < 0 || device >= ndev) {
        tsr_set_err(why, why_len, "CUDA device %d out of range (%d devices)", device, ndev);
        return false;
    }
    if ((ce = cudaSetDevice(device)) != cudaSuccess) {
        tsr_set_err(why, why_len, "cudaSetDevice(%d): %s", device, cudaGetErrorString(ce));
        return false;
    }
    return true;
}

int tsr_comm_nccl_new(tsr_comm *bootstrap, int device, tsr_comm **out, char *err, size_t err_len)
{
    if (!out || !bootstrap) {
        tsr_set_err(err, err_len, "tsr_comm_nccl_new: %s is NULL", out ? "bootstrap" : "out");
        return TSR_COMM_EINVAL;
    }
    *out = NULL;
    char why[320] = "";
    bool ok = gpu_ready(device, why, sizeof why);
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    if (ok && bootstrap->rank == 0) {
        ncclResult_t r = ncclGetUniqueId(&id);
        if (r != ncclSuccess) {
            tsr_set_err(why, sizeof why, "ncclGetUniqueId: %s", ncclGetErrorString(r));
            ok = false;
        }
    }
    /* Agree before waiting on each other: all ranks go on, or all return an error. */
    float n_bad = ok ? 0.0f : 1.0f;
    int rc = tsr_comm_allreduce_sum_f32(bootstrap, &n_bad, 1, err, err_len);
    if (rc) return rc;
    if (!ok) {
        tsr_set_err(err, err_len, "tsr_comm_nccl_new (rank %d of %d): %s", bootstrap->rank,
                    bootstrap->size, why);
        return TSR_COMM_ERR;
    }
    if (n_bad > 0.0f) {
        tsr_set_err(err, err_len,
                    "tsr_comm_nccl_new: %d of %d ranks could not set up CUDA/NCCL (this "
                    "rank, %d, could)",
                    (int)n_bad, bootstrap->size, bootstrap->rank);
        return TSR_COMM_ERR;
    }
    rc = tsr_comm_bcast(bootstrap, &id, sizeof id, 0, err, err_len);
    if (rc) return rc;

    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    ncclComm_t comm = NULL;
    ncclResult_t r = ncclCommInitRankConfig(&comm, bootstrap->size, id, bootstrap->rank, &cfg);
    if (r != ncclSuccess && r != ncclInProgress) {
        tsr_set_err(err, err_len, "ncclCommInitRankConfig (rank %d of %d): %s (%s)",
                    bootstrap->rank, bootstrap->size, ncclGetErrorString(r),
                    ncclGetLastError(comm));
        if (comm) ncclCommAbort(comm);
        return TSR_COMM_ERR;
    }
    rc = wait_done(comm, NULL, tsr_comm_deadline_ns(bootstrap), bootstrap->timeout_ms,
                   "ncclCommInitRankConfig", -1, bootstrap->size, err, err_len);
    if (rc) {
        ncclCommAbort(comm);
        return rc;
    }
    rc = wrap(comm, device, bootstrap->rank, bootstrap->size, out, err, err_len);
    if (rc == TSR_COMM_OK) (*out)->timeout_ms = bootstrap->timeout_ms;
    return rc;
}

#else /* !TSR_HAVE_NCCL */

bool tsr_comm_nccl_available(void)
{
    return false;
}

int tsr_comm_nccl_new(tsr_comm *bootstrap, int device, tsr_comm **out, char *err, size_t err_len)
{
    if (out) *out = NULL;
    tsr_set_err(err, err_len,
                "tsr_comm_nccl_new: built without NCCL (CMake found no CUDA toolkit + NCCL, "
                "or TSR_WITH_NCCL=OFF)");
    return TSR_COMM_ERR;
}

#endif
