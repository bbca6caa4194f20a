/*
 * evbuf.h — a request's engine output not yet sent: the accumulator at the engine seam.
 *
 * Why its own module: every front end that relays engine events (the gRPC server, the
 * HTTP front door — on a replica over the engine, on the coordinator over the proxy)
 * collects the same things between two sends: the new token ids, the text they completed,
 * and per id the chosen token's logprob and the top-k alternatives. The engine callback
 * appends (it must only copy and return); the sender reads and clears.
 *
 * Layout: ids[n_ids]; text[text_len] (NUL-terminated); with logprobs (n_top >= 0)
 * lp_chosen[n_ids] (NaN when the event had none) and, for n_top > 0, lp_top[n_ids × n_top]
 * row-major (entries past what the event carried: id -1, NaN). Not thread-safe: the owner
 * holds its lock around every call.
 *
 * Token text (has_pieces: some event carried it — the coordinator's proxy, which has no
 * vocabulary): chosen token i's bytes are pieces[chosen_piece[i].off ..+ .len], alternative
 * (i, j)'s pieces[top_piece[i × n_top + j]...]; entries an event did not carry are empty.
 */
#ifndef TSR_EVBUF_H
#define TSR_EVBUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "coordinator/engine.h"

/* A byte range of tsr_evbuf.pieces. */
typedef struct {
    uint32_t off, len;
} tsr_evbuf_span;

typedef struct {
    int32_t n_top; /* -1: no logprobs; 0: the chosen token's only; k: k alternatives */
    int32_t *ids;
    size_t n_ids, cap_ids;
    char *text;
    size_t text_len, cap_text;
    float *lp_chosen;
    size_t cap_chosen;
    tsr_logprob *lp_top;
    size_t cap_top;
    bool has_pieces;
    tsr_evbuf_span *chosen_piece, *top_piece;
    size_t cap_chosen_piece, cap_top_piece;
    char *pieces;
    size_t pieces_len, cap_pieces;
    bool oom; /* an append ran out of memory: the output is incomplete */
} tsr_evbuf;

/* The growth rule of every array here, shared with the front ends' own output buffers:
 * make room for `need` elements of `elem` bytes in *p (capacity *cap elements, doubling from
 * 16). true when there is room (*p and *cap updated); false when memory ran out (*p and *cap
 * untouched, still the caller's to free). */
bool tsr_evbuf_grow(void **p, size_t *cap, size_t need, size_t elem);

/* Empty buffer keeping n_top alternatives per token (-1: no logprobs). */
void tsr_evbuf_init(tsr_evbuf *b, int32_t n_top);
void tsr_evbuf_free(tsr_evbuf *b); /* leaves it empty (init'ed again with its n_top) */

/* Append a TOKENS event (ids, text, logprobs, token text). Nothing when it carries none. false when
 * memory ran out (b->oom is set and the event is dropped whole). */
bool tsr_evbuf_append(tsr_evbuf *b, const tsr_event *ev);

/* Forget the pending output (after it was sent); keeps the memory. */
void tsr_evbuf_clear(tsr_evbuf *b);

/* Bytes the pending output holds (ids, text, logprobs, token text), for output bounds. */
int64_t tsr_evbuf_bytes(const tsr_evbuf *b);

#endif
