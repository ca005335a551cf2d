//! The bodies of the VCL functions. `lib.rs` declares them to Varnish and guards each call;
//! here they read the request or fetch, start, annotate and hand over spans.
//!
//! Threading: every function runs on the Varnish worker thread executing the VCL of one task.

use std::ffi::CStr;
use std::sync::atomic::Ordering::Relaxed;

use varnish::vcl::Ctx;

use crate::config::{self, propagators, Trust};
use crate::ids::{SpanId, TraceId};
use crate::pipeline::{self, STATS};
use crate::span::{text_lossy, utf8_lossy, vtim_to_unix_nano, SpanKind, Text, Value, ValueRef};
use crate::trace::{self, outgoing_traceparent, Parent};
use crate::varnish::other_formats;
use crate::varnish::task::{self, Claim, EsiParent, Slot, TaskState, Unsampled};
use crate::varnish::{http, log, method};
use crate::{sampling, semconv};

/// Attribute keys longer than this are refused (OpenTelemetry sets no limit; a VCL typo that
/// builds a key from a header should not produce kilobyte keys).
pub const MAX_KEY_LEN: usize = 255;

pub fn trace_request(ctx: &mut Ctx) {
    if pipeline::disabled() {
        return;
    }
    // SAFETY: ctx->req is NULL or the request whose VCL is running, for the whole call.
    let Some(req) = (unsafe { ctx.raw.req.as_ref() }) else {
        log::vcl(ctx, "trace_request() is for client subroutines (vcl_recv); ignored");
        return;
    };
    let mut room = match task::claim(ctx) {
        Claim::Free(room) => room,
        Claim::Held(Slot::Traced(state)) => {
            // Called again in the same task: a restart (new VXID, same span) or a repeated call.
            if req.restarts > state.repeats_seen {
                state.repeats_seen = req.restarts;
                if state.record.sampled() {
                    // The transaction before the restart is in the shared log now, not in the
                    // task's buffer: the tailer reads it there.
                    crate::vsl::tailer::log_needed();
                }
                state.record.add_event(vtim_to_unix_nano(ctx.raw.now.0), "varnish.restart");
                // The restarted request looks the object up again: its result replaces the last,
                // and a hit's age and TTL go with it (a miss or pass after the restart has none).
                state.cache_result_known = false;
                state.record.outcome.object_age = None;
                state.record.outcome.object_ttl = None;
            }
            return;
        }
        // The same, for a request that is not sampled: nothing to record.
        Claim::Held(_) => return,
    };
    let hot = config::hot();
    // SAFETY: ctx.raw is the running request's context.
    let (mut state, started) = unsafe { start_client_span(ctx.raw, req, &sampling::active(), hot, true) };
    if let Some(why) = started.restarted_because {
        log::vcl(ctx, format!("invalid traceparent ({why}): starting a new trace"));
    }
    if let Some(why) = started.tracestate_dropped_because {
        log::vcl(ctx, format!("invalid tracestate ({why}): dropped"));
    }
    STATS.spans_started.add(1);
    // The common case at low sampling rates: keep only the decision and its IDs; `state()`
    // builds the same (unsampled) context if the task ever needs it.
    if let Some(u) = started.decision_only {
        if room.unsampled(ctx, u) {
            return;
        }
        // No room for the decision, in the table or the workspace: the full state (on the heap
        // when the task has a slot for it; with no room for a slot either, `no_room` logs it).
        // SAFETY: as above.
        state = Some(unsafe { unsampled_state(ctx.raw, req, u) });
    }
    let Some(state) = state else { return };
    match room.traced(ctx, state) {
        Ok(state) if state.record.sampled() => crate::vsl::tailer::track(state.record.vxid),
        Ok(_) => {}
        Err(state) => no_room(ctx, &state),
    }
}

/// A task whose workspace had no room for its slot (`task::new_priv_slot`): the span goes
/// unrecorded, counted when it was sampled (an unsampled one loses nothing), and the trace
/// context is not sent on from this task.
fn no_room(ctx: &mut Ctx, state: &TaskState) {
    if state.record.sampled() {
        STATS.spans_dropped_workspace.fetch_add(1, Relaxed);
        log::vcl(ctx, "out of workspace: sampled span not recorded (spans_dropped_workspace)");
    } else {
        log::vcl(ctx, "out of workspace: sampling decision not kept");
    }
}

/// What `start_client_span` found besides the state: VSL lines to write, and, for an unsampled
/// span whose decision is all the task needs to keep, that decision.
struct ClientStart {
    restarted_because: Option<&'static str>,
    tracestate_dropped_because: Option<&'static str>,
    decision_only: Option<Unsampled>,
}

/// Starts the span of the running client request: from its headers (top level) or from the
/// request that included it (ESI). With `decision_only`, returns no state for an unsampled span
/// that can be kept as `Unsampled` (top level, the caller's context continued): the caller keeps
/// only that.
///
/// # Safety
/// `raw` and `req` must be the running client task's context and request.
unsafe fn start_client_span(
    raw: &varnish::ffi::vrt_ctx,
    req: &varnish::ffi::req,
    sampler: &sampling::Sampler,
    hot: config::Hot,
    decision_only: bool,
) -> (Option<TaskState>, ClientStart) {
    let esi_level = req.esi_level;
    // SAFETY: the header tables of the running request stay valid during this call.
    let own = http::trace_fields(req.http);
    // Whether the caller's context was a `traceparent` (a B3/Jaeger one brings its debug flag).
    let mut from_traceparent = false;
    let started = if esi_level == 0 {
        let parent = incoming(req.http, &own, hot.propagators);
        from_traceparent = matches!(parent, Parent::Headers { .. });
        trace::start(SpanKind::Server, parent, true, sampler)
    } else {
        // ESI: the sub-request holds the client's original headers; the parent is the request
        // that included it (published in its vcl_deliver on this thread), when it belongs to
        // the same top request (a cached page never rewrote its headers, so they cannot tell).
        let top_req = req.top as usize;
        match task::esi_parent(esi_level).filter(|p| p.top == top_req) {
            Some(p) => trace::start(
                SpanKind::Internal,
                Parent::Local { trace_id: p.trace_id, span_id: p.span_id, flags: p.flags, tracestate: None },
                false,
                sampler,
            ),
            // Untraced parent: the client's context, if it is trusted; a new trace otherwise.
            None if hot.trust == Trust::Extract => {
                let top = http::trace_fields(raw.http_req_top.0);
                let parent = Parent::Headers {
                    traceparent: &top.traceparent,
                    tracestate: &top.tracestate,
                    too_many_fields: top.too_many,
                };
                trace::start(SpanKind::Internal, parent, false, sampler)
            }
            None => trace::start(
                SpanKind::Internal,
                Parent::Other { ids: None, sampled: None, debug: false },
                false,
                sampler,
            ),
        }
    };
    let mut info = ClientStart {
        restarted_because: started.restarted_because,
        tracestate_dropped_because: started.tracestate_dropped_because,
        decision_only: None,
    };
    if decision_only && esi_level == 0 && hot.trust == Trust::Extract && !started.context.sampled() {
        let r = &started.context;
        info.decision_only = Some(Unsampled {
            trace_id: r.trace_id,
            span_id: r.span_id,
            parent_span_id: r.parent_span_id,
            parent_is_remote: r.parent_is_remote,
            flags: r.flags,
            caller_sampled: started.caller_sampled,
            tracestate_applies: r.tracestate.is_some(),
            had_tracestate: !own.tracestate.is_empty(),
        });
        return (None, info);
    }
    let caller_sampled = started.caller_sampled;
    let mut record = started.context.into_record();
    record.start_unix_nano = vtim_to_unix_nano(req.t_first.0);
    record.vxid = crate::varnish::vxid_of(raw.vsl);
    let mut incoming = if esi_level == 0 { trace::Incoming::of(&record, caller_sampled) } else { None };
    let mut trust = Trust::Extract;
    if let Some(inc) = incoming.as_mut().filter(|_| hot.trust != Trust::Extract) {
        inc.set_aside(&mut record, sampler, hot.trust == Trust::Link);
        trust = hot.trust;
    }
    // An unsampled span is never exported: it only carries the context, so skip the rest.
    let described = record.sampled();
    if described {
        server_attributes(raw, req, &mut record, hot.trust == Trust::Extract);
    }
    // The context is written into the request only when it goes to a backend (see
    // `cache_result`): a cache hit, the common case, never pays for the header.
    let mut state = TaskState::new(record);
    state.repeats_seen = req.restarts;
    state.had_tracestate = !own.tracestate.is_empty();
    state.described = described;
    state.incoming = incoming;
    state.trust = trust;
    // SAFETY: the request's header table, valid for the call.
    state.debug = started.caller_debug
        || (from_traceparent && unsafe { other_formats::debug_requested(req.http, hot.propagators) });
    (Some(state), info)
}

/// The state of the current task, built now for an unsampled request that kept only its
/// decision (see `trace_request`).
fn state<'a>(ctx: &Ctx) -> Option<&'a mut TaskState> {
    match task::slot(ctx) {
        Slot::Traced(state) => Some(state),
        Slot::Empty => None,
        Slot::Unsampled(u) => adopt(ctx, u),
    }
}

/// Builds and attaches the full state of an unsampled request that kept only `u`. For client
/// tasks only: its callers are `sample()` and `trust()` (through `state`, in vcl_recv),
/// `finish()` (telling the client the context: traceresponse, Server-Timing) and
/// `cache_result()` (a fetch follows and the caller sent a tracestate). An unsampled fetch's
/// marker (`trace_backend`) is never adopted: without a request, `None`.
fn adopt<'a>(ctx: &Ctx, u: Unsampled) -> Option<&'a mut TaskState> {
    // SAFETY: ctx->req is NULL or the running client task's request.
    let req = unsafe { ctx.raw.req.as_ref()? };
    // SAFETY: as above.
    task::install(ctx, unsafe { unsampled_state(ctx.raw, req, u) }).ok()
}

/// The state an unsampled request would have had from the start: the context it was decided on
/// (IDs, parent, flags), with the caller's `tracestate` read again from the request (a rollback
/// restores the headers it came with; VCL could have edited it meanwhile).
///
/// # Safety
/// `raw` and `req` must be the running client task's context and request.
unsafe fn unsampled_state(raw: &varnish::ffi::vrt_ctx, req: &varnish::ffi::req, u: Unsampled) -> TaskState {
    let mut record = crate::span_pool::record(SpanKind::Server, u.trace_id, u.span_id, u.parent_span_id);
    record.parent_is_remote = u.parent_is_remote;
    record.flags = u.flags;
    record.start_unix_nano = vtim_to_unix_nano(req.t_first.0);
    record.vxid = crate::varnish::vxid_of(raw.vsl);
    if u.tracestate_applies {
        let own = http::trace_fields(req.http);
        record.tracestate = crate::propagation::tracestate::combine(&own.tracestate).ok().flatten();
    }
    let incoming = trace::Incoming::of(&record, u.caller_sampled);
    let mut state = TaskState::new(record);
    state.repeats_seen = req.restarts;
    state.had_tracestate = u.had_tracestate;
    state.incoming = incoming;
    state
}

pub fn trace_backend(ctx: &mut Ctx) {
    if pipeline::disabled() {
        return;
    }
    // SAFETY: ctx->bo is NULL or the fetch whose VCL is running, for the whole call.
    let Some(bo) = (unsafe { ctx.raw.bo.as_ref() }) else {
        log::vcl(ctx, "trace_backend() is for backend subroutines (vcl_backend_fetch); ignored");
        return;
    };
    let mut room = match task::claim(ctx) {
        Claim::Free(room) => room,
        Claim::Held(Slot::Traced(state)) => {
            // Called again (a retry, or after VCL changed the bereq): send our context again.
            if bo.retries > state.repeats_seen {
                state.repeats_seen = bo.retries;
                if state.record.sampled() {
                    // The failed attempt's records are in the shared log now (as for a restart).
                    crate::vsl::tailer::log_needed();
                }
                state.record.add_event(vtim_to_unix_nano(ctx.raw.now.0), "varnish.retry");
                if state.record.sampled() && bo.uncacheable() == 0 {
                    // The retry's VXID is the one the object will record as its fetch's (a hit
                    // may come while it streams in, before this task's end).
                    let r = &state.record;
                    crate::vsl::fetch_links::GLOBAL.remember(task::current_vxid(ctx), r.trace_id, r.span_id);
                }
            }
            unsafe { write_context(bo.bereq, &Outgoing::of(state)) };
            return;
        }
        Claim::Held(Slot::Unsampled(u)) => {
            // The same for an unsampled fetch. Only a fetch whose bereq had no tracestate keeps
            // only its decision (see below): there is none of ours to send, and VCL's own stays.
            let out = Outgoing {
                trace_id: &u.trace_id,
                span_id: &u.span_id,
                flags: u.flags,
                tracestate: OutgoingTracestate::Keep,
                debug: false,
            };
            // SAFETY: the bereq of the running fetch (a retry starts from the bereq as it was
            // before vcl_backend_fetch: usually what it sent already, left as it is).
            unsafe {
                if !already_sent(bo.bereq, &out) {
                    write_context(bo.bereq, &out);
                }
            }
            return;
        }
        Claim::Held(Slot::Empty) => return, // not given by `claim`
    };
    let fields = unsafe { http::trace_fields(bo.bereq) };
    // Read once: the context read and the one sent on follow the same formats.
    let propagators = config::hot().propagators;
    // SAFETY: the bereq of the running fetch.
    let parent = unsafe { incoming(bo.bereq, &fields, propagators) };
    let from_traceparent = matches!(parent, Parent::Headers { .. });
    let started = trace::start(SpanKind::Client, parent, false, &sampling::active());
    if let Some(why) = started.restarted_because {
        log::vcl(ctx, format!("invalid bereq traceparent ({why}): starting a new trace"));
    }
    STATS.spans_started.add(1);
    if !started.context.sampled() && fields.tracestate.is_empty() {
        // The common fetch at low sampling rates: send the context on and keep only the decision,
        // as an unsampled request does: no span record, no state to build and close. (A debug
        // flag only goes on with a sampled span.)
        let c = &started.context;
        let (span_id, parent_span_id) = if continues_unchanged(&fields, &started, propagators) {
            // The bereq already says what to send: an unsampled context (its request's, as
            // `cache_result` wrote it, or the caller's). The fetch goes on under that span ID
            // (the fetch's span is not recorded) instead of rewriting the header with an ID of
            // its own: that cost about 1,500 instructions (Varnish's `http_Unset` and
            // `http_SetHeader`, each logged). It is then that span, whose parent we do not know.
            (c.parent_span_id.unwrap_or(c.span_id), None)
        } else {
            let out = Outgoing {
                trace_id: &c.trace_id,
                span_id: &c.span_id,
                flags: c.flags,
                tracestate: outgoing_tracestate(c.tracestate.as_deref(), !fields.tracestate.is_empty()),
                debug: false,
            };
            // SAFETY: the bereq of the running fetch.
            unsafe { write_context(bo.bereq, &out) };
            (c.span_id, c.parent_span_id)
        };
        let u = Unsampled {
            trace_id: c.trace_id,
            span_id,
            parent_span_id,
            parent_is_remote: c.parent_is_remote,
            flags: c.flags,
            caller_sampled: started.caller_sampled,
            tracestate_applies: c.tracestate.is_some(),
            had_tracestate: !fields.tracestate.is_empty(),
        };
        if room.unsampled(ctx, u) {
            return;
        }
        // No room for the decision, in the table or the workspace: the full state below (on the
        // heap when the task has a slot for it; with no room for a slot either, `no_room`).
    }
    // SAFETY: the bereq of the running fetch.
    let debug = started.caller_debug
        || (from_traceparent && unsafe { other_formats::debug_requested(bo.bereq, config::hot().propagators) });
    let mut record = started.context.into_record();
    record.start_unix_nano = vtim_to_unix_nano(bo.t_first.0);
    record.vxid = task::current_vxid(ctx);
    if record.sampled() {
        // SAFETY: the bereq of the running fetch.
        unsafe { client_attributes(bo.bereq, &mut record) };
    }
    let mut state = TaskState::new(record);
    state.repeats_seen = bo.retries;
    state.had_tracestate = !fields.tracestate.is_empty();
    state.debug = debug;
    let uncacheable = bo.uncacheable() != 0;
    // Attached first: a span with no room is not announced downstream either.
    let state = match room.traced(ctx, state) {
        Ok(state) => state,
        Err(state) => return no_room(ctx, &state),
    };
    // SAFETY: the bereq of the running fetch.
    unsafe { write_context(bo.bereq, &Outgoing::of(state)) };
    // Only a sampled span is finished (and so forgotten) by its task's end: an unsampled one
    // (here with a `tracestate` to carry on) followed by the tailer would hold its place there
    // until `Limits::max_age`.
    if state.record.sampled() {
        if !uncacheable {
            // A hit on the object this fetch stores links to its span, even while it streams
            // in. Not for a pass: its object is never a hit (the table keeps its room for those).
            let r = &state.record;
            crate::vsl::fetch_links::GLOBAL.remember(r.vxid, r.trace_id, r.span_id);
        }
        crate::vsl::tailer::track(state.record.vxid);
    }
}

/// Records what the end of a VCL phase knows: the response status VCL sees, a failed fetch,
/// and, in `vcl_deliver`, this request as the parent of its ESI sub-requests.
///
/// Returns true when the status Varnish will send may differ from the one VCL sees (a
/// conditional or range request, answered 304 or 206 after `vcl_deliver`) and the span is
/// sampled: the include then adds the `opentracing` delivery filter, which reads the final
/// status. Other requests skip the filter and its cost.
pub fn finish(ctx: &mut Ctx) -> bool {
    if pipeline::disabled() {
        return false;
    }
    let m = ctx.raw.method;
    let state = match task::slot(ctx) {
        Slot::Traced(state) => state,
        Slot::Empty => return false,
        Slot::Unsampled(u) => {
            if m != method::DELIVER && m != method::SYNTH {
                return false;
            }
            let hot = config::hot();
            // SAFETY: in vcl_deliver/vcl_synth ctx->req is valid.
            let req = unsafe { &*ctx.raw.req };
            if !(hot.traceresponse || hot.server_timing) || req.esi_level > 0 {
                // Nothing to record; ESI sub-requests continue this (unsampled) context.
                let parent =
                    EsiParent { trace_id: u.trace_id, span_id: u.span_id, flags: u.flags, top: req.top as usize };
                task::publish_esi_parent(req.esi_level, parent);
                return false;
            }
            // The client is told the context: build it.
            let Some(state) = adopt(ctx, u) else { return false };
            state
        }
    };
    let mut want_filter = false;
    match m {
        method::DELIVER | method::SYNTH => {
            // SAFETY: in vcl_deliver/vcl_synth ctx->req and its resp are valid.
            let (status, level) = unsafe {
                let req = &*ctx.raw.req;
                (http::status(req.resp), req.esi_level)
            };
            state.status_vcl = Some(status);
            if !state.cache_result_known && state.record.sampled() {
                // SAFETY: ctx->req is valid in vcl_deliver/vcl_synth; its objcore is the object
                // delivered (a hit) or NULL.
                let req = unsafe { &*ctx.raw.req };
                if m == method::DELIVER && req.is_hit() != 0 {
                    // A fresh hit: the include does not call cache_result() for it. (One that
                    // vcl_hit turned into a synth never gets here: vcl_synth cannot tell it
                    // from another synth, the log's `Hit` record can; see `correlate`.)
                    record_cache_result(state, req, ctx.raw.now.0, "hit".into());
                } else if m == method::SYNTH {
                    state.record.outcome.cache_result = Some("synth".into());
                    state.cache_result_known = true;
                }
            }
            let r = &state.record;
            // SAFETY: ctx->req is valid in vcl_deliver/vcl_synth.
            let top = unsafe { (*ctx.raw.req).top as usize };
            task::publish_esi_parent(
                level,
                EsiParent { trace_id: r.trace_id, span_id: r.span_id, flags: r.flags, top },
            );
            // SAFETY: ctx->req is valid in vcl_deliver/vcl_synth.
            let (req_http, resp) = unsafe { ((*ctx.raw.req).http, (*ctx.raw.req).resp) };
            want_filter = r.sampled() && status == 200 && unsafe { http::is_conditional(req_http) };
            let hot = config::hot();
            if (hot.traceresponse || hot.server_timing) && level == 0 {
                // SAFETY: the response of the running request.
                unsafe { tell_the_client(resp, &state.record, hot) };
            }
            if state.record.sampled() && hot.captures_server_response {
                let spans = config::active_spans();
                // SAFETY: as above.
                unsafe {
                    capture_headers(
                        resp,
                        &spans.server_response_headers,
                        "http.response.header.",
                        &spans,
                        &mut state.record,
                    )
                };
            }
        }
        method::BACKEND_RESPONSE => {
            state.status_vcl = Some(unsafe { http::status(ctx.raw.http_beresp.0) });
            if state.record.sampled() && config::hot().captures_client {
                let spans = config::active_spans();
                // SAFETY: bereq and beresp of the running fetch, in vcl_backend_response.
                unsafe {
                    capture_headers(
                        ctx.raw.http_bereq.0,
                        &spans.client_request_headers,
                        "http.request.header.",
                        &spans,
                        &mut state.record,
                    );
                    capture_headers(
                        ctx.raw.http_beresp.0,
                        &spans.client_response_headers,
                        "http.response.header.",
                        &spans,
                        &mut state.record,
                    );
                }
            }
        }
        method::BACKEND_ERROR => state.fetch_failed = true,
        method::PIPE => {
            state.record.outcome.cache_result = Some("pipe".into());
            state.cache_result_known = true;
        }
        _ => log::vcl(
            ctx,
            "finish() is for vcl_deliver, vcl_synth, vcl_pipe, vcl_backend_response and vcl_backend_error; ignored",
        ),
    }
    if state.record.sampled() {
        // SAFETY: ctx->vsl is the running task's log, read within this call.
        if unsafe { crate::vsl::task_log::written_out_early(ctx.raw.vsl, state.record.vxid) } {
            // Part of the span's log is in the shared log already (a full buffer was written
            // out): the tailer reads it there, now rather than at the task's end.
            crate::vsl::tailer::log_needed();
        }
    }
    want_filter
}

/// Records how the cache served the request. `synth` never replaces an earlier result. (A fresh
/// hit is recorded by `finish()` in vcl_deliver; a `return (synth())` from its vcl_hit becomes a
/// hit again when the log's `Hit` record is merged.)
///
/// It is also where the span's context is written into what goes to the backend, because the
/// include calls it exactly where a fetch follows: `miss` and `pass` (the bereq is built from
/// the req after them), `pipe` (the bereq exists already), and a `hit` on a stale object (a
/// background fetch starts when `vcl_hit` returns).
pub fn cache_result(ctx: &mut Ctx, result: &CStr) {
    if pipeline::disabled() {
        return;
    }
    // SAFETY: ctx->req is NULL or the running request.
    let Some(req) = (unsafe { ctx.raw.req.as_ref() }) else {
        log::vcl(ctx, "cache_result() is for client subroutines; ignored");
        return;
    };
    let m = ctx.raw.method;
    let now = ctx.raw.now.0;
    let bereq = ctx.raw.http_bereq.0;
    let target = match m {
        method::MISS | method::PASS => req.http,
        method::PIPE => bereq,
        // SAFETY: in vcl_hit req->objcore is the object found.
        method::HIT if unsafe { is_stale(req) } => req.http,
        _ => std::ptr::null_mut(),
    };
    // An unsampled request that kept only its decision needs its context only where a fetch
    // follows (the common unsampled cache hit needs nothing), and sends it on from the decision
    // (building its full state cost 1,000 instructions per unsampled miss or pass).
    let state = match task::slot(ctx) {
        Slot::Traced(state) => state,
        // With a tracestate, the full state keeps the validated value, so that what a retry or
        // restart sends is what was validated, not the header VCL may have changed since.
        Slot::Unsampled(u) if !u.had_tracestate => {
            if !target.is_null() {
                // SAFETY: a header table of the running request, and the request.
                unsafe { write_unsampled_context(target, req, &u) };
            }
            return;
        }
        Slot::Unsampled(u) if !target.is_null() => match adopt(ctx, u) {
            Some(state) => state,
            None => return,
        },
        Slot::Unsampled(_) => return,
        Slot::Empty => return,
    };
    if !target.is_null() {
        // SAFETY: a header table of the running task.
        unsafe { write_context(target, &Outgoing::of(state)) };
    }
    if !state.record.sampled() {
        return;
    }
    let result = result.to_bytes();
    if result == b"synth" && state.cache_result_known {
        return;
    }
    let value: Text = match result {
        // SAFETY: in vcl_hit req->objcore is the object found.
        b"hit" if m == method::HIT && unsafe { is_stale(req) } => Text::const_new("grace"),
        b"hit" => Text::const_new("hit"),
        b"miss" if req.is_hitmiss() != 0 => Text::const_new("hit-for-miss"),
        b"miss" => Text::const_new("miss"),
        b"pass" if req.is_hitpass() != 0 => Text::const_new("hit-for-pass"),
        b"pass" => Text::const_new("pass"),
        b"pipe" => Text::const_new("pipe"),
        b"synth" => Text::const_new("synth"),
        other => text_lossy(other),
    };
    if m == method::HIT {
        record_cache_result(state, req, now, value);
    } else {
        state.record.outcome.cache_result = Some(value);
        state.cache_result_known = true;
    }
}

/// Records a hit's result (`hit`, `grace`), with the object's age and remaining TTL at `now`.
/// `req` is the running request in vcl_hit or vcl_deliver, where its objcore is the object.
fn record_cache_result(state: &mut TaskState, req: &varnish::ffi::req, now: f64, value: Text) {
    // SAFETY: req->objcore is NULL or the object found, for the running subroutine.
    if let Some(oc) = unsafe { req.objcore.as_ref() } {
        let age = now - oc.t_origin.0;
        // In the outcome rather than the attributes: no search of them (two `set`s cost about
        // 360 instructions per hit, callgrind).
        state.record.outcome.object_age = Some(round(age * 1000.0) / 1000.0);
        state.record.outcome.object_ttl = Some(round((f64::from(oc.ttl) - age).max(0.0)));
    }
    state.record.outcome.cache_result = Some(value);
    state.cache_result_known = true;
}

/// `f64::round` (halves away from zero) without its call to libm's `round`, which the
/// baseline x86-64 target has no instruction for: about 25 instructions each, two per hit
/// (callgrind). Exact for every magnitude: from 2^52 up a double has no fraction; below, the
/// fraction `x - trunc(x)` is exact.
fn round(x: f64) -> f64 {
    if x.is_nan() || x.abs() >= 4_503_599_627_370_496.0 {
        return x; // whole already, or not a number, or an infinity
    }
    let whole = (x as i64 as f64).copysign(x);
    let fraction = x - whole;
    if fraction >= 0.5 {
        whole + 1.0
    } else if fraction <= -0.5 {
        whole - 1.0
    } else {
        whole
    }
}

/// Whether the object found by a hit is past its TTL (served in grace, with a background fetch):
/// as Varnish's lookup decides it, against the time the request's headers were complete
/// (`t_req`). `req.ttl` plays no part: the lookup treats an object older than it as a miss, so
/// vcl_hit never sees one. The include asks the same in VCL (`obj.ttl <= 0s`) before calling
/// `cache_result`.
///
/// # Safety
/// `req` must be the running request, in `vcl_hit`.
unsafe fn is_stale(req: &varnish::ffi::req) -> bool {
    let Some(oc) = req.objcore.as_ref() else { return false };
    oc.t_origin.0 + f64::from(oc.ttl) <= req.t_req.0
}

pub fn tag(ctx: &mut Ctx, key: &CStr, value: &CStr) {
    let value = Value::Str(text_lossy(value.to_bytes()));
    tag_value(ctx, "tag()", key, value);
}

/// The current task's sampled span, or `None` with a log line naming the call (`what`).
fn sampled_span<'a>(ctx: &mut Ctx, what: &str) -> Option<&'a mut TaskState> {
    match task::slot(ctx) {
        Slot::Traced(state) if state.record.sampled() => Some(state),
        Slot::Traced(_) | Slot::Unsampled(_) => None, // never exported: nothing to record
        // A disabled module has no spans, and says nothing about it on every request.
        Slot::Empty if pipeline::disabled() => None,
        Slot::Empty => {
            log::vcl(ctx, format!("{what} before trace_request()/trace_backend() in this task; ignored"));
            None
        }
    }
}

fn checked_key(ctx: &mut Ctx, what: &str, key: &CStr) -> Option<String> {
    let key = key.to_string_lossy();
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        log::vcl(ctx, format!("{what}: attribute key must be 1 to {MAX_KEY_LEN} bytes; ignored"));
        return None;
    }
    Some(key.into_owned())
}

/// `tag_int`, `tag_real`, `tag_bool`: typed attributes.
pub fn tag_value(ctx: &mut Ctx, what: &str, key: &CStr, value: Value) {
    let Some(key) = checked_key(ctx, what, key) else { return };
    if let Some(state) = sampled_span(ctx, what) {
        state.record.set(key, value);
    }
}

pub fn set_name(ctx: &mut Ctx, name: &CStr) {
    let name = name.to_string_lossy();
    if name.is_empty() {
        log::vcl(ctx, "set_name(): empty name; ignored");
        return;
    }
    if let Some(state) = sampled_span(ctx, "set_name()") {
        state.record.name = crate::span::truncate(name.into_owned(), 255).into();
        state.name_fixed = true;
    }
}

/// `http.route` on the request's span (`url.template` on a fetch's, as the conventions name it
/// for clients), and the span name `{method} {route}` (unless VCL named the span).
pub fn set_route(ctx: &mut Ctx, route: &CStr) {
    let route = route.to_string_lossy().into_owned();
    let Some(state) = sampled_span(ctx, "set_route()") else { return };
    if !state.name_fixed && state.record.kind != SpanKind::Internal {
        let method = match state.record.get("http.request.method") {
            Some(Value::Str(m)) => semconv::method(&m).0,
            _ => "_OTHER",
        };
        state.record.name = semconv::span_name(method, Some(&route));
    }
    let key = if state.record.kind == SpanKind::Client { "url.template" } else { "http.route" };
    state.record.set(key, Value::Str(route.into()));
}

pub fn add_event(ctx: &mut Ctx, name: &CStr) {
    let now = vtim_to_unix_nano(ctx.raw.now.0);
    let name = name.to_string_lossy().into_owned();
    if let Some(state) = sampled_span(ctx, "add_event()") {
        state.record.add_event(now, crate::span::truncate(name, 255));
    }
}

/// Marks the span as failed, whatever its status code says.
pub fn set_error(ctx: &mut Ctx, message: &CStr) {
    let message = message.to_string_lossy().into_owned();
    if let Some(state) = sampled_span(ctx, "set_error()") {
        state.record.status = crate::span::StatusCode::Error;
        state.record.status_message = Some(crate::span::truncate(message, 1024));
        state.record.outcome.error_type.get_or_insert("vcl".into());
    }
}

/// Forces (`true`) or suppresses (`false`) tracing of this request. In `vcl_recv` only, before
/// anything went downstream, so that the sampled flag sent on matches the decision.
pub fn sample(ctx: &mut Ctx, on: bool) {
    if pipeline::disabled() {
        return;
    }
    if ctx.raw.method != method::RECV {
        log::vcl(ctx, "sample() is for vcl_recv; ignored");
        return;
    }
    if !on && matches!(task::slot(ctx), Slot::Unsampled(_)) {
        return;
    }
    let raw = ctx.raw as *const varnish::ffi::vrt_ctx;
    let Some(state) = state(ctx) else {
        log::vcl(ctx, "sample() before trace_request(); ignored");
        return;
    };
    if state.record.sampled() == on {
        return;
    }
    state.record.flags = (state.record.flags & !1) | u8::from(on);
    // SAFETY: a client task in vcl_recv; `raw` is its context.
    unsafe { sampling_changed(&*raw, state, !on) };
}

/// After the sampled flag of a client span changed in `vcl_recv`: record the request's
/// attributes the first time it is sampled, and tell the tailer.
///
/// # Safety
/// `raw` must be the running client task's context.
unsafe fn sampling_changed(raw: &varnish::ffi::vrt_ctx, state: &mut TaskState, was_sampled: bool) {
    match (was_sampled, state.record.sampled()) {
        (false, true) => {
            if !state.described {
                // The setting, as at the span's start (`state.trust` says what became of the
                // caller's context, and stays `extract` for a request that brought none).
                server_attributes(raw, &*raw.req, &mut state.record, config::hot().trust == Trust::Extract);
                state.described = true;
            }
            crate::vsl::tailer::track(state.record.vxid);
        }
        (true, false) => crate::vsl::tailer::forget(state.record.vxid),
        _ => {}
    }
}

/// What to do with the incoming context of this request (`extract`, `ignore`, `link`), for
/// example by client ACL. In `vcl_recv` only.
pub fn trust(ctx: &mut Ctx, mode: &CStr) {
    if pipeline::disabled() {
        return;
    }
    if ctx.raw.method != method::RECV {
        log::vcl(ctx, "trust() is for vcl_recv; ignored");
        return;
    }
    let Some(mode) = mode.to_str().ok().and_then(Trust::parse) else {
        log::vcl(ctx, "trust(): use extract, ignore or link; ignored");
        return;
    };
    if mode == Trust::Extract && matches!(task::slot(ctx), Slot::Unsampled(_)) {
        return; // kept only because the request continues its caller's context unsampled
    }
    let Some(state) = state(ctx) else {
        log::vcl(ctx, "trust() before trace_request(); ignored");
        return;
    };
    if mode == state.trust || state.record.kind != SpanKind::Server {
        return;
    }
    // Nothing came from the caller: every mode is the same.
    let Some(incoming) = state.incoming.as_mut() else { return };
    let was_sampled = state.record.sampled();
    let sampler = sampling::active();
    // Back to the caller's context, then the new mode from there.
    if state.trust != Trust::Extract {
        incoming.restore(&mut state.record, &sampler);
    }
    if mode != Trust::Extract {
        incoming.set_aside(&mut state.record, &sampler, mode == Trust::Link);
    }
    state.trust = mode;
    let raw = ctx.raw as *const varnish::ffi::vrt_ctx;
    // SAFETY: a client task in vcl_recv.
    unsafe { sampling_changed(&*raw, state, was_sampled) };
}

/// The value of `key` in the W3C Baggage of the request (client side) or fetch (backend side),
/// decoded; an empty string when absent or when the `baggage` propagator is not enabled.
pub fn baggage(ctx: &mut Ctx, key: &CStr) -> String {
    if config::hot().propagators & propagators::BAGGAGE == 0 {
        log::vcl(ctx, "baggage(): the baggage propagator is not enabled (OTEL_PROPAGATORS); empty");
        return String::new();
    }
    // SAFETY: the header table of the running task (req on the client side, bereq on the
    // backend side), valid for the call.
    let hp = unsafe { ctx.raw.req.as_ref().map_or(ctx.raw.http_bereq.0.cast_const(), |r| r.http.cast_const()) };
    let fields: Vec<&[u8]> = unsafe { http::fields(hp) }
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"baggage"))
        .map(|(_, v)| v)
        .take(http::MAX_FIELDS)
        .collect();
    let parsed = crate::propagation::baggage::parse(&fields);
    key.to_str().ok().and_then(|k| parsed.get(k)).unwrap_or_default().to_owned()
}

/// The current task's IDs and flags (an unsampled one's from its decision).
fn current_context(ctx: &Ctx) -> Option<(TraceId, SpanId, u8)> {
    match task::slot(ctx) {
        Slot::Traced(s) => Some((s.record.trace_id, s.record.span_id, s.record.flags)),
        Slot::Unsampled(u) => Some((u.trace_id, u.span_id, u.flags)),
        Slot::Empty => None,
    }
}

pub fn trace_id(ctx: &mut Ctx) -> String {
    current_context(ctx).map(|(t, _, _)| t.to_hex()).unwrap_or_default()
}

pub fn span_id(ctx: &mut Ctx) -> String {
    current_context(ctx).map(|(_, s, _)| s.to_hex()).unwrap_or_default()
}

pub fn traceparent(ctx: &mut Ctx) -> String {
    current_context(ctx)
        .map(|(t, s, f)| String::from_utf8_lossy(&trace::nul_terminated_traceparent(&t, &s, f)[..55]).into_owned())
        .unwrap_or_default()
}

/// The attributes of a SERVER (or ESI INTERNAL) span from the request as received.
///
/// # Safety
/// `ctx` and `req` must be the running client task's.
unsafe fn server_attributes(
    ctx: &varnish::ffi::vrt_ctx,
    req: &varnish::ffi::req,
    record: &mut crate::span::SpanRecord,
    proxies_trusted: bool,
) {
    let spans = config::active_spans();
    let line = request_attributes(req.http, &spans, record);
    record.name = if req.esi_level > 0 {
        format!("ESI {}", line.method_original).into()
    } else {
        semconv::span_name(line.method, None)
    };
    if let Some(q) = line.query {
        record.add("url.query", ValueRef::Str(&q));
    }
    // One pass over the headers for the five this needs (each lookup is a pass of its own).
    let (mut host, mut user_agent, mut forwarded) = (None, None, None);
    let (mut x_forwarded_proto, mut x_forwarded_host) = (None, None);
    for (name, value) in http::fields(req.http) {
        let slot = match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") => &mut host,
            // What a proxy in front says, only when the client is trusted with its trace context
            // too (`trust` extract): a Varnish facing clients directly (`ignore`, `link`) would
            // otherwise record whatever scheme and host a client claims.
            9 if proxies_trusted && name.eq_ignore_ascii_case(b"forwarded") => &mut forwarded,
            10 if name.eq_ignore_ascii_case(b"user-agent") => &mut user_agent,
            16 if proxies_trusted && name.eq_ignore_ascii_case(b"x-forwarded-host") => &mut x_forwarded_host,
            17 if proxies_trusted && name.eq_ignore_ascii_case(b"x-forwarded-proto") => &mut x_forwarded_proto,
            _ => continue,
        };
        slot.get_or_insert(value); // the first of repeated fields
    }
    // The original request's scheme and host when a proxy in front says them (a TLS terminator,
    // a load balancer), as the conventions ask; what Varnish received otherwise.
    let scheme = semconv::original_scheme(forwarded, x_forwarded_proto).unwrap_or("http");
    record.add("url.scheme", ValueRef::Str(scheme));
    // The first of the original hosts (Forwarded, X-Forwarded-Host) and Host that can be read.
    let server = semconv::original_hosts(forwarded, x_forwarded_host)
        .into_iter()
        .chain([host])
        .flatten()
        .find_map(host_and_port);
    if let Some((host, port)) = server {
        let default_port = if scheme == "https" { 443 } else { 80 };
        record.add("server.address", ValueRef::Str(host));
        record.add("server.port", ValueRef::Int(i64::from(port.unwrap_or(default_port))));
    }
    if let Some(ua) = user_agent {
        record.add("user_agent.original", ValueRef::Str(&utf8_lossy(ua)));
    }
    let (client, peer) = crate::varnish::peer::client_and_peer(ctx);
    if let Some(c) = client {
        record.add("client.address", ValueRef::Str(&c));
    }
    if let Some((addr, port)) = peer {
        record.add("network.peer.address", ValueRef::Str(&addr));
        record.add("network.peer.port", ValueRef::Int(i64::from(port)));
    }
    if req.esi_level > 0 {
        record.add("varnish.esi_level", ValueRef::Int(i64::from(req.esi_level)));
    }
    capture_headers(req.http, &spans.server_request_headers, "http.request.header.", &spans, record);
}

/// `server.address` and `server.port` (if given) from a `Host`-like value.
fn host_and_port(h: &[u8]) -> Option<(&str, Option<u16>)> {
    semconv::split_host(crate::span::utf8(h)?)
}

/// The attributes of a CLIENT span from the backend request as VCL built it.
///
/// # Safety
/// `bereq` must be the running fetch's.
unsafe fn client_attributes(bereq: *const varnish::ffi::http, record: &mut crate::span::SpanRecord) {
    let spans = config::active_spans();
    let line = request_attributes(bereq, &spans, record);
    record.name = semconv::span_name(line.method, None);
    let host = http::header(bereq, b"host").and_then(crate::span::utf8).and_then(semconv::split_host);
    if let Some((address, port)) = host {
        record.add("server.address", ValueRef::Str(address));
        // Required on CLIENT spans: the scheme's default when Host names none.
        record.add("server.port", ValueRef::Int(i64::from(port.unwrap_or(80))));
        // Absolute, so only with a host; the query only when enabled (redacted).
        let url = semconv::full_url("http", address, port, line.path(), line.query.as_deref());
        record.add("url.full", ValueRef::Str(&url));
    }
}

/// What `request_attributes` read from a request line.
/// Borrows the request's header table (valid during the VCL call) where it is UTF-8.
struct RequestLine<'a> {
    method: &'static str,
    method_original: std::borrow::Cow<'a, str>,
    url: std::borrow::Cow<'a, str>,
    /// The query, redacted, when `OPENTRACING_CAPTURE_URL_QUERY` is on.
    query: Option<String>,
}

impl RequestLine<'_> {
    fn path(&self) -> &str {
        semconv::path_and_query(&self.url).0
    }
}

/// The attributes both span kinds take from their request: `http.request.method` (and
/// `_original`), `url.path`, `network.protocol.version`, `varnish.server.role`. The record is
/// fresh: `add` skips the search for an existing key.
///
/// # Safety
/// `hp` must be NULL or a valid `struct http` of the running task.
unsafe fn request_attributes<'a>(
    hp: *const varnish::ffi::http,
    spans: &config::SpanSettings,
    record: &mut crate::span::SpanRecord,
) -> RequestLine<'a> {
    let (method_original, url) = http::request_line(hp);
    let (method, other) = semconv::method(&method_original);
    record.add("http.request.method", ValueRef::Str(method));
    if other {
        record.add("http.request.method_original", ValueRef::Str(&method_original));
    }
    let (path, query) = semconv::path_and_query(&url);
    record.add("url.path", ValueRef::Str(path));
    if let Some(v) = crate::span::utf8(http::proto(hp)).and_then(semconv::protocol_version) {
        record.add("network.protocol.version", ValueRef::Str(v));
    }
    if let Some(role) = spans.role {
        record.add("varnish.server.role", ValueRef::Str(role));
    }
    let query = query
        .filter(|_| spans.capture_query)
        .map(|q| spans.redact.as_ref().map_or(q.into(), |r| r.apply(q)).into_owned());
    RequestLine { method, method_original, url, query }
}

/// Copies the allowed headers of `hp` into `{prefix}{lowercase name}` attributes, redacted:
/// `string[]`, one element per header line, as the conventions define them.
///
/// # Safety
/// `hp` must be NULL or a valid `struct http` of the running task.
unsafe fn capture_headers(
    hp: *const varnish::ffi::http,
    which: &semconv::HeaderCapture,
    prefix: &str,
    spans: &config::SpanSettings,
    record: &mut crate::span::SpanRecord,
) {
    if which.is_empty() {
        return;
    }
    // `string[]`, as the semantic conventions define these attributes: one element per header
    // line, in the order Varnish holds them.
    let mut captured: Vec<(String, Vec<String>)> = Vec::new();
    for (name, value) in http::fields(hp) {
        let Ok(name) = std::str::from_utf8(name) else { continue };
        if !which.wants(name) {
            continue;
        }
        let value = String::from_utf8_lossy(value);
        let value = spans.redact.as_ref().map_or(value.clone(), |r| r.apply(&value).into_owned().into());
        let key = format!("{prefix}{}", name.to_ascii_lowercase());
        match captured.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(value.into_owned()),
            None => captured.push((key, vec![value.into_owned()])),
        }
    }
    for (k, v) in captured {
        record.set(k, Value::StrArray(v));
    }
}

/// `traceresponse` (W3C Trace Context Level 2) and `Server-Timing: traceparent;desc="..."`, so
/// that a client (or a browser's devtools) can find the trace of its request.
///
/// # Safety
/// `resp` must be the running request's response.
unsafe fn tell_the_client(resp: *mut varnish::ffi::http, record: &crate::span::SpanRecord, hot: config::Hot) {
    let tp = outgoing_traceparent(record);
    if hot.traceresponse {
        http::force(resp, http::H_TRACERESPONSE, &tp[..55]);
    }
    if hot.server_timing {
        let mut v = [0u8; 55 + 24];
        let head = b"traceparent;desc=\"";
        v[..head.len()].copy_from_slice(head);
        v[head.len()..head.len() + 55].copy_from_slice(&tp[..55]);
        v[head.len() + 55] = b'"';
        http::add(resp, http::H_SERVER_TIMING, &v[..head.len() + 56]);
    }
}

/// The context a task sends on: from its full state, or, for an unsampled task that keeps only
/// its decision, from that.
struct Outgoing<'a> {
    trace_id: &'a TraceId,
    span_id: &'a SpanId,
    flags: u8,
    /// What becomes of the request's `tracestate` fields.
    tracestate: OutgoingTracestate<'a>,
    /// The caller's debug flag goes on (B3, Jaeger).
    debug: bool,
}

enum OutgoingTracestate<'a> {
    /// The validated, combined value (printable ASCII, at most 512 bytes).
    Set(&'a str),
    /// An invalid incoming `tracestate` must not travel on.
    Remove,
    /// There was none, or the one there is already ours: no work.
    Keep,
}

/// The validated `tracestate` goes on; without one, what the request had is removed.
fn outgoing_tracestate(validated: Option<&str>, had_tracestate: bool) -> OutgoingTracestate<'_> {
    match validated {
        Some(ts) => OutgoingTracestate::Set(ts),
        None if had_tracestate => OutgoingTracestate::Remove,
        None => OutgoingTracestate::Keep,
    }
}

impl<'a> Outgoing<'a> {
    fn of(state: &'a TaskState) -> Self {
        let r = &state.record;
        Outgoing {
            trace_id: &r.trace_id,
            span_id: &r.span_id,
            flags: r.flags,
            tracestate: outgoing_tracestate(r.tracestate.as_deref(), state.had_tracestate),
            // A debug flag is the caller's, for its trace: sent on only when that trace continues.
            debug: state.debug && state.trust == Trust::Extract,
        }
    }
}

/// Whether an unsampled fetch's bereq already carries exactly the context it would send, so that
/// the fetch can continue it unchanged: Trace Context is the only format sent, and the bereq has
/// one valid `traceparent`, version 00 with no flag set (unsampled), which the fetch continued
/// unsampled. What would differ is only the span ID, the fetch's own instead of its parent's;
/// neither span is recorded.
fn continues_unchanged(fields: &http::TraceFields<'_>, started: &trace::Started, propagators: u8) -> bool {
    only_trace_context(propagators)
        && started.restarted_because.is_none()
        && started.caller_sampled == Some(false)
        && started.context.flags == 0
        && started.context.parent_span_id.is_some()
        && single_traceparent(fields).is_some_and(|tp| tp.len() == 55 && tp.starts_with(b"00-") && tp.ends_with(b"-00"))
}

/// Trace Context is the only format the context is sent in (`write_context` writes nothing else).
fn only_trace_context(propagators: u8) -> bool {
    let others = propagators::B3 | propagators::B3MULTI | propagators::JAEGER;
    propagators & propagators::TRACECONTEXT != 0 && propagators & others == 0
}

/// The value of the request's `traceparent` when it has exactly one, without surrounding space.
fn single_traceparent<'a>(fields: &http::TraceFields<'a>) -> Option<&'a [u8]> {
    match fields.traceparent.as_slice() {
        [tp] => Some(tp.trim_ascii()),
        _ => None,
    }
}

/// Whether `hp` already carries what `write_context` would write for `out`: Trace Context the
/// only format, the `tracestate` kept, and the one `traceparent` already `out`'s.
///
/// # Safety
/// `hp` must be NULL or a valid `struct http` of the running task.
unsafe fn already_sent(hp: *const varnish::ffi::http, out: &Outgoing<'_>) -> bool {
    if !only_trace_context(config::hot().propagators) || !matches!(out.tracestate, OutgoingTracestate::Keep) {
        return false;
    }
    let tp = trace::nul_terminated_traceparent(out.trace_id, out.span_id, out.flags);
    single_traceparent(&http::trace_fields(hp)) == Some(&tp[..55])
}

/// Sets `traceparent` (and `tracestate`, or removes it) on an outgoing request, and the other
/// enabled formats.
///
/// # Safety
/// `hp` must be NULL or a writable `struct http` of the running task.
unsafe fn write_context(hp: *mut varnish::ffi::http, out: &Outgoing<'_>) {
    let bits = config::hot().propagators;
    if bits & propagators::TRACECONTEXT != 0 {
        let tp = trace::nul_terminated_traceparent(out.trace_id, out.span_id, out.flags);
        http::force(hp, http::H_TRACEPARENT, &tp[..55]);
        match out.tracestate {
            OutgoingTracestate::Set(ts) => {
                http::force(hp, http::H_TRACESTATE, ts.as_bytes());
            }
            OutgoingTracestate::Remove => http::unset(hp, http::H_TRACESTATE),
            OutgoingTracestate::Keep => {}
        }
    }
    if bits & (propagators::B3 | propagators::B3MULTI | propagators::JAEGER) != 0 {
        other_formats::inject(hp, bits, &out.trace_id.0, &out.span_id.0, out.flags & 1 == 1, out.debug);
    }
}

/// Sends on the context of an unsampled client request that kept only its decision, as the
/// full state built from it (`unsampled_state`) would: the caller's `tracestate`, read again
/// from the request, goes on when it applies and is valid, and is removed otherwise.
///
/// # Safety
/// `hp` must be a writable `struct http` of the running client task, `req` its request.
unsafe fn write_unsampled_context(hp: *mut varnish::ffi::http, req: &varnish::ffi::req, u: &Unsampled) {
    let combined = if u.tracestate_applies {
        crate::propagation::tracestate::combine(&http::trace_fields(req.http).tracestate).ok().flatten()
    } else {
        None
    };
    let out = Outgoing {
        trace_id: &u.trace_id,
        span_id: &u.span_id,
        flags: u.flags,
        tracestate: outgoing_tracestate(combined.as_deref(), u.had_tracestate),
        debug: false,
    };
    write_context(hp, &out);
}

/// The caller's context: `traceparent` when Trace Context is enabled and the field is there,
/// else the first present of the other enabled formats (B3, Jaeger).
///
/// # Safety
/// `hp` must be the header table `own` was read from, valid for the call.
unsafe fn incoming<'a, 'b: 'a>(hp: *const varnish::ffi::http, own: &'a http::TraceFields<'b>, bits: u8) -> Parent<'a> {
    let tracecontext = bits & propagators::TRACECONTEXT != 0;
    if (tracecontext && (!own.traceparent.is_empty() || own.too_many))
        || bits & (propagators::B3 | propagators::B3MULTI | propagators::JAEGER) == 0
    {
        let none: &[&[u8]] = &[];
        return Parent::Headers {
            traceparent: if tracecontext { &own.traceparent } else { none },
            tracestate: if tracecontext { &own.tracestate } else { none },
            too_many_fields: tracecontext && own.too_many,
        };
    }
    other_formats::extract(hp, bits)
}

/// `opentracing.set()`: records an override for this VCL and checks the whole configuration at
/// once, so that a bad value fails `vcl_init` with the setting's name.
pub fn set(ctx: &mut Ctx, state: Option<&crate::config::VclState>, name: &str, value: &str) -> Result<(), String> {
    if ctx.raw.method != method::INIT {
        // Settings are per VCL load; a request must never fail because of a misplaced call.
        log::vcl(ctx, format!("set({name:?}) ignored: settings can only be changed in vcl_init"));
        return Ok(());
    }
    let Some(state) = state else {
        return Err("opentracing.set: no VCL state (the module's load event did not run)".to_owned());
    };
    let mut settings = state.settings.lock();
    let mut updated = settings.clone();
    updated.set(name, value).map_err(|e| format!("opentracing.set: {e}"))?;
    pipeline::check(&updated).map_err(|e| format!("opentracing.set: {e}"))?;
    *settings = updated;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::Sampler;

    /// What `trace_backend` decides for a bereq carrying `traceparent` (one field per element).
    fn continues(fields: &[&[u8]], sampler: &str, propagators: u8) -> bool {
        let fields = http::TraceFields { traceparent: fields.iter().copied().collect(), ..Default::default() };
        let sampler = Sampler::from_env_values(Some(sampler), None).unwrap();
        let parent = Parent::Headers { traceparent: &fields.traceparent, tracestate: &[], too_many_fields: false };
        let started = trace::start(SpanKind::Client, parent, false, &sampler);
        continues_unchanged(&fields, &started, propagators)
    }

    #[test]
    fn round_is_f64_round() {
        let mut values = vec![
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            0.49999999999999994,
            -0.49999999999999994,
            0.3,
            -0.3,
            1e300,
            -1e300,
            4_503_599_627_370_495.5,
            4_503_599_627_370_496.0,
            9_007_199_254_740_993.0,
            f64::MAX,
            f64::MIN_POSITIVE,
            f64::INFINITY,
            f64::NEG_INFINITY,
            119_993.499_9,
            119_993.5,
            3_600_000.0,
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..100_000 {
            let scale = 10f64.powi(rng.i32(-3..16));
            values.push((rng.f64() - 0.5) * scale);
            values.push(f64::from_bits(rng.u64(..)));
        }
        for x in values {
            let (got, want) = (round(x), x.round());
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{x:e}: {got:e} != {want:e}");
        }
    }

    #[test]
    fn an_unsampled_fetch_continues_only_exactly_what_it_would_send() {
        const W3C: u8 = propagators::TRACECONTEXT | propagators::BAGGAGE;
        let tp: &[u8] = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        assert!(continues(&[tp], "parentbased_always_on", W3C));
        assert!(continues(
            &[b" 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00 "],
            "parentbased_always_on",
            W3C
        ));
        // Sampled: the fetch's own span goes downstream.
        assert!(!continues(
            &[b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"],
            "parentbased_always_on",
            W3C
        ));
        // Unsampled, but with another flag (random): what we send has flags 00.
        assert!(!continues(
            &[b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-02"],
            "parentbased_always_on",
            W3C
        ));
        // A later version with more fields: we send version 00.
        assert!(!continues(
            &[b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-x"],
            "parentbased_always_on",
            W3C
        ));
        // Two fields restart the trace; an invalid one too.
        assert!(!continues(&[tp, tp], "parentbased_always_on", W3C));
        assert!(!continues(
            &[b"00-00000000000000000000000000000000-b7ad6b7169203331-00"],
            "parentbased_always_on",
            W3C
        ));
        // No context: a new trace.
        assert!(!continues(&[], "parentbased_always_off", W3C));
        // The caller sampled, our sampler did not: flags change.
        assert!(!continues(&[b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"], "always_off", W3C));
        // Other formats are written too: they carry the fetch's span ID.
        assert!(!continues(&[tp], "parentbased_always_on", W3C | propagators::B3));
        assert!(!continues(&[tp], "parentbased_always_on", propagators::B3));
    }
}
