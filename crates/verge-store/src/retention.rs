//! Retention of invocation records: by age and by the database's size.
//!
//! Invocation records (and the guest output they carry) are the one table
//! that grows with traffic. [`Pruner::prune`] deletes the records older than
//! the retention age, then the oldest while the database holds more than the
//! size bound. Before a record goes, its usage is added to a per-minute
//! rollup (`usage_minutes`: function, version, counts and sums), so that
//! `verge usage` over windows whose raw records are gone still answers.
//! Each batch is its own short transaction on the pruner's own connection:
//! the ledger's writer and API reads wait at most one batch.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, params};

use crate::StoreError;

/// Rows rolled up and deleted per transaction.
const BATCH: i64 = 1000;

/// How long records are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Records older than this go (rolled up first).
    pub age: Duration,
    /// The database may hold at most this many bytes of live pages; beyond,
    /// the oldest records go (rolled up first).
    pub bytes: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            age: Duration::from_secs(7 * 24 * 3600),
            bytes: 1 << 30,
        }
    }
}

/// What a pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Records deleted (each rolled up first).
    pub deleted: u64,
    /// Bytes of live pages in the database after the pass.
    pub bytes_in_use: u64,
}

/// Prunes the invocation records of a store (its own connection).
pub struct Pruner {
    conn: Connection,
}

/// Bytes of live pages (page count minus free pages, times the page size):
/// what the database holds, whatever its file's high-water mark.
pub(crate) fn bytes_in_use(conn: &Connection) -> Result<u64, rusqlite::Error> {
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok(u64::try_from((pages - free).max(0) * size).unwrap_or(0))
}

impl Pruner {
    /// Opens a connection to the store's database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(dir.join("verge.db"))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(crate::ledger::SCHEMA)?;
        Ok(Self { conn })
    }

    /// One pass of `policy` at `now_ms`.
    pub fn prune(&mut self, policy: &Retention, now_ms: i64) -> Result<Pruned, StoreError> {
        let cutoff =
            now_ms.saturating_sub(i64::try_from(policy.age.as_millis()).unwrap_or(i64::MAX));
        let mut deleted = 0;
        loop {
            let n = self.batch(Some(cutoff))?;
            deleted += n;
            if n < BATCH as u64 {
                break;
            }
            std::thread::yield_now();
        }
        while bytes_in_use(&self.conn)? > policy.bytes {
            let n = self.batch(None)?;
            deleted += n;
            if n == 0 {
                break;
            }
            std::thread::yield_now();
        }
        if deleted > 0 {
            // Give the write-ahead log's space back too: it grows while
            // readers hold old snapshots. (Waits for readers up to the busy
            // timeout, holding up the ledger's writer thread, never a
            // request.)
            let _: rusqlite::Result<(i64, i64, i64)> =
                self.conn
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    });
        }
        Ok(Pruned {
            deleted,
            bytes_in_use: bytes_in_use(&self.conn)?,
        })
    }

    /// Rolls up and deletes the oldest records (of those before `cutoff`,
    /// if given), at most [`BATCH`]; returns how many.
    fn batch(&mut self, cutoff: Option<i64>) -> Result<u64, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let oldest = "SELECT rowid FROM invocations WHERE (?1 IS NULL OR started_at_ms < ?1) ORDER BY started_at_ms LIMIT ?2";
        tx.execute(
            &format!(
                "INSERT INTO usage_minutes (started_at_ms, function, version, invocations, peak_wall,
                     billed_1ms, billed_100ms, billed_1s, cpu_us, response_bytes,
                     outbound_requests, outbound_bytes, outbound_wait_us)
                 SELECT (started_at_ms / 60000) * 60000, function, version, COUNT(*),
                     SUM(CAST(peak_memory AS REAL) * wall_us),
                     SUM(CAST(memory_limit AS REAL) * (((wall_us + 999) / 1000) * 1000)),
                     SUM(CAST(memory_limit AS REAL) * (((wall_us + 99999) / 100000) * 100000)),
                     SUM(CAST(memory_limit AS REAL) * (((wall_us + 999999) / 1000000) * 1000000)),
                     SUM(cpu_us), SUM(response_bytes), SUM(outbound_requests),
                     SUM(outbound_sent + outbound_received), SUM(outbound_wait_us)
                 FROM invocations WHERE rowid IN ({oldest})
                 GROUP BY 1, 2, 3
                 ON CONFLICT (started_at_ms, function, version) DO UPDATE SET
                     invocations = invocations + excluded.invocations,
                     peak_wall = peak_wall + excluded.peak_wall,
                     billed_1ms = billed_1ms + excluded.billed_1ms,
                     billed_100ms = billed_100ms + excluded.billed_100ms,
                     billed_1s = billed_1s + excluded.billed_1s,
                     cpu_us = cpu_us + excluded.cpu_us,
                     response_bytes = response_bytes + excluded.response_bytes,
                     outbound_requests = outbound_requests + excluded.outbound_requests,
                     outbound_bytes = outbound_bytes + excluded.outbound_bytes,
                     outbound_wait_us = outbound_wait_us + excluded.outbound_wait_us"
            ),
            params![cutoff, BATCH],
        )?;
        let n = tx.execute(
            &format!("DELETE FROM invocations WHERE rowid IN ({oldest})"),
            params![cutoff, BATCH],
        )?;
        tx.commit()?;
        Ok(n as u64)
    }
}
