//! An edge node's side of the cluster. The edge runs beside its own leaf
//! server (JetStream domain `edge-<site>`), linked to the core's servers
//! (domain [`HUB_DOMAIN`]) through a link that may be slow or cut.
//!
//! - The registry and the artifact store are **mirrors** in the leaf's
//!   domain, named as their origins: the edge reads, watches and starts
//!   from them, also after a restart while cut off. Registry writes made at
//!   an edge (a deploy there) go on to the hub's bucket and fail while cut.
//! - The edge's own records (usage and invocation logs) go to its local
//!   `VERGE_USAGE` stream (subjects `edge.<site>.verge.usage.>`), which it
//!   sends on to the hub's `VERGE_USAGE` whenever the link is up
//!   ([`push_to_core`]; a server's sourcing would resume after a long cut
//!   only on its retry backoff, up to minutes): what the edge kept through
//!   a cut arrives once the link is back, each record once (ids).
//! - Its job queue and dead letters are its own (`edge.<site>.verge.jobs.>`):
//!   events emitted at an edge run there. Schedules fire on the core only.
//! - Its heartbeat goes to the hub's `verge_nodes`; the link's state is
//!   probed every [`PROBE`].

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, kv, stream};

use crate::{
    ARTIFACTS_BUCKET, ClusterError, FormatDoc, HUB_DOMAIN, NODE_TTL, NODES_BUCKET, REGISTRY_BUCKET,
    edge_domain, unavailable,
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
    /// The hub's artifact store (opened when first needed).
    hub_objects: tokio::sync::OnceCell<jetstream::object_store::ObjectStore>,
    /// The hub's registry bucket (opened when first needed).
    hub_registry: tokio::sync::OnceCell<kv::Store>,
    /// Told when the link is cut or comes back.
    pub(crate) link_changed: tokio::sync::Notify,
}

/// The mirror of the hub's bucket of the same name (`config` without its
/// mirror), made if it is not there yet.
async fn kv_mirror(
    js: &jetstream::Context,
    mut config: kv::Config,
) -> Result<kv::Store, ClusterError> {
    let bucket = config.bucket.clone();
    if let Ok(kv) = js.get_key_value(bucket.as_str()).await {
        return Ok(kv);
    }
    config.history = 1;
    config.mirror = Some(stream::Source {
        name: bucket.clone(),
        external: Some(hub_api()),
        ..Default::default()
    });
    js.create_key_value(config)
        .await
        .map_err(|e| other(format!("could not create the mirror of {bucket}: {e}")))
}

/// The hub's JetStream API, as a mirror's origin.
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
        kv_mirror(
            js,
            kv::Config {
                bucket: REGISTRY_BUCKET.into(),
                description: "Verge registry: mirror of the core's".into(),
                storage: stream::StorageType::File,
                ..Default::default()
            },
        )
        .await
    }

    /// The node records' mirror (made on the first start): an edge lists
    /// the cluster's nodes from it, also while cut (as last seen).
    pub(crate) async fn nodes_mirror(
        &self,
        js: &jetstream::Context,
    ) -> Result<kv::Store, ClusterError> {
        kv_mirror(
            js,
            kv::Config {
                bucket: NODES_BUCKET.into(),
                description: "Verge nodes: mirror of the core's".into(),
                max_age: NODE_TTL,
                storage: stream::StorageType::Memory,
                ..Default::default()
            },
        )
        .await
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
}

/// Sends what an edge's stream `local` holds on to the core, oldest first,
/// each message to `subject` (which a stream of the core's takes; `None`:
/// its own subject without the edge's `edge.<site>.` prefix) with its
/// `Nats-Msg-Id`, then acknowledges it locally (durable consumer
/// `to-core`): what the edge kept through a cut goes on as soon as the
/// link is back. A message sent again (a crash between the two) is dropped
/// by the core's stream within its duplicate window, and by ids after it.
pub(crate) async fn push_to_core(
    cluster: std::sync::Weak<crate::Cluster>,
    local: jetstream::stream::Stream,
    subject: Option<String>,
) {
    use futures::StreamExt;
    use jetstream::consumer::pull;
    let consumer = loop {
        match local
            .get_or_create_consumer(
                "to-core",
                pull::Config {
                    durable_name: Some("to-core".into()),
                    ack_wait: Duration::from_secs(30),
                    ..Default::default()
                },
            )
            .await
        {
            Ok(c) => break c,
            Err(e) => {
                tracing::debug!(error = %e, "could not follow this edge's stream; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    loop {
        let Some(c) = cluster.upgrade() else { return };
        let prefix = c.prefix.clone();
        let hub = match &c.edge {
            Some(e) if e.cut_since().is_none() => e.hub.clone(),
            _ => {
                drop(c);
                tokio::time::sleep(PROBE).await;
                continue;
            }
        };
        drop(c);
        let batch = match consumer
            .fetch()
            .max_messages(100)
            .expires(Duration::from_secs(1))
            .messages()
            .await
        {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "could not read this edge's stream; retrying");
                tokio::time::sleep(PROBE).await;
                continue;
            }
        };
        let messages: Vec<_> = batch.collect().await;
        for m in messages {
            let Ok(m) = m else { break };
            let mut headers = async_nats::HeaderMap::new();
            if let Some(id) = m
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            {
                headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
            }
            let to = match &subject {
                Some(s) => s.clone(),
                None => m
                    .subject
                    .as_str()
                    .strip_prefix(prefix.as_str())
                    .unwrap_or(m.subject.as_str())
                    .to_string(),
            };
            let sent = match hub
                .publish_with_headers(to, headers, m.payload.clone())
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match sent {
                Ok(()) => {
                    let _ = m.double_ack().await;
                }
                Err(e) => {
                    // Sent again after the ack wait, or at once when the
                    // link is back (this loop waits for it).
                    tracing::debug!(error = %e, "the core did not take an entry of this edge's stream yet");
                    let _ = m
                        .ack_with(jetstream::AckKind::Nak(Some(Duration::from_millis(500))))
                        .await;
                    break;
                }
            }
        }
    }
}
