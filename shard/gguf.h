/*
 * gguf.h — read-only GGUF (v2, v3) reader over an mmapped file.
 *
 * Why: every model Tessera serves arrives as a GGUF file. The file is mapped, never
 * copied: tensor data pointers point into the mapping, so a rank touches (and the
 * kernel pages in) only the byte ranges it actually reads.
 *
 * Format (little-endian): magic "GGUF", u32 version, u64 n_tensors, u64 n_kv, then
 * n_kv × {string key, u32 value type, value}, then n_tensors × {string name, u32 n_dims,
 * u64 ne[n_dims], u32 ggml type, u64 offset}, padding to `general.alignment` (default
 * 32), then the data section. A string is {u64 length, bytes} (not NUL-terminated).
 * Every count, length and offset is validated on open; a corrupt or truncated file
 * gives an error that names the field and never a crash.
 *
 * Ownership: tsr_gguf owns the mapping and its index. Every pointer handed out (key
 * names, strings, tensor data) stays valid until tsr_gguf_close(). Strings from the
 * file (tsr_gguf_str) are NOT NUL-terminated; key and tensor names ARE (copied).
 */
#ifndef TSR_GGUF_H
#define TSR_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TSR_GGUF_MAX_DIMS      4
#define TSR_GGUF_DEFAULT_ALIGN 32

/* Status codes (0 = ok). */
#define TSR_GGUF_OK         0
#define TSR_GGUF_ERR_IO     -1 /* open/stat/mmap failed */
#define TSR_GGUF_ERR_FORMAT -2 /* malformed or truncated content */
#define TSR_GGUF_ERR_NOMEM  -3

/* Metadata value types, numbered as in the GGUF specification. */
typedef enum {
    TSR_GGUF_UINT8 = 0,
    TSR_GGUF_INT8 = 1,
    TSR_GGUF_UINT16 = 2,
    TSR_GGUF_INT16 = 3,
    TSR_GGUF_UINT32 = 4,
    TSR_GGUF_INT32 = 5,
    TSR_GGUF_FLOAT32 = 6,
    TSR_GGUF_BOOL = 7,
    TSR_GGUF_STRING = 8,
    TSR_GGUF_ARRAY = 9,
    TSR_GGUF_UINT64 = 10,
    TSR_GGUF_INT64 = 11,
    TSR_GGUF_FLOAT64 = 12,
    TSR_GGUF_VTYPE_COUNT = 13,
} tsr_gguf_vtype;

/* A string inside the mapping: `len` bytes at `ptr`, not NUL-terminated. */
typedef struct {
    const char *ptr;
    uint64_t len;
} tsr_gguf_str;

/* One tensor of the file. ne[0] is the contiguous (input) dimension, as in ggml:
 * `attn_q [n_embd, n_embd]` is n_embd rows of n_embd values. Unused ne[] are 1. */
/* Open flags. ANY_TYPE: accept tensors of every type, not only those Tessera computes with
 * (for `inspect`): types ggml defines get their sizes and bounds checked as usual; a type
 * id ggml does not define gets n_bytes 0 (its size cannot be known). Such a handle must
 * not be given to a model loader; tsr_gguf_check_types says whether it could be. */
#define TSR_GGUF_OPEN_ANY_TYPE 1u

typedef struct {
    const char *name; /* NUL-terminated copy */
    uint32_t type;    /* ggml type id (kernels/quant.h tsr_type) */
    uint32_t n_dims;  /* 1..4 */
    int64_t ne[TSR_GGUF_MAX_DIMS];
    uint64_t offset;  /* from the start of the data section */
    uint64_t n_bytes; /* bytes of data: rows × row size of the type (0: unknown type id) */
    const void *data; /* inside the mapping */
} tsr_gguf_tensor;

typedef struct tsr_gguf tsr_gguf;

/* Map and validate a file. On error returns < 0, *out is NULL and `err` says what and
 * where (e.g. "tensor 3 'blk.0.attn_q.weight': offset 1234 + 4096 bytes is past the end
 * of the file (5000 bytes)"). */
int tsr_gguf_open(const char *path, tsr_gguf **out, char *err, size_t err_len);
/* The same with flags (TSR_GGUF_OPEN_*); tsr_gguf_open is flags 0: a tensor of a type
 * Tessera cannot compute with is an error naming the tensor and the type. */
int tsr_gguf_open_ex(const char *path, uint32_t flags, tsr_gguf **out, char *err, size_t err_len);

/* Same over a caller-owned buffer (no copy: `buf` must outlive the handle). Used by
 * tests and fuzzers. */
int tsr_gguf_open_memory(const void *buf, size_t len, tsr_gguf **out, char *err, size_t err_len);
int tsr_gguf_open_memory_ex(const void *buf, size_t len, uint32_t flags, tsr_gguf **out, char *err,
                            size_t err_len);

void tsr_gguf_close(tsr_gguf *g);

uint32_t tsr_gguf_version(const tsr_gguf *g);
uint64_t tsr_gguf_alignment(const tsr_gguf *g);
uint64_t tsr_gguf_file_size(const tsr_gguf *g);
uint64_t tsr_gguf_data_offset(const tsr_gguf *g); /* absolute file offset of data section */
const void *tsr_gguf_base(const tsr_gguf *g);     /* start of the mapping */
/* Copy n bytes at absolute file offset `offset` into buf with pread (memcpy for memory
 * handles), without touching the mapping: how a rank reads only its own slices of a
 * tensor. Returns 0, or < 0 when the range is outside the file or the read fails. */
int tsr_gguf_pread(const tsr_gguf *g, uint64_t offset, void *buf, size_t n);

/* ---- metadata ---- */
int64_t tsr_gguf_n_kv(const tsr_gguf *g);
/* Index of `key`, or -1 when absent. */
int64_t tsr_gguf_find_key(const tsr_gguf *g, const char *key);
const char *tsr_gguf_kv_key(const tsr_gguf *g, int64_t i);
tsr_gguf_vtype tsr_gguf_kv_type(const tsr_gguf *g, int64_t i);
/* For arrays: element type and count (false when kv i is not an array). */
bool tsr_gguf_kv_arr(const tsr_gguf *g, int64_t i, tsr_gguf_vtype *elem_type, uint64_t *n);

/* Scalar getters by key. They return false when the key is absent or its type does not
 * fit: get_int accepts every integer type (and bool) whose value fits in int64;
 * get_float accepts FLOAT32 and FLOAT64; get_str accepts STRING. */
bool tsr_gguf_get_int(const tsr_gguf *g, const char *key, int64_t *out);
bool tsr_gguf_get_float(const tsr_gguf *g, const char *key, double *out);
bool tsr_gguf_get_bool(const tsr_gguf *g, const char *key, bool *out);
bool tsr_gguf_get_str(const tsr_gguf *g, const char *key, tsr_gguf_str *out);

/* Scalar getters by index (same type rules). */
bool tsr_gguf_kv_int(const tsr_gguf *g, int64_t i, int64_t *out);
bool tsr_gguf_kv_float(const tsr_gguf *g, int64_t i, double *out);
bool tsr_gguf_kv_str(const tsr_gguf *g, int64_t i, tsr_gguf_str *out);

/* Array element getters (kv index i, element j < n). Same type rules as above; false
 * when out of range or of another type. Arrays of arrays are indexed but not readable
 * element-wise (no model key uses them). */
bool tsr_gguf_arr_int(const tsr_gguf *g, int64_t i, uint64_t j, int64_t *out);
bool tsr_gguf_arr_float(const tsr_gguf *g, int64_t i, uint64_t j, double *out);
bool tsr_gguf_arr_str(const tsr_gguf *g, int64_t i, uint64_t j, tsr_gguf_str *out);

/* ---- tensors ---- */
int64_t tsr_gguf_n_tensors(const tsr_gguf *g);
const tsr_gguf_tensor *tsr_gguf_tensor_at(const tsr_gguf *g, int64_t i);
/* Tensor by name, or NULL. */
const tsr_gguf_tensor *tsr_gguf_find_tensor(const tsr_gguf *g, const char *name);
/* 0 when every tensor has a type Tessera computes with (always so for handles opened
 * without TSR_GGUF_OPEN_ANY_TYPE); else < 0 and err names the first other one, e.g.
 * "tensor blk.0.attn_q.weight has type IQ2_XXS (ggml type id 16), which Tessera cannot
 * compute with (it runs F32, ...)". */
int tsr_gguf_check_types(const tsr_gguf *g, char *err, size_t err_len);

const char *tsr_gguf_vtype_name(tsr_gguf_vtype t);

/* ---- writer ----
 * Builds a GGUF v3 file in memory and saves it. Used by `tessera mkmodel` and by tests
 * that make vocabulary files. Keys are written in the order they were set; setting an
 * existing key replaces its value in place. Tensor data is copied into the writer. */
typedef struct tsr_gguf_writer tsr_gguf_writer;

tsr_gguf_writer *tsr_gguf_writer_new(void); /* NULL on out of memory */
void tsr_gguf_writer_free(tsr_gguf_writer *w);
int tsr_gguf_writer_set_int(tsr_gguf_writer *w, const char *key, tsr_gguf_vtype type,
                            int64_t v); /* any integer type or BOOL */
int tsr_gguf_writer_set_float(tsr_gguf_writer *w, const char *key, tsr_gguf_vtype type,
                              double v); /* FLOAT32 or FLOAT64 */
int tsr_gguf_writer_set_str(tsr_gguf_writer *w, const char *key, const char *s, size_t len);
/* Numeric array: `data` holds n elements of `elem_type` in their file layout. */
int tsr_gguf_writer_set_arr(tsr_gguf_writer *w, const char *key, tsr_gguf_vtype elem_type,
                            const void *data, uint64_t n);
/* String array: strs[i] is lens[i] bytes. */
int tsr_gguf_writer_set_arr_str(tsr_gguf_writer *w, const char *key, const char *const *strs,
                                const size_t *lens, uint64_t n);
/* Copy kv i of g (any type, arrays included). */
int tsr_gguf_writer_copy_kv(tsr_gguf_writer *w, const tsr_gguf *g, int64_t i);
/* Add a tensor; n_bytes must equal what type and ne imply (checked at save). */
int tsr_gguf_writer_add_tensor(tsr_gguf_writer *w, const char *name, uint32_t type, uint32_t n_dims,
                               const int64_t *ne, const void *data, uint64_t n_bytes);
int tsr_gguf_writer_save(tsr_gguf_writer *w, const char *path, char *err, size_t err_len);

#endif /* TSR_GGUF_H */
