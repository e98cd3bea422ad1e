//! Sandbox probe: reports what ambient authority the guest has. By the last
//! path segment: `/env` lists its environment, `/fs` tries the filesystem, `/fetch` tries
//! outbound HTTP, `/print?n=N` writes N bytes to stdout.

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{Fields, IncomingRequest, OutgoingRequest, ResponseOutparam, Scheme};

struct Sandbox;

fn fetch() -> String {
    let request = OutgoingRequest::new(Fields::new());
    let _ = request.set_scheme(Some(&Scheme::Http));
    let _ = request.set_authority(Some("127.0.0.1:9"));
    let _ = request.set_path_with_query(Some("/"));
    match outgoing_handler::handle(request, None) {
        Err(e) => format!("fetch refused: {e:?}"),
        Ok(future) => {
            future.subscribe().block();
            match future.get() {
                Some(Ok(Ok(resp))) => format!("fetch succeeded: {}", resp.status()),
                Some(Ok(Err(e))) => format!("fetch refused: {e:?}"),
                other => format!("fetch failed: {other:?}"),
            }
        }
    }
}

impl Guest for Sandbox {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let full = request.path_with_query().unwrap_or_default();
        // The last path segment picks the probe, wherever the function is routed.
        let path = format!("/{}", full.rsplit('/').next().unwrap_or_default());
        let body = if path.starts_with("/env") {
            std::env::vars()
                .map(|(k, v)| format!("{k}={v}\n"))
                .collect::<String>()
        } else if path.starts_with("/fs") {
            let dir = match std::fs::read_dir("/") {
                Ok(_) => "read_dir(/) allowed".to_string(),
                Err(e) => format!("read_dir(/) denied: {e}"),
            };
            let file = match std::fs::read("/etc/passwd") {
                Ok(_) => "read(/etc/passwd) allowed".to_string(),
                Err(e) => format!("read(/etc/passwd) denied: {e}"),
            };
            format!("{dir}\n{file}\n")
        } else if path.starts_with("/fetch") {
            fetch()
        } else if let Some(n) = path.strip_prefix("/print?n=") {
            let n: usize = n.parse().unwrap_or(0);
            let line = "x".repeat(1023) + "\n";
            let mut written = 0;
            while written < n {
                print!("{line}");
                written += line.len();
            }
            format!("printed {written} bytes\n")
        } else {
            "try /env, /fs, /fetch or /print?n=N\n".to_string()
        };
        common::respond(out, 200, &common::text(), body.as_bytes());
    }
}

wasip2::http::proxy::export!(Sandbox);
