/*
 * test_evbuf.c — coordinator/evbuf: the pending output at the engine seam. Ids, text,
 * chosen and top-k logprobs accumulate across events and clear after a send; the token
 * text the coordinator's proxy puts in its events (a replica's vocabulary, possibly part of
 * a UTF-8 character) is kept byte for byte next to the logprobs, entries an event did not
 * carry are empty, and output from before the first event with token text reads as empty.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <string.h>

#include "coordinator/evbuf.h"

/* The bytes of span sp of b as a NUL-terminated string (at most 63 bytes). */
static const char *piece(const tsr_evbuf *b, tsr_evbuf_span sp)
{
    static char out[64];
    assert_true(sp.len < sizeof out);
    memcpy(out, b->pieces + sp.off, sp.len);
    out[sp.len] = '\0';
    return out;
}

static void expect_piece(const tsr_evbuf *b, tsr_evbuf_span sp, const char *want, size_t want_len)
{
    if (sp.len != want_len || memcmp(b->pieces + sp.off, want, want_len) != 0)
        fail_msg("expected piece of %zu bytes '%.*s', got %u bytes '%s'", want_len, (int)want_len,
                 want, sp.len, piece(b, sp));
}

static void test_logprobs_and_text(void **state)
{
    (void)state;
    tsr_evbuf b;
    tsr_evbuf_init(&b, 2);
    const int32_t ids[2] = {5, 7};
    const float chosen[2] = {-0.5f, -1.25f};
    const tsr_logprob top[6] = {{5, -0.5f},  {9, -2.0f}, {1, -3.0f},
                                {7, -1.25f}, {3, -1.5f}, {2, -4.0f}};
    tsr_event ev = {.kind = TSR_EV_TOKENS,
                    .ids = ids,
                    .n_ids = 2,
                    .text = "ab",
                    .text_len = 2,
                    .chosen_logprobs = chosen,
                    .top_logprobs = top,
                    .n_top = 3};
    assert_true(tsr_evbuf_append(&b, &ev));
    assert_int_equal(b.n_ids, 2);
    assert_string_equal(b.text, "ab");
    assert_false(b.has_pieces); /* a local engine's events: the vocabulary names them */
    assert_true(b.lp_chosen[1] == -1.25f);
    /* two alternatives kept of the three sent, row-major */
    assert_int_equal(b.lp_top[2].id, 7);
    assert_int_equal(b.lp_top[3].id, 3);
    tsr_evbuf_clear(&b);
    assert_int_equal(b.n_ids, 0);
    assert_int_equal(b.text_len, 0);
    tsr_evbuf_free(&b);
    assert_int_equal(b.n_top, 2);
}

static void test_pieces(void **state)
{
    (void)state;
    tsr_evbuf b;
    tsr_evbuf_init(&b, 2);
    /* First an event without token text (an older replica), then ones with it. */
    const int32_t id0 = 11;
    const float lp0 = -0.25f;
    tsr_event e0 = {.kind = TSR_EV_TOKENS, .ids = &id0, .n_ids = 1, .chosen_logprobs = &lp0};
    assert_true(tsr_evbuf_append(&b, &e0));
    /* "é" split over two byte tokens (0xC3, 0xA9), alternatives " the" and "<|im_end|>" */
    const int32_t ids[2] = {200, 201};
    const float chosen[2] = {-1.0f, -0.125f};
    const tsr_logprob top[4] = {{200, -1.0f}, {42, -1.5f}, {201, -0.125f}, {2, -3.0f}};
    const tsr_token_piece cp[2] = {{"\xC3", 1}, {"\xA9", 1}};
    const tsr_token_piece tp[4] = {{"\xC3", 1}, {" the", 4}, {"\xA9", 1}, {"<|im_end|>", 10}};
    tsr_event e1 = {.kind = TSR_EV_TOKENS,
                    .ids = ids,
                    .n_ids = 2,
                    .text = "\xC3\xA9",
                    .text_len = 2,
                    .chosen_logprobs = chosen,
                    .top_logprobs = top,
                    .n_top = 2,
                    .chosen_pieces = cp,
                    .top_pieces = tp};
    assert_true(tsr_evbuf_append(&b, &e1));
    assert_true(b.has_pieces);
    assert_int_equal(b.n_ids, 3);
    expect_piece(&b, b.chosen_piece[0], "", 0); /* came without text */
    expect_piece(&b, b.top_piece[0], "", 0);
    expect_piece(&b, b.top_piece[1], "", 0);
    expect_piece(&b, b.chosen_piece[1], "\xC3", 1);
    expect_piece(&b, b.chosen_piece[2], "\xA9", 1);
    expect_piece(&b, b.top_piece[2], "\xC3", 1);
    expect_piece(&b, b.top_piece[3], " the", 4);
    expect_piece(&b, b.top_piece[5], "<|im_end|>", 10);
    assert_true(tsr_evbuf_bytes(&b) > 17);
    /* After a send the text is forgotten with the rest; later events start afresh. */
    tsr_evbuf_clear(&b);
    assert_int_equal(b.pieces_len, 0);
    const tsr_token_piece cp1 = {"\xE6\x9D\xB1", 3}; /* a whole 3-byte character */
    tsr_event e2 = {.kind = TSR_EV_TOKENS,
                    .ids = ids,
                    .n_ids = 1,
                    .chosen_logprobs = chosen,
                    .top_logprobs = top,
                    .n_top = 1, /* fewer alternatives than kept: the rest id -1, empty */
                    .chosen_pieces = &cp1,
                    .top_pieces = tp + 1};
    assert_true(tsr_evbuf_append(&b, &e2));
    expect_piece(&b, b.chosen_piece[0], "\xE6\x9D\xB1", 3);
    expect_piece(&b, b.top_piece[0], " the", 4);
    expect_piece(&b, b.top_piece[1], "", 0);
    assert_int_equal(b.lp_top[1].id, -1);
    assert_true(isnan(b.lp_top[1].logprob));
    tsr_evbuf_free(&b);
}

static void test_no_logprobs_ignores_pieces(void **state)
{
    (void)state;
    tsr_evbuf b;
    tsr_evbuf_init(&b, -1);
    const int32_t id = 3;
    const tsr_token_piece cp = {"x", 1};
    tsr_event ev = {.kind = TSR_EV_TOKENS, .ids = &id, .n_ids = 1, .chosen_pieces = &cp};
    assert_true(tsr_evbuf_append(&b, &ev));
    assert_false(b.has_pieces);
    assert_int_equal(b.n_ids, 1);
    tsr_evbuf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_logprobs_and_text),
        cmocka_unit_test(test_pieces),
        cmocka_unit_test(test_no_logprobs_ignores_pieces),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
