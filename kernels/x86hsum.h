/* x86hsum.h — the one horizontal sum of 8 float lanes that every AVX2 kernel uses.
 *
 * Its order is part of the numerics: it is ggml's hsum_float_8, ((v0+v4)+(v2+v6)) +
 * ((v1+v5)+(v3+v7)), which the ggml-exact dots (kernels/dot_ggml.c, kernels/quant.c), the
 * repacked kernels that must equal them bit for bit (kernels/repack.c) and the KV attention
 * (kernels/kvcache.c) all rely on, so it lives in one place. Include only from x86 code
 * (immintrin.h already included). */
#ifndef TSR_X86HSUM_H
#define TSR_X86HSUM_H

__attribute__((target("avx2,fma,f16c"))) static inline __attribute__((always_inline)) float
tsr_hsum8_ps(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif
