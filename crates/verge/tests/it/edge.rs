//! Edge nodes (`verge edge`): a core node on a hub server (JetStream domain
//! `hub`), and edges beside their own leaf servers (domain `edge-<site>`)
//! linked to the hub through the kit's proxy, which cuts, heals and delays
//! the link. Real `nats-server` and `verge` processes.

use verge_cluster::testkit::{NatsServer, Proxy};

use crate::cluster::{
    RequestLoop, cluster_node, get, invocations, post_events, received, received_types, records,
};
use crate::kit::{TestNode, eventually, fixture};

/// A site: its leaf server, the proxy between it and the hub, its edge node.
struct Site {
    proxy: Proxy,
    _leaf: NatsServer,
    node: TestNode,
}

fn site(hub: &NatsServer, name: &str, token: String) -> Site {
    let proxy = Proxy::start(hub.leaf_addr());
    let leaf = NatsServer::leaf(&format!("edge-{name}"), proxy.addr);
    let node = TestNode::start_edge(&[
        "--nats",
        &leaf.url(),
        "--site",
        name,
        "--node-name",
        &format!("edge-{name}"),
    ])
    .with_token(token);
    Site {
        proxy,
        _leaf: leaf,
        node,
    }
}

fn nodes(node: &TestNode) -> Vec<serde_json::Value> {
    serde_json::from_str(&node.cli_ok(&["nodes", "--json"])).unwrap()
}

fn link_of(node: &TestNode, name: &str) -> String {
    nodes(node)
        .iter()
        .find(|n| n["name"] == name)
        .map(|n| n["link"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn kv_get(node: &TestNode, key: &str) -> Option<String> {
    let out = node.cli(&["kv", "get", "shop", key]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn an_edge_serves_through_a_cut_link_restarts_cut_off_and_catches_up() {
    let hub = NatsServer::hub();
    let core = cluster_node(&hub, "core");
    let relay = fixture("rust-relay");
    core.cli_ok(&["deploy", relay.to_str().unwrap(), "--name", "watch"]);
    core.cli_ok(&["trigger", "add", "watch", "--on", "dev.verge.node.*"]);
    core.cli_ok(&["trigger", "add", "watch", "--on", "com.shop.sale"]);
    let one = site(&hub, "one", core.token());
    let two = site(&hub, "two", core.token());

    // 1. Deployed at the core, served by both edges; --wait reports each
    // node ready with its time.
    let hello = fixture("rust-hello");
    let out = core.cli_ok(&[
        "deploy",
        hello.to_str().unwrap(),
        "--name",
        "hello",
        "--route",
        "/hello",
        "--wait",
    ]);
    for n in ["core", "edge-one", "edge-two"] {
        assert!(out.contains(n), "--wait names {n}: {out}");
    }
    assert!(out.contains(" ms"), "{out}");
    assert_eq!(get(&one.node, "/hello"), (200, Some(1)));
    assert_eq!(get(&two.node, "/hello"), (200, Some(1)));
    // A version placed on site one only: counted below, records from the
    // edge alone.
    let out = core.cli_ok(&[
        "deploy",
        hello.to_str().unwrap(),
        "--name",
        "counted",
        "--route",
        "/counted",
        "--place",
        "site=one",
        "--wait",
    ]);
    assert!(
        out.contains("edge-one") && !out.contains("edge-two"),
        "{out}"
    );
    // 6. A request at edge-one for a function placed on site two only is
    // forwarded there (body and headers both ways, 1 MiB byte for byte), and
    // the record says so.
    let echo = fixture("rust-echo");
    core.cli_ok(&[
        "deploy",
        echo.to_str().unwrap(),
        "--name",
        "far",
        "--route",
        "/far",
        "--place",
        "site=two",
        "--wait",
    ]);
    let sent = crate::kit::noise(1 << 20, 7);
    let r = eventually("edge-one forwards /far to edge-two", || {
        let r = one
            .node
            .http()
            .post(format!("{}/far/x?q=1", one.node.url))
            .header("x-trace", "abc")
            .body(sent.clone())
            .send()
            .ok()?;
        (r.status() == 200).then_some(r)
    });
    assert_eq!(r.headers()["x-echo-path"], "/far/x?q=1");
    assert_eq!(r.headers()["x-trace"], "abc");
    let id = r.headers()["verge-invocation-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        r.bytes().unwrap().as_ref(),
        &sent[..],
        "the body came back whole"
    );
    let logged = eventually("edge-two records the forwarded invocation", || {
        let out = two
            .node
            .cli(&["logs", "far", "--invocation", &id, "--json"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.contains(&id).then_some(text)
    });
    assert!(
        logged.contains("\"forwarded_from\":\"edge-one\""),
        "{logged}"
    );

    let listed = nodes(&core);
    let e1 = listed.iter().find(|n| n["name"] == "edge-one").unwrap();
    assert_eq!(e1["role"], "edge", "{e1}");
    assert_eq!(e1["labels"]["site"], "one", "{e1}");
    assert_eq!(e1["link"], "connected", "{e1}");
    let table = core.cli_ok(&["nodes"]);
    assert!(
        table.contains("LAG") && table.contains("site=one"),
        "{table}"
    );

    // 2. The link is cut for 60 s: the edge serves under a request loop with
    // no failure, from what it had.
    core.cli_ok(&["kv", "set", "shop", "old", "x"]);
    eventually("edge-one has the key set before the cut", || {
        kv_get(&one.node, "old").is_some().then_some(())
    });
    one.proxy.cut();
    let cut_at = std::time::Instant::now();
    eventually("edge-one sees its link cut", || {
        link_of(&one.node, "edge-one")
            .starts_with("cut since")
            .then_some(())
    });
    let requests = RequestLoop::start(&[&one.node], "/hello");
    // Events emitted at the cut edge are kept there (the POST is accepted).
    post_events(&one.node, "com.shop.sale", "sale-", 5);
    // Key-value writes on both sides of the cut, on the same keys.
    core.cli_ok(&["kv", "incr", "shop", "hits", "2"]);
    core.cli_ok(&["kv", "set", "shop", "colour", "red"]);
    core.cli_ok(&["kv", "set", "shop", "gone", "x"]);
    one.node.cli_ok(&["kv", "incr", "shop", "hits", "5"]);
    one.node.cli_ok(&["kv", "incr", "shop", "hits", "-1"]);
    one.node.cli_ok(&["kv", "set", "shop", "from-edge", "e1"]);
    one.node.cli_ok(&["kv", "del", "shop", "old"]);
    std::thread::sleep(std::time::Duration::from_millis(20));
    one.node.cli_ok(&["kv", "set", "shop", "colour", "blue"]);
    assert_eq!(
        kv_get(&one.node, "hits").as_deref(),
        Some("4"),
        "the edge counts locally"
    );
    let mut counted = 0;
    for _ in 0..25 {
        assert_eq!(get(&one.node, "/counted").0, 200);
        counted += 1;
    }
    // A v2 at the core meanwhile: the other edge gets it, the cut one not.
    let out = core.cli_ok(&[
        "deploy",
        hello.to_str().unwrap(),
        "--name",
        "hello",
        "--env",
        "V=2",
    ]);
    assert!(out.contains("version 2"), "{out}");
    eventually("edge-two serves v2", || {
        (get(&two.node, "/hello").1 == Some(2)).then_some(())
    });
    assert_eq!(get(&one.node, "/hello"), (200, Some(1)));
    // A request forwarded from the cut edge: 503, and why.
    let (status, _, body) = crate::kit::curl(&[&format!("{}/far", one.node.url)]);
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("link to the core is cut"), "{body}");
    // A write at the cut edge is refused with the reason.
    let err = one.node.cli_err(&["alias", "set", "hello", "beta", "1"]);
    assert!(err.contains("link to the core is cut"), "{err}");
    // The core sees the edge cut (no heartbeat) and emits node.lost.
    eventually("the core shows edge-one cut", || {
        link_of(&core, "edge-one")
            .starts_with("cut since")
            .then_some(())
    });
    let lost = |ty: &str| {
        received_types(&records(&core, "watch"))
            .iter()
            .any(|(id, t)| t == ty && id.starts_with("edge-one-"))
            .then_some(())
    };
    eventually("dev.verge.node.lost for edge-one", || {
        lost("dev.verge.node.lost")
    });
    // The cut lasts 60 s (a server's mirror retries with a backoff that grows
    // over such a cut: the catch-up must not depend on it).
    std::thread::sleep(std::time::Duration::from_secs(60).saturating_sub(cut_at.elapsed()));
    let (ok, failed) = requests.stop();
    assert!(ok > 0, "the loop ran");
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed at the cut edge",
        ok + failed
    );

    // 3. kill -9 while cut: it starts again from its mirrors, without the core.
    let restarted = one.node.kill9_and_restart();
    assert_eq!(get(&restarted, "/hello"), (200, Some(1)));
    for _ in 0..5 {
        assert_eq!(get(&restarted, "/counted").0, 200);
        counted += 1;
    }

    // Heal: v2 arrives, the edge's records from the cut reach the core
    // once each, and the core sees it return.
    one.proxy.heal();
    eventually("edge-one serves v2 after the heal", || {
        (get(&restarted, "/hello").1 == Some(2)).then_some(())
    });
    eventually(
        "edge-one's invocations of counted reach the core, once each",
        || (invocations(&core, "counted") == Some(counted)).then_some(()),
    );
    assert_eq!(invocations(&restarted, "counted"), Some(counted));
    eventually("dev.verge.node.returned for edge-one", || {
        lost("dev.verge.node.returned")
    });
    // Key-value: identical everywhere, counters exact, the later write wins.
    core.cli_ok(&["kv", "del", "shop", "gone"]);
    for n in [&core, &restarted, &two.node] {
        eventually("the key-value store converges on every node", || {
            (kv_get(n, "hits").as_deref() == Some("6")
                && kv_get(n, "colour").as_deref() == Some("blue")
                && kv_get(n, "from-edge").as_deref() == Some("e1")
                && kv_get(n, "gone").is_none()
                && kv_get(n, "old").is_none())
            .then_some(())
        });
    }
    eventually("the core shows edge-one connected", || {
        (link_of(&core, "edge-one") == "connected").then_some(())
    });
    // The events emitted at the edge during the cut triggered the core's
    // function, each once.
    let sales = |node: &TestNode| {
        received(&records(node, "watch"))
            .into_iter()
            .filter(|(id, _)| id.starts_with("sale-"))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    eventually("the edge's events reach the core", || {
        (sales(&core).len() == 5).then_some(())
    });
    // Still exactly once a moment later (sourcing does not repeat).
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(invocations(&core, "counted"), Some(counted));
    assert!(sales(&core).values().all(|n| *n == 1), "{:?}", sales(&core));
}

/// Functions (with their live version) and routes (path -> function) as
/// `node` lists them.
fn deployed(node: &TestNode) -> (Vec<String>, Vec<(String, String)>) {
    let ls: serde_json::Value = serde_json::from_str(&node.cli_ok(&["ls", "--json"])).unwrap();
    let functions = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();
    let routes: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["routes", "--json"])).unwrap();
    let routes = routes
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["path"].as_str().unwrap().to_string(),
                r["function"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (functions, routes)
}

#[test]
fn a_core_node_killed_in_the_middle_of_a_deploy_leaves_it_whole_or_absent() {
    let hub = NatsServer::hub();
    let core = TestNode::start_with_env(
        &["--nats", &hub.url(), "--node-name", "core"],
        &[("VERGE_TEST_CRASH_MID_WRITE", "1")],
    );
    let one = site(&hub, "one", core.token());
    // The deploy writes its function and its route: the node dies (abort,
    // as kill -9) once the first of them reached the servers.
    let hello = fixture("rust-hello");
    let out = core.cli(&[
        "deploy",
        hello.to_str().unwrap(),
        "--name",
        "half",
        "--route",
        "/half",
    ]);
    assert!(!out.status.success(), "the deploy was to die with its node");
    let core = core.kill9_and_restart();
    let whole = |node: &TestNode| {
        let (functions, routes) = deployed(node);
        for f in &functions {
            assert!(
                routes
                    .iter()
                    .any(|(p, rf)| rf == f && *p == format!("/{f}")),
                "{f} has no route: half a deploy ({routes:?})"
            );
        }
        for (p, f) in &routes {
            assert!(
                functions.contains(f),
                "route {p} names {f}, which is not deployed"
            );
        }
        functions
    };
    assert!(
        whole(&core).is_empty(),
        "nothing of the deploy was acknowledged or stored"
    );
    assert!(whole(&one.node).is_empty());
    // The node and the cluster take the same deploy again.
    core.deploy("rust-hello", "half", "/half");
    eventually("the edge serves the deploy made again", || {
        (get(&one.node, "/half").0 == 200).then_some(())
    });
    assert_eq!(whole(&one.node), vec!["half".to_string()]);
}
