/*
 * membw.h — measure the machine's memory read bandwidth, for decode rooflines.
 *
 * Decode of one token reads every weight once, so its speed limit is
 * bandwidth / bytes-per-token. This measures that bandwidth the way the decode loop
 * reads (all pool threads streaming disjoint slices of a buffer far larger than the
 * caches), so "ratio to roofline" compares like with like. The buffer sits on 2 MiB
 * pages advised for transparent huge pages, as the repacked / copied weights do
 * (worker/model_repack.c); where THP is off both fall back to 4 KiB pages alike.
 * The figure is the fastest of two read loops (membw.c): how a loop issues its loads moves
 * a core's read rate by a fifth here, and a roofline must be the best read measured, not
 * one loop's, or decode's fraction of it reads high.
 */
#ifndef TSR_MEMBW_H
#define TSR_MEMBW_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/pool.h"

/* A probe buffer (>= 256 MiB is advisable) kept for repeated measures: on a shared host the
 * bandwidth a core gets drifts over seconds (other tenants' traffic), so a benchmark reads it
 * right beside each timed repetition and compares each repetition with its own bandwidth, not one
 * figure taken at another moment (tessera bench). The buffer (n_bytes rounded up to 2 MiB, advised
 * for huge pages, every page faulted in) is owned by the probe. tsr_membw_probe_new returns NULL on
 * allocation failure; tsr_membw_probe_read returns the best of `reps` repetitions, each timing each
 * read loop once, in bytes/s; tsr_membw_probe_free(NULL) does nothing. */
typedef struct tsr_membw_probe tsr_membw_probe;
tsr_membw_probe *tsr_membw_probe_new(size_t n_bytes);
double tsr_membw_probe_read(tsr_membw_probe *probe, tsr_pool *pool, int reps);
void tsr_membw_probe_free(tsr_membw_probe *probe);
/* The probe's buffer size in bytes (all of it resident while the probe lives). */
size_t tsr_membw_probe_bytes(const tsr_membw_probe *probe);

/* How many read loops tsr_membw_read_slice offers. */
enum { TSR_MEMBW_LOOPS = 2 };

/* One thread's read of n_bytes at buf (any alignment; a tail of n_bytes % 128 may go unread) with
 * read loop `loop` (0 .. TSR_MEMBW_LOOPS - 1: four independent 32-byte chains; one 64-byte line an
 * iteration with a prefetch 8 KiB ahead; both the same scalar loop without AVX2). Returns a fold of
 * the bytes, so that the read is not elided. The loops of tsr_membw_probe_read, for benchmarks that
 * time a plain read of their own buffers beside a kernel: take the faster loop, as it does.
 */
uint64_t tsr_membw_read_slice(const void *buf, size_t n_bytes, int loop);

#endif
