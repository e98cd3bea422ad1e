//! Bad uploads get a clear 4xx problem, store nothing, and the node keeps serving.

use crate::kit::{TestNode, fixture};

fn upload(node: &TestNode, name: &str, query: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    let resp = node
        .http()
        .post(format!("{}/v1/functions/{name}/versions{query}", node.url))
        .bearer_auth(node.token())
        .body(body)
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    assert_eq!(
        resp.headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap()),
        Some("application/problem+json"),
        "status {status}"
    );
    (status, resp.json().unwrap())
}

fn detail(v: &serde_json::Value) -> String {
    v["detail"].as_str().unwrap_or_default().to_string()
}

#[test]
fn bad_uploads_are_refused_with_what_to_do() {
    let node = TestNode::start_with(&["--max-upload", "1MiB"]);
    node.deploy("rust-hello", "hello", "/hello");
    let hello = std::fs::read(fixture("rust-hello")).unwrap();

    let (s, p) = upload(&node, "bad", "", b"this is not wasm".to_vec());
    assert_eq!(s, 400);
    assert!(detail(&p).contains("not a WebAssembly binary"), "{p}");

    let (s, p) = upload(&node, "bad", "", Vec::new());
    assert_eq!(s, 400);
    assert!(detail(&p).contains("empty"), "{p}");

    let (s, p) = upload(&node, "bad", "", wat::parse_str("(module)").unwrap());
    assert_eq!(s, 400);
    assert!(detail(&p).contains("core WebAssembly module"), "{p}");
    assert!(detail(&p).contains("wasm-tools component new"), "{p}");

    let (s, p) = upload(&node, "bad", "", wat::parse_str("(component)").unwrap());
    assert_eq!(s, 400);
    assert!(detail(&p).contains("wasi:http/incoming-handler"), "{p}");

    let imports_unknown =
        wat::parse_str(r#"(component (import "acme:billing/charge@1.0.0" (instance)))"#).unwrap();
    let (s, p) = upload(&node, "bad", "", imports_unknown);
    assert_eq!(s, 400);
    assert!(detail(&p).contains("acme:billing/charge@1.0.0"), "{p}");

    let mut truncated = hello.clone();
    truncated.truncate(hello.len() / 2);
    let (s, p) = upload(&node, "bad", "", truncated);
    assert_eq!(s, 400);
    assert!(detail(&p).contains("not valid"), "{p}");

    // Over the limit, with a Content-Length: refused before the body is read.
    // (curl, because it reads a response that comes before the whole upload.)
    let dir = tempfile::tempdir().unwrap();
    let over = dir.path().join("over.bin");
    std::fs::write(&over, vec![0u8; (1 << 20) + 1]).unwrap();
    let (status, _, body) = crate::kit::curl(&[
        "-X",
        "POST",
        "-H",
        &format!("authorization: Bearer {}", node.token()),
        "--data-binary",
        &format!("@{}", over.display()),
        &format!("{}/v1/functions/bad/versions", node.url),
    ]);
    assert_eq!(status, 413);
    assert!(String::from_utf8_lossy(&body).contains("--max-upload"));

    // Without a Content-Length (chunked), the limit holds too.
    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![0u8; 3 << 20]).unwrap();
    let (status, _, body) = crate::kit::curl(&[
        "-X",
        "POST",
        "-H",
        "transfer-encoding: chunked",
        "-H",
        &format!("authorization: Bearer {}", node.token()),
        "--data-binary",
        &format!("@{}", big.display()),
        &format!("{}/v1/functions/bad/versions", node.url),
    ]);
    assert_eq!(status, 413);
    assert!(String::from_utf8_lossy(&body).contains("upload limit"));

    for name in ["Bad", "a_b", &"x".repeat(64)] {
        let (s, p) = upload(&node, name, "", hello.clone());
        assert_eq!(s, 400, "{name}");
        assert!(
            detail(&p).contains("[a-z0-9-]") || detail(&p).contains("a-z, 0-9"),
            "{p}"
        );
    }

    let (s, p) = upload(&node, "thief", "?route=/hello", hello.clone());
    assert_eq!(s, 409);
    assert!(detail(&p).contains("\"hello\""), "names the owner: {p}");

    let (s, p) = upload(&node, "bad", "?route=/v1/x", hello.clone());
    assert_eq!(s, 400);
    assert!(detail(&p).contains("control API"), "{p}");

    let (s, p) = upload(&node, "bad", "?env=NOEQUALS", hello.clone());
    assert_eq!(s, 400);
    assert!(detail(&p).contains("KEY=VALUE"), "{p}");

    // The CLI shows the node's message.
    let err = node.cli_err(&["deploy", "/etc/hostname", "--name", "bad"]);
    assert!(err.contains("not a WebAssembly binary"), "{err}");
    let err = node.cli_err(&["deploy", "/nonexistent.wasm", "--name", "bad"]);
    assert!(err.contains("could not read /nonexistent.wasm"), "{err}");

    // Nothing was stored, and the node keeps serving.
    let names: Vec<String> = node
        .api_get("/v1/functions")
        .json::<Vec<serde_json::Value>>()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["hello"]);
    let artifacts = std::fs::read_dir(node.data_dir.join("artifacts"))
        .unwrap()
        .count();
    assert_eq!(artifacts, 1, "only the good component is stored");
    let resp = node
        .http()
        .get(format!("{}/hello", node.url))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[test]
fn malformed_json_bodies_get_problem_bodies() {
    let node = TestNode::start();
    let http = node.http();
    for (method, path, body) in [
        (reqwest::Method::PUT, "/v1/routes", "{bad"),
        (reqwest::Method::POST, "/v1/tokens", r#"{"name": 5}"#),
        (reqwest::Method::POST, "/v1/triggers", "[]"),
        (reqwest::Method::POST, "/v1/replication/pull", "{}"),
    ] {
        let r = http
            .request(method.clone(), format!("{}{path}", node.url))
            .bearer_auth(node.token())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 400, "{method} {path}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{method} {path}"
        );
        let p: serde_json::Value = r.json().unwrap();
        let detail = p["detail"].as_str().unwrap();
        assert!(detail.contains("openapi.json"), "{method} {path}: {detail}");
    }
    // The node keeps serving.
    let h = http.get(format!("{}/v1/health", node.url)).send().unwrap();
    assert_eq!(h.status(), 200);
}

#[test]
fn key_value_values_up_to_the_limit_are_taken_and_larger_ones_refused() {
    let node = TestNode::start();
    let http = node.http();
    let put = |size: usize| {
        http.put(format!("{}/v1/kv/blobs/b{size}", node.url))
            .bearer_auth(node.token())
            .body(vec![b'x'; size])
            .send()
            .unwrap()
    };
    assert_eq!(put(3 << 20).status(), 204, "3 MiB fits");
    let r = put((8 << 20) + 1);
    assert_eq!(r.status(), 413);
    let p: serde_json::Value = r.json().unwrap();
    assert!(p["detail"].as_str().unwrap().contains("8 MiB limit"), "{p}");
    let r = http
        .get(format!("{}/v1/kv/blobs/b{}", node.url, 3 << 20))
        .bearer_auth(node.token())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Issue 14: `verge logs -f | head` and the like end quietly when the
/// reader goes away, without a panic on the write.
#[test]
fn the_cli_exits_quietly_when_its_output_pipe_closes() {
    use std::os::unix::process::ExitStatusExt;
    let node = TestNode::start();
    node.deploy("c-hello", "hello", "/hello");
    for args in [&["ls"][..], &["routes"][..], &["show", "hello"][..]] {
        let mut child = std::process::Command::new(crate::kit::VERGE)
            .args(args)
            .env("VERGE_SERVER", &node.url)
            .env("VERGE_TOKEN", node.token())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The reader is gone before the CLI writes (it asks the node first).
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.is_empty(),
            "verge {args:?} wrote to stderr: {stderr}"
        );
        assert!(
            out.status.success() || out.status.signal() == Some(13),
            "verge {args:?} ended with {:?}",
            out.status
        );
    }
}
