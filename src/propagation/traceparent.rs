//! The `traceparent` header field (W3C Trace Context Level 1, section 3.2).
//!
//! ```text
//! traceparent = version "-" trace-id "-" parent-id "-" trace-flags [ "-" future ]
//!               2HEXDIGLC   32HEXDIGLC  16HEXDIGLC     2HEXDIGLC
//! ```
//!
//! Parsing never allocates and never panics; any deviation from the format
//! yields an [`Invalid`] reason, upon which the caller restarts the trace.

/// Length of a version `00` traceparent value, and of the prefix of any
/// higher version that this parser understands.
pub const LEN: usize = 55;

/// The `sampled` bit of the trace-flags.
pub const FLAG_SAMPLED: u8 = 0x01;

/// A parsed, valid parent context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParentContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The full trace-flags byte as received. Unknown bits are kept; the
    /// caller decides what to forward (version 00 only defines `sampled`).
    pub flags: u8,
}

impl ParentContext {
    /// Whether the caller recorded this trace (`sampled` flag, bit 0).
    #[must_use]
    pub fn sampled(&self) -> bool {
        self.flags & FLAG_SAMPLED != 0
    }
}

/// Why a `traceparent` was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// More than one `traceparent` header field.
    Repeated,
    /// The value is empty (or only whitespace).
    Empty,
    /// Too short (or, for version 00, too long) for the format.
    Length,
    /// Version is not two hex digits, or is the forbidden `ff`.
    Version,
    /// A non-hex character in trace-id or parent-id.
    Hex,
    /// An uppercase hex digit anywhere (only lowercase is allowed).
    Uppercase,
    /// A `-` delimiter is missing or misplaced.
    Delimiter,
    /// trace-id is all zeroes.
    ZeroTraceId,
    /// parent-id is all zeroes.
    ZeroSpanId,
    /// trace-flags is not two hex digits.
    Flags,
    /// Data after the flags that is not allowed there (anything for version
    /// 00; anything not starting with `-` for higher versions).
    TrailingData,
}

impl Invalid {
    /// A short human reason, for a log line.
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            Invalid::Repeated => "more than one traceparent header",
            Invalid::Empty => "empty traceparent",
            Invalid::Length => "traceparent has the wrong length",
            Invalid::Version => "invalid traceparent version",
            Invalid::Hex => "non-hex character in traceparent id",
            Invalid::Uppercase => "uppercase hex in traceparent",
            Invalid::Delimiter => "misplaced or missing '-' in traceparent",
            Invalid::ZeroTraceId => "all-zero trace-id",
            Invalid::ZeroSpanId => "all-zero parent-id",
            Invalid::Flags => "invalid traceparent trace-flags",
            Invalid::TrailingData => "unexpected data after traceparent trace-flags",
        }
    }
}

impl core::fmt::Display for Invalid {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Strips leading and trailing OWS (space and horizontal tab).
pub(crate) fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// What each byte is worth as a lowercase hex digit: its value, or `UPPER` ('A' to 'F', which
/// W3C Trace Context refuses with a reason of their own) or `OTHER` (anything else).
const NIBBLE: [u8; 256] = {
    let mut table = [OTHER; 256];
    let mut c = 0;
    while c < 256 {
        table[c] = match c as u8 {
            b'0'..=b'9' => c as u8 - b'0',
            b'a'..=b'f' => c as u8 - b'a' + 10,
            b'A'..=b'F' => UPPER,
            _ => OTHER,
        };
        c += 1;
    }
    table
};
const UPPER: u8 = 0x10;
const OTHER: u8 = 0x20;

/// A byte that is not a lowercase hex digit, as `decode_lower_hex` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Refused {
    /// Where it is in the input.
    pub at: usize,
    /// An uppercase hex digit ('A' to 'F'), which the specifications name as a reason of its own.
    pub uppercase: bool,
}

/// Decodes lowercase hex `src` into `out`, two digits per byte (`src` must be twice as long as
/// `out`; shorter input fills only the bytes it covers). Used by every propagator that reads
/// hex IDs.
///
/// The IDs' own lengths (8 and 16 bytes) are read eight digits at a time (`hex_id`); other
/// lengths, and a refused ID (to say why), through a table, with one test of everything at the
/// end. On every request and fetch that carries a `traceparent`, its IDs cost about 570
/// instructions with a `match` per digit, 190 with the table, about 60 eight digits at a time.
///
/// Forced inline (in optimized builds): where the caller's lengths are constants, only the path
/// they take remains.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn decode_lower_hex(src: &[u8], out: &mut [u8]) -> Result<(), Refused> {
    debug_assert_eq!(src.len(), out.len() * 2);
    // (Matches, not `is_ok_and` with a closure: the compiler kept that out of line.)
    let read_by_words = if let Ok(id) = <&mut [u8; 16]>::try_from(&mut *out) {
        hex_id::<32, 16>(src, id)
    } else if let Ok(id) = <&mut [u8; 8]>::try_from(&mut *out) {
        hex_id::<16, 8>(src, id)
    } else {
        false
    };
    if read_by_words {
        return Ok(());
    }
    decode_by_table(src, out)
}

/// `decode_lower_hex` for other lengths, and for a refused ID (which digit, and why).
fn decode_by_table(src: &[u8], out: &mut [u8]) -> Result<(), Refused> {
    let mut refused = 0u8;
    for (pair, o) in src.chunks_exact(2).zip(out.iter_mut()) {
        let (hi, lo) = (NIBBLE[usize::from(pair[0])], NIBBLE[usize::from(pair[1])]);
        refused |= hi | lo;
        *o = (hi << 4) | (lo & 0x0f);
    }
    if refused & (UPPER | OTHER) == 0 {
        return Ok(());
    }
    let at = src.iter().position(|&c| NIBBLE[usize::from(c)] & (UPPER | OTHER) != 0).unwrap_or(0);
    Err(Refused { at, uppercase: NIBBLE[usize::from(src[at])] == UPPER })
}

/// An ID of `B` bytes from its `D` (`2 * B`, a multiple of eight) lowercase hex digits, eight
/// at a time; false if `src` is not that (the bytes are then meaningless: the table path tells
/// why). Forced inline with constant lengths, so that the loop unrolls (a loop over any length,
/// tried first, was slower than the table).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn hex_id<const D: usize, const B: usize>(src: &[u8], out: &mut [u8; B]) -> bool {
    const { assert!(D == 2 * B && D % 8 == 0) };
    let Ok(src) = <&[u8; D]>::try_from(src) else { return false };
    let mut valid = true;
    for i in 0..D / 8 {
        let mut word = [0u8; 8];
        word.copy_from_slice(&src[8 * i..8 * i + 8]);
        let (bytes, ok) = four_bytes_from_hex(u64::from_le_bytes(word));
        out[4 * i..4 * i + 4].copy_from_slice(&bytes.to_le_bytes());
        valid &= ok;
    }
    valid
}

/// Four bytes from eight lowercase hex digits, the first digit in the lowest byte of `v` (as
/// `u64::from_le_bytes` reads them), and whether all eight were lowercase hex digits (if not,
/// the bytes are meaningless). A few operations on the whole word: each range test adds or
/// subtracts a constant per byte and reads the byte's top bit, which no carry or borrow can
/// cross while every byte is below 0x80 (checked too).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn four_bytes_from_hex(v: u64) -> (u32, bool) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES * 0x80;
    let at_least = |c: u8| v.wrapping_add(ONES * (0x80 - u64::from(c))) & HIGH;
    let at_most = |c: u8| (ONES * (0x80 + u64::from(c))).wrapping_sub(v) & HIGH;
    let digit = at_least(b'0') & at_most(b'9');
    let letter = at_least(b'a') & at_most(b'f');
    let valid = v & HIGH == 0 && digit | letter == HIGH;
    // '0'-'9' are 0x30-0x39 and 'a'-'f' 0x61-0x66: the low four bits, plus 9 for a letter.
    let nibbles = (v & (ONES * 0x0f)) + (letter >> 7) * 9;
    // Byte i: digit i in its high half, digit i + 1 in its low half; the even bytes are the
    // output, gathered into the low four.
    let pairs = ((nibbles << 4) | (nibbles >> 8)) & 0x00ff_00ff_00ff_00ff;
    let quads = (pairs | (pairs >> 8)) & 0x0000_ffff_0000_ffff;
    ((quads | (quads >> 16)) as u32, valid)
}

/// A hex digit read the plain way, the tests' reference for `decode_lower_hex`: its value, or
/// why it is refused (`Err(true)`: an uppercase digit; `Err(false)`: anything else).
#[cfg(test)]
pub(crate) fn reference_digit(c: u8) -> Result<u8, bool> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Err(true),
        _ => Err(false),
    }
}

/// Decodes lowercase hex `src` into `out` (`src.len()` must be `2 * out.len()`,
/// which all callers guarantee through fixed slice bounds). Forced inline like
/// `decode_lower_hex`, so that `parse_value`'s constant lengths reach it.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn decode(src: &[u8], out: &mut [u8], other: Invalid) -> Result<(), Invalid> {
    if src.len() != out.len() * 2 {
        return Err(Invalid::Length);
    }
    decode_lower_hex(src, out).map_err(|r| {
        // The first refused pair says why: anything but hex in it, else an uppercase digit.
        let pair = r.at & !1;
        if src[pair..pair + 2].iter().any(|&c| NIBBLE[usize::from(c)] == OTHER) {
            other
        } else {
            Invalid::Uppercase
        }
    })
}

/// Parses the `traceparent` header.
///
/// `fields`: every value of every `traceparent` header field of the request,
/// in order (Varnish gives us each field separately).
///
/// Returns `Ok(None)` when there is no field at all, `Ok(Some(_))` for a
/// valid context, and `Err(_)` when the caller must restart the trace (and
/// then also ignore `tracestate`).
///
/// # Errors
///
/// [`Invalid::Repeated`] when there is more than one field, otherwise the
/// first problem [`parse_value`] finds.
pub fn parse(fields: &[&[u8]]) -> Result<Option<ParentContext>, Invalid> {
    match fields {
        [] => Ok(None),
        [one] => parse_value(one).map(Some),
        _ => Err(Invalid::Repeated),
    }
}

/// Parses a single `traceparent` field value.
///
/// Leading and trailing OWS (space, horizontal tab) are ignored. Version 00
/// must be exactly 55 characters; a higher version must be at least 55, and
/// anything after the first 55 must start with `-` (and is then ignored).
///
/// # Errors
///
/// The first [`Invalid`] reason found; the checks are length, version,
/// delimiters, trailing data, hex digits of the ids and flags, then zero ids.
pub fn parse_value(value: &[u8]) -> Result<ParentContext, Invalid> {
    let s = trim_ows(value);
    if s.is_empty() {
        return Err(Invalid::Empty);
    }
    if s.len() < LEN {
        return Err(Invalid::Length);
    }

    let mut version = [0u8; 1];
    decode(&s[0..2], &mut version, Invalid::Version)?;
    let version = version[0];
    if version == 0xff {
        return Err(Invalid::Version);
    }

    if s[2] != b'-' || s[35] != b'-' || s[52] != b'-' {
        return Err(Invalid::Delimiter);
    }

    if s.len() > LEN && (version == 0 || s[LEN] != b'-') {
        return Err(Invalid::TrailingData);
    }

    let mut trace_id = [0u8; 16];
    decode(&s[3..35], &mut trace_id, Invalid::Hex)?;
    let mut span_id = [0u8; 8];
    decode(&s[36..52], &mut span_id, Invalid::Hex)?;
    let mut flags = [0u8; 1];
    decode(&s[53..55], &mut flags, Invalid::Flags)?;

    if trace_id == [0u8; 16] {
        return Err(Invalid::ZeroTraceId);
    }
    if span_id == [0u8; 8] {
        return Err(Invalid::ZeroSpanId);
    }

    Ok(ParentContext { trace_id, span_id, flags: flags[0] })
}

/// Each byte's two lowercase hex digits.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut table = [[0u8; 2]; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = [HEX[b >> 4], HEX[b & 0x0f]];
        b += 1;
    }
    table
};

/// Writes `bytes` as lowercase hex into `out`, two characters per byte (one table lookup per
/// byte: about half the instructions of two, callgrind).
///
/// `out` should be at least `2 * bytes.len()` long; if it is shorter, only the
/// bytes that fit completely are written (never panics). Bytes of `out` past
/// `2 * bytes.len()` are left untouched.
#[inline]
pub fn hex_lower(bytes: &[u8], out: &mut [u8]) {
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(*b)]);
    }
}

/// Formats version 00: `"00-<32 hex>-<16 hex>-<2 hex>"`; returns the 55 bytes
/// (always ASCII, so `core::str::from_utf8` on it cannot fail).
#[must_use]
pub fn format(trace_id: &[u8; 16], span_id: &[u8; 8], flags: u8) -> [u8; LEN] {
    let mut out = [b'-'; LEN];
    out[0] = b'0';
    out[1] = b'0';
    hex_lower(trace_id, &mut out[3..35]);
    hex_lower(span_id, &mut out[36..52]);
    hex_lower(&[flags], &mut out[53..55]);
    out
}

impl ParentContext {
    /// This context formatted as a version 00 `traceparent` value.
    #[must_use]
    pub fn format(&self) -> [u8; LEN] {
        format(&self.trace_id, &self.span_id, self.flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-12345678901234567890123456789012-1234567890123456-01";
    const TRACE_ID: [u8; 16] =
        [0x12, 0x34, 0x56, 0x78, 0x90, 0x12, 0x34, 0x56, 0x78, 0x90, 0x12, 0x34, 0x56, 0x78, 0x90, 0x12];
    const SPAN_ID: [u8; 8] = [0x12, 0x34, 0x56, 0x78, 0x90, 0x12, 0x34, 0x56];

    fn one(s: &str) -> Result<Option<ParentContext>, Invalid> {
        parse(&[s.as_bytes()])
    }

    fn ok(s: &str) -> ParentContext {
        match one(s) {
            Ok(Some(ctx)) => ctx,
            other => panic!("expected valid for {s:?}, got {other:?}"),
        }
    }

    fn err(s: &str) -> Invalid {
        match one(s) {
            Err(e) => e,
            other => panic!("expected invalid for {s:?}, got {other:?}"),
        }
    }

    // --- basics -----------------------------------------------------------

    #[test]
    fn no_field_is_none() {
        assert_eq!(parse(&[]), Ok(None));
    }

    #[test]
    fn valid_v00() {
        let ctx = ok(VALID);
        assert_eq!(ctx.trace_id, TRACE_ID);
        assert_eq!(ctx.span_id, SPAN_ID);
        assert_eq!(ctx.flags, 0x01);
        assert!(ctx.sampled());
    }

    #[test]
    fn not_sampled() {
        let ctx = ok("00-12345678901234567890123456789012-1234567890123456-00");
        assert_eq!(ctx.flags, 0);
        assert!(!ctx.sampled());
    }

    #[test]
    fn v00_keeps_unknown_flag_bits() {
        // Version 00 accepts any flags byte; unknown bits are kept for the caller.
        let ctx = ok("00-12345678901234567890123456789012-1234567890123456-ff");
        assert_eq!(ctx.flags, 0xff);
        assert!(ctx.sampled());
        let ctx = ok("00-12345678901234567890123456789012-1234567890123456-fe");
        assert_eq!(ctx.flags, 0xfe);
        assert!(!ctx.sampled());
    }

    // --- test_traceparent_duplicated -------------------------------------

    #[test]
    fn duplicated_is_invalid() {
        let a = b"00-12345678901234567890123456789011-1234567890123456-01";
        let b = b"00-12345678901234567890123456789012-1234567890123456-01";
        assert_eq!(parse(&[a, b]), Err(Invalid::Repeated));
        // Even two identical fields.
        assert_eq!(parse(&[b, b]), Err(Invalid::Repeated));
        // Even if one of them is empty.
        assert_eq!(parse(&[b"", b]), Err(Invalid::Repeated));
    }

    // --- test_traceparent_version_0x00 -----------------------------------

    #[test]
    fn v00_trailing_data_is_invalid() {
        assert_eq!(err("00-12345678901234567890123456789012-1234567890123456-01."), Invalid::TrailingData);
        assert_eq!(
            err("00-12345678901234567890123456789012-1234567890123456-01-what-the-future-will-be-like"),
            Invalid::TrailingData
        );
    }

    // --- test_traceparent_version_0xcc -----------------------------------

    #[test]
    fn future_version_exact_length() {
        let ctx = ok("cc-12345678901234567890123456789012-1234567890123456-01");
        assert_eq!(ctx.trace_id, TRACE_ID);
        assert_eq!(ctx.span_id, SPAN_ID);
        assert_eq!(ctx.flags, 0x01);
    }

    #[test]
    fn future_version_with_extra_data() {
        let ctx = ok("cc-12345678901234567890123456789012-1234567890123456-01-what-the-future-will-be-like");
        assert_eq!(ctx.trace_id, TRACE_ID);
        assert_eq!(ctx.span_id, SPAN_ID);
        // A lone trailing '-' is also "-" followed by (empty) future data.
        assert_eq!(ok("01-12345678901234567890123456789012-1234567890123456-01-").trace_id, TRACE_ID);
    }

    #[test]
    fn future_version_bad_extra_data() {
        assert_eq!(
            err("cc-12345678901234567890123456789012-1234567890123456-01.what-the-future-will-be-like"),
            Invalid::TrailingData
        );
        // A third flags digit is not a delimiter either.
        assert_eq!(err("cc-12345678901234567890123456789012-1234567890123456-011"), Invalid::TrailingData);
    }

    #[test]
    fn future_version_keeps_full_flags() {
        let ctx = ok("fe-12345678901234567890123456789012-1234567890123456-0b");
        assert_eq!(ctx.flags, 0x0b);
    }

    #[test]
    fn future_version_still_validates_prefix() {
        assert_eq!(err("cc-00000000000000000000000000000000-1234567890123456-01"), Invalid::ZeroTraceId);
        assert_eq!(err("cc-12345678901234567890123456789012-1234567890123456-0g-x"), Invalid::Flags);
    }

    // --- test_traceparent_version_0xff -----------------------------------

    #[test]
    fn version_ff_is_invalid() {
        assert_eq!(err("ff-12345678901234567890123456789012-1234567890123456-01"), Invalid::Version);
        assert_eq!(err("ff-12345678901234567890123456789012-1234567890123456-01-x"), Invalid::Version);
    }

    // --- test_traceparent_version_illegal_characters ---------------------

    #[test]
    fn version_illegal_characters() {
        assert_eq!(err(".0-12345678901234567890123456789012-1234567890123456-01"), Invalid::Version);
        assert_eq!(err("0.-12345678901234567890123456789012-1234567890123456-01"), Invalid::Version);
        assert_eq!(err("0g-12345678901234567890123456789012-1234567890123456-01"), Invalid::Version);
    }

    // --- test_traceparent_version_too_long / too_short -------------------

    #[test]
    fn version_too_long() {
        assert_eq!(err("000-12345678901234567890123456789012-1234567890123456-01"), Invalid::Delimiter);
        assert_eq!(err("0000-12345678901234567890123456789012-1234567890123456-01"), Invalid::Delimiter);
    }

    #[test]
    fn version_too_short() {
        assert_eq!(err("0-12345678901234567890123456789012-1234567890123456-01"), Invalid::Length);
    }

    // --- uppercase ---------------------------------------------------------

    #[test]
    fn uppercase_is_invalid() {
        assert_eq!(err("0A-12345678901234567890123456789012-1234567890123456-01"), Invalid::Uppercase);
        assert_eq!(err("00-1234567890123456789012345678901A-1234567890123456-01"), Invalid::Uppercase);
        assert_eq!(err("00-12345678901234567890123456789012-123456789012345F-01"), Invalid::Uppercase);
        assert_eq!(err("00-12345678901234567890123456789012-1234567890123456-0A"), Invalid::Uppercase);
        assert_eq!(err("00-ABCDEF78901234567890123456789012-1234567890123456-01"), Invalid::Uppercase);
    }

    // --- test_traceparent_trace_id_* ---------------------------------------

    #[test]
    fn trace_id_all_zero() {
        assert_eq!(err("00-00000000000000000000000000000000-1234567890123456-01"), Invalid::ZeroTraceId);
    }

    #[test]
    fn trace_id_illegal_characters() {
        assert_eq!(err("00-.2345678901234567890123456789012-1234567890123456-01"), Invalid::Hex);
        assert_eq!(err("00-1234567890123456789012345678901.-1234567890123456-01"), Invalid::Hex);
        assert_eq!(err("00-1234567890123456789012345678901g-1234567890123456-01"), Invalid::Hex);
    }

    #[test]
    fn trace_id_too_long() {
        assert_eq!(err("00-123456789012345678901234567890123-1234567890123456-01"), Invalid::Delimiter);
    }

    #[test]
    fn trace_id_too_short() {
        assert_eq!(err("00-1234567890123456789012345678901-1234567890123456-01"), Invalid::Length);
    }

    // --- test_traceparent_parent_id_* --------------------------------------

    #[test]
    fn parent_id_all_zero() {
        assert_eq!(err("00-12345678901234567890123456789012-0000000000000000-01"), Invalid::ZeroSpanId);
    }

    #[test]
    fn parent_id_illegal_characters() {
        assert_eq!(err("00-12345678901234567890123456789012-.234567890123456-01"), Invalid::Hex);
        assert_eq!(err("00-12345678901234567890123456789012-123456789012345.-01"), Invalid::Hex);
    }

    #[test]
    fn parent_id_too_long() {
        assert_eq!(err("00-12345678901234567890123456789012-12345678901234567-01"), Invalid::Delimiter);
    }

    #[test]
    fn parent_id_too_short() {
        assert_eq!(err("00-12345678901234567890123456789012-123456789012345-01"), Invalid::Length);
    }

    // --- test_traceparent_trace_flags_* ------------------------------------

    #[test]
    fn trace_flags_illegal_characters() {
        assert_eq!(err("00-12345678901234567890123456789012-1234567890123456-.0"), Invalid::Flags);
        assert_eq!(err("00-12345678901234567890123456789012-1234567890123456-0."), Invalid::Flags);
        assert_eq!(err("00-12345678901234567890123456789012-1234567890123456-0x"), Invalid::Flags);
    }

    #[test]
    fn trace_flags_too_long() {
        assert_eq!(err("00-12345678901234567890123456789012-1234567890123456-001"), Invalid::TrailingData);
    }

    #[test]
    fn trace_flags_too_short() {
        assert_eq!(err("00-12345678901234567890123456789012-1234567890123456-1"), Invalid::Length);
    }

    // --- delimiters ----------------------------------------------------------

    #[test]
    fn wrong_delimiters() {
        assert_eq!(err("00_12345678901234567890123456789012-1234567890123456-01"), Invalid::Delimiter);
        assert_eq!(err("00-12345678901234567890123456789012_1234567890123456-01"), Invalid::Delimiter);
        assert_eq!(err("00-12345678901234567890123456789012-1234567890123456_01"), Invalid::Delimiter);
        assert_eq!(err("00 12345678901234567890123456789012 1234567890123456 01"), Invalid::Delimiter);
        // Delimiter shifted: short trace-id padded by a long parent-id.
        assert_eq!(err("00-1234567890123456789012345678901-21234567890123456-01"), Invalid::Delimiter);
    }

    // --- test_traceparent_ows_handling --------------------------------------

    #[test]
    fn ows_handling() {
        for s in [
            " 00-12345678901234567890123456789012-1234567890123456-01",
            "\t00-12345678901234567890123456789012-1234567890123456-01",
            "00-12345678901234567890123456789012-1234567890123456-01 ",
            "00-12345678901234567890123456789012-1234567890123456-01\t",
            "\t 00-12345678901234567890123456789012-1234567890123456-01 \t",
        ] {
            assert_eq!(ok(s).trace_id, TRACE_ID, "{s:?}");
        }
    }

    #[test]
    fn only_ows_is_ows() {
        // CR, LF, NUL, vertical tab and NBSP are not OWS.
        for s in [
            "\r00-12345678901234567890123456789012-1234567890123456-01",
            "00-12345678901234567890123456789012-1234567890123456-01\n",
            "00-12345678901234567890123456789012-1234567890123456-01\0",
            "\x0b00-12345678901234567890123456789012-1234567890123456-01",
        ] {
            assert!(one(s).is_err(), "{s:?}");
        }
        assert!(parse(&[b"\xa000-12345678901234567890123456789012-1234567890123456-01"]).is_err());
        // Whitespace inside is never stripped.
        assert_eq!(err("00-12345678901234567890123456789012 -1234567890123456-01"), Invalid::Delimiter);
    }

    #[test]
    fn empty_and_blank() {
        assert_eq!(err(""), Invalid::Empty);
        assert_eq!(err(" \t "), Invalid::Empty);
        assert_eq!(err("00"), Invalid::Length);
    }

    // --- header names ------------------------------------------------------
    // test_traceparent_header_name(_valid_casing) is about header-name
    // matching, which Varnish does case-insensitively before calling us.

    // --- robustness ---------------------------------------------------------

    #[test]
    fn every_single_byte_mutation_is_handled() {
        // Replace each position by every byte value: must never panic, and a
        // result can only be valid if the mutation kept the grammar.
        let base = VALID.as_bytes();
        let mut valid = 0usize;
        for i in 0..base.len() {
            for b in 0..=255u8 {
                let mut v = base.to_vec();
                v[i] = b;
                if let Ok(Some(ctx)) = parse(&[&v]) {
                    valid += 1;
                    assert_eq!(&ctx.format()[2..], &v[2..], "mutation at {i} to {b:#x}");
                }
            }
        }
        // Valid: each of the 2 version and 50 id/flag positions with any of
        // the 16 lowercase hex digits ("ff" is unreachable from "00", and no
        // single digit can zero an id), plus the 3 delimiters left as '-'.
        assert_eq!(valid, 52 * 16 + 3);
    }

    #[test]
    fn every_truncation_and_extension_is_handled() {
        let base = b"cc-12345678901234567890123456789012-1234567890123456-01-future";
        for n in 0..=base.len() {
            let r = parse(&[&base[..n]]);
            match n {
                55 | 56.. => assert!(matches!(r, Ok(Some(_))), "{n}"),
                _ => assert!(r.is_err(), "{n}"),
            }
        }
        let base = VALID.as_bytes();
        for n in 0..base.len() {
            assert!(parse(&[&base[..n]]).is_err(), "{n}");
        }
    }

    #[test]
    fn invalid_reasons_have_text() {
        let all = [
            Invalid::Repeated,
            Invalid::Empty,
            Invalid::Length,
            Invalid::Version,
            Invalid::Hex,
            Invalid::Uppercase,
            Invalid::Delimiter,
            Invalid::ZeroTraceId,
            Invalid::ZeroSpanId,
            Invalid::Flags,
            Invalid::TrailingData,
        ];
        for (i, a) in all.iter().enumerate() {
            assert!(!a.as_str().is_empty());
            assert_eq!(a.to_string(), a.as_str());
            for b in &all[i + 1..] {
                assert_ne!(a.as_str(), b.as_str());
            }
        }
    }

    // --- format ----------------------------------------------------------------

    /// The table-driven `decode` against a digit-by-digit reading of the rule: every pair of
    /// bytes, and which refused pair decides the reason.
    #[test]
    fn decode_agrees_with_reading_digit_by_digit() {
        let digit = |c| reference_digit(c).map_err(|upper| if upper { Invalid::Uppercase } else { Invalid::Hex });
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                let want = match (digit(a), digit(b)) {
                    (Ok(h), Ok(l)) => Ok(h << 4 | l),
                    (Err(Invalid::Hex), _) | (_, Err(Invalid::Hex)) => Err(Invalid::Hex),
                    _ => Err(Invalid::Uppercase),
                };
                let mut out = [0u8];
                assert_eq!(decode(&[a, b], &mut out, Invalid::Hex).map(|()| out[0]), want, "{a:#x} {b:#x}");
            }
        }
        let mut out = [0u8; 3];
        assert_eq!(decode(b"0aAFzz", &mut out, Invalid::Hex), Err(Invalid::Uppercase), "uppercase first");
        assert_eq!(decode(b"0azzAF", &mut out, Invalid::Hex), Err(Invalid::Hex), "other first");
        assert_eq!(decode(b"0aff", &mut out, Invalid::Hex), Err(Invalid::Length));
    }

    /// `hex_id`, eight digits at a time, and `decode_lower_hex` with those lengths, against the
    /// digit-by-digit reading: every byte value at every position of 8, 16 and 32 digits, two
    /// refused digits anywhere, and random valid IDs.
    #[test]
    fn hex_id_agrees_with_reading_digit_by_digit() {
        fn check(src: &[u8]) {
            let reference = src.iter().map(|&c| reference_digit(c)).collect::<Result<Vec<u8>, bool>>();
            let want = reference.map(|d| d.chunks(2).map(|p| p[0] << 4 | p[1]).collect::<Vec<u8>>());
            let got = match src.len() {
                8 => {
                    let mut out = [0u8; 4];
                    hex_id::<8, 4>(src, &mut out).then(|| out.to_vec())
                }
                16 => {
                    let mut out = [0u8; 8];
                    hex_id::<16, 8>(src, &mut out).then(|| out.to_vec())
                }
                _ => {
                    let mut out = [0u8; 16];
                    hex_id::<32, 16>(src, &mut out).then(|| out.to_vec())
                }
            };
            assert_eq!(got, want.clone().ok(), "{:?}", String::from_utf8_lossy(src));
            // The shared decoder takes the same path for these lengths, and the table says why.
            let mut out = vec![0u8; src.len() / 2];
            let first_refused = src
                .iter()
                .enumerate()
                .find_map(|(at, &c)| reference_digit(c).err().map(|uppercase| Refused { at, uppercase }));
            let decoded = decode_lower_hex(src, &mut out).map(|()| out);
            assert_eq!(decoded, want.map_err(|_| first_refused.unwrap()), "{:?}", String::from_utf8_lossy(src));
        }
        let mut rng = fastrand::Rng::with_seed(5);
        let digits = b"0123456789abcdef";
        for len in [8, 16, 32] {
            let valid: Vec<u8> = (0..len).map(|_| digits[rng.usize(..16)]).collect();
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut src = valid.clone();
                    src[at] = b;
                    check(&src);
                }
            }
            for _ in 0..5000 {
                let mut src = valid.clone();
                let (i, j) = (rng.usize(..len), rng.usize(..len));
                (src[i], src[j]) = (rng.u8(..), rng.u8(..));
                check(&src);
                let random: Vec<u8> = (0..len).map(|_| digits[rng.usize(..16)]).collect();
                check(&random);
            }
        }
        // The wrong length is refused whatever the digits.
        assert!(!hex_id::<16, 8>(b"0123456789abcdef0", &mut [0u8; 8]));
        assert!(!hex_id::<16, 8>(b"0123456789abcde", &mut [0u8; 8]));
    }

    #[test]
    fn format_known_value() {
        assert_eq!(&format(&TRACE_ID, &SPAN_ID, 1), VALID.as_bytes());
        assert_eq!(&format(&[0xab; 16], &[0xcd; 8], 0xff), b"00-abababababababababababababababab-cdcdcdcdcdcdcdcd-ff");
    }

    #[test]
    fn format_round_trip() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
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
            trace_id[0] |= 1; // never all-zero
            span_id[0] |= 1;
            let flags = next() as u8;
            let out = format(&trace_id, &span_id, flags);
            let ctx = parse(&[&out]).unwrap().unwrap();
            assert_eq!(ctx, ParentContext { trace_id, span_id, flags });
            assert_eq!(ctx.format(), out);
        }
    }

    #[test]
    fn parse_format_round_trip_of_test_suite_value() {
        let ctx = ok(VALID);
        assert_eq!(&ctx.format(), VALID.as_bytes());
        // A future version is re-emitted as version 00 without the extra data.
        let ctx = ok("cc-12345678901234567890123456789012-1234567890123456-01-what-the-future-will-be-like");
        assert_eq!(&ctx.format(), VALID.as_bytes());
    }

    #[test]
    fn format_is_ascii() {
        let out = format(&[0xff; 16], &[0x00; 8], 0);
        let s = core::str::from_utf8(&out).unwrap();
        assert_eq!(s, "00-ffffffffffffffffffffffffffffffff-0000000000000000-00");
    }

    #[test]
    fn hex_lower_short_output_does_not_panic() {
        let mut out = [b'.'; 5];
        hex_lower(&[0x12, 0xab, 0xcd], &mut out);
        assert_eq!(&out, b"12ab.");
        let mut empty: [u8; 0] = [];
        hex_lower(&[1, 2, 3], &mut empty);
        let mut out = [b'.'; 4];
        hex_lower(&[0x0f], &mut out);
        assert_eq!(&out, b"0f..");
    }
}
