//! One invocation: the per-request store state, the capabilities a guest
//! gets (and those it is refused), and the request/response plumbing.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::BodyExt;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use verge_spec::{CloudEvent, Outcome, UsageRecord};

use crate::meter::{Meter, Metered};
use crate::{BodyError, Capture, EventSink, Function, Host, InvokeError, ResponseBody};

/// The data of one invocation's store.
pub(crate) struct GuestState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: Outbound,
    limits: GuestLimits,
    kv: crate::keyvalue::KvCtx,
    /// The version's `--config` values and granted secrets, as of the
    /// invocation's start.
    config: Arc<wasmtime_wasi_config::WasiConfigVariables>,
}

impl GuestState {
    pub(crate) fn kv_view(&mut self) -> crate::keyvalue::KvView<'_> {
        crate::keyvalue::KvView::new(&self.kv, &mut self.table)
    }

    pub(crate) fn config_view(&mut self) -> wasmtime_wasi_config::WasiConfig<'_> {
        wasmtime_wasi_config::WasiConfig::new(&self.config)
    }
}

/// No configuration: what most invocations share.
static NO_CONFIG: std::sync::LazyLock<Arc<wasmtime_wasi_config::WasiConfigVariables>> =
    std::sync::LazyLock::new(Arc::default);

/// Memory accounting of one instance: refuses growth past the limit (the
/// guest sees a failed `memory.grow`), remembers that it did, and tracks the
/// peak of all its linear memories together.
pub(crate) struct GuestLimits {
    limit: usize,
    total: usize,
    /// Shared with the caller, which writes the record itself when it
    /// stops a guest that is still running (see `answer_by`).
    peak: Arc<AtomicU64>,
    hit: bool,
}

impl ResourceLimiter for GuestLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let next = self.total.saturating_sub(current).saturating_add(desired);
        if next > self.limit {
            self.hit = true;
            return Ok(false);
        }
        self.total = next;
        self.peak.fetch_max(next as u64, Ordering::Relaxed);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Elements a guest table may grow to (matches the pooling allocator's slots).
pub(crate) const MAX_TABLE_ELEMENTS: usize = 100_000;

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for GuestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// Outbound HTTP of a guest: requests to the events URL are events, and
/// requests to `NAME.fn.verge.internal` calls of function NAME, both handled
/// in process (no network); anything else goes out only as its version's
/// grants allow (`outbound`).
struct Outbound {
    stderr: Capture,
    function: String,
    version: u64,
    invocation_id: String,
    /// Hops of the event chain this invocation belongs to.
    hops: u32,
    /// This invocation's span: the parent of the events it emits, the
    /// calls and the outbound requests it makes (`traceparent`, unless the
    /// guest wrote its own).
    trace: Option<verge_spec::SpanContext>,
    events: Option<EventSink>,
    calls: Option<crate::CallSink>,
    policy: Arc<crate::outbound::OutboundPolicy>,
    settings: Arc<crate::outbound::OutboundSettings>,
    usage: Arc<crate::outbound::OutboundUsage>,
    deadline: Instant,
}

type SendResult = wasmtime_wasi_http::Result<(
    http::Response<WasiBody>,
    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
)>;

/// Largest event body a guest may send at once.
const MAX_EVENT_BODY: usize = 1 << 20;

fn small_response(status: u16, text: String) -> SendResult {
    let body = http_body_util::Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed_unsync();
    let response = http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(body)
        .map_err(|e| wasmtime_wasi_http::Error::InternalError(Some(e.to_string())))?;
    Ok((response, Box::new(async { Ok(()) })))
}

/// Parses the events a guest sent (structured, batch or binary mode).
fn parse_events(parts: &http::request::Parts, body: &[u8]) -> Result<Vec<CloudEvent>, String> {
    let ct = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let headers = parts
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)));
    CloudEvent::from_http(ct, headers, body).map_err(|e| e.to_string())
}

impl Outbound {
    /// A call of function `target` in process, if this version may make it.
    fn call(
        &self,
        target: String,
        request: http::Request<WasiBody>,
    ) -> impl Future<Output = SendResult> + Send + 'static {
        let refused = if !self.policy.calls.contains(&target) {
            Some(format!(
                "verge: call to function {target:?} denied: deploy {:?} with --allow-call {target}\n",
                self.function
            ))
        } else if self.calls.is_none() {
            Some(format!(
                "verge: call to function {target:?} refused: this node runs no calls between functions\n"
            ))
        } else {
            None
        };
        if let Some(line) = &refused {
            tracing::info!(function = %self.function, callee = %target, "call between functions denied");
            use wasmtime_wasi::p2::OutputStream;
            let _ = self.stderr.clone().write(Bytes::from(line.clone()));
        }
        let sink = self.calls.clone();
        let call = crate::CallRequest {
            function: target,
            caller: self.function.clone(),
            parent_id: self.invocation_id.clone(),
            hops: self.hops,
            trace: self.trace,
            request: request.map(|b| b.map_err(|e| BodyError(e.to_string())).boxed_unsync()),
        };
        async move {
            let Some(sink) = sink.filter(|_| refused.is_none()) else {
                return Err(wasmtime_wasi_http::Error::HttpRequestDenied);
            };
            let response = sink(call).await.map(|b| {
                b.map_err(|e| wasmtime_wasi_http::Error::InternalError(Some(e.0)))
                    .boxed_unsync()
            });
            let done: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send> =
                Box::new(async { Ok(()) });
            Ok((response, done))
        }
    }
}

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        if request.uri().host() == Some(crate::EVENTS_HOST)
            && let Some(sink) = self.events.clone()
        {
            let (function, version, hops) = (self.function.clone(), self.version, self.hops);
            let trace = self.trace.map(|t| t.traceparent());
            return Box::new(async move {
                let (parts, body) = request.into_parts();
                let body = match http_body_util::Limited::new(body, MAX_EVENT_BODY)
                    .collect()
                    .await
                {
                    Ok(b) => b.to_bytes(),
                    Err(e) => {
                        return small_response(
                            413,
                            format!(
                                "could not read the events (at most {MAX_EVENT_BODY} bytes): {e}\n"
                            ),
                        );
                    }
                };
                let mut events = match parse_events(&parts, &body) {
                    Ok(events) => events,
                    Err(e) => return small_response(400, format!("{e}\n")),
                };
                for e in &mut events {
                    e.source = format!("/verge/functions/{function}");
                    e.set_hops(verge_spec::next_hop(hops));
                    // The CloudEvents distributed-tracing extension: the
                    // emitting invocation is the parent of what the event
                    // triggers, unless the guest traced it itself.
                    if let Some(t) = &trace {
                        e.trace_parent_or(t);
                    }
                    if e.time.is_none() {
                        e.time = Some(verge_spec::rfc3339_ms(verge_spec_now_ms()));
                    }
                }
                let n = events.len();
                match sink(&function, version, events).await {
                    Ok(()) => small_response(202, format!("accepted {n} events\n")),
                    Err(e) => small_response(503, format!("{e}\n")),
                }
            });
        }
        if let Some(target) = request
            .uri()
            .host()
            .and_then(|h| h.strip_suffix(crate::CALL_HOST_SUFFIX))
        {
            return Box::new(self.call(target.to_ascii_lowercase(), request));
        }
        let mut request = request;
        if let Some(t) = &self.trace
            && !request.headers().contains_key(verge_spec::TRACEPARENT)
            && let Ok(v) = http::HeaderValue::try_from(t.traceparent())
        {
            request.headers_mut().insert(verge_spec::TRACEPARENT, v);
        }
        let sender = crate::outbound::Sender {
            policy: self.policy.clone(),
            settings: self.settings.clone(),
            usage: self.usage.clone(),
            deadline: self.deadline,
            stderr: self.stderr.clone(),
            function: self.function.clone(),
        };
        Box::new(sender.send(request, options))
    }
}

fn verge_spec_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What the caller can see of a running guest: its output so far, the
/// peak of its memory, and the signals its lane reads (moved; stopped at an
/// epoch tick).
#[derive(Clone)]
struct Watch {
    stdout: Capture,
    stderr: Capture,
    peak: Arc<AtomicU64>,
    lane: Arc<crate::lanes::Moved>,
    outbound: Arc<crate::outbound::OutboundUsage>,
}

impl Watch {
    fn new(log_limit: usize) -> Self {
        Self {
            stdout: Capture::new(log_limit),
            stderr: Capture::new(log_limit),
            peak: Arc::default(),
            lane: Arc::default(),
            outbound: Arc::default(),
        }
    }

    /// The watch of a request on a kept instance: its captures, emptied;
    /// its memory peak starting at what the instance holds.
    fn reusing(parked: &crate::reuse::Parked) -> Self {
        parked.stdout.clear();
        parked.stderr.clear();
        let held = parked.store.data().limits.total as u64;
        Self {
            stdout: parked.stdout.clone(),
            stderr: parked.stderr.clone(),
            peak: Arc::new(AtomicU64::new(held)),
            lane: Arc::default(),
            outbound: Arc::default(),
        }
    }

    /// Puts the output and the peak into `r`.
    fn record(&self, r: &mut UsageRecord) {
        let (out, err) = (self.stdout.text(), self.stderr.text());
        r.stdout = (!out.is_empty()).then_some(out);
        r.stderr = (!err.is_empty()).then_some(err);
        r.peak_memory_bytes = self.peak.load(Ordering::Relaxed);
        r.demoted = self.lane.was_moved();
        self.outbound.record(r);
    }
}

/// Where an invocation comes from: its chain's hops, its id, its span.
struct Origin<'a> {
    hops: u32,
    invocation_id: &'a str,
    trace: Option<verge_spec::SpanContext>,
}

/// A fresh store for one invocation of `function`, with its own captures and
/// limits, interrupted at `deadline`.
fn new_store(
    host: &Host,
    engine: &wasmtime::Engine,
    function: &Function,
    watch: &Watch,
    deadline: Instant,
    origin: Origin<'_>,
) -> Store<GuestState> {
    let Origin {
        hops,
        invocation_id,
        trace,
    } = origin;
    let (stdout, stderr) = (&watch.stdout, &watch.stderr);
    let cfg = host.config();
    let wasi = WasiCtxBuilder::new()
        .envs(&function.env)
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .build();
    let state = GuestState {
        wasi,
        http: WasiHttpCtx::new(),
        table: ResourceTable::new(),
        hooks: Outbound {
            stderr: stderr.clone(),
            function: function.name.clone(),
            version: function.version,
            invocation_id: invocation_id.to_string(),
            hops,
            trace,
            events: host.event_sink.clone(),
            calls: host.call_sink.clone(),
            policy: function.policy.clone(),
            settings: cfg.outbound.clone(),
            usage: watch.outbound.clone(),
            deadline,
        },
        config: config_of(function),
        kv: crate::keyvalue::KvCtx {
            kv: host.kv.clone(),
            allowed: function.kv_buckets.clone(),
            tenant: function.kv_tenant.clone(),
            default_bucket: function.kv_default(),
            hops,
        },
        limits: GuestLimits {
            limit: function.memory_limit.unwrap_or(cfg.memory_limit),
            total: 0,
            peak: watch.peak.clone(),
            hit: false,
        },
    };
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limits);
    set_deadline(&mut store, deadline, watch);
    store
}

/// A guest that never blocks yields to the executor at every epoch tick, so
/// it cannot starve other requests; past `deadline` it is interrupted.
fn set_deadline(store: &mut Store<GuestState>, deadline: Instant, watch: &Watch) {
    store.set_epoch_deadline(1);
    let lane = watch.lane.clone();
    store.epoch_deadline_callback(move |_| {
        if Instant::now() >= deadline {
            Err(Trap::Interrupt.into())
        } else {
            lane.epoch_yield();
            Ok(UpdateDeadline::Yield(1))
        }
    });
}

/// Binds a kept instance's store to a new invocation: what `new_store`
/// sets per invocation (its id, chain, span, deadline, configuration,
/// memory peak, outbound usage), set again. Its environment, captures
/// and grants are the version's, the same for every invocation.
fn rebind(
    store: &mut Store<GuestState>,
    function: &Function,
    watch: &Watch,
    deadline: Instant,
    origin: Origin<'_>,
) {
    let state = store.data_mut();
    state.hooks.invocation_id = origin.invocation_id.to_string();
    state.hooks.hops = origin.hops;
    state.hooks.trace = origin.trace;
    state.hooks.usage = watch.outbound.clone();
    state.hooks.deadline = deadline;
    state.kv.hops = origin.hops;
    state.config = config_of(function);
    state.limits.peak = watch.peak.clone();
    state.limits.hit = false;
    set_deadline(store, deadline, watch);
}

/// A version's configuration values for an invocation starting now.
fn config_of(function: &Function) -> Arc<wasmtime_wasi_config::WasiConfigVariables> {
    match function.config_now() {
        None => NO_CONFIG.clone(),
        Some(values) => Arc::new(
            values
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
        ),
    }
}

/// Instantiates `function` in a fresh store and drops it: the cost every
/// request pays before the guest runs (used by benchmarks).
pub(crate) async fn instantiate_only(host: &Host, function: &Function) -> Result<(), InvokeError> {
    let watch = Watch::new(0);
    let now = Instant::now();
    let deadline = now
        .checked_add(function.timeout.unwrap_or(host.config().timeout))
        .unwrap_or(now + Duration::from_secs(86_400));
    let code = function.component.code();
    let origin = Origin {
        hops: 0,
        invocation_id: "",
        trace: None,
    };
    let mut store = new_store(host, &code.engine, function, &watch, deadline, origin);
    let result = code.pre.instantiate_async(&mut store).await.map(drop);
    drop(store);
    result.map_err(|e| {
        RunError::Instantiate(e).into_invoke_error(host.config().timeout, String::new())
    })
}

pub(crate) async fn invoke<B>(
    host: &Host,
    function: &Function,
    invocation_id: &str,
    request: http::Request<B>,
) -> Result<http::Response<ResponseBody>, InvokeError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Display,
{
    let cfg = host.config();
    let log_limit = function.log_limit.unwrap_or(cfg.output_limit);
    let timeout = function.timeout.unwrap_or(cfg.timeout);
    let memory_limit = function.memory_limit.unwrap_or(cfg.memory_limit);
    let started = Instant::now();
    // A limit too far to add to the clock is no limit a node can mean:
    // a day, never a panic.
    let deadline = started
        .checked_add(timeout)
        .unwrap_or(started + Duration::from_secs(86_400));
    // The code in force when the request starts serves all of it, even if
    // optimized code replaces it meanwhile.
    let code = function.component.code();
    // A count that does not parse is past any limit, never 0.
    let inline = request
        .extensions()
        .get::<verge_spec::ParentInvocation>()
        .is_some();
    let hops = match request.headers().get("ce-vergehops") {
        None => 0,
        Some(v) => v
            .to_str()
            .map(verge_spec::parse_hops)
            .unwrap_or(verge_spec::HOPS_INVALID),
    };
    let context = request
        .extensions()
        .get::<verge_spec::InvocationContext>()
        .copied();
    let origin = Origin {
        hops,
        invocation_id,
        trace: context.map(|c| c.trace.context()),
    };
    // A kept instance when the version keeps them (`--reuse`, `--prewarm`)
    // and one is free; else a fresh one, instantiated in the task below.
    let pool = function.instances.clone();
    let parked = pool.as_ref().and_then(|p| p.take(&code));
    if let Some(pool) = &pool {
        prewarm(host, function, pool, &code);
    }
    let (watch, mut store, proxy, uses_before) = match parked {
        Some(parked) => {
            let watch = Watch::reusing(&parked);
            let crate::reuse::Parked {
                mut store,
                proxy,
                uses,
                ..
            } = parked;
            rebind(&mut store, function, &watch, deadline, origin);
            (watch, store, Some(proxy), uses)
        }
        None => {
            let watch = Watch::new(log_limit);
            let store = new_store(host, &code.engine, function, &watch, deadline, origin);
            (watch, store, None, 0)
        }
    };
    let handback = pool.map(|pool| {
        Arc::new(crate::reuse::Handback::new(
            pool,
            &function.name,
            function.version,
            uses_before,
        ))
    });

    let meter = Meter::new(
        if cfg.metering {
            host.usage_sink.clone()
        } else {
            None
        },
        UsageRecord {
            invocation_id: invocation_id.to_string(),
            function: function.name.clone(),
            version: function.version,
            started_at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                .unwrap_or(0),
            wall_us: 0,
            cpu_us: 0,
            peak_memory_bytes: 0,
            memory_limit_bytes: memory_limit as u64,
            request_bytes: 0,
            response_bytes: 0,
            status: 0,
            outcome: Outcome::NoResponse,
            cold: !function.component.used.swap(true, Ordering::Relaxed),
            stdout: None,
            stderr: None,
            error: None,
            forwarded_from: request
                .extensions()
                .get::<verge_spec::ForwardedFrom>()
                .map(|f| f.0.clone()),
            hops,
            will_retry: request
                .extensions()
                .get::<verge_spec::RetriedOnFailure>()
                .is_some(),
            parent_id: request
                .extensions()
                .get::<verge_spec::ParentInvocation>()
                .map(|p| p.0.clone()),
            trace: context.map(|c| c.trace),
            timings: context.map(|c| c.timings).unwrap_or_default(),
            ..UsageRecord::default()
        },
    );

    let request = {
        let meter = meter.clone();
        request.map(move |body| {
            body.map_frame(move |frame| {
                if let Some(data) = frame.data_ref() {
                    meter
                        .request_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                frame
            })
            .map_err(|e| wasmtime_wasi_http::Error::InternalError(Some(e.to_string())))
        })
    };
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let (req, out) = {
        let mut http = store.data_mut().http();
        let req = http
            .new_incoming_request(
                wasmtime_wasi_http::p2::bindings::http::types::Scheme::Http,
                request,
            )
            .map_err(|e| InvokeError::Internal(format!("{e:#}")))?;
        let out = http
            .new_response_outparam(tx)
            .map_err(|e| InvokeError::Internal(format!("{e:#}")))?;
        (req, out)
    };

    // One task per invocation: it runs the guest to the end (the response body
    // may still stream after the response head is sent), meters it, and
    // reports its output.
    let pre = code.pre.clone();
    let task_code = code.clone();
    let task_handback = handback.clone();
    // A kept instance holding more than this is not kept again.
    let keep_bound = memory_limit / 2;
    let task_meter = meter.clone();
    let reputation = function.component.reputation.clone();
    let task_watch = watch.clone();
    let trace = context.map(|c| c.trace);
    let (name, version, id) = (
        function.name.clone(),
        function.version,
        invocation_id.to_string(),
    );
    let work = async move {
        let run = async {
            let proxy = match proxy {
                Some(proxy) => proxy,
                None => pre
                    .instantiate_async(&mut store)
                    .await
                    .map_err(RunError::Instantiate)?,
            };
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, req, out)
                .await
                .map_err(RunError::Trap)?;
            Ok(proxy)
        };
        let (result, proxy) = match until(deadline, run).await {
            Some(Ok(proxy)) => (Ok(()), Some(proxy)),
            Some(Err(e)) => (Err(e), None),
            None => (Err(RunError::Trap(Trap::Interrupt.into())), None),
        };
        let memory_hit = store.data().limits.hit;
        let (out, err) = (task_watch.stdout.text(), task_watch.stderr.text());
        // The guest's output belongs to its invocation record (`verge logs`),
        // not to the node's log: at debug level only, for whoever debugs the
        // node (a guest that prints in a loop must not fill the node's log).
        match &result {
            Err(e) => {
                let outcome = e.summary();
                tracing::debug!(function = %name, version, invocation = %id, trace = %trace.map(|t| t.trace_hex()).unwrap_or_default(), %outcome, stdout = ?out, stderr = ?err, "guest failed");
            }
            Ok(()) if !out.is_empty() || !err.is_empty() => {
                tracing::debug!(function = %name, version, invocation = %id, trace = %trace.map(|t| t.trace_hex()).unwrap_or_default(), stdout = ?out, stderr = ?err, "guest output");
            }
            Ok(()) => {}
        }
        task_meter.update(|r| {
            task_watch.record(r);
            r.wall_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            if let Err(e) = &result {
                r.outcome = e.outcome(memory_hit);
                r.error = Some(e.summary());
                if r.outcome == Outcome::Timeout {
                    reputation.spun();
                }
            }
            // Otherwise the guest returned: `no_response` (the record's
            // first state) stands unless its response head came.
        });
        // Last: a kept instance may serve another request at once, and
        // its captures with it.
        if let Some(handback) = &task_handback {
            let end = match (&result, proxy) {
                (Ok(()), Some(proxy)) if !memory_hit => crate::reuse::TaskEnd::Returned(
                    (store.data().limits.total <= keep_bound
                        && !crate::reuse::unfinished(&mut store.data_mut().table))
                    .then(|| {
                        crate::reuse::Parked::new(
                            store,
                            proxy,
                            task_code,
                            uses_before.saturating_add(1),
                            task_watch.stdout.clone(),
                            task_watch.stderr.clone(),
                        )
                    }),
                ),
                (Err(RunError::Trap(e)), _) if !memory_hit && !is_interrupt(e) => {
                    crate::reuse::TaskEnd::Trapped
                }
                _ => crate::reuse::TaskEnd::Stopped,
            };
            handback.task_ended(end);
        }
        (result, memory_hit)
    };
    let moved = watch.lane.clone();
    let work: Pin<Box<dyn Future<Output = Ended> + Send>> = match (cfg.metering, host.slow_lane()) {
        (true, Some(lane)) => Box::pin(
            crate::lanes::Demoting::metered(
                Metered::new(work, meter.clone()),
                lane,
                meter.clone(),
                function.component.reputation.clone(),
            )
            .signalling(moved.clone()),
        ),
        (true, None) => Box::pin(Metered::new(work, meter.clone())),
        (false, Some(lane)) => Box::pin(
            crate::lanes::Demoting::new(work, lane, function.component.reputation.clone())
                .signalling(moved.clone()),
        ),
        (false, None) => Box::pin(work),
    };
    // A call from another guest runs in the caller's task until its
    // response head is there (or it ends, or it moves to the slow lane):
    // a task of its own would cost two wake-ups of another worker thread
    // per call. What remains of it (a body still being written) gets a
    // task then. Any other request gets its task at once, so that a client
    // that goes away never cancels a guest midway.
    let mut early = None;
    let task = if inline {
        let mut work = work;
        let ended = std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            if let Poll::Ready(answer) = Pin::new(&mut rx).poll(cx) {
                early = Some(answer);
                return Poll::Ready(None);
            }
            if moved.poll_moved(cx) {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        match ended {
            Some(out) => Running::Ended(out),
            None => Running::Task(tokio::spawn(work)),
        }
    } else {
        Running::Task(tokio::spawn(work))
    };

    // No timer on the fast lane: the task ends by the deadline (see
    // `until`), and with it the store that holds the response's sender. An
    // invocation moved to the slow lane gets one (`answer_by`).
    let answer = match early {
        Some(a) => Some(a),
        None => answer_by(deadline, &mut rx, &moved).await,
    };
    // The caller's half of a kept instance's end: did a response come?
    let answered = |yes: bool| {
        if let Some(h) = &handback {
            h.caller_saw(yes);
        }
    };
    let Some(answer) = answer else {
        answered(false);
        // Past the deadline on a crowded slow lane: the caller stops the
        // guest and writes its record now. Aborted, a guest waiting for
        // its turn on the lane is dropped without running again; one that
        // is running stops at its next epoch tick. Its own ending (which
        // would write the same) never runs.
        if let Running::Task(task) = &task {
            cut_off(
                task,
                &moved,
                &meter,
                &watch,
                started,
                &function.component.reputation,
            );
        }
        return Err(InvokeError::Timeout(timeout));
    };
    match answer {
        Ok(Ok(response)) => {
            answered(true);
            meter.update(|r| {
                r.status = response.status().as_u16();
                // The guest's task may have ended before this runs: a trap
                // after the head stands; "no response" does not (the head
                // came).
                if r.outcome == Outcome::NoResponse {
                    r.outcome = Outcome::Ok;
                }
            });
            let body_meter = meter;
            Ok(response.map(move |b| {
                b.map_frame(move |frame| {
                    if let Some(data) = frame.data_ref() {
                        body_meter
                            .response_bytes
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                    frame
                })
                .map_err(|e| BodyError(e.to_string()))
                .boxed_unsync()
            }))
        }
        Ok(Err(code)) => {
            answered(true);
            let code = code.to_string();
            meter.update(|r| {
                r.outcome = Outcome::ErrorResponse;
                r.error = Some(format!("the guest answered with error code {code}"));
            });
            Err(InvokeError::Guest(code))
        }
        Err(_) => {
            // The guest finished, died or ran out of time without setting a
            // response.
            let result = match task {
                Running::Task(task) => task.await,
                Running::Ended(out) => Ok(out),
            };
            let err = watch.stderr.text();
            answered(false);
            match result {
                Ok((Ok(()), _)) => Err(InvokeError::NoResponse { stderr: err }),
                Ok((Err(_), true)) => Err(InvokeError::MemoryLimit {
                    limit: memory_limit,
                    stderr: err,
                }),
                Ok((Err(e), false)) => Err(e.into_invoke_error(timeout, err)),
                Err(e) => Err(InvokeError::Internal(format!(
                    "invocation task failed: {e}"
                ))),
            }
        }
    }
}

/// Is this the interruption at a deadline?
fn is_interrupt(e: &wasmtime::Error) -> bool {
    matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt))
}

/// Makes the never-used instances a version wants ready (`--prewarm`), in
/// tasks of their own: the request that asked goes on at once.
fn prewarm(
    host: &Host,
    function: &Function,
    pool: &Arc<crate::Instances>,
    code: &Arc<crate::Code>,
) {
    let want = pool.wanted();
    if want == 0 {
        return;
    }
    let cfg = host.config();
    let timeout = function.timeout.unwrap_or(cfg.timeout);
    for _ in 0..want {
        pool.filling.fetch_add(1, Ordering::Relaxed);
        let watch = Watch::new(function.log_limit.unwrap_or(cfg.output_limit));
        let now = Instant::now();
        let deadline = now
            .checked_add(timeout)
            .unwrap_or(now + Duration::from_secs(86_400));
        let origin = Origin {
            hops: 0,
            invocation_id: "",
            trace: None,
        };
        let mut store = new_store(host, &code.engine, function, &watch, deadline, origin);
        let (pool, code) = (pool.clone(), code.clone());
        tokio::spawn(async move {
            let made = until(deadline, code.pre.instantiate_async(&mut store)).await;
            if let Some(Ok(proxy)) = made {
                let parked = crate::reuse::Parked::new(
                    store,
                    proxy,
                    code,
                    0,
                    watch.stdout.clone(),
                    watch.stderr.clone(),
                );
                pool.keep_fresh(parked);
            }
            pool.filling.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// How a guest's run ended, and whether it hit its memory limit.
type Ended = (Result<(), RunError>, bool);

/// Where an invocation's guest runs once its caller has the answer.
enum Running<T> {
    /// In a task of its own.
    Task(tokio::task::JoinHandle<T>),
    /// It ended in the caller's task; this is how.
    Ended(T),
}

/// How long past its deadline a moved invocation's caller waits for the
/// guest to notice the deadline itself.
const MOVED_GRACE: Duration = Duration::from_millis(5);

/// The guest's answer, or `None` when the invocation has moved to the slow
/// lane and is still running at its deadline (plus [`MOVED_GRACE`]). The
/// timer is armed only once the invocation has moved.
async fn answer_by<T>(
    deadline: Instant,
    rx: &mut tokio::sync::oneshot::Receiver<T>,
    moved: &crate::lanes::Moved,
) -> Option<Result<T, tokio::sync::oneshot::error::RecvError>> {
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(answer) = Pin::new(&mut *rx).poll(cx) {
            return Poll::Ready(Some(answer));
        }
        if !moved.poll_moved(cx) {
            return Poll::Pending;
        }
        let timer = timer.get_or_insert_with(|| {
            Box::pin(tokio::time::sleep_until((deadline + MOVED_GRACE).into()))
        });
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await
}

/// Stops an invocation whose caller has answered for it (past its deadline
/// on a crowded slow lane, see [`answer_by`]) and writes its record: a
/// timeout, with the wall time, output and memory peak of now.
fn cut_off<T>(
    task: &tokio::task::JoinHandle<T>,
    moved: &crate::lanes::Moved,
    meter: &Meter,
    watch: &Watch,
    started: Instant,
    reputation: &crate::lanes::Reputation,
) {
    task.abort();
    // The guest's own task on the slow lane too: aborting the caller's task
    // reaches it only when that task is dropped.
    moved.abort_slow();
    meter.update(|r| {
        watch.record(r);
        r.wall_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        r.outcome = Outcome::Timeout;
        r.error = Some(RunError::Trap(Trap::Interrupt.into()).summary());
    });
    // Now: the aborted task may be dropped only when its lane gets to it.
    meter.emit_now();
    reputation.spun();
}

/// `inner`'s output, or `None` if it is still waiting at `deadline`.
///
/// The timer is armed only once `inner` has had to wait: a guest that runs
/// to its end in one go (most requests) never registers one, and a guest
/// that keeps running is stopped at the deadline by the store's epoch
/// callback, not by a timer. A tokio timer per request cost about 3 µs of a
/// ~45 µs request here (registering it, and waking the I/O driver when it was
/// the earliest); `docs/BENCHMARKS.md` has the measurement.
async fn until<F: Future>(deadline: Instant, inner: F) -> Option<F::Output> {
    let mut inner = std::pin::pin!(inner);
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = inner.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        let timer =
            timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await
}

enum RunError {
    Instantiate(wasmtime::Error),
    Trap(wasmtime::Error),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Instantiate(e) => write!(f, "instantiation failed: {e:#}"),
            RunError::Trap(e) => write!(f, "{e:#}"),
        }
    }
}

impl RunError {
    /// The ledger's name for how the invocation ended.
    fn outcome(&self, memory_hit: bool) -> Outcome {
        match self {
            _ if memory_hit => Outcome::MemoryLimit,
            RunError::Instantiate(e) if is_capacity(e) => Outcome::Capacity,
            RunError::Instantiate(_) => Outcome::Instantiate,
            RunError::Trap(e) if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) => {
                Outcome::Timeout
            }
            RunError::Trap(_) => Outcome::Trap,
        }
    }

    /// One line: the trap or instantiation failure without the wasm backtrace.
    fn summary(&self) -> String {
        match self {
            RunError::Instantiate(e) => format!("instantiation failed: {}", trap_message(e)),
            RunError::Trap(e) if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) => {
                "timeout".to_string()
            }
            RunError::Trap(e) => format!("trapped: {}", trap_message(e)),
        }
    }

    fn into_invoke_error(self, timeout: Duration, stderr: String) -> InvokeError {
        match self {
            RunError::Instantiate(e) => {
                let msg = format!("{e:#}");
                // The pooling allocator is out of slots (instances, memories,
                // tables): the node is at capacity, not the guest at fault.
                if is_capacity(&e) {
                    InvokeError::Capacity(msg)
                } else {
                    InvokeError::Instantiate(msg)
                }
            }
            RunError::Trap(e) => {
                if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
                    InvokeError::Timeout(timeout)
                } else {
                    InvokeError::Trap {
                        message: trap_message(&e),
                        stderr,
                    }
                }
            }
        }
    }
}

/// Is this the pooling allocator out of slots (the node at capacity)?
fn is_capacity(e: &wasmtime::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
            .is_some()
    })
}

/// A trap and its causes in one line, without the wasm backtrace: a host
/// call's error (such as wasmtime-wasi-http's "total size of fields exceeds
/// limit") is kept, the "error while executing at wasm backtrace" context
/// is not.
fn trap_message(e: &wasmtime::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(trap) = e.downcast_ref::<Trap>() {
        parts.push(trap.to_string());
    }
    for cause in e.chain() {
        let line = cause.to_string();
        let line = line.lines().next().unwrap_or_default().trim().to_string();
        if line.is_empty()
            || line.starts_with("error while executing at wasm backtrace")
            || parts.iter().any(|p| p.contains(&line))
        {
            continue;
        }
        parts.push(line);
    }
    if parts.is_empty() {
        "the guest trapped".to_string()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_moved_invocation_is_answered_at_its_deadline_and_one_on_the_fast_lane_waits() {
        let past = Instant::now()
            .checked_sub(Duration::from_secs(1))
            .unwrap_or_else(Instant::now);
        // On the fast lane: the answer, whatever the deadline (the guest
        // stops itself there).
        let (tx, mut rx) = tokio::sync::oneshot::channel::<u8>();
        let moved = crate::lanes::Moved::default();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let _ = tx.send(7);
        });
        let got = answer_by(past, &mut rx, &moved).await;
        assert_eq!(got.and_then(Result::ok), Some(7));
        // Moved while waiting, and past its deadline: no answer.
        let (_tx, mut rx) = tokio::sync::oneshot::channel::<u8>();
        let moved = Arc::new(crate::lanes::Moved::default());
        let m = moved.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            m.set();
        });
        assert!(answer_by(past, &mut rx, &moved).await.is_none());
        // Moved, before its deadline: the answer.
        let (tx, mut rx) = tokio::sync::oneshot::channel::<u8>();
        let later = Instant::now() + Duration::from_secs(600);
        let _ = tx.send(3);
        let got = answer_by(later, &mut rx, &moved).await;
        assert_eq!(got.and_then(Result::ok), Some(3));
    }

    #[tokio::test]
    async fn an_invocation_its_caller_cut_off_never_runs_again_and_is_recorded_then() {
        use std::sync::atomic::AtomicBool;
        // A crowded slow lane: every one of its threads blocked until
        // released.
        let slow = crate::lanes::SlowLane::new().unwrap();
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let (blocked, release) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        for _ in 0..threads {
            let (blocked, release) = (blocked.clone(), release.clone());
            slow.handle().unwrap().spawn(async move {
                blocked.fetch_add(1, Ordering::SeqCst);
                while !release.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
        }
        while blocked.load(Ordering::SeqCst) < threads as u64 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // A spinning guest of a component known to spin: it starts on the
        // slow lane, behind the blocked threads. Like an invocation's task,
        // it holds the meter, so the record goes out when it is dropped.
        let records = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink: crate::meter::UsageSink = {
            let records = records.clone();
            Arc::new(move |r| records.lock().unwrap().push(r))
        };
        let meter = crate::meter::tests::meter(Some(sink));
        let (polls, dropped) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        struct OnDrop(Arc<AtomicBool>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let guest = {
            let (polls, on_drop, meter) = (polls.clone(), OnDrop(dropped.clone()), meter.clone());
            async move {
                let _held = (on_drop, meter);
                loop {
                    polls.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                }
            }
        };
        let reputation = Arc::new(crate::lanes::Reputation::default());
        reputation.spun();
        let lane = crate::lanes::Lane {
            handle: slow.handle().unwrap(),
            budget: Duration::from_millis(10),
            demoted: Arc::default(),
            crowd: Arc::new(crate::lanes::Crowd::new(2)),
        };
        let moved = Arc::new(crate::lanes::Moved::default());
        let task = tokio::spawn(
            crate::lanes::Demoting::new(guest, lane, reputation.clone()).signalling(moved.clone()),
        );
        let watch = Watch::new(1024);
        let started = Instant::now();
        let (_tx, mut rx) = tokio::sync::oneshot::channel::<u8>();
        assert!(
            answer_by(started + Duration::from_millis(50), &mut rx, &moved)
                .await
                .is_none()
        );
        cut_off(&task, &moved, &meter, &watch, started, &reputation);
        let cut_at = started.elapsed();
        drop(meter);
        // The record is out at once, while the guest's task still waits
        // for the blocked lane (and holds the meter).
        assert_eq!(records.lock().unwrap().len(), 1);
        assert!(!dropped.load(Ordering::SeqCst));
        // The lane frees up: the guest is dropped without running again.
        release.store(true, Ordering::SeqCst);
        for _ in 0..5000 {
            if dropped.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(
            dropped.load(Ordering::SeqCst),
            "the guest was never dropped"
        );
        assert_eq!(
            polls.load(Ordering::SeqCst),
            0,
            "the guest ran after its cutoff"
        );
        let records = records.lock().unwrap();
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!(r.outcome, Outcome::Timeout);
        assert_eq!(r.error.as_deref(), Some("timeout"));
        // The record's wall time is the cutoff's, not the lane's release.
        assert!(
            Duration::from_micros(r.wall_us) >= Duration::from_millis(50)
                && Duration::from_micros(r.wall_us) <= cut_at,
            "{} us, cut off at {cut_at:?}",
            r.wall_us
        );
    }

    #[test]
    fn a_host_side_trap_keeps_its_cause() {
        // As wasmtime reports a host call's error: the cause, with the wasm
        // backtrace as context around it.
        let e = wasmtime::Error::msg("total size of fields exceeds limit")
            .context("error while executing at wasm backtrace:\n    0: 0x1234 - guest!handle");
        let m = trap_message(&e);
        assert!(m.contains("total size of fields exceeds limit"), "{m}");
        assert!(!m.contains("backtrace"), "{m}");
        let t = wasmtime::Error::from(Trap::UnreachableCodeReached)
            .context("error while executing at wasm backtrace:\n    0: 0x1");
        assert!(
            trap_message(&t).contains("unreachable"),
            "{}",
            trap_message(&t)
        );
    }

    #[tokio::test]
    async fn until_polls_first_and_stops_a_waiting_future_at_the_deadline() {
        let past = Instant::now()
            .checked_sub(Duration::from_secs(1))
            .unwrap_or_else(Instant::now);
        // Ready at once: its output, even past the deadline (no timer needed).
        assert_eq!(until(past, async { 7 }).await, Some(7));
        // Still waiting at the deadline: stopped.
        let soon = Instant::now() + Duration::from_millis(20);
        assert_eq!(until(soon, std::future::pending::<u8>()).await, None);
        // Ready after waiting, before the deadline: its output.
        let later = Instant::now() + Duration::from_secs(600);
        let waits = async {
            tokio::task::yield_now().await;
            3
        };
        assert_eq!(until(later, waits).await, Some(3));
    }
}
