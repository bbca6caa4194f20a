/* generate.c — see generate.h. */
#include "coordinator/generate.h"
#include "kernels/util.h"

#include "coordinator/stop.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

const char *tsr_finish_reason_name(tsr_finish_reason r)
{
    switch (r) {
    case TSR_FINISH_LENGTH:
        return "length";
    case TSR_FINISH_STOP:
        return "stop";
    case TSR_FINISH_EOS:
        return "eos";
    }
    return "unknown";
}

typedef struct {
    char *p;
    size_t n, cap;
} sbuf;

static int sbuf_put(sbuf *b, const char *s, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) return -1;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
    return 0;
}

/* Emit text to the result and the callback; returns 1 when the callback asks to stop. */
static int emit(sbuf *text, const char *s, size_t n, tsr_gen_text_fn on_text, void *ud)
{
    if (n == 0) return 0;
    if (sbuf_put(text, s, n) != 0) return -1;
    return on_text && on_text(ud, s, n) != 0 ? 1 : 0;
}

int tsr_generate(tsr_replica *rep, const tsr_vocab *vocab, const int32_t *prompt, size_t n_prompt,
                 const tsr_gen_params *p, tsr_gen_text_fn on_text, void *ud, tsr_gen_result *res,
                 char *err, size_t err_len)
{
    int rc = -1;
    tsr_sampler *smp = NULL;
    tsr_stop stop;
    bool stop_ok = false;
    tsr_detok dt;
    bool dt_ok = false;
    sbuf text = {0};
    int32_t *ids = NULL;
    const int32_t n_ctx = tsr_replica_n_ctx(rep);
    const int32_t n_vocab = tsr_vocab_n_tokens(vocab);
    float *lg = NULL;

    memset(res, 0, sizeof *res);
    if (n_prompt == 0) {
        tsr_set_err(err, err_len, "the prompt is empty: give some text, or keep BOS");
        return -1;
    }
    if (n_prompt >= (size_t)n_ctx) {
        tsr_set_err(err, err_len,
                    "the prompt has %zu tokens but the context holds %d: shorten it or raise the "
                    "context size",
                    n_prompt, n_ctx);
        return -1;
    }
    if (p->max_tokens < 0) {
        tsr_set_err(err, err_len, "max_tokens must be >= 0, got %d", p->max_tokens);
        return -1;
    }
    if (tsr_sampler_new(&p->sampling, n_vocab, &smp, err, err_len) != 0) return -1;
    if (tsr_stop_init(&stop, p->stop, p->n_stop, err, err_len) != 0) goto done;
    stop_ok = true;
    if (tsr_detok_init(&dt, vocab, 0) != 0) {
        tsr_set_err(err, err_len, "out of memory");
        goto done;
    }
    dt_ok = true;
    ids = malloc(sizeof(int32_t) * ((size_t)p->max_tokens + 1));
    lg = malloc(sizeof(float) * (size_t)n_vocab);
    if (!ids || !lg) {
        tsr_set_err(err, err_len, "out of memory");
        goto done;
    }
    tsr_sampler_add_prompt(smp, prompt, n_prompt);

    const float *logits;
    uint64_t t0 = tsr_now_ns();
    if (tsr_replica_forward(rep, prompt, (int32_t)n_prompt, 0, &logits, err, err_len) != 0)
        goto done;
    res->t_prefill_ns = tsr_now_ns() - t0;
    t0 = tsr_now_ns();
    int32_t pos = (int32_t)n_prompt;
    res->finish = TSR_FINISH_LENGTH;
    for (int32_t i = 0; i < p->max_tokens; i++) {
        memcpy(lg, logits, sizeof(float) * (size_t)n_vocab);
        int32_t id = tsr_sampler_sample(smp, lg);
        tsr_sampler_accept(smp, id);
        ids[res->n_ids++] = id;
        if (!p->ignore_eos && tsr_vocab_is_eog(vocab, id)) {
            res->finish = TSR_FINISH_EOS;
            break;
        }
        bool stop_id = false;
        for (size_t k = 0; k < p->n_stop_ids; k++) stop_id |= p->stop_ids[k] == id;
        /* Text of this token: whole characters only, then through the stop matcher. */
        const char *piece;
        size_t piece_len;
        if (tsr_detok_push(&dt, id, &piece, &piece_len) != 0) {
            tsr_set_err(err, err_len, "out of memory detokenizing");
            goto done;
        }
        const char *out;
        size_t out_len;
        int sr = tsr_stop_push(&stop, piece, piece_len, &out, &out_len);
        if (sr < 0) {
            tsr_set_err(err, err_len, "out of memory matching stop strings");
            goto done;
        }
        int er = emit(&text, out, out_len, on_text, ud);
        if (er < 0) goto oom;
        if (sr == 1 || er == 1 || stop_id) {
            res->finish = TSR_FINISH_STOP;
            break;
        }
        if (i + 1 == p->max_tokens) break;
        if (pos >= n_ctx) break; /* context full: finish as length */
        if (tsr_replica_forward(rep, &id, 1, pos, &logits, err, err_len) != 0) goto done;
        pos++;
    }
    if (res->finish != TSR_FINISH_STOP || tsr_stop_matched(&stop) < 0) {
        /* Flush what the detokenizer and the stop matcher still hold. */
        const char *piece, *out;
        size_t piece_len, out_len;
        if (tsr_stop_matched(&stop) < 0) {
            if (tsr_detok_flush(&dt, &piece, &piece_len) != 0) goto oom;
            int sr = tsr_stop_push(&stop, piece, piece_len, &out, &out_len);
            if (sr < 0) goto oom;
            if (emit(&text, out, out_len, on_text, ud) < 0) goto oom;
            if (sr == 1)
                res->finish = TSR_FINISH_STOP;
            else {
                tsr_stop_flush(&stop, &out, &out_len);
                if (emit(&text, out, out_len, on_text, ud) < 0) goto oom;
            }
        }
    }
    res->t_decode_ns = tsr_now_ns() - t0;
    if (sbuf_put(&text, "", 0) != 0) goto oom;
    res->ids = ids;
    ids = NULL;
    res->text = text.p;
    res->text_len = text.n;
    text.p = NULL;
    rc = 0;
    goto done;
oom:
    tsr_set_err(err, err_len, "out of memory");
done:
    free(ids);
    free(lg);
    free(text.p);
    if (dt_ok) tsr_detok_free(&dt);
    if (stop_ok) tsr_stop_free(&stop);
    tsr_sampler_free(smp);
    return rc;
}

void tsr_gen_result_free(tsr_gen_result *r)
{
    free(r->ids);
    free(r->text);
    memset(r, 0, sizeof *r);
}
