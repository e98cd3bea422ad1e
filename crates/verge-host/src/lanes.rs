//! Two lanes for guests. Every invocation starts on the runtime of its
//! caller (the node's, shared with the HTTP front); one that has kept the CPU
//! for more than a budget moves to the slow lane: a runtime of its own whose
//! threads run at a lower priority (nice 5: a third of a normal thread's
//! weight). Short requests keep the cores; long-running and spinning guests
//! get what is left (on an idle machine, all of it). Nice 19 served
//! neighbours marginally better but let any busy process on the machine
//! starve a demoted guest into its time limit.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Where and when invocations move.
#[derive(Clone)]
pub(crate) struct Lane {
    pub handle: Handle,
    pub budget: Duration,
    /// Invocations moved so far.
    pub demoted: Arc<AtomicU64>,
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
}

impl<F: Future> Demoting<F> {
    pub(crate) fn new(inner: F, slow: Lane) -> Self {
        Self {
            lane: Place::Fast(Box::pin(inner)),
            used_ns: 0,
            slow,
            clock: Clock::Own,
        }
    }

    /// As [`Demoting::new`] for a future that charges every poll to `meter`
    /// (a `Metered`): its charges are the CPU time used.
    pub(crate) fn metered(inner: F, slow: Lane, meter: Arc<Meter>) -> Self {
        let mut d = Self::new(inner, slow);
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
                    this.used_ns += this.clock.now().saturating_sub(start);
                    if result.is_ready()
                        || this.used_ns
                            <= u64::try_from(this.slow.budget.as_nanos()).unwrap_or(u64::MAX)
                    {
                        return result;
                    }
                    let Place::Fast(f) = std::mem::replace(&mut this.lane, Place::Gone) else {
                        unreachable!("matched above")
                    };
                    this.slow.demoted.fetch_add(1, Ordering::Relaxed);
                    this.lane = Place::Slow(this.slow.handle.spawn(f));
                }
                Place::Slow(h) => {
                    return match Pin::new(h).poll(cx) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(Ok(v)) => Poll::Ready(v),
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
        };
        // Short work stays where it started.
        let seen = rt.block_on(Demoting::new(work(2), slow.clone()));
        assert!(seen.iter().all(|n| !n.contains("slow-lane")), "{seen:?}");
        assert_eq!(slow.demoted.load(Ordering::Relaxed), 0);
        // Long work moves once it has used its budget.
        let seen = rt.block_on(Demoting::new(work(20), slow.clone()));
        assert_eq!(slow.demoted.load(Ordering::Relaxed), 1);
        assert!(!seen[0].contains("slow-lane"), "{seen:?}");
        assert!(seen.last().unwrap().contains("slow-lane"), "{seen:?}");

        // A metered future: the lane reads the meter's charges (also once
        // the future runs on the slow lane, where the meter keeps charging).
        let meter = crate::meter::tests::meter(None);
        let metered = |polls| crate::meter::Metered::new(work(polls), meter.clone());
        let seen = rt.block_on(Demoting::metered(metered(2), slow.clone(), meter.clone()));
        assert!(seen.iter().all(|n| !n.contains("slow-lane")), "{seen:?}");
        assert_eq!(slow.demoted.load(Ordering::Relaxed), 1);
        let before = meter.cpu_ns();
        let seen = rt.block_on(Demoting::metered(metered(20), slow.clone(), meter.clone()));
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
