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
                b3::B3::Context(c) => {
                    Parent::Other { ids: Some((TraceId(c.trace_id), SpanId(c.span_id))), sampled: c.sampled }
                }
                b3::B3::SamplingOnly(d) => Parent::Other { ids: None, sampled: Some(d.sampled()) },
            };
        }
    }
    if bits & propagators::JAEGER != 0 {
        if let Ok(Some(c)) = jaeger::parse(&uber) {
            return Parent::Other { ids: Some((TraceId(c.trace_id), SpanId(c.span_id))), sampled: Some(c.sampled()) };
        }
    }
    Parent::Other { ids: None, sampled: None }
}

/// Writes the span's context in every enabled format besides Trace Context.
///
/// # Safety
/// `hp` must be a writable `struct http` of the running task.
pub unsafe fn inject(hp: *mut ffi::http, bits: u8, trace_id: &[u8; 16], span_id: &[u8; 8], sampled: bool) {
    if bits & propagators::B3 != 0 {
        http::force(hp, H_B3, &b3::format_single(trace_id, span_id, sampled));
    }
    if bits & propagators::B3MULTI != 0 {
        let m = b3::format_multi(trace_id, span_id, b3::Decision::from_sampled(sampled));
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
    }
    if bits & propagators::JAEGER != 0 {
        http::force(hp, H_UBER_TRACE_ID, &jaeger::format(trace_id, span_id, sampled));
    }
}
