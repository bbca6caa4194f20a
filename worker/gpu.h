/*
 * gpu.h — a rank's part of the model on a CUDA device, and its forward pass there.
 *
 * Why: the worker's model (worker/model.h) decides what a rank holds (its layers, heads,
 * feed-forward and vocabulary slices); this module copies exactly those tiles to the GPU
 * once (a rank uploads only its own tiles: tsr_model already holds nothing else) and runs
 * the same forward pass as tsr_forward_batch with the kernels of kernels/cuda/. The KV pool
 * lives in device memory with the CPU's paged layout (blocks of TSR_KV_BLOCK_SIZE positions,
 * the batch's block tables). The engine, sampling and speculation stay on the host: a step
 * takes the batch descriptor from the host and returns logits (and the hidden states the
 * pipeline sends) to the host.
 *
 * The forward pass plugs into worker/model.c through the backend seam (tsr_backend in
 * model.h): tsr_gpu_backend() is that vtable, and tsr_gpu_attach() puts a device context
 * under a tsr_ctx, after which tsr_forward_batch / tsr_forward run on the GPU.
 *
 * Tensor parallelism: a tp communicator whose implementation is "nccl" is used on device
 * buffers directly; any other (MPI, local) gets the partial sums through host memory.
 *
 * Without the CUDA backend in the build (TESSERA_CUDA=OFF, sanitizer tree) every
 * constructor returns -1 with "built without CUDA", and tsr_gpu_device_count returns 0.
 *
 * Ownership: a tsr_gpu_model borrows its tsr_model (which must outlive it) and owns the
 * device (tsr_cuda_dev) it opened; a tsr_gpu_ctx borrows its tsr_gpu_model.
 */
#ifndef TSR_GPU_H
#define TSR_GPU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/comm.h"
#include "worker/model.h"

typedef struct tsr_gpu_model tsr_gpu_model;
typedef struct tsr_gpu_ctx tsr_gpu_ctx;

/* True when the CUDA backend is compiled in. */
bool tsr_gpu_built(void);

/* Visible CUDA devices (0 without a driver, a GPU, or the backend; `why` says which). */
int32_t tsr_gpu_device_count(char *why, size_t why_len);

/* Device this process should use: the launcher's local rank modulo the device count (-1
 * when there is none). */
int32_t tsr_gpu_pick_device(char *why, size_t why_len);

/* Bytes of device memory the model m and a KV pool of n_kv_blocks for n_batch tokens need
 * on its rank (weights + KV + activations + scratch), for the planner and --gpu-memory. */
uint64_t tsr_gpu_bytes_needed(const tsr_model *m, int32_t n_kv_blocks, int32_t n_batch);

/* Open CUDA device `device` with a memory cap of n_bytes_cap (0: the device's free memory
 * less a reserve) and upload m's tensors. Errors name the CUDA call and the device, or,
 * for the cap, what would fit. */
int tsr_gpu_model_upload(const tsr_model *m, int32_t device, uint64_t n_bytes_cap,
                         tsr_gpu_model **out, char *err, size_t err_len);
void tsr_gpu_model_free(tsr_gpu_model *gm);
uint64_t tsr_gpu_model_bytes(const tsr_gpu_model *gm); /* device bytes in use */
int32_t tsr_gpu_model_device(const tsr_gpu_model *gm);

/* A device KV pool of n_kv_blocks blocks, K and V stored as kv_type (ggml type ids: 0 F32,
 * 1 F16 with the CPU f16 path's roundings, 8 Q8_0 with the CPU q8_0 path's, both in
 * kernels/cuda/numerics.h; Q8_0 needs a head size that is a multiple of 32, others are
 * refused with what to use), and buffers for batches of n_batch tokens. */
int tsr_gpu_ctx_new(tsr_gpu_model *gm, int32_t n_kv_blocks, int32_t n_batch, uint32_t kv_type,
                    tsr_gpu_ctx **out, char *err, size_t err_len);
void tsr_gpu_ctx_free(tsr_gpu_ctx *gc);
void tsr_gpu_ctx_set_tp_comm(tsr_gpu_ctx *gc, tsr_comm *tp);

/* One batch through this rank's part of the model, with tsr_forward_batch's contract
 * (hidden and logits are host buffers; the batch was validated by the caller). */
int tsr_gpu_forward_batch(tsr_gpu_ctx *gc, const tsr_batch *b, float *hidden, float *logits,
                          char *err, size_t err_len);

/* ---- device-direct transport between GPU ranks (NCCL; no host round trip) ----
 * After tsr_gpu_ctx_set_pipe the context's forward pass
 *   - receives its input hidden states [n][n_embd] from prev_peer over pipe (prev_peer >= 0)
 *     into device memory instead of uploading `hidden`, and sends its output [n][n_embd] to
 *     next_peer (>= 0) from device memory instead of downloading it (hidden is then neither
 *     read nor written);
 *   - keeps the logits rows on the device, appended in batch order from the last
 *     tsr_gpu_ctx_step_begin (the `logits` argument is ignored): tsr_gpu_ctx_logits_out
 *     moves them on;
 *   - sums the tp group's partials on device buffers through its tp communicator.
 * The communicators must carry device buffers: NCCL ones, or, in the host simulator
 * (tsr_gpu_host_addressable), any. pipe (borrowed; NULL for one stage) spans the replica;
 * peers are its ranks; tag names the hidden-state messages (NCCL ignores tags). */
bool tsr_gpu_host_addressable(void);
void tsr_gpu_ctx_set_pipe(tsr_gpu_ctx *gc, tsr_comm *pipe, int prev_peer, int next_peer, int tag);
/* A step starts: its logits rows start at row 0 again. */
void tsr_gpu_ctx_step_begin(tsr_gpu_ctx *gc);
/* Last stage, after the step's forward passes: the step's n_want logits rows to the leader.
 * tp (device-direct, or NULL for tp 1): tp rank k holds vocabulary [vocab_begin[k],
 * + vocab_n[k]); ranks k > 0 send their [n_want][vocab_n[k]] slices to tp rank 0, which
 * interleaves them into [n_want][n_vocab] rows on its device, then downloads them into
 * host_out (non-NULL: it is the leader) or sends them to leader_peer over pipe. */
int tsr_gpu_ctx_logits_out(tsr_gpu_ctx *gc, tsr_comm *tp, const int32_t *vocab_begin,
                           const int32_t *vocab_n, int32_t n_want, int tag, float *host_out,
                           int leader_peer, char *err, size_t err_len);
/* The leader, not on the last stage: [n_want][n_vocab] logits from peer over pipe into
 * device memory, then downloaded into host_out. */
int tsr_gpu_ctx_logits_in(tsr_gpu_ctx *gc, int peer, int tag, int32_t n_want, float *host_out,
                          char *err, size_t err_len);
/* The device context attached to c (tsr_gpu_attach), or NULL when c computes elsewhere. */
tsr_gpu_ctx *tsr_gpu_ctx_of(tsr_ctx *c);
/* Device bytes in use on gc's device (its model's weights, the KV pool, the step buffers and
 * scratch grown so far: what --gpu-memory caps; 0 without the backend). */
uint64_t tsr_gpu_ctx_device_bytes(const tsr_gpu_ctx *gc);

/* The backend seam's vtable for a tsr_gpu_ctx (model.h tsr_backend). */
const tsr_backend *tsr_gpu_backend(void);

/* Upload m to `device`, make a device context matching c (same KV blocks and batch) and
 * attach it to c (which then owns it: tsr_ctx_free frees it). */
int tsr_gpu_attach(tsr_ctx *c, const tsr_model *m, int32_t device, uint64_t n_bytes_cap, char *err,
                   size_t err_len);

#endif
