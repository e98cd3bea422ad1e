//! The node's shared state: store, host, and the in-memory tables the request
//! path reads (functions ready to run, routes).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use verge_host::{Function, Host};
use verge_spec::Route;
use verge_store::{Ledger, Limits, LiveVersion, Store};

use crate::error::ApiError;

/// A function as the node holds it: ready to run, or registered at start and
/// loaded (from the compile cache) by its first request. Idle functions thus
/// cost a registry entry, not their compiled code.
#[derive(Clone)]
enum Slot {
    Ready(Function),
    Registered(Arc<Pending>),
}

struct Pending {
    version: LiveVersion,
    loaded: tokio::sync::OnceCell<Function>,
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
}

impl Admission {
    pub(crate) fn new(instances: u32, queue_depth: usize, max_wait: Duration) -> Self {
        Self {
            node: Arc::new(Semaphore::new(instances.max(1) as usize)),
            instances: instances.max(1) as usize,
            queued: AtomicUsize::new(0),
            queue_depth,
            max_wait,
        }
    }

    /// Invocations holding a slot right now.
    pub(crate) fn running(&self) -> usize {
        self.instances - self.node.available_permits()
    }

    /// Requests waiting right now.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// Held while an invocation runs (until its response body is done).
pub(crate) struct Permits {
    _function: Option<OwnedSemaphorePermit>,
    _node: OwnedSemaphorePermit,
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
    pub data_dir: PathBuf,
    pub max_upload: usize,
    pub token_hashes: Vec<String>,
    pub ceilings: Ceilings,
    pub prices: Prices,
    pub admission: Admission,
    pub body_limits: BodyLimits,
    pub log_limit: usize,
}

/// Everything a handler needs.
pub struct AppState {
    pub(crate) store: Store,
    pub(crate) host: Host,
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) data_dir: PathBuf,
    pub(crate) max_upload: usize,
    pub(crate) token_hashes: Vec<String>,
    pub(crate) deploy_lock: tokio::sync::Mutex<()>,
    pub(crate) ceilings: Ceilings,
    pub(crate) prices: Prices,
    pub(crate) admission: Admission,
    pub(crate) body_limits: BodyLimits,
    pub(crate) log_limit: usize,
    bodies: RwLock<HashMap<String, BodyLimits>>,
    functions: RwLock<HashMap<String, Slot>>,
    slots: RwLock<HashMap<String, Arc<Semaphore>>>,
    routes: RwLock<Arc<Vec<Route>>>,
}

impl AppState {
    pub(crate) fn new(store: Store, host: Host, ledger: Arc<Ledger>, settings: Settings) -> Self {
        Self {
            store,
            host,
            ledger,
            data_dir: settings.data_dir,
            max_upload: settings.max_upload,
            token_hashes: settings.token_hashes,
            deploy_lock: tokio::sync::Mutex::new(()),
            ceilings: settings.ceilings,
            prices: settings.prices,
            admission: settings.admission,
            body_limits: settings.body_limits,
            log_limit: settings.log_limit,
            bodies: RwLock::default(),
            slots: RwLock::default(),
            functions: RwLock::default(),
            routes: RwLock::default(),
        }
    }

    /// Is a function of this name deployed (loaded or not)?
    pub(crate) fn has_function(&self, name: &str) -> bool {
        self.functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(name)
    }

    /// The function serving `name`, loading it on its first request.
    pub(crate) async fn function(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<Option<Function>, ApiError> {
        let slot = self
            .functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned();
        let pending = match slot {
            None => return Ok(None),
            Some(Slot::Ready(f)) => return Ok(Some(f)),
            Some(Slot::Registered(p)) => p,
        };
        let (state, p) = (self.clone(), pending.clone());
        let function = pending
            .loaded
            .get_or_try_init(|| async move {
                crate::api::blocking(move || state.load_version(&p.version)).await
            })
            .await?
            .clone();
        let mut functions = self
            .functions
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(Slot::Registered(current)) = functions.get(name)
            && Arc::ptr_eq(current, &pending)
        {
            functions.insert(name.to_string(), Slot::Ready(function.clone()));
        }
        Ok(Some(function))
    }

    /// Loads a stored version (compiled code from the cache when it is there).
    fn load_version(&self, v: &LiveVersion) -> Result<Function, ApiError> {
        let component = self
            .host
            .load(&v.sha256, || {
                self.store
                    .read_artifact(&v.sha256)
                    .map_err(std::io::Error::other)
            })
            .map_err(|e| {
                ApiError::Internal(format!(
                    "could not load function {:?} version {}: {e}",
                    v.function, v.version
                ))
            })?;
        Ok(Function::new(
            Arc::new(component),
            v.function.clone(),
            v.version,
            v.env.clone(),
        )
        .with_limits(
            v.limits.timeout_ms.map(Duration::from_millis),
            v.limits.memory_bytes.map(|m| m as usize),
            v.limits.log_bytes.map(|m| m as usize),
        ))
    }

    /// Registers a stored version, to be loaded by its first request.
    pub(crate) fn register(&self, version: LiveVersion) {
        let name = version.function.clone();
        self.set_limits(&name, &version.limits);
        self.functions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                name,
                Slot::Registered(Arc::new(Pending {
                    version,
                    loaded: tokio::sync::OnceCell::new(),
                })),
            );
    }

    /// Records the limits the node enforces for `name` (the host enforces the rest).
    fn set_limits(&self, name: &str, limits: &Limits) {
        let bodies = BodyLimits {
            request: limits
                .request_body
                .map_or(self.body_limits.request, |b| b as usize),
            response: limits
                .response_body
                .map_or(self.body_limits.response, |b| b as usize),
        };
        self.bodies
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), bodies);
        let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
        match limits.concurrency {
            Some(n) => {
                slots.insert(
                    name.to_string(),
                    Arc::new(Semaphore::new(n.max(1) as usize)),
                );
            }
            None => {
                slots.remove(name);
            }
        }
    }

    /// Makes `function` the one that serves its name, with at most
    /// `concurrency` invocations at once (`None`: only the node's cap).
    pub(crate) fn install(&self, function: Function, limits: Limits) {
        let name = function.name.clone();
        self.set_limits(&name, &limits);
        self.functions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name, Slot::Ready(function));
    }

    /// Body limits of `name`: its version's, else the node's.
    pub(crate) fn body_limits_of(&self, name: &str) -> BodyLimits {
        self.bodies
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .copied()
            .unwrap_or(self.body_limits)
    }

    pub(crate) fn uninstall(&self, name: &str) {
        self.functions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        self.slots
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        self.bodies
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }

    /// Waits for a slot of `name` and of the node: at once if free, else in
    /// the bounded queue for at most the maximum wait.
    pub(crate) async fn admit(&self, name: &str) -> Result<Permits, Refused> {
        let slot = self
            .slots
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned();
        let node = self.admission.node.clone();
        let fast = match &slot {
            Some(s) => s.clone().try_acquire_owned().ok().map(Some),
            None => Some(None),
        };
        if let Some(function) = fast
            && let Ok(node_permit) = node.clone().try_acquire_owned()
        {
            return Ok(Permits {
                _function: function,
                _node: node_permit,
            });
        }
        let a = &self.admission;
        if a.queued.fetch_add(1, Ordering::AcqRel) >= a.queue_depth {
            a.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::QueueFull(a.queue_depth));
        }
        let wait = async {
            let function = match slot {
                Some(s) => Some(s.acquire_owned().await.ok()?),
                None => None,
            };
            let node = node.acquire_owned().await.ok()?;
            Some(Permits {
                _function: function,
                _node: node,
            })
        };
        let result = tokio::time::timeout(a.max_wait, wait).await;
        a.queued.fetch_sub(1, Ordering::AcqRel);
        match result {
            Ok(Some(p)) => Ok(p),
            _ => Err(Refused::WaitedTooLong(a.max_wait)),
        }
    }

    pub(crate) fn function_count(&self) -> usize {
        self.functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Reloads the route table from the store.
    pub(crate) fn refresh_routes(&self) -> Result<(), verge_store::StoreError> {
        let mut routes = self.store.routes()?;
        // Most specific first: host-bound before any-host, then longer paths.
        routes.sort_by(|a, b| {
            b.host
                .is_some()
                .cmp(&a.host.is_some())
                .then(b.path.len().cmp(&a.path.len()))
        });
        *self.routes.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(routes);
        Ok(())
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
