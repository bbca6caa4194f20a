/* cli.c — see cli.h. */
#include "coordinator/cli.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int tsr_cli_usage_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "tessera %s: ", cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nRun 'tessera %s --help' for the flags.\n", cmd);
    return TSR_CLI_EXIT_USAGE;
}

bool tsr_cli_parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return false;
    *out = v;
    return true;
}

bool tsr_cli_parse_u64(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    if (*s == '-') return false;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end) return false;
    *out = v;
    return true;
}

bool tsr_cli_parse_f32(const char *s, float *out)
{
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end || !isfinite(v)) return false;
    *out = v;
    return true;
}

bool tsr_cli_parse_bytes(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    if (*s == '-') return false;
    double v = strtod(s, &end);
    if (errno || end == s || !(v >= 0)) return false;
    double mul = 1;
    switch (*end) {
    case 'k':
    case 'K':
        mul = 1024.0;
        end++;
        break;
    case 'm':
    case 'M':
        mul = 1048576.0;
        end++;
        break;
    case 'g':
    case 'G':
        mul = 1073741824.0;
        end++;
        break;
    case 't':
    case 'T':
        mul = 1099511627776.0;
        end++;
        break;
    default:
        break;
    }
    if (mul > 1 && (!strcmp(end, "iB") || !strcmp(end, "B"))) end += strlen(end);
    if (mul == 1 && !strcmp(end, "B")) end++;
    if (*end) return false;
    double b = v * mul;
    if (b > 9.0e18) return false;
    *out = (uint64_t)b;
    return true;
}

bool tsr_cli_parse_hostport(const char *s, char *host, size_t host_cap, int32_t *port)
{
    if (!s) return false;
    const char *colon = strrchr(s, ':');
    if (!colon || colon == s) return false;
    size_t n_host = (size_t)(colon - s);
    if (s[0] == '[' && s[n_host - 1] != ']') return false;   /* "[::1" */
    if (s[0] == '[' && n_host < 3) return false;             /* "[]" */
    if (s[0] != '[' && memchr(s, ':', n_host)) return false; /* bare IPv6 needs [] */
    const char *p = colon + 1;
    size_t n_digits = strlen(p);
    if (n_digits == 0 || n_digits > 5) return false;
    int32_t v = 0;
    for (size_t i = 0; i < n_digits; i++) {
        if (p[i] < '0' || p[i] > '9') return false;
        v = v * 10 + (p[i] - '0');
    }
    if (v > 65535) return false;
    if (host && host_cap > 0) {
        size_t n = n_host < host_cap - 1 ? n_host : host_cap - 1;
        memcpy(host, s, n);
        host[n] = '\0';
    }
    if (port) *port = v;
    return true;
}

int tsr_cli_default_threads(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > 64 ? 64 : (int)n);
}
