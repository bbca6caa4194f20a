/*
 * grpcutil.h — small gRPC core helpers shared by the two gRPC servers (server.c: a
 * replica's; coord_server.c: the coordinator's) and their clients: deadlines as the core
 * and pthreads want them, protobuf-c messages to and from byte buffers, metadata lookup.
 *
 * Why its own module: both servers (and the coordinator's calls to replicas) need the same
 * plumbing; one copy keeps the clock choices (gRPC: monotonic; condition variables: the
 * clock they were made with) and the buffer ownership rules in one place.
 */
#ifndef TSR_GRPCUTIL_H
#define TSR_GRPCUTIL_H

#include <grpc/grpc.h>
#include <grpc/support/time.h>
#include <protobuf-c/protobuf-c.h>

#include <stddef.h>
#include <stdint.h>
#include <time.h>

/* ms from now on gRPC's monotonic clock (deadlines of calls and completion-queue waits). */
gpr_timespec tsr_grpc_in_ms(int64_t ms);

/* ms from now as an absolute time of `clock` (CLOCK_REALTIME for default condition
 * variables, CLOCK_MONOTONIC for ones made with pthread_condattr_setclock). */
struct timespec tsr_grpc_abstime_in_ms(clockid_t clock, int64_t ms);

/* A protobuf-c message packed into a new byte buffer for SEND_MESSAGE (the caller
 * destroys it; NULL on out of memory). */
grpc_byte_buffer *tsr_grpc_pack(const ProtobufCMessage *m);

/* n raw bytes copied into a new byte buffer (the caller destroys it). */
grpc_byte_buffer *tsr_grpc_bytes(const uint8_t *p, size_t n);

/* A received message as one slice (decompressed; empty on failure); the caller unrefs. */
grpc_slice tsr_grpc_read_all(grpc_byte_buffer *bb);

/* The value of metadata `key` (lowercase) in md: its bytes and *len, or NULL when absent.
 * Valid while md is. */
const char *tsr_grpc_md_get(const grpc_metadata_array *md, const char *key, size_t *len);

#endif
