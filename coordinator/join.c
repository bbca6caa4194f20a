/*
 * join.c — the replica's heartbeat thread (see join.h).
 */
#include "coordinator/join.h"
#include "coordinator/rpc.h"
#include "kernels/util.h"

#include "tessera.pb-c.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define HEARTBEAT_DEFAULT_MS 500
#define HEARTBEAT_TIMEOUT_MS 1000

struct tsr_join {
    char *coordinator, *name, *address, *model;
    char *authorization; /* NULL: none */
    int32_t tp, pp, max_queue, context_length;
    bool serves_tls;
    bool tls; /* the coordinator is dialled with TLS */
    tsr_engine *engine;
    grpc_channel *ch;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop; /* under mu */
};

static void *join_main(void *arg)
{
    tsr_join *j = arg;
    int64_t interval_ms = HEARTBEAT_DEFAULT_MS;
    bool in_contact = false, first = true;
    int last_code = 0;
    for (;;) {
        tsr_engine_status st;
        tsr_engine_get_status(j->engine, &st);
        Tessera__V1__HeartbeatRequest q = TESSERA__V1__HEARTBEAT_REQUEST__INIT;
        q.name = j->name;
        q.address = j->address;
        q.model = j->model;
#define SETF(f, v)                                                                                 \
    do {                                                                                           \
        q.has_##f = true;                                                                          \
        q.f = (v);                                                                                 \
    } while (0)
        SETF(tp, j->tp);
        SETF(pp, j->pp);
        SETF(requests_running, st.n_running);
        SETF(requests_queued, st.n_waiting);
        SETF(kv_blocks_used, st.kv_blocks_used);
        SETF(kv_blocks_total, st.kv_blocks_total);
        SETF(tokens_per_second, st.tokens_per_s);
        SETF(healthy, st.healthy);
        SETF(draining, st.draining);
        SETF(max_queue, j->max_queue);
        SETF(context_length, j->context_length);
        if (j->serves_tls) SETF(tls, true);
#undef SETF
        uint8_t *resp = NULL;
        size_t resp_len = 0;
        char details[512];
        int code =
            tsr_rpc_unary_auth(j->ch, j->authorization, "/tessera.v1.Cluster/Heartbeat", &q.base,
                               HEARTBEAT_TIMEOUT_MS, &resp, &resp_len, details, sizeof details);
        bool removed = false;
        if (code == 0) {
            Tessera__V1__HeartbeatResponse *a =
                tessera__v1__heartbeat_response__unpack(NULL, resp_len, resp);
            if (a) {
                if (a->has_heartbeat_interval_ms && a->heartbeat_interval_ms >= 50 &&
                    a->heartbeat_interval_ms <= 10000)
                    interval_ms = a->heartbeat_interval_ms;
                removed = a->has_removed && a->removed;
                tessera__v1__heartbeat_response__free_unpacked(a, NULL);
            }
            if (!in_contact)
                fprintf(stderr, "tessera serve: joined coordinator %s as '%s' (model '%s')\n",
                        j->coordinator, j->name, j->model);
            in_contact = true;
        } else if (in_contact || first || code != last_code) {
            const char *hint =
                code == GRPC_STATUS_UNAUTHENTICATED || code == GRPC_STATUS_PERMISSION_DENIED
                    ? " (give an admin key of the coordinator: --join-key-file FILE)"
                : code == GRPC_STATUS_UNAVAILABLE && !j->tls
                    ? " (a coordinator serving TLS needs --join-tls-ca FILE)"
                    : "";
            fprintf(stderr, "tessera serve: coordinator %s %s (%s: %s)%s; retrying every %lld ms\n",
                    j->coordinator,
                    code == GRPC_STATUS_UNAVAILABLE || code == GRPC_STATUS_DEADLINE_EXCEEDED
                        ? "unreachable"
                        : "refused the heartbeat",
                    tsr_rpc_code_name(code), details, hint, (long long)interval_ms);
            in_contact = false;
        }
        last_code = code;
        free(resp);
        first = false;
        fflush(stderr);
        if (removed) {
            fprintf(stderr,
                    "tessera serve: the coordinator removed '%s' from the cluster; heartbeats "
                    "stop (this server keeps serving direct calls)\n",
                    j->name);
            return NULL;
        }
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += (long)(interval_ms % 1000) * 1000000L;
        ts.tv_sec += interval_ms / 1000 + ts.tv_nsec / 1000000000L;
        ts.tv_nsec %= 1000000000L;
        pthread_mutex_lock(&j->mu);
        while (!j->stop && pthread_cond_timedwait(&j->cv, &j->mu, &ts) != ETIMEDOUT) {
        }
        bool stop = j->stop;
        pthread_mutex_unlock(&j->mu);
        if (stop) return NULL;
    }
}

static void join_free(tsr_join *j)
{
    if (j->ch) grpc_channel_destroy(j->ch);
    free(j->coordinator);
    free(j->name);
    free(j->address);
    free(j->model);
    free(j->authorization);
    free(j);
}

int tsr_join_start(const tsr_join_params *p, tsr_engine *engine, tsr_join **out, char *err,
                   size_t err_len)
{
    *out = NULL;
    tsr_join *j = calloc(1, sizeof *j);
    if (!j) goto oom;
    j->coordinator = strdup(p->coordinator);
    j->name = strdup(p->name);
    j->address = strdup(p->address);
    j->model = strdup(p->model);
    if (!j->coordinator || !j->name || !j->address || !j->model) goto oom_j;
    if (p->authorization && !(j->authorization = strdup(p->authorization))) goto oom_j;
    j->serves_tls = p->serves_tls;
    j->tls = tsr_tls_client_enabled(p->tls);
    j->tp = p->tp;
    j->pp = p->pp;
    j->max_queue = p->max_queue;
    j->context_length = p->context_length;
    j->engine = engine;
    grpc_init();
    j->ch = tsr_rpc_channel_tls(p->coordinator, p->tls);
    if (!j->ch) {
        tsr_set_err(err, err_len, "--join %s: cannot create a channel", p->coordinator);
        join_free(j);
        grpc_shutdown();
        return -1;
    }
    pthread_mutex_init(&j->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&j->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (pthread_create(&j->thread, NULL, join_main, j) != 0) {
        tsr_set_err(err, err_len, "--join: cannot start the heartbeat thread");
        pthread_mutex_destroy(&j->mu);
        pthread_cond_destroy(&j->cv);
        join_free(j);
        grpc_shutdown();
        return -1;
    }
    *out = j;
    return 0;
oom_j:
    join_free(j);
oom:
    tsr_set_err(err, err_len, "out of memory");
    return -1;
}

void tsr_join_stop(tsr_join *j)
{
    if (!j) return;
    pthread_mutex_lock(&j->mu);
    j->stop = true;
    pthread_cond_signal(&j->cv);
    pthread_mutex_unlock(&j->mu);
    pthread_join(j->thread, NULL);
    pthread_mutex_destroy(&j->mu);
    pthread_cond_destroy(&j->cv);
    join_free(j);
    grpc_shutdown();
}
