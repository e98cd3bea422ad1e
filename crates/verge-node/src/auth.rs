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

fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("verge_{}", hex::encode(bytes))
}

/// Makes sure an admin token exists; returns the token file's path when a
/// token was created by this call.
pub(crate) fn ensure_admin_token(
    store: &verge_store::Store,
    data_dir: &Path,
) -> Result<Option<PathBuf>, ApiError> {
    if !store.token_hashes()?.is_empty() {
        return Ok(None);
    }
    let token = new_token();
    let path = data_dir.join(TOKEN_FILE);
    write_private(&path, &token)
        .map_err(|e| ApiError::Internal(format!("could not write {}: {e}", path.display())))?;
    store.replace_token_hash("admin", &hash_token(&token))?;
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

/// The name of the token a control API call was made with.
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub String);

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
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| hash_token(t.trim()));
    let caller = presented.and_then(|h| {
        state
            .token_hashes
            .iter()
            .find(|(_, known)| constant_time_eq(known.as_bytes(), h.as_bytes()))
            .map(|(name, _)| name.clone())
    });
    if let Some(name) = caller {
        request.extensions_mut().insert(Caller(name));
        next.run(request).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}
