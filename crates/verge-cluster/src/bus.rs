//! The event bus of a cluster node ([`NatsBus`]), on JetStream:
//!
//! - **Subscriptions** (triggers, schedules, async settings) are registry
//!   documents, one per function: `sub.<name>` in `verge_registry`, written
//!   by compare-and-set. Each node watches them into its own bus database,
//!   where events are matched against them.
//! - **Jobs** (event deliveries, async invocations, schedule firings) are
//!   messages of stream `VERGE_JOBS` (work-queue retention, `Nats-Msg-Id` =
//!   the job's id, so a re-sent event or firing is stored once). Subject
//!   `verge.jobs.<hex of the function>.t.<trigger>` for a trigger's
//!   deliveries, `verge.jobs.<hex>.a` for the rest; one durable pull
//!   consumer per trigger (`t_<trigger>`) and per function (`a_<hex>`), shared
//!   by every node, so nodes compete and each job is delivered to one. The
//!   consumer's ack wait is the lease: a running job's node extends it
//!   (progress acks every third of it) and acks it when done, or naks it
//!   with the retry's delay; a node that dies stops extending, and its jobs
//!   go to another node when the ack wait runs out. Nothing a live node
//!   runs is ever taken from it.
//! - **Dead letters** go to stream `VERGE_DLQ` (`{"dead": job}`; a replay
//!   or purge appends `{"gone": [ids]}`). Every node follows it into its
//!   bus database, so `verge dlq ls` answers for the cluster; `verge jobs`
//!   lists the jobs this node ran.
//! - **Schedules** fire once per tick per cluster: the firing's job has id
//!   `<schedule>-<due ms>` (the stream keeps one of any number of
//!   publishes within its duplicate window), and each schedule's cursor in
//!   bucket `verge_ticks` moves on by compare-and-set after the publish. Two
//!   schedulers publish the same id, one stored; a node that dies between
//!   the publish and the cursor leaves the tick to the next scheduler,
//!   whose publish is the duplicate.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, kv};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use verge_bus::{
    AsyncConfig, Bus, BusError, Fired, Job, JobState, Payload, Published, Schedule, SqliteBus,
    Subscriptions, Trigger, now_ms,
};
use verge_spec::CloudEvent;

use crate::{Cluster, ClusterError};

/// The job stream.
pub const JOBS_STREAM: &str = "VERGE_JOBS";
/// The dead-letter stream.
pub const DLQ_STREAM: &str = "VERGE_DLQ";
/// Schedules' cursors.
pub const TICKS_BUCKET: &str = "verge_ticks";
/// How long dead letters stay in `VERGE_DLQ`.
pub const DLQ_KEEP: Duration = Duration::from_secs(30 * 86_400);
/// Registry documents of subscriptions: `sub.<function>`.
const SUB_PREFIX: &str = "sub.";
/// Jobs a node holds (fetched, waiting or running) at most.
const HELD_MAX: usize = 128;
/// Jobs fetched from one consumer at once.
const FETCH_MAX: usize = 16;
/// How long a publish or an ack may take.
const NATS_TIMEOUT: Duration = Duration::from_secs(5);
/// Compare-and-set attempts of a subscriptions write.
const WRITE_ATTEMPTS: usize = 16;

/// What `VERGE_DLQ` carries.
#[derive(Debug, Default, Serialize, Deserialize)]
struct DlqEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dead: Option<Job>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    gone: Vec<String>,
}

/// A job fetched from its consumer, with the message that acks it.
struct Delivery {
    job: Job,
    msg: Arc<jetstream::Message>,
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!(
        "the cluster's event bus cannot be reached now ({e}); retry when NATS is back"
    ))
}

fn function_hex(function: &str) -> String {
    hex::encode(function.as_bytes())
}

/// Where a job goes: its subject and its consumer's name.
fn route(prefix: &str, function: &str, trigger: Option<&str>) -> (String, String) {
    let f = function_hex(function);
    match trigger {
        Some(t) => (format!("{prefix}verge.jobs.{f}.t.{t}"), format!("t_{t}")),
        None => (format!("{prefix}verge.jobs.{f}.a"), format!("a_{f}")),
    }
}

/// The id of an event's delivery to a trigger: the same event (source and
/// id, as CloudEvents defines) sent twice is one job.
fn delivery_id(trigger: &str, event: &CloudEvent) -> String {
    let mut h = Sha256::new();
    h.update(trigger.as_bytes());
    h.update([0]);
    h.update(event.source.as_bytes());
    h.update([0]);
    h.update(event.id.as_bytes());
    format!("job_{}", &hex::encode(h.finalize())[..32])
}

fn random_id(prefix: &str) -> String {
    let mut r = [0u8; 8];
    rand::fill(&mut r);
    format!("{prefix}{:012x}{}", now_ms(), hex::encode(r))
}

/// The bus of a node on a cluster (see the module docs).
pub struct NatsBus {
    /// This node's bus database: the subscriptions' copy, the index of jobs
    /// it ran and of every dead letter.
    local: SqliteBus,
    pub(crate) cluster: Arc<Cluster>,
    jobs: jetstream::stream::Stream,
    dlq: jetstream::stream::Stream,
    /// Schedule cursors (`None` at an edge: schedules fire on the core).
    ticks: Option<kv::Store>,
    rt: tokio::runtime::Handle,
    wake: Arc<Notify>,
    /// The consumers' ack wait.
    lease: Duration,
    /// Fetched, not claimed yet.
    ready: Mutex<VecDeque<Delivery>>,
    /// Claimed, not reported yet.
    running: Mutex<HashMap<String, Delivery>>,
    /// Consumers known to exist.
    consumers: Mutex<HashSet<String>>,
    /// Schedules' cursors as last read: (fired up to, revision).
    cursors: Mutex<HashMap<String, (i64, u64)>>,
}

/// A puller per consumer of the job stream, by name; aborted with the
/// task that owns them.
#[derive(Default)]
struct Pullers(HashMap<String, tokio::task::JoinHandle<()>>);

impl Drop for Pullers {
    fn drop(&mut self) {
        for t in self.0.values() {
            t.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl NatsBus {
    /// The cluster's bus for this node: `local` (its bus database) becomes a
    /// copy of the registry's subscriptions, and the node competes for the
    /// cluster's jobs from now on. `wake` is told when jobs arrive;
    /// `lease` is how long a job a node stopped answering for stays its.
    pub async fn start(
        cluster: Arc<Cluster>,
        local: SqliteBus,
        wake: Arc<Notify>,
        lease: Duration,
    ) -> Result<Arc<NatsBus>, ClusterError> {
        let js = &cluster.js;
        let replicas = cluster.replicas;
        let created = |what: &str, e: String| {
            ClusterError::Other(format!("could not create the {what}: {e}"))
        };
        let jobs = js
            .get_or_create_stream(jetstream::stream::Config {
                name: JOBS_STREAM.into(),
                description: Some(
                    "Verge jobs: event deliveries, async invocations, schedule firings".into(),
                ),
                subjects: vec![cluster.subject("verge.jobs.>")],
                retention: jetstream::stream::RetentionPolicy::WorkQueue,
                // No size of its own (a size is reserved on the servers'
                // disks up front): bounded by the servers' JetStream storage,
                // whose limit refuses new jobs, never drops queued ones.
                discard: jetstream::stream::DiscardPolicy::New,
                duplicate_window: Duration::from_secs(600),
                num_replicas: replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| created(&format!("{JOBS_STREAM} stream"), e.to_string()))?;
        let dlq = js
            .get_or_create_stream(jetstream::stream::Config {
                name: DLQ_STREAM.into(),
                description: Some("Verge dead letters".into()),
                subjects: vec![cluster.subject("verge.dlq.>")],
                max_age: DLQ_KEEP,
                duplicate_window: Duration::from_secs(600),
                num_replicas: replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| created(&format!("{DLQ_STREAM} stream"), e.to_string()))?;
        // An edge's bucket of the same name would also take the core's
        // writes, which cross the leaf link.
        let ticks = match cluster.site() {
            Some(_) => None,
            None => Some(
                crate::bucket(
                    js,
                    kv::Config {
                        bucket: TICKS_BUCKET.into(),
                        description: "Verge schedules: the last firing of each".into(),
                        history: 1,
                        num_replicas: replicas,
                        storage: jetstream::stream::StorageType::File,
                        ..Default::default()
                    },
                )
                .await?,
            ),
        };
        let bus = Arc::new(NatsBus {
            local,
            cluster,
            jobs,
            dlq,
            ticks,
            rt: tokio::runtime::Handle::current(),
            wake,
            lease,
            ready: Mutex::default(),
            running: Mutex::default(),
            consumers: Mutex::default(),
            cursors: Mutex::default(),
        });
        let from = bus.load_subscriptions().await?;
        // The index keeps finished jobs; the unfinished are the cluster's.
        bus.local.drop_unfinished().map_err(bus_err)?;
        let mut tasks = vec![
            tokio::spawn(bus.clone().follow_subscriptions(from)),
            tokio::spawn(bus.clone().compete()),
            tokio::spawn(bus.clone().extend_leases()),
            tokio::spawn(bus.clone().follow_dead_letters()),
        ];
        // Events emitted at edges: kept there, published on the core.
        let edge_events = crate::edge_events::ensure_stream(&bus.cluster).await?;
        if bus.cluster.site().is_none() {
            tasks.push(tokio::spawn(bus.clone().import_edge_events(edge_events)));
        } else {
            tasks.push(tokio::spawn(crate::edge::push_to_core(
                Arc::downgrade(&bus.cluster),
                edge_events,
                Some(crate::edge_events::FROM_EDGES_SUBJECT.into()),
            )));
        }
        // Stopped with the cluster's other tasks (`Cluster::close`); the
        // jobs this node held go to the others when their leases run out.
        lock(&bus.cluster.tasks).extend(tasks);
        Ok(bus)
    }

    /// Runs `fut` to its end from a synchronous call (the `Bus` methods run
    /// on blocking threads; at shutdown on a runtime thread, which is
    /// handed over first).
    pub(crate) fn run<T>(&self, fut: impl Future<Output = T>) -> T {
        tokio::task::block_in_place(|| self.rt.block_on(fut))
    }

    /// Refuses while the link to NATS is down (after waiting a moment for
    /// the client to reconnect to another server).
    fn link(&self) -> Result<(), BusError> {
        if self.cluster.down_since().is_some() {
            self.run(self.cluster.wait_connected(crate::LINK_GRACE));
        }
        match self.cluster.down_since() {
            None => Ok(()),
            Some(_) => Err(unavailable(format!(
                "NATS at {} is unreachable",
                self.cluster.url()
            ))),
        }
    }

    fn held(&self) -> usize {
        lock(&self.ready).len() + lock(&self.running).len()
    }

    /// Reads every subscriptions document into the local copy (what a
    /// deleted function left there goes); returns the revision to watch
    /// from.
    async fn load_subscriptions(&self) -> Result<u64, ClusterError> {
        let registry = &self.cluster.registry;
        let mut keys = registry.keys().await.map_err(crate::unavailable)?;
        let mut docs = Vec::new();
        let mut from = 0;
        while let Some(key) = keys.next().await {
            let key = key.map_err(crate::unavailable)?;
            let Some(function) = key.strip_prefix(SUB_PREFIX) else {
                continue;
            };
            if let Some(entry) = registry.entry(&key).await.map_err(crate::unavailable)? {
                from = from.max(entry.revision);
                let subs: Subscriptions = serde_json::from_slice(&entry.value).map_err(|e| {
                    ClusterError::Other(format!("registry document {key} is unreadable: {e}"))
                })?;
                docs.push((function.to_string(), subs));
            }
        }
        let local = &self.local;
        let known: HashSet<&str> = docs.iter().map(|(f, _)| f.as_str()).collect();
        for f in local.subscribed_functions().map_err(bus_err)? {
            if !known.contains(f.as_str()) {
                local
                    .replace_subscriptions(&f, &Subscriptions::default())
                    .map_err(bus_err)?;
            }
        }
        for (f, subs) in &docs {
            local.replace_subscriptions(f, subs).map_err(bus_err)?;
        }
        Ok(from + 1)
    }

    /// Keeps the local copy of the subscriptions current: a supervised
    /// watch of `sub.>`, reopened after its last revision.
    async fn follow_subscriptions(self: Arc<Self>, mut from: u64) {
        loop {
            match self
                .cluster
                .registry
                .watch_from_revision(format!("{SUB_PREFIX}>"), from)
                .await
            {
                Ok(mut watch) => {
                    // A watch can stall without an error when its server
                    // dies; this one is filtered (the registry's head says
                    // nothing of it), so it is reopened after 10 s without
                    // a change, from where it was.
                    while let Ok(Some(entry)) =
                        tokio::time::timeout(Duration::from_secs(10), watch.next()).await
                    {
                        let Ok(entry) = entry else { break };
                        from = entry.revision + 1;
                        let Some(function) = entry.key.strip_prefix(SUB_PREFIX) else {
                            continue;
                        };
                        let subs = match entry.operation {
                            kv::Operation::Put => {
                                match serde_json::from_slice::<Subscriptions>(&entry.value) {
                                    Ok(s) => s,
                                    Err(e) => {
                                        tracing::warn!(key = %entry.key, error = %e, "unreadable subscriptions document; skipped");
                                        continue;
                                    }
                                }
                            }
                            _ => Subscriptions::default(),
                        };
                        if let Err(e) = self.local.replace_subscriptions(function, &subs) {
                            tracing::warn!(function, error = %e, "could not store a function's subscriptions");
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not watch the subscriptions; retrying")
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Changes the subscriptions of `function` for the whole cluster:
    /// read, changed by `change`, stored by compare-and-set (again when
    /// another node wrote first), then copied locally.
    fn update_subscriptions<R>(
        &self,
        function: &str,
        change: impl Fn(&mut Subscriptions) -> Result<R, BusError>,
    ) -> Result<R, BusError> {
        self.link()?;
        let key = format!("{SUB_PREFIX}{function}");
        let registry = &self.cluster.registry;
        for _ in 0..WRITE_ATTEMPTS {
            let entry = self
                .run(registry.entry(&key))
                .map_err(unavailable)?
                .filter(|e| e.operation == kv::Operation::Put);
            let mut subs: Subscriptions = match &entry {
                Some(e) => serde_json::from_slice(&e.value)
                    .map_err(|e| BusError::Corrupt(format!("registry document {key}: {e}")))?,
                None => Subscriptions::default(),
            };
            let out = change(&mut subs)?;
            let body = serde_json::to_vec(&subs).map_err(|e| BusError::Corrupt(e.to_string()))?;
            let stored = self.run(async {
                match (&entry, subs.is_empty()) {
                    (None, true) => Ok(true),
                    (None, false) => registry
                        .create(&key, Bytes::from(body))
                        .await
                        .map(|_| true)
                        .map_err(|e| e.to_string()),
                    (Some(e), true) => registry
                        .delete_expect_revision(&key, Some(e.revision))
                        .await
                        .map(|_| true)
                        .map_err(|e| e.to_string()),
                    (Some(e), false) => registry
                        .update(&key, Bytes::from(body), e.revision)
                        .await
                        .map(|_| true)
                        .map_err(|e| e.to_string()),
                }
            });
            match stored {
                Ok(_) => {
                    self.local.replace_subscriptions(function, &subs)?;
                    return Ok(out);
                }
                // Another node wrote first (or the server is away: the
                // next read says which).
                Err(e) => {
                    tracing::debug!(function, error = %e, "subscriptions write lost a race; again")
                }
            }
            std::thread::sleep(Duration::from_millis(rand::random_range(1..20)));
        }
        Err(BusError::Unavailable(format!(
            "the subscriptions of {function:?} did not get written after {WRITE_ATTEMPTS} attempts; retry"
        )))
    }

    /// Makes sure the consumer of `(subject, name)` exists.
    async fn ensure_consumer(&self, subject: &str, name: &str) -> Result<(), BusError> {
        if lock(&self.consumers).contains(name) {
            return Ok(());
        }
        self.jobs
            .get_or_create_consumer(
                name,
                consumer::pull::Config {
                    durable_name: Some(name.to_string()),
                    filter_subject: subject.to_string(),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: self.lease,
                    max_deliver: -1,
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(unavailable)?;
        lock(&self.consumers).insert(name.to_string());
        Ok(())
    }

    /// Publishes jobs to their consumers' subjects; returns whether each was
    /// a duplicate of one stored before. All go out at once; those that
    /// fail (a server died, its streams elect new leaders) are sent again
    /// until [`crate::WRITE_DEADLINE`]: a job's id makes a re-send that
    /// did land a duplicate, never a second job.
    async fn put_jobs(&self, jobs: &[(Job, Option<String>)]) -> Result<Vec<bool>, BusError> {
        let deadline = std::time::Instant::now() + crate::WRITE_DEADLINE;
        let mut messages = Vec::with_capacity(jobs.len());
        for (job, trigger) in jobs {
            let (subject, name) = route(&self.cluster.prefix, &job.function, trigger.as_deref());
            self.ensure_consumer(&subject, &name).await?;
            let body = serde_json::to_vec(job).map_err(|e| BusError::Corrupt(e.to_string()))?;
            messages.push((subject, job.id.as_str(), Bytes::from(body)));
        }
        let mut out = vec![false; messages.len()];
        let mut pending: Vec<usize> = (0..messages.len()).collect();
        loop {
            let mut acks = Vec::with_capacity(pending.len());
            for &i in &pending {
                let (subject, id, body) = &messages[i];
                acks.push((i, self.put(subject.clone(), id, body.clone()).await));
            }
            let mut failed = Vec::new();
            let mut last_error = String::new();
            for (i, ack) in acks {
                let result = match ack {
                    Ok(ack) => match tokio::time::timeout(NATS_TIMEOUT, ack).await {
                        Ok(Ok(ack)) => Ok(ack.duplicate),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("no acknowledgement within 5 s".to_string()),
                    },
                    Err(e) => Err(e),
                };
                match result {
                    Ok(duplicate) => out[i] = duplicate,
                    Err(e) => {
                        last_error = e;
                        failed.push(i);
                    }
                }
            }
            if failed.is_empty() {
                return Ok(out);
            }
            if std::time::Instant::now() > deadline {
                return Err(unavailable(last_error));
            }
            tracing::info!(jobs = failed.len(), error = %last_error, "jobs not stored yet; sending them again");
            tokio::time::sleep(Duration::from_millis(250)).await;
            pending = failed;
        }
    }

    /// Sends one message with its id; the future is its acknowledgement.
    async fn put(
        &self,
        subject: String,
        id: &str,
        body: Bytes,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture, String> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        self.cluster
            .js
            .publish_with_headers(subject, headers, body)
            .await
            .map_err(|e| e.to_string())
    }

    /// Appends to the dead-letter stream (sent again until
    /// [`crate::WRITE_DEADLINE`], as jobs are).
    async fn put_dead(&self, function: &str, entry: &DlqEntry, id: &str) -> Result<(), BusError> {
        let body =
            Bytes::from(serde_json::to_vec(entry).map_err(|e| BusError::Corrupt(e.to_string()))?);
        let subject = self
            .cluster
            .subject(&format!("verge.dlq.{}", function_hex(function)));
        self.put_retrying(subject, id, body).await
    }

    /// Sends one message, again until [`crate::WRITE_DEADLINE`] if it is
    /// not acknowledged.
    async fn put_retrying(&self, subject: String, id: &str, body: Bytes) -> Result<(), BusError> {
        let deadline = std::time::Instant::now() + crate::WRITE_DEADLINE;
        loop {
            let result = match self.put(subject.clone(), id, body.clone()).await {
                Ok(ack) => match tokio::time::timeout(NATS_TIMEOUT, ack).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("no acknowledgement within 5 s".to_string()),
                },
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) if std::time::Instant::now() > deadline => return Err(unavailable(e)),
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    /// Runs a puller for every consumer of the job stream, and stops those
    /// whose consumer went (checked every second).
    async fn compete(self: Arc<Self>) {
        let mut pullers = Pullers::default();
        loop {
            let mut names = HashSet::new();
            let mut listing = self.jobs.consumer_names();
            let mut complete = true;
            while let Some(n) = listing.next().await {
                match n {
                    Ok(n) => {
                        names.insert(n);
                    }
                    Err(_) => {
                        complete = false;
                        break;
                    }
                }
            }
            if complete {
                pullers.0.retain(|name, task| {
                    let keep = names.contains(name) && !task.is_finished();
                    if !keep {
                        task.abort();
                    }
                    keep
                });
                for n in names {
                    if let std::collections::hash_map::Entry::Vacant(e) = pullers.0.entry(n) {
                        let task = tokio::spawn(self.clone().pull(e.key().clone()));
                        e.insert(task);
                    }
                }
                *lock(&self.consumers) = pullers.0.keys().cloned().collect();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Fetches jobs of one consumer while this node has room for them.
    async fn pull(self: Arc<Self>, name: String) {
        let consumer: consumer::PullConsumer = match self.jobs.get_consumer(&name).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(consumer = %name, error = %e, "could not open a job consumer");
                return;
            }
        };
        loop {
            let room = HELD_MAX.saturating_sub(self.held());
            if room == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let batch = consumer
                .batch()
                .max_messages(room.min(FETCH_MAX))
                .expires(Duration::from_secs(2))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(consumer = %name, error = %e, "could not fetch jobs; again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            while let Some(msg) = batch.next().await {
                match msg {
                    Ok(msg) => self.received(msg),
                    Err(e) => {
                        tracing::debug!(consumer = %name, error = %e, "fetching jobs failed; again");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                }
            }
        }
    }

    fn received(&self, msg: jetstream::Message) {
        let mut job: Job = match serde_json::from_slice(&msg.payload) {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(subject = %msg.subject, error = %e, "an unreadable job in the stream; dropped");
                tokio::spawn(async move {
                    let _ = msg.ack_with(AckKind::Term).await;
                });
                return;
            }
        };
        let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
        job.attempts = u32::try_from(delivered).unwrap_or(u32::MAX);
        job.state = JobState::Running;
        lock(&self.ready).push_back(Delivery {
            job,
            msg: Arc::new(msg),
        });
        self.wake.notify_one();
    }

    /// Tells the servers, every third of the lease, that this node is still
    /// on the jobs it holds.
    async fn extend_leases(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.lease / 3).await;
            let held: Vec<Arc<jetstream::Message>> = lock(&self.ready)
                .iter()
                .map(|d| d.msg.clone())
                .chain(lock(&self.running).values().map(|d| d.msg.clone()))
                .collect();
            for m in held {
                if let Err(e) = m.ack_with(AckKind::Progress).await {
                    tracing::debug!(error = %e, "could not extend a job's lease");
                }
            }
        }
    }

    /// Follows `VERGE_DLQ` into the local index, from its start.
    async fn follow_dead_letters(self: Arc<Self>) {
        let mut from = 1;
        loop {
            let consumer = self
                .dlq
                .create_consumer(consumer::pull::OrderedConfig {
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: from,
                    },
                    ..Default::default()
                })
                .await;
            let mut messages = match consumer {
                Ok(c) => match c.messages().await {
                    Ok(m) => m,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                },
                Err(_) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut stall = crate::usage::Stall::default();
            loop {
                let msg =
                    match tokio::time::timeout(Duration::from_millis(500), messages.next()).await {
                        Ok(Some(Ok(msg))) => msg,
                        Ok(_) => break,
                        Err(_) => {
                            if stall.due() && stall.stalled(&self.dlq, from - 1).await {
                                tracing::warn!(
                                    "the dead-letter stream's consumer stalled; reopening it"
                                );
                                break;
                            }
                            continue;
                        }
                    };
                if let Ok(info) = msg.info() {
                    from = info.stream_sequence + 1;
                }
                let entry: DlqEntry = match serde_json::from_slice(&msg.payload) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(error = %e, "an unreadable dead letter; skipped");
                        continue;
                    }
                };
                let result = match entry.dead {
                    Some(job) => self.local.index_jobs(&[job]),
                    None => self.local.unindex_jobs(&entry.gone).map(|_| ()),
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "could not record a dead letter");
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The function of a trigger or schedule this node knows.
    fn function_of(&self, what: &str, id: &str) -> Result<String, BusError> {
        let function = if what == "trigger" {
            self.local
                .triggers(None)?
                .into_iter()
                .find(|t| t.id == id)
                .map(|t| t.function)
        } else {
            self.local
                .schedules(None)?
                .into_iter()
                .find(|s| s.id == id)
                .map(|s| s.function)
        };
        function.ok_or_else(|| BusError::NotFound(format!("{what} {id:?}")))
    }

    /// Deletes a consumer and the jobs waiting for it.
    async fn drop_consumer(&self, subject: &str, name: &str) {
        lock(&self.consumers).remove(name);
        let _ = self.jobs.delete_consumer(name).await;
        let _ = self.jobs.purge().filter(subject).await;
    }

    /// One schedule: fires its due tick (if it is to fire), moves its cursor
    /// on. Returns the firing if this node's publish was the one stored.
    fn fire_schedule(
        &self,
        s: &Schedule,
        now: i64,
        event: &dyn Fn(&Schedule, i64) -> CloudEvent,
    ) -> Result<Option<Fired>, BusError> {
        let Some(ticks) = &self.ticks else {
            return Ok(None);
        };
        let cron = verge_bus::Cron::parse(&s.cron)?;
        let zone = verge_bus::cron::zone(Some(&s.tz))?;
        let cached = lock(&self.cursors).get(&s.id).copied();
        let (cursor, revision) = match cached {
            Some(c) => c,
            None => {
                let entry = self.run(ticks.entry(&s.id)).map_err(unavailable)?;
                let read = entry
                    .filter(|e| e.operation == kv::Operation::Put)
                    .and_then(|e| {
                        Some((
                            std::str::from_utf8(&e.value).ok()?.parse().ok()?,
                            e.revision,
                        ))
                    });
                match read {
                    Some(c) => c,
                    None => {
                        // A new schedule: its ticks start now.
                        let start = s.next_ms.saturating_sub(1).min(now);
                        match self.run(ticks.create(&s.id, start.to_string().into())) {
                            Ok(rev) => (start, rev),
                            Err(_) => return Ok(None),
                        }
                    }
                }
            }
        };
        lock(&self.cursors).insert(s.id.clone(), (cursor, revision));
        let Some(at) = verge_bus::next_fire(&cron, &zone, cursor) else {
            return Ok(None);
        };
        if at > now {
            if s.next_ms != at {
                self.local.set_schedule_times(&s.id, at, None)?;
            }
            return Ok(None);
        }
        let missed_several = verge_bus::next_fire(&cron, &zone, at).is_some_and(|f| f <= now);
        let fire = !missed_several || s.missed == "once";
        let mut fired = None;
        if fire {
            let job = self.local.make_job(
                format!("{}-{at}", s.id),
                &s.function,
                &s.alias,
                None,
                Payload::Event {
                    event: event(s, at),
                },
                0,
            )?;
            let duplicate = self.run(self.put_jobs(&[(job.clone(), None)]))?;
            if duplicate.first() == Some(&false) {
                fired = Some(Fired {
                    schedule: s.clone(),
                    at,
                    job,
                });
            }
        }
        // Moved on to now: every tick up to now is fired or skipped.
        match self.run(ticks.update(&s.id, now.to_string().into(), revision)) {
            Ok(rev) => {
                lock(&self.cursors).insert(s.id.clone(), (now, rev));
                let next = verge_bus::next_fire(&cron, &zone, now).unwrap_or(i64::MAX);
                self.local
                    .set_schedule_times(&s.id, next, fire.then_some(at))?;
            }
            // Another scheduler moved it first: read again next time.
            Err(_) => {
                lock(&self.cursors).remove(&s.id);
            }
        }
        Ok(fired)
    }
}

/// Acks a job done, and waits for the server to confirm it; again until
/// [`crate::WRITE_DEADLINE`] (a server died and the consumer's leader
/// moves): an ack that never lands only means the job runs again.
async fn acked(msg: &jetstream::Message) -> Result<(), BusError> {
    let deadline = std::time::Instant::now() + crate::WRITE_DEADLINE;
    loop {
        let e = match tokio::time::timeout(NATS_TIMEOUT, msg.double_ack()).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no confirmation within 5 s".to_string(),
        };
        if std::time::Instant::now() > deadline {
            return Err(unavailable(e));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn bus_err(e: BusError) -> ClusterError {
    ClusterError::Other(e.to_string())
}

impl Bus for NatsBus {
    fn recover(&self) -> Result<usize, BusError> {
        // Jobs this node ran when it stopped went back to their consumers
        // when their leases ran out; `start` dropped them from the index.
        Ok(0)
    }

    fn add_trigger(
        &self,
        function: &str,
        alias: &str,
        ty: &str,
        source: Option<&str>,
        subject_prefix: Option<&str>,
    ) -> Result<Trigger, BusError> {
        let t = verge_bus::new_trigger(function, alias, ty, source, subject_prefix)?;
        let (subject, name) = route(&self.cluster.prefix, function, Some(&t.id));
        self.run(self.ensure_consumer(&subject, &name))?;
        self.update_subscriptions(function, |subs| {
            subs.triggers.push(t.clone());
            Ok(())
        })?;
        Ok(t)
    }

    fn triggers(&self, function: Option<&str>) -> Result<Vec<Trigger>, BusError> {
        self.local.triggers(function)
    }

    fn remove_trigger(&self, id: &str) -> Result<(), BusError> {
        let function = self.function_of("trigger", id)?;
        self.update_subscriptions(&function, |subs| {
            let before = subs.triggers.len();
            subs.triggers.retain(|t| t.id != id);
            if subs.triggers.len() == before {
                return Err(BusError::NotFound(format!("trigger {id:?}")));
            }
            Ok(())
        })?;
        let (subject, name) = route(&self.cluster.prefix, &function, Some(id));
        self.run(self.drop_consumer(&subject, &name));
        Ok(())
    }

    fn forget_function(&self, function: &str) -> Result<(), BusError> {
        let subs = self.update_subscriptions(function, |subs| Ok(std::mem::take(subs)))?;
        self.run(async {
            for t in &subs.triggers {
                let (subject, name) = route(&self.cluster.prefix, function, Some(&t.id));
                self.drop_consumer(&subject, &name).await;
            }
            let (subject, name) = route(&self.cluster.prefix, function, None);
            self.drop_consumer(&subject, &name).await;
            if let Some(ticks) = &self.ticks {
                for s in &subs.schedules {
                    let _ = ticks.delete(&s.id).await;
                }
            }
        });
        self.local.forget_function(function)
    }

    fn async_config(&self, function: &str) -> Result<AsyncConfig, BusError> {
        self.local.async_config(function)
    }

    fn set_async_config(&self, function: &str, config: &AsyncConfig) -> Result<(), BusError> {
        self.update_subscriptions(function, |subs| {
            subs.async_config = Some(config.clone());
            Ok(())
        })
    }

    fn publish(&self, events: &[CloudEvent]) -> Result<Published, BusError> {
        if self.cluster.site().is_some() {
            return self.publish_at_edge(events);
        }
        let triggers = self.local.triggers(None)?;
        let mut out = Published::default();
        let mut queued = Vec::new();
        let mut dead = Vec::new();
        for event in events {
            let hops = event.hops();
            for t in triggers.iter().filter(|t| t.matches(event)) {
                let mut job = self.local.make_job(
                    delivery_id(&t.id, event),
                    &t.function,
                    &t.alias,
                    None,
                    Payload::Event {
                        event: event.clone(),
                    },
                    hops,
                )?;
                job.trigger = Some(t.id.clone());
                if hops >= self.local.hop_limit {
                    job.state = JobState::Dead;
                    job.last_error = Some(verge_bus::hop_limit_reason(hops, self.local.hop_limit));
                    out.dead.push(job.id.clone());
                    dead.push(job);
                } else {
                    out.queued.push(job.id.clone());
                    queued.push((job, Some(t.id.clone())));
                }
            }
        }
        if queued.is_empty() && dead.is_empty() {
            return Ok(out);
        }
        self.link()?;
        self.run(async {
            self.put_jobs(&queued).await?;
            for job in dead {
                let id = format!("dead-{}", job.id);
                let function = job.function.clone();
                self.put_dead(
                    &function,
                    &DlqEntry {
                        dead: Some(job),
                        gone: Vec::new(),
                    },
                    &id,
                )
                .await?;
            }
            Ok::<_, BusError>(())
        })?;
        Ok(out)
    }

    fn enqueue(
        &self,
        function: &str,
        alias: &str,
        version: Option<u64>,
        payload: Payload,
        hops: u32,
    ) -> Result<Job, BusError> {
        self.link()?;
        let job =
            self.local
                .make_job(random_id("inv_"), function, alias, version, payload, hops)?;
        self.run(self.put_jobs(&[(job.clone(), None)]))?;
        Ok(job)
    }

    fn claim(&self, limit: usize) -> Result<Vec<Job>, BusError> {
        let mut taken = Vec::new();
        {
            let mut ready = lock(&self.ready);
            let mut running = lock(&self.running);
            while taken.len() < limit {
                let Some(d) = ready.pop_front() else { break };
                taken.push(d.job.clone());
                running.insert(d.job.id.clone(), d);
            }
        }
        if !taken.is_empty()
            && let Err(e) = self.local.index_jobs(&taken)
        {
            tracing::warn!(error = %e, "could not index claimed jobs");
        }
        Ok(taken)
    }

    fn next_due_ms(&self) -> Result<Option<i64>, BusError> {
        Ok((!lock(&self.ready).is_empty()).then(now_ms))
    }

    fn depth(&self) -> Result<u64, BusError> {
        let mut jobs = self.jobs.clone();
        let info = self.run(async {
            tokio::time::timeout(Duration::from_secs(2), jobs.info())
                .await
                .map_err(|_| unavailable("no answer within 2 s"))?
                .map_err(unavailable)
                .map(|i| i.state.messages)
        })?;
        Ok(info)
    }

    fn complete(&self, id: &str) -> Result<(), BusError> {
        let d = lock(&self.running)
            .remove(id)
            .ok_or_else(|| BusError::NotFound(format!("running job {id:?}")))?;
        self.run(acked(&d.msg))?;
        let mut job = d.job;
        job.state = JobState::Succeeded;
        job.last_error = None;
        self.local.index_jobs(&[job])
    }

    fn fail(&self, id: &str, error: &str) -> Result<Job, BusError> {
        let d = lock(&self.running)
            .remove(id)
            .ok_or_else(|| BusError::NotFound(format!("running job {id:?}")))?;
        let mut job = d.job;
        let verge_bus::Failed {
            state,
            delay,
            next_ms: next,
            reason,
        } = verge_bus::after_failure(&job, error, self.local.retry_base);
        job.state = state;
        job.next_ms = next;
        job.last_error = Some(reason);
        self.run(async {
            if state == JobState::Dead {
                let dead_id = format!("dead-{}-{}", job.id, job.attempts);
                self.put_dead(
                    &job.function,
                    &DlqEntry {
                        dead: Some(job.clone()),
                        gone: Vec::new(),
                    },
                    &dead_id,
                )
                .await?;
                acked(&d.msg).await
            } else {
                d.msg
                    .ack_with(AckKind::Nak(Some(delay)))
                    .await
                    .map_err(unavailable)
            }
        })?;
        self.local.index_jobs(std::slice::from_ref(&job))?;
        Ok(job)
    }

    fn job(&self, id: &str) -> Result<Job, BusError> {
        self.local.job(id)
    }

    fn jobs(
        &self,
        function: Option<&str>,
        state: Option<JobState>,
        limit: u32,
    ) -> Result<Vec<Job>, BusError> {
        self.local.jobs(function, state, limit)
    }

    fn dead_letters(&self, function: Option<&str>, limit: u32) -> Result<Vec<Job>, BusError> {
        self.local.dead_letters(function, limit)
    }

    fn replay(&self, id: &str) -> Result<Job, BusError> {
        let old = self.local.job(id)?;
        if old.state != JobState::Dead {
            return Err(BusError::Invalid(format!(
                "job {id} is not dead-lettered; only dead letters can be replayed"
            )));
        }
        self.link()?;
        let mut job = self.local.make_job(
            old.id.clone(),
            &old.function,
            &old.alias,
            old.version,
            old.payload.clone(),
            0,
        )?;
        job.trigger = old.trigger.clone();
        // A replay is a new message (the stream would drop the id it
        // already has as a duplicate), for the function's own consumer (the
        // trigger may be gone).
        let replay = job.clone();
        self.run(async {
            let (subject, name) = route(&self.cluster.prefix, &replay.function, None);
            self.ensure_consumer(&subject, &name).await?;
            let body = serde_json::to_vec(&replay).map_err(|e| BusError::Corrupt(e.to_string()))?;
            let id = format!("{}-replay-{}", replay.id, now_ms());
            self.put_retrying(subject, &id, body.into()).await?;
            self.put_dead(
                &replay.function,
                &DlqEntry {
                    dead: None,
                    gone: vec![replay.id.clone()],
                },
                &format!("gone-{}-{}", replay.id, now_ms()),
            )
            .await
        })?;
        self.local.unindex_jobs(std::slice::from_ref(&job.id))?;
        Ok(job)
    }

    fn purge(&self, function: Option<&str>) -> Result<usize, BusError> {
        let ids: Vec<String> = self
            .local
            .dead_letters(function, u32::MAX)?
            .into_iter()
            .map(|j| j.id)
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        self.link()?;
        self.run(async {
            for chunk in ids.chunks(1000) {
                let entry = DlqEntry {
                    dead: None,
                    gone: chunk.to_vec(),
                };
                self.put_dead(
                    function.unwrap_or("_"),
                    &entry,
                    &format!("gone-{}", random_id("")),
                )
                .await?;
            }
            Ok::<_, BusError>(())
        })?;
        self.local.unindex_jobs(&ids)
    }

    fn prune(&self, age: Duration, bytes: u64) -> Result<usize, BusError> {
        self.local.prune(age, bytes)
    }

    fn add_schedule(
        &self,
        function: &str,
        alias: &str,
        expr: &str,
        tz: Option<&str>,
        missed: &str,
    ) -> Result<Schedule, BusError> {
        let s = verge_bus::new_schedule(function, alias, expr, tz, missed)?;
        self.update_subscriptions(function, |subs| {
            subs.schedules.push(s.clone());
            Ok(())
        })?;
        Ok(s)
    }

    fn schedules(&self, function: Option<&str>) -> Result<Vec<Schedule>, BusError> {
        self.local.schedules(function)
    }

    fn remove_schedule(&self, id: &str) -> Result<(), BusError> {
        let function = self.function_of("schedule", id)?;
        self.update_subscriptions(&function, |subs| {
            let before = subs.schedules.len();
            subs.schedules.retain(|s| s.id != id);
            if subs.schedules.len() == before {
                return Err(BusError::NotFound(format!("schedule {id:?}")));
            }
            Ok(())
        })?;
        if let Some(ticks) = &self.ticks {
            let _ = self.run(ticks.delete(id));
        }
        lock(&self.cursors).remove(id);
        Ok(())
    }

    fn fire_due_schedules(
        &self,
        event: &dyn Fn(&Schedule, i64) -> CloudEvent,
    ) -> Result<Vec<Fired>, BusError> {
        if self.cluster.down_since().is_some() {
            // Ticks wait for the link (a schedule that missed several fires
            // as its policy says when it is back).
            return Ok(Vec::new());
        }
        let now = now_ms();
        let mut out = Vec::new();
        for s in self.local.schedules(None)? {
            match self.fire_schedule(&s, now, event) {
                Ok(Some(f)) => out.push(f),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(schedule = %s.id, error = %e, "could not fire a schedule")
                }
            }
        }
        Ok(out)
    }
}
