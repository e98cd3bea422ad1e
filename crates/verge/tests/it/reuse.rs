//! Issue 19, item 2, with the real guest toolchains: which of them serve
//! more than one request per instance (`verge deploy --reuse N`). Each
//! counter guest answers how many requests its instance has served.

use crate::kit::{TestNode, curl, fixture};

fn counts(node: &TestNode, path: &str, times: usize) -> Vec<String> {
    (0..times)
        .map(|_| {
            let (status, _, body) = curl(&[&format!("{}{path}", node.url)]);
            let body = String::from_utf8_lossy(&body).trim().to_string();
            assert_eq!(status, 200, "{path}: {body}\n{}", node.log());
            body
        })
        .collect()
}

#[test]
fn every_guest_toolchain_serves_several_requests_in_one_instance() {
    // Baseline code only: no background compiles in the way.
    let node = TestNode::start_with(&["--code", "baseline"]);
    for lang in ["rust", "c", "python", "js"] {
        let file = fixture(&format!("{lang}-counter"));
        let route = format!("/{lang}");
        node.cli_ok(&[
            "deploy",
            file.to_str().unwrap(),
            "--name",
            lang,
            "--route",
            &route,
            "--reuse",
            "3",
        ]);
        // Three requests on one instance, then a fresh one: the state the
        // guest keeps survives between requests, in every toolchain.
        assert_eq!(counts(&node, &route, 4), ["1", "2", "3", "1"], "{lang}");
        let table = node.cli_ok(&["versions", lang]);
        assert!(
            table.contains("INSTANCES") && table.contains("reuse 3"),
            "{table}"
        );
    }
    // The default stays a fresh instance per request.
    node.deploy("rust-counter", "plain", "/plain");
    assert_eq!(counts(&node, "/plain", 3), ["1", "1", "1"]);
    let table = node.cli_ok(&["versions", "plain"]);
    assert!(table.contains("fresh"), "{table}");
    // Nothing fell back.
    assert!(!node.log().contains("falls back"), "{}", node.log());
}

#[test]
fn instances_serve_with_either_kind_of_memory() {
    // `resident` is the default; `shared` maps copy-on-write images.
    for kind in ["resident", "shared"] {
        let node = TestNode::start_with(&["--instance-memory", kind, "--code", "optimized"]);
        node.deploy("c-counter", "c", "/c");
        node.deploy("rust-echo", "echo", "/echo");
        // Every request on a fresh instance, memory as the snapshot left it.
        assert_eq!(counts(&node, "/c", 3), ["1", "1", "1"], "{kind}");
        let (status, _, body) = curl(&["-d", "resident or shared", &format!("{}/echo", node.url)]);
        assert_eq!(
            (status, body.as_slice()),
            (200, &b"resident or shared"[..]),
            "{kind}"
        );
    }
    let node = TestNode::start();
    let err = node.cli_err(&["up", "--instance-memory", "lots"]);
    assert!(err.contains("resident") && err.contains("shared"), "{err}");
}
