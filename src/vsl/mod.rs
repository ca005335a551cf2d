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
