//! Observability with the tools operators use: a real Prometheus scraping a
//! node, OTLP/HTTP traces decoded with the OpenTelemetry project's protobuf
//! definitions, `verge top` in tmux.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use crate::kit::{TestNode, eventually, fixture};

/// An OTLP/HTTP receiver: decodes every export request's protobuf and
/// keeps its spans; `silent` ones read requests and never answer (a
/// collector that hangs).
struct Receiver {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    fn start(silent: bool) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let (s, r) = (spans.clone(), requests.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                let (s, r) = (s.clone(), r.clone());
                std::thread::spawn(move || serve(conn, silent, &s, &r));
            }
        });
        Receiver {
            url,
            spans,
            requests,
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

/// Serves OTLP export requests on one connection (keep-alive).
fn serve(conn: TcpStream, silent: bool, spans: &Mutex<Vec<Span>>, requests: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut writer = conn;
    loop {
        let mut head = String::new();
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let length = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        requests
            .lock()
            .unwrap()
            .push(head.lines().next().unwrap_or("").to_string());
        if silent {
            // Never answers: the exporter's request times out, and the
            // connection is held until the exporter closes it.
            let _ = reader.read(&mut [0u8; 1]);
            return;
        }
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/x-protobuf"),
            "{head}"
        );
        let request = ExportTraceServiceRequest::decode(body.as_slice())
            .expect("an OTLP ExportTraceServiceRequest");
        for rs in request.resource_spans {
            let resource = rs.resource.expect("a resource");
            assert!(
                resource.attributes.iter().any(|a| a.key == "service.name"),
                "the resource names the service"
            );
            for ss in rs.scope_spans {
                spans.lock().unwrap().extend(ss.spans);
            }
        }
        let _ = writer.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
        );
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            Value::BoolValue(b) => b.to_string(),
            Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
        .unwrap_or_default()
}

fn deploy_relay(node: &TestNode, name: &str, args: &[&str]) {
    let f = fixture("rust-relay");
    let mut all = vec!["deploy", f.to_str().unwrap(), "--name", name];
    all.extend_from_slice(args);
    node.cli_ok(&all);
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[test]
fn a_chain_through_an_event_and_a_retried_async_call_is_one_trace() {
    let receiver = Receiver::start(false);
    let node = TestNode::start_with(&["--otlp-endpoint", &receiver.url, "--retry-base", "100ms"]);
    // a (on a route) emits an event; b, triggered by it, queues c
    // asynchronously; c fails its first attempt and succeeds on the retry.
    deploy_relay(
        &node,
        "a",
        &["--route", "/a", "--env", "EMIT_TYPE=com.acme.traced"],
    );
    deploy_relay(&node, "b", &["--env", "ASYNC_CALL=c", "--allow-call", "c"]);
    deploy_relay(&node, "c", &["--env", "FAIL_ATTEMPT=1"]);
    node.cli_ok(&["trigger", "add", "b", "--on", "com.acme.traced"]);

    let response = node
        .http()
        .post(format!("{}/a", node.url))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    // The response names the invocation's span in the client's trace.
    let traceparent = response.headers()["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[1], CLIENT_TRACE);
    let a_span = parts[2].to_string();
    assert_ne!(a_span, CLIENT_SPAN);

    // Four invocations: a, b, c (failed), c (retried).
    let spans = eventually("four invocation spans reach the collector", || {
        let spans: Vec<Span> = receiver
            .spans()
            .into_iter()
            .filter(|s| !attr(s, "faas.invocation_id").is_empty() && !s.name.contains(' '))
            .collect();
        (spans.len() >= 4).then_some(spans)
    });
    assert_eq!(spans.len(), 4, "{spans:#?}");
    for s in &spans {
        assert_eq!(hex(&s.trace_id), CLIENT_TRACE, "one trace: {s:#?}");
    }
    let by_name = |n: &str| -> Vec<&Span> { spans.iter().filter(|s| s.name == n).collect() };
    let (a, b, c) = (by_name("a"), by_name("b"), by_name("c"));
    assert_eq!((a.len(), b.len(), c.len()), (1, 1, 2), "{spans:#?}");
    let (a, b) = (a[0], b[0]);
    assert_eq!(hex(&a.span_id), a_span);
    assert_eq!(
        hex(&a.parent_span_id),
        CLIENT_SPAN,
        "a's parent is the client's span"
    );
    assert_eq!(
        hex(&b.parent_span_id),
        a_span,
        "b's parent is a, which emitted its event"
    );
    for attempt in &c {
        assert_eq!(
            attempt.parent_span_id, b.span_id,
            "each attempt of c is a child of b, which queued it"
        );
    }
    assert_eq!(attr(a, "faas.trigger"), "http");
    assert_eq!(attr(b, "faas.trigger"), "pubsub");
    assert_eq!(attr(c[0], "faas.trigger"), "other");
    let mut outcomes: Vec<String> = c
        .iter()
        .map(|s| attr(s, "http.response.status_code"))
        .collect();
    outcomes.sort();
    assert_eq!(outcomes, ["200", "500"]);
    // The failed attempt is not an error of the invocation (it answered
    // 500 itself); each carries its invocation id and function.
    for s in &spans {
        assert_eq!(attr(s, "faas.name"), s.name);
        assert!(s.end_time_unix_nano >= s.start_time_unix_nano);
    }

    // The same trace, from the ledger, through the CLI.
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&node.cli_ok(&["invocations", "--trace", &traceparent, "--json"]))
            .unwrap();
    assert_eq!(listed.len(), 4, "{listed:#?}");
    let ids: std::collections::BTreeSet<String> = listed
        .iter()
        .map(|r| r["invocation_id"].as_str().unwrap().to_string())
        .collect();
    let exported: std::collections::BTreeSet<String> = spans
        .iter()
        .map(|s| attr(s, "faas.invocation_id"))
        .collect();
    assert_eq!(ids, exported);
    for r in &listed {
        assert_eq!(r["trace_id"], CLIENT_TRACE);
    }
    let table = node.cli_ok(&["invocations", "--trace", CLIENT_TRACE]);
    assert!(
        table.contains("trace 4bf92f3577b34da6a3ce929d0e0e4736: 4 invocations"),
        "{table}"
    );
    // The tree indents b under a and c under b.
    let line = |f: &str| {
        table
            .lines()
            .find(|l| l.contains(f))
            .unwrap_or("")
            .to_string()
    };
    let indent = |l: String| l.len() - l.trim_start().len();
    assert!(indent(line("b@1")) > indent(line("a@1")), "{table}");
    assert!(indent(line("c@1")) > indent(line("b@1")), "{table}");
    let err = node.cli_err(&["invocations", "--trace", "not-a-trace"]);
    assert!(err.contains("is not a trace id"), "{err}");

    // A request without a traceparent starts a trace of its own.
    let response = node.http().get(format!("{}/a", node.url)).send().unwrap();
    let own = response.headers()["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(!own.contains(CLIENT_TRACE), "{own}");
    let metrics = node.api_get("/v1/metrics").text().unwrap();
    assert!(
        metrics.contains("verge_trace_spans_exported_total"),
        "{metrics}"
    );
}

#[test]
fn a_collector_that_hangs_costs_requests_nothing_and_its_spans_are_counted_as_dropped() {
    let receiver = Receiver::start(true);
    let node = TestNode::start_with(&["--otlp-endpoint", &receiver.url]);
    node.deploy("rust-hello", "hello", "/hello");
    let client = node.http();
    for _ in 0..200 {
        let r = client.get(format!("{}/hello", node.url)).send().unwrap();
        assert_eq!(r.status(), 200);
    }
    // The export request hangs; the requests above were never held by it.
    eventually(
        "the exporter sent a request to the silent collector",
        || (!receiver.requests.lock().unwrap().is_empty()).then_some(()),
    );
    // After the export timeout (10 s), the batch is dropped and counted.
    let text = eventually("the spans are counted as dropped", || {
        let text = node.api_get("/v1/metrics").text().unwrap();
        (metric(&text, "verge_trace_spans_dropped_total") >= 200.0).then_some(text)
    });
    assert_eq!(metric(&text, "verge_trace_spans_exported_total"), 0.0);
    assert!(
        node.log().contains("could not export spans"),
        "{}",
        node.log()
    );
}

/// The value of an unlabelled sample in exposition text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// A real Prometheus scraping `target` (host:port) every second at
    /// /v1/metrics with `token`.
    fn start(target: &str, token: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, token).unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: verge\n    metrics_path: /v1/metrics\n    authorization:\n      credentials_file: {}\n    static_configs:\n      - targets: ['{target}']\n",
                token_file.display()
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package `prometheus`; scripts/test installs it)");
        let p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let client = reqwest::blocking::Client::new();
        eventually("prometheus is ready", || {
            client
                .get(format!("{}/-/ready", p.url))
                .send()
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        });
        p
    }

    /// An instant PromQL query: each series' labels and value.
    fn query(&self, promql: &str) -> Vec<(HashMap<String, String>, f64)> {
        let v: serde_json::Value = reqwest::blocking::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", promql)])
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(v["status"], "success", "{v}");
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                    .collect();
                let value = r["value"][1].as_str().unwrap().parse::<f64>().unwrap();
                (labels, value)
            })
            .collect()
    }

    fn by_outcome(&self, promql: &str) -> HashMap<String, f64> {
        self.query(promql)
            .into_iter()
            .map(|(l, v)| (l.get("outcome").cloned().unwrap_or_default(), v))
            .collect()
    }
}

/// The time histogram's bounds (the node's `TIME_BUCKETS`), seconds.
const TIME_BUCKETS: [f64; 17] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

#[test]
fn prometheus_scrapes_a_node_and_agrees_with_its_ledger() {
    let node = TestNode::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    node.deploy("rust-hello", "hello", "/hello");
    node.deploy("rust-trap", "boom", "/boom");
    let created: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["token", "create", "scraper", "--metrics", "--json"]))
            .unwrap();
    let token = created["token"].as_str().unwrap().to_string();
    // The metrics token reads metrics and nothing else.
    let client = node.http();
    let get = |path: &str, token: &str| {
        client
            .get(format!("{}{path}", node.url))
            .bearer_auth(token)
            .send()
            .unwrap()
    };
    assert_eq!(get("/v1/metrics", &token).status(), 200);
    assert_eq!(get("/v1/functions", &token).status(), 403);
    assert_eq!(get("/v1/metrics", "verge_wrong").status(), 401);
    // The metrics listener needs no token.
    let listener = node
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("metrics         "))
        .and_then(|l| l.split_whitespace().next())
        .expect("verge up prints the metrics URL")
        .to_string();
    let open = client.get(&listener).send().unwrap();
    assert_eq!(open.status(), 200);
    assert!(
        open.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(
        open.text()
            .unwrap()
            .contains("process_resident_memory_bytes")
    );

    let target = node.url.trim_start_matches("http://").to_string();
    let prom = Prometheus::start(&target, &token);
    let send = |path: &str, n: usize| {
        for _ in 0..n {
            let _ = client.get(format!("{}{path}", node.url)).send().unwrap();
        }
    };
    send("/hello", 30);
    eventually("prometheus saw the first 30", || {
        let seen =
            prom.by_outcome(r#"sum by (outcome) (verge_invocations_total{function="hello"})"#);
        (seen.get("ok") == Some(&30.0)).then_some(())
    });
    send("/hello", 30);
    send("/boom", 15);
    let seen = eventually("prometheus saw every invocation", || {
        let seen = prom.by_outcome(r#"sum by (outcome) (verge_invocations_total)"#);
        (seen.get("ok") == Some(&60.0) && seen.get("trap") == Some(&15.0)).then_some(seen)
    });
    // The ledger (verge invocations) counts the same.
    let records: Vec<serde_json::Value> =
        serde_json::from_str(&node.cli_ok(&["invocations", "--limit", "1000", "--json"])).unwrap();
    let mut ledger: HashMap<String, f64> = HashMap::new();
    for r in &records {
        *ledger
            .entry(r["outcome"].as_str().unwrap().to_string())
            .or_default() += 1.0;
    }
    assert_eq!(seen, ledger);
    // And `verge usage` has the same invocations per function.
    let usage: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["usage", "--by", "function", "--json"])).unwrap();
    let per_function = prom.query("sum by (function) (verge_invocations_total)");
    for (labels, value) in &per_function {
        let f = &labels["function"];
        let row = usage["rows"]
            .as_array()
            .or_else(|| usage.as_array())
            .unwrap()
            .iter()
            .find(|r| &r["key"] == f)
            .unwrap_or_else(|| panic!("{f} in {usage}"));
        assert_eq!(row["invocations"].as_f64().unwrap(), *value, "{f}: {usage}");
    }
    // The rate by outcome is there for both functions' outcomes.
    // (A rate needs two scrapes of a series: the traps' came last.)
    let rates = eventually("a rate for both outcomes", || {
        let rates = prom.by_outcome(r#"sum by (outcome) (rate(verge_invocations_total[1m]))"#);
        rates.contains_key("trap").then_some(rates)
    });
    assert!(rates.get("ok").is_some_and(|r| *r > 0.0), "{rates:?}");
    // The median from the histogram falls in the bucket of the ledger's
    // median wall time (PromQL ranks the 30th of 60).
    let mut walls: Vec<f64> = records
        .iter()
        .filter(|r| r["function"] == "hello")
        .map(|r| r["wall_us"].as_f64().unwrap() / 1e6)
        .collect();
    walls.sort_by(f64::total_cmp);
    let median = walls[walls.len() / 2 - 1];
    let upper = TIME_BUCKETS
        .iter()
        .copied()
        .find(|b| median <= *b)
        .unwrap_or(f64::INFINITY);
    let lower = TIME_BUCKETS
        .iter()
        .copied()
        .filter(|b| *b < median)
        .fold(0.0, f64::max);
    let q = prom.query(
        r#"histogram_quantile(0.5, sum by (le) (verge_invocation_duration_seconds_bucket{function="hello"}))"#,
    );
    let estimate = q[0].1;
    assert!(
        lower <= estimate && estimate <= upper,
        "histogram median {estimate} outside the ledger median's bucket ({lower}, {upper}]"
    );
    // Cold starts: one per function.
    let cold = prom.query("sum(verge_cold_starts_total)");
    assert_eq!(cold[0].1, 2.0);
}

#[test]
fn verge_top_shows_the_function_under_load() {
    if Command::new("tmux").arg("-V").output().is_err() {
        panic!("tmux is missing; scripts/test installs it");
    }
    let node = TestNode::start();
    node.deploy("rust-hello", "hello", "/hello");
    node.deploy("c-hello", "idle", "/idle");
    let _ = node
        .http()
        .get(format!("{}/idle", node.url))
        .send()
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (url, stop) = (format!("{}/hello", node.url), stop.clone());
        std::thread::spawn(move || {
            let client = reqwest::blocking::Client::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = client.get(&url).send();
            }
        })
    };
    // For scripts: one interval's figures as JSON.
    let view: serde_json::Value = serde_json::from_str(&node.cli_ok(&["top", "--json"])).unwrap();
    let hello = view["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["function"] == "hello")
        .expect("hello in the view")
        .clone();
    assert!(
        hello["requests_per_second"].as_f64().unwrap() > 0.0,
        "{view}"
    );
    assert!(hello["p50_ms"].as_f64().is_some(), "{view}");
    assert_eq!(
        view["functions"][0]["function"], "hello",
        "busiest first: {view}"
    );

    // On a terminal: tmux runs it, its screen shows the function.
    let session = format!("verge-top-{}", std::process::id());
    let command = format!(
        "{} --server {} --token {} top",
        crate::kit::VERGE,
        node.url,
        node.token()
    );
    let started = Command::new("tmux")
        .args([
            "new-session",
            "-d",
            "-s",
            &session,
            "-x",
            "160",
            "-y",
            "30",
            &command,
        ])
        .status()
        .unwrap();
    assert!(started.success());
    let capture = || {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &session])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let screen = eventually("verge top shows hello with requests per second", || {
        let screen = capture();
        let row = screen.lines().find(|l| l.contains("hello"))?.to_string();
        let mut words = row.split_whitespace().skip_while(|w| !w.contains("hello"));
        let rate: f64 = words.nth(1)?.parse().ok()?;
        (rate > 0.0 && screen.contains("REQ/S")).then_some(screen)
    });
    assert!(screen.contains("verge top: node"), "{screen}");
    assert!(screen.contains("idle"), "{screen}");
    // q quits and gives the terminal back.
    Command::new("tmux")
        .args(["send-keys", "-t", &session, "q"])
        .status()
        .unwrap();
    eventually("verge top quit on q", || {
        let alive = Command::new("tmux")
            .args(["has-session", "-t", &session])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        (!alive).then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.join().unwrap();
    let err = node.cli_err(&["top"]);
    assert!(err.contains("verge top --json"), "{err}");
}

#[test]
fn only_sampled_traces_are_exported() {
    let receiver = Receiver::start(false);
    let node = TestNode::start_with(&["--otlp-endpoint", &receiver.url, "--trace-sample", "0"]);
    node.deploy("rust-hello", "hello", "/hello");
    let client = node.http();
    let get = |traceparent: Option<String>| {
        let mut r = client.get(format!("{}/hello", node.url));
        if let Some(t) = traceparent {
            r = r.header("traceparent", t);
        }
        let answer = r.send().unwrap();
        assert_eq!(answer.status(), 200);
        answer.headers()["traceparent"]
            .to_str()
            .unwrap()
            .to_string()
    };
    // Traces that start here: none sampled (their flags say so).
    for _ in 0..5 {
        assert!(get(None).ends_with("-00"));
    }
    // A parent that was not sampled: neither.
    get(Some(format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-00")));
    // A sampled parent: exported, whatever the node's own ratio.
    let sampled = get(Some(format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")));
    assert!(sampled.ends_with("-01"), "{sampled}");
    let spans = eventually("the sampled span arrives", || {
        let spans = receiver.spans();
        (!spans.is_empty()).then_some(spans)
    });
    // Spans travel in order: the unsampled ones, earlier, never came.
    let invocations: Vec<&Span> = spans.iter().filter(|s| s.name == "hello").collect();
    assert_eq!(invocations.len(), 1, "{spans:#?}");
    assert_eq!(hex(&invocations[0].parent_span_id), CLIENT_SPAN);
    // Every invocation is still in the ledger with its trace.
    let all: Vec<serde_json::Value> =
        serde_json::from_str(&node.cli_ok(&["invocations", "hello", "--json"])).unwrap();
    assert_eq!(all.len(), 7);
    let err = node.cli_err(&["up", "--trace-sample", "2"]);
    assert!(
        err.contains("--trace-sample 2 must be between 0 and 1"),
        "{err}"
    );
}
