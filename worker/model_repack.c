/*
 * model_repack.c — a rank's weights repacked at load (kernels/repack.h): see
 * tsr_model_repack in model.h.
 *
 * Why a separate file: the walk over a model's matrices and the memory bookkeeping are
 * independent of the forward pass in model.c. Row slices (views of the mapping) are read
 * with pread, a group of 4 rows at a time, so the repack itself does not fault the mapping
 * in. Column slices are already private pread copies; they are repacked and kept.
 *
 * Both layouts stay: the matmul (kernels/ops.c, tsr_repack_use_file_layout) runs one token
 * (decode) on the file layout, whose row dots stream faster than the repacked GEMV (not
 * Q4_K / Q6_K / Q5_0, whose one-token GEMVs read the groups), and
 * several tokens on the repacked GEMM (long batches on the file tile where one exists). The
 * price is memory: the repacked copy (n_bytes_repacked, anonymous) on top of what
 * --no-repack holds (the file's pages of this rank's tiles, shared and reclaimable; a column
 * slice's private copy). Which types are repacked: tsr_repack_chosen (kernels/repack.h).
 *
 * Q8_0 matrices without a lanes layout (below) are copied verbatim (their file layout, which
 * ggml's Q8_0 kernels read) into the same arena, w->data pointing there: only for the huge
 * pages (q8_0_in_mapping).
 *
 * Lanes layouts (w->lanes, read for every token count instead of the file layout or the
 * groups): Q8_0 (kernels/q80_lanes.h) instead of the verbatim copy, in the opt-in lanes order
 * (tsr_q80l_on) or, on CPUs with AVX-512 VNNI, in ggml's (w->lanes_ggml; tsr_q80l_ggml_chosen,
 * with every type repacked: tsr_repack_all), Q4_0 and Q4_K on CPUs with AVX2 or AVX-512 VNNI,
 * on CPUs with AVX-512 VNNI Q6_K and Q5_0, and on AVX2 CPUs without it Q5_0 in its AVX2 layout
 * (w->lanes_avx2), instead of the groups (kernels/q40_lanes.h, q4k_lanes.h, q6k_lanes.h,
 * q50_lanes.h, q50_avx2.h; tsr_q40l_chosen, tsr_q4kl_chosen, tsr_q6kl_chosen, tsr_q50l_chosen,
 * tsr_q50a_chosen: each type's own orders, the same bits); and on AVX2 CPUs without AVX-512
 * VNNI Q4_1 in its AVX2 layout (kernels/q41_avx2.h, tsr_q41a_chosen) instead of the file
 * layout's row dots (Q4_1 has no groups: ggml runs it unrepacked), in its one order.
 *
 * Memory: all of a call's repacked matrices share one allocation (an arena, 64-byte aligned
 * slices), 2 MiB aligned and madvise(MADV_HUGEPAGE)'d, so the kernel backs it with
 * transparent huge pages where it can (this host: THP "madvise"). Decode streams every
 * weight once per token; with 4 KiB pages each page costs a TLB walk and stops the
 * hardware stream prefetchers at its boundary: the Q4_K / Q6_K 4-row GEMVs over a 64 MiB
 * matrix, 2 threads, alternated in one session, streamed 40 -> 47 GB/s (Q4_K) and
 * 29 -> 40 GB/s (Q6_K) with huge pages. One arena (not one per matrix) so that small
 * matrices and each matrix's tail share huge pages too; at most one partial huge page is
 * wasted per call.
 */
#include "worker/model.h"

#include "kernels/q40_lanes.h"
#include "kernels/q4k_lanes.h"
#include "kernels/q41_avx2.h"
#include "kernels/q50_avx2.h"
#include "kernels/q50_lanes.h"
#include "kernels/q6k_lanes.h"
#include "kernels/q80_lanes.h"
#include "kernels/quant.h"
#include "kernels/repack.h"
#include "kernels/util.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

int tsr_model_check_q80_order(bool repack, bool gpu, char *err, size_t err_len)
{
    if (!tsr_q80l_on() || (repack && !gpu)) return 0;
    return tsr_fail(err, err_len, -1,
                    "the lanes order of Q8_0 (--q8-order lanes, or TSR_Q80_ORDER=lanes) runs "
                    "on CPU ranks that repack their weights: %s",
                    gpu ? "run with --device cpu, or drop --q8-order lanes"
                        : "drop --no-repack (and TSR_NO_REPACK), or --q8-order lanes");
}

/* -1: not decided yet (the environment decides at the first call). */
static _Atomic int g_repack_default = -1;

bool tsr_model_repack_default(void)
{
    int v = atomic_load(&g_repack_default);
    if (v < 0) {
        const char *e = getenv("TSR_NO_REPACK");
        v = (e && *e && strcmp(e, "0") != 0) ? 0 : 1;
        atomic_store(&g_repack_default, v);
    }
    return v != 0;
}

void tsr_model_set_repack_default(bool on)
{
    atomic_store(&g_repack_default, on ? 1 : 0);
}

static int own(tsr_model *m, void *p)
{
    void **owned = realloc(m->owned, sizeof(void *) * (size_t)(m->n_owned + 1));
    if (!owned) return -1;
    m->owned = owned;
    m->owned[m->n_owned++] = p;
    return 0;
}

/* The private copy w->data is one of m->owned (a column slice), or NULL. */
static int owned_index(const tsr_model *m, const void *p)
{
    for (int32_t i = 0; i < m->n_owned; i++)
        if (m->owned[i] == p) return i;
    return -1;
}

/* Whether w is a Q8_0 matrix still read from the file's mapping: repack_weight copies those
 * verbatim (the file layout: ggml's order runs them unrepacked, kernels/repack.h) into the
 * huge-page arena and points w->data there. Decode streams them once per token: 64 MiB,
 * one-token Q8_0 GEMV (tests/bench_q80_gemv's passes), huge pages against 4 KiB ones, one
 * thread 17.8 -> 32.0 GB/s, two 37 -> 72 GB/s on a quiet moment of the shared host. */
static bool q8_0_in_mapping(const tsr_model *m, const tsr_weight *w)
{
    const uint8_t *base = (const uint8_t *)tsr_gguf_base(m->gguf);
    const uint8_t *d = w->data;
    return w->type == TSR_TYPE_Q8_0 && !w->packed && d && base && w->n_out > 0 && d >= base &&
           d < base + tsr_gguf_file_size(m->gguf);
}

/* Whether w gets a lanes layout (see the top), not the groups or the verbatim copy. */
static bool lanes_of(const tsr_weight *w)
{
    if (w->type == TSR_TYPE_Q8_0)
        return tsr_q80l_on() || (tsr_repack_all() && tsr_q80l_ggml_chosen());
    if (w->type == TSR_TYPE_Q4_K)
        return tsr_repack_chosen(TSR_TYPE_Q4_K) && tsr_q4kl_chosen() && w->n_in % 256 == 0;
    if (w->type == TSR_TYPE_Q6_K)
        return tsr_repack_chosen(TSR_TYPE_Q6_K) && tsr_q6kl_chosen() && w->n_in % 256 == 0;
    if (w->type == TSR_TYPE_Q5_0)
        return tsr_repack_chosen(TSR_TYPE_Q5_0) && (tsr_q50l_chosen() || tsr_q50a_chosen()) &&
               w->n_in % 32 == 0;
    if (w->type == TSR_TYPE_Q4_1) return tsr_q41a_chosen() && w->n_in % 32 == 0;
    return w->type == TSR_TYPE_Q4_0 && tsr_repack_chosen(TSR_TYPE_Q4_0) && tsr_q40l_chosen();
}

/* Bytes of one 16-row group of w's lanes layout (all seven layouts hold 16 rows a group:
 * TSR_Q80L_ROWS = TSR_Q40L_ROWS = TSR_Q4KL_ROWS = TSR_Q6KL_ROWS = TSR_Q50L_ROWS =
 * TSR_Q50A_ROWS = TSR_Q41A_ROWS). */
static size_t lanes_group_bytes(const tsr_weight *w)
{
    return w->type == TSR_TYPE_Q4_0   ? tsr_q40l_group_bytes(w->n_in)
           : w->type == TSR_TYPE_Q4_K ? tsr_q4kl_group_bytes(w->n_in)
           : w->type == TSR_TYPE_Q6_K ? tsr_q6kl_group_bytes(w->n_in)
           : w->type == TSR_TYPE_Q4_1 ? tsr_q41a_group_bytes(w->n_in)
           : w->type == TSR_TYPE_Q5_0
               ? (tsr_q50l_chosen() ? tsr_q50l_group_bytes(w->n_in) : tsr_q50a_group_bytes(w->n_in))
               : tsr_q80l_group_bytes(w->n_in);
}

/* Whether repack_weight would repack (or, Q8_0, copy) w, and the bytes of its copy (0: it
 * would not). */
static size_t repack_bytes_of(const tsr_model *m, const tsr_weight *w)
{
    if (lanes_of(w)) {
        if (w->lanes || !w->data || w->n_out <= 0) return 0;
        return (size_t)((w->n_out + TSR_Q80L_ROWS - 1) / TSR_Q80L_ROWS) * lanes_group_bytes(w);
    }
    if (q8_0_in_mapping(m, w)) return (size_t)w->n_out * w->row_bytes;
    if (w->packed || !w->data || !tsr_repack_chosen(w->type) || w->n_out <= 0) return 0;
    return tsr_repack_bytes(w->type, w->n_in, w->n_out);
}

/* Slices of the arena are 64-byte aligned (the kernels' loads, tsr_repack's contract). */
#define REPACK_ALIGN    ((size_t)64)
#define REPACK_HUGEPAGE ((size_t)2 << 20)

/* A repack of n_out rows into a layout of row groups: kernels/repack.h's tsr_repack, or a
 * lanes layout's (lanes_repack). */
typedef int (*repack_fn)(uint32_t type, int64_t n, int64_t n_out, const void *src,
                         size_t src_stride, void *dst);

static int lanes_repack(uint32_t type, int64_t n, int64_t n_out, const void *src, size_t src_stride,
                        void *dst)
{
    return type == TSR_TYPE_Q4_0   ? tsr_q40l_repack(n, n_out, src, src_stride, dst)
           : type == TSR_TYPE_Q4_K ? tsr_q4kl_repack(n, n_out, src, src_stride, dst)
           : type == TSR_TYPE_Q6_K ? tsr_q6kl_repack(n, n_out, src, src_stride, dst)
           : type == TSR_TYPE_Q4_1 ? tsr_q41a_repack(n, n_out, src, src_stride, dst)
           : type == TSR_TYPE_Q5_0
               ? (tsr_q50l_chosen() ? tsr_q50l_repack(n, n_out, src, src_stride, dst)
                                    : tsr_q50a_repack(n, n_out, src, src_stride, dst))
               : tsr_q80l_repack(n, n_out, src, src_stride, dst);
}

/* w's rows through fn into dst, whose groups hold `rows` rows in gb bytes each: a private
 * copy (column slice) at once; a view of the mapping read from the file a group at a time
 * with pread (so the repack does not fault the mapping in). */
static int repack_rows(tsr_model *m, const tsr_weight *w, uint8_t *dst, int64_t rows, size_t gb,
                       repack_fn fn, const char *what, char *err, size_t err_len)
{
    const uint8_t *base = (const uint8_t *)tsr_gguf_base(m->gguf);
    if (owned_index(m, w->data) >= 0 || !base) {
        if (fn(w->type, w->n_in, w->n_out, w->data, w->row_bytes, dst) != 0) goto bad;
        return 0;
    }
    uint8_t *tmp = malloc(w->row_bytes * (size_t)rows);
    if (!tmp) return tsr_fail(err, err_len, -1, "out of memory repacking %s", what);
    const uint64_t off0 = (uint64_t)((const uint8_t *)w->data - base);
    for (int64_t r0 = 0; r0 < w->n_out; r0 += rows) {
        const int64_t nr = w->n_out - r0 < rows ? w->n_out - r0 : rows;
        if (tsr_gguf_pread(m->gguf, off0 + (uint64_t)r0 * w->row_bytes, tmp,
                           (size_t)nr * w->row_bytes) != 0) {
            free(tmp);
            return tsr_fail(err, err_len, -1, "reading %s from the file failed", what);
        }
        if (fn(w->type, w->n_in, nr, tmp, w->row_bytes, dst + (size_t)(r0 / rows) * gb) != 0) {
            free(tmp);
            goto bad;
        }
    }
    free(tmp);
    return 0;
bad:
    return tsr_fail(err, err_len, -1, "repacking %s failed", what);
}

/* Repack w into dst (repack_bytes_of(w) bytes, 64-byte aligned, owned by the caller). */
static int repack_weight(tsr_model *m, tsr_weight *w, uint8_t *dst, const char *what, char *err,
                         size_t err_len)
{
    const size_t bytes = repack_bytes_of(m, w);
    if (!bytes) return 0;
    /* a lanes layout (see the top): its own groups, instead of the copy or the groups */
    const bool lanes = lanes_of(w);
    if (!lanes && q8_0_in_mapping(m, w)) { /* verbatim: the same rows, on huge pages */
        const uint64_t off =
            (uint64_t)((const uint8_t *)w->data - (const uint8_t *)tsr_gguf_base(m->gguf));
        if (w->row_bytes * (size_t)w->n_out != bytes ||
            tsr_gguf_pread(m->gguf, off, dst, bytes) != 0) {
            tsr_set_err(err, err_len, "reading %s from the file failed", what);
            return -1;
        }
        w->data = dst;
        m->n_bytes_repacked += bytes;
        m->n_repacked++;
        return 0;
    }
    const int rc =
        lanes ? repack_rows(m, w, dst, TSR_Q80L_ROWS, lanes_group_bytes(w), lanes_repack, what, err,
                            err_len)
              : repack_rows(m, w, dst, TSR_REPACK_ROWS, tsr_repack_group_bytes(w->type, w->n_in),
                            tsr_repack, what, err, err_len);
    if (rc != 0) return -1;
    /* w->data stays: one token reads the file layout (see the top); a lanes matrix no longer
     * reads it */
    if (lanes) {
        w->lanes = dst;
        if (w->type == TSR_TYPE_Q4_0)
            m->n_q40_lanes++;
        else if (w->type == TSR_TYPE_Q4_K)
            m->n_q4k_lanes++;
        else if (w->type == TSR_TYPE_Q6_K)
            m->n_q6k_lanes++;
        else if (w->type == TSR_TYPE_Q5_0) {
            w->lanes_avx2 = !tsr_q50l_chosen();
            m->n_q50_lanes++;
        } else if (w->type == TSR_TYPE_Q4_1)
            m->n_q41_lanes++;
        else if (tsr_q80l_on())
            m->n_q80_lanes++;
        else {
            w->lanes_ggml = true;
            m->n_q80g_lanes++;
        }
    } else {
        w->packed = dst;
    }
    m->n_bytes_repacked += bytes;
    m->n_repacked++;
    return 0;
}

/* Every matrix tsr_model_repack handles, in order; what[] gets its name. */
static int weights_of(tsr_model *m, tsr_weight **ws, char (*what)[64])
{
    static const char *const names[] = {"attn_q",   "attn_k", "attn_v",  "attn_output",
                                        "ffn_gate", "ffn_up", "ffn_down"};
    int n = 0;
    for (int32_t li = 0; li < m->n_layer_local; li++) {
        tsr_layer *L = &m->layers[li];
        tsr_weight *lw[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
        for (int k = 0; k < 7; k++) {
            if (ws) {
                ws[n] = lw[k];
                snprintf(what[n], 64, "blk.%d.%s", m->shard.layer_begin + li, names[k]);
            }
            n++;
        }
    }
    /* the head (when tied, a copy of the embedding rows it uses; the embedding lookup keeps
     * reading the file's rows) */
    if (m->last_stage) {
        if (ws) {
            ws[n] = &m->output;
            snprintf(what[n], 64, "output");
        }
        n++;
    }
    return n;
}

int tsr_model_repack(tsr_model *m, char *err, size_t err_len)
{
    const uint64_t t0 = tsr_now_ns();
    int rc = -1;
    const int n_w = weights_of(m, NULL, NULL);
    tsr_weight **ws = malloc(sizeof(*ws) * (size_t)(n_w > 0 ? n_w : 1));
    char(*what)[64] = malloc(64 * (size_t)(n_w > 0 ? n_w : 1));
    size_t *off = malloc(sizeof(*off) * (size_t)(n_w > 0 ? n_w : 1));
    uint8_t *arena = NULL;
    if (!ws || !what || !off) {
        tsr_set_err(err, err_len, "out of memory repacking the weights");
        goto done;
    }
    weights_of(m, ws, what);
    /* one arena for all (see the top): slice k at off[k] */
    size_t total = 0;
    for (int k = 0; k < n_w; k++) {
        off[k] = total;
        total += (repack_bytes_of(m, ws[k]) + REPACK_ALIGN - 1) / REPACK_ALIGN * REPACK_ALIGN;
    }
    if (total == 0) {
        rc = 0;
        goto done;
    }
    /* whole huge pages: aligned_alloc's size is a multiple of its alignment */
    const size_t n_alloc = (total + REPACK_HUGEPAGE - 1) / REPACK_HUGEPAGE * REPACK_HUGEPAGE;
    arena = aligned_alloc(REPACK_HUGEPAGE, n_alloc);
    if (!arena || own(m, arena) != 0) {
        free(arena);
        arena = NULL;
        tsr_set_err(err, err_len,
                    "out of memory repacking the weights (%zu bytes); run with --no-repack to "
                    "use the weights in place",
                    total);
        goto done;
    }
    /* advice only: without THP (or when it is refused) the arena keeps 4 KiB pages */
    (void)madvise(arena, n_alloc, MADV_HUGEPAGE);
    for (int k = 0; k < n_w; k++)
        if (repack_weight(m, ws[k], arena + off[k], what[k], err, err_len) != 0) goto done;
    rc = 0;
done:
    free(ws);
    free(what);
    free(off);
    m->t_repack_ns += tsr_now_ns() - t0;
    return rc;
}
