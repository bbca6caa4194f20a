/*
 * plan.h — the partition planner: how a llama model is cut over tp × pp ranks.
 *
 * A replica is one MPI job of tp × pp ranks: rank r is pipeline stage r / tp and tensor
 * slice r % tp (../../docs/architecture.md). The planner decides, from the model's
 * hyperparameters and tensor types alone (before any weight is read):
 *   - the layer range [layer_begin, layer_end) of each stage, balanced by cost (bytes of
 *     weights read per token, counting the embedding row on the first stage and the
 *     output head on the last), or taken from a user override ("0-7,8-15");
 *   - for each tensor-parallel slice: its query heads, its KV heads (replicated when
 *     tp > n_head_kv, as vLLM does), its share of n_ff and of the vocabulary.
 * Splits of a quantized dimension must fall on block boundaries (32 for Q8_0/Q4_0, 256
 * for K-quants): the planner makes uneven-but-aligned splits where that is possible and
 * refuses the layout with a message saying why and what would work otherwise.
 *
 * Pure computation, no I/O; thread-safe.
 */
#ifndef TSR_PLAN_H
#define TSR_PLAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TSR_PLAN_MAX_RANKS 256

/* What the planner needs to know about the model. */
typedef struct {
    int32_t n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab;
    /* Tensor types (ggml ids) of the per-layer matrices (the largest block size among the
     * layers when they differ) and of the output head and embedding. */
    uint32_t type_attn_q, type_attn_k, type_attn_v, type_attn_output;
    uint32_t type_ffn_gate, type_ffn_up, type_ffn_down;
    uint32_t type_output, type_token_embd;
    uint64_t n_bytes_layer;  /* weight bytes of one layer (mean) */
    uint64_t n_bytes_output; /* output head (token_embd when tied) */
    uint64_t n_bytes_embd_row;
    uint64_t n_bytes_kv_per_token_layer; /* K+V bytes per token per layer (whole model) */
    /* GPU ranks (worker/gpu.c; leave all 0 for CPU ranks, whose plan does not change). With
     * dev_n_batch > 0 a rank's memory is what it allocates on its device: its weights, where
     * stage 0 holds the whole embedding table (dev_n_bytes_embd bytes) rather than one row,
     * and a tied table that is also the whole output head (dev_embd_tied, at tp 1 and pp 1)
     * once; the KV pool in whole 16-position blocks of the cache type's bytes (n_ctx rounded
     * up to a multiple of 16; n_bytes_kv_per_token_layer in that type); and the buffers of
     * tsr_plan_device_buffer_bytes for steps of dev_n_batch tokens. */
    int32_t dev_n_batch;
    int32_t dev_embd_tied;
    uint64_t dev_n_bytes_embd;
} tsr_plan_model;

/* One rank's share. Ranges are half-open [begin, end). */
typedef struct {
    int32_t rank, stage, tp_rank;
    int32_t layer_begin, layer_end;
    int32_t head_begin, head_end;       /* query heads */
    int32_t kv_head_begin, kv_head_end; /* KV heads this rank holds (may repeat across ranks) */
    int32_t ff_begin, ff_end;           /* columns of n_ff */
    int32_t vocab_begin, vocab_end;     /* rows of the output head (last stage only) */
    uint64_t n_bytes_weights;           /* bytes of weights this rank reads */
    uint64_t n_bytes_kv_per_token;      /* KV cache bytes per token of context */
} tsr_plan_rank;

typedef struct {
    int32_t tp, pp;
    int32_t n_ranks;
    tsr_plan_rank ranks[TSR_PLAN_MAX_RANKS];
} tsr_plan;

/* Compute the plan. `layers` is NULL or an override like "0-7,8-15" (pp ranges, in order,
 * covering every layer exactly once). `mem_budget_bytes` is 0 (none) or the per-rank
 * limit on weights + KV for `n_ctx` tokens (+ the device buffers on GPU ranks, see
 * dev_n_batch): the layer split then also respects it, and a layout that cannot fit is
 * refused saying how much it needs and what would fit (more pipeline stages, or on GPU
 * ranks the largest context that fits).
 * Returns 0, or < 0 with a message in err such as
 *   "n_head 8 is not divisible by tp 3; use tp 1, 2, 4 or 8". */
int tsr_plan_make(const tsr_plan_model *m, int32_t tp, int32_t pp, const char *layers,
                  uint64_t mem_budget_bytes, int32_t n_ctx, tsr_plan *out, char *err,
                  size_t err_len);

/* Device buffers of GPU rank r of a tp × pp plan besides weights and KV (0 when
 * m->dev_n_batch is 0), as worker/gpu.c and kernels/cuda allocate them for steps of
 * m->dev_n_batch tokens over a pool of n_ctx positions: the step's activations
 * ([n_batch] × (4 n_embd + max(q_dim, n_embd) + 2 q_dim + 2 kv_dim + 2 n_ff_local +
 * n_vocab_local) floats), the step descriptor and block tables, the matmul scratch
 * (activations quantized to the dot type, the F16 activations and F16 weight tile of the
 * cuBLAS path), the split-attention states, and the logits buffers: the leader (rank 0)
 * receives [n_batch][n_vocab] floats from the last stage when pp > 1, and tp rank 0 of the
 * last stage gathers the tp slices into [n_batch][n_vocab] when tp > 1 (both counted
 * whether or not the data plane is device-direct). */
uint64_t tsr_plan_device_buffer_bytes(const tsr_plan_model *m, int32_t tp, int32_t pp,
                                      const tsr_plan_rank *r, int32_t n_ctx);

/* Human-readable table of the plan (one line per rank) into buf; returns bytes written
 * (snprintf semantics). */
int tsr_plan_format(const tsr_plan *p, const tsr_plan_model *m, char *buf, size_t cap);

#endif
