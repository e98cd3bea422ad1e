//! The sync protocol between two replicas, and the [`Transport`] that
//! carries it.
//!
//! One side drives (the client: an edge with `--peer`), the other serves
//! (`Kv::serve_*`). A round ([`Syncer::round`]):
//! 1. **hello**: the client gives its node id and the oldest stamp of what
//!    the server has not acknowledged; the server admits it, or tells it to
//!    re-bootstrap: when it was expired (silent beyond the grace bound), or
//!    when it is new to the server and holds writes older than tombstones
//!    the server has already collected (they could bring a deleted key back).
//! 2. **pull**: the client asks for the server's changes above its cursor;
//!    the cursor it sends acknowledges everything below it.
//! 3. **push**: the client sends its changes the server has not
//!    acknowledged; a success reply acknowledges them.
//! 4. **repair** (every few rounds): per bucket, a digest of 16 key ranges;
//!    ranges that differ are exchanged both ways.
//!
//! Merging is commutative, associative and idempotent, so a lost reply
//! (resent later), duplicates and reordering are harmless.

use serde::{Deserialize, Serialize};

use crate::{Delta, Kv, KvError, RANGES, Rebootstrapped, validate_stored};

/// First message of a round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub from: u64,
    /// The oldest stamp time (ms) of what the server has not acknowledged
    /// (of everything held, if the client has not met the server).
    pub oldest_pending_ms: Option<u64>,
}

/// Whether the server admits the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Admission {
    Admitted,
    Rebootstrap { reason: String },
}

/// The server's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    pub node: u64,
    pub admission: Admission,
}

/// Deltas the client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Push {
    pub from: u64,
    pub deltas: Vec<Delta>,
}

/// What the server did with a [`Push`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushReply {
    pub received: usize,
    pub changed: usize,
}

/// The client asks for the server's changes above `since`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pull {
    pub from: u64,
    pub since: u64,
    pub limit: usize,
}

/// Changes and the server sequence number they cover up to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pulled {
    pub deltas: Vec<Delta>,
    pub upto: u64,
}

/// Entries of some key ranges of a bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    pub bucket: String,
    pub ranges: Vec<usize>,
}

/// A page of the server's whole state, for a re-bootstrap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    pub from: u64,
    /// The last (bucket, key) of the previous page.
    pub after: Option<(String, String)>,
    pub limit: usize,
}

/// One page of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPage {
    pub deltas: Vec<Delta>,
    /// The server's sequence number before the page was read.
    pub seq: u64,
}

/// A failed sync step.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The peer could not be reached or answered badly; try again later.
    #[error("replication link: {0}")]
    Link(String),
    /// The peer refused this replica (say hello again next round).
    #[error("the peer refused this replica: {0}")]
    Refused(String),
    #[error(transparent)]
    Kv(#[from] KvError),
}

/// Carries the sync protocol to one peer (its server side is `Kv::serve_*`).
/// Implementations: [`Local`] (in process, for tests and embedding) and the
/// node's HTTP client.
pub trait Transport {
    fn hello(&self, req: &Hello) -> Result<HelloReply, SyncError>;
    fn push(&self, req: &Push) -> Result<PushReply, SyncError>;
    fn pull(&self, req: &Pull) -> Result<Pulled, SyncError>;
    /// Buckets the peer holds.
    fn buckets(&self) -> Result<Vec<String>, SyncError>;
    fn digest(&self, bucket: &str) -> Result<Vec<String>, SyncError>;
    fn ranges(&self, req: &RangeRequest) -> Result<Vec<Delta>, SyncError>;
    fn snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotPage, SyncError>;
}

fn refused(e: KvError) -> SyncError {
    match e {
        KvError::NotAdmitted { .. } => SyncError::Refused(e.to_string()),
        other => SyncError::Kv(other),
    }
}

/// The in-process transport: the peer is another [`Kv`] in this process.
pub struct Local<'a>(pub &'a Kv);

impl Transport for Local<'_> {
    fn hello(&self, req: &Hello) -> Result<HelloReply, SyncError> {
        self.0.serve_hello(req).map_err(refused)
    }
    fn push(&self, req: &Push) -> Result<PushReply, SyncError> {
        self.0.serve_push(req).map_err(refused)
    }
    fn pull(&self, req: &Pull) -> Result<Pulled, SyncError> {
        self.0.serve_pull(req).map_err(refused)
    }
    fn buckets(&self) -> Result<Vec<String>, SyncError> {
        Ok(self.0.buckets()?.into_iter().map(|(b, _)| b).collect())
    }
    fn digest(&self, bucket: &str) -> Result<Vec<String>, SyncError> {
        Ok(self.0.digest(bucket)?.to_vec())
    }
    fn ranges(&self, req: &RangeRequest) -> Result<Vec<Delta>, SyncError> {
        Ok(self.0.entries_in_ranges(&req.bucket, &req.ranges)?)
    }
    fn snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotPage, SyncError> {
        Ok(self.0.serve_snapshot(req)?)
    }
}

/// The most deltas one message carries.
pub const BATCH: usize = 2000;

impl Kv {
    /// Serves [`Hello`]: admits the client or tells it to re-bootstrap.
    pub fn serve_hello(&self, req: &Hello) -> Result<HelloReply, KvError> {
        let node = self.node();
        let admission = match self.replica(req.from)? {
            Some(r) if r.expired => Admission::Rebootstrap {
                reason: "it was not heard from within the tombstone grace bound".into(),
            },
            Some(_) => Admission::Admitted,
            None => match req.oldest_pending_ms {
                Some(t) if t <= self.horizon()? => Admission::Rebootstrap {
                    reason: "it is new here and holds writes older than tombstones already collected here".into(),
                },
                _ => Admission::Admitted,
            },
        };
        if admission == Admission::Admitted {
            self.register_replica(req.from, None)?;
        }
        Ok(HelloReply { node, admission })
    }

    fn admitted(&self, node: u64) -> Result<(), KvError> {
        match self.replica(node)? {
            Some(r) if !r.expired => Ok(()),
            Some(_) => Err(KvError::NotAdmitted {
                node,
                reason: "it was expired (silent beyond the tombstone grace bound)".into(),
            }),
            None => Err(KvError::NotAdmitted {
                node,
                reason: "it is unknown here".into(),
            }),
        }
    }

    /// Serves [`Push`]: merges the client's deltas.
    pub fn serve_push(&self, req: &Push) -> Result<PushReply, KvError> {
        self.admitted(req.from)?;
        let changed = self.apply_from(req.from, &req.deltas)?;
        self.register_replica(req.from, None)?;
        Ok(PushReply {
            received: req.deltas.len(),
            changed: changed.len(),
        })
    }

    /// Serves [`Pull`]: acknowledges `since` for the client and returns what
    /// is above it.
    pub fn serve_pull(&self, req: &Pull) -> Result<Pulled, KvError> {
        self.admitted(req.from)?;
        self.ack(req.from, req.since)?;
        let (deltas, upto) = self.changes_since(req.from, req.since, req.limit.clamp(1, BATCH))?;
        Ok(Pulled { deltas, upto })
    }

    /// Serves [`SnapshotRequest`] (to anyone the transport let through).
    pub fn serve_snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotPage, KvError> {
        if let Some((b, _)) = &req.after {
            validate_stored(b)?;
        }
        let after = req.after.as_ref().map(|(b, k)| (b.as_str(), k.as_str()));
        let (deltas, seq) = self.snapshot_page(after, req.limit.clamp(1, 10 * BATCH))?;
        Ok(SnapshotPage { deltas, seq })
    }
}

/// Splits deltas into messages of at most [`BATCH`] deltas and about
/// [`crate::BATCH_BYTES`] of values (at least one delta each).
fn batches(deltas: Vec<Delta>) -> Vec<Vec<Delta>> {
    let mut out: Vec<Vec<Delta>> = Vec::new();
    let mut bytes = 0;
    for d in deltas {
        let size = d.entry.value.as_ref().map_or(0, Vec::len) + d.key.len() + 64;
        match out.last_mut() {
            Some(last) if last.len() < BATCH && bytes + size <= crate::BATCH_BYTES => {
                bytes += size;
                last.push(d);
            }
            _ => {
                bytes = size;
                out.push(vec![d]);
            }
        }
    }
    out
}

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Round {
    pub peer: u64,
    pub pulled: usize,
    pub pushed: usize,
    /// Key ranges exchanged by digest repair.
    pub repaired: usize,
    pub rebootstrapped: Option<Rebootstrapped>,
}

/// Drives rounds against one peer, reached as `name` (its URL).
#[derive(Debug, Clone)]
pub struct Syncer {
    pub name: String,
    peer: Option<u64>,
}

impl Syncer {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            peer: None,
        }
    }

    /// One round: hello, pull, push, and digest repair if `repair`.
    pub fn round(&mut self, kv: &Kv, t: &dyn Transport, repair: bool) -> Result<Round, SyncError> {
        let known = match self.peer {
            Some(p) => Some(p),
            None => kv.replica_named(&self.name)?.map(|r| r.node),
        };
        let hello = t.hello(&Hello {
            from: kv.node(),
            oldest_pending_ms: kv.oldest_pending(known)?,
        })?;
        let peer = hello.node;
        self.peer = Some(peer);
        let mut round = Round {
            peer,
            ..Round::default()
        };
        if let Admission::Rebootstrap { reason } = hello.admission {
            round.rebootstrapped =
                Some(self.rebootstrap(kv, t, peer, &format!("the peer said {reason}"))?);
            return Ok(round);
        }
        if kv.replica(peer)?.is_some_and(|r| r.expired) {
            let reason = "this replica had not heard from the peer within the grace bound";
            round.rebootstrapped = Some(self.rebootstrap(kv, t, peer, reason)?);
            return Ok(round);
        }
        kv.register_replica(peer, Some(&self.name))?;
        loop {
            let since = kv.replica(peer)?.map_or(0, |r| r.pulled_seq);
            let p = t.pull(&Pull {
                from: kv.node(),
                since,
                limit: BATCH,
            })?;
            let n = p.deltas.len();
            kv.apply_from(peer, &p.deltas)?;
            kv.set_pulled(peer, p.upto)?;
            round.pulled += n;
            if p.upto <= since {
                break;
            }
        }
        loop {
            let (deltas, upto) = kv.pending(peer, BATCH)?;
            let acked = kv.replica(peer)?.map_or(0, |r| r.acked_seq);
            if upto <= acked {
                break;
            }
            if !deltas.is_empty() {
                t.push(&Push {
                    from: kv.node(),
                    deltas: deltas.clone(),
                })?;
            }
            kv.ack(peer, upto)?;
            round.pushed += deltas.len();
        }
        if repair {
            round.repaired = self.repair(kv, t, peer)?;
        }
        Ok(round)
    }

    /// Compares digests of every bucket either side holds and exchanges the
    /// key ranges that differ; returns how many ranges were exchanged.
    fn repair(&self, kv: &Kv, t: &dyn Transport, peer: u64) -> Result<usize, SyncError> {
        let mut buckets: Vec<String> = kv.buckets()?.into_iter().map(|(b, _)| b).collect();
        buckets.extend(t.buckets()?);
        buckets.sort();
        buckets.dedup();
        let mut repaired = 0;
        for bucket in buckets {
            let local = kv.digest(&bucket)?;
            let remote = t.digest(&bucket)?;
            let differing: Vec<usize> = (0..RANGES)
                .filter(|i| remote.get(*i) != Some(&local[*i]))
                .collect();
            if differing.is_empty() {
                continue;
            }
            let theirs = t.ranges(&RangeRequest {
                bucket: bucket.clone(),
                ranges: differing.clone(),
            })?;
            kv.apply_from(peer, &theirs)?;
            let mine = kv.entries_in_ranges(&bucket, &differing)?;
            for chunk in batches(mine) {
                t.push(&Push {
                    from: kv.node(),
                    deltas: chunk,
                })?;
            }
            repaired += differing.len();
        }
        Ok(repaired)
    }

    fn rebootstrap(
        &mut self,
        kv: &Kv,
        t: &dyn Transport,
        peer: u64,
        reason: &str,
    ) -> Result<Rebootstrapped, SyncError> {
        let mut all = Vec::new();
        let mut after: Option<(String, String)> = None;
        let mut first_seq = None;
        loop {
            let page = t.snapshot(&SnapshotRequest {
                from: kv.node(),
                after: after.clone(),
                limit: 10 * BATCH,
            })?;
            first_seq.get_or_insert(page.seq);
            let n = page.deltas.len();
            after = page
                .deltas
                .last()
                .map(|d| (d.bucket.clone(), d.key.clone()));
            all.extend(page.deltas);
            // Pages are cut by count and by size: only an empty one ends.
            if n == 0 {
                break;
            }
        }
        Ok(kv.rebootstrap(peer, Some(&self.name), &all, first_seq.unwrap_or(0), reason)?)
    }
}
