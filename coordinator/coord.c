/*
 * coord.c — the coordinator's registry and router (see coord.h).
 *
 * Replica entries are heap objects in a list under one mutex. A lease holds a reference
 * on its entry (and so on its channel); a removed entry leaves the list at once and is
 * freed when its last lease is released, so a removal never pulls a channel from under a
 * running request.
 */
#include "coordinator/coord.h"
#include "coordinator/rpc.h"
#include "kernels/util.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QUARANTINE_MS 1500 /* after a reported failure, heartbeats do not revive it */

typedef struct rep {
    tsr_replica_info info; /* identity + last reported load + state, reason, launched */
    grpc_channel *ch;
    bool ch_tls; /* ch was made with TLS */
    uint64_t generation;
    int64_t t_heartbeat_ms; /* 0: never */
    int64_t t_quarantine_until_ms;
    uint64_t t_last_pick; /* pick counter value at its last pick */
    int32_t refs;         /* leases */
    bool drained;         /* an operator drained it: DRAINING whenever it is alive */
    bool listed;          /* in the list (false: removed, freed at refs 0) */
    struct rep *next;
} rep;

typedef struct retired {
    grpc_channel *ch;
    struct retired *next;
} retired;

typedef struct removed_name {
    char name[128];
    struct removed_name *next;
} removed_name;

struct tsr_coord {
    tsr_coord_params p;
    pthread_mutex_t mu;
    rep *head;
    removed_name *removed;
    retired *retired; /* channels of old addresses */
    uint64_t n_picks;
    int64_t t_start_ms; /* tsr_coord_now_ms at creation: the rejoin grace of tsr_coord_pick */
};

int64_t tsr_coord_now_ms(void)
{
    return (int64_t)(tsr_now_ns() / 1000000u);
}

static void copy_str(char *dst, size_t cap, const char *src)
{
    snprintf(dst, cap, "%s", src ? src : "");
}

const char *tsr_replica_state_name(tsr_replica_state s)
{
    switch (s) {
    case TSR_REPLICA_UP:
        return "up";
    case TSR_REPLICA_DRAINING:
        return "draining";
    case TSR_REPLICA_DOWN:
        return "down";
    case TSR_REPLICA_STARTING:
        return "starting";
    }
    return "unknown";
}

int tsr_coord_new(const tsr_coord_params *p, tsr_coord **out, char *err, size_t err_len)
{
    *out = NULL;
    tsr_coord *c = calloc(1, sizeof *c);
    if (!c) {
        tsr_set_err(err, err_len, "out of memory");
        return TSR_COORD_ENOMEM;
    }
    c->p = *p;
    if (c->p.down_after_ms <= 0) c->p.down_after_ms = 3000;
    if (c->p.heartbeat_interval_ms <= 0) c->p.heartbeat_interval_ms = 500;
    c->t_start_ms = tsr_coord_now_ms();
    pthread_mutex_init(&c->mu, NULL);
    *out = c;
    return 0;
}

static void rep_free(rep *r)
{
    if (r->ch) grpc_channel_destroy(r->ch);
    free(r);
}

void tsr_coord_free(tsr_coord *c)
{
    if (!c) return;
    for (rep *r = c->head, *n; r; r = n) {
        n = r->next;
        rep_free(r);
    }
    for (retired *r = c->retired, *n; r; r = n) {
        n = r->next;
        grpc_channel_destroy(r->ch);
        free(r);
    }
    for (removed_name *r = c->removed, *n; r; r = n) {
        n = r->next;
        free(r);
    }
    pthread_mutex_destroy(&c->mu);
    free(c);
}

static rep *find(tsr_coord *c, const char *name)
{
    for (rep *r = c->head; r; r = r->next)
        if (!strcmp(r->info.name, name)) return r;
    return NULL;
}

static bool is_removed(tsr_coord *c, const char *name)
{
    for (removed_name *r = c->removed; r; r = r->next)
        if (!strcmp(r->name, name)) return true;
    return false;
}

/* Insert sorted by name. */
static void insert(tsr_coord *c, rep *r)
{
    rep **pp = &c->head;
    while (*pp && strcmp((*pp)->info.name, r->info.name) < 0) pp = &(*pp)->next;
    r->next = *pp;
    *pp = r;
    r->listed = true;
}

static void unlink_rep(tsr_coord *c, rep *r)
{
    for (rep **pp = &c->head; *pp; pp = &(*pp)->next) {
        if (*pp == r) {
            *pp = r->next;
            break;
        }
    }
    r->listed = false;
    if (r->refs == 0) rep_free(r);
}

static void set_down(rep *r, const char *reason)
{
    if (r->info.state != TSR_REPLICA_DOWN) r->generation++;
    r->info.state = TSR_REPLICA_DOWN;
    copy_str(r->info.reason, sizeof r->info.reason, reason);
}

int tsr_coord_heartbeat(tsr_coord *c, const tsr_replica_info *hb, bool *removed, char *err,
                        size_t err_len)
{
    *removed = false;
    if (!hb->name[0] || !hb->address[0] || !hb->model[0]) {
        tsr_set_err(err, err_len, "heartbeat: name, address and model are required");
        return TSR_COORD_EINVAL;
    }
    pthread_mutex_lock(&c->mu);
    int rc = 0;
    if (is_removed(c, hb->name)) {
        *removed = true;
        goto out;
    }
    const int64_t t = tsr_coord_now_ms();
    rep *r = find(c, hb->name);
    if (r && strcmp(r->info.address, hb->address) != 0 && r->info.state == TSR_REPLICA_UP &&
        t - r->t_heartbeat_ms < c->p.down_after_ms) {
        tsr_set_err(err, err_len,
                    "replica name '%s' is taken by %s (up, heard %lld ms ago); give this one "
                    "another --name",
                    hb->name, r->info.address, (long long)(t - r->t_heartbeat_ms));
        rc = TSR_COORD_EEXIST;
        goto out;
    }
    if (!r) {
        r = calloc(1, sizeof *r);
        if (!r) {
            tsr_set_err(err, err_len, "out of memory");
            rc = TSR_COORD_ENOMEM;
            goto out;
        }
        copy_str(r->info.name, sizeof r->info.name, hb->name);
        r->info.state = TSR_REPLICA_DOWN;
        r->generation = 1;
        insert(c, r);
    }
    if (hb->tls && !tsr_tls_client_enabled(c->p.replica_tls)) {
        tsr_set_err(err, err_len,
                    "replica '%s' serves TLS, but this coordinator has no CA to verify it: start "
                    "it with --replica-tls-ca FILE",
                    hb->name);
        rc = TSR_COORD_EINVAL;
        goto out;
    }
    if (!r->ch || strcmp(r->info.address, hb->address) != 0 || r->ch_tls != hb->tls) {
        grpc_channel *ch = tsr_rpc_channel_tls(hb->address, hb->tls ? c->p.replica_tls : NULL);
        if (!ch) {
            tsr_set_err(err, err_len, "cannot create a channel to %s", hb->address);
            rc = TSR_COORD_ENOMEM;
            goto out;
        }
        /* Leases taken on the old address may still create calls on its channel: retire
         * it (freed with the coordinator) instead of destroying it under them. */
        if (r->ch) {
            retired *rt = malloc(sizeof *rt);
            if (!rt) {
                grpc_channel_destroy(ch);
                tsr_set_err(err, err_len, "out of memory");
                rc = TSR_COORD_ENOMEM;
                goto out;
            }
            rt->ch = r->ch;
            rt->next = c->retired;
            c->retired = rt;
        }
        r->ch = ch;
        r->ch_tls = hb->tls;
        r->generation++;
    }
    bool launched = r->info.launched;
    int32_t restarts = r->info.restarts;
    uint64_t routed = r->info.requests_routed;
    int32_t outstanding = r->info.outstanding;
    int64_t outstanding_tokens = r->info.outstanding_tokens;
    tsr_replica_state prev = r->info.state;
    char reason[256];
    copy_str(reason, sizeof reason, r->info.reason);
    r->info = *hb;
    r->info.launched = launched;
    r->info.restarts = restarts;
    r->info.requests_routed = routed;
    r->info.outstanding = outstanding;
    r->info.outstanding_tokens = outstanding_tokens;
    r->t_heartbeat_ms = t;
    if (!hb->healthy) {
        r->info.state = prev;
        set_down(r, "the replica reports its data plane failed");
    } else if (hb->draining) {
        r->info.state = prev;
        set_down(r, "the replica is shutting down");
    } else if (prev == TSR_REPLICA_DOWN && t < r->t_quarantine_until_ms) {
        r->info.state = TSR_REPLICA_DOWN; /* a request just saw it fail */
        copy_str(r->info.reason, sizeof r->info.reason, reason);
    } else {
        if (prev != TSR_REPLICA_UP && prev != TSR_REPLICA_DRAINING) r->generation++;
        r->info.state = r->drained ? TSR_REPLICA_DRAINING : TSR_REPLICA_UP;
    }
out:
    pthread_mutex_unlock(&c->mu);
    return rc;
}

int tsr_coord_add_launched(tsr_coord *c, const char *name, const char *model, int32_t tp,
                           int32_t pp, char *err, size_t err_len)
{
    pthread_mutex_lock(&c->mu);
    rep *r = find(c, name);
    if (!r) {
        r = calloc(1, sizeof *r);
        if (!r) {
            pthread_mutex_unlock(&c->mu);
            tsr_set_err(err, err_len, "out of memory");
            return TSR_COORD_ENOMEM;
        }
        copy_str(r->info.name, sizeof r->info.name, name);
        r->generation = 1;
        insert(c, r);
    }
    copy_str(r->info.model, sizeof r->info.model, model);
    r->info.tp = tp;
    r->info.pp = pp;
    r->info.launched = true;
    if (r->info.state != TSR_REPLICA_UP) r->info.state = TSR_REPLICA_STARTING;
    pthread_mutex_unlock(&c->mu);
    return 0;
}

void tsr_coord_launched_exit(tsr_coord *c, const char *name, const char *reason)
{
    pthread_mutex_lock(&c->mu);
    rep *r = find(c, name);
    if (r) {
        set_down(r, reason);
        r->info.restarts++;
        r->t_heartbeat_ms = 0;
    }
    pthread_mutex_unlock(&c->mu);
}

bool tsr_coord_is_removed(tsr_coord *c, const char *name)
{
    pthread_mutex_lock(&c->mu);
    bool rm = is_removed(c, name);
    pthread_mutex_unlock(&c->mu);
    return rm;
}

static void snapshot(const tsr_coord *c, const rep *r, tsr_replica_info *out, int64_t t)
{
    (void)c;
    *out = r->info;
    out->last_heartbeat_ms_ago = r->t_heartbeat_ms ? (double)(t - r->t_heartbeat_ms) : -1.0;
}

int tsr_coord_drain(tsr_coord *c, const char *name, bool drain, tsr_replica_info *info, char *err,
                    size_t err_len)
{
    pthread_mutex_lock(&c->mu);
    rep *r = find(c, name);
    if (!r) {
        pthread_mutex_unlock(&c->mu);
        tsr_set_err(err, err_len, "no replica named '%s'", name);
        return TSR_COORD_ENOTFOUND;
    }
    r->drained = drain;
    if (drain && r->info.state == TSR_REPLICA_UP) r->info.state = TSR_REPLICA_DRAINING;
    if (!drain && r->info.state == TSR_REPLICA_DRAINING) r->info.state = TSR_REPLICA_UP;
    if (info) snapshot(c, r, info, tsr_coord_now_ms());
    pthread_mutex_unlock(&c->mu);
    return 0;
}

int tsr_coord_remove(tsr_coord *c, const char *name, tsr_replica_info *info, char *err,
                     size_t err_len)
{
    pthread_mutex_lock(&c->mu);
    rep *r = find(c, name);
    if (!r) {
        pthread_mutex_unlock(&c->mu);
        tsr_set_err(err, err_len, "no replica named '%s'", name);
        return TSR_COORD_ENOTFOUND;
    }
    removed_name *rm = calloc(1, sizeof *rm);
    if (!rm) {
        pthread_mutex_unlock(&c->mu);
        tsr_set_err(err, err_len, "out of memory");
        return TSR_COORD_ENOMEM;
    }
    copy_str(rm->name, sizeof rm->name, name);
    rm->next = c->removed;
    c->removed = rm;
    if (info) snapshot(c, r, info, tsr_coord_now_ms());
    unlink_rep(c, r);
    pthread_mutex_unlock(&c->mu);
    return 0;
}

int tsr_coord_list(tsr_coord *c, tsr_replica_info **out, size_t *n)
{
    pthread_mutex_lock(&c->mu);
    size_t k = 0;
    for (rep *r = c->head; r; r = r->next) k++;
    tsr_replica_info *a = calloc(k ? k : 1, sizeof *a);
    if (!a) {
        pthread_mutex_unlock(&c->mu);
        return TSR_COORD_ENOMEM;
    }
    const int64_t t = tsr_coord_now_ms();
    size_t i = 0;
    for (rep *r = c->head; r; r = r->next) snapshot(c, r, &a[i++], t);
    pthread_mutex_unlock(&c->mu);
    *out = a;
    *n = k;
    return 0;
}

static size_t models_locked(tsr_coord *c, char (*models)[128], size_t cap, bool up_only)
{
    size_t n = 0;
    for (rep *r = c->head; r; r = r->next) {
        if (!r->info.model[0]) continue;
        if (up_only && r->info.state != TSR_REPLICA_UP) continue;
        bool seen = false;
        for (rep *q = c->head; q != r; q = q->next)
            if (!strcmp(q->info.model, r->info.model) &&
                (!up_only || q->info.state == TSR_REPLICA_UP))
                seen = true;
        if (seen) continue;
        if (n < cap) copy_str(models[n], 128, r->info.model);
        n++;
    }
    return n;
}

size_t tsr_coord_models(tsr_coord *c, char (*models)[128], size_t cap, bool up_only)
{
    pthread_mutex_lock(&c->mu);
    size_t n = models_locked(c, models, cap, up_only);
    pthread_mutex_unlock(&c->mu);
    return n;
}

void tsr_coord_tick(tsr_coord *c)
{
    pthread_mutex_lock(&c->mu);
    const int64_t t = tsr_coord_now_ms();
    for (rep *r = c->head; r; r = r->next) {
        if ((r->info.state == TSR_REPLICA_UP || r->info.state == TSR_REPLICA_DRAINING) &&
            t - r->t_heartbeat_ms >= c->p.down_after_ms) {
            char why[128];
            snprintf(why, sizeof why, "no heartbeat for %lld ms",
                     (long long)(t - r->t_heartbeat_ms));
            set_down(r, why);
        }
    }
    pthread_mutex_unlock(&c->mu);
}

/* ---- routing ---- */

static void list_models(tsr_coord *c, char *buf, size_t cap)
{
    char models[32][128];
    size_t n = models_locked(c, models, 32, false);
    size_t off = 0;
    buf[0] = 0;
    for (size_t i = 0; i < n && i < 32 && off < cap; i++)
        off += (size_t)snprintf(buf + off, cap - off, "%s'%s'", i ? ", " : "", models[i]);
    if (n == 0) snprintf(buf, cap, "none yet (no replica has joined)");
}

int tsr_coord_pick(tsr_coord *c, const char *model, const tsr_coord_excl *excl, size_t n_excl,
                   int64_t cost_tokens, tsr_coord_lease *lease, char *err, size_t err_len)
{
    memset(lease, 0, sizeof *lease);
    pthread_mutex_lock(&c->mu);
    int rc = 0;
    char only[1][128];
    if (!model || !model[0]) {
        size_t n = models_locked(c, only, 1, false);
        if (n == 0) {
            tsr_set_err(err, err_len, "no replica has joined this coordinator yet");
            rc = TSR_COORD_ENOREPLICA;
            goto out;
        }
        if (n > 1) {
            char list[1024];
            list_models(c, list, sizeof list);
            tsr_set_err(err, err_len,
                        "model: this cluster serves several models (%s); name one in the "
                        "request's 'model' field",
                        list);
            rc = TSR_COORD_EINVAL;
            goto out;
        }
        model = only[0];
    }
    rep *best = NULL;
    int64_t best_load = 0;
    bool known = false;
    char why[1024];
    size_t off = 0;
    why[0] = 0;
    for (rep *r = c->head; r; r = r->next) {
        if (strcmp(r->info.model, model) != 0) continue;
        known = true;
        const char *no = NULL;
        char buf[300];
        if (r->info.state != TSR_REPLICA_UP) {
            if (r->info.state == TSR_REPLICA_DOWN)
                snprintf(buf, sizeof buf, "down (%s)", r->info.reason);
            else
                snprintf(buf, sizeof buf, "%s", tsr_replica_state_name(r->info.state));
            no = buf;
        } else {
            for (size_t i = 0; i < n_excl; i++)
                if (!strcmp(excl[i].name, r->info.name) && excl[i].generation == r->generation)
                    no = "failed this request";
        }
        if (no) {
            if (off < sizeof why)
                off += (size_t)snprintf(why + off, sizeof why - off, "%s%s: %s", off ? "; " : "",
                                        r->info.name, no);
            continue;
        }
        int64_t load = r->info.outstanding_tokens + (int64_t)r->info.requests_queued * 64;
        if (r->info.kv_blocks_total > 0)
            load += (int64_t)r->info.kv_blocks_used * 1024 / r->info.kv_blocks_total;
        if (!best || load < best_load ||
            (load == best_load && r->t_last_pick < best->t_last_pick)) {
            best = r;
            best_load = load;
        }
    }
    if (!known) {
        char list[1024];
        list_models(c, list, sizeof list);
        /* A coordinator restarted under load learns its replicas again as they heartbeat:
         * until a silent replica would count as down (down_after_ms), a model nobody has
         * announced yet may be one whose replicas have not rejoined, so the request waits
         * for one (ENOREPLICA, UNAVAILABLE in the end) instead of failing for good. */
        const int64_t up_ms = tsr_coord_now_ms() - c->t_start_ms;
        if (up_ms < c->p.down_after_ms) {
            tsr_set_err(err, err_len,
                        "model '%s' has no replica yet: this coordinator started %.1f s ago and "
                        "its replicas are still joining (models so far: %s)",
                        model, (double)up_ms / 1000.0, list);
            rc = TSR_COORD_ENOREPLICA;
            goto out;
        }
        tsr_set_err(err, err_len, "model '%s' is not served by this cluster; models served: %s",
                    model, list);
        rc = TSR_COORD_ENOMODEL;
        goto out;
    }
    if (!best) {
        tsr_set_err(err, err_len, "no replica of model '%s' can take the request: %s", model, why);
        rc = TSR_COORD_ENOREPLICA;
        goto out;
    }
    best->refs++;
    best->t_last_pick = ++c->n_picks;
    best->info.outstanding++;
    best->info.outstanding_tokens += cost_tokens;
    best->info.requests_routed++;
    lease->r = best;
    lease->generation = best->generation;
    lease->channel = best->ch;
    lease->cost_tokens = cost_tokens;
    copy_str(lease->name, sizeof lease->name, best->info.name);
    copy_str(lease->address, sizeof lease->address, best->info.address);
out:
    pthread_mutex_unlock(&c->mu);
    return rc;
}

void tsr_coord_lease_cost(tsr_coord *c, tsr_coord_lease *lease, int64_t cost_tokens)
{
    if (!lease->r) return;
    pthread_mutex_lock(&c->mu);
    rep *r = lease->r;
    r->info.outstanding_tokens += cost_tokens - lease->cost_tokens;
    lease->cost_tokens = cost_tokens;
    pthread_mutex_unlock(&c->mu);
}

bool tsr_coord_lease_down(tsr_coord *c, const tsr_coord_lease *lease)
{
    if (!lease->r) return true;
    pthread_mutex_lock(&c->mu);
    const rep *r = lease->r;
    bool down = !r->listed || r->generation != lease->generation ||
                r->info.state == TSR_REPLICA_DOWN || r->info.state == TSR_REPLICA_STARTING;
    pthread_mutex_unlock(&c->mu);
    return down;
}

void tsr_coord_release(tsr_coord *c, tsr_coord_lease *lease)
{
    if (!lease->r) return;
    pthread_mutex_lock(&c->mu);
    rep *r = lease->r;
    r->info.outstanding--;
    r->info.outstanding_tokens -= lease->cost_tokens;
    if (--r->refs == 0 && !r->listed) rep_free(r);
    pthread_mutex_unlock(&c->mu);
    lease->r = NULL;
    lease->channel = NULL;
}

void tsr_coord_report_failure(tsr_coord *c, const tsr_coord_lease *lease, const char *reason)
{
    if (!lease->r) return;
    pthread_mutex_lock(&c->mu);
    rep *r = lease->r;
    if (r->listed && r->generation == lease->generation) {
        set_down(r, reason);
        r->t_quarantine_until_ms = tsr_coord_now_ms() + QUARANTINE_MS;
    }
    pthread_mutex_unlock(&c->mu);
}
