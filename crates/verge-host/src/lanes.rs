//! Two lanes for guests. Every invocation starts on the runtime of its
//! caller (the node's, shared with the HTTP front); one that has kept the CPU
//! for more than a budget moves to the slow lane: a runtime of its own whose
//! threads run at a lower priority (nice 5: a third of a normal thread's
//! weight). Short requests keep the cores; long-running and spinning guests
//! get what is left (on an idle machine, all of it). The budget holds while
//! the fast lane has a thread for each guest that keeps the CPU there: one
//! more, and it moves at once ([`Crowd`]), so that a burst of spinners of a
//! component with no reputation yet does not hold the fast lane (and the
//! callers' timers on it) for their whole budget. Nice 19 served
//! neighbours marginally better but let any busy process on the machine
//! starve a demoted guest into its time limit.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

use crate::meter::{Meter, thread_cpu_ns};

/// The slow lane's runtime.
pub(crate) struct SlowLane {
    rt: Option<Runtime>,
}

impl SlowLane {
    pub(crate) fn new() -> std::io::Result<Self> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("verge-slow-lane")
            .on_thread_start(|| {
                // Per thread on Linux: only this lane's threads are reniced.
                // Nice 5, not 19: see the module docs.
                if let Err(e) =
                    rustix::process::setpriority_process(Some(rustix::thread::gettid()), 5)
                {
                    tracing::debug!(error = %e, "could not lower the slow lane's priority");
                }
            })
            .enable_all()
            .build()?;
        Ok(Self { rt: Some(rt) })
    }

    pub(crate) fn handle(&self) -> Option<Handle> {
        self.rt.as_ref().map(|rt| rt.handle().clone())
    }
}

impl Drop for SlowLane {
    fn drop(&mut self) {
        // Never blocks (a host may be dropped inside an async context).
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// What a component's recent invocations did with the CPU: each one moved
/// to the slow lane raises it, each one that finished within the budget
/// lowers it. A component that keeps spinning starts its invocations on the
/// slow lane at once, instead of spending the budget on the fast lane's
/// threads every time (with a few hundred spinners starting every couple of
/// seconds, that budget alone kept the neighbours' requests waiting).
#[derive(Debug, Default)]
pub(crate) struct Reputation(AtomicU8);

impl Reputation {
    /// Score at and above which invocations start on the slow lane.
    const HEAVY: u8 = 4;
    const MAX: u8 = 8;

    fn heavy(&self) -> bool {
        self.0.load(Ordering::Relaxed) >= Self::HEAVY
    }

    fn moved(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(s.saturating_add(2).min(Self::MAX))
            });
    }

    /// The component ran into its time limit: heavy at once, whatever CPU
    /// it got (under contention a spinner may get little of it).
    pub(crate) fn spun(&self) {
        self.0.store(Self::MAX, Ordering::Relaxed);
    }

    fn light(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| s.checked_sub(1));
    }
}

/// Set when an invocation moves to the slow lane, waking whoever waits for
/// it: the caller then answers at the invocation's deadline itself, since
/// on a crowded slow lane the guest notices its deadline only when its
/// thread gets back to it.
#[derive(Default)]
pub(crate) struct Moved {
    flag: AtomicBool,
    waker: futures::task::AtomicWaker,
    /// Epoch ticks at which the guest was interrupted while computing.
    epochs: AtomicU32,
    /// The invocation's task on the slow lane, once it is there: the
    /// caller's cutoff aborts it at once (aborting the caller's task
    /// reaches it only when that task is dropped, and the lane may run the
    /// guest meanwhile).
    slow_task: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
}

impl Moved {
    /// Called by the store's epoch callback when the guest yields because
    /// its slice is up.
    pub(crate) fn epoch_yield(&self) {
        self.epochs.fetch_add(1, Ordering::Relaxed);
    }

    /// Epoch ticks the guest has been interrupted at so far.
    fn epoch_yields(&self) -> u32 {
        self.epochs.load(Ordering::Relaxed)
    }

    /// Whether the invocation was moved to the slow lane.
    pub(crate) fn was_moved(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    pub(crate) fn set(&self) {
        self.flag.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn on_slow_lane(&self, task: tokio::task::AbortHandle) {
        *self
            .slow_task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
    }

    /// Aborts the invocation's task on the slow lane, if it is there: a
    /// task waiting for its turn is dropped without running again.
    pub(crate) fn abort_slow(&self) {
        if let Some(t) = self
            .slow_task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            t.abort();
        }
    }

    /// Has the invocation moved? If not, `cx` is woken when it does.
    pub(crate) fn poll_moved(&self, cx: &mut Context<'_>) -> bool {
        if self.flag.load(Ordering::Acquire) {
            return true;
        }
        self.waker.register(cx.waker());
        self.flag.load(Ordering::Acquire)
    }
}

/// Where and when invocations move.
#[derive(Clone)]
pub(crate) struct Lane {
    pub handle: Handle,
    pub budget: Duration,
    /// Invocations moved so far.
    pub demoted: Arc<AtomicU64>,
    /// The guests keeping the CPU on the fast lane.
    pub crowd: Arc<Crowd>,
}

/// Invocations on the fast lane that keep the CPU: each has been
/// interrupted at [`Crowd::TICKS`] epoch ticks or more ([`Moved::epoch_yield`];
/// a tick may fall in any guest's first microseconds, so one is not enough),
/// has used at least [`Crowd::CPU_MIN`] of CPU (a short request the machine
/// kept waiting mid-run sees ticks go by, but not CPU time), and has not
/// finished. While there are
/// no more of them than the lane has threads, each keeps the lane until its
/// budget is used; past that, the next one moves at once. (A future without
/// a [`Moved`] counts by its CPU time instead, [`Crowd::CPU`].)
#[derive(Debug)]
pub(crate) struct Crowd {
    hogging: AtomicUsize,
    threads: usize,
}

impl Crowd {
    /// Epoch ticks (1 ms each) an invocation is interrupted at before it
    /// counts as keeping the CPU.
    const TICKS: u32 = 3;
    /// CPU time an invocation interrupted at those ticks has used at least.
    const CPU_MIN: u64 = 1_000_000;
    /// CPU time after which a future without epoch ticks counts.
    const CPU: u64 = 3_000_000;

    pub(crate) fn new(threads: usize) -> Self {
        Self {
            hogging: AtomicUsize::new(0),
            threads: threads.max(1),
        }
    }
}

enum Place<F: Future> {
    Fast(Pin<Box<F>>),
    Slow(JoinHandle<F::Output>),
    Gone,
}

/// Where a [`Demoting`] reads the CPU time its future used.
enum Clock {
    /// The thread CPU clock, read around every poll.
    Own,
    /// The meter of the future it wraps, which reads that clock already:
    /// one pair of clock reads per poll instead of two (each is a system
    /// call, about a microsecond).
    Meter(Arc<Meter>),
}

impl Clock {
    fn now(&self) -> u64 {
        match self {
            Clock::Own => thread_cpu_ns(),
            Clock::Meter(m) => m.cpu_ns(),
        }
    }
}

/// Runs `F` where it is polled until it has used its lane's budget of CPU
/// time, then on the slow lane.
pub(crate) struct Demoting<F: Future> {
    lane: Place<F>,
    used_ns: u64,
    slow: Lane,
    clock: Clock,
    reputation: Arc<Reputation>,
    /// Started on the slow lane (its component has a heavy reputation).
    started_slow: bool,
    /// Told when the invocation moves.
    moved: Option<Arc<Moved>>,
    /// Counted in the lane's crowd (on the fast lane, keeping the CPU).
    hogging: bool,
}

impl<F> Demoting<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    /// `inner`, on the fast lane until its budget is used, or at once on the
    /// slow lane when `reputation` says its component keeps spinning.
    pub(crate) fn new(inner: F, slow: Lane, reputation: Arc<Reputation>) -> Self {
        let started_slow = reputation.heavy();
        let lane = if started_slow {
            slow.demoted.fetch_add(1, Ordering::Relaxed);
            Place::Slow(slow.handle.spawn(inner))
        } else {
            Place::Fast(Box::pin(inner))
        };
        Self {
            lane,
            used_ns: 0,
            slow,
            clock: Clock::Own,
            reputation,
            started_slow,
            moved: None,
            hogging: false,
        }
    }

    /// Leaves the lane's crowd, if counted in it.
    fn leave_crowd(&mut self) {
        if std::mem::take(&mut self.hogging) {
            self.slow.crowd.hogging.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Tells `moved` when the invocation moves to the slow lane (at once if
    /// it started there).
    pub(crate) fn signalling(mut self, moved: Arc<Moved>) -> Self {
        if self.started_slow {
            moved.set();
        }
        if let Place::Slow(h) = &self.lane {
            moved.on_slow_lane(h.abort_handle());
        }
        self.moved = Some(moved);
        self
    }

    /// As [`Demoting::new`] for a future that charges every poll to `meter`
    /// (a `Metered`): its charges are the CPU time used.
    pub(crate) fn metered(
        inner: F,
        slow: Lane,
        meter: Arc<Meter>,
        reputation: Arc<Reputation>,
    ) -> Self {
        let mut d = Self::new(inner, slow, reputation);
        d.clock = Clock::Meter(meter);
        d
    }
}

impl<F> Future for Demoting<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        loop {
            match &mut this.lane {
                Place::Fast(f) => {
                    let start = this.clock.now();
                    let result = f.as_mut().poll(cx);
                    let used = this.clock.now().saturating_sub(start);
                    this.used_ns += used;
                    let budget = u64::try_from(this.slow.budget.as_nanos()).unwrap_or(u64::MAX);
                    let mut within = this.used_ns <= budget;
                    let computing = match &this.moved {
                        Some(m) => {
                            m.epoch_yields() >= Crowd::TICKS && this.used_ns >= Crowd::CPU_MIN
                        }
                        None => this.used_ns >= Crowd::CPU,
                    };
                    if result.is_pending() && computing && !this.hogging {
                        this.hogging = true;
                        let crowd = &this.slow.crowd;
                        if crowd.hogging.fetch_add(1, Ordering::Relaxed) >= crowd.threads {
                            // One more than the lane has threads: this one
                            // moves now.
                            within = false;
                        }
                    }
                    if result.is_ready() {
                        this.leave_crowd();
                        // Under heavy contention a spinner may reach its time
                        // limit before it has used its budget (a slice every
                        // few hundred milliseconds): one that ends having used
                        // half of it counts as heavy all the same.
                        if this.used_ns >= budget / 2 {
                            this.reputation.moved();
                        } else {
                            this.reputation.light();
                        }
                    }
                    if result.is_ready() || within {
                        return result;
                    }
                    let Place::Fast(f) = std::mem::replace(&mut this.lane, Place::Gone) else {
                        unreachable!("matched above")
                    };
                    this.leave_crowd();
                    this.reputation.moved();
                    if let Some(m) = &this.moved {
                        m.set();
                    }
                    this.slow.demoted.fetch_add(1, Ordering::Relaxed);
                    let h = this.slow.handle.spawn(f);
                    if let Some(m) = &this.moved {
                        m.on_slow_lane(h.abort_handle());
                    }
                    this.lane = Place::Slow(h);
                }
                Place::Slow(h) => {
                    return match Pin::new(h).poll(cx) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(Ok(v)) => {
                            // Started slow: did it need to? (The meter's total;
                            // without a meter, assume not, so that a component
                            // that stopped spinning finds its way back.)
                            if this.started_slow {
                                let used = match &this.clock {
                                    Clock::Meter(m) => m.cpu_ns(),
                                    Clock::Own => 0,
                                };
                                if used
                                    <= u64::try_from(this.slow.budget.as_nanos())
                                        .unwrap_or(u64::MAX)
                                {
                                    this.reputation.light();
                                } else {
                                    this.reputation.moved();
                                }
                            }
                            Poll::Ready(v)
                        }
                        Poll::Ready(Err(e)) if e.is_panic() => {
                            std::panic::resume_unwind(e.into_panic())
                        }
                        Poll::Ready(Err(_)) => {
                            std::panic::panic_any("the slow lane shut down under an invocation")
                        }
                    };
                }
                Place::Gone => return Poll::Pending,
            }
        }
    }
}

impl<F: Future> Drop for Demoting<F> {
    fn drop(&mut self) {
        // Aborting the caller's task stops the guest on either lane.
        if let Place::Slow(h) = &self.lane {
            h.abort();
        }
        if self.hogging {
            self.slow.crowd.hogging.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spins until this thread has used `ms` of CPU time (not wall time: on a
    /// loaded machine the two differ, and the lane and the meter count CPU).
    fn busy(ms: u64) {
        let start = thread_cpu_ns();
        while thread_cpu_ns() - start < ms * 1_000_000 {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn a_component_that_keeps_spinning_starts_on_the_slow_lane_until_it_stops() {
        let lane = SlowLane::new().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let first_thread = |polls: u32| async move {
            let name = std::thread::current().name().unwrap_or("").to_string();
            for _ in 0..polls {
                busy(3);
                tokio::task::yield_now().await;
            }
            name
        };
        let slow = Lane {
            handle: lane.handle().unwrap(),
            budget: Duration::from_millis(10),
            demoted: Arc::new(AtomicU64::new(0)),
            crowd: Arc::new(Crowd::new(2)),
        };
        let rep = Arc::new(Reputation::default());
        // Two invocations that use up the budget: the component is heavy.
        for _ in 0..2 {
            let first = rt.block_on(Demoting::new(first_thread(10), slow.clone(), rep.clone()));
            assert!(!first.contains("slow-lane"), "{first}");
        }
        assert!(rep.heavy());
        // The next one starts on the slow lane, without spending the budget
        // on the fast lane first.
        let first = rt.block_on(Demoting::new(first_thread(1), slow.clone(), rep.clone()));
        assert!(first.contains("slow-lane"), "{first}");
        // It did not need to: the component finds its way back.
        assert!(!rep.heavy());
        let first = rt.block_on(Demoting::new(first_thread(1), slow.clone(), rep.clone()));
        assert!(!first.contains("slow-lane"), "{first}");
    }

    #[test]
    fn a_guest_hogging_a_crowded_fast_lane_moves_before_its_budget() {
        let lane = SlowLane::new().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let work = |polls: u32| async move {
            let mut seen = Vec::new();
            for _ in 0..polls {
                busy(1);
                seen.push(std::thread::current().name().unwrap_or("").to_string());
                tokio::task::yield_now().await;
            }
            seen
        };
        // A fast lane of one thread, and a budget neither guest reaches.
        let crowd = Arc::new(Crowd::new(1));
        let slow = Lane {
            handle: lane.handle().unwrap(),
            budget: Duration::from_secs(10),
            demoted: Arc::new(AtomicU64::new(0)),
            crowd: crowd.clone(),
        };
        let (first, second) = rt.block_on(async {
            tokio::join!(
                Demoting::new(work(8), slow.clone(), Arc::default()),
                Demoting::new(work(8), slow.clone(), Arc::default()),
            )
        });
        // The first keeps the lane's one thread; the second, one too many,
        // moves once it counts (3 ms of CPU: its third poll).
        assert!(first.iter().all(|n| !n.contains("slow-lane")), "{first:?}");
        assert!(
            second[..3].iter().all(|n| !n.contains("slow-lane")),
            "{second:?}"
        );
        assert!(
            second[3..].iter().all(|n| n.contains("slow-lane")),
            "{second:?}"
        );
        assert_eq!(slow.demoted.load(Ordering::Relaxed), 1);
        assert_eq!(crowd.hogging.load(Ordering::Relaxed), 0);

        // Alone, a guest keeps the fast lane until its budget.
        let alone = rt.block_on(Demoting::new(work(8), slow.clone(), Arc::default()));
        assert!(alone.iter().all(|n| !n.contains("slow-lane")), "{alone:?}");
        assert_eq!(crowd.hogging.load(Ordering::Relaxed), 0);

        // With a signal from the guest's store, only polls that ended at an
        // epoch tick count: guests that compute and then wait for I/O do
        // not crowd the lane, however long they computed.
        let signalled = |polls: u32, epoch: bool, moved: Arc<Moved>| async move {
            let mut seen = Vec::new();
            for _ in 0..polls {
                busy(1);
                if epoch {
                    moved.epoch_yield();
                }
                seen.push(std::thread::current().name().unwrap_or("").to_string());
                tokio::task::yield_now().await;
            }
            seen
        };
        let (m1, m2) = (Arc::new(Moved::default()), Arc::new(Moved::default()));
        let (first, second) = rt.block_on(async {
            tokio::join!(
                Demoting::new(
                    signalled(8, false, m1.clone()),
                    slow.clone(),
                    Arc::default()
                )
                .signalling(m1.clone()),
                Demoting::new(
                    signalled(8, false, m2.clone()),
                    slow.clone(),
                    Arc::default()
                )
                .signalling(m2.clone()),
            )
        });
        assert!(
            first
                .iter()
                .chain(&second)
                .all(|n| !n.contains("slow-lane"))
        );
        let (m1, m2) = (Arc::new(Moved::default()), Arc::new(Moved::default()));
        let (_, second) = rt.block_on(async {
            tokio::join!(
                Demoting::new(signalled(8, true, m1.clone()), slow.clone(), Arc::default())
                    .signalling(m1.clone()),
                Demoting::new(signalled(8, true, m2.clone()), slow.clone(), Arc::default())
                    .signalling(m2.clone()),
            )
        });
        // Interrupted at three ticks: the second moves after its third poll.
        assert!(
            second[3..].iter().all(|n| n.contains("slow-lane")),
            "{second:?}"
        );
        // A short request interrupted at one tick (one may fall in its first
        // microseconds) never counts, however crowded the lane.
        let (m1, m2, m3) = (
            Arc::new(Moved::default()),
            Arc::new(Moved::default()),
            Arc::new(Moved::default()),
        );
        let (_, _, short) = rt.block_on(async {
            tokio::join!(
                Demoting::new(signalled(8, true, m1.clone()), slow.clone(), Arc::default())
                    .signalling(m1.clone()),
                Demoting::new(signalled(8, true, m2.clone()), slow.clone(), Arc::default())
                    .signalling(m2.clone()),
                Demoting::new(signalled(2, true, m3.clone()), slow.clone(), Arc::default())
                    .signalling(m3.clone()),
            )
        });
        assert!(short.iter().all(|n| !n.contains("slow-lane")), "{short:?}");
    }

    #[test]
    fn a_guest_over_its_budget_moves_to_the_slow_lane() {
        let lane = SlowLane::new().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let name = || std::thread::current().name().unwrap_or("").to_string();
        let work = |polls: u32| async move {
            let mut seen = Vec::new();
            for _ in 0..polls {
                busy(3);
                seen.push(name());
                tokio::task::yield_now().await;
            }
            seen
        };
        let slow = Lane {
            handle: lane.handle().unwrap(),
            budget: Duration::from_millis(20),
            demoted: Arc::new(AtomicU64::new(0)),
            crowd: Arc::new(Crowd::new(2)),
        };
        // Short work stays where it started.
        let seen = rt.block_on(Demoting::new(work(2), slow.clone(), Arc::default()));
        assert!(seen.iter().all(|n| !n.contains("slow-lane")), "{seen:?}");
        assert_eq!(slow.demoted.load(Ordering::Relaxed), 0);
        // Long work moves once it has used its budget.
        let seen = rt.block_on(Demoting::new(work(20), slow.clone(), Arc::default()));
        assert_eq!(slow.demoted.load(Ordering::Relaxed), 1);
        assert!(!seen[0].contains("slow-lane"), "{seen:?}");
        assert!(seen.last().unwrap().contains("slow-lane"), "{seen:?}");

        // A metered future: the lane reads the meter's charges (also once
        // the future runs on the slow lane, where the meter keeps charging).
        let meter = crate::meter::tests::meter(None);
        let metered = |polls| crate::meter::Metered::new(work(polls), meter.clone());
        let seen = rt.block_on(Demoting::metered(
            metered(2),
            slow.clone(),
            meter.clone(),
            Arc::default(),
        ));
        assert!(seen.iter().all(|n| !n.contains("slow-lane")), "{seen:?}");
        assert_eq!(slow.demoted.load(Ordering::Relaxed), 1);
        let before = meter.cpu_ns();
        let seen = rt.block_on(Demoting::metered(
            metered(20),
            slow.clone(),
            meter.clone(),
            Arc::default(),
        ));
        assert_eq!(slow.demoted.load(Ordering::Relaxed), 2);
        assert!(seen.last().unwrap().contains("slow-lane"), "{seen:?}");
        // 20 polls of 3 ms of CPU each, all charged wherever they ran.
        assert!(
            meter.cpu_ns() - before >= 60_000_000,
            "{}",
            meter.cpu_ns() - before
        );
    }
}
