//! The cluster backends on NATS JetStream: the only crate that knows
//! `async-nats`.
//!
//! Layout (created explicitly, with the replicas the cluster can hold):
//! - KV bucket `verge_registry`: the registry as documents (`fn.<name>`,
//!   `routes`, `tokens`, see `verge_store::Doc`) plus `format` (the layout
//!   version and the registry's id). Every node watches it and imports each
//!   document into its SQLite replica, whose change feed its tables follow;
//!   writes are rehearsed on the replica and stored by compare-and-set on
//!   each document's revision ([`Cluster::write`]).
//! - Object store `verge_artifacts`: component bytes by sha256, in chunks of
//!   512 KiB (the client waits for each chunk's ack) ([`NatsArtifacts`]).
//! - KV bucket `verge_nodes`: each node's record, put every few seconds,
//!   expiring after [`NODE_TTL`] ([`Cluster::heartbeat`], [`Cluster::nodes`]).
//!
//! The request path never touches NATS: it reads the node's tables. When
//! NATS is unreachable, writes fail at once with [`ClusterError::Unavailable`]
//! and the node keeps serving and reading what its replica holds; the client
//! reconnects by itself and the watch resumes from the replica's position.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};
use verge_store::{Doc, Store, StoreError};

mod artifacts;
mod bus;
mod edge;
mod edge_events;
pub use edge_events::{EDGE_EVENTS_STREAM, FROM_EDGES_STREAM};
mod forward;
pub use forward::{BodyStream, CHUNK, ForwardAnswer, ForwardBody, ForwardHandler, ForwardHead};
mod kvsync;
mod usage;
pub use kvsync::{NEEDED_PAYLOAD, NatsKvTransport};
pub use usage::{USAGE_KEEP, USAGE_STREAM};
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub use artifacts::NatsArtifacts;
pub use bus::{DLQ_STREAM, JOBS_STREAM, NatsBus, TICKS_BUCKET};

/// The registry layout this build reads and writes.
pub const FORMAT: u32 = 1;
/// The registry bucket.
pub const REGISTRY_BUCKET: &str = "verge_registry";
/// The node liveness bucket.
pub const NODES_BUCKET: &str = "verge_nodes";
/// The artifact object store.
pub const ARTIFACTS_BUCKET: &str = "verge_artifacts";
/// How often a node puts its record.
pub const HEARTBEAT: Duration = Duration::from_secs(3);
/// How long a node's record outlives its last heartbeat.
pub const NODE_TTL: Duration = Duration::from_secs(10);
/// How long connecting and checking the server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one JetStream request may take before a write is refused.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a node checks that its registry watch keeps up.
pub(crate) const STALL_CHECK: Duration = Duration::from_secs(2);
/// How long a joining node may take to import the registry.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a write waits for a lost link to come back before it is refused.
pub(crate) const LINK_GRACE: Duration = Duration::from_secs(2);
/// How long a write keeps trying when the servers do not answer.
pub(crate) const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// Writes rehearsed again after another node wrote first.
const WRITE_ATTEMPTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "could not connect to NATS at {url}: {reason}; check the URL and that nats-server runs there"
    )]
    Connect { url: String, reason: String },
    #[error(
        "the NATS server at {url} has no JetStream; start it with JetStream enabled (`nats-server -js`, or a `jetstream {{}}` block in its config)"
    )]
    NoJetStream { url: String },
    #[error("{0}")]
    Format(String),
    #[error(
        "the cluster's registry cannot be written now: {0}; this node keeps serving and answering reads from its copy; retry when NATS is back"
    )]
    Unavailable(String),
    #[error("the write did not get through ({0}) after several attempts; retry it")]
    Contended(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Other(String),
}

/// How to reach the cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `nats://host:port` (several, comma-separated).
    pub url: String,
    /// A `.creds` file (user JWT and seed).
    pub creds: Option<PathBuf>,
    /// The JetStream domain to use (leaf nodes run their own).
    pub domain: Option<String>,
    /// This node's name (unique in the cluster).
    pub node: String,
    /// Replicas of each bucket (default: 3 when the cluster has 3 or more
    /// servers, else 1).
    pub replicas: Option<usize>,
    /// How long a job stays with a node that stopped answering for it
    /// before another node takes it (default [`JOB_LEASE`]).
    pub job_lease: Option<Duration>,
    /// An edge node's site: `url` is then its leaf server, whose JetStream
    /// domain is `edge-<site>` ([`edge_domain`]), linked to the hub's
    /// (domain [`HUB_DOMAIN`]).
    pub site: Option<String>,
}

/// The JetStream domain of the core's servers (the hub of the leaf links).
pub const HUB_DOMAIN: &str = "hub";

/// The JetStream domain of an edge site's leaf server.
pub fn edge_domain(site: &str) -> String {
    format!("edge-{site}")
}

/// How long a job stays with a node that stopped answering for it (the
/// job consumers' ack wait; a live node extends it every third of it).
pub const JOB_LEASE: Duration = Duration::from_secs(30);

/// A node's record in `verge_nodes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeRecord {
    pub name: String,
    /// The node's control and function URL.
    pub url: String,
    pub role: String,
    pub version: String,
    /// Seconds since the epoch.
    pub started: i64,
    pub heartbeat: i64,
    /// Registry revision this node's replica has imported.
    pub position: u64,
    /// Functions and versions it holds, and how many are ready.
    pub versions: u64,
    pub ready: u64,
    /// The node's labels (placement).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// The versions it has code loaded for, `function@version`.
    #[serde(default)]
    pub loaded: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct FormatDoc {
    format: u32,
    registry: String,
}

/// A connection to the cluster's JetStream.
pub struct Cluster {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Stream `VERGE_USAGE` (`usage`).
    usage: jetstream::stream::Stream,
    url: String,
    /// The registry: the bucket itself on the core, its mirror at an edge
    /// (read locally; writes go on to the hub's bucket).
    registry: kv::Store,
    /// `verge_nodes` (the hub's: at an edge, opened once the link is up).
    nodes: tokio::sync::OnceCell<kv::Store>,
    /// At an edge, the mirror of `verge_nodes` it lists nodes from.
    /// (made again when the link returns: a mirror resumes only after the
    /// server's retry backoff, and node records expire in 10 s).
    nodes_mirror: std::sync::RwLock<Option<kv::Store>>,
    /// The artifact store: at an edge, its mirror.
    objects: jetstream::object_store::ObjectStore,
    /// At an edge: its site and the hub's JetStream.
    edge: Option<edge::Edge>,
    /// Where the answers to this node's forwarded requests arrive.
    replies: tokio::sync::OnceCell<Arc<forward::Replies>>,
    /// The JetStream API prefix of `js` (`$JS.API`, or a domain's).
    api_prefix: String,
    /// The registry bucket takes atomic batches (multi-document writes).
    atomic: bool,
    /// Prefix of this node's stream subjects: empty on the core,
    /// `edge.<site>.` at an edge (its streams must not capture the core's
    /// messages, which cross the leaf link).
    prefix: String,
    registry_id: String,
    replicas: usize,
    /// Rehearsals and imports take turns: a rehearsal finds the documents
    /// it changed by the log entries written since it began.
    turn: Mutex<()>,
    /// Held through a whole write (rehearsal, compare-and-set, import).
    writing: Mutex<()>,
    /// The registry revision the replica has imported.
    applied: watch::Sender<u64>,
    /// Since when the link is down (`None`: connected).
    down_since: std::sync::Mutex<Option<SystemTime>>,
    /// Wakes the heartbeat before its tick (a version became ready).
    beat: tokio::sync::Notify,
    /// The follower and the heartbeat.
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn unavailable(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Unavailable(e.to_string())
}

fn random_id() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

impl Cluster {
    /// Connects, checks JetStream, creates what is missing (buckets with
    /// the cluster's replicas) and checks the registry's layout: an error
    /// within [`CONNECT_TIMEOUT`] rather than a hang.
    pub async fn connect(opts: &ClusterOptions) -> Result<Arc<Cluster>, ClusterError> {
        // An edge's first start also waits for its mirrors' first sync.
        let limit = match opts.site {
            Some(_) => CONNECT_TIMEOUT + edge::FIRST_SYNC,
            None => CONNECT_TIMEOUT,
        };
        match tokio::time::timeout(limit, Self::connect_inner(opts)).await {
            Ok(r) => r,
            Err(_) => Err(ClusterError::Connect {
                url: opts.url.clone(),
                reason: format!(
                    "no ready JetStream within {} s (a new NATS cluster needs a few seconds to elect its leader; its servers' /healthz says when it is ready)",
                    CONNECT_TIMEOUT.as_secs()
                ),
            }),
        }
    }

    async fn connect_inner(opts: &ClusterOptions) -> Result<Arc<Cluster>, ClusterError> {
        let url = opts.url.clone();
        let connect_err = |reason: String| ClusterError::Connect {
            url: url.clone(),
            reason,
        };
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("verge/{}", opts.node))
            .connection_timeout(Duration::from_secs(2))
            .request_timeout(Some(REQUEST_TIMEOUT))
            // Reconnect attempts every 100 ms at first, at most every 500 ms
            // (the client's default backs off to several seconds, which a
            // node would spend refusing writes after NATS is back).
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((attempts as u64 * 100).clamp(100, 500))
            });
        if let Some(creds) = &opts.creds {
            options = options.credentials_file(creds).await.map_err(|e| {
                connect_err(format!(
                    "could not read the credentials {}: {e}",
                    creds.display()
                ))
            })?;
        }
        let (events_tx, mut events_rx) = tokio::sync::mpsc::unbounded_channel();
        options = options.event_callback(move |event| {
            let tx = events_tx.clone();
            async move {
                let _ = tx.send(event);
            }
        });
        // The client does not read a user and password from the URL itself.
        let mut servers = Vec::new();
        for u in opts.url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let addr: async_nats::ServerAddr = u
                .parse()
                .map_err(|e| connect_err(format!("{u:?} is not a NATS URL ({e})")))?;
            if servers.is_empty() {
                match (addr.username(), addr.password()) {
                    (Some(user), Some(pass)) => {
                        options = options.user_and_password(user.to_string(), pass.to_string())
                    }
                    (Some(token), None) => options = options.token(token.to_string()),
                    _ => {}
                }
            }
            servers.push(addr);
        }
        let client = options
            .connect(servers)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let info = client.server_info();
        let js = match &opts.domain {
            Some(d) => jetstream::with_domain(client.clone(), d),
            None => jetstream::new(client.clone()),
        };
        if !info.jetstream {
            return Err(ClusterError::NoJetStream { url });
        }
        // A cluster that just started elects its JetStream leader first:
        // ask again until it answers (within the connect timeout).
        loop {
            match js.query_account().await {
                Ok(_) => break,
                Err(e) if e.to_string().contains("not enabled") => {
                    return Err(ClusterError::NoJetStream { url: url.clone() });
                }
                Err(e) => {
                    tracing::info!(error = %e, "JetStream is not ready yet; asking again");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        let (registry, nodes, objects, usage, replicas, registry_id, edge, prefix, nodes_mirror);
        let atomic;
        if let Some(site) = &opts.site {
            let e = edge::Edge::open(client.clone(), &js, site, &url).await?;
            // The link's state is known from the start.
            e.probe().await;
            registry = e.registry_mirror(&js).await?;
            objects = e.objects_mirror(&js).await?;
            nodes_mirror = Some(e.nodes_mirror(&js).await?);
            prefix = format!("edge.{site}.");
            usage = usage::ensure_stream(&js, 1, &prefix).await?;
            registry_id = e.registry_id(&registry).await?;
            nodes = tokio::sync::OnceCell::new();
            replicas = 1;
            // The core's nodes made the hub's bucket take them.
            atomic = true;
            edge = Some(e);
        } else {
            let servers = info.connect_urls.len().max(1);
            replicas = opts.replicas.unwrap_or(if servers >= 3 { 3 } else { 1 });
            registry = bucket(
                &js,
                kv::Config {
                    bucket: REGISTRY_BUCKET.into(),
                    description: "Verge registry: functions, routes, tokens".into(),
                    history: 1,
                    num_replicas: replicas,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                },
            )
            .await?;
            nodes = tokio::sync::OnceCell::new_with(Some(
                bucket(
                    &js,
                    kv::Config {
                        bucket: NODES_BUCKET.into(),
                        description: "Verge nodes: liveness and load".into(),
                        history: 1,
                        max_age: NODE_TTL,
                        num_replicas: replicas,
                        storage: jetstream::stream::StorageType::File,
                        ..Default::default()
                    },
                )
                .await?,
            ));
            objects = match js.get_object_store(ARTIFACTS_BUCKET).await {
                Ok(o) => o,
                Err(_) => js
                    .create_object_store(jetstream::object_store::Config {
                        bucket: ARTIFACTS_BUCKET.into(),
                        description: Some("Verge component bytes by sha256".into()),
                        num_replicas: replicas,
                        storage: jetstream::stream::StorageType::File,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| {
                        ClusterError::Other(format!(
                            "could not create the {ARTIFACTS_BUCKET} object store: {e}"
                        ))
                    })?,
            };
            prefix = String::new();
            atomic = allow_atomic(&js, &registry).await;
            usage = usage::ensure_stream(&js, replicas, &prefix).await?;
            registry_id = registry_format(&registry).await?;
            edge = None;
            nodes_mirror = None;
        }
        let (applied, _) = watch::channel(0);
        let cluster = Arc::new(Cluster {
            client,
            js,
            usage,
            url: opts.url.clone(),
            registry,
            nodes,
            nodes_mirror: std::sync::RwLock::new(nodes_mirror),
            objects,
            edge,
            replies: Default::default(),
            api_prefix: match &opts.domain {
                Some(d) => format!("$JS.{d}.API"),
                None => "$JS.API".to_string(),
            },
            atomic,
            prefix,
            registry_id,
            replicas,
            turn: Mutex::new(()),
            writing: Mutex::new(()),
            applied,
            down_since: std::sync::Mutex::new(None),
            beat: tokio::sync::Notify::new(),
            tasks: Default::default(),
        });
        let weak = Arc::downgrade(&cluster);
        tokio::spawn(async move {
            while let Some(event) = events_rx.recv().await {
                let Some(c) = weak.upgrade() else { break };
                match event {
                    async_nats::Event::Disconnected => {
                        tracing::warn!(url = %c.url, "lost the link to NATS; serving from this node's copy of the registry");
                        c.set_down(true);
                    }
                    async_nats::Event::Connected => {
                        tracing::info!(url = %c.url, "linked to NATS again");
                        c.set_down(false);
                    }
                    other => tracing::debug!(event = %other, "NATS client event"),
                }
            }
        });
        if cluster.edge.is_some() {
            let weak = Arc::downgrade(&cluster);
            let task = tokio::spawn(async move {
                // Made again at start too: the leaf server may have kept a mirror
                // that waits out a retry backoff.
                let mut was_linked = false;
                loop {
                    let Some(c) = weak.upgrade() else { break };
                    if let Some(e) = &c.edge {
                        let linked = e.probe().await;
                        if linked && !was_linked {
                            c.renew_nodes_mirror(e).await;
                        }
                        was_linked = linked;
                    }
                    drop(c);
                    tokio::time::sleep(edge::PROBE).await;
                }
            });
            lock(&cluster.tasks).push(task);
            // Its records go on to the core's usage stream.
            let task = tokio::spawn(edge::push_to_core(
                Arc::downgrade(&cluster),
                cluster.usage.clone(),
                None,
            ));
            lock(&cluster.tasks).push(task);
        }
        Ok(cluster)
    }

    /// At an edge whose link came back: the node records' mirror is made
    /// again, so that it follows the core at once.
    async fn renew_nodes_mirror(&self, e: &edge::Edge) {
        let _ = self.js.delete_stream(format!("KV_{NODES_BUCKET}")).await;
        match e.nodes_mirror(&self.js).await {
            Ok(m) => {
                *self
                    .nodes_mirror
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(m);
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not make the node records' mirror again")
            }
        }
    }

    /// The site of an edge node (`None` on the core).
    pub fn site(&self) -> Option<&str> {
        self.edge.as_ref().map(|e| e.site.as_str())
    }

    /// At an edge: since when its link to the core is cut (`None`: linked,
    /// and always on the core).
    pub fn uplink_cut_since(&self) -> Option<SystemTime> {
        self.edge.as_ref().and_then(edge::Edge::cut_since)
    }

    /// The subject `name` of this node's streams (prefixed at an edge).
    pub(crate) fn subject(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// `verge_nodes`: at an edge, the hub's, opened once the link is up.
    async fn nodes_bucket(&self) -> Result<&kv::Store, ClusterError> {
        self.nodes
            .get_or_try_init(|| async {
                match &self.edge {
                    Some(e) => e.hub.get_key_value(NODES_BUCKET).await.map_err(unavailable),
                    None => Err(ClusterError::Other("no nodes bucket".into())),
                }
            })
            .await
    }

    fn set_down(&self, down: bool) {
        let mut d = self
            .down_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match (down, d.is_some()) {
            (true, false) => *d = Some(SystemTime::now()),
            (false, true) => *d = None,
            _ => {}
        }
    }

    /// Since when the link to NATS is down, `None` while connected.
    pub fn down_since(&self) -> Option<SystemTime> {
        let d = *self
            .down_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match self.client.connection_state() {
            async_nats::connection::State::Connected => None,
            _ => Some(d.unwrap_or_else(SystemTime::now)),
        }
    }

    /// The cluster registry's id (fixed when the first node created it).
    pub fn registry_id(&self) -> &str {
        &self.registry_id
    }

    /// Replicas of each bucket.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// The URL it was connected with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The registry revision the local replica has imported.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// `Ok` while the link to NATS is up; else why a write cannot happen.
    pub fn check_link(&self) -> Result<(), ClusterError> {
        if let Some(t) = self.uplink_cut_since() {
            let secs = SystemTime::now()
                .duration_since(t)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            return Err(ClusterError::Unavailable(format!(
                "this edge's link to the core is cut (for {secs} s); this edge keeps serving from its copies; write at a core node, or retry when the link is back"
            )));
        }
        match self.down_since() {
            None => Ok(()),
            Some(t) => {
                let secs = SystemTime::now()
                    .duration_since(t)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                Err(ClusterError::Unavailable(format!(
                    "NATS at {} is unreachable (for {secs} s)",
                    self.url
                )))
            }
        }
    }

    /// The registry's latest revision, asked of the server.
    async fn head(&self) -> Result<u64, ClusterError> {
        let (source, _) = self.registry_source().await;
        head_of(source).await
    }

    /// Where the registry is read from: the bucket on the core; at an edge,
    /// the hub's bucket while linked (`true`), else the local mirror.
    async fn registry_source(&self) -> (&kv::Store, bool) {
        if let Some(e) = &self.edge
            && e.cut_since().is_none()
            && let Ok(hub) = e.hub_registry().await
        {
            return (hub, true);
        }
        (&self.registry, false)
    }

    /// Makes `store` a replica of this cluster's registry and starts
    /// following it ([`Cluster::follow`]); returns once the replica holds
    /// everything stored before the call.
    pub async fn join(self: &Arc<Self>, store: &Arc<Store>) -> Result<(), ClusterError> {
        let (s, id) = (store.clone(), self.registry_id.clone());
        blocking(move || s.follow_registry(&id)).await?;
        let s = store.clone();
        let position = blocking(move || s.replica_state())
            .await?
            .map(|r| r.position)
            .unwrap_or(0);
        self.applied.send_replace(position);
        let head = self.head().await?;
        let task = tokio::spawn(self.clone().follow(store.clone()));
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(task);
        let mut rx = self.applied.subscribe();
        match tokio::time::timeout(JOIN_TIMEOUT, rx.wait_for(|a| *a >= head)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ClusterError::Unavailable(format!(
                "this node's copy of the registry did not reach revision {head} within {} s of joining",
                JOIN_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Stops following the registry and heartbeats (a node that stops).
    pub fn close(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            t.abort();
        }
    }

    /// Starts this node's heartbeat ([`Cluster::heartbeat`]); stopped by
    /// [`Cluster::close`].
    pub fn start_heartbeat(self: &Arc<Self>, record: impl Fn() -> NodeRecord + Send + 'static) {
        let task = tokio::spawn(self.clone().heartbeat(record));
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(task);
    }

    async fn import(&self, store: &Arc<Store>, entry: kv::Entry) -> Result<(), ClusterError> {
        let doc = Doc {
            key: entry.key.clone(),
            value: match entry.operation {
                kv::Operation::Put => Some(entry.value.to_vec()),
                kv::Operation::Delete | kv::Operation::Purge => None,
            },
        };
        let revision = entry.revision;
        let _turn = self.turn.lock().await;
        let s = store.clone();
        blocking(move || s.import(&doc, revision)).await?;
        self.applied.send_modify(|a| *a = (*a).max(revision));
        Ok(())
    }

    /// Keeps `store` current with the registry until [`Cluster::close`]: a
    /// supervised watch, reopened from the replica's position after any
    /// error.
    async fn follow(self: Arc<Self>, store: Arc<Store>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let from = self.applied() + 1;
            let (source, direct) = self.registry_source().await;
            match source.watch_all_from_revision(from).await {
                Ok(mut watch) => {
                    backoff = Duration::from_millis(100);
                    // A watch can also stall without an error (its server
                    // died and the client moved on): checked against the
                    // registry's head, and reopened when it makes no progress.
                    let mut check = tokio::time::interval(STALL_CHECK);
                    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    check.tick().await;
                    let mut behind_at: Option<u64> = None;
                    loop {
                        tokio::select! {
                            entry = watch.next() => {
                                let result = match entry {
                                    Some(Ok(entry)) => self.import(&store, entry).await,
                                    Some(Err(e)) => Err(unavailable(e)),
                                    None => Err(ClusterError::Unavailable("the watch ended".into())),
                                };
                                if let Err(e) = result {
                                    tracing::warn!(error = %e, "the registry watch failed; reopening it");
                                    break;
                                }
                            }
                            // An edge whose link changed reads from the other source.
                            _ = link_changed(&self.edge), if self.edge.is_some() => {
                                if self.uplink_cut_since().is_none() != direct {
                                    tracing::debug!(direct, "the registry's source changes with the link; reopening");
                                    break;
                                }
                            }
                            _ = check.tick() => {
                                if self.edge.is_some() && self.uplink_cut_since().is_none() != direct {
                                    break;
                                }
                                let Ok(head) = head_of(source).await else { continue };
                                let applied = self.applied();
                                if head <= applied {
                                    behind_at = None;
                                } else if behind_at == Some(applied) {
                                    tracing::warn!(head, applied, "the registry watch stalled; reopening it");
                                    break;
                                } else {
                                    behind_at = Some(applied);
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not open the registry watch; retrying")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Runs a registry write for the whole cluster: rehearsed on `store`
    /// (the replica), its documents stored by compare-and-set, rehearsed
    /// again when another node wrote one of them first. Returns once the
    /// replica has imported the write.
    pub async fn write<R, F>(&self, store: &Arc<Store>, op: F) -> Result<R, ClusterError>
    where
        R: Send + 'static,
        F: Fn(&Store) -> Result<R, StoreError> + Send + Sync + 'static,
    {
        let op = Arc::new(op);
        let mut contended = String::new();
        // This node's writes go one at a time: they would only race each
        // other for the same revisions.
        let _writing = self.writing.lock().await;
        let deadline = Instant::now() + WRITE_DEADLINE;
        let mut unanswered = None;
        let mut attempt = 0;
        while attempt < WRITE_ATTEMPTS {
            if attempt > 0 {
                // Another node won the last round: give it room, with jitter
                // so that two losers do not collide again.
                let ms = rand::random_range(0..(5u64 << attempt.min(5)));
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            // A client that lost its server reconnects to another of the
            // cluster within moments: a failover is waited out, an outage
            // is reported.
            self.wait_connected(LINK_GRACE).await;
            self.check_link()?;
            let turn = self.turn.lock().await;
            let (s, o) = (store.clone(), op.clone());
            let (out, docs) = blocking(move || {
                let (out, docs) = s.rehearse(|st| o(st))?;
                let mut with_revs = Vec::new();
                for d in docs {
                    let rev = s.replica_revision(&d.key)?;
                    with_revs.push((d, rev));
                }
                Ok((out, with_revs))
            })
            .await?;
            drop(turn);
            if docs.is_empty() {
                return Ok(out);
            }
            let stored = match self.store_docs(order(docs)).await {
                // A stream whose leader was on a server that died answers
                // again once the others elected a new one.
                Err(ClusterError::Unavailable(e)) if Instant::now() < deadline => {
                    tracing::info!(error = %e, "a registry write got no answer; trying again");
                    unanswered = Some(e);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
                other => other?,
            };
            match stored {
                Stored::All => {
                    let head = self.head().await?;
                    self.wait_applied(head).await?;
                    return Ok(out);
                }
                Stored::Stale(key) => {
                    attempt += 1;
                    contended = key;
                    // Another node wrote first: import it, then try again.
                    let head = self.head().await?;
                    self.wait_applied(head).await?;
                }
            }
        }
        match unanswered {
            Some(e) if contended.is_empty() => Err(ClusterError::Unavailable(e)),
            _ => Err(ClusterError::Contended(contended)),
        }
    }

    async fn store_docs(&self, docs: Vec<(Doc, u64)>) -> Result<Stored, ClusterError> {
        // At an edge: the hub's bucket (never the mirror, whose writes go
        // on to its origin only while it can reach it).
        let (registry, direct) = self.registry_source().await;
        if docs.len() > 1 && self.atomic {
            return self.store_batch(registry, direct, docs).await;
        }
        let n = docs.len();
        for (i, (doc, rev)) in docs.into_iter().enumerate() {
            let result = match (&doc.value, rev) {
                (Some(v), 0) => registry
                    .create(&doc.key, Bytes::from(v.clone()))
                    .await
                    .map(|_| ())
                    .map_err(|e| match e.kind() {
                        kv::CreateErrorKind::AlreadyExists => None,
                        _ => Some(e.to_string()),
                    }),
                (Some(v), rev) => registry
                    .update(&doc.key, Bytes::from(v.clone()), rev)
                    .await
                    .map(|_| ())
                    .map_err(|e| match e.kind() {
                        kv::UpdateErrorKind::WrongLastRevision => None,
                        _ => Some(e.to_string()),
                    }),
                // Never stored: nothing to delete.
                (None, 0) => Ok(()),
                (None, rev) => registry
                    .delete_expect_revision(&doc.key, Some(rev))
                    .await
                    .map_err(|e| {
                        let s = e.to_string();
                        (!s.contains("wrong last sequence")).then_some(s)
                    }),
            };
            match result {
                Ok(()) if i + 1 < n => crash_point(&self.client).await,
                Ok(()) => {}
                Err(None) => return Ok(Stored::Stale(doc.key)),
                Err(Some(e)) => return Err(ClusterError::Unavailable(e)),
            }
        }
        Ok(Stored::All)
    }

    /// Stores several documents as one atomic batch (NATS 2.12): every
    /// compare-and-set holds or none is stored, so a node killed in the
    /// middle of a write leaves all of it or nothing (a deploy writes its
    /// function and the routes).
    async fn store_batch(
        &self,
        registry: &kv::Store,
        direct: bool,
        docs: Vec<(Doc, u64)>,
    ) -> Result<Stored, ClusterError> {
        use async_nats::header;
        let (js, api) = match (&self.edge, direct) {
            (Some(e), true) => (&e.hub, format!("$JS.{HUB_DOMAIN}.API")),
            _ => (&self.js, self.api_prefix.clone()),
        };
        let batch = random_id();
        let n = docs.len();
        for (i, (doc, rev)) in docs.iter().enumerate() {
            let mut expected = *rev;
            if expected == 0 {
                // A key deleted before keeps its delete marker: expect that.
                match registry.entry(&doc.key).await.map_err(unavailable)? {
                    Some(e) if e.operation == kv::Operation::Put => {
                        return Ok(Stored::Stale(doc.key.clone()));
                    }
                    Some(e) => expected = e.revision,
                    None => {}
                }
            }
            let mut subject = String::new();
            if registry.use_jetstream_prefix {
                subject.push_str(&api);
                subject.push('.');
            }
            subject.push_str(registry.put_prefix.as_ref().unwrap_or(&registry.prefix));
            subject.push_str(&doc.key);
            let mut h = async_nats::HeaderMap::new();
            h.insert(header::NATS_BATCH_ID, batch.as_str());
            h.insert(header::NATS_BATCH_SEQUENCE, (i + 1).to_string().as_str());
            h.insert(
                header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                expected.to_string().as_str(),
            );
            let payload = match &doc.value {
                Some(v) => Bytes::from(v.clone()),
                None => {
                    h.insert("KV-Operation", "DEL");
                    Bytes::new()
                }
            };
            if i + 1 < n {
                self.client
                    .publish_with_headers(subject, h, payload)
                    .await
                    .map_err(unavailable)?;
                crash_point(&self.client).await;
                continue;
            }
            h.insert(header::NATS_BATCH_COMMIT, "1");
            let ack = js
                .publish_with_headers(subject, h, payload)
                .await
                .map_err(unavailable)?
                .await;
            return match ack {
                Ok(_) => Ok(Stored::All),
                Err(e) => {
                    let s = e.to_string();
                    if s.contains("wrong last sequence") {
                        Ok(Stored::Stale(doc.key.clone()))
                    } else {
                        Err(ClusterError::Unavailable(s))
                    }
                }
            };
        }
        Ok(Stored::All)
    }

    async fn wait_applied(&self, revision: u64) -> Result<(), ClusterError> {
        let mut rx = self.applied.subscribe();
        match tokio::time::timeout(REQUEST_TIMEOUT, rx.wait_for(|a| *a >= revision)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ClusterError::Unavailable(format!(
                "this node's copy of the registry did not reach revision {revision} within {} s",
                REQUEST_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Puts this node's record every [`HEARTBEAT`]; `record` is asked for
    /// the current one each time.
    async fn heartbeat(self: Arc<Self>, record: impl Fn() -> NodeRecord + Send + 'static) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.beat.notified() => {}
            }
            if self.down_since().is_some() || self.uplink_cut_since().is_some() {
                continue;
            }
            let Ok(nodes) = self.nodes_bucket().await else {
                continue;
            };
            let mut r = record();
            r.heartbeat = now();
            r.position = self.applied();
            let Ok(body) = serde_json::to_vec(&r) else {
                continue;
            };
            if let Err(e) = nodes.put(&r.name, body.into()).await {
                tracing::debug!(error = %e, "could not put this node's heartbeat");
            }
        }
    }

    /// Puts this node's record now, not at the next heartbeat (a version
    /// it runs became ready).
    pub fn beat_now(&self) {
        self.beat.notify_one();
    }

    /// Every node whose record has not expired.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, ClusterError> {
        let mirror = self
            .nodes_mirror
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let nodes = match &mirror {
            Some(m) => m,
            None => {
                self.check_link()?;
                self.nodes_bucket().await?
            }
        };
        let mut keys = nodes.keys().await.map_err(unavailable)?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(unavailable)?;
            if let Some(v) = nodes.get(&key).await.map_err(unavailable)?
                && let Ok(r) = serde_json::from_slice::<NodeRecord>(&v)
            {
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub(crate) fn objects(&self) -> &jetstream::object_store::ObjectStore {
        &self.objects
    }

    /// At an edge, the hub's artifact store (`None` on the core, or while
    /// the edge's link is cut).
    pub(crate) async fn hub_objects(&self) -> Option<&jetstream::object_store::ObjectStore> {
        let e = self.edge.as_ref()?;
        if e.cut_since().is_some() {
            return None;
        }
        e.hub_objects().await.ok()
    }

    /// Waits until the link is up (for tests and for starts that must not
    /// write while the link is down).
    pub async fn wait_connected(&self, within: Duration) -> bool {
        let until = Instant::now() + within;
        while self.down_since().is_some() {
            if Instant::now() > until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }
}

enum Stored {
    All,
    /// This key's revision was not the one the replica knew.
    Stale(String),
}

/// Functions written or changed first, then routes and tokens, then
/// functions removed: a route never names a function its readers lack.
fn order(mut docs: Vec<(Doc, u64)>) -> Vec<(Doc, u64)> {
    docs.sort_by_key(|(d, _)| match (d.is_function(), d.value.is_some()) {
        (true, true) => 0,
        (false, _) => 1,
        (true, false) => 2,
    });
    docs
}

/// For tests: with `VERGE_TEST_CRASH_MID_WRITE` set, the process dies
/// (abort, as kill -9 would) after the first document of a write reached
/// the servers.
async fn crash_point(client: &async_nats::Client) {
    if std::env::var_os("VERGE_TEST_CRASH_MID_WRITE").is_some() {
        let _ = client.flush().await;
        tracing::error!("VERGE_TEST_CRASH_MID_WRITE: dying in the middle of a registry write");
        std::process::abort();
    }
}

/// Makes the registry bucket take atomic batches (servers from 2.12);
/// `false` (with a warning) where it cannot: writes of several documents
/// then go one by one.
async fn allow_atomic(js: &jetstream::Context, registry: &kv::Store) -> bool {
    let mut stream = registry.stream.clone();
    let Ok(info) = stream.info().await else {
        return false;
    };
    if info.config.allow_atomic_publish {
        return true;
    }
    let mut config = info.config.clone();
    config.allow_atomic_publish = true;
    match js.update_stream(&config).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "the registry bucket does not take atomic batches (NATS 2.12 or later does): a write of several documents (a deploy: its function and the routes) is not atomic");
            false
        }
    }
}

/// The latest revision of `registry`, asked of its server.
async fn head_of(registry: &kv::Store) -> Result<u64, ClusterError> {
    let mut stream = registry.stream.clone();
    let info = stream.info().await.map_err(unavailable)?;
    Ok(info.state.last_sequence)
}

/// Resolves when an edge's link is cut or comes back (never on the core).
async fn link_changed(edge: &Option<edge::Edge>) {
    match edge {
        Some(e) => e.link_changed.notified().await,
        None => std::future::pending().await,
    }
}

async fn bucket(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, ClusterError> {
    if let Ok(kv) = js.get_key_value(config.bucket.clone()).await {
        return Ok(kv);
    }
    let name = config.bucket.clone();
    js.create_key_value(config)
        .await
        .map_err(|e| ClusterError::Other(format!("could not create the {name} bucket: {e}")))
}

/// The registry's `format` document: created by the first node, checked by
/// every other; returns the registry's id.
async fn registry_format(registry: &kv::Store) -> Result<String, ClusterError> {
    let mine = FormatDoc {
        format: FORMAT,
        registry: random_id(),
    };
    let body = serde_json::to_vec(&mine).map_err(|e| ClusterError::Other(e.to_string()))?;
    match registry.create("format", body.into()).await {
        Ok(_) => return Ok(mine.registry),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
        Err(e) => return Err(unavailable(e)),
    }
    let stored = registry
        .get("format")
        .await
        .map_err(unavailable)?
        .ok_or_else(|| ClusterError::Other("the registry's format document vanished".into()))?;
    let doc: FormatDoc = serde_json::from_slice(&stored).map_err(|e| {
        ClusterError::Format(format!(
            "the cluster's {REGISTRY_BUCKET} bucket holds a format document this node cannot read ({e}); is it another program's bucket?"
        ))
    })?;
    check_format(&doc)?;
    Ok(doc.registry)
}

/// Refuses a registry of another layout, naming both.
pub(crate) fn check_format(doc: &FormatDoc) -> Result<(), ClusterError> {
    if doc.format != FORMAT {
        return Err(ClusterError::Format(format!(
            "the cluster's registry has format {}, and this node reads format {FORMAT}; run nodes of the same Verge release (upgrade {} first)",
            doc.format,
            if doc.format > FORMAT {
                "this node"
            } else {
                "the cluster"
            }
        )));
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ClusterError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ClusterError::Other(format!("a registry task did not finish: {e}")))?
        .map_err(ClusterError::Store)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::testkit::NatsServer;
    use std::time::Instant;
    use verge_store::{Artifacts, Limits, NewVersion};

    fn opts(url: &str, node: &str) -> ClusterOptions {
        ClusterOptions {
            job_lease: None,
            url: url.into(),
            creds: None,
            domain: None,
            node: node.into(),
            replicas: None,
            site: None,
        }
    }

    async fn node(url: &str, name: &str) -> (Arc<Cluster>, Arc<Store>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let c = Cluster::connect(&opts(url, name)).await.unwrap();
        c.join(&store).await.unwrap();
        (c, store, dir)
    }

    fn deploy(store: &Store, function: &str, size: u64) -> Result<u64, StoreError> {
        let env = [("I".to_string(), size.to_string())];
        store
            .create_version(&NewVersion {
                function,
                sha256: &"ab".repeat(32),
                size,
                env: &env,
                limits: Limits::default(),
                buckets: &[],
                tenant: "default",
                placement: &[],
                grants: &verge_spec::NO_GRANTS,
                routes: &[],
                deployed_by: "admin",
                promote: true,
            })
            .map(|c| c.version)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_writes_on_two_nodes_all_land_and_both_replicas_agree() {
        let nats = NatsServer::start();
        let (a, sa, _da) = node(&nats.url(), "a").await;
        let (b, sb, _db) = node(&nats.url(), "b").await;
        // 20 deploys of one function, half through each node, at once:
        // every one gets its own version number, none is lost.
        let mut tasks = Vec::new();
        for i in 0..20u64 {
            let (c, s) = if i % 2 == 0 {
                (a.clone(), sa.clone())
            } else {
                (b.clone(), sb.clone())
            };
            tasks.push(tokio::spawn(async move {
                c.write(&s, move |st| deploy(st, "f", 100 + i)).await
            }));
        }
        let mut versions = Vec::new();
        for t in tasks {
            versions.push(t.await.unwrap().unwrap());
        }
        versions.sort_unstable();
        assert_eq!(versions, (1..=20).collect::<Vec<_>>());
        let head = a.head().await.unwrap();
        a.wait_applied(head).await.unwrap();
        b.wait_applied(head).await.unwrap();
        let (fa, fb) = (
            sa.function_state("f").unwrap().unwrap(),
            sb.function_state("f").unwrap().unwrap(),
        );
        assert_eq!(fa.versions.len(), 20);
        assert_eq!(fa, fb);
        // A refused write stores nothing and says why, as on one machine.
        let err = b
            .write(&sb, |st| {
                st.set_alias("nope", "live", &verge_spec::AliasTarget::single(1))
            })
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClusterError::Store(StoreError::FunctionNotFound(_))),
            "{err}"
        );
        a.close();
        b.close();
    }

    #[tokio::test]
    async fn a_registry_of_another_format_is_refused_with_both_versions_named() {
        let nats = NatsServer::start();
        let c = Cluster::connect(&opts(&nats.url(), "a")).await.unwrap();
        c.registry
            .put("format", br#"{"format":99,"registry":"x"}"#.to_vec().into())
            .await
            .unwrap();
        let err = match Cluster::connect(&opts(&nats.url(), "b")).await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a registry of format 99 was accepted"),
        };
        assert!(
            err.contains("format 99") && err.contains(&format!("format {FORMAT}")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn bad_urls_servers_without_jetstream_and_refused_credentials_fail_within_5_s() {
        let closed = format!("nats://127.0.0.1:{}", {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        });
        let err = Cluster::connect(&opts(&closed, "a"))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("could not connect to NATS at") && err.contains(&closed),
            "{err}"
        );

        let plain = NatsServer::without_jetstream();
        let err = Cluster::connect(&opts(&plain.url(), "a"))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("has no JetStream"), "{err}");

        let locked = NatsServer::with_password();
        let wrong = format!("nats://verge:wrong@127.0.0.1:{}", locked.port);
        let err = Cluster::connect(&opts(&wrong, "a"))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("could not connect") && err.to_lowercase().contains("author"),
            "{err}"
        );
        let right = format!("nats://verge:secret@127.0.0.1:{}", locked.port);
        Cluster::connect(&opts(&right, "a")).await.unwrap();
    }

    #[tokio::test]
    async fn a_write_of_several_documents_stores_all_of_them_or_none() {
        let nats = NatsServer::start();
        let (c, _store, _dir) = node(&nats.url(), "a").await;
        assert!(c.atomic, "nats-server 2.15 takes atomic batches");
        let doc = |key: &str, v: &str| Doc {
            key: key.into(),
            value: Some(format!("{{\"v\":\"{v}\"}}").into_bytes()),
        };
        let (registry, direct) = c.registry_source().await;
        // One compare-and-set of the batch fails: nothing of it is stored.
        let stored = c
            .store_batch(
                registry,
                direct,
                vec![(doc("fn.x", "1"), 0), (doc("routes", "1"), 999)],
            )
            .await
            .unwrap();
        assert!(matches!(stored, Stored::Stale(_)));
        assert!(
            registry.get("fn.x").await.unwrap().is_none(),
            "half a batch was stored"
        );
        // All hold: all stored; a deleted key is written again.
        let stored = c
            .store_batch(
                registry,
                direct,
                vec![(doc("fn.x", "1"), 0), (doc("fn.y", "1"), 0)],
            )
            .await
            .unwrap();
        assert!(matches!(stored, Stored::All));
        let rev = registry.entry("fn.y").await.unwrap().unwrap().revision;
        registry.delete("fn.x").await.unwrap();
        let stored = c
            .store_batch(
                registry,
                direct,
                vec![
                    (doc("fn.x", "2"), 0),
                    (
                        Doc {
                            key: "fn.y".into(),
                            value: None,
                        },
                        rev,
                    ),
                ],
            )
            .await
            .unwrap();
        assert!(matches!(stored, Stored::All));
        assert_eq!(
            registry.get("fn.x").await.unwrap().unwrap().as_ref(),
            br#"{"v":"2"}"#
        );
        assert!(registry.get("fn.y").await.unwrap().is_none());
        c.close();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_edge_reads_from_its_mirrors_through_a_cut_and_catches_up() {
        use crate::testkit::Proxy;
        let hub = NatsServer::hub();
        let proxy = Proxy::start(hub.leaf_addr());
        let leaf = NatsServer::leaf("edge-ship", proxy.addr);
        let (core, core_store, _dc) = node(&hub.url(), "core").await;
        core.write(&core_store, |st| deploy(st, "f", 1))
            .await
            .unwrap();
        let core_art = NatsArtifacts::new(
            core.clone(),
            verge_store::LocalArtifacts::new(core_store.clone()),
        );
        let bytes = Bytes::from(vec![7u8; 1_500_000]);
        let sha = core_art.put(bytes.clone()).await.unwrap();

        // The wrong domain is refused with what to do.
        let mut o = opts(&leaf.url(), "e1");
        o.site = Some("other".into());
        let err = Cluster::connect(&o).await.err().unwrap().to_string();
        assert!(
            err.contains("\"edge-other\"") && err.contains("\"edge-ship\""),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        let estore = Arc::new(Store::open(dir.path()).unwrap());
        let mut o = opts(&leaf.url(), "e1");
        o.site = Some("ship".into());
        let edge = Cluster::connect(&o).await.unwrap();
        edge.join(&estore).await.unwrap();
        assert_eq!(edge.registry_id(), core.registry_id());
        assert_eq!(
            estore.function_state("f").unwrap().unwrap().versions.len(),
            1
        );
        let edge_art = NatsArtifacts::new(
            edge.clone(),
            verge_store::LocalArtifacts::new(estore.clone()),
        );
        assert_eq!(edge_art.get(&sha).await.unwrap(), bytes.to_vec());
        // Its heartbeat reaches the core.
        edge.start_heartbeat(|| NodeRecord {
            name: "e1".into(),
            role: "edge".into(),
            ..Default::default()
        });
        let until = Instant::now() + Duration::from_secs(10);
        while !core.nodes().await.unwrap().iter().any(|n| n.name == "e1") {
            assert!(
                Instant::now() < until,
                "the edge's heartbeat never reached the core"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        proxy.cut();
        let until = Instant::now() + Duration::from_secs(5);
        while edge.uplink_cut_since().is_none() {
            assert!(Instant::now() < until, "the edge never saw its link cut");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The core goes on; the edge reads what it had, and its writes are
        // refused with the reason.
        core.write(&core_store, |st| deploy(st, "f", 2))
            .await
            .unwrap();
        let err = edge
            .write(&estore, |st| deploy(st, "g", 1))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("link to the core is cut"), "{err}");
        assert_eq!(
            estore.function_state("f").unwrap().unwrap().versions.len(),
            1
        );
        let empty = tempfile::tempdir().unwrap();
        let fresh = NatsArtifacts::new(
            edge.clone(),
            verge_store::LocalArtifacts::new(Arc::new(Store::open(empty.path()).unwrap())),
        );
        assert_eq!(
            fresh.get(&sha).await.unwrap(),
            bytes.to_vec(),
            "the mirror serves artifacts while cut"
        );

        proxy.heal();
        let until = Instant::now() + Duration::from_secs(10);
        while estore.function_state("f").unwrap().unwrap().versions.len() < 2 {
            assert!(
                Instant::now() < until,
                "the edge did not catch up after the heal"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        edge.close();
        core.close();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_artifact_removed_from_the_cluster_is_gone_for_every_node() {
        let nats = NatsServer::start();
        let (c, store, _dir) = node(&nats.url(), "a").await;
        let artifacts = NatsArtifacts::new(c.clone(), verge_store::LocalArtifacts::new(store));
        let bytes = Bytes::from_static(b"\0asm component bytes");
        let sha = artifacts.put(bytes.clone()).await.unwrap();
        // Another node (an empty cache) reads it from the object store.
        let (c2, store2, _dir2) = node(&nats.url(), "b").await;
        let other = NatsArtifacts::new(c2, verge_store::LocalArtifacts::new(store2));
        assert_eq!(other.get(&sha).await.unwrap(), bytes.to_vec());
        artifacts.remove(&sha).await.unwrap();
        // Removing twice (two nodes collecting) is fine.
        artifacts.remove(&sha).await.unwrap();
        let (c3, store3, _dir3) = node(&nats.url(), "c").await;
        let third = NatsArtifacts::new(c3, verge_store::LocalArtifacts::new(store3));
        let err = third.get(&sha).await.unwrap_err().to_string();
        assert!(err.contains("not in the cluster's store"), "{err}");
    }
}
