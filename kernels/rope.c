/*
 * rope.c — see rope.h. The rotation runs on AVX2+FMA when the CPU has them (8 lanes: NEOX
 * pairs side by side, NORM pairs by duplicating the even and odd lanes), else in scalar
 * code; both do per pair v[a] = fma(x0, c, -(x1 * s)), v[b] = fma(x0, s, x1 * c), the
 * products ggml's rotate_pairs gets contracted to by GCC (kernels/ops.c tsr_rope_ext).
 */
#include "kernels/rope.h"

#include <math.h>
#include <stdbool.h>
#include <stddef.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TSR_ROPE_X86 1
#endif

void tsr_rope_table(float *cs, const int32_t *pos, int n_tok, int n_rot, float freq_base,
                    float freq_scale, const float *freq_factors)
{
    /* tsr_rope_ext's angles, operation for operation */
    const float theta_scale = powf(freq_base, -2.0f / (float)n_rot);
    const int half = n_rot / 2;
    for (int t = 0; t < n_tok; t++) {
        float *c = cs + (size_t)t * n_rot, *s = c + half;
        float theta = (float)pos[t];
        for (int i = 0; i < half; i++) {
            const float ff = freq_factors ? freq_factors[i] : 1.0f;
            const float th = freq_scale * (theta / ff);
            c[i] = cosf(th);
            s[i] = sinf(th);
            theta *= theta_scale;
        }
    }
}

static void rope_apply_scalar(float *x, const float *cs, int n_tok, int n_head, int head_dim,
                              int n_rot, int neox)
{
    const int half = n_rot / 2;
    for (int t = 0; t < n_tok; t++) {
        const float *c = cs + (size_t)t * n_rot, *s = c + half;
        for (int h = 0; h < n_head; h++) {
            float *v = x + ((size_t)t * n_head + h) * head_dim;
            for (int i = 0; i < half; i++) {
                const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
                const float x0 = v[a], x1 = v[b];
                v[a] = fmaf(x0, c[i], -(x1 * s[i]));
                v[b] = fmaf(x0, s[i], x1 * c[i]);
            }
        }
    }
}

#ifdef TSR_ROPE_X86
#define ROPE_AVX2    __attribute__((target("avx2,fma")))
#define ROPE_MAX_ROT 512 /* the interleaved NORM tables below live on the stack */

ROPE_AVX2 static void rope_apply_avx2(float *x, const float *cs, int n_tok, int n_head,
                                      int head_dim, int n_rot, int neox)
{
    const int half = n_rot / 2;
    const int n8 = half / 8 * 8; /* NEOX: pairs done 8 at a time */
    for (int t = 0; t < n_tok; t++) {
        const float *c = cs + (size_t)t * n_rot, *s = c + half;
        if (neox) {
            for (int h = 0; h < n_head; h++) {
                float *v = x + ((size_t)t * n_head + h) * head_dim;
                int i = 0;
                for (; i < n8; i += 8) {
                    const __m256 x0 = _mm256_loadu_ps(v + i), x1 = _mm256_loadu_ps(v + half + i);
                    const __m256 cc = _mm256_loadu_ps(c + i), ss = _mm256_loadu_ps(s + i);
                    /* -(x1 * s) is x1 * (-s) exactly */
                    const __m256 ns = _mm256_xor_ps(ss, _mm256_set1_ps(-0.0f));
                    _mm256_storeu_ps(v + i, _mm256_fmadd_ps(x0, cc, _mm256_mul_ps(x1, ns)));
                    _mm256_storeu_ps(v + half + i, _mm256_fmadd_ps(x0, ss, _mm256_mul_ps(x1, cc)));
                }
                for (; i < half; i++) {
                    const float x0 = v[i], x1 = v[i + half];
                    v[i] = fmaf(x0, c[i], -(x1 * s[i]));
                    v[i + half] = fmaf(x0, s[i], x1 * c[i]);
                }
            }
        } else {
            /* lanes (2i, 2i+1): out = fma([x0, x0], [c, s], [x1, x1] * [-s, c]) */
            float cs2[ROPE_MAX_ROT], sc2[ROPE_MAX_ROT];
            for (int i = 0; i < half; i++) {
                cs2[2 * i] = c[i];
                cs2[2 * i + 1] = s[i];
                sc2[2 * i] = -s[i];
                sc2[2 * i + 1] = c[i];
            }
            const int m8 = n_rot / 8 * 8;
            for (int h = 0; h < n_head; h++) {
                float *v = x + ((size_t)t * n_head + h) * head_dim;
                int e = 0;
                for (; e < m8; e += 8) {
                    const __m256 xv = _mm256_loadu_ps(v + e);
                    const __m256 lo = _mm256_moveldup_ps(xv), hi = _mm256_movehdup_ps(xv);
                    _mm256_storeu_ps(v + e,
                                     _mm256_fmadd_ps(lo, _mm256_loadu_ps(cs2 + e),
                                                     _mm256_mul_ps(hi, _mm256_loadu_ps(sc2 + e))));
                }
                for (; e < n_rot; e += 2) {
                    const int i = e / 2;
                    const float x0 = v[e], x1 = v[e + 1];
                    v[e] = fmaf(x0, c[i], -(x1 * s[i]));
                    v[e + 1] = fmaf(x0, s[i], x1 * c[i]);
                }
            }
        }
    }
}

static bool rope_has_avx2(void)
{
    static int have = -1; /* benign race: every thread computes the same answer */
    if (have < 0) {
        __builtin_cpu_init();
        have = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return have > 0;
}
#endif

void tsr_rope_apply(float *x, const float *cs, int n_tok, int n_head, int head_dim, int n_rot,
                    int neox)
{
#ifdef TSR_ROPE_X86
    if (n_rot <= ROPE_MAX_ROT && rope_has_avx2()) {
        rope_apply_avx2(x, cs, n_tok, n_head, head_dim, n_rot, neox);
        return;
    }
#endif
    rope_apply_scalar(x, cs, n_tok, n_head, head_dim, n_rot, neox);
}
