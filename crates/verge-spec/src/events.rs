//! CloudEvents 1.0: the event model, its validation, and the structured,
//! batch and binary HTTP modes (parsing and rendering; no I/O).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The prefix of the types of the events Verge emits about itself.
pub const PLATFORM_TYPE_PREFIX: &str = "dev.verge.";

/// The extension that counts how many functions an event chain went through.
pub const HOPS_EXTENSION: &str = "vergehops";

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

    /// The hop count of the chain this event belongs to (0 if unset).
    pub fn hops(&self) -> u32 {
        match self.extensions.get(HOPS_EXTENSION) {
            Some(Value::Number(n)) => n.as_u64().unwrap_or(0) as u32,
            Some(Value::String(s)) => s.parse().unwrap_or(0),
            _ => 0,
        }
    }

    /// Sets the hop count.
    pub fn set_hops(&mut self, hops: u32) {
        self.extensions
            .insert(HOPS_EXTENSION.to_string(), Value::String(hops.to_string()));
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

/// RFC 3339: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
fn check_time(t: &str) -> Result<(), EventError> {
    let b = t.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    let ok = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && (b[10] == b'T' || b[10] == b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && {
            let mut i = 19;
            if b.get(i) == Some(&b'.') {
                i += 1;
                while b.get(i).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                }
            }
            match b.get(i) {
                Some(b'Z' | b'z') => i + 1 == b.len(),
                Some(b'+' | b'-') => {
                    b.len() == i + 6
                        && digits(i + 1..i + 3)
                        && b[i + 3] == b':'
                        && digits(i + 4..i + 6)
                }
                _ => false,
            }
        };
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "time",
            "must be an RFC 3339 timestamp such as 2026-11-26T12:00:00Z",
        ))
    }
}

/// Binary-mode header values are percent-encoded outside printable ASCII.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' && b != b'"' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        if c == b'=' {
            break;
        }
        let v = B64.iter().position(|&x| x == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
