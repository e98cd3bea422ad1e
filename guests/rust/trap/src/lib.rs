//! Trap: writes a line to stderr, then panics (a wasm trap), before sending a response.

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct Trap;

impl Guest for Trap {
    fn handle(_request: IncomingRequest, _out: ResponseOutparam) {
        eprintln!("trap fixture: about to fail on purpose");
        panic!("deliberate trap for testing");
    }
}

wasip2::http::proxy::export!(Trap);
