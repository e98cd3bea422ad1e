//! The replicated key-value store across real nodes (issue 6).

use std::net::SocketAddr;

use crate::kit::{Proxy, TestNode, eventually};

fn addr_of(node: &TestNode) -> SocketAddr {
    node.url.trim_start_matches("http://").parse().unwrap()
}

fn get(node: &TestNode, bucket: &str, key: &str) -> Option<String> {
    let out = node.cli(&["kv", "get", bucket, key]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn two_nodes_converge_after_a_cut_link_heals() {
    let core = TestNode::start();
    let proxy = Proxy::start(addr_of(&core));
    // The edge holds a replication token, not the core's admin token.
    let out = core.cli_ok(&["token", "create", "edge-1", "--replication", "--json"]);
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created["scope"], "replication", "{created}");
    let token = created["token"].as_str().unwrap().to_string();
    let listed = core.cli_ok(&["token", "ls"]);
    assert!(
        listed.contains("edge-1") && listed.contains("replication"),
        "{listed}"
    );
    let edge = TestNode::start_with(&["--peer", &proxy.url(), "--peer-token", &token]);
    edge.cli_ok(&["kv", "set", "shop", "greeting", "hello"]);
    edge.cli_ok(&["kv", "incr", "shop", "hits", "2"]);
    eventually("the core has the edge's writes", || {
        (get(&core, "shop", "greeting").as_deref() == Some("hello")
            && get(&core, "shop", "hits").as_deref() == Some("2"))
        .then_some(())
    });
    core.cli_ok(&["kv", "set", "shop", "from-core", "c1"]);
    eventually("the edge pulls the core's write (repair by digest)", || {
        (get(&edge, "shop", "from-core").as_deref() == Some("c1")).then_some(())
    });

    // Cut the link; both sides keep serving and writing.
    proxy.cut();
    edge.cli_ok(&["kv", "incr", "shop", "hits", "3"]);
    edge.cli_ok(&["kv", "del", "shop", "greeting"]);
    edge.cli_ok(&["kv", "set", "shop", "offline", "written at the edge"]);
    edge.cli_ok(&["kv", "set", "shop", "both", "edge"]);
    core.cli_ok(&["kv", "incr", "shop", "hits", "4"]);
    core.cli_ok(&["kv", "incr", "shop", "hits", "-1"]);
    // The core writes `both` after the edge did (the CLI calls run in order),
    // so its hybrid-clock stamp is the greater one.
    core.cli_ok(&["kv", "set", "shop", "both", "core"]);
    assert_eq!(
        get(&edge, "shop", "hits").as_deref(),
        Some("5"),
        "read-your-writes while cut"
    );
    assert_eq!(get(&core, "shop", "hits").as_deref(), Some("5"));
    assert_eq!(get(&edge, "shop", "greeting"), None);
    assert_eq!(get(&core, "shop", "greeting").as_deref(), Some("hello"));

    proxy.heal();
    for node in [&edge, &core] {
        eventually("both sides converge", || {
            (get(node, "shop", "hits").as_deref() == Some("8")
                && get(node, "shop", "greeting").is_none()
                && get(node, "shop", "offline").as_deref() == Some("written at the edge")
                && get(node, "shop", "both").as_deref() == Some("core"))
            .then_some(())
        });
    }
    let keys = core.cli_ok(&["kv", "ls", "shop"]);
    assert_eq!(
        keys.lines().collect::<Vec<_>>(),
        ["both", "from-core", "hits", "offline"]
    );
    // Kinds are fixed: a counter is not a value.
    let err = core.cli_err(&["kv", "set", "shop", "hits", "x"]);
    assert!(err.contains("fixed by its first write"), "{err}");
    // Both replicas have the delete: its tombstone is collected on both.
    for node in [&edge, &core] {
        eventually("the tombstone is collected", || {
            let st = status(node);
            (st["tombstones"] == 0 && st["collected_total"].as_u64() >= Some(1)).then_some(())
        });
    }
    let st = status(&core);
    assert_eq!(st["replicas"].as_array().map(Vec::len), Some(1), "{st}");
    assert_eq!(st["replicas"][0]["expired"], false);
    assert_eq!(
        get(&edge, "shop", "greeting"),
        None,
        "the deleted key stays deleted"
    );
    assert_eq!(get(&core, "shop", "greeting"), None);
}

fn status(node: &TestNode) -> serde_json::Value {
    serde_json::from_str(&node.cli_ok(&["--json", "kv", "status"])).unwrap()
}

#[test]
fn an_edge_cut_off_beyond_the_grace_bound_rebootstraps_and_reports_its_stale_writes() {
    let core = TestNode::start_with(&["--kv-grace", "2s"]);
    let proxy = Proxy::start(addr_of(&core));
    let edge = TestNode::start_with(&["--peer", &proxy.url(), "--peer-token", &core.token()]);
    core.cli_ok(&["kv", "set", "shop", "doomed", "v"]);
    core.cli_ok(&["kv", "incr", "shop", "hits", "5"]);
    eventually("the edge has the core's writes", || {
        (get(&edge, "shop", "doomed").as_deref() == Some("v")).then_some(())
    });
    let before = status(&edge)["node"].as_str().unwrap().to_string();

    proxy.cut();
    core.cli_ok(&["kv", "del", "shop", "doomed"]);
    edge.cli_ok(&["kv", "set", "shop", "offline", "written while cut"]);
    edge.cli_ok(&["kv", "incr", "shop", "hits", "2"]);
    eventually(
        "the core expires the silent edge and collects the tombstone",
        || {
            let st = status(&core);
            (st["replicas"][0]["expired"] == true && st["tombstones"] == 0).then_some(())
        },
    );
    assert_eq!(
        get(&edge, "shop", "offline").as_deref(),
        Some("written while cut")
    );

    proxy.heal();
    eventually("the edge re-bootstraps from the core", || {
        let st = status(&edge);
        (st["stale_total"] == 2 && st["node"].as_str() != Some(before.as_str())).then_some(())
    });
    // The edge now holds the core's state: the deleted key did not come
    // back, and its writes from beyond the grace bound were not applied.
    assert_eq!(get(&edge, "shop", "doomed"), None);
    assert_eq!(get(&core, "shop", "doomed"), None);
    assert_eq!(get(&edge, "shop", "offline"), None);
    assert_eq!(get(&edge, "shop", "hits").as_deref(), Some("5"));
    let stale = edge.cli_ok(&["kv", "stale"]);
    assert!(stale.contains("shop/offline"), "{stale}");
    assert!(stale.contains("written while cut"), "{stale}");
    assert!(stale.contains("grace"), "{stale}");
    assert!(edge.log().contains("re-bootstrapped"), "{}", edge.log());
    // It replicates normally again, under its new replica id.
    edge.cli_ok(&["kv", "incr", "shop", "hits", "1"]);
    eventually("the core gets the edge's new write", || {
        (get(&core, "shop", "hits").as_deref() == Some("6")).then_some(())
    });
    assert_eq!(get(&core, "shop", "offline"), None);
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let node = TestNode::start();
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (url, token, log) = (node.url.clone(), node.token(), acked.clone());
    let writer = std::thread::spawn(move || {
        let http = reqwest::blocking::Client::new();
        for i in 0.. {
            let r = http
                .put(format!("{url}/v1/kv/storm/k{i}"))
                .bearer_auth(&token)
                .body(format!("v{i}"))
                .send();
            match r {
                Ok(r) if r.status().is_success() => log.lock().unwrap().push(i),
                _ => break,
            }
        }
    });
    eventually("a write storm", || {
        (acked.lock().unwrap().len() >= 50).then_some(())
    });
    // kill -9 while writes are in flight.
    let node = node.kill9_and_restart();
    writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 50);
    let listed = node.cli_ok(&["kv", "ls", "storm"]);
    let present: std::collections::HashSet<&str> = listed.lines().collect();
    for i in &acked {
        assert!(
            present.contains(format!("k{i}").as_str()),
            "acknowledged write k{i} lost"
        );
    }
    let last = acked[acked.len() - 1];
    assert_eq!(
        get(&node, "storm", &format!("k{last}")),
        Some(format!("v{last}"))
    );
}

#[test]
fn guests_use_wasi_keyvalue_on_granted_buckets() {
    let node = TestNode::start();
    let f = crate::kit::fixture("rust-kv");
    let f = f.to_str().unwrap();
    node.cli_ok(&[
        "deploy",
        f,
        "--name",
        "pages",
        "--route",
        "/count",
        "--route",
        "/docs",
        "--route",
        "/open",
        "--kv-bucket",
        "views",
        "--kv-bucket",
        "docs",
    ]);
    let http = node.http();
    let call = |method: reqwest::Method, path: &str, body: &str| {
        let r = http
            .request(method, format!("{}{path}", node.url))
            .body(body.to_string())
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    for n in 1..=3 {
        assert_eq!(
            call(reqwest::Method::GET, "/count/home", ""),
            (200, format!("views {n}\n"))
        );
    }
    // The guest's counter is the node's: the CLI reads it.
    assert_eq!(get(&node, "views", "home").as_deref(), Some("3"));
    node.cli_ok(&["kv", "incr", "views", "home", "10"]);
    assert_eq!(
        call(reqwest::Method::GET, "/count/home", ""),
        (200, "views 14\n".to_string())
    );
    // A small JSON document store.
    let doc = r#"{"title":"hello","tags":["a","b"]}"#;
    assert_eq!(call(reqwest::Method::PUT, "/docs/d1", doc).0, 201);
    assert_eq!(call(reqwest::Method::PUT, "/docs/d2", "{}").0, 201);
    assert_eq!(
        call(reqwest::Method::GET, "/docs/d1", ""),
        (200, doc.to_string())
    );
    assert_eq!(
        call(reqwest::Method::GET, "/docs", ""),
        (200, "d1\nd2\n".to_string())
    );
    assert_eq!(call(reqwest::Method::DELETE, "/docs/d1", "").0, 204);
    assert_eq!(call(reqwest::Method::GET, "/docs/d1", "").0, 404);
    assert_eq!(get(&node, "docs", "d2").as_deref(), Some("{}"));
    // Buckets not granted are refused.
    let (status, body) = call(reqwest::Method::GET, "/open/secrets", "");
    assert_eq!((status, body.as_str()), (403, "access denied\n"));
    // A version without grants opens nothing.
    node.cli_ok(&["deploy", f, "--name", "pages"]);
    let (status, body) = call(reqwest::Method::GET, "/count/home", "");
    assert_eq!((status, body.as_str()), (500, "access denied\n"));
}

#[test]
fn changed_keys_emit_debounced_events() {
    let node = TestNode::start();
    let relay = crate::kit::fixture("rust-relay");
    node.cli_ok(&["deploy", relay.to_str().unwrap(), "--name", "watch"]);
    node.cli_ok(&[
        "trigger",
        "add",
        "watch",
        "--on",
        "dev.verge.kv.changed",
        "--subject-prefix",
        "prefs/",
    ]);
    // 20 quick writes to one key, and one to another.
    let http = node.http();
    for i in 0..20 {
        let r = http
            .put(format!("{}/v1/kv/prefs/theme", node.url))
            .bearer_auth(node.token())
            .body(format!("v{i}"))
            .send()
            .unwrap();
        assert!(r.status().is_success());
    }
    node.cli_ok(&["kv", "set", "prefs", "lang", "en"]);
    node.cli_ok(&["kv", "set", "other", "x", "1"]);
    let subjects = eventually("kv.changed deliveries for both keys", || {
        let jobs: Vec<serde_json::Value> = node.api_get("/v1/jobs?function=watch").json().unwrap();
        let subjects: Vec<String> = jobs
            .iter()
            .filter(|j| j["state"] == "succeeded")
            .map(|j| {
                j["payload"]["event"]["subject"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        (subjects.iter().any(|s| s == "prefs/theme") && subjects.iter().any(|s| s == "prefs/lang"))
            .then_some(subjects)
    });
    let theme = subjects.iter().filter(|s| *s == "prefs/theme").count();
    assert!(theme < 20, "20 writes gave {theme} events: not debounced");
    assert!(
        !subjects.iter().any(|s| s.starts_with("other/")),
        "{subjects:?}"
    );
}

#[test]
fn a_python_guest_counts_page_views() {
    let node = TestNode::start();
    let f = crate::kit::fixture("python-kv");
    node.cli_ok(&[
        "deploy",
        f.to_str().unwrap(),
        "--name",
        "pyviews",
        "--route",
        "/count",
        "--route",
        "/get",
        "--kv-bucket",
        "views",
    ]);
    let http = node.http();
    for n in 1..=3 {
        let body = http
            .get(format!("{}/count/about", node.url))
            .send()
            .unwrap()
            .text()
            .unwrap();
        assert_eq!(body, format!("views {n}\n"));
    }
    assert_eq!(get(&node, "views", "about").as_deref(), Some("3"));
    let r = http.get(format!("{}/get/about", node.url)).send().unwrap();
    assert_eq!(r.text().unwrap(), "3\n");
}

#[test]
fn buckets_belong_to_tenants() {
    let node = TestNode::start();
    let f = crate::kit::fixture("rust-kv");
    let f = f.to_str().unwrap();
    // The same component and bucket name in two tenants, on two hosts.
    for (name, host, tenant) in [
        ("pages-acme", "acme.test", Some("acme")),
        ("pages", "main.test", None),
    ] {
        let mut args = vec![
            "deploy",
            f,
            "--name",
            name,
            "--route",
            "/count",
            "--host",
            host,
            "--kv-bucket",
            "views",
        ];
        if let Some(t) = tenant {
            args.extend(["--tenant", t]);
        }
        node.cli_ok(&args);
    }
    let http = node.http();
    let count = |host: &str| {
        let r = http
            .get(format!("{}/count/home", node.url))
            .header("host", host)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().unwrap()
    };
    assert_eq!(count("acme.test"), "views 1\n");
    assert_eq!(count("acme.test"), "views 2\n");
    assert_eq!(
        count("main.test"),
        "views 1\n",
        "another tenant's bucket of the same name"
    );
    // The admin reaches any tenant's buckets; the default tenant without --tenant.
    assert_eq!(get(&node, "views", "home").as_deref(), Some("1"));
    assert_eq!(
        node.cli_ok(&["kv", "--tenant", "acme", "get", "views", "home"])
            .trim(),
        "2"
    );
    let listed = node.cli_ok(&["kv", "buckets"]);
    assert!(
        listed.contains("acme") && listed.contains("default"),
        "{listed}"
    );

    // A tenant token: its own tenant's buckets, through the key-value API only.
    let created: serde_json::Value = serde_json::from_str(
        &node.cli_ok(&["--json", "token", "create", "acme-app", "--tenant", "acme"]),
    )
    .unwrap();
    let token = created["token"].as_str().unwrap().to_string();
    let as_acme = |args: &[&str]| {
        std::process::Command::new(crate::kit::VERGE)
            .args(args)
            .env("VERGE_SERVER", &node.url)
            .env("VERGE_TOKEN", &token)
            .env_remove("VERGE_DATA_DIR")
            .output()
            .unwrap()
    };
    let out = as_acme(&["kv", "get", "views", "home"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");
    let out = as_acme(&["kv", "incr", "views", "home", "5"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "7");
    assert_eq!(
        count("acme.test"),
        "views 8\n",
        "the guest sees the API's write"
    );
    let listed = String::from_utf8_lossy(&as_acme(&["kv", "buckets"]).stdout).into_owned();
    assert!(
        listed.contains("acme") && !listed.contains("default"),
        "{listed}"
    );
    let out = as_acme(&["kv", "--tenant", "default", "get", "views", "home"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tenant \"acme\"") && err.contains("403"),
        "{err}"
    );
    let out = as_acme(&["ls"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key-value API (/v1/kv) only"), "{err}");

    // Tokens are listed without secrets, and removed.
    let tokens = node.cli_ok(&["token", "ls"]);
    assert!(
        tokens.contains("acme-app") && tokens.contains("(admin)"),
        "{tokens}"
    );
    assert!(!tokens.contains(&token));
    let err = node.cli_err(&["token", "rm", "admin"]);
    assert!(err.contains("last admin token"), "{err}");
    node.cli_ok(&["token", "rm", "acme-app"]);
    let out = as_acme(&["kv", "get", "views", "home"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused the token"));
}

#[test]
fn binary_values_read_back_exactly_with_accept_octet_stream() {
    let node = TestNode::start();
    let bytes: Vec<u8> = vec![0, 159, 146, 150, 255, b'\n', 7];
    let url = format!("{}/v1/kv/blobs/b1", node.url);
    let r = node
        .http()
        .put(&url)
        .bearer_auth(node.token())
        .body(bytes.clone())
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    // JSON shows text: what is not UTF-8 is replaced...
    let v: serde_json::Value = node.api_get("/v1/kv/blobs/b1").json().unwrap();
    assert_eq!(v["kind"], "bytes");
    assert_ne!(v["value"].as_str().unwrap().as_bytes(), &bytes[..]);
    // ...the raw form is the exact bytes, through the API and the CLI.
    let r = node
        .http()
        .get(&url)
        .bearer_auth(node.token())
        .header("accept", "application/octet-stream")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(r.headers()["verge-kv-kind"], "bytes");
    assert_eq!(r.bytes().unwrap().as_ref(), &bytes[..]);
    let out = node.cli(&["kv", "get", "blobs", "b1", "--raw"]);
    assert!(out.status.success());
    assert_eq!(out.stdout, bytes);
    // A counter reads as its decimal text.
    node.cli_ok(&["kv", "incr", "blobs", "n", "-3"]);
    let out = node.cli(&["kv", "get", "blobs", "n", "--raw"]);
    assert_eq!(out.stdout, b"-3");
}
