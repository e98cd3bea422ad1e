//! Verge's CloudEvents bus, embedded on SQLite: triggers (event
//! subscriptions), a durable delivery queue shared by event deliveries and
//! asynchronous invocations (at least once, retries with exponential backoff
//! and jitter, a dead-letter state), per-function retry policies, and cron
//! schedules.
//!
//! The bus knows no wasm and serves no HTTP: the node claims due jobs, runs
//! them, and reports each outcome back ([`Bus::complete`], [`Bus::fail`]).
//! A claimed job is leased ([`SqliteBus::lease`], 15 minutes by default,
//! far above any invocation's time limit): [`Bus::claim`] takes it again
//! once the lease has expired without a `complete` or `fail`. Each lease
//! names its holder ([`SqliteBus::holder`], the node's name): at start
//! [`Bus::recover`] queues at once what this node's previous run left
//! running, and leaves another holder's jobs to their leases, so that one
//! node's restart never takes a job another node is running. A job may
//! therefore run more than once: delivery is at least once.
//!
//! Its database is its own file (`bus.db`, WAL, synchronous FULL): an
//! acknowledged publish is on disk before the call returns.

pub mod cron;

use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use verge_spec::CloudEvent;

pub use cron::{Cron, CronError};

/// A failure of the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("event bus database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("stored event data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error(transparent)]
    Cron(#[from] CronError),
    #[error("{0}")]
    Invalid(String),
    /// The cluster's bus cannot be reached now (a node on NATS).
    #[error("{0}")]
    Unavailable(String),
}

impl BusError {
    /// Did this fail because the disk is full?
    pub fn is_disk_full(&self) -> bool {
        matches!(self, BusError::Db(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::DiskFull)
    }
}

/// Milliseconds since the unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    let ms = now_ms() as u64;
    let mut r = [0u8; 8];
    rand::fill(&mut r);
    format!("{prefix}{:012x}{}", ms, hex::encode(r))
}

/// An event subscription of a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    pub id: String,
    pub function: String,
    pub alias: String,
    /// Event type, matched segment by segment (segments are separated by
    /// dots, as in NATS subjects): `*` matches any one segment, a final `>`
    /// one or more.
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_prefix: Option<String>,
    pub created_ms: i64,
}

impl Trigger {
    /// Does `event` match this trigger?
    pub fn matches(&self, event: &CloudEvent) -> bool {
        type_matches(&self.ty, &event.ty)
            && self.source.as_ref().is_none_or(|s| *s == event.source)
            && self.subject_prefix.as_ref().is_none_or(|p| {
                event
                    .subject
                    .as_deref()
                    .is_some_and(|subject| subject.starts_with(p.as_str()))
            })
    }
}

/// Does event type `ty` match `pattern`? Segment by segment, as NATS
/// matches subjects: `*` is any one segment, a final `>` is one or more
/// (`com.acme.*` matches `com.acme.order`, not `com.acme.order.created`;
/// `com.acme.>` matches both, and not `com.acme`).
pub fn type_matches(pattern: &str, ty: &str) -> bool {
    let (mut p, mut t) = (pattern.split('.'), ty.split('.'));
    loop {
        match (p.next(), t.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Checks a trigger's type pattern: non-empty segments, wildcards only as
/// whole segments, `>` only last.
pub fn check_type_pattern(pattern: &str) -> Result<(), String> {
    let hint = "give a type such as com.acme.order.created, with * for any one dot-separated segment (com.acme.*.created) or a final > for one or more (dev.verge.>)";
    let segments: Vec<&str> = pattern.split('.').collect();
    for (i, seg) in segments.iter().enumerate() {
        if seg.is_empty() {
            return Err(format!(
                "event type {pattern:?} has an empty segment: {hint}"
            ));
        }
        if *seg == ">" && i + 1 != segments.len() {
            return Err(format!(
                "event type {pattern:?}: > matches the rest, so it comes last: {hint}"
            ));
        }
        if seg.len() > 1 && (seg.contains('*') || seg.contains('>')) {
            return Err(format!(
                "event type {pattern:?}: a wildcard stands for a whole segment ({seg:?} mixes it with text): {hint}"
            ));
        }
    }
    Ok(())
}

/// Retry policy and destinations of a function's asynchronous work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsyncConfig {
    /// Retries after the first attempt (Lambda's default: 2).
    pub max_retries: u32,
    /// Oldest a job may get before it is dead-lettered (default 6 hours).
    pub max_age_ms: i64,
    /// Event type emitted when a job succeeds, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_success: Option<String>,
    /// Event type emitted when a job is dead-lettered, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<String>,
}

impl Default for AsyncConfig {
    fn default() -> Self {
        Self {
            max_retries: 2,
            max_age_ms: 6 * 3600 * 1000,
            on_success: None,
            on_failure: None,
        }
    }
}

/// What a job delivers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Payload {
    /// An event, delivered as a CloudEvents binary-mode POST.
    Event { event: CloudEvent },
    /// An asynchronous invocation: a POST of `body` with `headers` to `path`.
    Invoke {
        path: String,
        headers: Vec<(String, String)>,
        /// The body, hex-encoded on the wire and in the database.
        #[serde(with = "bytes_hex")]
        body: Vec<u8>,
    },
}

/// Bytes as a hex string (what stored jobs have always held).
mod bytes_hex {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Dead,
}

impl JobState {
    fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Dead => "dead",
        }
    }
    /// Parses `queued`, `running`, `succeeded` or `dead`.
    pub fn parse(s: &str) -> Result<Self, BusError> {
        Ok(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "dead" => JobState::Dead,
            other => return Err(BusError::Corrupt(format!("job state {other:?}"))),
        })
    }
}

/// A unit of asynchronous work: one delivery of an event to a function, or
/// one asynchronous invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub function: String,
    pub alias: String,
    /// A pinned version, if any (else the alias resolves at run time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    pub payload: Payload,
    /// Functions the chain went through before this job.
    pub hops: u32,
    pub attempts: u32,
    pub max_attempts: u32,
    pub state: JobState,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub next_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The trigger that created it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
}

/// A cron schedule of a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub id: String,
    pub function: String,
    pub alias: String,
    pub cron: String,
    pub tz: String,
    /// After downtime: `skip` missed firings, or run `once` for them.
    pub missed: String,
    pub next_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ms: Option<i64>,
}

/// A function's subscriptions: its triggers, schedules and async
/// configuration. On a cluster, the registry holds them as one document per
/// function (`sub.<name>`), and each node's bus keeps a copy
/// ([`SqliteBus::replace_subscriptions`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Subscriptions {
    #[serde(default)]
    pub triggers: Vec<Trigger>,
    #[serde(default)]
    pub schedules: Vec<Schedule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_config: Option<AsyncConfig>,
}

impl Subscriptions {
    /// Nothing subscribed and no configuration set.
    pub fn is_empty(&self) -> bool {
        self.triggers.is_empty() && self.schedules.is_empty() && self.async_config.is_none()
    }
}

/// A new trigger (its type pattern checked), not stored yet.
pub fn new_trigger(
    function: &str,
    alias: &str,
    ty: &str,
    source: Option<&str>,
    subject_prefix: Option<&str>,
) -> Result<Trigger, BusError> {
    check_type_pattern(ty).map_err(BusError::Invalid)?;
    Ok(Trigger {
        id: new_id("trg_"),
        function: function.to_string(),
        alias: alias.to_string(),
        ty: ty.to_string(),
        source: source.map(str::to_string),
        subject_prefix: subject_prefix.map(str::to_string),
        created_ms: now_ms(),
    })
}

/// A new schedule (its expression, zone and policy checked), first firing
/// the next one after now; not stored yet.
pub fn new_schedule(
    function: &str,
    alias: &str,
    expr: &str,
    tz: Option<&str>,
    missed: &str,
) -> Result<Schedule, BusError> {
    let cron = Cron::parse(expr)?;
    let zone = cron::zone(tz)?;
    if missed != "skip" && missed != "once" {
        return Err(BusError::Invalid(format!(
            "missed-run policy {missed:?}: give skip or once"
        )));
    }
    let next = next_fire(&cron, &zone, now_ms())
        .ok_or_else(|| BusError::Invalid(format!("the cron expression {expr:?} never fires")))?;
    Ok(Schedule {
        id: new_id("sch_"),
        function: function.to_string(),
        alias: alias.to_string(),
        cron: expr.to_string(),
        tz: tz.unwrap_or("UTC").to_string(),
        missed: missed.to_string(),
        next_ms: next,
        last_ms: None,
    })
}

/// Why a job is dead at once: its event went through `hops` functions.
pub fn hop_limit_reason(hops: u32, limit: u32) -> String {
    format!("hop limit: the event went through {hops} functions (limit {limit}); a trigger loop?")
}

/// Where a failed attempt leaves a job.
#[derive(Debug, Clone)]
pub struct Failed {
    /// `Dead` (out of attempts, or past its maximum age) or `Queued`.
    pub state: JobState,
    /// The backoff before the next attempt, and when that is.
    pub delay: Duration,
    pub next_ms: i64,
    /// The error, with why the job is dead if it is.
    pub reason: String,
}

/// What a failed attempt of `job` (its attempts counted) leads to: the
/// same rule for every bus.
pub fn after_failure(job: &Job, error: &str, retry_base: Duration) -> Failed {
    let delay = backoff(retry_base, job.attempts);
    let next_ms = now_ms().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
    let (state, reason) = if job.attempts >= job.max_attempts {
        (
            JobState::Dead,
            format!("{error} (after {} attempts)", job.attempts),
        )
    } else if next_ms > job.expires_ms {
        (
            JobState::Dead,
            format!("{error} (the job is older than its maximum age)"),
        )
    } else {
        (JobState::Queued, error.to_string())
    };
    Failed {
        state,
        delay,
        next_ms,
        reason,
    }
}

/// Backoff before attempt `attempt + 1`: 1 s doubling, capped at 5 minutes,
/// with full jitter over its upper half.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let cap = Duration::from_secs(300);
    let exp = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(cap);
    let half = exp / 2;
    half + half.mul_f64(rand::random::<f64>())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS triggers (
    id TEXT PRIMARY KEY,
    function TEXT NOT NULL,
    alias TEXT NOT NULL,
    type TEXT NOT NULL,
    source TEXT,
    subject_prefix TEXT,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    function TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER,
    payload TEXT NOT NULL,
    hops INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    next_ms INTEGER NOT NULL,
    lease_ms INTEGER,
    holder TEXT,
    last_error TEXT,
    trigger_id TEXT,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, next_ms);
CREATE INDEX IF NOT EXISTS jobs_by_function ON jobs (function, state);
CREATE TABLE IF NOT EXISTS async_config (
    function TEXT PRIMARY KEY,
    config TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS schedules (
    id TEXT PRIMARY KEY,
    function TEXT NOT NULL,
    alias TEXT NOT NULL,
    cron TEXT NOT NULL,
    tz TEXT NOT NULL,
    missed TEXT NOT NULL,
    next_ms INTEGER NOT NULL,
    last_ms INTEGER,
    created_ms INTEGER NOT NULL
);
";

const JOB_COLUMNS: &str = "id, function, alias, version, payload, hops, attempts, max_attempts, state, created_ms, expires_ms, next_ms, last_error, trigger_id";

fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Job, String)> {
    let payload: String = r.get(4)?;
    let state: String = r.get(8)?;
    Ok((
        Job {
            id: r.get(0)?,
            function: r.get(1)?,
            alias: r.get(2)?,
            version: r.get(3)?,
            payload: Payload::Invoke {
                path: String::new(),
                headers: Vec::new(),
                body: Vec::new(),
            },
            hops: r.get(5)?,
            attempts: r.get(6)?,
            max_attempts: r.get(7)?,
            state: JobState::Queued,
            created_ms: r.get(9)?,
            expires_ms: r.get(10)?,
            next_ms: r.get(11)?,
            last_error: r.get(12)?,
            trigger: r.get(13)?,
        },
        format!("{state}\n{payload}"),
    ))
}

fn finish_job((mut job, raw): (Job, String)) -> Result<Job, BusError> {
    let (state, payload) = raw.split_once('\n').unwrap_or(("", ""));
    job.state = JobState::parse(state)?;
    job.payload = serde_json::from_str(payload)
        .map_err(|e| BusError::Corrupt(format!("job payload: {e}")))?;
    Ok(job)
}

/// What a publish did with each event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// Jobs queued for delivery.
    pub queued: Vec<String>,
    /// Jobs dead-lettered at once (hop limit).
    pub dead: Vec<String>,
}

/// The embedded bus on SQLite (see the crate docs).
pub struct SqliteBus {
    conn: Mutex<Connection>,
    /// Past this many hops an event is dead-lettered instead of delivered.
    pub hop_limit: u32,
    /// First retry delay (doubles per attempt).
    pub retry_base: Duration,
    /// How long a claimed job is leased before another claim may take it.
    pub lease: Duration,
    /// Who holds the leases this bus takes (the node's name).
    pub holder: String,
}

/// The bus: what the node needs of it. [`SqliteBus`] is the embedded
/// implementation; a NATS JetStream one comes with the cluster.
pub trait Bus: Send + Sync {
    /// Jobs this node's previous run left running, and jobs whose lease
    /// has expired, go back to the queue; another holder's live leases
    /// stay. Returns how many.
    fn recover(&self) -> Result<usize, BusError>;

    /// Adds a trigger.
    fn add_trigger(
        &self,
        function: &str,
        alias: &str,
        ty: &str,
        source: Option<&str>,
        subject_prefix: Option<&str>,
    ) -> Result<Trigger, BusError>;

    /// Triggers, of one function or all.
    fn triggers(&self, function: Option<&str>) -> Result<Vec<Trigger>, BusError>;

    /// Removes a trigger.
    fn remove_trigger(&self, id: &str) -> Result<(), BusError>;

    /// Removes everything of a deleted function: triggers, schedules,
    /// queued jobs (dead letters stay, to be inspected or purged).
    fn forget_function(&self, function: &str) -> Result<(), BusError>;

    /// The async configuration of a function (defaults if never set).
    fn async_config(&self, function: &str) -> Result<AsyncConfig, BusError>;

    /// Sets the async configuration of a function.
    fn set_async_config(&self, function: &str, config: &AsyncConfig) -> Result<(), BusError>;

    /// Publishes events durably: each matching trigger gets a queued job
    /// (or a dead one, past the hop limit), all in one transaction.
    fn publish(&self, events: &[CloudEvent]) -> Result<Published, BusError>;

    /// Queues a job directly (an asynchronous invocation, a schedule firing).
    fn enqueue(
        &self,
        function: &str,
        alias: &str,
        version: Option<u64>,
        payload: Payload,
        hops: u32,
    ) -> Result<Job, BusError>;

    /// Claims up to `limit` due jobs (their attempt counted), oldest first.
    fn claim(&self, limit: usize) -> Result<Vec<Job>, BusError>;

    /// When the next queued job is due, if any.
    fn next_due_ms(&self) -> Result<Option<i64>, BusError>;

    /// Jobs queued or running right now.
    fn depth(&self) -> Result<u64, BusError>;

    /// Marks a job done.
    fn complete(&self, id: &str) -> Result<(), BusError>;

    /// Records a failed attempt: the job is retried after a backoff, or
    /// dead-lettered when its attempts or its age are used up. Returns the
    /// job as it is now.
    fn fail(&self, id: &str, error: &str) -> Result<Job, BusError>;

    /// One job.
    fn job(&self, id: &str) -> Result<Job, BusError>;

    /// Jobs of a function (or all) in a state (or any), newest first.
    fn jobs(
        &self,
        function: Option<&str>,
        state: Option<JobState>,
        limit: u32,
    ) -> Result<Vec<Job>, BusError>;

    /// Dead-lettered jobs, newest first.
    fn dead_letters(&self, function: Option<&str>, limit: u32) -> Result<Vec<Job>, BusError>;

    /// Queues a dead-lettered job again with fresh attempts and age.
    fn replay(&self, id: &str) -> Result<Job, BusError>;

    /// Deletes dead letters (of one function, or all); returns how many.
    fn purge(&self, function: Option<&str>) -> Result<usize, BusError>;

    /// Deletes finished jobs (succeeded, and dead letters) whose last
    /// change is older than `age`, then the oldest finished ones while the
    /// bus's database holds more than `bytes` of live pages; in batches,
    /// each its own short transaction. Queued and running jobs are never
    /// deleted. Returns how many went.
    fn prune(&self, age: Duration, bytes: u64) -> Result<usize, BusError>;

    /// Adds a schedule; its first firing is the next one after now.
    fn add_schedule(
        &self,
        function: &str,
        alias: &str,
        expr: &str,
        tz: Option<&str>,
        missed: &str,
    ) -> Result<Schedule, BusError>;

    /// Schedules, of one function or all.
    fn schedules(&self, function: Option<&str>) -> Result<Vec<Schedule>, BusError>;

    /// Removes a schedule.
    fn remove_schedule(&self, id: &str) -> Result<(), BusError>;

    /// Fires every due schedule: advances it to its next firing after now
    /// and queues the job that delivers `event(schedule, due time)`, both in
    /// one transaction, the advance by compare-and-set on the firing it
    /// read. So a tick fires once however many schedulers run, and a crash
    /// loses none: either both are stored or neither. A schedule that missed
    /// more than one firing (the node was down) fires once or not at all,
    /// as its policy says. Returns the firings with their jobs.
    fn fire_due_schedules(
        &self,
        event: &dyn Fn(&Schedule, i64) -> CloudEvent,
    ) -> Result<Vec<Fired>, BusError>;
}

/// A schedule's firing, its job queued.
#[derive(Debug, Clone)]
pub struct Fired {
    pub schedule: Schedule,
    /// The time it was due.
    pub at: i64,
    pub job: Job,
}

impl SqliteBus {
    /// Opens (creating if needed) `bus.db` in `dir`.
    pub fn open(dir: &Path) -> Result<Self, BusError> {
        let conn = Connection::open(dir.join("bus.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        let has_holder: i64 = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('jobs') WHERE name = 'holder'",
            [],
            |r| r.get(0),
        )?;
        if has_holder == 0 {
            conn.execute_batch("ALTER TABLE jobs ADD COLUMN holder TEXT")?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
            hop_limit: 16,
            retry_base: Duration::from_secs(1),
            lease: Duration::from_secs(15 * 60),
            holder: "node".to_string(),
        })
    }

    /// The subscriptions of `function` this bus holds.
    pub fn subscriptions(&self, function: &str) -> Result<Subscriptions, BusError> {
        let conn = self.conn();
        let async_config: Option<String> = conn
            .query_row(
                "SELECT config FROM async_config WHERE function = ?1",
                params![function],
                |r| r.get(0),
            )
            .optional()?;
        let async_config = match async_config {
            None => None,
            Some(j) => Some(
                serde_json::from_str(&j)
                    .map_err(|e| BusError::Corrupt(format!("async config: {e}")))?,
            ),
        };
        drop(conn);
        Ok(Subscriptions {
            triggers: self.triggers(Some(function))?,
            schedules: self.schedules(Some(function))?,
            async_config,
        })
    }

    /// Makes this bus's subscriptions of `function` those of `subs` (a
    /// cluster's registry document, imported), in one transaction. A
    /// schedule kept keeps the firing times this node knows.
    pub fn replace_subscriptions(
        &self,
        function: &str,
        subs: &Subscriptions,
    ) -> Result<(), BusError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "DELETE FROM triggers WHERE function = ?1",
            params![function],
        )?;
        for t in &subs.triggers {
            tx.execute(
                "INSERT OR REPLACE INTO triggers (id, function, alias, type, source, subject_prefix, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![t.id, function, t.alias, t.ty, t.source, t.subject_prefix, t.created_ms],
            )?;
        }
        let keep: Vec<&str> = subs.schedules.iter().map(|s| s.id.as_str()).collect();
        let keep = serde_json::to_string(&keep).map_err(|e| BusError::Corrupt(e.to_string()))?;
        tx.execute(
            "DELETE FROM schedules WHERE function = ?1 AND id NOT IN (SELECT value FROM json_each(?2))",
            params![function, keep],
        )?;
        for s in &subs.schedules {
            tx.execute(
                "INSERT INTO schedules (id, function, alias, cron, tz, missed, next_ms, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(id) DO UPDATE SET function = excluded.function, alias = excluded.alias, cron = excluded.cron, tz = excluded.tz, missed = excluded.missed",
                params![s.id, function, s.alias, s.cron, s.tz, s.missed, s.next_ms, now_ms()],
            )?;
        }
        match &subs.async_config {
            None => {
                tx.execute(
                    "DELETE FROM async_config WHERE function = ?1",
                    params![function],
                )?;
            }
            Some(c) => {
                let json =
                    serde_json::to_string(c).map_err(|e| BusError::Corrupt(e.to_string()))?;
                tx.execute(
                    "INSERT INTO async_config (function, config) VALUES (?1, ?2)
                     ON CONFLICT(function) DO UPDATE SET config = excluded.config",
                    params![function, json],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Functions with any subscription on this bus.
    pub fn subscribed_functions(&self) -> Result<Vec<String>, BusError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT function FROM triggers UNION SELECT function FROM schedules UNION SELECT function FROM async_config",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A new job for `function` under its retry policy, due now, with `id`;
    /// not stored.
    pub fn make_job(
        &self,
        id: String,
        function: &str,
        alias: &str,
        version: Option<u64>,
        payload: Payload,
        hops: u32,
    ) -> Result<Job, BusError> {
        let config = config_of(&self.conn(), function)?;
        Ok(job_under(
            &config, id, function, alias, version, payload, hops,
        ))
    }

    /// Records `job` as it is now in this bus's index of jobs (a cluster's
    /// node: the jobs it ran, and every dead letter), replacing what it had.
    pub fn index_jobs(&self, jobs: &[Job]) -> Result<(), BusError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for job in jobs {
            tx.execute("DELETE FROM jobs WHERE id = ?1", params![job.id])?;
            insert_job(&tx, job)?;
            tx.execute(
                "UPDATE jobs SET holder = ?2, updated_ms = ?3 WHERE id = ?1",
                params![job.id, self.holder, now_ms()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Deletes every queued and running job from this bus's database: on a
    /// cluster node at start, where the cluster's queue holds them (and
    /// gave the ones this node ran when it stopped to other nodes).
    pub fn drop_unfinished(&self) -> Result<usize, BusError> {
        Ok(self
            .conn()
            .execute("DELETE FROM jobs WHERE state IN ('queued', 'running')", [])?)
    }

    /// Deletes jobs from the index; returns how many it held.
    pub fn unindex_jobs(&self, ids: &[String]) -> Result<usize, BusError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut n = 0;
        for id in ids {
            n += tx.execute("DELETE FROM jobs WHERE id = ?1", params![id])?;
        }
        tx.commit()?;
        Ok(n)
    }

    /// Records a schedule's next firing (and its last, when it fired).
    pub fn set_schedule_times(
        &self,
        id: &str,
        next_ms: i64,
        last_ms: Option<i64>,
    ) -> Result<(), BusError> {
        self.conn().execute(
            "UPDATE schedules SET next_ms = ?2, last_ms = COALESCE(?3, last_ms) WHERE id = ?1",
            params![id, next_ms, last_ms],
        )?;
        Ok(())
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Bus for SqliteBus {
    fn recover(&self) -> Result<usize, BusError> {
        // A lease without a holder is from before holders were recorded:
        // the database was the node's own, so it was this node's.
        let now = now_ms();
        Ok(self.conn().execute(
            "UPDATE jobs SET state = 'queued', lease_ms = NULL, holder = NULL, next_ms = ?1
             WHERE state = 'running' AND (holder IS NULL OR holder = ?2 OR lease_ms <= ?1)",
            params![now, self.holder],
        )?)
    }

    fn add_trigger(
        &self,
        function: &str,
        alias: &str,
        ty: &str,
        source: Option<&str>,
        subject_prefix: Option<&str>,
    ) -> Result<Trigger, BusError> {
        let t = new_trigger(function, alias, ty, source, subject_prefix)?;
        self.conn().execute(
            "INSERT INTO triggers (id, function, alias, type, source, subject_prefix, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![t.id, t.function, t.alias, t.ty, t.source, t.subject_prefix, t.created_ms],
        )?;
        Ok(t)
    }

    fn triggers(&self, function: Option<&str>) -> Result<Vec<Trigger>, BusError> {
        let conn = self.conn();
        triggers_of(&conn, function)
    }

    fn remove_trigger(&self, id: &str) -> Result<(), BusError> {
        let n = self
            .conn()
            .execute("DELETE FROM triggers WHERE id = ?1", params![id])?;
        if n == 0 {
            return Err(BusError::NotFound(format!("trigger {id:?}")));
        }
        Ok(())
    }

    fn forget_function(&self, function: &str) -> Result<(), BusError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "DELETE FROM triggers WHERE function = ?1",
            params![function],
        )?;
        tx.execute(
            "DELETE FROM schedules WHERE function = ?1",
            params![function],
        )?;
        tx.execute(
            "DELETE FROM jobs WHERE function = ?1 AND state IN ('queued', 'running')",
            params![function],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn async_config(&self, function: &str) -> Result<AsyncConfig, BusError> {
        let conn = self.conn();
        config_of(&conn, function)
    }

    fn set_async_config(&self, function: &str, config: &AsyncConfig) -> Result<(), BusError> {
        let json = serde_json::to_string(config).map_err(|e| BusError::Corrupt(e.to_string()))?;
        self.conn().execute(
            "INSERT INTO async_config (function, config) VALUES (?1, ?2)
             ON CONFLICT(function) DO UPDATE SET config = excluded.config",
            params![function, json],
        )?;
        Ok(())
    }

    fn publish(&self, events: &[CloudEvent]) -> Result<Published, BusError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let triggers = triggers_of(&tx, None)?;
        let mut out = Published::default();
        for event in events {
            let hops = event.hops();
            for t in triggers.iter().filter(|t| t.matches(event)) {
                let payload = Payload::Event {
                    event: event.clone(),
                };
                let mut job = new_job(&tx, "job_", &t.function, &t.alias, None, payload, hops)?;
                job.trigger = Some(t.id.clone());
                if hops >= self.hop_limit {
                    job.state = JobState::Dead;
                    job.last_error = Some(hop_limit_reason(hops, self.hop_limit));
                    out.dead.push(job.id.clone());
                } else {
                    out.queued.push(job.id.clone());
                }
                insert_job(&tx, &job)?;
            }
        }
        tx.commit()?;
        Ok(out)
    }

    fn enqueue(
        &self,
        function: &str,
        alias: &str,
        version: Option<u64>,
        payload: Payload,
        hops: u32,
    ) -> Result<Job, BusError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let job = queue_job(&tx, function, alias, version, payload, hops)?;
        tx.commit()?;
        Ok(job)
    }

    fn claim(&self, limit: usize) -> Result<Vec<Job>, BusError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_ms();
        let jobs: Vec<Job> = {
            let mut stmt = tx.prepare(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE (state = 'queued' AND next_ms <= ?1) OR (state = 'running' AND lease_ms <= ?1) ORDER BY next_ms LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![now, limit as i64], job_from_row)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(finish_job(row?)?);
            }
            out
        };
        let lease = now.saturating_add(i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX));
        for job in &jobs {
            tx.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_ms = ?2, holder = ?4, updated_ms = ?3 WHERE id = ?1",
                params![job.id, lease, now, self.holder],
            )?;
        }
        tx.commit()?;
        Ok(jobs
            .into_iter()
            .map(|mut j| {
                j.attempts += 1;
                j.state = JobState::Running;
                j
            })
            .collect())
    }

    fn next_due_ms(&self) -> Result<Option<i64>, BusError> {
        Ok(self.conn().query_row(
            "SELECT MIN(due) FROM (SELECT MIN(next_ms) AS due FROM jobs WHERE state = 'queued' UNION ALL SELECT MIN(lease_ms) FROM jobs WHERE state = 'running')",
            [],
            |r| r.get(0),
        )?)
    }

    fn depth(&self) -> Result<u64, BusError> {
        Ok(self.conn().query_row(
            "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')",
            [],
            |r| r.get(0),
        )?)
    }

    fn complete(&self, id: &str) -> Result<(), BusError> {
        self.conn().execute(
            "UPDATE jobs SET state = 'succeeded', lease_ms = NULL, last_error = NULL, updated_ms = ?2 WHERE id = ?1",
            params![id, now_ms()],
        )?;
        Ok(())
    }

    fn fail(&self, id: &str, error: &str) -> Result<Job, BusError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut job = job_of(&tx, id)?;
        let now = now_ms();
        let Failed {
            state,
            next_ms: next,
            reason,
            ..
        } = after_failure(&job, error, self.retry_base);
        tx.execute(
            "UPDATE jobs SET state = ?2, next_ms = ?3, lease_ms = NULL, last_error = ?4, updated_ms = ?5 WHERE id = ?1",
            params![id, state.as_str(), next, reason, now],
        )?;
        tx.commit()?;
        job.state = state;
        job.next_ms = next;
        job.last_error = Some(reason);
        Ok(job)
    }

    fn job(&self, id: &str) -> Result<Job, BusError> {
        let conn = self.conn();
        job_of(&conn, id)
    }

    fn jobs(
        &self,
        function: Option<&str>,
        state: Option<JobState>,
        limit: u32,
    ) -> Result<Vec<Job>, BusError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE (?1 IS NULL OR function = ?1) AND (?2 IS NULL OR state = ?2)
             ORDER BY created_ms DESC LIMIT ?3"
        ))?;
        let rows = stmt.query_map(
            params![function, state.map(JobState::as_str), limit],
            job_from_row,
        )?;
        let mut out = Vec::new();
        for row in rows {
            out.push(finish_job(row?)?);
        }
        Ok(out)
    }

    fn dead_letters(&self, function: Option<&str>, limit: u32) -> Result<Vec<Job>, BusError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'dead' AND (?1 IS NULL OR function = ?1) ORDER BY updated_ms DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![function, limit], job_from_row)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(finish_job(row?)?);
        }
        Ok(out)
    }

    fn replay(&self, id: &str) -> Result<Job, BusError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let job = job_of(&tx, id)?;
        if job.state != JobState::Dead {
            return Err(BusError::Invalid(format!(
                "job {id} is {}, not dead-lettered; only dead letters can be replayed",
                job.state.as_str()
            )));
        }
        let config = config_of(&tx, &job.function)?;
        let now = now_ms();
        tx.execute(
            "UPDATE jobs SET state = 'queued', attempts = 0, max_attempts = ?2, next_ms = ?3, expires_ms = ?4, hops = 0, updated_ms = ?3 WHERE id = ?1",
            params![id, config.max_retries + 1, now, now + config.max_age_ms],
        )?;
        let job = job_of(&tx, id)?;
        tx.commit()?;
        Ok(job)
    }

    fn purge(&self, function: Option<&str>) -> Result<usize, BusError> {
        Ok(self.conn().execute(
            "DELETE FROM jobs WHERE state = 'dead' AND (?1 IS NULL OR function = ?1)",
            params![function],
        )?)
    }

    fn prune(&self, age: Duration, bytes: u64) -> Result<usize, BusError> {
        const BATCH: i64 = 1000;
        let cutoff = now_ms().saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX));
        let batch = |cutoff: Option<i64>| -> Result<usize, BusError> {
            Ok(self.conn().execute(
                "DELETE FROM jobs WHERE rowid IN (SELECT rowid FROM jobs
                     WHERE state IN ('succeeded', 'dead') AND (?1 IS NULL OR updated_ms < ?1)
                     ORDER BY updated_ms LIMIT ?2)",
                params![cutoff, BATCH],
            )?)
        };
        let mut deleted = 0;
        loop {
            let n = batch(Some(cutoff))?;
            deleted += n;
            if n < BATCH as usize {
                break;
            }
            std::thread::yield_now();
        }
        while bytes_in_use(&self.conn())? > bytes {
            let n = batch(None)?;
            deleted += n;
            if n == 0 {
                break;
            }
            std::thread::yield_now();
        }
        Ok(deleted)
    }

    fn add_schedule(
        &self,
        function: &str,
        alias: &str,
        expr: &str,
        tz: Option<&str>,
        missed: &str,
    ) -> Result<Schedule, BusError> {
        let s = new_schedule(function, alias, expr, tz, missed)?;
        self.conn().execute(
            "INSERT INTO schedules (id, function, alias, cron, tz, missed, next_ms, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![s.id, s.function, s.alias, s.cron, s.tz, s.missed, s.next_ms, now_ms()],
        )?;
        Ok(s)
    }

    fn schedules(&self, function: Option<&str>) -> Result<Vec<Schedule>, BusError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, function, alias, cron, tz, missed, next_ms, last_ms FROM schedules
             WHERE (?1 IS NULL OR function = ?1) ORDER BY function, created_ms",
        )?;
        let rows = stmt.query_map(params![function], |r| {
            Ok(Schedule {
                id: r.get(0)?,
                function: r.get(1)?,
                alias: r.get(2)?,
                cron: r.get(3)?,
                tz: r.get(4)?,
                missed: r.get(5)?,
                next_ms: r.get(6)?,
                last_ms: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn remove_schedule(&self, id: &str) -> Result<(), BusError> {
        let n = self
            .conn()
            .execute("DELETE FROM schedules WHERE id = ?1", params![id])?;
        if n == 0 {
            return Err(BusError::NotFound(format!("schedule {id:?}")));
        }
        Ok(())
    }

    fn fire_due_schedules(
        &self,
        event: &dyn Fn(&Schedule, i64) -> CloudEvent,
    ) -> Result<Vec<Fired>, BusError> {
        let now = now_ms();
        let due: Vec<Schedule> = self
            .schedules(None)?
            .into_iter()
            .filter(|s| s.next_ms <= now)
            .collect();
        let mut out = Vec::new();
        for s in due {
            let cron = Cron::parse(&s.cron)?;
            let zone = cron::zone(Some(&s.tz))?;
            let following = next_fire(&cron, &zone, s.next_ms);
            let missed_several = following.is_some_and(|f| f <= now);
            let next = next_fire(&cron, &zone, now).unwrap_or(i64::MAX);
            let fire = !missed_several || s.missed == "once";
            let at = s.next_ms;
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // Compare-and-set on the firing read above: another scheduler
            // that fired it first moved `next_ms` on.
            let advanced = tx.execute(
                "UPDATE schedules SET next_ms = ?2, last_ms = CASE WHEN ?3 THEN ?4 ELSE last_ms END WHERE id = ?1 AND next_ms = ?5",
                params![s.id, next, fire, now, at],
            )?;
            if advanced == 0 || !fire {
                tx.commit()?;
                continue;
            }
            let payload = Payload::Event {
                event: event(&s, at),
            };
            let job = queue_job(&tx, &s.function, &s.alias, None, payload, 0)?;
            tx.commit()?;
            out.push(Fired {
                schedule: s,
                at,
                job,
            });
        }
        Ok(out)
    }
}

/// The first firing of `cron` in `zone` after `after_ms`.
pub fn next_fire(cron: &Cron, zone: &jiff::tz::TimeZone, after_ms: i64) -> Option<i64> {
    let after = jiff::Timestamp::from_millisecond(after_ms).ok()?;
    cron.next_after(after, zone).map(|t| t.as_millisecond())
}

/// Queues a job for `function` under its retry policy, due now, in `tx`.
fn queue_job(
    tx: &rusqlite::Transaction<'_>,
    function: &str,
    alias: &str,
    version: Option<u64>,
    payload: Payload,
    hops: u32,
) -> Result<Job, BusError> {
    let job = new_job(tx, "inv_", function, alias, version, payload, hops)?;
    insert_job(tx, &job)?;
    Ok(job)
}

/// A new job for `function` under its retry policy (read in `tx`), due
/// now; its id starts with `prefix`. Not stored yet.
fn new_job(
    tx: &rusqlite::Transaction<'_>,
    prefix: &str,
    function: &str,
    alias: &str,
    version: Option<u64>,
    payload: Payload,
    hops: u32,
) -> Result<Job, BusError> {
    let config = config_of(tx, function)?;
    Ok(job_under(
        &config,
        new_id(prefix),
        function,
        alias,
        version,
        payload,
        hops,
    ))
}

/// A job due now under `config`'s retry policy.
fn job_under(
    config: &AsyncConfig,
    id: String,
    function: &str,
    alias: &str,
    version: Option<u64>,
    payload: Payload,
    hops: u32,
) -> Job {
    let now = now_ms();
    Job {
        id,
        function: function.to_string(),
        alias: alias.to_string(),
        version,
        payload,
        hops,
        attempts: 0,
        max_attempts: config.max_retries + 1,
        state: JobState::Queued,
        created_ms: now,
        expires_ms: now + config.max_age_ms,
        next_ms: now,
        last_error: None,
        trigger: None,
    }
}

fn insert_job(tx: &rusqlite::Transaction<'_>, job: &Job) -> Result<(), BusError> {
    let payload =
        serde_json::to_string(&job.payload).map_err(|e| BusError::Corrupt(e.to_string()))?;
    tx.execute(
        "INSERT INTO jobs (id, function, alias, version, payload, hops, attempts, max_attempts, state, created_ms, expires_ms, next_ms, last_error, trigger_id, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?10)",
        params![
            job.id,
            job.function,
            job.alias,
            job.version,
            payload,
            job.hops,
            job.attempts,
            job.max_attempts,
            job.state.as_str(),
            job.created_ms,
            job.expires_ms,
            job.next_ms,
            job.last_error,
            job.trigger
        ],
    )?;
    Ok(())
}

fn job_of(conn: &Connection, id: &str) -> Result<Job, BusError> {
    let row = conn
        .query_row(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
            params![id],
            job_from_row,
        )
        .optional()?
        .ok_or_else(|| BusError::NotFound(format!("job {id:?}")))?;
    finish_job(row)
}

fn triggers_of(conn: &Connection, function: Option<&str>) -> Result<Vec<Trigger>, BusError> {
    let mut stmt = conn.prepare(
        "SELECT id, function, alias, type, source, subject_prefix, created_ms FROM triggers
         WHERE (?1 IS NULL OR function = ?1) ORDER BY function, created_ms",
    )?;
    let rows = stmt.query_map(params![function], |r| {
        Ok(Trigger {
            id: r.get(0)?,
            function: r.get(1)?,
            alias: r.get(2)?,
            ty: r.get(3)?,
            source: r.get(4)?,
            subject_prefix: r.get(5)?,
            created_ms: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn config_of(conn: &Connection, function: &str) -> Result<AsyncConfig, BusError> {
    let json: Option<String> = conn
        .query_row(
            "SELECT config FROM async_config WHERE function = ?1",
            params![function],
            |r| r.get(0),
        )
        .optional()?;
    match json {
        None => Ok(AsyncConfig::default()),
        Some(j) => {
            serde_json::from_str(&j).map_err(|e| BusError::Corrupt(format!("async config: {e}")))
        }
    }
}

/// Bytes of live pages of a database (page count minus free pages).
fn bytes_in_use(conn: &Connection) -> Result<u64, rusqlite::Error> {
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok(u64::try_from((pages - free).max(0) * size).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, ty: &str) -> CloudEvent {
        CloudEvent::new(id, "/test", ty)
    }

    #[test]
    fn triggers_match_type_prefix_source_and_subject() {
        let t = Trigger {
            id: "t".into(),
            function: "f".into(),
            alias: "live".into(),
            ty: "com.acme.*".into(),
            source: Some("/test".into()),
            subject_prefix: Some("orders/".into()),
            created_ms: 0,
        };
        let mut e = event("1", "com.acme.order");
        assert!(!t.matches(&e), "no subject");
        e.subject = Some("orders/7".into());
        assert!(t.matches(&e));
        e.source = "/other".into();
        assert!(!t.matches(&e));
        assert!(!t.matches(&event("2", "com.other")));
    }

    #[test]
    fn wildcards_match_whole_segments_as_nats_subjects_do() {
        for (pattern, ty, want) in [
            ("com.acme.order", "com.acme.order", true),
            ("com.acme.order", "com.acme.orders", false),
            ("com.acme.*", "com.acme.order", true),
            ("com.acme.*", "com.acme.order.created", false),
            ("com.acme.*", "com.acme", false),
            ("com.*.created", "com.acme.created", true),
            ("com.*.created", "com.acme.order.created", false),
            ("com.acme.>", "com.acme.order", true),
            ("com.acme.>", "com.acme.order.created", true),
            ("com.acme.>", "com.acme", false),
            ("com.acme.>", "com.acmeinc.order", false),
            (">", "anything.at.all", true),
            ("*", "one", true),
            ("*", "one.two", false),
        ] {
            assert_eq!(type_matches(pattern, ty), want, "{pattern} ~ {ty}");
        }
        for bad in [
            "",
            "com..acme",
            "com.acme.",
            "com.ac*",
            "com.>.x",
            "com.a>",
            "*x",
        ] {
            let e = check_type_pattern(bad).unwrap_err();
            assert!(e.contains("com.acme.order.created"), "{bad}: {e}");
        }
        for good in ["com.acme", "com.*.x", "com.acme.>", ">", "*"] {
            check_type_pattern(good).unwrap();
        }
    }

    #[test]
    fn a_restart_recovers_its_own_jobs_and_leaves_another_holders() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = SqliteBus::open(dir.path()).unwrap();
        a.holder = "a".into();
        let mut b = SqliteBus::open(dir.path()).unwrap();
        b.holder = "b".into();
        let payload = || Payload::Invoke {
            path: "/".into(),
            headers: vec![],
            body: vec![],
        };
        a.enqueue("f", "live", None, payload(), 0).unwrap();
        b.enqueue("f", "live", None, payload(), 0).unwrap();
        assert_eq!(a.claim(1).unwrap().len(), 1);
        assert_eq!(b.claim(1).unwrap().len(), 1);
        // b restarts: its own job goes back to the queue, a's stays a's.
        assert_eq!(b.recover().unwrap(), 1);
        let running = a.jobs(None, Some(JobState::Running), 10).unwrap();
        assert_eq!(running.len(), 1);
        let again = b.claim(10).unwrap();
        assert_eq!(again.len(), 1, "b's own job is queued again");
        b.complete(&again[0].id).unwrap();
        // Once a's lease has run out (a died), a restart of b takes it too.
        a.conn()
            .execute("UPDATE jobs SET lease_ms = 0 WHERE holder = 'a'", [])
            .unwrap();
        assert_eq!(b.recover().unwrap(), 1);
    }

    #[test]
    fn an_expired_lease_is_claimed_again_and_a_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut bus = SqliteBus::open(dir.path()).unwrap();
        bus.add_trigger("f", "live", "com.acme.x", None, None)
            .unwrap();
        bus.publish(&[event("e1", "com.acme.x")]).unwrap();
        let first = bus.claim(10).unwrap();
        assert_eq!(first.len(), 1);
        assert!(bus.claim(10).unwrap().is_empty(), "the lease holds");
        // A lease that has run out (its holder died or hung): claimed again.
        bus.lease = Duration::ZERO;
        bus.publish(&[event("e2", "com.acme.x")]).unwrap();
        let second = bus.claim(10).unwrap();
        assert_eq!(second.len(), 1, "e2 is claimed, e1's lease still holds");
        assert_ne!(second[0].id, first[0].id);
        std::thread::sleep(Duration::from_millis(2));
        let again = bus.claim(10).unwrap();
        let ids: Vec<_> = again.iter().map(|j| j.id.as_str()).collect();
        assert!(ids.contains(&second[0].id.as_str()), "{ids:?}");
        let retaken = again.iter().find(|j| j.id == second[0].id).unwrap();
        assert_eq!(retaken.attempts, 2, "a retaken job counts its attempt");
        assert!(bus.next_due_ms().unwrap().is_some());
    }

    #[test]
    fn finished_jobs_and_dead_letters_go_by_age_and_size_queued_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let bus = SqliteBus::open(dir.path()).unwrap();
        bus.add_trigger("f", "live", "com.acme.x", None, None)
            .unwrap();
        bus.set_async_config(
            "f",
            &AsyncConfig {
                max_retries: 0,
                ..AsyncConfig::default()
            },
        )
        .unwrap();
        for i in 0..6 {
            bus.publish(&[event(&format!("e{i}"), "com.acme.x")])
                .unwrap();
        }
        let jobs = bus.claim(4).unwrap();
        bus.complete(&jobs[0].id).unwrap();
        bus.complete(&jobs[1].id).unwrap();
        assert_eq!(bus.fail(&jobs[2].id, "boom").unwrap().state, JobState::Dead);
        // Younger than the age: kept.
        assert_eq!(bus.prune(Duration::from_secs(3600), u64::MAX).unwrap(), 0);
        std::thread::sleep(Duration::from_millis(5));
        // Older: the finished three go; the running and queued ones stay.
        assert_eq!(bus.prune(Duration::ZERO, u64::MAX).unwrap(), 3);
        assert!(bus.dead_letters(None, 10).unwrap().is_empty());
        assert_eq!(bus.depth().unwrap(), 3);
        // The size bound never takes an unfinished job.
        assert_eq!(bus.prune(Duration::from_secs(3600), 0).unwrap(), 0);
        assert_eq!(bus.depth().unwrap(), 3);
    }

    #[test]
    fn a_trigger_type_ending_in_a_multibyte_character_is_checked_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let bus = SqliteBus::open(dir.path()).unwrap();
        bus.add_trigger("f", "live", "com.acme.caf\u{e9}", None, None)
            .unwrap();
        bus.add_trigger("f", "live", "com.\u{e9}.*", None, None)
            .unwrap();
        assert!(
            bus.add_trigger("f", "live", "com.\u{e9}*", None, None)
                .is_err()
        );
        assert!(bus.add_trigger("f", "live", "\u{e9}", None, None).is_ok());
    }

    #[test]
    fn a_hop_count_that_does_not_parse_is_dead_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let bus = SqliteBus::open(dir.path()).unwrap();
        bus.add_trigger("f", "live", "com.acme.x", None, None)
            .unwrap();
        for bad in [
            serde_json::json!("x"),
            serde_json::json!("-1"),
            serde_json::json!("4294967296"),
            serde_json::json!(4294967297u64),
            serde_json::json!(-3),
            serde_json::json!(1.5),
        ] {
            let mut e = event("e", "com.acme.x");
            e.extensions
                .insert(verge_spec::HOPS_EXTENSION.to_string(), bad.clone());
            let p = bus.publish(&[e]).unwrap();
            assert!(p.queued.is_empty(), "{bad} was delivered");
            assert_eq!(p.dead.len(), 1, "{bad}");
        }
        let mut ok = event("e", "com.acme.x");
        ok.set_hops(3);
        assert_eq!(bus.publish(&[ok]).unwrap().queued.len(), 1);
    }

    #[test]
    fn publish_claim_retry_dead_letter_replay() {
        let dir = tempfile::tempdir().unwrap();
        let mut bus = SqliteBus::open(dir.path()).unwrap();
        bus.retry_base = Duration::from_millis(1);
        bus.add_trigger("f", "live", "com.acme.*", None, None)
            .unwrap();
        bus.set_async_config(
            "f",
            &AsyncConfig {
                max_retries: 1,
                ..AsyncConfig::default()
            },
        )
        .unwrap();
        let p = bus
            .publish(&[event("e1", "com.acme.x"), event("e2", "other")])
            .unwrap();
        assert_eq!(p.queued.len(), 1);
        let jobs = bus.claim(10).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].attempts, 1);
        assert!(bus.claim(10).unwrap().is_empty(), "claimed jobs are leased");
        let j = bus.fail(&jobs[0].id, "status 500").unwrap();
        assert_eq!(j.state, JobState::Queued);
        // Claim again once the backoff (at most 1 ms here) has passed.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let again = loop {
            let c = bus.claim(10).unwrap();
            if !c.is_empty() {
                break c;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the retry never came due"
            );
            std::thread::yield_now();
        };
        assert_eq!(again[0].attempts, 2);
        let dead = bus.fail(&again[0].id, "status 500").unwrap();
        assert_eq!(dead.state, JobState::Dead);
        assert!(dead.last_error.unwrap().contains("after 2 attempts"));
        assert_eq!(bus.dead_letters(Some("f"), 10).unwrap().len(), 1);
        let replayed = bus.replay(&dead.id).unwrap();
        assert_eq!((replayed.state, replayed.attempts), (JobState::Queued, 0));
        let j = bus.claim(10).unwrap().remove(0);
        bus.complete(&j.id).unwrap();
        assert_eq!(bus.job(&j.id).unwrap().state, JobState::Succeeded);
        assert_eq!(bus.purge(None).unwrap(), 0);
    }

    #[test]
    fn running_jobs_survive_a_crash_and_hops_stop_loops() {
        let dir = tempfile::tempdir().unwrap();
        {
            let bus = SqliteBus::open(dir.path()).unwrap();
            bus.add_trigger("f", "live", "t", None, None).unwrap();
            bus.publish(&[event("e1", "t")]).unwrap();
            assert_eq!(bus.claim(1).unwrap().len(), 1);
        }
        let bus = SqliteBus::open(dir.path()).unwrap();
        assert!(bus.claim(1).unwrap().is_empty());
        assert_eq!(bus.recover().unwrap(), 1);
        assert_eq!(bus.claim(1).unwrap()[0].attempts, 2);
        let mut looping = event("e2", "t");
        looping.set_hops(16);
        let p = bus.publish(&[looping]).unwrap();
        assert_eq!((p.queued.len(), p.dead.len()), (0, 1));
        assert!(
            bus.job(&p.dead[0])
                .unwrap()
                .last_error
                .unwrap()
                .contains("hop limit")
        );
    }

    #[test]
    fn schedules_fire_and_skip_missed_runs() {
        let dir = tempfile::tempdir().unwrap();
        let bus = SqliteBus::open(dir.path()).unwrap();
        let s = bus
            .add_schedule("f", "live", "* * * * * *", None, "skip")
            .unwrap();
        assert!(s.next_ms > now_ms() - 1000);
        assert!(
            bus.add_schedule("f", "live", "bogus", None, "skip")
                .is_err()
        );
        assert!(
            bus.add_schedule("f", "live", "* * * * *", Some("Nowhere/City"), "skip")
                .is_err()
        );
        // Pretend the node was down for a minute.
        bus.conn()
            .execute(
                "UPDATE schedules SET next_ms = ?1",
                params![now_ms() - 60_000],
            )
            .unwrap();
        let ev =
            |s: &Schedule, at: i64| event(&format!("{}-{at}", s.id), "dev.verge.schedule.fired");
        assert!(
            bus.fire_due_schedules(&ev).unwrap().is_empty(),
            "skip: missed firings are dropped"
        );
        // f is due again at the next second boundary, which can fall before
        // the next pass: out of the way, so that the pass shows g alone.
        bus.conn()
            .execute(
                "UPDATE schedules SET next_ms = ?1 WHERE id = ?2",
                params![now_ms() + 3_600_000, s.id],
            )
            .unwrap();
        let once = bus
            .add_schedule("g", "live", "* * * * * *", None, "once")
            .unwrap();
        bus.conn()
            .execute(
                "UPDATE schedules SET next_ms = ?1 WHERE id = ?2",
                params![now_ms() - 60_000, once.id],
            )
            .unwrap();
        let fired = bus.fire_due_schedules(&ev).unwrap();
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].schedule.function, "g");
        // Its job was queued with the firing.
        assert_eq!(bus.job(&fired[0].job.id).unwrap().state, JobState::Queued);
    }

    #[test]
    fn two_schedulers_fire_a_tick_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = SqliteBus::open(dir.path()).unwrap();
        let b = SqliteBus::open(dir.path()).unwrap();
        let s = a
            .add_schedule("f", "live", "* * * * * *", None, "skip")
            .unwrap();
        let ev =
            |s: &Schedule, at: i64| event(&format!("{}-{at}", s.id), "dev.verge.schedule.fired");
        let mut fired = 0;
        for _ in 0..3 {
            // Both see the same due firing; one of them fires it.
            let due = now_ms() - 10;
            a.conn()
                .execute(
                    "UPDATE schedules SET next_ms = ?1 WHERE id = ?2",
                    params![due, s.id],
                )
                .unwrap();
            let (x, y) = std::thread::scope(|scope| {
                let x = scope.spawn(|| a.fire_due_schedules(&ev).unwrap().len());
                let y = scope.spawn(|| b.fire_due_schedules(&ev).unwrap().len());
                (x.join().unwrap(), y.join().unwrap())
            });
            assert_eq!(x + y, 1, "a tick fired {} times", x + y);
            fired += x + y;
        }
        assert_eq!(a.jobs(Some("f"), None, 100).unwrap().len(), fired);
    }
}
