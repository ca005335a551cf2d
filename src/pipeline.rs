//! The process-wide span pipeline shared by every loaded VCL: started on the first warm VCL,
//! stopped (with a bounded wait) when the last one goes cold.
//!
//! Threading: `vcl_warm`/`vcl_cold` run on the CLI thread, serialised by Varnish. `submit` runs on
//! any worker thread and only takes the read side of a lock, never held across I/O.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::export::{ExportConfig, ExportJob, Sink};
use crate::span::SpanRecord;
use crate::worker::Worker;

/// How long the CLI thread may wait for the exporter to drain at the last cold VCL; well under
/// Varnish's default `cli_timeout` of 60 s.
pub const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// Counters of the pipeline, process-wide.
#[derive(Default)]
pub struct Stats {
    pub spans_started: AtomicU64,
    pub spans_submitted: AtomicU64,
    pub spans_exported: AtomicU64,
    /// Dropped because the queue was full, no pipeline was running, or a write failed.
    pub spans_dropped: AtomicU64,
    pub export_failures: AtomicU64,
    pub batches: AtomicU64,
    /// Spans closed by the deadline sweep after a rollback left them without a task.
    pub spans_closed_by_deadline: AtomicU64,
    /// Exporter threads that did not stop within `STOP_DEADLINE`.
    pub stop_timeouts: AtomicU64,
}

pub static STATS: Stats = Stats {
    spans_started: AtomicU64::new(0),
    spans_submitted: AtomicU64::new(0),
    spans_exported: AtomicU64::new(0),
    spans_dropped: AtomicU64::new(0),
    export_failures: AtomicU64::new(0),
    batches: AtomicU64::new(0),
    spans_closed_by_deadline: AtomicU64::new(0),
    stop_timeouts: AtomicU64::new(0),
};

struct Lifecycle {
    warm_vcls: usize,
    sink: Option<Sink>,
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

static LIFECYCLE: Mutex<Lifecycle> = Mutex::new(Lifecycle { warm_vcls: 0, sink: None, exit_hook: false });
static EXPORTER: RwLock<Option<Worker<Box<SpanRecord>>>> = RwLock::new(None);

/// A VCL became warm. Starts the pipeline if it is the first. Returns a message for the log.
pub fn vcl_warm() -> Result<String, String> {
    let mut life = LIFECYCLE.lock();
    if life.warm_vcls == 0 {
        let cfg = ExportConfig::from_env()?;
        let sink = cfg.sink.clone();
        let job = ExportJob::new(cfg.clone()).map_err(|e| format!("cannot open the span output {sink:?}: {e}"))?;
        let worker = Worker::spawn("otel-export", cfg.queue_size, Duration::from_millis(50), job)
            .map_err(|e| format!("cannot start the exporter thread: {e}"))?;
        *EXPORTER.write() = Some(worker);
        life.sink = Some(sink);
        if !life.exit_hook {
            // SAFETY: registering a plain extern "C" function with the C library.
            life.exit_hook = unsafe { atexit(drain_at_exit) } == 0;
        }
    }
    life.warm_vcls += 1;
    Ok(format!("pipeline running ({} warm VCLs), spans to {:?}", life.warm_vcls, life.sink.as_ref().unwrap()))
}

/// A VCL went cold (or was discarded while warm). Stops the pipeline after the last one.
pub fn vcl_cold() -> String {
    let mut life = LIFECYCLE.lock();
    life.warm_vcls = life.warm_vcls.saturating_sub(1);
    if life.warm_vcls > 0 {
        return format!("pipeline kept for {} warm VCLs", life.warm_vcls);
    }
    life.sink = None;
    let worker = EXPORTER.write().take();
    match worker {
        Some(w) => {
            if w.stop(STOP_DEADLINE) {
                "pipeline stopped".to_owned()
            } else {
                STATS.stop_timeouts.fetch_add(1, Relaxed);
                format!("pipeline stop timed out after {STOP_DEADLINE:?}; exporter left to finish")
            }
        }
        None => "pipeline was not running".to_owned(),
    }
}

pub fn is_running() -> bool {
    EXPORTER.read().is_some()
}

/// Hands a finished span to the exporter. Never blocks; drops and counts when it cannot.
pub fn submit(span: Box<SpanRecord>) {
    STATS.spans_submitted.fetch_add(1, Relaxed);
    let guard = EXPORTER.read();
    let accepted = match guard.as_ref() {
        Some(w) => w.try_send(span).is_ok(),
        None => false,
    };
    if !accepted {
        STATS.spans_dropped.fetch_add(1, Relaxed);
    }
}

pub fn queue_len() -> usize {
    EXPORTER.read().as_ref().map_or(0, |w| w.queue_len())
}
