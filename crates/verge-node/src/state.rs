//! The node's shared state: store, host, and the in-memory tables the request
//! path reads (functions ready to run, routes).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use verge_host::{Function, Host, LoadedComponent};
use verge_spec::{AliasTarget, Route};
use verge_store::{Ledger, Registry, Store, StoredVersion};

use crate::error::ApiError;

/// One version as the node holds it: its limits, and its code, loaded (from
/// the compile cache) by its first request. Idle versions thus cost a
/// registry entry, not their compiled code.
pub(crate) struct VersionSlot {
    pub stored: StoredVersion,
    pub bodies: BodyLimits,
    /// Invocations of this version that may run at once: its own
    /// `--concurrency`, else its function's fair share of the node (shared
    /// by all its versions).
    concurrency: Option<Arc<Semaphore>>,
    loaded: std::sync::RwLock<Option<Function>>,
    /// Held while the code loads (one load at a time per version).
    loading: tokio::sync::Mutex<()>,
    /// When it was last used, seconds since the node started (written at
    /// most once a second).
    last_used: AtomicU64,
    /// Requests waiting for admission to this version right now.
    pub(crate) waiting: AtomicUsize,
}

impl VersionSlot {
    /// The loaded code's tier, if loaded.
    pub(crate) fn tier(&self) -> Option<&'static str> {
        self.loaded().map(|f| f.tier().as_str())
    }

    /// Its function, if its code is loaded.
    pub(crate) fn loaded(&self) -> Option<Function> {
        self.loaded
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn is_loaded(&self) -> bool {
        self.loaded
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Marks it used at `now` (seconds since the node started).
    fn touch(&self, now: u64) {
        if self.last_used.load(Ordering::Relaxed) != now {
            self.last_used.store(now, Ordering::Relaxed);
        }
    }

    /// Drops its loaded code (invocations running keep theirs); the next
    /// request loads it again, from the compile cache.
    fn unload(&self) -> bool {
        let gone = self
            .loaded
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // Its kept instances hold its code too.
        if let Some(pool) = gone.as_ref().and_then(|f| f.instances()) {
            pool.clear();
        }
        gone.is_some()
    }
}

/// Loaded code of one component (the versions sharing it), as the unloader
/// sees it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LoadedGroup {
    pub sha256: String,
    /// The latest use of any of its versions, seconds since start.
    pub last_used: u64,
    pub bytes: u64,
}

/// Which groups to unload: those idle for `idle_s` or more, then the
/// least recently used until the rest fit in `budget` bytes.
pub(crate) fn to_unload(
    mut groups: Vec<LoadedGroup>,
    now: u64,
    idle_s: Option<u64>,
    budget: Option<u64>,
) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(idle) = idle_s {
        groups.retain(|g| {
            let gone = now.saturating_sub(g.last_used) >= idle;
            if gone {
                out.push(g.sha256.clone());
            }
            !gone
        });
    }
    if let Some(budget) = budget {
        let mut total: u64 = groups.iter().map(|g| g.bytes).sum();
        groups.sort_by_key(|g| g.last_used);
        for g in groups {
            if total <= budget {
                break;
            }
            total -= g.bytes;
            out.push(g.sha256);
        }
    }
    out
}

/// A function's versions and aliases as the request path sees them.
#[derive(Default)]
pub(crate) struct FunctionEntry {
    pub versions: HashMap<u64, Arc<VersionSlot>>,
    pub aliases: HashMap<String, AliasTarget>,
}

/// Which version a request asks for.
pub(crate) enum Selector<'a> {
    Alias(&'a str),
    Version(u64),
}

/// Why no version was found for a request.
pub(crate) enum Unresolved {
    /// No function of that name.
    Function,
    /// The function has no such alias.
    Alias,
    /// The function has no such version.
    Version,
}

/// Node-wide limits: defaults for versions that set none, and ceilings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ceilings {
    pub timeout: std::time::Duration,
    pub memory: usize,
}

/// The price table (defaults priced like Lambda on x86).
#[derive(Debug, Clone, Copy)]
pub struct Prices {
    pub per_million_requests: f64,
    pub per_gb_second: f64,
}

impl Default for Prices {
    fn default() -> Self {
        Self {
            per_million_requests: 0.20,
            per_gb_second: 0.000_016_666_7,
        }
    }
}

/// Admission control: a node-wide instance cap and per-function concurrency,
/// with a bounded queue and a maximum wait in front of them (backpressure
/// before errors).
pub(crate) struct Admission {
    node: Arc<Semaphore>,
    instances: usize,
    queued: AtomicUsize,
    pub queue_depth: usize,
    pub max_wait: Duration,
    /// Instances one function may hold unless its version sets its own
    /// concurrency.
    function_share: usize,
    /// Each function's share, by name (shared by its versions).
    shares: std::sync::Mutex<HashMap<String, Arc<Semaphore>>>,
    /// The node's memory budget for guest instances, in MiB: each running
    /// invocation holds its version's memory limit of it.
    memory: Arc<Semaphore>,
    memory_mib: u32,
}

impl Admission {
    pub(crate) fn new(
        instances: u32,
        queue_depth: usize,
        max_wait: Duration,
        function_share: u32,
        memory_budget: u64,
    ) -> Self {
        let memory_mib = u32::try_from((memory_budget >> 20).max(1)).unwrap_or(u32::MAX);
        Self {
            memory: Arc::new(Semaphore::new(memory_mib as usize)),
            memory_mib,
            node: Arc::new(Semaphore::new(instances.max(1) as usize)),
            instances: instances.max(1) as usize,
            queued: AtomicUsize::new(0),
            queue_depth,
            max_wait,
            function_share: function_share.max(1) as usize,
            shares: Default::default(),
        }
    }

    /// The fair share of function `name`.
    fn share_of(&self, name: &str) -> Arc<Semaphore> {
        self.shares
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.function_share)))
            .clone()
    }

    /// Forgets the share of a removed function.
    pub(crate) fn forget(&self, name: &str) {
        self.shares
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }

    /// Invocations holding a slot right now.
    pub(crate) fn running(&self) -> usize {
        self.instances - self.node.available_permits()
    }

    /// Requests waiting right now.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// MiB of the memory budget an invocation with `limit` bytes of memory
    /// holds (at least 1, at most the whole budget).
    fn memory_share(&self, limit: usize) -> u32 {
        let mib = u32::try_from(limit.div_ceil(1 << 20)).unwrap_or(u32::MAX);
        mib.clamp(1, self.memory_mib)
    }
}

/// Held while an invocation runs (until its response body is done).
pub(crate) struct Permits {
    _function: Option<OwnedSemaphorePermit>,
    _node: OwnedSemaphorePermit,
    _memory: OwnedSemaphorePermit,
}

/// Why a request was not admitted.
pub(crate) enum Refused {
    QueueFull(usize),
    WaitedTooLong(Duration),
}

/// Largest request and response bodies of function invocations, bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimits {
    pub request: usize,
    pub response: usize,
}

/// The node's settings as handlers see them.
pub(crate) struct Settings {
    /// The registry the node's tables follow.
    pub registry: Arc<dyn Registry>,
    /// Where component bytes live.
    pub artifacts: Arc<dyn verge_store::Artifacts>,
    /// Where platform events wait to be committed.
    pub outbox: Arc<crate::events::Outbox>,
    /// The cluster this node's registry is a replica of (`None`: the
    /// embedded registry is its own).
    pub cluster: Option<Arc<verge_cluster::Cluster>>,
    pub data_dir: PathBuf,
    pub max_upload: usize,
    /// The node's key and the sealed secrets.
    pub secrets: Arc<crate::secrets::Secrets>,
    /// Metrics made from the ledger's records, and the span exporter.
    pub metrics: Arc<crate::telemetry::Metrics>,
    pub spans: Option<Arc<crate::otlp::Exporter>>,
    /// Functions a chain of events or calls may go through.
    pub hop_limit: u32,
    /// The share of traces starting here that are sampled.
    pub trace_sample: f64,
    pub ceilings: Ceilings,
    pub prices: Prices,
    pub admission: Admission,
    pub body_limits: BodyLimits,
    pub body_timeout: Duration,
    pub log_limit: usize,
    pub keep_versions: usize,
    pub node_name: String,
    pub kv_grace: std::time::Duration,
    pub peer_urls: Vec<String>,
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Everything a handler needs.
pub struct AppState {
    pub(crate) store: Arc<Store>,
    /// What the tables below are a projection of (`projection`).
    pub(crate) registry: Arc<dyn Registry>,
    /// Component bytes by sha256.
    pub(crate) artifacts: Arc<dyn verge_store::Artifacts>,
    /// The cluster whose registry this node's store replicates.
    pub(crate) cluster: Option<Arc<verge_cluster::Cluster>>,
    /// When the node started, seconds since the epoch.
    pub(crate) started: i64,
    /// The URL the node serves on, once it serves.
    pub(crate) url: std::sync::OnceLock<String>,
    /// The registry revision the tables have applied.
    pub(crate) applied: tokio::sync::watch::Sender<u64>,
    /// Held while changes are applied (one applier at a time).
    pub(crate) applying: tokio::sync::Mutex<()>,
    /// Code a deploy on this node has loaded, by sha256: the projection
    /// hands it to the version's slot, so its first request need not load
    /// it again.
    pub(crate) preloaded: std::sync::Mutex<HashMap<String, Arc<LoadedComponent>>>,
    pub(crate) host: Host,
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) data_dir: PathBuf,
    pub(crate) max_upload: usize,
    pub(crate) secrets: Arc<crate::secrets::Secrets>,
    pub(crate) metrics: Arc<crate::telemetry::Metrics>,
    pub(crate) spans: Option<Arc<crate::otlp::Exporter>>,
    /// When the node started (the unloader's clock).
    pub(crate) epoch: std::time::Instant,
    /// Versions' loaded code dropped by the unloader so far.
    pub(crate) code_unloads: AtomicU64,
    /// Versions for which instance reuse failed (`--reuse`), by function
    /// and version: remembered across loads of their code.
    pub(crate) reuse_failed:
        std::sync::Mutex<HashMap<(String, u64), Arc<std::sync::atomic::AtomicBool>>>,
    /// The share of traces starting here that are sampled.
    pub(crate) trace_sample: f64,
    pub(crate) hop_limit: u32,
    pub(crate) token_hashes: RwLock<Vec<verge_store::TokenHash>>,
    pub(crate) deploy_lock: tokio::sync::Mutex<()>,
    pub(crate) ceilings: Ceilings,
    pub(crate) prices: Prices,
    pub(crate) admission: Admission,
    pub(crate) body_limits: BodyLimits,
    /// Longest a request body may send nothing before it is cut.
    pub(crate) body_timeout: Duration,
    pub(crate) log_limit: usize,
    /// Versions kept per function (besides those aliases need).
    pub(crate) keep_versions: usize,
    pub(crate) bus: Arc<dyn verge_bus::Bus>,
    /// Platform events on their way to the bus (`emit`).
    pub(crate) outbox: Arc<crate::events::Outbox>,
    /// This node's replica of the key-value store.
    pub(crate) kv: Arc<verge_kv::Kv>,
    /// Wakes the dispatcher when jobs are queued or workers free up.
    pub(crate) wake: Arc<tokio::sync::Notify>,
    /// Jobs being delivered at once.
    pub(crate) job_slots: Arc<Semaphore>,
    /// This node's name (the source of its events).
    pub(crate) node_name: String,
    /// Tombstone grace bound of the key-value store.
    pub(crate) kv_grace: std::time::Duration,
    /// The peers this node syncs with (their URLs).
    pub(crate) peer_urls: Vec<String>,
    /// This node's labels (placement).
    pub(crate) labels: std::collections::BTreeMap<String, String>,
    /// Edges whose heartbeat stopped, with their last record (`verge
    /// nodes` shows them cut since it).
    /// The cluster's live nodes as last read (membership, every second):
    /// where a request for a version placed elsewhere goes.
    pub(crate) live_nodes: RwLock<Vec<verge_cluster::NodeRecord>>,
    pub(crate) cut_edges:
        std::sync::Mutex<std::collections::BTreeMap<String, verge_cluster::NodeRecord>>,
    /// Versions new to the tables, to load ahead of their first request
    /// (a cluster node: `projection::prepare`).
    pub(crate) to_prepare: std::sync::Mutex<Vec<Arc<VersionSlot>>>,
    pub(crate) prepare: tokio::sync::Notify,
    pub(crate) functions: RwLock<HashMap<String, FunctionEntry>>,
    routes: RwLock<Arc<Vec<Route>>>,
}

impl AppState {
    pub(crate) fn new(
        store: Arc<Store>,
        host: Host,
        ledger: Arc<Ledger>,
        bus: Arc<dyn verge_bus::Bus>,
        kv: Arc<verge_kv::Kv>,
        wake: Arc<tokio::sync::Notify>,
        settings: Settings,
    ) -> Self {
        Self {
            store,
            registry: settings.registry,
            artifacts: settings.artifacts,
            cluster: settings.cluster,
            url: std::sync::OnceLock::new(),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
            outbox: settings.outbox,
            applied: tokio::sync::watch::Sender::new(0),
            applying: tokio::sync::Mutex::new(()),
            preloaded: Default::default(),
            cut_edges: Default::default(),
            live_nodes: Default::default(),
            host,
            ledger,
            data_dir: settings.data_dir,
            max_upload: settings.max_upload,
            secrets: settings.secrets,
            metrics: settings.metrics,
            spans: settings.spans,
            epoch: std::time::Instant::now(),
            code_unloads: AtomicU64::new(0),
            reuse_failed: std::sync::Mutex::default(),
            trace_sample: settings.trace_sample,
            hop_limit: settings.hop_limit,
            token_hashes: RwLock::default(),
            deploy_lock: tokio::sync::Mutex::new(()),
            ceilings: settings.ceilings,
            prices: settings.prices,
            admission: settings.admission,
            body_limits: settings.body_limits,
            body_timeout: settings.body_timeout,
            log_limit: settings.log_limit,
            keep_versions: settings.keep_versions,
            bus,
            kv,
            wake,
            job_slots: Arc::new(Semaphore::new(crate::events::JOB_WORKERS)),
            node_name: settings.node_name,
            kv_grace: settings.kv_grace,
            peer_urls: settings.peer_urls,
            labels: settings.labels,
            to_prepare: Default::default(),
            prepare: tokio::sync::Notify::new(),
            functions: RwLock::default(),
            routes: RwLock::default(),
        }
    }

    /// Is a function of this name deployed?
    pub(crate) fn has_function(&self, name: &str) -> bool {
        self.functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(name)
    }

    /// The version of `name` a request gets: the one pinned, or the alias's
    /// pick (weighted; by the sticky key when the alias has one and
    /// `sticky_key` finds it in the request).
    pub(crate) fn resolve(
        &self,
        name: &str,
        selector: Selector<'_>,
        sticky_key: impl FnOnce(&AliasTarget) -> Option<u64>,
    ) -> Result<Arc<VersionSlot>, Unresolved> {
        let functions = self
            .functions
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = functions.get(name).ok_or(Unresolved::Function)?;
        let version = match selector {
            Selector::Version(v) => v,
            Selector::Alias(alias) => {
                let target = entry.aliases.get(alias).ok_or(Unresolved::Alias)?;
                pick(target, sticky_key(target))
            }
        };
        entry
            .versions
            .get(&version)
            .cloned()
            .ok_or(Unresolved::Version)
    }

    /// The function of a version, loading its code on first use. Baseline
    /// code gets optimized in the background.
    pub(crate) async fn load(
        self: &Arc<Self>,
        slot: &Arc<VersionSlot>,
    ) -> Result<Function, ApiError> {
        let now = self.uptime_s();
        if let Some(f) = slot.loaded() {
            slot.touch(now);
            return Ok(f);
        }
        let _loading = slot.loading.lock().await;
        if let Some(f) = slot.loaded() {
            slot.touch(now);
            return Ok(f);
        }
        let (state, s) = (self.clone(), slot.clone());
        let function = crate::api::blocking(move || state.load_version(&s.stored)).await?;
        *slot.loaded.write().unwrap_or_else(PoisonError::into_inner) = Some(function.clone());
        slot.touch(self.uptime_s());
        self.optimize_in_background(&function, None);
        Ok(function)
    }

    /// Seconds since the node started (the unloader's clock).
    pub(crate) fn uptime_s(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    /// Versions whose code is loaded now.
    pub(crate) fn loaded_versions(&self) -> usize {
        self.functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .flat_map(|f| f.versions.values())
            .filter(|s| s.is_loaded())
            .count()
    }

    /// Drops the loaded code of versions idle for `idle` and, past
    /// `budget` bytes of loaded code, of the least recently used; returns
    /// how many versions it unloaded. Versions sharing a component go
    /// together (the code is freed only when none holds it).
    pub(crate) fn unload_idle(&self, idle: Option<Duration>, budget: Option<u64>) -> usize {
        let slots: Vec<Arc<VersionSlot>> = self
            .functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .flat_map(|f| f.versions.values().cloned())
            .collect();
        let mut groups: HashMap<String, LoadedGroup> = HashMap::new();
        for slot in &slots {
            let Some(f) = slot.loaded() else { continue };
            let last = slot.last_used.load(Ordering::Relaxed);
            let g = groups
                .entry(slot.stored.sha256.clone())
                .or_insert_with(|| LoadedGroup {
                    sha256: slot.stored.sha256.clone(),
                    last_used: last,
                    bytes: f.component().code_bytes() as u64,
                });
            g.last_used = g.last_used.max(last);
        }
        let gone: std::collections::HashSet<String> = to_unload(
            groups.into_values().collect(),
            self.uptime_s(),
            idle.map(|d| d.as_secs().max(1)),
            budget,
        )
        .into_iter()
        .collect();
        if gone.is_empty() {
            return 0;
        }
        let mut n = 0;
        for slot in &slots {
            if gone.contains(&slot.stored.sha256) && slot.unload() {
                n += 1;
            }
        }
        self.code_unloads.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Replaces baseline code by optimized code on a background thread, when
    /// the function runs on baseline code.
    pub(crate) fn optimize_in_background(
        self: &Arc<Self>,
        function: &Function,
        bytes: Option<bytes::Bytes>,
    ) {
        if !self.host.wants_optimizing(function.component()) {
            return;
        }
        let (state, f) = (self.clone(), function.clone());
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let sha = f.component().sha256().to_string();
            let result = state.host.optimize(f.component(), || match bytes {
                Some(b) => Ok(b.to_vec()),
                None => state.artifact_bytes(&sha),
            });
            match result {
                Ok(true) => {
                    tracing::info!(function = %f.name, version = f.version, ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "optimized code swapped in")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(function = %f.name, version = f.version, error = %e, "could not optimize; the version keeps its baseline code")
                }
            }
        });
    }

    /// A component's bytes, for a compile the cache could not spare (on a
    /// blocking thread: it waits for the artifact store there).
    fn artifact_bytes(&self, sha256: &str) -> std::io::Result<Vec<u8>> {
        tokio::runtime::Handle::current()
            .block_on(self.artifacts.get(sha256))
            .map_err(std::io::Error::other)
    }

    /// Loads a stored version (compiled code from the cache when it is there).
    fn load_version(&self, v: &StoredVersion) -> Result<Function, ApiError> {
        let started = std::time::Instant::now();
        let component = self
            .host
            .load_shared(&v.sha256, || self.artifact_bytes(&v.sha256))
            .map(|(component, source)| {
                self.metrics.code_loaded(source.as_str(), started.elapsed());
                component
            })
            .map_err(|e| {
                ApiError::Internal(format!(
                    "could not load function {:?} version {}: {e}",
                    v.function, v.version
                ))
            })?;
        Ok(self.function_of(v, component))
    }

    pub(crate) fn slot(&self, stored: StoredVersion, loaded: Option<Function>) -> Arc<VersionSlot> {
        let limits = stored.limits;
        Arc::new(VersionSlot {
            bodies: BodyLimits {
                request: limits
                    .request_body
                    .map_or(self.body_limits.request, |b| b as usize),
                response: limits
                    .response_body
                    .map_or(self.body_limits.response, |b| b as usize),
            },
            concurrency: Some(match limits.concurrency {
                Some(n) => Arc::new(Semaphore::new(n.max(1) as usize)),
                None => self.admission.share_of(&stored.function),
            }),
            loaded: std::sync::RwLock::new(loaded),
            loading: tokio::sync::Mutex::new(()),
            last_used: AtomicU64::new(self.uptime_s()),
            waiting: AtomicUsize::new(0),
            stored,
        })
    }

    /// The tier of each loaded version of `name`.
    pub(crate) fn tiers(&self, name: &str) -> HashMap<u64, &'static str> {
        self.functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .map(|f| {
                f.versions
                    .iter()
                    .filter_map(|(v, s)| Some((*v, s.tier()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits for a slot of the version and of the node: at once if free, else in
    /// the bounded queue for at most the maximum wait.
    pub(crate) async fn admit(&self, version: &VersionSlot) -> Result<Permits, Refused> {
        let slot = version.concurrency.clone();
        let node = self.admission.node.clone();
        let memory = self.admission.memory.clone();
        let mib = self.admission.memory_share(
            version
                .stored
                .limits
                .memory_bytes
                .map_or(self.ceilings.memory, |m| {
                    usize::try_from(m).unwrap_or(usize::MAX)
                }),
        );
        let fast = match &slot {
            Some(s) => s.clone().try_acquire_owned().ok().map(Some),
            None => Some(None),
        };
        if let Some(function) = fast
            && let Ok(node_permit) = node.clone().try_acquire_owned()
            && let Ok(memory_permit) = memory.clone().try_acquire_many_owned(mib)
        {
            return Ok(Permits {
                _function: function,
                _node: node_permit,
                _memory: memory_permit,
            });
        }
        let a = &self.admission;
        if a.queued.fetch_add(1, Ordering::AcqRel) >= a.queue_depth {
            a.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::QueueFull(a.queue_depth));
        }
        version.waiting.fetch_add(1, Ordering::Relaxed);
        let wait = async {
            let function = match slot {
                Some(s) => Some(s.acquire_owned().await.ok()?),
                None => None,
            };
            let node = node.acquire_owned().await.ok()?;
            let memory = memory.acquire_many_owned(mib).await.ok()?;
            Some(Permits {
                _function: function,
                _node: node,
                _memory: memory,
            })
        };
        let result = tokio::time::timeout(a.max_wait, wait).await;
        a.queued.fetch_sub(1, Ordering::AcqRel);
        version.waiting.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(Some(p)) => Ok(p),
            _ => Err(Refused::WaitedTooLong(a.max_wait)),
        }
    }

    /// Requests waiting for admission, by function and version (those
    /// with any).
    pub(crate) fn waiting(&self) -> Vec<(String, u64, usize)> {
        let functions = self
            .functions
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        for (name, entry) in functions.iter() {
            for (v, slot) in &entry.versions {
                let n = slot.waiting.load(Ordering::Relaxed);
                if n > 0 {
                    out.push((name.clone(), *v, n));
                }
            }
        }
        out
    }

    pub(crate) fn function_count(&self) -> usize {
        self.functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// This node's record for the cluster's `verge_nodes` bucket: how many
    /// versions it holds and how many have code loaded (ready to serve).
    pub(crate) fn node_record(&self) -> verge_cluster::NodeRecord {
        let functions = self
            .functions
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let slots = functions.values().flat_map(|f| f.versions.values());
        let (mut versions, mut ready) = (0, 0);
        let mut loaded = Vec::new();
        for slot in slots {
            versions += 1;
            if slot.is_loaded() {
                ready += 1;
                loaded.push(format!("{}@{}", slot.stored.function, slot.stored.version));
            }
        }
        verge_cluster::NodeRecord {
            name: self.node_name.clone(),
            role: match self.cluster.as_ref().and_then(|c| c.site()) {
                Some(_) => "edge".into(),
                None => "core".into(),
            },
            version: env!("CARGO_PKG_VERSION").into(),
            started: self.started,
            versions,
            ready,
            labels: self.labels.clone(),
            loaded,
            ..Default::default()
        }
    }

    /// The names of the functions the node holds.
    pub(crate) fn function_names(&self) -> Vec<String> {
        self.functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// Replaces the route table.
    pub(crate) fn set_routes(&self, mut routes: Vec<Route>) {
        // Most specific first: host-bound before any-host, then longer paths.
        routes.sort_by(|a, b| {
            b.host
                .is_some()
                .cmp(&a.host.is_some())
                .then(b.path.len().cmp(&a.path.len()))
        });
        *self.routes.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(routes);
    }

    /// The function bound to exactly this route, if any.
    pub(crate) fn route_owner(&self, host: Option<&str>, path: &str) -> Option<String> {
        self.routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|r| r.host.as_deref() == host && r.path == path)
            .map(|r| r.function.clone())
    }

    /// The route serving `host` + `path`, if any.
    pub(crate) fn match_route(&self, host: Option<&str>, path: &str) -> Option<Route> {
        let routes = self
            .routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        routes
            .iter()
            .find(|r| {
                let host_ok = match (&r.host, host) {
                    (None, _) => true,
                    (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                    (Some(_), None) => false,
                };
                host_ok && verge_spec::path_matches(&r.path, path)
            })
            .cloned()
    }
}

impl AppState {
    /// The function of a stored version on loaded code, with its grants.
    pub(crate) fn function_of(
        &self,
        v: &StoredVersion,
        component: Arc<LoadedComponent>,
    ) -> Function {
        let mut env = v.env.clone();
        if !env.iter().any(|(k, _)| k == "VERGE_EVENTS_URL") {
            env.push(("VERGE_EVENTS_URL".into(), verge_host::EVENTS_URL.into()));
        }
        let policy = verge_host::OutboundPolicy::new(&v.grants).unwrap_or_else(|e| {
            // Checked at deploy: only a registry written by something else
            // gets here. Nothing is granted then.
            tracing::error!(function = %v.function, version = v.version, error = %e, "the version's grants do not parse; it may reach nothing");
            verge_host::OutboundPolicy::default()
        });
        let mut f = Function::new(component, v.function.clone(), v.version, env)
            .with_limits(
                v.limits.timeout_ms.map(Duration::from_millis),
                v.limits.memory_bytes.map(|m| m as usize),
                v.limits.log_bytes.map(|m| m as usize),
            )
            .with_buckets(v.buckets.clone(), &v.tenant)
            .with_policy(policy);
        if let Some(source) = crate::secrets::config_source(v, &self.secrets) {
            f = f.with_config(source);
        }
        let policy = verge_host::InstancePolicy {
            reuse: v.limits.reuse.unwrap_or(1),
            prewarm: v.limits.prewarm.unwrap_or(0),
        };
        if let Some(pool) = self
            .host
            .instances(policy, self.reuse_flag(&v.function, v.version))
        {
            f = f.with_instances(pool);
        }
        f
    }

    /// Where a version remembers that its instance reuse failed.
    fn reuse_flag(&self, function: &str, version: u64) -> Arc<std::sync::atomic::AtomicBool> {
        self.reuse_failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((function.to_string(), version))
            .or_default()
            .clone()
    }

    /// Did instance reuse fail for this version on this node?
    pub(crate) fn reuse_fell_back(&self, function: &str, version: u64) -> bool {
        self.reuse_failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(function.to_string(), version))
            .is_some_and(|f| f.load(Ordering::Relaxed))
    }
}

/// The version an alias sends a request to: the canary's with its weight in
/// percent, by a roll in 0..100 (the sticky key's, or a random one).
pub(crate) fn pick(target: &AliasTarget, sticky: Option<u64>) -> u64 {
    let Some(canary) = &target.canary else {
        return target.version;
    };
    let roll = match sticky {
        Some(h) => h % 100,
        None => rand::random_range(0..100u64),
    };
    if roll < u64::from(canary.weight) {
        canary.version
    } else {
        target.version
    }
}

/// A stable hash of a sticky key (FNV-1a, then a mixer so that similar keys
/// spread): the same key gets the same version, across restarts too.
pub(crate) fn sticky_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // splitmix64 finalizer
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_spec::Canary;

    #[test]
    fn weighted_and_sticky_picks() {
        let target = AliasTarget {
            canary: Some(Canary {
                version: 2,
                weight: 10,
            }),
            ..AliasTarget::single(1)
        };
        let canary = (0..100_000).filter(|_| pick(&target, None) == 2).count();
        assert!((9_000..11_000).contains(&canary), "{canary}");
        let sticky = (0..10_000u32)
            .filter(|i| pick(&target, Some(sticky_hash(format!("user-{i}").as_bytes()))) == 2)
            .count();
        assert!((800..1_200).contains(&sticky), "{sticky}");
        let h = sticky_hash(b"user-42");
        assert!((0..100).all(|_| pick(&target, Some(h)) == pick(&target, Some(h))));
        assert_eq!(pick(&AliasTarget::single(5), None), 5);
    }
}
