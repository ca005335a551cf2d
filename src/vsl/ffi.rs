//! The only `unsafe` code that touches the Varnish shared-memory log: a hand-written binding of
//! the parts of `vapi/vsl.h` we use (varnish-sys binds `vapi/vsm.h` but not `vsl.h`), and
//! `LogReader`, an RAII wrapper over the VSM handle, the VSL handle and a cursor.
//!
//! Reading: the cursor is opened with `VSL_COPT_BATCH`, so a transaction's records, which
//! Varnish flushes as one batch when the transaction ends, come back as a single step whose
//! transaction ID we can check before looking inside: the log of an untraced request costs one
//! step. A batch we want is copied out of shared memory and then validated with `VSL_Check`
//! (the writer never waits for readers and may have overwritten it meanwhile); only the private
//! copy is parsed, by the safe code in `record.rs`.
//!
//! Threading: a `LogReader` belongs to the tailer thread; libvarnishapi handles are not shared.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::path::Path;

use varnish::ffi::{vsm, VSM_Arg, VSM_Attach, VSM_Destroy, VSM_Error, VSM_New, VSM_Status};

use super::record::{HEADER_WORDS, IDENT_MASK};

#[repr(C)]
struct VslData {
    _opaque: [u8; 0],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct VslcPtr {
    ptr: *const u32,
    priv_: c_uint,
}

#[repr(C)]
struct VslCursor {
    rec: VslcPtr,
    priv_tbl: *const c_void,
    priv_data: *mut c_void,
}

const VSL_COPT_TAIL: c_uint = 1 << 0;
const VSL_COPT_BATCH: c_uint = 1 << 1;

// enum vsl_status
const VSL_E_OVERRUN: c_int = -3;
const VSL_E_ABANDON: c_int = -2;
const VSL_END: c_int = 0;
const VSL_MORE: c_int = 1;

// enum vsl_check
const VSL_CHECK_VALID: c_int = 2;

const VSM_WRK_RESTARTED: c_uint = 1 << 11;
const VSM_MGT_RESTARTED: c_uint = 1 << 3;

#[link(name = "varnishapi")]
extern "C" {
    fn VSL_New() -> *mut VslData;
    fn VSL_Delete(vsl: *mut VslData);
    fn VSL_Error(vsl: *const VslData) -> *const c_char;
    fn VSL_ResetError(vsl: *mut VslData);
    fn VSL_CursorVSM(vsl: *mut VslData, vsm: *mut vsm, options: c_uint) -> *mut VslCursor;
    fn VSL_DeleteCursor(c: *const VslCursor);
    fn VSL_Next(c: *const VslCursor) -> c_int;
    fn VSL_Check(c: *const VslCursor, ptr: *const VslcPtr) -> c_int;
    fn VSL_Name2Tag(name: *const c_char, l: c_int) -> c_int;
}

/// The tag number of a VSL tag name in the libvarnishapi we run with (numbers can change
/// between Varnish versions; names do not).
pub fn tag_number(name: &CStr) -> Option<u8> {
    // SAFETY: a pure lookup in libvarnishapi's static tag table.
    let n = unsafe { VSL_Name2Tag(name.as_ptr(), -1) };
    u8::try_from(n).ok()
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
    /// The writer overwrote records before we read them: the cursor must be reacquired.
    Overrun,
    /// The log went away (child restart); the reader must attach again.
    Abandoned,
}

/// Owns a VSM handle (the mapping of the instance's shared memory).
struct Vsm(*mut vsm);

impl Drop for Vsm {
    fn drop(&mut self) {
        // SAFETY: created by VSM_New, released once.
        unsafe { VSM_Destroy(&mut self.0) }
    }
}

/// Owns a VSL handle (log reading state and errors).
struct Vsl(*mut VslData);

impl Drop for Vsl {
    fn drop(&mut self) {
        // SAFETY: created by VSL_New, released once, after every cursor made from it.
        unsafe { VSL_Delete(self.0) }
    }
}

/// Owns a cursor into the log.
struct Cursor(*mut VslCursor);

impl Drop for Cursor {
    fn drop(&mut self) {
        // SAFETY: created by VSL_CursorVSM, released once.
        unsafe { VSL_DeleteCursor(self.0) }
    }
}

/// A reader of one instance's log. Field order is drop order: the cursor goes before the VSL
/// handle, which goes before the VSM mapping it reads.
pub struct LogReader {
    cursor: Cursor,
    vsl: Vsl,
    vsm: Vsm,
}

/// `SLT__Batch` of `vapi/vsl_int.h`: fixed by the log format, not in the name table.
const BATCH_TAG: u8 = 255;

// SAFETY: the handles are only used from the thread that owns the reader; moving the owner to
// another thread (the tailer worker, at spawn) is fine for libvarnishapi.
unsafe impl Send for LogReader {}

fn vsm_error(vsm: *const vsm) -> String {
    // SAFETY: VSM_Error returns NULL or a NUL-terminated string owned by the handle.
    unsafe { VSM_Error(vsm).as_ref().map(|p| CStr::from_ptr(p).to_string_lossy().into_owned()) }
        .unwrap_or_else(|| "unknown error".to_owned())
}

fn new_cursor(vsl: &Vsl, vsm: &Vsm) -> Result<Cursor, String> {
    // SAFETY: both handles are live; errors are read from and reset on the VSL handle.
    unsafe {
        let c = VSL_CursorVSM(vsl.0, vsm.0, VSL_COPT_TAIL | VSL_COPT_BATCH);
        if c.is_null() {
            let msg = VSL_Error(vsl.0)
                .as_ref()
                .map(|p| CStr::from_ptr(p).to_string_lossy().into_owned())
                .unwrap_or_else(|| "no log yet".to_owned());
            VSL_ResetError(vsl.0);
            return Err(msg);
        }
        Ok(Cursor(c))
    }
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
            let vsl = Vsl(VSL_New());
            if vsl.0.is_null() {
                std::mem::forget(vsl);
                return Err("VSL_New failed".to_owned());
            }
            let cursor = new_cursor(&vsl, &vsm)?;
            Ok(LogReader { cursor, vsl, vsm })
        }
    }

    /// After an overrun: skip what was lost and continue from the current tail.
    pub fn reacquire(&mut self) -> Result<(), String> {
        self.cursor = new_cursor(&self.vsl, &self.vsm)?;
        Ok(())
    }

    /// Whether the instance restarted since the last call (then the reader must attach again).
    /// A few system calls: call it when idle, not per record.
    pub fn restarted(&mut self) -> bool {
        // SAFETY: handle owned by self.
        unsafe { VSM_Status(self.vsm.0) & (VSM_WRK_RESTARTED | VSM_MGT_RESTARTED) != 0 }
    }

    pub fn step(&mut self) -> Step {
        // SAFETY: the cursor is valid; after VSL_MORE its `rec.ptr` points at a record header
        // in the mapped log.
        unsafe {
            match VSL_Next(self.cursor.0) {
                VSL_MORE => {
                    let p = (*self.cursor.0).rec.ptr;
                    let tag = (*p >> 24) as u8;
                    if tag == BATCH_TAG {
                        // The batch's ID is the first enclosed record's.
                        Step::Batch { vxid: vxid_of(p.add(HEADER_WORDS)) }
                    } else {
                        Step::Single { vxid: vxid_of(p) }
                    }
                }
                VSL_END => Step::Idle,
                VSL_E_OVERRUN => Step::Overrun,
                VSL_E_ABANDON => Step::Abandoned,
                _ => Step::Abandoned,
            }
        }
    }

    /// Copies the records of the current step (the batch's contents, or the single record) into
    /// `buf`, as bytes in native order. Returns false if the writer overwrote them meanwhile.
    pub fn copy_current(&self, buf: &mut Vec<u8>) -> bool {
        buf.clear();
        // SAFETY: the cursor points at a record of the mapped log (last step returned Batch or
        // Single); lengths come from its header and are bounded below; VSL_Check afterwards
        // tells whether what we copied was still intact.
        unsafe {
            let rec = (*self.cursor.0).rec;
            let p = rec.ptr;
            let tag = (*p >> 24) as u8;
            let (start, bytes) = if tag == BATCH_TAG {
                (p.add(HEADER_WORDS), *p.add(1) as usize)
            } else {
                (p, (HEADER_WORDS + ((*p & 0xffff) as usize).div_ceil(4)) * 4)
            };
            // A batch is at most the vsl_buffer size (16k by default, settable to 1 MB or so).
            if bytes > 8 << 20 {
                return false;
            }
            buf.extend_from_slice(std::slice::from_raw_parts(start.cast::<u8>(), bytes));
            VSL_Check(self.cursor.0, &rec) == VSL_CHECK_VALID
        }
    }
}

/// The transaction ID of the record at `p`, without the client/backend markers.
///
/// # Safety
/// `p` must point at a record header (three words) in the mapped log.
unsafe fn vxid_of(p: *const u32) -> u64 {
    ((u64::from(*p.add(2)) << 32) | u64::from(*p.add(1))) & IDENT_MASK
}
