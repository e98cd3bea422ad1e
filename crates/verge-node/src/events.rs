//! Events: ingestion (`POST /v1/events`), triggers, asynchronous
//! invocations, dead letters, schedules, the platform's own events, and the
//! dispatcher that delivers queued jobs to functions.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, RawQuery, Request, State};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use verge_bus::{AsyncConfig, Bus, Job, JobState, Payload, Schedule, Trigger};
use verge_spec::{
    CloudEvent, LIVE_ALIAS, PLATFORM_TYPE_PREFIX, parse_duration, validate_alias_name,
    validate_function_name,
};

use crate::api::{blocking, query_pairs};
use crate::error::ApiError;
use crate::front;
use crate::state::{AppState, Selector};

/// Largest body of `POST /v1/events`.
const MAX_EVENTS_BODY: usize = 4 << 20;

/// Jobs delivered at once by this node.
pub(crate) const JOB_WORKERS: usize = 64;

/// The platform's event types (all under [`PLATFORM_TYPE_PREFIX`]).
pub(crate) mod types {
    pub const FUNCTION_DEPLOYED: &str = "dev.verge.function.deployed";
    pub const FUNCTION_DELETED: &str = "dev.verge.function.deleted";
    pub const VERSION_CREATED: &str = "dev.verge.version.created";
    pub const ALIAS_CHANGED: &str = "dev.verge.alias.changed";
    pub const INVOCATION_FAILED: &str = "dev.verge.invocation.failed";
    pub const INVOCATION_TIMED_OUT: &str = "dev.verge.invocation.timedout";
    pub const JOB_DEAD_LETTERED: &str = "dev.verge.job.deadlettered";
    pub const NODE_STARTED: &str = "dev.verge.node.started";
    pub const NODE_STOPPING: &str = "dev.verge.node.stopping";
    pub const NODE_JOINED: &str = "dev.verge.node.joined";
    pub const NODE_LOST: &str = "dev.verge.node.lost";
    pub const NODE_RETURNED: &str = "dev.verge.node.returned";
    pub const SCHEDULE_FIRED: &str = "dev.verge.schedule.fired";
    pub const KV_CHANGED: &str = "dev.verge.kv.changed";
    pub const KV_REBOOTSTRAPPED: &str = "dev.verge.kv.rebootstrapped";
    pub const EDGE_OUTAGE_LIMIT: &str = "dev.verge.edge.outage_limit";
}

fn random_id() -> String {
    let mut b = [0u8; 12];
    rand::fill(&mut b);
    hex::encode(b)
}

/// A platform event: source `/verge/nodes/<node>`, time now.
pub(crate) fn platform_event(node: &str, ty: &str, subject: &str, data: Value) -> CloudEvent {
    debug_assert!(ty.starts_with(PLATFORM_TYPE_PREFIX));
    let mut e = CloudEvent::new(random_id(), format!("/verge/nodes/{node}"), ty).with_data(data);
    e.subject = Some(subject.to_string());
    e.time = Some(verge_spec::rfc3339_ms(verge_bus::now_ms()));
    e
}

/// Publishes events and wakes the dispatcher; failures are logged (the
/// platform's own events never fail the action that caused them).
pub(crate) fn publish(bus: &dyn Bus, wake: &tokio::sync::Notify, events: Vec<CloudEvent>) {
    match bus.publish(&events) {
        Ok(p) => {
            if !p.queued.is_empty() {
                wake.notify_one();
            }
            if !p.dead.is_empty() {
                tracing::warn!(jobs = ?p.dead, "events dead-lettered at the hop limit");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not publish platform events"),
    }
}

/// Platform events stored off the request path: the usage sink queues an
/// invocation's failure here, and [`outbox`] commits what waits in one bus
/// transaction. Publishing in the sink made every failing request's task
/// wait for a commit (a SQLite transaction with `synchronous=FULL`) on a
/// runtime thread, so that a storm of failures slowed every neighbour.
#[derive(Default)]
pub(crate) struct Outbox {
    pending: std::sync::Mutex<Vec<CloudEvent>>,
    ready: tokio::sync::Notify,
    dropped: std::sync::atomic::AtomicU64,
}

/// Events an [`Outbox`] holds before it drops new ones (and says so) rather
/// than grow without bound when the bus cannot keep up.
pub(crate) const OUTBOX_MAX: usize = 10_000;

impl Outbox {
    /// Queues an event; never blocks on the disk.
    pub(crate) fn push(&self, event: CloudEvent) {
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pending.len() >= OUTBOX_MAX {
            drop(pending);
            let n = self
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if (n + 1).is_power_of_two() {
                tracing::error!(dropped = n + 1, "platform event queue full; events dropped");
            }
            return;
        }
        pending.push(event);
        drop(pending);
        self.ready.notify_one();
    }

    fn take(&self) -> Vec<CloudEvent> {
        std::mem::take(
            &mut *self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Publishes what is queued now (at shutdown).
    pub(crate) fn flush(&self, bus: &dyn Bus, wake: &tokio::sync::Notify) {
        let batch = self.take();
        if !batch.is_empty() {
            publish(bus, wake, batch);
        }
    }
}

/// Publishes what the outbox holds, everything waiting in one transaction.
pub(crate) async fn outbox(state: Arc<AppState>, outbox: Arc<Outbox>) {
    loop {
        outbox.ready.notified().await;
        let batch = outbox.take();
        if batch.is_empty() {
            continue;
        }
        let s = state.clone();
        if let Err(e) = blocking(move || {
            publish(&*s.bus, &s.wake, batch);
            Ok(())
        })
        .await
        {
            tracing::warn!(error = %e, "could not publish platform events");
        }
    }
}

impl AppState {
    /// Emits a platform event: queued in the outbox, committed off the
    /// runtime's threads (never a SQLite commit in a handler or a task).
    pub(crate) fn emit(&self, ty: &str, subject: &str, data: Value) {
        self.outbox
            .push(platform_event(&self.node_name, ty, subject, data));
    }

    /// Emits a platform event on behalf of something at `hops` in an event
    /// chain (an invocation, a job): the event carries one hop more, so a
    /// function triggered by the events its own failures cause stops at
    /// the hop limit.
    pub(crate) fn emit_caused(&self, ty: &str, subject: &str, data: Value, hops: u32) {
        let mut e = platform_event(&self.node_name, ty, subject, data);
        e.set_hops(verge_spec::next_hop(hops));
        self.outbox.push(e);
    }
}

/// What `POST /v1/events` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct Accepted {
    pub accepted: usize,
    pub ids: Vec<String>,
    /// Deliveries queued for triggers.
    pub deliveries: usize,
}

/// `POST /v1/events`: structured, batch or binary mode.
pub(crate) async fn ingest(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_EVENTS_BODY).await.map_err(|_| {
        ApiError::TooLarge(format!(
            "the events body is larger than {MAX_EVENTS_BODY} bytes; send fewer events per batch"
        ))
    })?;
    let ct = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let headers = parts
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)));
    let parsed = CloudEvent::from_http(ct, headers, &body);
    let mut events = parsed.map_err(|e| {
        ApiError::BadRequest(format!(
            "{e}; see the CloudEvents 1.0 specification for the attributes"
        ))
    })?;
    let now = verge_bus::now_ms();
    for e in &mut events {
        if e.time.is_none() {
            e.time = Some(verge_spec::rfc3339_ms(now));
        }
    }
    let ids = events.iter().map(|e| e.id.clone()).collect();
    let n = events.len();
    let s = state.clone();
    let published = blocking(move || Ok(s.bus.publish(&events)?)).await?;
    state.wake.notify_one();
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            accepted: n,
            ids,
            deliveries: published.queued.len(),
        }),
    ))
}

/// Body of `POST /v1/triggers`.
#[derive(Debug, Serialize, Deserialize)]
pub struct TriggerRequest {
    pub function: String,
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub subject_prefix: Option<String>,
    #[serde(default)]
    pub alias: Option<String>,
}

pub(crate) async fn add_trigger(
    State(state): State<Arc<AppState>>,
    crate::error::JsonBody(req): crate::error::JsonBody<TriggerRequest>,
) -> Result<(StatusCode, Json<Trigger>), ApiError> {
    validate_function_name(&req.function)?;
    let alias = req.alias.unwrap_or_else(|| LIVE_ALIAS.to_string());
    validate_alias_name(&alias)?;
    if !state.has_function(&req.function) {
        return Err(verge_store::StoreError::FunctionNotFound(req.function).into());
    }
    let s = state.clone();
    let t = blocking(move || {
        Ok(s.bus.add_trigger(
            &req.function,
            &alias,
            &req.ty,
            req.source.as_deref(),
            req.subject_prefix.as_deref(),
        )?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(t)))
}

pub(crate) async fn list_triggers(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<Trigger>>, ApiError> {
    let function = function_filter(query.as_deref())?;
    let s = state.clone();
    Ok(Json(
        blocking(move || Ok(s.bus.triggers(function.as_deref())?)).await?,
    ))
}

pub(crate) async fn delete_trigger(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let s = state.clone();
    blocking(move || Ok(s.bus.remove_trigger(&id)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn function_filter(query: Option<&str>) -> Result<Option<String>, ApiError> {
    let mut function = None;
    for (k, v) in query_pairs(query) {
        match k.as_str() {
            "function" => {
                validate_function_name(&v)?;
                function = Some(v);
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}; accepted: function"
                )));
            }
        }
    }
    Ok(function)
}

/// What an asynchronous invocation runs: a function's alias (at run
/// time) or a pinned version, at a hop of its chain.
pub(crate) struct AsyncTarget<'a> {
    pub name: &'a str,
    pub alias: &'a str,
    pub version: Option<u64>,
    pub hops: u32,
}

/// Queues an asynchronous invocation; answers 202 with its id.
pub(crate) async fn enqueue_invoke(
    state: &Arc<AppState>,
    target: AsyncTarget<'_>,
    path: String,
    headers: &HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    let AsyncTarget {
        name,
        alias,
        version,
        hops,
    } = target;
    if !state.has_function(name) {
        return Err(verge_store::StoreError::FunctionNotFound(name.to_string()).into());
    }
    let limit = state.body_limits.request;
    let body = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::TooLarge(format!(
            "the request body is larger than the limit of {limit} bytes (verge up --max-request-body)"
        ))
    })?;
    let headers: Vec<(String, String)> = headers
        .iter()
        .filter(|(k, _)| *k != header::AUTHORIZATION && *k != header::HOST)
        .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let s = state.clone();
    let (n, a) = (name.to_string(), alias.to_string());
    let job = blocking(move || {
        Ok(s.bus.enqueue(
            &n,
            &a,
            version,
            Payload::Invoke {
                path,
                headers,
                body: body.to_vec(),
            },
            hops,
        )?)
    })
    .await?;
    state.wake.notify_one();
    Ok((StatusCode::ACCEPTED, Json(job)))
}

pub(crate) async fn list_jobs(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<Job>>, ApiError> {
    let (mut function, mut job_state, mut limit) = (None, None, 1000u32);
    for (k, v) in query_pairs(query.as_deref()) {
        match k.as_str() {
            "function" => {
                validate_function_name(&v)?;
                function = Some(v);
            }
            "state" => {
                job_state = Some(JobState::parse(&v).map_err(|_| {
                    ApiError::BadRequest(format!(
                        "state {v:?}: give queued, running, succeeded or dead"
                    ))
                })?)
            }
            "limit" => {
                limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=100_000).contains(n))
                    .ok_or_else(|| ApiError::BadRequest(format!("limit {v:?} must be 1..100000")))?
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}; accepted: function, state, limit"
                )));
            }
        }
    }
    let s = state.clone();
    Ok(Json(
        blocking(move || Ok(s.bus.jobs(function.as_deref(), job_state, limit)?)).await?,
    ))
}

pub(crate) async fn get_job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    let s = state.clone();
    Ok(Json(blocking(move || Ok(s.bus.job(&id)?)).await?))
}

pub(crate) async fn list_dead_letters(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<Job>>, ApiError> {
    let function = function_filter(query.as_deref())?;
    let s = state.clone();
    Ok(Json(
        blocking(move || Ok(s.bus.dead_letters(function.as_deref(), 1000)?)).await?,
    ))
}

pub(crate) async fn get_dead_letter(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    let s = state.clone();
    let job = blocking(move || Ok(s.bus.job(&id)?)).await?;
    if job.state != JobState::Dead {
        return Err(ApiError::NotFound(format!(
            "job {} is not dead-lettered; see it with `verge invocations --id {}`",
            job.id, job.id
        )));
    }
    Ok(Json(job))
}

pub(crate) async fn replay_dead_letter(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    let s = state.clone();
    let job = blocking(move || Ok(s.bus.replay(&id)?)).await?;
    state.wake.notify_one();
    Ok(Json(job))
}

pub(crate) async fn purge_dead_letters(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let function = function_filter(query.as_deref())?;
    let s = state.clone();
    let n = blocking(move || Ok(s.bus.purge(function.as_deref())?)).await?;
    Ok(Json(json!({ "purged": n })))
}

/// Body of `PUT /v1/functions/{name}/async`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AsyncConfigRequest {
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// A duration such as `6h` or `90s`.
    #[serde(default)]
    pub max_age: Option<String>,
    #[serde(default)]
    pub on_success: Option<String>,
    #[serde(default)]
    pub on_failure: Option<String>,
}

pub(crate) async fn get_async_config(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<AsyncConfig>, ApiError> {
    validate_function_name(&name)?;
    let s = state.clone();
    Ok(Json(
        blocking(move || Ok(s.bus.async_config(&name)?)).await?,
    ))
}

pub(crate) async fn put_async_config(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    crate::error::JsonBody(req): crate::error::JsonBody<AsyncConfigRequest>,
) -> Result<Json<AsyncConfig>, ApiError> {
    validate_function_name(&name)?;
    if !state.has_function(&name) {
        return Err(verge_store::StoreError::FunctionNotFound(name).into());
    }
    let s = state.clone();
    let mut config = {
        let n = name.clone();
        blocking(move || Ok(s.bus.async_config(&n)?)).await?
    };
    if let Some(r) = req.max_retries {
        if r > 100 {
            return Err(ApiError::BadRequest(format!(
                "max_retries {r} is more than 100; a job that fails 100 times belongs in the dead-letter store"
            )));
        }
        config.max_retries = r;
    }
    if let Some(age) = &req.max_age {
        config.max_age_ms = parse_age(age)?;
    }
    if let Some(t) = req.on_success {
        config.on_success = (!t.is_empty()).then_some(t);
    }
    if let Some(t) = req.on_failure {
        config.on_failure = (!t.is_empty()).then_some(t);
    }
    let s = state.clone();
    let c = config.clone();
    blocking(move || Ok(s.bus.set_async_config(&name, &c)?)).await?;
    Ok(Json(config))
}

/// `90s`, `30m`, `6h`, `1d` (as well as what `parse_duration` takes).
fn parse_age(v: &str) -> Result<i64, ApiError> {
    let bad = || {
        ApiError::BadRequest(format!(
            "max_age {v:?}: give a duration such as 90s, 30m, 6h or 1d"
        ))
    };
    let ms = if let Some(h) = v.strip_suffix('h') {
        h.parse::<i64>().map_err(|_| bad())? * 3_600_000
    } else if let Some(d) = v.strip_suffix('d') {
        d.parse::<i64>().map_err(|_| bad())? * 86_400_000
    } else {
        i64::try_from(parse_duration(v).map_err(|_| bad())?.as_millis()).unwrap_or(i64::MAX)
    };
    if ms <= 0 {
        return Err(bad());
    }
    Ok(ms)
}

/// Body of `POST /v1/schedules`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ScheduleRequest {
    pub function: String,
    pub cron: String,
    #[serde(default)]
    pub tz: Option<String>,
    #[serde(default)]
    pub alias: Option<String>,
    /// `skip` (default) or `once`.
    #[serde(default)]
    pub missed: Option<String>,
}

pub(crate) async fn add_schedule(
    State(state): State<Arc<AppState>>,
    crate::error::JsonBody(req): crate::error::JsonBody<ScheduleRequest>,
) -> Result<(StatusCode, Json<Schedule>), ApiError> {
    validate_function_name(&req.function)?;
    let alias = req.alias.unwrap_or_else(|| LIVE_ALIAS.to_string());
    validate_alias_name(&alias)?;
    if !state.has_function(&req.function) {
        return Err(verge_store::StoreError::FunctionNotFound(req.function).into());
    }
    let s = state.clone();
    let missed = req.missed.unwrap_or_else(|| "skip".to_string());
    let sched = blocking(move || {
        Ok(s.bus
            .add_schedule(&req.function, &alias, &req.cron, req.tz.as_deref(), &missed)?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(sched)))
}

pub(crate) async fn list_schedules(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<Schedule>>, ApiError> {
    let function = function_filter(query.as_deref())?;
    let s = state.clone();
    Ok(Json(
        blocking(move || Ok(s.bus.schedules(function.as_deref())?)).await?,
    ))
}

pub(crate) async fn delete_schedule(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let s = state.clone();
    blocking(move || Ok(s.bus.remove_schedule(&id)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Claims due jobs and runs them, at most [`JOB_WORKERS`] at once; sleeps
/// until the next job is due or something wakes it.
pub(crate) async fn dispatcher(state: Arc<AppState>) {
    loop {
        let free = state.job_slots.available_permits();
        let mut claimed = 0;
        if free > 0 {
            let s = state.clone();
            match blocking(move || Ok(s.bus.claim(free)?)).await {
                Ok(jobs) => {
                    claimed = jobs.len();
                    for job in jobs {
                        let Ok(permit) = state.job_slots.clone().acquire_owned().await else {
                            return;
                        };
                        let s = state.clone();
                        tokio::spawn(async move {
                            run_job(&s, job).await;
                            drop(permit);
                            s.wake.notify_one();
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not claim jobs"),
            }
        }
        if claimed > 0 && claimed == free {
            continue;
        }
        let wait = if free == 0 {
            Duration::from_secs(1)
        } else {
            let s = state.clone();
            match blocking(move || Ok(s.bus.next_due_ms()?)).await {
                Ok(Some(next)) => {
                    Duration::from_millis((next - verge_bus::now_ms()).clamp(1, 1000) as u64)
                }
                _ => Duration::from_secs(1),
            }
        };
        tokio::select! {
            _ = state.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Fires due schedules (every 100 ms).
pub(crate) async fn scheduler(state: Arc<AppState>) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = state.clone();
        let node = state.node_name.clone();
        let fired = blocking(move || {
            let event = |sched: &verge_bus::Schedule, at: i64| {
                let mut event = platform_event(
                    &node,
                    types::SCHEDULE_FIRED,
                    &sched.id,
                    json!({
                        "schedule": sched.id,
                        "function": sched.function,
                        "cron": sched.cron,
                        "tz": sched.tz,
                        "scheduled_time": verge_spec::rfc3339_ms(at),
                    }),
                );
                event.id = format!("{}-{at}", sched.id);
                event
            };
            Ok(s.bus.fire_due_schedules(&event)?)
        })
        .await;
        let fired = match fired {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "could not fire schedules");
                continue;
            }
        };
        if !fired.is_empty() {
            state.wake.notify_one();
        }
        for f in fired {
            // Also for the triggers on `dev.verge.schedule.fired`.
            if let verge_bus::Payload::Event { event } = f.job.payload {
                state.outbox.push(event);
            }
        }
    }
}

/// Keys changed since the last `kv.changed` events went out, each with the
/// highest hop count its events are to carry (a guest's write: one past its
/// invocation; the API's and replication's: 0), so that a function
/// triggered by its own writes stops at the hop limit.
pub(crate) type KvChanges = std::sync::Mutex<std::collections::BTreeMap<(String, String), u32>>;

/// Emits one `dev.verge.kv.changed` event per key changed (by a guest, the
/// API or replication), debounced: every 250 ms, each key at most once.
pub(crate) async fn kv_changed(state: Arc<AppState>, changes: Arc<KvChanges>) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let keys = std::mem::take(
            &mut *changes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if keys.is_empty() {
            continue;
        }
        let events: Vec<CloudEvent> = keys
            .into_iter()
            .map(|((bucket, key), hops)| {
                let mut e = platform_event(
                    &state.node_name,
                    types::KV_CHANGED,
                    &format!("{bucket}/{key}"),
                    json!({ "bucket": bucket, "key": key }),
                );
                if hops > 0 {
                    e.set_hops(hops);
                }
                e
            })
            .collect();
        let s = state.clone();
        let _ = blocking(move || {
            publish(&*s.bus, &s.wake, events);
            Ok(())
        })
        .await;
    }
}

/// Delivers one job: resolves its function (alias at run time, or the pinned
/// version), POSTs it, and reports the outcome to the bus.
async fn run_job(state: &Arc<AppState>, job: Job) {
    let selector = match job.version {
        Some(v) => Selector::Version(v),
        None => Selector::Alias(&job.alias),
    };
    // Each attempt is a child of the span that caused the job: the
    // event's emitter (its distributed-tracing extension), or the request
    // or call that queued the invocation (its `traceparent`).
    let (headers, path, body, parent, trigger) = match &job.payload {
        Payload::Event { event } => {
            let (h, b) = event.to_binary();
            let trigger = if event.ty == types::SCHEDULE_FIRED {
                verge_spec::Trigger::Timer
            } else {
                verge_spec::Trigger::PubSub
            };
            (h, "/".to_string(), b, event.trace_parent(), trigger)
        }
        Payload::Invoke {
            path,
            headers,
            body,
        } => {
            let parent = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(verge_spec::TRACEPARENT))
                .and_then(|(_, v)| verge_spec::SpanContext::parse(v));
            (
                headers.clone(),
                path.clone(),
                body.clone(),
                parent,
                verge_spec::Trigger::Other,
            )
        }
    };
    let queue_wait_us =
        u64::try_from(verge_bus::now_ms().saturating_sub(job.next_ms).max(0)).unwrap_or(0) * 1000;
    let mut map = HeaderMap::new();
    for (k, v) in &headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::try_from(k.as_str()),
            HeaderValue::try_from(v.as_str()),
        ) {
            map.append(k, v);
        }
    }
    if let Ok(v) = HeaderValue::try_from(job.id.as_str()) {
        map.insert("verge-job-id", v);
    }
    map.insert("verge-attempt", HeaderValue::from(job.attempts));
    let outcome: Result<(), String> = async {
        let (slot, function, load_us) = front::resolve(state, &job.function, selector, &map)
            .await
            .map_err(|e| e.to_string())?;
        let mut builder = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("http://localhost{path}"))
            .header(header::HOST, "localhost");
        for (k, v) in &map {
            builder = builder.header(k, v);
        }
        if job.attempts < job.max_attempts {
            builder = builder.extension(verge_spec::RetriedOnFailure);
        }
        let request = builder.body(Body::from(body)).map_err(|e| e.to_string())?;
        let cause = front::Cause {
            parent,
            trigger,
            load_us,
            queue_wait_us,
        };
        let response = front::run(state, &slot, &function, request, false, cause).await;
        let status = response.status();
        let text = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if status.is_success() {
            Ok(())
        } else {
            let detail: String = text.chars().take(300).collect();
            Err(format!("the function answered {status}: {}", detail.trim()))
        }
    }
    .await;
    let s = state.clone();
    let id = job.id.clone();
    let result = blocking(move || match outcome {
        Ok(()) => {
            s.bus.complete(&id)?;
            Ok(None)
        }
        Err(e) => Ok(Some(s.bus.fail(&id, &e)?)),
    })
    .await;
    let (s, f) = (state.clone(), job.function.clone());
    let config = blocking(move || Ok(s.bus.async_config(&f)?))
        .await
        .unwrap_or_default();
    match result {
        Ok(None) => {
            if let Some(ty) = &config.on_success {
                emit_destination(state, ty, &job, None);
            }
        }
        Ok(Some(failed)) if failed.state == JobState::Dead => {
            tracing::warn!(job = %failed.id, function = %failed.function, attempts = failed.attempts, error = ?failed.last_error, "job dead-lettered");
            state.metrics.dead_lettered(&failed.function);
            // Retries of one job are one hop: the dead letter's event is
            // one past the job, whatever the number of attempts.
            state.emit_caused(
                types::JOB_DEAD_LETTERED,
                &failed.function,
                json!({ "job": failed.id, "function": failed.function, "attempts": failed.attempts, "error": failed.last_error }),
                job.hops,
            );
            if let Some(ty) = &config.on_failure {
                emit_destination(state, ty, &job, failed.last_error.as_deref());
            }
        }
        Ok(Some(retry)) => {
            tracing::info!(job = %retry.id, function = %retry.function, attempt = retry.attempts, next_in_ms = retry.next_ms - verge_bus::now_ms(), error = ?retry.last_error, "job failed; retrying");
        }
        Err(e) => {
            tracing::warn!(job = %job.id, error = %e, "could not record a job's outcome; it will run again")
        }
    }
}

/// An on-success or on-failure destination: an event of the configured type
/// whose data names the job and its function.
fn emit_destination(state: &AppState, ty: &str, job: &Job, error: Option<&str>) {
    let mut e = CloudEvent::new(
        random_id(),
        format!("/verge/functions/{}", job.function),
        ty,
    )
    .with_data(json!({ "job": job.id, "function": job.function, "attempts": job.attempts, "error": error }));
    e.subject = Some(job.id.clone());
    e.time = Some(verge_spec::rfc3339_ms(verge_bus::now_ms()));
    e.set_hops(verge_spec::next_hop(job.hops));
    state.outbox.push(e);
}

/// How long an edge's link may be cut before it warns that the oldest of
/// what it keeps for the core (records, events: 7 days) nears its end.
const OUTAGE_WARNING: Duration = Duration::from_secs(6 * 86_400);

/// At an edge: an error in the log and `dev.verge.edge.outage_limit` (once
/// a day) while its link has been cut for longer than [`OUTAGE_WARNING`].
pub(crate) async fn outage_limit(state: Arc<AppState>) {
    let Some(cluster) = state.cluster.clone() else {
        return;
    };
    let mut warned: Option<std::time::Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let Some(since) = cluster.uplink_cut_since() else {
            warned = None;
            continue;
        };
        let cut = since.elapsed().unwrap_or_default();
        if cut < OUTAGE_WARNING || warned.is_some_and(|w| w.elapsed() < Duration::from_secs(86_400))
        {
            continue;
        }
        warned = Some(std::time::Instant::now());
        let days = cut.as_secs() / 86_400;
        tracing::error!(
            days,
            "this edge's link to the core has been cut for {days} days: records and events older than 7 days that the core has not taken are dropped; restore the link"
        );
        state.emit(
            types::EDGE_OUTAGE_LIMIT,
            &state.node_name,
            json!({ "node": state.node_name, "cut_seconds": cut.as_secs(), "keeps_days": 7 }),
        );
    }
}

/// What one node knows of another (membership).
struct Member {
    started: i64,
    heartbeat: i64,
    url: String,
    lost: bool,
    /// Its last record (kept for an edge: `verge nodes` shows it cut).
    last: verge_cluster::NodeRecord,
}

/// How often membership is looked at.
const MEMBERSHIP_EVERY: Duration = Duration::from_secs(1);

/// Cluster membership as CloudEvents (a cluster node only): every second
/// the node reads `verge_nodes`; a name it has not seen is
/// `dev.verge.node.joined`, a record gone (no heartbeat for
/// `verge_cluster::NODE_TTL`) `dev.verge.node.lost`, a lost name back
/// `dev.verge.node.returned`. Every node watches; the live node whose name
/// sorts first emits, with source `/verge/cluster` and an id that names the
/// node, its start and the change, so the same change seen by two emitters
/// (while the first name changes hands) is one delivery per trigger.
pub(crate) async fn membership(state: Arc<AppState>) {
    let Some(cluster) = state.cluster.clone() else {
        return;
    };
    let mut known: std::collections::BTreeMap<String, Member> = Default::default();
    let mut first = true;
    loop {
        tokio::time::sleep(MEMBERSHIP_EVERY).await;
        let records = match cluster.nodes().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "membership: could not list the nodes");
                continue;
            }
        };

        *state
            .live_nodes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = records.clone();
        let now: std::collections::BTreeMap<&str, &verge_cluster::NodeRecord> =
            records.iter().map(|r| (r.name.as_str(), r)).collect();
        // On the first look, the nodes that started within a minute of this
        // one are joining now; the others were there before.
        let since = now
            .get(state.node_name.as_str())
            .map(|r| r.started - 60)
            .unwrap_or(i64::MAX);
        let mut changes = Vec::new();
        for (name, r) in &now {
            match known.get_mut(*name) {
                None => {
                    if !first || r.started >= since {
                        changes.push((
                            types::NODE_JOINED,
                            format!("{}-{}-joined", name, r.started),
                            (*r).clone(),
                            None,
                        ));
                    }
                    known.insert(
                        name.to_string(),
                        Member {
                            started: r.started,
                            heartbeat: r.heartbeat,
                            url: r.url.clone(),
                            lost: false,
                            last: (*r).clone(),
                        },
                    );
                }
                Some(m) => {
                    if m.lost {
                        let restarted = m.started != r.started;
                        changes.push((
                            types::NODE_RETURNED,
                            format!("{}-{}-returned-{}", name, r.started, m.heartbeat),
                            (*r).clone(),
                            Some(restarted),
                        ));
                    }
                    *m = Member {
                        started: r.started,
                        heartbeat: r.heartbeat,
                        url: r.url.clone(),
                        lost: false,
                        last: (*r).clone(),
                    };
                    state
                        .cut_edges
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(*name);
                }
            }
        }
        for (name, m) in known.iter_mut() {
            if !m.lost && !now.contains_key(name.as_str()) {
                m.lost = true;
                if m.last.role == "edge" {
                    state
                        .cut_edges
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(name.clone(), m.last.clone());
                }
                let record = verge_cluster::NodeRecord {
                    name: name.clone(),
                    url: m.url.clone(),
                    started: m.started,
                    heartbeat: m.heartbeat,
                    ..Default::default()
                };
                changes.push((
                    types::NODE_LOST,
                    format!("{}-{}-lost-{}", name, m.started, m.heartbeat),
                    record,
                    None,
                ));
            }
        }
        first = false;
        // The emitter: the first name among the live core nodes (this one
        // is live: it just put its record, or will within a heartbeat).
        // Not an edge: its bus is its own.
        if cluster.site().is_some() {
            continue;
        }
        let emitter = now
            .iter()
            .find(|(_, r)| r.role != "edge")
            .map(|(n, _)| *n)
            .unwrap_or(state.node_name.as_str());
        if changes.is_empty() || emitter != state.node_name {
            continue;
        }
        for (ty, id, r, restarted) in changes {
            tracing::info!(node = %r.name, event = ty, "cluster membership changed");
            let mut data = json!({
                "node": r.name,
                "url": r.url,
                "started": r.started,
                "last_heartbeat": r.heartbeat,
            });
            if let Some(restarted) = restarted {
                data["restarted"] = json!(restarted);
            }
            let mut e = CloudEvent::new(id, "/verge/cluster", ty).with_data(data);
            e.subject = Some(r.name.clone());
            e.time = Some(verge_spec::rfc3339_ms(verge_bus::now_ms()));
            state.outbox.push(e);
        }
    }
}
