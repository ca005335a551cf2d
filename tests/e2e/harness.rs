//! End-to-end harness: a Python origin server (`examples/demo_backend.py`), real `varnishd`
//! instances loading the freshly built VMOD, a minimal HTTP/1.1 client, and a reader that decodes
//! the exported OTLP/JSON span lines with the OpenTelemetry protocol's own types.
//!
//! Everything a test creates lives in one temporary directory, removed on drop (kept when
//! `E2E_KEEP=1`, to inspect the logs). Processes are stopped on drop even if the test panics.
//!
//! Varnish must be on PATH: run the suite under `eval "$(bash scripts/varnish.sh --env)"`.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span as OtlpSpan;

pub const KIND_INTERNAL: i32 = 1;
pub const KIND_SERVER: i32 = 2;
pub const KIND_CLIENT: i32 = 3;

fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The VMOD shared object under test: `$VMOD_OPENTRACING_SO`, or the debug build.
pub fn vmod_so() -> PathBuf {
    let so = match std::env::var_os("VMOD_OPENTRACING_SO") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo_dir().join("target/debug/libvmod_opentracing.so"),
    };
    assert!(
        so.is_file(),
        "VMOD shared object not found at {} (build it with `cargo build`, or set VMOD_OPENTRACING_SO)",
        so.display()
    );
    so.canonicalize().expect("canonicalize .so path")
}

fn wait_child(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return true,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => return false,
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Polite stop: SIGTERM, then SIGKILL when it does not exit within `timeout`.
/// Returns whether it exited on the SIGTERM.
fn terminate(child: &mut Child, timeout: Duration) -> bool {
    if let Ok(Some(_)) = child.try_wait() {
        return true;
    }
    signal(child.id(), "TERM");
    if wait_child(child, timeout) {
        return true;
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

// ---- temporary directory ------------------------------------------------------------------

pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(test: &str) -> TempDir {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "vmod-ot-e2e-{test}-{}-{}-{nanos:x}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var("E2E_KEEP").map(|v| v == "1").unwrap_or(false) {
            eprintln!("E2E_KEEP=1: keeping {}", self.path.display());
        } else {
            if std::thread::panicking() {
                eprintln!("(set E2E_KEEP=1 to keep the test directory: VCL, varnishd output, VSL, spans)");
            }
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

// ---- the origin server --------------------------------------------------------------------

/// One request as logged by `demo_backend.py`.
#[derive(Clone, Debug)]
pub struct BackendRequest {
    pub method: String,
    pub path: String,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub headers: serde_json::Value,
}

pub struct Backend {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl Backend {
    pub fn start(dir: &Path, name: &str) -> Backend {
        let log = dir.join(format!("{name}-requests.jsonl"));
        let stderr = fs::File::create(dir.join(format!("{name}-stderr.log"))).unwrap();
        // Port 0: the kernel picks a free port and the script prints it, so no race with other
        // tests running in parallel.
        let mut child = Command::new("python3")
            .arg(repo_dir().join("examples/demo_backend.py"))
            .args(["--port", "0", "--log"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn python3 examples/demo_backend.py");
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        let mut reader = BufReader::new(stdout);
        let n = reader.read_line(&mut line).unwrap_or(0);
        let port = line.trim().rsplit(':').next().and_then(|p| p.parse::<u16>().ok()).filter(|&p| n > 0 && p != 0);
        let Some(port) = port else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("demo backend did not report its port (got {line:?})");
        };
        // Keep the pipe open (the reader owns it) for the life of the server.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink);
        });
        Backend { child, port, log }
    }

    /// Every request the backend received so far, in order.
    pub fn requests(&self) -> Vec<BackendRequest> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        complete_lines(&text)
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("backend log line is JSON");
                let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
                BackendRequest {
                    method: s("method").unwrap_or_default(),
                    path: s("path").unwrap_or_default(),
                    traceparent: s("traceparent"),
                    tracestate: s("tracestate"),
                    headers: v.get("headers").cloned().unwrap_or(serde_json::Value::Null),
                }
            })
            .collect()
    }

    /// Waits until at least `n` requests were received (panics after `timeout`).
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<BackendRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.requests();
            if r.len() >= n {
                return r;
            }
            if Instant::now() > deadline {
                panic!("backend received {} requests, expected at least {n}: {r:#?}", r.len());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(3));
    }
}

// ---- varnishd ------------------------------------------------------------------------------

pub struct Varnish {
    child: Option<Child>,
    pub name: String,
    pub port: u16,
    workdir: PathBuf,
    spans_file: PathBuf,
    dir: PathBuf,
}

impl Varnish {
    /// Starts `varnishd -F` on 127.0.0.1 (port chosen by the kernel) with the given scenario VCL,
    /// which is appended after the import, the include and the default backend.
    pub fn start(dir: &Path, name: &str, backend_port: u16, scenario_vcl: &str) -> Varnish {
        Varnish::start_with(dir, name, backend_port, scenario_vcl, &VarnishOpts::default())
    }

    /// `start`, with extra `-p` parameters and environment variables for varnishd.
    pub fn start_with(dir: &Path, name: &str, backend_port: u16, scenario_vcl: &str, opts: &VarnishOpts) -> Varnish {
        let so = vmod_so();
        let vcl = format!(
            "vcl 4.1;\nimport opentracing;\ninclude \"opentracing.vcl\";\n\
             backend default {{ .host = \"127.0.0.1\"; .port = \"{backend_port}\"; }}\n\n{scenario_vcl}\n"
        );
        let vcl_file = dir.join(format!("{name}.vcl"));
        fs::write(&vcl_file, vcl).unwrap();
        let workdir = dir.join(format!("{name}-n"));
        let spans_file = dir.join(format!("{name}-spans.jsonl"));
        let out = fs::File::create(dir.join(format!("{name}-varnishd.log"))).unwrap();
        let err = out.try_clone().unwrap();
        let mut cmd = Command::new("varnishd");
        cmd.args(["-F", "-j", "none", "-n"])
            .arg(&workdir)
            .args(["-a", "127.0.0.1:0", "-f"])
            .arg(&vcl_file)
            .args(["-s", "malloc,32m", "-p"])
            .arg(format!("vmod_path={}", so.parent().unwrap().display()))
            .arg("-p")
            .arg(format!("vcl_path={}", repo_dir().join("vcl").display()));
        for p in &opts.params {
            cmd.arg("-p").arg(p);
        }
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, _) in std::env::vars() {
            if k.starts_with("OTEL_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("OPENTRACING_SPANS_FILE", &spans_file)
            .env("OTEL_TRACES_EXPORTER", "file")
            .env("OTEL_BSP_SCHEDULE_DELAY", "50")
            .env("OTEL_SERVICE_NAME", name);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let child =
            cmd.spawn().expect("spawn varnishd (is Varnish on PATH? eval \"$(bash scripts/varnish.sh --env)\")");
        let mut v =
            Varnish { child: Some(child), name: name.to_owned(), port: 0, workdir, spans_file, dir: dir.to_owned() };
        v.port = v.wait_ready(Duration::from_secs(60));
        v
    }

    fn log_text(&self) -> String {
        fs::read_to_string(self.dir.join(format!("{}-varnishd.log", self.name))).unwrap_or_default()
    }

    /// Polls `varnishadm debug.listen_address` (answered by the child, so it is running) and
    /// returns the listening port.
    fn wait_ready(&mut self, timeout: Duration) -> u16 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("varnishd {} exited early ({st}):\n{}", self.name, self.log_text());
            }
            let out = Command::new("varnishadm")
                .arg("-n")
                .arg(&self.workdir)
                .args(["-t", "2", "debug.listen_address"])
                .stdin(Stdio::null())
                .output();
            if let Ok(out) = out {
                if out.status.success() {
                    let text = String::from_utf8_lossy(&out.stdout);
                    // "a0 127.0.0.1 40123"
                    let port =
                        text.lines().filter_map(|l| l.split_whitespace().last()?.parse::<u16>().ok()).find(|&p| p != 0);
                    if let Some(p) = port {
                        // And it answers HTTP.
                        if TcpStream::connect(("127.0.0.1", p)).is_ok() {
                            return p;
                        }
                    }
                }
            }
            if Instant::now() > deadline {
                panic!("varnishd {} not ready after {timeout:?}:\n{}", self.name, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        http_get(self.addr(), path, headers)
    }

    /// The spans exported so far (while running: what the batch processor flushed already).
    pub fn spans_now(&self) -> Vec<Span> {
        read_spans(&self.spans_file)
    }

    /// Waits until `pred` holds on the exported spans (panics after `timeout`).
    pub fn wait_spans(&self, timeout: Duration, what: &str, pred: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.spans_now();
            if pred(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!("{}: timed out waiting for spans: {what}\nspans: {s:#?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The shared memory log so far (`varnishlog -d -g raw`), for evidence.
    pub fn vsl(&self) -> String {
        let out = Command::new("varnishlog")
            .arg("-n")
            .arg(&self.workdir)
            .args(["-d", "-g", "raw"])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
            Err(e) => format!("(varnishlog failed: {e})"),
        }
    }

    /// Stops varnishd with SIGTERM to the manager (the child flushes its queued spans on exit),
    /// waits for it, and returns every span exported. The VSL is saved next to the spans first.
    pub fn stop(&mut self) -> Vec<Span> {
        let vsl = self.vsl();
        let _ = fs::write(self.dir.join(format!("{}-vsl.txt", self.name)), &vsl);
        if let Some(mut child) = self.child.take() {
            let clean = terminate(&mut child, Duration::from_secs(15));
            assert!(clean, "varnishd {} did not exit within 15 s of SIGTERM", self.name);
        }
        read_spans(&self.spans_file)
    }

    pub fn vsl_file(&self) -> PathBuf {
        self.dir.join(format!("{}-vsl.txt", self.name))
    }
}

impl Drop for Varnish {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            let _ = fs::write(self.vsl_file(), self.vsl());
        }
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(5));
        }
    }
}

/// Extra settings for `Varnish::start_with`.
#[derive(Clone, Debug, Default)]
pub struct VarnishOpts {
    /// `-p name=value` arguments.
    pub params: Vec<String>,
    /// Environment variables for varnishd.
    pub env: Vec<(String, String)>,
}

impl Varnish {
    /// The `OPENTRACING.*` counters, by name without the prefix (`varnishstat -1 -j`).
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let out = Command::new("varnishstat")
            .arg("-n")
            .arg(&self.workdir)
            .args(["-1", "-j", "-f", "OPENTRACING.*"])
            .stdin(Stdio::null())
            .output()
            .expect("run varnishstat");
        assert!(out.status.success(), "varnishstat failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("varnishstat -j output is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
        });
        // Varnish 6.5+: {"version": 1, "timestamp": ..., "counters": {name: {"value": n, ...}}};
        // older: the counters at the top level.
        let counters = v.get("counters").unwrap_or(&v);
        let mut map = BTreeMap::new();
        for (k, c) in counters.as_object().expect("varnishstat counters object") {
            let Some(value) = c.get("value").and_then(|x| x.as_u64()) else { continue };
            // "OPENTRACING.name" (no segment ident) or "OPENTRACING.<ident>.name".
            let Some(rest) = k.strip_prefix("OPENTRACING.") else { continue };
            let name = rest.rsplit('.').next().unwrap_or(rest);
            map.insert(name.to_owned(), value);
        }
        map
    }

    /// One counter (0 when absent).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters().get(name).copied().unwrap_or(0)
    }

    /// Waits until `pred` holds on the counters (panics after `timeout`).
    pub fn wait_counters(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&BTreeMap<String, u64>) -> bool,
    ) -> BTreeMap<String, u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.counters();
            if pred(&c) {
                return c;
            }
            if Instant::now() > deadline {
                panic!("{}: timed out after {timeout:?} waiting for counters: {what}\ncounters: {c:#?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `varnishadm` against this instance.
    pub fn adm(&self, args: &[&str]) -> std::process::Output {
        Command::new("varnishadm")
            .arg("-n")
            .arg(&self.workdir)
            .args(["-t", "30"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run varnishadm")
    }

    /// The child process (`cache-main`) of this varnishd, for /proc checks.
    pub fn child_pid(&self) -> u32 {
        let manager = self.child.as_ref().expect("running").id();
        let out = Command::new("pgrep").args(["-P", &manager.to_string()]).output().expect("pgrep");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .find(|pid: &u32| fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "cache-main"))
            .expect("the cache-main child")
    }

    /// `stop`, also returning the `varnishlog -d -g raw` text captured just before stopping.
    pub fn stop_with_vsl(&mut self) -> (Vec<Span>, String) {
        let spans = self.stop();
        let vsl = fs::read_to_string(self.vsl_file()).unwrap_or_default();
        (spans, vsl)
    }
}

// ---- HTTP/1.1 client -------------------------------------------------------------------------

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Header fields in order, names lowercased, repeated fields kept.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One `GET` on a fresh connection (`Connection: close`). Header fields are sent in the given
/// order; the same name may appear more than once.
pub fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).unwrap();
    let mut r = BufReader::new(stream);
    read_response(&mut r, true)
}

/// A keep-alive HTTP/1.1 connection for sequential `GET`s.
pub struct KeepAlive {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> KeepAlive {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        stream.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = stream.set_nodelay(true);
        let writer = stream.try_clone().expect("clone TcpStream");
        KeepAlive { reader: BufReader::new(stream), writer }
    }

    pub fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.request("GET", path, headers)
    }

    /// Any method, with an empty body.
    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if method != "GET" && method != "HEAD" {
            req.push_str("Content-Length: 0\r\n");
        }
        req.push_str("\r\n");
        self.writer.write_all(req.as_bytes()).expect("write request");
        read_response(&mut self.reader, false)
    }
}

/// Reads one response. With `until_eof`, a body without length is read to the end of the
/// connection (only valid on a `Connection: close` exchange).
pub fn read_response(r: &mut BufReader<TcpStream>, until_eof: bool) -> Response {
    let mut line = String::new();
    r.read_line(&mut line).expect("read status line");
    let mut parts = line.trim_end().splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    assert!(version.starts_with("HTTP/1."), "bad status line {line:?}");
    let status: u16 = parts.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad status line {line:?}"));

    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).expect("read header");
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or_else(|| panic!("bad header line {h:?}"));
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());

    let mut body = Vec::new();
    if status == 304 || status == 204 || (100..200).contains(&status) {
        // No body, whatever the header fields say.
    } else if let Some(len) = get("content-length") {
        let len: usize = len.parse().expect("Content-Length");
        body.resize(len, 0);
        r.read_exact(&mut body).expect("read body");
    } else if get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).expect("read chunk size");
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap(), 16).expect("chunk size");
            if size == 0 {
                // trailers
                loop {
                    let mut t = String::new();
                    r.read_line(&mut t).expect("read trailer");
                    if t.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..]).expect("read chunk");
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).expect("read chunk CRLF");
        }
    } else if until_eof {
        r.read_to_end(&mut body).expect("read body to EOF");
    } else {
        panic!("keep-alive response without length: {status} {headers:?}");
    }
    Response { status, headers, body }
}

// ---- spans -----------------------------------------------------------------------------------

/// A decoded span, with what the tests need in convenient form.
#[derive(Clone)]
pub struct Span {
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub trace_state: String,
    pub flags: u32,
    pub name: String,
    pub kind: i32,
    pub start: u64,
    pub end: u64,
    pub attributes: BTreeMap<String, AnyValue>,
    pub events: Vec<String>,
    pub raw: OtlpSpan,
}

impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let attrs: BTreeMap<_, _> =
            self.attributes.iter().map(|(k, v)| (k.as_str(), format!("{:?}", v.value.as_ref().unwrap()))).collect();
        f.debug_struct("Span")
            .field("service", &self.service)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("trace", &self.trace_id)
            .field("span", &self.span_id)
            .field("parent", &self.parent_span_id)
            .field("flags", &format_args!("{:#x}", self.flags))
            .field("start", &self.start)
            .field("end", &self.end)
            .field("attributes", &attrs)
            .field("events", &self.events)
            .finish()
    }
}

impl Span {
    pub fn attr_str(&self, key: &str) -> Option<&str> {
        match self.attributes.get(key)?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s),
            _ => None,
        }
    }

    /// A `string[]` attribute (captured headers).
    pub fn attr_strs(&self, key: &str) -> Option<Vec<&str>> {
        match self.attributes.get(key)?.value.as_ref()? {
            any_value::Value::ArrayValue(a) => a
                .values
                .iter()
                .map(|v| match v.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.as_str()),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    pub fn attr_int(&self, key: &str) -> Option<i64> {
        match self.attributes.get(key)?.value.as_ref()? {
            any_value::Value::IntValue(i) => Some(*i),
            _ => None,
        }
    }

    /// The span's events as (name, time in ns), in order.
    pub fn timed_events(&self) -> Vec<(String, u64)> {
        self.raw.events.iter().map(|e| (e.name.clone(), e.time_unix_nano)).collect()
    }

    /// The span's links as (trace id, span id) in lowercase hex.
    pub fn links(&self) -> Vec<(String, String)> {
        self.raw.links.iter().map(|l| (hex(&l.trace_id), hex(&l.span_id))).collect()
    }

    pub fn is_root(&self) -> bool {
        self.parent_span_id.is_empty()
    }

    /// The W3C trace flags (low 8 bits of the OTLP flags).
    pub fn trace_flags(&self) -> u32 {
        self.flags & 0xff
    }
}

/// The field names the OTLP JSON encoding allows on each object we check (lowerCamelCase).
const SPAN_FIELDS: &[&str] = &[
    "traceId",
    "spanId",
    "traceState",
    "parentSpanId",
    "flags",
    "name",
    "kind",
    "startTimeUnixNano",
    "endTimeUnixNano",
    "attributes",
    "droppedAttributesCount",
    "events",
    "droppedEventsCount",
    "links",
    "droppedLinksCount",
    "status",
];
const EVENT_FIELDS: &[&str] = &["timeUnixNano", "name", "attributes", "droppedAttributesCount"];
const KV_FIELDS: &[&str] = &["key", "value"];
const ANY_VALUE_FIELDS: &[&str] =
    &["stringValue", "boolValue", "intValue", "doubleValue", "arrayValue", "kvlistValue", "bytesValue"];

fn check_fields(obj: &serde_json::Value, allowed: &[&str], what: &str, line: &str) {
    let map = obj.as_object().unwrap_or_else(|| panic!("{what} is not a JSON object in line: {line}"));
    for k in map.keys() {
        assert!(allowed.contains(&k.as_str()), "unknown OTLP field {what}.{k} in line: {line}");
    }
}

fn check_kvs(list: Option<&serde_json::Value>, what: &str, line: &str) {
    for kv in list.and_then(|l| l.as_array()).into_iter().flatten() {
        check_fields(kv, KV_FIELDS, what, line);
        let v = kv.get("value").unwrap_or_else(|| panic!("{what} without value in line: {line}"));
        check_fields(v, ANY_VALUE_FIELDS, &format!("{what}.value"), line);
        assert_eq!(v.as_object().unwrap().len(), 1, "AnyValue must have one field, in line: {line}");
    }
}

/// Strict structural checks the lenient serde decoding would not make: unknown (misspelled)
/// field names would be silently ignored by it.
fn check_raw(line: &str) {
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    check_fields(&v, &["resourceSpans"], "ExportTraceServiceRequest", line);
    for rs in v["resourceSpans"].as_array().expect("resourceSpans array") {
        check_fields(rs, &["resource", "scopeSpans", "schemaUrl"], "ResourceSpans", line);
        check_kvs(rs.get("resource").and_then(|r| r.get("attributes")), "Resource.attributes", line);
        for ss in rs["scopeSpans"].as_array().expect("scopeSpans array") {
            check_fields(ss, &["scope", "spans", "schemaUrl"], "ScopeSpans", line);
            for s in ss["spans"].as_array().expect("spans array") {
                check_fields(s, SPAN_FIELDS, "Span", line);
                check_kvs(s.get("attributes"), "Span.attributes", line);
                for e in s.get("events").and_then(|e| e.as_array()).into_iter().flatten() {
                    check_fields(e, EVENT_FIELDS, "Event", line);
                    check_kvs(e.get("attributes"), "Event.attributes", line);
                }
                for id in ["traceId", "spanId", "parentSpanId"] {
                    if let Some(x) = s.get(id) {
                        let x = x.as_str().unwrap_or_else(|| panic!("{id} not a string: {line}"));
                        assert!(
                            x.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                            "{id} {x:?} is not lowercase hex: {line}"
                        );
                    }
                }
            }
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Reads a spans file: each line is decoded as an OTLP `ExportTraceServiceRequest` (the
/// protocol's generated types with their serde mapping) and checked field by field.
/// The lines of `text` that are complete (ended by a newline). A file read while its writer
/// appends can end in part of a line: a write's first pages are visible before the rest (a
/// 4,096-byte piece of an OTLP/JSON line made a test fail); the next read has all of it.
pub fn complete_lines(text: &str) -> impl Iterator<Item = &str> {
    text.split_inclusive('\n').filter_map(|l| l.strip_suffix('\n')).filter(|l| !l.trim().is_empty())
}

pub fn read_spans(path: &Path) -> Vec<Span> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let requests = complete_lines(&text).map(|line| {
        check_raw(line);
        let req: ExportTraceServiceRequest = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("span line is not an OTLP ExportTraceServiceRequest ({e}): {line}"));
        (req, line.to_owned())
    });
    spans_of(requests.collect())
}

/// The spans of decoded export requests (with the text each came from, for messages).
pub fn spans_of(requests: Vec<(ExportTraceServiceRequest, String)>) -> Vec<Span> {
    let mut spans = Vec::new();
    for (req, line) in requests {
        let line = line.as_str();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("resource without service.name: {line}"));
            for ss in rs.scope_spans {
                for s in ss.spans {
                    assert_eq!(s.trace_id.len(), 16, "traceId must be 16 bytes: {line}");
                    assert_eq!(s.span_id.len(), 8, "spanId must be 8 bytes: {line}");
                    assert!(
                        s.parent_span_id.is_empty() || s.parent_span_id.len() == 8,
                        "parentSpanId must be empty or 8 bytes: {line}"
                    );
                    assert!(s.trace_id.iter().any(|&b| b != 0), "all-zero traceId: {line}");
                    assert!(s.span_id.iter().any(|&b| b != 0), "all-zero spanId: {line}");
                    let attributes = s
                        .attributes
                        .iter()
                        .map(|KeyValue { key, value }| (key.clone(), value.clone().expect("attribute value")))
                        .collect();
                    spans.push(Span {
                        service: service.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        trace_state: s.trace_state.clone(),
                        flags: s.flags,
                        name: s.name.clone(),
                        kind: s.kind,
                        start: s.start_time_unix_nano,
                        end: s.end_time_unix_nano,
                        attributes,
                        events: s.events.iter().map(|e| e.name.clone()).collect(),
                        raw: s,
                    });
                }
            }
        }
    }
    // No span is exported twice.
    let mut seen = BTreeSet::new();
    for s in &spans {
        assert!(seen.insert(s.span_id.clone()), "span {} exported twice: {spans:#?}", s.span_id);
    }
    spans
}

// ---- traceparent ---------------------------------------------------------------------------

/// A parsed, valid W3C traceparent (version 00, lowercase hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub span_id: String,
    pub flags: String,
}

pub fn parse_traceparent(v: &str) -> Option<TraceParent> {
    let parts: Vec<&str> = v.split('-').collect();
    let lhex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if parts.len() != 4 || parts[0] != "00" || !lhex(parts[1], 32) || !lhex(parts[2], 16) || !lhex(parts[3], 2) {
        return None;
    }
    if parts[1].bytes().all(|b| b == b'0') || parts[2].bytes().all(|b| b == b'0') {
        return None;
    }
    Some(TraceParent { trace_id: parts[1].into(), span_id: parts[2].into(), flags: parts[3].into() })
}

/// A fresh random trace id (not cryptographic; unique enough for tests).
pub fn random_trace_id() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    for i in 0..2u64 {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(i);
        h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos());
        out.push_str(&format!("{:016x}", h.finish() | 1));
    }
    out
}

pub fn random_span_id() -> String {
    random_trace_id()[..16].to_owned()
}

#[test]
fn a_line_still_being_written_is_left_for_the_next_read() {
    let lines: Vec<&str> = complete_lines("{\"a\":1}\n\n{\"b\":2}\n{\"c\":").collect();
    assert_eq!(lines, ["{\"a\":1}", "{\"b\":2}"]);
    assert_eq!(complete_lines("").count(), 0);
}
