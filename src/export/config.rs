//! Where spans go and how they are batched, from the `OTEL_*` settings, with the OpenTelemetry
//! specification's defaults and endpoint rules ("OTLP Exporter Configuration").

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::resource::Resource;
use crate::config::{key_values, Settings};

/// The OTLP transports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
    HttpJson,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
            Protocol::HttpJson => "http/json",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpConfig {
    pub protocol: Protocol,
    /// The full URL requests go to (for HTTP, with its `/v1/traces` path).
    pub endpoint: String,
    /// Extra request headers (vendor authentication), already percent-decoded.
    pub headers: Vec<(String, String)>,
    /// How long one export request may take.
    pub timeout: Duration,
    pub gzip: bool,
    /// A PEM file of CA certificates trusted in addition to the system's.
    pub certificate: Option<PathBuf>,
}

/// Where finished spans are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sink {
    /// OTLP to a collector (the default).
    Otlp(OtlpConfig),
    /// OTLP/JSON lines appended to a file.
    File(PathBuf),
    /// OTLP/JSON lines on varnishd's standard output.
    Stdout,
    /// Spans are built and dropped (tracing context still propagates).
    None,
}

impl fmt::Display for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sink::Otlp(o) => write!(f, "OTLP {} {}", o.protocol.name(), o.endpoint),
            Sink::File(p) => write!(f, "file {}", p.display()),
            Sink::Stdout => f.write_str("stdout"),
            Sink::None => f.write_str("nowhere (OTEL_TRACES_EXPORTER=none)"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ExportConfig {
    pub sink: Sink,
    /// Spans waiting for export at most (`OTEL_BSP_MAX_QUEUE_SIZE`); more are dropped and counted.
    pub queue_size: usize,
    pub batch_size: usize,
    /// Longest wait before a partial batch is sent (`OTEL_BSP_SCHEDULE_DELAY`).
    pub flush_interval: Duration,
    /// How long a batch may keep being retried before it is dropped (`OTEL_BSP_EXPORT_TIMEOUT`).
    pub export_timeout: Duration,
    pub resource: Resource,
}

pub const DEFAULT_FILE: &str = "opentracing-spans.jsonl";
/// Not the SDK's 2048: the exporter drains every EXPORT_TICK and shares the CPUs with Varnish's
/// workers, which can delay it; 2048 dropped a quarter of the spans at 60k spans/s in
/// `make bench` (docs/performance-history.md). 16384 spans are at most ~8 MB.
pub const DEFAULT_QUEUE_SIZE: usize = 16384;
pub const MAX_QUEUE_SIZE: usize = 1 << 20;
pub const MAX_BATCH_SIZE: usize = 1 << 16;
const DEFAULT_HTTP_ENDPOINT: &str = "http://localhost:4318";
const DEFAULT_GRPC_ENDPOINT: &str = "http://localhost:4317";

impl ExportConfig {
    /// Unknown or malformed values are errors naming the setting (they fail `vcl.load`).
    pub fn from_settings(s: &Settings) -> Result<Self, String> {
        let sink = match s.get("OTEL_TRACES_EXPORTER").as_deref() {
            None | Some("otlp") => Sink::Otlp(otlp(s)?),
            Some("file") => {
                let path = PathBuf::from(s.get("OPENTRACING_SPANS_FILE").unwrap_or_else(|| DEFAULT_FILE.to_owned()));
                // Relative paths are relative to varnishd's working directory (its -n folder).
                Sink::File(if path.is_absolute() {
                    path
                } else {
                    std::env::current_dir().map(|d| d.join(&path)).unwrap_or(path)
                })
            }
            Some("console") | Some("stdout") => Sink::Stdout,
            Some("none") => Sink::None,
            Some(other) if other.contains(',') => {
                return Err(format!("OTEL_TRACES_EXPORTER={other:?}: one exporter at a time is supported"))
            }
            Some(other) => {
                return Err(format!(
                    "OTEL_TRACES_EXPORTER={other:?} is not supported (use otlp, console, file or none)"
                ))
            }
        };
        let queue_size = s.number("OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_QUEUE_SIZE, false)?;
        // Upper bounds: the queue's slots are allocated up front, and an allocation failure
        // aborts the process (no unwinding), so a typo must fail the load instead.
        if queue_size > MAX_QUEUE_SIZE {
            return Err(format!("OTEL_BSP_MAX_QUEUE_SIZE={queue_size} is larger than {MAX_QUEUE_SIZE}"));
        }
        let batch_size = s.number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, false)?;
        if batch_size > MAX_BATCH_SIZE {
            return Err(format!("OTEL_BSP_MAX_EXPORT_BATCH_SIZE={batch_size} is larger than {MAX_BATCH_SIZE}"));
        }
        // The SDK specification wants the batch no larger than the queue; cutting it (rather
        // than refusing) keeps `opentracing.set()` calls independent of their order.
        let batch_size = batch_size.min(queue_size);
        Ok(ExportConfig {
            sink,
            queue_size,
            batch_size,
            flush_interval: s.millis("OTEL_BSP_SCHEDULE_DELAY", Duration::from_millis(5000))?,
            export_timeout: s.millis("OTEL_BSP_EXPORT_TIMEOUT", Duration::from_millis(30000))?,
            resource: Resource::from_settings(s)?,
        })
    }
}

fn otlp(s: &Settings) -> Result<OtlpConfig, String> {
    let protocol = match s.get_traces("OTEL_EXPORTER_OTLP_PROTOCOL") {
        None => Protocol::HttpProtobuf,
        Some((v, _)) if v == "grpc" => Protocol::Grpc,
        Some((v, _)) if v == "http/protobuf" => Protocol::HttpProtobuf,
        Some((v, _)) if v == "http/json" => Protocol::HttpJson,
        Some((v, name)) => return Err(format!("{name}={v:?} is not one of grpc, http/protobuf, http/json")),
    };
    let grpc = protocol == Protocol::Grpc;
    // The signal-specific endpoint is used as it is; the general one is a base to which HTTP
    // adds `v1/traces`; gRPC uses either as it is.
    let (given, name, append) =
        match (s.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), s.get("OTEL_EXPORTER_OTLP_ENDPOINT")) {
            (Some(e), _) => (e, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", false),
            (None, Some(base)) => (base, "OTEL_EXPORTER_OTLP_ENDPOINT", !grpc),
            (None, None) if grpc => (DEFAULT_GRPC_ENDPOINT.to_owned(), "the default endpoint", false),
            (None, None) => (DEFAULT_HTTP_ENDPOINT.to_owned(), "the default endpoint", true),
        };
    check_url(&given).map_err(|e| format!("{name}={given:?} {e}"))?;
    let endpoint = if append { append_path(&given) } else { given };
    let headers = match s.get_traces("OTEL_EXPORTER_OTLP_HEADERS") {
        Some((text, name)) => {
            let kv = key_values(name, &text)?;
            for (k, v) in &kv {
                let name_ok = crate::propagation::baggage::is_token(k.as_bytes());
                if !name_ok || v.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
                    return Err(format!("{name}: {k:?} is not a valid HTTP header"));
                }
            }
            kv
        }
        None => Vec::new(),
    };
    let timeout = match s.get_traces("OTEL_EXPORTER_OTLP_TIMEOUT") {
        Some((_, name)) => s.millis(name, Duration::ZERO)?,
        None => Duration::from_secs(10),
    };
    if timeout.is_zero() {
        return Err("OTEL_EXPORTER_OTLP_TIMEOUT must be at least 1 ms".to_owned());
    }
    let gzip = match s.get_traces("OTEL_EXPORTER_OTLP_COMPRESSION") {
        None => false,
        Some((v, _)) if v == "gzip" => true,
        Some((v, _)) if v == "none" => false,
        Some((v, name)) => return Err(format!("{name}={v:?} is neither gzip nor none")),
    };
    let certificate = match s.get_traces("OTEL_EXPORTER_OTLP_CERTIFICATE") {
        Some((path, name)) => {
            // Read now, so that a missing file fails the load rather than every export.
            let pem = std::fs::read(&path).map_err(|e| format!("{name}={path:?}: {e}"))?;
            if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                return Err(format!("{name}={path:?} holds no PEM certificate"));
            }
            Some(PathBuf::from(path))
        }
        None => None,
    };
    Ok(OtlpConfig { protocol, endpoint, headers, timeout, gzip, certificate })
}

/// `http://host:4318` or `http://host:4318/` → `http://host:4318/v1/traces`; a base with a path
/// keeps it (`http://host/otlp` → `http://host/otlp/v1/traces`).
fn append_path(base: &str) -> String {
    if base.ends_with('/') {
        format!("{base}v1/traces")
    } else {
        format!("{base}/v1/traces")
    }
}

fn check_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or("is not an http:// or https:// URL")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() {
        return Err("has no host".to_owned());
    }
    reqwest::Url::parse(url).map(|_| ()).map_err(|e| format!("is not a valid URL: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Result<ExportConfig, String> {
        ExportConfig::from_settings(&Settings::only(pairs).unwrap())
    }

    fn otlp_of(pairs: &[(&str, &str)]) -> OtlpConfig {
        match cfg(pairs).unwrap().sink {
            Sink::Otlp(o) => o,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_default_is_otlp_http_protobuf_to_localhost() {
        let c = cfg(&[]).unwrap();
        assert_eq!((c.queue_size, c.batch_size), (DEFAULT_QUEUE_SIZE, 512));
        assert_eq!(c.flush_interval, Duration::from_secs(5));
        assert_eq!(c.export_timeout, Duration::from_secs(30));
        // A batch larger than the queue is cut to it (order-independent `set()` calls).
        let small = cfg(&[("OTEL_BSP_MAX_QUEUE_SIZE", "10"), ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "20")]).unwrap();
        assert_eq!((small.queue_size, small.batch_size), (10, 10));
        let o = otlp_of(&[]);
        assert_eq!(o.protocol, Protocol::HttpProtobuf);
        assert_eq!(o.endpoint, "http://localhost:4318/v1/traces");
        assert_eq!(o.timeout, Duration::from_secs(10));
        assert!(!o.gzip && o.headers.is_empty() && o.certificate.is_none());
        assert_eq!(otlp_of(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).endpoint, "http://localhost:4317");
    }

    #[test]
    fn endpoint_rules_follow_the_specification() {
        let e = |pairs: &[(&str, &str)]| otlp_of(pairs).endpoint;
        assert_eq!(e(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]), "http://c:4318/v1/traces");
        assert_eq!(e(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")]), "http://c:4318/v1/traces");
        assert_eq!(e(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c/otlp")]), "https://c/otlp/v1/traces");
        // The signal-specific one is used as it is, and wins.
        assert_eq!(
            e(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:1"), ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:2/x")]),
            "http://b:2/x"
        );
        assert_eq!(
            e(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"), ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")]),
            "http://c:4317"
        );
        // The traces protocol wins over the general one.
        let o =
            otlp_of(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"), ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")]);
        assert_eq!(o.protocol, Protocol::HttpJson);
    }

    #[test]
    fn options_are_parsed() {
        let o = otlp_of(&[
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s%3Dcret,x-scope=a"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ]);
        assert_eq!(o.headers, vec![("api-key".into(), "s=cret".into()), ("x-scope".into(), "a".into())]);
        assert_eq!(o.timeout, Duration::from_millis(2500));
        assert!(o.gzip);
        assert_eq!(cfg(&[("OTEL_TRACES_EXPORTER", "none")]).unwrap().sink, Sink::None);
        assert_eq!(cfg(&[("OTEL_TRACES_EXPORTER", "console")]).unwrap().sink, Sink::Stdout);
        let f = cfg(&[("OTEL_TRACES_EXPORTER", "file"), ("OPENTRACING_SPANS_FILE", "/tmp/x.jsonl")]).unwrap();
        assert_eq!(f.sink, Sink::File("/tmp/x.jsonl".into()));
    }

    #[test]
    fn bad_values_name_their_setting() {
        let err = |pairs: &[(&str, &str)]| cfg(pairs).unwrap_err();
        for (pairs, expect) in [
            (&[("OTEL_TRACES_EXPORTER", "zipkin")][..], "OTEL_TRACES_EXPORTER=\"zipkin\""),
            (&[("OTEL_TRACES_EXPORTER", "otlp,console")][..], "one exporter at a time"),
            (&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http")][..], "OTEL_EXPORTER_OTLP_PROTOCOL=\"http\""),
            (&[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "udp")][..], "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")][..],
                "OTEL_EXPORTER_OTLP_ENDPOINT=\"collector:4318\" is not an http",
            ),
            (&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http:///v1/traces")][..], "has no host"),
            (&[("OTEL_EXPORTER_OTLP_HEADERS", "bad header=1")][..], "not a valid HTTP header"),
            (&[("OTEL_EXPORTER_OTLP_HEADERS", "k=a%0Ab")][..], "not a valid HTTP header"),
            (&[("OTEL_EXPORTER_OTLP_TIMEOUT", "soon")][..], "OTEL_EXPORTER_OTLP_TIMEOUT"),
            (&[("OTEL_EXPORTER_OTLP_TIMEOUT", "0")][..], "at least 1 ms"),
            (&[("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")][..], "OTEL_EXPORTER_OTLP_COMPRESSION=\"zstd\""),
            (&[("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem")][..], "OTEL_EXPORTER_OTLP_CERTIFICATE"),
            (&[("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/hostname")][..], "holds no PEM certificate"),
            (
                &[("OTEL_BSP_MAX_QUEUE_SIZE", "1000000000000")][..],
                "OTEL_BSP_MAX_QUEUE_SIZE=1000000000000 is larger than",
            ),
            (
                &[("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1000000000")][..],
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE=1000000000 is larger",
            ),
        ] {
            let e = err(pairs);
            assert!(e.contains(expect), "{pairs:?}: {e}");
        }
    }
}
