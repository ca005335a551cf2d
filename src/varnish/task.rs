//! Span state attached to a Varnish task (a client request or a backend fetch) through a raw
//! PRIV_TASK, and closing the span when the task ends.
//!
//! Why raw: varnish-rs's `#[shared_per_task]` drops its value without the VRT context, and the
//! context is what tells us the task's final timestamps, byte counts and VXID. We register our
//! own `vmod_priv_methods` whose `fini` receives it.
//!
//! An unsampled task keeps only its decision, in the decision table (`crate::decisions`), not
//! here: no slot to create and no fini to run for most requests. Only when the table's slot is
//! another task's (or the task has no start time, or the table is switched off for a test)
//! does the decision come here, as a small marker in the workspace.
//!
//! Lifecycle (see research/varnish-internals.md §5): the fini runs after the response was sent
//! (client) or the body fetched (backend). Varnish also runs it early when it rolls a request
//! back: `std.rollback()`, a VCL failure on its way to `vcl_synth`, `return (vcl(label))`. Such a
//! fini must not close the span: the state is parked in a small stash keyed by the task's
//! address and VXID and taken back by the next call of ours in the same task. What is never
//! taken back is closed by the exporter's sweep after `STASH_DEADLINE`.
//!
//! Threading: a task runs on one worker thread at a time; its state is only touched from there
//! until the fini moves the finished record to the exporter. The stash is shared (a mutex,
//! touched only on rollbacks).

use std::cell::Cell;
use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use varnish::ffi;
use varnish::vcl::Ctx;

use crate::decisions::{self, Key, Recalled};
use crate::ids::{SpanId, TraceId};
use crate::pipeline::{self, STATS};
use crate::span::{vtim_to_unix_nano, ClosedBy, SpanRecord, StatusCode};
use crate::varnish::{http, vxid_of, workspace};

/// What we keep for one task.
pub struct TaskState {
    /// Boxed from the start (a reused box, `span_pool`): the fini hands it on without a copy.
    pub record: Box<SpanRecord>,
    /// Status actually sent, seen by the delivery filter after 304/206 conversion.
    pub status_sent: Option<u16>,
    /// Status VCL saw last (`finish()` in vcl_deliver/vcl_synth/vcl_backend_response).
    pub status_vcl: Option<u16>,
    /// The fetch ended in vcl_backend_error: no response was received from the backend.
    pub fetch_failed: bool,
    /// Restarts (client) or retries (backend) already recorded as span events.
    pub repeats_seen: u32,
    /// The incoming request had `tracestate` fields (which must be replaced or removed when the
    /// context is written).
    pub had_tracestate: bool,
    /// VCL named the span (`set_name`): a route no longer renames it.
    pub name_fixed: bool,
    /// The request's attributes were recorded (`sample()`/`trust()` must not add them twice).
    pub described: bool,
    /// The caller's context as it came (for `trust()`); `None` when there was none.
    pub incoming: Option<crate::trace::Incoming>,
    /// What is done with it now (`OPENTRACING_TRUST`, then `trust()`).
    pub trust: crate::config::Trust,
    /// `varnish.cache_result` was recorded (by `cache_result()`, or by `finish()` for a hit).
    pub cache_result_known: bool,
    /// The caller asked for a debug trace (B3, Jaeger): the context we send on keeps the flag.
    pub debug: bool,
}

impl TaskState {
    pub fn new(record: Box<SpanRecord>) -> Self {
        TaskState {
            record,
            status_sent: None,
            status_vcl: None,
            fetch_failed: false,
            repeats_seen: 0,
            had_tracestate: false,
            name_fixed: false,
            described: false,
            incoming: None,
            trust: crate::config::Trust::Extract,
            cache_result_known: false,
            debug: false,
        }
    }
}

/// The address of this static is our PRIV_TASK key: unique per loaded copy of the library.
static TASK_KEY: u8 = 0;

fn key() -> *const c_void {
    std::ptr::from_ref(&TASK_KEY).cast()
}

// The state normally lives in the task's workspace (a bump allocation Varnish releases with the
// task: no malloc/free per request); when the workspace is short, on the heap. Each placement
// has its own finaliser, so the fini knows how to take the state back.
static METHODS_WS: ffi::vmod_priv_methods = ffi::vmod_priv_methods {
    magic: ffi::VMOD_PRIV_METHODS_MAGIC,
    type_: c"opentracing span".as_ptr(),
    fini: Some(task_fini_ws),
};
static METHODS_HEAP: ffi::vmod_priv_methods = ffi::vmod_priv_methods {
    magic: ffi::VMOD_PRIV_METHODS_MAGIC,
    type_: c"opentracing span".as_ptr(),
    fini: Some(task_fini_heap),
};

static METHODS_UNSAMPLED: ffi::vmod_priv_methods = ffi::vmod_priv_methods {
    magic: ffi::VMOD_PRIV_METHODS_MAGIC,
    type_: c"opentracing unsampled".as_ptr(),
    fini: Some(task_fini_unsampled),
};

fn is_unsampled(p: &ffi::vmod_priv) -> bool {
    std::ptr::eq(p.methods, &METHODS_UNSAMPLED)
}

fn is_ours(p: &ffi::vmod_priv) -> bool {
    !p.priv_.is_null() && (std::ptr::eq(p.methods, &METHODS_WS) || std::ptr::eq(p.methods, &METHODS_HEAP))
}

/// Moves the state out of its slot (either placement) and clears the slot.
///
/// # Safety
/// `p` must hold our state (`is_ours`).
unsafe fn take(p: &mut ffi::vmod_priv) -> TaskState {
    let state = if std::ptr::eq(p.methods, &METHODS_WS) {
        std::ptr::read(p.priv_.cast::<TaskState>())
    } else {
        *Box::from_raw(p.priv_.cast::<TaskState>())
    };
    p.priv_ = std::ptr::null_mut();
    p.methods = std::ptr::null();
    state
}

/// What the current task holds.
pub enum Slot<'a> {
    /// Nothing of ours: `trace_request()`/`trace_backend()` did not run in this task.
    Empty,
    /// An unsampled request or fetch that has needed nothing more than its decision so far (see
    /// `install_unsampled`).
    Unsampled(Unsampled),
    Traced(&'a mut TaskState),
}

pub use crate::decisions::Unsampled;

/// What the slot `p` holds.
///
/// # Safety
/// `p` must be this library's PRIV_TASK slot of the running task.
unsafe fn held<'a>(p: &'a mut ffi::vmod_priv) -> Slot<'a> {
    if is_ours(p) {
        if let Some(state) = p.priv_.cast::<TaskState>().as_mut() {
            return Slot::Traced(state);
        }
    } else if is_unsampled(p) {
        if let Some(u) = p.priv_.cast::<Unsampled>().as_ref() {
            return Slot::Unsampled(*u);
        }
    }
    Slot::Empty
}

/// The slot of the current task, taking it back from the stash after a rollback.
pub fn slot<'a>(ctx: &Ctx) -> Slot<'a> {
    match recall(decision_key(ctx)) {
        Recalled::Unsampled(u) => Slot::Unsampled(u),
        Recalled::Nothing => Slot::Empty,
        Recalled::InTask | Recalled::Unknown => in_task_slot_or_stash(ctx),
    }
}

/// What the decision table knows of the task `key` (`Unknown`, so that the task's own slot is
/// looked at, without a key or with the table switched off).
fn recall(key: Option<Key>) -> Recalled {
    match key {
        Some(k) if decisions::in_use() => decisions::TABLE.recall(k),
        _ => Recalled::Unknown,
    }
}

/// Notes in the decision table that the task keeps its state in its own slot (see `claim`).
fn remember_in_task(key: Option<Key>) {
    if let Some(k) = key.filter(|_| decisions::in_use()) {
        decisions::TABLE.remember_in_task(k);
    }
}

/// What the task's own slot holds, or else what a rollback parked for the task (`from_stash`,
/// out of line).
fn in_task_slot_or_stash<'a>(ctx: &Ctx) -> Slot<'a> {
    // SAFETY: VRT_priv_task_get only looks up the task's priv list; the pointer it returns stays
    // valid for the task, and only this thread uses the task.
    unsafe {
        if let Some(p) = ffi::VRT_priv_task_get(ctx.raw, key()).as_mut() {
            let s = held(p);
            if !matches!(s, Slot::Empty) {
                return s;
            }
        }
    }
    if STASHED.load(Relaxed) == 0 {
        return Slot::Empty;
    }
    from_stash(ctx)
}

/// What a rollback parked for the task, back in place.
#[cold]
#[inline(never)]
fn from_stash<'a>(ctx: &Ctx) -> Slot<'a> {
    let Some(address) = task_address(ctx) else { return Slot::Empty };
    match take_stashed(address, current_vxid(ctx)) {
        Some(Parked::Traced(state)) => match install(ctx, *state) {
            Ok(state) => Slot::Traced(state),
            Err(state) => {
                // No slot for it (a workspace too short for one): closed now rather than lost.
                close_orphan(state, ClosedBy::TaskEnd);
                Slot::Empty
            }
        },
        // No room for the decision: the slot stays free (the decision is made again).
        Some(Parked::Unsampled(u)) if install_unsampled(ctx, u) => Slot::Unsampled(u),
        Some(Parked::Unsampled(_)) | None => Slot::Empty,
    }
}

/// The traced state of the current task (not an unsampled marker: see `calls::state` for that).
pub fn current<'a>(ctx: &Ctx) -> Option<&'a mut TaskState> {
    match slot(ctx) {
        Slot::Traced(state) => Some(state),
        Slot::Unsampled(_) | Slot::Empty => None,
    }
}

/// The current task's slot, for a call that starts a span: what it already holds, or the room
/// to put the new span in.
pub enum Claim<'a> {
    /// The task has a span already (a restart, a retry, a second call); never `Slot::Empty`.
    Held(Slot<'a>),
    /// Nothing yet.
    Free(Room),
}

/// Where the running task's span goes, once decided (`Room::unsampled`, `Room::traced`).
pub struct Room {
    key: Option<Key>,
}

/// The current task's slot (see `Claim`).
///
/// Cost: a first call learns from the decision table (`decisions`) that the task has kept
/// nothing yet, without looking in its own slot; that slot is created (`VRT_priv_task`, about
/// 340 instructions) only for a traced span (`Room::traced`), or for an unsampled decision the
/// table has no room for (`Room::unsampled`).
pub fn claim<'a>(ctx: &Ctx) -> Claim<'a> {
    let key = decision_key(ctx);
    match recall(key) {
        Recalled::Unsampled(u) => Claim::Held(Slot::Unsampled(u)),
        Recalled::Nothing => Claim::Free(Room { key }),
        Recalled::InTask | Recalled::Unknown => match in_task_slot_or_stash(ctx) {
            Slot::Empty => Claim::Free(Room { key }),
            held => Claim::Held(held),
        },
    }
}

impl Room {
    /// Keeps the task's unsampled decision (see `install_unsampled`). False if there is no room
    /// for it: nothing is kept.
    pub fn unsampled(&mut self, ctx: &Ctx, u: Unsampled) -> bool {
        keep_decision(ctx, self.key, u)
    }

    /// Attaches `state` to the task (see `install`); gives it back if Varnish has no room.
    // The Err variant is the state itself, handed back by value on a path that practically never runs.
    #[allow(clippy::result_large_err)]
    pub fn traced<'a>(self, ctx: &Ctx, state: TaskState) -> Result<&'a mut TaskState, TaskState> {
        let placed = in_new_task_slot(ctx, state)?;
        remember_in_task(self.key);
        Ok(placed)
    }
}

/// The key of the running task's decision: the request's (client tasks, `vcl_pipe` included:
/// Varnish's privs are the request's there too) or the fetch's.
fn decision_key(ctx: &Ctx) -> Option<Key> {
    // SAFETY: ctx->req and ctx->bo are NULL or the running task's, valid for the call.
    unsafe {
        if let Some(req) = ctx.raw.req.as_ref() {
            Key::new(ctx.raw.req as usize, req.t_first.0)
        } else if let Some(bo) = ctx.raw.bo.as_ref() {
            Key::new(ctx.raw.bo as usize, bo.t_first.0)
        } else {
            None
        }
    }
}

/// Keeps the decision of an unsampled request or fetch. Most requests are not sampled, and
/// most of them are cache hits that never send anything downstream: for those, the decision and
/// its IDs are all we keep (no span record, no copy, no fini). A fetch, VCL asking for the IDs,
/// or a retry reads the context from it. In client tasks, `sample()`, `trust()`, `finish()`
/// (traceresponse, Server-Timing) and `cache_result()` (a caller's tracestate to send on)
/// build the full state then (`calls::adopt`). It goes in the decision table (`decisions`), or,
/// when the table's slot is another task's, in the task's own slot, in its workspace. Returns
/// false if neither has room (keep the full state then).
pub fn install_unsampled(ctx: &Ctx, u: Unsampled) -> bool {
    keep_decision(ctx, decision_key(ctx), u)
}

/// The decision table, or else the task's own slot (counted when the table's slot was another
/// task's).
fn keep_decision(ctx: &Ctx, key: Option<Key>, u: Unsampled) -> bool {
    if let Some(k) = key.filter(|_| decisions::in_use()) {
        if decisions::TABLE.remember(k, &u) {
            return true;
        }
        let kept = in_task_slot(ctx, u);
        STATS.decisions_in_task_slot.fetch_add(u64::from(kept), Relaxed);
        return kept;
    }
    in_task_slot(ctx, u)
}

/// Keeps the decision in the task's own slot: a rollback (whose fini parks it) and the stash
/// bring it back.
fn in_task_slot(ctx: &Ctx, u: Unsampled) -> bool {
    // SAFETY: as in `claim`.
    match unsafe { new_priv_slot(ctx) } {
        Some(p) => unsafe { place_unsampled(ctx, p, u) },
        None => false,
    }
}

/// Bytes Varnish takes from the workspace for every `VRT_priv_task` call, before it looks for
/// an existing slot: a `struct vrt_priv` (64 bytes on 64-bit Varnish 7.7), with a margin.
const PRIV_SLOT_BYTES: usize = 96;

/// The task's PRIV_TASK slot, created if needed. When the workspace is too short for Varnish's
/// slot record (`VRT_priv_task` would mark it overflowed before taking the heap), only a slot
/// that already exists (a decision or a rollback's state placed earlier in the task).
///
/// # Safety
/// As in `claim`: `ctx` is the running task's context.
unsafe fn new_priv_slot<'a>(ctx: &Ctx) -> Option<&'a mut ffi::vmod_priv> {
    if workspace::free(ctx.raw.ws) < PRIV_SLOT_BYTES {
        return ffi::VRT_priv_task_get(ctx.raw, key()).as_mut();
    }
    ffi::VRT_priv_task(ctx.raw, key()).as_mut()
}

/// `install_unsampled` into the slot `p`.
///
/// # Safety
/// `p` must be this library's PRIV_TASK slot of the running task.
unsafe fn place_unsampled(ctx: &Ctx, p: &mut ffi::vmod_priv, u: Unsampled) -> bool {
    // The workspace allocation lives as long as the task (a rollback releases it, after the fini
    // has parked a copy).
    let mem = workspace::alloc_quiet(ctx.raw.ws, std::mem::size_of::<Unsampled>()).cast::<Unsampled>();
    if mem.is_null() || mem.align_offset(std::mem::align_of::<Unsampled>()) != 0 {
        return false;
    }
    if is_ours(p) {
        close_orphan(take(p), ClosedBy::TaskEnd);
    }
    mem.write(u);
    p.priv_ = mem.cast();
    p.methods = &METHODS_UNSAMPLED;
    true
}

/// Attaches `state` to the current task. Gives it back if Varnish has no room for the slot.
// The Err variant is the state itself, handed back by value on a path that practically never runs.
#[allow(clippy::result_large_err)]
pub fn install<'a>(ctx: &Ctx, state: TaskState) -> Result<&'a mut TaskState, TaskState> {
    let placed = in_new_task_slot(ctx, state)?;
    // The full state takes over from a decision kept in the table, if there was one.
    remember_in_task(decision_key(ctx));
    Ok(placed)
}

/// Attaches `state` to the task's own slot.
#[allow(clippy::result_large_err)]
fn in_new_task_slot<'a>(ctx: &Ctx, state: TaskState) -> Result<&'a mut TaskState, TaskState> {
    // SAFETY: as in `claim`; we own `state` until Varnish calls our fini with it.
    match unsafe { new_priv_slot(ctx) } {
        Some(p) => Ok(unsafe { place(ctx, p, state) }),
        None => Err(state),
    }
}

/// `install` into the slot `p`: in the workspace, or on the heap when it is short.
///
/// # Safety
/// `p` must be this library's PRIV_TASK slot of the running task.
unsafe fn place<'a>(ctx: &Ctx, p: &'a mut ffi::vmod_priv, state: TaskState) -> &'a mut TaskState {
    if is_ours(p) {
        // Replace (should not happen: callers check the slot first); close the old one.
        close_orphan(take(p), ClosedBy::TaskEnd);
    }
    let mem = workspace::alloc_quiet(ctx.raw.ws, std::mem::size_of::<TaskState>()).cast::<TaskState>();
    if !mem.is_null() && mem.align_offset(std::mem::align_of::<TaskState>()) == 0 {
        mem.write(state);
        p.priv_ = mem.cast();
        p.methods = &METHODS_WS;
    } else {
        p.priv_ = Box::into_raw(Box::new(state)).cast();
        p.methods = &METHODS_HEAP;
    }
    &mut *p.priv_.cast::<TaskState>()
}

fn task_address(ctx: &Ctx) -> Option<usize> {
    if !ctx.raw.req.is_null() {
        Some(ctx.raw.req as usize)
    } else if !ctx.raw.bo.is_null() {
        Some(ctx.raw.bo as usize)
    } else {
        None
    }
}

pub fn current_vxid(ctx: &Ctx) -> u64 {
    // SAFETY: ctx->vsl is NULL or the running task's log.
    unsafe { vxid_of(ctx.raw.vsl) }
}

/// `struct req_step` of `cache/cache_varnishd.h`, not in varnish-sys's bindings. Stable since
/// Varnish 6; checked by the rollback tests (`tests/vtc/lifecycle/`).
#[repr(C)]
struct ReqStep {
    name: *const std::ffi::c_char,
    func: *const c_void,
}

/// A fini that comes from a rollback rather than the end of the task.
///
/// # Safety
/// `ctx` must be the context Varnish passed to the fini.
unsafe fn is_rollback(ctx: &ffi::vrt_ctx) -> bool {
    if ctx.method != 0 {
        return true; // std.rollback() or return (vcl(...)), from inside a VCL subroutine
    }
    let Some(req) = ctx.req.as_ref() else { return false };
    let Some(step) = req.req_step.cast::<ReqStep>().as_ref() else { return false };
    !step.name.is_null() && CStr::from_ptr(step.name).to_bytes() == b"Req Step vclfail"
}

unsafe extern "C" fn task_fini_ws(ctx: *const ffi::vrt_ctx, p: *mut c_void) {
    if !p.is_null() {
        // SAFETY: `p` is the workspace slot we wrote in `install`; fini runs once per install,
        // before Varnish releases or rolls back the workspace.
        finish_task(ctx, unsafe { std::ptr::read(p.cast::<TaskState>()) });
    }
}

unsafe extern "C" fn task_fini_unsampled(ctx: *const ffi::vrt_ctx, p: *mut c_void) {
    // Nothing to close; only a rollback must keep the decision for the rest of the task (a copy:
    // the rollback releases the workspace that holds it).
    // SAFETY: the context Varnish passes to a fini, and the marker `install_unsampled` wrote.
    let (Some(ctx), Some(u)) = (unsafe { ctx.as_ref() }, unsafe { p.cast::<Unsampled>().as_ref() }) else {
        return;
    };
    if unsafe { is_rollback(ctx) } {
        let address = if !ctx.req.is_null() { ctx.req as usize } else { ctx.bo as usize };
        stash(address, unsafe { vxid_of(ctx.vsl) }, Parked::Unsampled(*u));
    }
}

unsafe extern "C" fn task_fini_heap(ctx: *const ffi::vrt_ctx, p: *mut c_void) {
    if !p.is_null() {
        // SAFETY: `p` is the Box we leaked in `install`; fini runs once per install.
        finish_task(ctx, *unsafe { Box::from_raw(p.cast::<TaskState>()) });
    }
}

fn finish_task(ctx: *const ffi::vrt_ctx, state: TaskState) {
    // A panic must not unwind into varnishd: it would abort the child.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let Some(ctx) = (unsafe { ctx.as_ref() }) else {
            close_orphan(state, ClosedBy::TaskEnd);
            return;
        };
        if unsafe { is_rollback(ctx) } {
            let address = if !ctx.req.is_null() { ctx.req as usize } else { ctx.bo as usize };
            stash(address, unsafe { vxid_of(ctx.vsl) }, Parked::Traced(Box::new(state)));
            return;
        }
        // An unsampled span only carried the context: nothing to complete or export.
        if state.record.sampled() {
            let final_vxid = unsafe { vxid_of(ctx.vsl) };
            let record = unsafe { complete(ctx, state) };
            if let Some(bo) = unsafe { ctx.bo.as_ref() } {
                if final_vxid != record.vxid && bo.uncacheable() == 0 {
                    // A retry: the object (if any) records this VXID as the fetch that stored it
                    // (`trace_backend` wrote it at the retry too; not if VCL skipped the call).
                    crate::vsl::fetch_links::GLOBAL.remember(final_vxid, record.trace_id, record.span_id);
                }
            }
            // SAFETY: ctx->vsl is this task's log, and the records are read within this fini.
            let buffer = unsafe { crate::vsl::ffi::task_records(ctx.vsl) };
            if let Some(record) = crate::vsl::task_log::close(buffer, record, final_vxid) {
                crate::vsl::tailer::finished(record, final_vxid);
            }
        }
    }));
}

/// Fills in what only the end of the task knows and hands back the finished record.
///
/// # Safety
/// `ctx` must be the context of the task's final fini.
unsafe fn complete(ctx: &ffi::vrt_ctx, state: TaskState) -> Box<SpanRecord> {
    let TaskState { mut record, status_sent, status_vcl, fetch_failed, .. } = state;
    record.closed_by = ClosedBy::TaskEnd;
    if let Some(req) = ctx.req.as_ref() {
        record.end_unix_nano = vtim_to_unix_nano(req.t_prev.0);
        let outcome = &mut record.outcome;
        outcome.vxid = Some(vxid_of(req.vsl.as_ptr()));
        outcome.request_body_size = Some(req.acct.req_bodybytes);
        outcome.response_body_size = Some(req.acct.resp_bodybytes);
        outcome.repeats = (req.restarts > 0).then_some(req.restarts);
        if let Some(status) = status_sent.or(status_vcl).filter(|s| *s > 0) {
            record.set_http_status(status);
        }
    } else if let Some(bo) = ctx.bo.as_ref() {
        record.end_unix_nano = vtim_to_unix_nano(bo.t_prev.0);
        let outcome = &mut record.outcome;
        outcome.vxid = Some(vxid_of(bo.vsl.as_ptr()));
        outcome.request_body_size = Some(bo.acct.bereq_bodybytes);
        outcome.repeats = (bo.retries > 0).then_some(bo.retries);
        if let Some(name) = ffi::VRT_BACKEND_string(ffi::VCL_BACKEND(bo.director_resp)).0.as_ref() {
            outcome.backend = Some(crate::span::text_lossy(CStr::from_ptr(name).to_bytes()));
        }
        if fetch_failed {
            record.status = StatusCode::Error;
            record.status_message = Some("backend fetch failed".to_owned());
            outcome.error_type = Some("fetch_failed".into());
        } else {
            outcome.response_body_size = Some(bo.acct.beresp_bodybytes);
            let status = http::status(bo.beresp);
            if let Some(status) = Some(status).filter(|s| *s > 0).or(status_vcl) {
                record.set_http_status(status);
            }
        }
    }
    if record.end_unix_nano < record.start_unix_nano {
        record.end_unix_nano = record.start_unix_nano;
    }
    record
}

/// Closes a record that lost its task (no end data): its end is now.
fn close_orphan(state: TaskState, how: ClosedBy) {
    let mut record = state.record;
    record.closed_by = how;
    record.end_unix_nano = now_unix_nano().max(record.start_unix_nano);
    record.set_str("varnish.span.closed_by", how.as_str());
    if record.sampled() {
        pipeline::submit(record);
    }
}

fn now_unix_nano() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

// ---- the rollback stash -------------------------------------------------------------------

/// How long a rolled-back span may wait to be taken back before the sweep closes it.
pub const STASH_DEADLINE: Duration = Duration::from_secs(30);
/// At most this many parked spans; beyond it the oldest is closed at once.
pub const STASH_CAPACITY: usize = 4096;

struct Stashed {
    address: usize,
    vxid: u64,
    since: Instant,
    state: Parked,
}

/// What a rolled-back task left.
enum Parked {
    Traced(Box<TaskState>),
    Unsampled(Unsampled),
}

static STASH: Mutex<Vec<Stashed>> = Mutex::new(Vec::new());
static STASHED: AtomicUsize = AtomicUsize::new(0);

fn stash(address: usize, vxid: u64, state: Parked) {
    let evicted = {
        let mut s = STASH.lock();
        let evicted = if s.len() >= STASH_CAPACITY { Some(s.remove(0)) } else { None };
        s.push(Stashed { address, vxid, since: Instant::now(), state });
        STASHED.store(s.len(), Relaxed);
        evicted
    };
    if let Some(Stashed { state: Parked::Traced(old), .. }) = evicted {
        STATS.spans_closed_by_deadline.fetch_add(1, Relaxed);
        close_orphan(*old, ClosedBy::Deadline);
    }
}

fn take_stashed(address: usize, vxid: u64) -> Option<Parked> {
    let mut s = STASH.lock();
    let i = s.iter().position(|e| e.address == address && e.vxid == vxid)?;
    let e = s.swap_remove(i);
    STASHED.store(s.len(), Relaxed);
    Some(e.state)
}

/// Closes parked spans older than the deadline; returns them finished, for the exporter.
pub fn sweep_stash() -> Vec<Box<SpanRecord>> {
    if STASHED.load(Relaxed) == 0 {
        return Vec::new();
    }
    let expired: Vec<Stashed> = {
        let mut s = STASH.lock();
        let (old, keep): (Vec<_>, Vec<_>) = s.drain(..).partition(|e| e.since.elapsed() >= STASH_DEADLINE);
        *s = keep;
        STASHED.store(s.len(), Relaxed);
        old
    };
    expired
        .into_iter()
        .filter_map(|e| {
            let Parked::Traced(state) = e.state else { return None };
            STATS.spans_closed_by_deadline.fetch_add(1, Relaxed);
            let mut record = state.record;
            record.closed_by = ClosedBy::Deadline;
            record.end_unix_nano = now_unix_nano().max(record.start_unix_nano);
            record.set_str("varnish.span.closed_by", ClosedBy::Deadline.as_str());
            record.sampled().then_some(record)
        })
        .collect()
}

// ---- ESI parents ----------------------------------------------------------------------------

/// ESI sub-requests run on the worker thread delivering their parent, after the parent's
/// `vcl_deliver`. Each request publishes its span here in `vcl_deliver`, by ESI level, and a
/// sub-request at level L takes entry L-1 as its parent. (Varnish copies the parent's original
/// request headers into the sub-request, so the rewritten `traceparent` is not there to read.)
pub const MAX_ESI_DEPTH: usize = 16;

#[derive(Clone, Copy)]
pub struct EsiParent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub flags: u8,
    /// The top request (`req->top`) the publishing request belongs to: a sub-request takes this
    /// parent only if it belongs to the same one.
    pub top: usize,
}

thread_local! {
    static ESI_PARENTS: [Cell<Option<EsiParent>>; MAX_ESI_DEPTH] = const { [const { Cell::new(None) }; MAX_ESI_DEPTH] };
}

pub fn publish_esi_parent(level: u32, parent: EsiParent) {
    if (level as usize) < MAX_ESI_DEPTH {
        ESI_PARENTS.with(|p| p[level as usize].set(Some(parent)));
    }
}

pub fn esi_parent(level: u32) -> Option<EsiParent> {
    let i = (level as usize).checked_sub(1)?;
    if i < MAX_ESI_DEPTH {
        ESI_PARENTS.with(|p| p[i].get())
    } else {
        None
    }
}
