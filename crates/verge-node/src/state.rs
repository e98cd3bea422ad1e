//! The node's shared state: store, host, and the in-memory tables the request
//! path reads (functions ready to run, routes).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

use verge_host::{Function, Host};
use verge_spec::Route;
use verge_store::Store;

/// Everything a handler needs.
pub struct AppState {
    pub(crate) store: Store,
    pub(crate) host: Host,
    pub(crate) data_dir: PathBuf,
    pub(crate) max_upload: usize,
    pub(crate) token_hashes: Vec<String>,
    pub(crate) deploy_lock: tokio::sync::Mutex<()>,
    functions: RwLock<HashMap<String, Function>>,
    routes: RwLock<Arc<Vec<Route>>>,
}

impl AppState {
    pub(crate) fn new(
        store: Store,
        host: Host,
        data_dir: PathBuf,
        max_upload: usize,
        token_hashes: Vec<String>,
    ) -> Self {
        Self {
            store,
            host,
            data_dir,
            max_upload,
            token_hashes,
            deploy_lock: tokio::sync::Mutex::new(()),
            functions: RwLock::default(),
            routes: RwLock::default(),
        }
    }

    pub(crate) fn function(&self, name: &str) -> Option<Function> {
        self.functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    pub(crate) fn install(&self, function: Function) {
        self.functions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(function.name.clone(), function);
    }

    pub(crate) fn uninstall(&self, name: &str) {
        self.functions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }

    pub(crate) fn function_count(&self) -> usize {
        self.functions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Reloads the route table from the store.
    pub(crate) fn refresh_routes(&self) -> Result<(), verge_store::StoreError> {
        let mut routes = self.store.routes()?;
        // Most specific first: host-bound before any-host, then longer paths.
        routes.sort_by(|a, b| {
            b.host
                .is_some()
                .cmp(&a.host.is_some())
                .then(b.path.len().cmp(&a.path.len()))
        });
        *self.routes.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(routes);
        Ok(())
    }

    /// The route serving `host` + `path`, if any.
    pub(crate) fn match_route(&self, host: Option<&str>, path: &str) -> Option<Route> {
        let routes = self
            .routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        routes
            .iter()
            .find(|r| {
                let host_ok = match (&r.host, host) {
                    (None, _) => true,
                    (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                    (Some(_), None) => false,
                };
                host_ok && verge_spec::path_matches(&r.path, path)
            })
            .cloned()
    }
}
