//! End-to-end tests: real varnishd + the built VMOD + a Python origin, spans read back from the
//! OTLP/JSON file exporter and decoded with `opentelemetry-proto`.
//!
//! Run with Varnish on PATH:
//!     eval "$(bash scripts/varnish.sh --env)" && cargo build && cargo test --test e2e
//! `E2E_KEEP=1` keeps each test's directory (VCL, varnishd output, VSL, spans, backend log).

mod harness;
mod otlp;
mod semconv;
mod vsl;

use std::time::Duration;

use harness::*;
use vsl::Vsl;

const WAIT: Duration = Duration::from_secs(10);

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT: &str = "b7ad6b7169203331";

fn tp(trace: &str, span: &str, flags: &str) -> String {
    format!("00-{trace}-{span}-{flags}")
}

fn of_kind(spans: &[Span], kind: i32) -> Vec<&Span> {
    spans.iter().filter(|s| s.kind == kind).collect()
}

fn in_trace<'a>(spans: &'a [Span], trace: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.trace_id == trace).collect()
}

fn children<'a>(spans: &'a [Span], parent: &Span) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id).collect()
}

fn the_one<'a>(v: Vec<&'a Span>, what: &str, all: &[Span]) -> &'a Span {
    assert_eq!(v.len(), 1, "expected exactly one {what}, got {}: {all:#?}", v.len());
    v[0]
}

fn assert_times(s: &Span) {
    assert!(s.start > 0, "span without start time: {s:#?}");
    assert!(s.start <= s.end, "span ends before it starts: {s:#?}");
}

/// How far a fetch span may end after the request span that waits for it. Varnish streams: the
/// client side can finish sending the last bytes before the fetch task takes its own final
/// timestamp (`BerespBody`, taken after the object is marked finished), and the spans use
/// Varnish's timestamps. Observed overshoot: 50-200 us.
const STREAM_END_SLACK_NS: u64 = 5_000_000;

/// `inner` starts within `outer` and ends no later than `outer` (plus the streaming slack).
fn assert_within(inner: &Span, outer: &Span) {
    assert!(
        outer.start <= inner.start && inner.start <= outer.end && inner.end <= outer.end + STREAM_END_SLACK_NS,
        "span {inner:#?} not within {outer:#?}:\n{} [{}, {}] vs {} [{}, {}]",
        inner.span_id,
        inner.start,
        inner.end,
        outer.span_id,
        outer.start,
        outer.end
    );
}

fn backend_tp(r: &BackendRequest) -> TraceParent {
    let raw = r.traceparent.as_deref().unwrap_or_else(|| panic!("backend request without traceparent: {r:#?}"));
    parse_traceparent(raw).unwrap_or_else(|| panic!("backend received an invalid traceparent {raw:?}: {r:#?}"))
}

/// Case 1: Client -> Varnish -> backend: the SERVER span continues the caller's trace, the CLIENT span
/// is its child, and the backend is told about the CLIENT span.
#[test]
fn client_varnish_backend() {
    let dir = TempDir::new("client_varnish_backend");
    let be = Backend::start(dir.path(), "backend");
    let mut v = Varnish::start(dir.path(), "varnish", be.port, "");

    let incoming = tp(TRACE, PARENT, "01");
    let resp = v.get("/", &[("traceparent", &incoming), ("tracestate", "congo=t61rcWkgMzE")]);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(resp.body_str().contains("hello from /"), "{resp:?}");
    v.wait_spans(WAIT, "SERVER and CLIENT span", |s| s.len() >= 2);
    let spans = v.stop();

    assert_eq!(spans.len(), 2, "one SERVER and one CLIENT span expected: {spans:#?}");
    let server = the_one(of_kind(&spans, KIND_SERVER), "SERVER span", &spans);
    assert_eq!(server.trace_id, TRACE, "{server:#?}");
    assert_eq!(server.parent_span_id, PARENT, "{server:#?}");
    assert_ne!(server.span_id, PARENT);
    assert_eq!(server.trace_flags(), 1);
    assert_eq!(server.service, "varnish");
    assert_eq!(server.attr_str("http.request.method"), Some("GET"), "{server:#?}");
    assert_eq!(server.attr_str("url.path"), Some("/"), "{server:#?}");
    assert_eq!(server.attr_int("varnish.restarts"), None, "no restart: {server:#?}");
    assert_eq!(server.attr_int("http.response.status_code"), Some(200), "{server:#?}");
    assert_eq!(server.attr_str("varnish.cache_result"), Some("miss"), "{server:#?}");
    assert!(server.attr_int("varnish.vxid").is_some_and(|x| x > 0), "{server:#?}");

    let client = the_one(of_kind(&spans, KIND_CLIENT), "CLIENT span", &spans);
    assert_eq!(client.trace_id, TRACE);
    assert_eq!(client.parent_span_id, server.span_id, "CLIENT must be the child of SERVER: {spans:#?}");
    assert_eq!(client.trace_flags(), 1);
    assert_eq!(client.attr_int("http.response.status_code"), Some(200), "{client:#?}");
    assert_eq!(client.attr_str("http.request.method"), Some("GET"), "{client:#?}");
    assert_eq!(client.attr_str("url.path"), Some("/"), "{client:#?}");
    assert!(client.attr_str("varnish.backend").is_some_and(|b| b.contains("default")), "{client:#?}");
    assert!(client.attr_int("varnish.vxid").is_some_and(|x| x > 0), "{client:#?}");
    assert_ne!(client.attr_int("varnish.vxid"), server.attr_int("varnish.vxid"));

    assert_times(server);
    assert_times(client);
    assert_within(client, server);

    let reqs = be.requests();
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    assert_eq!(reqs[0].path, "/");
    assert_eq!(reqs[0].traceparent.as_deref(), Some(tp(TRACE, &client.span_id, "01").as_str()), "{reqs:#?}");
    assert_eq!(reqs[0].tracestate.as_deref(), Some("congo=t61rcWkgMzE"), "{reqs:#?}");
}

/// Case 2: A miss fetches (one CLIENT span), the following hit does not.
#[test]
fn hit_vs_miss() {
    let dir = TempDir::new("hit_vs_miss");
    let be = Backend::start(dir.path(), "backend");
    let mut v = Varnish::start(dir.path(), "varnish", be.port, "");

    let (t1, t2) = (random_trace_id(), random_trace_id());
    assert_ne!(t1, t2);
    let r1 = v.get("/cached", &[("traceparent", &tp(&t1, PARENT, "01"))]);
    assert_eq!(r1.status, 200);
    let r2 = v.get("/cached", &[("traceparent", &tp(&t2, PARENT, "01"))]);
    assert_eq!(r2.status, 200);
    assert_eq!(r1.body, r2.body);
    v.wait_spans(WAIT, "3 spans", |s| s.len() >= 3);
    let spans = v.stop();
    assert_eq!(spans.len(), 3, "{spans:#?}");

    let miss =
        the_one(in_trace(&spans, &t1).into_iter().filter(|s| s.kind == KIND_SERVER).collect(), "SERVER of 1st", &spans);
    assert_eq!(miss.parent_span_id, PARENT);
    assert_eq!(miss.attr_str("varnish.cache_result"), Some("miss"), "{miss:#?}");
    assert_eq!(miss.attr_int("http.response.status_code"), Some(200));
    let fetch = the_one(children(&spans, miss), "CLIENT child of the miss", &spans);
    assert_eq!(fetch.kind, KIND_CLIENT);
    assert_within(fetch, miss);

    let hit = the_one(in_trace(&spans, &t2), "span of the hit", &spans);
    assert_eq!(hit.kind, KIND_SERVER);
    assert_eq!(hit.parent_span_id, PARENT);
    assert_eq!(hit.attr_str("varnish.cache_result"), Some("hit"), "{hit:#?}");
    assert_eq!(hit.attr_int("http.response.status_code"), Some(200));
    assert!(children(&spans, hit).is_empty(), "a hit has no CLIENT span: {spans:#?}");
    assert_times(hit);

    let reqs = be.requests();
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    assert_eq!(backend_tp(&reqs[0]), TraceParent { trace_id: t1, span_id: fetch.span_id.clone(), flags: "01".into() });
}

/// Case 3: ESI: the fragment is an INTERNAL span under the page's SERVER span; each has its fetch.
#[test]
fn esi() {
    let dir = TempDir::new("esi");
    let be = Backend::start(dir.path(), "backend");
    let mut v = Varnish::start(
        dir.path(),
        "varnish",
        be.port,
        "sub vcl_backend_response { if (beresp.http.X-Enable-ESI) { set beresp.do_esi = true; } }",
    );

    let trace = random_trace_id();
    let resp = v.get("/esi", &[("traceparent", &tp(&trace, PARENT, "01"))]);
    assert_eq!(resp.status, 200);
    let body = resp.body_str();
    assert!(body.contains("top fragment end"), "ESI not processed: {body:?}");
    v.wait_spans(WAIT, "4 spans", |s| s.len() >= 4);
    let spans = v.stop();
    assert_eq!(spans.len(), 4, "{spans:#?}");
    assert!(spans.iter().all(|s| s.trace_id == trace), "all spans in one trace: {spans:#?}");

    let top = the_one(of_kind(&spans, KIND_SERVER), "SERVER span", &spans);
    assert_eq!(top.parent_span_id, PARENT);
    assert_eq!(top.attr_str("url.path"), Some("/esi"));
    assert_eq!(top.attr_int("http.response.status_code"), Some(200));

    let frag = the_one(of_kind(&spans, KIND_INTERNAL), "INTERNAL span", &spans);
    assert_eq!(frag.name, "ESI GET", "{frag:#?}");
    assert_eq!(frag.parent_span_id, top.span_id, "fragment must be a child of the page: {spans:#?}");
    assert_eq!(frag.attr_str("url.path"), Some("/esi-fragment"), "{frag:#?}");
    assert_eq!(frag.attr_int("varnish.esi_level"), Some(1), "{frag:#?}");
    assert_eq!(frag.attr_str("varnish.cache_result"), Some("miss"), "{frag:#?}");

    let top_fetch = the_one(
        children(&spans, top).into_iter().filter(|s| s.kind == KIND_CLIENT).collect(),
        "CLIENT child of the page",
        &spans,
    );
    assert_eq!(top_fetch.attr_str("url.path"), Some("/esi"));
    let frag_fetch = the_one(children(&spans, frag), "CLIENT child of the fragment", &spans);
    assert_eq!(frag_fetch.kind, KIND_CLIENT);
    assert_eq!(frag_fetch.attr_str("url.path"), Some("/esi-fragment"));
    assert_within(frag, top);
    for s in &spans {
        assert_times(s);
    }

    let reqs = be.requests();
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    for (path, fetch) in [("/esi", top_fetch), ("/esi-fragment", frag_fetch)] {
        let r = reqs.iter().find(|r| r.path == path).unwrap_or_else(|| panic!("no {path}: {reqs:#?}"));
        assert_eq!(r.traceparent.as_deref(), Some(tp(&trace, &fetch.span_id, "01").as_str()), "{path}");
    }
}

/// Case 4: A stale object served in grace triggers a background fetch: its CLIENT span belongs to the
/// request that triggered it.
#[test]
fn background_fetch_in_grace() {
    let dir = TempDir::new("background_fetch_in_grace");
    let be = Backend::start(dir.path(), "backend");
    let mut v = Varnish::start(
        dir.path(),
        "varnish",
        be.port,
        "sub vcl_backend_response { set beresp.ttl = 1s; set beresp.grace = 30s; }",
    );

    let (t1, t2) = (random_trace_id(), random_trace_id());
    let r1 = v.get("/cached", &[("traceparent", &tp(&t1, PARENT, "01"))]);
    assert_eq!(r1.status, 200);
    std::thread::sleep(Duration::from_millis(1500));
    let r2 = v.get("/cached", &[("traceparent", &tp(&t2, PARENT, "01"))]);
    assert_eq!(r2.status, 200);
    be.wait_requests(2, WAIT);
    v.wait_spans(WAIT, "4 spans", |s| s.len() >= 4);
    let spans = v.stop();
    assert_eq!(spans.len(), 4, "{spans:#?}");

    let s1 =
        the_one(in_trace(&spans, &t1).into_iter().filter(|s| s.kind == KIND_SERVER).collect(), "1st SERVER", &spans);
    assert_eq!(s1.attr_str("varnish.cache_result"), Some("miss"));
    let f1 = the_one(children(&spans, s1), "1st fetch", &spans);
    assert_eq!(f1.kind, KIND_CLIENT);

    let s2 =
        the_one(in_trace(&spans, &t2).into_iter().filter(|s| s.kind == KIND_SERVER).collect(), "2nd SERVER", &spans);
    assert_eq!(s2.parent_span_id, PARENT);
    assert_eq!(s2.attr_str("varnish.cache_result"), Some("grace"), "served from grace: {s2:#?}");
    assert!(s2.attr_str("varnish.object.age").is_none() && s2.attributes.contains_key("varnish.object.age"));
    assert_eq!(s2.attr_int("http.response.status_code"), Some(200));
    let bg = the_one(children(&spans, s2), "background fetch", &spans);
    assert_eq!(bg.kind, KIND_CLIENT, "{bg:#?}");
    assert_eq!(bg.trace_id, t2);
    assert_eq!(bg.attr_str("url.path"), Some("/cached"));
    assert_eq!(bg.attr_int("http.response.status_code"), Some(200));
    assert!(bg.start >= s2.start, "bgfetch starts after its request: {spans:#?}");
    assert_times(bg);

    let reqs = be.requests();
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    assert_eq!(backend_tp(&reqs[0]), TraceParent { trace_id: t1, span_id: f1.span_id.clone(), flags: "01".into() });
    assert_eq!(backend_tp(&reqs[1]), TraceParent { trace_id: t2, span_id: bg.span_id.clone(), flags: "01".into() });
}

/// Case 5: A restart continues the same SERVER span; both fetches are its children.
#[test]
fn restart_stays_on_one_span() {
    let dir = TempDir::new("restart_stays_on_one_span");
    let be = Backend::start(dir.path(), "backend");
    let mut v = Varnish::start(dir.path(), "varnish", be.port, RESTART_ON_404);

    let trace = random_trace_id();
    let resp = v.get("/missing", &[("traceparent", &tp(&trace, PARENT, "01"))]);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(resp.body_str().contains("hello from /"));
    v.wait_spans(WAIT, "3 spans", |s| s.len() >= 3);
    let spans = v.stop();
    assert_eq!(spans.len(), 3, "{spans:#?}");
    assert!(spans.iter().all(|s| s.trace_id == trace), "{spans:#?}");

    let server = the_one(of_kind(&spans, KIND_SERVER), "SERVER span", &spans);
    assert_eq!(server.parent_span_id, PARENT);
    assert!(server.events.iter().any(|e| e == "varnish.restart"), "no varnish.restart event: {server:#?}");
    assert_eq!(server.attr_int("http.response.status_code"), Some(200), "final status: {server:#?}");
    // The span describes the client's request, not the URL the VCL rewrote it to.
    assert_eq!(server.attr_str("url.path"), Some("/missing"), "{server:#?}");
    assert_eq!(server.attr_int("varnish.restarts"), Some(1), "{server:#?}");

    let fetches = of_kind(&spans, KIND_CLIENT);
    assert_eq!(fetches.len(), 2, "{spans:#?}");
    for f in &fetches {
        assert_eq!(f.parent_span_id, server.span_id, "{spans:#?}");
        assert_within(f, server);
    }
    let f404 = fetches.iter().find(|f| f.attr_str("url.path") == Some("/missing")).expect("fetch of /missing");
    let f200 = fetches.iter().find(|f| f.attr_str("url.path") == Some("/")).expect("fetch of /");
    assert_eq!(f404.attr_int("http.response.status_code"), Some(404));
    assert_eq!(f200.attr_int("http.response.status_code"), Some(200));

    let reqs = be.requests();
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    assert_eq!(reqs[0].path, "/missing");
    assert_eq!(reqs[0].traceparent.as_deref(), Some(tp(&trace, &f404.span_id, "01").as_str()));
    assert_eq!(reqs[1].path, "/");
    assert_eq!(reqs[1].traceparent.as_deref(), Some(tp(&trace, &f200.span_id, "01").as_str()));
}

/// Case 6: Edge -> shield -> backend: one trace through both tiers.
#[test]
fn two_tiers() {
    let dir = TempDir::new("two_tiers");
    let be = Backend::start(dir.path(), "backend");
    let mut shield = Varnish::start(dir.path(), "shield", be.port, "");
    let mut edge = Varnish::start(dir.path(), "edge", shield.port, "");

    let trace = random_trace_id();
    let resp = edge.get("/pass/two-tiers", &[("traceparent", &tp(&trace, PARENT, "01")), ("tracestate", "k=v")]);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body_str(), "uncacheable\n");
    edge.wait_spans(WAIT, "edge spans", |s| s.len() >= 2);
    shield.wait_spans(WAIT, "shield spans", |s| s.len() >= 2);
    let edge_spans = edge.stop();
    let shield_spans = shield.stop();
    assert_eq!(edge_spans.len(), 2, "{edge_spans:#?}");
    assert_eq!(shield_spans.len(), 2, "{shield_spans:#?}");
    let all: Vec<Span> = edge_spans.iter().chain(&shield_spans).cloned().collect();
    assert!(all.iter().all(|s| s.trace_id == trace), "one trace: {all:#?}");

    let e_server = the_one(of_kind(&edge_spans, KIND_SERVER), "edge SERVER", &all);
    let e_client = the_one(of_kind(&edge_spans, KIND_CLIENT), "edge CLIENT", &all);
    let s_server = the_one(of_kind(&shield_spans, KIND_SERVER), "shield SERVER", &all);
    let s_client = the_one(of_kind(&shield_spans, KIND_CLIENT), "shield CLIENT", &all);
    assert_eq!(e_server.service, "edge");
    assert_eq!(s_server.service, "shield");
    assert_eq!(e_server.parent_span_id, PARENT);
    assert_eq!(e_client.parent_span_id, e_server.span_id, "{all:#?}");
    assert_eq!(s_server.parent_span_id, e_client.span_id, "shield continues the edge's fetch: {all:#?}");
    assert_eq!(s_client.parent_span_id, s_server.span_id, "{all:#?}");
    for s in [e_server, e_client, s_server, s_client] {
        assert_eq!(s.attr_int("http.response.status_code"), Some(200), "{s:#?}");
        assert_times(s);
    }
    assert_within(e_client, e_server);
    assert_within(s_client, s_server);
    // Same clock on one machine: the shield's request starts within the edge's fetch. (Its end
    // is not compared: the shield takes its end timestamp after writing the response, which can
    // be a few microseconds after the edge has read it and closed its fetch span.)
    assert!(e_client.start <= s_server.start && s_server.start <= e_client.end, "{all:#?}");

    let reqs = be.requests();
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    assert_eq!(reqs[0].traceparent.as_deref(), Some(tp(&trace, &s_client.span_id, "01").as_str()));
    assert_eq!(reqs[0].tracestate.as_deref(), Some("k=v"));
}

/// Case 7: An invalid (uppercase hex) traceparent starts a new trace; the request still succeeds.
#[test]
fn invalid_traceparent_restarts_trace() {
    let dir = TempDir::new("invalid_traceparent_restarts_trace");
    let be = Backend::start(dir.path(), "backend");
    let mut v = Varnish::start(dir.path(), "varnish", be.port, "");

    let upper = tp(&TRACE.to_uppercase(), &PARENT.to_uppercase(), "01");
    let resp = v.get("/", &[("traceparent", &upper)]);
    assert_eq!(resp.status, 200, "an invalid traceparent must not fail the request: {resp:?}");
    v.wait_spans(WAIT, "2 spans", |s| s.len() >= 2);
    let spans = v.stop();
    assert_eq!(spans.len(), 2, "{spans:#?}");

    let server = the_one(of_kind(&spans, KIND_SERVER), "SERVER span", &spans);
    assert!(server.is_root(), "new trace: SERVER span must be a root: {server:#?}");
    assert_ne!(server.trace_id, TRACE, "{server:#?}");
    assert!(!server.trace_id.eq_ignore_ascii_case(TRACE));
    let client = the_one(of_kind(&spans, KIND_CLIENT), "CLIENT span", &spans);
    assert_eq!(client.trace_id, server.trace_id);
    assert_eq!(client.parent_span_id, server.span_id);

    let reqs = be.requests();
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    let got = backend_tp(&reqs[0]);
    assert_eq!(
        got,
        TraceParent { trace_id: server.trace_id.clone(), span_id: client.span_id.clone(), flags: "01".into() }
    );
}

/// Case 8: An unsampled request (flags 00) exports nothing but still propagates its trace.
#[test]
fn unsampled_propagates_without_export() {
    let dir = TempDir::new("unsampled_propagates_without_export");
    let be = Backend::start(dir.path(), "backend");
    let mut v = Varnish::start(dir.path(), "varnish", be.port, "");

    let unsampled = random_trace_id();
    let resp = v.get("/pass/unsampled", &[("traceparent", &tp(&unsampled, PARENT, "00"))]);
    assert_eq!(resp.status, 200);
    // A sampled request afterwards proves the exporter works and flushed past the first one.
    let sampled = random_trace_id();
    let resp = v.get("/pass/sampled", &[("traceparent", &tp(&sampled, PARENT, "01"))]);
    assert_eq!(resp.status, 200);
    v.wait_spans(WAIT, "sampled spans", |s| s.iter().filter(|s| s.trace_id == sampled).count() >= 2);
    let spans = v.stop();

    assert!(in_trace(&spans, &unsampled).is_empty(), "unsampled trace was exported: {spans:#?}");
    assert_eq!(in_trace(&spans, &sampled).len(), 2, "{spans:#?}");
    assert_eq!(spans.len(), 2, "{spans:#?}");

    let reqs = be.requests();
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    assert_eq!(reqs[0].path, "/pass/unsampled");
    let got = backend_tp(&reqs[0]);
    assert_eq!(got.trace_id, unsampled, "{reqs:#?}");
    assert_eq!(got.flags, "00", "{reqs:#?}");
    assert_ne!(got.span_id, PARENT, "the backend must see Varnish's own span id: {reqs:#?}");
    let got2 = backend_tp(&reqs[1]);
    assert_eq!(got2.trace_id, sampled);
    assert_ne!(got2.span_id, got.span_id);
}

/// Case 9: Two traceparent header fields make the context invalid: a new trace is started.
#[test]
fn duplicate_traceparent_restarts() {
    let dir = TempDir::new("duplicate_traceparent_restarts");
    let be = Backend::start(dir.path(), "backend");
    let mut v = Varnish::start(dir.path(), "varnish", be.port, "");

    let other = random_trace_id();
    let (a, b) = (tp(TRACE, PARENT, "01"), tp(&other, PARENT, "01"));
    let resp = v.get("/", &[("traceparent", &a), ("traceparent", &b)]);
    assert_eq!(resp.status, 200, "{resp:?}");
    v.wait_spans(WAIT, "2 spans", |s| s.len() >= 2);
    let spans = v.stop();
    assert_eq!(spans.len(), 2, "{spans:#?}");

    let server = the_one(of_kind(&spans, KIND_SERVER), "SERVER span", &spans);
    assert!(server.is_root(), "duplicate traceparent must start a new trace: {server:#?}");
    assert_ne!(server.trace_id, TRACE, "{server:#?}");
    assert_ne!(server.trace_id, other, "{server:#?}");
    let client = the_one(of_kind(&spans, KIND_CLIENT), "CLIENT span", &spans);
    assert_eq!(client.parent_span_id, server.span_id);

    let reqs = be.requests();
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    // Exactly one traceparent field reaches the backend (the script joins repeats with ", ").
    let got = backend_tp(&reqs[0]);
    assert_eq!(
        got,
        TraceParent { trace_id: server.trace_id.clone(), span_id: client.span_id.clone(), flags: "01".into() }
    );
}

// ---- spans closed from the shared-memory log ---------------------------------------------------

/// Checks one span against what `varnishlog` logged for its VXID chain: start, end, status, body
/// sizes, events (to the nanosecond) and the backend connection. Returns what the log says.
fn assert_span_matches_log(s: &Span, log: &Vsl) -> vsl::Expected {
    let vxid = s.attr_int("varnish.vxid").unwrap_or_else(|| panic!("span without varnish.vxid: {s:#?}")) as u64;
    let e = log.expected(vxid);
    let ctx = format!(
        "span {s:#?}\nexpected from the log: {e:#?}\nlog: {:#?}",
        e.chain.iter().map(|v| log.records(*v)).collect::<Vec<_>>()
    );
    assert_eq!(e.backend, s.kind == KIND_CLIENT, "a CLIENT span belongs to a backend transaction: {ctx}");
    assert_eq!(s.start, e.start_ns, "start != Timestamp Start of VXID {}: {ctx}", e.chain[0]);
    assert_eq!(s.end, e.end_ns, "end != end Timestamp of VXID {vxid}: {ctx}");
    assert_eq!(s.attr_int("http.response.status_code"), e.status, "status: {ctx}");
    assert_eq!(s.attr_int("http.request.body.size"), e.req_body, "request body size: {ctx}");
    assert_eq!(s.attr_int("http.response.body.size"), e.resp_body, "response body size: {ctx}");
    assert_eq!(s.timed_events(), e.events, "events: {ctx}");
    if let Some((name, addr, port)) = &e.peer {
        assert_eq!(s.attr_str("varnish.backend"), Some(name.as_str()), "{ctx}");
        assert_eq!(s.attr_str("network.peer.address"), Some(addr.as_str()), "{ctx}");
        assert_eq!(s.attr_int("network.peer.port"), Some(*port), "{ctx}");
    } else {
        assert!(!e.backend, "a backend transaction without BackendOpen: {ctx}");
    }
    assert_ne!(s.attr_str("varnish.span.closed_by"), Some("backstop"), "closed by the backstop: {ctx}");
    e
}

fn server_of<'a>(spans: &'a [Span], trace: &str) -> &'a Span {
    the_one(in_trace(spans, trace).into_iter().filter(|s| s.kind == KIND_SERVER).collect(), "SERVER span", spans)
}

/// Case 10: every span, closed from the log, says what varnishlog says: miss, hit, 304, 206, ESI,
/// restart, backend retry and pass.
#[test]
fn spans_match_varnishlog() {
    spans_match_varnishlog_with("spans_match_varnishlog", vec![]);
}

/// Case 10b: the same with no table of followed spans: the tailer hears of every span by message
/// (`Track`, `Forget`), the way spans whose slot in the table is taken go (`vsl::followed`).
#[test]
fn spans_match_varnishlog_when_the_tailer_hears_of_every_span_by_message() {
    let env = vec![("OPENTRACING_VSL_FOLLOWED_SLOTS".to_owned(), "0".to_owned())];
    spans_match_varnishlog_with("spans_match_varnishlog_when_the_tailer_hears_of_every_span_by_message", env);
}

/// Case 10c: the same with the table cut to one slot: spans in flight together (a request and
/// its fetch) share it, and one of them goes by message.
#[test]
fn spans_match_varnishlog_with_followed_spans_sharing_a_slot() {
    let env = vec![("OPENTRACING_VSL_FOLLOWED_SLOTS".to_owned(), "1".to_owned())];
    spans_match_varnishlog_with("spans_match_varnishlog_with_followed_spans_sharing_a_slot", env);
}

/// Case 10d: the same with a tailer that stops reading the log whenever nothing needs it
/// (`OPENTRACING_VSL_DORMANT_AFTER_MS=0`): the restart, the retry and the ESI parent (whose log
/// goes out early) each call it back (`tailer::log_needed`), and it reads those records again
/// from a few segments back.
#[test]
fn spans_match_varnishlog_with_a_tailer_dormant_between_needs() {
    let env = vec![("OPENTRACING_VSL_DORMANT_AFTER_MS".to_owned(), "0".to_owned())];
    spans_match_varnishlog_with("spans_match_varnishlog_with_a_tailer_dormant_between_needs", env);
}

fn spans_match_varnishlog_with(name: &str, env: Vec<(String, String)>) {
    let dir = TempDir::new(name);
    let be = Backend::start(dir.path(), "backend");
    let opts = VarnishOpts { params: vec![], env };
    let mut v = Varnish::start_with(
        dir.path(),
        "varnish",
        be.port,
        r#"
sub vcl_recv { if (req.url ~ "^/pass/") { return (pass); } }
sub vcl_backend_response {
    if (beresp.status == 404 && bereq.retries == 0 && bereq.http.X-Retry) {
        set bereq.url = "/";
        return (retry);
    }
    if (beresp.http.X-Enable-ESI) { set beresp.do_esi = true; }
    if (bereq.url == "/cached") { set beresp.http.ETag = {""v1""}; }
}
sub vcl_deliver {
    if (resp.status == 404 && req.restarts == 0) { set req.url = "/"; return (restart); }
}
"#,
        &opts,
    );

    let names = ["miss", "hit", "304", "206", "esi", "restart", "retry", "retry_hit", "pass"];
    let traces: std::collections::BTreeMap<&str, String> = names.iter().map(|n| (*n, random_trace_id())).collect();
    let tph = |n: &str| tp(&traces[n], PARENT, "01");

    let r = v.get("/cached", &[("traceparent", &tph("miss"))]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("etag"), Some("\"v1\""), "{r:?}");
    let full = r.body.clone();
    let r = v.get("/cached", &[("traceparent", &tph("hit"))]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, full);
    let r = v.get("/cached", &[("traceparent", &tph("304")), ("If-None-Match", "\"v1\"")]);
    assert_eq!(r.status, 304, "{r:?}");
    let r = v.get("/cached", &[("traceparent", &tph("206")), ("Range", "bytes=0-3")]);
    assert_eq!(r.status, 206, "{r:?}");
    assert_eq!(r.body, full[..4].to_vec(), "{r:?}");
    let r = v.get("/esi", &[("traceparent", &tph("esi"))]);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body_str().contains("top fragment end"), "{r:?}");
    let r = v.get("/missing", &[("traceparent", &tph("restart"))]);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body_str().contains("hello from /"), "{r:?}");
    let r = v.get("/status/404", &[("traceparent", &tph("retry")), ("X-Retry", "1")]);
    assert_eq!(r.status, 200, "the retry fetched / instead: {r:?}");
    assert!(r.body_str().contains("hello from /"), "{r:?}");
    // A hit on the object the retry stored.
    let r = v.get("/status/404", &[("traceparent", &tph("retry_hit"))]);
    assert_eq!(r.status, 200, "{r:?}");
    let r = v.get("/pass/x", &[("traceparent", &tph("pass"))]);
    assert_eq!(r.status, 200, "{r:?}");

    // miss 2, hit 1, 304 1, 206 1, esi 4, restart 3, retry 2, retry_hit 1, pass 2
    const TOTAL: usize = 17;
    v.wait_spans(WAIT, "17 spans", |s| s.len() >= TOTAL);
    let counters = v.wait_counters(WAIT, "vsl_spans_closed_from_log and spans_exported at 16", |c| {
        c.get("spans_exported") == Some(&(TOTAL as u64)) && c.get("vsl_spans_closed_from_log") >= Some(&(TOTAL as u64))
    });
    let (spans, text) = v.stop_with_vsl();
    let log = Vsl::parse(&text);
    assert_eq!(spans.len(), TOTAL, "{spans:#?}");
    assert_eq!(counters["vsl_spans_closed_from_log"], TOTAL as u64, "{counters:#?}");
    assert_eq!(counters["vsl_spans_closed_by_backstop"], 0, "{counters:#?}");
    assert_eq!(counters["spans_dropped"], 0, "{counters:#?}");

    // Every span against the log.
    let mut checked = std::collections::BTreeSet::new();
    for s in &spans {
        let e = assert_span_matches_log(s, &log);
        assert!(checked.insert(e.chain[0]), "two spans for one VXID chain {:?}: {spans:#?}", e.chain);
    }
    // And every traced transaction of the log has its span: 9 requests, 1 ESI sub-request, 7 fetches.
    let reqs = log.transactions(|b| b.starts_with("req ") && !b.ends_with(" restart"));
    let bereqs = log.transactions(|b| b.starts_with("bereq ") && !b.ends_with(" retry"));
    assert_eq!((reqs.len(), bereqs.len()), (10, 7), "{reqs:?} {bereqs:?}");
    for v in reqs.iter().chain(&bereqs) {
        assert!(checked.contains(v), "transaction {v} has no span: {:#?}", log.records(*v));
    }

    // The miss and its fetch.
    let miss = server_of(&spans, &traces["miss"]);
    assert_eq!(miss.attr_str("varnish.cache_result"), Some("miss"));
    let miss_fetch = the_one(children(&spans, miss), "fetch of the miss", &spans);
    assert_eq!(miss_fetch.kind, KIND_CLIENT);
    let miss_fetch_vxid = miss_fetch.attr_int("varnish.vxid").unwrap() as u64;

    // The hits (200, 304, 206) link to the fetch that made the object.
    for (n, status) in [("hit", 200), ("304", 304), ("206", 206)] {
        let s = server_of(&spans, &traces[n]);
        assert_eq!(in_trace(&spans, &traces[n]).len(), 1, "{n}: a hit has no fetch: {spans:#?}");
        assert_eq!(s.attr_str("varnish.cache_result"), Some("hit"), "{n}: {s:#?}");
        assert_eq!(s.attr_int("http.response.status_code"), Some(status), "{n}: {s:#?}");
        let e = log.expected(s.attr_int("varnish.vxid").unwrap() as u64);
        assert_eq!(e.hit_obj, Some(miss_fetch_vxid), "{n}: the Hit record names the miss's fetch: {e:#?}");
        assert_eq!(s.links(), vec![(miss_fetch.trace_id.clone(), miss_fetch.span_id.clone())], "{n}: {s:#?}");
    }
    let s206 = server_of(&spans, &traces["206"]);
    assert_eq!(s206.attr_int("http.response.body.size"), Some(4), "{s206:#?}");
    let s304 = server_of(&spans, &traces["304"]);
    assert_eq!(s304.attr_int("http.response.body.size"), Some(0), "{s304:#?}");
    assert!(miss.links().is_empty(), "{miss:#?}");

    // ESI: the page, its fragment and their fetches, all closed from the log.
    let esi = in_trace(&spans, &traces["esi"]);
    assert_eq!(esi.len(), 4, "{spans:#?}");
    let frag = the_one(of_kind(&spans, KIND_INTERNAL), "ESI fragment", &spans);
    assert_eq!(frag.trace_id, traces["esi"]);
    assert_eq!(frag.attr_int("http.response.body.size"), Some("fragment".len() as i64), "{frag:#?}");

    // The restart: one SERVER span over two VXIDs, with its event.
    let restart = server_of(&spans, &traces["restart"]);
    let e = log.expected(restart.attr_int("varnish.vxid").unwrap() as u64);
    assert_eq!(e.chain.len(), 2, "restart spans two VXIDs: {e:#?}");
    assert!(restart.events.iter().any(|n| n == "varnish.restart"), "{restart:#?}");
    assert!(restart.events.iter().any(|n| n == "Restart"), "{restart:#?}");
    assert_eq!(restart.attr_int("http.response.status_code"), Some(200), "{restart:#?}");
    assert_eq!(in_trace(&spans, &traces["restart"]).len(), 3, "{spans:#?}");

    // The retry: one CLIENT span over two VXIDs, with its event, ending 200.
    let retry_server = server_of(&spans, &traces["retry"]);
    let retry = the_one(children(&spans, retry_server), "retried fetch", &spans);
    assert_eq!(retry.kind, KIND_CLIENT);
    let e = log.expected(retry.attr_int("varnish.vxid").unwrap() as u64);
    assert_eq!(e.chain.len(), 2, "retry spans two VXIDs: {e:#?}");
    assert!(retry.events.iter().any(|n| n == "varnish.retry"), "{retry:#?}");
    assert!(retry.events.iter().any(|n| n == "Retry"), "{retry:#?}");
    assert_eq!(retry.attr_int("http.response.status_code"), Some(200), "{retry:#?}");
    // A hit on the retry's object links to the retried fetch: the object names the retry's VXID.
    let retry_hit = server_of(&spans, &traces["retry_hit"]);
    assert_eq!(retry_hit.attr_str("varnish.cache_result"), Some("hit"), "{retry_hit:#?}");
    let hit_log = log.expected(retry_hit.attr_int("varnish.vxid").unwrap() as u64);
    assert_eq!(hit_log.hit_obj, Some(e.chain[1]), "the Hit record names the retry: {hit_log:#?}");
    assert_eq!(retry_hit.links(), vec![(retry.trace_id.clone(), retry.span_id.clone())], "{retry_hit:#?}");

    // The pass.
    let pass = server_of(&spans, &traces["pass"]);
    assert_eq!(pass.attr_str("varnish.cache_result"), Some("pass"), "{pass:#?}");
    assert_eq!(children(&spans, pass).len(), 1, "{spans:#?}");
}

/// Case 11: the log wraps while the tailer sleeps (1 MB log, a 300 ms pause after each read):
/// the overwritten spans close from their task data after the wait, the others from the log, and
/// every request has exactly one span.
///
/// A burst of 4000 requests (a few tens of ms) laps the log during one pause of the tailer; a
/// second, small batch sent after the tailer has recovered (it goes on from a few segments before
/// the writer, where the last of the burst are) fits in the log and must close from it.
#[test]
fn overrun_loses_no_span() {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 1000;
    const MAX_ROUNDS: usize = 5;
    const AFTER: usize = 200;
    let dir = TempDir::new("overrun_loses_no_span");
    let be = Backend::start(dir.path(), "backend");
    let opts = VarnishOpts {
        // 1M is the smallest vsl_space varnishd accepts (`varnishd -x parameter`).
        params: vec!["vsl_space=1M".into()],
        env: vec![("OPENTRACING_VSL_READ_DELAY_MS".into(), "300".into())],
    };
    // Every request restarted once, so that no span's log is whole in its task's buffer and the
    // tailer closes them all from the shared log (`vsl::task_log`).
    let vcl = "sub vcl_recv { return (synth(200)); }\nsub vcl_synth { if (req.restarts == 0) { return (restart); } }";
    let mut v = Varnish::start_with(dir.path(), "varnish", be.port, vcl, &opts);
    v.wait_counters(WAIT, "tailer attached", |c| c.get("vsl_attached") == Some(&1));
    assert_eq!(v.counter("vsl_overruns"), 0);

    let started = std::time::Instant::now();
    let addr = v.addr();
    let prefix = random_trace_id()[..16].to_owned();
    let trace_of = |n: usize| format!("{prefix}{:016x}", n as u64 + 1);
    // Bursts of THREADS x PER_THREAD keep-alive requests until the log has lapped the tailer (one
    // burst does it here, in under 100 ms; a slower machine may need more).
    let mut burst: Vec<String> = Vec::new();
    let mut rounds = 0;
    let c = loop {
        let base = burst.len();
        let sent: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let trace_of = &trace_of;
                    scope.spawn(move || {
                        let mut conn = KeepAlive::connect(addr);
                        let mut sent = Vec::with_capacity(PER_THREAD);
                        for i in 0..PER_THREAD {
                            let trace = trace_of(base + t * PER_THREAD + i);
                            let r = conn.get(&format!("/burst/{t}/{i}"), &[("traceparent", &tp(&trace, PARENT, "01"))]);
                            assert_eq!(r.status, 200, "{r:?}");
                            sent.push(trace);
                        }
                        sent
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        burst.extend(sent);
        rounds += 1;
        // The tailer wakes up, finds the log lapped, and goes on from a few segments before the
        // writer (what is still intact there).
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let c = loop {
            let c = v.counters();
            if c.get("vsl_overruns").copied().unwrap_or(0) > 0 || std::time::Instant::now() > deadline {
                break c;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if c["vsl_overruns"] > 0 || rounds == MAX_ROUNDS {
            break c;
        }
    };
    let burst_took = started.elapsed();
    assert!(c["vsl_overruns"] > 0, "{} requests in {rounds} bursts never lapped the 1 MB log: {c:#?}", burst.len());
    let burst_len = burst.len();
    let n = burst_len + AFTER;
    std::thread::sleep(Duration::from_millis(700));
    let mut conn = KeepAlive::connect(addr);
    let after: Vec<String> = (burst_len..n)
        .map(|n| {
            let trace = trace_of(n);
            let r = conn.get(&format!("/after/{n}"), &[("traceparent", &tp(&trace, PARENT, "01"))]);
            assert_eq!(r.status, 200, "{r:?}");
            trace
        })
        .collect();
    drop(conn);

    let counters = v.wait_counters(Duration::from_secs(20), "spans_exported == n", |c| {
        c.get("spans_exported").copied().unwrap_or(0) >= n as u64
    });
    eprintln!(
        "overrun_loses_no_span: {burst_len} requests in {rounds} burst(s), {burst_took:?}, overruns after them: {}, \
         all {n} exported after {:?}: {counters:#?}",
        c["vsl_overruns"],
        started.elapsed()
    );
    let spans = v.stop();

    assert!(counters["vsl_overruns"] > 0, "the log never wrapped past the tailer: {counters:#?}");
    // Copies the writer overtook are counted apart from laps (published, whatever their number).
    assert!(counters.contains_key("vsl_batches_overwritten"), "{counters:#?}");
    assert_eq!(counters["spans_exported"], n as u64, "{counters:#?}");
    assert_eq!(counters["spans_dropped"], 0, "{counters:#?}");

    // One SERVER span per request, no more (read_spans already refuses duplicate span ids).
    assert_eq!(spans.len(), n, "spans exported: {}", spans.len());
    let mut by_trace: std::collections::HashMap<&str, Vec<&Span>> = std::collections::HashMap::new();
    for s in &spans {
        assert_eq!(s.kind, KIND_SERVER, "{s:#?}");
        assert_eq!(s.parent_span_id, PARENT, "{s:#?}");
        assert_eq!(s.attr_int("http.response.status_code"), Some(200), "{s:#?}");
        by_trace.entry(s.trace_id.as_str()).or_default().push(s);
    }
    for t in burst.iter().chain(&after) {
        assert_eq!(by_trace.get(t.as_str()).map(Vec::len), Some(1), "trace {t}: one span expected");
    }
    assert_eq!(by_trace.len(), n);

    // Both ways of closing happened, and the counters agree with the spans.
    let closed_by = |s: &Span| s.attr_str("varnish.span.closed_by").map(str::to_owned);
    let backstop = spans.iter().filter(|s| closed_by(s).as_deref() == Some("backstop")).count();
    let from_log = spans.iter().filter(|s| closed_by(s).is_none()).count();
    assert_eq!(backstop + from_log, n, "unexpected varnish.span.closed_by values");
    assert!(backstop > 0, "no span was closed by the backstop despite {} overruns", counters["vsl_overruns"]);
    assert!(from_log >= AFTER, "{from_log} spans closed from the log, expected at least {AFTER}");
    // After the overrun the tailer read on from a few segments before the writer
    // (`REWIND_SEGMENTS`), not from its tail: the last of the burst were still there.
    assert!(from_log > AFTER, "none of the burst's {burst_len} spans closed from the log after the overrun");
    assert_eq!(counters["vsl_spans_closed_by_backstop"], backstop as u64, "{counters:#?}");
    assert_eq!(counters["vsl_spans_closed_from_log"], from_log as u64, "{counters:#?}");
    assert_eq!(counters["vsl_spans_closed_from_task_log"], 0, "restarted, every span is the tailer's: {counters:#?}");
    // The requests sent after the recovery fit in the log: all of them close from it.
    for t in &after {
        let s = by_trace[t.as_str()][0];
        assert_eq!(closed_by(s), None, "sent after the overrun, must close from the log: {s:#?}");
    }
    // Spans closed from the log carry its timing events; backstop ones do not.
    for s in &spans {
        let has_resp = s.events.iter().any(|e| e == "Resp");
        assert_eq!(has_resp, closed_by(s).is_none(), "{s:#?}");
    }
}

/// Cases 12 and 12b: four requests (a miss, a hit, a pass, a 404: seven spans) with
/// `OPENTRACING_VSL=<vsl>`, each span checked against what varnishlog printed for its transaction:
/// Varnish's own start and end times, status, body sizes, and no `closed_by`. Returns the spans
/// and the counters.
fn every_span_as_varnishlog_says(name: &str, vsl: &str) -> (Vec<Span>, std::collections::BTreeMap<String, u64>) {
    let dir = TempDir::new(name);
    let be = Backend::start(dir.path(), "backend");
    let opts = VarnishOpts { params: vec![], env: vec![("OPENTRACING_VSL".into(), vsl.into())] };
    let mut v = Varnish::start_with(dir.path(), "varnish", be.port, "", &opts);

    let traces: Vec<String> = (0..4).map(|_| random_trace_id()).collect();
    for (t, path) in traces.iter().zip(["/cached", "/cached", "/pass/a", "/missing"]) {
        let r = v.get(path, &[("traceparent", &tp(t, PARENT, "01"))]);
        assert_eq!(r.status, if path == "/missing" { 404 } else { 200 }, "{r:?}");
    }
    // miss 2, hit 1, pass 2, 404 2
    const TOTAL: usize = 7;
    v.wait_spans(WAIT, "7 spans", |s| s.len() >= TOTAL);
    let counters = v.wait_counters(WAIT, "spans_exported == 7", |c| c.get("spans_exported") == Some(&(TOTAL as u64)));
    let (spans, text) = v.stop_with_vsl();
    let log = Vsl::parse(&text);
    assert_eq!(spans.len(), TOTAL, "{spans:#?}");
    // No tailer: no span was closed from the shared log (those from their task's own log buffer
    // count in both counters).
    assert_eq!(counters["vsl_spans_closed_from_log"], counters["vsl_spans_closed_from_task_log"], "{counters:#?}");
    assert_eq!(counters["vsl_attached"], 0, "{counters:#?}");

    for s in &spans {
        let vxid = s.attr_int("varnish.vxid").unwrap_or_else(|| panic!("no varnish.vxid: {s:#?}")) as u64;
        let e = log.expected(vxid);
        let ctx = format!("span {s:#?}\nlog: {:#?}", log.records(vxid));
        assert_eq!(s.start, e.start_ns, "start != varnishlog Timestamp Start: {ctx}");
        assert_eq!(s.end, e.end_ns, "end != varnishlog end Timestamp: {ctx}");
        assert_eq!(s.attr_int("http.response.status_code"), e.status, "status: {ctx}");
        assert_eq!(s.attr_int("http.request.body.size"), e.req_body, "request body size: {ctx}");
        assert_eq!(s.attr_int("http.response.body.size"), e.resp_body, "response body size: {ctx}");
        assert_eq!(s.attr_str("varnish.span.closed_by"), None, "{ctx}");
    }
    for t in &traces {
        assert!(!in_trace(&spans, t).is_empty(), "trace {t} has no span: {spans:#?}");
    }
    (spans, counters)
}

/// Case 12: without the tailer (`OPENTRACING_VSL=off`) every span still closes, with Varnish's own
/// start and end times (the same ones varnishlog prints), and no log events.
#[test]
fn no_tailer_still_closes_every_span() {
    let (spans, counters) = every_span_as_varnishlog_says("no_tailer_still_closes_every_span", "off");
    assert_eq!(counters["vsl_spans_closed_from_task_log"], 0, "{counters:#?}");
    for s in &spans {
        assert!(s.events.iter().all(|n| n != "Resp" && n != "BerespBody"), "no log events without the tailer: {s:#?}");
    }
}

/// Case 12b: `OPENTRACING_VSL=task`: no tailer; every span closes on the worker with the records
/// of its task's own log buffer: the same times as varnishlog's, and the timing events the
/// tailer would give.
#[test]
fn task_log_closes_every_span_with_its_own_records() {
    let (spans, counters) = every_span_as_varnishlog_says("task_log_closes_every_span_with_its_own_records", "task");
    assert_eq!(counters["vsl_spans_closed_from_task_log"], spans.len() as u64, "{counters:#?}");
    assert_eq!(counters["vsl_task_log_partial"], 0, "every buffer held its whole transaction: {counters:#?}");
    for s in &spans {
        let last_event = if s.kind == KIND_SERVER { "Resp" } else { "BerespBody" };
        assert!(s.events.iter().any(|n| n == last_event), "no {last_event} event from the task's log: {s:#?}");
    }
}

/// The path of one of Varnish's own VMODs (`vtc`, say), next to the `varnishd` on `PATH`
/// (`<prefix>/sbin/varnishd`, `<prefix>/lib/varnish/vmods/`).
fn stock_vmod(name: &str) -> String {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let varnishd =
        std::env::split_paths(&path).map(|d| d.join("varnishd")).find(|p| p.exists()).expect("varnishd on PATH");
    let prefix = varnishd.parent().and_then(|d| d.parent()).expect("<prefix>/sbin/varnishd");
    let vmod = prefix.join(format!("lib/varnish/vmods/libvmod_{name}.so"));
    assert!(vmod.exists(), "{} is missing", vmod.display());
    vmod.display().to_string()
}

/// VCL that restarts a request answered 404 once, as a request for `/` (a restarted span's log
/// is not whole in its task's buffer: `vsl::task_log`).
const RESTART_ON_404: &str =
    "sub vcl_deliver { if (resp.status == 404 && req.restarts == 0) { set req.url = \"/\"; return (restart); } }";

/// Case 12c: `OPENTRACING_VSL=task` and a restart: the first transaction's records left the
/// buffer when the VXID changed, so the span closes with the last one's (its final status and
/// timing events) and is counted as partial.
#[test]
fn task_log_after_a_restart_closes_with_the_last_transaction() {
    let dir = TempDir::new("task_log_after_a_restart_closes_with_the_last_transaction");
    let be = Backend::start(dir.path(), "backend");
    let opts = VarnishOpts { params: vec![], env: vec![("OPENTRACING_VSL".into(), "task".into())] };
    let mut v = Varnish::start_with(dir.path(), "varnish", be.port, RESTART_ON_404, &opts);

    let trace = random_trace_id();
    let resp = v.get("/missing", &[("traceparent", &tp(&trace, PARENT, "01"))]);
    assert_eq!(resp.status, 200, "{resp:?}");
    v.wait_spans(WAIT, "3 spans", |s| s.len() >= 3);
    let counters = v.wait_counters(WAIT, "3 spans closed", |c| c.get("vsl_spans_closed_from_task_log") == Some(&3));
    let spans = v.stop();
    assert_eq!(spans.len(), 3, "{spans:#?}");
    assert_eq!(counters["vsl_task_log_partial"], 1, "the restarted request's span only: {counters:#?}");
    let server = the_one(of_kind(&spans, KIND_SERVER), "SERVER span", &spans);
    assert_eq!(server.attr_int("http.response.status_code"), Some(200), "final status: {server:#?}");
    assert!(server.events.iter().any(|e| e == "varnish.restart"), "{server:#?}");
    assert!(server.events.iter().any(|e| e == "Resp"), "the last transaction's timing events: {server:#?}");
    assert_eq!(server.attr_str("varnish.span.closed_by"), None, "{server:#?}");
    assert_eq!(server.attr_str("varnish.span.log"), Some("partial"), "{server:#?}");
    for fetch in of_kind(&spans, KIND_CLIENT) {
        assert_eq!(fetch.attr_str("varnish.span.log"), None, "whole in its buffer: {fetch:#?}");
    }
}

/// Case 12d: the default mode and a restart: the fetches' buffers hold their whole log, so their
/// spans close on the worker; the restarted request's does not (its first transaction's records
/// left the buffer when the VXID changed), so the tailer closes it from the shared log, with both
/// transactions' timing events.
#[test]
fn by_default_whole_spans_close_on_the_worker_and_a_restarted_one_from_the_shared_log() {
    let dir = TempDir::new("by_default_whole_spans_close_on_the_worker_and_a_restarted_one_from_the_shared_log");
    let be = Backend::start(dir.path(), "backend");
    // The restarted transaction takes a while, so that the tailer meets the first one's records
    // (written out at the restart) before the task's end: it takes the span over from the
    // workers' table of followed spans (`vsl::followed`) then, not at the task's `finished`.
    let vtc = stock_vmod("vtc");
    let vcl = format!(
        "import vtc from \"{vtc}\";\nsub vcl_recv {{ if (req.restarts > 0) {{ vtc.sleep(300ms); }} }}\n{RESTART_ON_404}"
    );
    let mut v = Varnish::start(dir.path(), "varnish", be.port, &vcl);

    let trace = random_trace_id();
    let resp = v.get("/missing", &[("traceparent", &tp(&trace, PARENT, "01"))]);
    assert_eq!(resp.status, 200, "{resp:?}");
    v.wait_spans(WAIT, "3 spans", |s| s.len() >= 3);
    let counters =
        v.wait_counters(WAIT, "3 spans closed from the log", |c| c.get("vsl_spans_closed_from_log") == Some(&3));
    let spans = v.stop();
    assert_eq!(spans.len(), 3, "{spans:#?}");
    assert_eq!(counters["vsl_spans_closed_from_task_log"], 2, "the two fetches: {counters:#?}");
    assert_eq!(counters["vsl_task_log_partial"], 0, "{counters:#?}");
    assert_eq!(counters["vsl_spans_closed_by_backstop"], 0, "{counters:#?}");
    let server = the_one(of_kind(&spans, KIND_SERVER), "SERVER span", &spans);
    assert_eq!(server.attr_int("http.response.status_code"), Some(200), "final status: {server:#?}");
    assert!(server.events.iter().any(|e| e == "varnish.restart"), "{server:#?}");
    let fetches = server.events.iter().filter(|e| *e == "Fetch").count();
    assert_eq!(fetches, 2, "a Fetch timestamp from each transaction, the first one's from the shared log: {server:#?}");
    for fetch in of_kind(&spans, KIND_CLIENT) {
        assert!(fetch.events.iter().any(|e| e == "BerespBody"), "the fetch's own log: {fetch:#?}");
        assert_eq!(fetch.attr_str("varnish.span.closed_by"), None, "{fetch:#?}");
    }
}

/// Case 12f: a tailer that nothing needed for a while stops reading the log (`vsl_reading` 0,
/// `vsl_records` still), and a restart calls it back: the span has the first transaction's
/// records, read again from the shared log (`DORMANT_AFTER`, here 100 ms).
#[test]
fn a_dormant_tailer_is_called_back_by_a_restart() {
    let dir = TempDir::new("a_dormant_tailer_is_called_back_by_a_restart");
    let be = Backend::start(dir.path(), "backend");
    let env = vec![("OPENTRACING_VSL_DORMANT_AFTER_MS".to_owned(), "100".to_owned())];
    let opts = VarnishOpts { params: vec![], env };
    let mut v = Varnish::start_with(dir.path(), "varnish", be.port, RESTART_ON_404, &opts);

    for i in 0..3 {
        let r = v.get(&format!("/?whole={i}"), &[]);
        assert_eq!(r.status, 200, "{r:?}");
    }
    let before = v.wait_counters(WAIT, "the tailer dormant", |c| c.get("vsl_reading") == Some(&0));
    assert_eq!(before["vsl_attached"], 1, "{before:#?}");
    assert_eq!(before["vsl_tailer_wakeups"], 0, "{before:#?}");
    // Whole spans do not call it back, and it does not step through their transactions.
    for i in 0..3 {
        let r = v.get(&format!("/?whole={i}"), &[]);
        assert_eq!(r.status, 200, "{r:?}");
    }
    let quiet = v.wait_counters(WAIT, "the six whole spans closed", |c| c["vsl_spans_closed_from_task_log"] >= 9);
    assert_eq!(quiet["vsl_reading"], 0, "{quiet:#?}");
    assert_eq!(quiet["vsl_records"], before["vsl_records"], "no steps while dormant: {quiet:#?}");

    let trace = random_trace_id();
    let resp = v.get("/missing", &[("traceparent", &tp(&trace, PARENT, "01"))]);
    assert_eq!(resp.status, 200, "{resp:?}");
    let counters = v.wait_counters(WAIT, "the restarted span closed by the tailer", |c| {
        c["vsl_spans_closed_from_log"] - c["vsl_spans_closed_from_task_log"] >= 1
    });
    assert_eq!(counters["vsl_tailer_wakeups"], 1, "{counters:#?}");
    assert_eq!(counters["vsl_spans_closed_by_backstop"], 0, "{counters:#?}");
    let spans = v.stop();
    let server = server_of(&spans, &trace);
    assert!(server.events.iter().any(|e| e == "varnish.restart"), "{server:#?}");
    let fetches = server.events.iter().filter(|e| *e == "Fetch").count();
    assert_eq!(fetches, 2, "a Fetch timestamp from each transaction, the first one's read again: {server:#?}");
    assert_eq!(server.attr_str("varnish.span.closed_by"), None, "{server:#?}");
}

/// Case 12e: an unsampled fetch that carries a `tracestate` on (so it keeps a span record of its
/// own) is not followed by the tailer: only a sampled span is finished, and a followed span that
/// never finishes would hold its place for ten minutes (`Limits::max_age`), and the tailer's room
/// with it.
#[test]
fn an_unsampled_fetch_is_not_followed_in_the_log() {
    let dir = TempDir::new("an_unsampled_fetch_is_not_followed_in_the_log");
    let be = Backend::start(dir.path(), "backend");
    let mut v = Varnish::start(dir.path(), "varnish", be.port, RESTART_ON_404);

    for i in 0..3 {
        let t = random_trace_id();
        let r = v.get(&format!("/pass/{i}"), &[("traceparent", &tp(&t, PARENT, "00")), ("tracestate", "k=v")]);
        assert_eq!(r.status, 200, "{r:?}");
    }
    // Then a sampled request the tailer must close (restarted: not whole in its buffer), so that
    // it has read the log past the unsampled ones.
    let sampled = random_trace_id();
    let r = v.get("/missing", &[("traceparent", &tp(&sampled, PARENT, "01"))]);
    assert_eq!(r.status, 200, "{r:?}");
    let counters = v.wait_counters(WAIT, "the restarted span closed by the tailer, nothing left followed", |c| {
        let tailer = c["vsl_spans_closed_from_log"] - c["vsl_spans_closed_from_task_log"];
        tailer >= 1 && c["vsl_pending"] == 0
    });
    assert_eq!(counters["vsl_spans_closed_from_log"] - counters["vsl_spans_closed_from_task_log"], 1, "{counters:#?}");
    // Followed, they would have left `vsl_pending` only by being dropped for want of a finish once
    // their log ended (counted before `vsl_pending` is updated).
    assert_eq!(counters["vsl_spans_abandoned"], 0, "{counters:#?}");
    assert_eq!(counters["vsl_spans_not_followed"], 0, "{counters:#?}");
    let spans = v.stop();
    assert!(spans.iter().all(|s| s.trace_id == sampled), "only the sampled trace is exported: {spans:#?}");
    let reqs = be.requests();
    assert!(reqs.iter().take(3).all(|r| backend_tp(r).flags == "00"), "{reqs:#?}");
    assert!(reqs.iter().take(3).all(|r| r.tracestate.as_deref() == Some("k=v")), "{reqs:#?}");
}
