//! Hostile guest: misbehaves on request, by the last path segment.
//! `/burn?ms=N` burns CPU for N ms of wall time, `/alloc?mib=N` allocates and
//! touches N MiB, `/loop` spins forever without yielding, `/recurse` recurses
//! forever, `/print?mib=N` prints N MiB to stdout, `/trap` traps,
//! `/wait?ms=N` blocks on a clock for N ms without using the CPU (a guest
//! waiting on I/O).
//! Anything else answers "ok" (the well-behaved neighbour case).

use std::hint::black_box;

use wasip2::clocks::monotonic_clock;
use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct Hostile;

fn param(query: &str, key: &str) -> u64 {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

#[inline(never)]
#[allow(unconditional_recursion)] // on purpose: the stack-overflow fixture
fn recurse(n: u64) -> u64 {
    let pad = black_box([n; 16]);
    recurse(n + 1) + pad[3]
}

impl Guest for Hostile {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let full = request.path_with_query().unwrap_or_default();
        let last = full.rsplit('/').next().unwrap_or_default().to_string();
        let (what, query) = last.split_once('?').unwrap_or((last.as_str(), ""));
        let body = match what {
            "burn" => {
                let ms = param(query, "ms");
                let until = monotonic_clock::now() + ms * 1_000_000;
                let mut x = 0u64;
                while monotonic_clock::now() < until {
                    for i in 0..10_000u64 {
                        x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
                    }
                }
                format!("burned {ms} ms ({x})\n")
            }
            "alloc" => {
                let mib = param(query, "mib") as usize;
                let mut v: Vec<u8> = Vec::new();
                v.resize(mib << 20, 1);
                black_box(&v);
                format!("allocated {mib} MiB\n")
            }
            "loop" => {
                let mut x = 0u64;
                loop {
                    x = black_box(x.wrapping_add(1));
                }
            }
            "recurse" => format!("{}\n", recurse(0)),
            "wait" => {
                let ms = param(query, "ms");
                monotonic_clock::subscribe_duration(ms * 1_000_000).block();
                format!("waited {ms} ms\n")
            }
            "print" => {
                let mib = param(query, "mib") as usize;
                let line = "y".repeat(1023) + "\n";
                for _ in 0..(mib << 10) {
                    print!("{line}");
                }
                format!("printed {mib} MiB\n")
            }
            "trap" => {
                eprintln!("hostile: trapping on request");
                std::process::abort()
            }
            _ => "ok\n".to_string(),
        };
        common::respond(out, 200, &common::text(), body.as_bytes());
    }
}

wasip2::http::proxy::export!(Hostile);
