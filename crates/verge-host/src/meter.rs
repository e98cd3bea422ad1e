//! Metering of one invocation: wall time, CPU time actually spent polling the
//! guest (thread CPU time around every poll), peak linear memory (from the
//! resource limiter), request and response bytes. The record is emitted once,
//! when the last holder (the invocation task or the response body) lets go.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use verge_spec::UsageRecord;

/// Where finished usage records go.
pub type UsageSink = Arc<dyn Fn(UsageRecord) + Send + Sync>;

/// The shared meter of one invocation.
pub(crate) struct Meter {
    /// Taken by the one who emits the record.
    sink: Mutex<Option<UsageSink>>,
    record: Mutex<UsageRecord>,
    cpu_ns: AtomicU64,
    pub(crate) request_bytes: AtomicU64,
    pub(crate) response_bytes: AtomicU64,
}

impl Meter {
    pub(crate) fn new(sink: Option<UsageSink>, record: UsageRecord) -> Arc<Self> {
        Arc::new(Self {
            sink: Mutex::new(sink),
            record: Mutex::new(record),
            cpu_ns: AtomicU64::new(0),
            request_bytes: AtomicU64::new(0),
            response_bytes: AtomicU64::new(0),
        })
    }

    /// CPU time charged so far, in nanoseconds.
    pub(crate) fn cpu_ns(&self) -> u64 {
        self.cpu_ns.load(Ordering::Relaxed)
    }

    /// Updates the record (outcome, status, wall time, peak memory).
    pub(crate) fn update(&self, f: impl FnOnce(&mut UsageRecord)) {
        f(&mut self.record.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

impl Meter {
    /// Emits the record now, not when the last holder lets go (then
    /// nothing more is emitted): for an invocation its caller has stopped,
    /// whose task may be dropped only later.
    pub(crate) fn emit_now(&self) {
        let sink = self
            .sink
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(sink) = sink {
            self.emit(&sink);
        }
    }

    fn emit(&self, sink: &UsageSink) {
        let mut record = self
            .record
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        record.cpu_us = self.cpu_ns.load(Ordering::Relaxed) / 1000;
        record.request_bytes = self.request_bytes.load(Ordering::Relaxed);
        record.response_bytes = self.response_bytes.load(Ordering::Relaxed);
        sink(record);
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        let sink = self
            .sink
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(sink) = sink {
            self.emit(&sink);
        }
    }
}

/// CPU time consumed so far by the calling thread, in nanoseconds.
pub(crate) fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// A future whose every poll is charged to `meter` in thread CPU time.
pub(crate) struct Metered<F> {
    inner: Pin<Box<F>>,
    meter: Arc<Meter>,
}

impl<F> Metered<F> {
    pub(crate) fn new(inner: F, meter: Arc<Meter>) -> Self {
        Self {
            inner: Box::pin(inner),
            meter,
        }
    }
}

impl<F: Future> Future for Metered<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let start = thread_cpu_ns();
        let result = self.inner.as_mut().poll(cx);
        let spent = thread_cpu_ns().saturating_sub(start);
        self.meter.cpu_ns.fetch_add(spent, Ordering::Relaxed);
        result
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use verge_spec::Outcome;

    #[test]
    fn thread_cpu_time_moves_with_work() {
        let a = thread_cpu_ns();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        assert!(thread_cpu_ns() > a, "{x}");
    }

    /// A meter with an empty record (tests).
    pub(crate) fn meter(sink: Option<UsageSink>) -> Arc<Meter> {
        Meter::new(
            sink,
            UsageRecord {
                invocation_id: "i".into(),
                function: "f".into(),
                version: 1,
                started_at_ms: 0,
                wall_us: 0,
                cpu_us: 0,
                peak_memory_bytes: 0,
                memory_limit_bytes: 0,
                request_bytes: 0,
                response_bytes: 0,
                status: 0,
                outcome: Outcome::NoResponse,
                cold: false,
                stdout: None,
                stderr: None,
                error: None,
                ..UsageRecord::default()
            },
        )
    }

    #[test]
    fn emits_once_when_the_last_holder_drops() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let sink: UsageSink = Arc::new(move |r| s.lock().unwrap().push(r));
        let meter = meter(Some(sink));
        let other = meter.clone();
        meter.response_bytes.fetch_add(5, Ordering::Relaxed);
        meter.update(|r| r.outcome = Outcome::Ok);
        drop(meter);
        assert!(seen.lock().unwrap().is_empty());
        drop(other);
        let got = seen.lock().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].response_bytes, 5);
        assert_eq!(got[0].outcome, Outcome::Ok);
    }
}
