/*
 * test_rope.c — kernels/rope: the cos/sin table plus tsr_rope_apply equal tsr_rope_ext
 * (kernels/ops.h, the llama.cpp-exact reference the real-model tests pin) bit for bit, on
 * both pairings (NEOX, NORM), whole and partial rotation (n_rot < head_dim, with pair
 * counts that leave tails after the 8-lane loops), freq scale and freq factors, positions
 * from 0 to 10^6; and tsr_rmsnorm, which interleaves rows, equals the one-row-at-a-time
 * ggml order (float squares summed in order in double) bit for bit for 1..9 rows.
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

#include "kernels/ops.h"
#include "kernels/rope.h"
#include "tests/util.h"

static uint64_t rng = 0x9E3779B97F4A7C15ull;

/* index of the first differing float, or -1 */
static long first_diff(const float *a, const float *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof(float)) != 0) return (long)i;
    return -1;
}

static void rope_case(int n_head, int head_dim, int n_rot, int neox, float base, float fscale,
                      bool factors)
{
    static const int32_t pos[] = {0, 1, 2, 7, 37, 63, 64, 511, 4095, 32767, 131071, 1000000};
    const int n_tok = (int)(sizeof pos / sizeof *pos);
    const size_t n = (size_t)n_tok * n_head * head_dim;
    float *x = tsr_test_xmalloc(n * sizeof(float)), *ref = tsr_test_xmalloc(n * sizeof(float));
    float *cs = tsr_test_xmalloc((size_t)n_tok * n_rot * sizeof(float));
    float *ff = tsr_test_xmalloc((size_t)n_rot / 2 * sizeof(float));
    for (int i = 0; i < n_rot / 2; i++) ff[i] = 1.0f + 7.0f * (float)i / (float)n_rot;
    for (size_t i = 0; i < n; i++) x[i] = ref[i] = 4.0f * tsr_test_frand(&rng);
    tsr_rope_ext(ref, pos, n_tok, n_head, head_dim, n_rot, base, fscale, factors ? ff : NULL, neox);
    tsr_rope_table(cs, pos, n_tok, n_rot, base, fscale, factors ? ff : NULL);
    tsr_rope_apply(x, cs, n_tok, n_head, head_dim, n_rot, neox);
    long d = first_diff(x, ref, n);
    if (d >= 0)
        fail_msg("%s n_head %d head_dim %d n_rot %d base %g scale %g factors %d: value %ld "
                 "(token %ld) expected %.9g (tsr_rope_ext), got %.9g",
                 neox ? "NEOX" : "NORM", n_head, head_dim, n_rot, (double)base, (double)fscale,
                 (int)factors, d, d / (n_head * head_dim), (double)ref[d], (double)x[d]);
    free(x);
    free(ref);
    free(cs);
    free(ff);
}

static void test_rope_matches_ext(void **state)
{
    (void)state;
    for (int neox = 0; neox <= 1; neox++) {
        rope_case(12, 64, 64, neox, 10000.0f, 1.0f, false);    /* llama 100M shape */
        rope_case(14, 64, 64, neox, 1000000.0f, 1.0f, false);  /* qwen2.5 */
        rope_case(4, 256, 256, neox, 10000.0f, 0.125f, false); /* gemma3, scaled */
        rope_case(8, 128, 128, neox, 500000.0f, 1.0f, true);   /* llama3 factors */
        rope_case(3, 64, 32, neox, 10000.0f, 1.0f, false);     /* partial rotation */
        rope_case(5, 80, 24, neox, 10000.0f, 0.5f, true);      /* tails: 12 pairs */
        rope_case(2, 16, 6, neox, 10000.0f, 1.0f, false);      /* no full vector */
    }
}

static void test_rmsnorm_rows_interleaved(void **state)
{
    (void)state;
    static const int widths[] = {768, 64, 5, 2048};
    for (size_t wi = 0; wi < sizeof widths / sizeof *widths; wi++) {
        const int n = widths[wi];
        for (int n_tok = 1; n_tok <= 9; n_tok++) {
            const size_t sz = (size_t)n_tok * n;
            float *x = tsr_test_xmalloc(sz * sizeof(float)),
                  *w = tsr_test_xmalloc(n * sizeof(float));
            float *out = tsr_test_xmalloc(sz * sizeof(float)),
                  *ref = tsr_test_xmalloc(sz * sizeof(float));
            for (size_t i = 0; i < sz; i++) x[i] = 3.0f * tsr_test_frand(&rng);
            for (int i = 0; i < n; i++) w[i] = 1.0f + tsr_test_frand(&rng);
            for (int t = 0; t < n_tok; t++) { /* ggml's rms_norm, one row at a time */
                const float *xr = x + (size_t)t * n;
                double ss = 0.0;
                for (int i = 0; i < n; i++) ss += (double)(xr[i] * xr[i]);
                const float scale = 1.0f / sqrtf((float)(ss / n) + 1e-5f);
                for (int i = 0; i < n; i++) ref[(size_t)t * n + i] = xr[i] * scale * w[i];
            }
            tsr_rmsnorm(out, x, w, n_tok, n, 1e-5f);
            long d = first_diff(out, ref, sz);
            if (d >= 0)
                fail_msg("rmsnorm %d rows of %d: value %ld expected %.9g, got %.9g", n_tok, n, d,
                         (double)ref[d], (double)out[d]);
            tsr_rmsnorm(x, x, w, n_tok, n, 1e-5f); /* in place, as the Q/K norms call it */
            d = first_diff(x, ref, sz);
            if (d >= 0)
                fail_msg("rmsnorm in place, %d rows of %d: value %ld expected %.9g, got %.9g",
                         n_tok, n, d, (double)ref[d], (double)x[d]);
            free(x);
            free(w);
            free(out);
            free(ref);
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rope_matches_ext),
        cmocka_unit_test(test_rmsnorm_rows_interleaved),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
