//! Requests forwarded between nodes over NATS request/reply: a node that
//! does not run a version (placement) sends the request to one that does.
//!
//! - Each node serves subjects `verge.fwd.<hex of its name>.>` with one
//!   subscription (so that a request's messages arrive in order). A request
//!   starts with a message to `.h`: header `Verge-Head` (JSON: method, URI,
//!   headers, the forwarding node) and the body when it is whole and small;
//!   otherwise also `Verge-Body: <token>`, and its body follows as it comes
//!   in messages to `.b.<token>`, the last one with `Verge-End`.
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
/// A forwarded request's body: whole (small, known), or streamed.
pub enum ForwardBody {
    Whole(Bytes),
    Stream(BodyStream),
}

const HEAD: &str = "Verge-Head";
const BODY: &str = "Verge-Body";
/// How long a streamed request body may wait for its next message.
const BODY_IDLE: Duration = Duration::from_secs(30);
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
    dyn Fn(
            ForwardHead,
            BodyStream,
        ) -> Pin<Box<dyn Future<Output = (ForwardAnswer, BodyStream)> + Send>>
        + Send
        + Sync,
>;

/// The subjects of node `node`: `<this>.h` for heads, `<this>.b.<token>`
/// for bodies.
fn subject_of(node: &str) -> String {
    format!("verge.fwd.{}", hex::encode(node.as_bytes()))
}

/// Request bodies being received, by token, with when they started.
type Incoming = std::collections::HashMap<
    String,
    (
        std::time::Instant,
        tokio::sync::mpsc::UnboundedSender<Result<Bytes, String>>,
    ),
>;

impl Cluster {
    /// Serves requests forwarded to node `node` with `handler` until
    /// [`Cluster::close`].
    pub fn serve_forwarded(self: &Arc<Self>, node: &str, handler: ForwardHandler) {
        let (c, subject) = (self.clone(), subject_of(node));
        let task = tokio::spawn(async move {
            loop {
                let mut sub = match c.client.subscribe(format!("{subject}.>")).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, "could not serve forwarded requests; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let bodies_at = format!("{subject}.b.");
                let mut incoming = Incoming::new();
                while let Some(msg) = sub.next().await {
                    if let Some(token) = msg.subject.as_str().strip_prefix(bodies_at.as_str()) {
                        let Some((_, tx)) = incoming.get(token) else {
                            continue;
                        };
                        let end = end_of(&msg);
                        let mut gone = !msg.payload.is_empty() && tx.send(Ok(msg.payload)).is_err();
                        match end {
                            Some(Err(e)) => {
                                let _ = tx.send(Err(e));
                                gone = true;
                            }
                            Some(Ok(())) => gone = true,
                            None => {}
                        }
                        if gone {
                            incoming.remove(token);
                        }
                        continue;
                    }
                    let (Some(reply), Some(head)) = (
                        msg.reply.clone(),
                        msg.headers
                            .as_ref()
                            .and_then(|h| h.get(HEAD))
                            .and_then(|v| serde_json::from_str::<ForwardHead>(v.as_str()).ok()),
                    ) else {
                        continue;
                    };
                    let token = msg
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(BODY))
                        .map(|v| v.as_str().to_string());
                    let request_body: BodyStream = match token {
                        None => Box::pin(futures::stream::once(std::future::ready(Ok(msg
                            .payload
                            .clone())))),
                        Some(token) => {
                            // A body whose sender went away is given up after a
                            // while (its stream ends with an error before).
                            incoming.retain(|_, (at, _)| at.elapsed() < Duration::from_secs(900));
                            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                            if !msg.payload.is_empty() {
                                let _ = tx.send(Ok(msg.payload.clone()));
                            }
                            incoming.insert(token, (std::time::Instant::now(), tx));
                            Box::pin(futures::stream::unfold(rx, |mut rx| async move {
                                match tokio::time::timeout(BODY_IDLE, rx.recv()).await {
                                    Ok(Some(item)) => Some((item, rx)),
                                    Ok(None) => None,
                                    Err(_) => Some((
                                        Err("the forwarded request body stopped coming".into()),
                                        rx,
                                    )),
                                }
                            }))
                        }
                    };
                    let (client, handler) = (c.client.clone(), handler.clone());
                    tokio::spawn(async move {
                        let (answer, body) = handler(head, request_body).await;
                        let Ok(json) = serde_json::to_string(&answer) else {
                            return;
                        };
                        let mut headers = async_nats::HeaderMap::new();
                        headers.insert(HEAD, json.as_str());
                        send_body(&client, reply, Some(headers), body).await;
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
        body: ForwardBody,
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
        let (first, rest) = match body {
            ForwardBody::Whole(b) => (b, None),
            ForwardBody::Stream(s) => {
                let token = crate::random_id();
                headers.insert(BODY, token.as_str());
                (Bytes::new(), Some((token, s)))
            }
        };
        let to = subject_of(node);
        self.client
            .publish_with_reply_and_headers(format!("{to}.h"), inbox, headers, first)
            .await
            .map_err(crate::unavailable)?;
        if let Some((token, stream)) = rest {
            // The body goes on as it comes, while the answer is awaited
            // (a guest may answer before it read all of it).
            let (client, subject) = (self.client.clone(), format!("{to}.b.{token}"));
            tokio::spawn(async move { send_body(&client, subject.into(), None, stream).await });
        }
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

/// Sends `body` to `subject` in messages of at most [`CHUNK`] bytes, the
/// first with `headers` (if any), then a last one with `Verge-End` (`ok`,
/// or why the body was cut). Stops quietly when NATS refuses a message.
async fn send_body(
    client: &async_nats::Client,
    subject: async_nats::Subject,
    mut headers: Option<async_nats::HeaderMap>,
    mut body: BodyStream,
) {
    let mut end = String::from("ok");
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(bytes) => {
                for part in bytes.chunks(CHUNK) {
                    let data = bytes.slice_ref(part);
                    let sent = match headers.take() {
                        Some(h) => client.publish_with_headers(subject.clone(), h, data).await,
                        None => client.publish(subject.clone(), data).await,
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
    let mut last = headers.unwrap_or_default();
    last.insert(END, end.as_str());
    let _ = client
        .publish_with_headers(subject, last, Bytes::new())
        .await;
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
    async fn a_forwarded_request_streams_both_bodies_in_order() {
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
            Arc::new(|head: ForwardHead, body: BodyStream| {
                Box::pin(async move {
                    // The request body, streamed or whole, read to its end.
                    let parts: Vec<Result<Bytes, String>> = body.collect().await;
                    let body: Bytes = match parts.into_iter().collect::<Result<Vec<_>, _>>() {
                        Ok(p) => p.concat().into(),
                        Err(e) => Bytes::from(format!("cut: {e}")),
                    };
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
        let head = ForwardHead {
            method: "POST".into(),
            uri: "/f?q".into(),
            headers: vec![],
            from: "a".into(),
        };
        // B serves once its subscription reached the server.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while a
            .forward(
                "b",
                &head,
                ForwardBody::Whole(Bytes::new()),
                Duration::from_secs(5),
            )
            .await
            .is_err()
        {
            assert!(std::time::Instant::now() < until, "b never served");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for i in 0..20 {
            // Every other request streams a body of 1 MiB in pieces.
            let sent: Vec<u8> = if i % 2 == 0 {
                format!("body{i}").into_bytes()
            } else {
                (0..(1 << 20)).map(|j| (j % 251) as u8).collect()
            };
            let request_body = if i % 2 == 0 {
                ForwardBody::Whole(Bytes::from(sent.clone()))
            } else {
                let pieces: Vec<Result<Bytes, String>> = sent
                    .chunks(100_000)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                ForwardBody::Stream(Box::pin(futures::stream::iter(pieces)))
            };
            let (answer, body) = a
                .forward("b", &head, request_body, Duration::from_secs(5))
                .await
                .unwrap();
            let parts: Vec<Bytes> = body.map(|c| c.unwrap()).collect().await;
            // 600 KiB came as several messages, in order.
            assert!(parts.len() >= 3, "{}", parts.len());
            assert_eq!(answer.status, 201);
            assert_eq!(answer.headers, vec![("x-a".to_string(), "1".to_string())]);
            let all: Vec<u8> = parts.concat();
            let mut expect = b"POST /f?q from a:".to_vec();
            expect.extend_from_slice(&sent);
            assert_eq!(&all[..expect.len()], &expect[..], "request {i}");
            assert_eq!(all.len(), expect.len() + (600 << 10));
        }
        // Nobody serves "c": an error at once, not a hang.
        let err = a
            .forward(
                "c",
                &head,
                ForwardBody::Whole(Bytes::new()),
                Duration::from_secs(5),
            )
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("cannot be reached"), "{err}");
    }
}
