/*
 * plan.c — the partition planner (see plan.h for the contract).
 *
 * How a layout is decided, and why:
 *
 *   - Tensor slices depend on tp alone. Query heads split evenly and contiguously (whole
 *     heads: attention never crosses a head). KV heads split the same way when
 *     tp <= n_head_kv; when tp > n_head_kv each rank keeps the one KV head its query heads
 *     use, replicated on tp / n_head_kv ranks (vLLM's scheme), so no rank ever needs a
 *     neighbour's K or V. attn_output and ffn_down are cut by input columns, and a column
 *     cut inside a quantization block would split one scale over two ranks, so those cuts
 *     must fall on block boundaries; row cuts (q/k/v/gate/up/output) never need to.
 *   - n_ff is cut into whole blocks of ffn_down, as evenly as possible (pieces differ by at
 *     most one block), so a Q8_0 n_ff of 96 = 3 blocks gives tp 2 the pieces 64 + 32.
 *   - Any tp that breaks one of these rules is refused, and the message lists the tp
 *     values that pass all of them, since that is what the operator needs next.
 *   - Layers: stage cost is the weight bytes read per token (n × layer bytes, plus the
 *     embedding row on stage 0 and the output head on the last stage, which for small
 *     models is worth several layers). The cost of every stage grows by the same amount
 *     per layer, so handing out layers one at a time to the currently cheapest stage
 *     (after giving every stage one) minimizes the maximum stage cost exactly, and also the
 *     sum of squared costs (a separable convex objective), i.e. the most even of the
 *     optimal splits. Ties go to the earlier stage. A memory budget only caps how many
 *     layers a stage can take; the same greedy stays exact under caps.
 *   - Memory per rank = its weight bytes + n_ctx × its KV bytes per token. The smallest
 *     feasible per-rank peak over all splits is found by bisection on the peak (a peak X
 *     is feasible iff the per-stage layer caps under X sum to at least n_layer), so a
 *     refusal can say exactly how much a rank would need.
 *
 *   - GPU ranks (dev_n_batch > 0): memory is what a rank allocates on its device
 *     (worker/gpu.c, kernels/cuda): stage 0 uploads the whole embedding table (the CPU
 *     reads one row per token), the KV pool holds whole 16-position blocks, and the step's
 *     buffers (activations, matmul scratch, the logits buffers of the leader and of the last
 *     stage's tp rank 0) come on top; they do not grow with layers, so the bisection and the
 *     layer caps stay exact. A refusal also names the largest context that would fit.
 *
 * Approximation (documented in the table too): the model only gives the mean bytes of a
 * whole layer, not per tensor. A rank's share of a layer is estimated from the tensor
 * shapes and nominal types (its q rows, its k/v heads, its attn_output columns, its
 * gate/up rows and ffn_down columns, plus the replicated norms) relative to the whole
 * layer computed the same way, and that fraction is applied to n_bytes_layer. Replicated
 * KV heads are counted on every rank that holds them.
 */
#include "shard/plan.h"

#include "kernels/quant.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Sanity bound: far above any real model, low enough that the O(n_layer × pp) greedy and
 * the bisection stay trivially cheap. */
#define PLAN_MAX_LAYERS 65536

#define MIB (1024.0 * 1024.0)

/* What is known about one tensor slice t (0 <= t < tp): identical on every stage. */
typedef struct {
    int32_t head_begin, head_end, kv_head_begin, kv_head_end;
    int32_t ff_begin, ff_end, vocab_begin, vocab_end;
    double w_layer;     /* weight bytes of one layer held by this slice */
    uint64_t kv_layer;  /* KV bytes per token per layer held by this slice */
    uint64_t out_share; /* bytes of the output head held (last stage only) */
} slice_info;

typedef struct {
    const tsr_plan_model *m;
    int32_t tp;
    int32_t n_ctx;
    slice_info s[TSR_PLAN_MAX_RANKS];
} plan_ctx;

static void set_err(char *err, size_t len, const char *fmt, ...)
{
    if (!err || len == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, len, fmt, ap);
    va_end(ap);
}

/* Bytes of n elements of `type`, fractional (the planner only estimates shares). */
static double type_bytes(uint32_t type, double n)
{
    return n * (double)tsr_type_block_bytes(type) / (double)tsr_type_block_elems(type);
}

/* ---- tensor slices (depend on tp only) ---- */

/* Checks every tp-dependent rule; on failure writes the reason (without the list of valid
 * tp values) into err. */
static int check_tp(const tsr_plan_model *m, int32_t tp, char *err, size_t len)
{
    if (m->n_head % tp != 0) {
        set_err(err, len, "n_head %d is not divisible by tp %d", m->n_head, tp);
        return -1;
    }
    if (tp <= m->n_head_kv && m->n_head_kv % tp != 0) {
        set_err(err, len, "n_head_kv %d is not divisible by tp %d (each rank needs whole KV heads)",
                m->n_head_kv, tp);
        return -1;
    }
    if (tp > m->n_head_kv && tp % m->n_head_kv != 0) {
        set_err(err, len,
                "tp %d is more than n_head_kv %d but not a multiple of it (each KV head is "
                "replicated on tp / n_head_kv ranks)",
                tp, m->n_head_kv);
        return -1;
    }
    const int32_t hpr = m->n_head / tp;
    const int64_t cols = (int64_t)hpr * m->head_dim;
    const int64_t blk_o = tsr_type_block_elems(m->type_attn_output);
    if (cols % blk_o != 0) {
        set_err(err, len,
                "attn_output is %s (blocks of %" PRId64 " values): a tp %d split gives each "
                "rank %d head%s × %d = %" PRId64 " columns, which cuts blocks",
                tsr_type_name(m->type_attn_output), blk_o, tp, hpr, hpr == 1 ? "" : "s",
                m->head_dim, cols);
        return -1;
    }
    const int64_t blk_d = tsr_type_block_elems(m->type_ffn_down);
    const int64_t nb = m->n_ff / blk_d;
    if (nb < tp) {
        set_err(err, len,
                "n_ff %d in %s is %" PRId64 " block%s of %" PRId64 ": cannot give %d ranks a "
                "block each",
                m->n_ff, tsr_type_name(m->type_ffn_down), nb, nb == 1 ? "" : "s", blk_d, tp);
        return -1;
    }
    if (m->n_vocab < tp) {
        set_err(err, len, "n_vocab %d is smaller than tp %d: a rank would get no output rows",
                m->n_vocab, tp);
        return -1;
    }
    return 0;
}

/* "1, 2, 4 or 8": every tp that passes check_tp and fits TSR_PLAN_MAX_RANKS with pp. */
static void valid_tp_list(const tsr_plan_model *m, int32_t pp, char *buf, size_t cap)
{
    int32_t ok[TSR_PLAN_MAX_RANKS];
    int n = 0;
    for (int32_t t = 1; t <= m->n_head && t <= TSR_PLAN_MAX_RANKS / pp; t++)
        if (check_tp(m, t, NULL, 0) == 0) ok[n++] = t;
    size_t off = 0;
    buf[0] = '\0';
    for (int i = 0; i < n && off < cap; i++) {
        const char *sep = i == 0 ? "" : (i == n - 1 ? " or " : ", ");
        int w = snprintf(buf + off, cap - off, "%s%d", sep, ok[i]);
        if (w < 0) break;
        off += (size_t)w;
    }
}

/* Fill the per-slice ranges and byte shares. check_tp(tp) must have passed. */
static int make_slices(plan_ctx *c, char *err, size_t len)
{
    const tsr_plan_model *m = c->m;
    const int32_t tp = c->tp;
    const int32_t hpr = m->n_head / tp;
    const int32_t group = m->n_head / m->n_head_kv; /* query heads per KV head */
    const int64_t blk_d = tsr_type_block_elems(m->type_ffn_down);
    const int64_t nb = m->n_ff / blk_d;
    const double e = m->n_embd, hd = m->head_dim;

    /* One whole layer, estimated the same way as the slices (see the file comment). */
    const double norms = 2.0 * type_bytes(TSR_TYPE_F32, e);
    const double whole = type_bytes(m->type_attn_q, e * m->n_head * hd) +
                         type_bytes(m->type_attn_k, e * m->n_head_kv * hd) +
                         type_bytes(m->type_attn_v, e * m->n_head_kv * hd) +
                         type_bytes(m->type_attn_output, e * m->n_head * hd) +
                         type_bytes(m->type_ffn_gate, e * m->n_ff) +
                         type_bytes(m->type_ffn_up, e * m->n_ff) +
                         type_bytes(m->type_ffn_down, e * m->n_ff) + norms;
    const uint64_t kv_layer_model = m->n_bytes_kv_per_token_layer
                                        ? m->n_bytes_kv_per_token_layer
                                        : 2u * (uint64_t)m->n_head_kv * (uint64_t)m->head_dim * 4u;

    int64_t blk_at = 0;
    int32_t vocab_at = 0;
    for (int32_t t = 0; t < tp; t++) {
        slice_info *s = &c->s[t];
        s->head_begin = t * hpr;
        s->head_end = (t + 1) * hpr;
        if (tp <= m->n_head_kv) {
            const int32_t kpr = m->n_head_kv / tp;
            s->kv_head_begin = t * kpr;
            s->kv_head_end = (t + 1) * kpr;
        } else {
            s->kv_head_begin = s->head_begin / group;
            s->kv_head_end = s->kv_head_begin + 1;
        }
        /* Every query head of the slice must use a KV head the slice holds; the rules in
         * check_tp guarantee it, this catches a broken rule rather than a bad input. */
        for (int32_t h = s->head_begin; h < s->head_end; h++) {
            const int32_t kv = h / group;
            if (kv < s->kv_head_begin || kv >= s->kv_head_end) {
                set_err(err, len,
                        "internal: tp %d slice %d holds KV heads %d-%d but query head %d uses "
                        "KV head %d",
                        tp, t, s->kv_head_begin, s->kv_head_end - 1, h, kv);
                return -1;
            }
        }
        /* n_ff: whole ffn_down blocks, the first nb % tp slices one block more. */
        const int64_t nbt = nb / tp + (t < nb % tp ? 1 : 0);
        s->ff_begin = (int32_t)(blk_at * blk_d);
        blk_at += nbt;
        s->ff_end = (int32_t)(blk_at * blk_d);
        /* Vocabulary rows: whole rows, no alignment needed. */
        const int32_t vt = m->n_vocab / tp + (t < m->n_vocab % tp ? 1 : 0);
        s->vocab_begin = vocab_at;
        vocab_at += vt;
        s->vocab_end = vocab_at;

        const double hq = s->head_end - s->head_begin;
        const double hkv = s->kv_head_end - s->kv_head_begin;
        const double ff = s->ff_end - s->ff_begin;
        const double part =
            type_bytes(m->type_attn_q, e * hq * hd) + type_bytes(m->type_attn_k, e * hkv * hd) +
            type_bytes(m->type_attn_v, e * hkv * hd) +
            type_bytes(m->type_attn_output, e * hq * hd) + type_bytes(m->type_ffn_gate, e * ff) +
            type_bytes(m->type_ffn_up, e * ff) + type_bytes(m->type_ffn_down, e * ff) + norms;
        s->w_layer = (double)m->n_bytes_layer * part / whole;
        s->kv_layer =
            kv_layer_model * (uint64_t)(s->kv_head_end - s->kv_head_begin) / (uint64_t)m->n_head_kv;
        /* floor(n_bytes_output × rows / n_vocab) without overflowing 64 bits. */
        const uint64_t rows = (uint64_t)(s->vocab_end - s->vocab_begin), nv = (uint64_t)m->n_vocab;
        s->out_share = m->n_bytes_output / nv * rows + m->n_bytes_output % nv * rows / nv;
    }
    if (blk_at != nb || vocab_at != m->n_vocab) {
        set_err(err, len, "internal: n_ff or vocabulary split does not tile");
        return -1;
    }
    return 0;
}

/* ---- bytes of one rank ---- */

static uint64_t rank_weights(const plan_ctx *c, int32_t t, int32_t n_layers, int first, int last)
{
    const tsr_plan_model *m = c->m;
    uint64_t w = (uint64_t)llround((double)n_layers * c->s[t].w_layer);
    const bool dev = m->dev_n_batch > 0;
    if (first) w += dev ? m->dev_n_bytes_embd : m->n_bytes_embd_row;
    /* a GPU rank holding the tied table whole (tp 1, pp 1) uploads it once */
    if (last && !(dev && first && m->dev_embd_tied && c->tp == 1)) w += c->s[t].out_share;
    return w;
}

static uint64_t max_u64(uint64_t a, uint64_t b)
{
    return a > b ? a : b;
}

/* Bytes of an F16 weight tile of the cuBLAS path for an n_out × n_in matrix of type (0 for
 * F32 / F16 weights, which cuBLAS reads directly); kernels/cuda TSR_CUDA_TILE_BYTES (64 MiB)
 * bounds it. */
static uint64_t dev_tile(uint32_t type, uint64_t n_out, uint64_t n_in)
{
    const uint64_t cap = (uint64_t)64 << 20;
    if (type == TSR_TYPE_F32 || type == TSR_TYPE_F16 || n_in == 0) return 0;
    uint64_t rows = cap / (2u * n_in);
    if (rows > n_out) rows = n_out;
    if (rows < 1) rows = 1;
    return 2u * rows * n_in;
}

/* tsr_plan_device_buffer_bytes for slice s of a stage (first / last). */
static uint64_t dev_buffers(const tsr_plan_model *m, int32_t tp, int32_t t, const slice_info *s,
                            int first, int last, int32_t n_ctx)
{
    if (m->dev_n_batch <= 0) return 0;
    const uint64_t nb = (uint64_t)m->dev_n_batch, E = (uint64_t)m->n_embd;
    const uint64_t hd = (uint64_t)m->head_dim, V = (uint64_t)m->n_vocab;
    const uint64_t qd = (uint64_t)(s->head_end - s->head_begin) * hd;
    const uint64_t kvd = (uint64_t)(s->kv_head_end - s->kv_head_begin) * hd;
    const uint64_t ff = (uint64_t)(s->ff_end - s->ff_begin);
    const uint64_t vl = last ? (uint64_t)(s->vocab_end - s->vocab_begin) : 1u; /* >= 1 float */
    /* the step's activations (gpu.c tsr_gpu_ctx_new: x, xb, xb2, q, k, v, att, hb, hb2,
     * head_in, logits) */
    uint64_t n = 4u * nb * (4u * E + max_u64(qd, E) + 2u * qd + 2u * kvd + 2u * ff + vl);
    /* step descriptor: token, position, sequence, row, want per token + block tables */
    n += 4u * nb * (5u + (uint64_t)(n_ctx + 15) / 16u + 1u);
    /* matmul scratch: activations in the dot type (<= 292 bytes per 256 values, Q8_K), the
     * F16 activations and the F16 weight tile of the cuBLAS path */
    const uint64_t max_in = max_u64(max_u64(E, qd), ff);
    n += nb * ((max_in + 255u) / 256u) * 292u + 2u * nb * max_in;
    uint64_t tile = max_u64(dev_tile(m->type_attn_q, qd, E), dev_tile(m->type_attn_k, kvd, E));
    tile = max_u64(tile, dev_tile(m->type_attn_v, kvd, E));
    tile = max_u64(tile, dev_tile(m->type_attn_output, E, qd));
    tile = max_u64(tile, dev_tile(m->type_ffn_gate, ff, E));
    tile = max_u64(tile, dev_tile(m->type_ffn_up, ff, E));
    tile = max_u64(tile, dev_tile(m->type_ffn_down, E, ff));
    if (last) tile = max_u64(tile, dev_tile(m->type_output, vl, E));
    n += tile;
    /* split attention states: fewer than 2 x 256 (token, head, split) triples of 2 + hd */
    n += 4u * (2u + hd) * 512u;
    /* logits: the leader receives [n_batch][n_vocab] from the last stage (pp > 1); tp rank 0
     * of the last stage gathers the slices (tp > 1): the other ranks' parts and the rows */
    if (t == 0 && first && !last) n += 4u * nb * V;
    if (t == 0 && last && tp > 1) n += 4u * nb * V + 4u * nb * (V - vl);
    return n;
}

static uint64_t rank_kv(const plan_ctx *c, int32_t t, int32_t n_layers)
{
    return c->s[t].kv_layer * (uint64_t)n_layers;
}

static uint64_t rank_mem(const plan_ctx *c, int32_t t, int32_t n_layers, int first, int last)
{
    return rank_weights(c, t, n_layers, first, last) +
           (uint64_t)c->n_ctx * rank_kv(c, t, n_layers) +
           dev_buffers(c->m, c->tp, t, &c->s[t], first, last, c->n_ctx);
}

/* Peak memory over the tp ranks of a stage with n layers. */
static uint64_t stage_mem(const plan_ctx *c, int32_t n, int first, int last)
{
    uint64_t peak = 0;
    for (int32_t t = 0; t < c->tp; t++) {
        const uint64_t v = rank_mem(c, t, n, first, last);
        if (v > peak) peak = v;
    }
    return peak;
}

/* Most layers (0..n_layer) a stage can take with its peak <= x; stage_mem grows with n. */
static int32_t stage_cap(const plan_ctx *c, uint64_t x, int first, int last)
{
    int32_t lo = 0, hi = c->m->n_layer; /* answer in [lo-1, hi] once lo is checked */
    if (stage_mem(c, 0, first, last) > x) return -1;
    while (lo < hi) {
        const int32_t mid = lo + (hi - lo + 1) / 2;
        if (stage_mem(c, mid, first, last) <= x)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

static int fits(const plan_ctx *c, int32_t pp, uint64_t x)
{
    int64_t total = 0;
    for (int32_t s = 0; s < pp; s++) {
        const int32_t cap = stage_cap(c, x, s == 0, s == pp - 1);
        if (cap < 1) return 0;
        total += cap;
    }
    return total >= c->m->n_layer;
}

/* Smallest per-rank peak (weights + KV) any split of the layers over pp stages achieves. */
static uint64_t min_peak(const plan_ctx *c, int32_t pp)
{
    uint64_t lo = 0, hi = 0;
    for (int32_t s = 0; s < pp; s++) {
        const uint64_t v = stage_mem(c, c->m->n_layer, s == 0, s == pp - 1);
        if (v > hi) hi = v;
    }
    /* hi is feasible (every stage could take all layers); bisect to the smallest. */
    while (lo < hi) {
        const uint64_t mid = lo + (hi - lo) / 2;
        if (fits(c, pp, mid))
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* Stage cost for balancing: weight bytes read per token by the whole stage. */
static uint64_t stage_cost(const tsr_plan_model *m, int32_t n, int first, int last)
{
    uint64_t v = (uint64_t)n * m->n_bytes_layer;
    if (first) v += m->n_bytes_embd_row;
    if (last) v += m->n_bytes_output;
    return v;
}

/* Balanced split into counts[pp] (see the file comment); caps[s] bounds stage s. */
static void balance(const tsr_plan_model *m, int32_t pp, const int32_t *caps, int32_t *counts)
{
    for (int32_t s = 0; s < pp; s++) counts[s] = 1;
    for (int32_t left = m->n_layer - pp; left > 0; left--) {
        int32_t best = -1;
        uint64_t best_cost = 0;
        for (int32_t s = 0; s < pp; s++) {
            if (counts[s] >= caps[s]) continue;
            const uint64_t v = stage_cost(m, counts[s] + 1, s == 0, s == pp - 1);
            if (best < 0 || v < best_cost) {
                best = s;
                best_cost = v;
            }
        }
        counts[best]++; /* the caller checked that the caps leave room for every layer */
    }
}

/* ---- the --layers override ---- */

static int parse_num(const char *p, const char **end, int32_t *out)
{
    if (*p < '0' || *p > '9') return -1;
    int64_t v = 0;
    while (*p >= '0' && *p <= '9') {
        v = v * 10 + (*p - '0');
        if (v > INT32_MAX) return -1;
        p++;
    }
    *out = (int32_t)v;
    *end = p;
    return 0;
}

static void layer_list(char *buf, size_t cap, int32_t a, int32_t b)
{
    if (a == b)
        snprintf(buf, cap, "layer %d is", a);
    else
        snprintf(buf, cap, "layers %d-%d are", a, b);
}

/* Parse "0-7,8,9-15" into pp stage counts; every rule violation is an error quoting the
 * string. Spaces around numbers and separators are allowed. */
static int parse_layers(const char *str, int32_t n_layer, int32_t pp, int32_t *counts, char *err,
                        size_t len)
{
    int32_t begin[TSR_PLAN_MAX_RANKS], end[TSR_PLAN_MAX_RANKS]; /* inclusive */
    int32_t n = 0;
    const char *p = str;
    for (;;) {
        while (*p == ' ') p++;
        const char *item = p;
        int32_t a, b;
        const char *q;
        int bad = parse_num(p, &q, &a);
        if (!bad) {
            p = q;
            while (*p == ' ') p++;
            if (*p == '-') {
                p++;
                while (*p == ' ') p++;
                bad = parse_num(p, &q, &b);
                if (!bad) p = q;
            } else {
                b = a;
            }
            while (*p == ' ') p++;
        }
        if (bad || (*p != ',' && *p != '\0')) {
            int ilen = 0;
            while (item[ilen] && item[ilen] != ',') ilen++;
            if (ilen == 0)
                set_err(err, len, "--layers '%s': empty item (expected N or N-M per stage)", str);
            else
                set_err(err, len,
                        "--layers '%s': '%.*s' is not a layer range (expected N or N-M, "
                        "e.g. 0-7)",
                        str, ilen, item);
            return -1;
        }
        if (n < TSR_PLAN_MAX_RANKS) {
            begin[n] = a;
            end[n] = b;
        }
        n++;
        if (*p == '\0') break;
        p++; /* ',' */
    }
    if (n != pp) {
        set_err(err, len, "--layers '%s': %d range%s for pp %d; give exactly one range per stage",
                str, n, n == 1 ? "" : "s", pp);
        return -1;
    }
    /* Each range on its own first, then their order, then gaps and overlaps, so the
     * message names the first real cause rather than a consequence of it. */
    for (int32_t i = 0; i < n; i++) {
        if (end[i] < begin[i]) {
            set_err(err, len, "--layers '%s': range %d-%d is empty (it ends before it begins)", str,
                    begin[i], end[i]);
            return -1;
        }
        if (end[i] >= n_layer) {
            set_err(err, len,
                    "--layers '%s': layer %d is out of range (the model has %d layers: 0-%d)", str,
                    end[i], n_layer, n_layer - 1);
            return -1;
        }
    }
    for (int32_t i = 1; i < n; i++) {
        if (begin[i] < begin[i - 1]) {
            set_err(err, len,
                    "--layers '%s': ranges are out of order (%d-%d comes after %d-%d); list "
                    "them from stage 0 to stage %d",
                    str, begin[i], end[i], begin[i - 1], end[i - 1], pp - 1);
            return -1;
        }
    }
    int32_t next = 0; /* first layer not yet assigned */
    for (int32_t i = 0; i < n; i++) {
        if (begin[i] > next) {
            char what[64];
            layer_list(what, sizeof what, next, begin[i] - 1);
            set_err(err, len, "--layers '%s': %s not assigned", str, what);
            return -1;
        }
        if (begin[i] < next) {
            set_err(err, len, "--layers '%s': layer %d is assigned twice", str, begin[i]);
            return -1;
        }
        counts[i] = end[i] - begin[i] + 1;
        next = end[i] + 1;
    }
    if (next < n_layer) {
        char what[64];
        layer_list(what, sizeof what, next, n_layer - 1);
        set_err(err, len, "--layers '%s': %s not assigned", str, what);
        return -1;
    }
    return 0;
}

/* ---- input checks ---- */

static int check_model(const tsr_plan_model *m, char *err, size_t len)
{
    if (m->n_layer < 1 || m->n_layer > PLAN_MAX_LAYERS || m->n_embd < 1 || m->n_head < 1 ||
        m->n_head_kv < 1 || m->head_dim < 1 || m->n_ff < 1 || m->n_vocab < 1) {
        set_err(err, len,
                "model hyperparameters out of range (n_layer %d, n_embd %d, n_head %d, "
                "n_head_kv %d, head_dim %d, n_ff %d, n_vocab %d)",
                m->n_layer, m->n_embd, m->n_head, m->n_head_kv, m->head_dim, m->n_ff, m->n_vocab);
        return -1;
    }
    if (m->n_head_kv > m->n_head || m->n_head % m->n_head_kv != 0) {
        set_err(err, len, "n_head %d is not a multiple of n_head_kv %d", m->n_head, m->n_head_kv);
        return -1;
    }
    const struct {
        const char *name;
        uint32_t type;
    } types[] = {
        {"attn_q", m->type_attn_q},         {"attn_k", m->type_attn_k},
        {"attn_v", m->type_attn_v},         {"attn_output", m->type_attn_output},
        {"ffn_gate", m->type_ffn_gate},     {"ffn_up", m->type_ffn_up},
        {"ffn_down", m->type_ffn_down},     {"output", m->type_output},
        {"token_embd", m->type_token_embd},
    };
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        if (!tsr_type_supported(types[i].type)) {
            set_err(err, len, "%s has type %s (id %u), which is not supported", types[i].name,
                    tsr_type_name(types[i].type), types[i].type);
            return -1;
        }
    }
    /* The unsplit tensors must already consist of whole blocks, or no tp can work. */
    const int64_t cols_o = (int64_t)m->n_head * m->head_dim;
    if (cols_o % tsr_type_block_elems(m->type_attn_output) != 0) {
        set_err(err, len, "attn_output has %" PRId64 " columns, not a whole number of %s blocks",
                cols_o, tsr_type_name(m->type_attn_output));
        return -1;
    }
    if (m->n_ff % tsr_type_block_elems(m->type_ffn_down) != 0) {
        set_err(err, len, "ffn_down has %d columns, not a whole number of %s blocks", m->n_ff,
                tsr_type_name(m->type_ffn_down));
        return -1;
    }
    return 0;
}

/* ---- entry points ---- */

int tsr_plan_make(const tsr_plan_model *m, int32_t tp, int32_t pp, const char *layers,
                  uint64_t mem_budget_bytes, int32_t n_ctx, tsr_plan *out, char *err,
                  size_t err_len)
{
    if (err && err_len) err[0] = '\0';
    if (!m || !out) {
        set_err(err, err_len, "tsr_plan_make: model and output are required");
        return -1;
    }
    memset(out, 0, sizeof *out);
    if (tp < 1 || pp < 1) {
        set_err(err, err_len, "tp %d and pp %d must both be at least 1", tp, pp);
        return -1;
    }
    if ((int64_t)tp * pp > TSR_PLAN_MAX_RANKS) {
        set_err(err, err_len, "tp %d × pp %d = %" PRId64 " ranks; at most %d are supported", tp, pp,
                (int64_t)tp * pp, TSR_PLAN_MAX_RANKS);
        return -1;
    }
    if (n_ctx < 0) {
        set_err(err, err_len, "n_ctx %d must not be negative", n_ctx);
        return -1;
    }
    if (check_model(m, err, err_len)) return -1;
    if (pp > m->n_layer) {
        set_err(err, err_len, "pp %d needs at least %d layers; the model has %d", pp, pp,
                m->n_layer);
        return -1;
    }
    char why[512];
    if (check_tp(m, tp, why, sizeof why)) {
        char list[1024];
        valid_tp_list(m, pp, list, sizeof list);
        set_err(err, err_len, "%s; use tp %s", why, list);
        return -1;
    }

    /* ~20 KiB: heap rather than stack, callers may run on small thread stacks. */
    plan_ctx *c = calloc(1, sizeof *c);
    if (!c) {
        set_err(err, err_len, "out of memory");
        return -1;
    }
    c->m = m;
    c->tp = tp;
    /* the device pool holds whole 16-position blocks */
    c->n_ctx = m->dev_n_batch > 0 ? (int32_t)(((int64_t)n_ctx + 15) / 16 * 16) : n_ctx;
    const char *what = m->dev_n_batch > 0 ? "weights + KV + device buffers" : "weights + KV";
    int rc = make_slices(c, err, err_len);
    if (rc) goto done;

    int32_t counts[TSR_PLAN_MAX_RANKS];
    if (layers) {
        rc = parse_layers(layers, m->n_layer, pp, counts, err, err_len);
        if (rc) goto done;
        if (mem_budget_bytes > 0) {
            int32_t at = 0;
            for (int32_t s = 0; s < pp; at += counts[s], s++) {
                const uint64_t need = stage_mem(c, counts[s], s == 0, s == pp - 1);
                if (need > mem_budget_bytes) {
                    set_err(err, err_len,
                            "--layers '%s': stage %d (layers %d-%d) needs %.1f MiB per rank "
                            "(%s for %d tokens); the budget is %.1f MiB",
                            layers, s, at, at + counts[s] - 1, (double)need / MIB, what, c->n_ctx,
                            (double)mem_budget_bytes / MIB);
                    rc = -1;
                    goto done;
                }
            }
        }
    } else {
        int32_t caps[TSR_PLAN_MAX_RANKS];
        for (int32_t s = 0; s < pp; s++) caps[s] = m->n_layer - (pp - 1);
        if (mem_budget_bytes > 0) {
            const uint64_t need = min_peak(c, pp);
            if (need > mem_budget_bytes) {
                /* Say which larger pp would fit at this tp, when one does. */
                char hint[256] = "use more ranks";
                for (int32_t p2 = pp + 1;
                     p2 <= m->n_layer && (int64_t)tp * p2 <= TSR_PLAN_MAX_RANKS; p2++) {
                    if (min_peak(c, p2) <= mem_budget_bytes) {
                        snprintf(hint, sizeof hint, "use more ranks (pp %d would fit at tp %d)", p2,
                                 tp);
                        break;
                    }
                }
                /* GPU ranks: the largest context (whole KV blocks) that fits this layout */
                if (m->dev_n_batch > 0 && c->n_ctx > 16) {
                    const int32_t n_ctx_asked = c->n_ctx;
                    int32_t lo = 0, hi = n_ctx_asked / 16 - 1; /* blocks */
                    while (lo < hi) {
                        const int32_t mid = lo + (hi - lo + 1) / 2;
                        c->n_ctx = mid * 16;
                        if (min_peak(c, pp) <= mem_budget_bytes)
                            lo = mid;
                        else
                            hi = mid - 1;
                    }
                    c->n_ctx = lo * 16;
                    if (lo > 0 && min_peak(c, pp) <= mem_budget_bytes) {
                        const size_t at = strlen(hint);
                        snprintf(hint + at, sizeof hint - at,
                                 ", or a context of at most %d tokens (--ctx) at tp %d × pp %d",
                                 lo * 16, tp, pp);
                    }
                    c->n_ctx = n_ctx_asked;
                }
                set_err(err, err_len,
                        "tp %d × pp %d needs at least %.1f MiB per rank (%s for %d tokens); the "
                        "budget is %.1f MiB; %s",
                        tp, pp, (double)need / MIB, what, c->n_ctx, (double)mem_budget_bytes / MIB,
                        hint);
                rc = -1;
                goto done;
            }
            for (int32_t s = 0; s < pp; s++) {
                const int32_t cap = stage_cap(c, mem_budget_bytes, s == 0, s == pp - 1);
                if (cap < caps[s]) caps[s] = cap;
            }
        }
        balance(m, pp, caps, counts);
    }

    out->tp = tp;
    out->pp = pp;
    out->n_ranks = tp * pp;
    int32_t at = 0;
    for (int32_t s = 0; s < pp; s++) {
        const int first = s == 0, last = s == pp - 1;
        for (int32_t t = 0; t < tp; t++) {
            const slice_info *si = &c->s[t];
            tsr_plan_rank *r = &out->ranks[s * tp + t];
            r->rank = s * tp + t;
            r->stage = s;
            r->tp_rank = t;
            r->layer_begin = at;
            r->layer_end = at + counts[s];
            r->head_begin = si->head_begin;
            r->head_end = si->head_end;
            r->kv_head_begin = si->kv_head_begin;
            r->kv_head_end = si->kv_head_end;
            r->ff_begin = si->ff_begin;
            r->ff_end = si->ff_end;
            r->vocab_begin = last ? si->vocab_begin : 0;
            r->vocab_end = last ? si->vocab_end : 0;
            r->n_bytes_weights = rank_weights(c, t, counts[s], first, last);
            r->n_bytes_kv_per_token = rank_kv(c, t, counts[s]);
        }
        at += counts[s];
    }
done:
    free(c);
    if (rc) memset(out, 0, sizeof *out);
    return rc;
}

uint64_t tsr_plan_device_buffer_bytes(const tsr_plan_model *m, int32_t tp, int32_t pp,
                                      const tsr_plan_rank *r, int32_t n_ctx)
{
    if (!m || !r || m->dev_n_batch <= 0 || tp < 1 || pp < 1) return 0;
    const slice_info s = {.head_begin = r->head_begin,
                          .head_end = r->head_end,
                          .kv_head_begin = r->kv_head_begin,
                          .kv_head_end = r->kv_head_end,
                          .ff_begin = r->ff_begin,
                          .ff_end = r->ff_end,
                          .vocab_begin = r->vocab_begin,
                          .vocab_end = r->vocab_end};
    const int32_t n = (int32_t)(((int64_t)(n_ctx > 0 ? n_ctx : 0) + 15) / 16 * 16);
    return dev_buffers(m, tp, r->tp_rank, &s, r->stage == 0, r->stage == pp - 1, n);
}

/* Appends with snprintf semantics: keeps counting when the buffer is full. */
typedef struct {
    char *buf;
    size_t cap, n;
} appender;

static void app(appender *a, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *dst = a->n < a->cap ? a->buf + a->n : NULL;
    const size_t room = a->n < a->cap ? a->cap - a->n : 0;
    const int w = vsnprintf(dst, room, fmt, ap);
    va_end(ap);
    if (w > 0) a->n += (size_t)w;
}

/* "3-7" for the half-open [3, 8), "-" for an empty range. */
static const char *range_str(char *buf, size_t cap, int32_t b, int32_t e)
{
    if (e <= b)
        snprintf(buf, cap, "-");
    else if (e == b + 1)
        snprintf(buf, cap, "%d", b);
    else
        snprintf(buf, cap, "%d-%d", b, e - 1);
    return buf;
}

int tsr_plan_format(const tsr_plan *p, const tsr_plan_model *m, char *buf, size_t cap)
{
    appender a = {buf, cap, 0};
    if (buf && cap) buf[0] = '\0';
    if (!p) return 0;
    app(&a, "plan: tp %d × pp %d = %d ranks", p->tp, p->pp, p->n_ranks);
    if (m)
        app(&a, "; %d layers, %d heads (%d KV), n_ff %d, vocab %d", m->n_layer, m->n_head,
            m->n_head_kv, m->n_ff, m->n_vocab);
    app(&a, "\nranges are inclusive; weights are estimated shares of each layer\n");
    app(&a, "%4s %5s %5s %-11s %-11s %-11s %-13s %-13s %11s %13s\n", "rank", "stage", "slice",
        "layers", "heads", "kv heads", "ff", "vocab", "weights MiB", "KV KiB/token");
    for (int32_t i = 0; i < p->n_ranks && i < TSR_PLAN_MAX_RANKS; i++) {
        const tsr_plan_rank *r = &p->ranks[i];
        char l[32], h[32], k[32], f[32], v[32];
        app(&a, "%4d %5d %5d %-11s %-11s %-11s %-13s %-13s %11.2f %13.2f\n", r->rank, r->stage,
            r->tp_rank, range_str(l, sizeof l, r->layer_begin, r->layer_end),
            range_str(h, sizeof h, r->head_begin, r->head_end),
            range_str(k, sizeof k, r->kv_head_begin, r->kv_head_end),
            range_str(f, sizeof f, r->ff_begin, r->ff_end),
            range_str(v, sizeof v, r->vocab_begin, r->vocab_end), (double)r->n_bytes_weights / MIB,
            (double)r->n_bytes_kv_per_token / 1024.0);
    }
    return (int)a.n;
}
