//! Sending encoded batches to an OTLP collector: HTTP (protobuf or JSON body) with reqwest, or
//! gRPC with tonic, both driven by a current-thread tokio runtime that this client owns.
//!
//! Threading: built on the CLI thread (so that a bad TLS file fails `vcl.load`), then moved to
//! and used only by the exporter thread. Nothing async ever runs on a Varnish thread: the runtime
//! has no threads of its own and only runs inside `send`, which the exporter thread calls.

use std::io::Write;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::config::{OtlpConfig, Protocol};

/// Why an export failed, and whether trying the same batch again may help (the OTLP
/// specification's retryable responses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportError {
    pub message: String,
    pub retryable: bool,
    /// The collector's own `Retry-After` (HTTP) when it gave one.
    pub retry_after: Option<Duration>,
}

impl ExportError {
    fn retryable(message: String) -> Self {
        ExportError { message, retryable: true, retry_after: None }
    }
    pub(crate) fn fatal(message: String) -> Self {
        ExportError { message, retryable: false, retry_after: None }
    }
}

/// Set when the pipeline is stopping: no request may outlive this instant.
#[derive(Clone, Default)]
pub struct StopSignal(Arc<OnceLock<Instant>>);

impl StopSignal {
    pub fn new() -> Self {
        StopSignal::default()
    }

    pub fn stop_by(&self, at: Instant) {
        let _ = self.0.set(at);
    }
    pub fn deadline(&self) -> Option<Instant> {
        self.0.get().copied()
    }
}

const USER_AGENT: &str = concat!("vmod-opentracing/", env!("CARGO_PKG_VERSION"));
const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// How often an export in flight looks at the stop signal.
const STOP_POLL: Duration = Duration::from_millis(20);

enum Transport {
    Http { client: reqwest::Client, url: reqwest::Url, content_type: &'static str },
    Grpc { client: tonic::client::Grpc<Channel>, metadata: tonic::metadata::MetadataMap },
}

/// Whether plain-HTTP requests go through a proxy reached over TLS (`HTTP_PROXY` or `ALL_PROXY`
/// naming an `https://` proxy, as reqwest reads them from the environment): connecting to that
/// proxy then needs the system's trust store even though the collector's URL is `http://`.
/// `var` reads one environment variable (a parameter for the tests).
fn proxy_over_tls(var: impl Fn(&str) -> Option<String>) -> bool {
    ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"].iter().any(|name| {
        var(name).is_some_and(|v| v.trim_start().get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://")))
    })
}

pub struct OtlpClient {
    runtime: tokio::runtime::Runtime,
    transport: Transport,
    cfg: OtlpConfig,
    stop: StopSignal,
}

impl OtlpClient {
    pub fn new(cfg: &OtlpConfig, stop: StopSignal) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("otel-export-io")
            .build()
            .map_err(|e| format!("cannot create the exporter's runtime: {e}"))?;
        let ca = match &cfg.certificate {
            Some(p) => Some(std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?),
            None => None,
        };
        let transport = match cfg.protocol {
            Protocol::HttpProtobuf | Protocol::HttpJson => {
                let mut headers = reqwest::header::HeaderMap::new();
                for (k, v) in &cfg.headers {
                    let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                        .map_err(|e| format!("OTEL_EXPORTER_OTLP_HEADERS: {k:?}: {e}"))?;
                    let value = reqwest::header::HeaderValue::from_str(v)
                        .map_err(|e| format!("OTEL_EXPORTER_OTLP_HEADERS: {k:?}: {e}"))?;
                    headers.insert(name, value);
                }
                let mut builder = reqwest::Client::builder()
                    .use_rustls_tls()
                    .user_agent(USER_AGENT)
                    .default_headers(headers)
                    .connect_timeout(cfg.timeout)
                    .pool_max_idle_per_host(2);
                if let Some(pem) = &ca {
                    let cert = reqwest::Certificate::from_pem(pem)
                        .map_err(|e| format!("OTEL_EXPORTER_OTLP_CERTIFICATE: {e}"))?;
                    builder = builder.add_root_certificate(cert);
                }
                let url = reqwest::Url::parse(&cfg.endpoint).map_err(|e| format!("{}: {e}", cfg.endpoint))?;
                if url.scheme() != "https" && !proxy_over_tls(|name| std::env::var(name).ok()) {
                    // No TLS to the collector: the system's trust store is not read. Reading and
                    // parsing it cost about 19 million instructions (callgrind) per client, on
                    // the thread applying the configuration, at every start of the exporter. A
                    // redirect to https, which would then fail on an unknown issuer, is refused
                    // with a message saying what to configure. (An `https://` proxy for plain
                    // HTTP still needs the trust store: `proxy_over_tls`.)
                    builder = builder.tls_built_in_root_certs(false).redirect(reqwest::redirect::Policy::custom(|a| {
                        if a.url().scheme() == "https" {
                            let to = a.url().to_string();
                            a.error(format!("redirected to {to}: set OTEL_EXPORTER_OTLP_ENDPOINT to the https URL"))
                        } else if a.previous().len() > 10 {
                            // `previous` holds the first URL too: ten redirects followed, as
                            // reqwest's own default.
                            a.error("more than 10 redirects")
                        } else {
                            a.follow()
                        }
                    }));
                }
                let client = builder.build().map_err(|e| format!("cannot create the HTTP client: {e}"))?;
                let content_type =
                    if cfg.protocol == Protocol::HttpJson { "application/json" } else { "application/x-protobuf" };
                Transport::Http { client, url, content_type }
            }
            Protocol::Grpc => {
                let mut endpoint = Endpoint::from_shared(cfg.endpoint.clone())
                    .map_err(|e| format!("{}: {e}", cfg.endpoint))?
                    .user_agent(USER_AGENT)
                    .map_err(|e| format!("{e}"))?
                    .connect_timeout(cfg.timeout)
                    .timeout(cfg.timeout);
                if cfg.endpoint.starts_with("https://") {
                    let mut tls = ClientTlsConfig::new().with_native_roots();
                    if let Some(pem) = &ca {
                        tls = tls.ca_certificate(Certificate::from_pem(pem));
                    }
                    endpoint = endpoint.tls_config(tls).map_err(|e| format!("TLS to {}: {e}", cfg.endpoint))?;
                }
                // The channel spawns its connection task on our runtime; it connects on first use.
                let channel = {
                    let _guard = runtime.enter();
                    endpoint.connect_lazy()
                };
                let mut client = tonic::client::Grpc::new(channel);
                if cfg.gzip {
                    client = client.send_compressed(CompressionEncoding::Gzip);
                }
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (k, v) in &cfg.headers {
                    let key = tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                        .map_err(|e| format!("OTEL_EXPORTER_OTLP_HEADERS: {k:?}: {e}"))?;
                    let value = v.parse().map_err(|e| format!("OTEL_EXPORTER_OTLP_HEADERS: {k:?}: {e}"))?;
                    metadata.insert(key, value);
                }
                Transport::Grpc { client, metadata }
            }
        };
        Ok(OtlpClient { runtime, transport, cfg: cfg.clone(), stop })
    }

    pub fn protocol(&self) -> Protocol {
        self.cfg.protocol
    }

    /// Sends one encoded `ExportTraceServiceRequest` (protobuf, or JSON for http/json). Returns
    /// within the configured timeout, and by the stop signal's deadline when it is set.
    ///
    /// The body's buffer is lent to the HTTP client rather than copied, and comes back as it
    /// was, with its room, when the client has let go of it by the time the answer is in (the
    /// usual case; not when a server answers before reading the whole body, an early 413 or
    /// 401, or a timeout cuts the request short, where hyper may still hold it: `body` is then
    /// a copy, so that a retry sends the same bytes).
    /// A 512-span body is about 300 KB, copied and freed once per batch before. (callgrind
    /// showed the copy as about 600 instructions per span, but it counts each byte of a
    /// `rep movsb` as one instruction; the CPU copies tens of bytes a cycle, so the gain is
    /// small.) OTLP/gRPC still copies the body once, into tonic's frame (`RawEncoder`).
    ///
    /// The request is `body[request]` (the protobuf encoder leaves room around it).
    pub fn send(&mut self, body: &mut Vec<u8>, request: std::ops::Range<usize>) -> Result<(), ExportError> {
        let lent = Lent::from(body);
        let end = request.end.min(lent.bytes.len());
        let result = self.send_bytes(lent.bytes.slice(request.start.min(end)..end));
        // A retry sends these bytes again: if the client still holds them, they are copied (up
        // to the request's end, offsets kept). After a success or a final failure the buffer is
        // only room for the next batch: no copy then.
        let keep = if result.as_ref().is_err_and(|e| e.retryable) { end } else { 0 };
        lent.give_back(body, keep);
        result
    }

    fn send_bytes(&mut self, body: Bytes) -> Result<(), ExportError> {
        let deadline = Instant::now() + self.cfg.timeout;
        let stop = self.stop.clone();
        let timeout = self.cfg.timeout;
        match &mut self.transport {
            Transport::Http { client, url, content_type } => {
                let mut request =
                    client.post(url.clone()).header(reqwest::header::CONTENT_TYPE, *content_type).timeout(timeout);
                if self.cfg.gzip {
                    let mut gz =
                        flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4), flate2::Compression::fast());
                    gz.write_all(&body).map_err(|e| ExportError::fatal(format!("gzip: {e}")))?;
                    let zipped = gz.finish().map_err(|e| ExportError::fatal(format!("gzip: {e}")))?;
                    request = request.header(reqwest::header::CONTENT_ENCODING, "gzip").body(zipped);
                } else {
                    request = request.body(body);
                }
                let fut = async move {
                    let response = request.send().await.map_err(|e| {
                        // A redirect refused (to https, or an eleventh) is the configuration's:
                        // retrying the batch would only fail again.
                        if e.is_redirect() {
                            ExportError::fatal(describe_reqwest(&e))
                        } else {
                            ExportError::retryable(describe_reqwest(&e))
                        }
                    })?;
                    let status = response.status();
                    if status.is_success() {
                        // Read the (small) body so the connection can be reused.
                        let _ = response.bytes().await;
                        return Ok(());
                    }
                    let retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let text = response.text().await.unwrap_or_default();
                    let text: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
                    let message = format!("HTTP {status} {text}").trim_end().to_owned();
                    // The OTLP/HTTP specification's retryable statuses.
                    let retryable = matches!(status.as_u16(), 429 | 502 | 503 | 504);
                    Err(ExportError { message, retryable, retry_after })
                };
                self.runtime.block_on(bounded(fut, deadline, &stop))
            }
            Transport::Grpc { client, metadata } => {
                let message = body;
                let mut request = tonic::Request::from_parts(metadata.clone(), Default::default(), message);
                request.set_timeout(timeout);
                let fut = async move {
                    client.ready().await.map_err(|e| ExportError::retryable(format!("gRPC connection: {e}")))?;
                    let path = http::uri::PathAndQuery::from_static(GRPC_PATH);
                    match client.unary::<Bytes, (), _>(request, path, RawCodec).await {
                        Ok(_) => Ok(()),
                        Err(status) => Err(grpc_error(&status)),
                    }
                };
                self.runtime.block_on(bounded(fut, deadline, &stop))
            }
        }
    }

    /// Drops the runtime without waiting for background work (idle connections).
    pub fn close(self) {
        self.runtime.shutdown_timeout(Duration::from_millis(100));
    }
}

/// A request body lent to the HTTP client: `Bytes` over the exporter's own buffer.
struct Lent {
    bytes: Bytes,
}

impl Lent {
    fn from(body: &mut Vec<u8>) -> Lent {
        Lent { bytes: Bytes::from(std::mem::take(body)) }
    }

    /// Puts the buffer back as it was. Taking it back moves no bytes when nothing else holds it
    /// any more (the client dropped its copy of the handle): the `Bytes` covers the whole buffer,
    /// from its start. Otherwise (a response came before the body was all sent, or a timeout
    /// cut the request short, and the connection still holds it) its first `keep` bytes are
    /// copied, for a retry of the batch (`export::batch`); with `keep` 0, `body` is left empty
    /// and the next batch grows a new one.
    fn give_back(self, body: &mut Vec<u8>, keep: usize) {
        *body = match self.bytes.try_into_mut() {
            Ok(buffer) => buffer.into(),
            Err(shared) if keep > 0 => shared[..keep.min(shared.len())].to_vec(),
            Err(_) => Vec::new(),
        };
    }
}

/// Runs `fut` until it completes, `deadline` passes, or the stop signal's deadline passes.
async fn bounded<F>(fut: F, deadline: Instant, stop: &StopSignal) -> Result<(), ExportError>
where
    F: std::future::Future<Output = Result<(), ExportError>>,
{
    let mut fut = std::pin::pin!(fut);
    loop {
        let limit = stop.deadline().map_or(deadline, |s| s.min(deadline));
        let now = Instant::now();
        if now >= limit {
            let why = if limit < deadline { "the pipeline is stopping" } else { "timed out" };
            return Err(ExportError::retryable(format!("export {why}")));
        }
        if let Ok(result) = tokio::time::timeout((limit - now).min(STOP_POLL), fut.as_mut()).await {
            return result;
        }
    }
}

fn describe_reqwest(e: &reqwest::Error) -> String {
    // The innermost cause says what happened ("Connection refused"); reqwest's own text only
    // says that sending failed.
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        format!("cannot connect: {cause}")
    } else {
        format!("{e}: {cause}")
    }
}

/// The OTLP/gRPC specification's retryable codes.
fn grpc_error(status: &tonic::Status) -> ExportError {
    use tonic::Code::*;
    let retryable = matches!(
        status.code(),
        Cancelled | DeadlineExceeded | Aborted | OutOfRange | Unavailable | DataLoss | ResourceExhausted
    );
    let message = format!("gRPC {:?}: {}", status.code(), status.message().chars().take(200).collect::<String>());
    ExportError { message, retryable, retry_after: None }
}

/// A codec that sends our already-encoded protobuf as it is and ignores the response body (an
/// `ExportTraceServiceResponse`, whose partial-success details we do not act on).
struct RawCodec;

struct RawEncoder;
struct IgnoreDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = IgnoreDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> IgnoreDecoder {
        IgnoreDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for IgnoreDecoder {
    type Item = ();
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read};
    use std::net::TcpListener;

    fn config(protocol: Protocol, endpoint: String, timeout_ms: u64) -> OtlpConfig {
        OtlpConfig {
            protocol,
            endpoint,
            headers: vec![("x-api-key".into(), "k1".into())],
            timeout: Duration::from_millis(timeout_ms),
            gzip: false,
            certificate: None,
        }
    }

    /// One HTTP/1.1 request from `r`: its head (request line and header fields) and its body.
    pub(in crate::export) fn read_request(r: &mut BufReader<std::net::TcpStream>) -> (String, Vec<u8>) {
        let (mut head, mut len) = (String::new(), 0);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            head.push_str(&line);
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        (head, body)
    }

    /// A one-shot HTTP server answering `status` (a real socket, no mock client).
    fn answer_once(status: &'static str, extra: &'static str) -> (String, std::thread::JoinHandle<(String, Vec<u8>)>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", l.local_addr().unwrap());
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s);
            let (head, body) = read_request(&mut r);
            let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n{extra}connection: close\r\n\r\n");
            r.get_mut().write_all(reply.as_bytes()).unwrap();
            (head, body)
        });
        (url, h)
    }

    #[test]
    fn http_success_sends_type_headers_and_agent() {
        let (url, h) = answer_once("200 OK", "");
        let mut c = OtlpClient::new(&config(Protocol::HttpProtobuf, url, 2000), StopSignal::default()).unwrap();
        let mut body = Vec::with_capacity(4096);
        body.extend_from_slice(b"room\x0a\x00");
        let buffer = body.as_ptr();
        body.extend_from_slice(b"left over");
        c.send(&mut body, 4..6).unwrap();
        // The body was lent, not copied: the same buffer comes back, as it was, for the next batch.
        assert_eq!(body, b"room\x0a\x00left over");
        assert!(body.capacity() == 4096 && body.as_ptr() == buffer);
        let (head, sent) = h.join().unwrap();
        assert_eq!(sent, b"\x0a\x00", "the request's range only");
        let head = head.to_ascii_lowercase();
        assert!(head.starts_with("post /v1/traces http/1.1"), "{head}");
        assert!(head.contains("content-type: application/x-protobuf"), "{head}");
        assert!(head.contains("x-api-key: k1"), "{head}");
        assert!(head.contains("user-agent: vmod-opentracing/"), "{head}");
    }

    #[test]
    fn http_statuses_map_to_retryable_or_not() {
        let (url, h) = answer_once("503 Service Unavailable", "retry-after: 7\r\n");
        let mut c = OtlpClient::new(&config(Protocol::HttpJson, url, 2000), StopSignal::default()).unwrap();
        let e = c.send(&mut b"{}".to_vec(), 0..2).unwrap_err();
        h.join().unwrap();
        assert!(e.retryable && e.retry_after == Some(Duration::from_secs(7)), "{e:?}");
        let (url, h) = answer_once("400 Bad Request", "");
        let mut c = OtlpClient::new(&config(Protocol::HttpJson, url, 2000), StopSignal::default()).unwrap();
        let e = c.send(&mut b"{}".to_vec(), 0..2).unwrap_err();
        h.join().unwrap();
        assert!(!e.retryable && e.message.starts_with("HTTP 400"), "{e:?}");
    }

    #[test]
    fn a_redirect_from_http_to_https_is_refused_with_what_to_configure() {
        let (url, h) = answer_once("307 Temporary Redirect", "location: https://127.0.0.1:9/v1/traces\r\n");
        let mut c = OtlpClient::new(&config(Protocol::HttpProtobuf, url, 2000), StopSignal::default()).unwrap();
        let e = c.send(&mut b"{}".to_vec(), 0..2).unwrap_err();
        h.join().unwrap();
        assert!(e.message.contains("redirected to https://127.0.0.1:9/v1/traces"), "{e:?}");
        assert!(e.message.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{e:?}");
        assert!(!e.retryable, "a configuration error: the batch is not retried");
    }

    /// A server redirecting `hops` times (307, on the same host), then accepting the export.
    fn redirecting(hops: usize) -> (String, std::thread::JoinHandle<usize>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hop/0", l.local_addr().unwrap());
        let h = std::thread::spawn(move || {
            let mut served = 0;
            for stream in l.incoming() {
                let mut r = BufReader::new(stream.unwrap());
                let (head, _) = read_request(&mut r);
                let hop: usize = head.split_whitespace().nth(1).unwrap().trim_start_matches("/hop/").parse().unwrap();
                let reply = if hop < hops {
                    format!("HTTP/1.1 307 Temporary Redirect\r\nlocation: /hop/{}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n", hop + 1)
                } else {
                    "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned()
                };
                r.get_mut().write_all(reply.as_bytes()).unwrap();
                served += 1;
                if hop >= hops || served >= 11 {
                    return served;
                }
            }
            served
        });
        (url, h)
    }

    #[test]
    fn ten_redirects_are_followed_and_an_eleventh_refused() {
        let (url, h) = redirecting(10);
        let mut c = OtlpClient::new(&config(Protocol::HttpProtobuf, url, 5000), StopSignal::default()).unwrap();
        c.send(&mut b"{}".to_vec(), 0..2).unwrap();
        assert_eq!(h.join().unwrap(), 11, "the first request and ten redirects");
        let (url, h) = redirecting(11);
        let mut c = OtlpClient::new(&config(Protocol::HttpProtobuf, url, 5000), StopSignal::default()).unwrap();
        let e = c.send(&mut b"{}".to_vec(), 0..2).unwrap_err();
        assert!(e.message.contains("more than 10 redirects") && !e.retryable, "{e:?}");
        drop(c);
        assert_eq!(h.join().unwrap(), 11);
    }

    #[test]
    fn a_lent_body_comes_back_as_it_was_even_while_still_held() {
        let mut body = b"request bytes and room".to_vec();
        let lent = Lent::from(&mut body);
        assert!(body.is_empty());
        lent.give_back(&mut body, 0);
        assert_eq!(body, b"request bytes and room", "taken back whole, without a copy");
        let lent = Lent::from(&mut body);
        // The connection still holds the body (an early answer, a timeout) and a retry follows.
        let held = lent.bytes.clone();
        lent.give_back(&mut body, 13);
        assert_eq!(body, b"request bytes", "the request copied, for the retry");
        assert_eq!(&held[..], b"request bytes and room");
        // Still held, no retry: nothing copied.
        let lent = Lent::from(&mut body);
        let _held = lent.bytes.clone();
        lent.give_back(&mut body, 0);
        assert!(body.is_empty());
    }

    #[test]
    fn an_https_proxy_for_plain_http_keeps_the_trust_store() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
        };
        assert!(!proxy_over_tls(env(&[])), "no proxy");
        assert!(!proxy_over_tls(env(&[("HTTP_PROXY", "http://proxy.example:3128")])));
        assert!(!proxy_over_tls(env(&[("HTTP_PROXY", "proxy.example:3128")])), "no scheme: plain HTTP");
        assert!(!proxy_over_tls(env(&[("HTTPS_PROXY", "https://proxy.example")])), "not used for http:// URLs");
        assert!(proxy_over_tls(env(&[("HTTP_PROXY", "https://proxy.example:443")])));
        assert!(proxy_over_tls(env(&[("http_proxy", " HTTPS://proxy.example")])));
        assert!(proxy_over_tls(env(&[("ALL_PROXY", "https://proxy.example")])));
        assert!(proxy_over_tls(env(&[("all_proxy", "https://proxy.example")])));
        assert!(!proxy_over_tls(env(&[("ALL_PROXY", "https:")])), "too short to be a URL");
    }

    #[test]
    fn a_refused_connection_is_retryable_and_fast() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        for protocol in [Protocol::HttpProtobuf, Protocol::Grpc] {
            let url = format!("http://127.0.0.1:{port}/v1/traces");
            let mut c = OtlpClient::new(&config(protocol, url, 5000), StopSignal::default()).unwrap();
            let e = c.send(&mut Vec::new(), 0..0).unwrap_err();
            assert!(e.retryable, "{protocol:?}: {e:?}");
        }
    }

    #[test]
    fn a_black_hole_times_out_and_the_stop_signal_cuts_it_short() {
        // Listening but never accepting: the kernel completes the handshake, nobody answers.
        let hole = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", hole.local_addr().unwrap());
        for protocol in [Protocol::HttpProtobuf, Protocol::Grpc] {
            let mut c = OtlpClient::new(&config(protocol, url.clone(), 300), StopSignal::default()).unwrap();
            let e = c.send(&mut Vec::new(), 0..0).unwrap_err();
            assert!(e.retryable, "{protocol:?}: {e:?}");
            let stop = StopSignal::default();
            let mut c = OtlpClient::new(&config(protocol, url.clone(), 60_000), stop.clone()).unwrap();
            stop.stop_by(Instant::now() + Duration::from_millis(200));
            let e = c.send(&mut Vec::new(), 0..0).unwrap_err();
            assert!(e.message.contains("stopping"), "{protocol:?}: {e:?}");
            c.close();
        }
    }

    /// A TLS collector with a self-signed certificate (openssl makes it, Python serves it):
    /// refused without the CA, accepted with `OTEL_EXPORTER_OTLP_CERTIFICATE`'s file.
    #[test]
    fn https_verifies_the_collector_and_trusts_the_configured_ca() {
        let dir = std::env::temp_dir().join(format!("otlp-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let made = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"])
            // An end-entity certificate (rustls refuses a CA certificate as the server's own).
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl (scripts/deps.sh installs it)");
        assert!(made.success());
        let server = format!(
            r#"
import http.server, ssl
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain("{}", "{}")
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#,
            cert.display(),
            key.display()
        );
        let mut py = std::process::Command::new("python3")
            .args(["-c", &server])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut port = String::new();
        BufReader::new(py.stdout.take().unwrap()).read_line(&mut port).unwrap();
        let url = format!("https://127.0.0.1:{}/v1/traces", port.trim());
        let mut cfg = config(Protocol::HttpProtobuf, url, 5000);
        let untrusted = OtlpClient::new(&cfg, StopSignal::default()).unwrap().send(&mut Vec::new(), 0..0).unwrap_err();
        cfg.certificate = Some(cert.clone());
        let trusted = OtlpClient::new(&cfg, StopSignal::default()).unwrap().send(&mut Vec::new(), 0..0);
        let _ = py.kill();
        let _ = py.wait();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(untrusted.message.to_lowercase().contains("certificate"), "{untrusted:?}");
        assert_eq!(trusted, Ok(()));
    }
}
