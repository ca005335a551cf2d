//! `OPENTRACING_VSL=task`: a sampled span closes with the records its task logged, read from the
//! task's own log buffer on the worker, when the task ends; no tailer thread.
//!
//! Why: the tailer (`tailer`) steps through every transaction in the shared log to find the
//! traced ones, and each traced one costs a copy out of shared memory, messages between threads
//! and the tailer's wake-ups. Side by side on one CPU (docs/performance.md, "What the 1% costs"),
//! this mode cost about 1% less CPU per hit than the tailer at 100% sampling (about 860
//! instructions per sampled hit less in all, callgrind), and 0.3-0.5% less at 1%.
//!
//! What the buffer holds: Varnish keeps a task's records in a buffer of its own (`vsl_buffer`,
//! 16 KB by default) and writes them to the shared log when the transaction ends, after the
//! PRIV_TASK fini we run in: so at the fini, every record but the last two, `ReqAcct`/`BereqAcct`
//! (whose body sizes the task's data gives anyway) and `End` (added here). What it does not hold,
//! and the span therefore lacks in this mode (it still closes, with its task's times, status and
//! sizes):
//! - the records of a transaction before a restart or a retry (Varnish writes them out when the
//!   transaction ID changes): their timestamps and errors;
//! - records written out early because the buffer filled up (a transaction with very large
//!   headers, or VCL logging a lot);
//! - links from a hit to the span of the fetch that stored its object: that needs the other
//!   transaction's log, which only the tailer sees.
//!
//! The first two are counted (`vsl_task_log_partial`): a span whose final transaction is not its
//! first, or whose buffer does not start with the transaction's `Begin`.
//!
//! Threading: runs on the worker thread ending the task; each thread has its own correlator
//! (thread-local), which holds nothing between two calls.

use std::cell::RefCell;
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use super::correlate::{Correlator, Limits};
use super::ffi;
use super::record::{self, TagTable};
use crate::pipeline::{self, STATS};
use crate::span::SpanRecord;

/// Whether sampled spans close from their task's buffer (set with the pipeline's settings).
static ENABLED: AtomicBool = AtomicBool::new(false);

pub fn set_enabled(on: bool) {
    ENABLED.store(on, Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

/// What one thread keeps for reuse between calls: the correlator (empty between calls) and
/// the buffers.
struct Local {
    correlator: Correlator,
    end_record: Vec<u8>,
    /// Spans completed by the call, as the correlator hands them out.
    #[allow(clippy::vec_box)]
    done: Vec<Box<SpanRecord>>,
    begin_tag: u8,
    end_tag: u8,
}

impl Local {
    fn new(tags: TagTable, begin_tag: u8, end_tag: u8) -> Local {
        // One span at a time (a chain of transactions at most); no fetches to remember: their
        // hits are other tasks'.
        let limits = Limits { max_pending: 8, fetches_remembered: 0, ..Limits::default() };
        Local {
            correlator: Correlator::new(tags, limits),
            end_record: Vec::new(),
            done: Vec::new(),
            begin_tag,
            end_tag,
        }
    }
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
}

/// Closes the sampled span `record`, whose task ended as transaction `final_vxid` with the
/// records in `buffer` (the task's own, `ffi::task_records`), and hands it to the exporter.
/// `client`: a client task (a request), not a backend fetch.
pub fn close(buffer: &[u8], client: bool, record: Box<SpanRecord>, final_vxid: u64) {
    let mut record = Some(record);
    let _ = LOCAL.try_with(|cell| {
        if let Ok(mut local) = cell.try_borrow_mut() {
            let local = local.get_or_insert_with(|| {
                let tag = |name: &CStr| ffi::tag_number(name).unwrap_or(0);
                Local::new(TagTable::new(ffi::tag_number), tag(c"Begin"), tag(c"End"))
            });
            if let Some(record) = record.take() {
                if !complete(local, buffer, client, record, final_vxid) {
                    STATS.vsl_task_log_partial.fetch_add(1, Relaxed);
                }
                STATS.vsl_closed_from_task_log.fetch_add(local.done.len() as u64, Relaxed);
                pipeline::submit_all(local.done.drain(..));
            }
        }
    });
    // Not taken: the thread's storage is gone (its exit) or in use (a re-entrant call); neither
    // is expected in a fini. The span closes from its task's data.
    if let Some(record) = record {
        pipeline::submit(record);
    }
}

/// Completes the span into `local.done`, leaving the correlator empty. Returns whether the
/// buffer held the whole of the span's log: one transaction (no restart or retry) whose records
/// start with its `Begin` (none written out early).
fn complete(local: &mut Local, buffer: &[u8], client: bool, record: Box<SpanRecord>, final_vxid: u64) -> bool {
    let whole = record.vxid == final_vxid
        && record::records(buffer).next().is_some_and(|r| r.tag_number == local.begin_tag && r.vxid == final_vxid);
    let now = Instant::now();
    let c = &mut local.correlator;
    // The span first, then its records: `finished` adds the final transaction to the span's
    // chain (after a restart or a retry it is not the first), so that the records, which are all
    // the final transaction's, are the span's; the `End` below then completes it.
    c.track(record.vxid, now);
    if let Some(done) = c.finished(record, final_vxid, now) {
        local.done.push(done); // not tracked (cannot happen with one span at a time)
    }
    c.records(buffer, &mut local.done);
    local.end_record.clear();
    record::encode(&mut local.end_record, local.end_tag, final_vxid, client, b"");
    c.records(&local.end_record, &mut local.done);
    // `finished` queued a deadline for the span; it is past use now. A span still waiting (its
    // final transaction's `End` did not complete it: not expected) closes from its task's data.
    c.expire(now + Duration::from_secs(365 * 24 * 3600), &mut local.done);
    whole
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{SpanId, TraceId};
    use crate::span::{ClosedBy, SpanKind};
    use crate::vsl::correlate::synthetic::{tags, BEGIN, END, OTHER, RESPSTATUS, TS};
    use crate::vsl::record::encode;

    fn local() -> Local {
        Local::new(tags(), BEGIN, END)
    }

    /// A task's buffer at its fini: its records so far, no `ReqAcct`, no `End`.
    fn buffer(vxid: u64, begin: &str, status: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for (tag, payload) in [
            (BEGIN, begin),
            (TS, "Start: 1700000000.000100 0.000000 0.000000"),
            (TS, "Req: 1700000000.000150 0.000050 0.000050"),
            (OTHER, "ReqURL /x"),
            (RESPSTATUS, status),
            (TS, "Process: 1700000000.000200 0.000100 0.000050"),
            (TS, "Resp: 1700000000.000350 0.000250 0.000150"),
        ] {
            encode(&mut out, tag, vxid, true, payload.as_bytes());
        }
        out
    }

    fn task_record(first_vxid: u64) -> Box<SpanRecord> {
        let mut r = SpanRecord::new(SpanKind::Server, TraceId([1; 16]), SpanId([3; 8]), None);
        r.vxid = first_vxid;
        r.start_unix_nano = 1_700_000_000_000_000_000;
        r.end_unix_nano = 1_700_000_001_000_000_000;
        r.set_http_status(200);
        Box::new(r)
    }

    fn event_names(r: &SpanRecord) -> Vec<String> {
        r.events.iter().map(|e| e.name.to_string()).collect()
    }

    #[test]
    fn a_span_closes_with_its_buffers_records() {
        let mut l = local();
        assert!(complete(&mut l, &buffer(1001, "req 1000 rxreq", "404"), true, task_record(1001), 1001), "whole");
        assert_eq!(l.done.len(), 1);
        let span = l.done.pop().unwrap();
        assert_eq!(span.closed_by, ClosedBy::Log);
        // Start and end from the log's timestamps, the status the client got from RespStatus.
        assert_eq!(span.start_unix_nano, 1_700_000_000_000_100_000);
        assert_eq!(span.end_unix_nano, 1_700_000_000_000_350_000);
        assert_eq!(span.outcome.status_code, Some(404));
        assert_eq!(event_names(&span), ["Req", "Process", "Resp"]);
        assert_eq!(l.correlator.pending(), 0);
    }

    #[test]
    fn after_a_restart_the_span_closes_with_the_last_transactions_records() {
        // The task started as 1001, restarted as 1003: the buffer holds only 1003's records.
        let mut l = local();
        // Partial: the records of 1001, with its `Link`, were written out at the restart.
        let mut record = task_record(1001);
        record.add_event(1_700_000_000_000_170_000, "varnish.restart");
        assert!(!complete(&mut l, &buffer(1003, "req 1001 restart", "200"), true, record, 1003));
        assert_eq!(l.done.len(), 1);
        let span = l.done.pop().unwrap();
        assert_eq!(span.closed_by, ClosedBy::Log);
        assert_eq!(span.end_unix_nano, 1_700_000_000_000_350_000);
        // The log's events, and the restart the task recorded (the log's `Link` is not here).
        assert_eq!(event_names(&span), ["Req", "varnish.restart", "Process", "Resp"]);
        assert_eq!(l.correlator.pending(), 0);
    }

    #[test]
    fn an_empty_buffer_still_closes_the_span_with_its_task_data() {
        // Everything written out early (a full buffer): nothing but the End added here.
        let mut l = local();
        assert!(!complete(&mut l, &[], true, task_record(1001), 1001), "partial");
        assert_eq!(l.done.len(), 1);
        let span = l.done.pop().unwrap();
        assert_eq!(span.start_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(span.end_unix_nano, 1_700_000_001_000_000_000);
        assert_eq!(span.outcome.status_code, Some(200));
        assert!(span.events.is_empty());
    }

    #[test]
    fn the_correlator_keeps_nothing_between_calls() {
        let mut l = local();
        for i in 0..1_000u64 {
            let (first, last) = if i % 2 == 0 { (i * 4, i * 4) } else { (i * 4, i * 4 + 2) };
            assert_eq!(
                complete(&mut l, &buffer(last, "req 1 rxreq", "200"), true, task_record(first), last),
                first == last
            );
            assert_eq!(l.done.len(), 1, "call {i}");
            l.done.clear();
        }
        assert_eq!(l.correlator.pending(), 0);
        assert_eq!(l.correlator.deadlines_queued(), 0);
    }
}
