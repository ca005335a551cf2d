#!/usr/bin/env bash
# make demo: varnishd with examples/demo.vcl in front of examples/demo_backend.py, a few
# requests (miss, hit, pass, one with a traceparent, ESI), then the spans as trace trees.
# Everything started here is stopped on exit, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$PWD/demo-output"
so_dir="$PWD/target/debug"
varnish_port="${DEMO_VARNISH_PORT:-8090}"
backend_port="${DEMO_BACKEND_PORT:-8091}"
rm -rf "$out" && mkdir -p "$out"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

wait_http() {
    for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.1; done
    echo "demo: nothing answers on port $1" >&2; exit 1
}

python3 examples/demo_backend.py --port "$backend_port" --log "$out/backend.jsonl" >"$out/backend.out" 2>&1 &
pids+=($!)
wait_http "$backend_port"

sed "s/\"8091\"/\"$backend_port\"/" examples/demo.vcl >"$out/demo.vcl"
OTEL_TRACES_EXPORTER=file OPENTRACING_SPANS_FILE="$out/spans.jsonl" OTEL_BSP_SCHEDULE_DELAY=50 \
    varnishd -F -j none -n "$out/varnish" -a "127.0.0.1:$varnish_port" -f "$out/demo.vcl" -s malloc,64m \
    -p vmod_path="$so_dir" -p vcl_path="$PWD/vcl" >"$out/varnishd.out" 2>&1 &
varnishd_pid=$!
pids=("$varnishd_pid" "${pids[@]}")
wait_http "$varnish_port"
# The readiness probe above was a request too; start the file afresh for a clean demo.
sleep 0.3; : >"$out/spans.jsonl"

get() { # label, path, extra curl args
    local label="$1" path="$2"; shift 2
    printf '%-32s %s\n' "$label" "$(curl -s -o /dev/null -w '%{http_code}  X-Trace-Id: %header{x-trace-id}' "$@" "http://127.0.0.1:$varnish_port$path")"
}
echo "== requests"
get "miss (first fetch of /cached)" /cached
get "hit (same URL again)" /cached
get "pass (uncacheable)" /pass/me
get "with a client traceparent" /status/200 -H "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" -H "tracestate: demo=1"
get "ESI page with an include" /esi

# Stopping varnishd flushes the spans still queued.
kill -TERM "$varnishd_pid"; wait "$varnishd_pid" 2>/dev/null || true
echo
echo "== traces (spans in $out/spans.jsonl)"
python3 examples/trace_tree.py "$out/spans.jsonl"
echo
echo "== what the backend received"
python3 -c '
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print("  %s %-16s traceparent: %s" % (r["method"], r["path"], r["traceparent"]))
' "$out/backend.jsonl"
