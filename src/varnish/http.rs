//! Reading and writing trace headers directly in Varnish's `struct http`.
//!
//! `req.http.X` in VCL sees only the first field of a repeated header; W3C Trace Context needs all
//! of them (two `traceparent` fields restart the trace, `tracestate` fields are combined), so we
//! walk the header table ourselves. No UTF-8 is assumed: values are bytes until validated.

use std::borrow::Cow;
use std::ffi::CStr;

use varnish::ffi;

/// Varnish's `hdr_t`: the header name with its colon, prefixed by its length.
pub const H_TRACEPARENT: &CStr = c"\x0ctraceparent:";
pub const H_TRACESTATE: &CStr = c"\x0btracestate:";
pub const H_TRACERESPONSE: &CStr = c"\x0etraceresponse:";
pub const H_SERVER_TIMING: &CStr = c"\x0eServer-Timing:";

/// More fields than this of one header are treated as hostile; the caller restarts the trace.
pub const MAX_FIELDS: usize = 32;

/// The values of every `traceparent` and `tracestate` field of one request, in order. Held
/// inline up to two of each: a `Vec` allocated for every request or fetch that carries one.
pub type Fields<'a> = smallvec::SmallVec<[&'a [u8]; 2]>;

/// The values of every `traceparent` and `tracestate` field of one request, in order.
#[derive(Default)]
pub struct TraceFields<'a> {
    pub traceparent: Fields<'a>,
    pub tracestate: Fields<'a>,
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

fn push<'a>(list: &mut Fields<'a>, v: &'a [u8], too_many: &mut bool) {
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
    for field in lines(hp) {
        // Most fields are neither: reject them on two bytes before comparing names.
        if field.len() < 11 || (field[0] | 0x20) != b't' || (field[10] != b':' && field.get(11) != Some(&b':')) {
            continue;
        }
        if let Some(v) = value_of(field, b"traceparent") {
            push(&mut out.traceparent, v, &mut out.too_many);
        } else if let Some(v) = value_of(field, b"tracestate") {
            push(&mut out.tracestate, v, &mut out.too_many);
        }
    }
    out
}

/// The header lines of `hp` (`Name: value`), as Varnish holds them.
///
/// # Safety
/// `hp` must be NULL or a valid `struct http` that outlives the lines.
unsafe fn lines<'a>(hp: *const ffi::http) -> impl Iterator<Item = &'a [u8]> {
    let (hd, n) = match hp.as_ref() {
        Some(h) => (h.hd, h.nhd as usize),
        None => (std::ptr::null_mut(), 0),
    };
    (ffi::HTTP_HDR_FIRST as usize..n).filter_map(move |i| {
        let t = &*hd.add(i);
        if t.b.is_null() || t.e.is_null() || t.e < t.b {
            return None;
        }
        Some(std::slice::from_raw_parts(t.b.cast::<u8>(), t.e.offset_from(t.b) as usize))
    })
}

/// Replaces every field of `hdr` with one field holding `value`. The header line is assembled
/// here and copied once into the task's workspace (`http_ForceHeader` would format it with
/// printf, a measurable cost per request). A field there once is replaced in its place
/// (`http_SetH`), logged as `http_Unset` and `http_SetHeader` log it (an `xUnset` record with
/// the old line, then an `xHeader` record with the new), so that the log reads as it did; only
/// a repeated field goes through `http_Unset` (a pass over the table comparing every name and
/// the table compacted: about 300 instructions more than finding the field). Returns false
/// when the workspace is full (the header is then left as it was), or when the field was
/// absent or repeated and the table is full (the header is then absent).
///
/// # Safety
/// `hp` must be a valid, writable `struct http` of the current task; `value` must hold only
/// characters valid in a header value (we only write what we generated or validated).
pub unsafe fn force(hp: *mut ffi::http, hdr: &CStr, value: &[u8]) -> bool {
    let Some(h) = hp.as_mut() else { return false };
    let Some(copy) = header_line(h.ws, hdr, value) else { return false };
    match (place(h, hdr), unset_tag(h.logtag)) {
        (Place::Absent, _) => set_line(h, copy),
        (Place::Once(n), Some(unset)) => {
            if !h.vsl.is_null() {
                ffi::VSLbt(h.vsl, unset, *h.hd.add(n as usize));
            }
            ffi::http_SetH(h, n, copy);
            true
        }
        // Repeated, or a header table of a kind we do not know the log tags of.
        (Place::Once(_) | Place::Repeated, _) => {
            ffi::http_Unset(hp, hdr.as_ptr());
            set_line(h, copy)
        }
    }
}

/// The tag `http_Unset` logs a removed field of a table with `logtag` under (`ReqUnset` for the
/// request, ...): `http_VSLH_del`'s `logtag + HTTP_HDR_UNSET`, spelled out.
fn unset_tag(logtag: ffi::VslTag) -> Option<ffi::VslTag> {
    use ffi::VslTag as T;
    match logtag {
        T::ReqMethod => Some(T::ReqUnset),
        T::RespMethod => Some(T::RespUnset),
        T::BereqMethod => Some(T::BereqUnset),
        T::BerespMethod => Some(T::BerespUnset),
        T::ObjMethod => Some(T::ObjUnset),
        _ => None,
    }
}

/// Where the fields of one header are in a header table.
#[derive(Debug, PartialEq, Eq)]
enum Place {
    Absent,
    /// Once, at this index of the table.
    Once(u32),
    Repeated,
}

/// Where the fields of `hdr` are in `h`, compared as `http_Unset` compares them (the name and
/// its colon, any case).
///
/// # Safety
/// `h` must be a valid `struct http`.
unsafe fn place(h: &ffi::http, hdr: &CStr) -> Place {
    // "name:" after the length byte; the name without its colon, as `value_of` takes it.
    let with_colon = &hdr.to_bytes()[1..];
    let name = &with_colon[..with_colon.len().saturating_sub(1)];
    let mut found = None;
    for i in ffi::HTTP_HDR_FIRST..u32::from(h.nhd) {
        let t = &*h.hd.add(i as usize);
        if t.b.is_null() || t.e.is_null() || t.e < t.b {
            continue;
        }
        let line = std::slice::from_raw_parts(t.b.cast::<u8>(), t.e.offset_from(t.b) as usize);
        if value_of(line, name).is_some() {
            if found.is_some() {
                return Place::Repeated;
            }
            found = Some(i);
        }
    }
    found.map_or(Place::Absent, Place::Once)
}

/// "name: value" with its NUL, copied into the workspace `ws` only if it fits
/// (`workspace::alloc_quiet`: a failed `WS_Copy` would mark the workspace overflowed, which
/// Varnish turns into a failed request); without room, no header.
///
/// # Safety
/// `ws` must be null or the valid, unreserved workspace of the current task.
unsafe fn header_line(ws: *mut ffi::ws, hdr: &CStr, value: &[u8]) -> Option<*const std::ffi::c_char> {
    // "name:" from the hdr_t (after its length byte), a space, the value.
    let name = &hdr.to_bytes()[1..];
    let len = name.len() + 1 + value.len();
    let dst = crate::varnish::workspace::alloc_quiet(ws, len + 1).cast::<u8>();
    if dst.is_null() {
        return None;
    }
    std::ptr::copy_nonoverlapping(name.as_ptr(), dst, name.len());
    *dst.add(name.len()) = b' ';
    std::ptr::copy_nonoverlapping(value.as_ptr(), dst.add(name.len() + 1), value.len());
    *dst.add(len) = 0;
    Some(dst.cast_const().cast())
}

/// Header slots left free for Varnish's own additions (`X-Varnish` on the backend request,
/// `Age`, `Via` and others on the response): if our header took the last slot, Varnish would
/// fail the request when it adds its own.
const HEADROOM: u16 = 4;

/// Appends a header line to `h` if its table has room to spare (`http_SetHeader` on a full
/// table marks the request failed).
unsafe fn set_line(h: &mut ffi::http, line: *const std::ffi::c_char) -> bool {
    if h.nhd.saturating_add(HEADROOM) >= h.shd {
        return false;
    }
    ffi::http_SetHeader(h, line);
    true
}

/// Adds one more field `hdr` with `value`, keeping those already there (for headers that may
/// repeat, such as `Server-Timing`).
///
/// # Safety
/// As for `force`.
pub unsafe fn add(hp: *mut ffi::http, hdr: &CStr, value: &[u8]) -> bool {
    let Some(h) = hp.as_mut() else { return false };
    if h.nhd.saturating_add(HEADROOM) >= h.shd {
        return false;
    }
    let Some(copy) = header_line(h.ws, hdr, value) else { return false };
    set_line(h, copy)
}

/// Every header field of `hp` as `(name, value)`, the value without its leading whitespace.
///
/// # Safety
/// `hp` must be NULL or a valid `struct http` that outlives the returned slices.
pub unsafe fn fields<'a>(hp: *const ffi::http) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
    lines(hp).filter_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        let value = &line[colon + 1..];
        let start = value.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(value.len());
        Some((&line[..colon], &value[start..]))
    })
}

/// The value of the first field called `name` (any case), without leading whitespace.
///
/// # Safety
/// As for `fields`.
pub unsafe fn header<'a>(hp: *const ffi::http, name: &[u8]) -> Option<&'a [u8]> {
    fields(hp).find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v)
}

/// The protocol of the request line (`HTTP/1.1`).
///
/// # Safety
/// `hp` must be NULL or a valid `struct http`.
pub unsafe fn proto<'a>(hp: *const ffi::http) -> &'a [u8] {
    let Some(h) = hp.as_ref() else { return b"" };
    let i = ffi::HTTP_HDR_PROTO as usize;
    if i >= h.nhd as usize {
        return b"";
    }
    let t = &*h.hd.add(i);
    if t.b.is_null() || t.e.is_null() || t.e < t.b {
        return b"";
    }
    std::slice::from_raw_parts(t.b.cast::<u8>(), t.e.offset_from(t.b) as usize)
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

/// Whether the request may be answered 304 or 206 instead of the 200 VCL sees.
///
/// # Safety
/// `hp` must be NULL or a valid `struct http`.
pub unsafe fn is_conditional(hp: *const ffi::http) -> bool {
    // One pass (three `http_GetHdr` calls were three), most fields rejected on their first byte.
    lines(hp).any(|f| match f.first().map(|b| b | 0x20) {
        Some(b'i') => value_of(f, b"if-none-match").is_some() || value_of(f, b"if-modified-since").is_some(),
        Some(b'r') => value_of(f, b"range").is_some(),
        _ => false,
    })
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
pub unsafe fn request_line<'a>(hp: *const ffi::http) -> (Cow<'a, str>, Cow<'a, str>) {
    let Some(h) = hp.as_ref() else { return (Cow::Borrowed(""), Cow::Borrowed("")) };
    // Borrowed from the header table (valid for the VCL call) unless it is not UTF-8.
    let get = |i: u32| -> Cow<'a, str> {
        if (i as usize) >= h.nhd as usize {
            return Cow::Borrowed("");
        }
        let t = &*h.hd.add(i as usize);
        if t.b.is_null() || t.e.is_null() || t.e < t.b {
            return Cow::Borrowed("");
        }
        let bytes = std::slice::from_raw_parts(t.b.cast::<u8>(), t.e.offset_from(t.b) as usize);
        crate::span::utf8_lossy(bytes)
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

    /// A `struct http` over the given header lines, as Varnish lays it out.
    fn with_headers(lines: &[&'static [u8]], test: impl FnOnce(*const ffi::http)) {
        let mut hd: Vec<ffi::txt> =
            vec![ffi::txt { b: std::ptr::null(), e: std::ptr::null() }; ffi::HTTP_HDR_FIRST as usize];
        for l in lines {
            hd.push(ffi::txt { b: l.as_ptr().cast(), e: unsafe { l.as_ptr().add(l.len()) }.cast() });
        }
        // SAFETY: an all-zero `struct http` is valid plain data; we only set what is read.
        let mut hp: ffi::http = unsafe { std::mem::zeroed() };
        hp.hd = hd.as_mut_ptr();
        hp.nhd = hd.len() as u16;
        test(&hp);
    }

    #[test]
    fn a_replaced_field_is_logged_under_the_unset_tag_of_its_table() {
        use ffi::VslTag as T;
        // `http_VSLH_del`: the table's log tag (its method's) plus HTTP_HDR_UNSET.
        for (logtag, unset) in [
            (T::ReqMethod, T::ReqUnset),
            (T::RespMethod, T::RespUnset),
            (T::BereqMethod, T::BereqUnset),
            (T::BerespMethod, T::BerespUnset),
            (T::ObjMethod, T::ObjUnset),
        ] {
            assert_eq!(unset_tag(logtag), Some(unset));
            assert_eq!(unset as u32, logtag as u32 + ffi::HTTP_HDR_UNSET - ffi::HTTP_HDR_METHOD);
        }
        assert_eq!(unset_tag(T::Debug), None);
    }

    #[test]
    fn a_field_to_replace_is_found_once_absent_or_repeated() {
        let first = ffi::HTTP_HDR_FIRST;
        with_headers(&[b"Host: a", b"TraceParent: 00-a", b"traceparentx: 1", b"tracestate: a=1"], |hp| {
            let h = unsafe { &*hp };
            assert_eq!(unsafe { place(h, H_TRACEPARENT) }, Place::Once(first + 1), "any case, colon needed");
            assert_eq!(unsafe { place(h, H_TRACESTATE) }, Place::Once(first + 3));
            assert_eq!(unsafe { place(h, H_TRACERESPONSE) }, Place::Absent);
        });
        with_headers(&[b"traceparent: 00-a", b"x: y", b"traceparent:00-b"], |hp| {
            assert_eq!(unsafe { place(&*hp, H_TRACEPARENT) }, Place::Repeated);
        });
        with_headers(&[], |hp| assert_eq!(unsafe { place(&*hp, H_TRACEPARENT) }, Place::Absent));
    }

    #[test]
    fn trace_fields_finds_every_field_of_both_headers_in_order() {
        let lines: &[&'static [u8]] = &[
            b"Host: example.com",
            b"transfer-en",
            b"tracestate",
            b"traceparent: 00-a",
            b"TRACESTATE: a=1",
            b"x: y",
            b"tracestate:b=2",
            b"Traceparent:00-b",
        ];
        with_headers(lines, |hp| {
            let f = unsafe { trace_fields(hp) };
            assert_eq!(f.traceparent.as_slice(), [&b" 00-a"[..], &b"00-b"[..]]);
            assert_eq!(f.tracestate.as_slice(), [&b" a=1"[..], &b"b=2"[..]]);
            assert!(!f.too_many);
        });
    }

    #[test]
    fn too_many_fields_are_flagged() {
        let lines: Vec<&'static [u8]> = (0..MAX_FIELDS + 1).map(|_| &b"traceparent: x"[..]).collect();
        with_headers(&lines, |hp| {
            let f = unsafe { trace_fields(hp) };
            assert_eq!(f.traceparent.len(), MAX_FIELDS);
            assert!(f.too_many);
        });
    }

    #[test]
    fn conditional_and_range_requests_are_recognised() {
        let cases: &[(&[&'static [u8]], bool)] = &[
            (&[b"Host: a", b"If-None-Match: \"x\""], true),
            (&[b"if-modified-since: Sat, 21 Nov 2026 00:00:00 GMT"], true),
            (&[b"RANGE: bytes=0-1", b"x: y"], true),
            (&[b"Host: a", b"If-Match: \"x\"", b"Ranges: x", b"If-None-Matchx: y", b"range"], false),
            (&[], false),
        ];
        for (lines, want) in cases {
            with_headers(lines, |hp| assert_eq!(unsafe { is_conditional(hp) }, *want, "{lines:?}"));
        }
        assert!(!unsafe { is_conditional(std::ptr::null()) });
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
