//! Counter: answers how many requests its instance has served, this one
//! included: always 1 on a fresh instance per request, 1, 2, 3... on an
//! instance reused (`verge deploy --reuse N`).

use std::sync::atomic::{AtomicU64, Ordering};

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

static SERVED: AtomicU64 = AtomicU64::new(0);

struct Counter;

impl Guest for Counter {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        let n = SERVED.fetch_add(1, Ordering::Relaxed) + 1;
        common::respond(out, 200, &common::text(), format!("{n}\n").as_bytes());
    }
}

wasip2::http::proxy::export!(Counter);
