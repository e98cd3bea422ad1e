//! Component bytes in the cluster's object store, with the node's own
//! artifact directory as a cache in front: a node reads what it has from
//! disk (also while NATS is unreachable) and fetches the rest once.

use std::sync::Arc;

use async_nats::jetstream::object_store::ObjectMetadata;
use bytes::Bytes;
use tokio::io::AsyncReadExt;
use verge_store::{Artifacts, LocalArtifacts, StoreError, sha256_hex};

use crate::Cluster;

/// Chunks of the object store: the client waits for each chunk's ack, so
/// an upload takes (size / chunk) round trips; 512 KiB stays below the
/// server's 1 MiB payload limit.
pub const CHUNK: usize = 512 << 10;

/// Artifacts stored in the cluster, cached in the node's data directory.
pub struct NatsArtifacts {
    cluster: Arc<Cluster>,
    local: LocalArtifacts,
}

impl NatsArtifacts {
    pub fn new(cluster: Arc<Cluster>, local: LocalArtifacts) -> Self {
        Self { cluster, local }
    }
}

fn cluster_err(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Cluster(format!("{what}: {e}"))
}

#[async_trait::async_trait]
impl Artifacts for NatsArtifacts {
    async fn put(&self, bytes: Bytes) -> Result<String, StoreError> {
        self.cluster.wait_connected(crate::LINK_GRACE).await;
        self.cluster
            .check_link()
            .map_err(|e| StoreError::Cluster(e.to_string()))?;
        let sha = self.local.put(bytes.clone()).await?;
        let objects = self.cluster.objects();
        // A stream whose leader was on a server that died answers again
        // once the others elected a new one: tried until the deadline.
        let deadline = std::time::Instant::now() + crate::WRITE_DEADLINE;
        loop {
            if objects.info(&sha).await.is_ok() {
                return Ok(sha);
            }
            let meta = ObjectMetadata {
                name: sha.clone(),
                chunk_size: Some(CHUNK),
                ..Default::default()
            };
            match objects.put(meta, &mut bytes.as_ref()).await {
                Ok(_) => return Ok(sha),
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::info!(error = %e, "the artifact store did not take a component; trying again");
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
                Err(e) => {
                    return Err(cluster_err(
                        "the cluster's artifact store did not take the component",
                        e,
                    ));
                }
            }
        }
    }

    async fn remove(&self, sha256: &str) -> Result<(), StoreError> {
        // An edge holds a mirror: the core's nodes collect the store itself.
        if self.cluster.site().is_some() {
            return Ok(());
        }
        match self.cluster.objects().delete(sha256).await {
            Ok(()) => Ok(()),
            // Another node deleted it first.
            Err(e)
                if e.kind() == async_nats::jetstream::object_store::DeleteErrorKind::NotFound =>
            {
                Ok(())
            }
            Err(e) => Err(cluster_err(
                &format!("artifact {sha256} could not be deleted from the cluster's store"),
                e,
            )),
        }
    }

    async fn get(&self, sha256: &str) -> Result<Vec<u8>, StoreError> {
        if let Ok(bytes) = self.local.get(sha256).await {
            return Ok(bytes);
        }
        let mut object = match self.cluster.objects().get(sha256).await {
            Ok(o) => o,
            Err(e) => {
                // At an edge, the mirror may not have it yet: the hub has.
                let hub = match self.cluster.hub_objects().await {
                    Some(hub) => hub.get(sha256).await.ok(),
                    None => None,
                };
                hub.ok_or_else(|| {
                    cluster_err(
                        &format!("artifact {sha256} is not in the cluster's store"),
                        e,
                    )
                })?
            }
        };
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| cluster_err(&format!("artifact {sha256} could not be read"), e))?;
        if sha256_hex(&bytes) != sha256 {
            return Err(StoreError::Corrupt(format!(
                "artifact {sha256} from the cluster's store does not match its sha256"
            )));
        }
        self.local.put(Bytes::from(bytes.clone())).await?;
        Ok(bytes)
    }
}
