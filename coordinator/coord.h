/*
 * coord.h — the coordinator's registry of replicas and its router.
 *
 * Why a module of its own: it is the coordinator's state, free of any transport. The gRPC
 * front (coord_server.c) and, later, other front doors (HTTP) ask it where a request
 * goes and tell it when a replica misbehaved; replicas feed it through heartbeats
 * (join.h); the supervisor of launched replicas (coord_main.c) tells it what it started.
 *
 * A replica is known by its name. Heartbeats carry the whole identity (address, model,
 * tp × pp) and the load (running, queued, KV blocks, tokens/s, healthy), so a heartbeat
 * from an unknown name registers it: a coordinator that restarted has its cluster back
 * after one heartbeat interval. States:
 *   UP        heard within down_after_ms, healthy: gets requests;
 *   DRAINING  an operator drained it: no new requests, running ones finish (the mark
 *             survives the replica going down and coming back, until undrained);
 *   DOWN      no heartbeat for down_after_ms (3 s), unhealthy, or reported failed by a
 *             request (tsr_coord_report_failure): no requests until a healthy heartbeat
 *             arrives after that;
 *   STARTING  launched by the coordinator, not heard from yet.
 * A replica that goes DOWN gets a new generation when it comes back, so a request that
 * excluded the old incarnation may use the new one.
 *
 * Routing (tsr_coord_pick): among the UP replicas of the model not excluded by the
 * request, the one with the least outstanding work: the tokens of the requests the
 * coordinator has on it (prompt + budget left), plus what it reported queued, plus its KV
 * pressure (used / total × 1024 tokens); ties go to the one picked least recently. A pick
 * is a lease: it holds the replica's channel until tsr_coord_release, and
 * tsr_coord_lease_down says when the replica went DOWN meanwhile (the caller then cancels
 * its call and fails over).
 *
 * Thread-safe throughout (one mutex). Status codes: 0 ok, negative TSR_COORD_E* with a
 * message in err.
 */
#ifndef TSR_COORD_H
#define TSR_COORD_H

#include "coordinator/tls.h"

#include <grpc/grpc.h>

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TSR_COORD_ENOTFOUND -1 /* no replica of that name */
/* ENOMODEL: no replica serves that model (err names the served ones); within down_after_ms
 * of the coordinator's start tsr_coord_pick answers ENOREPLICA instead (its replicas may
 * still be rejoining after a restart). */
#define TSR_COORD_ENOMODEL   -2
#define TSR_COORD_ENOREPLICA -3 /* the model is known but no replica of it can take it now */
#define TSR_COORD_EEXIST     -4 /* the name is taken by another live replica */
#define TSR_COORD_ENOMEM     -5
#define TSR_COORD_EINVAL     -6

typedef enum {
    TSR_REPLICA_UP = 1,
    TSR_REPLICA_DRAINING = 2,
    TSR_REPLICA_DOWN = 3,
    TSR_REPLICA_STARTING = 4,
} tsr_replica_state;

const char *tsr_replica_state_name(tsr_replica_state s); /* "up", "draining", ... */

/* A replica as reported (heartbeat) and as the coordinator sees it (list). */
typedef struct {
    char name[128];
    char address[256];
    char model[128];
    int32_t tp, pp;
    int32_t requests_running, requests_queued;
    int32_t kv_blocks_used, kv_blocks_total;
    double tokens_per_second;
    bool healthy, draining; /* heartbeat: the replica's own view */
    int32_t max_queue, context_length;
    bool tls; /* the replica serves TLS (its channel uses tsr_coord_params.replica_tls) */
    /* list only */
    tsr_replica_state state;
    double last_heartbeat_ms_ago; /* -1: never */
    int32_t outstanding;
    int64_t outstanding_tokens;
    bool launched;
    int32_t restarts;
    char reason[256]; /* why DOWN */
    uint64_t requests_routed;
} tsr_replica_info;

typedef struct {
    int64_t down_after_ms;         /* default 3000 */
    int32_t heartbeat_interval_ms; /* told to replicas; default 500 */
    /* How to dial replicas that serve TLS (heartbeat `tls`): their CA and the coordinator's
     * client certificate (borrowed, must outlive the registry; NULL or without a CA: a TLS
     * replica is refused at its heartbeat, naming --replica-tls-ca). Plaintext replicas
     * are dialled in plaintext either way. */
    const tsr_tls_client *replica_tls;
} tsr_coord_params;

typedef struct tsr_coord tsr_coord;

int tsr_coord_new(const tsr_coord_params *p, tsr_coord **out, char *err, size_t err_len);
/* Every lease must have been released. grpc_init must still be in effect (channels). */
void tsr_coord_free(tsr_coord *c);

/* A heartbeat (identity + load). Registers an unknown name; a known one updates (a new
 * address replaces the channel). *removed: the operator removed this name (the replica
 * should stop heartbeating). EEXIST when another address holds the name and is still UP. */
int tsr_coord_heartbeat(tsr_coord *c, const tsr_replica_info *hb, bool *removed, char *err,
                        size_t err_len);

/* The launcher's view of a replica it runs (--cluster): STARTING until its first heartbeat;
 * tsr_coord_launched_exit marks it DOWN with the reason (its process exited) and counts a
 * restart. */
int tsr_coord_add_launched(tsr_coord *c, const char *name, const char *model, int32_t tp,
                           int32_t pp, char *err, size_t err_len);
void tsr_coord_launched_exit(tsr_coord *c, const char *name, const char *reason);
/* True when an operator removed a launched replica (the launcher stops it for good). */
bool tsr_coord_is_removed(tsr_coord *c, const char *name);

/* Operator actions; *info (may be NULL) gets the replica after the change. ENOTFOUND. */
int tsr_coord_drain(tsr_coord *c, const char *name, bool drain, tsr_replica_info *info, char *err,
                    size_t err_len);
int tsr_coord_remove(tsr_coord *c, const char *name, tsr_replica_info *info, char *err,
                     size_t err_len);

/* A snapshot of every replica, sorted by name (*out malloc'd, free it). 0 or ENOMEM. */
int tsr_coord_list(tsr_coord *c, tsr_replica_info **out, size_t *n);

/* The models with at least one replica in any state (n_models ≤ cap written; returns the
 * total count). Names are copied into models[i][128]. */
size_t tsr_coord_models(tsr_coord *c, char (*models)[128], size_t cap, bool up_only);

/* Mark replicas without a heartbeat for down_after_ms DOWN. Call every ~100 ms. */
void tsr_coord_tick(tsr_coord *c);

/* The clock of the registry's ages and deadlines (heartbeats, quarantine): CLOCK_MONOTONIC
 * in ms. The launcher (coord_main.c) times its restarts on it too. */
int64_t tsr_coord_now_ms(void);

/* ---- routing ---- */

typedef struct {
    void *r;               /* the replica entry (opaque) */
    uint64_t generation;   /* its incarnation when picked */
    grpc_channel *channel; /* valid until tsr_coord_release */
    char name[128];
    char address[256];
    int64_t cost_tokens;
} tsr_coord_lease;

/* An excluded incarnation (a replica that failed this request). */
typedef struct {
    char name[128];
    uint64_t generation;
} tsr_coord_excl;

/* Pick the replica for a request of `model` ("" = the only model served; EINVAL when the
 * cluster serves several) costing cost_tokens. ENOMODEL: nobody serves it (err names the
 * models served); ENOREPLICA: none of its replicas can take it (err says why each cannot:
 * down with its reason, draining, excluded). */
int tsr_coord_pick(tsr_coord *c, const char *model, const tsr_coord_excl *excl, size_t n_excl,
                   int64_t cost_tokens, tsr_coord_lease *lease, char *err, size_t err_len);
/* Change the lease's cost (tokens left). */
void tsr_coord_lease_cost(tsr_coord *c, tsr_coord_lease *lease, int64_t cost_tokens);
/* The leased incarnation is no longer UP or DRAINING (it went DOWN, or was replaced). */
bool tsr_coord_lease_down(tsr_coord *c, const tsr_coord_lease *lease);
void tsr_coord_release(tsr_coord *c, tsr_coord_lease *lease);
/* A request saw the leased replica fail (stream broken, UNAVAILABLE): mark it DOWN with
 * the reason until its next healthy heartbeat, so other requests stop picking it. Only if
 * the failure looks like the replica's (the caller decides). */
void tsr_coord_report_failure(tsr_coord *c, const tsr_coord_lease *lease, const char *reason);

#endif
