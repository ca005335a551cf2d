//! vmod-opentracing: OpenTelemetry distributed tracing for Varnish Cache.
//!
//! This file is the VCL surface only: it declares the functions VCL can call and guards each one
//! so that no panic ever crosses into varnishd. The work is done in plain modules:
//! `calls` (what each function does), `trace` and `propagation` (W3C Trace Context),
//! `span` (the span record), `pipeline`, `export` and `worker` (getting spans out), and
//! `varnish` (everything that touches Varnish's C structures).

pub mod calls;
pub mod config;
pub mod counter;
pub mod decisions;
pub mod export;
pub mod ids;
pub mod pipeline;
pub mod propagation;
pub mod sampling;
pub mod semconv;
pub mod span;
pub mod span_pool;
pub mod trace;
pub mod varnish;
pub mod vsl;
pub mod worker;

use ::varnish::vcl::Ctx;

/// Runs one VCL call; a panic becomes a VSL line and a neutral result, never a crash.
fn guarded<T>(ctx: &mut Ctx, name: &str, fallback: T, f: impl FnOnce(&mut Ctx) -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut *ctx))) {
        Ok(v) => v,
        Err(_) => {
            crate::varnish::log::vcl(ctx, format!("internal error in {name}(); request continues untraced"));
            fallback
        }
    }
}

/// OpenTelemetry distributed tracing for Varnish.
///
/// Add two lines at the top of your VCL and every request becomes a span, parented to the
/// caller's W3C `traceparent`, with a child span for each backend fetch:
///
/// ```vcl
/// vcl 4.1;
/// import opentracing;
/// include "opentracing.vcl";
/// ```
///
/// The include calls the functions below from every built-in subroutine; call them yourself only
/// to add to the spans (`tag`) or to read the trace context (`trace_id`, `span_id`, `traceparent`).
#[::varnish::vmod(docs = "API.md")]
mod opentracing {
    use std::ffi::CStr;

    use varnish::vcl::{Ctx, DeliveryFilters, Event};

    use super::guarded;
    use crate::config::VclState;
    use crate::varnish::status_filter::StatusFilter;
    use crate::{calls, pipeline};

    /// Starts the span of a client request (kind SERVER; INTERNAL for an ESI sub-request).
    ///
    /// Call from `vcl_recv`. Reads the incoming `traceparent`/`tracestate` (W3C Trace Context) and
    /// continues that trace, or starts a new one when there is none or it is invalid. The request's
    /// own headers are left as the client sent them until the request goes to a backend
    /// (`cache_result` in `vcl_miss`, `vcl_pass`, `vcl_pipe`, or a stale hit): then
    /// `req.http.traceparent` becomes this span's context, so that the fetch is its child.
    /// Called again after a restart, it stays on the same span and records a `varnish.restart` event.
    pub fn trace_request(ctx: &mut Ctx) {
        guarded(ctx, "trace_request", (), calls::trace_request);
    }

    /// Starts the span of a backend fetch (kind CLIENT), child of the span named by
    /// `bereq.http.traceparent`, and rewrites that header so the backend sees this span as its
    /// parent. Call from `vcl_backend_fetch`; a retry stays on the same span (`varnish.retry` event).
    pub fn trace_backend(ctx: &mut Ctx) {
        guarded(ctx, "trace_backend", (), calls::trace_backend);
    }

    /// Records what the current phase knows about the span's outcome: the status in
    /// `vcl_deliver`, `vcl_synth` and `vcl_backend_response` (in `vcl_deliver`, a fresh cache hit
    /// as `varnish.cache_result`, with the object's age and TTL), a failed fetch in
    /// `vcl_backend_error`, a pipe in `vcl_pipe`. The span itself ends when Varnish has finished
    /// the task (response sent, body fetched), with Varnish's own timestamps.
    ///
    /// Returns true in `vcl_deliver`/`vcl_synth` when the status sent may still change after VCL
    /// (a conditional or range request may become 304 or 206): the include then adds the
    /// `opentracing` delivery filter, which reads the final status and steps aside.
    pub fn finish(ctx: &mut Ctx) -> bool {
        guarded(ctx, "finish", false, calls::finish)
    }

    /// Sets the attribute `key` to `value` on the current span (the request's span on the client
    /// side, the fetch's span on the backend side). A later value for the same key replaces the
    /// earlier one. Invalid UTF-8 is replaced, not refused.
    pub fn tag(ctx: &mut Ctx, key: &CStr, value: &CStr) {
        guarded(ctx, "tag", (), |ctx| calls::tag(ctx, key, value));
    }

    /// Records the cache result (`varnish.cache_result`: hit, miss, pass, pipe, synth) on the
    /// request's span. The include calls it (from `vcl_hit` only for a stale object: `finish()`
    /// records a fresh hit); `synth` never replaces an earlier result of the same lookup. Where a
    /// backend request follows (miss, pass, pipe, a hit on a stale object that starts a background
    /// fetch), it also writes the span's context into the request (`bereq` for pipe).
    pub fn cache_result(ctx: &mut Ctx, result: &CStr) {
        guarded(ctx, "cache_result", (), |ctx| calls::cache_result(ctx, result));
    }

    /// Sets an integer attribute on the current span (`tag` for strings).
    pub fn tag_int(ctx: &mut Ctx, key: &CStr, value: i64) {
        guarded(ctx, "tag_int", (), |ctx| calls::tag_value(ctx, "tag_int()", key, crate::span::Value::Int(value)));
    }

    /// Sets a floating-point attribute on the current span.
    pub fn tag_real(ctx: &mut Ctx, key: &CStr, value: f64) {
        guarded(ctx, "tag_real", (), |ctx| calls::tag_value(ctx, "tag_real()", key, crate::span::Value::Float(value)));
    }

    /// Sets a boolean attribute on the current span.
    pub fn tag_bool(ctx: &mut Ctx, key: &CStr, value: bool) {
        guarded(ctx, "tag_bool", (), |ctx| calls::tag_value(ctx, "tag_bool()", key, crate::span::Value::Bool(value)));
    }

    /// Names the current span (at most 255 bytes), instead of `{method}` or `{method} {route}`.
    pub fn set_name(ctx: &mut Ctx, name: &CStr) {
        guarded(ctx, "set_name", (), |ctx| calls::set_name(ctx, name));
    }

    /// Sets `http.route` (a low-cardinality template such as `/users/{id}`) and names the span
    /// `{method} {route}`, as the HTTP semantic conventions want.
    pub fn set_route(ctx: &mut Ctx, route: &CStr) {
        guarded(ctx, "set_route", (), |ctx| calls::set_route(ctx, route));
    }

    /// Adds a span event called `name`, now.
    pub fn add_event(ctx: &mut Ctx, name: &CStr) {
        guarded(ctx, "add_event", (), |ctx| calls::add_event(ctx, name));
    }

    /// Marks the current span as failed (span status Error) with `message`.
    pub fn set_error(ctx: &mut Ctx, message: &CStr) {
        guarded(ctx, "set_error", (), |ctx| calls::set_error(ctx, message));
    }

    /// Forces (`true`) or suppresses (`false`) tracing of this request, whatever the sampler
    /// decided; call in `vcl_recv` (for example, trace only some URLs). The sampled flag sent
    /// downstream follows.
    pub fn sample(ctx: &mut Ctx, on: bool) {
        guarded(ctx, "sample", (), |ctx| calls::sample(ctx, on));
    }

    /// What to do with the caller's trace context for this request, in `vcl_recv`: `extract`
    /// (continue it), `ignore` (start a new trace, drop it), `link` (start a new trace with a
    /// span link to it). The default is the `OPENTRACING_TRUST` setting (`extract`). That
    /// setting also decides whether the scheme and host a proxy in front reports (`Forwarded`,
    /// `X-Forwarded-Proto`/`-Host`) are read for the span's attributes when it starts.
    ///
    /// ```vcl
    /// sub vcl_recv {
    ///     if (client.ip !~ internal) { opentracing.trust("link"); }
    /// }
    /// ```
    pub fn trust(ctx: &mut Ctx, mode: &CStr) {
        guarded(ctx, "trust", (), |ctx| calls::trust(ctx, mode));
    }

    /// The value of `key` in the request's W3C Baggage (`baggage` header; on the backend side,
    /// the fetch's), percent-decoded, or an empty string. Baggage travels on to the backends as
    /// it came; set `req.http.baggage` to change it.
    pub fn baggage(ctx: &mut Ctx, key: &CStr) -> String {
        guarded(ctx, "baggage", String::new(), |ctx| calls::baggage(ctx, key))
    }

    /// The current span's trace ID (32 lowercase hex digits), or an empty string if this task
    /// has no span.
    pub fn trace_id(ctx: &mut Ctx) -> String {
        guarded(ctx, "trace_id", String::new(), calls::trace_id)
    }

    /// The current span's ID (16 lowercase hex digits), or an empty string.
    pub fn span_id(ctx: &mut Ctx) -> String {
        guarded(ctx, "span_id", String::new(), calls::span_id)
    }

    /// The current span's context as a W3C `traceparent` value, or an empty string.
    pub fn traceparent(ctx: &mut Ctx) -> String {
        guarded(ctx, "traceparent", String::new(), calls::traceparent)
    }

    /// Sets `name`, one of the `OTEL_*` settings (the README lists them all), to `value` for this
    /// VCL, overriding the environment of varnishd. Call in `vcl_init` only:
    ///
    /// ```vcl
    /// sub vcl_init {
    ///     opentracing.set("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
    ///     opentracing.set("OTEL_SERVICE_NAME", "edge");
    /// }
    /// ```
    ///
    /// An unknown name or a bad value fails `vcl_init`, and so `vcl.load`, with a message naming
    /// the setting. With several VCLs loaded, the settings of the VCL warmed last apply.
    pub fn set(
        ctx: &mut Ctx,
        #[shared_per_vcl] state: Option<&VclState>,
        name: &str,
        value: &str,
    ) -> Result<(), String> {
        let run = std::panic::AssertUnwindSafe(|| calls::set(ctx, state, name, value));
        std::panic::catch_unwind(run).unwrap_or_else(|_| Err("opentracing.set: internal error".to_owned()))
    }

    /// Starts the span pipeline on the first warm VCL and stops it after the last one goes cold.
    /// Runs on the CLI thread; never blocks longer than the pipeline's stop deadline.
    #[event]
    pub fn event(
        event: Event,
        vdp: &mut DeliveryFilters,
        #[shared_per_vcl] state: &mut Option<Box<VclState>>,
    ) -> Result<(), String> {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match event {
            Event::Load => {
                vdp.register::<StatusFilter>();
                *state = Some(Box::default());
                // The environment is checked here, where a failure may fail `vcl.load`; this
                // VCL's own settings are checked by each `opentracing.set()` in `vcl_init`.
                pipeline::check(&crate::config::Settings::from_environment())
            }
            Event::Warm => {
                // Varnish forbids failing a warm event from a VMOD (it asserts), so nothing here
                // may return an error: a pipeline that cannot start says why in the log.
                let vcl = state.get_or_insert_with(Box::default);
                let message = pipeline::vcl_warm(&vcl.settings.lock());
                vcl.warm = true;
                crate::varnish::log::global(message);
                Ok(())
            }
            Event::Cold => {
                // Only a VCL whose warm-up succeeded holds the pipeline.
                if let Some(vcl) = state.as_mut().filter(|v| v.warm) {
                    vcl.warm = false;
                    crate::varnish::log::global(pipeline::vcl_cold());
                }
                Ok(())
            }
            _ => Ok(()),
        }));
        match result {
            Ok(r) => r.map_err(|e| format!("opentracing: {e}")),
            // Only the load event may fail: Varnish asserts that COLD and DISCARD succeed, and a
            // failure from a varnish-rs WARM handler trips an assertion too (it calls VRT_fail).
            Err(_) if matches!(event, Event::Load) => {
                Err("opentracing: internal error in the VCL event handler".to_owned())
            }
            Err(_) => {
                crate::varnish::log::global("internal error in the VCL event handler; ignored");
                Ok(())
            }
        }
    }
}
