//! Closing spans from the Varnish shared-memory log (VSL).
//!
//! - `ffi`: the only `unsafe` VSL code: attaching to the log and stepping through it.
//! - `record`: parsing copied log records (safe).
//! - `correlate`: the state machine that matches log records with our spans (pure, tested
//!   with synthetic records).
//! - `fetch_links`: which span fetched an object, for the link from a hit's span to it (written
//!   by the workers, read wherever a hit's span completes).
//! - `followed`: which sampled spans the tailer should follow (written by the workers, taken
//!   over by the tailer).
//! - `tailer`: the background worker that ties them together inside varnishd.
//! - `task_log`: a sampled span completed on the worker when its task ends, from the task's own
//!   log buffer (`correlate::OneTransaction`): by default when that buffer holds the span's whole
//!   log, the tailer reading the others; with `OPENTRACING_VSL=task` always (no tailer).

pub mod correlate;
pub mod fetch_links;
pub mod ffi;
pub mod followed;
pub mod record;
pub mod tailer;
pub mod task_log;

/// The slot of a table indexed by VXID (`mask`: the table's length less one, a power of two).
/// Varnish hands VXIDs out to each worker thread in blocks of 32,768 (`vxid_chunk`, in
/// `cache_main.c`), so the transactions in flight at once are at about the same place of
/// different blocks: indexed by the low bits alone, a table of 8,192 slots (a divisor of the
/// block) put two workers serving requests in step on one slot at every request (callgrind:
/// one sampled span in eight took the `followed` table's fallback with two connections). The
/// block's number folded into the low bits gives each its own.
pub fn vxid_slot(vxid: u64, mask: usize) -> usize {
    (vxid ^ (vxid >> 15)) as usize & mask
}
