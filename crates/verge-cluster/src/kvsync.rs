//! Key-value replication over NATS request/reply: `verge-kv`'s sync
//! protocol (hello, push, pull, digest repair, snapshots) carried by core
//! NATS instead of HTTP. JetStream KV is not used for the data itself: its
//! minority side cannot write, and a CRDT's can; NATS carries the messages,
//! `verge-kv` merges.
//!
//! Each node answers on `verge.kv.<hex of its name>.<op>`; a node syncs with
//! every other node whose heartbeat is fresh (`verge_nodes`). One message
//! carries up to about 4 MiB of values (`verge_kv::BATCH_BYTES`), and one
//! value may be 8 MiB: the servers must allow payloads of [`NEEDED_PAYLOAD`]
//! (`max_payload: 16MB`, as the configs in `deploy/nats/` set).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use verge_kv::Kv;
use verge_kv::sync::{
    Hello, HelloReply, Local, Pull, Pulled, Push, PushReply, RangeRequest, SnapshotPage,
    SnapshotRequest, SyncError, Transport,
};

use crate::Cluster;

/// The payload a server must accept for key-value sync.
pub const NEEDED_PAYLOAD: usize = 16 << 20;
/// How long one sync request may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn subject(node: &str, op: &str) -> String {
    format!("verge.kv.{}.{op}", hex::encode(node.as_bytes()))
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply<T> {
    Ok(T),
    Refused(String),
    Error(String),
}

/// The sync protocol to one peer node, over NATS (blocking calls, as
/// `verge_kv::sync::Syncer` makes them: run it on the blocking pool).
pub struct NatsKvTransport {
    client: async_nats::Client,
    peer: String,
    rt: tokio::runtime::Handle,
}

impl NatsKvTransport {
    pub fn new(cluster: &Cluster, peer: &str) -> Self {
        Self {
            client: cluster.client.clone(),
            peer: peer.to_string(),
            rt: tokio::runtime::Handle::current(),
        }
    }

    fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        op: &str,
        req: &Req,
    ) -> Result<Resp, SyncError> {
        let body = serde_json::to_vec(req).map_err(|e| SyncError::Link(e.to_string()))?;
        let subject = subject(&self.peer, op);
        let msg = self.rt.block_on(async {
            tokio::time::timeout(CALL_TIMEOUT, self.client.request(subject, body.into())).await
        });
        let msg = match msg {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return Err(SyncError::Link(format!("{op} to {}: {e}", self.peer))),
            Err(_) => return Err(SyncError::Link(format!("{op} to {}: no answer", self.peer))),
        };
        match serde_json::from_slice::<Reply<Resp>>(&msg.payload) {
            Ok(Reply::Ok(v)) => Ok(v),
            Ok(Reply::Refused(s)) => Err(SyncError::Refused(s)),
            Ok(Reply::Error(s)) => Err(SyncError::Link(s)),
            Err(e) => Err(SyncError::Link(format!(
                "{op} from {}: unreadable reply: {e}",
                self.peer
            ))),
        }
    }
}

impl Transport for NatsKvTransport {
    fn hello(&self, req: &Hello) -> Result<HelloReply, SyncError> {
        self.call("hello", req)
    }
    fn push(&self, req: &Push) -> Result<PushReply, SyncError> {
        self.call("push", req)
    }
    fn pull(&self, req: &Pull) -> Result<Pulled, SyncError> {
        self.call("pull", req)
    }
    fn buckets(&self) -> Result<Vec<String>, SyncError> {
        self.call("buckets", &())
    }
    fn digest(&self, bucket: &str) -> Result<Vec<String>, SyncError> {
        self.call("digest", &bucket)
    }
    fn ranges(&self, req: &RangeRequest) -> Result<Vec<Delta>, SyncError> {
        self.call("ranges", req)
    }
    fn snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotPage, SyncError> {
        self.call("snapshot", req)
    }
}

use verge_kv::Delta;

fn answer<Req: DeserializeOwned, Resp: Serialize>(
    payload: &[u8],
    f: impl FnOnce(&Req) -> Result<Resp, SyncError>,
) -> Vec<u8> {
    let reply = match serde_json::from_slice::<Req>(payload) {
        Err(e) => Reply::Error(format!("unreadable request: {e}")),
        Ok(req) => match f(&req) {
            Ok(v) => Reply::Ok(v),
            Err(SyncError::Refused(s)) => Reply::Refused(s),
            Err(e) => Reply::Error(e.to_string()),
        },
    };
    serde_json::to_vec(&reply).unwrap_or_default()
}

fn handle(kv: &Kv, op: &str, payload: &[u8]) -> Vec<u8> {
    let local = Local(kv);
    match op {
        "hello" => answer(payload, |r: &Hello| local.hello(r)),
        "push" => answer(payload, |r: &Push| local.push(r)),
        "pull" => answer(payload, |r: &Pull| local.pull(r)),
        "buckets" => answer(payload, |_: &()| local.buckets()),
        "digest" => answer(payload, |b: &String| local.digest(b)),
        "ranges" => answer(payload, |r: &RangeRequest| local.ranges(r)),
        "snapshot" => answer(payload, |r: &SnapshotRequest| local.snapshot(r)),
        other => serde_json::to_vec(&Reply::<()>::Error(format!("unknown operation {other:?}")))
            .unwrap_or_default(),
    }
}

impl Cluster {
    /// Answers other nodes' sync requests for `kv` until [`Cluster::close`].
    pub fn serve_kv(self: &Arc<Self>, kv: Arc<Kv>, node: &str) {
        if self.client.server_info().max_payload < NEEDED_PAYLOAD {
            tracing::warn!(
                max_payload = self.client.server_info().max_payload,
                needed = NEEDED_PAYLOAD,
                "the NATS server's max_payload is below what key-value sync needs for the largest values (8 MiB); set max_payload: 16MB on every server (deploy/nats/ does)"
            );
        }
        let (client, prefix) = (self.client.clone(), subject(node, "*"));
        let task = tokio::spawn(async move {
            loop {
                let mut sub = match client.subscribe(prefix.clone()).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not subscribe to key-value sync requests; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                while let Some(msg) = sub.next().await {
                    let Some(reply) = msg.reply.clone() else {
                        continue;
                    };
                    let op = msg.subject.rsplit('.').next().unwrap_or("").to_string();
                    let (kv, client) = (kv.clone(), client.clone());
                    tokio::spawn(async move {
                        let payload = msg.payload;
                        let out = tokio::task::spawn_blocking(move || handle(&kv, &op, &payload))
                            .await
                            .unwrap_or_default();
                        if let Err(e) = client.publish(reply, out.into()).await {
                            tracing::debug!(error = %e, "could not answer a key-value sync request");
                        }
                    });
                }
            }
        });
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(task);
    }
}
