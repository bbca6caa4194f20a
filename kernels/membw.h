/*
 * membw.h — measure the machine's memory read bandwidth, for decode rooflines.
 *
 * Decode of one token reads every weight once, so its speed limit is
 * bandwidth / bytes-per-token. This measures that bandwidth the way the decode loop
 * reads (all pool threads streaming disjoint slices of a buffer far larger than the
 * caches), so "ratio to roofline" compares like with like. The buffer sits on 2 MiB
 * pages advised for transparent huge pages, as the repacked / copied weights do
 * (worker/model_repack.c); where THP is off both fall back to 4 KiB pages alike.
 */
#ifndef TSR_MEMBW_H
#define TSR_MEMBW_H

#include <stddef.h>

#include "kernels/pool.h"

/* Best-of-`reps` read bandwidth in bytes/s over a buffer of n_bytes (>= 256 MiB is
 * advisable). Returns 0 on allocation failure. */
double tsr_membw_read(tsr_pool *pool, size_t n_bytes, int reps);

#endif
