# opentracing.vcl: wires vmod-opentracing into every built-in subroutine.
#
# Use it like this, with the include directly after the imports, before any subroutine of yours:
#
#     vcl 4.1;
#     import opentracing;
#     include "opentracing.vcl";
#
# Varnish concatenates the bodies of subroutines defined more than once, in source order. Coming
# first, each hook below runs before your code in the same subroutine, so your own `return`
# statements cannot skip it. An include placed later still compiles, but any subroutine of yours
# that returns before reaching ours loses that hook (for vcl_recv: the request is not traced).
#
# The span outcome does not depend on VCL: end time, final status and sizes come from Varnish
# itself when the request or fetch is over.

# The include does not import the VMOD itself: your `import opentracing;` (with or without a
# `from` path) is the one it uses.
#
# The calls sit in the built-in subroutines themselves, not in subroutines of their own called
# from there: each such `call` cost Varnish about 23 instructions per request (68 per cache hit,
# measured with bench/callgrind.sh), a tenth of what tracing an unsampled hit costs in all.

# Starts (or, after a restart, continues) the request's span.
sub vcl_recv {
    opentracing.trace_request();
}

# cache_result() records the result and, where a fetch follows (miss, pass, pipe, a stale hit),
# writes the span's context into req.http.traceparent, so that the fetch is its child. A fresh
# hit, the common case, needs no call: finish() in vcl_deliver reads the result from Varnish.
# A hit past its TTL is served in grace with a background fetch, which starts when vcl_hit
# returns: that one is recorded here, and its fetch gets the context. (An object older than
# req.ttl is a miss for Varnish's lookup: vcl_hit never sees it.)
sub vcl_hit {
    if (obj.ttl <= 0s) {
        opentracing.cache_result("hit");
    }
}

sub vcl_miss {
    opentracing.cache_result("miss");
}

sub vcl_pass {
    opentracing.cache_result("pass");
}

sub vcl_pipe {
    opentracing.cache_result("pipe");
}

sub vcl_synth {
    opentracing.cache_result("synth");
    if (opentracing.finish()) {
        set resp.filters += " opentracing";
    }
}

# For conditional and range requests, the status sent can still become 304 or 206 after
# vcl_deliver: then the "opentracing" delivery filter reads the status actually sent and steps
# aside (it never touches the body).
sub vcl_deliver {
    if (opentracing.finish()) {
        set resp.filters += " opentracing";
    }
}

sub vcl_backend_fetch {
    opentracing.trace_backend();
}

sub vcl_backend_response {
    opentracing.finish();
}

sub vcl_backend_error {
    opentracing.finish();
}
