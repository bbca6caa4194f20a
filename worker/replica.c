/*
 * replica.c — see replica.h. The leader drives; followers mirror each step.
 *
 * Step descriptor wire format (int32 little-endian, broadcast from rank 0 over the whole
 * replica): header {op, n_tokens, n_seqs, n_table_entries, n_want}, then tokens[n_tokens],
 * pos[n_tokens], seq[n_tokens], want[n_tokens], n_blocks[n_seqs], tables (concatenated).
 * A KV block copy (copy-on-write): header {op, n_pairs, 0, 0, 0}, then src[n], dst[n].
 */
#include "worker/replica.h"
#include "kernels/util.h"

#include "kernels/quant.h"
#include "worker/gpu.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { OP_STEP = 1, OP_SHUTDOWN = 2, OP_NOOP = 3, OP_STATS = 4, OP_KV_COPY = 5 };
enum { TAG_HIDDEN = 11, TAG_LOGITS = 12 };
#define HDR_INTS 5

struct tsr_replica {
    tsr_comm *world;
    tsr_comm *tp_comm;   /* ranks of this stage */
    tsr_comm *tp_nccl;   /* the same ranks over NCCL (GPU ranks with NCCL), or NULL */
    tsr_comm *pipe_nccl; /* every rank over NCCL: stage hand-offs, logits to the leader (pp > 1) */
    int32_t gpu;         /* CUDA device of this rank, -1: CPU backend */
    /* Device-direct transport (GPU ranks over NCCL; in the host simulator over MPI): hidden
     * states and logits move between device buffers (worker/gpu.h tsr_gpu_ctx_set_pipe). */
    bool direct;
    tsr_comm *tp_direct;            /* the tp group that carries device buffers (tp > 1), or NULL */
    int32_t *vocab_begin, *vocab_n; /* [tp] the last stage's vocabulary slices */
    bool mpi;
    int rank, size, stage, tp_rank;
    tsr_replica_params p;
    tsr_kv_type kv_type; /* resolved from p.kv_type and the backend */
    tsr_plan plan;
    tsr_gguf *g;
    tsr_vocab *vocab;
    tsr_model *m;
    tsr_ctx *ctx;
    int32_t *wire; /* descriptor buffer */
    size_t wire_cap;
    float *logits_slice;  /* [n_batch][vocab slice] */
    float *logits_gather; /* [n_batch * n_vocab] gathered in rank-block order */
    float *logits;        /* [n_batch][n_vocab] */
    size_t *counts, *displs;
    const int32_t **tables; /* [tables_cap] per-sequence block tables of a step */
    int32_t tables_cap;
    uint8_t *want;      /* [n_batch] */
    uint8_t *order;     /* [n_batch] order classes of a step (bit 1 of the wire's want) */
    int32_t prompt_len; /* tsr_replica_forward's order classes (tsr_replica_set_prompt_len) */
    int32_t n_ctx;      /* max positions of one sequence */
    tsr_rank_stats st;
};

bool tsr_replica_is_leader(const tsr_replica *r)
{
    return r->rank == 0;
}
int tsr_replica_rank(const tsr_replica *r)
{
    return r->rank;
}
int tsr_replica_size(const tsr_replica *r)
{
    return r->size;
}
const tsr_vocab *tsr_replica_vocab(const tsr_replica *r)
{
    return r->vocab;
}
const tsr_gguf *tsr_replica_gguf(const tsr_replica *r)
{
    return r->g;
}
const tsr_hparams *tsr_replica_hparams(const tsr_replica *r)
{
    return &r->m->hp;
}
const tsr_plan *tsr_replica_plan(const tsr_replica *r)
{
    return &r->plan;
}
tsr_kv_type tsr_replica_kv_type(const tsr_replica *r)
{
    return r->kv_type;
}

void tsr_replica_set_prompt_len(tsr_replica *r, int32_t n_prompt)
{
    r->prompt_len = n_prompt;
}
bool tsr_replica_order_sensitive(const tsr_replica *r)
{
    /* Q4_K is the type whose dots have two orders (kernels/q4k_gemm.h; Q4_0 has one,
     * kernels/q40_gemm.h); the leader may hold only part of the model, so ask the file */
    for (int64_t i = 0; i < tsr_gguf_n_tensors(r->g); i++) {
        const uint32_t type = tsr_gguf_tensor_at(r->g, i)->type;
        if (type == TSR_TYPE_Q4_K) return true;
    }
    return false;
}
int32_t tsr_replica_n_ctx(const tsr_replica *r)
{
    return r->n_ctx;
}
int32_t tsr_replica_n_batch(const tsr_replica *r)
{
    return tsr_ctx_n_batch(r->ctx);
}
int32_t tsr_replica_n_kv_blocks(const tsr_replica *r)
{
    return tsr_ctx_n_kv_blocks(r->ctx);
}

/* The planner's view of a model file. */
static int plan_model_from(const tsr_gguf *g, const tsr_hparams *hp, tsr_kv_type kv_type,
                           tsr_plan_model *pm, char *err, size_t err_len)
{
    memset(pm, 0, sizeof *pm);
    pm->n_layer = hp->n_layer;
    pm->n_embd = hp->n_embd;
    pm->n_head = hp->n_head;
    pm->n_head_kv = hp->n_head_kv;
    pm->head_dim = hp->head_dim;
    pm->n_ff = hp->n_ff;
    pm->n_vocab = hp->n_vocab;
    static const char *names[7] = {"attn_q",   "attn_k", "attn_v",  "attn_output",
                                   "ffn_gate", "ffn_up", "ffn_down"};
    uint32_t *types[7] = {&pm->type_attn_q,      &pm->type_attn_k,   &pm->type_attn_v,
                          &pm->type_attn_output, &pm->type_ffn_gate, &pm->type_ffn_up,
                          &pm->type_ffn_down};
    uint64_t layer_bytes = 0;
    char name[128];
    for (int32_t l = 0; l < hp->n_layer; l++) {
        for (int k = 0; k < 7; k++) {
            snprintf(name, sizeof name, "blk.%d.%s.weight", l, names[k]);
            const tsr_gguf_tensor *t = tsr_gguf_find_tensor(g, name);
            if (!t) {
                tsr_set_err(err, err_len, "missing tensor '%s'", name);
                return -1;
            }
            /* Keep the type with the largest block: it constrains splits the most. */
            if (l == 0 || tsr_type_block_elems(t->type) > tsr_type_block_elems(*types[k]))
                *types[k] = t->type;
            layer_bytes += t->n_bytes;
        }
    }
    pm->n_bytes_layer = layer_bytes / (uint64_t)hp->n_layer;
    const tsr_gguf_tensor *te = tsr_gguf_find_tensor(g, "token_embd.weight");
    const tsr_gguf_tensor *to = tsr_gguf_find_tensor(g, "output.weight");
    pm->type_token_embd = te->type;
    pm->type_output = to ? to->type : te->type;
    pm->n_bytes_output = to ? to->n_bytes : te->n_bytes;
    pm->n_bytes_embd_row = tsr_row_bytes(te->type, te->ne[0]);
    /* K + V of one position of one layer in the cache's type (f32 4, f16 2, q8_0 34/32
     * bytes per value) */
    pm->n_bytes_kv_per_token_layer =
        2ull * (uint64_t)tsr_kv_row_bytes(kv_type, (int64_t)hp->n_head_kv * hp->head_dim);
    return 0;
}

int tsr_replica_plan_model(const tsr_gguf *g, tsr_plan_model *pm, char *err, size_t err_len)
{
    tsr_hparams hp;
    if (tsr_model_read_hparams(g, &hp, err, err_len) != 0) return -1;
    return plan_model_from(g, &hp, TSR_KV_F32, pm, err, err_len);
}

int tsr_replica_plan_model_kv(const tsr_gguf *g, tsr_kv_type kv_type, tsr_plan_model *pm, char *err,
                              size_t err_len)
{
    tsr_hparams hp;
    if (tsr_model_read_hparams(g, &hp, err, err_len) != 0) return -1;
    return plan_model_from(g, &hp, kv_type, pm, err, err_len);
}

/* --device: every rank counts its GPUs; "auto" runs on CUDA only when all ranks have one
 * (one allreduce), "cuda" fails on every rank when any lacks one. Sets r->gpu. */
static int decide_device(tsr_replica *r, char *err, size_t err_len)
{
    /* no --device: TESSERA_DEVICE (the CPU test suite pins cpu with it), else auto */
    const char *env = getenv("TESSERA_DEVICE");
    const bool from_env = !r->p.device && env && *env;
    const char *dev = r->p.device ? r->p.device : from_env ? env : "auto";
    r->gpu = -1;
    if (strcmp(dev, "cuda") != 0 && strcmp(dev, "auto") != 0 && strcmp(dev, "cpu") != 0) {
        tsr_set_err(err, err_len, "%s must be cpu, cuda or auto, got '%s'",
                    from_env ? "TESSERA_DEVICE" : "--device", dev);
        return -1;
    }
    if (strcmp(dev, "cpu") == 0) return 0;
    char why[256] = "";
    const int32_t n = tsr_gpu_device_count(why, sizeof why);
    float have = n > 0 ? 1.0f : 0.0f;
    if (r->size > 1 && tsr_comm_allreduce_sum_f32(r->world, &have, 1, err, err_len) != 0) return -1;
    const bool all = have == (float)r->size;
    if (!all) {
        if (strcmp(dev, "auto") == 0) return 0;
        if (n > 0)
            tsr_set_err(err, err_len, "--device cuda: %d of %d ranks see no CUDA device",
                        r->size - (int)have, r->size);
        else
            tsr_set_err(err, err_len, "--device cuda: no CUDA device (%s); use --device cpu", why);
        return -1;
    }
    r->gpu = tsr_gpu_pick_device(why, sizeof why);
    return 0;
}

tsr_kv_type tsr_replica_params_kv_type(const tsr_replica_params *p)
{
    tsr_kv_type t = TSR_KV_DEFAULT;
    if (p->kv_type) {
        if (!tsr_kv_type_parse(p->kv_type, &t)) t = TSR_KV_DEFAULT;
    } else if (p->device && strcmp(p->device, "cuda") == 0) {
        t = TSR_KV_F32;
    }
    return t;
}

/* The KV cache type: the one asked for, or the backend's default (CPU: TSR_KV_DEFAULT;
 * CUDA: f32). worker/gpu.c's device pool stores each type with the CPU path's roundings
 * (kernels/cuda/numerics.h). */
static int resolve_kv_type(tsr_replica *r, char *err, size_t err_len)
{
    if (!r->p.kv_type) {
        r->kv_type = r->gpu >= 0 ? TSR_KV_F32 : TSR_KV_DEFAULT;
        return 0;
    }
    if (!tsr_kv_type_parse(r->p.kv_type, &r->kv_type)) {
        tsr_set_err(err, err_len, "unknown KV cache type '%s': use f32, f16 or q8_0", r->p.kv_type);
        return -1;
    }
    return 0;
}

/* Put this rank's context on its GPU (weights uploaded once: only this rank's tiles), and
 * the replica's data plane on device buffers when it can be: NCCL for the tensor-parallel
 * sums, the stage-to-stage hand-offs and the logits to the leader (MPI stays the control
 * plane: step broadcast, stats). TSR_NO_NCCL=1 keeps all of it on MPI through host memory
 * (needed when ranks share a GPU: NCCL refuses two ranks on one device). In the host
 * simulator (tests) the MPI communicators carry the "device" buffers directly, which runs the
 * device-direct logic without a GPU. */
static int attach_device(tsr_replica *r, char *err, size_t err_len)
{
    if (r->gpu < 0) return 0;
    if (tsr_gpu_attach(r->ctx, r->m, r->gpu, r->p.gpu_memory, err, err_len) != 0) return -1;
    const char *no_nccl = getenv("TSR_NO_NCCL");
    if (no_nccl && strcmp(no_nccl, "1") == 0) return 0;
    /* NCCL refuses two ranks on one GPU: when any node runs more ranks than it has GPUs
     * (OMPI_COMM_WORLD_LOCAL_SIZE / MPI_LOCALNRANKS), every rank keeps the host path (one
     * allreduce, so all decide alike: the NCCL constructors are collective) */
    if (r->size > 1 && !tsr_gpu_host_addressable()) {
        const char *ls = getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
        if (!ls) ls = getenv("MPI_LOCALNRANKS");
        const long n_local = ls ? strtol(ls, NULL, 10) : 1;
        float shared = n_local > tsr_gpu_device_count(NULL, 0) ? 1.0f : 0.0f;
        if (tsr_comm_allreduce_sum_f32(r->world, &shared, 1, err, err_len) != 0) return -1;
        if (shared > 0.0f) {
            if (r->rank == 0)
                fprintf(stderr,
                        "tessera: ranks share a GPU on %d node(s): activations and logits go "
                        "through host memory over MPI (NCCL needs one GPU per rank)\n",
                        (int)shared);
            return 0;
        }
    }
    tsr_comm *pipe = NULL;
    if (tsr_gpu_host_addressable()) {
        pipe = r->p.pp > 1 ? r->world : NULL;
        r->tp_direct = r->tp_comm;
    } else if (tsr_comm_nccl_available()) {
        if (r->tp_comm) {
            if (tsr_comm_nccl_new(r->tp_comm, r->gpu, &r->tp_nccl, err, err_len) != 0) return -1;
            tsr_comm_set_timeout_ms(r->tp_nccl, r->p.timeout_ms);
            tsr_ctx_set_tp_comm(r->ctx, r->tp_nccl);
        }
        if (r->p.pp > 1) {
            if (tsr_comm_nccl_new(r->world, r->gpu, &r->pipe_nccl, err, err_len) != 0) return -1;
            tsr_comm_set_timeout_ms(r->pipe_nccl, r->p.timeout_ms);
        }
        pipe = r->pipe_nccl;
        r->tp_direct = r->tp_nccl;
    } else {
        return 0; /* built without NCCL: host round trips over MPI */
    }
    r->direct = true;
    const int prev = r->stage > 0 ? (r->stage - 1) * r->p.tp + r->tp_rank : -1;
    const int next = r->stage < r->p.pp - 1 ? (r->stage + 1) * r->p.tp + r->tp_rank : -1;
    tsr_gpu_ctx_set_pipe(tsr_gpu_ctx_of(r->ctx), pipe, prev, next, TAG_HIDDEN);
    r->vocab_begin = calloc((size_t)r->p.tp, sizeof(int32_t));
    r->vocab_n = calloc((size_t)r->p.tp, sizeof(int32_t));
    if (!r->vocab_begin || !r->vocab_n) {
        tsr_set_err(err, err_len, "out of memory");
        return -1;
    }
    const int last = r->p.pp - 1;
    for (int k = 0; k < r->p.tp; k++) {
        const tsr_plan_rank *q = &r->plan.ranks[last * r->p.tp + k];
        r->vocab_begin[k] = q->vocab_begin;
        r->vocab_n[k] = q->vocab_end - q->vocab_begin;
    }
    return 0;
}

const char *tsr_replica_transport(const tsr_replica *r)
{
    if (r->gpu < 0) return r->size > 1 ? "host (mpi)" : "host";
    if (!r->direct) return r->size > 1 ? "host round trip (mpi)" : "device";
    if (r->pipe_nccl || r->tp_nccl) return "device-direct (nccl)";
    if (r->size == 1) return "device";
    return "device-direct (simulated: mpi carries device buffers)";
}

int32_t tsr_replica_device(const tsr_replica *r)
{
    return r->gpu;
}

int tsr_replica_open(const char *model_path, const tsr_replica_params *p, tsr_replica **out,
                     char *err, size_t err_len)
{
    *out = NULL;
    tsr_replica *r = calloc(1, sizeof *r);
    if (!r) {
        tsr_set_err(err, err_len, "out of memory");
        return -1;
    }
    r->p = *p;
    if (r->p.tp < 1 || r->p.pp < 1 || (int64_t)r->p.tp * r->p.pp > TSR_PLAN_MAX_RANKS) {
        tsr_set_err(err, err_len, "--tp and --pp must be >= 1 with tp × pp <= %d",
                    TSR_PLAN_MAX_RANKS);
        goto fail;
    }
    if (r->p.n_batch <= 0) r->p.n_batch = 128;
    if (r->p.timeout_ms <= 0) r->p.timeout_ms = 30000;
    const int32_t want = r->p.tp * r->p.pp;
    if (tsr_comm_mpi_launched()) {
        if (tsr_comm_mpi_world(&r->world, err, err_len) != 0) goto fail;
        r->mpi = true;
    } else {
        if (want > 1) {
            tsr_set_err(err, err_len,
                        "--tp %d --pp %d needs %d ranks: start it with 'mpirun -np %d tessera ...' "
                        "(or srun -n %d under Slurm)",
                        r->p.tp, r->p.pp, want, want, want);
            goto fail;
        }
        if (tsr_comm_local_new(&r->world, err, err_len) != 0) goto fail;
    }
    tsr_comm_set_timeout_ms(r->world, r->p.timeout_ms);
    r->rank = r->world->rank;
    r->size = r->world->size;
    if (r->size != want) {
        tsr_set_err(err, err_len,
                    "the MPI job has %d ranks but --tp %d --pp %d needs %d: use mpirun -np %d, or "
                    "change --tp/--pp",
                    r->size, r->p.tp, r->p.pp, want, want);
        goto fail;
    }
    r->stage = r->rank / r->p.tp;
    r->tp_rank = r->rank % r->p.tp;

    if (tsr_gguf_open(model_path, &r->g, err, err_len) != 0) goto fail;
    if (tsr_vocab_load(r->g, &r->vocab, err, err_len) != 0) goto fail;
    tsr_hparams hp;
    if (tsr_model_read_hparams(r->g, &hp, err, err_len) != 0) goto fail;
    if (tsr_vocab_n_tokens(r->vocab) != hp.n_vocab) {
        tsr_set_err(err, err_len, "the vocabulary has %d tokens but token_embd.weight has %d rows",
                    tsr_vocab_n_tokens(r->vocab), hp.n_vocab);
        goto fail;
    }
    if (decide_device(r, err, err_len) != 0) goto fail;
    if (resolve_kv_type(r, err, err_len) != 0) goto fail;
    tsr_plan_model pm;
    if (plan_model_from(r->g, &hp, r->kv_type, &pm, err, err_len) != 0) goto fail;
    /* GPU ranks: the device memory is the budget of weights + KV unless --mem says more */
    const uint64_t budget = r->gpu >= 0 && r->p.mem_budget == 0 ? r->p.gpu_memory : r->p.mem_budget;
    int32_t n_ctx = r->p.n_ctx > 0 ? r->p.n_ctx : (hp.n_ctx_train < 4096 ? hp.n_ctx_train : 4096);
    /* GPU ranks: the planner counts what the device will hold (worker/gpu.c): stage 0's whole
     * embedding table, the KV pool (its positions, in the cache type's bytes), the step's
     * buffers for n_batch tokens and the logits buffers (the leader's included) */
    int32_t n_ctx_plan = n_ctx;
    if (r->gpu >= 0) {
        pm.dev_n_batch = r->p.n_batch < n_ctx ? r->p.n_batch : n_ctx;
        pm.dev_n_bytes_embd = tsr_gguf_find_tensor(r->g, "token_embd.weight")->n_bytes;
        pm.dev_embd_tied = tsr_gguf_find_tensor(r->g, "output.weight") == NULL;
        if (r->p.n_kv_blocks > 0) n_ctx_plan = r->p.n_kv_blocks * TSR_KV_BLOCK_SIZE;
    }
    if (tsr_plan_make(&pm, r->p.tp, r->p.pp, r->p.layers, budget, n_ctx_plan, &r->plan, err,
                      err_len) != 0)
        goto fail;
    const tsr_plan_rank *pr = &r->plan.ranks[r->rank];
    tsr_shard sh = {.layer_begin = pr->layer_begin,
                    .layer_end = pr->layer_end,
                    .head_begin = pr->head_begin,
                    .head_end = pr->head_end,
                    .kv_head_begin = pr->kv_head_begin,
                    .kv_head_end = pr->kv_head_end,
                    .ff_begin = pr->ff_begin,
                    .ff_end = pr->ff_end,
                    .vocab_begin = pr->vocab_begin,
                    .vocab_end = pr->vocab_end};
    if (tsr_model_check_q80_order(!r->p.no_repack && tsr_model_repack_default(), r->gpu >= 0, err,
                                  err_len) != 0)
        goto fail;
    if (tsr_model_load_shard(r->g, &sh, &r->m, err, err_len) != 0) goto fail;
    /* CPU ranks repack their tiles (a GPU rank uploads the file's blocks instead) */
    if (r->gpu < 0 && !r->p.no_repack && tsr_model_repack_default() &&
        tsr_model_repack(r->m, err, err_len) != 0)
        goto fail;
    if (r->p.n_kv_blocks == TSR_REPLICA_KV_ONE_CONTEXT)
        r->p.n_kv_blocks = (n_ctx + TSR_KV_BLOCK_SIZE - 1) / TSR_KV_BLOCK_SIZE;
    if (r->p.n_kv_blocks > 0) {
        if (tsr_ctx_new_paged_kv(r->m, r->p.n_kv_blocks, r->p.n_batch, r->p.n_threads, r->kv_type,
                                 &r->ctx, err, err_len) != 0)
            goto fail;
    } else if (tsr_ctx_new_kv(r->m, n_ctx, r->p.n_batch, r->p.n_threads, r->kv_type, &r->ctx, err,
                              err_len) != 0) {
        goto fail;
    }
    r->n_ctx = n_ctx;
    if (r->p.tp > 1) {
        if (tsr_comm_split(r->world, r->stage, r->tp_rank, &r->tp_comm, err, err_len) != 0)
            goto fail;
        tsr_comm_set_timeout_ms(r->tp_comm, r->p.timeout_ms);
        tsr_ctx_set_tp_comm(r->ctx, r->tp_comm);
    }
    if (attach_device(r, err, err_len) != 0) goto fail;
    size_t nb = (size_t)tsr_ctx_n_batch(r->ctx);
    size_t V = (size_t)hp.n_vocab;
    r->logits_slice = malloc(nb * (size_t)(pr->vocab_end - pr->vocab_begin + 1) * sizeof(float));
    r->logits_gather = malloc(nb * V * sizeof(float));
    r->logits = malloc(nb * V * sizeof(float));
    r->want = malloc(nb);
    r->order = malloc(nb);
    r->counts = calloc((size_t)r->p.tp, sizeof(size_t));
    r->displs = calloc((size_t)r->p.tp, sizeof(size_t));
    if (!r->logits_slice || !r->logits_gather || !r->logits || !r->counts || !r->displs ||
        !r->want || !r->order) {
        tsr_set_err(err, err_len, "out of memory");
        goto fail;
    }
    r->st.rank = r->rank;
    r->st.stage = r->stage;
    r->st.tp_rank = r->tp_rank;
    r->st.n_bytes_loaded = r->m->n_bytes_loaded;
    r->st.n_bytes_repacked = r->m->n_bytes_repacked;
    r->st.t_repack_ns = r->m->t_repack_ns;
    r->st.n_q80_lanes = r->m->n_q80_lanes;
    r->st.n_q40_lanes = r->m->n_q40_lanes;
    r->st.n_q4k_lanes = r->m->n_q4k_lanes;
    r->st.n_q6k_lanes = r->m->n_q6k_lanes;
    r->st.n_q50_lanes = r->m->n_q50_lanes;
    r->st.n_q41_lanes = r->m->n_q41_lanes;
    r->st.n_q80g_lanes = r->m->n_q80g_lanes;
    if (r->gpu >= 0) /* what the planner counted for this rank (tsr_rank_stats) */
        r->st.n_bytes_device_planned =
            pr->n_bytes_weights +
            (uint64_t)((n_ctx_plan + 15) / 16 * 16) * pr->n_bytes_kv_per_token +
            tsr_plan_device_buffer_bytes(&pm, r->p.tp, r->p.pp, pr, n_ctx_plan);
    *out = r;
    return 0;
fail:
    if (r->world && r->world->size > 1 && err && err_len) {
        char tmp[512];
        snprintf(tmp, sizeof tmp, "%s", err);
        tsr_set_err(err, err_len, "rank %d: %s", r->world->rank, tmp);
    }
    tsr_replica_close(r);
    return -1;
}

void tsr_replica_close(tsr_replica *r)
{
    if (!r) return;
    tsr_ctx_free(r->ctx);
    tsr_model_free(r->m);
    tsr_vocab_free(r->vocab);
    tsr_gguf_close(r->g);
    if (r->tp_nccl) tsr_comm_free(r->tp_nccl);
    if (r->pipe_nccl) tsr_comm_free(r->pipe_nccl);
    if (r->tp_comm) tsr_comm_free(r->tp_comm);
    if (r->world) tsr_comm_free(r->world);
    if (r->mpi) tsr_comm_mpi_finalize();
    free(r->wire);
    free(r->logits_slice);
    free(r->logits_gather);
    free(r->logits);
    free(r->counts);
    free(r->displs);
    free(r->tables);
    free(r->want);
    free(r->order);
    free(r->vocab_begin);
    free(r->vocab_n);
    free(r);
}

static int wire_reserve(tsr_replica *r, size_t n_ints)
{
    if (n_ints <= r->wire_cap) return 0;
    int32_t *w = realloc(r->wire, n_ints * sizeof(int32_t));
    if (!w) return -1;
    r->wire = w;
    r->wire_cap = n_ints;
    return 0;
}

/* Comm time attributed to this rank (world + tp group, over MPI and NCCL). */
static uint64_t comm_ns(const tsr_replica *r)
{
    return r->world->stats.t_comm_ns + (r->tp_comm ? r->tp_comm->stats.t_comm_ns : 0) +
           (r->tp_nccl ? r->tp_nccl->stats.t_comm_ns : 0) +
           (r->pipe_nccl ? r->pipe_nccl->stats.t_comm_ns : 0);
}

/* Run the step described by r->wire on this rank; on the leader, fills r->logits with
 * [n_want][n_vocab]. */
static int run_step(tsr_replica *r, char *err, size_t err_len)
{
    const int32_t *h = r->wire;
    int32_t n = h[1], n_seqs = h[2], n_want = h[4];
    const int32_t *tokens = h + HDR_INTS;
    const int32_t *pos = tokens + n;
    const int32_t *seq = pos + n;
    const int32_t *want32 = seq + n;
    const int32_t *n_blocks = want32 + n;
    const int32_t *tab = n_blocks + n_seqs;
    if (n > tsr_ctx_n_batch(r->ctx)) {
        tsr_set_err(err, err_len, "step of %d tokens exceeds the batch size %d", n,
                    tsr_ctx_n_batch(r->ctx));
        return -1;
    }
    if (n_seqs > r->tables_cap) {
        const int32_t **t = realloc(r->tables, sizeof(*t) * (size_t)n_seqs);
        if (!t) {
            tsr_set_err(err, err_len, "out of memory");
            return -1;
        }
        r->tables = t;
        r->tables_cap = n_seqs;
    }
    const int32_t **tables = r->tables;
    uint8_t *want = r->want;
    for (int32_t s = 0, off = 0; s < n_seqs; s++) {
        if (n_blocks[s] < 0 || off + n_blocks[s] > h[3]) {
            tsr_set_err(err, err_len, "malformed block tables in the step descriptor");
            return -1;
        }
        tables[s] = tab + off;
        off += n_blocks[s];
    }
    /* the wire's want word: bit 0 wants logits, bit 1 the token's order class */
    uint8_t *order = r->order;
    for (int32_t i = 0; i < n; i++) {
        want[i] = (uint8_t)(want32[i] & 1);
        order[i] = (uint8_t)((want32[i] >> 1) & 1);
    }
    tsr_batch b = {.n_tokens = n,
                   .tokens = tokens,
                   .pos = pos,
                   .seq = seq,
                   .want_logits = want,
                   .n_seqs = n_seqs,
                   .block_tables = tables,
                   .n_blocks = n_blocks,
                   .order = order};
    const size_t E = (size_t)r->m->hp.n_embd;
    const size_t V = (size_t)r->m->hp.n_vocab;
    float *x = tsr_ctx_hidden(r->ctx);
    const int last = r->p.pp - 1;
    uint64_t t0 = tsr_now_ns(), c0 = comm_ns(r);

    /* Pipeline micro-batches: with pp stages and several sequences in the step, the batch
     * is cut at sequence boundaries into up to pp parts of similar size. Each stage runs
     * them in order and hands each to the next stage as soon as it is done, so stage s
     * works on part j while stage s+1 works on part j-1 instead of idling. Every rank
     * computes the same cut from the descriptor. */
    const tsr_plan_rank *pr = &r->plan.ranks[r->rank];
    const size_t vr = (size_t)(pr->vocab_end - pr->vocab_begin);
    const bool logits_direct = r->p.tp == 1 && !r->direct && vr == V;
    int32_t cuts[TSR_PLAN_MAX_RANKS + 1];
    int n_mb = 1;
    cuts[0] = 0;
    if (r->p.pp > 1 && n_seqs > 1) {
        int want_mb = r->p.pp < n_seqs ? r->p.pp : n_seqs;
        for (int32_t i = 1; i < n && n_mb < want_mb; i++) {
            /* Cut before token i when it starts a new sequence and the part is big enough. */
            if (seq[i] != seq[i - 1] &&
                i - cuts[n_mb - 1] >= (n - cuts[n_mb - 1]) / (want_mb - n_mb + 1))
                cuts[n_mb++] = i;
        }
    }
    cuts[n_mb] = n;
    int32_t want_done = 0;
    if (r->direct) tsr_gpu_ctx_step_begin(tsr_gpu_ctx_of(r->ctx));
    for (int j = 0; j < n_mb; j++) {
        const int32_t off = cuts[j], len = cuts[j + 1] - cuts[j];
        float *xj = x + (size_t)off * E;
        if (r->stage > 0 && !r->direct) {
            int peer = (r->stage - 1) * r->p.tp + r->tp_rank;
            if (tsr_comm_recv(r->world, xj, (size_t)len * E * sizeof(float), peer, TAG_HIDDEN, err,
                              err_len) != 0)
                return -1;
        }
        tsr_batch bj = b;
        bj.n_tokens = len;
        bj.tokens = tokens + off;
        bj.pos = pos + off;
        bj.seq = seq + off;
        bj.want_logits = want + off;
        bj.order = order + off;
        /* without tensor parallelism the slice is the whole vocabulary: the rows go straight
         * to r->logits (a serving step of 16 sequences saved a 2 MB copy on the leader) */
        float *lj = r->stage != last ? NULL
                    : logits_direct  ? r->logits + (size_t)want_done * vr
                                     : r->logits_slice + (size_t)want_done * vr;
        if (tsr_forward_batch(r->ctx, &bj, xj, lj, err, err_len) != 0) return -1;
        for (int32_t i = 0; i < len; i++) want_done += want[off + i] ? 1 : 0;
        if (r->stage < last && !r->direct) {
            int peer = (r->stage + 1) * r->p.tp + r->tp_rank;
            if (tsr_comm_send(r->world, xj, (size_t)len * E * sizeof(float), peer, TAG_HIDDEN, err,
                              err_len) != 0)
                return -1;
        }
    }
    (void)b;
    if (r->direct) {
        /* device-direct: the last stage's tp rank 0 gathers the vocabulary slices on its
         * device and hands the rows to the leader (download there, or a send to it) */
        tsr_gpu_ctx *gc = tsr_gpu_ctx_of(r->ctx);
        if (r->stage == last && n_want > 0 &&
            tsr_gpu_ctx_logits_out(gc, r->tp_direct, r->vocab_begin, r->vocab_n, n_want, TAG_LOGITS,
                                   r->rank == 0 ? r->logits : NULL, 0, err, err_len) != 0)
            return -1;
        if (r->rank == 0 && r->stage != last && n_want > 0 &&
            tsr_gpu_ctx_logits_in(gc, last * r->p.tp, TAG_LOGITS, n_want, r->logits, err,
                                  err_len) != 0)
            return -1;
    } else if (r->stage < last) {
        /* nothing more: the last stage returns the logits */
    } else if (n_want > 0) {
        float *full = r->logits;
        if (r->p.tp > 1) {
            /* Each tp rank holds [n_want][V_r]; gather the blocks, then interleave rows. */
            size_t off = 0;
            for (int k = 0; k < r->p.tp; k++) {
                const tsr_plan_rank *q = &r->plan.ranks[r->stage * r->p.tp + k];
                r->counts[k] =
                    (size_t)n_want * (size_t)(q->vocab_end - q->vocab_begin) * sizeof(float);
                r->displs[k] = off;
                off += r->counts[k];
            }
            size_t mine = (size_t)n_want * vr * sizeof(float);
            if (tsr_comm_allgatherv(r->tp_comm, r->logits_slice, mine, r->logits_gather, r->counts,
                                    r->displs, err, err_len) != 0)
                return -1;
            for (int k = 0; k < r->p.tp; k++) {
                const tsr_plan_rank *q = &r->plan.ranks[r->stage * r->p.tp + k];
                size_t vq = (size_t)(q->vocab_end - q->vocab_begin);
                const float *src =
                    (const float *)((const uint8_t *)r->logits_gather + r->displs[k]);
                for (int32_t t = 0; t < n_want; t++)
                    memcpy(full + (size_t)t * V + (size_t)q->vocab_begin, src + (size_t)t * vq,
                           vq * sizeof(float));
            }
        } else if (!logits_direct) {
            memcpy(full, r->logits_slice, (size_t)n_want * V * sizeof(float));
        }
        if (r->rank != 0 && r->tp_rank == 0) {
            if (tsr_comm_send(r->world, full, (size_t)n_want * V * sizeof(float), 0, TAG_LOGITS,
                              err, err_len) != 0)
                return -1;
        }
    }
    if (!r->direct && r->rank == 0 && r->stage != last && n_want > 0) {
        int peer = last * r->p.tp;
        if (tsr_comm_recv(r->world, r->logits, (size_t)n_want * V * sizeof(float), peer, TAG_LOGITS,
                          err, err_len) != 0)
            return -1;
    }
    uint64_t dt = tsr_now_ns() - t0;
    /* every wait is a call on one of the replica's communicators (the backend's tp sums
     * and device-direct transfers too), so their clocks hold all of it, counted once */
    uint64_t dc = comm_ns(r) - c0;
    r->st.t_comm_ns += dc;
    r->st.t_compute_ns += dt > dc ? dt - dc : 0;
    r->st.n_steps++;
    r->st.n_tokens += (uint64_t)n;
    return 0;
}

static int lead_step(tsr_replica *r, size_t n_ints, char *err, size_t err_len);

int tsr_replica_forward(tsr_replica *r, const int32_t *tokens, int32_t n, int32_t pos0,
                        const float **logits, char *err, size_t err_len)
{
    if (r->rank != 0) {
        tsr_set_err(err, err_len, "only the leader drives the replica");
        return -1;
    }
    const int32_t n_ctx = r->n_ctx;
    if (n <= 0 || pos0 < 0 || n > n_ctx - pos0) {
        tsr_set_err(err, err_len,
                    "positions %d..%d exceed the context size %d (the prompt plus generated tokens "
                    "must fit; raise --ctx-size or shorten the prompt)",
                    pos0, pos0 + n - 1, n_ctx);
        return -1;
    }
    const int32_t nb = tsr_ctx_n_batch(r->ctx);
    const int32_t n_tab = (n_ctx + TSR_KV_BLOCK_SIZE - 1) / TSR_KV_BLOCK_SIZE;
    for (int32_t done = 0; done < n;) {
        int32_t k = n - done < nb ? n - done : nb;
        size_t n_ints = HDR_INTS + 4 * (size_t)k + 1 + (size_t)n_tab;
        if (wire_reserve(r, n_ints) != 0) {
            tsr_set_err(err, err_len, "out of memory");
            return -1;
        }
        int32_t *w = r->wire;
        w[0] = OP_STEP;
        w[1] = k;
        w[2] = 1;
        w[3] = n_tab;
        w[4] = done + k == n ? 1 : 0;
        int32_t *tk = w + HDR_INTS, *ps = tk + k, *sq = ps + k, *wt = sq + k, *nbk = wt + k;
        for (int32_t i = 0; i < k; i++) {
            tk[i] = tokens[done + i];
            ps[i] = pos0 + done + i;
            sq[i] = 0;
            wt[i] = (done + i == n - 1 ? 1 : 0) | tsr_order_class(pos0 + done + i, r->prompt_len)
                                                      << 1;
        }
        nbk[0] = n_tab;
        for (int32_t i = 0; i < n_tab; i++) nbk[1 + i] = i;
        if (lead_step(r, n_ints, err, err_len) != 0) return -1;
        done += k;
    }
    *logits = r->logits;
    return 0;
}

/* Broadcast r->wire (n_ints) and run it here. */
static int lead_step(tsr_replica *r, size_t n_ints, char *err, size_t err_len)
{
    if (r->size > 1) {
        if (tsr_comm_bcast(r->world, r->wire, HDR_INTS * sizeof(int32_t), 0, err, err_len) != 0 ||
            tsr_comm_bcast(r->world, r->wire + HDR_INTS, (n_ints - HDR_INTS) * sizeof(int32_t), 0,
                           err, err_len) != 0)
            return -1;
    }
    return run_step(r, err, err_len);
}

int tsr_replica_step(tsr_replica *r, const tsr_batch *b, const float **logits, char *err,
                     size_t err_len)
{
    if (r->rank != 0) {
        tsr_set_err(err, err_len, "only the leader drives the replica");
        return -1;
    }
    if (b->n_tokens < 1 || b->n_tokens > tsr_ctx_n_batch(r->ctx) || b->n_seqs < 1) {
        tsr_set_err(err, err_len, "a step needs 1..%d tokens and at least one sequence",
                    tsr_ctx_n_batch(r->ctx));
        return -1;
    }
    size_t n_tab = 0;
    for (int32_t s = 0; s < b->n_seqs; s++) n_tab += (size_t)b->n_blocks[s];
    const int32_t n = b->n_tokens;
    size_t n_ints = HDR_INTS + 4 * (size_t)n + (size_t)b->n_seqs + n_tab;
    if (wire_reserve(r, n_ints) != 0) {
        tsr_set_err(err, err_len, "out of memory");
        return -1;
    }
    int32_t *w = r->wire;
    int32_t n_want = 0;
    for (int32_t i = 0; i < n; i++) n_want += b->want_logits[i] ? 1 : 0;
    w[0] = OP_STEP;
    w[1] = n;
    w[2] = b->n_seqs;
    w[3] = (int32_t)n_tab;
    w[4] = n_want;
    int32_t *tk = w + HDR_INTS, *ps = tk + n, *sq = ps + n, *wt = sq + n, *nbk = wt + n;
    for (int32_t i = 0; i < n; i++) {
        tk[i] = b->tokens[i];
        ps[i] = b->pos[i];
        sq[i] = b->seq[i];
        wt[i] = (b->want_logits[i] ? 1 : 0) | (b->order && b->order[i] ? 2 : 0);
    }
    int32_t *tab = nbk + b->n_seqs;
    for (int32_t s = 0; s < b->n_seqs; s++) {
        nbk[s] = b->n_blocks[s];
        memcpy(tab, b->block_tables[s], sizeof(int32_t) * (size_t)b->n_blocks[s]);
        tab += b->n_blocks[s];
    }
    if (lead_step(r, n_ints, err, err_len) != 0) return -1;
    *logits = r->logits;
    return 0;
}

int tsr_replica_kv_copy(tsr_replica *r, const int32_t *src, const int32_t *dst, int32_t n,
                        char *err, size_t err_len)
{
    if (r->rank != 0) {
        tsr_set_err(err, err_len, "only the leader drives the replica");
        return -1;
    }
    if (n <= 0) return 0;
    if (wire_reserve(r, HDR_INTS + 2 * (size_t)n) != 0) {
        tsr_set_err(err, err_len, "out of memory");
        return -1;
    }
    int32_t *w = r->wire;
    w[0] = OP_KV_COPY;
    w[1] = n;
    w[2] = w[3] = w[4] = 0;
    memcpy(w + HDR_INTS, src, sizeof(int32_t) * (size_t)n);
    memcpy(w + HDR_INTS + n, dst, sizeof(int32_t) * (size_t)n);
    if (r->size > 1 &&
        (tsr_comm_bcast(r->world, w, HDR_INTS * sizeof(int32_t), 0, err, err_len) != 0 ||
         tsr_comm_bcast(r->world, w + HDR_INTS, 2 * (size_t)n * sizeof(int32_t), 0, err, err_len) !=
             0))
        return -1;
    return tsr_ctx_kv_copy(r->ctx, w + HDR_INTS, w + HDR_INTS + n, n, err, err_len);
}

int tsr_replica_heartbeat(tsr_replica *r, char *err, size_t err_len)
{
    if (r->rank != 0 || r->size == 1) return 0;
    int32_t h[HDR_INTS] = {OP_NOOP, 0, 0, 0, 0};
    return tsr_comm_bcast(r->world, h, sizeof h, 0, err, err_len);
}

int tsr_replica_follow(tsr_replica *r, char *err, size_t err_len)
{
    for (;;) {
        if (wire_reserve(r, HDR_INTS) != 0) goto oom;
        if (tsr_comm_bcast(r->world, r->wire, HDR_INTS * sizeof(int32_t), 0, err, err_len) != 0)
            return -1;
        int32_t op = r->wire[0];
        if (op == OP_SHUTDOWN) return 0;
        if (op == OP_NOOP) continue;
        if (op == OP_STATS) {
            if (tsr_replica_stats(r, NULL, err, err_len) != 0) return -1;
            continue;
        }
        if (op == OP_KV_COPY) {
            int32_t n = r->wire[1];
            if (n < 1 || n > 1 << 20) {
                tsr_set_err(err, err_len, "malformed KV copy descriptor from the leader");
                return -1;
            }
            if (wire_reserve(r, HDR_INTS + 2 * (size_t)n) != 0) goto oom;
            if (tsr_comm_bcast(r->world, r->wire + HDR_INTS, 2 * (size_t)n * sizeof(int32_t), 0,
                               err, err_len) != 0 ||
                tsr_ctx_kv_copy(r->ctx, r->wire + HDR_INTS, r->wire + HDR_INTS + n, n, err,
                                err_len) != 0)
                return -1;
            continue;
        }
        if (op != OP_STEP) {
            tsr_set_err(err, err_len, "unknown step op %d from the leader", op);
            return -1;
        }
        int32_t n = r->wire[1], n_seqs = r->wire[2], n_tab = r->wire[3];
        if (n < 1 || n_seqs < 1 || n_tab < 0 || n > 1 << 20 || n_tab > 1 << 24) {
            tsr_set_err(err, err_len, "malformed step descriptor from the leader");
            return -1;
        }
        size_t n_ints = HDR_INTS + 4 * (size_t)n + (size_t)n_seqs + (size_t)n_tab;
        if (wire_reserve(r, n_ints) != 0) goto oom;
        if (tsr_comm_bcast(r->world, r->wire + HDR_INTS, (n_ints - HDR_INTS) * sizeof(int32_t), 0,
                           err, err_len) != 0)
            return -1;
        if (run_step(r, err, err_len) != 0) return -1;
    }
oom:
    tsr_set_err(err, err_len, "out of memory");
    return -1;
}

int tsr_replica_shutdown(tsr_replica *r, char *err, size_t err_len)
{
    if (r->rank != 0 || r->size == 1) return 0;
    int32_t h[HDR_INTS] = {OP_SHUTDOWN, 0, 0, 0, 0};
    return tsr_comm_bcast(r->world, h, sizeof h, 0, err, err_len);
}

int tsr_replica_stats(tsr_replica *r, tsr_rank_stats *out, char *err, size_t err_len)
{
    r->st.n_bytes_sent =
        r->world->stats.n_bytes_sent + (r->tp_comm ? r->tp_comm->stats.n_bytes_sent : 0);
    r->st.n_bytes_device = tsr_gpu_ctx_device_bytes(r->ctx ? tsr_gpu_ctx_of(r->ctx) : NULL);
    if (r->size == 1) {
        if (out) out[0] = r->st;
        return 0;
    }
    tsr_rank_stats *all = malloc(sizeof(tsr_rank_stats) * (size_t)r->size);
    if (!all) {
        tsr_set_err(err, err_len, "out of memory");
        return -1;
    }
    int rc = tsr_comm_allgather(r->world, &r->st, all, sizeof(tsr_rank_stats), err, err_len);
    if (rc == 0 && out) memcpy(out, all, sizeof(tsr_rank_stats) * (size_t)r->size);
    free(all);
    return rc;
}

int tsr_replica_poll_stats(tsr_replica *r, tsr_rank_stats *out, char *err, size_t err_len)
{
    if (r->rank != 0) {
        tsr_set_err(err, err_len, "only the leader polls the ranks");
        return -1;
    }
    if (r->size > 1) {
        int32_t h[HDR_INTS] = {OP_STATS, 0, 0, 0, 0};
        if (tsr_comm_bcast(r->world, h, sizeof h, 0, err, err_len) != 0) return -1;
    }
    return tsr_replica_stats(r, out, err, err_len);
}
