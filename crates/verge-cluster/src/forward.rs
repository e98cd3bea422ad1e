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
        let inbox = self.client.new_inbox();
        let mut sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(crate::unavailable)?;
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

/// `Some(Ok)`: the last message; `Some(Err)`: the last, the body cut.
fn end_of(m: &async_nats::Message) -> Option<Result<(), String>> {
    let end = m.headers.as_ref()?.get(END)?.as_str().to_string();
    Some(if end == "ok" { Ok(()) } else { Err(end) })
}
