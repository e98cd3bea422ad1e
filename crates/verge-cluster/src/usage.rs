//! Usage and invocation records across the cluster: stream `VERGE_USAGE`,
//! subject `verge.usage.<hex of the node's name>`, messages of up to about
//! 512 KiB of records (a JSON array) with `Nats-Msg-Id` = the node and the
//! span of rowids it carries (the stream drops a re-send of the same span
//! within its duplicate window; the importers' `INSERT OR IGNORE` by
//! invocation id drops any other double).
//! Each node publishes what it committed itself, after a durable cursor, and
//! imports everyone else's into its own SQLite (`verge_store::usage_feed`),
//! so `verge usage` and `verge invocations` on any node count every node's
//! invocations once.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use futures::StreamExt;
use verge_spec::UsageRecord;
use verge_store::Store;

use crate::{Cluster, ClusterError};

/// The stream.
pub const USAGE_STREAM: &str = "VERGE_USAGE";
/// How long the stream keeps records (nodes that join later import this much).
pub const USAGE_KEEP: Duration = Duration::from_secs(7 * 86_400);
/// How many bytes of records the stream keeps.
pub const USAGE_MAX_BYTES: i64 = 4 << 30;
/// Records read to publish, or imported, per batch.
const BATCH: usize = 2000;
/// Bytes of records per message, about.
const MESSAGE_BYTES: usize = 512 << 10;

fn subject_of(prefix: &str, node: &str) -> String {
    format!("{prefix}verge.usage.{}", hex::encode(node.as_bytes()))
}

/// The usage stream: `prefix` is empty on the core, `edge.<site>.` at an
/// edge (whose stream it sends on to the core's).
pub(crate) async fn ensure_stream(
    js: &jetstream::Context,
    replicas: usize,
    prefix: &str,
) -> Result<jetstream::stream::Stream, ClusterError> {
    // A stream's size is reserved on the servers' disks when it is created:
    // where 4 GiB cannot be reserved, a smaller bound, said at start.
    let mut last = String::new();
    for max_bytes in [USAGE_MAX_BYTES, 1 << 30, 256 << 20] {
        let created = js
            .get_or_create_stream(jetstream::stream::Config {
                name: USAGE_STREAM.into(),
                description: Some("Verge usage and invocation records of every node".into()),
                subjects: vec![format!("{prefix}verge.usage.>")],
                max_age: USAGE_KEEP,
                // The oldest go first beyond it: every node keeps its own
                // records on its disk (`--retain-size`), and a node this far
                // behind misses the oldest of the others'.
                max_bytes,
                // At an edge, a full stream refuses: its records wait in the
                // node's database until old ones age out.
                discard: if prefix.is_empty() {
                    jetstream::stream::DiscardPolicy::Old
                } else {
                    jetstream::stream::DiscardPolicy::New
                },
                num_replicas: replicas,
                storage: jetstream::stream::StorageType::File,
                duplicate_window: Duration::from_secs(600),
                ..Default::default()
            })
            .await;
        match created {
            Ok(stream) => {
                if max_bytes < USAGE_MAX_BYTES {
                    tracing::warn!(
                        max_mib = max_bytes >> 20,
                        "the NATS servers cannot reserve 4 GiB for {USAGE_STREAM}; it keeps at most this much (give the servers more JetStream storage: max_file_store)"
                    );
                }
                return Ok(stream);
            }
            Err(e) if e.to_string().contains("insufficient storage") => last = e.to_string(),
            Err(e) => {
                return Err(ClusterError::Other(format!(
                    "could not create the {USAGE_STREAM} stream: {e}"
                )));
            }
        }
    }
    Err(ClusterError::Other(format!(
        "could not create the {USAGE_STREAM} stream: {last}; give the NATS servers more JetStream storage (max_file_store) or disk"
    )))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, verge_store::StoreError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

impl Cluster {
    /// Publishes this node's records and imports the others' until
    /// [`Cluster::close`].
    pub fn share_usage(self: &Arc<Self>, store: Arc<Store>, node: &str) {
        let publisher = tokio::spawn(self.clone().publish_usage(store.clone(), node.to_string()));
        let importer = tokio::spawn(self.clone().import_usage(store, node.to_string()));
        let mut tasks = self
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tasks.push(publisher);
        tasks.push(importer);
    }

    async fn publish_usage(self: Arc<Self>, store: Arc<Store>, node: String) {
        let subject = subject_of(&self.prefix, &node);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if self.down_since().is_some() {
                continue;
            }
            let s = store.clone();
            let batch = match blocking(move || {
                let (after, _) = s.usage_cursor()?;
                s.own_records_after(after, BATCH)
            })
            .await
            {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "could not read usage records to publish");
                    continue;
                }
            };
            let Some(last) = batch.last().map(|(rowid, _)| *rowid) else {
                continue;
            };
            // Records go in messages of up to ~512 KiB (a record's output is
            // at most a few hundred KiB): one publish and one fsync per
            // message, not per invocation. A message's id names its first and
            // last rowid, so a re-send of the same span is dropped by the
            // stream; any other overlap by the importers' ids.
            let mut acks = Vec::new();
            let mut failed = None;
            let mut chunk: Vec<&UsageRecord> = Vec::new();
            let mut bytes = 0;
            let mut first = batch.first().map(|(r, _)| *r).unwrap_or(0);
            for (i, (rowid, record)) in batch.iter().enumerate() {
                chunk.push(record);
                bytes += record.stdout.as_ref().map_or(0, String::len)
                    + record.stderr.as_ref().map_or(0, String::len)
                    + 400;
                let end = i + 1 == batch.len();
                if bytes < MESSAGE_BYTES && !end {
                    continue;
                }
                let Ok(body) = serde_json::to_vec(&chunk) else {
                    chunk.clear();
                    continue;
                };
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(
                    async_nats::header::NATS_MESSAGE_ID,
                    format!("{node}-{first}-{rowid}").as_str(),
                );
                match self
                    .js
                    .publish_with_headers(subject.clone(), headers, body.into())
                    .await
                {
                    Ok(ack) => acks.push(ack),
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
                chunk.clear();
                bytes = 0;
                first = rowid + 1;
            }
            for ack in acks {
                if let Err(e) = ack.await {
                    failed.get_or_insert(e.to_string());
                }
            }
            if let Some(e) = failed {
                // Sent again next round: the stream and the importers drop doubles.
                tracing::debug!(error = %e, "usage records not published yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            let s = store.clone();
            if let Err(e) = blocking(move || s.set_published(last)).await {
                tracing::warn!(error = %e, "could not note the published usage records");
            }
        }
    }

    async fn import_usage(self: Arc<Self>, store: Arc<Store>, node: String) {
        let own = subject_of(&self.prefix, &node);
        loop {
            let s = store.clone();
            let from = match blocking(move || s.usage_cursor()).await {
                Ok((_, position)) => position + 1,
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the usage import position");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let consumer = match self
                .usage
                .create_consumer(OrderedConfig {
                    // Everything under `verge.usage.>`, edges' records too
                    // (they send them on to the core's stream).
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: from,
                    },
                    ..Default::default()
                })
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "could not follow the usage stream; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut messages = match consumer.messages().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "could not follow the usage stream; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut batch: Vec<(String, UsageRecord)> = Vec::new();
            let mut imported = from.saturating_sub(1);
            let mut position = imported;
            let mut stall = Stall::default();
            loop {
                let next = tokio::time::timeout(Duration::from_millis(50), messages.next()).await;
                let (quiet, ended) = match next {
                    Ok(Some(Ok(msg))) => {
                        if let Ok(info) = msg.info() {
                            position = position.max(info.stream_sequence);
                        }
                        if msg.subject.as_str() != own {
                            let origin = msg
                                .subject
                                .as_str()
                                .rsplit('.')
                                .next()
                                .and_then(|h| hex::decode(h).ok())
                                .and_then(|b| String::from_utf8(b).ok())
                                .unwrap_or_default();
                            match serde_json::from_slice::<Vec<UsageRecord>>(&msg.payload) {
                                Ok(rs) => batch.extend(rs.into_iter().map(|r| (origin.clone(), r))),
                                Err(e) => {
                                    tracing::warn!(error = %e, "a usage record in the stream is unreadable; skipped")
                                }
                            }
                        }
                        (false, false)
                    }
                    Ok(Some(Err(e))) => {
                        tracing::debug!(error = %e, "the usage stream's consumer failed; reopening it");
                        (false, true)
                    }
                    Ok(None) => (false, true),
                    // Quiet for 50 ms: import what came.
                    Err(_) => (true, false),
                };
                if (batch.len() >= BATCH || quiet || ended) && position > imported {
                    let records = std::mem::take(&mut batch);
                    let s = store.clone();
                    if let Err(e) = blocking(move || s.import_records(&records, position)).await {
                        tracing::warn!(error = %e, "could not import usage records; reading them again");
                        break;
                    }
                    imported = position;
                }
                if ended {
                    break;
                }
                if quiet && stall.due() && stall.stalled(&self.usage, position).await {
                    tracing::warn!(
                        position,
                        "the usage stream's consumer stalled; reopening it"
                    );
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Finds a stream consumer that stopped delivering without an error (its
/// server died and the client moved to another): checked every
/// [`crate::STALL_CHECK`] against the stream's last sequence, stalled when
/// two checks in a row find it behind at the same position.
#[derive(Default)]
pub(crate) struct Stall {
    checked: Option<std::time::Instant>,
    behind_at: Option<u64>,
}

impl Stall {
    /// Time for a check?
    pub(crate) fn due(&mut self) -> bool {
        let now = std::time::Instant::now();
        match self.checked {
            Some(t) if now.duration_since(t) < crate::STALL_CHECK => false,
            _ => {
                self.checked = Some(now);
                true
            }
        }
    }

    /// Is a consumer at `position` (the last stream sequence it delivered)
    /// stalled?
    pub(crate) async fn stalled(
        &mut self,
        stream: &jetstream::stream::Stream,
        position: u64,
    ) -> bool {
        let mut stream = stream.clone();
        let Ok(info) = stream.info().await else {
            return false;
        };
        if info.state.last_sequence <= position {
            self.behind_at = None;
            return false;
        }
        if self.behind_at == Some(position) {
            return true;
        }
        self.behind_at = Some(position);
        false
    }
}
