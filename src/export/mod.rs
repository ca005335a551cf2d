//! Getting finished spans out of varnishd: where they go (`config::Sink`), how they are encoded
//! (`otlp_proto`, `otlp_json`), how they are sent (`otlp`), and the exporter job that batches
//! them on its own thread, retries what a collector could not take, and counts what is dropped.

pub mod batch;
pub mod config;
pub mod otlp;
pub mod otlp_json;
pub mod otlp_proto;
pub mod resource;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use batch::{Batch, Encoding, Request, Spare};
pub use config::{ExportConfig, OtlpConfig, Protocol, Sink, DEFAULT_FILE, DEFAULT_QUEUE_SIZE};
use otlp::{ExportError, OtlpClient, StopSignal};

use crate::pipeline::STATS;
use crate::span::SpanRecord;
use crate::span_pool;
use crate::worker::{Activity, Inbox, Job};

/// Retries of a failed batch start after this and double each time, up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// At most one log line per this period about failing exports (a dead collector must not
/// flood the log).
const FAILURE_LOG_PERIOD: Duration = Duration::from_secs(60);
enum Output {
    File(File),
    Stdout,
    Otlp(Box<OtlpClient>),
    Discard,
}

/// Where the exporter publishes the counters, on each tick (varnishstat's segment:
/// `pipeline::SharedCounters`). A trait, so that the exporter does not depend on Varnish's shared
/// memory: its unit tests run without varnishd.
pub trait PublishCounters: Send + Sync {
    fn publish(&self, queue_depth: usize);
}

/// A batch that failed with a retryable error, waiting for its next attempt.
struct Retry {
    attempts: u32,
    next: Instant,
    /// The batch is dropped once this passes (`OTEL_BSP_EXPORT_TIMEOUT` after the first try).
    give_up: Instant,
}

/// The exporter job. Memory is bounded: at most `queue_size` spans wait here, encoded (more are
/// dropped and counted), besides those in the worker's queue (also `queue_size`) and the batch
/// being sent.
pub struct ExportJob {
    cfg: ExportConfig,
    counters: Option<Arc<dyn PublishCounters>>,
    out: Output,
    encoding: Encoding,
    /// The batch the spans are encoded into as they arrive (`batch`), begun with the first
    /// span after the last batch was closed: by then the batch sent before gave its buffer back,
    /// so one buffer goes round. While a batch is retried, it and every full batch waiting
    /// behind it hold a buffer of their own (bounded by `queue_size` spans in all).
    filling: Option<Batch>,
    /// Full batches waiting for their turn (behind a batch being retried).
    full: VecDeque<Batch>,
    /// Spans in `filling` and `full`.
    queued: usize,
    /// The batch being sent (kept while it is retried).
    sending: Option<Batch>,
    retry: Option<Retry>,
    /// Buffers of sent batches, for the next ones.
    spare: Spare,
    failures: FailureLog,
    /// The pipeline's stop deadline, once it is stopping (shared with the OTLP client).
    stop: StopSignal,
    /// Whether the last tick may be followed by the longer idle one.
    activity: Activity,
}

/// Rate-limited reporting of export failures, and of the recovery after them.
#[derive(Default)]
struct FailureLog {
    last_logged: Option<Instant>,
    failed_since_log: u64,
    failing: bool,
}

impl FailureLog {
    fn failed(&mut self, sink: &Sink, e: &ExportError, what: &str) {
        self.failing = true;
        self.failed_since_log += 1;
        let now = Instant::now();
        if self.last_logged.is_none_or(|t| now.duration_since(t) >= FAILURE_LOG_PERIOD) {
            crate::varnish::log::global(format!(
                "export to {sink} failed ({} failures since the last message): {}; {what}",
                self.failed_since_log, e.message
            ));
            self.last_logged = Some(now);
            self.failed_since_log = 0;
        }
    }

    fn succeeded(&mut self, sink: &Sink) {
        if self.failing {
            self.failing = false;
            crate::varnish::log::global(format!("export to {sink} works again"));
            self.last_logged = None;
            self.failed_since_log = 0;
        }
    }
}

impl ExportJob {
    /// Opens the output now, on the CLI thread, so that a bad path or TLS file fails the VCL
    /// load with a message instead of losing spans later.
    pub fn new(
        cfg: ExportConfig,
        counters: Option<Arc<dyn PublishCounters>>,
        stop: StopSignal,
    ) -> Result<Self, String> {
        let out = match &cfg.sink {
            Sink::File(p) => Output::File(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| format!("cannot open the span file {}: {e}", p.display()))?,
            ),
            Sink::Stdout => Output::Stdout,
            Sink::Otlp(o) => Output::Otlp(Box::new(OtlpClient::new(o, stop.clone())?)),
            Sink::None => Output::Discard,
        };
        let encoding = match &out {
            // One line per batch: with O_APPEND, lines from two library copies never interleave.
            Output::File(_) | Output::Stdout => Encoding::Json { line: true },
            Output::Otlp(client) if client.protocol() == Protocol::HttpJson => Encoding::Json { line: false },
            Output::Otlp(_) => Encoding::Protobuf,
            Output::Discard => Encoding::Nothing,
        };
        Ok(ExportJob {
            cfg,
            counters,
            out,
            encoding,
            filling: None,
            full: VecDeque::new(),
            queued: 0,
            sending: None,
            retry: None,
            spare: Spare::default(),
            failures: FailureLog::default(),
            stop,
            activity: Activity::default(),
        })
    }

    /// Closes the filling batch (when it holds any span): it waits in `full` for its turn.
    fn close_filling(&mut self) {
        if let Some(batch) = self.filling.take_if(|b| !b.is_empty()) {
            self.full.push_back(batch);
        }
    }

    /// Sends the full batches (and the filling one, when `all`), unless a retry is pending and
    /// not yet due. Stops at the first failure.
    fn export(&mut self, all: bool) {
        loop {
            if let Some(r) = &self.retry {
                if Instant::now() < r.next {
                    return;
                }
            }
            if self.sending.is_none() {
                if self.full.is_empty() && all {
                    self.close_filling();
                }
                let Some(batch) = self.full.pop_front() else { return };
                self.queued -= batch.len();
                self.sending = Some(batch);
            }
            if !self.send() {
                return;
            }
        }
    }

    /// One attempt at the batch in `sending`. Returns whether the exporter may go on with the
    /// next one.
    fn send(&mut self) -> bool {
        let Some(mut batch) = self.sending.take() else { return true };
        let n = batch.len() as u64;
        // A bug in encoding or sending must cost this batch, not the exporter thread (the
        // worker would end, and every later span would be dropped).
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            write_request(&mut self.out, batch.request(&self.cfg.resource))
        }))
        .unwrap_or_else(|_| Err(ExportError::fatal("internal error in the exporter".to_owned())));
        STATS.batches.fetch_add(1, Relaxed);
        match result {
            Ok(()) => {
                STATS.spans_exported.fetch_add(n, Relaxed);
                self.failures.succeeded(&self.cfg.sink);
                batch.recycle(&mut self.spare);
                self.retry = None;
                true
            }
            Err(e) => {
                STATS.export_failures.fetch_add(1, Relaxed);
                let now = Instant::now();
                let attempts = self.retry.as_ref().map_or(1, |r| r.attempts + 1);
                let give_up = self.retry.as_ref().map_or(now + self.cfg.export_timeout, |r| r.give_up);
                let backoff = (FIRST_BACKOFF * 2u32.saturating_pow(attempts - 1)).min(MAX_BACKOFF);
                // A collector's Retry-After is honoured within [FIRST_BACKOFF, MAX_BACKOFF]: a 0
                // must not turn into a retry every tick, nor a long one hold the queue.
                let next = now + e.retry_after.unwrap_or(backoff).clamp(FIRST_BACKOFF, MAX_BACKOFF);
                if e.retryable && next < give_up {
                    self.failures.failed(&self.cfg.sink, &e, "retrying");
                    self.retry = Some(Retry { attempts, next, give_up });
                    self.sending = Some(batch);
                } else {
                    let why = if e.retryable { "retries exhausted" } else { "not retryable" };
                    self.failures.failed(&self.cfg.sink, &e, &format!("{n} spans dropped ({why})"));
                    STATS.spans_dropped_export.fetch_add(n, Relaxed);
                    batch.recycle(&mut self.spare);
                    self.retry = None;
                }
                false
            }
        }
    }

    /// Spans waiting here, encoded or being sent.
    fn held(&self) -> usize {
        self.queued + self.sending.as_ref().map_or(0, Batch::len)
    }

    fn publish(&self, queue_depth: usize) {
        if let Some(c) = &self.counters {
            c.publish(queue_depth + self.held());
        }
    }
}

/// One attempt at sending `request` to `out`.
fn write_request(out: &mut Output, request: Request<'_>) -> Result<(), ExportError> {
    let io_error = |e: io::Error| ExportError::fatal(e.to_string());
    match (out, request) {
        (Output::Discard, _) | (_, Request::Nothing) => Ok(()),
        (Output::File(f), Request::Json(line)) => f.write_all(line.as_bytes()).map_err(io_error),
        (Output::Stdout, Request::Json(line)) => {
            let mut o = io::stdout().lock();
            o.write_all(line.as_bytes()).and_then(|_| o.flush()).map_err(io_error)
        }
        (Output::Otlp(client), Request::Protobuf { bytes, range }) => client.send(bytes, range),
        (Output::Otlp(client), Request::Json(text)) => {
            // The HTTP client borrows the bytes and gives them back as they were (a copy, if it
            // still holds them), for a retry.
            let mut body = std::mem::take(text).into_bytes();
            let whole = 0..body.len();
            let sent = client.send(&mut body, whole);
            *text = String::from_utf8(body).unwrap_or_default();
            sent
        }
        (Output::File(_) | Output::Stdout, Request::Protobuf { .. }) => {
            Err(ExportError::fatal("internal error: protobuf for a JSON output".to_owned()))
        }
    }
}

impl Job<Box<SpanRecord>> for ExportJob {
    fn handle(&mut self, mut span: Box<SpanRecord>) {
        self.activity.message();
        if self.queued >= self.cfg.queue_size {
            STATS.spans_dropped.fetch_add(1, Relaxed);
            span_pool::give(span);
            return;
        }
        // Here rather than where the span was completed: the encoder reads the attributes right
        // after, whereas the tailer would find them out of the CPU's caches.
        span.seal();
        let filling =
            self.filling.get_or_insert_with(|| Batch::new(self.encoding, &self.cfg.resource, &mut self.spare));
        if filling.push(&span) {
            self.queued += 1;
        } else {
            // A bug in the encoder (caught): the span could not be exported.
            crate::worker::PANICS.fetch_add(1, Relaxed);
            STATS.spans_dropped_export.fetch_add(1, Relaxed);
        }
        // Encoded: the record is no longer needed (a retry sends the bytes).
        span_pool::give(span);
        if self.filling.as_ref().is_some_and(|b| b.len() >= self.cfg.batch_size) {
            self.close_filling();
            if self.retry.is_none() {
                self.export(false);
            }
        }
    }

    fn tick(&mut self, inbox: &Inbox<'_, Box<SpanRecord>>) {
        self.publish(inbox.len());
        // Records parked by a rollback and never taken back are closed here (see varnish::task).
        for span in crate::varnish::task::sweep_stash() {
            self.handle(span);
        }
        let due =
            self.filling.as_ref().and_then(|b| b.first_at).is_some_and(|t| t.elapsed() >= self.cfg.flush_interval);
        self.export(due);
        self.activity.tick_ended(self.held() == 0);
    }

    fn idle(&self) -> bool {
        self.activity.quiet()
    }

    fn finish(&mut self) {
        // Stopping: send everything, retrying until the stop deadline (the OTLP client gives up
        // at the same instant), then count what is left as dropped.
        // The pipeline's deadline when it set one (the stop began before this thread got here:
        // an export in flight may have used most of it), else our own.
        let own = match &self.out {
            Output::Otlp(_) => {
                Instant::now() + crate::pipeline::STOP_DEADLINE.saturating_sub(Duration::from_millis(500))
            }
            _ => Instant::now() + Duration::from_secs(3600),
        };
        let stop_by = self.stop.deadline().map_or(own, |d| d.min(own));
        // A collector that failed twice in a row at shutdown is not waited for any longer.
        let mut failures_in_a_row = 0;
        while self.held() > 0 && Instant::now() < stop_by && failures_in_a_row < 2 {
            if let Some(r) = &mut self.retry {
                // Waiting for a retry only makes sense if it can happen before the deadline.
                if r.next >= stop_by {
                    break;
                }
                std::thread::sleep(r.next.saturating_duration_since(Instant::now()));
                r.next = Instant::now();
            }
            let before = STATS.export_failures.load(Relaxed);
            self.export(true);
            failures_in_a_row = if STATS.export_failures.load(Relaxed) > before { failures_in_a_row + 1 } else { 0 };
        }
        let left = self.held() as u64;
        if left > 0 {
            STATS.spans_dropped_export.fetch_add(left, Relaxed);
            crate::varnish::log::global(format!(
                "{left} spans dropped at shutdown: export to {} did not finish",
                self.cfg.sink
            ));
        }
        self.full.clear();
        self.sending = None;
        self.queued = 0;
        self.filling = None;
        self.publish(0);
        if let Output::Otlp(client) = std::mem::replace(&mut self.out, Output::Discard) {
            client.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{SpanId, TraceId};
    use crate::span::{SpanKind, ValueRef};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    use std::io::BufReader;
    use std::net::TcpListener;
    use std::sync::atomic::AtomicUsize;

    fn span(n: u8) -> Box<SpanRecord> {
        let mut r = SpanRecord::new(SpanKind::Server, TraceId([n; 16]), SpanId([n; 8]), None);
        r.add("url.path", ValueRef::Str(&format!("/{n}")));
        r.start_unix_nano = 1;
        r.end_unix_nano = 2;
        Box::new(r)
    }

    /// The queue depth each tick published.
    #[derive(Default)]
    struct Published(AtomicUsize);

    impl PublishCounters for Published {
        fn publish(&self, queue_depth: usize) {
            self.0.store(queue_depth, Relaxed);
        }
    }

    /// A collector that refuses the first request (503) and takes the second, on a real socket.
    /// The batch was encoded as its spans came, and their records went back to the pool: the
    /// retry sends the very same request, with every span, while spans that came meanwhile wait
    /// in the next batch; stopping sends those too.
    #[test]
    fn a_batch_is_retried_from_its_encoded_request() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}/v1/traces", l.local_addr().unwrap());
        let collector = std::thread::spawn(move || {
            let mut bodies = Vec::new();
            for status in ["503 Service Unavailable", "200 OK", "200 OK"] {
                let (s, _) = l.accept().unwrap();
                let mut r = BufReader::new(s);
                let (_, body) = otlp::tests::read_request(&mut r);
                let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                r.get_mut().write_all(reply.as_bytes()).unwrap();
                bodies.push(body);
            }
            bodies
        });
        let otlp = OtlpConfig {
            protocol: Protocol::HttpProtobuf,
            endpoint,
            headers: vec![],
            timeout: Duration::from_secs(5),
            gzip: false,
            certificate: None,
        };
        let cfg = ExportConfig {
            sink: Sink::Otlp(otlp),
            queue_size: 100,
            batch_size: 3,
            flush_interval: Duration::from_secs(60),
            export_timeout: Duration::from_secs(30),
            resource: otlp_json::Resource { attributes: vec![("service.name".into(), "varnish".into())] },
        };
        let published = Arc::new(Published::default());
        let counters: Arc<dyn PublishCounters> = published.clone();
        let mut job = ExportJob::new(cfg, Some(counters), StopSignal::new()).unwrap();
        for n in 1..=3 {
            job.handle(span(n)); // the third fills the batch: sent, refused
        }
        let next = job.retry.as_ref().expect("a retry is pending").next;
        job.handle(span(4));
        assert_eq!((job.held(), job.queued), (4, 1), "three being retried, one in the next batch");
        job.publish(0);
        assert_eq!(published.0.load(Relaxed), 4, "the queue depth counts the batch being retried");
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        job.export(false);
        assert!(job.retry.is_none() && job.sending.is_none(), "the retry went through");
        assert_eq!(job.held(), 1);
        job.finish(); // stopping sends the partial batch
        assert_eq!(job.held(), 0);
        let bodies = collector.join().unwrap();
        assert_eq!(bodies[0], bodies[1], "the retry sends the same request");
        let ids = |body: &[u8]| -> Vec<Vec<u8>> {
            let request = ExportTraceServiceRequest::decode(body).unwrap();
            request.resource_spans[0].scope_spans[0].spans.iter().map(|s| s.span_id.clone()).collect()
        };
        assert_eq!(ids(&bodies[1]), [vec![1; 8], vec![2; 8], vec![3; 8]]);
        assert_eq!(ids(&bodies[2]), [vec![4; 8]]);
        let lines = crate::varnish::log::GLOBAL_LINES.lock();
        assert!(lines.iter().any(|l| l.contains("failed") && l.contains("retrying")), "{lines:?}");
    }
}
