//! Parsing log records out of a private copy of the shared-memory log (see `ffi.rs`), and the
//! tags we care about. Safe code over bytes; the layout is `vapi/vsl_int.h`'s: per record a
//! header word (tag << 24 | version << 16 | length), two words of transaction ID (bit 62:
//! client, bit 63: backend), then `length` bytes of payload ending in NUL, padded to a word.

use std::ffi::CStr;

pub const HEADER_WORDS: usize = 3;
pub const IDENT_MASK: u64 = (1 << 51) - 1;
const CLIENT_MARKER: u64 = 1 << 62;
const BACKEND_MARKER: u64 = 1 << 63;

/// The record tags the correlation uses; everything else is `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    Begin,
    Link,
    End,
    Timestamp,
    ReqAcct,
    BereqAcct,
    RespStatus,
    BerespStatus,
    Hit,
    FetchError,
    VclError,
    BackendOpen,
    Other,
}

const NAMES: [(&CStr, Tag); 12] = [
    (c"Begin", Tag::Begin),
    (c"Link", Tag::Link),
    (c"End", Tag::End),
    (c"Timestamp", Tag::Timestamp),
    (c"ReqAcct", Tag::ReqAcct),
    (c"BereqAcct", Tag::BereqAcct),
    (c"RespStatus", Tag::RespStatus),
    (c"BerespStatus", Tag::BerespStatus),
    (c"Hit", Tag::Hit),
    (c"FetchError", Tag::FetchError),
    (c"VCL_Error", Tag::VclError),
    (c"BackendOpen", Tag::BackendOpen),
];

/// Tag numbers to `Tag`, built from the running libvarnishapi's own table (numbers may change
/// between Varnish versions).
#[derive(Clone)]
pub struct TagTable([Tag; 256]);

impl TagTable {
    pub fn new(number_of: impl Fn(&CStr) -> Option<u8>) -> Self {
        let mut t = [Tag::Other; 256];
        for (name, tag) in NAMES {
            if let Some(n) = number_of(name) {
                t[n as usize] = tag;
            }
        }
        TagTable(t)
    }

    pub fn get(&self, number: u8) -> Tag {
        self.0[number as usize]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub tag_number: u8,
    pub vxid: u64,
    pub client: bool,
    pub backend: bool,
    /// The payload without its terminating NUL.
    pub data: &'a [u8],
}

/// The records in `bytes`, in order; stops at the first malformed one (a torn copy).
pub fn records(bytes: &[u8]) -> impl Iterator<Item = Record<'_>> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        let (head, id, data, next) = split_record(rest)?;
        rest = next;
        Some(Record {
            tag_number: (head >> 24) as u8,
            vxid: id & IDENT_MASK,
            client: id & CLIENT_MARKER != 0,
            backend: id & BACKEND_MARKER != 0,
            data,
        })
    })
}

/// The record at the start of `rest`: its header word, its ID, its payload and what follows it;
/// `None` if the record is cut short.
fn split_record(rest: &[u8]) -> Option<(u32, u64, &[u8], &[u8])> {
    // The header as a fixed-size array: one bounds check per record, none per word.
    let (header, after) = rest.split_first_chunk::<{ HEADER_WORDS * 4 }>()?;
    let word = |i: usize| u32::from_ne_bytes([header[i * 4], header[i * 4 + 1], header[i * 4 + 2], header[i * 4 + 3]]);
    let (head, id) = (word(0), u64::from(word(1)) | (u64::from(word(2)) << 32));
    let len = (head & 0xffff) as usize;
    let payload = after.get(..len)?;
    // Padded to a word; a copy cut inside the padding ends after this record.
    let next = after.get(len.div_ceil(4) * 4..).unwrap_or_default();
    // The payload ends with its NUL; tolerate its absence rather than fail.
    let data = payload.strip_suffix(&[0]).unwrap_or(payload);
    Some((head, id, data, next))
}

/// The records of `bytes` whose tag `tags` knows, as `(tag, vxid, payload)`: `records` for the
/// tailer's hot loop, which skips the records of other tags (about three in four of a
/// transaction) on their header word alone.
pub fn wanted<'a>(bytes: &'a [u8], tags: &'a TagTable) -> impl Iterator<Item = (Tag, u64, &'a [u8])> {
    let mut rest = bytes;
    std::iter::from_fn(move || loop {
        let head = u32::from_ne_bytes(*rest.first_chunk::<4>()?);
        let tag = tags.get((head >> 24) as u8);
        if tag == Tag::Other {
            let len = (head & 0xffff) as usize;
            rest = rest.get(HEADER_WORDS * 4 + len.div_ceil(4) * 4..).unwrap_or_default();
            continue;
        }
        let (_, id, data, next) = split_record(rest)?;
        rest = next;
        return Some((tag, id & IDENT_MASK, data));
    })
}

/// Builds log bytes as Varnish lays them out (tests, and the synthetic records of the
/// correlation tests).
pub fn encode(out: &mut Vec<u8>, tag_number: u8, vxid: u64, client: bool, payload: &[u8]) {
    let len = payload.len() + 1;
    let head = (u32::from(tag_number) << 24) | (1 << 16) | len as u32;
    let id = vxid | if client { CLIENT_MARKER } else { BACKEND_MARKER };
    out.extend_from_slice(&head.to_ne_bytes());
    out.extend_from_slice(&(id as u32).to_ne_bytes());
    out.extend_from_slice(&((id >> 32) as u32).to_ne_bytes());
    out.extend_from_slice(payload);
    out.push(0);
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_gives_the_known_tags_records_as_records_does() {
        let mut log = Vec::new();
        encode(&mut log, 10, 1001, true, b"req 1000 rxreq");
        encode(&mut log, 99, 1001, true, b"an unknown tag, skipped");
        encode(&mut log, 20, 1001, true, b"Start: 1700000000.000100 0.000000 0.000000");
        encode(&mut log, 99, 1002, false, b"");
        encode(&mut log, 30, 1002, false, b"");
        let tags = TagTable::new(|name| match name.to_bytes() {
            b"Link" => Some(10),
            b"Timestamp" => Some(20),
            b"End" => Some(30),
            _ => None,
        });
        let got: Vec<(Tag, u64, &[u8])> = wanted(&log, &tags).collect();
        let expected: Vec<(Tag, u64, &[u8])> = records(&log)
            .filter(|r| tags.get(r.tag_number) != Tag::Other)
            .map(|r| (tags.get(r.tag_number), r.vxid, r.data))
            .collect();
        assert_eq!(got, expected);
        assert_eq!(got.len(), 3);
        assert_eq!(got[1], (Tag::Timestamp, 1001, &b"Start: 1700000000.000100 0.000000 0.000000"[..]));
        // a record cut short (header or payload) ends the walk, as in `records`
        assert_eq!(wanted(&log[..log.len() - 6], &tags).count(), 2);
        assert_eq!(records(&log[..log.len() - 6]).count(), 4);
    }

    #[test]
    fn records_round_trip_through_the_log_layout() {
        let mut log = Vec::new();
        encode(&mut log, 10, 1001, true, b"req 1000 rxreq");
        encode(&mut log, 20, 1001, true, b"Start: 1700000000.000100 0.000000 0.000000");
        encode(&mut log, 30, 1002, false, b"");
        let recs: Vec<Record> = records(&log).collect();
        assert_eq!(recs.len(), 3);
        assert_eq!(
            recs[0],
            Record { tag_number: 10, vxid: 1001, client: true, backend: false, data: b"req 1000 rxreq" }
        );
        assert_eq!(recs[1].data, b"Start: 1700000000.000100 0.000000 0.000000");
        assert_eq!(recs[2].vxid, 1002);
        assert!(recs[2].backend);
        assert_eq!(recs[2].data, b"");
    }

    #[test]
    fn a_torn_copy_stops_the_iteration() {
        let mut log = Vec::new();
        encode(&mut log, 10, 1, true, b"complete");
        encode(&mut log, 11, 1, true, b"cut short here");
        log.truncate(log.len() - 6);
        assert_eq!(records(&log).count(), 1);
        assert_eq!(records(&[1, 2, 3]).count(), 0);
    }

    #[test]
    fn tag_table_maps_known_names_only() {
        let t = TagTable::new(|name| match name.to_bytes() {
            b"Timestamp" => Some(77),
            b"End" => Some(3),
            _ => None,
        });
        assert_eq!(t.get(77), Tag::Timestamp);
        assert_eq!(t.get(3), Tag::End);
        assert_eq!(t.get(4), Tag::Other);
    }
}
