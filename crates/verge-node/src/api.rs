//! The control API under `/v1/` (JSON; see `openapi.json`, served at
//! `GET /v1/openapi.json`).
//!
//! Routes are declared once, in [`api_routes!`], which builds both the router
//! and [`API_ROUTES`], the list the OpenAPI test checks against the document.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, on};
use http::{StatusCode, header};
use verge_spec::{
    Alias, AliasTarget, DeployResponse, FunctionDetail, FunctionSummary, Health, LIVE_ALIAS,
    NodeInfo, Route, RouteRequest, UsageRecord, UsageReport, VersionInfo, normalize_route_host,
    normalize_route_path, parse_duration, parse_env, parse_size, validate_alias_name,
    validate_function_name,
};
use verge_store::{StoreError, UsageBy, UsageQuery};

use crate::deploy::{DeployOptions, collect, deploy};
use crate::error::ApiError;
use crate::front;
use crate::state::{AppState, Selector};

macro_rules! api_routes {
    ($( $method:ident $path:literal => $handler:expr ),* $(,)?) => {
        /// Every (method, path) of the control API, as the router serves them.
        pub const API_ROUTES: &[(&str, &str)] = &[$( (stringify!($method), $path) ),*];

        pub(crate) fn router() -> Router<Arc<AppState>> {
            let mut router = Router::new();
            $( router = router.route($path, on(MethodFilter::$method, $handler)); )*
            router
        }
    };
}

api_routes! {
    GET "/v1/health" => health,
    GET "/v1/openapi.json" => openapi,
    GET "/v1/functions" => list_functions,
    GET "/v1/functions/{name}" => get_function,
    DELETE "/v1/functions/{name}" => delete_function,
    POST "/v1/functions/{name}/versions" => create_version,
    GET "/v1/functions/{name}/versions" => list_versions,
    POST "/v1/functions/{name}/versions/{version}/invoke" => invoke_version,
    POST "/v1/functions/{name}/invoke" => invoke,
    GET "/v1/functions/{name}/aliases" => list_aliases,
    PUT "/v1/functions/{name}/aliases/{alias}" => put_alias,
    DELETE "/v1/functions/{name}/aliases/{alias}" => delete_alias,
    POST "/v1/functions/{name}/aliases/{alias}/rollback" => rollback_alias,
    GET "/v1/invocations" => list_invocations,
    GET "/v1/usage" => usage,
    GET "/v1/logs" => logs,
    POST "/v1/events" => crate::events::ingest,
    GET "/v1/triggers" => crate::events::list_triggers,
    POST "/v1/triggers" => crate::events::add_trigger,
    DELETE "/v1/triggers/{id}" => crate::events::delete_trigger,
    GET "/v1/jobs" => crate::events::list_jobs,
    GET "/v1/jobs/{id}" => crate::events::get_job,
    GET "/v1/dlq" => crate::events::list_dead_letters,
    DELETE "/v1/dlq" => crate::events::purge_dead_letters,
    GET "/v1/dlq/{id}" => crate::events::get_dead_letter,
    POST "/v1/dlq/{id}/replay" => crate::events::replay_dead_letter,
    GET "/v1/functions/{name}/async" => crate::events::get_async_config,
    PUT "/v1/functions/{name}/async" => crate::events::put_async_config,
    GET "/v1/schedules" => crate::events::list_schedules,
    POST "/v1/schedules" => crate::events::add_schedule,
    DELETE "/v1/schedules/{id}" => crate::events::delete_schedule,
    GET "/v1/tokens" => crate::auth::list_tokens,
    POST "/v1/tokens" => crate::auth::create_token,
    DELETE "/v1/tokens/{name}" => crate::auth::delete_token,
    GET "/v1/secrets" => crate::secrets::list,
    PUT "/v1/secrets/{name}" => crate::secrets::put,
    DELETE "/v1/secrets/{name}" => crate::secrets::delete,
    GET "/v1/kv" => crate::kv::buckets,
    GET "/v1/kv/{bucket}" => crate::kv::keys,
    GET "/v1/kv/{bucket}/{key}" => crate::kv::get,
    PUT "/v1/kv/{bucket}/{key}" => crate::kv::put,
    DELETE "/v1/kv/{bucket}/{key}" => crate::kv::delete,
    POST "/v1/kv/{bucket}/{key}/incr" => crate::kv::incr,
    POST "/v1/replication/hello" => crate::kv::hello,
    POST "/v1/replication/push" => crate::kv::push,
    POST "/v1/replication/pull" => crate::kv::pull,
    GET "/v1/replication/buckets" => crate::kv::replica_buckets,
    GET "/v1/replication/digest/{bucket}" => crate::kv::digest,
    POST "/v1/replication/ranges" => crate::kv::ranges,
    POST "/v1/replication/snapshot" => crate::kv::snapshot,
    GET "/v1/replication/status" => crate::kv::status,
    GET "/v1/replication/stale" => crate::kv::stale,
    GET "/v1/nodes" => nodes,
    GET "/v1/metrics" => crate::telemetry::handler,
    GET "/v1/routes" => list_routes,
    PUT "/v1/routes" => put_route,
    DELETE "/v1/routes" => delete_route,
}

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

fn link_state(down_since: Option<std::time::SystemTime>) -> String {
    match down_since {
        None => "connected".into(),
        Some(t) => {
            let secs = t
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            format!("down since {}", verge_spec::rfc3339(secs))
        }
    }
}

/// This node, or every node of its cluster whose heartbeat is fresh, and
/// the edges whose heartbeat stopped (cut). An edge cut off from the core
/// lists itself.
async fn nodes(State(state): State<Arc<AppState>>) -> Result<Json<Vec<NodeInfo>>, ApiError> {
    let me = state.node_record();
    let info = |r: verge_cluster::NodeRecord, link: String, this: bool| NodeInfo {
        name: r.name,
        url: r.url,
        role: r.role,
        version: r.version,
        link,
        lag: 0,
        versions: r.versions,
        ready: r.ready,
        revision: r.position,
        started: verge_spec::rfc3339(r.started),
        heartbeat: verge_spec::rfc3339(r.heartbeat),
        this,
        labels: r.labels,
        loaded: r.loaded,
    };
    let Some(cluster) = &state.cluster else {
        let mut r = me;
        r.url = state.url.get().cloned().unwrap_or_default();
        r.heartbeat = r.started.max(now_secs());
        return Ok(Json(vec![info(r, "embedded".into(), true)]));
    };
    let own_link = || match cluster.uplink_cut_since() {
        Some(t) => format!("cut since {}", rfc3339_of(t)),
        None => link_state(cluster.down_since()),
    };
    let records = match cluster.nodes().await {
        Ok(r) => r,
        Err(_) if cluster.uplink_cut_since().is_some() => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let mut out: Vec<NodeInfo> = records
        .into_iter()
        .map(|r| {
            let this = r.name == me.name;
            let link = if this { own_link() } else { "connected".into() };
            let mut n = info(r, link, this);
            if this {
                // Fresher than the last heartbeat.
                n.versions = me.versions;
                n.ready = me.ready;
                n.loaded = me.loaded.clone();
                n.revision = cluster.applied();
            }
            n
        })
        .collect();
    if !out.iter().any(|n| n.this) {
        let mut r = me;
        r.url = state.url.get().cloned().unwrap_or_default();
        r.position = cluster.applied();
        out.push(info(r, own_link(), true));
    }
    let cut: Vec<verge_cluster::NodeRecord> = state
        .cut_edges
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .values()
        .cloned()
        .collect();
    for r in cut {
        if out.iter().all(|n| n.name != r.name) {
            let since = format!("cut since {}", verge_spec::rfc3339(r.heartbeat));
            out.push(info(r, since, false));
        }
    }
    let head = out.iter().map(|n| n.revision).max().unwrap_or(0);
    for n in &mut out {
        n.lag = head - n.revision;
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(out))
}

fn rfc3339_of(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    verge_spec::rfc3339(secs)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

async fn health(State(state): State<Arc<AppState>>) -> Json<Health> {
    let stats = state.host.stats();
    let s = state.clone();
    let jobs = blocking(move || Ok(s.bus.depth()?)).await.unwrap_or(0);
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        functions: state.function_count() as u64,
        compiled: stats.compiled,
        cache_hits: stats.cache_hits,
        baseline: stats.baseline,
        optimized: stats.optimized,
        jobs,
        queued: state.admission.queued() as u64,
        running: state.admission.running() as u64,
        demoted: stats.demoted,
        libraries_compiled: stats.libraries_compiled,
        libraries_reused: stats.libraries_reused,
        functions_reused: stats.functions_reused,
        versions_loaded: state.loaded_versions() as u64,
        code_unloads: state
            .code_unloads
            .load(std::sync::atomic::Ordering::Relaxed),
        instances_reused: stats.instances_reused,
        instances_prewarmed: stats.instances_prewarmed,
        nats: state.cluster.as_ref().map(|c| link_state(c.down_since())),
    })
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Unknown paths under `/v1`: never handed to user routes.
pub(crate) async fn unknown_endpoint(request: Request) -> ApiError {
    ApiError::NotFound(format!(
        "no API endpoint {} {}; see GET /v1/openapi.json for the endpoints",
        request.method(),
        request.uri().path()
    ))
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("background task failed: {e}")))?
}

async fn list_functions(
    State(state): State<Arc<AppState>>,
) -> Result<Json<Vec<FunctionSummary>>, ApiError> {
    let s = state.clone();
    Ok(Json(blocking(move || Ok(s.store.list_functions()?)).await?))
}

async fn get_function(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<FunctionDetail>, ApiError> {
    validate_function_name(&name)?;
    let s = state.clone();
    let n = name.clone();
    let mut detail = blocking(move || Ok(s.store.get_function(&n)?)).await?;
    fill_tiers(&state, &name, &mut detail.versions);
    Ok(Json(detail))
}

/// Adds the tier of each loaded version's code.
fn fill_tiers(state: &AppState, name: &str, versions: &mut [VersionInfo]) {
    let tiers = state.tiers(name);
    for v in versions {
        v.code = tiers.get(&v.version).map(|t| t.to_string());
        v.reuse_fell_back = v.reuse.is_some() && state.reuse_fell_back(name, v.version);
    }
}

async fn list_versions(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Vec<VersionInfo>>, ApiError> {
    validate_function_name(&name)?;
    let s = state.clone();
    let n = name.clone();
    let mut versions = blocking(move || Ok(s.store.versions(&n)?)).await?;
    fill_tiers(&state, &name, &mut versions);
    Ok(Json(versions))
}

async fn list_aliases(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Alias>>, ApiError> {
    validate_function_name(&name)?;
    let s = state.clone();
    Ok(Json(blocking(move || Ok(s.store.aliases(&name)?)).await?))
}

fn find_alias(aliases: Vec<Alias>, alias: &str) -> Result<Alias, ApiError> {
    aliases
        .into_iter()
        .find(|a| a.name == alias)
        .ok_or_else(|| ApiError::Internal(format!("alias {alias:?} vanished")))
}

/// Points an alias at one version, or two with weights; one atomic swap for
/// requests (those in flight finish on the version they started with).
async fn put_alias(
    State(state): State<Arc<AppState>>,
    Path((name, alias)): Path<(String, String)>,
    crate::error::JsonBody(target): crate::error::JsonBody<AliasTarget>,
) -> Result<Json<Alias>, ApiError> {
    validate_function_name(&name)?;
    validate_alias_name(&alias)?;
    target.validate()?;
    if target.canary.is_some_and(|c| c.version == target.version) {
        return Err(ApiError::BadRequest(format!(
            "the canary version {} is the alias's main version; give another version, or promote it",
            target.version
        )));
    }
    let _guard = state.deploy_lock.lock().await;
    let (n, a, t) = (name.clone(), alias.clone(), target.clone());
    let aliases = state
        .write(move |st| {
            st.set_alias(&n, &a, &t)?;
            st.aliases(&n)
        })
        .await?;
    tracing::info!(function = %name, %alias, target = %target.describe(), "alias set");
    state.emit(
        crate::events::types::ALIAS_CHANGED,
        &format!("{name}/{alias}"),
        serde_json::json!({ "function": name, "alias": alias, "target": target }),
    );
    collect(&state, &name).await;
    Ok(Json(find_alias(aliases, &alias)?))
}

async fn rollback_alias(
    State(state): State<Arc<AppState>>,
    Path((name, alias)): Path<(String, String)>,
) -> Result<Json<Alias>, ApiError> {
    validate_function_name(&name)?;
    validate_alias_name(&alias)?;
    let _guard = state.deploy_lock.lock().await;
    let (n, a) = (name.clone(), alias.clone());
    let (target, aliases) = state
        .write(move |st| {
            let t = st.rollback_alias(&n, &a)?;
            Ok((t, st.aliases(&n)?))
        })
        .await?;
    tracing::info!(function = %name, %alias, target = %target.describe(), "alias rolled back");
    state.emit(
        crate::events::types::ALIAS_CHANGED,
        &format!("{name}/{alias}"),
        serde_json::json!({ "function": name, "alias": alias, "target": target, "rollback": true }),
    );
    Ok(Json(find_alias(aliases, &alias)?))
}

async fn delete_alias(
    State(state): State<Arc<AppState>>,
    Path((name, alias)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    validate_function_name(&name)?;
    validate_alias_name(&alias)?;
    let _guard = state.deploy_lock.lock().await;
    let (n, a) = (name.clone(), alias.clone());
    state.write(move |st| st.delete_alias(&n, &a)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_function(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    validate_function_name(&name)?;
    let _guard = state.deploy_lock.lock().await;
    let n = name.clone();
    let orphans = state.write(move |st| st.delete_function(&n)).await?;
    for sha in &orphans {
        state.host.forget(sha);
    }
    let s = state.clone();
    let n = name.clone();
    if let Err(e) = blocking(move || Ok(s.bus.forget_function(&n)?)).await {
        tracing::warn!(function = %name, error = %e, "could not remove the function's triggers and schedules");
    }
    state.emit(
        crate::events::types::FUNCTION_DELETED,
        &name,
        serde_json::json!({ "function": name }),
    );
    tracing::info!(function = %name, "function deleted");
    Ok(StatusCode::NO_CONTENT)
}

impl DeployOptions {
    fn from_query(query: Option<&str>) -> Result<Self, ApiError> {
        let mut opts = DeployOptions::default();
        let mut host = None;
        let mut paths = Vec::new();
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match k.as_ref() {
                "env" => opts.env.push(parse_env(&v)?),
                "route" => paths.push(normalize_route_path(&v)?),
                "host" => host = Some(normalize_route_host(&v)?),
                "timeout" => {
                    opts.limits.timeout_ms =
                        Some(u64::try_from(parse_duration(&v)?.as_millis()).unwrap_or(u64::MAX))
                }
                "memory" => opts.limits.memory_bytes = Some(parse_size(&v)?),
                "max_request_body" => opts.limits.request_body = Some(parse_size(&v)?),
                "max_response_body" => opts.limits.response_body = Some(parse_size(&v)?),
                "log_limit" => opts.limits.log_bytes = Some(parse_size(&v)?),
                "tenant" => {
                    verge_spec::validate_tenant(&v)?;
                    opts.tenant = v.into_owned();
                }
                "place" => {
                    verge_spec::parse_label(&v)?;
                    opts.placement.push(v.into_owned());
                }
                "allow_outbound" => opts.grants.allow_outbound.push(v.into_owned()),
                "allow_private" => opts.grants.allow_private.push(v.into_owned()),
                "allow_call" => opts.grants.allow_call.push(v.into_owned()),
                "outbound_ca" => opts.grants.outbound_ca = Some(v.into_owned()),
                "secret" => opts.grants.secrets.push(v.into_owned()),
                "config" => {
                    let (k, val) = v.split_once('=').ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "invalid config entry {v:?}: write it as KEY=VALUE"
                        ))
                    })?;
                    opts.grants.config.insert(k.to_string(), val.to_string());
                }
                "kv_bucket" => {
                    verge_kv::validate_bucket(&v)
                        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                    opts.buckets.push(v.into_owned());
                }
                "promote" => {
                    opts.promote = match v.as_ref() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => {
                            return Err(ApiError::BadRequest(format!(
                                "promote {v:?} must be true or false"
                            )));
                        }
                    }
                }
                "reuse" => {
                    opts.limits.reuse = Some(
                        v.parse::<u32>()
                            .ok()
                            .filter(|n| (1..=verge_host::MAX_REUSE).contains(n))
                            .ok_or_else(|| {
                                ApiError::BadRequest(format!(
                                    "reuse {v:?} must be a whole number from 1 (a fresh instance per request) to {}",
                                    verge_host::MAX_REUSE
                                ))
                            })?,
                    )
                }
                "prewarm" => {
                    opts.limits.prewarm = Some(
                        v.parse::<u32>()
                            .ok()
                            .filter(|n| *n <= verge_host::MAX_PREWARM)
                            .ok_or_else(|| {
                                ApiError::BadRequest(format!(
                                    "prewarm {v:?} must be a whole number from 0 to {}",
                                    verge_host::MAX_PREWARM
                                ))
                            })?,
                    )
                }
                "concurrency" => {
                    opts.limits.concurrency =
                        Some(v.parse::<u32>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                            ApiError::BadRequest(format!(
                                "concurrency {v:?} must be a whole number of at least 1"
                            ))
                        })?)
                }
                other => {
                    return Err(ApiError::BadRequest(format!(
                        "unknown query parameter {other:?}; accepted: route, host, env, timeout, memory, concurrency, reuse, prewarm, max_request_body, max_response_body, log_limit, promote, kv_bucket, tenant, place, allow_outbound, allow_private, allow_call, outbound_ca, config, secret"
                    )));
                }
            }
        }
        if host.is_some() && paths.is_empty() {
            return Err(ApiError::BadRequest(
                "`host` needs a `route` path to bind (for example route=/)".into(),
            ));
        }
        opts.routes = paths.into_iter().map(|p| (host.clone(), p)).collect();
        Ok(opts)
    }
}

async fn read_body(body: Body, limit: usize, headers: &http::HeaderMap) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::TooLarge(format!(
            "the component is larger than this node's upload limit of {limit} bytes; shrink it (for example `wasm-opt -Os`) or start the node with a larger --max-upload"
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    use http_body_util::BodyExt as _;
    let mut body = body;
    let mut got = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::BadRequest(format!("could not read the upload: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if got.len() + data.len() > limit {
            // Read (and drop) what the client is still sending, within
            // bounds, so that it gets to read the 413 instead of a reset
            // connection (a socket closed with unread data is reset).
            drain(body).await;
            return Err(too_large());
        }
        got.extend_from_slice(&data);
    }
    Ok(got.freeze())
}

/// Reads and drops the rest of a refused upload: at most 64 MiB, for at
/// most 2 s.
async fn drain(mut body: Body) {
    use http_body_util::BodyExt as _;
    let mut left: usize = 64 << 20;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                left = left.saturating_sub(data.len());
                if left == 0 {
                    return;
                }
            }
        }
    })
    .await;
}

async fn create_version(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Result<(StatusCode, Json<DeployResponse>), ApiError> {
    validate_function_name(&name)?;
    let mut opts = DeployOptions::from_query(query.as_deref())?;
    let (parts, body) = request.into_parts();
    if let Some(caller) = parts.extensions.get::<crate::auth::Caller>() {
        opts.deployed_by = caller.name.clone();
    }
    let bytes = read_body(body, state.max_upload, &parts.headers).await?;
    let resp = deploy(&state, &name, bytes, opts).await?;
    let status = if resp.reused {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(resp)))
}

pub(crate) fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

async fn list_invocations(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<UsageRecord>>, ApiError> {
    let (mut function, mut status, mut id, mut limit) = (None, None, None, 50u32);
    let mut trace = None;
    for (k, v) in query_pairs(query.as_deref()) {
        match k.as_str() {
            "function" => {
                validate_function_name(&v)?;
                function = Some(v);
            }
            "status" => {
                status = Some(v.parse::<u16>().map_err(|_| {
                    ApiError::BadRequest(format!("status {v:?} is not an HTTP status code"))
                })?)
            }
            "id" => id = Some(v),
            "trace" => {
                if !verge_spec::is_trace_id(&v) {
                    return Err(ApiError::BadRequest(format!(
                        "trace {v:?} is not a trace id: 32 lowercase hex digits, as in the traceparent response header (00-TRACE-SPAN-01)"
                    )));
                }
                trace = Some(v)
            }
            "limit" => {
                limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| ApiError::BadRequest(format!("limit {v:?} must be 1..10000")))?
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}; accepted: function, status, id, trace, limit"
                )));
            }
        }
    }
    let s = state.clone();
    Ok(Json(
        blocking(move || {
            Ok(s.store.invocations(
                function.as_deref(),
                status,
                id.as_deref(),
                trace.as_deref(),
                limit,
            )?)
        })
        .await?,
    ))
}

async fn logs(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<UsageRecord>>, ApiError> {
    let (mut function, mut invocation, mut after_ms, mut after_id, mut limit) =
        (None, None, None, String::new(), 100u32);
    for (k, v) in query_pairs(query.as_deref()) {
        match k.as_str() {
            "function" => {
                validate_function_name(&v)?;
                function = Some(v);
            }
            "invocation" => invocation = Some(v),
            "after_ms" => {
                after_ms = Some(v.parse::<i64>().map_err(|_| {
                    ApiError::BadRequest(format!("after_ms {v:?} is not unix milliseconds"))
                })?)
            }
            "after_id" => after_id = v,
            "limit" => {
                limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| ApiError::BadRequest(format!("limit {v:?} must be 1..1000")))?
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}; accepted: function, invocation, after_ms, after_id, limit"
                )));
            }
        }
    }
    let s = state.clone();
    Ok(Json(
        blocking(move || {
            Ok(s.store.logs(
                function.as_deref(),
                invocation.as_deref(),
                after_ms.map(|ms| (ms, after_id.as_str())),
                limit,
            )?)
        })
        .await?,
    ))
}

/// Parses a time bound: unix milliseconds, or a duration ago (`15m`, `2h`, `7d`).
fn parse_time_bound(v: &str, now_ms: i64) -> Result<i64, ApiError> {
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(ms);
    }
    let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: i64 = num.parse().map_err(|_| bad_time(v))?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad_time(v)),
    };
    Ok(now_ms - n * unit_ms)
}

fn bad_time(v: &str) -> ApiError {
    ApiError::BadRequest(format!(
        "invalid time {v:?}: give unix milliseconds or a duration ago such as 15m, 2h or 7d"
    ))
}

async fn usage(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<UsageReport>, ApiError> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let mut q = UsageQuery {
        since_ms: None,
        until_ms: None,
        by: vec![UsageBy::Function],
        granularity_ms: 1,
        price_per_million_requests: state.prices.per_million_requests,
        price_per_gb_second: state.prices.per_gb_second,
    };
    for (k, v) in query_pairs(query.as_deref()) {
        match k.as_str() {
            "since" => q.since_ms = Some(parse_time_bound(&v, now_ms)?),
            "until" => q.until_ms = Some(parse_time_bound(&v, now_ms)?),
            "by" => {
                q.by = UsageBy::parse_list(&v).ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "by {v:?}: group by function, version, hour or minute, or a subject and a time such as version,hour"
                    ))
                })?
            }
            "granularity" => {
                let d = parse_duration(&v)?;
                if d.is_zero() {
                    return Err(ApiError::BadRequest(
                        "granularity must be at least 1ms".into(),
                    ));
                }
                q.granularity_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}; accepted: since, until, by, granularity"
                )));
            }
        }
    }
    let s = state.clone();
    Ok(Json(blocking(move || Ok(s.store.usage(&q)?)).await?))
}

async fn invoke(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Result<Response, ApiError> {
    invoke_with(state, name, None, query, request).await
}

async fn invoke_version(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Result<Response, ApiError> {
    let version = version.parse::<u64>().map_err(|_| {
        ApiError::BadRequest(format!("version {version:?} is not a version number"))
    })?;
    invoke_with(state, name, Some(version), query, request).await
}

/// Calls a function with a POST of the request's body: its `alias` (query,
/// default `live`) or the given version.
async fn invoke_with(
    state: Arc<AppState>,
    name: String,
    version: Option<u64>,
    query: Option<String>,
    request: Request,
) -> Result<Response, ApiError> {
    validate_function_name(&name)?;
    let mut path = "/".to_string();
    let mut alias = LIVE_ALIAS.to_string();
    let mut run_async = false;
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "async" => {
                run_async = match v.as_ref() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(ApiError::BadRequest(format!(
                            "async {v:?} must be true or false"
                        )));
                    }
                }
            }
            "path" => {
                if !v.starts_with('/') {
                    return Err(ApiError::BadRequest(format!(
                        "path {v:?} must start with '/'"
                    )));
                }
                path = v.into_owned();
            }
            "alias" if version.is_none() => {
                validate_alias_name(&v)?;
                alias = v.into_owned();
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}; accepted: path, async{}",
                    if version.is_none() { ", alias" } else { "" }
                )));
            }
        }
    }
    let (parts, body) = request.into_parts();
    if run_async {
        let (status, job) = crate::events::enqueue_invoke(
            &state,
            crate::events::AsyncTarget {
                name: &name,
                alias: &alias,
                version,
                hops: 0,
            },
            path,
            &parts.headers,
            body,
        )
        .await?;
        return Ok((status, job).into_response());
    }
    let selector = match version {
        Some(v) => Selector::Version(v),
        None => Selector::Alias(&alias),
    };
    let (slot, function, load_us) =
        match front::resolve(&state, &name, selector, &parts.headers).await {
            Ok(found) => found,
            Err(e) => {
                // Say "not deployed" the way the store does for unknown functions.
                if !state.has_function(&name) {
                    return Err(StoreError::FunctionNotFound(name).into());
                }
                return Err(e);
            }
        };
    let mut builder = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://localhost{path}"))
        .header(header::HOST, "localhost");
    for (k, v) in &parts.headers {
        // The caller's token is for Verge, never for the guest.
        if k != header::AUTHORIZATION && k != header::HOST {
            builder = builder.header(k, v);
        }
    }
    let request = builder
        .body(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid invocation request: {e}")))?;
    let cause = front::Cause::http(request.headers(), load_us);
    Ok(front::run(&state, &slot, &function, request, false, cause).await)
}

async fn list_routes(State(state): State<Arc<AppState>>) -> Result<Json<Vec<Route>>, ApiError> {
    let s = state.clone();
    Ok(Json(blocking(move || Ok(s.store.routes()?)).await?))
}

async fn put_route(
    State(state): State<Arc<AppState>>,
    crate::error::JsonBody(req): crate::error::JsonBody<RouteRequest>,
) -> Result<Json<Route>, ApiError> {
    validate_function_name(&req.function)?;
    let path = normalize_route_path(&req.path)?;
    let host = req.host.as_deref().map(normalize_route_host).transpose()?;
    let alias = req.alias.unwrap_or_else(|| LIVE_ALIAS.to_string());
    validate_alias_name(&alias)?;
    let _guard = state.deploy_lock.lock().await;
    let (h, p, f, a) = (
        host.clone(),
        path.clone(),
        req.function.clone(),
        alias.clone(),
    );
    state
        .write(move |st| st.put_route(h.as_deref(), &p, &f, &a))
        .await?;
    Ok(Json(Route {
        host,
        path,
        function: req.function,
        alias,
    }))
}

async fn delete_route(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<StatusCode, ApiError> {
    let mut path = None;
    let mut host = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "path" => path = Some(normalize_route_path(&v)?),
            "host" => host = Some(normalize_route_host(&v)?),
            _ => {}
        }
    }
    let path = path.ok_or_else(|| {
        ApiError::BadRequest(
            "give the route to remove as ?path=/prefix (and &host=h if bound to a host)".into(),
        )
    })?;
    let _guard = state.deploy_lock.lock().await;
    state
        .write(move |st| st.delete_route(host.as_deref(), &path))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The properties the OpenAPI document gives schema `name`.
    fn documented(doc: &serde_json::Value, name: &str) -> Vec<String> {
        doc["components"]["schemas"][name]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("schema {name} missing from openapi.json"))
            .keys()
            .cloned()
            .collect()
    }

    /// Every field a serialized value has is documented in its schema (a
    /// field added to a wire type fails here until openapi.json has it).
    fn check(doc: &serde_json::Value, name: &str, value: impl serde::Serialize) {
        let v = serde_json::to_value(value).expect("serializes");
        let props = documented(doc, name);
        for key in v.as_object().expect("an object").keys() {
            assert!(
                props.contains(key),
                "{name}.{key} is serialized but not in openapi.json"
            );
        }
    }

    #[test]
    fn openapi_schemas_document_every_serialized_field() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        let s = || "x".to_string();
        let route = verge_spec::Route {
            host: Some(s()),
            path: "/x".into(),
            function: s(),
            alias: s(),
        };
        check(&doc, "Route", &route);
        check(
            &doc,
            "VersionInfo",
            verge_spec::VersionInfo {
                version: 1,
                sha256: s(),
                size: 1,
                timeout_ms: Some(1),
                memory_bytes: Some(1),
                concurrency: Some(1),
                request_body: Some(1),
                response_body: Some(1),
                log_bytes: Some(1),
                reuse: Some(2),
                prewarm: Some(1),
                reuse_fell_back: true,
                env: [(s(), s())].into(),
                kv_buckets: vec![s()],
                placement: vec![s()],
                grants: verge_spec::Grants {
                    allow_outbound: vec![s()],
                    allow_private: vec![s()],
                    outbound_ca: Some(s()),
                    allow_call: vec![s()],
                    config: [(s(), s())].into(),
                    secrets: vec![s()],
                },
                tenant: s(),
                created_at: s(),
                deployed_by: s(),
                aliases: vec![s()],
                code: Some(s()),
            },
        );
        check(
            &doc,
            "UsageRecord",
            UsageRecord {
                invocation_id: s(),
                function: s(),
                stdout: Some(s()),
                stderr: Some(s()),
                error: Some(s()),
                hops: 3,
                will_retry: true,
                parent_id: Some(s()),
                outbound_requests: 1,
                outbound_sent_bytes: 1,
                outbound_received_bytes: 1,
                outbound_wait_us: 1,
                ..UsageRecord::default()
            },
        );
        check(
            &doc,
            "TokenInfo",
            verge_spec::TokenInfo {
                name: s(),
                tenant: Some(s()),
                created_at: s(),
                scope: Some(s()),
            },
        );
        let row = verge_spec::UsageRow {
            key: s(),
            invocations: 1,
            gb_seconds_peak: 1.0,
            gb_seconds_configured: 1.0,
            cpu_seconds: 1.0,
            bytes_out: 1,
            outbound_requests: 1,
            outbound_bytes: 1,
            outbound_wait_seconds: 1.0,
            cost: 1.0,
        };
        check(&doc, "UsageRow", &row);
        check(
            &doc,
            "UsageReport",
            verge_spec::UsageReport {
                by: s(),
                since_ms: Some(1),
                until_ms: Some(1),
                granularity_ms: 1,
                price_per_million_requests: 1.0,
                price_per_gb_second: 1.0,
                rows: vec![row.clone()],
                total: row,
            },
        );
        check(
            &doc,
            "Problem",
            verge_spec::Problem {
                status: 400,
                title: s(),
                detail: s(),
                invocation_id: Some(s()),
            },
        );
        check(
            &doc,
            "Trigger",
            verge_bus::Trigger {
                id: s(),
                function: s(),
                alias: s(),
                ty: s(),
                source: Some(s()),
                subject_prefix: Some(s()),
                created_ms: 1,
            },
        );
        check(
            &doc,
            "Schedule",
            verge_bus::Schedule {
                id: s(),
                function: s(),
                alias: s(),
                cron: s(),
                tz: s(),
                missed: s(),
                next_ms: 1,
                last_ms: Some(1),
            },
        );
        check(
            &doc,
            "AsyncConfig",
            verge_bus::AsyncConfig {
                on_success: Some(s()),
                on_failure: Some(s()),
                ..verge_bus::AsyncConfig::default()
            },
        );
        check(
            &doc,
            "Job",
            verge_bus::Job {
                id: s(),
                function: s(),
                alias: s(),
                version: Some(1),
                payload: verge_bus::Payload::Invoke {
                    path: s(),
                    headers: vec![],
                    body: vec![],
                },
                hops: 1,
                attempts: 1,
                max_attempts: 1,
                state: verge_bus::JobState::Dead,
                created_ms: 1,
                expires_ms: 1,
                next_ms: 1,
                last_error: Some(s()),
                trigger: Some(s()),
            },
        );
    }

    /// Every route the router serves is described in the OpenAPI document.
    #[test]
    fn openapi_covers_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
        let paths = doc["paths"].as_object().expect("paths");
        for (method, path) in API_ROUTES {
            let op = &paths
                .get(*path)
                .unwrap_or_else(|| panic!("{path} missing from openapi.json"))
                [method.to_ascii_lowercase()];
            assert!(op.is_object(), "{method} {path} missing from openapi.json");
            assert!(
                op["responses"].is_object(),
                "{method} {path} has no responses"
            );
        }
        // And nothing documented that is not served.
        let served: usize = paths
            .values()
            .map(|p| {
                p.as_object()
                    .map_or(0, |o| o.keys().filter(|k| *k != "parameters").count())
            })
            .sum();
        assert_eq!(
            served,
            API_ROUTES.len(),
            "openapi.json documents routes the router lacks"
        );
    }

    #[test]
    fn deploy_query_parsing() {
        let o = DeployOptions::from_query(Some("route=%2Fa%2F&env=K%3DV&host=Ex.com")).unwrap();
        assert_eq!(o.env, vec![("K".to_string(), "V".to_string())]);
        assert_eq!(
            o.routes,
            vec![(Some("ex.com".to_string()), "/a".to_string())]
        );
        assert!(DeployOptions::from_query(Some("route=/v1/x")).is_err());
        assert!(DeployOptions::from_query(Some("bogus=1")).is_err());
        assert!(DeployOptions::from_query(Some("host=a.com")).is_err());
    }
}
