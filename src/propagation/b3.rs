//! Zipkin B3 propagation: the single `b3` header field and the multiple
//! `X-B3-*` header fields, as specified by the `openzipkin/b3-propagation`
//! README, with the OpenTelemetry "B3 Requirements"
//! (`specification/context/api-propagators.md`) for what a propagator does
//! with them.
//!
//! ```text
//! b3: {TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]
//! b3: {SamplingState}                       ; sampling decision only
//! X-B3-TraceId: {TraceId}    X-B3-SpanId: {SpanId}    X-B3-ParentSpanId: {ParentSpanId}
//! X-B3-Sampled: 1 | 0        X-B3-Flags: 1            ; 1 = debug
//! ```
//!
//! Choices, each covered by a test:
//!
//! * Ids are lower-hex only (the spec says "lower-hex"; both the
//!   OpenTelemetry Go and Rust B3 propagators reject uppercase). TraceId is 16
//!   or 32 characters, a 16-character one is left-padded with zeros to 128
//!   bits; SpanId and ParentSpanId are exactly 16. All-zero ids are invalid
//!   (ParentSpanId included, as OpenTelemetry Go does).
//! * The single-header SamplingState is exactly `0`, `1` or `d` (debug, which
//!   implies sampled); its absence means "defer" (`sampled: None`: our own
//!   sampler decides). A ParentSpanId is only allowed after a SamplingState
//!   (`{TraceId}-{SpanId}-{ParentSpanId}` is invalid, as in OpenTelemetry
//!   Go); it is validated and then dropped: OpenTelemetry never reuses the
//!   caller's span id, so it is not needed to continue the trace.
//! * `X-B3-Sampled` is `1` or `0`, and leniently `true` / `false` (any ASCII
//!   case), as the spec's legacy note allows. `X-B3-Flags: 1` means debug and
//!   overrides `X-B3-Sampled`; any other Flags value is ignored (OpenTelemetry
//!   Go and Rust). `X-B3-ParentSpanId` is not examined at all.
//! * A sampling decision without ids (`b3: 0`, or `X-B3-Sampled` / `X-B3-Flags`
//!   without `X-B3-TraceId` and `X-B3-SpanId`) is valid and yields
//!   [`B3::SamplingOnly`]: start a new trace, but honour the decision. One id
//!   without the other is invalid.
//! * Repeated fields: "When extracting state headers, the first value wins"
//!   (spec, multiple headers), which is also what the OpenTelemetry
//!   propagators do for every B3 header. So for each header only the first
//!   field is looked at, and for `b3` as well. Unlike `traceparent`, a second
//!   field therefore never invalidates the first.
//! * A field that is empty or only OWS counts as absent (OpenTelemetry Go).
//!   Leading and trailing OWS is ignored; whitespace inside never is.
//! * [`extract`]: a valid `b3` wins over the `X-B3-*` fields; an absent or
//!   invalid `b3` falls back to them (OpenTelemetry Go and Rust).
//! * Inject ([`format_single`], [`format_multi`]) never sends ParentSpanId
//!   (OpenTelemetry: MUST NOT), and keeps a received debug flag ("MUST
//!   preserve a debug trace flag"): `d` in `b3`, `X-B3-Flags: 1` and no
//!   `X-B3-Sampled` in the multiple headers.
//!
//! Parsing never allocates and never panics.

use super::traceparent::{decode_lower_hex, hex_lower, trim_ows};

/// The single header.
pub const SINGLE: &str = "b3";
/// The multiple headers, in the spec's spelling (HTTP names are case-insensitive).
pub const TRACE_ID: &str = "X-B3-TraceId";
pub const SPAN_ID: &str = "X-B3-SpanId";
pub const PARENT_SPAN_ID: &str = "X-B3-ParentSpanId";
pub const SAMPLED: &str = "X-B3-Sampled";
pub const FLAGS: &str = "X-B3-Flags";

/// Length of a `b3` value as [`format_single`] writes it:
/// 32 hex, `-`, 16 hex, `-`, one sampling character.
pub const SINGLE_LEN: usize = 51;

/// A sampling decision carried by B3. "Defer", the fourth state, is the
/// absence of a decision and is represented by `None` where it can occur.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// `0`: do not record.
    Deny,
    /// `1`: record.
    Accept,
    /// `d` / `X-B3-Flags: 1`: record, and mark every span as debug.
    Debug,
}

impl Decision {
    /// The decision for a plain sampled / not sampled flag.
    #[must_use]
    pub fn from_sampled(sampled: bool) -> Self {
        if sampled {
            Decision::Accept
        } else {
            Decision::Deny
        }
    }

    /// Whether the trace is recorded (debug implies accept).
    #[must_use]
    pub fn sampled(self) -> bool {
        !matches!(self, Decision::Deny)
    }

    /// Whether this is a debug decision.
    #[must_use]
    pub fn debug(self) -> bool {
        matches!(self, Decision::Debug)
    }

    /// The single-header SamplingState character: `"0"`, `"1"` or `"d"`.
    /// Also a complete sampling-only `b3` value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Deny => "0",
            Decision::Accept => "1",
            Decision::Debug => "d",
        }
    }
}

/// A parsed, valid B3 trace context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct B3Context {
    /// 128 bits; a 64-bit TraceId is in the last 8 bytes, the first 8 are zero.
    pub trace_id: [u8; 16],
    /// The caller's span id: the parent of the span we create.
    pub span_id: [u8; 8],
    /// `Some(true)` accept, `Some(false)` deny, `None` defer (our sampler decides).
    /// Always `Some(true)` when `debug` is set.
    pub sampled: Option<bool>,
    /// Debug ("force trace"); implies sampled.
    pub debug: bool,
}

impl B3Context {
    /// The decision carried, `None` when deferred.
    #[must_use]
    pub fn decision(&self) -> Option<Decision> {
        if self.debug {
            Some(Decision::Debug)
        } else {
            self.sampled.map(Decision::from_sampled)
        }
    }
}

/// What valid B3 header fields carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum B3 {
    /// Ids (and maybe a decision): continue this trace.
    Context(B3Context),
    /// Only a sampling decision, no ids: start a new trace with this decision.
    SamplingOnly(Decision),
}

impl B3 {
    /// The ids, if any.
    #[must_use]
    pub fn context(&self) -> Option<&B3Context> {
        match self {
            B3::Context(ctx) => Some(ctx),
            B3::SamplingOnly(_) => None,
        }
    }

    /// The sampling decision, `None` when deferred.
    #[must_use]
    pub fn decision(&self) -> Option<Decision> {
        match self {
            B3::Context(ctx) => ctx.decision(),
            B3::SamplingOnly(d) => Some(*d),
        }
    }
}

/// Why B3 header fields were rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// The value is empty (or only whitespace); only from [`parse_single_value`].
    Empty,
    /// More than four `-`-separated fields in `b3`.
    Format,
    /// TraceId is not 16 or 32 characters.
    TraceIdLength,
    /// SpanId is not 16 characters.
    SpanIdLength,
    /// ParentSpanId is not 16 characters.
    ParentSpanIdLength,
    /// A character in an id that is not a hex digit.
    Hex,
    /// An uppercase hex digit in an id (only lower-hex is allowed).
    Uppercase,
    /// The `b3` SamplingState is not `0`, `1` or `d` (or is empty).
    SamplingState,
    /// `X-B3-Sampled` is not `1`, `0`, `true` or `false`.
    Sampled,
    /// A SpanId without a TraceId (`X-B3-SpanId` alone).
    MissingTraceId,
    /// A TraceId without a SpanId (`b3: {TraceId}`, or `X-B3-TraceId` alone).
    MissingSpanId,
    /// TraceId is all zeroes.
    ZeroTraceId,
    /// SpanId is all zeroes.
    ZeroSpanId,
    /// ParentSpanId is all zeroes.
    ZeroParentSpanId,
}

impl Invalid {
    /// A short human reason, for a log line.
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            Invalid::Empty => "empty b3",
            Invalid::Format => "too many fields in b3",
            Invalid::TraceIdLength => "B3 TraceId is not 16 or 32 hex digits",
            Invalid::SpanIdLength => "B3 SpanId is not 16 hex digits",
            Invalid::ParentSpanIdLength => "B3 ParentSpanId is not 16 hex digits",
            Invalid::Hex => "non-hex character in a B3 id",
            Invalid::Uppercase => "uppercase hex in a B3 id",
            Invalid::SamplingState => "invalid b3 sampling state",
            Invalid::Sampled => "invalid X-B3-Sampled",
            Invalid::MissingTraceId => "B3 SpanId without TraceId",
            Invalid::MissingSpanId => "B3 TraceId without SpanId",
            Invalid::ZeroTraceId => "all-zero B3 TraceId",
            Invalid::ZeroSpanId => "all-zero B3 SpanId",
            Invalid::ZeroParentSpanId => "all-zero B3 ParentSpanId",
        }
    }
}

impl core::fmt::Display for Invalid {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Decodes lower-hex `src` into `out`; `src` must be `2 * out.len()` long,
/// otherwise `length` is returned. The first refused digit says why.
fn decode(src: &[u8], out: &mut [u8], length: Invalid) -> Result<(), Invalid> {
    if src.len() != out.len() * 2 {
        return Err(length);
    }
    decode_lower_hex(src, out).map_err(|r| if r.uppercase { Invalid::Uppercase } else { Invalid::Hex })
}

fn decode_trace_id(src: &[u8]) -> Result<[u8; 16], Invalid> {
    let mut id = [0u8; 16];
    match src.len() {
        32 => decode(src, &mut id, Invalid::TraceIdLength)?,
        16 => decode(src, &mut id[8..], Invalid::TraceIdLength)?,
        _ => return Err(Invalid::TraceIdLength),
    }
    Ok(id)
}

fn decode_span_id(src: &[u8], length: Invalid) -> Result<[u8; 8], Invalid> {
    let mut id = [0u8; 8];
    decode(src, &mut id, length)?;
    Ok(id)
}

/// The first field, trimmed, or `None` when there is none or it is blank.
fn first<'a>(fields: &[&'a [u8]]) -> Option<&'a [u8]> {
    fields.first().map(|f| trim_ows(f)).filter(|v| !v.is_empty())
}

/// Parses the `b3` header.
///
/// `fields`: every `b3` header field of the request, in order. Only the first
/// one is used (see the module documentation); an empty or blank first field
/// counts as absent.
///
/// # Errors
///
/// The first problem [`parse_single_value`] finds in the first field.
pub fn extract_single(fields: &[&[u8]]) -> Result<Option<B3>, Invalid> {
    first(fields).map(parse_single_value).transpose()
}

/// Parses one `b3` value: `{TraceId}-{SpanId}`, optionally followed by
/// `-{SamplingState}` and then `-{ParentSpanId}`, or only `{SamplingState}`.
/// Leading and trailing OWS is ignored.
///
/// # Errors
///
/// The first [`Invalid`] reason found: field count, then TraceId, SpanId,
/// SamplingState, ParentSpanId in order of appearance, then zero ids.
pub fn parse_single_value(value: &[u8]) -> Result<B3, Invalid> {
    let s = trim_ows(value);
    match s {
        [] => return Err(Invalid::Empty),
        [c] => return sampling_state(*c).map(B3::SamplingOnly),
        _ => {}
    }

    let mut parts = s.split(|&b| b == b'-');
    let trace = parts.next().unwrap_or_default();
    let span = parts.next().ok_or(Invalid::MissingSpanId)?;
    let state = parts.next();
    let parent = parts.next();
    if parts.next().is_some() {
        return Err(Invalid::Format);
    }

    let trace_id = decode_trace_id(trace)?;
    let span_id = decode_span_id(span, Invalid::SpanIdLength)?;
    let decision = match state {
        None => None,
        Some([c]) => Some(sampling_state(*c)?),
        Some(_) => return Err(Invalid::SamplingState),
    };
    if let Some(parent) = parent {
        if decode_span_id(parent, Invalid::ParentSpanIdLength)? == [0u8; 8] {
            return Err(Invalid::ZeroParentSpanId);
        }
    }

    context(trace_id, span_id, decision).map(B3::Context)
}

fn sampling_state(c: u8) -> Result<Decision, Invalid> {
    match c {
        b'0' => Ok(Decision::Deny),
        b'1' => Ok(Decision::Accept),
        b'd' => Ok(Decision::Debug),
        _ => Err(Invalid::SamplingState),
    }
}

fn context(trace_id: [u8; 16], span_id: [u8; 8], decision: Option<Decision>) -> Result<B3Context, Invalid> {
    if trace_id == [0u8; 16] {
        return Err(Invalid::ZeroTraceId);
    }
    if span_id == [0u8; 8] {
        return Err(Invalid::ZeroSpanId);
    }
    Ok(B3Context {
        trace_id,
        span_id,
        sampled: decision.map(Decision::sampled),
        debug: decision.is_some_and(Decision::debug),
    })
}

/// Parses the multiple headers. Each argument holds every field of that
/// header, in order; only the first one of each is used, and an empty or
/// blank one counts as absent. `X-B3-ParentSpanId` is not needed.
///
/// Returns `Ok(None)` when none of the four carries anything.
///
/// # Errors
///
/// [`Invalid::Sampled`] for an `X-B3-Sampled` that is not `1`, `0`, `true` or
/// `false`; [`Invalid::MissingSpanId`] / [`Invalid::MissingTraceId`] when only
/// one id is present; otherwise the first problem in TraceId, then SpanId,
/// then zero ids.
pub fn extract_multi(
    trace_id: &[&[u8]],
    span_id: &[&[u8]],
    sampled: &[&[u8]],
    flags: &[&[u8]],
) -> Result<Option<B3>, Invalid> {
    let sampled = match first(sampled) {
        None => None,
        Some(b"1") => Some(true),
        Some(b"0") => Some(false),
        Some(v) if v.eq_ignore_ascii_case(b"true") => Some(true),
        Some(v) if v.eq_ignore_ascii_case(b"false") => Some(false),
        Some(_) => return Err(Invalid::Sampled),
    };
    let decision =
        if first(flags) == Some(&b"1"[..]) { Some(Decision::Debug) } else { sampled.map(Decision::from_sampled) };

    match (first(trace_id), first(span_id)) {
        (None, None) => Ok(decision.map(B3::SamplingOnly)),
        (Some(_), None) => Err(Invalid::MissingSpanId),
        (None, Some(_)) => Err(Invalid::MissingTraceId),
        (Some(t), Some(s)) => {
            let trace_id = decode_trace_id(t)?;
            let span_id = decode_span_id(s, Invalid::SpanIdLength)?;
            context(trace_id, span_id, decision).map(|ctx| Some(B3::Context(ctx)))
        }
    }
}

/// Extracts B3 as OpenTelemetry requires: the single header takes
/// precedence; when it is absent or invalid, the multiple headers are used.
///
/// # Errors
///
/// When neither gives a valid result: the error of `b3` if it was present,
/// otherwise that of the multiple headers.
pub fn extract(
    single: &[&[u8]],
    trace_id: &[&[u8]],
    span_id: &[&[u8]],
    sampled: &[&[u8]],
    flags: &[&[u8]],
) -> Result<Option<B3>, Invalid> {
    match extract_single(single) {
        Ok(Some(b3)) => Ok(Some(b3)),
        Ok(None) => extract_multi(trace_id, span_id, sampled, flags),
        Err(e) => match extract_multi(trace_id, span_id, sampled, flags) {
            Ok(Some(b3)) => Ok(Some(b3)),
            _ => Err(e),
        },
    }
}

/// `X-B3-TraceId` value: 32 lower-hex characters (always ASCII).
#[must_use]
pub fn format_trace_id(trace_id: &[u8; 16]) -> [u8; 32] {
    let mut out = [0u8; 32];
    hex_lower(trace_id, &mut out);
    out
}

/// `X-B3-SpanId` value: 16 lower-hex characters (always ASCII).
#[must_use]
pub fn format_span_id(span_id: &[u8; 8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    hex_lower(span_id, &mut out);
    out
}

/// The `b3` value `{TraceId}-{SpanId}-{1|0}`, TraceId always 32 characters,
/// no ParentSpanId. Always ASCII, so `core::str::from_utf8` on it cannot fail.
#[must_use]
pub fn format_single(trace_id: &[u8; 16], span_id: &[u8; 8], sampled: bool) -> [u8; SINGLE_LEN] {
    format_single_decision(trace_id, span_id, Decision::from_sampled(sampled))
}

/// Like [`format_single`], with a debug decision written as `d`.
#[must_use]
pub fn format_single_decision(trace_id: &[u8; 16], span_id: &[u8; 8], decision: Decision) -> [u8; SINGLE_LEN] {
    let mut out = [b'-'; SINGLE_LEN];
    hex_lower(trace_id, &mut out[0..32]);
    hex_lower(span_id, &mut out[33..49]);
    out[50] = decision.as_str().as_bytes()[0];
    out
}

/// The values of the multiple headers to send. Absent headers are `None`:
/// with a debug decision `X-B3-Flags: 1` is sent instead of `X-B3-Sampled`
/// ("Debug implies an accept decision, so don't also send the X-B3-Sampled
/// header"). `X-B3-ParentSpanId` is never sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultiHeaders {
    /// `X-B3-TraceId`: 32 lower-hex characters.
    pub trace_id: [u8; 32],
    /// `X-B3-SpanId`: 16 lower-hex characters.
    pub span_id: [u8; 16],
    /// `X-B3-Sampled`: `"1"` or `"0"`, `None` for a debug decision.
    pub sampled: Option<&'static str>,
    /// `X-B3-Flags`: `"1"` for a debug decision, else `None`.
    pub flags: Option<&'static str>,
}

impl MultiHeaders {
    /// `X-B3-TraceId` as text.
    #[must_use]
    pub fn trace_id_str(&self) -> &str {
        core::str::from_utf8(&self.trace_id).unwrap_or_default()
    }

    /// `X-B3-SpanId` as text.
    #[must_use]
    pub fn span_id_str(&self) -> &str {
        core::str::from_utf8(&self.span_id).unwrap_or_default()
    }
}

/// The multiple header values for a span we propagate.
#[must_use]
pub fn format_multi(trace_id: &[u8; 16], span_id: &[u8; 8], decision: Decision) -> MultiHeaders {
    let (sampled, flags) = match decision {
        Decision::Debug => (None, Some("1")),
        d => (Some(d.as_str()), None),
    };
    MultiHeaders { trace_id: format_trace_id(trace_id), span_id: format_span_id(span_id), sampled, flags }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The values used by the OpenTelemetry B3 propagator tests.
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";
    const TRACE_ID_BYTES: [u8; 16] =
        [0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36];
    const SPAN_ID_BYTES: [u8; 8] = [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];
    const PADDED_64: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36];

    fn single(s: &str) -> Result<Option<B3>, Invalid> {
        extract_single(&[s.as_bytes()])
    }

    fn ctx(s: &str) -> B3Context {
        match single(s) {
            Ok(Some(B3::Context(c))) => c,
            other => panic!("expected a context for {s:?}, got {other:?}"),
        }
    }

    fn err(s: &str) -> Invalid {
        match single(s) {
            Err(e) => e,
            other => panic!("expected invalid for {s:?}, got {other:?}"),
        }
    }

    fn expect(sampled: Option<bool>, debug: bool) -> B3Context {
        B3Context { trace_id: TRACE_ID_BYTES, span_id: SPAN_ID_BYTES, sampled, debug }
    }

    fn multi(t: &str, s: &str, sampled: &str, flags: &str) -> Result<Option<B3>, Invalid> {
        fn f(v: &str) -> Vec<&[u8]> {
            if v.is_empty() {
                vec![]
            } else {
                vec![v.as_bytes()]
            }
        }
        extract_multi(&f(t), &f(s), &f(sampled), &f(flags))
    }

    // --- single header: the spec's examples -------------------------------

    /// The shared table-driven decoder against B3's digit-by-digit reading: every pair of
    /// bytes, and the first refused digit deciding the reason.
    #[test]
    fn decode_agrees_with_reading_digit_by_digit() {
        let digit = |c| {
            crate::propagation::traceparent::reference_digit(c).map_err(|upper| {
                if upper {
                    Invalid::Uppercase
                } else {
                    Invalid::Hex
                }
            })
        };
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                let want = digit(a).and_then(|h| digit(b).map(|l| h << 4 | l));
                let mut out = [0u8];
                let got = decode(&[a, b], &mut out, Invalid::SpanIdLength).map(|()| out[0]);
                assert_eq!(got, want, "{a:#x} {b:#x}");
            }
        }
        let mut out = [0u8; 3];
        assert_eq!(decode(b"0aAz99", &mut out, Invalid::SpanIdLength), Err(Invalid::Uppercase));
        assert_eq!(decode(b"0azA99", &mut out, Invalid::SpanIdLength), Err(Invalid::Hex));
        assert_eq!(decode(b"0aff", &mut out, Invalid::SpanIdLength), Err(Invalid::SpanIdLength));
    }

    #[test]
    fn spec_single_header_example() {
        // "b3: 80f198ee56343ba864fe8b2a57d3eff7-05e3ac9a4f6e3b90-1-e457b5a2e4d86bd1"
        let c = ctx("80f198ee56343ba864fe8b2a57d3eff7-05e3ac9a4f6e3b90-1-e457b5a2e4d86bd1");
        assert_eq!(&format_trace_id(&c.trace_id), b"80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(&format_span_id(&c.span_id), b"05e3ac9a4f6e3b90");
        assert_eq!(c.sampled, Some(true));
        assert!(!c.debug);
        // Without the parent, and the debug example.
        assert_eq!(ctx("80f198ee56343ba864fe8b2a57d3eff7-05e3ac9a4f6e3b90-1").sampled, Some(true));
        let c = ctx("80f198ee56343ba864fe8b2a57d3eff7-05e3ac9a4f6e3b90-d");
        assert_eq!((c.sampled, c.debug), (Some(true), true));
        assert_eq!(c.decision(), Some(Decision::Debug));
    }

    #[test]
    fn spec_sampling_only() {
        assert_eq!(single("0"), Ok(Some(B3::SamplingOnly(Decision::Deny))));
        assert_eq!(single("1"), Ok(Some(B3::SamplingOnly(Decision::Accept))));
        assert_eq!(single("d"), Ok(Some(B3::SamplingOnly(Decision::Debug))));
        assert_eq!(single(" 0\t"), Ok(Some(B3::SamplingOnly(Decision::Deny))));
        for s in ["a", "3", "D", "-", "t", "\0"] {
            assert_eq!(err(s), Invalid::SamplingState, "{s:?}");
        }
        let b3 = single("d").unwrap().unwrap();
        assert_eq!(b3.context(), None);
        assert_eq!(b3.decision(), Some(Decision::Debug));
    }

    // --- single header: the OpenTelemetry propagator cases -------------------

    #[test]
    fn single_sampling_states() {
        assert_eq!(ctx(&format!("{TRACE}-{SPAN}")), expect(None, false));
        assert_eq!(ctx(&format!("{TRACE}-{SPAN}-0")), expect(Some(false), false));
        assert_eq!(ctx(&format!("{TRACE}-{SPAN}-1")), expect(Some(true), false));
        assert_eq!(ctx(&format!("{TRACE}-{SPAN}-d")), expect(Some(true), true));
        assert_eq!(ctx(&format!("{TRACE}-{SPAN}-1-00000000000000cd")), expect(Some(true), false));
        assert_eq!(ctx(&format!("{TRACE}-{SPAN}-d-00000000000000cd")), expect(Some(true), true));
        assert_eq!(ctx(&format!("{TRACE}-{SPAN}")).decision(), None);
        assert_eq!(ctx(&format!("{TRACE}-{SPAN}-0")).decision(), Some(Decision::Deny));
    }

    #[test]
    fn single_64_bit_trace_id_is_left_padded() {
        let c = ctx(&format!("a3ce929d0e0e4736-{SPAN}-1-00000000000000cd"));
        assert_eq!(c.trace_id, PADDED_64);
        assert_eq!(ctx(&format!("a3ce929d0e0e4736-{SPAN}")).trace_id, PADDED_64);
        // A 64-bit id whose padded 128-bit form is sent back is the same trace.
        assert_eq!(ctx(&format!("0000000000000000a3ce929d0e0e4736-{SPAN}")).trace_id, PADDED_64);
    }

    #[test]
    fn single_trace_id_alone_is_invalid() {
        assert_eq!(err("000000000000007b"), Invalid::MissingSpanId);
        assert_eq!(err("000000000000007b00000000000001c8"), Invalid::MissingSpanId);
        assert_eq!(err("01"), Invalid::MissingSpanId);
    }

    #[test]
    fn single_wrong_lengths() {
        assert_eq!(err("000001c8-000000000000007b"), Invalid::TraceIdLength);
        assert_eq!(err(&format!("{}-{SPAN}", &TRACE[..31])), Invalid::TraceIdLength);
        assert_eq!(err(&format!("{TRACE}0-{SPAN}")), Invalid::TraceIdLength);
        assert_eq!(err(&format!("{}-{SPAN}", &TRACE[..17])), Invalid::TraceIdLength);
        assert_eq!(err("ab00000000000000000000000000000000-cd00000000000000-1"), Invalid::TraceIdLength);
        assert_eq!(err("000000000000007b00000000000001c8-0000007b"), Invalid::SpanIdLength);
        assert_eq!(err("ab000000000000000000000000000000-cd0000000000000000-1"), Invalid::SpanIdLength);
        assert_eq!(err(&format!("{TRACE}-")), Invalid::SpanIdLength);
        assert_eq!(
            err("ab000000000000000000000000000000-cd00000000000000-1-cd0000000000000000"),
            Invalid::ParentSpanIdLength
        );
        assert_eq!(err(&format!("{TRACE}-{SPAN}-1-00000000000001c")), Invalid::ParentSpanIdLength);
        assert_eq!(err(&format!("{TRACE}-{SPAN}-1-")), Invalid::ParentSpanIdLength);
    }

    #[test]
    fn single_bad_sampling_state() {
        // A trailing '-' (empty state), a bad state, "true", two characters.
        assert_eq!(err(&format!("{TRACE}-{SPAN}-")), Invalid::SamplingState);
        assert_eq!(err(&format!("{TRACE}-{SPAN}-3")), Invalid::SamplingState);
        assert_eq!(err(&format!("{TRACE}-{SPAN}-q")), Invalid::SamplingState);
        assert_eq!(err(&format!("{TRACE}-{SPAN}-D")), Invalid::SamplingState);
        assert_eq!(err(&format!("{TRACE}-{SPAN}-true")), Invalid::SamplingState);
        assert_eq!(err(&format!("{TRACE}-{SPAN}-01")), Invalid::SamplingState);
        // {TraceId}-{SpanId}-{ParentSpanId}: the parent needs a sampling state.
        assert_eq!(err(&format!("{TRACE}-{SPAN}-00000000000001c8")), Invalid::SamplingState);
        // A traceparent is not a b3 value.
        assert_eq!(err("00-ab000000000000000000000000000000-cd00000000000000-01"), Invalid::TraceIdLength);
    }

    #[test]
    fn single_extra_fields() {
        assert_eq!(err(&format!("{TRACE}-{SPAN}-1-00000000000000cd-")), Invalid::Format);
        assert_eq!(err(&format!("{TRACE}-{SPAN}-1-00000000000000cd-x")), Invalid::Format);
        assert_eq!(err(&format!("{TRACE}-{SPAN}-1-00000000000000cd-00000000000000cd")), Invalid::Format);
    }

    #[test]
    fn single_non_hex_and_uppercase() {
        assert_eq!(err("qw000000000000000000000000000000-cd00000000000000-1"), Invalid::Hex);
        assert_eq!(err("ab000000000000000000000000000000-qw00000000000000-1"), Invalid::Hex);
        assert_eq!(err("ab000000000000000000000000000000-cd00000000000000-1-qw00000000000000"), Invalid::Hex);
        assert_eq!(err("AB000000000000000000000000000000-cd00000000000000-1"), Invalid::Uppercase);
        assert_eq!(err("ab000000000000000000000000000000-CD00000000000000-1"), Invalid::Uppercase);
        assert_eq!(err("ab000000000000000000000000000000-cd00000000000000-1-EF00000000000000"), Invalid::Uppercase);
        assert_eq!(err(&format!("{}-{SPAN}", TRACE.to_uppercase())), Invalid::Uppercase);
        // Space and '+' are not hex digits either.
        assert_eq!(err(&format!("{} -{SPAN}", &TRACE[..31])), Invalid::Hex);
        assert_eq!(err(&format!("+{}-{SPAN}", &TRACE[1..])), Invalid::Hex);
    }

    #[test]
    fn single_zero_ids() {
        assert_eq!(err("00000000000000000000000000000000-0000000000000000-1"), Invalid::ZeroTraceId);
        assert_eq!(err(&format!("00000000000000000000000000000000-{SPAN}")), Invalid::ZeroTraceId);
        assert_eq!(err(&format!("0000000000000000-{SPAN}")), Invalid::ZeroTraceId);
        assert_eq!(err(&format!("{TRACE}-0000000000000000-1")), Invalid::ZeroSpanId);
        assert_eq!(err(&format!("{TRACE}-{SPAN}-1-0000000000000000")), Invalid::ZeroParentSpanId);
    }

    #[test]
    fn single_whitespace() {
        for s in [format!(" {TRACE}-{SPAN}-1"), format!("\t{TRACE}-{SPAN}-1 \t"), format!("{TRACE}-{SPAN}-1 ")] {
            assert_eq!(ctx(&s), expect(Some(true), false), "{s:?}");
        }
        assert_eq!(err(&format!("{TRACE} -{SPAN}-1")), Invalid::TraceIdLength);
        assert_eq!(err(&format!("{TRACE}- {SPAN}-1")), Invalid::SpanIdLength);
        assert_eq!(err(&format!("{TRACE}-{SPAN}- 1")), Invalid::SamplingState);
        assert_eq!(err(&format!("{TRACE}-{SPAN}-1\r")), Invalid::SamplingState);
        assert_eq!(err(&format!("{TRACE}-{SPAN}-1\n")), Invalid::SamplingState);
    }

    #[test]
    fn single_empty_and_absent() {
        assert_eq!(extract_single(&[]), Ok(None));
        assert_eq!(single(""), Ok(None));
        assert_eq!(single(" \t "), Ok(None));
        assert_eq!(parse_single_value(b""), Err(Invalid::Empty));
        assert_eq!(parse_single_value(b"  "), Err(Invalid::Empty));
    }

    #[test]
    fn single_repeated_first_wins() {
        let a = format!("{TRACE}-{SPAN}-1");
        let b = format!("a3ce929d0e0e4736-{SPAN}-0");
        let got = extract_single(&[a.as_bytes(), b.as_bytes()]).unwrap().unwrap();
        assert_eq!(got, B3::Context(expect(Some(true), false)));
        // The second field is not even looked at ...
        assert_eq!(extract_single(&[a.as_bytes(), b"garbage"]), Ok(Some(B3::Context(expect(Some(true), false)))));
        // ... and cannot rescue an invalid or blank first one.
        assert_eq!(extract_single(&[b"garbage", a.as_bytes()]), Err(Invalid::MissingSpanId));
        assert_eq!(extract_single(&[b"", a.as_bytes()]), Ok(None));
    }

    // --- multiple headers ---------------------------------------------------------

    #[test]
    fn spec_multi_header_example() {
        let got = extract_multi(&[b"463ac35c9f6413ad48485a3953bb6124"], &[b"a2fb4a1d1a96d312"], &[b"1"], &[])
            .unwrap()
            .unwrap();
        let c = got.context().unwrap();
        assert_eq!(&format_trace_id(&c.trace_id), b"463ac35c9f6413ad48485a3953bb6124");
        assert_eq!(&format_span_id(&c.span_id), b"a2fb4a1d1a96d312");
        assert_eq!((c.sampled, c.debug), (Some(true), false));
    }

    #[test]
    fn multi_sampling_states() {
        let c = |sampled, debug| Ok(Some(B3::Context(expect(sampled, debug))));
        assert_eq!(multi(TRACE, SPAN, "", ""), c(None, false));
        assert_eq!(multi(TRACE, SPAN, "0", ""), c(Some(false), false));
        assert_eq!(multi(TRACE, SPAN, "1", ""), c(Some(true), false));
        // The legacy booleans, leniently in any case.
        assert_eq!(multi(TRACE, SPAN, "true", ""), c(Some(true), false));
        assert_eq!(multi(TRACE, SPAN, "false", ""), c(Some(false), false));
        assert_eq!(multi(TRACE, SPAN, "True", ""), c(Some(true), false));
        assert_eq!(multi(TRACE, SPAN, "FALSE", ""), c(Some(false), false));
        // Debug implies sampled, and overrides a deny.
        assert_eq!(multi(TRACE, SPAN, "", "1"), c(Some(true), true));
        assert_eq!(multi(TRACE, SPAN, "0", "1"), c(Some(true), true));
        assert_eq!(multi(TRACE, SPAN, "1", "1"), c(Some(true), true));
        // Other flags values are ignored.
        assert_eq!(multi(TRACE, SPAN, "1", "2"), c(Some(true), false));
        assert_eq!(multi(TRACE, SPAN, "1", "invalid"), c(Some(true), false));
        assert_eq!(multi(TRACE, SPAN, "", "0"), c(None, false));
        assert_eq!(multi(TRACE, SPAN, "0", "d"), c(Some(false), false));
    }

    #[test]
    fn multi_bad_sampled() {
        for s in ["a", "d", "10", "2", "yes", "t", "tru", "1 1", "-1"] {
            assert_eq!(multi(TRACE, SPAN, s, ""), Err(Invalid::Sampled), "{s:?}");
        }
        // Even with a valid debug flag, as OpenTelemetry Go does.
        assert_eq!(multi(TRACE, SPAN, "bogus", "1"), Err(Invalid::Sampled));
        // OWS around the value is fine.
        assert_eq!(multi(TRACE, SPAN, " 1\t", ""), Ok(Some(B3::Context(expect(Some(true), false)))));
    }

    #[test]
    fn multi_sampling_only() {
        assert_eq!(multi("", "", "", ""), Ok(None));
        assert_eq!(extract_multi(&[], &[], &[], &[]), Ok(None));
        assert_eq!(multi("", "", "0", ""), Ok(Some(B3::SamplingOnly(Decision::Deny))));
        assert_eq!(multi("", "", "1", ""), Ok(Some(B3::SamplingOnly(Decision::Accept))));
        assert_eq!(multi("", "", "false", ""), Ok(Some(B3::SamplingOnly(Decision::Deny))));
        assert_eq!(multi("", "", "", "1"), Ok(Some(B3::SamplingOnly(Decision::Debug))));
        assert_eq!(multi("", "", "0", "1"), Ok(Some(B3::SamplingOnly(Decision::Debug))));
        assert_eq!(multi("", "", "", "0"), Ok(None));
        assert_eq!(multi("", "", "x", ""), Err(Invalid::Sampled));
    }

    #[test]
    fn multi_missing_one_id() {
        assert_eq!(multi(TRACE, "", "1", ""), Err(Invalid::MissingSpanId));
        assert_eq!(multi("", SPAN, "1", ""), Err(Invalid::MissingTraceId));
        assert_eq!(multi("ab000000000000000000000000000000", "", "1", ""), Err(Invalid::MissingSpanId));
        // Blank counts as absent.
        assert_eq!(extract_multi(&[TRACE.as_bytes()], &[b" "], &[], &[]), Err(Invalid::MissingSpanId));
    }

    #[test]
    fn multi_64_bit_trace_id() {
        let got = multi("a3ce929d0e0e4736", SPAN, "", "").unwrap().unwrap();
        assert_eq!(got.context().unwrap().trace_id, PADDED_64);
        let got = multi("00000000000001c8", "000000000000007b", "0", "").unwrap().unwrap();
        let c = got.context().unwrap();
        assert_eq!(c.trace_id, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x1, 0xc8]);
        assert_eq!(c.span_id, [0, 0, 0, 0, 0, 0, 0, 0x7b]);
    }

    #[test]
    fn multi_invalid_ids() {
        let cases = [
            ("ab00000000000000000000000000000000", "cd00000000000000", Invalid::TraceIdLength),
            ("ab0000000000000000000000000000", "cd00000000000000", Invalid::TraceIdLength),
            ("ab0000000000", "cd00000000000000", Invalid::TraceIdLength),
            ("00000000000001c", "cd00000000000000", Invalid::TraceIdLength),
            ("00000000000001c80", "cd00000000000000", Invalid::TraceIdLength),
            ("ab000000000000000000000000000000", "cd0000000000000000", Invalid::SpanIdLength),
            ("ab000000000000000000000000000000", "00000000000001c", Invalid::SpanIdLength),
            ("qw000000000000000000000000000000", "cd00000000000000", Invalid::Hex),
            ("ab000000000000000000000000000000", "qw00000000000000", Invalid::Hex),
            ("AB000000000000000000000000000000", "cd00000000000000", Invalid::Uppercase),
            ("ab000000000000000000000000000000", "CD00000000000000", Invalid::Uppercase),
            ("00000000000000000000000000000000", "cd00000000000000", Invalid::ZeroTraceId),
            ("0000000000000000", "cd00000000000000", Invalid::ZeroTraceId),
            ("ab000000000000000000000000000000", "0000000000000000", Invalid::ZeroSpanId),
            ("ab00000000000000 0000000000000000", "cd00000000000000", Invalid::TraceIdLength),
            ("ab0000000000000-0000000000000000", "cd00000000000000", Invalid::Hex),
        ];
        for (t, s, want) in cases {
            assert_eq!(multi(t, s, "1", ""), Err(want), "{t:?} {s:?}");
        }
    }

    #[test]
    fn multi_repeated_first_wins() {
        let other = b"a3ce929d0e0e4736";
        let got = extract_multi(&[TRACE.as_bytes(), other], &[SPAN.as_bytes(), b"x"], &[b"1", b"0"], &[b"0", b"1"]);
        assert_eq!(got, Ok(Some(B3::Context(expect(Some(true), false)))));
        // An invalid second field changes nothing, an invalid first one is invalid.
        assert_eq!(
            extract_multi(&[b"bogus", TRACE.as_bytes()], &[SPAN.as_bytes()], &[], &[]),
            Err(Invalid::TraceIdLength)
        );
        assert_eq!(extract_multi(&[TRACE.as_bytes()], &[SPAN.as_bytes()], &[b"x", b"1"], &[]), Err(Invalid::Sampled));
    }

    // --- precedence ------------------------------------------------------------------

    #[test]
    fn extract_single_takes_precedence() {
        let s = format!("{TRACE}-{SPAN}-1");
        let got = extract(&[s.as_bytes()], &[TRACE.as_bytes()], &[SPAN.as_bytes()], &[b"0"], &[]);
        assert_eq!(got, Ok(Some(B3::Context(expect(Some(true), false)))));
        // Invalid multiple headers are not even noticed.
        let got = extract(&[s.as_bytes()], &[TRACE.as_bytes()], &[SPAN.as_bytes()], &[b"invalid"], &[]);
        assert_eq!(got, Ok(Some(B3::Context(expect(Some(true), false)))));
        // A valid sampling-only b3 also wins.
        let got = extract(&[b"0"], &[TRACE.as_bytes()], &[SPAN.as_bytes()], &[b"1"], &[]);
        assert_eq!(got, Ok(Some(B3::SamplingOnly(Decision::Deny))));
    }

    #[test]
    fn extract_falls_back_to_multi() {
        // Invalid single header: the multiple headers are used.
        let s = format!("{TRACE}-{SPAN}-");
        let got = extract(&[s.as_bytes()], &[TRACE.as_bytes()], &[SPAN.as_bytes()], &[b"0"], &[]);
        assert_eq!(got, Ok(Some(B3::Context(expect(Some(false), false)))));
        // Absent or blank single header.
        let got = extract(&[], &[TRACE.as_bytes()], &[SPAN.as_bytes()], &[], &[b"1"]);
        assert_eq!(got, Ok(Some(B3::Context(expect(Some(true), true)))));
        let got = extract(&[b" "], &[TRACE.as_bytes()], &[SPAN.as_bytes()], &[], &[]);
        assert_eq!(got, Ok(Some(B3::Context(expect(None, false)))));
        // Nothing anywhere.
        assert_eq!(extract(&[], &[], &[], &[], &[]), Ok(None));
    }

    #[test]
    fn extract_reports_the_single_header_error() {
        let s = format!("{TRACE}-{SPAN}-x");
        assert_eq!(extract(&[s.as_bytes()], &[], &[], &[], &[]), Err(Invalid::SamplingState));
        assert_eq!(extract(&[s.as_bytes()], &[b"bad"], &[SPAN.as_bytes()], &[], &[]), Err(Invalid::SamplingState));
        // Without b3, the multiple headers' error.
        assert_eq!(extract(&[], &[b"bad"], &[SPAN.as_bytes()], &[], &[]), Err(Invalid::TraceIdLength));
    }

    // --- inject ------------------------------------------------------------------------

    #[test]
    fn format_single_values() {
        let out = format_single(&TRACE_ID_BYTES, &SPAN_ID_BYTES, true);
        assert_eq!(&out, format!("{TRACE}-{SPAN}-1").as_bytes());
        let out = format_single(&TRACE_ID_BYTES, &SPAN_ID_BYTES, false);
        assert_eq!(&out, format!("{TRACE}-{SPAN}-0").as_bytes());
        let out = format_single_decision(&TRACE_ID_BYTES, &SPAN_ID_BYTES, Decision::Debug);
        assert_eq!(&out, format!("{TRACE}-{SPAN}-d").as_bytes());
        // A 64-bit trace id is sent as 32 characters.
        let out = format_single(&PADDED_64, &SPAN_ID_BYTES, true);
        assert_eq!(&out, format!("0000000000000000a3ce929d0e0e4736-{SPAN}-1").as_bytes());
        assert!(core::str::from_utf8(&out).is_ok());
    }

    #[test]
    fn format_multi_values() {
        let m = format_multi(&TRACE_ID_BYTES, &SPAN_ID_BYTES, Decision::Accept);
        assert_eq!((m.trace_id_str(), m.span_id_str()), (TRACE, SPAN));
        assert_eq!((m.sampled, m.flags), (Some("1"), None));
        let m = format_multi(&TRACE_ID_BYTES, &SPAN_ID_BYTES, Decision::Deny);
        assert_eq!((m.sampled, m.flags), (Some("0"), None));
        let m = format_multi(&TRACE_ID_BYTES, &SPAN_ID_BYTES, Decision::Debug);
        assert_eq!((m.sampled, m.flags), (None, Some("1")));
        assert_eq!(&format_trace_id(&PADDED_64), b"0000000000000000a3ce929d0e0e4736");
    }

    #[test]
    fn decisions() {
        for (d, sampled, debug, s) in [
            (Decision::Deny, false, false, "0"),
            (Decision::Accept, true, false, "1"),
            (Decision::Debug, true, true, "d"),
        ] {
            assert_eq!((d.sampled(), d.debug(), d.as_str()), (sampled, debug, s));
            // The single-header character parses back to the same decision.
            assert_eq!(single(s), Ok(Some(B3::SamplingOnly(d))));
        }
        assert_eq!(Decision::from_sampled(true), Decision::Accept);
        assert_eq!(Decision::from_sampled(false), Decision::Deny);
    }

    #[test]
    fn round_trips() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..1000 {
            let mut trace_id = [0u8; 16];
            let mut span_id = [0u8; 8];
            trace_id[..8].copy_from_slice(&next().to_le_bytes());
            trace_id[8..].copy_from_slice(&next().to_le_bytes());
            span_id.copy_from_slice(&next().to_le_bytes());
            trace_id[15] |= 1;
            span_id[7] |= 1;
            let decision = [Decision::Deny, Decision::Accept, Decision::Debug][i % 3];
            let want = B3::Context(B3Context {
                trace_id,
                span_id,
                sampled: Some(decision.sampled()),
                debug: decision.debug(),
            });

            let out = format_single_decision(&trace_id, &span_id, decision);
            assert_eq!(extract_single(&[&out]), Ok(Some(want)));

            let m = format_multi(&trace_id, &span_id, decision);
            let sampled: Vec<&[u8]> = m.sampled.iter().map(|s| s.as_bytes()).collect();
            let flags: Vec<&[u8]> = m.flags.iter().map(|s| s.as_bytes()).collect();
            assert_eq!(extract_multi(&[&m.trace_id], &[&m.span_id], &sampled, &flags), Ok(Some(want)));
        }
    }

    // --- robustness ---------------------------------------------------------------------

    #[test]
    fn every_single_byte_mutation_is_handled() {
        let base = format!("{TRACE}-{SPAN}-1-00000000000000cd");
        let base = base.as_bytes();
        let mut valid = 0usize;
        for i in 0..base.len() {
            for b in 0..=255u8 {
                let mut v = base.to_vec();
                v[i] = b;
                if let Ok(Some(B3::Context(c))) = extract_single(&[&v]) {
                    valid += 1;
                    // Anything accepted is the same grammar: it formats back.
                    assert_eq!(&format_single_decision(&c.trace_id, &c.span_id, c.decision().unwrap())[..49], &v[..49]);
                }
            }
        }
        // Valid: each of the 64 hex positions with any of the 16 lower-hex
        // digits (no single digit can zero an id), the sampling state as '0',
        // '1' or 'd', and the 3 delimiters left as '-'. OWS replacing the
        // first or last character shortens an id, so it is invalid.
        assert_eq!(valid, 64 * 16 + 3 + 3);
    }

    #[test]
    fn every_truncation_is_handled() {
        let base = format!("{TRACE}-{SPAN}-1-00000000000000cd");
        let base = base.as_bytes();
        for n in 0..=base.len() {
            let r = extract_single(&[&base[..n]]);
            match n {
                0 => assert_eq!(r, Ok(None)),
                49 | 51 | 68 => assert!(matches!(r, Ok(Some(B3::Context(_)))), "{n}: {r:?}"),
                _ => assert!(r.is_err(), "{n}: {r:?}"),
            }
        }
    }

    #[test]
    fn huge_values_are_rejected() {
        let big = "a".repeat(100_000);
        assert_eq!(err(&big), Invalid::MissingSpanId);
        assert_eq!(err(&format!("{big}-{SPAN}")), Invalid::TraceIdLength);
        assert_eq!(err(&format!("{TRACE}-{SPAN}-1-{big}")), Invalid::ParentSpanIdLength);
        let dashes = "-".repeat(100_000);
        assert_eq!(err(&dashes), Invalid::Format);
        assert_eq!(multi(&big, SPAN, "", ""), Err(Invalid::TraceIdLength));
        assert_eq!(multi(TRACE, SPAN, &big, ""), Err(Invalid::Sampled));
        assert_eq!(multi(TRACE, SPAN, "", &big), Ok(Some(B3::Context(expect(None, false)))));
    }

    #[test]
    fn invalid_reasons_have_text() {
        let all = [
            Invalid::Empty,
            Invalid::Format,
            Invalid::TraceIdLength,
            Invalid::SpanIdLength,
            Invalid::ParentSpanIdLength,
            Invalid::Hex,
            Invalid::Uppercase,
            Invalid::SamplingState,
            Invalid::Sampled,
            Invalid::MissingTraceId,
            Invalid::MissingSpanId,
            Invalid::ZeroTraceId,
            Invalid::ZeroSpanId,
            Invalid::ZeroParentSpanId,
        ];
        for (i, a) in all.iter().enumerate() {
            assert!(!a.as_str().is_empty());
            assert_eq!(a.to_string(), a.as_str());
            for b in &all[i + 1..] {
                assert_ne!(a.as_str(), b.as_str());
            }
        }
    }
}
