//! Reading and writing trace headers directly in Varnish's `struct http`.
//!
//! `req.http.X` in VCL sees only the first field of a repeated header; W3C Trace Context needs all
//! of them (two `traceparent` fields restart the trace, `tracestate` fields are combined), so we
//! walk the header table ourselves. No UTF-8 is assumed: values are bytes until validated.

use std::ffi::CStr;

use varnish::ffi;

/// Varnish's `hdr_t`: the header name with its colon, prefixed by its length.
pub const H_TRACEPARENT: &CStr = c"\x0ctraceparent:";
pub const H_TRACESTATE: &CStr = c"\x0btracestate:";

/// More fields than this of one header are treated as hostile; the caller restarts the trace.
pub const MAX_FIELDS: usize = 32;

/// The values of every `traceparent` and `tracestate` field of one request, in order.
#[derive(Default)]
pub struct TraceFields<'a> {
    pub traceparent: Vec<&'a [u8]>,
    pub tracestate: Vec<&'a [u8]>,
    /// Set when a header had more than `MAX_FIELDS` fields.
    pub too_many: bool,
}

fn value_of<'a>(field: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    if field.len() <= name.len() || field[name.len()] != b':' {
        return None;
    }
    if !field[..name.len()].eq_ignore_ascii_case(name) {
        return None;
    }
    Some(&field[name.len() + 1..])
}

fn push<'a>(list: &mut Vec<&'a [u8]>, v: &'a [u8], too_many: &mut bool) {
    if list.len() < MAX_FIELDS {
        list.push(v);
    } else {
        *too_many = true;
    }
}

/// Collects the trace header fields of `hp`.
///
/// # Safety
/// `hp` must be NULL or a valid `struct http` that outlives the returned slices (it does for the
/// duration of the VCL call that passed it).
pub unsafe fn trace_fields<'a>(hp: *const ffi::http) -> TraceFields<'a> {
    let mut out = TraceFields::default();
    let Some(hp) = hp.as_ref() else { return out };
    let first = ffi::HTTP_HDR_FIRST as usize;
    for i in first..hp.nhd as usize {
        let t = &*hp.hd.add(i);
        if t.b.is_null() || t.e.is_null() || t.e < t.b {
            continue;
        }
        let field = std::slice::from_raw_parts(t.b.cast::<u8>(), t.e.offset_from(t.b) as usize);
        if let Some(v) = value_of(field, b"traceparent") {
            push(&mut out.traceparent, v, &mut out.too_many);
        } else if let Some(v) = value_of(field, b"tracestate") {
            push(&mut out.tracestate, v, &mut out.too_many);
        }
    }
    out
}

/// Replaces every field of `hdr` with one field holding `value`.
///
/// # Safety
/// `hp` must be a valid, writable `struct http` of the current task; `value` must hold only
/// characters valid in a header value (we only write what we generated or validated).
pub unsafe fn force(hp: *mut ffi::http, hdr: &CStr, value: &CStr) {
    if !hp.is_null() {
        ffi::http_ForceHeader(hp, hdr.as_ptr(), value.as_ptr());
    }
}

/// Removes every field of `hdr`.
///
/// # Safety
/// As for `force`.
pub unsafe fn unset(hp: *mut ffi::http, hdr: &CStr) {
    if !hp.is_null() {
        ffi::http_Unset(hp, hdr.as_ptr());
    }
}

/// The status code of `hp` (0 when there is none).
///
/// # Safety
/// `hp` must be NULL or a valid `struct http`.
pub unsafe fn status(hp: *const ffi::http) -> u16 {
    hp.as_ref().map_or(0, |h| h.status)
}

/// The request method and URL of `hp`, lossily decoded.
///
/// # Safety
/// `hp` must be NULL or a valid `struct http`.
pub unsafe fn request_line(hp: *const ffi::http) -> (String, String) {
    let Some(h) = hp.as_ref() else { return (String::new(), String::new()) };
    let get = |i: u32| -> String {
        if (i as usize) >= h.nhd as usize {
            return String::new();
        }
        let t = &*h.hd.add(i as usize);
        if t.b.is_null() || t.e.is_null() || t.e < t.b {
            return String::new();
        }
        let bytes = std::slice::from_raw_parts(t.b.cast::<u8>(), t.e.offset_from(t.b) as usize);
        String::from_utf8_lossy(bytes).into_owned()
    };
    (get(ffi::HTTP_HDR_METHOD), get(ffi::HTTP_HDR_URL))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_match_case_insensitively_and_need_the_colon() {
        assert_eq!(value_of(b"TraceParent: 00-x", b"traceparent"), Some(&b" 00-x"[..]));
        assert_eq!(value_of(b"traceparentx: 1", b"traceparent"), None);
        assert_eq!(value_of(b"tracestate:a=1", b"tracestate"), Some(&b"a=1"[..]));
        assert_eq!(value_of(b"trace", b"tracestate"), None);
    }

    #[test]
    fn hdr_t_constants_carry_their_length() {
        for h in [H_TRACEPARENT, H_TRACESTATE] {
            let b = h.to_bytes();
            assert_eq!(b[0] as usize, b.len() - 1);
            assert!(b.ends_with(b":"));
        }
    }
}
