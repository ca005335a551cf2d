//! The bodies of the VCL functions. `lib.rs` declares them to Varnish and guards each call;
//! here they read the request or fetch, start, annotate and hand over spans.
//!
//! Threading: every function runs on the Varnish worker thread executing the VCL of one task.

use std::ffi::CStr;
use std::sync::atomic::Ordering::Relaxed;

use varnish::vcl::Ctx;

use crate::pipeline::{self, STATS};
use crate::propagation::traceparent;
use crate::sampling;
use crate::span::{vtim_to_unix_nano, SpanKind, Value};
use crate::trace::{self, outgoing_traceparent, Parent};
use crate::varnish::task::{self, EsiParent, TaskState};
use crate::varnish::{http, log, method};

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
    if let Some(state) = task::current(ctx) {
        // Called again in the same task: a restart (new VXID, same span) or a repeated call.
        if req.restarts > state.repeats_seen {
            state.repeats_seen = req.restarts;
            state.record.add_event(vtim_to_unix_nano(ctx.raw.now.0), "varnish.restart");
        }
        return;
    }
    let esi_level = req.esi_level;
    let sampler = sampling::active();
    // SAFETY: the header tables of the running request stay valid during this call.
    let own = unsafe { http::trace_fields(req.http) };
    let started = if esi_level == 0 {
        trace::start(
            SpanKind::Server,
            Parent::Headers {
                traceparent: &own.traceparent,
                tracestate: &own.tracestate,
                too_many_fields: own.too_many,
            },
            true,
            &sampler,
        )
    } else {
        // ESI: the sub-request holds the client's original headers; the parent is the request
        // that included it (published in its vcl_deliver), checked against the top request.
        let top = unsafe { http::trace_fields(ctx.raw.http_req_top.0) };
        let top_trace = traceparent::parse(&top.traceparent).ok().flatten().map(|c| c.trace_id);
        match task::esi_parent(esi_level).filter(|p| Some(p.trace_id.0) == top_trace) {
            Some(p) => trace::start(
                SpanKind::Internal,
                Parent::Local { trace_id: p.trace_id, span_id: p.span_id, flags: p.flags, tracestate: None },
                false,
                &sampler,
            ),
            None => trace::start(
                SpanKind::Internal,
                Parent::Headers {
                    traceparent: &top.traceparent,
                    tracestate: &top.tracestate,
                    too_many_fields: top.too_many,
                },
                false,
                &sampler,
            ),
        }
    };
    if let Some(why) = started.restarted_because {
        log::vcl(ctx, format!("invalid traceparent ({why}): starting a new trace"));
    }
    if let Some(why) = started.tracestate_dropped_because {
        log::vcl(ctx, format!("invalid tracestate ({why}): dropped"));
    }
    let mut record = started.record;
    record.start_unix_nano = vtim_to_unix_nano(req.t_first.0);
    record.vxid = task::current_vxid(ctx);
    // An unsampled span is never exported: it only carries the context, so skip the rest.
    if record.sampled() {
        let (method, url) = unsafe { http::request_line(req.http) };
        record.name = if esi_level > 0 { format!("ESI {method}").into() } else { span_name(&method).into() };
        // A fresh record: `add` skips the search for an existing key.
        let path = trace::url_path(&url).to_owned();
        record.add("http.request.method", Value::Str(method));
        record.add("url.path", Value::Str(path));
        if esi_level > 0 {
            record.add("varnish.esi_level", Value::Int(i64::from(esi_level)));
        }
    }
    // The context is written into the request only when it goes to a backend (see
    // `cache_result`): a cache hit, the common case, never pays for the header.
    let mut state = TaskState::new(record);
    state.repeats_seen = req.restarts;
    state.had_tracestate = !own.tracestate.is_empty();
    STATS.spans_started.fetch_add(1, Relaxed);
    if state.record.sampled() {
        crate::vsl::tailer::track(state.record.vxid);
    }
    if task::install(ctx, state).is_err() {
        log::vcl(ctx, "out of workspace: span not recorded");
    }
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
    if let Some(state) = task::current(ctx) {
        // A retry: Varnish rebuilt the bereq from the original, so send our context again.
        if bo.retries > state.repeats_seen {
            state.repeats_seen = bo.retries;
            state.record.add_event(vtim_to_unix_nano(ctx.raw.now.0), "varnish.retry");
        }
        unsafe { write_context(bo.bereq, state) };
        return;
    }
    let fields = unsafe { http::trace_fields(bo.bereq) };
    let started = trace::start(
        SpanKind::Client,
        Parent::Headers {
            traceparent: &fields.traceparent,
            tracestate: &fields.tracestate,
            too_many_fields: fields.too_many,
        },
        false,
        &sampling::active(),
    );
    if let Some(why) = started.restarted_because {
        log::vcl(ctx, format!("invalid bereq traceparent ({why}): starting a new trace"));
    }
    let mut record = started.record;
    record.start_unix_nano = vtim_to_unix_nano(bo.t_first.0);
    record.vxid = task::current_vxid(ctx);
    if record.sampled() {
        let (method, url) = unsafe { http::request_line(bo.bereq) };
        record.name = span_name(&method).into();
        let path = trace::url_path(&url).to_owned();
        record.add("http.request.method", Value::Str(method));
        record.add("url.path", Value::Str(path));
    }
    let mut state = TaskState::new(record);
    state.repeats_seen = bo.retries;
    state.had_tracestate = !fields.tracestate.is_empty();
    unsafe { write_context(bo.bereq, &state) };
    STATS.spans_started.fetch_add(1, Relaxed);
    if state.record.sampled() {
        crate::vsl::tailer::track(state.record.vxid);
    }
    if task::install(ctx, state).is_err() {
        log::vcl(ctx, "out of workspace: span not recorded");
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
    let m = ctx.raw.method;
    let Some(state) = task::current(ctx) else { return false };
    let mut want_filter = false;
    match m {
        method::DELIVER | method::SYNTH => {
            // SAFETY: in vcl_deliver/vcl_synth ctx->req and its resp are valid.
            let (status, level) = unsafe {
                let req = &*ctx.raw.req;
                (http::status(req.resp), req.esi_level)
            };
            state.status_vcl = Some(status);
            if m == method::SYNTH && state.record.get("varnish.cache_result").is_none() {
                state.record.set_str("varnish.cache_result", "synth");
            }
            let r = &state.record;
            task::publish_esi_parent(level, EsiParent { trace_id: r.trace_id, span_id: r.span_id, flags: r.flags });
            // SAFETY: ctx->req is valid in vcl_deliver/vcl_synth.
            want_filter = r.sampled() && status == 200 && unsafe { http::is_conditional((*ctx.raw.req).http) };
        }
        method::BACKEND_RESPONSE => {
            state.status_vcl = Some(unsafe { http::status(ctx.raw.http_beresp.0) });
        }
        method::BACKEND_ERROR => state.fetch_failed = true,
        method::PIPE => state.record.set_str("varnish.cache_result", "pipe"),
        _ => log::vcl(
            ctx,
            "finish() is for vcl_deliver, vcl_synth, vcl_pipe, vcl_backend_response and vcl_backend_error; ignored",
        ),
    }
    want_filter
}

/// Records how the cache served the request. `synth` never replaces an earlier result (a
/// `return (synth())` from `vcl_hit` is still a hit).
///
/// It is also where the span's context is written into what goes to the backend, because the
/// include calls it exactly where a fetch follows: `miss` and `pass` (the bereq is built from
/// the req after them), `pipe` (the bereq exists already), and a `hit` on a stale object (a
/// background fetch starts when `vcl_hit` returns).
pub fn cache_result(ctx: &mut Ctx, result: &CStr) {
    // SAFETY: ctx->req is NULL or the running request.
    let Some(req) = (unsafe { ctx.raw.req.as_ref() }) else {
        log::vcl(ctx, "cache_result() is for client subroutines; ignored");
        return;
    };
    let m = ctx.raw.method;
    let now = ctx.raw.now.0;
    let bereq = ctx.raw.http_bereq.0;
    let Some(state) = task::current(ctx) else { return };
    let target = match m {
        method::MISS | method::PASS => req.http,
        method::PIPE => bereq,
        // SAFETY: in vcl_hit req->objcore is the object found.
        method::HIT if unsafe { is_stale(req, now) } => req.http,
        _ => std::ptr::null_mut(),
    };
    if !target.is_null() {
        // SAFETY: a header table of the running task.
        unsafe { write_context(target, state) };
    }
    if !state.record.sampled() {
        return;
    }
    let result = result.to_bytes();
    if result == b"synth" && state.record.get("varnish.cache_result").is_some() {
        return;
    }
    let value = match result {
        b"hit" => "hit".to_owned(),
        b"miss" => "miss".to_owned(),
        b"pass" => "pass".to_owned(),
        other => String::from_utf8_lossy(other).into_owned(),
    };
    state.record.set("varnish.cache_result", Value::Str(value));
}

/// Whether the object found by a hit is past its TTL (served in grace, with a background fetch).
///
/// # Safety
/// `req` must be the running request, in `vcl_hit`.
unsafe fn is_stale(req: &varnish::ffi::req, now: f64) -> bool {
    let Some(oc) = req.objcore.as_ref() else { return false };
    let mut ttl = f64::from(oc.ttl);
    if req.d_ttl.0 >= 0.0 && req.d_ttl.0 < ttl {
        ttl = req.d_ttl.0;
    }
    oc.t_origin.0 + ttl <= now
}

pub fn tag(ctx: &mut Ctx, key: &CStr, value: &CStr) {
    let key = key.to_string_lossy();
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        log::vcl(ctx, format!("tag(): attribute key must be 1 to {MAX_KEY_LEN} bytes; ignored"));
        return;
    }
    let Some(state) = task::current(ctx) else {
        log::vcl(ctx, "tag() before trace_request()/trace_backend() in this task; ignored");
        return;
    };
    if !state.record.sampled() {
        return; // never exported
    }
    state.record.set(key.into_owned(), Value::Str(value.to_string_lossy().into_owned()));
}

pub fn trace_id(ctx: &mut Ctx) -> String {
    task::current(ctx).map(|s| s.record.trace_id.to_hex()).unwrap_or_default()
}

pub fn span_id(ctx: &mut Ctx) -> String {
    task::current(ctx).map(|s| s.record.span_id.to_hex()).unwrap_or_default()
}

pub fn traceparent(ctx: &mut Ctx) -> String {
    task::current(ctx)
        .map(|s| String::from_utf8_lossy(&outgoing_traceparent(&s.record)[..55]).into_owned())
        .unwrap_or_default()
}

/// `{method}` for the methods HTTP defines, `HTTP` for anything else (semantic conventions:
/// unknown methods must not make span names unbounded).
fn span_name(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "CONNECT" => "CONNECT",
        "OPTIONS" => "OPTIONS",
        "TRACE" => "TRACE",
        "PATCH" => "PATCH",
        _ => "HTTP",
    }
}

/// Sets `traceparent` (and `tracestate`, or removes it) on an outgoing request.
///
/// # Safety
/// `hp` must be NULL or a writable `struct http` of the running task.
unsafe fn write_context(hp: *mut varnish::ffi::http, state: &TaskState) {
    let tp = outgoing_traceparent(&state.record);
    http::force(hp, http::H_TRACEPARENT, &tp[..55]);
    match &state.record.tracestate {
        // Validated printable ASCII (propagation::tracestate), at most 512 bytes.
        Some(ts) => {
            http::force(hp, http::H_TRACESTATE, ts.as_bytes());
        }
        // An invalid incoming tracestate must not travel on; none at all needs no work.
        None if state.had_tracestate => http::unset(hp, http::H_TRACESTATE),
        None => {}
    }
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
