//! The OpenTelemetry HTTP semantic conventions (stable since v1.23) as plain functions over
//! strings, so that every rule is unit-tested without Varnish: method normalisation, span names,
//! `Host` parsing, protocol versions, header capture with its sensitive-header guard and
//! redaction.
//!
//! The `varnish.*` attributes are ours, documented in the README ("What a trace contains").

use std::borrow::Cow;

use regex::Regex;

/// The methods of RFC 9110 and RFC 5789 (PATCH): the only values `http.request.method` takes;
/// anything else is `_OTHER`, with the original in `http.request.method_original`.
const KNOWN_METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

/// `(http.request.method, needs http.request.method_original)`. Methods are case-sensitive:
/// `get` is not `GET`.
pub fn method(original: &str) -> (&'static str, bool) {
    match KNOWN_METHODS.iter().find(|m| **m == original) {
        Some(m) => (m, false),
        None => ("_OTHER", true),
    }
}

/// `{method} {route}` when a route is known, `{method}` otherwise, `HTTP` for `_OTHER`.
pub fn span_name(method: &'static str, route: Option<&str>) -> Cow<'static, str> {
    let m = if method == "_OTHER" { "HTTP" } else { method };
    match route {
        Some(r) if !r.is_empty() => Cow::Owned(format!("{m} {r}")),
        _ => Cow::Borrowed(m),
    }
}

/// `Host` (or `:authority`) to `(server.address, server.port)`: `example.com:8080`,
/// `[::1]:80`, `example.com` (port `None`: the default of the scheme applies). `None` when no
/// address can be read, an empty one included (`:80`, `[]`): `server.address` names a host.
pub fn split_host(host: &str) -> Option<(&str, Option<u16>)> {
    let host = host.trim_ascii();
    if host.is_empty() {
        return None;
    }
    if let Some(rest) = host.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(port(p)?),
            None if after.is_empty() => None,
            None => return None,
        };
        return (!addr.is_empty()).then_some((addr, port));
    }
    // The last colon, searched from the end: a port is a few bytes. Then whether there is
    // another (a byte loop over the whole value, as this was, cost about 20 instructions a byte:
    // 300 per request, callgrind).
    let bytes = host.as_bytes();
    let Some(last) = bytes.iter().rposition(|&b| b == b':') else { return Some((host, None)) };
    let name = &bytes[..last];
    // A plain loop: `contains` calls memchr, whose setup cost more than a host name's bytes
    // (about 60 instructions a request, callgrind).
    #[allow(clippy::manual_contains)]
    let another_colon = name.iter().any(|&b| b == b':');
    if another_colon {
        return Some((host, None)); // an unbracketed IPv6 literal: no port
    }
    if last == 0 {
        return None; // `:80`: a port without a host
    }
    Some((&host[..last], Some(port(&host[last + 1..])?)))
}

/// `url.full` of a CLIENT span: `scheme://address[:port]path[?query]`, from the parts
/// `split_host` read (so a `Host` without a host, `:80`, gives no URL at all), with an IPv6
/// address in brackets as RFC 3986 writes it (and a zone ID's `%` as `%25`, RFC 6874). The port
/// is kept only when `Host` named one.
pub fn full_url(scheme: &str, address: &str, port: Option<u16>, path: &str, query: Option<&str>) -> String {
    let ipv6 = address.contains(':');
    let mut url =
        String::with_capacity(scheme.len() + 3 + address.len() + 2 + 6 + path.len() + query.map_or(0, |q| q.len() + 1));
    url.push_str(scheme);
    url.push_str("://");
    if ipv6 {
        url.push('[');
        match address.split_once('%') {
            Some((ip, zone)) if !zone.starts_with("25") => {
                url.push_str(ip);
                url.push_str("%25");
                url.push_str(zone);
            }
            _ => url.push_str(address),
        }
        url.push(']');
    } else {
        url.push_str(address);
    }
    if let Some(p) = port {
        url.push(':');
        url.push_str(itoa::Buffer::new().format(p));
    }
    url.push_str(path);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

/// A port: one to five digits (RFC 3986 `port = *DIGIT`; empty is refused), at most 65535.
fn port(digits: &str) -> Option<u16> {
    if digits.is_empty() || digits.len() > 5 {
        return None;
    }
    // One pass: check and accumulate each digit.
    let mut n = 0u32;
    for b in digits.bytes() {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n = n * 10 + u32::from(d);
    }
    u16::try_from(n).ok()
}

/// The scheme of the original client request (`url.scheme` of a SERVER span), when a proxy in
/// front of Varnish (a TLS terminator) says it: the `proto` parameter of `Forwarded` (RFC 7239),
/// else the first value of `X-Forwarded-Proto`. Only `http` and `https` are taken; anything else
/// is as if absent (the conventions then want the scheme Varnish itself received, `http`).
pub fn original_scheme(forwarded: Option<&[u8]>, x_forwarded_proto: Option<&[u8]>) -> Option<&'static str> {
    let scheme = |p: &[u8]| {
        if p.eq_ignore_ascii_case(b"https") {
            Some("https")
        } else if p.eq_ignore_ascii_case(b"http") {
            Some("http")
        } else {
            None
        }
    };
    forwarded
        .and_then(|f| forwarded_param(f, b"proto"))
        .and_then(scheme)
        .or_else(|| x_forwarded_proto.map(first_value).and_then(scheme))
}

/// The hosts of the original client request that a proxy in front may have passed on, in the
/// order the conventions take them for `server.address` and `server.port` (before `Host`): the
/// `host` parameter of `Forwarded`, then the first value of `X-Forwarded-Host`. The caller takes
/// the first it can read.
pub fn original_hosts<'a>(forwarded: Option<&'a [u8]>, x_forwarded_host: Option<&'a [u8]>) -> [Option<&'a [u8]>; 2] {
    [forwarded.and_then(|f| forwarded_param(f, b"host")), x_forwarded_host.map(first_value)]
}

/// Parameter `name` (any case) of the first element of a `Forwarded` header, unquoted: the
/// element the proxy nearest the client added. Quoted values may hold `,`, `;` and `=`
/// (RFC 7239 section 4): those do not separate anything.
fn forwarded_param<'a>(forwarded: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for i in 0..=forwarded.len() {
        let b = forwarded.get(i).copied();
        if quoted && b.is_some() {
            match b {
                _ if escaped => escaped = false,
                Some(b'\\') => escaped = true,
                Some(b'"') => quoted = false,
                _ => {}
            }
            continue;
        }
        match b {
            Some(b'"') => quoted = true,
            Some(b';' | b',') | None => {
                if let Some(value) = pair_value(&forwarded[start..i], name) {
                    return Some(value);
                }
                if b != Some(b';') {
                    return None; // the end of the first element
                }
                start = i + 1;
            }
            _ => {}
        }
    }
    None
}

/// The value of a `name=value` pair if its name is `name` (any case), without quotes.
fn pair_value<'a>(pair: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let eq = pair.iter().position(|&b| b == b'=')?;
    if !pair[..eq].trim_ascii().eq_ignore_ascii_case(name) {
        return None;
    }
    let value = pair[eq + 1..].trim_ascii();
    Some(value.strip_prefix(b"\"").and_then(|v| v.strip_suffix(b"\"")).unwrap_or(value))
}

/// The first of a header's comma-separated values, trimmed.
fn first_value(v: &[u8]) -> &[u8] {
    v.split(|&b| b == b',').next().unwrap_or_default().trim_ascii()
}

/// `HTTP/1.1` to `1.1`, `HTTP/2.0` to `2` (`network.protocol.version`).
pub fn protocol_version(proto: &str) -> Option<&'static str> {
    match proto {
        "HTTP/1.1" => Some("1.1"),
        "HTTP/1.0" => Some("1.0"),
        "HTTP/2.0" | "HTTP/2" => Some("2"),
        "HTTP/3" | "HTTP/3.0" => Some("3"),
        _ => None,
    }
}

/// Splits a request target into path and query (`url.path`, `url.query`).
pub fn path_and_query(url: &str) -> (&str, Option<&str>) {
    // Byte searches for ASCII delimiters (always at character boundaries): the `str` pattern
    // searches they replace cost about 200 instructions per request (callgrind).
    let b = url.as_bytes();
    match b.iter().position(|&c| c == b'?' || c == b'#') {
        None => (url, None),
        Some(i) if b[i] == b'#' => (&url[..i], None),
        Some(i) => {
            let query = &url[i + 1..];
            let end = query.bytes().position(|c| c == b'#').unwrap_or(query.len());
            (&url[..i], Some(&query[..end]))
        }
    }
}

/// Headers never captured unless named explicitly (a `*` does not include them).
pub const SENSITIVE_HEADERS: [&str; 4] = ["authorization", "cookie", "set-cookie", "proxy-authorization"];

/// Which headers become `http.request.header.<name>` / `http.response.header.<name>` attributes.
#[derive(Clone, Debug, Default)]
pub struct HeaderCapture {
    /// Lowercase names.
    names: Vec<String>,
    all: bool,
}

impl PartialEq for HeaderCapture {
    fn eq(&self, other: &Self) -> bool {
        self.names == other.names && self.all == other.all
    }
}

impl HeaderCapture {
    /// A comma-separated list of header names; `*` means every header but the sensitive ones.
    pub fn parse(setting: &str, list: &str) -> Result<HeaderCapture, String> {
        let mut c = HeaderCapture::default();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                c.all = true;
            } else if crate::propagation::baggage::is_token(name.as_bytes()) {
                c.names.push(name.to_ascii_lowercase());
            } else {
                return Err(format!("{setting}: {name:?} is not a header name"));
            }
        }
        Ok(c)
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && !self.all
    }

    /// Whether a header called `name` (any case) is captured.
    pub fn wants(&self, name: &str) -> bool {
        let named = self.names.iter().any(|n| n.eq_ignore_ascii_case(name));
        named || (self.all && !SENSITIVE_HEADERS.iter().any(|s| s.eq_ignore_ascii_case(name)))
    }
}

/// Replaces every match of the redaction pattern in a captured value (or a URL query) with
/// `REDACTED`.
#[derive(Clone, Debug)]
pub struct Redaction(pub Regex);

impl PartialEq for Redaction {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Redaction {
    pub fn parse(setting: &str, pattern: &str) -> Result<Redaction, String> {
        // Bounded: a pattern from configuration must not compile into megabytes.
        regex::RegexBuilder::new(pattern)
            .size_limit(1 << 20)
            .build()
            .map(Redaction)
            .map_err(|e| format!("{setting}: {e}"))
    }

    pub fn apply<'a>(&self, value: &'a str) -> Cow<'a, str> {
        self.0.replace_all(value, "REDACTED")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_scheme_from_forwarded_then_x_forwarded_proto() {
        let scheme = |f: Option<&str>, x: Option<&str>| original_scheme(f.map(str::as_bytes), x.map(str::as_bytes));
        assert_eq!(scheme(None, None), None);
        assert_eq!(scheme(None, Some("https")), Some("https"));
        assert_eq!(scheme(None, Some(" HTTPS , http")), Some("https"), "the first value, any case");
        assert_eq!(scheme(None, Some("http")), Some("http"));
        assert_eq!(scheme(None, Some("wss")), None);
        assert_eq!(scheme(None, Some("")), None);
        assert_eq!(scheme(Some("for=192.0.2.60;proto=https;by=203.0.113.43"), None), Some("https"));
        assert_eq!(scheme(Some("For=\"[2001:db8::1]\"; Proto=\"https\""), Some("http")), Some("https"));
        // The first element is the client's; later ones are proxies on the way.
        assert_eq!(scheme(Some("for=1.2.3.4;proto=http, for=5.6.7.8;proto=https"), Some("https")), Some("http"));
        // Forwarded without proto: X-Forwarded-Proto decides.
        assert_eq!(scheme(Some("for=1.2.3.4"), Some("https")), Some("https"));
        assert_eq!(scheme(Some("proto=gopher"), None), None);
        assert_eq!(scheme(Some(";;=;proto"), Some("https")), Some("https"));
    }

    #[test]
    fn original_hosts_from_forwarded_then_x_forwarded_host() {
        let hosts = |f: Option<&'static str>, x: Option<&'static str>| {
            original_hosts(f.map(str::as_bytes), x.map(str::as_bytes))
                .map(|h| h.map(|h| std::str::from_utf8(h).unwrap()))
        };
        assert_eq!(hosts(None, None), [None, None]);
        assert_eq!(hosts(None, Some("shop.example:8443, inner")), [None, Some("shop.example:8443")]);
        assert_eq!(
            hosts(Some("for=1.2.3.4;host=\"a.example\";proto=https"), Some("b.example")),
            [Some("a.example"), Some("b.example")]
        );
        assert_eq!(hosts(Some("for=1.2.3.4, host=later.example"), None), [None, None]);
        assert_eq!(hosts(Some("host=\"[::1]:8080\""), None), [Some("[::1]:8080"), None]);
    }

    #[test]
    fn forwarded_quoted_values_hold_separators() {
        let param = |f: &'static str, n: &str| {
            forwarded_param(f.as_bytes(), n.as_bytes()).map(|v| std::str::from_utf8(v).unwrap())
        };
        assert_eq!(param("for=\"[2001:db8::1]:4711\";ext=\"a,b\";proto=https", "proto"), Some("https"));
        assert_eq!(param("for=\"x;proto=https;y\"", "proto"), None, "inside quotes: not a parameter");
        assert_eq!(param("for=\"a\\\"b,c\";proto=http, proto=https", "proto"), Some("http"), "escaped quote");
        assert_eq!(param("proto=http;", "proto"), Some("http"));
        assert_eq!(param("for=\"unterminated;proto=https", "proto"), None);
        assert_eq!(param("", "proto"), None);
    }

    #[test]
    fn unusable_forwarded_values_fall_back_to_the_x_forwarded_headers() {
        let scheme = |f: &str, x: &str| original_scheme(Some(f.as_bytes()), Some(x.as_bytes()));
        assert_eq!(scheme("proto=gopher", "https"), Some("https"));
        assert_eq!(scheme("proto=", "https"), Some("https"));
        let [f, x] = original_hosts(Some(b"host=\"\""), Some(b"b.example"));
        assert_eq!((f, x), (Some(&b""[..]), Some(&b"b.example"[..])), "the caller skips what it cannot read");
    }

    #[test]
    fn methods_are_normalised_case_sensitively() {
        assert_eq!(method("GET"), ("GET", false));
        assert_eq!(method("PATCH"), ("PATCH", false));
        assert_eq!(method("get"), ("_OTHER", true));
        assert_eq!(method("PURGE"), ("_OTHER", true));
        assert_eq!(span_name("GET", None), "GET");
        assert_eq!(span_name("GET", Some("/users/{id}")), "GET /users/{id}");
        assert_eq!(span_name("_OTHER", Some("/x")), "HTTP /x");
        assert_eq!(span_name("_OTHER", None), "HTTP");
        assert_eq!(span_name("POST", Some("")), "POST");
    }

    #[test]
    fn hosts_split_into_address_and_port() {
        assert_eq!(split_host("example.com"), Some(("example.com", None)));
        assert_eq!(split_host("example.com:8080"), Some(("example.com", Some(8080))));
        assert_eq!(split_host("[::1]:443"), Some(("::1", Some(443))));
        assert_eq!(split_host("[::1]"), Some(("::1", None)));
        assert_eq!(split_host("::1"), Some(("::1", None)));
        assert_eq!(split_host(" a.b "), Some(("a.b", None)));
        assert_eq!(split_host(""), None);
        assert_eq!(split_host("a:b"), None);
        assert_eq!(split_host("a:99999"), None);
        assert_eq!(split_host("a:65535"), Some(("a", Some(65535))));
        assert_eq!(split_host("a:0080"), Some(("a", Some(80))));
        assert_eq!(split_host("a:"), None);
        assert_eq!(split_host("a:+80"), None, "digits only");
        assert_eq!(split_host("[::1]:"), None);
        assert_eq!(split_host("[::1]:x"), None);
        assert_eq!(split_host("a:1:2"), Some(("a:1:2", None)));
        assert_eq!(split_host(":80"), None, "a port without a host");
        assert_eq!(split_host(":"), None);
        assert_eq!(split_host("::"), Some(("::", None)));
        assert_eq!(split_host("2001:db8::1:80"), Some(("2001:db8::1:80", None)), "unbracketed: no port");
        assert_eq!(split_host("é.example:81"), Some(("é.example", Some(81))));
        assert_eq!(split_host("[::1]x"), None);
        assert_eq!(split_host(":80"), None, "a port without a host");
        assert_eq!(split_host("[]:80"), None);
        assert_eq!(split_host("[]"), None);
        assert_eq!(split_host("::"), Some(("::", None)), "an unbracketed IPv6 literal");
    }

    #[test]
    fn full_urls_are_built_from_the_split_host() {
        let full = |host: &str, path, query| split_host(host).map(|(a, p)| full_url("http", a, p, path, query));
        assert_eq!(full("b", "/", None).as_deref(), Some("http://b/"));
        assert_eq!(full("b:8080", "/x", Some("a=1")).as_deref(), Some("http://b:8080/x?a=1"));
        assert_eq!(full("b:80", "/", None).as_deref(), Some("http://b:80/"), "the port as Host named it");
        assert_eq!(full("[::1]:81", "/", None).as_deref(), Some("http://[::1]:81/"));
        assert_eq!(full("::1", "/", None).as_deref(), Some("http://[::1]/"), "IPv6 in brackets");
        assert_eq!(full(" b ", "/", None).as_deref(), Some("http://b/"), "surrounding space dropped");
        assert_eq!(full(":80", "/", None), None, "no host: no URL");
        assert_eq!(full("[]:80", "/", None), None);
        assert_eq!(full("b:x", "/", None), None, "a port that is not one");
        assert_eq!(full("[fe80::1%eth0]:8080", "/", None).as_deref(), Some("http://[fe80::1%25eth0]:8080/"));
        assert_eq!(full("[fe80::1%25eth0]", "/", None).as_deref(), Some("http://[fe80::1%25eth0]/"), "already encoded");
    }

    #[test]
    fn protocol_versions_and_urls() {
        assert_eq!(protocol_version("HTTP/1.1"), Some("1.1"));
        assert_eq!(protocol_version("HTTP/2.0"), Some("2"));
        assert_eq!(protocol_version("SPDY"), None);
        assert_eq!(path_and_query("/a/b?x=1&y=2"), ("/a/b", Some("x=1&y=2")));
        assert_eq!(path_and_query("/a#frag"), ("/a", None));
        assert_eq!(path_and_query("/"), ("/", None));
        assert_eq!(path_and_query("/a?x#f?y"), ("/a", Some("x")));
        assert_eq!(path_and_query("/a#f?x"), ("/a", None));
        assert_eq!(path_and_query("?q"), ("", Some("q")));
        assert_eq!(path_and_query("/é?ü=1"), ("/é", Some("ü=1")));
        assert_eq!(path_and_query("/a?"), ("/a", Some("")));
    }

    #[test]
    fn header_capture_never_takes_credentials_unless_named() {
        let all = HeaderCapture::parse("S", "*").unwrap();
        assert!(all.wants("X-Request-Id") && all.wants("accept"));
        for s in SENSITIVE_HEADERS {
            assert!(!all.wants(s), "{s}");
            assert!(!all.wants(&s.to_ascii_uppercase()), "{s}");
        }
        let named = HeaderCapture::parse("S", "X-Request-Id, Cookie").unwrap();
        assert!(named.wants("x-request-id") && named.wants("cookie"));
        assert!(!named.wants("authorization") && !named.wants("accept"));
        assert!(HeaderCapture::parse("S", " , ").unwrap().is_empty());
        assert!(HeaderCapture::parse("S", "bad header").unwrap_err().contains("\"bad header\""));
    }

    #[test]
    fn redaction_replaces_every_match() {
        let r = Redaction::parse("R", r"(?i)token=[^&]*").unwrap();
        assert_eq!(r.apply("a=1&token=abc&TOKEN=x"), "a=1&REDACTED&REDACTED");
        assert_eq!(r.apply("nothing"), "nothing");
        assert!(Redaction::parse("R", "(").unwrap_err().starts_with("R: "));
    }
}
