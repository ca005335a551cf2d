#!/usr/bin/env bash
# Every example VCL (examples/*.vcl) and every complete VCL snippet of README.md (a ```vcl block
# that starts with "vcl 4.1;") must compile with the VMOD and the include: varnishd -C.
set -uo pipefail
cd "$(dirname "$0")/.."
so_dir="$(dirname "${VMOD_OPENTRACING_SO:-$PWD/target/debug/libvmod_opentracing.so}"):$(pkg-config --variable=vmoddir varnishapi)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 - "$work" <<'PY'
import re, sys
text = open("README.md").read()
for i, block in enumerate(re.findall(r"```vcl\n(.*?)```", text, re.S)):
    if block.lstrip().startswith("vcl 4.1;"):
        open(f"{sys.argv[1]}/readme-{i}.vcl", "w").write(block)
PY
passed=0; failed=0
for f in examples/*.vcl "$work"/readme-*.vcl; do
    [ -f "$f" ] || continue
    if out="$(varnishd -C -n "$work/n" -f "$PWD/$f" -p vmod_path="$so_dir" -p vcl_path="$PWD/vcl" 2>&1 >/dev/null)" ||
       out="$(varnishd -C -n "$work/n" -f "$f" -p vmod_path="$so_dir" -p vcl_path="$PWD/vcl" 2>&1 >/dev/null)"; then
        passed=$((passed + 1)); echo "ok   $f"
    else
        failed=$((failed + 1)); echo "FAIL $f"; echo "$out" | tail -20
    fi
done
echo "vcl compile: $passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
