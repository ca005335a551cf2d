//! OTLP export end to end: real varnishd exporting to `tools/otlp-receiver`, an independent
//! receiver that decodes with the OpenTelemetry protocol's own types (prost, serde, tonic).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

use crate::harness::*;

/// The receiver binary (`cargo build --workspace` builds it next to the tests).
fn receiver_bin() -> PathBuf {
    let bin = match std::env::var_os("OTLP_RECEIVER") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/debug/otlp-receiver"),
    };
    assert!(bin.is_file(), "{} is missing: run `cargo build --workspace` (make build does)", bin.display());
    bin
}

pub struct Receiver {
    child: Option<Child>,
    out: PathBuf,
    control: PathBuf,
    pub http_port: u16,
    pub grpc_port: u16,
}

impl Receiver {
    /// Starts the receiver on kernel-chosen ports (or the given ones, to come back on the same
    /// address after a stop).
    pub fn start(dir: &Path, name: &str, mode: &str, ports: Option<(u16, u16)>) -> Receiver {
        let (http, grpc) = ports.unwrap_or((0, 0));
        let out = dir.join(format!("{name}-received.jsonl"));
        let ready = dir.join(format!("{name}-ready.json"));
        let control = dir.join(format!("{name}-mode"));
        let _ = fs::remove_file(&ready);
        fs::write(&control, mode).unwrap();
        let log = fs::File::create(dir.join(format!("{name}-receiver.log"))).unwrap();
        let child = Command::new(receiver_bin())
            .args(["--http", &format!("127.0.0.1:{http}"), "--grpc", &format!("127.0.0.1:{grpc}")])
            .arg("--out")
            .arg(&out)
            .arg("--ready")
            .arg(&ready)
            .arg("--control")
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start otlp-receiver");
        let deadline = Instant::now() + Duration::from_secs(20);
        let ports: serde_json::Value = loop {
            if let Some(v) = fs::read_to_string(&ready).ok().and_then(|t| serde_json::from_str(&t).ok()) {
                break v;
            }
            assert!(Instant::now() < deadline, "otlp-receiver did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        };
        Receiver {
            child: Some(child),
            out,
            control,
            http_port: ports["http"].as_u64().unwrap() as u16,
            grpc_port: ports["grpc"].as_u64().unwrap() as u16,
        }
    }

    pub fn set_mode(&self, mode: &str) {
        fs::write(&self.control, mode).unwrap();
        // Re-read every 100 ms by the receiver.
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Every request line received so far. A decode error means we sent invalid OTLP: fail.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        let text = fs::read_to_string(&self.out).unwrap_or_default();
        complete_lines(&text)
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert!(v.get("error").is_none(), "the receiver could not decode what we sent: {l}");
                v
            })
            .collect()
    }

    pub fn spans(&self) -> Vec<Span> {
        let requests = self
            .lines()
            .into_iter()
            .map(|v| {
                let req: ExportTraceServiceRequest = serde_json::from_value(v["request"].clone()).unwrap();
                (req, v.to_string())
            })
            .collect();
        spans_of(requests)
    }

    pub fn wait_spans(&self, timeout: Duration, n: usize) -> Vec<Span> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.spans();
            if s.len() >= n {
                return s;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {n} spans at the receiver; got {}", s.len());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn otlp_env(pairs: &[(&str, String)]) -> VarnishOpts {
    let mut env: Vec<(String, String)> =
        vec![("OTEL_TRACES_EXPORTER".into(), "otlp".into()), ("OTEL_BSP_SCHEDULE_DELAY".into(), "50".into())];
    env.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.clone())));
    VarnishOpts { params: vec![], env }
}

/// One scenario per transport: a miss then a hit under an incoming trace; the receiver must get
/// the SERVER and CLIENT spans, correctly parented, with the resource and our headers.
#[test]
fn every_otlp_transport_delivers_decodable_spans_and_resource() {
    let dir = TempDir::new("otlp_transports");
    let backend = Backend::start(dir.path(), "origin");
    let recv = Receiver::start(dir.path(), "collector", "accept", None);
    let cases = [
        ("http/protobuf", false, recv.http_port),
        ("http/protobuf", true, recv.http_port),
        ("http/json", false, recv.http_port),
        ("grpc", false, recv.grpc_port),
        ("grpc", true, recv.grpc_port),
    ];
    let mut seen_lines = 0;
    for (i, (protocol, gzip, port)) in cases.iter().enumerate() {
        let name = format!("v{i}");
        let trace = random_trace_id();
        let opts = otlp_env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{port}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.to_string()),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", if *gzip { "gzip" } else { "none" }.to_string()),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=team%20a,authorization=Bearer s3cret".to_string()),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test".to_string()),
        ]);
        let mut v = Varnish::start_with(dir.path(), &name, backend.port, "", &opts);
        let url = format!("/cached?obj-{i}");
        let parent = format!("00-{trace}-{}-01", random_span_id());
        assert_eq!(v.get(&url, &[("traceparent", &parent)]).status, 200);
        assert_eq!(v.get(&url, &[("traceparent", &parent)]).status, 200);
        v.stop();
        let lines = recv.lines();
        let new = &lines[seen_lines..];
        seen_lines = lines.len();
        assert!(!new.is_empty(), "{protocol}: nothing received");
        for l in new {
            assert_eq!(l["transport"], *protocol, "{l}");
            assert_eq!(l["gzip"], *gzip, "{protocol}: {l}");
            assert_eq!(l["headers"]["x-tenant"], "team a", "{l}");
            assert_eq!(l["headers"]["authorization"], "Bearer s3cret", "{l}");
            assert!(l["headers"]["user-agent"].as_str().unwrap_or("").contains("vmod-opentracing/"), "{l}");
        }
        let spans: Vec<Span> = recv.spans().into_iter().filter(|s| s.trace_id == trace).collect();
        let servers = spans.iter().filter(|s| s.kind == KIND_SERVER).count();
        let clients: Vec<&Span> = spans.iter().filter(|s| s.kind == KIND_CLIENT).collect();
        assert_eq!((servers, clients.len()), (2, 1), "{protocol}: {spans:#?}");
        let miss = spans.iter().find(|s| s.kind == KIND_SERVER && s.attr_str("varnish.cache_result") == Some("miss"));
        assert_eq!(clients[0].parent_span_id, miss.expect("the miss span").span_id);
        // The resource, as the receiver decoded it.
        let req: ExportTraceServiceRequest = serde_json::from_value(new[0]["request"].clone()).unwrap();
        let resource = req.resource_spans[0].resource.as_ref().unwrap();
        let attr = |k: &str| {
            resource.attributes.iter().find(|kv| kv.key == k).map(|kv| format!("{:?}", kv.value.as_ref().unwrap()))
        };
        assert!(attr("service.name").unwrap().contains(&format!("\"{name}\"")), "{resource:?}");
        assert!(attr("deployment.environment.name").unwrap().contains("\"test\""), "{resource:?}");
        for k in [
            "service.instance.id",
            "host.name",
            "telemetry.sdk.name",
            "telemetry.sdk.language",
            "telemetry.sdk.version",
            "varnish.version",
            "varnish.instance.name",
        ] {
            assert!(attr(k).is_some(), "{protocol}: resource without {k}: {resource:?}");
        }
        assert_eq!(req.resource_spans[0].scope_spans[0].scope.as_ref().unwrap().name, "vmod-opentracing");
    }
}

/// The collector refuses, then comes back; then it black-holes; then it is gone, and returns on
/// the same port. Requests never fail, what cannot be kept is counted, and export resumes.
#[test]
fn a_misbehaving_collector_never_fails_requests_and_export_resumes() {
    let dir = TempDir::new("otlp_collector_trouble");
    let backend = Backend::start(dir.path(), "origin");
    let mut recv = Receiver::start(dir.path(), "collector", "refuse", None);
    let ports = (recv.http_port, recv.grpc_port);
    let opts = otlp_env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{}", recv.http_port)),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "500".into()),
        ("OTEL_BSP_EXPORT_TIMEOUT", "1500".into()),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "200".into()),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "50".into()),
    ]);
    let mut v = Varnish::start_with(dir.path(), "edge", backend.port, "", &opts);
    let burst = |v: &Varnish, tag: &str, n: usize| {
        let mut conn = KeepAlive::connect(v.addr());
        for i in 0..n {
            // Hits after the first: cheap requests, many spans.
            let r = conn.get(&format!("/cached?{tag}"), &[("x-i", &i.to_string())]);
            assert_eq!(r.status, 200, "{tag} request {i} failed while the collector misbehaves");
        }
    };

    // 1. Refusing (503 + Retry-After): retried, then dropped and counted; requests fine.
    burst(&v, "refused", 300);
    v.wait_counters(Duration::from_secs(20), "export failures and drops", |c| {
        c["export_failures"] > 0 && c["spans_dropped_export"] + c["spans_dropped"] > 0
    });
    // Bounded memory: never more waiting than the queue allows (channel + exporter's queue).
    assert!(v.counter("queue_depth") <= 2 * 200, "{:?}", v.counters());

    // 2. Back to normal: new spans arrive; the log says export works again.
    recv.set_mode("accept");
    let before = recv.spans().len();
    burst(&v, "accepted", 20);
    recv.wait_spans(Duration::from_secs(20), before + 20);

    // 3. Black hole: accepts connections, never answers; requests are not held up.
    recv.set_mode("blackhole");
    burst(&v, "blackholed", 300);
    v.wait_counters(Duration::from_secs(20), "timeouts counted", |c| c["export_failures"] >= 2);

    // 4. Collector gone (connection refused), then back on the same port.
    recv.stop();
    burst(&v, "down", 100);
    let mut recv = Receiver::start(dir.path(), "collector2", "accept", Some(ports));
    // The exporter may still be retrying the black-holed batch; it recovers without a restart.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    while recv.spans().is_empty() {
        assert!(Instant::now() < deadline, "export did not resume after the collector came back");
        burst(&v, "after", 1);
        n += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(n >= 1);
    let (_, vsl) = v.stop_with_vsl();
    recv.stop();
    // One rate-limited line about the failures (at most one a minute), and the recovery.
    let failed_lines =
        vsl.lines().filter(|l| l.contains("opentracing: export to OTLP") && l.contains("failed")).count();
    assert!((1..=3).contains(&failed_lines), "{failed_lines} failure lines in the log");
    assert!(vsl.contains("works again"), "no recovery line in the log");
}

/// A refused batch is retried from the request it was encoded into as its spans came (their
/// records went back to the pool long before): when the collector takes it, every span is there,
/// whole and once.
#[test]
fn a_refused_batch_arrives_whole_when_the_collector_recovers() {
    let dir = TempDir::new("otlp_retry_whole");
    let backend = Backend::start(dir.path(), "origin");
    let recv = Receiver::start(dir.path(), "collector", "refuse", None);
    let opts = otlp_env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{}", recv.http_port)),
        ("OTEL_BSP_EXPORT_TIMEOUT", "60000".into()),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "10".into()),
    ]);
    let v = Varnish::start_with(dir.path(), "edge", backend.port, "", &opts);
    // A miss (SERVER and CLIENT spans), then hits: 12 spans, a full batch and part of another.
    for i in 0..11 {
        assert_eq!(v.get("/cached?retry", &[("x-i", &i.to_string())]).status, 200);
    }
    v.wait_counters(Duration::from_secs(20), "the first batch refused", |c| c["export_failures"] >= 1);
    assert_eq!(v.counter("spans_exported"), 0);
    recv.set_mode("accept");
    let spans = recv.wait_spans(Duration::from_secs(30), 12);
    let mut ids: Vec<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!((spans.len(), ids.len()), (12, 12), "each span once: {spans:#?}");
    for s in &spans {
        assert_eq!(s.attr_str("url.path"), Some("/cached"), "{s:#?}");
        assert!(s.end > s.start, "{s:#?}");
    }
    v.wait_counters(Duration::from_secs(10), "all exported", |c| c["spans_exported"] == 12);
    let c = v.counters();
    assert_eq!((c["spans_dropped"], c["spans_dropped_export"]), (0, 0), "{c:?}");
}

/// Stopping with a collector that never answers: the child exits within its bounded deadline,
/// and `vcl.discard` of the last VCL returns in time on the CLI.
#[test]
fn shutdown_is_bounded_whatever_the_collector_does() {
    let dir = TempDir::new("otlp_bounded_shutdown");
    let backend = Backend::start(dir.path(), "origin");
    let recv = Receiver::start(dir.path(), "collector", "blackhole", None);
    let opts = otlp_env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{}", recv.http_port)),
        // Longer than any stop deadline: the stop signal must cut the request short.
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "60000".into()),
    ]);
    let mut v = Varnish::start_with(dir.path(), "edge", backend.port, "", &opts);
    for i in 0..20 {
        assert_eq!(v.get(&format!("/cached?x{i}"), &[]).status, 200);
    }
    std::thread::sleep(Duration::from_millis(300)); // an export is now in flight, unanswered
                                                    // The last VCL with the module goes cold: the CLI must answer (cli_timeout is 60 s; we
                                                    // allow 10 for a stop deadline of 5).
    let plain = dir.path().join("plain.vcl");
    fs::write(&plain, "vcl 4.1;\nbackend none none;\n").unwrap();
    for cmd in [&["vcl.load", "plain", plain.to_str().unwrap()][..], &["vcl.use", "plain"][..]] {
        let out = v.adm(cmd);
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stdout));
    }
    let t = Instant::now();
    let out = v.adm(&["vcl.discard", "boot"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(t.elapsed() < Duration::from_secs(10), "vcl.state cold took {:?}", t.elapsed());
    assert_eq!(v.counter("stop_timeouts"), 0, "{:?}", v.counters());
    v.stop(); // asserts the exit within 15 s
}

fn thread_names(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .filter(|n| n.starts_with("otel-"))
        .collect();
    names.sort();
    names
}

fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// 100 cycles of vcl.load / vcl.use / vcl.discard while traffic flows and spans are exported over
/// OTLP: no crash, no leaked thread or file descriptor, and every completed request's span arrives.
#[test]
fn a_hundred_reloads_under_traffic_lose_no_span_and_leak_nothing() {
    let dir = TempDir::new("otlp_reload_cycles");
    let backend = Backend::start(dir.path(), "origin");
    let recv = Receiver::start(dir.path(), "collector", "accept", None);
    let opts = otlp_env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{}", recv.http_port))]);
    let mut v = Varnish::start_with(dir.path(), "edge", backend.port, "", &opts);
    assert_eq!(v.get("/cached", &[]).status, 200);
    let pid = v.child_pid();
    let threads_before = thread_names(pid);
    assert_eq!(threads_before, ["otel-export", "otel-vsl"], "threads at start");
    let fds_before = fd_count(pid);

    // Traffic from another thread for the whole run: each request is a hit with its own span.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = v.addr();
    let traffic = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut served = 0u64;
            let mut conn = KeepAlive::connect(addr);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(conn.get("/cached", &[]).status, 200, "a request failed during the reloads");
                served += 1;
                // A steady flow, not a flood: this is about lifecycle, not throughput.
                std::thread::sleep(Duration::from_millis(2));
            }
            served
        })
    };
    let vcl_file = dir.path().join("edge.vcl");
    let mut previous = "boot".to_owned();
    for i in 0..100 {
        let name = format!("r{i}");
        for cmd in [
            vec!["vcl.load", name.as_str(), vcl_file.to_str().unwrap()],
            vec!["vcl.use", name.as_str()],
            vec!["vcl.discard", previous.as_str()],
        ] {
            let out = v.adm(&cmd);
            assert!(out.status.success(), "cycle {i}: {cmd:?}: {}", String::from_utf8_lossy(&out.stdout));
        }
        previous = name;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served = traffic.join().expect("traffic thread");
    // Same threads, same descriptors (give the retired exporters their bounded stop).
    let deadline = Instant::now() + Duration::from_secs(10);
    while thread_names(pid) != threads_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(thread_names(pid), threads_before, "threads after 100 cycles");
    let fds_after = fd_count(pid);
    assert!(fds_after <= fds_before + 2, "file descriptors: {fds_before} before, {fds_after} after");
    // Every finished span handed to the exporter and delivered, none dropped.
    let c = v.wait_counters(Duration::from_secs(30), "all spans exported", |c| {
        c["spans_exported"] > served && c["queue_depth"] == 0
    });
    assert_eq!(c["spans_dropped"] + c["spans_dropped_export"], 0, "{c:?}");
    v.stop();
    let spans = recv.spans();
    let warm = spans.iter().filter(|s| s.kind == KIND_SERVER && s.attr_str("url.path") == Some("/cached")).count();
    // The first request, then every request of the traffic thread.
    assert_eq!(warm as u64, served + 1, "spans of completed requests");
}
