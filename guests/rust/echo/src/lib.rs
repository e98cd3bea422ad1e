//! Echo: the request body back byte for byte; the method and path in
//! `x-echo-method` / `x-echo-path`; every `x-` request header copied back.

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{IncomingRequest, Method, ResponseOutparam};

struct Echo;

fn method_name(m: &Method) -> String {
    match m {
        Method::Get => "GET".into(),
        Method::Head => "HEAD".into(),
        Method::Post => "POST".into(),
        Method::Put => "PUT".into(),
        Method::Delete => "DELETE".into(),
        Method::Connect => "CONNECT".into(),
        Method::Options => "OPTIONS".into(),
        Method::Trace => "TRACE".into(),
        Method::Patch => "PATCH".into(),
        Method::Other(s) => s.clone(),
    }
}

impl Guest for Echo {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let mut headers = vec![
            (
                "content-type".to_string(),
                b"application/octet-stream".to_vec(),
            ),
            (
                "x-echo-method".to_string(),
                method_name(&request.method()).into_bytes(),
            ),
            (
                "x-echo-path".to_string(),
                request.path_with_query().unwrap_or_default().into_bytes(),
            ),
            ("x-echo-language".to_string(), b"rust".to_vec()),
        ];
        for (name, value) in request.headers().entries() {
            if name.starts_with("x-") {
                headers.push((name, value));
            }
        }
        let body = common::read_body(&request);
        common::respond(out, 200, &headers, &body);
    }
}

wasip2::http::proxy::export!(Echo);
