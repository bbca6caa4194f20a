/*
 * rpc.h — blocking gRPC client calls over the gRPC core C API, for the small clients of the
 * cluster: a replica's heartbeat (join.h), the coordinator's unary proxies, `tessera ctl`.
 *
 * Why: the core API has no synchronous client; every call here runs on its own pluck
 * completion queue, so any thread may make calls at once, and every wait is bounded by the
 * call's deadline (a dead or hung peer becomes DEADLINE_EXCEEDED or UNAVAILABLE, never a
 * hang). Messages are raw protobuf bytes: the caller packs and unpacks with protobuf-c.
 *
 * grpc_init() must have been called (each function here is safe after it).
 */
#ifndef TSR_RPC_H
#define TSR_RPC_H

#include "coordinator/tls.h"

#include <grpc/grpc.h>
#include <protobuf-c/protobuf-c.h>

#include <stddef.h>
#include <stdint.h>

/* A channel to "host:port" over TLS when tls has a CA (tls.h; with its client certificate
 * for mutual TLS), plaintext otherwise (tls may be NULL). NULL on failure. Release with
 * grpc_channel_destroy. */
grpc_channel *tsr_rpc_channel_tls(const char *target, const tsr_tls_client *tls);

/* One unary call: send `req` to `method` ("/tessera.v1.Cluster/Heartbeat") with a deadline
 * of timeout_ms from now, with the `authorization` metadata set to `authorization` ("Bearer
 * KEY", see auth.h tsr_auth_client_header; NULL: none). Returns the gRPC status code
 * (GRPC_STATUS_OK = 0): on OK *resp holds the reply bytes (malloc'd, *resp_len bytes; free
 * it); otherwise details gets the status message (or what failed locally, e.g. "cannot pack
 * the request"). */
int tsr_rpc_unary_auth(grpc_channel *ch, const char *authorization, const char *method,
                       const ProtobufCMessage *req, int64_t timeout_ms, uint8_t **resp,
                       size_t *resp_len, char *details, size_t details_len);

/* The name of a status code ("UNAVAILABLE"). */
const char *tsr_rpc_code_name(int code);

#endif
