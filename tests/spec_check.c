/*
 * spec_check.c — speculative decoding is exact on a replica layout (run under mpirun with
 * tp × pp ranks, or alone for 1 × 1):
 *   mpirun -np 4 spec_check -m TARGET --tp 2 --pp 2 --draft DRAFT.gguf [--draft D2 ...]
 *          [--ngram] [--k 1,2,4,8] [--device cpu|cuda]
 * The leader runs 16 concurrent greedy requests (different prompts and lengths) through
 * the serving engine without speculation, then again with each drafter and each k, and
 * requires identical ids. After every step it checks the KV accounting: blocks in use
 * never exceed what the sequences' tokens need (no leak of rolled-back drafts), and all
 * are free at the end. Prints the acceptance per drafter and k.
 */
#include "coordinator/drafter.h"
#include "coordinator/engine.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_REQ   16
#define MAX_GEN 48

typedef struct {
    tsr_engine *e;
    int32_t ids[MAX_GEN + 8];
    int n;
    int done;
    int drafted, accepted;
    int kv_violations;
} req;

static void on_event(void *ud, const tsr_event *ev)
{
    req *r = ud;
    if (ev->kind == TSR_EV_TOKENS) {
        for (size_t i = 0; i < ev->n_ids && r->n < MAX_GEN + 8; i++) r->ids[r->n++] = ev->ids[i];
        tsr_engine_status st;
        tsr_engine_get_status(r->e, &st);
        if (st.kv_blocks_used > st.kv_blocks_needed) r->kv_violations++;
    } else {
        r->done++;
        r->drafted = ev->spec_drafted;
        r->accepted = ev->spec_accepted;
    }
}

static int fail(const char *msg)
{
    fprintf(stderr, "spec_check: FAILED: %s\n", msg);
    tsr_comm_mpi_abort(1);
    return 1;
}

/* Run the 16 requests; ids into out. */
static int run(tsr_replica *rep, tsr_drafter *d, int32_t k, req *out, char *err, size_t err_len)
{
    tsr_engine_params ep = {.max_batch_tokens = 64,
                            .max_seqs = 32,
                            .max_queue = 64,
                            .drafter = d,
                            .spec_k = k,
                            .spec_max_batch = N_REQ,
                            .spec_default_on = true,
                            .spec_no_probe = true};
    tsr_engine *e;
    if (tsr_engine_new(rep, &ep, &e, err, err_len) != 0) return -1;
    memset(out, 0, sizeof(req) * N_REQ);
    static int32_t prompts[N_REQ][40];
    for (int r = 0; r < N_REQ; r++) {
        int n = 2 + (r * 5) % 30;
        prompts[r][0] = 1;
        /* Repetitive prompts give the n-gram drafter something to find. */
        for (int i = 1; i < n; i++) prompts[r][i] = 259 + ((r * 3 + (i % (3 + r % 4))) * 7) % 253;
        out[r].e = e;
        tsr_engine_request rq = {.prompt_ids = prompts[r],
                                 .n_prompt = (size_t)n,
                                 .speculation = -1,
                                 .on_event = on_event,
                                 .ud = &out[r]};
        tsr_sampling_params_default(&rq.gen.sampling);
        rq.gen.sampling.temperature = 0.0f;
        rq.gen.max_tokens = 16 + (r * 11) % (MAX_GEN - 16);
        rq.gen.ignore_eos = true;
        if (tsr_engine_submit(e, &rq, NULL, err, err_len) != 0) return -1;
    }
    tsr_engine_stop(e, false);
    int rc = tsr_engine_run(e, err, err_len);
    tsr_engine_status st;
    tsr_engine_get_status(e, &st);
    if (rc == 0 && st.kv_blocks_used != 0) {
        snprintf(err, err_len, "%d KV blocks still in use after all requests finished",
                 st.kv_blocks_used);
        rc = -1;
    }
    tsr_engine_free(e);
    return rc;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},  {"tp", required_argument, 0, 't'},
        {"pp", required_argument, 0, 'p'},     {"draft", required_argument, 0, 'd'},
        {"ngram", no_argument, 0, 'g'},        {"k", required_argument, 0, 'k'},
        {"device", required_argument, 0, 'D'}, {0, 0, 0, 0}};
    tsr_replica_params rp = {.tp = 1,
                             .pp = 1,
                             .n_threads = 1,
                             .n_ctx = 256,
                             .n_batch = 64,
                             .n_kv_blocks = 256,
                             .device = "cpu"};
    const char *model = NULL, *drafts[4];
    int n_drafts = 0;
    bool ngram = false;
    int ks[16] = {1, 2, 4, 8}, n_ks = 4;
    int c;
    while ((c = getopt_long(argc, argv, "m:", opts, NULL)) != -1) {
        switch (c) {
        case 'm':
            model = optarg;
            break;
        case 't':
            rp.tp = atoi(optarg);
            break;
        case 'p':
            rp.pp = atoi(optarg);
            break;
        case 'd':
            if (n_drafts < 4) drafts[n_drafts++] = optarg;
            break;
        case 'g':
            ngram = true;
            break;
        case 'D':
            rp.device = optarg;
            break;
        case 'k': {
            n_ks = 0;
            for (char *t = strtok(optarg, ","); t && n_ks < 16; t = strtok(NULL, ","))
                ks[n_ks++] = atoi(t);
            break;
        }
        default:
            return 2;
        }
    }
    if (!model) return 2;
    char err[1024];
    tsr_replica *rep;
    if (tsr_replica_open(model, &rp, &rep, err, sizeof err) != 0) {
        fprintf(stderr, "spec_check: %s\n", err);
        return fail("open");
    }
    if (!tsr_replica_is_leader(rep)) {
        if (tsr_replica_follow(rep, err, sizeof err) != 0) {
            fprintf(stderr, "spec_check: rank %d: %s\n", tsr_replica_rank(rep), err);
            return fail("follow");
        }
        tsr_replica_close(rep);
        return 0;
    }
    static req ref[N_REQ], got[N_REQ];
    if (run(rep, NULL, 1, ref, err, sizeof err) != 0) {
        fprintf(stderr, "spec_check: reference: %s\n", err);
        return fail("reference run");
    }
    int n_cfg = n_drafts + (ngram ? 1 : 0);
    for (int di = 0; di < n_cfg; di++) {
        for (int ki = 0; ki < n_ks; ki++) {
            tsr_drafter *d;
            const char *name = di < n_drafts ? drafts[di] : "ngram";
            int rc = di < n_drafts
                         ? tsr_drafter_model_new_for(drafts[di], rep, 512, 1, &d, err, sizeof err)
                         : tsr_drafter_ngram_new(1, 3, &d, err, sizeof err);
            if (rc != 0) {
                fprintf(stderr, "spec_check: drafter %s: %s\n", name, err);
                return fail("drafter");
            }
            /* the draft model runs where the target's leader runs (GPU ranks: on its GPU) */
            const char *want_be = tsr_replica_device(rep) >= 0 ? "cuda" : "cpu";
            if (di < n_drafts && strcmp(tsr_drafter_model_backend(d), want_be) != 0) {
                fprintf(stderr, "spec_check: draft %s runs on '%s', expected '%s'\n", name,
                        tsr_drafter_model_backend(d), want_be);
                return fail("draft backend");
            }
            if (ki == 0 && di < n_drafts)
                printf("spec_check: draft %s on %s\n", name, tsr_drafter_model_backend(d));
            if (run(rep, d, ks[ki], got, err, sizeof err) != 0) {
                fprintf(stderr, "spec_check: %s k %d: %s\n", name, ks[ki], err);
                return fail("speculative run");
            }
            long drafted = 0, accepted = 0;
            for (int r = 0; r < N_REQ; r++) {
                if (got[r].done != 1 || got[r].n != ref[r].n ||
                    memcmp(got[r].ids, ref[r].ids, sizeof(int32_t) * (size_t)ref[r].n) != 0) {
                    int i = 0;
                    while (i < ref[r].n && i < got[r].n && got[r].ids[i] == ref[r].ids[i]) i++;
                    fprintf(stderr,
                            "spec_check: %s k %d request %d: ids differ from decoding without "
                            "speculation at index %d (expected %d, got %d; lengths %d / %d)\n",
                            name, ks[ki], r, i, i < ref[r].n ? ref[r].ids[i] : -1,
                            i < got[r].n ? got[r].ids[i] : -1, ref[r].n, got[r].n);
                    return fail("ids differ");
                }
                if (got[r].kv_violations) {
                    fprintf(stderr,
                            "spec_check: %s k %d request %d: KV blocks in use exceeded "
                            "what the tokens need %d times\n",
                            name, ks[ki], r, got[r].kv_violations);
                    return fail("KV leak");
                }
                drafted += got[r].drafted;
                accepted += got[r].accepted;
            }
            printf("spec_check: tp %d pp %d %s k %d: identical; drafted %ld, accepted %ld "
                   "(%.1f%%)\n",
                   rp.tp, rp.pp, name, ks[ki], drafted, accepted,
                   drafted ? 100.0 * (double)accepted / (double)drafted : 0.0);
            if (drafted == 0 && di < n_drafts) return fail("a draft model proposed nothing");
            tsr_drafter_free(d);
        }
    }
    if (tsr_replica_shutdown(rep, err, sizeof err) != 0) return fail("shutdown");
    tsr_replica_close(rep);
    printf("spec_check: OK\n");
    return 0;
}
