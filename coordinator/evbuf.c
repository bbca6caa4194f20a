/*
 * evbuf.c — the pending output of a request between two sends (see evbuf.h).
 */
#include "coordinator/evbuf.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static bool grow(void **p, size_t *cap, size_t need, size_t elem)
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
    tsr_evbuf_init(b, k);
}

bool tsr_evbuf_append(tsr_evbuf *b, const tsr_event *ev)
{
    if (b->oom) return false;
    if (ev->n_ids + ev->text_len == 0) return true;
    size_t need = b->n_ids + ev->n_ids;
    bool ok = grow((void **)&b->ids, &b->cap_ids, need, sizeof(int32_t));
    if (ok && b->n_top >= 0) ok = grow((void **)&b->lp_chosen, &b->cap_chosen, need, sizeof(float));
    if (ok && b->n_top > 0)
        ok = grow((void **)&b->lp_top, &b->cap_top, need * (size_t)b->n_top, sizeof(tsr_logprob));
    ok = ok && grow((void **)&b->text, &b->cap_text, b->text_len + ev->text_len + 1, 1);
    if (!ok) {
        b->oom = true;
        return false;
    }
    if (ev->n_ids) memcpy(b->ids + b->n_ids, ev->ids, ev->n_ids * sizeof(int32_t));
    if (b->n_top >= 0) {
        for (size_t i = 0; i < ev->n_ids; i++)
            b->lp_chosen[b->n_ids + i] = ev->chosen_logprobs ? ev->chosen_logprobs[i] : NAN;
        size_t k = (size_t)b->n_top;
        for (size_t i = 0; i < ev->n_ids * k; i++) {
            tsr_logprob lp = {-1, NAN};
            size_t row = i / k, col = i % k;
            if (ev->top_logprobs && col < (size_t)ev->n_top)
                lp = ev->top_logprobs[row * (size_t)ev->n_top + col];
            b->lp_top[b->n_ids * k + i] = lp;
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
    if (b->text) b->text[0] = '\0';
}

int64_t tsr_evbuf_bytes(const tsr_evbuf *b)
{
    int64_t per_id = (int64_t)sizeof(int32_t);
    if (b->n_top >= 0) per_id += (int64_t)sizeof(float);
    if (b->n_top > 0) per_id += (int64_t)b->n_top * (int64_t)sizeof(tsr_logprob);
    return (int64_t)b->n_ids * per_id + (int64_t)b->text_len;
}
