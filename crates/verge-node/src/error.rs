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
    #[error("{error}")]
    Invoke { error: InvokeError, id: String },
    #[error("{detail}")]
    Overloaded { detail: String, id: String },
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn status_title(&self) -> (StatusCode, &'static str) {
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
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "storage error"),
            },
            ApiError::Bus(e) => match e {
                verge_bus::BusError::NotFound(_) => (StatusCode::NOT_FOUND, "not found"),
                verge_bus::BusError::Invalid(_) | verge_bus::BusError::Cron(_) => {
                    (StatusCode::BAD_REQUEST, "bad request")
                }
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "event bus error"),
            },
            ApiError::Invoke { error, .. } => match error {
                InvokeError::Capacity(_) => (StatusCode::SERVICE_UNAVAILABLE, "at capacity"),
                InvokeError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "function timed out"),
                InvokeError::Guest(_) => (StatusCode::BAD_GATEWAY, "function error"),
                InvokeError::MemoryLimit { .. } => {
                    (StatusCode::INTERNAL_SERVER_ERROR, "memory limit")
                }
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "function failed"),
            },
            ApiError::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "at capacity"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
        }
    }
}

/// The status a caller got for an invocation that ended with `outcome` (as
/// the host names it in usage records), when the guest sent no response.
pub(crate) fn outcome_status(outcome: &str) -> u16 {
    match outcome {
        "timeout" => StatusCode::GATEWAY_TIMEOUT,
        "capacity" => StatusCode::SERVICE_UNAVAILABLE,
        "error_response" => StatusCode::BAD_GATEWAY,
        "request_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
    .as_u16()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, title) = self.status_title();
        if status == StatusCode::UNAUTHORIZED {
            // No detail: a caller without a token learns nothing.
            return (status, [(header::WWW_AUTHENTICATE, "Bearer")]).into_response();
        }
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        }
        let invocation_id = match &self {
            ApiError::Invoke { id, .. } | ApiError::Overloaded { id, .. } => Some(id.clone()),
            _ => None,
        };
        let detail = match &self {
            ApiError::Invoke { error, id } => match error {
                InvokeError::Trap { .. }
                | InvokeError::NoResponse { .. }
                | InvokeError::MemoryLimit { .. } => {
                    format!("{error}; invocation {id}; its stderr is in the node's log")
                }
                _ => format!("{error}; invocation {id}"),
            },
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
