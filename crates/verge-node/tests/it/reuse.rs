//! Issue 19, items 2 and 3: instances kept between requests, by choice of
//! the version (`reuse`, `prewarm`); a fresh instance per request stays
//! the default.

use std::time::Duration;

use http::Method;

use crate::harness::{TestNode, invocation_id};
use crate::wat;

async fn counts(n: &TestNode, path: &str, times: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..times {
        let a = n.get(path).await;
        assert_eq!(a.status, 200, "{path}: {}", a.text());
        out.push(a.text());
    }
    out
}

async fn health(n: &TestNode) -> serde_json::Value {
    n.api(Method::GET, "/v1/health", None).await.json()
}

#[tokio::test]
async fn one_instance_serves_up_to_n_requests_and_a_fresh_one_by_default() {
    let n = TestNode::start().await;
    n.deployed("c", wat::counter(), "route=/c&reuse=3").await;
    n.deployed("plain", wat::counter(), "route=/plain").await;
    // Three requests on one instance, then a new one.
    assert_eq!(
        counts(&n, "/c", 7).await,
        ["1", "2", "3", "1", "2", "3", "1"]
    );
    assert!(health(&n).await["instances_reused"].as_u64() >= Some(4));
    // Without `reuse`: every request on a fresh instance.
    assert_eq!(counts(&n, "/plain", 3).await, ["1", "1", "1"]);
    // `verge versions` says how each gets its instances.
    let v = n
        .api(Method::GET, "/v1/functions/c/versions", None)
        .await
        .json();
    assert_eq!(v[0]["reuse"], 3, "{v}");
    assert!(v[0].get("reuse_fell_back").is_none(), "{v}");
    let v = n
        .api(Method::GET, "/v1/functions/plain/versions", None)
        .await
        .json();
    assert!(v[0].get("reuse").is_none(), "{v}");
}

#[tokio::test]
async fn an_instance_is_thrown_away_after_a_trap_a_timeout_and_refused_memory() {
    let n = TestNode::start().await;
    n.deployed("c", wat::counter(), "route=/c&reuse=100&timeout=300ms")
        .await;
    assert_eq!(counts(&n, "/c", 2).await, ["1", "2"]);
    // A trap: the next request gets a fresh instance.
    assert_eq!(n.get("/c/t").await.status, 500);
    assert_eq!(counts(&n, "/c", 2).await, ["1", "2"]);
    // A timeout: the same.
    assert_eq!(n.get("/c/s").await.status, 504);
    assert_eq!(counts(&n, "/c", 2).await, ["1", "2"]);
    // A refused memory growth: the guest answers (3), its instance goes.
    let a = n.get("/c/m").await;
    assert_eq!((a.status.as_u16(), a.text().as_str()), (200, "3"));
    assert_eq!(counts(&n, "/c", 1).await, ["1"]);
    // A trap on a reused instance of a version whose reuse worked before
    // is the guest's failure, not reuse's: no fallback.
    let v = n
        .api(Method::GET, "/v1/functions/c/versions", None)
        .await
        .json();
    assert!(v[0].get("reuse_fell_back").is_none(), "{v}");
}

#[tokio::test]
async fn an_instance_that_left_its_response_unfinished_is_thrown_away() {
    let n = TestNode::start().await;
    n.deployed("u", wat::counter_unfinished(), "route=/x&reuse=100")
        .await;
    assert_eq!(counts(&n, "/x", 2).await, ["1", "2"]);
    // The body is never finished: as with a fresh instance, the response
    // ends when the instance goes (cut short), and the client is not left
    // waiting for the rest.
    let cut = tokio::time::timeout(Duration::from_secs(10), n.get("/x/u"))
        .await
        .expect("the unfinished response ended");
    assert_eq!(cut.status, 200);
    assert_eq!(counts(&n, "/x", 1).await, ["1"]);
}

#[tokio::test]
async fn instances_are_never_shared_between_functions_or_versions() {
    let n = TestNode::start().await;
    // The same component under two names (one loaded component), and a
    // second version of the first: three pools.
    n.deployed("a", wat::counter(), "route=/a&reuse=10").await;
    n.deployed("b", wat::counter(), "route=/b&reuse=10").await;
    assert_eq!(counts(&n, "/a", 3).await, ["1", "2", "3"]);
    assert_eq!(counts(&n, "/b", 2).await, ["1", "2"]);
    assert_eq!(counts(&n, "/a", 1).await, ["4"]);
    n.deployed("a", wat::counter(), "route=/a&reuse=10&env=V=2")
        .await;
    assert_eq!(counts(&n, "/a", 2).await, ["1", "2"]);
    // Version 1, called by number, still has its own.
    let a = n
        .send(
            http::Request::get("/a")
                .header("host", "localhost")
                .header("verge-version", "1")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(a.text(), "5");
}

#[tokio::test]
async fn a_component_that_fails_its_second_request_falls_back_to_fresh_instances() {
    let n = TestNode::start().await;
    n.deployed("once", wat::once(), "route=/once&reuse=10")
        .await;
    assert_eq!(n.get("/once").await.status, 200);
    // The second request on the same instance traps: that one fails ...
    assert_eq!(n.get("/once").await.status, 500);
    // ... and the version gets a fresh instance per request from then on.
    for _ in 0..3 {
        let a = n.get("/once").await;
        assert_eq!((a.status.as_u16(), a.text().as_str()), (200, "once"));
    }
    let v = n
        .api(Method::GET, "/v1/functions/once/versions", None)
        .await
        .json();
    assert_eq!(v[0]["reuse_fell_back"], true, "{v}");
}

#[tokio::test]
async fn metering_stays_per_request_on_a_reused_instance() {
    let n = TestNode::start().await;
    n.deployed("c", wat::counter(), "route=/c&reuse=5").await;
    let mut ids = Vec::new();
    for want in ["1", "2", "3"] {
        let a = n.get("/c").await;
        assert_eq!(a.text(), want);
        ids.push(invocation_id(&a));
    }
    // A request that asks for memory it is refused.
    let a = n.get("/c/m").await;
    assert_eq!(a.text(), "4");
    let grown = invocation_id(&a);
    let mut peaks = Vec::new();
    for id in &ids {
        let r = n.invocation(id).await;
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["outcome"], "ok", "{r}");
        // Its own response, not the instance's total.
        assert_eq!(r["response_bytes"], 1, "{r}");
        assert!(r["wall_us"].as_u64() > Some(0), "{r}");
        peaks.push(r["peak_memory_bytes"].as_u64().unwrap_or(0));
    }
    // The memory an instance holds counts for each request it serves.
    assert!(peaks.iter().all(|p| *p >= 65536), "{peaks:?}");
    // It answered, so it is a success; its instance is not kept.
    let r = n.invocation(&grown).await;
    assert_eq!(
        (r["status"].as_u64(), r["response_bytes"].as_u64()),
        (Some(200), Some(1)),
        "{r}"
    );
    assert_eq!(n.get("/c").await.text(), "1");
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 3);
}

#[tokio::test]
async fn prewarmed_instances_are_never_used_before() {
    let n = TestNode::start().await;
    n.deployed("c", wat::counter(), "route=/c&prewarm=2").await;
    // Every request gets an instance no one touched: the count is 1.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut served = 0;
    while health(&n).await["instances_prewarmed"].as_u64() < Some(5) {
        assert!(
            std::time::Instant::now() < deadline,
            "no prewarmed instance served"
        );
        assert_eq!(counts(&n, "/c", 1).await, ["1"]);
        served += 1;
        tokio::task::yield_now().await;
    }
    assert!(served >= 5);
    // Prewarm and reuse together: reused ones count, fresh ones start at 1.
    n.deployed("r", wat::counter(), "route=/r&reuse=2&prewarm=1")
        .await;
    let got = counts(&n, "/r", 4).await;
    assert_eq!(got, ["1", "2", "1", "2"]);
}

#[tokio::test]
async fn bad_reuse_and_prewarm_values_are_refused_clearly() {
    let n = TestNode::start().await;
    for (query, says) in [
        ("reuse=0", "reuse \"0\" must be a whole number from 1"),
        ("reuse=many", "reuse \"many\" must be a whole number from 1"),
        (
            "prewarm=65",
            "prewarm \"65\" must be a whole number from 0 to 64",
        ),
    ] {
        let a = n.deploy("c", wat::counter(), query).await;
        let detail = a.problem(400);
        assert!(detail.contains(says), "{query}: {detail}");
    }
}
