//! CloudEvents 1.0: the event model, its validation, and the structured,
//! batch and binary HTTP modes (parsing and rendering; no I/O).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The prefix of the types of the events Verge emits about itself.
pub const PLATFORM_TYPE_PREFIX: &str = "dev.verge.";

/// The extension that counts how many functions an event chain went through.
pub const HOPS_EXTENSION: &str = "vergehops";

/// The hop count given to a count that does not parse or is out of range:
/// past any hop limit, so that whatever carries it is dead-lettered.
pub const HOPS_INVALID: u32 = u32::MAX;

/// Parses a hop count (`ce-vergehops`, the `vergehops` extension): decimal
/// digits only, at most `u32::MAX`; anything else is [`HOPS_INVALID`].
pub fn parse_hops(s: &str) -> u32 {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return HOPS_INVALID;
    }
    s.parse().unwrap_or(HOPS_INVALID)
}

/// The hop count of an event caused by something at `hops`: one more,
/// saturating at [`HOPS_INVALID`] (never wrapping to 0).
pub fn next_hop(hops: u32) -> u32 {
    hops.saturating_add(1)
}

/// Content type of structured mode.
pub const STRUCTURED: &str = "application/cloudevents+json";
/// Content type of batch mode.
pub const BATCH: &str = "application/cloudevents-batch+json";

/// Attributes the spec defines (anything else is an extension).
const CONTEXT: [&str; 10] = [
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
    "data_base64",
];

/// A CloudEvents 1.0 event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataschema: Option<String>,
    /// JSON data (or a JSON string for text data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// Binary data, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    /// Extension attributes (lowercase a-z0-9 names; string, number or boolean values).
    #[serde(flatten)]
    pub extensions: BTreeMap<String, Value>,
}

/// An event that breaks the CloudEvents rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("the event is not a JSON object; send a CloudEvents 1.0 JSON object (structured mode)")]
    NotAnObject,
    #[error("the batch is not a JSON array of events")]
    NotABatch,
    #[error("the event is missing the required attribute {0:?}")]
    Missing(&'static str),
    #[error("attribute {name:?} is invalid: {why}")]
    Invalid { name: String, why: String },
    #[error("event {index} of the batch: {error}")]
    InBatch {
        index: usize,
        error: Box<EventError>,
    },
    #[error("the body is not JSON: {0}")]
    Json(String),
    #[error(
        "not a CloudEvent: send structured mode (Content-Type: application/cloudevents+json), batch mode (application/cloudevents-batch+json), or binary mode (ce-specversion, ce-id, ce-source and ce-type headers)"
    )]
    NotCloudEvents,
}

fn invalid(name: &str, why: impl Into<String>) -> EventError {
    EventError::Invalid {
        name: name.to_string(),
        why: why.into(),
    }
}

impl CloudEvent {
    /// A new event with the required attributes; `time` now.
    pub fn new(id: impl Into<String>, source: impl Into<String>, ty: impl Into<String>) -> Self {
        Self {
            specversion: "1.0".into(),
            id: id.into(),
            source: source.into(),
            ty: ty.into(),
            subject: None,
            time: None,
            datacontenttype: None,
            dataschema: None,
            data: None,
            data_base64: None,
            extensions: BTreeMap::new(),
        }
    }

    /// Sets JSON data.
    pub fn with_data(mut self, data: Value) -> Self {
        self.datacontenttype = Some("application/json".into());
        self.data = Some(data);
        self
    }

    /// Parses and checks one structured-mode event.
    pub fn from_value(v: Value) -> Result<Self, EventError> {
        let Value::Object(map) = v else {
            return Err(EventError::NotAnObject);
        };
        for required in ["specversion", "id", "source", "type"] {
            match map.get(required) {
                None | Some(Value::Null) => return Err(EventError::Missing(required)),
                Some(Value::String(s)) if s.is_empty() => {
                    return Err(invalid(required, "must not be empty"));
                }
                Some(Value::String(_)) => {}
                Some(_) => return Err(invalid(required, "must be a string")),
            }
        }
        if map.get("specversion").and_then(Value::as_str) != Some("1.0") {
            return Err(invalid(
                "specversion",
                "Verge accepts CloudEvents 1.0: set it to \"1.0\"",
            ));
        }
        for optional in [
            "subject",
            "time",
            "datacontenttype",
            "dataschema",
            "data_base64",
        ] {
            match map.get(optional) {
                None | Some(Value::Null) | Some(Value::String(_)) => {}
                Some(_) => return Err(invalid(optional, "must be a string")),
            }
        }
        if map.contains_key("data") && map.contains_key("data_base64") {
            return Err(invalid(
                "data_base64",
                "give either data or data_base64, not both",
            ));
        }
        if let Some(Value::String(b64)) = map.get("data_base64")
            && base64_decode(b64).is_none()
        {
            return Err(invalid(
                "data_base64",
                "is not valid base64: use the standard alphabet (A-Z a-z 0-9 + /) with = padding and no spaces",
            ));
        }
        for (name, value) in &map {
            if CONTEXT.contains(&name.as_str()) {
                continue;
            }
            check_extension(name, value)?;
        }
        let event: CloudEvent = serde_json::from_value(Value::Object(map))
            .map_err(|e| EventError::Json(e.to_string()))?;
        if let Some(t) = &event.time {
            check_time(t)?;
        }
        Ok(event)
    }

    /// Parses a structured-mode body.
    pub fn from_structured(body: &[u8]) -> Result<Self, EventError> {
        let v: Value = serde_json::from_slice(body).map_err(|e| EventError::Json(e.to_string()))?;
        Self::from_value(v)
    }

    /// Parses a batch-mode body (a JSON array of structured events).
    pub fn from_batch(body: &[u8]) -> Result<Vec<Self>, EventError> {
        let v: Value = serde_json::from_slice(body).map_err(|e| EventError::Json(e.to_string()))?;
        let Value::Array(items) = v else {
            return Err(EventError::NotABatch);
        };
        items
            .into_iter()
            .enumerate()
            .map(|(index, item)| {
                Self::from_value(item).map_err(|e| EventError::InBatch {
                    index,
                    error: Box::new(e),
                })
            })
            .collect()
    }

    /// Parses binary mode: attributes from `ce-*` headers, the content type
    /// as `datacontenttype`, the body as data.
    pub fn from_binary<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Self, EventError> {
        let mut map = serde_json::Map::new();
        for (name, value) in headers {
            let lower = name.to_ascii_lowercase();
            if let Some(attr) = lower.strip_prefix("ce-") {
                if attr == "data" || attr == "data_base64" {
                    return Err(invalid(attr, "data travels in the body in binary mode"));
                }
                map.insert(attr.to_string(), Value::String(percent_decode(value)));
            }
        }
        if let Some(ct) = content_type {
            map.insert("datacontenttype".into(), Value::String(ct.to_string()));
        }
        if !body.is_empty() {
            let json = content_type.is_some_and(is_json);
            if json {
                let v: Value = serde_json::from_slice(body).map_err(|e| {
                    invalid(
                        "data",
                        format!("the content type says JSON but the body is not: {e}"),
                    )
                })?;
                map.insert("data".into(), v);
            } else if let Ok(text) = std::str::from_utf8(body) {
                map.insert("data".into(), Value::String(text.to_string()));
            } else {
                map.insert("data_base64".into(), Value::String(base64_encode(body)));
            }
        }
        Self::from_value(Value::Object(map))
    }

    /// Parses an HTTP message as CloudEvents: batch or structured mode by its
    /// content type, else binary mode (which needs `ce-*` headers).
    pub fn from_http<'a>(
        content_type: Option<&str>,
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        body: &[u8],
    ) -> Result<Vec<Self>, EventError> {
        let base = content_type
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if base == BATCH {
            return Self::from_batch(body);
        }
        if base == STRUCTURED {
            return Self::from_structured(body).map(|e| vec![e]);
        }
        let headers: Vec<(&str, &str)> = headers.into_iter().collect();
        if !headers
            .iter()
            .any(|(k, _)| k.len() > 3 && k[..3].eq_ignore_ascii_case("ce-"))
        {
            return Err(EventError::NotCloudEvents);
        }
        Self::from_binary(headers, content_type, body).map(|e| vec![e])
    }

    /// Renders binary mode: `ce-*` headers (with the content type) and the body.
    pub fn to_binary(&self) -> (Vec<(String, String)>, Vec<u8>) {
        let mut headers = vec![
            ("ce-specversion".to_string(), self.specversion.clone()),
            ("ce-id".to_string(), self.id.clone()),
            ("ce-source".to_string(), self.source.clone()),
            ("ce-type".to_string(), self.ty.clone()),
        ];
        for (name, value) in [
            ("subject", &self.subject),
            ("time", &self.time),
            ("dataschema", &self.dataschema),
        ] {
            if let Some(v) = value {
                headers.push((format!("ce-{name}"), percent_encode(v)));
            }
        }
        for (name, value) in &self.extensions {
            let v = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            headers.push((format!("ce-{name}"), percent_encode(&v)));
        }
        let body = match (&self.data, &self.data_base64) {
            (Some(Value::String(s)), _)
                if !self.datacontenttype.as_deref().is_some_and(is_json) =>
            {
                s.as_bytes().to_vec()
            }
            (Some(v), _) => v.to_string().into_bytes(),
            (None, Some(b64)) => base64_decode(b64).unwrap_or_default(),
            (None, None) => Vec::new(),
        };
        let ct = self.datacontenttype.clone().or_else(|| {
            self.data.as_ref().map(|d| {
                if d.is_string() {
                    "text/plain"
                } else {
                    "application/json"
                }
                .to_string()
            })
        });
        if let Some(ct) = ct {
            headers.push(("content-type".to_string(), ct));
        }
        (headers, body)
    }

    /// The hop count of the chain this event belongs to (0 if unset). A
    /// count that does not parse or is out of range is [`HOPS_INVALID`],
    /// past any hop limit: it is never wrapped or read as 0.
    pub fn hops(&self) -> u32 {
        match self.extensions.get(HOPS_EXTENSION) {
            None | Some(Value::Null) => 0,
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(HOPS_INVALID),
            Some(Value::String(s)) => parse_hops(s),
            Some(_) => HOPS_INVALID,
        }
    }

    /// Sets the hop count.
    pub fn set_hops(&mut self, hops: u32) {
        self.extensions
            .insert(HOPS_EXTENSION.to_string(), Value::String(hops.to_string()));
    }

    /// The distributed-tracing extension's `traceparent`, if valid.
    pub fn trace_parent(&self) -> Option<crate::SpanContext> {
        match self.extensions.get(crate::TRACEPARENT)? {
            Value::String(s) => crate::SpanContext::parse(s),
            _ => None,
        }
    }

    /// Sets the distributed-tracing extension's `traceparent` unless the
    /// event has one.
    pub fn trace_parent_or(&mut self, traceparent: &str) {
        self.extensions
            .entry(crate::TRACEPARENT.to_string())
            .or_insert_with(|| Value::String(traceparent.to_string()));
    }
}

fn is_json(content_type: &str) -> bool {
    let ct = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    ct == "application/json" || ct.ends_with("+json") || ct == "text/json"
}

fn check_extension(name: &str, value: &Value) -> Result<(), EventError> {
    let ok_name = !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok_name {
        return Err(invalid(
            name,
            "extension names are 1 to 20 characters from a-z and 0-9",
        ));
    }
    match value {
        Value::String(_) | Value::Number(_) | Value::Bool(_) => Ok(()),
        _ => Err(invalid(
            name,
            "extension values are strings, numbers or booleans",
        )),
    }
}

/// RFC 3339: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`, a real date and time
/// (parsed by `jiff`: month 13 or February 30 are refused).
fn check_time(t: &str) -> Result<(), EventError> {
    let b = t.as_bytes();
    let shaped = b.len() >= 20
        && matches!(b[10], b'T' | b't')
        && b[13] == b':'
        && b[16] == b':'
        && b[..4].iter().all(u8::is_ascii_digit);
    if shaped && t.parse::<jiff::Timestamp>().is_ok() {
        Ok(())
    } else {
        Err(invalid(
            "time",
            "must be an RFC 3339 timestamp such as 2026-11-26T12:00:00Z",
        ))
    }
}

/// What binary-mode header values percent-encode: everything outside
/// printable ASCII, and `%` and `"` (CloudEvents HTTP binding 3.1.3.2).
const HEADER_ESCAPES: &percent_encoding::AsciiSet =
    &percent_encoding::CONTROLS.add(b'%').add(b'"').add(0x7f);

fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, HEADER_ESCAPES).to_string()
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn base64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Standard base64 with padding, strictly (RFC 4648 section 4).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn times_are_real_dates_and_data_base64_must_decode() {
        let base = |extra: serde_json::Value| {
            let mut v = json!({"specversion":"1.0","id":"1","source":"/s","type":"t"});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            CloudEvent::from_value(v)
        };
        for ok in [
            "2026-11-26T12:00:00Z",
            "2026-11-26t12:00:00.123456z",
            "2026-02-28T23:59:59-05:30",
        ] {
            assert!(base(json!({ "time": ok })).is_ok(), "{ok}");
        }
        for bad in [
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-11-26T25:00:00Z",
            "2026-11-26 12:00:00Z",
            "2026-11-26T12:00:00",
            "yesterday",
        ] {
            assert!(base(json!({ "time": bad })).is_err(), "{bad}");
        }
        assert!(base(json!({ "data_base64": "/wAQ" })).is_ok());
        for bad in ["/wA", "*&^%", "/w AQ", "/wAQ===="] {
            let err = base(json!({ "data_base64": bad })).unwrap_err();
            assert!(err.to_string().contains("data_base64"), "{bad}: {err}");
        }
    }

    #[test]
    fn hop_counts_that_do_not_parse_are_past_any_limit() {
        assert_eq!(parse_hops("0"), 0);
        assert_eq!(parse_hops(" 7 "), 7);
        assert_eq!(parse_hops("4294967295"), u32::MAX);
        for bad in [
            "",
            "-1",
            "+1",
            "1.0",
            "4294967296",
            "99999999999999999999",
            "x",
        ] {
            assert_eq!(parse_hops(bad), HOPS_INVALID, "{bad:?}");
        }
        assert_eq!(
            next_hop(HOPS_INVALID),
            HOPS_INVALID,
            "saturates, never wraps"
        );
        let mut e = CloudEvent::new("1", "/s", "t");
        assert_eq!(e.hops(), 0);
        e.extensions
            .insert(HOPS_EXTENSION.into(), json!(5_000_000_000u64));
        assert_eq!(e.hops(), HOPS_INVALID);
        e.extensions.insert(HOPS_EXTENSION.into(), json!(12));
        assert_eq!(e.hops(), 12);
    }

    #[test]
    fn binary_header_values_round_trip_through_percent_encoding() {
        for v in [
            "plain",
            "100%",
            "say \"hi\"",
            "caf\u{e9} \u{1f600}",
            "tab\there",
        ] {
            let enc = percent_encode(v);
            assert!(enc.bytes().all(|b| (0x20..0x7f).contains(&b)), "{enc}");
            assert_eq!(percent_decode(&enc), v);
        }
    }

    #[test]
    fn structured_events_are_checked() {
        let ok = json!({"specversion":"1.0","id":"1","source":"/s","type":"t","time":"2026-11-26T12:00:00.5+01:00","acme":"x","data":{"a":1}});
        let e = CloudEvent::from_value(ok).unwrap();
        assert_eq!(e.extensions["acme"], "x");
        let missing = json!({"specversion":"1.0","source":"/s","type":"t"});
        assert_eq!(
            CloudEvent::from_value(missing),
            Err(EventError::Missing("id"))
        );
        let bad_version = json!({"specversion":"0.3","id":"1","source":"/s","type":"t"});
        assert!(
            CloudEvent::from_value(bad_version)
                .unwrap_err()
                .to_string()
                .contains("specversion")
        );
        let bad_time =
            json!({"specversion":"1.0","id":"1","source":"/s","type":"t","time":"yesterday"});
        assert!(
            CloudEvent::from_value(bad_time)
                .unwrap_err()
                .to_string()
                .contains("time")
        );
        let bad_ext = json!({"specversion":"1.0","id":"1","source":"/s","type":"t","Bad_Name":"x"});
        assert!(
            CloudEvent::from_value(bad_ext)
                .unwrap_err()
                .to_string()
                .contains("Bad_Name")
        );
        let batch = CloudEvent::from_batch(br#"[{"specversion":"1.0","id":"1","source":"/s","type":"t"},{"specversion":"1.0","id":"2","source":"/s"}]"#);
        assert!(
            batch
                .unwrap_err()
                .to_string()
                .contains("event 1 of the batch")
        );
    }

    #[test]
    fn binary_mode_round_trips() {
        let mut e = CloudEvent::new("id-1", "/src", "com.acme.thing").with_data(json!({"n": 1}));
        e.subject = Some("a/ü".into());
        e.set_hops(3);
        let (headers, body) = e.to_binary();
        let ct = headers
            .iter()
            .find(|(k, _)| k == "content-type")
            .map(|(_, v)| v.as_str());
        let back = CloudEvent::from_binary(
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            ct,
            &body,
        )
        .unwrap();
        assert_eq!(back, e);
        assert_eq!(back.hops(), 3);
        let raw = CloudEvent::from_binary(
            [
                ("ce-specversion", "1.0"),
                ("ce-id", "x"),
                ("ce-source", "/s"),
                ("ce-type", "t"),
            ],
            Some("application/octet-stream"),
            &[0xff, 0x00, 0x10],
        )
        .unwrap();
        assert_eq!(raw.data_base64.as_deref(), Some("/wAQ"));
        assert_eq!(raw.to_binary().1, vec![0xff, 0x00, 0x10]);
        assert!(CloudEvent::from_binary([("ce-id", "x")], None, b"").is_err());
    }
}
