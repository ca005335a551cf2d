//! Correlating the shared-memory log with our spans: a state machine, pure Rust, fed with log
//! records and with two kinds of messages from the Varnish workers, and unit-tested with
//! synthetic records.
//!
//! - `track(vxid)`: a sampled span started in the transaction `vxid` (its first VXID).
//! - `finished(record, final_vxid)`: the task ended; `record` holds what the task knew (the
//!   backstop data: VCL-time attributes, Varnish's own start and end times, sizes).
//! - log records of tracked transactions, and of the VXIDs that follow them (restarts, retries).
//!
//! A span is complete when its record has arrived and the `End` of its final VXID has been read.
//! Then the log's data is merged in (timestamps, the status actually sent, sizes, errors, the
//! timing breakdown as events, the backend connection, a link to the fetch behind a hit) and the
//! span is returned for export. The two can come in either order: a transaction's records reach
//! the log when it ends, just after its task's end, and the tailer may read them before or after
//! the worker's message. A finished span whose log never comes (overrun, starvation) is closed
//! from the backstop data once `Limits::log_wait` has passed, and marked as such.
//!
//! `OneTransaction` is the same reading without the following: for a task's own log buffer
//! (`task_log`), which holds one transaction's records at the task's end, so that nothing needs
//! to be matched, chained or waited for.
//!
//! Cost: all of this runs once or more per traced request, on one thread that must keep up with
//! the log. So records are parsed as bytes (no UTF-8 validation, no allocation but for the rare
//! texts we keep), and the spans followed live in the slots of a slab, reused with their
//! buffers: a span costs a few hash operations, and one allocation, for its events, which go to
//! the exporter with it.
//!
//! Threading: a `Correlator` is owned by the tailer thread; no locks. `OneTransaction`, which
//! reads a task's own buffer the same way (`LogData::apply`), by each worker thread.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::VecDeque;
use std::mem;
use std::str::FromStr;

use rustc_hash::FxHashMap as HashMap;
use std::time::{Duration, Instant};

use super::fetch_links::{self, FetchLinks};
use super::record::{wanted, Tag, TagTable};
use crate::span::{text_lossy, ClosedBy, Event, SpanRecord, StatusCode, Text, Value};

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Spans being followed at most; more are not tracked (they close from backstop data).
    pub max_pending: usize,
    /// How long a finished span waits for its log before it is closed from backstop data.
    pub log_wait: Duration,
    /// How long a tracked span may go without finishing before its log data is dropped
    /// (the span itself still closes from its task: a long download only loses the log data).
    pub max_age: Duration,
    /// Where a hit's span finds the span of the fetch that stored its object.
    pub links: FetchLinks,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pending: 16_384,
            log_wait: Duration::from_secs(3),
            max_age: Duration::from_secs(600),
            links: fetch_links::GLOBAL,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Log records examined inside tracked transactions.
    pub records: u64,
    /// Transactions (batches) that belonged to a tracked span.
    pub transactions_matched: u64,
    pub closed_from_log: u64,
    pub closed_by_backstop: u64,
    /// Spans not tracked because `max_pending` was reached.
    pub not_tracked: u64,
    /// Tracked spans dropped without finishing: after `max_age`, or once their log had ended and
    /// neither `finished` nor `untrack` came (a message lost to a full queue).
    pub abandoned: u64,
}

/// Room for the events of most spans in one allocation: a backend fetch has five (Fetch,
/// Connected, Bereq, Beresp, BerespBody), a client request three to five, a restart adds two.
const EVENTS_RESERVED: usize = 8;

/// What the log told us about one span (all VXIDs of its chain).
#[derive(Default, Debug)]
struct LogData {
    start_ns: Option<u64>,
    end_ns: Option<u64>,
    /// Already in the record's form: moved into it as they are when the span completes.
    events: Vec<Event>,
    last_ts_ns: Option<u64>,
    status: Option<u16>,
    acct: Option<[u64; 6]>,
    fetch_error: Option<String>,
    vcl_error: Option<String>,
    hit_obj: Option<u64>,
    /// The last lookup (since the last restart) was a hit: `Hit` came after the last restart.
    last_lookup_hit: bool,
    /// Backend name, address, port (if a number).
    peer: Option<(Text, Text, Option<u16>)>,
}

/// What a record asks of the chain of transactions its span follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// A restart or a retry: the span goes on as this VXID.
    Chained(u64),
    /// The transaction's `End`.
    Ended,
}

impl LogData {
    /// Forced inline: left to the compiler, it was sometimes kept out of line after changes
    /// elsewhere in the crate (about +50 instructions per event, callgrind).
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn push_event(&mut self, time_unix_nano: u64, name: Cow<'static, str>) {
        if self.events.capacity() == 0 {
            self.events.reserve_exact(EVENTS_RESERVED);
        }
        self.events.push(Event { time_unix_nano, name });
    }

    /// Empties it for the next span. The events array is kept, emptied, if it has the usual
    /// room (256 bytes): the slab keeps its slots, up to `max_pending` of them after a burst.
    fn reset(&mut self) {
        let mut events = mem::take(&mut self.events);
        *self = LogData::default();
        if events.capacity() <= EVENTS_RESERVED {
            events.clear();
            self.events = events;
        }
    }

    /// Reads one record of the span's log into what it told. Returns what the record asks of
    /// the span's chain of transactions, if anything (the caller keeps the chain). Inline in
    /// both callers: once per record of every traced transaction.
    #[cfg_attr(not(debug_assertions), inline(always))]
    fn apply(&mut self, tag: Tag, data: &[u8], last_seconds: &mut LastSeconds) -> Option<Step> {
        let mut fields = fields(data);
        match tag {
            Tag::Timestamp => {
                let (name, kind, t) = match known_timestamp(data, last_seconds) {
                    Some((name, kind, t)) => (Cow::Borrowed(name), kind, t),
                    None => {
                        let (label, t) = timestamp(data)?;
                        let (name, kind) = label_meaning(label);
                        (name, kind, t)
                    }
                };
                if kind == LabelKind::Start && self.start_ns.is_none() {
                    self.start_ns = Some(t);
                } else {
                    self.push_event(t, name);
                }
                if kind == LabelKind::End {
                    self.end_ns = Some(t);
                }
                self.last_ts_ns = Some(t);
            }
            Tag::Link => {
                // "req 1009 restart" / "bereq 1035 retry": the same span goes on under a new VXID.
                // Every fetch and ESI sub-request links too ("bereq 1010 fetch", "req 1011 esi"):
                // a span of its own, told apart by the last letters without splitting the record.
                let last = data.trim_ascii_end();
                if !(last.ends_with(b"restart") || last.ends_with(b"retry")) {
                    return None;
                }
                let (kind, child, reason) = (fields.next()?, parse_int::<u64>(fields.next()?)?, fields.next()?);
                let event = match (kind, reason) {
                    (b"req", b"restart") => "varnish.restart",
                    (b"bereq", b"retry") => "varnish.retry",
                    _ => return None, // a fetch or an ESI sub-request: a span of its own
                };
                let at = self.last_ts_ns.unwrap_or_default();
                self.push_event(at, Cow::Borrowed(event));
                if event == "varnish.retry" {
                    // The retry supersedes the failed attempt; its error stays visible as the event.
                    self.fetch_error = None;
                } else {
                    // The restarted request looks up again.
                    self.last_lookup_hit = false;
                }
                return Some(Step::Chained(child));
            }
            Tag::RespStatus | Tag::BerespStatus => self.status = Some(parse_int(fields.next()?)?),
            Tag::ReqAcct | Tag::BereqAcct => {
                let n = match six_numbers(data) {
                    Some(n) => n,
                    None => {
                        let mut n = [0u64; 6];
                        for v in &mut n {
                            *v = parse_int(fields.next()?)?;
                        }
                        n
                    }
                };
                self.acct = Some(n);
            }
            Tag::Hit => {
                self.hit_obj = Some(parse_int(fields.next()?)?);
                self.last_lookup_hit = true;
            }
            Tag::FetchError => self.fetch_error = Some(text(data)),
            Tag::VclError => self.vcl_error = Some(text(data)),
            Tag::BackendOpen => {
                // "<fd> <backend> <remote addr> <remote port> <local addr> <local port> ..."
                let _fd = fields.next()?;
                let name = text_lossy(fields.next()?);
                let addr = text_lossy(fields.next()?);
                let port = parse_int::<u16>(fields.next()?);
                self.peer = Some((name, addr, port));
            }
            Tag::End => return Some(Step::Ended),
            Tag::Begin | Tag::Other => {}
        }
        None
    }

    /// Merges what the log told into the finished record, taking what it moves (the caller
    /// `reset`s it next: a freed slot, or `OneTransaction` between two spans).
    fn merge_into(&mut self, record: &mut SpanRecord, links: FetchLinks) {
        if let Some(t) = self.start_ns {
            record.start_unix_nano = t;
        }
        if let Some(t) = self.end_ns.or(self.last_ts_ns) {
            record.end_unix_nano = t.max(record.start_unix_nano);
        }
        // A fetch that failed (vcl_backend_error ran) got no response: the BerespStatus logged
        // then is the synthetic one VCL made, not something the backend sent.
        let fetch_failed =
            record.status == StatusCode::Error && record.outcome.error_type.as_deref() == Some("fetch_failed");
        if let Some(status) = self.status.filter(|_| !fetch_failed) {
            record.set_http_status(status);
        }
        if let Some(a) = self.acct {
            // ReqAcct: req hdr, req body, req total, resp hdr, resp body, resp total;
            // BereqAcct: the same for the backend request and response.
            record.outcome.request_body_size = Some(a[1]);
            record.outcome.response_body_size = Some(a[4]);
        }
        if let Some(err) = self.fetch_error.take() {
            record.status = StatusCode::Error;
            record.outcome.error_type.get_or_insert(Text::const_new("fetch_error"));
            record.status_message = Some(err);
        }
        if let Some(err) = self.vcl_error.take() {
            // VCL_Error is also logged for problems VCL survives; it names the cause only of a
            // request that failed.
            if record.status == StatusCode::Error {
                record.outcome.error_type = Some(Text::const_new("vcl_error"));
                record.status_message = Some(err);
            }
        }
        if let Some((name, addr, port)) = self.peer.take() {
            record.outcome.backend = Some(name);
            record.outcome.peer_address = Some(addr);
            record.outcome.peer_port = port.or(record.outcome.peer_port);
        }
        if let Some(obj) = self.hit_obj {
            if let Some((trace_id, span_id)) = links.find(obj) {
                record.add_link(trace_id, span_id);
            }
            // A `return (synth())` from vcl_hit: the include records a fresh hit only in
            // vcl_deliver, so the task saw `synth`; the lookup found the object, and a hit it is
            // (only the last lookup's: a hit restarted into a synth is a synth).
            if self.last_lookup_hit && record.outcome.cache_result.as_deref() == Some("synth") {
                record.outcome.cache_result = Some(Text::const_new("hit"));
            }
        }
        if self.start_ns.is_some() {
            // The log's timing breakdown (restarts and retries included) replaces what the task
            // recorded of those; events VCL added (`add_event`) are kept, in time order.
            // The two arrays trade places: the slot keeps the record's, emptied, for its next
            // span, so that neither side allocates (the record's comes from `span_pool`).
            mem::swap(&mut record.events, &mut self.events);
            let before = record.events.len();
            // The task's own restart and retry events give way to the log's (from its `Link`
            // records, with the log's times), unless the log has none: the transaction before
            // the restart was not read (a task's own buffer, `task_log`; an overrun).
            let log_has = |name: &str| record.events.iter().any(|e| e.name == name);
            let (log_restarts, log_retries) = (log_has("varnish.restart"), log_has("varnish.retry"));
            let from_vcl = self.events.drain(..).filter(|e| match &*e.name {
                "varnish.restart" => !log_restarts,
                "varnish.retry" => !log_retries,
                _ => true,
            });
            record.events.extend(from_vcl);
            if record.events.len() > before {
                record.events.sort_by_key(|e| e.time_unix_nano);
            }
            record.events.truncate(crate::span::max_events());
        }
    }
}

/// One VXID of a span's chain, and whether its `End` has been read.
#[derive(Clone, Copy, Debug)]
struct ChainVxid {
    vxid: u64,
    ended: bool,
}

/// A span being followed: one slot of the `Slab`.
struct Pending {
    /// The span's first VXID (`SpanRecord::vxid`), which its `finished` message names.
    key: u64,
    /// Every VXID of the span, the key first, then those of its restarts or retries. Empty when
    /// the slot is free; kept, emptied, for the next span (no allocation then).
    chain: Vec<ChainVxid>,
    log: LogData,
    finished: Option<(Box<SpanRecord>, u64, Instant)>,
    since: Instant,
    /// Seen by the last age scan with every transaction of its chain ended and no `finished`
    /// (see `expire`).
    ended_unfinished: bool,
}

impl Pending {
    fn is_free(&self) -> bool {
        self.chain.is_empty()
    }

    /// Every transaction of the chain has ended (its `End` read) and none goes on (a restart's
    /// or a retry's `Link` adds the next one before its `End`): the task has ended too.
    fn all_ended(&self) -> bool {
        !self.chain.is_empty() && self.chain.iter().all(|c| c.ended)
    }

    /// Adds `vxid` to the chain; false if it was in it already.
    fn add_vxid(&mut self, vxid: u64) -> bool {
        if self.chain.iter().any(|c| c.vxid == vxid) {
            return false;
        }
        self.chain.push(ChainVxid { vxid, ended: false });
        true
    }

    fn mark_ended(&mut self, vxid: u64) {
        if let Some(c) = self.chain.iter_mut().find(|c| c.vxid == vxid) {
            c.ended = true;
        }
    }

    fn has_ended(&self, vxid: u64) -> bool {
        self.chain.iter().any(|c| c.vxid == vxid && c.ended)
    }
}

/// The spans being followed, in slots that are reused once their span is done. A slot number
/// stays valid until `free`; the index maps VXIDs to slots.
#[derive(Default)]
struct Slab {
    slots: Vec<Pending>,
    free: Vec<usize>,
}

impl Slab {
    fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn insert(&mut self, key: u64, now: Instant) -> usize {
        let Some(slot) = self.free.pop() else {
            let chain = vec![ChainVxid { vxid: key, ended: false }];
            let log = LogData::default();
            self.slots.push(Pending { key, chain, log, finished: None, since: now, ended_unfinished: false });
            return self.slots.len() - 1;
        };
        let p = &mut self.slots[slot];
        p.key = key;
        p.chain.push(ChainVxid { vxid: key, ended: false });
        p.since = now;
        p.ended_unfinished = false;
        slot
    }

    /// Frees `slot` (its data must have been taken out, or is dropped here).
    fn free(&mut self, slot: usize) {
        let p = &mut self.slots[slot];
        p.chain.clear();
        p.log.reset();
        p.finished = None;
        self.free.push(slot);
    }
}

pub struct Correlator {
    tags: TagTable,
    limits: Limits,
    /// Every VXID of a tracked chain, to the slot of its span.
    index: HashMap<u64, usize>,
    slab: Slab,
    /// Finished spans by log deadline. Deadlines are `finished` time plus a constant, so the
    /// queue is in order and `expire` only looks at its front (completed spans leave stale
    /// entries behind, dropped from the front as spans complete, or skipped when they come up;
    /// the queue holds at most `log_wait` worth).
    deadlines: VecDeque<(Instant, u64)>,
    /// When tracked spans without a finish were last looked for (a full scan, once a second).
    last_age_scan: Option<Instant>,
    /// The seconds of the last timestamp read (`ten_dot_six`).
    last_seconds: LastSeconds,
    pub stats: Stats,
}

/// Reads the records of one transaction straight into its span: what `task_log` needs for a
/// task's own log buffer, which holds the records of one transaction (its final one) and of no
/// other span. None of the `Correlator`'s following (no index, no chain, no deadline, no
/// synthetic `End`, no clock read): about 1,250 instructions less per span than feeding it
/// through one (callgrind, 100% hits: 83,498 -> 82,237 per request; docs/performance-history.md).
/// The per-record reading is the same (`LogData::apply`).
///
/// Threading: one per worker thread (`task_log` keeps it thread-local); keeps nothing of a span
/// between two calls but the emptied events array.
pub struct OneTransaction {
    tags: TagTable,
    log: LogData,
    last_seconds: LastSeconds,
    links: FetchLinks,
}

impl OneTransaction {
    pub fn new(tags: TagTable, links: FetchLinks) -> OneTransaction {
        OneTransaction { tags, log: LogData::default(), last_seconds: LastSeconds::default(), links }
    }

    /// Merges what the records of transaction `vxid` in `log` tell into `record`, as the
    /// correlator does when a span completes; records of other VXIDs are ignored. A restart's
    /// or a retry's `Link` is logged by the transaction before it, never by the final one: so
    /// nothing here can extend the chain.
    pub fn complete(&mut self, log: &[u8], vxid: u64, record: &mut SpanRecord) {
        for (tag, v, data) in wanted(log, &self.tags) {
            if v == vxid {
                let _ = self.log.apply(tag, data, &mut self.last_seconds);
            }
        }
        self.log.merge_into(record, self.links);
        record.closed_by = ClosedBy::Log;
        self.log.reset();
    }
}

/// The fields of a record's payload: what `str::split_ascii_whitespace` gives, over bytes.
fn fields(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.split(u8::is_ascii_whitespace).filter(|f| !f.is_empty())
}

/// Digits to a number; `None` on anything else, and on more than 19 digits (which might not fit:
/// `parse_int` leaves those to `str::parse`). 19 digits always fit, so the loop needs no
/// overflow checks: it runs for every number of every traced record.
fn parse_digits(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut n = 0u64;
    for &b in digits {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n = n * 10 + u64::from(d);
    }
    Some(n)
}

/// A decimal number, as `str::parse` reads it. Plain digits, all the log holds, are read here
/// without UTF-8 validation; anything else (a sign, 20 digits or more, junk) is left to
/// `str::parse`, which decides.
fn parse_int<T: FromStr + TryFrom<u64>>(field: &[u8]) -> Option<T> {
    match parse_digits(field) {
        Some(n) => T::try_from(n).ok(),
        None => std::str::from_utf8(field).ok()?.parse().ok(),
    }
}

/// What a timestamp label means for the span's bounds: `Start` opens it; client `Resp`
/// (`PipeSess` for pipe), backend `BerespBody` or `Error` end it; the others are phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LabelKind {
    Start,
    End,
    Phase,
}

/// `1700000000.000100` to nanoseconds, exactly as printed (no floating point).
fn parse_abs<S: AsRef<[u8]> + ?Sized>(s: &S) -> Option<u64> {
    let s = s.as_ref();
    let dot = s.iter().position(|&b| b == b'.')?;
    let (secs, frac) = (parse_int::<u64>(&s[..dot])?, &s[dot + 1..]);
    if frac.len() > 9 {
        return None;
    }
    let mut nanos = parse_digits(frac)?;
    for _ in frac.len()..9 {
        nanos *= 10;
    }
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// A `Timestamp` record's label and absolute time, in nanoseconds.
fn timestamp(data: &[u8]) -> Option<(&[u8], u64)> {
    // The general way: the first field ends with ':', the second is the time. What Varnish
    // writes is read in one pass instead (a fifth of a client span's correlation, otherwise),
    // with the same result.
    timestamp_as_written(data).or_else(|| {
        let mut fields = fields(data);
        let label = fields.next()?.strip_suffix(b":")?;
        Some((label, parse_abs(fields.next()?)?))
    })
}

/// `timestamp` of a record as Varnish writes it: `Label: 1700000000.000100 ...`, a label without
/// spaces, one space, 1 to 19 digits, a dot, 1 to 9 digits, then a space or the end. `None` for
/// anything else.
fn timestamp_as_written(data: &[u8]) -> Option<(&[u8], u64)> {
    let end = data.iter().position(|&b| b == b':' || b.is_ascii_whitespace())?;
    let (label, rest) = data.split_at(end);
    let rest = rest.strip_prefix(b": ")?;
    if let Some(t) = ten_dot_six(rest, &mut LastSeconds::default()) {
        return (!label.is_empty()).then_some((label, t));
    }
    let (secs, secs_digits, rest) = leading_digits(rest);
    let (frac, frac_digits, rest) = leading_digits(rest.strip_prefix(b".")?);
    let ends = rest.first().is_none_or(u8::is_ascii_whitespace);
    if label.is_empty() || !(1..=19).contains(&secs_digits) || !(1..=9).contains(&frac_digits) || !ends {
        return None;
    }
    let nanos = frac * 10u64.pow(9 - frac_digits as u32);
    Some((label, secs.checked_mul(1_000_000_000)?.checked_add(nanos)?))
}

/// The value of the digits `s` starts with (wrapped past 19 of them), how many there are, and the
/// rest of `s`.
fn leading_digits(s: &[u8]) -> (u64, usize, &[u8]) {
    let (mut value, mut count) = (0u64, 0);
    for &b in s {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            break;
        }
        value = value.wrapping_mul(10).wrapping_add(u64::from(d));
        count += 1;
    }
    (value, count, &s[count..])
}

/// `timestamp` and `label_meaning` in one, for what nearly every record is: a label Varnish
/// documents, then `": "` and a time in `ten_dot_six`'s shape. The first byte picks the few
/// labels to compare, so the label is never scanned for its end. `None` for anything else,
/// which the general path then reads (with the same result for what both accept).
fn known_timestamp(data: &[u8], last: &mut LastSeconds) -> Option<(&'static str, LabelKind, u64)> {
    use LabelKind::{End, Phase, Start};
    // Literal prefixes, so that each comparison compiles to a load or two, not a `memcmp` call.
    macro_rules! first_of {
        ($($label:literal => $kind:expr),+) => {{
            $(
                if let Some(time) = data.strip_prefix(concat!($label, ": ").as_bytes()) {
                    return Some(($label, $kind, ten_dot_six(time, last)?));
                }
            )+
            None
        }};
    }
    match data.first()? {
        b'R' => {
            first_of!("Req" => Phase, "Resp" => End, "ReqBody" => Phase, "Restart" => Phase, "Reset" => Phase, "Retry" => Phase)
        }
        b'P' => first_of!("Process" => Phase, "Pipe" => Phase, "PipeSess" => End),
        b'B' => first_of!("Bereq" => Phase, "Beresp" => Phase, "BerespBody" => End),
        b'S' => first_of!("Start" => Start),
        b'F' => first_of!("Fetch" => Phase),
        b'C' => first_of!("Connected" => Phase),
        b'W' => first_of!("Waitinglist" => Phase),
        b'E' => first_of!("Error" => End),
        _ => None,
    }
}

/// The timestamp labels Varnish documents, and what each means for the span. (`known_timestamp`
/// spells the same list as literal prefixes, for speed; a test holds the two together.)
const LABELS: [(&str, LabelKind); 17] = {
    use LabelKind::{End, Phase, Start};
    [
        ("Req", Phase),
        ("Process", Phase),
        ("Resp", End),
        ("Fetch", Phase),
        ("Bereq", Phase),
        ("Beresp", Phase),
        ("BerespBody", End),
        ("Start", Start),
        ("ReqBody", Phase),
        ("Waitinglist", Phase),
        ("Restart", Phase),
        ("Reset", Phase),
        ("Pipe", Phase),
        ("PipeSess", End),
        ("Connected", Phase),
        ("Retry", Phase),
        ("Error", End),
    ]
};

/// A label's event name (without an allocation when documented; anything else as it came) and
/// meaning. The general path only: `known_timestamp` reads nearly every record.
fn label_meaning(label: &[u8]) -> (Cow<'static, str>, LabelKind) {
    match LABELS.iter().find(|(name, _)| name.as_bytes() == label) {
        Some(&(name, kind)) => (Cow::Borrowed(name), kind),
        None => (Cow::Owned(String::from_utf8_lossy(label).into_owned()), LabelKind::Phase),
    }
}

/// The value of eight ASCII digits, or `None` if one of them is not a digit: a few arithmetic
/// operations on one 64-bit word instead of a loop over the bytes (the timestamps of a traced
/// transaction hold about a hundred digits).
fn eight_digits(bytes: [u8; 8]) -> Option<u64> {
    let v = u64::from_le_bytes(bytes);
    // Each byte 0x30..=0x39: high nibble 3, and adding 6 does not carry into it.
    const HIGH: u64 = 0xf0f0_f0f0_f0f0_f0f0;
    const ZEROS: u64 = 0x3030_3030_3030_3030;
    if v & HIGH != ZEROS || v.wrapping_add(0x0606_0606_0606_0606) & HIGH != ZEROS {
        return None;
    }
    let d = v - ZEROS; // byte i holds digit i (the first digit in the lowest byte)
    let pairs = d.wrapping_mul(10).wrapping_add(d >> 8); // bytes 0, 2, 4, 6: two-digit values
    let quads = ((pairs & 0x0000_00ff_0000_00ff).wrapping_mul(100 + (1_000_000 << 32)))
        .wrapping_add(((pairs >> 16) & 0x0000_00ff_0000_00ff).wrapping_mul(1 + (10_000 << 32)));
    Some(quads >> 32)
}

/// The seconds of the last timestamp `ten_dot_six` read, as text and in nanoseconds. The
/// timestamps of a transaction, and of the transactions read in the same tick, nearly always
/// fall in the same second: comparing ten digits with the last ones is two loads, where reading
/// them is about 30 instructions (of about 90 per timestamp). Owned by the tailer thread.
#[derive(Clone, Copy, Debug)]
struct LastSeconds {
    /// Always ten digits and their value (compared before the input is checked, so it must
    /// never hold what would not pass the check: zero bytes would match ten NULs).
    digits: [u8; 10],
    nanos: u64,
}

impl Default for LastSeconds {
    fn default() -> Self {
        LastSeconds { digits: *b"0000000000", nanos: 0 }
    }
}

/// `secs.micros` as Varnish prints every timestamp until the year 2286 (`%ju.%06ju`, ten digits
/// of seconds), in nanoseconds; `None` for any other shape, which the general path then reads.
/// `last` holds the seconds read before (only digits that were read whole get there).
fn ten_dot_six(s: &[u8], last: &mut LastSeconds) -> Option<u64> {
    let digits: &[u8; 17] = s.first_chunk()?;
    if digits[10] != b'.' || s.get(17).is_some_and(|b| !b.is_ascii_whitespace()) {
        return None;
    }
    let secs: &[u8; 10] = digits.first_chunk()?;
    if *secs != last.digits {
        let high = eight_digits(digits[..8].try_into().ok()?)?;
        let (d8, d9) = (digits[8].wrapping_sub(b'0'), digits[9].wrapping_sub(b'0'));
        if d8 > 9 || d9 > 9 {
            return None;
        }
        let secs_value = high * 100 + u64::from(d8) * 10 + u64::from(d9);
        *last = LastSeconds { digits: *secs, nanos: secs_value * 1_000_000_000 };
    }
    let mut micros = [b'0'; 8];
    micros[2..].copy_from_slice(&digits[11..17]);
    Some(last.nanos + eight_digits(micros)? * 1_000)
}

/// The six numbers of a `ReqAcct`/`BereqAcct` record as Varnish writes them (single spaces, plain
/// digits), in one pass; `None` for anything else, which the general path then reads.
fn six_numbers(data: &[u8]) -> Option<[u64; 6]> {
    // One pass over the bytes; a number of more than 19 digits (which might not fit) wraps,
    // and is refused when it ends. The number being read stays in a register (`n[i]` with a
    // moving `i` was a load and a store per digit).
    let (mut n, mut i, mut value, mut digits) = ([0u64; 6], 0, 0u64, 0u32);
    for &b in data {
        let d = b.wrapping_sub(b'0');
        if d <= 9 {
            value = value.wrapping_mul(10).wrapping_add(u64::from(d));
            digits += 1;
        } else if b == b' ' && (1..=19).contains(&digits) && i < 5 {
            n[i] = value;
            i += 1;
            (value, digits) = (0, 0);
        } else {
            return None;
        }
    }
    if i != 5 || !(1..=19).contains(&digits) {
        return None;
    }
    n[5] = value;
    Some(n)
}

/// A record's whole text, as error messages are kept (rare: allocating is fine).
fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).trim().to_owned()
}

impl Correlator {
    pub fn new(tags: TagTable, limits: Limits) -> Self {
        Correlator {
            tags,
            limits,
            index: HashMap::default(),
            slab: Slab::default(),
            deadlines: VecDeque::new(),
            last_age_scan: None,
            last_seconds: LastSeconds::default(),
            stats: Stats::default(),
        }
    }

    pub fn pending(&self) -> usize {
        self.slab.len()
    }

    /// Deadlines queued by `finished` and not yet looked at by `expire` (for tests).
    #[cfg(test)]
    pub fn deadlines_queued(&self) -> usize {
        self.deadlines.len()
    }

    /// Whether records of `vxid` are wanted (checked once per batch, before looking inside).
    pub fn wants(&self, vxid: u64) -> bool {
        self.index.contains_key(&vxid)
    }

    pub fn track(&mut self, vxid: u64, now: Instant) {
        let Entry::Vacant(entry) = self.index.entry(vxid) else { return };
        if self.slab.len() >= self.limits.max_pending {
            self.stats.not_tracked += 1;
            return;
        }
        entry.insert(self.slab.insert(vxid, now));
    }

    /// VCL stopped tracing a span before it finished (`opentracing.sample(false)`): stop
    /// following it, so that it does not hold a place until `max_age`.
    pub fn untrack(&mut self, vxid: u64) {
        if let Some(slot) = self.slot_of_key(vxid) {
            if self.slab.slots[slot].finished.is_none() {
                self.forget(slot);
            }
        }
    }

    /// The slot of the span whose first VXID is `key`.
    fn slot_of_key(&self, key: u64) -> Option<usize> {
        // The index has every VXID of a chain; only a span's own first VXID names it.
        let slot = *self.index.get(&key)?;
        (self.slab.slots[slot].key == key).then_some(slot)
    }

    /// The task of a span ended. Returns the span if it is complete (its log already read), or
    /// at once, closed from the backstop data, if it was never tracked.
    pub fn finished(&mut self, record: Box<SpanRecord>, final_vxid: u64, now: Instant) -> Option<Box<SpanRecord>> {
        let key = record.vxid;
        let Some(slot) = self.slot_of_key(key) else {
            self.stats.closed_by_backstop += 1;
            return Some(backstop(record));
        };
        let p = &mut self.slab.slots[slot];
        if p.add_vxid(final_vxid) {
            self.index.insert(final_vxid, slot);
        }
        let deadline = now + self.limits.log_wait;
        let ended = p.has_ended(final_vxid);
        p.finished = Some((record, final_vxid, deadline));
        if ended {
            return self.complete(slot);
        }
        self.deadlines.push_back((deadline, key));
        None
    }

    /// Feeds the records of one copied batch (or a single record), in the log's layout. Returns
    /// the spans completed.
    ///
    /// Cost matters here (every record of every traced transaction): records of tags we do not
    /// use are skipped on their header word, and the span a VXID belongs to is looked up once
    /// per run of records of the same VXID (a batch is one transaction).
    pub fn records(&mut self, batch: &[u8], out: &mut Vec<Box<SpanRecord>>) {
        let mut matched = false;
        let mut current: Option<(u64, Option<usize>)> = None;
        // A copy (256 bytes), so that the walk does not hold a borrow of `self`.
        let tags = self.tags.clone();
        for (tag, vxid, data) in wanted(batch, &tags) {
            let slot = match current {
                Some((v, slot)) if v == vxid => slot,
                _ => {
                    let slot = self.index.get(&vxid).copied();
                    current = Some((vxid, slot));
                    slot
                }
            };
            let Some(slot) = slot else { continue };
            matched = true;
            self.stats.records += 1;
            if let Some(done) = self.apply(slot, tag, vxid, data) {
                out.push(done);
                current = None; // the slot is free again
            }
            if tag == Tag::Link {
                current = None; // the chain may have grown
            }
        }
        if matched {
            self.stats.transactions_matched += 1;
        }
    }

    fn apply(&mut self, slot: usize, tag: Tag, vxid: u64, data: &[u8]) -> Option<Box<SpanRecord>> {
        let p = &mut self.slab.slots[slot];
        match p.log.apply(tag, data, &mut self.last_seconds)? {
            Step::Chained(child) => {
                p.add_vxid(child);
                self.index.insert(child, slot);
                None
            }
            Step::Ended => {
                p.mark_ended(vxid);
                if p.finished.as_ref().is_some_and(|(_, final_vxid, _)| *final_vxid == vxid) {
                    return self.complete(slot);
                }
                None
            }
        }
    }

    /// Merges the log's data into the finished record and forgets the span.
    fn complete(&mut self, slot: usize) -> Option<Box<SpanRecord>> {
        let p = &mut self.slab.slots[slot];
        let Some((mut record, _, _)) = p.finished.take() else {
            self.forget(slot);
            return None;
        };
        // In place: the log data is large for a move (a few hundred bytes), and mostly empty.
        p.log.merge_into(&mut record, self.limits.links);
        record.closed_by = ClosedBy::Log;
        self.forget(slot);
        self.drop_stale_deadlines();
        self.stats.closed_from_log += 1;
        Some(record)
    }

    /// Stops following the span in `slot`: its VXIDs leave the index, its slot is freed.
    fn forget(&mut self, slot: usize) {
        for c in &self.slab.slots[slot].chain {
            self.index.remove(&c.vxid);
        }
        self.slab.free(slot);
    }

    /// The slot of the finished span `key`, and its deadline, if it still waits for its log.
    fn waiting(&self, key: u64) -> Option<(usize, Instant)> {
        let slot = self.slot_of_key(key)?;
        let (_, _, deadline) = self.slab.slots[slot].finished.as_ref()?;
        Some((slot, *deadline))
    }

    /// Drops the entries at the front of `deadlines` whose span completed. Logs mostly come in
    /// the order the tasks finished, so the queue stays about as long as the spans waiting,
    /// rather than `log_wait` worth of all spans (megabytes, at high rates).
    fn drop_stale_deadlines(&mut self) {
        while let Some(&(_, key)) = self.deadlines.front() {
            if self.waiting(key).is_some() {
                break;
            }
            self.deadlines.pop_front();
        }
    }

    /// Closes, from backstop data, the finished spans whose log did not come in time, and drops
    /// the log data of spans tracked for longer than `max_age` without finishing.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Box<SpanRecord>>) {
        while let Some(&(deadline, key)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            // Stale entries (completed from the log, or a key reused since) are skipped.
            let Some((slot, _)) = self.waiting(key).filter(|(_, d)| *d <= now) else { continue };
            let finished = self.slab.slots[slot].finished.take();
            self.forget(slot);
            if let Some((record, _, _)) = finished {
                self.stats.closed_by_backstop += 1;
                out.push(backstop(record));
            }
        }
        if self.last_age_scan.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return;
        }
        self.last_age_scan = Some(now);
        let max_age = self.limits.max_age;
        // A span whose log has ended will not finish any more: its task's end sends `finished`
        // (or `untrack`, when the task completed it from its own buffer) before Varnish writes
        // the last `End`, so the message is handled by the next tick, unless the queue was full
        // and it was lost. Dropped when two scans a second apart (hundreds of ticks) found it so,
        // rather than holding its place until `max_age`.
        let old: Vec<usize> = self
            .slab
            .slots
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                let ended_long_ago = p.ended_unfinished && p.all_ended();
                !p.is_free() && p.finished.is_none() && (now.duration_since(p.since) >= max_age || ended_long_ago)
            })
            .map(|(slot, _)| slot)
            .collect();
        for slot in old {
            self.forget(slot);
            self.stats.abandoned += 1;
        }
        for p in self.slab.slots.iter_mut().filter(|p| !p.is_free()) {
            p.ended_unfinished = p.finished.is_none() && p.all_ended();
        }
    }
}

/// A span closed from its task's data alone, marked so that a trace UI can tell.
fn backstop(mut record: Box<SpanRecord>) -> Box<SpanRecord> {
    record.closed_by = ClosedBy::TaskEnd;
    record.set("varnish.span.closed_by", Value::Str("backstop".into()));
    record
}

/// The tag numbers and table of the synthetic logs the tests write with `record::encode` (here
/// and in `task_log`).
#[cfg(test)]
pub(crate) mod synthetic {
    use crate::vsl::record::TagTable;

    // Tag numbers of the synthetic log.
    pub const BEGIN: u8 = 1;
    pub const END: u8 = 2;
    pub const LINK: u8 = 3;
    pub const TS: u8 = 4;
    pub const REQACCT: u8 = 5;
    pub const BEREQACCT: u8 = 6;
    pub const RESPSTATUS: u8 = 7;
    pub const BERESPSTATUS: u8 = 8;
    pub const HIT: u8 = 9;
    pub const FETCHERROR: u8 = 10;
    pub const VCLERROR: u8 = 11;
    pub const BACKENDOPEN: u8 = 12;
    pub const OTHER: u8 = 13;

    pub fn tags() -> TagTable {
        TagTable::new(|name| {
            Some(match name.to_bytes() {
                b"Begin" => BEGIN,
                b"End" => END,
                b"Link" => LINK,
                b"Timestamp" => TS,
                b"ReqAcct" => REQACCT,
                b"BereqAcct" => BEREQACCT,
                b"RespStatus" => RESPSTATUS,
                b"BerespStatus" => BERESPSTATUS,
                b"Hit" => HIT,
                b"FetchError" => FETCHERROR,
                b"VCL_Error" => VCLERROR,
                b"BackendOpen" => BACKENDOPEN,
                _ => return None,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::synthetic::*;
    use super::*;
    use crate::ids::{SpanId, TraceId};
    use crate::span::{Link, SpanKind};
    use crate::vsl::record::encode;

    fn limits() -> Limits {
        Limits {
            max_pending: 100,
            log_wait: Duration::from_secs(3),
            max_age: Duration::from_secs(60),
            links: FetchLinks::leaked(64),
        }
    }

    /// One transaction's batch: (tag, payload) pairs for `vxid`.
    fn batch(vxid: u64, client: bool, recs: &[(u8, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (tag, payload) in recs {
            encode(&mut out, *tag, vxid, client, payload.as_bytes());
        }
        out
    }

    #[allow(clippy::vec_box)] // the spans as the correlator hands them out
    fn feed(c: &mut Correlator, bytes: &[u8]) -> Vec<Box<SpanRecord>> {
        let mut out = Vec::new();
        c.records(bytes, &mut out);
        out
    }

    /// The record the task end would hand over (backstop data).
    fn task_record(kind: SpanKind, first_vxid: u64, start: u64, end: u64, status: u16) -> Box<SpanRecord> {
        let mut r = SpanRecord::new(kind, TraceId([1; 16]), SpanId::random(), Some(SpanId([2; 8])));
        r.vxid = first_vxid;
        r.start_unix_nano = start;
        r.end_unix_nano = end;
        if status > 0 {
            r.set_http_status(status);
        }
        Box::new(r)
    }

    const T0: u64 = 1_700_000_000_000_100_000;

    fn client_log(vxid: u64, status: &str) -> Vec<u8> {
        batch(
            vxid,
            true,
            &[
                (BEGIN, "req 1000 rxreq"),
                (TS, "Start: 1700000000.000100 0.000000 0.000000"),
                (TS, "Req: 1700000000.000150 0.000050 0.000050"),
                (OTHER, "ReqURL /x"),
                (HIT, "1002 119.985 10.000 0.000 0 0"),
                (RESPSTATUS, "200"),
                (RESPSTATUS, status),
                (TS, "Process: 1700000000.000200 0.000100 0.000050"),
                (TS, "Resp: 1700000000.000350 0.000250 0.000150"),
                (REQACCT, "78 0 78 250 10 260"),
                (END, ""),
            ],
        )
    }

    #[test]
    fn synth_from_vcl_hit_is_a_hit_when_the_log_has_the_hit() {
        // The include records a fresh hit in vcl_deliver; a `return (synth())` from vcl_hit
        // never gets there, so the task saw `synth`. The log's Hit record says what happened.
        let now = Instant::now();
        let mut c = Correlator::new(tags(), limits());
        for (vxid, hit) in [(1001, true), (1003, false)] {
            c.track(vxid, now);
            let mut r = task_record(SpanKind::Server, vxid, T0, T0 + 1, 403);
            r.set_str("varnish.cache_result", "synth");
            assert!(c.finished(r, vxid, now).is_none());
            let mut recs = vec![(BEGIN, "req 1000 rxreq"), (TS, "Start: 1700000000.000100 0 0")];
            if hit {
                recs.push((HIT, "1002 119.985 10.000 0.000 0 0"));
            }
            recs.extend([(RESPSTATUS, "403"), (TS, "Resp: 1700000000.000350 0 0"), (END, "")]);
            let done = feed(&mut c, &batch(vxid, true, &recs));
            let want = if hit { "hit" } else { "synth" };
            assert_eq!(done[0].outcome.cache_result.as_deref(), Some(want), "hit record: {hit}");
        }
        // A hit, restarted (vcl_hit `return (restart)`), then a synth: the last lookup was none.
        c.track(1005, now);
        let mut r = task_record(SpanKind::Server, 1005, T0, T0 + 1, 403);
        r.set_str("varnish.cache_result", "synth");
        assert!(c.finished(r, 1007, now).is_none());
        let first = batch(
            1005,
            true,
            &[(TS, "Start: 1700000000.000100 0 0"), (HIT, "1002 1 10 0"), (LINK, "req 1007 restart"), (END, "")],
        );
        assert!(feed(&mut c, &first).is_empty());
        let second = batch(
            1007,
            true,
            &[(BEGIN, "req 1005 restart"), (RESPSTATUS, "403"), (TS, "Resp: 1700000000.000350 0 0"), (END, "")],
        );
        let done = feed(&mut c, &second);
        assert_eq!(done[0].outcome.cache_result.as_deref(), Some("synth"));
    }

    #[test]
    fn log_after_task_end_completes_with_the_logs_truth() {
        let now = Instant::now();
        let mut c = Correlator::new(tags(), limits());
        c.track(1001, now);
        // The task saw 200 in vcl_deliver; Varnish sent 304.
        assert!(c.finished(task_record(SpanKind::Server, 1001, T0, T0 + 1, 200), 1001, now).is_none());
        let done = feed(&mut c, &client_log(1001, "304"));
        assert_eq!(done.len(), 1);
        let s = &done[0];
        assert_eq!(s.start_unix_nano, T0);
        assert_eq!(s.end_unix_nano, 1_700_000_000_000_350_000);
        assert_eq!(s.outcome.status_code, Some(304));
        assert_eq!(s.outcome.response_body_size, Some(10));
        assert_eq!(s.closed_by, ClosedBy::Log);
        let names: Vec<&str> = s.events.iter().map(|e| e.name.as_ref()).collect();
        assert_eq!(names, ["Req", "Process", "Resp"]);
        assert_eq!(c.pending(), 0);
        assert_eq!(c.stats.closed_from_log, 1);
        assert!(!c.wants(1001));
    }

    #[test]
    fn log_before_task_end_waits_for_the_record() {
        let now = Instant::now();
        let mut c = Correlator::new(tags(), limits());
        c.track(1001, now);
        assert!(feed(&mut c, &client_log(1001, "200")).is_empty());
        let done = c.finished(task_record(SpanKind::Server, 1001, T0, T0 + 1, 200), 1001, now).unwrap();
        assert_eq!(done.end_unix_nano, 1_700_000_000_000_350_000);
        assert_eq!(done.closed_by, ClosedBy::Log);
    }

    #[test]
    fn untracked_transactions_are_skipped() {
        let mut c = Correlator::new(tags(), limits());
        c.track(1001, Instant::now());
        assert!(!c.wants(2001));
        assert!(feed(&mut c, &client_log(2001, "200")).is_empty());
        assert_eq!(c.stats.records, 0);
        assert_eq!(c.stats.transactions_matched, 0);
    }

    #[test]
    fn restart_follows_the_new_vxid_and_keeps_one_span() {
        let now = Instant::now();
        let mut c = Correlator::new(tags(), limits());
        c.track(1001, now);
        // First VXID: restarted, no Resp and no ReqAcct.
        let first = batch(
            1001,
            true,
            &[
                (TS, "Start: 1700000000.000100 0.000000 0.000000"),
                (RESPSTATUS, "404"),
                (TS, "Restart: 1700000000.000200 0.000100 0.000100"),
                (LINK, "req 1003 restart"),
                (END, ""),
            ],
        );
        let second = batch(
            1003,
            true,
            &[
                (BEGIN, "req 1001 restart"),
                (TS, "Start: 1700000000.000210 0.000110 0.000010"),
                (RESPSTATUS, "200"),
                (TS, "Resp: 1700000000.000400 0.000300 0.000190"),
                (REQACCT, "78 0 78 250 5 255"),
                (END, ""),
            ],
        );
        assert!(feed(&mut c, &first).is_empty());
        assert!(c.wants(1003));
        assert!(feed(&mut c, &second).is_empty());
        let done = c.finished(task_record(SpanKind::Server, 1001, T0, T0 + 1, 200), 1003, now).unwrap();
        assert_eq!(done.start_unix_nano, T0, "the chain's first Start");
        assert_eq!(done.end_unix_nano, 1_700_000_000_000_400_000);
        assert_eq!(done.outcome.status_code, Some(200));
        let names: Vec<&str> = done.events.iter().map(|e| e.name.as_ref()).collect();
        assert_eq!(names, ["Restart", "varnish.restart", "Start", "Resp"]);
    }

    #[test]
    fn the_span_waits_for_the_end_of_its_final_vxid() {
        let now = Instant::now();
        let mut c = Correlator::new(tags(), limits());
        c.track(1001, now);
        let first = batch(1001, true, &[(TS, "Start: 1700000000.000100 0 0"), (LINK, "req 1003 restart"), (END, "")]);
        feed(&mut c, &first);
        // The task ended under 1003, whose log has not been read yet.
        assert!(c.finished(task_record(SpanKind::Server, 1001, T0, T0 + 1, 200), 1003, now).is_none());
        let done = feed(&mut c, &batch(1003, true, &[(TS, "Resp: 1700000000.000500 0 0"), (END, "")]));
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].end_unix_nano, 1_700_000_000_000_500_000);
    }

    #[test]
    fn backend_retry_and_errors() {
        let now = Instant::now();
        let mut c = Correlator::new(tags(), limits());
        c.track(1002, now);
        let first = batch(
            1002,
            false,
            &[
                (TS, "Start: 1700000000.000100 0 0"),
                (FETCHERROR, "backend s1: fail errno 111 (Connection refused)"),
                (TS, "Retry: 1700000000.000150 0 0"),
                (LINK, "bereq 1004 retry"),
                (END, ""),
            ],
        );
        let second = batch(
            1004,
            false,
            &[
                (TS, "Start: 1700000000.000160 0 0"),
                (BACKENDOPEN, "25 s1 127.0.0.1 8080 127.0.0.1 45678 connect"),
                (TS, "Bereq: 1700000000.000170 0 0"),
                (TS, "Beresp: 1700000000.000300 0 0"),
                (BERESPSTATUS, "503"),
                (TS, "BerespBody: 1700000000.000320 0 0"),
                (BEREQACCT, "100 0 100 50 7 57"),
                (END, ""),
            ],
        );
        feed(&mut c, &first);
        feed(&mut c, &second);
        let done = c.finished(task_record(SpanKind::Client, 1002, T0, T0 + 1, 503), 1004, now).unwrap();
        assert_eq!(done.end_unix_nano, 1_700_000_000_000_320_000);
        assert_eq!(done.status, StatusCode::Error, "503 from the final attempt");
        assert_eq!(done.outcome.error_type.as_deref(), Some("503"));
        assert_eq!(done.status_message, None, "the first attempt's error was superseded by the retry");
        assert_eq!(done.outcome.peer_address.as_deref(), Some("127.0.0.1"));
        assert_eq!(done.outcome.peer_port, Some(8080));
        assert_eq!(done.outcome.backend.as_deref(), Some("s1"));
        assert_eq!(done.outcome.response_body_size, Some(7));
        let names: Vec<&str> = done.events.iter().map(|e| e.name.as_ref()).collect();
        assert_eq!(names, ["Retry", "varnish.retry", "Start", "Bereq", "Beresp", "BerespBody"]);
    }

    #[test]
    fn a_fetch_error_without_response_sets_the_status_message() {
        let now = Instant::now();
        let mut c = Correlator::new(tags(), limits());
        c.track(1002, now);
        let mut r = task_record(SpanKind::Client, 1002, T0, T0 + 1, 0);
        // As the task end records a fetch that failed (`varnish::task`).
        r.status = StatusCode::Error;
        r.set("error.type", Value::Str("fetch_failed".into()));
        c.finished(r, 1002, now);
        let log = batch(
            1002,
            false,
            &[
                (TS, "Start: 1700000000.000100 0 0"),
                (FETCHERROR, "backend s1: fail errno 111 (Connection refused)"),
                (TS, "Error: 1700000000.000150 0 0"),
                (END, ""),
            ],
        );
        let done = feed(&mut c, &log).pop().unwrap();
        assert_eq!(done.status, StatusCode::Error);
        assert_eq!(done.status_message.as_deref(), Some("backend s1: fail errno 111 (Connection refused)"));
        assert_eq!(done.outcome.error_type.as_deref(), Some("fetch_failed"));
        assert_eq!(done.outcome.status_code, None, "the 503 was made by vcl_backend_error");
        assert_eq!(done.end_unix_nano, 1_700_000_000_000_150_000);
    }

    #[test]
    fn a_hit_links_to_the_fetch_that_made_the_object() {
        let now = Instant::now();
        let limits = limits();
        let mut c = Correlator::new(tags(), limits);
        c.track(1002, now);
        let fetch = task_record(SpanKind::Client, 1002, T0, T0 + 1, 200);
        let (fetch_trace, fetch_span) = (fetch.trace_id, fetch.span_id);
        // As the worker announces a fetch that may store an object (`trace_backend`).
        limits.links.remember(1002, fetch_trace, fetch_span);
        c.finished(fetch, 1002, now);
        feed(&mut c, &batch(1002, false, &[(TS, "BerespBody: 1700000000.000300 0 0"), (END, "")]));
        // A later hit of another trace on the object 1002 fetched.
        c.track(1005, now);
        c.finished(task_record(SpanKind::Server, 1005, T0, T0 + 1, 200), 1005, now);
        let done = feed(&mut c, &client_log(1005, "200")[..]).pop();
        // client_log's Hit names object 1002
        let done = done.unwrap();
        assert_eq!(done.links, vec![Link { trace_id: fetch_trace, span_id: fetch_span }]);
    }

    #[test]
    fn a_hit_read_before_its_fetch_completes_still_links_to_it() {
        let now = Instant::now();
        let limits = limits();
        let mut c = Correlator::new(tags(), limits);
        c.track(1002, now);
        let fetch = task_record(SpanKind::Client, 1002, T0, T0 + 1, 200);
        limits.links.remember(1002, fetch.trace_id, fetch.span_id);
        let (fetch_trace, fetch_span) = (fetch.trace_id, fetch.span_id);
        // The hit completes first; the fetch's task has not even ended.
        c.track(1005, now);
        c.finished(task_record(SpanKind::Server, 1005, T0, T0 + 1, 200), 1005, now);
        let done = feed(&mut c, &client_log(1005, "200")[..]).pop().unwrap();
        assert_eq!(done.links, vec![Link { trace_id: fetch_trace, span_id: fetch_span }]);
        // The fetch completes later, as usual.
        c.finished(fetch, 1002, now);
        let done = feed(&mut c, &batch(1002, false, &[(TS, "BerespBody: 1700000000.000300 0 0"), (END, "")]));
        assert_eq!(done.len(), 1);
    }

    #[test]
    fn esi_and_background_fetches_are_spans_of_their_own() {
        let now = Instant::now();
        let mut c = Correlator::new(tags(), limits());
        c.track(1001, now);
        c.track(1003, now); // the ESI sub-request
        c.track(1004, now); // a background fetch, finishing after the client
        let parent = batch(
            1001,
            true,
            &[
                (TS, "Start: 1700000000.000100 0 0"),
                (LINK, "bereq 1004 bgfetch"),
                (LINK, "req 1003 esi 1"),
                (TS, "Resp: 1700000000.000900 0 0"),
                (END, ""),
            ],
        );
        let child =
            batch(1003, true, &[(TS, "Start: 1700000000.000300 0 0"), (TS, "Resp: 1700000000.000400 0 0"), (END, "")]);
        feed(&mut c, &child);
        c.finished(task_record(SpanKind::Internal, 1003, T0, T0 + 1, 200), 1003, now).unwrap();
        feed(&mut c, &parent);
        let top = c.finished(task_record(SpanKind::Server, 1001, T0, T0 + 1, 200), 1001, now).unwrap();
        assert_eq!(top.end_unix_nano, 1_700_000_000_000_900_000);
        assert!(top.events.iter().all(|e| !e.name.starts_with("varnish.")), "fetch and ESI links are not restarts");
        assert!(c.wants(1004), "the background fetch is still followed");
        c.finished(task_record(SpanKind::Client, 1004, T0, T0 + 1, 200), 1004, now);
        let bg = feed(&mut c, &batch(1004, false, &[(TS, "BerespBody: 1700000000.002000 0 0"), (END, "")]));
        assert_eq!(bg[0].end_unix_nano, 1_700_000_000_002_000_000);
    }

    #[test]
    fn pipe_ends_at_pipesess_and_synth_keeps_its_status() {
        let now = Instant::now();
        let mut c = Correlator::new(tags(), limits());
        c.track(1001, now);
        c.finished(task_record(SpanKind::Server, 1001, T0, T0 + 1, 0), 1001, now);
        let pipe = batch(
            1001,
            true,
            &[
                (TS, "Start: 1700000000.000100 0 0"),
                (TS, "Pipe: 1700000000.000200 0 0"),
                (TS, "PipeSess: 1700000000.005000 0 0"),
                (END, ""),
            ],
        );
        let done = feed(&mut c, &pipe).pop().unwrap();
        assert_eq!(done.end_unix_nano, 1_700_000_000_005_000_000);
        c.track(1002, now);
        c.finished(task_record(SpanKind::Server, 1002, T0, T0 + 1, 418), 1002, now);
        let synth = batch(
            1002,
            true,
            &[
                (TS, "Start: 1700000000.000100 0 0"),
                (RESPSTATUS, "418"),
                (TS, "Resp: 1700000000.000200 0 0"),
                (END, ""),
            ],
        );
        let done = feed(&mut c, &synth).pop().unwrap();
        assert_eq!(done.outcome.status_code, Some(418));
        assert_eq!(done.status, StatusCode::Unset);
    }

    #[test]
    fn vcl_error_marks_the_span() {
        let now = Instant::now();
        let mut c = Correlator::new(tags(), limits());
        c.track(1001, now);
        c.finished(task_record(SpanKind::Server, 1001, T0, T0 + 1, 503), 1001, now);
        let log = batch(
            1001,
            true,
            &[
                (TS, "Start: 1700000000.000100 0 0"),
                (VCLERROR, "Bad header"),
                (RESPSTATUS, "503"),
                (TS, "Resp: 1700000000.000200 0 0"),
                (END, ""),
            ],
        );
        let done = feed(&mut c, &log).pop().unwrap();
        assert_eq!(done.status, StatusCode::Error);
        assert_eq!(done.status_message.as_deref(), Some("Bad header"));
        assert_eq!(done.outcome.error_type.as_deref(), Some("vcl_error"));
    }

    #[test]
    fn vcl_error_on_a_request_that_succeeded_is_not_an_error() {
        let now = Instant::now();
        let mut c = Correlator::new(tags(), limits());
        c.track(1001, now);
        c.finished(task_record(SpanKind::Server, 1001, T0, T0 + 1, 200), 1001, now);
        let log = batch(1001, true, &[(VCLERROR, "regex match failed"), (RESPSTATUS, "200"), (END, "")]);
        let done = feed(&mut c, &log).pop().unwrap();
        assert_eq!(done.status, StatusCode::Unset);
        assert_eq!(done.outcome.error_type, None);
    }

    #[test]
    fn without_log_the_span_closes_from_backstop_data_after_the_wait() {
        let now = Instant::now();
        let mut c = Correlator::new(tags(), limits());
        c.track(1001, now);
        c.finished(task_record(SpanKind::Server, 1001, T0, T0 + 7, 200), 1001, now);
        let mut out = Vec::new();
        c.expire(now + Duration::from_secs(1), &mut out);
        assert!(out.is_empty(), "still within the wait");
        c.expire(now + Duration::from_secs(4), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].end_unix_nano, T0 + 7);
        assert_eq!(out[0].closed_by, ClosedBy::TaskEnd);
        assert_eq!(out[0].get("varnish.span.closed_by"), Some(Value::Str("backstop".into())));
        assert_eq!(c.pending(), 0);
        assert_eq!(c.stats.closed_by_backstop, 1);
        assert!(!c.wants(1001));
    }

    #[test]
    fn untracked_finished_spans_close_at_once_and_memory_is_bounded() {
        let now = Instant::now();
        let mut c = Correlator::new(tags(), Limits { max_pending: 2, ..limits() });
        let r = c.finished(task_record(SpanKind::Server, 9, T0, T0 + 1, 200), 9, now).unwrap();
        assert_eq!(r.closed_by, ClosedBy::TaskEnd);
        for v in 1..=5 {
            c.track(v, now);
        }
        assert_eq!(c.pending(), 2);
        assert_eq!(c.stats.not_tracked, 3);
        // Tracked but never finished: forgotten after max_age.
        let mut out = Vec::new();
        c.expire(now + Duration::from_secs(61), &mut out);
        assert!(out.is_empty());
        assert_eq!(c.pending(), 0);
        assert_eq!(c.stats.abandoned, 2);
    }

    #[test]
    fn a_span_whose_log_ended_without_its_finish_is_dropped_at_the_second_scan() {
        // Its task's `finished` (or `untrack`) was lost to a full queue: it would otherwise hold
        // its place until max_age.
        let now = Instant::now();
        let mut c = Correlator::new(tags(), limits());
        c.track(7, now);
        // A restarted span: its first transaction ended, the next goes on.
        c.track(20, now);
        feed(&mut c, &batch(7, true, &[(TS, "Resp: 1700000000.000300 0 0"), (END, "")]));
        feed(&mut c, &batch(20, true, &[(LINK, "req 21 restart"), (END, "")]));
        let scan = |c: &mut Correlator, s: u64| {
            let mut out = Vec::new();
            c.expire(now + Duration::from_secs(s), &mut out);
            assert!(out.is_empty(), "nothing to export: its task's end took care of the span");
            c.pending()
        };
        assert_eq!(scan(&mut c, 1), 2, "the first scan only notes it");
        assert_eq!(scan(&mut c, 2), 1, "the second drops the one whose log ended");
        assert_eq!(c.stats.abandoned, 1);
        assert!(!c.wants(7));
        // The restarted one stays while its next transaction goes on, and is dropped alike once
        // that one ended without a finish.
        assert_eq!(scan(&mut c, 30), 1);
        feed(&mut c, &batch(21, true, &[(END, "")]));
        assert_eq!(scan(&mut c, 31), 1);
        assert_eq!(scan(&mut c, 32), 0);
        assert_eq!(c.stats.abandoned, 2);
        // A finish that comes in time completes the span as usual, however long its log waited.
        c.track(40, now);
        feed(&mut c, &batch(40, true, &[(TS, "Resp: 1700000000.000300 0 0"), (END, "")]));
        assert_eq!(scan(&mut c, 33), 1);
        let done = c.finished(task_record(SpanKind::Server, 40, T0, T0 + 1, 200), 40, now + Duration::from_secs(33));
        assert_eq!(done.map(|d| d.closed_by), Some(ClosedBy::Log));
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn timestamps_parse_exactly() {
        assert_eq!(parse_abs("1700000000.000100"), Some(1_700_000_000_000_100_000));
        assert_eq!(parse_abs("1700000000.1"), Some(1_700_000_000_100_000_000));
        assert_eq!(parse_abs("1700000000"), None);
        assert_eq!(parse_abs("17x.1"), None);
        assert_eq!(parse_abs("1.-1"), None);
    }

    /// What the general path reads: fields split on whitespace, the label ending with ':'.
    fn timestamp_by_fields(data: &[u8]) -> Option<(&[u8], u64)> {
        let mut f = fields(data);
        let label = f.next()?.strip_suffix(b":")?;
        Some((label, parse_abs(f.next()?)?))
    }

    #[test]
    fn fast_digit_paths_read_what_the_general_paths_read() {
        // Every byte value in every position of eight digits, and numbers of every size.
        for pos in 0..8 {
            for b in 0..=255u8 {
                let mut bytes = *b"12345678";
                bytes[pos] = b;
                let naive =
                    bytes.iter().all(u8::is_ascii_digit).then(|| std::str::from_utf8(&bytes).unwrap().parse().unwrap());
                assert_eq!(eight_digits(bytes), naive, "{bytes:?}");
            }
        }
        let mut rng = fastrand::Rng::with_seed(7);
        let mut last = LastSeconds::default();
        for _ in 0..20_000 {
            let v = rng.u64(..100_000_000);
            assert_eq!(eight_digits(format!("{v:08}").as_bytes().try_into().unwrap()), Some(v));
            let (secs, micros) = (rng.u64(1_000_000_000..10_000_000_000), rng.u64(..1_000_000));
            let text = format!("Resp: {secs}.{micros:06} 0.000250 0.000040");
            let expected = Some(secs * 1_000_000_000 + micros * 1000);
            assert_eq!(ten_dot_six(&text.as_bytes()[6..], &mut LastSeconds::default()), expected);
            // Read after the same second, after another, and again in the same second.
            assert_eq!(ten_dot_six(&text.as_bytes()[6..], &mut last), expected, "{text}");
            assert_eq!(ten_dot_six(&text.as_bytes()[6..], &mut last), expected, "{text}");
            let same_second = format!("{secs}.{:06}", (micros + 1) % 1_000_000);
            let expected = Some(secs * 1_000_000_000 + (micros + 1) % 1_000_000 * 1000);
            assert_eq!(ten_dot_six(same_second.as_bytes(), &mut last), expected, "{same_second}");
            assert_eq!(timestamp(text.as_bytes()), timestamp_by_fields(text.as_bytes()), "{text}");
            let acct: Vec<u64> = (0..6)
                .map(|_| {
                    let bits = rng.u32(1..64); // up to 19 digits: more go to the general path
                    rng.u64(..u64::MAX >> bits)
                })
                .collect();
            let line = acct.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
            assert_eq!(six_numbers(line.as_bytes()).map(|n| n.to_vec()), Some(acct), "{line}");
        }
        // Ten NULs for the seconds are no number, whatever the memo held before.
        for mut memo in [LastSeconds::default(), last] {
            assert_eq!(ten_dot_six(b"\0\0\0\0\0\0\0\0\0\0.000100", &mut memo), None);
        }
        assert_eq!(timestamp(b"X: \0\0\0\0\0\0\0\0\0\0.000100"), None);
        assert_eq!(ten_dot_six(b"0000000000.000100", &mut LastSeconds::default()), Some(100_000));
        // Other shapes go to the general paths, which decide.
        for text in [
            "Start: 1700000000.00010 0 0",
            "Start: 1700000000.0001000 0 0",
            "Start: 170000000.000100 0 0",
            "Start: 1700000000.000100x",
            "Start: 1700000000,000100 0",
            "Start: 17000000a0.000100 0",
            "Start: 1700000000.00a100 0",
            "Start: 1700000000.000100",
            "Start:  1700000000.000100 0",
            ": 1700000000.000100 0",
        ] {
            assert_eq!(timestamp(text.as_bytes()), timestamp_by_fields(text.as_bytes()), "{text}");
        }
        for line in [
            "1 2 3 4 5",
            "1 2 3 4 5 6 7",
            "1  2 3 4 5 6",
            " 1 2 3 4 5 6",
            "1 2 3 4 5 x",
            "1 2 3 4 5 ",
            "99999999999999999999 2 3 4 5 6",
        ] {
            assert_eq!(six_numbers(line.as_bytes()), None, "{line}");
        }
    }

    #[test]
    fn malformed_records_are_ignored() {
        let now = Instant::now();
        let mut c = Correlator::new(tags(), limits());
        c.track(1001, now);
        let junk = batch(
            1001,
            true,
            &[
                (TS, "Start:"),
                (TS, "nonsense"),
                (REQACCT, "1 2"),
                (LINK, "req x restart"),
                (RESPSTATUS, "abc"),
                (END, ""),
            ],
        );
        assert!(feed(&mut c, &junk).is_empty());
        let done = c.finished(task_record(SpanKind::Server, 1001, T0, T0 + 5, 200), 1001, now).unwrap();
        assert_eq!(done.start_unix_nano, T0, "backstop times kept when the log has none");
        assert_eq!(done.end_unix_nano, T0 + 5);
    }

    #[test]
    fn numbers_parse_as_str_parse_does() {
        // Read from bytes, with a fast path for plain digits: what `str::parse` accepts, exactly.
        let u64s =
            ["0", "007", "200", "+5", "-5", "", "+", "1 2", "12a", "18446744073709551615", "18446744073709551616"];
        for s in u64s {
            assert_eq!(parse_int::<u64>(s.as_bytes()), s.parse::<u64>().ok(), "{s:?} as u64");
        }
        for s in ["404", "65535", "65536", "00000000000000000000200", "99999999999999999999"] {
            assert_eq!(parse_int::<u16>(s.as_bytes()), s.parse::<u16>().ok(), "{s:?} as u16");
        }
        assert_eq!(parse_abs("+1.5"), Some(1_500_000_000));
        assert_eq!(parse_abs("000000000000000000001.5"), Some(1_500_000_000));
        assert_eq!(parse_abs("1.0000000001"), None, "more than nanoseconds");
        assert_eq!(parse_abs("1."), None);
        assert_eq!(parse_abs("18446744073.709551615"), Some(u64::MAX));
        assert_eq!(parse_abs("18446744073.709551616"), None, "past u64 nanoseconds");
    }

    #[test]
    fn timestamps_as_written_read_as_in_general() {
        fn general(data: &[u8]) -> Option<(&[u8], u64)> {
            let mut fields = fields(data);
            let label = fields.next()?.strip_suffix(b":")?;
            Some((label, parse_abs(fields.next()?)?))
        }
        let cases = [
            "Start: 1700000000.000100 0.000000 0.000000",
            "Resp: 1700000000.1",
            "Start:  1700000000.1 0 0",
            "Start:\t1700000000.1",
            " Start: 1.5",
            "A:B: 1.5",
            "St art: 1.5",
            ": 1.5",
            "Start: +1.5",
            "Start: 1.5x",
            "Start: 1.5\n",
            "Start: 1.0000000001",
            "Start: 1.",
            "Start: .5",
            "Start: 1",
            "Start:",
            "Start: 0000000000000000000001.5",
            "Start: 18446744073.709551615",
            "Start: 18446744073.709551616",
            "Start: 99999999999999999999.5",
        ];
        for case in cases {
            assert_eq!(timestamp(case.as_bytes()), general(case.as_bytes()), "{case:?}");
        }
        assert!(timestamp_as_written(cases[0].as_bytes()).is_some(), "the fast way is taken");
    }

    #[test]
    fn acct_fast_path_reads_as_in_general() {
        let general = |data: &[u8]| -> Option<[u64; 6]> {
            let mut f = fields(data);
            let mut n = [0u64; 6];
            for v in &mut n {
                *v = parse_int(f.next()?)?;
            }
            f.next().is_none().then_some(n)
        };
        let max = "9999999999999999999"; // 19 digits: the most the fast path reads
        let cases = [
            "78 0 78 250 1024 1274".to_owned(),
            format!("{max} 0 0 0 0 {max}"),
            format!("1{max} 0 0 0 0 0"), // 20 digits
            format!("0 0 0 0 0 1{max}"),
            "18446744073709551615 0 0 0 0 0".to_owned(), // u64::MAX: the general path reads it
            "1 2 3 4 5".to_owned(),
            "1 2 3 4 5 6 7".to_owned(),
            "1  2 3 4 5 6".to_owned(),
            " 1 2 3 4 5 6".to_owned(),
            "1 2 3 4 5 6 ".to_owned(),
            "1 2 3 4 5 -6".to_owned(),
            "1 2 3 4 5 6x".to_owned(),
            String::new(),
        ];
        for case in &cases {
            if let Some(n) = six_numbers(case.as_bytes()) {
                assert_eq!(Some(n), general(case.as_bytes()), "{case:?}");
            }
        }
        assert_eq!(six_numbers(cases[0].as_bytes()), Some([78, 0, 78, 250, 1024, 1274]));
        assert_eq!(six_numbers(cases[1].as_bytes()).map(|n| n[5]), Some(9_999_999_999_999_999_999));
        assert_eq!(six_numbers(cases[2].as_bytes()), None);
        assert_eq!(six_numbers(cases[3].as_bytes()), None);
        assert_eq!(general(cases[4].as_bytes()).map(|n| n[0]), Some(u64::MAX));
    }

    #[test]
    fn known_labels_read_as_in_general() {
        // Whatever `known_timestamp` accepts, the general path reads the same; what it refuses
        // goes there anyway. Every documented label, near misses, and mutated times.
        let general = |data: &[u8]| {
            let (label, t) = timestamp(data)?;
            let (name, kind) = label_meaning(label);
            Some((name.into_owned(), kind, t))
        };
        let labels: Vec<&str> = LABELS.iter().map(|(name, _)| *name).collect();
        // The fast path knows every documented label, with the same meaning.
        for (name, kind) in LABELS {
            let text = format!("{name}: 1700000000.000100 0.000000 0.000000");
            assert_eq!(
                known_timestamp(text.as_bytes(), &mut LastSeconds::default()),
                Some((name, kind, 1_700_000_000_000_100_000)),
                "{name}"
            );
        }
        let mut rng = fastrand::Rng::with_seed(11);
        let mut last = LastSeconds::default();
        let mut taken = 0;
        for label in labels.iter().copied().chain(["Re", "Requ", "ReqBod", "PipeSes", "S", "Pipes", "X", ""]) {
            for time in ["1700000000.000100 0.000000 0.000000", "1700000000.000100", "1700000000.1 0 0", "1.5"] {
                let text = format!("{label}: {time}");
                let mut cases = vec![text.clone().into_bytes(), format!("{label}:{time}").into_bytes()];
                for _ in 0..200 {
                    let mut b = text.clone().into_bytes();
                    let at = rng.usize(..b.len());
                    b[at] = rng.u8(..);
                    cases.push(b);
                }
                for case in cases {
                    if let Some((name, kind, t)) = known_timestamp(&case, &mut last) {
                        taken += 1;
                        assert_eq!(
                            Some((name.to_owned(), kind, t)),
                            general(&case),
                            "{:?}",
                            String::from_utf8_lossy(&case)
                        );
                    }
                }
            }
        }
        assert!(taken > labels.len() * 2, "the fast way is taken ({taken})");
        assert_eq!(
            known_timestamp(b"Resp: 1700000000.000350 0.000250 0.000040", &mut LastSeconds::default()),
            Some(("Resp", LabelKind::End, 1_700_000_000_000_350_000))
        );
        assert_eq!(
            known_timestamp(b"ReqBody: 1700000000.000350 0 0", &mut LastSeconds::default()).map(|k| k.0),
            Some("ReqBody")
        );
        assert_eq!(
            known_timestamp(b"Pipe: 1700000000.000350 0 0", &mut LastSeconds::default()).map(|k| k.1),
            Some(LabelKind::Phase)
        );
        assert_eq!(
            known_timestamp(b"PipeSess: 1700000000.000350 0 0", &mut LastSeconds::default()).map(|k| k.1),
            Some(LabelKind::End)
        );
    }

    #[test]
    fn fields_split_as_str_split_ascii_whitespace_does() {
        for s in ["", " ", "a", " a  b\tc\n", "Start: 1700000000.000100 0 0", "x\u{c}y\rz"] {
            let bytes: Vec<&[u8]> = fields(s.as_bytes()).collect();
            let text: Vec<&[u8]> = s.split_ascii_whitespace().map(str::as_bytes).collect();
            assert_eq!(bytes, text, "{s:?}");
        }
    }

    #[test]
    fn text_that_is_not_utf8_is_kept_as_before() {
        // Labels we do not know and error texts are the only text kept: lossily, as when the
        // whole record went through `String::from_utf8_lossy`.
        let now = Instant::now();
        let mut c = Correlator::new(tags(), limits());
        c.track(1002, now);
        c.finished(task_record(SpanKind::Client, 1002, T0, T0 + 1, 0), 1002, now);
        let mut log = Vec::new();
        encode(&mut log, TS, 1002, false, b"Start: 1700000000.000100 0 0");
        encode(&mut log, TS, 1002, false, b"Od\xffd: 1700000000.000110 0 0");
        encode(&mut log, FETCHERROR, 1002, false, b" bad \xfe byte ");
        encode(&mut log, END, 1002, false, b"");
        let done = feed(&mut c, &log).pop().unwrap();
        assert_eq!(done.events[0].name, "Od\u{fffd}d");
        assert_eq!(done.status_message.as_deref(), Some("bad \u{fffd} byte"));
    }

    #[test]
    fn a_reused_slot_is_not_closed_by_the_deadline_of_its_last_span() {
        let now = Instant::now();
        let mut c = Correlator::new(tags(), limits());
        c.track(1001, now);
        c.track(1002, now);
        c.finished(task_record(SpanKind::Server, 1001, T0, T0 + 1, 200), 1001, now);
        c.finished(task_record(SpanKind::Server, 1002, T0, T0 + 1, 200), 1002, now);
        // 1002 completes from its log; its deadline, behind that of 1001, stays queued.
        assert_eq!(feed(&mut c, &client_log(1002, "200")).len(), 1);
        // 1003 takes the slot 1002 had, and finishes later.
        c.track(1003, now);
        let later = now + Duration::from_secs(2);
        c.finished(task_record(SpanKind::Server, 1003, T0, T0 + 1, 200), 1003, later);
        let mut out = Vec::new();
        c.expire(now + Duration::from_secs(4), &mut out);
        assert_eq!(out.len(), 1, "1001 only");
        assert_eq!(out[0].vxid, 1001);
        assert!(c.wants(1003));
        assert_eq!(feed(&mut c, &client_log(1003, "200")).pop().unwrap().closed_by, ClosedBy::Log);
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn deadlines_of_spans_completed_in_order_are_dropped() {
        let now = Instant::now();
        let mut c = Correlator::new(tags(), limits());
        for v in 1..=50u64 {
            c.track(v, now);
            c.finished(task_record(SpanKind::Server, v, T0, T0 + 1, 200), v, now);
        }
        for v in 1..=50u64 {
            assert_eq!(feed(&mut c, &client_log(v, "200")).len(), 1);
        }
        assert!(c.deadlines.is_empty(), "{} left", c.deadlines.len());
        assert_eq!(c.slab.slots.len(), 50);
        // Their slots, and the buffers in them, serve the next spans.
        for v in 51..=100u64 {
            c.track(v, now);
        }
        assert_eq!(c.slab.slots.len(), 50);
        assert_eq!(c.pending(), 50);
    }
}
