/*
 * comm.h — the communication seam between the ranks of a replica.
 *
 * One interface, three implementations:
 *   - local: one rank, in process (every collective is a copy or a no-op);
 *   - MPI:   CPU buffers over Open MPI (mpirun / srun --mpi=pmix), one communication
 *            thread per rank (MPI_THREAD_FUNNELED use);
 *   - NCCL:  device buffers (compiled when the CUDA toolkit is found; needs a GPU to run).
 *
 * Every blocking operation has a deadline (tsr_comm_set_timeout_ms; default 30 s): the
 * MPI implementation posts non-blocking operations and polls them, so a peer that died or
 * hangs becomes an error status naming the peer ("recv: rank 3 did not answer within
 * 30000 ms"; collectives, where no single peer is knowable: "allreduce (...) over 4 ranks:
 * no answer from the group within 30000 ms"), never a hang. After such an error the
 * communicator is unusable (later calls return TSR_COMM_ERR) and the buffers of the
 * timed-out operation may still be written by the transport until the process ends; the
 * caller reports and exits non-zero. One exception: a recv whose deadline passed is
 * cancelled, and when the cancel succeeds the communicator stays usable.
 *
 * Threads: MPI is initialized MPI_THREAD_FUNNELED, so every call on MPI communicators must
 * come from the thread that called tsr_comm_mpi_world (others get TSR_COMM_EINVAL).
 *
 * Groups: tsr_comm_split makes sub-communicators (the tp group of a stage, ...).
 * Counters (bytes sent, time in communication) feed the per-rank observability.
 *
 * Ownership: a tsr_comm is created by one of the constructors and released with
 * tsr_comm_free (sub-communicators before their parent). Buffers are the caller's.
 */
#ifndef TSR_COMM_H
#define TSR_COMM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TSR_COMM_OK       0
#define TSR_COMM_ERR      -1 /* generic failure (message in err) */
#define TSR_COMM_ETIMEOUT -2 /* a deadline passed: a peer is dead or stuck */
#define TSR_COMM_EINVAL   -3 /* bad arguments */

#define TSR_COMM_DEFAULT_TIMEOUT_MS 30000

typedef struct tsr_comm tsr_comm;

/* Per-communicator counters since creation. Bytes are this rank's logical payload of the
 * successful calls: allreduce sends and receives n×4 (when size > 1); allgather(v) sends its
 * own part and receives the parts of the other ranks; bcast: the root sends, the others
 * receive; send/recv: the message; barrier and split: none. Time and n_calls count every
 * call that passed the argument checks, failed ones included. */
typedef struct {
    uint64_t n_bytes_sent;
    uint64_t n_bytes_recv;
    uint64_t t_comm_ns; /* wall time inside communication calls */
    uint64_t n_calls;
} tsr_comm_stats;

/* Implementation vtable. Every function returns a TSR_COMM_* status and writes a message
 * into err on failure. Optional members may be NULL (then the generic layer emulates them
 * or reports TSR_COMM_ERR "not supported"): split. */
typedef struct {
    const char *name; /* "local", "mpi", "nccl" */
    /* In-place element-wise sum of n floats over all ranks. */
    int (*allreduce_sum_f32)(tsr_comm *c, float *buf, size_t n, char *err, size_t err_len);
    /* Every rank contributes n_bytes; recv gets size × n_bytes in rank order. */
    int (*allgather)(tsr_comm *c, const void *send, void *recv, size_t n_bytes, char *err,
                     size_t err_len);
    /* Variable-size gather to every rank: counts[r] bytes from rank r, placed at displs[r]. */
    int (*allgatherv)(tsr_comm *c, const void *send, size_t n_bytes, void *recv,
                      const size_t *counts, const size_t *displs, char *err, size_t err_len);
    int (*send)(tsr_comm *c, const void *buf, size_t n_bytes, int peer, int tag, char *err,
                size_t err_len);
    int (*recv)(tsr_comm *c, void *buf, size_t n_bytes, int peer, int tag, char *err,
                size_t err_len);
    int (*bcast)(tsr_comm *c, void *buf, size_t n_bytes, int root, char *err, size_t err_len);
    int (*barrier)(tsr_comm *c, char *err, size_t err_len);
    /* Optional: ranks with the same color form a sub-communicator, ordered by key. */
    int (*split)(tsr_comm *c, int color, int key, tsr_comm **out, char *err, size_t err_len);
    void (*free)(tsr_comm *c);
} tsr_comm_vtable;

struct tsr_comm {
    const tsr_comm_vtable *vt;
    int rank;
    int size;
    int64_t timeout_ms;
    tsr_comm_stats stats;
    void *impl;
};

/* ---- constructors ---- */

/* A one-rank communicator (rank 0 of 1). */
int tsr_comm_local_new(tsr_comm **out, char *err, size_t err_len);

/* True when this process was started by an MPI launcher (mpirun, srun --mpi=pmix):
 * looks at the launcher's environment, without initializing MPI: OMPI_COMM_WORLD_SIZE,
 * PMIX_RANK, PMI_RANK or PMI_SIZE set, or a multi-task Slurm step (SLURM_STEP_ID with
 * SLURM_STEP_NUM_TASKS, else SLURM_NTASKS, > 1; see comm_mpi.c for why). */
bool tsr_comm_mpi_launched(void);
/* Initializes MPI (once per process, MPI_THREAD_FUNNELED, MPI_ERRORS_RETURN) and wraps a
 * duplicate of MPI_COMM_WORLD (each call makes a new one). Returns TSR_COMM_ERR when the
 * build has no MPI. */
int tsr_comm_mpi_world(tsr_comm **out, char *err, size_t err_len);
/* Finalizes MPI if tsr_comm_mpi_world initialized it (call once at exit, after freeing
 * communicators). Requests that timed out get 1 s more to complete; if one is still pending
 * (a dead peer), MPI_Finalize is skipped, since it would wait for that peer forever; exit
 * non-zero then, and the launcher ends the job. */
void tsr_comm_mpi_finalize(void);
/* Ends the whole MPI job from any rank (MPI_Abort) after an unrecoverable error; without
 * MPI running, exits the process with code. Does not return. */
void tsr_comm_mpi_abort(int code);

/* NCCL over a communicator that can bootstrap (broadcast the unique id). device = CUDA
 * device ordinal. Returns TSR_COMM_ERR with a message when the build has no CUDA/NCCL or
 * no GPU is present. */
int tsr_comm_nccl_new(tsr_comm *bootstrap, int device, tsr_comm **out, char *err, size_t err_len);
/* True when the build includes NCCL. */
bool tsr_comm_nccl_available(void);

/* ---- operations (dispatch through the vtable, time and count) ---- */

/* Deadline of every later blocking call on c, in milliseconds; <= 0 means no deadline.
 * Sub-communicators (split, NCCL over a bootstrap) start with their parent's value. */
void tsr_comm_set_timeout_ms(tsr_comm *c, int64_t timeout_ms);
/* Argument rules (violations return TSR_COMM_EINVAL, checked before any communication):
 * non-NULL buffers where the byte count is > 0; peer and root in [0, size); send/recv to
 * oneself is refused (a blocking self-send can only deadlock); tag >= 0 (MPI: <= MPI_TAG_UB;
 * NCCL ignores tags: messages between two ranks are matched in order); allgatherv:
 * counts[rank] == n_bytes; split: color >= 0. Collectives are called by every rank of c with
 * matching sizes, in the same order. MPI limits one call to INT_MAX elements. */
int tsr_comm_allreduce_sum_f32(tsr_comm *c, float *buf, size_t n, char *err, size_t err_len);
int tsr_comm_allgather(tsr_comm *c, const void *send, void *recv, size_t n_bytes, char *err,
                       size_t err_len);
int tsr_comm_allgatherv(tsr_comm *c, const void *send, size_t n_bytes, void *recv,
                        const size_t *counts, const size_t *displs, char *err, size_t err_len);
int tsr_comm_send(tsr_comm *c, const void *buf, size_t n_bytes, int peer, int tag, char *err,
                  size_t err_len);
int tsr_comm_recv(tsr_comm *c, void *buf, size_t n_bytes, int peer, int tag, char *err,
                  size_t err_len);
int tsr_comm_bcast(tsr_comm *c, void *buf, size_t n_bytes, int root, char *err, size_t err_len);
int tsr_comm_barrier(tsr_comm *c, char *err, size_t err_len);
int tsr_comm_split(tsr_comm *c, int color, int key, tsr_comm **out, char *err, size_t err_len);
void tsr_comm_free(tsr_comm *c);

/* Human-readable name of a TSR_COMM_* status ("ok", "timeout", ...). */
const char *tsr_comm_status_name(int status);

/* ---- for implementations (comm.c, comm_mpi.c, comm_nccl.c) ---- */

/* A zeroed tsr_comm with vt, rank, size, impl and the default timeout; NULL when out of
 * memory. Released by tsr_comm_free (which calls vt->free first, then frees the struct). */
tsr_comm *tsr_comm_alloc(const tsr_comm_vtable *vt, int rank, int size, void *impl);
/* Deadline (tsr_now_ns scale, kernels/util.h) of an operation of c that starts now; 0 = none. */
uint64_t tsr_comm_deadline_ns(const tsr_comm *c);
/* Backoff between two polls of an operation that has been waiting waited_ns: spins for the
 * first 20 µs, then yields the CPU, then sleeps up to 200 µs per poll after 2 ms. */
void tsr_comm_poll_pause(uint64_t waited_ns);
/* (Error messages: tsr_set_err, kernels/util.h.) */

#endif
