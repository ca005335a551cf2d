//! Taking from a task's workspace without ever marking it overflowed.
//!
//! Varnish's `WS_Alloc`, `WS_ReserveSize` and `WS_Copy` (and `VRT_priv_task`, `VRT_IP_string`,
//! which call them) mark a workspace overflowed when it is short, and an overflowed workspace
//! makes Varnish skip work (`http_CollectHdrSep`, snapshots) and fail the request in delivery
//! (a 500). Tracing must never cause that: before such a call we check the room ourselves, and
//! where Varnish would overflow we do without (the state on the heap, an attribute left out, or
//! the span dropped and counted).
//!
//! Threading: a workspace belongs to its task, which runs on one thread at a time.

use std::ffi::c_void;

use varnish::ffi;

/// Free bytes of the workspace `ws`, read from its pointers (asking Varnish would mark it
/// overflowed when short): none while it is reserved.
///
/// # Safety
/// `ws` must be null or the running task's workspace.
pub unsafe fn free(ws: *const ffi::ws) -> usize {
    match ws.as_ref() {
        Some(w) if w.r.is_null() && !w.f.is_null() && w.e >= w.f => w.e.offset_from(w.f) as usize,
        _ => 0,
    }
}

/// `WS_Alloc` of `size` bytes if they fit (Varnish rounds to pointer size); null, with the
/// workspace untouched (not marked overflowed), if not, or if `ws` is null or reserved.
///
/// # Safety
/// As for `free`.
pub unsafe fn alloc_quiet(ws: *mut ffi::ws, size: usize) -> *mut c_void {
    let rounded = size.next_multiple_of(std::mem::size_of::<usize>());
    if size == 0 || free(ws) < rounded {
        return std::ptr::null_mut();
    }
    ffi::WS_Alloc(ws, rounded as std::ffi::c_uint)
}
