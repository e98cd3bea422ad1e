//! Functions from every toolchain are served, survive kill -9, and run sandboxed.

use crate::kit::{TestNode, curl, eventually, fixture, noise};

const LANGUAGES: [(&str, &str); 4] = [
    ("rust", "Hello from Rust!"),
    ("c", "Hello from C!"),
    ("python", "Hello from Python!"),
    ("js", "Hello from JavaScript!"),
];

fn check_hello(node: &TestNode, lang: &str, greeting: &str) {
    let resp = node
        .http()
        .get(format!("{}/{lang}/hello", node.url))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200, "{lang} hello");
    assert!(resp.headers().contains_key("verge-invocation-id"));
    let body = resp.text().unwrap();
    assert!(body.contains(greeting), "{lang} hello said {body:?}");
}

fn check_echo(node: &TestNode, lang: &str, seed: u64) {
    let body = noise((1 << 20) + 17, seed);
    let resp = node
        .http()
        .put(format!("{}/{lang}/echo/some/path?q=1&r=two", node.url))
        .header("x-test-one", "first value")
        .header("x-test-two", "second")
        .body(body.clone())
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200, "{lang} echo");
    let h = resp.headers().clone();
    assert_eq!(h["x-echo-method"], "PUT", "{lang}");
    assert_eq!(
        h["x-echo-path"],
        format!("/{lang}/echo/some/path?q=1&r=two").as_str(),
        "{lang}"
    );
    assert_eq!(h["x-test-one"], "first value", "{lang}");
    assert_eq!(h["x-test-two"], "second", "{lang}");
    let got = resp.bytes().unwrap();
    assert_eq!(got.len(), body.len(), "{lang} echo length");
    assert!(got[..] == body[..], "{lang} echo differs");
}

#[test]
fn every_toolchain_serves_and_survives_kill_9() {
    let node = TestNode::start();
    for (lang, _) in LANGUAGES {
        for kind in ["hello", "echo"] {
            let r = node.deploy(
                &format!("{lang}-{kind}"),
                &format!("{lang}-{kind}"),
                &format!("/{lang}/{kind}"),
            );
            assert_eq!(r["version"], 1);
            assert_eq!(r["code"], "compiled");
            assert_eq!(r["sha256"].as_str().unwrap().len(), 64);
        }
    }
    for (i, (lang, greeting)) in LANGUAGES.iter().enumerate() {
        check_hello(&node, lang, greeting);
        check_echo(&node, lang, i as u64 + 1);
    }
    // curl, a real client, with a body from a file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body.bin");
    let body = noise(1 << 20, 99);
    std::fs::write(&file, &body).unwrap();
    let (status, headers, got) = curl(&[
        "-X",
        "POST",
        "-H",
        "x-from: curl",
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("{}/c/echo/x", node.url),
    ]);
    assert_eq!(status, 200);
    assert!(headers.contains("x-echo-method: post"));
    assert!(headers.contains("x-from: curl"));
    assert!(got == body);

    let ls: serde_json::Value = serde_json::from_str(&node.cli_ok(&["ls", "--json"])).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 8);

    let node = node.kill9_and_restart();
    let health = || -> serde_json::Value {
        node.http()
            .get(format!("{}/v1/health", node.url))
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    let h = health();
    assert_eq!(h["functions"], 8, "{h}");
    assert_eq!(
        h["cache_hits"], 0,
        "functions load on their first request: {h}"
    );
    for (i, (lang, greeting)) in LANGUAGES.iter().enumerate() {
        check_hello(&node, lang, greeting);
        check_echo(&node, lang, i as u64 + 10);
    }
    let h = health();
    assert_eq!(h["compiled"], 0, "a restart must not recompile: {h}");
    assert_eq!(h["cache_hits"], 8, "{h}");
}

#[test]
fn redeploy_makes_a_new_live_version_and_rm_removes_everything() {
    let node = TestNode::start();
    node.deploy("rust-hello", "greeter", "/greet");
    let r = node.deploy("c-hello", "greeter", "/greet");
    assert_eq!(r["version"], 2);
    let body = node
        .http()
        .get(format!("{}/greet", node.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(body, "Hello from C!\n");
    let show = node.cli_ok(&["show", "greeter"]);
    assert!(show.contains("alias     live -> 2"), "{show}");
    let table = node.cli_ok(&["ls"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("greeter") && table.contains("/greet"),
        "{table}"
    );

    // Same bytes again: the version and the compiled code are reused.
    let r = node.deploy("c-hello", "greeter", "/greet");
    assert_eq!(r["code"], "cached");
    assert_eq!(
        (r["version"].as_u64(), r["reused"].as_bool()),
        (Some(2), Some(true))
    );

    node.cli_ok(&["rm", "greeter"]);
    let resp = node
        .http()
        .get(format!("{}/greet", node.url))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 404);
    let err = node.cli_err(&["show", "greeter"]);
    assert!(
        err.contains("not found") && err.contains("verge deploy"),
        "{err}"
    );
    assert_eq!(node.cli_ok(&["routes", "--json"]).trim(), "[]");
}

#[test]
fn routes_match_prefixes_and_hosts_and_never_shadow_the_api() {
    let node = TestNode::start();
    node.deploy("rust-hello", "root", "/");
    node.deploy("rust-echo", "echo", "/api");
    let out = node.cli_ok(&[
        "routes",
        "add",
        "/",
        "--function",
        "echo",
        "--host",
        "echo.example.com",
    ]);
    assert!(out.contains("echo.example.com/ -> echo"), "{out}");

    let get = |path: &str, host: Option<&str>| {
        let mut rb = node.http().get(format!("{}{path}", node.url));
        if let Some(h) = host {
            rb = rb.header("host", h);
        }
        let r = rb.send().unwrap();
        let lang = r
            .headers()
            .get("x-echo-language")
            .map(|v| v.to_str().unwrap().to_string());
        (r.status().as_u16(), lang)
    };
    assert_eq!(
        get("/anything", None),
        (200, None),
        "catch-all goes to root"
    );
    assert_eq!(
        get("/api/x", None),
        (200, Some("rust".into())),
        "longest prefix wins"
    );
    assert_eq!(
        get("/apix", None),
        (200, None),
        "prefixes match whole segments"
    );
    assert_eq!(
        get("/other", Some("echo.example.com")),
        (200, Some("rust".into())),
        "host route wins"
    );
    // A catch-all route never captures the control API.
    assert_eq!(get("/v1/health", None).0, 200);
    assert_eq!(get("/v1/nope", None).0, 401);
    let r = node.api_get("/v1/nope");
    assert_eq!(r.status(), 404);
    assert!(r.text().unwrap().contains("openapi.json"));

    let table = node.cli_ok(&["routes"]);
    assert!(
        table.contains("HOST") && table.contains("echo.example.com"),
        "{table}"
    );
    node.cli_ok(&["routes", "rm", "/", "--host", "echo.example.com"]);
    assert_eq!(get("/other", Some("echo.example.com")), (200, None));
    // Routes survive a restart.
    let node = node.kill9_and_restart();
    assert_eq!(
        node.http()
            .get(format!("{}/api/y", node.url))
            .send()
            .unwrap()
            .headers()["x-echo-language"],
        "rust"
    );
}

#[test]
fn invoke_sends_a_post_with_the_given_body() {
    let node = TestNode::start();
    node.deploy("rust-echo", "echo", "/echo");
    let out = node.cli_ok(&["invoke", "echo", "--data", "hello there"]);
    assert_eq!(out, "hello there");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.txt");
    std::fs::write(&file, "from a file").unwrap();
    let out = node.cli_ok(&["invoke", "echo", "--data", &format!("@{}", file.display())]);
    assert_eq!(out, "from a file");
    let out = node.cli_ok(&["invoke", "echo", "--data", "x", "--path", "/p/q", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], 200);
    assert_eq!(v["body"], "x");
    assert_eq!(v["invocation_id"].as_str().unwrap().len(), 32);
    // The caller's token never reaches the guest.
    let resp = node
        .http()
        .post(format!("{}/v1/functions/echo/invoke", node.url))
        .bearer_auth(node.token())
        .header("x-visible", "yes")
        .body("b")
        .send()
        .unwrap();
    assert_eq!(resp.headers()["x-echo-method"], "POST");
    assert_eq!(resp.headers()["x-visible"], "yes");
    let err = node.cli_err(&["invoke", "nope"]);
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn guests_get_no_ambient_authority() {
    let node = TestNode::start();
    let file = fixture("rust-sandbox");
    node.cli_ok(&[
        "deploy",
        file.to_str().unwrap(),
        "--name",
        "sandbox",
        "--route",
        "/s",
        "--env",
        "GREETING=hi there",
        "--env",
        "MODE=test",
    ]);
    let get = |p: &str| {
        node.http()
            .get(format!("{}/s{p}", node.url))
            .send()
            .unwrap()
            .text()
            .unwrap()
    };
    let env = get("/env");
    let mut lines: Vec<&str> = env.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        vec![
            "GREETING=hi there",
            "MODE=test",
            "VERGE_EVENTS_URL=http://events.verge.internal/"
        ],
        "only configured values, and the events URL Verge gives every function"
    );
    let fs = get("/fs");
    assert!(fs.contains("read_dir(/) denied"), "{fs}");
    assert!(fs.contains("read(/etc/passwd) denied"), "{fs}");
    let fetch = get("/fetch");
    assert!(fetch.contains("HttpRequestDenied"), "{fetch}");
    node.wait_for_output("sandbox", "outbound request to http://127.0.0.1:9/ denied");

    // Output is captured per invocation, bounded and marked as truncated;
    // it goes to the invocation record, never to the node's log.
    let printed = get("/print?n=1048576");
    assert!(printed.starts_with("printed"), "{printed}");
    node.wait_for_output("sandbox", "[output truncated]");
    assert!(
        !node.log().contains("[output truncated]"),
        "guest output in the node's log"
    );
}

#[test]
fn a_trapping_guest_gets_500_and_the_node_keeps_serving() {
    let node = TestNode::start();
    node.deploy("rust-trap", "boom", "/boom");
    node.deploy("c-hello", "hello", "/hello");
    for _ in 0..2 {
        let resp = node
            .http()
            .get(format!("{}/boom", node.url))
            .send()
            .unwrap();
        assert_eq!(resp.status(), 500);
        let id = resp.headers()["verge-invocation-id"]
            .to_str()
            .unwrap()
            .to_string();
        let problem: serde_json::Value = resp.json().unwrap();
        assert_eq!(problem["invocation_id"], id.as_str());
        // The caller learns the invocation id, not the trap (issue 14).
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(&id), "{problem}");
        assert!(
            !detail.contains("trap") && !detail.contains("panic"),
            "{problem}"
        );
        // The owner finds the cause and the guest's stderr in the record.
        let out = eventually("the invocation's record", || {
            let out = node.cli(&["logs", "boom", "--invocation", &id]);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        });
        assert!(
            out.contains("about to fail on purpose"),
            "stderr in the record: {out}"
        );
        assert!(out.contains("error  | "), "the cause in the record: {out}");
        let rec: serde_json::Value = node
            .api_get(&format!("/v1/invocations?id={id}"))
            .json()
            .unwrap();
        assert!(
            rec[0]["error"]
                .as_str()
                .unwrap_or_default()
                .contains("unreachable"),
            "{rec}"
        );
        assert!(
            !node.log().contains("about to fail on purpose"),
            "guest output in the node's log"
        );
        let ok = node
            .http()
            .get(format!("{}/hello", node.url))
            .send()
            .unwrap();
        assert_eq!(ok.status(), 200);
    }
}

/// The README's first command: `verge up --example` serves the bundled example.
#[test]
fn up_with_example_serves_the_bundled_function() {
    let node = TestNode::start_with(&["--example"]);
    assert!(
        node.stdout
            .contains(&format!("try             curl {}/hello", node.url)),
        "prints the URL: {}",
        node.stdout
    );
    let body = node
        .http()
        .get(format!("{}/hello", node.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(body, "Hello from Rust!\n");
    // Restarting with --example again keeps the deployed version.
    let node = node.kill9_and_restart();
    assert!(node.stdout.contains("already deployed"), "{}", node.stdout);
    let detail: serde_json::Value = node.api_get("/v1/functions/hello").json().unwrap();
    assert_eq!(detail["versions"].as_array().unwrap().len(), 1);
}

/// People get a sentence, scripts get JSON.
#[test]
fn deploy_output_for_people_and_for_scripts() {
    let node = TestNode::start();
    let file = fixture("c-hello");
    let out = node.cli_ok(&[
        "deploy",
        file.to_str().unwrap(),
        "--name",
        "hi",
        "--route",
        "/hi",
    ]);
    assert!(out.contains("\ndeployed hi version 1"), "{out}");
    assert!(
        out.contains("promote") && out.contains("live -> version 1"),
        "{out}"
    );
    assert!(out.contains(&format!("serving  {}/hi", node.url)), "{out}");
    let routes: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["routes", "--json"])).unwrap();
    assert_eq!(routes[0]["path"], "/hi");
    assert_eq!(routes[0]["function"], "hi");
    let err = node.cli_err(&["deploy", file.to_str().unwrap(), "--name", "Bad_Name"]);
    assert!(err.contains("invalid function name"), "{err}");
}

#[test]
fn the_node_writes_its_log_as_json_lines_when_asked() {
    let node = TestNode::start_with(&["--log-format", "json"]);
    node.deploy("rust-hello", "hello", "/hello");
    node.wait_for_log("version deployed");
    let log = node.log();
    // Whole lines only: the last one may still be being written.
    let whole = log.rsplit_once('\n').map_or("", |(done, _)| done);
    let lines: Vec<serde_json::Value> = whole
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let deployed = lines
        .iter()
        .find(|v| v["message"] == "version deployed")
        .expect("the deploy's line");
    assert_eq!(deployed["function"], "hello", "{deployed}");
    assert_eq!(deployed["version"], 1, "{deployed}");
    assert_eq!(deployed["level"], "INFO", "{deployed}");
    assert!(deployed["timestamp"].is_string(), "{deployed}");
}
