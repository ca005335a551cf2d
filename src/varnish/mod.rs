//! Everything that touches Varnish's C structures. The rest of the crate is plain Rust, testable
//! without Varnish; the `unsafe` needed to read requests, busy objects and headers lives here.

pub mod http;
pub mod log;
pub mod other_formats;
pub mod peer;
pub mod status_filter;
pub mod task;
pub mod workspace;

use varnish::ffi;

/// The VCL subroutine a call comes from (`ctx->method`, one of `VCL_MET_*` of `vcl.h`).
pub mod method {
    pub const RECV: u32 = 1 << 1;
    pub const PIPE: u32 = 1 << 2;
    pub const PASS: u32 = 1 << 3;
    pub const MISS: u32 = 1 << 6;
    pub const HIT: u32 = 1 << 7;
    pub const DELIVER: u32 = 1 << 8;
    pub const SYNTH: u32 = 1 << 9;
    pub const BACKEND_FETCH: u32 = 1 << 10;
    pub const BACKEND_RESPONSE: u32 = 1 << 11;
    pub const BACKEND_ERROR: u32 = 1 << 12;
    pub const INIT: u32 = 1 << 13;
}

/// The transaction ID of a log handle, without the client/backend marker bits.
///
/// # Safety
/// `vsl` must be NULL or a valid `vsl_log` (Varnish hands us one per task).
pub unsafe fn vxid_of(vsl: *const ffi::vsl_log) -> u64 {
    vsl.as_ref().map_or(0, |v| v.wid.vxid & ffi::VSL_IDENTMASK)
}
