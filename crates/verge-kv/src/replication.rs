//! Replica bookkeeping: the replicas this one exchanges with and what each
//! has acknowledged, tombstone collection (once every known replica has a
//! tombstone, or a replica is expired after the grace bound), and
//! re-bootstrap from a peer's snapshot with this replica's unsent writes
//! set aside as stale.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::{
    Clock, Delta, Entry, Kv, KvError, Value, latest_stamps, next_seq, now_ms, parse, put_entry,
    random_node, read, set_seq,
};

/// A replica this one exchanges deltas with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub node: u64,
    /// How this replica reaches it (its URL), when this replica is the client.
    pub name: Option<String>,
    /// Everything of ours up to this local sequence number, it has.
    pub acked_seq: u64,
    /// Everything of its up to this sequence number (its numbering), we have.
    pub pulled_seq: u64,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    /// Not heard from within the grace bound: it must re-bootstrap.
    pub expired: bool,
}

/// What one tombstone collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectReport {
    /// Tombstones removed.
    pub collected: u64,
    /// Replicas expired by this run.
    pub expired: Vec<u64>,
}

/// A write set aside by a re-bootstrap instead of being applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleWrite {
    pub id: u64,
    pub bucket: String,
    pub key: String,
    pub entry: Entry,
    pub reason: String,
    pub at_ms: u64,
}

/// What a re-bootstrap did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebootstrapped {
    pub old_node: u64,
    pub new_node: u64,
    /// Entries taken from the peer's snapshot.
    pub entries: u64,
    /// Local writes the peer never received, set aside (see [`Kv::stale`]).
    pub stale: u64,
}

/// The replica's state, for status pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub node: u64,
    pub seq: u64,
    pub entries: u64,
    pub tombstones: u64,
    /// The latest stamp time (ms) of any tombstone collected here.
    pub horizon_ms: u64,
    pub collected_total: u64,
    pub stale_total: u64,
    /// Remote stamps ahead of the local clock by more than the skew bound,
    /// since this process started.
    pub skewed: u64,
    pub max_skew_ms: u64,
    pub replicas: Vec<ReplicaInfo>,
}

pub(crate) fn meta(conn: &Connection, name: &str) -> Result<u64, KvError> {
    Ok(conn
        .query_row(
            "SELECT value FROM meta WHERE name = ?1",
            params![name],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .unwrap_or(0) as u64)
}

fn set_meta(conn: &Connection, name: &str, value: u64) -> Result<(), KvError> {
    conn.execute(
        "INSERT INTO meta (name, value) VALUES (?1, ?2)
         ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        params![name, value as i64],
    )?;
    Ok(())
}

fn replica_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReplicaInfo> {
    Ok(ReplicaInfo {
        node: r.get::<_, i64>(0)? as u64,
        name: r.get(1)?,
        acked_seq: r.get::<_, i64>(2)? as u64,
        pulled_seq: r.get::<_, i64>(3)? as u64,
        first_seen_ms: r.get::<_, i64>(4)? as u64,
        last_seen_ms: r.get::<_, i64>(5)? as u64,
        expired: r.get(6)?,
    })
}

const REPLICA_COLUMNS: &str =
    "node, name, acked_seq, pulled_seq, first_seen, last_seen, expired FROM replicas";

impl Kv {
    /// Every replica this one has exchanged with.
    pub fn replicas(&self) -> Result<Vec<ReplicaInfo>, KvError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {REPLICA_COLUMNS} ORDER BY node"))?;
        let rows = stmt.query_map([], replica_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One replica's bookkeeping.
    pub fn replica(&self, node: u64) -> Result<Option<ReplicaInfo>, KvError> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                &format!("SELECT {REPLICA_COLUMNS} WHERE node = ?1"),
                params![node as i64],
                replica_row,
            )
            .optional()?)
    }

    /// The replica this one reaches as `name` (a peer URL), if it has met it.
    pub fn replica_named(&self, name: &str) -> Result<Option<ReplicaInfo>, KvError> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                &format!(
                    "SELECT {REPLICA_COLUMNS} WHERE name = ?1 ORDER BY last_seen DESC LIMIT 1"
                ),
                params![name],
                replica_row,
            )
            .optional()?)
    }

    /// Records that `node` was heard from now (creating its row). With a
    /// `name` (the peer's address), another replica reached there before is
    /// expired: the peer was replaced (a new kv.db), and the old replica
    /// must not hold back tombstone collection until the grace bound; should
    /// it call again, it re-bootstraps like any expired replica.
    pub fn register_replica(&self, node: u64, name: Option<&str>) -> Result<(), KvError> {
        let now = now_ms() as i64;
        let conn = self.conn();
        conn.execute(
            "INSERT INTO replicas (node, name, first_seen, last_seen) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT(node) DO UPDATE SET last_seen = excluded.last_seen,
                 name = COALESCE(excluded.name, replicas.name)",
            params![node as i64, name, now],
        )?;
        if let Some(name) = name {
            conn.execute(
                "UPDATE replicas SET expired = 1 WHERE name = ?1 AND node != ?2 AND expired = 0",
                params![name, node as i64],
            )?;
        }
        Ok(())
    }

    /// Entries `peer` may lack: rows above `since` (our numbering), one per
    /// key, leaving out rows whose state came from `peer` itself. Returns the
    /// deltas and the sequence number they cover up to (also past rows that
    /// were left out).
    pub fn changes_since(
        &self,
        peer: u64,
        since: u64,
        limit: usize,
    ) -> Result<(Vec<Delta>, u64), KvError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT bucket, key, entry, seq, src FROM entries WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![since as i64, limit.max(1) as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)? as u64,
                r.get::<_, i64>(4)? as u64,
            ))
        })?;
        let mut out = Vec::new();
        let mut upto = since;
        let mut bytes = 0;
        for row in rows {
            let (bucket, key, json, seq, src) = row?;
            if src == peer && peer != 0 {
                upto = upto.max(seq);
                continue;
            }
            // Cut by size too: the rest goes in the next batch.
            if !out.is_empty() && bytes + json.len() > crate::BATCH_BYTES {
                break;
            }
            bytes += json.len();
            upto = upto.max(seq);
            out.push(Delta {
                bucket,
                key,
                entry: parse(&json)?,
            });
        }
        Ok((out, upto))
    }

    /// Entries `peer` has not acknowledged (see [`Kv::changes_since`]).
    pub fn pending(&self, peer: u64, limit: usize) -> Result<(Vec<Delta>, u64), KvError> {
        let acked = self.replica(peer)?.map_or(0, |r| r.acked_seq);
        self.changes_since(peer, acked, limit)
    }

    /// Records that `peer` has everything of ours up to `seq`.
    pub fn ack(&self, peer: u64, seq: u64) -> Result<(), KvError> {
        let now = now_ms() as i64;
        self.conn().execute(
            "INSERT INTO replicas (node, acked_seq, first_seen, last_seen) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT(node) DO UPDATE SET acked_seq = MAX(acked_seq, excluded.acked_seq),
                 last_seen = excluded.last_seen",
            params![peer as i64, seq as i64, now],
        )?;
        Ok(())
    }

    /// Records that we have everything of `peer`'s up to its `seq`.
    pub fn set_pulled(&self, peer: u64, seq: u64) -> Result<(), KvError> {
        self.conn().execute(
            "UPDATE replicas SET pulled_seq = MAX(pulled_seq, ?2) WHERE node = ?1",
            params![peer as i64, seq as i64],
        )?;
        Ok(())
    }

    /// The oldest stamp time (ms) of what `peer` has not acknowledged; with
    /// no peer (not met yet), of everything held.
    pub fn oldest_pending(&self, peer: Option<u64>) -> Result<Option<u64>, KvError> {
        let conn = self.conn();
        let v: Option<i64> = match peer {
            Some(p) => {
                let acked: i64 = conn
                    .query_row(
                        "SELECT acked_seq FROM replicas WHERE node = ?1",
                        params![p as i64],
                        |r| r.get(0),
                    )
                    .optional()?
                    .unwrap_or(0);
                conn.query_row(
                    "SELECT MIN(wall) FROM entries WHERE seq > ?1 AND src != ?2",
                    params![acked, p as i64],
                    |r| r.get(0),
                )?
            }
            None => conn.query_row("SELECT MIN(wall) FROM entries", [], |r| r.get(0))?,
        };
        Ok(v.map(|v| v as u64))
    }

    /// The latest stamp time of any tombstone collected here: a replica new
    /// to this one that holds older writes could bring back a deleted key.
    pub fn horizon(&self) -> Result<u64, KvError> {
        meta(&self.conn(), "horizon")
    }

    /// Collects tombstones and expires replicas (run it periodically).
    ///
    /// A replica not heard from for `grace_ms` is expired, and so is one
    /// known for longer than that which still lacks a tombstone older than
    /// that: expired replicas no longer hold collection back and must
    /// re-bootstrap. A deleted register's tombstone is then removed once
    /// every other known replica has it (acknowledged it, or sent it); with
    /// no replica known, once it is older than `grace_ms`.
    pub fn collect(&self, grace_ms: u64) -> Result<CollectReport, KvError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_ms();
        let cut = now.saturating_sub(grace_ms) as i64;
        let mut report = CollectReport::default();
        let oldest_tomb_seq: Option<i64> = tx.query_row(
            "SELECT MAX(seq) FROM entries WHERE tomb = 1 AND wall < ?1",
            params![cut],
            |r| r.get(0),
        )?;
        {
            let mut stmt = tx.prepare(
                "SELECT node FROM replicas WHERE expired = 0 AND
                 (last_seen < ?1 OR (first_seen < ?1 AND acked_seq < ?2))",
            )?;
            let rows = stmt.query_map(params![cut, oldest_tomb_seq.unwrap_or(0)], |r| {
                r.get::<_, i64>(0)
            })?;
            for node in rows {
                report.expired.push(node? as u64);
            }
        }
        for node in &report.expired {
            tx.execute(
                "UPDATE replicas SET expired = 1 WHERE node = ?1",
                params![*node as i64],
            )?;
        }
        let active: i64 =
            tx.query_row("SELECT COUNT(*) FROM replicas WHERE expired = 0", [], |r| {
                r.get(0)
            })?;
        // Collectable: every active replica has the row (it acknowledged it,
        // or the row's state came from it).
        let filter = if active > 0 {
            "NOT EXISTS (SELECT 1 FROM replicas r WHERE r.expired = 0
                 AND r.acked_seq < entries.seq AND r.node != entries.src) AND ?1 = ?1"
        } else {
            "wall < ?1"
        };
        let horizon: Option<i64> = tx.query_row(
            &format!("SELECT MAX(wall) FROM entries WHERE tomb = 1 AND {filter}"),
            params![cut],
            |r| r.get(0),
        )?;
        let n = tx.execute(
            &format!("DELETE FROM entries WHERE tomb = 1 AND {filter}"),
            params![cut],
        )? as u64;
        if n > 0 {
            let h = meta(&tx, "horizon")?.max(horizon.unwrap_or(0) as u64);
            set_meta(&tx, "horizon", h)?;
            let total = meta(&tx, "collected")? + n;
            set_meta(&tx, "collected", total)?;
        }
        tx.commit()?;
        report.collected = n;
        Ok(report)
    }

    /// A page of every entry (tombstones included) after `after`, in
    /// (bucket, key) order, with this replica's sequence number before the
    /// page was read: what changes during paging is above it.
    pub fn snapshot_page(
        &self,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<(Vec<Delta>, u64), KvError> {
        let conn = self.conn();
        let seq = next_seq(&conn)?;
        let (b, k) = after.unwrap_or(("", ""));
        let mut stmt = conn.prepare(
            "SELECT bucket, key, entry FROM entries WHERE (bucket, key) > (?1, ?2)
             ORDER BY bucket, key LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![b, k, limit.max(1) as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for row in rows {
            let (bucket, key, json) = row?;
            if !out.is_empty() && bytes + json.len() > crate::BATCH_BYTES {
                break;
            }
            bytes += json.len();
            out.push(Delta {
                bucket,
                key,
                entry: parse(&json)?,
            });
        }
        Ok((out, seq))
    }

    /// Replaces this replica's state with `peer`'s snapshot (taken at the
    /// peer's sequence number `peer_seq`). Local writes `peer` never
    /// acknowledged are set aside as stale (see [`Kv::stale`]), not applied;
    /// the replica continues under a new node id, so that nothing it wrote
    /// before is mistaken for new writes.
    pub fn rebootstrap(
        &self,
        peer: u64,
        peer_name: Option<&str>,
        snapshot: &[Delta],
        peer_seq: u64,
        reason: &str,
    ) -> Result<Rebootstrapped, KvError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_ms();
        let acked: i64 = tx
            .query_row(
                "SELECT acked_seq FROM replicas WHERE node = ?1",
                params![peer as i64],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let stale = tx.execute(
            "INSERT INTO stale (bucket, key, entry, reason, at)
             SELECT bucket, key, entry, ?3, ?4 FROM entries WHERE seq > ?1 AND src != ?2",
            params![acked, peer as i64, reason, now as i64],
        )? as u64;
        // What readers saw before, to tell the observer what changed.
        let mut before: HashMap<(String, String), Option<Value>> = HashMap::new();
        {
            let mut stmt = tx.prepare("SELECT bucket, key, entry FROM entries")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            for row in rows {
                let (b, k, json) = row?;
                before.insert((b, k), read(&parse(&json)?));
            }
        }
        tx.execute("DELETE FROM entries", [])?;
        tx.execute("DELETE FROM replicas", [])?;
        let mut seq = next_seq(&tx)?;
        let mut changed = Vec::new();
        for d in snapshot {
            seq += 1;
            put_entry(&tx, &d.bucket, &d.key, &d.entry, seq, peer)?;
            let now_reads = read(&d.entry);
            let key = (d.bucket.clone(), d.key.clone());
            if before.remove(&key).flatten() != now_reads {
                changed.push(key);
            }
        }
        changed.extend(
            before
                .into_iter()
                .filter(|(_, v)| v.is_some())
                .map(|(k, _)| k),
        );
        set_seq(&tx, seq)?;
        let old_node = self.node();
        let new_node = random_node()?;
        set_meta(&tx, "node", new_node)?;
        set_meta(&tx, "stale", meta(&tx, "stale")? + stale)?;
        set_meta(&tx, "rebootstraps", meta(&tx, "rebootstraps")? + 1)?;
        tx.execute(
            "INSERT INTO replicas (node, name, acked_seq, pulled_seq, first_seen, last_seen)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            params![
                peer as i64,
                peer_name,
                seq as i64,
                peer_seq as i64,
                now as i64
            ],
        )?;
        let stamps = latest_stamps(&tx)?;
        tx.commit()?;
        drop(conn);
        {
            let mut clock = self.clock.lock().unwrap_or_else(|e| e.into_inner());
            let mut fresh = Clock::new(new_node);
            fresh.max_skew_ms = clock.max_skew_ms;
            fresh.skewed = clock.skewed;
            for s in stamps {
                fresh.observe(s, now);
            }
            *clock = fresh;
        }
        self.notify(&changed, 0);
        Ok(Rebootstrapped {
            old_node,
            new_node,
            entries: snapshot.len() as u64,
            stale,
        })
    }

    /// Writes set aside by re-bootstraps, newest first.
    pub fn stale(&self, limit: usize) -> Result<Vec<StaleWrite>, KvError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, bucket, key, entry, reason, at FROM stale ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, bucket, key, json, reason, at) = row?;
            out.push(StaleWrite {
                id: id as u64,
                bucket,
                key,
                entry: parse(&json)?,
                reason,
                at_ms: at as u64,
            });
        }
        Ok(out)
    }

    /// The replica's counters and peers.
    pub fn stats(&self) -> Result<Stats, KvError> {
        let replicas = self.replicas()?;
        let (skewed, max_skew_ms) = {
            let c = self.clock.lock().unwrap_or_else(|e| e.into_inner());
            (c.skewed, c.max_skew_ms)
        };
        let conn = self.conn();
        let (entries, tombstones): (i64, i64) = conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(tomb), 0) FROM entries",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(Stats {
            node: self.node(),
            seq: next_seq(&conn)?,
            entries: entries as u64,
            tombstones: tombstones as u64,
            horizon_ms: meta(&conn, "horizon")?,
            collected_total: meta(&conn, "collected")?,
            stale_total: meta(&conn, "stale")?,
            skewed,
            max_skew_ms,
            replicas,
        })
    }
}
