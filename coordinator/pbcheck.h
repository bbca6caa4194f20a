/*
 * pbcheck.h — checks of the string fields of a received protobuf message, on its wire
 * bytes, before protobuf-c unpacks it.
 *
 * Why on the wire: protobuf-c hands string fields back as NUL-terminated char *, so a NUL
 * byte inside a string would silently cut it short, and it does not check UTF-8 (proto3
 * and the gRPC ecosystem require string fields to be UTF-8; proto2 implementations such
 * as Python's refuse to produce anything else). Walking the message with its descriptor
 * checks every string field — top level, repeated and inside nested messages — of every
 * request type, including fields added later, with no per-field code.
 */
#ifndef TSR_PBCHECK_H
#define TSR_PBCHECK_H

#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* True when the n bytes at s are valid UTF-8 (no overlong forms, no surrogates, nothing
 * above U+10FFFF); otherwise false and *bad_at the offset of the first invalid byte. */
bool tsr_pbcheck_utf8(const uint8_t *s, size_t n, size_t *bad_at);

/*
 * Check every string field of the message in buf (len bytes) of type desc: no NUL byte,
 * valid UTF-8. Returns 0 when they are fine (or when the bytes are not a well-formed
 * message: unpacking then reports that), -1 with a message in err naming the field
 * ("prompt: contains a NUL byte at offset 5; ...", "stop[2]: not valid UTF-8 ...").
 */
int tsr_pbcheck_strings(const ProtobufCMessageDescriptor *desc, const uint8_t *buf, size_t len,
                        char *err, size_t err_len);

#endif
