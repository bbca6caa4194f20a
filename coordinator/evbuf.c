/*
 * evbuf.c — the pending output of a request between two sends (see evbuf.h).
 */
#include "coordinator/evbuf.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

bool tsr_evbuf_grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) return true;
    size_t nc = *cap ? *cap : 16;
    while (nc < need) nc *= 2;
    void *q = realloc(*p, nc * elem);
    if (!q) return false;
    *p = q;
    *cap = nc;
    return true;
}

/* Copy one piece into b->pieces (room was made). */
static tsr_evbuf_span put_piece(tsr_evbuf *b, const tsr_token_piece *p)
{
    tsr_evbuf_span sp = {(uint32_t)b->pieces_len, (uint32_t)p->n_bytes};
    if (p->n_bytes) memcpy(b->pieces + b->pieces_len, p->bytes, p->n_bytes);
    b->pieces_len += p->n_bytes;
    return sp;
}

void tsr_evbuf_init(tsr_evbuf *b, int32_t n_top)
{
    memset(b, 0, sizeof *b);
    b->n_top = n_top;
}

void tsr_evbuf_free(tsr_evbuf *b)
{
    int32_t k = b->n_top;
    free(b->ids);
    free(b->text);
    free(b->lp_chosen);
    free(b->lp_top);
    free(b->chosen_piece);
    free(b->top_piece);
    free(b->pieces);
    tsr_evbuf_init(b, k);
}

bool tsr_evbuf_append(tsr_evbuf *b, const tsr_event *ev)
{
    if (b->oom) return false;
    if (ev->n_ids + ev->text_len == 0) return true;
    size_t need = b->n_ids + ev->n_ids;
    bool ok = tsr_evbuf_grow((void **)&b->ids, &b->cap_ids, need, sizeof(int32_t));
    if (ok && b->n_top >= 0)
        ok = tsr_evbuf_grow((void **)&b->lp_chosen, &b->cap_chosen, need, sizeof(float));
    if (ok && b->n_top > 0)
        ok = tsr_evbuf_grow((void **)&b->lp_top, &b->cap_top, need * (size_t)b->n_top,
                            sizeof(tsr_logprob));
    ok = ok && tsr_evbuf_grow((void **)&b->text, &b->cap_text, b->text_len + ev->text_len + 1, 1);
    /* token text: from the first event that carries some on */
    const bool pieces = b->n_top >= 0 && (b->has_pieces || ev->chosen_pieces || ev->top_pieces);
    size_t n_piece_bytes = 0;
    for (size_t i = 0; pieces && ev->chosen_pieces && i < ev->n_ids; i++)
        n_piece_bytes += ev->chosen_pieces[i].n_bytes;
    const size_t k = b->n_top > 0 ? (size_t)b->n_top : 0;
    const size_t ek = ev->n_top > 0 ? (size_t)ev->n_top : 0;
    for (size_t i = 0; pieces && ev->top_pieces && i < ev->n_ids * ek; i++)
        if (i % ek < k) n_piece_bytes += ev->top_pieces[i].n_bytes;
    if (ok && pieces) {
        ok = tsr_evbuf_grow((void **)&b->chosen_piece, &b->cap_chosen_piece, need,
                            sizeof(tsr_evbuf_span)) &&
             (k == 0 || tsr_evbuf_grow((void **)&b->top_piece, &b->cap_top_piece, need * k,
                                       sizeof(tsr_evbuf_span))) &&
             tsr_evbuf_grow((void **)&b->pieces, &b->cap_pieces, b->pieces_len + n_piece_bytes + 1,
                            1) &&
             b->pieces_len + n_piece_bytes < UINT32_MAX;
    }
    if (!ok) {
        b->oom = true;
        return false;
    }
    if (ev->n_ids) memcpy(b->ids + b->n_ids, ev->ids, ev->n_ids * sizeof(int32_t));
    if (b->n_top >= 0) {
        for (size_t i = 0; i < ev->n_ids; i++)
            b->lp_chosen[b->n_ids + i] = ev->chosen_logprobs ? ev->chosen_logprobs[i] : NAN;
        for (size_t i = 0; i < ev->n_ids * k; i++) {
            tsr_logprob lp = {-1, NAN};
            size_t row = i / k, col = i % k;
            if (ev->top_logprobs && col < (size_t)ev->n_top)
                lp = ev->top_logprobs[row * (size_t)ev->n_top + col];
            b->lp_top[b->n_ids * k + i] = lp;
        }
    }
    if (pieces) {
        if (!b->has_pieces) { /* what came before had none: empty */
            memset(b->chosen_piece, 0, b->n_ids * sizeof(tsr_evbuf_span));
            if (k) memset(b->top_piece, 0, b->n_ids * k * sizeof(tsr_evbuf_span));
            b->has_pieces = true;
        }
        for (size_t i = 0; i < ev->n_ids; i++) {
            tsr_evbuf_span sp = {0, 0};
            if (ev->chosen_pieces) sp = put_piece(b, &ev->chosen_pieces[i]);
            b->chosen_piece[b->n_ids + i] = sp;
            for (size_t j = 0; j < k; j++) {
                tsr_evbuf_span tp = {0, 0};
                if (ev->top_pieces && j < ek) tp = put_piece(b, &ev->top_pieces[i * ek + j]);
                b->top_piece[(b->n_ids + i) * k + j] = tp;
            }
        }
    }
    if (ev->text_len) memcpy(b->text + b->text_len, ev->text, ev->text_len);
    b->n_ids += ev->n_ids;
    b->text_len += ev->text_len;
    b->text[b->text_len] = '\0';
    return true;
}

void tsr_evbuf_clear(tsr_evbuf *b)
{
    b->n_ids = 0;
    b->text_len = 0;
    b->pieces_len = 0;
    if (b->text) b->text[0] = '\0';
}

int64_t tsr_evbuf_bytes(const tsr_evbuf *b)
{
    int64_t per_id = (int64_t)sizeof(int32_t);
    if (b->n_top >= 0) per_id += (int64_t)sizeof(float);
    if (b->n_top > 0) per_id += (int64_t)b->n_top * (int64_t)sizeof(tsr_logprob);
    if (b->has_pieces) per_id += (int64_t)(1 + (b->n_top > 0 ? b->n_top : 0)) * 8;
    return (int64_t)b->n_ids * per_id + (int64_t)b->text_len + (int64_t)b->pieces_len;
}
