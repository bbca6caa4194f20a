/*
 * comm.c — the generic layer of the communication seam (see comm.h) and the local
 * one-rank implementation.
 *
 * Every public operation goes through here: arguments are checked once, before any
 * implementation sees them (so MPI and NCCL never get a peer out of range or a NULL buffer),
 * the call is timed with CLOCK_MONOTONIC and counted into the communicator's stats. The
 * implementations only move bytes and enforce their deadlines.
 *
 * The local communicator is what a single-process replica uses: rank 0 of 1, where every
 * collective is a copy or a no-op and point-to-point traffic has no peer to go to.
 */
#include "worker/comm.h"
#include "kernels/util.h"

#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- helpers for implementations ---- */

uint64_t tsr_comm_deadline_ns(const tsr_comm *c)
{
    if (!c || c->timeout_ms <= 0) return 0;
    return tsr_now_ns() + (uint64_t)c->timeout_ms * 1000000u;
}

void tsr_comm_poll_pause(uint64_t waited_ns)
{
    if (waited_ns < 20000u) return; /* spin: most operations finish within microseconds */
    if (waited_ns < 2000000u) {
        sched_yield(); /* let an oversubscribed peer run */
        return;
    }
    uint64_t ns = waited_ns / 16u;
    if (ns > 200000u) ns = 200000u;
    struct timespec ts = {0, (long)ns};
    nanosleep(&ts, NULL);
}

tsr_comm *tsr_comm_alloc(const tsr_comm_vtable *vt, int rank, int size, void *impl)
{
    tsr_comm *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->vt = vt;
    c->rank = rank;
    c->size = size;
    c->impl = impl;
    c->timeout_ms = TSR_COMM_DEFAULT_TIMEOUT_MS;
    return c;
}

const char *tsr_comm_status_name(int status)
{
    switch (status) {
    case TSR_COMM_OK:
        return "ok";
    case TSR_COMM_ERR:
        return "error";
    case TSR_COMM_ETIMEOUT:
        return "timeout";
    case TSR_COMM_EINVAL:
        return "invalid argument";
    default:
        return "unknown status";
    }
}

/* ---- generic layer ---- */

static int check_comm(const tsr_comm *c, const char *op, char *err, size_t err_len)
{
    if (!c || !c->vt) {
        tsr_set_err(err, err_len, "%s: NULL communicator", op);
        return TSR_COMM_EINVAL;
    }
    return TSR_COMM_OK;
}

static int check_buf(const tsr_comm *c, const char *op, const void *p, size_t n, const char *what,
                     char *err, size_t err_len)
{
    if (n > 0 && !p) {
        tsr_set_err(err, err_len, "%s on '%s' communicator: %s is NULL with %zu bytes", op,
                    c->vt->name, what, n);
        return TSR_COMM_EINVAL;
    }
    return TSR_COMM_OK;
}

static int check_rank(const tsr_comm *c, const char *op, int r, const char *what, bool not_self,
                      char *err, size_t err_len)
{
    if (r < 0 || r >= c->size) {
        tsr_set_err(err, err_len, "%s on '%s' communicator: %s %d out of range [0, %d)", op,
                    c->vt->name, what, r, c->size);
        return TSR_COMM_EINVAL;
    }
    if (not_self && r == c->rank) {
        tsr_set_err(err, err_len,
                    "%s on '%s' communicator: %s %d is this rank (self-messages are refused)", op,
                    c->vt->name, what, r);
        return TSR_COMM_EINVAL;
    }
    return TSR_COMM_OK;
}

/* Time and count one call. */
static void account(tsr_comm *c, uint64_t t0, int rc, uint64_t sent, uint64_t recvd)
{
    c->stats.t_comm_ns += tsr_now_ns() - t0;
    c->stats.n_calls++;
    if (rc == TSR_COMM_OK) {
        c->stats.n_bytes_sent += sent;
        c->stats.n_bytes_recv += recvd;
    }
}

void tsr_comm_set_timeout_ms(tsr_comm *c, int64_t timeout_ms)
{
    if (c) c->timeout_ms = timeout_ms > 0 ? timeout_ms : 0;
}

int tsr_comm_allreduce_sum_f32(tsr_comm *c, float *buf, size_t n, char *err, size_t err_len)
{
    int rc = check_comm(c, "allreduce", err, err_len);
    if (rc) return rc;
    if (n > SIZE_MAX / sizeof(float)) {
        tsr_set_err(err, err_len, "allreduce: %zu floats overflow size_t", n);
        return TSR_COMM_EINVAL;
    }
    rc = check_buf(c, "allreduce", buf, n * sizeof(float), "buf", err, err_len);
    if (rc) return rc;
    uint64_t t0 = tsr_now_ns();
    rc = c->vt->allreduce_sum_f32(c, buf, n, err, err_len);
    uint64_t bytes = c->size > 1 ? (uint64_t)n * sizeof(float) : 0;
    account(c, t0, rc, bytes, bytes);
    return rc;
}

int tsr_comm_allgather(tsr_comm *c, const void *send, void *recv, size_t n_bytes, char *err,
                       size_t err_len)
{
    int rc = check_comm(c, "allgather", err, err_len);
    if (rc) return rc;
    if (n_bytes > SIZE_MAX / (size_t)c->size) {
        tsr_set_err(err, err_len, "allgather: %d × %zu bytes overflow size_t", c->size, n_bytes);
        return TSR_COMM_EINVAL;
    }
    if ((rc = check_buf(c, "allgather", send, n_bytes, "send", err, err_len)) ||
        (rc = check_buf(c, "allgather", recv, n_bytes * (size_t)c->size, "recv", err, err_len)))
        return rc;
    uint64_t t0 = tsr_now_ns();
    rc = c->vt->allgather(c, send, recv, n_bytes, err, err_len);
    account(c, t0, rc, c->size > 1 ? n_bytes : 0, (uint64_t)n_bytes * (uint64_t)(c->size - 1));
    return rc;
}

int tsr_comm_allgatherv(tsr_comm *c, const void *send, size_t n_bytes, void *recv,
                        const size_t *counts, const size_t *displs, char *err, size_t err_len)
{
    int rc = check_comm(c, "allgatherv", err, err_len);
    if (rc) return rc;
    if (!counts || !displs) {
        tsr_set_err(err, err_len, "allgatherv on '%s' communicator: counts or displs is NULL",
                    c->vt->name);
        return TSR_COMM_EINVAL;
    }
    if (counts[c->rank] != n_bytes) {
        tsr_set_err(err, err_len,
                    "allgatherv on '%s' communicator: counts[%d] = %zu but this rank sends "
                    "%zu bytes",
                    c->vt->name, c->rank, counts[c->rank], n_bytes);
        return TSR_COMM_EINVAL;
    }
    uint64_t others = 0;
    size_t end = 0; /* bytes of recv the layout touches */
    for (int r = 0; r < c->size; r++) {
        if (displs[r] > SIZE_MAX - counts[r]) {
            tsr_set_err(err, err_len, "allgatherv: displs[%d] + counts[%d] overflow size_t", r, r);
            return TSR_COMM_EINVAL;
        }
        if (counts[r] && displs[r] + counts[r] > end) end = displs[r] + counts[r];
        if (r != c->rank) others += counts[r];
    }
    if ((rc = check_buf(c, "allgatherv", send, n_bytes, "send", err, err_len)) ||
        (rc = check_buf(c, "allgatherv", recv, end, "recv", err, err_len)))
        return rc;
    uint64_t t0 = tsr_now_ns();
    rc = c->vt->allgatherv(c, send, n_bytes, recv, counts, displs, err, err_len);
    account(c, t0, rc, c->size > 1 ? n_bytes : 0, others);
    return rc;
}

int tsr_comm_send(tsr_comm *c, const void *buf, size_t n_bytes, int peer, int tag, char *err,
                  size_t err_len)
{
    int rc = check_comm(c, "send", err, err_len);
    if (rc) return rc;
    if ((rc = check_buf(c, "send", buf, n_bytes, "buf", err, err_len)) ||
        (rc = check_rank(c, "send", peer, "peer", true, err, err_len)))
        return rc;
    if (tag < 0) {
        tsr_set_err(err, err_len, "send on '%s' communicator: negative tag %d", c->vt->name, tag);
        return TSR_COMM_EINVAL;
    }
    uint64_t t0 = tsr_now_ns();
    rc = c->vt->send(c, buf, n_bytes, peer, tag, err, err_len);
    account(c, t0, rc, n_bytes, 0);
    return rc;
}

int tsr_comm_recv(tsr_comm *c, void *buf, size_t n_bytes, int peer, int tag, char *err,
                  size_t err_len)
{
    int rc = check_comm(c, "recv", err, err_len);
    if (rc) return rc;
    if ((rc = check_buf(c, "recv", buf, n_bytes, "buf", err, err_len)) ||
        (rc = check_rank(c, "recv", peer, "peer", true, err, err_len)))
        return rc;
    if (tag < 0) {
        tsr_set_err(err, err_len, "recv on '%s' communicator: negative tag %d", c->vt->name, tag);
        return TSR_COMM_EINVAL;
    }
    uint64_t t0 = tsr_now_ns();
    rc = c->vt->recv(c, buf, n_bytes, peer, tag, err, err_len);
    account(c, t0, rc, 0, n_bytes);
    return rc;
}

int tsr_comm_bcast(tsr_comm *c, void *buf, size_t n_bytes, int root, char *err, size_t err_len)
{
    int rc = check_comm(c, "bcast", err, err_len);
    if (rc) return rc;
    if ((rc = check_buf(c, "bcast", buf, n_bytes, "buf", err, err_len)) ||
        (rc = check_rank(c, "bcast", root, "root", false, err, err_len)))
        return rc;
    uint64_t t0 = tsr_now_ns();
    rc = c->vt->bcast(c, buf, n_bytes, root, err, err_len);
    bool multi = c->size > 1;
    account(c, t0, rc, multi && c->rank == root ? n_bytes : 0,
            multi && c->rank != root ? n_bytes : 0);
    return rc;
}

int tsr_comm_barrier(tsr_comm *c, char *err, size_t err_len)
{
    int rc = check_comm(c, "barrier", err, err_len);
    if (rc) return rc;
    uint64_t t0 = tsr_now_ns();
    rc = c->vt->barrier(c, err, err_len);
    account(c, t0, rc, 0, 0);
    return rc;
}

int tsr_comm_split(tsr_comm *c, int color, int key, tsr_comm **out, char *err, size_t err_len)
{
    int rc = check_comm(c, "split", err, err_len);
    if (rc) return rc;
    if (!out) {
        tsr_set_err(err, err_len, "split on '%s' communicator: out is NULL", c->vt->name);
        return TSR_COMM_EINVAL;
    }
    *out = NULL;
    if (color < 0) {
        tsr_set_err(err, err_len, "split on '%s' communicator: negative color %d", c->vt->name,
                    color);
        return TSR_COMM_EINVAL;
    }
    if (!c->vt->split) {
        tsr_set_err(err, err_len, "split is not supported by the '%s' communicator", c->vt->name);
        return TSR_COMM_ERR;
    }
    uint64_t t0 = tsr_now_ns();
    rc = c->vt->split(c, color, key, out, err, err_len);
    if (rc == TSR_COMM_OK && *out) (*out)->timeout_ms = c->timeout_ms;
    account(c, t0, rc, 0, 0);
    return rc;
}

void tsr_comm_free(tsr_comm *c)
{
    if (!c) return;
    if (c->vt && c->vt->free) c->vt->free(c);
    free(c);
}

/* ---- local implementation: one rank ---- */

static int local_allreduce(tsr_comm *c, float *buf, size_t n, char *err, size_t err_len)
{
    return TSR_COMM_OK; /* the sum over one rank is the input */
}

static int local_allgather(tsr_comm *c, const void *send, void *recv, size_t n_bytes, char *err,
                           size_t err_len)
{
    if (n_bytes && send != recv) memmove(recv, send, n_bytes);
    return TSR_COMM_OK;
}

static int local_allgatherv(tsr_comm *c, const void *send, size_t n_bytes, void *recv,
                            const size_t *counts, const size_t *displs, char *err, size_t err_len)
{
    char *dst = (char *)recv + displs[0];
    if (n_bytes && (const void *)dst != send) memmove(dst, send, n_bytes);
    return TSR_COMM_OK;
}

static int local_send(tsr_comm *c, const void *buf, size_t n_bytes, int peer, int tag, char *err,
                      size_t err_len)
{
    tsr_set_err(err, err_len, "send: the local communicator has no peer %d", peer);
    return TSR_COMM_EINVAL;
}

static int local_recv(tsr_comm *c, void *buf, size_t n_bytes, int peer, int tag, char *err,
                      size_t err_len)
{
    tsr_set_err(err, err_len, "recv: the local communicator has no peer %d", peer);
    return TSR_COMM_EINVAL;
}

static int local_bcast(tsr_comm *c, void *buf, size_t n_bytes, int root, char *err, size_t err_len)
{
    return TSR_COMM_OK;
}

static int local_barrier(tsr_comm *c, char *err, size_t err_len)
{
    return TSR_COMM_OK;
}

static int local_split(tsr_comm *c, int color, int key, tsr_comm **out, char *err, size_t err_len)
{
    return tsr_comm_local_new(out, err, err_len);
}

static void local_free(tsr_comm *c) {}

static const tsr_comm_vtable local_vt = {
    .name = "local",
    .allreduce_sum_f32 = local_allreduce,
    .allgather = local_allgather,
    .allgatherv = local_allgatherv,
    .send = local_send,
    .recv = local_recv,
    .bcast = local_bcast,
    .barrier = local_barrier,
    .split = local_split,
    .free = local_free,
};

int tsr_comm_local_new(tsr_comm **out, char *err, size_t err_len)
{
    if (!out) {
        tsr_set_err(err, err_len, "tsr_comm_local_new: out is NULL");
        return TSR_COMM_EINVAL;
    }
    *out = tsr_comm_alloc(&local_vt, 0, 1, NULL);
    if (!*out) {
        tsr_set_err(err, err_len, "tsr_comm_local_new: out of memory");
        return TSR_COMM_ERR;
    }
    return TSR_COMM_OK;
}
