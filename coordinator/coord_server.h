/*
 * coord_server.h — the coordinator's gRPC front: tessera.v1.Inference (Generate, Tokenize,
 * ModelInfo) proxied to the replicas with failover, tessera.v1.Cluster (the registry's
 * admin and the replicas' heartbeats) and grpc.health.v1.Health.
 *
 * Threads: one completion-queue thread accepts calls and completes every batch (client
 * side and server side; it only flips flags and signals); each call then runs on a thread
 * of its own, which reads the request, picks a replica (coord.h), relays the replica's
 * stream message by message (at most one send in flight, so a slow client slows its own
 * replica call and nothing else) and waits on its own condition variable with a 100 ms
 * tick, checking the client (cancelled / deadline), its replica (went DOWN) and shutdown.
 *
 * Failover of a Generate (the replica's stream breaks, its replica goes DOWN, or it
 * answers UNAVAILABLE / INTERNAL / ...): before any token, the request is sent again to
 * another replica; mid-stream, it is resumed on another replica with prompt_ids = the
 * prompt's ids + the ids already streamed, resumed_tokens = their count and max_tokens =
 * the budget left, so the client's stream continues exactly (greedy: exact arithmetic;
 * seeded sampling: the sampler's (seed, position) RNG — the coordinator gives every
 * sampled request without a seed one, so this holds for them too). The final usage
 * carries `failovers`. When the last token streamed already ended the request (an
 * end-of-generation token, a stop token id, max_tokens) and only the finish was lost with
 * the replica, the coordinator sends that finish itself. Only when no replica of the model can take
 * it (after waiting up to 10 s, within the client's deadline, for one to come back) does the client
 * get UNAVAILABLE, with each replica's reason. A replica's RESOURCE_EXHAUSTED moves the request to
 * another replica (not a failover); when all are full the client gets it.
 *
 * Status codes: 0 ok, negative with a message in err.
 */
#ifndef TSR_COORD_SERVER_H
#define TSR_COORD_SERVER_H

#include <stdint.h>

#include "coordinator/auth.h"
#include "coordinator/coord.h"
#include "coordinator/http.h"
#include "coordinator/metrics.h"
#include "coordinator/tls.h"

#define TSR_COORD_DEFAULT_LISTEN "127.0.0.1:50050"

typedef struct tsr_coord_server tsr_coord_server;

typedef struct {
    const char *listen; /* "host:port" (port 0: ephemeral); NULL: TSR_COORD_DEFAULT_LISTEN */
    /* Keys (auth.h; borrowed, NULL: none): every call but Health needs `authorization:
     * Bearer KEY` (UNAUTHENTICATED otherwise, before the request is read); the Cluster
     * service (ctl, replica heartbeats) an admin key (PERMISSION_DENIED for an inference
     * key). */
    tsr_auth *auth;
    /* TLS on the port (tls.h; read during start only; NULL or empty: plaintext). */
    const tsr_tls_server *tls;
    /* "Bearer KEY" sent as `authorization` on every call to a replica (copied; NULL:
     * none). A replica refusing it (UNAUTHENTICATED / PERMISSION_DENIED) counts as that
     * replica's failure: the request goes to another one. */
    const char *replica_authorization;
} tsr_coord_server_params;

/* grpc_init, bind p->listen (SO_REUSEPORT off), start the CQ thread. The registry is
 * borrowed (free it after tsr_coord_server_shutdown). *bound_port: the port bound. */
int tsr_coord_server_start(const tsr_coord_server_params *p, tsr_coord *coord,
                           tsr_coord_server **out, int *bound_port, char *err, size_t err_len);

/* The backend of an HTTP front door (http.h, tsr_http_start_backend) over this server:
 * /v1/completions and /v1/chat/completions proxied with the routing, failover and resume of
 * Generate (chat messages are forwarded, the replica renders its own template); /v1/models
 * lists every model of the cluster; /health is SERVING while some replica is up; /metrics
 * has the requests observed by m (borrowed, may be NULL; HTTP requests and, from this call
 * on, gRPC Generate calls too: counters and the TTFT / inter-token / end-to-end histograms
 * as the coordinator sees them), tessera_failovers_total and per-replica families (labels
 * replica, model). Shut the HTTP server down before this one. */
void tsr_coord_server_http_backend(tsr_coord_server *s, tsr_metrics *m, tsr_http_backend *out);

/* Stop accepting calls, let open ones finish for up to grace_ms, cancel the rest, wait for
 * every call thread (bounded), destroy the server, grpc_shutdown. 0, or negative when
 * calls were still held past the bound (the server is then leaked, not freed). */
int tsr_coord_server_shutdown(tsr_coord_server *s, int64_t grace_ms, char *err, size_t err_len);

/* `tessera coordinator` (coord_main.c) and `tessera ctl` (ctl.c): subcommands, argv[0]
 * is the command name. Return the process exit status: 0, 1 runtime error, 2 usage. */
int tsr_cmd_coordinator(int argc, char **argv);
int tsr_cmd_ctl(int argc, char **argv);

#endif
