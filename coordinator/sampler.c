/*
 * sampler.c — see sampler.h for the contract and the order of operations.
 *
 * Data: per-vocabulary generated-token counts plus a list of the distinct ids seen (prompt or
 * generated), so penalties cost O(distinct ids) per step rather than O(n_vocab); one
 * candidate array (value, id) of n_vocab entries is the scratch for selection and sorting.
 * Candidates are ordered by value descending, then id ascending: a strict total order, so
 * selection, sorting and tie-breaking are deterministic everywhere.
 */
#include "coordinator/sampler.h"
#include "kernels/util.h"

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float v;
    int32_t id;
} tsr_cand;

struct tsr_sampler {
    tsr_sampling_params p;
    int32_t n_vocab;
    uint64_t seed_key;  /* tsr_mix64(seed): the key of the counter-based RNG */
    int64_t pos;        /* generated tokens accepted so far: the position being drawn for */
    uint64_t n_draw;    /* draws made at this position (reset when the position moves) */
    int32_t *gen_count; /* [n_vocab] times each id was accepted as generated */
    uint8_t *seen;      /* [n_vocab] 1 when the id is in seen_ids */
    int32_t *seen_ids;  /* distinct ids of prompt + generated, in first-seen order */
    size_t n_seen;
    tsr_cand *cand; /* [n_vocab] scratch */
};

/* ---- RNG: counter-based, u = f(seed, position, draw index), pure 64-bit integer ops.
 *
 * Every uniform is a hash of (seed, pos, n_draw) through the splitmix64 finalizer (Steele,
 * Lea & Flood), so the numbers drawn for generated token i depend on the seed and i only,
 * not on how many draws came before: a request resumed on another replica with its first
 * i generated tokens given back (tsr_sampler_accept) draws exactly what an undisturbed run
 * draws for token i. Within one position, successive draws (repeated calls without an
 * accept, or the two of a speculative rejection) take draw indexes 0, 1, 2, ... */

/* Uniform in [0, 1) with 53 random bits, for (seed, pos, n_draw); advances n_draw. */
static double rng_uniform(tsr_sampler *s)
{
    uint64_t h = tsr_mix64(s->seed_key + (uint64_t)s->pos * 0x9E3779B97F4A7C15ull);
    h = tsr_mix64(h + (s->n_draw + 1) * 0xD1B54A32D192ED03ull);
    s->n_draw++;
    return (double)(h >> 11) * 0x1.0p-53;
}

/* ---- params */

void tsr_sampling_params_default(tsr_sampling_params *p)
{
    p->temperature = 1.0f;
    p->top_k = 0;
    p->top_p = 1.0f;
    p->min_p = 0.0f;
    p->repetition_penalty = 1.0f;
    p->presence_penalty = 0.0f;
    p->frequency_penalty = 0.0f;
    p->seed = 0;
}

int tsr_sampling_params_validate(const tsr_sampling_params *p, char *err, size_t err_len)
{
    /* Written as !(in range) so that NaN is rejected too. */
    if (!(p->temperature >= 0.0f && isfinite(p->temperature))) {
        tsr_set_err(err, err_len, "temperature must be >= 0 and finite, got %g",
                    (double)p->temperature);
        return -1;
    }
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) {
        tsr_set_err(err, err_len, "top_p must be in (0, 1], got %g", (double)p->top_p);
        return -1;
    }
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f)) {
        tsr_set_err(err, err_len, "min_p must be in [0, 1], got %g", (double)p->min_p);
        return -1;
    }
    if (!(p->repetition_penalty > 0.0f && isfinite(p->repetition_penalty))) {
        tsr_set_err(err, err_len, "repetition_penalty must be > 0 and finite, got %g",
                    (double)p->repetition_penalty);
        return -1;
    }
    if (!(p->presence_penalty >= -2.0f && p->presence_penalty <= 2.0f)) {
        tsr_set_err(err, err_len, "presence_penalty must be in [-2, 2], got %g",
                    (double)p->presence_penalty);
        return -1;
    }
    if (!(p->frequency_penalty >= -2.0f && p->frequency_penalty <= 2.0f)) {
        tsr_set_err(err, err_len, "frequency_penalty must be in [-2, 2], got %g",
                    (double)p->frequency_penalty);
        return -1;
    }
    return 0;
}

/* ---- lifecycle and history */

int tsr_sampler_new(const tsr_sampling_params *p, int32_t n_vocab, tsr_sampler **out, char *err,
                    size_t err_len)
{
    *out = NULL;
    if (tsr_sampling_params_validate(p, err, err_len) != 0) return -1;
    if (n_vocab <= 0) {
        tsr_set_err(err, err_len, "sampler: n_vocab must be > 0, got %d", (int)n_vocab);
        return -1;
    }
    tsr_sampler *s = calloc(1, sizeof *s);
    if (!s) goto oom;
    s->p = *p;
    s->n_vocab = n_vocab;
    size_t n = (size_t)n_vocab;
    s->gen_count = calloc(n, sizeof *s->gen_count);
    s->seen = calloc(n, sizeof *s->seen);
    s->seen_ids = malloc(n * sizeof *s->seen_ids);
    s->cand = malloc(n * sizeof *s->cand);
    if (!s->gen_count || !s->seen || !s->seen_ids || !s->cand) goto oom;
    s->seed_key = tsr_mix64(p->seed + 0x9E3779B97F4A7C15ull);
    *out = s;
    return 0;
oom:
    tsr_sampler_free(s);
    tsr_set_err(err, err_len, "sampler: out of memory for n_vocab %d", (int)n_vocab);
    return -1;
}

void tsr_sampler_free(tsr_sampler *s)
{
    if (!s) return;
    free(s->gen_count);
    free(s->seen);
    free(s->seen_ids);
    free(s->cand);
    free(s);
}

static void mark_seen(tsr_sampler *s, int32_t id)
{
    if (!s->seen[id]) {
        s->seen[id] = 1;
        s->seen_ids[s->n_seen++] = id;
    }
}

void tsr_sampler_add_prompt(tsr_sampler *s, const int32_t *ids, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (ids[i] >= 0 && ids[i] < s->n_vocab) mark_seen(s, ids[i]);
    }
}

void tsr_sampler_accept(tsr_sampler *s, int32_t id)
{
    s->pos++;
    s->n_draw = 0;
    if (id < 0 || id >= s->n_vocab) return;
    if (!s->seen[id]) {
        s->seen[id] = 2; /* seen only as a generated token (see tsr_sampler_unaccept) */
        s->seen_ids[s->n_seen++] = id;
    }
    if (s->gen_count[id] < INT32_MAX) s->gen_count[id]++;
}

void tsr_sampler_apply_penalties(const tsr_sampler *s, float *logits)
{
    const float rep = s->p.repetition_penalty;
    const float freq = s->p.frequency_penalty;
    const float pres = s->p.presence_penalty;
    if (rep == 1.0f && freq == 0.0f && pres == 0.0f) return;
    for (size_t j = 0; j < s->n_seen; j++) {
        int32_t id = s->seen_ids[j];
        float l = logits[id];
        if (rep != 1.0f) l = l > 0.0f ? l / rep : l * rep;
        int32_t c = s->gen_count[id];
        if (c > 0) { /* as vLLM: two separate subtractions */
            l -= freq * (float)c;
            l -= pres;
        }
        logits[id] = l;
    }
}

/* ---- selection and sorting of candidates */

/* a ranks before b: higher value, then lower id. */
static inline bool cand_before(tsr_cand a, tsr_cand b)
{
    return a.v > b.v || (a.v == b.v && a.id < b.id);
}

static int cand_cmp(const void *pa, const void *pb)
{
    tsr_cand a = *(const tsr_cand *)pa, b = *(const tsr_cand *)pb;
    return cand_before(a, b) ? -1 : (cand_before(b, a) ? 1 : 0);
}

static inline void cand_swap(tsr_cand *a, tsr_cand *b)
{
    tsr_cand t = *a;
    *a = *b;
    *b = t;
}

static void cand_sort(tsr_cand *a, size_t n)
{
    if (n > 1) qsort(a, n, sizeof *a, cand_cmp);
}

/* Partition a[lo..hi) (hi - lo >= 3) around a median-of-three pivot: returns i with
 * a[lo..i) before the pivot, a[i] the pivot, a(i..hi) after it; *left_sum gets the sum of
 * the values of a[lo..i). */
static size_t cand_partition(tsr_cand *a, size_t lo, size_t hi, double *left_sum)
{
    size_t mid = lo + (hi - lo) / 2;
    if (cand_before(a[mid], a[lo])) cand_swap(&a[mid], &a[lo]);
    if (cand_before(a[hi - 1], a[lo])) cand_swap(&a[hi - 1], &a[lo]);
    if (cand_before(a[hi - 1], a[mid])) cand_swap(&a[hi - 1], &a[mid]);
    cand_swap(&a[mid], &a[hi - 1]);
    const tsr_cand piv = a[hi - 1];
    double sum = 0.0;
    size_t i = lo;
    for (size_t j = lo; j < hi - 1; j++) {
        if (cand_before(a[j], piv)) {
            sum += a[j].v;
            cand_swap(&a[i++], &a[j]);
        }
    }
    cand_swap(&a[i], &a[hi - 1]);
    *left_sum = sum;
    return i;
}

/* Rearrange a[0..n) so that a[0..k) holds the k first in rank order (in any order among
 * themselves), 0 < k < n. Quickselect; after too many rounds (an adversarial layout) it
 * falls back to sorting the remaining range. */
static void cand_select(tsr_cand *a, size_t n, size_t k)
{
    size_t lo = 0, hi = n; /* the boundary k lies in [lo, hi] */
    int rounds = 0, limit = 64;
    for (size_t m = n; m > 1; m >>= 1) limit += 2;
    while (hi - lo > 16 && ++rounds <= limit) {
        double unused;
        size_t i = cand_partition(a, lo, hi, &unused);
        if (i == k || i + 1 == k) return;
        if (k < i)
            hi = i;
        else
            lo = i + 1;
    }
    cand_sort(a + lo, hi - lo);
}

/* Top-p without sorting: a[0..n) hold probability weights (.v >= 0). Find the smallest j
 * such that the j first in rank order have total weight >= target, and rearrange so that
 * a[0..j) are those (in any order). Returns j, or n when the total falls short (rounding).
 * Weighted quickselect: O(n) expected. */
static size_t cand_nucleus(tsr_cand *a, size_t n, double target)
{
    size_t lo = 0, hi = n; /* a[0..lo) rank before a[lo..hi), which rank before a[hi..n) */
    double before = 0.0;   /* weight of a[0..lo) */
    int rounds = 0, limit = 64;
    for (size_t m = n; m > 1; m >>= 1) limit += 2;
    while (hi - lo > 16 && ++rounds <= limit) {
        double left;
        size_t i = cand_partition(a, lo, hi, &left);
        if (before + left >= target) {
            hi = i; /* the answer is at most i */
            continue;
        }
        before += left;
        if (before + a[i].v >= target) return i + 1;
        before += a[i].v;
        lo = i + 1;
    }
    cand_sort(a + lo, hi - lo);
    for (size_t k = lo; k < hi; k++) {
        before += a[k].v;
        if (before >= target) return k + 1;
    }
    return hi;
}

/* ---- AVX2 (the passes over the whole vocabulary; the rest of this file is portable C) */

#define SMP_AVX2 __attribute__((target("avx2")))

/* -1: not decided (the CPU decides at the first call); tsr_sampler_set_avx2 sets it. */
static int g_avx2 = -1;

void tsr_sampler_set_avx2(int on)
{
    g_avx2 = on < 0 ? -1 : on > 0 && __builtin_cpu_supports("avx2") ? 1 : 0;
}

static bool use_avx2(void)
{
    if (g_avx2 < 0) g_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
    return g_avx2 == 1;
}

/* From i (a multiple of 8), past every block of 8 of l[] with no value >= floor (NaN never
 * is): the start of the first block with one, or of the last partial block (<= n). A scan
 * that tests each value against floor and skips those below sees the same values. */
SMP_AVX2 static int32_t skip_below_avx2(const float *l, int32_t i, int32_t n, float floor)
{
    const __m256 vf = _mm256_set1_ps(floor);
    for (; i + 8 <= n; i += 8)
        if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(l + i), vf, _CMP_GE_OQ))) break;
    return i;
}

/* The k first in rank order among the tokens of logits[0..n) that are > -inf, into
 * out[0..k) (in heap order); returns how many (< k only when fewer tokens are > -inf).
 * A bounded heap whose root is the last of the current k: after the first few thousand
 * tokens nearly every token costs one comparison with the root. */
static size_t cand_top_k_heap(const float *logits, int32_t n, size_t k, tsr_cand *out)
{
    size_t m = 0;
    const bool avx2 = use_avx2();
    for (int32_t i = 0; i < n; i++) {
        /* heap full: whole blocks of 8 below the root skipped (each would fail the test
         * x.v < root below, or be NaN / -inf) */
        if (avx2 && m == k && (i & 7) == 0 && (i = skip_below_avx2(logits, i, n, out[0].v)) >= n)
            break;
        const tsr_cand x = {logits[i], i};
        if (!(x.v > -INFINITY)) continue;
        size_t j;
        if (m < k) { /* sift up from the end */
            j = m++;
            while (j > 0) {
                size_t parent = (j - 1) / 2;
                if (!cand_before(out[parent], x)) break;
                out[j] = out[parent];
                j = parent;
            }
            out[j] = x;
            continue;
        }
        /* the common case first: not better than the last of the k */
        if (x.v < out[0].v || !cand_before(x, out[0])) continue;
        j = 0; /* replace the root, sift down */
        for (;;) {
            size_t child = 2 * j + 1;
            if (child >= m) break;
            if (child + 1 < m && cand_before(out[child], out[child + 1])) child++;
            if (!cand_before(x, out[child])) break;
            out[j] = out[child];
            j = child;
        }
        out[j] = x;
    }
    return m;
}

/* ---- exp and reductions
 *
 * exp_neg(x) = e^x for x <= 0 (the argument is always logit - max), written with plain IEEE
 * float operations (one per statement, so no compiler fuses them into an FMA), hence the
 * same weights on every libm and platform; relative error about 2e-7 (degree-6 polynomial
 * on |r| <= ln2/2); 0 for x <= -87 (under 1e-37 of the max) and NaN. The full-vocabulary
 * passes use a 4-lane version (GCC / Clang vector extensions: SSE2 on x86-64, NEON on
 * arm64) doing the same operations lane by lane, so both give bit-identical weights. */

#define EXP_LO      (-87.0f)
#define EXP_SHIFTER 12582912.0f /* 1.5 * 2^23: adding then subtracting it rounds to integer */
#define EXP_LOG2E   1.44269504f
#define EXP_LN2_HI  0.693145752f
#define EXP_LN2_LO  1.42860677e-6f

static inline float exp_neg(float x)
{
    if (!(x > EXP_LO)) return 0.0f;
    float t = x * EXP_LOG2E;
    t = t + EXP_SHIFTER;
    const float kf = t - EXP_SHIFTER; /* round(x / ln2), in [-126, 0] */
    float h = kf * EXP_LN2_HI;
    float r = x - h;
    h = kf * EXP_LN2_LO;
    r = r - h;
    float q = 1.0f / 720.0f;
    q = q * r;
    q = q + 1.0f / 120.0f;
    q = q * r;
    q = q + 1.0f / 24.0f;
    q = q * r;
    q = q + 1.0f / 6.0f;
    q = q * r;
    q = q + 0.5f;
    q = q * r;
    q = q + 1.0f;
    q = q * r;
    q = q + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)kf + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return q * scale;
}

typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

static inline v4f v4f_load(const float *p)
{
    v4f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void v4f_store(float *p, v4f v)
{
    memcpy(p, &v, sizeof v);
}

/* mask ? a : b, lane-wise, for masks of all-ones / all-zeros lanes */
static inline v4f v4f_select(v4i mask, v4f a, v4f b)
{
    return (v4f)(((v4i)a & mask) | ((v4i)b & ~mask));
}

static inline v4f exp_neg_v4(v4f x)
{
    const v4i ok = x > EXP_LO; /* false for NaN */
    x = v4f_select(ok, x, (v4f){0} + EXP_LO);
    v4f t = x * EXP_LOG2E;
    t = t + EXP_SHIFTER;
    const v4f kf = t - EXP_SHIFTER;
    v4f h = kf * EXP_LN2_HI;
    v4f r = x - h;
    h = kf * EXP_LN2_LO;
    r = r - h;
    v4f q = (v4f){0} + 1.0f / 720.0f;
    q = q * r;
    q = q + 1.0f / 120.0f;
    q = q * r;
    q = q + 1.0f / 24.0f;
    q = q * r;
    q = q + 1.0f / 6.0f;
    q = q * r;
    q = q + 0.5f;
    q = q * r;
    q = q + 1.0f;
    q = q * r;
    q = q + 1.0f;
    const v4i bits = (__builtin_convertvector(kf, v4i) + 127) << 23;
    const v4f w = q * (v4f)bits;
    return (v4f)((v4i)w & ok);
}

/* sum_exp's elements [i, n) one by one, added to sum. */
static double sum_exp_rest(float *l, int32_t i, int32_t n, float max, float *w_out, double sum)
{
    for (; i < n; i++) {
        const float w = exp_neg(l[i] - max);
        sum += w;
        if (w_out) w_out[i] = w;
    }
    return sum;
}

/* sum of exp_neg(l[i] - max) over [0, n); when w_out is not NULL it also receives the
 * weights (w_out may be l). Blocks of 64 summed in float lanes, then into a double. */
static double sum_exp_v4(float *l, int32_t n, float max, float *w_out)
{
    double sum = 0.0;
    int32_t i = 0;
    while (i + 4 <= n) {
        v4f acc = {0};
        for (int32_t end = i + 64 <= n ? i + 64 : n - (n - i) % 4; i < end; i += 4) {
            const v4f w = exp_neg_v4(v4f_load(l + i) - max);
            acc = acc + w;
            if (w_out) v4f_store(w_out + i, w);
        }
        sum += (double)((acc[0] + acc[1]) + (acc[2] + acc[3]));
    }
    return sum_exp_rest(l, i, n, max, w_out, sum);
}

/* scale_clean_max's elements [i, n) one by one, the maximum carried on from mx. */
static float scale_clean_rest(float *l, int32_t i, int32_t n, float temp, float mx)
{
    for (; i < n; i++) {
        float v = l[i];
        if (temp != 1.0f) v /= temp;
        v = v == v ? v : -INFINITY;
        l[i] = v;
        mx = v > mx ? v : mx;
    }
    return mx;
}

/* logits /= temp (skipped for 1), NaN -> -inf, in place; returns the max (-inf when
 * nothing is > -inf). */
static float scale_clean_max_v4(float *l, int32_t n, float temp)
{
    const v4f ninf = (v4f){0} - INFINITY;
    v4f m = ninf;
    int32_t i = 0;
    if (temp != 1.0f) {
        for (; i + 4 <= n; i += 4) {
            v4f v = v4f_load(l + i) / temp;
            v = v4f_select(v == v, v, ninf);
            v4f_store(l + i, v);
            m = v4f_select(v > m, v, m);
        }
    } else {
        for (; i + 4 <= n; i += 4) {
            v4f v = v4f_load(l + i);
            v = v4f_select(v == v, v, ninf);
            v4f_store(l + i, v);
            m = v4f_select(v > m, v, m);
        }
    }
    float mx = -INFINITY;
    for (int j = 0; j < 4; j++) mx = m[j] > mx ? m[j] : mx;
    return scale_clean_rest(l, i, n, temp, mx);
}

/* ---- the same passes 8 lanes at a time (AVX2)
 *
 * Each lane does exp_neg_v4's operations in the same order (no FMA: the target has none),
 * so every weight is the same float; the sums keep sum_exp_v4's order (one 4-lane
 * accumulator per block of 64, the 8 lanes added as their two halves in turn), and the
 * maximum is the same value (only the sign of a zero maximum could differ, which no weight,
 * log-probability or draw sees: l - (+0) and l - (-0) are the same for every l but a zero,
 * whose weight is 1 either way). Hence the same draws from the same seed on every CPU.
 * About twice the 4-lane passes' pace (Qwen2.5's 151936 logits: tests/test_sampler.c keeps
 * both paths equal, docs/performance.md the figures). */

SMP_AVX2 static inline __m256 exp_neg_v8(__m256 x)
{
    const __m256 ok = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_LO), _CMP_GT_OQ); /* false for NaN */
    x = _mm256_blendv_ps(_mm256_set1_ps(EXP_LO), x, ok);
    __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E));
    t = _mm256_add_ps(t, _mm256_set1_ps(EXP_SHIFTER));
    const __m256 kf = _mm256_sub_ps(t, _mm256_set1_ps(EXP_SHIFTER));
    __m256 h = _mm256_mul_ps(kf, _mm256_set1_ps(EXP_LN2_HI));
    __m256 r = _mm256_sub_ps(x, h);
    h = _mm256_mul_ps(kf, _mm256_set1_ps(EXP_LN2_LO));
    r = _mm256_sub_ps(r, h);
    __m256 q = _mm256_mul_ps(_mm256_set1_ps(1.0f / 720.0f), r);
    q = _mm256_add_ps(q, _mm256_set1_ps(1.0f / 120.0f));
    q = _mm256_mul_ps(q, r);
    q = _mm256_add_ps(q, _mm256_set1_ps(1.0f / 24.0f));
    q = _mm256_mul_ps(q, r);
    q = _mm256_add_ps(q, _mm256_set1_ps(1.0f / 6.0f));
    q = _mm256_mul_ps(q, r);
    q = _mm256_add_ps(q, _mm256_set1_ps(0.5f));
    q = _mm256_mul_ps(q, r);
    q = _mm256_add_ps(q, _mm256_set1_ps(1.0f));
    q = _mm256_mul_ps(q, r);
    q = _mm256_add_ps(q, _mm256_set1_ps(1.0f));
    const __m256i bits =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(kf), _mm256_set1_epi32(127)), 23);
    const __m256 w = _mm256_mul_ps(q, _mm256_castsi256_ps(bits));
    return _mm256_and_ps(w, ok);
}

SMP_AVX2 static double sum_exp_avx2(float *l, int32_t n, float max, float *w_out)
{
    const __m256 vmax = _mm256_set1_ps(max);
    double sum = 0.0;
    int32_t i = 0;
    while (i + 4 <= n) {
        __m128 acc = _mm_setzero_ps();
        const int32_t end = i + 64 <= n ? i + 64 : n - (n - i) % 4;
        for (; i + 8 <= end; i += 8) {
            const __m256 w = exp_neg_v8(_mm256_sub_ps(_mm256_loadu_ps(l + i), vmax));
            acc = _mm_add_ps(acc, _mm256_castps256_ps128(w));
            acc = _mm_add_ps(acc, _mm256_extractf128_ps(w, 1));
            if (w_out) _mm256_storeu_ps(w_out + i, w);
        }
        if (i < end) { /* 4 left in the last block: the low half */
            const __m256 x = _mm256_castps128_ps256(_mm_loadu_ps(l + i));
            const __m128 w = _mm256_castps256_ps128(exp_neg_v8(_mm256_sub_ps(x, vmax)));
            acc = _mm_add_ps(acc, w);
            if (w_out) _mm_storeu_ps(w_out + i, w);
            i += 4;
        }
        float a[4];
        _mm_storeu_ps(a, acc);
        sum += (double)((a[0] + a[1]) + (a[2] + a[3]));
    }
    return sum_exp_rest(l, i, n, max, w_out, sum);
}

SMP_AVX2 static float scale_clean_max_avx2(float *l, int32_t n, float temp)
{
    const __m256 ninf = _mm256_set1_ps(-INFINITY), vt = _mm256_set1_ps(temp);
    __m256 m = ninf;
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(l + i);
        if (temp != 1.0f) v = _mm256_div_ps(v, vt);
        v = _mm256_blendv_ps(ninf, v, _mm256_cmp_ps(v, v, _CMP_EQ_OQ)); /* NaN -> -inf */
        _mm256_storeu_ps(l + i, v);
        m = _mm256_max_ps(v, m); /* v > m ? v : m */
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, m);
    float mx = -INFINITY;
    for (int j = 0; j < 8; j++) mx = lanes[j] > mx ? lanes[j] : mx;
    return scale_clean_rest(l, i, n, temp, mx);
}

/* The tokens i of w[0..n) with w[i] >= floor (false for NaN), in id order, into c as
 * (w[i], i); returns how many. 8 at a time: a block with none costs one compare. */
SMP_AVX2 static size_t cands_at_least_avx2(const float *w, int32_t n, float floor, tsr_cand *c)
{
    const __m256 vf = _mm256_set1_ps(floor);
    size_t nc = 0;
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        unsigned k =
            (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(w + i), vf, _CMP_GE_OQ));
        while (k) {
            const int32_t j = i + __builtin_ctz(k);
            c[nc++] = (tsr_cand){w[j], j};
            k &= k - 1;
        }
    }
    for (; i < n; i++)
        if (w[i] >= floor) c[nc++] = (tsr_cand){w[i], i};
    return nc;
}

/* sum of exp_neg(l[i] - max) over [0, n); when w_out is not NULL it also receives the
 * weights (w_out may be l). */
static double sum_exp(float *l, int32_t n, float max, float *w_out)
{
    return use_avx2() ? sum_exp_avx2(l, n, max, w_out) : sum_exp_v4(l, n, max, w_out);
}

/* logits /= temp (skipped for 1), NaN -> -inf, in place; returns the max (-inf when
 * nothing is > -inf). */
static float scale_clean_max(float *l, int32_t n, float temp)
{
    return use_avx2() ? scale_clean_max_avx2(l, n, temp) : scale_clean_max_v4(l, n, temp);
}

double tsr_sampler_weights(float *logits, int32_t n, float temp, float *w)
{
    const float max = scale_clean_max(logits, n, temp);
    if (!isfinite(max)) return 0.0;
    return sum_exp(logits, n, max, w);
}

/* ---- sampling */

/* Index of the first maximum of logits[0..n) (NaN never wins); 0 when none is > -inf. A
 * vector pass for the max, then a scan for its first occurrence. */
static int32_t argmax_first_v4(const float *l, int32_t n)
{
    v4f m = (v4f){0} - INFINITY;
    int32_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const v4f v = v4f_load(l + i);
        m = v4f_select(v > m, v, m); /* false for NaN */
    }
    float mx = -INFINITY;
    for (int j = 0; j < 4; j++) mx = m[j] > mx ? m[j] : mx;
    for (; i < n; i++) mx = l[i] > mx ? l[i] : mx;
    if (mx == -INFINITY) return 0;
    for (i = 0; i < n; i++) {
        if (l[i] == mx) return i;
    }
    return 0; /* unreachable */
}

/* argmax_first_v4 8 lanes at a time (AVX2 CPUs, those with AVX-512 too: over 151936 logits
 * 16 us against the 4-lane loop's 62): vmaxps returns its second operand when either is NaN
 * or both are equal, so (v, m) keeps m exactly where v > m is false, as v4f_select; the first
 * occurrence by compare masks. The same index for every input. */
__attribute__((target("avx2"))) static int32_t argmax_first_avx2(const float *l, int32_t n)
{
    __m256 m = _mm256_set1_ps(-INFINITY);
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) m = _mm256_max_ps(_mm256_loadu_ps(l + i), m);
    float lanes[8];
    _mm256_storeu_ps(lanes, m);
    float mx = -INFINITY;
    for (int j = 0; j < 8; j++) mx = lanes[j] > mx ? lanes[j] : mx;
    for (; i < n; i++) mx = l[i] > mx ? l[i] : mx;
    if (mx == -INFINITY) return 0;
    const __m256 vx = _mm256_set1_ps(mx);
    for (i = 0; i + 8 <= n; i += 8) {
        const int k = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(l + i), vx, _CMP_EQ_OQ));
        if (k) return i + __builtin_ctz((unsigned)k);
    }
    for (; i < n; i++)
        if (l[i] == mx) return i;
    return 0; /* unreachable */
}

/* Index of the first maximum of logits[0..n) (NaN never wins); 0 when none is > -inf. */
static int32_t argmax_first(const float *l, int32_t n)
{
    return use_avx2() ? argmax_first_avx2(l, n) : argmax_first_v4(l, n);
}

int32_t tsr_sampler_argmax(const float *logits, int32_t n)
{
    return argmax_first(logits, n);
}

/* Draw from weights w[0..n) (>= 0) with total `sum` > 0; returns the index. */
static size_t draw_index_cand(tsr_sampler *s, const tsr_cand *c, size_t n, double sum)
{
    double r = rng_uniform(s) * sum;
    size_t last = 0;
    for (size_t i = 0; i < n; i++) {
        if (c[i].v > 0.0f) {
            r -= c[i].v;
            last = i;
            if (r < 0.0) return i;
        }
    }
    return last; /* rounding left r a hair above 0: the last positive weight */
}

/* Log-probabilities of the n_top best of logits[0..n) against log-sum-exp lse. Uses the
 * candidate scratch. */
static void top_logprobs(tsr_sampler *s, const float *l, float lse, int32_t n_top, int32_t *top_ids,
                         float *top_lp)
{
    int32_t n = s->n_vocab;
    if (n_top > n) n_top = n;
    if (n_top <= 0) return;
    tsr_cand *c = s->cand;
    for (int32_t i = 0; i < n; i++) c[i] = (tsr_cand){l[i], i};
    if ((size_t)n_top < (size_t)n) cand_select(c, (size_t)n, (size_t)n_top);
    cand_sort(c, (size_t)n_top);
    for (int32_t i = 0; i < n_top; i++) {
        top_ids[i] = c[i].id;
        top_lp[i] = c[i].v - lse;
    }
}

static float log_sum_exp(float *l, int32_t n, float max)
{
    if (!isfinite(max)) return max;
    return max + (float)log(sum_exp(l, n, max, NULL));
}

/* The candidates of a filtered draw: tokens with probability > 0 after top-k, top-p and
 * min-p, carrying their unnormalised weight w = exp(l - max) in .v, in s->cand. logits have
 * been penalised and scaled; max is their maximum (finite). *weights_in_logits tells
 * whether logits[] now hold the weights. Returns the count. */
static size_t build_cands(tsr_sampler *s, float *logits, float max, bool *weights_in_logits_out)
{
    const int32_t n = s->n_vocab;
    const tsr_sampling_params *p = &s->p;
    const bool use_k = p->top_k > 0 && p->top_k < n;
    const bool use_p = p->top_p < 1.0f;
    const bool use_min_p = p->min_p > 0.0f;
    bool weights_in_logits = false;
    /* Candidates: the tokens with probability > 0. top-k selects on the logits; from then on
     * the candidates carry their unnormalised probability w = exp(l - max) in .v (the max has
     * w = 1), and top-p / min-p work on those as vLLM does on probs. */
    tsr_cand *c = s->cand;
    size_t nc = 0;
    if (use_k) {
        if ((size_t)p->top_k <= 4096) {
            nc = cand_top_k_heap(logits, n, (size_t)p->top_k, c);
        } else {
            for (int32_t i = 0; i < n; i++) {
                if (logits[i] > -INFINITY) c[nc++] = (tsr_cand){logits[i], i};
            }
            if ((size_t)p->top_k < nc) {
                cand_select(c, nc, (size_t)p->top_k);
                nc = (size_t)p->top_k;
            }
        }
        double z = 0.0;
        for (size_t i = 0; i < nc; i++) {
            c[i].v = exp_neg(c[i].v - max);
            z += c[i].v;
        }
        if (use_p) nc = cand_nucleus(c, nc, (double)p->top_p * z);
        if (use_min_p) { /* keeps the max (w = 1 >= min_p) */
            size_t keep = 0;
            for (size_t i = 0; i < nc; i++) {
                if (c[i].v >= p->min_p) c[keep++] = c[i];
            }
            nc = keep;
        }
    } else if (use_p) {
        /* z over every token, with the weights stored in place. Only tokens that can survive
         * become candidates, by a floor on w:
         *  - min-p: w >= min_p (exact: min-p is a ratio to p_max, and the max survives top-p);
         *  - top-p: the tokens ranked at or after a nucleus token weigh more than (1 - p) z,
         *    and there are at most n of them, each of weight <= its own: so its
         *    w > (1 - p) z / n (halved against rounding). Cuts most of a real vocabulary.
         * Branch-free compaction: always write the slot, advance when kept. */
        const double z = sum_exp(logits, n, max, logits);
        weights_in_logits = true;
        float w_floor = (float)(0.5 * (1.0 - (double)p->top_p) * z / (double)n);
        if (use_min_p && p->min_p > w_floor) w_floor = p->min_p;
        if (!(w_floor > 0.0f)) w_floor = FLT_MIN; /* w = 0 never */
        if (use_avx2()) {
            nc = cands_at_least_avx2(logits, n, w_floor, c);
        } else {
            for (int32_t i = 0; i < n; i++) {
                c[nc] = (tsr_cand){logits[i], i};
                nc += logits[i] >= w_floor;
            }
        }
        nc = cand_nucleus(c, nc, (double)p->top_p * z);
    } else {
        /* min-p alone: a floor on the logit (loose by 1e-3 against rounding) spares exp for
         * most tokens; the exact test is on w */
        const float floor_l = max + logf(p->min_p) - 1e-3f;
        const bool avx2 = use_avx2();
        for (int32_t i = 0; i < n; i++) {
            if (avx2 && (i & 7) == 0 && (i = skip_below_avx2(logits, i, n, floor_l)) >= n) break;
            if (logits[i] >= floor_l) {
                const float w = exp_neg(logits[i] - max);
                if (w >= p->min_p) c[nc++] = (tsr_cand){w, i};
            }
        }
    }

    *weights_in_logits_out = weights_in_logits;
    return nc;
}

static int32_t sample_impl(tsr_sampler *s, float *logits, int32_t n_top, int32_t *top_ids,
                           float *top_lp, float *chosen_lp)
{
    const int32_t n = s->n_vocab;
    const tsr_sampling_params *p = &s->p;
    const bool want_lp = n_top > 0 || chosen_lp;

    tsr_sampler_apply_penalties(s, logits);

    const bool greedy = p->temperature < TSR_SAMPLER_GREEDY_EPS;
    if (greedy && !want_lp) return argmax_first(logits, n); /* NaN never wins there */

    const float max = scale_clean_max(logits, n, greedy ? 1.0f : p->temperature);
    float lse = 0.0f;
    if (want_lp) {
        lse = log_sum_exp(logits, n, max);
        top_logprobs(s, logits, lse, n_top, top_ids, top_lp);
    }

    int32_t id;
    if (greedy || !isfinite(max)) {
        /* greedy; or nothing finite to sample: all -inf (-> id 0) or some +inf (-> the
         * first of them) */
        id = argmax_first(logits, n);
        if (chosen_lp) *chosen_lp = logits[id] - lse;
        return id;
    }

    const bool use_k = p->top_k > 0 && p->top_k < n;
    const bool use_p = p->top_p < 1.0f;
    const bool use_min_p = p->min_p > 0.0f;
    bool weights_in_logits = false; /* logits[] now hold w = exp(l - max) */

    if (!use_k && !use_p && !use_min_p) {
        /* plain sampling over the whole vocabulary, in id order, no selection */
        const double sum = sum_exp(logits, n, max, logits);
        double r = rng_uniform(s) * sum;
        id = -1;
        int32_t last = 0;
        for (int32_t i = 0; i < n; i++) {
            const float w = logits[i];
            if (w > 0.0f) {
                last = i;
                r -= w;
                if (r < 0.0) {
                    id = i;
                    break;
                }
            }
        }
        if (id < 0) id = last; /* rounding left r a hair above 0 */
        if (chosen_lp) *chosen_lp = logf(logits[id]) + max - lse;
        return id;
    }

    size_t nc = build_cands(s, logits, max, &weights_in_logits);
    tsr_cand *c = s->cand;
    double sum = 0.0;
    for (size_t i = 0; i < nc; i++) sum += c[i].v;
    id = c[draw_index_cand(s, c, nc, sum)].id;
    if (chosen_lp) *chosen_lp = weights_in_logits ? logf(logits[id]) + max - lse : logits[id] - lse;
    return id;
}

bool tsr_sampler_read_only(const tsr_sampler *s)
{
    const tsr_sampling_params *p = &s->p;
    return p->temperature < TSR_SAMPLER_GREEDY_EPS && p->repetition_penalty == 1.0f &&
           p->frequency_penalty == 0.0f && p->presence_penalty == 0.0f;
}

int32_t tsr_sampler_sample_read_only(const tsr_sampler *s, const float *logits)
{
    return argmax_first(logits, s->n_vocab);
}

int32_t tsr_sampler_sample(tsr_sampler *s, float *logits)
{
    return sample_impl(s, logits, 0, NULL, NULL, NULL);
}

int32_t tsr_sampler_sample_logprobs(tsr_sampler *s, float *logits, int32_t n_top, int32_t *top_ids,
                                    float *top_logprobs, float *chosen_logprob)
{
    return sample_impl(s, logits, n_top, top_ids, top_logprobs, chosen_logprob);
}

int32_t tsr_sampler_sample_spec(tsr_sampler *s, float *logits, int32_t draft, bool *accepted)
{
    const int32_t n = s->n_vocab;
    const tsr_sampling_params *p = &s->p;
    tsr_sampler_apply_penalties(s, logits);
    const bool greedy = p->temperature < TSR_SAMPLER_GREEDY_EPS;
    if (greedy) {
        int32_t id = argmax_first(logits, n);
        *accepted = id == draft;
        return id;
    }
    const float max = scale_clean_max(logits, n, p->temperature);
    if (!isfinite(max)) {
        int32_t id = argmax_first(logits, n);
        *accepted = id == draft;
        return id;
    }
    bool weights_in_logits = false;
    size_t nc;
    tsr_cand *c = s->cand;
    if (p->top_k <= 0 && p->top_p >= 1.0f && p->min_p <= 0.0f) {
        /* No filter: every token is a candidate. */
        sum_exp(logits, n, max, logits);
        nc = 0;
        for (int32_t i = 0; i < n; i++)
            if (logits[i] > 0.0f) c[nc++] = (tsr_cand){logits[i], i};
    } else {
        nc = build_cands(s, logits, max, &weights_in_logits);
    }
    double sum = 0.0, w_draft = 0.0;
    size_t i_draft = nc;
    for (size_t i = 0; i < nc; i++) {
        sum += c[i].v;
        if (c[i].id == draft) {
            w_draft = c[i].v;
            i_draft = i;
        }
    }
    /* Accept the draft with probability p(draft) = w_draft / sum (q is one-hot). */
    if (rng_uniform(s) * sum < w_draft) {
        *accepted = true;
        return draft;
    }
    *accepted = false;
    /* Residual normalize(max(0, p - q)): p without the draft token. */
    if (i_draft < nc) {
        sum -= w_draft;
        c[i_draft].v = 0.0f;
    }
    if (!(sum > 0.0)) return draft; /* p was all on the draft: unreachable after a reject */
    return c[draw_index_cand(s, c, nc, sum)].id;
}

void tsr_sampler_unaccept(tsr_sampler *s, int32_t id)
{
    if (s->pos > 0) s->pos--;
    s->n_draw = 0;
    if (id < 0 || id >= s->n_vocab) return;
    if (s->gen_count[id] > 0) s->gen_count[id]--;
    /* `seen` stays set: the repetition penalty may keep counting a token that was only
     * seen in a rejected draft, unless it was never in the prompt nor generated; recompute
     * exactly by scanning is O(history), so callers that need exactness keep accepts and
     * unaccepts balanced and the prompt's ids in `seen`. */
    if (s->gen_count[id] == 0) {
        /* Undo the mark when this id was only ever seen as a generated token. */
        if (s->seen[id] == 2) {
            s->seen[id] = 0;
            for (size_t j = 0; j < s->n_seen; j++) {
                if (s->seen_ids[j] == id) {
                    s->seen_ids[j] = s->seen_ids[--s->n_seen];
                    break;
                }
            }
        }
    }
}
