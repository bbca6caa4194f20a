/*
 * test_dot_ggml.c — kernels/dot_ggml: the ggml-exact primitives.
 *
 * - Q4_1 x Q8_1 and Q8_0 x Q8_0 dots: every ISA path (scalar, AVX2, AVX-512 VNNI), rows
 *   and tiles (1..13 tokens) give the same bits, Q8_0 blocks of all -128 and 127 included,
 *   and those bits are the order this test spells out independently from ggml's x86 source
 *   (ggml_vec_dot_*: 8 int lanes of 4 products per block, one FMA per block into one 8-lane
 *   accumulator, hsum_float_8, Q4_1's min term as an FMA chain added last). The VNNI Q8_0
 *   tiles from a matmul's prep (tsr_ggml_dot_tile_prep: activations laid out once) give the
 *   same bits for any token range of it, rows short and long (its workspace on the stack
 *   and on the heap).
 * - Activation quantizer (ggml's x86 quantize_row_q8_0 / q8_1): hand-made blocks whose
 *   quants fall on .5 round half to even (the reference quantizer rounds them away from
 *   zero), d = amax/127, s = fp16(d * sum); every ISA gives the same bytes.
 * - SwiGLU (ggml_vec_swiglu_f32 with the AVX-512 ggml_v_expf): scalar and AVX2 give the
 *   same bits over a sweep that includes the range ends, within 8 float ulp of float64
 *   (ggml's polynomial is within ~1.5 ulp of exp; the division and products add theirs), and
 *   the elements past the last whole 16 use libm.
 * A failure prints what was expected and what came.
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
#include "kernels/quant.h"
#include "tests/util.h"

static const char *const k_isas[] = {"scalar", "avx2", "avx512vnni"};

static uint64_t rng = 0x243F6A8885A308D3ull;
/* ggml's order, spelled out from its x86 source (not from kernels/dot_ggml.c). */
static float ggml_order_dot(uint32_t type, int64_t n, const uint8_t *w, const uint8_t *x)
{
    float acc[8] = {0}, summs = 0.0f;
    for (int64_t b = 0; b < n / 32; ++b) {
        uint16_t h;
        float dw, dx;
        int q[32], y[32];
        if (type == TSR_TYPE_Q8_0) {
            memcpy(&h, w, 2), dw = tsr_f16_to_f32(h);
            memcpy(&h, x, 2), dx = tsr_f16_to_f32(h);
            for (int e = 0; e < 32; ++e) q[e] = ((const int8_t *)w)[2 + e];
            for (int e = 0; e < 32; ++e) y[e] = ((const int8_t *)x)[2 + e];
            w += 34, x += 34;
        } else {
            float m, s;
            memcpy(&h, w, 2), dw = tsr_f16_to_f32(h);
            memcpy(&h, w + 2, 2), m = tsr_f16_to_f32(h);
            memcpy(&h, x, 2), dx = tsr_f16_to_f32(h);
            memcpy(&h, x + 2, 2), s = tsr_f16_to_f32(h);
            for (int e = 0; e < 16; ++e) q[e] = w[4 + e] & 0xF, q[e + 16] = w[4 + e] >> 4;
            for (int e = 0; e < 32; ++e) y[e] = ((const int8_t *)x)[4 + e];
            summs = fmaf(m, s, summs); /* `summs += m*s` contracted by GCC */
            w += 20, x += 36;
        }
        const float dd = dw * dx; /* _mm256_mul_ps(set1(d0), set1(d1)) */
        for (int l = 0; l < 8; ++l) {
            const int lane = q[4 * l] * y[4 * l] + q[4 * l + 1] * y[4 * l + 1] +
                             q[4 * l + 2] * y[4 * l + 2] + q[4 * l + 3] * y[4 * l + 3];
            acc[l] = fmaf(dd, (float)lane, acc[l]); /* _mm256_fmadd_ps(d0d1, xy, acc) */
        }
    }
    /* hsum_float_8: hi128 + lo128, then movehl, then movehdup (add_ss) */
    float r[4];
    for (int i = 0; i < 4; ++i) r[i] = acc[4 + i] + acc[i];
    const float h = (r[0] + r[2]) + (r[1] + r[3]);
    return type == TSR_TYPE_Q4_1 ? h + summs : h;
}

static void check_dots(uint32_t type, int N)
{
    enum { ROWS = 13, TOK = 13 }; /* 13 tokens: 3 VNNI Q8_0 tiles */
    const uint32_t vt = tsr_type_vec_dot_type(type);
    const size_t rb = tsr_row_bytes(type, N), xb = tsr_row_bytes(vt, N);
    uint8_t *w = malloc(rb * ROWS), *x = malloc(xb * TOK);
    float *ref = malloc(sizeof(float) * ROWS * TOK), *got = malloc(sizeof(float) * ROWS * TOK);
    float row[N];
    for (int r = 0; r < ROWS; ++r) {
        for (int i = 0; i < N; ++i) row[i] = tsr_test_frand(&rng) * (r == 3 ? 1e-3f : 1.0f);
        tsr_quant_row(type, row, w + (size_t)r * rb, N);
    }
    for (int t = 0; t < TOK; ++t) {
        for (int i = 0; i < N; ++i) row[i] = tsr_test_frand(&rng) * (float)(1 + 5 * t);
        if (t == 2) memset(row, 0, sizeof(float) * 64); /* all-zero blocks: d = 0 */
        tsr_quant_act_row(vt, row, x + (size_t)t * xb, N);
    }
    if (type == TSR_TYPE_Q8_0) {
        /* the dots' ends: block 1 of rows 5 and 6 all -128 (a file may hold it, the quantizer
         * never writes it) and all 127, of token 4 all -127 (the activation quantizer's end):
         * 4-sums of 65024 and -64516, the largest the VNNI tiles' float conversion sees */
        memset(w + 5 * rb + 34 + 2, 0x80, 32);
        memset(w + 6 * rb + 34 + 2, 0x7f, 32);
        memset(x + 4 * xb + 34 + 2, 0x81, 32);
    }
    for (int t = 0; t < TOK; ++t)
        for (int r = 0; r < ROWS; ++r)
            ref[t * ROWS + r] = ggml_order_dot(type, N, w + (size_t)r * rb, x + (size_t)t * xb);
    int n_isa = 0;
    for (size_t ii = 0; ii < sizeof k_isas / sizeof k_isas[0]; ++ii) {
        if (!tsr_quant_set_isa(k_isas[ii])) continue;
        n_isa++;
        for (int nt = 1; nt <= TOK; ++nt) {
            memset(got, 0, sizeof(float) * ROWS * TOK);
            if (nt == 1)
                tsr_vec_dot_rows(type, N, ROWS, w, rb, x, got);
            else
                tsr_vec_dot_tile(type, N, ROWS, w, rb, nt, x, xb, got, ROWS);
            for (int t = 0; t < nt; ++t)
                for (int r = 0; r < ROWS; ++r)
                    if (tsr_test_fbits(got[t * ROWS + r]) != tsr_test_fbits(ref[t * ROWS + r]))
                        fail_msg("%s %s, %d tokens: row %d token %d: ggml's order %.9g (0x%08x), "
                                 "got %.9g (0x%08x)",
                                 tsr_type_name(type), k_isas[ii], nt, r, t,
                                 (double)ref[t * ROWS + r], tsr_test_fbits(ref[t * ROWS + r]),
                                 (double)got[t * ROWS + r], tsr_test_fbits(got[t * ROWS + r]));
        }
        if (!tsr_ggml_tile_prep_used(type, tsr_ggml_isa(), N, TOK)) continue;
        /* a matmul's prep of all TOK tokens, tiles for token ranges t0.. of it */
        void *prep = aligned_alloc(64, tsr_ggml_tile_prep_bytes(type, N, TOK));
        assert_non_null(prep);
        for (int t = 0; t < TOK; ++t) tsr_ggml_tile_prep(N, TOK, t, x + (size_t)t * xb, prep);
        for (int t0 = 0; t0 <= 3; t0 += 3)
            for (int nt = 1; t0 + nt <= TOK; ++nt) {
                memset(got, 0, sizeof(float) * ROWS * TOK);
                tsr_ggml_dot_tile_prep(N, ROWS, w, rb, TOK, t0, nt, prep, x + (size_t)t0 * xb, xb,
                                       got, ROWS);
                for (int t = 0; t < nt; ++t)
                    for (int r = 0; r < ROWS; ++r) {
                        const float want = ref[(t0 + t) * ROWS + r], g = got[t * ROWS + r];
                        if (tsr_test_fbits(g) != tsr_test_fbits(want))
                            fail_msg("%s %s from a prep, %d elements, tokens %d..%d: row %d token "
                                     "%d: ggml's order %.9g (0x%08x), got %.9g (0x%08x)",
                                     tsr_type_name(type), k_isas[ii], N, t0, t0 + nt - 1, r, t0 + t,
                                     (double)want, tsr_test_fbits(want), (double)g,
                                     tsr_test_fbits(g));
                    }
            }
        free(prep);
    }
    tsr_quant_set_isa(NULL);
    printf("%s, %d elements: %d ISA paths x rows/tiles of 1..%d tokens equal ggml's order bit "
           "for bit\n",
           tsr_type_name(type), N, n_isa, TOK);
    free(w);
    free(x);
    free(ref);
    free(got);
}

static void test_dot_q4_1(void **state)
{
    (void)state;
    check_dots(TSR_TYPE_Q4_1, 576);
}

static void test_dot_q8_0(void **state)
{
    (void)state;
    /* both register forms of the VNNI tiles (zmm, ymm: kernels/dot_ggml.h), whichever is
     * this CPU's default */
    for (int ymm = 0; ymm <= 1; ++ymm) {
        tsr_ggml_dot_set_tile_ymm(ymm);
        printf("VNNI Q8_0 tiles in %s registers:\n", ymm ? "256-bit" : "512-bit");
        check_dots(TSR_TYPE_Q8_0, 576);
        check_dots(TSR_TYPE_Q8_0, 8320); /* 260 blocks: the shared tiles' workspace on the heap */
        check_dots(TSR_TYPE_Q8_0, 2048 + 96); /* 67 blocks: a partial chunk of 8 */
        check_dots(TSR_TYPE_Q8_0, 224); /* 7 blocks: a partial chunk past its first 4 */
    }
    tsr_ggml_dot_set_vbmi(false); /* the zmm tiles' other scale extraction */
    tsr_ggml_dot_set_tile_ymm(0);
    check_dots(TSR_TYPE_Q8_0, 576);
    tsr_ggml_dot_set_tile_ymm(-1);
    tsr_ggml_dot_set_vbmi(true);
}

static void test_act_quant(void **state)
{
    (void)state;
    /* amax 127 -> d = 1, id = 1: the quants are x rounded half to even */
    float x[64];
    for (int i = 0; i < 32; ++i) x[i] = 0.0f;
    x[0] = 127.0f, x[1] = 2.5f, x[2] = 3.5f, x[3] = -2.5f, x[4] = 0.5f, x[5] = -1.5f,
    x[6] = 1.4999999f, x[7] = -126.5f;
    static const int8_t want[8] = {127, 2, 4, -2, 0, -2, 1, -126};
    /* second block: amax 0.3 -> d = 0.3/127, id = 127/0.3 */
    for (int i = 0; i < 32; ++i) x[32 + i] = 0.3f * (float)(i - 16) / 16.0f;
    for (size_t ii = 0; ii < sizeof k_isas / sizeof k_isas[0]; ++ii) {
        if (!tsr_quant_set_isa(k_isas[ii])) continue;
        uint8_t q0[2 * 34], q1[2 * 36];
        tsr_quant_act_row(TSR_TYPE_Q8_0, x, q0, 64);
        tsr_quant_act_row(TSR_TYPE_Q8_1, x, q1, 64);
        int32_t sum = 0;
        for (int i = 0; i < 8; ++i) {
            if ((int8_t)q0[2 + i] != want[i] || (int8_t)q1[4 + i] != want[i])
                fail_msg("%s: x = %.9g: expected quant %d (half to even), got Q8_0 %d, Q8_1 %d",
                         k_isas[ii], (double)x[i], want[i], (int8_t)q0[2 + i], (int8_t)q1[4 + i]);
            sum += want[i];
        }
        uint16_t d, s;
        memcpy(&d, q1, 2);
        memcpy(&s, q1 + 2, 2);
        if (tsr_f16_to_f32(d) != 1.0f || tsr_f16_to_f32(s) != (float)sum)
            fail_msg("%s: Q8_1 block 0: expected d 1, s %d; got %.9g, %.9g", k_isas[ii], sum,
                     (double)tsr_f16_to_f32(d), (double)tsr_f16_to_f32(s));
        memcpy(&d, q0 + 34, 2);
        const float want_d = 0.3f / 127.f, id = 127.f / 0.3f;
        if (d != tsr_f32_to_f16(want_d))
            fail_msg("%s: block 1: expected d fp16(%.9g), got %.9g", k_isas[ii], (double)want_d,
                     (double)tsr_f16_to_f32(d));
        for (int i = 0; i < 32; ++i) {
            const float v = x[32 + i] * id;
            const float r = nearbyintf(v); /* default rounding: to nearest even */
            if ((int8_t)q0[36 + i] != (int8_t)r)
                fail_msg("%s: block 1 element %d: x*id = %.9g, expected %d, got %d", k_isas[ii], i,
                         (double)v, (int)r, (int8_t)q0[36 + i]);
        }
    }
    tsr_quant_set_isa(NULL);
}

static void test_swiglu(void **state)
{
    (void)state;
    enum { N = 4096 + 5 }; /* 5 past the last whole 16: libm */
    float *g = malloc(sizeof(float) * N), *u = malloc(sizeof(float) * N);
    float *a = malloc(sizeof(float) * N), *b = malloc(sizeof(float) * N);
    for (int i = 0; i < N; ++i) {
        g[i] = 12.0f * tsr_test_frand(&rng);
        u[i] = tsr_test_frand(&rng);
    }
    static const float ends[] = {0.0f,   -0.0f,   88.0f,  -88.0f,  88.8f, -88.8f, 104.0f, -104.0f,
                                 150.0f, -150.0f, 1e-30f, -1e-30f, 30.0f, -30.0f, 1e30f,  -1e30f};
    for (size_t i = 0; i < sizeof ends / sizeof ends[0]; ++i) g[i] = ends[i];
    int n_isa = 0;
    for (size_t ii = 0; ii < 2; ++ii) { /* the AVX-512 machine runs the AVX2 code */
        if (!tsr_quant_set_isa(k_isas[ii])) continue;
        float *o = ii == 0 ? a : b;
        memcpy(o, g, sizeof(float) * N);
        tsr_swiglu(o, u, N);
        n_isa++;
    }
    tsr_quant_set_isa(NULL);
    if (n_isa == 2)
        for (int i = 0; i < N; ++i)
            if (tsr_test_fbits(a[i]) != tsr_test_fbits(b[i]))
                fail_msg("swiglu(%.9g) * %.9g: scalar %.9g, avx2 %.9g", (double)g[i], (double)u[i],
                         (double)a[i], (double)b[i]);
    double worst = 0;
    for (int i = 0; i < N; ++i) {
        const double want = (double)g[i] / (1.0 + exp(-(double)g[i])) * (double)u[i];
        /* below ~1e-35: exp(-g) overflowed float, silu = g / inf = 0 as in ggml */
        const double d = fabs(a[i] - want), tol = 8 * 0x1p-24 * fabs(want) + 1e-35;
        if (!(d <= tol))
            fail_msg("swiglu(%.9g) * %.9g: float64 %.9g, got %.9g", (double)g[i], (double)u[i],
                     want, (double)a[i]);
        if (fabs(want) > 1e-30 && d / fabs(want) > worst) worst = d / fabs(want);
    }
    for (int i = N - 5; i < N; ++i) /* the tail: libm, as ggml_silu_f32 */
        if (tsr_test_fbits(a[i]) != tsr_test_fbits(g[i] / (1.0f + expf(-g[i])) * u[i]))
            fail_msg("swiglu tail element %d: expected libm's %.9g, got %.9g", i,
                     (double)(g[i] / (1.0f + expf(-g[i])) * u[i]), (double)a[i]);
    printf("swiglu: %d ISA paths equal bit for bit; max relative error vs float64 %.3g\n", n_isa,
           worst);
    free(g);
    free(u);
    free(a);
    free(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dot_q4_1),
        cmocka_unit_test(test_dot_q8_0),
        cmocka_unit_test(test_act_quant),
        cmocka_unit_test(test_swiglu),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
