/*
 * test_cuda_numerics.c — the arithmetic of the CUDA kernels (kernels/cuda/numerics.h),
 * compiled here by the host C compiler, against the CPU kernels (kernels/quant.c,
 * kernels/ops.c) on the shared models' tensors.
 *
 * What this covers: every per-element and per-block computation the device kernels run
 * (dequantization, activation quantization, block dots, the RMSNorm scale, the online
 * softmax, the rope rotation (NORM, NEOX, ggml's angles), SwiGLU/GeGLU), and the summation orders
 * the kernels use, emulated here lane by lane (warp butterfly reductions, chunked online softmax).
 * What it cannot cover: launches, indexing, shared memory and synchronisation on a real device —
 * the GPU suite (ctest -L gpu) checks those against CPU logits.
 *
 * Checks: dequantization bit-identical for every tensor of every supported type in the
 * models; activation quantizers (Q8_0, Q8_1, Q8_K) byte-identical; one-block dots
 * bit-identical to the scalar CPU dot for every quantized type; whole-row dots in the warp
 * order within
 * (2 * n_terms + 8) * 2^-24 * sum|terms| of the scalar CPU dot.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/numerics.h"
#include "kernels/kvcache.h"
#include "kernels/ops.h"
#include "kernels/quant.h"
#include "shard/gguf.h"
#include "tests/util.h"

static const char *const k_files[] = {
    "synthetic/synth-tiny-f16.gguf",    "synthetic/synth-tiny-bf16.gguf",
    "synthetic/synth-tiny-q8_0.gguf",   "synthetic/synth-tiny-q4_0.gguf",
    "synthetic/synth-tiny-q4_1.gguf",   "synthetic/synth-tiny-q5_0.gguf",
    "synthetic/synth-tiny-q5_1.gguf",   "synthetic/synth-tiny-q2_k.gguf",
    "synthetic/synth-tiny-q3_k_m.gguf", "synthetic/synth-tiny-q4_k_m.gguf",
    "synthetic/synth-tiny-q5_k_m.gguf", "stories260K.gguf",
    "derived/stories260K-q8_0.gguf",    "random/llama-2-tiny-random.gguf",
};
#define N_FILES (sizeof k_files / sizeof k_files[0])

/* The sanitizer tree checks every tensor but only every 16th row (TSR_TEST_LEAN). */
#ifdef TSR_TEST_LEAN
#define ROW_STEP 16
#else
#define ROW_STEP 1
#endif

/* Every weight type the backend runs; the test insists that the models cover each. */
static const uint32_t k_types[] = {TSR_CUDA_F32,  TSR_CUDA_F16,  TSR_CUDA_BF16, TSR_CUDA_Q8_0,
                                   TSR_CUDA_Q4_0, TSR_CUDA_Q4_1, TSR_CUDA_Q5_0, TSR_CUDA_Q5_1,
                                   TSR_CUDA_Q2_K, TSR_CUDA_Q3_K, TSR_CUDA_Q4_K, TSR_CUDA_Q5_K,
                                   TSR_CUDA_Q6_K};
#define N_TYPES (sizeof k_types / sizeof k_types[0])

/* The CPU must run every type the files hold; a type it lacks is a failure, not a skip. */
static void require_cpu_type(uint32_t type, const char *file, const char *tensor)
{
    if (!tsr_type_supported(type))
        fail_msg("%s: tensor %s has type %s, which kernels/quant.c does not run: the CPU "
                 "reference is missing (merge main for the quant types)",
                 file, tensor, tsr_type_name(type));
}

/* ---- warp-order emulation ------------------------------------------------------------- */

/* __shfl_xor_sync butterfly over 32 lanes (offsets 16..1): lane 0's final value. */
static float warp_sum(const float *lane_in)
{
    float v[32], nv[32];
    memcpy(v, lane_in, sizeof v);
    for (int off = 16; off >= 1; off /= 2) {
        for (int l = 0; l < 32; ++l) nv[l] = v[l] + v[l ^ off];
        memcpy(v, nv, sizeof v);
    }
    return v[0];
}

/* The row dot of kernels.cu's matvec (one warp per row): for 32-element blocks lanes
 * 4k..4k+3 share blocks k, k+8, ... (integer quarters summed exactly); for K-quants lanes 8k..8k+7
 * share super-block k (one 32-group each, integers summed exactly), super-blocks k, k+4, ...; for
 * float weights lane l takes elements l, l+32, .... *abs_terms gets sum |term| for the error bound,
 * *n_terms the number of float terms. xq is the activation row in the dot type. */
static float gpu_row_dot(uint32_t type, int64_t n, const uint8_t *w, const void *xq,
                         double *abs_terms, int64_t *n_terms)
{
    float lanes[32] = {0};
    double at = 0;
    const int32_t be = tsr_cuda_block_elems(type), bb = tsr_cuda_block_bytes(type);
    const int64_t nb = n / be;
    if (be == 1) {
        const float *x = xq;
        for (int64_t i = 0; i < n; ++i) {
            const float t = tsr_cuda_dequant(type, w + (size_t)i * bb, 0) * x[i];
            lanes[i % 32] += t;
            at += fabs((double)t);
        }
        *n_terms = n;
    } else if (be == 32) {
        const uint32_t dt = tsr_cuda_dot_type(type);
        const int32_t xb = tsr_cuda_block_bytes(dt);
        for (int64_t b = 0; b < nb; ++b) { /* 4 lanes per block, exact integer parts */
            const uint8_t *wbk = w + (size_t)b * bb, *xbk = (const uint8_t *)xq + b * xb;
            int32_t si = 0;
            for (int q = 0; q < 4; ++q) si += tsr_cuda_isum_part32(type, wbk, xbk, q);
            const float t = tsr_cuda_dot_combine32(type, wbk, xbk, si);
            if (tsr_test_fbits(t) != tsr_test_fbits(tsr_cuda_dot_blk32(type, wbk, xbk)))
                fail_msg("block %lld: 4-lane parts give %.9g, the whole block %.9g", (long long)b,
                         t, tsr_cuda_dot_blk32(type, wbk, xbk));
            lanes[(b % 8) * 4] += t;
            at += fabs((double)t);
        }
        *n_terms = nb;
    } else {
        const tsr_cuda_q8_K *x = xq;
        for (int64_t b = 0; b < nb; ++b) {
            int32_t si = 0, sm = 0;
            for (int g = 0; g < 8; ++g) { /* xor-shuffle of ints: any order is exact */
                int32_t a, c;
                tsr_cuda_dot_group_k(type, w + (size_t)b * bb, &x[b], g, &a, &c);
                si += a;
                sm += c;
            }
            const float t = tsr_cuda_dot_combine_k(type, w + (size_t)b * bb, &x[b], si, sm);
            lanes[(b % 4) * 8] += t;
            at += fabs((double)t);
        }
        *n_terms = nb;
    }
    *abs_terms = at;
    return warp_sum(lanes);
}

/* ---- dequantization: every tensor, every element ------------------------------------- */

static void test_dequant_bit_identical(void **state)
{
    (void)state;
    bool seen[64] = {false};
    for (size_t f = 0; f < N_FILES; ++f) {
        const char *path = tsr_test_model_path(k_files[f]);
        tsr_gguf *g = NULL;
        char err[256];
        if (tsr_gguf_open(path, &g, err, sizeof err) != 0) fail_msg("%s: %s", path, err);
        for (int64_t t = 0; t < tsr_gguf_n_tensors(g); ++t) {
            const tsr_gguf_tensor *ti = tsr_gguf_tensor_at(g, t);
            require_cpu_type(ti->type, k_files[f], ti->name);
            const int32_t be = tsr_cuda_block_elems(ti->type), bb = tsr_cuda_block_bytes(ti->type);
            if (be == 0) fail_msg("%s: %s type %u unknown to numerics.h", path, ti->name, ti->type);
            seen[ti->type] = true;
            const int64_t n0 = ti->ne[0],
                          rows = (int64_t)(ti->n_bytes / tsr_row_bytes(ti->type, n0));
            float *ref = tsr_test_xmalloc(sizeof(float) * (size_t)n0);
            const size_t rb = tsr_row_bytes(ti->type, n0);
            for (int64_t r = 0; r < rows; r += ROW_STEP) {
                const uint8_t *row = (const uint8_t *)ti->data + (size_t)r * rb;
                tsr_dequant_row(ti->type, row, ref, n0);
                for (int64_t i = 0; i < n0; ++i) {
                    const float v =
                        tsr_cuda_dequant(ti->type, row + (size_t)(i / be) * bb, (int)(i % be));
                    if (tsr_test_fbits(v) != tsr_test_fbits(ref[i]))
                        fail_msg("%s %s (%s) row %lld element %lld: CPU %.9g (0x%08x), "
                                 "numerics.h %.9g (0x%08x)",
                                 k_files[f], ti->name, tsr_type_name(ti->type), (long long)r,
                                 (long long)i, ref[i], tsr_test_fbits(ref[i]), v,
                                 tsr_test_fbits(v));
                }
            }
            free(ref);
        }
        tsr_gguf_close(g);
    }
    for (size_t k = 0; k < N_TYPES; ++k)
        if (!seen[k_types[k]])
            fail_msg("no tensor of type %s in the shared models: coverage lost",
                     tsr_type_name(k_types[k]));
}

/* ---- activation quantizers ------------------------------------------------------------ */

static void check_quant(uint32_t dt, const float *x, int64_t n)
{
    const size_t rb = tsr_row_bytes(dt, n);
    uint8_t *cpu = tsr_test_xmalloc(rb), *hd = tsr_test_xmalloc(rb);
    memset(hd, 0xAB, rb);
    tsr_quant_row(dt, x, cpu, n);
    const int32_t be = tsr_cuda_block_elems(dt), bb = tsr_cuda_block_bytes(dt);
    for (int64_t b = 0; b < n / be; ++b) {
        if (dt == TSR_CUDA_Q8_0) tsr_cuda_quant_q8_0(x + b * be, (tsr_cuda_q8_0 *)(hd + b * bb));
        if (dt == TSR_CUDA_Q8_1) tsr_cuda_quant_q8_1(x + b * be, (tsr_cuda_q8_1 *)(hd + b * bb));
        if (dt == TSR_CUDA_Q8_K) tsr_cuda_quant_q8_K(x + b * be, (tsr_cuda_q8_K *)(hd + b * bb));
    }
    for (size_t i = 0; i < rb; ++i)
        if (cpu[i] != hd[i])
            fail_msg("%s quantizer: byte %zu of block %zu differs: CPU 0x%02x, numerics.h 0x%02x",
                     tsr_type_name(dt), i % (size_t)bb, i / (size_t)bb, cpu[i], hd[i]);
    free(cpu);
    free(hd);
}

static void test_activation_quantizers(void **state)
{
    (void)state;
    const int64_t n = 4096;
    float *x = tsr_test_xmalloc(sizeof(float) * (size_t)n);
    uint64_t s = 12345;
    for (int64_t i = 0; i < n; ++i) x[i] = tsr_test_gauss(&s) * 3.0f;
    for (int i = 256; i < 512; ++i) x[i] = 0.0f;             /* zero super-block */
    for (int i = 512; i < 768; ++i) x[i] *= 1e-7f;           /* tiny */
    x[1000] = 40.0f;                                         /* ties of |max| with */
    x[1001] = -40.0f;                                        /* opposite signs */
    for (int i = 1536; i < 1792; ++i) x[i] = (float)(i % 7); /* exact .5 ties after scaling */
    check_quant(TSR_CUDA_Q8_0, x, n);
    check_quant(TSR_CUDA_Q8_K, x, n);
    if (!tsr_type_supported(TSR_CUDA_Q4_1)) fail_msg("CPU lacks Q4_1 / Q8_1 (merge main)");
    check_quant(TSR_CUDA_Q8_1, x, n);
    /* real activations: embedding rows of a model */
    tsr_gguf *g = NULL;
    char err[256];
    assert_int_equal(
        tsr_gguf_open(tsr_test_model_path("synthetic/synth-tiny-f16.gguf"), &g, err, sizeof err),
        0);
    const tsr_gguf_tensor *te = tsr_gguf_find_tensor(g, "token_embd.weight");
    assert_non_null(te);
    float *row = tsr_test_xmalloc(sizeof(float) * 256);
    for (int r = 0; r < 64; ++r) {
        tsr_dequant_row(te->type, (const uint8_t *)te->data + (size_t)((r * 397) % 32000) * 512,
                        row, 256);
        check_quant(TSR_CUDA_Q8_0, row, 256);
        check_quant(TSR_CUDA_Q8_1, row, 256);
        check_quant(TSR_CUDA_Q8_K, row, 256);
    }
    free(row);
    tsr_gguf_close(g);
    free(x);
}

/* ---- dots ----------------------------------------------------------------------------- */

/* For the CPU dots in ggml's lane order (Q8_0, Q4_1: kernels/dot_ggml.h), the partial sums
 * are per 4-element lane, not per block: sum over blocks of |d_w d_x| * sum |q_w q_x| (plus
 * |m_w s_x| for Q4_1) bounds their absolute values as the block terms do for the others. */
static double lane_abs_sum(uint32_t type, int64_t n, const uint8_t *w, const uint8_t *x)
{
    double at = 0;
    for (int64_t b = 0; b < n / 32; ++b) {
        uint16_t dw, dx, mw, sx;
        memcpy(&dw, w, 2);
        memcpy(&dx, x, 2);
        double si = 0;
        if (type == TSR_TYPE_Q8_0) {
            for (int e = 0; e < 32; ++e)
                si += fabs((double)((const int8_t *)w)[2 + e] * ((const int8_t *)x)[2 + e]);
            at += fabs((double)tsr_f16_to_f32(dw) * tsr_f16_to_f32(dx)) * si;
            w += 34;
            x += 34;
        } else { /* Q4_1 x Q8_1 */
            memcpy(&mw, w + 2, 2);
            memcpy(&sx, x + 2, 2);
            for (int e = 0; e < 32; ++e) {
                const int q = e < 16 ? w[4 + e] & 0xF : w[4 + e - 16] >> 4;
                si += fabs((double)q * ((const int8_t *)x)[4 + e]);
            }
            at += fabs((double)tsr_f16_to_f32(dw) * tsr_f16_to_f32(dx)) * si +
                  fabs((double)tsr_f16_to_f32(mw) * tsr_f16_to_f32(sx));
            w += 20;
            x += 36;
        }
    }
    return at;
}

static void test_dots(void **state)
{
    (void)state;
    assert_true(tsr_quant_set_isa("scalar"));
    uint64_t s = 777;
    int64_t n_rows_checked = 0;
    double worst_ratio = 0;
    for (size_t f = 0; f < N_FILES; ++f) {
        const char *path = tsr_test_model_path(k_files[f]);
        tsr_gguf *g = NULL;
        char err[256];
        if (tsr_gguf_open(path, &g, err, sizeof err) != 0) fail_msg("%s: %s", path, err);
        for (int64_t t = 0; t < tsr_gguf_n_tensors(g); ++t) {
            const tsr_gguf_tensor *ti = tsr_gguf_tensor_at(g, t);
            if (ti->n_dims < 2) continue;
            require_cpu_type(ti->type, k_files[f], ti->name);
            const int64_t n = ti->ne[0];
            const uint32_t dt = tsr_type_vec_dot_type(ti->type);
            assert_int_equal(dt, tsr_cuda_dot_type(ti->type));
            float *x = tsr_test_xmalloc(sizeof(float) * (size_t)n);
            for (int64_t i = 0; i < n; ++i) x[i] = tsr_test_gauss(&s);
            void *xq = tsr_test_xmalloc(tsr_row_bytes(dt, n));
            tsr_quant_row(dt, x, xq, n);
            const size_t rb = tsr_row_bytes(ti->type, n);
            const int64_t rows = ti->ne[1];
            const int64_t step = rows > 48 / ROW_STEP ? rows / (48 / ROW_STEP) : 1;
            for (int64_t r = 0; r < rows; r += step) {
                const uint8_t *w = (const uint8_t *)ti->data + (size_t)r * rb;
                const float cpu = tsr_vec_dot(ti->type, n, w, xq);
                double at;
                int64_t nt;
                const float gpu = gpu_row_dot(ti->type, n, w, xq, &at, &nt);
                if (ti->type == TSR_TYPE_Q8_0 || ti->type == TSR_TYPE_Q4_1)
                    at = fmax(at, lane_abs_sum(ti->type, n, w, xq));
                if (ti->type == TSR_TYPE_Q5_0 || ti->type == TSR_TYPE_Q4_K ||
                    ti->type == TSR_TYPE_Q6_K) {
                    /* the CPU sums these in ggml's x86 order: bound both orders by the
                     * element magnitudes (x4 covers the K-quant min terms that cancel) */
                    float *wd = tsr_test_xmalloc(sizeof(float) * (size_t)n);
                    tsr_dequant_row(ti->type, w, wd, n);
                    double ae = 0;
                    for (int64_t i = 0; i < n; ++i) ae += fabs((double)wd[i] * x[i]);
                    at = fmax(at, 4.0 * ae);
                    free(wd);
                }
                const double tol = (2.0 * (double)nt + 8.0) * 0x1p-24 * at + 1e-30;
                const double d = fabs((double)gpu - (double)cpu);
                if (!(d <= tol))
                    fail_msg("%s %s (%s) row %lld: CPU dot %.9g, GPU-order dot %.9g, |diff| %.3g "
                             "> bound %.3g",
                             k_files[f], ti->name, tsr_type_name(ti->type), (long long)r, cpu, gpu,
                             d, tol);
                if (tol > 0 && d / tol > worst_ratio) worst_ratio = d / tol;
                n_rows_checked++;
                /* one block alone: the CPU's scalar dot is then that block's term, except for
                 * the types whose CPU dot follows ggml's x86 lane order (kernels/dot_ggml.h:
                 * 8 lane products per block, each rounded, then a tree), bound-checked above */
                const int32_t be = tsr_cuda_block_elems(ti->type);
                /* Q5_0, Q4_K and Q6_K follow ggml's x86 orders on the CPU too (exactb); the
                 * device kernels keep the block order, bound-checked above */
                const bool lane_order = ti->type == TSR_TYPE_Q8_0 || ti->type == TSR_TYPE_Q4_1 ||
                                        ti->type == TSR_TYPE_Q5_0 || ti->type == TSR_TYPE_Q4_K ||
                                        ti->type == TSR_TYPE_Q6_K;
                if (be > 1 && !lane_order) {
                    const float c1 = tsr_vec_dot(ti->type, be, w, xq);
                    const float g1 =
                        be == 32 ? tsr_cuda_dot_blk32(ti->type, w, xq)
                                 : tsr_cuda_dot_blk_k(ti->type, w, (const tsr_cuda_q8_K *)xq);
                    if (tsr_test_fbits(c1) !=
                        tsr_test_fbits(0.0f + g1)) /* the CPU adds the term to 0 */
                        fail_msg("%s %s (%s) row %lld block 0: CPU %.9g, numerics.h %.9g "
                                 "(must be bit-identical)",
                                 k_files[f], ti->name, tsr_type_name(ti->type), (long long)r, c1,
                                 g1);
                }
            }
            free(x);
            free(xq);
        }
        tsr_gguf_close(g);
    }
    assert_true(tsr_quant_set_isa(NULL));
    print_message("dots: %lld rows, worst |diff|/bound %.3f\n", (long long)n_rows_checked,
                  worst_ratio);
}

/* ---- RMSNorm: double sum in the block-reduction order of kernels.cu ---------------------- */

static void test_rmsnorm(void **state)
{
    (void)state;
    const int n = 896, nt = 16;
    float *x = tsr_test_xmalloc(sizeof(float) * n * nt), *w = tsr_test_xmalloc(sizeof(float) * n);
    float *ref = tsr_test_xmalloc(sizeof(float) * n * nt);
    uint64_t s = 99;
    for (int i = 0; i < n * nt; ++i) x[i] = tsr_test_gauss(&s) * (1 + i % 5);
    for (int i = 0; i < n; ++i) w[i] = 1.0f + 0.1f * tsr_test_gauss(&s);
    tsr_rmsnorm(ref, x, w, nt, n, 1e-6f);
    for (int t = 0; t < nt; ++t) {
        /* 256 threads: strided partial sums, then a tree over threads */
        double part[256] = {0};
        for (int i = 0; i < n; ++i) part[i % 256] += (double)x[t * n + i] * x[t * n + i];
        for (int half = 128; half >= 1; half /= 2)
            for (int k = 0; k < half; ++k) part[k] += part[k + half];
        const float sc = tsr_cuda_rms_scale(part[0], n, 1e-6f);
        for (int i = 0; i < n; ++i) {
            const float v = tsr_cuda_rms_apply(x[t * n + i], sc, w[i]);
            const float r = ref[t * n + i];
            if (fabsf(v - r) > 2.0f * 0x1p-24f * fabsf(r))
                fail_msg("rmsnorm token %d element %d: CPU %.9g, GPU order %.9g", t, i, r, v);
        }
    }
    free(x);
    free(w);
    free(ref);
}

/* ---- attention: online softmax over 16-position KV blocks vs the CPU's two passes -------- */

static void test_online_softmax_attention(void **state)
{
    (void)state;
    const int hd = 64, n_pos = 203;
    float *q = tsr_test_xmalloc(sizeof(float) * hd),
          *k = tsr_test_xmalloc(sizeof(float) * hd * n_pos);
    float *v = tsr_test_xmalloc(sizeof(float) * hd * n_pos),
          *att = tsr_test_xmalloc(sizeof(float) * n_pos);
    uint64_t s = 4242;
    for (int i = 0; i < hd; ++i) q[i] = tsr_test_gauss(&s);
    for (int i = 0; i < hd * n_pos; ++i) k[i] = 2.0f * tsr_test_gauss(&s);
    for (int i = 0; i < hd * n_pos; ++i) v[i] = tsr_test_gauss(&s);
    const float scale = 1.0f / sqrtf((float)hd);
    /* CPU (worker/model.c attn_run) */
    float ref[64] = {0};
    for (int p = 0; p < n_pos; ++p) {
        float d = 0;
        for (int i = 0; i < hd; ++i) d += q[i] * k[p * hd + i];
        att[p] = d * scale;
    }
    tsr_softmax(att, n_pos);
    for (int p = 0; p < n_pos; ++p)
        for (int i = 0; i < hd; ++i) ref[i] += att[p] * v[p * hd + i];
    /* kernels.cu: chunks of 16 positions; a score is a warp-sum over lanes (i % 32) */
    tsr_cuda_softmax_state st;
    tsr_cuda_softmax_init(&st);
    float acc[64] = {0};
    for (int c0 = 0; c0 < n_pos; c0 += 16) {
        float sc[16];
        float cmax = -INFINITY;
        for (int j = 0; j < 16; ++j) {
            const int p = c0 + j;
            if (p >= n_pos) {
                sc[j] = -INFINITY;
                continue;
            }
            float lanes[32] = {0};
            for (int i = 0; i < hd; ++i) lanes[i % 32] += q[i] * k[p * hd + i];
            sc[j] = warp_sum(lanes) * scale;
            cmax = fmaxf(cmax, sc[j]);
        }
        const float corr = tsr_cuda_softmax_rescale(&st, cmax);
        for (int i = 0; i < hd; ++i) acc[i] *= corr;
        for (int j = 0; j < 16; ++j) {
            const float pw = tsr_cuda_softmax_weight(&st, sc[j]);
            st.l += pw;
            if (pw != 0.0f)
                for (int i = 0; i < hd; ++i) acc[i] += pw * v[(c0 + j) * hd + i];
        }
    }
    for (int i = 0; i < hd; ++i) {
        const float o = acc[i] / st.l;
        if (fabsf(o - ref[i]) > 1e-5f * (1.0f + fabsf(ref[i])))
            fail_msg("attention dim %d: CPU %.9g, online softmax %.9g", i, ref[i], o);
    }
    /* split attention (flash-decoding, kernels.cu k_attention + k_attn_merge): the chunks
     * cut into n_split ranges, each folded alone, merged in split order */
    const int32_t n_chunks = (n_pos - 1) / 16 + 1;
    const int32_t n_split = tsr_cuda_attn_splits(1, 1, n_chunks);
    assert_true(n_split > 1);
    float ms[TSR_CUDA_ATT_MAX_SPLITS], ls[TSR_CUDA_ATT_MAX_SPLITS];
    static float accs[TSR_CUDA_ATT_MAX_SPLITS][64];
    for (int32_t sp = 0; sp < n_split; ++sp) {
        int32_t c0, c1;
        tsr_cuda_attn_split_range(0, n_chunks - 1, sp, n_split, &c0, &c1);
        tsr_cuda_softmax_state ss;
        tsr_cuda_softmax_init(&ss);
        memset(accs[sp], 0, sizeof accs[sp]);
        for (int32_t c = c0; c < c1; ++c) {
            float sc[16], cmax = -INFINITY;
            for (int j = 0; j < 16; ++j) {
                const int p = c * 16 + j;
                float lanes[32] = {0};
                if (p < n_pos)
                    for (int i = 0; i < hd; ++i) lanes[i % 32] += q[i] * k[p * hd + i];
                sc[j] = p < n_pos ? warp_sum(lanes) * scale : -INFINITY;
                cmax = fmaxf(cmax, sc[j]);
            }
            const float corr = tsr_cuda_softmax_rescale(&ss, cmax);
            for (int i = 0; i < hd; ++i) accs[sp][i] *= corr;
            for (int j = 0; j < 16; ++j) {
                const float pw = tsr_cuda_softmax_weight(&ss, sc[j]);
                ss.l += pw;
                if (pw != 0.0f)
                    for (int i = 0; i < hd; ++i) accs[sp][i] += pw * v[(c * 16 + j) * hd + i];
            }
        }
        ms[sp] = ss.m;
        ls[sp] = ss.l;
    }
    float mm = -INFINITY, ll = 0.0f;
    for (int32_t sp = 0; sp < n_split; ++sp) mm = fmaxf(mm, ms[sp]);
    for (int32_t sp = 0; sp < n_split; ++sp) ll += ls[sp] * tsr_cuda_attn_merge_factor(ms[sp], mm);
    for (int i = 0; i < hd; ++i) {
        float o = 0.0f;
        for (int32_t sp = 0; sp < n_split; ++sp)
            o += accs[sp][i] * tsr_cuda_attn_merge_factor(ms[sp], mm);
        o /= ll;
        if (fabsf(o - ref[i]) > 1e-5f * (1.0f + fabsf(ref[i])))
            fail_msg("split attention (%d splits) dim %d: CPU %.9g, merged %.9g", n_split, i,
                     ref[i], o);
    }
    free(q);
    free(k);
    free(v);
    free(att);
}

/* ---- RoPE ----------------------------------------------------------------------------- */

static void rope_apply(const tsr_cuda_rope_params *rp, float *x, int32_t pos, int n_head, int hd,
                       const float *ff)
{
    for (int h = 0; h < n_head; ++h)
        for (int i0 = 0; i0 < rp->n_rot; i0 += 2) {
            float c, sn;
            tsr_cuda_rope_cs(rp, pos, i0, ff ? ff[i0 / 2] : 1.0f, &c, &sn);
            int a, b;
            tsr_cuda_rope_pair(rp->mode, rp->n_rot, i0, &a, &b);
            tsr_cuda_rope_rotate(&x[h * hd + a], &x[h * hd + b], c, sn);
        }
}

static void test_rope(void **state)
{
    (void)state;
    const int hd = 64, nh = 4, n_rot = 64;
    float x[256], y[256], z[256], ff[32];
    uint64_t s = 5;
    for (int i = 0; i < 32; ++i) ff[i] = 1.0f + (float)i / 8.0f;
    const int32_t positions[] = {0, 1, 7, 100, 4095, 32767};
    for (size_t pi = 0; pi < sizeof positions / sizeof positions[0]; ++pi) {
        for (int variant = 0; variant < 3; ++variant) {
            for (int i = 0; i < nh * hd; ++i) x[i] = y[i] = tsr_test_gauss(&s);
            const float fs = variant == 1 ? 0.25f : 1.0f;
            const float *f = variant == 2 ? ff : NULL;
            int32_t pos = positions[pi];
            tsr_rope(x, &pos, 1, nh, hd, n_rot, 10000.0f, fs, f);
            tsr_cuda_rope_params rp = {
                TSR_CUDA_ROPE_NORM, n_rot, 10000.0f, fs, 0.0f, 1.0f, {0, 0}, 0};
            rope_apply(&rp, y, pos, nh, hd, f);
            for (int i = 0; i < nh * hd; ++i)
                if (tsr_test_fbits(x[i]) != tsr_test_fbits(y[i]))
                    fail_msg("rope NORM pos %d variant %d element %d: CPU %.9g, numerics.h %.9g",
                             pos, variant, i, x[i], y[i]);
            /* NEOX rotates (i, i+n_rot/2): the same as NORM on the interleaved vector */
            for (int h = 0; h < nh; ++h)
                for (int i = 0; i < hd / 2; ++i) {
                    z[h * hd + 2 * i] = y[h * hd + i] = tsr_test_gauss(&s);
                    z[h * hd + 2 * i + 1] = y[h * hd + i + hd / 2] = tsr_test_gauss(&s);
                }
            rp.mode = TSR_CUDA_ROPE_NEOX;
            rope_apply(&rp, y, pos, nh, hd, f);
            rp.mode = TSR_CUDA_ROPE_NORM;
            rope_apply(&rp, z, pos, nh, hd, f);
            for (int h = 0; h < nh; ++h)
                for (int i = 0; i < hd / 2; ++i)
                    if (tsr_test_fbits(y[h * hd + i]) != tsr_test_fbits(z[h * hd + 2 * i]) ||
                        tsr_test_fbits(y[h * hd + i + hd / 2]) !=
                            tsr_test_fbits(z[h * hd + 2 * i + 1]))
                        fail_msg("rope NEOX pos %d head %d pair %d differs from NORM on the "
                                 "interleaved vector",
                                 pos, h, i);
        }
    }
    /* ggml's running-product angles (tsr_rope_ext: qwen2/qwen3/gemma3 NEOX, and NORM) */
    for (size_t pi = 0; pi < sizeof positions / sizeof positions[0]; ++pi)
        for (int variant = 0; variant < 6; ++variant) {
            const int neox = variant % 2;
            const float fs = variant / 2 == 1 ? 0.125f : 1.0f;
            const float *f = variant / 2 == 2 ? ff : NULL;
            for (int i = 0; i < nh * hd; ++i) x[i] = y[i] = tsr_test_gauss(&s);
            int32_t pos = positions[pi];
            tsr_rope_ext(x, &pos, 1, nh, hd, n_rot, 1000000.0f, fs, f, neox);
            tsr_cuda_rope_params rp = {neox ? TSR_CUDA_ROPE_NEOX : TSR_CUDA_ROPE_NORM,
                                       n_rot,
                                       1000000.0f,
                                       fs,
                                       0.0f,
                                       1.0f,
                                       {0, 0},
                                       1};
            rope_apply(&rp, y, pos, nh, hd, f);
            for (int i = 0; i < nh * hd; ++i)
                if (tsr_test_fbits(x[i]) != tsr_test_fbits(y[i]))
                    fail_msg("rope_ext (neox %d) pos %d variant %d element %d: CPU %.9g, "
                             "numerics.h %.9g",
                             neox, pos, variant, i, x[i], y[i]);
        }
    /* YaRN: with ext_factor 0 and attn_factor 1 it is the plain rotation; with a ramp the
     * angle lies between the interpolated and the extrapolated one. */
    tsr_cuda_rope_params rp = {TSR_CUDA_ROPE_NEOX, 64, 1e6f, 0.25f, 1.0f, 1.0f, {8.0f, 24.0f}, 0};
    for (int i0 = 0; i0 < 64; i0 += 2) {
        float c, sn;
        tsr_cuda_rope_cs(&rp, 300, i0, 1.0f, &c, &sn);
        const float msc = 1.0f + 0.1f * logf(4.0f);
        assert_true(fabsf(c * c + sn * sn - msc * msc) < 1e-5f);
        const double inv = pow(1e6, -(double)i0 / 64.0);
        const double th = atan2((double)sn, (double)c);
        const double lo = 0.25 * 300 * inv, hi = 300 * inv;
        if (i0 / 2 >= 24 && hi < 3.0) assert_true(fabs(th - lo) < 1e-4);
        if (i0 / 2 < 8 && fmod(hi, 6.283185307179586) < 3.0)
            assert_true(fabs(th - fmod(hi, 6.283185307179586)) < 1e-3);
    }
}

/* ---- gated units ---------------------------------------------------------------------- */

static void test_glu(void **state)
{
    (void)state;
    enum { N = 4096 };
    float *g = tsr_test_xmalloc(sizeof(float) * N), *u = tsr_test_xmalloc(sizeof(float) * N);
    float *ref = tsr_test_xmalloc(sizeof(float) * N);
    uint64_t s = 31;
    for (int i = 0; i < N; ++i) {
        g[i] = ref[i] = 6.0f * tsr_test_gauss(&s);
        u[i] = tsr_test_gauss(&s);
    }
    tsr_swiglu(ref, u, N);
    for (int i = 0; i < N; ++i) {
        const float v = tsr_cuda_swiglu(g[i], u[i]);
        if (tsr_test_fbits(v) != tsr_test_fbits(ref[i]))
            fail_msg("swiglu %d: CPU %.9g, numerics.h %.9g", i, ref[i], v);
        /* GeGLU: bit for bit the CPU's (ggml's fp16 table semantics) ... */
        float gc = g[i];
        tsr_geglu(&gc, &u[i], 1);
        if (tsr_test_fbits(gc) != tsr_test_fbits(tsr_cuda_geglu(g[i], u[i])))
            fail_msg("geglu %d: CPU %.9g, numerics.h %.9g", i, gc, tsr_cuda_geglu(g[i], u[i]));
        /* ... and against the tanh GELU in double, within the fp16 roundings of the table */
        const double x = g[i];
        const double ge =
            0.5 * x * (1.0 + tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x))) * u[i];
        const float gv = tsr_cuda_geglu(g[i], u[i]);
        if (fabs(gv - ge) > 2e-3 * fabs((double)u[i]) * (1.0 + fabs(x)))
            fail_msg("geglu %d: double %.9g, numerics.h %.9g", i, ge, gv);
    }
    free(g);
    free(u);
    free(ref);
}

static void test_fp16_roundtrip(void **state)
{
    (void)state;
    for (uint32_t h = 0; h < 65536; ++h) {
        const float a = tsr_f16_to_f32((uint16_t)h), b = tsr_cuda_f16_to_f32((uint16_t)h);
        if (tsr_test_fbits(a) != tsr_test_fbits(b))
            fail_msg("f16 0x%04x: CPU 0x%08x, numerics.h 0x%08x", h, tsr_test_fbits(a),
                     tsr_test_fbits(b));
        assert_int_equal(tsr_cuda_bf16_to_f32((uint16_t)h), tsr_bf16_to_f32((uint16_t)h));
    }
    uint64_t s = 1;
    for (int i = 0; i < 1000000; ++i) {
        uint32_t u = (uint32_t)tsr_test_xorshift64s(&s);
        float f;
        memcpy(&f, &u, 4);
        if (tsr_f32_to_f16(f) != tsr_cuda_f32_to_f16(f))
            fail_msg("f32->f16 of 0x%08x: CPU 0x%04x, numerics.h 0x%04x", u, tsr_f32_to_f16(f),
                     tsr_cuda_f32_to_f16(f));
    }
    for (size_t k = 0; k < N_TYPES; ++k) {
        assert_int_equal(tsr_cuda_block_elems(k_types[k]), tsr_type_block_elems(k_types[k]));
        assert_int_equal(tsr_cuda_block_bytes(k_types[k]),
                         (int32_t)tsr_type_block_bytes(k_types[k]));
    }
}

/* fp16 KV cache (numerics.h "KV cache element types"): what the device stores is the CPU's
 * fp16 bit for bit, and the device's two-pass f16 attention (emulated in the kernel's order:
 * q rounded to fp16, warp-lane score sums, online max/sum, then fp16 probabilities) agrees
 * with the CPU's f16 path (kernels/kvcache.c tsr_attn_head, llama.cpp's flash attention:
 * one pass, fp16 output accumulator) within 2e-3 relative, and the fp16 probabilities the
 * CPU's scores give are the device's. Head sizes 64 and 80 (not a multiple of 64: the
 * CPU's q·k adds the rest in double), windows of 1, 17 and 203 positions. */
static void test_kv_f16(void **state)
{
    (void)state;
    const int n_pos = 203;
    const int hds[2] = {64, 80};
    uint64_t s = 777;
    for (int h = 0; h < 2; ++h) {
        const int hd = hds[h];
        float *q = tsr_test_xmalloc(sizeof(float) * hd),
              *kf = tsr_test_xmalloc(sizeof(float) * hd * n_pos);
        float *vf = tsr_test_xmalloc(sizeof(float) * hd * n_pos),
              *att = tsr_test_xmalloc(sizeof(float) * n_pos);
        uint16_t *kc = tsr_test_xmalloc(2 * (size_t)hd * n_pos),
                 *vc = tsr_test_xmalloc(2 * (size_t)hd * n_pos);
        uint16_t *kd = tsr_test_xmalloc(2 * (size_t)hd * n_pos),
                 *vd = tsr_test_xmalloc(2 * (size_t)hd * n_pos);
        for (int i = 0; i < hd; ++i) q[i] = tsr_test_gauss(&s);
        for (int i = 0; i < hd * n_pos; ++i) kf[i] = 2.0f * tsr_test_gauss(&s);
        for (int i = 0; i < hd * n_pos; ++i) vf[i] = tsr_test_gauss(&s);
        /* stores: the device's k_kv_store element by element vs the CPU's tsr_kv_store */
        tsr_kv_store(TSR_KV_F16, kf, kc, (int64_t)hd * n_pos);
        tsr_kv_store(TSR_KV_F16, vf, vc, (int64_t)hd * n_pos);
        for (int64_t i = 0; i < (int64_t)hd * n_pos; ++i) {
            tsr_cuda_kv_put(TSR_CUDA_KV_F16, kd, i, kf[i]);
            tsr_cuda_kv_put(TSR_CUDA_KV_F16, vd, i, vf[i]);
            if (kd[i] != kc[i] || vd[i] != vc[i])
                fail_msg("f16 store %lld: CPU %04x/%04x, device %04x/%04x", (long long)i, kc[i],
                         vc[i], kd[i], vd[i]);
        }
        const float scale = 1.0f / sqrtf((float)hd);
        const int32_t table[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        const int p0s[3] = {202, 186, 0};
        for (int w = 0; w < 3; ++w) {
            const int p0 = p0s[w], p1 = n_pos - 1;
            /* CPU: kernels/kvcache.c */
            const tsr_kv_view kv = {.type = TSR_KV_F16,
                                    .head_dim = hd,
                                    .block_size = 16,
                                    .k = (const uint8_t *)kc,
                                    .v = (const uint8_t *)vc,
                                    .row_bytes = 2 * (size_t)hd,
                                    .head_offset = 0,
                                    .block_table = table};
            void *scratch = NULL;
            assert_int_equal(posix_memalign(&scratch, 64, tsr_attn_scratch_bytes(hd)), 0);
            float ref[80];
            tsr_attn_head(&kv, q, scale, p0, p1, att, scratch, ref);
            free(scratch);
            /* the CPU runs llama.cpp's flash attention (online softmax, fp16 accumulator) and
             * leaves its scores in att: the probabilities they give, two-pass */
            float cpu_m = -INFINITY, cpu_l = 0.0f;
            for (int p = p0; p <= p1; ++p) cpu_m = fmaxf(cpu_m, att[p - p0]);
            for (int p = p0; p <= p1; ++p) cpu_l += expf(att[p - p0] - cpu_m);
            /* device (kernels.cu k_attention_f16) */
            float qh[80], acc[80] = {0};
            for (int i = 0; i < hd; ++i) qh[i] = tsr_cuda_round_f16(q[i]);
            tsr_cuda_softmax_state st;
            tsr_cuda_softmax_init(&st);
            float inv = 0.0f;
            int n_prob_diff = 0;
            for (int pass = 0; pass < 2; ++pass) {
                for (int c0 = p0 / 16 * 16; c0 <= p1; c0 += 16) {
                    float sc[16], cmax = -INFINITY;
                    for (int j = 0; j < 16; ++j) {
                        const int p = c0 + j;
                        if (p < p0 || p > p1) {
                            sc[j] = -INFINITY;
                            continue;
                        }
                        float lanes[32] = {0};
                        for (int i = 0; i < hd; ++i)
                            lanes[i % 32] +=
                                qh[i] * tsr_cuda_kv_get(TSR_CUDA_KV_F16, kd + (size_t)p * hd, i);
                        sc[j] = warp_sum(lanes) * scale;
                    }
                    if (pass == 0) {
                        for (int j = 0; j < 16; ++j) cmax = fmaxf(cmax, sc[j]);
                        tsr_cuda_softmax_rescale(&st, cmax);
                        for (int j = 0; j < 16; ++j) st.l += tsr_cuda_softmax_weight(&st, sc[j]);
                        continue;
                    }
                    for (int j = 0; j < 16; ++j) {
                        const float pw = tsr_cuda_attn_prob_f16(sc[j], st.m, inv);
                        /* the CPU's probability of this position, rounded the same way */
                        const int p = c0 + j;
                        if (p >= p0 && p <= p1) {
                            const float pc = tsr_cuda_round_f16(expf(att[p - p0] - cpu_m) / cpu_l);
                            n_prob_diff += pw != pc;
                            if (fabsf(pw - pc) > 1e-3f * pc + 1e-7f)
                                fail_msg("hd %d window %d position %d: probability CPU %.9g, "
                                         "device %.9g",
                                         hd, p1 - p0 + 1, p, pc, pw);
                        }
                        if (pw == 0.0f) continue;
                        for (int i = 0; i < hd; ++i)
                            acc[i] += pw * tsr_cuda_kv_get(TSR_CUDA_KV_F16,
                                                           vd + (size_t)(c0 + j) * hd, i);
                    }
                }
                inv = 1.0f / st.l;
            }
            double worst = 0;
            for (int i = 0; i < hd; ++i) {
                const double d = fabs((double)acc[i] - ref[i]);
                if (d > worst) worst = d;
                if (d > 2e-3 * (1.0 + fabs(ref[i])))
                    fail_msg("f16 attention hd %d window %d dim %d: CPU %.9g, device %.9g", hd,
                             p1 - p0 + 1, i, ref[i], acc[i]);
            }
            /* the same fp16 rounding points: the probabilities are the CPU's fp16 values,
             * but for the few a float-order difference moves across a rounding boundary */
            if (n_prob_diff * 20 > p1 - p0 + 1)
                fail_msg("f16 attention hd %d window %d: %d of %d fp16 probabilities differ from "
                         "the CPU's",
                         hd, p1 - p0 + 1, n_prob_diff, p1 - p0 + 1);
            printf("f16 KV attention hd %d window %d: max |diff| %.3g, %d of %d fp16 "
                   "probabilities differ from the CPU's\n",
                   hd, p1 - p0 + 1, worst, n_prob_diff, p1 - p0 + 1);
        }
        free(q);
        free(kf);
        free(vf);
        free(att);
        free(kc);
        free(vc);
        free(kd);
        free(vd);
    }
}

/* The CPU's q8_0 attention (kernels/kvcache.c) for head `head` of rows of n_kv heads. */
static void cpu_attn_q8_0(const uint8_t *kc, const uint8_t *vc, int hd, int n_kv, int head,
                          const float *q, float scale, int p0, int p1, float *att, float *out)
{
    const int32_t table[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const size_t head_bytes = tsr_kv_row_bytes(TSR_KV_Q8_0, hd);
    const tsr_kv_view kv = {.type = TSR_KV_Q8_0,
                            .head_dim = hd,
                            .block_size = 16,
                            .k = kc,
                            .v = vc,
                            .row_bytes = head_bytes * (size_t)n_kv,
                            .head_offset = head_bytes * (size_t)head,
                            .block_table = table};
    void *scratch = NULL;
    assert_int_equal(posix_memalign(&scratch, 64, tsr_attn_scratch_bytes(hd)), 0);
    tsr_attn_head(&kv, q, scale, p0, p1, att, scratch, out);
    free(scratch);
}

/* Q8_0 KV cache (numerics.h "KV cache element types"): the device's stores (k_kv_store_q8_0:
 * a warp max per block, then tsr_cuda_q8_0_scale / _elem per lane) are the bytes of the
 * CPU's tsr_kv_store; q's quantization likewise; and k_attention_q8_0's arithmetic, emulated
 * in the kernel's structure (quarter-block integer sums per lane, block terms in block order,
 * max / sum / probabilities and V in three passes, FMA chains over the positions), is bit
 * for bit the CPU's q8_0 attention on its scalar path (probabilities and outputs), and within
 * the float order of the Q8_0 dot of the CPU's dispatched ISA. Head sizes 64 and 128, rows of
 * 2 KV heads (head 1 read: the head offset), windows of 1, 17 and 203 positions. */
static void test_kv_q8_0(void **state)
{
    (void)state;
    const int n_pos = 203, n_kv = 2;
    const int hds[2] = {64, 128};
    uint64_t s = 4242;
    const char *isa0 = tsr_quant_isa();
    char isa_saved[32];
    snprintf(isa_saved, sizeof isa_saved, "%s", isa0);
    for (int h = 0; h < 2; ++h) {
        const int hd = hds[h], nb = hd / 32, kv_dim = hd * n_kv;
        const size_t rb = tsr_kv_row_bytes(TSR_KV_Q8_0, kv_dim);
        assert_int_equal(rb, tsr_cuda_kv_row_bytes(TSR_CUDA_KV_Q8_0, kv_dim));
        float *q = tsr_test_xmalloc(sizeof(float) * hd),
              *att = tsr_test_xmalloc(sizeof(float) * n_pos);
        float *kf = tsr_test_xmalloc(sizeof(float) * kv_dim * n_pos);
        float *vf = tsr_test_xmalloc(sizeof(float) * kv_dim * n_pos);
        uint8_t *kc = tsr_test_xmalloc(rb * n_pos), *vc = tsr_test_xmalloc(rb * n_pos);
        uint8_t *kd = tsr_test_xmalloc(rb * n_pos), *vd = tsr_test_xmalloc(rb * n_pos);
        for (int i = 0; i < hd; ++i) q[i] = tsr_test_gauss(&s);
        for (int i = 0; i < kv_dim * n_pos; ++i) kf[i] = 2.0f * tsr_test_gauss(&s);
        for (int i = 0; i < kv_dim * n_pos; ++i) vf[i] = tsr_test_gauss(&s);
        kf[5] = 0.0f; /* one all-zero block: d = 0 */
        for (int i = 0; i < 32; ++i) kf[kv_dim + i] = 0.0f;
        /* stores: per row, as the CPU's tsr_kv_store (one call per position, as model.c) */
        for (int p = 0; p < n_pos; ++p) {
            tsr_kv_store(TSR_KV_Q8_0, kf + (size_t)p * kv_dim, kc + (size_t)p * rb, kv_dim);
            tsr_kv_store(TSR_KV_Q8_0, vf + (size_t)p * kv_dim, vc + (size_t)p * rb, kv_dim);
            for (int g = 0; g < 2 * (kv_dim / 32); ++g) { /* k_kv_store_q8_0's warps */
                const bool is_v = g >= kv_dim / 32;
                const int b = is_v ? g - kv_dim / 32 : g;
                const float *x = (is_v ? vf : kf) + (size_t)p * kv_dim + 32 * b;
                tsr_cuda_q8_0 *blk = (tsr_cuda_q8_0 *)((is_v ? vd : kd) + (size_t)p * rb) + b;
                float amax = 0.0f, d, id;
                for (int l = 0; l < 32; ++l) amax = fmaxf(amax, fabsf(x[l]));
                tsr_cuda_q8_0_scale(amax, &d, &id);
                for (int l = 0; l < 32; ++l) blk->qs[l] = tsr_cuda_q8_0_elem(x[l], id);
                blk->d = tsr_cuda_f32_to_f16(d);
            }
        }
        for (size_t i = 0; i < rb * n_pos; ++i)
            if (kd[i] != kc[i] || vd[i] != vc[i])
                fail_msg("q8_0 store byte %zu (position %zu): CPU %02x/%02x, device %02x/%02x", i,
                         i / rb, kc[i], vc[i], kd[i], vd[i]);
        /* dequantized as the CPU reads them */
        float deq[128];
        tsr_kv_load(TSR_KV_Q8_0, kc + rb * 7 + tsr_kv_row_bytes(TSR_KV_Q8_0, hd), deq, hd);
        for (int i = 0; i < hd; ++i) {
            const float dv = tsr_cuda_kv_get(TSR_CUDA_KV_Q8_0,
                                             kd + rb * 7 + tsr_kv_row_bytes(TSR_KV_Q8_0, hd), i);
            if (tsr_test_fbits(dv) != tsr_test_fbits(deq[i]))
                fail_msg("q8_0 load %d: CPU %.9g, device %.9g", i, deq[i], dv);
        }
        const float scale = 1.0f / sqrtf((float)hd);
        const int p0s[3] = {202, 186, 0};
        for (int w = 0; w < 3; ++w) {
            const int p0 = p0s[w], p1 = n_pos - 1, n = p1 - p0 + 1;
            /* CPU: scalar path (the order the device follows) and the dispatched ISA */
            float ref[128], ref_isa[128], *att_isa = tsr_test_xmalloc(sizeof(float) * n_pos);
            cpu_attn_q8_0(kc, vc, hd, n_kv, 1, q, scale, p0, p1, att_isa, ref_isa);
            assert_true(tsr_quant_set_isa("scalar"));
            cpu_attn_q8_0(kc, vc, hd, n_kv, 1, q, scale, p0, p1, att, ref);
            assert_true(tsr_quant_set_isa(isa_saved));
            /* device (kernels.cu k_attention_q8_0), KV head 1 */
            tsr_cuda_q8_0 qq[4];
            for (int b = 0; b < nb; ++b) { /* warp b's block */
                float amax = 0.0f, d, id;
                for (int l = 0; l < 32; ++l) amax = fmaxf(amax, fabsf(q[32 * b + l]));
                tsr_cuda_q8_0_scale(amax, &d, &id);
                for (int l = 0; l < 32; ++l) qq[b].qs[l] = tsr_cuda_q8_0_elem(q[32 * b + l], id);
                qq[b].d = tsr_cuda_f32_to_f16(d);
            }
            float acc[128] = {0}, m = -INFINITY, sum = 0.0f, inv = 0.0f;
            for (int pass = 0; pass < 3; ++pass) {
                for (int c0 = p0 / 16 * 16; c0 <= p1; c0 += 16) {
                    float sc[16];
                    for (int j = 0; j < 16; ++j) {
                        const int p = c0 + j;
                        if (p < p0 || p > p1) {
                            sc[j] = -INFINITY;
                            continue;
                        }
                        const tsr_cuda_q8_0 *kr = (const tsr_cuda_q8_0 *)(kd + (size_t)p * rb) + nb;
                        int32_t si[4];
                        for (int g = 0; g < nb; g += 8) { /* lane l: quarter l % 4 of g + l / 4 */
                            int32_t part[32] = {0};
                            for (int l = 0; l < 32; ++l)
                                if (g + l / 4 < nb)
                                    part[l] = tsr_cuda_isum_part32(TSR_CUDA_Q8_0, &kr[g + l / 4],
                                                                   &qq[g + l / 4], l % 4);
                            for (int k = 0; k < 8 && g + k < nb; ++k)
                                si[g + k] = part[4 * k] + part[4 * k + 1] + part[4 * k + 2] +
                                            part[4 * k + 3];
                        }
                        sc[j] = tsr_cuda_kv_q8_0_score(kr, qq, si, nb, scale);
                    }
                    for (int j = 0; j < 16; ++j) {
                        if (pass == 0) {
                            m = sc[j] > m ? sc[j] : m;
                        } else if (pass == 1) {
                            sum += tsr_cuda_attn_exp(sc[j], m);
                        } else if (sc[j] != -INFINITY) {
                            const float pw = tsr_cuda_attn_exp(sc[j], m) * inv;
                            const int p = c0 + j;
                            /* the CPU's q.k now sums blocks in ggml's x86 lane order
                             * (kernels/kvcache.c); the device keeps the block order: a few ulp */
                            if (fabsf(pw - att[p - p0]) > 1e-5f * (1e-3f + fabsf(att[p - p0])))
                                fail_msg("q8_0 hd %d window %d position %d: probability CPU "
                                         "%.9g, device %.9g",
                                         hd, n, p, att[p - p0], pw);
                            const tsr_cuda_q8_0 *vr =
                                (const tsr_cuda_q8_0 *)(vd + (size_t)p * rb) + nb;
                            for (int i = 0; i < hd; ++i)
                                acc[i] = tsr_cuda_kv_q8_0_v_fma(vr, i, pw, acc[i]);
                        }
                    }
                }
                if (pass == 1) inv = 1.0f / sum;
            }
            double worst = 0;
            for (int i = 0; i < hd; ++i) {
                if (fabs((double)acc[i] - ref[i]) > 1e-5 * (1.0 + fabs(ref[i])))
                    fail_msg("q8_0 attention hd %d window %d dim %d: CPU (scalar) %.9g, device "
                             "%.9g",
                             hd, n, i, ref[i], acc[i]);
                const double dd = fabs((double)acc[i] - ref_isa[i]);
                if (dd > worst) worst = dd;
                if (dd > 1e-5 * (1.0 + fabs(ref_isa[i])))
                    fail_msg("q8_0 attention hd %d window %d dim %d: CPU (%s) %.9g, device %.9g",
                             hd, n, i, isa_saved, ref_isa[i], acc[i]);
            }
            printf("q8_0 KV attention hd %d window %d: within 1e-5 of the CPU's scalar path; "
                   "max |diff| %.3g against its %s path\n",
                   hd, n, worst, isa_saved);
            free(att_isa);
        }
        free(q);
        free(att);
        free(kf);
        free(vf);
        free(kc);
        free(vc);
        free(kd);
        free(vd);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fp16_roundtrip),
        cmocka_unit_test(test_dequant_bit_identical),
        cmocka_unit_test(test_activation_quantizers),
        cmocka_unit_test(test_dots),
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_online_softmax_attention),
        cmocka_unit_test(test_kv_f16),
        cmocka_unit_test(test_kv_q8_0),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_glu),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
