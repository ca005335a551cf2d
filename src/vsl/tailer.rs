//! The tailer: a background worker inside varnishd that reads the instance's own shared-memory
//! log and closes spans with what Varnish logged (see `correlate`).
//!
//! Shape: like every worker here (`worker.rs`). Varnish workers send it `Msg`s without blocking
//! (`finished` when a sampled span's task ends, unless the span was completed from the task's
//! own log buffer, `task_log`); a full queue hands the finished span straight to the exporter,
//! closed from its task's data. Which spans to follow, the workers mark in a table instead
//! (`followed`: `track` when a sampled span starts, `forget` when it was completed from its
//! buffer), falling back to `Track`/`Forget` messages when the span's slot is taken. Each tick handles the
//! messages, reads the log until it is idle (unless dormant, below), and closes the spans whose
//! log is late.
//!
//! Dormancy: when nothing has needed the log for `DORMANT_AFTER` (every span closed from its
//! task's buffer), the tailer stops reading it, and its ticks only handle messages and
//! deadlines; a worker whose span's records go to the shared log early calls it back
//! (`log_needed`), and it reads the last segments again (`REWIND_SEGMENTS`), where those
//! records are.
//!
//! Threading: attaching to the log may block (up to `ATTACH_PATIENCE`), so it happens here, on
//! the tailer thread, never on the CLI thread. Everything else is non-blocking.

use std::path::PathBuf;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use super::correlate::{Correlator, Limits};
use super::ffi::{tag_number, LogReader, Step};
use super::followed;
use super::record::TagTable;
use crate::pipeline::{self, STATS};
use crate::span::{SpanRecord, Value};
use crate::worker::{Activity, Inbox, Job, Worker};

pub enum Msg {
    /// A sampled span started in transaction `vxid` (when its slot in `followed`, which says so
    /// without a message, was another span's).
    Track { vxid: u64 },
    /// Stop following the span of transaction `vxid`: VCL unsampled it, or its task's end
    /// completed it from its own log buffer (`task_log`); when it was not in `followed` (any
    /// more: the tailer takes spans over from there).
    Forget { vxid: u64 },
    /// The task of a span ended; `record` holds what the task knew. The span's first VXID is
    /// `record.vxid`; `final_vxid` is the one it ended with (restarts and retries change it).
    Finished { record: Box<SpanRecord>, final_vxid: u64 },
}

/// How often the tailer reads the log while it follows spans: the delay between a transaction's
/// end and its span's export. Each wake-up costs a few microseconds of scheduling (and an IPI
/// on a busy CPU), so a longer tick spreads it over more spans: 5 ms measured 0.9 µs of tailer
/// CPU per span against 1.2 µs at 1 ms (docs/performance-history.md). The log holds seconds of traffic.
pub const TICK: Duration = Duration::from_millis(5);
/// How often the tailer reads the log while it follows no span (nothing sampled lately): an
/// untraced varnishd wakes it 50 times a second, not 1000. A span that starts meanwhile is
/// followed from the next tick; its records are still in the log (the tailer's cursor only
/// moves when it reads).
pub const IDLE_TICK: Duration = Duration::from_millis(20);
/// Queue between the workers and the tailer.
pub const QUEUE: usize = 32_768;
const ATTACH_PATIENCE: u32 = 1;
const ATTACH_RETRY: Duration = Duration::from_secs(1);
/// Steps read per tick at most, so that messages and deadlines are looked at in between.
const STEPS_PER_TICK: usize = 200_000;
/// Log steps worth one message in the pace of the tailer's ticks (`Job::other_work`): at 1%
/// sampling of 60,000 hits a second, the log's 2,400 or so steps in 20 ms make it tick about
/// every 13 ms rather than 20, so that no tick reads much more log than about 100 us' worth.
const LOG_STEPS_PER_MESSAGE: usize = 32;

/// How long the tailer goes on reading the log after it last needed to: then it stops reading
/// (dormant) until a worker calls it back (`log_needed`). Most spans close from their task's own
/// buffer (`task_log`); the log is needed only for the rest (a restart, a retry, records written
/// out early), and stepping through every transaction of the log costs about 200 instructions
/// per request (two steps per keep-alive hit) and the tailer's wake-ups, which a dormant tailer
/// does not pay: it only looks at its queue, at the idle tick.
pub const DORMANT_AFTER: Duration = Duration::from_secs(10);
/// Segments of the log read again when the tailer is called back (`ffi::Ring::seek_back`), and
/// after the writer lapped it (`Step::Overrun`): the cursor then starts two or three segments behind
/// the writer, where a batch copied is intact while the writer stays less than four behind
/// (`copy_current`) and stepping goes on up to five. They hold what was written since the span's
/// log went out early (or since the lap): a log of 80 MB (the default `vsl_space`) has segments of
/// 10 MB, a tenth of a second or more at 60,000 hits a second; a span whose log went out before
/// that closes with what its task's buffer holds.
const REWIND_SEGMENTS: u32 = 2;

/// What the workers and the tailer tell each other about its dormancy (one per tailer: a tailer
/// left running by a stop that timed out keeps its own).
#[derive(Default)]
struct Dormancy {
    /// The tailer is not reading the log. Stored by the tailer thread, read by the workers in
    /// `log_needed`.
    dormant: AtomicBool,
    /// A worker needed the log read (`log_needed`): the dormant tailer reads the last segments
    /// again; an awake one stays awake for `DORMANT_AFTER` more.
    needed: AtomicBool,
}

static TAILER: RwLock<Option<Tailer>> = RwLock::new(None);

/// The running tailer, as the Varnish workers reach it.
struct Tailer {
    worker: Worker<Msg>,
    /// `Track` and `Forget` messages sent to this tailer and not handled yet (shared with its
    /// job). The tailer decides whether to read a transaction's log only when none is pending:
    /// both are sent before the transaction's log is written, so by the time the tailer reads
    /// that log they are either handled or counted here (a `Forget` read late would have the
    /// tailer read the records of a span already complete, for nothing). (Not for a part of
    /// the log Varnish flushed before the track, when a transaction's records outgrow its VSL
    /// buffer before vcl_recv: that part was missed with the queue's own check too.) One load per
    /// transaction, where asking the queue (`is_empty`) cost about 30 instructions, twice per
    /// unsampled request. Per tailer: one stopped with messages unread leaves its count behind.
    /// (SeqCst: no dearer than Relaxed on x86 for an RMW or a load, and ordered with the log's
    /// own barriers on any CPU.)
    changes_pending: Arc<AtomicU64>,
    dormancy: Arc<Dormancy>,
}

impl Tailer {
    /// Sends a `Track` or `Forget`, counted while it waits.
    fn change(&self, msg: Msg) {
        self.changes_pending.fetch_add(1, SeqCst);
        if self.worker.try_send(msg).is_err() {
            self.changes_pending.fetch_sub(1, SeqCst);
        }
    }
}

/// A test knob: the number in environment variable `name`, if set and readable. The knobs
/// below are for tests only; an operator never needs them.
fn test_knob<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// `OPENTRACING_VSL_READ_DELAY_MS`: a pause after every read of the log. For tests only: it makes
/// the tailer fall behind on purpose, to check that overruns lose no span.
fn read_delay() -> Duration {
    test_knob("OPENTRACING_VSL_READ_DELAY_MS").map_or(Duration::ZERO, Duration::from_millis)
}

/// `OPENTRACING_VSL_FOLLOWED_SLOTS`: fewer slots in the table of followed spans. For tests only:
/// spans in flight at once then share slots, and some take the messages' way (`followed`).
fn followed_slots() -> Option<usize> {
    test_knob("OPENTRACING_VSL_FOLLOWED_SLOTS")
}

/// `OPENTRACING_VSL_DORMANT_AFTER_MS`: another `DORMANT_AFTER`. For tests only: a tailer that
/// goes dormant within the test's time.
fn dormant_after() -> Duration {
    test_knob("OPENTRACING_VSL_DORMANT_AFTER_MS").map_or(DORMANT_AFTER, Duration::from_millis)
}

/// Whether the log is attached (for the counters and the tests).
pub static ATTACHED: AtomicBool = AtomicBool::new(false);

/// Starts the tailer (CLI thread, with the pipeline). `workdir` is varnishd's `-n` folder.
pub fn start(workdir: PathBuf) -> Result<(), String> {
    if let Some(n) = followed_slots() {
        followed::GLOBAL.use_slots(n);
    }
    let changes_pending = Arc::new(AtomicU64::new(0));
    let dormancy = Arc::new(Dormancy::default());
    let job = TailerJob::new(workdir, changes_pending.clone(), dormancy.clone());
    let worker = Worker::spawn_with_idle_tick("otel-vsl", QUEUE, TICK, IDLE_TICK, job)
        .map_err(|e| format!("cannot start the VSL tailer: {e}"))?;
    *TAILER.write() = Some(Tailer { worker, changes_pending, dormancy });
    Ok(())
}

/// Stops the tailer within `deadline`; its last tick hands every finished span to the exporter.
pub fn stop(deadline: Duration) -> bool {
    let tailer = TAILER.write().take();
    tailer.is_none_or(|t| t.worker.stop(deadline))
}

pub fn is_running() -> bool {
    TAILER.read().is_some()
}

/// Whether a tailer runs, attached to the log, and reads it (not dormant).
pub fn reading() -> bool {
    ATTACHED.load(Relaxed) && TAILER.read().as_ref().is_some_and(|t| !t.dormancy.dormant.load(Relaxed))
}

/// A sampled span started (any worker thread; never blocks).
pub fn track(vxid: u64) {
    if let Some(t) = TAILER.read().as_ref() {
        // The table when the span's slot is free; a message otherwise.
        if !followed::GLOBAL.claim(vxid) {
            t.change(Msg::Track { vxid });
        }
    }
}

/// Stop following a span: VCL unsampled it, or it was completed from its task's own buffer
/// (any worker thread; never blocks; if the queue is full, the tailer drops the entry soon after
/// its log ended, or at `Limits::max_age`: `Correlator::expire`).
pub fn forget(vxid: u64) {
    // Released whether the tailer runs or not (one stopped since the claim leaves it).
    if followed::GLOBAL.release(vxid) {
        return;
    }
    if let Some(t) = TAILER.read().as_ref() {
        t.change(Msg::Forget { vxid });
    }
}

/// A sampled span's log went to the shared log before its task's end: the transaction before a
/// restart or a retry, records Varnish wrote out early (any worker thread, right after; never
/// blocks). The tailer, if dormant, is woken and reads the last segments of the log again; if
/// awake, it stays so for `DORMANT_AFTER` more. Called at those moments only (rare): a read
/// lock, a fence, a store and a load, and a wake-up when dormant.
pub fn log_needed() {
    let tailer = TAILER.read();
    let Some(t) = tailer.as_ref() else { return };
    // Dekker's order with `TailerJob::go_dormant`: the records this task wrote out, then the
    // store of `needed`, then the load of `dormant`; there, the store of `dormant`, then a last
    // read of the log, then the load of `needed`. Either the tailer sees `needed` (and stays
    // awake: its last read may have stopped short of these records, at a batch another worker
    // had reserved before them and not written yet), or this load sees it dormant.
    fence(SeqCst);
    t.dormancy.needed.store(true, SeqCst);
    if t.dormancy.dormant.load(SeqCst) {
        t.worker.wake();
    }
}

/// A span's task ended (any worker thread; never blocks). Without a tailer, or when its queue is
/// full, the span goes to the exporter at once, closed from its task's data.
pub fn finished(record: Box<SpanRecord>, final_vxid: u64) {
    // Its log is not (all) in its task's buffer: the tailer must read the shared log.
    log_needed();
    let msg = Msg::Finished { record, final_vxid };
    let rejected = match TAILER.read().as_ref() {
        Some(t) => match t.worker.try_send(msg) {
            Ok(()) => return,
            Err(m) => Some(m),
        },
        None => {
            let Msg::Finished { record, .. } = msg else { return };
            followed::GLOBAL.release(record.vxid);
            pipeline::submit(record);
            return;
        }
    };
    if let Some(Msg::Finished { mut record, .. }) = rejected {
        followed::GLOBAL.release(record.vxid);
        STATS.vsl_closed_by_backstop.fetch_add(1, Relaxed);
        record.set("varnish.span.closed_by", Value::Str("backstop".into()));
        pipeline::submit(record);
    }
}

struct TailerJob {
    workdir: PathBuf,
    reader: Option<LogReader>,
    next_attach: Instant,
    last_status_check: Instant,
    attach_error_logged: bool,
    correlator: Correlator,
    /// The time at the end of the last tick, for the messages handled until the next: it dates
    /// deadlines of seconds, where a tick (a millisecond) does not matter, whereas reading the
    /// clock for each message (two per span) cost a sixth of correlating the span.
    now: Instant,
    buf: Vec<u8>,
    /// Completed spans, boxed as the exporter's queue takes them.
    #[allow(clippy::vec_box)]
    done: Vec<Box<SpanRecord>>,
    steps: u64,
    /// `steps` when the last tick began (`Job::other_work`).
    steps_before_tick: u64,
    /// Laps of the writer past the tailer (`Step::Overrun`).
    overruns: u64,
    /// Transactions overwritten while being copied (`copy_current` false).
    copies_overwritten: u64,
    read_delay: Duration,
    activity: Activity,
    /// Shared with the senders (`Tailer::changes_pending`).
    changes_pending: Arc<AtomicU64>,
    /// Not reading the log (`DORMANT_AFTER`); `dormancy` says so to the workers.
    dormant: bool,
    dormancy: Arc<Dormancy>,
    /// When the log last had something for a span: a span's task ended with its log not all in
    /// its buffer, a followed span's transaction was met, or a worker called the tailer back.
    last_needed: Instant,
    dormant_after: Duration,
    /// Times the tailer was called back from dormancy.
    wakeups: u64,
}

impl TailerJob {
    fn new(workdir: PathBuf, changes_pending: Arc<AtomicU64>, dormancy: Arc<Dormancy>) -> Self {
        TailerJob {
            workdir,
            reader: None,
            next_attach: Instant::now(),
            last_status_check: Instant::now(),
            attach_error_logged: false,
            correlator: Correlator::new(TagTable::new(tag_number), Limits::default()),
            now: Instant::now(),
            buf: Vec::with_capacity(64 * 1024),
            done: Vec::new(),
            steps: 0,
            steps_before_tick: 0,
            overruns: 0,
            copies_overwritten: 0,
            read_delay: read_delay(),
            activity: Activity::default(),
            changes_pending,
            dormant: false,
            dormancy,
            last_needed: Instant::now(),
            dormant_after: dormant_after(),
            wakeups: 0,
        }
    }

    fn attach(&mut self, now: Instant) {
        if self.reader.is_some() || now < self.next_attach {
            return;
        }
        match LogReader::attach(&self.workdir, ATTACH_PATIENCE) {
            Ok(r) => {
                self.reader = Some(r);
                ATTACHED.store(true, Relaxed);
                crate::varnish::log::global(format!("VSL tailer attached to {}", self.workdir.display()));
                self.attach_error_logged = false;
            }
            Err(e) => {
                self.next_attach = now + ATTACH_RETRY;
                if !self.attach_error_logged {
                    // Once per failure streak: spans still close from their task data meanwhile.
                    crate::varnish::log::global(format!("VSL tailer cannot read the log yet: {e}"));
                    self.attach_error_logged = true;
                }
            }
        }
    }

    fn handle_msg(&mut self, msg: Msg, now: Instant) {
        self.activity.message();
        match msg {
            Msg::Track { vxid } => {
                // First: a panic below (a bug) must not leave the count up for good.
                self.changes_pending.fetch_sub(1, SeqCst);
                self.correlator.track(vxid, now);
            }
            Msg::Forget { vxid } => {
                self.changes_pending.fetch_sub(1, SeqCst);
                self.correlator.untrack(vxid);
            }
            Msg::Finished { record, final_vxid } => {
                if self.dormant {
                    // The worker found the tailer awake (`log_needed`), which went dormant before
                    // this message came: the span's log is needed all the same.
                    self.wake_up(now);
                }
                self.last_needed = now;
                // A span whose log has not been met yet (one of its own slot): taken over now.
                if !self.correlator.wants(record.vxid) && followed::GLOBAL.release(record.vxid) {
                    self.correlator.track(record.vxid, now);
                }
                if let Some(done) = self.correlator.finished(record, final_vxid, now) {
                    self.done.push(done);
                }
            }
        }
    }

    /// Reads the log until it is idle (or for `STEPS_PER_TICK` steps). Returns whether it read
    /// all there was.
    fn read_log(&mut self, inbox: &Inbox<'_, Msg>, now: Instant) -> bool {
        // Taken out for the loop, so that messages can be handled in the middle of it.
        let Some(mut reader) = self.reader.take() else { return false };
        let (mut keep, mut all_read) = (true, false);
        for _ in 0..STEPS_PER_TICK {
            match reader.step() {
                Step::Batch { vxid } | Step::Single { vxid } => {
                    self.steps += 1;
                    // Its `Track` or `Forget` may still be in the queue (sent before the
                    // transaction ended, so before this batch was written): take them first,
                    // unless none is pending at all.
                    if self.changes_pending.load(SeqCst) != 0 {
                        while let Some(m) = inbox.try_next() {
                            self.handle_msg(m, now);
                        }
                    }
                    if !self.correlator.wants(vxid) {
                        if !followed::GLOBAL.release(vxid) {
                            continue;
                        }
                        // A followed span's transaction: taken over from the workers' table.
                        self.last_needed = now;
                        self.correlator.track(vxid, now);
                        if !self.correlator.wants(vxid) {
                            continue;
                        }
                    }
                    if reader.copy_current(&mut self.buf) {
                        self.correlator.records(&self.buf, &mut self.done);
                    } else {
                        // Overwritten while we copied: that transaction's records are lost (its
                        // span closes from its task data); the walk goes on.
                        self.copies_overwritten += 1;
                    }
                }
                Step::Idle => {
                    all_read = true;
                    if now.duration_since(self.last_status_check) >= Duration::from_secs(1) {
                        self.last_status_check = now;
                        keep = !reader.restarted();
                    }
                    break;
                }
                Step::Overrun => {
                    // The writer lapped us: what it overwrote is lost (those spans will close
                    // from their task data). Go on from a few segments before the writer, not
                    // from its tail: spans whose records are still there keep them. Lapped
                    // again and again (a tailer that cannot keep up), it reads as much either
                    // way, at its own pace; from the tail, a larger share of its copies would
                    // succeed (a copy needs the writer less than four segments ahead), but the
                    // spans of the moments just before each lap would all be lost, and when a
                    // burst ends, those are the ones still there to read.
                    self.overruns += 1;
                    keep = reader.recover(REWIND_SEGMENTS).is_ok();
                    break;
                }
                Step::Abandoned => {
                    keep = false;
                    break;
                }
            }
        }
        if keep {
            self.reader = Some(reader);
        } else {
            self.drop_reader();
        }
        all_read && keep
    }

    /// Stops reading the log, if nothing has needed it for `dormant_after`: no span followed,
    /// none to be followed. Called after a read that reached the log's end.
    fn go_dormant(&mut self, inbox: &Inbox<'_, Msg>, now: Instant) {
        if now.duration_since(self.last_needed) < self.dormant_after
            || self.correlator.pending() != 0
            || self.changes_pending.load(SeqCst) != 0
        {
            return;
        }
        // Said first, then the log read once more, then `needed` looked at (see `log_needed`).
        self.dormancy.dormant.store(true, SeqCst);
        fence(SeqCst);
        let all_read = self.read_log(inbox, now);
        let needed = self.dormancy.needed.swap(false, SeqCst);
        if all_read && !needed && self.correlator.pending() == 0 && self.changes_pending.load(SeqCst) == 0 {
            self.dormant = true;
        } else {
            self.dormancy.dormant.store(false, SeqCst);
            if needed {
                self.last_needed = now;
            }
        }
    }

    /// Called back (`log_needed`): reads the log again from a few segments back, where the
    /// records that went out early are. Spans followed meanwhile had none of their records read
    /// (nothing was), and none were followed when the tailer went dormant, so nothing is read
    /// twice for a span.
    fn wake_up(&mut self, now: Instant) {
        if let Some(reader) = self.reader.as_mut() {
            if reader.rewind(REWIND_SEGMENTS).is_err() && reader.reacquire().is_err() {
                self.drop_reader();
            }
        }
        self.dormant = false;
        self.dormancy.dormant.store(false, SeqCst);
        self.last_needed = now;
        self.wakeups += 1;
    }

    fn drop_reader(&mut self) {
        self.reader = None;
        ATTACHED.store(false, Relaxed);
        self.next_attach = Instant::now();
    }

    fn flush(&mut self) {
        pipeline::submit_all(self.done.drain(..));
        let s = &self.correlator.stats;
        STATS.vsl_steps.store(self.steps, Relaxed);
        STATS.vsl_transactions_matched.store(s.transactions_matched, Relaxed);
        STATS.vsl_closed_from_log.store(s.closed_from_log, Relaxed);
        STATS.vsl_closed_by_tailer_backstop.store(s.closed_by_backstop, Relaxed);
        STATS.vsl_overruns.store(self.overruns, Relaxed);
        STATS.vsl_copies_overwritten.store(self.copies_overwritten, Relaxed);
        // Before `vsl_pending`: a span leaves the pending ones counted where it went.
        STATS.vsl_not_followed.store(s.not_tracked, Relaxed);
        STATS.vsl_abandoned.store(s.abandoned, Relaxed);
        STATS.vsl_wakeups.store(self.wakeups, Relaxed);
        STATS.vsl_pending.store(self.correlator.pending() as u64, Relaxed);
    }
}

impl Job<Msg> for TailerJob {
    fn handle(&mut self, msg: Msg) {
        self.handle_msg(msg, self.now);
    }

    fn tick(&mut self, inbox: &Inbox<'_, Msg>) {
        self.steps_before_tick = self.steps;
        let now = Instant::now();
        self.attach(now);
        if self.dormancy.needed.swap(false, SeqCst) {
            if self.dormant {
                self.wake_up(now);
            } else {
                self.last_needed = now;
            }
        } else if !self.dormant && self.dormancy.dormant.load(Relaxed) {
            // A tick that panicked between saying it was dormant and deciding: it is not.
            self.dormancy.dormant.store(false, SeqCst);
        }
        if !self.dormant && self.read_log(inbox, now) {
            self.go_dormant(inbox, now);
        }
        if !self.read_delay.is_zero() {
            std::thread::sleep(self.read_delay);
        }
        self.correlator.expire(now, &mut self.done);
        self.flush();
        self.activity.tick_ended(self.correlator.pending() == 0 && self.done.is_empty());
        // For the messages handled before the next tick (this one may have been long).
        self.now = Instant::now();
    }

    fn idle(&self) -> bool {
        self.activity.quiet()
    }

    fn other_work(&self) -> usize {
        // Reading a transaction's place in the log is about a tenth to a thirtieth of a
        // message's work: at a high request rate with few spans sampled, the log sets the pace.
        (self.steps - self.steps_before_tick) as usize / LOG_STEPS_PER_MESSAGE
    }

    fn finish(&mut self) {
        // Stopping: read what the log still holds, then close every finished span from what
        // we have. Nothing that finished is lost.
        let now = Instant::now();
        if self.dormant && self.dormancy.needed.swap(false, SeqCst) {
            // Called back just before the stop: read what it was called back for.
            self.wake_up(now);
        }
        if self.dormant {
            // Nothing to read for; the cursor is where the tailer stopped reading.
            self.reader = None;
        }
        if let Some(reader) = self.reader.as_mut() {
            for _ in 0..STEPS_PER_TICK {
                match reader.step() {
                    Step::Batch { vxid } | Step::Single { vxid } if self.correlator.wants(vxid) => {
                        if reader.copy_current(&mut self.buf) {
                            self.correlator.records(&self.buf, &mut self.done);
                        }
                    }
                    Step::Batch { .. } | Step::Single { .. } => {}
                    _ => break,
                }
            }
        }
        self.correlator.expire(now + Duration::from_secs(3600 * 24), &mut self.done);
        self.flush();
        self.reader = None;
        ATTACHED.store(false, Relaxed);
    }
}
