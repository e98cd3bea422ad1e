//! The key-value API (`/v1/kv/...`), the replication endpoints peers call
//! (`/v1/replication/...`), and the replicator that pushes this node's
//! deltas to its peers and repairs differences by digest.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json_, json};
use verge_kv::{Delta, Kv, KvError, RANGES, Value, validate_bucket};

use crate::api::{blocking, query_pairs};
use crate::error::ApiError;
use crate::state::AppState;

/// A key as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct KeyValue {
    pub bucket: String,
    pub key: String,
    /// `bytes` or `count`.
    pub kind: String,
    /// The value as text (bytes that are not UTF-8 are replaced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<i64>,
}

fn kv_err(e: KvError) -> ApiError {
    match e {
        KvError::WrongKind { .. } => ApiError::Conflict(e.to_string()),
        KvError::BucketName(_) => ApiError::BadRequest(e.to_string()),
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

pub(crate) async fn buckets(State(state): State<Arc<AppState>>) -> Result<Json<Json_>, ApiError> {
    let list = kv_blocking(&state, |kv| kv.buckets()).await?;
    Ok(Json(json!(
        list.into_iter()
            .map(|(bucket, entries)| json!({ "bucket": bucket, "entries": entries }))
            .collect::<Vec<_>>()
    )))
}

pub(crate) async fn keys(
    State(state): State<Arc<AppState>>,
    Path(bucket): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Json_>, ApiError> {
    validate_bucket(&bucket).map_err(kv_err)?;
    let (mut prefix, mut after, mut limit) = (String::new(), None, 1000usize);
    for (k, v) in query_pairs(query.as_deref()) {
        match k.as_str() {
            "prefix" => prefix = v,
            "after" => after = Some(v),
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| ApiError::BadRequest(format!("limit {v:?} must be 1..10000")))?
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}; accepted: prefix, after, limit"
                )));
            }
        }
    }
    let keys = kv_blocking(&state, move |kv| {
        kv.keys(&bucket, &prefix, after.as_deref(), limit)
    })
    .await?;
    Ok(Json(json!({ "keys": keys })))
}

pub(crate) async fn get(
    State(state): State<Arc<AppState>>,
    Path((bucket, key)): Path<(String, String)>,
) -> Result<Json<KeyValue>, ApiError> {
    validate_bucket(&bucket).map_err(kv_err)?;
    let (b, k) = (bucket.clone(), key.clone());
    let v = kv_blocking(&state, move |kv| kv.get(&b, &k)).await?;
    match v {
        None => Err(ApiError::NotFound(format!(
            "no key {key:?} in bucket {bucket:?}; list keys with `verge kv ls {bucket}`"
        ))),
        Some(Value::Bytes(b)) => Ok(Json(KeyValue {
            bucket,
            key,
            kind: "bytes".into(),
            value: Some(String::from_utf8_lossy(&b).into_owned()),
            count: None,
        })),
        Some(Value::Count(n)) => Ok(Json(KeyValue {
            bucket,
            key,
            kind: "count".into(),
            value: None,
            count: Some(n),
        })),
    }
}

pub(crate) async fn put(
    State(state): State<Arc<AppState>>,
    Path((bucket, key)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    check_key(&key)?;
    kv_blocking(&state, move |kv| kv.set(&bucket, &key, &body)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn delete(
    State(state): State<Arc<AppState>>,
    Path((bucket, key)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    check_key(&key)?;
    kv_blocking(&state, move |kv| kv.delete(&bucket, &key)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn incr(
    State(state): State<Arc<AppState>>,
    Path((bucket, key)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Json<Json_>, ApiError> {
    check_key(&key)?;
    let mut by = 1i64;
    for (k, v) in query_pairs(query.as_deref()) {
        match k.as_str() {
            "by" => {
                by = v
                    .parse()
                    .map_err(|_| ApiError::BadRequest(format!("by {v:?} is not a whole number")))?
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}; accepted: by"
                )));
            }
        }
    }
    let n = kv_blocking(&state, move |kv| kv.increment(&bucket, &key, by)).await?;
    Ok(Json(json!({ "count": n })))
}

/// Body of `POST /v1/replication/deltas`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeltaBatch {
    pub from: u64,
    pub deltas: Vec<Delta>,
}

pub(crate) async fn receive_deltas(
    State(state): State<Arc<AppState>>,
    Json(batch): Json<DeltaBatch>,
) -> Result<Json<Json_>, ApiError> {
    let n = batch.deltas.len();
    let changed = kv_blocking(&state, move |kv| kv.apply(&batch.deltas)).await?;
    Ok(Json(json!({ "received": n, "changed": changed.len() })))
}

pub(crate) async fn digest(
    State(state): State<Arc<AppState>>,
    Path(bucket): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    validate_bucket(&bucket).map_err(kv_err)?;
    let d = kv_blocking(&state, move |kv| kv.digest(&bucket)).await?;
    Ok(Json(json!({ "ranges": d })))
}

/// Body of `POST /v1/replication/ranges`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RangeRequest {
    pub bucket: String,
    pub ranges: Vec<usize>,
}

pub(crate) async fn ranges(
    State(state): State<Arc<AppState>>,
    Json(req): Json<RangeRequest>,
) -> Result<Json<Vec<Delta>>, ApiError> {
    validate_bucket(&req.bucket).map_err(kv_err)?;
    Ok(Json(
        kv_blocking(&state, move |kv| {
            kv.entries_in_ranges(&req.bucket, &req.ranges)
        })
        .await?,
    ))
}

/// A peer this node replicates to.
#[derive(Debug, Clone)]
pub struct Peer {
    pub url: String,
    pub token: String,
}

/// Pushes pending deltas to `peer` every 200 ms, and compares digests
/// every 2 s to repair what was lost (pulling and pushing differing ranges).
pub(crate) async fn replicate(state: Arc<AppState>, peer: Peer) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "no HTTP client for replication");
            return;
        }
    };
    let base = peer.url.trim_end_matches('/').to_string();
    let mut tick = 0u64;
    let mut down = false;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        tick += 1;
        let ok = push(&state, &client, &base, &peer).await
            && (!tick.is_multiple_of(10) || repair(&state, &client, &base, &peer).await);
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

async fn push(state: &Arc<AppState>, client: &reqwest::Client, base: &str, peer: &Peer) -> bool {
    loop {
        let key = base.to_string();
        let Ok((deltas, upto)) = kv_blocking(state, move |kv| kv.pending(&key, 2000)).await else {
            return false;
        };
        if deltas.is_empty() {
            return true;
        }
        let n = deltas.len();
        let body = DeltaBatch {
            from: state.kv.node(),
            deltas,
        };
        let sent = client
            .post(format!("{base}/v1/replication/deltas"))
            .bearer_auth(&peer.token)
            .json(&body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                let key = base.to_string();
                if kv_blocking(state, move |kv| kv.ack(&key, upto))
                    .await
                    .is_err()
                {
                    return false;
                }
                if n < 2000 {
                    return true;
                }
            }
            _ => return false,
        }
    }
}

async fn repair(state: &Arc<AppState>, client: &reqwest::Client, base: &str, peer: &Peer) -> bool {
    let Ok(ours) = kv_blocking(state, |kv| kv.buckets()).await else {
        return false;
    };
    for (bucket, _) in ours {
        let b = bucket.clone();
        let Ok(local) = kv_blocking(state, move |kv| kv.digest(&b)).await else {
            return false;
        };
        let remote: Json_ = match client
            .get(format!("{base}/v1/replication/digest/{bucket}"))
            .bearer_auth(&peer.token)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => match r.json().await {
                Ok(v) => v,
                Err(_) => return false,
            },
            _ => return false,
        };
        let differing: Vec<usize> = (0..RANGES)
            .filter(|i| remote["ranges"][*i].as_str() != Some(local[*i].as_str()))
            .collect();
        if differing.is_empty() {
            continue;
        }
        // Pull theirs, push ours: both sides end with the join.
        let theirs: Vec<Delta> = match client
            .post(format!("{base}/v1/replication/ranges"))
            .bearer_auth(&peer.token)
            .json(&RangeRequest {
                bucket: bucket.clone(),
                ranges: differing.clone(),
            })
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => r.json().await.unwrap_or_default(),
            _ => return false,
        };
        let b = bucket.clone();
        let d = differing.clone();
        let Ok(mine) = kv_blocking(state, move |kv| {
            kv.apply(&theirs)?;
            kv.entries_in_ranges(&b, &d)
        })
        .await
        else {
            return false;
        };
        let pushed = client
            .post(format!("{base}/v1/replication/deltas"))
            .bearer_auth(&peer.token)
            .json(&DeltaBatch {
                from: state.kv.node(),
                deltas: mine,
            })
            .send()
            .await;
        if !pushed.is_ok_and(|r| r.status().is_success()) {
            return false;
        }
        tracing::info!(peer = %base, %bucket, ranges = differing.len(), "repaired key ranges by digest");
    }
    true
}
