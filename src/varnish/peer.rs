//! Who is at the other end of a client request: `client.address` (the client as Varnish sees
//! it, after the PROXY protocol) and `network.peer.address`/`port` (the TCP peer).

use std::cell::RefCell;
use std::ffi::CStr;

use varnish::ffi;

use crate::span::{text_lossy, Text};

/// `client.address`, and `network.peer.address` with `network.peer.port`.
pub type Addresses = (Option<Text>, Option<(Text, u16)>);

/// The addresses of the session a worker thread served last. A session's addresses never change
/// (the PROXY protocol names the client once, before the first request), and a worker usually
/// serves a keep-alive session's next request too: it lingers on the connection
/// (`timeout_linger`) rather than hand it back to the waiter. Varnish's two accessors and the
/// text cost about 600 instructions per request (callgrind); a repeat costs a comparison and two
/// copies of inline text. Varnish has no per-session PRIV to keep them in.
///
/// Keyed by the session's address and its VXID: a session allocated where a finished one was
/// has a VXID of its own. Threading: one per worker thread, never shared.
#[derive(Default)]
struct LastSession {
    session: Option<(usize, u64)>,
    addresses: Addresses,
}

impl LastSession {
    /// The addresses of `session`, from `read` when they are not the ones kept.
    fn get(&mut self, session: (usize, u64), read: impl FnOnce() -> Addresses) -> Addresses {
        if self.session != Some(session) {
            self.addresses = read();
            self.session = Some(session);
        }
        self.addresses.clone()
    }
}

thread_local! {
    static LAST_SESSION: RefCell<LastSession> = RefCell::default();
}

/// `(client.address, (network.peer.address, network.peer.port))` of the request's session.
///
/// # Safety
/// `ctx` must be the context of a client task (`ctx.req` valid), during a VCL call.
pub unsafe fn client_and_peer(ctx: &ffi::vrt_ctx) -> Addresses {
    let Some(sp) = ctx.req.as_ref().and_then(|r| r.sp.as_ref()) else { return (None, None) };
    let session = (std::ptr::from_ref(sp) as usize, sp.vxid.vxid);
    // `try_with`: a thread being torn down reads the addresses again rather than panic.
    LAST_SESSION
        .try_with(|last| last.borrow_mut().get(session, || read_addresses(ctx, sp)))
        .unwrap_or_else(|_| read_addresses(ctx, sp))
}

/// The most `VRT_IP_string` copies into the workspace: its buffer (`VTCP_ADDRBUFSIZE`, 64).
const IP_TEXT_BYTES: usize = 64;

/// What `client_and_peer` gives, read from Varnish.
///
/// # Safety
/// As `client_and_peer`; `sp` is the request's session.
unsafe fn read_addresses(ctx: &ffi::vrt_ctx, sp: &ffi::sess) -> Addresses {
    // A string attribute: SES_Get_client_ip() asserts on those, SES_Get_String_Attr() is the
    // accessor for them (what VCL's client.ip is printed from).
    let ip = ffi::SES_Get_String_Attr(sp, ffi::SessionAttr::ClientIp);
    let mut sa: *mut ffi::suckaddr = std::ptr::null_mut();
    let peer = if ffi::SES_Get_remote_addr(sp, &mut sa) == 0 && !sa.is_null() {
        let port = ffi::VSA_Port(sa) as u16;
        address_text(sa)
            .or_else(|| {
                // IPv6 or a Unix socket listener: Varnish's own text for it, which formats into the
                // task's workspace, so the string lives as long as the request. Only with room for
                // the longest text: short of it, `WS_Copy` would mark the workspace overflowed.
                if crate::varnish::workspace::free(ctx.ws) < IP_TEXT_BYTES {
                    return None;
                }
                let text = ffi::VRT_IP_string(ctx, ffi::VCL_IP(sa));
                text.0.as_ref().map(|_| text_lossy(CStr::from_ptr(text.0).to_bytes()))
            })
            .map(|a| (a, port))
    } else {
        None
    };
    let client = (!ip.is_null()).then(|| {
        let ip = CStr::from_ptr(ip).to_bytes();
        match &peer {
            // Without the PROXY protocol the client is the peer: a copy of its text is cheaper
            // than checking and copying Varnish's (about 130 instructions, callgrind).
            Some((text, _)) if text.as_bytes() == ip => text.clone(),
            _ => text_lossy(ip),
        }
    });
    (client, peer)
}

/// The numeric text of an IPv4 address, as `getnameinfo(NI_NUMERICHOST)` (which `VRT_IP_string`
/// calls, at several times the cost) prints it. IPv6 is left to Varnish: its text has cases
/// (scope IDs, IPv4-mapped addresses) where Rust's differs.
///
/// # Safety
/// `sa` must be a valid `suckaddr`.
unsafe fn address_text(sa: *const ffi::suckaddr) -> Option<Text> {
    let mut bytes: *const u8 = std::ptr::null();
    if ffi::VSA_GetPtr(sa, &mut bytes) == AF_INET && !bytes.is_null() {
        Some(ipv4_text(*bytes.cast::<[u8; 4]>()))
    } else {
        None
    }
}

/// Dotted-quad text, as `Ipv4Addr`'s `Display` writes it, without the formatting machinery
/// (which cost about 1,700 instructions per address, more than the rest of the span's start).
/// Written on the stack and held inline (at most 15 bytes): no allocation. (`CompactString`'s
/// own `push` cost about 110 instructions a call.)
fn ipv4_text(octets: [u8; 4]) -> Text {
    let mut text = [0u8; 15];
    let mut len = 0;
    let mut digits = itoa::Buffer::new();
    for (i, o) in octets.iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        let d = digits.format(*o).as_bytes();
        text[len..len + d.len()].copy_from_slice(d);
        len += d.len();
    }
    text_lossy(&text[..len])
}

/// `AF_INET` as `VSA_GetPtr` returns it. Elsewhere than Linux, Varnish's own text.
#[cfg(target_os = "linux")]
const AF_INET: i32 = 2;
#[cfg(not(target_os = "linux"))]
const AF_INET: i32 = -1;

#[cfg(test)]
mod tests {
    use super::{ipv4_text, Addresses, LastSession};
    use std::net::Ipv4Addr;

    #[test]
    fn a_sessions_addresses_are_read_once_per_thread_and_session() {
        let mut last = LastSession::default();
        let mut reads = 0;
        let mut read = |client: &str| {
            reads += 1;
            let a: Addresses = (Some(client.into()), Some(("10.0.0.1".into(), 80)));
            a
        };
        assert_eq!(last.get((1, 100), || read("192.0.2.7")).0.as_deref(), Some("192.0.2.7"));
        assert_eq!(last.get((1, 100), || read("not read")).0.as_deref(), Some("192.0.2.7"));
        // Another session at the same address (the first one freed), or elsewhere: read again.
        assert_eq!(last.get((1, 200), || read("198.51.100.9")).0.as_deref(), Some("198.51.100.9"));
        assert_eq!(last.get((2, 100), || read("203.0.113.5")).0.as_deref(), Some("203.0.113.5"));
        assert_eq!(last.get((2, 100), || read("not read")).1, Some(("10.0.0.1".into(), 80)));
        assert_eq!(reads, 3);
    }

    #[test]
    fn ipv4_text_is_what_display_writes() {
        for octets in [[127, 0, 0, 1], [0, 0, 0, 0], [255, 255, 255, 255], [10, 200, 3, 45], [192, 168, 100, 9]] {
            assert_eq!(ipv4_text(octets), Ipv4Addr::from(octets).to_string());
        }
    }
}
