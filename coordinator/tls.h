/*
 * tls.h — TLS material of every port and every client: PEM files read and checked once,
 * turned into gRPC core credentials (server and channel) and handed as PEM text to the HTTP
 * front door (coordinator/http.h, GnuTLS).
 *
 * Why its own module: `tessera serve` (gRPC + HTTPS), `tessera coordinator` (its gRPC
 * port, its HTTP port, and its calls to replicas), `serve --join` (heartbeats to a TLS
 * coordinator) and `tessera ctl` all read the same kind of files the same way, and every
 * one must refuse a bad file at start with a message naming the flag and the file.
 *
 * Server side: a certificate chain and its unencrypted key (both PEM), optionally a client
 * CA that makes it mutual TLS (clients must present a certificate signed by it). Client
 * side: the CA that signs the server's certificate, optionally a client certificate and
 * key (for a server that asks for one). Everything is held as malloc'd PEM text.
 *
 * Status codes: 0 ok, negative TSR_TLS_E* with a message in err.
 */
#ifndef TSR_TLS_H
#define TSR_TLS_H

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>

#include <stdbool.h>
#include <stddef.h>

#define TSR_TLS_OK     0
#define TSR_TLS_EINVAL -1 /* a file is missing, unreadable, not PEM, or the pair mismatches */
#define TSR_TLS_ENOMEM -2

/* A server's TLS material (all NULL: plaintext). */
typedef struct {
    char *cert_pem, *key_pem; /* both or neither */
    char *client_ca_pem;      /* NULL: no client certificate asked for */
} tsr_tls_server;

/* A client's TLS material (ca_pem NULL: plaintext). */
typedef struct {
    char *ca_pem;             /* verify the server's certificate with this CA */
    char *cert_pem, *key_pem; /* client certificate for mutual TLS, both or neither */
} tsr_tls_client;

/* Read a whole PEM file (at most 1 MiB, must hold a '-----BEGIN' line); *out malloc'd and
 * NUL-terminated. err names `flag` and the path. */
int tsr_tls_read_pem(const char *flag, const char *path, char **out, char *err, size_t err_len);

/* Check a server's material: the chain and key parse and belong together (GnuTLS), the
 * client CA (may be NULL) holds a certificate. `flags` names the flags in messages, e.g.
 * "--tls-cert / --tls-key". */
int tsr_tls_check_pair(const char *cert_pem, const char *key_pem, const char *ca_pem,
                       const char *flags, const char *ca_flag, char *err, size_t err_len);

/* Load a server's files (cert_path and key_path both or neither; ca_path needs them). The
 * flag names of messages are `prefix` + "cert" / "key" / "client-ca" (prefix "--tls-").
 * On error *t is left empty. */
int tsr_tls_server_load(const char *prefix, const char *cert_path, const char *key_path,
                        const char *ca_path, tsr_tls_server *t, char *err, size_t err_len);
void tsr_tls_server_free(tsr_tls_server *t); /* frees the strings, leaves *t empty */
bool tsr_tls_server_enabled(const tsr_tls_server *t);

/* gRPC server credentials: SSL (mutual when client_ca_pem is set) or insecure for an empty
 * t (NULL ok). NULL on failure. Release with grpc_server_credentials_release. */
grpc_server_credentials *tsr_tls_grpc_server_credentials(const tsr_tls_server *t);

/* Load a client's files: ca_path (NULL: plaintext), cert_path and key_path (both or
 * neither; they need ca_path). Flag names are `prefix` + "ca" / "cert" / "key". */
int tsr_tls_client_load(const char *prefix, const char *ca_path, const char *cert_path,
                        const char *key_path, tsr_tls_client *t, char *err, size_t err_len);
void tsr_tls_client_free(tsr_tls_client *t);
bool tsr_tls_client_enabled(const tsr_tls_client *t);

/* gRPC channel credentials: SSL for a client with a CA, insecure otherwise (t may be
 * NULL). NULL on failure. Release with grpc_channel_credentials_release. */
grpc_channel_credentials *tsr_tls_grpc_channel_credentials(const tsr_tls_client *t);

#endif
