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
    Alias, AliasTarget, FunctionDetail, FunctionSummary, LIVE_ALIAS, Route, TokenInfo, UsageRecord,
    UsageReport, UsageRow, VersionInfo, rfc3339,
};

mod artifacts;
mod feed;
mod ledger;
mod replica;
mod retention;
mod usage_feed;
pub use artifacts::{Artifacts, LocalArtifacts};
pub use feed::{Change, Changes, FunctionState, Registry, SqliteRegistry, Subject};
pub use ledger::{BATCH_MAX, FLUSH_INTERVAL, Ledger};
pub use replica::{Doc, ReplicaState};
pub use retention::{Pruned, Pruner, Retention};

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
    #[error(
        "function {function:?} has no version {version}; list them with `verge versions {function}`"
    )]
    VersionNotFound { function: String, version: u64 },
    #[error(
        "function {function:?} has no alias {alias:?}; list them with `verge alias ls {function}`"
    )]
    AliasNotFound { function: String, alias: String },
    #[error("alias {alias:?} of function {function:?} has no earlier target to roll back to")]
    NoRollback { function: String, alias: String },
    #[error("{0}")]
    AliasInUse(String),
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
    #[error(
        "this data directory's registry holds {0} functions of a node that ran on its own; a node joins a cluster with a data directory of its own (a new --data-dir), or deploy those functions to the cluster again"
    )]
    NotAReplica(u64),
    #[error("the cluster's store failed: {0}")]
    Cluster(String),
}

impl StoreError {
    /// Did this fail because the disk is full?
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Db(e) => is_sqlite_full(e),
            StoreError::Io { source, .. } => is_io_full(source),
            _ => false,
        }
    }
}

/// Is this SQLite's "database or disk is full"?
pub fn is_sqlite_full(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull)
}

/// Is this the file system's "no space left on device" (or over quota)?
pub fn is_io_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A token as the node checks it.
#[derive(Debug, Clone)]
pub struct TokenHash {
    pub name: String,
    pub hash: String,
    /// The tenant it acts for; `None`: an admin token.
    pub tenant: Option<String>,
    /// What it may call besides (`replication`: the replication endpoints
    /// only); `None`: everything its tenant allows.
    pub scope: Option<String>,
}

/// A stored version as the node loads it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredVersion {
    pub function: String,
    pub version: u64,
    pub sha256: String,
    pub env: Vec<(String, String)>,
    pub limits: Limits,
    /// Key-value buckets the version may open.
    pub buckets: Vec<String>,
    /// The tenant whose buckets those are.
    pub tenant: String,
    /// Where it runs: the node labels it needs (`k=v`, all of them); empty:
    /// every node.
    pub placement: Vec<String>,
    /// What it may reach (outbound hosts, functions, config, secrets).
    pub grants: verge_spec::Grants,
}

/// A secret as stored: its value sealed by the node that set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedSecret {
    pub name: String,
    /// `function:NAME` or `tenant:NAME`.
    pub scope: String,
    /// Nonce and ciphertext, base64.
    pub sealed: String,
    /// Unix seconds.
    pub created_at: i64,
    pub updated_at: i64,
}

/// What a deploy asks the store to record.
#[derive(Debug, Clone)]
pub struct NewVersion<'a> {
    pub function: &'a str,
    pub sha256: &'a str,
    pub size: u64,
    pub env: &'a [(String, String)],
    pub limits: Limits,
    /// Key-value buckets the version may open.
    pub buckets: &'a [String],
    /// The tenant whose buckets those are.
    pub tenant: &'a str,
    /// Node labels it needs (`k=v`); empty: every node.
    pub placement: &'a [String],
    /// What it may reach (outbound hosts, functions, config, secrets).
    pub grants: &'a verge_spec::Grants,
    /// Routes to bind to the function's `live` alias.
    pub routes: &'a [(Option<String>, String)],
    /// Name of the token that deploys it.
    pub deployed_by: &'a str,
    /// Point `live` at it. The first version of a function is always promoted.
    pub promote: bool,
}

/// What [`Store::create_version`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Created {
    pub version: u64,
    /// The same bytes and configuration existed: that version was reused.
    pub reused: bool,
    /// `live` now points at it (and did not before).
    pub promoted: bool,
}

/// What retention removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    pub versions: Vec<u64>,
    /// Artifacts no version references any more (deleted from disk).
    pub artifacts: Vec<String>,
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
    /// Requests one instance may serve one after another (`--reuse`).
    pub reuse: Option<u32>,
    /// Never-used instances made ahead of requests (`--prewarm`).
    pub prewarm: Option<u32>,
}

/// The version columns that hold [`Limits`], in order.
const LIMIT_COLUMNS: &str =
    "timeout_ms, memory_bytes, concurrency, request_body, response_body, log_bytes, reuse, prewarm";

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
            reuse: r.get(at + 6)?,
            prewarm: r.get(at + 7)?,
        })
    }
}

/// The embedded store (see the crate docs).
pub struct Store {
    conn: Mutex<Connection>,
    /// Counts commits on `conn`: wakes readers of the change feed.
    commits: tokio::sync::watch::Sender<u64>,
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
    created_at INTEGER NOT NULL,
    tenant TEXT
);
-- Secrets, sealed by the node (AEAD; `verge_node::secrets`): the store
-- never sees a value. Scope `function:NAME` or `tenant:NAME`.
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    sealed TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (name, scope)
);
CREATE TABLE IF NOT EXISTS functions (
    name TEXT PRIMARY KEY,
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
    deployed_by TEXT NOT NULL DEFAULT 'admin',
    config_key TEXT NOT NULL DEFAULT '',
    buckets TEXT NOT NULL DEFAULT '[]',
    tenant TEXT NOT NULL DEFAULT 'default',
    placement TEXT NOT NULL DEFAULT '[]',
    grants TEXT NOT NULL DEFAULT '{}',
    reuse INTEGER,
    prewarm INTEGER,
    PRIMARY KEY (function, number)
);
CREATE TABLE IF NOT EXISTS routes (
    host TEXT NOT NULL DEFAULT '',
    path TEXT NOT NULL,
    function TEXT NOT NULL REFERENCES functions(name) ON DELETE CASCADE,
    alias TEXT NOT NULL DEFAULT 'live',
    PRIMARY KEY (host, path)
);
-- An alias's current target (JSON AliasTarget).
CREATE TABLE IF NOT EXISTS aliases (
    function TEXT NOT NULL REFERENCES functions(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    target TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (function, name)
);
-- Earlier targets of each alias, newest last: `rollback` pops from here.
CREATE TABLE IF NOT EXISTS alias_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    function TEXT NOT NULL REFERENCES functions(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    target TEXT NOT NULL,
    at INTEGER NOT NULL
);
";

/// Schema of session-1 databases (`functions.live_version`, no aliases)
/// brought to the current one; run once, in one transaction.
const MIGRATE_1: &str = "
ALTER TABLE versions ADD COLUMN deployed_by TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE versions ADD COLUMN config_key TEXT NOT NULL DEFAULT '';
ALTER TABLE routes ADD COLUMN alias TEXT NOT NULL DEFAULT 'live';
INSERT OR IGNORE INTO aliases (function, name, target, updated_at)
    SELECT name, 'live', json_object('version', live_version), updated_at FROM functions;
ALTER TABLE functions DROP COLUMN live_version;
";

const INDEXES: &str = "
CREATE INDEX IF NOT EXISTS versions_config ON versions (function, config_key);
CREATE INDEX IF NOT EXISTS alias_history_by_alias ON alias_history (function, name, id);
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
        let old: i64 = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('functions') WHERE name = 'live_version'",
            [],
            |r| r.get(0),
        )?;
        if old > 0 {
            conn.execute_batch(&format!("BEGIN; {MIGRATE_1} COMMIT;"))?;
            tracing::info!("registry migrated to versions with aliases");
        }
        let has_buckets: i64 = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('versions') WHERE name = 'buckets'",
            [],
            |r| r.get(0),
        )?;
        if has_buckets == 0 {
            conn.execute_batch(
                "ALTER TABLE versions ADD COLUMN buckets TEXT NOT NULL DEFAULT '[]'",
            )?;
        }
        ledger::add_columns(
            &conn,
            &[
                ("versions", "tenant", "TEXT NOT NULL DEFAULT 'default'"),
                ("versions", "placement", "TEXT NOT NULL DEFAULT '[]'"),
                ("versions", "grants", "TEXT NOT NULL DEFAULT '{}'"),
                ("versions", "reuse", "INTEGER"),
                ("versions", "prewarm", "INTEGER"),
                ("tokens", "tenant", "TEXT"),
                ("tokens", "scope", "TEXT"),
            ],
        )?;
        conn.execute_batch(INDEXES)?;
        conn.execute_batch(feed::SCHEMA)?;
        conn.execute_batch(replica::SCHEMA)?;
        conn.execute_batch(ledger::SCHEMA)?;
        // Invocation records from before the error column.
        let has_error: i64 = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('invocations') WHERE name = 'error'",
            [],
            |r| r.get(0),
        )?;
        if has_error == 0 {
            conn.execute_batch("ALTER TABLE invocations ADD COLUMN error TEXT")?;
        }
        ledger::add_ledger_columns(&conn)?;
        conn.execute_batch(usage_feed::SCHEMA)?;
        let commits = tokio::sync::watch::Sender::new(0u64);
        let signal = commits.clone();
        conn.commit_hook(Some(move || {
            signal.send_modify(|n| *n = n.wrapping_add(1));
            // Never vetoes the commit.
            false
        }));
        Ok(Self {
            conn: Mutex::new(conn),
            commits,
            artifacts,
            _lock: lock,
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores a token's hash under `name` unless one exists; returns whether it was created.
    pub fn insert_token_hash(&self, name: &str, hash: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "INSERT OR IGNORE INTO tokens (name, hash, created_at) VALUES (?1, ?2, ?3)",
            params![name, hash, now()],
        )?;
        self.finish(tx)?;
        Ok(n == 1)
    }

    /// Replaces the hash of token `name`.
    pub fn replace_token_hash(&self, name: &str, hash: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO tokens (name, hash, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET hash = excluded.hash",
            params![name, hash, now()],
        )?;
        self.finish(tx)
    }

    /// All stored tokens' hashes.
    pub fn token_hashes(&self) -> Result<Vec<TokenHash>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, hash, tenant, scope FROM tokens")?;
        let rows = stmt.query_map([], |r| {
            Ok(TokenHash {
                name: r.get(0)?,
                hash: r.get(1)?,
                tenant: r.get(2)?,
                scope: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Stores a new token of a tenant (`None`: an admin token), limited to
    /// `scope` if given; false when the name is taken.
    pub fn create_token(
        &self,
        name: &str,
        hash: &str,
        tenant: Option<&str>,
        scope: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "INSERT OR IGNORE INTO tokens (name, hash, created_at, tenant, scope) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, hash, now(), tenant, scope],
        )?;
        self.finish(tx)?;
        Ok(n == 1)
    }

    /// The tokens (never their hashes).
    pub fn tokens(&self) -> Result<Vec<TokenInfo>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT name, tenant, created_at, scope FROM tokens ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok(TokenInfo {
                name: r.get(0)?,
                tenant: r.get(1)?,
                created_at: rfc3339(r.get(2)?),
                scope: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Stores a sealed secret (a new one, or a new value of one); true when
    /// it is new.
    pub fn set_secret(&self, name: &str, scope: &str, sealed: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let t = now();
        let existed: i64 = tx.query_row(
            "SELECT COUNT(*) FROM secrets WHERE name = ?1 AND scope = ?2",
            params![name, scope],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT INTO secrets (name, scope, sealed, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT (name, scope) DO UPDATE SET sealed = excluded.sealed, updated_at = excluded.updated_at",
            params![name, scope, sealed, t],
        )?;
        self.finish(tx)?;
        Ok(existed == 0)
    }

    /// Deletes a secret; false when there was none.
    pub fn delete_secret(&self, name: &str, scope: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "DELETE FROM secrets WHERE name = ?1 AND scope = ?2",
            params![name, scope],
        )?;
        self.finish(tx)?;
        Ok(n == 1)
    }

    /// Every secret, sealed, by name and scope.
    pub fn secrets(&self) -> Result<Vec<SealedSecret>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, scope, sealed, created_at, updated_at FROM secrets ORDER BY name, scope",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(SealedSecret {
                name: r.get(0)?,
                scope: r.get(1)?,
                sealed: r.get(2)?,
                created_at: r.get(3)?,
                updated_at: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes a token; false when there was none of that name.
    pub fn delete_token(&self, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let n = tx.execute("DELETE FROM tokens WHERE name = ?1", params![name])?;
        self.finish(tx)?;
        Ok(n == 1)
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
        let written = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            // Nothing half-written stays behind (a full disk, say).
            let _ = fs::remove_file(&tmp);
            return Err(io_err(&path)(e));
        }
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

    /// Records a version of a function (creating the function), unless one
    /// with the same bytes and configuration exists (then that one is
    /// reused), promotes `live` when asked (always for a new function), and
    /// binds `routes` to the function's `live` alias, all in one transaction.
    pub fn create_version(&self, new: &NewVersion<'_>) -> Result<Created, StoreError> {
        let function = new.function;
        let env_json: BTreeMap<&str, &str> = new
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let env_json =
            serde_json::to_string(&env_json).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let l = new.limits;
        let mut buckets = new.buckets.to_vec();
        buckets.sort();
        buckets.dedup();
        let buckets_json =
            serde_json::to_string(&buckets).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut placement = new.placement.to_vec();
        placement.sort();
        placement.dedup();
        let placement_json =
            serde_json::to_string(&placement).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut key = format!(
            "{}|{env_json}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{buckets_json}|{}",
            new.sha256,
            l.timeout_ms,
            l.memory_bytes,
            l.concurrency,
            l.request_body,
            l.response_body,
            l.log_bytes,
            new.tenant
        );
        // Placed everywhere keeps the key it always had; so do no grants.
        if !placement.is_empty() {
            key.push_str(&format!("|{placement_json}"));
        }
        let grants = new.grants.clone().normalized();
        let grants_json =
            serde_json::to_string(&grants).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if !grants.is_empty() {
            key.push_str(&format!("|grants{grants_json}"));
        }
        // So do versions that keep no instances.
        if l.reuse.is_some() || l.prewarm.is_some() {
            key.push_str(&format!("|instances{:?}{:?}", l.reuse, l.prewarm));
        }
        let config_key = sha256_hex(key.as_bytes());
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for (host, path) in new.routes {
            check_route_free(&tx, host.as_deref(), path, function)?;
        }
        let t = now();
        let existing: Option<u64> = tx
            .query_row(
                "SELECT number FROM versions WHERE function = ?1 AND config_key = ?2 ORDER BY number DESC LIMIT 1",
                params![function, config_key],
                |r| r.get(0),
            )
            .optional()?;
        let version = match existing {
            Some(v) => v,
            None => {
                let next: u64 = tx.query_row(
                    "SELECT COALESCE(MAX(number), 0) + 1 FROM versions WHERE function = ?1",
                    params![function],
                    |r| r.get(0),
                )?;
                tx.execute(
                    "INSERT INTO functions (name, created_at, updated_at) VALUES (?1, ?2, ?2)
                     ON CONFLICT(name) DO UPDATE SET updated_at = excluded.updated_at",
                    params![function, t],
                )?;
                tx.execute(
                    &format!(
                        "INSERT INTO versions (function, number, sha256, size, env, created_at, deployed_by, config_key, {LIMIT_COLUMNS}, buckets, tenant, placement, grants)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)"
                    ),
                    params![
                        function,
                        next,
                        new.sha256,
                        new.size,
                        env_json,
                        t,
                        new.deployed_by,
                        config_key,
                        l.timeout_ms,
                        l.memory_bytes,
                        l.concurrency,
                        l.request_body,
                        l.response_body,
                        l.log_bytes,
                        l.reuse,
                        l.prewarm,
                        buckets_json,
                        new.tenant,
                        placement_json,
                        grants_json
                    ],
                )?;
                next
            }
        };
        let has_live = alias_target(&tx, function, LIVE_ALIAS)?.is_some();
        let promoted = if new.promote || !has_live {
            set_alias_tx(&tx, function, LIVE_ALIAS, &AliasTarget::single(version))?
        } else {
            false
        };
        for (host, path) in new.routes {
            tx.execute(
                "INSERT OR IGNORE INTO routes (host, path, function, alias) VALUES (?1, ?2, ?3, ?4)",
                params![host.as_deref().unwrap_or(""), path, function, LIVE_ALIAS],
            )?;
        }
        self.finish(tx)?;
        Ok(Created {
            version,
            reused: existing.is_some(),
            promoted,
        })
    }

    /// Points an alias at a target (creating the alias); the old target goes
    /// to the alias's history. Returns whether anything changed.
    pub fn set_alias(
        &self,
        function: &str,
        alias: &str,
        target: &AliasTarget,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        function_exists(&tx, function)?;
        let changed = set_alias_tx(&tx, function, alias, target)?;
        self.finish(tx)?;
        Ok(changed)
    }

    /// Points an alias back at its previous target (skipping targets whose
    /// versions retention removed). Returns the target now in force.
    pub fn rollback_alias(&self, function: &str, alias: &str) -> Result<AliasTarget, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        function_exists(&tx, function)?;
        if alias_target(&tx, function, alias)?.is_none() {
            return Err(StoreError::AliasNotFound {
                function: function.to_string(),
                alias: alias.to_string(),
            });
        }
        loop {
            let last: Option<(i64, String)> = tx
                .query_row(
                    "SELECT id, target FROM alias_history WHERE function = ?1 AND name = ?2 ORDER BY id DESC LIMIT 1",
                    params![function, alias],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((id, json)) = last else {
                return Err(StoreError::NoRollback {
                    function: function.to_string(),
                    alias: alias.to_string(),
                });
            };
            tx.execute("DELETE FROM alias_history WHERE id = ?1", params![id])?;
            let target = parse_target(&json)?;
            let mut all_exist = true;
            for v in target.versions() {
                all_exist &= version_exists(&tx, function, v)?;
            }
            if all_exist {
                tx.execute(
                    "UPDATE aliases SET target = ?3, updated_at = ?4 WHERE function = ?1 AND name = ?2",
                    params![function, alias, json, now()],
                )?;
                self.finish(tx)?;
                return Ok(target);
            }
        }
    }

    /// Removes an alias. `live` and aliases that routes use are refused.
    pub fn delete_alias(&self, function: &str, alias: &str) -> Result<(), StoreError> {
        if alias == LIVE_ALIAS {
            return Err(StoreError::AliasInUse(format!(
                "the {LIVE_ALIAS:?} alias cannot be removed; point it elsewhere with `verge promote {function} VERSION`"
            )));
        }
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let routes: Vec<String> = {
            let mut stmt = tx.prepare(
                "SELECT host || path FROM routes WHERE function = ?1 AND alias = ?2 ORDER BY host, path",
            )?;
            let rows = stmt.query_map(params![function, alias], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        if !routes.is_empty() {
            return Err(StoreError::AliasInUse(format!(
                "alias {alias:?} of {function:?} serves the routes {}; remove them first (`verge routes rm`)",
                routes.join(", ")
            )));
        }
        let n = tx.execute(
            "DELETE FROM aliases WHERE function = ?1 AND name = ?2",
            params![function, alias],
        )?;
        if n == 0 {
            return Err(StoreError::AliasNotFound {
                function: function.to_string(),
                alias: alias.to_string(),
            });
        }
        tx.execute(
            "DELETE FROM alias_history WHERE function = ?1 AND name = ?2",
            params![function, alias],
        )?;
        self.finish(tx)?;
        Ok(())
    }

    /// The aliases of one function, by name.
    pub fn aliases(&self, function: &str) -> Result<Vec<Alias>, StoreError> {
        let conn = self.conn();
        function_exists(&conn, function)?;
        let mut stmt = conn.prepare(
            "SELECT a.name, a.target, a.updated_at,
                    (SELECT h.target FROM alias_history h WHERE h.function = a.function AND h.name = a.name ORDER BY h.id DESC LIMIT 1)
             FROM aliases a WHERE a.function = ?1 ORDER BY a.name",
        )?;
        let rows = stmt.query_map(params![function], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, target, at, previous) = row?;
            out.push(Alias {
                name,
                target: parse_target(&target)?,
                previous: previous.as_deref().map(parse_target).transpose()?,
                updated_at: rfc3339(at),
            });
        }
        Ok(out)
    }

    /// Every alias of every function: (function, alias, target).
    pub fn all_aliases(&self) -> Result<Vec<(String, String, AliasTarget)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT function, name, target FROM aliases")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (f, a, t) = row?;
            out.push((f, a, parse_target(&t)?));
        }
        Ok(out)
    }

    /// Removes the versions of `function` beyond the newest `keep`, except
    /// those an alias points at or would roll back to; deletes artifacts no
    /// version references any more.
    pub fn collect_versions(&self, function: &str, keep: usize) -> Result<Collected, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let numbers: Vec<(u64, String)> = {
            let mut stmt = tx.prepare(
                "SELECT number, sha256 FROM versions WHERE function = ?1 ORDER BY number DESC",
            )?;
            let rows = stmt.query_map(params![function], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        if numbers.len() <= keep {
            return Ok(Collected::default());
        }
        let mut protected = std::collections::HashSet::new();
        {
            let mut stmt = tx.prepare(
                "SELECT a.target, (SELECT h.target FROM alias_history h WHERE h.function = a.function AND h.name = a.name ORDER BY h.id DESC LIMIT 1)
                 FROM aliases a WHERE a.function = ?1",
            )?;
            let rows = stmt.query_map(params![function], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
            })?;
            for row in rows {
                let (current, previous) = row?;
                protected.extend(parse_target(&current)?.versions());
                if let Some(p) = previous {
                    protected.extend(parse_target(&p)?.versions());
                }
            }
        }
        let mut out = Collected::default();
        let mut shas = Vec::new();
        for (number, sha) in numbers.into_iter().skip(keep) {
            if protected.contains(&number) {
                continue;
            }
            tx.execute(
                "DELETE FROM versions WHERE function = ?1 AND number = ?2",
                params![function, number],
            )?;
            out.versions.push(number);
            shas.push(sha);
        }
        out.artifacts = orphans(&tx, shas)?;
        self.finish(tx)?;
        drop(conn);
        self.remove_artifacts(&out.artifacts);
        out.versions.sort_unstable();
        Ok(out)
    }

    /// Of `shas`, those no version of this registry references; their
    /// files are removed from the artifact directory (a node on a cluster
    /// whose replica imported another node's deletion).
    pub fn remove_unreferenced_artifacts(
        &self,
        shas: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let unreferenced = {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let out = orphans(&tx, shas.to_vec())?;
            tx.commit()?;
            out
        };
        self.remove_artifacts(&unreferenced);
        Ok(unreferenced)
    }

    fn remove_artifacts(&self, shas: &[String]) {
        if replica::rehearsing() {
            return;
        }
        for sha in shas {
            if let Ok(path) = self.artifact_path(sha)
                && let Err(e) = fs::remove_file(&path)
            {
                tracing::warn!(path = %path.display(), error = %e, "could not remove an unreferenced artifact");
            }
        }
    }

    /// Binds a route to an alias of an existing function; for the same
    /// owner it (re)binds the alias.
    pub fn put_route(
        &self,
        host: Option<&str>,
        path: &str,
        function: &str,
        alias: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        function_exists(&tx, function)?;
        if alias_target(&tx, function, alias)?.is_none() {
            return Err(StoreError::AliasNotFound {
                function: function.to_string(),
                alias: alias.to_string(),
            });
        }
        check_route_free(&tx, host, path, function)?;
        tx.execute(
            "INSERT INTO routes (host, path, function, alias) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(host, path) DO UPDATE SET alias = excluded.alias",
            params![host.unwrap_or(""), path, function, alias],
        )?;
        self.finish(tx)?;
        Ok(())
    }

    /// Removes a route.
    pub fn delete_route(&self, host: Option<&str>, path: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "DELETE FROM routes WHERE host = ?1 AND path = ?2",
            params![host.unwrap_or(""), path],
        )?;
        if n == 0 {
            return Err(StoreError::RouteNotFound(route_label(host, path)));
        }
        self.finish(tx)
    }

    /// Every route.
    pub fn routes(&self) -> Result<Vec<Route>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT host, path, function, alias FROM routes ORDER BY host, path")?;
        let rows = stmt.query_map([], |r| {
            let host: String = r.get(0)?;
            Ok(Route {
                host: (!host.is_empty()).then_some(host),
                path: r.get(1)?,
                function: r.get(2)?,
                alias: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn version_rows(
        &self,
        function: Option<&str>,
        number: Option<u64>,
    ) -> Result<Vec<(StoredVersion, u64, i64, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT function, number, sha256, env, size, created_at, deployed_by, {LIMIT_COLUMNS}, buckets, tenant, placement, grants
             FROM versions WHERE (?1 IS NULL OR function = ?1) AND (?2 IS NULL OR number = ?2)
             ORDER BY function, number DESC"
        ))?;
        let rows = stmt.query_map(params![function, number], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, u64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, u64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, String>(6)?,
                Limits::from_row(r, 7)?,
                r.get::<_, String>(15)?,
                r.get::<_, String>(16)?,
                r.get::<_, String>(17)?,
                r.get::<_, String>(18)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (
                function,
                version,
                sha256,
                env,
                size,
                created,
                by,
                limits,
                buckets,
                tenant,
                placement,
                grants,
            ) = row?;
            out.push((
                StoredVersion {
                    function,
                    version,
                    sha256,
                    env: parse_env(&env)?,
                    limits,
                    buckets: serde_json::from_str(&buckets)
                        .map_err(|e| StoreError::Corrupt(format!("version buckets: {e}")))?,
                    tenant,
                    placement: serde_json::from_str(&placement)
                        .map_err(|e| StoreError::Corrupt(format!("version placement: {e}")))?,
                    grants: serde_json::from_str(&grants)
                        .map_err(|e| StoreError::Corrupt(format!("version grants: {e}")))?,
                },
                size,
                created,
                by,
            ));
        }
        Ok(out)
    }

    /// Every stored version of every function (what the node registers at start).
    pub fn stored_versions(&self) -> Result<Vec<StoredVersion>, StoreError> {
        Ok(self
            .version_rows(None, None)?
            .into_iter()
            .map(|r| r.0)
            .collect())
    }

    /// One stored version.
    pub fn stored_version(
        &self,
        function: &str,
        version: u64,
    ) -> Result<StoredVersion, StoreError> {
        self.version_rows(Some(function), Some(version))?
            .into_iter()
            .next()
            .map(|r| r.0)
            .ok_or_else(|| StoreError::VersionNotFound {
                function: function.to_string(),
                version,
            })
    }

    /// The versions of one function, newest first, with the aliases naming each.
    pub fn versions(&self, function: &str) -> Result<Vec<VersionInfo>, StoreError> {
        let aliases = self.aliases(function)?;
        let rows = self.version_rows(Some(function), None)?;
        Ok(rows
            .into_iter()
            .map(|(v, size, created, by)| VersionInfo {
                version: v.version,
                sha256: v.sha256,
                size,
                timeout_ms: v.limits.timeout_ms,
                memory_bytes: v.limits.memory_bytes,
                concurrency: v.limits.concurrency,
                request_body: v.limits.request_body,
                response_body: v.limits.response_body,
                log_bytes: v.limits.log_bytes,
                reuse: v.limits.reuse,
                prewarm: v.limits.prewarm,
                reuse_fell_back: false,
                env: v.env.into_iter().collect(),
                kv_buckets: v.buckets,
                placement: v.placement,
                grants: v.grants,
                tenant: v.tenant,
                created_at: rfc3339(created),
                deployed_by: by,
                aliases: aliases
                    .iter()
                    .filter(|a| a.target.versions().any(|n| n == v.version))
                    .map(|a| a.name.clone())
                    .collect(),
                code: None,
            })
            .collect())
    }

    /// Summaries of every function.
    pub fn list_functions(&self) -> Result<Vec<FunctionSummary>, StoreError> {
        let routes = self.routes()?;
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT f.name, a.target, f.updated_at, (SELECT COUNT(*) FROM versions c WHERE c.function = f.name)
             FROM functions f JOIN aliases a ON a.function = f.name AND a.name = 'live' ORDER BY f.name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, u64>(3)?,
            ))
        })?;
        let mut heads = Vec::new();
        for row in rows {
            heads.push(row?);
        }
        let mut out = Vec::new();
        for (name, target, updated, count) in heads {
            let target = parse_target(&target)?;
            let (sha256, size): (String, u64) = conn.query_row(
                "SELECT sha256, size FROM versions WHERE function = ?1 AND number = ?2",
                params![name, target.version],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            out.push(FunctionSummary {
                routes: routes
                    .iter()
                    .filter(|r| r.function == name)
                    .cloned()
                    .collect(),
                name,
                live_version: target.version,
                live: target.describe(),
                versions: count,
                sha256,
                size,
                updated_at: rfc3339(updated),
            });
        }
        Ok(out)
    }

    /// One function with its aliases, versions and routes.
    pub fn get_function(&self, name: &str) -> Result<FunctionDetail, StoreError> {
        let routes: Vec<Route> = self
            .routes()?
            .into_iter()
            .filter(|r| r.function == name)
            .collect();
        let created_at: i64 = self
            .conn()
            .query_row(
                "SELECT created_at FROM functions WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| StoreError::FunctionNotFound(name.to_string()))?;
        let aliases = self.aliases(name)?;
        let live_version = aliases
            .iter()
            .find(|a| a.name == LIVE_ALIAS)
            .map(|a| a.target.version)
            .unwrap_or(0);
        Ok(FunctionDetail {
            name: name.to_string(),
            live_version,
            created_at: rfc3339(created_at),
            routes,
            versions: self.versions(name)?,
            aliases,
        })
    }

    /// Deletes a function, its versions, aliases and routes; removes artifacts
    /// no longer referenced. Returns the sha256s removed.
    pub fn delete_function(&self, name: &str) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let shas: Vec<String> = {
            let mut stmt =
                tx.prepare("SELECT DISTINCT sha256 FROM versions WHERE function = ?1")?;
            let rows = stmt.query_map(params![name], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for table in ["routes", "aliases", "alias_history", "versions"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE function = ?1"),
                params![name],
            )?;
        }
        let n = tx.execute("DELETE FROM functions WHERE name = ?1", params![name])?;
        if n == 0 {
            return Err(StoreError::FunctionNotFound(name.to_string()));
        }
        let orphans = orphans(&tx, shas)?;
        self.finish(tx)?;
        drop(conn);
        self.remove_artifacts(&orphans);
        Ok(orphans)
    }
}

/// Of `shas`, those no version references.
fn orphans(tx: &rusqlite::Transaction<'_>, shas: Vec<String>) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for sha in shas {
        let used: i64 = tx.query_row(
            "SELECT COUNT(*) FROM versions WHERE sha256 = ?1",
            params![sha],
            |r| r.get(0),
        )?;
        if used == 0 && !out.contains(&sha) {
            out.push(sha);
        }
    }
    Ok(out)
}

fn function_exists(conn: &Connection, function: &str) -> Result<(), StoreError> {
    let exists: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM functions WHERE name = ?1",
            params![function],
            |r| r.get(0),
        )
        .optional()?;
    exists
        .map(drop)
        .ok_or_else(|| StoreError::FunctionNotFound(function.to_string()))
}

fn version_exists(conn: &Connection, function: &str, version: u64) -> Result<bool, StoreError> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM versions WHERE function = ?1 AND number = ?2",
        params![function, version],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

fn alias_target(
    conn: &Connection,
    function: &str,
    alias: &str,
) -> Result<Option<AliasTarget>, StoreError> {
    let json: Option<String> = conn
        .query_row(
            "SELECT target FROM aliases WHERE function = ?1 AND name = ?2",
            params![function, alias],
            |r| r.get(0),
        )
        .optional()?;
    json.as_deref().map(parse_target).transpose()
}

/// Sets an alias inside a transaction, checking that its versions exist;
/// the replaced target goes to the history. Returns whether it changed.
fn set_alias_tx(
    tx: &rusqlite::Transaction<'_>,
    function: &str,
    alias: &str,
    target: &AliasTarget,
) -> Result<bool, StoreError> {
    for v in target.versions() {
        if !version_exists(tx, function, v)? {
            return Err(StoreError::VersionNotFound {
                function: function.to_string(),
                version: v,
            });
        }
    }
    let current = alias_target(tx, function, alias)?;
    if current.as_ref() == Some(target) {
        return Ok(false);
    }
    let t = now();
    let json = serde_json::to_string(target).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    if let Some(old) = current {
        let old = serde_json::to_string(&old).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        tx.execute(
            "INSERT INTO alias_history (function, name, target, at) VALUES (?1, ?2, ?3, ?4)",
            params![function, alias, old, t],
        )?;
        // History is for rollbacks, not an audit log: keep the last 100.
        tx.execute(
            "DELETE FROM alias_history WHERE function = ?1 AND name = ?2 AND id NOT IN
               (SELECT id FROM alias_history WHERE function = ?1 AND name = ?2 ORDER BY id DESC LIMIT 100)",
            params![function, alias],
        )?;
    }
    tx.execute(
        "INSERT INTO aliases (function, name, target, updated_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(function, name) DO UPDATE SET target = excluded.target, updated_at = excluded.updated_at",
        params![function, alias, json, t],
    )?;
    tx.execute(
        "UPDATE functions SET updated_at = ?2 WHERE name = ?1",
        params![function, t],
    )?;
    Ok(true)
}

fn parse_target(json: &str) -> Result<AliasTarget, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("alias target: {e}")))
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

/// The trace stored in columns `i..i + 3` (trace, span, parent span) of a
/// row whose id is `id`: a trace id not stored is the invocation's own.
pub(crate) fn trace_at(
    row: &rusqlite::Row<'_>,
    i: usize,
    id: &str,
) -> rusqlite::Result<Option<verge_spec::InvocationTrace>> {
    let (t, s, p): (Option<String>, Option<String>, Option<String>) =
        (row.get(i)?, row.get(i + 1)?, row.get(i + 2)?);
    Ok(verge_spec::InvocationTrace::from_hex(
        Some(t.as_deref().unwrap_or(id)),
        s.as_deref(),
        p.as_deref(),
    ))
}

/// The outcome stored in column `i`.
fn outcome_at(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<verge_spec::Outcome> {
    let name: String = row.get(i)?;
    verge_spec::Outcome::parse(&name).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            format!("unknown invocation outcome {name:?}").into(),
        )
    })
}

impl Store {
    /// Recent invocations, newest first.
    pub fn invocations(
        &self,
        function: Option<&str>,
        status: Option<u16>,
        id: Option<&str>,
        trace: Option<&str>,
        limit: u32,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        const COLUMNS: &str =
            "id, function, version, started_at_ms, wall_us, cpu_us, peak_memory, memory_limit,
             request_bytes, response_bytes, status, outcome, cold, error, forwarded_from,
             parent_id, outbound_requests, outbound_sent, outbound_received, outbound_wait_us,
             trace_id, span_id, parent_span_id";
        const FILTERS: &str = "(?1 IS NULL OR function = ?1) AND (?2 IS NULL OR status = ?2)
             AND (?3 IS NULL OR id = ?3)";
        let conn = self.conn();
        // A trace: its invocations caused by others through the trace
        // index, and the one it started at (trace id = invocation id) by
        // the primary key.
        let sql = match trace {
            None => format!(
                "SELECT {COLUMNS} FROM invocations WHERE {FILTERS}
                 ORDER BY started_at_ms DESC, id LIMIT ?4"
            ),
            Some(_) => format!(
                "SELECT * FROM (
                   SELECT {COLUMNS} FROM invocations WHERE trace_id = ?5 AND {FILTERS}
                   UNION ALL
                   SELECT {COLUMNS} FROM invocations WHERE id = ?5 AND trace_id IS NULL AND {FILTERS})
                 ORDER BY started_at_ms DESC, id LIMIT ?4"
            ),
        };
        let mut stmt = conn.prepare(&sql)?;
        let bound = params![function, status, id, limit, trace];
        let bound = if trace.is_some() { bound } else { &bound[..4] };
        let rows = stmt.query_map(bound, |r| {
            let invocation_id: String = r.get(0)?;
            Ok(UsageRecord {
                trace: trace_at(r, 20, &invocation_id)?,
                invocation_id,
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
                outcome: outcome_at(r, 11)?,
                cold: r.get(12)?,
                stdout: None,
                stderr: None,
                error: r.get(13)?,
                forwarded_from: r.get(14)?,
                parent_id: r.get(15)?,
                outbound_requests: r.get(16)?,
                outbound_sent_bytes: r.get(17)?,
                outbound_received_bytes: r.get(18)?,
                outbound_wait_us: r.get(19)?,
                ..UsageRecord::default()
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
            "SELECT id, function, version, started_at_ms, status, outcome, stdout, stderr, error,
                    forwarded_from
             FROM invocations
             WHERE (?1 IS NULL OR function = ?1) AND (?2 IS NULL OR id = ?2)
               AND (stdout IS NOT NULL OR stderr IS NOT NULL OR error IS NOT NULL OR ?2 IS NOT NULL)
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
                    outcome: outcome_at(r, 5)?,
                    cold: false,
                    stdout: r.get(6)?,
                    stderr: r.get(7)?,
                    error: r.get(8)?,
                    forwarded_from: r.get(9)?,
                    ..UsageRecord::default()
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
        // Raw records, and the per-minute rollups of records already pruned
        // (`retention`): those keep billed durations at 1 ms, 100 ms and 1 s
        // granularity, and a coarser query granularity uses the nearest of
        // them at or below it.
        let sql = format!(
            "SELECT k, SUM(n), SUM(peak), SUM(billed), SUM(cpu), SUM(bytes), SUM(oreq), SUM(obytes),
                    SUM(owait) FROM (
                SELECT {key} AS k, COUNT(*) AS n,
                       SUM(CAST(peak_memory AS REAL) * wall_us) AS peak,
                       SUM(CAST(memory_limit AS REAL) * (((wall_us + ?3 - 1) / ?3) * ?3)) AS billed,
                       SUM(cpu_us) AS cpu, SUM(response_bytes) AS bytes,
                       SUM(outbound_requests) AS oreq, SUM(outbound_sent + outbound_received) AS obytes,
                       SUM(outbound_wait_us) AS owait
                FROM invocations
                WHERE (?1 IS NULL OR started_at_ms >= ?1) AND (?2 IS NULL OR started_at_ms < ?2)
                GROUP BY k
                UNION ALL
                SELECT {key} AS k, SUM(invocations), SUM(peak_wall),
                       SUM(CASE WHEN ?3 >= 1000000 THEN billed_1s WHEN ?3 >= 100000 THEN billed_100ms ELSE billed_1ms END),
                       SUM(cpu_us), SUM(response_bytes), SUM(outbound_requests),
                       SUM(outbound_bytes), SUM(outbound_wait_us)
                FROM usage_minutes
                WHERE (?1 IS NULL OR started_at_ms >= ?1) AND (?2 IS NULL OR started_at_ms < ?2)
                GROUP BY k
             ) GROUP BY k ORDER BY k",
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
                (
                    r.get::<_, u64>(6)?,
                    r.get::<_, u64>(7)?,
                    r.get::<_, u64>(8)?,
                ),
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
            outbound_requests: 0,
            outbound_bytes: 0,
            outbound_wait_seconds: 0.0,
            cost: 0.0,
        };
        for row in rows {
            let (key, n, peak, configured, cpu, bytes, (oreq, obytes, owait)) = row?;
            let mut u = UsageRow {
                key,
                invocations: n,
                gb_seconds_peak: peak / GIB / 1e6,
                gb_seconds_configured: configured / GIB / 1e6,
                cpu_seconds: cpu as f64 / 1e6,
                bytes_out: bytes,
                outbound_requests: oreq,
                outbound_bytes: obytes,
                outbound_wait_seconds: owait as f64 / 1e6,
                cost: 0.0,
            };
            u.cost = u.invocations as f64 / 1e6 * q.price_per_million_requests
                + u.gb_seconds_configured * q.price_per_gb_second;
            total.invocations += u.invocations;
            total.gb_seconds_peak += u.gb_seconds_peak;
            total.gb_seconds_configured += u.gb_seconds_configured;
            total.cpu_seconds += u.cpu_seconds;
            total.bytes_out += u.bytes_out;
            total.outbound_requests += u.outbound_requests;
            total.outbound_bytes += u.outbound_bytes;
            total.outbound_wait_seconds += u.outbound_wait_seconds;
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
    use std::time::Duration;

    fn new_version<'a>(
        function: &'a str,
        sha: &'a str,
        env: &'a [(String, String)],
        routes: &'a [(Option<String>, String)],
    ) -> NewVersion<'a> {
        NewVersion {
            function,
            sha256: sha,
            size: 3,
            env,
            limits: Limits::default(),
            buckets: &[],
            tenant: "default",
            placement: &[],
            grants: &verge_spec::NO_GRANTS,
            routes,
            deployed_by: "admin",
            promote: true,
        }
    }

    #[test]
    fn versions_routes_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sha = store.put_artifact(b"abc").unwrap();
        assert_eq!(store.read_artifact(&sha).unwrap(), b"abc");
        let routes = vec![(None, "/a".to_string())];
        let env = [("K".to_string(), "V".to_string())];
        let first = store
            .create_version(&new_version("f", &sha, &[], &routes))
            .unwrap();
        assert_eq!(
            (first.version, first.reused, first.promoted),
            (1, false, true)
        );
        let second = store
            .create_version(&new_version("f", &sha, &env, &routes))
            .unwrap();
        assert_eq!((second.version, second.reused), (2, false));
        // Same bytes and configuration: the version is reused.
        let again = store
            .create_version(&new_version("f", &sha, &env, &routes))
            .unwrap();
        assert_eq!(
            (again.version, again.reused, again.promoted),
            (2, true, false)
        );
        let err = store
            .create_version(&new_version("g", &sha, &[], &routes))
            .unwrap_err();
        assert!(matches!(err, StoreError::RouteConflict { .. }), "{err}");
        assert!(
            store.get_function("g").is_err(),
            "a refused deploy stores nothing"
        );
        let f = store.get_function("f").unwrap();
        assert_eq!(f.live_version, 2);
        assert_eq!(f.versions[0].env.get("K").map(String::as_str), Some("V"));
        assert_eq!(f.versions[0].aliases, vec!["live".to_string()]);
        assert_eq!(f.routes[0].alias, "live");
        assert_eq!(store.stored_versions().unwrap().len(), 2);
        assert_eq!(store.delete_function("f").unwrap(), vec![sha.clone()]);
        assert!(store.read_artifact(&sha).is_err());
        assert!(store.routes().unwrap().is_empty());
        assert!(store.all_aliases().unwrap().is_empty());
        assert!(matches!(
            store.delete_function("f"),
            Err(StoreError::FunctionNotFound(_))
        ));
    }

    #[test]
    fn aliases_promote_and_roll_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store.put_artifact(b"a").unwrap();
        let b = store.put_artifact(b"b").unwrap();
        store
            .create_version(&new_version("f", &a, &[], &[]))
            .unwrap();
        let mut no_promote = new_version("f", &b, &[], &[]);
        no_promote.promote = false;
        let v2 = store.create_version(&no_promote).unwrap();
        assert_eq!((v2.version, v2.promoted), (2, false));
        assert_eq!(store.get_function("f").unwrap().live_version, 1);
        let canary = AliasTarget {
            canary: Some(verge_spec::Canary {
                version: 2,
                weight: 10,
            }),
            sticky_header: Some("x-user".into()),
            ..AliasTarget::single(1)
        };
        assert!(store.set_alias("f", "live", &canary).unwrap());
        assert!(!store.set_alias("f", "live", &canary).unwrap(), "unchanged");
        assert!(
            store
                .set_alias("f", "live", &AliasTarget::single(2))
                .unwrap()
        );
        let live = &store.aliases("f").unwrap()[0];
        assert_eq!(live.previous.as_ref(), Some(&canary));
        assert_eq!(store.rollback_alias("f", "live").unwrap(), canary);
        assert_eq!(
            store.rollback_alias("f", "live").unwrap(),
            AliasTarget::single(1)
        );
        assert!(matches!(
            store.rollback_alias("f", "live"),
            Err(StoreError::NoRollback { .. })
        ));
        assert!(matches!(
            store.set_alias("f", "beta", &AliasTarget::single(9)),
            Err(StoreError::VersionNotFound { version: 9, .. })
        ));
        store
            .set_alias("f", "beta", &AliasTarget::single(2))
            .unwrap();
        store.put_route(None, "/beta", "f", "beta").unwrap();
        assert!(matches!(
            store.delete_alias("f", "beta"),
            Err(StoreError::AliasInUse(_))
        ));
        assert!(matches!(
            store.delete_alias("f", "live"),
            Err(StoreError::AliasInUse(_))
        ));
        assert!(matches!(
            store.put_route(None, "/x", "f", "nope"),
            Err(StoreError::AliasNotFound { .. })
        ));
        store.delete_route(None, "/beta").unwrap();
        store.delete_alias("f", "beta").unwrap();
        assert_eq!(store.aliases("f").unwrap().len(), 1);
    }

    #[test]
    fn retention_keeps_aliased_versions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut shas = Vec::new();
        for i in 0..6u8 {
            let sha = store.put_artifact(&[i]).unwrap();
            store
                .create_version(&new_version("f", &sha, &[], &[]))
                .unwrap();
            shas.push(sha);
        }
        // live -> 6 (previous 5); pin 1 with an alias.
        store
            .set_alias("f", "old", &AliasTarget::single(1))
            .unwrap();
        let collected = store.collect_versions("f", 2).unwrap();
        assert_eq!(collected.versions, vec![2, 3, 4]);
        assert_eq!(
            collected.artifacts,
            vec![shas[3].clone(), shas[2].clone(), shas[1].clone()]
        );
        assert!(store.read_artifact(&shas[1]).is_err());
        assert!(store.read_artifact(&shas[0]).is_ok());
        let left: Vec<u64> = store
            .versions("f")
            .unwrap()
            .iter()
            .map(|v| v.version)
            .collect();
        assert_eq!(left, vec![6, 5, 1]);
        assert_eq!(
            store.collect_versions("f", 2).unwrap(),
            Collected::default()
        );
    }

    #[test]
    fn migrates_a_session_one_registry() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join("verge.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE functions (name TEXT PRIMARY KEY, live_version INTEGER NOT NULL, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
                 CREATE TABLE versions (function TEXT NOT NULL, number INTEGER NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL, env TEXT NOT NULL, created_at INTEGER NOT NULL, timeout_ms INTEGER, memory_bytes INTEGER, concurrency INTEGER, request_body INTEGER, response_body INTEGER, log_bytes INTEGER, PRIMARY KEY (function, number));
                 CREATE TABLE routes (host TEXT NOT NULL DEFAULT '', path TEXT NOT NULL, function TEXT NOT NULL, PRIMARY KEY (host, path));
                 INSERT INTO functions VALUES ('f', 2, 1, 1);
                 INSERT INTO versions (function, number, sha256, size, env, created_at) VALUES ('f', 1, 'aa', 1, '{}', 1), ('f', 2, 'bb', 1, '{}', 1);
                 INSERT INTO routes VALUES ('', '/f', 'f');",
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let f = store.get_function("f").unwrap();
        assert_eq!(f.live_version, 2);
        assert_eq!(f.routes[0].alias, "live");
        assert_eq!(f.versions[0].deployed_by, "admin");
        drop(store);
        // And opening again is a no-op.
        assert_eq!(
            Store::open(dir.path())
                .unwrap()
                .get_function("f")
                .unwrap()
                .live_version,
            2
        );
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
            outcome: verge_spec::Outcome::Ok,
            cold: false,
            stdout: None,
            stderr: None,
            error: None,
            forwarded_from: None,
            ..UsageRecord::default()
        }
    }

    #[test]
    fn the_ledger_keeps_the_write_ahead_log_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        // 96 MiB of output in one go, more than the log's bound (64 MiB).
        let mib = "x".repeat(1 << 20);
        for i in 0..96 {
            let mut r = record(&format!("r{i}"), "f", 1_000);
            r.stdout = Some(mib.clone());
            ledger.record(r);
        }
        ledger.flush();
        let wal = std::fs::metadata(dir.path().join("verge.db-wal")).map_or(0, |m| m.len());
        assert!(wal <= 64 << 20, "the write-ahead log is {} MiB", wal >> 20);
        assert_eq!(
            store
                .invocations(None, None, None, None, 100)
                .unwrap()
                .len(),
            96
        );
    }

    #[test]
    fn a_trace_is_found_by_its_root_and_the_invocations_it_caused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let root_id = "0190000000000000000000000000000a";
        let mut root_trace_id = [0u8; 16];
        root_trace_id[0] = 0x01;
        root_trace_id[1] = 0x90;
        root_trace_id[15] = 0x0a;
        // The root: its trace id is its own id (a trace started here).
        let root = verge_spec::InvocationTrace::start(None, {
            let mut ids = [1u8; 24];
            ids[..16].copy_from_slice(&root_trace_id);
            ids
        });
        assert_eq!(root.trace_hex(), root_id);
        let child = verge_spec::InvocationTrace::start(Some(root.context()), [2; 24]);
        let grandchild = verge_spec::InvocationTrace::start(Some(child.context()), [3; 24]);
        let other = verge_spec::InvocationTrace::start(None, [4; 24]);
        for (id, t) in [
            (root_id, root),
            ("c1", child),
            ("c2", grandchild),
            ("x", other),
        ] {
            ledger.record(UsageRecord {
                trace: Some(t),
                ..record(id, "f", 10)
            });
        }
        ledger.record(record("untraced", "f", 10));
        ledger.flush();
        let found = store
            .invocations(None, None, None, Some(root_id), 100)
            .unwrap();
        let mut ids: Vec<&str> = found.iter().map(|r| r.invocation_id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["0190000000000000000000000000000a", "c1", "c2"]);
        for r in &found {
            assert_eq!(r.trace.unwrap().trace_id, root_trace_id);
        }
        let c2 = found.iter().find(|r| r.invocation_id == "c2").unwrap();
        assert_eq!(c2.trace, Some(grandchild));
        // The root's trace id is not stored: it is its id.
        let stored: Option<String> = store
            .conn()
            .query_row(
                "SELECT trace_id FROM invocations WHERE id = ?1",
                [root_id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stored, None);
        let x = store
            .invocations(None, None, None, Some(&other.trace_hex()), 100)
            .unwrap();
        assert_eq!(x.len(), 1);
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
        assert_eq!(
            store.invocations(None, None, None, None, 10).unwrap().len(),
            3
        );
        assert_eq!(
            store
                .invocations(Some("f"), Some(200), None, None, 10)
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
    fn pruned_records_are_rolled_up_and_usage_still_answers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        for (i, wall) in [1_000, 150_000, 1_000_000, 2_500].iter().enumerate() {
            let mut r = record(&format!("r{i}"), if i == 2 { "g" } else { "f" }, *wall);
            r.stdout = Some("x".repeat(10_000));
            ledger.record(r);
        }
        ledger.flush();
        let q = |by: &str, g: u64| UsageQuery {
            since_ms: None,
            until_ms: None,
            by: UsageBy::parse_list(by).unwrap(),
            granularity_ms: g,
            price_per_million_requests: 0.2,
            price_per_gb_second: 0.0000166667,
        };
        let before: Vec<_> = [("function", 1), ("version,minute", 100), ("hour", 1000)]
            .iter()
            .map(|(by, g)| store.usage(&q(by, *g)).unwrap())
            .collect();
        let mut pruner = Pruner::open(dir.path()).unwrap();
        // Younger than the age, under the size: nothing goes.
        let kept = pruner
            .prune(&Retention::default(), 1_795_000_000_000 + 1000)
            .unwrap();
        assert_eq!(kept.deleted, 0);
        assert_eq!(
            store.invocations(None, None, None, None, 10).unwrap().len(),
            4
        );
        // Past the age: every record goes, its usage stays.
        let policy = Retention {
            age: Duration::from_secs(60),
            bytes: 1 << 30,
        };
        let p = pruner
            .prune(&policy, 1_795_000_000_000 + 3_600_000)
            .unwrap();
        assert_eq!(p.deleted, 4);
        assert!(
            store
                .invocations(None, None, None, None, 10)
                .unwrap()
                .is_empty()
        );
        for ((by, g), was) in [("function", 1), ("version,minute", 100), ("hour", 1000)]
            .iter()
            .zip(&before)
        {
            let now = store.usage(&q(by, *g)).unwrap();
            assert_eq!(now.rows.len(), was.rows.len(), "{by}");
            for (a, b) in now.rows.iter().zip(&was.rows) {
                assert_eq!(a.key, b.key);
                assert_eq!(a.invocations, b.invocations);
                assert!(
                    (a.gb_seconds_configured - b.gb_seconds_configured).abs() < 1e-9,
                    "{by} {g}: {a:?} {b:?}"
                );
                assert!((a.gb_seconds_peak - b.gb_seconds_peak).abs() < 1e-9);
                assert!((a.cpu_seconds - b.cpu_seconds).abs() < 1e-9);
                assert_eq!(a.bytes_out, b.bytes_out);
            }
        }
        // New records beside rollups of the same minute: counted once each.
        ledger.record(record("late", "f", 1_000));
        ledger.flush();
        let r = store.usage(&q("function", 1)).unwrap();
        assert_eq!(r.total.invocations, 5);
        // The size bound: the oldest go until the database fits.
        let p = pruner
            .prune(
                &Retention {
                    age: Duration::from_secs(3600 * 24 * 365),
                    bytes: 0,
                },
                1_795_000_000_000,
            )
            .unwrap();
        assert_eq!(p.deleted, 1);
        assert_eq!(store.usage(&q("function", 1)).unwrap().total.invocations, 5);
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
                .create_version(&new_version("f", &sha, &[], &[]))
                .unwrap();
            assert!(store.insert_token_hash("admin", "h").unwrap());
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.get_function("f").unwrap().live_version, 1);
        assert!(!store.insert_token_hash("admin", "h2").unwrap());
        let tokens: Vec<(String, String, Option<String>)> = store
            .token_hashes()
            .unwrap()
            .into_iter()
            .map(|t| (t.name, t.hash, t.tenant))
            .collect();
        assert_eq!(tokens, vec![("admin".to_string(), "h".to_string(), None)]);
    }
}
