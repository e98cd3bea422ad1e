//! Verge's registry and artifact store, embedded on SQLite.
//!
//! The registry (functions, versions, routes, tokens) lives in one SQLite
//! database in WAL mode; every change is one transaction, so a kill -9 leaves
//! either the old or the new state. Component bytes live beside it in an
//! artifact directory, addressed by their sha256, written through a temporary
//! file, fsync and an atomic rename before any record points at them.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};
use verge_spec::{
    FunctionDetail, FunctionSummary, Route, UsageRecord, UsageReport, UsageRow, VersionInfo,
    rfc3339,
};

mod ledger;
pub use ledger::{BATCH_MAX, FLUSH_INTERVAL, Ledger};

/// A failure of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("function {0:?} not found; deploy it with `verge deploy FILE --name {0}`")]
    FunctionNotFound(String),
    #[error(
        "route {route} already belongs to function {owner:?}; remove it first (`verge routes rm`) or pick another path"
    )]
    RouteConflict { route: String, owner: String },
    #[error("route {0} not found")]
    RouteNotFound(String),
    #[error("function {function:?} has no version {version}")]
    VersionNotFound { function: String, version: u64 },
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("artifact store error at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the data directory {0} is in use by another Verge node; stop it, or give this one its own --data-dir"
    )]
    Locked(PathBuf),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A version record as the node loads it at start-up.
#[derive(Debug, Clone)]
pub struct LiveVersion {
    pub function: String,
    pub version: u64,
    pub sha256: String,
    pub env: Vec<(String, String)>,
    pub limits: Limits,
}

/// Limits set for one version (`None`: the node's default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub timeout_ms: Option<u64>,
    pub memory_bytes: Option<u64>,
    /// Invocations of this version that may run at once.
    pub concurrency: Option<u32>,
    /// Largest request body, bytes.
    pub request_body: Option<u64>,
    /// Largest response body, bytes.
    pub response_body: Option<u64>,
    /// Bytes of stdout and of stderr kept per invocation.
    pub log_bytes: Option<u64>,
}

/// The version columns that hold [`Limits`], in order.
const LIMIT_COLUMNS: &str =
    "timeout_ms, memory_bytes, concurrency, request_body, response_body, log_bytes";

impl Limits {
    /// Reads the [`LIMIT_COLUMNS`] starting at column `at`.
    fn from_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Self> {
        Ok(Self {
            timeout_ms: r.get(at)?,
            memory_bytes: r.get(at + 1)?,
            concurrency: r.get(at + 2)?,
            request_body: r.get(at + 3)?,
            response_body: r.get(at + 4)?,
            log_bytes: r.get(at + 5)?,
        })
    }
}

/// The embedded store (see the crate docs).
pub struct Store {
    conn: Mutex<Connection>,
    artifacts: PathBuf,
    /// Held for the life of the store: one node per data directory.
    _lock: fs::File,
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn route_label(host: Option<&str>, path: &str) -> String {
    match host {
        Some(h) => format!("{h}{path}"),
        None => path.to_string(),
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokens (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    hash TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS functions (
    name TEXT PRIMARY KEY,
    live_version INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    function TEXT NOT NULL REFERENCES functions(name) ON DELETE CASCADE,
    number INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    env TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    timeout_ms INTEGER,
    memory_bytes INTEGER,
    concurrency INTEGER,
    request_body INTEGER,
    response_body INTEGER,
    log_bytes INTEGER,
    PRIMARY KEY (function, number)
);
CREATE TABLE IF NOT EXISTS routes (
    host TEXT NOT NULL DEFAULT '',
    path TEXT NOT NULL,
    function TEXT NOT NULL REFERENCES functions(name) ON DELETE CASCADE,
    PRIMARY KEY (host, path)
);
";

impl Store {
    /// Opens (creating if needed) the store in `dir`: `verge.db` and `artifacts/`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join("lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(StoreError::Locked(dir.to_path_buf())),
            Err(fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }
        let artifacts = dir.join("artifacts");
        fs::create_dir_all(&artifacts).map_err(io_err(&artifacts))?;
        let conn = Connection::open(dir.join("verge.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(ledger::SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
            artifacts,
            _lock: lock,
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores a token's hash under `name` unless one exists; returns whether it was created.
    pub fn insert_token_hash(&self, name: &str, hash: &str) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO tokens (name, hash, created_at) VALUES (?1, ?2, ?3)",
            params![name, hash, now()],
        )?;
        Ok(n == 1)
    }

    /// Replaces the hash of token `name`.
    pub fn replace_token_hash(&self, name: &str, hash: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO tokens (name, hash, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET hash = excluded.hash",
            params![name, hash, now()],
        )?;
        Ok(())
    }

    /// All stored token hashes.
    pub fn token_hashes(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT hash FROM tokens")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn artifact_path(&self, sha256: &str) -> Result<PathBuf, StoreError> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::Corrupt(format!("bad artifact id {sha256:?}")));
        }
        Ok(self.artifacts.join(format!("{sha256}.wasm")))
    }

    /// Writes component bytes durably; returns their sha256.
    pub fn put_artifact(&self, bytes: &[u8]) -> Result<String, StoreError> {
        let sha = sha256_hex(bytes);
        let path = self.artifact_path(&sha)?;
        if path.is_file() {
            return Ok(sha);
        }
        let tmp = self
            .artifacts
            .join(format!(".{sha}.{}.tmp", std::process::id()));
        let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        fs::File::open(&self.artifacts)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.artifacts))?;
        Ok(sha)
    }

    /// Reads component bytes by sha256, checking them against it.
    pub fn read_artifact(&self, sha256: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.artifact_path(sha256)?;
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        if sha256_hex(&bytes) != sha256 {
            return Err(StoreError::Corrupt(format!(
                "artifact {} does not match its sha256",
                path.display()
            )));
        }
        Ok(bytes)
    }

    /// Who owns a route, if anyone.
    pub fn route_owner(
        &self,
        host: Option<&str>,
        path: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT function FROM routes WHERE host = ?1 AND path = ?2",
                params![host.unwrap_or(""), path],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Records a new version of `function` (creating the function), makes it
    /// live, and binds `routes` to the function, all in one transaction.
    pub fn create_version(
        &self,
        function: &str,
        sha256: &str,
        size: u64,
        env: &[(String, String)],
        limits: Limits,
        routes: &[(Option<String>, String)],
    ) -> Result<u64, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for (host, path) in routes {
            check_route_free(&tx, host.as_deref(), path, function)?;
        }
        let t = now();
        let next: u64 = tx.query_row(
            "SELECT COALESCE(MAX(number), 0) + 1 FROM versions WHERE function = ?1",
            params![function],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT INTO functions (name, live_version, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT(name) DO UPDATE SET live_version = excluded.live_version, updated_at = excluded.updated_at",
            params![function, next, t],
        )?;
        let env_json: BTreeMap<&str, &str> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        tx.execute(
            &format!(
                "INSERT INTO versions (function, number, sha256, size, env, created_at, {LIMIT_COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
            ),
            params![
                function,
                next,
                sha256,
                size,
                serde_json::to_string(&env_json).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                t,
                limits.timeout_ms,
                limits.memory_bytes,
                limits.concurrency,
                limits.request_body,
                limits.response_body,
                limits.log_bytes
            ],
        )?;
        for (host, path) in routes {
            tx.execute(
                "INSERT OR IGNORE INTO routes (host, path, function) VALUES (?1, ?2, ?3)",
                params![host.as_deref().unwrap_or(""), path, function],
            )?;
        }
        tx.commit()?;
        Ok(next)
    }

    /// Binds a route to an existing function; idempotent for the same owner.
    pub fn put_route(
        &self,
        host: Option<&str>,
        path: &str,
        function: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let exists: Option<i64> = tx
            .query_row(
                "SELECT 1 FROM functions WHERE name = ?1",
                params![function],
                |r| r.get(0),
            )
            .optional()?;
        if exists.is_none() {
            return Err(StoreError::FunctionNotFound(function.to_string()));
        }
        check_route_free(&tx, host, path, function)?;
        tx.execute(
            "INSERT OR IGNORE INTO routes (host, path, function) VALUES (?1, ?2, ?3)",
            params![host.unwrap_or(""), path, function],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Removes a route.
    pub fn delete_route(&self, host: Option<&str>, path: &str) -> Result<(), StoreError> {
        let n = self.conn().execute(
            "DELETE FROM routes WHERE host = ?1 AND path = ?2",
            params![host.unwrap_or(""), path],
        )?;
        if n == 0 {
            return Err(StoreError::RouteNotFound(route_label(host, path)));
        }
        Ok(())
    }

    /// Every route.
    pub fn routes(&self) -> Result<Vec<Route>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT host, path, function FROM routes ORDER BY host, path")?;
        let rows = stmt.query_map([], |r| {
            let host: String = r.get(0)?;
            Ok(Route {
                host: (!host.is_empty()).then_some(host),
                path: r.get(1)?,
                function: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The live version of every function (what the node serves).
    pub fn live_versions(&self) -> Result<Vec<LiveVersion>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            &format!(
                "SELECT f.name, v.number, v.sha256, v.env, {} FROM functions f
                 JOIN versions v ON v.function = f.name AND v.number = f.live_version ORDER BY f.name",
                LIMIT_COLUMNS.replace(", ", ", v.").replacen("timeout_ms", "v.timeout_ms", 1)
            ),
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, u64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                Limits::from_row(r, 4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (function, version, sha256, env, limits) = row?;
            out.push(LiveVersion {
                function,
                version,
                sha256,
                env: parse_env(&env)?,
                limits,
            });
        }
        Ok(out)
    }

    /// The live version of one function.
    pub fn live_version(&self, function: &str) -> Result<LiveVersion, StoreError> {
        self.live_versions()?
            .into_iter()
            .find(|v| v.function == function)
            .ok_or_else(|| StoreError::FunctionNotFound(function.to_string()))
    }

    /// Summaries of every function.
    pub fn list_functions(&self) -> Result<Vec<FunctionSummary>, StoreError> {
        let routes = self.routes()?;
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT f.name, f.live_version, v.sha256, v.size, f.updated_at FROM functions f
             JOIN versions v ON v.function = f.name AND v.number = f.live_version ORDER BY f.name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(FunctionSummary {
                name: r.get(0)?,
                live_version: r.get(1)?,
                sha256: r.get(2)?,
                size: r.get(3)?,
                routes: Vec::new(),
                updated_at: rfc3339(r.get(4)?),
            })
        })?;
        let mut out: Vec<FunctionSummary> = rows.collect::<Result<_, _>>()?;
        for f in &mut out {
            f.routes = routes
                .iter()
                .filter(|r| r.function == f.name)
                .cloned()
                .collect();
        }
        Ok(out)
    }

    /// One function with its versions and routes.
    pub fn get_function(&self, name: &str) -> Result<FunctionDetail, StoreError> {
        let routes: Vec<Route> = self
            .routes()?
            .into_iter()
            .filter(|r| r.function == name)
            .collect();
        let conn = self.conn();
        let head: Option<(u64, i64)> = conn
            .query_row(
                "SELECT live_version, created_at FROM functions WHERE name = ?1",
                params![name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let (live_version, created_at) =
            head.ok_or_else(|| StoreError::FunctionNotFound(name.to_string()))?;
        let mut stmt = conn.prepare(&format!(
            "SELECT number, sha256, size, env, created_at, {LIMIT_COLUMNS}
                 FROM versions WHERE function = ?1 ORDER BY number DESC"
        ))?;
        let rows = stmt.query_map(params![name], |r| {
            Ok((
                r.get::<_, u64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                Limits::from_row(r, 5)?,
            ))
        })?;
        let mut versions = Vec::new();
        for row in rows {
            let (version, sha256, size, env, created, limits) = row?;
            versions.push(VersionInfo {
                version,
                sha256,
                size,
                timeout_ms: limits.timeout_ms,
                memory_bytes: limits.memory_bytes,
                concurrency: limits.concurrency,
                request_body: limits.request_body,
                response_body: limits.response_body,
                log_bytes: limits.log_bytes,
                env: parse_env(&env)?.into_iter().collect(),
                created_at: rfc3339(created),
            });
        }
        Ok(FunctionDetail {
            name: name.to_string(),
            live_version,
            created_at: rfc3339(created_at),
            routes,
            versions,
        })
    }

    /// Deletes a function, its versions and routes; removes artifacts no
    /// longer referenced. Returns the sha256s removed.
    pub fn delete_function(&self, name: &str) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let shas: Vec<String> = {
            let mut stmt =
                tx.prepare("SELECT DISTINCT sha256 FROM versions WHERE function = ?1")?;
            let rows = stmt.query_map(params![name], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        tx.execute("DELETE FROM routes WHERE function = ?1", params![name])?;
        tx.execute("DELETE FROM versions WHERE function = ?1", params![name])?;
        let n = tx.execute("DELETE FROM functions WHERE name = ?1", params![name])?;
        if n == 0 {
            return Err(StoreError::FunctionNotFound(name.to_string()));
        }
        let mut orphans = Vec::new();
        for sha in shas {
            let used: i64 = tx.query_row(
                "SELECT COUNT(*) FROM versions WHERE sha256 = ?1",
                params![sha],
                |r| r.get(0),
            )?;
            if used == 0 {
                orphans.push(sha);
            }
        }
        tx.commit()?;
        drop(conn);
        for sha in &orphans {
            if let Ok(path) = self.artifact_path(sha)
                && let Err(e) = fs::remove_file(&path)
            {
                tracing::warn!(path = %path.display(), error = %e, "could not remove an unreferenced artifact");
            }
        }
        Ok(orphans)
    }
}

/// How `usage` groups its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageBy {
    Function,
    Version,
    Hour,
    Minute,
}

impl UsageBy {
    /// Parses a grouping: `function`, `version`, `hour`, `minute`, or a
    /// subject and a time together (`version,minute`).
    pub fn parse_list(s: &str) -> Option<Vec<Self>> {
        let list: Vec<Self> = s
            .split(',')
            .map(|p| Self::parse(p.trim()))
            .collect::<Option<_>>()?;
        let subjects = list
            .iter()
            .filter(|b| matches!(b, UsageBy::Function | UsageBy::Version))
            .count();
        let times = list.len() - subjects;
        (subjects <= 1 && times <= 1 && !list.is_empty()).then_some(list)
    }

    /// Parses `function`, `version`, `hour` or `minute`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "function" => UsageBy::Function,
            "version" => UsageBy::Version,
            "hour" => UsageBy::Hour,
            "minute" => UsageBy::Minute,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            UsageBy::Function => "function",
            UsageBy::Version => "version",
            UsageBy::Hour => "hour",
            UsageBy::Minute => "minute",
        }
    }

    fn key_sql(self) -> &'static str {
        match self {
            UsageBy::Function => "function",
            UsageBy::Version => "function || '@' || version",
            UsageBy::Hour => "strftime('%Y-%m-%dT%H:00:00Z', started_at_ms / 1000, 'unixepoch')",
            UsageBy::Minute => "strftime('%Y-%m-%dT%H:%M:00Z', started_at_ms / 1000, 'unixepoch')",
        }
    }
}

/// What a usage query asks for.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Grouping: a subject (function or version), a time bucket, or both.
    pub by: Vec<UsageBy>,
    /// Billing granularity: wall time is rounded up to a multiple of it.
    pub granularity_ms: u64,
    pub price_per_million_requests: f64,
    pub price_per_gb_second: f64,
}

const GIB: f64 = (1u64 << 30) as f64;

impl Store {
    /// Recent invocations, newest first.
    pub fn invocations(
        &self,
        function: Option<&str>,
        status: Option<u16>,
        id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, function, version, started_at_ms, wall_us, cpu_us, peak_memory, memory_limit,
                    request_bytes, response_bytes, status, outcome, cold
             FROM invocations
             WHERE (?1 IS NULL OR function = ?1) AND (?2 IS NULL OR status = ?2) AND (?3 IS NULL OR id = ?3)
             ORDER BY started_at_ms DESC, id LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![function, status, id, limit], |r| {
            Ok(UsageRecord {
                invocation_id: r.get(0)?,
                function: r.get(1)?,
                version: r.get(2)?,
                started_at_ms: r.get(3)?,
                wall_us: r.get(4)?,
                cpu_us: r.get(5)?,
                peak_memory_bytes: r.get(6)?,
                memory_limit_bytes: r.get(7)?,
                request_bytes: r.get(8)?,
                response_bytes: r.get(9)?,
                status: r.get(10)?,
                outcome: r.get(11)?,
                cold: r.get(12)?,
                stdout: None,
                stderr: None,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Captured output of invocations, oldest first: of one invocation, or
    /// of a function's invocations that printed something, started at or after
    /// `after_ms` (exclusive of `after_id` at that same millisecond).
    pub fn logs(
        &self,
        function: Option<&str>,
        invocation: Option<&str>,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let (after_ms, after_id) = after.unwrap_or((i64::MIN, ""));
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, function, version, started_at_ms, status, outcome, stdout, stderr
             FROM invocations
             WHERE (?1 IS NULL OR function = ?1) AND (?2 IS NULL OR id = ?2)
               AND (stdout IS NOT NULL OR stderr IS NOT NULL OR ?2 IS NOT NULL)
               AND (started_at_ms > ?3 OR (started_at_ms = ?3 AND id > ?4))
             ORDER BY started_at_ms DESC, id DESC LIMIT ?5",
        )?;
        let rows = stmt.query_map(
            params![function, invocation, after_ms, after_id, limit],
            |r| {
                Ok(UsageRecord {
                    invocation_id: r.get(0)?,
                    function: r.get(1)?,
                    version: r.get(2)?,
                    started_at_ms: r.get(3)?,
                    wall_us: 0,
                    cpu_us: 0,
                    peak_memory_bytes: 0,
                    memory_limit_bytes: 0,
                    request_bytes: 0,
                    response_bytes: 0,
                    status: r.get(4)?,
                    outcome: r.get(5)?,
                    cold: false,
                    stdout: r.get(6)?,
                    stderr: r.get(7)?,
                })
            },
        )?;
        let mut out: Vec<UsageRecord> = rows.collect::<Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// Aggregated usage and its cost.
    pub fn usage(&self, q: &UsageQuery) -> Result<UsageReport, StoreError> {
        let g_us = q.granularity_ms.max(1).saturating_mul(1000) as i64;
        let sql = format!(
            "SELECT {key} AS k, COUNT(*),
                    SUM(peak_memory * wall_us),
                    SUM(memory_limit * (((wall_us + ?3 - 1) / ?3) * ?3)),
                    SUM(cpu_us), SUM(response_bytes)
             FROM invocations
             WHERE (?1 IS NULL OR started_at_ms >= ?1) AND (?2 IS NULL OR started_at_ms < ?2)
             GROUP BY k ORDER BY k",
            key =
                q.by.iter()
                    .map(|b| b.key_sql())
                    .collect::<Vec<_>>()
                    .join(" || ' ' || ")
        );
        let conn = self.conn();
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(params![q.since_ms, q.until_ms, g_us], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, u64>(1)?,
                r.get::<_, f64>(2)?,
                r.get::<_, f64>(3)?,
                r.get::<_, u64>(4)?,
                r.get::<_, u64>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        let mut total = UsageRow {
            key: "total".into(),
            invocations: 0,
            gb_seconds_peak: 0.0,
            gb_seconds_configured: 0.0,
            cpu_seconds: 0.0,
            bytes_out: 0,
            cost: 0.0,
        };
        for row in rows {
            let (key, n, peak, configured, cpu, bytes) = row?;
            let mut u = UsageRow {
                key,
                invocations: n,
                gb_seconds_peak: peak / GIB / 1e6,
                gb_seconds_configured: configured / GIB / 1e6,
                cpu_seconds: cpu as f64 / 1e6,
                bytes_out: bytes,
                cost: 0.0,
            };
            u.cost = u.invocations as f64 / 1e6 * q.price_per_million_requests
                + u.gb_seconds_configured * q.price_per_gb_second;
            total.invocations += u.invocations;
            total.gb_seconds_peak += u.gb_seconds_peak;
            total.gb_seconds_configured += u.gb_seconds_configured;
            total.cpu_seconds += u.cpu_seconds;
            total.bytes_out += u.bytes_out;
            total.cost += u.cost;
            out.push(u);
        }
        Ok(UsageReport {
            by: q
                .by
                .iter()
                .map(|b| b.as_str())
                .collect::<Vec<_>>()
                .join(","),
            since_ms: q.since_ms,
            until_ms: q.until_ms,
            granularity_ms: q.granularity_ms,
            price_per_million_requests: q.price_per_million_requests,
            price_per_gb_second: q.price_per_gb_second,
            rows: out,
            total,
        })
    }
}

fn check_route_free(
    tx: &rusqlite::Transaction<'_>,
    host: Option<&str>,
    path: &str,
    function: &str,
) -> Result<(), StoreError> {
    let owner: Option<String> = tx
        .query_row(
            "SELECT function FROM routes WHERE host = ?1 AND path = ?2",
            params![host.unwrap_or(""), path],
            |r| r.get(0),
        )
        .optional()?;
    match owner {
        Some(owner) if owner != function => Err(StoreError::RouteConflict {
            route: route_label(host, path),
            owner,
        }),
        _ => Ok(()),
    }
}

fn parse_env(json: &str) -> Result<Vec<(String, String)>, StoreError> {
    let map: BTreeMap<String, String> =
        serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("version env: {e}")))?;
    Ok(map.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_routes_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sha = store.put_artifact(b"abc").unwrap();
        assert_eq!(store.read_artifact(&sha).unwrap(), b"abc");
        let routes = vec![(None, "/a".to_string())];
        assert_eq!(
            store
                .create_version("f", &sha, 3, &[], Limits::default(), &routes)
                .unwrap(),
            1
        );
        assert_eq!(
            store
                .create_version(
                    "f",
                    &sha,
                    3,
                    &[("K".into(), "V".into())],
                    Limits::default(),
                    &routes
                )
                .unwrap(),
            2
        );
        let err = store
            .create_version("g", &sha, 3, &[], Limits::default(), &routes)
            .unwrap_err();
        assert!(matches!(err, StoreError::RouteConflict { .. }), "{err}");
        assert!(
            store.get_function("g").is_err(),
            "a refused deploy stores nothing"
        );
        let f = store.get_function("f").unwrap();
        assert_eq!(f.live_version, 2);
        assert_eq!(f.versions[0].env.get("K").map(String::as_str), Some("V"));
        assert_eq!(store.live_versions().unwrap().len(), 1);
        assert_eq!(store.delete_function("f").unwrap(), vec![sha.clone()]);
        assert!(store.read_artifact(&sha).is_err());
        assert!(store.routes().unwrap().is_empty());
        assert!(matches!(
            store.delete_function("f"),
            Err(StoreError::FunctionNotFound(_))
        ));
    }

    fn record(id: &str, function: &str, wall_us: u64) -> UsageRecord {
        UsageRecord {
            invocation_id: id.into(),
            function: function.into(),
            version: 1,
            started_at_ms: 1_795_000_000_000,
            wall_us,
            cpu_us: wall_us / 2,
            peak_memory_bytes: 1 << 30,
            memory_limit_bytes: 1 << 30,
            request_bytes: 1,
            response_bytes: 10,
            status: 200,
            outcome: "ok".into(),
            cold: false,
            stdout: None,
            stderr: None,
        }
    }

    #[test]
    fn ledger_batches_and_usage_prices() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        ledger.record(record("a", "f", 1_000)); // 1 ms
        ledger.record(record("b", "f", 150_000)); // 150 ms
        ledger.record(record("c", "g", 1_000_000)); // 1 s
        ledger.flush();
        assert_eq!(store.invocations(None, None, None, 10).unwrap().len(), 3);
        assert_eq!(
            store
                .invocations(Some("f"), Some(200), None, 10)
                .unwrap()
                .len(),
            2
        );
        let mut q = UsageQuery {
            since_ms: None,
            until_ms: None,
            by: vec![UsageBy::Function],
            granularity_ms: 1,
            price_per_million_requests: 0.2,
            price_per_gb_second: 0.0000166667,
        };
        let r = store.usage(&q).unwrap();
        assert_eq!(r.rows.len(), 2);
        assert_eq!(r.total.invocations, 3);
        assert!(
            (r.rows[0].gb_seconds_configured - 0.151).abs() < 1e-9,
            "{r:?}"
        );
        assert!((r.total.cpu_seconds - 0.5755).abs() < 1e-9);
        assert_eq!(r.total.bytes_out, 30);
        // 100 ms rounding bills 1 ms as 100 ms and 150 ms as 200 ms.
        q.granularity_ms = 100;
        let r100 = store.usage(&q).unwrap();
        assert!(
            (r100.rows[0].gb_seconds_configured - 0.3).abs() < 1e-9,
            "{r100:?}"
        );
        assert!(r100.total.cost > r.total.cost);
        q.by = vec![UsageBy::Hour];
        assert_eq!(store.usage(&q).unwrap().rows[0].key, "2026-11-18T11:00:00Z");
        q.by = UsageBy::parse_list("version,minute").unwrap();
        let r = store.usage(&q).unwrap();
        assert_eq!(r.rows[0].key, "f@1 2026-11-18T11:06:00Z");
        assert_eq!(r.by, "version,minute");
        assert!(UsageBy::parse_list("function,version").is_none());
        assert!(UsageBy::parse_list("hour,minute").is_none());
        assert!(UsageBy::parse_list("planet").is_none());
        drop(ledger);
    }

    #[test]
    fn one_store_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().unwrap();
        assert!(matches!(err, StoreError::Locked(_)), "{err}");
        assert!(err.to_string().contains("--data-dir"));
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let sha = store.put_artifact(b"xyz").unwrap();
            store
                .create_version("f", &sha, 3, &[], Limits::default(), &[])
                .unwrap();
            assert!(store.insert_token_hash("admin", "h").unwrap());
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.live_version("f").unwrap().version, 1);
        assert!(!store.insert_token_hash("admin", "h2").unwrap());
        assert_eq!(store.token_hashes().unwrap(), vec!["h".to_string()]);
    }
}
