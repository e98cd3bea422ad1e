//! Events emitted at an edge reach the core's bus, also those emitted while
//! the edge was cut off.
//!
//! - At an edge, [`NatsBus::publish`] appends the events to the edge's own
//!   stream `VERGE_EVENTS` (subject `edge.<site>.verge.events`, one message
//!   per call, `Nats-Msg-Id` from the events' sources and ids): on its disk
//!   at once, whether or not the link is up. Kept 7 days (the longest
//!   outage an edge rides out), at most 256 MiB: a full stream refuses new
//!   events (503) rather than drop stored ones.
//! - The edge sends them on to the core's stream `VERGE_EDGE_EVENTS`
//!   (`edge::push_to_core`) whenever its link is up. Core nodes share one
//!   durable consumer of it: a message is published to the core's bus (triggers
//!   matched there, jobs on `VERGE_JOBS`), then acknowledged. A message
//!   delivered again (a node died between the two) makes the same jobs
//!   again, which the job stream drops (their ids derive from trigger,
//!   source and event id, within its 10-minute duplicate window).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use verge_bus::{Bus, BusError, Published};
use verge_spec::CloudEvent;

use crate::bus::NatsBus;
use crate::{Cluster, ClusterError};

/// An edge's stream of the events emitted there.
pub const EDGE_EVENTS_STREAM: &str = "VERGE_EVENTS";
/// The core's stream of every edge's events.
pub const FROM_EDGES_STREAM: &str = "VERGE_EDGE_EVENTS";
/// Its subject, which edges send their events to.
pub(crate) const FROM_EDGES_SUBJECT: &str = "verge.edge-events";
/// How long an edge keeps events the core has not taken.
const KEEP: Duration = Duration::from_secs(7 * 86_400);
/// How many bytes of events an edge keeps: beyond, new events are refused
/// (503), stored ones never dropped for room.
const EDGE_MAX_BYTES: i64 = 256 << 20;
const CONSUMER: &str = "import";

/// The edge's stream (at an edge) or the core's (on the core).
pub(crate) async fn ensure_stream(
    cluster: &Cluster,
) -> Result<jetstream::stream::Stream, ClusterError> {
    let js = &cluster.js;
    let config = match cluster.site() {
        Some(_) => stream::Config {
            name: EDGE_EVENTS_STREAM.into(),
            description: Some("Verge events emitted at this edge, for the core".into()),
            subjects: vec![cluster.subject("verge.events")],
            max_age: KEEP,
            max_bytes: EDGE_MAX_BYTES,
            discard: stream::DiscardPolicy::New,
            duplicate_window: Duration::from_secs(600),
            storage: stream::StorageType::File,
            ..Default::default()
        },
        None => stream::Config {
            name: FROM_EDGES_STREAM.into(),
            description: Some("Verge events emitted at edges".into()),
            subjects: vec![FROM_EDGES_SUBJECT.into()],
            max_age: KEEP,
            duplicate_window: Duration::from_secs(600),
            num_replicas: cluster.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        },
    };
    let name = config.name.clone();
    js.get_or_create_stream(config)
        .await
        .map_err(|e| ClusterError::Other(format!("could not create the {name} stream: {e}")))
}

/// `Nats-Msg-Id` of a batch of events: the same batch sent twice is one.
fn batch_id(events: &[CloudEvent]) -> String {
    let mut h = Sha256::new();
    for e in events {
        h.update(e.source.as_bytes());
        h.update([0]);
        h.update(e.id.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..16])
}

impl NatsBus {
    /// At an edge: the events go to its stream, for the core.
    pub(crate) fn publish_at_edge(&self, events: &[CloudEvent]) -> Result<Published, BusError> {
        if events.is_empty() {
            return Ok(Published::default());
        }
        let body = serde_json::to_vec(events).map_err(|e| BusError::Corrupt(e.to_string()))?;
        let subject = self.cluster.subject("verge.events");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            batch_id(events).as_str(),
        );
        let js = self.cluster.js.clone();
        self.run(async move {
            let ack = js
                .publish_with_headers(subject, headers, Bytes::from(body))
                .await
                .map_err(|e| BusError::Unavailable(format!("this edge's event stream: {e}")))?;
            ack.await.map_err(|e| {
                BusError::Unavailable(format!(
                    "this edge's event stream did not take the events ({e}); it keeps 7 days of events while the link to the core is cut"
                ))
            })
        })?;
        Ok(Published {
            queued: events.iter().map(|e| format!("edge:{}", e.id)).collect(),
            dead: Vec::new(),
        })
    }

    /// On the core: publishes what edges emitted to this bus, until the
    /// node stops.
    pub(crate) async fn import_edge_events(self: Arc<Self>, from_edges: jetstream::stream::Stream) {
        loop {
            let consumer = match from_edges
                .get_or_create_consumer(
                    CONSUMER,
                    pull::Config {
                        durable_name: Some(CONSUMER.into()),
                        ack_wait: Duration::from_secs(30),
                        ..Default::default()
                    },
                )
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "could not follow the events of the edges; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut messages = match consumer.messages().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "could not follow the events of the edges; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(msg) = messages.next().await {
                let Ok(msg) = msg else { break };
                let events: Vec<CloudEvent> = match serde_json::from_slice(&msg.payload) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(error = %e, "an edge's events do not parse; dropped");
                        let _ = msg.ack().await;
                        continue;
                    }
                };
                let bus = self.clone();
                let published = tokio::task::spawn_blocking(move || bus.publish(&events)).await;
                match published {
                    Ok(Ok(_)) => {
                        let _ = msg.double_ack().await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "could not publish an edge's events; trying again");
                        let _ = msg
                            .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                    }
                    Err(_) => break,
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
