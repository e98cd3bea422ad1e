//! An edge node's side of the cluster. The edge runs beside its own leaf
//! server (JetStream domain `edge-<site>`), linked to the core's servers
//! (domain [`HUB_DOMAIN`]) through a link that may be slow or cut.
//!
//! - The registry and the artifact store are **mirrors** in the leaf's
//!   domain, named as their origins: the edge reads, watches and starts
//!   from them, also after a restart while cut off. Registry writes made at
//!   an edge (a deploy there) go on to the hub's bucket and fail while cut.
//! - The edge's own records (usage and invocation logs) go to its local
//!   `VERGE_USAGE` stream (subjects `edge.<site>.verge.usage.>`), which
//!   the hub's `VERGE_USAGE` sources: what the edge kept through a cut
//!   arrives once the link is back, each record once (ids).
//! - Its job queue and dead letters are its own (`edge.<site>.verge.jobs.>`):
//!   events emitted at an edge run there. Schedules fire on the core only.
//! - Its heartbeat goes to the hub's `verge_nodes`; the link's state is
//!   probed every [`PROBE`].

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, kv, stream};

use crate::edge_events::{EDGE_EVENTS_STREAM, FROM_EDGES_STREAM};
use crate::{
    ARTIFACTS_BUCKET, ClusterError, FormatDoc, HUB_DOMAIN, NODE_TTL, NODES_BUCKET, REGISTRY_BUCKET,
    USAGE_STREAM, edge_domain, unavailable,
};

/// How often an edge checks its link to the hub.
pub const PROBE: Duration = Duration::from_millis(500);
/// How long a first start waits for the mirror to receive the registry (a
/// mirror whose origin was unreachable when it was made tries again after
/// some seconds).
pub(crate) const FIRST_SYNC: Duration = Duration::from_secs(30);

pub(crate) struct Edge {
    pub(crate) site: String,
    /// The hub's JetStream, through the leaf link.
    pub(crate) hub: jetstream::Context,
    /// Since when the link to the hub is cut (`None`: linked).
    cut_since: Mutex<Option<SystemTime>>,
    /// The hub's usage stream sources this edge's.
    sourced: std::sync::atomic::AtomicBool,
    /// The hub's artifact store (opened when first needed).
    hub_objects: tokio::sync::OnceCell<jetstream::object_store::ObjectStore>,
    /// The hub's registry bucket (opened when first needed).
    hub_registry: tokio::sync::OnceCell<kv::Store>,
    /// Told when the link is cut or comes back.
    pub(crate) link_changed: tokio::sync::Notify,
}

/// The hub's JetStream API, as a mirror's or source's origin.
fn hub_api() -> stream::External {
    stream::External {
        api_prefix: format!("$JS.{HUB_DOMAIN}.API"),
        delivery_prefix: None,
    }
}

fn other(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Other(e.to_string())
}

impl Edge {
    /// Checks that the server is the site's leaf server (its own domain).
    pub(crate) async fn open(
        client: async_nats::Client,
        js: &jetstream::Context,
        site: &str,
        url: &str,
    ) -> Result<Edge, ClusterError> {
        let want = edge_domain(site);
        let account = js.query_account().await.map_err(unavailable)?;
        match account.domain.as_deref() {
            Some(d) if d == want => {}
            found => {
                return Err(ClusterError::Other(format!(
                    "the NATS server at {url} has JetStream domain {}, and the edge of site {site:?} needs its own leaf server with domain {want:?} (`jetstream {{ domain: {want} }}`, linked to the hub: see deploy/nats/leaf.conf)",
                    found.map_or("(none)".to_string(), |d| format!("{d:?}"))
                )));
            }
        }
        Ok(Edge {
            site: site.to_string(),
            hub: jetstream::with_domain(client, HUB_DOMAIN),
            cut_since: Mutex::new(Some(SystemTime::now())),
            sourced: Default::default(),
            hub_objects: Default::default(),
            hub_registry: Default::default(),
            link_changed: tokio::sync::Notify::new(),
        })
    }

    /// The registry's mirror (made on the first start).
    pub(crate) async fn registry_mirror(
        &self,
        js: &jetstream::Context,
    ) -> Result<kv::Store, ClusterError> {
        if let Ok(kv) = js.get_key_value(REGISTRY_BUCKET).await {
            return Ok(kv);
        }
        js.create_key_value(kv::Config {
            bucket: REGISTRY_BUCKET.into(),
            description: "Verge registry: mirror of the core's".into(),
            history: 1,
            storage: stream::StorageType::File,
            mirror: Some(stream::Source {
                name: REGISTRY_BUCKET.into(),
                external: Some(hub_api()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map_err(|e| {
            other(format!(
                "could not create the mirror of {REGISTRY_BUCKET}: {e}"
            ))
        })
    }

    /// The node records' mirror (made on the first start): an edge lists
    /// the cluster's nodes from it, also while cut (as last seen).
    pub(crate) async fn nodes_mirror(
        &self,
        js: &jetstream::Context,
    ) -> Result<kv::Store, ClusterError> {
        if let Ok(kv) = js.get_key_value(NODES_BUCKET).await {
            return Ok(kv);
        }
        js.create_key_value(kv::Config {
            bucket: NODES_BUCKET.into(),
            description: "Verge nodes: mirror of the core's".into(),
            history: 1,
            max_age: NODE_TTL,
            storage: stream::StorageType::Memory,
            mirror: Some(stream::Source {
                name: NODES_BUCKET.into(),
                external: Some(hub_api()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map_err(|e| {
            other(format!(
                "could not create the mirror of {NODES_BUCKET}: {e}"
            ))
        })
    }

    /// The artifact store's mirror (made on the first start).
    pub(crate) async fn objects_mirror(
        &self,
        js: &jetstream::Context,
    ) -> Result<jetstream::object_store::ObjectStore, ClusterError> {
        let name = format!("OBJ_{ARTIFACTS_BUCKET}");
        js.get_or_create_stream(stream::Config {
            name: name.clone(),
            description: Some("Verge component bytes: mirror of the core's".into()),
            storage: stream::StorageType::File,
            allow_rollup: true,
            allow_direct: true,
            mirror_direct: true,
            discard: stream::DiscardPolicy::New,
            mirror: Some(stream::Source {
                name: name.clone(),
                external: Some(hub_api()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map_err(|e| other(format!("could not create the mirror {name}: {e}")))?;
        js.get_object_store(ARTIFACTS_BUCKET)
            .await
            .map_err(|e| other(format!("could not open the mirror {name}: {e}")))
    }

    /// The registry's id from the mirror's `format` document: a first start
    /// waits a moment for the mirror to receive it.
    pub(crate) async fn registry_id(&self, registry: &kv::Store) -> Result<String, ClusterError> {
        let until = Instant::now() + FIRST_SYNC;
        let mut said = false;
        loop {
            if let Some(body) = registry.get("format").await.map_err(unavailable)? {
                let doc: FormatDoc = serde_json::from_slice(&body).map_err(|e| {
                    ClusterError::Format(format!(
                        "the registry mirror holds a format document this node cannot read ({e})"
                    ))
                })?;
                crate::check_format(&doc)?;
                return Ok(doc.registry);
            }
            if !said {
                tracing::info!(
                    "waiting for the leaf server to receive the core's registry (a first start)"
                );
                said = true;
            }
            if Instant::now() > until {
                return Err(ClusterError::Unavailable(format!(
                    "this edge's leaf server has no copy of the core's registry yet: link it to the hub (domain {HUB_DOMAIN:?}, see deploy/nats/leaf.conf) and start a core node first; after its first sync an edge starts without the link"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The hub's artifact store: read when the mirror has not received a
    /// component yet (the registry's mirror may be ahead of it).
    pub(crate) async fn hub_objects(
        &self,
    ) -> Result<&jetstream::object_store::ObjectStore, ClusterError> {
        self.hub_objects
            .get_or_try_init(|| async {
                self.hub
                    .get_object_store(ARTIFACTS_BUCKET)
                    .await
                    .map_err(unavailable)
            })
            .await
    }

    /// The hub's registry bucket: a linked edge follows it directly (its
    /// mirror resumes only after the server's retry backoff, up to minutes
    /// after a long cut); the mirror keeps the edge's copy for its starts.
    pub(crate) async fn hub_registry(&self) -> Result<&kv::Store, ClusterError> {
        self.hub_registry
            .get_or_try_init(|| async {
                self.hub
                    .get_key_value(REGISTRY_BUCKET)
                    .await
                    .map_err(unavailable)
            })
            .await
    }

    /// Since when the link to the hub is cut.
    pub(crate) fn cut_since(&self) -> Option<SystemTime> {
        *self
            .cut_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_cut(&self, cut: bool) {
        let mut c = self
            .cut_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match (cut, c.is_some()) {
            (true, false) => {
                tracing::warn!(site = %self.site, "the link to the core is cut; serving from this edge's copies");
                *c = Some(SystemTime::now());
                self.link_changed.notify_waiters();
            }
            (false, true) => {
                tracing::info!(site = %self.site, "linked to the core again");
                *c = None;
                self.link_changed.notify_waiters();
            }
            _ => {}
        }
    }

    /// Asks the hub's JetStream once: updates the link's state.
    pub(crate) async fn probe(&self) -> bool {
        let ok = matches!(
            tokio::time::timeout(PROBE, self.hub.query_account()).await,
            Ok(Ok(_))
        );
        self.set_cut(!ok);
        ok
    }

    /// Makes the hub's streams source this edge's: its usage records and
    /// the events emitted here (once per run; a stream keeps its sources,
    /// and sourcing resumes where it stopped).
    pub(crate) async fn ensure_sourced(&self) -> Result<(), ClusterError> {
        use std::sync::atomic::Ordering;
        if self.sourced.load(Ordering::SeqCst) {
            return Ok(());
        }
        for (hub_stream, edge_stream) in [
            (USAGE_STREAM, USAGE_STREAM),
            (FROM_EDGES_STREAM, EDGE_EVENTS_STREAM),
        ] {
            self.source_into(hub_stream, edge_stream).await?;
        }
        self.sourced.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn source_into(&self, hub_stream: &str, edge_stream: &str) -> Result<(), ClusterError> {
        let api = format!("$JS.{}.API", edge_domain(&self.site));
        // Two edges may add themselves at once: read, add, write, and read
        // again until this edge's source is there.
        for _ in 0..20 {
            let mut s = self.hub.get_stream(hub_stream).await.map_err(unavailable)?;
            let mut config = s.info().await.map_err(unavailable)?.config.clone();
            let sources = config.sources.get_or_insert_with(Vec::new);
            if sources.iter().any(|src| {
                src.name == edge_stream
                    && src.external.as_ref().is_some_and(|x| x.api_prefix == api)
            }) {
                return Ok(());
            }
            sources.push(stream::Source {
                name: edge_stream.into(),
                external: Some(stream::External {
                    api_prefix: api.clone(),
                    delivery_prefix: None,
                }),
                ..Default::default()
            });
            if let Err(e) = self.hub.update_stream(&config).await {
                tracing::debug!(error = %e, stream = hub_stream, "could not add this edge to a stream of the core; trying again");
            }
            let ms = rand::random_range(50..300);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Err(ClusterError::Contended(format!(
            "the sources of the core's {hub_stream}"
        )))
    }
}
