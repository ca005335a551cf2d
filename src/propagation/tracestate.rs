//! The `tracestate` header field (W3C Trace Context Level 1, section 3.3).
//!
//! ```text
//! list        = list-member 0*31( OWS "," OWS list-member )
//! list-member = key "=" value
//! key         = simple-key / multi-tenant-key
//! simple-key  = lcalpha 0*255( lcalpha / DIGIT / "_" / "-"/ "*" / "/" )
//! multi-tenant-key = tenant-id "@" system-id
//! tenant-id   = ( lcalpha / DIGIT ) 0*240( lcalpha / DIGIT / "_" / "-"/ "*" / "/" )
//! system-id   = lcalpha 0*13( lcalpha / DIGIT / "_" / "-"/ "*" / "/" )
//! value       = 0*255(chr) nblk-chr
//! chr         = %x20 / nblk-chr
//! nblk-chr    = %x21-2B / %x2D-3C / %x3E-7E
//! ```
//!
//! Empty list members are allowed and ignored. Repeated header fields are
//! combined with `,` (RFC 9110, section 5.3). Whenever the combined value is
//! invalid, the whole `tracestate` is dropped, as the test suite expects.

use super::traceparent::trim_ows;

/// Maximum number of list members.
pub const MAX_MEMBERS: usize = 32;
/// Maximum length of the combined value we forward (commas included, no OWS).
pub const MAX_LEN: usize = 512;
/// When truncating, members longer than this are dropped first.
pub const LONG_MEMBER: usize = 128;

/// Why a `tracestate` was rejected (the caller then drops it entirely).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceStateInvalid {
    /// A byte that is not printable ASCII (CR, LF, NUL, DEL, non-ASCII, or a
    /// tab that is not leading/trailing OWS of a member).
    NonPrintable,
    /// More than [`MAX_MEMBERS`] non-empty list members.
    TooManyMembers,
    /// A non-empty list member without `=`.
    MissingEquals,
    /// A key that does not match the key grammar.
    Key,
    /// A value that does not match the value grammar.
    Value,
    /// The same key appears more than once.
    DuplicateKey,
}

impl TraceStateInvalid {
    /// A short human reason, for a log line.
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            TraceStateInvalid::NonPrintable => "non-printable character in tracestate",
            TraceStateInvalid::TooManyMembers => "more than 32 tracestate list members",
            TraceStateInvalid::MissingEquals => "tracestate list member without '='",
            TraceStateInvalid::Key => "invalid tracestate key",
            TraceStateInvalid::Value => "invalid tracestate value",
            TraceStateInvalid::DuplicateKey => "duplicate tracestate key",
        }
    }
}

impl core::fmt::Display for TraceStateInvalid {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[inline]
fn is_lcalpha(b: u8) -> bool {
    b.is_ascii_lowercase()
}

#[inline]
fn is_key_char(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/')
}

#[inline]
fn is_nblk_chr(b: u8) -> bool {
    matches!(b, 0x21..=0x2b | 0x2d..=0x3c | 0x3e..=0x7e)
}

/// Whether `key` matches `simple-key / multi-tenant-key`.
#[must_use]
pub fn is_valid_key(key: &[u8]) -> bool {
    match key.iter().position(|&b| b == b'@') {
        None => match key {
            [first, rest @ ..] => is_lcalpha(*first) && rest.len() <= 255 && rest.iter().all(|&b| is_key_char(b)),
            [] => false,
        },
        Some(at) => {
            let (tenant, system) = (&key[..at], &key[at + 1..]);
            let tenant_ok = match tenant {
                [first, rest @ ..] => {
                    (is_lcalpha(*first) || first.is_ascii_digit())
                        && rest.len() <= 240
                        && rest.iter().all(|&b| is_key_char(b))
                }
                [] => false,
            };
            let system_ok = match system {
                [first, rest @ ..] => is_lcalpha(*first) && rest.len() <= 13 && rest.iter().all(|&b| is_key_char(b)),
                [] => false,
            };
            tenant_ok && system_ok
        }
    }
}

/// Whether `value` matches `0*255(chr) nblk-chr`.
#[must_use]
pub fn is_valid_value(value: &[u8]) -> bool {
    match value {
        [rest @ .., last] => {
            is_nblk_chr(*last) && rest.len() <= 255 && rest.iter().all(|&b| b == b' ' || is_nblk_chr(b))
        }
        [] => false,
    }
}

/// Combines all `tracestate` header fields (repeated fields are concatenated
/// with ',' as RFC 9110 allows) and validates them.
///
/// Returns `Ok(Some(normalised))` with a combined value safe to send
/// downstream (members joined by ',', OWS removed, empty members dropped,
/// truncated to [`MAX_LEN`] bytes by dropping whole members: first those
/// longer than [`LONG_MEMBER`], then from the end), `Ok(None)` when there are
/// no members (left), and `Err(reason)` when invalid: then the caller drops
/// tracestate entirely.
///
/// The caller must also drop `tracestate` when `traceparent` is missing or
/// invalid (W3C Trace Context, section 3.3).
///
/// # Errors
///
/// The first [`TraceStateInvalid`] reason found, in member order: a byte that
/// is not printable ASCII, a 33rd member, a member without `=`, a bad key, a
/// bad value, or a key already seen.
pub fn combine(fields: &[&[u8]]) -> Result<Option<String>, TraceStateInvalid> {
    // Validated members and the length of their key, without heap allocation.
    let mut members: [&[u8]; MAX_MEMBERS] = [&[]; MAX_MEMBERS];
    let mut key_lens = [0usize; MAX_MEMBERS];
    let mut n = 0usize;

    for field in fields {
        for raw in field.split(|&b| b == b',') {
            let member = trim_ows(raw);
            if member.is_empty() {
                continue;
            }
            if member.iter().any(|&b| !(0x20..=0x7e).contains(&b)) {
                return Err(TraceStateInvalid::NonPrintable);
            }
            if n == MAX_MEMBERS {
                return Err(TraceStateInvalid::TooManyMembers);
            }
            let eq = member.iter().position(|&b| b == b'=').ok_or(TraceStateInvalid::MissingEquals)?;
            let (key, value) = (&member[..eq], &member[eq + 1..]);
            if !is_valid_key(key) {
                return Err(TraceStateInvalid::Key);
            }
            if !is_valid_value(value) {
                return Err(TraceStateInvalid::Value);
            }
            let duplicate = members[..n].iter().zip(&key_lens[..n]).any(|(m, &kl)| m.get(..kl) == Some(key));
            if duplicate {
                return Err(TraceStateInvalid::DuplicateKey);
            }
            members[n] = member;
            key_lens[n] = eq;
            n += 1;
        }
    }

    let members = &members[..n];
    let mut keep = [true; MAX_MEMBERS];
    let mut kept = n;
    let mut total = members.iter().map(|m| m.len()).sum::<usize>() + n.saturating_sub(1);
    while total > MAX_LEN && kept > 0 {
        let victim = (0..n)
            .rev()
            .filter(|&i| keep[i])
            .find(|&i| members[i].len() > LONG_MEMBER)
            .or_else(|| (0..n).rev().find(|&i| keep[i]));
        let Some(i) = victim else { break };
        keep[i] = false;
        kept -= 1;
        // The member goes, and with it one comma unless it was the last one.
        total = total.saturating_sub(members[i].len() + usize::from(kept > 0));
    }

    if kept == 0 {
        return Ok(None);
    }
    let mut out = String::with_capacity(total);
    for (m, _) in members.iter().zip(keep).filter(|&(_, k)| k) {
        if !out.is_empty() {
            out.push(',');
        }
        // Every byte was checked to be printable ASCII, so `char::from` is exact.
        out.extend(m.iter().map(|&b| char::from(b)));
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(fields: &[&str]) -> Result<Option<String>, TraceStateInvalid> {
        let v: Vec<&[u8]> = fields.iter().map(|f| f.as_bytes()).collect();
        combine(&v)
    }

    fn some(fields: &[&str]) -> String {
        match c(fields) {
            Ok(Some(s)) => s,
            other => panic!("expected a value for {fields:?}, got {other:?}"),
        }
    }

    fn err(fields: &[&str]) -> TraceStateInvalid {
        match c(fields) {
            Err(e) => e,
            other => panic!("expected invalid for {fields:?}, got {other:?}"),
        }
    }

    /// Looks a key up in a normalised value, like the harness does.
    fn get<'a>(s: &'a str, key: &str) -> Option<&'a str> {
        s.split(',').find_map(|m| m.strip_prefix(key)?.strip_prefix('='))
    }

    // --- basics / test_tracestate_included_traceparent_included ----------

    #[test]
    fn no_fields_is_none() {
        assert_eq!(combine(&[]), Ok(None));
    }

    #[test]
    fn simple_members_kept_in_order() {
        assert_eq!(some(&["foo=1,bar=2"]), "foo=1,bar=2");
        assert_eq!(some(&["rojo=00f067aa0ba902b7"]), "rojo=00f067aa0ba902b7");
    }

    // --- test_tracestate_empty_header ----------------------------------------

    #[test]
    fn empty_header() {
        assert_eq!(c(&[""]), Ok(None));
        assert_eq!(c(&[" \t "]), Ok(None));
        assert_eq!(c(&[",, ,\t,"]), Ok(None));
        assert_eq!(c(&["", ""]), Ok(None));
        assert_eq!(some(&["foo=1", ""]), "foo=1");
        assert_eq!(some(&["", "foo=1"]), "foo=1");
        assert_eq!(some(&[",foo=1,,bar=2,"]), "foo=1,bar=2");
    }

    // --- test_tracestate_multiple_headers_different_keys -------------------

    #[test]
    fn multiple_fields_combined_in_order() {
        assert_eq!(some(&["foo=1,bar=2", "rojo=1,congo=2", "baz=3"]), "foo=1,bar=2,rojo=1,congo=2,baz=3");
    }

    #[test]
    fn members_may_not_span_fields() {
        // Fields are joined by ',', so a member is never glued across them.
        assert_eq!(err(&["foo", "=1"]), TraceStateInvalid::MissingEquals);
    }

    // --- test_tracestate_duplicated_keys ----------------------------------------

    #[test]
    fn duplicated_keys() {
        assert_eq!(err(&["foo=1,foo=1"]), TraceStateInvalid::DuplicateKey);
        assert_eq!(err(&["foo=1,foo=2"]), TraceStateInvalid::DuplicateKey);
        assert_eq!(err(&["foo=1", "foo=1"]), TraceStateInvalid::DuplicateKey);
        assert_eq!(err(&["foo=1", "foo=2"]), TraceStateInvalid::DuplicateKey);
        assert_eq!(err(&["a@b=1,x=2,a@b=3"]), TraceStateInvalid::DuplicateKey);
    }

    #[test]
    fn similar_keys_are_not_duplicates() {
        assert_eq!(some(&["foo=1,fo=2,foob=3,f@o=4"]), "foo=1,fo=2,foob=3,f@o=4");
    }

    // --- test_tracestate_all_allowed_characters --------------------------------

    fn all_value_chars() -> String {
        (0x20u8..=0x2b).chain(0x2d..=0x3c).chain(0x3e..=0x7e).map(char::from).collect()
    }

    #[test]
    fn all_allowed_characters() {
        let key_without_vendor = "abcdefghijklmnopqrstuvwxyz0123456789_-*/";
        let key_with_vendor = format!("{key_without_vendor}@a-z0-9_-*/");
        let value = all_value_chars();
        assert!(value.starts_with(' '), "value begins with a space");

        let member = format!("{key_without_vendor}={value}");
        let s = some(&[&member]);
        assert_eq!(s, member);
        assert_eq!(get(&s, key_without_vendor), Some(value.as_str()));

        let member = format!("{key_with_vendor}={value}");
        let s = some(&[&member]);
        assert_eq!(s, member);
        assert_eq!(get(&s, &key_with_vendor), Some(value.as_str()));
    }

    // --- test_tracestate_ows_handling ---------------------------------------------

    #[test]
    fn ows_handling() {
        assert_eq!(some(&["foo=1 \t , \t bar=2, \t baz=3"]), "foo=1,bar=2,baz=3");
        assert_eq!(some(&["foo=1\t \t,\t \tbar=2,\t \tbaz=3"]), "foo=1,bar=2,baz=3");
        for f in [" foo=1", "\tfoo=1", "foo=1 ", "foo=1\t", "\t foo=1 \t"] {
            assert_eq!(some(&[f]), "foo=1", "{f:?}");
        }
    }

    #[test]
    fn spaces_inside_values_are_kept() {
        assert_eq!(some(&["foo= a b ,bar=2"]), "foo= a b,bar=2");
        // A tab is not a value character.
        assert_eq!(err(&["foo=a\tb"]), TraceStateInvalid::NonPrintable);
    }

    // --- test_tracestate_key_illegal_characters -------------------------------------

    #[test]
    fn key_illegal_characters() {
        assert_eq!(err(&["foo =1"]), TraceStateInvalid::Key);
        assert_eq!(err(&["FOO=1"]), TraceStateInvalid::Key);
        assert_eq!(err(&["foo.bar=1"]), TraceStateInvalid::Key);
        assert_eq!(err(&["fOo=1"]), TraceStateInvalid::Key);
        assert_eq!(err(&["=1"]), TraceStateInvalid::Key);
        assert_eq!(err(&["_foo=1"]), TraceStateInvalid::Key);
        // A valid member before the bad one does not save the header.
        assert_eq!(err(&["bar=2,foo.bar=1"]), TraceStateInvalid::Key);
    }

    #[test]
    fn simple_key_must_start_with_lcalpha() {
        assert_eq!(err(&["0foo=1"]), TraceStateInvalid::Key);
        assert_eq!(err(&["-foo=1"]), TraceStateInvalid::Key);
        assert_eq!(some(&["a=1,z0_-*/=2"]), "a=1,z0_-*/=2");
    }

    // --- test_tracestate_key_illegal_vendor_format ---------------------------------

    #[test]
    fn key_illegal_vendor_format() {
        assert_eq!(err(&["foo@=1,bar=2"]), TraceStateInvalid::Key);
        assert_eq!(err(&["@foo=1,bar=2"]), TraceStateInvalid::Key);
        assert_eq!(err(&["foo@@bar=1,bar=2"]), TraceStateInvalid::Key);
        assert_eq!(err(&["foo@bar@baz=1,bar=2"]), TraceStateInvalid::Key);
        // system-id must start with lcalpha; tenant-id may start with a digit.
        assert_eq!(err(&["foo@0bar=1"]), TraceStateInvalid::Key);
        assert_eq!(some(&["0foo@bar=1"]), "0foo@bar=1");
        assert_eq!(err(&["_foo@bar=1"]), TraceStateInvalid::Key);
    }

    // --- test_tracestate_member_count_limit ----------------------------------------

    fn bars(range: core::ops::RangeInclusive<u32>) -> String {
        range.map(|i| format!("bar{i:02}={i:02}")).collect::<Vec<_>>().join(",")
    }

    #[test]
    fn member_count_limit() {
        let s = some(&[&bars(1..=10), &bars(11..=20), &bars(21..=30), &bars(31..=32)]);
        assert_eq!(s.split(',').count(), 32);
        assert_eq!(get(&s, "bar01"), Some("01"));
        assert_eq!(get(&s, "bar32"), Some("32"));

        assert_eq!(
            err(&[&bars(1..=10), &bars(11..=20), &bars(21..=30), &bars(31..=33)]),
            TraceStateInvalid::TooManyMembers
        );
    }

    #[test]
    fn empty_members_do_not_count() {
        let with_empties = format!(",,{},, ,\t,", bars(1..=32).replace(',', ",,"));
        let s = some(&[&with_empties, ""]);
        assert_eq!(s.split(',').count(), 32);
        assert_eq!(s, bars(1..=32));
    }

    // --- test_tracestate_key_length_limit ----------------------------------------------

    #[test]
    fn key_length_limit() {
        let k256 = format!("{}=1", "z".repeat(256));
        let s = some(&["foo=1", &k256]);
        assert_eq!(get(&s, "foo"), Some("1"));
        assert_eq!(s, format!("foo=1,{k256}"));

        let k257 = format!("{}=1", "z".repeat(257));
        assert_eq!(err(&["foo=1", &k257]), TraceStateInvalid::Key);

        let mt = format!("{}@{}=1", "t".repeat(241), "v".repeat(14));
        let s = some(&["foo=1", &mt]);
        assert_eq!(get(&s, "foo"), Some("1"));
        assert_eq!(s, format!("foo=1,{mt}"));

        let tenant242 = format!("{}@v=1", "t".repeat(242));
        assert_eq!(err(&["foo=1", &tenant242]), TraceStateInvalid::Key);

        let system15 = format!("t@{}=1", "v".repeat(15));
        assert_eq!(err(&["foo=1", &system15]), TraceStateInvalid::Key);
    }

    // --- test_tracestate_value_illegal_characters ---------------------------------------

    #[test]
    fn value_illegal_characters() {
        assert_eq!(err(&["foo=bar=baz"]), TraceStateInvalid::Value);
        assert_eq!(err(&["foo=,bar=3"]), TraceStateInvalid::Value);
        assert_eq!(err(&["foo= "]), TraceStateInvalid::Value);
        assert_eq!(err(&["foo"]), TraceStateInvalid::MissingEquals);
        assert_eq!(err(&["foo=1,bar"]), TraceStateInvalid::MissingEquals);
    }

    #[test]
    fn value_length_limit() {
        let v256 = format!("k={}", "v".repeat(256));
        assert_eq!(some(&[&v256]), v256);
        // 255 spaces then one visible character is the longest padded value.
        let padded = format!("k={}x", " ".repeat(255));
        assert_eq!(some(&[&padded]), padded);
        let v257 = format!("k={}", "v".repeat(257));
        assert_eq!(err(&[&v257]), TraceStateInvalid::Value);
    }

    // --- non-printable bytes --------------------------------------------------------------

    #[test]
    fn control_and_non_ascii_rejected() {
        for f in [
            "foo=1\r\nbar=2",
            "foo=1\r",
            "foo=1\n",
            "foo=1\0",
            "foo=\x01",
            "\0foo=1",
            "foo=1\x7f",
            "foo=1\x0b",
            "foo=caf\u{e9}",
            "k\u{e9}=1",
        ] {
            assert_eq!(err(&[f]), TraceStateInvalid::NonPrintable, "{f:?}");
        }
        assert_eq!(combine(&[b"foo=\xff"]), Err(TraceStateInvalid::NonPrintable));
        // In a later field too, and in an otherwise empty member.
        assert_eq!(err(&["foo=1", "\r"]), TraceStateInvalid::NonPrintable);
        assert_eq!(err(&["foo=1, \n ,bar=2"]), TraceStateInvalid::NonPrintable);
    }

    // --- truncation ------------------------------------------------------------------

    #[test]
    fn exactly_512_is_not_truncated() {
        // 8 members of 63 bytes + 7 commas = 511; make the last one 64 => 512.
        let mut members: Vec<String> = (0..7).map(|i| format!("k{i}={}", "v".repeat(60))).collect();
        members.push(format!("k7={}", "v".repeat(61)));
        let joined = members.join(",");
        assert_eq!(joined.len(), 512);
        assert_eq!(some(&[&joined]), joined);
    }

    #[test]
    fn truncation_drops_from_the_end() {
        // 9 members of 63 bytes: 9*63 + 8 = 575 > 512; dropping the last one
        // gives 8*63 + 7 = 511.
        let members: Vec<String> = (0..9).map(|i| format!("k{i}={}", "v".repeat(60))).collect();
        let joined = members.join(",");
        assert_eq!(joined.len(), 575);
        let s = some(&[&joined]);
        assert_eq!(s, members[..8].join(","));
        assert!(s.len() <= MAX_LEN);
    }

    #[test]
    fn truncation_drops_long_members_first() {
        // A 200-byte member early on, followed by small ones; total > 512.
        let long = format!("big={}", "x".repeat(196));
        assert_eq!(long.len(), 200);
        let small: Vec<String> = (0..6).map(|i| format!("s{i}={}", "y".repeat(60))).collect();
        let mut all = vec![small[0].clone(), long.clone()];
        all.extend(small[1..].iter().cloned());
        let joined = all.join(",");
        assert!(joined.len() > MAX_LEN);
        let s = some(&[&joined]);
        // The long one goes, all the small ones (6*63 + 5 = 383) stay.
        assert_eq!(s, small.join(","));
        assert_eq!(get(&s, "big"), None);
    }

    #[test]
    fn truncation_drops_last_long_member_first_then_from_end() {
        let long1 = format!("la={}", "a".repeat(200));
        let long2 = format!("lb={}", "b".repeat(200));
        let short: Vec<String> = (0..3).map(|i| format!("s{i}={}", "y".repeat(40))).collect();
        // 203 + 203 + 3*43 + 4 commas = 539 > 512: dropping lb suffices.
        let joined = [short[0].as_str(), &long1, &short[1], &long2, &short[2]].join(",");
        assert_eq!(joined.len(), 539);
        let s = some(&[&joined]);
        assert_eq!(s, [short[0].as_str(), &long1, &short[1], &short[2]].join(","));
        assert!(s.len() <= MAX_LEN);
    }

    #[test]
    fn truncation_can_drop_everything() {
        // 256-char key + '=' + 256-char value: one member of 513 bytes.
        let m = format!("{}={}", "k".repeat(256), "v".repeat(256));
        assert_eq!(m.len(), 513);
        assert_eq!(c(&[&m]), Ok(None));
        // With a small member after it, the small one survives.
        assert_eq!(some(&[&m, "foo=1"]), "foo=1");
    }

    #[test]
    fn truncation_ignores_ows_and_empty_members() {
        // 512 bytes once normalised, but much longer as received.
        let mut members: Vec<String> = (0..7).map(|i| format!("k{i}={}", "v".repeat(60))).collect();
        members.push(format!("k7={}", "v".repeat(61)));
        let padded = members.join(" \t , , ");
        assert!(padded.len() > MAX_LEN);
        assert_eq!(some(&[&padded]), members.join(","));
    }

    // --- grammar helpers -------------------------------------------------------------

    #[test]
    fn key_grammar_boundaries() {
        assert!(is_valid_key(b"a"));
        assert!(is_valid_key("a".repeat(256).as_bytes()));
        assert!(!is_valid_key("a".repeat(257).as_bytes()));
        assert!(is_valid_key(b"0@a"));
        assert!(is_valid_key(format!("{}@{}", "0".repeat(241), "a".repeat(14)).as_bytes()));
        assert!(!is_valid_key(b""));
        assert!(!is_valid_key(b"@"));
        assert!(!is_valid_key(b"a@"));
        assert!(!is_valid_key(b"@a"));
        assert!(!is_valid_key(b"a@A"));
        assert!(!is_valid_key(b"a b"));
    }

    #[test]
    fn value_grammar_boundaries() {
        assert!(is_valid_value(b"x"));
        assert!(is_valid_value(b" x"));
        assert!(!is_valid_value(b""));
        assert!(!is_valid_value(b"x "));
        assert!(!is_valid_value(b","));
        assert!(!is_valid_value(b"a=b"));
        assert!(!is_valid_value(b"\x7f"));
    }

    #[test]
    fn invalid_reasons_have_text() {
        let all = [
            TraceStateInvalid::NonPrintable,
            TraceStateInvalid::TooManyMembers,
            TraceStateInvalid::MissingEquals,
            TraceStateInvalid::Key,
            TraceStateInvalid::Value,
            TraceStateInvalid::DuplicateKey,
        ];
        for (i, a) in all.iter().enumerate() {
            assert!(!a.as_str().is_empty());
            assert_eq!(a.to_string(), a.as_str());
            for b in &all[i + 1..] {
                assert_ne!(a.as_str(), b.as_str());
            }
        }
    }

    // --- robustness -----------------------------------------------------------------

    #[test]
    fn random_input_never_panics_and_output_is_stable() {
        // Fields built from plausible pieces, then sometimes corrupted.
        const KEYS: &[&str] = &["a", "b", "c", "k0", "x@y", "0t@s", "z_-*/"];
        const BAD_KEYS: &[&str] = &["A", "a@", "@b", "a b", "", "0"];
        const VALUES: &[&str] = &["1", " 2", "~!", "long", "long"];
        const BAD_VALUES: &[&str] = &["v=w", "", "\t", "\r"];
        const SEPS: &[&str] = &[",", ", ", " ,\t", ",,", "\t,\t,"];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut accepted, mut rejected, mut truncated) = (0, 0, 0);
        for _ in 0..20_000 {
            let nfields = (next() % 4) as usize;
            let mut fields: Vec<Vec<u8>> = Vec::new();
            for _ in 0..nfields {
                let mut f = String::new();
                for _ in 0..(next() % 12) {
                    let keys = if next() % 40 == 0 { BAD_KEYS } else { KEYS };
                    let key = keys[(next() % keys.len() as u64) as usize];
                    let values = if next() % 40 == 0 { BAD_VALUES } else { VALUES };
                    let mut value = values[(next() % values.len() as u64) as usize].to_string();
                    if value == "long" {
                        value = "l".repeat((next() % 300) as usize + 1);
                    }
                    let tag = next() % 1000;
                    f.push_str(&format!("{key}{tag}={value}"));
                    f.push_str(SEPS[(next() % SEPS.len() as u64) as usize]);
                }
                let mut f = f.into_bytes();
                if !f.is_empty() && next() % 8 == 0 {
                    let at = (next() % f.len() as u64) as usize;
                    f[at] = next() as u8;
                }
                fields.push(f);
            }
            let refs: Vec<&[u8]> = fields.iter().map(|f| f.as_slice()).collect();
            match combine(&refs) {
                Ok(Some(s)) => {
                    accepted += 1;
                    let input_members: usize =
                        refs.iter().map(|f| f.split(|&b| b == b',').filter(|m| !trim_ows(m).is_empty()).count()).sum();
                    if s.split(',').count() < input_members {
                        truncated += 1;
                    }
                    assert!(s.len() <= MAX_LEN);
                    assert!(!s.starts_with(',') && !s.ends_with(','));
                    assert!(!s.contains(",,") && !s.contains('\t'));
                    assert!(s.split(',').count() <= MAX_MEMBERS);
                    // Normalised output is a fixed point.
                    assert_eq!(combine(&[s.as_bytes()]), Ok(Some(s.clone())));
                }
                Ok(None) => {}
                Err(_) => rejected += 1,
            }
        }
        assert!(accepted > 1000, "too few accepted: {accepted}");
        assert!(rejected > 1000, "too few rejected: {rejected}");
        assert!(truncated > 100, "too few truncated: {truncated}");
    }

    #[test]
    fn huge_input_is_bounded() {
        // Many empty members are fine; many real members are rejected early.
        let commas = ",".repeat(100_000);
        assert_eq!(some(&[&commas, "a=1", &commas]), "a=1");
        let many = "a=1,".repeat(100_000);
        assert_eq!(err(&[&many]), TraceStateInvalid::DuplicateKey);
        let distinct = bars(1..=99);
        assert_eq!(err(&[&distinct]), TraceStateInvalid::TooManyMembers);
    }
}
