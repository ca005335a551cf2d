//! End-to-end tests: real varnishd + the built VMOD + a Python origin, spans read back from the
//! OTLP/JSON file exporter and decoded with `opentelemetry-proto`.
//!
//! Run with Varnish on PATH:
//!     eval "$(bash scripts/varnish.sh --env)" && cargo build && cargo test --test e2e
//! `E2E_KEEP=1` keeps each test's directory (VCL, varnishd output, VSL, spans, backend log).

mod harness;

use std::time::Duration;

use harness::*;

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
    assert_eq!(s2.attr_str("varnish.cache_result"), Some("hit"), "served from grace: {s2:#?}");
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
    let mut v = Varnish::start(
        dir.path(),
        "varnish",
        be.port,
        "sub vcl_deliver { if (resp.status == 404 && req.restarts == 0) { set req.url = \"/\"; return (restart); } }",
    );

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
