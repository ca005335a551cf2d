//! OTLP/JSON encoding of finished spans: one `ExportTraceServiceRequest` per line.
//!
//! Follows the OTLP JSON rules (OTLP specification, "JSON Protobuf Encoding"): trace and span IDs
//! as lowercase hex strings, lowerCamelCase field names, enums as integers, 64-bit integers as
//! decimal strings. Runs on the exporter thread only, never on a Varnish worker.

use serde_json::{json, Map, Value as Json};

use crate::span::{SpanRecord, Value};

/// What describes this process in every export (OTLP `Resource`).
#[derive(Clone, Debug)]
pub struct Resource {
    pub attributes: Vec<(String, String)>,
}

impl Resource {
    pub fn from_env() -> Self {
        let service =
            std::env::var("OTEL_SERVICE_NAME").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "varnish".to_owned());
        let mut attributes = vec![
            ("service.name".to_owned(), service),
            ("telemetry.sdk.name".to_owned(), "vmod-opentracing".to_owned()),
            ("telemetry.sdk.language".to_owned(), "rust".to_owned()),
            ("telemetry.sdk.version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
        ];
        if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            attributes.push(("host.name".to_owned(), host.trim().to_owned()));
        }
        Resource { attributes }
    }
}

pub const SCOPE_NAME: &str = "vmod-opentracing";

/// W3C trace flags occupy bits 0-7 of OTLP `Span.flags`; bits 8 and 9 say whether the parent is
/// known to be remote (`SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK`, `SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK`).
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

fn any_value(v: &Value) -> Json {
    match v {
        Value::Str(s) => json!({ "stringValue": s }),
        Value::Int(i) => json!({ "intValue": i.to_string() }),
        Value::Float(f) if f.is_finite() => json!({ "doubleValue": f }),
        // JSON has no NaN/Infinity; the proto3 JSON mapping spells them as strings.
        Value::Float(f) => {
            json!({ "doubleValue": if f.is_nan() { "NaN" } else if *f > 0.0 { "Infinity" } else { "-Infinity" } })
        }
        Value::Bool(b) => json!({ "boolValue": b }),
    }
}

fn key_values<'a>(pairs: impl Iterator<Item = (&'a str, Json)>) -> Json {
    Json::Array(pairs.map(|(k, v)| json!({ "key": k, "value": v })).collect())
}

pub fn span(r: &SpanRecord) -> Json {
    let mut s = Map::new();
    s.insert("traceId".into(), json!(r.trace_id.to_hex()));
    s.insert("spanId".into(), json!(r.span_id.to_hex()));
    if let Some(ts) = &r.tracestate {
        s.insert("traceState".into(), json!(ts));
    }
    if let Some(p) = r.parent_span_id {
        s.insert("parentSpanId".into(), json!(p.to_hex()));
    }
    let mut flags = u32::from(r.flags) | HAS_IS_REMOTE;
    if r.parent_is_remote {
        flags |= IS_REMOTE;
    }
    s.insert("flags".into(), json!(flags));
    s.insert("name".into(), json!(r.name));
    s.insert("kind".into(), json!(r.kind.otlp()));
    s.insert("startTimeUnixNano".into(), json!(r.start_unix_nano.to_string()));
    s.insert("endTimeUnixNano".into(), json!(r.end_unix_nano.to_string()));
    s.insert("attributes".into(), key_values(r.attributes.iter().map(|a| (a.key.as_ref(), any_value(&a.value)))));
    if r.dropped_attributes > 0 {
        s.insert("droppedAttributesCount".into(), json!(r.dropped_attributes));
    }
    if !r.events.is_empty() {
        let events: Vec<Json> =
            r.events.iter().map(|e| json!({ "timeUnixNano": e.time_unix_nano.to_string(), "name": e.name })).collect();
        s.insert("events".into(), Json::Array(events));
    }
    if !r.links.is_empty() {
        let links: Vec<Json> =
            r.links.iter().map(|l| json!({ "traceId": l.trace_id.to_hex(), "spanId": l.span_id.to_hex() })).collect();
        s.insert("links".into(), Json::Array(links));
    }
    let mut status = Map::new();
    if let Some(m) = &r.status_message {
        status.insert("message".into(), json!(m));
    }
    if r.status.otlp() != 0 {
        status.insert("code".into(), json!(r.status.otlp()));
    }
    s.insert("status".into(), Json::Object(status));
    Json::Object(s)
}

/// Encodes one batch as a single line (no trailing newline).
pub fn export_request(resource: &Resource, spans: &[SpanRecord]) -> String {
    let attrs = key_values(resource.attributes.iter().map(|(k, v)| (k.as_str(), json!({ "stringValue": v }))));
    let body = json!({
        "resourceSpans": [{
            "resource": { "attributes": attrs },
            "scopeSpans": [{
                "scope": { "name": SCOPE_NAME, "version": env!("CARGO_PKG_VERSION") },
                "spans": spans.iter().map(span).collect::<Vec<_>>(),
            }],
        }],
    });
    body.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{SpanId, TraceId};
    use crate::span::{SpanKind, StatusCode};

    fn sample() -> SpanRecord {
        let mut r = SpanRecord::new(SpanKind::Server, TraceId([0xab; 16]), SpanId([0x01; 8]), Some(SpanId([0x02; 8])));
        r.parent_is_remote = true;
        r.name = "GET".into();
        r.start_unix_nano = 1_700_000_000_000_001_000;
        r.end_unix_nano = 1_700_000_000_000_002_000;
        r.set_int("http.response.status_code", 503);
        r.set_str("url.path", "/a\"b");
        r.status = StatusCode::Error;
        r
    }

    #[test]
    fn encodes_ids_enums_and_int64_per_otlp_json_rules() {
        let line =
            export_request(&Resource { attributes: vec![("service.name".into(), "varnish".into())] }, &[sample()]);
        assert!(!line.contains('\n'));
        let v: Json = serde_json::from_str(&line).unwrap();
        let span = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], "abababababababababababababababab");
        assert_eq!(span["spanId"], "0101010101010101");
        assert_eq!(span["parentSpanId"], "0202020202020202");
        assert_eq!(span["kind"], 2);
        assert_eq!(span["flags"], 0x301);
        assert_eq!(span["startTimeUnixNano"], "1700000000000001000");
        assert_eq!(span["status"]["code"], 2);
        assert_eq!(span["attributes"][0]["key"], "http.response.status_code");
        assert_eq!(span["attributes"][0]["value"]["intValue"], "503");
        assert_eq!(span["attributes"][1]["value"]["stringValue"], "/a\"b");
        assert_eq!(v["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"], "varnish");
    }

    #[test]
    fn root_span_has_no_parent_field_and_unset_status_has_no_code() {
        let mut r = sample();
        r.parent_span_id = None;
        r.parent_is_remote = false;
        r.status = StatusCode::Unset;
        let v = span(&r);
        assert!(v.get("parentSpanId").is_none());
        assert!(v["status"].get("code").is_none());
        assert_eq!(v["flags"], 0x101);
    }
}
