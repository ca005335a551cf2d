//! Spans checked attribute by attribute against the stable HTTP semantic conventions, over a
//! matrix of requests: methods, statuses 2xx to 5xx, hits, misses, passes, a backend error.

use std::time::Duration;

use crate::harness::*;

const SCENARIO: &str = r#"
backend dead { .host = "127.0.0.1"; .port = "9"; .connect_timeout = 0.5s; }
sub vcl_recv {
    if (req.url ~ "^/dead") { set req.backend_hint = dead; return (pass); }
    if (req.url ~ "^/status/") { return (pass); }
    if (req.url ~ "^/users/") { opentracing.set_route("/users/{id}"); }
    # Hosts a fetch's url.full must be built from with care: none at all, and IPv6.
    if (req.url ~ "^/hostless") { set req.http.host = ":80"; return (pass); }
    if (req.url ~ "^/ipv6host") { set req.http.host = "::1"; return (pass); }
}
"#;

fn spans_of_url<'a>(spans: &'a [Span], kind: i32, path: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.kind == kind && s.attr_str("url.path") == Some(path)).collect()
}

fn one<'a>(spans: &'a [Span], kind: i32, path: &str) -> &'a Span {
    let v = spans_of_url(spans, kind, path);
    assert_eq!(v.len(), 1, "one span of kind {kind} for {path}: {spans:#?}");
    v[0]
}

fn status_code(s: &Span) -> i32 {
    s.raw.status.as_ref().map_or(0, |st| st.code)
}

#[test]
fn server_and_client_spans_follow_the_http_semantic_conventions() {
    let dir = TempDir::new("semconv_matrix");
    let backend = Backend::start(dir.path(), "origin");
    let opts = VarnishOpts {
        params: vec![],
        env: vec![
            ("OTEL_INSTRUMENTATION_HTTP_SERVER_CAPTURE_REQUEST_HEADERS".into(), "*".into()),
            ("OTEL_INSTRUMENTATION_HTTP_SERVER_CAPTURE_RESPONSE_HEADERS".into(), "content-type".into()),
            ("OTEL_INSTRUMENTATION_HTTP_CLIENT_CAPTURE_REQUEST_HEADERS".into(), "x-request-id".into()),
            ("OPENTRACING_CAPTURE_URL_QUERY".into(), "true".into()),
            ("OPENTRACING_REDACT".into(), "(?i)(token=)[^&]*|secret".into()),
            ("OPENTRACING_SERVER_ROLE".into(), "edge".into()),
            ("OPENTRACING_TRACERESPONSE".into(), "true".into()),
            ("OPENTRACING_SERVER_TIMING".into(), "true".into()),
        ],
    };
    let mut v = Varnish::start_with(dir.path(), "edge", backend.port, SCENARIO, &opts);
    let ua = ("user-agent", "semconv-test/1.0");
    let rid = ("x-request-id", "r-42 secret");
    // (Not Authorization: the built-in VCL would pass the request.)
    let auth = ("proxy-authorization", "Basic aHVudGVyMg==");
    // Two lines of one header: two elements of its `string[]` attribute.
    let r = v.get("/cached?token=abc&x=1", &[ua, rid, auth, ("x-multi", "a, b"), ("x-multi", "c")]);
    assert_eq!(r.status, 200);
    // Telling the client: traceresponse and Server-Timing carry this request's context.
    let tr = r.header("traceresponse").expect("traceresponse header");
    let tr = parse_traceparent(tr).expect("a valid traceresponse");
    let st = r.header("server-timing").expect("Server-Timing header");
    assert_eq!(st, format!("traceparent;desc=\"00-{}-{}-{}\"", tr.trace_id, tr.span_id, tr.flags));
    assert_eq!(v.get("/cached?token=abc&x=1", &[ua]).status, 200); // a hit
    assert_eq!(v.get("/users/17", &[ua]).status, 404); // miss, backend says 404
    assert_eq!(v.get("/status/503", &[ua]).status, 503);
    assert_eq!(v.get("/dead", &[ua]).status, 503);
    // (The demo backend answers 404 for paths it does not know: these went through to it.)
    assert_eq!(v.get("/hostless", &[ua]).status, 404);
    assert_eq!(v.get("/ipv6host", &[ua]).status, 404);
    let spans = {
        v.wait_spans(Duration::from_secs(10), "all spans", |s| s.len() >= 13);
        v.stop()
    };

    // SERVER span of the miss: the request as received.
    let misses: Vec<&Span> = spans_of_url(&spans, KIND_SERVER, "/cached");
    assert_eq!(misses.len(), 2, "{spans:#?}");
    let miss = misses.iter().find(|s| s.attr_str("varnish.cache_result") == Some("miss")).expect("miss");
    let hit = misses.iter().find(|s| s.attr_str("varnish.cache_result") == Some("hit")).expect("hit");
    assert_eq!(miss.name, "GET");
    assert_eq!(miss.span_id, tr.span_id, "traceresponse names the SERVER span");
    assert_eq!(miss.attr_str("http.request.method"), Some("GET"));
    assert_eq!(miss.attr_str("url.scheme"), Some("http"));
    assert_eq!(miss.attr_str("url.query"), Some("REDACTED&x=1"), "query on, every match of the pattern redacted");
    // From the Host header ("localhost", no port: the scheme's default).
    assert_eq!(miss.attr_str("server.address"), Some("localhost"));
    assert_eq!(miss.attr_int("server.port"), Some(80));
    assert_eq!(miss.attr_str("client.address"), Some("127.0.0.1"));
    assert_eq!(miss.attr_str("network.peer.address"), Some("127.0.0.1"));
    assert!(miss.attr_int("network.peer.port").is_some_and(|p| p > 0));
    assert_eq!(miss.attr_str("network.protocol.version"), Some("1.1"));
    assert_eq!(miss.attr_str("user_agent.original"), Some("semconv-test/1.0"));
    assert_eq!(miss.attr_int("http.response.status_code"), Some(200));
    assert!(miss.attr_int("http.response.body.size").is_some_and(|n| n > 0));
    assert_eq!(miss.attr_str("varnish.server.role"), Some("edge"));
    // Captured headers are `string[]`, one element per header line, as the conventions say.
    assert_eq!(miss.attr_strs("http.request.header.x-request-id"), Some(vec!["r-42 REDACTED"]));
    assert_eq!(miss.attr_strs("http.request.header.x-multi"), Some(vec!["a, b", "c"]));
    assert!(!miss.attributes.contains_key("http.request.header.proxy-authorization"), "never captured by *");
    let content_type = miss.attr_strs("http.response.header.content-type").expect("content-type captured");
    assert!(content_type.len() == 1 && content_type[0].starts_with("text/html"), "{content_type:?}");
    assert_eq!(status_code(miss), 0, "2xx: status unset");
    // The hit: object age and remaining TTL.
    assert!(hit.attributes.contains_key("varnish.object.age") && hit.attributes.contains_key("varnish.object.ttl"));

    // CLIENT span of the miss: the backend request.
    let fetch = one(&spans, KIND_CLIENT, "/cached");
    assert_eq!(fetch.parent_span_id, miss.span_id);
    assert_eq!(fetch.name, "GET");
    assert_eq!(fetch.attr_str("server.address"), Some("localhost"));
    assert_eq!(fetch.attr_str("url.full").map(|u| u.starts_with("http://localhost/")), Some(true));
    assert!(fetch.attr_str("url.full").unwrap().ends_with("/cached?REDACTED&x=1"));
    assert_eq!(fetch.attr_str("network.peer.address"), Some("127.0.0.1"));
    assert_eq!(fetch.attr_int("network.peer.port"), Some(i64::from(backend.port)));
    assert_eq!(fetch.attr_str("varnish.backend"), Some("default"));
    assert_eq!(fetch.attr_strs("http.request.header.x-request-id"), Some(vec!["r-42 REDACTED"]));
    // A Host naming no host gives neither a server nor a URL (not `http://:80/...`); an IPv6
    // literal goes in brackets.
    let hostless = one(&spans, KIND_CLIENT, "/hostless");
    assert_eq!((hostless.attr_str("url.full"), hostless.attr_str("server.address")), (None, None));
    let ipv6 = one(&spans, KIND_CLIENT, "/ipv6host");
    assert_eq!(ipv6.attr_str("url.full"), Some("http://[::1]/ipv6host"));
    assert_eq!((ipv6.attr_str("server.address"), ipv6.attr_int("server.port")), (Some("::1"), Some(80)));

    // 404: not an error on the SERVER span, an error on the CLIENT span; the route names it.
    let s404 = one(&spans, KIND_SERVER, "/users/17");
    assert_eq!(s404.name, "GET /users/{id}");
    assert_eq!(s404.attr_str("http.route"), Some("/users/{id}"));
    assert_eq!((s404.attr_int("http.response.status_code"), status_code(s404)), (Some(404), 0));
    assert_eq!(s404.attr_str("error.type"), None);
    let c404 = one(&spans, KIND_CLIENT, "/users/17");
    assert_eq!((status_code(c404), c404.attr_str("error.type")), (2, Some("404")));

    // 5xx: an error on both, error.type is the status code.
    let s503 = one(&spans, KIND_SERVER, "/status/503");
    assert_eq!((status_code(s503), s503.attr_str("error.type")), (2, Some("503")));
    assert_eq!(s503.attr_str("varnish.cache_result"), Some("pass"));
    let c503 = one(&spans, KIND_CLIENT, "/status/503");
    assert_eq!((status_code(c503), c503.attr_str("error.type")), (2, Some("503")));

    // Backend down: the fetch failed (no response), the client got a 503 from Varnish.
    let dead = one(&spans, KIND_CLIENT, "/dead");
    assert_eq!(status_code(dead), 2);
    assert!(dead.attr_str("error.type").is_some());
    assert_eq!(dead.attr_int("http.response.status_code"), None, "no response came back");
    let sdead = one(&spans, KIND_SERVER, "/dead");
    assert_eq!((sdead.attr_int("http.response.status_code"), status_code(sdead)), (Some(503), 2));
}

#[test]
fn unknown_methods_are_other_and_named_http() {
    let dir = TempDir::new("semconv_methods");
    let backend = Backend::start(dir.path(), "origin");
    let scenario = "sub vcl_recv { return (pass); }";
    let mut v = Varnish::start_with(dir.path(), "edge", backend.port, scenario, &VarnishOpts::default());
    let mut conn = KeepAlive::connect(v.addr());
    let r = conn.request("FOO", "/pass/x", &[]);
    assert!(r.status > 0);
    let r = conn.request("POST", "/pass/y", &[]);
    assert_eq!(r.status, 200);
    drop(conn);
    let spans = v.stop();
    let foo = one(&spans, KIND_SERVER, "/pass/x");
    assert_eq!(foo.name, "HTTP");
    assert_eq!(foo.attr_str("http.request.method"), Some("_OTHER"));
    assert_eq!(foo.attr_str("http.request.method_original"), Some("FOO"));
    let post = one(&spans, KIND_SERVER, "/pass/y");
    assert_eq!((post.name.as_str(), post.attr_str("http.request.method_original")), ("POST", None));
    let post_fetch = one(&spans, KIND_CLIENT, "/pass/y");
    assert_eq!(post_fetch.attr_str("http.request.method"), Some("POST"));
}
