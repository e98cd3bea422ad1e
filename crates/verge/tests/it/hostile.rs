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
    node.wait_for_log("[output truncated]");
}
