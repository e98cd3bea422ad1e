//! KV: a page-view counter and a small JSON document store on
//! `wasi:keyvalue@0.2.0-draft` (buckets `views` and `docs`).
//!
//! - `GET /count/<page>`: increments the page's counter, answers `views <n>`
//! - `PUT /docs/<id>` (body): stores the document; `GET /docs/<id>` reads it;
//!   `DELETE /docs/<id>` deletes it; `GET /docs` lists the ids
//! - `GET /open/<bucket>`: opens any bucket (to test the grants)
//! - `GET /bench/<n>`: times `n` each of set, get and increment from inside
//!   the guest (wasi:clocks), answers p50/p99 per operation in microseconds

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{IncomingRequest, Method, ResponseOutparam};

wit_bindgen::generate!({
    path: "../../../wit",
    world: "wasi:keyvalue/imports@0.2.0-draft",
    generate_all,
});

use wasi::keyvalue::{atomics, store};

struct Kv;

fn err(e: store::Error) -> String {
    match e {
        store::Error::NoSuchStore => "no such store".into(),
        store::Error::AccessDenied => "access denied".into(),
        store::Error::Other(s) => s,
    }
}

fn handle(method: &Method, path: &str, body: Vec<u8>) -> Result<(u16, Vec<u8>), (u16, String)> {
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(2, '/').collect();
    match (method, parts.as_slice()) {
        (Method::Get, ["count", page]) => {
            let b = store::open("views").map_err(|e| (500, err(e)))?;
            let n = atomics::increment(&b, page, 1).map_err(|e| (500, err(e)))?;
            Ok((200, format!("views {n}\n").into_bytes()))
        }
        (Method::Put, ["docs", id]) => {
            let b = store::open("docs").map_err(|e| (500, err(e)))?;
            b.set(id, &body).map_err(|e| (500, err(e)))?;
            Ok((201, b"stored\n".to_vec()))
        }
        (Method::Get, ["docs", id]) => {
            let b = store::open("docs").map_err(|e| (500, err(e)))?;
            match b.get(id).map_err(|e| (500, err(e)))? {
                Some(v) => Ok((200, v)),
                None => Err((404, format!("no document {id}"))),
            }
        }
        (Method::Delete, ["docs", id]) => {
            let b = store::open("docs").map_err(|e| (500, err(e)))?;
            b.delete(id).map_err(|e| (500, err(e)))?;
            Ok((204, Vec::new()))
        }
        (Method::Get, ["docs"]) => {
            let b = store::open("docs").map_err(|e| (500, err(e)))?;
            let mut ids = Vec::new();
            let mut cursor = None;
            loop {
                let page = b.list_keys(cursor).map_err(|e| (500, err(e)))?;
                ids.extend(page.keys);
                match page.cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            Ok((200, format!("{}\n", ids.join("\n")).into_bytes()))
        }
        (Method::Get, ["bench", n]) => {
            let n: usize = n
                .parse()
                .map_err(|_| (400, format!("{n:?} is not a count")))?;
            let docs = store::open("docs").map_err(|e| (500, err(e)))?;
            let views = store::open("views").map_err(|e| (500, err(e)))?;
            let mut out = String::new();
            for op in ["set", "get", "increment"] {
                let mut us = Vec::with_capacity(n);
                for i in 0..n {
                    let key = format!("bench-{}", i % 100);
                    let t = std::time::Instant::now();
                    match op {
                        "set" => docs.set(&key, b"{\"v\":1}").map_err(|e| (500, err(e)))?,
                        "get" => drop(docs.get(&key).map_err(|e| (500, err(e)))?),
                        _ => drop(atomics::increment(&views, &key, 1).map_err(|e| (500, err(e)))?),
                    }
                    us.push(t.elapsed().as_secs_f64() * 1e6);
                }
                us.sort_by(f64::total_cmp);
                let at = |q: f64| {
                    us.get(((us.len() as f64 * q) as usize).min(us.len().saturating_sub(1)))
                        .copied()
                        .unwrap_or(0.0)
                };
                out.push_str(&format!(
                    "{op} p50 {:.1} us p99 {:.1} us\n",
                    at(0.5),
                    at(0.99)
                ));
            }
            Ok((200, out.into_bytes()))
        }
        (Method::Get, ["open", bucket]) => match store::open(bucket) {
            Ok(_) => Ok((200, b"opened\n".to_vec())),
            Err(e) => Err((403, err(e))),
        },
        _ => Err((404, format!("no route {path}"))),
    }
}

impl Guest for Kv {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let method = request.method();
        let path = request.path_with_query().unwrap_or_default();
        let body = common::read_body(&request);
        match handle(&method, &path, body) {
            Ok((status, body)) => common::respond(out, status, &common::text(), &body),
            Err((status, message)) => common::respond(
                out,
                status,
                &common::text(),
                format!("{message}\n").as_bytes(),
            ),
        }
    }
}

wasip2::http::proxy::export!(Kv);
