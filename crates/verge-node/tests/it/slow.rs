//! Issue 14, item 2: slow clients cannot take the node. Read timeouts on
//! every connection, stalled bodies cut, and a per-function fair share of
//! the node's instances.

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{Method, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::TestNode;
use crate::wat;

/// Guards against a hang (not a timing check).
const HANG: Duration = Duration::from_secs(20);

fn slow_body() -> (
    http_body_util::channel::Sender<Bytes>,
    http_body_util::channel::Channel<Bytes>,
) {
    http_body_util::channel::Channel::new(1)
}

#[tokio::test]
async fn a_body_that_stalls_is_cut_and_one_that_flows_slowly_is_not() {
    let n = TestNode::with(|c| c.read_timeouts.body = Duration::from_millis(300)).await;
    n.deployed("reader", wat::read_body(), "route=/r").await;

    // Sends two bytes, then nothing: cut at the body timeout, the guest's
    // read fails and the invocation ends.
    let (mut tx, body) = slow_body();
    let sender = tokio::spawn(async move {
        tx.send_data(Bytes::from_static(b"ab")).await.ok();
        tokio::time::sleep(HANG).await;
        drop(tx);
    });
    let a = tokio::time::timeout(
        HANG,
        n.send(
            Request::post("/r")
                .header("host", "localhost")
                .body(Body::new(body))
                .unwrap(),
        ),
    )
    .await
    .expect("a stalled body held its invocation");
    assert_eq!(a.status, 500, "{}", a.text());
    assert_eq!(a.text(), "failed");
    sender.abort();

    // A body slower in total than the limit, never silent for it: read whole.
    let (mut tx, body) = slow_body();
    tokio::spawn(async move {
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if tx.send_data(Bytes::from_static(b"ab")).await.is_err() {
                return;
            }
        }
    });
    let a = n
        .send(
            Request::post("/r")
                .header("host", "localhost")
                .body(Body::new(body))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.text(), "read");
}

#[tokio::test]
async fn one_function_cannot_take_every_instance() {
    let n = TestNode::with(|c| {
        c.max_instances = 8;
        c.function_concurrency = Some(2);
        c.max_wait = Duration::from_millis(200);
    })
    .await;
    n.deployed("spin", wat::spin(), "route=/spin&timeout=2s")
        .await;
    n.deployed("hello", wat::hello(), "route=/hello").await;
    // Six spinners on one route: two run (its share), the rest wait and
    // are refused; the neighbour answers meanwhile.
    let spinners: Vec<_> = (0..6).map(|_| n.spawn_get("/spin")).collect();
    // The neighbour is asked while the share is held (a condition, not a
    // fixed wait).
    let mut held = false;
    for _ in 0..500 {
        let health = n.api(Method::GET, "/v1/health", None).await.json();
        if health["running"].as_u64() == Some(2) {
            held = true;
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(held, "the two spinners never ran");
    for _ in 0..5 {
        let a = n.get("/hello").await;
        assert_eq!(a.status, 200, "the neighbour was refused: {}", a.text());
    }
    let mut statuses = Vec::new();
    for s in spinners {
        statuses.push(s.await.unwrap().0);
    }
    statuses.sort_unstable();
    assert_eq!(
        statuses.iter().filter(|s| **s == 504).count(),
        2,
        "two spinners ran to their limit: {statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 503).count(),
        4,
        "the rest were refused at the function's share: {statuses:?}"
    );
}

#[tokio::test]
async fn a_client_that_trickles_its_headers_is_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = verge_node::NodeConfig::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.read_timeouts.header = Duration::from_millis(300);
    let node = verge_node::Node::start(config).await.unwrap();
    let addr = node.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(node.serve(async move {
        stopped.await.ok();
    }));
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Never finishes the head: the server closes the connection.
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(HANG, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // a 408 before closing is fine
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the connection stayed open");
    // A well-behaved client is served.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await.unwrap();
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    stop.send(()).ok();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn guests_beyond_the_memory_budget_wait_and_are_refused() {
    // Room for two 16 MiB instances: a third waits for one to end.
    let n = TestNode::with(|c| {
        c.memory_limit = 16 << 20;
        c.memory_budget = Some(32 << 20);
        // The budget, not the function's share, is what binds here.
        c.function_concurrency = Some(8);
        c.max_wait = Duration::from_millis(200);
    })
    .await;
    n.deployed("spin", wat::spin(), "route=/spin&timeout=2s&memory=16MiB")
        .await;
    n.deployed("hello", wat::hello(), "route=/hello&memory=16MiB")
        .await;
    let spinners: Vec<_> = (0..4).map(|_| n.spawn_get("/spin")).collect();
    let mut results = Vec::new();
    for s in spinners {
        results.push(s.await.unwrap());
    }
    let ran = results.iter().filter(|(s, _)| *s == 504).count();
    let refused: Vec<_> = results.iter().filter(|(s, _)| *s == 503).collect();
    assert_eq!(ran, 2, "{results:?}");
    assert_eq!(refused.len(), 2, "{results:?}");
    // A public route says to retry, not how the node is sized.
    assert!(refused[0].1.contains("at capacity"), "{}", refused[0].1);
    assert!(!refused[0].1.contains("memory"), "{}", refused[0].1);
    // With the budget free again, a neighbour runs.
    assert_eq!(n.get("/hello").await.status, 200);
}
