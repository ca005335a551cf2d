//! OTLP/JSON encoding of finished spans: one `ExportTraceServiceRequest` per line.
//!
//! Follows the OTLP JSON rules (OTLP specification, "JSON Protobuf Encoding"): trace and span IDs
//! as lowercase hex strings, lowerCamelCase field names, enums as integers, 64-bit integers as
//! decimal strings. Runs on the exporter thread only, never on a Varnish worker.

use std::borrow::Borrow;

use crate::span::{SpanRecord, ValueRef};

pub use super::resource::Resource;

pub const SCOPE_NAME: &str = "vmod-opentracing";

/// W3C trace flags occupy bits 0-7 of OTLP `Span.flags`; bits 8 and 9 say whether the parent is
/// known to be remote (`SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK`, `SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK`).
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

// The encoder writes JSON text directly into a reused buffer: no intermediate values, no
// allocation per span once the buffer has grown (it runs for every exported span).

/// Whether `bytes` hold a control character, `"` or `\\`: eight bytes at a time (a byte at a time
/// was about 5 instructions a byte, over most of a span's text).
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    // Exact tests for "some byte is zero" and "some byte is below n" (n <= 128), from
    // Bit Twiddling Hacks; bytes of 0x80 and above (UTF-8) never match.
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH != 0;
    let has_below = |v: u64, n: u8| v.wrapping_sub(ONES * u64::from(n)) & !v & HIGH != 0;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let v = u64::from_le_bytes(word.try_into().unwrap_or_default());
        if has_below(v, 0x20) || has_zero(v ^ (ONES * u64::from(b'"'))) || has_zero(v ^ (ONES * u64::from(b'\\'))) {
            return true;
        }
    }
    words.remainder().iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

fn string(out: &mut String, s: &str) {
    if !needs_escape(s.as_bytes()) {
        // The common case: nothing to escape, one copy.
        out.reserve(s.len() + 2);
        out.push('"');
        out.push_str(s);
        out.push('"');
        return;
    }
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            out.push_str(&format!("\\u{b:04x}"));
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

fn hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out.push('"');
}

fn number(out: &mut String, n: impl itoa::Integer) {
    out.push_str(itoa::Buffer::new().format(n));
}

fn float(out: &mut String, f: f64) {
    use std::fmt::Write;
    // `{:?}` switches to an exponent for very large and very small values ("1e300"), which
    // JSON allows; `{}` would print f64::MAX as 309 digits, which JSON parsers refuse as out of
    // range.
    let _ = write!(out, "{f:?}");
}

/// A 64-bit integer as the proto3 JSON mapping wants it: a decimal string.
fn int64(out: &mut String, n: impl itoa::Integer) {
    out.push('"');
    number(out, n);
    out.push('"');
}

fn any_value(out: &mut String, v: ValueRef<'_>) {
    match v {
        ValueRef::Str(s) => {
            out.push_str("{\"stringValue\":");
            string(out, s);
        }
        ValueRef::StrArray(v) => {
            out.push_str("{\"arrayValue\":{\"values\":[");
            for (i, s) in v.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str("{\"stringValue\":");
                string(out, s);
                out.push('}');
            }
            out.push_str("]}");
        }
        ValueRef::Int(i) => {
            out.push_str("{\"intValue\":");
            int64(out, i);
        }
        // JSON has no NaN/Infinity; the proto3 JSON mapping spells them as strings.
        ValueRef::Float(f) if f.is_nan() => out.push_str("{\"doubleValue\":\"NaN\""),
        ValueRef::Float(f) if f.is_infinite() => {
            out.push_str(if f > 0.0 { "{\"doubleValue\":\"Infinity\"" } else { "{\"doubleValue\":\"-Infinity\"" })
        }
        ValueRef::Float(f) => {
            out.push_str("{\"doubleValue\":");
            float(out, f);
        }
        ValueRef::Bool(b) => {
            out.push_str("{\"boolValue\":");
            out.push_str(if b { "true" } else { "false" });
        }
    }
    out.push('}');
}

fn key_value(out: &mut String, key: &str, value: ValueRef<'_>) {
    out.push_str("{\"key\":");
    string(out, key);
    out.push_str(",\"value\":");
    any_value(out, value);
    out.push('}');
}

/// One span, as an OTLP/JSON `Span` object.
pub fn write_span(out: &mut String, r: &SpanRecord) {
    out.push_str("{\"traceId\":");
    hex(out, &r.trace_id.0);
    out.push_str(",\"spanId\":");
    hex(out, &r.span_id.0);
    if let Some(ts) = &r.tracestate {
        out.push_str(",\"traceState\":");
        string(out, ts);
    }
    if let Some(p) = r.parent_span_id {
        out.push_str(",\"parentSpanId\":");
        hex(out, &p.0);
    }
    let mut flags = u32::from(r.flags) | HAS_IS_REMOTE;
    if r.parent_is_remote {
        flags |= IS_REMOTE;
    }
    out.push_str(",\"flags\":");
    number(out, flags);
    out.push_str(",\"name\":");
    string(out, &r.name);
    out.push_str(",\"kind\":");
    number(out, r.kind.otlp());
    out.push_str(",\"startTimeUnixNano\":");
    int64(out, r.start_unix_nano);
    out.push_str(",\"endTimeUnixNano\":");
    int64(out, r.end_unix_nano);
    out.push_str(",\"attributes\":[");
    let mut first = true;
    let mut write = |key: &str, value: ValueRef<'_>| {
        if !first {
            out.push(',');
        }
        first = false;
        key_value(out, key, value);
    };
    r.for_each_attribute(&mut write);
    r.for_each_outcome_attribute(&mut write);
    out.push(']');
    if r.dropped_attributes > 0 {
        out.push_str(",\"droppedAttributesCount\":");
        number(out, r.dropped_attributes);
    }
    if !r.events.is_empty() {
        out.push_str(",\"events\":[");
        for (i, e) in r.events.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str("{\"timeUnixNano\":");
            int64(out, e.time_unix_nano);
            out.push_str(",\"name\":");
            string(out, &e.name);
            out.push('}');
        }
        out.push(']');
    }
    if !r.links.is_empty() {
        out.push_str(",\"links\":[");
        for (i, l) in r.links.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str("{\"traceId\":");
            hex(out, &l.trace_id.0);
            out.push_str(",\"spanId\":");
            hex(out, &l.span_id.0);
            out.push('}');
        }
        out.push(']');
    }
    out.push_str(",\"status\":{");
    let mut first = true;
    if let Some(m) = &r.status_message {
        out.push_str("\"message\":");
        string(out, m);
        first = false;
    }
    if r.status.otlp() != 0 {
        if !first {
            out.push(',');
        }
        out.push_str("\"code\":");
        number(out, r.status.otlp());
    }
    out.push_str("}}");
}

/// Appends one batch as a single line (no trailing newline) to `out`: `begin_export_request`,
/// `push_span` for each span, `end_export_request`.
///
/// `spans` are records or boxed records (the exporter keeps them boxed as they arrive: a record
/// is a few hundred bytes, and each move of one was a copy).
pub fn write_export_request<S: Borrow<SpanRecord>>(out: &mut String, resource: &Resource, spans: &[S]) {
    begin_export_request(out, resource);
    for (i, span) in spans.iter().enumerate() {
        push_span(out, i == 0, span.borrow());
    }
    end_export_request(out);
}

/// The start of a request, up to where its spans go.
pub fn begin_export_request(out: &mut String, resource: &Resource) {
    out.push_str("{\"resourceSpans\":[{\"resource\":{\"attributes\":[");
    for (i, (k, v)) in resource.attributes.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"key\":");
        string(out, k);
        out.push_str(",\"value\":{\"stringValue\":");
        string(out, v);
        out.push_str("}}");
    }
    out.push_str("]},\"scopeSpans\":[{\"scope\":{\"name\":");
    string(out, SCOPE_NAME);
    out.push_str(",\"version\":");
    string(out, env!("CARGO_PKG_VERSION"));
    out.push_str("},\"spans\":[");
}

/// One span of a request begun with `begin_export_request` (`first`: its first span).
pub fn push_span(out: &mut String, first: bool, span: &SpanRecord) {
    if !first {
        out.push(',');
    }
    write_span(out, span);
}

/// The end of a request.
pub fn end_export_request(out: &mut String) {
    out.push_str("]}]}]}");
}

/// One batch as a single line (no trailing newline).
pub fn export_request<S: Borrow<SpanRecord>>(resource: &Resource, spans: &[S]) -> String {
    let mut out = String::with_capacity(512 + spans.len() * 600);
    write_export_request(&mut out, resource, spans);
    out
}

/// One span as a JSON value (tests and tools).
pub fn span(r: &SpanRecord) -> serde_json::Value {
    let mut out = String::new();
    write_span(&mut out, r);
    serde_json::from_str(&out).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{SpanId, TraceId};
    use crate::span::{SpanKind, StatusCode, Value};

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
    fn needs_escape_is_the_byte_by_byte_test() {
        let slow = |bytes: &[u8]| bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
        // Every byte value, at every place of texts around the word size, among plain ASCII
        // and among UTF-8 continuation bytes (0x80 and above must never count).
        for filler in [b'a', 0xa9] {
            for len in 0..20 {
                for at in 0..len {
                    for b in 0..=255u8 {
                        let mut bytes = vec![filler; len];
                        bytes[at] = b;
                        assert_eq!(needs_escape(&bytes), slow(&bytes), "{bytes:?}");
                    }
                }
                assert!(!needs_escape(&vec![filler; len]));
            }
        }
    }

    #[test]
    fn encodes_ids_enums_and_int64_per_otlp_json_rules() {
        let line =
            export_request(&Resource { attributes: vec![("service.name".into(), "varnish".into())] }, &[sample()]);
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
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
    fn strings_are_escaped_and_non_finite_floats_spelled_out() {
        let mut r = sample();
        r.set_str("q", "a\"b\\c\nd\u{1}é");
        r.set("f", Value::Float(f64::NAN));
        r.set("g", Value::Float(1.5));
        r.set("b", Value::Bool(true));
        r.set("h", Value::StrArray(vec!["one".into(), "t\"wo".into()]));
        r.set("none", Value::StrArray(vec![]));
        r.status_message = Some("bad \"thing\"".into());
        let v = span(&r);
        let attr =
            |k: &str| v["attributes"].as_array().unwrap().iter().find(|a| a["key"] == k).unwrap()["value"].clone();
        assert_eq!(attr("q")["stringValue"], "a\"b\\c\nd\u{1}é");
        assert_eq!(attr("f")["doubleValue"], "NaN");
        assert_eq!(attr("g")["doubleValue"], 1.5);
        assert_eq!(attr("b")["boolValue"], true);
        assert_eq!(
            attr("h")["arrayValue"]["values"],
            serde_json::json!([{"stringValue": "one"}, {"stringValue": "t\"wo"}])
        );
        assert_eq!(attr("none")["arrayValue"]["values"], serde_json::json!([]));
        assert_eq!(v["status"]["message"], "bad \"thing\"");
        assert_eq!(v["status"]["code"], 2);
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

    #[test]
    fn extreme_floats_stay_parseable_json() {
        for f in [f64::MAX, f64::MIN_POSITIVE, 1e-300, -2.5e200, 0.1, 3.0] {
            let mut out = String::new();
            float(&mut out, f);
            let back: f64 = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"));
            assert_eq!(back, f, "{out}");
        }
    }
}
