//! The registry's change feed: what a node's in-memory tables (functions
//! and their aliases, routes, token hashes) are a projection of.
//!
//! On SQLite, triggers write every change of the registry's tables into
//! `registry_log` in the writing transaction itself, so no write path can
//! forget to report one and a crash never separates a change from its entry.
//! Each entry names a subject (a function, the routes, the tokens) and gets a
//! revision that only grows. A reader asks for the changes after the last
//! revision it applied and reloads each subject named; the log keeps the
//! last [`LOG_KEEP`] entries, and a reader further behind is told to reload
//! everything ([`Changes::Gap`]).
//!
//! The [`Registry`] trait is what the node reads through; the cluster
//! backend (NATS JetStream KV: per-key revisions and a watch) implements the
//! same reads.

use std::sync::Arc;
use std::time::Duration;

use rusqlite::params;
use verge_spec::{AliasTarget, Route};

use crate::{Store, StoreError, StoredVersion, TokenHash};

/// The log and the triggers that fill it.
pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS registry_log (
    revision INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS log_function_insert AFTER INSERT ON functions
    BEGIN INSERT INTO registry_log (subject) VALUES ('function:' || NEW.name); END;
CREATE TRIGGER IF NOT EXISTS log_function_delete AFTER DELETE ON functions
    BEGIN INSERT INTO registry_log (subject) VALUES ('function:' || OLD.name); END;
CREATE TRIGGER IF NOT EXISTS log_version_insert AFTER INSERT ON versions
    BEGIN INSERT INTO registry_log (subject) VALUES ('function:' || NEW.function); END;
CREATE TRIGGER IF NOT EXISTS log_version_update AFTER UPDATE ON versions
    BEGIN INSERT INTO registry_log (subject) VALUES ('function:' || NEW.function); END;
CREATE TRIGGER IF NOT EXISTS log_version_delete AFTER DELETE ON versions
    BEGIN INSERT INTO registry_log (subject) VALUES ('function:' || OLD.function); END;
CREATE TRIGGER IF NOT EXISTS log_alias_insert AFTER INSERT ON aliases
    BEGIN INSERT INTO registry_log (subject) VALUES ('function:' || NEW.function); END;
CREATE TRIGGER IF NOT EXISTS log_alias_update AFTER UPDATE ON aliases
    BEGIN INSERT INTO registry_log (subject) VALUES ('function:' || NEW.function); END;
CREATE TRIGGER IF NOT EXISTS log_alias_delete AFTER DELETE ON aliases
    BEGIN INSERT INTO registry_log (subject) VALUES ('function:' || OLD.function); END;
CREATE TRIGGER IF NOT EXISTS log_route_insert AFTER INSERT ON routes
    BEGIN INSERT INTO registry_log (subject) VALUES ('routes'); END;
CREATE TRIGGER IF NOT EXISTS log_route_update AFTER UPDATE ON routes
    BEGIN INSERT INTO registry_log (subject) VALUES ('routes'); END;
CREATE TRIGGER IF NOT EXISTS log_route_delete AFTER DELETE ON routes
    BEGIN INSERT INTO registry_log (subject) VALUES ('routes'); END;
CREATE TRIGGER IF NOT EXISTS log_token_insert AFTER INSERT ON tokens
    BEGIN INSERT INTO registry_log (subject) VALUES ('tokens'); END;
CREATE TRIGGER IF NOT EXISTS log_token_update AFTER UPDATE ON tokens
    BEGIN INSERT INTO registry_log (subject) VALUES ('tokens'); END;
CREATE TRIGGER IF NOT EXISTS log_token_delete AFTER DELETE ON tokens
    BEGIN INSERT INTO registry_log (subject) VALUES ('tokens'); END;
CREATE TRIGGER IF NOT EXISTS log_secret_insert AFTER INSERT ON secrets
    BEGIN INSERT INTO registry_log (subject) VALUES ('secrets'); END;
CREATE TRIGGER IF NOT EXISTS log_secret_update AFTER UPDATE ON secrets
    BEGIN INSERT INTO registry_log (subject) VALUES ('secrets'); END;
CREATE TRIGGER IF NOT EXISTS log_secret_delete AFTER DELETE ON secrets
    BEGIN INSERT INTO registry_log (subject) VALUES ('secrets'); END;
CREATE TRIGGER IF NOT EXISTS log_bounded AFTER INSERT ON registry_log
    BEGIN DELETE FROM registry_log WHERE revision <= NEW.revision - 10000; END;
";

/// What a change is about: the reader reloads it whole.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    /// A function: its versions and aliases (gone when it was deleted).
    Function(String),
    /// The route table.
    Routes,
    /// The token hashes.
    Tokens,
    /// The sealed secrets.
    Secrets,
}

impl Subject {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "routes" => Some(Self::Routes),
            "tokens" => Some(Self::Tokens),
            "secrets" => Some(Self::Secrets),
            _ => s
                .strip_prefix("function:")
                .map(|n| Self::Function(n.to_string())),
        }
    }
}

/// One entry of the feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub revision: u64,
    pub subject: Subject,
}

/// What a reader gets after a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// The changes after it, oldest first (never empty).
    Batch(Vec<Change>),
    /// The log no longer reaches back that far (or the revision is from
    /// another registry): reload everything as of this revision.
    Gap(u64),
}

/// A function as the request path needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionState {
    pub name: String,
    pub versions: Vec<StoredVersion>,
    /// Alias name and target.
    pub aliases: Vec<(String, AliasTarget)>,
}

/// The registry as a node reads it: whole subjects, and the feed of changes
/// to them.
#[async_trait::async_trait]
pub trait Registry: Send + Sync + 'static {
    /// The latest revision.
    async fn head(&self) -> Result<u64, StoreError>;
    /// The changes after `after`; waits up to `wait` for one when there is
    /// none yet (then an empty batch is never returned: `Ok(None)`).
    async fn changes(&self, after: u64, wait: Duration) -> Result<Option<Changes>, StoreError>;
    /// One function, `None` if it does not exist.
    async fn function(&self, name: &str) -> Result<Option<FunctionState>, StoreError>;
    /// Every function.
    async fn functions(&self) -> Result<Vec<FunctionState>, StoreError>;
    /// Every route.
    async fn routes(&self) -> Result<Vec<Route>, StoreError>;
    /// Every token's hash.
    async fn token_hashes(&self) -> Result<Vec<TokenHash>, StoreError>;
}

impl Store {
    /// The latest revision of the registry's log (0 when empty).
    pub fn revision(&self) -> Result<u64, StoreError> {
        let r: i64 = self.conn().query_row(
            "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'registry_log'), 0)",
            [],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(r).unwrap_or(0))
    }

    /// The log's entries after `after` (at most `limit`), or a gap.
    pub fn changes_after(&self, after: u64, limit: usize) -> Result<Changes, StoreError> {
        let head = self.revision()?;
        let conn = self.conn();
        let oldest: Option<i64> =
            conn.query_row("SELECT MIN(revision) FROM registry_log", [], |r| r.get(0))?;
        let after_i = i64::try_from(after).unwrap_or(i64::MAX);
        let head_i = i64::try_from(head).unwrap_or(i64::MAX);
        // Ahead of this registry, or behind what the log still holds.
        if after_i > head_i || oldest.is_some_and(|o| after_i < o - 1) {
            return Ok(Changes::Gap(head));
        }
        let mut stmt = conn.prepare_cached(
            "SELECT revision, subject FROM registry_log WHERE revision > ?1 ORDER BY revision LIMIT ?2",
        )?;
        let rows = stmt.query_map(
            params![after_i, i64::try_from(limit).unwrap_or(i64::MAX)],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (revision, subject) = row?;
            let Some(subject) = Subject::parse(&subject) else {
                return Err(StoreError::Corrupt(format!(
                    "registry log entry {revision} names an unknown subject {subject:?}"
                )));
            };
            out.push(Change {
                revision: u64::try_from(revision).unwrap_or(0),
                subject,
            });
        }
        Ok(Changes::Batch(out))
    }

    /// One function's versions and aliases, `None` if it does not exist.
    pub fn function_state(&self, name: &str) -> Result<Option<FunctionState>, StoreError> {
        let exists: bool = self.conn().query_row(
            "SELECT EXISTS (SELECT 1 FROM functions WHERE name = ?1)",
            params![name],
            |r| r.get(0),
        )?;
        if !exists {
            return Ok(None);
        }
        let versions = self
            .version_rows(Some(name), None)?
            .into_iter()
            .map(|r| r.0)
            .collect();
        let aliases = self
            .aliases(name)?
            .into_iter()
            .map(|a| (a.name, a.target))
            .collect();
        Ok(Some(FunctionState {
            name: name.to_string(),
            versions,
            aliases,
        }))
    }

    /// Every function's versions and aliases.
    pub fn function_states(&self) -> Result<Vec<FunctionState>, StoreError> {
        let mut by_name: std::collections::BTreeMap<String, FunctionState> = Default::default();
        for v in self.stored_versions()? {
            by_name
                .entry(v.function.clone())
                .or_insert_with(|| FunctionState {
                    name: v.function.clone(),
                    versions: Vec::new(),
                    aliases: Vec::new(),
                })
                .versions
                .push(v);
        }
        for (function, alias, target) in self.all_aliases()? {
            if let Some(f) = by_name.get_mut(&function) {
                f.aliases.push((alias, target));
            }
        }
        Ok(by_name.into_values().collect())
    }
}

/// The registry of one node on its SQLite store. Reads run on the blocking
/// pool; a commit on the store's connection wakes whoever waits for changes.
pub struct SqliteRegistry {
    store: Arc<Store>,
    committed: tokio::sync::watch::Receiver<u64>,
}

impl SqliteRegistry {
    pub fn new(store: Arc<Store>) -> Self {
        let committed = store.commits.subscribe();
        Self { store, committed }
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Corrupt(format!("a registry read did not finish: {e}")))?
    }
}

/// Entries one read of the log returns at most.
const BATCH: usize = 1_000;

#[async_trait::async_trait]
impl Registry for SqliteRegistry {
    async fn head(&self) -> Result<u64, StoreError> {
        self.run(Store::revision).await
    }

    async fn changes(&self, after: u64, wait: Duration) -> Result<Option<Changes>, StoreError> {
        let mut committed = self.committed.clone();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Marked seen before reading: a commit after this read wakes the
            // next wait.
            committed.borrow_and_update();
            let changes = self.run(move |s| s.changes_after(after, BATCH)).await?;
            if !matches!(&changes, Changes::Batch(b) if b.is_empty()) {
                return Ok(Some(changes));
            }
            match tokio::time::timeout_at(deadline, committed.changed()).await {
                Ok(Ok(())) => {}
                // The store is gone, or nothing committed in time.
                Ok(Err(_)) | Err(_) => return Ok(None),
            }
        }
    }

    async fn function(&self, name: &str) -> Result<Option<FunctionState>, StoreError> {
        let name = name.to_string();
        self.run(move |s| s.function_state(&name)).await
    }

    async fn functions(&self) -> Result<Vec<FunctionState>, StoreError> {
        self.run(Store::function_states).await
    }

    async fn routes(&self) -> Result<Vec<Route>, StoreError> {
        self.run(Store::routes).await
    }

    async fn token_hashes(&self) -> Result<Vec<TokenHash>, StoreError> {
        self.run(Store::token_hashes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subjects(c: Changes) -> Vec<Subject> {
        match c {
            Changes::Batch(b) => b.into_iter().map(|c| c.subject).collect(),
            Changes::Gap(h) => panic!("a gap at {h}"),
        }
    }

    #[test]
    fn every_registry_write_is_logged_in_its_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.revision().unwrap(), 0);
        store.create_token("t", "h", None, None).unwrap();
        let at = store.revision().unwrap();
        assert_eq!(
            subjects(store.changes_after(0, 100).unwrap()),
            [Subject::Tokens]
        );

        let sha = store.put_artifact(b"\0asm").unwrap();
        store
            .create_version(&crate::NewVersion {
                function: "f",
                sha256: &sha,
                size: 4,
                env: &[],
                limits: crate::Limits::default(),
                buckets: &[],
                tenant: "default",
                placement: &[],
                grants: &verge_spec::NO_GRANTS,
                routes: &[(None, "/f".to_string())],
                deployed_by: "test",
                promote: true,
            })
            .unwrap();
        let after = subjects(store.changes_after(at, 100).unwrap());
        assert!(after.contains(&Subject::Function("f".into())), "{after:?}");
        assert!(after.contains(&Subject::Routes), "{after:?}");
        let f = store.function_state("f").unwrap().unwrap();
        assert_eq!(f.versions.len(), 1);
        assert_eq!(f.aliases[0].0, "live");

        let at = store.revision().unwrap();
        store.delete_function("f").unwrap();
        let after = subjects(store.changes_after(at, 100).unwrap());
        assert!(after.contains(&Subject::Function("f".into())), "{after:?}");
        // The cascade removed its route: logged too.
        assert!(after.contains(&Subject::Routes), "{after:?}");
        assert!(store.function_state("f").unwrap().is_none());
        // Nothing after the head; a revision past it is another log's.
        let head = store.revision().unwrap();
        assert_eq!(
            store.changes_after(head, 100).unwrap(),
            Changes::Batch(vec![])
        );
        assert_eq!(
            store.changes_after(head + 5, 100).unwrap(),
            Changes::Gap(head)
        );
    }

    #[test]
    fn a_reader_behind_the_kept_log_is_told_to_reload() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create_token("t", "h", None, None).unwrap();
        for i in 0..10_050 {
            store
                .conn()
                .execute("UPDATE tokens SET hash = ?1", params![format!("h{i}")])
                .unwrap();
        }
        let head = store.revision().unwrap();
        assert_eq!(head, 10_051);
        // The log keeps the last 10,000 entries.
        assert_eq!(store.changes_after(0, 10).unwrap(), Changes::Gap(head));
        assert!(matches!(
            store.changes_after(head - 100, 1000).unwrap(),
            Changes::Batch(b) if b.len() == 100
        ));
        // The revision keeps growing past the pruning (never reused).
        store.create_token("u", "h", None, None).unwrap();
        assert_eq!(store.revision().unwrap(), head + 1);
    }

    #[tokio::test]
    async fn a_waiting_reader_wakes_on_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let registry = SqliteRegistry::new(store.clone());
        // Nothing yet: the wait ends empty-handed.
        assert_eq!(
            registry
                .changes(0, Duration::from_millis(20))
                .await
                .unwrap(),
            None
        );
        let waiter =
            tokio::spawn(async move { registry.changes(0, Duration::from_secs(600)).await });
        // Commit once the reader holds its own watch (it is waiting, or
        // about to read): a condition, not a fixed wait.
        for _ in 0..10_000 {
            if store.commits.receiver_count() >= 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(
            store.commits.receiver_count() >= 2,
            "the reader never started"
        );
        store.put_route(None, "/x", "nobody", "live").ok();
        store.create_token("t", "h", None, None).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the commit woke the reader")
            .unwrap()
            .unwrap();
        assert!(matches!(got, Some(Changes::Batch(b)) if !b.is_empty()));
    }
}
