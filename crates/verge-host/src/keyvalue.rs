//! `wasi:keyvalue@0.2.0-draft` (store, atomics, batch) for guests, on the
//! node's replica of `verge-kv`. A guest may open only the buckets its
//! version was granted (`verge deploy --kv-bucket NAME`), and `""`: the
//! function's own bucket, named after it (the bucket `wasmtime serve
//! -Skeyvalue` offers, so that key-value components move between the hosts).

use std::sync::Arc;

use wasmtime::Result;
use wasmtime::component::{HasData, Resource, ResourceTable, ResourceTableError};

mod generated {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "wasi:keyvalue/imports@0.2.0-draft",
        // Async: every call runs its SQLite work on the blocking pool, never
        // on the runtime thread that polls the guest (a write waits for a
        // commit with `synchronous=FULL`, and reads wait for writes).
        imports: { default: async | trappable },
        with: {
            "wasi:keyvalue/store.bucket": super::Bucket,
        },
        trappable_error_type: {
            "wasi:keyvalue/store.error" => super::Error,
        },
    });
}

use generated::wasi::keyvalue;

/// Keys returned per `list-keys` call.
const PAGE: usize = 1000;

/// An error of a key-value call, as the guest sees it.
pub enum Error {
    NoSuchStore,
    AccessDenied,
    Other(String),
}

impl From<ResourceTableError> for Error {
    fn from(err: ResourceTableError) -> Self {
        Self::Other(err.to_string())
    }
}

impl From<verge_kv::KvError> for Error {
    fn from(err: verge_kv::KvError) -> Self {
        Self::Other(err.to_string())
    }
}

/// An open bucket.
pub struct Bucket {
    name: String,
}

/// What one invocation may reach of the store.
#[derive(Clone)]
pub(crate) struct KvCtx {
    pub kv: Option<Arc<verge_kv::Kv>>,
    pub allowed: Arc<Vec<String>>,
    /// The tenant the buckets belong to.
    pub tenant: Arc<str>,
    /// What `open("")` opens: the function's own bucket, always granted.
    pub default_bucket: Arc<str>,
    /// Hops of the event chain the invocation belongs to: the
    /// `kv.changed` events of its writes carry one more.
    pub hops: u32,
}

pub(crate) struct KvView<'a> {
    ctx: &'a KvCtx,
    table: &'a mut ResourceTable,
}

impl<'a> KvView<'a> {
    pub(crate) fn new(ctx: &'a KvCtx, table: &'a mut ResourceTable) -> Self {
        Self { ctx, table }
    }

    fn kv(&self) -> Result<Arc<verge_kv::Kv>, Error> {
        self.ctx
            .kv
            .clone()
            .ok_or_else(|| Error::Other("this node has no key-value store".into()))
    }

    /// Runs `f` on the store, on the blocking pool. (The future holds the
    /// store, not the view: the view's table is not `Sync`.)
    fn with_kv<T: Send + 'static>(
        &self,
        f: impl FnOnce(&verge_kv::Kv) -> Result<T, verge_kv::KvError> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, Error>> + Send + 'static {
        let kv = self.kv();
        async move {
            let kv = kv?;
            tokio::task::spawn_blocking(move || f(&kv))
                .await
                .map_err(|e| Error::Other(format!("the key-value call did not finish: {e}")))?
                .map_err(Error::from)
        }
    }

    fn bucket(&self, b: &Resource<Bucket>) -> Result<String, Error> {
        Ok(self.table.get(b)?.name.clone())
    }

    /// Writes on behalf of the invocation: the events of the change are one
    /// hop past it.
    fn write(
        &self,
        bucket: String,
        ops: Vec<verge_kv::Op>,
    ) -> impl std::future::Future<Output = Result<Vec<Option<i64>>, Error>> + Send + 'static {
        let hops = verge_spec::next_hop(self.ctx.hops);
        self.with_kv(move |kv| kv.batch_caused(&bucket, ops, hops))
    }
}

fn bytes_of(v: verge_kv::Value) -> Vec<u8> {
    match v {
        verge_kv::Value::Bytes(b) => b,
        verge_kv::Value::Count(n) => n.to_string().into_bytes(),
    }
}

impl keyvalue::store::Host for KvView<'_> {
    async fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, Error> {
        if identifier.is_empty() {
            // The one bucket `wasmtime serve -Skeyvalue` knows: components
            // written for it find their data in the function's own bucket.
            return Ok(self.table.push(Bucket {
                name: verge_kv::qualify(&self.ctx.tenant, &self.ctx.default_bucket),
            })?);
        }
        if verge_kv::validate_bucket(&identifier).is_err() {
            return Err(Error::NoSuchStore);
        }
        if !self.ctx.allowed.contains(&identifier) {
            return Err(Error::AccessDenied);
        }
        Ok(self.table.push(Bucket {
            name: verge_kv::qualify(&self.ctx.tenant, &identifier),
        })?)
    }

    fn convert_error(&mut self, err: Error) -> Result<keyvalue::store::Error> {
        Ok(match err {
            Error::NoSuchStore => keyvalue::store::Error::NoSuchStore,
            Error::AccessDenied => keyvalue::store::Error::AccessDenied,
            Error::Other(e) => keyvalue::store::Error::Other(e),
        })
    }
}

impl keyvalue::store::HostBucket for KvView<'_> {
    async fn get(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> Result<Option<Vec<u8>>, Error> {
        let b = self.bucket(&bucket)?;
        Ok(self
            .with_kv(move |kv| kv.get(&b, &key))
            .await?
            .map(bytes_of))
    }

    async fn set(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), Error> {
        let b = self.bucket(&bucket)?;
        self.write(b, vec![verge_kv::Op::Set(key, value)])
            .await
            .map(drop)
    }

    async fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> Result<(), Error> {
        let b = self.bucket(&bucket)?;
        self.write(b, vec![verge_kv::Op::Delete(key)])
            .await
            .map(drop)
    }

    async fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> Result<bool, Error> {
        let b = self.bucket(&bucket)?;
        Ok(self.with_kv(move |kv| kv.get(&b, &key)).await?.is_some())
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Result<keyvalue::store::KeyResponse, Error> {
        let b = self.bucket(&bucket)?;
        // The cursor is the number of keys already returned.
        let skip = usize::try_from(cursor.unwrap_or(0)).unwrap_or(usize::MAX);
        let keys = self
            .with_kv(move |kv| kv.keys(&b, "", None, skip.saturating_add(PAGE + 1)))
            .await?;
        let page: Vec<String> = keys.iter().skip(skip).take(PAGE).cloned().collect();
        let next = (keys.len() > skip.saturating_add(PAGE)).then(|| (skip + PAGE) as u64);
        Ok(keyvalue::store::KeyResponse {
            keys: page,
            cursor: next,
        })
    }

    async fn drop(&mut self, bucket: Resource<Bucket>) -> Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl keyvalue::atomics::Host for KvView<'_> {
    async fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: u64,
    ) -> Result<u64, Error> {
        let b = self.bucket(&bucket)?;
        let delta = i64::try_from(delta).map_err(|_| Error::Other("delta too large".into()))?;
        let out = self
            .write(b, vec![verge_kv::Op::Increment(key, delta)])
            .await?;
        let n = out.first().copied().flatten().unwrap_or(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

impl keyvalue::batch::Host for KvView<'_> {
    async fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<Vec<Option<(String, Vec<u8>)>>, Error> {
        let b = self.bucket(&bucket)?;
        self.with_kv(move |kv| {
            keys.into_iter()
                .map(|k| Ok(kv.get(&b, &k)?.map(|v| (k, bytes_of(v)))))
                .collect()
        })
        .await
    }

    async fn set_many(
        &mut self,
        bucket: Resource<Bucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> Result<(), Error> {
        let b = self.bucket(&bucket)?;
        let ops = key_values
            .into_iter()
            .map(|(k, v)| verge_kv::Op::Set(k, v))
            .collect();
        self.write(b, ops).await.map(drop)
    }

    async fn delete_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<(), Error> {
        let b = self.bucket(&bucket)?;
        let ops = keys.into_iter().map(verge_kv::Op::Delete).collect();
        self.write(b, ops).await.map(drop)
    }
}

struct HasKv;

impl HasData for HasKv {
    type Data<'a> = KvView<'a>;
}

/// Adds the three interfaces to a linker.
pub(crate) fn add_to_linker<T: Send + 'static>(
    l: &mut wasmtime::component::Linker<T>,
    f: fn(&mut T) -> KvView<'_>,
) -> Result<()> {
    keyvalue::store::add_to_linker::<_, HasKv>(l, f)?;
    keyvalue::atomics::add_to_linker::<_, HasKv>(l, f)?;
    keyvalue::batch::add_to_linker::<_, HasKv>(l, f)?;
    Ok(())
}
