/*
 * join.h — a replica's membership in a cluster: `tessera serve --join COORDINATOR`.
 *
 * Why: the coordinator (coord.h) routes only to replicas it hears from. A replica that
 * joins runs one thread that sends tessera.v1.Cluster/Heartbeat to the coordinator every
 * heartbeat interval (the coordinator says how often; 500 ms by default) with its identity
 * (name, address, model, tp × pp) and its load from the engine (running, queued, KV blocks,
 * tokens/s, healthy). Every heartbeat carries the whole identity, so a coordinator that
 * restarted learns the replica again from the next one (within one interval): there is no
 * separate registration to lose. A coordinator that is away costs one failed call per
 * interval (each call has a 1 s deadline) and a log line when contact is lost or regained.
 * When the coordinator answers `removed` (an operator ran `ctl remove`), the thread stops
 * heartbeating and logs it; the replica keeps serving whoever calls it directly.
 *
 * Status codes: 0 ok, negative with a message in err.
 */
#ifndef TSR_JOIN_H
#define TSR_JOIN_H

#include <stdint.h>

#include "coordinator/engine.h"
#include "coordinator/tls.h"

#include <stdbool.h>

typedef struct {
    const char *coordinator; /* host:port */
    const char *name;        /* unique in the cluster */
    const char *address;     /* host:port the coordinator dials for Inference */
    const char *model;       /* the model name requests route by */
    int32_t tp, pp;
    int32_t max_queue;
    int32_t context_length;
    bool serves_tls; /* heartbeat `tls`: the coordinator must dial `address` with TLS */
    /* To reach a coordinator with keys / TLS: "Bearer KEY" sent as `authorization` (an
     * admin key of the coordinator; copied; NULL: none) and its CA (+ client certificate;
     * borrowed during start only; NULL or without CA: plaintext). */
    const char *authorization;
    const tsr_tls_client *tls;
} tsr_join_params;

typedef struct tsr_join tsr_join;

/* Start the heartbeat thread (strings are copied; the engine is borrowed and must outlive
 * tsr_join_stop). The first heartbeat goes out at once. 0, or negative with err. */
int tsr_join_start(const tsr_join_params *p, tsr_engine *engine, tsr_join **out, char *err,
                   size_t err_len);

/* Stop heartbeating (bounded: at most one call deadline) and free. NULL is a no-op. */
void tsr_join_stop(tsr_join *j);

#endif
