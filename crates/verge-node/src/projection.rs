//! The node's in-memory tables (functions with their versions and aliases,
//! routes, token hashes) as a projection of the registry's change feed.
//!
//! One task follows the feed and reloads each subject a change names; no
//! handler patches the tables. A handler that wrote to the registry brings
//! the tables up to the registry's head itself before it answers
//! ([`AppState::caught_up`]), so that its client's next request sees the
//! write, also before the follower runs (`verge up --example`). Changes made
//! by anyone else (another node, once the registry is shared) arrive
//! through the follower. Reloading a subject is idempotent: applying a
//! change twice, or a later state early, is harmless.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use verge_store::{Changes, FunctionState, StoreError, Subject};

use crate::error::ApiError;
use crate::state::{AppState, FunctionEntry};

/// How long a wait for the feed lasts before it is asked again (it also
/// bounds how late a lost wake-up can make a change).
const WAIT: Duration = Duration::from_secs(1);

/// How long a handler waits for the projection to apply its write.
const CATCH_UP: Duration = Duration::from_secs(10);

/// How long a component no version references stays stored before it is
/// deleted: a deploy of the same bytes on another node that found them
/// stored writes its version well within it.
pub(crate) const ARTIFACT_GRACE: Duration = Duration::from_secs(5);

/// Of `shas`, those no version in `functions` references (each once).
fn unreferenced(
    functions: &HashMap<String, FunctionEntry>,
    shas: impl Iterator<Item = String>,
) -> Vec<String> {
    let used: std::collections::HashSet<&str> = functions
        .values()
        .flat_map(|f| f.versions.values().map(|v| v.stored.sha256.as_str()))
        .collect();
    let mut out: Vec<String> = shas.filter(|s| !used.contains(s.as_str())).collect();
    out.sort();
    out.dedup();
    out
}

impl AppState {
    /// Loads every subject as of the registry's head: at start, and when the
    /// feed no longer reaches back to the last revision applied.
    pub(crate) async fn reload_all(&self) -> Result<u64, StoreError> {
        let head = self.registry.head().await?;
        let functions = self.registry.functions().await?;
        let routes = self.registry.routes().await?;
        let tokens = self.registry.token_hashes().await?;
        let names: BTreeSet<String> = functions.iter().map(|f| f.name.clone()).collect();
        let gone: Vec<String> = self
            .function_names()
            .into_iter()
            .filter(|n| !names.contains(n))
            .collect();
        for name in gone {
            self.apply_function(&name, None);
        }
        for f in functions {
            let name = f.name.clone();
            self.apply_function(&name, Some(f));
        }
        self.set_routes(routes);
        self.set_token_hashes(tokens);
        self.reload_secrets().await?;
        self.applied.send_replace(head);
        Ok(head)
    }

    /// The sealed secrets as the registry (this node's database or replica)
    /// has them.
    async fn reload_secrets(&self) -> Result<(), StoreError> {
        let store = self.store.clone();
        let rows = tokio::task::spawn_blocking(move || store.secrets())
            .await
            .map_err(|e| StoreError::Corrupt(format!("reading the secrets: {e}")))??;
        self.secrets.reload(rows);
        Ok(())
    }

    /// Applies every change after the revision applied so far, up to the
    /// registry's head as of the call. One caller at a time: the follower
    /// and handlers that wait for their own writes share it.
    async fn catch_up(&self) -> Result<(), StoreError> {
        let head = self.registry.head().await?;
        let _one = self.applying.lock().await;
        loop {
            let at = *self.applied.borrow();
            if at >= head {
                return Ok(());
            }
            let batch = match self.registry.changes(at, Duration::ZERO).await? {
                // Below the head, yet nothing after it: the log was replaced.
                None => {
                    self.reload_all().await?;
                    return Ok(());
                }
                Some(Changes::Gap(_)) => {
                    tracing::info!(
                        revision = at,
                        "the registry's log no longer reaches back to this node's tables; reloading them whole"
                    );
                    self.reload_all().await?;
                    return Ok(());
                }
                Some(Changes::Batch(b)) => b,
            };
            let Some(last) = batch.last().map(|c| c.revision) else {
                return Ok(());
            };
            // Each subject once, however often it changed.
            let subjects: BTreeSet<Subject> = batch.into_iter().map(|c| c.subject).collect();
            for subject in subjects {
                match subject {
                    Subject::Function(name) => {
                        let state = self.registry.function(&name).await?;
                        self.apply_function(&name, state);
                    }
                    Subject::Routes => {
                        let routes = self.registry.routes().await?;
                        self.set_routes(routes);
                    }
                    Subject::Tokens => {
                        let tokens = self.registry.token_hashes().await?;
                        self.set_token_hashes(tokens);
                    }
                    Subject::Secrets => self.reload_secrets().await?,
                }
            }
            self.applied.send_replace(last);
        }
    }

    /// Replaces one function's entry by the registry's: versions still there
    /// keep their slots (loaded code, concurrency), new ones get a slot with
    /// the code a deploy on this node loaded, if any.
    pub(crate) fn apply_function(&self, name: &str, state: Option<FunctionState>) {
        let mut functions = self
            .functions
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(state) = state else {
            if let Some(old) = functions.remove(name) {
                self.admission.forget(name);
                self.metrics.forget(name);
                let gone = old.versions.values().map(|v| v.stored.sha256.clone());
                let gone = unreferenced(&functions, gone);
                drop(functions);
                self.collect_artifacts(gone);
            }
            return;
        };
        let old = functions.remove(name).unwrap_or_default();
        let kept: std::collections::HashSet<&str> =
            state.versions.iter().map(|v| v.sha256.as_str()).collect();
        let gone: Vec<String> = old
            .versions
            .values()
            .map(|v| v.stored.sha256.clone())
            .filter(|sha| !kept.contains(sha.as_str()))
            .collect();
        let mut entry = FunctionEntry::default();
        // Loaded ahead (a cluster node): the newest version and those an
        // alias sends traffic to, not every old one.
        let newest = state.versions.iter().map(|v| v.version).max();
        let aliased: std::collections::HashSet<u64> = state
            .aliases
            .iter()
            .flat_map(|(_, t)| {
                std::iter::once(t.version).chain(t.canary.as_ref().map(|c| c.version))
            })
            .collect();
        for v in state.versions {
            let slot = match old.versions.get(&v.version) {
                // Versions are immutable: the same number with the same
                // record is the same version (a function deleted and
                // created again between two reads may reuse a number).
                Some(slot) if slot.stored == v => slot.clone(),
                _ => {
                    let loaded = self
                        .preloaded
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get(&v.sha256)
                        .cloned()
                        .map(|c| self.function_of(&v, c));
                    let slot = self.slot(v.clone(), loaded);
                    // On a cluster, a version placed here is loaded before
                    // its first request, so that the node can say it is
                    // ready (`verge deploy --wait`).
                    if self.cluster.is_some()
                        && slot.tier().is_none()
                        && (Some(v.version) == newest || aliased.contains(&v.version))
                        && verge_spec::placed_on(&v.placement, &self.labels)
                    {
                        self.to_prepare
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(slot.clone());
                        self.prepare.notify_one();
                    }
                    slot
                }
            };
            entry.versions.insert(v.version, slot);
        }
        entry.aliases = state.aliases.into_iter().collect::<HashMap<_, _>>();
        // Versions retention removed take their metric series along.
        let removed: Vec<u64> = old
            .versions
            .keys()
            .filter(|v| !entry.versions.contains_key(v))
            .copied()
            .collect();
        if !removed.is_empty() {
            self.metrics.forget_versions(name, &removed);
        }
        functions.insert(name.to_string(), entry);
        if !gone.is_empty() {
            let gone = unreferenced(&functions, gone.into_iter());
            drop(functions);
            self.collect_artifacts(gone);
        }
    }

    /// Components no version references any more, whoever removed their
    /// versions (this node or another): their compiled code goes now; after
    /// [`ARTIFACT_GRACE`], if the registry still references none of them,
    /// their bytes go from this node's disk and from the cluster's store.
    fn collect_artifacts(&self, shas: Vec<String>) {
        if shas.is_empty() {
            return;
        }
        for sha in &shas {
            self.host.forget(sha);
        }
        let (store, artifacts) = (self.store.clone(), self.artifacts.clone());
        tokio::spawn(async move {
            tokio::time::sleep(ARTIFACT_GRACE).await;
            let removed =
                tokio::task::spawn_blocking(move || store.remove_unreferenced_artifacts(&shas))
                    .await;
            let Ok(Ok(removed)) = removed else {
                tracing::warn!("could not collect unreferenced artifacts");
                return;
            };
            for sha in removed {
                if let Err(e) = artifacts.remove(&sha).await {
                    tracing::warn!(%sha, error = %e, "could not delete an unreferenced artifact");
                }
            }
        });
    }

    fn set_token_hashes(&self, tokens: Vec<verge_store::TokenHash>) {
        *self
            .token_hashes
            .write()
            .unwrap_or_else(PoisonError::into_inner) = tokens;
    }

    /// Runs a registry write: on this node's own store, or for the whole
    /// cluster (rehearsed on this node's replica, stored by compare-and-set
    /// in NATS, see `verge_cluster::Cluster::write`). Returns once this
    /// node's tables have applied it, so that the client's next request
    /// sees it. `op` may run more than once on a cluster (when another node
    /// wrote first), never with a result kept but the last.
    pub(crate) async fn write<R: Send + 'static>(
        &self,
        op: impl Fn(&verge_store::Store) -> Result<R, StoreError> + Send + Sync + 'static,
    ) -> Result<R, ApiError> {
        let out = match &self.cluster {
            None => {
                let s = self.store.clone();
                crate::api::blocking(move || Ok(op(&s)?)).await?
            }
            Some(c) => c.write(&self.store, op).await?,
        };
        self.caught_up().await?;
        Ok(out)
    }

    /// Brings the tables up to every change the registry holds now: a
    /// handler calls it after its write, before it answers, so that its
    /// client's next request sees the write.
    pub(crate) async fn caught_up(&self) -> Result<(), ApiError> {
        match tokio::time::timeout(CATCH_UP, self.catch_up()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ApiError::Internal(format!(
                "the change was stored, but this node's tables could not apply it: {e}"
            ))),
            Err(_) => Err(ApiError::Internal(format!(
                "the change was stored, but this node's tables did not apply it within {}s; the node log says why",
                CATCH_UP.as_secs()
            ))),
        }
    }
}

/// Follows the registry's feed for the life of the node: waits for a change
/// after the revision applied, then catches up. A failed read is logged and
/// retried; the tables keep what they have meanwhile.
pub(crate) async fn follow(state: Arc<AppState>) {
    let mut failing = false;
    loop {
        let at = *state.applied.borrow();
        let step = async {
            if state.registry.changes(at, WAIT).await?.is_some() {
                state.catch_up().await?;
            }
            Ok::<_, StoreError>(())
        };
        match step.await {
            Ok(()) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, revision = at, "could not read the registry's changes; requests are served from the tables as they are, retrying");
                }
                failing = true;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Loads the versions the tables took in ahead of their first request (a
/// cluster node), one at a time, and tells the cluster at once when one is
/// ready.
pub(crate) async fn prepare(state: Arc<AppState>) {
    loop {
        state.prepare.notified().await;
        loop {
            let next = state
                .to_prepare
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let Some(slot) = next else { break };
            match state.load(&slot).await {
                Ok(_) => {
                    if let Some(c) = &state.cluster {
                        c.beat_now();
                    }
                }
                Err(e) => {
                    tracing::warn!(function = %slot.stored.function, version = slot.stored.version, error = %e, "could not load a new version ahead of its first request")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Selector;

    const HELLO: &[u8] = include_bytes!("../../../examples/hello.wasm");

    async fn eventually(what: &str, f: impl Fn() -> bool) {
        for _ in 0..1000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{what}: never reached the node's tables");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_no_handler_made_reach_the_tables_through_the_feed() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::NodeConfig::new(dir.path());
        config.listen = "127.0.0.1:0".parse().unwrap();
        let node = crate::Node::start(config).await.unwrap();
        node.deploy("f", HELLO.to_vec(), Some("/f")).await.unwrap();
        let state = node.state.clone();
        // The follower runs from here on.
        let _running = node.in_process();
        let live = |s: &AppState| {
            s.resolve("f", Selector::Alias("live"), |_| None)
                .ok()
                .map(|v| v.stored.version)
        };
        assert_eq!(live(&state), Some(1));

        // Written to the registry with no handler involved, as another
        // node's writes arrive: a route, a new live version, a token.
        let store = state.store.clone();
        store.put_route(None, "/g", "f", "live").unwrap();
        eventually("a route", || state.match_route(None, "/g/x").is_some()).await;

        let sha = store.put_artifact(HELLO).unwrap();
        let env = vec![("K".to_string(), "v".to_string())];
        let created = store
            .create_version(&verge_store::NewVersion {
                function: "f",
                sha256: &sha,
                size: HELLO.len() as u64,
                env: &env,
                limits: verge_store::Limits::default(),
                buckets: &[],
                tenant: "default",
                placement: &[],
                grants: &verge_spec::NO_GRANTS,
                routes: &[],
                deployed_by: "test",
                promote: true,
            })
            .unwrap();
        assert_eq!(created.version, 2);
        eventually("a new live version", || live(&state) == Some(2)).await;
        // The version already held kept its slot.
        assert!(state.resolve("f", Selector::Version(1), |_| None).is_ok());

        store
            .create_token("other", "hash-of-other", None, None)
            .unwrap();
        eventually("a token", || {
            state
                .token_hashes
                .read()
                .unwrap()
                .iter()
                .any(|t| t.name == "other")
        })
        .await;

        store.delete_function("f").unwrap();
        // Its routes went with it (one transaction, applied in one batch).
        eventually("a deleted function and its routes", || {
            !state.has_function("f")
                && state.match_route(None, "/g/x").is_none()
                && state.match_route(None, "/f").is_none()
        })
        .await;
    }
}
