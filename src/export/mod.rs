//! Getting finished spans out of varnishd: where they go (`Sink`), how they are encoded, and the
//! exporter job that batches them on its own thread.

pub mod otlp_json;

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::pipeline::{SharedCounters, STATS};
use crate::span::SpanRecord;
use crate::worker::{Inbox, Job};
use otlp_json::Resource;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Where finished spans are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sink {
    /// OTLP/JSON lines appended to a file.
    File(PathBuf),
    /// OTLP/JSON lines on varnishd's standard output.
    Stdout,
    /// Spans are built and dropped (tracing context still propagates).
    None,
}

#[derive(Clone, Debug)]
pub struct ExportConfig {
    pub sink: Sink,
    pub queue_size: usize,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub resource: Resource,
}

pub const DEFAULT_FILE: &str = "opentracing-spans.jsonl";
pub const DEFAULT_QUEUE_SIZE: usize = 16384;

impl ExportConfig {
    /// Reads the `OTEL_*` variables of the varnishd process. An unknown exporter name is an error
    /// for `vcl.load` to report, never a request failure.
    pub fn from_env() -> Result<Self, String> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let sink = match var("OTEL_TRACES_EXPORTER").as_deref().map(str::trim) {
            None | Some("file") => {
                let path = var("OPENTRACING_SPANS_FILE").unwrap_or_else(|| DEFAULT_FILE.to_owned());
                let path = PathBuf::from(path);
                // Relative paths are relative to varnishd's working directory (its -n folder).
                Sink::File(if path.is_absolute() {
                    path
                } else {
                    std::env::current_dir().map(|d| d.join(&path)).unwrap_or(path)
                })
            }
            Some("console") | Some("stdout") => Sink::Stdout,
            Some("none") => Sink::None,
            Some(other) => {
                return Err(format!("OTEL_TRACES_EXPORTER={other:?} is not supported (use file, stdout or none)"))
            }
        };
        let number = |k: &str, default: usize| -> Result<usize, String> {
            match var(k) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("{k}={v:?} is not a positive integer")),
            }
        };
        // Not the SDK's 2048: the exporter drains every EXPORT_TICK and shares the CPUs with
        // Varnish's workers, which can delay it; 2048 dropped a quarter of the spans at 60k
        // spans/s in `make bench` (docs/performance.md). 16384 spans are at most ~8 MB.
        let queue_size = number("OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_QUEUE_SIZE)?;
        let batch_size = number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)?.min(queue_size);
        let flush_ms = number("OTEL_BSP_SCHEDULE_DELAY", 200)?;
        Ok(ExportConfig {
            sink,
            queue_size,
            batch_size,
            flush_interval: Duration::from_millis(flush_ms as u64),
            resource: Resource::from_env(),
        })
    }
}

enum Output {
    File(File),
    Stdout,
    Discard,
}

/// The exporter job: collects spans into batches and writes each batch as one line.
pub struct ExportJob {
    cfg: ExportConfig,
    counters: Option<Arc<SharedCounters>>,
    out: Output,
    batch: Vec<SpanRecord>,
    oldest: Option<Instant>,
    /// The encoding buffer, reused from batch to batch.
    line: String,
}

impl ExportJob {
    /// Opens the output now, on the CLI thread, so a bad path fails the VCL load with a message
    /// instead of losing spans later.
    pub fn new(cfg: ExportConfig, counters: Option<Arc<SharedCounters>>) -> io::Result<Self> {
        let out = match &cfg.sink {
            Sink::File(p) => Output::File(OpenOptions::new().create(true).append(true).open(p)?),
            Sink::Stdout => Output::Stdout,
            Sink::None => Output::Discard,
        };
        Ok(ExportJob {
            batch: Vec::with_capacity(cfg.batch_size),
            cfg,
            counters,
            out,
            oldest: None,
            line: String::new(),
        })
    }

    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let n = self.batch.len() as u64;
        let result = match &mut self.out {
            Output::Discard => Ok(()),
            out => {
                let line = &mut self.line;
                line.clear();
                otlp_json::write_export_request(line, &self.cfg.resource, &self.batch);
                line.push('\n');
                // One write per batch: with O_APPEND, lines from two library copies never interleave.
                match out {
                    Output::File(f) => f.write_all(line.as_bytes()),
                    _ => {
                        let mut o = io::stdout().lock();
                        o.write_all(line.as_bytes()).and_then(|_| o.flush())
                    }
                }
            }
        };
        match result {
            Ok(()) => {
                STATS.spans_exported.fetch_add(n, Relaxed);
                STATS.batches.fetch_add(1, Relaxed);
            }
            Err(_) => {
                STATS.export_failures.fetch_add(1, Relaxed);
                STATS.spans_dropped.fetch_add(n, Relaxed);
            }
        }
        self.batch.clear();
        self.oldest = None;
    }
}

impl Job<Box<SpanRecord>> for ExportJob {
    fn handle(&mut self, span: Box<SpanRecord>) {
        self.oldest.get_or_insert_with(Instant::now);
        self.batch.push(*span);
        if self.batch.len() >= self.cfg.batch_size {
            self.flush();
        }
    }

    fn tick(&mut self, inbox: &Inbox<'_, Box<SpanRecord>>) {
        if let Some(c) = &self.counters {
            c.publish(inbox.len());
        }
        // Records parked by a rollback and never taken back are closed here (see varnish::task).
        for span in crate::varnish::task::sweep_stash() {
            self.handle(span);
        }
        if self.oldest.is_some_and(|t| t.elapsed() >= self.cfg.flush_interval) {
            self.flush();
        }
    }

    fn finish(&mut self) {
        self.flush();
        if let Some(c) = &self.counters {
            c.publish(0);
        }
    }
}
