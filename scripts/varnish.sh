#!/usr/bin/env bash
# Provide a Varnish >= 7.5 with development files, in this order of preference:
#   1. one that pkg-config already finds (varnishapi.pc),
#   2. the distribution's packages, when they are new enough,
#   3. Varnish 7.7.0 built from the Debian source package, fetched through the apt mirror this
#      machine is configured with (read from apt's own configuration, never hard-coded here).
# Idempotent: when the build prefix already holds a working installation it returns at once.
#
# Usage: scripts/varnish.sh            ensure a Varnish is available, print nothing else on success
#        scripts/varnish.sh --env      print shell exports pointing at the Varnish in use
set -euo pipefail

MIN_VERSION=7.5
BUILD_VERSION=7.7.0
PREFIX="${VARNISH_PREFIX:-${XDG_CACHE_HOME:-$HOME/.cache}/vmod-opentracing/varnish-$BUILD_VERSION}"
DEBIAN_SOURCE_SUITE="${VARNISH_SOURCE_SUITE:-trixie}"

log() { echo "varnish.sh: $*" >&2; }

version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=
apt_install() {
    [ -n "$apt_updated" ] || { as_root apt-get update -qq >&2; apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >&2
}

# The varnishapi.pc found with the prefix build first on the search path.
pc_path() { echo "$PREFIX/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"; }
found_version() {
    command -v pkg-config >/dev/null || return 1
    PKG_CONFIG_PATH="$(pc_path)" pkg-config --modversion varnishapi 2>/dev/null
}

print_env() {
    local pc bindir sbindir libdir
    pc="$(pc_path)"
    libdir="$(PKG_CONFIG_PATH="$pc" pkg-config --variable=libdir varnishapi)"
    bindir="$(PKG_CONFIG_PATH="$pc" pkg-config --variable=bindir varnishapi)"
    sbindir="$(PKG_CONFIG_PATH="$pc" pkg-config --variable=sbindir varnishapi)"
    echo "export PATH=\"$bindir:$sbindir:\$PATH\""
    echo "export PKG_CONFIG_PATH=\"$pc\""
    echo "export LD_LIBRARY_PATH=\"$libdir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
}

have_usable() {
    local v
    v="$(found_version)" || return 1
    version_ge "$v" "$MIN_VERSION"
}

# The base URI of the machine's Debian mirror, as apt itself reports it (no host written here).
debian_mirror() {
    apt-get indextargets --format '$(ORIGIN) $(CODENAME) $(SITE)' 2>/dev/null |
        awk '$1 == "Debian" && $2 !~ /security/ { print $3; exit }'
}

work=
build_from_debian_source() {
    log "building Varnish $BUILD_VERSION into $PREFIX (takes a few minutes)"
    apt_install build-essential pkgconf libedit-dev libjemalloc-dev libncurses-dev libpcre2-dev \
        python3 python3-sphinx python3-docutils autoconf automake libtool libclang-dev clang \
        curl ca-certificates xz-utils dpkg-dev
    local mirror aptdir uri sha tarball uri_line
    mirror="$(debian_mirror)"
    [ -n "$mirror" ] || { log "no Debian mirror found in the apt configuration"; exit 1; }
    work="$(mktemp -d)"
    trap '[ -z "$work" ] || rm -rf "$work"' EXIT
    # A private apt state (own sources list and lists directory) so the system's apt is untouched.
    aptdir="$work/apt"
    mkdir -p "$aptdir/lists/partial" "$aptdir/parts" "$aptdir/cache/archives/partial"
    echo "deb-src $mirror $DEBIAN_SOURCE_SUITE main" >"$aptdir/sources.list"
    local aptopts=(-o "Dir::Etc::SourceList=$aptdir/sources.list" -o "Dir::Etc::SourceParts=$aptdir/parts"
        -o "Dir::State::Lists=$aptdir/lists" -o "Dir::Cache=$aptdir/cache" -o "APT::Get::List-Cleanup=0")
    apt-get "${aptopts[@]}" update -qq >&2
    # Lines look like: 'URI' name size SHA256:hex
    uri_line="$(apt-get "${aptopts[@]}" source --print-uris "varnish" 2>/dev/null | grep -F ".orig.tar" | head -n1)"
    [ -n "$uri_line" ] || { log "no varnish source package in $DEBIAN_SOURCE_SUITE"; exit 1; }
    uri="$(echo "$uri_line" | awk '{ gsub("\047", "", $1); print $1 }')"
    sha="$(echo "$uri_line" | sed -n 's/.*SHA256:\([0-9a-f]*\).*/\1/p')"
    tarball="$work/$(basename "$uri")"
    case "$(basename "$uri")" in
        varnish_"$BUILD_VERSION".orig.tar.*) ;;
        *) log "the $DEBIAN_SOURCE_SUITE source is $(basename "$uri"), not $BUILD_VERSION; building it anyway" ;;
    esac
    curl -fsSL -o "$tarball" "$uri"
    if [ -n "$sha" ]; then
        echo "$sha  $tarball" | sha256sum -c --quiet - >&2 || { log "checksum mismatch for $uri"; exit 1; }
    else
        log "no SHA-256 published for $uri"; exit 1
    fi
    mkdir -p "$work/src"
    tar -xf "$tarball" -C "$work/src" --strip-components=1
    (
        cd "$work/src"
        [ -x configure ] || sh autogen.sh >&2
        ./configure --prefix="$PREFIX" --disable-dependency-tracking >"$work/configure.log" 2>&1 ||
            { tail -40 "$work/configure.log" >&2; exit 1; }
        make -j"$(nproc)" >"$work/make.log" 2>&1 || { tail -60 "$work/make.log" >&2; exit 1; }
        make install >"$work/install.log" 2>&1 || { tail -40 "$work/install.log" >&2; exit 1; }
    )
    log "installed Varnish $BUILD_VERSION into $PREFIX"
}

ensure() {
    if have_usable; then return 0; fi
    local candidate
    candidate="$(apt-cache policy varnish 2>/dev/null | awk '/Candidate:/ { print $2 }' | sed 's/^[0-9]*://; s/-.*//')"
    if [ -n "$candidate" ] && [ "$candidate" != "(none)" ] && version_ge "$candidate" "$MIN_VERSION"; then
        log "installing the distribution's Varnish $candidate"
        # Debian's development package is libvarnishapi-dev (there is no varnish-dev).
        apt_install varnish libvarnishapi-dev pkgconf libclang-dev
    else
        build_from_debian_source
    fi
    have_usable || { log "no usable Varnish >= $MIN_VERSION after installation"; exit 1; }
}

case "${1:-}" in
    --env) ensure; print_env ;;
    "") ensure ;;
    *) echo "usage: $0 [--env]" >&2; exit 2 ;;
esac
