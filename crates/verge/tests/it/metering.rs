//! Pay per use: every invocation is metered and lands in the ledger.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::kit::{TestNode, fixture, noise};

/// Waits until the ledger holds at least `n` records of `function`.
fn records(node: &TestNode, function: &str, n: usize) -> Vec<Value> {
    crate::kit::eventually(&format!("{n} records of {function} in the ledger"), || {
        let got: Vec<Value> = node
            .api_get(&format!("/v1/invocations?function={function}&limit=10000"))
            .json()
            .unwrap();
        (got.len() >= n).then_some(got)
    })
}

fn by_id<'a>(records: &'a [Value], id: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["invocation_id"] == id)
        .unwrap_or_else(|| panic!("no record {id}"))
}

fn get_id(node: &TestNode, path: &str) -> (u16, String, String) {
    let r = node
        .http()
        .get(format!("{}{path}", node.url))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let id = r.headers()["verge-invocation-id"]
        .to_str()
        .unwrap()
        .to_string();
    (status, id, r.text().unwrap())
}

/// The CPU time of an invocation is measured: it agrees with the CPU the
/// node's process used meanwhile (from /proc), not with the wall time the
/// guest asked to burn (on a loaded machine the two differ, and the record
/// must follow the CPU).
#[test]
fn cpu_time_is_measured_not_estimated() {
    let node = TestNode::start();
    node.deploy("rust-hostile", "hostile", "/h");
    get_id(&node, "/h/ok"); // load the function first
    for ms in [100u64, 400] {
        let before = node.cpu_ms();
        let (status, id, _) = get_id(&node, &format!("/h/burn?ms={ms}"));
        let used = node.cpu_ms() - before;
        assert_eq!(status, 200);
        let r = crate::kit::eventually("the burn's record in the ledger", || {
            let got: Vec<Value> = node
                .api_get(&format!("/v1/invocations?id={id}"))
                .json()
                .unwrap();
            got.into_iter().next()
        });
        let cpu_ms = r["cpu_us"].as_u64().unwrap() as f64 / 1000.0;
        let wall_ms = r["wall_us"].as_u64().unwrap() as f64 / 1000.0;
        assert!(wall_ms >= ms as f64, "{r}");
        assert!(cpu_ms <= wall_ms + 1.0, "more CPU than wall time: {r}");
        // /proc counts in 10 ms ticks; the node does a little work besides the guest.
        assert!(
            cpu_ms <= used + 20.0 && cpu_ms >= used * 0.8 - 20.0,
            "burn of {ms} ms: the record says {cpu_ms:.1} ms of CPU, the process used {used:.0} ms: {r}"
        );
    }
}

#[test]
fn records_carry_memory_bytes_status_and_cold_starts() {
    let node = TestNode::start();
    node.deploy("rust-hostile", "hostile", "/h");
    node.deploy("rust-echo", "echo", "/e");
    let (_, first, _) = get_id(&node, "/h/ok");
    let (_, second, _) = get_id(&node, "/h/ok");
    let (status, alloc, _) = get_id(&node, "/h/alloc?mib=32");
    assert_eq!(status, 200);
    let body = noise(100_000, 7);
    let r = node
        .http()
        .post(format!("{}/e/x", node.url))
        .body(body.clone())
        .send()
        .unwrap();
    let echo = r.headers()["verge-invocation-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(r.bytes().unwrap().len(), body.len());

    let recs = records(&node, "hostile", 3);
    assert_eq!(
        by_id(&recs, &first)["cold"],
        true,
        "first call after the code was loaded"
    );
    assert_eq!(by_id(&recs, &second)["cold"], false);
    let a = by_id(&recs, &alloc);
    assert!(a["peak_memory_bytes"].as_u64().unwrap() >= 32 << 20, "{a}");
    assert_eq!(a["memory_limit_bytes"].as_u64().unwrap(), 128 << 20);
    assert_eq!(a["status"], 200);
    assert_eq!(a["outcome"], "ok");
    let e = &records(&node, "echo", 1)[0];
    assert_eq!(e["invocation_id"], echo.as_str());
    assert_eq!(e["request_bytes"], 100_000);
    assert_eq!(e["response_bytes"], 100_000);

    // Records survive a kill -9 once they are in the ledger (query = committed).
    let before: Vec<Value> = node.api_get("/v1/invocations?limit=10000").json().unwrap();
    let node = node.kill9_and_restart();
    let after: Vec<Value> = node.api_get("/v1/invocations?limit=10000").json().unwrap();
    assert_eq!(before, after);
}

#[test]
fn limits_per_version_give_the_right_status_and_record() {
    let node = TestNode::start_with(&["--timeout", "5s", "--memory", "256MiB"]);
    let file = fixture("rust-hostile");
    let f = file.to_str().unwrap();
    node.cli_ok(&[
        "deploy",
        f,
        "--name",
        "small",
        "--route",
        "/small",
        "--memory",
        "16MiB",
        "--timeout",
        "1s",
    ]);
    let show: Value = serde_json::from_str(&node.cli_ok(&["show", "small", "--json"])).unwrap();
    assert_eq!(show["versions"][0]["memory_bytes"], 16 << 20);
    assert_eq!(show["versions"][0]["timeout_ms"], 1000);

    let (status, mem_id, body) = get_id(&node, "/small/alloc?mib=64");
    assert_eq!(status, 500);
    // The caller of a public route learns the kind of failure; the limit
    // is in the record, for the owner.
    assert!(body.contains("memory limit"), "{body}");
    let (status, loop_id, body) = get_id(&node, "/small/loop");
    assert_eq!(status, 504);
    assert!(body.contains("time limit"), "{body}");
    let (status, _, _) = get_id(&node, "/small/alloc?mib=4");
    assert_eq!(status, 200, "within the limit");

    let recs = records(&node, "small", 3);
    let m = by_id(&recs, &mem_id);
    assert_eq!(m["outcome"], "memory_limit");
    assert_eq!(m["status"], 500);
    let l = by_id(&recs, &loop_id);
    assert_eq!(l["outcome"], "timeout");
    assert_eq!(l["status"], 504);
    assert!(l["wall_us"].as_u64().unwrap() >= 1_000_000);

    let failed = node.cli_ok(&["invocations", "small", "--status", "504", "--json"]);
    let failed: Vec<Value> = serde_json::from_str(&failed).unwrap();
    assert_eq!(failed.len(), 1);
    let table = node.cli_ok(&["invocations", "small"]);
    assert!(
        table.starts_with("ID") && table.contains("memory_limit"),
        "{table}"
    );

    // Limits above the node's ceilings are refused, with what to do.
    let err = node.cli_err(&["deploy", f, "--name", "big", "--concurrency", "0"]);
    assert!(err.contains("at least 1"), "{err}");
    let err = node.cli_err(&["deploy", f, "--name", "big", "--memory", "1GiB"]);
    assert!(
        err.contains("ceiling") && err.contains("verge up --memory"),
        "{err}"
    );
    let err = node.cli_err(&["deploy", f, "--name", "big", "--timeout", "1m"]);
    assert!(err.contains("ceiling"), "{err}");

    // A version's limits survive a restart.
    let node = node.kill9_and_restart();
    let (status, _, body) = get_id(&node, "/small/alloc?mib=64");
    assert_eq!(status, 500);
    // The caller of a public route learns the kind of failure; the limit
    // is in the record, for the owner.
    assert!(body.contains("memory limit"), "{body}");
}

#[test]
fn usage_totals_equal_the_sum_of_the_records() {
    let node = TestNode::start();
    node.deploy("rust-hostile", "hostile", "/h");
    node.deploy("c-hello", "hello", "/hello");
    for _ in 0..5 {
        get_id(&node, "/hello");
    }
    for ms in [1, 30, 120] {
        get_id(&node, &format!("/h/burn?ms={ms}"));
    }
    records(&node, "hello", 5);
    let recs = records(&node, "hostile", 3);
    let all: Vec<Value> = node.api_get("/v1/invocations?limit=10000").json().unwrap();
    assert_eq!(all.len(), 8);

    let report: Value = node.api_get("/v1/usage?by=function").json().unwrap();
    let total = &report["total"];
    assert_eq!(total["invocations"], 8);
    let cpu: u64 = all.iter().map(|r| r["cpu_us"].as_u64().unwrap()).sum();
    assert!((total["cpu_seconds"].as_f64().unwrap() - cpu as f64 / 1e6).abs() < 1e-9);
    let out: u64 = all
        .iter()
        .map(|r| r["response_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(total["bytes_out"], out);
    // Configured memory x wall time billed at the default 1 ms granularity.
    let gbs: f64 = all
        .iter()
        .map(|r| {
            let billed_us = r["wall_us"].as_u64().unwrap().div_ceil(1000) * 1000;
            r["memory_limit_bytes"].as_f64().unwrap() / (1u64 << 30) as f64 * billed_us as f64 / 1e6
        })
        .sum();
    assert!((total["gb_seconds_configured"].as_f64().unwrap() - gbs).abs() < 1e-9);
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["key"], "hostile");
    assert_eq!(rows[1]["invocations"], recs.len());

    // 100 ms rounding costs more than 1 ms rounding for the same records.
    let coarse: Value = node.api_get("/v1/usage?granularity=100ms").json().unwrap();
    assert!(coarse["total"]["cost"].as_f64().unwrap() > total["cost"].as_f64().unwrap());

    let csv = node.cli_ok(&["usage", "--csv", "--by", "version"]);
    let mut lines = csv.lines();
    assert!(lines.next().unwrap().starts_with("KEY,INVOCATIONS"));
    assert!(csv.contains("hello@1,5,"), "{csv}");
    assert!(csv.contains("total,8,"), "{csv}");
    let per_minute: Value = node.api_get("/v1/usage?by=version,minute").json().unwrap();
    let keys: Vec<&str> = per_minute["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert!(
        keys.iter()
            .any(|k| k.starts_with("hello@1 ") && k.ends_with(":00Z")),
        "{keys:?}"
    );
    assert_eq!(per_minute["total"]["invocations"], 8);
    let table = node.cli_ok(&["usage", "--since", "1h"]);
    assert!(table.contains("per GB-second"), "{table}");
    let err = node.cli_err(&["usage", "--by", "planet"]);
    assert!(err.contains("function, version, hour or minute"), "{err}");
}

#[test]
fn logs_show_each_invocations_output_and_follow_new_ones() {
    let node = TestNode::start();
    node.deploy("rust-trap", "boom", "/boom");
    node.deploy("rust-sandbox", "s", "/s");
    let (status, id, _) = get_id(&node, "/boom");
    assert_eq!(status, 500);
    records(&node, "boom", 1);
    let out = node.cli_ok(&["logs", "boom"]);
    assert!(out.contains(&id), "{out}");
    assert!(
        out.contains("stderr | trap fixture: about to fail on purpose"),
        "{out}"
    );
    let one = node.cli_ok(&["logs", "boom", "--invocation", &id, "--json"]);
    let rec: Value = serde_json::from_str(one.lines().next().unwrap()).unwrap();
    assert_eq!(rec["outcome"], "trap");
    let err = node.cli_err(&["logs", "boom", "--invocation", "nope"]);
    assert!(err.contains("verge invocations boom"), "{err}");

    // -f prints output of invocations that finish after it started.
    let mut follow = std::process::Command::new(crate::kit::VERGE)
        .args(["logs", "s", "-f"])
        .env("VERGE_SERVER", &node.url)
        .env("VERGE_TOKEN", node.token())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (_, print_id, _) = get_id(&node, "/s/print?n=2048");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = String::new();
    while !(seen.contains(&print_id) && seen.contains("stdout | xxxx")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(_) => panic!("verge logs -f never showed {print_id}:\n{seen}"),
        }
    }
    follow.kill().unwrap();
    let _ = follow.wait();
}
