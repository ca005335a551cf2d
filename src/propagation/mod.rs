//! W3C Trace Context propagation: parsing and formatting of the `traceparent`
//! and `tracestate` request header fields.
//!
//! Why this exists as hand-written, dependency-free code: Varnish hands us the
//! raw bytes of every header field separately, and the rules that decide
//! whether an incoming context is continued or a trace is restarted are subtle
//! (repeated fields, optional whitespace, future versions, case, limits). The
//! behaviour here follows the W3C Trace Context Level 1 Recommendation, and in
//! particular the single-hop cases that the official `w3c/trace-context` test
//! suite (`test/test.py`) checks, so that Varnish can pass that suite when it
//! sits between the harness and a backend. The unit tests in each submodule
//! replay those cases.
//!
//! * [`traceparent`]: strict, allocation-free parser and formatter.
//! * [`tracestate`]: validates and combines repeated fields into one
//!   normalised value that is safe to forward downstream.
//! * [`b3`]: Zipkin B3, single `b3` and multiple `X-B3-*` headers.
//! * [`jaeger`]: Jaeger `uber-trace-id` (and `uberctx-*` baggage items).
//! * [`baggage`]: W3C Baggage, parsed for reading and normalised for
//!   forwarding.

#![forbid(unsafe_code)]

pub mod b3;
pub mod baggage;
pub mod jaeger;
pub mod traceparent;
pub mod tracestate;
