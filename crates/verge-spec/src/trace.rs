//! W3C Trace Context (`traceparent`) and the trace of one invocation.
//!
//! Every invocation is one span. Its parent is the span that caused it:
//! the `traceparent` of a user's request, the emitting invocation of an
//! event (the CloudEvents distributed-tracing extension `traceparent`), the
//! enqueuing invocation of an async job (each attempt is a child of it),
//! the calling invocation of a call. Without one, the invocation starts a
//! trace.

use serde::{Deserialize, Serialize};

/// The W3C trace context header (and CloudEvents extension attribute).
pub const TRACEPARENT: &str = "traceparent";
/// Vendor trace state, passed on as received.
pub const TRACESTATE: &str = "tracestate";
/// Length of a version-00 `traceparent` value.
pub const TRACEPARENT_LEN: usize = 55;

/// A span's identity as `traceparent` carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

fn hex_nibble(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// Lowercase hex into `out` (exactly `2 * out.len()` digits).
fn decode_hex(s: &str, out: &mut [u8]) -> Option<()> {
    let s = s.as_bytes();
    if s.len() != out.len() * 2 {
        return None;
    }
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = hex_nibble(pair[0])? << 4 | hex_nibble(pair[1])?;
    }
    Some(())
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

impl SpanContext {
    /// Parses a `traceparent` value by the W3C rules: version `00` has
    /// exactly four fields; a later version may add fields after them;
    /// version `ff`, all-zero ids and uppercase hex are invalid.
    pub fn parse(value: &str) -> Option<SpanContext> {
        let value = value.trim();
        let mut fields = value.split('-');
        let version = fields.next()?;
        let mut v = [0u8; 1];
        decode_hex(version, &mut v)?;
        if v[0] == 0xff {
            return None;
        }
        let mut ctx = SpanContext::default();
        decode_hex(fields.next()?, &mut ctx.trace_id)?;
        decode_hex(fields.next()?, &mut ctx.span_id)?;
        let mut flags = [0u8; 1];
        decode_hex(fields.next()?, &mut flags)?;
        ctx.flags = flags[0];
        if v[0] == 0 && fields.next().is_some() {
            return None;
        }
        if ctx.trace_id == [0; 16] || ctx.span_id == [0; 8] {
            return None;
        }
        Some(ctx)
    }

    /// As a `traceparent` value (version 00).
    pub fn traceparent(&self) -> String {
        let bytes = self.traceparent_bytes();
        bytes.iter().map(|b| char::from(*b)).collect()
    }

    /// As a `traceparent` value (version 00), without allocating.
    pub fn traceparent_bytes(&self) -> [u8; TRACEPARENT_LEN] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b'-'; TRACEPARENT_LEN];
        out[0] = b'0';
        out[1] = b'0';
        let mut at = 3;
        for b in &self.trace_id {
            out[at] = DIGITS[usize::from(b >> 4)];
            out[at + 1] = DIGITS[usize::from(b & 15)];
            at += 2;
        }
        at += 1;
        for b in &self.span_id {
            out[at] = DIGITS[usize::from(b >> 4)];
            out[at + 1] = DIGITS[usize::from(b & 15)];
            at += 2;
        }
        at += 1;
        out[at] = DIGITS[usize::from(self.flags >> 4)];
        out[at + 1] = DIGITS[usize::from(self.flags & 15)];
        out
    }
}

/// How an invocation was triggered (OpenTelemetry's `faas.trigger`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Trigger {
    /// A request on a user route, the control API's invoke, or a call.
    #[default]
    Http,
    /// An event delivered to a trigger.
    PubSub,
    /// A cron schedule.
    Timer,
    /// An asynchronous invocation.
    Other,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Http => "http",
            Trigger::PubSub => "pubsub",
            Trigger::Timer => "timer",
            Trigger::Other => "other",
        }
    }
}

/// The trace of one invocation: its own span and the span that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct InvocationTrace {
    #[serde(with = "hex16")]
    pub trace_id: [u8; 16],
    #[serde(with = "hex8")]
    pub span_id: [u8; 8],
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "hex8_opt",
        rename = "parent_span_id"
    )]
    pub parent: Option<[u8; 8]>,
    /// Trace flags, passed on from the parent (sampled when it started here).
    #[serde(default = "sampled", skip_serializing_if = "is_sampled")]
    pub flags: u8,
}

fn sampled() -> u8 {
    1
}

fn is_sampled(f: &u8) -> bool {
    *f == 1
}

impl InvocationTrace {
    /// The trace of an invocation caused by `parent` (none: a new trace),
    /// with ids drawn from `random` (16 bytes of trace id, then 8 of span
    /// id; an all-zero id, which W3C forbids, is made non-zero).
    pub fn start(parent: Option<SpanContext>, random: [u8; 24]) -> InvocationTrace {
        let mut span_id = [0u8; 8];
        span_id.copy_from_slice(&random[16..]);
        if span_id == [0; 8] {
            span_id[7] = 1;
        }
        match parent {
            Some(p) => InvocationTrace {
                trace_id: p.trace_id,
                span_id,
                parent: Some(p.span_id),
                flags: p.flags,
            },
            None => {
                let mut trace_id = [0u8; 16];
                trace_id.copy_from_slice(&random[..16]);
                if trace_id == [0; 16] {
                    trace_id[15] = 1;
                }
                InvocationTrace {
                    trace_id,
                    span_id,
                    parent: None,
                    flags: 1,
                }
            }
        }
    }

    /// This invocation's span, as the parent of what it causes.
    pub fn context(&self) -> SpanContext {
        SpanContext {
            trace_id: self.trace_id,
            span_id: self.span_id,
            flags: self.flags,
        }
    }

    /// `traceparent` naming this invocation's span.
    pub fn traceparent(&self) -> String {
        self.context().traceparent()
    }

    /// From its stored hex columns (`None` if the trace or span id is
    /// absent or not hex).
    pub fn from_hex(
        trace_id: Option<&str>,
        span_id: Option<&str>,
        parent: Option<&str>,
    ) -> Option<InvocationTrace> {
        let mut t = InvocationTrace {
            flags: 1,
            ..InvocationTrace::default()
        };
        decode_hex(trace_id?, &mut t.trace_id)?;
        decode_hex(span_id?, &mut t.span_id)?;
        if let Some(p) = parent {
            let mut out = [0u8; 8];
            decode_hex(p, &mut out)?;
            t.parent = Some(out);
        }
        Some(t)
    }

    /// The trace id in hex (what `verge invocations --trace` takes).
    pub fn trace_hex(&self) -> String {
        to_hex(&self.trace_id)
    }
}

/// Where an invocation's time went before its guest ran; kept for its
/// trace's spans, not in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timings {
    /// Waiting for a concurrency slot (admission), µs.
    pub admission_wait_us: u64,
    /// Loading the version's code (compile or cache read) for this
    /// request, µs (0: it was loaded).
    pub load_us: u64,
    /// A job's time in the queue, from when it was due to its start, µs.
    pub queue_wait_us: u64,
    pub trigger: Trigger,
}

/// A request extension the node puts on every invocation's request: its
/// trace and timings, copied into its usage record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvocationContext {
    pub trace: InvocationTrace,
    pub timings: Timings,
}

macro_rules! hex_array {
    ($name:ident, $n:literal) => {
        mod $name {
            use serde::{Deserialize, Deserializer, Serializer};
            pub fn serialize<S: Serializer>(v: &[u8; $n], s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&super::to_hex(v))
            }
            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; $n], D::Error> {
                let s = String::deserialize(d)?;
                let mut out = [0u8; $n];
                super::decode_hex(&s, &mut out).ok_or_else(|| {
                    serde::de::Error::custom(concat!($n, " bytes of lowercase hex"))
                })?;
                Ok(out)
            }
        }
    };
}
hex_array!(hex16, 16);
hex_array!(hex8, 8);

mod hex8_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &Option<[u8; 8]>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(&super::to_hex(v)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 8]>, D::Error> {
        let Some(s) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        let mut out = [0u8; 8];
        super::decode_hex(&s, &mut out)
            .ok_or_else(|| serde::de::Error::custom("8 bytes of lowercase hex"))?;
        Ok(Some(out))
    }
}

/// Whether `s` is a trace id as `verge invocations --trace` takes it.
pub fn is_trace_id(s: &str) -> bool {
    let mut out = [0u8; 16];
    decode_hex(s, &mut out).is_some() && out != [0; 16]
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips() {
        let ctx = SpanContext::parse(EXAMPLE).expect("valid");
        assert_eq!(to_hex(&ctx.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(to_hex(&ctx.span_id), "00f067aa0ba902b7");
        assert_eq!(ctx.flags, 1);
        assert_eq!(ctx.traceparent(), EXAMPLE);
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(SpanContext::parse(bad), None, "{bad:?}");
        }
        // A later version may carry more fields.
        assert!(
            SpanContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more")
                .is_some()
        );
    }

    #[test]
    fn an_invocation_is_a_child_of_its_parent_or_starts_a_trace() {
        let parent = SpanContext::parse(EXAMPLE).unwrap();
        let child = InvocationTrace::start(Some(parent), [7; 24]);
        assert_eq!(child.trace_id, parent.trace_id);
        assert_eq!(child.parent, Some(parent.span_id));
        assert_eq!(child.span_id, [7; 8]);
        let root = InvocationTrace::start(None, [0; 24]);
        assert_eq!(root.parent, None);
        assert_ne!(root.trace_id, [0; 16]);
        assert_ne!(root.span_id, [0; 8]);
        assert!(SpanContext::parse(&root.traceparent()).is_some());
        let json = serde_json::to_value(child).unwrap();
        assert_eq!(json["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(json["parent_span_id"], "00f067aa0ba902b7");
        let back: InvocationTrace = serde_json::from_value(json).unwrap();
        assert_eq!(back, child);
    }
}
