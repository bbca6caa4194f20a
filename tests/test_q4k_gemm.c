/*
 * test_q4k_gemm.c — kernels/q4k_gemm: Q4_K x Q8_K in the order of llama.cpp's repacked Q4_K
 * GEMM (the prompt order class of worker/model.h).
 *
 * - Every ISA path (scalar, AVX2, AVX-512 VNNI where the CPU has it), 1..9 rows x 1..9 tokens,
 *   the file layout and the repacked groups (kernels/repack.h) give the same bits, and those
 *   bits are the order this test spells out independently from ggml's x86 source
 *   (ggml_gemm_q4_K_8x8_q8_K: per super-block and per 64 elements an exact int32 of the two
 *   sub-blocks' scaled dots and one of their mins x bsums, each turned into float and FMAed
 *   into its accumulator with d_w * d_x resp. dmin_w * d_x; result acc - acc_min).
 * - The activations: ggml_quantize_mat_q8_K_4x8 (transcribed from its AVX2 source: the
 *   positive maximum wins a tie of |x|) gives the same dot bits as tsr_quant_row's Q8_K
 *   (quantize_row_q8_K_ref: the first maximum wins), including a block where they differ in
 *   sign.
 * - The order is not the GEMV's (tsr_vec_dot): some results differ, all within 1e-4
 *   relative, so the test would notice a kernel that fell back to the GEMV order.
 * - tsr_matmul_multi_ord: tokens of class 1 get the GEMM order and tokens of class 0 the row
 *   dots', whatever their mix in the batch, with and without a repacked copy.
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
#include "kernels/q4k_gemm.h"
#include "kernels/quant.h"
#include "kernels/repack.h"
#include "tests/util.h"

static uint64_t rng = 0x9E3779B97F4A7C15ull;
enum { QK = 256, Q4K_BYTES = 144, Q8K_BYTES = 292 };

/* ggml's block_q4_K / block_q8_K fields, read by offset (not through kernels' structs). */
static uint16_t rd16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* ggml_gemm_q4_K_8x8_q8_K (AVX2 / AVX-512 branches) for one output lane (row, token). */
static float ggml_gemm_order(int64_t n, const uint8_t *w, const uint8_t *x)
{
    static const uint32_t kmask1 = 0x3f3f3f3f, kmask2 = 0x0f0f0f0f, kmask3 = 0x03030303;
    float acc = 0.0f, acc_min = 0.0f;
    for (int64_t b = 0; b < n / QK; b++) {
        const uint8_t *wb = w + b * Q4K_BYTES, *xb = x + b * Q8K_BYTES;
        const float col_scale = tsr_f16_to_f32(rd16(wb)), col_dmin = tsr_f16_to_f32(rd16(wb + 2));
        float row_scale;
        memcpy(&row_scale, xb, 4);
        const int8_t *q8 = (const int8_t *)(xb + 4);
        int16_t bsums[16];
        memcpy(bsums, xb + 4 + QK, 32);
        uint32_t utmp[4];
        memcpy(utmp, wb + 4, 12);
        utmp[3] = ((utmp[2] >> 4) & kmask2) | (((utmp[1] >> 6) & kmask3) << 4);
        const uint32_t uaux = utmp[1] & kmask1;
        utmp[1] = (utmp[2] & kmask2) | (((utmp[0] >> 6) & kmask3) << 4);
        utmp[2] = uaux;
        utmp[0] &= kmask1;
        const uint8_t *scales = (const uint8_t *)utmp, *mins = (const uint8_t *)utmp + 8;
        for (int sb = 0; sb < QK / 64; sb++) {
            /* iacc_row: the two 32-element sub-blocks' dots times their scales */
            int32_t dot0 = 0, dot1 = 0;
            for (int l = 0; l < 32; l++) {
                const uint8_t byte = wb[16 + 32 * sb + l];
                dot0 += (byte & 0xF) * q8[64 * sb + l];
                dot1 += (byte >> 4) * q8[64 * sb + 32 + l];
            }
            const int32_t iacc = dot0 * scales[2 * sb] + dot1 * scales[2 * sb + 1];
            /* iacc_row_min: hadd of the bsums (16 elements each) times the mins */
            const int32_t bs0 = bsums[4 * sb] + bsums[4 * sb + 1];
            const int32_t bs1 = bsums[4 * sb + 2] + bsums[4 * sb + 3];
            const int32_t imin = bs0 * mins[2 * sb] + bs1 * mins[2 * sb + 1];
            acc = fmaf((float)iacc, col_scale * row_scale, acc);
            acc_min = fmaf((float)imin, col_dmin * row_scale, acc_min);
        }
    }
    return acc - acc_min;
}

/* ggml_quantize_mat_q8_K_4x8's AVX2 arithmetic for one row, written as block_q8_K: amax,
 * iscale = -127 / amax when +amax occurs in the block, else 127 / amax; d = 1 / iscale;
 * q = round-half-even(x * iscale); bsums per 16. */
static void ggml_quant_4x8_row(const float *x, uint8_t *out, int64_t n)
{
    for (int64_t b = 0; b < n / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax;
        bool pos = false;
        for (int i = 0; i < QK; i++) pos |= xb[i] == amax;
        float iscale = amax != 0.0f ? 127.f / amax : 0.0f;
        if (pos) iscale = amax != 0.0f ? -127.f / amax : 0.0f;
        const float d = amax != 0.0f ? 1 / iscale : 0.0f;
        uint8_t *ob = out + b * Q8K_BYTES;
        memcpy(ob, &d, 4);
        int8_t q[QK];
        for (int i = 0; i < QK; i++) {
            float v = nearbyintf(xb[i] * iscale); /* round to nearest even (default mode) */
            q[i] = (int8_t)(v > 127 ? 127 : v < -128 ? -128 : v);
        }
        memcpy(ob + 4, q, QK);
        int16_t bs[16];
        for (int j = 0; j < 16; j++) {
            int s = 0;
            for (int i = 0; i < 16; i++) s += q[16 * j + i];
            bs[j] = (int16_t)s;
        }
        memcpy(ob + 4 + QK, bs, 32);
    }
}

static const char *const k_isas[] = {"scalar", "avx2", "avx512vnni"};

static void make_weights(int64_t n, int n_rows, uint8_t *w)
{
    float *f = malloc(sizeof(float) * (size_t)n);
    for (int r = 0; r < n_rows; r++) {
        for (int64_t i = 0; i < n; i++) f[i] = tsr_test_frand(&rng) * (1.0f + (float)(i % 7));
        tsr_quant_row(TSR_TYPE_Q4_K, f, w + (size_t)r * (size_t)(n / QK) * Q4K_BYTES, n);
    }
    free(f);
}

static void make_acts(int64_t n, int n_tok, uint8_t *x, float *f)
{
    for (int t = 0; t < n_tok; t++) {
        float *ft = f + (size_t)t * (size_t)n;
        for (int64_t i = 0; i < n; i++) ft[i] = tsr_test_frand(&rng) * 3.0f;
        if (t == 1) { /* |x| tie: -amax first, then +amax (the quantizers differ in sign) */
            ft[3] = -7.5f;
            ft[200] = 7.5f;
        }
        tsr_quant_row(TSR_TYPE_Q8_K, ft, x + (size_t)t * (size_t)(n / QK) * Q8K_BYTES, n);
    }
}

static void test_gemm_order(void **state)
{
    (void)state;
    static const int64_t ns[] = {256, 512, 2048};
    int n_differ = 0, n_total = 0;
    for (size_t in = 0; in < sizeof ns / sizeof ns[0]; in++) {
        const int64_t n = ns[in], nsb = n / QK;
        enum { MAXR = 20, MAXT = 9 }; /* rows: one 16-row AVX-512 tile and a partial one */
        uint8_t *w = malloc((size_t)MAXR * (size_t)nsb * Q4K_BYTES);
        uint8_t *x = malloc((size_t)MAXT * (size_t)nsb * Q8K_BYTES);
        uint8_t *x4 = malloc((size_t)MAXT * (size_t)nsb * Q8K_BYTES);
        float *f = malloc(sizeof(float) * (size_t)(MAXT * n));
        make_weights(n, MAXR, w);
        make_acts(n, MAXT, x, f);
        for (int t = 0; t < MAXT; t++)
            ggml_quant_4x8_row(f + (size_t)t * (size_t)n, x4 + (size_t)t * (size_t)nsb * Q8K_BYTES,
                               n);
        const size_t row_b = (size_t)nsb * Q4K_BYTES, xs = (size_t)nsb * Q8K_BYTES;
        { /* token 1's first block is the tie: the two quantizers' scales differ in sign */
            float d_ref, d_4x8;
            memcpy(&d_ref, x + xs, 4);
            memcpy(&d_4x8, x4 + xs, 4);
            if (!(d_ref == -d_4x8 && d_ref != 0.0f))
                fail_msg("tie block: expected scales of opposite sign, got %g and %g",
                         (double)d_ref, (double)d_4x8);
        }
        float ref[MAXT][MAXR];
        for (int t = 0; t < MAXT; t++) {
            for (int r = 0; r < MAXR; r++) {
                ref[t][r] = ggml_gemm_order(n, w + r * row_b, x + t * xs);
                const float r4 = ggml_gemm_order(n, w + r * row_b, x4 + t * xs);
                if (tsr_test_fbits(r4) != tsr_test_fbits(ref[t][r]))
                    fail_msg("n %lld row %d token %d: ggml's 4x8 quantizer gives %.9g (0x%08x), "
                             "quantize_row_q8_K %.9g (0x%08x)",
                             (long long)n, r, t, (double)r4, tsr_test_fbits(r4), (double)ref[t][r],
                             tsr_test_fbits(ref[t][r]));
                const float gemv = tsr_vec_dot(TSR_TYPE_Q4_K, n, w + r * row_b, x + t * xs);
                n_total++;
                n_differ += tsr_test_fbits(gemv) != tsr_test_fbits(ref[t][r]);
                if (fabsf(gemv - ref[t][r]) > 1e-4f * (fabsf(ref[t][r]) + 1.0f))
                    fail_msg("GEMV %.9g vs GEMM order %.9g: further apart than rounding",
                             (double)gemv, (double)ref[t][r]);
            }
        }
        /* the same rows, repacked into groups of 4 */
        const size_t pk_bytes = tsr_repack_bytes(TSR_TYPE_Q4_K, n, MAXR);
        uint8_t *pk = aligned_alloc(64, (pk_bytes + 63) / 64 * 64);
        assert_int_equal(tsr_repack(TSR_TYPE_Q4_K, n, MAXR, w, row_b, pk), 0);
        const size_t gb = tsr_repack_group_bytes(TSR_TYPE_Q4_K, n);
        for (size_t ii = 0; ii < sizeof k_isas / sizeof k_isas[0]; ii++) {
            if (!tsr_quant_set_isa(k_isas[ii])) {
                printf("  (this CPU has no %s: not tested here)\n", k_isas[ii]);
                continue;
            }
            const int isa = tsr_ggml_isa();
            /* AVX2: the default choice of kernel, then each of its two kernels for every
             * token count (tsr_q4k_gemm_set_y256) */
            const bool avx2 = strcmp(k_isas[ii], "avx2") == 0;
            for (int mode = 1; mode <= (avx2 ? 3 : 1); mode++) {
                const char *label = mode == 1   ? k_isas[ii]
                                    : mode == 2 ? "avx2, 2-row tile"
                                                : "avx2, 8-row lanes";
                tsr_q4k_gemm_set_y256(mode == 1 ? -1 : mode == 2 ? 0 : 2);
                for (int nr = 1; nr <= MAXR; nr++) {
                    for (int nt = 1; nt <= MAXT; nt++) {
                        float y[MAXT * MAXR], yp[MAXT * MAXR], yg[MAXT * MAXR];
                        tsr_q4k_gemm_dot(isa, n, nr, w, row_b, Q4K_BYTES, nt, x, xs, y, MAXR);
                        for (int g = 0; g * 4 < nr; g++) {
                            const int rows = nr - 4 * g < 4 ? nr - 4 * g : 4;
                            tsr_q4k_gemm_dot(isa, n, rows, pk + (size_t)g * gb, Q4K_BYTES,
                                             4 * Q4K_BYTES, nt, x, xs, yp + 4 * g, MAXR);
                        }
                        /* all the groups in one call (ops.c's way) */
                        tsr_q4k_gemm_dot_grouped(isa, n, nr, pk, 4, gb, Q4K_BYTES, 4 * Q4K_BYTES,
                                                 nt, x, xs, yg, MAXR);
                        for (int t = 0; t < nt; t++) {
                            for (int r = 0; r < nr; r++) {
                                tsr_test_check_layouts(label, n, nr, nt, r, t, ref[t][r],
                                                       y[t * MAXR + r], yp[t * MAXR + r],
                                                       yg[t * MAXR + r]);
                            }
                        }
                    }
                }
            }
            tsr_q4k_gemm_set_y256(-1);
        }
        tsr_quant_set_isa(NULL);
        free(pk);
        free(w);
        free(x);
        free(x4);
        free(f);
    }
    printf("  GEMM order differs from the GEMV order in %d of %d dots\n", n_differ, n_total);
    if (n_differ == 0)
        fail_msg("the GEMM and GEMV orders never differed: the test cannot tell them");
}

/* The matmul: a batch mixing both classes gives each token its class's order. n 8192 x 75
 * tokens: more than one of the kernel's L2-sized token blocks (68 tokens there), the last
 * 4-token group partial. */
static void check_matmul_ord(int64_t n, int n_tok)
{
    const int64_t n_out = 40;
    const size_t row_b = (size_t)(n / QK) * Q4K_BYTES;
    uint8_t *w = malloc((size_t)n_out * row_b);
    make_weights(n, (int)n_out, w);
    float *x = malloc(sizeof(float) * (size_t)(n * n_tok));
    for (int64_t i = 0; i < n * n_tok; i++) x[i] = tsr_test_frand(&rng);
    uint8_t *xq = malloc((size_t)n_tok * (size_t)(n / QK) * Q8K_BYTES);
    for (int t = 0; t < n_tok; t++)
        tsr_quant_act_row(TSR_TYPE_Q8_K, x + (size_t)t * (size_t)n,
                          xq + (size_t)t * (size_t)(n / QK) * Q8K_BYTES, n);
    static const uint8_t pattern[11] = {1, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0};
    uint8_t *ord = malloc((size_t)n_tok);
    for (int t = 0; t < n_tok; t++) ord[t] = pattern[t % 11];
    uint8_t *pk = aligned_alloc(64, (tsr_repack_bytes(TSR_TYPE_Q4_K, n, n_out) + 63) / 64 * 64);
    assert_int_equal(tsr_repack(TSR_TYPE_Q4_K, n, n_out, w, row_b, pk), 0);
    tsr_pool *pool = tsr_pool_new(2);
    assert_non_null(pool);
    for (int variant = 0; variant < 3; variant++) {
        /* 0: file layout only, 1: file + repacked copy, 2: repacked only (a column slice) */
        tsr_weight wt = {.type = TSR_TYPE_Q4_K,
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
        for (int t = 0; t < n_tok; t++) {
            for (int64_t r = 0; r < n_out; r++) {
                const uint8_t *xt = xq + (size_t)t * (size_t)(n / QK) * Q8K_BYTES;
                const float e = ord[t] ? ggml_gemm_order(n, w + r * row_b, xt)
                                       : tsr_vec_dot(TSR_TYPE_Q4_K, n, w + r * row_b, xt);
                const float a = y[(size_t)t * (size_t)n_out + (size_t)r];
                if (tsr_test_fbits(a) != tsr_test_fbits(e))
                    fail_msg("layout variant %d, token %d (class %d) row %lld: expected %.9g "
                             "(0x%08x), got %.9g (0x%08x)",
                             variant, t, ord[t], (long long)r, (double)e, tsr_test_fbits(e),
                             (double)a, tsr_test_fbits(a));
            }
        }
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
    check_matmul_ord(512, 11);
    check_matmul_ord(8192, 75);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gemm_order),
        cmocka_unit_test(test_matmul_ord),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
