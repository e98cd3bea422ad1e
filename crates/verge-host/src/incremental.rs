//! Cranelift's incremental cache, kept in SQLite: compiled functions by the
//! hash of their Cranelift IR, so optimized code for a component that shares
//! functions with one compiled before (another Python or JavaScript
//! application on the same runtime, a new version of the same code) reuses
//! them. It is a cache: writes are not synced, and a file that cannot be
//! opened is replaced by an empty one.

use std::borrow::Cow;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use rusqlite::{Connection, OptionalExtension, params};

/// Bytes of compiled functions kept; the oldest go first beyond it.
const MAX_BYTES: i64 = 512 << 20;

#[derive(Debug)]
pub(crate) struct FunctionCache {
    conn: Mutex<Connection>,
    hits: AtomicU64,
}

impl FunctionCache {
    /// Opens (or creates, or replaces an unreadable) `path`.
    pub(crate) fn open(path: &Path) -> Option<Self> {
        match Self::try_open(path) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "function cache unusable; starting an empty one");
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = path.as_os_str().to_owned();
                    p.push(suffix);
                    let _ = std::fs::remove_file(p);
                }
                Self::try_open(path)
                    .map_err(|e| tracing::warn!(error = %e, "optimized code compiles without a function cache"))
                    .ok()
            }
        }
    }

    fn try_open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "wal")?;
        conn.pragma_update(None, "synchronous", "off")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS functions (
                 key BLOB PRIMARY KEY,
                 value BLOB NOT NULL
             );",
        )?;
        // Reading a row proves the file is a database, not just a name.
        conn.query_row("SELECT count(*) FROM functions", [], |r| r.get::<_, i64>(0))?;
        Ok(Self {
            conn: Mutex::new(conn),
            hits: AtomicU64::new(0),
        })
    }

    /// Functions found in the cache since it was opened.
    pub(crate) fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Drops the oldest entries while the cache holds more than its bound.
    pub(crate) fn prune(&self) {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let result = (|| -> rusqlite::Result<()> {
            let total: i64 = conn.query_row(
                "SELECT coalesce(sum(length(value)), 0) FROM functions",
                [],
                |r| r.get(0),
            )?;
            if total > MAX_BYTES {
                // Rows are appended in insertion order: drop a quarter's worth.
                let n: i64 = conn.query_row("SELECT count(*) FROM functions", [], |r| r.get(0))?;
                conn.execute(
                    "DELETE FROM functions WHERE rowid IN
                       (SELECT rowid FROM functions ORDER BY rowid LIMIT ?1)",
                    params![n / 4 + 1],
                )?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not prune the function cache");
        }
    }
}

impl wasmtime::CacheStore for FunctionCache {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        conn.query_row(
            "SELECT value FROM functions WHERE key = ?1",
            params![key],
            |r| r.get::<_, Vec<u8>>(0),
        )
        .optional()
        .ok()
        .flatten()
        .map(|v| {
            self.hits.fetch_add(1, Ordering::Relaxed);
            Cow::Owned(v)
        })
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        conn.execute(
            "INSERT OR REPLACE INTO functions (key, value) VALUES (?1, ?2)",
            params![key, value],
        )
        .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::CacheStore;

    #[test]
    fn stores_survive_reopen_and_garbage_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("functions.db");
        let cache = FunctionCache::open(&path).unwrap();
        assert!(cache.get(b"k").is_none());
        assert!(cache.insert(b"k", b"v".to_vec()));
        drop(cache);
        let cache = FunctionCache::open(&path).unwrap();
        assert_eq!(cache.get(b"k").as_deref(), Some(&b"v"[..]));
        drop(cache);
        std::fs::write(&path, b"not a database").unwrap();
        let cache = FunctionCache::open(&path).unwrap();
        assert!(cache.get(b"k").is_none());
        assert!(cache.insert(b"k", b"w".to_vec()));
    }
}
