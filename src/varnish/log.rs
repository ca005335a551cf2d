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
#[cfg(not(test))]
pub fn global(msg: impl AsRef<str>) {
    varnish::vcl::log(LogTag::VclLog, format!("{PREFIX}{}", msg.as_ref()));
}

/// In unit tests (no varnishd, no shared-memory log): the lines, kept for the tests to read.
#[cfg(test)]
pub fn global(msg: impl AsRef<str>) {
    GLOBAL_LINES.lock().push(format!("{PREFIX}{}", msg.as_ref()));
}

/// What `global` logged in this test process (unit tests only).
#[cfg(test)]
pub static GLOBAL_LINES: parking_lot::Mutex<Vec<String>> = parking_lot::Mutex::new(Vec::new());
