//! Settings: the standard `OTEL_*` environment variables of the varnishd process, which a VCL may
//! override in `vcl_init` with `opentracing.set(name, value)`, using the same names.
//!
//! Precedence, highest first: `opentracing.set()` in the VCL, the environment, the default.
//! Everything is parsed and checked when a VCL loads (`vcl_init`, then the load event), so a bad
//! value fails `vcl.load` with a message naming the setting; nothing is parsed on the request path.
//!
//! Several warm VCLs: the pipeline is process-wide, so one set of settings applies at a time: that
//! of the VCL warmed most recently (normally the one just loaded). When it differs from what runs,
//! the pipeline switches to it and says so in the log (`pipeline::vcl_warm`).
//!
//! Threading: `Settings` values live in a VCL's PRIV_VCL, written in `vcl_init` and read by the
//! VCL events, both on the CLI thread.

use std::time::Duration;

use crate::export::ExportConfig;
use crate::sampling::Sampler;
use crate::semconv::{HeaderCapture, Redaction};
use crate::span::AttributeLimits;

/// Every setting we read, by the name used in the environment and in `opentracing.set()`.
pub const NAMES: &[&str] = &[
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_EXPORT_TIMEOUT",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_SPAN_EVENT_COUNT_LIMIT",
    "OTEL_SPAN_LINK_COUNT_LIMIT",
    "OTEL_PROPAGATORS",
    "OTEL_INSTRUMENTATION_HTTP_SERVER_CAPTURE_REQUEST_HEADERS",
    "OTEL_INSTRUMENTATION_HTTP_SERVER_CAPTURE_RESPONSE_HEADERS",
    "OTEL_INSTRUMENTATION_HTTP_CLIENT_CAPTURE_REQUEST_HEADERS",
    "OTEL_INSTRUMENTATION_HTTP_CLIENT_CAPTURE_RESPONSE_HEADERS",
    "OPENTRACING_REDACT",
    "OPENTRACING_CAPTURE_URL_QUERY",
    "OPENTRACING_SERVER_ROLE",
    "OPENTRACING_TRUST",
    "OPENTRACING_TRACERESPONSE",
    "OPENTRACING_SERVER_TIMING",
    "OPENTRACING_SPANS_FILE",
    "OPENTRACING_VSL",
];

/// Where a value came from, for messages (`"OTEL_X=... (from VCL)"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Vcl,
    Environment,
}

/// One VCL's overrides over the environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    overrides: Vec<(&'static str, String)>,
    /// For tests: read nothing from the process environment.
    ignore_environment: bool,
}

impl Settings {
    /// Settings that read the environment and have no override.
    pub fn from_environment() -> Self {
        Settings::default()
    }

    /// Settings made only of `pairs` (tests: independent of the process environment).
    pub fn only(pairs: &[(&str, &str)]) -> Result<Self, String> {
        let mut s = Settings { overrides: Vec::new(), ignore_environment: true };
        for (k, v) in pairs {
            s.set(k, v)?;
        }
        Ok(s)
    }

    /// Overrides `name` (an entry of `NAMES`, any case). Unknown names are errors.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        let name = name.trim();
        let Some(known) = NAMES.iter().find(|n| n.eq_ignore_ascii_case(name)) else {
            return Err(format!("unknown setting {name:?} (known settings: {})", NAMES.join(", ")));
        };
        self.overrides.retain(|(k, _)| k != known);
        self.overrides.push((known, value.to_owned()));
        Ok(())
    }

    /// The value of `name`, or `None` when unset or blank (blank means "use the default", as
    /// in the SDKs).
    pub fn get(&self, name: &str) -> Option<String> {
        self.get_with_origin(name).map(|(v, _)| v)
    }

    pub fn get_with_origin(&self, name: &str) -> Option<(String, Origin)> {
        if let Some((_, v)) = self.overrides.iter().find(|(k, _)| *k == name) {
            return Some((v.trim().to_owned(), Origin::Vcl)).filter(|(v, _)| !v.is_empty());
        }
        if self.ignore_environment {
            return None;
        }
        std::env::var(name)
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .map(|v| (v, Origin::Environment))
    }

    /// The signal-specific setting (`OTEL_EXPORTER_OTLP_TRACES_*`) if set, else the general one.
    pub fn get_traces(&self, general: &str) -> Option<(String, &'static str)> {
        let specific = general.replacen("OTEL_EXPORTER_OTLP_", "OTEL_EXPORTER_OTLP_TRACES_", 1);
        let name = |n: &str| NAMES.iter().copied().find(|k| *k == n);
        if let (Some(v), Some(n)) = (self.get(&specific), name(&specific)) {
            return Some((v, n));
        }
        self.get(general).zip(name(general))
    }

    pub fn has_overrides(&self) -> bool {
        !self.overrides.is_empty()
    }

    /// `true`/`false`, case-insensitively.
    pub fn bool(&self, name: &str, default: bool) -> Result<bool, String> {
        match self.get(name) {
            None => Ok(default),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
            Some(v) => Err(format!("{name}={v:?} is neither true nor false")),
        }
    }

    /// A positive integer (zero refused unless `allow_zero`).
    pub fn number(&self, name: &str, default: usize, allow_zero: bool) -> Result<usize, String> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.parse::<usize>().ok().filter(|n| allow_zero || *n > 0).ok_or_else(|| {
                format!("{name}={v:?} is not a {} integer", if allow_zero { "non-negative" } else { "positive" })
            }),
        }
    }

    /// Milliseconds, as every `OTEL_*` duration is given.
    pub fn millis(&self, name: &str, default: Duration) -> Result<Duration, String> {
        Ok(Duration::from_millis(self.number(name, default.as_millis() as usize, true)? as u64))
    }
}

/// What the module keeps per VCL (its PRIV_VCL): the overrides from its `vcl_init`, and whether
/// it counts as warm for the pipeline (a VCL whose warm-up failed gets a cold event all the same,
/// which must not stop another VCL's pipeline).
#[derive(Default)]
pub struct VclState {
    pub settings: parking_lot::Mutex<Settings>,
    pub warm: bool,
}

/// Everything the pipeline runs with, parsed and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `OTEL_SDK_DISABLED=true`: the module does nothing; trace headers pass through untouched.
    pub disabled: bool,
    pub sampler: Sampler,
    pub export: ExportConfig,
    /// `OPENTRACING_VSL`: where a span's log records come from.
    pub log_source: LogSource,
    pub limits: AttributeLimits,
    pub spans: SpanSettings,
}

/// Where the records Varnish logs for a traced transaction (timestamps, status, errors, cache
/// hits) come from when its span closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogSource {
    /// `on` (the default): the shared-memory log, read by the tailer thread (`vsl::tailer`). It
    /// follows a transaction across restarts and retries and links hits to the fetches of
    /// their objects, at the price of stepping through every transaction in the log.
    Shared,
    /// `task`: the task's own log buffer, read on the worker when the task ends
    /// (`vsl::task_log`): no tailer thread and no log reading for untraced transactions, but
    /// only what the buffer still holds (see that module).
    Task,
    /// `off`: no log records; spans close from their task's data alone.
    Off,
}

impl Config {
    /// Whether this configuration runs the log tailer: it reads the shared log, and there are
    /// spans (the SDK is not disabled).
    pub fn wants_tailer(&self) -> bool {
        self.log_source == LogSource::Shared && !self.disabled
    }

    pub fn from_settings(s: &Settings) -> Result<Config, String> {
        let log_source = match s.get("OPENTRACING_VSL").as_deref() {
            None | Some("on") => LogSource::Shared,
            Some("task") => LogSource::Task,
            Some("off") => LogSource::Off,
            Some(v) => return Err(format!("OPENTRACING_VSL={v:?} is none of on, task, off")),
        };
        Ok(Config {
            disabled: s.bool("OTEL_SDK_DISABLED", false)?,
            sampler: Sampler::from_settings(s)?,
            export: ExportConfig::from_settings(s)?,
            log_source,
            limits: AttributeLimits::from_settings(s)?,
            spans: SpanSettings::from_settings(s)?,
        })
    }
}

/// What to do with an incoming trace context (`OPENTRACING_TRUST`, or per request from VCL with
/// `opentracing.trust()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Trust {
    /// Continue the caller's trace.
    #[default]
    Extract,
    /// Start a new trace; the incoming context is dropped.
    Ignore,
    /// Start a new trace with a span link to the incoming context.
    Link,
}

impl Trust {
    pub fn parse(v: &str) -> Option<Trust> {
        match v {
            "extract" => Some(Trust::Extract),
            "ignore" => Some(Trust::Ignore),
            "link" => Some(Trust::Link),
            _ => None,
        }
    }
}

/// The propagation formats (`OTEL_PROPAGATORS`), as bits: extraction uses the first present in
/// this order, injection writes all that are enabled.
pub mod propagators {
    pub const TRACECONTEXT: u8 = 1;
    pub const BAGGAGE: u8 = 2;
    pub const B3: u8 = 4;
    pub const B3MULTI: u8 = 8;
    pub const JAEGER: u8 = 16;
    /// `tracecontext,baggage`, as the OpenTelemetry SDKs.
    pub const DEFAULT: u8 = TRACECONTEXT | BAGGAGE;

    pub fn parse(list: &str) -> Result<u8, String> {
        let mut bits = 0;
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            bits |= match name {
                "tracecontext" => TRACECONTEXT,
                "baggage" => BAGGAGE,
                "b3" => B3,
                "b3multi" => B3MULTI,
                "jaeger" => JAEGER,
                "none" => 0,
                other => {
                    return Err(format!(
                    "OTEL_PROPAGATORS: {other:?} is not supported (tracecontext, baggage, b3, b3multi, jaeger, none)"
                ))
                }
            };
        }
        Ok(bits)
    }
}

/// What goes into spans beyond the defaults, and what the client is told.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct SpanSettings {
    pub server_request_headers: HeaderCapture,
    pub server_response_headers: HeaderCapture,
    pub client_request_headers: HeaderCapture,
    pub client_response_headers: HeaderCapture,
    /// Applied to captured header values and to `url.query`.
    pub redact: Option<Redaction>,
    /// `url.query` is recorded only when enabled (queries often carry secrets).
    pub capture_query: bool,
    /// `varnish.server.role`: `edge`, `shield` or `single`.
    pub role: Option<&'static str>,
    pub trust: Trust,
    pub propagators: u8,
    /// Send `traceresponse` to the client (W3C Trace Context Level 2).
    pub traceresponse: bool,
    /// Send `Server-Timing: traceparent;desc="..."` to the client.
    pub server_timing: bool,
}

impl SpanSettings {
    pub fn from_settings(s: &Settings) -> Result<Self, String> {
        let capture = |name: &str| -> Result<HeaderCapture, String> {
            s.get(name).map_or(Ok(HeaderCapture::default()), |v| HeaderCapture::parse(name, &v))
        };
        let role = match s.get("OPENTRACING_SERVER_ROLE").as_deref() {
            None => None,
            Some("edge") => Some("edge"),
            Some("shield") => Some("shield"),
            Some("single") => Some("single"),
            Some(v) => return Err(format!("OPENTRACING_SERVER_ROLE={v:?} is not one of edge, shield, single")),
        };
        let trust = match s.get("OPENTRACING_TRUST") {
            None => Trust::Extract,
            Some(v) => {
                Trust::parse(&v).ok_or(format!("OPENTRACING_TRUST={v:?} is not one of extract, ignore, link"))?
            }
        };
        Ok(SpanSettings {
            server_request_headers: capture("OTEL_INSTRUMENTATION_HTTP_SERVER_CAPTURE_REQUEST_HEADERS")?,
            server_response_headers: capture("OTEL_INSTRUMENTATION_HTTP_SERVER_CAPTURE_RESPONSE_HEADERS")?,
            client_request_headers: capture("OTEL_INSTRUMENTATION_HTTP_CLIENT_CAPTURE_REQUEST_HEADERS")?,
            client_response_headers: capture("OTEL_INSTRUMENTATION_HTTP_CLIENT_CAPTURE_RESPONSE_HEADERS")?,
            redact: s.get("OPENTRACING_REDACT").map(|p| Redaction::parse("OPENTRACING_REDACT", &p)).transpose()?,
            capture_query: s.bool("OPENTRACING_CAPTURE_URL_QUERY", false)?,
            role,
            trust,
            propagators: s.get("OTEL_PROPAGATORS").map_or(Ok(propagators::DEFAULT), |v| propagators::parse(&v))?,
            traceresponse: s.bool("OPENTRACING_TRACERESPONSE", false)?,
            server_timing: s.bool("OPENTRACING_SERVER_TIMING", false)?,
        })
    }
}

// ---- the span settings in force, read on worker threads ------------------------------------

/// What every request reads (propagators, default trust, what to tell the client), in one atomic
/// so that an unsampled request pays one relaxed load; the rest, read only for sampled spans,
/// behind a lock that is written only when a VCL warms up.
static HOT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(propagators::DEFAULT as u32);
// Read on every sampled request: arc-swap's load takes no lock and, usually, no reference-count
// write (a read lock and an Arc clone were about 900 instructions per sampled request).
static ACTIVE_SPANS: std::sync::LazyLock<arc_swap::ArcSwap<SpanSettings>> =
    std::sync::LazyLock::new(|| arc_swap::ArcSwap::from_pointee(SpanSettings::default()));

const HOT_TRACERESPONSE: u32 = 1 << 8;
const HOT_SERVER_TIMING: u32 = 1 << 9;
const HOT_TRUST_SHIFT: u32 = 10; // two bits
const HOT_CAPTURES_SERVER_RESPONSE: u32 = 1 << 12;
const HOT_CAPTURES_CLIENT: u32 = 1 << 13;

/// The per-request flags of the settings in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hot {
    pub propagators: u8,
    pub trust: Trust,
    pub traceresponse: bool,
    pub server_timing: bool,
    /// Response headers of the client's request are captured (`finish` in vcl_deliver reads the
    /// span settings only then: about 70 instructions per sampled request otherwise).
    pub captures_server_response: bool,
    /// Headers of backend requests or responses are captured (`finish` in
    /// vcl_backend_response, likewise).
    pub captures_client: bool,
}

pub fn hot() -> Hot {
    Hot::from_word(HOT.load(std::sync::atomic::Ordering::Relaxed))
}

impl Hot {
    /// The flags of `settings`, as `HOT` holds them.
    fn word(settings: &SpanSettings) -> u32 {
        let trust = match settings.trust {
            Trust::Extract => 0,
            Trust::Ignore => 1,
            Trust::Link => 2,
        };
        let captures_client =
            !settings.client_request_headers.is_empty() || !settings.client_response_headers.is_empty();
        u32::from(settings.propagators)
            | if settings.traceresponse { HOT_TRACERESPONSE } else { 0 }
            | if settings.server_timing { HOT_SERVER_TIMING } else { 0 }
            | (trust << HOT_TRUST_SHIFT)
            | if settings.server_response_headers.is_empty() { 0 } else { HOT_CAPTURES_SERVER_RESPONSE }
            | if captures_client { HOT_CAPTURES_CLIENT } else { 0 }
    }

    fn from_word(v: u32) -> Hot {
        Hot {
            propagators: (v & 0xff) as u8,
            trust: match (v >> HOT_TRUST_SHIFT) & 3 {
                1 => Trust::Ignore,
                2 => Trust::Link,
                _ => Trust::Extract,
            },
            traceresponse: v & HOT_TRACERESPONSE != 0,
            server_timing: v & HOT_SERVER_TIMING != 0,
            captures_server_response: v & HOT_CAPTURES_SERVER_RESPONSE != 0,
            captures_client: v & HOT_CAPTURES_CLIENT != 0,
        }
    }
}

/// The span settings in force (a lock-free snapshot; hold it for one call, not across requests).
pub fn active_spans() -> arc_swap::Guard<std::sync::Arc<SpanSettings>> {
    ACTIVE_SPANS.load()
}

/// Puts `s` in force (CLI thread, when a VCL warms up).
pub fn activate(s: &SpanSettings) {
    // Two stores, not one: a request running while a VCL warms up may see the new flags with
    // the old settings, or the reverse (one request captures by either).
    ACTIVE_SPANS.store(std::sync::Arc::new(s.clone()));
    HOT.store(Hot::word(s), std::sync::atomic::Ordering::Relaxed);
}

/// `key1=value1,key2=value2` as in `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_EXPORTER_OTLP_HEADERS`
/// (the W3C Baggage format, values percent-encoded). A malformed entry is an error naming it.
pub fn key_values(name: &str, text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(format!("{name}: {item:?} is not key=value"));
        };
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() {
            return Err(format!("{name}: {item:?} has an empty key"));
        }
        let v = percent_decode(v)
            .ok_or_else(|| format!("{name}: the value of {k:?} is not valid percent-encoded UTF-8"))?;
        out.push((k.to_owned(), v));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags word says what the settings say: every combination of the captures (`*` alone
    /// too, which has no names), trust, the client headers and the propagators.
    #[test]
    fn the_hot_word_carries_the_settings_flags() {
        let lists = ["", "x-request-id", "*"];
        let combinations = lists.iter().flat_map(|&a| lists.iter().flat_map(move |&b| lists.map(move |c| (a, b, c))));
        for (server_response, client_request, client_response) in combinations {
            for trust in [Trust::Extract, Trust::Ignore, Trust::Link] {
                for (traceresponse, server_timing) in [(false, false), (true, false), (false, true), (true, true)] {
                    let mut pairs = vec![
                        ("OPENTRACING_TRACERESPONSE", if traceresponse { "true" } else { "false" }),
                        ("OPENTRACING_SERVER_TIMING", if server_timing { "true" } else { "false" }),
                        ("OTEL_PROPAGATORS", "tracecontext,b3multi"),
                    ];
                    for (name, list) in [
                        ("OTEL_INSTRUMENTATION_HTTP_SERVER_CAPTURE_RESPONSE_HEADERS", server_response),
                        ("OTEL_INSTRUMENTATION_HTTP_CLIENT_CAPTURE_REQUEST_HEADERS", client_request),
                        ("OTEL_INSTRUMENTATION_HTTP_CLIENT_CAPTURE_RESPONSE_HEADERS", client_response),
                    ] {
                        if !list.is_empty() {
                            pairs.push((name, list));
                        }
                    }
                    let mut spans = SpanSettings::from_settings(&Settings::only(&pairs).unwrap()).unwrap();
                    spans.trust = trust;
                    let hot = Hot::from_word(Hot::word(&spans));
                    let want = Hot {
                        propagators: spans.propagators,
                        trust,
                        traceresponse,
                        server_timing,
                        captures_server_response: !server_response.is_empty(),
                        captures_client: !client_request.is_empty() || !client_response.is_empty(),
                    };
                    assert_eq!(hot, want, "{pairs:?}");
                }
            }
        }
    }

    #[test]
    fn vcl_overrides_win_and_names_are_checked() {
        let mut s = Settings::only(&[("otel_service_name", "edge")]).unwrap();
        assert_eq!(s.get("OTEL_SERVICE_NAME").as_deref(), Some("edge"));
        s.set("OTEL_SERVICE_NAME", "shield").unwrap();
        assert_eq!(s.get_with_origin("OTEL_SERVICE_NAME"), Some(("shield".to_owned(), Origin::Vcl)));
        let e = s.set("OTEL_NOPE", "1").unwrap_err();
        assert!(e.contains("unknown setting \"OTEL_NOPE\""), "{e}");
        // Blank means default.
        s.set("OTEL_SERVICE_NAME", " ").unwrap();
        assert_eq!(s.get("OTEL_SERVICE_NAME"), None);
    }

    #[test]
    fn signal_specific_settings_win_over_general_ones() {
        let s =
            Settings::only(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "5"), ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "7")]).unwrap();
        assert_eq!(
            s.get_traces("OTEL_EXPORTER_OTLP_TIMEOUT"),
            Some(("7".to_owned(), "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"))
        );
        let s = Settings::only(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "5")]).unwrap();
        assert_eq!(s.get_traces("OTEL_EXPORTER_OTLP_TIMEOUT"), Some(("5".to_owned(), "OTEL_EXPORTER_OTLP_TIMEOUT")));
    }

    #[test]
    fn typed_values_fail_with_the_settings_name() {
        let s = Settings::only(&[("OTEL_SDK_DISABLED", "yes"), ("OTEL_BSP_MAX_QUEUE_SIZE", "0")]).unwrap();
        assert!(s.bool("OTEL_SDK_DISABLED", false).unwrap_err().contains("OTEL_SDK_DISABLED=\"yes\""));
        assert!(s.number("OTEL_BSP_MAX_QUEUE_SIZE", 1, false).unwrap_err().contains("OTEL_BSP_MAX_QUEUE_SIZE"));
        assert_eq!(s.number("OTEL_BSP_MAX_QUEUE_SIZE", 1, true), Ok(0));
        let e = Config::from_settings(&Settings::only(&[("OPENTRACING_VSL", "maybe")]).unwrap()).unwrap_err();
        assert!(e.contains("OPENTRACING_VSL"), "{e}");
    }

    #[test]
    fn key_value_lists_are_percent_decoded() {
        let kv = key_values("H", "api-key=abc%20def, x-tenant = t1 ,,").unwrap();
        assert_eq!(kv, vec![("api-key".into(), "abc def".into()), ("x-tenant".into(), "t1".into())]);
        assert!(key_values("H", "novalue").unwrap_err().contains("\"novalue\" is not key=value"));
        assert!(key_values("H", "=v").is_err());
        assert!(key_values("H", "k=%zz").is_err());
        assert!(key_values("H", "k=%ff").is_err(), "invalid UTF-8");
    }

    #[test]
    fn span_settings_parse_and_name_their_setting() {
        let s = Settings::only(&[
            ("OTEL_PROPAGATORS", "b3, tracecontext"),
            ("OPENTRACING_TRUST", "link"),
            ("OPENTRACING_SERVER_ROLE", "edge"),
            ("OTEL_INSTRUMENTATION_HTTP_SERVER_CAPTURE_REQUEST_HEADERS", "x-request-id"),
            ("OPENTRACING_REDACT", "secret=[^&]*"),
        ])
        .unwrap();
        let c = SpanSettings::from_settings(&s).unwrap();
        assert_eq!(c.propagators, propagators::B3 | propagators::TRACECONTEXT);
        assert_eq!((c.trust, c.role), (Trust::Link, Some("edge")));
        assert!(c.server_request_headers.wants("X-Request-Id") && !c.server_response_headers.wants("x-request-id"));
        assert!(c.redact.is_some() && !c.capture_query && !c.traceresponse);
        for (k, v, expect) in [
            ("OTEL_PROPAGATORS", "xray", "OTEL_PROPAGATORS: \"xray\""),
            ("OPENTRACING_TRUST", "maybe", "OPENTRACING_TRUST"),
            ("OPENTRACING_SERVER_ROLE", "origin", "OPENTRACING_SERVER_ROLE"),
            ("OPENTRACING_REDACT", "(", "OPENTRACING_REDACT"),
            ("OTEL_INSTRUMENTATION_HTTP_CLIENT_CAPTURE_RESPONSE_HEADERS", "a b", "CAPTURE_RESPONSE_HEADERS"),
        ] {
            let e = SpanSettings::from_settings(&Settings::only(&[(k, v)]).unwrap()).unwrap_err();
            assert!(e.contains(expect), "{k}: {e}");
        }
        let d = SpanSettings::from_settings(&Settings::only(&[]).unwrap()).unwrap();
        assert_eq!(d.propagators, propagators::DEFAULT);
        assert_eq!(propagators::parse("none"), Ok(0));
    }

    #[test]
    fn defaults_are_the_sdks() {
        let c = Config::from_settings(&Settings::only(&[]).unwrap()).unwrap();
        assert!(!c.disabled);
        assert_eq!(c.log_source, LogSource::Shared);
        let task = Config::from_settings(&Settings::only(&[("OPENTRACING_VSL", "task")]).unwrap()).unwrap();
        assert_eq!(task.log_source, LogSource::Task);
        let off = Config::from_settings(&Settings::only(&[("OPENTRACING_VSL", "off")]).unwrap()).unwrap();
        assert_eq!(off.log_source, LogSource::Off);
        assert_eq!(c.sampler, Sampler::default());
    }
}
