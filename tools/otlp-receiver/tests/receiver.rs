//! Starts the otlp-receiver binary and talks to it as exporters would: OTLP/HTTP
//! (protobuf, gzip, JSON) with a bare HTTP/1.1 client, OTLP/gRPC with tonic's client.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, status, ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;
use serde_json::{json, Value};
use tonic::codec::CompressionEncoding;

const TRACE_ID: &str = "5b8efff798038103d269b633813fc60c";

struct Receiver {
    child: Child,
    dir: PathBuf,
    ready: Value,
}

impl Receiver {
    /// Runs the binary with --out, --ready, --stats and --control in a fresh folder.
    fn start(args: &[&str]) -> Receiver {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("otlp-receiver-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_otlp-receiver"))
            .args(args)
            .arg("--out")
            .arg(dir.join("out.jsonl"))
            .arg("--ready")
            .arg(dir.join("ready.json"))
            .arg("--stats")
            .arg(dir.join("stats.json"))
            .arg("--control")
            .arg(dir.join("control"))
            .spawn()
            .unwrap();
        let mut receiver = Receiver { child, dir, ready: Value::Null };
        receiver.ready = receiver.wait_for("the ready file", || {
            let text = std::fs::read_to_string(receiver.dir.join("ready.json")).ok()?;
            Some(serde_json::from_str(&text).unwrap())
        });
        receiver
    }

    fn both(extra: &[&str]) -> Receiver {
        let mut args = vec!["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"];
        args.extend(extra);
        Receiver::start(&args)
    }

    fn port(&self, server: &str) -> u16 {
        self.ready[server].as_u64().unwrap() as u16
    }

    fn wait_for<T>(&self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(t) = f() {
                return t;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn lines(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.join("out.jsonl")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn wait_lines(&self, n: usize) -> Vec<Value> {
        self.wait_for(&format!("{n} lines"), || Some(self.lines()).filter(|l| l.len() >= n))
    }

    fn stats(&self) -> Value {
        let text = std::fs::read_to_string(self.dir.join("stats.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn wait_stats(&self, want: Value) {
        let mut last = Value::Null;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            last = self.stats();
            if want.as_object().unwrap().iter().all(|(k, v)| last[k] == *v) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("stats {last} never matched {want}");
    }

    fn set_mode(&self, mode: &str) {
        std::fs::write(self.dir.join("control"), mode).unwrap();
        std::thread::sleep(Duration::from_millis(300)); // polled every 100 ms
    }

    fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port("grpc"))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        let mut found = self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name));
        found.next().map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 client: one request per connection.
fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("end of head");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines.map(|l| l.split_once(':').unwrap()).map(|(n, v)| (n.to_owned(), v.trim().to_owned())).collect();
    let body = raw[split + 4..].to_vec();
    HttpResponse { status, headers, body }
}

fn post(port: u16, content_type: &str, extra: &[(&str, &str)], body: &[u8]) -> HttpResponse {
    let mut headers = vec![("Content-Type", content_type)];
    headers.extend(extra);
    request(port, "POST", "/v1/traces", &headers, body)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(value) }) }
}

/// Two spans, a server span and its child, with the usual kinds of attribute.
fn sample(name: &str) -> ExportTraceServiceRequest {
    let trace_id = (0..TRACE_ID.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&TRACE_ID[i..i + 2], 16).unwrap())
        .collect::<Vec<u8>>();
    let server = Span {
        trace_id: trace_id.clone(),
        span_id: vec![0xee, 0xe1, 0x9b, 0x7e, 0xc3, 0xc1, 0xb1, 0x74],
        name: name.into(),
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: 1_544_712_660_000_000_000,
        end_time_unix_nano: 1_544_712_661_000_000_000,
        attributes: vec![
            kv("http.request.method", any_value::Value::StringValue("GET".into())),
            kv("http.response.status_code", any_value::Value::IntValue(200)),
            kv("varnish.hit", any_value::Value::BoolValue(true)),
        ],
        status: Some(Status { code: status::StatusCode::Error as i32, message: "boom".into() }),
        ..Default::default()
    };
    let child = Span {
        span_id: vec![1, 2, 3, 4, 5, 6, 7, 8],
        parent_span_id: server.span_id.clone(),
        name: "backend".into(),
        kind: span::SpanKind::Client as i32,
        attributes: vec![],
        status: None,
        ..server.clone()
    };
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", any_value::Value::StringValue("varnish".into()))],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope { name: "vmod_opentracing".into(), ..Default::default() }),
                spans: vec![server, child],
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// The request recorded in an --out line, decoded back with opentelemetry-proto.
fn recorded(line: &Value) -> ExportTraceServiceRequest {
    serde_json::from_value(line["request"].clone()).unwrap()
}

#[test]
fn http_protobuf_plain_and_gzip() {
    let rx = Receiver::start(&["--http", "127.0.0.1:0"]);
    assert!(rx.ready.get("grpc").is_none(), "ready: {}", rx.ready);
    let port = rx.port("http");
    let plain = sample("plain").encode_to_vec();
    let zipped = gzip(&sample("zipped").encode_to_vec());

    let resp = post(port, "application/x-protobuf", &[], &plain);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/x-protobuf"));
    assert_eq!(ExportTraceServiceResponse::decode(&resp.body[..]).unwrap(), Default::default());
    let resp = post(port, "application/x-protobuf", &[("Content-Encoding", "gzip")], &zipped);
    assert_eq!(resp.status, 200);

    let lines = rx.wait_lines(2);
    assert_eq!(lines[0]["transport"], "http/protobuf");
    assert_eq!(lines[0]["gzip"], false);
    assert_eq!(lines[1]["gzip"], true);
    assert_eq!(lines[1]["headers"]["content-encoding"], "gzip");
    assert_eq!(lines[0]["headers"]["content-type"], "application/x-protobuf");
    assert_eq!(recorded(&lines[0]), sample("plain"));
    assert_eq!(recorded(&lines[1]), sample("zipped"));
    // The OTLP JSON mapping of what was recorded.
    let span = &lines[0]["request"]["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
    assert_eq!(span["traceId"], TRACE_ID);
    assert_eq!(span["spanId"], "eee19b7ec3c1b174");
    assert_eq!(span["kind"], 2);
    assert_eq!(span["startTimeUnixNano"], "1544712660000000000");
    assert_eq!(span["attributes"][1]["value"], json!({"intValue": "200"}));
    assert_eq!(span["status"], json!({"code": 2, "message": "boom"}));

    let bytes = plain.len() + zipped.len();
    rx.wait_stats(json!({"requests": 2, "spans": 4, "bytes": bytes, "errors": 0}));
}

#[test]
fn http_json_and_rejections() {
    let rx = Receiver::start(&["--http", "127.0.0.1:0"]);
    let port = rx.port("http");

    let body = serde_json::to_vec(&sample("json")).unwrap();
    let resp = post(port, "application/json; charset=utf-8", &[], &body);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.body, b"{}");
    let resp = post(port, "application/json", &[("Content-Encoding", "gzip")], &gzip(&body));
    assert_eq!(resp.status, 200);
    // As a hand-written encoder would write it: only non-default fields, upper-case hex.
    let minimal = json!({"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": TRACE_ID.to_uppercase(), "spanId": "0102030405060708", "name": "min",
        "kind": 2, "startTimeUnixNano": "1", "endTimeUnixNano": "2",
        "attributes": [{"key": "n", "value": {"intValue": "-3"}}]
    }]}]}]});
    let resp = post(port, "application/json", &[], minimal.to_string().as_bytes());
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let lines = rx.wait_lines(3);
    assert_eq!(lines[0]["transport"], "http/json");
    assert_eq!(recorded(&lines[0]), sample("json"));
    assert_eq!(lines[1]["gzip"], true);
    assert_eq!(recorded(&lines[1]), sample("json"));
    let span = &lines[2]["request"]["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
    assert_eq!(span["traceId"], TRACE_ID);
    assert_eq!(span["parentSpanId"], "");

    // Rejections: each is answered, counted and recorded.
    let number_time = minimal.to_string().replace("\"1\"", "1");
    let enum_name = minimal.to_string().replace("\"kind\":2", "\"kind\":\"SPAN_KIND_SERVER\"");
    let short_id = minimal.to_string().replace("0102030405060708", "0102");
    for (content_type, body, status) in [
        ("application/json", number_time.as_str(), 400),
        ("application/json", enum_name.as_str(), 400),
        ("application/json", short_id.as_str(), 400),
        ("application/json", "{", 400),
        ("application/x-protobuf", "\u{ff}\u{ff}", 400),
        ("text/plain", "hello", 415),
    ] {
        let resp = post(port, content_type, &[], body.as_bytes());
        assert_eq!(resp.status, status, "{content_type} {body}");
    }
    assert_eq!(request(port, "POST", "/v1/metrics", &[], b"").status, 404);
    assert_eq!(request(port, "GET", "/v1/traces", &[], b"").status, 405);
    let lines = rx.wait_lines(11);
    let errors: Vec<&str> = lines[3..].iter().map(|l| l["error"].as_str().unwrap()).collect();
    assert!(errors[0].contains("expected a string"), "{errors:?}");
    assert!(errors[1].contains("expected i32"), "{errors:?}");
    assert!(errors[2].contains("spanId has 2 bytes"), "{errors:?}");
    assert!(errors[6].contains("no such path"), "{errors:?}");
    rx.wait_stats(json!({"requests": 9, "spans": 5, "errors": 8}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_plain_and_gzip() {
    let rx = Receiver::both(&[]);
    let mut client = TraceServiceClient::connect(rx.grpc_url()).await.unwrap();
    client.export(sample("plain")).await.unwrap();
    let mut client = client.send_compressed(CompressionEncoding::Gzip);
    let resp = client.export(sample("zipped")).await.unwrap();
    assert_eq!(resp.into_inner(), ExportTraceServiceResponse::default());

    let lines = rx.wait_lines(2);
    assert_eq!(lines[0]["transport"], "grpc");
    assert_eq!(lines[0]["gzip"], false);
    assert_eq!(lines[0]["headers"]["content-type"], "application/grpc");
    assert_eq!(lines[1]["gzip"], true);
    assert_eq!(lines[1]["headers"]["grpc-encoding"], "gzip");
    assert_eq!(recorded(&lines[0]), sample("plain"));
    assert_eq!(recorded(&lines[1]), sample("zipped"));
    rx.wait_stats(json!({"requests": 2, "spans": 4, "errors": 0}));
    assert!(rx.stats()["bytes"].as_u64().unwrap() > 0);

    // A message that is not an ExportTraceServiceRequest: tonic's own INTERNAL answer.
    #[derive(Clone, PartialEq, prost::Message)]
    struct NotARequest {
        #[prost(uint64, tag = "1")]
        resource_spans: u64,
    }
    let channel = tonic::transport::Endpoint::from_shared(rx.grpc_url()).unwrap();
    let mut grpc = tonic::client::Grpc::new(channel.connect().await.unwrap());
    grpc.ready().await.unwrap();
    let path = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
    let codec = tonic_prost::ProstCodec::<NotARequest, ExportTraceServiceResponse>::default();
    let request = tonic::Request::new(NotARequest { resource_spans: 7 });
    let err = grpc.unary(request, path.parse().unwrap(), codec).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal);
    let lines = rx.wait_lines(3);
    assert!(lines[2]["error"].as_str().unwrap().starts_with("grpc-status 13"), "{}", lines[2]);

    // Ids of the wrong length: INVALID_ARGUMENT.
    let mut bad = sample("bad");
    bad.resource_spans[0].scope_spans[0].spans[0].trace_id.pop();
    let err = client.export(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    rx.wait_stats(json!({"requests": 4, "spans": 4, "errors": 2}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuse_then_accept_then_slow_via_control() {
    let rx = Receiver::both(&["--mode", "refuse"]);
    let port = rx.port("http");
    let body = sample("r").encode_to_vec();
    let resp = post(port, "application/x-protobuf", &[], &body);
    assert_eq!(resp.status, 503);
    assert_eq!(resp.header("retry-after"), Some("1"));
    let mut client = TraceServiceClient::connect(rx.grpc_url()).await.unwrap();
    let err = client.export(sample("r")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(rx.lines().is_empty());
    rx.wait_stats(json!({"requests": 2, "spans": 0, "errors": 0}));

    rx.set_mode("accept\n");
    assert_eq!(post(port, "application/x-protobuf", &[], &body).status, 200);
    client.export(sample("r")).await.unwrap();
    assert_eq!(rx.wait_lines(2).len(), 2);

    rx.set_mode("slow");
    let start = Instant::now();
    assert_eq!(post(port, "application/x-protobuf", &[], &body).status, 200);
    assert!(start.elapsed() >= Duration::from_secs(2));
    assert_eq!(rx.lines().len(), 3);
    rx.wait_stats(json!({"requests": 5, "spans": 6, "errors": 0}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_counts_without_recording() {
    let rx = Receiver::both(&["--mode", "discard"]);
    let port = rx.port("http");
    let proto = gzip(&sample("d").encode_to_vec());
    let resp = post(port, "application/x-protobuf", &[("Content-Encoding", "gzip")], &proto);
    assert_eq!(resp.status, 200);
    let json = serde_json::to_vec(&sample("d")).unwrap();
    assert_eq!(post(port, "application/json", &[], &json).status, 200);
    let mut client = TraceServiceClient::connect(rx.grpc_url()).await.unwrap();
    client.export(sample("d")).await.unwrap();
    rx.wait_stats(json!({"requests": 3, "spans": 6, "errors": 0}));
    assert!(rx.lines().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_promptly_with_blackholed_connections() {
    let mut rx = Receiver::both(&["--mode", "blackhole"]);
    let body = sample("b").encode_to_vec();
    let mut stream = TcpStream::connect(("127.0.0.1", rx.port("http"))).unwrap();
    let head = format!(
        "POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body).unwrap();
    let mut client = TraceServiceClient::connect(rx.grpc_url()).await.unwrap();
    let grpc = tokio::spawn(async move { client.export(sample("b")).await });
    rx.wait_stats(json!({"requests": 2}));

    stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 64];
    let err = stream.read(&mut buf).expect_err("a blackholed request got an answer");
    assert!(matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
    assert!(!grpc.is_finished());

    let start = Instant::now();
    let pid = rx.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = loop {
        if let Some(status) = rx.child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(1), "still running 1 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
    assert_eq!(rx.stats()["requests"], 2);
    assert!(rx.lines().is_empty());
}
