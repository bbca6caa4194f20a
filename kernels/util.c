/* util.c — see util.h. */
#include "kernels/util.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <time.h>

void tsr_set_err(char *err, size_t err_len, const char *fmt, ...)
{
    if (!err || !err_len) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
}

int tsr_fail(char *err, size_t err_len, int code, const char *fmt, ...)
{
    if (err && err_len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, err_len, fmt, ap);
        va_end(ap);
    }
    return code;
}

uint64_t tsr_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static bool cpu_default(bool on_amd)
{
#if defined(__x86_64__) || defined(__i386__)
    return __builtin_cpu_is("amd") ? on_amd : !on_amd;
#else
    return !on_amd;
#endif
}

bool tsr_cpu_choice(_Atomic int *slot, const char *env, bool on_amd)
{
    int v = atomic_load_explicit(slot, memory_order_relaxed);
    if (v >= 0) return v;
    const char *e = getenv(env);
    if (e && (strcmp(e, "0") == 0 || strcmp(e, "1") == 0))
        v = e[0] == '1';
    else
        v = cpu_default(on_amd);
    atomic_store_explicit(slot, v, memory_order_relaxed);
    return v;
}

void tsr_cpu_choice_set(_Atomic int *slot, int on, bool on_amd)
{
    atomic_store_explicit(slot, on < 0 ? (int)cpu_default(on_amd) : on != 0, memory_order_relaxed);
}
