/*
 * test_ops.c — kernels/ops dispatch: tsr_matmul_multi over weights of different types
 * (dot types Q8_0, Q8_K and F32 in one pool run, as Q/K/V of a Q4_K_M file can be) equals
 * one tsr_matmul per weight bit for bit, for 1, 3 and 8 tokens (decode, the token-by-token
 * path of short verify steps, and tiles), and 1, 2 and 5 threads give the same bits; one
 * token's guided row claims split large weights (file layout and repacked groups) without
 * changing a row; GEGLU's GELU table equals ggml's entry for entry.
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
#include "kernels/q80_lanes.h"
#include "kernels/quant.h"
#include "kernels/repack.h"
#include "tests/util.h"

#define N_IN 512

static uint64_t rng = 88172645463325252ull;
typedef struct {
    tsr_weight w;
    void *data;
} owned_weight;

static void make_weight(owned_weight *o, uint32_t type, int64_t n_out)
{
    size_t rb = tsr_row_bytes(type, N_IN);
    o->data = malloc(rb * (size_t)n_out);
    assert_non_null(o->data);
    float row[N_IN];
    for (int64_t r = 0; r < n_out; r++) {
        for (int i = 0; i < N_IN; i++) row[i] = tsr_test_frand(&rng);
        tsr_quant_row(type, row, (uint8_t *)o->data + (size_t)r * rb, N_IN);
    }
    o->w =
        (tsr_weight){.type = type, .n_in = N_IN, .n_out = n_out, .row_bytes = rb, .data = o->data};
}

static void test_multi_mixed_types(void **state)
{
    (void)state;
    /* Q8_0 and Q5_0 share the Q8_0 conversion; Q4_K and Q6_K share Q8_K; F32 none. */
    static const uint32_t types[4] = {TSR_TYPE_Q4_K, TSR_TYPE_Q8_0, TSR_TYPE_Q6_K, TSR_TYPE_F32};
    static const int64_t n_out[4] = {96, 40, 52, 24};
    owned_weight ow[4];
    const tsr_weight *ws[4];
    for (int k = 0; k < 4; k++) {
        make_weight(&ow[k], types[k], n_out[k]);
        ws[k] = &ow[k].w;
    }
    static const int toks[3] = {1, 3, 8};
    static const int threads[3] = {1, 2, 5};
    for (int ti = 0; ti < 3; ti++) {
        const int n_tok = toks[ti];
        float *x = malloc(sizeof(float) * N_IN * (size_t)n_tok);
        assert_non_null(x);
        for (int i = 0; i < N_IN * n_tok; i++) x[i] = tsr_test_frand(&rng);
        /* Reference: one matmul per weight on one thread. */
        float *ref[4], *got[4];
        tsr_pool *p1 = tsr_pool_new(1);
        assert_non_null(p1);
        for (int k = 0; k < 4; k++) {
            ref[k] = calloc((size_t)n_tok * (size_t)n_out[k], sizeof(float));
            got[k] = calloc((size_t)n_tok * (size_t)n_out[k], sizeof(float));
            void *sc = malloc(tsr_matmul_scratch_bytes(ws[k], n_tok) + 1);
            tsr_matmul(p1, ws[k], x, n_tok, ref[k], sc);
            free(sc);
        }
        tsr_pool_free(p1);
        size_t sc_bytes = tsr_matmul_multi_scratch_bytes(ws, 4, n_tok);
        /* Two distinct quantized dot types (Q8_K, Q8_0): both conversions are needed, and
         * the Q8_0 weight's tile prep (kernels/dot_ggml.h) and lanes prep
         * (kernels/q80_lanes.h), each with its alignment slack. */
        const size_t prep = tsr_ggml_tile_prep_bytes(TSR_TYPE_Q8_0, N_IN, n_tok);
        const size_t lprep = tsr_q80l_prep_bytes(N_IN, n_tok);
        assert_int_equal(sc_bytes, (size_t)n_tok * (tsr_row_bytes(TSR_TYPE_Q8_K, N_IN) +
                                                    tsr_row_bytes(TSR_TYPE_Q8_0, N_IN)) +
                                       (prep ? prep + 63 : 0) + lprep + 63);
        void *sc = malloc(sc_bytes);
        for (int hi = 0; hi < 3; hi++) {
            tsr_pool *p = tsr_pool_new(threads[hi]);
            assert_non_null(p);
            for (int k = 0; k < 4; k++)
                memset(got[k], 0xff, sizeof(float) * (size_t)n_tok * (size_t)n_out[k]);
            tsr_matmul_multi(p, ws, got, 4, x, n_tok, sc);
            for (int k = 0; k < 4; k++)
                for (int64_t i = 0; i < n_tok * n_out[k]; i++)
                    if (memcmp(&ref[k][i], &got[k][i], sizeof(float)) != 0)
                        fail_msg("weight %d (type %u), %d tokens, %d threads, element %lld: "
                                 "expected %.9g (one matmul), got %.9g (multi)",
                                 k, types[k], n_tok, threads[hi], (long long)i, ref[k][i],
                                 got[k][i]);
            tsr_pool_free(p);
        }
        free(sc);
        for (int k = 0; k < 4; k++) {
            free(ref[k]);
            free(got[k]);
        }
        free(x);
    }
    for (int k = 0; k < 4; k++) free(ow[k].data);
}

/* GEGLU's GELU(tanh) equals ggml's fp16 table entry for entry: gate = every fp16 value in
 * (-10, 10), up = 1, so the output is the table value itself. Expected values read from
 * ggml_table_gelu_f16 of the llama.cpp build that made the references (llama-cpp-python
 * 0.3.36, after ggml_cpu_init): an FNV-1a hash over the 37376 entries (low byte, then high
 * byte, in input order) and three entries, -1.99902344 (0xbfff) being the one where ggml's
 * FMA-contracted 1 + 0.044715*x*x changes the rounded result. */
/* One token over weights large enough that the guided claims (ops.c mm_claim: 1/(2 nth) of
 * the rows left, at least 64 KiB) split each weight into several pieces and stop at the
 * weights' ends (row counts not multiples of 4), from the file layout (Q8_0) and from the
 * repacked groups (Q4_K, data NULL as on a tp slice): every row equals its own row dot
 * (tsr_vec_dot), for 1, 2, 3 and 5 threads. */
static void test_one_token_guided_claims(void **state)
{
    (void)state;
    static const uint32_t types[3] = {TSR_TYPE_Q8_0, TSR_TYPE_Q4_K, TSR_TYPE_Q8_0};
    static const int64_t n_out[3] = {1501, 2002, 403};
    owned_weight ow[3];
    void *packed = NULL;
    const tsr_weight *ws[3];
    for (int k = 0; k < 3; k++) {
        make_weight(&ow[k], types[k], n_out[k]);
        ws[k] = &ow[k].w;
    }
    /* weight 1 keeps only its groups */
    packed = aligned_alloc(64, (tsr_repack_bytes(TSR_TYPE_Q4_K, N_IN, n_out[1]) + 63) / 64 * 64);
    assert_non_null(packed);
    assert_int_equal(
        tsr_repack(TSR_TYPE_Q4_K, N_IN, n_out[1], ow[1].data, ow[1].w.row_bytes, packed), 0);
    ow[1].w.packed = packed;
    ow[1].w.data = NULL;
    float x[N_IN];
    for (int i = 0; i < N_IN; i++) x[i] = tsr_test_frand(&rng);
    float *ref[3], *got[3];
    uint8_t xq[2][4096];
    tsr_quant_act_row(TSR_TYPE_Q8_0, x, xq[0], N_IN);
    tsr_quant_act_row(TSR_TYPE_Q8_K, x, xq[1], N_IN);
    for (int k = 0; k < 3; k++) {
        ref[k] = malloc(sizeof(float) * (size_t)n_out[k]);
        got[k] = malloc(sizeof(float) * (size_t)n_out[k]);
        assert_non_null(ref[k]);
        assert_non_null(got[k]);
        for (int64_t r = 0; r < n_out[k]; r++)
            ref[k][r] = tsr_vec_dot(types[k], N_IN,
                                    (const uint8_t *)ow[k].data + (size_t)r * ow[k].w.row_bytes,
                                    xq[types[k] == TSR_TYPE_Q4_K]);
    }
    void *sc = malloc(tsr_matmul_multi_scratch_bytes(ws, 3, 1));
    assert_non_null(sc);
    static const int threads[4] = {1, 2, 3, 5};
    for (int hi = 0; hi < 4; hi++) {
        tsr_pool *p = tsr_pool_new(threads[hi]);
        assert_non_null(p);
        for (int k = 0; k < 3; k++) memset(got[k], 0xff, sizeof(float) * (size_t)n_out[k]);
        tsr_matmul_multi(p, ws, got, 3, x, 1, sc);
        for (int k = 0; k < 3; k++)
            for (int64_t r = 0; r < n_out[k]; r++)
                if (memcmp(&ref[k][r], &got[k][r], sizeof(float)) != 0)
                    fail_msg("weight %d (type %u, %lld rows), %d threads, row %lld: expected "
                             "%.9g (its row dot), got %.9g (one-token matmul)",
                             k, types[k], (long long)n_out[k], threads[hi], (long long)r, ref[k][r],
                             got[k][r]);
        tsr_pool_free(p);
    }
    free(sc);
    free(packed);
    for (int k = 0; k < 3; k++) {
        free(ref[k]);
        free(got[k]);
        free(ow[k].data);
    }
}

/* tsr_geglu over arrays (8 at a time where the CPU has AVX2 + F16C) gives, element by
 * element, the bits of one-element calls (the scalar loop): every fp16 value, values between
 * two fp16s and at their midpoints (the rounding of the table index), the +-10 cut-offs,
 * fp16 overflow, float subnormals, infinities and NaNs of both signs and several payloads,
 * against ups of mixed signs and sizes. */
static void test_geglu_vector_scalar(void **state)
{
    (void)state;
    enum { N = 65536 * 3 + 40 };
    float *g = malloc(sizeof(float) * N), *up = malloc(sizeof(float) * N);
    float *want = malloc(sizeof(float) * N);
    assert_non_null(g);
    assert_non_null(up);
    assert_non_null(want);
    size_t n = 0;
    for (uint32_t i = 0; i < 65536; i++) {
        const float x = tsr_f16_to_f32((uint16_t)i);
        g[n++] = x;
        g[n++] = nextafterf(x, INFINITY); /* just above: rounds back to it, or a midpoint */
        const float y = tsr_f16_to_f32((uint16_t)(i + 1));
        g[n++] = (i & 0x7c00) == 0x7c00 ? x : x + (y - x) * 0.5f; /* the midpoint: a tie */
    }
    static const float specials[] = {
        -10.0f,  10.0f, -9.99f, 9.99f, -10.01f, 10.01f,   65504.0f,  65520.0f, -65520.0f, 1e-40f,
        -1e-40f, 0.0f,  -0.0f,  1e30f, -1e30f,  INFINITY, -INFINITY, 6e-8f,    -6e-8f,    2.98e-8f};
    for (size_t k = 0; k < sizeof specials / sizeof specials[0]; k++) g[n++] = specials[k];
    static const uint32_t nans[] = {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff812345u,
                                    0x7fffffffu, 0xffffe000u, 0x7fa00000u, 0x7f801000u};
    for (size_t k = 0; k < sizeof nans / sizeof nans[0]; k++) memcpy(&g[n++], &nans[k], 4);
    for (; n < N; n++) g[n] = 0.125f * (float)n;
    uint64_t s = 88172645463325252ull;
    for (size_t i = 0; i < N; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        up[i] = (float)((double)(s >> 11) * 0x1p-53 - 0.5) * (i % 7 == 0 ? 1000.0f : 3.0f);
        float gi = g[i];
        tsr_geglu(&gi, &up[i], 1);
        want[i] = gi;
    }
    tsr_geglu(g, up, N);
    for (size_t i = 0; i < N; i++)
        if (memcmp(&g[i], &want[i], sizeof(float)) != 0)
            fail_msg("geglu element %zu: one at a time %.9g (0x%08x), in the array %.9g (0x%08x)",
                     i, (double)want[i], *(uint32_t *)&want[i], (double)g[i], *(uint32_t *)&g[i]);
    free(g);
    free(up);
    free(want);
}

static void test_geglu_ggml_table(void **state)
{
    (void)state;
    uint64_t h = 1469598103934665603ull;
    int n = 0;
    for (uint32_t i = 0; i < 65536; i++) {
        float g = tsr_f16_to_f32((uint16_t)i);
        if (!(g > -10.0f && g < 10.0f)) continue;
        const float up = 1.0f;
        tsr_geglu(&g, &up, 1);
        const uint16_t v = tsr_f32_to_f16(g);
        if (tsr_f16_to_f32(v) != g)
            fail_msg("geglu of fp16 %04x with up 1: %.9g is not an fp16 value", i, (double)g);
        if (i == 0xbfff && v != 0xa9d3)
            fail_msg("geglu(-1.99902344): expected fp16 a9d3 (ggml's table), got %04x", v);
        if (i == 0x3c00 && v != 0x3abb)
            fail_msg("geglu(1): expected fp16 3abb (ggml's table), got %04x", v);
        if (i == 0xc000 && v != 0xa9d0)
            fail_msg("geglu(-2): expected fp16 a9d0 (ggml's table), got %04x", v);
        h ^= v & 0xffu;
        h *= 1099511628211ull;
        h ^= v >> 8;
        h *= 1099511628211ull;
        n++;
    }
    assert_int_equal(n, 37376);
    if (h != 0xf0f8429dfdb90568ull)
        fail_msg("GELU table hash: expected f0f8429dfdb90568 (ggml's), got %016llx",
                 (unsigned long long)h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_multi_mixed_types),
        cmocka_unit_test(test_one_token_guided_claims),
        cmocka_unit_test(test_geglu_ggml_table),
        cmocka_unit_test(test_geglu_vector_scalar),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
