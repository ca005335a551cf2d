//! The Jaeger `uber-trace-id` header field, and the `uberctx-{key}` baggage
//! header fields, as specified by the Jaeger documentation's "Propagation
//! Format" (client libraries; since the clients' retirement, the "Migration
//! to OpenTelemetry SDK" page), with the OpenTelemetry Jaeger propagators
//! (opentelemetry-rust `opentelemetry-jaeger-propagator`, opentelemetry-go
//! contrib, opentelemetry-js) where the documentation leaves room.
//!
//! ```text
//! uber-trace-id: {trace-id}:{span-id}:{parent-span-id}:{flags}
//! uberctx-{baggage-key}: {url-encoded baggage-value}
//! ```
//!
//! Choices, each covered by a test:
//!
//! * trace-id is 1 to 32 hex digits and span-id 1 to 16, left-padded with
//!   zeros ("Receivers MUST accept hex-strings shorter than 32 (16) characters
//!   and 0-pad them on the left"); a trace-id of up to 16 digits is a 64-bit
//!   id, stored in the last 8 bytes. Zero (all-zero) ids are invalid.
//! * Hex digits may be upper or lower case: the format only says "base16",
//!   and the Jaeger clients (`strconv.ParseUint(s, 16, 64)`, Java's
//!   `Long.parseUnsignedLong(s, 16)`) accept both. (B3 and W3C are strict.)
//! * parent-span-id is deprecated; it must still be 1 to 16 hex digits, and
//!   `0` is allowed (a root span), as the Jaeger clients require. Its value is
//!   not returned. (The OpenTelemetry propagators do not look at it at all.)
//! * flags is one or two hex digits ("leading zero may be omitted"). Bit 0 is
//!   sampled; bit 1 is debug, which only counts together with sampled ("Debug
//!   flag should only be set when the sampled flag is set"; OpenTelemetry
//!   treats debug alone as not sampled). The whole byte is kept.
//! * URL encoding: when the value contains no `:`, `%3A` (or `%3a`) is taken as
//!   the separator, like the OpenTelemetry Rust propagator (which replaces
//!   `%3A` by `:` when there is no `:`). Mixed forms are invalid.
//! * Exactly four fields; empty fields, extra fields and inner whitespace are
//!   invalid. Leading and trailing OWS of the value is ignored.
//! * Repeated `uber-trace-id` fields: the first one is used and the others
//!   are ignored, as the OpenTelemetry propagators do (they read one value).
//!   A blank first field counts as absent.
//! * Inject ([`format()`]) writes a 32-digit trace-id, a 16-digit span-id,
//!   parent `0` and two flag digits (`01` / `00`; [`format_flags`] for others,
//!   e.g. `03` to keep debug).
//! * Baggage ([`baggage_key`], [`parse_baggage`], [`encode_baggage_value`]):
//!   the key is the header name after `uberctx-` (matched case-insensitively),
//!   lowercased as the Jaeger clients do; the value is percent-decoded (`+`
//!   stays `+`, malformed escapes stay as they are, invalid UTF-8 becomes
//!   U+FFFD) and encoded like `encodeURIComponent` (everything but RFC 3986
//!   unreserved characters), as the OpenTelemetry JS propagator does.
//!
//! Parsing the trace context never allocates and never panics.

use super::baggage::percent_decode;
use super::traceparent::{hex_lower, trim_ows};

/// The trace context header.
pub const HEADER: &str = "uber-trace-id";
/// Prefix of the baggage headers.
pub const BAGGAGE_PREFIX: &str = "uberctx-";

/// Flag bits.
pub const FLAG_SAMPLED: u8 = 0x01;
pub const FLAG_DEBUG: u8 = 0x02;
pub const FLAG_FIREHOSE: u8 = 0x08;

/// Length of a value as [`format()`] writes it: 32 + 1 + 16 + 1 + 1 + 1 + 2.
pub const LEN: usize = 54;

/// A parsed, valid Jaeger trace context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JaegerContext {
    /// 128 bits; a 64-bit trace-id is in the last 8 bytes, the first 8 are zero.
    pub trace_id: [u8; 16],
    /// The caller's span id: the parent of the span we create.
    pub span_id: [u8; 8],
    /// The flags byte as received (unknown bits kept).
    pub flags: u8,
}

impl JaegerContext {
    /// Whether the caller recorded this trace (bit 0).
    #[must_use]
    pub fn sampled(&self) -> bool {
        self.flags & FLAG_SAMPLED != 0
    }

    /// Whether this is a debug trace (bit 1, only together with bit 0).
    #[must_use]
    pub fn debug(&self) -> bool {
        self.flags & (FLAG_SAMPLED | FLAG_DEBUG) == FLAG_SAMPLED | FLAG_DEBUG
    }
}

/// Why an `uber-trace-id` was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// The value is empty (or only whitespace); only from [`parse_value`].
    Empty,
    /// Not exactly four `:`-separated (or `%3A`-separated) fields.
    Format,
    /// trace-id is empty or longer than 32 characters.
    TraceIdLength,
    /// span-id is empty or longer than 16 characters.
    SpanIdLength,
    /// parent-span-id is not 1 to 16 hex digits.
    ParentSpanId,
    /// A non-hex character in trace-id or span-id.
    Hex,
    /// flags is not one or two hex digits.
    Flags,
    /// trace-id is zero.
    ZeroTraceId,
    /// span-id is zero.
    ZeroSpanId,
}

impl Invalid {
    /// A short human reason, for a log line.
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            Invalid::Empty => "empty uber-trace-id",
            Invalid::Format => "uber-trace-id is not four ':'-separated fields",
            Invalid::TraceIdLength => "uber-trace-id trace-id is not 1 to 32 hex digits",
            Invalid::SpanIdLength => "uber-trace-id span-id is not 1 to 16 hex digits",
            Invalid::ParentSpanId => "invalid uber-trace-id parent-span-id",
            Invalid::Hex => "non-hex character in uber-trace-id id",
            Invalid::Flags => "uber-trace-id flags is not one or two hex digits",
            Invalid::ZeroTraceId => "zero uber-trace-id trace-id",
            Invalid::ZeroSpanId => "zero uber-trace-id span-id",
        }
    }
}

impl core::fmt::Display for Invalid {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[inline]
fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decodes 1 to `2 * out.len()` hex digits into `out`, right-aligned (the
/// missing leading digits are zero). `length` for a wrong length, `bad` for a
/// non-hex character.
fn decode_padded(src: &[u8], out: &mut [u8], length: Invalid, bad: Invalid) -> Result<(), Invalid> {
    if src.is_empty() || src.len() > out.len() * 2 {
        return Err(length);
    }
    out.fill(0);
    for (i, &c) in src.iter().rev().enumerate() {
        let v = nibble(c).ok_or(bad)?;
        let shift = if i % 2 == 0 { 0 } else { 4 };
        if let Some(o) = out.len().checked_sub(1 + i / 2).and_then(|at| out.get_mut(at)) {
            *o |= v << shift;
        }
    }
    Ok(())
}

/// Splits the value into its four fields, on `:`, or on `%3A` / `%3a` when
/// there is no `:` at all.
fn split(s: &[u8]) -> Result<[&[u8]; 4], Invalid> {
    let encoded = !s.contains(&b':');
    let mut parts: [&[u8]; 4] = [&[]; 4];
    let (mut n, mut start, mut i) = (0usize, 0usize, 0usize);
    while i < s.len() {
        let sep = if s[i] == b':' {
            1
        } else if encoded && s[i] == b'%' && s.get(i + 1) == Some(&b'3') && matches!(s.get(i + 2), Some(b'A' | b'a')) {
            3
        } else {
            0
        };
        if sep == 0 {
            i += 1;
            continue;
        }
        if n == 3 {
            return Err(Invalid::Format);
        }
        parts[n] = &s[start..i];
        n += 1;
        i += sep;
        start = i;
    }
    if n != 3 {
        return Err(Invalid::Format);
    }
    parts[3] = &s[start..];
    Ok(parts)
}

/// Parses the `uber-trace-id` header.
///
/// `fields`: every `uber-trace-id` header field of the request, in order.
/// Only the first one is used; a blank first field counts as absent.
///
/// # Errors
///
/// The first problem [`parse_value`] finds in the first field.
pub fn parse(fields: &[&[u8]]) -> Result<Option<JaegerContext>, Invalid> {
    match fields.first().map(|f| trim_ows(f)) {
        None | Some([]) => Ok(None),
        Some(value) => parse_value(value).map(Some),
    }
}

/// Parses one `uber-trace-id` value. Leading and trailing OWS is ignored.
///
/// # Errors
///
/// The first [`Invalid`] reason found: field count, then trace-id, span-id,
/// parent-span-id and flags in order, then zero ids.
pub fn parse_value(value: &[u8]) -> Result<JaegerContext, Invalid> {
    let s = trim_ows(value);
    if s.is_empty() {
        return Err(Invalid::Empty);
    }
    let [trace, span, parent, flags] = split(s)?;

    let mut trace_id = [0u8; 16];
    decode_padded(trace, &mut trace_id, Invalid::TraceIdLength, Invalid::Hex)?;
    let mut span_id = [0u8; 8];
    decode_padded(span, &mut span_id, Invalid::SpanIdLength, Invalid::Hex)?;
    let mut parent_id = [0u8; 8];
    decode_padded(parent, &mut parent_id, Invalid::ParentSpanId, Invalid::ParentSpanId)?;
    let mut flags_byte = [0u8; 1];
    decode_padded(flags, &mut flags_byte, Invalid::Flags, Invalid::Flags)?;

    if trace_id == [0u8; 16] {
        return Err(Invalid::ZeroTraceId);
    }
    if span_id == [0u8; 8] {
        return Err(Invalid::ZeroSpanId);
    }
    Ok(JaegerContext { trace_id, span_id, flags: flags_byte[0] })
}

/// The value `{32 hex}:{16 hex}:0:{01|00}`: always ASCII, so
/// `core::str::from_utf8` on it cannot fail.
#[must_use]
pub fn format(trace_id: &[u8; 16], span_id: &[u8; 8], sampled: bool) -> [u8; LEN] {
    format_flags(trace_id, span_id, if sampled { FLAG_SAMPLED } else { 0 })
}

/// Like [`format()`] with any flags byte (e.g. `FLAG_SAMPLED | FLAG_DEBUG`).
#[must_use]
pub fn format_flags(trace_id: &[u8; 16], span_id: &[u8; 8], flags: u8) -> [u8; LEN] {
    let mut out = [b':'; LEN];
    hex_lower(trace_id, &mut out[0..32]);
    hex_lower(span_id, &mut out[33..49]);
    out[50] = b'0';
    hex_lower(&[flags], &mut out[52..54]);
    out
}

impl JaegerContext {
    /// This context formatted as an `uber-trace-id` value (flags kept).
    #[must_use]
    pub fn format(&self) -> [u8; LEN] {
        format_flags(&self.trace_id, &self.span_id, self.flags)
    }
}

/// The baggage key of a header name `uberctx-{key}` (prefix matched
/// case-insensitively), `None` for other names or an empty key.
#[must_use]
pub fn baggage_key(header_name: &[u8]) -> Option<&[u8]> {
    let prefix = BAGGAGE_PREFIX.as_bytes();
    let (head, key) = header_name.split_at_checked(prefix.len())?;
    (head.eq_ignore_ascii_case(prefix) && !key.is_empty()).then_some(key)
}

#[inline]
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// One baggage item from an `uberctx-{key}` header: `key` is the part of the
/// header name after the prefix (see [`baggage_key`]), `value` the field
/// value. Returns the lowercased key and the percent-decoded value.
///
/// `None` when the key is empty or not an HTTP token, or the value holds a
/// control character other than HTAB.
#[must_use]
pub fn parse_baggage(key: &[u8], value: &[u8]) -> Option<(String, String)> {
    if key.is_empty() || !key.iter().all(|&b| is_tchar(b)) {
        return None;
    }
    let value = trim_ows(value);
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return None;
    }
    let key = key.iter().map(|&b| char::from(b.to_ascii_lowercase())).collect();
    Some((key, percent_decode(value).into_owned()))
}

/// Encodes a baggage value for an `uberctx-` header: every byte but the RFC
/// 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`) as `%XX`.
#[must_use]
pub fn encode_baggage_value(value: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(value.len());
    for &b in value.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // The values used by the OpenTelemetry Rust Jaeger propagator tests.
    const LONG_TRACE: &str = "000000000000004d0000000000000016";
    const SHORT_TRACE: &str = "4d0000000000000016";
    const SPAN: &str = "0000000000017c29";
    const SHORT_SPAN: &str = "17c29";
    const TRACE_ID: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0x4d, 0, 0, 0, 0, 0, 0, 0, 0x16];
    const SPAN_ID: [u8; 8] = [0, 0, 0, 0, 0, 0x01, 0x7c, 0x29];

    fn one(s: &str) -> Result<Option<JaegerContext>, Invalid> {
        parse(&[s.as_bytes()])
    }

    fn ok(s: &str) -> JaegerContext {
        match one(s) {
            Ok(Some(c)) => c,
            other => panic!("expected valid for {s:?}, got {other:?}"),
        }
    }

    fn err(s: &str) -> Invalid {
        match one(s) {
            Err(e) => e,
            other => panic!("expected invalid for {s:?}, got {other:?}"),
        }
    }

    // --- the documentation's format and the OpenTelemetry cases ----------

    #[test]
    fn long_and_short_ids() {
        for s in [
            format!("{LONG_TRACE}:{SPAN}:0:1"),
            format!("{SHORT_TRACE}:{SPAN}:0:1"),
            format!("{SHORT_TRACE}:{SHORT_SPAN}:0:1"),
            format!("{LONG_TRACE}:{SHORT_SPAN}:0:01"),
        ] {
            let c = ok(&s);
            assert_eq!((c.trace_id, c.span_id, c.flags), (TRACE_ID, SPAN_ID, 1), "{s:?}");
            assert!(c.sampled() && !c.debug());
        }
    }

    #[test]
    fn sixty_four_bit_trace_id() {
        let c = ok("a3ce929d0e0e4736:00f067aa0ba902b7:0:1");
        assert_eq!(c.trace_id, [0, 0, 0, 0, 0, 0, 0, 0, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36]);
        // One-digit ids.
        let c = ok("1:2:0:1");
        assert_eq!(c.trace_id, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(c.span_id, [0, 0, 0, 0, 0, 0, 0, 2]);
        // An odd number of digits.
        assert_eq!(ok("abc:def:0:1").trace_id[14..], [0x0a, 0xbc]);
        assert_eq!(ok("abc:def:0:1").span_id[6..], [0x0d, 0xef]);
    }

    #[test]
    fn flags() {
        let f = |s: &str| ok(&format!("{LONG_TRACE}:{SPAN}:0:{s}"));
        assert!(!f("0").sampled());
        assert!(!f("00").sampled());
        assert!(f("1").sampled());
        assert!(f("01").sampled());
        // Debug only counts with sampled.
        assert!(f("3").sampled() && f("3").debug());
        assert!(f("03").debug());
        assert!(!f("2").sampled() && !f("2").debug());
        // Firehose and unknown bits are kept.
        assert_eq!(f("9").flags, 0x09);
        assert!(f("9").sampled() && !f("9").debug());
        assert_eq!(f("ff").flags, 0xff);
        assert_eq!(f("FF").flags, 0xff);
        assert_eq!(f("0a").flags, 0x0a);
        // Not decimal: "10" is 0x10, not sampled.
        assert!(!f("10").sampled());
        for bad in ["", "120", "001", "g", "0x", "-1", "+1", " 1", "1\t1"] {
            assert_eq!(err(&format!("{LONG_TRACE}:{SPAN}:0:{bad}")), Invalid::Flags, "{bad:?}");
        }
    }

    #[test]
    fn parent_span_id() {
        let want = ok(&format!("{LONG_TRACE}:{SPAN}:0:1"));
        for parent in ["0", "00", "0000000000000000", "1", "a3ce929d0e0e4736", "FFFFFFFFFFFFFFFF"] {
            assert_eq!(ok(&format!("{LONG_TRACE}:{SPAN}:{parent}:1")), want, "{parent:?}");
        }
        for parent in ["", "00000000000000000", "x", "ignored_parent_span_id", " 0"] {
            assert_eq!(err(&format!("{LONG_TRACE}:{SPAN}:{parent}:1")), Invalid::ParentSpanId, "{parent:?}");
        }
    }

    #[test]
    fn uppercase_hex_is_accepted() {
        let c = ok("4BF92F3577B34DA6A3CE929D0E0E4736:00F067AA0BA902B7:0:1");
        assert_eq!(c, ok("4bf92f3577b34da6a3ce929d0e0e4736:00f067aa0ba902b7:0:1"));
        assert_eq!(c.trace_id[0], 0x4b);
    }

    #[test]
    fn invalid_ids() {
        assert_eq!(err(&format!("invalidtractid:{SPAN}:0:0")), Invalid::Hex);
        assert_eq!(err(&format!("{LONG_TRACE}:invalidspanID:0:0")), Invalid::Hex);
        assert_eq!(err(&format!("{LONG_TRACE}0:{SPAN}:0:1")), Invalid::TraceIdLength);
        assert_eq!(err(&format!(":{SPAN}:0:1")), Invalid::TraceIdLength);
        assert_eq!(err(&format!("{LONG_TRACE}:{SPAN}0:0:1")), Invalid::SpanIdLength);
        assert_eq!(err(&format!("{LONG_TRACE}::0:1")), Invalid::SpanIdLength);
        assert_eq!(err(&format!("{LONG_TRACE}:0x17c29:0:1")), Invalid::Hex);
        assert_eq!(err(&format!("-1:{SPAN}:0:1")), Invalid::Hex);
        assert_eq!(err(&format!("{LONG_TRACE}:+17c29:0:1")), Invalid::Hex);
    }

    #[test]
    fn zero_ids() {
        assert_eq!(err(&format!("0:{SPAN}:0:1")), Invalid::ZeroTraceId);
        assert_eq!(err(&format!("{}:{SPAN}:0:1", "0".repeat(32))), Invalid::ZeroTraceId);
        assert_eq!(err(&format!("{LONG_TRACE}:0:0:1")), Invalid::ZeroSpanId);
        assert_eq!(err(&format!("{LONG_TRACE}:0000000000000000:0:1")), Invalid::ZeroSpanId);
        assert_eq!(err("0:0:0:0"), Invalid::ZeroTraceId);
    }

    #[test]
    fn field_count() {
        assert_eq!(err(&format!("{LONG_TRACE}:{SPAN}:0")), Invalid::Format);
        assert_eq!(err(&format!("{LONG_TRACE}:{SPAN}:0:1:")), Invalid::Format);
        assert_eq!(err(&format!("{LONG_TRACE}:{SPAN}:0:1:x")), Invalid::Format);
        assert_eq!(err(LONG_TRACE), Invalid::Format);
        assert_eq!(err(":::"), Invalid::TraceIdLength);
        assert_eq!(err("::::"), Invalid::Format);
        // Other separators are not separators.
        assert_eq!(err(&format!("{LONG_TRACE}-{SPAN}-0-1")), Invalid::Format);
        assert_eq!(err(&format!("{LONG_TRACE} {SPAN} 0 1")), Invalid::Format);
    }

    // --- URL encoding ------------------------------------------------------------

    #[test]
    fn url_encoded_value() {
        let want = ok(&format!("{LONG_TRACE}:{SPAN}:0:1"));
        assert_eq!(ok(&format!("{LONG_TRACE}%3A{SPAN}%3A0%3A1")), want);
        assert_eq!(ok(&format!("{LONG_TRACE}%3a{SPAN}%3a0%3a1")), want);
        assert_eq!(ok(&format!("{SHORT_TRACE}%3A{SHORT_SPAN}%3A0%3A01")), want);
        // Mixed forms are not decoded: the %3A stays inside a field.
        assert_eq!(err(&format!("{LONG_TRACE}:{SPAN}%3A0:1")), Invalid::Format);
        assert_eq!(err(&format!("{LONG_TRACE}:{SPAN}:0%3A1")), Invalid::Format);
        // Other escapes are not decoded.
        assert_eq!(err(&format!("{LONG_TRACE}%3A{SPAN}%3A%30%3A1")), Invalid::ParentSpanId);
        assert_eq!(err(&format!("{LONG_TRACE}%3{SPAN}%3A0%3A1")), Invalid::Format);
        assert_eq!(err(&format!("{LONG_TRACE}%253A{SPAN}%253A0%253A1")), Invalid::Format);
        assert_eq!(err("%3A%3A%3A"), Invalid::TraceIdLength);
        assert_eq!(err("%"), Invalid::Format);
        assert_eq!(err("%3"), Invalid::Format);
    }

    // --- whitespace, empty, repeated ------------------------------------------------

    #[test]
    fn whitespace() {
        let want = ok(&format!("{LONG_TRACE}:{SPAN}:0:1"));
        assert_eq!(ok(&format!(" \t{LONG_TRACE}:{SPAN}:0:1\t ")), want);
        assert_eq!(err(&format!("{LONG_TRACE} :{SPAN}:0:1")), Invalid::TraceIdLength);
        assert_eq!(err(&format!("{SHORT_TRACE} :{SPAN}:0:1")), Invalid::Hex);
        assert_eq!(err(&format!("{LONG_TRACE}: {SPAN}:0:1")), Invalid::SpanIdLength);
        assert_eq!(err(&format!(" {SHORT_TRACE}: {SHORT_SPAN}:0:1")), Invalid::Hex);
        assert_eq!(err(&format!("{LONG_TRACE}:{SPAN}:0:1\r")), Invalid::Flags);
        assert_eq!(err(&format!("{LONG_TRACE}:{SPAN}:0:1\n")), Invalid::Flags);
    }

    #[test]
    fn empty_and_absent() {
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(one(""), Ok(None));
        assert_eq!(one(" \t"), Ok(None));
        assert_eq!(parse_value(b""), Err(Invalid::Empty));
        assert_eq!(parse_value(b" "), Err(Invalid::Empty));
    }

    #[test]
    fn repeated_first_wins() {
        let a = format!("{LONG_TRACE}:{SPAN}:0:1");
        let b = "a3ce929d0e0e4736:00f067aa0ba902b7:0:0";
        assert_eq!(parse(&[a.as_bytes(), b.as_bytes()]), Ok(Some(ok(&a))));
        assert_eq!(parse(&[a.as_bytes(), b"garbage"]), Ok(Some(ok(&a))));
        assert_eq!(parse(&[b"garbage", a.as_bytes()]), Err(Invalid::Format));
        assert_eq!(parse(&[b"", a.as_bytes()]), Ok(None));
    }

    // --- inject ------------------------------------------------------------------

    #[test]
    fn format_values() {
        let out = format(&TRACE_ID, &SPAN_ID, true);
        assert_eq!(&out, format!("{LONG_TRACE}:{SPAN}:0:01").as_bytes());
        let out = format(&TRACE_ID, &SPAN_ID, false);
        assert_eq!(&out, format!("{LONG_TRACE}:{SPAN}:0:00").as_bytes());
        let out = format_flags(&TRACE_ID, &SPAN_ID, FLAG_SAMPLED | FLAG_DEBUG);
        assert_eq!(&out, format!("{LONG_TRACE}:{SPAN}:0:03").as_bytes());
        assert!(core::str::from_utf8(&out).is_ok());
        let c = ok(&format!("{SHORT_TRACE}:{SHORT_SPAN}:17c29:b"));
        assert_eq!(&c.format(), format!("{LONG_TRACE}:{SPAN}:0:0b").as_bytes());
    }

    #[test]
    fn round_trip() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..1000 {
            let mut trace_id = [0u8; 16];
            let mut span_id = [0u8; 8];
            trace_id[..8].copy_from_slice(&next().to_le_bytes());
            trace_id[8..].copy_from_slice(&next().to_le_bytes());
            span_id.copy_from_slice(&next().to_le_bytes());
            trace_id[15] |= 1;
            span_id[7] |= 1;
            let flags = next() as u8;
            let out = format_flags(&trace_id, &span_id, flags);
            let c = parse(&[&out]).unwrap().unwrap();
            assert_eq!(c, JaegerContext { trace_id, span_id, flags });
            assert_eq!(c.format(), out);
        }
    }

    // --- robustness -------------------------------------------------------------------

    #[test]
    fn every_single_byte_mutation_is_handled() {
        let base = format!("{LONG_TRACE}:{SPAN}:0:01");
        let base = base.as_bytes();
        for i in 0..base.len() {
            for b in 0..=255u8 {
                let mut v = base.to_vec();
                v[i] = b;
                let r = parse(&[&v]);
                // Any hex digit (either case) keeps an id or the flags valid;
                // OWS in the first or last position is trimmed and only
                // shortens the trace-id or the flags, which is allowed.
                let ows = (i == 0 || i == base.len() - 1) && (b == b' ' || b == b'\t');
                let want = match i {
                    32 | 49 | 51 => b == b':',
                    _ => b.is_ascii_hexdigit() || ows,
                };
                assert_eq!(r.is_ok(), want, "{i} {b:#x}: {r:?}");
            }
        }
    }

    #[test]
    fn every_truncation_is_handled() {
        let base = format!("{LONG_TRACE}:{SPAN}:0:01");
        let base = base.as_bytes();
        for n in 0..=base.len() {
            let r = parse(&[&base[..n]]);
            match n {
                0 => assert_eq!(r, Ok(None)),
                53 | 54 => assert!(matches!(r, Ok(Some(_))), "{n}: {r:?}"),
                _ => assert!(r.is_err(), "{n}: {r:?}"),
            }
        }
    }

    #[test]
    fn huge_values_are_rejected() {
        let big = "a".repeat(100_000);
        assert_eq!(err(&big), Invalid::Format);
        assert_eq!(err(&format!("{big}:{SPAN}:0:1")), Invalid::TraceIdLength);
        assert_eq!(err(&format!("{LONG_TRACE}:{big}:0:1")), Invalid::SpanIdLength);
        assert_eq!(err(&format!("{LONG_TRACE}:{SPAN}:{big}:1")), Invalid::ParentSpanId);
        assert_eq!(err(&format!("{LONG_TRACE}:{SPAN}:0:{big}")), Invalid::Flags);
        assert_eq!(err(&":".repeat(100_000)), Invalid::Format);
        assert_eq!(err(&"%3A".repeat(100_000)), Invalid::Format);
    }

    #[test]
    fn invalid_reasons_have_text() {
        let all = [
            Invalid::Empty,
            Invalid::Format,
            Invalid::TraceIdLength,
            Invalid::SpanIdLength,
            Invalid::ParentSpanId,
            Invalid::Hex,
            Invalid::Flags,
            Invalid::ZeroTraceId,
            Invalid::ZeroSpanId,
        ];
        for (i, a) in all.iter().enumerate() {
            assert!(!a.as_str().is_empty());
            assert_eq!(a.to_string(), a.as_str());
            for b in &all[i + 1..] {
                assert_ne!(a.as_str(), b.as_str());
            }
        }
    }

    // --- baggage --------------------------------------------------------------------------

    #[test]
    fn baggage_key_from_header_name() {
        assert_eq!(baggage_key(b"uberctx-key1"), Some(&b"key1"[..]));
        assert_eq!(baggage_key(b"Uberctx-Key1"), Some(&b"Key1"[..]));
        assert_eq!(baggage_key(b"UBERCTX-my-baggage-key-1"), Some(&b"my-baggage-key-1"[..]));
        assert_eq!(baggage_key(b"uberctx-"), None);
        assert_eq!(baggage_key(b"uberctx"), None);
        assert_eq!(baggage_key(b"uber-trace-id"), None);
        assert_eq!(baggage_key(b"x-uberctx-key"), None);
        assert_eq!(baggage_key(b""), None);
    }

    #[test]
    fn baggage_documentation_examples() {
        // uberctx-key1: value1, uberctx-key2: value2
        assert_eq!(parse_baggage(b"key1", b"value1"), Some(("key1".into(), "value1".into())));
        assert_eq!(parse_baggage(b"key2", b"value2"), Some(("key2".into(), "value2".into())));
        // SetBaggageItem("key1", "value 1 / blah") => uberctx-key1: value%201%20%2F%20blah
        assert_eq!(parse_baggage(b"key1", b"value%201%20%2F%20blah"), Some(("key1".into(), "value 1 / blah".into())));
        assert_eq!(encode_baggage_value("value 1 / blah"), "value%201%20%2F%20blah");
    }

    #[test]
    fn baggage_values() {
        let v = |s: &[u8]| parse_baggage(b"k", s).map(|(_, v)| v);
        assert_eq!(v(b""), Some(String::new()));
        assert_eq!(v(b" \tspaced out\t "), Some("spaced out".into()));
        assert_eq!(v(b"Am%C3%A9lie"), Some("Am\u{e9}lie".into()));
        assert_eq!(v(b"a+b"), Some("a+b".into()));
        assert_eq!(v(b"100%"), Some("100%".into()));
        assert_eq!(v(b"%zz%4"), Some("%zz%4".into()));
        assert_eq!(v(b"%FF"), Some("\u{fffd}".into()));
        assert_eq!(v(b"a\tb"), Some("a\tb".into()));
        assert_eq!(v(b"a\0b"), None);
        assert_eq!(v(b"a\r\nb"), None);
        assert_eq!(v(b"a\x7fb"), None);
    }

    #[test]
    fn baggage_keys() {
        assert_eq!(parse_baggage(b"My-Key", b"v"), Some(("my-key".into(), "v".into())));
        assert_eq!(parse_baggage(b"", b"v"), None);
        assert_eq!(parse_baggage(b"a b", b"v"), None);
        assert_eq!(parse_baggage(b"a:b", b"v"), None);
        assert_eq!(parse_baggage(b"caf\xc3\xa9", b"v"), None);
    }

    #[test]
    fn baggage_encoding_round_trip() {
        for s in ["", "plain", "a+b c", "100%", "Am\u{e9}lie", "\u{1f600}", "~-._", "!*'();:@&=+$,/?#[]"] {
            let enc = encode_baggage_value(s);
            assert!(enc.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)), "{enc}");
            assert_eq!(parse_baggage(b"k", enc.as_bytes()), Some(("k".into(), s.into())), "{s:?}");
        }
    }
}
