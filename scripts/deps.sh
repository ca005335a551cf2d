#!/usr/bin/env bash
# Installs what the demo and the tests need besides Varnish and Rust: python3 (demo backend,
# trace printer), curl, openssl (a test's TLS collector); for packaging and its tests dpkg-dev
# (dpkg-shlibdeps, dpkg-architecture), binutils (strip, readelf), python3-yaml (examples/collector
# checks). With "bench": wrk and taskset too. Quiet when everything is there.
set -euo pipefail
missing=()
command -v python3 >/dev/null || missing+=(python3)
command -v curl >/dev/null || missing+=(curl)
command -v dpkg-shlibdeps >/dev/null || missing+=(dpkg-dev)
command -v readelf >/dev/null || missing+=(binutils)
python3 -c 'import yaml' 2>/dev/null || missing+=(python3-yaml)
command -v openssl >/dev/null || missing+=(openssl)
if [ "${1:-}" = bench ]; then
    command -v wrk >/dev/null || missing+=(wrk)
    command -v taskset >/dev/null || missing+=(util-linux)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps.sh: installing ${missing[*]}" >&2
    as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
