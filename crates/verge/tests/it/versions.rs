//! Versions, aliases, weighted traffic, rollback, retention (issue 4).
//!
//! Two versions of one function are told apart by their bodies: version 1
//! is the Rust hello, version 2 the C hello.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::kit::{TestNode, fixture};

const RUST: &str = "Hello from Rust!\n";

fn body_of(node: &TestNode, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut rb = node.http().get(format!("{}{path}", node.url));
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

/// A copy of a fixture with a custom section appended: the same code, other
/// bytes (so another sha256 and another version).
fn variant(fixture_name: &str, n: u32, dir: &std::path::Path) -> PathBuf {
    let mut bytes = std::fs::read(fixture(fixture_name)).unwrap();
    let name = b"verge-test";
    let payload: Vec<u8> = [&[name.len() as u8][..], name, n.to_string().as_bytes()].concat();
    bytes.push(0);
    bytes.push(payload.len() as u8);
    bytes.extend_from_slice(&payload);
    let path = dir.join(format!("{fixture_name}-{n}.wasm"));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Version 1 (Rust hello) live on /w, version 2 (C hello) deployed without promotion.
fn two_versions(node: &TestNode) -> String {
    node.deploy("rust-hello", "w", "/w");
    let c = fixture("c-hello");
    let out = node.cli_ok(&["deploy", c.to_str().unwrap(), "--name", "w", "--no-promote"]);
    assert!(out.contains("not live"), "{out}");
    let (status, body) = body_of(node, "/w", &[]);
    assert_eq!(
        (status, body.as_str()),
        (200, RUST),
        "live stays on version 1"
    );
    let (_, c_body) = body_of(node, "/w", &[("verge-version", "2")]);
    assert_ne!(c_body, RUST);
    c_body
}

#[test]
fn pinned_versions_and_a_weighted_split() {
    let node = TestNode::start();
    let c_body = two_versions(&node);
    // Called directly before promotion: by header, by the API, by the CLI.
    assert_eq!(node.cli_ok(&["invoke", "w", "--version", "2"]), c_body);
    assert_eq!(node.cli_ok(&["invoke", "w"]), RUST);
    let (status, body) = body_of(&node, "/w", &[("verge-version", "9")]);
    assert_eq!(status, 404);
    // A public route names no control-plane command (issue 14).
    assert!(body.contains("version 9"), "{body}");
    assert!(!body.contains("verge versions"), "{body}");
    let (status, _) = body_of(&node, "/w", &[("verge-version", "two")]);
    assert_eq!(status, 400);

    let out = node.cli_ok(&["canary", "w", "2", "--weight", "10"]);
    assert!(out.contains("1 (90%) + 2 (10%)"), "{out}");
    // 10,000 requests from 8 threads; the canary's share within 2 points of 10%.
    let canary = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        for _ in 0..8 {
            let (canary, other, node, c_body) = (&canary, &other, &node, &c_body);
            s.spawn(move || {
                let http = node.http();
                for _ in 0..1250 {
                    let r = http.get(format!("{}/w", node.url)).send().unwrap();
                    assert_eq!(r.status(), 200);
                    let body = r.text().unwrap();
                    if &body == c_body {
                        canary.fetch_add(1, Ordering::Relaxed);
                    } else {
                        assert_eq!(body, RUST);
                        other.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let (canary, other) = (
        canary.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed),
    );
    assert_eq!(canary + other, 10_000);
    assert!(
        (800..=1200).contains(&canary),
        "canary got {canary} of 10000"
    );

    // Bad canaries are refused with what to do.
    let err = node.cli_err(&["canary", "w", "2", "--weight", "100"]);
    assert!(err.contains("1 to 99"), "{err}");
    let err = node.cli_err(&["canary", "w", "7", "--weight", "5"]);
    assert!(err.contains("no version 7"), "{err}");
}

#[test]
fn sticky_canary_keeps_each_key_on_one_version() {
    let node = TestNode::start();
    let c_body = two_versions(&node);
    node.cli_ok(&[
        "canary",
        "w",
        "2",
        "--weight",
        "30",
        "--sticky-header",
        "x-user",
    ]);
    let mut per_version: HashMap<bool, u32> = HashMap::new();
    for user in 0..100 {
        let key = format!("user-{user}");
        let (_, first) = body_of(&node, "/w", &[("x-user", &key)]);
        for _ in 0..5 {
            let (status, again) = body_of(&node, "/w", &[("x-user", &key)]);
            assert_eq!(status, 200);
            assert_eq!(again, first, "{key} moved between versions");
        }
        *per_version.entry(first == c_body).or_default() += 1;
    }
    // Both versions get keys (30% of 100 keys: far from 0 and from 100).
    assert!(
        per_version.get(&true).copied().unwrap_or(0) >= 10,
        "{per_version:?}"
    );
    assert!(
        per_version.get(&false).copied().unwrap_or(0) >= 40,
        "{per_version:?}"
    );
    // A cookie works the same way.
    node.cli_ok(&[
        "canary",
        "w",
        "2",
        "--weight",
        "50",
        "--sticky-cookie",
        "session",
    ]);
    for s in 0..20 {
        let cookie = format!("theme=dark; session=s{s}");
        let (_, first) = body_of(&node, "/w", &[("cookie", &cookie)]);
        for _ in 0..3 {
            assert_eq!(body_of(&node, "/w", &[("cookie", &cookie)]).1, first);
        }
    }
}

#[test]
fn alias_flips_under_load_fail_no_request() {
    let node = TestNode::start();
    let c_body = two_versions(&node);
    let stop = AtomicBool::new(false);
    let (ok, failed, saw_c) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        for _ in 0..4 {
            let (node, stop, ok, failed, saw_c, c_body) =
                (&node, &stop, &ok, &failed, &saw_c, &c_body);
            s.spawn(move || {
                let http = node.http();
                while !stop.load(Ordering::Relaxed) {
                    match http.get(format!("{}/w", node.url)).send() {
                        Ok(r) if r.status().is_success() => {
                            if &r.text().unwrap_or_default() == c_body {
                                saw_c.fetch_add(1, Ordering::Relaxed);
                            }
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        // Flip live between the versions every 50 ms, 60 times, through the API.
        let http = node.http();
        for i in 0..60u64 {
            let version = 1 + i % 2;
            let r = http
                .put(format!("{}/v1/functions/w/aliases/live", node.url))
                .bearer_auth(node.token())
                .json(&serde_json::json!({ "version": version }))
                .send()
                .unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().unwrap_or_default());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert!(ok > 100, "only {ok} requests ran");
    assert!(
        saw_c.load(Ordering::Relaxed) > 0,
        "version 2 never answered"
    );
}

#[test]
fn rollback_restores_the_previous_target() {
    let node = TestNode::start();
    let c_body = two_versions(&node);
    node.cli_ok(&["promote", "w", "2"]);
    assert_eq!(body_of(&node, "/w", &[]).1, c_body);
    let out = node.cli_ok(&["rollback", "w"]);
    assert!(out.contains("rolled back to 1"), "{out}");
    assert_eq!(body_of(&node, "/w", &[]).1, RUST);
    let err = node.cli_err(&["rollback", "w"]);
    assert!(err.contains("no earlier target"), "{err}");
    // Other aliases roll back on their own; routes may use them.
    node.cli_ok(&["alias", "set", "w", "beta", "1"]);
    node.cli_ok(&["alias", "set", "w", "beta", "2"]);
    node.cli_ok(&[
        "routes",
        "add",
        "/beta",
        "--function",
        "w",
        "--alias",
        "beta",
    ]);
    assert_eq!(body_of(&node, "/beta", &[]).1, c_body);
    node.cli_ok(&["rollback", "w", "--alias", "beta"]);
    assert_eq!(body_of(&node, "/beta", &[]).1, RUST);
    assert_eq!(body_of(&node, "/w", &[]).1, RUST);
    let err = node.cli_err(&["alias", "rm", "w", "beta"]);
    assert!(err.contains("routes rm"), "{err}");
    let out = node.cli_ok(&["alias", "ls", "w"]);
    assert!(out.contains("beta") && out.contains("live"), "{out}");
}

#[test]
fn redeploying_the_same_bytes_reuses_the_version() {
    let node = TestNode::start();
    let first = node.deploy("c-hello", "same", "/same");
    let again = node.deploy("c-hello", "same", "/same");
    assert_eq!(first["version"], 1);
    assert_eq!(again["version"], 1);
    assert_eq!(again["reused"], true);
    assert_eq!(
        again["code"], "cached",
        "known bytes are not compiled again"
    );
    // Another configuration of the same bytes is another version.
    let f = fixture("c-hello");
    let out = node.cli_ok(&[
        "deploy",
        f.to_str().unwrap(),
        "--name",
        "same",
        "--env",
        "A=1",
        "--json",
    ]);
    let third: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(third["version"], 2);
    let steps: Vec<&str> = third["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["validate", "compile", "store", "promote"]);
    let human = node.cli_ok(&["deploy", f.to_str().unwrap(), "--name", "same"]);
    for step in ["upload", "validate", "compile", "store", "promote"] {
        assert!(human.contains(step), "{human}");
    }
}

fn cached_files(node: &TestNode, sha: &str) -> usize {
    std::fs::read_dir(node.data_dir.join("cache"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(sha)
        })
        .count()
}

#[test]
fn retention_keeps_aliased_versions_and_collects_the_rest() {
    let node = TestNode::start_with(&["--keep-versions", "2"]);
    let tmp = tempfile::tempdir().unwrap();
    let mut shas = Vec::new();
    // Version 1 on /r, pinned by an alias; then five more versions.
    for n in 1..=6 {
        let file = variant("rust-hello", n, tmp.path());
        let out = node.cli_ok(&[
            "deploy",
            file.to_str().unwrap(),
            "--name",
            "r",
            "--route",
            "/r",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        shas.push(v["sha256"].as_str().unwrap().to_string());
        if n == 1 {
            node.cli_ok(&["alias", "set", "r", "pinned", "1"]);
        }
    }
    let versions: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["versions", "r", "--json"])).unwrap();
    let kept: Vec<u64> = versions
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    // The newest two, and the one `pinned` points at; 2 to 4 are gone.
    assert_eq!(kept, vec![6, 5, 1]);
    for (i, sha) in shas.iter().enumerate() {
        let gone = (1..=3).contains(&i);
        let artifact = node.data_dir.join("artifacts").join(format!("{sha}.wasm"));
        assert_eq!(artifact.exists(), !gone, "artifact of version {}", i + 1);
        if gone {
            assert_eq!(
                cached_files(&node, sha),
                0,
                "compiled code of version {}",
                i + 1
            );
        } else {
            assert!(
                cached_files(&node, sha) >= 1,
                "compiled code of version {}",
                i + 1
            );
        }
    }
    let (status, _) = body_of(&node, "/r", &[("verge-version", "2")]);
    assert_eq!(status, 404);
    assert_eq!(body_of(&node, "/r", &[("verge-version", "1")]).1, RUST);
}

#[test]
fn versions_aliases_and_weights_survive_a_restart() {
    let node = TestNode::start();
    let c_body = two_versions(&node);
    node.cli_ok(&[
        "canary",
        "w",
        "2",
        "--weight",
        "50",
        "--sticky-header",
        "x-user",
    ]);
    node.cli_ok(&["alias", "set", "w", "stable", "1"]);
    let before: Vec<String> = (0..20)
        .map(|u| body_of(&node, "/w", &[("x-user", &format!("u{u}"))]).1)
        .collect();
    let node = node.kill9_and_restart();
    let aliases: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["alias", "ls", "w", "--json"])).unwrap();
    let live = aliases
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "live")
        .unwrap();
    assert_eq!(live["version"], 1);
    assert_eq!(live["canary"]["version"], 2);
    assert_eq!(live["canary"]["weight"], 50);
    let after: Vec<String> = (0..20)
        .map(|u| body_of(&node, "/w", &[("x-user", &format!("u{u}"))]).1)
        .collect();
    assert_eq!(
        before, after,
        "sticky keys keep their versions across a restart"
    );
    assert!(after.contains(&c_body) && after.iter().any(|b| b == RUST));
    assert_eq!(node.cli_ok(&["invoke", "w", "--alias", "stable"]), RUST);
    assert_eq!(body_of(&node, "/w", &[("verge-version", "2")]).1, c_body);
}

#[test]
fn a_large_component_serves_on_baseline_code_then_optimized() {
    let node = TestNode::start();
    let r = node.deploy("python-hello", "py", "/py");
    assert_eq!(r["tier"], "baseline", "{r}");
    let (status, body) = body_of(&node, "/py", &[]);
    assert_eq!(status, 200);
    assert!(body.contains("Python"), "{body}");
    // Optimized code replaces it in the background; requests keep working.
    let code = |node: &TestNode| -> String {
        let v: serde_json::Value =
            serde_json::from_str(&node.cli_ok(&["versions", "py", "--json"])).unwrap();
        v[0]["code"].as_str().unwrap_or("").to_string()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while code(&node) != "optimized" {
        assert_eq!(body_of(&node, "/py", &[]), (200, body.clone()));
        assert!(
            std::time::Instant::now() < deadline,
            "never optimized:\n{}",
            node.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(body_of(&node, "/py", &[]), (200, body.clone()));
    node.wait_for_log("optimized code swapped in");
    // After a restart the optimized code comes from the cache.
    let node = node.kill9_and_restart();
    assert_eq!(body_of(&node, "/py", &[]), (200, body));
    assert_eq!(code(&node), "optimized");
    let health: serde_json::Value = node.api_get("/v1/health").json().unwrap();
    assert_eq!(health["compiled"], 0, "{health}");
}

/// Cached code of shared libraries (`lib-<sha256>-<engine>.cwasm`).
fn library_files(node: &TestNode) -> usize {
    cached_files(node, "lib-")
}

#[test]
fn python_functions_share_the_runtime_libraries() {
    // Baseline code only: no background compiles in the way.
    let node = TestNode::start_with(&["--code", "baseline"]);
    node.deploy("python-hello", "py1", "/py1");
    let health: serde_json::Value = node.api_get("/v1/health").json().unwrap();
    let compiled = health["libraries_compiled"].as_u64().unwrap();
    assert!(compiled >= 1, "CPython's modules are libraries: {health}");
    assert_eq!(health["libraries_reused"], 0, "{health}");
    assert_eq!(library_files(&node), compiled as usize);
    // Another Python function carries the same runtime: nothing to compile again.
    node.deploy("python-echo", "py2", "/py2");
    let health: serde_json::Value = node.api_get("/v1/health").json().unwrap();
    assert_eq!(health["libraries_compiled"], compiled, "{health}");
    assert_eq!(health["libraries_reused"], compiled, "{health}");
    let (status, hello) = body_of(&node, "/py1", &[]);
    assert_eq!(status, 200);
    assert!(hello.contains("Python"), "{hello}");
    let echo = node
        .http()
        .post(format!("{}/py2/x", node.url))
        .body("shared")
        .send()
        .unwrap();
    assert_eq!(echo.status(), 200);
    assert!(echo.text().unwrap().contains("shared"));

    // After a restart both load from the cache, libraries included.
    let node = node.kill9_and_restart();
    assert_eq!(body_of(&node, "/py1", &[]), (200, hello));
    let health: serde_json::Value = node.api_get("/v1/health").json().unwrap();
    assert_eq!(health["compiled"], 0, "{health}");
    assert_eq!(health["libraries_compiled"], 0, "{health}");

    // The libraries stay while one function uses them, and go with the last.
    node.cli_ok(&["rm", "py1"]);
    assert_eq!(library_files(&node), compiled as usize);
    assert_eq!(body_of(&node, "/py2/", &[]).0, 200);
    node.cli_ok(&["rm", "py2"]);
    assert_eq!(library_files(&node), 0);
}

#[test]
fn javascript_functions_share_the_engine_and_keep_their_own_snapshots() {
    // Baseline code only: the code a deploy serves on first.
    let node = TestNode::start_with(&["--code", "baseline"]);
    node.deploy("js-hello", "js1", "/js1");
    let health: serde_json::Value = node.api_get("/v1/health").json().unwrap();
    let compiled = health["libraries_compiled"].as_u64().unwrap();
    assert_eq!(compiled, 1, "the engine's code is a library: {health}");
    assert_eq!(library_files(&node), 1);
    // Another application built with the same componentize-js: its engine
    // is compiled already, only its snapshot is its own.
    node.deploy("js-counter", "js2", "/js2");
    node.deploy("js-echo", "js3", "/js3");
    let health: serde_json::Value = node.api_get("/v1/health").json().unwrap();
    assert_eq!(health["libraries_compiled"], 1, "{health}");
    assert_eq!(health["libraries_reused"], 2, "{health}");
    assert_eq!(library_files(&node), 1);
    // Each runs its own script on its own snapshot.
    assert_eq!(
        body_of(&node, "/js1", &[]),
        (200, "Hello from JavaScript!\n".to_string())
    );
    assert_eq!(body_of(&node, "/js2", &[]), (200, "1\n".to_string()));
    let echo = node
        .http()
        .post(format!("{}/js3/x", node.url))
        .body("snapshot")
        .send()
        .unwrap();
    assert_eq!(echo.status(), 200);
    assert_eq!(echo.text().unwrap(), "snapshot");
    // After a restart, from the cache, engine included.
    let node = node.kill9_and_restart();
    assert_eq!(body_of(&node, "/js2", &[]), (200, "1\n".to_string()));
    let health: serde_json::Value = node.api_get("/v1/health").json().unwrap();
    assert_eq!(health["compiled"], 0, "{health}");
    assert_eq!(health["libraries_compiled"], 0, "{health}");
}
