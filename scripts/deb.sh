#!/usr/bin/env bash
# Builds the Debian package with cargo-deb (`make deb`), prints its path:
# target/debian/vmod-opentracing_<version>_<arch>.deb
#
# cargo-deb takes everything from [package.metadata.deb] in Cargo.toml, except what depends on the
# Varnish the module is built against, which a static manifest cannot say. This script computes
# it and writes it into the package's Depends:
#   - varnishabi-strict-<commit>: the varnish crate builds strict-ABI modules (vrt_major = 0 in
#     their metadata), which varnishd loads only when the module's ABI string equals its own
#     VMOD_ABI_Version ("Varnish 7.7.0 <commit>", vmod_abi.h). Debian's varnish package provides
#     that virtual package and varnishabi-<VRT major>.<minor>, computed from the same headers by
#     its dh_varnishabi; we depend on both, as Debian 13's varnish-modules does (the strict one is
#     what matters, the other only says the same more loosely).
#   - libvarnishapi3 (>= <version>), when dpkg-shlibdeps could not compute it (cargo-deb's $auto):
#     it can only when libvarnishapi comes from a Debian package, not from a source build.
# VARNISH_ABI_DEPENDS overrides the ABI dependency. Extra arguments go to cargo-deb.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_DEB_VERSION=3.8.0
log() { echo "deb.sh: $*" >&2; }

if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
    log "installing cargo-deb $CARGO_DEB_VERSION (once; takes a minute or two)"
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet
fi

# The ABI of the Varnish in use, read from its headers as Debian's dh_varnishabi does.
inc="$(pkg-config --variable=pkgincludedir varnishapi)"
varnish_version="$(pkg-config --modversion varnishapi)"
abi="$(sed -n 's/^#define[[:space:]]*VMOD_ABI_Version[[:space:]]*"\(.*\)"/\1/p' "$inc/vmod_abi.h")"
[ -n "$abi" ] || { log "no VMOD_ABI_Version in $inc/vmod_abi.h"; exit 1; }
commit="${abi##* }"
vrt() { sed -n "s/^#define[[:space:]]*VRT_$1_VERSION[[:space:]]*\([0-9]*\)U.*/\1/p" "$inc/vrt.h"; }
vrt_abi="varnishabi-$(vrt MAJOR).$(vrt MINOR)"
[[ "$vrt_abi" =~ ^varnishabi-[0-9]+\.[0-9]+$ ]] || { log "no VRT_MAJOR/MINOR_VERSION in $inc/vrt.h"; exit 1; }
if [ -n "${VARNISH_ABI_DEPENDS:-}" ]; then
    abi_dep="$VARNISH_ABI_DEPENDS"
elif [[ "$commit" =~ ^[0-9a-f]{40}$ ]]; then
    abi_dep="$vrt_abi, varnishabi-strict-$commit"
else
    # A Varnish built without VCS information ("Varnish 7.7.0 NOGIT"), like the one
    # scripts/varnish.sh builds from the release tarball: no Debian varnish package has that ABI,
    # and the module would not load into one. The package is for that build only.
    strict="varnishabi-strict-${varnish_version}-${commit,,}"
    abi_dep="$vrt_abi, $strict"
    log "the Varnish in use reports ABI \"$abi\" (no commit): Depends: $strict, which no Debian"
    log "varnish package provides; build against Debian's libvarnishapi-dev for a package for it"
fi

# The module and the package from the same build (cargo-deb resolves target/release in Cargo.toml
# to the real target dir, CARGO_TARGET_DIR included); cargo-deb strips it like dh_strip.
target="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release
so="$target/release/libvmod_opentracing.so"
grep -qaF "$abi" "$so" || { log "$so was not built against \"$abi\": run cargo clean"; exit 1; }
deb="$(cargo deb --no-build --strip --multiarch=same --output "$target/debian/" "$@" | tail -n1)"
[ -f "$deb" ] || { log "cargo deb did not report the package it built"; exit 1; }

# Rewrite the control file with the computed Depends (dpkg-deb: raw extract, then rebuild).
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
dpkg-deb --raw-extract "$deb" "$work/pkg"
control="$work/pkg/DEBIAN/control"
depends="$(sed -n 's/^Depends:[[:space:]]*//p' "$control")"
if ! grep -q 'libvarnishapi3' <<<"$depends"; then
    # What $auto gives on a Debian build host; dpkg-shlibdeps for the other libraries.
    depends="$(cd "$work" && mkdir -p debian && touch debian/control &&
        dpkg-shlibdeps --ignore-missing-info -O "$so" 2>/dev/null |
        sed -n 's/^shlibs:Depends=//p')"
    depends="${depends:+$depends, }libvarnishapi3 (>= $varnish_version)"
fi
depends="$depends, $abi_dep"
sed -i '/^Depends:/d' "$control"
sed -i "/^Installed-Size:/a Depends: $depends" "$control"
# Same mtimes as cargo-deb gave (dpkg-deb clamps to SOURCE_DATE_EPOCH).
SOURCE_DATE_EPOCH="$(stat -c %Y "$work/pkg/usr")" \
    dpkg-deb --root-owner-group -Zxz --build "$work/pkg" "$deb" >/dev/null
log "Depends: $depends"
echo "$deb"
