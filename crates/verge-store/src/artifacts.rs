//! Component bytes, content-addressed by sha256: what a node compiles from.
//! Compiled code is not here: it depends on the engine and the CPU, and
//! stays in each node's own cache.
//!
//! [`LocalArtifacts`] keeps them in the data directory (`artifacts/`,
//! written through a temporary file, fsync and an atomic rename); the
//! cluster backend (a NATS JetStream object store) implements the same
//! trait.

use std::sync::Arc;

use bytes::Bytes;

use crate::{Store, StoreError};

/// Where component bytes live.
#[async_trait::async_trait]
pub trait Artifacts: Send + Sync + 'static {
    /// Stores `bytes` durably (once: the same bytes are stored once);
    /// returns their sha256.
    async fn put(&self, bytes: Bytes) -> Result<String, StoreError>;
    /// The bytes of `sha256`, checked against it.
    async fn get(&self, sha256: &str) -> Result<Vec<u8>, StoreError>;
    /// Deletes `sha256` where it is shared beyond this node (the node's
    /// own copy is the store's: `Store::remove_unreferenced_artifacts`).
    /// Called once no version references it.
    async fn remove(&self, _sha256: &str) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Artifacts in the store's data directory.
pub struct LocalArtifacts {
    store: Arc<Store>,
}

impl LocalArtifacts {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }
}

#[async_trait::async_trait]
impl Artifacts for LocalArtifacts {
    async fn put(&self, bytes: Bytes) -> Result<String, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.put_artifact(&bytes))
            .await
            .map_err(|e| StoreError::Corrupt(format!("an artifact write did not finish: {e}")))?
    }

    async fn get(&self, sha256: &str) -> Result<Vec<u8>, StoreError> {
        let (store, sha) = (self.store.clone(), sha256.to_string());
        tokio::task::spawn_blocking(move || store.read_artifact(&sha))
            .await
            .map_err(|e| StoreError::Corrupt(format!("an artifact read did not finish: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn artifacts_are_stored_once_by_content_and_checked_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let a = LocalArtifacts::new(store);
        let sha = a.put(Bytes::from_static(b"\0asm component")).await.unwrap();
        assert_eq!(sha, crate::sha256_hex(b"\0asm component"));
        assert_eq!(
            a.put(Bytes::from_static(b"\0asm component")).await.unwrap(),
            sha
        );
        assert_eq!(a.get(&sha).await.unwrap(), b"\0asm component");
        // Bytes changed on disk are refused, not served.
        std::fs::write(
            dir.path().join("artifacts").join(format!("{sha}.wasm")),
            b"other",
        )
        .unwrap();
        assert!(a.get(&sha).await.is_err());
        assert!(a.get("not-a-sha").await.is_err());
    }
}
