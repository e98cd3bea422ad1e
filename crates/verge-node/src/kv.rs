//! The key-value API (`/v1/kv/...`), the replication endpoints peers call
//! (`/v1/replication/...`: the server side of verge-kv's sync protocol),
//! the HTTP transport and the loop that syncs with each `--peer`, and
//! tombstone collection.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path, RawQuery, State};
use http::StatusCode;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json_, json};
use verge_kv::sync::{
    Hello, HelloReply, Pull, Pulled, Push, PushReply, RangeRequest, SnapshotPage, SnapshotRequest,
    SyncError, Syncer, Transport,
};
use verge_kv::{Delta, Kv, KvError, Value, validate_bucket};

use crate::api::{blocking, query_pairs};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// A key as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct KeyValue {
    pub bucket: String,
    pub key: String,
    /// `bytes` or `count`.
    pub kind: String,
    /// The value as text (bytes that are not UTF-8 are replaced: ask with
    /// `Accept: application/octet-stream` for the exact bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<i64>,
}

fn kv_err(e: KvError) -> ApiError {
    match e {
        KvError::WrongKind { .. } | KvError::CounterOverflow { .. } => {
            ApiError::Conflict(e.to_string())
        }
        KvError::BucketName(_) => ApiError::BadRequest(e.to_string()),
        KvError::ValueTooLarge { .. } => ApiError::TooLarge(e.to_string()),
        KvError::Db(ref db) if verge_store::is_sqlite_full(db) => ApiError::DiskFull(e.to_string()),
        other => ApiError::Internal(other.to_string()),
    }
}

fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > 1024 {
        return Err(ApiError::BadRequest(format!(
            "key {key:?}: give 1 to 1024 bytes"
        )));
    }
    Ok(())
}

async fn kv_blocking<T: Send + 'static>(
    state: &Arc<AppState>,
    f: impl FnOnce(&Kv) -> Result<T, KvError> + Send + 'static,
) -> Result<T, ApiError> {
    let s = state.clone();
    blocking(move || f(&s.kv).map_err(kv_err)).await
}

/// Splits a query into the tenant asked for and the other parameters.
fn tenant_and_rest(
    caller: &Caller,
    query: Option<&str>,
) -> Result<(String, Vec<(String, String)>), ApiError> {
    let mut asked = None;
    let mut rest = Vec::new();
    for (k, v) in query_pairs(query) {
        if k == "tenant" {
            asked = Some(v);
        } else {
            rest.push((k, v));
        }
    }
    Ok((caller.kv_tenant(asked.as_deref())?, rest))
}

/// A `limit=` query parameter: 1 to 10,000.
fn parse_limit(v: &str) -> Result<usize, ApiError> {
    v.parse()
        .ok()
        .filter(|n| (1..=10_000).contains(n))
        .ok_or_else(|| ApiError::BadRequest(format!("limit {v:?} must be 1..10000")))
}

fn no_params(rest: &[(String, String)], accepted: &str) -> Result<(), ApiError> {
    match rest.first() {
        Some((k, _)) => Err(ApiError::BadRequest(format!(
            "unknown query parameter {k:?}; accepted: {accepted}"
        ))),
        None => Ok(()),
    }
}

/// A bucket of the caller's tenant, as stored.
fn scoped(
    caller: &Caller,
    query: Option<&str>,
    bucket: &str,
) -> Result<(String, Vec<(String, String)>), ApiError> {
    validate_bucket(bucket).map_err(kv_err)?;
    let (tenant, rest) = tenant_and_rest(caller, query)?;
    Ok((verge_kv::qualify(&tenant, bucket), rest))
}

pub(crate) async fn buckets(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> Result<Json<Json_>, ApiError> {
    let (asked, rest) = {
        let pairs = query_pairs(query.as_deref());
        let asked = pairs
            .iter()
            .find(|(k, _)| k == "tenant")
            .map(|(_, v)| v.clone());
        let rest: Vec<(String, String)> =
            pairs.into_iter().filter(|(k, _)| k != "tenant").collect();
        (asked, rest)
    };
    no_params(&rest, "tenant")?;
    // An admin token without `tenant=` sees every tenant's buckets.
    let only = match (&caller.tenant, &asked) {
        (None, None) => None,
        _ => Some(caller.kv_tenant(asked.as_deref())?),
    };
    let list = kv_blocking(&state, |kv| kv.buckets()).await?;
    Ok(Json(json!(
        list.into_iter()
            .filter_map(|(stored, entries)| {
                let (tenant, bucket) = verge_kv::split(&stored);
                only.as_deref()
                    .is_none_or(|t| t == tenant)
                    .then(|| json!({ "bucket": bucket, "tenant": tenant, "entries": entries }))
            })
            .collect::<Vec<_>>()
    )))
}

pub(crate) async fn keys(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(bucket): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Json_>, ApiError> {
    let (stored, rest) = scoped(&caller, query.as_deref(), &bucket)?;
    let (mut prefix, mut after, mut limit) = (String::new(), None, 1000usize);
    for (k, v) in rest {
        match k.as_str() {
            "prefix" => prefix = v,
            "after" => after = Some(v),
            "limit" => limit = parse_limit(&v)?,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}; accepted: prefix, after, limit, tenant"
                )));
            }
        }
    }
    let keys = kv_blocking(&state, move |kv| {
        kv.keys(&stored, &prefix, after.as_deref(), limit)
    })
    .await?;
    Ok(Json(json!({ "keys": keys })))
}

/// Whether the caller asked for the value's bytes rather than JSON.
fn wants_raw(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().starts_with("application/octet-stream"))
}

/// Reads a key: JSON by default (the value as text), or with
/// `Accept: application/octet-stream` the exact bytes (a counter's value as
/// decimal text).
pub(crate) async fn get(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((bucket, key)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: http::HeaderMap,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let (stored, rest) = scoped(&caller, query.as_deref(), &bucket)?;
    no_params(&rest, "tenant")?;
    let k = key.clone();
    let v = kv_blocking(&state, move |kv| kv.get(&stored, &k)).await?;
    let Some(v) = v else {
        return Err(ApiError::NotFound(format!(
            "no key {key:?} in bucket {bucket:?}; list keys with `verge kv ls {bucket}`"
        )));
    };
    if wants_raw(&headers) {
        let (kind, bytes) = match v {
            Value::Bytes(b) => ("bytes", b),
            Value::Count(n) => ("count", n.to_string().into_bytes()),
        };
        return Ok((
            [
                (http::header::CONTENT_TYPE, "application/octet-stream"),
                (http::header::HeaderName::from_static("verge-kv-kind"), kind),
            ],
            bytes,
        )
            .into_response());
    }
    let body = match v {
        Value::Bytes(b) => KeyValue {
            bucket,
            key,
            kind: "bytes".into(),
            value: Some(String::from_utf8_lossy(&b).into_owned()),
            count: None,
        },
        Value::Count(n) => KeyValue {
            bucket,
            key,
            kind: "count".into(),
            value: None,
            count: Some(n),
        },
    };
    Ok(Json(body).into_response())
}

pub(crate) async fn put(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((bucket, key)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    check_key(&key)?;
    let (stored, rest) = scoped(&caller, query.as_deref(), &bucket)?;
    no_params(&rest, "tenant")?;
    kv_blocking(&state, move |kv| kv.set(&stored, &key, &body)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((bucket, key)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<StatusCode, ApiError> {
    check_key(&key)?;
    let (stored, rest) = scoped(&caller, query.as_deref(), &bucket)?;
    no_params(&rest, "tenant")?;
    kv_blocking(&state, move |kv| kv.delete(&stored, &key)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn incr(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((bucket, key)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Json<Json_>, ApiError> {
    check_key(&key)?;
    let (stored, rest) = scoped(&caller, query.as_deref(), &bucket)?;
    let mut by = 1i64;
    for (k, v) in rest {
        match k.as_str() {
            "by" => {
                by = v
                    .parse()
                    .map_err(|_| ApiError::BadRequest(format!("by {v:?} is not a whole number")))?
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}; accepted: by, tenant"
                )));
            }
        }
    }
    let n = kv_blocking(&state, move |kv| kv.increment(&stored, &key, by)).await?;
    Ok(Json(json!({ "count": n })))
}

fn sync_err(e: KvError) -> ApiError {
    match e {
        KvError::NotAdmitted { .. } => ApiError::Conflict(e.to_string()),
        other => kv_err(other),
    }
}

async fn serve<T: Send + 'static>(
    state: &Arc<AppState>,
    f: impl FnOnce(&Kv) -> Result<T, KvError> + Send + 'static,
) -> Result<Json<T>, ApiError> {
    let s = state.clone();
    Ok(Json(blocking(move || f(&s.kv).map_err(sync_err)).await?))
}

pub(crate) async fn hello(
    State(state): State<Arc<AppState>>,
    crate::error::JsonBody(req): crate::error::JsonBody<Hello>,
) -> Result<Json<HelloReply>, ApiError> {
    serve(&state, move |kv| kv.serve_hello(&req)).await
}

pub(crate) async fn push(
    State(state): State<Arc<AppState>>,
    crate::error::JsonBody(req): crate::error::JsonBody<Push>,
) -> Result<Json<PushReply>, ApiError> {
    serve(&state, move |kv| kv.serve_push(&req)).await
}

pub(crate) async fn pull(
    State(state): State<Arc<AppState>>,
    crate::error::JsonBody(req): crate::error::JsonBody<Pull>,
) -> Result<Json<Pulled>, ApiError> {
    serve(&state, move |kv| kv.serve_pull(&req)).await
}

pub(crate) async fn replica_buckets(
    State(state): State<Arc<AppState>>,
) -> Result<Json<Vec<String>>, ApiError> {
    serve(&state, |kv| {
        Ok(kv.buckets()?.into_iter().map(|(b, _)| b).collect())
    })
    .await
}

pub(crate) async fn digest(
    State(state): State<Arc<AppState>>,
    Path(bucket): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    verge_kv::validate_stored(&bucket).map_err(kv_err)?;
    let d = kv_blocking(&state, move |kv| kv.digest(&bucket)).await?;
    Ok(Json(json!({ "ranges": d })))
}

pub(crate) async fn ranges(
    State(state): State<Arc<AppState>>,
    crate::error::JsonBody(req): crate::error::JsonBody<RangeRequest>,
) -> Result<Json<Vec<Delta>>, ApiError> {
    verge_kv::validate_stored(&req.bucket).map_err(kv_err)?;
    serve(&state, move |kv| {
        kv.entries_in_ranges(&req.bucket, &req.ranges)
    })
    .await
}

pub(crate) async fn snapshot(
    State(state): State<Arc<AppState>>,
    crate::error::JsonBody(req): crate::error::JsonBody<SnapshotRequest>,
) -> Result<Json<SnapshotPage>, ApiError> {
    serve(&state, move |kv| kv.serve_snapshot(&req)).await
}

pub(crate) async fn status(State(state): State<Arc<AppState>>) -> Result<Json<Json_>, ApiError> {
    let stats = kv_blocking(&state, |kv| kv.stats()).await?;
    let mut v = serde_json::to_value(&stats).map_err(|e| ApiError::Internal(e.to_string()))?;
    v["node"] = json!(format!("{:016x}", stats.node));
    v["grace_ms"] = json!(u64::try_from(state.kv_grace.as_millis()).unwrap_or(u64::MAX));
    v["peers"] = json!(state.peer_urls);
    if let Some(list) = v["replicas"].as_array_mut() {
        for r in list {
            if let Some(n) = r["node"].as_u64() {
                r["node"] = json!(format!("{n:016x}"));
            }
        }
    }
    Ok(Json(v))
}

pub(crate) async fn stale(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<Json_>, ApiError> {
    let mut limit = 100usize;
    for (k, v) in query_pairs(query.as_deref()) {
        match k.as_str() {
            "limit" => limit = parse_limit(&v)?,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}; accepted: limit"
                )));
            }
        }
    }
    let list = kv_blocking(&state, move |kv| kv.stale(limit)).await?;
    let rows: Vec<Json_> = list
        .into_iter()
        .map(|w| {
            let value = match verge_kv::read_entry(&w.entry) {
                Some(Value::Bytes(b)) => json!({ "value": String::from_utf8_lossy(&b) }),
                Some(Value::Count(n)) => json!({ "count": n }),
                None => json!({ "deleted": true }),
            };
            json!({
                "id": w.id,
                "bucket": w.bucket,
                "key": w.key,
                "write": value,
                "stamp_ms": w.entry.stamp.wall_ms,
                "reason": w.reason,
                "at": verge_spec::rfc3339_ms(w.at_ms as i64),
            })
        })
        .collect();
    Ok(Json(json!(rows)))
}

/// A peer this node replicates with.
#[derive(Debug, Clone)]
pub struct Peer {
    pub url: String,
    pub token: String,
}

/// The HTTP transport: the sync protocol's calls as `/v1/replication/...`
/// requests to the peer, made from a blocking thread.
struct Http {
    client: reqwest::Client,
    base: String,
    token: String,
    rt: tokio::runtime::Handle,
}

impl Http {
    fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Req>,
    ) -> Result<Resp, SyncError> {
        self.rt.block_on(async {
            let mut req = self
                .client
                .request(method, format!("{}{path}", self.base))
                .bearer_auth(&self.token);
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| SyncError::Link(e.to_string()))?;
            let status = resp.status();
            if status == StatusCode::CONFLICT {
                let text = resp.text().await.unwrap_or_default();
                return Err(SyncError::Refused(text));
            }
            if !status.is_success() {
                let text = resp.text().await.unwrap_or_default();
                return Err(SyncError::Link(format!("{path}: {status}: {text}")));
            }
            resp.json()
                .await
                .map_err(|e| SyncError::Link(format!("{path}: unreadable reply: {e}")))
        })
    }
}

impl Transport for Http {
    fn hello(&self, req: &Hello) -> Result<HelloReply, SyncError> {
        self.call(reqwest::Method::POST, "/v1/replication/hello", Some(req))
    }
    fn push(&self, req: &Push) -> Result<PushReply, SyncError> {
        self.call(reqwest::Method::POST, "/v1/replication/push", Some(req))
    }
    fn pull(&self, req: &Pull) -> Result<Pulled, SyncError> {
        self.call(reqwest::Method::POST, "/v1/replication/pull", Some(req))
    }
    fn buckets(&self) -> Result<Vec<String>, SyncError> {
        self.call::<(), _>(reqwest::Method::GET, "/v1/replication/buckets", None)
    }
    fn digest(&self, bucket: &str) -> Result<Vec<String>, SyncError> {
        let v: Json_ = self.call::<(), _>(
            reqwest::Method::GET,
            &format!("/v1/replication/digest/{bucket}"),
            None,
        )?;
        serde_json::from_value(v["ranges"].clone())
            .map_err(|e| SyncError::Link(format!("digest: {e}")))
    }
    fn ranges(&self, req: &RangeRequest) -> Result<Vec<Delta>, SyncError> {
        self.call(reqwest::Method::POST, "/v1/replication/ranges", Some(req))
    }
    fn snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotPage, SyncError> {
        self.call(reqwest::Method::POST, "/v1/replication/snapshot", Some(req))
    }
}

/// Syncs with `peer` over HTTP ([`replicate_with`]).
pub(crate) async fn replicate(state: Arc<AppState>, peer: Peer) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "no HTTP client for replication");
            return;
        }
    };
    let base = peer.url.trim_end_matches('/').to_string();
    let transport = Arc::new(Http {
        client,
        base: base.clone(),
        token: peer.token.clone(),
        rt: tokio::runtime::Handle::current(),
    });
    replicate_with(state, base, transport).await
}

/// On a cluster: syncs with every other node whose heartbeat is fresh, over
/// NATS request/reply, and answers their requests. Nodes that appear later
/// are picked up within a few seconds; the loops end with this task.
pub(crate) async fn mesh(state: Arc<AppState>) {
    let Some(cluster) = state.cluster.clone() else {
        return;
    };
    cluster.serve_kv(state.kv.clone(), &state.node_name);
    let mut peers = std::collections::HashSet::new();
    let mut loops = tokio::task::JoinSet::new();
    loop {
        if let Ok(nodes) = cluster.nodes().await {
            for n in nodes {
                if n.name != state.node_name && peers.insert(n.name.clone()) {
                    tracing::info!(peer = %n.name, "key-value replication with a node of the cluster, over NATS");
                    let transport =
                        Arc::new(verge_cluster::NatsKvTransport::new(&cluster, &n.name));
                    loops.spawn(replicate_with(
                        state.clone(),
                        format!("nats:{}", n.name),
                        transport,
                    ));
                }
            }
        }
        tokio::time::sleep(verge_cluster::HEARTBEAT).await;
    }
}

/// Syncs with one peer every 200 ms (hello, pull, push), with digest repair
/// every 2 s. A failed round leaves writes local; the next one retries.
async fn replicate_with(
    state: Arc<AppState>,
    base: String,
    transport: Arc<dyn Transport + Send + Sync>,
) {
    let syncer = Arc::new(std::sync::Mutex::new(Syncer::new(base.clone())));
    let mut tick = 0u64;
    let mut down = false;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        tick += 1;
        let repair = tick.is_multiple_of(10);
        let (s, t, sy) = (state.clone(), transport.clone(), syncer.clone());
        let result = tokio::task::spawn_blocking(move || {
            let mut syncer = sy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            syncer.round(&s.kv, &*t, repair)
        })
        .await;
        let ok = match result {
            Ok(Ok(round)) => {
                if round.repaired > 0 {
                    tracing::info!(peer = %base, ranges = round.repaired, "repaired key ranges by digest");
                }
                if let Some(rb) = round.rebootstrapped {
                    tracing::warn!(
                        peer = %base, stale = rb.stale, entries = rb.entries,
                        old_node = %format!("{:016x}", rb.old_node), new_node = %format!("{:016x}", rb.new_node),
                        "key-value replica re-bootstrapped from the peer's snapshot; unsent writes set aside as stale (verge kv stale)"
                    );
                    state.emit(
                        crate::events::types::KV_REBOOTSTRAPPED,
                        &state.node_name,
                        json!({
                            "peer": base,
                            "stale": rb.stale,
                            "entries": rb.entries,
                            "old_replica": format!("{:016x}", rb.old_node),
                            "new_replica": format!("{:016x}", rb.new_node),
                        }),
                    );
                }
                true
            }
            Ok(Err(e)) => {
                if !down {
                    tracing::debug!(peer = %base, error = %e, "replication round failed");
                }
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "replication round panicked");
                false
            }
        };
        if ok == down {
            down = !ok;
            if down {
                tracing::warn!(peer = %base, "replication link down; writes stay local and are sent when it returns");
            } else {
                tracing::info!(peer = %base, "replication link up");
            }
        }
    }
}

/// Collects tombstones and expires silent replicas, every quarter of the
/// grace bound (between 100 ms and 2 s).
pub(crate) async fn collect(state: Arc<AppState>) {
    let grace = state.kv_grace;
    let every = (grace / 4).clamp(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        tokio::time::sleep(every).await;
        let ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        match kv_blocking(&state, move |kv| kv.collect(ms)).await {
            Ok(r) => {
                if r.collected > 0 {
                    tracing::debug!(collected = r.collected, "tombstones collected");
                }
                for node in r.expired {
                    tracing::warn!(replica = %format!("{node:016x}"), "key-value replica silent beyond the grace bound: expired; it re-bootstraps when it returns");
                }
            }
            Err(e) => tracing::warn!(error = %e, "tombstone collection failed"),
        }
    }
}
