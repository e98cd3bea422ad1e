//! Requests forwarded between nodes over NATS request/reply: a node that
//! does not run a version (placement) sends the request to one that does.
//!
//! - Each node serves subject `verge.fwd.<hex of its name>`. A request is
//!   one message: header `Verge-Head` (JSON: method, URI, headers, the
//!   forwarding node) and the body.
//! - The answer streams back to the request's reply subject as messages in
//!   order: the first carries `Verge-Head` (status and headers) and the
//!   first bytes of the body, the next ones more of it, and the last one
//!   `Verge-End` (empty: done, else the error that cut the body). Chunks are
//!   at most [`CHUNK`] bytes.
//!
//! Core NATS crosses the leaf links, so an edge reaches the core's nodes and
//! the other edges' this way; a cut link answers "no responders" at once.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use crate::{Cluster, ClusterError};

/// Bytes of a response body per message.
pub const CHUNK: usize = 256 << 10;
/// Largest request body a forwarded request carries (one message, below
/// the servers' `max_payload` of 16 MB that `deploy/nats/` sets).
pub const MAX_FORWARDED_BODY: usize = 8 << 20;

const HEAD: &str = "Verge-Head";
const END: &str = "Verge-End";

/// A forwarded request's head.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardHead {
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Header values that are not UTF-8 are left out.
    pub headers: Vec<(String, String)>,
    /// The node that forwarded it.
    pub from: String,
}

/// A forwarded request's answer: its head.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

/// A response body, chunk by chunk (`Err`: the body was cut, and why).
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

/// What a node does with a request forwarded to it.
pub type ForwardHandler = Arc<
    dyn Fn(ForwardHead, Bytes) -> Pin<Box<dyn Future<Output = (ForwardAnswer, BodyStream)> + Send>>
        + Send
        + Sync,
>;

fn subject_of(node: &str) -> String {
    format!("verge.fwd.{}", hex::encode(node.as_bytes()))
}

impl Cluster {
    /// Serves requests forwarded to node `node` with `handler` until
    /// [`Cluster::close`].
    pub fn serve_forwarded(self: &Arc<Self>, node: &str, handler: ForwardHandler) {
        let (c, subject) = (self.clone(), subject_of(node));
        let task = tokio::spawn(async move {
            loop {
                let mut sub = match c.client.subscribe(subject.clone()).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, "could not serve forwarded requests; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                while let Some(msg) = sub.next().await {
                    let (Some(reply), Some(head)) = (
                        msg.reply.clone(),
                        msg.headers
                            .as_ref()
                            .and_then(|h| h.get(HEAD))
                            .and_then(|v| serde_json::from_str::<ForwardHead>(v.as_str()).ok()),
                    ) else {
                        continue;
                    };
                    let (client, handler) = (c.client.clone(), handler.clone());
                    tokio::spawn(async move {
                        let (answer, mut body) = handler(head, msg.payload).await;
                        let mut headers = async_nats::HeaderMap::new();
                        let Ok(json) = serde_json::to_string(&answer) else {
                            return;
                        };
                        headers.insert(HEAD, json.as_str());
                        let mut pending = Some(headers);
                        let mut end = String::new();
                        while let Some(chunk) = body.next().await {
                            match chunk {
                                Ok(bytes) => {
                                    for part in bytes.chunks(CHUNK) {
                                        let data = bytes.slice_ref(part);
                                        let sent = match pending.take() {
                                            Some(h) => {
                                                client
                                                    .publish_with_headers(reply.clone(), h, data)
                                                    .await
                                            }
                                            None => client.publish(reply.clone(), data).await,
                                        };
                                        if sent.is_err() {
                                            return;
                                        }
                                    }
                                }
                                Err(e) => {
                                    end = if e.is_empty() {
                                        "the body failed".into()
                                    } else {
                                        e
                                    };
                                    break;
                                }
                            }
                        }
                        let mut last = pending.unwrap_or_default();
                        last.insert(END, if end.is_empty() { "ok" } else { end.as_str() });
                        let _ = client.publish_with_headers(reply, last, Bytes::new()).await;
                        let _ = client.flush().await;
                    });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        crate::lock(&self.tasks).push(task);
    }

    /// Forwards a request to node `node`: its answer's head within
    /// `first_byte` (the function's time limit), then its body as it comes.
    pub async fn forward(
        &self,
        node: &str,
        head: &ForwardHead,
        body: Bytes,
        first_byte: Duration,
    ) -> Result<(ForwardAnswer, BodyStream), ClusterError> {
        let replies = self
            .replies
            .get_or_try_init(|| Replies::start(self))
            .await?
            .clone();
        let (inbox, mut sub) = replies.wait();
        let mut headers = async_nats::HeaderMap::new();
        let json = serde_json::to_string(head).map_err(|e| ClusterError::Other(e.to_string()))?;
        headers.insert(HEAD, json.as_str());
        self.client
            .publish_with_reply_and_headers(subject_of(node), inbox, headers, body)
            .await
            .map_err(crate::unavailable)?;
        let first = match tokio::time::timeout(first_byte, sub.next()).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(ClusterError::Unavailable(format!(
                    "node {node} did not answer"
                )));
            }
            Err(_) => {
                return Err(ClusterError::Unavailable(format!(
                    "node {node} did not answer within {} s",
                    first_byte.as_secs()
                )));
            }
        };
        if first.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            return Err(ClusterError::Unavailable(format!(
                "node {node} cannot be reached (no responders)"
            )));
        }
        let answer = first
            .headers
            .as_ref()
            .and_then(|h| h.get(HEAD))
            .and_then(|v| serde_json::from_str::<ForwardAnswer>(v.as_str()).ok())
            .ok_or_else(|| ClusterError::Other(format!("node {node} answered without a head")))?;
        let done = end_of(&first);
        let first_bytes = first.payload;
        let stream = futures::stream::unfold(
            (Some(sub), done, Some(first_bytes)),
            |(sub, done, first)| async move {
                if let Some(b) = first
                    && !b.is_empty()
                {
                    return Some((Ok(b), (sub, done, None)));
                }
                match done {
                    Some(Ok(())) => return None,
                    Some(Err(e)) => return Some((Err(e), (None, Some(Ok(())), None))),
                    None => {}
                }
                let mut sub = sub?;
                // A body that stops coming is cut after the idle limit.
                match tokio::time::timeout(Duration::from_secs(30), sub.next()).await {
                    Ok(Some(m)) => {
                        let done = end_of(&m);
                        if m.payload.is_empty() {
                            match done {
                                Some(Err(e)) => Some((Err(e), (None, Some(Ok(())), None))),
                                _ => None,
                            }
                        } else {
                            Some((Ok(m.payload), (Some(sub), done, None)))
                        }
                    }
                    Ok(None) => Some((
                        Err("the forwarding link closed".into()),
                        (None, Some(Ok(())), None),
                    )),
                    Err(_) => Some((
                        Err("the forwarded body stopped coming".into()),
                        (None, Some(Ok(())), None),
                    )),
                }
            },
        );
        Ok((answer, Box::pin(stream)))
    }
}

/// The answers to this node's forwarded requests: one subscription to
/// `<inbox>.*` for all of them (a subscription per request would send its
/// interest across every route and leaf link, twice per request), each
/// request's messages handed to it by its token.
pub(crate) struct Replies {
    prefix: String,
    waiting: std::sync::Mutex<
        std::collections::HashMap<String, tokio::sync::mpsc::UnboundedSender<async_nats::Message>>,
    >,
}

impl Replies {
    async fn start(cluster: &Cluster) -> Result<Arc<Replies>, ClusterError> {
        let prefix = cluster.client.new_inbox();
        let mut sub = cluster
            .client
            .subscribe(format!("{prefix}.*"))
            .await
            .map_err(crate::unavailable)?;
        let replies = Arc::new(Replies {
            prefix,
            waiting: Default::default(),
        });
        let r = Arc::downgrade(&replies);
        let task = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let Some(r) = r.upgrade() else { break };
                let token = m
                    .subject
                    .as_str()
                    .strip_prefix(r.prefix.as_str())
                    .and_then(|t| t.strip_prefix('.'))
                    .unwrap_or_default()
                    .to_string();
                if let Some(tx) = crate::lock(&r.waiting).get(&token) {
                    let _ = tx.send(m);
                }
            }
        });
        crate::lock(&cluster.tasks).push(task);
        Ok(replies)
    }

    /// A reply subject, and what arrives on it until the waiter is dropped.
    fn wait(self: &Arc<Self>) -> (String, Waiter) {
        let token = crate::random_id();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        crate::lock(&self.waiting).insert(token.clone(), tx);
        (
            format!("{}.{token}", self.prefix),
            Waiter {
                replies: self.clone(),
                token,
                rx,
            },
        )
    }
}

/// One forwarded request's answer messages.
pub(crate) struct Waiter {
    replies: Arc<Replies>,
    token: String,
    rx: tokio::sync::mpsc::UnboundedReceiver<async_nats::Message>,
}

impl Waiter {
    async fn next(&mut self) -> Option<async_nats::Message> {
        self.rx.recv().await
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        crate::lock(&self.replies.waiting).remove(&self.token);
    }
}

/// `Some(Ok)`: the last message; `Some(Err)`: the last, the body cut.
fn end_of(m: &async_nats::Message) -> Option<Result<(), String>> {
    let end = m.headers.as_ref()?.get(END)?.as_str().to_string();
    Some(if end == "ok" { Ok(()) } else { Err(end) })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::testkit::NatsServer;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_forwarded_request_streams_its_answer_back_in_order() {
        let nats = NatsServer::start();
        let opts = |node: &str| crate::ClusterOptions {
            url: nats.url(),
            creds: None,
            domain: None,
            node: node.into(),
            replicas: None,
            job_lease: None,
            site: None,
        };
        let a = Cluster::connect(&opts("a")).await.unwrap();
        let b = Cluster::connect(&opts("b")).await.unwrap();
        b.serve_forwarded(
            "b",
            Arc::new(|head: ForwardHead, body: Bytes| {
                Box::pin(async move {
                    let chunks: Vec<Result<Bytes, String>> = vec![
                        Ok(Bytes::from(format!(
                            "{} {} from {}:",
                            head.method, head.uri, head.from
                        ))),
                        Ok(body),
                        Ok(Bytes::from(vec![b'x'; 600 << 10])),
                    ];
                    (
                        ForwardAnswer {
                            status: 201,
                            headers: vec![("x-a".into(), "1".into())],
                        },
                        Box::pin(futures::stream::iter(chunks)) as BodyStream,
                    )
                })
            }),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let head = ForwardHead {
            method: "POST".into(),
            uri: "/f?q".into(),
            headers: vec![],
            from: "a".into(),
        };
        for i in 0..20 {
            let (answer, body) = a
                .forward(
                    "b",
                    &head,
                    Bytes::from(format!("body{i}")),
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
            let parts: Vec<Bytes> = body.map(|c| c.unwrap()).collect().await;
            // 600 KiB came as several messages, in order.
            assert!(parts.len() >= 3, "{}", parts.len());
            assert_eq!(answer.status, 201);
            assert_eq!(answer.headers, vec![("x-a".to_string(), "1".to_string())]);
            let all: Vec<u8> = parts.concat();
            let expect = format!("POST /f?q from a:body{i}");
            assert_eq!(&all[..expect.len()], expect.as_bytes());
            assert_eq!(all.len(), expect.len() + (600 << 10));
        }
        // Nobody serves "c": an error at once, not a hang.
        let err = a
            .forward("c", &head, Bytes::new(), Duration::from_secs(5))
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("cannot be reached"), "{err}");
    }
}
