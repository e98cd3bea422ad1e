//! Helpers shared by the Rust guest fixtures: read a request body, send a response.

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

/// Reads the whole request body.
pub fn read_body(request: &IncomingRequest) -> Vec<u8> {
    let mut out = Vec::new();
    let Ok(body) = request.consume() else {
        return out;
    };
    {
        let Ok(stream) = body.stream() else {
            return out;
        };
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => out.extend_from_slice(&chunk),
                Err(_) => break,
            }
        }
    }
    drop(body);
    out
}

/// Sends a response with `status`, `headers` and `body`.
pub fn respond(out: ResponseOutparam, status: u16, headers: &[(String, Vec<u8>)], body: &[u8]) {
    let fields = Fields::from_list(headers).expect("valid headers");
    let response = OutgoingResponse::new(fields);
    response.set_status_code(status).expect("valid status");
    let outgoing = response.body().expect("response body");
    ResponseOutparam::set(out, Ok(response));
    {
        let stream = outgoing.write().expect("body stream");
        for chunk in body.chunks(4096) {
            stream.blocking_write_and_flush(chunk).expect("write body");
        }
    }
    OutgoingBody::finish(outgoing, None).expect("finish body");
}

/// A `text/plain` header list.
pub fn text() -> Vec<(String, Vec<u8>)> {
    vec![(
        "content-type".to_string(),
        b"text/plain; charset=utf-8".to_vec(),
    )]
}
