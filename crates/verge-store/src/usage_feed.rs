//! Usage records across a cluster: each node publishes the records it
//! committed itself (read after a durable cursor, so a crash re-sends rather
//! than loses) and imports the other nodes' records into its own
//! `invocations` table (by invocation id: a record arrives once however
//! often it is sent), so `verge usage` and `verge invocations` on any node
//! answer for the whole cluster. Imported records name their node; this
//! node's own have none.

use rusqlite::{OptionalExtension, params};
use verge_spec::UsageRecord;

use crate::{Store, StoreError, outcome_at};

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage_stream (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    published_rowid INTEGER NOT NULL,
    imported_position INTEGER NOT NULL
);
";

impl Store {
    /// How far this node has published its records (a rowid of
    /// `invocations`) and imported the others' (a stream position).
    pub fn usage_cursor(&self) -> Result<(i64, u64), StoreError> {
        // Clamped to the newest record: when retention emptied the table,
        // SQLite hands out rowids from 1 again.
        let r: Option<(i64, i64)> = self
            .conn()
            .query_row(
                "SELECT MIN(published_rowid, (SELECT COALESCE(MAX(rowid), 0) FROM invocations)), imported_position
                 FROM usage_stream WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(r.map(|(a, b)| (a, u64::try_from(b).unwrap_or(0)))
            .unwrap_or((0, 0)))
    }

    /// This node's own records after rowid `after`, oldest first, with
    /// their rowids (output included: `verge logs` answers for the cluster).
    pub fn own_records_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, UsageRecord)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT rowid, id, function, version, started_at_ms, wall_us, cpu_us, peak_memory, memory_limit,
                    request_bytes, response_bytes, status, outcome, cold, stdout, stderr, error,
                    forwarded_from, parent_id, outbound_requests, outbound_sent, outbound_received,
                    outbound_wait_us, trace_id, span_id, parent_span_id
             FROM invocations WHERE rowid > ?1 AND node IS NULL ORDER BY rowid LIMIT ?2",
        )?;
        let rows = stmt.query_map(
            params![after, i64::try_from(limit).unwrap_or(i64::MAX)],
            |r| {
                Ok((
                    r.get(0)?,
                    UsageRecord {
                        invocation_id: r.get(1)?,
                        function: r.get(2)?,
                        version: r.get(3)?,
                        started_at_ms: r.get(4)?,
                        wall_us: r.get(5)?,
                        cpu_us: r.get(6)?,
                        peak_memory_bytes: r.get(7)?,
                        memory_limit_bytes: r.get(8)?,
                        request_bytes: r.get(9)?,
                        response_bytes: r.get(10)?,
                        status: r.get(11)?,
                        outcome: outcome_at(r, 12)?,
                        cold: r.get(13)?,
                        stdout: r.get(14)?,
                        stderr: r.get(15)?,
                        error: r.get(16)?,
                        forwarded_from: r.get(17)?,
                        parent_id: r.get(18)?,
                        outbound_requests: r.get(19)?,
                        outbound_sent_bytes: r.get(20)?,
                        outbound_received_bytes: r.get(21)?,
                        outbound_wait_us: r.get(22)?,
                        trace: crate::trace_at(r, 23, &r.get::<_, String>(1)?)?,
                        ..UsageRecord::default()
                    },
                ))
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records that this node's records up to `rowid` are published.
    pub fn set_published(&self, rowid: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO usage_stream (id, published_rowid, imported_position) VALUES (1, ?1, 0)
             ON CONFLICT(id) DO UPDATE SET published_rowid = MAX(published_rowid, excluded.published_rowid)",
            params![rowid],
        )?;
        Ok(())
    }

    /// Imports other nodes' records (each with its node's name) and the
    /// stream position they reach, in one transaction; a record already
    /// here is skipped.
    pub fn import_records(
        &self,
        records: &[(String, UsageRecord)],
        position: u64,
    ) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let added = crate::ledger::insert_records(
            &tx,
            records.iter().map(|(node, r)| (Some(node.as_str()), r)),
        )?;
        tx.execute(
            "INSERT INTO usage_stream (id, published_rowid, imported_position) VALUES (1, 0, ?1)
             ON CONFLICT(id) DO UPDATE SET imported_position = MAX(imported_position, excluded.imported_position)",
            params![i64::try_from(position).unwrap_or(i64::MAX)],
        )?;
        tx.commit()?;
        Ok(added)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_spec::Outcome;

    fn record(id: &str) -> UsageRecord {
        UsageRecord {
            invocation_id: id.into(),
            function: "f".into(),
            version: 1,
            started_at_ms: 1_700_000_000_000,
            wall_us: 1000,
            cpu_us: 500,
            peak_memory_bytes: 1 << 16,
            memory_limit_bytes: 1 << 20,
            request_bytes: 1,
            response_bytes: 2,
            status: 200,
            outcome: Outcome::Ok,
            cold: false,
            stdout: Some("out".into()),
            stderr: None,
            error: None,
            forwarded_from: None,
            ..UsageRecord::default()
        }
    }

    #[test]
    fn imported_records_count_once_and_are_never_published_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ledger = crate::Ledger::open(dir.path()).unwrap();
        ledger.record(record("own-1"));
        ledger.flush();
        let own = store.own_records_after(0, 10).unwrap();
        assert_eq!(own.len(), 1);
        assert_eq!(own[0].1.stdout.as_deref(), Some("out"));
        store.set_published(own[0].0).unwrap();
        assert!(store.own_records_after(own[0].0, 10).unwrap().is_empty());

        let theirs = vec![
            ("b".to_string(), record("b-1")),
            ("b".to_string(), record("b-2")),
        ];
        assert_eq!(store.import_records(&theirs, 7).unwrap(), 2);
        // Sent again (a re-delivery): nothing doubles.
        assert_eq!(store.import_records(&theirs, 8).unwrap(), 0);
        assert_eq!(store.usage_cursor().unwrap(), (own[0].0, 8));
        assert_eq!(
            store
                .invocations(Some("f"), None, None, None, 10)
                .unwrap()
                .len(),
            3
        );
        // Imported records are not this node's to publish.
        assert!(store.own_records_after(0, 10).unwrap().len() == 1);
    }
}
