/*
 * util.h — the helpers every module needs: filling a caller's error buffer (and returning
 * an error code with it), reading the monotonic clock, and splitmix64 (the generator and
 * its finalizer: batch seeds, mkmodel's weights, the sampler's counter-based RNG, the
 * prefix cache's block hash), and the per-CPU-vendor kernel choices. Kept here (the bottom
 * layer) so that no module grows its own copy.
 */
#ifndef TSR_UTIL_H
#define TSR_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* printf into err[err_len] (NUL-terminated, truncated); a NULL or empty buffer is fine. */
void tsr_set_err(char *err, size_t err_len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* tsr_set_err, then returns code: `return tsr_fail(err, err_len, -1, "what: %s", why);`. */
int tsr_fail(char *err, size_t err_len, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* CLOCK_MONOTONIC in nanoseconds. */
uint64_t tsr_now_ns(void);

/* A kernel choice made per CPU vendor, as measured (two forms of a kernel with the same
 * outputs: which streams or computes faster differs between AMD and Intel cores). *slot holds
 * it: -1 not made yet, 0 off, 1 on; it starts at -1. tsr_cpu_choice returns it, making it on
 * first use from the environment variable env ("0" or "1") or else the CPU's default: on_amd
 * on AMD CPUs, !on_amd on the others. tsr_cpu_choice_set sets it to on (0 / 1), or back to the
 * CPU's default (on < 0, ignoring env): for tests and benchmarks. */
bool tsr_cpu_choice(_Atomic int *slot, const char *env, bool on_amd);
void tsr_cpu_choice_set(_Atomic int *slot, int on, bool on_amd);

/* splitmix64's finalizer (Steele, Lea & Flood): a bijection of 64-bit integers in which
 * every input bit reaches every output bit; pure integer operations, identical on every
 * platform (hashes and seeds derived with it are stable). */
static inline uint64_t tsr_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* splitmix64: advances the state *x by the golden-ratio increment and returns the mixed
 * value (a full-period 64-bit generator, and the usual seeder of larger ones). */
static inline uint64_t tsr_splitmix64(uint64_t *x)
{
    return tsr_mix64(*x += 0x9e3779b97f4a7c15ull);
}

#endif
