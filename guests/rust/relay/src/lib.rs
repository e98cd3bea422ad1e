//! Relay: an event handler for the event tests.
//!
//! Prints `received <ce-id> <ce-type> hops=<ce-vergehops>` on stdout, then,
//! when `EMIT_TYPE` is set, emits an event of that type (id
//! `<incoming id>/<EMIT_TYPE>`, the incoming data passed on, and the extension
//! `nexttype` from `EMIT_NEXT` if set) to its events URL
//! (`VERGE_EVENTS_URL`), and answers with the status in `STATUS` (default 200),
//! after `SLEEP_MS` milliseconds if set. With `ASYNC_CALL=NAME` it also
//! queues an asynchronous invocation of function NAME (a call with
//! `Prefer: respond-async`); with `FAIL_ATTEMPT=N` the Nth attempt of its
//! job (header `verge-attempt`) answers 500.

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingRequest, ResponseOutparam, Scheme,
};

struct Relay;

fn header(request: &IncomingRequest, name: &str) -> String {
    request
        .headers()
        .get(name)
        .first()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

fn env(name: &str) -> Option<String> {
    wasip2::cli::environment::get_environment()
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// POSTs a binary-mode event to the events URL; returns the status.
fn emit(url: &str, id: &str, ty: &str, next: Option<&str>, body: &[u8]) -> Result<u16, String> {
    let mut list = vec![
        ("ce-specversion".to_string(), b"1.0".to_vec()),
        ("ce-id".to_string(), id.as_bytes().to_vec()),
        ("ce-source".to_string(), b"/relay".to_vec()),
        ("ce-type".to_string(), ty.as_bytes().to_vec()),
        ("content-type".to_string(), b"application/json".to_vec()),
    ];
    if let Some(n) = next {
        list.push(("ce-nexttype".to_string(), n.as_bytes().to_vec()));
    }
    post(url, list, body)
}

/// POSTs `body` with `list` to `url` (`http://AUTHORITY[/]`); returns the status.
fn post(url: &str, mut list: Vec<(String, Vec<u8>)>, body: &[u8]) -> Result<u16, String> {
    let authority = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    list.push(("content-length".to_string(), body.len().to_string().into_bytes()));
    let headers = Fields::from_list(&list).map_err(|e| format!("{e:?}"))?;
    let request = OutgoingRequest::new(headers);
    request.set_method(&Method::Post).map_err(|_| "method")?;
    request
        .set_scheme(Some(&Scheme::Http))
        .map_err(|_| "scheme")?;
    request
        .set_authority(Some(&authority))
        .map_err(|_| "authority")?;
    request.set_path_with_query(Some("/")).map_err(|_| "path")?;
    let outgoing = request.body().map_err(|_| "body")?;
    {
        let stream = outgoing.write().map_err(|_| "stream")?;
        stream
            .blocking_write_and_flush(body)
            .map_err(|e| format!("{e:?}"))?;
    }
    OutgoingBody::finish(outgoing, None).map_err(|e| format!("{e:?}"))?;
    let future = outgoing_handler::handle(request, None).map_err(|e| format!("{e:?}"))?;
    future.subscribe().block();
    let response = future
        .get()
        .ok_or("no response")?
        .map_err(|_| "response taken")?
        .map_err(|e| format!("{e:?}"))?;
    Ok(response.status())
}

impl Guest for Relay {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let id = header(&request, "ce-id");
        let ty = header(&request, "ce-type");
        let hops = header(&request, "ce-vergehops");
        println!("received {id} {ty} hops={hops}");
        if let Some(ms) = env("SLEEP_MS").and_then(|s| s.parse::<u64>().ok()) {
            wasip2::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000).block();
        }
        let body = common::read_body(&request);
        let data = if body.is_empty() {
            b"{}".to_vec()
        } else {
            body
        };
        let mut message = format!("relayed {id}\n");
        if let (Some(next), Some(url)) = (env("EMIT_TYPE"), env("VERGE_EVENTS_URL")) {
            let then = env("EMIT_NEXT");
            match emit(&url, &format!("{id}/{next}"), &next, then.as_deref(), &data) {
                Ok(status) => message.push_str(&format!("emitted {next}: {status}\n")),
                Err(e) => {
                    eprintln!("emit failed: {e}");
                    common::respond(
                        out,
                        500,
                        &common::text(),
                        format!("emit failed: {e}\n").as_bytes(),
                    );
                    return;
                }
            }
        }
        // ASYNC_CALL=NAME: queue an asynchronous invocation of function NAME
        // (a call with `Prefer: respond-async`).
        if let Some(callee) = env("ASYNC_CALL") {
            let url = format!("http://{callee}.fn.verge.internal");
            let headers = vec![("prefer".to_string(), b"respond-async".to_vec())];
            match post(&url, headers, &data) {
                Ok(status) => message.push_str(&format!("queued {callee}: {status}\n")),
                Err(e) => {
                    common::respond(out, 500, &common::text(), format!("async call failed: {e}\n").as_bytes());
                    return;
                }
            }
        }
        // FAIL_ATTEMPT=N: the Nth attempt of a job fails (500).
        if env("FAIL_ATTEMPT").is_some_and(|n| n == header(&request, "verge-attempt")) {
            common::respond(out, 500, &common::text(), b"failing this attempt\n");
            return;
        }
        let status = env("STATUS").and_then(|s| s.parse().ok()).unwrap_or(200);
        common::respond(out, status, &common::text(), message.as_bytes());
    }
}

wasip2::http::proxy::export!(Relay);
