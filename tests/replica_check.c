/*
 * replica_check.c — a distributed layout against the single-process engine, in one job.
 *
 * Run under mpirun with tp × pp ranks:
 *   mpirun -np 4 replica_check -m MODEL --tp 2 --pp 2 [--layers SPEC] [--tol 1e-4] [-n 24]
 *   replica_check -m MODEL --tp 3 --expect-refusal "not divisible"
 *   replica_check -m MODEL --tp 2 --teacher-force --tol 0.05
 *   mpirun -np 2 replica_check -m MODEL --tp 2 --device cuda --tol 0.5   (GPU ranks)
 *   mpirun -np 2 replica_check -m MODEL --tp 2 --prompt-ids "2,818,6073;2,50429,563"
 *   mpirun -np 4 replica_check -m MODEL --tp 2 --pp 2 --kv-type f16   (both engines' KV type)
 *   mpirun -np 4 replica_check -m MODEL --tp 2 --pp 2 --batch-step --dump FILE  (the
 *       replica's logits as raw floats, to compare two runs bit for bit)
 *   mpirun -np 4 replica_check -m MODEL --tp 2 --pp 2 --device cuda --batch-step
 *          --expect-transport "device-direct"
 * --batch-step adds one step of three sequences at once (tsr_replica_step; with pp > 1 it is
 * cut into pipeline micro-batches), every token's logits against the reference's.
 * --expect-transport TEXT: the replica's data plane (tsr_replica_transport) must contain
 * TEXT on every rank (e.g. that GPU ranks move activations device to device).
 * --stall-followers MS: a stuck peer. Followers sleep instead of following (for 4 × MS, then
 * exit); the leader, with a comm deadline of MS, runs one step and must get an error that
 * says which rank did not answer within MS, in about MS; it prints PASS and ends the job
 * (MPI_Abort: the stuck ranks would hold MPI_Finalize).
 * --expect-q80-lanes: every rank and the in-process reference must hold Q8_0 matrices in the
 * lanes order (kernels/q80_lanes.h; TSR_Q80_ORDER=lanes in every rank's environment).
 * --check-device-memory (GPU ranks): after the run, every rank's device bytes in use (weights,
 * KV pool, step buffers, the logits buffers grown by the steps: the leader's when pp > 1,
 * tp rank 0's of the last stage when tp > 1) must not exceed what the planner counted for it
 * (tsr_rank_stats n_bytes_device_planned), the figure --gpu-memory is checked against.
 * --teacher-force feeds both engines the reference's greedy token at every step and
 * compares logits only: for random-weight quantized models, whose top logits are often
 * closer than the rounding of a re-associated sum, once amplified by activation
 * quantization (see ../shared/models/README.md section 8.3), greedy paths may legitimately
 * part; the per-step logits must still agree.
 * The leader also loads the whole model in-process (tp 1, pp 1) and, for three prompts,
 * compares the greedy ids (identical) and every logit of every step (within --tol) of the
 * replica with the reference (prompt tokens in their order classes, worker/model.h
 * tsr_order_class, on both sides: the class travels to every rank and stage). It then checks what
 * each rank read of the file: the sum of the ranks' layer bytes equals the model's (no rank read
 * another's tiles), and each rank's share is what the plan says. Exit 0 when all holds; 1 with a
 * message otherwise. With --expect-refusal TEXT the layout must be refused on every rank with a
 * message containing TEXT.
 */
#include "worker/model.h"
#include "worker/replica.h"

#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kernels/util.h"

static int fail(const char *what)
{
    fprintf(stderr, "replica_check: FAILED: %s\n", what);
    tsr_comm_mpi_abort(1);
    return 1;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                         {"tp", required_argument, 0, 't'},
                                         {"pp", required_argument, 0, 'p'},
                                         {"layers", required_argument, 0, 'l'},
                                         {"tol", required_argument, 0, 'e'},
                                         {"n", required_argument, 0, 'n'},
                                         {"expect-refusal", required_argument, 0, 'r'},
                                         {"teacher-force", no_argument, 0, 'f'},
                                         {"prompt-ids", required_argument, 0, 'P'},
                                         {"device", required_argument, 0, 'd'},
                                         {"gpu-memory", required_argument, 0, 'G'},
                                         {"kv-type", required_argument, 0, 'K'},
                                         {"batch-step", no_argument, 0, 'B'},
                                         {"expect-transport", required_argument, 0, 'T'},
                                         {"stall-followers", required_argument, 0, 'S'},
                                         {"dump", required_argument, 0, 'D'},
                                         {"check-device-memory", no_argument, 0, 'M'},
                                         {"expect-q80-lanes", no_argument, 0, 'Q'},
                                         {0, 0, 0, 0}};
    /* the replica runs on the CPU unless --device says otherwise (the reference always does) */
    /* f32 KV unless --kv-type says otherwise: the layouts' float32 logits agree within 1e-4,
     * which an f16 cache's rounding of re-associated K/V sums would exceed */
    tsr_replica_params rp = {.tp = 1,
                             .pp = 1,
                             .n_threads = 1,
                             .n_ctx = 256,
                             .n_batch = 16,
                             .device = "cpu",
                             .kv_type = "f32"};
    const char *model = NULL, *refusal = NULL, *prompt_ids = NULL, *transport = NULL;
    const char *dump_path = NULL; /* --dump FILE: the replica's logits, raw floats (leader) */
    bool batch_step = false, check_dev_mem = false, expect_lanes = false;
    long stall_ms = 0;
    double tol = 1e-4;
    tsr_kv_type kv_type = TSR_KV_F32;
    int n_gen = 24, c;
    bool teacher = false;
    int n_argmax_diff = 0;
    while ((c = getopt_long(argc, argv, "m:n:", opts, NULL)) != -1) {
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
        case 'l':
            rp.layers = optarg;
            break;
        case 'e':
            tol = atof(optarg);
            break;
        case 'n':
            n_gen = atoi(optarg);
            break;
        case 'r':
            refusal = optarg;
            break;
        case 'f':
            teacher = true;
            break;
        case 'd':
            rp.device = optarg;
            break;
        case 'G':
            rp.gpu_memory = strtoull(optarg, NULL, 10);
            break;
        case 'K': /* both engines store the KV cache in this type */
            if (!tsr_kv_type_parse(optarg, &kv_type)) return fail("--kv-type: f32, f16 or q8_0");
            rp.kv_type = optarg;
            break;
        case 'P':
            prompt_ids = optarg;
            break;
        case 'Q':
            expect_lanes = true;
            break;
        case 'B':
            batch_step = true;
            break;
        case 'T':
            transport = optarg;
            break;
        case 'S':
            stall_ms = atol(optarg);
            rp.timeout_ms = stall_ms;
            break;
        case 'D':
            dump_path = optarg;
            break;
        case 'M':
            check_dev_mem = true;
            break;
        default:
            return 2;
        }
    }
    if (!model) return 2;
    char err[1024];
    tsr_replica *rep;
    int rc = tsr_replica_open(model, &rp, &rep, err, sizeof err);
    if (refusal) {
        if (rc == 0) {
            fprintf(stderr, "replica_check: FAILED: layout tp %d pp %d was accepted\n", rp.tp,
                    rp.pp);
            tsr_replica_shutdown(rep, err, sizeof err);
            tsr_replica_close(rep);
            return 1;
        }
        if (!strstr(err, refusal)) {
            fprintf(stderr, "replica_check: FAILED: refusal message lacks '%s': %s\n", refusal,
                    err);
            return 1;
        }
        printf("replica_check: refused as expected: %s\n", err);
        return 0;
    }
    if (rc != 0) {
        fprintf(stderr, "replica_check: %s\n", err);
        return fail("open");
    }
    const int n_ranks = tsr_replica_size(rep);
    if (transport && !strstr(tsr_replica_transport(rep), transport)) {
        fprintf(stderr, "replica_check: rank %d: transport expected '%s', got '%s'\n",
                tsr_replica_rank(rep), transport, tsr_replica_transport(rep));
        return fail("transport");
    }
    if (tsr_replica_is_leader(rep))
        printf("replica_check: rank 0 transport: %s\n", tsr_replica_transport(rep));
    if (stall_ms > 0) {
        if (!tsr_replica_is_leader(rep)) {
            struct timespec ts = {stall_ms * 4 / 1000, (stall_ms * 4 % 1000) * 1000000L};
            nanosleep(&ts, NULL); /* stuck: no answer to the leader's step */
            _exit(3);
        }
        int32_t toks[5] = {1, 2, 3, 4, 5};
        const float *lg;
        const uint64_t t0 = tsr_now_ns();
        rc = tsr_replica_forward(rep, toks, 5, 0, &lg, err, sizeof err);
        const double waited_ms = (double)(tsr_now_ns() - t0) / 1e6;
        printf("replica_check: step with stuck followers: rc %d after %.0f ms: %s\n", rc, waited_ms,
               rc ? err : "(no error)");
        if (rc == 0 || (!strstr(err, "did not answer within") && !strstr(err, "no answer from")) ||
            waited_ms > 3.0 * stall_ms)
            return fail("a stuck peer must become an error naming it within the deadline");
        printf("replica_check: PASS: stuck peer reported as an error in %.0f ms (deadline %ld "
               "ms)\n",
               waited_ms, stall_ms);
        fflush(stdout);
        tsr_comm_mpi_abort(0);
    }
    if (!tsr_replica_is_leader(rep)) {
        if (tsr_replica_follow(rep, err, sizeof err) != 0 ||
            tsr_replica_stats(rep, NULL, err, sizeof err) != 0) {
            fprintf(stderr, "replica_check: rank %d: %s\n", tsr_replica_rank(rep), err);
            return fail("follow");
        }
        tsr_replica_close(rep);
        return 0;
    }

    /* Reference: the whole model in this process, with the replica's KV cache type. */
    kv_type = tsr_replica_kv_type(rep);
    tsr_gguf *g;
    tsr_model *m;
    tsr_ctx *ref;
    if (tsr_gguf_open(model, &g, err, sizeof err) || tsr_model_load(g, &m, err, sizeof err) ||
        tsr_ctx_new_kv(m, 256, 16, 1, kv_type, &ref, err, sizeof err)) {
        fprintf(stderr, "replica_check: reference: %s\n", err);
        return fail("reference");
    }
    const int32_t V = m->hp.n_vocab;
    /* Three built-in prompts (ids reduced mod the vocabulary), or the user's (--prompt-ids
     * "1,2,3;4,5": prompts separated by ';', at most 3 of at most 64 ids). */
    int32_t prompts[3][64] = {
        {1, 403, 407, 261, 378}, {1, 359, 329, 421, 417, 411, 360, 265, 284, 411, 303, 299}, {1}};
    int plen[3] = {5, 12, 1}, n_prompts = 3;
    if (prompt_ids) {
        n_prompts = 0;
        for (const char *q = prompt_ids; *q && n_prompts < 3;) {
            int n = 0;
            while (*q && *q != ';' && n < 64) {
                char *end;
                long v = strtol(q, &end, 10);
                if (end == q) return fail("--prompt-ids: expected integers");
                prompts[n_prompts][n++] = (int32_t)v;
                q = *end == ',' ? end + 1 : end;
            }
            plen[n_prompts++] = n;
            if (*q == ';') q++;
        }
    }
    double max_diff = 0.0;
    float *ref_logits = malloc(sizeof(float) * (size_t)V);
    /* every logit the replica returns, in order, for a bitwise comparison of two runs (repack
     * on / off: tests/CMakeLists.txt) */
    FILE *dump = dump_path ? fopen(dump_path, "wb") : NULL;
    if (dump_path && !dump) return fail("--dump: cannot create the file");
    for (int k = 0; k < n_prompts; k++) {
        int32_t toks[64];
        for (int i = 0; i < plen[k]; i++) toks[i] = prompts[k][i] % V;
        const float *lr, *ld;
        int32_t pos = plen[k];
        /* the prompt's tokens in their order classes (worker/model.h), on every rank */
        tsr_ctx_set_prompt_len(ref, plen[k]);
        tsr_replica_set_prompt_len(rep, plen[k]);
        if (tsr_forward(ref, toks, plen[k], 0, false, &lr, err, sizeof err) ||
            tsr_replica_forward(rep, toks, plen[k], 0, &ld, err, sizeof err)) {
            fprintf(stderr, "replica_check: %s\n", err);
            return fail("prefill");
        }
        for (int step = 0; step < n_gen; step++) {
            memcpy(ref_logits, lr, sizeof(float) * (size_t)V);
            if (dump && fwrite(ld, sizeof(float), (size_t)V, dump) != (size_t)V)
                return fail("--dump: write");
            int32_t br = 0, bd = 0;
            for (int32_t v = 0; v < V; v++) {
                double d = fabs((double)ref_logits[v] - (double)ld[v]);
                if (!(d <= tol)) {
                    fprintf(stderr,
                            "replica_check: prompt %d step %d: logit %d expected %.7g (tp 1 pp "
                            "1), got %.7g (tp %d pp %d), |diff| %.3g > %.3g\n",
                            k, step, v, ref_logits[v], ld[v], rp.tp, rp.pp, d, tol);
                    return fail("logits differ");
                }
                if (d > max_diff) max_diff = d;
                if (ref_logits[v] > ref_logits[br]) br = v;
                if (ld[v] > ld[bd]) bd = v;
            }
            if (br != bd && teacher) {
                n_argmax_diff++;
                bd = br;
            }
            if (br != bd) {
                fprintf(stderr, "replica_check: prompt %d step %d: greedy id expected %d, got %d\n",
                        k, step, br, bd);
                return fail("greedy ids differ");
            }
            if (pos + 1 >= 256) break;
            if (tsr_forward(ref, &br, 1, pos, false, &lr, err, sizeof err) ||
                tsr_replica_forward(rep, &bd, 1, pos, &ld, err, sizeof err)) {
                fprintf(stderr, "replica_check: %s\n", err);
                return fail("decode");
            }
            pos++;
        }
    }
    if (batch_step) {
        /* One step of three sequences (the prompts, cut to fit the batch of 16: 5 + 10 + 1
         * tokens), each in its own KV block, every token wanting logits: with pp > 1 the
         * step runs as pipeline micro-batches and the logits rows come back in batch order. */
        enum { NB = 16 };
        int32_t tok[NB], pos[NB], seq[NB], nblk[3] = {1, 1, 1};
        uint8_t want[NB], ord[NB];
        static const int32_t blk[3] = {0, 1, 2};
        const int32_t *tables[3] = {&blk[0], &blk[1], &blk[2]};
        int lens[3] = {plen[0] < 5 ? plen[0] : 5, plen[1] < 10 ? plen[1] : 10,
                       plen[2] < 1 ? plen[2] : 1};
        int n = 0;
        for (int k = 0; k < 3; k++)
            for (int i = 0; i < lens[k]; i++, n++) {
                tok[n] = prompts[k][i] % V;
                pos[n] = i;
                seq[n] = k;
                want[n] = 1;
                ord[n] = tsr_order_class(i, lens[k]);
            }
        const tsr_batch b = {.n_tokens = n,
                             .tokens = tok,
                             .pos = pos,
                             .seq = seq,
                             .want_logits = want,
                             .n_seqs = 3,
                             .block_tables = tables,
                             .n_blocks = nblk,
                             .order = ord};
        const float *ld;
        if (tsr_replica_step(rep, &b, &ld, err, sizeof err) != 0) {
            fprintf(stderr, "replica_check: batch step: %s\n", err);
            return fail("batch step");
        }
        if (dump && fwrite(ld, sizeof(float) * (size_t)V, (size_t)n, dump) != (size_t)n)
            return fail("--dump: write");
        double bmax = 0.0;
        for (int k = 0, row = 0; k < 3; k++) {
            const float *lr;
            if (lens[k] == 0) continue;
            tsr_ctx_set_prompt_len(ref, lens[k]);
            if (tsr_forward(ref, &tok[row], lens[k], 0, true, &lr, err, sizeof err) != 0) {
                fprintf(stderr, "replica_check: reference: %s\n", err);
                return fail("reference");
            }
            for (int i = 0; i < lens[k]; i++, row++)
                for (int32_t v = 0; v < V; v++) {
                    const double d =
                        fabs((double)lr[(size_t)i * V + v] - (double)ld[(size_t)row * V + v]);
                    if (!(d <= tol)) {
                        fprintf(stderr,
                                "replica_check: batch step: sequence %d token %d logit %d "
                                "expected %.7g, got %.7g (tp %d pp %d), |diff| %.3g > %.3g\n",
                                k, i, v, lr[(size_t)i * V + v], ld[(size_t)row * V + v], rp.tp,
                                rp.pp, d, tol);
                        return fail("batch step logits differ");
                    }
                    if (d > bmax) bmax = d;
                }
        }
        printf("replica_check: batch step of %d tokens in 3 sequences: max |logit diff| %.3g\n", n,
               bmax);
    }
    if (dump && fclose(dump) != 0) return fail("--dump: close");
    tsr_rank_stats *st = calloc((size_t)n_ranks, sizeof *st);
    if (tsr_replica_shutdown(rep, err, sizeof err) || tsr_replica_stats(rep, st, err, sizeof err)) {
        fprintf(stderr, "replica_check: %s\n", err);
        return fail("stats");
    }
    /* What each rank read of the file: layer weights are split without overlap (KV heads
     * may be replicated when tp > n_head_kv), so the layer bytes of all ranks add up to the
     * model's; the embedding (first stage) and head (last stage) come on top. */
    const tsr_plan *plan = tsr_replica_plan(rep);
    uint64_t total_layers = 0;
    for (int32_t l = 0; l < m->n_layer_local; l++) {
        const tsr_layer *L = &m->layers[l];
        const tsr_weight *ws[7] = {&L->wq,     &L->wk,   &L->wv,    &L->wo,
                                   &L->w_gate, &L->w_up, &L->w_down};
        for (int k = 0; k < 7; k++) total_layers += ws[k]->row_bytes * (uint64_t)ws[k]->n_out;
    }
    const uint64_t embd = m->tok_embd.row_bytes * (uint64_t)V;
    const uint64_t head = m->output.row_bytes * (uint64_t)V;
    uint64_t sum_layers = 0;
    for (int i = 0; i < n_ranks; i++) {
        const tsr_plan_rank *pr = &plan->ranks[i];
        uint64_t l = st[i].n_bytes_loaded;
        if (pr->layer_begin == 0) l -= embd;
        if (pr->layer_end == m->hp.n_layer) {
            uint64_t share = head * (uint64_t)(pr->vocab_end - pr->vocab_begin) / (uint64_t)V;
            if (!(m->tied && pr->layer_begin == 0)) l -= share;
        }
        printf("rank %d: stage %d tp %d layers %d-%d read %.1f KiB (layers %.1f KiB); compute "
               "%.0f us/token, comm %.0f us/token, %.0f bytes sent/token\n",
               i, st[i].stage, st[i].tp_rank, pr->layer_begin, pr->layer_end - 1,
               st[i].n_bytes_loaded / 1024.0, l / 1024.0,
               st[i].t_compute_ns / 1e3 / (double)(st[i].n_tokens ? st[i].n_tokens : 1),
               st[i].t_comm_ns / 1e3 / (double)(st[i].n_tokens ? st[i].n_tokens : 1),
               (double)st[i].n_bytes_sent / (double)(st[i].n_tokens ? st[i].n_tokens : 1));
        sum_layers += l;
    }
    /* --expect-q80-lanes: every rank and the reference run Q8_0 in the lanes order */
    for (int i = 0; expect_lanes && i < n_ranks; i++) {
        printf("rank %d: %d Q8_0 matrices in the lanes order\n", i, st[i].n_q80_lanes);
        if (st[i].n_q80_lanes <= 0) return fail("--expect-q80-lanes: a rank keeps ggml's order");
    }
    if (expect_lanes && m->n_q80_lanes <= 0)
        return fail("--expect-q80-lanes: the reference keeps ggml's order");
    for (int i = 0; check_dev_mem && i < n_ranks; i++) {
        printf("rank %d: device %.1f KiB in use, %.1f KiB planned\n", i,
               st[i].n_bytes_device / 1024.0, st[i].n_bytes_device_planned / 1024.0);
        if (st[i].n_bytes_device == 0 || st[i].n_bytes_device_planned == 0)
            return fail("--check-device-memory: a rank has no device figures (not a GPU rank?)");
        if (st[i].n_bytes_device > st[i].n_bytes_device_planned) {
            fprintf(stderr,
                    "replica_check: rank %d uses %llu device bytes, the planner counted %llu\n", i,
                    (unsigned long long)st[i].n_bytes_device,
                    (unsigned long long)st[i].n_bytes_device_planned);
            return fail("device memory over the plan");
        }
    }
    bool kv_replicated = rp.tp > m->hp.n_head_kv;
    if (!kv_replicated && sum_layers != total_layers) {
        fprintf(stderr,
                "replica_check: ranks read %llu bytes of layer weights, the model has %llu\n",
                (unsigned long long)sum_layers, (unsigned long long)total_layers);
        return fail("loader reads");
    }
    if (kv_replicated && (sum_layers < total_layers || sum_layers > total_layers * 2)) {
        return fail("loader reads (replicated KV)");
    }
    if (teacher)
        printf("replica_check: teacher-forced: %d steps where the argmax differed\n",
               n_argmax_diff);
    printf("replica_check: OK tp %d pp %d: greedy ids identical, max |logit diff| %.3g (tol %.3g), "
           "layer bytes read %llu of %llu\n",
           rp.tp, rp.pp, max_diff, tol, (unsigned long long)sum_layers,
           (unsigned long long)total_layers);
    free(st);
    free(ref_logits);
    tsr_ctx_free(ref);
    tsr_model_free(m);
    tsr_gguf_close(g);
    tsr_replica_close(rep);
    return 0;
}
