//! Traces exported with OTLP over HTTP (protobuf), `verge up --otlp-endpoint`.
//!
//! Spans are made from the ledger's records on its writer thread (one per
//! invocation, with children for loading code, admission and a job's
//! queue wait), queued in a bounded channel and posted in batches by one
//! task. Nothing waits for the collector: when it is slow or gone, the
//! queue fills and further spans are dropped and counted
//! (`verge_trace_spans_dropped_total`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;
use rand::RngCore;
use verge_spec::{Trigger, UsageRecord};

/// Spans waiting for export at most; past it they are dropped.
pub const QUEUE: usize = 8192;
/// Spans per export request at most.
pub const BATCH: usize = 512;
/// The longest a span waits for its batch to fill.
pub const BATCH_DELAY: Duration = Duration::from_secs(1);
/// The longest one export request may take.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Spans exported and dropped since the node started.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SpanCounts {
    pub exported: u64,
    pub dropped: u64,
}

/// The exporter's sending side (the ledger's observer holds it). Spans
/// travel in the ledger's batches: one wake-up of the export task per
/// batch, not per span.
pub(crate) struct Exporter {
    tx: tokio::sync::mpsc::UnboundedSender<Vec<Span>>,
    counts: Arc<Counts>,
    node: String,
}

#[derive(Default)]
struct Counts {
    exported: AtomicU64,
    dropped: AtomicU64,
    /// Spans sent to the export task and not yet exported or dropped
    /// (bounded by [`QUEUE`]).
    queued: std::sync::atomic::AtomicUsize,
}

/// The URL spans are posted to: an endpoint without a path gets OTLP's
/// `/v1/traces` (as `OTEL_EXPORTER_OTLP_ENDPOINT` does); one with a path is
/// used as given.
pub fn traces_url(endpoint: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(endpoint).map_err(|e| {
        format!("--otlp-endpoint {endpoint:?} is not a URL ({e}); give one such as http://127.0.0.1:4318")
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "--otlp-endpoint {endpoint:?} must be an http:// or https:// URL (OTLP over HTTP)"
        ));
    }
    Ok(if url.path() == "/" || url.path().is_empty() {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    } else {
        endpoint.to_string()
    })
}

impl Exporter {
    /// Starts the export task (on the current runtime) posting to `url`.
    pub(crate) fn start(url: String, node: String) -> Exporter {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let counts = Arc::new(Counts::default());
        tokio::spawn(export_loop(url, node.clone(), rx, counts.clone()));
        Exporter { tx, counts, node }
    }

    pub(crate) fn counts(&self) -> SpanCounts {
        SpanCounts {
            exported: self.counts.exported.load(Ordering::Relaxed),
            dropped: self.counts.dropped.load(Ordering::Relaxed),
        }
    }

    /// Queues the spans of a batch of records; never waits. Past
    /// [`QUEUE`] spans waiting, the rest are dropped (and counted).
    pub(crate) fn observe(&self, batch: &[UsageRecord]) {
        let room = QUEUE.saturating_sub(self.counts.queued.load(Ordering::Acquire));
        let mut out = Vec::with_capacity(batch.len().min(room));
        let mut dropped = 0u64;
        for r in batch {
            if out.len() >= room {
                dropped += spans(r, &self.node).len() as u64;
                continue;
            }
            out.extend(spans(r, &self.node));
        }
        if out.len() > room {
            dropped += (out.len() - room) as u64;
            out.truncate(room);
        }
        if !out.is_empty() {
            let n = out.len();
            self.counts.queued.fetch_add(n, Ordering::AcqRel);
            if self.tx.send(out).is_err() {
                self.counts.queued.fetch_sub(n, Ordering::AcqRel);
                dropped += n as u64;
            }
        }
        if dropped > 0 {
            self.counts.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
    }
}

fn attr(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
    }
}

fn text(key: &str, value: impl Into<String>) -> KeyValue {
    attr(key, any_value::Value::StringValue(value.into()))
}

fn int(key: &str, value: u64) -> KeyValue {
    attr(
        key,
        any_value::Value::IntValue(i64::try_from(value).unwrap_or(i64::MAX)),
    )
}

fn new_span_id() -> Vec<u8> {
    let mut id = [0u8; 8];
    rand::rng().fill_bytes(&mut id);
    if id == [0; 8] {
        id[7] = 1;
    }
    id.to_vec()
}

/// The spans of one invocation's record: the invocation, and children for
/// what came before its guest ran.
pub(crate) fn spans(r: &UsageRecord, node: &str) -> Vec<Span> {
    // Not sampled (`--trace-sample`, or a parent's flag): not exported.
    let Some(trace) = r.trace.filter(|t| t.flags & 1 == 1) else {
        return Vec::new();
    };
    let t = &r.timings;
    let started_ns = u64::try_from(r.started_at_ms)
        .unwrap_or(0)
        .saturating_mul(1_000_000);
    let refused = matches!(
        r.outcome,
        verge_spec::Outcome::Capacity | verge_spec::Outcome::RequestTooLarge
    );
    // A refusal's record starts when it was refused and its wall time is
    // its wait; a run's starts when its guest did, after loading and
    // admission.
    let (begin, end) = if refused {
        let begin = started_ns.saturating_sub(r.wall_us * 1000);
        (begin, started_ns)
    } else {
        let before = (t.load_us + t.admission_wait_us) * 1000;
        (
            started_ns.saturating_sub(before),
            started_ns + r.wall_us * 1000,
        )
    };
    let failed = r.outcome.is_failure();
    let mut attributes = vec![
        text("faas.invocation_id", r.invocation_id.clone()),
        text("faas.name", r.function.clone()),
        text("faas.version", r.version.to_string()),
        text("faas.trigger", t.trigger.as_str()),
        attr("faas.coldstart", any_value::Value::BoolValue(r.cold)),
        text("verge.outcome", r.outcome.as_str()),
        text("verge.node", node),
        int("http.response.status_code", u64::from(r.status)),
        int("verge.wall_us", r.wall_us),
        int("verge.cpu_us", r.cpu_us),
        int("verge.peak_memory_bytes", r.peak_memory_bytes),
    ];
    if let Some(p) = &r.parent_id {
        attributes.push(text("verge.parent_invocation_id", p.clone()));
    }
    let kind = match t.trigger {
        Trigger::Http => SpanKind::Server,
        _ => SpanKind::Consumer,
    };
    let invocation = Span {
        trace_id: trace.trace_id.to_vec(),
        span_id: trace.span_id.to_vec(),
        parent_span_id: trace.parent.map(|p| p.to_vec()).unwrap_or_default(),
        flags: u32::from(trace.flags),
        name: r.function.clone(),
        kind: kind as i32,
        start_time_unix_nano: begin,
        end_time_unix_nano: end.max(begin),
        attributes,
        status: Some(Status {
            code: if failed {
                StatusCode::Error
            } else {
                StatusCode::Unset
            } as i32,
            message: if failed {
                r.error.clone().unwrap_or_else(|| r.outcome.as_str().into())
            } else {
                String::new()
            },
        }),
        ..Span::default()
    };
    let child = |name: &str, from: u64, to: u64| Span {
        trace_id: trace.trace_id.to_vec(),
        span_id: new_span_id(),
        parent_span_id: trace.span_id.to_vec(),
        flags: u32::from(trace.flags),
        name: name.to_string(),
        kind: SpanKind::Internal as i32,
        start_time_unix_nano: from,
        end_time_unix_nano: to,
        attributes: vec![text("faas.invocation_id", r.invocation_id.clone())],
        ..Span::default()
    };
    let mut out = vec![invocation];
    if t.queue_wait_us > 0 {
        out.push(child(
            "queue wait",
            begin.saturating_sub(t.queue_wait_us * 1000),
            begin,
        ));
    }
    if t.load_us > 0 {
        out.push(child("load code", begin, begin + t.load_us * 1000));
    }
    if t.admission_wait_us > 0 && !refused {
        let from = begin + t.load_us * 1000;
        out.push(child(
            "admission wait",
            from,
            from + t.admission_wait_us * 1000,
        ));
    }
    out
}

/// The export request of a batch.
fn request(node: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    text("service.name", "verge"),
                    text("service.instance.id", node),
                    text("service.version", env!("CARGO_PKG_VERSION")),
                ],
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "verge".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..InstrumentationScope::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

async fn export_loop(
    url: String,
    node: String,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<Span>>,
    counts: Arc<Counts>,
) {
    let client = match reqwest::Client::builder().timeout(EXPORT_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "could not make the OTLP client; spans are dropped");
            return;
        }
    };
    let mut failures = 0u64;
    let mut pending: std::collections::VecDeque<Span> = Default::default();
    loop {
        if pending.is_empty() {
            let Some(first) = rx.recv().await else {
                return;
            };
            pending.extend(first);
        }
        // Wait for a full batch, at most BATCH_DELAY.
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while pending.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(more)) => pending.extend(more),
                Ok(None) | Err(_) => break,
            }
        }
        let batch: Vec<Span> = pending.drain(..pending.len().min(BATCH)).collect();
        let n = batch.len() as u64;
        counts.queued.fetch_sub(batch.len(), Ordering::AcqRel);
        let body = request(&node, batch).encode_to_vec();
        let sent = client
            .post(&url)
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                counts.exported.fetch_add(n, Ordering::Relaxed);
                if failures > 0 {
                    tracing::info!(%url, "the OTLP collector accepts spans again");
                }
                failures = 0;
            }
            other => {
                counts.dropped.fetch_add(n, Ordering::Relaxed);
                failures += 1;
                // One line per run of failures that doubles: a collector
                // that is gone does not fill the log.
                if failures.is_power_of_two() {
                    let why = match other {
                        Ok(r) => format!("it answered {}", r.status()),
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!(%url, error = %why, failures, spans = n, "could not export spans; they are dropped (verge_trace_spans_dropped_total)");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_the_traces_path() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318").unwrap(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/").unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/custom/traces").unwrap(),
            "http://c:4318/custom/traces"
        );
        assert!(traces_url("grpc://c:4317").is_err());
        assert!(traces_url("c:4318").is_err());
    }

    #[tokio::test]
    async fn spans_for_a_collector_that_is_gone_are_dropped_and_counted() {
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let exporter = Exporter::start(format!("http://127.0.0.1:{port}/v1/traces"), "n".into());
        let record = UsageRecord {
            function: "f".into(),
            trace: Some(verge_spec::InvocationTrace::start(None, [9; 24])),
            ..UsageRecord::default()
        };
        exporter.observe(&vec![record; 10]);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while exporter.counts().dropped < 10 {
            assert!(std::time::Instant::now() < deadline, "never dropped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(exporter.counts().exported, 0);
        // Past the queue's bound, spans are dropped at once, never waited for.
        let many = vec![
            UsageRecord {
                function: "f".into(),
                trace: Some(verge_spec::InvocationTrace::start(None, [9; 24])),
                ..UsageRecord::default()
            };
            QUEUE + 100
        ];
        exporter.observe(&many);
        assert!(exporter.counts().dropped >= 10 + 100);
    }

    #[test]
    fn a_queued_job_has_its_waits_as_children() {
        let parent = verge_spec::SpanContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        let trace = verge_spec::InvocationTrace::start(parent, [3; 24]);
        let r = UsageRecord {
            function: "f".into(),
            invocation_id: "i".into(),
            started_at_ms: 1_000,
            wall_us: 500,
            outcome: verge_spec::Outcome::Trap,
            trace: Some(trace),
            timings: verge_spec::Timings {
                admission_wait_us: 20,
                load_us: 100,
                queue_wait_us: 3_000,
                trigger: Trigger::Other,
            },
            ..UsageRecord::default()
        };
        let spans = spans(&r, "n");
        assert_eq!(spans.len(), 4);
        let inv = &spans[0];
        assert_eq!(inv.parent_span_id, parent.unwrap().span_id.to_vec());
        assert_eq!(inv.kind, SpanKind::Consumer as i32);
        assert_eq!(inv.status.as_ref().unwrap().code, StatusCode::Error as i32);
        assert_eq!(inv.start_time_unix_nano, 1_000_000_000 - 120_000);
        assert_eq!(inv.end_time_unix_nano, 1_000_000_000 + 500_000);
        for child in &spans[1..] {
            assert_eq!(child.parent_span_id, trace.span_id.to_vec());
            assert_eq!(child.trace_id, trace.trace_id.to_vec());
        }
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["f", "queue wait", "load code", "admission wait"]);
        // Not sampled: no spans.
        let mut unsampled = trace;
        unsampled.flags = 0;
        assert!(
            super::spans(
                &UsageRecord {
                    trace: Some(unsampled),
                    ..r.clone()
                },
                "n"
            )
            .is_empty()
        );
        // Without a trace there are no spans.
        assert!(super::spans(&UsageRecord { trace: None, ..r }, "n").is_empty());
    }
}
