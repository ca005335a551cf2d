//! The span record: everything we know about one span, filled in pieces by whoever learns it.
//!
//! A record is created on a Varnish worker thread when VCL starts a span (`trace_request`,
//! `trace_backend`), receives attributes from VCL while the task runs, and is completed when the
//! task ends (the PRIV_TASK fini, see `varnish::task`) or, later, from the shared-memory log. It is
//! then moved, whole, to the exporter thread. A record is owned by exactly one thread at a time,
//! so it needs no locking of its own.

use std::borrow::Cow;
use std::sync::atomic::AtomicUsize;

pub use crate::export::otlp_proto::EncodedAttributes;
use crate::ids::{SpanId, TraceId};

/// Limits on what one span may carry (`OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT` and friends). The
/// active ones live in atomics: read with relaxed loads on the request path, stored on the CLI
/// thread when a configuration is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttributeLimits {
    /// Attributes per span; more are refused and counted (`droppedAttributesCount`).
    pub count: usize,
    /// Longest string value kept, in bytes; longer values are cut at a character boundary.
    /// The SDK default is unlimited; ours is bounded, so that one header cannot hold megabytes.
    pub value_len: usize,
    /// Events per span.
    pub events: usize,
    /// Links per span.
    pub links: usize,
}

impl Default for AttributeLimits {
    fn default() -> Self {
        AttributeLimits { count: 128, value_len: 4096, events: 128, links: 128 }
    }
}

impl AttributeLimits {
    /// `OTEL_SPAN_ATTRIBUTE_*` wins over the general `OTEL_ATTRIBUTE_*`, as in the SDK.
    pub fn from_settings(s: &crate::config::Settings) -> Result<Self, String> {
        let d = AttributeLimits::default();
        let either = |specific: &str, general: &str, default: usize| -> Result<usize, String> {
            if s.get(specific).is_some() {
                s.number(specific, default, true)
            } else {
                s.number(general, default, true)
            }
        };
        Ok(AttributeLimits {
            count: either("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "OTEL_ATTRIBUTE_COUNT_LIMIT", d.count)?,
            value_len: either(
                "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT",
                "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
                d.value_len,
            )?,
            events: s.number("OTEL_SPAN_EVENT_COUNT_LIMIT", d.events, true)?,
            links: s.number("OTEL_SPAN_LINK_COUNT_LIMIT", d.links, true)?,
        })
    }

    pub fn activate(self) {
        use std::sync::atomic::Ordering::Relaxed;
        ACTIVE_LIMITS[0].store(self.count, Relaxed);
        ACTIVE_LIMITS[1].store(self.value_len, Relaxed);
        ACTIVE_LIMITS[2].store(self.events, Relaxed);
        ACTIVE_LIMITS[3].store(self.links, Relaxed);
    }
}

static ACTIVE_LIMITS: [AtomicUsize; 4] =
    [AtomicUsize::new(128), AtomicUsize::new(4096), AtomicUsize::new(128), AtomicUsize::new(128)];

fn max_attributes() -> usize {
    ACTIVE_LIMITS[0].load(std::sync::atomic::Ordering::Relaxed)
}

fn max_value_len() -> usize {
    ACTIVE_LIMITS[1].load(std::sync::atomic::Ordering::Relaxed)
}

pub fn max_events() -> usize {
    ACTIVE_LIMITS[2].load(std::sync::atomic::Ordering::Relaxed)
}

pub fn max_links() -> usize {
    ACTIVE_LIMITS[3].load(std::sync::atomic::Ordering::Relaxed)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Internal,
    Server,
    Client,
}

impl SpanKind {
    /// The OTLP enum value (`SPAN_KIND_*`).
    pub fn otlp(self) -> u8 {
        match self {
            SpanKind::Internal => 1,
            SpanKind::Server => 2,
            SpanKind::Client => 3,
        }
    }
}

/// An attribute's string value.
pub type Text = compact_str::CompactString;

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Held inline up to 24 bytes (addresses, hosts, short paths), borrowed for the values we
    /// know at compile time (`Text::const_new`): most attribute values of a span then cost no
    /// allocation on the worker, and no free on the exporter thread (where each free of a
    /// worker's allocation cost about 150 instructions: docs/performance-history.md).
    Str(Text),
    /// `string[]` in the semantic conventions: a captured header, one element per header line.
    StrArray(Vec<String>),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Value {
    pub fn borrowed(&self) -> ValueRef<'_> {
        match self {
            Value::Str(s) => ValueRef::Str(s),
            Value::StrArray(v) => ValueRef::StrArray(v),
            Value::Int(i) => ValueRef::Int(*i),
            Value::Float(f) => ValueRef::Float(*f),
            Value::Bool(b) => ValueRef::Bool(*b),
        }
    }
}

/// Where `SpanRecord::for_each_outcome_attribute` puts the attributes: an encoder's writer, or
/// any closure taking `(key, value)`.
pub trait AttributeSink {
    fn attribute(&mut self, key: &'static str, value: ValueRef<'_>);
}

impl<F: FnMut(&'static str, ValueRef<'_>)> AttributeSink for F {
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn attribute(&mut self, key: &'static str, value: ValueRef<'_>) {
        self(key, value);
    }
}

/// An attribute's value as the encoders read it: borrowed from an `Attribute`, or made from a
/// typed field of the `Outcome` (no `Value` is built for those).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ValueRef<'a> {
    Str(&'a str),
    StrArray(&'a [String]),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl ValueRef<'_> {
    /// An owned copy (`SpanRecord::get`, and the rare unpacking of encoded attributes).
    pub fn to_value(self) -> Value {
        match self {
            ValueRef::Str(s) => Value::Str(s.into()),
            ValueRef::StrArray(v) => Value::StrArray(v.to_vec()),
            ValueRef::Int(i) => Value::Int(i),
            ValueRef::Float(f) => Value::Float(f),
            ValueRef::Bool(b) => Value::Bool(b),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Attribute {
    pub key: Cow<'static, str>,
    pub value: Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StatusCode {
    #[default]
    Unset,
    Ok,
    Error,
}

impl StatusCode {
    pub fn otlp(self) -> u8 {
        match self {
            StatusCode::Unset => 0,
            StatusCode::Ok => 1,
            StatusCode::Error => 2,
        }
    }
}

/// Who completed the span: the task-end hook, the shared-memory log, or the deadline sweep that
/// closes spans whose task state was rolled back and never re-adopted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ClosedBy {
    #[default]
    Open,
    /// From the shared-memory log (the normal case when the tailer runs).
    Log,
    /// From the task-end data alone (no tailer, or the log did not deliver in time).
    TaskEnd,
    /// From what was known when a rolled-back task was never resumed.
    Deadline,
}

impl ClosedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            ClosedBy::Open => "open",
            ClosedBy::Log => "log",
            ClosedBy::TaskEnd => "task_end",
            ClosedBy::Deadline => "deadline",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Link {
    pub trace_id: TraceId,
    pub span_id: SpanId,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub time_unix_nano: u64,
    pub name: Cow<'static, str>,
}

/// How a span ended, as the end of its task and then the shared-memory log tell it (the log,
/// which knows better, replaces what the task saw). Kept in typed fields rather than attributes,
/// up to the encoders (`SpanRecord::for_each_outcome_attribute`): each source then replaces a
/// value without searching the attributes, and the tailer never reads them (by the time it
/// merges a span, its attribute array is out of the CPU's caches: `SpanRecord::set` on it was 9%
/// of the tailer's cycles, measured with `perf record`). Moving the outcome into the attributes
/// when the exporter took a span, as before, cost about 575 instructions per span, and more to
/// encode and drop those generic `Attribute`s (callgrind).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// `varnish.vxid`: the transaction the span ended in (restarts and retries change it).
    pub vxid: Option<u64>,
    /// `http.response.status_code`.
    pub status_code: Option<u16>,
    /// `http.request.body.size`.
    pub request_body_size: Option<u64>,
    /// `http.response.body.size`.
    pub response_body_size: Option<u64>,
    /// `error.type`.
    pub error_type: Option<Text>,
    /// `varnish.restarts` of a request span, `varnish.retries` of a fetch span.
    pub repeats: Option<u32>,
    /// `varnish.cache_result`.
    pub cache_result: Option<Text>,
    /// `varnish.object.age` and `varnish.object.ttl` of a hit, in seconds.
    pub object_age: Option<f64>,
    pub object_ttl: Option<f64>,
    /// `varnish.backend`: the backend a fetch went to.
    pub backend: Option<Text>,
    /// `network.peer.address` and `network.peer.port` of a fetch: its backend connection's.
    pub peer_address: Option<Text>,
    pub peer_port: Option<u16>,
}

/// The attribute keys `Outcome` fills in (`SpanRecord::set` routes or shadows them).
const OUTCOME_KEYS: [&str; 13] = [
    "varnish.vxid",
    "http.response.status_code",
    "http.request.body.size",
    "http.response.body.size",
    "error.type",
    "varnish.restarts",
    "varnish.retries",
    "varnish.cache_result",
    "varnish.object.age",
    "varnish.object.ttl",
    "varnish.backend",
    "network.peer.address",
    "network.peer.port",
];

impl Outcome {
    /// How many attributes the outcome writes.
    fn count(&self) -> usize {
        usize::from(self.vxid.is_some())
            + usize::from(self.status_code.is_some())
            + usize::from(self.request_body_size.is_some())
            + usize::from(self.response_body_size.is_some())
            + usize::from(self.error_type.is_some())
            + usize::from(self.repeats.is_some())
            + usize::from(self.cache_result.is_some())
            + usize::from(self.object_age.is_some())
            + usize::from(self.object_ttl.is_some())
            + usize::from(self.backend.is_some())
            + usize::from(self.peer_address.is_some())
            + usize::from(self.peer_port.is_some())
    }

    /// Whether the outcome writes attribute `key` (of a span of `kind`).
    fn writes(&self, key: &str, kind: SpanKind) -> bool {
        match key {
            "varnish.vxid" => self.vxid.is_some(),
            "http.response.status_code" => self.status_code.is_some(),
            "http.request.body.size" => self.request_body_size.is_some(),
            "http.response.body.size" => self.response_body_size.is_some(),
            "error.type" => self.error_type.is_some(),
            "varnish.restarts" => kind != SpanKind::Client && self.repeats.is_some(),
            "varnish.retries" => kind == SpanKind::Client && self.repeats.is_some(),
            "varnish.cache_result" => self.cache_result.is_some(),
            "varnish.object.age" => self.object_age.is_some(),
            "varnish.object.ttl" => self.object_ttl.is_some(),
            "varnish.backend" => self.backend.is_some(),
            "network.peer.address" => self.peer_address.is_some(),
            "network.peer.port" => self.peer_port.is_some(),
            _ => false,
        }
    }
}

/// Room for the generic attributes of most spans in one allocation, made when VCL sets its first
/// (`set`; the module's own are encoded, `EncodedAttributes`, and the outcome is typed): a few
/// `tag()`s, captured headers, `http.route`. Growing the vector instead copied it as it grew;
/// the record keeps the room when it is reused.
const ATTRIBUTES_RESERVED: usize = 32;

/// `SpanRecord::outcome_kept` before `seal`: no limit applied yet.
const OUTCOME_UNSEALED: u8 = u8::MAX;

#[derive(Clone, Debug, PartialEq)]
pub struct SpanRecord {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// `None` for a root span.
    pub parent_span_id: Option<SpanId>,
    /// The parent came from another process (an incoming `traceparent`).
    pub parent_is_remote: bool,
    /// W3C trace-flags as sent downstream (bit 0: sampled).
    pub flags: u8,
    /// The validated, combined `tracestate` of the parent, passed through unchanged.
    pub tracestate: Option<String>,
    pub kind: SpanKind,
    pub name: Cow<'static, str>,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// The module's own attributes, encoded as they were added (`add`); exported before
    /// `attributes`.
    pub encoded: EncodedAttributes,
    /// The attributes VCL set (`set`).
    pub attributes: Vec<Attribute>,
    /// Attributes refused because of the count or length limits (OTLP `droppedAttributesCount`).
    pub dropped_attributes: u32,
    pub events: Vec<Event>,
    pub links: Vec<Link>,
    pub status: StatusCode,
    pub status_message: Option<String>,
    /// The VXID of the task when the span started; the final one is recorded as `varnish.vxid`.
    pub vxid: u64,
    pub closed_by: ClosedBy,
    /// How the span ended; exported after the attributes (`for_each_outcome_attribute`).
    pub outcome: Outcome,
    /// How many of the outcome's attributes are exported: all of them (`OUTCOME_UNSEALED`)
    /// until `seal` applies the count limit.
    outcome_kept: u8,
    /// VCL set an attribute whose key the outcome also fills in (with a type the outcome does
    /// not take): `seal` then lets the outcome's value, if any, replace it. Keeps `seal` from
    /// searching the attributes of every other span.
    outcome_shadowed: bool,
}

impl SpanRecord {
    pub fn new(kind: SpanKind, trace_id: TraceId, span_id: SpanId, parent: Option<SpanId>) -> Self {
        SpanRecord {
            trace_id,
            span_id,
            parent_span_id: parent,
            parent_is_remote: false,
            flags: 1,
            tracestate: None,
            kind,
            name: Cow::Borrowed("HTTP"),
            start_unix_nano: 0,
            end_unix_nano: 0,
            encoded: EncodedAttributes::default(),
            attributes: Vec::new(),
            dropped_attributes: 0,
            events: Vec::new(),
            links: Vec::new(),
            status: StatusCode::Unset,
            status_message: None,
            vxid: 0,
            closed_by: ClosedBy::Open,
            outcome: Outcome::default(),
            outcome_kept: OUTCOME_UNSEALED,
            outcome_shadowed: false,
        }
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// Empties the record for another span, as `new` makes one, keeping the room of its arrays
    /// (`span_pool`).
    ///
    /// Field by field rather than by assigning a new record, which wrote the whole record (about
    /// 400 bytes) and dropped every old field first: 763 -> 601 instructions per span on the
    /// exporter thread (callgrind; most of what is left is dropping the attributes). Every field
    /// is named (no `..`), so that a field added later cannot be forgotten here.
    pub fn clear_for_reuse(&mut self) {
        let SpanRecord {
            trace_id,
            span_id,
            parent_span_id,
            parent_is_remote,
            flags,
            tracestate,
            kind,
            name,
            start_unix_nano,
            end_unix_nano,
            encoded,
            attributes,
            dropped_attributes,
            events,
            links,
            status,
            status_message,
            vxid,
            closed_by,
            outcome,
            outcome_kept,
            outcome_shadowed,
        } = self;
        *trace_id = TraceId([0; 16]);
        *span_id = SpanId([0; 8]);
        *parent_span_id = None;
        *parent_is_remote = false;
        *flags = 1;
        if tracestate.is_some() {
            *tracestate = None;
        }
        *kind = SpanKind::Internal;
        *name = Cow::Borrowed("HTTP");
        *start_unix_nano = 0;
        *end_unix_nano = 0;
        encoded.clear();
        attributes.clear();
        *dropped_attributes = 0;
        events.clear();
        links.clear();
        *status = StatusCode::Unset;
        if status_message.is_some() {
            *status_message = None;
        }
        *vxid = 0;
        *closed_by = ClosedBy::Open;
        // Unconditionally: asking whether it is empty (a comparison with a default one) cost
        // more than emptying it.
        *outcome = Outcome::default();
        *outcome_kept = OUTCOME_UNSEALED;
        *outcome_shadowed = false;
    }

    /// Sets an attribute, replacing an earlier value of the same key (the last write wins, as
    /// with the SDK's `set_attribute`). Refuses, and counts, what is over the limits.
    ///
    /// The string values of `error.type` and `varnish.cache_result` go to the outcome (the task
    /// and the log read them there); other keys the outcome fills in are kept as attributes,
    /// which the outcome's value, when it has one, replaces in `seal`.
    pub fn set(&mut self, key: impl Into<Cow<'static, str>>, value: Value) {
        let key = key.into();
        let value = within_value_len(value);
        if !OUTCOME_KEYS.contains(&&*key) {
            self.set_attribute(key, value);
            return;
        }
        match (&*key, value) {
            ("error.type", Value::Str(s)) => self.outcome.error_type = Some(s),
            ("varnish.cache_result", Value::Str(s)) => self.outcome.cache_result = Some(s),
            (_, value) => {
                self.outcome_shadowed = true;
                self.set_attribute(key, value);
            }
        }
    }

    fn set_attribute(&mut self, key: Cow<'static, str>, value: Value) {
        // VCL replacing one of the module's own attributes (rare): they become generic ones, in
        // their place, so that the last write wins where the first was.
        if !self.encoded.is_empty() && self.encoded.contains(&key) {
            self.unpack_encoded();
        }
        // From the end: the keys set again are usually the ones set last, so the search
        // usually stops after a few comparisons.
        if let Some(existing) = self.attributes.iter_mut().rev().find(|a| a.key == key) {
            existing.value = value;
        } else if self.attribute_count() < max_attributes() {
            if self.attributes.capacity() == 0 {
                // Allocated on first use: unsampled spans never pay for it.
                self.attributes.reserve_exact(ATTRIBUTES_RESERVED);
            }
            self.attributes.push(Attribute { key, value });
        } else {
            self.dropped_attributes += 1;
        }
    }

    /// Applies the limits to the span as the encoders will write it: VCL's attributes, then the
    /// outcome's. The exporter's thread calls it when it takes the span. Within the attribute
    /// count limit the outcome comes first (the status and the sizes matter more than the last
    /// attribute VCL added); a key VCL set that the outcome fills in gives way to it. Sealing
    /// again changes nothing.
    pub fn seal(&mut self) {
        self.seal_within(max_attributes(), max_value_len());
    }

    /// `seal` with the limits given (the tests' own, not the process's).
    fn seal_within(&mut self, max: usize, max_len: usize) {
        if self.outcome_kept != OUTCOME_UNSEALED {
            return;
        }
        if self.outcome_shadowed {
            self.outcome_shadowed = false;
            let (o, kind) = (&self.outcome, self.kind);
            self.attributes.retain(|a| !o.writes(&a.key, kind));
        }
        let known = self.outcome.count();
        let room = max.saturating_sub(known);
        if self.attribute_count() > room {
            // Only a limit below the usual count of the module's own attributes cuts into them
            // (rare): the ones kept are then re-encoded as generic ones.
            if self.encoded.count() > room {
                self.unpack_encoded();
            }
            let generic_room = room - self.encoded.count();
            self.dropped_attributes += (self.attributes.len() - generic_room) as u32;
            self.attributes.truncate(generic_room);
        }
        // Only a limit below the outcome's own count refuses some of it (the last ones in
        // `for_each_outcome_attribute`'s order).
        let kept = known.min(max);
        self.dropped_attributes += (known - kept) as u32;
        self.outcome_kept = kept as u8; // at most 12
                                        // The strings within the value length limit, as `set` keeps them.
        let o = &mut self.outcome;
        for s in [&mut o.error_type, &mut o.cache_result, &mut o.backend, &mut o.peer_address].into_iter().flatten() {
            if s.len() > max_len {
                s.truncate(char_boundary_at_most(s, max_len));
            }
        }
    }

    /// Gives `sink` each attribute of the outcome, in the order they are exported (after the
    /// record's `attributes`), as many as `seal` kept. Inlined, with the sink's method, at each
    /// of the dozen places below: the protobuf encoder's writer then sees each key as a literal
    /// (its length and copy folded in), where a closure called a dozen times was kept out of
    /// line (about 80 instructions per attribute, callgrind).
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    #[allow(unused_assignments)] // the last `emit!`'s count is not read again
    pub fn for_each_outcome_attribute(&self, sink: &mut impl AttributeSink) {
        let o = &self.outcome;
        let mut left = self.outcome_kept;
        macro_rules! emit {
            ($key:expr, $value:expr) => {
                if left > 0 {
                    left -= 1;
                    sink.attribute($key, $value);
                }
            };
        }
        let size = |n: u64| ValueRef::Int(n.min(i64::MAX as u64) as i64);
        if let Some(s) = o.status_code {
            emit!("http.response.status_code", ValueRef::Int(i64::from(s)));
        }
        if let Some(t) = &o.error_type {
            emit!("error.type", ValueRef::Str(t));
        }
        if let Some(n) = o.request_body_size {
            emit!("http.request.body.size", size(n));
        }
        if let Some(n) = o.response_body_size {
            emit!("http.response.body.size", size(n));
        }
        if let Some(r) = &o.cache_result {
            emit!("varnish.cache_result", ValueRef::Str(r));
        }
        if let Some(age) = o.object_age {
            emit!("varnish.object.age", ValueRef::Float(age));
        }
        if let Some(ttl) = o.object_ttl {
            emit!("varnish.object.ttl", ValueRef::Float(ttl));
        }
        if let Some(v) = o.vxid {
            emit!("varnish.vxid", size(v));
        }
        if let Some(n) = o.repeats {
            if self.kind == SpanKind::Client {
                emit!("varnish.retries", ValueRef::Int(i64::from(n)));
            } else {
                emit!("varnish.restarts", ValueRef::Int(i64::from(n)));
            }
        }
        if let Some(b) = &o.backend {
            emit!("varnish.backend", ValueRef::Str(b));
        }
        if let Some(a) = &o.peer_address {
            emit!("network.peer.address", ValueRef::Str(a));
        }
        if let Some(p) = o.peer_port {
            emit!("network.peer.port", ValueRef::Int(i64::from(p)));
        }
    }

    /// Appends an attribute the caller knows is not set yet (the module's own keys, set once
    /// when the span starts): no search, and encoded at once (`EncodedAttributes`). Within the
    /// limits, as `set` applies them: a longer string is cut at a character boundary.
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    pub fn add(&mut self, key: &'static str, value: ValueRef<'_>) {
        if self.attribute_count() >= max_attributes() {
            self.dropped_attributes += 1;
            return;
        }
        match value {
            ValueRef::Str(s) => {
                let max = max_value_len();
                let s = if s.len() > max { &s[..char_boundary_at_most(s, max)] } else { s };
                self.encoded.push(key, ValueRef::Str(s));
            }
            // Arrays stay generic (the encoded attributes are decoded again by the JSON encoder,
            // which reads scalars only); none of the module's own attributes is one.
            ValueRef::StrArray(_) => self.set_attribute(Cow::Borrowed(key), within_value_len(value.to_value())),
            _ => self.encoded.push(key, value),
        }
    }

    /// How many attributes the span holds besides the outcome's.
    pub fn attribute_count(&self) -> usize {
        self.encoded.count() + self.attributes.len()
    }

    /// Calls `f` with each attribute before the outcome's, in the order they are exported: the
    /// encoded ones, then VCL's.
    pub fn for_each_attribute(&self, mut f: impl FnMut(&str, ValueRef<'_>)) {
        for (key, value) in self.encoded.iter() {
            f(key, value);
        }
        for a in &self.attributes {
            f(&a.key, a.value.borrowed());
        }
    }

    /// Moves the encoded attributes to the front of the generic ones, decoded.
    #[cold]
    fn unpack_encoded(&mut self) {
        let decoded: Vec<Attribute> = self
            .encoded
            .iter()
            .map(|(key, value)| Attribute { key: Cow::Owned(key.to_owned()), value: value.to_value() })
            .collect();
        self.encoded.clear();
        self.attributes.splice(0..0, decoded);
    }

    pub fn set_str(&mut self, key: &'static str, value: impl Into<Text>) {
        self.set(key, Value::Str(value.into()));
    }

    pub fn set_int(&mut self, key: &'static str, value: i64) {
        self.set(key, Value::Int(value));
    }

    /// `http.response.status_code`, and the span status per the HTTP semantic conventions: 5xx
    /// is an error on both kinds, 4xx only on CLIENT spans; below that the status is left unset.
    pub fn set_http_status(&mut self, status: u16) {
        self.outcome.status_code = Some(status);
        let error = status >= 500 || (status >= 400 && self.kind == SpanKind::Client);
        if error {
            self.status = StatusCode::Error;
            self.outcome.error_type = Some(status.to_string().into());
        } else if self.status == StatusCode::Error
            && self.outcome.error_type.as_deref().is_some_and(|t| t.parse::<u16>().is_ok())
        {
            // A later, better source (the log) says the status was not an error after all.
            self.status = StatusCode::Unset;
            self.outcome.error_type = None;
        }
    }

    /// The value of attribute `key` (not the outcome's), as the encoders will write it.
    pub fn get(&self, key: &str) -> Option<Value> {
        match self.attributes.iter().rev().find(|a| a.key == key) {
            Some(a) => Some(a.value.clone()),
            None => self.encoded.iter().filter(|(k, _)| *k == key).last().map(|(_, v)| v.to_value()),
        }
    }

    /// Adds a span link, within `OTEL_SPAN_LINK_COUNT_LIMIT`.
    pub fn add_link(&mut self, trace_id: TraceId, span_id: SpanId) {
        if self.links.len() < max_links() {
            self.links.push(Link { trace_id, span_id });
        }
    }

    pub fn add_event(&mut self, time_unix_nano: u64, name: impl Into<Cow<'static, str>>) {
        // Bounded like attributes: a looping VCL must not grow a record without limit.
        if self.events.len() < max_events() {
            self.events.push(Event { time_unix_nano, name: name.into() });
        }
    }
}

/// `value` within the value length limit.
fn within_value_len(value: Value) -> Value {
    match value {
        Value::Str(s) => Value::Str(truncate_text(s, max_value_len())),
        // The length limit applies to each string of an array (the SDK specification).
        Value::StrArray(v) => Value::StrArray(v.into_iter().map(|s| truncate(s, max_value_len())).collect()),
        other => other,
    }
}

/// `bytes` as text, invalid UTF-8 replaced (U+FFFD). Valid text, the usual case, is copied as
/// it is: `CompactString::from_utf8_lossy` walks it character by character (1,000 instructions
/// for an IPv4 address, measured with callgrind).
pub fn text_lossy(bytes: &[u8]) -> Text {
    match utf8(bytes) {
        Some(s) => Text::from(s),
        None => Text::from(String::from_utf8_lossy(bytes)),
    }
}

/// `bytes` as text if it is UTF-8. ASCII, what nearly every request line, header value and
/// address is, is recognised by `is_ascii` (a word at a time): `std::str::from_utf8` cost 80 to
/// 160 instructions on values of 10 to 20 bytes (callgrind), a few times more.
#[inline]
pub fn utf8(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII text is UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        std::str::from_utf8(bytes).ok()
    }
}

/// `bytes` as text, borrowed when it is UTF-8, invalid sequences replaced (U+FFFD) otherwise.
pub fn utf8_lossy(bytes: &[u8]) -> Cow<'_, str> {
    match utf8(bytes) {
        Some(s) => Cow::Borrowed(s),
        None => String::from_utf8_lossy(bytes),
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn truncate_text(mut s: Text, max: usize) -> Text {
    if s.len() > max {
        s.truncate(char_boundary_at_most(&s, max));
    }
    s
}

fn char_boundary_at_most(s: &str, max: usize) -> usize {
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    cut
}

pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        s.truncate(char_boundary_at_most(&s, max));
    }
    s
}

/// Varnish keeps times as `double` seconds since the epoch. VSL prints a timestamp as
/// `floor(t)` seconds and `floor(t * 1e6) % 1000000` microseconds (the `Ta6` macro of
/// `cache_shmlog.c`); converting the same way makes our times equal to `varnishlog`'s.
pub fn vtim_to_unix_nano(t: f64) -> u64 {
    if !(t.is_finite() && t > 0.0) {
        return 0;
    }
    // For a positive number, the cast truncates, which is `floor`; the target's baseline has no
    // rounding instruction, so `f64::floor` is a library call (about 36 instructions each).
    let seconds = t as u64;
    let micros = ((t * 1e6) as u64) % 1_000_000;
    // Saturating: a time past the year 2554 must not overflow (a panic in a debug build).
    seconds.saturating_mul(1_000_000_000).saturating_add(micros * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_ATTRIBUTES: usize = 128;
    const MAX_VALUE_LEN: usize = 4096;

    fn record() -> SpanRecord {
        SpanRecord::new(SpanKind::Server, TraceId([1; 16]), SpanId([2; 8]), None)
    }

    #[test]
    fn set_replaces_the_same_key() {
        let mut r = record();
        r.set_str("http.route", "/a");
        r.set_str("http.route", "/b");
        assert_eq!(r.attributes.len(), 1);
        assert_eq!(r.get("http.route"), Some(Value::Str("/b".into())));
    }

    /// The attributes as the encoders write them, after `seal_within`, as (key, value) pairs.
    fn sealed_within(mut r: SpanRecord, max: usize, max_len: usize) -> (Vec<(String, Value)>, u32) {
        r.seal_within(max, max_len);
        let mut all = Vec::new();
        r.for_each_attribute(|key, value| all.push((key.to_owned(), value.to_value())));
        r.for_each_outcome_attribute(&mut |key: &'static str, value: ValueRef<'_>| {
            all.push((key.to_owned(), value.to_value()))
        });
        (all, r.dropped_attributes)
    }

    fn sealed(r: SpanRecord) -> (Vec<(String, Value)>, u32) {
        sealed_within(r, MAX_ATTRIBUTES, MAX_VALUE_LEN)
    }

    fn kv(key: &str, value: Value) -> (String, Value) {
        (key.to_owned(), value)
    }

    #[test]
    fn the_outcome_becomes_attributes_after_the_others() {
        let mut r = SpanRecord::new(SpanKind::Client, TraceId([1; 16]), SpanId([2; 8]), None);
        r.set_str("url.full", "http://b/");
        r.outcome = Outcome {
            vxid: Some(1002),
            status_code: Some(503),
            request_body_size: Some(0),
            response_body_size: Some(u64::MAX),
            error_type: Some("503".into()),
            repeats: Some(2),
            cache_result: None,
            object_age: Some(1.5),
            object_ttl: Some(0.0),
            backend: Some("b1".into()),
            peer_address: Some("::1".into()),
            peer_port: Some(8080),
        };
        assert_eq!(
            sealed(r),
            (
                vec![
                    kv("url.full", Value::Str("http://b/".into())),
                    kv("http.response.status_code", Value::Int(503)),
                    kv("error.type", Value::Str("503".into())),
                    kv("http.request.body.size", Value::Int(0)),
                    kv("http.response.body.size", Value::Int(i64::MAX)), // clamped, never negative
                    kv("varnish.object.age", Value::Float(1.5)),
                    kv("varnish.object.ttl", Value::Float(0.0)),
                    kv("varnish.vxid", Value::Int(1002)),
                    kv("varnish.retries", Value::Int(2)),
                    kv("varnish.backend", Value::Str("b1".into())),
                    kv("network.peer.address", Value::Str("::1".into())),
                    kv("network.peer.port", Value::Int(8080)),
                ],
                0
            )
        );
        // A request span's repeats are restarts; nothing unknown is written.
        let mut r = record();
        r.outcome.repeats = Some(1);
        assert_eq!(sealed(r), (vec![kv("varnish.restarts", Value::Int(1))], 0));
    }

    #[test]
    fn vcl_strings_for_error_type_and_cache_result_go_to_the_outcome() {
        let mut r = record();
        r.set_str("error.type", "mine");
        r.set_str("varnish.cache_result", "hit");
        assert!(r.attributes.is_empty());
        assert_eq!(r.outcome.error_type.as_deref(), Some("mine"));
        assert_eq!(r.outcome.cache_result.as_deref(), Some("hit"));
        // A status that is not an error leaves VCL's error.type alone; one that is replaces it.
        r.set_http_status(200);
        assert_eq!(r.outcome.error_type.as_deref(), Some("mine"));
        r.set_http_status(503);
        assert_eq!(r.outcome.error_type.as_deref(), Some("503"));
        assert_eq!(r.status, StatusCode::Error);
        // The log says it was a 200 after all: the status-made error goes.
        r.set_http_status(200);
        assert_eq!((r.outcome.error_type.clone(), r.status), (None, StatusCode::Unset));
    }

    #[test]
    fn an_outcome_key_vcl_set_gives_way_to_the_outcome_only_when_the_outcome_knows_it() {
        let mut r = record();
        r.set_str("http.response.status_code", "two hundred");
        r.set_int("varnish.vxid", 7);
        r.set_int("error.type", 1); // not a string: kept as VCL set it, unless the outcome knows
        r.set_int("varnish.retries", 3); // a request span's outcome writes restarts, not retries
        r.outcome.status_code = Some(200);
        r.outcome.repeats = Some(1);
        assert_eq!(
            sealed(r).0,
            [
                kv("varnish.vxid", Value::Int(7)),
                kv("error.type", Value::Int(1)),
                kv("varnish.retries", Value::Int(3)),
                kv("http.response.status_code", Value::Int(200)),
                kv("varnish.restarts", Value::Int(1)),
            ]
        );
    }

    #[test]
    fn a_hits_measured_age_and_ttl_replace_what_vcl_tagged() {
        let mut r = record();
        r.set_str("varnish.object.age", "old");
        r.set_int("varnish.object.ttl", 9);
        r.outcome.object_age = Some(2.5);
        assert_eq!(
            sealed(r).0,
            [
                // No measured TTL (not a hit, say): VCL's value stays.
                kv("varnish.object.ttl", Value::Int(9)),
                kv("varnish.object.age", Value::Float(2.5)),
            ]
        );
    }

    #[test]
    fn at_the_count_limit_the_outcome_comes_first() {
        let mut r = record();
        for i in 0..MAX_ATTRIBUTES + 1 {
            r.set(format!("k{i}"), Value::Int(i as i64));
        }
        r.set_http_status(404);
        r.outcome.vxid = Some(5);
        let (attributes, dropped) = sealed(r);
        assert_eq!(attributes.len(), MAX_ATTRIBUTES);
        assert_eq!(dropped, 3, "one refused by set, two giving way to the outcome");
        let value = |key: &str| attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        assert_eq!(value("http.response.status_code"), Some(Value::Int(404)));
        assert_eq!(value("varnish.vxid"), Some(Value::Int(5)));
        assert_eq!(value(&format!("k{}", MAX_ATTRIBUTES - 2)), None, "the last ones VCL added gave way");
        assert_eq!(value(&format!("k{}", MAX_ATTRIBUTES - 3)), Some(Value::Int(MAX_ATTRIBUTES as i64 - 3)));
    }

    #[test]
    fn below_the_outcomes_own_count_the_limit_still_holds_and_the_values_are_cut() {
        let mut r = SpanRecord::new(SpanKind::Client, TraceId([1; 16]), SpanId([2; 8]), None);
        r.set_str("url.full", "http://b/");
        r.set_http_status(503); // and error.type
        r.outcome.vxid = Some(7);
        r.outcome.backend = Some("a_long_backend_name".into());
        r.outcome.cache_result = Some("hit-for-pass".into());
        let (attributes, dropped) = sealed_within(r, 2, 4);
        assert_eq!(
            attributes,
            [kv("http.response.status_code", Value::Int(503)), kv("error.type", Value::Str("503".into()))]
        );
        assert_eq!(dropped, 4, "url.full, then cache result, VXID and backend");
        let mut r = record();
        r.outcome.backend = Some("a_long_backend_name".into());
        r.outcome.peer_address = Some("2001:db8::1".into());
        r.outcome.cache_result = Some("hit-for-pass".into());
        let (attributes, dropped) = sealed_within(r, MAX_ATTRIBUTES, 4);
        assert_eq!(dropped, 0);
        assert_eq!(
            attributes,
            [
                kv("varnish.cache_result", Value::Str("hit-".into())),
                kv("varnish.backend", Value::Str("a_lo".into())),
                kv("network.peer.address", Value::Str("2001".into())),
            ]
        );
    }

    #[test]
    fn sealing_again_changes_nothing() {
        let mut r = record();
        r.set_str("url.path", "/");
        r.set_http_status(503);
        r.outcome.vxid = Some(7);
        r.seal_within(2, MAX_VALUE_LEN);
        let once = r.clone();
        assert_eq!((r.attributes.len(), r.outcome_kept, r.dropped_attributes), (0, 2, 2));
        r.seal_within(2, MAX_VALUE_LEN);
        assert_eq!(r, once);
    }

    #[test]
    fn attribute_count_is_bounded_and_counted() {
        let mut r = record();
        for i in 0..MAX_ATTRIBUTES + 5 {
            r.set(format!("k{i}"), Value::Int(i as i64));
        }
        assert_eq!(r.attributes.len(), MAX_ATTRIBUTES);
        assert_eq!(r.dropped_attributes, 5);
    }

    #[test]
    fn added_attributes_are_encoded_and_read_back_in_order() {
        let mut r = record();
        r.add("http.request.method", ValueRef::Str("GET"));
        r.add("server.port", ValueRef::Int(8080));
        r.add("negative", ValueRef::Int(-1));
        r.add("ratio", ValueRef::Float(0.5));
        r.add("flag", ValueRef::Bool(true));
        let long = "/p".repeat(100); // a field over 127 bytes: lengths of two bytes
        r.add("url.path", ValueRef::Str(&long));
        r.add("", ValueRef::Str("an empty key"));
        r.set_str("http.route", "/r");
        assert_eq!((r.encoded.count(), r.attributes.len(), r.attribute_count()), (7, 1, 8));
        assert_eq!(r.get("server.port"), Some(Value::Int(8080)));
        assert_eq!(r.get("http.route"), Some(Value::Str("/r".into())));
        assert_eq!(r.get("absent"), None);
        assert_eq!(
            sealed(r),
            (
                vec![
                    kv("http.request.method", Value::Str("GET".into())),
                    kv("server.port", Value::Int(8080)),
                    kv("negative", Value::Int(-1)),
                    kv("ratio", Value::Float(0.5)),
                    kv("flag", Value::Bool(true)),
                    kv("url.path", Value::Str(long.as_str().into())),
                    kv("", Value::Str("an empty key".into())),
                    kv("http.route", Value::Str("/r".into())),
                ],
                0
            )
        );
    }

    #[test]
    fn an_added_string_is_cut_to_the_length_limit_on_a_char_boundary() {
        let mut r = record();
        // Two-byte characters after one byte: the limit falls inside a character.
        let long = format!("/{}", "é".repeat(MAX_VALUE_LEN));
        r.add("url.path", ValueRef::Str(&long));
        let Some(Value::Str(path)) = r.get("url.path") else { panic!("no url.path") };
        assert_eq!(path.len(), MAX_VALUE_LEN - 1);
        assert!(long.starts_with(path.as_str()));
    }

    #[test]
    fn vcl_replacing_an_added_attribute_keeps_its_place() {
        let mut r = record();
        r.add("http.request.method", ValueRef::Str("GET"));
        r.add("url.path", ValueRef::Str("/raw"));
        r.set_str("http.route", "/r");
        r.set_str("url.path", "/normalised");
        assert!(r.encoded.is_empty(), "decoded into the generic attributes");
        assert_eq!(
            sealed(r),
            (
                vec![
                    kv("http.request.method", Value::Str("GET".into())),
                    kv("url.path", Value::Str("/normalised".into())),
                    kv("http.route", Value::Str("/r".into())),
                ],
                0
            )
        );
    }

    #[test]
    fn the_count_limit_counts_added_attributes_and_can_cut_into_them() {
        let mut r = record();
        for (i, key) in ["a", "b", "c", "d"].into_iter().enumerate() {
            r.add(key, ValueRef::Int(i as i64));
        }
        r.set_str("vcl", "x");
        r.set_http_status(200);
        let status = kv("http.response.status_code", Value::Int(200));
        let (a, b, c, d) =
            (kv("a", Value::Int(0)), kv("b", Value::Int(1)), kv("c", Value::Int(2)), kv("d", Value::Int(3)));
        let vcl = kv("vcl", Value::Str("x".into()));
        let all = vec![a.clone(), b.clone(), c.clone(), d.clone(), vcl.clone(), status.clone()];
        assert_eq!(sealed_within(r.clone(), 6, MAX_VALUE_LEN), (all, 0));
        assert_eq!(
            sealed_within(r.clone(), 5, MAX_VALUE_LEN),
            (vec![a.clone(), b.clone(), c.clone(), d.clone(), status.clone()], 1),
            "VCL's goes first"
        );
        assert_eq!(sealed_within(r, 3, MAX_VALUE_LEN), (vec![a, b, status], 3), "then the last added");
        // `add` itself refuses, and counts, what is over the limit.
        let mut full = record();
        for i in 0..MAX_ATTRIBUTES {
            full.set(format!("k{i}"), Value::Int(0));
        }
        full.add("url.path", ValueRef::Str("/"));
        assert_eq!((full.attribute_count(), full.dropped_attributes, full.get("url.path")), (MAX_ATTRIBUTES, 1, None));
    }

    #[test]
    fn each_string_of_an_array_is_cut_to_the_length_limit() {
        let mut r = SpanRecord::new(SpanKind::Server, TraceId([1; 16]), SpanId([2; 8]), None);
        r.set("http.request.header.x", Value::StrArray(vec!["é".repeat(MAX_VALUE_LEN), "short".into()]));
        let Some(Value::StrArray(v)) = r.get("http.request.header.x") else { panic!("not an array") };
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].len(), MAX_VALUE_LEN);
        assert_eq!(v[1], "short");
    }

    #[test]
    fn text_from_bytes_takes_ascii_and_utf8_and_replaces_the_rest() {
        assert_eq!(utf8(b"GET"), Some("GET"));
        assert_eq!(utf8(b""), Some(""));
        assert_eq!(utf8("/caf\u{e9}?q=\u{1f980}".as_bytes()), Some("/caf\u{e9}?q=\u{1f980}"));
        assert_eq!(utf8(b"/a\xff"), None);
        assert_eq!(utf8(b"\xc3"), None, "a sequence cut short");
        assert!(matches!(utf8_lossy(b"/plain"), Cow::Borrowed("/plain")));
        assert_eq!(utf8_lossy(b"/a\xffb"), "/a\u{fffd}b");
        assert_eq!(text_lossy(b"10.0.0.1"), "10.0.0.1");
        assert_eq!(text_lossy(b"\xfe1"), "\u{fffd}1");
    }

    #[test]
    fn long_values_are_cut_on_a_char_boundary() {
        let s = "é".repeat(MAX_VALUE_LEN); // 2 bytes each
        let t = truncate(s, 5);
        assert_eq!(t, "éé");
    }

    #[test]
    #[allow(clippy::excessive_precision)]
    fn vtim_conversion_matches_what_vsl_prints() {
        // t * 1e6 rounds to ...457.0 in f64, and Varnish prints .123457 too
        assert_eq!(vtim_to_unix_nano(1_700_000_000.123_456_9), 1_700_000_000_123_457_000);
        assert_eq!(vtim_to_unix_nano(1_700_000_000.5), 1_700_000_000_500_000_000);
        assert_eq!(vtim_to_unix_nano(f64::NAN), 0);
        assert_eq!(vtim_to_unix_nano(-1.0), 0);
        assert_eq!(vtim_to_unix_nano(f64::INFINITY), 0);
        assert_eq!(vtim_to_unix_nano(1e300), u64::MAX);
        // The casts give what `floor` gives (the way `Ta6` prints), over the whole range of
        // times Varnish could hold, including values just below and at whole seconds.
        let floor_way = |t: f64| t.floor() as u64 * 1_000_000_000 + ((t * 1e6).floor() as u64 % 1_000_000) * 1000;
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..100_000 {
            let t = rng.f64() * 1e10 + f64::from(rng.u8(..)) * 1e-6;
            // The neighbours of t (`f64::next_down`/`next_up` need a newer Rust than we require).
            let (below, above) = (f64::from_bits(t.to_bits() - 1), f64::from_bits(t.to_bits() + 1));
            for t in [t, t.floor(), below, above, 1e-7 * rng.f64()] {
                assert_eq!(vtim_to_unix_nano(t), floor_way(t), "{t}");
            }
        }
    }

    #[test]
    fn limits_come_from_the_settings_span_specific_first() {
        use crate::config::Settings;
        let l = AttributeLimits::from_settings(&Settings::only(&[]).unwrap()).unwrap();
        assert_eq!(l, AttributeLimits::default());
        let l = AttributeLimits::from_settings(
            &Settings::only(&[
                ("OTEL_ATTRIBUTE_COUNT_LIMIT", "10"),
                ("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "20"),
                ("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "30"),
                ("OTEL_SPAN_EVENT_COUNT_LIMIT", "5"),
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!((l.count, l.value_len, l.events, l.links), (20, 30, 5, 128));
        let e = AttributeLimits::from_settings(&Settings::only(&[("OTEL_SPAN_LINK_COUNT_LIMIT", "-1")]).unwrap());
        assert!(e.unwrap_err().contains("OTEL_SPAN_LINK_COUNT_LIMIT"));
    }
}
