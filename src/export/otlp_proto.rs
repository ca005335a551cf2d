//! OTLP/protobuf encoding of finished spans: one serialized `ExportTraceServiceRequest`.
//!
//! The same message as `otlp_json` (same resource, scope, flags and omissions), in the binary
//! protobuf wire format that OTLP/gRPC and OTLP/HTTP with `application/x-protobuf` carry. Field
//! numbers are those of opentelemetry-proto v1 (`trace.proto`, `common.proto`, `resource.proto`,
//! `trace_service.proto`).
//!
//! Written by hand, like the JSON encoder, because it runs for every exported span on the exporter
//! thread: no intermediate message structs, no allocation once `out` has grown. Protobuf puts each
//! nested message's byte length before its body. Attributes, events and the status are small:
//! each has a `*_len` function that computes its size right before it is written. A span is
//! written in one pass instead, after room for its key and a two-byte length (the size of nearly
//! every span), which is filled in once the span is written; the request's own headers, whose
//! lengths depend on every span, are written last, into room left before the first span, and the
//! request starts where they do. A sizing pass over the spans (as before) cost about a sixth of
//! the encoding (callgrind). The work is linear in the batch's size.
//!
//! Fields are written in field-number order, as the protobuf encoding guide recommends and prost
//! does: the tests check that re-encoding our output with prost gives the same bytes.

use std::borrow::Borrow;

use super::otlp_json::{Resource, SCOPE_NAME};
use crate::span::{AttributeSink, Event, SpanRecord, ValueRef};

/// W3C trace flags occupy bits 0-7 of `Span.flags`; bits 8 and 9 say whether the parent is known
/// to be remote. The same values as `otlp_json` (the equivalence test holds them together).
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

// Wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// The key byte of a field numbered 1 to 15: `field << 3 | wire type`.
const fn key(field: u8, wire: u8) -> u8 {
    assert!(field >= 1 && field <= 15);
    (field << 3) | wire
}

/// The two-byte key of a field numbered 16 to 2047: the varint of `field << 3 | wire type`.
const fn key2(field: u16, wire: u8) -> [u8; 2] {
    assert!(field >= 16 && field <= 2047);
    let k = (field << 3) | wire as u16;
    [(k as u8 & 0x7f) | 0x80, (k >> 7) as u8]
}

// The keys we write, by message. Field numbers from opentelemetry-proto v1.
mod request {
    use super::*;
    pub const RESOURCE_SPANS: u8 = key(1, LEN);
}
mod resource_spans {
    use super::*;
    pub const RESOURCE: u8 = key(1, LEN);
    pub const SCOPE_SPANS: u8 = key(2, LEN);
}
mod resource {
    use super::*;
    pub const ATTRIBUTES: u8 = key(1, LEN);
}
mod scope_spans {
    use super::*;
    pub const SCOPE: u8 = key(1, LEN);
    pub const SPANS: u8 = key(2, LEN);
}
mod scope {
    use super::*;
    pub const NAME: u8 = key(1, LEN);
    pub const VERSION: u8 = key(2, LEN);
}
mod span {
    use super::*;
    pub const TRACE_ID: u8 = key(1, LEN);
    pub const SPAN_ID: u8 = key(2, LEN);
    pub const TRACE_STATE: u8 = key(3, LEN);
    pub const PARENT_SPAN_ID: u8 = key(4, LEN);
    pub const FLAGS: [u8; 2] = key2(16, FIXED32);
    pub const NAME: u8 = key(5, LEN);
    pub const KIND: u8 = key(6, VARINT);
    pub const START_TIME: u8 = key(7, FIXED64);
    pub const END_TIME: u8 = key(8, FIXED64);
    pub const ATTRIBUTES: u8 = key(9, LEN);
    pub const DROPPED_ATTRIBUTES_COUNT: u8 = key(10, VARINT);
    pub const EVENTS: u8 = key(11, LEN);
    pub const LINKS: u8 = key(13, LEN);
    pub const STATUS: u8 = key(15, LEN);
}
mod event {
    use super::*;
    pub const TIME: u8 = key(1, FIXED64);
    pub const NAME: u8 = key(2, LEN);
}
mod link {
    use super::*;
    pub const TRACE_ID: u8 = key(1, LEN);
    pub const SPAN_ID: u8 = key(2, LEN);
}
mod status {
    use super::*;
    pub const MESSAGE: u8 = key(2, LEN);
    pub const CODE: u8 = key(3, VARINT);
}
mod key_value {
    use super::*;
    pub const KEY: u8 = key(1, LEN);
    pub const VALUE: u8 = key(2, LEN);
}
mod any_value {
    use super::*;
    pub const STRING: u8 = key(1, LEN);
    pub const BOOL: u8 = key(2, VARINT);
    pub const INT: u8 = key(3, VARINT);
    pub const DOUBLE: u8 = key(4, FIXED64);
    pub const ARRAY: u8 = key(5, LEN);
}

mod array_value {
    use super::*;
    pub const VALUES: u8 = key(1, LEN);
}

// ---- Sizes --------------------------------------------------------------------------------------

/// Bytes of `v` as a varint: 7 bits per byte, at least one byte (as prost's `encoded_len_varint`).
#[inline]
fn varint_len(v: u64) -> usize {
    // Most values are lengths below 128: one comparison instead of the arithmetic.
    if v < 0x80 {
        return 1;
    }
    let bits = 64 - v.leading_zeros() as usize;
    (bits * 9 + 64) / 64
}

/// A length-delimited field with a one-byte key: key, length, body.
#[inline]
fn len_field(body: usize) -> usize {
    1 + varint_len(body as u64) + body
}

/// A proto3 string field: absent when empty.
#[inline]
fn str_field(s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        len_field(s.len())
    }
}

#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn any_value_len(v: ValueRef<'_>) -> usize {
    // The members of a oneof are written even when they hold the default value (an empty string,
    // 0, false): that is what says which member is set.
    match v {
        ValueRef::Str(s) => len_field(s.len()),
        ValueRef::StrArray(v) => len_field(array_len(v)),
        ValueRef::Int(i) => 1 + varint_len(i as u64),
        ValueRef::Float(_) => 1 + 8,
        ValueRef::Bool(_) => 1 + 1,
    }
}

/// `ArrayValue` of strings: each element an `AnyValue` holding a string.
#[inline]
fn array_len(v: &[String]) -> usize {
    v.iter().map(|s| len_field(len_field(s.len()))).sum()
}

/// `KeyValue`; the value is always present (every `Value` is a non-empty `AnyValue`).
#[inline]
fn key_value_len(key: &str, value: usize) -> usize {
    str_field(key) + len_field(value)
}

#[inline]
fn fixed64_field(v: u64) -> usize {
    if v == 0 {
        0
    } else {
        1 + 8
    }
}

#[inline]
fn event_len(e: &Event) -> usize {
    fixed64_field(e.time_unix_nano) + str_field(&e.name)
}

/// `Span.Link`: the two IDs only, as `otlp_json` writes them.
const LINK_LEN: usize = (1 + 1 + 16) + (1 + 1 + 8);

fn status_len(r: &SpanRecord) -> usize {
    let code = r.status.otlp();
    r.status_message.as_deref().map_or(0, str_field) + if code == 0 { 0 } else { 1 + varint_len(code.into()) }
}

fn scope_len() -> usize {
    str_field(SCOPE_NAME) + str_field(env!("CARGO_PKG_VERSION"))
}

fn resource_attribute_len(k: &str, v: &str) -> usize {
    key_value_len(k, len_field(v.len()))
}

fn resource_len(resource: &Resource) -> usize {
    resource.attributes.iter().map(|(k, v)| len_field(resource_attribute_len(k, v))).sum()
}

// ---- Writing ------------------------------------------------------------------------------------

/// The output, written front to back over `buf`'s bytes from `at` (zeroes, sized ahead; grown
/// when a write needs more). A write is a bounds check and a store, cheaper than `Vec::push`'s
/// capacity check and length update (measured: a sixth faster in `benches/export.rs`).
struct Buf<'a> {
    buf: &'a mut Vec<u8>,
    at: usize,
}

// The writes are forced inline: each is a few instructions, and as calls (which the compiler
// chose in some builds) they cost about 100 more per span start and more per span encoded.
// Forced in optimized builds only, here and wherever the crate forces inlining: unoptimized,
// every inlined copy keeps stack slots of its own, and the span start's frames grew to about
// 45 KB, which with the redaction regex's first use overflowed Varnish's 80 KB worker stack
// (the e2e tests run the debug build).
impl Buf<'_> {
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn push(&mut self, b: u8) {
        self.put_array([b]);
    }

    /// A few bytes with one bounds check (the fixed parts of a field: keys and short lengths).
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn put_array<const N: usize>(&mut self, bytes: [u8; N]) {
        let at = self.at;
        match self.buf.get_mut(at..at + N) {
            Some(room) => room.copy_from_slice(&bytes),
            None => self.grow_and_put(&bytes),
        }
        self.at = at + N;
    }

    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn extend_from_slice(&mut self, bytes: &[u8]) {
        let at = self.at;
        match self.buf.get_mut(at..at + bytes.len()) {
            Some(room) => room.copy_from_slice(bytes),
            None => self.grow_and_put(bytes),
        }
        self.at = at + bytes.len();
    }

    /// Makes room for `n` more bytes after `at` (doubling: a batch larger than guessed grows a
    /// few times at most).
    #[cold]
    fn grow(&mut self, n: usize) {
        let need = self.at + n;
        if need > self.buf.len() {
            self.buf.resize(need.max(self.buf.len() * 2), 0);
        }
    }

    #[cold]
    #[inline(never)]
    fn grow_and_put(&mut self, bytes: &[u8]) {
        self.grow(bytes.len());
        self.buf[self.at..self.at + bytes.len()].copy_from_slice(bytes);
    }
}

/// `v` as a varint, in a fixed array: (bytes, how many are used).
fn varint_bytes(mut v: u64) -> ([u8; 10], usize) {
    let (mut bytes, mut n) = ([0u8; 10], 0);
    while v >= 0x80 {
        bytes[n] = v as u8 | 0x80;
        v >>= 7;
        n += 1;
    }
    bytes[n] = v as u8;
    (bytes, n + 1)
}

#[inline]
fn put_varint(out: &mut Buf<'_>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The key and length of a length-delimited field, whose body the caller writes next.
#[inline]
fn put_len(out: &mut Buf<'_>, key: u8, len: usize) {
    out.push(key);
    put_varint(out, len as u64);
}

#[inline]
fn put_bytes(out: &mut Buf<'_>, key: u8, bytes: &[u8]) {
    put_len(out, key, bytes.len());
    out.extend_from_slice(bytes);
}

#[inline]
fn put_str(out: &mut Buf<'_>, key: u8, s: &str) {
    if !s.is_empty() {
        put_bytes(out, key, s.as_bytes());
    }
}

#[inline]
fn put_fixed64(out: &mut Buf<'_>, key: u8, v: u64) {
    if v != 0 {
        out.push(key);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

#[inline]
fn put_any_value(out: &mut Buf<'_>, v: ValueRef<'_>) {
    match v {
        ValueRef::Str(s) => put_bytes(out, any_value::STRING, s.as_bytes()),
        ValueRef::StrArray(v) => {
            put_len(out, any_value::ARRAY, array_len(v));
            for s in v {
                put_len(out, array_value::VALUES, len_field(s.len()));
                put_bytes(out, any_value::STRING, s.as_bytes());
            }
        }
        ValueRef::Int(i) => {
            out.push(any_value::INT);
            // int64, not sint64: negative values take ten bytes, as the schema says.
            put_varint(out, i as u64);
        }
        ValueRef::Float(f) => {
            out.push(any_value::DOUBLE);
            out.extend_from_slice(&f.to_le_bytes());
        }
        ValueRef::Bool(b) => {
            out.push(any_value::BOOL);
            out.push(u8::from(b));
        }
    }
}

/// One `KeyValue` field (`field` is its key in the enclosing message). Inlined into both of
/// `put_span_body`'s loops: as a call, it cost about 15 instructions more per attribute.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn put_attribute(out: &mut Buf<'_>, field: u8, key: &str, value: ValueRef<'_>) {
    let value_len = any_value_len(value);
    let len = key_value_len(key, value_len);
    if len < 0x80 && !key.is_empty() {
        // The usual attribute: every length inside is below 128 too, a single byte each, so
        // the key and value headers are four bytes each (a third fewer instructions than
        // writing them byte by byte through `put_len`).
        out.put_array([field, len as u8, key_value::KEY, key.len() as u8]);
        out.extend_from_slice(key.as_bytes());
        match value {
            ValueRef::Str(s) => {
                out.put_array([key_value::VALUE, value_len as u8, any_value::STRING, s.len() as u8]);
                out.extend_from_slice(s.as_bytes());
            }
            ValueRef::Int(i) => {
                out.put_array([key_value::VALUE, value_len as u8, any_value::INT]);
                put_varint(out, i as u64);
            }
            ValueRef::Float(f) => {
                // A hit's object age and TTL, a VCL `tag_real`: the whole value in one write.
                let [b0, b1, b2, b3, b4, b5, b6, b7] = f.to_le_bytes();
                out.put_array([key_value::VALUE, value_len as u8, any_value::DOUBLE, b0, b1, b2, b3, b4, b5, b6, b7]);
            }
            _ => {
                out.put_array([key_value::VALUE, value_len as u8]);
                put_any_value(out, value);
            }
        }
        return;
    }
    put_len(out, field, len);
    put_str(out, key_value::KEY, key);
    put_len(out, key_value::VALUE, value_len);
    put_any_value(out, value);
}

/// Writes `Span.attributes` fields (`for_each_outcome_attribute` inlines it at each key).
struct SpanAttributes<'a, 'b>(&'a mut Buf<'b>);

impl AttributeSink for SpanAttributes<'_, '_> {
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn attribute(&mut self, key: &'static str, value: ValueRef<'_>) {
        put_attribute(self.0, span::ATTRIBUTES, key, value);
    }
}

fn put_event(out: &mut Buf<'_>, e: &Event) {
    let len = event_len(e);
    if len < 0x80 && e.time_unix_nano != 0 && !e.name.is_empty() {
        // The usual event (as in `put_attribute`): its fixed part in one write.
        let t = e.time_unix_nano.to_le_bytes();
        out.put_array([span::EVENTS, len as u8, event::TIME, t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]]);
        out.put_array([event::NAME, e.name.len() as u8]);
        out.extend_from_slice(e.name.as_bytes());
        return;
    }
    put_len(out, span::EVENTS, len);
    put_fixed64(out, event::TIME, e.time_unix_nano);
    put_str(out, event::NAME, &e.name);
}

fn put_status(out: &mut Buf<'_>, r: &SpanRecord) {
    put_len(out, span::STATUS, status_len(r));
    if let Some(m) = &r.status_message {
        put_str(out, status::MESSAGE, m);
    }
    let code = r.status.otlp();
    if code != 0 {
        out.push(status::CODE);
        put_varint(out, code.into());
    }
}

/// One `Span` field of `ScopeSpans`: key, length, body. The body is written first, after room
/// for the key and a two-byte length, and the length is filled in once known.
fn put_span(out: &mut Buf<'_>, r: &SpanRecord) {
    let head = out.at;
    out.put_array([0u8; 3]);
    let body = out.at;
    put_span_body(out, r);
    let len = out.at - body;
    if (0x80..0x4000).contains(&len) {
        // Nearly every span: 128 bytes to 16 KB, a two-byte length.
        out.buf[head..body].copy_from_slice(&[scope_spans::SPANS, len as u8 | 0x80, (len >> 7) as u8]);
        return;
    }
    // A shorter or a longer span: its length takes one byte, or three to five. The body moves.
    let (varint, n) = varint_bytes(len as u64);
    out.at = head + 1 + n;
    // At most two bytes more than the span took: exactly those (`grow` would double the buffer).
    let need = out.at + len;
    if need > out.buf.len() {
        out.buf.resize(need, 0);
    }
    out.buf.copy_within(body..body + len, head + 1 + n);
    out.buf[head] = scope_spans::SPANS;
    out.buf[head + 1..head + 1 + n].copy_from_slice(&varint[..n]);
    out.at = head + 1 + n + len;
}

fn put_span_body(out: &mut Buf<'_>, r: &SpanRecord) {
    put_bytes(out, span::TRACE_ID, &r.trace_id.0);
    put_bytes(out, span::SPAN_ID, &r.span_id.0);
    if let Some(ts) = &r.tracestate {
        put_str(out, span::TRACE_STATE, ts);
    }
    if let Some(p) = &r.parent_span_id {
        put_bytes(out, span::PARENT_SPAN_ID, &p.0);
    }
    put_str(out, span::NAME, &r.name);
    out.push(span::KIND);
    put_varint(out, r.kind.otlp().into());
    put_fixed64(out, span::START_TIME, r.start_unix_nano);
    put_fixed64(out, span::END_TIME, r.end_unix_nano);
    out.extend_from_slice(r.encoded.as_bytes());
    for a in &r.attributes {
        put_attribute(out, span::ATTRIBUTES, &a.key, a.value.borrowed());
    }
    r.for_each_outcome_attribute(&mut SpanAttributes(out));
    if r.dropped_attributes > 0 {
        out.push(span::DROPPED_ATTRIBUTES_COUNT);
        put_varint(out, r.dropped_attributes.into());
    }
    for e in &r.events {
        put_event(out, e);
    }
    for l in &r.links {
        put_len(out, span::LINKS, LINK_LEN);
        put_bytes(out, link::TRACE_ID, &l.trace_id.0);
        put_bytes(out, link::SPAN_ID, &l.span_id.0);
    }
    put_status(out, r);
    // Field 16: last in field-number order.
    let mut flags = u32::from(r.flags) | HAS_IS_REMOTE;
    if r.parent_is_remote {
        flags |= IS_REMOTE;
    }
    out.extend_from_slice(&span::FLAGS);
    out.extend_from_slice(&flags.to_le_bytes());
}

/// Attributes encoded when they are known, on the Varnish worker that starts the span: each a
/// complete `Span.attributes` field (`KeyValue`), in the bytes `put_span_body` copies as they
/// are. For the semantic-convention attributes the module itself reads from every request
/// (method, path, addresses...): held as generic `Attribute`s they cost about 45 instructions
/// each to add, 100 each to encode and 20 each to drop (callgrind), where these cost a write
/// here and one copy per span on the exporter thread. The worker's copy of each value into the
/// record is the one it made anyway (the request's workspace does not outlive the task).
///
/// `bytes` is room written over from the start, as `Buf` writes (only `len` of it counts), so
/// that a record taken from the pool writes without zeroing or growing.
#[derive(Clone, Debug, Default)]
pub struct EncodedAttributes {
    bytes: Vec<u8>,
    len: usize,
    count: usize,
}

/// The room a record's first encoded attribute reserves: a sampled request span's are 300 to 500
/// bytes (a browser's `User-Agent` is the largest); `Buf` doubles it when short.
const ENCODED_RESERVED: usize = 512;

impl EncodedAttributes {
    /// Appends one attribute; the caller applies the limits (`SpanRecord::add`). Inlined into
    /// each call site, where the key is a literal: its length folds into the header's
    /// constants and its copy into a few stores.
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    pub fn push(&mut self, key: &str, value: ValueRef<'_>) {
        if self.bytes.is_empty() {
            self.bytes.resize(ENCODED_RESERVED, 0);
        }
        let mut out = Buf { buf: &mut self.bytes, at: self.len };
        put_attribute(&mut out, span::ATTRIBUTES, key, value);
        self.len = out.at;
        self.count += 1;
    }

    /// The encoded fields, ready to be copied into a `Span`.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Forgets the attributes, keeping the room (`SpanRecord::clear_for_reuse`).
    pub fn clear(&mut self) {
        self.len = 0;
        self.count = 0;
    }

    /// The room held (`span_pool` frees a record whose room grew beyond the usual).
    pub fn capacity(&self) -> usize {
        self.bytes.len()
    }

    /// The attributes, decoded again: for the JSON encoder, and for the rare VCL call that
    /// replaces one of them (`SpanRecord::set`). Stops at anything `push` did not write.
    pub fn iter(&self) -> impl Iterator<Item = (&str, ValueRef<'_>)> {
        let mut rest = self.as_bytes();
        std::iter::from_fn(move || {
            let (key, body, next) = read_len_field(rest)?;
            rest = next;
            (key == span::ATTRIBUTES).then(|| read_key_value(body)).flatten()
        })
    }

    /// Whether `key` is one of the attributes: a walk over the fields comparing key bytes,
    /// values skipped by their length (`SpanRecord::set` asks this for every VCL attribute and
    /// captured header while the span's own attributes are encoded).
    pub fn contains(&self, key: &str) -> bool {
        let mut rest = self.as_bytes();
        while let Some((_, body, next)) = read_len_field(rest) {
            rest = next;
            if split_key(body).is_some_and(|(k, _)| k == key.as_bytes()) {
                return true;
            }
        }
        false
    }
}

impl PartialEq for EncodedAttributes {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

/// A varint at the start of `bytes`, and what follows it.
#[inline]
fn read_varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    // Nearly every length here is below 128: one byte.
    if let Some((&b, rest)) = bytes.split_first() {
        if b < 0x80 {
            return Some((u64::from(b), rest));
        }
    }
    let mut v = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Some((v, &bytes[i + 1..]));
        }
    }
    None
}

/// A length-delimited field at the start of `bytes`: its key, its body and what follows it.
#[inline]
fn read_len_field(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&key, rest) = bytes.split_first()?;
    let (len, rest) = read_varint(rest)?;
    let len = usize::try_from(len).ok()?;
    (rest.len() >= len).then(|| (key, &rest[..len], &rest[len..]))
}

/// The key of a `KeyValue` body, and what follows it (an empty key is absent, as proto3 omits
/// it).
fn split_key(body: &[u8]) -> Option<(&[u8], &[u8])> {
    if body.first() != Some(&key_value::KEY) {
        return Some((&[], body));
    }
    let (_, key, rest) = read_len_field(body)?;
    Some((key, rest))
}

/// A `KeyValue` body as `put_attribute` writes it.
fn read_key_value(body: &[u8]) -> Option<(&str, ValueRef<'_>)> {
    let (key, body) = split_key(body)?;
    let key = crate::span::utf8(key)?;
    let (field, value, rest) = read_len_field(body)?;
    if field != key_value::VALUE || !rest.is_empty() {
        return None;
    }
    let (&kind, after) = value.split_first()?;
    let value = match kind {
        any_value::STRING => {
            let (_, s, rest) = read_len_field(value)?;
            rest.is_empty().then_some(())?;
            ValueRef::Str(crate::span::utf8(s)?)
        }
        any_value::INT => ValueRef::Int(read_varint(after)?.0 as i64),
        any_value::DOUBLE => ValueRef::Float(f64::from_le_bytes(*after.first_chunk::<8>()?)),
        any_value::BOOL => ValueRef::Bool(*after.first()? != 0),
        _ => return None,
    };
    Some((key, value))
}

/// One serialized `ExportTraceServiceRequest`, written one span at a time into a buffer the
/// caller owns: `begin`, `push` each span as it comes, `finish` (again after a failed send, if
/// need be: it writes the same bytes). One `ResourceSpans` with `resource`, one `ScopeSpans` for
/// this module.
///
/// The spans go first, after room for what precedes them (the keys and lengths of
/// `ResourceSpans` and `ScopeSpans`, the resource and the scope), which `finish` fills in once
/// their length is known. The buffer keeps its length from request to request and is written
/// over, so that its room is not zeroed again for every batch (a `memset` of 768 bytes per span,
/// which callgrind counted as that many instructions; a few cycles in fact).
#[derive(Clone, Copy, Debug)]
pub struct RequestWriter {
    /// Where the spans start.
    room: usize,
    /// Where the next span goes.
    end: usize,
}

impl RequestWriter {
    pub fn begin(out: &mut Vec<u8>, resource: &Resource) -> RequestWriter {
        let room = 2 * (1 + 10) + len_field(resource_len(resource)) + len_field(scope_len());
        // Enough for the headers and the usual span (a sampled hit's is about 600 bytes); `Buf`
        // grows it when short.
        if out.len() < room + 768 {
            out.resize(room + 768, 0);
        }
        RequestWriter { room, end: room }
    }

    /// Appends `span`. A panic in the middle (a bug) leaves the request as it was: the span's
    /// bytes count only once it is complete. Never inlined: `bench/callgrind.sh` counts the
    /// spans encoded, and the cost of encoding, by this function (a call per span costs nothing
    /// next to the span's encoding).
    #[inline(never)]
    pub fn push(&mut self, out: &mut Vec<u8>, span: &SpanRecord) {
        let mut spans_out = Buf { buf: out, at: self.end };
        put_span(&mut spans_out, span);
        self.end = spans_out.at;
    }

    /// Writes what precedes the spans and returns where the request is: `out[range]`. The bytes
    /// around it are room the headers did not need, and what an earlier, larger request left.
    #[must_use = "the request is the returned range of `out`"]
    pub fn finish(&self, out: &mut Vec<u8>, resource: &Resource) -> std::ops::Range<usize> {
        let (room, end) = (self.room, self.end);
        let resource_body = resource_len(resource);
        let scope_body = scope_len();
        let scope_spans_body = len_field(scope_body) + (end - room);
        let resource_spans_body = len_field(resource_body) + len_field(scope_spans_body);
        let headers = 1
            + varint_len(resource_spans_body as u64)
            + len_field(resource_body)
            + 1
            + varint_len(scope_spans_body as u64)
            + len_field(scope_body);
        let start = room - headers;
        let out = &mut Buf { buf: out, at: start };
        put_len(out, request::RESOURCE_SPANS, resource_spans_body);
        // Always present, even with no attributes, as `otlp_json` writes it.
        put_len(out, resource_spans::RESOURCE, resource_body);
        for (k, v) in &resource.attributes {
            put_len(out, resource::ATTRIBUTES, resource_attribute_len(k, v));
            put_str(out, key_value::KEY, k);
            put_len(out, key_value::VALUE, len_field(v.len()));
            put_bytes(out, any_value::STRING, v.as_bytes());
        }
        put_len(out, resource_spans::SCOPE_SPANS, scope_spans_body);
        put_len(out, scope_spans::SCOPE, scope_body);
        put_str(out, scope::NAME, SCOPE_NAME);
        put_str(out, scope::VERSION, env!("CARGO_PKG_VERSION"));
        // Every size above agrees with what was written, or the request would be garbage. Runs
        // on the exporter thread only; a panic here (a bug) is caught by `ExportJob::send`, which
        // drops and counts the batch: garbage is never sent, varnishd never sees the panic. (The
        // resource must be the one given to `begin`.)
        assert_eq!(out.at, room, "OTLP protobuf size mismatch");
        start..end
    }
}

/// `spans` as one request in `out` (see `RequestWriter`), which is `out[range]`. `spans` are
/// records or boxed records, as in `otlp_json`.
#[must_use = "the request is the returned range of `out`"]
pub fn write_export_request<S: Borrow<SpanRecord>>(
    out: &mut Vec<u8>,
    resource: &Resource,
    spans: &[S],
) -> std::ops::Range<usize> {
    let mut writer = RequestWriter::begin(out, resource);
    // Room for the usual spans at once rather than doubling as they come.
    let expected = writer.room + spans.len() * 768;
    if out.len() < expected {
        out.resize(expected, 0);
    }
    for r in spans {
        writer.push(out, r.borrow());
    }
    writer.finish(out, resource)
}

/// One batch as a new buffer.
pub fn export_request<S: Borrow<SpanRecord>>(resource: &Resource, spans: &[S]) -> Vec<u8> {
    let mut out = Vec::new();
    let request = write_export_request(&mut out, resource, spans);
    out.truncate(request.end);
    out.drain(..request.start);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::otlp_json;
    use crate::ids::{SpanId, TraceId};
    use crate::span::{Attribute, Link, SpanKind, StatusCode, Value};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{any_value::Value as V, AnyValue, InstrumentationScope, KeyValue};
    use opentelemetry_proto::tonic::resource::v1::Resource as PbResource;
    use opentelemetry_proto::tonic::trace::v1::{self as pb, span::SpanKind as PbKind, status::StatusCode as PbCode};
    use prost::Message;

    /// Decodes `bytes`, and checks that they are exactly what prost itself writes for the message
    /// it decoded: the canonical encoding (fields in order, defaults omitted, minimal varints) and
    /// nothing that prost would skip as unknown.
    fn decode(bytes: &[u8]) -> ExportTraceServiceRequest {
        let msg = ExportTraceServiceRequest::decode(bytes).expect("valid protobuf");
        assert_eq!(msg.encode_to_vec(), bytes, "not the encoding prost writes");
        msg
    }

    fn spans_of(msg: &ExportTraceServiceRequest) -> &[pb::Span] {
        assert_eq!(msg.resource_spans.len(), 1);
        assert_eq!(msg.resource_spans[0].scope_spans.len(), 1);
        &msg.resource_spans[0].scope_spans[0].spans
    }

    fn encode_one(r: &SpanRecord) -> pb::Span {
        let msg = decode(&export_request(&resource(), std::slice::from_ref(r)));
        let spans = spans_of(&msg);
        assert_eq!(spans.len(), 1);
        spans[0].clone()
    }

    fn resource() -> Resource {
        Resource { attributes: vec![("service.name".into(), "varnish".into())] }
    }

    fn kv(key: &str, value: V) -> KeyValue {
        KeyValue { key: key.into(), value: Some(AnyValue { value: Some(value) }) }
    }

    fn attr(key: &str, value: Value) -> Attribute {
        Attribute { key: key.to_owned().into(), value }
    }

    /// A SERVER span with a remote parent and every field the record has set.
    fn full() -> SpanRecord {
        let mut r = SpanRecord::new(SpanKind::Server, TraceId([0xab; 16]), SpanId([0x01; 8]), Some(SpanId([0x02; 8])));
        r.parent_is_remote = true;
        r.tracestate = Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".into());
        r.name = "GET /static".into();
        r.start_unix_nano = 1_700_000_000_000_001_000;
        r.end_unix_nano = 1_700_000_000_000_091_000;
        r.attributes = vec![
            attr("http.request.method", Value::Str("GET".into())),
            attr("http.response.status_code", Value::Int(503)),
            attr("ratio", Value::Float(0.25)),
            attr("varnish.hit", Value::Bool(false)),
        ];
        r.dropped_attributes = 300; // a two-byte varint
        r.events = vec![
            Event { time_unix_nano: 1_700_000_000_000_002_000, name: "Req".into() },
            Event { time_unix_nano: 1_700_000_000_000_090_000, name: "Resp".into() },
        ];
        r.links = vec![Link { trace_id: TraceId([0xcd; 16]), span_id: SpanId([0x03; 8]) }];
        r.status = StatusCode::Error;
        r.status_message = Some("backend fetch failed".into());
        r
    }

    #[test]
    fn encodes_every_span_field() {
        let expected = pb::Span {
            trace_id: vec![0xab; 16],
            span_id: vec![0x01; 8],
            trace_state: "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".into(),
            parent_span_id: vec![0x02; 8],
            flags: 0x301, // sampled, HAS_IS_REMOTE, IS_REMOTE
            name: "GET /static".into(),
            kind: PbKind::Server as i32,
            start_time_unix_nano: 1_700_000_000_000_001_000,
            end_time_unix_nano: 1_700_000_000_000_091_000,
            attributes: vec![
                kv("http.request.method", V::StringValue("GET".into())),
                kv("http.response.status_code", V::IntValue(503)),
                kv("ratio", V::DoubleValue(0.25)),
                kv("varnish.hit", V::BoolValue(false)),
            ],
            dropped_attributes_count: 300,
            events: vec![
                pb::span::Event {
                    time_unix_nano: 1_700_000_000_000_002_000,
                    name: "Req".into(),
                    attributes: vec![],
                    dropped_attributes_count: 0,
                },
                pb::span::Event {
                    time_unix_nano: 1_700_000_000_000_090_000,
                    name: "Resp".into(),
                    attributes: vec![],
                    dropped_attributes_count: 0,
                },
            ],
            dropped_events_count: 0,
            links: vec![pb::span::Link {
                trace_id: vec![0xcd; 16],
                span_id: vec![0x03; 8],
                trace_state: String::new(),
                attributes: vec![],
                dropped_attributes_count: 0,
                flags: 0,
            }],
            dropped_links_count: 0,
            status: Some(pb::Status { message: "backend fetch failed".into(), code: PbCode::Error as i32 }),
        };
        assert_eq!(encode_one(&full()), expected);
    }

    /// A fetch span as the exporter takes it: VCL's attributes, and the outcome in its typed
    /// fields, sealed. One of the outcome's strings too long for the one-byte length path.
    fn with_outcome() -> SpanRecord {
        let mut r = SpanRecord::new(SpanKind::Client, TraceId([0xab; 16]), SpanId([0x01; 8]), None);
        r.set_str("url.full", "http://b/");
        r.set_http_status(503); // and error.type "503"
        r.outcome.vxid = Some(1002);
        r.outcome.response_body_size = Some(u64::MAX);
        r.outcome.repeats = Some(1);
        r.outcome.object_age = Some(1.5);
        r.outcome.backend = Some("b".repeat(200).into());
        r.outcome.peer_port = Some(8080);
        r.seal();
        r
    }

    #[test]
    fn the_outcome_follows_the_attributes() {
        assert_eq!(
            encode_one(&with_outcome()).attributes,
            [
                kv("url.full", V::StringValue("http://b/".into())),
                kv("http.response.status_code", V::IntValue(503)),
                kv("error.type", V::StringValue("503".into())),
                kv("http.response.body.size", V::IntValue(i64::MAX)),
                kv("varnish.object.age", V::DoubleValue(1.5)),
                kv("varnish.vxid", V::IntValue(1002)),
                kv("varnish.retries", V::IntValue(1)),
                kv("varnish.backend", V::StringValue("b".repeat(200))),
                kv("network.peer.port", V::IntValue(8080)),
            ]
        );
    }

    #[test]
    fn root_span_omits_parent_and_defaults() {
        let mut r = SpanRecord::new(SpanKind::Client, TraceId([7; 16]), SpanId([8; 8]), None);
        r.name = "".into();
        let s = encode_one(&r);
        assert!(s.parent_span_id.is_empty());
        assert_eq!(s.flags, 0x101, "sampled, parent known not to be remote");
        assert_eq!(s.kind, PbKind::Client as i32);
        assert_eq!((s.trace_state.as_str(), s.name.as_str()), ("", ""));
        assert_eq!((s.start_time_unix_nano, s.end_time_unix_nano), (0, 0));
        assert!(s.attributes.is_empty() && s.events.is_empty() && s.links.is_empty());
        assert_eq!(s.dropped_attributes_count, 0);
        // Present but empty, as otlp_json writes `"status":{}`.
        assert_eq!(s.status, Some(pb::Status::default()));
        // Exactly trace_id, span_id, kind, status and flags: nothing for the empty or zero fields.
        let bytes = export_request(&resource(), std::slice::from_ref(&r));
        assert_eq!(encode_one(&r).encoded_len(), 18 + 10 + 2 + 2 + 6);
        let tail = [0x30, 3, 0x7a, 0, 0x85, 1, 0x01, 0x01, 0, 0]; // CLIENT, empty status, flags 0x101
        assert_eq!(&bytes[bytes.len() - tail.len()..], &tail);
    }

    #[test]
    fn remote_and_sampled_flags() {
        let mut r = full();
        for (sampled, remote, parent, flags) in
            [(1, true, true, 0x301), (1, false, true, 0x101), (0, true, true, 0x300), (0, false, false, 0x100)]
        {
            r.flags = sampled;
            r.parent_is_remote = remote;
            r.parent_span_id = parent.then_some(SpanId([0x02; 8]));
            let s = encode_one(&r);
            assert_eq!(s.flags, flags);
            assert_eq!(s.parent_span_id.len(), if parent { 8 } else { 0 });
        }
    }

    #[test]
    fn attribute_values_of_every_type_and_edge() {
        let mut r = full();
        r.attributes = vec![
            attr("empty", Value::Str("".into())),
            attr("unicode", Value::Str("Grüße, 世界 🦀 \u{0}\n\"".into())),
            attr("zero", Value::Int(0)),
            attr("minus one", Value::Int(-1)),
            attr("min", Value::Int(i64::MIN)),
            attr("max", Value::Int(i64::MAX)),
            attr("false", Value::Bool(false)),
            attr("true", Value::Bool(true)),
            attr("fzero", Value::Float(0.0)),
            attr("neg zero", Value::Float(-0.0)),
            attr("nan", Value::Float(f64::NAN)),
            attr("inf", Value::Float(f64::INFINITY)),
            attr("-inf", Value::Float(f64::NEG_INFINITY)),
            attr("tiny", Value::Float(f64::MIN_POSITIVE / 4.0)),
            attr("fmax", Value::Float(f64::MAX)),
            attr("", Value::Str("empty key".into())),
            attr("ключ", Value::Int(42)),
            attr("http.request.header.accept", Value::StrArray(vec!["a/b".into(), "".into(), "ü, 世".into()])),
            attr("no lines", Value::StrArray(vec![])),
        ];
        let s = encode_one(&r);
        let got: Vec<(&str, &V)> = s
            .attributes
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_ref().unwrap().value.as_ref().unwrap()))
            .collect();
        assert_eq!(got.len(), r.attributes.len());
        for ((key, value), a) in got.iter().zip(&r.attributes) {
            assert_eq!(*key, a.key);
            match (value, &a.value) {
                (V::StringValue(g), Value::Str(w)) => assert_eq!(g, w),
                (V::IntValue(g), Value::Int(w)) => assert_eq!(g, w),
                (V::BoolValue(g), Value::Bool(w)) => assert_eq!(g, w),
                (V::ArrayValue(g), Value::StrArray(w)) => {
                    let got: Vec<_> = g.values.iter().map(|v| v.value.clone()).collect();
                    let want: Vec<_> = w.iter().map(|s| Some(V::StringValue(s.clone()))).collect();
                    assert_eq!(got, want, "{key}");
                }
                // Bit for bit: NaN, the infinities and -0.0 pass through unchanged.
                (V::DoubleValue(g), Value::Float(w)) => assert_eq!(g.to_bits(), w.to_bits(), "{key}"),
                other => panic!("{key}: wrong type {other:?}"),
            }
        }
    }

    #[test]
    fn events_and_links_with_default_fields() {
        let mut r = full();
        r.events = vec![Event { time_unix_nano: 0, name: "".into() }, Event { time_unix_nano: 1, name: "é".into() }];
        r.links.push(Link { trace_id: TraceId([0xee; 16]), span_id: SpanId([0xff; 8]) });
        let s = encode_one(&r);
        assert_eq!(
            s.events.iter().map(|e| (e.time_unix_nano, e.name.as_str())).collect::<Vec<_>>(),
            [(0, ""), (1, "é")]
        );
        assert_eq!(
            s.links.iter().map(|l| (l.trace_id.clone(), l.span_id.clone())).collect::<Vec<_>>(),
            [(vec![0xcd; 16], vec![0x03; 8]), (vec![0xee; 16], vec![0xff; 8])]
        );
    }

    #[test]
    fn status_code_and_message_independently() {
        let mut r = full();
        for (code, message, expected) in [
            (StatusCode::Unset, None, pb::Status::default()),
            (StatusCode::Ok, None, pb::Status { message: String::new(), code: PbCode::Ok as i32 }),
            (StatusCode::Ok, Some(""), pb::Status { message: String::new(), code: PbCode::Ok as i32 }),
            (StatusCode::Unset, Some("just a note"), pb::Status { message: "just a note".into(), code: 0 }),
            (StatusCode::Error, Some("ошибка"), pb::Status { message: "ошибка".into(), code: PbCode::Error as i32 }),
        ] {
            r.status = code;
            r.status_message = message.map(str::to_owned);
            assert_eq!(encode_one(&r).status, Some(expected));
        }
    }

    #[test]
    fn resource_and_scope() {
        let res = Resource {
            attributes: vec![
                ("service.name".into(), "edge".into()),
                ("empty".into(), String::new()),
                ("host.name".into(), "hôte-1".into()),
            ],
        };
        let msg = decode(&export_request(&res, &[full()]));
        let rs = &msg.resource_spans[0];
        assert_eq!(
            rs.resource,
            Some(PbResource {
                attributes: vec![
                    kv("service.name", V::StringValue("edge".into())),
                    kv("empty", V::StringValue(String::new())),
                    kv("host.name", V::StringValue("hôte-1".into())),
                ],
                dropped_attributes_count: 0,
                entity_refs: vec![],
            })
        );
        assert_eq!(rs.schema_url, "");
        let ss = &rs.scope_spans[0];
        assert_eq!(
            ss.scope,
            Some(InstrumentationScope {
                name: otlp_json::SCOPE_NAME.into(),
                version: env!("CARGO_PKG_VERSION").into(),
                attributes: vec![],
                dropped_attributes_count: 0,
            })
        );
        assert_eq!(ss.schema_url, "");

        // No resource attributes: the resource is still there, empty, as in otlp_json.
        let msg = decode(&export_request(&Resource { attributes: vec![] }, &[full()]));
        assert_eq!(msg.resource_spans[0].resource, Some(PbResource::default()));
    }

    #[test]
    fn several_spans_in_one_request_and_none() {
        let mut records = Vec::new();
        for (i, kind) in
            [SpanKind::Server, SpanKind::Client, SpanKind::Internal, SpanKind::Client].into_iter().enumerate()
        {
            let mut r = SpanRecord::new(kind, TraceId([i as u8 + 1; 16]), SpanId([i as u8 + 1; 8]), None);
            r.name = format!("span {i}").into();
            r.start_unix_nano = i as u64 * 1000;
            if i % 2 == 0 {
                r.attributes = full().attributes;
                r.events = full().events;
            }
            records.push(r);
        }
        let msg = decode(&export_request(&resource(), &records));
        let spans = spans_of(&msg);
        assert_eq!(
            spans.iter().map(|s| (s.span_id[0], s.kind, s.name.as_str(), s.start_time_unix_nano)).collect::<Vec<_>>(),
            [(1, 2, "span 0", 0), (2, 3, "span 1", 1000), (3, 1, "span 2", 2000), (4, 3, "span 3", 3000)]
        );
        assert_eq!(
            spans.iter().map(|s| (s.attributes.len(), s.events.len())).collect::<Vec<_>>(),
            [(4, 2), (0, 0), (4, 2), (0, 0)]
        );

        // An empty batch is still a complete request, as otlp_json writes it.
        let msg = decode(&export_request::<SpanRecord>(&resource(), &[]));
        assert!(spans_of(&msg).is_empty());
        assert!(msg.resource_spans[0].scope_spans[0].scope.is_some());
    }

    /// Attributes `add`ed (encoded on the worker) and the same attributes held generically give
    /// the same bytes, in both encodings.
    #[test]
    fn added_attributes_encode_as_generic_ones_do() {
        let long = "/".repeat(200);
        let values: [(&'static str, Value); 8] = [
            ("http.request.method", Value::Str("GET".into())),
            ("url.path", Value::Str(long.as_str().into())),
            ("server.port", Value::Int(443)),
            ("negative", Value::Int(-5)),
            ("ratio", Value::Float(0.25)),
            ("flag", Value::Bool(true)),
            ("empty", Value::Str("".into())),
            ("", Value::Int(1)),
        ];
        let mut added = full();
        added.attributes.clear();
        let mut generic = added.clone();
        for (key, value) in &values {
            added.add(key, value.borrowed());
            generic.attributes.push(attr(key, value.clone()));
        }
        generic.attributes.push(attr("vcl", Value::Str("after".into())));
        added.attributes.push(attr("vcl", Value::Str("after".into())));
        assert_eq!(added.encoded.count(), values.len());
        assert_eq!(export_request(&resource(), &[&added]), export_request(&resource(), &[&generic]));
        assert_eq!(
            otlp_json::export_request(&resource(), &[&added]),
            otlp_json::export_request(&resource(), &[&generic])
        );
        assert_eq!(encode_one(&added).attributes.len(), values.len() + 1);
    }

    /// The decoder reads only what `push` writes: a cut or a changed byte ends the walk, never a
    /// panic.
    #[test]
    fn encoded_attributes_read_back_stop_at_anything_else() {
        let mut e = EncodedAttributes::default();
        e.push("k", ValueRef::Str("v"));
        e.push("n", ValueRef::Int(-1));
        e.push("long", ValueRef::Str(&"x".repeat(300)));
        e.push("f", ValueRef::Float(1.5));
        let all: Vec<_> = e.iter().map(|(k, v)| (k.to_owned(), v.to_value())).collect();
        assert_eq!(all.len(), 4);
        assert_eq!(all[1], ("n".to_owned(), Value::Int(-1)));
        assert!(e.contains("long") && !e.contains("lon"));
        assert!(!e.contains("v"), "values are not keys");
        assert!(!e.contains(""));
        let bytes = e.as_bytes().to_vec();
        for cut in 0..bytes.len() {
            let mut cut_short = e.clone();
            cut_short.len = cut;
            assert!(cut_short.iter().count() < 4, "cut at {cut}");
        }
        for at in 0..bytes.len() {
            for b in [0x00, 0x7f, 0x80, 0xff] {
                let mut changed = e.clone();
                changed.bytes[at] = b;
                assert!(changed.iter().count() <= 4);
                let _ = changed.contains("long");
            }
        }
        e.push("", ValueRef::Int(0));
        assert!(e.contains(""), "an empty key is written as proto3 omits it, and found");
        e.clear();
        assert!(e.is_empty() && e.iter().next().is_none() && e.capacity() > 0, "room kept");
    }

    #[test]
    fn attributes_and_events_around_the_one_byte_length_limit() {
        // A field whose length fits in one byte is written by a shorter path than one that does
        // not: both sides of the boundary, for every kind of value and for event names.
        let mut r = SpanRecord::new(SpanKind::Server, TraceId([1; 16]), SpanId([2; 8]), None);
        for n in 100..140 {
            r.attributes.push(attr("k", Value::Str("s".repeat(n).into())));
            r.attributes.push(attr(&"i".repeat(n), Value::Int(-(n as i64))));
            r.attributes.push(attr(&"f".repeat(n), Value::Float(n as f64)));
            r.attributes.push(attr(&"b".repeat(n), Value::Bool(n % 2 == 0)));
            r.attributes.push(attr(&"a".repeat(n), Value::StrArray(vec!["x".into(), String::new()])));
            r.events.push(Event { time_unix_nano: n as u64, name: "e".repeat(n).into() });
        }
        r.attributes.push(attr("", Value::Int(1)));
        r.events.push(Event { time_unix_nano: 0, name: "at zero".into() });
        r.events.push(Event { time_unix_nano: 7, name: "".into() });
        let msg = decode(&export_request(&resource(), &[&r]));
        let span = &spans_of(&msg)[0];
        assert_eq!(span.attributes.len(), r.attributes.len());
        for (got, want) in span.attributes.iter().zip(&r.attributes) {
            assert_eq!(got.key, want.key);
            let value = got.value.as_ref().and_then(|v| v.value.as_ref());
            match (value, &want.value) {
                (Some(V::StringValue(g)), Value::Str(w)) => assert_eq!(g, w.as_str()),
                (Some(V::IntValue(g)), Value::Int(w)) => assert_eq!(g, w),
                (Some(V::DoubleValue(g)), Value::Float(w)) => assert_eq!(g, w),
                (Some(V::BoolValue(g)), Value::Bool(w)) => assert_eq!(g, w),
                (Some(V::ArrayValue(g)), Value::StrArray(w)) => assert_eq!(g.values.len(), w.len()),
                other => panic!("{} decoded as {other:?}", want.key),
            }
        }
        let events: Vec<_> = span.events.iter().map(|e| (e.time_unix_nano, e.name.clone())).collect();
        let want: Vec<_> = r.events.iter().map(|e| (e.time_unix_nano, e.name.to_string())).collect();
        assert_eq!(events, want);
    }

    #[test]
    fn large_values_take_multi_byte_lengths() {
        // 200 B: a two-byte length; 20 kB: three bytes (> 16383), also for the span and every
        // enclosing message; 2.1 MB: four bytes (> 2^21 - 1). Set directly: `set` would cut them.
        let long_key = "k".repeat(130);
        let mut r = full();
        r.attributes = vec![
            attr(&long_key, Value::Str("v".repeat(200).into())),
            attr("20k", Value::Str("é".repeat(10_000).into())),
            attr("2M", Value::Str("x".repeat(2_100_000).into())),
        ];
        r.status_message = Some("m".repeat(128));
        let s = encode_one(&r);
        assert_eq!(s.attributes[0], kv(&long_key, V::StringValue("v".repeat(200))));
        assert_eq!(s.attributes[1], kv("20k", V::StringValue("é".repeat(10_000))));
        assert_eq!(s.attributes[2], kv("2M", V::StringValue("x".repeat(2_100_000))));
        assert_eq!(s.status.unwrap().message.len(), 128);
    }

    #[test]
    fn a_reused_buffer_holds_the_same_request_as_a_new_one() {
        let mut root = full();
        root.parent_span_id = None;
        let mut large = full();
        large.attributes.push(attr("large", Value::Str("y".repeat(20_000).into())));
        // After the large one, the buffer holds more than the next requests: bytes left on both
        // sides of them.
        let batches: [&[SpanRecord]; 5] = [&[full()], &[root.clone(), full()], &[large], &[full()], &[]];
        let mut out = b"earlier bytes, more than the room for the headers needs".to_vec();
        for batch in batches {
            let request = write_export_request(&mut out, &resource(), batch);
            assert_eq!(&out[request.clone()], &export_request(&resource(), batch)[..]);
            assert_eq!(spans_of(&decode(&out[request])).len(), batch.len());
        }
        assert!(out.len() > 20_000, "the large request's room is kept");
    }

    /// Every length a span's can take: one byte (a bare span), two (the usual), three and four
    /// (large attributes), each written after the room for two was left.
    #[test]
    fn spans_whose_length_is_not_two_bytes_long_are_moved_into_place() {
        let mut bare = SpanRecord::new(SpanKind::Internal, TraceId([9; 16]), SpanId([9; 8]), None);
        bare.name = "".into();
        let mut sizes = vec![bare];
        for n in [0, 100, 16_300, 16_400, 2_100_000] {
            let mut r = full();
            r.attributes.push(attr("padding", Value::Str("p".repeat(n).into())));
            sizes.push(r);
        }
        let bytes = export_request(&resource(), &sizes);
        let msg = decode(&bytes);
        let spans = spans_of(&msg);
        assert_eq!(spans.len(), sizes.len());
        let lens: Vec<usize> = spans.iter().map(|s| s.encoded_len()).collect();
        assert!(lens[0] < 0x80 && lens[1] < 0x4000 && lens[4] >= 0x4000 && lens[5] >= 1 << 21, "{lens:?}");
        for (decoded, r) in spans.iter().zip(&sizes) {
            assert_eq!(decoded, &encode_one(r));
        }
    }

    #[test]
    fn varint_lengths_match_what_is_written() {
        for v in
            [0, 1, 127, 128, 16_383, 16_384, (1 << 21) - 1, 1 << 21, u32::MAX as u64, (1 << 63) - 1, 1 << 63, u64::MAX]
        {
            let mut buf = Vec::new();
            let mut out = Buf { buf: &mut buf, at: 0 };
            put_varint(&mut out, v);
            let n = out.at;
            let (bytes, used) = varint_bytes(v);
            assert_eq!(&bytes[..used], &buf[..n], "{v}");
            let mut expected = Vec::new();
            prost::encoding::encode_varint(v, &mut expected);
            assert_eq!(&buf[..n], &expected[..], "{v}");
            assert_eq!(n, varint_len(v), "{v}");
        }
    }

    /// The JSON encoder's output, read back by opentelemetry-proto's serde mapping, is the message
    /// our protobuf decodes to. Not covered, because that reading fails on them: NaN and the
    /// infinities, which OTLP/JSON spells as the strings "NaN" and "Infinity" (the mapping only
    /// takes JSON numbers for `doubleValue`), and doubles near `f64::MAX` (otlp_json prints
    /// `f64::MAX` as 309 digits, which serde_json's default float parser rejects as out of range).
    /// Both are checked bit for bit in `attribute_values_of_every_type_and_edge` instead.
    #[test]
    fn same_message_as_the_json_encoder() {
        let mut records = vec![full()];
        let mut edge = full();
        edge.attributes = vec![
            attr("empty", Value::Str("".into())),
            attr("unicode", Value::Str("Grüße 世界 🦀 \u{1}\t\"\\".into())),
            attr("zero", Value::Int(0)),
            attr("min", Value::Int(i64::MIN)),
            attr("max", Value::Int(i64::MAX)),
            attr("true", Value::Bool(true)),
            attr("neg zero", Value::Float(-0.0)),
            attr("big", Value::Float(1e300)),
            attr("tiny", Value::Float(5e-324)),
            attr("third", Value::Float(1.0 / 3.0)),
            attr("", Value::Int(-7)),
        ];
        edge.parent_span_id = None;
        edge.parent_is_remote = false;
        edge.tracestate = Some(String::new());
        edge.flags = 0;
        edge.status = StatusCode::Ok;
        edge.status_message = Some(String::new());
        edge.events.push(Event { time_unix_nano: 0, name: "".into() });
        records.push(edge);
        let mut bare = SpanRecord::new(SpanKind::Internal, TraceId([9; 16]), SpanId([9; 8]), None);
        bare.name = "".into();
        records.push(bare);
        let mut large = full();
        large.attributes.push(attr("large", Value::Str("y".repeat(20_000).into())));
        records.push(large);
        records.push(with_outcome());

        for res in [resource(), Resource { attributes: vec![] }] {
            for batch in [&records[..], &records[..1], &[]] {
                let mut json = String::new();
                otlp_json::write_export_request(&mut json, &res, batch);
                let from_json: ExportTraceServiceRequest =
                    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
                assert_eq!(decode(&export_request(&res, batch)), from_json);
            }
        }
    }
}
