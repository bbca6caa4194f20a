/*
 * test_q40_gemm.c — kernels/q40_gemm: Q4_0 x Q8_0 in the order of llama.cpp's repacked Q4_0
 * GEMM and GEMV, Q4_0's one order for every token (prompt and generated, order classes 1
 * and 0 of worker/model.h alike).
 *
 * - Every ISA path (scalar, AVX2, AVX-512 VNNI where the CPU has it), 1..37 rows (two 16-row
 *   AVX-512 sets and a partial one) x 1..13 tokens, n from one block to 2048 (chunks of 8
 *   blocks and a tail), the file layout and the repacked groups (kernels/repack.h) give the
 *   same bits, and those bits are the order this test spells out independently from ggml's
 *   x86 source (gemm_q4_b32_8x8_q8_0_lut_avx: per 32-element block an exact int32 of the
 *   sign-extended nibbles times the activation bytes, FMAed into the row's float lane with
 *   col_scale * row_scale).
 * - The activations: ggml_quantize_mat_q8_0_4x8 (transcribed from its AVX2 source) makes the
 *   bytes of tsr_quant_act_row's Q8_0 (ggml's x86 quantize_row_q8_0).
 * - The one-token paths give the same bits: tsr_vec_dot / tsr_vec_dot_rows / tsr_vec_dot_tile
 *   (file layout) and tsr_repack_dot (groups) on every ISA, the one-token GEMV of q40_gemm.c
 *   (n_tok 1 above). Two other orders are spelled out too, Tessera's former Q4_0 row order
 *   (8-lane float chains, block b into chain b % 4, the -8 offset per 8 blocks) and ggml's
 *   generic sequential sum: each differs from the GEMM order in some dots (all within 1e-4
 *   relative), so the test would notice a kernel that fell back to either.
 * - tsr_matmul_multi_ord: tokens of either class get the GEMM order whatever their mix in the
 *   batch, and so does one token a call (decode: the GEMV and its guided row claims), with
 *   and without a repacked copy, 2 threads; more tokens than one of the kernel's token blocks.
 * - synth-tiny-q4_0 (expected/synth-tiny-expected.txt) with its prompt in order class 1 and 0
 *   (tsr_ctx_set_prompt_len): llama.cpp's greedy ids and top-5 logits within 0.3, and the
 *   same bits in both classes.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/dot_ggml.h"
#include "kernels/ops.h"
#include "kernels/pool.h"
#include "kernels/q40_gemm.h"
#include "kernels/quant.h"
#include "kernels/repack.h"
#include "tests/util.h"
#include "worker/model.h"

static uint64_t rng = 0x2545F4914F6CDD1Dull;
enum { QK = 32, Q40_BYTES = 18, Q80_BYTES = 34 };

static uint16_t rd16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* gemm_q4_b32_8x8_q8_0_lut_avx (AVX2 / AVX-512 branches) for one output lane (row, token):
 * the lookup table maps nibble v to v - 8; the int32 lane sums all 32 products of the block;
 * acc_row = fmadd(cvtepi32_ps(iacc), mul(col_scale, row_scale), acc_row). */
static float ggml_gemm_order(int64_t n, const uint8_t *w, const uint8_t *x)
{
    static const int8_t lut[16] = {0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1};
    float acc = 0.0f;
    for (int64_t b = 0; b < n / QK; b++) {
        const uint8_t *wb = w + b * Q40_BYTES, *xb = x + b * Q80_BYTES;
        const int8_t *q8 = (const int8_t *)(xb + 2);
        int32_t iacc = 0;
        for (int l = 0; l < 16; l++) {
            /* ggml's signed LUT is of the nibble XOR 8 (block_q4_0x8 stores q ^ 0x88) */
            iacc += lut[(wb[2 + l] & 0xF) ^ 8] * q8[l];
            iacc += lut[(wb[2 + l] >> 4) ^ 8] * q8[l + 16];
        }
        acc = fmaf((float)iacc, tsr_f16_to_f32(rd16(wb)) * tsr_f16_to_f32(rd16(xb)), acc);
    }
    return acc;
}

/* Tessera's Q4_0 row order before this order replaced it (quant.c's BLOCK_LOOP on AVX2 /
 * AVX-512 VNNI): per block 8 int32 lanes, lane l = sum over elements 4l..4l+3 of q * y
 * (unsigned nibbles q, element order: low nibbles 0..15, high 16..31); chain b % 4 lane l =
 * fma(fp16(d_w) * dy, float(lane), chain); the offset, lane i of 8 blocks b..b+7:
 * off[i] = fma(fp16(d_w_b), dy_b * float(-8 * sum(y_b)), off[i]); the end
 * hsum8(((c0 + c1) + (c2 + c3)) + off), hsum8 ggml's hsum_float_8. */
static float old_row_order(int64_t n, const uint8_t *w, const uint8_t *x)
{
    float c[4][8] = {{0}}, off[8] = {0};
    for (int64_t b = 0; b < n / QK; b++) {
        const uint8_t *wb = w + b * Q40_BYTES, *xb = x + b * Q80_BYTES;
        const int8_t *y = (const int8_t *)(xb + 2);
        const float dw = tsr_f16_to_f32(rd16(wb)), dy = tsr_f16_to_f32(rd16(xb));
        int32_t sy = 0;
        for (int e = 0; e < QK; e++) sy += y[e];
        off[b % 8] = fmaf(dw, dy * (float)(-8 * sy), off[b % 8]);
        for (int l = 0; l < 8; l++) {
            int32_t lane = 0;
            for (int e = 4 * l; e < 4 * l + 4; e++) {
                const int q = e < 16 ? wb[2 + e] & 0xF : wb[2 + e - 16] >> 4;
                lane += q * y[e];
            }
            c[b % 4][l] = fmaf(dw * dy, (float)lane, c[b % 4][l]);
        }
    }
    float v[8];
    for (int l = 0; l < 8; l++) v[l] = ((c[0][l] + c[1][l]) + (c[2][l] + c[3][l])) + off[l];
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

/* ggml's generic ggml_vec_dot_q4_0_q8_0: sumf += float(I) * (d_w * d_y) block after block. */
static float seq_order(int64_t n, const uint8_t *w, const uint8_t *x)
{
    float s = 0.0f;
    for (int64_t b = 0; b < n / QK; b++) {
        const uint8_t *wb = w + b * Q40_BYTES, *xb = x + b * Q80_BYTES;
        const int8_t *y = (const int8_t *)(xb + 2);
        int32_t I = 0;
        for (int l = 0; l < 16; l++)
            I += ((wb[2 + l] & 0xF) - 8) * y[l] + ((wb[2 + l] >> 4) - 8) * y[l + 16];
        const float dd = tsr_f16_to_f32(rd16(wb)) * tsr_f16_to_f32(rd16(xb));
        const float p = (float)I * dd;
        s = s + p;
    }
    return s;
}

/* ggml_quantize_mat_q8_0_4x8's AVX2 arithmetic for one row, as block_q8_0: amax, d = amax /
 * 127, id = 127 / amax (0 for an all-zero block), q = round-half-even(x * id). */
static void ggml_quant_4x8_row(const float *x, uint8_t *out, int64_t n)
{
    for (int64_t b = 0; b < n / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax;
        const float d = amax / 127.f, id = amax != 0.0f ? 127.f / amax : 0.0f;
        uint8_t *ob = out + b * Q80_BYTES;
        const uint16_t dh = tsr_f32_to_f16(d);
        memcpy(ob, &dh, 2);
        for (int i = 0; i < QK; i++) ob[2 + i] = (uint8_t)(int8_t)nearbyintf(xb[i] * id);
    }
}

static const char *const k_isas[] = {"scalar", "avx2", "avx512vnni"};

static void make_weights(int64_t n, int n_rows, uint8_t *w)
{
    float *f = malloc(sizeof(float) * (size_t)n);
    for (int r = 0; r < n_rows; r++) {
        for (int64_t i = 0; i < n; i++) f[i] = tsr_test_frand(&rng) * (1.0f + (float)(i % 7));
        tsr_quant_row(TSR_TYPE_Q4_0, f, w + (size_t)r * (size_t)(n / QK) * Q40_BYTES, n);
    }
    free(f);
}

static void make_acts(int64_t n, int n_tok, uint8_t *x, float *f)
{
    for (int t = 0; t < n_tok; t++) {
        float *ft = f + (size_t)t * (size_t)n;
        for (int64_t i = 0; i < n; i++) ft[i] = tsr_test_frand(&rng) * 3.0f;
        if (t == 2) /* an all-zero block and a block at the int8 extremes */
            for (int i = 0; i < QK && i + QK < n; i++) {
                ft[i] = 0.0f;
                ft[QK + i] = i % 2 ? 5.0f : -5.0f;
            }
        tsr_quant_act_row(TSR_TYPE_Q8_0, ft, x + (size_t)t * (size_t)(n / QK) * Q80_BYTES, n);
    }
}

static void test_gemm_order(void **state)
{
    (void)state;
    static const int64_t ns[] = {32, 96, 288, 2048};
    int n_differ_old = 0, n_differ_seq = 0, n_total = 0;
    for (size_t in = 0; in < sizeof ns / sizeof ns[0]; in++) {
        const int64_t n = ns[in], nb = n / QK;
        enum { MAXR = 37, MAXT = 13 };
        uint8_t *w = malloc((size_t)MAXR * (size_t)nb * Q40_BYTES);
        uint8_t *x = malloc((size_t)MAXT * (size_t)nb * Q80_BYTES);
        uint8_t *x4 = malloc((size_t)MAXT * (size_t)nb * Q80_BYTES);
        float *f = malloc(sizeof(float) * (size_t)(MAXT * n));
        make_weights(n, MAXR, w);
        make_acts(n, MAXT, x, f);
        const size_t row_b = (size_t)nb * Q40_BYTES, xs = (size_t)nb * Q80_BYTES;
        for (int t = 0; t < MAXT; t++) {
            ggml_quant_4x8_row(f + (size_t)t * (size_t)n, x4 + (size_t)t * xs, n);
            if (memcmp(x4 + (size_t)t * xs, x + (size_t)t * xs, xs) != 0)
                fail_msg("n %lld token %d: ggml_quantize_mat_q8_0_4x8's bytes differ from "
                         "tsr_quant_act_row's Q8_0",
                         (long long)n, t);
        }
        float ref[MAXT][MAXR];
        for (int t = 0; t < MAXT; t++) {
            for (int r = 0; r < MAXR; r++) {
                ref[t][r] = ggml_gemm_order(n, w + r * row_b, x + t * xs);
                const float old = old_row_order(n, w + r * row_b, x + t * xs);
                const float seq = seq_order(n, w + r * row_b, x + t * xs);
                n_total++;
                n_differ_old += tsr_test_fbits(old) != tsr_test_fbits(ref[t][r]);
                n_differ_seq += tsr_test_fbits(seq) != tsr_test_fbits(ref[t][r]);
                if (fabsf(old - ref[t][r]) > 1e-4f * (fabsf(ref[t][r]) + 1.0f) ||
                    fabsf(seq - ref[t][r]) > 1e-4f * (fabsf(ref[t][r]) + 1.0f))
                    fail_msg("old row order %.9g / sequential %.9g vs GEMM order %.9g: further "
                             "apart than rounding (a wrong transcription?)",
                             (double)old, (double)seq, (double)ref[t][r]);
            }
        }
        const size_t pk_bytes = tsr_repack_bytes(TSR_TYPE_Q4_0, n, MAXR);
        uint8_t *pk = aligned_alloc(64, (pk_bytes + 63) / 64 * 64);
        assert_int_equal(tsr_repack(TSR_TYPE_Q4_0, n, MAXR, w, row_b, pk), 0);
        const size_t gb = tsr_repack_group_bytes(TSR_TYPE_Q4_0, n);
        for (size_t ii = 0; ii < sizeof k_isas / sizeof k_isas[0]; ii++) {
            if (!tsr_quant_set_isa(k_isas[ii])) {
                printf("  (this CPU has no %s: not tested here)\n", k_isas[ii]);
                continue;
            }
            const int isa = tsr_ggml_isa();
            for (int nr = 1; nr <= MAXR; nr++) {
                for (int nt = 1; nt <= MAXT; nt++) {
                    float y[MAXT * MAXR], yp[MAXT * MAXR], yg[MAXT * MAXR];
                    tsr_q40_gemm_dot(isa, n, nr, w, row_b, nt, x, xs, y, MAXR);
                    /* group by group, and all the groups in one call (ops.c's way) */
                    for (int g = 0; g * 4 < nr; g++) {
                        const int rows = nr - 4 * g < 4 ? nr - 4 * g : 4;
                        tsr_q40_gemm_dot_repacked(isa, n, rows, pk + (size_t)g * gb, nt, x, xs,
                                                  yp + 4 * g, MAXR);
                    }
                    tsr_q40_gemm_dot_repacked(isa, n, nr, pk, nt, x, xs, yg, MAXR);
                    if (nt == 1) { /* the one-token entry points of quant.h and repack.h */
                        float yr[MAXR], yk[MAXR], yt[MAXR];
                        tsr_vec_dot_rows(TSR_TYPE_Q4_0, n, nr, w, row_b, x, yr);
                        tsr_repack_dot(TSR_TYPE_Q4_0, n, pk, 0, nr, 1, x, xs, yk, 1);
                        tsr_vec_dot_tile(TSR_TYPE_Q4_0, n, nr, w, row_b, 1, x, xs, yt, 1);
                        for (int r = 0; r < nr; r++) {
                            const float v = tsr_vec_dot(TSR_TYPE_Q4_0, n, w + r * row_b, x);
                            tsr_test_check_layouts(k_isas[ii], n, nr, 1, r, 0, ref[0][r], v, yr[r],
                                                   yk[r]);
                            tsr_test_check_layouts(k_isas[ii], n, nr, 1, r, 0, ref[0][r], yt[r],
                                                   yr[r], yk[r]);
                        }
                    }
                    for (int t = 0; t < nt; t++) {
                        for (int r = 0; r < nr; r++) {
                            tsr_test_check_layouts(k_isas[ii], n, nr, nt, r, t, ref[t][r],
                                                   y[t * MAXR + r], yp[t * MAXR + r],
                                                   yg[t * MAXR + r]);
                        }
                    }
                }
            }
        }
        tsr_quant_set_isa(NULL);
        free(pk);
        free(w);
        free(x);
        free(x4);
        free(f);
    }
    printf("  GEMM order differs from the old row order in %d and from the sequential sum in %d "
           "of %d dots\n",
           n_differ_old, n_differ_seq, n_total);
    if (n_differ_old == 0 || n_differ_seq == 0)
        fail_msg("the GEMM order never differed from another order: the test cannot tell them");
}

/* The matmul: a batch mixing both classes gives every token the GEMM order; so does each
 * token alone (one token a call, no classes: decode). n 8192 x 75 tokens: more than one of
 * the kernel's token blocks (64 tokens there), the last 4-token group partial; n_out 37 / 40:
 * a partial 4-row group and 16-row GEMV pass. */
static void check_matmul_ord(int64_t n, int n_tok, int64_t n_out)
{
    const size_t row_b = (size_t)(n / QK) * Q40_BYTES, xs = (size_t)(n / QK) * Q80_BYTES;
    uint8_t *w = malloc((size_t)n_out * row_b);
    make_weights(n, (int)n_out, w);
    float *x = malloc(sizeof(float) * (size_t)(n * n_tok));
    for (int64_t i = 0; i < n * n_tok; i++) x[i] = tsr_test_frand(&rng);
    uint8_t *xq = malloc((size_t)n_tok * xs);
    for (int t = 0; t < n_tok; t++)
        tsr_quant_act_row(TSR_TYPE_Q8_0, x + (size_t)t * (size_t)n, xq + (size_t)t * xs, n);
    static const uint8_t pattern[11] = {1, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0};
    uint8_t *ord = malloc((size_t)n_tok);
    for (int t = 0; t < n_tok; t++) ord[t] = pattern[t % 11];
    uint8_t *pk = aligned_alloc(64, (tsr_repack_bytes(TSR_TYPE_Q4_0, n, n_out) + 63) / 64 * 64);
    assert_int_equal(tsr_repack(TSR_TYPE_Q4_0, n, n_out, w, row_b, pk), 0);
    tsr_pool *pool = tsr_pool_new(2);
    assert_non_null(pool);
    for (int variant = 0; variant < 3; variant++) {
        /* 0: file layout only, 1: file + repacked copy, 2: repacked only (a column slice) */
        tsr_weight wt = {.type = TSR_TYPE_Q4_0,
                         .n_in = n,
                         .n_out = n_out,
                         .row_bytes = row_b,
                         .data = variant == 2 ? NULL : w,
                         .packed = variant == 0 ? NULL : pk};
        const tsr_weight *ws[1] = {&wt};
        float *y = malloc(sizeof(float) * (size_t)(n_out * n_tok));
        float *ys[1] = {y};
        void *scratch = malloc(tsr_matmul_multi_scratch_bytes(ws, 1, n_tok));
        tsr_matmul_multi_ord(pool, ws, ys, 1, x, n_tok, ord, scratch);
        float *y1 = malloc(sizeof(float) * (size_t)(n_out * n_tok));
        void *scratch1 = malloc(tsr_matmul_multi_scratch_bytes(ws, 1, 1));
        for (int t = 0; t < n_tok; t++) {
            float *yt[1] = {y1 + (size_t)t * (size_t)n_out};
            tsr_matmul_multi(pool, ws, yt, 1, x + (size_t)t * (size_t)n, 1, scratch1);
        }
        int n_old_differ = 0;
        for (int t = 0; t < n_tok; t++) {
            for (int64_t r = 0; r < n_out; r++) {
                const uint8_t *xt = xq + (size_t)t * xs;
                const float e = ggml_gemm_order(n, w + r * row_b, xt);
                n_old_differ +=
                    tsr_test_fbits(old_row_order(n, w + r * row_b, xt)) != tsr_test_fbits(e);
                const float a = y[(size_t)t * (size_t)n_out + (size_t)r];
                const float a1 = y1[(size_t)t * (size_t)n_out + (size_t)r];
                if (tsr_test_fbits(a) != tsr_test_fbits(e) ||
                    tsr_test_fbits(a1) != tsr_test_fbits(e))
                    fail_msg("layout variant %d, token %d (class %d) row %lld: expected %.9g "
                             "(0x%08x), got %.9g (0x%08x) in the batch, %.9g (0x%08x) alone",
                             variant, t, ord[t], (long long)r, (double)e, tsr_test_fbits(e),
                             (double)a, tsr_test_fbits(a), (double)a1, tsr_test_fbits(a1));
            }
        }
        if (n_old_differ == 0)
            fail_msg("n %lld: the old row order never differs: the test cannot tell them",
                     (long long)n);
        free(scratch1);
        free(y1);
        free(scratch);
        free(y);
    }
    tsr_pool_free(pool);
    free(ord);
    free(pk);
    free(xq);
    free(x);
    free(w);
}

static void test_matmul_ord(void **state)
{
    (void)state;
    check_matmul_ord(512, 11, 37);
    check_matmul_ord(8192, 75, 40);
}

/* Sum of |logit - llama.cpp's| over the reference's top-5 ids ('id:logit ...'). */
static float ref_dist(const char *ref, const float *lg)
{
    int32_t ids[8];
    float vals[8];
    const size_t n = tsr_test_parse_logits(ref, ids, vals, 8);
    float s = 0.0f;
    for (size_t i = 0; i < n; i++) s += fabsf(lg[ids[i]] - vals[i]);
    return s;
}

static void test_synth_prompt_order(void **state)
{
    (void)state;
    tsr_test_block *b;
    const size_t nb =
        tsr_test_parse_blocks(tsr_test_model_path("expected/synth-tiny-expected.txt"), &b);
    int n_cases = 0;
    float dist[2] = {0.0f, 0.0f};
    int n_vocab = 0;
    for (size_t i = 0; i < nb; i++) {
        const char *model = tsr_test_block_get(&b[i], "model");
        const char *pids = tsr_test_block_get(&b[i], "prompt_ids");
        const char *gids = tsr_test_block_get(&b[i], "greedy_ids");
        const char *llama = tsr_test_block_get(&b[i], "top5_logits_after_prompt_llama");
        if (!model || !pids || !gids || !llama || !strstr(model, "-q4_0.gguf")) continue;
        int32_t *prompt_ids, *want;
        const size_t n_prompt = tsr_test_parse_ids(pids, &prompt_ids);
        const size_t n_want = tsr_test_parse_ids(gids, &want);
        float *lg_cls[2] = {NULL, NULL};
        for (int cls = 0; cls < 2; cls++) {
            tsr_test_model f;
            /* f16 K/V: llama.cpp's cache type when it made the references */
            tsr_test_model_open(&f, tsr_test_model_path(model), 512, 64, 2, TSR_KV_F16);
            tsr_ctx_set_prompt_len(f.c, cls ? (int32_t)n_prompt : 0);
            int32_t *got = malloc(sizeof(int32_t) * n_want);
            float *lg = malloc(sizeof(float) * (size_t)f.m->hp.n_vocab);
            tsr_test_greedy(&f, prompt_ids, n_prompt, (int32_t)n_want, got, lg);
            char what[256];
            snprintf(what, sizeof what, "%s prompt %s, prompt in class %d", model,
                     tsr_test_block_get(&b[i], "prompt"), cls);
            tsr_test_check_ids(what, want, got, n_want);
            tsr_test_check_logits(what, llama, lg, 0.3f);
            dist[cls] += ref_dist(llama, lg);
            n_vocab = f.m->hp.n_vocab;
            lg_cls[cls] = lg;
            free(got);
            tsr_test_model_close(&f);
        }
        /* Q4_0 has one order: the prompt's class changes nothing */
        for (int v = 0; v < n_vocab; v++)
            if (tsr_test_fbits(lg_cls[0][v]) != tsr_test_fbits(lg_cls[1][v]))
                fail_msg("%s: logit %d after the prompt %.9g in class 0, %.9g in class 1", model, v,
                         (double)lg_cls[0][v], (double)lg_cls[1][v]);
        free(lg_cls[0]);
        free(lg_cls[1]);
        free(prompt_ids);
        free(want);
        n_cases++;
    }
    tsr_test_blocks_free(b, nb);
    if (n_cases == 0) fail_msg("no synth-tiny-q4_0 case in expected/synth-tiny-expected.txt");
    printf("  synth-tiny-q4_0, %d prompts: sum over the top-5 of |logit - llama.cpp's| after the "
           "prompt: %.6f with the prompt in class 0, %.6f in class 1 (one order: equal)\n",
           n_cases, (double)dist[0], (double)dist[1]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gemm_order),
        cmocka_unit_test(test_matmul_ord),
        cmocka_unit_test(test_synth_prompt_order),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
