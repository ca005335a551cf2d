#!/usr/bin/env bash
# Runs the varnishtest suites (tests/vtc/**/*.vtc, or the files given) against the built VMOD,
# two at a time, and ends with a "N passed, N failed" line.
#
# Without arguments, the suites with unsampled requests run a second time with
# OPENTRACING_DECISION_TABLE=off: unsampled decisions then live in the task's own slot, the way
# they do when the decision table's slot belongs to another task (src/decisions.rs).
set -uo pipefail
cd "$(dirname "$0")/.."
so="${VMOD_OPENTRACING_SO:-$PWD/target/debug/libvmod_opentracing.so}"
[ -f "$so" ] || { echo "run-vtc.sh: $so is missing: run 'make build' first" >&2; exit 2; }
second=()
if [ $# -gt 0 ]; then
    files=("$@")
else
    mapfile -t files < <(find tests/vtc -name '*.vtc' | sort)
    mapfile -t second < <(grep -l -E 'always_off|ratio|sample\(false\)|-0[02]"' "${files[@]}")
fi
[ ${#files[@]} -gt 0 ] || { echo "run-vtc.sh: no .vtc files found" >&2; exit 2; }
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
run() {
    varnishtest -k -j 2 -t 60 \
        -D vmod="$so" -D vmoddir="$(dirname "$so")" -D vcldir="$PWD/vcl" -D repo="$PWD" \
        "$@" >>"$log" 2>&1
}
run "${files[@]}"
status=$?
if [ ${#second[@]} -gt 0 ]; then
    echo "# second run, OPENTRACING_DECISION_TABLE=off: ${second[*]}" >>"$log"
    OPENTRACING_DECISION_TABLE=off run "${second[@]}" || status=$?
fi
expected=$((${#files[@]} + ${#second[@]}))
passed=$(grep -c '^#    top  TEST .* passed' "$log")
failed=$(grep -c '^#    top  TEST .* FAILED' "$log")
skipped=$(grep -c '^#    top  TEST .* skipped' "$log")
grep '^#    top  TEST\|^# second run' "$log"
if [ "$failed" -gt 0 ] || [ "$status" -ne 0 ]; then
    echo "---- output of the failed tests ----"
    cat "$log" | grep -v '^#    top  TEST .* passed' | tail -n 300
fi
# A skipped test is a failure here: every suite must run on this machine.
echo "vtc: $passed passed, $((failed + skipped)) failed"
[ "$failed" -eq 0 ] && [ "$skipped" -eq 0 ] && [ "$status" -eq 0 ] && [ "$passed" -eq "$expected" ]
