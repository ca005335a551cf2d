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
//! Threading: owned by the tailer thread; no locks.

use std::borrow::Cow;
use std::collections::VecDeque;

use rustc_hash::FxHashMap as HashMap;
use std::time::{Duration, Instant};

use super::record::{Record, Tag, TagTable};
use crate::ids::{SpanId, TraceId};
use crate::span::{ClosedBy, Link, SpanKind, SpanRecord, StatusCode, Value};

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Spans being followed at most; more are not tracked (they close from backstop data).
    pub max_pending: usize,
    /// How long a finished span waits for its log before it is closed from backstop data.
    pub log_wait: Duration,
    /// How long a tracked span may go without finishing before its log data is dropped
    /// (the span itself still closes from its task: a long download only loses the log data).
    pub max_age: Duration,
    /// Backend fetches remembered for linking the hits they served.
    pub fetches_remembered: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pending: 16_384,
            log_wait: Duration::from_secs(3),
            max_age: Duration::from_secs(600),
            fetches_remembered: 65_536,
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
    /// Tracked spans dropped after `max_age` without finishing.
    pub abandoned: u64,
}

/// What the log told us about one span (all VXIDs of its chain).
#[derive(Default, Debug)]
struct LogData {
    start_ns: Option<u64>,
    end_ns: Option<u64>,
    events: Vec<(u64, Cow<'static, str>)>,
    last_ts_ns: Option<u64>,
    status: Option<u16>,
    acct: Option<[u64; 6]>,
    fetch_error: Option<String>,
    vcl_error: Option<String>,
    hit_obj: Option<u64>,
    peer: Option<(String, String, String)>,
}

struct Pending {
    chain: Vec<u64>,
    ended: Vec<u64>,
    log: LogData,
    finished: Option<(Box<SpanRecord>, u64, Instant)>,
    since: Instant,
}

pub struct Correlator {
    tags: TagTable,
    limits: Limits,
    /// Every VXID of a tracked chain, to the chain's first VXID.
    index: HashMap<u64, u64>,
    pending: HashMap<u64, Pending>,
    /// Backend spans recently closed from the log: bereq VXID to span, for `Hit` links.
    fetched: HashMap<u64, (TraceId, SpanId)>,
    fetched_order: VecDeque<u64>,
    /// Finished spans by log deadline. Deadlines are `finished` time plus a constant, so the
    /// queue is in order and `expire` only looks at its front (completed spans leave stale
    /// entries behind, skipped when they come up; the queue holds at most `log_wait` worth).
    deadlines: VecDeque<(Instant, u64)>,
    /// When tracked spans without a finish were last looked for (a full scan, once a second).
    last_age_scan: Option<Instant>,
    pub stats: Stats,
}

/// Timestamp labels that end a span: client `Resp` (`PipeSess` for pipe), backend
/// `BerespBody` or `Error`.
fn is_end_label(label: &str) -> bool {
    matches!(label, "Resp" | "PipeSess" | "BerespBody" | "Error")
}

/// `1700000000.000100` to nanoseconds, exactly as printed (no floating point).
fn parse_abs(s: &str) -> Option<u64> {
    let (secs, frac) = s.split_once('.')?;
    let secs: u64 = secs.parse().ok()?;
    if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut nanos: u64 = frac.parse().ok()?;
    for _ in frac.len()..9 {
        nanos *= 10;
    }
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

fn event_name(label: &str) -> Cow<'static, str> {
    // The labels Varnish documents, without an allocation; anything else as it came.
    const KNOWN: &[&str] = &[
        "Start",
        "Req",
        "ReqBody",
        "Waitinglist",
        "Fetch",
        "Process",
        "Resp",
        "Restart",
        "Reset",
        "Pipe",
        "PipeSess",
        "Connected",
        "Bereq",
        "Beresp",
        "BerespBody",
        "Retry",
        "Error",
    ];
    KNOWN.iter().find(|k| **k == label).map_or_else(|| Cow::Owned(label.to_owned()), |k| Cow::Borrowed(*k))
}

impl Correlator {
    pub fn new(tags: TagTable, limits: Limits) -> Self {
        Correlator {
            tags,
            limits,
            index: HashMap::default(),
            pending: HashMap::default(),
            fetched: HashMap::default(),
            fetched_order: VecDeque::new(),
            deadlines: VecDeque::new(),
            last_age_scan: None,
            stats: Stats::default(),
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Whether records of `vxid` are wanted (checked once per batch, before looking inside).
    pub fn wants(&self, vxid: u64) -> bool {
        self.index.contains_key(&vxid)
    }

    pub fn track(&mut self, vxid: u64, now: Instant) {
        if self.index.contains_key(&vxid) {
            return;
        }
        if self.pending.len() >= self.limits.max_pending {
            self.stats.not_tracked += 1;
            return;
        }
        self.index.insert(vxid, vxid);
        self.pending.insert(
            vxid,
            Pending { chain: vec![vxid], ended: Vec::new(), log: LogData::default(), finished: None, since: now },
        );
    }

    /// The task of a span ended. Returns the span if it is complete (its log already read), or
    /// at once, closed from the backstop data, if it was never tracked.
    pub fn finished(&mut self, record: Box<SpanRecord>, final_vxid: u64, now: Instant) -> Option<Box<SpanRecord>> {
        let key = record.vxid;
        let Some(p) = self.pending.get_mut(&key) else {
            self.stats.closed_by_backstop += 1;
            return Some(backstop(record));
        };
        if !p.chain.contains(&final_vxid) {
            p.chain.push(final_vxid);
            self.index.insert(final_vxid, key);
        }
        let deadline = now + self.limits.log_wait;
        p.finished = Some((record, final_vxid, deadline));
        if p.ended.contains(&final_vxid) {
            return self.complete(key);
        }
        self.deadlines.push_back((deadline, key));
        None
    }

    /// Feeds the records of one copied batch (or a single record). Returns the spans completed.
    ///
    /// Cost matters here (every record of every traced transaction): records of tags we do not
    /// use are skipped on a table lookup, and the span a VXID belongs to is looked up once per
    /// run of records of the same VXID (a batch is one transaction).
    pub fn records<'a>(&mut self, records: impl Iterator<Item = Record<'a>>, out: &mut Vec<Box<SpanRecord>>) {
        let mut matched = false;
        let mut current: Option<(u64, Option<u64>)> = None;
        for r in records {
            let tag = self.tags.get(r.tag_number);
            if tag == Tag::Other {
                continue;
            }
            let key = match current {
                Some((vxid, key)) if vxid == r.vxid => key,
                _ => {
                    let key = self.index.get(&r.vxid).copied();
                    current = Some((r.vxid, key));
                    key
                }
            };
            let Some(key) = key else { continue };
            matched = true;
            self.stats.records += 1;
            if let Some(done) = self.apply(key, tag, &r) {
                out.push(done);
            }
            if tag == Tag::Link {
                current = None; // the chain may have grown
            }
        }
        if matched {
            self.stats.transactions_matched += 1;
        }
    }

    fn apply(&mut self, key: u64, tag: Tag, r: &Record<'_>) -> Option<Box<SpanRecord>> {
        let text = String::from_utf8_lossy(r.data);
        let mut fields = text.split_ascii_whitespace();
        let p = self.pending.get_mut(&key)?;
        let log = &mut p.log;
        match tag {
            Tag::Timestamp => {
                let label = fields.next()?.strip_suffix(':')?;
                let t = parse_abs(fields.next()?)?;
                if label == "Start" && log.start_ns.is_none() {
                    log.start_ns = Some(t);
                } else {
                    log.events.push((t, event_name(label)));
                }
                if is_end_label(label) {
                    log.end_ns = Some(t);
                }
                log.last_ts_ns = Some(t);
            }
            Tag::Link => {
                // "req 1009 restart" / "bereq 1035 retry": the same span goes on under a new VXID.
                let (kind, child, reason) = (fields.next()?, fields.next()?.parse::<u64>().ok()?, fields.next()?);
                let event = match (kind, reason) {
                    ("req", "restart") => "varnish.restart",
                    ("bereq", "retry") => "varnish.retry",
                    _ => return None, // a fetch or an ESI sub-request: a span of its own
                };
                if !p.chain.contains(&child) {
                    p.chain.push(child);
                }
                let at = log.last_ts_ns.unwrap_or_default();
                log.events.push((at, Cow::Borrowed(event)));
                if event == "varnish.retry" {
                    // The retry supersedes the failed attempt; its error stays visible as the event.
                    log.fetch_error = None;
                }
                self.index.insert(child, key);
            }
            Tag::RespStatus | Tag::BerespStatus => log.status = Some(fields.next()?.parse().ok()?),
            Tag::ReqAcct | Tag::BereqAcct => {
                let mut n = [0u64; 6];
                for v in &mut n {
                    *v = fields.next()?.parse().ok()?;
                }
                log.acct = Some(n);
            }
            Tag::Hit => log.hit_obj = Some(fields.next()?.parse().ok()?),
            Tag::FetchError => log.fetch_error = Some(text.trim().to_owned()),
            Tag::VclError => log.vcl_error = Some(text.trim().to_owned()),
            Tag::BackendOpen => {
                // "<fd> <backend> <remote addr> <remote port> <local addr> <local port> ..."
                let _fd = fields.next()?;
                let name = fields.next()?.to_owned();
                let addr = fields.next()?.to_owned();
                let port = fields.next()?.to_owned();
                log.peer = Some((name, addr, port));
            }
            Tag::End => {
                p.ended.push(r.vxid);
                if p.finished.as_ref().is_some_and(|(_, final_vxid, _)| *final_vxid == r.vxid) {
                    return self.complete(key);
                }
            }
            Tag::Begin | Tag::Other => {}
        }
        None
    }

    /// Merges the log's data into the finished record and forgets the span.
    fn complete(&mut self, key: u64) -> Option<Box<SpanRecord>> {
        let p = self.pending.remove(&key)?;
        for v in &p.chain {
            self.index.remove(v);
        }
        let (mut record, _, _) = p.finished?;
        let log = p.log;
        if let Some(t) = log.start_ns {
            record.start_unix_nano = t;
        }
        if let Some(t) = log.end_ns.or(log.last_ts_ns) {
            record.end_unix_nano = t.max(record.start_unix_nano);
        }
        // A fetch that failed (vcl_backend_error ran) got no response: the BerespStatus logged
        // then is the synthetic one VCL made, not something the backend sent.
        let fetch_failed = matches!(record.get("error.type"), Some(Value::Str(t)) if t == "fetch_failed");
        if let Some(status) = log.status.filter(|_| !fetch_failed) {
            record.set_http_status(status);
        }
        if let Some(a) = log.acct {
            // ReqAcct: req hdr, req body, req total, resp hdr, resp body, resp total;
            // BereqAcct: the same for the backend request and response.
            record.set("http.request.body.size", Value::Int(a[1] as i64));
            record.set("http.response.body.size", Value::Int(a[4] as i64));
        }
        if let Some(err) = log.fetch_error {
            record.status = StatusCode::Error;
            if record.get("error.type").is_none() {
                record.set("error.type", Value::Str("fetch_error".to_owned()));
            }
            record.status_message = Some(err);
        }
        if let Some(err) = log.vcl_error {
            // VCL_Error is also logged for problems VCL survives; it names the cause only of a
            // request that failed.
            if record.status == StatusCode::Error {
                record.set("error.type", Value::Str("vcl_error".to_owned()));
                record.status_message = Some(err);
            }
        }
        if let Some((name, addr, port)) = log.peer {
            record.set("varnish.backend", Value::Str(name));
            record.set("network.peer.address", Value::Str(addr));
            if let Ok(port) = port.parse::<i64>() {
                record.set("network.peer.port", Value::Int(port));
            }
        }
        if let Some(obj) = log.hit_obj {
            if let Some(&(trace_id, span_id)) = self.fetched.get(&obj) {
                record.links.push(Link { trace_id, span_id });
            }
        }
        if log.start_ns.is_some() {
            record.events =
                log.events.into_iter().map(|(t, n)| crate::span::Event { time_unix_nano: t, name: n }).collect();
        }
        record.closed_by = ClosedBy::Log;
        if record.kind == SpanKind::Client {
            self.remember_fetch(&p.chain, record.trace_id, record.span_id);
        }
        self.stats.closed_from_log += 1;
        Some(record)
    }

    fn remember_fetch(&mut self, chain: &[u64], trace_id: TraceId, span_id: SpanId) {
        for &v in chain {
            if self.fetched.insert(v, (trace_id, span_id)).is_none() {
                self.fetched_order.push_back(v);
            }
        }
        while self.fetched_order.len() > self.limits.fetches_remembered {
            if let Some(old) = self.fetched_order.pop_front() {
                self.fetched.remove(&old);
            }
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
            let due = self.pending.get(&key).and_then(|p| p.finished.as_ref()).is_some_and(|(_, _, d)| *d <= now);
            if !due {
                continue;
            }
            if let Some(p) = self.pending.remove(&key) {
                for v in &p.chain {
                    self.index.remove(v);
                }
                if let Some((record, _, _)) = p.finished {
                    self.stats.closed_by_backstop += 1;
                    out.push(backstop(record));
                }
            }
        }
        if self.last_age_scan.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return;
        }
        self.last_age_scan = Some(now);
        let max_age = self.limits.max_age;
        let old: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.finished.is_none() && now.duration_since(p.since) >= max_age)
            .map(|(k, _)| *k)
            .collect();
        for key in old {
            if let Some(p) = self.pending.remove(&key) {
                for v in &p.chain {
                    self.index.remove(v);
                }
                self.stats.abandoned += 1;
            }
        }
    }
}

/// A span closed from its task's data alone, marked so that a trace UI can tell.
fn backstop(mut record: Box<SpanRecord>) -> Box<SpanRecord> {
    record.closed_by = ClosedBy::TaskEnd;
    record.set("varnish.span.closed_by", Value::Str("backstop".to_owned()));
    record
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vsl::record::{encode, records};

    // Tag numbers of the synthetic log.
    const BEGIN: u8 = 1;
    const END: u8 = 2;
    const LINK: u8 = 3;
    const TS: u8 = 4;
    const REQACCT: u8 = 5;
    const BEREQACCT: u8 = 6;
    const RESPSTATUS: u8 = 7;
    const BERESPSTATUS: u8 = 8;
    const HIT: u8 = 9;
    const FETCHERROR: u8 = 10;
    const VCLERROR: u8 = 11;
    const BACKENDOPEN: u8 = 12;
    const OTHER: u8 = 13;

    fn tags() -> TagTable {
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

    fn limits() -> Limits {
        Limits {
            max_pending: 100,
            log_wait: Duration::from_secs(3),
            max_age: Duration::from_secs(60),
            fetches_remembered: 10,
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
        c.records(records(bytes), &mut out);
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
        assert_eq!(s.get("http.response.status_code"), Some(&Value::Int(304)));
        assert_eq!(s.get("http.response.body.size"), Some(&Value::Int(10)));
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
        assert_eq!(done.get("http.response.status_code"), Some(&Value::Int(200)));
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
        assert_eq!(done.get("error.type"), Some(&Value::Str("503".into())));
        assert_eq!(done.status_message, None, "the first attempt's error was superseded by the retry");
        assert_eq!(done.get("network.peer.address"), Some(&Value::Str("127.0.0.1".into())));
        assert_eq!(done.get("network.peer.port"), Some(&Value::Int(8080)));
        assert_eq!(done.get("varnish.backend"), Some(&Value::Str("s1".into())));
        assert_eq!(done.get("http.response.body.size"), Some(&Value::Int(7)));
        let names: Vec<&str> = done.events.iter().map(|e| e.name.as_ref()).collect();
        assert_eq!(names, ["Retry", "varnish.retry", "Start", "Bereq", "Beresp", "BerespBody"]);
    }

    #[test]
    fn a_fetch_error_without_response_sets_the_status_message() {
        let now = Instant::now();
        let mut c = Correlator::new(tags(), limits());
        c.track(1002, now);
        let mut r = task_record(SpanKind::Client, 1002, T0, T0 + 1, 0);
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
        assert_eq!(done.get("error.type"), Some(&Value::Str("fetch_failed".into())));
        assert_eq!(done.get("http.response.status_code"), None, "the 503 was made by vcl_backend_error");
        assert_eq!(done.end_unix_nano, 1_700_000_000_000_150_000);
    }

    #[test]
    fn a_hit_links_to_the_fetch_that_made_the_object() {
        let now = Instant::now();
        let mut c = Correlator::new(tags(), limits());
        c.track(1002, now);
        let fetch = task_record(SpanKind::Client, 1002, T0, T0 + 1, 200);
        let (fetch_trace, fetch_span) = (fetch.trace_id, fetch.span_id);
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
        assert_eq!(done.get("http.response.status_code"), Some(&Value::Int(418)));
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
        assert_eq!(done.get("error.type"), Some(&Value::Str("vcl_error".into())));
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
        assert_eq!(done.get("error.type"), None);
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
        assert_eq!(out[0].get("varnish.span.closed_by"), Some(&Value::Str("backstop".into())));
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
    fn fetch_memory_is_bounded() {
        let now = Instant::now();
        let mut c = Correlator::new(tags(), Limits { fetches_remembered: 3, ..limits() });
        for v in 1..=10u64 {
            c.track(v, now);
            c.finished(task_record(SpanKind::Client, v, T0, T0 + 1, 200), v, now);
            feed(&mut c, &batch(v, false, &[(END, "")]));
        }
        assert_eq!(c.fetched.len(), 3);
        assert!(c.fetched.contains_key(&10) && !c.fetched.contains_key(&1));
    }

    #[test]
    fn timestamps_parse_exactly() {
        assert_eq!(parse_abs("1700000000.000100"), Some(1_700_000_000_000_100_000));
        assert_eq!(parse_abs("1700000000.1"), Some(1_700_000_000_100_000_000));
        assert_eq!(parse_abs("1700000000"), None);
        assert_eq!(parse_abs("17x.1"), None);
        assert_eq!(parse_abs("1.-1"), None);
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
}
