//! Microbenchmarks of the per-request work on a Varnish worker thread and of the export path per
//! span, so that regressions show without wrk (`cargo bench --bench per_span`).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use vmod_opentracing::export::otlp_json::{write_export_request, Resource};
use vmod_opentracing::ids::{SpanId, TraceId};
use vmod_opentracing::propagation::{traceparent, tracestate};
use vmod_opentracing::sampling::Sampler;
use vmod_opentracing::span::{SpanKind, SpanRecord, Value};
use vmod_opentracing::trace::{self, outgoing_traceparent, Parent};

const TP: &[u8] = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// A finished SERVER span as the module exports it for a cache hit.
fn finished_span() -> SpanRecord {
    let mut r = SpanRecord::new(SpanKind::Server, TraceId::random(), SpanId::random(), Some(SpanId::random()));
    r.parent_is_remote = true;
    r.name = "GET".into();
    r.start_unix_nano = 1_700_000_000_000_001_000;
    r.end_unix_nano = 1_700_000_000_000_091_000;
    r.add("http.request.method", Value::Str("GET".into()));
    r.add("url.path", Value::Str("/static/app.js".into()));
    r.add("varnish.cache_result", Value::Str("hit".into()));
    r.add("varnish.vxid", Value::Int(32770));
    r.add("http.request.body.size", Value::Int(0));
    r.add("http.response.body.size", Value::Int(1024));
    r.add("http.response.status_code", Value::Int(200));
    r
}

fn request_path(c: &mut Criterion) {
    let sampler = Sampler::default();
    c.bench_function("traceparent::parse", |b| b.iter(|| traceparent::parse(black_box(&[TP]))));
    c.bench_function("tracestate::combine (2 members)", |b| {
        b.iter(|| tracestate::combine(black_box(&[b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"])))
    });
    c.bench_function("ids: trace + span", |b| b.iter(|| (TraceId::random(), SpanId::random())));
    c.bench_function("trace::start (valid parent) + outgoing traceparent", |b| {
        b.iter(|| {
            let s = trace::start(
                SpanKind::Server,
                Parent::Headers { traceparent: &[TP], tracestate: &[], too_many_fields: false },
                true,
                &sampler,
            );
            black_box(outgoing_traceparent(&s.record))
        })
    });
    let off = Sampler::from_env_values(Some("always_off"), None).unwrap();
    c.bench_function("trace::start, unsampled", |b| {
        b.iter(|| {
            trace::start(
                SpanKind::Server,
                Parent::Headers { traceparent: &[], tracestate: &[], too_many_fields: false },
                true,
                black_box(&off),
            )
        })
    });
}

fn export_path(c: &mut Criterion) {
    let resource = Resource { attributes: vec![("service.name".into(), "varnish".into())] };
    let mut group = c.benchmark_group("export");
    for n in [1usize, 512] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("otlp_json batch of {n}"), |b| {
            let spans: Vec<SpanRecord> = (0..n).map(|_| finished_span()).collect();
            let mut out = String::new();
            b.iter(|| {
                out.clear();
                write_export_request(&mut out, &resource, black_box(&spans));
                black_box(out.len())
            })
        });
    }
    group.bench_function("build a finished span record", |b| {
        b.iter_batched(|| (), |_| finished_span(), BatchSize::SmallInput)
    });
    group.finish();
}

criterion_group!(benches, request_path, export_path);
criterion_main!(benches);
