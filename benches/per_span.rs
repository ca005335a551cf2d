//! Microbenchmarks of the per-request work on a Varnish worker thread and of the export path per
//! span, so that regressions show without wrk (`cargo bench --bench per_span`).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use vmod_opentracing::export::otlp_json::{write_export_request, Resource};
use vmod_opentracing::ids::{SpanId, TraceId};
use vmod_opentracing::propagation::{traceparent, tracestate};
use vmod_opentracing::sampling::Sampler;
use vmod_opentracing::span::{SpanKind, SpanRecord, ValueRef};
use vmod_opentracing::trace::{self, Parent};

const TP: &[u8] = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// A finished SERVER span as the module exports it for a cache hit.
fn finished_span() -> SpanRecord {
    let mut r = SpanRecord::new(SpanKind::Server, TraceId::random(), SpanId::random(), Some(SpanId::random()));
    r.parent_is_remote = true;
    r.name = "GET".into();
    r.start_unix_nano = 1_700_000_000_000_001_000;
    r.end_unix_nano = 1_700_000_000_000_091_000;
    // The module's own attributes are encoded as they are added; the outcome is typed.
    r.add("http.request.method", ValueRef::Str("GET"));
    r.add("url.path", ValueRef::Str("/static/app.js"));
    r.outcome.cache_result = Some("hit".into());
    r.outcome.vxid = Some(32770);
    r.outcome.request_body_size = Some(0);
    r.outcome.response_body_size = Some(1024);
    r.outcome.status_code = Some(200);
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
            black_box(s.context.outgoing_traceparent())
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

/// A client transaction's log batch as Varnish writes it for a miss (about 40 records, of which
/// the tailer uses a dozen).
fn client_batch(vxid: u64) -> Vec<u8> {
    use vmod_opentracing::vsl::record::encode;
    let recs: &[(u8, &str)] = &[
        (1, "req 32769 rxreq"),
        (4, "Start: 1700000000.000100 0.000000 0.000000"),
        (4, "Req: 1700000000.000100 0.000000 0.000000"),
        (20, "127.0.0.1 44444 a0"),
        (21, "GET"),
        (22, "/pass/x"),
        (23, "HTTP/1.1"),
        (24, "Host: 127.0.0.1:9100"),
        (24, "User-Agent: wrk"),
        (24, "X-Forwarded-For: 127.0.0.1"),
        (24, "Via: 1.1 v1 (Varnish/7.7)"),
        (25, "RECV"),
        (26, "pass"),
        (25, "HASH"),
        (26, "lookup"),
        (25, "PASS"),
        (24, "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        (26, "fetch"),
        (3, "bereq 32771 pass"),
        (4, "Fetch: 1700000000.000300 0.000200 0.000200"),
        (27, "HTTP/1.1"),
        (7, "200"),
        (28, "OK"),
        (29, "Date: Sat, 21 Nov 2026 23:47:53 GMT"),
        (29, "Server: Varnish"),
        (29, "Content-Length: 1024"),
        (29, "Cache-Control: max-age=3600"),
        (29, "X-Varnish: 32770 32771"),
        (29, "Age: 0"),
        (29, "Via: 1.1 v1 (Varnish/7.7)"),
        (25, "DELIVER"),
        (26, "deliver"),
        (4, "Process: 1700000000.000310 0.000210 0.000010"),
        (30, ""),
        (29, "Accept-Ranges: bytes"),
        (29, "Connection: keep-alive"),
        (4, "Resp: 1700000000.000350 0.000250 0.000040"),
        (5, "78 0 78 250 1024 1274"),
        (2, ""),
    ];
    let mut out = Vec::new();
    for (tag, payload) in recs {
        encode(&mut out, *tag, vxid, true, payload.as_bytes());
    }
    out
}

/// A backend fetch's log batch (a pass or a miss): about 30 records, of which the tailer uses ten.
fn backend_batch(vxid: u64) -> Vec<u8> {
    use vmod_opentracing::vsl::record::encode;
    let recs: &[(u8, &str)] = &[
        (1, "bereq 32770 pass"),
        (31, "boot"),
        (4, "Start: 1700000000.000200 0.000000 0.000000"),
        (32, "GET"),
        (33, "/pass/x"),
        (34, "HTTP/1.1"),
        (35, "Host: 127.0.0.1:9100"),
        (35, "User-Agent: wrk"),
        (35, "X-Forwarded-For: 127.0.0.1"),
        (35, "Via: 1.1 v1 (Varnish/7.7)"),
        (35, "traceparent: 00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"),
        (35, "X-Varnish: 32771"),
        (25, "BACKEND_FETCH"),
        (26, "fetch"),
        (4, "Fetch: 1700000000.000210 0.000010 0.000010"),
        (4, "Connected: 1700000000.000230 0.000030 0.000020"),
        (12, "25 s1 127.0.0.1 8080 127.0.0.1 45678 connect"),
        (4, "Bereq: 1700000000.000240 0.000040 0.000010"),
        (36, "HTTP/1.1"),
        (8, "200"),
        (37, "OK"),
        (38, "Content-Length: 1024"),
        (38, "Date: Sat, 21 Nov 2026 23:47:53 GMT"),
        (4, "Beresp: 1700000000.000280 0.000080 0.000040"),
        (39, "RFC 120 10 0 1700000000 1700000000 1700000000 0 0 cacheable"),
        (25, "BACKEND_RESPONSE"),
        (26, "deliver"),
        (40, "3 length stream"),
        (41, "25 s1 recycle"),
        (4, "BerespBody: 1700000000.000300 0.000100 0.000020"),
        (42, "1024"),
        (6, "200 0 200 150 1024 1174"),
        (2, ""),
    ];
    let mut out = Vec::new();
    for (tag, payload) in recs {
        encode(&mut out, *tag, vxid, false, payload.as_bytes());
    }
    out
}

fn tailer_path(c: &mut Criterion) {
    use std::time::Instant;
    use vmod_opentracing::vsl::correlate::{Correlator, Limits};
    use vmod_opentracing::vsl::record::{records, TagTable};
    let tags = TagTable::new(|name| {
        Some(match name.to_bytes() {
            b"Begin" => 1,
            b"End" => 2,
            b"Link" => 3,
            b"Timestamp" => 4,
            b"ReqAcct" => 5,
            b"BereqAcct" => 6,
            b"RespStatus" => 7,
            b"BerespStatus" => 8,
            b"Hit" => 9,
            b"BackendOpen" => 12,
            _ => return None,
        })
    });
    let client = client_batch(1001);
    let span = |kind| {
        let mut r = finished_span();
        r.kind = kind;
        r.vxid = 1001;
        Box::new(r)
    };
    let mut group = c.benchmark_group("tailer");
    group.bench_function("skip an untracked transaction", |b| {
        let corr = Correlator::new(tags.clone(), Limits::default());
        b.iter(|| black_box(corr.wants(black_box(1001))))
    });
    // The floor under the two below: stepping through the records of a batch, one after the
    // other (each record's length says where the next one is).
    group.bench_function("walk 40 log records", |b| {
        b.iter(|| records(black_box(&client)).map(|r| r.data.len()).sum::<usize>())
    });
    // Conservative: with a clock read, and the span dropped inside the measurement.
    group.bench_function("traced transaction: track, finish, 40 log records", |b| {
        let mut corr = Correlator::new(tags.clone(), Limits::default());
        let mut out = Vec::new();
        b.iter_batched(
            || span(SpanKind::Server),
            |record| {
                let now = Instant::now();
                corr.track(1001, now);
                corr.finished(record, 1001, now);
                corr.records(black_box(&client), &mut out);
                out.clear();
            },
            BatchSize::SmallInput,
        )
    });
    // What a worker pays at a sampled task's end for a span whose log buffer holds its whole
    // log (the default's usual case: `task_log`): the records read straight into the span.
    group.bench_function("task's end: whole transaction from its buffer (40 records)", |b| {
        use vmod_opentracing::vsl::correlate::OneTransaction;
        use vmod_opentracing::vsl::fetch_links::FetchLinks;
        let mut reader = OneTransaction::new(tags.clone(), FetchLinks::leaked(1024));
        b.iter_batched(
            || span(SpanKind::Server),
            |mut record| {
                reader.complete(black_box(&client), 1001, &mut record);
                record
            },
            BatchSize::SmallInput,
        )
    });
    // What the tailer thread pays per span, as it does it: the batch copied out of the log (as
    // `LogReader::copy_current` does), the clock read once per tick rather than per message,
    // and the span handed to the exporter (criterion drops what the routine returns after
    // timing). Batches of many VXIDs, in turn, so that neither the log nor the maps stay in the
    // first-level cache.
    for (name, kind, make_batch) in [
        ("tailer's share, client transaction (40 records)", SpanKind::Server, client_batch as fn(u64) -> Vec<u8>),
        ("tailer's share, backend fetch (33 records)", SpanKind::Client, backend_batch),
    ] {
        let batches: Vec<(u64, Vec<u8>)> = (2000..2256).map(|v| (v, make_batch(v))).collect();
        group.bench_function(name, |b| {
            let mut corr = Correlator::new(tags.clone(), Limits::default());
            let (mut buf, mut out) = (Vec::with_capacity(64 * 1024), Vec::new());
            let now = Instant::now();
            let mut turn = batches.iter().cycle();
            b.iter_batched(
                || {
                    let (vxid, batch) = turn.next().unwrap();
                    let mut r = span(kind);
                    r.vxid = *vxid;
                    (r, batch)
                },
                |(record, batch)| {
                    let vxid = record.vxid;
                    corr.track(vxid, now);
                    corr.finished(record, vxid, now);
                    buf.clear();
                    buf.extend_from_slice(black_box(batch));
                    corr.records(&buf, &mut out);
                    out.pop()
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, request_path, export_path, tailer_path);
criterion_main!(benches);
