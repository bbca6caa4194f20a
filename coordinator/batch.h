/*
 * batch.h — the file side of `tessera batch`: JSONL request lines in (the OpenAI Batch API
 * format, or plain {"custom_id", "prompt", ...} lines), JSONL result lines out, the
 * custom_id sets that make a run resumable and shardable, and the merge of shard outputs.
 *
 * Nothing here touches the model or the engine: coordinator/batch_main.c streams the
 * input through these functions into the serving engine (coordinator/engine.h). Kept apart
 * so that the parsers, the output scan (torn-line recovery) and the merge are unit-tested
 * on their own (tests/test_batch.c), also under the sanitizers.
 *
 * Keys: every input line that produces an output line has a key — its custom_id, or, for a
 * line without a usable custom_id (invalid JSON, a missing or non-string custom_id), its
 * 1-based line number in the input file. The output line carries the same key (custom_id,
 * or null and "line"), so a rerun knows which lines are done and a merge can check that
 * every line is answered exactly once. Line numbers are those of the whole input file,
 * also in a shard (--shard I/N takes lines whose 0-based number mod N is I).
 *
 * Memory: only keys are held (tsr_batch_keyset: an open-addressing table over one byte
 * arena, about 16 bytes + the id per key), never lines; lines are read one at a time.
 */
#ifndef TSR_BATCH_H
#define TSR_BATCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "coordinator/generate.h"

#define TSR_BATCH_OK       0
#define TSR_BATCH_EINVAL   -1 /* the line is not a valid request (message says why) */
#define TSR_BATCH_EIO      -2 /* a file could not be read or written */
#define TSR_BATCH_ENOMEM   -3
#define TSR_BATCH_ECORRUPT -4 /* an output file holds a line this command did not write */
#define TSR_BATCH_EDUP     -5 /* a key occurs twice */
#define TSR_BATCH_EMISSING -6 /* merge: an input line has no output line */

#define TSR_BATCH_MAX_STOP           64   /* stop strings per request (as the gRPC server) */
#define TSR_BATCH_MAX_STOP_LEN       1024 /* bytes per stop string */
#define TSR_BATCH_MAX_LOGPROBS       20
#define TSR_BATCH_DEFAULT_MAX_TOKENS 16 /* OpenAI's and the gRPC server's default */

/* Exit statuses of `tessera batch` (also in its --help and the README). */
#define TSR_BATCH_EXIT_OK    0 /* every line of the input (shard) has an output line */
#define TSR_BATCH_EXIT_ERROR 1 /* runtime error: unreadable file, model, data plane */
#define TSR_BATCH_EXIT_USAGE 2 /* bad flags, duplicate custom_ids, foreign output file */
#define TSR_BATCH_EXIT_INCOMPLETE                                                                  \
    3 /* stopped by SIGTERM / SIGUSR1 / SIGINT: rerun the same                                     \
         command to continue where it stopped */

/* ---- key sets ---- */

typedef struct tsr_batch_keyset tsr_batch_keyset;

tsr_batch_keyset *tsr_batch_keyset_new(void); /* NULL: out of memory */
void tsr_batch_keyset_free(tsr_batch_keyset *s);
/* Adds key[0..len). Returns 1 added, 0 already present, TSR_BATCH_ENOMEM. */
int tsr_batch_keyset_add(tsr_batch_keyset *s, const char *key, size_t len);
bool tsr_batch_keyset_has(const tsr_batch_keyset *s, const char *key, size_t len);
size_t tsr_batch_keyset_count(const tsr_batch_keyset *s);
size_t tsr_batch_keyset_bytes(const tsr_batch_keyset *s); /* memory held, bytes */

/* The key of a line without a usable custom_id: "\x01line:N". It cannot collide with a
 * custom_id, which the parser rejects when it holds control characters. Writes at most cap
 * bytes (NUL-terminated); returns the length. */
size_t tsr_batch_line_key(int64_t line_no, char *buf, size_t cap);

/* ---- reading lines ---- */

/* A line reader over a FILE: lines of any length are read; a line longer than max_bytes
 * is skipped over (consumed to its newline) and reported as too long instead of held. */
typedef struct {
    FILE *f;
    char *buf;
    size_t cap, len;
    size_t max_bytes;
    int64_t line_no; /* 1-based number of the line last returned */
    bool too_long;   /* the line last returned was longer than max_bytes (buf is empty) */
    uint64_t n_bytes_read;
} tsr_batch_reader;

int tsr_batch_reader_init(tsr_batch_reader *r, FILE *f, size_t max_bytes);
void tsr_batch_reader_free(tsr_batch_reader *r);
/* 1: a line in r->buf (NUL-terminated, without its newline, r->len bytes); 0: end of
 * file; TSR_BATCH_EIO / ENOMEM. */
int tsr_batch_reader_next(tsr_batch_reader *r);

/* True for an empty line or one of only spaces / tabs / CR (skipped, no output). */
bool tsr_batch_line_blank(const char *line, size_t len);

/* ---- parsing a request line ---- */

typedef enum {
    TSR_BATCH_COMPLETION = 0, /* /v1/completions or a plain line */
    TSR_BATCH_CHAT = 1,       /* /v1/chat/completions */
} tsr_batch_kind;

typedef struct {
    char *custom_id; /* malloc'd; NULL when the line has none usable */
    tsr_batch_kind kind;
    char *prompt;        /* completion with a text prompt (malloc'd) */
    int32_t *prompt_ids; /* completion with token ids (malloc'd), n_prompt_ids of them */
    size_t n_prompt_ids;
    char *messages_json; /* chat: the "messages" array, as compact JSON (malloc'd) */
    char *model;         /* body "model" if given (malloc'd), echoed in the output */
    tsr_gen_params gen;  /* max_tokens, sampling (seed set only when has_seed), stop... */
    bool has_seed;
    char **stop; /* malloc'd strings, gen.stop points here */
    size_t n_stop;
    int32_t *stop_ids; /* gen.stop_ids points here */
    size_t n_stop_ids;
    int32_t logprobs; /* completions: top-n (0 none); chat: top_logprobs when logprobs */
    bool want_logprobs;
    bool add_special; /* text prompts: BOS/EOS as the model says (default true) */
} tsr_batch_request;

/* Parse one input line (NUL-terminated, len bytes). On success fills rq (free with
 * tsr_batch_request_free) and returns TSR_BATCH_OK. On TSR_BATCH_EINVAL, *code gets a
 * short error code ("invalid_json", "invalid_request") and err the message; rq->custom_id
 * is still set when the line had a usable one (the error line carries it). Sampling
 * parameters are range-checked here (the same rules as the gRPC server); the prompt
 * against the model's vocabulary and context by the caller. */
int tsr_batch_parse_line(const char *line, size_t len, tsr_batch_request *rq, const char **code,
                         char *err, size_t err_len);
void tsr_batch_request_free(tsr_batch_request *rq);

/* The key of an input line as the output will carry it: its custom_id if the line is JSON
 * with a string custom_id, else the line key. *key is malloc'd. */
int tsr_batch_input_key(const char *line, size_t len, int64_t line_no, char **key, size_t *key_len);

/* ---- writing result lines ---- */

/* A finished completion. Pointers are borrowed for the call. */
typedef struct {
    const char *custom_id;
    const char *model;
    const char *text;
    size_t text_len;
    const int32_t *ids;
    size_t n_ids;
    int finish_reason; /* tsr_finish_reason */
    int32_t n_prompt_tokens;
    /* logprobs (when want_logprobs): per generated token its piece, chosen logprob and
     * n_top alternatives (ids and logprobs, row-major). */
    bool want_logprobs;
    bool chat;
    const char *const *pieces;
    const float *chosen;
    const int32_t *top_ids;
    const float *top_lps;
    const char *const *top_pieces;
    int32_t n_top;
} tsr_batch_result;

/* One output line, '\n'-terminated, malloc'd into *out. Deterministic: the same result
 * gives the same bytes (no timestamps), so outputs of different runs compare as sets. */
int tsr_batch_format_result(const tsr_batch_result *r, char **out, size_t *out_len);
/* An error line: custom_id may be NULL (then "line" is the key). */
int tsr_batch_format_error(const char *custom_id, int64_t line_no, const char *code,
                           const char *message, char **out, size_t *out_len);

/* ---- the output file: resume and append ---- */

/* Scan an existing output file: every complete line must be a JSON object with a string
 * custom_id or (error lines) a null custom_id and a "line" number; its key goes into done
 * (a key seen twice is ECORRUPT). A last line without its newline, or whose bytes are not
 * valid JSON (a write cut short by a crash), is a torn line: with truncate_torn the file
 * is cut back to the end of the last good line (*n_bytes_torn tells how much was cut);
 * without, it is ECORRUPT. A bad line before the last is always ECORRUPT: the file is not
 * one this command wrote. A missing file is an empty one. */
int tsr_batch_scan_output(const char *path, bool truncate_torn, tsr_batch_keyset *done,
                          uint64_t *n_lines, uint64_t *n_bytes_torn, char *err, size_t err_len);

/* Appends lines and makes them durable in groups: tsr_batch_out_add buffers a line,
 * tsr_batch_out_flush writes the buffer in one write() per line group and fsyncs it. A
 * crash loses at most the unflushed group and tears at most the last line (which the next
 * scan cuts away). */
typedef struct {
    int fd;
    char *buf;
    size_t len, cap;
    size_t n_lines_buffered;
    uint64_t n_lines_written;
    uint64_t n_flushes;
} tsr_batch_out;

int tsr_batch_out_open(tsr_batch_out *o, const char *path, char *err, size_t err_len);
int tsr_batch_out_add(tsr_batch_out *o, const char *line, size_t len);
int tsr_batch_out_flush(tsr_batch_out *o, char *err, size_t err_len);
/* Flushes and closes; returns the flush status. */
int tsr_batch_out_close(tsr_batch_out *o, char *err, size_t err_len);

/* ---- merge ---- */

/* Merge shard outputs into out_path (written to out_path.tmp, fsynced, renamed): every
 * line of every input once; a key in two lines (in one file or across files) is EDUP, a
 * torn or foreign line ECORRUPT. With input_path, every line of that input file must have
 * an output line (EMISSING otherwise, the message counts and names the first missing).
 * *n_lines gets the lines written. Nothing is written on error. */
int tsr_batch_merge(const char *out_path, const char *const *in_paths, size_t n_in,
                    const char *input_path, uint64_t *n_lines, char *err, size_t err_len);

/* ---- the command ---- */

/* `tessera batch ...` (coordinator/batch_main.c); argv[0] is "batch". */
int tsr_cmd_batch(int argc, char **argv);

#endif
