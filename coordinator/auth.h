/*
 * auth.h — API keys for every public port: `--api-key-file` (inference) and
 * `--admin-key-file` (Admin / Cluster services, /metrics), one key per line.
 *
 * Why its own module: the gRPC server (coordinator/server.c), the HTTP front door
 * (coordinator/http.c) and later the coordinator daemon check the same keys the same way.
 * A client presents a key as `Authorization: Bearer KEY` (HTTP header, or the gRPC
 * `authorization` metadata with the same value). Keys are compared in constant time (the
 * time depends on the length of what the client sent, never on how much of a stored key
 * it matched) and never logged: messages name the file, not its content.
 *
 * Key files: one key per line; leading and trailing white space is trimmed; empty lines
 * and lines starting with '#' are skipped; a file without any key is an error (an empty
 * file would otherwise lock everyone out, or worse, be mistaken for "no auth").
 * tsr_auth_reload (SIGHUP) re-reads both files; on any error the old keys stay in force.
 *
 * Levels: an admin key may do everything; an inference key only inference. When only
 * --api-key-file is given, admin calls are refused (403 / PERMISSION_DENIED) for every
 * key: admin access must be granted explicitly. With no key file at all, everything is
 * allowed (the server then binds only to loopback unless --insecure-listen).
 *
 * Thread-safe: check and reload may run concurrently (a mutex guards the key sets).
 */
#ifndef TSR_AUTH_H
#define TSR_AUTH_H

#include <stdbool.h>
#include <stddef.h>

#define TSR_AUTH_OK            0
#define TSR_AUTH_EFILE         -1 /* a key file is missing, unreadable or has no key */
#define TSR_AUTH_ENOMEM        -2
#define TSR_AUTH_MAX_KEY_BYTES 4096
#define TSR_AUTH_MAX_KEYS      4096

typedef enum {
    TSR_AUTH_ALLOW = 0,           /* go ahead */
    TSR_AUTH_UNAUTHENTICATED = 1, /* no key, malformed header or unknown key: 401 */
    TSR_AUTH_FORBIDDEN = 2,       /* a valid key without the right: 403 */
} tsr_auth_verdict;

typedef struct tsr_auth tsr_auth;

/* Load the key files (either may be NULL). *out is NULL-safe for every other call: a NULL
 * tsr_auth allows everything. Returns 0, or TSR_AUTH_EFILE / ENOMEM with err naming the
 * file and what is wrong with it. */
int tsr_auth_new(const char *api_key_file, const char *admin_key_file, tsr_auth **out, char *err,
                 size_t err_len);
void tsr_auth_free(tsr_auth *a);

/* Re-read both files (SIGHUP). 0, or < 0 with err (the previous keys are kept). On
 * success *n_api / *n_admin (may be NULL) are the numbers of keys now in force. */
int tsr_auth_reload(tsr_auth *a, int *n_api, int *n_admin, char *err, size_t err_len);

/* Is any key file configured? (false for NULL) */
bool tsr_auth_enabled(const tsr_auth *a);

/* Decide a request: `authorization` is the Authorization header / metadata value as sent
 * (may be NULL or not NUL-terminated: len bytes), `admin` whether the call needs an admin
 * key. When the verdict is not ALLOW, why (may be NULL) gets a one-line message for the
 * client that never contains the key. */
tsr_auth_verdict tsr_auth_check(tsr_auth *a, const char *authorization, size_t len, bool admin,
                                char *why, size_t why_len);

/* Constant-time equality of a presented key against a stored one: the time depends only on
 * presented_len. */
bool tsr_auth_key_equal(const char *presented, size_t presented_len, const char *stored,
                        size_t stored_len);

/* A client's key (`tessera ctl`, `serve --join`, the coordinator calling replicas): the
 * first key of `path` (the rules of key files above; err names `flag`), else the value of
 * the environment variable env_name (may be NULL), else none. *out is the malloc'd header
 * value "Bearer KEY" to send as `authorization`, or NULL when no key was given. 0, or
 * TSR_AUTH_EFILE / ENOMEM with err (never containing the key). */
int tsr_auth_client_header(const char *flag, const char *path, const char *env_name, char **out,
                           char *err, size_t err_len);

/* The rule for servers without key files: is the host of "host:port" a loopback address
 * (127.0.0.0/8, ::1, localhost)? */
bool tsr_auth_listen_is_loopback(const char *listen);

/* The first of n addresses (NULL entries skipped) that is not loopback, or NULL: what a
 * server without keys must refuse unless --insecure-listen. */
const char *tsr_auth_open_address(const char *const *listens, size_t n);

#endif
