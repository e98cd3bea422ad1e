//! Instances kept between requests, for the versions that ask for it.
//!
//! By default every request gets a fresh instance: nothing of one request
//! can reach the next. A version deployed with `--reuse N` lets one
//! instance serve up to N requests one after another (never two at once),
//! so that a runtime with a costly start (a JavaScript engine, CPython)
//! starts once per N requests; one deployed with `--prewarm K` gets up to K
//! never-used instances made ahead of time, so that a request skips
//! instantiation but still gets an instance no one has touched.
//!
//! An instance is kept only after a request that ended well: a trap, a
//! timeout, a refused memory growth, no response, or memory past half the
//! version's limit throws it away. Kept instances are the version's alone
//! (a pool per [`Function`](crate::Function), which is per function
//! version) and are dropped after [`IDLE`] without a request. A component
//! whose instance fails its first reuse, before any reuse of it worked,
//! falls back to fresh instances ([`Instances::fell_back`]).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use wasmtime::Store;
use wasmtime_wasi_http::p2::bindings::Proxy;

use crate::guest::GuestState;
use crate::{Capture, Code};

/// How long a kept instance waits for a request before it is dropped.
pub const IDLE: Duration = Duration::from_secs(10);

/// Used instances kept per version at most: as many as requests of it ran
/// at once, up to this.
const MAX_KEPT: usize = 16;

/// Prewarmed instances per version at most (`--prewarm`).
pub const MAX_PREWARM: u32 = 64;

/// Requests one instance may serve at most (`--reuse`).
pub const MAX_REUSE: u32 = 1_000_000;

/// What a version asks for: `reuse` requests per instance (1: a fresh
/// instance per request), `prewarm` instances made ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstancePolicy {
    pub reuse: u32,
    pub prewarm: u32,
}

/// An instance between two requests.
pub(crate) struct Parked {
    pub(crate) store: Store<GuestState>,
    pub(crate) proxy: Proxy,
    /// The code it was made from: an instance of code since replaced (by
    /// optimized code) is not used again.
    pub(crate) code: Arc<Code>,
    /// Requests it served.
    pub(crate) uses: u32,
    pub(crate) stdout: Capture,
    pub(crate) stderr: Capture,
    since: Instant,
}

impl Parked {
    pub(crate) fn new(
        store: Store<GuestState>,
        proxy: Proxy,
        code: Arc<Code>,
        uses: u32,
        stdout: Capture,
        stderr: Capture,
    ) -> Self {
        Self {
            store,
            proxy,
            code,
            uses,
            stdout,
            stderr,
            since: Instant::now(),
        }
    }
}

/// The kept instances of one function version.
pub struct Instances {
    policy: InstancePolicy,
    /// Instances that served requests, the most recently parked last.
    used: Mutex<Vec<Parked>>,
    /// Instances never used (prewarmed).
    fresh: Mutex<Vec<Parked>>,
    /// Prewarm instantiations under way.
    pub(crate) filling: AtomicU32,
    /// Set when an instance failed its reuse before any reuse worked:
    /// requests get fresh instances from then on.
    fallback: Arc<AtomicBool>,
    /// Set once an instance served a request after its first.
    reuse_worked: AtomicBool,
    /// The host's counters.
    counters: Arc<Counters>,
}

/// Requests served by used instances, and by prewarmed ones, on the host.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) reused: AtomicU64,
    pub(crate) prewarmed: AtomicU64,
}

impl Instances {
    /// The pool of a version with `policy`; `fallback` is where the version
    /// remembers that reuse failed (kept by the caller across loads of its
    /// code).
    pub(crate) fn new(
        policy: InstancePolicy,
        fallback: Arc<AtomicBool>,
        counters: Arc<Counters>,
    ) -> Arc<Self> {
        Arc::new(Self {
            policy: InstancePolicy {
                reuse: policy.reuse.clamp(1, MAX_REUSE),
                prewarm: policy.prewarm.min(MAX_PREWARM),
            },
            used: Mutex::default(),
            fresh: Mutex::default(),
            filling: AtomicU32::new(0),
            fallback,
            reuse_worked: AtomicBool::new(false),
            counters,
        })
    }

    /// Does the version reuse instances now (it asked, and reuse did not
    /// fail)?
    pub(crate) fn reusing(&self) -> bool {
        self.policy.reuse > 1 && !self.fell_back()
    }

    /// Did reuse fail for this version (it gets fresh instances)?
    pub fn fell_back(&self) -> bool {
        self.fallback.load(Ordering::Relaxed)
    }

    /// An instance of `code` for a request: a used one (most recently parked
    /// first: its memory is warmest), else a prewarmed one. Stale ones
    /// (other code, idle too long) are dropped on the way.
    pub(crate) fn take(&self, code: &Arc<Code>) -> Option<Parked> {
        let now = Instant::now();
        let usable = |p: &Parked| Arc::ptr_eq(&p.code, code) && now - p.since < IDLE;
        // Stale instances are dropped once the lock is let go: dropping a
        // store resets its memory, which other requests need not wait for.
        let mut stale = Vec::new();
        let lists = [
            (&self.used, &self.counters.reused, self.reusing()),
            (&self.fresh, &self.counters.prewarmed, true),
        ];
        for (list, served, wanted) in lists {
            if !wanted {
                continue;
            }
            let mut list = lock(list);
            while let Some(p) = list.pop() {
                if usable(&p) {
                    served.fetch_add(1, Ordering::Relaxed);
                    drop(list);
                    drop(stale);
                    return Some(p);
                }
                stale.push(p);
            }
        }
        None
    }

    /// Keeps an instance that served a request, if it may serve more.
    fn keep(&self, parked: Parked) {
        if parked.uses >= self.policy.reuse || !self.reusing() {
            return;
        }
        let mut used = lock(&self.used);
        if used.len() < MAX_KEPT {
            used.push(parked);
        }
    }

    /// Keeps a never-used instance made ahead; false when there are enough.
    pub(crate) fn keep_fresh(&self, parked: Parked) -> bool {
        let mut fresh = lock(&self.fresh);
        if fresh.len() >= self.policy.prewarm as usize {
            return false;
        }
        fresh.push(parked);
        true
    }

    /// Prewarmed instances to make now, to have `prewarm` ready.
    pub(crate) fn wanted(&self) -> u32 {
        let have = lock(&self.fresh).len() as u32 + self.filling.load(Ordering::Relaxed);
        self.policy.prewarm.saturating_sub(have)
    }

    /// Drops the instances idle for [`IDLE`] or longer.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut n = 0;
        for list in [&self.used, &self.fresh] {
            // Dropped after the lock is let go.
            let stale: Vec<Parked> = lock(list)
                .extract_if(.., |p| now - p.since >= IDLE)
                .collect();
            n += stale.len();
        }
        n
    }

    /// Drops every kept instance.
    pub fn clear(&self) {
        let used = std::mem::take(&mut *lock(&self.used));
        let fresh = std::mem::take(&mut *lock(&self.fresh));
        drop((used, fresh));
    }

    /// Notes how a request on an instance that had served `uses_before`
    /// requests ended, and keeps the instance when it may serve again.
    fn ended(&self, name: &str, version: u64, uses_before: u32, end: End) {
        let reused = uses_before > 0;
        match end {
            End::Kept(parked) => {
                if reused {
                    self.reuse_worked.store(true, Ordering::Relaxed);
                }
                self.keep(parked);
            }
            End::Failed { reuse_suspect } => {
                if reused
                    && reuse_suspect
                    && !self.reuse_worked.load(Ordering::Relaxed)
                    && !self.fallback.swap(true, Ordering::Relaxed)
                {
                    let gone = std::mem::take(&mut *lock(&self.used));
                    drop(gone);
                    tracing::warn!(function = %name, version, "the component failed its second request in one instance; this version falls back to a fresh instance per request (see `verge versions`)");
                }
            }
            End::Dropped => {}
        }
    }
}

/// How an instance's request ended, for its pool.
pub(crate) enum End {
    /// Well: the instance may serve again.
    Kept(Parked),
    /// It trapped or gave no response (`reuse_suspect`: what a component
    /// that cannot serve twice does), or hit its limits.
    Failed { reuse_suspect: bool },
    /// Well, but the instance is done (its uses, its memory).
    Dropped,
}

/// The two halves of a request's end on a kept instance: the guest's task
/// (the instance, after its handler returned) and the caller (whether a
/// response came). Whichever comes second decides.
pub(crate) struct Handback {
    pool: Arc<Instances>,
    name: String,
    version: u64,
    uses_before: u32,
    state: Mutex<HandbackState>,
}

#[derive(Default)]
struct HandbackState {
    task: Option<TaskEnd>,
    answered: Option<bool>,
}

/// What the guest's task hands back.
pub(crate) enum TaskEnd {
    /// The handler returned; the instance, when it may serve again.
    Returned(Option<Parked>),
    /// It trapped.
    Trapped,
    /// Timeout, memory limit or instantiation failure.
    Stopped,
}

impl Handback {
    pub(crate) fn new(pool: Arc<Instances>, name: &str, version: u64, uses_before: u32) -> Self {
        Self {
            pool,
            name: name.to_string(),
            version,
            uses_before,
            state: Mutex::default(),
        }
    }

    pub(crate) fn task_ended(&self, end: TaskEnd) {
        let mut s = lock(&self.state);
        s.task = Some(end);
        self.settle(&mut s);
    }

    pub(crate) fn caller_saw(&self, answered: bool) {
        let mut s = lock(&self.state);
        if s.answered.is_none() {
            s.answered = Some(answered);
        }
        self.settle(&mut s);
    }

    fn settle(&self, s: &mut HandbackState) {
        let Some(answered) = s.answered else { return };
        let Some(task) = s.task.take() else { return };
        let end = match (task, answered) {
            (TaskEnd::Returned(Some(p)), true) => End::Kept(p),
            (TaskEnd::Returned(None), true) => End::Dropped,
            (TaskEnd::Returned(_), false) | (TaskEnd::Trapped, _) => End::Failed {
                reuse_suspect: true,
            },
            (TaskEnd::Stopped, _) => End::Failed {
                reuse_suspect: false,
            },
        };
        self.pool
            .ended(&self.name, self.version, self.uses_before, end);
    }
}

impl Drop for Handback {
    fn drop(&mut self) {
        // A caller that never said (dropped midway): no answer it saw.
        let s = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        if s.answered.is_none() && s.task.is_some() {
            s.answered = Some(false);
            let mut s = std::mem::take(s);
            self.settle(&mut s);
        }
    }
}

/// Resources a kept instance may hold between requests, at most.
const MAX_RESOURCES: usize = 256;

/// Did the guest's handler return leaving its response unfinished (a
/// response or body it never sent or finished) or an outbound request in
/// flight, or hold more resources than a kept instance may? A fresh
/// instance's store would end all of that (the client sees the response
/// cut); a kept one is thrown away so that it does. Requests it left
/// unread end as they would anyway.
pub(crate) fn unfinished(table: &mut wasmtime::component::ResourceTable) -> bool {
    use wasmtime_wasi_http::p2::body::HostOutgoingBody;
    use wasmtime_wasi_http::p2::types::{
        HostFutureIncomingResponse, HostOutgoingResponse, HostResponseOutparam,
    };
    let mut n = 0;
    for entry in table.iter_mut() {
        n += 1;
        let e: &dyn std::any::Any = entry;
        if n > MAX_RESOURCES
            || e.is::<HostOutgoingBody>()
            || e.is::<HostOutgoingResponse>()
            || e.is::<HostResponseOutparam>()
            || e.is::<HostFutureIncomingResponse>()
        {
            return true;
        }
    }
    false
}

/// The pools of a host, to sweep.
#[derive(Default)]
pub(crate) struct Registry {
    pools: Mutex<Vec<Weak<Instances>>>,
    pub(crate) counters: Arc<Counters>,
}

impl Registry {
    pub(crate) fn add(&self, pool: &Arc<Instances>) {
        lock(&self.pools).push(Arc::downgrade(pool));
    }

    /// Drops idle instances of every pool, and forgets dead pools.
    pub(crate) fn sweep(&self) -> usize {
        let pools: Vec<Arc<Instances>> = {
            let mut pools = lock(&self.pools);
            pools.retain(|p| p.strong_count() > 0);
            pools.iter().filter_map(Weak::upgrade).collect()
        };
        pools.iter().map(|p| p.sweep()).sum()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
