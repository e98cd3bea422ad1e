// Helpers shared by the C guest fixtures (wit-bindgen C bindings of
// wasi:http/proxy@0.2.12): read a request body, send a response.
#ifndef VERGE_GUEST_COMMON_H
#define VERGE_GUEST_COMMON_H

#include <stdlib.h>
#include <string.h>
#include "proxy.h"

typedef struct {
    const char *name;
    const uint8_t *value;
    size_t value_len;
} header_t;

// Reads the whole body of `request` into a malloc'd buffer; sets *len.
static uint8_t *read_body(wasi_http_types_borrow_incoming_request_t request, size_t *len) {
    size_t cap = 65536, used = 0;
    uint8_t *buf = malloc(cap);
    wasi_http_types_own_incoming_body_t body;
    if (!wasi_http_types_method_incoming_request_consume(request, &body)) {
        *len = 0;
        return buf;
    }
    wasi_http_types_own_input_stream_t stream;
    if (wasi_http_types_method_incoming_body_stream(wasi_http_types_borrow_incoming_body(body), &stream)) {
        for (;;) {
            proxy_list_u8_t chunk;
            wasi_io_streams_stream_error_t err;
            if (!wasi_io_streams_method_input_stream_blocking_read(
                    wasi_io_streams_borrow_input_stream(stream), 65536, &chunk, &err)) {
                break;  // closed (or failed): the body is complete
            }
            if (used + chunk.len > cap) {
                while (used + chunk.len > cap) cap *= 2;
                buf = realloc(buf, cap);
            }
            memcpy(buf + used, chunk.ptr, chunk.len);
            used += chunk.len;
            proxy_list_u8_free(&chunk);
        }
        wasi_io_streams_input_stream_drop_own(stream);
    }
    wasi_http_types_incoming_body_drop_own(body);
    *len = used;
    return buf;
}

// Sends a response with `status`, `n` headers and `body`.
static void respond(wasi_http_types_own_response_outparam_t out, uint16_t status,
                    const header_t *headers, size_t n, const uint8_t *body, size_t len) {
    wasi_http_types_tuple2_field_name_field_value_t *entries = calloc(n ? n : 1, sizeof(*entries));
    for (size_t i = 0; i < n; i++) {
        entries[i].f0.ptr = (uint8_t *)headers[i].name;
        entries[i].f0.len = strlen(headers[i].name);
        entries[i].f1.ptr = (uint8_t *)headers[i].value;
        entries[i].f1.len = headers[i].value_len;
    }
    wasi_http_types_list_tuple2_field_name_field_value_t list = {entries, n};
    wasi_http_types_own_fields_t fields;
    wasi_http_types_header_error_t herr;
    if (!wasi_http_types_static_fields_from_list(&list, &fields, &herr)) abort();
    free(entries);

    wasi_http_types_own_outgoing_response_t response = wasi_http_types_constructor_outgoing_response(fields);
    wasi_http_types_method_outgoing_response_set_status_code(
        wasi_http_types_borrow_outgoing_response(response), status);
    wasi_http_types_own_outgoing_body_t outgoing;
    if (!wasi_http_types_method_outgoing_response_body(
            wasi_http_types_borrow_outgoing_response(response), &outgoing)) abort();

    wasi_http_types_result_own_outgoing_response_error_code_t result = {.is_err = false};
    result.val.ok = response;
    wasi_http_types_static_response_outparam_set(out, &result);

    wasi_http_types_own_output_stream_t stream;
    if (!wasi_http_types_method_outgoing_body_write(wasi_http_types_borrow_outgoing_body(outgoing), &stream)) abort();
    for (size_t at = 0; at < len; at += 4096) {
        size_t n_bytes = len - at < 4096 ? len - at : 4096;
        proxy_list_u8_t chunk = {(uint8_t *)body + at, n_bytes};
        wasi_io_streams_stream_error_t err;
        if (!wasi_io_streams_method_output_stream_blocking_write_and_flush(
                wasi_io_streams_borrow_output_stream(stream), &chunk, &err)) abort();
    }
    wasi_io_streams_output_stream_drop_own(stream);
    wasi_http_types_error_code_t ferr;
    wasi_http_types_static_outgoing_body_finish(outgoing, NULL, &ferr);
}

#endif
