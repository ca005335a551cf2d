//! State shared by both servers: the current mode, the counters, the --out sink.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Mutex;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use serde_json::{json, Map, Value};

/// How the receiver answers export requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Decode, record, answer 200 / OK.
    Accept,
    /// HTTP 503 with `Retry-After: 1`, gRPC UNAVAILABLE.
    Refuse,
    /// Never answer; the body is not read.
    Blackhole,
    /// Like accept, but answer after 2 s.
    Slow,
    /// Count cheaply, record nothing, answer 200 / OK.
    Discard,
}

const MODES: [(&str, Mode); 5] = [
    ("accept", Mode::Accept),
    ("refuse", Mode::Refuse),
    ("blackhole", Mode::Blackhole),
    ("slow", Mode::Slow),
    ("discard", Mode::Discard),
];

impl Mode {
    pub fn parse(word: &str) -> Option<Mode> {
        MODES.iter().find(|(w, _)| *w == word).map(|&(_, m)| m)
    }
}

pub struct Shared {
    mode: AtomicU8,
    pub requests: AtomicU64,
    pub spans: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    /// Woken on every counter change; the stats writer task waits on it.
    pub changed: tokio::sync::Notify,
    out: Option<Mutex<File>>,
    stats: Option<Mutex<PathBuf>>,
}

impl Shared {
    pub fn new(mode: Mode, out: Option<File>, stats: Option<PathBuf>) -> Shared {
        let shared = Shared {
            mode: AtomicU8::new(0),
            requests: AtomicU64::new(0),
            spans: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
            out: out.map(Mutex::new),
            stats: stats.map(Mutex::new),
        };
        shared.set_mode(mode);
        shared
    }

    pub fn mode(&self) -> Mode {
        MODES[self.mode.load(Relaxed) as usize].1
    }

    pub fn set_mode(&self, mode: Mode) {
        let index = MODES.iter().position(|&(_, m)| m == mode).unwrap();
        self.mode.store(index as u8, Relaxed);
    }

    pub fn add(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
        self.changed.notify_one();
    }

    /// Counts a rejected request and records why on --out.
    pub fn record_error(&self, transport: &str, error: &str) {
        self.add(&self.errors, 1);
        self.write_line(&json!({ "transport": transport, "error": error }));
    }

    /// Records a decoded export request on --out.
    pub fn record_request(
        &self,
        transport: &str,
        headers: &http::HeaderMap,
        gzip: bool,
        request: &ExportTraceServiceRequest,
    ) {
        if self.out.is_none() {
            return;
        }
        let line = match serde_json::to_value(request) {
            Ok(request) => json!({
                "transport": transport,
                "headers": headers_json(headers),
                "gzip": gzip,
                "request": request,
            }),
            Err(e) => json!({ "transport": transport, "error": format!("re-serializing: {e}") }),
        };
        self.write_line(&line);
    }

    fn write_line(&self, line: &Value) {
        let Some(out) = &self.out else { return };
        let mut text = line.to_string().into_bytes();
        text.push(b'\n');
        // One unbuffered write per line: readers never see half a line.
        let mut file = out.lock().unwrap();
        if let Err(e) = file.write_all(&text).and_then(|()| file.flush()) {
            eprintln!("otlp-receiver: writing --out: {e}");
        }
    }

    pub fn stats_json(&self) -> String {
        json!({
            "requests": self.requests.load(Relaxed),
            "spans": self.spans.load(Relaxed),
            "bytes": self.bytes.load(Relaxed),
            "errors": self.errors.load(Relaxed),
        })
        .to_string()
    }

    /// Writes the counters to --stats, if given.
    pub fn write_stats(&self) {
        let Some(path) = &self.stats else { return };
        let path = path.lock().unwrap();
        if let Err(e) = write_atomic(&path, &self.stats_json()) {
            eprintln!("otlp-receiver: writing {}: {e}", path.display());
        }
    }
}

/// Header names (lowercase already in `http`) to values; repeated ones are joined by ", ".
fn headers_json(headers: &http::HeaderMap) -> Map<String, Value> {
    let mut map = Map::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        match map.get_mut(name.as_str()) {
            Some(Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&value);
            }
            _ => {
                map.insert(name.as_str().to_owned(), Value::String(value.into_owned()));
            }
        }
    }
    map
}

/// Writes `contents` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, contents: &str) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

/// Spans in a decoded request.
pub fn count_spans(request: &ExportTraceServiceRequest) -> u64 {
    let scopes = request.resource_spans.iter().flat_map(|r| &r.scope_spans);
    scopes.map(|s| s.spans.len() as u64).sum()
}

/// Checks what the messages' types cannot: the ids' lengths (collectors reject
/// other lengths) and that trace and span ids are not all zero (the spec calls
/// those invalid).
pub fn validate(request: &ExportTraceServiceRequest) -> Result<(), String> {
    fn check(what: &str, id: &[u8], len: usize, optional: bool) -> Result<(), String> {
        if optional && id.is_empty() {
            Ok(())
        } else if id.len() != len {
            Err(format!("{what} has {} bytes, not {len}", id.len()))
        } else if id.iter().all(|&b| b == 0) {
            Err(format!("{what} is all zeros"))
        } else {
            Ok(())
        }
    }
    let scopes = request.resource_spans.iter().flat_map(|r| &r.scope_spans);
    for (i, span) in scopes.flat_map(|s| &s.spans).enumerate() {
        let what = |field: &str| format!("span {i} ({:?}): {field}", span.name);
        check(&what("traceId"), &span.trace_id, 16, false)?;
        check(&what("spanId"), &span.span_id, 8, false)?;
        check(&what("parentSpanId"), &span.parent_span_id, 8, true)?;
        for link in &span.links {
            check(&what("link traceId"), &link.trace_id, 16, false)?;
            check(&what("link spanId"), &link.span_id, 8, false)?;
        }
    }
    Ok(())
}
