/*
 * auth.c — API key files and constant-time key checks (see auth.h for the contract).
 */
#include "coordinator/auth.h"
#include "kernels/util.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>

typedef struct {
    char **keys;
    size_t *lens;
    int n;
} key_set;

struct tsr_auth {
    char *api_path, *admin_path; /* NULL when not configured */
    pthread_mutex_t mu;
    key_set api, admin; /* under mu */
};

static void key_set_free(key_set *k)
{
    for (int i = 0; i < k->n; i++) {
        /* wipe before free: key material should not linger in freed heap memory */
        volatile char *p = k->keys[i];
        for (size_t j = 0; j < k->lens[i]; j++) p[j] = 0;
        free(k->keys[i]);
    }
    free(k->keys);
    free(k->lens);
    memset(k, 0, sizeof *k);
}

/* Read one key file into k. 0, or < 0 with err (k is left empty). */
static int key_set_load(const char *path, const char *flag, key_set *k, char *err, size_t err_len)
{
    memset(k, 0, sizeof *k);
    FILE *f = fopen(path, "r");
    if (!f) {
        tsr_set_err(err, err_len, "%s %s: cannot open: %s", flag, path, strerror(errno));
        return TSR_AUTH_EFILE;
    }
    int rc = TSR_AUTH_OK;
    char *line = NULL;
    size_t cap = 0;
    ssize_t got;
    int lineno = 0;
    while ((got = getline(&line, &cap, f)) >= 0) {
        lineno++;
        size_t b = 0, e = (size_t)got;
        while (b < e && isspace((unsigned char)line[b])) b++;
        while (e > b && isspace((unsigned char)line[e - 1])) e--;
        if (b == e || line[b] == '#') continue;
        size_t n = e - b;
        if (n > TSR_AUTH_MAX_KEY_BYTES) {
            tsr_set_err(err, err_len, "%s %s: line %d: a key is at most %d bytes", flag, path,
                        lineno, TSR_AUTH_MAX_KEY_BYTES);
            rc = TSR_AUTH_EFILE;
            goto fail;
        }
        if (k->n >= TSR_AUTH_MAX_KEYS) {
            tsr_set_err(err, err_len, "%s %s: more than %d keys", flag, path, TSR_AUTH_MAX_KEYS);
            rc = TSR_AUTH_EFILE;
            goto fail;
        }
        char **nk = realloc(k->keys, (size_t)(k->n + 1) * sizeof *nk);
        if (nk) k->keys = nk;
        size_t *nl = nk ? realloc(k->lens, (size_t)(k->n + 1) * sizeof *nl) : NULL;
        if (nl) k->lens = nl;
        char *key = nl ? malloc(n + 1) : NULL;
        if (!key) {
            tsr_set_err(err, err_len, "%s %s: out of memory", flag, path);
            rc = TSR_AUTH_ENOMEM;
            goto fail;
        }
        memcpy(key, line + b, n);
        key[n] = '\0';
        k->keys[k->n] = key;
        k->lens[k->n] = n;
        k->n++;
    }
    if (ferror(f)) {
        tsr_set_err(err, err_len, "%s %s: read error: %s", flag, path, strerror(errno));
        rc = TSR_AUTH_EFILE;
        goto fail;
    }
    if (k->n == 0) {
        tsr_set_err(err, err_len,
                    "%s %s: no key in the file (one key per line; '#' starts a comment)", flag,
                    path);
        rc = TSR_AUTH_EFILE;
        goto fail;
    }
    goto done;
fail:
    key_set_free(k);
done:
    if (line) {
        memset(line, 0, cap);
        free(line);
    }
    fclose(f);
    return rc;
}

bool tsr_auth_key_equal(const char *presented, size_t presented_len, const char *stored,
                        size_t stored_len)
{
    /* Walk the presented bytes only, against the stored key repeated: the work does not
     * depend on where (or whether) the two first differ, nor on the stored length. */
    if (stored_len == 0) return false;
    volatile uint8_t diff = (uint8_t)(presented_len != stored_len);
    size_t j = 0;
    for (size_t i = 0; i < presented_len; i++) {
        diff |= (uint8_t)((uint8_t)presented[i] ^ (uint8_t)stored[j]);
        j = (j + 1 == stored_len) ? 0 : j + 1;
    }
    return diff == 0;
}

/* Under a->mu: does any key of k match? Every key is compared (no early exit). */
static bool key_set_has(const key_set *k, const char *key, size_t len)
{
    bool found = false;
    for (int i = 0; i < k->n; i++) found |= tsr_auth_key_equal(key, len, k->keys[i], k->lens[i]);
    return found;
}

int tsr_auth_new(const char *api_key_file, const char *admin_key_file, tsr_auth **out, char *err,
                 size_t err_len)
{
    *out = NULL;
    tsr_auth *a = calloc(1, sizeof *a);
    if (!a) {
        tsr_set_err(err, err_len, "out of memory");
        return TSR_AUTH_ENOMEM;
    }
    int rc = TSR_AUTH_ENOMEM;
    if ((api_key_file && !(a->api_path = strdup(api_key_file))) ||
        (admin_key_file && !(a->admin_path = strdup(admin_key_file)))) {
        tsr_set_err(err, err_len, "out of memory");
        goto fail;
    }
    if (a->api_path &&
        (rc = key_set_load(a->api_path, "--api-key-file", &a->api, err, err_len)) != 0)
        goto fail;
    if (a->admin_path &&
        (rc = key_set_load(a->admin_path, "--admin-key-file", &a->admin, err, err_len)) != 0)
        goto fail;
    if (pthread_mutex_init(&a->mu, NULL) != 0) {
        tsr_set_err(err, err_len, "cannot create a mutex");
        rc = TSR_AUTH_ENOMEM;
        goto fail;
    }
    *out = a;
    return TSR_AUTH_OK;
fail:
    key_set_free(&a->api);
    key_set_free(&a->admin);
    free(a->api_path);
    free(a->admin_path);
    free(a);
    return rc;
}

void tsr_auth_free(tsr_auth *a)
{
    if (!a) return;
    key_set_free(&a->api);
    key_set_free(&a->admin);
    pthread_mutex_destroy(&a->mu);
    free(a->api_path);
    free(a->admin_path);
    free(a);
}

int tsr_auth_reload(tsr_auth *a, int *n_api, int *n_admin, char *err, size_t err_len)
{
    if (!a) return TSR_AUTH_OK;
    key_set api = {0}, admin = {0};
    int rc;
    if (a->api_path && (rc = key_set_load(a->api_path, "--api-key-file", &api, err, err_len)) != 0)
        return rc;
    if (a->admin_path &&
        (rc = key_set_load(a->admin_path, "--admin-key-file", &admin, err, err_len)) != 0) {
        key_set_free(&api);
        return rc;
    }
    pthread_mutex_lock(&a->mu);
    key_set old_api = a->api, old_admin = a->admin;
    a->api = api;
    a->admin = admin;
    if (n_api) *n_api = a->api.n;
    if (n_admin) *n_admin = a->admin.n;
    pthread_mutex_unlock(&a->mu);
    key_set_free(&old_api);
    key_set_free(&old_admin);
    return TSR_AUTH_OK;
}

bool tsr_auth_enabled(const tsr_auth *a)
{
    return a && (a->api_path || a->admin_path);
}

tsr_auth_verdict tsr_auth_check(tsr_auth *a, const char *authorization, size_t len, bool admin,
                                char *why, size_t why_len)
{
    if (!tsr_auth_enabled(a)) return TSR_AUTH_ALLOW;
    if (!authorization || len == 0) {
        tsr_set_err(why, why_len,
                    "missing API key: send the header 'Authorization: Bearer KEY' (gRPC: the "
                    "'authorization' metadata)");
        return TSR_AUTH_UNAUTHENTICATED;
    }
    /* "Bearer" (any case) + one or more spaces + the key */
    static const char scheme[] = "bearer";
    size_t ns = sizeof scheme - 1;
    if (len <= ns || strncasecmp(authorization, scheme, ns) != 0 ||
        (authorization[ns] != ' ' && authorization[ns] != '\t')) {
        tsr_set_err(why, why_len, "malformed Authorization value: expected 'Bearer KEY'");
        return TSR_AUTH_UNAUTHENTICATED;
    }
    const char *key = authorization + ns;
    size_t klen = len - ns;
    while (klen > 0 && (*key == ' ' || *key == '\t')) {
        key++;
        klen--;
    }
    while (klen > 0 && (key[klen - 1] == ' ' || key[klen - 1] == '\t')) klen--;
    pthread_mutex_lock(&a->mu);
    bool is_admin = key_set_has(&a->admin, key, klen);
    bool is_api = key_set_has(&a->api, key, klen);
    bool have_admin_keys = a->admin_path != NULL;
    pthread_mutex_unlock(&a->mu);
    if (!is_admin && !is_api) {
        tsr_set_err(why, why_len, "invalid API key");
        return TSR_AUTH_UNAUTHENTICATED;
    }
    if (admin && !is_admin) {
        tsr_set_err(why, why_len,
                    have_admin_keys
                        ? "this key is not an admin key: admin services and /metrics need a "
                          "key from --admin-key-file"
                        : "admin services and /metrics are disabled: the server has "
                          "--api-key-file but no --admin-key-file");
        return TSR_AUTH_FORBIDDEN;
    }
    if (!admin && !is_api && !is_admin) return TSR_AUTH_UNAUTHENTICATED;
    return TSR_AUTH_ALLOW;
}

int tsr_auth_client_header(const char *flag, const char *path, const char *env_name, char **out,
                           char *err, size_t err_len)
{
    *out = NULL;
    const char *key = NULL;
    size_t n = 0;
    key_set k;
    memset(&k, 0, sizeof k);
    if (path) {
        int rc = key_set_load(path, flag, &k, err, err_len);
        if (rc != 0) return rc;
        key = k.keys[0];
        n = k.lens[0];
    } else if (env_name && getenv(env_name) && getenv(env_name)[0]) {
        key = getenv(env_name);
        while (*key && isspace((unsigned char)*key)) key++;
        n = strlen(key);
        while (n > 0 && isspace((unsigned char)key[n - 1])) n--;
        if (n == 0 || n > TSR_AUTH_MAX_KEY_BYTES || memchr(key, '\n', n)) {
            tsr_set_err(err, err_len, "$%s: not a key (one line of 1..%d bytes)", env_name,
                        TSR_AUTH_MAX_KEY_BYTES);
            return TSR_AUTH_EFILE;
        }
    } else {
        return TSR_AUTH_OK;
    }
    char *h = malloc(n + 8);
    if (!h) {
        key_set_free(&k);
        tsr_set_err(err, err_len, "out of memory");
        return TSR_AUTH_ENOMEM;
    }
    memcpy(h, "Bearer ", 7);
    memcpy(h + 7, key, n);
    h[n + 7] = '\0';
    key_set_free(&k);
    *out = h;
    return TSR_AUTH_OK;
}

bool tsr_auth_listen_is_loopback(const char *listen)
{
    char host[256];
    const char *colon = strrchr(listen, ':');
    size_t n = colon ? (size_t)(colon - listen) : strlen(listen);
    if (n >= sizeof host) return false;
    memcpy(host, listen, n);
    host[n] = '\0';
    if (n >= 2 && host[0] == '[' && host[n - 1] == ']') {
        memmove(host, host + 1, n - 2);
        host[n - 2] = '\0';
    }
    if (!strcmp(host, "localhost")) return true;
    struct in_addr a4;
    struct in6_addr a6;
    if (inet_pton(AF_INET, host, &a4) == 1) return (ntohl(a4.s_addr) >> 24) == 127;
    if (inet_pton(AF_INET6, host, &a6) == 1) return IN6_IS_ADDR_LOOPBACK(&a6);
    return false;
}

const char *tsr_auth_open_address(const char *const *listens, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (listens[i] && !tsr_auth_listen_is_loopback(listens[i])) return listens[i];
    return NULL;
}
