/* ops.c — see ops.h. Plain C loops written so gcc vectorizes them; the matmul hot loops
 * live in quant.c (tsr_vec_dot_rows for one token, tsr_vec_dot_tile for several) and this
 * file only schedules them over threads. */
#include "kernels/ops.h"

#include "kernels/dot_ggml.h"
#include "kernels/q4k_gemm.h"
#include "kernels/q40_lanes.h"
#include "kernels/q41_avx2.h"
#include "kernels/q4k_lanes.h"
#include "kernels/q50_avx2.h"
#include "kernels/q50_lanes.h"
#include "kernels/q6k_lanes.h"
#include "kernels/q80_lanes.h"
#include "kernels/quant.h"
#include "kernels/repack.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>

/* Batches narrower than this run token by token (see mm_run). */
#define TILE_MIN_TOKENS 4

/* Whether a weight of `type` in a lanes layout reads the lanes prep of its activations
 * (kernels/q80_lanes.h for Q8_0, kernels/q40_lanes.h for Q4_0; the Q4_K and Q6_K lanes
 * kernels read the Q8_K rows as they are). */
static bool lanes_prep_type(uint32_t type)
{
    return type == TSR_TYPE_Q8_0 || type == TSR_TYPE_Q4_0;
}

/* Bytes of the conversion to the dot type vt of n_tok rows of n_in, and of the Q8_0 tiles'
 * prep when a weight of the conversion is Q8_0 (kernels/dot_ggml.h: laid out once per
 * matmul, not once per row chunk), and of the lanes prep (kernels/q80_lanes.h; counted for
 * every Q8_0 and Q4_0 weight, lanes_prep_type, so that scratch sized before the load repacks
 * fits). */
static size_t conv_bytes(uint32_t vt, int64_t n_in, int n_tok, bool q8_0, bool lanes)
{
    if (vt == TSR_TYPE_F32) return 0;
    const size_t prep = q8_0 ? tsr_ggml_tile_prep_bytes(TSR_TYPE_Q8_0, n_in, n_tok) : 0;
    const size_t lprep = lanes ? tsr_q80l_prep_bytes(n_in, n_tok) : 0;
    return (size_t)n_tok * tsr_row_bytes(vt, n_in) + (prep ? prep + 63 : 0) +
           (lprep ? lprep + 63 : 0); /* + alignment */
}

size_t tsr_matmul_scratch_bytes(const tsr_weight *w, int n_tok)
{
    return conv_bytes(tsr_type_vec_dot_type(w->type), w->n_in, n_tok, w->type == TSR_TYPE_Q8_0,
                      lanes_prep_type(w->type));
}

typedef struct {
    const tsr_weight *const *w;
    float *const *y;
    int n_w;
    /* Activations converted to each weight's dot type: [n_tok] rows of xq_stride[k] bytes
     * at xq[k] (weights sharing a dot type share one conversion). */
    const void *xq[4];
    size_t xq_stride[4];
    const void *prep[4];  /* Q8_0 weights' tile prep (kernels/dot_ggml.h), or NULL */
    const void *lprep[4]; /* lanes weights' prep (kernels/q80_lanes.h), or NULL */
    int lanes_isa;        /* kernels/dot_ggml.h level for the lanes kernels */
    /* The distinct conversions to make: dot type, destination, row stride. */
    int n_conv;
    uint32_t conv_vt[4];
    void *conv_dst[4];
    size_t conv_stride[4];
    void *conv_prep[4];  /* the conversion's tile prep to lay out too, or NULL */
    void *conv_lprep[4]; /* the conversion's lanes prep to lay out too, or NULL */
    const float *x;      /* for conversion */
    int n_tok;
    const uint8_t *ord; /* [n_tok] order class (1: prompt order for Q4_K), or NULL */
    int isa;            /* kernels/dot_ggml.h level, when ord is set */
    int64_t rows_per_chunk;
    int64_t chunks_per_w[4];
    int64_t n_chunks;
    /* One token: guided claims over the weights' rows laid end to end (weight k from
     * row_base[k]); `next` is then that row index, not a chunk index (mm_claim). */
    bool guided;
    int guided_div;
    int64_t total_rows;
    int64_t row_base[4];
    int64_t min_rows[4];
    _Atomic int64_t next;
} mm_job;

/* Work items are (conversion, token) pairs, split by ith. */
static void mm_convert(void *arg, int ith, int nth)
{
    mm_job *j = arg;
    int64_t n_in = j->w[0]->n_in;
    for (int it = ith; it < j->n_conv * j->n_tok; it += nth) {
        int cv = it / j->n_tok, t = it % j->n_tok;
        uint8_t *row = (uint8_t *)j->conv_dst[cv] + (size_t)t * j->conv_stride[cv];
        tsr_quant_act_row(j->conv_vt[cv], j->x + (size_t)t * n_in, row, n_in);
        if (j->conv_prep[cv]) tsr_ggml_tile_prep(n_in, j->n_tok, t, row, j->conv_prep[cv]);
        if (j->conv_lprep[cv])
            tsr_q80l_prep(n_in, row,
                          (uint8_t *)j->conv_lprep[cv] + (size_t)t * tsr_q80l_prep_bytes(n_in, 1));
    }
}

/* Rows [r0, r0 + nr) of weight k for tokens [t0, t0 + n_tok) in the row dots' order (the
 * GEMV order for Q4_K). */
static void mm_rows(const mm_job *j, int k, int64_t r0, int64_t nr, int t0, int n_tok)
{
    const tsr_weight *w = j->w[k];
    const uint8_t *xq = (const uint8_t *)j->xq[k] + (size_t)t0 * j->xq_stride[k];
    float *yk = j->y[k] + (size_t)t0 * (size_t)w->n_out;
    if (w->lanes && w->type == TSR_TYPE_Q4_K) {
        /* Q4_K's lanes layout (kernels/q4k_lanes.h), the generated tokens' order: the Q8_K
         * rows as they are */
        tsr_q4kl_dot(j->lanes_isa, w->n_in, w->lanes, r0, nr, n_tok, xq, j->xq_stride[k], false,
                     yk + r0, (size_t)w->n_out);
        return;
    }
    if (w->lanes && w->type == TSR_TYPE_Q6_K) {
        /* Q6_K's lanes layout (kernels/q6k_lanes.h), its one order: the Q8_K rows as they are */
        tsr_q6kl_dot(j->lanes_isa, w->n_in, w->lanes, r0, nr, n_tok, xq, j->xq_stride[k], yk + r0,
                     (size_t)w->n_out);
        return;
    }
    if (w->lanes && w->type == TSR_TYPE_Q8_0 && w->lanes_ggml) {
        /* Q8_0 in ggml's order over the lanes layout (kernels/q80_lanes.h): the Q8_0 rows as
         * they are, no prep */
        tsr_q80l_dot_ggml(j->lanes_isa, w->n_in, w->lanes, r0, nr, n_tok, xq, j->xq_stride[k],
                          yk + r0, (size_t)w->n_out);
        return;
    }
    if (w->lanes && w->type == TSR_TYPE_Q4_1) {
        /* Q4_1's AVX2 layout (kernels/q41_avx2.h), its one order: the Q8_1 rows as they are */
        tsr_q41a_dot(j->lanes_isa, w->n_in, w->lanes, r0, nr, n_tok, xq, j->xq_stride[k], yk + r0,
                     (size_t)w->n_out);
        return;
    }
    if (w->lanes && w->type == TSR_TYPE_Q5_0) {
        /* Q5_0's lanes layouts (kernels/q50_lanes.h, q50_avx2.h), its one order: the Q8_0 rows
         * as they are */
        (w->lanes_avx2 ? tsr_q50a_dot : tsr_q50l_dot)(j->lanes_isa, w->n_in, w->lanes, r0, nr,
                                                      n_tok, xq, j->xq_stride[k], yk + r0,
                                                      (size_t)w->n_out);
        return;
    }
    if (w->lanes) {
        /* Q8_0 in the lanes order, Q4_0 in its own (r0 is a multiple of 16 rows): one kernel
         * for every token count, so one order whatever the batch */
        const uint8_t *lp =
            (const uint8_t *)j->lprep[k] + (size_t)t0 * tsr_q80l_prep_bytes(w->n_in, 1);
        if (w->type == TSR_TYPE_Q4_0)
            tsr_q40l_dot(j->lanes_isa, w->n_in, w->lanes, r0, nr, n_tok, lp, yk + r0,
                         (size_t)w->n_out);
        else
            tsr_q80l_dot(j->lanes_isa, w->n_in, w->lanes, r0, nr, n_tok, lp, yk + r0,
                         (size_t)w->n_out);
        return;
    }
    if (w->packed && (!w->data || !tsr_repack_use_file_layout(w->type, n_tok))) {
        /* Repacked weights (r0 is a multiple of TSR_REPACK_ROWS): the GEMM for several
         * tokens, each weight group read once for all of them. Which layout is faster
         * for how many tokens was measured (tsr_repack_use_file_layout): one token
         * streams the file layout except where the groups' GEMV is faster (Q4_K, Q6_K,
         * Q5_0, Q4_0), as do long batches of types with a file tile.
         * Bit-identical to the paths below either way. */
        tsr_repack_dot(w->type, w->n_in, w->packed, r0, nr, n_tok, xq, j->xq_stride[k], yk + r0,
                       (size_t)w->n_out);
        return;
    }
    const uint8_t *wrow = (const uint8_t *)w->data + (size_t)r0 * w->row_bytes;
    /* Q8_0 / Q4_1 (kernels/dot_ggml.c) take their register tiles from 2 tokens on: the
     * weights read once for all of them (2-3 tokens: speculative verification of k <= 2) */
    if (n_tok >= TILE_MIN_TOKENS || (n_tok > 1 && tsr_ggml_dot_handles(w->type))) {
        /* Prefill / batches: the chunk's rows x all tokens as register-blocked tiles
         * (each weight block unpacked once for several tokens); bit-identical per
         * element to the token-by-token loop below. */
        if (j->prep[k])
            tsr_ggml_dot_tile_prep(w->n_in, nr, wrow, w->row_bytes, j->n_tok, t0, n_tok, j->prep[k],
                                   xq, j->xq_stride[k], yk + r0, (size_t)w->n_out);
        else
            tsr_vec_dot_tile(w->type, w->n_in, nr, wrow, w->row_bytes, n_tok, xq, j->xq_stride[k],
                             yk + r0, (size_t)w->n_out);
        return;
    }
    /* Decode: one token, rows streamed (memory-bound); 2-3 tokens (speculative
     * verification of k <= 2 drafts) also go token by token, the chunk's rows staying
     * in cache: measured cheaper than tiles at that width (1B Q8_0, 2 threads: a
     * 2-token step costs 1.4x a 1-token step this way, 2.0x with tiles). */
    for (int t = 0; t < n_tok; t++) {
        tsr_vec_dot_rows(w->type, w->n_in, nr, wrow, w->row_bytes, xq + (size_t)t * j->xq_stride[k],
                         yk + (size_t)t * w->n_out + r0);
    }
}

/* The same rows and tokens of a Q4_K weight in the prompt (GEMM) order (kernels/q4k_gemm.h),
 * from the file layout, or from the repacked groups when the rank keeps only those. (Q4_0 has
 * one order for every token, kernels/q40_gemm.h: mm_rows.) */
static void mm_rows_gemm(const mm_job *j, int k, int64_t r0, int64_t nr, int t0, int n_tok)
{
    const tsr_weight *w = j->w[k];
    const uint8_t *xq = (const uint8_t *)j->xq[k] + (size_t)t0 * j->xq_stride[k];
    float *yk = j->y[k] + (size_t)t0 * (size_t)w->n_out;
    /* kernels/q4k_lanes.h, in the prompt order; on AVX2 long prompts run the file layout's
     * kernel (tsr_q4kl_prompt_file_layout) */
    if (w->lanes && !(w->data && tsr_q4kl_prompt_file_layout(j->lanes_isa, n_tok))) {
        tsr_q4kl_dot(j->lanes_isa, w->n_in, w->lanes, r0, nr, n_tok, xq, j->xq_stride[k], true,
                     yk + r0, (size_t)w->n_out);
        return;
    }
    const size_t blk = tsr_type_block_bytes(w->type);
    if (w->data) {
        tsr_q4k_gemm_dot(j->isa, w->n_in, nr, (const uint8_t *)w->data + (size_t)r0 * w->row_bytes,
                         w->row_bytes, blk, n_tok, xq, j->xq_stride[k], yk + r0, (size_t)w->n_out);
        return;
    }
    /* repacked: groups of TSR_REPACK_ROWS rows, super-block i of the group's rows side by
     * side (r0 is a multiple of TSR_REPACK_ROWS) */
    const size_t gb = tsr_repack_group_bytes(w->type, w->n_in);
    tsr_q4k_gemm_dot_grouped(j->isa, w->n_in, nr,
                             (const uint8_t *)w->packed + (size_t)(r0 / TSR_REPACK_ROWS) * gb,
                             TSR_REPACK_ROWS, gb, blk, blk * TSR_REPACK_ROWS, n_tok, xq,
                             j->xq_stride[k], yk + r0, (size_t)w->n_out);
}

/* The next rows to compute: weight *k, rows [*r0, *r0 + *nr); false when none is left.
 * Several tokens: fixed chunks of rows_per_chunk. One token (guided): each claim takes
 * 1/guided_div of the rows left (at least min_rows[k]: 64 KiB of weights; the rest of
 * the weight when less than that would remain), so a thread streams a few long runs of
 * rows: every claim restarts the weight stream and its prefetch, and 96-row chunks (the
 * fixed split of a 1B qkv) streamed 7-15% fewer GB/s than two halves (2 threads, 2048
 * columns, Q4_0 and Q4_K groups); guided claims matched the halves and, with the small
 * claims at the end, still even out threads that others' work slows. */
static bool mm_claim(mm_job *j, int *k, int64_t *r0, int64_t *nr)
{
    if (!j->guided) {
        int64_t c = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (c >= j->n_chunks) return false;
        int kk = 0;
        while (c >= j->chunks_per_w[kk]) c -= j->chunks_per_w[kk++];
        *k = kk;
        *r0 = c * j->rows_per_chunk;
        *nr = j->w[kk]->n_out - *r0 < j->rows_per_chunk ? j->w[kk]->n_out - *r0 : j->rows_per_chunk;
        return true;
    }
    int64_t cur = atomic_load_explicit(&j->next, memory_order_relaxed);
    for (;;) {
        if (cur >= j->total_rows) return false;
        int kk = 0;
        while (cur >= j->row_base[kk] + j->w[kk]->n_out) kk++;
        const int64_t end_w = j->row_base[kk] + j->w[kk]->n_out;
        int64_t take = (j->total_rows - cur) / j->guided_div;
        if (take < j->min_rows[kk]) take = j->min_rows[kk];
        /* a multiple of 4 rows from the weight's start (the multi-row dots, the groups), of
         * 16 for a lanes matrix (its groups) */
        const int64_t g = j->w[kk]->lanes ? TSR_Q80L_ROWS : 4;
        int64_t end = cur + (take + g - 1) / g * g;
        if (end > end_w - j->min_rows[kk]) end = end_w;
        if (atomic_compare_exchange_weak_explicit(&j->next, &cur, end, memory_order_relaxed,
                                                  memory_order_relaxed)) {
            *k = kk;
            *r0 = cur - j->row_base[kk];
            *nr = end - cur;
            return true;
        }
    }
}

static void mm_run(void *arg, int ith, int nth)
{
    mm_job *j = arg;
    (void)ith;
    (void)nth;
    int k;
    int64_t r0, nr;
    while (mm_claim(j, &k, &r0, &nr)) {
        const tsr_weight *w = j->w[k];
        if (!j->ord || w->type != TSR_TYPE_Q4_K) {
            mm_rows(j, k, r0, nr, 0, j->n_tok);
            continue;
        }
        /* Q4_K with order classes: each run of tokens of one class in its order. */
        for (int t = 0; t < j->n_tok;) {
            int e = t + 1;
            while (e < j->n_tok && (j->ord[e] != 0) == (j->ord[t] != 0)) e++;
            if (j->ord[t])
                mm_rows_gemm(j, k, r0, nr, t, e - t);
            else
                mm_rows(j, k, r0, nr, t, e - t);
            t = e;
        }
    }
}

size_t tsr_matmul_multi_scratch_bytes(const tsr_weight *const *w, int n_w, int n_tok)
{
    /* per distinct dot type: its conversion, with the tile prep if any of its weights is Q8_0 */
    size_t n_bytes = 0;
    for (int k = 0; k < n_w; k++) {
        const uint32_t vt = tsr_type_vec_dot_type(w[k]->type);
        bool seen = false, q8_0 = false, lanes = false;
        for (int i = 0; i < n_w; i++) {
            if (tsr_type_vec_dot_type(w[i]->type) != vt) continue;
            seen |= i < k;
            q8_0 |= w[i]->type == TSR_TYPE_Q8_0;
            lanes |= lanes_prep_type(w[i]->type);
        }
        if (!seen) n_bytes += conv_bytes(vt, w[k]->n_in, n_tok, q8_0, lanes);
    }
    return n_bytes;
}

void tsr_matmul_multi(tsr_pool *pool, const tsr_weight *const *w, float *const *y, int n_w,
                      const float *x, int n_tok, void *scratch)
{
    tsr_matmul_multi_ord(pool, w, y, n_w, x, n_tok, NULL, scratch);
}

void tsr_matmul_multi_ord(tsr_pool *pool, const tsr_weight *const *w, float *const *y, int n_w,
                          const float *x, int n_tok, const uint8_t *ord, void *scratch)
{
    mm_job j;
    memset(&j, 0, sizeof j);
    if (ord) { /* only tokens of the prompt class need the check per weight */
        for (int t = 0; t < n_tok && !j.ord; t++)
            if (ord[t]) j.ord = ord;
        j.isa = tsr_ggml_isa();
    }
    j.w = w;
    j.y = y;
    j.n_w = n_w;
    j.n_tok = n_tok;
    j.x = x;
    /* One conversion per distinct dot type, laid out one after another in scratch; cv_of[k]:
     * weight k's conversion (-1: F32 reads x), conv_q8[cv]: a Q8_0 weight reads it (the
     * tiles' prep has room), one in ggml's order (conv_ggml[cv]); conv_lq[cv]: a Q8_0 or
     * Q4_0 weight reads it (the lanes prep has room), one in a lanes layout (conv_lanes[cv]). */
    uint8_t *dst = scratch;
    int cv_of[4];
    bool conv_q8[4] = {false, false, false, false}, conv_ggml[4] = {false, false, false, false},
         conv_lq[4] = {false, false, false, false}, conv_lanes[4] = {false, false, false, false};
    for (int k = 0; k < n_w; k++) {
        uint32_t vt = tsr_type_vec_dot_type(w[k]->type);
        int i = 0;
        while (i < k && tsr_type_vec_dot_type(w[i]->type) != vt) i++;
        cv_of[k] = i < k ? cv_of[i] : vt == TSR_TYPE_F32 ? -1 : j.n_conv;
        if (cv_of[k] >= 0 && w[k]->type == TSR_TYPE_Q8_0) {
            conv_q8[cv_of[k]] = true;
            conv_ggml[cv_of[k]] |= !w[k]->lanes;
        }
        if (cv_of[k] >= 0 && lanes_prep_type(w[k]->type)) {
            conv_lq[cv_of[k]] = true;
            conv_lanes[cv_of[k]] |= w[k]->lanes != NULL && !w[k]->lanes_ggml;
        }
        if (i < k) {
            j.xq[k] = j.xq[i];
            j.xq_stride[k] = j.xq_stride[i];
        } else if (vt == TSR_TYPE_F32) {
            j.xq[k] = x;
            j.xq_stride[k] = (size_t)w[k]->n_in * sizeof(float);
        } else {
            j.conv_vt[j.n_conv] = vt;
            j.conv_dst[j.n_conv] = dst;
            j.conv_stride[j.n_conv] = tsr_row_bytes(vt, w[k]->n_in);
            j.xq[k] = dst;
            j.xq_stride[k] = j.conv_stride[j.n_conv];
            dst += (size_t)n_tok * j.xq_stride[k];
            j.n_conv++;
        }
    }
    /* The Q8_0 tiles' prep, after the conversions (the layout of the scratch sizes above):
     * laid out with the conversion, read by every row chunk. Several tokens only (the ISA
     * lookup stays off the decode path). */
    for (int cv = 0; cv < j.n_conv; cv++) {
        const int64_t n_in = w[0]->n_in;
        const size_t nb = conv_q8[cv] ? tsr_ggml_tile_prep_bytes(TSR_TYPE_Q8_0, n_in, n_tok) : 0;
        if (!nb) continue;
        dst = (uint8_t *)(((uintptr_t)dst + 63) & ~(uintptr_t)63); /* its 63 spare bytes */
        /* only for a matrix in ggml's order (lanes matrices take their own prep, below) */
        if (n_tok > 1 && conv_ggml[cv] &&
            tsr_ggml_tile_prep_used(TSR_TYPE_Q8_0, tsr_ggml_isa(), n_in, n_tok))
            j.conv_prep[cv] = dst;
        dst += nb;
    }
    for (int k = 0; k < n_w; k++)
        if (w[k]->type == TSR_TYPE_Q8_0 && cv_of[k] >= 0) j.prep[k] = j.conv_prep[cv_of[k]];
    /* The lanes order's prep, after those, for conversions a lanes matrix reads. */
    bool any_lanes = false;
    for (int cv = 0; cv < j.n_conv; cv++) {
        if (!conv_lq[cv]) continue;
        dst = (uint8_t *)(((uintptr_t)dst + 63) & ~(uintptr_t)63);
        if (conv_lanes[cv]) j.conv_lprep[cv] = dst;
        dst += tsr_q80l_prep_bytes(w[0]->n_in, n_tok);
    }
    for (int k = 0; k < n_w; k++)
        if (w[k]->lanes && cv_of[k] >= 0) {
            j.lprep[k] = j.conv_lprep[cv_of[k]];
            any_lanes = true;
        }
    if (any_lanes) j.lanes_isa = tsr_ggml_isa();
    /* One token: a few µs of conversion, cheaper inline than a pool run. */
    if (n_tok > 1 && j.n_conv > 0)
        tsr_pool_run(pool, mm_convert, &j);
    else if (j.n_conv > 0)
        mm_convert(&j, 0, 1);
    int nth = tsr_pool_n_threads(pool);
    int64_t total_rows = 0;
    for (int k = 0; k < n_w; k++) total_rows += w[k]->n_out;
    /* Enough chunks for load balance (others share these cores), few enough that the
     * atomic counter costs nothing; a multiple of 4 rows for the multi-row dots and the
     * repacked groups (TSR_REPACK_ROWS). */
    int64_t rpc = total_rows / ((int64_t)nth * 16);
    if (n_tok > 1) rpc = total_rows / ((int64_t)nth * 4);
    rpc = rpc < 8 ? 8 : (rpc + 3) & ~(int64_t)3;
    if (any_lanes) rpc = (rpc + TSR_Q80L_ROWS - 1) / TSR_Q80L_ROWS * TSR_Q80L_ROWS;
    j.rows_per_chunk = rpc;
    for (int k = 0; k < n_w; k++) {
        j.chunks_per_w[k] = (w[k]->n_out + rpc - 1) / rpc;
        j.n_chunks += j.chunks_per_w[k];
    }
    /* One token: guided claims (mm_claim); a single thread takes each weight whole. */
    j.guided = n_tok == 1;
    j.guided_div = nth > 1 ? 2 * nth : 1;
    j.total_rows = total_rows;
    int64_t base = 0;
    for (int k = 0; k < n_w; base += w[k]->n_out, k++) {
        j.row_base[k] = base;
        const int64_t m = (int64_t)((64u << 10) / (w[k]->row_bytes ? w[k]->row_bytes : 1));
        j.min_rows[k] = m < 8 ? 8 : (m + 3) & ~(int64_t)3;
        if (w[k]->lanes)
            j.min_rows[k] = (j.min_rows[k] + TSR_Q80L_ROWS - 1) / TSR_Q80L_ROWS * TSR_Q80L_ROWS;
    }
    atomic_store(&j.next, 0);
    tsr_pool_run(pool, mm_run, &j);
}

void tsr_matmul(tsr_pool *pool, const tsr_weight *w, const float *x, int n_tok, float *y,
                void *scratch)
{
    const tsr_weight *ws[1] = {w};
    float *ys[1] = {y};
    tsr_matmul_multi(pool, ws, ys, 1, x, n_tok, scratch);
}

void tsr_rmsnorm(float *out, const float *x, const float *weight, int n_tok, int n, float eps)
{
    /* As ggml's rms_norm: float squares summed in order in ggml_float (double), the mean
     * rounded to float, scale = 1 / sqrtf(mean + eps), then (x * scale) * w. The sum is one
     * serial chain of double adds per row (latency-bound); four rows' chains run side by side
     * (a batch of sequences, a prompt), each row's sum exactly its own. */
    int t = 0;
    for (; t + 4 <= n_tok; t += 4) {
        const float *x0 = x + (size_t)t * n, *x1 = x0 + n, *x2 = x1 + n, *x3 = x2 + n;
        double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
        for (int i = 0; i < n; i++) {
            s0 += (double)(x0[i] * x0[i]);
            s1 += (double)(x1[i] * x1[i]);
            s2 += (double)(x2[i] * x2[i]);
            s3 += (double)(x3[i] * x3[i]);
        }
        const double ss[4] = {s0, s1, s2, s3};
        for (int r = 0; r < 4; r++) {
            const float *xr = x + (size_t)(t + r) * n;
            float *o = out + (size_t)(t + r) * n;
            const float scale = 1.0f / sqrtf((float)(ss[r] / n) + eps);
            for (int i = 0; i < n; i++) o[i] = xr[i] * scale * weight[i];
        }
    }
    for (; t < n_tok; t++) {
        const float *xr = x + (size_t)t * n;
        float *o = out + (size_t)t * n;
        double ss = 0.0;
        for (int i = 0; i < n; i++) ss += (double)(xr[i] * xr[i]);
        float scale = 1.0f / sqrtf((float)(ss / n) + eps);
        for (int i = 0; i < n; i++) o[i] = xr[i] * scale * weight[i];
    }
}

void tsr_rope(float *x, const int32_t *pos, int n_tok, int n_head, int head_dim, int n_rot,
              float freq_base, float freq_scale, const float *freq_factors)
{
    for (int t = 0; t < n_tok; t++) {
        for (int i = 0; i < n_rot; i += 2) {
            /* theta as ggml computes it: theta_scale^(i/2) by repeated product would drift;
             * ggml uses powf(base, -i/n_rot) per pair. */
            float inv = powf(freq_base, -(float)i / (float)n_rot);
            float ff = freq_factors ? freq_factors[i / 2] : 1.0f;
            float theta = (float)pos[t] * freq_scale * inv / ff;
            float c = cosf(theta), s = sinf(theta);
            for (int h = 0; h < n_head; h++) {
                float *v = x + ((size_t)t * n_head + h) * head_dim + i;
                float x0 = v[0], x1 = v[1];
                v[0] = fmaf(x0, c, -(x1 * s)); /* as tsr_rope_ext */
                v[1] = fmaf(x0, s, x1 * c);
            }
        }
    }
}

void tsr_rope_ext(float *x, const int32_t *pos, int n_tok, int n_head, int head_dim, int n_rot,
                  float freq_base, float freq_scale, const float *freq_factors, int neox)
{
    const float theta_scale = powf(freq_base, -2.0f / (float)n_rot);
    const int half = n_rot / 2;
    for (int t = 0; t < n_tok; t++) {
        float theta = (float)pos[t];
        for (int i = 0; i < half; i++) {
            const float ff = freq_factors ? freq_factors[i] : 1.0f;
            const float th = freq_scale * (theta / ff);
            const float c = cosf(th), s = sinf(th);
            theta *= theta_scale;
            /* Element offsets of the pair: (i, i + n_rot/2) or (2i, 2i+1). */
            const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
            for (int h = 0; h < n_head; h++) {
                float *v = x + ((size_t)t * n_head + h) * head_dim;
                const float x0 = v[a], x1 = v[b];
                /* as ggml's rotate_pairs compiled by GCC (contracted to FMAs; the
                 * products it fuses found by comparing bits with llama.cpp) */
                v[a] = fmaf(x0, c, -(x1 * s));
                v[b] = fmaf(x0, s, x1 * c);
            }
        }
    }
}

/* GELU (tanh approximation) of one fp16 input, rounded to fp16: one entry of ggml's table
 * (ggml_table_gelu_f16). ggml's C is compiled with GCC's default -ffp-contract=fast, so its
 * 1 + 0.044715*x*x is one FMA; written out here (this file is ISO C11: no contraction).
 * It matters for one of the 65536 entries (x = -1.99902344: -0.0455017 against -0.0454712),
 * checked against the table of the llama.cpp build that made the references. */
static float gelu_f16_entry(uint16_t h)
{
    const float x = tsr_f16_to_f32(h);
    const float y =
        0.5f * x *
        (1.0f + tanhf(0.79788456080286535587989211986876f * x * fmaf(0.044715f * x, x, 1.0f)));
    return tsr_f16_to_f32(tsr_f32_to_f16(y));
}

static float gelu_table[1 << 16];
static pthread_once_t gelu_once = PTHREAD_ONCE_INIT;
static void gelu_table_init(void)
{
    for (uint32_t i = 0; i < (1u << 16); i++) gelu_table[i] = gelu_f16_entry((uint16_t)i);
}

#if defined(__x86_64__)
/* tsr_geglu's loop 8 at a time (AVX2 + F16C): the table index by vcvtps2ph (round to nearest
 * even, overflow to inf, fp16 subnormals: tsr_f32_to_f16's; a NaN gets its sign | 0x7e00 as
 * there, not vcvtps2ph's payload), the entries by one gather, the +-10 cut-offs by blends,
 * then the same product: the scalar loop's bits. Gemma-3's decode ran the scalar loop on the
 * caller's thread, ~1.7 % of its step. */
__attribute__((target("avx2,fma,f16c"))) static int64_t geglu_avx2(float *gate, const float *up,
                                                                   int64_t n)
{
    const __m256 lo = _mm256_set1_ps(-10.0f), hi = _mm256_set1_ps(10.0f);
    const __m256i qnan = _mm256_set1_epi32(0x7e00), sgn = _mm256_set1_epi32(0x8000);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        __m256i idx = _mm256_cvtepu16_epi32(
            _mm256_cvtps_ph(g, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const __m256i nan_idx = _mm256_or_si256(
            qnan, _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(g), 16), sgn));
        idx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(idx),
                                                   _mm256_castsi256_ps(nan_idx),
                                                   _mm256_cmp_ps(g, g, _CMP_UNORD_Q)));
        __m256 y = _mm256_i32gather_ps(gelu_table, idx, 4);
        y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(g, lo, _CMP_LE_OQ));
        y = _mm256_blendv_ps(y, g, _mm256_cmp_ps(g, hi, _CMP_GE_OQ));
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(y, _mm256_loadu_ps(up + i)));
    }
    return i;
}
#endif

void tsr_geglu(float *gate, const float *up, int64_t n)
{
    pthread_once(&gelu_once, gelu_table_init);
    int64_t i0 = 0;
#if defined(__x86_64__)
    if (n >= 8 && tsr_ggml_isa() >= TSR_GGML_AVX2) i0 = geglu_avx2(gate, up, n);
#endif
    for (int64_t i = i0; i < n; i++) {
        const float g = gate[i];
        float y;
        if (g <= -10.0f)
            y = 0.0f;
        else if (g >= 10.0f)
            y = g;
        else
            y = gelu_table[tsr_f32_to_f16(g)];
        gate[i] = y * up[i];
    }
}

void tsr_swiglu(float *gate, const float *up, int64_t n)
{
    /* ggml's order (kernels/dot_ggml.h): its vector expf on whole 16s, libm on the rest */
    tsr_ggml_swiglu(tsr_ggml_isa(), gate, up, n);
}

void tsr_softmax(float *x, int n)
{
    float mx = -INFINITY;
    for (int i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    float inv = 1.0f / sum;
    for (int i = 0; i < n; i++) x[i] *= inv;
}
