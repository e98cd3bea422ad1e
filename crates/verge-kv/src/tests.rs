use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

fn replica(node: u64) -> (tempfile::TempDir, Kv) {
    let dir = tempfile::tempdir().unwrap();
    let kv = Kv::open(dir.path(), node).unwrap();
    (dir, kv)
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
fn two_replicas_exchange_deltas_and_survive_reopen() {
    let (da, a) = replica(1);
    let (_db, b) = replica(2);
    a.set("b", "x", b"from a").unwrap();
    a.increment("b", "n", 2).unwrap();
    b.increment("b", "n", 3).unwrap();
    let (deltas, upto) = a.pending("b-node", 100).unwrap();
    assert_eq!(deltas.len(), 2);
    b.apply(&deltas).unwrap();
    a.ack("b-node", upto).unwrap();
    assert!(
        a.pending("b-node", 100).unwrap().0.is_empty(),
        "acknowledged deltas are not sent again"
    );
    let (deltas, _) = b.pending("a-node", 100).unwrap();
    a.apply(&deltas).unwrap();
    a.apply(&deltas).unwrap(); // duplicates are harmless
    assert_eq!(a.get("b", "n").unwrap(), Some(Value::Count(5)));
    assert_eq!(b.get("b", "n").unwrap(), Some(Value::Count(5)));
    assert_eq!(a.digest("b").unwrap(), b.digest("b").unwrap());
    // An offline backlog is bounded by keys: 100 writes to one key are one delta.
    for i in 0..100 {
        a.set("b", "hot", format!("{i}").as_bytes()).unwrap();
    }
    let (deltas, _) = a.pending("c-node", 1000).unwrap();
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
                    let peer = format!("n{to}");
                    let (deltas, _) = kv(*from).pending(&peer, 10_000).unwrap();
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
