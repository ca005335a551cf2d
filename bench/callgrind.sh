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
# the module (e.g. an older commit's, for a comparison). Needs valgrind (Debian: apt-get install
# valgrind).
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
# Three distinct free ports, chosen while all three are held (one at a time, two could be the
# same: it happened, and varnishd then failed to listen).
read -r origin_port receiver_port proxy_port < <(python3 -c '
import socket
held = [socket.socket() for _ in range(3)]
for s in held:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in held))')
exporter=(OTEL_TRACES_EXPORTER=none)
if [ "$export_to" != none ]; then
    "$receiver" --http "127.0.0.1:$receiver_port" --mode discard >/dev/null 2>&1 &
    pids+=($!)
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
import opentracing from "$so";
include "$repo/vcl/opentracing.vcl";
backend origin { .host = "127.0.0.1"; .port = "$origin_port"; }
sub vcl_recv { if (req.url ~ "^/pass") { return (pass); } }
EOF

varnishd -n "$work/origin" -a "127.0.0.1:$origin_port" -f "$work/origin.vcl" -j none -F >/dev/null 2>&1 &
pids+=($!)
env OTEL_TRACES_SAMPLER="$sampler" "${exporter[@]}" \
    valgrind --tool=callgrind --trace-children=yes --callgrind-out-file="$work/cg.%p.out" \
    varnishd -n "$work/proxy" -a "127.0.0.1:$proxy_port" -f "$work/proxy.vcl" -j none -F \
    -p thread_pools=1 -p thread_pool_min=5 >"$work/valgrind.log" 2>&1 &
manager=$!
pids+=($manager)
for _ in $(seq 1 120); do
    curl -fs -o /dev/null "http://127.0.0.1:$proxy_port/$workload" && break
    sleep 1
done
wrk -t1 -c2 -d"${seconds}s" "http://127.0.0.1:$proxy_port/$workload" | grep -E "requests in"
kill -TERM "$manager"
wait "$manager" 2>/dev/null || true
# The child is the process that served requests (the VCL compiler, another child of the
# manager, may run more instructions when the run is short).
out=$(grep -l 'CNT_Request' "$work"/cg.*.out | xargs -r grep -H -E '^summary:' | sort -t' ' -k2 -n | tail -1 | cut -d: -f1) || true
[ -n "$out" ] || { echo "callgrind.sh: no profile of a process that served requests; see $work/valgrind.log" >&2; exit 1; }
python3 - "$out" <<'EOF'
import collections, re, subprocess, sys
path = sys.argv[1]
names, calls, current = {}, collections.Counter(), None
for line in open(path):
    m = re.match(r'(c?)fn=\((\d+)\)(?: (.*))?', line)
    if m:
        if m.group(3):
            names[m.group(2)] = m.group(3).strip()
        if m.group(1):
            current = names.get(m.group(2))
        continue
    m = re.match(r'calls=(\d+)', line)
    if m and current:
        calls[current] += int(m.group(1))
requests = calls["CNT_Request"]
print(f"callgrind: {requests} requests; instructions per request, inclusive:")
report = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
                        capture_output=True, text=True).stdout
wanted = ["PROGRAM TOTALS", "vmod_c_trace_request", "vmod_c_trace_backend", "vmod_c_cache_result",
          "vmod_c_finish", "task_fini_ws", "task_fini_unsampled", "VRT_priv_task ",
          "Correlator::records", "Correlator::complete", "write_export_request"]
# A background thread's work: the worker loop calls its job's `handle` for each message, `tick`
# between them and `finish` at the end; together they are the thread's cost. (The exporter's
# `tick` calls `handle` only for records stashed by a rollback, rare.)
threads = {"tailer thread (handle + tick + finish)": "TailerJob as vmod_opentracing::worker::Job",
           "exporter thread (handle + tick + finish)": "ExportJob as vmod_opentracing::worker::Job"}
seen, thread_totals = set(), dict.fromkeys(threads, 0)
for line in report.splitlines():
    m = re.match(r'\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)', line)
    if not m:
        continue
    name, count = m.group(2).rstrip(), int(m.group(1).replace(',', ''))
    for label, job in threads.items():
        if job in name and re.search(r'>::(handle|tick|finish) \[', name):
            thread_totals[label] += count
    for w in wanted:
        # A function's own entry ends with its object file in brackets; lines without are code
        # inlined from elsewhere. The report is sorted, so the first match is the total.
        if w in name and w not in seen and (w == "PROGRAM TOTALS" or name.endswith("]")):
            seen.add(w)
            print(f"{count / max(requests, 1):10.0f}  {w.strip()}")
for label, total in thread_totals.items():
    print(f"{total / max(requests, 1):10.0f}  {label}")
EOF
echo "callgrind: full profile in $out (callgrind_annotate --inclusive=yes $out)"
