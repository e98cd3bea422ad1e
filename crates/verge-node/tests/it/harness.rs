//! A node in process and the calls a test makes of it.

use std::time::Duration;

use axum::body::Body;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use verge_node::{InProcess, Node, NodeConfig};

/// A started node in a temporary directory, with its admin token.
pub struct TestNode {
    pub node: InProcess,
    pub token: String,
    _dir: tempfile::TempDir,
}

/// An answer, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// Asserts an RFC 9457 problem body with this status; returns its detail.
    pub fn problem(&self, status: u16) -> String {
        assert_eq!(self.status.as_u16(), status, "{}", self.text());
        assert_eq!(
            self.headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{}",
            self.text()
        );
        let v = self.json();
        assert_eq!(v["status"], status, "{v}");
        v["detail"].as_str().unwrap_or_default().to_string()
    }
}

impl TestNode {
    pub async fn start() -> TestNode {
        Self::with(|_| {}).await
    }

    pub async fn with(configure: impl FnOnce(&mut NodeConfig)) -> TestNode {
        Self::in_dir(tempfile::tempdir().unwrap(), configure).await
    }

    /// A node whose data directory is `dir` (removed with the node).
    pub async fn in_dir(
        dir: tempfile::TempDir,
        configure: impl FnOnce(&mut NodeConfig),
    ) -> TestNode {
        let mut config = NodeConfig::new(dir.path());
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.retry_base = Duration::from_millis(10);
        config.node_name = "test".into();
        configure(&mut config);
        let node = Node::start(config).await.unwrap();
        let token = std::fs::read_to_string(dir.path().join(verge_node::TOKEN_FILE))
            .unwrap()
            .trim()
            .to_string();
        TestNode {
            node: node.in_process(),
            token,
            _dir: dir,
        }
    }

    /// Sends a request as it is.
    pub async fn send(&self, request: Request<Body>) -> Answer {
        let response = self.node.router().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// A control API call with the admin token.
    pub async fn api(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        self.api_as(&self.token, method, path, body).await
    }

    /// A control API call with `token`.
    pub async fn api_as(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Answer {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"));
        let body = match body {
            Some(v) => {
                b = b.header("content-type", "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        self.send(b.body(body).unwrap()).await
    }

    /// `POST /v1/events` of one event in structured mode.
    pub async fn post_event(&self, event: Value) -> Answer {
        self.send(
            Request::post("/v1/events")
                .header("authorization", format!("Bearer {}", self.token))
                .header("content-type", "application/cloudevents+json")
                .body(Body::from(event.to_string()))
                .unwrap(),
        )
        .await
    }

    /// A request on a user route.
    pub async fn get(&self, path: &str) -> Answer {
        self.send(
            Request::builder()
                .uri(path)
                .header("host", "localhost")
                .body(Body::empty())
                .unwrap(),
        )
        .await
    }

    /// Starts a GET of a user route in its own task; yields the status and
    /// the body (for requests that run at once).
    pub fn spawn_get(&self, path: &str) -> tokio::task::JoinHandle<(u16, String)> {
        let router = self.node.router();
        let request = Request::get(path)
            .header("host", "localhost")
            .body(Body::empty())
            .unwrap();
        tokio::spawn(async move {
            let r = router.oneshot(request).await.unwrap();
            let status = r.status().as_u16();
            let body = r
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            (status, String::from_utf8_lossy(&body).into_owned())
        })
    }

    /// Deploys `component` as `name` (query: `route=/x&kv-bucket=b`...).
    pub async fn deploy(&self, name: &str, component: Vec<u8>, query: &str) -> Answer {
        let sep = if query.is_empty() { "" } else { "?" };
        self.send(
            Request::builder()
                .method(Method::POST)
                .uri(format!("/v1/functions/{name}/versions{sep}{query}"))
                .header("authorization", format!("Bearer {}", self.token))
                .header("content-type", "application/wasm")
                .body(Body::from(component))
                .unwrap(),
        )
        .await
    }

    /// Deploys and asserts it worked.
    pub async fn deployed(&self, name: &str, component: Vec<u8>, query: &str) {
        let a = self.deploy(name, component, query).await;
        assert!(a.status.is_success(), "deploy {name}: {}", a.text());
    }

    /// The invocation record of `id`, once the ledger has it.
    pub async fn invocation(&self, id: &str) -> Value {
        for _ in 0..200 {
            self.node.flush_ledger();
            let a = self
                .api(Method::GET, &format!("/v1/invocations?id={id}"), None)
                .await;
            assert_eq!(a.status, 200, "{}", a.text());
            if let Some(r) = a.json().as_array().and_then(|a| a.first()).cloned() {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("invocation {id} was never recorded");
    }
}

/// The invocation id a response carries.
pub fn invocation_id(a: &Answer) -> String {
    a.headers
        .get("verge-invocation-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no invocation id: {a:?}"))
        .to_string()
}
