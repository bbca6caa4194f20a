/*
 * cuda_backend.h — the CUDA compute backend: device selection and memory, and the
 * operations of a forward pass on device buffers (plain C API, prefix tsr_cuda_).
 *
 * Why: the worker's forward pass (worker/model.c) runs the same sequence of operations on
 * either backend; this header is what the CUDA side offers. Every per-element and
 * per-block computation lives in kernels/cuda/numerics.h (checked on the host against the
 * CPU kernels); kernels.cu wraps it in launches, backend.cu manages devices, memory and
 * cuBLAS.
 *
 * Errors: every function that acts returns 0 or a negative TSR_CUDA_E* status and writes
 * err: the failing CUDA/cuBLAS call, its error name and message, and the device ordinal
 * ("cudaMalloc(&p, 268435456) failed on CUDA device 1: cudaErrorMemoryAllocation (out of
 * memory)"). Nothing here aborts or exits. Launch functions return after queueing on the
 * device's stream (asynchronous); errors of a running kernel surface at the next
 * tsr_cuda_sync or download of that device, with the same wording.
 *
 * Memory: tsr_cuda_alloc counts bytes against the cap given to tsr_cuda_open (--gpu-memory)
 * and refuses an allocation that would pass it, naming both figures. All pointers passed to
 * the operations are device pointers of that device unless a name says _host.
 *
 * Threads: one tsr_cuda_dev is used by one thread at a time.
 * Shapes follow ggml as in kernels/ops.h: a weight is n_out rows of n_in elements;
 * activations are row-major [n_tokens][width], float32.
 */
#ifndef TSR_CUDA_BACKEND_H
#define TSR_CUDA_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TSR_CUDA_OK     0
#define TSR_CUDA_ERR    -1 /* a CUDA / cuBLAS call failed (named in err) */
#define TSR_CUDA_ENODEV -2 /* no usable device (no driver, no GPU, bad ordinal) */
#define TSR_CUDA_ENOMEM -3 /* the --gpu-memory cap or the device is full */
#define TSR_CUDA_EINVAL -4 /* bad arguments (unsupported type, shapes) */

/* Head dimensions up to this run in the attention kernel. */
#define TSR_CUDA_MAX_HEAD_DIM 512
/* Positions per KV block (must equal TSR_KV_BLOCK_SIZE of worker/model.h). */
#define TSR_CUDA_KV_BLOCK 16
/* Batches of at least this many tokens run quantized weights through cuBLAS (weights
 * dequantized to F16 tiles); smaller ones read the blocks in place (one warp per row). The
 * environment variable TSR_CUDA_GEMM_MIN_TOKENS overrides it (benchmarks, checks). */
#define TSR_CUDA_GEMM_MIN_TOKENS 8

typedef struct tsr_cuda_dev tsr_cuda_dev;

typedef struct {
    int32_t ordinal;
    char name[256];
    int32_t cc_major, cc_minor;
    uint64_t n_bytes_total;
    uint64_t n_bytes_free;
    double mem_bw_gbps; /* theoretical peak: 2 * memory clock * bus width (0 if unknown) */
} tsr_cuda_device_info;

/* True when the build contains the CUDA backend (CMake TESSERA_CUDA found nvcc). */
bool tsr_cuda_built(void);

/* Number of visible CUDA devices. No driver or no GPU is not an error: *n = 0 and
 * `why` (if not NULL) says why (e.g. "cudaGetDeviceCount: cudaErrorInsufficientDriver (CUDA
 * driver version is insufficient for CUDA runtime version)"). */
int32_t tsr_cuda_device_count(char *why, size_t why_len);

/* The device a rank should use: OMPI_COMM_WORLD_LOCAL_RANK (else SLURM_LOCALID, else
 * MPI_LOCALRANKID, else 0) modulo n_devices; -1 when n_devices < 1. */
int32_t tsr_cuda_pick_device(int32_t n_devices);

int tsr_cuda_device_info_get(int32_t ordinal, tsr_cuda_device_info *out, char *err, size_t err_len);

/* Open device `ordinal`: a stream, a cuBLAS handle, scratch. n_bytes_cap bounds what
 * tsr_cuda_alloc hands out (0: the device's free memory at open, less 512 MiB for the
 * CUDA context, cuBLAS workspace and NCCL buffers). */
int tsr_cuda_open(int32_t ordinal, uint64_t n_bytes_cap, tsr_cuda_dev **out, char *err,
                  size_t err_len);
void tsr_cuda_close(tsr_cuda_dev *d);
int32_t tsr_cuda_ordinal(const tsr_cuda_dev *d);
uint64_t tsr_cuda_n_bytes_used(const tsr_cuda_dev *d);
uint64_t tsr_cuda_n_bytes_cap(const tsr_cuda_dev *d);
/* Make d the calling thread's current CUDA device (the current device is per thread: call
 * it first in any thread that did not open d, e.g. the engine's step thread). */
int tsr_cuda_activate(tsr_cuda_dev *d, char *err, size_t err_len);
/* The device's stream (a cudaStream_t) for callers that enqueue their own work (NCCL). */
void *tsr_cuda_stream(tsr_cuda_dev *d);

/* Device memory, counted against the cap. what names the buffer in errors. */
int tsr_cuda_alloc(tsr_cuda_dev *d, size_t n_bytes, const char *what, void **out, char *err,
                   size_t err_len);
void tsr_cuda_free(tsr_cuda_dev *d, void *p, size_t n_bytes);
/* Copies on the device's stream; upload/download wait for completion (download returns
 * the errors of earlier kernels too). */
int tsr_cuda_upload(tsr_cuda_dev *d, void *dst, const void *src_host, size_t n_bytes, char *err,
                    size_t err_len);
int tsr_cuda_download(tsr_cuda_dev *d, void *dst_host, const void *src, size_t n_bytes, char *err,
                      size_t err_len);
int tsr_cuda_copy(tsr_cuda_dev *d, void *dst, const void *src, size_t n_bytes, char *err,
                  size_t err_len);
int tsr_cuda_sync(tsr_cuda_dev *d, char *err, size_t err_len);
/* rows copies of width_bytes from src (row pitch src_pitch bytes) to dst (pitch dst_pitch),
 * device to device, on the stream (cudaMemcpy2DAsync; interleaves gathered logits slices). */
int tsr_cuda_copy_2d(tsr_cuda_dev *d, void *dst, size_t dst_pitch, const void *src,
                     size_t src_pitch, size_t width_bytes, size_t rows, char *err, size_t err_len);

/* True only in the host simulator (kernels/cuda/hostsim.c): there "device memory" is host
 * memory, so an MPI communicator can carry device buffers and stands in for NCCL in the
 * tests of the device-direct transport (worker/gpu.h tsr_gpu_ctx_set_pipe). False in the
 * real backend. */
bool tsr_cuda_host_addressable(void);

/* A weight in device memory: n_out rows of n_in elements of `type` (ggml id). */
typedef struct {
    uint32_t type;
    int64_t n_in, n_out;
    size_t row_bytes;
    const void *data;
} tsr_cuda_weight;

/* True for the types the kernels run (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K,
 * Q3_K, Q4_K, Q5_K, Q6_K). */
bool tsr_cuda_type_supported(uint32_t type);

/* y[t][r] = W[r] . x[t] for t < n_tok (y row stride W.n_out). Below
 * TSR_CUDA_GEMM_MIN_TOKENS: activations quantized to the dot type (numerics.h) and one warp
 * per weight row; from there on: cuBLAS (F32: SGEMM; others: F16 tiles, F32 accumulate). */
int tsr_cuda_matmul(tsr_cuda_dev *d, const tsr_cuda_weight *w, const float *x, int32_t n_tok,
                    float *y, char *err, size_t err_len);

/* x[t] = row tokens[t] of emb, dequantized (tokens: device int32[n_tok]). */
int tsr_cuda_embed(tsr_cuda_dev *d, const tsr_cuda_weight *emb, const int32_t *tokens,
                   int32_t n_tok, float *x, char *err, size_t err_len);

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w for n_rows rows of n (in place allowed; per
 * head norms: n = head_dim, n_rows = tokens * heads). */
int tsr_cuda_rmsnorm(tsr_cuda_dev *d, float *out, const float *x, const float *w, int32_t n_rows,
                     int32_t n, float eps, char *err, size_t err_len);

/* RoPE in place on x [n_tok][n_head][head_dim] (pos: device int32[n_tok]; freq_factors:
 * device float[n_rot/2] or NULL). mode: 0 NORM, 2 NEOX. ext_factor/attn_factor/corr_dims:
 * YaRN (0, 1, {0,0} for none). ggml_theta: see numerics.h. */
typedef struct {
    int32_t mode, n_rot;
    float freq_base, freq_scale, ext_factor, attn_factor, corr_dims[2];
    int32_t ggml_theta; /* angles as ggml's running product (numerics.h tsr_cuda_rope_cs) */
} tsr_cuda_rope_cfg;
int tsr_cuda_rope(tsr_cuda_dev *d, float *x, const int32_t *pos, int32_t n_tok, int32_t n_head,
                  int32_t head_dim, const tsr_cuda_rope_cfg *cfg, const float *freq_factors,
                  char *err, size_t err_len);

/* gate[i] = act(gate[i]) * up[i]; act: 0 SiLU (SwiGLU), 1 tanh GELU (GeGLU). */
#define TSR_CUDA_GLU_SWIGLU 0
#define TSR_CUDA_GLU_GEGLU  1
int tsr_cuda_glu(tsr_cuda_dev *d, int kind, float *gate, const float *up, int64_t n, char *err,
                 size_t err_len);

/* x[i] += y[i] (residual); x[t][i] += b[i] for n_rows rows of n (bias, b = NULL skips);
 * x[i] *= s. */
int tsr_cuda_add(tsr_cuda_dev *d, float *x, const float *y, int64_t n, char *err, size_t err_len);
int tsr_cuda_add_rows(tsr_cuda_dev *d, float *x, const float *b, int32_t n_rows, int32_t n,
                      char *err, size_t err_len);
int tsr_cuda_scale(tsr_cuda_dev *d, float *x, float s, int64_t n, char *err, size_t err_len);

/* x[i] = cap * tanh(x[i] / cap) (final logit soft-capping, gemma). */
int tsr_cuda_softcap(tsr_cuda_dev *d, float *x, float cap, int64_t n, char *err, size_t err_len);

/* In-place softmax of n_rows rows of n (max, then exp and sum in a block reduction). */
int tsr_cuda_softmax(tsr_cuda_dev *d, float *x, int32_t n_rows, int32_t n, char *err,
                     size_t err_len);

/* Paged attention (decode and prefill chunks, flash-attention style: online softmax over
 * the 16-position KV blocks). The caches of one layer are [n_rows] rows of kv_dim values of
 * kv_type (TSR_CUDA_KV_F32, _F16 or _Q8_0 of numerics.h: tsr_cuda_kv_row_bytes each; fp16
 * runs the CPU f16 path's roundings in two passes, Q8_0 the CPU q8_0 path's operations in
 * its scalar order in three passes; neither is split); the KV
 * of position p of sequence s is row tables[s * max_blocks + p / 16] * 16 + p % 16.
 * Token t (sequence seq[t], position pos[t]) attends to positions max(0, pos - window + 1)
 * .. pos (window 0: all). When few (token, head) pairs meet many chunks (decode of long
 * contexts), the chunks are split over several thread blocks and merged (numerics.h). q:
 * [n_tok][n_head_local][head_dim]; out likewise. Local query head h uses local KV head (head_begin
 * + h) / group - kv_head_begin. */
typedef struct {
    const float *q;
    const void *k_cache, *v_cache; /* rows of kv_type */
    uint32_t kv_type;              /* 0 F32, 1 F16, 8 Q8_0 (ggml type ids) */
    float *out;
    const int32_t *pos, *seq; /* device [n_tok] */
    const int32_t *tables;    /* device [n_seqs][max_blocks] */
    int32_t max_blocks;
    int32_t max_chunks; /* the most 16-position chunks any token visits (sets the splits) */
    int32_t n_tok, n_head_local, head_dim, kv_dim;
    int32_t head_begin, group, kv_head_begin;
    int32_t window;
    float scale; /* usually 1/sqrt(head_dim) */
} tsr_cuda_attn_args;
int tsr_cuda_attention(tsr_cuda_dev *d, const tsr_cuda_attn_args *a, char *err, size_t err_len);

/* Store k, v [n_tok][kv_dim] into the caches (rows of kv_type: F32 copies, F16 rounds
 * to nearest even, Q8_0 quantizes each 32 values as the CPU's tsr_kv_store) at rows[t]
 * (device int32[n_tok]). */
int tsr_cuda_kv_store(tsr_cuda_dev *d, void *k_cache, void *v_cache, const float *k, const float *v,
                      const int32_t *rows, int32_t n_tok, int32_t kv_dim, uint32_t kv_type,
                      char *err, size_t err_len);

/* dst[i] = src[idx[i]] rows of n floats for i < n_rows (gathers the rows that want logits). */
int tsr_cuda_gather_rows(tsr_cuda_dev *d, float *dst, const float *src, const int32_t *idx,
                         int32_t n_rows, int32_t n, char *err, size_t err_len);

#ifdef __cplusplus
}
#endif

#endif /* TSR_CUDA_BACKEND_H */
