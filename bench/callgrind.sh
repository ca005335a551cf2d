#!/usr/bin/env bash
# Exact instruction counts per request, by function, of a varnishd running the module
# (valgrind's callgrind; the figures in docs/performance.md "Where the cost goes").
#
#   bash bench/callgrind.sh [sampler] [hit|pass] [seconds]
#   e.g. bash bench/callgrind.sh always_off hit 10
#        bash bench/callgrind.sh parentbased_always_on pass 15
#
# Runs the release build (`cargo build --release` first) under callgrind with a synthetic origin,
# drives it with wrk (two connections: callgrind runs one thread at a time), and prints the
# inclusive instructions per request of the module's entry points and threads. Spans are
# exported over OTLP/HTTP protobuf to tools/otlp-receiver in discard mode (built by
# `make release`); CALLGRIND_EXPORT=none skips the export. SO=<path> measures another build of
# the module (e.g. an older commit's, for a comparison). BASELINE=1 measures plain Varnish: the
# same VCL with the import and the include commented out (what the module adds is the
# difference of the two PROGRAM TOTALS, measured the same hour). Needs valgrind (Debian:
# apt-get install valgrind).
set -euo pipefail
# Another build's module, as an absolute path (VCL's `import ... from` needs one).
so_given=${SO:+$(realpath -- "$SO")}
cd "$(dirname "$0")/.."
repo=$PWD
sampler=${1:-always_off}
workload=${2:-hit}
seconds=${3:-10}
command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is missing (apt-get install valgrind)" >&2; exit 2; }
command -v wrk >/dev/null || { echo "callgrind.sh: wrk is missing (make bench installs it)" >&2; exit 2; }
so=${so_given:-$repo/target/release/libvmod_opentracing.so}
receiver=$repo/target/release/otlp-receiver
export_to=${CALLGRIND_EXPORT:-otlp}
[ "$export_to" = none ] || [ -x "$receiver" ] || { echo "callgrind.sh: $receiver is missing: make release" >&2; exit 2; }
[ -f "$so" ] || { echo "callgrind.sh: $so is missing: cargo build --release" >&2; exit 2; }
eval "$(bash scripts/varnish.sh --env)"

work=$(mktemp -d /tmp/vmod-opentracing-callgrind.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
# Two distinct free ports for the varnishds, chosen while both are held (one at a time, the two
# could be the same: it happened, and varnishd then failed to listen).
read -r origin_port proxy_port < <(python3 -c '
import socket
held = [socket.socket() for _ in range(2)]
for s in held:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in held))')
exporter=(OTEL_TRACES_EXPORTER=none)
if [ "$export_to" != none ]; then
    # The receiver binds a port of its own choosing and says which: a port chosen here and bound
    # later was sometimes taken meanwhile ("Address already in use"), and every export of that
    # run failed (measuring retries instead).
    "$receiver" --http 127.0.0.1:0 --mode discard --ready "$work/receiver.json" >"$work/receiver.log" 2>&1 &
    pids+=($!)
    receiver_port=
    for _ in $(seq 1 100); do
        receiver_port=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["http"])' "$work/receiver.json" 2>/dev/null) && break
        sleep 0.1
    done
    [ -n "$receiver_port" ] || { echo "callgrind.sh: the OTLP receiver did not start: $(cat "$work/receiver.log")" >&2; exit 1; }
    exporter=(OTEL_TRACES_EXPORTER=otlp OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf
              OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$receiver_port")
fi

cat >"$work/origin.vcl" <<EOF
vcl 4.1;
backend none none;
sub vcl_recv { return (synth(200)); }
sub vcl_synth {
    set resp.http.Cache-Control = "max-age=3600";
    synthetic("$(printf 'x%.0s' $(seq 1 1024))");
    return (deliver);
}
EOF
cat >"$work/proxy.vcl" <<EOF
vcl 4.1;
${BASELINE:+#}import opentracing from "$so";
${BASELINE:+#}include "$repo/vcl/opentracing.vcl";
backend origin { .host = "127.0.0.1"; .port = "$origin_port"; }
sub vcl_recv { if (req.url ~ "^/pass") { return (pass); } }
EOF

varnishd -n "$work/origin" -a "127.0.0.1:$origin_port" -f "$work/origin.vcl" -j none -F >/dev/null 2>&1 &
pids+=($!)
# One profile per thread; threads take turns (--fair-sched): with valgrind's default lock a
# background thread could wait long, and records it has not given back come from malloc instead.
env OTEL_TRACES_SAMPLER="$sampler" "${exporter[@]}" \
    valgrind --tool=callgrind ${CALLGRIND_ARGS:-} --trace-children=yes --separate-threads=yes --fair-sched=yes --callgrind-out-file="$work/cg.%p.out" \
    varnishd -n "$work/proxy" -a "127.0.0.1:$proxy_port" -f "$work/proxy.vcl" -j none -F \
    -p thread_pools=1 -p thread_pool_min=5 >"$work/valgrind.log" 2>&1 &
manager=$!
pids+=($manager)
for _ in $(seq 1 120); do
    curl -fs -o /dev/null "http://127.0.0.1:$proxy_port/$workload" && break
    sleep 1
done
wrk -t1 -c2 -d"${seconds}s" "http://127.0.0.1:$proxy_port/$workload" | grep -E "requests in"
# The export's own account, before the stop: a comparable run exports every span and fails none
# (a failing export keeps batches for retries, and the figures then include that).
sleep 6 # the exporter's schedule delay (5 s): the last partial batch goes out
varnishstat -n "$work/proxy" -1 -f 'OPENTRACING.spans_*' -f 'OPENTRACING.export_failures' 2>/dev/null |
    awk '{printf "%s=%s ", substr($1, 13), $2} END {print ""}' | sed 's/^/callgrind: varnishstat: /'
kill -TERM "$manager"
wait "$manager" 2>/dev/null || true
# One profile per thread (--separate-threads): a background thread's total is then all of its
# work, whatever the compiler inlined. The child is the process whose threads served requests
# (the VCL compiler, another child of the manager, has no CNT_Request).
pid=$(grep -l 'CNT_Request' "$work"/cg.*.out-* 2>/dev/null | head -1 | sed -E 's/.*cg\.([0-9]+)\.out-[0-9]+$/\1/') || true
[ -n "$pid" ] || { echo "callgrind.sh: no profile of a process that served requests; see $work/valgrind.log" >&2; exit 1; }
python3 - "$work"/cg."$pid".out-* <<'EOF'
import collections, re, subprocess, sys
wanted = ["vmod_c_trace_request", "vmod_c_trace_backend", "vmod_c_cache_result",
          "vmod_c_finish", "task_fini_ws", "task_fini_unsampled", "VRT_priv_task ",
          "Correlator::records", "Correlator::complete", "RequestWriter::push"]
# A thread is the tailer or the exporter when its job's methods appear in its profile (the
# exporter of a configuration replaced at start-up, stopped by another thread, counts too).
jobs = {"tailer thread (all its work)": "TailerJob as vmod_opentracing::worker::Job",
        "exporter thread (all its work)": "ExportJob as vmod_opentracing::worker::Job"}
totals, requests, spans, program = collections.Counter(), 0, 0, 0
records, records_allocated = 0, 0
for path in sys.argv[1:]:
    names, caller, current = {}, None, None
    for line in open(path):
        m = re.match(r'(c?)fn=\((\d+)\)(?: (.*))?', line)
        if m:
            if m.group(3):
                names[m.group(2)] = m.group(3).strip()
            if m.group(1):
                current = names.get(m.group(2))
            else:
                caller = names.get(m.group(2))
            continue
        m = re.match(r'calls=(\d+)', line)
        if not (m and current):
            continue
        n = int(m.group(1))
        if current == "CNT_Request":
            requests += n
        elif current.endswith("RequestWriter::push"):
            spans += n
        elif current.endswith("span_pool::record"):
            records += n
        elif current.endswith("__rust_alloc") and caller and caller.endswith("span_pool::record"):
            records_allocated += n
    report = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
                            capture_output=True, text=True).stdout
    seen, thread_total, job_of_thread = set(), 0, None
    for line in report.splitlines():
        m = re.match(r'\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)', line)
        if not m:
            continue
        name, count = m.group(2).rstrip(), int(m.group(1).replace(',', ''))
        if name == "PROGRAM TOTALS":
            thread_total = count
            continue
        for label, job in jobs.items():
            if job in name:
                job_of_thread = label
        for w in wanted:
            # A function's own entry ends with its object file in brackets; lines without are
            # code inlined from elsewhere. The report is sorted, so the first match is the total.
            if w in name and w not in seen and name.endswith("]"):
                seen.add(w)
                totals[w] += count
    program += thread_total
    if job_of_thread:
        totals[job_of_thread] += thread_total
per = max(requests, 1)
# The exporter's figure holds only when every span was sent before varnishd stopped (callgrind
# slows the stop: a sampled pass should show two spans per request).
print(f"callgrind: {requests} requests, {spans} spans encoded; instructions per request, inclusive:")
# A span record comes from the pool unless the exporter has not given records back yet; a new
# one costs an allocation here and the attribute array's on the first `add` (a few hundred
# instructions in `trace_request` and `trace_backend`; under callgrind, when the exporter lags).
print(f"callgrind: span records taken from the pool: {records - records_allocated} of {records}")
print(f"{program / per:10.0f}  PROGRAM TOTALS")
for w, count in sorted(totals.items(), key=lambda kv: -kv[1]):
    print(f"{count / per:10.0f}  {w.strip()}")
EOF
echo "callgrind: profiles, one per thread, in $work/cg.$pid.out-* (callgrind_annotate --inclusive=yes <file>)"
