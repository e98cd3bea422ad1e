//! The public front: user routes to invocations.
//!
//! User routes are public (their auth is the function's business). The
//! request reaches the guest with its method, full path, query, headers and a
//! streamed body; the guest's response streams back with the invocation id in
//! a `verge-invocation-id` header.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Uri, header};
use rand::RngCore;
use verge_host::{Function, InvokeError};
use verge_spec::{AliasTarget, INVOCATION_ID_HEADER, Outcome, VERSION_HEADER};

use crate::error::ApiError;
use crate::state::{AppState, Refused, Selector, Unresolved, VersionSlot, sticky_hash};

/// A new invocation id: 48 bits of unix milliseconds then 80 random bits,
/// hex (32 characters), and its bytes. Time-ordered, so the ledger's index
/// grows at its end. A trace that starts at an invocation takes its id as
/// trace id (random where W3C asks for it): the ledger finds such a trace's
/// root by its primary key and indexes only invocations caused by others.
pub(crate) fn new_invocation_id() -> (String, [u8; 16]) {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    rand::rng().fill_bytes(&mut bytes[6..]);
    (hex::encode(bytes), bytes)
}

fn request_host(request: &Request) -> Option<String> {
    let raw = request.uri().host().map(str::to_string).or_else(|| {
        request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    })?;
    Some(strip_port(&raw).to_ascii_lowercase())
}

/// `example.com:8080` -> `example.com`; `[::1]:8080` -> `[::1]`.
fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// Answers 503 with `Retry-After` and records the refusal in the ledger.
fn refuse(
    state: &AppState,
    function: &Function,
    id: String,
    refused: Refused,
    waited: std::time::Duration,
    public: bool,
    trace: verge_spec::InvocationTrace,
) -> Response {
    let detail = match refused {
        // The internet learns that it should retry, not how the node is
        // sized.
        _ if public => "the function is at capacity; retry after the Retry-After delay".to_string(),
        Refused::QueueFull(depth) => format!(
            "function {:?} is at its concurrency limit and {depth} requests are already waiting; retry after the Retry-After delay",
            function.name
        ),
        Refused::WaitedTooLong(wait) => format!(
            "function {:?} found no free slot (its concurrency, the node's instances or the node's memory budget for guests) for {wait:?}; retry after the Retry-After delay",
            function.name
        ),
    };
    record_rejection(state, function, &id, Outcome::Capacity, waited, trace);
    ApiError::Overloaded { detail, id }.into_response()
}

/// Records an invocation refused before its guest ran (`outcome`: `capacity`
/// or `request_too_large`), so that the ledger shows every answer given.
fn record_rejection(
    state: &AppState,
    function: &Function,
    id: &str,
    outcome: Outcome,
    waited: std::time::Duration,
    trace: verge_spec::InvocationTrace,
) {
    state.ledger.record(verge_spec::UsageRecord {
        invocation_id: id.to_string(),
        function: function.name.clone(),
        version: function.version,
        started_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0),
        wall_us: u64::try_from(waited.as_micros()).unwrap_or(u64::MAX),
        status: outcome.status(),
        outcome,
        trace: Some(trace),
        ..Default::default()
    });
}

/// The value of cookie `name` in the request's Cookie headers.
fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// The sticky key of a request for an alias that has one.
pub(crate) fn sticky_key(headers: &http::HeaderMap, target: &AliasTarget) -> Option<u64> {
    if let Some(h) = &target.sticky_header
        && let Some(v) = headers.get(h.as_str())
    {
        return Some(sticky_hash(v.as_bytes()));
    }
    if let Some(c) = &target.sticky_cookie
        && let Some(v) = cookie(headers, c)
    {
        return Some(sticky_hash(v.as_bytes()));
    }
    None
}

/// Finds the version for a request and loads it, or says why not.
pub(crate) async fn resolve(
    state: &Arc<AppState>,
    function: &str,
    selector: Selector<'_>,
    headers: &http::HeaderMap,
) -> Result<(Arc<VersionSlot>, Function, u64), ApiError> {
    let described = match &selector {
        Selector::Alias(a) => format!("alias {a:?}"),
        Selector::Version(v) => format!("version {v}"),
    };
    let slot = state
        .resolve(function, selector, |t| sticky_key(headers, t))
        .map_err(|why| {
            ApiError::NotFound(match why {
                Unresolved::Function => format!(
                    "function {function:?} is not deployed on this node; deploy it with `verge deploy FILE --name {function}`"
                ),
                Unresolved::Alias => format!(
                    "function {function:?} has no {described}; list its aliases with `verge alias ls {function}`"
                ),
                Unresolved::Version => format!(
                    "function {function:?} has no {described}; list its versions with `verge versions {function}`"
                ),
            })
        })?;
    // A version placed elsewhere is neither loaded nor run here.
    if !verge_spec::placed_on(&slot.stored.placement, &state.labels) {
        let labels: Vec<String> = state
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        return Err(ApiError::Unavailable(format!(
            "function {function:?} version {} is placed on nodes labelled {}; this node ({}) does not run it: send the request to one of those (`verge nodes` lists each node's labels)",
            slot.stored.version,
            slot.stored.placement.join(","),
            if labels.is_empty() {
                "no labels".to_string()
            } else {
                labels.join(",")
            }
        )));
    }
    let loading = !slot.is_loaded();
    let started = std::time::Instant::now();
    let f = state.load(&slot).await?;
    let load_us = if loading {
        u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
    } else {
        0
    };
    Ok((slot, f, load_us))
}

/// What caused an invocation: the span it is a child of, its trigger, and
/// the time it spent before admission (loading code, queued as a job).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cause {
    pub parent: Option<verge_spec::SpanContext>,
    pub trigger: verge_spec::Trigger,
    pub load_us: u64,
    pub queue_wait_us: u64,
}

impl Cause {
    /// An HTTP request's: its `traceparent` header, if valid (else the
    /// invocation starts a trace, as W3C asks of an invalid one).
    pub(crate) fn http(headers: &http::HeaderMap, load_us: u64) -> Cause {
        Cause {
            parent: traceparent(headers),
            trigger: verge_spec::Trigger::Http,
            load_us,
            queue_wait_us: 0,
        }
    }
}

/// The span context of a request's `traceparent` header, if valid.
pub(crate) fn traceparent(headers: &http::HeaderMap) -> Option<verge_spec::SpanContext> {
    headers
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(verge_spec::SpanContext::parse)
}

/// A new invocation's trace, a child of `parent` (none: a new trace whose
/// id is the invocation's, sampled with probability `sample`; a child
/// keeps its parent's sampled flag).
pub(crate) fn start_trace(
    parent: Option<verge_spec::SpanContext>,
    invocation: [u8; 16],
    sample: f64,
) -> verge_spec::InvocationTrace {
    let mut ids = [0u8; 24];
    ids[..16].copy_from_slice(&invocation);
    let mut rng = rand::rng();
    rng.fill_bytes(&mut ids[16..]);
    let mut trace = verge_spec::InvocationTrace::start(parent, ids);
    if parent.is_none() && sample < 1.0 && !rand::Rng::random_bool(&mut rng, sample.max(0.0)) {
        trace.flags &= !1;
    }
    trace
}

/// Fallback handler: every request that is not for the control API.
pub(crate) async fn serve_user_route(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Response {
    route_request(state, request, true).await
}

/// A user request to its function; one for a version placed on other nodes
/// is forwarded to one of them when `may_forward` (never twice).
pub(crate) async fn route_request(
    state: Arc<AppState>,
    request: Request,
    may_forward: bool,
) -> Response {
    if let Err(e) = crate::error::one_host(request.headers()) {
        return e.into_response();
    }
    let host = request_host(&request);
    // Routes are stored in the canonical form; the guest sees the path as sent.
    let path = match verge_spec::canonical_path(request.uri().path()) {
        Ok(p) => p,
        Err(problem) => {
            return ApiError::BadRequest(format!(
                "the request path is not accepted: {}",
                problem.reason()
            ))
            .into_response();
        }
    };
    // What the internet sees says nothing of the control plane: no
    // commands, no function or alias names it was not given.
    let Some(route) = state.match_route(host.as_deref(), &path) else {
        return ApiError::NotFound("no function serves this path".into()).into_response();
    };
    let pinned = match request.headers().get(VERSION_HEADER) {
        None => None,
        Some(v) => match v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) {
            Some(n) => Some(n),
            None => {
                return ApiError::BadRequest(format!(
                    "the {VERSION_HEADER} header must be a version number, such as 7"
                ))
                .into_response();
            }
        },
    };
    let selector = match pinned {
        Some(v) => Selector::Version(v),
        None => Selector::Alias(&route.alias),
    };
    if may_forward
        && let Some(cluster) = &state.cluster
        && let Ok(slot) = state.resolve(
            &route.function,
            match pinned {
                Some(v) => Selector::Version(v),
                None => Selector::Alias(&route.alias),
            },
            |t| sticky_key(request.headers(), t),
        )
        && !verge_spec::placed_on(&slot.stored.placement, &state.labels)
    {
        return crate::forward::forward(&state, cluster, &slot, request).await;
    }
    match resolve(&state, &route.function, selector, request.headers()).await {
        Ok((slot, function, load_us)) => {
            let cause = Cause::http(request.headers(), load_us);
            run(&state, &slot, &function, request, true, cause).await
        }
        Err(ApiError::NotFound(why)) => {
            tracing::debug!(%path, %why, "a route's function did not resolve");
            ApiError::NotFound(match pinned {
                Some(v) => format!("version {v} does not serve this path"),
                None => "no function serves this path".into(),
            })
            .into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// Runs `function` on `request` and turns the outcome into a response.
/// `public`: the request came through a user route, and an error tells the
/// caller only its kind and the invocation id.
pub(crate) async fn run(
    state: &AppState,
    slot: &VersionSlot,
    function: &Function,
    request: Request,
    public: bool,
    cause: Cause,
) -> Response {
    let (id, id_bytes) = new_invocation_id();
    let trace = start_trace(cause.parent, id_bytes, state.trace_sample);
    let limits = slot.bodies;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.request as u64) {
        record_rejection(
            state,
            function,
            &id,
            Outcome::RequestTooLarge,
            Default::default(),
            trace,
        );
        let detail = if public {
            format!(
                "the request body is larger than the limit of {} bytes (invocation {id})",
                limits.request
            )
        } else {
            format!(
                "the request body is larger than the limit of {} bytes for this function (verge deploy --max-request-body, up to verge up --max-request-body); invocation {id}",
                limits.request
            )
        };
        let mut response = ApiError::TooLarge(detail).into_response();
        if let Ok(v) = HeaderValue::from_str(&id) {
            response.headers_mut().insert(INVOCATION_ID_HEADER, v);
        }
        set_traceparent(response.headers_mut(), &trace);
        return response;
    }
    let waited = std::time::Instant::now();
    let permits = match state.admit(slot).await {
        Ok(p) => p,
        Err(refused) => {
            let mut response = refuse(
                state,
                function,
                id,
                refused,
                waited.elapsed(),
                public,
                trace,
            );
            set_traceparent(response.headers_mut(), &trace);
            return response;
        }
    };
    let admission_wait_us = u64::try_from(waited.elapsed().as_micros()).unwrap_or(u64::MAX);
    let (mut parts, body) = request.into_parts();
    // The guest sees its own invocation as the parent: spans it makes, and
    // requests it passes the header on to, nest under it.
    set_traceparent(&mut parts.headers, &trace);
    parts.extensions.insert(verge_spec::InvocationContext {
        trace,
        timings: verge_spec::Timings {
            admission_wait_us,
            load_us: cause.load_us,
            queue_wait_us: cause.queue_wait_us,
            trigger: cause.trigger,
        },
    });
    if parts.uri.authority().is_none() {
        let authority = parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("localhost")
            .to_string();
        let pq = parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/")
            .to_string();
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(pq)
            .build()
            .unwrap_or_else(|_| parts.uri.clone());
    }
    // A body without a Content-Length is cut at the limit: the guest's read fails.
    // A body that stalls is cut after the body timeout.
    let body = crate::server::Stalling::new(body, state.body_timeout);
    let request = Request::from_parts(parts, http_body_util::Limited::new(body, limits.request));
    match state.host.invoke(function, &id, request).await {
        Ok(response) => {
            // The slots are held until the response body is done; a response
            // body past the limit is cut (the connection is closed early).
            let mut response = response.map(move |b| {
                let held = http_body_util::BodyExt::map_frame(b, move |f| {
                    let _held = &permits;
                    f
                });
                Body::new(http_body_util::Limited::new(held, limits.response))
            });
            if let Ok(v) = HeaderValue::from_str(&id) {
                response.headers_mut().insert(INVOCATION_ID_HEADER, v);
            }
            response
                .headers_mut()
                .insert(VERSION_HEADER, HeaderValue::from(function.version));
            set_traceparent(response.headers_mut(), &trace);
            response
        }
        Err(error) => {
            // The cause is in the invocation record (`verge logs`); the
            // node's own log only says that it happened.
            if let InvokeError::Trap { message, .. } = &error {
                tracing::debug!(function = %function.name, version = function.version, invocation = %id, trace = %trace.trace_hex(), %message, "guest trapped");
            }
            let mut response = ApiError::Invoke {
                error,
                id,
                function: function.name.clone(),
                public,
            }
            .into_response();
            set_traceparent(response.headers_mut(), &trace);
            response
        }
    }
}

/// The `traceparent` header's name, made once (a name that is not one of
/// `http`'s standard ones would be parsed and allocated at every use).
const TRACEPARENT: http::HeaderName = http::HeaderName::from_static(verge_spec::TRACEPARENT);

/// `traceparent: ` naming the invocation's span.
fn set_traceparent(headers: &mut http::HeaderMap, trace: &verge_spec::InvocationTrace) {
    if let Ok(v) = HeaderValue::from_bytes(&trace.context().traceparent_bytes()) {
        headers.insert(TRACEPARENT, v);
    }
}

/// The answer of a call as the calling guest reads it.
fn call_response(response: Response) -> http::Response<verge_host::ResponseBody> {
    use http_body_util::BodyExt;
    response.map(|b| {
        b.map_err(|e| verge_host::BodyError(e.to_string()))
            .boxed_unsync()
    })
}

/// A guest's call of another function (`http://NAME.fn.verge.internal/`):
/// the callee's live alias on this node, through its admission and limits,
/// metered as its own invocation with the caller's as its parent. Each call
/// is a hop: a chain of calls (and events) stops at the node's hop limit.
pub(crate) async fn call(
    state: Arc<AppState>,
    call: verge_host::CallRequest,
) -> http::Response<verge_host::ResponseBody> {
    let hops = verge_spec::next_hop(call.hops);
    if hops > state.hop_limit {
        tracing::info!(caller = %call.caller, callee = %call.function, hops, "a call stopped at the hop limit");
        return call_response(
            ApiError::LoopDetected(format!(
                "call from {:?} to {:?} refused: the chain went through {hops} functions (limit {}); a call loop?",
                call.caller, call.function, state.hop_limit
            ))
            .into_response(),
        );
    }
    let (mut parts, body) = call.request.into_parts();
    if prefers_async(&parts.headers) {
        return call_async(&state, call.function, call.trace, hops, parts, body).await;
    }
    let resolved = resolve(
        &state,
        &call.function,
        Selector::Alias(verge_spec::LIVE_ALIAS),
        &parts.headers,
    )
    .await;
    let (slot, function, load_us) = match resolved {
        Ok(r) => r,
        Err(e) => return call_response(e.into_response()),
    };
    // A guest that traced the call itself wrote its own traceparent; else
    // the caller's invocation is the parent.
    let parent = traceparent(&parts.headers).or(call.trace);
    parts
        .extensions
        .insert(verge_spec::ParentInvocation(call.parent_id));
    // The count is the node's, whatever the caller's guest wrote.
    parts
        .headers
        .insert("ce-vergehops", HeaderValue::from(hops));
    parts.headers.remove(VERSION_HEADER);
    let request = Request::from_parts(parts, Body::new(body));
    let cause = Cause {
        parent,
        load_us,
        ..Cause::default()
    };
    call_response(run(&state, &slot, &function, request, false, cause).await)
}

/// Whether a request asks to be answered at once and run later
/// (`Prefer: respond-async`, RFC 7240).
fn prefers_async(headers: &http::HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
}

/// A call with `Prefer: respond-async`: queued as an asynchronous
/// invocation of the callee's live alias (its retries and dead letters
/// apply), answered 202 with the job, the caller's span its parent.
async fn call_async(
    state: &Arc<AppState>,
    function: String,
    trace: Option<verge_spec::SpanContext>,
    hops: u32,
    mut parts: http::request::Parts,
    body: verge_host::ResponseBody,
) -> http::Response<verge_host::ResponseBody> {
    if let Some(t) = trace
        && !parts.headers.contains_key(verge_spec::TRACEPARENT)
        && let Ok(v) = HeaderValue::try_from(t.traceparent())
    {
        parts.headers.insert(verge_spec::TRACEPARENT, v);
    }
    parts.headers.remove("prefer");
    parts.headers.remove("ce-vergehops");
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();
    let target = crate::events::AsyncTarget {
        name: &function,
        alias: verge_spec::LIVE_ALIAS,
        version: None,
        hops,
    };
    let queued =
        crate::events::enqueue_invoke(state, target, path, &parts.headers, Body::new(body)).await;
    call_response(match queued {
        Ok(answer) => answer.into_response(),
        Err(e) => e.into_response(),
    })
}

/// A call made before the node's state exists (never, once it serves).
pub(crate) fn unavailable_call() -> http::Response<verge_host::ResponseBody> {
    call_response(ApiError::Unavailable("the node is starting; retry".into()).into_response())
}

#[cfg(test)]
mod tests {
    use super::strip_port;

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
