/*
 * replica.h — one copy of the model spread over tp × pp ranks of one MPI job (or one
 * plain process), driven step by step by its leader (rank 0).
 *
 * Rank r is pipeline stage r / tp and tensor slice r % tp. Every rank opens the GGUF,
 * plans the same partition (shard/plan.h) and loads only its tiles. A step:
 *   1. the leader broadcasts the step descriptor (tokens, positions, sequences, block
 *      tables, which tokens want logits) to all ranks;
 *   2. stage 0 embeds; each stage runs its layers (tensor-parallel ranks meet in two
 *      all-reduces per layer) and sends its hidden states to the same tp slice of the next
 *      stage, point to point;
 *   3. the last stage's tp ranks gather their vocabulary slices of the logits, and its tp
 *      rank 0 sends the full logits to the leader, which samples.
 * Followers (ranks != 0) sit in tsr_replica_follow until the leader shuts the replica
 * down. Every wait has the communicator's deadline; a dead rank ends the MPI job (mpirun
 * names it) and a stuck one becomes an error naming the operation.
 *
 * Without an MPI launcher and with tp = pp = 1 the replica is a plain process using the
 * in-process communicator.
 */
#ifndef TSR_REPLICA_H
#define TSR_REPLICA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "shard/gguf.h"
#include "shard/plan.h"
#include "shard/vocab.h"
#include "worker/comm.h"
#include "worker/model.h"

#define TSR_REPLICA_KV_ONE_CONTEXT (-1)

typedef struct {
    int32_t tp, pp;      /* >= 1; tp × pp must equal the MPI job's size */
    const char *layers;  /* NULL or a per-stage override "0-7,8-15" */
    uint64_t mem_budget; /* bytes per rank for weights + KV, 0 = unlimited */
    int n_threads;       /* compute threads per rank */
    int32_t n_ctx;       /* single-sequence context (0: model default) */
    int32_t n_batch;     /* max tokens per step (0: 128) */
    int64_t timeout_ms;  /* deadline of every communication wait (0: 30000) */
    const char *device;  /* "cpu", "cuda", or NULL / "auto": cuda when every rank sees a GPU
                            (worker/gpu.h); each rank takes GPU local-rank % count */
    uint64_t gpu_memory; /* device bytes per rank (weights + KV + buffers; 0: what is free);
                            on GPU ranks it is also the planner's budget when mem_budget is 0 */
    const char *kv_type; /* KV cache type "f32", "f16", "q8_0" (kernels/kvcache.h), or NULL:
                            TSR_KV_DEFAULT on the CPU, f32 on CUDA (whose device pool is
                            float32; another type with cuda is refused) */
    bool no_repack;      /* keep the weights in the file's layout (kernels/repack.h; CPU ranks
                            also skip repacking when tsr_model_repack_default() is false;
                            GPU ranks never repack) */
    int32_t n_kv_blocks; /* TSR_REPLICA_KV_ONE_CONTEXT: a paged pool holding one full
                            context (n_ctx, after its default is applied);
                            > 0: a paged KV pool of this many blocks for many
                            sequences (serving, tsr_replica_step); 0: one sequence of
                            n_ctx tokens (tsr_replica_forward) */
} tsr_replica_params;

/* Per-rank figures for observability (gathered on the leader by tsr_replica_stats). */
typedef struct {
    int32_t rank, stage, tp_rank;
    uint64_t t_compute_ns; /* forward-pass time minus communication */
    uint64_t t_comm_ns;    /* all-reduces, pipeline send/recv, logits gather */
    uint64_t n_bytes_sent;
    uint64_t n_steps;
    uint64_t n_tokens;         /* tokens processed (all steps) */
    uint64_t n_bytes_loaded;   /* bytes of the model file this rank read */
    uint64_t n_bytes_repacked; /* anonymous memory of its repacked weights (0: none) */
    uint64_t t_repack_ns;      /* load time spent repacking */
    int32_t n_q80_lanes;       /* Q8_0 matrices in the lanes order (kernels/q80_lanes.h) */
    int32_t n_q40_lanes;       /* Q4_0 matrices in the lanes layout (kernels/q40_lanes.h) */
    int32_t n_q4k_lanes;       /* Q4_K matrices in the lanes layout (kernels/q4k_lanes.h) */
    int32_t n_q6k_lanes;       /* Q6_K matrices in the lanes layout (kernels/q6k_lanes.h) */
    int32_t n_q50_lanes;       /* Q5_0 matrices in the lanes layout (kernels/q50_lanes.h) */
    int32_t n_q41_lanes;       /* Q4_1 matrices in the AVX2 layout (kernels/q41_avx2.h) */
    int32_t n_q80g_lanes;      /* Q8_0 matrices in the lanes layout, ggml's order (q80_lanes.h) */
    /* GPU ranks (0 on CPU ranks): device bytes in use (weights, KV pool, step buffers, the
     * logits buffers and scratch grown so far), and the planner's figure for this rank
     * (weights + KV + tsr_plan_device_buffer_bytes), which --gpu-memory was checked against */
    uint64_t n_bytes_device;
    uint64_t n_bytes_device_planned;
} tsr_rank_stats;

typedef struct tsr_replica tsr_replica;

/* The planner's view of a model file (hyperparameters, tensor types, bytes). */
int tsr_replica_plan_model(const tsr_gguf *g, tsr_plan_model *pm, char *err, size_t err_len);
/* The same with the KV cache bytes of kv_type (tsr_replica_plan_model: float32). */
int tsr_replica_plan_model_kv(const tsr_gguf *g, tsr_kv_type kv_type, tsr_plan_model *pm, char *err,
                              size_t err_len);

/* Every rank calls this. Returns 0, or < 0 with err: launcher/layout mismatch ("the MPI
 * job has 3 ranks but --tp 2 --pp 2 needs 4"), impossible layouts (the planner's message),
 * unreadable model. The error is produced on every rank, so all of them exit. */
int tsr_replica_open(const char *model_path, const tsr_replica_params *p, tsr_replica **out,
                     char *err, size_t err_len);
void tsr_replica_close(tsr_replica *r);

bool tsr_replica_is_leader(const tsr_replica *r);
int tsr_replica_rank(const tsr_replica *r);
int tsr_replica_size(const tsr_replica *r);
const tsr_vocab *tsr_replica_vocab(const tsr_replica *r);
const tsr_gguf *tsr_replica_gguf(const tsr_replica *r);
const tsr_hparams *tsr_replica_hparams(const tsr_replica *r);
const tsr_plan *tsr_replica_plan(const tsr_replica *r);
int32_t tsr_replica_n_ctx(const tsr_replica *r);
/* The KV cache type p asks for, for sizing a pool before the replica is open: p->kv_type, or
 * the default (f32 when p->device is "cuda"; an unknown name gives the default too, which
 * tsr_replica_open then refuses). */
tsr_kv_type tsr_replica_params_kv_type(const tsr_replica_params *p);
/* The KV cache type this rank stores (p.kv_type resolved). */
tsr_kv_type tsr_replica_kv_type(const tsr_replica *r);

/* The order classes of tsr_replica_forward, as tsr_ctx_set_prompt_len (0, the default: every
 * token in the GEMV order). */
void tsr_replica_set_prompt_len(tsr_replica *r, int32_t n_prompt);
/* Whether a token's order class changes its results on this model (it has Q4_K weights,
 * kernels/q4k_gemm.h; Q4_0 has one order for every token, kernels/q40_gemm.h): the prefix
 * cache must then not hand blocks computed in one class to tokens of another. */
bool tsr_replica_order_sensitive(const tsr_replica *r);

/* Leader only: one step of the single sequence (as tsr_forward): n tokens at positions
 * pos0.., logits of the last token (full vocabulary) in *logits, valid until the next
 * call. */
int tsr_replica_forward(tsr_replica *r, const int32_t *tokens, int32_t n, int32_t pos0,
                        const float **logits, char *err, size_t err_len);

/* Leader only: one step of a batch over many sequences (paged replicas; the batch's block
 * tables index the KV pool that every rank holds for its layers and heads). *logits gets
 * [n_want][n_vocab] rows for the tokens marked want_logits, in batch order, valid until the
 * next call. b->n_tokens <= the replica's n_batch. */
int tsr_replica_step(tsr_replica *r, const tsr_batch *b, const float **logits, char *err,
                     size_t err_len);

/* Leader only, between steps: copy KV blocks src[i] -> dst[i] of the paged pool on every
 * rank (tsr_ctx_kv_copy: each its layers and heads), for the prefix cache's copy-on-write
 * (coordinator/kvblocks.h). Returns 0 or < 0 with err (bad ids, communication). */
int tsr_replica_kv_copy(tsr_replica *r, const int32_t *src, const int32_t *dst, int32_t n,
                        char *err, size_t err_len);

/* Leader only: a no-op step that keeps idle followers within their wait deadline. */
int tsr_replica_heartbeat(tsr_replica *r, char *err, size_t err_len);

/* CUDA device of this rank, -1 when it computes on the CPU. */
int32_t tsr_replica_device(const tsr_replica *r);
/* How this rank's data plane moves activations and logits: "host" (CPU ranks), "device"
 * (one GPU rank), "host round trip (mpi)" (GPU ranks, TSR_NO_NCCL=1 or no NCCL),
 * "device-direct (nccl)", or, in the host simulator, "device-direct (simulated: mpi carries
 * device buffers)". */
const char *tsr_replica_transport(const tsr_replica *r);

int32_t tsr_replica_n_batch(const tsr_replica *r);
int32_t tsr_replica_n_kv_blocks(const tsr_replica *r);

/* Followers: serve steps until the leader's shutdown. 0 on a clean shutdown. */
int tsr_replica_follow(tsr_replica *r, char *err, size_t err_len);

/* Leader: tell followers to leave tsr_replica_follow (call once, before close). */
int tsr_replica_shutdown(tsr_replica *r, char *err, size_t err_len);

/* Leader only, between steps: collect every rank's stats while followers are in
 * tsr_replica_follow (they answer the request themselves). out: size() entries. */
int tsr_replica_poll_stats(tsr_replica *r, tsr_rank_stats *out, char *err, size_t err_len);

/* Collective: every rank calls it; the leader receives size() entries in `out` (rank
 * order), others may pass NULL. */
int tsr_replica_stats(tsr_replica *r, tsr_rank_stats *out, char *err, size_t err_len);

#endif
