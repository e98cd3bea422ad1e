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
const MAX_BYTES: u64 = 512 << 20;

#[derive(Debug)]
pub(crate) struct FunctionCache {
    conn: Mutex<Connection>,
    hits: AtomicU64,
    /// Bytes of values stored (an upper bound: a replaced key counts
    /// twice until the next prune recounts), so that a deploy does not scan
    /// the table to learn it is under the bound.
    bytes: AtomicU64,
    /// The bound ([`MAX_BYTES`]; tests set less).
    max_bytes: u64,
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
        // Reading the table proves the file is a database, not just a name.
        let bytes = stored_bytes(&conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
            hits: AtomicU64::new(0),
            bytes: AtomicU64::new(bytes),
            max_bytes: MAX_BYTES,
        })
    }

    /// Functions found in the cache since it was opened.
    pub(crate) fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Drops the oldest entries while the cache holds more than its bound.
    pub(crate) fn prune(&self) {
        if self.bytes.load(Ordering::Relaxed) <= self.max_bytes {
            return;
        }
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let result = (|| -> rusqlite::Result<()> {
            let exact = stored_bytes(&conn)?;
            self.bytes.store(exact, Ordering::Relaxed);
            if exact <= self.max_bytes {
                return Ok(());
            }
            // Rows are appended in insertion order: drop a quarter's worth.
            let n: i64 = conn.query_row("SELECT count(*) FROM functions", [], |r| r.get(0))?;
            conn.execute(
                "DELETE FROM functions WHERE rowid IN
                   (SELECT rowid FROM functions ORDER BY rowid LIMIT ?1)",
                params![n / 4 + 1],
            )?;
            self.bytes.store(stored_bytes(&conn)?, Ordering::Relaxed);
            Ok(())
        })();
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not prune the function cache");
        }
    }
}

fn stored_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let n: i64 = conn.query_row(
        "SELECT coalesce(sum(length(value)), 0) FROM functions",
        [],
        |r| r.get(0),
    )?;
    Ok(n.max(0) as u64)
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
        let len = value.len() as u64;
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let ok = conn
            .execute(
                "INSERT OR REPLACE INTO functions (key, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .is_ok();
        if ok {
            self.bytes.fetch_add(len, Ordering::Relaxed);
        }
        ok
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

    #[test]
    fn prune_keeps_the_cache_under_its_bound_and_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = FunctionCache::open(&dir.path().join("functions.db")).unwrap();
        cache.max_bytes = 1000;
        for i in 0..8u8 {
            assert!(cache.insert(&[i], vec![i; 100]));
        }
        cache.prune();
        assert!(cache.get(&[0]).is_some(), "800 bytes are within the bound");
        for i in 8..16u8 {
            assert!(cache.insert(&[i], vec![i; 100]));
        }
        cache.prune();
        assert!(cache.get(&[0]).is_none(), "the oldest went");
        assert!(cache.get(&[15]).is_some(), "the newest stayed");
        let conn = cache.conn.lock().unwrap();
        assert!(stored_bytes(&conn).unwrap() < 1600);
    }
}
