/*
 * test_plan.c — the partition planner (shard/plan.h).
 *
 * What is checked and why:
 *   - every layout of a stories260K-shaped model that should work does, and its ranges tile
 *     exactly (heads, KV heads, n_ff, vocabulary, layers), every query head finds its KV
 *     head on its own rank, and replicated KV heads (tp 8 > n_head_kv 4) are each held by
 *     tp / n_head_kv ranks;
 *   - layouts that cannot work are refused with the message an operator needs (exact text
 *     for the documented examples): tp not dividing n_head, pp > n_layer, a Q8_0 n_ff too
 *     small for tp, a Q4_K attn_output split that would cut blocks;
 *   - the layer split minimizes the maximum stage cost: checked against brute force over
 *     every cut for small cases, and on a 1B shape where the output head makes the last
 *     stage take fewer layers;
 *   - the --layers override: valid strings reproduce exactly, every malformed one is
 *     refused with a message quoting it;
 *   - the memory budget: the smallest feasible budget found by brute force (through
 *     overrides) is accepted and one byte less is refused; a budget that only fits with
 *     more stages is refused for pp 1 with the needed size in the message;
 *   - the table, and snprintf semantics of tsr_plan_format.
 * Failures print expected vs got.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/quant.h"
#include "shard/plan.h"

/* ---- model shapes ---- */

/* Bytes of one layer, from the shapes and types: what a loader would sum. */
static uint64_t layer_bytes(const tsr_plan_model *m)
{
    const int64_t e = m->n_embd, q = (int64_t)m->n_head * m->head_dim,
                  kv = (int64_t)m->n_head_kv * m->head_dim;
    return tsr_row_bytes(m->type_attn_q, e) * (uint64_t)q +
           tsr_row_bytes(m->type_attn_k, e) * (uint64_t)kv +
           tsr_row_bytes(m->type_attn_v, e) * (uint64_t)kv +
           tsr_row_bytes(m->type_attn_output, q) * (uint64_t)e +
           tsr_row_bytes(m->type_ffn_gate, e) * (uint64_t)m->n_ff +
           tsr_row_bytes(m->type_ffn_up, e) * (uint64_t)m->n_ff +
           tsr_row_bytes(m->type_ffn_down, m->n_ff) * (uint64_t)e + 2u * 4u * (uint64_t)e;
}

static tsr_plan_model make_model(int32_t n_layer, int32_t n_embd, int32_t n_head, int32_t n_head_kv,
                                 int32_t head_dim, int32_t n_ff, int32_t n_vocab, uint32_t type)
{
    tsr_plan_model m;
    memset(&m, 0, sizeof m);
    m.n_layer = n_layer;
    m.n_embd = n_embd;
    m.n_head = n_head;
    m.n_head_kv = n_head_kv;
    m.head_dim = head_dim;
    m.n_ff = n_ff;
    m.n_vocab = n_vocab;
    m.type_attn_q = m.type_attn_k = m.type_attn_v = m.type_attn_output = type;
    m.type_ffn_gate = m.type_ffn_up = m.type_ffn_down = type;
    m.type_output = m.type_token_embd = type;
    m.n_bytes_layer = layer_bytes(&m);
    m.n_bytes_output = tsr_row_bytes(type, n_embd) * (uint64_t)n_vocab;
    m.n_bytes_embd_row = tsr_row_bytes(type, n_embd);
    m.n_bytes_kv_per_token_layer = 2u * (uint64_t)n_head_kv * (uint64_t)head_dim * 4u;
    return m;
}

static tsr_plan_model stories(void)
{
    return make_model(5, 64, 8, 4, 8, 172, 512, TSR_TYPE_F32);
}

static tsr_plan_model llama_1b(void)
{
    return make_model(16, 2048, 32, 8, 64, 8192, 32000, TSR_TYPE_Q8_0);
}

/* ---- helpers ---- */

static tsr_plan plan; /* 20 KiB: static rather than on the test's stack */
static char err[1024];

static void make_ok(const tsr_plan_model *m, int32_t tp, int32_t pp, const char *layers,
                    uint64_t budget, int32_t n_ctx)
{
    err[0] = '\0';
    int rc = tsr_plan_make(m, tp, pp, layers, budget, n_ctx, &plan, err, sizeof err);
    if (rc != 0)
        fail_msg("tp %d pp %d layers %s: expected success, got %d: %s", tp, pp,
                 layers ? layers : "(auto)", rc, err);
}

/* Refused, with a non-empty message; returns it. */
static const char *make_bad(const tsr_plan_model *m, int32_t tp, int32_t pp, const char *layers,
                            uint64_t budget, int32_t n_ctx)
{
    err[0] = '\0';
    int rc = tsr_plan_make(m, tp, pp, layers, budget, n_ctx, &plan, err, sizeof err);
    if (rc >= 0)
        fail_msg("tp %d pp %d layers %s: expected refusal, got success", tp, pp,
                 layers ? layers : "(auto)");
    if (err[0] == '\0') fail_msg("tp %d pp %d: refused without a message", tp, pp);
    return err;
}

static void expect_msg(const char *expected)
{
    if (strcmp(err, expected) != 0)
        fail_msg("message:\n  expected: %s\n  got:      %s", expected, err);
}

static void expect_contains(const char *needle)
{
    if (!strstr(err, needle)) fail_msg("message should contain '%s'\n  got: %s", needle, err);
}

#define EXPECT_EQ(what, exp, got)                                                                  \
    do {                                                                                           \
        long long e_ = (long long)(exp), g_ = (long long)(got);                                    \
        if (e_ != g_) fail_msg("%s: expected %lld, got %lld", what, e_, g_);                       \
    } while (0)

/* Every structural property a valid plan must have. */
static void check_plan(const tsr_plan_model *m, const tsr_plan *p, int32_t tp, int32_t pp)
{
    char what[128];
    EXPECT_EQ("tp", tp, p->tp);
    EXPECT_EQ("pp", pp, p->pp);
    EXPECT_EQ("n_ranks", tp * pp, p->n_ranks);
    const int32_t group = m->n_head / m->n_head_kv;
    int32_t layer_at = 0;
    for (int32_t s = 0; s < pp; s++) {
        const tsr_plan_rank *r0 = &p->ranks[s * tp];
        snprintf(what, sizeof what, "stage %d layer_begin", s);
        EXPECT_EQ(what, layer_at, r0->layer_begin);
        if (r0->layer_end <= r0->layer_begin) fail_msg("stage %d has no layers", s);
        layer_at = r0->layer_end;
        int32_t head_at = 0, ff_at = 0, vocab_at = 0, kv_at = 0;
        int32_t kv_count[1024] = {0};
        for (int32_t t = 0; t < tp; t++) {
            const tsr_plan_rank *r = &p->ranks[s * tp + t];
            snprintf(what, sizeof what, "rank %d rank", s * tp + t);
            EXPECT_EQ(what, s * tp + t, r->rank);
            snprintf(what, sizeof what, "rank %d stage", r->rank);
            EXPECT_EQ(what, s, r->stage);
            snprintf(what, sizeof what, "rank %d tp_rank", r->rank);
            EXPECT_EQ(what, t, r->tp_rank);
            snprintf(what, sizeof what, "rank %d layers", r->rank);
            EXPECT_EQ(what, r0->layer_begin, r->layer_begin);
            EXPECT_EQ(what, r0->layer_end, r->layer_end);
            /* query heads: n_head / tp consecutive, tiling */
            snprintf(what, sizeof what, "rank %d head_begin", r->rank);
            EXPECT_EQ(what, head_at, r->head_begin);
            snprintf(what, sizeof what, "rank %d head count", r->rank);
            EXPECT_EQ(what, m->n_head / tp, r->head_end - r->head_begin);
            head_at = r->head_end;
            /* KV heads */
            if (tp <= m->n_head_kv) {
                snprintf(what, sizeof what, "rank %d kv_head_begin", r->rank);
                EXPECT_EQ(what, kv_at, r->kv_head_begin);
                snprintf(what, sizeof what, "rank %d kv head count", r->rank);
                EXPECT_EQ(what, m->n_head_kv / tp, r->kv_head_end - r->kv_head_begin);
                kv_at = r->kv_head_end;
            } else {
                snprintf(what, sizeof what, "rank %d kv head count (replicated)", r->rank);
                EXPECT_EQ(what, 1, r->kv_head_end - r->kv_head_begin);
                kv_count[r->kv_head_begin]++;
            }
            for (int32_t h = r->head_begin; h < r->head_end; h++) {
                if (h / group < r->kv_head_begin || h / group >= r->kv_head_end)
                    fail_msg("rank %d: query head %d uses KV head %d, rank holds %d-%d", r->rank, h,
                             h / group, r->kv_head_begin, r->kv_head_end - 1);
            }
            /* n_ff: whole ffn_down blocks, pieces within one block of each other */
            const int64_t blk = tsr_type_block_elems(m->type_ffn_down);
            snprintf(what, sizeof what, "rank %d ff_begin", r->rank);
            EXPECT_EQ(what, ff_at, r->ff_begin);
            if (r->ff_begin % blk || r->ff_end % blk || r->ff_end <= r->ff_begin)
                fail_msg("rank %d: ff %d-%d not whole %s blocks", r->rank, r->ff_begin, r->ff_end,
                         tsr_type_name(m->type_ffn_down));
            const int64_t d = (int64_t)(r->ff_end - r->ff_begin) -
                              (int64_t)(p->ranks[s * tp].ff_end - p->ranks[s * tp].ff_begin);
            if (d > 0 || d < -blk)
                fail_msg("rank %d: ff piece %d vs first piece %d: uneven by more than a block",
                         r->rank, r->ff_end - r->ff_begin,
                         p->ranks[s * tp].ff_end - p->ranks[s * tp].ff_begin);
            ff_at = r->ff_end;
            /* attn_output columns on block boundaries */
            const int64_t blk_o = tsr_type_block_elems(m->type_attn_output);
            if (((int64_t)r->head_begin * m->head_dim) % blk_o ||
                ((int64_t)r->head_end * m->head_dim) % blk_o)
                fail_msg("rank %d: attn_output columns cut %s blocks", r->rank,
                         tsr_type_name(m->type_attn_output));
            /* vocabulary: last stage only */
            if (s == pp - 1) {
                snprintf(what, sizeof what, "rank %d vocab_begin", r->rank);
                EXPECT_EQ(what, vocab_at, r->vocab_begin);
                if (r->vocab_end <= r->vocab_begin) fail_msg("rank %d: no vocab rows", r->rank);
                vocab_at = r->vocab_end;
            } else {
                snprintf(what, sizeof what, "rank %d vocab (not last stage)", r->rank);
                EXPECT_EQ(what, 0, r->vocab_begin);
                EXPECT_EQ(what, 0, r->vocab_end);
            }
            /* bytes */
            const int32_t nl = r->layer_end - r->layer_begin;
            snprintf(what, sizeof what, "rank %d kv bytes per token", r->rank);
            EXPECT_EQ(what, 2 * (r->kv_head_end - r->kv_head_begin) * m->head_dim * 4 * (int64_t)nl,
                      r->n_bytes_kv_per_token);
            if (r->n_bytes_weights == 0) fail_msg("rank %d: no weight bytes", r->rank);
        }
        snprintf(what, sizeof what, "stage %d heads covered", s);
        EXPECT_EQ(what, m->n_head, head_at);
        snprintf(what, sizeof what, "stage %d n_ff covered", s);
        EXPECT_EQ(what, m->n_ff, ff_at);
        if (s == pp - 1) {
            snprintf(what, sizeof what, "stage %d vocab covered", s);
            EXPECT_EQ(what, m->n_vocab, vocab_at);
        }
        if (tp <= m->n_head_kv) {
            snprintf(what, sizeof what, "stage %d kv heads covered", s);
            EXPECT_EQ(what, m->n_head_kv, kv_at);
        } else {
            for (int32_t k = 0; k < m->n_head_kv; k++) {
                snprintf(what, sizeof what, "stage %d: ranks holding KV head %d", s, k);
                EXPECT_EQ(what, tp / m->n_head_kv, kv_count[k]);
            }
        }
        /* Without replicated KV heads, the tp shares of a stage add up to the stage's
         * bytes (up to rounding): layers, plus the norms held by every rank, the embedding
         * row on every stage-0 rank (each rank looks the token up) and the output head
         * once on the last stage. */
        if (tp <= m->n_head_kv) {
            uint64_t sum = 0;
            for (int32_t t = 0; t < tp; t++) sum += p->ranks[s * tp + t].n_bytes_weights;
            const int32_t nl = r0->layer_end - r0->layer_begin;
            /* GPU ranks: every stage-0 rank uploads the whole table (a tied one that is the
             * whole head, at tp 1 and pp 1, once) */
            const bool dev = m->dev_n_batch > 0;
            const uint64_t embd = dev ? m->dev_n_bytes_embd : m->n_bytes_embd_row;
            const bool head_in_embd = dev && m->dev_embd_tied && tp == 1 && pp == 1;
            const uint64_t want =
                (uint64_t)nl * m->n_bytes_layer +
                (uint64_t)(tp - 1) * (uint64_t)nl * 2u * 4u * (uint64_t)m->n_embd +
                (s == 0 ? (uint64_t)tp * embd : 0) +
                (s == pp - 1 && !head_in_embd ? m->n_bytes_output : 0);
            const double rel = ((double)sum - (double)want) / (double)want;
            if (rel > 1e-6 || rel < -1e-6)
                fail_msg("stage %d: rank weights sum to %" PRIu64 ", expected %" PRIu64, s, sum,
                         want);
        }
    }
    EXPECT_EQ("layers covered", m->n_layer, layer_at);
}

static uint64_t stage_cost(const tsr_plan_model *m, int32_t n, int first, int last)
{
    return (uint64_t)n * m->n_bytes_layer + (first ? m->n_bytes_embd_row : 0) +
           (last ? m->n_bytes_output : 0);
}

static uint64_t plan_max_cost(const tsr_plan_model *m, const tsr_plan *p)
{
    uint64_t mx = 0;
    for (int32_t s = 0; s < p->pp; s++) {
        const tsr_plan_rank *r = &p->ranks[s * p->tp];
        const uint64_t c = stage_cost(m, r->layer_end - r->layer_begin, s == 0, s == p->pp - 1);
        if (c > mx) mx = c;
    }
    return mx;
}

/* Minimum over every split of n_layer into pp non-empty stages of the maximum stage cost. */
static uint64_t brute_rec(const tsr_plan_model *m, int32_t pp, int32_t s, int32_t left,
                          uint64_t cur)
{
    if (s == pp - 1) {
        const uint64_t c = stage_cost(m, left, s == 0, 1);
        return c > cur ? c : cur;
    }
    uint64_t best = UINT64_MAX;
    for (int32_t n = 1; n <= left - (pp - 1 - s); n++) {
        const uint64_t c = stage_cost(m, n, s == 0, 0);
        const uint64_t v = brute_rec(m, pp, s + 1, left - n, c > cur ? c : cur);
        if (v < best) best = v;
    }
    return best;
}

/* Per-rank peak of weights + n_ctx × KV of the current `plan`. */
static uint64_t plan_peak_mem(const tsr_plan *p, int32_t n_ctx)
{
    uint64_t mx = 0;
    for (int32_t i = 0; i < p->n_ranks; i++) {
        const uint64_t v =
            p->ranks[i].n_bytes_weights + (uint64_t)n_ctx * p->ranks[i].n_bytes_kv_per_token;
        if (v > mx) mx = v;
    }
    return mx;
}

/* Peak of a plan for GPU ranks: weights + KV in whole 16-position blocks + the device
 * buffers (tsr_plan_device_buffer_bytes) of each rank. */
static uint64_t plan_peak_dev(const tsr_plan_model *m, const tsr_plan *p, int32_t n_ctx)
{
    const uint64_t n16 = (uint64_t)(n_ctx + 15) / 16u * 16u;
    uint64_t mx = 0;
    for (int32_t i = 0; i < p->n_ranks; i++) {
        const uint64_t v = p->ranks[i].n_bytes_weights + n16 * p->ranks[i].n_bytes_kv_per_token +
                           tsr_plan_device_buffer_bytes(m, p->tp, p->pp, &p->ranks[i], n_ctx);
        if (v > mx) mx = v;
    }
    return mx;
}

static uint64_t peak_of(const tsr_plan_model *m, const tsr_plan *p, int32_t n_ctx)
{
    return m->dev_n_batch > 0 ? plan_peak_dev(m, p, n_ctx) : plan_peak_mem(p, n_ctx);
}

/* Brute force through the override: the smallest per-rank peak over all splits. */
static void brute_mem_rec(const tsr_plan_model *m, int32_t tp, int32_t pp, int32_t n_ctx, int32_t s,
                          int32_t at, char *str, size_t len, uint64_t *best)
{
    if (s == pp - 1) {
        char full[1024];
        snprintf(full, sizeof full, "%s%s%d-%d", str, s ? "," : "", at, m->n_layer - 1);
        make_ok(m, tp, pp, full, 0, n_ctx);
        const uint64_t v = peak_of(m, &plan, n_ctx);
        if (v < *best) *best = v;
        return;
    }
    for (int32_t n = 1; at + n <= m->n_layer - (pp - 1 - s); n++) {
        char next[1024];
        snprintf(next, sizeof next, "%s%s%d-%d", str, s ? "," : "", at, at + n - 1);
        brute_mem_rec(m, tp, pp, n_ctx, s + 1, at + n, next, len, best);
    }
}

static uint64_t brute_min_mem(const tsr_plan_model *m, int32_t tp, int32_t pp, int32_t n_ctx)
{
    uint64_t best = UINT64_MAX;
    brute_mem_rec(m, tp, pp, n_ctx, 0, 0, "", 0, &best);
    return best;
}

static void expect_layers(const tsr_plan *p, const int32_t *counts)
{
    for (int32_t s = 0; s < p->pp; s++) {
        const tsr_plan_rank *r = &p->ranks[s * p->tp];
        char what[64];
        snprintf(what, sizeof what, "stage %d layer count", s);
        EXPECT_EQ(what, counts[s], r->layer_end - r->layer_begin);
    }
}

/* ---- tests ---- */

static void test_stories_layouts(void **state)
{
    (void)state;
    const tsr_plan_model m = stories();
    const int32_t layouts[][2] = {{1, 1}, {2, 1}, {1, 2}, {2, 2}, {1, 3},
                                  {4, 1}, {1, 5}, {8, 1}, {4, 2}, {2, 5}};
    for (size_t i = 0; i < sizeof layouts / sizeof layouts[0]; i++) {
        make_ok(&m, layouts[i][0], layouts[i][1], NULL, 0, 0);
        check_plan(&m, &plan, layouts[i][0], layouts[i][1]);
    }
    /* The output head (512 × 64 floats) weighs ~0.72 layer: the last stage gets fewer. */
    make_ok(&m, 1, 2, NULL, 0, 0);
    expect_layers(&plan, (const int32_t[]){3, 2});
    make_ok(&m, 2, 3, NULL, 0, 0);
    expect_layers(&plan, (const int32_t[]){2, 2, 1});
    make_ok(&m, 1, 5, NULL, 0, 0);
    expect_layers(&plan, (const int32_t[]){1, 1, 1, 1, 1});
}

static void test_stories_kv_replicated(void **state)
{
    (void)state;
    const tsr_plan_model m = stories();
    /* 8 ranks, 4 KV heads: ranks 2k and 2k+1 both hold KV head k. */
    make_ok(&m, 8, 1, NULL, 0, 0);
    check_plan(&m, &plan, 8, 1);
    for (int32_t r = 0; r < 8; r++) {
        char what[64];
        snprintf(what, sizeof what, "rank %d kv head", r);
        EXPECT_EQ(what, r / 2, plan.ranks[r].kv_head_begin);
        snprintf(what, sizeof what, "rank %d query head", r);
        EXPECT_EQ(what, r, plan.ranks[r].head_begin);
    }
    /* tp 2: two KV heads each, no replication. */
    make_ok(&m, 2, 1, NULL, 0, 0);
    EXPECT_EQ("tp 2 rank 1 kv_head_begin", 2, plan.ranks[1].kv_head_begin);
    EXPECT_EQ("tp 2 rank 1 kv_head_end", 4, plan.ranks[1].kv_head_end);
    /* Replicated KV counts on every rank that holds it. */
    make_ok(&m, 8, 1, NULL, 0, 0);
    EXPECT_EQ("tp 8 rank 5 kv bytes/token", 2 * 1 * 8 * 4 * 5, plan.ranks[5].n_bytes_kv_per_token);
}

static void test_stories_refused(void **state)
{
    (void)state;
    const tsr_plan_model m = stories();
    make_bad(&m, 3, 1, NULL, 0, 0);
    expect_msg("n_head 8 is not divisible by tp 3; use tp 1, 2, 4 or 8");
    make_bad(&m, 1, 6, NULL, 0, 0);
    expect_msg("pp 6 needs at least 6 layers; the model has 5");
    make_bad(&m, 16, 1, NULL, 0, 0);
    expect_contains("use tp 1, 2, 4 or 8");
    make_bad(&m, 0, 1, NULL, 0, 0);
    make_bad(&m, 1, 0, NULL, 0, 0);
    make_bad(&m, -2, 1, NULL, 0, 0);
    make_bad(&m, 1, 1, NULL, 0, -1); /* negative n_ctx */
    make_bad(&m, 64, 8, NULL, 0, 0); /* 512 ranks */
    expect_contains("256");
    /* NULL model / output */
    err[0] = '\0';
    assert_true(tsr_plan_make(NULL, 1, 1, NULL, 0, 0, &plan, err, sizeof err) < 0);
    assert_true(tsr_plan_make(&m, 1, 1, NULL, 0, 0, NULL, err, sizeof err) < 0);
    /* NULL / zero-length err buffer must not crash */
    assert_true(tsr_plan_make(&m, 3, 1, NULL, 0, 0, &plan, NULL, 0) < 0);
    assert_true(tsr_plan_make(&m, 3, 1, NULL, 0, 0, &plan, err, 0) < 0);
    /* A refused plan leaves nothing half-filled. */
    make_bad(&m, 3, 1, NULL, 0, 0);
    EXPECT_EQ("n_ranks after refusal", 0, plan.n_ranks);
}

static void test_bad_model(void **state)
{
    (void)state;
    tsr_plan_model m = stories();
    m.n_head_kv = 3; /* 8 % 3 */
    make_bad(&m, 1, 1, NULL, 0, 0);
    expect_contains("n_head_kv 3");
    m = stories();
    m.type_ffn_down = 16; /* IQ2_XXS: not supported */
    make_bad(&m, 1, 1, NULL, 0, 0);
    expect_contains("ffn_down");
    m = stories();
    m.type_attn_q = 999;
    make_bad(&m, 1, 1, NULL, 0, 0);
    expect_contains("attn_q");
    m = stories();
    m.n_layer = 0;
    make_bad(&m, 1, 1, NULL, 0, 0);
    m = stories();
    m.type_ffn_down = TSR_TYPE_Q8_0; /* n_ff 172 is not whole Q8_0 blocks */
    make_bad(&m, 1, 1, NULL, 0, 0);
    expect_contains("ffn_down");
}

static void test_kv_rules(void **state)
{
    (void)state;
    /* 12 heads, 6 KV heads: tp 4 cannot give whole KV heads; tp 12 replicates 2×. */
    tsr_plan_model m = make_model(4, 96, 12, 6, 8, 64, 100, TSR_TYPE_F32);
    make_bad(&m, 4, 1, NULL, 0, 0);
    expect_msg("n_head_kv 6 is not divisible by tp 4 (each rank needs whole KV heads); use tp 1, "
               "2, 3, 6 or 12");
    make_ok(&m, 12, 1, NULL, 0, 0);
    check_plan(&m, &plan, 12, 1);
    make_ok(&m, 3, 2, NULL, 0, 0);
    check_plan(&m, &plan, 3, 2);
    /* 12 heads, 4 KV heads, tp 6: rank 1's heads 2,3 would need KV heads 0 and 1. */
    m = make_model(4, 96, 12, 4, 8, 64, 100, TSR_TYPE_F32);
    make_bad(&m, 6, 1, NULL, 0, 0);
    expect_contains("tp 6 is more than n_head_kv 4 but not a multiple of it");
    expect_contains("use tp 1, 2, 4 or 12");
    make_ok(&m, 12, 1, NULL, 0, 0);
    check_plan(&m, &plan, 12, 1);
}

static void test_q8_ff(void **state)
{
    (void)state;
    tsr_plan_model m = make_model(4, 128, 4, 4, 32, 96, 256, TSR_TYPE_Q8_0);
    make_ok(&m, 2, 1, NULL, 0, 0);
    check_plan(&m, &plan, 2, 1);
    EXPECT_EQ("tp 2 rank 0 ff_end", 64, plan.ranks[0].ff_end);
    EXPECT_EQ("tp 2 rank 1 ff_begin", 64, plan.ranks[1].ff_begin);
    EXPECT_EQ("tp 2 rank 1 ff_end", 96, plan.ranks[1].ff_end);
    make_ok(&m, 2, 2, NULL, 0, 0);
    check_plan(&m, &plan, 2, 2);
    make_bad(&m, 4, 1, NULL, 0, 0);
    expect_msg("n_ff 96 in Q8_0 is 3 blocks of 32: cannot give 4 ranks a block each; use tp 1 or "
               "2");
    /* 3 ranks: one block each */
    m = make_model(4, 96, 3, 3, 32, 96, 256, TSR_TYPE_Q8_0);
    make_ok(&m, 3, 1, NULL, 0, 0);
    check_plan(&m, &plan, 3, 1);
    EXPECT_EQ("tp 3 rank 2 ff_begin", 64, plan.ranks[2].ff_begin);
}

static void test_q4k_attn_output(void **state)
{
    (void)state;
    tsr_plan_model m = make_model(4, 512, 8, 8, 64, 1536, 1000, TSR_TYPE_F16);
    m.type_attn_output = TSR_TYPE_Q4_K;
    m.type_ffn_down = TSR_TYPE_Q6_K;
    m.n_bytes_layer = layer_bytes(&m);
    make_ok(&m, 2, 1, NULL, 0, 0);
    check_plan(&m, &plan, 2, 1);
    EXPECT_EQ("rank 1 head_begin", 4, plan.ranks[1].head_begin);
    make_bad(&m, 4, 1, NULL, 0, 0);
    expect_msg("attn_output is Q4_K (blocks of 256 values): a tp 4 split gives each rank 2 heads × "
               "64 = 128 columns, which cuts blocks; use tp 1 or 2");
    make_bad(&m, 8, 1, NULL, 0, 0);
    expect_contains("1 head × 64 = 64 columns");
    /* Q6_K n_ff 1536 = 6 blocks: with head_dim 256 (attn_output fine at any tp), tp 4
     * gives 2+2+1+1 blocks and tp 8 is refused for n_ff. */
    m = make_model(2, 2048, 8, 8, 256, 1536, 1000, TSR_TYPE_Q4_K);
    m.type_ffn_down = TSR_TYPE_Q6_K;
    m.n_bytes_layer = layer_bytes(&m);
    make_ok(&m, 4, 1, NULL, 0, 0);
    check_plan(&m, &plan, 4, 1);
    EXPECT_EQ("rank 1 ff_end", 1024, plan.ranks[1].ff_end);
    EXPECT_EQ("rank 3 ff_begin", 1280, plan.ranks[3].ff_begin);
    make_bad(&m, 8, 1, NULL, 0, 0);
    expect_msg("n_ff 1536 in Q6_K is 6 blocks of 256: cannot give 8 ranks a block each; use tp 1, "
               "2 or 4");
}

/* The 32-element types (Q4_1, Q5_0, Q5_1) split like Q8_0 / Q4_0; the 256-element
 * K-quants (Q2_K, Q3_K, Q5_K) like Q4_K. Shapes of the real models: Qwen2.5-0.5B (896 wide,
 * 14 heads of 64, n_ff 4864 = 19 K-blocks) and SmolLM2-135M (576 wide, 9 heads, n_ff 1536). */
static void test_new_quant_blocks(void **state)
{
    (void)state;
    tsr_plan_model m = make_model(24, 896, 14, 2, 64, 4864, 151936, TSR_TYPE_Q5_0);
    m.type_ffn_down = TSR_TYPE_Q4_K;
    m.n_bytes_layer = layer_bytes(&m);
    make_ok(&m, 2, 1, NULL, 0, 0); /* 7 heads x 64 = 448 columns = 14 Q5_0 blocks per rank */
    check_plan(&m, &plan, 2, 1);
    EXPECT_EQ("qwen tp 2 rank 1 ff_begin", 2560, plan.ranks[1].ff_begin); /* 10 + 9 blocks */
    m.type_attn_output = TSR_TYPE_Q2_K; /* why llama-quantize falls back to Q5_0 there */
    make_bad(&m, 1, 1, NULL, 0, 0);
    expect_contains("attn_output has 896 columns, not a whole number of Q2_K blocks");
    m.type_attn_output = TSR_TYPE_Q5_1;
    m.n_bytes_layer = layer_bytes(&m);
    make_ok(&m, 2, 2, NULL, 0, 0);
    check_plan(&m, &plan, 2, 2);
    m = make_model(30, 576, 9, 3, 64, 1536, 49152, TSR_TYPE_Q4_1);
    make_ok(&m, 3, 1, NULL, 0, 0); /* 3 heads x 64 = 192 columns = 6 Q4_1 blocks */
    check_plan(&m, &plan, 3, 1);
    m.type_ffn_down = TSR_TYPE_Q3_K; /* 1536 = 6 blocks of 256 */
    m.n_bytes_layer = layer_bytes(&m);
    make_ok(&m, 3, 1, NULL, 0, 0);
    EXPECT_EQ("smollm tp 3 rank 2 ff_begin", 1024, plan.ranks[2].ff_begin);
    m = make_model(4, 1024, 16, 4, 64, 2816, 1000, TSR_TYPE_Q2_K);
    m.type_attn_output = TSR_TYPE_Q3_K;
    m.type_ffn_down = TSR_TYPE_Q5_K; /* 2816 = 11 blocks of 256 */
    m.n_bytes_layer = layer_bytes(&m);
    make_ok(&m, 4, 1, NULL, 0, 0); /* 4 heads x 64 = 256 columns */
    check_plan(&m, &plan, 4, 1);
    make_bad(&m, 8, 1, NULL, 0, 0);
    expect_msg("attn_output is Q3_K (blocks of 256 values): a tp 8 split gives each rank 2 heads × "
               "64 = 128 columns, which cuts blocks; use tp 1, 2 or 4");
    m.type_attn_output = TSR_TYPE_Q5_0;
    m.n_bytes_layer = layer_bytes(&m);
    make_ok(&m, 8, 1, NULL, 0, 0); /* 128 columns = 4 Q5_0 blocks; n_ff: 11 blocks, 8 ranks */
    check_plan(&m, &plan, 8, 1);
}

static void test_1b_balance(void **state)
{
    (void)state;
    const tsr_plan_model m = llama_1b();
    /* The output head (~1.08 layers) sits on stage 1: 9 + 7 beats 8 + 8 (+ head). */
    make_ok(&m, 1, 2, NULL, 0, 0);
    check_plan(&m, &plan, 1, 2);
    expect_layers(&plan, (const int32_t[]){9, 7});
    EXPECT_EQ("1B pp 2 max stage cost", brute_rec(&m, 2, 0, m.n_layer, 0),
              plan_max_cost(&m, &plan));
    for (int32_t pp = 1; pp <= 6; pp++) {
        for (int32_t tp = 1; tp <= 32; tp *= 2) {
            if (tp * pp > TSR_PLAN_MAX_RANKS) continue;
            make_ok(&m, tp, pp, NULL, 0, 0);
            check_plan(&m, &plan, tp, pp);
            char what[64];
            snprintf(what, sizeof what, "1B tp %d pp %d max stage cost", tp, pp);
            EXPECT_EQ(what, brute_rec(&m, pp, 0, m.n_layer, 0), plan_max_cost(&m, &plan));
        }
    }
    make_ok(&m, 1, 16, NULL, 0, 0);
    check_plan(&m, &plan, 1, 16);
}

/* Exact minimality against brute force over many small shapes, including ones where the
 * output head outweighs several layers and where it is negligible. */
static void test_balance_brute(void **state)
{
    (void)state;
    const int32_t vocabs[] = {8, 512, 4096, 20000};
    for (size_t v = 0; v < sizeof vocabs / sizeof vocabs[0]; v++) {
        for (int32_t nl = 1; nl <= 9; nl++) {
            tsr_plan_model m = make_model(nl, 64, 8, 4, 8, 172, vocabs[v], TSR_TYPE_F32);
            for (int32_t pp = 1; pp <= nl; pp++) {
                make_ok(&m, 1, pp, NULL, 0, 0);
                check_plan(&m, &plan, 1, pp);
                char what[96];
                snprintf(what, sizeof what, "vocab %d n_layer %d pp %d max stage cost", vocabs[v],
                         nl, pp);
                EXPECT_EQ(what, brute_rec(&m, pp, 0, nl, 0), plan_max_cost(&m, &plan));
            }
        }
    }
}

static void test_override(void **state)
{
    (void)state;
    const tsr_plan_model s = stories();
    make_ok(&s, 1, 2, "0-1,2-4", 0, 0);
    check_plan(&s, &plan, 1, 2);
    expect_layers(&plan, (const int32_t[]){2, 3});
    make_ok(&s, 2, 3, "0-2,3,4", 0, 0);
    check_plan(&s, &plan, 2, 3);
    expect_layers(&plan, (const int32_t[]){3, 1, 1});
    make_ok(&s, 1, 5, "0,1,2,3,4", 0, 0);
    expect_layers(&plan, (const int32_t[]){1, 1, 1, 1, 1});
    make_ok(&s, 4, 1, "0-4", 0, 0);
    expect_layers(&plan, (const int32_t[]){5});
    make_ok(&s, 1, 2, " 0 - 3 , 4 ", 0, 0); /* spaces are tolerated */
    expect_layers(&plan, (const int32_t[]){4, 1});

    const tsr_plan_model m = llama_1b();
    make_ok(&m, 1, 2, "0-7,8-15", 0, 0);
    check_plan(&m, &plan, 1, 2);
    expect_layers(&plan, (const int32_t[]){8, 8});
    make_ok(&m, 2, 3, "0-3,4,5-15", 0, 0);
    check_plan(&m, &plan, 2, 3);
    expect_layers(&plan, (const int32_t[]){4, 1, 11});
    EXPECT_EQ("stage 2 layer_begin", 5, plan.ranks[4].layer_begin);

    /* Malformed: each refused, with a message quoting the string. */
    make_bad(&m, 1, 2, "0-7,9-15", 0, 0);
    expect_msg("--layers '0-7,9-15': layer 8 is not assigned");
    make_bad(&m, 1, 2, "0-5,9-15", 0, 0);
    expect_msg("--layers '0-5,9-15': layers 6-8 are not assigned");
    make_bad(&m, 1, 2, "0-7,8-14", 0, 0);
    expect_msg("--layers '0-7,8-14': layer 15 is not assigned");
    make_bad(&m, 1, 2, "1-7,8-15", 0, 0);
    expect_msg("--layers '1-7,8-15': layer 0 is not assigned");
    make_bad(&m, 1, 2, "0-8,8-15", 0, 0);
    expect_msg("--layers '0-8,8-15': layer 8 is assigned twice");
    make_bad(&m, 1, 2, "8-15,0-7", 0, 0);
    expect_contains("out of order");
    make_bad(&m, 1, 2, "0-7,8-16", 0, 0);
    expect_msg("--layers '0-7,8-16': layer 16 is out of range (the model has 16 layers: 0-15)");
    make_bad(&m, 1, 2, "0-15", 0, 0);
    expect_msg("--layers '0-15': 1 range for pp 2; give exactly one range per stage");
    make_bad(&m, 1, 2, "0-3,4-7,8-15", 0, 0);
    expect_contains("3 ranges for pp 2");
    make_bad(&m, 1, 2, "a-b", 0, 0);
    expect_msg("--layers 'a-b': 'a-b' is not a layer range (expected N or N-M, e.g. 0-7)");
    make_bad(&m, 1, 3, "0-4,5-3,4-15", 0, 0);
    expect_msg("--layers '0-4,5-3,4-15': range 5-3 is empty (it ends before it begins)");
    const char *garbage[] = {"",
                             " ",
                             ",",
                             "0-7,",
                             ",0-7",
                             "0-7,,8-15",
                             "0--7,8-15",
                             "-1-7,8-15",
                             "0-7x,8-15",
                             "0-7;8-15",
                             "0-99999999999999999999,8-15",
                             "0-7,8-15-20",
                             "0-7 8-15"};
    for (size_t i = 0; i < sizeof garbage / sizeof garbage[0]; i++) {
        make_bad(&m, 1, 2, garbage[i], 0, 0);
        char quoted[128];
        snprintf(quoted, sizeof quoted, "--layers '%s': ", garbage[i]);
        if (strncmp(err, quoted, strlen(quoted)) != 0)
            fail_msg("message for '%s' should start with \"%s\"\n  got: %s", garbage[i], quoted,
                     err);
    }
}

static void test_budget(void **state)
{
    (void)state;
    const tsr_plan_model m = llama_1b();
    const int32_t n_ctx = 2048;
    /* Exact boundary: the smallest peak any split reaches is accepted, one byte less not. */
    const int32_t cases[][2] = {{1, 1}, {1, 2}, {2, 2}, {1, 3}, {8, 3}, {16, 2}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const int32_t tp = cases[i][0], pp = cases[i][1];
        const uint64_t need = brute_min_mem(&m, tp, pp, n_ctx);
        make_ok(&m, tp, pp, NULL, need, n_ctx);
        check_plan(&m, &plan, tp, pp);
        if (plan_peak_mem(&plan, n_ctx) > need)
            fail_msg("tp %d pp %d: peak %" PRIu64 " over the budget %" PRIu64, tp, pp,
                     plan_peak_mem(&plan, n_ctx), need);
        make_bad(&m, tp, pp, NULL, need - 1, n_ctx);
        expect_contains("needs at least");
    }
    /* Small model too, where the output head dominates. */
    const tsr_plan_model s = stories();
    for (int32_t pp = 1; pp <= 5; pp++) {
        const uint64_t need = brute_min_mem(&s, 2, pp, 256);
        make_ok(&s, 2, pp, NULL, need, 256);
        check_plan(&s, &plan, 2, pp);
        make_bad(&s, 2, pp, NULL, need - 1, 256);
    }

    /* A budget between what pp 2 and pp 1 need: pp 1 refused, naming the size. */
    const uint64_t need1 = brute_min_mem(&m, 1, 1, n_ctx);
    const uint64_t need2 = brute_min_mem(&m, 1, 2, n_ctx);
    assert_true(need2 < need1);
    const uint64_t budget = (need1 + need2) / 2;
    make_bad(&m, 1, 1, NULL, budget, n_ctx);
    char want[128];
    snprintf(want, sizeof want, "needs at least %.1f MiB per rank", (double)need1 / 1048576.0);
    expect_contains(want);
    snprintf(want, sizeof want, "the budget is %.1f MiB", (double)budget / 1048576.0);
    expect_contains(want);
    expect_contains("pp 2 would fit");
    make_ok(&m, 1, 2, NULL, budget, n_ctx);
    check_plan(&m, &plan, 1, 2);
    assert_true(plan_peak_mem(&plan, n_ctx) <= budget);
    /* The budget changes the split when it binds: without it 9 + 7. */
    make_ok(&m, 1, 2, NULL, need2, n_ctx);
    assert_true(plan_peak_mem(&plan, n_ctx) <= need2);

    /* Overrides are checked against the budget too. */
    make_bad(&m, 1, 2, "0-14,15", budget, n_ctx);
    expect_contains("--layers '0-14,15': stage 0 (layers 0-14) needs");
    /* No budget: anything goes. */
    make_ok(&m, 1, 1, NULL, 0, n_ctx);
}

/* GPU ranks (dev_n_batch > 0): the budget holds what the device allocates. The smallest
 * feasible budget (brute force over splits, each rank's weights + whole KV blocks +
 * tsr_plan_device_buffer_bytes) is accepted and one byte less refused, naming the device
 * buffers; the leader's [n_batch][n_vocab] logits buffer (pp > 1) and tp rank 0's gather
 * (tp > 1) are in the buffers; stage 0 holds the whole embedding (once when tied); the KV
 * type's bytes per block count; the refusal names the largest context that fits, and that
 * context fits while 16 positions more do not. */
static void test_device_memory(void **state)
{
    (void)state;
    tsr_plan_model s = stories();
    const int32_t nb = 64, V = s.n_vocab;
    s.dev_n_batch = nb;
    s.dev_n_bytes_embd = s.n_bytes_output; /* 512 rows of 64 floats */
    const int32_t layouts[][2] = {{1, 1}, {2, 1}, {1, 2}, {2, 2}, {1, 3}, {4, 1}};
    for (size_t i = 0; i < sizeof layouts / sizeof layouts[0]; i++) {
        const int32_t tp = layouts[i][0], pp = layouts[i][1];
        const uint64_t need = brute_min_mem(&s, tp, pp, 200);
        make_ok(&s, tp, pp, NULL, need, 200);
        check_plan(&s, &plan, tp, pp);
        if (plan_peak_dev(&s, &plan, 200) > need)
            fail_msg("device tp %d pp %d: peak %" PRIu64 " over the budget %" PRIu64, tp, pp,
                     plan_peak_dev(&s, &plan, 200), need);
        make_bad(&s, tp, pp, NULL, need - 1, 200);
        expect_contains("(weights + KV + device buffers for 208 tokens)");
        /* the CPU plan of the same budget and layout needs less (one embedding row, no
         * buffers) */
        tsr_plan_model cpu = s;
        cpu.dev_n_batch = 0;
        assert_true(brute_min_mem(&cpu, tp, pp, 200) < need);
    }
    /* the leader's logits buffer: stage 0 of 3 holds what a middle stage holds, plus
     * [n_batch][n_vocab] floats received from the last stage */
    make_ok(&s, 1, 3, NULL, 0, 200);
    EXPECT_EQ("leader logits buffer (rank 0 - rank 1 of pp 3)", 4ll * nb * V,
              (long long)tsr_plan_device_buffer_bytes(&s, 1, 3, &plan.ranks[0], 200) -
                  (long long)tsr_plan_device_buffer_bytes(&s, 1, 3, &plan.ranks[1], 200));
    /* ... and tp rank 0 of the last stage gathers the slices: the others' parts + the rows
     * (even halves at tp 2: same vocabulary and n_ff slices otherwise) */
    make_ok(&s, 2, 1, NULL, 0, 200);
    const int32_t vl0 = plan.ranks[0].vocab_end - plan.ranks[0].vocab_begin;
    EXPECT_EQ("vocabulary halves", vl0, plan.ranks[1].vocab_end - plan.ranks[1].vocab_begin);
    EXPECT_EQ("gather buffers (rank 0 - rank 1 of tp 2)", 4ll * nb * V + 4ll * nb * (V - vl0),
              (long long)tsr_plan_device_buffer_bytes(&s, 2, 1, &plan.ranks[0], 200) -
                  (long long)tsr_plan_device_buffer_bytes(&s, 2, 1, &plan.ranks[1], 200));
    /* stage 0 holds the whole table; a tied table that is the whole head is held once */
    make_ok(&s, 1, 1, NULL, 0, 200);
    const uint64_t w_untied = plan.ranks[0].n_bytes_weights;
    s.dev_embd_tied = 1;
    make_ok(&s, 1, 1, NULL, 0, 200);
    EXPECT_EQ("tied table held once", (long long)s.n_bytes_output,
              (long long)(w_untied - plan.ranks[0].n_bytes_weights));
    EXPECT_EQ("stage 0 weights: layers + the whole table",
              (long long)llround(5.0 * (double)s.n_bytes_layer) + (long long)s.n_bytes_output,
              (long long)plan.ranks[0].n_bytes_weights);
    s.dev_embd_tied = 0;
    /* whole KV blocks: 193..208 positions need the same */
    EXPECT_EQ("n_ctx 193 vs 208", (long long)brute_min_mem(&s, 1, 2, 193),
              (long long)brute_min_mem(&s, 1, 2, 208));
    assert_true(brute_min_mem(&s, 1, 2, 209) > brute_min_mem(&s, 1, 2, 208));

    /* the 1B shape with a q8_0 KV cache (34 bytes per 32 values) on GPU ranks */
    tsr_plan_model m = llama_1b();
    m.n_bytes_kv_per_token_layer = 2u * 8u * (64u / 32u) * 34u;
    m.dev_n_batch = 512;
    m.dev_n_bytes_embd = tsr_row_bytes(TSR_TYPE_Q8_0, 2048) * 32000u;
    make_ok(&m, 1, 1, NULL, 0, 4096);
    EXPECT_EQ("q8_0 KV bytes per token", 16ll * 1088, plan.ranks[0].n_bytes_kv_per_token);
    const uint64_t need1 = brute_min_mem(&m, 1, 1, 4096);
    const uint64_t need2 = brute_min_mem(&m, 1, 2, 4096);
    assert_true(need2 < need1);
    const uint64_t budget = (need1 + need2) / 2;
    make_bad(&m, 1, 1, NULL, budget, 4096);
    char want[160];
    snprintf(want, sizeof want,
             "tp 1 × pp 1 needs at least %.1f MiB per rank (weights + KV + device buffers for "
             "4096 tokens)",
             (double)need1 / 1048576.0);
    expect_contains(want);
    expect_contains("pp 2 would fit at tp 1");
    /* the weights alone are over this budget: no context would fit, none is named */
    if (strstr(err, "a context of"))
        fail_msg("no context fits, but the message names one: %s", err);
    /* 20 MiB short (the KV of 4096 tokens is 68 MiB): a shorter context fits */
    const uint64_t budget_ctx = need1 - ((uint64_t)20 << 20);
    make_bad(&m, 1, 1, NULL, budget_ctx, 4096);
    const char *at = strstr(err, "a context of at most ");
    if (!at) fail_msg("message should name the largest context that fits\n  got: %s", err);
    const int32_t n_fit = (int32_t)strtol(at + strlen("a context of at most "), NULL, 10);
    assert_true(n_fit > 0 && n_fit < 4096 && n_fit % 16 == 0);
    make_ok(&m, 1, 1, NULL, budget_ctx, n_fit);
    make_bad(&m, 1, 1, NULL, budget_ctx, n_fit + 16);
    printf("1B q8_0 KV on one GPU: %.1f MiB needed at 4096 tokens, budget %.1f MiB fits %d "
           "tokens\n",
           (double)need1 / 1048576.0, (double)budget_ctx / 1048576.0, n_fit);
    /* CPU ranks (dev_n_batch 0): the buffers are not counted */
    tsr_plan_model cpu = m;
    cpu.dev_n_batch = 0;
    make_ok(&cpu, 1, 1, NULL, 0, 4096);
    EXPECT_EQ("no device buffers on CPU ranks", 0,
              tsr_plan_device_buffer_bytes(&cpu, 1, 1, &plan.ranks[0], 4096));
}

static void test_weights_share(void **state)
{
    (void)state;
    const tsr_plan_model m = llama_1b();
    make_ok(&m, 2, 1, NULL, 0, 0);
    /* Even split: each rank holds half of every layer and half the output head. */
    const double half = (double)(16 * m.n_bytes_layer + m.n_bytes_output) / 2.0;
    for (int32_t r = 0; r < 2; r++) {
        const double got = (double)plan.ranks[r].n_bytes_weights;
        if (got < half * 0.999 || got > half * 1.001 + (double)m.n_bytes_embd_row)
            fail_msg("rank %d weights: expected ~%.0f, got %.0f", r, half, got);
    }
    /* tp 16 > 8 KV heads: each rank holds 1 of 8 KV heads (replicated), more than 1/16. */
    make_ok(&m, 16, 1, NULL, 0, 0);
    check_plan(&m, &plan, 16, 1);
    uint64_t sum = 0;
    for (int32_t r = 0; r < 16; r++) sum += plan.ranks[r].n_bytes_weights;
    assert_true(sum > 16 * m.n_bytes_layer + m.n_bytes_output);
}

static void test_format(void **state)
{
    (void)state;
    const tsr_plan_model m = stories();
    make_ok(&m, 2, 2, NULL, 0, 0);
    char buf[4096];
    const int n = tsr_plan_format(&plan, &m, buf, sizeof buf);
    assert_true(n > 0 && (size_t)n < sizeof buf);
    EXPECT_EQ("format length", strlen(buf), n);
    int lines = 0;
    for (const char *p = buf; *p; p++) lines += *p == '\n';
    EXPECT_EQ("format lines (2 header + column names + 4 ranks)", 3 + 4, lines);
    if (!strstr(buf, "tp 2 × pp 2 = 4 ranks")) fail_msg("table header missing:\n%s", buf);
    if (!strstr(buf, "KV KiB/token")) fail_msg("column names missing:\n%s", buf);
    /* snprintf semantics: same length reported, output truncated and terminated. */
    char small[16];
    memset(small, 'x', sizeof small);
    EXPECT_EQ("truncated format length", n, tsr_plan_format(&plan, &m, small, sizeof small));
    EXPECT_EQ("truncated NUL", 0, small[sizeof small - 1]);
    EXPECT_EQ("length with no buffer", n, tsr_plan_format(&plan, &m, NULL, 0));
    printf("%s", buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stories_layouts), cmocka_unit_test(test_stories_kv_replicated),
        cmocka_unit_test(test_stories_refused), cmocka_unit_test(test_bad_model),
        cmocka_unit_test(test_kv_rules),        cmocka_unit_test(test_q8_ff),
        cmocka_unit_test(test_q4k_attn_output), cmocka_unit_test(test_new_quant_blocks),
        cmocka_unit_test(test_1b_balance),      cmocka_unit_test(test_balance_brute),
        cmocka_unit_test(test_override),        cmocka_unit_test(test_budget),
        cmocka_unit_test(test_weights_share),   cmocka_unit_test(test_format),
        cmocka_unit_test(test_device_memory),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
