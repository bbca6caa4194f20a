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
 */
#include "worker/model.h"

#include "kernels/repack.h"
#include "kernels/util.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

static int repack_weight(tsr_model *m, tsr_weight *w, const char *what, char *err, size_t err_len)
{
    if (w->packed || !w->data || !tsr_repack_chosen(w->type) || w->n_out <= 0) return 0;
    const size_t bytes = tsr_repack_bytes(w->type, w->n_in, w->n_out);
    const size_t gb = tsr_repack_group_bytes(w->type, w->n_in);
    if (!bytes) return 0;
    uint8_t *dst = aligned_alloc(64, bytes);
    if (!dst || own(m, dst) != 0) {
        free(dst);
        tsr_set_err(err, err_len,
                    "out of memory repacking %s (%zu bytes); run with --no-repack to use the "
                    "weights in place",
                    what, bytes);
        return -1;
    }
    const int oi = owned_index(m, w->data);
    const uint8_t *base = (const uint8_t *)tsr_gguf_base(m->gguf);
    const int64_t n_groups = (w->n_out + TSR_REPACK_ROWS - 1) / TSR_REPACK_ROWS;
    if (oi >= 0 || !base) {
        /* a private copy (column slice): repack it, then free it */
        if (tsr_repack(w->type, w->n_in, w->n_out, w->data, w->row_bytes, dst) != 0) goto bad;
    } else {
        uint8_t *tmp = malloc(w->row_bytes * TSR_REPACK_ROWS);
        if (!tmp) {
            tsr_set_err(err, err_len, "out of memory repacking %s", what);
            return -1;
        }
        const uint64_t off0 = (uint64_t)((const uint8_t *)w->data - base);
        for (int64_t g = 0; g < n_groups; g++) {
            const int64_t r0 = g * TSR_REPACK_ROWS;
            const int64_t nr =
                w->n_out - r0 < TSR_REPACK_ROWS ? w->n_out - r0 : (int64_t)TSR_REPACK_ROWS;
            if (tsr_gguf_pread(m->gguf, off0 + (uint64_t)r0 * w->row_bytes, tmp,
                               (size_t)nr * w->row_bytes) != 0) {
                free(tmp);
                tsr_set_err(err, err_len, "reading %s from the file failed", what);
                return -1;
            }
            if (tsr_repack(w->type, w->n_in, nr, tmp, w->row_bytes, dst + (size_t)g * gb) != 0) {
                free(tmp);
                goto bad;
            }
        }
        free(tmp);
    }
    w->packed = dst; /* w->data stays: one token reads the file layout (see the top) */
    m->n_bytes_repacked += bytes;
    m->n_repacked++;
    return 0;
bad:
    tsr_set_err(err, err_len, "repacking %s failed", what);
    return -1;
}

int tsr_model_repack(tsr_model *m, char *err, size_t err_len)
{
    const uint64_t t0 = tsr_now_ns();
    char what[64];
    for (int32_t li = 0; li < m->n_layer_local; li++) {
        tsr_layer *L = &m->layers[li];
        tsr_weight *ws[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
        static const char *const names[] = {"attn_q",   "attn_k", "attn_v",  "attn_output",
                                            "ffn_gate", "ffn_up", "ffn_down"};
        for (int k = 0; k < 7; k++) {
            snprintf(what, sizeof what, "blk.%d.%s", m->shard.layer_begin + li, names[k]);
            if (repack_weight(m, ws[k], what, err, err_len) != 0) return -1;
        }
    }
    /* the head (when tied, a copy of the embedding rows it uses; the embedding lookup keeps
     * reading the file's rows) */
    if (m->last_stage && repack_weight(m, &m->output, "output", err, err_len) != 0) return -1;
    m->t_repack_ns += tsr_now_ns() - t0;
    return 0;
}
