/*
 * rpc.c — blocking unary gRPC client calls on a per-call pluck queue (see rpc.h).
 *
 * One call = two batches, both started at once: {SEND_INITIAL_METADATA, SEND_MESSAGE,
 * SEND_CLOSE_FROM_CLIENT, RECV_INITIAL_METADATA, RECV_MESSAGE} and {RECV_STATUS_ON_CLIENT}.
 * We pluck both tags with the call's deadline (plus a margin: the core itself ends the call
 * at its deadline, so the margin is never waited for unless the core misbehaves).
 */
#include "coordinator/rpc.h"
#include "coordinator/grpcutil.h"
#include "kernels/util.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

grpc_channel *tsr_rpc_channel_tls(const char *target, const tsr_tls_client *tls)
{
    grpc_channel_credentials *cr = tsr_tls_grpc_channel_credentials(tls);
    if (!cr) return NULL;
    /* Fail fast and reconnect fast: a coordinator or replica that comes back is reached
     * within a second, not after gRPC's default backoff of up to 2 minutes. */
    grpc_arg args[3];
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)GRPC_ARG_MAX_RECONNECT_BACKOFF_MS;
    args[0].value.integer = 1000;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = (char *)GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS;
    args[1].value.integer = 100;
    /* gRPC core also takes this as the deadline of one connection attempt (the TCP connect
     * and the handshakes): 100 ms is plenty for a plaintext connect, but a TLS handshake
     * on a loaded machine (or under the sanitizers) can take longer, and a fail-fast call
     * would then fail with "handshaker shutdown" without the peer being down. */
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = (char *)GRPC_ARG_MIN_RECONNECT_BACKOFF_MS;
    args[2].value.integer = tsr_tls_client_enabled(tls) ? 5000 : 100;
    grpc_channel_args ca = {.num_args = 3, .args = args};
    grpc_channel *ch = grpc_channel_create(target, cr, &ca);
    grpc_channel_credentials_release(cr);
    return ch;
}

const char *tsr_rpc_code_name(int code)
{
    static const char *const names[] = {"OK",
                                        "CANCELLED",
                                        "UNKNOWN",
                                        "INVALID_ARGUMENT",
                                        "DEADLINE_EXCEEDED",
                                        "NOT_FOUND",
                                        "ALREADY_EXISTS",
                                        "PERMISSION_DENIED",
                                        "RESOURCE_EXHAUSTED",
                                        "FAILED_PRECONDITION",
                                        "ABORTED",
                                        "OUT_OF_RANGE",
                                        "UNIMPLEMENTED",
                                        "INTERNAL",
                                        "UNAVAILABLE",
                                        "DATA_LOSS",
                                        "UNAUTHENTICATED"};
    if (code >= 0 && code < (int)(sizeof names / sizeof names[0])) return names[code];
    return "UNKNOWN_CODE";
}

int tsr_rpc_unary_auth(grpc_channel *ch, const char *authorization, const char *method,
                       const ProtobufCMessage *req, int64_t timeout_ms, uint8_t **resp,
                       size_t *resp_len, char *details, size_t details_len)
{
    *resp = NULL;
    *resp_len = 0;
    if (details_len) details[0] = 0;
    size_t n = protobuf_c_message_get_packed_size(req);
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf) {
        tsr_set_err(details, details_len, "out of memory packing the request");
        return GRPC_STATUS_INTERNAL;
    }
    protobuf_c_message_pack(req, buf);
    grpc_slice s = grpc_slice_from_copied_buffer((const char *)buf, n);
    free(buf);
    grpc_byte_buffer *send_bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);

    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    gpr_timespec deadline = tsr_grpc_in_ms(timeout_ms);
    grpc_slice msl = grpc_slice_from_static_string(method);
    grpc_call *call =
        grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, msl, NULL, deadline, NULL);
    grpc_slice_unref(msl);

    grpc_metadata_array md_init, md_trail;
    grpc_metadata_array_init(&md_init);
    grpc_metadata_array_init(&md_trail);
    grpc_byte_buffer *recv_bb = NULL;
    grpc_status_code code = GRPC_STATUS_UNKNOWN;
    grpc_slice st_details = grpc_empty_slice();
    const char *error_string = NULL;
    grpc_op ops[5];
    memset(ops, 0, sizeof ops);
    grpc_metadata auth_md;
    memset(&auth_md, 0, sizeof auth_md);
    if (authorization) {
        auth_md.key = grpc_slice_from_static_string("authorization");
        auth_md.value = grpc_slice_from_copied_string(authorization);
    }
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = authorization ? 1 : 0;
    ops[0].data.send_initial_metadata.metadata = authorization ? &auth_md : NULL;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send_bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &md_init;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recv_bb;
    grpc_op st;
    memset(&st, 0, sizeof st);
    st.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    st.data.recv_status_on_client.trailing_metadata = &md_trail;
    st.data.recv_status_on_client.status = &code;
    st.data.recv_status_on_client.status_details = &st_details;
    st.data.recv_status_on_client.error_string = &error_string;
    bool ok1 = grpc_call_start_batch(call, ops, 5, (void *)1, NULL) == GRPC_CALL_OK;
    bool ok2 = grpc_call_start_batch(call, &st, 1, (void *)2, NULL) == GRPC_CALL_OK;
    /* The core ends the call at its deadline; the margin only bounds a misbehaving core. */
    gpr_timespec until = gpr_time_add(deadline, gpr_time_from_millis(2000, GPR_TIMESPAN));
    bool lost = false, done1 = !ok1, done2 = !ok2;
    if (!done1)
        done1 = grpc_completion_queue_pluck(cq, (void *)1, until, NULL).type == GRPC_OP_COMPLETE;
    if (!done2)
        done2 = grpc_completion_queue_pluck(cq, (void *)2, until, NULL).type == GRPC_OP_COMPLETE;
    if (!done1 || !done2) {
        /* Never seen: the core did not end the call at its deadline. Cancel it and give its
         * batches a bounded time to come back before the call is released. */
        lost = true;
        grpc_call_cancel(call, NULL);
        gpr_timespec bound =
            gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(5000, GPR_TIMESPAN));
        if (!done1) grpc_completion_queue_pluck(cq, (void *)1, bound, NULL);
        if (!done2) grpc_completion_queue_pluck(cq, (void *)2, bound, NULL);
    }
    grpc_byte_buffer_destroy(send_bb);
    if (authorization) grpc_slice_unref(auth_md.value);
    int rc;
    if (!ok1 || !ok2) {
        tsr_set_err(details, details_len, "cannot start the call to %s", method);
        rc = GRPC_STATUS_INTERNAL;
    } else if (lost) {
        tsr_set_err(details, details_len, "%s: no answer past the deadline", method);
        rc = GRPC_STATUS_DEADLINE_EXCEEDED;
    } else {
        rc = (int)code;
        if (code == GRPC_STATUS_OK && recv_bb) {
            {
                grpc_slice all = tsr_grpc_read_all(recv_bb);
                size_t len = GRPC_SLICE_LENGTH(all);
                *resp = malloc(len ? len : 1);
                if (*resp) {
                    memcpy(*resp, GRPC_SLICE_START_PTR(all), len);
                    *resp_len = len;
                } else {
                    rc = GRPC_STATUS_INTERNAL;
                    tsr_set_err(details, details_len, "out of memory for the reply");
                }
                grpc_slice_unref(all);
            }
        } else if (code == GRPC_STATUS_OK) {
            rc = GRPC_STATUS_INTERNAL;
            tsr_set_err(details, details_len, "%s answered OK without a message", method);
        } else {
            char *d = grpc_slice_to_c_string(st_details);
            tsr_set_err(details, details_len, "%s", d && d[0] ? d : tsr_rpc_code_name(rc));
            gpr_free(d);
        }
    }
    if (recv_bb) grpc_byte_buffer_destroy(recv_bb);
    grpc_slice_unref(st_details);
    gpr_free((void *)error_string);
    grpc_metadata_array_destroy(&md_init);
    grpc_metadata_array_destroy(&md_trail);
    grpc_call_unref(call);
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(cq);
    return rc;
}
