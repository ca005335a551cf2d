//! A delivery processor that only looks: its init sees the response status after Varnish's 304
//! and 206 conversions (VCL in `vcl_deliver` still sees 200), records it in the task state, and
//! removes itself from the chain, so the body is never touched.
//!
//! The include adds it with `set resp.filters += " opentracing";`. Its init must come after
//! `range` (which sets 206 in its own init), which appending at the end guarantees.

use std::ffi::CStr;

use varnish::ffi::VdpAction;
use varnish::vcl::{Ctx, DeliveryProcCtx, DeliveryProcessor, InitResult, PushResult};

use crate::varnish::{http, task};

pub struct StatusFilter;

impl DeliveryProcessor for StatusFilter {
    fn name() -> &'static CStr {
        c"opentracing"
    }

    fn new(ctx: &mut Ctx, _vdp: &mut DeliveryProcCtx) -> InitResult<Self> {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: in a delivery processor's init, ctx->req is the request being delivered.
            let status = unsafe { ctx.raw.req.as_ref().map_or(0, |r| http::status(r.resp)) };
            if status > 0 {
                if let Some(state) = task::current(ctx) {
                    state.status_sent = Some(status);
                }
            }
        }));
        InitResult::Pass
    }

    fn push(&mut self, ctx: &mut DeliveryProcCtx, act: VdpAction, buf: &[u8]) -> PushResult {
        // Never reached (init always passes); forward unchanged all the same.
        ctx.push(act, buf)
    }
}
