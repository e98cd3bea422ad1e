//! Issue 14, item 1: no event loop outlives the hop limit. Every event the
//! platform emits on behalf of an invocation or a job carries one hop more
//! than its cause; a job's retries are one hop, not a fan-out.

use std::time::Duration;

use http::Method;
use serde_json::{Value, json};

use crate::harness::TestNode;
use crate::wat;

const LIMIT: u32 = 4;

async fn invocations(n: &TestNode, function: &str) -> usize {
    n.node.flush_ledger();
    let a = n
        .api(
            Method::GET,
            &format!("/v1/invocations?function={function}&limit=10000"),
            None,
        )
        .await;
    a.json().as_array().map_or(0, Vec::len)
}

/// Waits until the count of `function`'s invocations stops growing for a
/// while; returns it.
async fn settled(n: &TestNode, function: &str) -> usize {
    let mut last = usize::MAX;
    let mut still = 0;
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = invocations(n, function).await;
        let jobs = n
            .api(Method::GET, "/v1/jobs?state=queued", None)
            .await
            .json();
        let running = n
            .api(Method::GET, "/v1/jobs?state=running", None)
            .await
            .json();
        let idle = jobs.as_array().is_some_and(Vec::is_empty)
            && running.as_array().is_some_and(Vec::is_empty);
        if now == last && idle {
            still += 1;
            if still >= 10 {
                return now;
            }
        } else {
            still = 0;
        }
        last = now;
    }
    panic!("{function} kept being invoked: {last} invocations and counting");
}

/// Sets a function's retries (one minute of maximum age).
async fn retries(n: &TestNode, function: &str, max_retries: u32) {
    let a = n
        .api(
            Method::PUT,
            &format!("/v1/functions/{function}/async"),
            Some(json!({ "max_retries": max_retries, "max_age_ms": 60000 })),
        )
        .await;
    assert!(a.status.is_success(), "{}", a.text());
}

async fn trigger(n: &TestNode, function: &str, ty: &str) {
    let a = n
        .api(
            Method::POST,
            "/v1/triggers",
            Some(json!({ "function": function, "type": ty })),
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.text());
}

fn dead_at_the_limit(dlq: &Value) -> bool {
    dlq.as_array().into_iter().flatten().any(|j| {
        j["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("hop limit"))
    })
}

#[tokio::test]
async fn a_function_fed_by_its_own_failures_stops_at_the_hop_limit_and_retries_do_not_fan_out() {
    let n = TestNode::with(|c| c.hop_limit = LIMIT).await;
    n.deployed("boom", wat::trap(), "route=/boom").await;
    retries(&n, "boom", 1).await;
    trigger(&n, "boom", "dev.verge.invocation.failed").await;
    assert_eq!(n.get("/boom").await.status, 500);
    let total = settled(&n, "boom").await;
    // The request (hop 0), then per hop one job of two attempts (one
    // retry) whose last failure alone is reported: invocation.failed (hop
    // 1) -> job -> invocation.failed (hop 2) -> ... -> dead at hop LIMIT.
    // An event per attempt would double the jobs at every hop.
    let bound = 1 + 2 * (LIMIT as usize - 1);
    assert!(total >= 3, "the chain did not run: {total}");
    assert!(total <= bound, "{total} invocations, more than {bound}");
    let dlq = n.api(Method::GET, "/v1/dlq", None).await.json();
    assert!(dead_at_the_limit(&dlq), "{dlq}");
}

#[tokio::test]
async fn a_function_fed_by_its_own_dead_letters_stops_at_the_hop_limit() {
    let n = TestNode::with(|c| c.hop_limit = LIMIT).await;
    n.deployed("boom", wat::trap(), "").await;
    retries(&n, "boom", 0).await;
    trigger(&n, "boom", "dev.verge.job.deadlettered").await;
    let a = n
        .api(Method::POST, "/v1/functions/boom/invoke?async=true", None)
        .await;
    assert_eq!(a.status, 202, "{}", a.text());
    let total = settled(&n, "boom").await;
    // The async job (hop 0), dead-lettered -> job.deadlettered (hop 1) ->
    // job -> ... -> dead at hop LIMIT without a delivery.
    assert!(total >= 2, "the chain did not run: {total}");
    assert!(total <= LIMIT as usize, "{total} invocations");
    let dlq = n.api(Method::GET, "/v1/dlq", None).await.json();
    assert!(dead_at_the_limit(&dlq), "{dlq}");
}

#[tokio::test]
async fn a_function_fed_by_its_own_key_value_writes_stops_at_the_hop_limit() {
    let n = TestNode::with(|c| c.hop_limit = LIMIT).await;
    n.deployed("writer", wat::kv_writer(), "route=/w&kv_bucket=b")
        .await;
    trigger(&n, "writer", "dev.verge.kv.changed").await;
    assert_eq!(n.get("/w").await.status, 200);
    let total = settled(&n, "writer").await;
    // The request (hop 0), then one delivery per hop until LIMIT.
    assert!(total >= 2, "the chain did not run: {total}");
    assert!(total <= LIMIT as usize + 1, "{total} invocations");
    let count = n.api(Method::GET, "/v1/kv/b/n", None).await.json();
    assert_eq!(count["count"], total as i64, "{count}");
    let dlq = n.api(Method::GET, "/v1/dlq", None).await.json();
    assert!(dead_at_the_limit(&dlq), "{dlq}");
}

#[tokio::test]
async fn events_whose_hop_count_does_not_parse_are_not_delivered() {
    let n = TestNode::start().await;
    n.deployed("h", wat::hello(), "").await;
    trigger(&n, "h", "com.acme.x").await;
    for (i, hops) in [json!("junk"), json!("-1"), json!(99999999999u64)]
        .iter()
        .enumerate()
    {
        let a = n
            .post_event(json!({"specversion":"1.0","id":format!("e{i}"),"source":"/s","type":"com.acme.x","vergehops":hops}))
            .await;
        assert!(a.status.is_success(), "{}", a.text());
        assert_eq!(a.json()["deliveries"], 0, "{hops}: {}", a.text());
    }
    let a = n
        .post_event(json!({"specversion":"1.0","id":"ok","source":"/s","type":"com.acme.x","vergehops":"2"}))
        .await;
    assert_eq!(a.json()["deliveries"], 1, "{}", a.text());
}
