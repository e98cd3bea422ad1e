//! Fetch: outbound HTTP, calls between functions and `wasi:config` for the
//! grants tests.
//!
//! - `/fetch` with `x-fetch-url: URL`: sends the request there (method from
//!   `x-fetch-method`, default GET; the request body and every `x-` header
//!   but `x-fetch-*` passed on) and answers with the upstream's status, its
//!   `x-` headers and `content-type`, and its body. `x-fetch-follow: 1`
//!   follows one redirect (`Location`) as a client library would. On an
//!   error: 502 and `error: <wasi:http error code>`.
//! - `/flood?n=N` with `x-fetch-url`: opens N requests at once, answers
//!   `ok=<n> errors=<codes>`.
//! - `/config/KEY`: the value of KEY from `wasi:config/store` (404 when absent).
//! - `/chain`: answers its `NAME` (environment), after the answer of
//!   `http://NEXT.fn.verge.internal/chain` when `NEXT` is set: `a>b>c`
//!   (`NEXT_URL` instead, when set).

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingRequest, IncomingResponse, Method, OutgoingBody, OutgoingRequest,
    ResponseOutparam, Scheme,
};

wit_bindgen::generate!({
    path: "../../../wit",
    world: "wasi:config/imports@0.2.0-rc.1",
    generate_all,
});

struct Fetch;

fn header(request: &IncomingRequest, name: &str) -> Option<String> {
    request
        .headers()
        .get(name)
        .first()
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn env(name: &str) -> Option<String> {
    wasip2::cli::environment::get_environment()
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

fn method_of(name: &str) -> Method {
    match name.to_ascii_uppercase().as_str() {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "HEAD" => Method::Head,
        other => Method::Other(other.to_string()),
    }
}

/// Starts a request to `url`; the future of its response.
fn start(
    url: &str,
    method: Method,
    headers: &[(String, Vec<u8>)],
    body: &[u8],
) -> Result<outgoing_handler::FutureIncomingResponse, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("not a URL: {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut headers = headers.to_vec();
    if !body.is_empty() {
        headers.push(("content-length".into(), body.len().to_string().into_bytes()));
    }
    let fields = Fields::from_list(&headers).map_err(|e| format!("headers: {e:?}"))?;
    let request = OutgoingRequest::new(fields);
    request.set_method(&method).map_err(|_| "method")?;
    let scheme = match scheme {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => Scheme::Other(other.to_string()),
    };
    request.set_scheme(Some(&scheme)).map_err(|_| "scheme")?;
    request
        .set_authority(Some(authority))
        .map_err(|_| "authority")?;
    request
        .set_path_with_query(Some(path))
        .map_err(|_| "path")?;
    let outgoing = request.body().map_err(|_| "body")?;
    // Sent first, then the body streams: a body larger than the pipe's
    // buffer would block a writer that has not sent the request yet.
    let future =
        outgoing_handler::handle(request, None).map_err(|e| format!("error: {}", code(&e)))?;
    {
        let stream = outgoing.write().map_err(|_| "stream")?;
        for chunk in body.chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(|e| format!("{e:?}"))?;
        }
    }
    OutgoingBody::finish(outgoing, None).map_err(|e| format!("{e:?}"))?;
    Ok(future)
}

fn code(e: &ErrorCode) -> String {
    format!("{e:?}")
}

fn wait(
    future: outgoing_handler::FutureIncomingResponse,
) -> Result<IncomingResponse, String> {
    future.subscribe().block();
    future
        .get()
        .ok_or("no response")?
        .map_err(|_| "response taken")?
        .map_err(|e| format!("error: {}", code(&e)))
}

fn read_all(response: &IncomingResponse) -> Result<Vec<u8>, String> {
    let body = response.consume().map_err(|_| "body taken")?;
    let mut out = Vec::new();
    {
        let stream = body.stream().map_err(|_| "stream taken")?;
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => out.extend_from_slice(&chunk),
                Err(wasip2::io::streams::StreamError::Closed) => break,
                Err(wasip2::io::streams::StreamError::LastOperationFailed(e)) => {
                    return Err(format!("error: reading the body: {}", e.to_debug_string()));
                }
            }
        }
    }
    drop(body);
    Ok(out)
}

fn fetch(request: &IncomingRequest) -> (u16, Vec<(String, Vec<u8>)>, Vec<u8>) {
    let Some(mut url) = header(request, "x-fetch-url") else {
        return (400, common::text(), b"give x-fetch-url\n".to_vec());
    };
    let method = method_of(&header(request, "x-fetch-method").unwrap_or_else(|| "GET".into()));
    let follow = header(request, "x-fetch-follow").as_deref() == Some("1");
    let headers: Vec<(String, Vec<u8>)> = request
        .headers()
        .entries()
        .into_iter()
        .filter(|(k, _)| k.starts_with("x-") && !k.starts_with("x-fetch-"))
        .collect();
    let body = common::read_body(request);
    let mut hops = 0;
    loop {
        let result = start(&url, method.clone(), &headers, &body).and_then(wait);
        let response = match result {
            Ok(r) => r,
            Err(e) => return (502, common::text(), format!("{e}\n").into_bytes()),
        };
        let status = response.status();
        let got: Vec<(String, Vec<u8>)> = response
            .headers()
            .entries()
            .into_iter()
            .filter(|(k, _)| k.starts_with("x-") || k == "content-type" || k == "location")
            .collect();
        if follow && (300..400).contains(&status) && hops == 0 {
            if let Some((_, loc)) = got.iter().find(|(k, _)| k == "location") {
                url = String::from_utf8_lossy(loc).into_owned();
                hops += 1;
                continue;
            }
        }
        return match read_all(&response) {
            Ok(b) => (status, got, b),
            Err(e) => (502, common::text(), format!("{e}\n").into_bytes()),
        };
    }
}

fn flood(request: &IncomingRequest, n: usize) -> String {
    let Some(url) = header(request, "x-fetch-url") else {
        return "give x-fetch-url\n".into();
    };
    let mut futures = Vec::new();
    let mut errors = Vec::new();
    for _ in 0..n {
        match start(&url, Method::Get, &[], &[]) {
            Ok(f) => futures.push(f),
            Err(e) => errors.push(e),
        }
    }
    let mut ok = 0;
    for f in futures {
        match wait(f) {
            Ok(_) => ok += 1,
            Err(e) => errors.push(e),
        }
    }
    errors.sort();
    errors.dedup();
    format!("ok={ok} errors={}\n", errors.join(","))
}

fn chain() -> (u16, String) {
    let name = env("NAME").unwrap_or_else(|| "?".into());
    let Some(next) = env("NEXT") else {
        return (200, name);
    };
    // NEXT_URL: the same call through an HTTP route (the benchmark's
    // comparison).
    let url = env("NEXT_URL").unwrap_or_else(|| format!("http://{next}.fn.verge.internal/chain"));
    match start(&url, Method::Get, &[], &[]).and_then(wait) {
        Ok(r) => {
            let status = r.status();
            let body = read_all(&r).unwrap_or_default();
            let text = String::from_utf8_lossy(&body).into_owned();
            if status == 200 {
                (200, format!("{name}>{text}"))
            } else {
                (status, format!("{name}>[{status}] {text}"))
            }
        }
        Err(e) => (502, format!("{name}>{e}")),
    }
}

impl Guest for Fetch {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let (route, query) = path.split_once('?').unwrap_or((&path, ""));
        // Served under a route prefix (`/NAME/fetch`): the last segment
        // names the action; `/config/KEY` anywhere in the path reads KEY.
        let config_key = route.find("/config/").map(|i| &route[i + "/config/".len()..]);
        let action = route.rsplit('/').next().unwrap_or("");
        if let Some(key) = config_key {
            match wasi::config::store::get(key) {
                Ok(Some(v)) => common::respond(out, 200, &common::text(), v.as_bytes()),
                Ok(None) => common::respond(out, 404, &common::text(), b"absent\n"),
                Err(e) => common::respond(
                    out,
                    500,
                    &common::text(),
                    format!("config error: {e:?}\n").as_bytes(),
                ),
            }
            return;
        }
        match action {
            "fetch" => {
                let (status, headers, body) = fetch(&request);
                common::respond(out, status, &headers, &body);
            }
            "flood" => {
                let n = query
                    .strip_prefix("n=")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(1);
                common::respond(out, 200, &common::text(), flood(&request, n).as_bytes());
            }
            "chain" => {
                let (status, body) = chain();
                common::respond(out, status, &common::text(), body.as_bytes());
            }
            _ => common::respond(out, 404, &common::text(), b"try /fetch, /flood, /chain or /config/KEY\n"),
        }
    }
}

wasip2::http::proxy::export!(Fetch);
