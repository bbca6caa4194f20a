/*
 * metrics.h — Prometheus metrics of a serving process (text exposition format 0.0.4).
 *
 * Why its own module: the gRPC server, the HTTP front door and (later) the coordinator
 * daemon all serve requests through the engine seam (coordinator/engine.h) and export the
 * same families. Request-level figures are observed at that seam: tsr_metrics_submit
 * submits a request with a callback of its own that records the times and lengths and then
 * forwards every event to the caller's callback unchanged, so both front ends count the
 * same way without knowing about each other. Engine-level gauges and the per-rank
 * figures (compute / communication seconds, bytes sent — what Admin.Status reports) are
 * read from tsr_engine_get_status when /metrics is scraped.
 *
 * Families (base units, `tessera_` prefix):
 *   tessera_requests_total{finish_reason}           counter (stop, length, eos, cancelled, error)
 *   tessera_requests_rejected_total{reason}         counter (invalid, queue_full, draining, down,
 * nomem) tessera_time_to_first_token_seconds             histogram (submit -> first token)
 *   tessera_inter_token_latency_seconds             histogram (per generated token)
 *   tessera_e2e_request_latency_seconds             histogram (submit -> finish)
 *   tessera_request_queue_time_seconds              histogram (submit -> first scheduled)
 *   tessera_request_prompt_tokens                   histogram
 *   tessera_request_generation_tokens               histogram
 *   tessera_requests_running / _waiting             gauges
 *   tessera_kv_blocks_used / tessera_kv_blocks_capacity gauges (a gauge may not end in _total)
 *   tessera_preemptions_total                       counter
 *   tessera_generation_tokens_total                 counter
 *   tessera_spec_draft_tokens_total / tessera_spec_accepted_tokens_total counters
 *   tessera_healthy, tessera_draining               gauges (0 / 1)
 *   tessera_rank_compute_seconds_total{rank,stage,tp_rank}, tessera_rank_comm_seconds_total,
 *   tessera_rank_sent_bytes_total, tessera_rank_steps_total   counters
 *   tessera_http_responses_total{code}              counter (HTTP front door)
 *
 * Thread-safe. The submit callback runs on the engine thread and only takes a short mutex.
 */
#ifndef TSR_METRICS_H
#define TSR_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "coordinator/engine.h"

typedef struct tsr_metrics tsr_metrics;

/* 0 ok, negative on out of memory (*out NULL). */
int tsr_metrics_new(tsr_metrics **out);
void tsr_metrics_free(tsr_metrics *m); /* NULL is fine; after every request finished */

/* tsr_engine_submit with observation: same arguments, same return values. With m NULL it
 * is exactly tsr_engine_submit. Rejections are counted by reason. */
int tsr_metrics_submit(tsr_metrics *m, tsr_engine *e, const tsr_engine_request *rq, uint64_t *id,
                       char *err, size_t err_len);

/* The same around another submission path with the engine's contract (the coordinator's
 * proxy, coordinator/coord_server.h): fn(ctx, rq', ...) submits rq' (rq with the
 * observer's callback) and returns TSR_ENGINE_* codes (other negative codes count as
 * rejections of reason "other"); on OK exactly one FINISH must follow. */
typedef int (*tsr_metrics_submit_fn)(void *ctx, const tsr_engine_request *rq, uint64_t *id,
                                     char *err, size_t err_len);
int tsr_metrics_submit_with(tsr_metrics *m, tsr_metrics_submit_fn fn, void *ctx,
                            const tsr_engine_request *rq, uint64_t *id, char *err, size_t err_len);

/* Observation of a request that does not pass through a submit function: the
 * coordinator's gRPC Generate proxy, which relays a replica's stream. Begin when it
 * arrives, feed it the events it produces (TOKENS: the ids for time to first token and
 * inter-token latency; FINISH: finish reason, lengths, queue time — it ends the observation
 * and frees r), or end it with tsr_metrics_req_rejected (a TSR_ENGINE_* code) when it was
 * refused before any token. Begin returns NULL for a NULL m or out of memory; the other
 * calls take NULL (and do nothing). */
typedef struct tsr_metrics_req tsr_metrics_req;
tsr_metrics_req *tsr_metrics_req_begin(tsr_metrics *m);
void tsr_metrics_req_event(tsr_metrics_req *r, const tsr_event *ev);
void tsr_metrics_req_rejected(tsr_metrics_req *r, int engine_rc);

/* Count one HTTP response by status code (NULL m: nothing). */
void tsr_metrics_count_http(tsr_metrics *m, int status);

/* The exposition text (format 0.0.4) of m and of the engine's status (e may be NULL).
 * *out is malloc'd (the caller frees), *len its length. 0, or negative on out of memory. */
int tsr_metrics_render(tsr_metrics *m, tsr_engine *e, char **out, size_t *len);

#endif
