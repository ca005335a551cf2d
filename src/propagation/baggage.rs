//! The `baggage` header field (W3C Baggage, "Propagation format for
//! distributed context: Baggage", w3.org/TR/baggage).
//!
//! ```text
//! baggage-string = list-member 0*179( OWS "," OWS list-member )
//! list-member    = key OWS "=" OWS value *( OWS ";" OWS property )
//! property       = key OWS "=" OWS value
//! property       =/ key OWS
//! key            = token                  ; RFC 7230, section 3.2.6
//! value          = *baggage-octet
//! baggage-octet  = %x21 / %x23-2B / %x2D-3A / %x3C-5B / %x5D-7E
//! ```
//!
//! Choices, each covered by a test:
//!
//! * Repeated fields are combined with `,` ("the limits apply to the
//!   combination of all baggage headers"); a member never spans two fields.
//!   Empty list members (`a=1,,b=2`, blank fields) are ignored, as RFC 9110
//!   asks of list recipients.
//! * An invalid list member is dropped on its own and the others are kept.
//!   The spec leaves this open ("it MAY remove an offending list-member
//!   before propagating the rest ... or MAY decide to not propagate the
//!   baggage-string at all"); the OpenTelemetry baggage propagators of Rust,
//!   Java, JavaScript and Python skip the bad member (Go drops everything).
//!   A member is invalid when it has no `=`, its key is not a token, its value
//!   has a byte that is not a baggage-octet (a raw space, `"`, `\`, a control
//!   or non-ASCII byte), or a property is malformed (this includes an empty
//!   property, as in `k=v;`).
//! * Limits: up to [`MAX_MEMBERS`] (64) members and [`MAX_LEN`] (8192) bytes of
//!   the forwarded baggage-string are always kept, which is what the spec
//!   requires; beyond that it allows dropping whole members, chosen freely.
//!   Members are taken in order and one that would exceed either limit is
//!   dropped (a later, smaller one may still fit). Never a partial member.
//! * Values (and property values) are kept as received (percent-encoded) for
//!   forwarding, and percent-decoded for reading ([`Baggage::get`]):
//!   sequences that are not UTF-8 become U+FFFD (spec: MUST), a `%` not
//!   followed by two hex digits stays as it is, `+` is not a space.
//! * Keys are case-sensitive and never decoded (`%` is a token character).
//!   Duplicate keys are kept in order and forwarded; [`Baggage::get`] returns
//!   the last one, as OpenTelemetry does ("last one wins").
//! * The forwarded form ([`Baggage::to_header`]) is normalised: members joined
//!   by `,`, no OWS around `,`, `;` or `=`. Values set with [`Baggage::set`]
//!   are percent-encoded where they must be: bytes outside baggage-octet, and
//!   `%` itself.

use std::borrow::Cow;

use super::traceparent::trim_ows;

/// The header name.
pub const HEADER: &str = "baggage";
/// Members always kept (spec minimum), and the most we forward.
pub const MAX_MEMBERS: usize = 64;
/// Bytes of the forwarded baggage-string always kept, and the most we forward.
pub const MAX_LEN: usize = 8192;

/// Why a list member was dropped, or [`Baggage::set`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// A non-empty list member without `=`.
    MissingEquals,
    /// A key that is not a token.
    Key,
    /// A value with a byte that is not a baggage-octet.
    Value,
    /// A malformed property.
    Property,
    /// The entry would exceed [`MAX_MEMBERS`] or [`MAX_LEN`] (only from [`Baggage::set`]).
    Limit,
}

impl Invalid {
    /// A short human reason, for a log line.
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            Invalid::MissingEquals => "baggage list member without '='",
            Invalid::Key => "invalid baggage key",
            Invalid::Value => "invalid baggage value",
            Invalid::Property => "invalid baggage property",
            Invalid::Limit => "baggage would exceed 64 members or 8192 bytes",
        }
    }
}

impl core::fmt::Display for Invalid {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether `b` is a token character (RFC 7230, section 3.2.6).
#[inline]
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether `s` is an RFC 7230 token (one or more token characters): baggage keys, and the header
/// names of our settings.
#[must_use]
pub fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// Whether `b` is a baggage-octet.
#[inline]
#[must_use]
pub fn is_baggage_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e)
}

#[inline]
fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes `s` (RFC 3986, section 2.1). A `%` not followed by two hex
/// digits is kept literally; bytes that are not UTF-8 after decoding become
/// U+FFFD. Borrows when nothing changes.
pub(crate) fn percent_decode(s: &[u8]) -> Cow<'_, str> {
    if !s.contains(&b'%') {
        return String::from_utf8_lossy(s);
    }
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while let Some(&b) = s.get(i) {
        if b == b'%' {
            if let (Some(hi), Some(lo)) =
                (s.get(i + 1).and_then(|&c| hex_value(c)), s.get(i + 2).and_then(|&c| hex_value(c)))
            {
                out.push((hi << 4) | lo);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// Appends `value` percent-encoding every byte that is not a baggage-octet,
/// and `%`.
fn percent_encode_into(out: &mut String, value: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value.as_bytes() {
        if is_baggage_octet(b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
}

/// Appends bytes already checked to be ASCII.
fn push_ascii(out: &mut String, bytes: &[u8]) {
    out.extend(bytes.iter().map(|&b| char::from(b)));
}

/// One baggage entry (list member).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The normalised list member as forwarded: `key=value[;property...]`,
    /// printable ASCII only.
    member: String,
    /// `member[..key_len]` is the key.
    key_len: usize,
    /// `member[key_len + 1..value_end]` is the encoded value, the rest the
    /// properties (each preceded by `;`).
    value_end: usize,
    /// The decoded value, when it differs from the encoded one.
    decoded: Option<String>,
}

impl Entry {
    /// The key.
    #[must_use]
    pub fn key(&self) -> &str {
        self.member.get(..self.key_len).unwrap_or_default()
    }

    /// The value, percent-decoded.
    #[must_use]
    pub fn value(&self) -> &str {
        self.decoded.as_deref().unwrap_or_else(|| self.encoded_value())
    }

    /// The value as forwarded (percent-encoded).
    #[must_use]
    pub fn encoded_value(&self) -> &str {
        self.member.get(self.key_len + 1..self.value_end).unwrap_or_default()
    }

    /// The properties as forwarded, without the leading `;` (e.g.
    /// `"p1;k=v"`), empty when there are none. Not decoded.
    #[must_use]
    pub fn properties(&self) -> &str {
        self.member.get(self.value_end..).and_then(|p| p.strip_prefix(';')).unwrap_or_default()
    }

    /// The whole list member as forwarded.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.member
    }
}

/// Parses and normalises one list member (leading and trailing OWS allowed).
///
/// # Errors
///
/// [`Invalid::MissingEquals`], [`Invalid::Key`], [`Invalid::Value`] or
/// [`Invalid::Property`], checked in that order.
pub fn parse_member(member: &[u8]) -> Result<Entry, Invalid> {
    let m = trim_ows(member);
    let (kv, properties) = match m.iter().position(|&b| b == b';') {
        Some(at) => (&m[..at], Some(&m[at + 1..])),
        None => (m, None),
    };
    let eq = kv.iter().position(|&b| b == b'=').ok_or(Invalid::MissingEquals)?;
    let key = trim_ows(&kv[..eq]);
    let value = trim_ows(&kv[eq + 1..]);
    if !is_token(key) {
        return Err(Invalid::Key);
    }
    if !value.iter().all(|&b| is_baggage_octet(b)) {
        return Err(Invalid::Value);
    }

    let mut out = String::with_capacity(m.len());
    push_ascii(&mut out, key);
    out.push('=');
    push_ascii(&mut out, value);
    let value_end = out.len();

    for property in properties.into_iter().flat_map(|p| p.split(|&b| b == b';')) {
        let property = trim_ows(property);
        let (pkey, pvalue) = match property.iter().position(|&b| b == b'=') {
            Some(at) => (trim_ows(&property[..at]), Some(trim_ows(&property[at + 1..]))),
            None => (property, None),
        };
        if !is_token(pkey) || !pvalue.unwrap_or_default().iter().all(|&b| is_baggage_octet(b)) {
            return Err(Invalid::Property);
        }
        out.push(';');
        push_ascii(&mut out, pkey);
        if let Some(pvalue) = pvalue {
            out.push('=');
            push_ascii(&mut out, pvalue);
        }
    }

    let decoded = match percent_decode(value) {
        Cow::Owned(d) if d.as_bytes() != value => Some(d),
        _ => None,
    };
    Ok(Entry { member: out, key_len: key.len(), value_end, decoded })
}

/// Parsed baggage: the entries to read and to forward, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    entries: Vec<Entry>,
    dropped_invalid: usize,
    dropped_over_limit: usize,
    first_invalid: Option<Invalid>,
}

/// Parses every `baggage` header field of the request, in order.
///
/// Never fails: invalid members are dropped (see [`Baggage::dropped_invalid`]
/// and [`Baggage::first_invalid`]), and so are members beyond the limits
/// ([`Baggage::dropped_over_limit`]). Once [`MAX_MEMBERS`] are kept, the rest
/// is counted but not examined, so the work done is bounded by the input
/// length.
#[must_use]
pub fn parse(fields: &[&[u8]]) -> Baggage {
    let mut baggage = Baggage::default();
    let mut len = 0usize;
    for field in fields {
        for raw in field.split(|&b| b == b',') {
            if trim_ows(raw).is_empty() {
                continue;
            }
            if baggage.entries.len() == MAX_MEMBERS {
                baggage.dropped_over_limit += 1;
                continue;
            }
            match parse_member(raw) {
                Ok(entry) => {
                    let grown = len + usize::from(len > 0) + entry.member.len();
                    if grown <= MAX_LEN {
                        len = grown;
                        baggage.entries.push(entry);
                    } else {
                        baggage.dropped_over_limit += 1;
                    }
                }
                Err(e) => {
                    baggage.dropped_invalid += 1;
                    baggage.first_invalid.get_or_insert(e);
                }
            }
        }
    }
    baggage
}

impl Baggage {
    /// Empty baggage.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The decoded value of the last entry with this key.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.iter().rev().find(|e| e.key() == key).map(Entry::value)
    }

    /// All entries, in order (duplicates included).
    #[must_use]
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Number of entries.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries (then send no `baggage` header).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Length of [`Baggage::to_header`], without building it.
    #[must_use]
    pub fn header_len(&self) -> usize {
        self.entries.iter().map(|e| e.member.len()).sum::<usize>() + self.entries.len().saturating_sub(1)
    }

    /// The baggage-string to forward: members joined by `,`; empty when there
    /// are no entries. Printable ASCII, at most [`MAX_LEN`] bytes.
    #[must_use]
    pub fn to_header(&self) -> String {
        let mut out = String::with_capacity(self.header_len());
        for e in &self.entries {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(&e.member);
        }
        out
    }

    /// Sets `key` to `value` (percent-encoded as needed, no properties). An
    /// existing entry with this key is replaced in place, and later duplicates
    /// are removed; a new key is appended.
    ///
    /// # Errors
    ///
    /// [`Invalid::Key`] when `key` is not a token, [`Invalid::Limit`] when the
    /// result would exceed [`MAX_MEMBERS`] or [`MAX_LEN`]; the baggage is then
    /// unchanged.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), Invalid> {
        if !is_token(key.as_bytes()) {
            return Err(Invalid::Key);
        }
        let mut member = String::with_capacity(key.len() + 1 + value.len());
        member.push_str(key);
        member.push('=');
        percent_encode_into(&mut member, value);
        let value_end = member.len();
        let decoded = (member.get(key.len() + 1..) != Some(value)).then(|| value.to_owned());
        let entry = Entry { member, key_len: key.len(), value_end, decoded };

        let others = self.entries.iter().filter(|e| e.key() != key);
        let (count, bytes) = others.fold((0usize, 0usize), |(n, l), e| (n + 1, l + e.member.len()));
        if count + 1 > MAX_MEMBERS || bytes + count + entry.member.len() > MAX_LEN {
            return Err(Invalid::Limit);
        }

        match self.entries.iter().position(|e| e.key() == key) {
            Some(at) => {
                self.entries[at] = entry;
                let mut i = 0;
                self.entries.retain(|e| {
                    let keep = i <= at || e.key() != key;
                    i += 1;
                    keep
                });
            }
            None => self.entries.push(entry),
        }
        Ok(())
    }

    /// Removes every entry with this key; returns whether there was one.
    pub fn remove(&mut self, key: &str) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.key() != key);
        self.entries.len() != before
    }

    /// Members dropped because they were invalid.
    #[must_use]
    pub fn dropped_invalid(&self) -> usize {
        self.dropped_invalid
    }

    /// Valid (or unexamined) members dropped because of the limits.
    #[must_use]
    pub fn dropped_over_limit(&self) -> usize {
        self.dropped_over_limit
    }

    /// Why the first invalid member was dropped, for a log line.
    #[must_use]
    pub fn first_invalid(&self) -> Option<Invalid> {
        self.first_invalid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(fields: &[&str]) -> Baggage {
        let v: Vec<&[u8]> = fields.iter().map(|f| f.as_bytes()).collect();
        parse(&v)
    }

    fn member(s: &str) -> Entry {
        match parse_member(s.as_bytes()) {
            Ok(e) => e,
            Err(e) => panic!("expected a valid member for {s:?}, got {e:?}"),
        }
    }

    fn props(e: &Entry) -> Vec<&str> {
        if e.properties().is_empty() {
            vec![]
        } else {
            e.properties().split(';').collect()
        }
    }

    // --- the specification's examples ------------------------------------

    #[test]
    fn spec_limits_section_example() {
        let b = p(&["key1=value1;property1;property2, key2 = value2, key3=value3; propertyKey=propertyValue"]);
        assert_eq!(b.len(), 3);
        let e = &b.entries()[0];
        assert_eq!((e.key(), e.value()), ("key1", "value1"));
        assert_eq!(props(e), ["property1", "property2"]);
        let e = &b.entries()[1];
        assert_eq!((e.key(), e.value(), e.properties()), ("key2", "value2", ""));
        let e = &b.entries()[2];
        assert_eq!((e.key(), e.value()), ("key3", "value3"));
        assert_eq!(props(e), ["propertyKey=propertyValue"]);
        assert_eq!(b.to_header(), "key1=value1;property1;property2,key2=value2,key3=value3;propertyKey=propertyValue");
        assert_eq!(b.dropped_invalid(), 0);
    }

    #[test]
    fn spec_http_examples() {
        let b = p(&["userId=alice,serverNode=DF%2028,isProduction=false"]);
        assert_eq!(b.get("userId"), Some("alice"));
        assert_eq!(b.get("serverNode"), Some("DF 28"));
        assert_eq!(b.get("isProduction"), Some("false"));
        assert_eq!(b.entries()[1].encoded_value(), "DF%2028");
        // Forwarded as received.
        assert_eq!(b.to_header(), "userId=alice,serverNode=DF%2028,isProduction=false");

        let b = p(&["userId=Am%C3%A9lie,serverNode=DF%2028,isProduction=false"]);
        assert_eq!(b.get("userId"), Some("Am\u{e9}lie"));
        assert_eq!(b.to_header(), "userId=Am%C3%A9lie,serverNode=DF%2028,isProduction=false");

        // Split into multiple headers.
        let split = p(&["userId=alice", "serverNode=DF%2028,isProduction=false"]);
        assert_eq!(split.to_header(), "userId=alice,serverNode=DF%2028,isProduction=false");
        assert_eq!(split.get("serverNode"), Some("DF 28"));

        // Values and names might begin and end with spaces.
        let spaced = p(&["userId =   alice", "serverNode = DF%2028, isProduction = false"]);
        assert_eq!(spaced, split);
    }

    #[test]
    fn spec_use_case_examples() {
        assert_eq!(p(&["serverNode=DF%2028"]).get("serverNode"), Some("DF 28"));
        assert_eq!(p(&["userId=alice"]).get("userId"), Some("alice"));
        assert_eq!(p(&["isProduction=false"]).get("isProduction"), Some("false"));
    }

    // --- the W3C reference implementation's tests (test/test_baggage.py) -----

    #[test]
    fn reference_parse_simple_and_multiple() {
        let b = p(&["SomeKey=SomeValue"]);
        assert_eq!((b.len(), b.get("SomeKey")), (1, Some("SomeValue")));
        assert_eq!(b.entries()[0].properties(), "");

        let b = p(&["SomeKey=SomeValue;SomeProp,SomeKey2=SomeValue2;ValueProp=PropVal"]);
        assert_eq!(b.len(), 2);
        assert_eq!((b.get("SomeKey"), props(&b.entries()[0])), (Some("SomeValue"), vec!["SomeProp"]));
        assert_eq!((b.get("SomeKey2"), props(&b.entries()[1])), (Some("SomeValue2"), vec!["ValueProp=PropVal"]));

        let ows = p(&[
            "SomeKey \t = \t SomeValue \t ; \t SomeProp \t , \t SomeKey2 \t = \t SomeValue2 \t ; \t ValueProp \t = \t PropVal",
        ]);
        assert_eq!(ows, b);
        assert_eq!(ows.to_header(), "SomeKey=SomeValue;SomeProp,SomeKey2=SomeValue2;ValueProp=PropVal");
    }

    #[test]
    fn reference_kv_properties() {
        let want = p(&["SomeKey=SomeValue;SomePropKey=SomePropValue,SomeKey2=SomeValue2;SomePropKey2=SomePropValue2"]);
        assert_eq!(props(&want.entries()[0]), ["SomePropKey=SomePropValue"]);
        assert_eq!(props(&want.entries()[1]), ["SomePropKey2=SomePropValue2"]);
        let ows = p(&[
            "SomeKey \t = \t SomeValue \t ; \t SomePropKey=SomePropValue \t , \t SomeKey2 \t = \t SomeValue2 \t ; \t SomePropKey2 \t = \t SomePropValue2",
        ]);
        assert_eq!(ows, want);
    }

    #[test]
    fn reference_entry_cases() {
        let e = member("SomeKey=SomeValue=equals");
        assert_eq!((e.key(), e.value()), ("SomeKey", "SomeValue=equals"));
        let e = member("SomeKey \t = \t SomeValue \t ");
        assert_eq!((e.key(), e.value(), e.as_str()), ("SomeKey", "SomeValue", "SomeKey=SomeValue"));
        let e = member("SomeKey=SomeValue;SomeProp;SecondProp=PropValue");
        assert_eq!(props(&e), ["SomeProp", "SecondProp=PropValue"]);
        let e = member("SomeKey \t = \t SomeValue \t ; \t SomeProp \t ; \t SecondProp \t = \t PropValue");
        assert_eq!(props(&e), ["SomeProp", "SecondProp=PropValue"]);
        let e = member("SomeKey=SomeValue;SomeProp;SomeProp=PropValue;SomeProp=AnotherPropValue");
        assert_eq!(props(&e), ["SomeProp", "SomeProp=PropValue", "SomeProp=AnotherPropValue"]);
        let e = member("SomeKey \t = \t SomeValue \t ; \t SomePropKey \t = \t SomePropValue");
        assert_eq!(props(&e), ["SomePropKey=SomePropValue"]);
    }

    #[test]
    fn reference_percent_encoded() {
        // Python's urllib.parse.quote("\t \"';=asdf!@#$%^&*()").
        let encoded = "%09%20%22%27%3B%3Dasdf%21%40%23%24%25%5E%26%2A%28%29";
        let e = member(&format!("SomeKey={encoded}"));
        assert_eq!(e.value(), "\t \"';=asdf!@#$%^&*()");
        assert_eq!(e.encoded_value(), encoded);
        let e = member(&format!("SomeKey \t = \t {encoded} \t "));
        assert_eq!(e.value(), "\t \"';=asdf!@#$%^&*()");
        // Property values are kept encoded as well.
        let e = member(&format!("SomeKey=SomeValue;SomePropKey={encoded}"));
        assert_eq!(e.properties(), format!("SomePropKey={encoded}"));
    }

    #[test]
    fn reference_property_without_value_is_not_decoded() {
        let e = member("SomeKey=SomeValue;ValueProp%20%09%20%3D%20%09%20PropVal");
        assert_eq!(e.properties(), "ValueProp%20%09%20%3D%20%09%20PropVal");
    }

    #[test]
    fn reference_limits() {
        // At least 64 list-members.
        let members: Vec<String> = (0..64).map(|x| format!("key{x}=value")).collect();
        let b = p(&[&members.join(",")]);
        assert_eq!(b.len(), 64);
        assert_eq!(b.to_header().split(',').count(), 64);
        assert_eq!(b.dropped_over_limit(), 0);

        // A single 8192-byte member.
        let long = format!("a={}", "0123456789".repeat(819));
        assert_eq!(long.len(), 8192);
        let b = p(&[&long]);
        assert_eq!(b.to_header(), long);
        assert_eq!(b.header_len(), 8192);
    }

    // --- limits ------------------------------------------------------------------

    #[test]
    fn members_beyond_64_are_dropped() {
        let members: Vec<String> = (0..65).map(|x| format!("key{x}=value")).collect();
        let b = p(&[&members.join(",")]);
        assert_eq!(b.len(), 64);
        assert_eq!(b.get("key63"), Some("value"));
        assert_eq!(b.get("key64"), None);
        assert_eq!(b.dropped_over_limit(), 1);
        // Across fields too, and invalid ones beyond the limit are not examined.
        let b = p(&[&members[..40].join(","), &members[40..].join(","), "bad", "a b=1"]);
        assert_eq!((b.len(), b.dropped_over_limit(), b.dropped_invalid()), (64, 3, 0));
        // Invalid members do not count against the limit.
        let b = p(&["bad,also bad=1", &members.join(",")]);
        assert_eq!((b.len(), b.dropped_invalid(), b.dropped_over_limit()), (64, 2, 1));
    }

    #[test]
    fn many_small_entries() {
        // The reference's 512 entries of 15 bytes: only the first 64 are kept.
        let members: Vec<String> = (0..512).map(|x| format!("{x:03}=0123456789a")).collect();
        let b = p(&[&members.join(",")]);
        assert_eq!(b.len(), 64);
        assert_eq!(b.to_header(), members[..64].join(","));
        assert_eq!(b.dropped_over_limit(), 448);
    }

    #[test]
    fn bytes_beyond_8192_are_dropped_whole() {
        let long = format!("a={}", "0".repeat(8191));
        assert_eq!(long.len(), 8193);
        let b = p(&[&long]);
        assert!(b.is_empty());
        assert_eq!(b.to_header(), "");
        assert_eq!(b.dropped_over_limit(), 1);

        // Exactly 8192 with the commas, then one byte too many.
        let first = format!("a={}", "x".repeat(4093)); // 4095
        let second = format!("b={}", "y".repeat(4094)); // 4096, +1 comma = 8192
        let b = p(&[&first, &second]);
        assert_eq!(b.header_len(), 8192);
        assert_eq!(b.len(), 2);
        let third = "c=1";
        let b = p(&[&first, &second, third]);
        assert_eq!((b.len(), b.dropped_over_limit()), (2, 1));
        assert!(b.to_header().len() <= MAX_LEN);
    }

    #[test]
    fn a_big_member_does_not_block_later_small_ones() {
        let big = format!("big={}", "x".repeat(8000));
        let b = p(&["a=1", &big, "b=2", &big, "c=3"]);
        assert_eq!(b.to_header(), format!("a=1,{big},b=2,c=3"));
        assert_eq!(b.dropped_over_limit(), 1);
    }

    #[test]
    fn limits_use_the_normalised_length() {
        // 8192 bytes once OWS and empty members are gone, much more as received.
        let first = format!("a = {}", "x".repeat(4093));
        let second = format!(" \t b\t=\t{} ", "y".repeat(4094));
        let padded = format!("{first} , , \t,{second}");
        assert!(padded.len() > MAX_LEN);
        let b = p(&[&padded]);
        assert_eq!((b.len(), b.header_len()), (2, 8192));
    }

    // --- invalid members -----------------------------------------------------------

    #[test]
    fn invalid_members_are_dropped_alone() {
        let cases: [(&str, Invalid); 17] = [
            ("novalue", Invalid::MissingEquals),
            ("k;p=1", Invalid::MissingEquals),
            ("=v", Invalid::Key),
            (" = v", Invalid::Key),
            ("a b=v", Invalid::Key),
            ("k\"=v", Invalid::Key),
            ("k(=v", Invalid::Key),
            ("k@=v", Invalid::Key),
            ("caf\u{e9}=v", Invalid::Key),
            ("k=a b", Invalid::Value),
            ("k=a\"b", Invalid::Value),
            ("k=a\\b", Invalid::Value),
            ("k=a\tb", Invalid::Value),
            ("k=caf\u{e9}", Invalid::Value),
            ("k=v;", Invalid::Property),
            ("k=v;;p", Invalid::Property),
            ("k=v;p q", Invalid::Property),
        ];
        for (bad, why) in cases {
            assert_eq!(parse_member(bad.as_bytes()), Err(why), "{bad:?}");
            let b = p(&[&format!("a=1,{bad},b=2")]);
            assert_eq!(b.to_header(), "a=1,b=2", "{bad:?}");
            assert_eq!((b.dropped_invalid(), b.first_invalid()), (1, Some(why)), "{bad:?}");
        }
        for bad in ["k=v;=x", "k=v;p=a b", "k=v;p=\"x\"", "k=v;p==x=\\"] {
            assert_eq!(parse_member(bad.as_bytes()), Err(Invalid::Property), "{bad:?}");
        }
        // Control characters anywhere.
        for bad in ["k=v\r", "k=\0", "k\n=v", "k=v;p\x7f", "k=\x01"] {
            assert!(parse_member(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(parse_member(b"k=\xff").is_err());
        // The first reason is kept.
        let b = p(&["novalue", "a b=1", "ok=1"]);
        assert_eq!((b.len(), b.dropped_invalid(), b.first_invalid()), (1, 2, Some(Invalid::MissingEquals)));
    }

    #[test]
    fn grammar_edges_that_are_valid() {
        // Empty value, all token characters in keys, all baggage-octets in values.
        assert_eq!(member("k=").value(), "");
        assert_eq!(member("k=  ").as_str(), "k=");
        let tchars = "!#$%&'*+-.^_`|~09AZaz";
        let octets: String =
            (0x21u8..=0x7e).filter(|&b| !matches!(b, b'"' | b',' | b';' | b'\\')).map(char::from).collect();
        let e = member(&format!("{tchars}={octets};{tchars}={octets};{tchars}"));
        assert_eq!(e.key(), tchars);
        assert_eq!(e.encoded_value(), octets);
        assert_eq!(e.properties(), format!("{tchars}={octets};{tchars}"));
        // Keys are case-sensitive and never decoded.
        let b = p(&["Key=1,key=2,k%41=3"]);
        assert_eq!((b.get("Key"), b.get("key"), b.get("k%41"), b.get("kA")), (Some("1"), Some("2"), Some("3"), None));
    }

    // --- decoding ----------------------------------------------------------------------

    #[test]
    fn percent_decoding() {
        let v = |s: &str| member(&format!("k={s}")).value().to_owned();
        assert_eq!(v("a%20b"), "a b");
        assert_eq!(v("%2c%3B%3d"), ",;=");
        assert_eq!(v("a+b"), "a+b");
        assert_eq!(v("100%25"), "100%");
        // Malformed escapes stay literal.
        assert_eq!(v("100%"), "100%");
        assert_eq!(v("%zz%4"), "%zz%4");
        assert_eq!(v("%%41"), "%A");
        // Not UTF-8: U+FFFD.
        assert_eq!(v("%FF"), "\u{fffd}");
        assert_eq!(v("a%C3"), "a\u{fffd}");
        assert_eq!(v("%C3%A9%E9"), "\u{e9}\u{fffd}");
        assert_eq!(v("%F0%9F%98%80"), "\u{1f600}");
        // Decoding does not touch what is forwarded.
        assert_eq!(member("k=%FF").as_str(), "k=%FF");
        // Nothing stored twice when decoding changes nothing.
        assert_eq!(member("k=plain").decoded, None);
        assert_eq!(member("k=100%").decoded, None);
    }

    // --- repeated fields, duplicates, empties -----------------------------------------------

    #[test]
    fn fields_are_combined_and_members_never_span_them() {
        let b = p(&["a=1,b=2", "c=3", "d=4,e=5"]);
        assert_eq!(b.to_header(), "a=1,b=2,c=3,d=4,e=5");
        let b = p(&["a", "=1"]);
        assert!(b.is_empty());
        assert_eq!(b.dropped_invalid(), 2);
    }

    #[test]
    fn empty_members_are_ignored() {
        assert!(parse(&[]).is_empty());
        assert!(p(&[""]).is_empty());
        assert!(p(&[" \t ", ",, ,\t,"]).is_empty());
        let b = p(&[",a=1,,b=2,", "", " , c=3 ,"]);
        assert_eq!(b.to_header(), "a=1,b=2,c=3");
        assert_eq!(b.dropped_invalid(), 0);
    }

    #[test]
    fn duplicates_are_kept_and_the_last_wins() {
        let b = p(&["k=1,x=0", "k=2;p"]);
        assert_eq!(b.len(), 3);
        assert_eq!(b.get("k"), Some("2"));
        assert_eq!(b.to_header(), "k=1,x=0,k=2;p");
    }

    // --- mutation ---------------------------------------------------------------------

    #[test]
    fn set_encodes_what_must_be() {
        let mut b = Baggage::new();
        b.set("userId", "Am\u{e9}lie").unwrap();
        b.set("serverNode", "DF 28").unwrap();
        b.set("isProduction", "false").unwrap();
        assert_eq!(b.to_header(), "userId=Am%C3%A9lie,serverNode=DF%2028,isProduction=false");
        assert_eq!(b.get("userId"), Some("Am\u{e9}lie"));
        b.set("odd", "100% \"a,b;c\\d\"\t=ok").unwrap();
        assert_eq!(b.entries()[3].encoded_value(), "100%25%20%22a%2Cb%3Bc%5Cd%22%09=ok");
        assert_eq!(b.get("odd"), Some("100% \"a,b;c\\d\"\t=ok"));
        // What we send parses back to the same thing.
        assert_eq!(p(&[&b.to_header()]).entries(), b.entries());
    }

    #[test]
    fn set_replaces_in_place_and_removes_duplicates() {
        let mut b = p(&["a=1,k=2;p,b=3,k=4"]);
        b.set("k", "new").unwrap();
        assert_eq!(b.to_header(), "a=1,k=new,b=3");
        b.set("c", "").unwrap();
        assert_eq!(b.to_header(), "a=1,k=new,b=3,c=");
        assert!(b.remove("k"));
        assert!(!b.remove("k"));
        assert_eq!(b.to_header(), "a=1,b=3,c=");
    }

    #[test]
    fn set_refuses_bad_keys_and_limits() {
        let mut b = Baggage::new();
        for key in ["", "a b", "k=", "caf\u{e9}", "a,b", "a;b"] {
            assert_eq!(b.set(key, "v"), Err(Invalid::Key), "{key:?}");
        }
        assert!(b.is_empty());

        let members: Vec<String> = (0..64).map(|x| format!("key{x}=value")).collect();
        let mut b = p(&[&members.join(",")]);
        assert_eq!(b.set("one-more", "v"), Err(Invalid::Limit));
        // Replacing an existing key is fine at the member limit.
        b.set("key0", "changed").unwrap();
        assert_eq!((b.len(), b.get("key0")), (64, Some("changed")));

        // 8002 bytes, so a second member may have 8192 - 8002 - 1 (comma) - 2 ("b=") = 187.
        let mut b = p(&[&format!("a={}", "x".repeat(8000))]);
        assert_eq!(b.set("b", &"y".repeat(188)), Err(Invalid::Limit));
        b.set("b", &"y".repeat(187)).unwrap();
        assert_eq!(b.header_len(), MAX_LEN);
        // The encoded length counts: 3 bytes per space, "k=" + 3 * 2730 = 8192.
        let mut b = Baggage::new();
        assert_eq!(b.set("k", &" ".repeat(2731)), Err(Invalid::Limit));
        b.set("k", &" ".repeat(2730)).unwrap();
        assert_eq!(b.header_len(), MAX_LEN);
    }

    // --- robustness -----------------------------------------------------------------------

    #[test]
    fn random_input_never_panics_and_output_is_stable() {
        const KEYS: &[&str] = &["a", "B", "k-1", "x.y", "%", "~"];
        const VALUES: &[&str] = &["1", "", "DF%2028", "a=b", "%FF", "%zz", "long"];
        const PROPS: &[&str] = &["", ";p", ";p=1", " ; q = %20 ", ";p;q=2"];
        const BAD: &[&str] = &["a b=1", "k=\"", "k=v;", "=1", "novalue", "k=\u{e9}"];
        const SEPS: &[&str] = &[",", ", ", " ,\t", ",,"];
        let mut seed = 0x853c_49e6_748f_ea9bu64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut full, mut dropped) = (0, 0);
        for _ in 0..5_000 {
            let mut fields: Vec<Vec<u8>> = Vec::new();
            for _ in 0..(next() % 4) {
                let mut f = String::new();
                for _ in 0..(next() % 40) {
                    if next() % 20 == 0 {
                        f.push_str(BAD[(next() % BAD.len() as u64) as usize]);
                    } else {
                        let key = KEYS[(next() % KEYS.len() as u64) as usize];
                        let mut value = VALUES[(next() % VALUES.len() as u64) as usize].to_string();
                        if value == "long" {
                            value = "v".repeat((next() % 3000) as usize);
                        }
                        let prop = PROPS[(next() % PROPS.len() as u64) as usize];
                        f.push_str(&format!("{key}{} = {value}{prop}", next() % 100));
                    }
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
            let b = parse(&refs);
            let h = b.to_header();
            assert!(h.len() <= MAX_LEN && b.len() <= MAX_MEMBERS);
            assert_eq!(h.len(), b.header_len());
            assert!(h.bytes().all(|c| (0x21..=0x7e).contains(&c)), "{h}");
            if b.len() == MAX_MEMBERS {
                full += 1;
            }
            if b.dropped_over_limit() > 0 {
                dropped += 1;
            }
            // The forwarded form is a fixed point.
            let again = parse(&[h.as_bytes()]);
            assert_eq!(again.entries(), b.entries());
            assert_eq!(again.to_header(), h);
        }
        assert!(full > 50, "{full}");
        assert!(dropped > 100, "{dropped}");
    }

    #[test]
    fn huge_input_is_bounded() {
        let commas = ",".repeat(100_000);
        assert_eq!(p(&[&commas, "a=1", &commas]).to_header(), "a=1");
        let many = "a=1,".repeat(100_000);
        let b = p(&[&many]);
        assert_eq!((b.len(), b.dropped_over_limit()), (64, 100_000 - 64));
        let huge_value = format!("k={}", "v".repeat(1_000_000));
        let b = p(&[&huge_value, "small=1"]);
        assert_eq!(b.to_header(), "small=1");
    }

    #[test]
    fn invalid_reasons_have_text() {
        let all = [Invalid::MissingEquals, Invalid::Key, Invalid::Value, Invalid::Property, Invalid::Limit];
        for (i, a) in all.iter().enumerate() {
            assert!(!a.as_str().is_empty());
            assert_eq!(a.to_string(), a.as_str());
            for b in &all[i + 1..] {
                assert_ne!(a.as_str(), b.as_str());
            }
        }
    }
}
