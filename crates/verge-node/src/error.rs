//! The one place that decides what the outside sees of an error: an HTTP
//! status and an RFC 9457 problem body.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use verge_host::{DeployError, InvokeError};
use verge_spec::{INVOCATION_ID_HEADER, Problem, SpecError};
use verge_store::StoreError;

/// An error of an API call or of a user request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid token")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Deploy(#[from] DeployError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bus(#[from] verge_bus::BusError),
    /// An invocation failed. `public`: the caller came through a user
    /// route (the internet), and learns only the kind of failure and the
    /// invocation id; the owner finds the rest in the invocation record.
    #[error("{error}")]
    Invoke {
        error: InvokeError,
        id: String,
        function: String,
        public: bool,
    },
    #[error("{detail}")]
    Overloaded { detail: String, id: String },
    #[error("{0}")]
    Internal(String),
    /// A write failed because the disk is full (507).
    #[error("{0}")]
    DiskFull(String),
    /// The cluster's backends cannot take a write now (503).
    #[error("{0}")]
    Unavailable(String),
    /// A chain of calls between functions went past the hop limit (508).
    #[error("{0}")]
    LoopDetected(String),
}

impl From<verge_cluster::ClusterError> for ApiError {
    fn from(e: verge_cluster::ClusterError) -> Self {
        use verge_cluster::ClusterError as C;
        match e {
            C::Store(e) => ApiError::Store(e),
            C::Unavailable(_) => ApiError::Unavailable(e.to_string()),
            C::Contended(_) => ApiError::Conflict(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// What to do when the disk is full.
const DISK_FULL: &str = "the disk holding the node's data directory is full; free space (remove functions with `verge rm`, purge dead letters with `verge dlq purge`, lower `verge up --retain-size`) or give the node more disk, then retry";

impl ApiError {
    /// Did this fail because the disk is full?
    fn is_disk_full(&self) -> bool {
        match self {
            ApiError::Store(e) => e.is_disk_full(),
            ApiError::Bus(e) => e.is_disk_full(),
            ApiError::Deploy(DeployError::Read(e)) => verge_store::is_io_full(e),
            ApiError::DiskFull(_) => true,
            _ => false,
        }
    }

    fn status_title(&self) -> (StatusCode, &'static str) {
        if self.is_disk_full() {
            return (StatusCode::INSUFFICIENT_STORAGE, "insufficient storage");
        }
        match self {
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad request"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not found"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload too large"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Spec(_) => (StatusCode::BAD_REQUEST, "invalid input"),
            ApiError::Deploy(e) if e.is_user_error() => {
                (StatusCode::BAD_REQUEST, "invalid component")
            }
            ApiError::Deploy(_) => (StatusCode::INTERNAL_SERVER_ERROR, "deploy failed"),
            ApiError::Store(e) => match e {
                StoreError::FunctionNotFound(_)
                | StoreError::RouteNotFound(_)
                | StoreError::VersionNotFound { .. }
                | StoreError::AliasNotFound { .. } => (StatusCode::NOT_FOUND, "not found"),
                StoreError::RouteConflict { .. } => (StatusCode::CONFLICT, "route conflict"),
                StoreError::NoRollback { .. } | StoreError::AliasInUse(_) => {
                    (StatusCode::CONFLICT, "conflict")
                }
                StoreError::Cluster(_) => (StatusCode::SERVICE_UNAVAILABLE, "cluster unavailable"),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "storage error"),
            },
            ApiError::Bus(e) => match e {
                verge_bus::BusError::NotFound(_) => (StatusCode::NOT_FOUND, "not found"),
                verge_bus::BusError::Invalid(_) | verge_bus::BusError::Cron(_) => {
                    (StatusCode::BAD_REQUEST, "bad request")
                }
                verge_bus::BusError::Unavailable(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, "cluster unavailable")
                }
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "event bus error"),
            },
            ApiError::Invoke { error, .. } => match error {
                InvokeError::Capacity(_) => (StatusCode::SERVICE_UNAVAILABLE, "at capacity"),
                InvokeError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "function timed out"),
                // A guest that answers with an error code gets 500, as on
                // `wasmtime serve`.
                InvokeError::Guest(_) => (StatusCode::INTERNAL_SERVER_ERROR, "function error"),
                InvokeError::MemoryLimit { .. } => {
                    (StatusCode::INTERNAL_SERVER_ERROR, "memory limit")
                }
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "function failed"),
            },
            ApiError::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "at capacity"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
            ApiError::DiskFull(_) => (StatusCode::INSUFFICIENT_STORAGE, "insufficient storage"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "cluster unavailable"),
            ApiError::LoopDetected(_) => (StatusCode::LOOP_DETECTED, "loop detected"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, title) = self.status_title();
        if status.is_server_error() && !matches!(self, ApiError::Invoke { .. }) {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        }
        let invocation_id = match &self {
            ApiError::Invoke { id, .. } | ApiError::Overloaded { id, .. } => Some(id.clone()),
            _ => None,
        };
        let detail = match &self {
            // A caller without a token learns nothing but how to give one.
            ApiError::Unauthorized => {
                "send a valid token as Authorization: Bearer TOKEN".to_string()
            }
            ApiError::Invoke {
                error,
                id,
                public: true,
                ..
            } => match error {
                InvokeError::Capacity(_) => {
                    format!("the function is at capacity; retry shortly (invocation {id})")
                }
                InvokeError::Timeout(_) => {
                    format!("the function ran past its time limit (invocation {id})")
                }
                _ => format!("the function failed (invocation {id})"),
            },
            ApiError::Invoke {
                error,
                id,
                function,
                public: false,
            } => format!(
                "{error}; invocation {id}; see its record and output with `verge logs {function} --invocation {id}`"
            ),
            other if other.is_disk_full() => format!("{other}; {DISK_FULL}"),
            other => other.to_string(),
        };
        let mut resp = (
            status,
            Json(Problem {
                status: status.as_u16(),
                title: title.to_string(),
                detail,
                invocation_id: invocation_id.clone(),
            }),
        )
            .into_response();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(id) = invocation_id.and_then(|id| HeaderValue::from_str(&id).ok()) {
            headers.insert(INVOCATION_ID_HEADER, id);
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// A JSON request body. A malformed one is a 400 problem body that says
/// what was wrong (axum's own rejection is plain text).
pub(crate) struct JsonBody<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(e) => Err(ApiError::BadRequest(format!(
                "{}; send a JSON body with content-type application/json, shaped as GET /v1/openapi.json describes",
                e.body_text()
            ))),
        }
    }
}

/// Middleware of the control API: every error it answers is a problem body,
/// also those that axum's extractors and layers make themselves (a body past
/// the limit, a method the endpoint does not take, a path parameter that
/// does not parse), which are plain text or empty.
pub(crate) async fn problem_bodies(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<crate::state::AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if request.method() == http::Method::DELETE {
        // A delete is how space is freed: on a full disk it gets the room
        // kept for it.
        crate::reserve::make_room(&state.data_dir);
    }
    if let Err(e) = one_host(request.headers()) {
        return e.into_response();
    }
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if is_problem {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let title = status.canonical_reason().unwrap_or("error").to_lowercase();
    let detail = match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "the request body is larger than this endpoint accepts ({} MiB); send less at once",
            API_BODY_LIMIT >> 20
        ),
        StatusCode::METHOD_NOT_ALLOWED => {
            "this endpoint does not take that method; GET /v1/openapi.json lists what each endpoint takes".to_string()
        }
        _ if !text.is_empty() => text,
        _ => title.clone(),
    };
    let body = serde_json::to_vec(&Problem {
        status: status.as_u16(),
        title,
        detail,
        invocation_id: None,
    })
    .unwrap_or_default();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// Largest body the control API's extractors read whole (key-value values
/// up to 8 MiB, replication batches); uploads and invocations stream with
/// their own limits.
pub(crate) const API_BODY_LIMIT: usize = 64 << 20;

/// A request may name its host once: two `Host` headers are a 400 (RFC 9112
/// section 3.2), on the API and on user routes alike.
pub(crate) fn one_host(headers: &http::HeaderMap) -> Result<(), ApiError> {
    if headers.get_all(header::HOST).iter().nth(1).is_some() {
        return Err(ApiError::BadRequest(
            "the request has more than one Host header".into(),
        ));
    }
    Ok(())
}
