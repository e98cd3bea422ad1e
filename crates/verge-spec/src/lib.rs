//! Verge's domain types and the JSON shapes of its control API.
//!
//! This crate is a leaf: serde only, no I/O. The node serves these types, the
//! CLI reads them, and the store persists the records they describe.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

mod events;
pub use events::*;
mod grants;
pub use grants::*;
mod trace;
pub use trace::*;

/// The longest function name accepted.
pub const MAX_FUNCTION_NAME: usize = 63;

/// The path prefix reserved for the control API; no user route may live under it.
pub const API_PREFIX: &str = "/v1";

/// A name, path or value that breaks the rules of the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A function name outside `[a-z0-9-]{1,63}`.
    #[error(
        "invalid function name {0:?}: use 1 to 63 characters from a-z, 0-9 and '-' (for example \"hello-world\")"
    )]
    FunctionName(String),
    /// A route path that cannot be served.
    #[error("invalid route path {path:?}: {reason}")]
    RoutePath { path: String, reason: &'static str },
    /// A route host that is not a plain host name.
    #[error(
        "invalid route host {0:?}: give a bare host name such as \"api.example.com\", without scheme, port or path"
    )]
    RouteHost(String),
    /// A size such as `64MiB` that does not parse.
    #[error("invalid size {0:?}: write for example 64MiB, 512KiB or 1048576")]
    Size(String),
    /// A node label (or a placement) that is not `key=value`.
    #[error(
        "invalid label {0:?}: write key=value, each 1 to 63 characters from a-z, 0-9, '-', '_' and '.' (for example site=ship-7 or region=eu)"
    )]
    Label(String),
    /// A tenant name outside `[a-z0-9-]{1,63}`.
    #[error("invalid tenant name {0:?}: use 1 to 63 characters from a-z, 0-9 and '-'")]
    Tenant(String),
    /// A duration such as `30s` that does not parse.
    #[error("invalid duration {0:?}: write for example 30s, 500ms, 2m, 12h or 7d")]
    Duration(String),
    /// An environment entry that is not `KEY=VALUE`.
    #[error("invalid env entry {0:?}: write it as KEY=VALUE, with a non-empty KEY")]
    Env(String),
    /// An alias name outside `[a-z0-9-]{1,63}` or one that looks like a number.
    #[error(
        "invalid alias name {0:?}: use 1 to 63 characters from a-z, 0-9 and '-', not all digits (for example \"live\" or \"staging\")"
    )]
    AliasName(String),
    /// A canary weight outside 1..=99.
    #[error("invalid canary weight {0}: give the canary's share of traffic in percent, 1 to 99")]
    Weight(u32),
    /// A sticky header name that is not a valid HTTP header name.
    #[error("invalid sticky header {0:?}: give an HTTP header name such as x-user-id")]
    StickyHeader(String),
}

/// The alias that routes and invocations use unless told otherwise.
pub const LIVE_ALIAS: &str = "live";

/// The request header that pins a request on a route to one version.
pub const VERSION_HEADER: &str = "verge-version";

/// Checks an alias name: like a function name, but not all digits (so that
/// `NAME:7` can mean version 7).
pub fn validate_alias_name(name: &str) -> Result<(), SpecError> {
    let ok = validate_function_name(name).is_ok() && !name.bytes().all(|b| b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(SpecError::AliasName(name.to_string()))
    }
}

/// Is `name` in `[a-z0-9-]{1,63}`: the rule of function, tenant and token names.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_FUNCTION_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Checks a function name against `[a-z0-9-]{1,63}`.
pub fn validate_function_name(name: &str) -> Result<(), SpecError> {
    if is_plain_name(name) {
        Ok(())
    } else {
        Err(SpecError::FunctionName(name.to_string()))
    }
}

/// Why a URL path has no canonical form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathProblem {
    /// A control character (0x00-0x1F, 0x7F), written out or percent-encoded.
    Control,
    /// A `.` or `..` segment (also as `%2E`).
    DotSegment,
    /// A `%` not followed by two hexadecimal digits.
    BadEscape,
}

impl PathProblem {
    /// What was wrong, for a message.
    pub fn reason(self) -> &'static str {
        match self {
            PathProblem::Control => "it contains a control character",
            PathProblem::DotSegment => "it contains a '.' or '..' segment",
            PathProblem::BadEscape => "it has a '%' that is not followed by two hex digits",
        }
    }
}

/// Characters a path keeps as they are (RFC 3986 `pchar` and `/`): the
/// rest is percent-encoded in the canonical form.
fn is_path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b)
}

/// The one canonical form of a URL path, in which routes are stored and
/// request paths are matched: percent-escapes of unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`) decoded, every other escape in upper case, and
/// characters outside RFC 3986's path characters (spaces, quotes, non-ASCII)
/// percent-encoded as UTF-8. Control characters, `.`/`..` segments and
/// malformed escapes are refused. Borrowed when the path is canonical
/// already (the common case for requests).
pub fn canonical_path(path: &str) -> Result<std::borrow::Cow<'_, str>, PathProblem> {
    let b = path.as_bytes();
    let clean = b.iter().all(|&c| c != b'%' && is_path_char(c));
    let out: std::borrow::Cow<'_, str> = if clean {
        std::borrow::Cow::Borrowed(path)
    } else {
        let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut out = String::with_capacity(path.len() + 8);
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            if c == b'%' {
                let (Some(hi), Some(lo)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathProblem::BadEscape);
                };
                let v = hi << 4 | lo;
                if v < 0x20 || v == 0x7f {
                    return Err(PathProblem::Control);
                }
                if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
                    out.push(v as char);
                } else {
                    out.push_str(&format!("%{v:02X}"));
                }
                i += 3;
            } else if c < 0x20 || c == 0x7f {
                return Err(PathProblem::Control);
            } else if is_path_char(c) {
                out.push(c as char);
                i += 1;
            } else {
                out.push_str(&format!("%{c:02X}"));
                i += 1;
            }
        }
        std::borrow::Cow::Owned(out)
    };
    if out.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(PathProblem::DotSegment);
    }
    Ok(out)
}

/// Checks a route's path prefix and returns it in its canonical form
/// ([`canonical_path`]: the form request paths are matched in), without a
/// trailing slash except for the root.
pub fn normalize_route_path(path: &str) -> Result<String, SpecError> {
    let err = |reason| SpecError::RoutePath {
        path: path.to_string(),
        reason,
    };
    if !path.starts_with('/') {
        return Err(err("a route path starts with '/', for example \"/hello\""));
    }
    if path.contains(['?', '#', ' ']) || path.contains("//") || path.len() > 1024 {
        return Err(err(
            "give a plain path prefix without query, fragment, spaces or empty segments",
        ));
    }
    let canonical = canonical_path(path).map_err(|p| err(p.reason()))?;
    let path = canonical.as_ref();
    let trimmed = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    if trimmed == API_PREFIX || trimmed.starts_with("/v1/") {
        return Err(err(
            "paths under /v1 belong to the control API; choose another prefix",
        ));
    }
    Ok(trimmed.to_string())
}

/// Checks a route host: a bare, lowercase DNS name.
pub fn normalize_route_host(host: &str) -> Result<String, SpecError> {
    let h = host.to_ascii_lowercase();
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(h)
    } else {
        Err(SpecError::RouteHost(host.to_string()))
    }
}

/// Does `prefix` (normalized) cover `path`, on a segment boundary?
pub fn path_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return path.starts_with('/');
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Parses `KEY=VALUE`.
pub fn parse_env(entry: &str) -> Result<(String, String), SpecError> {
    match entry.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(SpecError::Env(entry.to_string())),
    }
}

/// Parses sizes such as `64MiB`, `512k`, `1048576` (bytes).
pub fn parse_size(s: &str) -> Result<u64, SpecError> {
    let err = || SpecError::Size(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(err()),
    };
    n.checked_mul(mult).ok_or_else(err)
}

/// Parses durations such as `30s`, `500ms`, `2m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, SpecError> {
    let err = || SpecError::Duration(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    Ok(match unit {
        "ms" => std::time::Duration::from_millis(n),
        "" | "s" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_secs(n.checked_mul(60).ok_or_else(err)?),
        "h" => std::time::Duration::from_secs(n.checked_mul(3600).ok_or_else(err)?),
        "d" => std::time::Duration::from_secs(n.checked_mul(86_400).ok_or_else(err)?),
        _ => return Err(err()),
    })
}

/// An HTTP route: a path prefix, optionally on one host, served by a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Host the route is bound to; `None` matches any host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Path prefix, matched on segment boundaries (`/a` covers `/a` and `/a/b`, not `/ab`).
    pub path: String,
    /// The function that serves it.
    pub function: String,
    /// The alias of the function it resolves through, at request time.
    #[serde(default = "live")]
    pub alias: String,
}

/// The tenant of functions deployed and buckets used without one.
pub const DEFAULT_TENANT: &str = "default";

fn default_tenant() -> String {
    DEFAULT_TENANT.to_string()
}

/// Parses a node label or a placement requirement, `key=value` (each 1 to
/// 63 characters from a-z, 0-9, '-', '_' and '.').
pub fn parse_label(label: &str) -> Result<(String, String), SpecError> {
    let ok = |p: &str| {
        (1..=63).contains(&p.len())
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
    };
    match label.split_once('=') {
        Some((k, v)) if ok(k) && ok(v) => Ok((k.to_string(), v.to_string())),
        _ => Err(SpecError::Label(label.to_string())),
    }
}

/// Does a node with `labels` take a version placed by `placement` (every
/// `key=value` of it among the labels; an empty placement: every node)?
pub fn placed_on(
    placement: &[String],
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    placement.iter().all(|p| {
        p.split_once('=')
            .is_some_and(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    })
}

/// Checks a tenant name: 1 to 63 characters from a-z, 0-9 and '-'.
pub fn validate_tenant(name: &str) -> Result<(), SpecError> {
    if is_plain_name(name) {
        Ok(())
    } else {
        Err(SpecError::Tenant(name.to_string()))
    }
}

/// A control API token as listed (never the token or its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub name: String,
    /// The tenant it acts for; absent: an admin token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Creation time, RFC 3339 UTC.
    pub created_at: String,
    /// What the token is limited to ([`SCOPE_REPLICATION`]); absent: all
    /// its tenant allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// The scope of a token that may call the replication endpoints
/// (`/v1/replication/...`) and nothing else: what an edge holds.
pub const SCOPE_REPLICATION: &str = "replication";

/// The scope of a token that may read the node's metrics (`/v1/metrics`)
/// and nothing else: what a Prometheus server holds.
pub const SCOPE_METRICS: &str = "metrics";

fn live() -> String {
    LIVE_ALIAS.to_string()
}

/// Body of `PUT /v1/routes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteRequest {
    #[serde(default)]
    pub host: Option<String>,
    pub path: String,
    pub function: String,
    /// Alias to resolve through (default `live`).
    #[serde(default)]
    pub alias: Option<String>,
}

/// Where an alias sends requests: one version, or two with weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasTarget {
    /// The version that gets the traffic the canary does not.
    pub version: u64,
    /// A second version and its share of the traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
    /// Requests with the same value of this header always get the same version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_header: Option<String>,
    /// Requests with the same value of this cookie always get the same version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_cookie: Option<String>,
}

impl AliasTarget {
    /// All of the traffic to one version.
    pub fn single(version: u64) -> Self {
        Self {
            version,
            canary: None,
            sticky_header: None,
            sticky_cookie: None,
        }
    }

    /// Checks the weight and the sticky key names.
    pub fn validate(&self) -> Result<(), SpecError> {
        if let Some(c) = &self.canary
            && !(1..=99).contains(&c.weight)
        {
            return Err(SpecError::Weight(c.weight));
        }
        for name in [&self.sticky_header, &self.sticky_cookie]
            .into_iter()
            .flatten()
        {
            let ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.!#$%&'*+^`|~".contains(&b));
            if !ok {
                return Err(SpecError::StickyHeader(name.clone()));
            }
        }
        Ok(())
    }

    /// The versions it names: the main one, then the canary's.
    pub fn versions(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.version).chain(self.canary.as_ref().map(|c| c.version))
    }

    /// For people: `7`, or `6 (90%) + 7 (10%)`.
    pub fn describe(&self) -> String {
        match &self.canary {
            None => self.version.to_string(),
            Some(c) => format!(
                "{} ({}%) + {} ({}%)",
                self.version,
                100 - c.weight,
                c.version,
                c.weight
            ),
        }
    }
}

/// The second version of an alias and its share of the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canary {
    pub version: u64,
    /// Percent of requests, 1 to 99.
    pub weight: u32,
}

/// A named pointer at one or two versions of a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    pub name: String,
    #[serde(flatten)]
    pub target: AliasTarget,
    /// What `rollback` returns to, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<AliasTarget>,
    /// Last change, RFC 3339 UTC.
    pub updated_at: String,
}

/// One immutable version of a function.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: u64,
    pub sha256: String,
    pub size: u64,
    /// Time limit of this version in ms, when set (else the node's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Memory limit of this version in bytes, when set (else the node's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Invocations that may run at once, when set (else unbounded but for the node's cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Largest request body in bytes, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_body: Option<u64>,
    /// Largest response body in bytes, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_body: Option<u64>,
    /// Bytes of stdout and of stderr kept per invocation, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_bytes: Option<u64>,
    /// Requests one instance serves one after another, when set
    /// (`--reuse`; else a fresh instance per request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reuse: Option<u32>,
    /// Never-used instances made ahead of requests, when set (`--prewarm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prewarm: Option<u32>,
    /// Reuse failed on this node (an instance failed its second request):
    /// the version gets a fresh instance per request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reuse_fell_back: bool,
    /// Configured values the guest sees as its environment.
    pub env: BTreeMap<String, String>,
    /// Key-value buckets the version may open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kv_buckets: Vec<String>,
    /// The tenant whose buckets those are.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// Node labels it runs on (`--place`); empty: every node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement: Vec<String>,
    /// What it may reach: outbound hosts, other functions, configuration
    /// values and the names of its secrets (never their values).
    #[serde(default, skip_serializing_if = "Grants::is_empty")]
    pub grants: Grants,
    /// Creation time, RFC 3339 UTC.
    pub created_at: String,
    /// Name of the token that deployed it.
    #[serde(default)]
    pub deployed_by: String,
    /// Aliases pointing at it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Its machine code on this node: `optimized`, `baseline` (being
    /// optimized in the background), or absent when not loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// Answer of `POST /v1/functions/{name}/versions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployResponse {
    pub function: String,
    pub version: u64,
    pub sha256: String,
    pub size: u64,
    /// Milliseconds spent compiling (or loading cached code).
    pub compile_ms: f64,
    /// `compiled` or `cached`.
    pub code: String,
    /// `optimized`, or `baseline` while optimized code compiles in the background.
    #[serde(default)]
    pub tier: String,
    #[serde(default)]
    pub routes: Vec<Route>,
    /// The same bytes and configuration were deployed before: that version
    /// was reused instead of creating a new one.
    #[serde(default)]
    pub reused: bool,
    /// The alias promoted to this version, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted: Option<String>,
    /// Time of each step on the node.
    #[serde(default)]
    pub steps: Vec<Step>,
}

/// One step of a deploy and its time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub ms: f64,
}

/// A function in `GET /v1/functions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionSummary {
    pub name: String,
    /// The main version of the `live` alias.
    pub live_version: u64,
    /// The `live` alias for people (`7`, or `6 (90%) + 7 (10%)`).
    #[serde(default)]
    pub live: String,
    /// Versions kept.
    #[serde(default)]
    pub versions: u64,
    pub sha256: String,
    pub size: u64,
    pub routes: Vec<Route>,
    pub updated_at: String,
}

/// `GET /v1/functions/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionDetail {
    pub name: String,
    pub live_version: u64,
    pub created_at: String,
    pub routes: Vec<Route>,
    pub aliases: Vec<Alias>,
    pub versions: Vec<VersionInfo>,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub functions: u64,
    /// Components compiled by this process since it started.
    pub compiled: u64,
    /// Components whose compiled code was loaded from the on-disk cache.
    pub cache_hits: u64,
    /// Components that started on baseline code.
    #[serde(default)]
    pub baseline: u64,
    /// Baseline components whose optimized code has replaced it.
    #[serde(default)]
    pub optimized: u64,
    /// Event deliveries and asynchronous invocations queued or running.
    #[serde(default)]
    pub jobs: u64,
    /// Requests waiting for a concurrency slot right now.
    #[serde(default)]
    pub queued: u64,
    /// Invocations running right now.
    #[serde(default)]
    pub running: u64,
    /// Invocations moved to the slow lane (lower-priority threads) after
    /// their CPU budget, since the node started.
    #[serde(default)]
    pub demoted: u64,
    /// Shared libraries (runtime modules several components carry, such as
    /// CPython's) compiled by this process since it started.
    #[serde(default)]
    pub libraries_compiled: u64,
    /// Compiles that found a shared library already compiled.
    #[serde(default)]
    pub libraries_reused: u64,
    /// Functions that optimized code took from the compiled-function cache
    /// instead of compiling them.
    #[serde(default)]
    pub functions_reused: u64,
    /// Versions whose code is loaded now (the others load on their next
    /// request).
    #[serde(default)]
    pub versions_loaded: u64,
    /// Loaded code dropped since the node started: idle past
    /// `--unload-after`, or least recently used past `--code-memory`.
    #[serde(default)]
    pub code_unloads: u64,
    /// Requests served by an instance that had served one before
    /// (`--reuse`).
    #[serde(default)]
    pub instances_reused: u64,
    /// Requests served by an instance made ahead of them (`--prewarm`).
    #[serde(default)]
    pub instances_prewarmed: u64,
    /// The link to the cluster's NATS: `connected`, `down since T`;
    /// absent on a node that runs on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<String>,
}

/// One node of the platform (`GET /v1/nodes`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    pub url: String,
    /// `core`, or `edge` (`verge edge`).
    pub role: String,
    pub version: String,
    /// `embedded` (a node on its own), `connected`, or `down since T`
    /// (as this node sees its own link; for other nodes, `connected`
    /// while their heartbeat is fresh); an edge whose link to the core is
    /// cut: `cut since T` (seen by the edge itself, or by a core node since
    /// the edge's last heartbeat).
    pub link: String,
    /// Registry revisions the node's copy is behind the most current node
    /// of the list (replication lag).
    #[serde(default)]
    pub lag: u64,
    /// Versions the node holds, and how many of them have code loaded.
    pub versions: u64,
    pub ready: u64,
    /// The registry revision the node's copy has imported.
    pub revision: u64,
    pub started: String,
    /// RFC 3339; records expire when heartbeats stop.
    pub heartbeat: String,
    /// Is this the node that answered?
    #[serde(default)]
    pub this: bool,
    /// The node's labels (`verge up --label`), which placement matches.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Versions it has code loaded for (`function@version`).
    #[serde(default)]
    pub loaded: Vec<String>,
}

/// An error body (RFC 9457 problem details).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Problem {
    pub status: u16,
    pub title: String,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invocation_id: Option<String>,
}

/// How an invocation ended: the one list, with the one mapping to the
/// status a caller gets when the guest sent no response of its own.
/// Serialized as its snake_case name (`ok`, `memory_limit`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The guest sent a response (whatever its status).
    Ok,
    /// The guest trapped (also after sending its response head).
    Trap,
    /// The guest ran past its time limit.
    Timeout,
    /// The guest ran out of memory at its limit.
    MemoryLimit,
    /// The guest returned without sending a response (also the state of
    /// a record before the guest sent one).
    #[default]
    NoResponse,
    /// The guest answered with an error code instead of a response.
    ErrorResponse,
    /// The instance could not be created.
    Instantiate,
    /// Refused before the guest ran: no free slot.
    Capacity,
    /// Refused before the guest ran: the request body was over the limit.
    RequestTooLarge,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 9] = [
        Outcome::Ok,
        Outcome::Trap,
        Outcome::Timeout,
        Outcome::MemoryLimit,
        Outcome::NoResponse,
        Outcome::ErrorResponse,
        Outcome::Instantiate,
        Outcome::Capacity,
        Outcome::RequestTooLarge,
    ];

    /// Its name, as serialized and stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Trap => "trap",
            Outcome::Timeout => "timeout",
            Outcome::MemoryLimit => "memory_limit",
            Outcome::NoResponse => "no_response",
            Outcome::ErrorResponse => "error_response",
            Outcome::Instantiate => "instantiate",
            Outcome::Capacity => "capacity",
            Outcome::RequestTooLarge => "request_too_large",
        }
    }

    /// The outcome of a name.
    pub fn parse(name: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == name)
    }

    /// The HTTP status a caller gets for it when the guest sent no
    /// response of its own (200 for `ok`, whose status is the guest's).
    pub fn status(self) -> u16 {
        match self {
            Outcome::Ok => 200,
            Outcome::Timeout => 504,
            Outcome::Capacity => 503,
            Outcome::RequestTooLarge => 413,
            // An error code answers 500, as on `wasmtime serve`.
            Outcome::Trap
            | Outcome::MemoryLimit
            | Outcome::NoResponse
            | Outcome::ErrorResponse
            | Outcome::Instantiate => 500,
        }
    }

    /// Did the guest fail (as opposed to succeeding or being refused
    /// before it ran)?
    pub fn is_failure(self) -> bool {
        !matches!(
            self,
            Outcome::Ok | Outcome::Capacity | Outcome::RequestTooLarge
        )
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one invocation used, as metered by the host and kept in the ledger.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub invocation_id: String,
    pub function: String,
    pub version: u64,
    /// Start time, unix milliseconds.
    pub started_at_ms: i64,
    /// Wall time from the start of instantiation to the guest's return, µs.
    pub wall_us: u64,
    /// CPU time of the threads that ran the guest (measured per poll), µs.
    pub cpu_us: u64,
    /// Largest total linear memory the instance held, bytes.
    pub peak_memory_bytes: u64,
    /// The memory limit the version ran with, bytes.
    pub memory_limit_bytes: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// HTTP status the caller got.
    pub status: u16,
    /// How the invocation ended.
    pub outcome: Outcome,
    /// True on the first invocation after the compiled code was loaded.
    pub cold: bool,
    /// Captured stdout (bounded; marked when truncated); only in the ledger and `/v1/logs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    /// Captured stderr (bounded; marked when truncated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    /// Why the invocation failed, in one line (a trap and its cause, the
    /// guest's error code): for the function's owner; the caller of a user
    /// route sees only the invocation id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The node that forwarded the request here (it does not run the
    /// version: placement), when it was forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarded_from: Option<String>,
    /// The invocation that called this one in process
    /// (`http://NAME.fn.verge.internal/`), when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// Outbound HTTP requests the guest sent (events and calls to other
    /// functions not counted).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub outbound_requests: u32,
    /// Bytes of outbound request bodies sent.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub outbound_sent_bytes: u64,
    /// Bytes of outbound response bodies received.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub outbound_received_bytes: u64,
    /// Time outbound requests spent waiting for their answers (from the
    /// send to the response's head; overlapping requests each count), µs.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub outbound_wait_us: u64,
    /// Functions the event chain went through before this invocation (from
    /// the request's `ce-vergehops`); not kept in the ledger.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hops: u32,
    /// A failure of this invocation will be retried (an attempt of a job
    /// that has attempts left): it is not reported as a failure event, so
    /// that a job emits one however many attempts it takes. Not serialized.
    #[serde(skip)]
    pub will_retry: bool,
    /// The invocation's span in its trace (`trace_id`, `span_id`,
    /// `parent_span_id`).
    #[serde(default, flatten)]
    pub trace: Option<InvocationTrace>,
    /// Where its time went before the guest ran (for its trace's spans);
    /// not serialized, not in the ledger.
    #[serde(skip)]
    pub timings: Timings,
    /// It finished on the slow lane (it used up the fast lane's CPU
    /// budget); not serialized, not in the ledger.
    #[serde(skip)]
    pub demoted: bool,
}

/// A request extension the node's dispatcher puts on a job's attempt when a
/// failure would be retried (never set from outside: it is not a header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetriedOnFailure;

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// One row of `GET /v1/usage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    /// The group: a function, `function@version`, or an hour (RFC 3339), by `by`.
    pub key: String,
    pub invocations: u64,
    /// Peak memory x wall time, GB-seconds.
    pub gb_seconds_peak: f64,
    /// Configured memory x billed duration (wall time rounded up to the granularity), GB-seconds.
    pub gb_seconds_configured: f64,
    pub cpu_seconds: f64,
    pub bytes_out: u64,
    /// Outbound HTTP requests the guests sent.
    #[serde(default)]
    pub outbound_requests: u64,
    /// Bytes sent and received by those requests.
    #[serde(default)]
    pub outbound_bytes: u64,
    /// Time those requests waited for their answers, seconds.
    #[serde(default)]
    pub outbound_wait_seconds: f64,
    /// Requests and configured GB-seconds priced by the node's price table.
    pub cost: f64,
}

/// `GET /v1/usage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageReport {
    pub by: String,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub granularity_ms: u64,
    pub price_per_million_requests: f64,
    pub price_per_gb_second: f64,
    pub rows: Vec<UsageRow>,
    pub total: UsageRow,
}

/// A request extension: the request is a call from this invocation of
/// another function (its record names it as the parent).
#[derive(Debug, Clone)]
pub struct ParentInvocation(pub String);

/// A request extension: the request was forwarded by this node (its
/// invocation record says so).
#[derive(Debug, Clone)]
pub struct ForwardedFrom(pub String);

/// The response header that carries an invocation's id.
pub const INVOCATION_ID_HEADER: &str = "verge-invocation-id";

/// Formats unix milliseconds as an RFC 3339 UTC timestamp with milliseconds.
pub fn rfc3339_ms(unix_ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(unix_ms) {
        Ok(t) => format!("{t:.3}"),
        Err(_) => rfc3339(unix_ms.div_euclid(1000)),
    }
}

/// Formats unix seconds as an RFC 3339 UTC timestamp (clamped to the years
/// -9999 to 9999 that RFC 3339 can write).
pub fn rfc3339(unix_secs: i64) -> String {
    let t = jiff::Timestamp::from_second(unix_secs).unwrap_or(if unix_secs < 0 {
        jiff::Timestamp::MIN
    } else {
        jiff::Timestamp::MAX
    });
    format!("{t:.0}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_round_trip_and_map_to_statuses() {
        for o in Outcome::ALL {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
            let json = serde_json::to_string(&o).unwrap();
            assert_eq!(json, format!("\"{}\"", o.as_str()));
            assert_eq!(serde_json::from_str::<Outcome>(&json).unwrap(), o);
        }
        assert_eq!(Outcome::parse("nope"), None);
        assert_eq!(Outcome::ErrorResponse.status(), 500, "as wasmtime serve");
        assert_eq!(Outcome::Timeout.status(), 504);
        assert!(!Outcome::Capacity.is_failure() && Outcome::Trap.is_failure());
    }

    #[test]
    fn names() {
        for ok in ["a", "hello-world", "x1", &"a".repeat(63)] {
            assert!(validate_function_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Hello", "a_b", "a.b", "ä", &"a".repeat(64), "a b"] {
            assert!(validate_function_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routes() {
        assert_eq!(normalize_route_path("/hello/").unwrap(), "/hello");
        assert_eq!(normalize_route_path("/").unwrap(), "/");
        assert!(normalize_route_path("hello").is_err());
        assert!(normalize_route_path("/v1").is_err());
        assert!(normalize_route_path("/v1/functions").is_err());
        assert!(normalize_route_path("/v10").is_ok());
        // One canonical encoding, as requests are matched.
        assert_eq!(normalize_route_path("/%61b%7e").unwrap(), "/ab~");
        assert_eq!(normalize_route_path("/caf\u{e9}").unwrap(), "/caf%C3%A9");
        assert_eq!(normalize_route_path("/caf%c3%a9").unwrap(), "/caf%C3%A9");
        assert_eq!(normalize_route_path("/a%2fb").unwrap(), "/a%2Fb");
        assert!(normalize_route_path("/%76%31").is_err(), "/v1 in disguise");
        for bad in [
            "/a/../b",
            "/a/..",
            "/./a",
            "/a/%2e%2E/b",
            "/a\u{7}",
            "/a%00",
            "/a%0a",
            "/a%zz",
            "/a%4",
        ] {
            assert!(normalize_route_path(bad).is_err(), "{bad:?}");
        }
        assert_eq!(canonical_path("/plain/path").unwrap(), "/plain/path");
        assert!(matches!(
            canonical_path("/plain/path").unwrap(),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(canonical_path("/a%20b").unwrap(), "/a%20b");
        assert_eq!(canonical_path("/a/..b").unwrap(), "/a/..b");
        assert!(path_matches("/a", "/a"));
        assert!(path_matches("/a", "/a/b"));
        assert!(!path_matches("/a", "/ab"));
        assert!(path_matches("/", "/anything"));
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("10").unwrap(), 10);
        assert!(parse_size("x").is_err());
        assert!(parse_size("1PB").is_err());
        assert_eq!(parse_duration("500ms").unwrap().as_millis(), 500);
        assert_eq!(parse_duration("2m").unwrap().as_secs(), 120);
        assert_eq!(parse_duration("2h").unwrap().as_secs(), 7200);
        assert_eq!(parse_duration("7d").unwrap().as_secs(), 7 * 86_400);
        assert!(parse_duration("2w").is_err());
    }

    #[test]
    fn env_entries() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(parse_env("A=").unwrap(), ("A".into(), String::new()));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("nokey").is_err());
    }

    #[test]
    fn aliases() {
        assert!(validate_alias_name("live").is_ok());
        assert!(validate_alias_name("v2-beta").is_ok());
        assert!(validate_alias_name("7").is_err());
        assert!(validate_alias_name("Live").is_err());
        let mut t = AliasTarget::single(6);
        assert!(t.validate().is_ok());
        t.canary = Some(Canary {
            version: 7,
            weight: 10,
        });
        assert_eq!(t.describe(), "6 (90%) + 7 (10%)");
        assert_eq!(t.versions().collect::<Vec<_>>(), vec![6, 7]);
        t.sticky_header = Some("x-user".into());
        assert!(t.validate().is_ok());
        t.sticky_header = Some("x user".into());
        assert!(t.validate().is_err());
        t.sticky_header = None;
        t.canary = Some(Canary {
            version: 7,
            weight: 100,
        });
        assert!(t.validate().is_err());
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(rfc3339_ms(1_795_000_000_007), "2026-11-18T11:06:40.007Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    }
}
