//! `verge top`: a live view of what a node's functions are doing, made from
//! two scrapes of its metrics (`/v1/metrics`) a second apart.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};

use crate::client::Client;

/// Outcomes that are the guest's failures (`capacity` and
/// `request_too_large` are refusals, counted apart).
const FAILURES: [&str; 6] = [
    "trap",
    "timeout",
    "memory_limit",
    "no_response",
    "error_response",
    "instantiate",
];

/// One sample line of the exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses Prometheus / OpenMetrics text (comments and exemplars skipped).
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // An exemplar follows " # ".
        let line = line.split(" # ").next().unwrap_or(line);
        let (name, labels, rest) = match line.find('{') {
            Some(open) => {
                let Some(close) = line[open..].find('}').map(|c| open + c) else {
                    continue;
                };
                (
                    &line[..open],
                    parse_labels(&line[open + 1..close]),
                    &line[close + 1..],
                )
            }
            None => match line.split_once(' ') {
                Some((n, rest)) => (n, Vec::new(), rest),
                None => continue,
            },
        };
        let Some(value) = rest.split_whitespace().next() else {
            continue;
        };
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => match v.parse::<f64>() {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 1..];
        let Some(body) = after.strip_prefix('"') else {
            break;
        };
        let mut value = String::new();
        let mut chars = body.char_indices();
        let mut end = body.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key, value));
        rest = &body[end.min(body.len())..];
    }
    out
}

/// A function's counters in one scrape (summed over its versions).
#[derive(Debug, Clone, Default)]
struct Counters {
    invocations: f64,
    failures: f64,
    refused: f64,
    cpu_seconds: f64,
    memory_sum: f64,
    memory_count: f64,
    /// Cumulative duration buckets by upper bound.
    buckets: BTreeMap<OrderedBound, f64>,
    waiting: f64,
}

/// An `le` bound that sorts (+Inf last).
#[derive(Debug, Clone, Copy, PartialEq)]
struct OrderedBound(f64);
impl Eq for OrderedBound {}
impl Ord for OrderedBound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}
impl PartialOrd for OrderedBound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The node's figures in one scrape.
#[derive(Debug, Clone, Default)]
struct Scrape {
    functions: BTreeMap<String, Counters>,
    node: String,
    running: f64,
    queued: f64,
    jobs: f64,
    resident: f64,
    cpu: f64,
}

fn scrape_of(samples: &[Sample]) -> Scrape {
    let mut s = Scrape::default();
    for x in samples {
        let function = x.label("function").map(str::to_string);
        fn entry<'a>(
            functions: &'a mut BTreeMap<String, Counters>,
            f: &Option<String>,
        ) -> Option<&'a mut Counters> {
            f.as_ref().map(|f| functions.entry(f.clone()).or_default())
        }
        match x.name.as_str() {
            "verge_invocations_total" => {
                if let Some(c) = entry(&mut s.functions, &function) {
                    match x.label("outcome") {
                        Some("capacity" | "request_too_large") => c.refused += x.value,
                        Some(o) if FAILURES.contains(&o) => {
                            c.failures += x.value;
                            c.invocations += x.value;
                        }
                        _ => c.invocations += x.value,
                    }
                }
            }
            "verge_invocation_cpu_seconds_sum" => {
                if let Some(c) = entry(&mut s.functions, &function) {
                    c.cpu_seconds += x.value;
                }
            }
            "verge_invocation_peak_memory_bytes_sum" => {
                if let Some(c) = entry(&mut s.functions, &function) {
                    c.memory_sum += x.value;
                }
            }
            "verge_invocation_peak_memory_bytes_count" => {
                if let Some(c) = entry(&mut s.functions, &function) {
                    c.memory_count += x.value;
                }
            }
            "verge_invocation_duration_seconds_bucket" => {
                let le = match x.label("le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(v) => v.parse().unwrap_or(f64::INFINITY),
                    None => continue,
                };
                if let Some(c) = entry(&mut s.functions, &function) {
                    *c.buckets.entry(OrderedBound(le)).or_default() += x.value;
                }
            }
            "verge_admission_waiting" => {
                if let Some(c) = entry(&mut s.functions, &function) {
                    c.waiting += x.value;
                }
            }
            "verge_node" => s.node = x.label("node").unwrap_or_default().to_string(),
            "verge_invocations_running" => s.running = x.value,
            "verge_admission_queued" => s.queued = x.value,
            "verge_jobs_queued" => s.jobs = x.value,
            "process_resident_memory_bytes" => s.resident = x.value,
            "process_cpu_seconds_total" => s.cpu = x.value,
            _ => {}
        }
    }
    s
}

/// What one function did between two scrapes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rate {
    pub function: String,
    pub requests_per_second: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub errors_per_second: f64,
    pub refused_per_second: f64,
    /// CPU the function used, in cores (1.0: one core all the time).
    pub cpu_cores: f64,
    /// Mean peak memory of its invocations, bytes.
    pub memory_bytes: Option<f64>,
    pub queue: f64,
}

/// The node's figures between two scrapes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct View {
    pub node: String,
    pub interval_seconds: f64,
    pub running: f64,
    pub queued: f64,
    pub jobs_queued: f64,
    pub resident_bytes: f64,
    pub node_cpu_cores: f64,
    pub functions: Vec<Rate>,
}

/// The q-quantile of the observations between two cumulative bucket sets,
/// interpolated within its bucket (as PromQL's `histogram_quantile`).
fn quantile(
    q: f64,
    before: &BTreeMap<OrderedBound, f64>,
    after: &BTreeMap<OrderedBound, f64>,
) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| (le.0, n - before.get(le).copied().unwrap_or(0.0)))
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (le, count) in delta {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = count - lower.1;
            let share = if within > 0.0 {
                (rank - lower.1) / within
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * share);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

fn view(before: &Scrape, after: &Scrape, dt: f64) -> View {
    let dt = dt.max(1e-3);
    let empty = Counters::default();
    let mut functions: Vec<Rate> = after
        .functions
        .iter()
        .map(|(name, a)| {
            let b = before.functions.get(name).unwrap_or(&empty);
            let calls = (a.memory_count - b.memory_count).max(0.0);
            Rate {
                function: name.clone(),
                requests_per_second: (a.invocations - b.invocations).max(0.0) / dt,
                p50_ms: quantile(0.5, &b.buckets, &a.buckets).map(|s| s * 1e3),
                p99_ms: quantile(0.99, &b.buckets, &a.buckets).map(|s| s * 1e3),
                errors_per_second: (a.failures - b.failures).max(0.0) / dt,
                refused_per_second: (a.refused - b.refused).max(0.0) / dt,
                cpu_cores: (a.cpu_seconds - b.cpu_seconds).max(0.0) / dt,
                memory_bytes: (calls > 0.0).then(|| (a.memory_sum - b.memory_sum) / calls),
                queue: a.waiting,
            }
        })
        .collect();
    functions.sort_by(|x, y| {
        y.requests_per_second
            .total_cmp(&x.requests_per_second)
            .then_with(|| x.function.cmp(&y.function))
    });
    View {
        node: after.node.clone(),
        interval_seconds: dt,
        running: after.running,
        queued: after.queued,
        jobs_queued: after.jobs,
        resident_bytes: after.resident,
        node_cpu_cores: (after.cpu - before.cpu).max(0.0) / dt,
        functions,
    }
}

async fn fetch(client: &Client) -> Result<Scrape> {
    let response = client
        .send(client.request(reqwest::Method::GET, "/v1/metrics"))
        .await?;
    let text = response
        .text()
        .await
        .context("could not read the node's metrics")?;
    Ok(scrape_of(&parse(&text)))
}

fn ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v < 10.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.0}"),
    }
}

fn bytes(v: f64) -> String {
    if v >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", v / (1u64 << 30) as f64)
    } else if v >= (1 << 20) as f64 {
        format!("{:.1} MiB", v / (1 << 20) as f64)
    } else {
        format!("{:.0} KiB", v / 1024.0)
    }
}

fn draw(frame: &mut ratatui::Frame, v: &View, url: &str) {
    let [head, body] =
        Layout::vertical([Constraint::Length(3), Constraint::Min(3)]).areas(frame.area());
    let summary = vec![
        Line::from(format!(
            "verge top: node {} at {url}, every {:.0} s (q quits)",
            if v.node.is_empty() { "?" } else { &v.node },
            v.interval_seconds
        )),
        Line::from(format!(
            "running {:.0}  queued {:.0}  jobs {:.0}  node CPU {:.0}%  RSS {}  functions seen {}",
            v.running,
            v.queued,
            v.jobs_queued,
            v.node_cpu_cores * 100.0,
            bytes(v.resident_bytes),
            v.functions.len()
        )),
    ];
    frame.render_widget(Paragraph::new(summary), head);
    let header = Row::new([
        "FUNCTION", "REQ/S", "P50 ms", "P99 ms", "ERR/S", "503/S", "CPU", "MEM", "QUEUE",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD | Modifier::REVERSED));
    let rows = v.functions.iter().map(|r| {
        Row::new([
            r.function.clone(),
            format!("{:.1}", r.requests_per_second),
            ms(r.p50_ms),
            ms(r.p99_ms),
            format!("{:.1}", r.errors_per_second),
            format!("{:.1}", r.refused_per_second),
            format!("{:.0}%", r.cpu_cores * 100.0),
            r.memory_bytes.map(bytes).unwrap_or_else(|| "-".into()),
            format!("{:.0}", r.queue),
        ])
    });
    let widths = [
        Constraint::Min(16),
        Constraint::Length(9),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(6),
        Constraint::Length(10),
        Constraint::Length(6),
    ];
    frame.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(Block::bordered().title("functions, busiest first")),
        body,
    );
}

/// Waits up to `d` for a key; true when the user asked to quit.
fn quit_within(d: Duration) -> Result<bool> {
    let until = Instant::now() + d;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        if event::poll(left)?
            && let Event::Key(k) = event::read()?
            && k.kind == KeyEventKind::Press
        {
            let ctrl_c =
                k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c');
            if ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                return Ok(true);
            }
        }
    }
}

/// `verge top`: refreshes every `interval` until q; with `json`, prints
/// one interval's figures and returns.
pub async fn run(client: &Client, json: bool, interval: Duration) -> Result<()> {
    let mut before = fetch(client).await?;
    let mut at = Instant::now();
    if json {
        tokio::time::sleep(interval).await;
        let after = fetch(client).await?;
        let v = view(&before, &after, at.elapsed().as_secs_f64());
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        anyhow::bail!("verge top draws on a terminal; for scripts use `verge top --json`");
    }
    let url = client.base_url().to_string();
    let mut terminal = ratatui::init();
    let result: Result<()> = async {
        let mut current = view(&before, &before, 1.0);
        loop {
            terminal.draw(|f| draw(f, &current, &url))?;
            if tokio::task::block_in_place(|| quit_within(interval))? {
                return Ok(());
            }
            let after = fetch(client).await?;
            current = view(&before, &after, at.elapsed().as_secs_f64());
            before = after;
            at = Instant::now();
        }
    }
    .await;
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP verge_invocations Invocations.
# TYPE verge_invocations counter
verge_invocations_total{function="a",version="1",outcome="ok"} 90
verge_invocations_total{function="a",version="2",outcome="trap"} 10
verge_invocations_total{function="a",version="2",outcome="capacity"} 5
verge_invocation_duration_seconds_bucket{le="0.001",function="a",version="1"} 50
verge_invocation_duration_seconds_bucket{le="0.01",function="a",version="1"} 100
verge_invocation_duration_seconds_bucket{le="+Inf",function="a",version="1"} 100
verge_node{node="n \"1\""} 1
# EOF
"#;

    #[test]
    fn exposition_text_parses() {
        let samples = parse(TEXT);
        assert_eq!(samples.len(), 7);
        assert_eq!(samples[3].label("le"), Some("0.001"));
        assert_eq!(samples[5].label("le"), Some("+Inf"));
        assert_eq!(samples[6].label("node"), Some("n \"1\""));
        let s = scrape_of(&samples);
        let a = &s.functions["a"];
        assert_eq!(a.invocations, 100.0);
        assert_eq!(a.failures, 10.0);
        assert_eq!(a.refused, 5.0);
    }

    #[test]
    fn rates_and_quantiles_come_from_deltas() {
        let before = scrape_of(&parse(TEXT));
        let later = TEXT
            .replace("outcome=\"ok\"} 90", "outcome=\"ok\"} 290")
            .replace("version=\"1\"} 50", "version=\"1\"} 250")
            .replace("version=\"1\"} 100", "version=\"1\"} 300");
        let after = scrape_of(&parse(&later));
        let v = view(&before, &after, 2.0);
        let a = &v.functions[0];
        assert_eq!(a.requests_per_second, 100.0);
        // All 200 new observations are under 1 ms: p50 at half the bucket.
        assert!((a.p50_ms.unwrap() - 0.5).abs() < 1e-9, "{:?}", a.p50_ms);
        assert_eq!(a.errors_per_second, 0.0);
        let idle = view(&after, &after, 1.0);
        assert_eq!(idle.functions[0].p50_ms, None);
    }
}
