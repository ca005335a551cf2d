//! The only `unsafe` code that touches the Varnish shared-memory log: a hand-written binding of
//! the parts of `vapi/vsl.h` we use (varnish-sys binds `vapi/vsm.h` but not `vsl.h`), the walk
//! through the log's ring (`Ring`), and `LogReader`, an RAII wrapper over the VSM handle and the
//! log's mapping.
//!
//! Reading: Varnish writes a transaction's records as one batch (an `SLT__Batch` record
//! enclosing them) when the transaction ends, so the log of an untraced request costs one step
//! whose transaction ID we check before looking inside. The steps are ours (`Ring`), not
//! libvarnishapi's cursor: `VSL_Next` cost about 100 instructions per step (an indirect call,
//! a magic check, a check call, an integer division), two steps per cache hit (the request's
//! batch, the session's `Link` record), two thirds of the tailer's work when nothing is traced
//! (callgrind, docs/performance-history.md). `Ring` follows the same rules as libvarnishapi's
//! `vslc_vsm_next` (`lib/libvarnishapi/vsl_cursor.c`): segment numbers to detect being lapped,
//! the end and wrap markers, a read barrier after the first word; and where that code asserts
//! (a length pointing out of the log), it reports an overrun instead of aborting varnishd. A
//! batch we want is copied out of shared memory and then checked again (the writer never waits
//! for readers and may have overwritten it meanwhile); only the private copy is parsed, by the
//! safe code in `record.rs`.
//!
//! Also the read of a task's own, not yet written, log buffer (`task_records`, for
//! `OPENTRACING_VSL=task`).
//!
//! Threading: a `LogReader` belongs to the tailer thread; libvarnishapi handles are not shared.
//! `task_records` runs on the worker that owns the task.

use std::ffi::{c_char, c_int, c_uint, CStr, CString};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};

use varnish::ffi::{
    vsm, vsm_fantom, VSM_Arg, VSM_Attach, VSM_Destroy, VSM_Error, VSM_Get, VSM_Map, VSM_New, VSM_Status,
    VSM_StillValid, VSM_Unmap, VSM_invalid,
};

use super::record::{HEADER_WORDS, IDENT_MASK};

const VSM_WRK_RESTARTED: c_uint = 1 << 11;
const VSM_MGT_RESTARTED: c_uint = 1 << 3;

#[link(name = "varnishapi")]
extern "C" {
    fn VSL_Name2Tag(name: *const c_char, l: c_int) -> c_int;
}

/// The tag number of a VSL tag name in the libvarnishapi we run with (numbers can change
/// between Varnish versions; names do not).
pub fn tag_number(name: &CStr) -> Option<u8> {
    // SAFETY: a pure lookup in libvarnishapi's static tag table.
    let n = unsafe { VSL_Name2Tag(name.as_ptr(), -1) };
    u8::try_from(n).ok()
}

/// The records a task has logged and Varnish has not yet written to the shared log: its VSL
/// buffer (`struct vsl_log`, `wlb` to `wlp`), in the log's own record layout (`OPENTRACING_VSL=task`,
/// `task_log`). Empty for a NULL or empty buffer, or one whose pointers make no sense.
///
/// # Safety
/// `vsl` must be NULL or the `vsl_log` of the task running on this thread (`ctx->vsl` during a
/// VCL call or the task's PRIV_TASK fini), and the slice must not outlive that call: Varnish
/// writes on into the buffer, and flushes it, once we return.
pub unsafe fn task_records<'a>(vsl: *const varnish::ffi::vsl_log) -> &'a [u8] {
    let Some(log) = vsl.as_ref() else { return &[] };
    if log.wlb.is_null() || log.wlp < log.wlb || log.wlp > log.wle {
        return &[];
    }
    // Both pointers into the one buffer, wlp at or after wlb: the words written so far.
    let words = log.wlp.offset_from(log.wlb) as usize;
    std::slice::from_raw_parts(log.wlb.cast::<u8>(), words * 4)
}

/// What one step through the log found.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// A batch (one transaction's records, usually all of them) of transaction `vxid`.
    Batch { vxid: u64 },
    /// A record outside any batch (sessions, CLI and other unbuffered records).
    Single { vxid: u64 },
    /// Nothing new for now.
    Idle,
    /// The writer overwrote records before we read them: the reader must go on from a place the
    /// writer has not reached again (`LogReader::recover`).
    Overrun,
    /// The log went away (child restart); the reader must attach again.
    Abandoned,
}

// The log's layout: `vapi/vsl_int.h` (records, markers) and `vsl_priv.h` (the head), as of
// Varnish 7.3 to 7.7; the head's marker names the layout's version ("VSLHEAD2" since 7.3), and
// a log with another is refused at attach, as libvarnishapi refuses it.

/// `VSL_CLASS`: the category of the log's VSM segment.
const LOG_CLASS: &CStr = c"Log";
/// `VSL_HEAD_MARKER`.
const HEAD_MARKER: &[u8; 8] = b"VSLHEAD2";
/// `VSL_SEGMENTS`: the ring is cut into this many segments, numbered for ever upwards.
const SEGMENTS: u32 = 8;
/// `SLT__Batch`: fixed by the log format, not in the name table.
const BATCH_TAG: u8 = 255;
/// `VSL_ENDMARKER`: where the writer will write next.
const END_MARKER: u32 = (254 << 24) | 0x45_4545;
/// `VSL_WRAPMARKER`: the rest of the ring is unused, go on at its start.
const WRAP_MARKER: u32 = (254 << 24) | 0x57_5757;

/// `struct VSL_head` (`vsl_priv.h`), followed in memory by the ring of 32-bit words.
#[repr(C)]
struct VslHead {
    marker: [u8; 8],
    /// Words per segment.
    segsize: isize,
    /// The segment being written, counted since the log's creation (wraps at `u32::MAX`).
    segment_n: c_uint,
    /// The first record of each segment (words from the ring's start), -1 when none yet.
    offset: [isize; SEGMENTS as usize],
}

// `log` follows the head at 88 bytes (LP64: x86_64, aarch64), where `VslHead` ends.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(size_of::<VslHead>() == 88);

/// A position in the ring and the number of the segment it is in (libvarnishapi's `VSLC_ptr`).
#[derive(Clone, Copy)]
struct Place {
    ptr: *const u32,
    segment: u32,
}

/// What `Ring::next` found.
#[derive(Debug, PartialEq, Eq)]
enum RingStep {
    /// A record or a batch, and its transaction ID (a batch's: its first enclosed record's).
    Record { batch: bool, vxid: u64 },
    /// Nothing more for now.
    End,
    /// The writer is too close behind us (or past us): what we would read may be overwritten.
    Lapped,
}

/// Steps through the ring of a mapped log, record by record (a batch counts as one), with the
/// rules of libvarnishapi's `vslc_vsm_next`.
struct Ring {
    head: *const VslHead,
    log: *const u32,
    /// One past the ring's last word.
    end: *const u32,
    segsize: usize,
    next: Place,
    /// The end of `next`'s segment (so that finding a record's segment takes no division).
    segment_end: *const u32,
    /// The record returned last (null before the first, and after a seek).
    current: Place,
    /// What `copy_record` copies of it: the batch's contents, or the whole record (start, bytes).
    current_body: (*const u32, usize),
}

impl Ring {
    /// A walker of the log whose head is at `head`, placed at the tail (past everything written).
    ///
    /// # Safety
    /// `head` must point at a `VSL_head` followed by its whole ring, mapped for as long as the
    /// `Ring` is used, with the marker checked.
    unsafe fn at_tail(head: *const VslHead) -> Result<Ring, &'static str> {
        let segsize = usize::try_from((*head).segsize).map_err(|_| "bad segment size")?;
        if segsize == 0 {
            return Err("bad segment size");
        }
        let log = head.add(1).cast::<u32>();
        let mut ring = Ring {
            head,
            log,
            end: log.add(segsize * SEGMENTS as usize),
            segsize,
            next: Place { ptr: log, segment: 0 },
            segment_end: log,
            current: Place { ptr: std::ptr::null(), segment: 0 },
            current_body: (std::ptr::null(), 0),
        };
        ring.seek_tail()?;
        Ok(ring)
    }

    fn segment_n(&self) -> u32 {
        // SAFETY: the head is mapped (`at_tail`); the writer updates the field concurrently.
        unsafe { std::ptr::addr_of!((*self.head).segment_n).read_volatile() }
    }

    /// `vslc_vsm_reset` with `VSL_COPT_TAIL`: from the start of the segment being written, run
    /// forward to the end of what is written.
    fn seek_tail(&mut self) -> Result<(), &'static str> {
        let segment = self.segment_n();
        // The offsets table must not be older than the segment number read (as libvarnishapi).
        fence(Ordering::Acquire);
        // SAFETY: the head is mapped; the index is below SEGMENTS.
        let offset = unsafe { std::ptr::addr_of!((*self.head).offset[(segment % SEGMENTS) as usize]).read_volatile() };
        let offset = usize::try_from(offset).ok().filter(|&o| o < self.segsize * SEGMENTS as usize);
        let Some(offset) = offset else { return Err("the log's segment table is not ready") };
        // SAFETY: within the ring (checked above).
        self.next = Place { ptr: unsafe { self.log.add(offset) }, segment };
        self.set_segment_end();
        // A lap of the ring holds at most this many records: more steps mean a walk in a circle
        // (a wrap marker where no writer puts one, inside the first segments), which would
        // otherwise go on for as long as the writer is idle.
        let most = self.segsize * SEGMENTS as usize / HEADER_WORDS + 1;
        for _ in 0..most {
            if self.segment_n().wrapping_sub(segment) > 1 {
                return Err("varnishd writes the log faster than it can be followed");
            }
            match self.next() {
                RingStep::Record { .. } => {}
                RingStep::End => {
                    self.current.ptr = std::ptr::null();
                    return Ok(());
                }
                RingStep::Lapped => return Err("lapped while looking for the log's tail"),
            }
        }
        Err("no end found in a lap of the log")
    }

    /// Goes back to the start of the segment `back` before the one being written (at most
    /// `SEGMENTS - 3`: what `next` still reads as intact), or of the first one written if the log
    /// is younger: what the writer wrote since is read again from there. For the tailer coming
    /// back from dormancy (`tailer`), to find the records a restart or a retry wrote out just
    /// before it was called back.
    fn seek_back(&mut self, back: u32) -> Result<(), &'static str> {
        let (current, target) = self.writer_and_back(back);
        self.seek_segment(target, current)
    }

    /// The writer's segment and the one `back` before it (at most `SEGMENTS - 3`), from one
    /// reading of the writer's number.
    fn writer_and_back(&self, back: u32) -> (u32, u32) {
        let current = self.segment_n();
        // The offsets table must not be older than the segment number read (as in `seek_tail`).
        fence(Ordering::Acquire);
        (current, current.wrapping_sub(back.min(SEGMENTS - 3)))
    }

    /// After `next` found the walker lapped: goes on from the start of the segment `back`
    /// before the writer's (what the writer wrote since it passed the walker, still intact) when
    /// that lies past the walker's place, and from the tail otherwise (a torn record with the
    /// writer near: starting before it again would meet it again), so that nothing read is read
    /// again. The target is fixed from one reading of the writer's segment number: varnishd
    /// stores that number after releasing its lock, so a later reading can briefly be lower.
    /// (Like `seek_back`, this trusts the offsets table: a batch longer than a segment, possible
    /// only with `vsl_buffer` above `vsl_space`/8, can leave a segment's entry a lap old.)
    fn seek_after_lap(&mut self, back: u32) -> Result<(), &'static str> {
        let (current, target) = self.writer_and_back(back);
        if target.wrapping_sub(self.next.segment) as i32 > 0 {
            self.seek_segment(target, current)
        } else {
            self.seek_tail()
        }
    }

    /// Goes to the start of `segment`, or of the first segment after it that has been written
    /// (up to `current`, the writer's).
    fn seek_segment(&mut self, mut segment: u32, current: u32) -> Result<(), &'static str> {
        loop {
            // SAFETY: the head is mapped; the index is below SEGMENTS.
            let offset =
                unsafe { std::ptr::addr_of!((*self.head).offset[(segment % SEGMENTS) as usize]).read_volatile() };
            // A segment not written yet in this log's life has none (-1): the next one, then.
            if let Some(offset) = usize::try_from(offset).ok().filter(|&o| o < self.segsize * SEGMENTS as usize) {
                // SAFETY: within the ring (checked above).
                self.next = Place { ptr: unsafe { self.log.add(offset) }, segment };
                self.set_segment_end();
                self.current.ptr = std::ptr::null();
                return Ok(());
            }
            if segment == current {
                return Err("the log's segment table is not ready");
            }
            segment = segment.wrapping_add(1);
        }
    }

    fn set_segment_end(&mut self) {
        let index = (self.next.segment % SEGMENTS) as usize;
        // SAFETY: at most `end`.
        self.segment_end = unsafe { self.log.add(self.segsize * (index + 1)) };
    }

    /// Whether the writer is far enough behind `place` that what is there is still intact
    /// (`vslc_vsm_check`: two segments of margin, and a warning zone of two more that is still
    /// valid for reading on).
    fn intact(&self, place: Place, margin: u32) -> bool {
        self.segment_n().wrapping_sub(place.segment) < SEGMENTS - margin
    }

    /// The next record or batch.
    fn next(&mut self) -> RingStep {
        loop {
            if !self.intact(self.next, 2) {
                return RingStep::Lapped;
            }
            // SAFETY: `next` is within the ring (checked when it was set).
            let word = unsafe { self.next.ptr.read_volatile() };
            if word == END_MARKER {
                return RingStep::End;
            }
            // What follows the first word was written before it (the writer's write barrier).
            fence(Ordering::Acquire);
            if word == WRAP_MARKER {
                if self.next.ptr == self.log {
                    return RingStep::Lapped; // cannot wrap at the start: not a log we understand
                }
                // The writer moved on to the next multiple of SEGMENTS (`vsl_wrap`).
                let segment = self.next.segment;
                self.next =
                    Place { ptr: self.log, segment: segment.wrapping_add((SEGMENTS - segment % SEGMENTS) % SEGMENTS) };
                self.set_segment_end();
                continue;
            }
            let here = self.next;
            let remaining = (self.end as usize - here.ptr as usize) / 4;
            // A record's header within the ring (so its second word is), and a first word no
            // writer writes (libvarnishapi asserts on it): a torn read of a record being
            // overwritten. So is anything below that points past the ring.
            if word == 0 || remaining <= HEADER_WORDS {
                return RingStep::Lapped;
            }
            let batch = (word >> 24) as u8 == BATCH_TAG;
            let (body, body_words, words) = if batch {
                // SAFETY: the batch's second word, within the ring (checked above).
                let enclosed = unsafe { here.ptr.add(1).read_volatile() } as usize;
                // At least one whole record inside (whose ID we read below).
                if enclosed < HEADER_WORDS * 4 {
                    return RingStep::Lapped;
                }
                // SAFETY: still within the ring's allocation (checked below before any read).
                (unsafe { here.ptr.add(HEADER_WORDS) }, enclosed.div_ceil(4), HEADER_WORDS + enclosed.div_ceil(4))
            } else {
                let words = HEADER_WORDS + ((word & 0xffff) as usize).div_ceil(4);
                (here.ptr, words, words)
            };
            if words >= remaining {
                return RingStep::Lapped;
            }
            // SAFETY: `body` holds a record header (at least HEADER_WORDS words) and lies within
            // the ring, like the record's end (checked above).
            let vxid = unsafe { vxid_of(body) };
            // SAFETY: within the ring (checked above).
            self.next.ptr = unsafe { here.ptr.add(words) };
            while self.next.ptr >= self.segment_end {
                self.next.segment = self.next.segment.wrapping_add(1);
                self.set_segment_end();
            }
            self.current = here;
            self.current_body = (body, body_words * 4);
            return RingStep::Record { batch, vxid };
        }
    }

    /// Whether the record returned last is still intact (`VSL_Check` valid).
    fn current_intact(&self) -> bool {
        !self.current.ptr.is_null() && self.intact(self.current, 4)
    }
}

/// Owns a VSM handle (the mapping of the instance's shared memory).
struct Vsm(*mut vsm);

impl Drop for Vsm {
    fn drop(&mut self) {
        // SAFETY: created by VSM_New, released once, after the log's mapping (field order).
        unsafe { VSM_Destroy(&mut self.0) }
    }
}

/// The log's segment, mapped.
struct Mapping {
    vsm: *mut vsm,
    fantom: vsm_fantom,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped by VSM_Map on this handle, unmapped once, before the handle goes.
        unsafe { VSM_Unmap(self.vsm, &mut self.fantom) };
    }
}

/// A reader of one instance's log. Field order is drop order: the walker goes before the
/// mapping it reads, which goes before the VSM handle.
pub struct LogReader {
    ring: Ring,
    mapping: Mapping,
    vsm: Vsm,
}

// SAFETY: the handles and the mapping are only used from the thread that owns the reader;
// moving the owner to another thread (the tailer worker, at spawn) is fine for libvarnishapi.
unsafe impl Send for LogReader {}

fn vsm_error(vsm: *const vsm) -> String {
    // SAFETY: VSM_Error returns NULL or a NUL-terminated string owned by the handle.
    unsafe { VSM_Error(vsm).as_ref().map(|p| CStr::from_ptr(p).to_string_lossy().into_owned()) }
        .unwrap_or_else(|| "unknown error".to_owned())
}

impl LogReader {
    /// Attaches to the log of the Varnish instance whose working directory is `workdir` (inside
    /// varnishd that is the child's current directory). Blocks up to `patience_s` seconds: call
    /// it on the tailer thread, never on the CLI thread.
    pub fn attach(workdir: &Path, patience_s: u32) -> Result<Self, String> {
        let dir = CString::new(workdir.as_os_str().as_encoded_bytes()).map_err(|_| "bad workdir".to_owned())?;
        let patience = CString::new(patience_s.to_string()).map_err(|_| "bad patience".to_owned())?;
        // SAFETY: plain libvarnishapi calls on handles we create; each is owned by its wrapper
        // as soon as it exists, so every failure path releases what was made.
        unsafe {
            let vsm = Vsm(VSM_New());
            if vsm.0.is_null() {
                std::mem::forget(vsm);
                return Err("VSM_New failed".to_owned());
            }
            if VSM_Arg(vsm.0, b'n' as c_char, dir.as_ptr()) < 0 || VSM_Arg(vsm.0, b't' as c_char, patience.as_ptr()) < 0
            {
                return Err(vsm_error(vsm.0));
            }
            if VSM_Attach(vsm.0, -1) < 0 {
                return Err(format!("cannot attach to the log of {}: {}", workdir.display(), vsm_error(vsm.0)));
            }
            let mut fantom: vsm_fantom = std::mem::zeroed();
            if VSM_Get(vsm.0, &mut fantom, LOG_CLASS.as_ptr(), std::ptr::null()) == 0 {
                return Err("no log yet (child not started?)".to_owned());
            }
            if VSM_Map(vsm.0, &mut fantom) != 0 {
                return Err(format!("cannot map the log: {}", vsm_error(vsm.0)));
            }
            if fantom.b.is_null() {
                // Never after a successful map; VSM_Unmap would assert on it.
                return Err("cannot map the log".to_owned());
            }
            let mapping = Mapping { vsm: vsm.0, fantom };
            let (b, e) = (mapping.fantom.b as usize, mapping.fantom.e as usize);
            let head = mapping.fantom.b.cast::<VslHead>().cast_const();
            if e < b + size_of::<VslHead>() || (*head).marker != *HEAD_MARKER {
                return Err("not a log this module can read (VSL head marker)".to_owned());
            }
            let segsize = usize::try_from((*head).segsize).unwrap_or(usize::MAX);
            let ring_bytes = segsize.checked_mul(SEGMENTS as usize * 4);
            if ring_bytes.is_none_or(|r| e - b - size_of::<VslHead>() < r) {
                return Err("the log's segment is smaller than its head says".to_owned());
            }
            let ring = Ring::at_tail(head).map_err(str::to_owned)?;
            Ok(LogReader { ring, mapping, vsm })
        }
    }

    /// After an overrun (`Step::Overrun`): goes on with what the writer wrote since it lapped
    /// the reader, from `back` segments before the writer's (`Ring::seek_after_lap`).
    pub fn recover(&mut self, back: u32) -> Result<(), String> {
        self.ring.seek_after_lap(back).map_err(str::to_owned)
    }

    /// Skips whatever is unread and continues from the current tail.
    pub fn reacquire(&mut self) -> Result<(), String> {
        self.ring.seek_tail().map_err(str::to_owned)
    }

    /// Reads again from the start of the segment `back` before the one being written (see
    /// `Ring::seek_back`).
    pub fn rewind(&mut self, back: u32) -> Result<(), String> {
        self.ring.seek_back(back).map_err(str::to_owned)
    }

    /// Whether the instance restarted since the last call (then the reader must attach again).
    /// A few system calls: call it when idle, not per record.
    pub fn restarted(&mut self) -> bool {
        // SAFETY: handle owned by self.
        unsafe { VSM_Status(self.vsm.0) & (VSM_WRK_RESTARTED | VSM_MGT_RESTARTED) != 0 }
    }

    /// Whether the log's segment is still the one varnishd writes (not left by a stopped child).
    fn still_valid(&self) -> bool {
        // SAFETY: handle and fantom owned by self.
        unsafe { VSM_StillValid(self.vsm.0, &self.mapping.fantom) != VSM_invalid.as_ptr() }
    }

    pub fn step(&mut self) -> Step {
        match self.ring.next() {
            RingStep::Record { batch: true, vxid } => Step::Batch { vxid },
            RingStep::Record { batch: false, vxid } => Step::Single { vxid },
            // libvarnishapi asks whether the segment is still valid at each of these: a child
            // that stopped leaves its log behind, never to be written again.
            RingStep::End | RingStep::Lapped if !self.still_valid() => Step::Abandoned,
            RingStep::End => Step::Idle,
            RingStep::Lapped => Step::Overrun,
        }
    }

    /// Copies the records of the current step (the batch's contents, or the single record) into
    /// `buf`, as bytes in native order. Returns false if the writer overwrote them meanwhile.
    pub fn copy_current(&self, buf: &mut Vec<u8>) -> bool {
        copy_record(&self.ring, buf)
    }
}

/// A batch is at most the `vsl_buffer` size (16k by default, settable to 1 MB or so): a
/// longer one is a torn read, not copied (nor the buffer grown for it).
const MAX_COPY_BYTES: usize = 8 << 20;

/// `LogReader::copy_current`, for any ring (tests use one in ordinary memory).
fn copy_record(ring: &Ring, buf: &mut Vec<u8>) -> bool {
    buf.clear();
    let (start, bytes) = ring.current_body;
    if ring.current.ptr.is_null() || bytes > MAX_COPY_BYTES {
        return false;
    }
    // SAFETY: `next` checked that the current record, body included, lies within the ring;
    // `current_intact` afterwards tells whether what we copied was still intact.
    buf.extend_from_slice(unsafe { std::slice::from_raw_parts(start.cast::<u8>(), bytes) });
    ring.current_intact()
}

/// The transaction ID of the record at `p`, without the client/backend markers.
///
/// # Safety
/// `p` must point at a record header (three words) in the mapped log.
unsafe fn vxid_of(p: *const u32) -> u64 {
    ((u64::from(p.add(2).read_volatile()) << 32) | u64::from(p.add(1).read_volatile())) & IDENT_MASK
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log in ordinary memory, written the way varnishd's `vsl_get` and `vsl_wrap` write it.
    struct FakeLog {
        /// u64s for the head's alignment.
        memory: Vec<u64>,
        segsize: usize,
        /// The writer's position (words from the ring's start) and segment number.
        at: usize,
        segment_n: u32,
    }

    const HEAD_U64S: usize = size_of::<VslHead>() / 8;

    impl FakeLog {
        fn new(segsize: usize) -> FakeLog {
            FakeLog::starting_at(segsize, 0)
        }

        /// Varnishd starts at `u32::MAX - 7` (`VSM_Init`), so that the count wraps early.
        fn starting_at(segsize: usize, segment_n: u32) -> FakeLog {
            assert_eq!(segment_n % SEGMENTS, 0);
            let mut log = FakeLog { memory: vec![0; HEAD_U64S + segsize * 4], segsize, at: 0, segment_n };
            let head = log.head_mut();
            head.marker = *HEAD_MARKER;
            head.segsize = segsize as isize;
            head.offset = [-1; SEGMENTS as usize];
            head.offset[0] = 0;
            head.segment_n = segment_n;
            log.ring_mut()[0] = END_MARKER;
            log
        }

        fn head_mut(&mut self) -> &mut VslHead {
            // SAFETY: the memory starts with room for a head, aligned for it.
            unsafe { &mut *self.memory.as_mut_ptr().cast::<VslHead>() }
        }

        fn head(&self) -> *const VslHead {
            self.memory.as_ptr().cast()
        }

        /// A walker placed at this log's tail. It reads the log's memory through a raw pointer
        /// (the log may be written meanwhile): each test keeps the log alive as long as it.
        fn tail(&self) -> Result<Ring, &'static str> {
            // SAFETY: a head with its whole ring, kept alive by the caller (above).
            unsafe { Ring::at_tail(self.head()) }
        }

        fn ring_mut(&mut self) -> &mut [u32] {
            let words = self.segsize * SEGMENTS as usize;
            // SAFETY: the ring follows the head within the allocation.
            unsafe { std::slice::from_raw_parts_mut(self.memory.as_mut_ptr().add(HEAD_U64S).cast::<u32>(), words) }
        }

        /// Writes a record of `payload` bytes (a batch when `batch_of` gives its enclosed
        /// records' bytes) for `vxid`; returns where it starts.
        fn write(&mut self, tag: u8, vxid: u64, payload: usize) -> usize {
            let words = HEADER_WORDS + payload.div_ceil(4);
            let end = self.segsize * SEGMENTS as usize;
            if self.at + words >= end {
                self.segment_n = self.segment_n.wrapping_add(SEGMENTS - self.segment_n % SEGMENTS);
                self.head_mut().offset[0] = 0;
                self.ring_mut()[0] = END_MARKER;
                if self.at != 0 {
                    let at = self.at;
                    self.ring_mut()[at] = WRAP_MARKER;
                    self.at = 0;
                }
                let n = self.segment_n;
                self.head_mut().segment_n = n;
            }
            let start = self.at;
            self.at += words;
            let at = self.at;
            self.ring_mut()[at] = END_MARKER;
            while self.at / self.segsize > (self.segment_n % SEGMENTS) as usize {
                self.segment_n = self.segment_n.wrapping_add(1);
                let (index, at) = ((self.segment_n % SEGMENTS) as usize, self.at as isize);
                self.head_mut().offset[index] = at;
            }
            let n = self.segment_n;
            self.head_mut().segment_n = n;
            let ring = self.ring_mut();
            ring[start + 1] = vxid as u32;
            ring[start + 2] = (vxid >> 32) as u32 | 1 << 30; // the client marker, masked off by readers
            for w in &mut ring[start + HEADER_WORDS..start + words] {
                *w = 0x2e2e_2e2e;
            }
            ring[start] = u32::from(tag) << 24 | payload as u32;
            start
        }

        /// A batch enclosing one record of `payload` bytes for `vxid`.
        fn write_batch(&mut self, vxid: u64, payload: usize) -> usize {
            let inner = (HEADER_WORDS + payload.div_ceil(4)) * 4;
            // The batch's header with the enclosed bytes as its "payload" occupies the same words.
            let start = self.write(BATCH_TAG, vxid, inner);
            let ring = self.ring_mut();
            ring[start + 1] = inner as u32;
            ring[start + 2] = 0;
            ring[start + HEADER_WORDS] = 1 << 24 | payload as u32;
            ring[start + HEADER_WORDS + 1] = vxid as u32;
            ring[start + HEADER_WORDS + 2] = (vxid >> 32) as u32;
            // The batch record's own length field is zero in varnishd; only its second word counts.
            ring[start] = u32::from(BATCH_TAG) << 24;
            start
        }
    }

    /// What the ring returns next, as (batch?, vxid).
    fn next_id(ring: &mut Ring) -> Option<(bool, u64)> {
        match ring.next() {
            RingStep::Record { batch, vxid } => Some((batch, vxid)),
            RingStep::End => None,
            RingStep::Lapped => panic!("lapped"),
        }
    }

    #[test]
    fn starts_at_the_tail_and_reads_records_and_batches_in_order() {
        let mut log = FakeLog::new(64);
        log.write(7, 1, 20);
        log.write_batch(2, 40);
        let mut ring = log.tail().unwrap();
        assert_eq!(next_id(&mut ring), None, "what was written before attaching is skipped");
        log.write(7, 3, 5);
        log.write_batch(1 << 40 | 4, 100);
        log.write(9, 5, 0);
        assert_eq!(next_id(&mut ring), Some((false, 3)));
        assert_eq!(next_id(&mut ring), Some((true, 1 << 40 | 4)));
        let mut buf = Vec::new();
        assert!(copy_record(&ring, &mut buf));
        assert_eq!(buf.len(), (HEADER_WORDS + 25) * 4, "the batch's contents, without its own header");
        assert_eq!(next_id(&mut ring), Some((false, 5)));
        assert!(copy_record(&ring, &mut buf));
        assert_eq!(buf.len(), HEADER_WORDS * 4);
        assert_eq!(next_id(&mut ring), None);
        assert_eq!(next_id(&mut ring), None, "the end stays the end");
    }

    #[test]
    fn follows_the_writer_round_the_ring_many_times() {
        let mut log = FakeLog::starting_at(50, u32::MAX - 7);
        let mut ring = log.tail().unwrap();
        let mut expected = 0u64;
        for vxid in 1..5_000u64 {
            // Sizes that do not divide the ring: records land across segment borders and wraps,
            // and some are longer than a segment.
            if vxid % 3 == 0 {
                log.write_batch(vxid, (vxid % 37) as usize);
            } else if vxid % 97 == 0 {
                log.write(7, vxid, 300);
            } else {
                log.write(7, vxid, (vxid % 23) as usize);
            }
            if vxid % 4 == 0 {
                while let Some((_, got)) = next_id(&mut ring) {
                    expected += 1;
                    assert_eq!(got, expected);
                    assert_eq!(ring.current.segment, ring_segment_of(&log, &ring), "segment number of {got}");
                }
            }
        }
        assert!(log.segment_n > 8 * 20 && log.segment_n < 1 << 20, "wrapped past u32::MAX: {}", log.segment_n);
        assert!(expected >= 4_990);
    }

    /// The segment number the writer had when it wrote the ring's current record, from the
    /// record's place and the writer's present lap (the test reads at most a lap behind).
    fn ring_segment_of(log: &FakeLog, ring: &Ring) -> u32 {
        let index = (ring.current.ptr as usize - ring.log as usize) / 4 / log.segsize;
        let lap = log.segment_n / SEGMENTS * SEGMENTS;
        let candidate = lap.wrapping_add(index as u32);
        if candidate.wrapping_sub(log.segment_n) as i32 > 0 {
            candidate.wrapping_sub(SEGMENTS)
        } else {
            candidate
        }
    }

    /// Writes filler records until the writer is `distance` segments past `segment`.
    fn write_until(log: &mut FakeLog, segment: u32, distance: u32) {
        while log.segment_n.wrapping_sub(segment) < distance {
            log.write(7, 99, 20);
        }
        assert_eq!(log.segment_n.wrapping_sub(segment), distance);
    }

    #[test]
    fn a_copy_is_intact_three_segments_behind_the_writer_not_four() {
        for (distance, intact) in [(3, true), (4, false)] {
            let mut log = FakeLog::starting_at(64, u32::MAX - 7);
            let mut ring = log.tail().unwrap();
            log.write(7, 1, 8);
            assert_eq!(next_id(&mut ring), Some((false, 1)));
            write_until(&mut log, ring.current.segment, distance);
            let mut buf = Vec::new();
            assert_eq!(copy_record(&ring, &mut buf), intact, "{distance} segments behind");
        }
    }

    #[test]
    fn reading_goes_on_five_segments_behind_the_writer_not_six() {
        for (distance, lapped) in [(5, false), (6, true)] {
            let mut log = FakeLog::starting_at(64, u32::MAX - 7);
            let mut ring = log.tail().unwrap();
            log.write(7, 1, 8);
            log.write(7, 2, 8);
            assert_eq!(next_id(&mut ring), Some((false, 1)));
            write_until(&mut log, ring.next.segment, distance);
            let step = ring.next();
            assert_eq!(step == RingStep::Lapped, lapped, "{distance} segments behind: {step:?}");
            if lapped {
                ring.seek_tail().unwrap();
                assert_eq!(next_id(&mut ring), None);
                let mut buf = Vec::new();
                assert!(!copy_record(&ring, &mut buf), "nothing current after a seek");
                log.write(7, 3, 8);
                assert_eq!(next_id(&mut ring), Some((false, 3)), "goes on from the tail");
            }
        }
    }

    #[test]
    fn seeking_back_reads_again_from_a_segment_before_the_writers() {
        let mut log = FakeLog::starting_at(64, u32::MAX - 7);
        // Enough records for several laps, then a known one at the start of a segment.
        for vxid in 0..200 {
            log.write(7, vxid, 30);
        }
        let mut ring = log.tail().unwrap();
        let now = log.segment_n;
        write_until(&mut log, now, 1);
        let marked_segment = log.segment_n;
        log.write(7, 5000, 8);
        write_until(&mut log, marked_segment, 2);
        log.write(7, 5001, 8);
        while next_id(&mut ring).is_some() {}
        ring.seek_back(2).unwrap();
        assert_eq!(ring.next.segment, marked_segment);
        // Two segments back, what is read is intact for a copy too (the tailer's rewind).
        let mut buf = Vec::new();
        assert_eq!(next_id(&mut ring), Some((false, 5000)));
        assert!(copy_record(&ring, &mut buf));
        let seen: Vec<u64> = std::iter::from_fn(|| next_id(&mut ring).map(|(_, v)| v)).collect();
        assert_eq!(seen.last(), Some(&5001), "{seen:?}");
        assert!(!seen.contains(&0), "nothing of the first laps: {seen:?}");
        // Never further back than `next` reads as intact.
        ring.seek_back(100).unwrap();
        assert_eq!(log.segment_n.wrapping_sub(ring.next.segment), SEGMENTS - 3);
        assert!(std::iter::from_fn(|| next_id(&mut ring)).count() > 0);
    }

    #[test]
    fn after_a_lap_reading_goes_on_a_few_segments_before_the_writer() {
        // Begun four segments before the segment number wraps, so that the lap crosses both the
        // number's wrap and the ring's.
        let mut log = FakeLog::starting_at(64, u32::MAX - 7);
        write_until(&mut log, u32::MAX - 7, 4);
        let mut ring = log.tail().unwrap();
        log.write(7, 1, 8);
        assert_eq!(next_id(&mut ring), Some((false, 1)));
        let place = ring.next.segment;
        // Written where the writer was four segments past the walker: two before the writer's
        // once it has lapped the walker (six past).
        write_until(&mut log, place, 4);
        log.write(7, 5000, 8);
        write_until(&mut log, place, 6);
        assert!(log.segment_n < place, "the segment number wrapped");
        assert_eq!(ring.next(), RingStep::Lapped);
        ring.seek_after_lap(2).unwrap();
        assert_eq!(ring.next.segment, place.wrapping_add(4));
        let mut seen = Vec::new();
        let mut buf = Vec::new();
        while let Some((_, vxid)) = next_id(&mut ring) {
            assert!(copy_record(&ring, &mut buf), "intact for a copy, as the tailer reads it");
            seen.push(vxid);
        }
        assert!(seen.contains(&5000), "kept what the writer wrote since the lap: {seen:?}");
        assert!(!seen.contains(&1), "nothing read twice: {seen:?}");
        // The tail would have skipped it.
        let mut tail = log.tail().unwrap();
        assert_eq!(next_id(&mut tail), None);
    }

    #[test]
    fn after_a_torn_record_reading_goes_on_past_it() {
        // The writer two segments on: from the tail (two back would be the torn record's
        // segment); three on: from the segment after the torn record's.
        for (distance, landing) in [(2, 2), (3, 1)] {
            let mut log = FakeLog::starting_at(64, u32::MAX - 7);
            write_until(&mut log, u32::MAX - 7, 3);
            let mut ring = log.tail().unwrap();
            let place = ring.next.segment;
            let at = log.write_batch(1, 8);
            log.ring_mut()[at] = 0;
            write_until(&mut log, place, distance);
            log.write(7, 2, 8);
            assert_eq!(ring.next(), RingStep::Lapped);
            ring.seek_after_lap(2).unwrap();
            assert_eq!(ring.next.segment, place.wrapping_add(landing), "writer {distance} on");
            log.write(7, 3, 8);
            let seen: Vec<u64> = std::iter::from_fn(|| next_id(&mut ring).map(|(_, v)| v)).collect();
            if distance == 2 {
                assert_eq!(seen, [3], "from the tail: what is written after the seek");
            } else {
                assert!(seen.ends_with(&[2, 3]), "{seen:?}");
            }
            assert!(!seen.contains(&1), "the torn record is not met again: {seen:?}");
        }
    }

    #[test]
    fn seeking_back_in_a_young_log_starts_at_its_first_segment() {
        let mut log = FakeLog::starting_at(64, u32::MAX - 7);
        log.write(7, 1, 8);
        let mut ring = log.tail().unwrap();
        write_until(&mut log, u32::MAX - 7, 1);
        log.write(7, 2, 8);
        ring.seek_back(3).unwrap();
        assert_eq!(ring.next.segment, u32::MAX - 7, "segments not written yet are skipped");
        assert_eq!(next_id(&mut ring), Some((false, 1)));
    }

    #[test]
    fn the_tail_is_found_from_the_current_segments_offset() {
        let mut log = FakeLog::starting_at(64, u32::MAX - 7);
        for vxid in 0..40 {
            log.write(7, vxid, 30);
        }
        assert!(log.segment_n % SEGMENTS > 1, "the writer is past the first segments");
        // Garbage where a walk from the ring's start would trip on it: the seek must not go there.
        log.ring_mut()[0] = 0;
        let mut ring = log.tail().unwrap();
        assert_eq!(ring.next.segment, log.segment_n);
        assert_eq!(next_id(&mut ring), None);
        log.write(7, 1000, 8);
        assert_eq!(next_id(&mut ring), Some((false, 1000)));
    }

    #[test]
    fn torn_records_are_an_overrun_not_a_crash_nor_a_read_past_the_ring() {
        type Tear = fn(&mut FakeLog, usize);
        let torn: [Tear; 5] = [
            // 16 KB: past the 2 KB ring.
            |log, at| log.ring_mut()[at] = 7 << 24 | 0xffff,
            // A batch of 4 GB.
            |log, at| log.ring_mut()[at + 1] = u32::MAX,
            // A batch too short to hold a record.
            |log, at| log.ring_mut()[at + 1] = 8,
            // A zero first word (libvarnishapi asserts).
            |log, at| log.ring_mut()[at] = 0,
            // A wrap marker at the ring's start.
            |log, _| log.ring_mut()[0] = WRAP_MARKER,
        ];
        for (i, tear) in torn.iter().enumerate() {
            let mut log = FakeLog::new(64);
            let mut ring = log.tail().unwrap();
            let at = log.write_batch(1, 8);
            tear(&mut log, at);
            assert_eq!(ring.next(), RingStep::Lapped, "case {i}");
        }
        // A record reaching the ring's end (the next one would start past it) is torn; one
        // whose successor starts on the ring's last word is not (libvarnishapi: next < end).
        for (payload, whole) in [(4 * (64 * 8 - HEADER_WORDS), false), (4 * (64 * 8 - 1 - HEADER_WORDS), true)] {
            let mut log = FakeLog::new(64);
            let mut ring = log.tail().unwrap();
            log.write(7, 1, 8);
            log.ring_mut()[0] = 7 << 24 | payload as u32;
            let step = ring.next();
            assert_eq!(step == RingStep::Record { batch: false, vxid: 1 }, whole, "payload {payload}: {step:?}");
            assert_eq!(step == RingStep::Lapped, !whole);
        }
    }

    #[test]
    fn a_wrap_marker_inside_the_first_segment_cannot_make_the_tail_seek_go_round_for_ever() {
        let mut log = FakeLog::new(64);
        let mut at = 0;
        for vxid in 0..5 {
            at = log.write(7, vxid, 8);
        }
        assert_eq!(log.segment_n, 0, "all in the first segment");
        // Garbage: a wrap marker the writer never puts there. Walking from the segment's start
        // reaches it, wraps to the same segment's start, and so on.
        log.ring_mut()[at] = WRAP_MARKER;
        assert!(log.tail().is_err());
    }

    #[test]
    fn a_head_without_a_usable_segment_table_is_refused() {
        let mut log = FakeLog::new(64);
        log.head_mut().offset[0] = -1;
        assert!(log.tail().is_err());
        let mut log = FakeLog::new(64);
        log.head_mut().offset[0] = 64 * 8;
        assert!(log.tail().is_err());
        let mut log = FakeLog::new(64);
        log.head_mut().segsize = 0;
        assert!(log.tail().is_err());
    }
}
