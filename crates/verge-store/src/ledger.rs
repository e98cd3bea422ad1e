//! The usage ledger: every invocation's usage record, written in batches.
//!
//! Records are queued in memory and committed by a writer thread in one
//! transaction per batch: at least every [`FLUSH_INTERVAL`] or every
//! [`BATCH_MAX`] records, whichever comes first. A kill -9 therefore loses at
//! most the records of the last 100 ms; a record returned by a query has been
//! committed and survives any crash after it.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    stderr TEXT
);
CREATE INDEX IF NOT EXISTS invocations_by_time ON invocations (started_at_ms);
CREATE INDEX IF NOT EXISTS invocations_by_function ON invocations (function, started_at_ms);
";

enum Msg {
    Record(Box<UsageRecord>),
    Flush(mpsc::Sender<()>),
}

/// The writer side of the ledger (cheap to share).
pub struct Ledger {
    tx: SyncSender<Msg>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Ledger {
    /// Opens the ledger on the store's database in `dir` and starts its writer.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(dir.join("verge.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE_MAX);
        let writer = std::thread::Builder::new()
            .name("verge-ledger".into())
            .spawn(move || write_loop(conn, rx))
            .map_err(|e| StoreError::Corrupt(format!("could not start the ledger writer: {e}")))?;
        Ok(Self {
            tx,
            dropped: Arc::default(),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Queues a record; never blocks the request path.
    pub fn record(&self, record: UsageRecord) {
        if self.tx.try_send(Msg::Record(Box::new(record))).is_err() {
            let n = self
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::error!(dropped = n + 1, "usage ledger queue full; records dropped");
            }
        }
    }

    /// Commits everything queued so far (used at shutdown).
    pub fn flush(&self) {
        let (done, wait) = mpsc::channel();
        if self.tx.send(Msg::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.flush();
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(handle);
    }
}

fn write_loop(mut conn: Connection, rx: Receiver<Msg>) {
    let mut batch: Vec<UsageRecord> = Vec::with_capacity(BATCH_MAX);
    let mut waiters = Vec::new();
    let mut oldest: Option<Instant> = None;
    loop {
        let timeout = match oldest {
            Some(t) => FLUSH_INTERVAL.saturating_sub(t.elapsed()),
            None => Duration::from_secs(3600),
        };
        let closed = match rx.recv_timeout(timeout) {
            Ok(Msg::Record(r)) => {
                oldest.get_or_insert_with(Instant::now);
                batch.push(*r);
                false
            }
            Ok(Msg::Flush(done)) => {
                waiters.push(done);
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        let due = oldest.is_some_and(|t| t.elapsed() >= FLUSH_INTERVAL);
        if closed || due || batch.len() >= BATCH_MAX || !waiters.is_empty() {
            if !batch.is_empty() {
                if let Err(e) = commit(&mut conn, &batch) {
                    tracing::error!(error = %e, records = batch.len(), "could not commit usage records; retrying");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                batch.clear();
            }
            oldest = None;
            for w in waiters.drain(..) {
                let _ = w.send(());
            }
        }
        if closed {
            return;
        }
    }
}

fn commit(conn: &mut Connection, batch: &[UsageRecord]) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT OR IGNORE INTO invocations (id, function, version, started_at_ms, wall_us, cpu_us,
             peak_memory, memory_limit, request_bytes, response_bytes, status, outcome, cold, stdout, stderr)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        )?;
        for r in batch {
            stmt.execute(params![
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
                r.outcome,
                r.cold,
                r.stdout,
                r.stderr
            ])?;
        }
    }
    tx.commit()
}
