/*
 * cli.h — what every `tessera` subcommand needs to read its flags: number parsing that
 * rejects garbage, the usage-error convention (a message, a pointer to --help, exit
 * status 2) and the default thread count. Shared by coordinator/main.c and serve.c.
 */
#ifndef TSR_CLI_H
#define TSR_CLI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TSR_CLI_EXIT_USAGE 2

/* Prints "tessera CMD: <message>" and "Run 'tessera CMD --help' for the flags." on stderr;
 * returns TSR_CLI_EXIT_USAGE for the caller to return from main. */
int tsr_cli_usage_error(const char *cmd, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Whole strings only: trailing characters, overflow or an out-of-range value give false. */
bool tsr_cli_parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out);
bool tsr_cli_parse_u64(const char *s, uint64_t *out); /* no sign */
bool tsr_cli_parse_f32(const char *s, float *out);    /* finite */
/* "123", "64K", "512M", "2G", "2GiB", "1.5G" -> bytes (K, M, G, T = 1024^n). */
bool tsr_cli_parse_bytes(const char *s, uint64_t *out);

/* A network address "HOST:PORT" (IPv6: "[::1]:PORT"): a non-empty host, then a port of
 * 1..5 decimal digits in 0..65535 (0: the system picks a free port); nothing else ("", ":1",
 * "h:", "h:65537", "h:+1", "h:1x" are false). When host is not NULL it receives the host
 * part (brackets kept, truncated to host_cap - 1 bytes); *port the port. Every command
 * that takes an address (--listen, ...) parses it with this. */
bool tsr_cli_parse_hostport(const char *s, char *host, size_t host_cap, int32_t *port);

/* Online cores, clamped to 1..64. */
int tsr_cli_default_threads(void);

#endif
