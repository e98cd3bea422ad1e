//! A request for a version this node does not run (placed on nodes with
//! other labels) goes to a live node that runs it, over the cluster's
//! request/reply (`verge_cluster::Cluster::forward`); the answer streams
//! back, and a request body streams there as it comes. The node that runs
//! it records the invocation with the forwarding
//! node's name (`forwarded_from`). A forwarded request is never forwarded
//! again. An edge cut off from the core answers 503 and says why.

use std::sync::{Arc, PoisonError, Weak};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::BodyExt;
use verge_cluster::{CHUNK, Cluster, ForwardAnswer, ForwardBody, ForwardHandler, ForwardHead};
use verge_spec::VERSION_HEADER;

use crate::error::ApiError;
use crate::state::{AppState, VersionSlot};

/// Headers of one connection, never passed on (`content-length` is: the
/// body arrives whole, streamed or not).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Time to wait for a forwarded answer's head beyond the version's limit.
const MARGIN: Duration = Duration::from_secs(5);

fn passed_on(name: &str) -> bool {
    !HOP_BY_HOP.contains(&name)
}

/// Sends `request` for `slot` (not placed here) to a node that runs it.
pub(crate) async fn forward(
    state: &Arc<AppState>,
    cluster: &Arc<Cluster>,
    slot: &VersionSlot,
    request: Request,
) -> Response {
    let v = &slot.stored;
    let what = format!(
        "function {:?} version {} runs on nodes labelled {}",
        v.function,
        v.version,
        v.placement.join(",")
    );
    if let Some(t) = cluster.uplink_cut_since() {
        let secs = t.elapsed().map(|d| d.as_secs()).unwrap_or(0);
        return ApiError::Unavailable(format!(
            "{what}, not on this edge, and this edge's link to the core is cut (for {secs} s); retry when the link is back"
        ))
        .into_response();
    }
    let key = format!("{}@{}", v.function, v.version);
    let candidates: Vec<verge_cluster::NodeRecord> = state
        .live_nodes
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter(|n| n.name != state.node_name && verge_spec::placed_on(&v.placement, &n.labels))
        .cloned()
        .collect();
    // Nodes with the code loaded first.
    let ready: Vec<&verge_cluster::NodeRecord> = candidates
        .iter()
        .filter(|n| n.loaded.contains(&key))
        .collect();
    let pool: Vec<&verge_cluster::NodeRecord> = if ready.is_empty() {
        candidates.iter().collect()
    } else {
        ready
    };
    let Some(target) = pool.get(rand::random_range(0..pool.len().max(1))) else {
        return ApiError::Unavailable(format!(
            "{what}, and no such node is live now; `verge nodes` lists the nodes and their labels"
        ))
        .into_response();
    };
    let (parts, body) = request.into_parts();
    // A small body of known size goes with the head; any other streams on
    // as it comes (the node that runs the version applies its limit).
    let body = match http_body::Body::size_hint(&body).exact() {
        Some(n) if n <= CHUNK as u64 => match body.collect().await {
            Ok(b) => ForwardBody::Whole(b.to_bytes()),
            Err(e) => {
                return ApiError::BadRequest(format!("the request body could not be read: {e}"))
                    .into_response();
            }
        },
        _ => {
            let stalling = crate::server::Stalling::new(body, state.body_timeout);
            ForwardBody::Stream(Box::pin(
                http_body_util::BodyStream::new(stalling).filter_map(|frame| async move {
                    match frame {
                        Ok(f) => f.into_data().ok().map(Ok),
                        Err(e) => Some(Err(e.to_string())),
                    }
                }),
            ))
        }
    };
    let mut headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .filter(|(k, _)| passed_on(k.as_str()) && k.as_str() != VERSION_HEADER)
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    // The version this node resolved (alias, canary, sticky): the same runs there.
    headers.push((VERSION_HEADER.to_string(), v.version.to_string()));
    let head = ForwardHead {
        method: parts.method.as_str().to_string(),
        uri: parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str().to_string())
            .unwrap_or_else(|| "/".into()),
        headers,
        from: state.node_name.clone(),
    };
    let first_byte = v
        .limits
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(state.ceilings.timeout)
        + MARGIN;
    match cluster.forward(&target.name, &head, body, first_byte).await {
        Ok((answer, stream)) => {
            let mut response = Response::new(Body::from_stream(stream.map(|c| {
                c.map_err(|e| std::io::Error::other(format!("forwarded body cut: {e}")))
            })));
            *response.status_mut() =
                http::StatusCode::from_u16(answer.status).unwrap_or(http::StatusCode::BAD_GATEWAY);
            for (k, v) in &answer.headers {
                if let (Ok(k), Ok(v)) = (
                    http::HeaderName::from_bytes(k.as_bytes()),
                    http::HeaderValue::from_str(v),
                ) && passed_on(k.as_str())
                {
                    response.headers_mut().append(k, v);
                }
            }
            response
        }
        Err(e) => {
            tracing::warn!(node = %target.name, function = %v.function, version = v.version, error = %e, "could not forward a request");
            ApiError::Unavailable(format!(
                "{what}; it was sent to one ({}), which did not answer: retry",
                target.name
            ))
            .into_response()
        }
    }
}

/// Runs requests other nodes forward here, as user requests that are not
/// forwarded again.
pub(crate) fn handler(state: Weak<AppState>) -> ForwardHandler {
    Arc::new(move |head: ForwardHead, body: verge_cluster::BodyStream| {
        let state = state.clone();
        Box::pin(async move {
            let Some(state) = state.upgrade() else {
                return refused(503, "the node is stopping");
            };
            let mut request = Request::new(Body::from_stream(body.map(|c| {
                c.map_err(|e| std::io::Error::other(format!("forwarded body cut: {e}")))
            })));
            *request.method_mut() = match http::Method::from_bytes(head.method.as_bytes()) {
                Ok(m) => m,
                Err(_) => return refused(400, "a forwarded request had no valid method"),
            };
            *request.uri_mut() = match head.uri.parse() {
                Ok(u) => u,
                Err(_) => return refused(400, "a forwarded request had no valid path"),
            };
            for (k, v) in &head.headers {
                if let (Ok(k), Ok(v)) = (
                    http::HeaderName::from_bytes(k.as_bytes()),
                    http::HeaderValue::from_str(v),
                ) {
                    request.headers_mut().append(k, v);
                }
            }
            request
                .extensions_mut()
                .insert(verge_spec::ForwardedFrom(head.from));
            let response = crate::front::route_request(state, request, false).await;
            let (parts, body) = response.into_parts();
            let answer = ForwardAnswer {
                status: parts.status.as_u16(),
                headers: parts
                    .headers
                    .iter()
                    .filter(|(k, _)| passed_on(k.as_str()))
                    .filter_map(|(k, v)| {
                        Some((k.as_str().to_string(), v.to_str().ok()?.to_string()))
                    })
                    .collect(),
            };
            let stream = body
                .into_data_stream()
                .map(|c| c.map_err(|e| e.to_string()));
            (answer, Box::pin(stream) as verge_cluster::BodyStream)
        })
    })
}

fn refused(status: u16, why: &str) -> (ForwardAnswer, verge_cluster::BodyStream) {
    (
        ForwardAnswer {
            status,
            headers: vec![("content-type".into(), "text/plain".into())],
        },
        Box::pin(futures::stream::once(futures::future::ready(Ok(
            Bytes::from(why.to_string()),
        )))),
    )
}
