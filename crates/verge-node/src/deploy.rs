//! Deploys as a service: validate, compile, store the bytes and the
//! version, bring the node's tables up to it, apply retention. The HTTP
//! handlers (`api`) only translate requests into [`DeployOptions`] and the
//! result into responses; `verge up --example` calls it directly.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use verge_host::Host;
use verge_spec::{DeployResponse, LIVE_ALIAS, Route, Step, validate_function_name};
use verge_store::{Limits, NewVersion, StoreError, sha256_hex};

use crate::api::blocking;
use crate::error::ApiError;
use crate::state::{AppState, Selector};

/// What a deploy asks for besides the bytes.
#[derive(Debug)]
pub(crate) struct DeployOptions {
    pub env: Vec<(String, String)>,
    pub routes: Vec<(Option<String>, String)>,
    pub limits: Limits,
    /// Key-value buckets the version may open.
    pub buckets: Vec<String>,
    /// The tenant whose buckets those are.
    pub tenant: String,
    /// Node labels it needs (`k=v`); empty: every node.
    pub placement: Vec<String>,
    /// What it may reach: outbound hosts, functions, config, secrets.
    pub grants: verge_spec::Grants,
    /// Point `live` at the new version (the first version always is).
    pub promote: bool,
    /// Name of the token that deploys.
    pub deployed_by: String,
}

impl Default for DeployOptions {
    fn default() -> Self {
        Self {
            env: Vec::new(),
            routes: Vec::new(),
            limits: Limits::default(),
            buckets: Vec::new(),
            tenant: verge_spec::DEFAULT_TENANT.to_string(),
            placement: Vec::new(),
            grants: verge_spec::Grants::default(),
            promote: true,
            deployed_by: "admin".into(),
        }
    }
}

/// Validates, compiles, stores and installs a new version of `name`, and
/// promotes `live` to it unless told not to. Nothing is stored unless every
/// check passed.
pub(crate) async fn deploy(
    state: &Arc<AppState>,
    name: &str,
    bytes: Bytes,
    opts: DeployOptions,
) -> Result<DeployResponse, ApiError> {
    let mut steps = Steps::new();
    validate_function_name(name)?;
    check_limits(state, &opts.limits)?;
    opts.grants
        .validate()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if let Some(pem) = &opts.grants.outbound_ca {
        verge_host::check_ca(pem).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    }
    Host::check_bytes(&bytes)?;
    // An early refusal from the node's route table (no database call on
    // this thread); the store checks again in the deploy's transaction.
    for (host, path) in &opts.routes {
        if let Some(owner) = state.route_owner(host.as_deref(), path)
            && owner != name
        {
            let route = format!("{}{path}", host.as_deref().unwrap_or(""));
            return Err(StoreError::RouteConflict { route, owner }.into());
        }
    }
    steps.done("validate");
    let s = state.clone();
    let sha = sha256_hex(&bytes);
    let size = bytes.len() as u64;
    let loaded = {
        let sha = sha.clone();
        let bytes = bytes.clone();
        blocking(move || Ok(s.host.load_shared(&sha, || Ok(bytes.to_vec()))?)).await?
    };
    let compile_ms = steps.done("compile");
    let (loaded, source) = loaded;
    state.metrics.code_loaded(
        source.as_str(),
        std::time::Duration::try_from_secs_f64(compile_ms / 1e3).unwrap_or_default(),
    );
    let code = source.as_str().to_string();
    let tier = loaded.tier().as_str().to_string();

    let _guard = state.deploy_lock.lock().await;
    let placement = opts.placement.clone();
    let grants = opts.grants.clone();
    let (fname, env, routes, limits, by, promote, buckets, tenant) = (
        name.to_string(),
        opts.env.clone(),
        opts.routes.clone(),
        opts.limits,
        opts.deployed_by.clone(),
        opts.promote,
        opts.buckets.clone(),
        opts.tenant.clone(),
    );
    // The bytes first: a version never names an artifact not stored.
    let stored = state.artifacts.put(bytes.clone()).await?;
    debug_assert_eq!(stored, sha);
    // The projection gives the new version's slot this code (see
    // `AppState::preloaded`), once it reads the version from the registry.
    state
        .preloaded
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(sha.clone(), loaded.clone());
    let created = state
        .write(move |st| {
            st.create_version(&NewVersion {
                function: &fname,
                sha256: &stored,
                size,
                env: &env,
                limits,
                buckets: &buckets,
                tenant: &tenant,
                placement: &placement,
                grants: &grants,
                routes: &routes,
                deployed_by: &by,
                promote,
            })
        })
        .await;
    state
        .preloaded
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(&sha);
    let created = created?;
    if state.cluster.is_some() {
        // Unreferenced bytes are deleted after a grace (`projection`): if a
        // node deleted these between the upload above and the version's
        // write, they go up again.
        if let Err(e) = state.artifacts.put(bytes.clone()).await {
            tracing::warn!(%sha, error = %e, "could not check the stored component");
        }
    }
    steps.done("store");
    steps.done("promote");
    drop(_guard);
    // The version's slot holds the loaded code now; optimize it if it is baseline.
    if let Ok(slot) = state.resolve(name, Selector::Version(created.version), |_| None)
        && let Ok(f) = state.load(&slot).await
    {
        state.optimize_in_background(&f, Some(bytes));
    }
    collect(state, name).await;
    if !created.reused {
        state.emit(
            crate::events::types::VERSION_CREATED,
            name,
            serde_json::json!({ "function": name, "version": created.version, "sha256": sha, "size": size }),
        );
    }
    if created.promoted {
        state.emit(
            crate::events::types::FUNCTION_DEPLOYED,
            name,
            serde_json::json!({ "function": name, "version": created.version, "alias": LIVE_ALIAS }),
        );
    }
    tracing::info!(function = %name, version = created.version, reused = created.reused, promoted = created.promoted, sha256 = %sha, code = %code, %tier, compile_ms, "version deployed");
    Ok(DeployResponse {
        function: name.to_string(),
        version: created.version,
        sha256: sha,
        size,
        compile_ms,
        code,
        tier,
        reused: created.reused,
        promoted: created.promoted.then(|| LIVE_ALIAS.to_string()),
        steps: steps.steps,
        routes: opts
            .routes
            .into_iter()
            .map(|(host, path)| Route {
                host,
                path,
                function: name.to_string(),
                alias: LIVE_ALIAS.to_string(),
            })
            .collect(),
    })
}

/// Times the steps of a deploy.
struct Steps {
    last: Instant,
    steps: Vec<Step>,
}

impl Steps {
    fn new() -> Self {
        Self {
            last: Instant::now(),
            steps: Vec::new(),
        }
    }

    /// Ends step `name`; returns its milliseconds.
    fn done(&mut self, name: &str) -> f64 {
        let ms = self.last.elapsed().as_secs_f64() * 1000.0;
        self.last = Instant::now();
        self.steps.push(Step {
            name: name.to_string(),
            ms,
        });
        ms
    }
}

/// A version's limits must be positive and within the node's ceilings.
fn check_limits(state: &AppState, limits: &Limits) -> Result<(), ApiError> {
    let c = state.ceilings;
    if let Some(ms) = limits.timeout_ms
        && (ms == 0 || ms > u64::try_from(c.timeout.as_millis()).unwrap_or(u64::MAX))
    {
        return Err(ApiError::BadRequest(format!(
            "timeout {ms} ms is outside 1 ms..{} ms, this node's ceiling; raise it with `verge up --timeout`",
            c.timeout.as_millis()
        )));
    }
    if let Some(bytes) = limits.memory_bytes
        && (bytes < 1 << 20 || bytes > c.memory as u64)
    {
        return Err(ApiError::BadRequest(format!(
            "memory {} MiB is outside 1 MiB..{} MiB, this node's ceiling; raise it with `verge up --memory`",
            bytes >> 20,
            c.memory >> 20
        )));
    }
    let b = state.body_limits;
    for (value, ceiling, flag) in [
        (limits.request_body, b.request, "--max-request-body"),
        (limits.response_body, b.response, "--max-response-body"),
        (limits.log_bytes, state.log_limit, "--log-limit"),
    ] {
        if let Some(v) = value
            && v > ceiling as u64
        {
            return Err(ApiError::BadRequest(format!(
                "{v} bytes is over this node's ceiling of {ceiling} bytes; raise it with `verge up {flag}`"
            )));
        }
    }
    Ok(())
}

/// Applies retention to `name` after a change: drops removed versions from
/// memory and their compiled code from the cache. Failures are logged: the
/// change that triggered it already succeeded.
pub(crate) async fn collect(state: &Arc<AppState>, name: &str) {
    let n = name.to_string();
    let keep = state.keep_versions;
    match state.write(move |st| st.collect_versions(&n, keep)).await {
        Ok(c) if c.versions.is_empty() => {}
        Ok(c) => {
            let files: usize = c.artifacts.iter().map(|sha| state.host.forget(sha)).sum();
            tracing::info!(function = %name, versions = ?c.versions, artifacts = c.artifacts.len(), compiled_files = files, "retention removed old versions");
        }
        Err(e) => {
            tracing::warn!(function = %name, error = %e, "retention failed; old versions stay")
        }
    }
}
