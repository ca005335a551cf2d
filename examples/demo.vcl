# The demo's VCL: the two lines every user adds, plus a little routing for the demo backend.
vcl 4.1;

import opentracing;
include "opentracing.vcl";

backend default {
    .host = "127.0.0.1";
    .port = "8091";
}

sub vcl_recv {
    if (req.url ~ "^/pass/") {
        return (pass);
    }
}

sub vcl_backend_response {
    if (beresp.http.X-Enable-ESI) {
        set beresp.do_esi = true;
    }
}

sub vcl_deliver {
    # The trace is visible to the client too (and usable in varnishncsa formats).
    set resp.http.X-Trace-Id = opentracing.trace_id();
}
