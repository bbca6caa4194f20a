/*
 * util.h — the helpers every module needs: filling a caller's error buffer (and returning
 * an error code with it) and reading the monotonic clock. Kept here (the bottom layer) so that no
 * module grows its own copy.
 */
#ifndef TSR_UTIL_H
#define TSR_UTIL_H

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

#endif
