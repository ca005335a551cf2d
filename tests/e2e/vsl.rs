//! Reading `varnishlog -d -g raw` output, and deriving from it what a span closed from the log
//! must say: the test's independent model of the VSL correlation.
//!
//! Raw lines look like
//!     `      1001 Timestamp      c Start: 1795304653.041162 0.000000 0.000000`
//! (VXID, tag, `c`lient / `b`ackend / `-`, payload). A span covers a chain of VXIDs: a restart
//! (`Link req <vxid> restart`) or a retry (`Link bereq <vxid> retry`) goes on under a new VXID.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};

/// One log record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VslRecord {
    pub vxid: u64,
    pub tag: String,
    /// `c`, `b` or `-`.
    pub kind: char,
    pub data: String,
}

/// The records of a `varnishlog -g raw` dump, per VXID in log order.
#[derive(Debug, Default)]
pub struct Vsl {
    pub by_vxid: BTreeMap<u64, Vec<VslRecord>>,
    /// The VXID a restart or retry continued from: child -> parent.
    parent: HashMap<u64, u64>,
    /// parent -> child (the same links, forward).
    child: HashMap<u64, u64>,
}

/// `1795304653.041162` to nanoseconds, exactly as printed (no floating point).
pub fn parse_ts(s: &str) -> u64 {
    let (secs, frac) = s.split_once('.').unwrap_or_else(|| panic!("bad VSL time {s:?}"));
    assert!(!frac.is_empty() && frac.len() <= 9 && frac.bytes().all(|b| b.is_ascii_digit()), "bad VSL time {s:?}");
    let secs: u64 = secs.parse().unwrap_or_else(|_| panic!("bad VSL time {s:?}"));
    let mut nanos: u64 = frac.parse().unwrap();
    for _ in frac.len()..9 {
        nanos *= 10;
    }
    secs * 1_000_000_000 + nanos
}

/// What the log says a span must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The span's VXIDs, first to final.
    pub chain: Vec<u64>,
    pub backend: bool,
    /// `Timestamp Start` of the first VXID.
    pub start_ns: u64,
    /// `Timestamp Resp`/`PipeSess` (client) or `BerespBody`/`Error` (backend) of the final VXID.
    pub end_ns: u64,
    /// The last `RespStatus`/`BerespStatus` of the chain.
    pub status: Option<i64>,
    /// `ReqAcct`/`BereqAcct` fields 2 and 5 (the last such record of the chain).
    pub req_body: Option<i64>,
    pub resp_body: Option<i64>,
    /// Every Timestamp label but the first Start, plus `varnish.restart`/`varnish.retry` at
    /// the time of the timestamp before them; in log order.
    pub events: Vec<(String, u64)>,
    /// `BackendOpen`: (backend name, peer address, peer port).
    pub peer: Option<(String, String, i64)>,
    /// `Hit`: the VXID of the fetch that made the object.
    pub hit_obj: Option<u64>,
}

impl Vsl {
    pub fn parse(text: &str) -> Vsl {
        let mut vsl = Vsl::default();
        for line in text.lines() {
            let trimmed = line.trim_start();
            if trimmed.is_empty() {
                continue;
            }
            let mut it = trimmed.splitn(2, char::is_whitespace);
            let Some(vxid) = it.next().and_then(|v| v.parse::<u64>().ok()) else { continue };
            let rest = it.next().unwrap_or("").trim_start();
            let mut it = rest.splitn(2, char::is_whitespace);
            let tag = it.next().unwrap_or("").to_owned();
            let rest = it.next().unwrap_or("").trim_start();
            let mut it = rest.splitn(2, ' ');
            let kind_s = it.next().unwrap_or("");
            if tag.is_empty() || kind_s.len() != 1 {
                continue;
            }
            let kind = kind_s.chars().next().unwrap();
            let data = it.next().unwrap_or("").to_owned();
            vsl.by_vxid.entry(vxid).or_default().push(VslRecord { vxid, tag, kind, data });
        }
        for (vxid, recs) in &vsl.by_vxid {
            for r in recs.iter().filter(|r| r.tag == "Link") {
                let f: Vec<&str> = r.data.split_whitespace().collect();
                if let [kind, child, reason, ..] = f[..] {
                    if matches!((kind, reason), ("req", "restart") | ("bereq", "retry")) {
                        let child: u64 = child.parse().unwrap();
                        vsl.parent.insert(child, *vxid);
                        vsl.child.insert(*vxid, child);
                    }
                }
            }
        }
        vsl
    }

    pub fn records(&self, vxid: u64) -> &[VslRecord] {
        self.by_vxid.get(&vxid).map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// The first record of `tag` in `vxid`.
    pub fn first(&self, vxid: u64, tag: &str) -> Option<&VslRecord> {
        self.records(vxid).iter().find(|r| r.tag == tag)
    }

    /// The VXIDs of the transactions whose `Begin` matches `pred`.
    pub fn transactions(&self, pred: impl Fn(&str) -> bool) -> Vec<u64> {
        self.by_vxid
            .iter()
            .filter(|(_, recs)| recs.iter().any(|r| r.tag == "Begin" && pred(&r.data)))
            .map(|(v, _)| *v)
            .collect()
    }

    /// The chain of VXIDs a span whose final VXID is `final_vxid` went through, first to final.
    pub fn chain_ending_at(&self, final_vxid: u64) -> Vec<u64> {
        let mut chain = vec![final_vxid];
        while let Some(&p) = self.parent.get(chain.last().unwrap()) {
            assert!(!chain.contains(&p), "loop in VSL links at {p}");
            chain.push(p);
        }
        chain.reverse();
        chain
    }

    /// The final VXID of the chain starting at `first`.
    pub fn final_of(&self, first: u64) -> u64 {
        let mut v = first;
        while let Some(&c) = self.child.get(&v) {
            v = c;
        }
        v
    }

    /// What a span whose final VXID is `final_vxid` must say, according to the log.
    pub fn expected(&self, final_vxid: u64) -> Expected {
        let chain = self.chain_ending_at(final_vxid);
        for v in &chain {
            assert!(
                self.records(*v).iter().any(|r| r.tag == "End"),
                "VXID {v} (chain {chain:?}) not complete in the log: {:#?}",
                self.records(*v)
            );
        }
        let first = self.records(chain[0]);
        let backend = first.iter().any(|r| r.kind == 'b');
        let ts = |r: &VslRecord| -> (String, u64) {
            let mut f = r.data.split_whitespace();
            let label = f.next().and_then(|l| l.strip_suffix(':')).unwrap_or_else(|| panic!("bad Timestamp {r:?}"));
            (label.to_owned(), parse_ts(f.next().unwrap_or_else(|| panic!("bad Timestamp {r:?}"))))
        };
        let start_ns = first
            .iter()
            .filter(|r| r.tag == "Timestamp")
            .map(ts)
            .find(|(l, _)| l == "Start")
            .unwrap_or_else(|| panic!("no Timestamp Start in VXID {}", chain[0]))
            .1;
        let end_labels: &[&str] = if backend { &["BerespBody", "Error"] } else { &["Resp", "PipeSess"] };
        let end_ns = self
            .records(final_vxid)
            .iter()
            .rev()
            .filter(|r| r.tag == "Timestamp")
            .map(ts)
            .find(|(l, _)| end_labels.contains(&l.as_str()))
            .unwrap_or_else(|| {
                panic!("no end timestamp {end_labels:?} in VXID {final_vxid}: {:#?}", self.records(final_vxid))
            })
            .1;

        let mut status = None;
        let mut req_body = None;
        let mut resp_body = None;
        let mut events = Vec::new();
        let mut peer = None;
        let mut hit_obj = None;
        let mut seen_start = false;
        let mut last_ts = 0u64;
        for v in &chain {
            for r in self.records(*v) {
                match r.tag.as_str() {
                    "Timestamp" => {
                        let (label, t) = ts(r);
                        if label == "Start" && !seen_start {
                            seen_start = true;
                        } else {
                            events.push((label, t));
                        }
                        last_ts = t;
                    }
                    "Link" => {
                        let f: Vec<&str> = r.data.split_whitespace().collect();
                        match (f.first().copied(), f.get(2).copied()) {
                            (Some("req"), Some("restart")) => events.push(("varnish.restart".into(), last_ts)),
                            (Some("bereq"), Some("retry")) => events.push(("varnish.retry".into(), last_ts)),
                            _ => {}
                        }
                    }
                    "RespStatus" | "BerespStatus" => status = Some(r.data.trim().parse().unwrap()),
                    "ReqAcct" | "BereqAcct" => {
                        let f: Vec<i64> = r.data.split_whitespace().map(|x| x.parse().unwrap()).collect();
                        assert_eq!(f.len(), 6, "bad {r:?}");
                        req_body = Some(f[1]);
                        resp_body = Some(f[4]);
                    }
                    "BackendOpen" => {
                        let f: Vec<&str> = r.data.split_whitespace().collect();
                        peer = Some((f[1].to_owned(), f[2].to_owned(), f[3].parse().unwrap()));
                    }
                    "Hit" => hit_obj = Some(r.data.split_whitespace().next().unwrap().parse().unwrap()),
                    _ => {}
                }
            }
        }
        Expected { chain, backend, start_ns, end_ns, status, req_body, resp_body, events, peer, hit_obj }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
         0 CLI            - Rd ping
      1002 Begin          b bereq 1001 fetch
      1002 Timestamp      b Start: 1795304653.041300 0.000000 0.000000
      1002 BerespStatus   b 404
      1002 Timestamp      b Beresp: 1795304653.041400 0.000100 0.000100
      1002 Timestamp      b Retry: 1795304653.041410 0.000110 0.000010
      1002 Link           b bereq 1003 retry
      1002 End            b 
      1003 Begin          b bereq 1002 retry
      1003 Timestamp      b Start: 1795304653.041420 0.000120 0.000010
      1003 BackendOpen    b 27 default 127.0.0.1 40123 127.0.0.1 51234 connect
      1003 BerespStatus   b 200
      1003 Timestamp      b BerespBody: 1795304653.041500 0.000200 0.000080
      1003 BereqAcct      b 100 0 100 150 42 192
      1003 End            b 
      1001 Begin          c req 1000 rxreq
      1001 Timestamp      c Start: 1795304653.041162 0.000000 0.000000
      1001 RespStatus     c 200
      1001 Timestamp      c Resp: 1795304653.041600 0.000438 0.000100
      1001 ReqAcct        c 78 0 78 250 42 292
      1001 End            c
";

    #[test]
    fn parses_raw_lines_and_follows_retries() {
        let vsl = Vsl::parse(SAMPLE);
        assert_eq!(vsl.records(0).len(), 1);
        assert_eq!(vsl.records(1002).len(), 7);
        assert_eq!(vsl.records(1002)[6], VslRecord { vxid: 1002, tag: "End".into(), kind: 'b', data: "".into() });
        assert_eq!(vsl.chain_ending_at(1003), vec![1002, 1003]);
        assert_eq!(vsl.final_of(1002), 1003);
        let e = vsl.expected(1003);
        assert!(e.backend);
        assert_eq!(e.start_ns, 1_795_304_653_041_300_000);
        assert_eq!(e.end_ns, 1_795_304_653_041_500_000);
        assert_eq!(e.status, Some(200));
        assert_eq!((e.req_body, e.resp_body), (Some(0), Some(42)));
        assert_eq!(e.peer, Some(("default".into(), "127.0.0.1".into(), 40123)));
        let names: Vec<&str> = e.events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["Beresp", "Retry", "varnish.retry", "Start", "BerespBody"]);
        assert_eq!(e.events[2].1, 1_795_304_653_041_410_000);

        let c = vsl.expected(1001);
        assert!(!c.backend);
        assert_eq!(c.chain, vec![1001]);
        assert_eq!(c.start_ns, 1_795_304_653_041_162_000);
        assert_eq!(c.end_ns, 1_795_304_653_041_600_000);
        assert_eq!(c.resp_body, Some(42));
        assert_eq!(vsl.transactions(|b| b.starts_with("req ")), vec![1001]);
    }

    #[test]
    fn timestamps_are_exact() {
        assert_eq!(parse_ts("1795304653.041162"), 1_795_304_653_041_162_000);
        assert_eq!(parse_ts("1.5"), 1_500_000_000);
    }
}
