//! The CRDT of one key: a last-writer-wins register or a PN-counter, with
//! a hybrid logical clock for ordering. Pure: no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// An increment that would take a counter out of the range of an i64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

/// A hybrid logical clock reading with the node that took it: the order of
/// writes (wall time in ms, then a counter, then the node id to break ties).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Stamp {
    pub wall_ms: u64,
    pub counter: u32,
    pub node: u64,
}

/// A node's hybrid logical clock.
#[derive(Debug, Clone)]
pub struct Clock {
    node: u64,
    last: Stamp,
    /// Largest jump ahead of the wall clock the clock accepts from remote data.
    pub max_skew_ms: u64,
    /// Remote stamps ahead of the local wall clock by more than the bound.
    pub skewed: u64,
}

impl Clock {
    pub fn new(node: u64) -> Self {
        Self {
            node,
            last: Stamp {
                node,
                ..Stamp::default()
            },
            max_skew_ms: 60_000,
            skewed: 0,
        }
    }

    pub fn node(&self) -> u64 {
        self.node
    }

    /// A new stamp, later than every stamp this clock issued or observed
    /// (within the skew bound).
    pub fn tick(&mut self, now_ms: u64) -> Stamp {
        let s = if now_ms > self.last.wall_ms {
            Stamp {
                wall_ms: now_ms,
                counter: 0,
                node: self.node,
            }
        } else {
            Stamp {
                wall_ms: self.last.wall_ms,
                counter: self.last.counter.saturating_add(1),
                node: self.node,
            }
        };
        self.last = s;
        s
    }

    /// Observes a remote stamp: the clock moves up to it, but never more
    /// than `max_skew_ms` past the local wall clock (counted in `skewed`).
    pub fn observe(&mut self, remote: Stamp, now_ms: u64) {
        let bound = now_ms.saturating_add(self.max_skew_ms);
        let candidate = if remote.wall_ms > bound {
            self.skewed += 1;
            (bound, 0)
        } else {
            (remote.wall_ms, remote.counter)
        };
        if candidate > (self.last.wall_ms, self.last.counter) {
            self.last = Stamp {
                wall_ms: candidate.0,
                counter: candidate.1,
                node: self.node,
            };
        }
    }
}

/// What a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Register,
    Counter,
}

/// The replicated state of one key. Merging two states (`join`) is
/// commutative, associative and idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    /// The stamp of the key's first write: when two replicas first wrote
    /// different kinds, the earlier kind wins.
    pub created: Stamp,
    /// Register: the latest write (None: deleted) and its stamp. In JSON (the
    /// stored form and the replication protocol) a base64 string; an array
    /// of numbers, the form before, is still read.
    #[serde(default, with = "value_json")]
    pub value: Option<Vec<u8>>,
    pub stamp: Stamp,
    /// Counter: per node, the sum of its increments and of its decrements.
    pub inc: BTreeMap<u64, u64>,
    pub dec: BTreeMap<u64, u64>,
    /// Counter: what a delete observed (subtracted from the sums).
    pub inc_reset: BTreeMap<u64, u64>,
    pub dec_reset: BTreeMap<u64, u64>,
}

/// A register's value in JSON: `null`, or its bytes in standard base64. A
/// value used to be written as an array of numbers (about 3.6 bytes of JSON
/// per byte, parsed number by number on every read); entries stored or sent
/// that way still read, and are rewritten in the new form when next written.
mod value_json {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(bytes) => s.serialize_str(&STANDARD.encode(bytes)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        d.deserialize_any(ValueVisitor)
    }

    struct ValueVisitor;

    impl<'de> Visitor<'de> for ValueVisitor {
        type Value = Option<Vec<u8>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("null, a base64 string or an array of bytes")
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            STANDARD
                .decode(v)
                .map(Some)
                .map_err(|e| E::custom(format!("value is not base64: {e}")))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            while let Some(b) = seq.next_element::<u8>()? {
                bytes.push(b);
            }
            Ok(Some(bytes))
        }
    }
}

fn max_merge(a: &mut BTreeMap<u64, u64>, b: &BTreeMap<u64, u64>) {
    for (k, v) in b {
        let e = a.entry(*k).or_insert(0);
        *e = (*e).max(*v);
    }
}

impl Entry {
    /// A register written with `value` (None: a tombstone) at `stamp`.
    pub fn register(value: Option<Vec<u8>>, stamp: Stamp) -> Self {
        Self {
            kind: Kind::Register,
            created: stamp,
            value,
            stamp,
            inc: BTreeMap::new(),
            dec: BTreeMap::new(),
            inc_reset: BTreeMap::new(),
            dec_reset: BTreeMap::new(),
        }
    }

    /// A new counter.
    pub fn counter(stamp: Stamp) -> Self {
        Self {
            kind: Kind::Counter,
            created: stamp,
            value: None,
            stamp,
            inc: BTreeMap::new(),
            dec: BTreeMap::new(),
            inc_reset: BTreeMap::new(),
            dec_reset: BTreeMap::new(),
        }
    }

    /// Writes a register value (or a tombstone) at `stamp`.
    pub fn set(&mut self, value: Option<Vec<u8>>, stamp: Stamp) {
        if stamp > self.stamp {
            self.value = value;
            self.stamp = stamp;
        }
    }

    /// Adds `delta` to a counter as node `node`; refused (nothing changes)
    /// when the counter's value would leave the range of an i64, or this
    /// node's share of it the range of a u64.
    pub fn add(&mut self, node: u64, delta: i64, stamp: Stamp) -> Result<(), Overflow> {
        let value = i128::from(self.count()) + i128::from(delta);
        if i64::try_from(value).is_err() {
            return Err(Overflow);
        }
        let side = if delta >= 0 {
            &mut self.inc
        } else {
            &mut self.dec
        };
        let slot = side.entry(node).or_insert(0);
        *slot = slot.checked_add(delta.unsigned_abs()).ok_or(Overflow)?;
        self.stamp = self.stamp.max(stamp);
        Ok(())
    }

    /// Deletes a counter: what this replica has seen is subtracted from now on.
    pub fn reset(&mut self, stamp: Stamp) {
        self.inc_reset = self.inc.clone();
        self.dec_reset = self.dec.clone();
        self.stamp = self.stamp.max(stamp);
    }

    /// The counter's value. Every replica refuses an increment that would
    /// leave the range of an i64; should concurrent increments on different
    /// replicas still add up past it, the merged value saturates at the
    /// bound (the same on every replica), never wraps.
    pub fn count(&self) -> i64 {
        let sum = |m: &BTreeMap<u64, u64>, r: &BTreeMap<u64, u64>| -> i128 {
            m.iter()
                .map(|(k, v)| i128::from(v.saturating_sub(*r.get(k).unwrap_or(&0))))
                .sum()
        };
        let value = sum(&self.inc, &self.inc_reset) - sum(&self.dec, &self.dec_reset);
        i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX })
    }

    /// Is there a value: a register's, or a counter's increments since its last delete?
    pub fn is_present(&self) -> bool {
        match self.kind {
            Kind::Register => self.value.is_some(),
            Kind::Counter => {
                let live = |m: &BTreeMap<u64, u64>, r: &BTreeMap<u64, u64>| {
                    m.iter().any(|(k, v)| *v > *r.get(k).unwrap_or(&0))
                };
                live(&self.inc, &self.inc_reset) || live(&self.dec, &self.dec_reset)
            }
        }
    }

    /// Joins another state of the same key into this one.
    pub fn join(&mut self, other: &Entry) {
        if self.kind != other.kind {
            // Different kinds written concurrently: the earlier first write wins.
            if other.created < self.created {
                *self = other.clone();
            }
            return;
        }
        self.created = self.created.min(other.created);
        match self.kind {
            Kind::Register => {
                if other.stamp > self.stamp {
                    self.value = other.value.clone();
                    self.stamp = other.stamp;
                }
            }
            Kind::Counter => {
                max_merge(&mut self.inc, &other.inc);
                max_merge(&mut self.dec, &other.dec);
                max_merge(&mut self.inc_reset, &other.inc_reset);
                max_merge(&mut self.dec_reset, &other.dec_reset);
                self.stamp = self.stamp.max(other.stamp);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_base64_in_json_and_the_old_arrays_still_read() {
        let e = Entry::register(Some(vec![0, 1, 2, 250, 255]), st(5, 1));
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains(r#""value":"AAEC+v8=""#), "{json}");
        assert_eq!(serde_json::from_str::<Entry>(&json).unwrap(), e);
        // As an older node stored and sent it.
        let old = json.replace(r#""AAEC+v8=""#, "[0,1,2,250,255]");
        assert_eq!(serde_json::from_str::<Entry>(&old).unwrap(), e);
        // Tombstones: null, both ways.
        let t = Entry::register(None, st(6, 1));
        let json = serde_json::to_string(&t).unwrap();
        assert!(json.contains(r#""value":null"#), "{json}");
        assert_eq!(serde_json::from_str::<Entry>(&json).unwrap(), t);
        // A megabyte of binary value costs 4/3 of it, not 3.6 times.
        let big = Entry::register(Some((0..1 << 20).map(|i| i as u8).collect()), st(7, 1));
        let n = serde_json::to_string(&big).unwrap().len();
        assert!(n < (1 << 20) * 4 / 3 + 1024, "{n} bytes of JSON");
        // What is neither is refused with the reason.
        let bad = json.replace("null", r#""not base64!""#);
        let err = serde_json::from_str::<Entry>(&bad).unwrap_err().to_string();
        assert!(err.contains("not base64"), "{err}");
    }

    fn st(wall: u64, node: u64) -> Stamp {
        Stamp {
            wall_ms: wall,
            counter: 0,
            node,
        }
    }

    #[test]
    fn registers_keep_the_latest_write() {
        let mut a = Entry::register(Some(b"a".to_vec()), st(1, 1));
        let b = Entry::register(Some(b"b".to_vec()), st(2, 2));
        let mut b2 = b.clone();
        a.join(&b);
        b2.join(&Entry::register(Some(b"a".to_vec()), st(1, 1)));
        assert_eq!(a, b2);
        assert_eq!(a.value.as_deref(), Some(&b"b"[..]));
        a.join(&Entry::register(None, st(3, 1)));
        assert!(!a.is_present());
    }

    #[test]
    fn counters_count_every_increment() {
        let mut a = Entry::counter(st(1, 1));
        let mut b = Entry::counter(st(1, 2));
        a.add(1, 5, st(2, 1)).unwrap();
        b.add(2, 3, st(2, 2)).unwrap();
        b.add(2, -1, st(3, 2)).unwrap();
        a.join(&b);
        assert_eq!(a.count(), 7);
        a.join(&b);
        assert_eq!(a.count(), 7, "idempotent");
        a.reset(st(4, 1));
        assert_eq!(a.count(), 0);
        assert!(!a.is_present());
    }

    #[test]
    fn counters_refuse_to_leave_the_range_of_an_i64_and_merge_saturating() {
        let mut a = Entry::counter(st(1, 1));
        a.add(1, i64::MAX, st(2, 1)).unwrap();
        assert_eq!(a.add(1, 1, st(3, 1)), Err(Overflow));
        assert_eq!(a.count(), i64::MAX, "a refused increment changes nothing");
        a.add(1, i64::MIN, st(3, 1)).unwrap();
        assert_eq!(a.count(), -1);
        assert_eq!(a.add(1, i64::MIN, st(4, 1)), Err(Overflow));
        assert_eq!(a.count(), -1);
        // Two replicas each within the bound, past it together: the merged
        // value saturates the same way on both, it does not wrap.
        let mut x = Entry::counter(st(1, 1));
        let mut y = Entry::counter(st(1, 2));
        x.add(1, i64::MAX, st(2, 1)).unwrap();
        y.add(2, i64::MAX, st(2, 2)).unwrap();
        let mut xy = x.clone();
        xy.join(&y);
        y.join(&x);
        assert_eq!(xy.count(), i64::MAX);
        assert_eq!(y.count(), i64::MAX);
        assert_eq!(xy.add(1, 1, st(3, 1)), Err(Overflow));
    }

    #[test]
    fn the_clock_is_monotonic_and_bounded() {
        let mut c = Clock::new(1);
        let a = c.tick(100);
        let b = c.tick(100);
        assert!(b > a);
        c.observe(st(10_000_000, 2), 100);
        assert_eq!(c.skewed, 1);
        let d = c.tick(100);
        assert!(d.wall_ms <= 100 + c.max_skew_ms, "{d:?}");
        assert!(d > b);
    }
}
