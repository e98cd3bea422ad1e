//! The node's shared state: store, host, and the in-memory tables the request
//! path reads (functions ready to run, routes).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

use verge_host::{Function, Host};
use verge_spec::Route;
use verge_store::{Ledger, Store};

/// Node-wide limits: defaults for versions that set none, and ceilings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ceilings {
    pub timeout: std::time::Duration,
    pub memory: usize,
}

/// The price table (defaults priced like Lambda on x86).
#[derive(Debug, Clone, Copy)]
pub struct Prices {
    pub per_million_requests: f64,
    pub per_gb_second: f64,
}

impl Default for Prices {
    fn default() -> Self {
        Self {
            per_million_requests: 0.20,
            per_gb_second: 0.000_016_666_7,
        }
    }
}

/// The node's settings as handlers see them.
pub(crate) struct Settings {
    pub data_dir: PathBuf,
    pub max_upload: usize,
    pub token_hashes: Vec<String>,
    pub ceilings: Ceilings,
    pub prices: Prices,
}

/// Everything a handler needs.
pub struct AppState {
    pub(crate) store: Store,
    pub(crate) host: Host,
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) data_dir: PathBuf,
    pub(crate) max_upload: usize,
    pub(crate) token_hashes: Vec<String>,
    pub(crate) deploy_lock: tokio::sync::Mutex<()>,
    pub(crate) ceilings: Ceilings,
    pub(crate) prices: Prices,
    functions: RwLock<HashMap<String, Function>>,
    routes: RwLock<Arc<Vec<Route>>>,
}

impl AppState {
    pub(crate) fn new(store: Store, host: Host, ledger: Arc<Ledger>, settings: Settings) -> Self {
        Self {
            store,
            host,
            ledger,
            data_dir: settings.data_dir,
            max_upload: settings.max_upload,
            token_hashes: settings.token_hashes,
            deploy_lock: tokio::sync::Mutex::new(()),
            ceilings: settings.ceilings,
            prices: settings.prices,
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
