//! Which sampled spans the tailer should follow, written by the workers without a message: a
//! span's start claims the slot of its first VXID, and its end releases it when the span was
//! completed from its task's own buffer (`task_log`); the tailer takes a span over (releasing
//! its slot) when it first meets one of the span's transactions in the log, or its `finished`
//! message.
//!
//! Why: most spans complete from their task's buffer, and the two messages per span (`Track`,
//! `Forget`) were most of what the tailer still did for them: callgrind, 100% of hits, the
//! tailer 646 -> 192 instructions per request, 624 fewer in all (docs/performance-history.md).
//!
//! A slot already claimed (another span in flight whose VXID falls on it) falls back to the
//! messages (`tailer::track`, `tailer::forget`). A claimed slot whose span never ends (a task
//! rolled back and never resumed) is taken over by the tailer when the transaction's log shows
//! up, and dropped there like any span that never finishes; until then that slot's spans use the
//! messages. Ordering: a span's claim comes before any of its records reach the shared log, and
//! its release before its last ones do (Varnish writes the buffer out after the task's end), so
//! the tailer, reading a transaction's records, sees the slot as it was when they were written.
//!
//! Threading: any worker thread and the tailer; lock-free (one compare-and-swap per change).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};

/// Slots of the process-wide table (a power of two): spans in flight at once, with room to spare.
const SLOTS: usize = 1 << 13;

static GLOBAL_SLOTS: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];

/// A table of followed spans (`GLOBAL` in varnishd).
pub struct Followed {
    slots: &'static [AtomicU64],
    /// Slots in use minus one (`SLOTS - 1` unless a test asked for fewer: `use_slots`).
    mask: AtomicUsize,
    /// False when a test asked for no slots: every span takes the messages' way.
    enabled: AtomicBool,
}

/// The table every thread of the process uses.
pub static GLOBAL: Followed =
    Followed { slots: &GLOBAL_SLOTS, mask: AtomicUsize::new(SLOTS - 1), enabled: AtomicBool::new(true) };

impl Followed {
    /// A table of its own with `slots` slots (a power of two), for tests: its memory is leaked.
    #[cfg(test)]
    fn leaked(slots: usize) -> Followed {
        let slots: &'static [AtomicU64] = Vec::from_iter((0..slots).map(|_| AtomicU64::new(0))).leak();
        Followed { slots, mask: AtomicUsize::new(slots.len() - 1), enabled: AtomicBool::new(true) }
    }

    /// Uses only the first `n` slots (rounded down to a power of two; none: every span takes
    /// the messages' way): for tests, so that spans in flight at once share slots and take the
    /// messages' way too (`OPENTRACING_VSL_FOLLOWED_SLOTS`, read when the tailer starts).
    pub fn use_slots(&self, n: usize) {
        self.enabled.store(n > 0, Relaxed);
        let n = n.clamp(1, self.slots.len());
        let n = if n.is_power_of_two() { n } else { n.next_power_of_two() / 2 };
        self.mask.store(n - 1, Relaxed);
    }

    fn slot(&self, vxid: u64) -> &AtomicU64 {
        // Spans in flight fall on different slots (`vxid_slot`); a worker's VXIDs on
        // neighbouring ones, so the tailer, stepping through the log in order, walks the table
        // in runs.
        &self.slots[super::vxid_slot(vxid, self.mask.load(Relaxed))]
    }

    /// Marks `vxid` followed; false if its slot is another span's (or `vxid` is 0, never a
    /// transaction's).
    pub fn claim(&self, vxid: u64) -> bool {
        vxid != 0 && self.enabled.load(Relaxed) && self.slot(vxid).compare_exchange(0, vxid, SeqCst, Relaxed).is_ok()
    }

    /// Unmarks `vxid`; false if it was not marked (its claim fell back to a message, or the
    /// tailer took it over). A plain load first: the tailer asks for every transaction it does
    /// not follow yet.
    pub fn release(&self, vxid: u64) -> bool {
        let slot = self.slot(vxid);
        vxid != 0 && slot.load(SeqCst) == vxid && slot.compare_exchange(vxid, 0, SeqCst, Relaxed).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_released_once() {
        let t = Followed::leaked(8);
        assert!(t.claim(1001));
        assert!(!t.claim(1001), "already claimed");
        assert!(t.release(1001));
        assert!(!t.release(1001), "released already: the tailer took it over, say");
        assert!(t.claim(1001), "free again");
    }

    #[test]
    fn a_slot_taken_by_another_span_is_refused_and_left_alone() {
        let t = Followed::leaked(8);
        assert!(t.claim(3));
        assert!(!t.claim(3 + 8), "same slot, another span: it takes the messages' way");
        assert!(!t.release(3 + 8), "and its release does not touch the slot's span");
        assert!(t.release(3));
        assert!(t.claim(4) && t.claim(5), "neighbours have slots of their own");
    }

    #[test]
    fn two_workers_at_the_same_place_of_their_vxid_blocks_have_slots_of_their_own() {
        let t = Followed::leaked(SLOTS);
        // Varnish's blocks of 32,768 VXIDs per worker thread: requests served in step.
        for n in 1..1_000u64 {
            let (a, b) = (5 * 32_768 + n, 9 * 32_768 + n);
            assert!(t.claim(a) && t.claim(b), "{a} and {b}");
            assert!(t.release(a) && t.release(b));
        }
    }

    #[test]
    fn vxid_zero_is_never_followed() {
        let t = Followed::leaked(8);
        assert!(!t.claim(0));
        assert!(!t.release(0));
        assert!(t.claim(8), "its slot stays free for others");
    }

    #[test]
    fn fewer_slots_for_tests() {
        let t = Followed::leaked(16);
        t.use_slots(3);
        assert!(t.claim(1));
        assert!(!t.claim(3), "two slots in use: 1 and 3 share one");
        t.use_slots(0);
        assert!(!t.claim(2), "no slot in use");
        t.use_slots(1);
        assert!(t.claim(2), "one slot in use: the first");
        assert!(!t.claim(4), "taken");
        t.use_slots(1 << 20);
        assert!(t.claim(4), "at most the table's size: 4 has a slot of its own again");
    }
}
