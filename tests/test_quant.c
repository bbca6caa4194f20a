/*
 * test_quant.c — kernels/quant: type table, fp16/bf16 conversion, dequantization against
 * ggml's values (expected/synth-tiny-dequant.txt), quantizers against llama-quantize's
 * bytes (the synthetic GGUF files were made from the f16 file with no imatrix, i.e. with
 * ggml's reference quantizers), round-trip error bounds, every dot kernel (each
 * instruction set this CPU has) against a float64 reference, and the multi-row and
 * multi-token (tile) kernels against the single dot, bit for bit.
 *
 * Tensor bytes are read with plain stdio at the offsets the expected file gives, so this
 * test does not depend on the GGUF reader.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/quant.h"
#include "shard/gguf.h"
#include "tests/util.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_X86 1
#else
#define HAVE_X86 0
#endif

/* ---- helpers ---------------------------------------------------------------------------- */

/* Random test vector: mostly Gaussian, with some structure quantizers must survive
 * (a zero block, a tiny-magnitude block, outliers, an all-positive block). */
static void fill_data(float *x, int64_t n, uint64_t seed, float scale)
{
    uint64_t s = seed * 0x9E3779B97F4A7C15ULL + 1;
    for (int64_t i = 0; i < n; ++i) x[i] = scale * tsr_test_gauss(&s);
    if (n >= 512) {
        for (int i = 0; i < 32; ++i) x[32 + i] = 0.0f;                            /* zero block */
        for (int i = 0; i < 32; ++i) x[64 + i] *= 1e-6f;                          /* tiny */
        for (int i = 0; i < 32; ++i) x[96 + i] = fabsf(x[96 + i]) + 0.1f * scale; /* positive */
        x[200] = 12.0f * scale;                                                   /* outliers */
        x[300] = -9.0f * scale;
    }
}

static const uint32_t k_weight_types[] = {
    TSR_TYPE_F32,  TSR_TYPE_F16,  TSR_TYPE_BF16, TSR_TYPE_Q8_0, TSR_TYPE_Q4_0,
    TSR_TYPE_Q4_1, TSR_TYPE_Q5_0, TSR_TYPE_Q5_1, TSR_TYPE_Q2_K, TSR_TYPE_Q3_K,
    TSR_TYPE_Q4_K, TSR_TYPE_Q5_K, TSR_TYPE_Q6_K};
#define N_WEIGHT_TYPES (sizeof k_weight_types / sizeof k_weight_types[0])

static const char *const k_isas[] = {"scalar", "avx2", "avx512vnni"};

/* Summation-order tolerance for every kernel against the float64 reference: float32
 * accumulation of block terms (and of products for the float types). */
#define DOT_REL_TOL 1e-5
static char g_initial_isa[32];

static void restore_isa(void)
{
    assert_true(tsr_quant_set_isa(g_initial_isa));
}

/* ---- SHA-256 (FIPS 180-4), to check whole dequantized tensors bit for bit ---------------- */

typedef struct {
    uint32_t h[8];
    uint64_t len;
    uint8_t buf[64];
    size_t nbuf;
} sha256_ctx;

static const uint32_t k_sha_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static uint32_t ror(uint32_t x, int n)
{
    return (x >> n) | (x << (32 - n));
}

static void sha256_block(sha256_ctx *c, const uint8_t *p)
{
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    }
    for (int i = 16; i < 64; ++i) {
        const uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
        const uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = c->h[0], b = c->h[1], cc = c->h[2], d = c->h[3];
    uint32_t e = c->h[4], f = c->h[5], g = c->h[6], h = c->h[7];
    for (int i = 0; i < 64; ++i) {
        const uint32_t t1 =
            h + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + k_sha_k[i] + w[i];
        const uint32_t t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & cc) ^ (b & cc));
        h = g;
        g = f;
        f = e;
        e = d + t1;
        d = cc;
        cc = b;
        b = a;
        a = t1 + t2;
    }
    c->h[0] += a, c->h[1] += b, c->h[2] += cc, c->h[3] += d;
    c->h[4] += e, c->h[5] += f, c->h[6] += g, c->h[7] += h;
}

static void sha256_hex(const void *data, size_t len, char out[65])
{
    sha256_ctx c = {{0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c,
                     0x1f83d9ab, 0x5be0cd19},
                    0,
                    {0},
                    0};
    const uint8_t *p = data;
    size_t i = 0;
    for (; i + 64 <= len; i += 64) sha256_block(&c, p + i);
    uint8_t tail[128] = {0};
    const size_t rem = len - i;
    memcpy(tail, p + i, rem);
    tail[rem] = 0x80;
    const size_t tlen = rem + 9 <= 64 ? 64 : 128;
    const uint64_t bits = (uint64_t)len * 8;
    for (int k = 0; k < 8; ++k) tail[tlen - 1 - k] = (uint8_t)(bits >> (8 * k));
    sha256_block(&c, tail);
    if (tlen == 128) sha256_block(&c, tail + 64);
    for (int k = 0; k < 8; ++k) snprintf(out + 8 * k, 9, "%08x", c.h[k]);
}

/* ---- expected/synth-tiny-dequant.txt ------------------------------------------------------ */

typedef struct {
    char file[128], tensor[128], type_name[16];
    uint32_t type;
    int64_t n, ne0, ne1;
    uint64_t data_offset;
    size_t bytes_first_512;
    double sum, sumsq;
    char sha256[65];
    float first[512];
} dq_entry;

static uint32_t type_by_name(const char *name)
{
    for (uint32_t t = 0; t < TSR_TYPE_COUNT; ++t) {
        if (strcmp(tsr_type_name(t), name) == 0) return t;
    }
    return UINT32_MAX;
}

/* Parse the whole file; returns the number of entries (fails the test on format errors). */
static int load_dequant_expected(dq_entry **out)
{
    size_t len = 0;
    char *text = tsr_test_read_file(tsr_test_model_path("expected/synth-tiny-dequant.txt"), &len);
    assert_non_null(text);
    int cap = 32, count = 0;
    dq_entry *es = tsr_test_xmalloc(sizeof(dq_entry) * (size_t)cap);
    char *save = NULL;
    dq_entry *cur = NULL;
    int nvals = -1; /* values still to read for cur; -1 = expecting a header */
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (strncmp(line, "# full tensor:", 14) == 0) {
            if (count == cap) {
                cap *= 2;
                es = realloc(es, sizeof(dq_entry) * (size_t)cap);
                assert_non_null(es);
            }
            cur = &es[count++];
            memset(cur, 0, sizeof *cur);
            const int k = sscanf(line,
                                 "# full tensor: n=%" SCNd64 ", data_offset=%" SCNu64
                                 ", bytes_first_512=%zu, sum=%lf, sumsq=%lf, sha256=%64s",
                                 &cur->n, &cur->data_offset, &cur->bytes_first_512, &cur->sum,
                                 &cur->sumsq, cur->sha256);
            if (k != 6) fail_msg("bad 'full tensor' line (%d fields): %s", k, line);
            nvals = -1;
            continue;
        }
        if (line[0] == '#' || !cur) continue;
        if (strncmp(line, "file:", 5) == 0) {
            int first = 0;
            const int k =
                sscanf(line,
                       "file: %127[^,], tensor: %127[^,], type: %15[^,], ne: [%" SCNd64 ", %" SCNd64
                       "], first: %d",
                       cur->file, cur->tensor, cur->type_name, &cur->ne0, &cur->ne1, &first);
            if (k != 6 || first != 512) fail_msg("bad header line: %s", line);
            cur->type = type_by_name(cur->type_name);
            if (cur->type == UINT32_MAX) fail_msg("unknown type name '%s'", cur->type_name);
            if (cur->ne0 * cur->ne1 != cur->n) fail_msg("ne does not match n: %s", line);
            nvals = 512;
            continue;
        }
        if (nvals > 0) {
            char *p = line, *end;
            for (;;) {
                const float v = strtof(p, &end);
                if (end == p) break;
                cur->first[512 - nvals--] = v;
                p = end;
                if (nvals == 0) break;
            }
        }
    }
    free(text);
    if (count == 0) fail_msg("no entries in synth-tiny-dequant.txt");
    for (int i = 0; i < count; ++i) {
        if (es[i].type_name[0] == 0) fail_msg("entry %d has no header line", i);
    }
    *out = es;
    return count;
}

/* Raw bytes of a tensor: `bytes` from `data_offset` of synthetic/<file>. */
static uint8_t *read_tensor(const char *file, uint64_t offset, size_t bytes)
{
    char rel[256];
    snprintf(rel, sizeof rel, "synthetic/%s", file);
    FILE *f = fopen(tsr_test_model_path(rel), "rb");
    if (!f) fail_msg("cannot open %s", rel);
    uint8_t *buf = tsr_test_xmalloc(bytes);
    if (fseeko(f, (off_t)offset, SEEK_SET) != 0 || fread(buf, 1, bytes, f) != bytes) {
        fclose(f);
        fail_msg("cannot read %zu bytes at %" PRIu64 " of %s", bytes, offset, rel);
    }
    fclose(f);
    return buf;
}

/* ---- tests: table and conversions ----------------------------------------------------- */

/* Runs first: with TSR_ISA set in the environment the first dispatch must obey it. */
static void test_isa_selection(void **state)
{
    (void)state;
    const char *isa = tsr_quant_isa();
    const char *env = getenv("TSR_ISA");
    if (env && strcmp(env, "scalar") == 0 && strcmp(isa, "scalar") != 0) {
        fail_msg("TSR_ISA=scalar: expected isa 'scalar', got '%s'", isa);
    }
    snprintf(g_initial_isa, sizeof g_initial_isa, "%s", isa);
    print_message("quant isa: %s\n", isa);
    assert_false(tsr_quant_set_isa("bogus"));
    assert_true(tsr_quant_set_isa("scalar"));
    assert_string_equal(tsr_quant_isa(), "scalar");
    assert_true(tsr_quant_set_isa(NULL));
    restore_isa();
    assert_string_equal(tsr_quant_isa(), g_initial_isa);
}

static void test_type_table(void **state)
{
    (void)state;
    static const struct {
        uint32_t type;
        const char *name;
        int64_t be;
        size_t bb;
        uint32_t dot_type;
    } k[] = {
        {TSR_TYPE_F32, "F32", 1, 4, TSR_TYPE_F32},
        {TSR_TYPE_F16, "F16", 1, 2, TSR_TYPE_F32},
        {TSR_TYPE_BF16, "BF16", 1, 2, TSR_TYPE_F32},
        {TSR_TYPE_Q8_0, "Q8_0", 32, 34, TSR_TYPE_Q8_0},
        {TSR_TYPE_Q4_0, "Q4_0", 32, 18, TSR_TYPE_Q8_0},
        {TSR_TYPE_Q4_1, "Q4_1", 32, 20, TSR_TYPE_Q8_1},
        {TSR_TYPE_Q5_0, "Q5_0", 32, 22, TSR_TYPE_Q8_0},
        {TSR_TYPE_Q5_1, "Q5_1", 32, 24, TSR_TYPE_Q8_1},
        {TSR_TYPE_Q2_K, "Q2_K", 256, 84, TSR_TYPE_Q8_K},
        {TSR_TYPE_Q3_K, "Q3_K", 256, 110, TSR_TYPE_Q8_K},
        {TSR_TYPE_Q4_K, "Q4_K", 256, 144, TSR_TYPE_Q8_K},
        {TSR_TYPE_Q5_K, "Q5_K", 256, 176, TSR_TYPE_Q8_K},
        {TSR_TYPE_Q6_K, "Q6_K", 256, 210, TSR_TYPE_Q8_K},
    };
    for (size_t i = 0; i < sizeof k / sizeof k[0]; ++i) {
        assert_true(tsr_type_supported(k[i].type));
        assert_string_equal(tsr_type_name(k[i].type), k[i].name);
        assert_int_equal(tsr_type_block_elems(k[i].type), k[i].be);
        assert_int_equal(tsr_type_block_bytes(k[i].type), k[i].bb);
        assert_int_equal(tsr_type_vec_dot_type(k[i].type), k[i].dot_type);
        assert_int_equal(tsr_row_bytes(k[i].type, 4096), 4096 / k[i].be * k[i].bb);
        if (k[i].be > 1) assert_int_equal(tsr_row_bytes(k[i].type, k[i].be + 1), 0);
        assert_int_equal(tsr_row_bytes(k[i].type, -k[i].be), 0);
        if (!strstr(tsr_type_supported_list(), k[i].name))
            fail_msg("%s missing from the supported list '%s'", k[i].name,
                     tsr_type_supported_list());
    }
    /* Q8_1: activation type only, but sized (ggml's 36-byte block) */
    assert_false(tsr_type_supported(TSR_TYPE_Q8_1));
    assert_int_equal(tsr_row_bytes(TSR_TYPE_Q8_1, 64), 72);
    /* Q8_K: activation type only, but sized */
    assert_false(tsr_type_supported(TSR_TYPE_Q8_K));
    assert_string_equal(tsr_type_name(TSR_TYPE_Q8_K), "Q8_K");
    assert_int_equal(tsr_row_bytes(TSR_TYPE_Q8_K, 512), 2 * 292);
}

static void test_unsupported_types(void **state)
{
    (void)state;
    /* ggml types we do not implement: known name, but not supported and no sizes */
    static const uint32_t known[] = {16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
                                     26, 27, 28, 29, 34, 35, 39, 40, 41};
    for (size_t i = 0; i < sizeof known / sizeof known[0]; ++i) {
        const uint32_t t = known[i];
        if (tsr_type_supported(t)) fail_msg("type %u: expected unsupported", t);
        if (strcmp(tsr_type_name(t), "unknown") == 0) fail_msg("type %u: expected a ggml name", t);
        if (tsr_row_bytes(t, 256) != 0) fail_msg("type %u: expected row bytes 0", t);
        if (tsr_type_block_elems(t) != 0 || tsr_type_block_bytes(t) != 0) {
            fail_msg("type %u: expected block sizes 0", t);
        }
        if (tsr_type_vec_dot_type(t) != TSR_TYPE_COUNT)
            fail_msg("type %u: expected no dot type", t);
        /* ... but ggml's block geometry is known (for inspecting any file) */
        int64_t be = 0;
        size_t bb = 0;
        if (!tsr_type_ggml_block(t, &be, &bb) || be < 1 || bb < 1)
            fail_msg("type %u: expected ggml block sizes", t);
    }
    assert_string_equal(tsr_type_name(16), "IQ2_XXS");
    int64_t be = 0;
    size_t bb = 0;
    assert_true(tsr_type_ggml_block(16, &be, &bb));
    assert_int_equal(be, 256);
    assert_int_equal(bb, 66);
    assert_true(tsr_type_ggml_block(TSR_TYPE_Q5_K, &be, &bb));
    assert_int_equal(bb, 176);
    /* ids ggml never defined (or removed) and garbage */
    static const uint32_t garbage[] = {4,  5,  31, 32,   33,          36,        37,
                                       38, 42, 43, 1000, 0x7fffffffu, UINT32_MAX};
    for (size_t i = 0; i < sizeof garbage / sizeof garbage[0]; ++i) {
        const uint32_t t = garbage[i];
        if (tsr_type_supported(t)) fail_msg("type %u: expected unsupported", t);
        if (strcmp(tsr_type_name(t), "unknown") != 0) {
            fail_msg("type %u: expected name 'unknown', got '%s'", t, tsr_type_name(t));
        }
        if (tsr_row_bytes(t, 256) != 0) fail_msg("type %u: expected row bytes 0", t);
        if (tsr_type_ggml_block(t, NULL, NULL)) fail_msg("type %u: expected no ggml sizes", t);
        const uint8_t w[64] = {0};
        const float x[64] = {0};
        if (!isnan(tsr_vec_dot(t, 32, w, x))) fail_msg("type %u: expected NaN dot", t);
    }
}

#if HAVE_X86
__attribute__((target("f16c"))) static uint16_t hw_f32_to_f16(float f)
{
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
}
#endif

static void test_fp16_bf16(void **state)
{
    (void)state;
    /* every half: f16 -> f32 exact (checked through double arithmetic) and back */
    for (uint32_t h = 0; h < 65536; ++h) {
        const float f = tsr_f16_to_f32((uint16_t)h);
        const uint32_t e = (h >> 10) & 31, m = h & 1023;
        double want;
        if (e == 31) {
            if (m == 0 ? !isinf(f) : !isnan(f)) fail_msg("half %04x: expected inf/nan", h);
            if (!!signbit(f) != ((h & 0x8000) != 0)) fail_msg("half %04x: sign lost", h);
            continue;
        }
        want = e ? ldexp(1024.0 + m, (int)e - 25) : ldexp((double)m, -24);
        if (h & 0x8000) want = -want;
        if ((double)f != want || !!signbit(f) != ((h & 0x8000) != 0)) {
            fail_msg("half %04x: expected %.9g got %.9g", h, want, (double)f);
        }
        const uint16_t back = tsr_f32_to_f16(f);
        if (back != h) fail_msg("half %04x: round trip gave %04x", h, back);
    }
    /* f32 -> f16 rounding: ties to even, overflow, subnormals, NaN */
    static const struct {
        float f;
        uint16_t h;
    } k[] = {
        {1.0f, 0x3c00},
        {65504.0f, 0x7bff},
        {65519.99f, 0x7bff},
        {65520.0f, 0x7c00},
        {1e10f, 0x7c00},
        {-1e10f, 0xfc00},
        {0x1p-24f, 0x0001},
        {0x1p-25f, 0x0000},
        {0x1.8p-25f, 0x0001},
        {0x1.8p-24f, 0x0002},
        {0x1p-14f, 0x0400},
        {0x1.ffcp-15f, 0x0400},
        {1.0f + 0x1p-11f, 0x3c00},
        {1.0f + 0x3p-11f, 0x3c02},
        {-0.0f, 0x8000},
    };
    for (size_t i = 0; i < sizeof k / sizeof k[0]; ++i) {
        const uint16_t got = tsr_f32_to_f16(k[i].f);
        if (got != k[i].h) fail_msg("f16(%a): expected %04x got %04x", (double)k[i].f, k[i].h, got);
    }
    if ((tsr_f32_to_f16(NAN) & 0x7c00) != 0x7c00 || (tsr_f32_to_f16(NAN) & 0x3ff) == 0) {
        fail_msg("f16(NaN) is not a NaN: %04x", tsr_f32_to_f16(NAN));
    }
#if HAVE_X86
    /* against the hardware conversion (IEEE round to nearest even) on a sweep of floats */
    unsigned a = 0, b = 0, c = 0, d = 0; /* F16C: CPUID.1:ECX (no portable builtin name) */
    if (__get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C)) {
        uint64_t s = 7;
        for (uint32_t i = 0; i < 4000000; ++i) {
            const uint32_t u = i < 2000000 ? i * 2147u : (uint32_t)tsr_test_xorshift64s(&s);
            const float f = tsr_test_ffrom(u);
            if (isnan(f)) continue;
            const uint16_t want = hw_f32_to_f16(f), got = tsr_f32_to_f16(f);
            if (want != got)
                fail_msg("f16(%a) [%08x]: expected %04x got %04x", (double)f, u, want, got);
        }
    }
#endif
    /* bf16: round to nearest even on the dropped 16 bits, NaN stays NaN (quiet) */
    static const struct {
        uint32_t f;
        uint16_t h;
    } kb[] = {
        {0x3f800000, 0x3f80}, {0x3f808000, 0x3f80}, {0x3f818000, 0x3f82}, {0x3f808001, 0x3f81},
        {0x7f7fffff, 0x7f80}, {0xff800000, 0xff80}, {0x7fc00000, 0x7fc0}, {0x7f800001, 0x7fc0},
        {0x00000001, 0x0000}, {0x80000000, 0x8000},
    };
    for (size_t i = 0; i < sizeof kb / sizeof kb[0]; ++i) {
        const uint16_t got = tsr_f32_to_bf16(tsr_test_ffrom(kb[i].f));
        if (got != kb[i].h) fail_msg("bf16(%08x): expected %04x got %04x", kb[i].f, kb[i].h, got);
    }
    for (uint32_t h = 0; h < 65536; ++h) {
        const float f = tsr_bf16_to_f32((uint16_t)h);
        if (tsr_test_fbits(f) != h << 16)
            fail_msg("bf16 %04x: expected bits %08x got %08x", h, h << 16, tsr_test_fbits(f));
        if (!isnan(f) && tsr_f32_to_bf16(f) != h) fail_msg("bf16 %04x: round trip failed", h);
    }
}

/* ---- tests: ggml reference data -------------------------------------------------------- */

/* Every row of a real (llama-quantize made) tensor dotted with a random activation, on
 * every instruction set, against the float64 dot of the dequantized rows. */
static void check_real_rows(const dq_entry *e, const uint8_t *raw, const float *deq)
{
    const uint32_t xtype = tsr_type_vec_dot_type(e->type);
    const int64_t ne0 = e->ne0, rows = e->ne1;
    float *xf = tsr_test_xmalloc((size_t)ne0 * sizeof(float)),
          *xd = tsr_test_xmalloc((size_t)ne0 * sizeof(float));
    uint8_t *xq = tsr_test_xmalloc(tsr_row_bytes(xtype, ne0));
    float *y = tsr_test_xmalloc((size_t)rows * sizeof(float));
    fill_data(xf, ne0, 4242, 1.0f);
    tsr_quant_row(xtype, xf, xq, ne0);
    tsr_dequant_row(xtype, xq, xd, ne0);
    const size_t rb = tsr_row_bytes(e->type, ne0);
    for (size_t k = 0; k < sizeof k_isas / sizeof k_isas[0]; ++k) {
        if (!tsr_quant_set_isa(k_isas[k])) continue;
        tsr_vec_dot_rows(e->type, ne0, rows, raw, rb, xq, y);
        for (int64_t r = 0; r < rows; ++r) {
            double ref = 0, mag = 0;
            for (int64_t i = 0; i < ne0; ++i) {
                ref += (double)deq[r * ne0 + i] * xd[i];
                mag += fabs((double)deq[r * ne0 + i] * xd[i]);
            }
            if (!(fabs(y[r] - ref) <= DOT_REL_TOL * mag + 1e-30)) {
                fail_msg("%s %s %s row %" PRId64
                         ": dot expected %.9g (float64) got %.9g, |diff| %.3g"
                         " > %.3g (1e-5 * sum|w*x|)",
                         k_isas[k], e->file, e->tensor, r, ref, (double)y[r], fabs(y[r] - ref),
                         DOT_REL_TOL * mag);
            }
        }
    }
    restore_isa();
    free(xf);
    free(xd);
    free(xq);
    free(y);
}

static void test_dequant_matches_ggml(void **state)
{
    (void)state;
    dq_entry *es = NULL;
    const int count = load_dequant_expected(&es);
    for (int i = 0; i < count; ++i) {
        const dq_entry *e = &es[i];
        const size_t bytes = tsr_row_bytes(e->type, e->n);
        if (bytes == 0)
            fail_msg("%s %s: row bytes 0 for type %s", e->file, e->tensor, e->type_name);
        if (tsr_row_bytes(e->type, 512) != e->bytes_first_512) {
            fail_msg("%s %s: bytes of 512 %s elements: expected %zu got %zu", e->file, e->tensor,
                     e->type_name, e->bytes_first_512, tsr_row_bytes(e->type, 512));
        }
        uint8_t *raw = read_tensor(e->file, e->data_offset, bytes);
        float *out = tsr_test_xmalloc((size_t)e->n * sizeof(float));
        /* first 512 elements on their own (whole blocks), then the whole tensor */
        tsr_dequant_row(e->type, raw, out, 512);
        for (int j = 0; j < 512; ++j) {
            if (tsr_test_fbits(out[j]) != tsr_test_fbits(e->first[j])) {
                fail_msg("%s %s (%s) element %d: expected %.9g [%08x] got %.9g [%08x]", e->file,
                         e->tensor, e->type_name, j, (double)e->first[j],
                         tsr_test_fbits(e->first[j]), (double)out[j], tsr_test_fbits(out[j]));
            }
        }
        tsr_dequant_row(e->type, raw, out, e->n);
        double sum = 0, sumsq = 0;
        for (int64_t j = 0; j < e->n; ++j) {
            sum += out[j];
            sumsq += (double)out[j] * out[j];
        }
        if (fabs(sum - e->sum) > 1e-9 * fabs(e->sum) + 1e-12) {
            fail_msg("%s %s: sum expected %.17g got %.17g", e->file, e->tensor, e->sum, sum);
        }
        if (fabs(sumsq - e->sumsq) > 1e-9 * fabs(e->sumsq)) {
            fail_msg("%s %s: sumsq expected %.17g got %.17g", e->file, e->tensor, e->sumsq, sumsq);
        }
        check_real_rows(e, raw, out);
        char hex[65];
        sha256_hex(out, (size_t)e->n * sizeof(float), hex); /* x86: little-endian floats */
        if (strcmp(hex, e->sha256) != 0) {
            fail_msg("%s %s: sha256 of dequantized tensor: expected %s got %s", e->file, e->tensor,
                     e->sha256, hex);
        }
        free(out);
        free(raw);
    }
    free(es);
}

/* Every quantized tensor of the synthetic files was made by llama-quantize from the f16
 * file without an imatrix, i.e. by ggml's quantize_row_*_ref. Quantizing the f16 values
 * ourselves must give the same bytes. */
static void test_quantizers_match_llama_quantize(void **state)
{
    (void)state;
    dq_entry *es = NULL;
    const int count = load_dequant_expected(&es);
    int checked = 0;
    for (int i = 0; i < count; ++i) {
        const dq_entry *e = &es[i];
        if (e->type == TSR_TYPE_F16) continue;
        const dq_entry *src = NULL;
        for (int k = 0; k < count; ++k) {
            if (es[k].type == TSR_TYPE_F16 && strcmp(es[k].tensor, e->tensor) == 0) src = &es[k];
        }
        if (!src) continue;
        assert_int_equal(src->n, e->n);
        const size_t src_bytes = tsr_row_bytes(TSR_TYPE_F16, src->n);
        const size_t bytes = tsr_row_bytes(e->type, e->n);
        uint8_t *f16raw = read_tensor(src->file, src->data_offset, src_bytes);
        uint8_t *want = read_tensor(e->file, e->data_offset, bytes);
        float *f = tsr_test_xmalloc((size_t)e->n * sizeof(float));
        uint8_t *got = tsr_test_xmalloc(bytes);
        tsr_dequant_row(TSR_TYPE_F16, f16raw, f, e->n);
        /* row by row, as llama-quantize does (a row is ne0 elements) */
        const size_t rb = tsr_row_bytes(e->type, e->ne0);
        for (int64_t r = 0; r < e->ne1; ++r)
            tsr_quant_row(e->type, f + r * e->ne0, got + r * rb, e->ne0);
        const size_t bb = tsr_type_block_bytes(e->type);
        int64_t bad = 0, first_bad = -1;
        for (size_t b = 0; b < bytes / bb; ++b) {
            if (memcmp(got + b * bb, want + b * bb, bb) != 0) {
                if (first_bad < 0) first_bad = (int64_t)b;
                ++bad;
            }
        }
        if (bad) {
            const size_t o = (size_t)first_bad * bb;
            fail_msg("%s %s: quantize %s of the f16 values differs from llama-quantize in %" PRId64
                     " of %zu blocks; first block %" PRId64 " starts: expected %02x %02x %02x %02x"
                     " got %02x %02x %02x %02x",
                     e->file, e->tensor, e->type_name, bad, bytes / bb, first_bad, want[o],
                     want[o + 1], want[o + 2], want[o + 3], got[o], got[o + 1], got[o + 2],
                     got[o + 3]);
        }
        ++checked;
        free(got);
        free(f);
        free(want);
        free(f16raw);
    }
    /* Q8_0 x2, Q4_K, Q6_K x2, Q4_0, BF16 */
    if (checked < 7)
        fail_msg("expected at least 7 quantized tensors with an f16 source, got %d", checked);
    free(es);
}

/* The files of the second batch (models README 9.1: Q4_1, Q5_0, Q5_1 and the Q2_K, Q3_K_M,
 * Q5_K_M mixes) were made the same way from the f16 file: every quantized tensor of them,
 * each type, must be our quantizer's bytes of the f16 values. Read through the GGUF reader. */
static void test_quantizers_match_llama_quantize_more(void **state)
{
    (void)state;
    static const char *const files[] = {"q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m", "q5_k_m"};
    char err[512];
    tsr_gguf *src;
    if (tsr_gguf_open(tsr_test_model_path("synthetic/synth-tiny-f16.gguf"), &src, err,
                      sizeof err) != 0)
        fail_msg("open synth-tiny-f16.gguf: %s", err);
    uint32_t seen[TSR_TYPE_COUNT] = {0};
    for (size_t f = 0; f < sizeof files / sizeof files[0]; ++f) {
        char rel[128];
        snprintf(rel, sizeof rel, "synthetic/synth-tiny-%s.gguf", files[f]);
        tsr_gguf *g;
        if (tsr_gguf_open(tsr_test_model_path(rel), &g, err, sizeof err) != 0)
            fail_msg("open %s: %s", rel, err);
        for (int64_t i = 0; i < tsr_gguf_n_tensors(g); ++i) {
            const tsr_gguf_tensor *t = tsr_gguf_tensor_at(g, i);
            if (tsr_type_block_elems(t->type) <= 1) continue; /* F32 norms */
            /* Q6_K token_embd (8M values, slow to quantize) is checked in the test above */
            if (t->type == TSR_TYPE_Q6_K && strcmp(t->name, "token_embd.weight") == 0) continue;
            const tsr_gguf_tensor *s16 = tsr_gguf_find_tensor(src, t->name);
            if (!s16 || s16->type != TSR_TYPE_F16) fail_msg("%s: no F16 source tensor", t->name);
            const int64_t ne0 = t->ne[0], rows = t->ne[1] * t->ne[2] * t->ne[3];
            const size_t rb = tsr_row_bytes(t->type, ne0), bb = tsr_type_block_bytes(t->type);
            float *x = tsr_test_xmalloc(sizeof(float) * (size_t)ne0);
            uint8_t *got = tsr_test_xmalloc(rb);
            int64_t bad = 0, first_row = -1;
            for (int64_t r = 0; r < rows; ++r) {
                tsr_dequant_row(TSR_TYPE_F16, (const uint8_t *)s16->data + (size_t)r * 2 * ne0, x,
                                ne0);
                tsr_quant_row(t->type, x, got, ne0);
                const uint8_t *want = (const uint8_t *)t->data + (size_t)r * rb;
                for (size_t b = 0; b < rb / bb; ++b) {
                    if (memcmp(got + b * bb, want + b * bb, bb) != 0) {
                        if (first_row < 0) first_row = r;
                        ++bad;
                    }
                }
            }
            if (bad)
                fail_msg("%s %s: quantize %s of the f16 values differs from llama-quantize in "
                         "%" PRId64 " blocks (first in row %" PRId64 ")",
                         rel, t->name, tsr_type_name(t->type), bad, first_row);
            seen[t->type]++;
            free(x);
            free(got);
        }
        tsr_gguf_close(g);
    }
    tsr_gguf_close(src);
    static const uint32_t want_types[] = {TSR_TYPE_Q4_1, TSR_TYPE_Q5_0, TSR_TYPE_Q5_1,
                                          TSR_TYPE_Q2_K, TSR_TYPE_Q3_K, TSR_TYPE_Q4_K,
                                          TSR_TYPE_Q5_K, TSR_TYPE_Q6_K};
    for (size_t k = 0; k < sizeof want_types / sizeof want_types[0]; ++k) {
        if (!seen[want_types[k]])
            fail_msg("no %s tensor checked in the second batch of files",
                     tsr_type_name(want_types[k]));
    }
}

/* ---- tests: round trips ------------------------------------------------------------------ */

static void check_roundtrip(uint32_t type, int64_t n, uint64_t seed, float scale)
{
    float *x = tsr_test_xmalloc((size_t)n * sizeof(float));
    float *y = tsr_test_xmalloc((size_t)n * sizeof(float));
    const size_t bytes = tsr_row_bytes(type, n);
    uint8_t *q = tsr_test_xmalloc(bytes), *q2 = tsr_test_xmalloc(bytes);
    fill_data(x, n, seed, scale);
    tsr_quant_row(type, x, q, n);
    tsr_dequant_row(type, q, y, n);
    const int64_t be = tsr_type_block_elems(type);
    const int64_t group = be > 1 ? be : 1;
    double se = 0, sx = 0;
    for (int64_t b = 0; b < n / group; ++b) {
        float amax = 0;
        for (int64_t j = b * group; j < (b + 1) * group; ++j) amax = fmaxf(amax, fabsf(x[j]));
        for (int64_t j = b * group; j < (b + 1) * group; ++j) {
            const double err = fabs((double)y[j] - x[j]);
            se += err * err;
            sx += (double)x[j] * x[j];
            double bound = -1; /* per-element bound, where one is exact */
            switch (type) {
            case TSR_TYPE_F32:
                bound = 0;
                break;
            case TSR_TYPE_F16:
                bound = fmax(fabs(x[j]) * 0x1p-11, 0x1p-25);
                break; /* subnormals */
            case TSR_TYPE_BF16:
                bound = fabs(x[j]) * 0x1p-8;
                break; /* no subnormals here */
            /* half a step of amax/127, plus 127 times the fp16 rounding of d (relative, or
             * absolute 2^-25 where d is subnormal in fp16: tiny blocks lose everything) */
            case TSR_TYPE_Q8_0:
            case TSR_TYPE_Q8_1:
                bound = amax * 0.5 / 127 * 1.001 + 127 * fmax(amax / 127 * 0x1p-11, 0x1p-25);
                break;
            /* one step of amax/8 (the +amax side clamps 8 -> 7), plus fp16 rounding of d */
            case TSR_TYPE_Q4_0:
                bound = amax / 8.0 * 1.001 + 8 * fmax(amax / 8 * 0x1p-11, 0x1p-25);
                break;
            case TSR_TYPE_Q8_K:
                bound = amax * 0.5 / 127 * 1.0001;
                break;
            /* one step of amax/16, plus fp16 rounding of d, as Q4_0 */
            case TSR_TYPE_Q5_0:
                bound = amax / 16.0 * 1.001 + 16 * fmax(amax / 16 * 0x1p-11, 0x1p-25);
                break;
            /* half a step d = (max-min)/(2^bits - 1), plus fp16 rounding of d and of min */
            case TSR_TYPE_Q4_1:
            case TSR_TYPE_Q5_1: {
                const double levels = type == TSR_TYPE_Q4_1 ? 15 : 31;
                float mn = x[b * group], mx = x[b * group];
                for (int64_t k = b * group; k < (b + 1) * group; ++k) {
                    mn = fminf(mn, x[k]);
                    mx = fmaxf(mx, x[k]);
                }
                const double d = ((double)mx - mn) / levels;
                bound = d * 0.5 * 1.001 + levels * fmax(d * 0x1p-11, 0x1p-25) +
                        fmax(fabs(mn) * 0x1p-11, 0x1p-25);
                break;
            }
            default:
                break;
            }
            if (bound >= 0 && err > bound) {
                fail_msg("%s n=%" PRId64 " element %" PRId64 ": x=%.9g dequant(quant(x))=%.9g,"
                         " error %.3g > bound %.3g",
                         tsr_type_name(type), n, j, (double)x[j], (double)y[j], err, bound);
            }
        }
    }
    /* K-quants: no per-element bound; relative RMS error, measured on this data (Gaussian
     * plus outliers that widen some groups): Q2_K 0.29-0.35, Q3_K 0.16-0.19, Q4_K
     * 0.073-0.082, Q5_K 0.038-0.042, Q6_K 0.019-0.023 */
    const double rel = sx > 0 ? sqrt(se / sx) : 0;
    double rel_bound = 1.0;
    switch (type) {
    case TSR_TYPE_Q2_K:
        rel_bound = 0.40;
        break;
    case TSR_TYPE_Q3_K:
        rel_bound = 0.22;
        break;
    case TSR_TYPE_Q4_K:
        rel_bound = 0.10;
        break;
    case TSR_TYPE_Q5_K:
        rel_bound = 0.05;
        break;
    case TSR_TYPE_Q6_K:
        rel_bound = 0.03;
        break;
    default:
        break;
    }
    if (getenv("TSR_TEST_PRINT_RMS"))
        print_message("%s n=%" PRId64 " relative RMS error %.4f\n", tsr_type_name(type), n, rel);
    if (rel > rel_bound) {
        fail_msg("%s n=%" PRId64 ": relative RMS error expected <= %.3g got %.4g",
                 tsr_type_name(type), n, rel_bound, rel);
    }
    /* Q8_0 / Q4_0: dequantized values quantize back to the same bytes. Except blocks whose
     * fp16 scale underflowed to 0 (amax below ~4e-6 for Q8_0): their quants were computed
     * with the unrounded scale but dequantize to zeros. */
    if (type == TSR_TYPE_Q8_0 || type == TSR_TYPE_Q4_0) {
        tsr_quant_row(type, y, q2, n);
        const size_t bb = tsr_type_block_bytes(type);
        for (size_t i = 0; i < bytes; ++i) {
            const size_t blk = i / bb * bb; /* the block's first byte: its fp16 d */
            if ((q[blk] | (q[blk + 1] & 0x7f)) == 0) continue;
            if (q[i] != q2[i]) {
                fail_msg("%s: quant(dequant(q)) byte %zu: expected %02x got %02x",
                         tsr_type_name(type), i, q[i], q2[i]);
            }
        }
    }
    free(x);
    free(y);
    free(q);
    free(q2);
}

static void test_roundtrip(void **state)
{
    (void)state;
    static const uint32_t types[] = {TSR_TYPE_F32,  TSR_TYPE_F16,  TSR_TYPE_BF16, TSR_TYPE_Q8_0,
                                     TSR_TYPE_Q4_0, TSR_TYPE_Q4_1, TSR_TYPE_Q5_0, TSR_TYPE_Q5_1,
                                     TSR_TYPE_Q8_1, TSR_TYPE_Q2_K, TSR_TYPE_Q3_K, TSR_TYPE_Q4_K,
                                     TSR_TYPE_Q5_K, TSR_TYPE_Q6_K, TSR_TYPE_Q8_K};
    for (size_t t = 0; t < sizeof types / sizeof types[0]; ++t) {
        for (uint64_t seed = 1; seed <= 3; ++seed) {
            check_roundtrip(types[t], 4096, seed, 1.0f);
            check_roundtrip(types[t], 2048, seed + 10, 0.02f);
            check_roundtrip(types[t], 1024, seed + 20, 300.0f);
        }
    }
    /* an all-zero row stays zero and does not produce NaN */
    for (size_t t = 0; t < sizeof types / sizeof types[0]; ++t) {
        float z[512] = {0}, y[512];
        uint8_t q[2048];
        tsr_quant_row(types[t], z, q, 512);
        tsr_dequant_row(types[t], q, y, 512);
        for (int i = 0; i < 512; ++i) {
            if (y[i] != 0.0f)
                fail_msg("%s: zero row element %d: expected 0 got %g", tsr_type_name(types[t]), i,
                         (double)y[i]);
        }
    }
}

/* ---- tests: dots ----------------------------------------------------------------------- */

typedef struct {
    uint32_t type, xtype;
    int64_t n;
    float *wf, *xf;   /* original floats */
    uint8_t *w, *x;   /* quantized weight row, quantized activation */
    double ref, mag;  /* float64 dot of the dequantized rows, and sum |w_i*x_i| */
    double act_bound; /* bound on |quantized dot - dot with unquantized x| */
    double s_dev;     /* Q8_1: sum |m_w| * |s - d*sum(q)|, the stored s's rounding */
    double fdot;      /* float64 dot of dequantized w with unquantized x */
} dot_case;

static void dot_case_make(dot_case *c, uint32_t type, int64_t n, uint64_t seed)
{
    c->type = type;
    c->xtype = tsr_type_vec_dot_type(type);
    c->n = n;
    c->wf = tsr_test_xmalloc((size_t)n * sizeof(float));
    c->xf = tsr_test_xmalloc((size_t)n * sizeof(float));
    fill_data(c->wf, n, seed, 0.05f);
    fill_data(c->xf, n, seed + 1000, 2.0f);
    c->w = tsr_test_xmalloc(tsr_row_bytes(type, n));
    c->x = tsr_test_xmalloc(tsr_row_bytes(c->xtype, n));
    tsr_quant_row(type, c->wf, c->w, n);
    tsr_quant_row(c->xtype, c->xf, c->x, n);
    float *wd = tsr_test_xmalloc((size_t)n * sizeof(float)),
          *xd = tsr_test_xmalloc((size_t)n * sizeof(float));
    tsr_dequant_row(type, c->w, wd, n);
    tsr_dequant_row(c->xtype, c->x, xd, n);
    c->ref = c->mag = c->fdot = c->act_bound = c->s_dev = 0;
    if (c->xtype == TSR_TYPE_Q8_1) {
        /* Q4_1 / Q5_1 dots use the activation's stored s = fp16(d*sum(q)) for the min term,
         * as ggml does; the dequantized reference uses fp16(d)*sum(q). Blocks: weight d, m
         * at bytes 0..3; Q8_1 d, s, then 32 quants. */
        const size_t wbb = tsr_type_block_bytes(type);
        for (int64_t b = 0; b < n / 32; ++b) {
            uint16_t mw, dx, sx;
            memcpy(&mw, c->w + (size_t)b * wbb + 2, 2);
            memcpy(&dx, c->x + (size_t)b * 36, 2);
            memcpy(&sx, c->x + (size_t)b * 36 + 2, 2);
            int32_t sum = 0;
            for (int k = 0; k < 32; ++k) sum += (int8_t)c->x[(size_t)b * 36 + 4 + (size_t)k];
            c->s_dev += fabs((double)tsr_f16_to_f32(mw)) *
                        fabs((double)tsr_f16_to_f32(sx) - (double)tsr_f16_to_f32(dx) * sum);
        }
    }
    for (int64_t i = 0; i < n; ++i) {
        c->ref += (double)wd[i] * xd[i];
        c->mag += fabs((double)wd[i] * xd[i]);
        c->fdot += (double)wd[i] * c->xf[i];
    }
    /* activation rounding: |x - xq| <= amax_block * (0.5/127 + 2^-11) for Q8_0 (fp16 d) and
     * amax/254 for Q8_K; summed against |w| it bounds the quantized-vs-float difference */
    const int64_t be = tsr_type_block_elems(c->xtype);
    if (c->xtype != TSR_TYPE_F32) {
        const double per = c->xtype == TSR_TYPE_Q8_0 ? (0.5 / 127 + 0x1p-11) : 0.5 / 127;
        for (int64_t b = 0; b < n / be; ++b) {
            double amax = 0, wabs = 0;
            for (int64_t i = b * be; i < (b + 1) * be; ++i) {
                amax = fmax(amax, fabs(c->xf[i]));
                wabs += fabs(wd[i]);
            }
            c->act_bound += per * 1.001 * amax * wabs;
        }
    }
    free(wd);
    free(xd);
}

static void dot_case_free(dot_case *c)
{
    free(c->wf);
    free(c->xf);
    free(c->w);
    free(c->x);
}

static void check_dot_case(const dot_case *c, const char *isa)
{
    const double tol = DOT_REL_TOL * c->mag + c->s_dev * 1.001 + 1e-30;
    const float got = tsr_vec_dot(c->type, c->n, c->w, c->x);
    if (!(fabs((double)got - c->ref) <= tol)) {
        fail_msg("%s dot %s n=%" PRId64 ": expected %.9g (float64 of dequantized rows) got %.9g,"
                 " |diff| %.3g > tol %.3g (1e-5 * sum|w*x| + Q8_1 s rounding)",
                 isa, tsr_type_name(c->type), c->n, c->ref, (double)got, fabs(got - c->ref), tol);
    }
    /* quantized activations vs exact x: within the activation rounding bound */
    const double tol2 = c->act_bound + 2 * tol;
    if (!(fabs((double)got - c->fdot) <= tol2)) {
        fail_msg("%s dot %s n=%" PRId64 ": quantized-x dot %.9g vs float-x dot %.9g: |diff| %.3g >"
                 " activation rounding bound %.3g",
                 isa, tsr_type_name(c->type), c->n, (double)got, c->fdot, fabs(got - c->fdot),
                 tol2);
    }
}

static const int64_t k_n_float[] = {1, 7, 8, 15, 16, 17, 33, 100, 256, 1000, 4096, 4103};
static const int64_t k_n_q32[] = {32, 64, 96, 160, 1056, 4096, 4128};
static const int64_t k_n_qk[] = {256, 512, 768, 1792, 4096};

static void for_each_n(uint32_t type, void (*fn)(uint32_t, int64_t, void *), void *arg)
{
    const int64_t *ns;
    size_t cnt;
    if (tsr_type_block_elems(type) == 1) {
        ns = k_n_float;
        cnt = sizeof k_n_float / sizeof k_n_float[0];
    } else if (tsr_type_block_elems(type) == 32) {
        ns = k_n_q32;
        cnt = sizeof k_n_q32 / sizeof k_n_q32[0];
    } else {
        ns = k_n_qk;
        cnt = sizeof k_n_qk / sizeof k_n_qk[0];
    }
    for (size_t i = 0; i < cnt; ++i) fn(type, ns[i], arg);
}

/* Types whose dots sum in ggml's order on every instruction set (bit-identical results). */
static bool ggml_order_type(uint32_t type)
{
    return type == TSR_TYPE_Q5_0 || type == TSR_TYPE_Q4_K || type == TSR_TYPE_Q6_K;
}

static void dots_one(uint32_t type, int64_t n, void *arg)
{
    (void)arg;
    for (uint64_t seed = 1; seed <= 3; ++seed) {
        dot_case c;
        dot_case_make(&c, type, n, seed * 7919 + (uint64_t)n);
        float first = 0;
        int have_first = 0;
        for (size_t k = 0; k < sizeof k_isas / sizeof k_isas[0]; ++k) {
            if (!tsr_quant_set_isa(k_isas[k])) continue;
            check_dot_case(&c, k_isas[k]);
            /* fast paths vs the scalar reference, directly */
            const float got = tsr_vec_dot(type, n, c.w, c.x);
            if (!have_first) {
                first = got;
                have_first = 1;
            } else if (ggml_order_type(type) && tsr_test_fbits(got) != tsr_test_fbits(first)) {
                /* one summation order (ggml's, see kernels/quant.c) on every path */
                fail_msg("dot %s n=%" PRId64 " seed %" PRIu64 ": scalar %.9g (%08x) vs %s %.9g "
                         "(%08x): must be bit-identical",
                         tsr_type_name(type), n, seed, (double)first, tsr_test_fbits(first),
                         k_isas[k], (double)got, tsr_test_fbits(got));
            } else if (!(fabs((double)got - first) <= 2 * DOT_REL_TOL * c.mag + 1e-30)) {
                fail_msg("%s dot %s n=%" PRId64 ": scalar %.9g vs %s %.9g differ by %.3g > %.3g",
                         k_isas[k], tsr_type_name(type), n, (double)first, k_isas[k], (double)got,
                         fabs(got - first), 2 * DOT_REL_TOL * c.mag);
            }
        }
        dot_case_free(&c);
    }
}

static void test_dots(void **state)
{
    (void)state;
    for (size_t t = 0; t < N_WEIGHT_TYPES; ++t) for_each_n(k_weight_types[t], dots_one, NULL);
    restore_isa();
}

/* Rows: y[r] must be bit-identical to tsr_vec_dot of row r, for every group size and
 * stride (the kernels keep per-row accumulation independent of the grouping). */
static void rows_one(uint32_t type, int64_t n, void *arg)
{
    (void)arg;
    const uint32_t xtype = tsr_type_vec_dot_type(type);
    const size_t rb = tsr_row_bytes(type, n);
    enum { MAX_ROWS = 11 };
    float *f = tsr_test_xmalloc((size_t)n * sizeof(float));
    uint8_t *x = tsr_test_xmalloc(tsr_row_bytes(xtype, n));
    fill_data(f, n, 99 + (uint64_t)n, 1.0f);
    tsr_quant_row(xtype, f, x, n);
    for (int pad = 0; pad <= 64; pad += 64) {
        const size_t stride = rb + (size_t)pad;
        uint8_t *w = tsr_test_xmalloc(stride * MAX_ROWS);
        memset(w, 0xA5, stride * MAX_ROWS); /* padding is garbage the kernels must skip */
        for (int r = 0; r < MAX_ROWS; ++r) {
            fill_data(f, n, 1000 + (uint64_t)r * 31 + (uint64_t)n, 0.1f);
            tsr_quant_row(type, f, w + (size_t)r * stride, n);
        }
        for (size_t k = 0; k < sizeof k_isas / sizeof k_isas[0]; ++k) {
            if (!tsr_quant_set_isa(k_isas[k])) continue;
            for (int nrows = 1; nrows <= MAX_ROWS; ++nrows) {
                float y[MAX_ROWS];
                for (int r = 0; r < MAX_ROWS; ++r) y[r] = -12345.0f;
                tsr_vec_dot_rows(type, n, nrows, w, stride, x, y);
                for (int r = 0; r < MAX_ROWS; ++r) {
                    if (r >= nrows) {
                        if (y[r] != -12345.0f) fail_msg("%s rows wrote past n_rows", k_isas[k]);
                        continue;
                    }
                    const float want = tsr_vec_dot(type, n, w + (size_t)r * stride, x);
                    if (tsr_test_fbits(want) != tsr_test_fbits(y[r])) {
                        fail_msg("%s %s n=%" PRId64 " rows=%d stride=%zu row %d: expected %.9g"
                                 " (tsr_vec_dot) got %.9g",
                                 k_isas[k], tsr_type_name(type), n, nrows, stride, r, (double)want,
                                 (double)y[r]);
                    }
                }
            }
        }
        free(w);
    }
    free(f);
    free(x);
}

static void test_dot_rows(void **state)
{
    (void)state;
    for (size_t t = 0; t < N_WEIGHT_TYPES; ++t) for_each_n(k_weight_types[t], rows_one, NULL);
    /* rows longer than the kernels' on-stack activation tables (65536 elements) */
    rows_one(TSR_TYPE_Q8_0, 32 * 2100, NULL);
    rows_one(TSR_TYPE_Q4_0, 32 * 2100, NULL);
    dots_one(TSR_TYPE_Q4_0, 32 * 2100, NULL);
    restore_isa();
}

/* The activation quantizer (Q8_0, SIMD when the CPU has it) must write the scalar
 * reference's bytes: roundf's ties away from zero, the fraction just below a tie, zero,
 * tiny and huge blocks. (Blocks whose 1/d overflows, e.g. all subnormal, make the scalar
 * code convert inf/NaN to int8, undefined in C; not tested.) */
static void test_quant_q8_0_isas(void **state)
{
    (void)state;
    enum { N = 4096 + 5 * 32 };
    float *x = tsr_test_xmalloc(N * sizeof(float));
    fill_data(x, 4096, 4242, 3.0f);
    float *e = x + 4096;
    for (int i = 0; i < 32; ++i) e[i] = (i % 2 ? -1.0f : 1.0f) * ((float)i + 0.5f); /* ties */
    e[31] = 127.0f; /* d = 1, so x*id = x exactly */
    for (int i = 0; i < 32; ++i) e[32 + i] = (i % 2 ? -1.0f : 1.0f) * nextafterf(i + 0.5f, 0.0f);
    e[63] = -127.0f;
    for (int i = 0; i < 32; ++i) e[64 + i] = 0.0f;
    e[64 + 5] = -0.0f;
    for (int i = 0; i < 32; ++i) e[96 + i] = 1e-30f * (float)(i - 16); /* tiny */
    for (int i = 0; i < 32; ++i) e[128 + i] = 6e4f * (float)(i - 16) / 16.0f;
    const size_t bytes = tsr_row_bytes(TSR_TYPE_Q8_0, N);
    uint8_t *ref = tsr_test_xmalloc(bytes), *got = tsr_test_xmalloc(bytes);
    assert_true(tsr_quant_set_isa("scalar"));
    tsr_quant_row(TSR_TYPE_Q8_0, x, ref, N);
    for (size_t k = 1; k < sizeof k_isas / sizeof k_isas[0]; ++k) {
        if (!tsr_quant_set_isa(k_isas[k])) continue;
        memset(got, 0, bytes);
        tsr_quant_row(TSR_TYPE_Q8_0, x, got, N);
        for (size_t i = 0; i < bytes; ++i) {
            if (got[i] != ref[i])
                fail_msg("%s Q8_0 quantization byte %zu (block %zu): scalar 0x%02x, got 0x%02x",
                         k_isas[k], i, i / 34, ref[i], got[i]);
        }
    }
    free(x);
    free(ref);
    free(got);
    restore_isa();
}

/* The K-quants' activation quantizer (Q8_K, SIMD when the CPU has it) must write the scalar
 * reference's bytes (quants, bsums, d): ties of the round-to-nearest-even, the first of two
 * extremes of opposite sign (which sets d's sign), zero and -0 blocks, tiny and huge values,
 * and blocks holding NaN or inf (byte 0 for their quants, both ways). */
static void test_quant_q8_K_isas(void **state)
{
    (void)state;
    enum { QK = 256, NB = 24, N = NB * QK };
    float *x = tsr_test_xmalloc(N * sizeof(float));
    fill_data(x, 16 * QK, 4343, 3.0f);
    float *e = x + 16 * QK;
    for (int i = 0; i < QK; ++i) e[i] = (i % 2 ? -1.0f : 1.0f) * ((float)(i % 127) + 0.5f);
    e[200] = -127.0f; /* iscale = 1: every x.5 is a tie */
    e[210] = 127.0f;  /* the same |x| later: max stays -127 */
    e += QK;
    for (int i = 0; i < QK; ++i) e[i] = 0.25f * (float)((i * 37) % 101 - 50);
    e[7] = 12.5f, e[9] = -12.5f; /* the first extreme is positive: d < 0 */
    e += QK;
    for (int i = 0; i < QK; ++i) e[i] = 0.0f;
    e[3] = -0.0f;
    e += QK;
    for (int i = 0; i < QK; ++i) e[i] = 1e-38f * (float)(i - 128); /* subnormals, iscale huge */
    e += QK;
    for (int i = 0; i < QK; ++i) e[i] = 3e37f * (float)(i - 128) / 128.0f;
    e += QK;
    fill_data(e, QK, 4444, 1.0f);
    e[17] = NAN;
    e[40] = -NAN;
    e += QK;
    fill_data(e, QK, 4545, 1.0f);
    e[99] = -INFINITY;
    e += QK;
    for (int i = 0; i < QK; ++i) e[i] = 1e-44f * (float)(i % 3); /* 1 / max overflows */
    const size_t bytes = tsr_row_bytes(TSR_TYPE_Q8_K, N);
    uint8_t *ref = tsr_test_xmalloc(bytes), *got = tsr_test_xmalloc(bytes);
    assert_true(tsr_quant_set_isa("scalar"));
    memset(ref, 0xEE, bytes);
    tsr_quant_row(TSR_TYPE_Q8_K, x, ref, N);
    for (size_t k = 1; k < sizeof k_isas / sizeof k_isas[0]; ++k) {
        if (!tsr_quant_set_isa(k_isas[k])) continue;
        memset(got, 0xEE, bytes);
        tsr_quant_row(TSR_TYPE_Q8_K, x, got, N);
        const size_t bb = bytes / NB;
        for (size_t i = 0; i < bytes; ++i) {
            if (got[i] != ref[i])
                fail_msg("%s Q8_K quantization byte %zu (block %zu, offset %zu: %s): scalar "
                         "0x%02x, got 0x%02x",
                         k_isas[k], i, i / bb, i % bb,
                         i % bb < 4        ? "d"
                         : i % bb < 4 + QK ? "qs"
                                           : "bsums",
                         ref[i], got[i]);
        }
    }
    free(x);
    free(ref);
    free(got);
    restore_isa();
}

/* Tiles: y[t][r] of tsr_vec_dot_tile must be bit-identical to tsr_vec_dot of row r and token
 * t, for every ISA, every tile shape from 1 x 1 up (edges of the 4-row / 4-token
 * micro-tiles), padded strides of w, x and y, and rows of several K chunks (n > 2048). */
static void tile_case(uint32_t type, int64_t n, int max_rows, int max_tok, int step)
{
    const uint32_t xtype = tsr_type_vec_dot_type(type);
    const size_t wstride = tsr_row_bytes(type, n) + 64, xstride = tsr_row_bytes(xtype, n) + 32;
    const size_t ystride = (size_t)max_rows + 3;
    float *f = tsr_test_xmalloc((size_t)n * sizeof(float));
    uint8_t *w = tsr_test_xmalloc(wstride * (size_t)max_rows),
            *x = tsr_test_xmalloc(xstride * (size_t)max_tok);
    float *y = tsr_test_xmalloc(sizeof(float) * ystride * (size_t)max_tok);
    float *want = tsr_test_xmalloc(sizeof(float) * (size_t)max_rows * (size_t)max_tok);
    memset(w, 0xA5, wstride * (size_t)max_rows); /* padding is garbage the kernels must skip */
    memset(x, 0x5A, xstride * (size_t)max_tok);
    for (int r = 0; r < max_rows; ++r) {
        fill_data(f, n, 7000 + (uint64_t)r * 13 + (uint64_t)n, 0.1f);
        tsr_quant_row(type, f, w + (size_t)r * wstride, n);
    }
    for (int t = 0; t < max_tok; ++t) {
        fill_data(f, n, 9000 + (uint64_t)t * 17 + (uint64_t)n, t % 3 ? 1.0f : 40.0f);
        tsr_quant_row(xtype, f, x + (size_t)t * xstride, n);
    }
    for (size_t k = 0; k < sizeof k_isas / sizeof k_isas[0]; ++k) {
        if (!tsr_quant_set_isa(k_isas[k])) continue;
        for (int t = 0; t < max_tok; ++t) {
            for (int r = 0; r < max_rows; ++r) {
                want[t * max_rows + r] =
                    tsr_vec_dot(type, n, w + (size_t)r * wstride, x + (size_t)t * xstride);
            }
        }
        for (int nr = 1; nr <= max_rows; nr += (nr < 9 ? 1 : step)) {
            for (int nt = 1; nt <= max_tok; nt += (nt < 11 ? 1 : step)) {
                for (size_t i = 0; i < ystride * (size_t)max_tok; ++i) y[i] = -12345.0f;
                tsr_vec_dot_tile(type, n, nr, w, wstride, nt, x, xstride, y, ystride);
                for (int t = 0; t < max_tok; ++t) {
                    for (int r = 0; r < (int)ystride; ++r) {
                        const float got = y[(size_t)t * ystride + (size_t)r];
                        if (t >= nt || r >= nr) {
                            if (got != -12345.0f) {
                                fail_msg("%s %s n=%" PRId64 " tile %dx%d wrote outside it at"
                                         " row %d token %d",
                                         k_isas[k], tsr_type_name(type), n, nr, nt, r, t);
                            }
                            continue;
                        }
                        if (tsr_test_fbits(got) != tsr_test_fbits(want[t * max_rows + r])) {
                            fail_msg("%s %s n=%" PRId64 " tile %dx%d row %d token %d: expected"
                                     " %.9g (tsr_vec_dot) got %.9g",
                                     k_isas[k], tsr_type_name(type), n, nr, nt, r, t,
                                     (double)want[t * max_rows + r], (double)got);
                        }
                    }
                }
            }
        }
    }
    free(f);
    free(w);
    free(x);
    free(y);
    free(want);
}

static void tile_one(uint32_t type, int64_t n, void *arg)
{
    (void)arg;
    tile_case(type, n, 9, 11, 1);
}

static void test_dot_tile(void **state)
{
    (void)state;
    for (size_t t = 0; t < N_WEIGHT_TYPES; ++t) for_each_n(k_weight_types[t], tile_one, NULL);
    /* many tokens (several token chunks of the kernels' ~256 KiB of activations, with a
     * tail) and rows (several row groups) */
    tile_case(TSR_TYPE_Q8_0, 4128, 13, 133, 30);
    tile_case(TSR_TYPE_Q4_0, 4128, 13, 133, 30);
    tile_case(TSR_TYPE_Q4_0, 8192, 6, 70, 29);
    tile_case(TSR_TYPE_Q4_1, 4128, 9, 70, 29); /* Q8_1 activations and the min term */
    restore_isa();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_isa_selection),
        cmocka_unit_test(test_type_table),
        cmocka_unit_test(test_unsupported_types),
        cmocka_unit_test(test_fp16_bf16),
        cmocka_unit_test(test_dequant_matches_ggml),
        cmocka_unit_test(test_quantizers_match_llama_quantize),
        cmocka_unit_test(test_quantizers_match_llama_quantize_more),
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_quant_q8_0_isas),
        cmocka_unit_test(test_quant_q8_K_isas),
        cmocka_unit_test(test_dots),
        cmocka_unit_test(test_dot_rows),
        cmocka_unit_test(test_dot_tile),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
