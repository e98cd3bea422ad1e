//! What the node shows to the tools operators already use: Prometheus
//! metrics (`GET /v1/metrics`, or `/metrics` on `--metrics-listen`) and
//! OpenTelemetry traces (`otlp`).
//!
//! Per-function metrics are made from the usage ledger's records, in
//! batches on its writer thread: the request path takes no lock and makes
//! no allocation for them. Node gauges (queues, the bus, replication, the
//! process) are read when scraped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use verge_spec::{Outcome, Trigger, UsageRecord};

/// Upper bounds of the time histograms (wall and CPU), seconds: fine
/// below a millisecond, where most of Verge's functions answer.
const TIME_BUCKETS: [f64; 12] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0, 30.0,
];
/// The same bounds as the text of the `le` label.
const TIME_LE: [&str; 13] = [
    "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.05", "0.25", "1.0",
    "5.0", "30.0", "+Inf",
];
/// Upper bounds of the peak memory histogram, bytes (256 KiB to 1 GiB).
const MEMORY_BUCKETS: [f64; 7] = [
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
    268_435_456.0,
    1_073_741_824.0,
];
const MEMORY_LE: [&str; 8] = [
    "262144.0",
    "1048576.0",
    "4194304.0",
    "16777216.0",
    "67108864.0",
    "268435456.0",
    "1073741824.0",
    "+Inf",
];
/// Upper bounds of the job queue wait histogram, seconds.
const QUEUE_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0,
];

/// A histogram's counts per bucket (the last one +Inf), sum and count.
#[derive(Debug, Clone)]
struct Hist {
    counts: Vec<u64>,
    sum: f64,
}

impl Hist {
    fn new(bounds: &[f64]) -> Self {
        Self {
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    fn observe(&mut self, bounds: &[f64], v: f64) {
        let i = bounds.partition_point(|b| *b < v);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum += v;
    }

    fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Buckets as the encoder takes them: (upper bound, count in it).
    fn buckets(&self, bounds: &[f64]) -> Vec<(f64, u64)> {
        bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(self.counts.iter().copied())
            .collect()
    }
}

/// What one version of a function did since the node started.
#[derive(Debug, Clone)]
struct VersionStats {
    outcomes: [u64; Outcome::ALL.len()],
    cold: u64,
    demoted: u64,
    request_bytes: u64,
    response_bytes: u64,
    outbound_requests: u64,
    wall: Hist,
    cpu: Hist,
    memory: Hist,
}

impl VersionStats {
    fn new() -> Self {
        Self {
            outcomes: [0; Outcome::ALL.len()],
            cold: 0,
            demoted: 0,
            request_bytes: 0,
            response_bytes: 0,
            outbound_requests: 0,
            wall: Hist::new(&TIME_BUCKETS),
            cpu: Hist::new(&TIME_BUCKETS),
            memory: Hist::new(&MEMORY_BUCKETS),
        }
    }

    fn add(&mut self, r: &UsageRecord) {
        if let Some(i) = Outcome::ALL.iter().position(|o| *o == r.outcome) {
            self.outcomes[i] += 1;
        }
        self.cold += u64::from(r.cold);
        self.demoted += u64::from(r.demoted);
        self.request_bytes += r.request_bytes;
        self.response_bytes += r.response_bytes;
        self.outbound_requests += u64::from(r.outbound_requests);
        // Refusals never ran: their wait is not the function's time.
        if !matches!(r.outcome, Outcome::Capacity | Outcome::RequestTooLarge) {
            self.wall.observe(&TIME_BUCKETS, r.wall_us as f64 / 1e6);
            self.cpu.observe(&TIME_BUCKETS, r.cpu_us as f64 / 1e6);
            self.memory
                .observe(&MEMORY_BUCKETS, r.peak_memory_bytes as f64);
        }
    }
}

/// Jobs (event deliveries, async invocations, schedules) by function.
#[derive(Debug, Clone)]
struct JobStats {
    /// Attempts by outcome: succeeded, failed.
    succeeded: u64,
    failed: u64,
    queue_wait: Hist,
}

/// How a code load went, by where the code came from.
#[derive(Debug, Clone)]
struct LoadStats {
    seconds: Hist,
}

/// The node's counters and per-function statistics, shared by the
/// ledger's observer, the deploy path and the scrape.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// By function, then version.
    functions: Mutex<HashMap<String, HashMap<u64, VersionStats>>>,
    jobs: Mutex<HashMap<String, JobStats>>,
    /// By source (`compiled`, `cached`).
    loads: Mutex<HashMap<&'static str, LoadStats>>,
    /// Jobs dead-lettered, by function.
    dead_letters: Mutex<HashMap<String, u64>>,
    /// Records observed.
    pub records: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Metrics {
    /// Adds a batch of the ledger's records.
    pub(crate) fn observe(&self, batch: &[UsageRecord]) {
        {
            let mut functions = lock(&self.functions);
            for r in batch {
                let versions = match functions.get_mut(r.function.as_str()) {
                    Some(v) => v,
                    None => functions.entry(r.function.clone()).or_default(),
                };
                versions
                    .entry(r.version)
                    .or_insert_with(VersionStats::new)
                    .add(r);
            }
        }
        let mut jobs = None;
        for r in batch
            .iter()
            .filter(|r| r.timings.trigger != Trigger::Http && r.trace.is_some())
        {
            let jobs = jobs.get_or_insert_with(|| lock(&self.jobs));
            let stats = match jobs.get_mut(r.function.as_str()) {
                Some(s) => s,
                None => jobs.entry(r.function.clone()).or_insert_with(|| JobStats {
                    succeeded: 0,
                    failed: 0,
                    queue_wait: Hist::new(&QUEUE_BUCKETS),
                }),
            };
            if r.outcome.is_failure() || r.status >= 300 {
                stats.failed += 1;
            } else {
                stats.succeeded += 1;
            }
            stats
                .queue_wait
                .observe(&QUEUE_BUCKETS, r.timings.queue_wait_us as f64 / 1e6);
        }
        self.records
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
    }

    /// A version's code loaded (`compiled` or `cached`) in `took`.
    pub(crate) fn code_loaded(&self, source: &'static str, took: std::time::Duration) {
        lock(&self.loads)
            .entry(source)
            .or_insert_with(|| LoadStats {
                seconds: Hist::new(&TIME_BUCKETS),
            })
            .seconds
            .observe(&TIME_BUCKETS, took.as_secs_f64());
    }

    /// A job of `function` went to the dead letters.
    pub(crate) fn dead_lettered(&self, function: &str) {
        *lock(&self.dead_letters)
            .entry(function.to_string())
            .or_default() += 1;
    }

    /// Forgets the series of removed versions of a function.
    pub(crate) fn forget_versions(&self, function: &str, versions: &[u64]) {
        if let Some(by_version) = lock(&self.functions).get_mut(function) {
            for v in versions {
                by_version.remove(v);
            }
        }
    }

    /// Forgets a removed function's series.
    pub(crate) fn forget(&self, function: &str) {
        lock(&self.functions).remove(function);
        lock(&self.jobs).remove(function);
    }
}

/// Node gauges and counters read at scrape time.
#[derive(Debug, Default, Clone)]
pub(crate) struct NodeSnapshot {
    pub node: String,
    pub functions: usize,
    pub running: usize,
    pub queued: usize,
    /// Waiting for admission, by function and version.
    pub waiting: Vec<(String, u64, usize)>,
    pub host: Option<verge_host::HostStats>,
    /// Jobs queued or running on the bus.
    pub jobs_depth: Option<u64>,
    pub ledger_dropped: u64,
    /// Key-value replication: per replica, (name, entries behind, seconds
    /// since heard from).
    pub replicas: Vec<(String, u64, f64)>,
    pub kv_entries: Option<u64>,
    /// On a cluster: whether the link to NATS (or the core) is up.
    pub cluster_link_up: Option<bool>,
    pub spans: Option<crate::otlp::SpanCounts>,
    pub process: Process,
}

/// The process's own figures (Prometheus' `process_*` names).
#[derive(Debug, Default, Clone)]
pub(crate) struct Process {
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub threads: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

impl Process {
    /// Read from `/proc/self` (absent where there is none).
    pub(crate) fn read() -> Process {
        let mut p = Process::default();
        let page = rustix::param::page_size() as u64;
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
            let mut f = statm.split_whitespace();
            p.virtual_bytes = f
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .map(|v| v * page);
            p.resident_bytes = f
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .map(|v| v * page);
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command's closing parenthesis: state is 3,
            // utime 14, stime 15, num_threads 20, starttime 22.
            if let Some((_, rest)) = stat.rsplit_once(')') {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ticks = 100.0; // USER_HZ on every Linux Verge runs on
                let num = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
                if let (Some(u), Some(s)) = (num(14), num(15)) {
                    p.cpu_seconds = Some((u + s) as f64 / ticks);
                }
                p.threads = num(20);
                if let (Some(start), Some(boot)) = (num(22), boot_time()) {
                    p.start_time_seconds = Some(boot + start as f64 / ticks);
                }
            }
        }
        p.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        p
    }
}

fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<f64>().ok())
}

/// One scrape: the statistics and the snapshot, encoded.
#[derive(Debug)]
struct Scrape {
    metrics: Arc<Metrics>,
    node: NodeSnapshot,
}

type Labels<'a> = [(&'static str, &'a str); 1];

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(value).encode(encoder.encode_descriptor(
        name,
        help,
        None,
        MetricType::Counter,
    )?)
}

fn gauge<N>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<N>: EncodeMetric,
{
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl prometheus_client::collector::Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_functions(&mut e)?;
        self.encode_node(&mut e)
    }
}

impl Scrape {
    fn encode_functions(&self, e: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let jobs = lock(&self.metrics.jobs);
        {
            let mut m = e.encode_descriptor(
                "verge_job_attempts",
                "Attempts of jobs (event deliveries, async invocations, schedules) by result.",
                None,
                MetricType::Counter,
            )?;
            for (f, s) in jobs.iter() {
                for (result, n) in [("succeeded", s.succeeded), ("failed", s.failed)] {
                    let labels = [("function", f.as_str()), ("result", result)];
                    ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut m = e.encode_descriptor(
                "verge_job_queue_wait_seconds",
                "How long a job's attempt waited from when it was due to its start (delivery lag).",
                None,
                MetricType::Histogram,
            )?;
            for (f, s) in jobs.iter() {
                let labels: Labels = [("function", f.as_str())];
                m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                    s.queue_wait.sum,
                    s.queue_wait.count(),
                    &s.queue_wait.buckets(&QUEUE_BUCKETS),
                    None,
                )?;
            }
        }
        drop(jobs);
        {
            let dead = lock(&self.metrics.dead_letters);
            let mut m = e.encode_descriptor(
                "verge_dead_letters",
                "Jobs that used up their attempts or expired, by function.",
                None,
                MetricType::Counter,
            )?;
            for (f, n) in dead.iter() {
                let labels: Labels = [("function", f.as_str())];
                ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
            }
        }
        let loads = lock(&self.metrics.loads);
        let mut m = e.encode_descriptor(
            "verge_code_load_seconds",
            "Time to load a version's code, by where it came from (compiled, or cached compiled code).",
            None,
            MetricType::Histogram,
        )?;
        for (source, s) in loads.iter() {
            let labels: Labels = [("source", source)];
            m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                s.seconds.sum,
                s.seconds.count(),
                &s.seconds.buckets(&TIME_BUCKETS),
                None,
            )?;
        }
        Ok(())
    }

    fn encode_node(&self, e: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let n = &self.node;
        {
            let labels: Labels = [("node", n.node.as_str())];
            let mut m = e.encode_descriptor(
                "verge_node",
                "This node (its name as a label).",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(1i64).encode(m.encode_family(&labels)?)?;
        }
        gauge(
            e,
            "verge_functions",
            "Functions deployed.",
            n.functions as i64,
        )?;
        gauge(
            e,
            "verge_invocations_running",
            "Invocations holding an instance slot right now.",
            n.running as i64,
        )?;
        gauge(
            e,
            "verge_admission_queued",
            "Requests waiting for admission right now, all functions.",
            n.queued as i64,
        )?;
        if let Some(h) = n.host {
            counter(
                e,
                "verge_components_compiled",
                "Components compiled.",
                h.compiled,
            )?;
            counter(
                e,
                "verge_compile_cache_hits",
                "Components whose compiled code came from the on-disk cache.",
                h.cache_hits,
            )?;
            counter(
                e,
                "verge_components_optimized",
                "Baseline components whose optimized code replaced it.",
                h.optimized,
            )?;
            counter(
                e,
                "verge_slow_lane_demotions_node",
                "Invocations moved to the slow lane, all functions.",
                h.demoted,
            )?;
        }
        if let Some(d) = n.jobs_depth {
            gauge(
                e,
                "verge_jobs_queued",
                "Jobs (event deliveries, async invocations) queued or running on the event bus.",
                d as i64,
            )?;
        }
        counter(
            e,
            "verge_ledger_dropped_records",
            "Usage records dropped because the ledger's queue was full.",
            n.ledger_dropped,
        )?;
        if let Some(entries) = n.kv_entries {
            gauge(
                e,
                "verge_kv_entries",
                "Key-value entries in this node's replica.",
                entries as i64,
            )?;
        }
        {
            let mut m = e.encode_descriptor(
                "verge_kv_replication_backlog",
                "Key-value changes of this node a replica has not acknowledged.",
                None,
                MetricType::Gauge,
            )?;
            for (name, behind, _) in &n.replicas {
                let labels: Labels = [("replica", name.as_str())];
                ConstGauge::new(*behind as i64).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "verge_kv_replication_lag_seconds",
                "Seconds since a key-value replica was last heard from.",
                None,
                MetricType::Gauge,
            )?;
            for (name, _, age) in &n.replicas {
                let labels: Labels = [("replica", name.as_str())];
                ConstGauge::new(*age).encode(m.encode_family(&labels)?)?;
            }
        }
        if let Some(up) = n.cluster_link_up {
            gauge(
                e,
                "verge_cluster_link_up",
                "1 while this node's link to the cluster (NATS, or an edge's core) is up.",
                i64::from(up),
            )?;
        }
        if let Some(s) = n.spans {
            counter(
                e,
                "verge_trace_spans_exported",
                "Spans the OTLP collector accepted.",
                s.exported,
            )?;
            counter(
                e,
                "verge_trace_spans_dropped",
                "Spans dropped: the export queue was full (a slow or absent collector) or the collector refused them.",
                s.dropped,
            )?;
        }
        let p = &n.process;
        if let Some(v) = p.cpu_seconds {
            let m = e.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time of the process.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(v).encode(m)?;
        }
        if let Some(v) = p.resident_bytes {
            gauge(
                e,
                "process_resident_memory_bytes",
                "Resident memory.",
                v as i64,
            )?;
        }
        if let Some(v) = p.virtual_bytes {
            gauge(
                e,
                "process_virtual_memory_bytes",
                "Virtual memory.",
                v as i64,
            )?;
        }
        if let Some(v) = p.open_fds {
            gauge(e, "process_open_fds", "Open file descriptors.", v as i64)?;
        }
        if let Some(v) = p.threads {
            gauge(e, "process_threads", "Threads of the process.", v as i64)?;
        }
        if let Some(v) = p.start_time_seconds {
            gauge(
                e,
                "process_start_time_seconds",
                "Start time of the process, seconds since the epoch.",
                v,
            )?;
        }
        Ok(())
    }
}

/// The OpenMetrics text of a scrape: the per-version families written
/// directly (with 10,000 versions they are most of it: prometheus-client's
/// encoder took about 100 ms for them, this writer a fraction of that),
/// then the rest through prometheus-client, which ends the text.
pub(crate) fn encode(metrics: Arc<Metrics>, node: NodeSnapshot) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(64 << 10);
    write_versions(&mut out, &metrics, &node);
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape { metrics, node }));
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// Writes OpenMetrics samples of one family.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn start<'a>(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
        for line in [("HELP", help), ("TYPE", kind)] {
            out.push_str("# ");
            out.push_str(line.0);
            out.push(' ');
            out.push_str(name);
            out.push(' ');
            out.push_str(line.1);
            out.push('\n');
        }
        Family { out }
    }

    /// `name{labels[,extra]} value`
    fn sample(
        &mut self,
        name: &str,
        suffix: &str,
        labels: &str,
        extra: Option<(&str, &str)>,
        value: Value,
    ) {
        let o = &mut *self.out;
        o.push_str(name);
        o.push_str(suffix);
        o.push('{');
        o.push_str(labels);
        if let Some((k, v)) = extra {
            o.push(',');
            o.push_str(k);
            o.push_str("=\"");
            o.push_str(v);
            o.push('"');
        }
        o.push_str("} ");
        match value {
            Value::Int(n) => o.push_str(itoa::Buffer::new().format(n)),
            Value::Float(f) => o.push_str(ryu::Buffer::new().format(f)),
        }
        o.push('\n');
    }

    fn histogram(&mut self, name: &str, labels: &str, h: &Hist, le: &[&str]) {
        self.sample(name, "_sum", labels, None, Value::Float(h.sum));
        let mut cumulative = 0;
        for (count, bound) in h.counts.iter().zip(le) {
            cumulative += count;
            self.sample(
                name,
                "_bucket",
                labels,
                Some(("le", bound)),
                Value::Int(cumulative),
            );
        }
        self.sample(name, "_count", labels, None, Value::Int(cumulative));
    }
}

#[derive(Clone, Copy)]
enum Value {
    Int(u64),
    Float(f64),
}

/// The per-version families. Label values need no escaping: function
/// names are `[a-z0-9-]`, versions numbers, outcomes fixed words.
fn write_versions(out: &mut String, metrics: &Metrics, node: &NodeSnapshot) {
    let functions = lock(&metrics.functions);
    let mut versions: Vec<(String, &VersionStats)> = Vec::new();
    for (name, by_version) in functions.iter() {
        for (v, stats) in by_version {
            versions.push((format!("function=\"{name}\",version=\"{v}\""), stats));
        }
    }
    out.reserve(versions.len() * 3500);
    {
        let mut f = Family::start(
            out,
            "verge_invocations",
            "counter",
            "Invocations by function, version and outcome (capacity: refused with 503 before running; request_too_large: 413).",
        );
        for (labels, s) in &versions {
            for (i, o) in Outcome::ALL.iter().enumerate() {
                if s.outcomes[i] > 0 {
                    let n = Value::Int(s.outcomes[i]);
                    f.sample(
                        "verge_invocations",
                        "_total",
                        labels,
                        Some(("outcome", o.as_str())),
                        n,
                    );
                }
            }
        }
    }
    type Field = fn(&VersionStats) -> u64;
    let counters: [(&str, &str, Field); 5] = [
        (
            "verge_cold_starts",
            "Invocations that were the first of their loaded code.",
            |s| s.cold,
        ),
        (
            "verge_slow_lane_demotions",
            "Invocations moved to the slow lane for using up the fast lane's CPU budget.",
            |s| s.demoted,
        ),
        (
            "verge_request_bytes",
            "Bytes of request bodies the guests read.",
            |s| s.request_bytes,
        ),
        (
            "verge_response_bytes",
            "Bytes of response bodies the guests sent.",
            |s| s.response_bytes,
        ),
        (
            "verge_outbound_requests",
            "Outbound HTTP requests the guests sent.",
            |s| s.outbound_requests,
        ),
    ];
    // A counter's series appears at its first increment.
    for (name, help, field) in counters {
        let mut f = Family::start(out, name, "counter", help);
        for (labels, s) in &versions {
            let n = field(s);
            if n > 0 {
                f.sample(name, "_total", labels, None, Value::Int(n));
            }
        }
    }
    type HistField = fn(&VersionStats) -> &Hist;
    let histograms: [(&str, &str, &[&str], HistField); 3] = [
        (
            "verge_invocation_duration_seconds",
            "Wall time of invocations, from instantiation to the guest's return.",
            &TIME_LE,
            |s| &s.wall,
        ),
        (
            "verge_invocation_cpu_seconds",
            "CPU time of invocations.",
            &TIME_LE,
            |s| &s.cpu,
        ),
        (
            "verge_invocation_peak_memory_bytes",
            "Largest linear memory an invocation held.",
            &MEMORY_LE,
            |s| &s.memory,
        ),
    ];
    for (name, help, le, field) in histograms {
        let mut f = Family::start(out, name, "histogram", help);
        for (labels, s) in &versions {
            f.histogram(name, labels, field(s), le);
        }
    }
    drop(functions);
    let mut f = Family::start(
        out,
        "verge_admission_waiting",
        "gauge",
        "Requests waiting for a concurrency slot right now, by function and version.",
    );
    for (function, v, n) in &node.waiting {
        let labels = format!("function=\"{function}\",version=\"{v}\"");
        f.sample(
            "verge_admission_waiting",
            "",
            &labels,
            None,
            Value::Int(*n as u64),
        );
    }
}

/// The content type of [`encode`]'s text.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the node is doing now, for a scrape (the parts that touch SQLite
/// on a blocking thread).
pub(crate) async fn snapshot(state: &Arc<crate::state::AppState>) -> NodeSnapshot {
    let s = state.clone();
    let (jobs_depth, kv) =
        crate::api::blocking(move || Ok((s.bus.depth().ok(), s.kv.stats().ok())))
            .await
            .unwrap_or((None, None));
    let now_ms = verge_bus::now_ms().max(0) as u64;
    let (replicas, kv_entries) = match kv {
        Some(k) => (
            k.replicas
                .iter()
                .map(|r| {
                    (
                        r.name.clone().unwrap_or_else(|| format!("{:016x}", r.node)),
                        k.seq.saturating_sub(r.acked_seq),
                        now_ms.saturating_sub(r.last_seen_ms) as f64 / 1e3,
                    )
                })
                .collect(),
            Some(k.entries),
        ),
        None => (Vec::new(), None),
    };
    NodeSnapshot {
        node: state.node_name.clone(),
        functions: state.function_count(),
        running: state.admission.running(),
        queued: state.admission.queued(),
        waiting: state.waiting(),
        host: Some(state.host.stats()),
        jobs_depth,
        ledger_dropped: state.ledger.dropped(),
        replicas,
        kv_entries,
        cluster_link_up: state.cluster.as_ref().map(|c| c.down_since().is_none()),
        spans: state.spans.as_ref().map(|s| s.counts()),
        process: Process::read(),
    }
}

/// `GET /v1/metrics` (a token with the `metrics` scope, or an admin
/// token), and `GET /metrics` on `--metrics-listen`.
pub(crate) async fn handler(
    axum::extract::State(state): axum::extract::State<Arc<crate::state::AppState>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let node = snapshot(&state).await;
    match encode(state.metrics.clone(), node) {
        Ok(text) => ([(http::header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => crate::error::ApiError::Internal(format!("could not encode the metrics: {e}"))
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(function: &str, outcome: Outcome, wall_us: u64) -> UsageRecord {
        UsageRecord {
            function: function.into(),
            version: 1,
            outcome,
            wall_us,
            cpu_us: wall_us / 2,
            peak_memory_bytes: 1 << 20,
            cold: wall_us > 1000,
            ..UsageRecord::default()
        }
    }

    #[test]
    fn records_become_counters_and_histograms() {
        let m = Arc::new(Metrics::default());
        m.observe(&[
            record("a", Outcome::Ok, 50),
            record("a", Outcome::Ok, 2_000),
            record("a", Outcome::Trap, 300),
            record("a", Outcome::Capacity, 9_000_000),
            record("b", Outcome::Ok, 10),
        ]);
        m.code_loaded("compiled", std::time::Duration::from_millis(30));
        let text = encode(
            m.clone(),
            NodeSnapshot {
                node: "n1".into(),
                waiting: vec![("a".into(), 1, 3)],
                ..NodeSnapshot::default()
            },
        )
        .unwrap();
        for line in [
            r#"verge_invocations_total{function="a",version="1",outcome="ok"} 2"#,
            r#"verge_invocations_total{function="a",version="1",outcome="trap"} 1"#,
            r#"verge_invocations_total{function="a",version="1",outcome="capacity"} 1"#,
            r#"verge_invocations_total{function="b",version="1",outcome="ok"} 1"#,
            r#"verge_cold_starts_total{function="a",version="1"} 2"#,
            // The refusal is not in the time histograms.
            r#"verge_invocation_duration_seconds_count{function="a",version="1"} 3"#,
            r#"verge_invocation_duration_seconds_bucket{function="a",version="1",le="0.0001"} 1"#,
            r#"verge_invocation_duration_seconds_bucket{function="a",version="1",le="0.0005"} 2"#,
            r#"verge_invocation_duration_seconds_bucket{function="a",version="1",le="+Inf"} 3"#,
            r#"verge_admission_waiting{function="a",version="1"} 3"#,
            r#"verge_code_load_seconds_count{source="compiled"} 1"#,
            r#"verge_node{node="n1"} 1"#,
            "# EOF",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // Removed versions and functions take their series along.
        m.forget_versions("a", &[1]);
        m.forget("b");
        let text = encode(m, NodeSnapshot::default()).unwrap();
        assert!(!text.contains(r#"function="a""#), "{text}");
        assert!(!text.contains(r#"function="b""#), "{text}");
    }
}
