//! Verge's server: the public HTTP front (routes to invocations), the control
//! API under `/v1/`, authentication and dispatch. The only crate that runs an
//! HTTP server; it wires [`verge_host`] and [`verge_store`] together.

mod api;
mod auth;
mod deploy;
mod error;
mod events;
mod forward;
mod front;
mod kv;
mod otlp;
mod projection;
mod reserve;
mod secrets;
mod server;
mod state;
mod telemetry;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::any;
use tokio::net::TcpListener;
use verge_bus::Bus as _;
use verge_host::{Host, HostConfig};
use verge_store::{Ledger, Store};

pub use api::{API_ROUTES, OPENAPI};
pub use auth::TOKEN_FILE;
pub use error::ApiError;
pub use kv::Peer;
pub use server::ReadTimeouts;
pub use state::Prices;
pub use verge_host::{InstanceMemory, Tiering};
pub use verge_store::Retention;

use state::{AppState, Ceilings, Settings};

pub use verge_cluster::ClusterOptions;

/// Name of the file in the data directory where a running node writes its URL.
pub const NODE_FILE: &str = "node.json";

/// Settings of one node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Largest component upload accepted, in bytes.
    pub max_upload: usize,
    /// Instances that may run at once.
    pub max_instances: u32,
    /// Wall-clock limit of one invocation.
    pub timeout: Duration,
    /// Linear memory limit of one guest, in bytes.
    pub memory_limit: usize,
    /// Prices for `verge usage`.
    pub prices: Prices,
    /// Requests that may wait for a concurrency slot; beyond: 503.
    pub queue_depth: usize,
    /// Longest a request waits for a slot; beyond: 503.
    pub max_wait: Duration,
    /// Meter invocations and keep usage records (off only for benchmarks).
    pub metering: bool,
    /// Largest request body of a function invocation, bytes.
    pub max_request_body: usize,
    /// Largest response body of a function invocation, bytes.
    pub max_response_body: usize,
    /// Bytes of stdout and of stderr kept per invocation.
    pub log_limit: usize,
    /// Versions kept per function, besides those an alias points at or
    /// would roll back to.
    pub keep_versions: usize,
    /// When large components start on baseline code.
    pub tiering: Tiering,
    /// This node's name: its events' source is `/verge/nodes/<name>`.
    pub node_name: String,
    /// First retry delay of a failed job (doubles per attempt).
    pub retry_base: Duration,
    /// Functions an event chain may go through before its events are dead-lettered.
    pub hop_limit: u32,
    /// This node's labels (`site=ship-7`): versions placed by labels run
    /// only on nodes that have them all.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Nodes this node replicates its key-value store with.
    pub peers: Vec<Peer>,
    /// How long a key-value tombstone waits for a silent replica before it
    /// is collected anyway (the replica is expired and re-bootstraps).
    pub kv_grace: Duration,
    /// CPU time after which an invocation continues on lower-priority
    /// threads (`None`: never).
    pub demote_after: Option<Duration>,
    /// How optimized code's instances get their memory.
    pub instance_memory: verge_host::InstanceMemory,
    /// How long clients may take to send a request's head, and how long a
    /// request body may send nothing.
    pub read_timeouts: ReadTimeouts,
    /// Instances one function may hold at once unless its version sets
    /// `--concurrency`: a fair share, so that a flood on one route leaves
    /// the others answering (default: a quarter of what the node can run
    /// at once, see [`NodeConfig::function_share`]).
    pub function_concurrency: Option<u32>,
    /// How long invocation records, finished jobs and dead letters are
    /// kept, by age and by size (the oldest go first; usage is rolled up
    /// per minute before records go).
    pub retain: Retention,
    /// How often the retention pass runs.
    pub prune_every: Duration,
    /// Memory the node's guest instances may hold at once, bytes: each
    /// running invocation holds its version's memory limit of it; beyond,
    /// requests queue, then get 503 (`None`: half the machine's memory).
    pub memory_budget: Option<u64>,
    /// The cluster to join (`None`: the embedded registry on this machine).
    pub cluster: Option<verge_cluster::ClusterOptions>,
    /// The key that seals secrets (`None`: `secret.key` in the data
    /// directory, made at the first start).
    pub secret_key_file: Option<PathBuf>,
    /// Guests' outbound HTTP: names resolved without DNS, limits. The
    /// node's own ports are added at start.
    pub outbound: verge_host::OutboundSettings,
    /// Where traces go (OTLP over HTTP; `None`: nowhere).
    pub otlp_endpoint: Option<String>,
    /// The share of traces that start here that are sampled (exported);
    /// an invocation with a parent follows the parent's sampled flag.
    pub trace_sample: f64,
    /// A listener for `GET /metrics` without a token (`None`: metrics
    /// only at `/v1/metrics` on the main listener, with a token).
    pub metrics_listen: Option<SocketAddr>,
    /// Loaded code of a version not called for this long is dropped (it
    /// loads again from the compile cache on its next request; `None`:
    /// never).
    pub unload_after: Option<Duration>,
    /// Loaded code kept at most, bytes: past it, the least recently used
    /// versions' code is dropped (`None`: no bound).
    pub code_memory: Option<u64>,
}

impl NodeConfig {
    /// Defaults: 127.0.0.1:8080, 64 MiB uploads.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: data_dir.into(),
            max_upload: 64 << 20,
            max_instances: 1000,
            timeout: Duration::from_secs(30),
            memory_limit: 128 << 20,
            prices: Prices::default(),
            queue_depth: 1000,
            max_wait: Duration::from_secs(10),
            metering: true,
            max_request_body: 16 << 20,
            max_response_body: 64 << 20,
            log_limit: 64 << 10,
            keep_versions: 10,
            tiering: Tiering::default(),
            node_name: default_node_name(),
            retry_base: Duration::from_secs(1),
            hop_limit: 16,
            peers: Vec::new(),
            labels: Default::default(),
            kv_grace: Duration::from_secs(7 * 24 * 3600),
            demote_after: Some(Duration::from_millis(20)),
            instance_memory: verge_host::InstanceMemory::default(),
            read_timeouts: ReadTimeouts::default(),
            function_concurrency: None,
            retain: verge_store::Retention::default(),
            prune_every: Duration::from_secs(5),
            memory_budget: None,
            cluster: None,
            secret_key_file: None,
            outbound: verge_host::OutboundSettings::default(),
            otlp_endpoint: None,
            trace_sample: 1.0,
            metrics_listen: None,
            unload_after: Some(Duration::from_secs(600)),
            code_memory: Some(1 << 30),
        }
    }

    /// The memory budget for guests: as set, else half the machine's
    /// memory (4 GiB when it cannot be read), never below one instance's
    /// limit.
    pub fn guest_memory_budget(&self) -> u64 {
        self.memory_budget
            .unwrap_or_else(|| machine_memory().map_or(4 << 30, |m| m / 2))
            .max(self.memory_limit as u64)
    }

    /// The per-function default concurrency: as set, else a quarter of what
    /// the node can run at once: its instances, or as many instances of the
    /// default memory limit as its memory budget holds, whichever is fewer
    /// (at least 1).
    pub fn function_share(&self) -> u32 {
        let by_memory = self.guest_memory_budget() / (self.memory_limit.max(1) as u64);
        let capacity = u64::from(self.max_instances.max(1)).min(by_memory.max(1));
        self.function_concurrency
            .unwrap_or_else(|| u32::try_from(capacity / 4).unwrap_or(u32::MAX))
            .clamp(1, self.max_instances.max(1))
    }
}

/// A node failed to start or to serve.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] verge_store::StoreError),
    #[error(transparent)]
    Host(#[from] verge_host::HostError),
    #[error(transparent)]
    Bus(#[from] verge_bus::BusError),
    #[error("could not listen on {addr}: {source}; pick another address with --listen")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl From<ApiError> for NodeError {
    fn from(e: ApiError) -> Self {
        NodeError::Other(e.to_string())
    }
}

/// What the node did at start.
#[derive(Debug, Clone, Default)]
pub struct StartReport {
    /// Set when this start created the admin token: where it was written.
    pub token_created: Option<PathBuf>,
    /// Deployed functions registered (each loads on its first request).
    pub functions: usize,
    pub load_time: Duration,
    /// On a cluster: replicas of each bucket, and the registry revision
    /// this node's copy had imported when it started.
    pub cluster: Option<(usize, u64)>,
}

/// A started node, bound to its address, not yet serving.
pub struct Node {
    state: Arc<AppState>,
    listener: TcpListener,
    /// `--metrics-listen`: `GET /metrics` without a token.
    metrics_listener: Option<TcpListener>,
    report: StartReport,
    peers: Vec<Peer>,
    /// Keys changed since the last `kv.changed` events went out.
    kv_changes: Arc<events::KvChanges>,
    /// Invocation failures waiting to be published.
    outbox: Arc<events::Outbox>,
    read_timeouts: ReadTimeouts,
    retain: verge_store::Retention,
    prune_every: Duration,
    /// The unloader's policy: idle time, bytes of loaded code.
    unload: (Option<Duration>, Option<u64>),
}

impl Node {
    /// Opens the store, makes sure an admin token exists, loads every deployed
    /// function (from the compile cache when possible) and binds the listener.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        let started = Instant::now();
        let data_dir = config.data_dir.clone();
        let store = Arc::new(Store::open(&data_dir)?);
        reserve::ensure(&data_dir);
        let cluster = match &config.cluster {
            None => None,
            Some(opts) => {
                let c = verge_cluster::Cluster::connect(opts)
                    .await
                    .map_err(|e| NodeError::Other(e.to_string()))?;
                c.join(&store)
                    .await
                    .map_err(|e| NodeError::Other(e.to_string()))?;
                tracing::info!(url = %opts.url, registry = c.registry_id(), revision = c.applied(), replicas = c.replicas(), "joined the cluster");
                Some(c)
            }
        };
        let mut report = StartReport {
            token_created: auth::ensure_admin_token(&store, cluster.as_ref(), &data_dir).await?,
            cluster: cluster.as_ref().map(|c| (c.replicas(), c.applied())),
            ..StartReport::default()
        };
        let ledger = Arc::new(Ledger::open(&data_dir)?);
        let secrets = Arc::new(
            match &config.secret_key_file {
                Some(path) => secrets::Secrets::open(path, false),
                None => secrets::Secrets::open(&data_dir.join("secret.key"), true),
            }
            .map_err(|e| NodeError::Other(e.to_string()))?,
        );
        // Bound before the host is made: a guest may never reach the
        // node's own port, so the host must know it.
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| NodeError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let metrics_listener = match config.metrics_listen {
            None => None,
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| {
                NodeError::Other(format!(
                    "could not listen on {addr} for metrics (--metrics-listen): {source}; pick another address"
                ))
            })?),
        };
        let mut outbound = config.outbound.clone();
        for l in std::iter::once(&listener).chain(&metrics_listener) {
            if let Ok(addr) = l.local_addr() {
                outbound.own_ports.push(addr.port());
            }
        }
        let mut host = Host::new(HostConfig {
            outbound: Arc::new(outbound),
            cache_dir: data_dir.join("cache"),
            max_instances: config.max_instances,
            memory_limit: config.memory_limit,
            output_limit: config.log_limit,
            timeout: config.timeout,
            metering: config.metering,
            tiering: config.tiering,
            demote_after: config.demote_after,
            instance_memory: config.instance_memory,
        })?;
        let kv =
            Arc::new(verge_kv::Kv::open_replica(&data_dir).map_err(|e| {
                NodeError::Other(format!("could not open the key-value store: {e}"))
            })?);
        host.set_kv(kv.clone());
        let kv_changes: Arc<events::KvChanges> = Arc::default();
        let pending = kv_changes.clone();
        kv.set_observer(Box::new(move |keys, hops| {
            let mut pending = pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for key in keys {
                let at = pending.entry(key.clone()).or_insert(0);
                *at = (*at).max(hops);
            }
        }));
        let mut bus = verge_bus::SqliteBus::open(&data_dir)?;
        bus.retry_base = config.retry_base;
        bus.hop_limit = config.hop_limit;
        bus.holder = config.node_name.clone();
        // On a cluster, the cluster's queue holds the jobs (`NatsBus`).
        let requeued = if config.cluster.is_none() {
            bus.recover()?
        } else {
            0
        };
        if requeued > 0 {
            tracing::info!(
                jobs = requeued,
                "jobs left running by the last run are queued again"
            );
        }
        let wake = Arc::new(tokio::sync::Notify::new());
        let bus: Arc<dyn verge_bus::Bus> = match (&cluster, &config.cluster) {
            (Some(c), Some(opts)) => verge_cluster::NatsBus::start(
                c.clone(),
                bus,
                wake.clone(),
                opts.job_lease.unwrap_or(verge_cluster::JOB_LEASE),
            )
            .await
            .map_err(|e| NodeError::Other(e.to_string()))?,
            _ => Arc::new(bus),
        };
        let metrics = Arc::new(telemetry::Metrics::default());
        let spans = match &config.otlp_endpoint {
            None => None,
            Some(endpoint) => {
                let url = otlp::traces_url(endpoint).map_err(NodeError::Other)?;
                tracing::info!(%url, "spans are exported with OTLP");
                Some(Arc::new(otlp::Exporter::start(
                    url,
                    config.node_name.clone(),
                )))
            }
        };
        {
            let (m, s) = (metrics.clone(), spans.clone());
            let _ = ledger.observe(Box::new(move |batch| {
                m.observe(batch);
                if let Some(s) = &s {
                    s.observe(batch);
                }
            }));
        }
        let sink = ledger.clone();
        let outbox = Arc::new(events::Outbox::default());
        let (failures, node) = (outbox.clone(), config.node_name.clone());
        host.set_usage_sink(Arc::new(move |mut record| {
            if record.status == 0 {
                record.status = record.outcome.status();
            }
            let failed = match record.outcome {
                // An attempt of a job that will be retried: only the last
                // attempt's failure is reported (with the job's dead letter),
                // so a job emits one failure event however many attempts it
                // takes; an event per attempt would multiply a loop by the
                // retries at every hop.
                _ if record.will_retry => None,
                o if !o.is_failure() => None,
                verge_spec::Outcome::Timeout => Some(events::types::INVOCATION_TIMED_OUT),
                _ => Some(events::types::INVOCATION_FAILED),
            };
            if let Some(ty) = failed {
                let mut e = events::platform_event(
                    &node,
                    ty,
                    &record.function,
                    serde_json::json!({
                        "function": record.function,
                        "version": record.version,
                        "invocation": record.invocation_id,
                        "outcome": record.outcome,
                        "status": record.status,
                    }),
                );
                e.set_hops(verge_spec::next_hop(record.hops));
                failures.push(e);
            }
            sink.record(record);
        }));
        let (b, w) = (bus.clone(), wake.clone());
        host.set_event_sink(Arc::new(move |function, version, events| {
            // Stored on a blocking thread: the guest's task waits, its
            // runtime thread does not.
            let (b, w, function) = (b.clone(), w.clone(), function.to_string());
            Box::pin(async move {
                let n = events.len();
                let stored = tokio::task::spawn_blocking(move || b.publish(&events))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()));
                let published = stored.map_err(|e| {
                    format!("the events could not be stored: {e}; retry later")
                })?;
                tracing::debug!(%function, version, events = n, deliveries = published.queued.len(), "function emitted events");
                if !published.queued.is_empty() {
                    w.notify_one();
                }
                Ok(())
            })
        }));
        // Calls between functions run through the node's state, which
        // holds the host: the sink finds it once it exists.
        let this: Arc<std::sync::OnceLock<std::sync::Weak<AppState>>> = Arc::default();
        let found = this.clone();
        host.set_call_sink(Arc::new(move |call| {
            let state = found.get().and_then(std::sync::Weak::upgrade);
            Box::pin(async move {
                match state {
                    Some(state) => front::call(state, call).await,
                    None => front::unavailable_call(),
                }
            })
        }));
        let local = verge_store::LocalArtifacts::new(store.clone());
        let artifacts: Arc<dyn verge_store::Artifacts> = match &cluster {
            None => Arc::new(local),
            Some(c) => Arc::new(verge_cluster::NatsArtifacts::new(c.clone(), local)),
        };
        let registry: Arc<dyn verge_store::Registry> =
            Arc::new(verge_store::SqliteRegistry::new(store.clone()));
        let state = Arc::new(AppState::new(
            store,
            host,
            ledger,
            bus,
            kv,
            wake,
            Settings {
                artifacts,
                registry,
                outbox: outbox.clone(),
                cluster,
                data_dir: data_dir.clone(),
                max_upload: config.max_upload,
                secrets,
                metrics,
                spans,
                hop_limit: config.hop_limit,
                trace_sample: config.trace_sample.clamp(0.0, 1.0),
                ceilings: Ceilings {
                    timeout: config.timeout,
                    memory: config.memory_limit,
                },
                prices: config.prices,
                log_limit: config.log_limit,
                keep_versions: config.keep_versions.max(1),
                node_name: config.node_name.clone(),
                kv_grace: config.kv_grace,
                peer_urls: config.peers.iter().map(|p| p.url.clone()).collect(),
                labels: config.labels.clone(),
                body_limits: state::BodyLimits {
                    request: config.max_request_body,
                    response: config.max_response_body,
                },
                admission: state::Admission::new(
                    config.max_instances,
                    config.queue_depth,
                    config.max_wait,
                    config.function_share(),
                    config.guest_memory_budget(),
                ),
                body_timeout: config.read_timeouts.body,
            },
        ));

        let _ = this.set(Arc::downgrade(&state));
        state.reload_all().await?;
        report.functions = state.function_count();
        report.load_time = started.elapsed();

        Ok(Node {
            state,
            listener,
            metrics_listener,
            report,
            peers: config.peers.clone(),
            kv_changes,
            outbox,
            read_timeouts: config.read_timeouts,
            retain: config.retain,
            prune_every: config.prune_every,
            unload: (config.unload_after, config.code_memory),
        })
    }

    /// The node's URL, `http://ADDR` (an address it was given to listen
    /// on all interfaces with names itself by loopback).
    fn url(&self) -> String {
        match self.local_addr() {
            Ok(a) if a.ip().is_unspecified() => format!("http://127.0.0.1:{}", a.port()),
            Ok(a) => format!("http://{a}"),
            Err(_) => String::new(),
        }
    }

    /// The address of the metrics listener, if the node has one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The address the node listens on (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, NodeError> {
        self.listener
            .local_addr()
            .map_err(|e| NodeError::Other(format!("no local address: {e}")))
    }

    /// What the start did.
    pub fn report(&self) -> &StartReport {
        &self.report
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.state.data_dir
    }

    /// Is a function of this name deployed?
    pub fn has_function(&self, name: &str) -> bool {
        self.state.has_function(name)
    }

    /// Deploys a component as the node's API would (used for the bundled example).
    pub async fn deploy(
        &self,
        name: &str,
        bytes: Vec<u8>,
        route: Option<&str>,
    ) -> Result<verge_spec::DeployResponse, ApiError> {
        let mut opts = deploy::DeployOptions::default();
        if let Some(r) = route {
            opts.routes
                .push((None, verge_spec::normalize_route_path(r)?));
        }
        deploy::deploy(&self.state, name, bytes.into(), opts).await
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), NodeError> {
        let addr = self.local_addr()?;
        let node_file = self.state.data_dir.join(NODE_FILE);
        let info =
            serde_json::json!({ "url": format!("http://{addr}"), "pid": std::process::id() });
        if let Err(e) = std::fs::write(&node_file, info.to_string()) {
            tracing::warn!(path = %node_file.display(), error = %e, "could not write the node file; the CLI will need --server");
        }
        let _ = self.state.url.set(self.url());
        let app = router(self.state.clone());
        let mut background = self.spawn_background();
        if let Some(l) = self.metrics_listener {
            let app = Router::new()
                .route("/metrics", axum::routing::get(telemetry::handler))
                .with_state(self.state.clone());
            background.0.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(l, app).await {
                    tracing::error!(error = %e, "the metrics listener stopped");
                }
            }));
        }
        self.state.emit(
            events::types::NODE_STARTED,
            &self.state.node_name,
            serde_json::json!({ "node": self.state.node_name, "url": format!("http://{addr}") }),
        );
        let result = server::serve(self.listener, app, self.read_timeouts, shutdown)
            .await
            .map_err(|e| NodeError::Other(format!("server error: {e}")));
        self.state.emit(
            events::types::NODE_STOPPING,
            &self.state.node_name,
            serde_json::json!({ "node": self.state.node_name }),
        );
        background.stop(&self.state, &self.outbox);
        let _ = std::fs::remove_file(&node_file);
        result
    }

    /// The node's background work: the job dispatcher, the scheduler, the
    /// key-value replicators and collector, the event outboxes.
    fn spawn_background(&self) -> Background {
        let s = &self.state;
        let mut tasks = vec![
            tokio::spawn(projection::follow(s.clone())),
            tokio::spawn(events::dispatcher(s.clone())),
            tokio::spawn(events::scheduler(s.clone())),
            tokio::spawn(kv::collect(s.clone())),
            tokio::spawn(events::kv_changed(s.clone(), self.kv_changes.clone())),
            tokio::spawn(events::outbox(s.clone(), self.outbox.clone())),
            tokio::spawn(retention(s.clone(), self.retain, self.prune_every)),
            tokio::spawn(unloader(s.clone(), self.unload.0, self.unload.1)),
            tokio::spawn(instance_sweeper(s.clone())),
        ];
        if let Some(c) = &s.cluster {
            tasks.push(tokio::spawn(kv::mesh(s.clone())));
            tasks.push(tokio::spawn(events::membership(s.clone())));
            tasks.push(tokio::spawn(projection::prepare(s.clone())));
            if c.site().is_some() {
                tasks.push(tokio::spawn(events::outage_limit(s.clone())));
            }
            c.share_usage(s.store.clone(), &s.node_name);
            c.serve_forwarded(&s.node_name, forward::handler(Arc::downgrade(s)));
            let (state, url) = (Arc::downgrade(s), self.url());
            c.start_heartbeat(move || {
                let mut r = state.upgrade().map(|s| s.node_record()).unwrap_or_default();
                r.url = url.clone();
                r
            });
        }
        tasks.extend(
            self.peers
                .iter()
                .map(|p| tokio::spawn(kv::replicate(s.clone(), p.clone()))),
        );
        Background(tasks)
    }

    /// Runs the node without a socket: its HTTP application, to drive with
    /// `tower::ServiceExt::oneshot`, and its background work, which runs
    /// until the returned value is dropped. For tests and embedding.
    pub fn in_process(self) -> InProcess {
        let background = self.spawn_background();
        InProcess {
            router: router(self.state.clone()),
            state: self.state,
            outbox: self.outbox,
            background: Some(background),
        }
    }
}

/// Background tasks of a node, aborted together.
struct Background(Vec<tokio::task::JoinHandle<()>>);

impl Background {
    /// Stops the tasks, then writes what the outbox and the ledger hold.
    fn stop(self, state: &AppState, outbox: &events::Outbox) {
        for t in self.0 {
            t.abort();
        }
        if let Some(c) = &state.cluster {
            c.close();
        }
        outbox.flush(&*state.bus, &state.wake);
        state.ledger.flush();
    }
}

/// A node serving without a socket ([`Node::in_process`]).
pub struct InProcess {
    router: Router,
    state: Arc<AppState>,
    outbox: Arc<events::Outbox>,
    background: Option<Background>,
}

impl InProcess {
    /// The node's HTTP application (control API and user routes).
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.state.data_dir
    }

    /// Writes the usage records that wait in memory (invocation records
    /// are otherwise committed at least every 100 ms).
    pub fn flush_ledger(&self) {
        self.state.ledger.flush();
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(b) = self.background.take() {
            b.stop(&self.state, &self.outbox);
        }
    }
}

fn router(state: Arc<AppState>) -> Router {
    let api = api::router()
        .route("/v1", any(api::unknown_endpoint))
        .route("/v1/{*rest}", any(api::unknown_endpoint))
        .layer(axum::extract::DefaultBodyLimit::max(error::API_BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            error::problem_bodies,
        ));
    api.fallback(front::serve_user_route).with_state(state)
}

/// Keeps the loaded code bounded: drops that of versions idle for `idle`,
/// then of the least recently used past `budget` bytes. Runs every quarter
/// of `idle` (between 50 ms and 30 s), or every 30 s.
async fn unloader(state: Arc<AppState>, idle: Option<Duration>, budget: Option<u64>) {
    if idle.is_none() && budget.is_none() {
        return;
    }
    let every = idle
        .map_or(Duration::from_secs(30), |d| d / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(30));
    loop {
        tokio::time::sleep(every).await;
        let s = state.clone();
        let n = tokio::task::spawn_blocking(move || s.unload_idle(idle, budget))
            .await
            .unwrap_or(0);
        if n > 0 {
            tracing::debug!(versions = n, "unloaded the code of idle versions");
        }
    }
}

/// Drops the instances versions keep (`--reuse`, `--prewarm`) once idle
/// for `verge_host::REUSE_IDLE`: checked a few times per idle period.
async fn instance_sweeper(state: Arc<AppState>) {
    let every = verge_host::REUSE_IDLE / 4;
    loop {
        tokio::time::sleep(every).await;
        let n = state.host.sweep_instances();
        if n > 0 {
            tracing::debug!(instances = n, "dropped idle kept instances");
        }
    }
}

/// Keeps storage bounded: every `every`, deletes invocation records (rolled
/// up first), finished jobs and dead letters past `policy`'s age or size,
/// on a blocking thread in short batches (requests never wait for it).
async fn retention(state: Arc<AppState>, policy: verge_store::Retention, every: Duration) {
    let mut pruner = match verge_store::Pruner::open(&state.data_dir) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::error!(error = %e, "could not open the store for retention; records will not be pruned");
            return;
        }
    };
    // A pass every `every`, and sooner when records have grown by a
    // sixteenth of the size bound (or 64 MiB) since the last one, so that
    // a burst overshoots the bound by about that much, not by what arrives
    // in `every`.
    let step = (policy.bytes / 16).clamp(1 << 20, 64 << 20);
    loop {
        let since = state.ledger.bytes_written();
        let started = tokio::time::Instant::now();
        while started.elapsed() < every && state.ledger.bytes_written().saturating_sub(since) < step
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (s, mut p) = (state.clone(), pruner.take());
        let done = tokio::task::spawn_blocking(move || {
            if let Some(p) = &mut p {
                match p.prune(&policy, verge_bus::now_ms()) {
                    Ok(r) if r.deleted > 0 => {
                        tracing::debug!(
                            deleted = r.deleted,
                            bytes_in_use = r.bytes_in_use,
                            "invocation records pruned (usage rolled up)"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "could not prune invocation records"),
                }
            }
            reserve::ensure(&s.data_dir);
            match s.bus.prune(policy.age, policy.bytes) {
                Ok(n) if n > 0 => tracing::info!(jobs = n, "finished jobs and dead letters pruned"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not prune finished jobs"),
            }
            p
        })
        .await;
        match done {
            Ok(p) => pruner = p,
            Err(e) => {
                tracing::error!(error = %e, "the retention pass failed; records will not be pruned");
                return;
            }
        }
    }
}

/// The machine's physical memory, bytes (`MemTotal` of /proc/meminfo).
fn machine_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The machine's host name, else `node`.
fn default_node_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        })
        .unwrap_or_else(|| "node".to_string())
}
