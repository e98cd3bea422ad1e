//! The registry as documents, for a cluster backend that stores one
//! document per key and writes by compare-and-set on each key's revision
//! (NATS JetStream KV: per-key CAS, no multi-key transactions).
//!
//! The documents are:
//! - `fn.<name>`: a function with its versions, aliases and alias history;
//!   absent once the function is deleted;
//! - `routes`: the whole route table (a route must be unique across
//!   functions, and one document makes that a single CAS);
//! - `tokens`: every token's hash.
//!
//! On a cluster node, this SQLite registry is a **replica**: a follower
//! imports each document the cluster stores ([`Store::import`]), and the
//! registry's own triggers turn that into the change feed the node's tables
//! follow, as on one machine. A write is **rehearsed** ([`Store::rehearse`]):
//! the operation runs as it would on one machine (same checks, same
//! errors), and instead of committing, the transaction yields the documents
//! it changed and rolls back. The cluster backend then writes those
//! documents with the revisions this replica last imported for them; when a
//! revision is stale, another node wrote first, and the write is rehearsed
//! again once the replica has caught up. So one set of rules (the SQL of
//! `create_version`, `set_alias`, ...) decides both backends.

use std::cell::RefCell;

use rusqlite::types::ValueRef;
use rusqlite::{OptionalExtension, params};
use serde_json::{Map, Value};

use crate::feed::Subject;
use crate::{Store, StoreError};

pub(crate) const SCHEMA: &str = "
-- The cluster revision of each document this replica imported.
CREATE TABLE IF NOT EXISTS replica_keys (
    key TEXT PRIMARY KEY,
    revision INTEGER NOT NULL
);
-- Which cluster registry this replica follows, and how far it got.
CREATE TABLE IF NOT EXISTS replica_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    registry TEXT NOT NULL,
    position INTEGER NOT NULL
);
";

/// A document of the registry: `value` is JSON, `None` when the key is
/// deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    pub key: String,
    pub value: Option<Vec<u8>>,
}

impl Doc {
    /// Is this a function's document (`fn.<name>`)?
    pub fn is_function(&self) -> bool {
        self.key.starts_with(FUNCTION_PREFIX)
    }
}

const FUNCTION_PREFIX: &str = "fn.";

/// Tables of a function's document, parents first.
const FUNCTION_TABLES: [&str; 4] = ["functions", "versions", "aliases", "alias_history"];

/// What a replica knows of the registry it follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaState {
    /// The cluster registry's id.
    pub registry: String,
    /// The last cluster revision imported.
    pub position: u64,
}

thread_local! {
    /// Set while an operation is rehearsed on this thread: the documents
    /// its transaction changed, once it reached its commit.
    static REHEARSAL: RefCell<Option<Vec<Doc>>> = const { RefCell::new(None) };
}

/// Is an operation being rehearsed on this thread?
pub(crate) fn rehearsing() -> bool {
    REHEARSAL.with(|r| r.borrow().is_some())
}

fn key_of(subject: &Subject) -> String {
    match subject {
        Subject::Function(name) => format!("{FUNCTION_PREFIX}{name}"),
        Subject::Routes => "routes".to_string(),
        Subject::Tokens => "tokens".to_string(),
        Subject::Secrets => "secrets".to_string(),
    }
}

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(format!("a registry document is not valid: {e}"))
}

/// Rows of `SELECT * FROM table WHERE ...` as JSON objects.
fn rows(
    conn: &rusqlite::Connection,
    table: &str,
    filter: Option<(&str, &str)>,
    skip: &[&str],
) -> Result<Vec<Value>, StoreError> {
    let sql = match filter {
        Some((column, _)) => format!("SELECT * FROM {table} WHERE {column} = ?1 ORDER BY rowid"),
        None => format!("SELECT * FROM {table} ORDER BY rowid"),
    };
    let mut stmt = conn.prepare(&sql)?;
    let names: Vec<String> = stmt.column_names().iter().map(|c| c.to_string()).collect();
    let mut query = match filter {
        Some((_, value)) => stmt.query(params![value])?,
        None => stmt.query([])?,
    };
    let mut out = Vec::new();
    while let Some(row) = query.next()? {
        let mut obj = Map::new();
        for (i, name) in names.iter().enumerate() {
            if skip.contains(&name.as_str()) {
                continue;
            }
            let v = match row.get_ref(i)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(n) => Value::from(n),
                ValueRef::Real(f) => Value::from(f),
                ValueRef::Text(t) => Value::from(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Blob(_) => {
                    return Err(StoreError::Corrupt(format!(
                        "{table}.{name} holds a blob, which registry documents do not carry"
                    )));
                }
            };
            obj.insert(name.clone(), v);
        }
        out.push(Value::Object(obj));
    }
    Ok(out)
}

/// Inserts rows (JSON objects) into `table`.
fn insert_rows(
    conn: &rusqlite::Connection,
    table: &str,
    rows: &[Value],
    keep: impl Fn(&Map<String, Value>) -> bool,
) -> Result<(), StoreError> {
    for row in rows {
        let Value::Object(obj) = row else {
            return Err(StoreError::Corrupt(format!(
                "a {table} row of a registry document is not an object"
            )));
        };
        if !keep(obj) {
            continue;
        }
        let columns: Vec<&str> = obj.keys().map(String::as_str).collect();
        if columns
            .iter()
            .any(|c| !c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        {
            return Err(StoreError::Corrupt(format!(
                "a {table} row of a registry document names a bad column"
            )));
        }
        let marks: Vec<String> = (1..=columns.len()).map(|i| format!("?{i}")).collect();
        let sql = format!(
            "INSERT INTO {table} ({}) VALUES ({})",
            columns.join(", "),
            marks.join(", ")
        );
        let values: Vec<rusqlite::types::Value> = obj
            .values()
            .map(|v| match v {
                Value::Null => rusqlite::types::Value::Null,
                Value::Bool(b) => rusqlite::types::Value::Integer(i64::from(*b)),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => rusqlite::types::Value::Integer(i),
                    None => rusqlite::types::Value::Real(n.as_f64().unwrap_or(0.0)),
                },
                Value::String(s) => rusqlite::types::Value::Text(s.clone()),
                other => rusqlite::types::Value::Text(other.to_string()),
            })
            .collect();
        conn.execute(&sql, rusqlite::params_from_iter(values))?;
    }
    Ok(())
}

/// The document of `subject` as the connection sees it.
fn export(conn: &rusqlite::Connection, subject: &Subject) -> Result<Doc, StoreError> {
    let mut doc = Map::new();
    match subject {
        Subject::Function(name) => {
            let functions = rows(conn, "functions", Some(("name", name)), &[])?;
            if functions.is_empty() {
                return Ok(Doc {
                    key: key_of(subject),
                    value: None,
                });
            }
            doc.insert("functions".into(), Value::Array(functions));
            for table in &FUNCTION_TABLES[1..] {
                // History ids are local to each replica (every function's
                // history shares one sequence); the order is what counts.
                let skip: &[&str] = if *table == "alias_history" {
                    &["id"]
                } else {
                    &[]
                };
                doc.insert(
                    (*table).into(),
                    Value::Array(rows(conn, table, Some(("function", name)), skip)?),
                );
            }
        }
        Subject::Routes => {
            doc.insert(
                "routes".into(),
                Value::Array(rows(conn, "routes", None, &[])?),
            );
        }
        Subject::Tokens => {
            doc.insert(
                "tokens".into(),
                Value::Array(rows(conn, "tokens", None, &[])?),
            );
        }
        Subject::Secrets => {
            doc.insert(
                "secrets".into(),
                Value::Array(rows(conn, "secrets", None, &[])?),
            );
        }
    }
    Ok(Doc {
        key: key_of(subject),
        value: Some(serde_json::to_vec(&Value::Object(doc)).map_err(json_err)?),
    })
}

impl Store {
    /// Ends a registry write: commits it, or, when the write is rehearsed,
    /// hands the documents it changed to [`Store::rehearse`] and rolls back.
    pub(crate) fn finish(&self, tx: rusqlite::Transaction<'_>) -> Result<(), StoreError> {
        if !rehearsing() {
            tx.commit()?;
            return Ok(());
        }
        let subjects: Vec<String> = {
            let mut stmt = tx.prepare(
                "SELECT DISTINCT subject FROM registry_log WHERE revision > ?1 ORDER BY subject",
            )?;
            let mark = REHEARSAL_MARK.with(|m| *m.borrow());
            let rows = stmt.query_map(params![mark], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut docs = Vec::new();
        for s in subjects {
            let subject = Subject::parse(&s).ok_or_else(|| {
                StoreError::Corrupt(format!("registry log names an unknown subject {s:?}"))
            })?;
            docs.push(export(&tx, &subject)?);
        }
        REHEARSAL.with(|r| *r.borrow_mut() = Some(docs));
        tx.rollback()?;
        Ok(())
    }

    /// Runs a registry write without keeping it: returns what the write
    /// returns and the documents it would have changed (none when it
    /// changed nothing). Nothing is written, no artifact is removed.
    ///
    /// Rehearsals and imports must not run at the same time (the cluster
    /// backend holds one lock for both): the documents are found by the
    /// log entries written since the rehearsal began.
    pub fn rehearse<R>(
        &self,
        op: impl FnOnce(&Store) -> Result<R, StoreError>,
    ) -> Result<(R, Vec<Doc>), StoreError> {
        /// Ends the rehearsal on this thread however `op` ends (a panic
        /// included): a pool thread must never keep skipping commits.
        struct Ending;
        impl Drop for Ending {
            fn drop(&mut self) {
                REHEARSAL.with(|r| r.borrow_mut().take());
            }
        }
        let mark = self.revision()?;
        REHEARSAL_MARK.with(|m| *m.borrow_mut() = i64::try_from(mark).unwrap_or(i64::MAX));
        REHEARSAL.with(|r| *r.borrow_mut() = Some(Vec::new()));
        let ending = Ending;
        let out = op(self);
        let docs = REHEARSAL
            .with(|r| r.borrow_mut().take())
            .unwrap_or_default();
        drop(ending);
        Ok((out?, docs))
    }

    /// The revision this replica last imported for `key` (0: never seen).
    pub fn replica_revision(&self, key: &str) -> Result<u64, StoreError> {
        let r: Option<i64> = self
            .conn()
            .query_row(
                "SELECT revision FROM replica_keys WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()?;
        Ok(r.and_then(|r| u64::try_from(r).ok()).unwrap_or(0))
    }

    /// Which cluster registry this replica follows, if any.
    pub fn replica_state(&self) -> Result<Option<ReplicaState>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT registry, position FROM replica_meta WHERE id = 1",
                [],
                |r| {
                    Ok(ReplicaState {
                        registry: r.get(0)?,
                        position: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                    })
                },
            )
            .optional()?)
    }

    /// Makes this registry a replica of cluster registry `registry`. When it
    /// followed another one (or none), its functions, routes and tokens are
    /// cleared first; a registry that holds functions and never followed a
    /// cluster is refused, since joining would drop them.
    pub fn follow_registry(&self, registry: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let current: Option<String> = tx
            .query_row("SELECT registry FROM replica_meta WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()?;
        if current.as_deref() == Some(registry) {
            return Ok(());
        }
        if current.is_none() {
            let functions: i64 =
                tx.query_row("SELECT COUNT(*) FROM functions", [], |r| r.get(0))?;
            if functions > 0 {
                return Err(StoreError::NotAReplica(functions as u64));
            }
        }
        tx.execute_batch(
            "DELETE FROM routes; DELETE FROM alias_history; DELETE FROM aliases;
             DELETE FROM versions; DELETE FROM functions; DELETE FROM tokens;
             DELETE FROM secrets; DELETE FROM replica_keys; DELETE FROM replica_meta;",
        )?;
        tx.execute(
            "INSERT INTO replica_meta (id, registry, position) VALUES (1, ?1, 0)",
            params![registry],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Imports one document the cluster stored at `revision` (its value
    /// `None`: the key was deleted). Keys this registry does not know are
    /// only counted. Routes to functions this replica does not hold yet are
    /// skipped: the cluster writes a function before the routes to it.
    pub fn import(&self, doc: &Doc, revision: u64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let rev = i64::try_from(revision).unwrap_or(i64::MAX);
        let parsed: Option<Map<String, Value>> = match &doc.value {
            Some(bytes) => match serde_json::from_slice(bytes).map_err(json_err)? {
                Value::Object(o) => Some(o),
                _ => {
                    return Err(StoreError::Corrupt(format!(
                        "registry document {} is not a JSON object",
                        doc.key
                    )));
                }
            },
            None => None,
        };
        let table = |name: &str| -> &[Value] {
            parsed
                .as_ref()
                .and_then(|o| o.get(name))
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or(&[])
        };
        if let Some(name) = doc.key.strip_prefix(FUNCTION_PREFIX) {
            if parsed.is_none() {
                tx.execute("DELETE FROM functions WHERE name = ?1", params![name])?;
            } else {
                // The function's row is updated in place: deleting it would
                // take its routes with it (ON DELETE CASCADE).
                let row = table("functions").first().and_then(Value::as_object);
                let (Some(created), Some(updated)) = (
                    row.and_then(|r| r.get("created_at"))
                        .and_then(Value::as_i64),
                    row.and_then(|r| r.get("updated_at"))
                        .and_then(Value::as_i64),
                ) else {
                    return Err(StoreError::Corrupt(format!(
                        "registry document {} has no function row",
                        doc.key
                    )));
                };
                tx.execute(
                    "INSERT INTO functions (name, created_at, updated_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT(name) DO UPDATE SET created_at = excluded.created_at, updated_at = excluded.updated_at",
                    params![name, created, updated],
                )?;
                for t in FUNCTION_TABLES[1..].iter().rev() {
                    tx.execute(
                        &format!("DELETE FROM {t} WHERE function = ?1"),
                        params![name],
                    )?;
                }
                for t in &FUNCTION_TABLES[1..] {
                    insert_rows(&tx, t, table(t), |r| {
                        r.get("function").and_then(Value::as_str) == Some(name)
                    })?;
                }
            }
        } else if doc.key == "routes" {
            tx.execute("DELETE FROM routes", [])?;
            let functions: std::collections::HashSet<String> = {
                let mut stmt = tx.prepare("SELECT name FROM functions")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            insert_rows(&tx, "routes", table("routes"), |r| {
                let f = r.get("function").and_then(Value::as_str).unwrap_or("");
                let known = functions.contains(f);
                if !known {
                    tracing::warn!(
                        function = f,
                        "a route names a function this replica does not hold yet; skipped"
                    );
                }
                known
            })?;
        } else if doc.key == "tokens" {
            tx.execute("DELETE FROM tokens", [])?;
            insert_rows(&tx, "tokens", table("tokens"), |_| true)?;
        } else if doc.key == "secrets" {
            tx.execute("DELETE FROM secrets", [])?;
            insert_rows(&tx, "secrets", table("secrets"), |_| true)?;
        }
        tx.execute(
            "INSERT INTO replica_keys (key, revision) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET revision = excluded.revision",
            params![doc.key, rev],
        )?;
        tx.execute(
            "UPDATE replica_meta SET position = MAX(position, ?1) WHERE id = 1",
            params![rev],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Every document of this registry as it stands (what a new cluster
    /// registry is seeded with; also what tests compare replicas by).
    pub fn documents(&self) -> Result<Vec<Doc>, StoreError> {
        let conn = self.conn();
        let names: Vec<String> = {
            let mut stmt = conn.prepare("SELECT name FROM functions ORDER BY name")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut out = Vec::new();
        for n in names {
            out.push(export(&conn, &Subject::Function(n))?);
        }
        out.push(export(&conn, &Subject::Routes)?);
        out.push(export(&conn, &Subject::Tokens)?);
        out.push(export(&conn, &Subject::Secrets)?);
        Ok(out)
    }
}

thread_local! {
    /// The registry log's head when the rehearsal on this thread began.
    static REHEARSAL_MARK: RefCell<i64> = const { RefCell::new(0) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Limits, NewVersion, StoreError};
    use verge_spec::{AliasTarget, Canary};

    fn deploy<'a>(
        function: &'a str,
        sha: &'a str,
        routes: &'a [(Option<String>, String)],
    ) -> NewVersion<'a> {
        NewVersion {
            function,
            sha256: sha,
            size: 3,
            env: &[],
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

    /// The cluster in miniature: `origin` rehearses, `replica` imports what
    /// would be written, each document at the next revision.
    fn apply(replica: &Store, docs: &[Doc], revision: &mut u64) {
        for d in docs {
            *revision += 1;
            replica.import(d, *revision).unwrap();
        }
    }

    #[test]
    fn a_rehearsed_write_keeps_nothing_and_its_documents_rebuild_it_elsewhere() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = Store::open(a_dir.path()).unwrap();
        let b = Store::open(b_dir.path()).unwrap();
        for s in [&a, &b] {
            s.follow_registry("cluster-1").unwrap();
        }
        let sha = a.put_artifact(b"abc").unwrap();
        let routes = vec![(None, "/hello".to_string())];
        let mut rev = 0;

        let (created, docs) = a
            .rehearse(|s| s.create_version(&deploy("f", &sha, &routes)))
            .unwrap();
        assert_eq!(created.version, 1);
        assert!(a.get_function("f").is_err(), "a rehearsal writes nothing");
        assert_eq!(a.revision().unwrap(), 0, "nor logs anything");
        let keys: Vec<&str> = docs.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(keys, ["fn.f", "routes"]);
        apply(&a, &docs, &mut rev);
        apply(&b, &docs, &mut rev);
        assert_eq!(a.replica_revision("fn.f").unwrap(), 1);
        assert_eq!(
            b.function_state("f").unwrap(),
            a.function_state("f").unwrap()
        );
        assert_eq!(b.routes().unwrap(), a.routes().unwrap());
        assert_eq!(b.routes().unwrap()[0].function, "f");

        // A second version, a canary on it, a rollback: history survives the trip.
        let (_, docs) = a
            .rehearse(|s| {
                let mut v = deploy("f", &sha, &[]);
                v.promote = false;
                v.size = 4;
                let env = [("K".to_string(), "V".to_string())];
                s.create_version(&NewVersion { env: &env, ..v })
            })
            .unwrap();
        apply(&a, &docs, &mut rev);
        apply(&b, &docs, &mut rev);
        let canary = AliasTarget {
            canary: Some(Canary {
                version: 2,
                weight: 10,
            }),
            ..AliasTarget::single(1)
        };
        let (_, docs) = b.rehearse(|s| s.set_alias("f", "live", &canary)).unwrap();
        assert_eq!(docs.len(), 1);
        apply(&a, &docs, &mut rev);
        apply(&b, &docs, &mut rev);
        let (back, docs) = a.rehearse(|s| s.rollback_alias("f", "live")).unwrap();
        assert_eq!(back, AliasTarget::single(1));
        apply(&a, &docs, &mut rev);
        apply(&b, &docs, &mut rev);
        assert_eq!(
            b.function_state("f").unwrap(),
            a.function_state("f").unwrap()
        );
        assert_eq!(b.aliases("f").unwrap()[0].target, AliasTarget::single(1));

        // The same checks refuse the same writes, and refusing writes nothing.
        let err = b
            .rehearse(|s| s.create_version(&deploy("g", &sha, &routes)))
            .unwrap_err();
        assert!(matches!(err, StoreError::RouteConflict { .. }), "{err}");

        // Tokens, then the function's removal with its routes.
        let (_, docs) = a
            .rehearse(|s| s.create_token("ci", "hash", None, None))
            .unwrap();
        apply(&b, &docs, &mut rev);
        assert_eq!(b.token_hashes().unwrap()[0].hash, "hash");
        let (_, docs) = a.rehearse(|s| s.delete_function("f")).unwrap();
        assert!(
            a.read_artifact(&sha).is_ok(),
            "a rehearsal removes no artifact"
        );
        assert!(docs.iter().any(|d| d.key == "fn.f" && d.value.is_none()));
        apply(&b, &docs, &mut rev);
        assert!(b.function_state("f").unwrap().is_none());
        assert!(b.routes().unwrap().is_empty());
        // Each import reached the feed the node's tables follow.
        assert!(b.revision().unwrap() > 0);
    }

    #[test]
    fn a_rehearsal_that_panics_leaves_the_thread_committing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let sha = s.put_artifact(b"abc").unwrap();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = s.rehearse(|_| -> Result<(), StoreError> { panic!("a bug in a write") });
        }));
        assert!(caught.is_err());
        assert!(!rehearsing());
        s.create_version(&deploy("f", &sha, &[])).unwrap();
        assert!(
            s.function_state("f").unwrap().is_some(),
            "the next write commits"
        );
    }

    #[test]
    fn a_registry_of_its_own_is_not_dropped_by_joining_a_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let sha = s.put_artifact(b"abc").unwrap();
        s.create_version(&deploy("f", &sha, &[])).unwrap();
        let err = s.follow_registry("cluster-1").unwrap_err();
        assert!(matches!(err, StoreError::NotAReplica(1)), "{err}");
        assert!(err.to_string().contains("--data-dir"), "{err}");
        assert!(s.function_state("f").unwrap().is_some());
    }
}
