//! Nodes on NATS JetStream (`verge up --nats`): real `nats-server` and
//! `verge` processes. Two nodes on one server behave as one platform; a
//! NATS outage stops writes with a clear 503, never requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use verge_cluster::testkit::NatsServer;

use crate::kit::{TestNode, curl, eventually, fixture};

pub(crate) fn cluster_node(nats: &NatsServer, name: &str) -> TestNode {
    TestNode::start_with(&["--nats", &nats.url(), "--node-name", name])
}

/// Invocations of `function` that `node`'s `verge usage` counts.
pub(crate) fn invocations(node: &TestNode, function: &str) -> Option<u64> {
    let out = node.cli_ok(&["usage", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == function)
        .map(|r| r["invocations"].as_u64().unwrap())
}

/// Status and `verge-version` header of GET `path` on `node`.
pub(crate) fn get(node: &TestNode, path: &str) -> (u16, Option<u64>) {
    let (status, headers, _) = curl(&[&format!("{}{path}", node.url)]);
    let version = headers
        .lines()
        .find_map(|l| l.strip_prefix("verge-version:"))
        .and_then(|v| v.trim().parse().ok());
    (status, version)
}

/// GET `path` on each node, one client thread per node, until stopped.
pub(crate) struct RequestLoop {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl RequestLoop {
    pub(crate) fn start(nodes: &[&TestNode], path: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let threads = nodes
            .iter()
            .map(|n| {
                let url = format!("{}{path}", n.url);
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    let http = reqwest::blocking::Client::new();
                    while !stop.load(Ordering::SeqCst) {
                        match http.get(&url).send() {
                            Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::SeqCst),
                            _ => failed.fetch_add(1, Ordering::SeqCst),
                        };
                    }
                })
            })
            .collect();
        RequestLoop {
            stop,
            ok,
            failed,
            threads,
        }
    }

    /// Stops the loop: requests answered 200, and the others.
    pub(crate) fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

#[test]
fn two_nodes_on_one_jetstream_serve_as_one_platform() {
    let nats = NatsServer::start();
    let a = cluster_node(&nats, "a");
    let b = cluster_node(&nats, "b").with_token(a.token());
    assert!(
        !b.data_dir.join("admin.token").exists(),
        "the second node makes no token of its own: the cluster has one"
    );
    assert!(
        b.stdout.contains("admin token     the cluster's"),
        "{}",
        b.stdout
    );

    // Deployed through A, served by B (its bytes from the cluster's object
    // store, compiled there).
    a.deploy("rust-hello", "hello", "/hello");
    eventually("B serves what A deployed", || {
        (get(&b, "/hello") == (200, Some(1))).then_some(())
    });

    // A second version, promoted and canaried through B, seen by A.
    let file = fixture("rust-hello");
    let out = b.cli_ok(&[
        "deploy",
        file.to_str().unwrap(),
        "--name",
        "hello",
        "--env",
        "V=2",
        "--no-promote",
    ]);
    assert!(out.contains("version 2"), "{out}");
    b.cli_ok(&["promote", "hello", "2"]);
    eventually("A follows the alias B moved", || {
        (get(&a, "/hello").1 == Some(2)).then_some(())
    });
    b.cli_ok(&["canary", "hello", "1", "--weight", "50"]);
    let aliases = eventually("A sees B's canary", || {
        let out = a.cli_ok(&["alias", "ls", "hello", "--json"]);
        out.contains("\"weight\": 50").then_some(out)
    });
    assert!(aliases.contains("\"canary\""), "{aliases}");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..60 {
        seen.insert(get(&a, "/hello").1);
    }
    assert_eq!(
        seen,
        [Some(1), Some(2)].into(),
        "A splits the traffic as B set it"
    );

    // A token made on A works on B; removed on B, it stops working on A.
    let out = a.cli_ok(&["token", "create", "ci", "--json"]);
    let token: serde_json::Value = serde_json::from_str(&out).unwrap();
    let token = token["token"].as_str().unwrap().to_string();
    let with = |node: &TestNode, t: &str| {
        node.http()
            .get(format!("{}/v1/functions", node.url))
            .bearer_auth(t)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    eventually("B takes A's new token", || {
        (with(&b, &token) == 200).then_some(())
    });
    b.cli_ok(&["token", "rm", "ci"]);
    eventually("A refuses the token B removed", || {
        (with(&a, &token) == 401).then_some(())
    });

    // `verge nodes` on either lists both, each with its link up.
    let nodes = eventually("both nodes heartbeat", || {
        let out = b.cli_ok(&["nodes", "--json"]);
        let v: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        (v.len() == 2).then_some(v)
    });
    let names: Vec<&str> = nodes.iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b"]);
    assert!(nodes.iter().all(|n| n["link"] == "connected"), "{nodes:?}");
    assert!(nodes.iter().any(|n| n["this"] == true && n["name"] == "b"));
    let table = a.cli_ok(&["nodes"]);
    assert!(table.contains("LINK") && table.contains(&b.url), "{table}");

    // Key-value writes on both nodes converge through NATS (no --peer):
    // counters add up, a value larger than NATS's default 1 MiB payload
    // crosses too.
    let kv_get = |node: &TestNode, key: &str| {
        let out = node.cli(&["kv", "get", "shop", key]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    a.cli_ok(&["kv", "incr", "shop", "hits", "2"]);
    b.cli_ok(&["kv", "incr", "shop", "hits", "5"]);
    b.cli_ok(&["kv", "set", "shop", "from-b", "b1"]);
    let big = "x".repeat(3 << 20);
    let put = b
        .http()
        .put(format!("{}/v1/kv/shop/big", b.url))
        .bearer_auth(b.token())
        .body(big.clone())
        .send()
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    eventually("the counters converge on both nodes", || {
        (kv_get(&a, "hits").as_deref() == Some("7") && kv_get(&b, "hits").as_deref() == Some("7"))
            .then_some(())
    });
    eventually("A has B's writes", || {
        (kv_get(&a, "from-b").as_deref() == Some("b1")).then_some(())
    });
    eventually("A has B's 3 MiB value", || {
        let got = a
            .http()
            .get(format!("{}/v1/kv/shop/big", a.url))
            .bearer_auth(a.token())
            .send()
            .ok()?;
        (got.status() == 200 && got.bytes().ok()?.len() >= 3 << 20).then_some(())
    });

    // Usage on either node counts both nodes' invocations, each once.
    a.deploy("rust-hello", "counted", "/counted");
    eventually("B serves counted", || {
        (get(&b, "/counted").0 == 200).then_some(())
    });
    for _ in 0..4 {
        assert_eq!(get(&a, "/counted").0, 200);
    }
    for _ in 0..6 {
        assert_eq!(get(&b, "/counted").0, 200);
    }
    let counted = |node: &TestNode| invocations(node, "counted");
    // 4 on A, 1 + 6 on B (the first from the wait above).
    eventually("both nodes count 11 invocations of counted", || {
        (counted(&a) == Some(11) && counted(&b) == Some(11)).then_some(())
    });
    let out = a.cli_ok(&["invocations", "counted", "--json"]);
    let ids: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(ids.len(), 11, "A lists B's invocations too");

    // `verge rm` on A stops B serving it.
    a.cli_ok(&["rm", "hello"]);
    eventually("B stops serving the removed function", || {
        (get(&b, "/hello").0 == 404).then_some(())
    });
    let listed = b.cli_ok(&["ls"]);
    assert!(
        !listed.contains("hello") && listed.contains("counted"),
        "{listed}"
    );

    // Bytes no version references go from every node (code and artifact),
    // not before: `counted` still uses hello's component.
    let show: serde_json::Value =
        serde_json::from_str(&a.cli_ok(&["show", "counted", "--json"])).unwrap();
    let sha = show["versions"][0]["sha256"].as_str().unwrap().to_string();
    let files = |node: &TestNode| {
        let mut n = 0;
        for dir in ["artifacts", "cache"] {
            n += std::fs::read_dir(node.data_dir.join(dir))
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with(&sha)
                })
                .count();
        }
        n
    };
    assert!(files(&b) >= 2, "B holds the component and its code");
    std::thread::sleep(std::time::Duration::from_secs(6));
    assert!(files(&b) >= 2, "still referenced by counted");
    a.cli_ok(&["rm", "counted"]);
    eventually("B drops the unreferenced component and its code", || {
        (files(&b) == 0 && files(&a) == 0).then_some(())
    });
}

#[test]
fn a_nats_outage_stops_writes_with_503_never_requests_and_the_node_catches_up() {
    let mut nats = NatsServer::start();
    let a = cluster_node(&nats, "a");
    let b = cluster_node(&nats, "b").with_token(a.token());
    a.deploy("rust-hello", "hello", "/hello");
    eventually("B serves it", || (get(&b, "/hello").0 == 200).then_some(()));

    a.cli_ok(&["trigger", "add", "hello", "--on", "com.acme.out"]);
    // A request loop on both nodes for the whole outage.
    let load = RequestLoop::start(&[&a, &b], "/hello");

    nats.stop();
    eventually("A sees the link down", || {
        let h: serde_json::Value = a.api_get("/v1/health").json().unwrap();
        h["nats"]
            .as_str()
            .is_some_and(|s| s.starts_with("down since"))
            .then_some(())
    });
    // A deploy meanwhile: 503, saying why and that the node still serves.
    let file = fixture("rust-hello");
    let out = a.cli(&[
        "deploy",
        file.to_str().unwrap(),
        "--name",
        "late",
        "--route",
        "/late",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("503") && err.contains("unreachable") && err.contains("retry"),
        "{err}"
    );
    // So does an event that would queue a delivery.
    let r = a
        .http()
        .post(format!("{}/v1/events", a.url))
        .bearer_auth(a.token())
        .header("content-type", "application/cloudevents+json")
        .body(r#"{"specversion":"1.0","id":"o-1","source":"/t","type":"com.acme.out"}"#)
        .send()
        .unwrap();
    let (status, body) = (r.status(), r.text().unwrap());
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("unreachable") && body.contains("retry"),
        "{body}"
    );
    // Reads answer from the node's copy.
    assert!(a.cli_ok(&["ls"]).contains("hello"));
    // The outage lasts 10 s under the request loop.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    nats.resume();
    eventually("A links again", || {
        let h: serde_json::Value = a.api_get("/v1/health").json().unwrap();
        (h["nats"] == "connected").then_some(())
    });
    let (ok, failed) = load.stop();
    assert_eq!(failed, 0, "no request failed during the outage");
    assert!(ok > 0);

    // After NATS returns, a deploy on A serves on B.
    eventually("a deploy goes through again", || {
        a.cli(&[
            "deploy",
            file.to_str().unwrap(),
            "--name",
            "late",
            "--route",
            "/late",
        ])
        .status
        .success()
        .then_some(())
    });
    eventually("B serves the deploy made after the outage", || {
        (get(&b, "/late").0 == 200).then_some(())
    });
}

#[test]
fn a_node_with_its_own_functions_or_a_bad_nats_url_refuses_to_start_and_says_why() {
    let run = |args: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(crate::kit::VERGE)
            .args([
                "--data-dir",
                dir.path().to_str().unwrap(),
                "up",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "verge up {args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--nats", "127.0.0.1:4222"]);
    assert!(
        err.contains("not a NATS URL") && err.contains("nats://HOST:PORT"),
        "{err}"
    );
    let err = run(&["--nats", "nats://127.0.0.1:1"]);
    assert!(
        err.contains("could not connect to NATS at nats://127.0.0.1:1"),
        "{err}"
    );

    // A data directory that holds functions of a node on its own is not
    // silently emptied by joining a cluster.
    let alone = TestNode::start();
    alone.deploy("rust-hello", "hello", "/hello");
    let kept = alone.stop_keeping_dir();
    let dir = kept.path().to_path_buf();
    let nats = NatsServer::start();
    let out = std::process::Command::new(crate::kit::VERGE)
        .args([
            "--data-dir",
            dir.to_str().unwrap(),
            "up",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--nats", &nats.url()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("holds 1 functions") && err.contains("--data-dir"),
        "{err}"
    );
}

#[test]
fn a_nats_server_killed_in_a_3_server_cluster_loses_no_request_and_no_acknowledged_deploy() {
    let mut nats = verge_cluster::testkit::NatsCluster::start(3);
    let url = nats.url();
    // A job whose ack was lost with the server runs again after 3 s.
    let lease = ["--job-lease", "3s"];
    let a = TestNode::start_with(&["--nats", &url, "--node-name", "a", lease[0], lease[1]]);
    let b = TestNode::start_with(&["--nats", &url, "--node-name", "b", lease[0], lease[1]])
        .with_token(a.token());
    assert!(a.stdout.contains("3 replicas each"), "{}", a.stdout);
    a.deploy("rust-hello", "hello", "/hello");
    eventually("B serves it", || (get(&b, "/hello").0 == 200).then_some(()));

    let relay = fixture("rust-relay");
    a.cli_ok(&["deploy", relay.to_str().unwrap(), "--name", "sink"]);
    a.cli_ok(&["trigger", "add", "sink", "--on", "com.acme.kept"]);
    eventually("B knows the trigger", || {
        b.cli_ok(&["trigger", "ls"])
            .contains("com.acme.kept")
            .then_some(())
    });
    let load = RequestLoop::start(&[&a, &b], "/hello");

    // Deploys through A and events through both while one of the three
    // servers dies (kill -9).
    let file = fixture("rust-hello");
    let (mut acknowledged, mut refused) = (Vec::new(), Vec::new());
    let mut events_kept = std::collections::BTreeSet::new();
    for i in 0..8 {
        if i == 2 {
            nats.servers[0].stop();
        }
        for (node, n) in [(&a, "a"), (&b, "b")] {
            let batch: Vec<serde_json::Value> = (0..20)
                .map(|j| serde_json::json!({"specversion": "1.0", "id": format!("{n}-{i}-{j}"), "source": "/t", "type": "com.acme.kept"}))
                .collect();
            let r = node
                .http()
                .post(format!("{}/v1/events", node.url))
                .bearer_auth(node.token())
                .header("content-type", "application/cloudevents-batch+json")
                .body(serde_json::to_string(&batch).unwrap())
                .send()
                .unwrap();
            if r.status() == 202 {
                let accepted: serde_json::Value = r.json().unwrap();
                assert_eq!(accepted["deliveries"], 20, "{accepted}");
                events_kept.extend((0..20).map(|j| format!("{n}-{i}-{j}")));
            } else {
                assert_eq!(r.status(), 503, "{}", r.text().unwrap_or_default());
            }
        }
        let name = format!("f{i}");
        let out = a.cli(&[
            "deploy",
            file.to_str().unwrap(),
            "--name",
            &name,
            "--route",
            &format!("/{name}"),
        ]);
        if out.status.success() {
            acknowledged.push(name);
        } else {
            // Not acknowledged: allowed, if it says why.
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(err.contains("503"), "{err}");
            refused.push(err);
        }
    }
    let (_, failed) = load.stop();
    assert_eq!(failed, 0, "no request failed");
    assert!(
        acknowledged.len() >= 6,
        "deploys go on with two servers of three: {acknowledged:?}; refused: {refused:?}"
    );
    for name in &acknowledged {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while get(&b, &format!("/{name}")).0 != 200 {
            assert!(
                std::time::Instant::now() < until,
                "B never served the acknowledged deploy {name}; B lists:\n{}\nB's log:\n{}",
                b.cli_ok(&["ls"]),
                b.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    assert!(
        events_kept.len() >= 240,
        "events go on with two servers of three: {}",
        events_kept.len()
    );
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let delivered = loop {
        let seen = received(&records(&b, "sink"));
        let missing: Vec<&String> = events_kept
            .iter()
            .filter(|id| !seen.contains_key(*id))
            .collect();
        if missing.is_empty() {
            break seen;
        }
        if std::time::Instant::now() > until {
            let health: serde_json::Value = b.api_get("/v1/health").json().unwrap();
            let seen_a = received(&records(&a, "sink"));
            eprintln!(
                "of those, A's records lack {}",
                missing
                    .iter()
                    .filter(|id| !seen_a.contains_key(**id))
                    .count()
            );
            for n in [&a, &b] {
                let jobs: Vec<serde_json::Value> = n
                    .api_get("/v1/jobs?function=sink&limit=10000")
                    .json()
                    .unwrap();
                let ran: std::collections::BTreeMap<String, usize> =
                    jobs.iter().fold(Default::default(), |mut m, j| {
                        *m.entry(j["state"].as_str().unwrap_or("").to_string())
                            .or_default() += 1;
                        m
                    });
                let missing_ran = jobs
                    .iter()
                    .filter(|j| {
                        missing
                            .iter()
                            .any(|m| j["payload"]["event"]["id"] == m.as_str())
                    })
                    .map(|j| format!("{} {}", j["payload"]["event"]["id"], j["state"]))
                    .take(5)
                    .collect::<Vec<_>>();
                eprintln!(
                    "{}: jobs run {ran:?}; missing ones among them: {missing_ran:?}",
                    n.url
                );
            }
            let warnings = |n: &TestNode| {
                n.log()
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            panic!(
                "{} acknowledged events never delivered: {:?}...\nB's health: {health}\nA's warnings:\n{}\nB's warnings:\n{}",
                missing.len(),
                &missing[..missing.len().min(5)],
                warnings(&a),
                warnings(&b)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    // At least once: a delivery whose ack the dead server took with it
    // runs again.
    let again: u32 = delivered.values().map(|n| n - 1).sum();
    eprintln!(
        "{} events acknowledged, all delivered; {again} ran twice; consumers reopened after a stall: {}",
        events_kept.len(),
        a.log().matches("stalled; reopening").count()
            + b.log().matches("stalled; reopening").count()
    );
    // The dead server comes back and catches up; the nodes keep working.
    nats.servers[0].resume();
    a.cli_ok(&[
        "deploy",
        file.to_str().unwrap(),
        "--name",
        "after",
        "--route",
        "/after",
    ]);
    eventually("B serves the deploy after the server returned", || {
        (get(&b, "/after").0 == 200).then_some(())
    });
}

/// Invocation records of `function` with their output, as `node` lists
/// them (the cluster's).
pub(crate) fn records(node: &TestNode, function: &str) -> Vec<serde_json::Value> {
    let out = node.cli_ok(&["logs", function, "--json"]);
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// What the relay fixture printed it received (`received <id> ...`), per id.
pub(crate) fn received(records: &[serde_json::Value]) -> std::collections::BTreeMap<String, u32> {
    let mut seen = std::collections::BTreeMap::new();
    for r in records {
        if r["status"] != 200 {
            continue;
        }
        for line in r["stdout"].as_str().unwrap_or("").lines() {
            if let Some(id) = line
                .strip_prefix("received ")
                .and_then(|l| l.split(' ').next())
            {
                *seen.entry(id.to_string()).or_default() += 1;
            }
        }
    }
    seen
}

/// POSTs `n` events of type `ty` (ids `<prefix><i>`) to `node` in one batch.
pub(crate) fn post_events(node: &TestNode, ty: &str, prefix: &str, n: usize) {
    let batch: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({
                "specversion": "1.0", "id": format!("{prefix}{i}"), "source": "/test",
                "type": ty, "data": {"i": i}
            })
        })
        .collect();
    let r = node
        .http()
        .post(format!("{}/v1/events", node.url))
        .bearer_auth(node.token())
        .header("content-type", "application/cloudevents-batch+json")
        .json(&batch)
        .send()
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().unwrap_or_default());
}

#[test]
fn events_and_schedules_run_once_across_the_cluster() {
    let nats = NatsServer::start();
    let a = cluster_node(&nats, "a");
    let b = cluster_node(&nats, "b").with_token(a.token());
    let relay = fixture("rust-relay");
    a.cli_ok(&["deploy", relay.to_str().unwrap(), "--name", "count"]);
    // A trigger added on B is matched by A.
    b.cli_ok(&["trigger", "add", "count", "--on", "com.acme.counted"]);
    eventually("A knows B's trigger", || {
        a.cli_ok(&["trigger", "ls"])
            .contains("com.acme.counted")
            .then_some(())
    });

    // 1,000 events, half through each node: 1,000 handler runs, one per event.
    post_events(&a, "com.acme.counted", "a-", 500);
    post_events(&b, "com.acme.counted", "b-", 500);
    // The same events sent again (a client's retry) are the same deliveries.
    post_events(&a, "com.acme.counted", "a-", 10);
    let seen = eventually("1,000 runs recorded on B", || {
        let seen = received(&records(&b, "count"));
        (seen.len() >= 1000).then_some(seen)
    });
    std::thread::sleep(std::time::Duration::from_secs(3));
    let seen_a = received(&records(&a, "count"));
    let runs: u32 = seen_a.values().sum();
    assert_eq!(seen_a.len(), 1000, "every event delivered");
    assert_eq!(
        runs,
        1000,
        "and each once: {:?}",
        seen_a.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    assert_eq!(seen.len(), 1000);
    let by_node = |node: &TestNode| {
        node.api_get("/v1/jobs?function=count&limit=100000")
            .json::<Vec<serde_json::Value>>()
            .unwrap()
            .len()
    };
    let (on_a, on_b) = (by_node(&a), by_node(&b));
    eprintln!("deliveries run by A: {on_a}, by B: {on_b}");
    assert_eq!(on_a + on_b, 1000, "each node lists the jobs it ran");

    // A per-second schedule, fired by whichever scheduler is first: one
    // firing per tick over 10 s, none twice, none missing.
    a.cli_ok(&["deploy", relay.to_str().unwrap(), "--name", "tick"]);
    let out = b.cli_ok(&["schedule", "add", "tick", "* * * * * *", "--json"]);
    let schedule: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = schedule["id"].as_str().unwrap().to_string();
    std::thread::sleep(std::time::Duration::from_secs(11));
    a.cli_ok(&["schedule", "rm", &id]);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let ticks = eventually("the firings recorded on both nodes", || {
        let (ta, tb) = (
            received(&records(&a, "tick")),
            received(&records(&b, "tick")),
        );
        (ta == tb && ta.len() >= 9).then_some(ta)
    });
    let mut at: Vec<i64> = ticks
        .keys()
        .map(|k| k.rsplit('-').next().unwrap().parse().unwrap())
        .collect();
    at.sort();
    assert!(
        ticks.values().all(|n| *n == 1),
        "a tick fired twice: {ticks:?}"
    );
    let span = (at[at.len() - 1] - at[0]) / 1000 + 1;
    assert_eq!(
        span as usize,
        at.len(),
        "one firing per second, none missing: {at:?}"
    );
    assert!(
        (9..=13).contains(&at.len()),
        "{} firings in about 11 s",
        at.len()
    );
}

#[test]
fn async_jobs_of_a_node_killed_with_9_are_completed_by_another() {
    let nats = NatsServer::start();
    let lease = ["--job-lease", "3s"];
    let a = TestNode::start_with(&[
        "--nats",
        &nats.url(),
        "--node-name",
        "a",
        lease[0],
        lease[1],
    ]);
    let b = TestNode::start_with(&[
        "--nats",
        &nats.url(),
        "--node-name",
        "b",
        lease[0],
        lease[1],
    ])
    .with_token(a.token());
    let relay = fixture("rust-relay");
    a.cli_ok(&[
        "deploy",
        relay.to_str().unwrap(),
        "--name",
        "slow",
        "--env",
        "SLEEP_MS=1500",
    ]);
    eventually("B has slow", || {
        b.cli_ok(&["ls"]).contains("slow").then_some(())
    });
    let http = a.http();
    for i in 0..40 {
        let r = http
            .post(format!("{}/v1/functions/slow/invoke?async=true", a.url))
            .bearer_auth(a.token())
            .header("ce-id", format!("j-{i}"))
            .body("x")
            .send()
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    eventually("A runs some of them", || {
        let running = a
            .api_get("/v1/jobs?function=slow&state=running")
            .json::<Vec<serde_json::Value>>()
            .unwrap();
        (!running.is_empty()).then_some(())
    });
    let _kept = a.stop_keeping_dir();
    let done = eventually("B completes every job", || {
        let seen = received(&records(&b, "slow"));
        (seen.len() == 40).then_some(seen)
    });
    assert_eq!(done.len(), 40);
    let on_b = b
        .api_get("/v1/jobs?function=slow&state=succeeded&limit=1000")
        .json::<Vec<serde_json::Value>>()
        .unwrap();
    assert!(!on_b.is_empty(), "B ran some of them");
}

#[test]
fn dead_letters_are_the_clusters_and_replay_from_any_node() {
    let nats = NatsServer::start();
    let fast = ["--retry-base", "100ms"];
    let a = TestNode::start_with(&["--nats", &nats.url(), "--node-name", "a", fast[0], fast[1]]);
    let b = TestNode::start_with(&["--nats", &nats.url(), "--node-name", "b", fast[0], fast[1]])
        .with_token(a.token());
    let relay = fixture("rust-relay");
    a.cli_ok(&[
        "deploy",
        relay.to_str().unwrap(),
        "--name",
        "flaky",
        "--env",
        "STATUS=500",
    ]);
    // Set on A, applied by B.
    a.cli_ok(&["async", "flaky", "--retries", "1"]);
    eventually("B has A's retry policy", || {
        let c: serde_json::Value =
            serde_json::from_str(&b.cli_ok(&["async", "flaky", "--json"])).unwrap();
        (c["max_retries"] == 1).then_some(())
    });
    let queued: serde_json::Value =
        serde_json::from_str(&b.cli_ok(&["invoke", "flaky", "--async", "--data", "x", "--json"]))
            .unwrap();
    let id = queued["id"].as_str().unwrap().to_string();
    for node in [&a, &b] {
        let out = eventually("the dead letter listed on both nodes", || {
            let out = node.cli_ok(&["dlq", "ls", "flaky"]);
            out.contains(&id).then_some(out)
        });
        assert!(out.contains("500"), "{out}");
    }
    let dead: serde_json::Value =
        serde_json::from_str(&a.cli_ok(&["dlq", "show", &id, "--json"])).unwrap();
    assert_eq!(dead["attempts"], 2, "first attempt and one retry: {dead}");
    // Fixed, replayed from A: it runs once more, and the dead letter is
    // gone from both nodes.
    a.cli_ok(&[
        "deploy",
        relay.to_str().unwrap(),
        "--name",
        "flaky",
        "--env",
        "STATUS=200",
    ]);
    eventually("B serves the fix", || {
        let out = b.cli_ok(&["ls"]);
        out.contains("flaky").then_some(())
    });
    b.cli_ok(&["dlq", "replay", &id]);
    for node in [&a, &b] {
        eventually("no dead letters left", || {
            node.cli_ok(&["dlq", "ls"])
                .contains("no dead letters")
                .then_some(())
        });
    }
    eventually("the replay succeeded", || {
        let ok = records(&a, "flaky").iter().any(|r| r["status"] == 200);
        ok.then_some(())
    });
    let err = a.cli_err(&["dlq", "replay", &id]);
    assert!(
        err.contains("not found") || err.contains("not dead-lettered"),
        "{err}"
    );
}

#[test]
fn a_node_joining_dying_and_returning_triggers_functions() {
    let nats = NatsServer::start();
    let a = cluster_node(&nats, "a");
    let relay = fixture("rust-relay");
    a.cli_ok(&["deploy", relay.to_str().unwrap(), "--name", "watch"]);
    a.cli_ok(&["trigger", "add", "watch", "--on", "dev.verge.node.*"]);
    let b = cluster_node(&nats, "b").with_token(a.token());
    let seen = |ty: &str| {
        let got = received_types(&records(&a, "watch"));
        got.iter()
            .any(|(id, t)| t == ty && id.starts_with("b-"))
            .then_some(got)
    };
    eventually("dev.verge.node.joined for b", || {
        seen("dev.verge.node.joined")
    });
    // kill -9: no heartbeat for 10 s, then lost.
    let mut b = b;
    b.kill9();
    let got = eventually("dev.verge.node.lost for b", || seen("dev.verge.node.lost"));
    assert_eq!(
        got.iter()
            .filter(|(_, t)| t == "dev.verge.node.lost")
            .count(),
        1,
        "one lost event: {got:?}"
    );
    let b = b.kill9_and_restart();
    eventually("dev.verge.node.returned for b", || {
        seen("dev.verge.node.returned")
    });
    // It serves again without a redeploy.
    assert!(b.cli_ok(&["ls"]).contains("watch"));
}

/// (event id, event type) of what the relay received, from its output.
pub(crate) fn received_types(records: &[serde_json::Value]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for r in records {
        for line in r["stdout"].as_str().unwrap_or("").lines() {
            let mut words = line.split(' ');
            if words.next() == Some("received")
                && let (Some(id), Some(ty)) = (words.next(), words.next())
            {
                out.push((id.to_string(), ty.to_string()));
            }
        }
    }
    out
}

#[test]
fn a_version_placed_by_labels_runs_only_on_nodes_that_have_them() {
    let nats = NatsServer::start();
    let a = TestNode::start_with(&[
        "--nats",
        &nats.url(),
        "--node-name",
        "a",
        "--label",
        "site=ship-7",
        "--label",
        "region=eu",
    ]);
    let b = cluster_node(&nats, "b").with_token(a.token());
    let file = fixture("rust-hello");
    let out = b.cli_ok(&[
        "deploy",
        file.to_str().unwrap(),
        "--name",
        "placed",
        "--route",
        "/placed",
        "--place",
        "site=ship-7",
    ]);
    assert!(out.contains("version 1"), "{out}");
    eventually("A serves the version placed on it", || {
        (get(&a, "/placed").0 == 200).then_some(())
    });
    // B holds the version (it deployed it) but does not run it: it forwards
    // the request to A, which records it so.
    let id = eventually("B forwards the request to A", || {
        let (status, headers, _) = curl(&[&format!("{}/placed", b.url)]);
        (status == 200).then(|| {
            headers
                .lines()
                .find_map(|l| l.strip_prefix("verge-invocation-id:"))
                .unwrap()
                .trim()
                .to_string()
        })
    });
    let record = eventually("A records the forwarded invocation", || {
        let out = a.cli_ok(&["invocations", "--id", &id, "--json"]);
        out.contains(&id).then_some(out)
    });
    assert!(record.contains("\"forwarded_from\": \"b\""), "{record}");
    // Placed where no node is: 503, and why.
    b.cli_ok(&[
        "deploy",
        file.to_str().unwrap(),
        "--name",
        "nowhere",
        "--route",
        "/nowhere",
        "--place",
        "site=mars",
    ]);
    let (status, _, body) = curl(&[&format!("{}/nowhere", a.url)]);
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("runs on nodes labelled site=mars") && body.contains("no such node is live"),
        "{body}"
    );
    let show: serde_json::Value =
        serde_json::from_str(&a.cli_ok(&["show", "placed", "--json"])).unwrap();
    assert_eq!(show["versions"][0]["placement"][0], "site=ship-7", "{show}");
    assert!(a.cli_ok(&["show", "placed"]).contains("site=ship-7"));
    let nodes: Vec<serde_json::Value> =
        serde_json::from_str(&b.cli_ok(&["nodes", "--json"])).unwrap();
    let na = nodes.iter().find(|n| n["name"] == "a").unwrap();
    assert_eq!(na["labels"]["site"], "ship-7", "{na}");
    assert!(b.cli_ok(&["nodes"]).contains("region=eu,site=ship-7"));
    // --wait: until every node the version is placed on has it loaded.
    let out = b.cli_ok(&[
        "deploy",
        file.to_str().unwrap(),
        "--name",
        "waited",
        "--place",
        "region=eu",
        "--wait",
    ]);
    assert!(out.contains("waited@1 ready on 1 node(s)"), "{out}");
    let table: Vec<&str> = out.lines().skip_while(|l| !l.starts_with("NODE")).collect();
    assert!(table.iter().any(|l| l.starts_with("a ")), "{out}");
    assert!(!table.iter().any(|l| l.starts_with("b ")), "{out}");
    // Placed everywhere again (a new version), B runs it too: both nodes
    // report it ready, the node that did not deploy it without a request.
    let out = b.cli_ok(&[
        "deploy",
        file.to_str().unwrap(),
        "--name",
        "placed",
        "--wait",
        "--json",
    ]);
    let waited: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(waited["deploy"]["version"], 2, "{waited}");
    assert!(
        waited["ready_ms"]["a"].is_number() && waited["ready_ms"]["b"].is_number(),
        "{waited}"
    );
    eventually("B serves the version placed everywhere", || {
        (get(&b, "/placed").0 == 200).then_some(())
    });
    let err = b.cli_err(&[
        "deploy",
        file.to_str().unwrap(),
        "--name",
        "nowhere",
        "--place",
        "site=mars",
        "--wait",
    ]);
    assert!(err.contains("no node has the labels site=mars"), "{err}");
    let err = b.cli_err(&[
        "deploy",
        file.to_str().unwrap(),
        "--name",
        "x",
        "--place",
        "Site",
    ]);
    assert!(
        err.contains("invalid label") && err.contains("key=value"),
        "{err}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_verge"))
        .args(["up", "--label", "nolabel"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--label"), "{err}");
}

#[test]
fn secrets_are_the_clusters_for_nodes_that_share_the_key() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("secret.key");
    std::fs::write(&key, format!("{}\n", "ab".repeat(32))).unwrap();
    let key = key.to_str().unwrap();
    let a = TestNode::start_with(&[
        "--nats",
        &nats.url(),
        "--node-name",
        "a",
        "--secret-key-file",
        key,
    ]);
    let b = TestNode::start_with(&[
        "--nats",
        &nats.url(),
        "--node-name",
        "b",
        "--secret-key-file",
        key,
    ])
    .with_token(a.token());
    // A node with a key of its own cannot open the cluster's secrets.
    let c = cluster_node(&nats, "c").with_token(a.token());
    let file = fixture("rust-fetch");
    a.cli_ok(&[
        "deploy",
        file.to_str().unwrap(),
        "--name",
        "cfg",
        "--route",
        "/cfg",
        "--secret",
        "TOKEN",
    ]);
    let mut set = std::process::Command::new(crate::kit::VERGE)
        .args(["secret", "set", "TOKEN", "--function", "cfg"])
        .env("VERGE_SERVER", &b.url)
        .env("VERGE_TOKEN", b.token())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut set.stdin.take().unwrap(), b"cluster-wide-7d1e").unwrap();
    assert!(set.wait().unwrap().success());
    for node in [&a, &b] {
        eventually("the secret reaches the node's guests", || {
            let (status, _, body) = curl(&[&format!("{}/cfg/config/TOKEN", node.url)]);
            (status == 200 && body == b"cluster-wide-7d1e").then_some(())
        });
    }
    eventually("the node with another key says why", || {
        let (status, _, _) = curl(&[&format!("{}/cfg/config/TOKEN", c.url)]);
        (status == 404 && c.log().contains("sealed with another key")).then_some(())
    });
    assert!(!c.log().contains("cluster-wide-7d1e"));
}
