//! Verge's replicated key-value store: every replica a master. Each key is a
//! CRDT ([`crdt::Entry`]): a last-writer-wins register ordered by (hybrid
//! logical clock, node id), or a PN-counter. Writes are local SQLite
//! transactions; replicas exchange entry states (deltas) in any order, any
//! number of times, and converge (strong eventual consistency).
//!
//! The outbox: every entry row carries the local sequence number of its last
//! change; what a peer has not seen is the rows above the peer's cursor, one
//! row per key however often it changed, so an offline backlog is bounded by
//! the keys touched. A digest per key range finds what a transport lost.
//!
//! No wasm and no HTTP in here: the host exposes it to guests, the node
//! carries deltas between replicas.

pub mod crdt;
mod replication;
pub mod sync;

use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crdt::{Clock, Entry, Kind, Stamp};
pub use replication::{CollectReport, Rebootstrapped, ReplicaInfo, StaleWrite, Stats};

/// A failure of the store, or a refused operation.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("key-value database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("stored key-value data is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "key {key:?} in bucket {bucket:?} holds a {is}; it cannot be used as a {wanted} (a key's kind is fixed by its first write)"
    )]
    WrongKind {
        bucket: String,
        key: String,
        is: &'static str,
        wanted: &'static str,
    },
    #[error("invalid bucket name {0:?}: use 1 to 63 characters from a-z, 0-9, '-' and '_'")]
    BucketName(String),
    #[error(
        "replica {node:016x} is not admitted: {reason}; it must say hello first (and re-bootstrap if told to)"
    )]
    NotAdmitted { node: u64, reason: String },
    #[error(
        "the value for key {key:?} is {size} bytes, over the {} MiB limit of a key-value entry; keep large objects elsewhere and store a reference",
        MAX_VALUE >> 20
    )]
    ValueTooLarge { key: String, size: usize },
    #[error(
        "incrementing counter {key:?} in bucket {bucket:?} by {delta} would take it past the bound of a 64-bit signed integer ({} to {}); nothing was changed",
        i64::MIN,
        i64::MAX
    )]
    CounterOverflow {
        bucket: String,
        key: String,
        delta: i64,
    },
    #[error(
        "the operating system's random source is unavailable ({0}); a replica id must be random: check /dev/urandom and the getrandom system call"
    )]
    Random(String),
}

/// The largest value a key may hold.
pub const MAX_VALUE: usize = 8 << 20;

/// Value bytes after which a batch of deltas is cut (a batch always carries
/// at least one delta).
pub const BATCH_BYTES: usize = 4 << 20;

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Register => "value (set/get)",
        Kind::Counter => "counter (increment)",
    }
}

/// Checks a bucket name.
pub fn validate_bucket(name: &str) -> Result<(), KvError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(KvError::BucketName(name.to_string()))
    }
}

/// The default tenant: its buckets are stored under their plain names.
pub const DEFAULT_TENANT: &str = "default";

/// The name a tenant's bucket is stored (and replicated) under: the plain
/// name for the default tenant, `tenant:bucket` for the others.
pub fn qualify(tenant: &str, bucket: &str) -> String {
    if tenant == DEFAULT_TENANT {
        bucket.to_string()
    } else {
        format!("{tenant}:{bucket}")
    }
}

/// Splits a stored bucket name into (tenant, bucket).
pub fn split(stored: &str) -> (&str, &str) {
    match stored.split_once(':') {
        Some((t, b)) => (t, b),
        None => (DEFAULT_TENANT, stored),
    }
}

/// Checks a stored bucket name (`bucket` or `tenant:bucket`).
pub fn validate_stored(name: &str) -> Result<(), KvError> {
    let (tenant, bucket) = split(name);
    let tenant_ok = !tenant.is_empty()
        && tenant.len() <= 63
        && tenant
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !tenant_ok {
        return Err(KvError::BucketName(name.to_string()));
    }
    validate_bucket(bucket).map_err(|_| KvError::BucketName(name.to_string()))
}

/// What a key reads as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum Value {
    Bytes(Vec<u8>),
    Count(i64),
}

/// One key's state as replicas exchange it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub bucket: String,
    pub key: String,
    pub entry: Entry,
}

/// One operation of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Set(String, Vec<u8>),
    Delete(String),
    Increment(String, i64),
}

/// Random bytes from the OS (for a new replica id).
/// A new replica id: 63 random bits from the operating system's random
/// source, never 0 (which marks local writes). No fallback: two replicas
/// with ids made from the time could collide, and a collision merges two
/// replicas' counters into one.
pub(crate) fn random_node() -> Result<u64, KvError> {
    loop {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).map_err(|e| KvError::Random(e.to_string()))?;
        let n = u64::from_le_bytes(b) >> 1;
        if n != 0 {
            return Ok(n);
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `entries`: one row per key. `seq` is the local sequence number of the
/// row's last change (the outbox order), `src` the replica whose delta made
/// that change when the merged state is exactly that delta (0: a local
/// write), so that it is not echoed back; `wall` is the entry's stamp time
/// and `tomb` marks a deleted register (what tombstone collection removes).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS entries (
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    entry TEXT NOT NULL,
    seq INTEGER NOT NULL,
    src INTEGER NOT NULL DEFAULT 0,
    wall INTEGER NOT NULL DEFAULT 0,
    tomb INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket, key)
);
CREATE INDEX IF NOT EXISTS entries_seq ON entries (seq);
CREATE INDEX IF NOT EXISTS entries_tombstones ON entries (seq) WHERE tomb = 1;
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS replicas (
    node INTEGER PRIMARY KEY,
    name TEXT,
    acked_seq INTEGER NOT NULL DEFAULT 0,
    pulled_seq INTEGER NOT NULL DEFAULT 0,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    expired INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS stale (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    entry TEXT NOT NULL,
    reason TEXT NOT NULL,
    at INTEGER NOT NULL
);
";

/// Number of key ranges a digest has.
pub const RANGES: usize = 16;

fn range_of(key: &str) -> usize {
    (Sha256::digest(key.as_bytes())[0] >> 4) as usize
}

/// Told, after each commit, which (bucket, key) pairs changed, and the hop
/// count the events about the change carry ([`Kv::batch_caused`]; 0 for a
/// write of the API or of replication).
pub type Observer = Box<dyn Fn(&[(String, String)], u32) + Send + Sync>;

/// The replica (see the crate docs).
pub struct Kv {
    conn: Mutex<Connection>,
    /// A second connection for plain reads (get, keys, buckets): with WAL
    /// they see every committed write and never wait behind a write's fsync.
    reader: Mutex<Connection>,
    clock: Mutex<Clock>,
    observer: std::sync::OnceLock<Observer>,
}

impl Kv {
    /// Opens (creating if needed) `kv.db` in `dir`, with the replica id it
    /// was created with (a random 64-bit id on first open).
    pub fn open_replica(dir: &Path) -> Result<Self, KvError> {
        let conn = Self::connect(dir)?;
        let stored: Option<i64> = conn
            .query_row("SELECT value FROM meta WHERE name = 'node'", [], |r| {
                r.get(0)
            })
            .optional()?;
        let node = match stored {
            Some(n) => n as u64,
            None => {
                let n = random_node()?;
                conn.execute(
                    "INSERT INTO meta (name, value) VALUES ('node', ?1)",
                    params![n as i64],
                )?;
                n
            }
        };
        drop(conn);
        Self::open(dir, node)
    }

    fn connect(dir: &Path) -> Result<Connection, KvError> {
        let conn = Connection::open(dir.join("kv.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&conn)?;
        conn.execute_batch(SCHEMA)?;
        Ok(conn)
    }

    /// Opens (creating if needed) `kv.db` in `dir` as replica `node`.
    pub fn open(dir: &Path, node: u64) -> Result<Self, KvError> {
        let conn = Self::connect(dir)?;
        let mut clock = Clock::new(node);
        // Never issue a stamp below one already stored.
        for stamp in latest_stamps(&conn)? {
            clock.observe(stamp, now_ms());
        }
        let reader = Connection::open(dir.join("kv.db"))?;
        reader.busy_timeout(std::time::Duration::from_secs(5))?;
        reader.pragma_update(None, "query_only", "ON")?;
        Ok(Self {
            conn: Mutex::new(conn),
            reader: Mutex::new(reader),
            clock: Mutex::new(clock),
            observer: std::sync::OnceLock::new(),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reader(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn tick(&self) -> Stamp {
        self.clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tick(now_ms())
    }

    /// Sets the function told about changed keys after each commit (once).
    pub fn set_observer(&self, observer: Observer) {
        let _ = self.observer.set(observer);
    }

    fn notify(&self, changed: &[(String, String)], hops: u32) {
        if let Some(o) = self.observer.get()
            && !changed.is_empty()
        {
            o(changed, hops);
        }
    }

    /// This replica's node id.
    pub fn node(&self) -> u64 {
        self.clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .node()
    }

    /// Remote stamps that were ahead of the local clock by more than the bound.
    pub fn skewed(&self) -> u64 {
        self.clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .skewed
    }

    /// The replicated state of a key, tombstones included.
    pub fn entry(&self, bucket: &str, key: &str) -> Result<Option<Entry>, KvError> {
        let conn = self.reader();
        entry_of(&conn, bucket, key)
    }

    /// Reads a key.
    pub fn get(&self, bucket: &str, key: &str) -> Result<Option<Value>, KvError> {
        let conn = self.reader();
        Ok(entry_of(&conn, bucket, key)?.and_then(|e| read(&e)))
    }

    /// Writes a value.
    pub fn set(&self, bucket: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.batch(bucket, vec![Op::Set(key.to_string(), value.to_vec())])
            .map(drop)
    }

    /// Deletes a key (a tombstone, so that the delete replicates).
    pub fn delete(&self, bucket: &str, key: &str) -> Result<(), KvError> {
        self.batch(bucket, vec![Op::Delete(key.to_string())])
            .map(drop)
    }

    /// Adds `delta` to a counter; returns its new value.
    pub fn increment(&self, bucket: &str, key: &str, delta: i64) -> Result<i64, KvError> {
        let out = self.batch(bucket, vec![Op::Increment(key.to_string(), delta)])?;
        Ok(out.first().copied().flatten().unwrap_or(0))
    }

    /// Applies operations in one transaction (all or none); returns, per
    /// operation, a counter's new value.
    pub fn batch(&self, bucket: &str, ops: Vec<Op>) -> Result<Vec<Option<i64>>, KvError> {
        self.batch_caused(bucket, ops, 0)
    }

    /// [`Kv::batch`] on behalf of something in an event chain (a guest's
    /// invocation): the observer is told `hops`, the count the events the
    /// change causes are to carry.
    pub fn batch_caused(
        &self,
        bucket: &str,
        ops: Vec<Op>,
        hops: u32,
    ) -> Result<Vec<Option<i64>>, KvError> {
        validate_stored(bucket)?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut seq = next_seq(&tx)?;
        let mut out = Vec::with_capacity(ops.len());
        let mut changed = Vec::with_capacity(ops.len());
        for op in ops {
            let stamp = self.tick();
            let node = stamp.node;
            let (key, entry, result) = match op {
                Op::Set(key, value) => {
                    if value.len() > MAX_VALUE {
                        return Err(KvError::ValueTooLarge {
                            key,
                            size: value.len(),
                        });
                    }
                    let entry = match entry_of(&tx, bucket, &key)? {
                        None => Entry::register(Some(value), stamp),
                        Some(mut e) => {
                            expect_kind(&e, Kind::Register, bucket, &key)?;
                            e.set(Some(value), stamp);
                            e
                        }
                    };
                    (key, entry, None)
                }
                Op::Delete(key) => match entry_of(&tx, bucket, &key)? {
                    None => (key, Entry::register(None, stamp), None),
                    Some(mut e) => {
                        match e.kind {
                            Kind::Register => e.set(None, stamp),
                            Kind::Counter => e.reset(stamp),
                        }
                        (key, e, None)
                    }
                },
                Op::Increment(key, delta) => {
                    let mut e = match entry_of(&tx, bucket, &key)? {
                        None => Entry::counter(stamp),
                        Some(e) => {
                            expect_kind(&e, Kind::Counter, bucket, &key)?;
                            e
                        }
                    };
                    e.add(node, delta, stamp).map_err(|crdt::Overflow| {
                        KvError::CounterOverflow {
                            bucket: bucket.to_string(),
                            key: key.clone(),
                            delta,
                        }
                    })?;
                    let v = e.count();
                    (key, e, Some(v))
                }
            };
            seq += 1;
            put_entry(&tx, bucket, &key, &entry, seq, 0)?;
            out.push(result);
            changed.push((bucket.to_string(), key));
        }
        set_seq(&tx, seq)?;
        tx.commit()?;
        drop(conn);
        self.notify(&changed, hops);
        Ok(out)
    }

    /// Present keys of a bucket, in order, starting after `after`.
    pub fn keys(
        &self,
        bucket: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, KvError> {
        let conn = self.reader();
        let mut stmt = conn.prepare(
            "SELECT key, entry FROM entries WHERE bucket = ?1 AND key > ?2 AND substr(key, 1, length(?3)) = ?3 ORDER BY key",
        )?;
        let rows = stmt.query_map(params![bucket, after.unwrap_or(""), prefix], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (key, json) = row?;
            if parse(&json)?.is_present() {
                out.push(key);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Buckets with at least one entry (tombstones included).
    pub fn buckets(&self) -> Result<Vec<(String, u64)>, KvError> {
        let conn = self.reader();
        let mut stmt =
            conn.prepare("SELECT bucket, COUNT(*) FROM entries GROUP BY bucket ORDER BY bucket")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Merges deltas from another replica (any order, any number of times).
    /// Returns the keys whose state changed.
    pub fn apply(&self, deltas: &[Delta]) -> Result<Vec<(String, String)>, KvError> {
        self.apply_from(0, deltas)
    }

    /// Merges deltas received from replica `src`: a row whose merged state is
    /// exactly `src`'s delta is marked as coming from it, so that it is not
    /// sent back to it.
    pub fn apply_from(&self, src: u64, deltas: &[Delta]) -> Result<Vec<(String, String)>, KvError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut seq = next_seq(&tx)?;
        let mut changed = Vec::new();
        {
            let mut clock = self.clock.lock().unwrap_or_else(PoisonError::into_inner);
            let now = now_ms();
            for d in deltas {
                validate_stored(&d.bucket)?;
                clock.observe(d.entry.stamp, now);
                let merged = match entry_of(&tx, &d.bucket, &d.key)? {
                    None => d.entry.clone(),
                    Some(mut e) => {
                        let before = e.clone();
                        e.join(&d.entry);
                        if e == before {
                            continue;
                        }
                        e
                    }
                };
                seq += 1;
                let from = if merged == d.entry { src } else { 0 };
                put_entry(&tx, &d.bucket, &d.key, &merged, seq, from)?;
                changed.push((d.bucket.clone(), d.key.clone()));
            }
        }
        set_seq(&tx, seq)?;
        tx.commit()?;
        drop(conn);
        self.notify(&changed, 0);
        Ok(changed)
    }

    /// A hash per key range of a bucket's entries: ranges that differ between
    /// two replicas hold what a transport lost.
    pub fn digest(&self, bucket: &str) -> Result<[String; RANGES], KvError> {
        let conn = self.conn();
        // Deleted registers are left out: a replica that has collected a
        // tombstone and one that still holds it read the same, and must not
        // differ. (A tombstone one side lacks still travels in repair, because
        // the other side's value makes the ranges differ.)
        let mut stmt = conn.prepare(
            "SELECT key, entry FROM entries WHERE bucket = ?1 AND tomb = 0 ORDER BY key",
        )?;
        let rows = stmt.query_map(params![bucket], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut hashers: Vec<Sha256> = (0..RANGES).map(|_| Sha256::new()).collect();
        for row in rows {
            let (key, json) = row?;
            let h = &mut hashers[range_of(&key)];
            h.update(key.as_bytes());
            h.update([0]);
            // The canonical form: the parsed entry re-serialized.
            let canonical = serde_json::to_string(&parse(&json)?)
                .map_err(|e| KvError::Corrupt(e.to_string()))?;
            h.update(canonical.as_bytes());
            h.update([0]);
        }
        Ok(std::array::from_fn(|i| {
            hex::encode(hashers[i].clone().finalize())
        }))
    }

    /// Every entry of a bucket in the given key ranges (for repair).
    pub fn entries_in_ranges(&self, bucket: &str, ranges: &[usize]) -> Result<Vec<Delta>, KvError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT key, entry FROM entries WHERE bucket = ?1")?;
        let rows = stmt.query_map(params![bucket], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (key, json) = row?;
            if ranges.contains(&range_of(&key)) {
                out.push(Delta {
                    bucket: bucket.to_string(),
                    key,
                    entry: parse(&json)?,
                });
            }
        }
        Ok(out)
    }

    /// Metadata bytes of a key beside its value (stamps, counters), as stored.
    pub fn metadata_bytes(&self, bucket: &str, key: &str) -> Result<Option<usize>, KvError> {
        let conn = self.conn();
        let json: Option<String> = conn
            .query_row(
                "SELECT entry FROM entries WHERE bucket = ?1 AND key = ?2",
                params![bucket, key],
                |r| r.get(0),
            )
            .optional()?;
        Ok(json.map(|j| {
            let value = parse(&j)
                .ok()
                .and_then(|e| e.value)
                .map_or(0, |v| v.len() * 2 + 2);
            j.len().saturating_sub(value)
        }))
    }
}

/// What an entry reads as (None: deleted).
pub fn read_entry(e: &Entry) -> Option<Value> {
    read(e)
}

fn read(e: &Entry) -> Option<Value> {
    if !e.is_present() {
        return None;
    }
    Some(match e.kind {
        Kind::Register => Value::Bytes(e.value.clone().unwrap_or_default()),
        Kind::Counter => Value::Count(e.count()),
    })
}

fn expect_kind(e: &Entry, want: Kind, bucket: &str, key: &str) -> Result<(), KvError> {
    if e.kind == want {
        Ok(())
    } else {
        Err(KvError::WrongKind {
            bucket: bucket.to_string(),
            key: key.to_string(),
            is: kind_name(e.kind),
            wanted: kind_name(want),
        })
    }
}

fn parse(json: &str) -> Result<Entry, KvError> {
    serde_json::from_str(json).map_err(|e| KvError::Corrupt(format!("entry: {e}")))
}

fn entry_of(conn: &Connection, bucket: &str, key: &str) -> Result<Option<Entry>, KvError> {
    let json: Option<String> = conn
        .query_row(
            "SELECT entry FROM entries WHERE bucket = ?1 AND key = ?2",
            params![bucket, key],
            |r| r.get(0),
        )
        .optional()?;
    json.as_deref().map(parse).transpose()
}

fn put_entry(
    conn: &Connection,
    bucket: &str,
    key: &str,
    e: &Entry,
    seq: u64,
    src: u64,
) -> Result<(), KvError> {
    let json = serde_json::to_string(e).map_err(|e| KvError::Corrupt(e.to_string()))?;
    conn.execute(
        "INSERT INTO entries (bucket, key, entry, seq, src, wall, tomb) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT(bucket, key) DO UPDATE SET entry = excluded.entry, seq = excluded.seq,
             src = excluded.src, wall = excluded.wall, tomb = excluded.tomb",
        params![
            bucket,
            key,
            json,
            seq,
            src as i64,
            e.stamp.wall_ms as i64,
            is_tombstone(e)
        ],
    )?;
    Ok(())
}

/// A deleted register: what tombstone collection may remove. (A deleted
/// counter keeps its per-node sums: later increments continue from them.)
fn is_tombstone(e: &Entry) -> bool {
    e.kind == Kind::Register && e.value.is_none()
}

/// Brings a database from before replication bookkeeping up to date:
/// entries gain `src`, `wall` and `tomb`; the old per-URL cursors go (peers
/// are resent what they may lack, which merging makes harmless).
fn migrate(conn: &Connection) -> Result<(), KvError> {
    let has_entries: i64 = conn.query_row(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'entries'",
        [],
        |r| r.get(0),
    )?;
    if has_entries == 0 || conn.prepare("SELECT src FROM entries LIMIT 0").is_ok() {
        return Ok(());
    }
    let tx = conn.unchecked_transaction()?;
    tx.execute_batch(
        "ALTER TABLE entries ADD COLUMN src INTEGER NOT NULL DEFAULT 0;
         ALTER TABLE entries ADD COLUMN wall INTEGER NOT NULL DEFAULT 0;
         ALTER TABLE entries ADD COLUMN tomb INTEGER NOT NULL DEFAULT 0;
         DROP TABLE IF EXISTS peers;",
    )?;
    let rows: Vec<(String, String, String)> = {
        let mut stmt = tx.prepare("SELECT bucket, key, entry FROM entries")?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?
    };
    for (bucket, key, json) in rows {
        let e = parse(&json)?;
        tx.execute(
            "UPDATE entries SET wall = ?1, tomb = ?2 WHERE bucket = ?3 AND key = ?4",
            params![e.stamp.wall_ms as i64, is_tombstone(&e), bucket, key],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// The stamps of the entries with the latest wall time (the clock starts
/// above them).
fn latest_stamps(conn: &Connection) -> Result<Vec<Stamp>, KvError> {
    let mut stmt =
        conn.prepare("SELECT entry FROM entries WHERE wall = (SELECT MAX(wall) FROM entries)")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for row in rows {
        out.push(parse(&row?)?.stamp);
    }
    Ok(out)
}

fn next_seq(conn: &Connection) -> Result<u64, KvError> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE name = 'seq'", [], |r| {
            r.get(0)
        })
        .optional()?
        .unwrap_or(0))
}

fn set_seq(conn: &Connection, seq: u64) -> Result<(), KvError> {
    conn.execute(
        "INSERT INTO meta (name, value) VALUES ('seq', ?1) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        params![seq],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests;
