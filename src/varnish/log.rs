//! Lines in the Varnish shared-memory log, all with the fixed prefix `opentracing: ` so that
//! `varnishlog -g raw -q 'VCL_Log ~ "^opentracing:"'` finds every one of them.

use varnish::vcl::{Ctx, LogTag};

pub const PREFIX: &str = "opentracing: ";

/// Logs into the current transaction (VCL_Log), or as a global record when there is none
/// (events on the CLI thread).
pub fn vcl(ctx: &mut Ctx, msg: impl AsRef<str>) {
    let line = format!("{PREFIX}{}", msg.as_ref());
    ctx.log(LogTag::VclLog, line);
}

/// A record outside any transaction (VCL events, background threads). Tagged VCL_Log like the
/// others: Debug records are masked out by Varnish's default `vsl_mask`.
pub fn global(msg: impl AsRef<str>) {
    varnish::vcl::log(LogTag::VclLog, format!("{PREFIX}{}", msg.as_ref()));
}
