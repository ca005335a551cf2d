//! Span records are reused. The exporter thread gives each record back once it is encoded into
//! its batch (or dropped), emptied but with the room of its attribute, event and link arrays kept; the next span a
//! Varnish worker starts takes one. The tailer's per-span event array trades places with the
//! record's (`correlate`), so in the steady state a sampled span allocates nothing.
//!
//! Why: without it each sampled span cost four allocations (the record, its attributes on the
//! worker; its events and links on the tailer) and four frees on the exporter thread, about
//! 1,000 instructions per span (callgrind). A free of memory another thread allocated also takes
//! that thread's glibc arena lock, so the exporter's frees contended with the workers' mallocs.
//!
//! Bounded: at most `POOLED` records wait here; one given back to a full pool is freed, and so is
//! one whose arrays grew beyond the usual sizes (a span with hundreds of VCL attributes), so the
//! pool never holds more than about `POOLED` × 3 KB. `close` empties it when the pipeline stops,
//! before the library may be unloaded, and keeps it empty until `open`: an exporter thread that
//! did not stop in time (a slow collector) frees what it gives back instead of pooling it.
//!
//! Last in, first out: the record a span takes is the one given back last, whose memory the
//! exporter has just read and which is still in the CPU's caches. A first-in-first-out queue (as
//! before) handed out the record given back longest ago, so every pooled record's memory went
//! through the caches in turn, and the span start's writes missed them.
//!
//! Threading: any thread. A short lock (a `Vec` push or pop under a `parking_lot` mutex, never
//! held across anything else), taken once per span start and once per give.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::ids::{SpanId, TraceId};
use crate::span::{SpanKind, SpanRecord};

/// Records kept for reuse: enough for the spans between two exporter ticks at high rates (the
/// tailer and the exporter each hold records for a tick or two: the log's delay, then the
/// encoding), and for a burst.
pub const POOLED: usize = 1024;
/// Array sizes above which a record is freed rather than kept (twice the usual reservations).
const MAX_ATTRIBUTES_KEPT: usize = 64;
const MAX_EVENTS_KEPT: usize = 32;
const MAX_LINKS_KEPT: usize = 8;
/// Bytes of encoded attributes above which a record is freed (four times the usual room).
const MAX_ENCODED_KEPT: usize = 2048;

static POOL: Stack = Stack::new();

/// Records, the last given back on top. Its room (`POOLED`) is reserved at the first push, so a
/// push never reallocates under the lock. Boxes, because records travel between threads as
/// boxes: taking and giving move a pointer, not the record.
#[allow(clippy::vec_box)]
struct Stack(Mutex<Vec<Box<SpanRecord>>>);

impl Stack {
    const fn new() -> Stack {
        Stack(Mutex::new(Vec::new()))
    }

    /// The record given back last, if any.
    fn pop(&self) -> Option<Box<SpanRecord>> {
        self.0.lock().pop()
    }

    /// Keeps `r` on top; hands it back when `POOLED` records are kept already.
    fn push(&self, r: Box<SpanRecord>) -> Result<(), Box<SpanRecord>> {
        let mut records = self.0.lock();
        if records.len() >= POOLED {
            return Err(r);
        }
        if records.capacity() == 0 {
            records.reserve_exact(POOLED);
        }
        records.push(r);
        Ok(())
    }

    /// Frees every record (outside the lock).
    fn clear(&self) {
        let records = std::mem::take(&mut *self.0.lock());
        drop(records);
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.0.lock().is_empty()
    }
}

/// Set while no pipeline runs (`close`): records given back are freed.
static CLOSED: AtomicBool = AtomicBool::new(false);
/// Records allocated because the pool was empty (varnishstat `span_records_allocated`). Counted
/// on the slow path only: a record taken from the pool touches no shared counter.
static ALLOCATED: AtomicU64 = AtomicU64::new(0);

/// A new record, as `SpanRecord::new` makes it: a reused one when the pool has one.
pub fn record(kind: SpanKind, trace_id: TraceId, span_id: SpanId, parent: Option<SpanId>) -> Box<SpanRecord> {
    match POOL.pop() {
        Some(mut r) => {
            // Emptied by `give`: only what `new` takes differs.
            r.kind = kind;
            r.trace_id = trace_id;
            r.span_id = span_id;
            r.parent_span_id = parent;
            r
        }
        None => {
            ALLOCATED.fetch_add(1, Ordering::Relaxed);
            Box::new(SpanRecord::new(kind, trace_id, span_id, parent))
        }
    }
}

/// How many records were allocated because the pool was empty, since the process started. In
/// the steady state it stays still: the exporter gives each record back once it is encoded.
/// When it climbs with the traffic, records are not coming back in time (an exporter or a
/// tailer falling behind), and each span start pays an allocation (a few hundred instructions).
pub fn allocated() -> u64 {
    ALLOCATED.load(Ordering::Relaxed)
}

/// Takes back a record whose span was encoded for export or dropped (the exporter thread).
pub fn give(r: Box<SpanRecord>) {
    keep(r);
}

/// `give`, answering whether the record was pooled (false: it was freed).
fn keep(mut r: Box<SpanRecord>) -> bool {
    if CLOSED.load(Ordering::Relaxed) || !worth_keeping(&r) {
        return false;
    }
    r.clear_for_reuse();
    // A full pool: this one is freed. A `close` between the check above and the push: the
    // check again (sequentially consistent with `close`'s store) sees it and empties the pool.
    // (A full pool hands the record back: dropped here, outside the lock.)
    let pooled = POOL.push(r).is_ok();
    if pooled && CLOSED.load(Ordering::SeqCst) {
        drain();
        return false;
    }
    pooled
}

/// Whether the record's arrays are of the usual sizes (the pool's memory stays bounded).
fn worth_keeping(r: &SpanRecord) -> bool {
    r.attributes.capacity() <= MAX_ATTRIBUTES_KEPT
        && r.encoded.capacity() <= MAX_ENCODED_KEPT
        && r.events.capacity() <= MAX_EVENTS_KEPT
        && r.links.capacity() <= MAX_LINKS_KEPT
}

/// Frees every pooled record, and every record given back until `open` (the pipeline stopped:
/// the library may be unloaded next, and a static's contents are never freed). CLI thread.
pub fn close() {
    CLOSED.store(true, Ordering::SeqCst);
    drain();
}

/// Records are pooled again (a pipeline starts). CLI thread.
pub fn open() {
    CLOSED.store(false, Ordering::SeqCst);
}

fn drain() {
    POOL.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::{Value, ValueRef};

    fn used_record() -> Box<SpanRecord> {
        let mut r = Box::new(SpanRecord::new(SpanKind::Client, TraceId([1; 16]), SpanId([2; 8]), Some(SpanId([3; 8]))));
        r.tracestate = Some("a=b".to_owned());
        r.name = "GET".into();
        r.start_unix_nano = 5;
        r.end_unix_nano = 9;
        r.add("url.path", ValueRef::Str("/a/path/longer/than/twenty-four/bytes"));
        r.add_event(7, "e".to_owned());
        r.add_link(TraceId([4; 16]), SpanId([5; 8]));
        r.set_http_status(503);
        r.status_message = Some("m".to_owned());
        r.vxid = 12;
        r.outcome.vxid = Some(14);
        // Every other field away from its new value too (`clear_for_reuse` resets field by field).
        r.parent_is_remote = true;
        r.flags = 3;
        r.dropped_attributes = 2;
        r.closed_by = crate::span::ClosedBy::Log;
        // Shadows the outcome (an integer where the outcome takes a string).
        r.set("error.type", Value::Int(1));
        r
    }

    // The pool is one per process. Under `cargo test` (one process, tests on parallel threads)
    // the exporter's tests give records to it and the span tests take them, so these tests check
    // what they took and what `keep` answered, never how many records the pool holds.

    #[test]
    fn a_record_given_back_is_emptied_and_keeps_its_room() {
        let mut emptied = used_record();
        emptied.seal(); // as the exporter leaves it
        let room = (emptied.attributes.capacity(), emptied.events.capacity(), emptied.links.capacity());
        emptied.clear_for_reuse();
        let fresh = SpanRecord::new(SpanKind::Internal, TraceId([0; 16]), SpanId([0; 8]), None);
        assert_eq!(*emptied, fresh, "emptied like a new record");
        assert_eq!((emptied.attributes.capacity(), emptied.events.capacity(), emptied.links.capacity()), room);
    }

    #[test]
    fn a_reused_record_is_what_new_makes() {
        give(used_record());
        // Whichever record the pool hands out (this one, or another test's), it is a new one.
        for _ in 0..3 {
            let r = record(SpanKind::Server, TraceId([8; 16]), SpanId([9; 8]), None);
            assert_eq!(*r, SpanRecord::new(SpanKind::Server, TraceId([8; 16]), SpanId([9; 8]), None));
        }
    }

    #[test]
    fn a_closed_pool_is_emptied_and_frees_what_it_is_given_until_opened() {
        assert!(keep(used_record()), "pooled while open");
        close();
        // Nothing else opens the pool (only a pipeline's start does), so the emptied pool stays
        // empty: what the other tests give back meanwhile is freed.
        assert!(POOL.is_empty(), "emptied when closed");
        assert!(!keep(used_record()), "freed, not pooled, while closed");
        assert!(POOL.is_empty());
        open();
        assert!(keep(used_record()), "pooled again once open");
    }

    #[test]
    fn the_record_given_back_last_is_taken_first_and_a_full_stack_refuses() {
        // A stack of its own: the process-wide pool is shared with the other tests' threads.
        let stack = Stack::new();
        for vxid in 0..POOLED as u64 {
            let mut r = used_record();
            r.vxid = vxid;
            assert!(stack.push(r).is_ok());
        }
        let mut extra = used_record();
        extra.vxid = u64::MAX;
        let refused = stack.push(extra).expect_err("full: the record comes back");
        assert_eq!(refused.vxid, u64::MAX);
        // Last in, first out: the memory the exporter touched last is reused first.
        for vxid in (0..POOLED as u64).rev() {
            assert_eq!(stack.pop().map(|r| r.vxid), Some(vxid));
        }
        assert!(stack.pop().is_none() && stack.is_empty());
        let mut r = used_record();
        r.vxid = 7;
        assert!(stack.push(r).is_ok());
        stack.clear();
        assert!(stack.is_empty());
    }

    #[test]
    fn a_record_with_grown_arrays_is_not_kept() {
        assert!(worth_keeping(&used_record()));
        for grow in [
            |r: &mut SpanRecord| r.attributes.reserve_exact(MAX_ATTRIBUTES_KEPT + 1),
            |r: &mut SpanRecord| r.events.reserve_exact(MAX_EVENTS_KEPT + 1),
            |r: &mut SpanRecord| r.links.reserve_exact(MAX_LINKS_KEPT + 1),
        ] {
            let mut r = used_record();
            grow(&mut r);
            assert!(!worth_keeping(&r));
        }
    }
}
