/*
 * gguf.c — GGUF reader (mmap + validation) and writer. See gguf.h for the contract.
 *
 * The reader walks the header once with a bounds-checked cursor, recording where each
 * metadata value and array element lives; every later access is an index lookup. No
 * value is trusted: counts are bounded by the bytes left in the file before anything is
 * allocated, so a corrupt count cannot make us allocate gigabytes or read past the end.
 */
#include "shard/gguf.h"
#include "kernels/util.h"

#include "kernels/quant.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* One metadata value. For arrays, `elem_off` indexes every element's file offset when the
 * elements have variable size (strings); fixed-size elements are computed from `off`. */
typedef struct {
    const char *key; /* NUL-terminated copy */
    tsr_gguf_vtype type;
    uint64_t off;             /* file offset of the value (after the type tag) */
    tsr_gguf_vtype elem_type; /* arrays only */
    uint64_t n_elems;         /* arrays only */
    uint64_t *elem_off;       /* arrays of strings / arrays: offset of each element */
} gguf_kv;

struct tsr_gguf {
    const uint8_t *base;
    uint64_t size;
    bool mapped; /* base came from mmap (unmap on close) */
    int fd;      /* the file, kept open for tsr_gguf_pread; -1 for memory handles */
    uint32_t version;
    uint64_t alignment;
    uint64_t data_off;
    int64_t n_kv;
    int64_t kv_cap; /* entries allocated (elem_off freed for all, even on a parse error) */
    gguf_kv *kv;
    int64_t n_tensors;
    tsr_gguf_tensor *tensors;
    char *names;   /* one block holding every key and tensor name */
    bool any_type; /* TSR_GGUF_OPEN_ANY_TYPE: tensors of types we cannot compute with */
};

/* ---- bounds-checked cursor ---- */

typedef struct {
    const uint8_t *base;
    uint64_t size;
    uint64_t pos;
    char *err;
    size_t err_len;
} cursor;

static bool cur_need(cursor *c, uint64_t n, const char *what)
{
    if (n > c->size - c->pos) {
        tsr_set_err(c->err, c->err_len,
                    "truncated file: %s needs %" PRIu64 " bytes at offset %" PRIu64
                    " but the file has %" PRIu64 " bytes",
                    what, n, c->pos, c->size);
        return false;
    }
    return true;
}

static bool cur_u32(cursor *c, uint32_t *v, const char *what)
{
    if (!cur_need(c, 4, what)) return false;
    memcpy(v, c->base + c->pos, 4);
    c->pos += 4;
    return true;
}

static bool cur_u64(cursor *c, uint64_t *v, const char *what)
{
    if (!cur_need(c, 8, what)) return false;
    memcpy(v, c->base + c->pos, 8);
    c->pos += 8;
    return true;
}

/* A string: u64 length then bytes. Returns its offset (of the length field). */
static bool cur_str(cursor *c, tsr_gguf_str *s, const char *what)
{
    uint64_t len;
    if (!cur_u64(c, &len, what)) return false;
    if (len > c->size - c->pos) {
        tsr_set_err(c->err, c->err_len,
                    "%s: string length %" PRIu64 " at offset %" PRIu64
                    " runs past the end of the file (%" PRIu64 " bytes)",
                    what, len, c->pos - 8, c->size);
        return false;
    }
    s->ptr = (const char *)c->base + c->pos;
    s->len = len;
    c->pos += len;
    return true;
}

static uint64_t vtype_size(tsr_gguf_vtype t)
{
    switch (t) {
    case TSR_GGUF_UINT8:
    case TSR_GGUF_INT8:
    case TSR_GGUF_BOOL:
        return 1;
    case TSR_GGUF_UINT16:
    case TSR_GGUF_INT16:
        return 2;
    case TSR_GGUF_UINT32:
    case TSR_GGUF_INT32:
    case TSR_GGUF_FLOAT32:
        return 4;
    case TSR_GGUF_UINT64:
    case TSR_GGUF_INT64:
    case TSR_GGUF_FLOAT64:
        return 8;
    default:
        return 0; /* variable: STRING, ARRAY */
    }
}

const char *tsr_gguf_vtype_name(tsr_gguf_vtype t)
{
    static const char *names[] = {"u8",   "i8",     "u16", "i16", "u32", "i32", "f32",
                                  "bool", "string", "arr", "u64", "i64", "f64"};
    return (unsigned)t < TSR_GGUF_VTYPE_COUNT ? names[t] : "invalid";
}

/* Skip over one value of type t (not an array's header), checking bounds. Nested arrays
 * are walked recursively up to a small depth. */
static bool skip_value(cursor *c, tsr_gguf_vtype t, int depth, const char *what)
{
    uint64_t sz = vtype_size(t);
    if (sz) {
        if (!cur_need(c, sz, what)) return false;
        if (t == TSR_GGUF_BOOL && c->base[c->pos] > 1) {
            tsr_set_err(c->err, c->err_len, "%s: bool value %u at offset %" PRIu64 " is not 0 or 1",
                        what, c->base[c->pos], c->pos);
            return false;
        }
        c->pos += sz;
        return true;
    }
    if (t == TSR_GGUF_STRING) {
        tsr_gguf_str s;
        return cur_str(c, &s, what);
    }
    if (t == TSR_GGUF_ARRAY) {
        uint32_t et;
        uint64_t n;
        if (depth > 2) {
            tsr_set_err(c->err, c->err_len, "%s: arrays nested deeper than 2 levels", what);
            return false;
        }
        if (!cur_u32(c, &et, what) || !cur_u64(c, &n, what)) return false;
        if (et >= TSR_GGUF_VTYPE_COUNT) {
            tsr_set_err(c->err, c->err_len, "%s: invalid array element type %u", what, et);
            return false;
        }
        uint64_t esz = vtype_size((tsr_gguf_vtype)et);
        if (esz) {
            if (n > (c->size - c->pos) / esz) {
                tsr_set_err(c->err, c->err_len,
                            "%s: array of %" PRIu64 " %s runs past the end of the file", what, n,
                            tsr_gguf_vtype_name((tsr_gguf_vtype)et));
                return false;
            }
            if (et == TSR_GGUF_BOOL) {
                for (uint64_t j = 0; j < n; j++)
                    if (!skip_value(c, TSR_GGUF_BOOL, depth + 1, what)) return false;
                return true;
            }
            c->pos += n * esz;
            return true;
        }
        for (uint64_t j = 0; j < n; j++)
            if (!skip_value(c, (tsr_gguf_vtype)et, depth + 1, what)) return false;
        return true;
    }
    tsr_set_err(c->err, c->err_len, "%s: invalid value type %u", what, (unsigned)t);
    return false;
}

/* ---- open ---- */

static bool name_ok(const tsr_gguf_str *s)
{
    /* Names are used as C strings: an embedded NUL would make two names collide. */
    return memchr(s->ptr, 0, s->len) == NULL;
}

static int parse(tsr_gguf *g, char *err, size_t err_len)
{
    cursor c = {g->base, g->size, 0, err, err_len};
    uint32_t magic;
    uint64_t n_tensors, n_kv;
    char what[320];

    if (!cur_u32(&c, &magic, "magic")) return TSR_GGUF_ERR_FORMAT;
    if (memcmp(&magic, "GGUF", 4) != 0) {
        tsr_set_err(err, err_len, "not a GGUF file: magic is %02x %02x %02x %02x, expected 'GGUF'",
                    g->base[0], g->base[1], g->base[2], g->base[3]);
        return TSR_GGUF_ERR_FORMAT;
    }
    if (!cur_u32(&c, &g->version, "version")) return TSR_GGUF_ERR_FORMAT;
    if (g->version != 2 && g->version != 3) {
        tsr_set_err(err, err_len, "unsupported GGUF version %u (this reader supports 2 and 3)",
                    g->version);
        return TSR_GGUF_ERR_FORMAT;
    }
    if (!cur_u64(&c, &n_tensors, "tensor count") || !cur_u64(&c, &n_kv, "metadata count"))
        return TSR_GGUF_ERR_FORMAT;
    /* Each kv needs >= 8+0+4+1 bytes, each tensor info >= 8+4+8+4+8: bound the counts by the
     * file size before allocating anything. */
    if (n_kv > (g->size - c.pos) / 13) {
        tsr_set_err(err, err_len,
                    "metadata count %" PRIu64 " is impossible for a file of %" PRIu64 " bytes",
                    n_kv, g->size);
        return TSR_GGUF_ERR_FORMAT;
    }
    if (n_tensors > (g->size - c.pos) / 32) {
        tsr_set_err(err, err_len,
                    "tensor count %" PRIu64 " is impossible for a file of %" PRIu64 " bytes",
                    n_tensors, g->size);
        return TSR_GGUF_ERR_FORMAT;
    }
    g->kv = calloc(n_kv ? n_kv : 1, sizeof *g->kv);
    g->kv_cap = g->kv ? (int64_t)n_kv : 0;
    g->tensors = calloc(n_tensors ? n_tensors : 1, sizeof *g->tensors);
    /* Names total at most the file size plus one NUL each. */
    g->names = malloc(g->size + n_kv + n_tensors + 1);
    if (!g->kv || !g->tensors || !g->names) {
        tsr_set_err(err, err_len, "out of memory indexing the GGUF header");
        return TSR_GGUF_ERR_NOMEM;
    }
    char *np = g->names;
    g->alignment = TSR_GGUF_DEFAULT_ALIGN;

    for (uint64_t i = 0; i < n_kv; i++) {
        gguf_kv *kv = &g->kv[i];
        tsr_gguf_str key;
        uint32_t t;
        snprintf(what, sizeof what, "metadata %" PRIu64 " key", i);
        if (!cur_str(&c, &key, what)) return TSR_GGUF_ERR_FORMAT;
        if (!name_ok(&key)) {
            tsr_set_err(err, err_len, "metadata %" PRIu64 ": key contains a NUL byte", i);
            return TSR_GGUF_ERR_FORMAT;
        }
        memcpy(np, key.ptr, key.len);
        np[key.len] = 0;
        kv->key = np;
        np += key.len + 1;
        snprintf(what, sizeof what, "metadata %" PRIu64 " '%.200s'", i, kv->key);
        for (uint64_t j = 0; j < i; j++) {
            if (strcmp(g->kv[j].key, kv->key) == 0) {
                tsr_set_err(err, err_len, "%s: duplicate key", what);
                return TSR_GGUF_ERR_FORMAT;
            }
        }
        if (!cur_u32(&c, &t, what)) return TSR_GGUF_ERR_FORMAT;
        if (t >= TSR_GGUF_VTYPE_COUNT) {
            tsr_set_err(err, err_len, "%s: invalid value type %u", what, t);
            return TSR_GGUF_ERR_FORMAT;
        }
        kv->type = (tsr_gguf_vtype)t;
        kv->off = c.pos;
        if (kv->type == TSR_GGUF_ARRAY) {
            uint32_t et;
            uint64_t n;
            cursor c2 = c;
            if (!cur_u32(&c2, &et, what) || !cur_u64(&c2, &n, what)) return TSR_GGUF_ERR_FORMAT;
            if (et >= TSR_GGUF_VTYPE_COUNT) {
                tsr_set_err(err, err_len, "%s: invalid array element type %u", what, et);
                return TSR_GGUF_ERR_FORMAT;
            }
            kv->elem_type = (tsr_gguf_vtype)et;
            kv->n_elems = n;
            if (!vtype_size(kv->elem_type)) {
                /* Variable-size elements: each takes >= 8 bytes; index them. */
                if (n > (c2.size - c2.pos) / 8) {
                    tsr_set_err(err, err_len,
                                "%s: array of %" PRIu64 " elements runs past the end of the file",
                                what, n);
                    return TSR_GGUF_ERR_FORMAT;
                }
                kv->elem_off = malloc((n ? n : 1) * sizeof *kv->elem_off);
                if (!kv->elem_off) {
                    tsr_set_err(err, err_len, "out of memory indexing %s", what);
                    return TSR_GGUF_ERR_NOMEM;
                }
                for (uint64_t j = 0; j < n; j++) {
                    kv->elem_off[j] = c2.pos;
                    if (!skip_value(&c2, kv->elem_type, 1, what)) return TSR_GGUF_ERR_FORMAT;
                }
                c = c2;
                continue;
            }
        }
        if (!skip_value(&c, kv->type, 0, what)) return TSR_GGUF_ERR_FORMAT;
    }
    g->n_kv = (int64_t)n_kv;

    int64_t ia = tsr_gguf_find_key(g, "general.alignment");
    if (ia >= 0) {
        int64_t a;
        if (!tsr_gguf_kv_int(g, ia, &a) || a <= 0 || a > (1 << 20) || (a & (a - 1)) != 0) {
            tsr_set_err(err, err_len,
                        "general.alignment must be an integer power of two (1..1048576)");
            return TSR_GGUF_ERR_FORMAT;
        }
        g->alignment = (uint64_t)a;
    }

    for (uint64_t i = 0; i < n_tensors; i++) {
        tsr_gguf_tensor *t = &g->tensors[i];
        tsr_gguf_str name;
        snprintf(what, sizeof what, "tensor %" PRIu64 " name", i);
        if (!cur_str(&c, &name, what)) return TSR_GGUF_ERR_FORMAT;
        if (!name_ok(&name) || name.len == 0) {
            tsr_set_err(err, err_len, "tensor %" PRIu64 ": name is empty or contains a NUL byte",
                        i);
            return TSR_GGUF_ERR_FORMAT;
        }
        memcpy(np, name.ptr, name.len);
        np[name.len] = 0;
        t->name = np;
        np += name.len + 1;
        snprintf(what, sizeof what, "tensor %" PRIu64 " '%.200s'", i, t->name);
        for (uint64_t j = 0; j < i; j++) {
            if (strcmp(g->tensors[j].name, t->name) == 0) {
                tsr_set_err(err, err_len, "%s: duplicate tensor name", what);
                return TSR_GGUF_ERR_FORMAT;
            }
        }
        if (!cur_u32(&c, &t->n_dims, what)) return TSR_GGUF_ERR_FORMAT;
        if (t->n_dims < 1 || t->n_dims > TSR_GGUF_MAX_DIMS) {
            tsr_set_err(err, err_len, "%s: n_dims %u is not in 1..%d", what, t->n_dims,
                        TSR_GGUF_MAX_DIMS);
            return TSR_GGUF_ERR_FORMAT;
        }
        uint64_t n_elems = 1;
        for (uint32_t d = 0; d < TSR_GGUF_MAX_DIMS; d++) {
            uint64_t ne = 1;
            if (d < t->n_dims && !cur_u64(&c, &ne, what)) return TSR_GGUF_ERR_FORMAT;
            if (ne == 0 || ne > (uint64_t)INT64_MAX || n_elems > (uint64_t)INT64_MAX / ne) {
                tsr_set_err(err, err_len, "%s: dimension %u = %" PRIu64 " is zero or overflows",
                            what, d, ne);
                return TSR_GGUF_ERR_FORMAT;
            }
            t->ne[d] = (int64_t)ne;
            n_elems *= ne;
        }
        if (!cur_u32(&c, &t->type, what) || !cur_u64(&c, &t->offset, what))
            return TSR_GGUF_ERR_FORMAT;
        int64_t blk = tsr_type_block_elems(t->type);
        size_t blk_bytes = tsr_type_block_bytes(t->type);
        if (!tsr_type_supported(t->type)) {
            if (!g->any_type) {
                tsr_set_err(err, err_len,
                            "%s: tensor type %u (%s) is not supported (supported: %s)", what,
                            t->type, tsr_type_name(t->type), tsr_type_supported_list());
                return TSR_GGUF_ERR_FORMAT;
            }
            if (!tsr_type_ggml_block(t->type, &blk, &blk_bytes)) {
                /* an id ggml does not define: its size cannot be known (n_bytes 0) */
                t->n_bytes = 0;
                if (t->offset % g->alignment != 0) {
                    tsr_set_err(err, err_len,
                                "%s: offset %" PRIu64
                                " is not a multiple of the alignment %" PRIu64,
                                what, t->offset, g->alignment);
                    return TSR_GGUF_ERR_FORMAT;
                }
                continue;
            }
        }
        if (t->ne[0] % blk != 0) {
            tsr_set_err(err, err_len,
                        "%s: row length %" PRId64 " is not a multiple of the %s block "
                        "size %" PRId64,
                        what, t->ne[0], tsr_type_name(t->type), blk);
            return TSR_GGUF_ERR_FORMAT;
        }
        uint64_t row = (uint64_t)(t->ne[0] / blk) * blk_bytes;
        uint64_t rows = n_elems / (uint64_t)t->ne[0];
        if (row == 0 || rows > UINT64_MAX / row) {
            tsr_set_err(err, err_len, "%s: byte size overflows", what);
            return TSR_GGUF_ERR_FORMAT;
        }
        t->n_bytes = row * rows;
        if (t->offset % g->alignment != 0) {
            tsr_set_err(err, err_len,
                        "%s: offset %" PRIu64 " is not a multiple of the alignment %" PRIu64, what,
                        t->offset, g->alignment);
            return TSR_GGUF_ERR_FORMAT;
        }
    }
    g->n_tensors = (int64_t)n_tensors;

    /* The data section starts at the next multiple of the alignment. */
    uint64_t pad = (g->alignment - c.pos % g->alignment) % g->alignment;
    g->data_off = c.pos + pad;
    if (n_tensors > 0 && g->data_off > g->size) {
        tsr_set_err(err, err_len,
                    "truncated file: data section would start at %" PRIu64
                    " past the end of the file (%" PRIu64 " bytes)",
                    g->data_off, g->size);
        return TSR_GGUF_ERR_FORMAT;
    }
    for (int64_t i = 0; i < g->n_tensors; i++) {
        tsr_gguf_tensor *t = &g->tensors[i];
        uint64_t avail = g->size - g->data_off;
        if (t->offset > avail || t->n_bytes > avail - t->offset) { /* n_bytes 0: unknown type */
            tsr_set_err(err, err_len,
                        "tensor %" PRId64 " '%.200s': data at offset %" PRIu64 " + %" PRIu64
                        " bytes runs past the end of the file (%" PRIu64 " bytes of data)",
                        i, t->name, t->offset, t->n_bytes, avail);
            return TSR_GGUF_ERR_FORMAT;
        }
        t->data = g->base + g->data_off + t->offset;
    }
    return TSR_GGUF_OK;
}

static int open_common(tsr_gguf *g, tsr_gguf **out, char *err, size_t err_len)
{
    int rc;
    if (g->size < 24) {
        tsr_set_err(err, err_len,
                    "truncated file: %" PRIu64 " bytes is smaller than a GGUF header "
                    "(24 bytes)",
                    g->size);
        rc = TSR_GGUF_ERR_FORMAT;
        goto fail;
    }
    rc = parse(g, err, err_len);
    if (rc != 0) goto fail;
    *out = g;
    return 0;
fail:
    tsr_gguf_close(g);
    return rc;
}

int tsr_gguf_open(const char *path, tsr_gguf **out, char *err, size_t err_len)
{
    return tsr_gguf_open_ex(path, 0, out, err, err_len);
}

int tsr_gguf_open_ex(const char *path, uint32_t flags, tsr_gguf **out, char *err, size_t err_len)
{
    *out = NULL;
    tsr_gguf *g = calloc(1, sizeof *g);
    if (!g) {
        tsr_set_err(err, err_len, "out of memory");
        return TSR_GGUF_ERR_NOMEM;
    }
    g->any_type = (flags & TSR_GGUF_OPEN_ANY_TYPE) != 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        tsr_set_err(err, err_len, "cannot open '%s': %s", path, strerror(errno));
        free(g);
        return TSR_GGUF_ERR_IO;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        tsr_set_err(err, err_len, "'%s' is not a regular file", path);
        close(fd);
        free(g);
        return TSR_GGUF_ERR_IO;
    }
    g->size = (uint64_t)st.st_size;
    g->fd = -1;
    if (g->size > 0) {
        void *p = mmap(NULL, g->size, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) {
            tsr_set_err(err, err_len, "cannot map '%s': %s", path, strerror(errno));
            close(fd);
            free(g);
            return TSR_GGUF_ERR_IO;
        }
        g->base = p;
        g->mapped = true;
    }
    g->fd = fd;
    int rc = open_common(g, out, err, err_len);
    if (rc != 0 && err && err_len) {
        /* Prefix the path so a user knows which file is broken. */
        char tmp[512];
        snprintf(tmp, sizeof tmp, "%s", err);
        tsr_set_err(err, err_len, "%s: %s", path, tmp);
    }
    return rc;
}

int tsr_gguf_open_memory(const void *buf, size_t len, tsr_gguf **out, char *err, size_t err_len)
{
    return tsr_gguf_open_memory_ex(buf, len, 0, out, err, err_len);
}

int tsr_gguf_open_memory_ex(const void *buf, size_t len, uint32_t flags, tsr_gguf **out, char *err,
                            size_t err_len)
{
    *out = NULL;
    tsr_gguf *g = calloc(1, sizeof *g);
    if (!g) {
        tsr_set_err(err, err_len, "out of memory");
        return TSR_GGUF_ERR_NOMEM;
    }
    g->any_type = (flags & TSR_GGUF_OPEN_ANY_TYPE) != 0;
    g->base = buf;
    g->size = len;
    g->fd = -1;
    return open_common(g, out, err, err_len);
}

void tsr_gguf_close(tsr_gguf *g)
{
    if (!g) return;
    for (int64_t i = 0; i < g->kv_cap; i++) free(g->kv[i].elem_off);
    free(g->kv);
    free(g->tensors);
    free(g->names);
    if (g->mapped) munmap((void *)g->base, g->size);
    if (g->fd >= 0) close(g->fd);
    free(g);
}

int tsr_gguf_pread(const tsr_gguf *g, uint64_t offset, void *buf, size_t n)
{
    if (offset > g->size || n > g->size - offset) return TSR_GGUF_ERR_FORMAT;
    if (g->fd < 0) {
        memcpy(buf, g->base + offset, n);
        return 0;
    }
    uint8_t *p = buf;
    while (n > 0) {
        ssize_t r = pread(g->fd, p, n, (off_t)offset);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return TSR_GGUF_ERR_IO;
        p += r;
        n -= (size_t)r;
        offset += (uint64_t)r;
    }
    return 0;
}

/* ---- accessors ---- */

uint32_t tsr_gguf_version(const tsr_gguf *g)
{
    return g->version;
}
uint64_t tsr_gguf_alignment(const tsr_gguf *g)
{
    return g->alignment;
}
uint64_t tsr_gguf_file_size(const tsr_gguf *g)
{
    return g->size;
}
uint64_t tsr_gguf_data_offset(const tsr_gguf *g)
{
    return g->data_off;
}
const void *tsr_gguf_base(const tsr_gguf *g)
{
    return g->base;
}
int64_t tsr_gguf_n_kv(const tsr_gguf *g)
{
    return g->n_kv;
}
int64_t tsr_gguf_n_tensors(const tsr_gguf *g)
{
    return g->n_tensors;
}

int64_t tsr_gguf_find_key(const tsr_gguf *g, const char *key)
{
    for (int64_t i = 0; i < g->n_kv; i++)
        if (strcmp(g->kv[i].key, key) == 0) return i;
    return -1;
}

const char *tsr_gguf_kv_key(const tsr_gguf *g, int64_t i)
{
    return (i >= 0 && i < g->n_kv) ? g->kv[i].key : NULL;
}

tsr_gguf_vtype tsr_gguf_kv_type(const tsr_gguf *g, int64_t i)
{
    return (i >= 0 && i < g->n_kv) ? g->kv[i].type : TSR_GGUF_VTYPE_COUNT;
}

bool tsr_gguf_kv_arr(const tsr_gguf *g, int64_t i, tsr_gguf_vtype *elem_type, uint64_t *n)
{
    if (i < 0 || i >= g->n_kv || g->kv[i].type != TSR_GGUF_ARRAY) return false;
    if (elem_type) *elem_type = g->kv[i].elem_type;
    if (n) *n = g->kv[i].n_elems;
    return true;
}

/* Read a scalar of type t at file offset off as int64 (integers, bool). */
static bool read_int(const tsr_gguf *g, tsr_gguf_vtype t, uint64_t off, int64_t *out)
{
    const uint8_t *p = g->base + off;
    switch (t) {
    case TSR_GGUF_UINT8:
        *out = *p;
        return true;
    case TSR_GGUF_INT8:
        *out = (int8_t)*p;
        return true;
    case TSR_GGUF_BOOL:
        *out = *p != 0;
        return true;
    case TSR_GGUF_UINT16: {
        uint16_t v;
        memcpy(&v, p, 2);
        *out = v;
        return true;
    }
    case TSR_GGUF_INT16: {
        int16_t v;
        memcpy(&v, p, 2);
        *out = v;
        return true;
    }
    case TSR_GGUF_UINT32: {
        uint32_t v;
        memcpy(&v, p, 4);
        *out = v;
        return true;
    }
    case TSR_GGUF_INT32: {
        int32_t v;
        memcpy(&v, p, 4);
        *out = v;
        return true;
    }
    case TSR_GGUF_INT64: {
        int64_t v;
        memcpy(&v, p, 8);
        *out = v;
        return true;
    }
    case TSR_GGUF_UINT64: {
        uint64_t v;
        memcpy(&v, p, 8);
        if (v > (uint64_t)INT64_MAX) return false;
        *out = (int64_t)v;
        return true;
    }
    default:
        return false;
    }
}

static bool read_float(const tsr_gguf *g, tsr_gguf_vtype t, uint64_t off, double *out)
{
    const uint8_t *p = g->base + off;
    if (t == TSR_GGUF_FLOAT32) {
        float v;
        memcpy(&v, p, 4);
        *out = v;
        return true;
    }
    if (t == TSR_GGUF_FLOAT64) {
        memcpy(out, p, 8);
        return true;
    }
    return false;
}

static bool read_str(const tsr_gguf *g, tsr_gguf_vtype t, uint64_t off, tsr_gguf_str *out)
{
    if (t != TSR_GGUF_STRING) return false;
    memcpy(&out->len, g->base + off, 8);
    out->ptr = (const char *)g->base + off + 8;
    return true;
}

bool tsr_gguf_kv_int(const tsr_gguf *g, int64_t i, int64_t *out)
{
    return i >= 0 && i < g->n_kv && read_int(g, g->kv[i].type, g->kv[i].off, out);
}

bool tsr_gguf_kv_float(const tsr_gguf *g, int64_t i, double *out)
{
    return i >= 0 && i < g->n_kv && read_float(g, g->kv[i].type, g->kv[i].off, out);
}

bool tsr_gguf_kv_str(const tsr_gguf *g, int64_t i, tsr_gguf_str *out)
{
    return i >= 0 && i < g->n_kv && read_str(g, g->kv[i].type, g->kv[i].off, out);
}

bool tsr_gguf_get_int(const tsr_gguf *g, const char *key, int64_t *out)
{
    return tsr_gguf_kv_int(g, tsr_gguf_find_key(g, key), out);
}

bool tsr_gguf_get_float(const tsr_gguf *g, const char *key, double *out)
{
    return tsr_gguf_kv_float(g, tsr_gguf_find_key(g, key), out);
}

bool tsr_gguf_get_bool(const tsr_gguf *g, const char *key, bool *out)
{
    int64_t i = tsr_gguf_find_key(g, key);
    if (i < 0 || g->kv[i].type != TSR_GGUF_BOOL) return false;
    *out = g->base[g->kv[i].off] != 0;
    return true;
}

bool tsr_gguf_get_str(const tsr_gguf *g, const char *key, tsr_gguf_str *out)
{
    return tsr_gguf_kv_str(g, tsr_gguf_find_key(g, key), out);
}

/* File offset of element j of array kv i, or 0 when out of range. */
static uint64_t elem_offset(const tsr_gguf *g, int64_t i, uint64_t j)
{
    if (i < 0 || i >= g->n_kv || g->kv[i].type != TSR_GGUF_ARRAY) return 0;
    const gguf_kv *kv = &g->kv[i];
    if (j >= kv->n_elems) return 0;
    if (kv->elem_off) return kv->elem_off[j];
    return kv->off + 12 + j * vtype_size(kv->elem_type);
}

bool tsr_gguf_arr_int(const tsr_gguf *g, int64_t i, uint64_t j, int64_t *out)
{
    uint64_t off = elem_offset(g, i, j);
    return off && read_int(g, g->kv[i].elem_type, off, out);
}

bool tsr_gguf_arr_float(const tsr_gguf *g, int64_t i, uint64_t j, double *out)
{
    uint64_t off = elem_offset(g, i, j);
    return off && read_float(g, g->kv[i].elem_type, off, out);
}

bool tsr_gguf_arr_str(const tsr_gguf *g, int64_t i, uint64_t j, tsr_gguf_str *out)
{
    uint64_t off = elem_offset(g, i, j);
    return off && read_str(g, g->kv[i].elem_type, off, out);
}

const tsr_gguf_tensor *tsr_gguf_tensor_at(const tsr_gguf *g, int64_t i)
{
    return (i >= 0 && i < g->n_tensors) ? &g->tensors[i] : NULL;
}

int tsr_gguf_check_types(const tsr_gguf *g, char *err, size_t err_len)
{
    for (int64_t i = 0; i < g->n_tensors; i++) {
        const tsr_gguf_tensor *t = &g->tensors[i];
        if (tsr_type_supported(t->type)) continue;
        if (tsr_type_ggml_block(t->type, NULL, NULL))
            tsr_set_err(err, err_len,
                        "tensor %s has type %s (ggml type id %u), which Tessera cannot compute "
                        "with (it runs %s)",
                        t->name, tsr_type_name(t->type), t->type, tsr_type_supported_list());
        else
            tsr_set_err(err, err_len,
                        "tensor %s has type id %u, which ggml does not define (a newer or "
                        "corrupt file?)",
                        t->name, t->type);
        return TSR_GGUF_ERR_FORMAT;
    }
    return TSR_GGUF_OK;
}

const tsr_gguf_tensor *tsr_gguf_find_tensor(const tsr_gguf *g, const char *name)
{
    for (int64_t i = 0; i < g->n_tensors; i++)
        if (strcmp(g->tensors[i].name, name) == 0) return &g->tensors[i];
    return NULL;
}

/* ---- writer ---- */

/* A growable byte buffer. */
typedef struct {
    uint8_t *p;
    size_t n, cap;
    bool oom;
} buf_t;

static void buf_put(buf_t *b, const void *src, size_t n)
{
    if (b->oom) return;
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n) cap *= 2;
        uint8_t *p = realloc(b->p, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}

static void buf_u32(buf_t *b, uint32_t v)
{
    buf_put(b, &v, 4);
}
static void buf_u64(buf_t *b, uint64_t v)
{
    buf_put(b, &v, 8);
}
static void buf_str(buf_t *b, const char *s, size_t len)
{
    buf_u64(b, len);
    buf_put(b, s, len);
}

typedef struct {
    char *key;
    buf_t val; /* type tag + encoded value */
} wkv;

typedef struct {
    char *name;
    uint32_t type, n_dims;
    int64_t ne[TSR_GGUF_MAX_DIMS];
    void *data;
    uint64_t n_bytes;
} wtensor;

struct tsr_gguf_writer {
    wkv *kv;
    size_t n_kv, cap_kv;
    wtensor *t;
    size_t n_t, cap_t;
};

tsr_gguf_writer *tsr_gguf_writer_new(void)
{
    return calloc(1, sizeof(tsr_gguf_writer));
}

void tsr_gguf_writer_free(tsr_gguf_writer *w)
{
    if (!w) return;
    for (size_t i = 0; i < w->n_kv; i++) {
        free(w->kv[i].key);
        free(w->kv[i].val.p);
    }
    for (size_t i = 0; i < w->n_t; i++) {
        free(w->t[i].name);
        free(w->t[i].data);
    }
    free(w->kv);
    free(w->t);
    free(w);
}

/* The value buffer of `key`, emptied (replacing an existing key keeps its position). */
static buf_t *writer_slot(tsr_gguf_writer *w, const char *key)
{
    for (size_t i = 0; i < w->n_kv; i++) {
        if (strcmp(w->kv[i].key, key) == 0) {
            w->kv[i].val.n = 0;
            return &w->kv[i].val;
        }
    }
    if (w->n_kv == w->cap_kv) {
        size_t cap = w->cap_kv ? 2 * w->cap_kv : 32;
        wkv *p = realloc(w->kv, cap * sizeof *p);
        if (!p) return NULL;
        w->kv = p;
        w->cap_kv = cap;
    }
    wkv *kv = &w->kv[w->n_kv];
    memset(kv, 0, sizeof *kv);
    kv->key = strdup(key);
    if (!kv->key) return NULL;
    w->n_kv++;
    return &kv->val;
}

int tsr_gguf_writer_set_int(tsr_gguf_writer *w, const char *key, tsr_gguf_vtype type, int64_t v)
{
    uint64_t sz = vtype_size(type);
    if (!sz || type == TSR_GGUF_FLOAT32 || type == TSR_GGUF_FLOAT64) return TSR_GGUF_ERR_FORMAT;
    buf_t *b = writer_slot(w, key);
    if (!b) return TSR_GGUF_ERR_NOMEM;
    buf_u32(b, type);
    buf_put(b, &v, sz); /* little-endian: the low bytes */
    return b->oom ? TSR_GGUF_ERR_NOMEM : 0;
}

int tsr_gguf_writer_set_float(tsr_gguf_writer *w, const char *key, tsr_gguf_vtype type, double v)
{
    buf_t *b;
    if (type == TSR_GGUF_FLOAT32) {
        float f = (float)v;
        if (!(b = writer_slot(w, key))) return TSR_GGUF_ERR_NOMEM;
        buf_u32(b, type);
        buf_put(b, &f, 4);
    } else if (type == TSR_GGUF_FLOAT64) {
        if (!(b = writer_slot(w, key))) return TSR_GGUF_ERR_NOMEM;
        buf_u32(b, type);
        buf_put(b, &v, 8);
    } else {
        return TSR_GGUF_ERR_FORMAT;
    }
    return b->oom ? TSR_GGUF_ERR_NOMEM : 0;
}

int tsr_gguf_writer_set_str(tsr_gguf_writer *w, const char *key, const char *s, size_t len)
{
    buf_t *b = writer_slot(w, key);
    if (!b) return TSR_GGUF_ERR_NOMEM;
    buf_u32(b, TSR_GGUF_STRING);
    buf_str(b, s, len);
    return b->oom ? TSR_GGUF_ERR_NOMEM : 0;
}

int tsr_gguf_writer_set_arr(tsr_gguf_writer *w, const char *key, tsr_gguf_vtype elem_type,
                            const void *data, uint64_t n)
{
    uint64_t sz = vtype_size(elem_type);
    if (!sz) return TSR_GGUF_ERR_FORMAT;
    buf_t *b = writer_slot(w, key);
    if (!b) return TSR_GGUF_ERR_NOMEM;
    buf_u32(b, TSR_GGUF_ARRAY);
    buf_u32(b, elem_type);
    buf_u64(b, n);
    buf_put(b, data, n * sz);
    return b->oom ? TSR_GGUF_ERR_NOMEM : 0;
}

int tsr_gguf_writer_set_arr_str(tsr_gguf_writer *w, const char *key, const char *const *strs,
                                const size_t *lens, uint64_t n)
{
    buf_t *b = writer_slot(w, key);
    if (!b) return TSR_GGUF_ERR_NOMEM;
    buf_u32(b, TSR_GGUF_ARRAY);
    buf_u32(b, TSR_GGUF_STRING);
    buf_u64(b, n);
    for (uint64_t i = 0; i < n; i++) buf_str(b, strs[i], lens[i]);
    return b->oom ? TSR_GGUF_ERR_NOMEM : 0;
}

int tsr_gguf_writer_copy_kv(tsr_gguf_writer *w, const tsr_gguf *g, int64_t i)
{
    if (i < 0 || i >= g->n_kv) return TSR_GGUF_ERR_FORMAT;
    const gguf_kv *kv = &g->kv[i];
    /* The value's encoded bytes run from kv->off to the start of the next item; measure
     * them by walking the value again. */
    cursor c = {g->base, g->size, kv->off, NULL, 0};
    if (!skip_value(&c, kv->type, 0, "copy")) return TSR_GGUF_ERR_FORMAT;
    buf_t *b = writer_slot(w, kv->key);
    if (!b) return TSR_GGUF_ERR_NOMEM;
    buf_u32(b, kv->type);
    buf_put(b, g->base + kv->off, c.pos - kv->off);
    return b->oom ? TSR_GGUF_ERR_NOMEM : 0;
}

int tsr_gguf_writer_add_tensor(tsr_gguf_writer *w, const char *name, uint32_t type, uint32_t n_dims,
                               const int64_t *ne, const void *data, uint64_t n_bytes)
{
    if (n_dims < 1 || n_dims > TSR_GGUF_MAX_DIMS) return TSR_GGUF_ERR_FORMAT;
    if (w->n_t == w->cap_t) {
        size_t cap = w->cap_t ? 2 * w->cap_t : 64;
        wtensor *p = realloc(w->t, cap * sizeof *p);
        if (!p) return TSR_GGUF_ERR_NOMEM;
        w->t = p;
        w->cap_t = cap;
    }
    wtensor *t = &w->t[w->n_t];
    memset(t, 0, sizeof *t);
    t->name = strdup(name);
    t->data = malloc(n_bytes ? n_bytes : 1);
    if (!t->name || !t->data) {
        free(t->name);
        free(t->data);
        return TSR_GGUF_ERR_NOMEM;
    }
    memcpy(t->data, data, n_bytes);
    t->type = type;
    t->n_dims = n_dims;
    for (uint32_t d = 0; d < TSR_GGUF_MAX_DIMS; d++) t->ne[d] = d < n_dims ? ne[d] : 1;
    t->n_bytes = n_bytes;
    w->n_t++;
    return 0;
}

int tsr_gguf_writer_save(tsr_gguf_writer *w, const char *path, char *err, size_t err_len)
{
    uint64_t align = TSR_GGUF_DEFAULT_ALIGN;
    buf_t h = {0};
    int rc = 0;
    FILE *f = NULL;

    for (size_t i = 0; i < w->n_kv; i++) {
        if (strcmp(w->kv[i].key, "general.alignment") == 0) {
            uint32_t t;
            memcpy(&t, w->kv[i].val.p, 4);
            if (t == TSR_GGUF_UINT32) {
                uint32_t a;
                memcpy(&a, w->kv[i].val.p + 4, 4);
                if (a && (a & (a - 1)) == 0) align = a;
            }
        }
    }
    buf_put(&h, "GGUF", 4);
    buf_u32(&h, 3);
    buf_u64(&h, w->n_t);
    buf_u64(&h, w->n_kv);
    for (size_t i = 0; i < w->n_kv; i++) {
        buf_str(&h, w->kv[i].key, strlen(w->kv[i].key));
        buf_put(&h, w->kv[i].val.p, w->kv[i].val.n);
    }
    uint64_t off = 0;
    for (size_t i = 0; i < w->n_t; i++) {
        wtensor *t = &w->t[i];
        int64_t n_el = 1;
        for (int d = 0; d < TSR_GGUF_MAX_DIMS; d++) n_el *= t->ne[d];
        size_t row = tsr_row_bytes(t->type, t->ne[0]);
        if (row == 0 || (uint64_t)row * (uint64_t)(n_el / t->ne[0]) != t->n_bytes) {
            tsr_set_err(err, err_len,
                        "tensor '%s': %" PRIu64 " bytes do not match type %s and shape", t->name,
                        t->n_bytes, tsr_type_name(t->type));
            rc = TSR_GGUF_ERR_FORMAT;
            goto done;
        }
        buf_str(&h, t->name, strlen(t->name));
        buf_u32(&h, t->n_dims);
        for (uint32_t d = 0; d < t->n_dims; d++) buf_u64(&h, (uint64_t)t->ne[d]);
        buf_u32(&h, t->type);
        buf_u64(&h, off);
        off += t->n_bytes;
        off += (align - off % align) % align;
    }
    static const uint8_t zeros[64];
    while (h.n % align) buf_put(&h, zeros, 1);
    if (h.oom) {
        tsr_set_err(err, err_len, "out of memory building the GGUF header");
        rc = TSR_GGUF_ERR_NOMEM;
        goto done;
    }
    f = fopen(path, "wb");
    if (!f) {
        tsr_set_err(err, err_len, "cannot create '%s': %s", path, strerror(errno));
        rc = TSR_GGUF_ERR_IO;
        goto done;
    }
    bool ok = fwrite(h.p, 1, h.n, f) == h.n;
    for (size_t i = 0; ok && i < w->n_t; i++) {
        wtensor *t = &w->t[i];
        ok = fwrite(t->data, 1, t->n_bytes, f) == t->n_bytes;
        uint64_t pad = (align - t->n_bytes % align) % align;
        while (ok && pad > 0) {
            size_t k = pad > sizeof zeros ? sizeof zeros : pad;
            ok = fwrite(zeros, 1, k, f) == k;
            pad -= k;
        }
    }
    if (fclose(f) != 0) ok = false;
    if (!ok) {
        tsr_set_err(err, err_len, "writing '%s' failed: %s", path, strerror(errno));
        rc = TSR_GGUF_ERR_IO;
    }
done:
    free(h.p);
    return rc;
}
