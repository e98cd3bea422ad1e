//! Secrets: sealed with the node key (ChaCha20-Poly1305 from `ring`), kept
//! sealed in the registry (so a cluster replicates them like any registry
//! document), and opened only into the `wasi:config` values of the versions
//! granted them (`--secret NAME`). A value is never logged, returned by the
//! API, put in a record, an event or an error message.
//!
//! A secret's scope is a function (`function:NAME`) or a tenant
//! (`tenant:NAME`); a version granted NAME reads its function's secret of
//! that name, else its tenant's. The sealed form binds the name and scope
//! (additional data), so a sealed value copied under another name does not
//! open. Every node of a cluster needs the same key (`--secret-key-file`).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use base64::Engine as _;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use verge_store::SealedSecret;

/// The node's secret key could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("could not read the secret key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the secret key {path} is not 64 hexadecimal digits (32 bytes); restore the node's key file, or give the cluster's with --secret-key-file"
    )]
    Format { path: String },
    #[error("could not create the secret key {path}: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
}

/// The node's secrets: its key, and the sealed values as the registry has them.
pub(crate) struct Secrets {
    key: LessSafeKey,
    rng: SystemRandom,
    sealed: RwLock<Arc<HashMap<(String, String), String>>>,
    /// Grows at every change of the sealed values: versions' configuration
    /// caches compare it.
    generation: AtomicU64,
}

impl Secrets {
    /// Reads the key at `path`, or creates it (mode 0600) when `create` and
    /// there is none.
    pub(crate) fn open(path: &Path, create: bool) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let bytes = match std::fs::read_to_string(path) {
            Ok(text) => hex::decode(text.trim())
                .ok()
                .filter(|b| b.len() == 32)
                .ok_or_else(|| KeyError::Format {
                    path: shown.clone(),
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let mut key = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut key)
                    .map_err(|_| KeyError::Create {
                        path: shown.clone(),
                        source: std::io::Error::other("no system randomness"),
                    })?;
                write_key(path, &key).map_err(|source| KeyError::Create {
                    path: shown.clone(),
                    source,
                })?;
                key.to_vec()
            }
            Err(source) => {
                return Err(KeyError::Read {
                    path: shown,
                    source,
                });
            }
        };
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| KeyError::Format {
            path: shown.clone(),
        })?;
        Ok(Self {
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
            sealed: RwLock::default(),
            generation: AtomicU64::new(0),
        })
    }

    fn aad(name: &str, scope: &str) -> Vec<u8> {
        format!("verge-secret\0{scope}\0{name}").into_bytes()
    }

    /// Seals `value` for `name` in `scope`: base64 of nonce and ciphertext.
    pub(crate) fn seal(&self, name: &str, scope: &str, value: &[u8]) -> Result<String, String> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| "no system randomness".to_string())?;
        let mut data = value.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(name, scope)),
                &mut data,
            )
            .map_err(|_| "sealing failed".to_string())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(base64::engine::general_purpose::STANDARD.encode(out))
    }

    /// Opens a sealed value; the error never contains it.
    fn unseal(&self, name: &str, scope: &str, sealed: &str) -> Result<String, &'static str> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|_| "its stored form is damaged")?;
        if raw.len() < NONCE_LEN {
            return Err("its stored form is damaged");
        }
        let (nonce, data) = raw.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| "its stored form is damaged")?;
        let mut data = data.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(Self::aad(name, scope)), &mut data)
            .map_err(|_| {
                "it was sealed with another key (every node of a cluster needs the same --secret-key-file)"
            })?;
        String::from_utf8(plain.to_vec()).map_err(|_| "it is not UTF-8 text")
    }

    /// Takes the registry's sealed secrets (at start and at each change).
    pub(crate) fn reload(&self, rows: Vec<SealedSecret>) {
        let map = rows
            .into_iter()
            .map(|s| ((s.name, s.scope), s.sealed))
            .collect();
        *self.sealed.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(map);
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The value of secret `name` for a version of `function` in `tenant`:
    /// the function's own, else the tenant's; `None` when neither is set.
    fn resolve(&self, name: &str, function: &str, tenant: &str) -> Option<Result<String, String>> {
        let sealed = self
            .sealed
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for scope in [format!("function:{function}"), format!("tenant:{tenant}")] {
            if let Some(s) = sealed.get(&(name.to_string(), scope.clone())) {
                return Some(
                    self.unseal(name, &scope, s).map_err(|why| {
                        format!("secret {name:?} ({scope}) cannot be opened: {why}")
                    }),
                );
            }
        }
        None
    }
}

fn write_key(path: &Path, key: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(format!("{}\n", hex::encode(key)).as_bytes())?;
    f.sync_all()
}

/// Configuration values as a guest reads them.
type Values = Arc<Vec<(String, String)>>;

/// The `wasi:config` values of a version: its `--config` values and, read
/// again whenever a secret changed, its granted secrets.
pub(crate) fn config_source(
    v: &verge_store::StoredVersion,
    secrets: &Arc<Secrets>,
) -> Option<verge_host::ConfigSource> {
    let g = &v.grants;
    if g.config.is_empty() && g.secrets.is_empty() {
        return None;
    }
    let base: Vec<(String, String)> = g.config.clone().into_iter().collect();
    if g.secrets.is_empty() {
        let fixed = Arc::new(base);
        return Some(Arc::new(move || fixed.clone()));
    }
    let (names, function, tenant) = (g.secrets.clone(), v.function.clone(), v.tenant.clone());
    let secrets = secrets.clone();
    let cache: Mutex<Option<(u64, Values)>> = Mutex::new(None);
    Some(Arc::new(move || {
        let generation = secrets.generation();
        let mut cached = cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((g, values)) = cached.as_ref()
            && *g == generation
        {
            return values.clone();
        }
        let mut values = base.clone();
        for name in &names {
            match secrets.resolve(name, &function, &tenant) {
                Some(Ok(value)) => values.push((name.clone(), value)),
                Some(Err(why)) => {
                    tracing::error!(function = %function, "{why}; the guest does not get it")
                }
                None => {}
            }
        }
        let values = Arc::new(values);
        *cached = Some((generation, values.clone()));
        values
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_under_their_name_scope_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let s = Secrets::open(&path, true).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let sealed = s.seal("API_KEY", "function:a", b"hunter2").unwrap();
        assert!(!sealed.contains("hunter2"));
        assert_eq!(
            s.unseal("API_KEY", "function:a", &sealed).unwrap(),
            "hunter2"
        );
        assert!(s.unseal("OTHER", "function:a", &sealed).is_err());
        assert!(s.unseal("API_KEY", "function:b", &sealed).is_err());
        // The same key file opens it again; another key does not.
        let again = Secrets::open(&path, false).unwrap();
        assert_eq!(
            again.unseal("API_KEY", "function:a", &sealed).unwrap(),
            "hunter2"
        );
        let other = Secrets::open(&dir.path().join("other.key"), true).unwrap();
        let e = other.unseal("API_KEY", "function:a", &sealed).unwrap_err();
        assert!(e.contains("another key"), "{e}");
        assert!(Secrets::open(&dir.path().join("missing.key"), false).is_err());
        std::fs::write(dir.path().join("bad.key"), "xyz").unwrap();
        assert!(matches!(
            Secrets::open(&dir.path().join("bad.key"), false),
            Err(KeyError::Format { .. })
        ));
    }

    #[test]
    fn a_function_secret_shadows_its_tenant_secret() {
        let dir = tempfile::tempdir().unwrap();
        let s = Secrets::open(&dir.path().join("k"), true).unwrap();
        let row = |name: &str, scope: &str, v: &[u8]| SealedSecret {
            name: name.into(),
            scope: scope.into(),
            sealed: s.seal(name, scope, v).unwrap(),
            created_at: 0,
            updated_at: 0,
        };
        s.reload(vec![
            row("K", "tenant:acme", b"tenant"),
            row("K", "function:f", b"own"),
        ]);
        assert_eq!(s.resolve("K", "f", "acme").unwrap().unwrap(), "own");
        assert_eq!(s.resolve("K", "g", "acme").unwrap().unwrap(), "tenant");
        assert!(s.resolve("K", "g", "other").is_none());
    }
}

/// `?function=F` or `?tenant=T` of the secrets API (neither: the default tenant).
#[derive(Debug, serde::Deserialize)]
pub(crate) struct ScopeQuery {
    function: Option<String>,
    tenant: Option<String>,
}

impl ScopeQuery {
    fn scope(&self) -> Result<String, crate::error::ApiError> {
        use crate::error::ApiError;
        match (&self.function, &self.tenant) {
            (Some(_), Some(_)) => Err(ApiError::BadRequest(
                "a secret belongs to a function or to a tenant: give function= or tenant=, not both"
                    .into(),
            )),
            (Some(f), None) => {
                verge_spec::validate_function_name(f)?;
                Ok(format!("function:{f}"))
            }
            (None, Some(t)) => {
                verge_spec::validate_tenant(t)?;
                Ok(format!("tenant:{t}"))
            }
            (None, None) => Ok(format!("tenant:{}", verge_spec::DEFAULT_TENANT)),
        }
    }
}

/// One secret as the API shows it: never its value.
#[derive(Debug, serde::Serialize)]
pub(crate) struct SecretInfo {
    name: String,
    scope: String,
    created_at: String,
    updated_at: String,
}

/// `PUT /v1/secrets/{name}`: the value is the request body (UTF-8, at most
/// 64 KiB); a new value takes effect at the next request of every version
/// granted it, without a redeploy.
pub(crate) async fn put(
    axum::extract::State(state): axum::extract::State<Arc<crate::state::AppState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    axum::extract::Query(q): axum::extract::Query<ScopeQuery>,
    body: axum::body::Body,
) -> Result<(http::StatusCode, axum::Json<serde_json::Value>), crate::error::ApiError> {
    use crate::error::ApiError;
    use http_body_util::BodyExt;
    verge_spec::validate_secret_name(&name).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let scope = q.scope()?;
    let max = verge_spec::MAX_SECRET_BYTES;
    let value = http_body_util::Limited::new(body, max)
        .collect()
        .await
        .map_err(|_| {
            ApiError::BadRequest(format!(
                "secret {name:?} is over {} KiB (or its body could not be read); store a reference to a larger value instead",
                max / 1024
            ))
        })?
        .to_bytes();
    if std::str::from_utf8(&value).is_err() {
        return Err(ApiError::BadRequest(format!(
            "secret {name:?} is not UTF-8 text (wasi:config values are strings); base64-encode a binary value"
        )));
    }
    let sealed = state
        .secrets
        .seal(&name, &scope, &value)
        .map_err(ApiError::Internal)?;
    let (n, s) = (name.clone(), scope.clone());
    let created = state
        .write(move |st| st.set_secret(&n, &s, &sealed))
        .await?;
    tracing::info!(secret = %name, %scope, created, "secret set");
    Ok((
        if created {
            http::StatusCode::CREATED
        } else {
            http::StatusCode::OK
        },
        axum::Json(serde_json::json!({ "name": name, "scope": scope, "created": created })),
    ))
}

/// `GET /v1/secrets`: names, scopes and dates.
pub(crate) async fn list(
    axum::extract::State(state): axum::extract::State<Arc<crate::state::AppState>>,
) -> Result<axum::Json<Vec<SecretInfo>>, crate::error::ApiError> {
    let s = state.clone();
    let rows = crate::api::blocking(move || Ok(s.store.secrets()?)).await?;
    Ok(axum::Json(
        rows.into_iter()
            .map(|r| SecretInfo {
                name: r.name,
                scope: r.scope,
                created_at: verge_spec::rfc3339(r.created_at),
                updated_at: verge_spec::rfc3339(r.updated_at),
            })
            .collect(),
    ))
}

/// `DELETE /v1/secrets/{name}`.
pub(crate) async fn delete(
    axum::extract::State(state): axum::extract::State<Arc<crate::state::AppState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    axum::extract::Query(q): axum::extract::Query<ScopeQuery>,
) -> Result<http::StatusCode, crate::error::ApiError> {
    use crate::error::ApiError;
    verge_spec::validate_secret_name(&name).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let scope = q.scope()?;
    let (n, s) = (name.clone(), scope.clone());
    if state.write(move |st| st.delete_secret(&n, &s)).await? {
        tracing::info!(secret = %name, %scope, "secret removed");
        Ok(http::StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!(
            "no secret {name:?} in {scope}; list them with `verge secret ls`"
        )))
    }
}
