//! Who is at the other end of a client request: `client.address` (the client as Varnish sees
//! it, after the PROXY protocol) and `network.peer.address`/`port` (the TCP peer).

use std::ffi::CStr;

use varnish::ffi;

/// `(client.address, (network.peer.address, network.peer.port))` of the request's session.
///
/// # Safety
/// `ctx` must be the context of a client task (`ctx.req` valid), during a VCL call.
pub unsafe fn client_and_peer(ctx: &ffi::vrt_ctx) -> (Option<String>, Option<(String, u16)>) {
    let Some(sp) = ctx.req.as_ref().and_then(|r| r.sp.as_ref()) else { return (None, None) };
    // A string attribute: SES_Get_client_ip() asserts on those, SES_Get_String_Attr() is the
    // accessor for them (what VCL's client.ip is printed from).
    let ip = ffi::SES_Get_String_Attr(sp, ffi::SessionAttr::ClientIp);
    let client = (!ip.is_null()).then(|| CStr::from_ptr(ip).to_string_lossy().into_owned());
    let mut sa: *mut ffi::suckaddr = std::ptr::null_mut();
    let peer = if ffi::SES_Get_remote_addr(sp, &mut sa) == 0 && !sa.is_null() {
        // Formats into the task's workspace: the string lives as long as the request.
        let text = ffi::VRT_IP_string(ctx, ffi::VCL_IP(sa));
        text.0.as_ref().map(|_| (CStr::from_ptr(text.0).to_string_lossy().into_owned(), ffi::VSA_Port(sa) as u16))
    } else {
        None
    };
    (client, peer)
}
