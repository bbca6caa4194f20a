/*
 * tls.c — TLS material read, checked (GnuTLS) and turned into gRPC credentials (see tls.h).
 */
#include "coordinator/tls.h"
#include "kernels/util.h"

#include <gnutls/gnutls.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PEM_BYTES (1u << 20)

int tsr_tls_read_pem(const char *flag, const char *path, char **out, char *err, size_t err_len)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) {
        tsr_set_err(err, err_len, "%s %s: cannot open: %s", flag, path, strerror(errno));
        return TSR_TLS_EINVAL;
    }
    char *buf = NULL;
    size_t n = 0;
    int rc = TSR_TLS_OK;
    for (;;) {
        char *nb = realloc(buf, n + 4097);
        if (!nb) {
            tsr_set_err(err, err_len, "%s %s: out of memory", flag, path);
            rc = TSR_TLS_ENOMEM;
            goto done;
        }
        buf = nb;
        size_t got = fread(buf + n, 1, 4096, f);
        n += got;
        if (got < 4096) break;
        if (n > MAX_PEM_BYTES) {
            tsr_set_err(err, err_len, "%s %s: larger than 1 MiB: not a PEM file", flag, path);
            rc = TSR_TLS_EINVAL;
            goto done;
        }
    }
    if (ferror(f)) {
        tsr_set_err(err, err_len, "%s %s: read error: %s", flag, path, strerror(errno));
        rc = TSR_TLS_EINVAL;
        goto done;
    }
    buf[n] = '\0';
    if (!strstr(buf, "-----BEGIN ")) {
        tsr_set_err(err, err_len, "%s %s: not a PEM file (no '-----BEGIN' line)", flag, path);
        rc = TSR_TLS_EINVAL;
        goto done;
    }
    *out = buf;
    buf = NULL;
done:
    free(buf);
    fclose(f);
    return rc;
}

int tsr_tls_check_pair(const char *cert_pem, const char *key_pem, const char *ca_pem,
                       const char *flags, const char *ca_flag, char *err, size_t err_len)
{
    gnutls_certificate_credentials_t cred;
    if (gnutls_certificate_allocate_credentials(&cred) != GNUTLS_E_SUCCESS) {
        tsr_set_err(err, err_len, "out of memory checking the TLS files");
        return TSR_TLS_ENOMEM;
    }
    int rc = TSR_TLS_OK;
    if (cert_pem && key_pem) {
        gnutls_datum_t c = {(unsigned char *)cert_pem, (unsigned)strlen(cert_pem)};
        gnutls_datum_t k = {(unsigned char *)key_pem, (unsigned)strlen(key_pem)};
        int g = gnutls_certificate_set_x509_key_mem(cred, &c, &k, GNUTLS_X509_FMT_PEM);
        if (g < 0) {
            tsr_set_err(err, err_len,
                        "%s: %s (both PEM; the key unencrypted and matching the certificate)",
                        flags, gnutls_strerror(g));
            rc = TSR_TLS_EINVAL;
            goto done;
        }
    }
    if (ca_pem) {
        gnutls_datum_t a = {(unsigned char *)ca_pem, (unsigned)strlen(ca_pem)};
        int g = gnutls_certificate_set_x509_trust_mem(cred, &a, GNUTLS_X509_FMT_PEM);
        if (g <= 0) {
            tsr_set_err(err, err_len, "%s: %s", ca_flag,
                        g < 0 ? gnutls_strerror(g) : "no certificate in the file");
            rc = TSR_TLS_EINVAL;
        }
    }
done:
    gnutls_certificate_free_credentials(cred);
    return rc;
}

static void name3(char *out, size_t cap, const char *prefix, const char *what)
{
    snprintf(out, cap, "%s%s", prefix, what);
}

int tsr_tls_server_load(const char *prefix, const char *cert_path, const char *key_path,
                        const char *ca_path, tsr_tls_server *t, char *err, size_t err_len)
{
    memset(t, 0, sizeof *t);
    char f_cert[64], f_key[64], f_ca[64], pair[160];
    name3(f_cert, sizeof f_cert, prefix, "cert");
    name3(f_key, sizeof f_key, prefix, "key");
    name3(f_ca, sizeof f_ca, prefix, "client-ca");
    snprintf(pair, sizeof pair, "%s / %s", f_cert, f_key);
    if ((cert_path != NULL) != (key_path != NULL)) {
        tsr_set_err(err, err_len, "%s and %s go together", f_cert, f_key);
        return TSR_TLS_EINVAL;
    }
    if (ca_path && !cert_path) {
        tsr_set_err(err, err_len, "%s needs %s and %s", f_ca, f_cert, f_key);
        return TSR_TLS_EINVAL;
    }
    if (!cert_path) return TSR_TLS_OK;
    int rc = tsr_tls_read_pem(f_cert, cert_path, &t->cert_pem, err, err_len);
    if (rc == 0) rc = tsr_tls_read_pem(f_key, key_path, &t->key_pem, err, err_len);
    if (rc == 0 && ca_path) rc = tsr_tls_read_pem(f_ca, ca_path, &t->client_ca_pem, err, err_len);
    if (rc == 0)
        rc =
            tsr_tls_check_pair(t->cert_pem, t->key_pem, t->client_ca_pem, pair, f_ca, err, err_len);
    if (rc != 0) tsr_tls_server_free(t);
    return rc;
}

void tsr_tls_server_free(tsr_tls_server *t)
{
    if (!t) return;
    free(t->cert_pem);
    free(t->key_pem);
    free(t->client_ca_pem);
    memset(t, 0, sizeof *t);
}

bool tsr_tls_server_enabled(const tsr_tls_server *t)
{
    return t && t->cert_pem && t->key_pem;
}

grpc_server_credentials *tsr_tls_grpc_server_credentials(const tsr_tls_server *t)
{
    if (!tsr_tls_server_enabled(t)) return grpc_insecure_server_credentials_create();
    grpc_ssl_pem_key_cert_pair pair = {t->key_pem, t->cert_pem};
    return grpc_ssl_server_credentials_create_ex(
        t->client_ca_pem, &pair, 1,
        t->client_ca_pem ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                         : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
        NULL);
}

int tsr_tls_client_load(const char *prefix, const char *ca_path, const char *cert_path,
                        const char *key_path, tsr_tls_client *t, char *err, size_t err_len)
{
    memset(t, 0, sizeof *t);
    char f_cert[64], f_key[64], f_ca[64], pair[160];
    name3(f_cert, sizeof f_cert, prefix, "cert");
    name3(f_key, sizeof f_key, prefix, "key");
    name3(f_ca, sizeof f_ca, prefix, "ca");
    snprintf(pair, sizeof pair, "%s / %s", f_cert, f_key);
    if ((cert_path != NULL) != (key_path != NULL)) {
        tsr_set_err(err, err_len, "%s and %s go together", f_cert, f_key);
        return TSR_TLS_EINVAL;
    }
    if (cert_path && !ca_path) {
        tsr_set_err(err, err_len,
                    "%s / %s (a client certificate) need %s (the CA of the server's certificate)",
                    f_cert, f_key, f_ca);
        return TSR_TLS_EINVAL;
    }
    if (!ca_path) return TSR_TLS_OK;
    int rc = tsr_tls_read_pem(f_ca, ca_path, &t->ca_pem, err, err_len);
    if (rc == 0 && cert_path) rc = tsr_tls_read_pem(f_cert, cert_path, &t->cert_pem, err, err_len);
    if (rc == 0 && key_path) rc = tsr_tls_read_pem(f_key, key_path, &t->key_pem, err, err_len);
    if (rc == 0)
        rc = tsr_tls_check_pair(t->cert_pem, t->key_pem, t->ca_pem, pair, f_ca, err, err_len);
    if (rc != 0) tsr_tls_client_free(t);
    return rc;
}

void tsr_tls_client_free(tsr_tls_client *t)
{
    if (!t) return;
    free(t->ca_pem);
    free(t->cert_pem);
    free(t->key_pem);
    memset(t, 0, sizeof *t);
}

bool tsr_tls_client_enabled(const tsr_tls_client *t)
{
    return t && t->ca_pem;
}

grpc_channel_credentials *tsr_tls_grpc_channel_credentials(const tsr_tls_client *t)
{
    if (!tsr_tls_client_enabled(t)) return grpc_insecure_credentials_create();
    grpc_ssl_pem_key_cert_pair pair = {t->key_pem, t->cert_pem};
    return grpc_ssl_credentials_create(t->ca_pem, t->cert_pem ? &pair : NULL, NULL, NULL);
}
