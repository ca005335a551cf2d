//! B3 (single and multi-header) and Jaeger (`uber-trace-id`) on Varnish's header tables: which
//! fields to read, which to write. The formats themselves are in `crate::propagation`.

use std::ffi::CStr;

use varnish::ffi;

use super::http;
use crate::config::propagators;
use crate::ids::{SpanId, TraceId};
use crate::propagation::{b3, jaeger};
use crate::trace::Parent;

const H_B3: &CStr = c"\x03b3:";
const H_B3_TRACE_ID: &CStr = c"\x0dX-B3-TraceId:";
const H_B3_SPAN_ID: &CStr = c"\x0cX-B3-SpanId:";
const H_B3_PARENT_SPAN_ID: &CStr = c"\x12X-B3-ParentSpanId:";
const H_B3_SAMPLED: &CStr = c"\x0dX-B3-Sampled:";
const H_B3_FLAGS: &CStr = c"\x0bX-B3-Flags:";
const H_UBER_TRACE_ID: &CStr = c"\x0euber-trace-id:";

/// The first present of the enabled formats, B3 before Jaeger. An invalid context is no
/// context: a new trace starts (a VSL line would need the ctx; the counters show restarts).
///
/// # Safety
/// `hp` must be NULL or a valid `struct http` of the running task.
pub unsafe fn extract(hp: *const ffi::http, bits: u8) -> Parent<'static> {
    let (mut single, mut tid, mut sid, mut sampled, mut flags, mut uber) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (name, value) in http::fields(hp) {
        let list = match name.len() {
            2 if name.eq_ignore_ascii_case(b"b3") => &mut single,
            12 if name.eq_ignore_ascii_case(b"x-b3-traceid") => &mut tid,
            11 if name.eq_ignore_ascii_case(b"x-b3-spanid") => &mut sid,
            12 if name.eq_ignore_ascii_case(b"x-b3-sampled") => &mut sampled,
            10 if name.eq_ignore_ascii_case(b"x-b3-flags") => &mut flags,
            13 if name.eq_ignore_ascii_case(b"uber-trace-id") => &mut uber,
            _ => continue,
        };
        if list.len() < http::MAX_FIELDS {
            list.push(value);
        }
    }
    let none: &[&[u8]] = &[];
    if bits & (propagators::B3 | propagators::B3MULTI) != 0 {
        let single = if bits & propagators::B3 != 0 { &single[..] } else { none };
        if bits & propagators::B3MULTI == 0 {
            // Only the single header is enabled: the X-B3-* fields do not count.
            for v in [&mut tid, &mut sid, &mut sampled, &mut flags] {
                v.clear();
            }
        }
        if let Ok(Some(found)) = b3::extract(single, &tid, &sid, &sampled, &flags) {
            return match found {
                b3::B3::Context(c) => Parent::Other {
                    ids: Some((TraceId(c.trace_id), SpanId(c.span_id))),
                    sampled: c.sampled,
                    debug: c.debug,
                },
                b3::B3::SamplingOnly(d) => Parent::Other { ids: None, sampled: Some(d.sampled()), debug: d.debug() },
            };
        }
    }
    if bits & propagators::JAEGER != 0 {
        if let Ok(Some(c)) = jaeger::parse(&uber) {
            return Parent::Other {
                ids: Some((TraceId(c.trace_id), SpanId(c.span_id))),
                sampled: Some(c.sampled()),
                debug: c.debug(),
            };
        }
    }
    Parent::Other { ids: None, sampled: None, debug: false }
}

/// Whether the B3 or Jaeger context of `hp` (when those formats are enabled) asks for a debug
/// trace, whichever context is continued: a caller (or our own request, for its fetches) may send
/// `traceparent` and `b3: ...-d` together.
///
/// # Safety
/// As for `extract`.
pub unsafe fn debug_requested(hp: *const ffi::http, bits: u8) -> bool {
    bits & (propagators::B3 | propagators::B3MULTI | propagators::JAEGER) != 0
        && matches!(extract(hp, bits), Parent::Other { debug: true, .. })
}

/// Writes the span's context in every enabled format besides Trace Context. `debug` (the caller
/// asked for a debug trace, and the span is sampled) is written as B3 `d` / `X-B3-Flags: 1` and
/// Jaeger flag 2: the B3 specification wants a received debug flag preserved.
///
/// # Safety
/// `hp` must be a writable `struct http` of the running task.
pub unsafe fn inject(hp: *mut ffi::http, bits: u8, trace_id: &[u8; 16], span_id: &[u8; 8], sampled: bool, debug: bool) {
    let decision = if sampled && debug { b3::Decision::Debug } else { b3::Decision::from_sampled(sampled) };
    if bits & propagators::B3 != 0 {
        http::force(hp, H_B3, &b3::format_single_decision(trace_id, span_id, decision));
    }
    if bits & propagators::B3MULTI != 0 {
        let m = b3::format_multi(trace_id, span_id, decision);
        http::force(hp, H_B3_TRACE_ID, &m.trace_id);
        http::force(hp, H_B3_SPAN_ID, &m.span_id);
        http::unset(hp, H_B3_PARENT_SPAN_ID);
        http::unset(hp, H_B3_FLAGS);
        match m.sampled {
            Some(v) => {
                http::force(hp, H_B3_SAMPLED, v.as_bytes());
            }
            None => http::unset(hp, H_B3_SAMPLED),
        }
        if let Some(f) = m.flags {
            http::force(hp, H_B3_FLAGS, f.as_bytes());
        }
    }
    if bits & propagators::JAEGER != 0 {
        let flags = u8::from(sampled) | if sampled && debug { 2 } else { 0 };
        http::force(hp, H_UBER_TRACE_ID, &jaeger::format_flags(trace_id, span_id, flags));
    }
}
