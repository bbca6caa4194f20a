/*
 * stop.h — stop strings over streamed generation text.
 *
 * Why: an OpenAI `stop` string may span several token deltas ("</" + "answer>"), and a
 * streaming client must never see bytes that later turn out to belong to a stop string. The
 * matcher sits between the detokenizer and the client: it is fed each text delta (UTF-8
 * bytes) and hands back only the bytes that are safe to emit, holding back any tail that is
 * still a possible beginning of a stop string. On a match it releases the text before the stop
 * string and reports the stop; the stop string itself is never emitted (OpenAI semantics).
 *
 * Which match wins: the one that ENDS first in the byte stream (among those ending at the same
 * byte, the longest, i.e. the one starting first). That is what a byte-by-byte feed would find,
 * so the result never depends on how the text was cut into deltas.
 *
 * Bytes are compared exactly (no Unicode normalisation). The held-back tail always starts at
 * the first byte of a stop string, so if the stop strings and the input are valid UTF-8 and
 * each delta ends on a character boundary, every emitted chunk ends on one too; completing
 * split characters is the detokenizer's job, not this module's.
 *
 * Memory: the matcher copies the stop strings and owns one growable buffer. Each
 * push / flush returns a pointer into that buffer, valid until the next call on the matcher.
 * Not thread-safe; one per generation.
 */
#ifndef TSR_STOP_H
#define TSR_STOP_H

#include <stdbool.h>
#include <stddef.h>

/* Caller-allocated (e.g. on the stack); fields are private to stop.c. */
typedef struct {
    char **stops; /* n_stops owned copies */
    size_t *lens; /* their lengths in bytes, all > 0 */
    size_t n_stops;
    size_t max_len; /* longest stop string */
    char *buf;      /* [emitted by the previous call | held back | ...] */
    size_t buf_cap;
    size_t emitted; /* bytes at the front of buf handed out by the previous call */
    size_t held;    /* bytes held back after those */
    int matched;    /* index of the stop string that matched, -1 while none */
} tsr_stop;

/* Prepare `st` for n_stops stop strings (copied; NUL-terminated; may be 0 of them, then
 * every push passes its delta straight through). 0 ok; negative with err (may be NULL) when
 * a stop string is NULL or empty, or on out of memory — `st` then needs no tsr_stop_free. */
int tsr_stop_init(tsr_stop *st, const char *const *stops, size_t n_stops, char *err,
                  size_t err_len);

/* Feed the next delta (len bytes, may be 0; need not be NUL-terminated). *out / *out_len
 * receive the bytes now safe to emit (possibly 0 bytes; *out is never NULL), valid until the
 * next call on `st`. Returns:
 *   0  no stop string yet; some bytes may be held back for later;
 *   1  a stop string matched: *out holds all not-yet-emitted text before it, the stop string
 *      and anything after it are dropped, and from now on every push returns 1 with nothing
 *      to emit (tsr_stop_matched says which string matched);
 *   <0 out of memory: nothing of this delta was consumed and the matcher is unchanged.
 * Once a stop matched, the caller should end the generation (finish_reason "stop"). */
int tsr_stop_push(tsr_stop *st, const char *delta, size_t len, const char **out, size_t *out_len);

/* End of the generation without a stop match (max tokens, EOS): *out / *out_len receive the
 * held-back bytes, which are then no longer held (0 bytes after a match). Valid until the next
 * call on `st`. Cannot fail. */
void tsr_stop_flush(tsr_stop *st, const char **out, size_t *out_len);

/* Index (into the init array) of the stop string that matched, or -1. */
int tsr_stop_matched(const tsr_stop *st);

/* Bytes currently held back (a possible start of a stop string). */
size_t tsr_stop_held(const tsr_stop *st);

/* Release the copies and the buffer; the struct may then be init'ed again. */
void tsr_stop_free(tsr_stop *st);

#endif
