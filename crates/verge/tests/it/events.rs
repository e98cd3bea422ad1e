//! The event bus (issue 5): ingestion through the CloudEvents Python SDK,
//! triggers and delivery, retries and dead letters, chains and loop
//! protection, durability across kill -9, schedules.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;

use crate::kit::{TestNode, eventually, fixture};

fn ce_client(
    node: &TestNode,
    mode: &str,
    ty: &str,
    prefix: &str,
    count: usize,
) -> Vec<(u16, String)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/ce_client.py");
    let out = Command::new("python3")
        .arg(&script)
        .args([
            &format!("{}/v1/events", node.url),
            &node.token(),
            mode,
            ty,
            prefix,
            &count.to_string(),
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "ce_client.py failed (pip install cloudevents==2.2.0): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (status, body) = l.split_once(' ').unwrap_or((l, ""));
            (status.parse().unwrap(), body.to_string())
        })
        .collect()
}

fn deploy_relay(node: &TestNode, name: &str, env: &[&str]) {
    let f = fixture("rust-relay");
    let mut args = vec!["deploy", f.to_str().unwrap(), "--name", name];
    for e in env {
        args.push("--env");
        args.push(e);
    }
    node.cli_ok(&args);
}

fn jobs(node: &TestNode, function: &str) -> Vec<serde_json::Value> {
    node.api_get(&format!("/v1/jobs?function={function}"))
        .json::<Vec<serde_json::Value>>()
        .unwrap()
}

fn event_id(job: &serde_json::Value) -> String {
    job["payload"]["event"]["id"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Waits until every job of `function` is in `state`; returns them.
fn all_jobs(node: &TestNode, function: &str, n: usize, state: &str) -> Vec<serde_json::Value> {
    eventually(&format!("{n} jobs of {function} {state}"), || {
        let js = jobs(node, function);
        (js.len() >= n && js.iter().all(|j| j["state"] == state)).then_some(js)
    })
}

#[test]
fn the_python_sdk_publishes_in_every_mode_and_triggers_deliver() {
    let node = TestNode::start();
    deploy_relay(&node, "sink", &[]);
    node.cli_ok(&[
        "trigger",
        "add",
        "sink",
        "--on",
        "com.acme.*",
        "--subject-prefix",
        "item/",
    ]);
    for (mode, prefix) in [("structured", "s-"), ("binary", "b-"), ("batch", "m-")] {
        let answers = ce_client(&node, mode, "com.acme.order", prefix, 3);
        let expected = if mode == "batch" { 1 } else { 3 };
        assert_eq!(answers.len(), expected);
        for (status, body) in answers {
            assert_eq!(status, 202, "{mode}: {body}");
        }
    }
    let delivered = all_jobs(&node, "sink", 9, "succeeded");
    let ids: HashSet<String> = delivered.iter().map(event_id).collect();
    for p in ["s-", "b-", "m-"] {
        for i in 0..3 {
            assert!(
                ids.contains(&format!("{p}{i}")),
                "{p}{i} not delivered: {ids:?}"
            );
        }
    }
    // The function saw binary mode: its ce-id and ce-type on stdout.
    eventually("the sink logged b-1", || {
        let logs = node.cli_ok(&["logs", "sink"]);
        logs.contains("received b-1 com.acme.order").then_some(())
    });
    // Malformed events: 400 naming the attribute; nothing queued.
    let http = node.http();
    let post = |ct: &str, body: &str| {
        let r = http
            .post(format!("{}/v1/events", node.url))
            .bearer_auth(node.token())
            .header("content-type", ct)
            .body(body.to_string())
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    let (s, b) = post(
        "application/cloudevents+json",
        r#"{"specversion":"1.0","source":"/x","type":"com.acme.order"}"#,
    );
    assert_eq!(s, 400);
    assert!(b.contains("\\\"id\\\""), "{b}");
    let (s, b) = post(
        "application/cloudevents+json",
        r#"{"specversion":"1.0","id":"1","source":"/x","type":"t","time":"noon"}"#,
    );
    assert_eq!(s, 400);
    assert!(b.contains("time"), "{b}");
    let (s, b) = post(
        "application/cloudevents-batch+json",
        r#"[{"specversion":"1.0","id":"1","source":"/x","type":"t"},{"id":"2"}]"#,
    );
    assert_eq!(s, 400);
    assert!(b.contains("event 1 of the batch"), "{b}");
    let (s, _) = post("text/plain", "hello");
    assert_eq!(s, 400);
    assert_eq!(jobs(&node, "sink").len(), 9);
    // The token is required.
    let r = http
        .post(format!("{}/v1/events", node.url))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[test]
fn a_failing_function_is_retried_dead_lettered_then_replayed_after_a_fix() {
    let node = TestNode::start_with(&["--retry-base", "100ms"]);
    deploy_relay(&node, "flaky", &["STATUS=500"]);
    node.cli_ok(&["async", "flaky", "--retries", "2"]);
    node.cli_ok(&["trigger", "add", "flaky", "--on", "com.acme.job"]);
    assert_eq!(
        ce_client(&node, "structured", "com.acme.job", "j-", 1)[0].0,
        202
    );
    let dead = all_jobs(&node, "flaky", 1, "dead");
    assert_eq!(dead[0]["attempts"], 3, "first attempt and two retries");
    assert!(
        dead[0]["last_error"].as_str().unwrap().contains("500"),
        "{}",
        dead[0]
    );
    let id = dead[0]["id"].as_str().unwrap().to_string();
    let out = node.cli_ok(&["dlq", "ls", "flaky"]);
    assert!(out.contains(&id), "{out}");
    let out = node.cli_ok(&["dlq", "show", &id]);
    assert!(out.contains("com.acme.job j-0"), "{out}");
    // An async invocation of the failing version dead-letters too.
    let queued: serde_json::Value = serde_json::from_str(
        &node.cli_ok(&["invoke", "flaky", "--async", "--data", "x", "--json"]),
    )
    .unwrap();
    let inv = queued["id"].as_str().unwrap().to_string();
    eventually("the async invocation is dead-lettered", || {
        let out = node.cli_ok(&["invocations", "--id", &inv]);
        out.contains("Dead").then_some(())
    });
    // Fix it (a new version), replay both: they succeed.
    deploy_relay(&node, "flaky", &["STATUS=200"]);
    node.cli_ok(&["dlq", "replay", &id]);
    node.cli_ok(&["dlq", "replay", &inv]);
    all_jobs(&node, "flaky", 2, "succeeded");
    let out = node.cli_ok(&["invocations", "--id", &inv]);
    assert!(
        out.contains("Succeeded") && out.contains("attempts  1 of 3"),
        "{out}"
    );
    assert!(node.cli_ok(&["dlq", "ls"]).contains("no dead letters"));
    let err = node.cli_err(&["dlq", "replay", &inv]);
    assert!(err.contains("not dead-lettered"), "{err}");
}

#[test]
fn chains_run_and_loops_stop_at_the_hop_limit() {
    let node = TestNode::start();
    // A (Rust relay) emits b.go asking for c.go next; B (the JavaScript relay)
    // emits c.go; C is the Python echo.
    deploy_relay(
        &node,
        "a",
        &["EMIT_TYPE=com.acme.b.go", "EMIT_NEXT=com.acme.c.go"],
    );
    node.deploy("js-relay", "b", "/b");
    node.deploy("python-echo", "c", "/c");
    node.cli_ok(&["trigger", "add", "a", "--on", "com.acme.a.go"]);
    node.cli_ok(&["trigger", "add", "b", "--on", "com.acme.b.go"]);
    node.cli_ok(&["trigger", "add", "c", "--on", "com.acme.c.go"]);
    assert_eq!(
        ce_client(&node, "binary", "com.acme.a.go", "chain-", 1)[0].0,
        202
    );
    let c = all_jobs(&node, "c", 1, "succeeded");
    assert_eq!(event_id(&c[0]), "chain-0/com.acme.b.go/com.acme.c.go");
    assert_eq!(c[0]["payload"]["event"]["source"], "/verge/functions/b");
    assert_eq!(c[0]["hops"], 2);
    // B's stdout (through the ledger, flushed within 100 ms).
    eventually("B logged the event with its hop count", || {
        let logs = node.cli_ok(&["logs", "b"]);
        logs.contains("received chain-0/com.acme.b.go com.acme.b.go hops=1")
            .then_some(())
    });
    // A loop: the function emits the type it is triggered on.
    deploy_relay(&node, "loop", &["EMIT_TYPE=com.acme.loop"]);
    node.cli_ok(&["trigger", "add", "loop", "--on", "com.acme.loop"]);
    ce_client(&node, "structured", "com.acme.loop", "l-", 1);
    let dead = eventually("the loop is dead-lettered", || {
        let d: Vec<serde_json::Value> = node.api_get("/v1/dlq?function=loop").json().unwrap();
        (!d.is_empty()).then_some(d)
    });
    assert!(
        dead[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("hop limit"),
        "{}",
        dead[0]
    );
    assert_eq!(dead[0]["hops"], 16);
    // 16 deliveries (hops 0 to 15) succeeded; the 17th is the dead letter.
    eventually("16 deliveries and 1 dead letter", || {
        let js = jobs(&node, "loop");
        let ok = js.iter().filter(|j| j["state"] == "succeeded").count();
        let dead = js.iter().filter(|j| j["state"] == "dead").count();
        (ok == 16 && dead == 1 && js.len() == 17).then_some(())
    });
}

#[test]
fn platform_events_trigger_functions() {
    let node = TestNode::start_with(&["--node-name", "edge-7"]);
    deploy_relay(&node, "watcher", &[]);
    node.cli_ok(&["trigger", "add", "watcher", "--on", "dev.verge.function.*"]);
    node.deploy("rust-hello", "newcomer", "/newcomer");
    node.cli_ok(&["rm", "newcomer"]);
    let js = all_jobs(&node, "watcher", 2, "succeeded");
    let types: HashSet<String> = js
        .iter()
        .map(|j| j["payload"]["event"]["type"].as_str().unwrap().to_string())
        .collect();
    assert!(
        types.contains("dev.verge.function.deployed")
            && types.contains("dev.verge.function.deleted"),
        "{types:?}"
    );
    assert!(
        js.iter()
            .all(|j| j["payload"]["event"]["source"] == "/verge/nodes/edge-7")
    );
}

#[test]
fn acknowledged_events_survive_kill_9() {
    let node = TestNode::start();
    // 20 ms per event, two at a time: 200 events take about 2 s.
    let f = fixture("rust-relay");
    node.cli_ok(&[
        "deploy",
        f.to_str().unwrap(),
        "--name",
        "slow",
        "--env",
        "SLEEP_MS=20",
        "--concurrency",
        "2",
    ]);
    node.cli_ok(&["trigger", "add", "slow", "--on", "com.acme.durable"]);
    let answers = ce_client(&node, "batch", "com.acme.durable", "d-", 200);
    assert_eq!(answers[0].0, 202, "{}", answers[0].1);
    // Kill while deliveries are queued and in flight.
    eventually("some deliveries done", || {
        let done = jobs(&node, "slow")
            .iter()
            .filter(|j| j["state"] == "succeeded")
            .count();
        (done >= 4).then_some(())
    });
    let done_before = jobs(&node, "slow")
        .iter()
        .filter(|j| j["state"] == "succeeded")
        .count();
    assert!(
        done_before < 200,
        "all delivered before the kill; nothing was tested"
    );
    let node = node.kill9_and_restart();
    let js = all_jobs(&node, "slow", 200, "succeeded");
    let mut per_id: HashMap<String, u64> = HashMap::new();
    for j in &js {
        *per_id.entry(event_id(j)).or_default() += j["attempts"].as_u64().unwrap();
    }
    for i in 0..200 {
        assert!(
            per_id.contains_key(&format!("d-{i}")),
            "d-{i} was never delivered"
        );
    }
    let duplicates: u64 = per_id.values().map(|n| n - 1).sum();
    eprintln!("200 events delivered; {duplicates} extra attempts after the kill");
}

#[test]
fn schedules_fire_and_keep_firing_after_a_restart() {
    let node = TestNode::start();
    deploy_relay(&node, "tick", &[]);
    let out = node.cli_ok(&[
        "schedule",
        "add",
        "tick",
        "* * * * * *",
        "--tz",
        "Europe/Berlin",
    ]);
    assert!(out.contains("Europe/Berlin"), "{out}");
    eventually("two firings", || {
        (jobs(&node, "tick").len() >= 2).then_some(())
    });
    let node = node.kill9_and_restart();
    let before = jobs(&node, "tick").len();
    eventually("firings after the restart", || {
        (jobs(&node, "tick").len() >= before + 2).then_some(())
    });
    let js = jobs(&node, "tick");
    assert_eq!(
        js[0]["payload"]["event"]["type"],
        "dev.verge.schedule.fired"
    );
    let ls = node.cli_ok(&["schedule", "ls"]);
    assert!(ls.contains("* * * * * *"), "{ls}");
    let err = node.cli_err(&["schedule", "add", "tick", "61 * * * *"]);
    assert!(err.contains("invalid cron expression"), "{err}");
    let err = node.cli_err(&["schedule", "add", "tick", "* * * * *", "--tz", "Mars/Base"]);
    assert!(err.contains("unknown time zone"), "{err}");
}

#[test]
fn destinations_and_failure_events_reach_triggers() {
    let node = TestNode::start_with(&["--retry-base", "50ms"]);
    deploy_relay(&node, "worker", &[]);
    deploy_relay(&node, "observer", &[]);
    let out = node.cli_ok(&[
        "async",
        "worker",
        "--retries",
        "0",
        "--on-success",
        "com.acme.worker.ok",
        "--on-failure",
        "com.acme.worker.failed",
    ]);
    assert!(out.contains("retries     0"), "{out}");
    node.cli_ok(&["trigger", "add", "observer", "--on", "com.acme.worker.*"]);
    node.cli_ok(&[
        "trigger",
        "add",
        "observer",
        "--on",
        "dev.verge.invocation.failed",
    ]);
    node.cli_ok(&["invoke", "worker", "--async", "--data", "fine"]);
    // A version that traps: its async invocation fails, is dead-lettered at once.
    let trap = fixture("rust-trap");
    node.cli_ok(&["deploy", trap.to_str().unwrap(), "--name", "worker"]);
    node.cli_ok(&["invoke", "worker", "--async", "--data", "boom"]);
    let seen = eventually("the observer got all three events", || {
        let types: HashSet<String> = jobs(&node, "observer")
            .iter()
            .filter(|j| j["state"] == "succeeded")
            .map(|j| {
                j["payload"]["event"]["type"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        [
            "com.acme.worker.ok",
            "com.acme.worker.failed",
            "dev.verge.invocation.failed",
        ]
        .iter()
        .all(|t| types.contains(*t))
        .then_some(types)
    });
    assert!(!seen.is_empty());
    let dead: Vec<serde_json::Value> = node.api_get("/v1/dlq?function=worker").json().unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["attempts"], 1, "no retries configured");
}
