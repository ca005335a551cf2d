//! A sampled span completed with the records its task logged, read from the task's own log
//! buffer on the worker when the task ends, rather than by the tailer from the shared log.
//!
//! Two uses (`Mode`):
//! - the default (`OPENTRACING_VSL=on`, `Mode::WhenWhole`): a span whose buffer holds its whole
//!   log closes here, and the tailer is told to stop following it; the others (below) are left
//!   to the tailer, which reads them in the shared log. Nothing is lost either way (the records
//!   not in the buffer at the fini, `ReqAcct`/`BereqAcct`, give only sizes the task knows too).
//! - `OPENTRACING_VSL=task` (`Mode::Always`): every sampled span closes here, and no tailer
//!   thread runs: cheaper at low sampling rates, since nothing steps through the shared log,
//!   but a span lacks what its buffer lacks (below).
//!
//! Why: the span no longer depends on the tailer keeping up with the log, or on the shared log
//! not being overwritten before the tailer reads it, and it is exported without waiting for the
//! tailer's next tick. In CPU, it cost the same as the tailer alone (callgrind, 100% of hits:
//! +0.2%; side by side within 0.5%, docs/performance-history.md): the parse moves to the worker (after
//! the response was sent); with the tailer told which spans to follow by a table rather than two
//! messages per span (`followed`), 0.6-1.0% less. `task` mode, without the tailer, cost about 1%
//! less CPU per sampled hit at 100% than the tailer alone and 0.3-0.5% less at 1%, where the
//! tailer's steps through every transaction of the log are what it saves.
//!
//! What the buffer holds: Varnish keeps a task's records in a buffer of its own (`vsl_buffer`,
//! 16 KB by default) and writes them to the shared log when the transaction ends, after the
//! PRIV_TASK fini we run in: so at the fini, every record but the last few: `ReqAcct`/`BereqAcct`
//! (whose body sizes the task's data gives anyway), a fetch's `Length` (not used) and `End`
//! (not needed: the span's end is its last timestamp's). What it does not hold:
//! - the records of a transaction before a restart or a retry (Varnish writes them out when the
//!   transaction ID changes): their timestamps and errors;
//! - records written out early because the buffer filled up (a transaction with very large
//!   headers, or VCL logging a lot).
//!
//! A span is "whole" when neither happened: its final transaction is its first, and the buffer
//! starts with that transaction's `Begin`. In `task` mode the others still close here, with
//! their task's times, status and sizes, marked `varnish.span.log=partial` and counted
//! (`vsl_task_log_partial`). A hit's link to the fetch that stored its object comes from
//! `fetch_links` in both modes.
//!
//! Threading: runs on the worker thread ending the task; each thread has its own reader
//! (`correlate::OneTransaction`, thread-local), which holds nothing of a span between two calls.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

use super::correlate::OneTransaction;
use super::fetch_links::{self, FetchLinks};
use super::ffi;
use super::record::{self, TagTable};
use super::tailer;
use crate::pipeline::{self, STATS};
use crate::span::{SpanRecord, Value};

/// Which spans close from their task's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// None (`OPENTRACING_VSL=off`: no log records at all).
    Never = 0,
    /// Those whose buffer holds their whole log; the tailer reads the others' (the default).
    WhenWhole = 1,
    /// All of them (`OPENTRACING_VSL=task`: no tailer).
    Always = 2,
}

/// The `Mode` (set with the pipeline's settings, read at every sampled task's end).
static MODE: AtomicU8 = AtomicU8::new(Mode::Never as u8);

pub fn set_mode(mode: Mode) {
    MODE.store(mode as u8, Relaxed);
}

fn mode() -> Mode {
    match MODE.load(Relaxed) {
        1 => Mode::WhenWhole,
        2 => Mode::Always,
        _ => Mode::Never,
    }
}

/// What one thread keeps for reuse between calls.
struct Local {
    reader: OneTransaction,
    begin_tag: u8,
}

impl Local {
    fn new(tags: TagTable, begin_tag: u8, links: FetchLinks) -> Local {
        Local { reader: OneTransaction::new(tags, links), begin_tag }
    }
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
}

/// A thread's `Local`, made at its first use (Varnish's tag numbers are known by then).
fn new_local() -> Local {
    Local::new(TagTable::new(ffi::tag_number), begin_tag().unwrap_or(0), fetch_links::GLOBAL)
}

/// Closes the sampled span `record`, whose task ended as transaction `final_vxid` with the
/// records in `buffer` (the task's own, `ffi::task_records`), and hands it to the exporter, if
/// the mode says so; gives it back otherwise (to be closed by the tailer, or from its task's
/// data alone).
pub fn close(buffer: &[u8], record: Box<SpanRecord>, final_vxid: u64) -> Option<Box<SpanRecord>> {
    let mode = mode();
    if mode == Mode::Never {
        return Some(record);
    }
    let mut record = Some(record);
    let _ = LOCAL.try_with(|cell| {
        if let Ok(mut local) = cell.try_borrow_mut() {
            let local = local.get_or_insert_with(new_local);
            let Some(mut r) = record.take_if(|r| mode == Mode::Always || whole(local, buffer, r.vxid, final_vxid))
            else {
                return;
            };
            if mode == Mode::WhenWhole {
                // Before the transaction's records reach the shared log (Varnish writes them out
                // after this fini): the tailer need not read them.
                tailer::forget(r.vxid);
            } else if !whole(local, buffer, r.vxid, final_vxid) {
                // Said in the span too, so that a trace view tells why its timing breakdown
                // starts late or has gaps.
                r.set("varnish.span.log", Value::Str("partial".into()));
                STATS.vsl_task_log_partial.fetch_add(1, Relaxed);
            }
            local.reader.complete(buffer, final_vxid, &mut r);
            STATS.vsl_closed_from_task_log.fetch_add(1, Relaxed);
            pipeline::submit(r);
        }
    });
    // Still here: the mode leaves it to the tailer, or the thread's storage is gone (its exit)
    // or in use (a re-entrant call; neither is expected in a fini): the tailer, or the task's
    // data, closes it.
    record
}

/// Whether the running task's log has gone to the shared log in part already, in the default
/// mode: its buffer does not start with its transaction's `Begin` (a full buffer was written
/// out), or its transaction is not the span's first (a restart or a retry). Where the tailer
/// reads such a span's log, it must be reading it (`tailer::log_needed`). A few dozen
/// instructions: the buffer's first record.
///
/// # Safety
/// `vsl` must be NULL or the `vsl_log` of the task running on this thread, during a VCL call.
pub unsafe fn written_out_early(vsl: *const varnish::ffi::vsl_log, first_vxid: u64) -> bool {
    if mode() != Mode::WhenWhole || vsl.is_null() {
        return false;
    }
    let Some(begin) = begin_tag() else { return false };
    !whole_with(begin, ffi::task_records(vsl), first_vxid, crate::varnish::vxid_of(vsl))
}

/// Varnish's number for the `Begin` tag, looked up once.
fn begin_tag() -> Option<u8> {
    static BEGIN: std::sync::OnceLock<Option<u8>> = std::sync::OnceLock::new();
    *BEGIN.get_or_init(|| ffi::tag_number(c"Begin"))
}

/// Whether `buffer` holds the whole log of the span whose first transaction is `first_vxid`:
/// one transaction (no restart or retry) whose records start with its `Begin` (none written
/// out early).
fn whole(local: &Local, buffer: &[u8], first_vxid: u64, final_vxid: u64) -> bool {
    whole_with(local.begin_tag, buffer, first_vxid, final_vxid)
}

/// `whole`, with Varnish's number for the `Begin` tag.
fn whole_with(begin_tag: u8, buffer: &[u8], first_vxid: u64, final_vxid: u64) -> bool {
    first_vxid == final_vxid
        && record::records(buffer).next().is_some_and(|r| r.tag_number == begin_tag && r.vxid == final_vxid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{SpanId, TraceId};
    use crate::span::Link;
    use crate::span::{ClosedBy, SpanKind};
    use crate::vsl::correlate::synthetic::{tags, BEGIN, HIT, OTHER, RESPSTATUS, TS, VCLERROR};
    use crate::vsl::record::encode;

    fn local() -> Local {
        Local::new(tags(), BEGIN, FetchLinks::leaked(16))
    }

    /// What `close` does with a span it closes here.
    fn complete(l: &mut Local, buffer: &[u8], mut record: Box<SpanRecord>, final_vxid: u64) -> Box<SpanRecord> {
        l.reader.complete(buffer, final_vxid, &mut record);
        record
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
        let buf = buffer(1001, "req 1000 rxreq", "404");
        assert!(whole(&l, &buf, 1001, 1001));
        let span = complete(&mut l, &buf, task_record(1001), 1001);
        assert_eq!(span.closed_by, ClosedBy::Log);
        // Start and end from the log's timestamps, the status the client got from RespStatus.
        assert_eq!(span.start_unix_nano, 1_700_000_000_000_100_000);
        assert_eq!(span.end_unix_nano, 1_700_000_000_000_350_000);
        assert_eq!(span.outcome.status_code, Some(404));
        assert_eq!(event_names(&span), ["Req", "Process", "Resp"]);
    }

    #[test]
    fn a_hit_links_to_the_fetch_that_stored_its_object() {
        let links = FetchLinks::leaked(16);
        let mut l = Local::new(tags(), BEGIN, links);
        let (fetch_trace, fetch_span) = (TraceId([9; 16]), SpanId([8; 8]));
        // As the fetch's `trace_backend` announced it, on another worker.
        assert!(links.remember(1002, fetch_trace, fetch_span));
        let mut buf = buffer(1005, "req 1004 rxreq", "200");
        encode(&mut buf, HIT, 1005, true, b"1002 119.993 10.000 0.000");
        assert!(whole(&l, &buf, 1005, 1005));
        let span = complete(&mut l, &buf, task_record(1005), 1005);
        assert_eq!(span.links, vec![Link { trace_id: fetch_trace, span_id: fetch_span }]);
        // A hit on an object whose fetch is not known (unsampled, or forgotten): no link.
        let mut buf = buffer(1007, "req 1006 rxreq", "200");
        encode(&mut buf, HIT, 1007, true, b"1003 119.993 10.000 0.000");
        assert!(complete(&mut l, &buf, task_record(1007), 1007).links.is_empty());
    }

    #[test]
    fn after_a_restart_the_span_closes_with_the_last_transactions_records() {
        // The task started as 1001, restarted as 1003: the buffer holds only 1003's records.
        let mut l = local();
        // Partial: the records of 1001, with its `Link`, were written out at the restart.
        let mut record = task_record(1001);
        record.add_event(1_700_000_000_000_170_000, "varnish.restart");
        let buf = buffer(1003, "req 1001 restart", "200");
        assert!(!whole(&l, &buf, 1001, 1003));
        let span = complete(&mut l, &buf, record, 1003);
        assert_eq!(span.closed_by, ClosedBy::Log);
        assert_eq!(span.end_unix_nano, 1_700_000_000_000_350_000);
        // The log's events, and the restart the task recorded (the log's `Link` is not here).
        assert_eq!(event_names(&span), ["Req", "varnish.restart", "Process", "Resp"]);
    }

    #[test]
    fn an_empty_buffer_still_closes_the_span_with_its_task_data() {
        // Everything written out early (a full buffer): nothing read but the task's own data.
        let mut l = local();
        assert!(!whole(&l, &[], 1001, 1001), "partial");
        let span = complete(&mut l, &[], task_record(1001), 1001);
        assert_eq!(span.start_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(span.end_unix_nano, 1_700_000_001_000_000_000);
        assert_eq!(span.outcome.status_code, Some(200));
        assert!(span.events.is_empty());
    }

    #[test]
    fn nothing_of_one_span_is_left_for_the_next() {
        let links = FetchLinks::leaked(16);
        assert!(links.remember(1002, TraceId([9; 16]), SpanId([8; 8])));
        let mut l = Local::new(tags(), BEGIN, links);
        for i in 0..1_000u64 {
            let vxid = 2_000 + i * 2;
            let marked = i % 2 == 0;
            let mut buf = buffer(vxid, "req 1 rxreq", if marked { "503" } else { "200" });
            if marked {
                // A hit on a known fetch's object, and a VCL error: every kind of data kept.
                encode(&mut buf, HIT, vxid, true, b"1002 119.993 10.000 0.000");
                encode(&mut buf, VCLERROR, vxid, true, b"an error");
                encode(&mut buf, TS, vxid, true, b"Extra: 1700000000.000400 0.000300 0.000050");
            }
            let mut record = task_record(vxid);
            if marked {
                record.status = crate::span::StatusCode::Error;
            }
            let span = complete(&mut l, &buf, record, vxid);
            assert_eq!(span.links.len(), usize::from(marked), "call {i}");
            assert_eq!(span.status_message.is_some(), marked, "call {i}");
            assert_eq!(span.outcome.status_code, Some(if marked { 503 } else { 200 }), "call {i}");
            let expected: &[&str] =
                if marked { &["Req", "Process", "Resp", "Extra"] } else { &["Req", "Process", "Resp"] };
            assert_eq!(event_names(&span), expected, "call {i}");
            // The end is the response's time (`Resp`), not the last timestamp's.
            assert_eq!(span.end_unix_nano, 1_700_000_000_000_350_000, "call {i}");
        }
    }

    #[test]
    fn records_of_another_transaction_are_not_the_spans() {
        let mut l = local();
        let mut buf = buffer(1001, "req 1000 rxreq", "200");
        encode(&mut buf, RESPSTATUS, 1009, true, b"500");
        encode(&mut buf, TS, 1009, true, b"Resp: 1700000009.000000 0.000000 0.000000");
        let span = complete(&mut l, &buf, task_record(1001), 1001);
        assert_eq!(span.outcome.status_code, Some(200));
        assert_eq!(span.end_unix_nano, 1_700_000_000_000_350_000);
        assert_eq!(event_names(&span), ["Req", "Process", "Resp"]);
    }
}
