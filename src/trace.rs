//! Starting spans: turning the incoming trace context into a new span record and the context we
//! send on. Plain Rust over byte slices, so every rule is unit-tested without Varnish.
//!
//! Sampling is decided here, once, by the sampler passed in (`sampling`; by default
//! `parentbased_always_on`). An unsampled span is not exported, but its context still propagates
//! with the sampled flag unset.

use crate::ids::{SpanId, TraceId};
use crate::propagation::{traceparent, tracestate};
use crate::sampling::Sampler;
use crate::span::{SpanKind, SpanRecord};

/// Only the sampled flag is defined by W3C Trace Context Level 1; unknown bits are not forwarded.
pub const FORWARDED_FLAGS: u8 = 0x01;

/// Where the parent of a new span comes from.
pub enum Parent<'a> {
    /// Header fields from another process (the client, or the client side for a fetch).
    Headers { traceparent: &'a [&'a [u8]], tracestate: &'a [&'a [u8]], too_many_fields: bool },
    /// A span of this process (the parent request of an ESI sub-request).
    Local { trace_id: TraceId, span_id: SpanId, flags: u8, tracestate: Option<String> },
    /// A context from another propagation format (B3, Jaeger): `ids` when the caller sent a
    /// span to continue; `sampled` its decision, `None` when it deferred it to us; `debug` its
    /// debug flag (B3 `d` or `X-B3-Flags: 1`, Jaeger flag 2), which implies sampled.
    Other { ids: Option<(TraceId, SpanId)>, sampled: Option<bool>, debug: bool },
}

/// What a new span starts with, and all that an unsampled request keeps: the span record, a few
/// hundred bytes to build, move and drop, is made from it only for a span that needs one.
#[derive(Clone, Debug, PartialEq)]
pub struct SpanContext {
    pub kind: SpanKind,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// `None` for a root span.
    pub parent_span_id: Option<SpanId>,
    /// The parent came from another process (an incoming `traceparent`).
    pub parent_is_remote: bool,
    /// W3C trace-flags as sent downstream (bit 0: sampled).
    pub flags: u8,
    /// The validated, combined `tracestate` of the parent.
    pub tracestate: Option<String>,
}

impl SpanContext {
    fn new(kind: SpanKind, trace_id: TraceId, span_id: SpanId, parent_span_id: Option<SpanId>) -> Self {
        SpanContext { kind, trace_id, span_id, parent_span_id, parent_is_remote: false, flags: 1, tracestate: None }
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    pub fn into_record(self) -> Box<SpanRecord> {
        let mut record = crate::span_pool::record(self.kind, self.trace_id, self.span_id, self.parent_span_id);
        record.parent_is_remote = self.parent_is_remote;
        record.flags = self.flags;
        record.tracestate = self.tracestate;
        record
    }

    /// The `traceparent` to send downstream, NUL-terminated for Varnish.
    pub fn outgoing_traceparent(&self) -> [u8; 56] {
        nul_terminated_traceparent(&self.trace_id, &self.span_id, self.flags)
    }
}

/// A new span and what to tell the operator about the incoming context.
pub struct Started {
    pub context: SpanContext,
    /// Why the incoming context was not used (the trace was restarted), for a VSL line.
    pub restarted_because: Option<&'static str>,
    /// Why the incoming `tracestate` was dropped, for a VSL line.
    pub tracestate_dropped_because: Option<&'static str>,
    /// The caller's sampling decision, when it sent one.
    pub caller_sampled: Option<bool>,
    /// The caller asked for a debug trace (B3, Jaeger): what we send on keeps the flag.
    pub caller_debug: bool,
}

pub fn start(kind: SpanKind, parent: Parent<'_>, remote_parent: bool, sampler: &Sampler) -> Started {
    let mut restarted_because = None;
    let mut tracestate_dropped_because = None;
    let mut caller_sampled = None;
    let mut caller_debug = false;
    let span_id = SpanId::random();
    let mut context;
    match parent {
        Parent::Headers { traceparent: tp, tracestate: ts, too_many_fields } => {
            let parsed = if too_many_fields { Err(traceparent::Invalid::Repeated) } else { traceparent::parse(tp) };
            match parsed {
                Ok(Some(ctx)) => {
                    caller_sampled = Some(ctx.sampled());
                    context = SpanContext::new(kind, TraceId(ctx.trace_id), span_id, Some(SpanId(ctx.span_id)));
                    context.parent_is_remote = remote_parent;
                    context.flags = u8::from(sampler.decide(&context.trace_id, Some(ctx.sampled())));
                    // tracestate is only meaningful with a valid traceparent.
                    match tracestate::combine(ts) {
                        Ok(state) => context.tracestate = state,
                        Err(e) => tracestate_dropped_because = Some(e.as_str()),
                    }
                }
                Ok(None) => {
                    context = SpanContext::new(kind, TraceId::random(), span_id, None);
                    context.flags = u8::from(sampler.decide(&context.trace_id, None));
                }
                Err(e) => {
                    restarted_because = Some(e.as_str());
                    context = SpanContext::new(kind, TraceId::random(), span_id, None);
                    context.flags = u8::from(sampler.decide(&context.trace_id, None));
                }
            }
        }
        Parent::Other { ids, sampled, debug } => {
            caller_sampled = sampled;
            caller_debug = debug;
            match ids {
                Some((trace_id, parent_id)) => {
                    context = SpanContext::new(kind, trace_id, span_id, Some(parent_id));
                    context.parent_is_remote = remote_parent;
                    context.flags = u8::from(sampler.decide(&context.trace_id, sampled));
                }
                None => {
                    // B3's sampling-only form: a new trace with the caller's decision.
                    context = SpanContext::new(kind, TraceId::random(), span_id, None);
                    let decided = sampled.unwrap_or_else(|| sampler.decide(&context.trace_id, None));
                    context.flags = u8::from(decided);
                }
            }
        }
        Parent::Local { trace_id, span_id: parent_id, flags, tracestate } => {
            // A child of our own span shares its decision: one trace, one decision.
            context = SpanContext::new(kind, trace_id, span_id, Some(parent_id));
            context.flags = flags & FORWARDED_FLAGS;
            context.tracestate = tracestate;
        }
    }
    Started { context, restarted_because, tracestate_dropped_because, caller_sampled, caller_debug }
}

/// Makes `record` the root of a new trace (trust modes `ignore` and `link`): the incoming
/// context is not continued, its `tracestate` is dropped, the sampler decides afresh as for a
/// root, and with `link` the incoming context becomes a span link.
pub fn restart_as_root(record: &mut SpanRecord, sampler: &Sampler, link: bool) {
    if let Some(parent) = record.parent_span_id.take() {
        if link {
            record.add_link(record.trace_id, parent);
        }
        record.trace_id = TraceId::random();
    }
    record.parent_is_remote = false;
    record.tracestate = None;
    // Decided afresh even without a parent: a caller's bare sampling decision (B3's `b3: 1`)
    // must not count either.
    record.flags = u8::from(sampler.decide(&record.trace_id, None));
}

/// The caller's context as it came, kept so that VCL can change its mind with `trust()`.
#[derive(Clone, Debug, PartialEq)]
pub struct Incoming {
    pub trace_id: TraceId,
    /// `None` for a bare sampling decision (B3's sampling-only form).
    pub span_id: Option<SpanId>,
    pub sampled: Option<bool>,
    /// Filled in only when the context is set aside (`set_aside`): while the span continues
    /// it, the record holds it, and every request need not copy it.
    pub tracestate: Option<String>,
}

impl Incoming {
    /// What a just-started span took from its caller, if anything.
    pub fn of(record: &SpanRecord, caller_sampled: Option<bool>) -> Option<Incoming> {
        (record.parent_span_id.is_some() || caller_sampled.is_some()).then_some(Incoming {
            trace_id: record.trace_id,
            span_id: record.parent_span_id,
            sampled: caller_sampled,
            tracestate: None,
        })
    }

    /// `record` stops continuing this context (`ignore`, `link`): keep its `tracestate` for a
    /// later `extract`, and make `record` a root.
    pub fn set_aside(&mut self, record: &mut SpanRecord, sampler: &Sampler, link: bool) {
        self.tracestate = record.tracestate.take();
        restart_as_root(record, sampler, link);
    }

    /// Makes `record` continue this context again (`trust("extract")` after `ignore`/`link`).
    pub fn restore(&mut self, record: &mut SpanRecord, sampler: &Sampler) {
        if let Some(parent) = self.span_id {
            record.links.retain(|l| !(l.trace_id == self.trace_id && l.span_id == parent));
            record.trace_id = self.trace_id;
            record.parent_span_id = Some(parent);
            record.parent_is_remote = true;
        }
        record.tracestate = self.tracestate.take();
        record.flags = match (self.span_id, self.sampled) {
            (None, Some(decided)) => u8::from(decided),
            (_, sampled) => u8::from(sampler.decide(&record.trace_id, sampled)),
        };
    }
}

/// The `traceparent` to send downstream for `record`, NUL-terminated for Varnish.
pub fn outgoing_traceparent(record: &SpanRecord) -> [u8; 56] {
    nul_terminated_traceparent(&record.trace_id, &record.span_id, record.flags)
}

/// The `traceparent` of a context, NUL-terminated for Varnish.
pub fn nul_terminated_traceparent(trace_id: &TraceId, span_id: &SpanId, flags: u8) -> [u8; 56] {
    let mut out = [0u8; 56];
    out[..55].copy_from_slice(&traceparent::format(&trace_id.0, &span_id.0, flags));
    out
}

/// Splits a request target into path and query, as `url.path` wants it.
pub fn url_path(url: &str) -> &str {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    &url[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &[u8] = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn start(kind: SpanKind, parent: Parent<'_>, remote: bool) -> Started {
        super::start(kind, parent, remote, &Sampler::default())
    }

    fn headers<'a>(tp: &'a [&'a [u8]], ts: &'a [&'a [u8]]) -> Parent<'a> {
        Parent::Headers { traceparent: tp, tracestate: ts, too_many_fields: false }
    }

    #[test]
    fn valid_parent_is_continued_with_a_new_span_id() {
        let s = start(SpanKind::Server, headers(&[TP], &[b"congo=t61rcWkgMzE"]), true);
        assert_eq!(s.context.trace_id.to_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(s.context.parent_span_id.unwrap().to_hex(), "b7ad6b7169203331");
        assert_ne!(s.context.span_id.to_hex(), "b7ad6b7169203331");
        assert!(s.context.parent_is_remote);
        assert!(s.context.sampled());
        assert_eq!(s.context.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        assert!(s.restarted_because.is_none());
    }

    #[test]
    fn unsampled_parent_stays_unsampled_downstream() {
        let tp: &[u8] = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        let s = start(SpanKind::Server, headers(&[tp], &[]), true);
        assert!(!s.context.sampled());
        let out = s.context.outgoing_traceparent();
        assert!(out[..55].ends_with(b"-00"));
        assert_eq!(out[55], 0);
    }

    #[test]
    fn invalid_parent_restarts_the_trace_and_drops_tracestate() {
        let bad: &[u8] = b"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01";
        let s = start(SpanKind::Server, headers(&[bad], &[b"a=1"]), true);
        assert!(s.restarted_because.is_some());
        assert!(s.context.parent_span_id.is_none());
        assert!(s.context.tracestate.is_none());
        assert!(s.context.sampled(), "a new trace is sampled (always_on root)");
    }

    #[test]
    fn two_traceparent_fields_restart_the_trace() {
        let s = start(SpanKind::Server, headers(&[TP, TP], &[]), true);
        assert!(s.restarted_because.is_some());
        assert_ne!(s.context.trace_id.to_hex(), "0af7651916cd43dd8448eb211c80319c");
    }

    #[test]
    fn too_many_fields_restart_the_trace() {
        let s = start(
            SpanKind::Server,
            Parent::Headers { traceparent: &[TP], tracestate: &[], too_many_fields: true },
            true,
        );
        assert!(s.restarted_because.is_some());
    }

    #[test]
    fn invalid_tracestate_is_dropped_but_the_parent_kept() {
        let s = start(SpanKind::Server, headers(&[TP], &[b"a=1,a=2"]), true);
        assert!(s.tracestate_dropped_because.is_some());
        assert!(s.context.tracestate.is_none());
        assert!(s.context.parent_span_id.is_some());
    }

    #[test]
    fn outgoing_traceparent_names_our_span_as_parent() {
        let s = start(SpanKind::Client, headers(&[TP], &[]), false);
        let out = s.context.outgoing_traceparent();
        let text = std::str::from_utf8(&out[..55]).unwrap();
        assert_eq!(text, format!("00-0af7651916cd43dd8448eb211c80319c-{}-01", s.context.span_id.to_hex()));
    }

    #[test]
    fn local_parent_keeps_trace_and_flags() {
        let s = start(
            SpanKind::Internal,
            Parent::Local { trace_id: TraceId([7; 16]), span_id: SpanId([8; 8]), flags: 0, tracestate: None },
            false,
        );
        assert_eq!(s.context.trace_id, TraceId([7; 16]));
        assert_eq!(s.context.parent_span_id, Some(SpanId([8; 8])));
        assert!(!s.context.sampled());
    }

    #[test]
    fn the_sampler_decides_new_traces_and_the_flag_follows() {
        let off = Sampler::from_env_values(Some("parentbased_always_off"), None).unwrap();
        let s = super::start(SpanKind::Server, headers(&[], &[]), true, &off);
        assert!(!s.context.sampled());
        assert!(s.context.outgoing_traceparent()[..55].ends_with(b"-00"));
        // ...while a sampled parent is still followed
        let s = super::start(SpanKind::Server, headers(&[TP], &[]), true, &off);
        assert!(s.context.sampled());
        // a non-parent-based sampler overrides the parent's flag
        let always_off = Sampler::from_env_values(Some("always_off"), None).unwrap();
        let s = super::start(SpanKind::Server, headers(&[TP], &[]), true, &always_off);
        assert!(!s.context.sampled());
    }

    #[test]
    fn url_path_drops_query_and_fragment() {
        assert_eq!(url_path("/a/b?x=1"), "/a/b");
        assert_eq!(url_path("/a#f"), "/a");
        assert_eq!(url_path("/"), "/");
    }
}
