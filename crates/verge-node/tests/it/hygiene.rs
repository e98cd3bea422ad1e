//! Issue 14: input hygiene, least privilege, numbers that do not wrap,
//! event loops stopped at the hop limit, and behaving like the reference
//! host where a component can tell.

use axum::body::Body;
use http::{Method, Request};
use serde_json::json;

use crate::harness::{TestNode, invocation_id};
use crate::wat;

#[tokio::test]
async fn every_api_error_is_a_problem_body_and_bearer_is_case_insensitive() {
    let n = TestNode::start().await;
    let none = n
        .send(Request::get("/v1/functions").body(Body::empty()).unwrap())
        .await;
    let detail = none.problem(401);
    assert!(detail.contains("Bearer"), "{detail}");
    assert_eq!(none.headers["www-authenticate"], "Bearer");
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let a = n
            .send(
                Request::get("/v1/functions")
                    .header("authorization", format!("{scheme} {}", n.token))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(a.status, 200, "{scheme}: {}", a.text());
    }
    let basic = n
        .send(
            Request::get("/v1/functions")
                .header("authorization", format!("Basic {}", n.token))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    basic.problem(401);
    // Errors made by axum itself: a method the endpoint does not take, a
    // body past the API's limit.
    n.api(Method::PATCH, "/v1/functions", None)
        .await
        .problem(405);
    let big = vec![b'x'; (64 << 20) + 1];
    let a = n
        .send(
            Request::put("/v1/kv/b/k")
                .header("authorization", format!("Bearer {}", n.token))
                .body(Body::from(big))
                .unwrap(),
        )
        .await;
    let detail = a.problem(413);
    assert!(detail.contains("64 MiB"), "{detail}");
    // Two Host headers: 400, on the API and on user routes.
    for path in ["/v1/functions", "/anything"] {
        let a = n
            .send(
                Request::get(path)
                    .header("authorization", format!("Bearer {}", n.token))
                    .header("host", "a.example")
                    .header("host", "b.example")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        let detail = a.problem(400);
        assert!(detail.contains("Host"), "{detail}");
    }
}

#[tokio::test]
async fn public_errors_say_nothing_of_the_control_plane() {
    let n = TestNode::start().await;
    let a = n.get("/nothing/here").await;
    let detail = a.problem(404);
    assert!(
        !detail.contains("verge") && !detail.contains("deploy"),
        "{detail}"
    );

    n.deployed("boom", wat::trap(), "route=/boom").await;
    let a = n.get("/boom").await;
    let detail = a.problem(500);
    let id = invocation_id(&a);
    assert!(detail.contains(&id), "{detail}");
    for secret in ["unreachable", "wasm", "verge", "backtrace", "boom"] {
        assert!(!detail.contains(secret), "{secret} in {detail}");
    }
    // The owner finds the cause in the invocation record...
    let record = n.invocation(&id).await;
    assert_eq!(record["outcome"], "trap", "{record}");
    let error = record["error"].as_str().unwrap_or_default();
    assert!(error.contains("unreachable"), "{record}");
    // ...and the control API tells the owner where to look.
    let a = n
        .api(Method::POST, "/v1/functions/boom/invoke", Some(json!({})))
        .await;
    let detail = a.problem(500);
    let id = invocation_id(&a);
    assert!(
        detail.contains(&format!("verge logs boom --invocation {id}")),
        "{detail}"
    );
    assert!(!detail.contains("node's log"), "{detail}");
}

#[tokio::test]
async fn route_paths_are_canonical_and_dot_segments_refused() {
    let n = TestNode::start().await;
    n.deployed("p", wat::path(), "route=/caf%c3%a9").await;
    let routes = n.api(Method::GET, "/v1/routes", None).await.json();
    assert_eq!(
        routes[0]["path"], "/caf%C3%A9",
        "stored as matched: {routes}"
    );
    for (path, seen) in [
        ("/caf%C3%A9/x", "/caf%C3%A9/x"),
        ("/caf%c3%a9?q=1", "/caf%c3%a9?q=1"),
        ("/c%61f%C3%A9", "/c%61f%C3%A9"),
    ] {
        let a = n.get(path).await;
        assert_eq!(a.status, 200, "{path}: {}", a.text());
        assert_eq!(a.text(), seen, "the guest sees the path as sent");
    }
    for bad in [
        "/caf%C3%A9/../x",
        "/caf%C3%A9/%2e%2e",
        "/caf%C3%A9/%00",
        "/caf%C3%A9/%zz",
    ] {
        n.get(bad).await.problem(400);
    }
    for bad in ["/x/../y", "/x/%2E", "/x%0d%0a", "/%76%31/functions"] {
        let q: String = form_urlencoded::byte_serialize(bad.as_bytes()).collect();
        let a = n.deploy("q", wat::hello(), &format!("route={q}")).await;
        a.problem(400);
    }
}

#[tokio::test]
async fn an_error_code_is_a_500_and_a_trap_after_the_head_is_recorded_as_a_trap() {
    let n = TestNode::start().await;
    n.deployed("err", wat::error_code(), "route=/err").await;
    n.deployed("late", wat::trap_after_head(), "route=/late")
        .await;
    let a = n.get("/err").await;
    a.problem(500);
    let record = n.invocation(&invocation_id(&a)).await;
    assert_eq!(record["outcome"], "error_response", "{record}");
    assert_eq!(record["status"], 500, "{record}");
    assert!(
        record["error"]
            .as_str()
            .unwrap_or_default()
            .contains("error code"),
        "{record}"
    );

    let a = n.get("/late").await;
    assert_eq!(a.status, 200, "the head was sent");
    let record = n.invocation(&invocation_id(&a)).await;
    assert_eq!(record["outcome"], "trap", "{record}");
}

#[tokio::test]
async fn the_bucket_named_empty_is_the_functions_default_bucket() {
    let n = TestNode::start().await;
    n.deployed("shop", wat::kv_default_bucket(), "route=/shop")
        .await;
    let a = n.get("/shop").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.text(), "stored");
    let v = n.api(Method::GET, "/v1/kv/shop/k", None).await;
    assert_eq!(v.status, 200, "{}", v.text());
    assert_eq!(v.json()["value"], "v", "{}", v.text());
}

#[tokio::test]
async fn events_with_data_base64_that_does_not_decode_are_refused() {
    let n = TestNode::start().await;
    let a = n
        .post_event(json!({"specversion":"1.0","id":"1","source":"/s","type":"t","data_base64":"not base64!"}))
        .await;
    let detail = a.problem(400);
    assert!(detail.contains("data_base64"), "{detail}");
}

#[tokio::test]
async fn a_replication_token_may_replicate_and_nothing_else() {
    let n = TestNode::start().await;
    let a = n
        .api(
            Method::POST,
            "/v1/tokens",
            Some(json!({ "name": "edge-1", "scope": "replication" })),
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.text());
    let token = a.json()["token"].as_str().unwrap().to_string();
    let ok = n
        .api_as(&token, Method::GET, "/v1/replication/status", None)
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    for (method, path) in [
        (Method::GET, "/v1/functions"),
        (Method::GET, "/v1/kv"),
        (Method::GET, "/v1/tokens"),
        (Method::POST, "/v1/events"),
    ] {
        let a = n.api_as(&token, method, path, Some(json!({}))).await;
        let detail = a.problem(403);
        assert!(detail.contains("replication"), "{detail}");
    }
    let listed = n.api(Method::GET, "/v1/tokens", None).await.json();
    let edge = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "edge-1")
        .unwrap();
    assert_eq!(edge["scope"], "replication");
    // The last full admin token cannot go, whatever replication tokens exist.
    n.api(Method::DELETE, "/v1/tokens/admin", None)
        .await
        .problem(409);
    n.api(
        Method::POST,
        "/v1/tokens",
        Some(json!({ "name": "x", "scope": "everything" })),
    )
    .await
    .problem(400);
}

#[tokio::test]
async fn counters_refuse_to_wrap() {
    let n = TestNode::start().await;
    let a = n
        .api(Method::POST, "/v1/kv/b/n/incr?by=9223372036854775807", None)
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let detail = n
        .api(Method::POST, "/v1/kv/b/n/incr?by=1", None)
        .await
        .problem(409);
    assert!(detail.contains("9223372036854775807"), "{detail}");
    let v = n.api(Method::GET, "/v1/kv/b/n", None).await.json();
    assert_eq!(v["count"], i64::MAX, "{v}");
}
