//! The one shape every background thread of this module has: a named thread, fed through a
//! bounded queue with non-blocking sends (the caller counts what does not fit), polling at a
//! tick (longer at low rates, `busy_sleep`, and when idle), and stopped with a join that waits a
//! bounded time.
//!
//! Why polling: a receiver blocked on a channel is woken by every send, one futex wake-up
//! and context switch per span on the Varnish worker's CPU (measured: a quarter of the
//! tracing cost at 100% sampling). Sleeping a tick and draining what arrived costs one wake-up
//! per tick whatever the rate; the queue must hold a tick's worth of messages. Nothing ever
//! waits on the queue, so it is a plain lock-free array (crossbeam's `ArrayQueue`), not a
//! channel: a channel's send also checked for receivers to wake, and its receive cost more
//! (about 100 and 90 instructions against 30 each, callgrind; three messages per sampled span).
//!
//! Threading: `try_send` may be called from any Varnish worker thread; `spawn` and `stop` run on
//! the CLI thread (VCL events), which must never block for long, hence the deadline on `stop`.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError};
use crossbeam_queue::ArrayQueue;

/// Messages and ticks that panicked, in every worker (published as `OPENTRACING.internal_errors`).
pub static PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The worker's side of its queue, for jobs that need to look at waiting messages in the
/// middle of a tick (the tailer does, before deciding a transaction is not one of ours).
pub struct Inbox<'a, M>(&'a ArrayQueue<M>);

impl<M> Inbox<'_, M> {
    pub fn try_next(&self) -> Option<M> {
        self.0.pop()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What a worker does with its messages.
pub trait Job<M>: Send + 'static {
    fn handle(&mut self, msg: M);
    /// Called every `tick` while the worker runs (timed work: flushes, deadline sweeps,
    /// reading the log), after the waiting messages were handled.
    fn tick(&mut self, inbox: &Inbox<'_, M>);
    /// Called once after the worker was told to stop and its queue drained, before the thread exits.
    fn finish(&mut self);
    /// Whether the job has nothing in hand: the worker then sleeps its longer idle tick, so that
    /// an untraced varnishd is not woken a thousand times a second for nothing.
    fn idle(&self) -> bool {
        false
    }
    /// What the last tick did besides handling messages, in messages' worth (the tailer's log
    /// reading): it counts toward the rate that sets how long a busy worker sleeps
    /// (`busy_sleep`), so that a longer sleep does not pile up more of that work per tick.
    fn other_work(&self) -> usize {
        0
    }
}

/// Whether a job may sleep its longer idle tick: only when its last tick ended with nothing in
/// hand and no message had come since the tick before. Not merely "nothing in hand": at high
/// rates most of the tailer's ticks end with every span complete, and a 20 ms sleep then gave
/// each tick four times the work, a millisecond in one go on the workers' CPU (measured with
/// `perf sched`: it was the p99 latency added at 100% sampling).
#[derive(Default)]
pub struct Activity {
    /// A message came since the last tick ended.
    messages: bool,
    quiet: bool,
}

impl Activity {
    /// A message was handled.
    pub fn message(&mut self) {
        self.messages = true;
    }

    /// A tick ended, with nothing left to do or not.
    pub fn tick_ended(&mut self, nothing_in_hand: bool) {
        self.quiet = nothing_in_hand && !self.messages;
        self.messages = false;
    }

    pub fn quiet(&self) -> bool {
        self.quiet
    }
}

/// Messages (and other work, `Job::other_work`) a tick is meant to find at low rates (see
/// `busy_sleep`), at most a quarter of the queue's capacity.
const MESSAGES_PER_TICK: u32 = 64;

/// How long a worker with work in hand sleeps: `tick` at high rates; at low rates longer, so
/// that a tick finds about `per_tick` messages' worth of work, up to `idle_tick`. `work` came
/// during about the last `cycle` (the messages that waited at its start, the sleep and the
/// tick before; the tick's own other work). With no work at all, `idle_tick`: a job still
/// holding something (spans waiting for their log, a partial batch) waits for deadlines of
/// seconds, where 15 ms more do not matter.
///
/// Why: every wake-up preempts a Varnish worker on the CPU they share and costs it its caches.
/// At 1% sampling both background threads have a few messages every tick and never idle; with
/// 5 ms ticks they cost about 0.4% more CPU per hit than at 20 ms (`bench/paired.py`,
/// `sampled_0` with the idle tick set to 5 ms against 20 ms). At high rates the tick stays
/// short: a longer one holds more spans in flight (10 ms cost 1.8% more CPU per hit at 100%)
/// and makes each run longer on the workers' CPU (p99).
fn busy_sleep(tick: Duration, idle_tick: Duration, work: usize, cycle: Duration, per_tick: u32) -> Duration {
    if work == 0 {
        return idle_tick.max(tick);
    }
    // The sleep in which `per_tick` messages come at the last cycle's rate.
    let sleep = cycle.saturating_mul(per_tick.max(1)) / u32::try_from(work).unwrap_or(u32::MAX);
    sleep.clamp(tick, idle_tick.max(tick))
}

/// What a worker's queue held at the start of its last cycle.
#[derive(Clone, Copy)]
struct Queued {
    waiting: usize,
    capacity: usize,
    /// `per_tick(capacity)`.
    per_tick: u32,
}

/// The sleep of a worker with work in hand: its short tick when the queue was full (the rate is
/// not known then, only that it is high: a longer sleep would refuse more), else `busy_sleep`
/// for the messages and the other work of the last cycle.
fn sleep_with_work(tick: Duration, idle_tick: Duration, queue: Queued, other_work: usize, cycle: Duration) -> Duration {
    if queue.waiting >= queue.capacity {
        return tick;
    }
    busy_sleep(tick, idle_tick, queue.waiting.saturating_add(other_work), cycle, queue.per_tick)
}

/// The work a tick of a worker whose queue holds `capacity` messages is meant to find: a
/// quarter of the queue at most, so that a rate four times the last one still fits.
fn per_tick(capacity: usize) -> u32 {
    MESSAGES_PER_TICK.min(u32::try_from(capacity / 4).unwrap_or(u32::MAX)).max(1)
}

pub struct Worker<M: Send + 'static> {
    name: &'static str,
    queue: Arc<ArrayQueue<M>>,
    stopping: Arc<AtomicBool>,
    done: Receiver<()>,
    /// Taken by `stop`.
    handle: Option<JoinHandle<()>>,
}

/// A worker dropped without `stop` (an error path) is told to stop all the same: nothing else
/// ends its thread (no channel closes with its owner), which would otherwise run on, holding
/// its queue and its connection. Does not wait.
impl<M: Send + 'static> Drop for Worker<M> {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(handle) = &self.handle {
            handle.thread().unpark();
        }
    }
}

impl<M: Send + 'static> Worker<M> {
    pub fn spawn(name: &'static str, capacity: usize, tick: Duration, job: impl Job<M>) -> io::Result<Self> {
        Worker::spawn_with_idle_tick(name, capacity, tick, tick, job)
    }

    /// `spawn`, sleeping `idle_tick` instead of `tick` while the job says it is idle. Messages
    /// sent meanwhile wait at most `idle_tick` (the queue must hold that many).
    pub fn spawn_with_idle_tick<J: Job<M>>(
        name: &'static str,
        capacity: usize,
        tick: Duration,
        idle_tick: Duration,
        mut job: J,
    ) -> io::Result<Self> {
        // At least one place (an `ArrayQueue` cannot be empty of room).
        let queue = Arc::new(ArrayQueue::<M>::new(capacity.max(1)));
        let rx = queue.clone();
        let stopping = Arc::new(AtomicBool::new(false));
        let stop_seen = stopping.clone();
        let (done_tx, done) = bounded::<()>(1);
        let handle = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
            // A panic in one message or tick (a bug) costs that message or tick, counted in
            // `PANICS`, not the worker: a dead worker would leave its queue to fill up.
            // The outer guard is for what remains (finish, the loop itself): the worker then
            // ends as if stopped.
            let guarded = |f: &mut dyn FnMut()| {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
                    PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            };
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let handle_waiting = |job: &mut J| {
                    while let Some(msg) = rx.pop() {
                        let mut msg = Some(msg);
                        guarded(&mut || {
                            if let Some(m) = msg.take() {
                                job.handle(m);
                            }
                        });
                    }
                };
                let mut cycle_started = std::time::Instant::now();
                let (capacity, aim) = (rx.capacity(), per_tick(rx.capacity()));
                loop {
                    let waiting = rx.len();
                    handle_waiting(&mut job);
                    guarded(&mut || job.tick(&Inbox(&rx)));
                    let now = std::time::Instant::now();
                    let cycle = now.duration_since(cycle_started);
                    cycle_started = now;
                    let sleep = if rx.is_empty() && job.idle() {
                        idle_tick
                    } else {
                        let queue = Queued { waiting, capacity, per_tick: aim };
                        sleep_with_work(tick, idle_tick, queue, job.other_work(), cycle)
                    };
                    // Parked: sends never wake us, only `stop` does, and parking does not spin
                    // first (a channel's timed receive spun about 3,000 instructions per tick on
                    // the workers' CPU before sleeping).
                    if !stop_seen.load(Ordering::Acquire) {
                        std::thread::park_timeout(sleep);
                    }
                    if stop_seen.load(Ordering::Acquire) {
                        // Everything sent before `stop` (no one sends after: the owner gave the
                        // worker up to stop it).
                        handle_waiting(&mut job);
                        break;
                    }
                }
                job.finish();
            }));
            let _ = done_tx.send(());
        })?;
        Ok(Worker { name, queue, stopping, done, handle: Some(handle) })
    }

    /// Never blocks: a full queue hands the message back to the caller, who counts it.
    pub fn try_send(&self, msg: M) -> Result<(), M> {
        self.queue.push(msg)
    }

    /// Ends the worker's sleep now rather than at its tick (sends never do). For a job that
    /// sleeps long and must sometimes start at once (the dormant VSL tailer called back).
    pub fn wake(&self) {
        if let Some(handle) = &self.handle {
            handle.thread().unpark();
        }
    }

    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Tells the worker to stop and waits at most `deadline` for it to drain its queue and exit.
    /// Returns false if it did not finish in time: the thread is then left to finish on its own
    /// (it holds no Varnish resources), which beats blocking the CLI thread past `cli_timeout`.
    pub fn stop(mut self, deadline: Duration) -> bool {
        self.stopping.store(true, Ordering::Release);
        let Some(handle) = self.handle.take() else { return true };
        handle.thread().unpark();
        match self.done.recv_timeout(deadline) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                let _ = handle.join();
                true
            }
            Err(RecvTimeoutError::Timeout) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    struct Counting {
        seen: Arc<AtomicUsize>,
        finished: Arc<AtomicUsize>,
        delay: Duration,
    }

    impl Job<u32> for Counting {
        fn handle(&mut self, _msg: u32) {
            std::thread::sleep(self.delay);
            self.seen.fetch_add(1, Ordering::SeqCst);
        }
        fn tick(&mut self, _inbox: &Inbox<'_, u32>) {}
        fn finish(&mut self) {
            self.finished.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting(delay: Duration) -> (Counting, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let seen = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        (Counting { seen: seen.clone(), finished: finished.clone(), delay }, seen, finished)
    }

    #[test]
    fn a_busy_worker_sleeps_longer_at_low_rates_within_its_ticks() {
        let (tick, idle) = (Duration::from_millis(5), Duration::from_millis(20));
        let ms = Duration::from_millis;
        let n = per_tick(16_384);
        assert_eq!(n, MESSAGES_PER_TICK);
        // High rates: the short tick (at 100% sampling, hundreds of messages a tick).
        assert_eq!(busy_sleep(tick, idle, 750, ms(5), n), tick);
        assert_eq!(busy_sleep(tick, idle, MESSAGES_PER_TICK as usize, ms(5), n), tick);
        // In between: the sleep in which MESSAGES_PER_TICK messages come at the last rate.
        assert_eq!(busy_sleep(tick, idle, 32, ms(5), n), ms(10));
        assert_eq!(busy_sleep(tick, idle, 64, ms(12), n), ms(12), "a steady rate keeps its sleep");
        // Low rates and no message at all: the idle tick, never more.
        assert_eq!(busy_sleep(tick, idle, 3, ms(5), n), idle);
        assert_eq!(busy_sleep(tick, idle, 0, ms(5), n), idle);
        assert_eq!(busy_sleep(tick, idle, 1, Duration::MAX, n), idle);
        // A worker without a longer idle tick keeps its tick.
        assert_eq!(busy_sleep(tick, tick, 1, ms(50), n), tick);
        assert_eq!(busy_sleep(tick, tick, 0, ms(50), n), tick);
        // A small queue aims at a quarter of itself: 10 places, 2 messages a tick. Ten
        // messages in 5 ms (a full queue's worth) keep the short tick.
        assert_eq!(per_tick(10), 2);
        assert_eq!(per_tick(1), 1);
        assert_eq!(busy_sleep(tick, idle, 10, ms(5), per_tick(10)), tick);
        assert_eq!(busy_sleep(tick, idle, 1, ms(5), per_tick(10)), ms(10));
    }

    #[test]
    fn a_full_queue_keeps_the_short_tick_and_other_work_counts_as_messages() {
        let (tick, idle, ms) = (Duration::from_millis(5), Duration::from_millis(20), Duration::from_millis);
        // A queue found full says only that the rate is high (what did not fit is not counted):
        // the short tick, however long the cycle was.
        let full = |capacity| Queued { waiting: capacity, capacity, per_tick: per_tick(capacity) };
        assert_eq!(sleep_with_work(tick, idle, full(10), 0, ms(20)), tick);
        assert_eq!(sleep_with_work(tick, idle, full(1_000), 0, ms(400)), tick);
        // Few messages but much other work (the tailer's log at a high request rate with little
        // sampled): the pace of the work, not of the messages.
        let few = Queued { waiting: 2, capacity: 32_768, per_tick: per_tick(32_768) };
        assert_eq!(sleep_with_work(tick, idle, few, 0, ms(20)), idle);
        assert_eq!(sleep_with_work(tick, idle, few, 126, ms(20)), ms(10));
        assert_eq!(sleep_with_work(tick, idle, few, usize::MAX, ms(20)), tick);
    }

    #[test]
    fn idle_only_after_a_tick_without_messages() {
        let mut a = Activity::default();
        assert!(!a.quiet(), "a new job keeps the short tick");
        // Spans came and all completed within the tick: still busy.
        a.message();
        a.tick_ended(true);
        assert!(!a.quiet());
        // Spans still pending, no new message: busy.
        a.tick_ended(false);
        assert!(!a.quiet());
        // Nothing pending, nothing came: idle.
        a.tick_ended(true);
        assert!(a.quiet());
        // A message wakes it up again from the next tick on.
        a.message();
        a.tick_ended(true);
        assert!(!a.quiet());
    }

    #[test]
    fn drains_everything_sent_before_stop() {
        let (job, seen, finished) = counting(Duration::ZERO);
        let w = Worker::spawn("test-drain", 100, Duration::from_millis(10), job).unwrap();
        for i in 0..50 {
            w.try_send(i).unwrap();
        }
        assert!(w.stop(Duration::from_secs(5)));
        assert_eq!(seen.load(Ordering::SeqCst), 50);
        assert_eq!(finished.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn full_queue_hands_the_message_back_instead_of_blocking() {
        let (job, _seen, _finished) = counting(Duration::from_millis(200));
        let w = Worker::spawn("test-full", 2, Duration::from_millis(10), job).unwrap();
        let mut refused = 0;
        for i in 0..20 {
            if w.try_send(i).is_err() {
                refused += 1;
            }
        }
        assert!(refused >= 17, "refused only {refused}");
        assert!(w.stop(Duration::from_secs(5)));
    }

    #[test]
    fn stop_gives_up_at_the_deadline() {
        let (job, _seen, _finished) = counting(Duration::from_millis(500));
        let w = Worker::spawn("test-slow", 10, Duration::from_millis(10), job).unwrap();
        for i in 0..5 {
            w.try_send(i).unwrap();
        }
        let t = Instant::now();
        assert!(!w.stop(Duration::from_millis(100)));
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn stop_wakes_a_worker_sleeping_a_long_tick() {
        // The worker sleeps ten minutes per tick; only `stop` waking it lets it finish within
        // the deadline, after draining what was sent.
        let (job, seen, finished) = counting(Duration::ZERO);
        let w = Worker::spawn("test-sleeper", 10, Duration::from_secs(600), job).unwrap();
        std::thread::sleep(Duration::from_millis(50)); // let it go to sleep
        w.try_send(1).unwrap();
        assert!(w.stop(Duration::from_secs(30)));
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        assert_eq!(finished.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_worker_dropped_without_stop_still_drains_finishes_and_exits() {
        // A ten-minute tick: only being told to stop ends the thread in time.
        let (job, seen, finished) = counting(Duration::ZERO);
        let w = Worker::spawn("test-dropped", 10, Duration::from_secs(600), job).unwrap();
        w.try_send(1).unwrap();
        drop(w);
        let deadline = Instant::now() + Duration::from_secs(30);
        while finished.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(finished.load(Ordering::SeqCst), 1, "the thread ran on");
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }

    struct Fragile {
        seen: Arc<AtomicUsize>,
        finished: Arc<AtomicUsize>,
    }

    impl Job<u32> for Fragile {
        fn handle(&mut self, msg: u32) {
            if msg == 3 {
                panic!("a bug in one message");
            }
            self.seen.fetch_add(1, Ordering::SeqCst);
        }
        fn tick(&mut self, _inbox: &Inbox<'_, u32>) {}
        fn finish(&mut self) {
            self.finished.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_panic_costs_one_message_not_the_worker() {
        let (seen, finished) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let job = Fragile { seen: seen.clone(), finished: finished.clone() };
        let w = Worker::spawn("test-fragile", 100, Duration::from_millis(5), job).unwrap();
        for i in 0..10 {
            w.try_send(i).unwrap();
        }
        assert!(w.stop(Duration::from_secs(5)));
        assert_eq!(seen.load(Ordering::SeqCst), 9, "every message but the one that panicked");
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        assert!(PANICS.load(Ordering::SeqCst) >= 1);
    }
}
