//! The process-wide span pipeline shared by every loaded VCL: started on the first warm VCL,
//! stopped (with a bounded wait) when the last one goes cold.
//!
//! Threading: `vcl_warm`/`vcl_cold` run on the CLI thread, serialised by Varnish. `submit` runs on
//! any worker thread and only takes the read side of a lock, never held across I/O.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use varnish::{Vsc, VscMetric};

use crate::config::{Config, LogSource, Settings};
use crate::counter::ShardedCounter;
use crate::export::otlp::StopSignal;
use crate::export::{ExportJob, PublishCounters};
use crate::sampling;
use crate::span::SpanRecord;
use crate::worker::Worker;

/// How often the exporter drains its queue. The queue must hold a tick's worth of spans: 5 ms
/// at the default 2048 holds 400k spans/s, beyond what one varnishd serves here.
pub const EXPORT_TICK: Duration = Duration::from_millis(5);

/// How often the exporter looks for spans while it has none (the counters are published at this
/// pace then).
pub const IDLE_TICK: Duration = Duration::from_millis(20);

/// How long the CLI thread may wait for the exporter to drain at the last cold VCL; well under
/// Varnish's default `cli_timeout` of 60 s.
pub const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// Counters of the pipeline, process-wide. Updated with relaxed atomics on any thread, and
/// copied by the exporter thread into the VSC segment (`varnishstat -f 'OPENTRACING.*'`).
#[derive(Default)]
pub struct Stats {
    /// Added to by every request and fetch the module sees: sharded (see `counter`).
    pub spans_started: ShardedCounter,
    pub spans_submitted: AtomicU64,
    pub spans_exported: AtomicU64,
    /// Dropped because the queue was full or no pipeline was running.
    pub spans_dropped: AtomicU64,
    /// Dropped after the export failed (collector down, refusing, or too slow).
    pub spans_dropped_export: AtomicU64,
    /// Sampled spans not recorded: the task's workspace had no room for Varnish's slot record.
    pub spans_dropped_workspace: AtomicU64,
    pub export_failures: AtomicU64,
    pub batches: AtomicU64,
    /// Spans closed by the deadline sweep after a rollback left them without a task.
    pub spans_closed_by_deadline: AtomicU64,
    /// Exporter threads that did not stop within `STOP_DEADLINE`.
    pub stop_timeouts: AtomicU64,
    // The VSL tailer's figures (stored by the tailer thread, except where noted).
    pub vsl_steps: AtomicU64,
    pub vsl_transactions_matched: AtomicU64,
    pub vsl_closed_from_log: AtomicU64,
    /// Closed with their task's own log buffer (`vsl::task_log`), on the workers; the tailer's
    /// `vsl_closed_from_log` does not count them (the published counter adds the two).
    pub vsl_closed_from_task_log: AtomicU64,
    /// Of those, the spans whose buffer lacked part of their log (`task_log`).
    pub vsl_task_log_partial: AtomicU64,
    pub vsl_closed_by_tailer_backstop: AtomicU64,
    /// Added by workers whose finished span did not fit in the tailer's queue.
    pub vsl_closed_by_backstop: AtomicU64,
    pub vsl_overruns: AtomicU64,
    /// Transactions whose records the writer overwrote while the tailer copied them.
    pub vsl_copies_overwritten: AtomicU64,
    pub vsl_pending: AtomicU64,
    pub vsl_not_followed: AtomicU64,
    pub vsl_abandoned: AtomicU64,
    pub vsl_wakeups: AtomicU64,
    /// Unsampled decisions kept in the task's own slot: their slot in the decision table was
    /// another task's (`decisions`).
    pub decisions_in_task_slot: AtomicU64,
}

pub static STATS: Stats = Stats {
    spans_started: ShardedCounter::new(),
    spans_submitted: AtomicU64::new(0),
    spans_exported: AtomicU64::new(0),
    spans_dropped: AtomicU64::new(0),
    spans_dropped_export: AtomicU64::new(0),
    spans_dropped_workspace: AtomicU64::new(0),
    export_failures: AtomicU64::new(0),
    batches: AtomicU64::new(0),
    spans_closed_by_deadline: AtomicU64::new(0),
    stop_timeouts: AtomicU64::new(0),
    vsl_steps: AtomicU64::new(0),
    vsl_transactions_matched: AtomicU64::new(0),
    vsl_closed_from_log: AtomicU64::new(0),
    vsl_closed_from_task_log: AtomicU64::new(0),
    vsl_task_log_partial: AtomicU64::new(0),
    vsl_closed_by_tailer_backstop: AtomicU64::new(0),
    vsl_closed_by_backstop: AtomicU64::new(0),
    vsl_overruns: AtomicU64::new(0),
    vsl_copies_overwritten: AtomicU64::new(0),
    vsl_pending: AtomicU64::new(0),
    vsl_not_followed: AtomicU64::new(0),
    vsl_abandoned: AtomicU64::new(0),
    vsl_wakeups: AtomicU64::new(0),
    decisions_in_task_slot: AtomicU64::new(0),
};

/// The counters as varnishstat shows them.
#[derive(VscMetric)]
#[repr(C)]
pub struct Counters {
    /// Spans started (sampled or not)
    #[counter]
    spans_started: AtomicU64,
    /// Finished sampled spans handed to the exporter
    #[counter]
    spans_submitted: AtomicU64,
    /// Spans written by the exporter
    #[counter]
    spans_exported: AtomicU64,
    /// Spans dropped because the export queue was full (or no pipeline ran)
    #[counter]
    spans_dropped: AtomicU64,
    /// Spans dropped because their export failed and retries ran out
    #[counter]
    spans_dropped_export: AtomicU64,
    /// Sampled spans not recorded because the task's workspace was too short for their slot
    #[counter]
    spans_dropped_workspace: AtomicU64,
    /// Failed export attempts (each retry counts)
    #[counter]
    export_failures: AtomicU64,
    /// Export attempts (batches sent or written)
    #[counter]
    export_batches: AtomicU64,
    /// Spans closed by the deadline after a rollback left them without a task
    #[counter]
    spans_closed_by_deadline: AtomicU64,
    /// Exporter stops that did not finish within the deadline
    #[counter]
    stop_timeouts: AtomicU64,
    /// Spans waiting in the export queue
    #[gauge]
    queue_depth: AtomicU64,
    /// Log entries (transaction batches and single records) the VSL tailer stepped through
    #[counter]
    vsl_records: AtomicU64,
    /// Log transactions that belonged to a traced span
    #[counter]
    vsl_transactions_matched: AtomicU64,
    /// Spans closed with Varnish's log records (read by the tailer, or from their task's own log buffer)
    #[counter]
    vsl_spans_closed_from_log: AtomicU64,
    /// Of those, spans closed with the records of their task's own log buffer, on the worker
    #[counter]
    vsl_spans_closed_from_task_log: AtomicU64,
    /// Of those (OPENTRACING_VSL=task), spans whose buffer lacked part of their log: a restart or retry before, or records written out early
    #[counter]
    vsl_task_log_partial: AtomicU64,
    /// Spans closed from their task data because the log did not deliver in time
    #[counter]
    vsl_spans_closed_by_backstop: AtomicU64,
    /// Times the log writer lapped the tailer (overwrote records before the tailer read them)
    #[counter]
    vsl_overruns: AtomicU64,
    /// Transactions whose records were overwritten while the tailer copied them
    #[counter]
    vsl_batches_overwritten: AtomicU64,
    /// Spans waiting for their log data
    #[gauge]
    vsl_pending: AtomicU64,
    /// Sampled spans the tailer could not follow (its 16384 places taken); those left to it closed from their task data
    #[counter]
    vsl_spans_not_followed: AtomicU64,
    /// Followed spans dropped without their task's end: after 10 minutes, or once their log ended (a message lost to a full queue)
    #[counter]
    vsl_spans_abandoned: AtomicU64,
    /// 1 while the tailer is attached to the log
    #[gauge]
    vsl_attached: AtomicU64,
    /// 1 while the tailer reads the log; 0 while it is dormant (nothing needed the log for 10 s)
    #[gauge]
    vsl_reading: AtomicU64,
    /// Times a worker called the dormant tailer back to read the log (a restart, a retry, records written out early)
    #[counter]
    vsl_tailer_wakeups: AtomicU64,
    /// Internal errors (panics) caught in the background threads; each cost one span or batch
    #[counter]
    internal_errors: AtomicU64,
    /// Span records allocated because none was free for reuse (the exporter gives records back after each batch)
    #[counter]
    span_records_allocated: AtomicU64,
    /// Unsampled decisions kept in the task's own slot because their slot in the decision table was another task's
    #[counter]
    decisions_in_task_slot: AtomicU64,
    /// Decision table entries of another task overwritten because they were over an hour old
    #[counter]
    decisions_taken_over: AtomicU64,
}

impl Counters {
    /// Copies the process-wide counters (called from the exporter thread's tick).
    pub fn publish(&self, queue_depth: usize) {
        let copy = |to: &AtomicU64, from: &AtomicU64| to.store(from.load(Relaxed), Relaxed);
        self.spans_started.store(STATS.spans_started.sum(), Relaxed);
        copy(&self.spans_submitted, &STATS.spans_submitted);
        copy(&self.spans_exported, &STATS.spans_exported);
        copy(&self.spans_dropped, &STATS.spans_dropped);
        copy(&self.spans_dropped_export, &STATS.spans_dropped_export);
        copy(&self.spans_dropped_workspace, &STATS.spans_dropped_workspace);
        copy(&self.export_failures, &STATS.export_failures);
        copy(&self.export_batches, &STATS.batches);
        copy(&self.spans_closed_by_deadline, &STATS.spans_closed_by_deadline);
        copy(&self.stop_timeouts, &STATS.stop_timeouts);
        self.queue_depth.store(queue_depth as u64, Relaxed);
        copy(&self.vsl_records, &STATS.vsl_steps);
        copy(&self.vsl_transactions_matched, &STATS.vsl_transactions_matched);
        let from_task_log = STATS.vsl_closed_from_task_log.load(Relaxed);
        self.vsl_spans_closed_from_log.store(STATS.vsl_closed_from_log.load(Relaxed) + from_task_log, Relaxed);
        self.vsl_spans_closed_from_task_log.store(from_task_log, Relaxed);
        copy(&self.vsl_task_log_partial, &STATS.vsl_task_log_partial);
        let backstop = STATS.vsl_closed_by_tailer_backstop.load(Relaxed) + STATS.vsl_closed_by_backstop.load(Relaxed);
        self.vsl_spans_closed_by_backstop.store(backstop, Relaxed);
        copy(&self.vsl_overruns, &STATS.vsl_overruns);
        copy(&self.vsl_batches_overwritten, &STATS.vsl_copies_overwritten);
        copy(&self.vsl_pending, &STATS.vsl_pending);
        copy(&self.vsl_spans_not_followed, &STATS.vsl_not_followed);
        copy(&self.vsl_spans_abandoned, &STATS.vsl_abandoned);
        self.vsl_attached.store(u64::from(crate::vsl::tailer::ATTACHED.load(Relaxed)), Relaxed);
        self.vsl_reading.store(u64::from(crate::vsl::tailer::reading()), Relaxed);
        copy(&self.vsl_tailer_wakeups, &STATS.vsl_wakeups);
        copy(&self.internal_errors, &crate::worker::PANICS);
        self.span_records_allocated.store(crate::span_pool::allocated(), Relaxed);
        copy(&self.decisions_in_task_slot, &STATS.decisions_in_task_slot);
        copy(&self.decisions_taken_over, &crate::decisions::TAKEN_OVER);
    }
}

/// The VSC segment, shared by the CLI thread (which creates and destroys it) and the exporter
/// thread (which writes it).
pub struct SharedCounters(Vsc<Counters>);

// SAFETY: the segment is shared memory that Varnish never moves; we only write it with atomics.
unsafe impl Send for SharedCounters {}
unsafe impl Sync for SharedCounters {}

impl PublishCounters for SharedCounters {
    fn publish(&self, queue_depth: usize) {
        self.0.publish(queue_depth);
    }
}

impl std::ops::Deref for SharedCounters {
    type Target = Counters;
    fn deref(&self) -> &Counters {
        &self.0
    }
}

struct Lifecycle {
    counters: Option<Arc<SharedCounters>>,
    warm_vcls: usize,
    /// The configuration the pipeline runs with (that of the VCL warmed last).
    running: Option<Config>,
    /// Tells the running exporter's requests when they must give up.
    stop_signal: Option<StopSignal>,
    exit_hook: bool,
}

extern "C" {
    fn atexit(f: extern "C" fn()) -> std::ffi::c_int;
}

/// When varnishd stops its child, the child exits without cooling its VCLs: drain what is queued
/// before the process goes. (Registered from this library, glibc runs it at dlclose too, so it
/// never outlives the code it points to.)
extern "C" fn drain_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        if !crate::vsl::tailer::stop(EXIT_DEADLINE) {
            STATS.stop_timeouts.fetch_add(1, Relaxed);
        }
        let signal = LIFECYCLE.try_lock().and_then(|l| l.stop_signal.clone());
        if let Some(s) = signal {
            s.stop_by(Instant::now() + EXIT_DEADLINE.saturating_sub(Duration::from_millis(200)));
        }
        let worker = EXPORTER.write().take();
        if let Some(w) = worker {
            if !w.stop(EXIT_DEADLINE) {
                STATS.stop_timeouts.fetch_add(1, Relaxed);
            }
        }
    });
}

/// How long process exit may wait for queued spans to be written.
pub const EXIT_DEADLINE: Duration = Duration::from_secs(2);

static LIFECYCLE: Mutex<Lifecycle> =
    Mutex::new(Lifecycle { counters: None, warm_vcls: 0, running: None, stop_signal: None, exit_hook: false });
static EXPORTER: RwLock<Option<Worker<Box<SpanRecord>>>> = RwLock::new(None);

/// `OTEL_SDK_DISABLED=true`: the module does nothing at all; trace headers pass through as the
/// client sent them.
static DISABLED: AtomicBool = AtomicBool::new(false);

pub fn disabled() -> bool {
    DISABLED.load(Relaxed)
}

/// Starts an exporter for `cfg` (CLI thread). Fails, with nothing started, on a bad output.
fn start_exporter(life: &mut Lifecycle, cfg: &Config) -> Result<(Worker<Box<SpanRecord>>, StopSignal), String> {
    // One segment per loaded copy of the library, created on the CLI thread as VRT requires.
    let counters = life.counters.get_or_insert_with(|| Arc::new(SharedCounters(Vsc::new("OPENTRACING", "")))).clone();
    let stop = StopSignal::new();
    let job = ExportJob::new(cfg.export.clone(), Some(counters as Arc<dyn PublishCounters>), stop.clone())?;
    crate::span_pool::open();
    let worker = Worker::spawn_with_idle_tick("otel-export", cfg.export.queue_size, EXPORT_TICK, IDLE_TICK, job)
        .map_err(|e| format!("cannot start the exporter thread: {e}"))?;
    Ok((worker, stop))
}

/// Stops an exporter that was replaced, on a thread of its own so that the CLI thread never
/// waits for a slow collector; it finishes within `STOP_DEADLINE` like any stop.
fn retire_exporter(worker: Worker<Box<SpanRecord>>, stop: StopSignal) {
    let retire = move || {
        stop.stop_by(Instant::now() + STOP_DEADLINE.saturating_sub(Duration::from_millis(500)));
        if !worker.stop(STOP_DEADLINE) {
            STATS.stop_timeouts.fetch_add(1, Relaxed);
        }
    };
    if let Err(e) = std::thread::Builder::new().name("otel-retire".to_owned()).spawn(retire) {
        crate::varnish::log::global(format!("cannot start a thread to stop the previous exporter: {e}"));
    }
}

fn apply_request_path_settings(cfg: &Config) {
    DISABLED.store(cfg.disabled, Relaxed);
    crate::vsl::task_log::set_mode(match cfg.log_source {
        LogSource::Shared => crate::vsl::task_log::Mode::WhenWhole,
        LogSource::Task => crate::vsl::task_log::Mode::Always,
        LogSource::Off => crate::vsl::task_log::Mode::Never,
    });
    sampling::set_active(cfg.sampler);
    cfg.limits.activate();
    crate::config::activate(&cfg.spans);
}

fn start_tailer(cfg: &Config) -> Result<(), String> {
    // No spans when the SDK is disabled: nothing for the tailer to do.
    if cfg.wants_tailer() {
        // The child's working directory is the instance's -n folder (research §1).
        let workdir = std::env::current_dir().map_err(|e| format!("cannot read the working directory: {e}"))?;
        crate::vsl::tailer::start(workdir)?;
    }
    Ok(())
}

/// Checks settings completely, outputs included (a span file that cannot be opened, a TLS file
/// that is not a certificate), so that `vcl.load` fails on them rather than losing spans later.
/// CLI thread (VCL load and `vcl_init`).
pub fn check(settings: &Settings) -> Result<(), String> {
    let cfg = Config::from_settings(settings)?;
    // The same constructor the exporter uses; dropped at once (no thread is started).
    ExportJob::new(cfg.export, None, StopSignal::new()).map(drop)
}

/// A VCL became warm with `settings` (CLI thread). Starts the pipeline if it is the first; with
/// other VCLs warm already, their pipeline switches to these settings if they differ (the
/// settings of the VCL warmed last apply). Returns a message for the log. Never fails: Varnish
/// does not let a VMOD fail a warm event, and the settings were checked when the VCL loaded; a
/// pipeline that still cannot start leaves tracing off (spans are counted as dropped) and says why.
pub fn vcl_warm(settings: &Settings) -> String {
    // Before anything can fail: the switch must be settled before the first traced request.
    crate::decisions::read_switch();
    let mut life = LIFECYCLE.lock();
    life.warm_vcls += 1;
    let warm = life.warm_vcls;
    match warm_up(&mut life, settings) {
        Ok((what, summary)) => format!("{what} ({warm} warm VCLs): {summary}"),
        Err(e) => {
            format!("cannot apply the settings of the VCL warmed last, tracing may be off ({warm} warm VCLs): {e}")
        }
    }
}

fn warm_up(life: &mut Lifecycle, settings: &Settings) -> Result<(&'static str, String), String> {
    let cfg = Config::from_settings(settings)?;
    // What the request path reads applies whatever happens to the exporter.
    apply_request_path_settings(&cfg);
    let what = if !is_running() {
        let (worker, stop) = start_exporter(life, &cfg)?;
        *EXPORTER.write() = Some(worker);
        life.stop_signal = Some(stop);
        apply_request_path_settings(&cfg);
        if !crate::vsl::tailer::is_running() {
            start_tailer(&cfg)?;
        }
        if !life.exit_hook {
            // SAFETY: registering a plain extern "C" function with the C library.
            life.exit_hook = unsafe { atexit(drain_at_exit) } == 0;
        }
        "pipeline started"
    } else if life.running.as_ref() != Some(&cfg) {
        // Only a change of export settings replaces the exporter. Start the new one before
        // touching the old one: if it cannot start, the old one keeps going.
        if life.running.as_ref().is_none_or(|r| r.export != cfg.export) {
            let (worker, stop) = start_exporter(life, &cfg)?;
            let old = EXPORTER.write().replace(worker);
            let old_stop = life.stop_signal.replace(stop).unwrap_or_default();
            if let Some(old) = old {
                retire_exporter(old, old_stop);
            }
            // Stays in force even if the tailer step below fails.
            if let Some(r) = life.running.as_mut() {
                r.export = cfg.export.clone();
            }
        }
        let tailer_wanted = cfg.wants_tailer();
        if tailer_wanted != crate::vsl::tailer::is_running() {
            if tailer_wanted {
                start_tailer(&cfg)?;
            } else if !crate::vsl::tailer::stop(STOP_DEADLINE) {
                STATS.stop_timeouts.fetch_add(1, Relaxed);
            }
        }
        "pipeline switched to the settings of the VCL warmed last"
    } else {
        "pipeline kept (same settings)"
    };
    let summary = describe(&cfg);
    life.running = Some(cfg);
    Ok((what, summary))
}

fn describe(cfg: &Config) -> String {
    if cfg.disabled {
        return "disabled (OTEL_SDK_DISABLED=true)".to_owned();
    }
    format!(
        "spans to {}, sampler {:?}, service.name {}",
        cfg.export.sink,
        cfg.sampler,
        cfg.export.resource.get("service.name").unwrap_or("?")
    )
}

/// A warm VCL went cold (or was discarded while warm). Stops the pipeline after the last one.
pub fn vcl_cold() -> String {
    let mut life = LIFECYCLE.lock();
    life.warm_vcls = life.warm_vcls.saturating_sub(1);
    if life.warm_vcls > 0 {
        return format!("pipeline kept for {} warm VCLs", life.warm_vcls);
    }
    life.running = None;
    // One deadline for the whole stop, tailer and exporter together.
    let deadline = Instant::now() + STOP_DEADLINE;
    // Requests in flight give up in time for the exporter to count what is left and stop.
    if let Some(s) = &life.stop_signal {
        s.stop_by(deadline - Duration::from_millis(500));
    }
    // The tailer first: its last tick hands every finished span to the exporter.
    if !crate::vsl::tailer::stop(STOP_DEADLINE / 2) {
        STATS.stop_timeouts.fetch_add(1, Relaxed);
    }
    let worker = EXPORTER.write().take();
    let stopped = match worker {
        Some(w) => {
            if w.stop(deadline.saturating_duration_since(Instant::now())) {
                "pipeline stopped".to_owned()
            } else {
                STATS.stop_timeouts.fetch_add(1, Relaxed);
                // The exporter may still write the segment: never destroy it under its feet.
                if let Some(c) = &life.counters {
                    std::mem::forget(Arc::clone(c));
                }
                format!("pipeline stop timed out after {STOP_DEADLINE:?}; exporter left to finish")
            }
        }
        None => "pipeline was not running".to_owned(),
    };
    // The library may be unloaded next: no record may stay pooled in a static, including those
    // an exporter left to finish gives back later (it frees them).
    crate::span_pool::close();
    stopped
}

pub fn is_running() -> bool {
    EXPORTER.read().is_some()
}

/// Hands a finished span to the exporter. Never blocks; drops and counts when it cannot.
pub fn submit(span: Box<SpanRecord>) {
    submit_all(std::iter::once(span));
}

/// `submit` for many spans (the tailer's, once per tick): the lock and the counters are taken
/// once, not per span (three atomic operations fewer per span on the tailer's thread).
pub fn submit_all<I: ExactSizeIterator<Item = Box<SpanRecord>>>(spans: I) {
    let n = spans.len() as u64;
    if n == 0 {
        return;
    }
    STATS.spans_submitted.fetch_add(n, Relaxed);
    let guard = EXPORTER.read();
    let accepted = match guard.as_ref() {
        Some(w) => spans.map(|span| u64::from(w.try_send(span).is_ok())).sum(),
        None => 0,
    };
    if accepted < n {
        STATS.spans_dropped.fetch_add(n - accepted, Relaxed);
    }
}

pub fn queue_len() -> usize {
    EXPORTER.read().as_ref().map_or(0, |w| w.queue_len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{SpanId, TraceId};
    use crate::span::SpanKind;

    #[test]
    fn spans_submitted_without_an_exporter_are_counted_as_dropped() {
        let span = || Box::new(SpanRecord::new(SpanKind::Server, TraceId([1; 16]), SpanId([2; 8]), None));
        let (submitted, dropped) = (STATS.spans_submitted.load(Relaxed), STATS.spans_dropped.load(Relaxed));
        submit_all(vec![span(), span(), span()].into_iter());
        submit_all(Vec::new().into_iter());
        assert_eq!(STATS.spans_submitted.load(Relaxed) - submitted, 3);
        assert_eq!(STATS.spans_dropped.load(Relaxed) - dropped, 3);
    }
}
