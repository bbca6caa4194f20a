/*
 * test_coord.c — coordinator/coord (the registry and router), without a network: heartbeats
 * register and update replicas, the router picks the least-loaded replica of the model and
 * spreads ties, never picks a drained, down or excluded one, names the models served when
 * a model is unknown, says why each replica cannot take a request, marks a silent replica
 * down after down_after_ms, keeps a drain mark across down/up, refuses a name taken by a
 * live replica, and forgets a removed one (which is told so at its next heartbeat).
 * The end-to-end behaviour over gRPC is tests/python/test_coord.py.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "coordinator/coord.h"

static tsr_replica_info hb(const char *name, const char *addr, const char *model)
{
    tsr_replica_info r;
    memset(&r, 0, sizeof r);
    snprintf(r.name, sizeof r.name, "%s", name);
    snprintf(r.address, sizeof r.address, "%s", addr);
    snprintf(r.model, sizeof r.model, "%s", model);
    r.tp = r.pp = 1;
    r.healthy = true;
    r.kv_blocks_total = 100;
    return r;
}

static tsr_replica_state state_of(tsr_coord *c, const char *name)
{
    tsr_replica_info *l;
    size_t n;
    assert_int_equal(tsr_coord_list(c, &l, &n), 0);
    tsr_replica_state s = 0;
    for (size_t i = 0; i < n; i++)
        if (!strcmp(l[i].name, name)) s = l[i].state;
    free(l);
    return s;
}

static void beat(tsr_coord *c, const tsr_replica_info *r)
{
    bool removed;
    char err[256];
    if (tsr_coord_heartbeat(c, r, &removed, err, sizeof err) != 0) fail_msg("heartbeat: %s", err);
    assert_false(removed);
}

static void test_registry_and_routing(void **state)
{
    (void)state;
    grpc_init();
    tsr_coord *c;
    char err[1024];
    tsr_coord_params p = {.down_after_ms = 300, .heartbeat_interval_ms = 100};
    assert_int_equal(tsr_coord_new(&p, &c, err, sizeof err), 0);
    tsr_coord_lease l1, l2, l3;

    /* Nobody yet. */
    assert_int_equal(tsr_coord_pick(c, "", NULL, 0, 10, &l1, err, sizeof err),
                     TSR_COORD_ENOREPLICA);
    tsr_replica_info a = hb("a", "127.0.0.1:1001", "m1"), b = hb("b", "127.0.0.1:1002", "m1");
    tsr_replica_info x = hb("x", "127.0.0.1:1003", "m2");
    beat(c, &a);
    beat(c, &b);
    assert_int_equal(state_of(c, "a"), TSR_REPLICA_UP);

    /* One model: "" means it. Ties spread; the cost steers the next pick. */
    assert_int_equal(tsr_coord_pick(c, "", NULL, 0, 100, &l1, err, sizeof err), 0);
    assert_int_equal(tsr_coord_pick(c, "m1", NULL, 0, 100, &l2, err, sizeof err), 0);
    if (!strcmp(l1.name, l2.name)) fail_msg("two picks at equal load both went to %s", l1.name);
    tsr_coord_lease_cost(c, &l1, 1000);
    assert_int_equal(tsr_coord_pick(c, "m1", NULL, 0, 5, &l3, err, sizeof err), 0);
    if (strcmp(l3.name, l2.name) != 0)
        fail_msg("expected the less loaded %s, got %s", l2.name, l3.name);
    tsr_coord_release(c, &l1);
    tsr_coord_release(c, &l2);
    tsr_coord_release(c, &l3);

    /* Several models: "" is refused naming them; unknown names them; routing by model. */
    beat(c, &x);
    assert_int_equal(tsr_coord_pick(c, "", NULL, 0, 1, &l1, err, sizeof err), TSR_COORD_EINVAL);
    assert_non_null(strstr(err, "'m1'"));
    assert_non_null(strstr(err, "'m2'"));
    /* Within down_after_ms of the start an unknown model may be one whose replicas have not
     * rejoined a restarted coordinator yet: a wait (ENOREPLICA), not NOT_FOUND. */
    assert_int_equal(tsr_coord_pick(c, "nope", NULL, 0, 1, &l1, err, sizeof err),
                     TSR_COORD_ENOREPLICA);
    if (!strstr(err, "'nope'") || !strstr(err, "still joining"))
        fail_msg("unknown model in the rejoin grace: expected 'nope' ... still joining, got: %s",
                 err);
    usleep(350 * 1000);
    beat(c, &a);
    beat(c, &b);
    beat(c, &x);
    assert_int_equal(tsr_coord_pick(c, "nope", NULL, 0, 1, &l1, err, sizeof err),
                     TSR_COORD_ENOMODEL);
    if (!strstr(err, "'nope'") || !strstr(err, "'m1'") || !strstr(err, "'m2'"))
        fail_msg("unknown model: expected the name and the models served, got: %s", err);
    assert_int_equal(tsr_coord_pick(c, "m2", NULL, 0, 1, &l1, err, sizeof err), 0);
    assert_string_equal(l1.name, "x");
    tsr_coord_release(c, &l1);

    /* Drain: never picked; the mark survives down and up; undrain brings it back. */
    assert_int_equal(tsr_coord_drain(c, "a", true, NULL, err, sizeof err), 0);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(tsr_coord_pick(c, "m1", NULL, 0, 1, &l1, err, sizeof err), 0);
        assert_string_equal(l1.name, "b");
        tsr_coord_release(c, &l1);
    }
    assert_int_equal(tsr_coord_drain(c, "nosuch", true, NULL, err, sizeof err),
                     TSR_COORD_ENOTFOUND);
    assert_non_null(strstr(err, "nosuch"));

    /* Exclusion (a replica that failed this request) and the reasons when nothing is left. */
    assert_int_equal(tsr_coord_pick(c, "m1", NULL, 0, 1, &l1, err, sizeof err), 0);
    tsr_coord_excl ex = {.generation = l1.generation};
    snprintf(ex.name, sizeof ex.name, "%s", l1.name);
    tsr_coord_report_failure(c, &l1, "stream broken");
    assert_true(tsr_coord_lease_down(c, &l1));
    tsr_coord_release(c, &l1);
    assert_int_equal(tsr_coord_pick(c, "m1", &ex, 1, 1, &l1, err, sizeof err),
                     TSR_COORD_ENOREPLICA);
    if (!strstr(err, "a: draining") || !strstr(err, "b: down (stream broken)"))
        fail_msg("expected each replica's reason, got: %s", err);
    /* A reported failure is not undone by the very next heartbeat (quarantine). */
    beat(c, &b);
    assert_int_equal(state_of(c, "b"), TSR_REPLICA_DOWN);

    /* Silence: down after down_after_ms; a heartbeat after the quarantine brings it back. */
    usleep(1600 * 1000);
    tsr_coord_tick(c);
    assert_int_equal(state_of(c, "a"), TSR_REPLICA_DOWN);
    beat(c, &a);
    beat(c, &b);
    assert_int_equal(state_of(c, "a"), TSR_REPLICA_DRAINING);
    assert_int_equal(state_of(c, "b"), TSR_REPLICA_UP);
    assert_int_equal(tsr_coord_drain(c, "a", false, NULL, err, sizeof err), 0);
    assert_int_equal(state_of(c, "a"), TSR_REPLICA_UP);
    /* An unhealthy replica is down at once. */
    tsr_replica_info sick = a;
    sick.healthy = false;
    beat(c, &sick);
    assert_int_equal(state_of(c, "a"), TSR_REPLICA_DOWN);
    beat(c, &a);

    /* A live replica's name cannot be taken by another address. */
    tsr_replica_info imposter = hb("b", "127.0.0.1:9999", "m1");
    bool removed;
    assert_int_equal(tsr_coord_heartbeat(c, &imposter, &removed, err, sizeof err),
                     TSR_COORD_EEXIST);
    assert_non_null(strstr(err, "127.0.0.1:1002"));

    /* Remove: forgotten, told at its next heartbeat; a lease held meanwhile stays valid. */
    beat(c, &x); /* silent since the sleep: down */
    assert_int_equal(tsr_coord_pick(c, "m2", NULL, 0, 1, &l1, err, sizeof err), 0);
    assert_int_equal(tsr_coord_remove(c, "x", NULL, err, sizeof err), 0);
    assert_true(tsr_coord_lease_down(c, &l1));
    tsr_coord_release(c, &l1);
    assert_int_equal(tsr_coord_heartbeat(c, &x, &removed, err, sizeof err), 0);
    assert_true(removed);
    assert_int_equal(state_of(c, "x"), 0);
    tsr_coord_free(c);
    grpc_shutdown();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_registry_and_routing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
