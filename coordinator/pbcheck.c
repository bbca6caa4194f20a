/* pbcheck.c — see pbcheck.h. The protobuf wire format: a message is a sequence of
 * (varint key = field number << 3 | wire type, value); wire type 2 values are a varint
 * length then that many bytes (strings, bytes, nested messages, packed repeated). */
#include "coordinator/pbcheck.h"
#include "kernels/util.h"

#include <stdio.h>
#include <string.h>

#define MAX_DEPTH 16 /* nested messages followed; deeper ones are left to protobuf-c */

bool tsr_pbcheck_utf8(const uint8_t *s, size_t n, size_t *bad_at)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t k;
        uint32_t cp, min;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            k = 1, cp = c & 0x1F, min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            k = 2, cp = c & 0x0F, min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            k = 3, cp = c & 0x07, min = 0x10000;
        } else {
            goto bad;
        }
        if (n - i <= k) goto bad;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80) goto bad;
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) goto bad;
        i += k + 1;
    }
    return true;
bad:
    if (bad_at) *bad_at = i;
    return false;
}

/* Read a varint at *p (< end); false when truncated or longer than 10 bytes. */
static bool read_varint(const uint8_t **p, const uint8_t *end, uint64_t *v)
{
    uint64_t x = 0;
    for (int shift = 0; shift < 70 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        x |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            *v = x;
            return true;
        }
    }
    return false;
}

/* The repeated field's index of this occurrence: count earlier occurrences. */
typedef struct {
    uint32_t number;
    size_t count;
} occ;

static int check(const ProtobufCMessageDescriptor *desc, const uint8_t *p, const uint8_t *end,
                 const char *prefix, int depth, char *err, size_t err_len)
{
    occ seen[32];
    size_t n_seen = 0;
    while (p < end) {
        uint64_t key, len;
        if (!read_varint(&p, end, &key)) return 0;
        uint32_t wt = (uint32_t)(key & 7), number = (uint32_t)(key >> 3);
        switch (wt) {
        case 0:
            if (!read_varint(&p, end, &len)) return 0;
            continue;
        case 1:
            if (end - p < 8) return 0;
            p += 8;
            continue;
        case 5:
            if (end - p < 4) return 0;
            p += 4;
            continue;
        case 2:
            break;
        default:
            return 0; /* groups or garbage: protobuf-c decides */
        }
        if (!read_varint(&p, end, &len) || len > (uint64_t)(end - p)) return 0;
        const uint8_t *v = p;
        p += len;
        const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field(desc, number);
        if (!f || (f->type != PROTOBUF_C_TYPE_STRING && f->type != PROTOBUF_C_TYPE_MESSAGE))
            continue;
        /* The field's name as the client knows it: "stop[2]", "messages[1].content". */
        char name[256];
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t idx = 0, j;
            for (j = 0; j < n_seen && seen[j].number != number; j++) {
            }
            if (j < n_seen) {
                idx = seen[j].count++;
            } else if (n_seen < sizeof seen / sizeof *seen) {
                seen[n_seen++] = (occ){number, 1};
            }
            snprintf(name, sizeof name, "%s%s[%zu]", prefix, f->name, idx);
        } else {
            snprintf(name, sizeof name, "%s%s", prefix, f->name);
        }
        if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
            if (depth >= MAX_DEPTH || !f->descriptor) continue;
            char sub[260];
            snprintf(sub, sizeof sub, "%s.", name);
            if (check(f->descriptor, v, v + len, sub, depth + 1, err, err_len) != 0) return -1;
            continue;
        }
        const void *nul = memchr(v, 0, (size_t)len);
        if (nul) {
            tsr_set_err(err, err_len,
                        "%s: contains a NUL byte at offset %zu; text fields cannot hold NUL "
                        "(send token ids for binary input)",
                        name, (size_t)((const uint8_t *)nul - v));
            return -1;
        }
        size_t bad = 0;
        if (!tsr_pbcheck_utf8(v, (size_t)len, &bad)) {
            tsr_set_err(err, err_len,
                        "%s: not valid UTF-8 (byte 0x%02x at offset %zu); string fields must be "
                        "UTF-8",
                        name, v[bad], bad);
            return -1;
        }
    }
    return 0;
}

int tsr_pbcheck_strings(const ProtobufCMessageDescriptor *desc, const uint8_t *buf, size_t len,
                        char *err, size_t err_len)
{
    if (!desc || !buf) return 0;
    return check(desc, buf, buf + len, "", 0, err, err_len);
}
