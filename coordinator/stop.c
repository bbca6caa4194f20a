/*
 * stop.c — see stop.h.
 *
 * Invariant between calls: buf[emitted .. emitted + held) is the held-back tail, the longest
 * suffix of the text so far that is a proper prefix of some stop string (so it is shorter than
 * the longest stop string), and the text so far contains no complete stop string. Hence a new
 * match must end inside the new delta and can start no earlier than the held tail: the search
 * on each push covers only held + delta bytes.
 */
#include "coordinator/stop.h"
#include "kernels/util.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char tsr_stop_empty[1] = "";

int tsr_stop_init(tsr_stop *st, const char *const *stops, size_t n_stops, char *err, size_t err_len)
{
    memset(st, 0, sizeof *st);
    st->matched = -1;
    if (n_stops == 0) return 0;
    for (size_t i = 0; i < n_stops; i++) {
        if (!stops[i] || !stops[i][0]) {
            tsr_set_err(err, err_len, "stop string %zu is %s; stop strings must be non-empty", i,
                        stops[i] ? "empty" : "NULL");
            return -1;
        }
    }
    st->stops = calloc(n_stops, sizeof *st->stops);
    st->lens = calloc(n_stops, sizeof *st->lens);
    if (!st->stops || !st->lens) goto oom;
    st->n_stops = n_stops;
    for (size_t i = 0; i < n_stops; i++) {
        size_t len = strlen(stops[i]);
        st->stops[i] = malloc(len + 1);
        if (!st->stops[i]) goto oom;
        memcpy(st->stops[i], stops[i], len + 1);
        st->lens[i] = len;
        if (len > st->max_len) st->max_len = len;
    }
    return 0;
oom:
    tsr_stop_free(st);
    tsr_set_err(err, err_len, "stop strings: out of memory");
    return -1;
}

void tsr_stop_free(tsr_stop *st)
{
    if (st->stops) {
        for (size_t i = 0; i < st->n_stops; i++) free(st->stops[i]);
    }
    free(st->stops);
    free(st->lens);
    free(st->buf);
    memset(st, 0, sizeof *st);
    st->matched = -1;
}

int tsr_stop_matched(const tsr_stop *st)
{
    return st->matched;
}

size_t tsr_stop_held(const tsr_stop *st)
{
    return st->held;
}

/* Move the held tail to the front of buf, forgetting what the previous call handed out. */
static void drop_emitted(tsr_stop *st)
{
    if (st->emitted) {
        memmove(st->buf, st->buf + st->emitted, st->held);
        st->emitted = 0;
    }
}

/* Length of the longest suffix of t[0..n) that is a proper prefix of some stop string. */
static size_t held_suffix(const tsr_stop *st, const char *t, size_t n)
{
    if (st->max_len == 0) return 0;
    size_t k = st->max_len - 1;
    if (k > n) k = n;
    for (; k > 0; k--) {
        const char *suf = t + n - k;
        for (size_t i = 0; i < st->n_stops; i++) {
            if (st->lens[i] > k && memcmp(suf, st->stops[i], k) == 0) return k;
        }
    }
    return 0;
}

int tsr_stop_push(tsr_stop *st, const char *delta, size_t len, const char **out, size_t *out_len)
{
    *out = tsr_stop_empty;
    *out_len = 0;
    if (st->matched >= 0) return 1;
    drop_emitted(st);

    size_t total = st->held + len;
    if (total > st->buf_cap) {
        size_t cap = st->buf_cap ? st->buf_cap : 64;
        while (cap < total) cap *= 2;
        char *nb = realloc(st->buf, cap);
        if (!nb) return -1;
        st->buf = nb;
        st->buf_cap = cap;
    }
    if (len) memcpy(st->buf + st->held, delta, len);
    const char *t = st->buf ? st->buf : tsr_stop_empty; /* NULL until the first bytes */

    /* the match that ends first; among those ending together, the longest */
    size_t best_end = SIZE_MAX, best_len = 0;
    int best = -1;
    for (size_t i = 0; i < st->n_stops; i++) {
        size_t L = st->lens[i];
        if (L > total) continue;
        size_t from = st->held >= L - 1 ? st->held - (L - 1) : 0;
        const char *hit = memmem(t + from, total - from, st->stops[i], L);
        if (!hit) continue;
        size_t end = (size_t)(hit - t) + L;
        if (end < best_end || (end == best_end && L > best_len)) {
            best_end = end;
            best_len = L;
            best = (int)i;
        }
    }
    if (best >= 0) {
        st->matched = best;
        *out = t;
        *out_len = best_end - best_len;
        st->emitted = 0;
        st->held = 0;
        return 1;
    }

    size_t hold = held_suffix(st, t, total);
    *out = t;
    *out_len = total - hold;
    st->emitted = total - hold;
    st->held = hold;
    return 0;
}

void tsr_stop_flush(tsr_stop *st, const char **out, size_t *out_len)
{
    *out = tsr_stop_empty;
    *out_len = 0;
    if (st->matched >= 0 || !st->buf) return;
    drop_emitted(st);
    *out = st->buf;
    *out_len = st->held;
    st->emitted = st->held;
    st->held = 0;
}
