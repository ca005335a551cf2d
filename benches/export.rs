//! The span encoders compared, per span, on a batch as the exporter sends it
//! (`cargo bench --bench export`). Criterion's throughput line gives spans per second; the time
//! per batch divided by `BATCH` is the time per span.

use std::borrow::Cow;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vmod_opentracing::export::{otlp_json, otlp_proto};
use vmod_opentracing::ids::{SpanId, TraceId};
use vmod_opentracing::span::{Event, SpanKind, SpanRecord, StatusCode, ValueRef};

/// The exporter's default batch size (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`).
const BATCH: usize = 512;

/// A SERVER span for a miss, as the log tailer completes it: the request attributes, the
/// accounting, the backend, and one event per Varnish timestamp.
fn server_span() -> SpanRecord {
    let mut r = SpanRecord::new(SpanKind::Server, TraceId::random(), SpanId::random(), Some(SpanId::random()));
    r.parent_is_remote = true;
    r.tracestate = Some("congo=t61rcWkgMzE".into());
    r.name = "GET".into();
    r.start_unix_nano = 1_700_000_000_000_001_000;
    r.end_unix_nano = 1_700_000_000_000_091_000;
    r.add("http.request.method", ValueRef::Str("GET"));
    r.add("url.path", ValueRef::Str("/static/app.js"));
    r.add("varnish.cache_result", ValueRef::Str("miss"));
    r.add("varnish.vxid", ValueRef::Int(32770));
    r.add("http.request.body.size", ValueRef::Int(0));
    r.add("http.response.body.size", ValueRef::Int(1024));
    r.add("http.response.status_code", ValueRef::Int(200));
    r.add("varnish.backend", ValueRef::Str("boot.default"));
    r.add("network.peer.address", ValueRef::Str("10.0.0.12"));
    r.add("network.peer.port", ValueRef::Int(8080));
    r.add("varnish.restarts", ValueRef::Int(0));
    r.add("varnish.span.closed_by", ValueRef::Str("log"));
    for (i, label) in ["Req", "Fetch", "Process", "Resp", "Bereq", "Beresp", "BerespBody", "Retry"].iter().enumerate() {
        r.events
            .push(Event { time_unix_nano: 1_700_000_000_000_002_000 + i as u64 * 9_000, name: Cow::Borrowed(label) });
    }
    r
}

/// The CLIENT span of the backend fetch under it.
fn client_span() -> SpanRecord {
    let mut r = SpanRecord::new(SpanKind::Client, TraceId::random(), SpanId::random(), Some(SpanId::random()));
    r.name = "GET".into();
    r.start_unix_nano = 1_700_000_000_000_011_000;
    r.end_unix_nano = 1_700_000_000_000_081_000;
    r.add("http.request.method", ValueRef::Str("GET"));
    r.add("url.path", ValueRef::Str("/static/app.js"));
    r.add("varnish.vxid", ValueRef::Int(32771));
    r.add("http.request.body.size", ValueRef::Int(0));
    r.add("http.response.body.size", ValueRef::Int(1024));
    r.add("http.response.status_code", ValueRef::Int(200));
    r.add("varnish.backend", ValueRef::Str("boot.default"));
    r.add("network.peer.address", ValueRef::Str("10.0.0.12"));
    r.add("network.peer.port", ValueRef::Int(8080));
    r.add("varnish.span.closed_by", ValueRef::Str("log"));
    r.status = StatusCode::Unset;
    r
}

fn encoders(c: &mut Criterion) {
    let resource = otlp_json::Resource {
        attributes: vec![
            ("service.name".into(), "varnish".into()),
            ("service.instance.id".into(), "5b8aa5a2-d2a4-4a64-8f39-2a3c2c1e7a10".into()),
            ("host.name".into(), "edge-1".into()),
            ("telemetry.sdk.name".into(), "vmod-opentracing".into()),
            ("telemetry.sdk.language".into(), "rust".into()),
            ("telemetry.sdk.version".into(), "0.1.0".into()),
        ],
    };
    // Half and half, interleaved: a SERVER span and its backend fetch.
    let spans: Vec<SpanRecord> = (0..BATCH).map(|i| if i % 2 == 0 { server_span() } else { client_span() }).collect();

    let mut group = c.benchmark_group("export");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function(format!("otlp_json, {BATCH} spans"), |b| {
        let mut out = String::new();
        b.iter(|| {
            out.clear();
            otlp_json::write_export_request(&mut out, &resource, black_box(&spans));
            black_box(out.len())
        })
    });
    group.bench_function(format!("otlp_proto, {BATCH} spans"), |b| {
        let mut out = Vec::new();
        b.iter(|| {
            let request = otlp_proto::write_export_request(&mut out, &resource, black_box(&spans));
            black_box(request.len())
        })
    });
    group.finish();
}

criterion_group!(benches, encoders);
criterion_main!(benches);
