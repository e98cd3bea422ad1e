//! Bearer-token authentication of the control API.
//!
//! Tokens are random 256-bit values; the node keeps only their sha256. On first
//! start it creates the admin token and writes it to `<data-dir>/admin.token`
//! (mode 0600) so that the CLI on the same machine finds it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::AppState;

/// Name of the token file in the data directory.
pub const TOKEN_FILE: &str = "admin.token";

pub(crate) fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

pub(crate) fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("verge_{}", hex::encode(bytes))
}

/// Makes sure an admin token exists; returns the token file's path when a
/// token was created by this call. On a cluster, the first node to start
/// creates it (for every node: tokens are the cluster's); the others find
/// it there.
pub(crate) async fn ensure_admin_token(
    store: &Arc<verge_store::Store>,
    cluster: Option<&Arc<verge_cluster::Cluster>>,
    data_dir: &Path,
) -> Result<Option<PathBuf>, ApiError> {
    if !store.token_hashes()?.is_empty() {
        return Ok(None);
    }
    let token = new_token();
    let path = data_dir.join(TOKEN_FILE);
    // The file first: a stored hash whose token nobody has locks everyone out.
    write_private(&path, &token)
        .map_err(|e| ApiError::Internal(format!("could not write {}: {e}", path.display())))?;
    let hash = hash_token(&token);
    let created = match cluster {
        None => store.insert_token_hash("admin", &hash)?,
        Some(c) => {
            c.write(store, move |s| s.insert_token_hash("admin", &hash))
                .await?
        }
    };
    if !created {
        // Another node of the cluster made the admin token first.
        let _ = std::fs::remove_file(&path);
        return Ok(None);
    }
    Ok(Some(path))
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token a control API call was made with.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub name: String,
    /// The tenant a tenant token acts for; `None`: an admin token.
    pub tenant: Option<String>,
    /// A limited token's scope ([`verge_spec::SCOPE_REPLICATION`]).
    pub scope: Option<String>,
}

impl Caller {
    /// The tenant a key-value call acts in: a tenant token's own; an admin
    /// token's choice (`tenant=`), by default the default tenant.
    pub(crate) fn kv_tenant(&self, asked: Option<&str>) -> Result<String, ApiError> {
        match (&self.tenant, asked) {
            (Some(own), Some(a)) if a != own => Err(ApiError::Forbidden(format!(
                "this token acts for tenant {own:?}; it cannot reach tenant {a:?}'s buckets"
            ))),
            (Some(own), _) => Ok(own.clone()),
            (None, Some(a)) => {
                verge_spec::validate_tenant(a)?;
                Ok(a.to_string())
            }
            (None, None) => Ok(verge_spec::DEFAULT_TENANT.to_string()),
        }
    }
}

/// What a tenant token may call: the key-value API of its tenant.
fn tenant_may_call(path: &str) -> bool {
    path == "/v1/kv" || path.starts_with("/v1/kv/")
}

/// What a replication token may call: the replication endpoints only.
fn replication_may_call(path: &str) -> bool {
    path.starts_with("/v1/replication/")
}

/// The token of an `Authorization` header: the scheme is matched without
/// regard to case (RFC 9110 section 11.1), the token as given.
pub(crate) fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Middleware: lets `/v1/health` through, demands a valid bearer token elsewhere.
pub(crate) async fn require_token(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    if request.uri().path() == "/v1/health" {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .map(hash_token);
    let caller = presented.and_then(|h| {
        state
            .token_hashes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|t| constant_time_eq(t.hash.as_bytes(), h.as_bytes()))
            .map(|t| Caller {
                name: t.name.clone(),
                tenant: t.tenant.clone(),
                scope: t.scope.clone(),
            })
    });
    let Some(caller) = caller else {
        return ApiError::Unauthorized.into_response();
    };
    match caller.scope.as_deref() {
        None => {}
        Some(verge_spec::SCOPE_METRICS) if request.uri().path() == "/v1/metrics" => {}
        Some(verge_spec::SCOPE_METRICS) => {
            return ApiError::Forbidden(format!(
                "token {:?} is a metrics token and may call /v1/metrics only; use an admin token",
                caller.name
            ))
            .into_response();
        }
        Some(_) if replication_may_call(request.uri().path()) => {}
        Some(_) => {
            return ApiError::Forbidden(format!(
                "token {:?} is a replication token and may call /v1/replication/... only; use an admin token",
                caller.name
            ))
            .into_response();
        }
    }
    if let Some(t) = &caller.tenant
        && !tenant_may_call(request.uri().path())
    {
        return ApiError::Forbidden(format!(
            "this token acts for tenant {t:?} and may use the key-value API (/v1/kv) only; use an admin token"
        ))
        .into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Body of `POST /v1/tokens`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewToken {
    name: String,
    #[serde(default)]
    tenant: Option<String>,
    /// `replication`: a token for `/v1/replication/...` only; `metrics`:
    /// for `/v1/metrics` only.
    #[serde(default)]
    scope: Option<String>,
}

pub(crate) async fn list_tokens(
    axum::extract::State(state): State<Arc<AppState>>,
) -> Result<axum::Json<Vec<verge_spec::TokenInfo>>, ApiError> {
    let s = state.clone();
    Ok(axum::Json(
        crate::api::blocking(move || Ok(s.store.tokens()?)).await?,
    ))
}

pub(crate) async fn create_token(
    State(state): State<Arc<AppState>>,
    crate::error::JsonBody(req): crate::error::JsonBody<NewToken>,
) -> Result<(http::StatusCode, axum::Json<serde_json::Value>), ApiError> {
    if !verge_spec::is_plain_name(&req.name) {
        return Err(ApiError::BadRequest(format!(
            "invalid token name {:?}: use 1 to 63 characters from a-z, 0-9 and '-'",
            req.name
        )));
    }
    if let Some(t) = &req.tenant {
        verge_spec::validate_tenant(t)?;
    }
    match req.scope.as_deref() {
        None => {}
        Some(verge_spec::SCOPE_REPLICATION) if req.tenant.is_some() => {
            return Err(ApiError::BadRequest(
                "a replication token replicates every tenant's buckets; create it without a tenant"
                    .into(),
            ));
        }
        Some(verge_spec::SCOPE_METRICS) if req.tenant.is_some() => {
            return Err(ApiError::BadRequest(
                "a metrics token reads the whole node's metrics; create it without a tenant".into(),
            ));
        }
        Some(verge_spec::SCOPE_REPLICATION | verge_spec::SCOPE_METRICS) => {}
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "unknown token scope {other:?}; the scopes are \"replication\" and \"metrics\" (or none, for a full token)"
            )));
        }
    }
    let token = new_token();
    let hash = hash_token(&token);
    let (name, tenant, scope) = (req.name.clone(), req.tenant.clone(), req.scope.clone());
    let created = state
        .write(move |st| st.create_token(&name, &hash, tenant.as_deref(), scope.as_deref()))
        .await?;
    if !created {
        return Err(ApiError::Conflict(format!(
            "a token named {:?} exists; pick another name, or remove it first with `verge token rm {}`",
            req.name, req.name
        )));
    }
    Ok((
        http::StatusCode::CREATED,
        axum::Json(serde_json::json!({
            "name": req.name,
            "tenant": req.tenant,
            "scope": req.scope,
            "token": token,
        })),
    ))
}

pub(crate) async fn delete_token(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<http::StatusCode, ApiError> {
    let s = state.clone();
    let tokens = crate::api::blocking(move || Ok(s.store.tokens()?)).await?;
    let Some(t) = tokens.iter().find(|t| t.name == name) else {
        return Err(ApiError::NotFound(format!(
            "no token named {name:?}; list them with `verge token ls`"
        )));
    };
    let full_admin = |t: &verge_spec::TokenInfo| t.tenant.is_none() && t.scope.is_none();
    if full_admin(t) && tokens.iter().filter(|t| full_admin(t)).count() == 1 {
        return Err(ApiError::Conflict(format!(
            "{name:?} is the last admin token; create another admin token first"
        )));
    }
    let n = name.clone();
    state.write(move |st| st.delete_token(&n)).await?;
    Ok(http::StatusCode::NO_CONTENT)
}
