//! Where an unsampled request or fetch keeps its sampling decision: a fixed table outside the
//! task, found again by the task's address and start time.
//!
//! Why not the task's own PRIV_TASK slot, where it used to live: Varnish's `VRT_priv_task`
//! (a workspace reservation and a red-black tree insert) cost 342 instructions, the marker's
//! workspace allocation 101 and the slot's fini 46, for each unsampled request and fetch: at 1%
//! sampling, nearly every one (callgrind; docs/performance-history.md). Keeping the decision here and
//! reading it back costs a few dozen.
//!
//! Keys: a live task (a `struct req` or `struct busyobj`) has an address no other live task
//! has, and Varnish records its start (`t_first`, the `Start` timestamp) before any VCL runs and
//! keeps it through restarts, rollbacks and retries. The pair names one task for its whole life:
//! the next task to use the same memory has another start time (Varnish resets it between
//! tasks). The slot comes from the address, by page:
//! a task's memory is its struct and its workspace, several pages, so tasks alive at the same
//! time within an aligned window of `SLOTS` pages (128 MiB) never share a slot.
//!
//! Sharing a slot: an entry with our task's address belongs to a task that has ended (ours has
//! its memory now), and one started more than `STALE_AFTER_S` before ours has long finished its
//! VCL; either is overwritten. Otherwise the slot may belong to a live task elsewhere:
//! `remember` refuses, and the caller keeps the decision in the task's own slot, as before. So
//! no entry a live task still needs is overwritten (but that of an unsampled task whose VCL runs
//! for longer than `STALE_AFTER_S`: it would go on as a request never traced).
//!
//! What a lookup tells (`Recalled`): the decision; or that the task keeps its state in its own
//! slot (a traced task notes that here, `remember_in_task`); or, when the entry is free or holds
//! an earlier task of the same address, that the task has kept nothing anywhere (only the
//! task's own thread writes its address, and every task that keeps something in its own slot
//! notes it here, unless the slot was another's); or, for another task's entry, nothing sure.
//! So the first call of an unsampled task needs no look in its own slot either.
//!
//! Threading: a task runs on one thread at a time, so an entry has one writer at a time, but
//! for two tasks whose addresses share its slot. Writers take the entry with a compare-and-swap
//! of its version (odd while written, made visible before the data by a release fence); readers check the version before and after reading (a
//! seqlock) and take a changed entry for "nothing sure". Every field is an atomic, so a reader
//! that races a writer reads old or new words, never undefined ones.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};

use crate::ids::{SpanId, TraceId};

/// What an unsampled request or fetch keeps: the identity of the context it was decided on, so
/// that the context built later (`calls::state`) is exactly that one, whatever VCL did to the
/// request's headers meanwhile. Plain data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unsampled {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    pub parent_is_remote: bool,
    /// W3C trace-flags as sent downstream (the sampled bit clear).
    pub flags: u8,
    /// The caller's own sampling decision, when it sent one (for `trust()`).
    pub caller_sampled: Option<bool>,
    /// The parent came from a valid `traceparent`, so the caller's `tracestate` goes on with it.
    pub tracestate_applies: bool,
    /// The request had `tracestate` fields (to be replaced or removed downstream).
    pub had_tracestate: bool,
}

/// The task a decision belongs to: its address and its start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    task: u64,
    t_first: u64,
}

impl Key {
    /// `None` for a task without a start time yet (then the task's own slot is used).
    pub fn new(task: usize, t_first: f64) -> Option<Key> {
        // Positive finite doubles are the bit patterns from 1 to just below infinity's (one
        // comparison, where the float tests compiled to a dozen instructions).
        let bits = t_first.to_bits();
        (task != 0 && bits.wrapping_sub(1) < f64::INFINITY.to_bits() - 1)
            .then_some(Key { task: task as u64, t_first: bits })
    }

    fn slot(self) -> usize {
        let page = self.task >> 12;
        // The higher bits folded in, so that tasks a multiple of the window apart (in two
        // allocator arenas, say) do not share a slot more often than any other two.
        ((page ^ (page >> 15)) as usize) & (SLOTS - 1)
    }
}

/// Slots in the process's table: 2 MiB of address space, of which only the slots used are
/// ever touched (a static, zero until written).
pub const SLOTS: usize = 1 << 15;

/// An entry older than this (by its task's start, against the start of the task that wants
/// its slot) is overwritten even if another task wrote it. Longer than nearly any task's VCL
/// runs, but not a bound Varnish sets: a pass whose request body uploads for hours, or the
/// wall clock stepped forward by more than this, can lose an unsampled task's decision (it then
/// goes on as a request never traced; it never reads another task's decision). A clock stepped
/// back makes other tasks' entries look younger: more decisions go to the task's own slot for
/// as long as the step, plus this.
pub const STALE_AFTER_S: f64 = 3600.0;

/// One slot: a cache line.
#[repr(C, align(64))]
struct Entry {
    /// Even when the entry is stable; odd while a writer has it.
    version: AtomicU64,
    task: AtomicU64,
    /// The task's `t_first`, as bits.
    t_first: AtomicU64,
    /// The decision (`encode`), or, with `IN_TASK` set in the last word, nothing here.
    words: [AtomicU64; WORDS],
}

const WORDS: usize = 5;

impl Entry {
    const fn new() -> Entry {
        Entry {
            version: AtomicU64::new(0),
            task: AtomicU64::new(0),
            t_first: AtomicU64::new(0),
            words: [const { AtomicU64::new(0) }; WORDS],
        }
    }

    /// Takes the entry for writing if `may_take` agrees with what it holds; returns the version
    /// to release it with. Counts an entry of another task taken over (`TAKEN_OVER`).
    fn lock(&self, key: Key, may_take: impl FnOnce(u64, u64) -> bool) -> Option<u64> {
        let v = self.version.load(Ordering::Acquire);
        if v & 1 == 1 {
            return None; // another task is writing it
        }
        let holder = self.task.load(Ordering::Relaxed);
        if !may_take(holder, self.t_first.load(Ordering::Relaxed)) {
            return None;
        }
        // The version unchanged since the loads above: what they read was the entry as it is.
        self.version.compare_exchange(v, v + 1, Ordering::Acquire, Ordering::Relaxed).ok()?;
        // The odd version must be visible before any of the writes that follow (readers pair
        // this with their acquire fence). A no-op on x86; needed on weaker CPUs.
        fence(Ordering::Release);
        if holder != 0 && holder != key.task {
            TAKEN_OVER.fetch_add(1, Ordering::Relaxed);
        }
        Some(v + 2)
    }
}

/// A table of decisions (the process has one, `TABLE`; tests make their own).
pub struct Table<const N: usize> {
    entries: [Entry; N],
}

impl<const N: usize> Table<N> {
    pub const fn new() -> Self {
        Table { entries: [const { Entry::new() }; N] }
    }

    fn entry(&self, key: Key) -> &Entry {
        &self.entries[key.slot() & (N - 1)]
    }

    /// Keeps `u` as the decision of the task `key`. False if the slot is another live task's
    /// (or being written): keep it elsewhere then.
    pub fn remember(&self, key: Key, u: &Unsampled) -> bool {
        let e = self.entry(key);
        let Some(release) = e.lock(key, |task, t_first| may_overwrite(task, t_first, key)) else {
            return false;
        };
        e.task.store(key.task, Ordering::Relaxed);
        e.t_first.store(key.t_first, Ordering::Relaxed);
        for (w, v) in e.words.iter().zip(encode(u)) {
            w.store(v, Ordering::Relaxed);
        }
        e.version.store(release, Ordering::Release);
        true
    }

    /// What the table knows of the task `key`.
    pub fn recall(&self, key: Key) -> Recalled {
        let e = self.entry(key);
        let v = e.version.load(Ordering::Acquire);
        let (task, t_first) = (e.task.load(Ordering::Relaxed), e.t_first.load(Ordering::Relaxed));
        let words: [u64; WORDS] = std::array::from_fn(|i| e.words[i].load(Ordering::Relaxed));
        // The loads above must not move after the version's second load.
        fence(Ordering::Acquire);
        if v & 1 == 1 || e.version.load(Ordering::Relaxed) != v {
            return Recalled::Unknown; // being written
        }
        if task == key.task && t_first == key.t_first {
            if words[WORDS - 1] & IN_TASK != 0 {
                Recalled::InTask
            } else {
                Recalled::Unsampled(decode(words))
            }
        } else if task == key.task || task == 0 {
            // Only this task's thread writes this address; it wrote nothing with this start.
            Recalled::Nothing
        } else {
            Recalled::Unknown
        }
    }

    /// Notes that the task `key` keeps its state in its own slot now (it is traced, or its full
    /// state took over from its decision here). False if the slot is another task's: readers
    /// then look in the task's slot anyway.
    pub fn remember_in_task(&self, key: Key) -> bool {
        let e = self.entry(key);
        let Some(release) = e.lock(key, |task, t_first| may_overwrite(task, t_first, key)) else {
            return false;
        };
        e.task.store(key.task, Ordering::Relaxed);
        e.t_first.store(key.t_first, Ordering::Relaxed);
        e.words[WORDS - 1].store(IN_TASK, Ordering::Relaxed);
        e.version.store(release, Ordering::Release);
        true
    }
}

/// What the table says of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recalled {
    /// An unsampled task, which keeps only its decision, here.
    Unsampled(Unsampled),
    /// The task keeps its state in its own slot (see `remember_in_task`).
    InTask,
    /// The task has kept nothing, here or in its own slot: it has not decided yet.
    Nothing,
    /// The slot is another task's (or was being written): look in the task's own slot.
    Unknown,
}

/// Whether the task `key` may write over an entry of `task`, started at `t_first`: its own, a
/// free one, or one whose task has long finished its VCL.
fn may_overwrite(task: u64, t_first: u64, key: Key) -> bool {
    task == 0 || task == key.task || is_stale(t_first, key.t_first)
}

impl<const N: usize> Default for Table<N> {
    fn default() -> Self {
        Self::new()
    }
}

fn is_stale(entry_t_first: u64, ours: u64) -> bool {
    f64::from_bits(entry_t_first) < f64::from_bits(ours) - STALE_AFTER_S
}

/// The process's table. Threading: shared by all worker threads (see the module's notes).
pub static TABLE: Table<SLOTS> = Table::new();

/// Entries of another task overwritten because they were older than `STALE_AFTER_S` (in any
/// table: the process has one; varnishstat shows it). Nearly always the entry of a task long
/// finished (entries are not cleared when a task ends); one of a live task only after a VCL
/// run of over an hour or a wall clock stepped forward (see the module's notes).
pub static TAKEN_OVER: AtomicU64 = AtomicU64::new(0);

/// Whether decisions go to `TABLE` (see `read_switch`).
static IN_USE: AtomicBool = AtomicBool::new(true);

/// `OPENTRACING_DECISION_TABLE=off`, for tests only: every unsampled decision then goes to the
/// task's own slot, as it does when the table's slot is another task's (a path the tests could
/// not reach otherwise; `scripts/run-vtc.sh` runs the unsampled suites both ways). Read once,
/// when the first VCL warms (CLI thread, before any request of it): a switch while tasks are in flight
/// would break what `Recalled::Nothing` relies on (every task that keeps something in its own
/// slot notes it in the table).
pub fn read_switch() {
    static READ: std::sync::Once = std::sync::Once::new();
    READ.call_once(|| {
        let on = std::env::var("OPENTRACING_DECISION_TABLE").map_or(true, |v| v.trim() != "off");
        IN_USE.store(on, Ordering::Relaxed);
    });
}

/// Whether to keep decisions in `TABLE`.
pub fn in_use() -> bool {
    IN_USE.load(Ordering::Relaxed)
}

// Bits of the last word.
const HAS_PARENT: u64 = 1 << 8;
const PARENT_IS_REMOTE: u64 = 1 << 9;
const CALLER_SAMPLED_KNOWN: u64 = 1 << 10;
const CALLER_SAMPLED: u64 = 1 << 11;
const TRACESTATE_APPLIES: u64 = 1 << 12;
const HAD_TRACESTATE: u64 = 1 << 13;
/// Not a decision: the task's state is in its own slot.
const IN_TASK: u64 = 1 << 14;

fn encode(u: &Unsampled) -> [u64; WORDS] {
    let trace_id = u128::from_ne_bytes(u.trace_id.0);
    let bit = |on: bool, b: u64| if on { b } else { 0 };
    let last = u64::from(u.flags)
        | bit(u.parent_span_id.is_some(), HAS_PARENT)
        | bit(u.parent_is_remote, PARENT_IS_REMOTE)
        | bit(u.caller_sampled.is_some(), CALLER_SAMPLED_KNOWN)
        | bit(u.caller_sampled == Some(true), CALLER_SAMPLED)
        | bit(u.tracestate_applies, TRACESTATE_APPLIES)
        | bit(u.had_tracestate, HAD_TRACESTATE);
    [
        trace_id as u64,
        (trace_id >> 64) as u64,
        u64::from_ne_bytes(u.span_id.0),
        u64::from_ne_bytes(u.parent_span_id.unwrap_or_default().0),
        last,
    ]
}

fn decode(w: [u64; WORDS]) -> Unsampled {
    let last = w[4];
    Unsampled {
        trace_id: TraceId((u128::from(w[1]) << 64 | u128::from(w[0])).to_ne_bytes()),
        span_id: SpanId(w[2].to_ne_bytes()),
        parent_span_id: (last & HAS_PARENT != 0).then(|| SpanId(w[3].to_ne_bytes())),
        parent_is_remote: last & PARENT_IS_REMOTE != 0,
        flags: last as u8,
        caller_sampled: (last & CALLER_SAMPLED_KNOWN != 0).then_some(last & CALLER_SAMPLED != 0),
        tracestate_applies: last & TRACESTATE_APPLIES != 0,
        had_tracestate: last & HAD_TRACESTATE != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    const T0: f64 = 1_765_000_000.25;

    fn decision(i: u64) -> Unsampled {
        Unsampled {
            trace_id: TraceId(((u128::from(i) << 64) | u128::from(!i)).to_be_bytes()),
            span_id: SpanId(i.wrapping_mul(3).to_be_bytes()),
            parent_span_id: (i % 3 != 0).then(|| SpanId(i.wrapping_mul(5).to_be_bytes())),
            parent_is_remote: i % 2 == 0,
            flags: (i % 256) as u8 & !1,
            caller_sampled: match i % 3 {
                0 => None,
                1 => Some(false),
                _ => Some(true),
            },
            tracestate_applies: i % 5 == 0,
            had_tracestate: i % 7 == 0,
        }
    }

    fn decision_of<const M: usize>(table: &Table<M>, k: Key) -> Option<Unsampled> {
        match table.recall(k) {
            Recalled::Unsampled(u) => Some(u),
            _ => None,
        }
    }

    fn key(task: usize, t_first: f64) -> Key {
        Key::new(task, t_first).expect("a valid key")
    }

    /// Tests' tables are smaller than the process's (on the test thread's stack).
    const N: usize = 1024;

    /// Two task addresses whose entries share a slot of a table of `N`.
    fn sharing_a_slot() -> (usize, usize) {
        let a = 0x7f00_1234_5000usize;
        let b = (1..1 << 20)
            .map(|n| a + n * 4096)
            .find(|b| key(*b, T0).slot() % N == key(a, T0).slot() % N)
            .expect("some page shares the slot");
        (a, b)
    }

    #[test]
    fn a_decision_comes_back_as_it_was_kept() {
        let table = Table::<N>::new();
        for i in 0..2000u64 {
            // One task's memory, used by one task after another.
            let k = key(0x7f00_0000_1000, T0 + i as f64);
            let u = decision(i);
            assert!(table.remember(k, &u));
            assert_eq!(decision_of(&table, k), Some(u), "decision {i}");
        }
        let every_bit = Unsampled {
            trace_id: TraceId([0xff; 16]),
            span_id: SpanId([0xff; 8]),
            parent_span_id: Some(SpanId([0xff; 8])),
            parent_is_remote: true,
            flags: 0xfe,
            caller_sampled: Some(true),
            tracestate_applies: true,
            had_tracestate: true,
        };
        let k = key(0x5000, T0);
        assert!(table.remember(k, &every_bit));
        assert_eq!(decision_of(&table, k), Some(every_bit));
    }

    #[test]
    fn only_the_same_task_finds_it() {
        let table = Table::<N>::new();
        let k = key(0x7f00_0000_3000, T0);
        assert!(table.remember(k, &decision(1)));
        // The next task in the same memory, and another task.
        assert_eq!(decision_of(&table, key(0x7f00_0000_3000, T0 + 0.001)), None);
        assert_eq!(decision_of(&table, key(0x7f00_0000_4000, T0)), None);
        // The next task in the same memory takes the slot.
        let next = key(0x7f00_0000_3000, T0 + 0.001);
        assert!(table.remember(next, &decision(2)));
        assert_eq!(decision_of(&table, next), Some(decision(2)));
        assert_eq!(decision_of(&table, k), None);
    }

    #[test]
    fn a_live_task_keeps_its_slot_and_a_stale_one_does_not() {
        let table = Table::<N>::new();
        let (a, b) = sharing_a_slot();
        assert!(table.remember(key(a, T0), &decision(1)));
        // Another task in the same slot, while the first may still be running: refused.
        assert!(!table.remember(key(b, T0 + STALE_AFTER_S - 1.0), &decision(2)));
        assert_eq!(decision_of(&table, key(a, T0)), Some(decision(1)));
        // Long after the first started: its VCL has ended, the slot is taken (and counted).
        let late = key(b, T0 + STALE_AFTER_S + 1.0);
        let taken_over = TAKEN_OVER.load(Ordering::Relaxed);
        assert!(table.remember(late, &decision(3)));
        assert_eq!(TAKEN_OVER.load(Ordering::Relaxed), taken_over + 1);
        assert_eq!(decision_of(&table, late), Some(decision(3)));
        assert_eq!(decision_of(&table, key(a, T0)), None);
    }

    #[test]
    fn the_table_says_when_nothing_was_kept_and_when_it_cannot_know() {
        let table = Table::<N>::new();
        let (a, b) = sharing_a_slot();
        // A free slot, and one of an earlier task in the same memory: nothing kept anywhere.
        assert_eq!(table.recall(key(a, T0)), Recalled::Nothing);
        assert!(table.remember(key(a, T0), &decision(1)));
        assert_eq!(table.recall(key(a, T0 + 1.0)), Recalled::Nothing);
        // Another live task's slot: the task may have kept its state in its own slot.
        assert_eq!(table.recall(key(b, T0)), Recalled::Unknown);
        assert!(!table.remember_in_task(key(b, T0)));
        assert_eq!(table.recall(key(b, T0)), Recalled::Unknown);
        // The task's full state took over: the decision is gone from here.
        assert!(table.remember_in_task(key(a, T0)));
        assert_eq!(table.recall(key(a, T0)), Recalled::InTask);
        assert_eq!(table.recall(key(a, T0 + 1.0)), Recalled::Nothing);
        // A traced task from the start, in a free slot.
        let c = key(0x7f00_0000_2000, T0);
        assert!(table.remember_in_task(c));
        assert_eq!(table.recall(c), Recalled::InTask);
    }

    #[test]
    fn a_slot_being_written_is_unknown() {
        let table = Table::<N>::new();
        let k = key(0x7f00_0000_3000, T0);
        assert!(table.remember(k, &decision(1)));
        let e = table.entry(k);
        let v = e.version.load(Ordering::Relaxed);
        e.version.store(v + 1, Ordering::Relaxed);
        assert_eq!(table.recall(k), Recalled::Unknown);
        assert!(!table.remember(k, &decision(2)), "a second writer must wait its turn");
        e.version.store(v + 2, Ordering::Relaxed);
        assert_eq!(table.recall(k), Recalled::Unsampled(decision(1)));
    }

    #[test]
    fn tasks_without_an_address_or_a_start_have_no_key() {
        assert_eq!(Key::new(0, T0), None);
        for t in [0.0, -0.0, -1.0, f64::NAN, -f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(Key::new(0x1000, t), None, "{t}");
        }
        for t in [T0, f64::MIN_POSITIVE, f64::MAX, 1e-320] {
            assert!(Key::new(0x1000, t).is_some(), "{t}");
        }
    }

    #[test]
    fn a_reader_racing_writers_sees_a_whole_decision_or_none() {
        // Two writers of one entry (tasks sharing a slot can do that) and two readers: every
        // decision read must be one that was written, whole.
        let table = Table::<4>::new();
        let k = key(0x9000, T0);
        // Written once before any thread starts: a reader scheduled before both writers (a
        // loaded machine) still has a decision to read.
        assert!(table.remember(k, &decision(0)));
        let stop = AtomicBool::new(false);
        let (seen, torn) = std::thread::scope(|s| {
            for w in 0..2u64 {
                let (table, stop) = (&table, &stop);
                s.spawn(move || {
                    let mut i = w;
                    while !stop.load(Ordering::Relaxed) {
                        table.remember(k, &decision(i));
                        i += 2;
                    }
                });
            }
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let (mut seen, mut torn) = (0u64, 0u64);
                        // At least 200,000 reads, and on until some decisions were seen (a
                        // reader can find the entry mid-write many times in a row while both
                        // writers run), within a bound.
                        for n in 0..50_000_000u64 {
                            if n >= 200_000 && seen >= 1_000 {
                                break;
                            }
                            if let Some(u) = decision_of(&table, k) {
                                let i = u128::from_be_bytes(u.trace_id.0) >> 64;
                                seen += 1;
                                torn += u64::from(u != decision(i as u64));
                            }
                        }
                        (seen, torn)
                    })
                })
                .collect();
            let totals =
                readers.into_iter().map(|r| r.join().expect("reader")).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            stop.store(true, Ordering::Relaxed);
            totals
        });
        assert!(seen > 0, "the readers never saw a decision");
        assert_eq!(torn, 0, "of {seen} decisions read");
    }
}
