//! Hello: answers every request with a greeting.

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct Hello;

impl Guest for Hello {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        common::respond(out, 200, &common::text(), b"Hello from Rust!\n");
    }
}

wasip2::http::proxy::export!(Hello);
