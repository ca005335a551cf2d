//! Which span fetched an object: a backend fetch's VXID to its span's IDs, so that a hit's span
//! can link to the span of the fetch that stored its object (the log's `Hit` record names that
//! fetch's VXID).
//!
//! Written by the worker threads: a cacheable, sampled fetch when it starts (`trace_backend`:
//! a hit may come while the object is still streaming in), and again under its new VXID at a
//! retry and at its end after one (a retry takes a new VXID, and the object records the one that
//! stored it). Read by whoever completes a hit's span: the tailer thread, or the worker ending the hit
//! when the span closes from its task's own log buffer (`task_log`). Shared rather than the
//! tailer's own map (as it was) because of that second reader: it must find the fetch without
//! asking the tailer.
//!
//! A fixed table, no lock, no allocation: slot = VXID modulo the table's size (a power of two),
//! each slot a sequence lock over atomics (a reader that overlaps a write sees a changed sequence
//! number and takes no link; two writers of one slot at once: the second gives up). A slot keeps
//! the latest fetch whose VXID falls on it. Varnish hands each worker thread blocks of 32,768
//! VXIDs, in increasing order within a block, and blocks whose numbers differ by a multiple of
//! `SLOTS / 32,768` share slots: a fetch stays findable until a later fetch falls on its slot,
//! on average after about `SLOTS` more VXIDs (sooner when two busy workers' blocks share slots):
//! in a workload of misses (three VXIDs a request: the session, the request, the fetch) the last
//! 40,000 fetches or so on average, and far longer where fetches are rare (a hit-heavy cache,
//! where links matter). A hit whose fetch was forgotten simply has no link (never another's: a
//! slot is read only under its own VXID). Memory: `SLOTS` x 40 bytes (5 MiB of
//! zero pages, touched as slots are first written).

use std::sync::atomic::{fence, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};

use crate::ids::{SpanId, TraceId};

/// The process-wide table's slots (a power of two).
const SLOTS: usize = 1 << 17;

pub struct Slot {
    /// Even: stable; odd: a write in progress. 0: never written.
    seq: AtomicU64,
    vxid: AtomicU64,
    trace_id: [AtomicU64; 2],
    span_id: AtomicU64,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            seq: AtomicU64::new(0),
            vxid: AtomicU64::new(0),
            trace_id: [AtomicU64::new(0), AtomicU64::new(0)],
            span_id: AtomicU64::new(0),
        }
    }
}

/// A table of fetches (`GLOBAL` in varnishd; tests make their own).
#[derive(Clone, Copy)]
pub struct FetchLinks {
    slots: &'static [Slot],
}

static GLOBAL_SLOTS: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];

/// The table every thread of the process uses.
pub static GLOBAL: FetchLinks = FetchLinks { slots: &GLOBAL_SLOTS };

impl std::fmt::Debug for FetchLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FetchLinks({} slots)", self.slots.len())
    }
}

impl FetchLinks {
    /// A table of its own with `slots` slots (rounded up to a power of two), for tests and tools:
    /// its memory is leaked.
    pub fn leaked(slots: usize) -> FetchLinks {
        let n = slots.max(1).next_power_of_two();
        FetchLinks { slots: Vec::from_iter((0..n).map(|_| Slot::new())).leak() }
    }

    fn slot(&self, vxid: u64) -> &Slot {
        // Neighbours, and fetches of different workers' VXID blocks, on different slots.
        &self.slots[super::vxid_slot(vxid, self.slots.len() - 1)]
    }

    /// Remembers that the fetch `vxid` is the span `trace_id`/`span_id`. Returns false if
    /// another thread was writing the same slot at this instant (a hit on this object then has
    /// no link; not expected: slots are per VXID).
    pub fn remember(&self, vxid: u64, trace_id: TraceId, span_id: SpanId) -> bool {
        let slot = self.slot(vxid);
        let seq = slot.seq.load(Relaxed);
        if seq & 1 == 1 || slot.seq.compare_exchange(seq, seq + 1, Acquire, Relaxed).is_err() {
            return false;
        }
        // The odd sequence number is visible before any of the fields change.
        fence(Release);
        // The trace ID as one 128-bit number, stored in two halves.
        let trace = u128::from_ne_bytes(trace_id.0);
        slot.vxid.store(vxid, Relaxed);
        slot.trace_id[0].store((trace >> 64) as u64, Relaxed);
        slot.trace_id[1].store(trace as u64, Relaxed);
        slot.span_id.store(u64::from_ne_bytes(span_id.0), Relaxed);
        slot.seq.store(seq + 2, Release);
        true
    }

    /// The span of the fetch `vxid`, if it is still remembered.
    pub fn find(&self, vxid: u64) -> Option<(TraceId, SpanId)> {
        let slot = self.slot(vxid);
        let seq = slot.seq.load(Acquire);
        if seq == 0 || seq & 1 == 1 {
            return None;
        }
        let found = slot.vxid.load(Relaxed);
        let hi = slot.trace_id[0].load(Relaxed);
        let lo = slot.trace_id[1].load(Relaxed);
        let span = slot.span_id.load(Relaxed).to_ne_bytes();
        // The fields are read before the sequence number is read again.
        fence(Acquire);
        if slot.seq.load(Relaxed) != seq || found != vxid {
            return None;
        }
        let trace = (u128::from(hi) << 64 | u128::from(lo)).to_ne_bytes();
        Some((TraceId(trace), SpanId(span)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn ids(n: u8) -> (TraceId, SpanId) {
        (TraceId([n; 16]), SpanId([n.wrapping_add(1); 8]))
    }

    #[test]
    fn a_remembered_fetch_is_found_by_its_vxid_only() {
        let t = FetchLinks::leaked(64);
        assert_eq!(t.find(1002), None, "nothing written yet");
        let (trace, span) = ids(7);
        assert!(t.remember(1002, trace, span));
        assert_eq!(t.find(1002), Some((trace, span)));
        assert_eq!(t.find(1003), None, "another slot, never written");
        assert_eq!(t.find(1002 + 64), None, "the same slot, another VXID");
    }

    #[test]
    fn the_latest_fetch_on_a_slot_replaces_the_one_before() {
        let t = FetchLinks::leaked(64);
        let (a, b) = (ids(1), ids(2));
        assert!(t.remember(5, a.0, a.1));
        assert!(t.remember(5 + 64, b.0, b.1));
        assert_eq!(t.find(5), None, "forgotten: its slot went to a later fetch");
        assert_eq!(t.find(5 + 64), Some(b));
        // Neighbouring VXIDs keep their own slots.
        for v in 100..164 {
            assert!(t.remember(v, TraceId([v as u8; 16]), SpanId([1; 8])));
        }
        assert!((100..164).all(|v| t.find(v) == Some((TraceId([v as u8; 16]), SpanId([1; 8])))));
    }

    #[test]
    fn the_size_is_a_power_of_two_so_every_slot_is_used() {
        assert_eq!(FetchLinks::leaked(100).slots.len(), 128);
        assert_eq!(FetchLinks::leaked(0).slots.len(), 1);
        assert_eq!(GLOBAL.slots.len(), SLOTS);
        assert!(SLOTS.is_power_of_two());
    }

    /// A reader racing writers of the same slot never sees a mix of two fetches' fields: each
    /// writer writes IDs made of its own byte, so a torn read would show two bytes.
    #[test]
    fn a_read_during_writes_is_whole_or_nothing() {
        use std::sync::atomic::AtomicU64;
        let t = FetchLinks::leaked(1);
        assert!(t.remember(9, TraceId([1; 16]), SpanId([1; 8])));
        let stop = AtomicBool::new(false);
        let writes = [AtomicU64::new(0), AtomicU64::new(0)];
        let (mut reads, mut seen, mut whole) = (0u64, 0u64, 0u64);
        std::thread::scope(|s| {
            for (w, count) in writes.iter().enumerate() {
                let stop = &stop;
                s.spawn(move || {
                    let mut n = 0u8;
                    while !stop.load(Relaxed) {
                        n = n.wrapping_add(1);
                        let b = n | 0x80 >> w; // never 0
                        if t.remember(9, TraceId([b; 16]), SpanId([b; 8])) {
                            count.fetch_add(1, Relaxed);
                        }
                    }
                });
            }
            // Until both writers have written a good many times while the reader read (the
            // threads may start late on a busy machine), within a bound.
            let give_up = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while reads < 1_000_000 || writes.iter().any(|c| c.load(Relaxed) < 10_000) {
                if std::time::Instant::now() > give_up {
                    break;
                }
                reads += 1;
                if let Some((trace, span)) = t.find(9) {
                    seen += 1;
                    let b = trace.0[0];
                    if trace.0.iter().all(|&x| x == b) && span.0.iter().all(|&x| x == b) {
                        whole += 1;
                    }
                }
            }
            stop.store(true, Relaxed);
        });
        assert!(writes.iter().all(|c| c.load(Relaxed) >= 10_000), "the writers did not get to run: {writes:?}");
        assert!(seen > 0, "the reader never found the slot stable in {reads} reads");
        assert_eq!(seen, whole, "a read mixed two writes");
    }
}
