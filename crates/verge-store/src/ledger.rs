//! The usage ledger: every invocation's usage record, written in batches.
//!
//! Records are queued in memory and committed by a writer thread in one
//! transaction per batch: at least every [`FLUSH_INTERVAL`] or every
//! [`BATCH_MAX`] records, whichever comes first. A kill -9 therefore loses at
//! most the records of the last 100 ms; a record returned by a query has been
//! committed and survives any crash after it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, params};
use verge_spec::UsageRecord;

use crate::StoreError;

/// The longest a record waits in memory before it is committed.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Records per transaction at most.
pub const BATCH_MAX: usize = 1000;
/// Records queued before new ones are dropped (and counted) rather than
/// letting memory grow without bound when the disk cannot keep up.
pub const QUEUE_MAX: usize = 100_000;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS invocations (
    id TEXT PRIMARY KEY,
    function TEXT NOT NULL,
    version INTEGER NOT NULL,
    started_at_ms INTEGER NOT NULL,
    wall_us INTEGER NOT NULL,
    cpu_us INTEGER NOT NULL,
    peak_memory INTEGER NOT NULL,
    memory_limit INTEGER NOT NULL,
    request_bytes INTEGER NOT NULL,
    response_bytes INTEGER NOT NULL,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    cold INTEGER NOT NULL,
    stdout TEXT,
    stderr TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS invocations_by_time ON invocations (started_at_ms);
CREATE TABLE IF NOT EXISTS usage_minutes (
    started_at_ms INTEGER NOT NULL,
    function TEXT NOT NULL,
    version INTEGER NOT NULL,
    invocations INTEGER NOT NULL,
    peak_wall REAL NOT NULL,
    billed_1ms REAL NOT NULL,
    billed_100ms REAL NOT NULL,
    billed_1s REAL NOT NULL,
    cpu_us INTEGER NOT NULL,
    response_bytes INTEGER NOT NULL,
    PRIMARY KEY (started_at_ms, function, version)
);
CREATE INDEX IF NOT EXISTS invocations_by_function ON invocations (function, started_at_ms);
";

struct Shared {
    pending: Mutex<Vec<UsageRecord>>,
    /// The database's write-ahead log (`verge.db-wal`).
    wal: std::path::PathBuf,
    wake: Condvar,
    conn: Mutex<Connection>,
    stop: AtomicBool,
    dropped: AtomicU64,
    /// Bytes of records queued so far (output and an estimate of the rest).
    written: AtomicU64,
    /// Sees every batch before it is committed, on the writer thread.
    observer: std::sync::OnceLock<Observer>,
}

/// Sees the ledger's records in batches, on its writer thread (off every
/// request's path): metrics and traces are made from them.
pub type Observer = Box<dyn Fn(&[UsageRecord]) + Send + Sync>;

/// The writer side of the ledger (cheap to share).
///
/// Recording a usage record only pushes it onto a vector under a mutex: the
/// writer thread is not woken per record (on a small machine those wake-ups
/// cost more than the inserts), but every [`FLUSH_INTERVAL`], or as soon as
/// [`BATCH_MAX`] records wait.
pub struct Ledger {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Ledger {
    /// Opens the ledger on the store's database in `dir` and starts its writer.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(dir.join("verge.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // The write-ahead log goes back to 64 MiB after each checkpoint,
        // whatever a burst of records made it grow to.
        conn.pragma_update(None, "journal_size_limit", 64i64 << 20)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        add_ledger_columns(&conn)?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Vec::with_capacity(BATCH_MAX)),
            wal: dir.join("verge.db-wal"),
            wake: Condvar::new(),
            conn: Mutex::new(conn),
            stop: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
            observer: std::sync::OnceLock::new(),
        });
        let s = shared.clone();
        let writer = std::thread::Builder::new()
            .name("verge-ledger".into())
            .spawn(move || write_loop(&s))
            .map_err(|e| StoreError::Corrupt(format!("could not start the ledger writer: {e}")))?;
        Ok(Self {
            shared,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Bytes of records queued since the ledger opened (their output plus
    /// about 256 bytes each): how fast the table grows, for retention.
    pub fn bytes_written(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Queues a record; never blocks on the disk.
    pub fn record(&self, record: UsageRecord) {
        let size = 256
            + record.stdout.as_ref().map_or(0, String::len)
            + record.stderr.as_ref().map_or(0, String::len);
        self.shared
            .written
            .fetch_add(size as u64, Ordering::Relaxed);
        let mut pending = lock(&self.shared.pending);
        if pending.len() >= QUEUE_MAX {
            drop(pending);
            let n = self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            if (n + 1).is_power_of_two() {
                tracing::error!(dropped = n + 1, "usage ledger queue full; records dropped");
            }
            return;
        }
        pending.push(record);
        if pending.len() == BATCH_MAX {
            self.shared.wake.notify_one();
        }
    }

    /// Sets the observer of every record from now on (once; a second
    /// observer is refused and returned).
    pub fn observe(&self, observer: Observer) -> Result<(), Observer> {
        self.shared.observer.set(observer)
    }

    /// Commits everything queued so far (used at shutdown and by tests).
    pub fn flush(&self) {
        let batch = std::mem::take(&mut *lock(&self.shared.pending));
        observe(&self.shared, &batch);
        if !batch.is_empty()
            && let Err(e) = commit(&self.shared, &batch)
        {
            tracing::error!(error = %e, records = batch.len(), "could not commit usage records");
        }
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        let handle = lock(&self.writer).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        self.flush();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn observe(shared: &Shared, batch: &[UsageRecord]) {
    if !batch.is_empty()
        && let Some(o) = shared.observer.get()
    {
        o(batch);
    }
}

fn write_loop(shared: &Shared) {
    loop {
        let batch = {
            let mut pending = lock(&shared.pending);
            if pending.len() < BATCH_MAX && !shared.stop.load(Ordering::Acquire) {
                pending = shared
                    .wake
                    .wait_timeout(pending, FLUSH_INTERVAL)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            std::mem::take(&mut *pending)
        };
        // Observed once committed: a batch put back after a failed commit
        // is observed when it goes in.
        if batch.is_empty() {
        } else if let Err(e) = commit(shared, &batch) {
            tracing::error!(error = %e, records = batch.len(), "could not commit usage records; retrying");
            // Put them back in front, unless that would exceed the bound.
            let mut pending = lock(&shared.pending);
            if pending.len() + batch.len() <= QUEUE_MAX {
                let newer = std::mem::replace(&mut *pending, batch);
                pending.extend(newer);
            }
            drop(pending);
            std::thread::sleep(Duration::from_millis(50));
        } else {
            observe(shared, &batch);
        }
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
    }
}

/// Size of the write-ahead log past which the writer checkpoints it and
/// truncates it (besides the checkpoint after each retention pass).
const WAL_LIMIT: u64 = 64 << 20;

/// Commits `batch`, then bounds the write-ahead log: SQLite's own
/// checkpoints copy it into the database but leave the file as large as it
/// grew, which under a steady stream of large records (before retention
/// first prunes) was more than the retention bound itself.
fn commit(shared: &Shared, batch: &[UsageRecord]) -> Result<(), rusqlite::Error> {
    let conn = &mut lock(&shared.conn);
    insert(conn, batch)?;
    if std::fs::metadata(&shared.wal).is_ok_and(|m| m.len() > WAL_LIMIT) {
        // Waits for readers up to the busy timeout, holding up this thread
        // only (records queue meanwhile), never a request.
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, "could not truncate the write-ahead log; the next commit tries again");
        }
    }
    Ok(())
}

fn insert(conn: &mut Connection, batch: &[UsageRecord]) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    insert_records(&tx, batch.iter().map(|r| (None, r)))?;
    tx.commit()
}

/// The trace id as stored: none when it is the invocation's own id (a
/// trace that started at it: found by its primary key, kept out of the
/// trace index, whose random keys cost every insert).
fn stored_trace_id(t: &verge_spec::InvocationTrace, invocation_id: &str) -> Option<String> {
    let hex = verge_spec::to_hex(&t.trace_id);
    (hex != invocation_id).then_some(hex)
}

/// The columns of records added after the first schema (the node a record
/// came from, forwarding, calls, outbound traffic), added to databases from
/// before them.
pub(crate) fn add_ledger_columns(conn: &Connection) -> Result<(), rusqlite::Error> {
    const COLUMNS: &[(&str, &str, &str)] = &[
        ("invocations", "node", "TEXT"),
        ("invocations", "forwarded_from", "TEXT"),
        ("invocations", "parent_id", "TEXT"),
        (
            "invocations",
            "outbound_requests",
            "INTEGER NOT NULL DEFAULT 0",
        ),
        ("invocations", "outbound_sent", "INTEGER NOT NULL DEFAULT 0"),
        (
            "invocations",
            "outbound_received",
            "INTEGER NOT NULL DEFAULT 0",
        ),
        (
            "invocations",
            "outbound_wait_us",
            "INTEGER NOT NULL DEFAULT 0",
        ),
        (
            "usage_minutes",
            "outbound_requests",
            "INTEGER NOT NULL DEFAULT 0",
        ),
        (
            "usage_minutes",
            "outbound_bytes",
            "INTEGER NOT NULL DEFAULT 0",
        ),
        (
            "usage_minutes",
            "outbound_wait_us",
            "INTEGER NOT NULL DEFAULT 0",
        ),
        ("invocations", "trace_id", "TEXT"),
        ("invocations", "span_id", "TEXT"),
        ("invocations", "parent_span_id", "TEXT"),
    ];
    add_columns(conn, COLUMNS)?;
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS invocations_by_trace ON invocations (trace_id)
         WHERE trace_id IS NOT NULL",
    )
}

/// Adds each `(table, column, definition)` a database from before it lacks.
pub(crate) fn add_columns(
    conn: &Connection,
    columns: &[(&str, &str, &str)],
) -> Result<(), rusqlite::Error> {
    for (table, column, def) in columns {
        let has: i64 = conn.query_row(
            &format!("SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = ?1"),
            params![column],
            |r| r.get(0),
        )?;
        if has == 0 {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {def}"))?;
        }
    }
    Ok(())
}

/// Inserts records (each with the node it came from, `None`: this one);
/// a record whose invocation id is already here is skipped. Returns how
/// many were added.
pub(crate) fn insert_records<'a>(
    tx: &rusqlite::Transaction<'_>,
    records: impl Iterator<Item = (Option<&'a str>, &'a UsageRecord)>,
) -> Result<usize, rusqlite::Error> {
    let mut stmt = tx.prepare_cached(
        "INSERT OR IGNORE INTO invocations (id, function, version, started_at_ms, wall_us, cpu_us,
         peak_memory, memory_limit, request_bytes, response_bytes, status, outcome, cold, stdout, stderr, error, node,
         forwarded_from, parent_id, outbound_requests, outbound_sent, outbound_received, outbound_wait_us,
         trace_id, span_id, parent_span_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
                 ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26)",
    )?;
    let mut added = 0;
    for (node, r) in records {
        added += stmt.execute(params![
            r.invocation_id,
            r.function,
            r.version,
            r.started_at_ms,
            r.wall_us,
            r.cpu_us,
            r.peak_memory_bytes,
            r.memory_limit_bytes,
            r.request_bytes,
            r.response_bytes,
            r.status,
            r.outcome.as_str(),
            r.cold,
            r.stdout,
            r.stderr,
            r.error,
            node,
            r.forwarded_from,
            r.parent_id,
            r.outbound_requests,
            r.outbound_sent_bytes,
            r.outbound_received_bytes,
            r.outbound_wait_us,
            r.trace.and_then(|t| stored_trace_id(&t, &r.invocation_id)),
            r.trace.map(|t| verge_spec::to_hex(&t.span_id)),
            r.trace
                .and_then(|t| t.parent)
                .map(|p| verge_spec::to_hex(&p)),
        ])?;
    }
    Ok(added)
}
