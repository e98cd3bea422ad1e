// Hello: answers every request with a greeting (clang + wasi-libc + wit-bindgen).
#include "common.h"

void exports_wasi_http_incoming_handler_handle(
    exports_wasi_http_incoming_handler_own_incoming_request_t request,
    exports_wasi_http_incoming_handler_own_response_outparam_t response_out) {
    static const char ct[] = "text/plain; charset=utf-8";
    static const char msg[] = "Hello from C!\n";
    header_t headers[] = {{"content-type", (const uint8_t *)ct, sizeof(ct) - 1}};
    wasi_http_types_incoming_request_drop_own(request);
    respond(response_out, 200, headers, 1, (const uint8_t *)msg, sizeof(msg) - 1);
}
