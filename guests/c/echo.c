// Echo: the request body back byte for byte; method and path in x-echo-method /
// x-echo-path; every x- request header copied back (clang + wasi-libc + wit-bindgen).
#include "common.h"

static const char *METHODS[] = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"};

void exports_wasi_http_incoming_handler_handle(
    exports_wasi_http_incoming_handler_own_incoming_request_t request,
    exports_wasi_http_incoming_handler_own_response_outparam_t response_out) {
    wasi_http_types_borrow_incoming_request_t req = wasi_http_types_borrow_incoming_request(request);

    wasi_http_types_method_t method;
    wasi_http_types_method_incoming_request_method(req, &method);
    const uint8_t *mptr;
    size_t mlen;
    if (method.tag == WASI_HTTP_TYPES_METHOD_OTHER) {
        mptr = method.val.other.ptr;
        mlen = method.val.other.len;
    } else {
        mptr = (const uint8_t *)METHODS[method.tag];
        mlen = strlen(METHODS[method.tag]);
    }
    proxy_string_t path = {0};
    wasi_http_types_method_incoming_request_path_with_query(req, &path);

    wasi_http_types_own_headers_t req_headers = wasi_http_types_method_incoming_request_headers(req);
    wasi_http_types_list_tuple2_field_name_field_value_t entries;
    wasi_http_types_method_fields_entries(wasi_http_types_borrow_fields(req_headers), &entries);

    static const char ct[] = "application/octet-stream";
    header_t *headers = calloc(entries.len + 4, sizeof(header_t));
    size_t n = 0;
    headers[n++] = (header_t){"content-type", (const uint8_t *)ct, sizeof(ct) - 1};
    headers[n++] = (header_t){"x-echo-method", mptr, mlen};
    headers[n++] = (header_t){"x-echo-path", path.ptr, path.len};
    headers[n++] = (header_t){"x-echo-language", (const uint8_t *)"c", 1};
    char **names = calloc(entries.len + 1, sizeof(char *));
    for (size_t i = 0; i < entries.len; i++) {
        wasi_http_types_tuple2_field_name_field_value_t *e = &entries.ptr[i];
        if (e->f0.len >= 2 && e->f0.ptr[0] == 'x' && e->f0.ptr[1] == '-') {
            names[i] = calloc(e->f0.len + 1, 1);
            memcpy(names[i], e->f0.ptr, e->f0.len);
            headers[n++] = (header_t){names[i], e->f1.ptr, e->f1.len};
        }
    }

    size_t len;
    uint8_t *body = read_body(req, &len);
    respond(response_out, 200, headers, n, body, len);

    free(body);
    for (size_t i = 0; i < entries.len; i++) free(names[i]);
    free(names);
    free(headers);
    wasi_http_types_list_tuple2_field_name_field_value_free(&entries);
    wasi_http_types_fields_drop_own(req_headers);
    proxy_string_free(&path);
    wasi_http_types_method_free(&method);
    wasi_http_types_incoming_request_drop_own(request);
}
