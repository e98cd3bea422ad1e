//! Verge's WebAssembly host: the only crate that knows wasmtime.
//!
//! [`Host`] owns one wasmtime [`Engine`] (component model, pooling allocator with
//! copy-on-write memory images, epoch interruption) and a [`Linker`] with WASI 0.2
//! and `wasi:http`. A deploy goes through [`Host::load`]: the bytes are checked
//! without running guest code, compiled (or the compiled code is loaded from the
//! on-disk cache, keyed by the component's sha256 and the engine's
//! configuration), and pre-instantiated once. [`Host::invoke`] then runs every
//! request in a fresh instance with its own bounded stdout/stderr capture.
//!
//! Guests get no ambient authority: no preopened directories, no host
//! environment, no sockets and no outbound HTTP; only the values configured for
//! their version.

mod capture;
mod guest;
mod incremental;
mod keyvalue;
mod lanes;
mod meter;
mod outbound;
mod reuse;
mod shared;
mod snapshot;

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use wasmtime::component::{Component, Linker, types::ComponentItem};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, Module, PoolingAllocationConfig, Strategy,
};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

pub use capture::Capture;
pub use reuse::{IDLE as REUSE_IDLE, InstancePolicy, Instances, MAX_PREWARM, MAX_REUSE};

/// Host name of the events URL guests get (`VERGE_EVENTS_URL`): requests to
/// it never leave the process.
pub const EVENTS_HOST: &str = "events.verge.internal";

/// The events URL guests get in their environment as `VERGE_EVENTS_URL`.
pub const EVENTS_URL: &str = "http://events.verge.internal/";

/// Receives the events a guest POSTs to its events URL: (function, version,
/// events with source and hops already set). An error is shown to the guest.
/// The sink answers with a future: storing may wait for a disk or a
/// network, and the guest's task waits for it, not its thread.
pub type EventSink = Arc<
    dyn Fn(
            &str,
            u64,
            Vec<verge_spec::CloudEvent>,
        ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;
use guest::GuestState;
pub use meter::UsageSink;
pub use outbound::{GrantError, OutboundPolicy, OutboundSettings, check_ca};

/// Host names under this suffix are functions: a guest's request to
/// `http://NAME.fn.verge.internal/...` calls function NAME in process.
pub const CALL_HOST_SUFFIX: &str = ".fn.verge.internal";

/// A guest's call of another function (`http://NAME.fn.verge.internal/`),
/// allowed by its version's `--allow-call`.
pub struct CallRequest {
    /// The function called.
    pub function: String,
    /// The function calling, and its invocation (the callee's parent).
    pub caller: String,
    pub parent_id: String,
    /// Hops of the caller's chain (the callee runs at the next one).
    pub hops: u32,
    /// The caller's span: the callee's parent (none: it has no trace).
    pub trace: Option<verge_spec::SpanContext>,
    pub request: http::Request<UnsyncBoxBody<Bytes, BodyError>>,
}

/// Runs calls between functions: the node routes them like requests on a
/// route (the callee's live alias, admission, limits, its own record) and
/// answers as it would answer a client, errors included.
pub type CallSink = Arc<
    dyn Fn(
            CallRequest,
        ) -> std::pin::Pin<Box<dyn Future<Output = http::Response<ResponseBody>> + Send>>
        + Send
        + Sync,
>;

/// The current `--config` values and granted secrets of a version (read at
/// each invocation's start, so that a rotated secret takes effect on the
/// next request).
pub type ConfigSource = Arc<dyn Fn() -> Arc<Vec<(String, String)>> + Send + Sync>;

/// Settings of the host, fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Where compiled code is cached (`<sha256>-<engine>.cwasm`).
    pub cache_dir: PathBuf,
    /// Instances that may run at once on this node (pooling allocator slots).
    pub max_instances: u32,
    /// Linear memory a guest may grow to, in bytes.
    pub memory_limit: usize,
    /// Bytes of stdout and of stderr kept per invocation.
    pub output_limit: usize,
    /// Wall-clock limit of one invocation.
    pub timeout: Duration,
    /// Meter invocations (CPU time per poll) and emit usage records. Off only
    /// to measure what metering costs.
    pub metering: bool,
    /// When to compile with the baseline compiler first.
    pub tiering: Tiering,
    /// CPU time after which an invocation moves to the slow lane, a runtime
    /// of lower-priority threads, so that it cannot starve short requests
    /// (`None`: never).
    pub demote_after: Option<Duration>,
    /// Outbound HTTP of guests: name overrides, the node's own ports,
    /// response and concurrency limits.
    pub outbound: Arc<OutboundSettings>,
    /// How optimized code's instances get their memory.
    pub instance_memory: InstanceMemory,
}

/// How an instance's linear memory is made (optimized code; baseline code
/// always maps copy-on-write images).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InstanceMemory {
    /// Data copied into pool slots whose pages stay resident between
    /// requests (up to an eighth of the memory limit per slot used): no
    /// page faults while a guest runs. Faster, most of all for the large
    /// snapshots of JavaScript and Python, on more than one core.
    #[default]
    Resident,
    /// Copy-on-write images shared by all instances of a component, and
    /// decommitted after each request: less resident memory.
    Shared,
}

/// Which compiler makes a component's machine code.
///
/// Cranelift (optimizing) takes seconds for the 13-18 MB components of the
/// JavaScript and Python toolchains; Winch (baseline) compiles several times
/// faster into slower code. With tiering a large component serves on baseline
/// code first while optimized code compiles in the background
/// ([`Host::optimize`]); the swap is invisible to callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tiering {
    /// Optimized code only.
    Off,
    /// Components of at least `min_size` bytes start on baseline code.
    Auto { min_size: usize },
    /// Baseline code only, never optimized (to measure the baseline).
    BaselineOnly,
}

impl Default for Tiering {
    fn default() -> Self {
        Tiering::Auto { min_size: 1 << 20 }
    }
}

/// The kind of machine code a component runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Compiled fast, runs slower (Winch).
    Baseline,
    /// Compiled by the optimizing compiler (Cranelift).
    Optimized,
}

impl Tier {
    /// `baseline` or `optimized`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Baseline => "baseline",
            Tier::Optimized => "optimized",
        }
    }
}

impl HostConfig {
    /// Defaults for a node whose cache lives in `cache_dir`.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            max_instances: 1000,
            memory_limit: 128 << 20,
            output_limit: 64 << 10,
            timeout: Duration::from_secs(30),
            metering: true,
            tiering: Tiering::default(),
            demote_after: Some(Duration::from_millis(20)),
            outbound: Arc::default(),
            instance_memory: InstanceMemory::default(),
        }
    }
}

/// The host could not start.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("could not configure the WebAssembly engine: {0}")]
    Engine(String),
    #[error("could not create the compile cache directory {path}: {source}")]
    CacheDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a component was refused (checked without running any guest code).
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("the upload is empty; send the component's bytes as the request body")]
    Empty,
    #[error(
        "the upload is not a WebAssembly binary (it does not start with the \\0asm magic); send a .wasm component"
    )]
    NotWasm,
    #[error(
        "this is a core WebAssembly module, not a component; wrap it with `wasm-tools component new module.wasm -o component.wasm` (with a WASI adapter if it imports wasi_snapshot_preview1)"
    )]
    CoreModule,
    #[error("the component is not valid WebAssembly: {0}")]
    Invalid(String),
    #[error(
        "the component does not export `wasi:http/incoming-handler@0.2.x` (its exports: {found}); build it for the `wasi:http/proxy` world"
    )]
    MissingExport { found: String },
    #[error(
        "the component imports {}, which Verge does not provide; Verge provides WASI 0.2 (cli, clocks, io, random, filesystem, sockets), wasi:http, wasi:keyvalue@0.2.0-draft and wasi:config@0.2.0-rc.1",
        .0.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
    )]
    UnsupportedImport(Vec<String>),
    #[error("the component cannot be linked against Verge's imports: {0}")]
    Link(String),
    #[error("invalid artifact id {0:?}")]
    BadKey(String),
    #[error("could not read the component's bytes: {0}")]
    Read(std::io::Error),
}

impl DeployError {
    /// Is the cause the uploaded component (as opposed to this node)?
    pub fn is_user_error(&self) -> bool {
        !matches!(self, DeployError::Read(_) | DeployError::BadKey(_))
    }
}

/// Why an invocation produced no response from the guest.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("the node is at its instance limit; retry shortly")]
    Capacity(String),
    #[error("the function could not be instantiated: {0}")]
    Instantiate(String),
    #[error("the function trapped: {message}")]
    Trap { message: String, stderr: String },
    #[error("the function ran past its time limit of {0:?}")]
    Timeout(Duration),
    #[error("the function exceeded its memory limit of {} MiB", limit >> 20)]
    MemoryLimit { limit: usize, stderr: String },
    #[error("the function returned without sending a response")]
    NoResponse { stderr: String },
    #[error("the function answered with an error: {0}")]
    Guest(String),
    #[error("internal host error: {0}")]
    Internal(String),
}

/// An error while streaming a guest's response body.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(pub String);

/// The body of a guest's response, streamed as the guest writes it.
pub type ResponseBody = UnsyncBoxBody<Bytes, BodyError>;

/// Where a loaded component's machine code came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeSource {
    /// Compiled by this process (and written to the cache).
    Compiled,
    /// Deserialized from the on-disk cache, or already loaded for another
    /// version with the same bytes.
    Cached,
}

impl CodeSource {
    /// `compiled` or `cached`.
    pub fn as_str(self) -> &'static str {
        match self {
            CodeSource::Compiled => "compiled",
            CodeSource::Cached => "cached",
        }
    }
}

/// Machine code of a component, pre-instantiated, with its engine.
pub(crate) struct Code {
    pub(crate) pre: ProxyPre<GuestState>,
    pub(crate) engine: Engine,
    tier: Tier,
}

/// A validated, compiled and pre-instantiated component.
pub struct LoadedComponent {
    /// Swapped once when optimized code replaces baseline code.
    code: RwLock<Arc<Code>>,
    /// Set while optimized code is being made for it.
    optimizing: AtomicBool,
    /// Set by the first invocation: the ones before it are cold.
    used: AtomicBool,
    /// Whether its invocations tend to use up the fast lane's CPU budget.
    pub(crate) reputation: Arc<lanes::Reputation>,
    sha256: String,
    /// Where its code came from and how long loading took.
    pub source: CodeSource,
    pub load_time: Duration,
}

impl LoadedComponent {
    fn new(code: Code, sha256: &str, source: CodeSource, load_time: Duration) -> Self {
        Self {
            code: RwLock::new(Arc::new(code)),
            optimizing: AtomicBool::new(false),
            used: AtomicBool::new(false),
            reputation: Arc::default(),
            sha256: sha256.to_string(),
            source,
            load_time,
        }
    }

    /// The sha256 of the component's bytes.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The code requests start on now.
    /// Bytes of the component's compiled code in memory (its image; shared
    /// libraries it links are counted apart, once per engine).
    pub fn code_bytes(&self) -> usize {
        let range = self.code().pre.instance_pre().component().image_range();
        (range.end as usize).saturating_sub(range.start as usize)
    }

    pub(crate) fn code(&self) -> Arc<Code> {
        self.code
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The kind of code it runs on now.
    pub fn tier(&self) -> Tier {
        self.code().tier
    }
}

/// A component bound to its configuration: what one function version runs.
#[derive(Clone)]
pub struct Function {
    component: Arc<LoadedComponent>,
    /// Function name, for logs.
    pub name: String,
    /// Version number, for logs.
    pub version: u64,
    env: Arc<Vec<(String, String)>>,
    /// Time limit of this version; the host's when `None`.
    pub timeout: Option<Duration>,
    /// Memory limit of this version, bytes; the host's when `None`.
    pub memory_limit: Option<usize>,
    /// Bytes of stdout and of stderr kept per invocation; the host's when `None`.
    pub log_limit: Option<usize>,
    /// Key-value buckets it may open.
    pub kv_buckets: Arc<Vec<String>>,
    /// The tenant those buckets belong to.
    pub kv_tenant: Arc<str>,
    /// The bucket a guest gets for the identifier `""` (what `wasmtime
    /// serve -Skeyvalue` offers): the function's own, named after it.
    kv_default: Arc<str>,
    /// What its outbound requests may reach, and the functions it may call.
    pub(crate) policy: Arc<OutboundPolicy>,
    /// Its configuration values and secrets, when it has any.
    config: Option<ConfigSource>,
    /// Its kept instances, when it reuses or prewarms them (`reuse`).
    instances: Option<Arc<Instances>>,
}

impl Function {
    /// Binds a loaded component to a function version and its environment.
    pub fn new(
        component: Arc<LoadedComponent>,
        name: impl Into<String>,
        version: u64,
        env: Vec<(String, String)>,
    ) -> Self {
        let name = name.into();
        Self {
            component,
            kv_default: Arc::from(name.as_str()),
            name,
            version,
            env: Arc::new(env),
            timeout: None,
            memory_limit: None,
            log_limit: None,
            kv_buckets: Arc::new(Vec::new()),
            kv_tenant: Arc::from(verge_kv::DEFAULT_TENANT),
            policy: Arc::default(),
            config: None,
            instances: None,
        }
    }

    /// Serves its requests on kept instances (`--reuse`, `--prewarm`): the
    /// pool from [`Host::instances`].
    pub fn with_instances(mut self, instances: Arc<Instances>) -> Self {
        self.instances = Some(instances);
        self
    }

    /// Its kept instances, if it keeps any.
    pub fn instances(&self) -> Option<&Arc<Instances>> {
        self.instances.as_ref()
    }

    /// Grants outbound hosts and calls (`OutboundPolicy::new` parses them).
    pub fn with_policy(mut self, policy: OutboundPolicy) -> Self {
        self.policy = Arc::new(policy);
        self
    }

    /// Gives the guest `wasi:config` values, read from `source` at each
    /// invocation's start.
    pub fn with_config(mut self, source: ConfigSource) -> Self {
        self.config = Some(source);
        self
    }

    /// The configuration values for an invocation starting now.
    pub(crate) fn config_now(&self) -> Option<Arc<Vec<(String, String)>>> {
        self.config.as_ref().map(|c| c())
    }

    /// Grants key-value buckets of a tenant.
    pub fn with_buckets(mut self, buckets: Vec<String>, tenant: &str) -> Self {
        self.kv_buckets = Arc::new(buckets);
        self.kv_tenant = Arc::from(tenant);
        self
    }

    /// The function's own key-value bucket (the guest's `open("")`).
    pub(crate) fn kv_default(&self) -> Arc<str> {
        self.kv_default.clone()
    }

    /// The loaded component it runs.
    pub fn component(&self) -> &Arc<LoadedComponent> {
        &self.component
    }

    /// The kind of code it runs on now.
    pub fn tier(&self) -> Tier {
        self.component.tier()
    }

    /// Sets this version's limits (`None`: the host's).
    pub fn with_limits(
        mut self,
        timeout: Option<Duration>,
        memory_limit: Option<usize>,
        log_limit: Option<usize>,
    ) -> Self {
        self.timeout = timeout;
        self.memory_limit = memory_limit;
        self.log_limit = log_limit;
        self
    }
}

/// Counters of the host since it started.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostStats {
    /// Components compiled (by either compiler).
    pub compiled: u64,
    /// Components whose code came from the on-disk cache.
    pub cache_hits: u64,
    /// Components that started on baseline code.
    pub baseline: u64,
    /// Baseline components whose optimized code replaced it.
    pub optimized: u64,
    /// Invocations moved to the slow lane.
    pub demoted: u64,
    /// Shared libraries compiled (see [`shared`]).
    pub libraries_compiled: u64,
    /// Shared libraries a compile found already compiled (in memory or cached).
    pub libraries_reused: u64,
    /// Functions optimized code took from Cranelift's incremental cache.
    pub functions_reused: u64,
    /// Requests served by an instance that served one before (`--reuse`).
    pub instances_reused: u64,
    /// Requests served by an instance made ahead (`--prewarm`).
    pub instances_prewarmed: u64,
}

/// One compiler's engine and the linker built for it.
struct Compiler {
    engine: Engine,
    linker: Linker<GuestState>,
    /// Part of cache file names: compiled code only loads into an equal engine.
    key: String,
    tier: Tier,
    /// Shared libraries compiled (or loaded) by this engine, by sha256.
    libraries: Mutex<HashMap<String, Module>>,
}

impl Compiler {
    fn new(config: &Config, tier: Tier) -> Result<Self, HostError> {
        let engine = Engine::new(config).map_err(|e| HostError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::<GuestState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| HostError::Engine(format!("{e:#}")))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(|e| HostError::Engine(format!("{e:#}")))?;
        keyvalue::add_to_linker(&mut linker, GuestState::kv_view)
            .map_err(|e| HostError::Engine(format!("{e:#}")))?;
        wasmtime_wasi_config::add_to_linker(&mut linker, GuestState::config_view)
            .map_err(|e| HostError::Engine(format!("{e:#}")))?;
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let key = format!("{:016x}", hasher.finish());
        Ok(Self {
            engine,
            linker,
            key,
            tier,
            libraries: Mutex::new(HashMap::new()),
        })
    }
}

/// The WebAssembly host (see the crate docs).
pub struct Host {
    optimizing: Compiler,
    /// Winch, unless tiering is off.
    baseline: Option<Compiler>,
    config: HostConfig,
    compiled: AtomicU64,
    cache_hits: AtomicU64,
    baseline_loads: AtomicU64,
    optimized: AtomicU64,
    usage_sink: Option<UsageSink>,
    event_sink: Option<EventSink>,
    call_sink: Option<CallSink>,
    kv: Option<Arc<verge_kv::Kv>>,
    /// Where invocations past `demote_after` of CPU time continue.
    slow_lane: Option<lanes::SlowLane>,
    demoted: Arc<AtomicU64>,
    /// Guests keeping the CPU on the fast lane (the node's runtime).
    crowd: Arc<lanes::Crowd>,
    libraries_compiled: AtomicU64,
    libraries_reused: AtomicU64,
    /// Cranelift's incremental cache (compiled functions by IR hash).
    functions: Option<Arc<incremental::FunctionCache>>,
    /// Held while a deploy gets its shared libraries, and by a sweep.
    library_lock: Mutex<()>,
    /// Where background optimization compiles: threads of their own at the
    /// lowest priority, so that a deploy's compile (on rayon's global pool,
    /// at normal priority) and requests always come first.
    background: rayon::ThreadPool,
    /// Components loaded now, by sha256: versions with the same bytes (the
    /// same component deployed under several names, or again) share one
    /// loaded component, its code and its `InstancePre`.
    live: Mutex<LiveComponents>,
    /// Pools of kept instances (`--reuse`, `--prewarm`).
    instances: reuse::Registry,
}

/// Weak references to the loaded components, pruned as they die.
#[derive(Default)]
struct LiveComponents {
    by_sha: HashMap<String, std::sync::Weak<LoadedComponent>>,
    /// Size at which dead entries are pruned next.
    prune_at: usize,
}

/// The pool background optimization compiles on: as many threads as cores,
/// each at the lowest scheduling priority (nice 19). A deploy's compile runs
/// on rayon's global pool at normal priority, so it never queues behind the
/// thousands of function compiles of a runtime's optimized code, and the
/// kernel gives the CPU to it and to requests first.
fn background_pool() -> Result<rayon::ThreadPool, HostError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .thread_name(|i| format!("verge-optimize-{i}"))
        .start_handler(|_| {
            // Per thread on Linux: the thread's own id names it.
            let tid = rustix::thread::gettid();
            if let Err(e) = rustix::process::setpriority_process(Some(tid), 19) {
                tracing::warn!(error = %e, "could not lower the priority of a background compile thread");
            }
        })
        .build()
        .map_err(|e| HostError::Engine(format!("could not start the background compile threads: {e}")))
}

/// Interval of the epoch ticker: the granularity of timeouts and of yields of
/// a guest that never blocks.
const EPOCH_TICK: Duration = Duration::from_millis(1);

impl Host {
    /// Builds the engines and the linkers, and starts the epoch ticker.
    pub fn new(config: HostConfig) -> Result<Self, HostError> {
        fs::create_dir_all(&config.cache_dir).map_err(|source| HostError::CacheDir {
            path: config.cache_dir.clone(),
            source,
        })?;
        let functions =
            incremental::FunctionCache::open(&config.cache_dir.join("functions.db")).map(Arc::new);
        let mut optimizing_config = engine_config(&config, Tier::Optimized);
        if let Some(f) = &functions {
            optimizing_config
                .enable_incremental_compilation(f.clone())
                .map_err(|e| HostError::Engine(format!("{e:#}")))?;
        }
        let optimizing = Compiler::new(&optimizing_config, Tier::Optimized)?;
        let baseline = match config.tiering {
            Tiering::Off => None,
            _ => Some(Compiler::new(
                &engine_config(&config, Tier::Baseline),
                Tier::Baseline,
            )?),
        };

        let weak: Vec<_> = std::iter::once(&optimizing)
            .chain(baseline.as_ref())
            .map(|c| c.engine.weak())
            .collect();
        std::thread::Builder::new()
            .name("verge-epoch".into())
            .spawn(move || {
                loop {
                    let mut alive = false;
                    for w in &weak {
                        if let Some(engine) = w.upgrade() {
                            engine.increment_epoch();
                            alive = true;
                        }
                    }
                    if !alive {
                        break;
                    }
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| HostError::Engine(format!("could not start the epoch thread: {e}")))?;
        let slow_lane = match config.demote_after {
            Some(_) => Some(lanes::SlowLane::new().map_err(|e| {
                HostError::Engine(format!("could not start the slow lane's threads: {e}"))
            })?),
            None => None,
        };

        Ok(Self {
            optimizing,
            baseline,
            config,
            compiled: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            baseline_loads: AtomicU64::new(0),
            optimized: AtomicU64::new(0),
            usage_sink: None,
            event_sink: None,
            call_sink: None,
            kv: None,
            slow_lane,
            demoted: Arc::new(AtomicU64::new(0)),
            crowd: Arc::new(lanes::Crowd::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
            libraries_compiled: AtomicU64::new(0),
            libraries_reused: AtomicU64::new(0),
            functions,
            library_lock: Mutex::new(()),
            background: background_pool()?,
            instances: reuse::Registry::default(),
            live: Mutex::default(),
        })
    }

    /// The slow lane and the CPU budget before an invocation moves there.
    pub(crate) fn slow_lane(&self) -> Option<lanes::Lane> {
        Some(lanes::Lane {
            handle: self.slow_lane.as_ref()?.handle()?,
            budget: self.config.demote_after?,
            demoted: self.demoted.clone(),
            crowd: self.crowd.clone(),
        })
    }

    /// Sends every invocation's usage record to `sink` (called from the
    /// runtime's threads when an invocation and its response body are done).
    pub fn set_usage_sink(&mut self, sink: UsageSink) {
        self.usage_sink = Some(sink);
    }

    /// Sends the events guests POST to their events URL to `sink`; without
    /// one, such requests are refused like any outbound request.
    pub fn set_event_sink(&mut self, sink: EventSink) {
        self.event_sink = Some(sink);
    }

    /// Runs guests' calls of other functions through `sink`; without one,
    /// such calls are refused.
    pub fn set_call_sink(&mut self, sink: CallSink) {
        self.call_sink = Some(sink);
    }

    /// Gives guests `wasi:keyvalue` on this replica (each version only the
    /// buckets it was granted).
    pub fn set_kv(&mut self, kv: Arc<verge_kv::Kv>) {
        self.kv = Some(kv);
    }

    /// The host's settings.
    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// Counters since start.
    pub fn stats(&self) -> HostStats {
        HostStats {
            compiled: self.compiled.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            baseline: self.baseline_loads.load(Ordering::Relaxed),
            optimized: self.optimized.load(Ordering::Relaxed),
            demoted: self.demoted.load(Ordering::Relaxed),
            libraries_compiled: self.libraries_compiled.load(Ordering::Relaxed),
            libraries_reused: self.libraries_reused.load(Ordering::Relaxed),
            functions_reused: self.functions.as_ref().map_or(0, |f| f.hits()),
            instances_reused: self.instances.counters.reused.load(Ordering::Relaxed),
            instances_prewarmed: self.instances.counters.prewarmed.load(Ordering::Relaxed),
        }
    }

    /// A pool of kept instances for a version with `policy`, or `None`
    /// when it asks for neither reuse nor prewarming. `fallback` is where
    /// the version remembers that reuse failed for it.
    pub fn instances(
        &self,
        policy: InstancePolicy,
        fallback: Arc<AtomicBool>,
    ) -> Option<Arc<Instances>> {
        if policy.reuse <= 1 && policy.prewarm == 0 {
            return None;
        }
        let pool = Instances::new(policy, fallback, self.instances.counters.clone());
        self.instances.add(&pool);
        Some(pool)
    }

    /// Drops kept instances idle for [`REUSE_IDLE`]; returns how many.
    pub fn sweep_instances(&self) -> usize {
        self.instances.sweep()
    }

    /// Cheap checks of an upload before anything else: empty, not wasm, a core module.
    pub fn check_bytes(bytes: &[u8]) -> Result<(), DeployError> {
        if bytes.is_empty() {
            return Err(DeployError::Empty);
        }
        if !bytes.starts_with(b"\0asm") {
            return Err(DeployError::NotWasm);
        }
        if wasmparser::Parser::is_core_wasm(bytes) {
            return Err(DeployError::CoreModule);
        }
        if !wasmparser::Parser::is_component(bytes) {
            return Err(DeployError::Invalid(
                "unknown WebAssembly binary version or layer".into(),
            ));
        }
        Ok(())
    }

    fn cache_path(&self, compiler: &Compiler, sha256: &str) -> PathBuf {
        self.config
            .cache_dir
            .join(format!("{sha256}-{}.cwasm", compiler.key))
    }

    /// Is optimized code for this component in the cache?
    pub fn is_cached(&self, sha256: &str) -> bool {
        self.cache_path(&self.optimizing, sha256).is_file()
    }

    /// Removes the cached code of a component (both tiers); returns the files removed.
    pub fn forget(&self, sha256: &str) -> usize {
        let mut removed = 0;
        for compiler in std::iter::once(&self.optimizing).chain(self.baseline.as_ref()) {
            let path = self.cache_path(compiler, sha256);
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove cached code")
                }
            }
        }
        let _ = fs::remove_file(self.libraries_path(sha256));
        removed + self.sweep_libraries()
    }

    /// Where the list of shared libraries a component links is kept (one
    /// sha256 per line), for [`Host::sweep_libraries`].
    fn libraries_path(&self, sha256: &str) -> PathBuf {
        self.config.cache_dir.join(format!("{sha256}.libraries"))
    }

    fn library_path(&self, compiler: &Compiler, sha256: &str) -> PathBuf {
        self.config
            .cache_dir
            .join(format!("lib-{sha256}-{}.cwasm", compiler.key))
    }

    /// Removes the cached code of shared libraries that no component's list
    /// names any more; returns the files removed.
    fn sweep_libraries(&self) -> usize {
        // A deploy getting its libraries holds the lock for seconds; this
        // runs on the caller's thread, so it leaves the sweep to the next
        // removal rather than wait.
        let Ok(_libraries) = self.library_lock.try_lock() else {
            return 0;
        };
        let Ok(dir) = fs::read_dir(&self.config.cache_dir) else {
            return 0;
        };
        let mut used = HashSet::new();
        let mut files = Vec::new();
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".libraries") {
                if let Ok(text) = fs::read_to_string(entry.path()) {
                    used.extend(text.lines().map(str::to_string));
                }
            } else if let Some(rest) = name.strip_prefix("lib-")
                && let Some((sha, _)) = rest.split_once('-')
            {
                files.push((sha.to_string(), entry.path()));
            }
        }
        let mut removed = 0;
        for (sha, path) in files {
            if !used.contains(&sha) && fs::remove_file(&path).is_ok() {
                removed += 1;
                for compiler in std::iter::once(&self.optimizing).chain(self.baseline.as_ref()) {
                    compiler
                        .libraries
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&sha);
                }
            }
        }
        removed
    }

    /// [`Host::load`], but a component already loaded (for another version
    /// with the same bytes) is shared instead of loaded again. Also says
    /// where the code came from now: [`CodeSource::Cached`] for a shared one.
    pub fn load_shared(
        &self,
        sha256: &str,
        bytes: impl FnOnce() -> std::io::Result<Vec<u8>>,
    ) -> Result<(Arc<LoadedComponent>, CodeSource), DeployError> {
        if let Some(c) = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_sha
            .get(sha256)
            .and_then(std::sync::Weak::upgrade)
        {
            return Ok((c, CodeSource::Cached));
        }
        let loaded = Arc::new(self.load(sha256, bytes)?);
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        if live.by_sha.len() >= live.prune_at {
            live.by_sha.retain(|_, w| w.strong_count() > 0);
            live.prune_at = (live.by_sha.len() * 2).max(64);
        }
        live.by_sha
            .insert(sha256.to_string(), Arc::downgrade(&loaded));
        let source = loaded.source;
        Ok((loaded, source))
    }

    /// Validates, compiles (or loads from the cache) and pre-instantiates a
    /// component. `bytes` is only called when the cache has no usable
    /// optimized code. With tiering, a large component gets baseline code:
    /// call [`Host::optimize`] (on a background thread) to replace it.
    /// Blocking and CPU-heavy: call it from a blocking thread.
    pub fn load(
        &self,
        sha256: &str,
        bytes: impl FnOnce() -> std::io::Result<Vec<u8>>,
    ) -> Result<LoadedComponent, DeployError> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DeployError::BadKey(sha256.to_string()));
        }
        let started = Instant::now();
        if let Some(code) = self.load_cached(&self.optimizing, sha256)? {
            return Ok(LoadedComponent::new(
                code,
                sha256,
                CodeSource::Cached,
                started.elapsed(),
            ));
        }
        let bytes = bytes().map_err(DeployError::Read)?;
        Self::check_bytes(&bytes)?;
        let compiler = match (&self.baseline, self.config.tiering) {
            (Some(b), Tiering::BaselineOnly) => b,
            (Some(b), Tiering::Auto { min_size }) if bytes.len() >= min_size => b,
            _ => &self.optimizing,
        };
        if compiler.tier == Tier::Baseline {
            self.baseline_loads.fetch_add(1, Ordering::Relaxed);
            if let Some(code) = self.load_cached(compiler, sha256)? {
                return Ok(LoadedComponent::new(
                    code,
                    sha256,
                    CodeSource::Cached,
                    started.elapsed(),
                ));
            }
        }
        let code = self.compile(compiler, sha256, &bytes)?;
        Ok(LoadedComponent::new(
            code,
            sha256,
            CodeSource::Compiled,
            started.elapsed(),
        ))
    }

    /// Does this component run on baseline code that [`Host::optimize`] would replace?
    pub fn wants_optimizing(&self, component: &LoadedComponent) -> bool {
        component.tier() == Tier::Baseline
            && self.config.tiering != Tiering::BaselineOnly
            && !component.optimizing.load(Ordering::Relaxed)
    }

    /// Makes optimized code for a component running on baseline code (from
    /// the cache, or compiled and cached) and swaps it in: requests that
    /// start afterwards run on it, requests already running finish on the
    /// baseline code. Returns whether a swap happened. Blocking and
    /// CPU-heavy: run it on a background thread.
    pub fn optimize(
        &self,
        component: &LoadedComponent,
        bytes: impl FnOnce() -> std::io::Result<Vec<u8>>,
    ) -> Result<bool, DeployError> {
        if component.tier() == Tier::Optimized || component.optimizing.swap(true, Ordering::AcqRel)
        {
            return Ok(false);
        }
        // The bytes are read on the caller's thread (it may wait for the
        // artifact store there); the work runs on the background pool.
        let result = match self
            .background
            .install(|| self.load_cached(&self.optimizing, &component.sha256))
        {
            Ok(Some(code)) => Ok(code),
            Ok(None) => bytes().map_err(DeployError::Read).and_then(|bytes| {
                self.background
                    .install(|| self.compile(&self.optimizing, &component.sha256, &bytes))
            }),
            Err(e) => Err(e),
        };
        let outcome = match result {
            Ok(code) => {
                *component
                    .code
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = Arc::new(code);
                self.optimized.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) => Err(e),
        };
        component.optimizing.store(false, Ordering::Release);
        outcome
    }

    /// Code from the cache of `compiler`, checked and pre-instantiated.
    fn load_cached(&self, compiler: &Compiler, sha256: &str) -> Result<Option<Code>, DeployError> {
        let path = self.cache_path(compiler, sha256);
        let Some(component) = self.deserialize(compiler, &path) else {
            return Ok(None);
        };
        // Code of a split component links its shared libraries: all of them
        // must be at hand, or it compiles again from the bytes.
        let mut libraries = Vec::new();
        for (name, item) in component.component_type().imports(&compiler.engine) {
            if let (ComponentItem::Module(_), Some(lib)) = (item.ty, shared::library_of(name)) {
                match self.cached_library(compiler, lib) {
                    Some(module) => libraries.push((name.to_string(), module)),
                    None => return Ok(None),
                }
            }
        }
        self.check_world(compiler, &component, &libraries)?;
        let pre = self.prepare(compiler, &component, &libraries)?;
        self.cache_hits.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Code {
            pre,
            engine: compiler.engine.clone(),
            tier: compiler.tier,
        }))
    }

    /// Compiles with `compiler`, checks, pre-instantiates and caches.
    fn compile(
        &self,
        compiler: &Compiler,
        sha256: &str,
        bytes: &[u8],
    ) -> Result<Code, DeployError> {
        // Baseline code links shared libraries (compiled once for every
        // component that carries them): a deploy compiles only what is its
        // own. Optimized code is compiled whole: resolving a library's
        // imports by name costs every instantiation (about 0.6 ms for the
        // Python runtime's 1,100 imports), which optimized code should not pay.
        // A JavaScript component's engine is a library too, once its
        // snapshot is apart from it (`snapshot`).
        let detached = (compiler.tier == Tier::Baseline)
            .then(|| snapshot::detach(bytes))
            .flatten();
        if compiler.tier == Tier::Baseline
            && let Some(split) = shared::split(detached.as_deref().unwrap_or(bytes))
        {
            match self.compile_split(compiler, sha256, &split) {
                Ok(code) => return Ok(code),
                // The world is checked the same way either way.
                Err(
                    e @ (DeployError::MissingExport { .. } | DeployError::UnsupportedImport(_)),
                ) => {
                    return Err(e);
                }
                // Anything else: the component as uploaded, whose error (if
                // any) names the user's component rather than the rewrite.
                Err(e) => {
                    tracing::info!(error = %e, "the component's shared libraries could not be split off; compiling it whole");
                }
            }
        }
        let component = Component::new(&compiler.engine, bytes)
            .map_err(|e| DeployError::Invalid(format!("{e:#}")))?;
        if compiler.tier == Tier::Optimized
            && let Some(functions) = &self.functions
        {
            functions.prune();
        }
        self.check_world(compiler, &component, &[])?;
        let pre = self.prepare(compiler, &component, &[])?;
        Ok(self.compiled_code(compiler, sha256, &component, pre))
    }

    /// Caches code that passed every check and counts the compile.
    fn compiled_code(
        &self,
        compiler: &Compiler,
        sha256: &str,
        component: &Component,
        pre: ProxyPre<GuestState>,
    ) -> Code {
        let path = self.cache_path(compiler, sha256);
        if let Err(e) = self.write_cache(component, &path) {
            tracing::warn!(path = %path.display(), error = %e, "could not write compiled code to the cache; the next start will compile again");
        }
        self.compiled.fetch_add(1, Ordering::Relaxed);
        trim_heap();
        Code {
            pre,
            engine: compiler.engine.clone(),
            tier: compiler.tier,
        }
    }

    /// Compiles a component whose shared libraries became imports: each
    /// library comes from memory, the cache, or is compiled and cached once
    /// for every component that links it.
    fn compile_split(
        &self,
        compiler: &Compiler,
        sha256: &str,
        split: &shared::Split,
    ) -> Result<Code, DeployError> {
        let list_path = self.libraries_path(sha256);
        let result = (|| {
            let mut libraries = Vec::new();
            {
                // One deploy at a time gets its libraries, and never during
                // a sweep: a library is compiled once however many deploys
                // need it, and the list naming it is on disk before any
                // sweep could look for it.
                let _libraries = self
                    .library_lock
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let list: String = split
                    .libraries
                    .iter()
                    .map(|l| format!("{}\n", l.sha256))
                    .collect();
                write_atomic(&list_path, list.as_bytes()).map_err(DeployError::Read)?;
                for lib in &split.libraries {
                    let module = match self.cached_library(compiler, &lib.sha256) {
                        Some(m) => {
                            self.libraries_reused.fetch_add(1, Ordering::Relaxed);
                            m
                        }
                        None => {
                            let m = self.compile_library(compiler, lib)?;
                            self.libraries_compiled.fetch_add(1, Ordering::Relaxed);
                            m
                        }
                    };
                    libraries.push((lib.import_name(), module));
                }
            }
            let component = Component::new(&compiler.engine, &split.component)
                .map_err(|e| DeployError::Invalid(format!("{e:#}")))?;
            self.check_world(compiler, &component, &libraries)?;
            let pre = self.prepare(compiler, &component, &libraries)?;
            Ok((component, pre))
        })();
        let (component, pre) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = fs::remove_file(&list_path);
                return Err(e);
            }
        };
        Ok(self.compiled_code(compiler, sha256, &component, pre))
    }

    /// A shared library's code from memory or from the on-disk cache.
    fn cached_library(&self, compiler: &Compiler, sha256: &str) -> Option<Module> {
        let mut libraries = compiler
            .libraries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = libraries.get(sha256) {
            return Some(m.clone());
        }
        let path = self.library_path(compiler, sha256);
        if !path.is_file() {
            return None;
        }
        // SAFETY: as in `deserialize`: written by `compile_library` of this
        // host through a temporary file and an atomic rename, into the
        // node's private cache directory, named after the engine.
        #[allow(unsafe_code)]
        match unsafe { Module::deserialize_file(&compiler.engine, &path) } {
            Ok(m) => {
                libraries.insert(sha256.to_string(), m.clone());
                Some(m)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "cached library unusable; compiling again");
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    fn compile_library(
        &self,
        compiler: &Compiler,
        lib: &shared::Library,
    ) -> Result<Module, DeployError> {
        let module = Module::new(&compiler.engine, &lib.bytes)
            .map_err(|e| DeployError::Invalid(format!("{e:#}")))?;
        let path = self.library_path(compiler, &lib.sha256);
        let written = module
            .serialize()
            .map_err(std::io::Error::other)
            .and_then(|code| write_atomic(&path, &code));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "could not cache a shared library's code");
        }
        compiler
            .libraries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(lib.sha256.clone(), module.clone());
        Ok(module)
    }

    fn deserialize(&self, compiler: &Compiler, path: &Path) -> Option<Component> {
        if !path.is_file() {
            return None;
        }
        // SAFETY: the file was written by `write_cache` of this host (same engine
        // configuration, part of the file name) into the node's private cache
        // directory, via a temporary file and an atomic rename, so it is either
        // whole or absent; wasmtime also checks its header against the engine.
        #[allow(unsafe_code)]
        let result = unsafe { Component::deserialize_file(&compiler.engine, path) };
        match result {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "cached code unusable; compiling again");
                let _ = fs::remove_file(path);
                None
            }
        }
    }

    fn write_cache(&self, component: &Component, path: &Path) -> std::io::Result<()> {
        let code = component.serialize().map_err(std::io::Error::other)?;
        write_atomic(path, &code)
    }

    /// Checks the component's world: the proxy export, and only imports Verge provides.
    fn check_world(
        &self,
        compiler: &Compiler,
        component: &Component,
        libraries: &[(String, Module)],
    ) -> Result<(), DeployError> {
        let ty = component.component_type();
        // Every import Verge lacks at once, not the first: the user fixes
        // the build once.
        let missing: Vec<String> = ty
            .imports(&compiler.engine)
            .map(|(name, _)| name)
            .filter(|name| !is_provided_import(name) && !libraries.iter().any(|(n, _)| n == name))
            .map(str::to_string)
            .collect();
        if !missing.is_empty() {
            return Err(DeployError::UnsupportedImport(missing));
        }
        let exports: Vec<String> = ty
            .exports(&compiler.engine)
            .filter(|(_, item)| matches!(item.ty, ComponentItem::ComponentInstance(_)))
            .map(|(name, _)| name.to_string())
            .collect();
        let has_handler = exports
            .iter()
            .any(|n| n.starts_with("wasi:http/incoming-handler@0.2."));
        if !has_handler {
            let found = if exports.is_empty() {
                "none".to_string()
            } else {
                exports.join(", ")
            };
            return Err(DeployError::MissingExport { found });
        }
        Ok(())
    }

    fn prepare(
        &self,
        compiler: &Compiler,
        component: &Component,
        libraries: &[(String, Module)],
    ) -> Result<ProxyPre<GuestState>, DeployError> {
        let link = |e: wasmtime::Error| DeployError::Link(format!("{e:#}"));
        let pre = if libraries.is_empty() {
            compiler.linker.instantiate_pre(component).map_err(link)?
        } else {
            let mut linker = compiler.linker.clone();
            for (name, module) in libraries {
                linker.root().module(name, module).map_err(link)?;
            }
            linker.instantiate_pre(component).map_err(link)?
        };
        ProxyPre::new(pre).map_err(|e| DeployError::Link(format!("{e:#}")))
    }

    /// Runs one request in a fresh instance of `function`.
    ///
    /// The response streams back as the guest writes it; the instance lives
    /// until the guest's handler returns (or the time limit passes).
    pub async fn invoke<B>(
        &self,
        function: &Function,
        invocation_id: &str,
        request: http::Request<B>,
    ) -> Result<http::Response<ResponseBody>, InvokeError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: std::fmt::Display,
    {
        guest::invoke(self, function, invocation_id, request).await
    }

    /// Instantiates `function` in a fresh store and drops it, without calling
    /// the guest: what every request pays before the guest runs (benchmarks).
    pub async fn instantiate_only(&self, function: &Function) -> Result<(), InvokeError> {
        guest::instantiate_only(self, function).await
    }
}

/// Interfaces Verge links for guests: WASI 0.2 and wasi:http.
fn is_provided_import(name: &str) -> bool {
    if name.starts_with("wasi:keyvalue/") {
        return name.ends_with("@0.2.0-draft");
    }
    if name.starts_with("wasi:config/") {
        return name.ends_with("@0.2.0-rc.1");
    }
    const PACKAGES: [&str; 7] = [
        "wasi:cli/",
        "wasi:clocks/",
        "wasi:io/",
        "wasi:random/",
        "wasi:filesystem/",
        "wasi:sockets/",
        "wasi:http/",
    ];
    PACKAGES.iter().any(|p| name.starts_with(p)) && name.contains("@0.2.")
}

/// Gives the kernel back the memory the allocator kept after a compile.
///
/// Compiling a large component allocates hundreds of megabytes that are
/// freed when it ends, and glibc's allocator keeps most of them: a node
/// held 837 MiB after optimizing the JavaScript hello, 303 MiB once
/// trimmed (docs/BENCHMARKS.md). Trimming takes milliseconds, on the
/// compile's own thread.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let started = Instant::now();
        // SAFETY: `malloc_trim` takes no pointer, and glibc's allocator
        // locks each arena while it trims it, so any thread may call it.
        #[allow(unsafe_code)]
        let released = unsafe { libc::malloc_trim(0) };
        tracing::debug!(
            released = released != 0,
            us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "heap trimmed after a compile"
        );
    }
}

/// Writes a file whole or not at all: a temporary file, synced, renamed.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // Unique per write: two deploys may write the same file at once (the
    // same bytes, or two components carrying the same library).
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    let written = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        // Nothing half-written stays behind (a full disk, say).
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// The wasmtime configuration a host with `config` compiles `tier` code with.
/// For benchmarks that measure wasmtime alone beside Verge (the floor under
/// Verge's per-request cost); the node does not use it.
#[doc(hidden)]
pub fn wasmtime_config(config: &HostConfig, tier: Tier) -> Config {
    engine_config(config, tier)
}

fn engine_config(config: &HostConfig, tier: Tier) -> Config {
    let mut c = Config::new();
    c.wasm_component_model(true);
    c.epoch_interruption(true);
    c.memory_init_cow(true);
    if tier == Tier::Baseline {
        // Baseline code serves for the seconds optimized code takes to
        // compile: instances come from the on-demand allocator, so that the
        // pool's address-space reservation is not doubled. Guest memory is
        // still bounded by the store's limiter.
        c.strategy(Strategy::Winch);
        return c;
    }
    let n = config.max_instances.max(1);
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(16))
        .total_memories(n.saturating_mul(4))
        .total_tables(n.saturating_mul(16))
        .total_stacks(n)
        .max_core_instances_per_component(64)
        .max_memories_per_component(16)
        .max_tables_per_component(64)
        .max_memory_size(config.memory_limit)
        .table_elements(guest::MAX_TABLE_ELEMENTS)
        .max_core_instance_size(4 << 20)
        .max_component_instance_size(4 << 20)
        .table_keep_resident(64 << 10)
        .decommit_batch_size(16)
        .pagemap_scan(wasmtime::Enabled::Auto);
    match config.instance_memory {
        InstanceMemory::Resident => {
            // A guest's memory is initialized by copying its data into its
            // slot, whose pages stay resident between requests (reset with
            // memset, the dirty pages only): no page fault and, above all,
            // no copy-on-write fault while the guest runs. Each such fault
            // on a shared image page replaces a read-only mapping, which
            // takes a TLB shootdown on every core running a thread of the
            // node (an IPI: a VM exit on a virtual machine): with a fresh
            // JavaScript instance per request, half the node's CPU went
            // there (docs/BENCHMARKS.md). Slots are reused least recently
            // used first, so the slots ever used are as many as instances
            // ran at once, each keeping at most an eighth of its memory
            // limit resident.
            c.memory_init_cow(false);
            pool.linear_memory_keep_resident((config.memory_limit / 8).clamp(1 << 20, 64 << 20))
                .max_unused_warm_slots(0);
        }
        InstanceMemory::Shared => {
            // Copy-on-write images: pages a guest only reads are shared by
            // every instance; a slot keeps 1 MiB resident (reset with
            // memset instead of madvise: fewer syscalls and page faults).
            pool.linear_memory_keep_resident(1 << 20);
        }
    }
    c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provided_imports() {
        assert!(is_provided_import("wasi:cli/environment@0.2.12"));
        assert!(is_provided_import("wasi:http/types@0.2.0"));
        assert!(is_provided_import("wasi:keyvalue/store@0.2.0-draft"));
        assert!(!is_provided_import("wasi:keyvalue/store@0.2.0"));
        assert!(!is_provided_import("wasi:http/types@0.3.0"));
        assert!(!is_provided_import("acme:thing/x@1.0.0"));
    }

    #[test]
    fn background_optimization_compiles_on_threads_of_the_lowest_priority() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new(HostConfig::new(dir.path())).unwrap();
        // A pool thread's own view of its priority (the pool's threads start
        // with their handler before they run anything).
        let nice = host
            .background
            .install(|| rustix::process::getpriority_process(None).unwrap());
        assert_eq!(nice, 19);
        let name = host
            .background
            .install(|| std::thread::current().name().map(str::to_string));
        assert!(name.unwrap().starts_with("verge-optimize-"));
        // The caller's own priority is untouched.
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), 0);
    }

    #[test]
    fn provided_imports_include_wasi_config() {
        assert!(is_provided_import("wasi:config/store@0.2.0-rc.1"));
        assert!(!is_provided_import(
            "wasi:config/store@0.2.0-draft-2024-09-27"
        ));
    }

    #[test]
    fn a_refused_deploy_names_every_missing_import_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new(HostConfig::new(dir.path())).unwrap();
        let c = wat::parse_str(
            r#"(component
                 (import "acme:pay/charge@1.0.0" (instance))
                 (import "wasi:http/types@0.2.3" (instance))
                 (import "acme:mail/send@2.0.0" (instance)))"#,
        )
        .unwrap();
        let err = host.load(&"c".repeat(64), || Ok(c.clone())).err().unwrap();
        let msg = err.to_string();
        assert!(
            matches!(err, DeployError::UnsupportedImport(ref v) if v.len() == 2),
            "{msg}"
        );
        assert!(msg.contains("`acme:pay/charge@1.0.0`"), "{msg}");
        assert!(msg.contains("`acme:mail/send@2.0.0`"), "{msg}");
        assert!(!msg.contains("wasi:http/types"), "{msg}");
    }

    #[test]
    fn optimized_code_reuses_functions_compiled_before() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new(HostConfig::new(dir.path())).unwrap();
        let functions = host.functions.clone().expect("the function cache opens");
        let a = wat::parse_str(
            r#"(component (core module
                 (func (export "f") (param i32) (result i32)
                   local.get 0 i32.const 7 i32.mul i32.const 3 i32.add)))"#,
        )
        .unwrap();
        // Other bytes (a custom section), the same function.
        let mut b = a.clone();
        b.extend_from_slice(&[0, 4, 3, b'v', b'a', b'r']);
        // Neither is a wasi:http component, but both are compiled first.
        let err = host.load(&"a".repeat(64), || Ok(a.clone())).err();
        assert!(matches!(err, Some(DeployError::MissingExport { .. })));
        let before = functions.hits();
        let _ = host.load(&"b".repeat(64), || Ok(b.clone()));
        assert!(functions.hits() > before, "no function came from the cache");
    }

    /// A component with a main module owning the memory and a library
    /// (memory imported, more than 64 KiB of code); `broken` makes the
    /// library's code invalid.
    fn with_library(broken: bool) -> Vec<u8> {
        let body = "i32.const 1 drop ".repeat(25_000);
        let bad = if broken { "i32.add" } else { "" };
        wat::parse_str(format!(
            r#"(component
              (core module $main (memory (export "memory") 1))
              (core module $lib
                (import "env" "memory" (memory 1))
                (func (export "f") {bad} {body}))
              (core instance $m (instantiate $main))
              (core instance $l (instantiate $lib (with "env" (instance $m)))))"#
        ))
        .unwrap()
    }

    fn cache_files(dir: &Path, suffix: &str) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                n.to_string_lossy().ends_with(suffix)
            })
            .count()
    }

    #[test]
    fn a_failed_split_deploy_leaves_no_library_list_and_names_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = HostConfig::new(dir.path());
        config.tiering = Tiering::BaselineOnly;
        let host = Host::new(config).unwrap();
        // Split, compiled, then refused for its world: the library stays
        // compiled, no component lists it.
        let ok = with_library(false);
        let err = host.load(&"c".repeat(64), || Ok(ok.clone())).err();
        assert!(
            matches!(err, Some(DeployError::MissingExport { .. })),
            "{err:?}"
        );
        assert_eq!(host.stats().libraries_compiled, 1);
        assert_eq!(cache_files(dir.path(), ".libraries"), 0);
        // Invalid code in the library: the error is the component's own.
        let bad = with_library(true);
        match host.load(&"d".repeat(64), || Ok(bad.clone())) {
            Err(DeployError::Invalid(msg)) => assert!(msg.contains("type mismatch"), "{msg}"),
            other => panic!("expected an invalid component, got {:?}", other.err()),
        }
        assert_eq!(cache_files(dir.path(), ".libraries"), 0);
        assert_eq!(host.stats().libraries_compiled, 1);
    }

    #[test]
    fn check_bytes_names_the_problem() {
        assert!(matches!(Host::check_bytes(b""), Err(DeployError::Empty)));
        assert!(matches!(
            Host::check_bytes(b"hello"),
            Err(DeployError::NotWasm)
        ));
        let core = wat::parse_str("(module)").unwrap();
        assert!(matches!(
            Host::check_bytes(&core),
            Err(DeployError::CoreModule)
        ));
        let comp = wat::parse_str("(component)").unwrap();
        assert!(Host::check_bytes(&comp).is_ok());
    }

    /// wasmtime is built without GC: a guest using `externref` is refused at
    /// deploy as the guest's problem, with wasmtime's reason.
    #[test]
    fn a_guest_needing_a_feature_left_out_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new(HostConfig::new(dir.path())).unwrap();
        let comp =
            wat::parse_str("(component (core module (func (export \"f\") (param externref))))")
                .unwrap();
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&comp));
        let err = host.load(&sha, || Ok(comp.clone())).err().expect("refused");
        assert!(err.is_user_error(), "{err}");
        let text = format!("{err}");
        assert!(text.contains("gc types are disallowed"), "{text}");
    }
}
