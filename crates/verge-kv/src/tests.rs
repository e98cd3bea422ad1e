use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

fn replica(node: u64) -> (tempfile::TempDir, Kv) {
    let dir = tempfile::tempdir().unwrap();
    let kv = Kv::open(dir.path(), node).unwrap();
    (dir, kv)
}

#[test]
fn entries_stored_in_the_old_value_form_still_read_and_digest_the_same() {
    let (_d, kv) = replica(1);
    kv.set("b", "k", &[0, 159, 146, 150, 255]).unwrap();
    let before = kv.digest("b").unwrap();
    // Rewrite the row as a node before base64 values stored it.
    {
        let conn = kv.conn();
        let json: String = conn
            .query_row("SELECT entry FROM entries WHERE key = 'k'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert!(json.contains(r#""value":"AJ+Slv8=""#), "{json}");
        let old = json.replace(r#""AJ+Slv8=""#, "[0,159,146,150,255]");
        conn.execute("UPDATE entries SET entry = ?1 WHERE key = 'k'", [old])
            .unwrap();
    }
    assert_eq!(
        kv.get("b", "k").unwrap(),
        Some(Value::Bytes(vec![0, 159, 146, 150, 255]))
    );
    // Replicas compare parsed entries re-serialized: no repair for the form.
    assert_eq!(kv.digest("b").unwrap(), before);
}

#[test]
fn reads_your_writes_and_kinds_are_fixed() {
    let (_d, kv) = replica(1);
    kv.set("b", "k", b"v1").unwrap();
    assert_eq!(
        kv.get("b", "k").unwrap(),
        Some(Value::Bytes(b"v1".to_vec()))
    );
    assert_eq!(kv.increment("b", "n", 5).unwrap(), 5);
    assert_eq!(kv.increment("b", "n", -2).unwrap(), 3);
    let err = kv.increment("b", "k", 1).unwrap_err();
    assert!(
        err.to_string().contains("fixed by its first write"),
        "{err}"
    );
    assert!(kv.set("b", "n", b"x").is_err());
    kv.delete("b", "k").unwrap();
    assert_eq!(kv.get("b", "k").unwrap(), None);
    assert_eq!(kv.keys("b", "", None, 10).unwrap(), vec!["n".to_string()]);
    // A failed op rolls back the whole batch.
    let r = kv.batch(
        "b",
        vec![
            Op::Set("a".into(), b"1".to_vec()),
            Op::Increment("k".into(), 1),
        ],
    );
    assert!(r.is_err());
    assert_eq!(kv.get("b", "a").unwrap(), None);
    assert!(kv.set("Bad Bucket", "k", b"v").is_err());
}

#[test]
fn an_increment_past_the_i64_bound_is_refused_on_every_replica_alike() {
    let (_a, a) = replica(1);
    let (_b, b) = replica(2);
    for kv in [&a, &b] {
        assert_eq!(kv.increment("b", "n", i64::MAX - 1).unwrap(), i64::MAX - 1);
        assert_eq!(kv.increment("b", "n", 1).unwrap(), i64::MAX);
        let err = kv.increment("b", "n", 1).unwrap_err();
        assert!(
            matches!(err, KvError::CounterOverflow { delta: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("9223372036854775807"), "{err}");
        assert_eq!(kv.get("b", "n").unwrap(), Some(Value::Count(i64::MAX)));
        assert_eq!(kv.increment("b", "m", i64::MIN).unwrap(), i64::MIN);
        assert!(matches!(
            kv.increment("b", "m", -1),
            Err(KvError::CounterOverflow { .. })
        ));
    }
    // Both at the bound, merged: the same saturated value on both sides.
    let deltas = a
        .entries_in_ranges("b", &(0..RANGES).collect::<Vec<_>>())
        .unwrap();
    b.apply_from(a.node(), &deltas).unwrap();
    assert_eq!(b.get("b", "n").unwrap(), Some(Value::Count(i64::MAX)));
    assert_eq!(b.get("b", "m").unwrap(), Some(Value::Count(i64::MIN)));
}

#[test]
fn reads_do_not_wait_for_a_writer() {
    let (_dir, kv) = replica(1);
    kv.set("b", "k", b"v").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        // A write in progress holds the writer connection (as during an
        // fsync); held inside the scope so that a failure releases it.
        let writing = kv.conn();
        s.spawn(|| {
            let got = kv
                .get("b", "k")
                .map(|v| v.map(|v| matches!(v, Value::Bytes(b) if b == b"v")));
            let keys = kv.keys("b", "", None, 10);
            tx.send((got, keys)).unwrap();
        });
        let (got, keys) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("a read waited for the writer");
        assert_eq!(got.unwrap(), Some(true));
        assert_eq!(keys.unwrap(), vec!["k".to_string()]);
        drop(writing);
    });
}

#[test]
fn two_replicas_exchange_deltas_and_survive_reopen() {
    let (da, a) = replica(1);
    let (_db, b) = replica(2);
    a.set("b", "x", b"from a").unwrap();
    a.increment("b", "n", 2).unwrap();
    b.increment("b", "n", 3).unwrap();
    let (deltas, upto) = a.pending(2, 100).unwrap();
    assert_eq!(deltas.len(), 2);
    b.apply(&deltas).unwrap();
    a.ack(2, upto).unwrap();
    assert!(
        a.pending(2, 100).unwrap().0.is_empty(),
        "acknowledged deltas are not sent again"
    );
    let (deltas, _) = b.pending(1, 100).unwrap();
    a.apply(&deltas).unwrap();
    a.apply(&deltas).unwrap(); // duplicates are harmless
    assert_eq!(a.get("b", "n").unwrap(), Some(Value::Count(5)));
    assert_eq!(b.get("b", "n").unwrap(), Some(Value::Count(5)));
    assert_eq!(a.digest("b").unwrap(), b.digest("b").unwrap());
    // An offline backlog is bounded by keys: 100 writes to one key are one delta.
    for i in 0..100 {
        a.set("b", "hot", format!("{i}").as_bytes()).unwrap();
    }
    let (deltas, _) = a.pending(3, 1000).unwrap();
    assert_eq!(deltas.iter().filter(|d| d.key == "hot").count(), 1);
    let path = da.path().to_path_buf();
    drop(a);
    let a = Kv::open(&path, 1).unwrap();
    assert_eq!(
        a.get("b", "hot").unwrap(),
        Some(Value::Bytes(b"99".to_vec()))
    );
    // The clock never goes below what is stored.
    a.set("b", "hot", b"after").unwrap();
    assert_eq!(
        a.get("b", "hot").unwrap(),
        Some(Value::Bytes(b"after".to_vec()))
    );
}

/// Per register key, every write: its stamp and value (None: a delete).
type Writes = HashMap<String, Vec<(Stamp, Option<Vec<u8>>)>>;

#[derive(Debug, Clone)]
enum Step {
    Set(usize, usize, u8),
    Delete(usize, usize),
    Incr(usize, usize, i8),
    /// Deliver `from`'s pending deltas to `to`, dropping the ones whose bit
    /// is set in `loss`, duplicating and reversing some.
    Deliver(usize, usize, u64, bool),
}

fn step(replicas: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..replicas, 0..4usize, any::<u8>()).prop_map(|(r, k, v)| Step::Set(r, k, v)),
        (0..replicas, 0..4usize).prop_map(|(r, k)| Step::Delete(r, k)),
        (0..replicas, 0..4usize, -5i8..6).prop_map(|(r, k, d)| Step::Incr(r, k, d)),
        (0..replicas, 0..replicas, any::<u64>(), any::<bool>())
            .prop_map(|(a, b, l, rev)| Step::Deliver(a, b, l, rev)),
    ]
}

fn case() -> impl Strategy<Value = (usize, Vec<Step>)> {
    (3usize..=5).prop_flat_map(|n| (Just(n), proptest::collection::vec(step(n), 1..40)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random operations on 3 to 5 replicas, deltas delivered in random
    /// order, duplicated and lost, then repaired by digests: every replica
    /// ends with the same state; each register holds the write with the
    /// greatest (clock, node) (deleted keys stay deleted); each counter holds
    /// the exact sum of its increments.
    #[test]
    fn replicas_converge((n, steps) in case()) {
        let replicas: Vec<(tempfile::TempDir, Kv)> = (0..n).map(|i| replica(i as u64 + 1)).collect();
        let kv = |i: usize| &replicas[i].1;
        let mut writes: Writes = HashMap::new();
        let mut sums: HashMap<String, i64> = HashMap::new();
        for s in &steps {
            match s {
                Step::Set(r, k, v) => {
                    let key = format!("r{k}");
                    kv(*r).set("b", &key, &[*v]).unwrap();
                    let stamp = kv(*r).entry("b", &key).unwrap().unwrap().stamp;
                    writes.entry(key).or_default().push((stamp, Some(vec![*v])));
                }
                Step::Delete(r, k) => {
                    let key = format!("r{k}");
                    kv(*r).delete("b", &key).unwrap();
                    let stamp = kv(*r).entry("b", &key).unwrap().unwrap().stamp;
                    writes.entry(key).or_default().push((stamp, None));
                }
                Step::Incr(r, k, d) => {
                    let key = format!("c{k}");
                    kv(*r).increment("b", &key, i64::from(*d)).unwrap();
                    *sums.entry(key).or_default() += i64::from(*d);
                }
                Step::Deliver(from, to, loss, reverse) => {
                    if from == to { continue; }
                    let (deltas, _) = kv(*from).pending(*to as u64 + 1, 10_000).unwrap();
                    let mut sent: Vec<Delta> = deltas
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| loss & (1 << (i % 64)) == 0)
                        .map(|(_, d)| d.clone())
                        .collect();
                    if *reverse { sent.reverse(); }
                    let dup: Vec<Delta> = sent.iter().step_by(2).cloned().collect();
                    sent.extend(dup);
                    kv(*to).apply(&sent).unwrap();
                    // Lost deltas are never acknowledged here; repair finds them.
                }
            }
        }
        // Repair: compare digests pairwise and exchange differing ranges until equal.
        for _round in 0..3 {
            for a in 0..n {
                for b in 0..n {
                    if a == b { continue; }
                    let (da, db) = (kv(a).digest("b").unwrap(), kv(b).digest("b").unwrap());
                    let ranges: Vec<usize> = (0..RANGES).filter(|i| da[*i] != db[*i]).collect();
                    if !ranges.is_empty() {
                        let deltas = kv(a).entries_in_ranges("b", &ranges).unwrap();
                        kv(b).apply(&deltas).unwrap();
                    }
                }
            }
        }
        let d0 = kv(0).digest("b").unwrap();
        for i in 1..n {
            prop_assert_eq!(&kv(i).digest("b").unwrap(), &d0, "replica {} differs", i);
        }
        for (key, ws) in &writes {
            let (_, expected) = ws.iter().max_by_key(|(s, _)| *s).unwrap();
            for i in 0..n {
                let got = kv(i).get("b", key).unwrap();
                prop_assert_eq!(got, expected.clone().map(Value::Bytes), "register {} on replica {}", key, i);
            }
        }
        for (key, sum) in &sums {
            for i in 0..n {
                let got = kv(i).get("b", key).unwrap();
                let want = if kv(i).entry("b", key).unwrap().unwrap().is_present() { Some(Value::Count(*sum)) } else { None };
                prop_assert_eq!(got.clone(), want, "counter {} on replica {}", key, i);
                prop_assert_eq!(kv(i).entry("b", key).unwrap().unwrap().count(), *sum);
            }
        }
    }
}

mod sync_protocol {
    use std::cell::Cell;

    use super::*;
    use crate::sync::*;

    /// The in-process transport with faults: per call, two bits of `plan`
    /// say what happens: 1 = the request is lost, 2 = the reply is lost (the
    /// peer applied it); deltas travel reversed and duplicated if asked.
    struct Flaky<'a> {
        inner: Local<'a>,
        plan: Cell<u64>,
        mangle: bool,
    }

    impl Flaky<'_> {
        fn fault(&self) -> u64 {
            let p = self.plan.get();
            self.plan.set(p >> 2);
            p & 3
        }
        fn mangle(&self, mut d: Vec<Delta>) -> Vec<Delta> {
            if self.mangle {
                d.reverse();
                let dup: Vec<Delta> = d.iter().step_by(2).cloned().collect();
                d.extend(dup);
            }
            d
        }
        fn call<T>(&self, f: impl FnOnce() -> Result<T, SyncError>) -> Result<T, SyncError> {
            match self.fault() {
                1 => Err(SyncError::Link("request lost".into())),
                2 => {
                    let _ = f()?;
                    Err(SyncError::Link("reply lost".into()))
                }
                _ => f(),
            }
        }
    }

    impl Transport for Flaky<'_> {
        fn hello(&self, req: &Hello) -> Result<HelloReply, SyncError> {
            self.call(|| self.inner.hello(req))
        }
        fn push(&self, req: &Push) -> Result<PushReply, SyncError> {
            let req = Push {
                from: req.from,
                deltas: self.mangle(req.deltas.clone()),
            };
            self.call(|| self.inner.push(&req))
        }
        fn pull(&self, req: &Pull) -> Result<Pulled, SyncError> {
            self.call(|| self.inner.pull(req)).map(|p| Pulled {
                deltas: self.mangle(p.deltas),
                upto: p.upto,
            })
        }
        fn buckets(&self) -> Result<Vec<String>, SyncError> {
            self.call(|| self.inner.buckets())
        }
        fn digest(&self, bucket: &str) -> Result<Vec<String>, SyncError> {
            self.call(|| self.inner.digest(bucket))
        }
        fn ranges(&self, req: &RangeRequest) -> Result<Vec<Delta>, SyncError> {
            self.call(|| self.inner.ranges(req))
        }
        fn snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotPage, SyncError> {
            self.call(|| self.inner.snapshot(req))
        }
    }

    const FOREVER: u64 = 1 << 50;

    /// Polls `check` until it gives a value (10 s at most).
    fn until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(v) = check() {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting: {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Set(usize, usize, u8),
        Delete(usize, usize),
        Incr(usize, usize, i8),
        /// Edge `e` syncs with the core through a faulty link.
        Sync(usize, u64, bool, bool),
        Collect(usize),
    }

    fn step(replicas: usize) -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..replicas, 0..4usize, any::<u8>()).prop_map(|(r, k, v)| Step::Set(r, k, v)),
            (0..replicas, 0..4usize).prop_map(|(r, k)| Step::Delete(r, k)),
            (0..replicas, 0..4usize, -5i8..6).prop_map(|(r, k, d)| Step::Incr(r, k, d)),
            (1..replicas, any::<u64>(), any::<bool>(), any::<bool>())
                .prop_map(|(e, f, m, r)| Step::Sync(e, f, m, r)),
            (0..replicas).prop_map(Step::Collect),
        ]
    }

    fn case() -> impl Strategy<Value = (usize, Vec<Step>)> {
        (3usize..=5).prop_flat_map(|n| (Just(n), proptest::collection::vec(step(n), 1..50)))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// A core (replica 0) and 2 to 4 edges that sync with it through
        /// links that lose requests and replies, reorder and duplicate, while
        /// every replica writes and collects tombstones whenever it likes.
        /// In the end: identical state, registers hold the write with the
        /// greatest (clock, node), deleted keys never come back, counters
        /// hold exact sums, and every tombstone has been collected.
        #[test]
        fn the_protocol_converges_and_collects_tombstones((n, steps) in case()) {
            let replicas: Vec<(tempfile::TempDir, Kv)> = (0..n).map(|i| replica(i as u64 + 1)).collect();
            let kv = |i: usize| &replicas[i].1;
            let mut syncers: Vec<Syncer> = (0..n).map(|i| Syncer::new(format!("core-from-{i}"))).collect();
            let core = Local(kv(0));
            for (e, syncer) in syncers.iter_mut().enumerate().skip(1) {
                syncer.round(kv(e), &core, false).unwrap();
            }
            let mut writes: Writes = HashMap::new();
            let mut sums: HashMap<String, i64> = HashMap::new();
            for s in &steps {
                match s {
                    Step::Set(r, k, v) => {
                        let key = format!("r{k}");
                        kv(*r).set("b", &key, &[*v]).unwrap();
                        let stamp = kv(*r).entry("b", &key).unwrap().unwrap().stamp;
                        writes.entry(key).or_default().push((stamp, Some(vec![*v])));
                    }
                    Step::Delete(r, k) => {
                        let key = format!("r{k}");
                        kv(*r).delete("b", &key).unwrap();
                        let stamp = kv(*r).entry("b", &key).unwrap().unwrap().stamp;
                        writes.entry(key).or_default().push((stamp, None));
                    }
                    Step::Incr(r, k, d) => {
                        let key = format!("c{k}");
                        kv(*r).increment("b", &key, i64::from(*d)).unwrap();
                        *sums.entry(key).or_default() += i64::from(*d);
                    }
                    Step::Sync(e, faults, mangle, repair) => {
                        let link = Flaky { inner: Local(kv(0)), plan: Cell::new(*faults), mangle: *mangle };
                        if let Ok(round) = syncers[*e].round(kv(*e), &link, *repair) {
                            prop_assert!(round.rebootstrapped.is_none());
                        }
                    }
                    Step::Collect(r) => {
                        let report = kv(*r).collect(FOREVER).unwrap();
                        prop_assert!(report.expired.is_empty());
                    }
                }
            }
            for _ in 0..3 {
                for (e, syncer) in syncers.iter_mut().enumerate().skip(1) {
                    let round = syncer.round(kv(e), &core, true).unwrap();
                    prop_assert!(round.rebootstrapped.is_none());
                }
                for i in 0..n {
                    kv(i).collect(FOREVER).unwrap();
                }
            }
            let d0 = kv(0).digest("b").unwrap();
            for i in 1..n {
                prop_assert_eq!(&kv(i).digest("b").unwrap(), &d0, "replica {} differs", i);
            }
            for (key, ws) in &writes {
                let (_, expected) = ws.iter().max_by_key(|(s, _)| *s).unwrap();
                for i in 0..n {
                    let got = kv(i).get("b", key).unwrap();
                    prop_assert_eq!(got, expected.clone().map(Value::Bytes), "register {} on replica {}", key, i);
                }
            }
            for (key, sum) in &sums {
                for i in 0..n {
                    prop_assert_eq!(kv(i).entry("b", key).unwrap().unwrap().count(), *sum, "counter {} on replica {}", key, i);
                }
            }
            for i in 0..n {
                prop_assert_eq!(kv(i).stats().unwrap().tombstones, 0, "tombstones left on replica {}", i);
            }
        }
    }

    #[test]
    fn a_tombstone_waits_for_every_known_replica() {
        let (_dc, core) = replica(1);
        let (_da, a) = replica(2);
        let (_db, b) = replica(3);
        let (mut sa, mut sb) = (Syncer::new("core"), Syncer::new("core"));
        core.set("b", "k", b"v").unwrap();
        sa.round(&a, &Local(&core), false).unwrap();
        sb.round(&b, &Local(&core), false).unwrap();
        a.delete("b", "k").unwrap();
        sa.round(&a, &Local(&core), false).unwrap(); // the core gets the delete
        assert_eq!(
            a.collect(FOREVER).unwrap().collected,
            1,
            "the core acknowledged it"
        );
        assert_eq!(
            core.collect(FOREVER).unwrap().collected,
            0,
            "b has not seen it"
        );
        sa.round(&a, &Local(&core), false).unwrap();
        assert_eq!(
            core.collect(FOREVER).unwrap().collected,
            0,
            "a has it, b still not"
        );
        // b still holds the old value and pushes it: the core's tombstone wins.
        b.set("b", "other", b"x").unwrap();
        sb.round(&b, &Local(&core), false).unwrap();
        assert_eq!(b.get("b", "k").unwrap(), None);
        sb.round(&b, &Local(&core), true).unwrap(); // this pull acknowledges it
        assert_eq!(core.collect(FOREVER).unwrap().collected, 1);
        assert_eq!(b.collect(FOREVER).unwrap().collected, 1);
        // Repair does not bring it back anywhere.
        sa.round(&a, &Local(&core), true).unwrap();
        sb.round(&b, &Local(&core), true).unwrap();
        for r in [&core, &a, &b] {
            assert_eq!(r.get("b", "k").unwrap(), None);
            assert_eq!(r.stats().unwrap().tombstones, 0);
        }
        assert_eq!(core.stats().unwrap().collected_total, 1);
        assert!(core.horizon().unwrap() > 0);
    }

    #[test]
    fn a_replaced_peer_does_not_hold_back_collection() {
        let (_d1, old_core) = replica(1);
        let (_de, edge) = replica(2);
        let mut s = Syncer::new("core");
        edge.set("b", "k", b"v").unwrap();
        s.round(&edge, &Local(&old_core), false).unwrap();
        // The core is replaced: a new kv.db, so a new id, at the same address.
        let (_d3, new_core) = replica(3);
        edge.delete("b", "k").unwrap();
        s.round(&edge, &Local(&new_core), false).unwrap();
        assert!(
            edge.replica(1).unwrap().unwrap().expired,
            "the replica that answered there before is gone"
        );
        assert!(!edge.replica(3).unwrap().unwrap().expired);
        assert_eq!(
            edge.collect(FOREVER).unwrap().collected,
            1,
            "only the new core had to acknowledge the tombstone"
        );
        // Should the old one call again, it is told to re-bootstrap.
        let mut back = Syncer::new("edge");
        let r = back.round(&old_core, &Local(&edge), false).unwrap();
        assert!(r.rebootstrapped.is_some());
    }

    #[test]
    fn a_replica_silent_beyond_the_grace_bound_rebootstraps_and_its_writes_are_stale() {
        let (_dc, core) = replica(1);
        let (_de, edge) = replica(2);
        let mut s = Syncer::new("core");
        core.set("b", "k", b"v").unwrap();
        core.increment("b", "n", 5).unwrap();
        s.round(&edge, &Local(&core), false).unwrap();
        assert_eq!(
            edge.get("b", "k").unwrap(),
            Some(Value::Bytes(b"v".to_vec()))
        );
        // The edge is cut off: the core deletes k; the edge writes.
        core.delete("b", "k").unwrap();
        edge.set("b", "offline", b"w").unwrap();
        edge.increment("b", "n", 2).unwrap();
        // Grace of 10 ms: once it has passed, the edge is expired and the
        // tombstone collected.
        let (mut expired, mut collected) = (Vec::new(), 0);
        until("the edge expired and the tombstone collected", || {
            let r = core.collect(10).unwrap();
            expired.extend(r.expired);
            collected += r.collected;
            (collected == 1 && !expired.is_empty()).then_some(())
        });
        assert_eq!(expired, vec![2]);
        // The link returns: the edge is told to re-bootstrap.
        let round = s.round(&edge, &Local(&core), false).unwrap();
        let rb = round.rebootstrapped.expect("re-bootstrapped");
        assert_eq!(rb.old_node, 2);
        assert_ne!(rb.new_node, 2);
        assert_eq!(rb.stale, 2, "two unsent writes set aside");
        assert_eq!(edge.node(), rb.new_node);
        let stale = edge.stale(10).unwrap();
        assert_eq!(stale.len(), 2);
        assert!(stale.iter().any(|w| w.key == "offline"));
        assert!(stale[0].reason.contains("grace"), "{}", stale[0].reason);
        assert_eq!(edge.stats().unwrap().stale_total, 2);
        // The edge now holds the core's state: the deleted key stays deleted,
        // the stale writes were not applied.
        assert_eq!(edge.get("b", "k").unwrap(), None);
        assert_eq!(edge.get("b", "offline").unwrap(), None);
        assert_eq!(edge.get("b", "n").unwrap(), Some(Value::Count(5)));
        // And it syncs normally under its new id.
        edge.increment("b", "n", 1).unwrap();
        let round = s.round(&edge, &Local(&core), true).unwrap();
        assert!(round.rebootstrapped.is_none());
        assert_eq!(core.get("b", "n").unwrap(), Some(Value::Count(6)));
        assert_eq!(core.get("b", "offline").unwrap(), None);
        assert_eq!(edge.digest("b").unwrap(), core.digest("b").unwrap());
    }

    #[test]
    fn a_new_replica_with_writes_older_than_collected_tombstones_rebootstraps() {
        let (_dn, newcomer) = replica(3);
        newcomer.set("b", "k", b"old").unwrap();
        let (_dc, core) = replica(1);
        core.set("b", "k", b"v").unwrap();
        core.delete("b", "k").unwrap();
        // No replica known: collected once older than the grace bound.
        until("the tombstone is collected by age", || {
            (core.collect(10).unwrap().collected == 1).then_some(())
        });
        let mut s = Syncer::new("core");
        let round = s.round(&newcomer, &Local(&core), false).unwrap();
        let rb = round.rebootstrapped.expect("told to re-bootstrap");
        assert_eq!(rb.stale, 1);
        assert_eq!(
            newcomer.get("b", "k").unwrap(),
            None,
            "the deleted key did not come back"
        );
        assert_eq!(core.get("b", "k").unwrap(), None);
        // A newcomer whose writes are newer than the horizon just joins.
        let (_dl, late) = replica(4);
        late.set("b", "k", b"new").unwrap();
        let mut s = Syncer::new("core");
        let round = s.round(&late, &Local(&core), false).unwrap();
        assert!(round.rebootstrapped.is_none());
        assert_eq!(
            core.get("b", "k").unwrap(),
            Some(Value::Bytes(b"new".to_vec()))
        );
    }

    #[test]
    fn rows_from_a_peer_are_not_echoed_back() {
        let (_dc, core) = replica(1);
        let (_de, edge) = replica(2);
        let mut s = Syncer::new("core");
        for i in 0..50 {
            core.set("b", &format!("k{i}"), b"v").unwrap();
        }
        let r = s.round(&edge, &Local(&core), false).unwrap();
        assert_eq!((r.pulled, r.pushed), (50, 0));
        edge.set("b", "mine", b"x").unwrap();
        let r = s.round(&edge, &Local(&core), false).unwrap();
        assert_eq!((r.pulled, r.pushed), (0, 1));
        let r = s.round(&edge, &Local(&core), false).unwrap();
        assert_eq!((r.pulled, r.pushed), (0, 0));
    }

    #[test]
    fn large_values_travel_in_batches_cut_by_size() {
        let (_dc, core) = replica(1);
        let (_de, edge) = replica(2);
        let mut s = Syncer::new("core");
        s.round(&edge, &Local(&core), false).unwrap();
        let big = vec![7u8; 1 << 20];
        for i in 0..12 {
            edge.set("b", &format!("k{i}"), &big).unwrap();
        }
        core.set("b", "c", &big).unwrap();
        let (first, _) = edge.pending(1, BATCH).unwrap();
        assert!(first.len() < 12, "a batch is cut by size: {}", first.len());
        let r = s.round(&edge, &Local(&core), false).unwrap();
        assert_eq!((r.pulled, r.pushed), (1, 12));
        assert_eq!(
            core.get("b", "k11").unwrap(),
            Some(Value::Bytes(big.clone()))
        );
        // A value over the limit is refused, naming it.
        let err = edge
            .set("b", "huge", &vec![0u8; MAX_VALUE + 1])
            .unwrap_err();
        assert!(err.to_string().contains("MiB limit"), "{err}");
    }

    #[test]
    fn clock_skew_is_counted_and_shown() {
        let (_da, a) = replica(1);
        let far = Stamp {
            wall_ms: now_ms() + 3_600_000,
            counter: 0,
            node: 9,
        };
        a.apply(&[Delta {
            bucket: "b".into(),
            key: "k".into(),
            entry: Entry::register(Some(b"future".to_vec()), far),
        }])
        .unwrap();
        let st = a.stats().unwrap();
        assert_eq!(st.skewed, 1);
        a.set("b", "x", b"now").unwrap();
        let x = a.entry("b", "x").unwrap().unwrap().stamp;
        assert!(
            x.wall_ms <= now_ms() + st.max_skew_ms,
            "the clock stayed within the bound"
        );
    }
}

#[test]
fn replica_ids_come_from_the_os_random_source_and_are_never_zero() {
    let ids: std::collections::HashSet<u64> = (0..1000).map(|_| random_node().unwrap()).collect();
    assert_eq!(ids.len(), 1000, "ids repeat");
    assert!(!ids.contains(&0));
    assert!(ids.iter().all(|n| *n < 1 << 63), "63 bits");
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (
        Kv::open_replica(a.path()).unwrap(),
        Kv::open_replica(b.path()).unwrap(),
    );
    assert_ne!(a.node(), b.node());
}
