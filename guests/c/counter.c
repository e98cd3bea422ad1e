// Counter: answers how many requests its instance has served, this one
// included: always 1 on a fresh instance per request, 1, 2, 3... on an
// instance reused (`verge deploy --reuse N`).
#include <stdio.h>

#include "common.h"

static unsigned long served;

void exports_wasi_http_incoming_handler_handle(
    exports_wasi_http_incoming_handler_own_incoming_request_t request,
    exports_wasi_http_incoming_handler_own_response_outparam_t response_out) {
    static const char ct[] = "text/plain; charset=utf-8";
    char msg[32];
    int len = snprintf(msg, sizeof msg, "%lu\n", ++served);
    header_t headers[] = {{"content-type", (const uint8_t *)ct, sizeof(ct) - 1}};
    wasi_http_types_incoming_request_drop_own(request);
    respond(response_out, 200, headers, 1, (const uint8_t *)msg, (size_t)len);
}
