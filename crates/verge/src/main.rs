//! `verge`: the command-line interface and the node's entry point. The only
//! crate that knows clap.

mod client;
mod events;
mod grants;
mod kv;
mod table;
mod top;
mod versions;

use std::collections::HashMap;
use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use verge_node::Tiering;
use verge_spec::{
    DeployResponse, FunctionDetail, FunctionSummary, INVOCATION_ID_HEADER, LIVE_ALIAS, Route,
    RouteRequest,
};

use client::{Client, default_data_dir};
use verge_spec::{parse_duration, parse_size};

/// The example component bundled with the binary (source: examples/hello/).
const EXAMPLE_WASM: &[u8] = include_bytes!("../../../examples/hello.wasm");

#[derive(Parser)]
#[command(
    name = "verge",
    version,
    about = "Verge: serverless WebAssembly functions, from the datacenter to the edge"
)]
struct Cli {
    /// URL of the node to talk to [default: the node in --data-dir, else http://127.0.0.1:8080]
    #[arg(long, global = true, env = "VERGE_SERVER")]
    server: Option<String>,
    /// API token [default: <data-dir>/admin.token]
    #[arg(long, global = true, env = "VERGE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Node data directory [default: $XDG_DATA_HOME/verge or ~/.local/share/verge]
    #[arg(long, global = true, env = "VERGE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Print JSON for scripts instead of tables
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// The options of a node (`verge up`, `verge edge`).
#[derive(clap::Args)]
struct UpArgs {
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1:8080", env = "VERGE_LISTEN")]
    listen: SocketAddr,
    /// Deploy the bundled example function "hello" on /hello if absent
    #[arg(long)]
    example: bool,
    /// The node's log on standard error: lines for people, or JSON objects, one
    /// per line, with each event's fields (function, version, invocation, ...)
    #[arg(long, value_enum, default_value = "text", env = "VERGE_LOG_FORMAT")]
    log_format: LogFormat,
    /// Largest component upload accepted
    #[arg(long, default_value = "64MiB")]
    max_upload: String,
    /// Wall-clock limit of one invocation
    #[arg(long, default_value = "30s")]
    timeout: String,
    /// Linear memory limit of one guest
    #[arg(long, default_value = "128MiB")]
    memory: String,
    /// Instances that may run at once on this node
    #[arg(long, default_value_t = 1000)]
    max_instances: u32,
    /// Requests that may wait for a concurrency slot; beyond that: 503
    #[arg(long, default_value_t = 1000)]
    queue_depth: usize,
    /// Longest a request waits for a slot; beyond that: 503
    #[arg(long, default_value = "10s")]
    max_wait: String,
    /// Largest request body of a function invocation
    #[arg(long, default_value = "16MiB")]
    max_request_body: String,
    /// Largest response body of a function invocation (longer ones are cut)
    #[arg(long, default_value = "64MiB")]
    max_response_body: String,
    /// Bytes of stdout and of stderr kept per invocation (more is truncated and marked)
    #[arg(long, default_value = "64KiB")]
    log_limit: String,
    /// Turn metering off (no usage records): only to measure what it costs
    #[arg(long, hide = true)]
    no_metering: bool,
    /// Versions kept per function, besides those an alias points at or would roll back to
    #[arg(long, default_value_t = 10)]
    keep_versions: usize,
    /// Machine code: auto (components from 1 MiB serve on baseline code at once,
    /// optimized code replaces it in the background), optimized, or baseline
    #[arg(long, default_value = "auto", value_parser = ["auto", "optimized", "baseline"])]
    code: String,
    /// How instances get their memory: resident (data copied into pool slots
    /// that stay resident between requests, up to an eighth of --memory each:
    /// fastest) or shared (copy-on-write images, decommitted after each
    /// request: least memory)
    #[arg(long, default_value = "resident", value_parser = ["resident", "shared"])]
    instance_memory: String,
    /// This node's name, the source of its events (/verge/nodes/NAME) [default: the host name]
    #[arg(long)]
    node_name: Option<String>,
    /// First retry delay of a failed asynchronous job (doubles per attempt)
    #[arg(long, default_value = "1s")]
    retry_base: String,
    /// Functions a chain of events or of calls between functions may go through
    /// before it is stopped (a loop)
    #[arg(long, default_value_t = 16)]
    hop_limit: u32,
    /// Another node to replicate the key-value store to (repeatable), for example http://core:8080
    #[arg(long = "peer", value_name = "URL")]
    peers: Vec<String>,
    /// The token the peers accept (their admin token)
    #[arg(long, env = "VERGE_PEER_TOKEN", hide_env_values = true)]
    peer_token: Option<String>,
    /// CPU time after which an invocation continues on lower-priority threads,
    /// so that long-running guests cannot starve short requests ("off": never)
    #[arg(long, default_value = "20ms")]
    demote_after: String,
    /// How long a key-value delete waits for a silent replica: after it, the
    /// tombstone is collected and the replica must re-bootstrap (e.g. 7d, 12h, 90s)
    #[arg(long, default_value = "7d")]
    kv_grace: String,
    /// Longest a client may take to send a request's head; then the connection is closed
    #[arg(long, default_value = "10s")]
    header_timeout: String,
    /// Longest a request body may send nothing; then it is cut and its invocation ends
    #[arg(long, default_value = "10s")]
    body_timeout: String,
    /// Instances one function may hold at once unless its version sets --concurrency
    /// (a fair share, so that a flood on one route leaves the others answering)
    /// [default: a quarter of what the node can run at once: --max-instances, or
    /// --memory-budget / --memory if fewer]
    #[arg(long)]
    function_concurrency: Option<u32>,
    /// How long invocation records (with their output), finished jobs and dead
    /// letters are kept; usage is rolled up per minute before records go
    #[arg(long, default_value = "7d")]
    retain: String,
    /// Most bytes the invocation records, and the finished jobs and dead letters,
    /// may each take on disk; beyond, the oldest go first
    #[arg(long, default_value = "1GiB")]
    retain_size: String,
    /// Memory the guest instances may hold at once: each running invocation holds its
    /// memory limit of it; beyond, requests queue, then get 503
    /// [default: half the machine's memory]
    #[arg(long)]
    memory_budget: Option<String>,
    /// Join a cluster: its NATS JetStream server(s), nats://HOST:PORT (comma-separated
    /// for several); the registry, artifacts and tokens then live there, and every node
    /// on it serves every function [default: this machine on its own]
    #[arg(long, env = "VERGE_NATS", value_name = "URL")]
    nats: Option<String>,
    /// NATS credentials file (.creds) for --nats
    #[arg(long, value_name = "FILE", requires = "nats")]
    nats_creds: Option<PathBuf>,
    /// JetStream domain for --nats (a leaf server's own domain)
    #[arg(long, value_name = "DOMAIN", requires = "nats")]
    nats_domain: Option<String>,
    /// Replicas of each bucket when this node creates them [default: 3 when the NATS
    /// cluster has 3 or more servers, else 1]
    #[arg(long, value_name = "N", requires = "nats", value_parser = clap::value_parser!(u8).range(1..=5))]
    nats_replicas: Option<u8>,
    /// A label of this node, key=value (repeatable), for example site=ship-7 or
    /// region=eu: a version deployed with --place runs only on nodes with its labels
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// The key that seals secrets (64 hex digits; give every node of a cluster the
    /// same one) [default: secret.key in the data directory, made at the first start]
    #[arg(long, value_name = "FILE", env = "VERGE_SECRET_KEY_FILE")]
    secret_key_file: Option<PathBuf>,
    /// Resolve NAME to ADDR for guests' outbound requests without DNS, like curl's
    /// --resolve (repeatable); the address is still checked like any other
    #[arg(long = "outbound-resolve", value_name = "NAME=ADDR")]
    outbound_resolve: Vec<String>,
    /// Largest response body a guest's outbound request may receive
    #[arg(long, default_value = "64MiB")]
    outbound_max_response: String,
    /// Outbound requests one invocation may have open at once
    #[arg(long, default_value_t = 16)]
    outbound_concurrency: usize,
    /// Export traces (a span per invocation) with OTLP over HTTP to this collector,
    /// for example http://127.0.0.1:4318 (/v1/traces is added to a URL without a path)
    #[arg(long, value_name = "URL", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// The share of traces starting at this node that are exported (0 to 1); an
    /// invocation with a parent follows the parent's sampled flag
    #[arg(long, default_value_t = 1.0, value_name = "RATIO")]
    trace_sample: f64,
    /// Drop the loaded code of a version not called for this long; its next request
    /// loads it again from the on-disk compile cache (a few ms) ("off": never)
    #[arg(long, default_value = "10m")]
    unload_after: String,
    /// Loaded code kept at most; past it, the least recently used versions' code is
    /// dropped ("off": no bound)
    #[arg(long, default_value = "1GiB")]
    code_memory: String,
    /// Also serve GET /metrics (Prometheus) without a token on this address, for
    /// example 127.0.0.1:9464 [default: only /v1/metrics, with a metrics or admin token]
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// How long an event delivery or async job stays with a node that stopped
    /// answering (killed, cut off) before another node of the cluster runs it
    #[arg(
        long,
        value_name = "DURATION",
        requires = "nats",
        default_value = "30s"
    )]
    job_lease: String,
}

// Parsed once per process: the size of the largest variant (`up`'s flags)
// costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Start a node: the control API and user routes on one address
    Up(UpArgs),
    /// Start an edge node: beside its site's NATS leaf server, serving from local
    /// copies of the registry and components, also while its link to the core is cut
    Edge {
        /// The edge's site (its leaf server's JetStream domain is edge-SITE); also
        /// the node's label site=SITE
        #[arg(long)]
        site: String,
        #[command(flatten)]
        up: UpArgs,
    },
    /// Deploy a component as a new version of a function and make it live
    Deploy {
        /// The component (.wasm, wasi:http proxy world)
        file: PathBuf,
        /// Function name ([a-z0-9-], at most 63)
        #[arg(long)]
        name: String,
        /// Path prefix to serve the function on (repeatable)
        #[arg(long)]
        route: Vec<String>,
        /// Bind the routes to this host only
        #[arg(long)]
        host: Option<String>,
        /// KEY=VALUE the guest sees in its environment (repeatable)
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// Time limit of this version (for example 10s) [default: the node's]
        #[arg(long)]
        timeout: Option<String>,
        /// Memory limit of this version (for example 64MiB) [default: the node's]
        #[arg(long)]
        memory: Option<String>,
        /// Invocations of this version that may run at once [default: only the node's cap]
        #[arg(long)]
        concurrency: Option<u32>,
        /// Let one instance serve up to N requests, one after another
        /// (state persists between them; see docs/performance.md) [default: 1, a fresh instance per request]
        #[arg(long, value_name = "N")]
        reuse: Option<u32>,
        /// Keep up to K never-used instances made ahead of requests [default: 0]
        #[arg(long, value_name = "K")]
        prewarm: Option<u32>,
        /// Largest request body of this version (for example 1MiB) [default: the node's]
        #[arg(long)]
        max_request_body: Option<String>,
        /// Largest response body of this version [default: the node's]
        #[arg(long)]
        max_response_body: Option<String>,
        /// Bytes of stdout and of stderr kept per invocation [default: the node's]
        #[arg(long)]
        log_limit: Option<String>,
        /// Create the version without pointing `live` at it (call it by version, then `verge promote`)
        #[arg(long)]
        no_promote: bool,
        /// A key-value bucket the version may open with wasi:keyvalue (repeatable)
        #[arg(long = "kv-bucket", value_name = "BUCKET")]
        kv_buckets: Vec<String>,
        /// The tenant whose buckets --kv-bucket names [default: default]
        #[arg(long)]
        tenant: Option<String>,
        /// Run the version only on nodes with this label, key=value (repeatable: all of
        /// them), for example --place site=ship-7 or --place region=eu [default: every node]
        #[arg(long = "place", value_name = "KEY=VALUE")]
        place: Vec<String>,
        #[command(flatten)]
        grants: grants::GrantArgs,
        /// Wait until every node the version is placed on has it ready (its code
        /// loaded), and print how long each took (at most 60 s)
        #[arg(long)]
        wait: bool,
    },
    /// List a function's versions, the aliases on each, and their code
    Versions { name: String },
    /// Point an alias (default live) at one version: all of its traffic
    Promote {
        name: String,
        version: u64,
        #[arg(long, default_value = LIVE_ALIAS)]
        alias: String,
    },
    /// Send a share of an alias's traffic (default live) to a version
    Canary {
        name: String,
        version: u64,
        /// Percent of requests the canary gets (1-99)
        #[arg(long)]
        weight: u32,
        /// Requests with the same value of this header always get the same version
        #[arg(long)]
        sticky_header: Option<String>,
        /// Requests with the same value of this cookie always get the same version
        #[arg(long)]
        sticky_cookie: Option<String>,
        #[arg(long, default_value = LIVE_ALIAS)]
        alias: String,
    },
    /// Point an alias (default live) back at its previous target
    Rollback {
        name: String,
        #[arg(long, default_value = LIVE_ALIAS)]
        alias: String,
    },
    /// List, set and remove aliases
    Alias {
        #[command(subcommand)]
        action: versions::AliasAction,
    },
    /// Usage and cost: invocations, GB-seconds, CPU-seconds, bytes out
    Usage {
        /// From: unix ms, or a duration ago (15m, 2h, 7d)
        #[arg(long)]
        since: Option<String>,
        /// Until: unix ms, or a duration ago
        #[arg(long)]
        until: Option<String>,
        /// Group by function, version, hour or minute, or a subject and a time (version,hour)
        #[arg(long, default_value = "function")]
        by: String,
        /// Billing granularity (1ms, 100ms): wall time is rounded up to it
        #[arg(long, default_value = "1ms")]
        granularity: String,
        /// Print CSV for spreadsheets
        #[arg(long)]
        csv: bool,
    },
    /// A live view of the node's functions: requests/s, p50/p99, errors, CPU, memory,
    /// queue, refreshed every second (q quits); --json prints one interval's figures
    Top {
        /// Time between refreshes (for example 1s, 500ms)
        #[arg(long, default_value = "1s")]
        interval: String,
    },
    /// Recent invocations with their usage
    Invocations {
        /// Only this function
        name: Option<String>,
        /// Only this HTTP status
        #[arg(long)]
        status: Option<u16>,
        /// Only this invocation
        #[arg(long)]
        id: Option<String>,
        /// Every invocation of one trace, as a tree of what caused what (the trace id,
        /// or the traceparent response header of its first request)
        #[arg(long, value_name = "ID")]
        trace: Option<String>,
        /// How many (newest first)
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// List functions
    Ls,
    /// Show a function, its versions and routes
    Show { name: String },
    /// Delete a function with its versions and routes
    Rm { name: String },
    /// Call a function (its live alias unless told otherwise) with a POST
    Invoke {
        name: String,
        /// Queue the invocation (202 and an id; retried on failure, then dead-lettered)
        #[arg(long = "async")]
        run_async: bool,
        /// Call this version
        #[arg(long, conflicts_with = "alias")]
        version: Option<u64>,
        /// Call through this alias
        #[arg(long)]
        alias: Option<String>,
        /// Request body: TEXT, @FILE, or - for standard input
        #[arg(long, short)]
        data: Option<String>,
        /// Request path the function sees
        #[arg(long, default_value = "/")]
        path: String,
    },
    /// Captured stdout/stderr of a function's invocations
    Logs {
        name: String,
        /// Only this invocation
        #[arg(long)]
        invocation: Option<String>,
        /// Keep printing new invocations' output as they finish
        #[arg(long, short)]
        follow: bool,
    },
    /// Event triggers: deliver matching CloudEvents to a function
    Trigger {
        #[command(subcommand)]
        action: events::TriggerAction,
    },
    /// Dead-lettered events and asynchronous invocations
    Dlq {
        #[command(subcommand)]
        action: events::DlqAction,
    },
    /// Cron schedules that fire a function
    Schedule {
        #[command(subcommand)]
        action: events::ScheduleAction,
    },
    /// Show or set a function's retries, maximum event age and destinations
    Async {
        name: String,
        /// Retries after the first attempt [default: 2]
        #[arg(long)]
        retries: Option<u32>,
        /// Oldest a queued event or invocation may get (90s, 30m, 6h, 1d) [default: 6h]
        #[arg(long)]
        max_age: Option<String>,
        /// Emit an event of this type when a job succeeds
        #[arg(long)]
        on_success: Option<String>,
        /// Emit an event of this type when a job is dead-lettered
        #[arg(long)]
        on_failure: Option<String>,
    },
    /// The replicated key-value store: buckets, get, set, del, incr, ls
    Kv {
        /// The tenant whose buckets to use (admin tokens; a tenant token always uses its own)
        #[arg(long, global = true)]
        tenant: Option<String>,
        #[command(subcommand)]
        action: kv::KvAction,
    },
    /// Control API tokens: create (admin, or for one tenant's key-value buckets), ls, rm
    Token {
        #[command(subcommand)]
        action: kv::TokenAction,
    },
    /// Secrets functions read through wasi:config: set (from standard input), ls, rm
    Secret {
        #[command(subcommand)]
        action: grants::SecretAction,
    },
    /// List routes, or add and remove them
    Routes {
        #[command(subcommand)]
        action: Option<RoutesAction>,
    },
    /// List the platform's nodes: this one alone, or every node of its cluster
    Nodes,
}

#[derive(Subcommand)]
enum RoutesAction {
    /// List routes
    Ls,
    /// Bind a path prefix (optionally on one host) to a function
    Add {
        path: String,
        #[arg(long)]
        function: String,
        #[arg(long)]
        host: Option<String>,
        /// The function's alias the route resolves through
        #[arg(long, default_value = LIVE_ALIAS)]
        alias: String,
    },
    /// Remove a route
    Rm {
        path: String,
        #[arg(long)]
        host: Option<String>,
    },
}

fn main() -> std::process::ExitCode {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // Errors of the WebAssembly runtime that the host handles on every
        // request (closed streams, for one) would otherwise capture a
        // backtrace each when RUST_BACKTRACE is set: measured at about 5% of
        // the node's CPU. Panics keep their backtraces (RUST_BACKTRACE).
        // SAFETY: the first statement of main, before any thread exists.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("RUST_LIB_BACKTRACE", "0")
        };
    }
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Up(_) | Command::Edge { .. }) {
        // A client command whose output pipe closes (`verge logs -f | head`)
        // ends quietly, as Unix tools do, instead of panicking on the write.
        // Not for `verge up`: a node must survive a client that goes away.
        // SAFETY: before any thread exists; SIG_DFL is a valid disposition.
        #[allow(unsafe_code)]
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let data_dir = cli.data_dir.clone().unwrap_or_else(default_data_dir);
    let node_args = match &cli.command {
        Command::Up(args) => Some((args, None)),
        Command::Edge { site, up } => Some((up, Some(site.clone()))),
        _ => None,
    };
    if let Some((args, site)) = node_args {
        let UpArgs {
            listen,
            example,
            log_format,
            max_upload,
            timeout,
            memory,
            max_instances,
            queue_depth,
            max_wait,
            no_metering,
            max_request_body,
            max_response_body,
            log_limit,
            keep_versions,
            code,
            instance_memory,
            node_name,
            retry_base,
            hop_limit,
            peers,
            peer_token,
            kv_grace,
            demote_after,
            header_timeout,
            body_timeout,
            function_concurrency,
            retain,
            retain_size,
            memory_budget,
            nats,
            nats_creds,
            nats_domain,
            nats_replicas,
            job_lease,
            labels,
            secret_key_file,
            outbound_resolve,
            outbound_max_response,
            outbound_concurrency,
            otlp_endpoint,
            trace_sample,
            metrics_listen,
            unload_after,
            code_memory,
        } = args;
        if !peers.is_empty() && peer_token.is_none() {
            bail!("--peer needs --peer-token (or VERGE_PEER_TOKEN): the token the peer accepts");
        }
        let peers: Vec<verge_node::Peer> = peers
            .iter()
            .map(|url| verge_node::Peer {
                url: url.clone(),
                token: peer_token.clone().unwrap_or_default(),
            })
            .collect();
        let mut config = verge_node::NodeConfig::new(&data_dir);
        config.listen = *listen;
        config.max_upload = parse_size(max_upload).context("--max-upload")? as usize;
        config.timeout = at_most(
            parse_duration(timeout).context("--timeout")?,
            Duration::from_secs(86_400),
            "--timeout",
        )?;
        config.memory_limit = parse_size(memory).context("--memory")? as usize;
        config.max_instances = *max_instances;
        config.queue_depth = *queue_depth;
        config.max_wait = parse_duration(max_wait).context("--max-wait")?;
        config.metering = !*no_metering;
        config.max_request_body =
            parse_size(max_request_body).context("--max-request-body")? as usize;
        config.max_response_body =
            parse_size(max_response_body).context("--max-response-body")? as usize;
        config.log_limit = parse_size(log_limit).context("--log-limit")? as usize;
        config.keep_versions = *keep_versions;
        if let Some(n) = node_name {
            config.node_name = n.clone();
        }
        config.retry_base = parse_duration(retry_base).context("--retry-base")?;
        config.hop_limit = *hop_limit;
        for l in labels {
            let (k, v) = verge_spec::parse_label(l).context("--label")?;
            config.labels.insert(k, v);
        }
        config.peers = peers;
        config.secret_key_file = secret_key_file.clone();
        for entry in outbound_resolve {
            let (name, addr) = entry
                .split_once('=')
                .and_then(|(n, a)| Some((n.trim().to_ascii_lowercase(), a.trim().parse().ok()?)))
                .with_context(|| {
                    format!("--outbound-resolve {entry:?}: write NAME=ADDR, for example api.internal=10.0.0.7")
                })?;
            config.outbound.resolve.entry(name).or_default().push(addr);
        }
        config.outbound.response_limit =
            parse_size(outbound_max_response).context("--outbound-max-response")?;
        if *outbound_concurrency == 0 {
            bail!("--outbound-concurrency must be at least 1");
        }
        config.outbound.max_concurrent = *outbound_concurrency;
        config.otlp_endpoint = otlp_endpoint.clone().filter(|e| !e.is_empty());
        if !(0.0..=1.0).contains(trace_sample) {
            bail!(
                "--trace-sample {trace_sample} must be between 0 and 1 (for example 0.1: one trace in ten)"
            );
        }
        config.trace_sample = *trace_sample;
        config.metrics_listen = *metrics_listen;
        config.kv_grace = parse_duration(kv_grace).context("--kv-grace")?;
        let hour = Duration::from_secs(3600);
        config.read_timeouts = verge_node::ReadTimeouts {
            header: at_most(
                parse_duration(header_timeout).context("--header-timeout")?,
                hour,
                "--header-timeout",
            )?,
            body: at_most(
                parse_duration(body_timeout).context("--body-timeout")?,
                hour,
                "--body-timeout",
            )?,
        };
        if let Some(0) = function_concurrency {
            bail!("--function-concurrency must be at least 1");
        }
        config.function_concurrency = *function_concurrency;
        config.retain = verge_store_retention(retain, retain_size)?;
        config.memory_budget = match memory_budget {
            Some(b) => Some(parse_size(b).context("--memory-budget")?),
            None => None,
        };
        config.unload_after = match unload_after.as_str() {
            "off" => None,
            d => Some(parse_duration(d).context("--unload-after (or off)")?),
        };
        config.code_memory = match code_memory.as_str() {
            "off" => None,
            b => Some(parse_size(b).context("--code-memory (or off)")?),
        };
        config.demote_after = match demote_after.as_str() {
            "off" => None,
            d => Some(parse_duration(d).context("--demote-after (or off)")?),
        };
        config.instance_memory = match instance_memory.as_str() {
            "shared" => verge_node::InstanceMemory::Shared,
            _ => verge_node::InstanceMemory::Resident,
        };
        config.tiering = match code.as_str() {
            "optimized" => Tiering::Off,
            "baseline" => Tiering::BaselineOnly,
            _ => Tiering::default(),
        };
        if let Some(site) = &site {
            let (_, v) = verge_spec::parse_label(&format!("site={site}")).context("--site")?;
            config.labels.insert("site".into(), v);
            if nats.is_none() {
                bail!(
                    "verge edge needs --nats nats://HOST:PORT: its site's leaf server (JetStream domain edge-{site}, linked to the core's servers; see deploy/nats/leaf.conf)"
                );
            }
        }
        if let Some(url) = nats {
            if !url.split(',').all(|u| {
                let u = u.trim();
                ["nats://", "tls://", "ws://", "wss://"]
                    .iter()
                    .any(|p| u.starts_with(p) && u.len() > p.len())
            }) {
                bail!(
                    "--nats {url:?} is not a NATS URL; give nats://HOST:PORT (comma-separated for several servers)"
                );
            }
            config.cluster = Some(verge_node::ClusterOptions {
                url: url.clone(),
                creds: nats_creds.clone(),
                domain: nats_domain.clone(),
                node: config.node_name.clone(),
                replicas: nats_replicas.map(usize::from),
                job_lease: Some(parse_duration(job_lease).context("--job-lease")?),
                site: site.clone(),
            });
        }
        return up(config, *example, *log_format).await;
    }
    let client = Client::discover(cli.server.clone(), cli.token.clone(), &data_dir)?;
    let json = cli.json;
    match cli.command {
        Command::Up(_) | Command::Edge { .. } => unreachable!("handled above"),
        Command::Deploy {
            file,
            name,
            route,
            host,
            env,
            timeout,
            memory,
            concurrency,
            reuse,
            prewarm,
            max_request_body,
            max_response_body,
            log_limit,
            no_promote,
            kv_buckets,
            tenant,
            place,
            grants,
            wait,
        } => {
            let granted = grants.query()?;
            let concurrency = concurrency.map(|c| c.to_string());
            let mut extra = Vec::new();
            for (key, flag, value) in [
                ("max_request_body", "--max-request-body", &max_request_body),
                (
                    "max_response_body",
                    "--max-response-body",
                    &max_response_body,
                ),
                ("log_limit", "--log-limit", &log_limit),
            ] {
                if let Some(v) = value {
                    parse_size(v).context(flag)?;
                    extra.push((key, v.as_str()));
                }
            }
            if let Some(c) = &concurrency {
                extra.push(("concurrency", c.as_str()));
            }
            let (reuse, prewarm) = (reuse.map(|n| n.to_string()), prewarm.map(|k| k.to_string()));
            if let Some(n) = &reuse {
                extra.push(("reuse", n.as_str()));
            }
            if let Some(k) = &prewarm {
                extra.push(("prewarm", k.as_str()));
            }
            if let Some(t) = &timeout {
                parse_duration(t).context("--timeout")?;
                extra.push(("timeout", t.as_str()));
            }
            if let Some(m) = &memory {
                parse_size(m).context("--memory")?;
                extra.push(("memory", m.as_str()));
            }
            if no_promote {
                extra.push(("promote", "false"));
            }
            for b in &kv_buckets {
                extra.push(("kv_bucket", b.as_str()));
            }
            if let Some(t) = &tenant {
                extra.push(("tenant", t.as_str()));
            }
            for p in &place {
                verge_spec::parse_label(p).context("--place")?;
                extra.push(("place", p.as_str()));
            }
            for (k, v) in &granted {
                extra.push((k, v.as_str()));
            }
            // With --json --wait, one document: the deploy and the times.
            let quiet = json && wait;
            let r = deploy(
                &client, json, quiet, &file, &name, &route, host, &env, &extra,
            )
            .await?;
            if wait {
                wait_ready(&client, json, &r, &place).await?;
            }
            Ok(())
        }
        Command::Versions { name } => versions::versions(&client, json, &name).await,
        Command::Promote {
            name,
            version,
            alias,
        } => versions::promote(&client, json, &name, version, &alias).await,
        Command::Canary {
            name,
            version,
            weight,
            sticky_header,
            sticky_cookie,
            alias,
        } => {
            versions::canary(
                &client,
                json,
                &name,
                version,
                weight,
                &alias,
                (sticky_header, sticky_cookie),
            )
            .await
        }
        Command::Rollback { name, alias } => versions::rollback(&client, json, &name, &alias).await,
        Command::Alias { action } => versions::alias(&client, json, action).await,
        Command::Usage {
            since,
            until,
            by,
            granularity,
            csv,
        } => usage(&client, json, since, until, &by, &granularity, csv).await,
        Command::Top { interval } => {
            let every = parse_duration(&interval).context("--interval")?;
            if every < Duration::from_millis(100) {
                bail!("--interval must be at least 100ms");
            }
            top::run(&client, json, every).await
        }
        Command::Invocations {
            trace: Some(trace), ..
        } => trace_tree(&client, json, &trace).await,
        Command::Invocations {
            name,
            status,
            id,
            limit,
            trace: None,
        } => match id {
            Some(id) if id.starts_with("inv_") || id.starts_with("job_") => {
                events::job(&client, json, &id).await
            }
            id => invocations(&client, json, name, status, id, limit).await,
        },
        Command::Ls => {
            let fs: Vec<FunctionSummary> = client.get("/v1/functions").await?;
            if json {
                return print_json(&fs);
            }
            if fs.is_empty() {
                println!(
                    "no functions yet; deploy one with `verge deploy FILE --name NAME --route /path`"
                );
                return Ok(());
            }
            let rows: Vec<Vec<String>> = fs
                .iter()
                .map(|f| {
                    vec![
                        f.name.clone(),
                        f.live.clone(),
                        f.versions.to_string(),
                        table::size(f.size),
                        f.sha256.chars().take(12).collect(),
                        routes_label(&f.routes),
                        f.updated_at.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table::render(
                    &[
                        "NAME", "LIVE", "VERSIONS", "SIZE", "SHA256", "ROUTES", "UPDATED"
                    ],
                    &rows
                )
            );
            Ok(())
        }
        Command::Show { name } => {
            let f: FunctionDetail = client.get(&format!("/v1/functions/{name}")).await?;
            if json {
                return print_json(&f);
            }
            println!("function  {}", f.name);
            println!("created   {}", f.created_at);
            println!("routes    {}", routes_label(&f.routes));
            for a in &f.aliases {
                println!("alias     {} -> {}", a.name, a.target.describe());
            }
            println!();
            let rows: Vec<Vec<String>> = f
                .versions
                .iter()
                .map(|v| {
                    vec![
                        v.version.to_string(),
                        if v.aliases.is_empty() {
                            "-".into()
                        } else {
                            v.aliases.join(",")
                        },
                        table::size(v.size),
                        v.sha256.chars().take(12).collect(),
                        v.env.keys().cloned().collect::<Vec<_>>().join(","),
                        if v.placement.is_empty() {
                            "everywhere".into()
                        } else {
                            v.placement.join(",")
                        },
                        v.code.clone().unwrap_or_else(|| "not loaded".into()),
                        v.created_at.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table::render(
                    &[
                        "VERSION", "ALIASES", "SIZE", "SHA256", "ENV", "PLACED", "CODE", "CREATED"
                    ],
                    &rows
                )
            );
            for v in &f.versions {
                let g = &v.grants;
                let mut lines = Vec::new();
                let list = |l: &[String]| l.join(" ");
                if !g.allow_outbound.is_empty() {
                    lines.push(format!("outbound  {}", list(&g.allow_outbound)));
                }
                if !g.allow_private.is_empty() {
                    lines.push(format!("private   {}", list(&g.allow_private)));
                }
                if g.outbound_ca.is_some() {
                    lines.push("ca        its own (--outbound-ca) and the platform's roots".into());
                }
                if !g.allow_call.is_empty() {
                    lines.push(format!("calls     {}", list(&g.allow_call)));
                }
                for (k, val) in &g.config {
                    lines.push(format!("config    {k}={val}"));
                }
                if !g.secrets.is_empty() {
                    lines.push(format!("secrets   {}", list(&g.secrets)));
                }
                if !lines.is_empty() {
                    println!("\nversion {} may reach:", v.version);
                    for l in lines {
                        println!("  {l}");
                    }
                }
            }
            Ok(())
        }
        Command::Rm { name } => {
            client
                .send(client.request(Method::DELETE, &format!("/v1/functions/{name}")))
                .await?;
            if json {
                return print_json(&serde_json::json!({ "deleted": name }));
            }
            println!("deleted function {name}");
            Ok(())
        }
        Command::Invoke {
            name,
            run_async,
            version,
            alias,
            data,
            path,
        } => {
            let endpoint = match version {
                Some(v) => format!("/v1/functions/{name}/versions/{v}/invoke"),
                None => format!("/v1/functions/{name}/invoke"),
            };
            let mut pairs = vec![("path", path.as_str())];
            if let Some(a) = &alias {
                pairs.push(("alias", a.as_str()));
            }
            if run_async {
                pairs.push(("async", "true"));
            }
            invoke(&client, json, &endpoint, pairs, data, run_async).await
        }
        Command::Trigger { action } => events::trigger(&client, json, action).await,
        Command::Kv { tenant, action } => kv::kv(&client, json, tenant.as_deref(), action).await,
        Command::Token { action } => kv::token(&client, json, action).await,
        Command::Secret { action } => grants::secret(&client, json, action).await,
        Command::Dlq { action } => events::dlq(&client, json, action).await,
        Command::Schedule { action } => events::schedule(&client, json, action).await,
        Command::Async {
            name,
            retries,
            max_age,
            on_success,
            on_failure,
        } => {
            let body = serde_json::json!({
                "max_retries": retries, "max_age": max_age,
                "on_success": on_success, "on_failure": on_failure,
            });
            events::async_config(&client, json, &name, body).await
        }
        Command::Logs {
            name,
            invocation,
            follow,
        } => logs(&client, json, &name, invocation, follow).await,
        Command::Routes { action } => {
            routes(&client, json, action.unwrap_or(RoutesAction::Ls)).await
        }
        Command::Nodes => nodes(&client, json).await,
    }
}

/// `verge deploy --wait`: polls `GET /v1/nodes` until every node the
/// version is placed on lists it as loaded; prints each node's time.
async fn wait_ready(
    client: &Client,
    json: bool,
    r: &DeployResponse,
    place: &[String],
) -> Result<()> {
    let key = format!("{}@{}", r.function, r.version);
    let started = Instant::now();
    let mut ready: std::collections::BTreeMap<String, f64> = Default::default();
    // Edges cut off from the core get the version when their link returns:
    // not waited for, named.
    let mut cut: std::collections::BTreeMap<String, String> = Default::default();
    loop {
        let nodes: Vec<verge_spec::NodeInfo> = client.get("/v1/nodes").await?;
        let placed: Vec<&verge_spec::NodeInfo> = nodes
            .iter()
            .filter(|n| verge_spec::placed_on(place, &n.labels))
            .collect();
        if placed.is_empty() {
            bail!(
                "no node has the labels {} that version {} is placed on; start one with `verge up --label ...` (`verge nodes` lists each node's labels)",
                place.join(","),
                r.version
            );
        }
        for n in &placed {
            if n.link.starts_with("cut") {
                cut.insert(n.name.clone(), n.link.clone());
                continue;
            }
            cut.remove(&n.name);
            if n.loaded.contains(&key) && !ready.contains_key(&n.name) {
                ready.insert(n.name.clone(), started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        let waiting: Vec<&str> = placed
            .iter()
            .filter(|n| !ready.contains_key(&n.name) && !cut.contains_key(&n.name))
            .map(|n| n.name.as_str())
            .collect();
        if waiting.is_empty() {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "{key} is not ready after 60 s on {}; see `verge nodes` and those nodes' logs",
                waiting.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if json {
        return print_json(
            &serde_json::json!({ "deploy": r, "ready_ms": ready, "not_waited_for": cut }),
        );
    }
    let rows: Vec<Vec<String>> = ready
        .iter()
        .map(|(n, ms)| vec![n.clone(), format!("{ms:.0} ms")])
        .chain(cut.iter().map(|(n, link)| {
            vec![
                n.clone(),
                format!("not waited for: {link}; it loads the version when its link returns"),
            ]
        }))
        .collect();
    print!("{}", table::render(&["NODE", "READY AFTER"], &rows));
    println!("{key} ready on {} node(s)", ready.len());
    Ok(())
}

async fn nodes(client: &Client, json: bool) -> Result<()> {
    let nodes: Vec<verge_spec::NodeInfo> = client.get("/v1/nodes").await?;
    if json {
        return print_json(&nodes);
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                if n.this {
                    format!("{} *", n.name)
                } else {
                    n.name.clone()
                },
                n.url.clone(),
                n.role.clone(),
                if n.labels.is_empty() {
                    "-".to_string()
                } else {
                    n.labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                },
                n.link.clone(),
                format!("{}/{}", n.ready, n.versions),
                n.revision.to_string(),
                n.lag.to_string(),
                n.heartbeat.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &[
                "NODE",
                "URL",
                "ROLE",
                "LABELS",
                "LINK",
                "READY/VERSIONS",
                "REVISION",
                "LAG",
                "HEARTBEAT"
            ],
            &rows
        )
    );
    println!("* the node that answered");
    Ok(())
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn routes_label(routes: &[Route]) -> String {
    if routes.is_empty() {
        return "-".into();
    }
    routes
        .iter()
        .map(|r| format!("{}{}", r.host.as_deref().unwrap_or(""), r.path))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How the node writes its log.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `verge up`: starts a node with the settings from the command line.
async fn up(config: verge_node::NodeConfig, example: bool, log_format: LogFormat) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VERGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log_format {
        LogFormat::Text => logs.init(),
        // One object per line: timestamp, level, target, and the event's
        // fields at the top level (`message`, `function`, `invocation`...).
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let data_dir = config.data_dir.clone();
    let cluster = config.cluster.clone();
    let limits = format!(
        "guests hold at most {} MiB at once (--memory-budget), {} instances per function (--function-concurrency); records kept {} / {} MiB (--retain, --retain-size)",
        config.guest_memory_budget() >> 20,
        config.function_share(),
        match config.retain.age.as_secs() {
            s if s > 0 && s % 86_400 == 0 => format!("{}d", s / 86_400),
            s if s > 0 && s % 3_600 == 0 => format!("{}h", s / 3_600),
            _ => format!("{:?}", config.retain.age),
        },
        config.retain.bytes >> 20
    );
    let node = verge_node::Node::start(config).await.with_context(|| {
        format!(
            "while starting the node with data directory {}",
            data_dir.display()
        )
    })?;
    let addr = node.local_addr()?;
    let report = node.report().clone();
    println!("data directory  {}", node.data_dir().display());
    if let (Some(c), Some((replicas, revision))) = (&cluster, report.cluster) {
        println!(
            "cluster         NATS {} as node {}: registry (revision {revision}) and artifacts there, {replicas} replica{} each; `verge nodes` lists the others",
            c.url,
            c.node,
            if replicas == 1 { "" } else { "s" }
        );
    }
    println!("limits          {limits}");
    match &report.token_created {
        Some(path) => println!(
            "admin token     created, written to {} (mode 0600)",
            path.display()
        ),
        None if cluster.is_some() && !node.data_dir().join(verge_node::TOKEN_FILE).exists() => {
            println!(
                "admin token     the cluster's: in the data directory of the node that started it first (tokens work on every node)"
            )
        }
        None => println!(
            "admin token     in {}",
            node.data_dir().join(verge_node::TOKEN_FILE).display()
        ),
    }
    println!(
        "functions       {} deployed, each loaded from the compile cache by its first request (start took {} ms)",
        report.functions,
        report.load_time.as_millis()
    );
    if example {
        if node.has_function("hello") {
            println!("example         function hello already deployed");
        } else {
            let r = node
                .deploy("hello", EXAMPLE_WASM.to_vec(), Some("/hello"))
                .await
                .context("while deploying the bundled example")?;
            println!(
                "example         deployed hello version {} ({} ms)",
                r.version,
                r.compile_ms.round()
            );
        }
        println!("try             curl http://{addr}/hello");
    }
    if let Some(m) = node.metrics_addr() {
        println!("metrics         http://{m}/metrics (Prometheus, no token)");
    }
    println!("verge listening on http://{addr}");
    let shutdown = async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        return;
                    }
                };
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
    };
    node.serve(shutdown).await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn deploy(
    client: &Client,
    json: bool,
    quiet: bool,
    file: &std::path::Path,
    name: &str,
    routes: &[String],
    host: Option<String>,
    env: &[String],
    extra: &[(&str, &str)],
) -> Result<DeployResponse> {
    verge_spec::validate_function_name(name)?;
    for e in env {
        verge_spec::parse_env(e)?;
    }
    let bytes = std::fs::read(file).with_context(|| {
        format!(
            "could not read {}; give the path of a .wasm component",
            file.display()
        )
    })?;
    let mut query = form_url(routes.iter().map(|r| ("route", r.as_str())));
    if let Some(h) = &host {
        query.push_str(&form_url([("host", h.as_str())]));
    }
    query.push_str(&form_url(env.iter().map(|e| ("env", e.as_str()))));
    query.push_str(&form_url(extra.iter().copied()));
    let total = bytes.len() as u64;
    let started = Instant::now();
    let bar = if std::io::stderr().is_terminal() && !json {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {bytes}/{total_bytes}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(format!("uploading {}", file.display()));
        Some(bar)
    } else {
        None
    };
    let chunks: Vec<bytes::Bytes> = bytes::Bytes::from(bytes)
        .chunks(64 * 1024)
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    let progress = bar.clone();
    let stream = futures::stream::iter(chunks.into_iter().map(move |c| {
        if let Some(b) = &progress {
            b.inc(c.len() as u64);
            if b.position() >= total {
                b.set_message("validating and compiling");
                b.enable_steady_tick(Duration::from_millis(100));
            }
        }
        Ok::<_, std::io::Error>(c)
    }));
    let rb = client
        .request(
            Method::POST,
            &format!("/v1/functions/{name}/versions{}", query_string(&query)),
        )
        .header(reqwest::header::CONTENT_TYPE, "application/wasm")
        .header(reqwest::header::CONTENT_LENGTH, total)
        .body(reqwest::Body::wrap_stream(stream));
    let result: Result<DeployResponse> = client.json(rb).await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let r = result?;
    if quiet {
        return Ok(r);
    }
    if json {
        print_json(&r)?;
        return Ok(r);
    }
    let total_ms = started.elapsed().as_secs_f64() * 1000.0;
    let node_ms: f64 = r.steps.iter().map(|s| s.ms).sum();
    println!("  upload    {:>8.1} ms", (total_ms - node_ms).max(0.0));
    for step in &r.steps {
        let note = match step.name.as_str() {
            "compile" if r.tier == "baseline" => {
                format!(
                    "{} code, baseline (optimized code follows in the background)",
                    r.code
                )
            }
            "compile" => format!("{} code, {}", r.code, r.tier),
            "store" if r.reused => format!(
                "same bytes and configuration as version {}: reused",
                r.version
            ),
            "promote" => match &r.promoted {
                Some(alias) => format!("{alias} -> version {}", r.version),
                None => "live unchanged".to_string(),
            },
            _ => String::new(),
        };
        println!("  {:<9} {:>8.1} ms  {note}", step.name, step.ms);
    }
    println!(
        "deployed {} version {} ({}, sha256 {}) in {total_ms:.0} ms",
        r.function,
        r.version,
        table::size(r.size),
        &r.sha256[..12.min(r.sha256.len())],
    );
    if r.promoted.is_none() {
        println!(
            "not live: call it with `verge invoke {} --version {}` or the {} header, then `verge promote {} {}`",
            r.function,
            r.version,
            verge_spec::VERSION_HEADER,
            r.function,
            r.version
        );
    }
    for route in &r.routes {
        let base = client.server.clone();
        match &route.host {
            Some(h) => println!("serving  http://{h}{} (via {base})", route.path),
            None => println!("serving  {base}{}", route.path),
        }
    }
    Ok(r)
}

fn form_url<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    let out = s.finish();
    if out.is_empty() {
        out
    } else {
        format!("{out}&")
    }
}

fn query_string(q: &str) -> String {
    let q = q.trim_end_matches('&');
    if q.is_empty() {
        String::new()
    } else {
        format!("?{q}")
    }
}

async fn invoke(
    client: &Client,
    json: bool,
    endpoint: &str,
    query: Vec<(&str, &str)>,
    data: Option<String>,
    run_async: bool,
) -> Result<()> {
    let body: Vec<u8> = match data.as_deref() {
        None => Vec::new(),
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("while reading standard input")?;
            buf
        }
        Some(d) if d.starts_with('@') => {
            std::fs::read(&d[1..]).with_context(|| format!("could not read {}", &d[1..]))?
        }
        Some(d) => d.as_bytes().to_vec(),
    };
    let rb = client
        .request(
            Method::POST,
            &format!("{endpoint}{}", query_string(&form_url(query))),
        )
        .body(body);
    if run_async {
        let job: verge_bus::Job = client.json(rb).await?;
        if json {
            return print_json(&job);
        }
        println!(
            "queued {} for {}:{}; follow it with `verge invocations --id {}`",
            job.id, job.function, job.alias, job.id
        );
        return Ok(());
    }
    let resp = client.send(rb).await?;
    let status = resp.status();
    let id = resp
        .headers()
        .get(INVOCATION_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let bytes = resp
        .bytes()
        .await
        .context("while reading the function's response")?;
    if json {
        return print_json(&serde_json::json!({
            "status": status.as_u16(),
            "invocation_id": id,
            "body": String::from_utf8_lossy(&bytes),
        }));
    }
    use std::io::Write;
    std::io::stdout().write_all(&bytes)?;
    if !status.is_success() {
        bail!("the function answered {status} (invocation {id})");
    }
    Ok(())
}

async fn routes(client: &Client, json: bool, action: RoutesAction) -> Result<()> {
    match action {
        RoutesAction::Ls => {
            let routes: Vec<Route> = client.get("/v1/routes").await?;
            if json {
                return print_json(&routes);
            }
            if routes.is_empty() {
                println!("no routes yet; add one with `verge routes add /path --function NAME`");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = routes
                .iter()
                .map(|r| {
                    vec![
                        r.host.clone().unwrap_or_else(|| "*".into()),
                        r.path.clone(),
                        r.function.clone(),
                        r.alias.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table::render(&["HOST", "PATH", "FUNCTION", "ALIAS"], &rows)
            );
            Ok(())
        }
        RoutesAction::Add {
            path,
            function,
            host,
            alias,
        } => {
            let r: Route = client
                .json(
                    client
                        .request(Method::PUT, "/v1/routes")
                        .json(&RouteRequest {
                            host,
                            path,
                            function,
                            alias: Some(alias),
                        }),
                )
                .await?;
            if json {
                return print_json(&r);
            }
            println!(
                "route {}{} -> {}:{}",
                r.host.as_deref().unwrap_or(""),
                r.path,
                r.function,
                r.alias
            );
            Ok(())
        }
        RoutesAction::Rm { path, host } => {
            let mut pairs = vec![("path", path.as_str())];
            if let Some(h) = &host {
                pairs.push(("host", h.as_str()));
            }
            client
                .send(client.request(
                    Method::DELETE,
                    &format!("/v1/routes{}", query_string(&form_url(pairs))),
                ))
                .await?;
            if json {
                return print_json(&serde_json::json!({ "removed": path }));
            }
            println!("removed route {}{path}", host.as_deref().unwrap_or(""));
            Ok(())
        }
    }
}

async fn usage(
    client: &Client,
    json: bool,
    since: Option<String>,
    until: Option<String>,
    by: &str,
    granularity: &str,
    csv: bool,
) -> Result<()> {
    let mut pairs = vec![("by", by), ("granularity", granularity)];
    if let Some(s) = &since {
        pairs.push(("since", s.as_str()));
    }
    if let Some(u) = &until {
        pairs.push(("until", u.as_str()));
    }
    let r: verge_spec::UsageReport = client
        .get(&format!("/v1/usage{}", query_string(&form_url(pairs))))
        .await?;
    if json {
        return print_json(&r);
    }
    let header = [
        "KEY",
        "INVOCATIONS",
        "GB-S (PEAK)",
        "GB-S (CONFIGURED)",
        "CPU-S",
        "BYTES OUT",
        "OUTBOUND",
        "OUTBOUND BYTES",
        "COST",
    ];
    let row = |u: &verge_spec::UsageRow| {
        vec![
            u.key.clone(),
            u.invocations.to_string(),
            format!("{:.6}", u.gb_seconds_peak),
            format!("{:.6}", u.gb_seconds_configured),
            format!("{:.6}", u.cpu_seconds),
            u.bytes_out.to_string(),
            u.outbound_requests.to_string(),
            u.outbound_bytes.to_string(),
            format!("{:.8}", u.cost),
        ]
    };
    let mut rows: Vec<Vec<String>> = r.rows.iter().map(row).collect();
    rows.push(row(&r.total));
    if csv {
        println!("{}", header.join(","));
        for r in rows {
            println!("{}", r.join(","));
        }
        return Ok(());
    }
    print!("{}", table::render(&header, &rows));
    println!(
        "granularity {} ms; ${} per million requests, ${} per GB-second of configured memory",
        r.granularity_ms, r.price_per_million_requests, r.price_per_gb_second
    );
    Ok(())
}

async fn invocations(
    client: &Client,
    json: bool,
    name: Option<String>,
    status: Option<u16>,
    id: Option<String>,
    limit: u32,
) -> Result<()> {
    let limit_s = limit.to_string();
    let status_s = status.map(|s| s.to_string());
    let mut pairs = vec![("limit", limit_s.as_str())];
    if let Some(n) = &name {
        pairs.push(("function", n.as_str()));
    }
    if let Some(s) = &status_s {
        pairs.push(("status", s.as_str()));
    }
    if let Some(i) = &id {
        pairs.push(("id", i.as_str()));
    }
    let records: Vec<verge_spec::UsageRecord> = client
        .get(&format!(
            "/v1/invocations{}",
            query_string(&form_url(pairs))
        ))
        .await?;
    if json {
        return print_json(&records);
    }
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            vec![
                r.invocation_id.clone(),
                format!("{}@{}", r.function, r.version),
                r.status.to_string(),
                r.outcome.to_string(),
                format!("{:.2} ms", r.wall_us as f64 / 1000.0),
                format!("{:.2} ms", r.cpu_us as f64 / 1000.0),
                table::size(r.peak_memory_bytes),
                if r.cold { "cold" } else { "warm" }.to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &[
                "ID", "FUNCTION", "STATUS", "OUTCOME", "WALL", "CPU", "MEMORY", "START"
            ],
            &rows
        )
    );
    Ok(())
}

/// `verge invocations --trace`: a trace's invocations, each under the one
/// that caused it, oldest first.
async fn trace_tree(client: &Client, json: bool, trace: &str) -> Result<()> {
    let trace = trace.trim();
    // A whole traceparent value names its trace too.
    let id = verge_spec::SpanContext::parse(trace)
        .map(|c| verge_spec::to_hex(&c.trace_id))
        .unwrap_or_else(|| trace.to_ascii_lowercase());
    if !verge_spec::is_trace_id(&id) {
        bail!(
            "--trace {trace:?} is not a trace id: give the 32 hex digits of one, or a traceparent header value (00-TRACE-SPAN-01)"
        );
    }
    let mut records: Vec<verge_spec::UsageRecord> = client
        .get(&format!("/v1/invocations?trace={id}&limit=10000"))
        .await?;
    records.sort_by(|a, b| {
        (a.started_at_ms, &a.invocation_id).cmp(&(b.started_at_ms, &b.invocation_id))
    });
    if json {
        return print_json(&records);
    }
    if records.is_empty() {
        println!(
            "no invocations of trace {id} on this node (records are kept for the --retain-age of `verge up`)"
        );
        return Ok(());
    }
    let span_of = |r: &verge_spec::UsageRecord| r.trace.map(|t| t.span_id);
    let spans: std::collections::HashSet<[u8; 8]> = records.iter().filter_map(span_of).collect();
    // Depth of each record: the number of ancestors found in the trace.
    let parent_of: HashMap<[u8; 8], [u8; 8]> = records
        .iter()
        .filter_map(|r| Some((r.trace?.span_id, r.trace?.parent?)))
        .collect();
    let depth = |r: &verge_spec::UsageRecord| {
        let mut d = 0;
        let mut at = r.trace.and_then(|t| t.parent);
        while let Some(p) = at.filter(|p| spans.contains(p)) {
            d += 1;
            at = parent_of.get(&p).copied();
            if d > records.len() {
                break;
            }
        }
        d
    };
    // Children under their parents: a depth-first walk from the roots.
    let mut order: Vec<(usize, &verge_spec::UsageRecord)> = Vec::new();
    let mut stack: Vec<&verge_spec::UsageRecord> =
        records.iter().filter(|r| depth(r) == 0).rev().collect();
    while let Some(r) = stack.pop() {
        order.push((depth(r), r));
        if let Some(span) = span_of(r) {
            stack.extend(
                records
                    .iter()
                    .filter(|c| c.trace.and_then(|t| t.parent) == Some(span))
                    .rev(),
            );
        }
        if order.len() > records.len() {
            break;
        }
    }
    let first = records[0].started_at_ms;
    let rows: Vec<Vec<String>> = order
        .iter()
        .map(|(d, r)| {
            vec![
                format!("{}{}", "  ".repeat(*d), r.invocation_id),
                format!("{}@{}", r.function, r.version),
                r.status.to_string(),
                r.outcome.to_string(),
                format!("+{} ms", r.started_at_ms - first),
                format!("{:.2} ms", r.wall_us as f64 / 1000.0),
                r.trace
                    .map(|t| verge_spec::to_hex(&t.span_id))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    println!("trace {id}: {} invocations", records.len());
    print!(
        "{}",
        table::render(
            &[
                "INVOCATION",
                "FUNCTION",
                "STATUS",
                "OUTCOME",
                "AT",
                "WALL",
                "SPAN"
            ],
            &rows
        )
    );
    Ok(())
}

async fn logs(
    client: &Client,
    json: bool,
    name: &str,
    invocation: Option<String>,
    follow: bool,
) -> Result<()> {
    verge_spec::validate_function_name(name)?;
    let mut after: Option<(i64, String)> = None;
    loop {
        let mut pairs = vec![
            ("function", name.to_string()),
            ("limit", "1000".to_string()),
        ];
        if let Some(i) = &invocation {
            pairs.push(("invocation", i.clone()));
        }
        if let Some((ms, id)) = &after {
            pairs.push(("after_ms", ms.to_string()));
            pairs.push(("after_id", id.clone()));
        }
        let q = form_url(pairs.iter().map(|(k, v)| (*k, v.as_str())));
        let records: Vec<verge_spec::UsageRecord> =
            client.get(&format!("/v1/logs{}", query_string(&q))).await?;
        for r in &records {
            if json {
                println!("{}", serde_json::to_string(r)?);
                continue;
            }
            println!(
                "== {} {}@{} {} {} ({})",
                verge_spec::rfc3339(r.started_at_ms / 1000),
                r.function,
                r.version,
                r.invocation_id,
                r.status,
                r.outcome
            );
            if let Some(out) = &r.stdout {
                for line in out.lines() {
                    println!("stdout | {line}");
                }
            }
            if let Some(err) = &r.stderr {
                for line in err.lines() {
                    println!("stderr | {line}");
                }
            }
            if let Some(error) = &r.error {
                println!("error  | {error}");
            }
        }
        if let Some(last) = records.last() {
            after = Some((last.started_at_ms, last.invocation_id.clone()));
        }
        if !follow {
            if records.is_empty() && invocation.is_some() {
                bail!(
                    "no invocation with that id for function {name}; list them with `verge invocations {name}`"
                );
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `--retain` and `--retain-size` as the node's retention policy.
fn verge_store_retention(age: &str, size: &str) -> Result<verge_node::Retention> {
    Ok(verge_node::Retention {
        age: parse_duration(age).context("--retain")?,
        bytes: parse_size(size).context("--retain-size")?,
    })
}

/// `d`, unless it is zero or longer than `max`: then an error naming `flag`.
fn at_most(d: Duration, max: Duration, flag: &str) -> Result<Duration> {
    if d.is_zero() || d > max {
        bail!("{flag} must be more than 0 and at most {max:?}");
    }
    Ok(d)
}
