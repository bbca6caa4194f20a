/* membw.c — see membw.h. */
#include "kernels/membw.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

typedef struct {
    const uint8_t *buf;
    size_t n;
    int line_loop; /* tsr_membw_read_slice's loop */
    volatile uint64_t sink[64];
} bw_job;

/* How far ahead read_line_avx2 prefetches: 8 KiB (4-32 KiB measured alike, 2026-12-06). */
enum { BW_PF_AHEAD = 8 << 10 };

#if defined(__x86_64__)
__attribute__((target("avx2"))) static uint64_t read_avx2(const uint8_t *p, size_t n)
{
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i + 128 <= n; i += 128) {
        a0 = _mm256_xor_si256(a0, _mm256_loadu_si256((const __m256i *)(p + i)));
        a1 = _mm256_xor_si256(a1, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
        a2 = _mm256_xor_si256(a2, _mm256_loadu_si256((const __m256i *)(p + i + 64)));
        a3 = _mm256_xor_si256(a3, _mm256_loadu_si256((const __m256i *)(p + i + 96)));
    }
    a0 = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
    return (uint64_t)_mm256_extract_epi64(a0, 0) ^ (uint64_t)_mm256_extract_epi64(a0, 3);
}

/* One 64-byte line an iteration, its two halves folded into one chain, the line BW_PF_AHEAD
 * bytes ahead prefetched into L1. On this host (2026-12-06, 2 threads, 4 GiB) it reads
 * 34-36 GB/s where read_avx2's four independent chains read 28-30 (1 thread: 18 against 15;
 * without the prefetch 34 and 18: the loop's shape does most of it). Why is not observable
 * here (no hardware counters); likely a loop that keeps fewer demand misses in flight leaves
 * the hardware prefetchers more room. tsr_membw_probe_read takes the better of the two, so the
 * roofline is the fastest read measured, not one loop's. */
__attribute__((target("avx2"))) static uint64_t read_line_avx2(const uint8_t *p, size_t n)
{
    __m256i a = _mm256_setzero_si256();
    for (size_t i = 0; i + 64 <= n; i += 64) {
        if (i + BW_PF_AHEAD < n) _mm_prefetch((const char *)p + i + BW_PF_AHEAD, _MM_HINT_T0);
        a = _mm256_xor_si256(a,
                             _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(p + i)),
                                              _mm256_loadu_si256((const __m256i *)(p + i + 32))));
    }
    return (uint64_t)_mm256_extract_epi64(a, 0) ^ (uint64_t)_mm256_extract_epi64(a, 3);
}
#endif

static uint64_t read_scalar(const uint8_t *p, size_t n)
{
    uint64_t s = 0;
    for (size_t i = 0; i + 8 <= n; i += 8) {
        uint64_t v;
        memcpy(&v, p + i, 8);
        s ^= v;
    }
    return s;
}

static void bw_run(void *arg, int ith, int nth)
{
    bw_job *j = arg;
    size_t per = (j->n / (size_t)nth) & ~(size_t)127;
    const uint8_t *p = j->buf + per * (size_t)ith;
    j->sink[ith & 63] = tsr_membw_read_slice(p, per, j->line_loop);
}

uint64_t tsr_membw_read_slice(const void *buf, size_t n_bytes, int loop)
{
    const uint8_t *p = buf;
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx2"))
        return loop ? read_line_avx2(p, n_bytes) : read_avx2(p, n_bytes);
#endif
    (void)loop;
    return read_scalar(p, n_bytes);
}

struct tsr_membw_probe {
    uint8_t *buf;
    size_t n_bytes;
};

tsr_membw_probe *tsr_membw_probe_new(size_t n_bytes)
{
    /* Whole 2 MiB pages, advised for transparent huge pages, as the weight arena of
     * worker/model_repack.c is: decode streams its weights from huge pages, and on 4 KiB
     * pages a stream pays a TLB walk and a prefetcher restart every 4 KiB (on the Intel host of
     * 2026-12 a one-thread read ran 18-22 GB/s on 4 KiB pages and 32-38 on 2 MiB), so a 4 KiB
     * measure would put decode above 100% of its "roofline". */
    const size_t huge = (size_t)2 << 20;
    tsr_membw_probe *p = malloc(sizeof *p);
    if (!p) return NULL;
    p->n_bytes = (n_bytes + huge - 1) / huge * huge;
    p->buf = aligned_alloc(huge, p->n_bytes);
    if (!p->buf) {
        free(p);
        return NULL;
    }
    (void)madvise(p->buf, p->n_bytes, MADV_HUGEPAGE); /* advice only: may keep 4 KiB pages */
    memset(p->buf, 1, p->n_bytes);                    /* fault every page in before timing */
    return p;
}

size_t tsr_membw_probe_bytes(const tsr_membw_probe *p)
{
    return p->n_bytes;
}

void tsr_membw_probe_free(tsr_membw_probe *p)
{
    if (!p) return;
    free(p->buf);
    free(p);
}

double tsr_membw_probe_read(tsr_membw_probe *p, tsr_pool *pool, int reps)
{
    bw_job j = {.buf = p->buf, .n = p->n_bytes};
    double best = 0.0;
    /* each repetition times both read loops (where there is a choice), interleaved */
    for (int r = 0; r < 2 * (reps < 1 ? 1 : reps); r++) {
        j.line_loop = r & 1;
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        tsr_pool_run(pool, bw_run, &j);
        clock_gettime(CLOCK_MONOTONIC, &b);
        double s = (double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec);
        double bw = (double)p->n_bytes / s;
        if (bw > best) best = bw;
    }
    return best;
}
