//! Hostile guests are stopped and reported; their neighbours keep serving.

use std::thread;

use crate::kit::TestNode;

#[test]
fn loops_time_out_and_neighbours_keep_answering() {
    let node = TestNode::start_with(&["--timeout", "2s", "--memory", "64MiB"]);
    node.deploy("rust-hostile", "hostile", "/h");
    node.deploy("c-hello", "hello", "/hello");

    // Two guests spinning without yielding...
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let (http, url) = (node.http(), format!("{}/h/loop", node.url));
            thread::spawn(move || http.get(url).send().unwrap())
        })
        .collect();
    // ...while the neighbour answers correctly.
    for _ in 0..20 {
        let r = node
            .http()
            .get(format!("{}/hello", node.url))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().unwrap(), "Hello from C!\n");
    }
    for s in spinners {
        let r = s.join().unwrap();
        assert_eq!(r.status(), 504);
        let id = r.headers()["verge-invocation-id"]
            .to_str()
            .unwrap()
            .to_string();
        let p: serde_json::Value = r.json().unwrap();
        assert!(p["detail"].as_str().unwrap().contains("time limit"), "{p}");
        assert_eq!(p["invocation_id"], id.as_str());
    }
    // The spinners went on in the slow lane (lower-priority threads) once
    // they had used their CPU budget, and were still stopped at the limit;
    // the neighbour's short requests never left the fast one.
    let health: serde_json::Value = node
        .http()
        .get(format!("{}/v1/health", node.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(health["demoted"], 2, "{health}");

    // Unbounded recursion traps; the process survives.
    let r = node
        .http()
        .get(format!("{}/h/recurse", node.url))
        .send()
        .unwrap();
    assert_eq!(r.status(), 500);
    // An allocation beyond the memory limit fails inside the guest.
    let r = node
        .http()
        .get(format!("{}/h/alloc?mib=256", node.url))
        .send()
        .unwrap();
    assert_eq!(r.status(), 500);
    let r = node
        .http()
        .get(format!("{}/h/alloc?mib=8", node.url))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // A guest waiting (on a clock here, as on I/O) uses no CPU, so no epoch
    // check stops it: the deadline's timer does, and the next request works.
    let r = node
        .http()
        .get(format!("{}/h/wait?ms=600000", node.url))
        .send()
        .unwrap();
    assert_eq!(r.status(), 504);
    let p: serde_json::Value = r.json().unwrap();
    assert!(p["detail"].as_str().unwrap().contains("time limit"), "{p}");
    let r = node
        .http()
        .get(format!("{}/h/wait?ms=50", node.url))
        .send()
        .unwrap();
    assert_eq!(r.text().unwrap(), "waited 50 ms\n");
    // A trap, and then business as usual.
    let r = node
        .http()
        .get(format!("{}/h/trap", node.url))
        .send()
        .unwrap();
    assert_eq!(r.status(), 500);
    let r = node
        .http()
        .get(format!("{}/h/ok", node.url))
        .send()
        .unwrap();
    assert_eq!(r.text().unwrap(), "ok\n");
    let r = node
        .http()
        .get(format!("{}/h/burn?ms=20", node.url))
        .send()
        .unwrap();
    assert!(r.text().unwrap().starts_with("burned 20 ms"));
    let r = node
        .http()
        .get(format!("{}/h/print?mib=2", node.url))
        .send()
        .unwrap();
    assert_eq!(r.text().unwrap(), "printed 2 MiB\n");
    node.wait_for_output("hostile", "[output truncated]");
}

fn health(node: &TestNode, field: &str) -> u64 {
    let h: serde_json::Value = node
        .http()
        .get(format!("{}/v1/health", node.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    h[field].as_u64().unwrap()
}

fn queued(node: &TestNode) -> u64 {
    health(node, "queued")
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    crate::kit::eventually(what, || f().then_some(()))
}

#[test]
fn the_concurrency_cap_queues_first_then_answers_503() {
    let node = TestNode::start_with(&["--queue-depth", "1", "--max-wait", "20s"]);
    let file = crate::kit::fixture("rust-hostile");
    node.cli_ok(&[
        "deploy",
        file.to_str().unwrap(),
        "--name",
        "one",
        "--route",
        "/one",
        "--concurrency",
        "1",
    ]);
    let get = |path: &'static str| {
        let (http, url) = (node.http(), format!("{}{path}", node.url));
        thread::spawn(move || http.get(url).send().unwrap())
    };
    // A holds the only slot; B waits in the queue; C finds the queue full.
    let a = get("/one/burn?ms=3000");
    wait_until("A runs", || health(&node, "running") == 1);
    let b = get("/one/ok");
    wait_until("B is queued", || queued(&node) == 1);
    let c = node
        .http()
        .get(format!("{}/one/ok", node.url))
        .send()
        .unwrap();
    assert_eq!(c.status(), 503);
    assert_eq!(c.headers()["retry-after"], "1");
    let p: serde_json::Value = c.json().unwrap();
    // A public route says to retry, not how the node is sized (issue 14).
    assert!(p["detail"].as_str().unwrap().contains("at capacity"), "{p}");
    assert_eq!(a.join().unwrap().status(), 200);
    let b = b.join().unwrap();
    assert_eq!(
        b.status(),
        200,
        "the queued request ran once the slot was free"
    );
    assert_eq!(b.text().unwrap(), "ok\n");
    assert_eq!(queued(&node), 0);
    // The refusal is in the ledger too.
    wait_until("the 503 is recorded", || {
        let r: serde_json::Value = node
            .api_get("/v1/invocations?function=one&status=503")
            .json()
            .unwrap();
        r.as_array().unwrap().len() == 1 && r[0]["outcome"] == "capacity"
    });
}

#[test]
fn a_request_waits_at_most_the_maximum_wait() {
    let node = TestNode::start_with(&["--max-wait", "300ms"]);
    let file = crate::kit::fixture("rust-hostile");
    node.cli_ok(&[
        "deploy",
        file.to_str().unwrap(),
        "--name",
        "one",
        "--route",
        "/one",
        "--concurrency",
        "1",
    ]);
    let (http, url) = (node.http(), format!("{}/one/burn?ms=3000", node.url));
    let a = thread::spawn(move || http.get(url).send().unwrap());
    wait_until("A holds the slot", || health(&node, "running") == 1);
    let r = node
        .http()
        .get(format!("{}/one/ok", node.url))
        .send()
        .unwrap();
    assert_eq!(r.status(), 503, "waited 300 ms, then refused");
    assert!(r.text().unwrap().contains("at capacity"));
    assert_eq!(a.join().unwrap().status(), 200);
    let r = node
        .http()
        .get(format!("{}/one/ok", node.url))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "the slot is free again");
}

#[test]
fn body_and_log_limits_hold() {
    let node = TestNode::start_with(&[
        "--max-request-body",
        "8KiB",
        "--max-response-body",
        "4KiB",
        "--log-limit",
        "1KiB",
    ]);
    node.deploy("rust-echo", "echo", "/e");
    node.deploy("rust-sandbox", "s", "/s");
    // Declared too large: refused before the function runs.
    let r = node
        .http()
        .post(format!("{}/e", node.url))
        .body(vec![1u8; 9000])
        .send()
        .unwrap();
    assert_eq!(r.status(), 413);
    let refused_id = r.headers()["verge-invocation-id"]
        .to_str()
        .unwrap()
        .to_string();
    // A public route's error names the limit, not the control plane's flags.
    let text = r.text().unwrap();
    assert!(text.contains("larger than the limit of"), "{text}");
    assert!(!text.contains("--max-request-body"), "{text}");
    // Within both limits: whole.
    let r = node
        .http()
        .post(format!("{}/e", node.url))
        .body(vec![2u8; 3000])
        .send()
        .unwrap();
    assert_eq!(r.bytes().unwrap().len(), 3000);
    // A response past its limit is cut short: the client never gets more than
    // the limit (the connection closes, before or after the head was sent).
    let cut = node
        .http()
        .post(format!("{}/e", node.url))
        .body(vec![3u8; 6000])
        .send();
    if let Ok(r) = cut
        && let Ok(b) = r.bytes()
    {
        assert!(b.len() <= 4096, "got {} bytes", b.len());
    }
    // The node keeps serving.
    let r = node
        .http()
        .post(format!("{}/e", node.url))
        .body(vec![4u8; 100])
        .send()
        .unwrap();
    assert_eq!(r.bytes().unwrap().len(), 100);
    // Captured output is kept up to the log limit, and marked.
    let printed = node
        .http()
        .get(format!("{}/s/print?n=8192", node.url))
        .send()
        .unwrap();
    let id = printed.headers()["verge-invocation-id"]
        .to_str()
        .unwrap()
        .to_string();
    let logs = crate::kit::eventually(&format!("a log record for {id}"), || {
        let logs: serde_json::Value = node
            .api_get(&format!("/v1/logs?invocation={id}"))
            .json()
            .unwrap();
        logs.as_array()
            .is_some_and(|a| !a.is_empty())
            .then_some(logs)
    });
    let out = logs[0]["stdout"].as_str().unwrap();
    assert!(
        out.ends_with("[output truncated]"),
        "{}",
        &out[out.len().saturating_sub(40)..]
    );
    assert!(out.len() <= 1024 + 32, "{}", out.len());
    // The refused request is in the ledger with its outcome.
    let r = crate::kit::eventually("a record of the 413", || {
        let rec: serde_json::Value = node
            .api_get(&format!("/v1/invocations?id={refused_id}"))
            .json()
            .unwrap();
        rec.as_array().and_then(|a| a.first()).cloned()
    });
    assert_eq!(r["outcome"], "request_too_large");
    assert_eq!(r["status"], 413);
}

#[test]
fn body_and_log_limits_per_version() {
    let node = TestNode::start_with(&["--max-request-body", "64KiB"]);
    let echo = crate::kit::fixture("rust-echo");
    let sandbox = crate::kit::fixture("rust-sandbox");
    node.cli_ok(&[
        "deploy",
        echo.to_str().unwrap(),
        "--name",
        "tiny",
        "--route",
        "/tiny",
        "--max-request-body",
        "1KiB",
    ]);
    node.cli_ok(&[
        "deploy",
        echo.to_str().unwrap(),
        "--name",
        "roomy",
        "--route",
        "/roomy",
    ]);
    node.cli_ok(&[
        "deploy",
        sandbox.to_str().unwrap(),
        "--name",
        "quiet",
        "--route",
        "/quiet",
        "--log-limit",
        "512",
    ]);
    let post = |path: &str, n: usize| {
        node.http()
            .post(format!("{}{path}", node.url))
            .body(vec![7u8; n])
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(post("/tiny", 2000), 413, "the version's own limit");
    assert_eq!(post("/roomy", 2000), 200, "the node's limit for the other");
    assert_eq!(post("/roomy", 70_000), 413, "the node's limit");
    let show: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["show", "tiny", "--json"])).unwrap();
    assert_eq!(show["versions"][0]["request_body"], 1024);
    let err = node.cli_err(&[
        "deploy",
        echo.to_str().unwrap(),
        "--name",
        "big",
        "--max-request-body",
        "1MiB",
    ]);
    assert!(
        err.contains("ceiling") && err.contains("--max-request-body"),
        "{err}"
    );

    let r = node
        .http()
        .get(format!("{}/quiet/print?n=4096", node.url))
        .send()
        .unwrap();
    let id = r.headers()["verge-invocation-id"]
        .to_str()
        .unwrap()
        .to_string();
    let out = crate::kit::eventually(&format!("a log record for {id}"), || {
        let logs: serde_json::Value = node
            .api_get(&format!("/v1/logs?invocation={id}"))
            .json()
            .unwrap();
        logs[0]["stdout"].as_str().map(str::to_string)
    });
    assert!(
        out.len() <= 512 + 32 && out.ends_with("[output truncated]"),
        "{}",
        out.len()
    );
    // And the limits come back after a restart.
    let node = node.kill9_and_restart();
    let r = node
        .http()
        .post(format!("{}/tiny", node.url))
        .body(vec![7u8; 2000])
        .send()
        .unwrap();
    assert_eq!(r.status(), 413);
}
