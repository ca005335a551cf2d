#!/usr/bin/env bash
# Tests of `make install`, `make uninstall` and `make deb` (part of `make test`). Each installation
# is checked file by file, then with varnishd running tests/install/bare_import.vtc: VCL that says
# only `import opentracing; include "opentracing.vcl";`, a request, a span in the span file.
#   1. make install DESTDIR=<staging>: files at the Varnish's pkg-config vmoddir and vcldir and in
#      $PREFIX/share/doc/vmod-opentracing, module stripped; PREFIX moves the docs; make uninstall.
#   2. VMODDIR/VCLDIR/DOCDIR/STRIP=0 overrides; varnishd with vmod_path/vcl_path on those folders.
#   3. a real make install into the Varnish prefix of the tests: varnishd with its built-in
#      vmod_path and vcl_path (no -p at all); then make uninstall. Only the module and include are
#      added there, and every other test names its own module path, so tests running meanwhile
#      are unaffected; a lock serialises concurrent runs of this step. Skipped when the module is
#      already installed there (never removed by a test) or the prefix is not writable.
#   4. make deb: control fields, files at Debian's paths; dpkg -i/-r in a staging root with its own
#      dpkg database (dpkg --root, as root only), varnishd on the installed tree. Not the machine's
#      own dpkg: the package depends on the Varnish ABI, which only Debian's varnish package
#      provides, and this Varnish is a source build (README, "Install").
#   5. only with INSTALL_TEST_SYSTEM_DPKG=1 (as root, when the package is not installed): the same
#      round trip with the machine's own dpkg, `dpkg -i --force-depends` then `dpkg -r`. Opt-in: for
#      a few seconds the system's package database holds a package with unmet dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
cleanup=()   # commands undoing what a step changed outside $work, run if it fails midway
on_exit() { local c; for c in "${cleanup[@]}"; do eval "$c" || true; done; rm -rf "$work"; }
trap on_exit EXIT

ok() { echo "ok   install: $*"; }
fail() { echo "FAIL install: $*" >&2; exit 1; }
# make TARGET VAR=...: its output on stdout, the build's messages only when it fails.
mk() { make -s --no-print-directory "$@" 2>"$work/make.log" || { cat "$work/make.log" >&2; fail "make $*"; }; }
# bare_import.vtc against the module at $1; further arguments go to varnishtest (-p ...).
run_vtc() {
    local so="$1"; shift
    varnishtest -t 60 -D repo="$PWD" -D so="$so" "$@" tests/install/bare_import.vtc >"$work/vtc.log" 2>&1 ||
        { cat "$work/vtc.log"; fail "bare import with $so"; }
}
has_symtab() { readelf -S "$1" | grep -q '\.symtab'; }
no_files() { [ -z "$(find "$1" -type f 2>/dev/null)" ]; }

prefix="$(pkg-config --variable=prefix varnishapi)"
vmoddir="$(pkg-config --variable=vmoddir varnishapi)"
vcldir="$(pkg-config --variable=vcldir varnishapi)"
docdir="$prefix/share/doc/vmod-opentracing"

# 1. staging root
stage="$work/stage"
mk install DESTDIR="$stage" >/dev/null
so="$stage$vmoddir/libvmod_opentracing.so"
[ -f "$so" ] || fail "no module at \$DESTDIR$vmoddir"
cmp -s vcl/opentracing.vcl "$stage$vcldir/opentracing.vcl" || fail "no include at \$DESTDIR$vcldir"
for f in README.md API.md LICENSE; do [ -f "$stage$docdir/$f" ] || fail "no $f in \$DESTDIR$docdir"; done
! has_symtab "$so" || fail "the installed module is not stripped"
ok "DESTDIR: module in vmoddir, include in vcldir, docs in $docdir, module stripped"
mk uninstall DESTDIR="$stage" >/dev/null
no_files "$stage" || fail "files left after uninstall: $(find "$stage" -type f)"
[ -d "$stage$vmoddir" ] && [ ! -e "$stage$docdir" ] || fail "uninstall removed Varnish's folders or kept ours"
mk install DESTDIR="$stage" PREFIX=/opt/vmod >/dev/null
[ -f "$stage/opt/vmod/share/doc/vmod-opentracing/README.md" ] || fail "PREFIX does not move the docs"
[ -n "$(find "$stage/opt/vmod" -name libvmod_opentracing.so)" ] || fail "PREFIX does not move the module"
ok "uninstall removes every file; PREFIX moves everything"

# 2. explicit folders, unstripped
dirs=(VMODDIR="$work/o/vmods" VCLDIR="$work/o/vcl" DOCDIR="$work/o/doc")
mk install "${dirs[@]}" STRIP=0 >/dev/null
has_symtab "$work/o/vmods/libvmod_opentracing.so" || fail "STRIP=0 stripped the module"
run_vtc "$work/o/vmods/libvmod_opentracing.so" -p vmod_path="$work/o/vmods" -p vcl_path="$work/o/vcl"
mk uninstall "${dirs[@]}" >/dev/null
no_files "$work/o" || fail "files left after uninstall with VMODDIR/VCLDIR/DOCDIR"
ok "VMODDIR/VCLDIR/DOCDIR, STRIP=0: varnishd runs the bare import from there, exports a span"

# 3. the Varnish prefix itself, found through varnishd's defaults
if [ -e "$vmoddir/libvmod_opentracing.so" ] || [ -e "$vcldir/opentracing.vcl" ]; then
    echo "skip install: already installed in $vmoddir or $vcldir, not touched (make uninstall to test)"
elif [ ! -w "$vmoddir" ] || [ ! -w "$vcldir" ]; then
    echo "skip install: $vmoddir or $vcldir is not writable"
else
    exec {lock}>"${TMPDIR:-/tmp}/vmod-opentracing-install-test.lock"
    flock -w 300 "$lock" || fail "another install test holds the lock"
    cleanup+=("make -s --no-print-directory uninstall >/dev/null")
    mk install >/dev/null
    run_vtc "$vmoddir/libvmod_opentracing.so"
    mk uninstall >/dev/null
    cleanup=()
    exec {lock}>&-
    [ ! -e "$vmoddir/libvmod_opentracing.so" ] && [ ! -e "$vcldir/opentracing.vcl" ] && [ ! -e "$docdir" ] ||
        fail "make uninstall left files in the Varnish prefix"
    ok "make install into $prefix: varnishd's default vmod_path/vcl_path find both; make uninstall"
fi

# 4. the Debian package
deb="$(mk deb | tail -n1)"
[ -f "$deb" ] || fail "make deb printed no package"
tuple="$(dpkg-architecture -qDEB_HOST_MULTIARCH)"
debian_so="usr/lib/$tuple/varnish/vmods/libvmod_opentracing.so"
debian_vcl="usr/share/varnish/vcl/opentracing.vcl"
contents="$(dpkg-deb -c "$deb" | awk '{ print $NF }')"
for f in "$debian_so" "$debian_vcl" usr/share/doc/vmod-opentracing/{README.md,API.md,copyright}; do
    grep -qx "./$f" <<<"$contents" || fail "$deb has no /$f"
done
abi="$(sed -n 's/^#define[[:space:]]*VMOD_ABI_Version[[:space:]]*"\(.*\)"/\1/p' \
    "$(pkg-config --variable=pkgincludedir varnishapi)/vmod_abi.h")"
commit="${abi##* }"
depends="$(dpkg-deb -f "$deb" Depends)"
grep -q "varnishabi-strict-\(${commit,,}\|.*-${commit,,}\)\(,\|$\)" <<<"$depends" ||
    fail "Depends does not name the ABI $abi: $depends"
vrt() { sed -n "s/^#define[[:space:]]*VRT_$1_VERSION[[:space:]]*\([0-9]*\)U.*/\1/p" \
    "$(pkg-config --variable=pkgincludedir varnishapi)/vrt.h"; }
grep -q "varnishabi-$(vrt MAJOR)\.$(vrt MINOR)\(,\|$\)" <<<"$depends" || fail "Depends lacks the VRT ABI: $depends"
grep -q "libvarnishapi3" <<<"$depends" || fail "Depends does not name libvarnishapi3: $depends"
[ "$(dpkg-deb -f "$deb" Package)" = vmod-opentracing ] || fail "package name"
ok "deb: /$debian_so, /$debian_vcl, docs; Depends: $depends"

if [ "$(id -u)" != 0 ]; then
    echo "skip install: dpkg round trip in a staging root (needs root)"
    exit 0
fi
root="$work/dpkg-root"
mkdir -p "$root/var/lib/dpkg/"{info,updates,triggers}
touch "$root/var/lib/dpkg/"{status,available}
dpkg_r() { dpkg --root="$root" --log=/dev/null "$@"; }
# Without a package that provides the ABI, dpkg installs the files but refuses to configure.
if dpkg_r -i "$deb" >"$work/dpkg.log" 2>&1; then fail "dpkg -i accepted the package without its Varnish"; fi
grep -q "depends on varnishabi-strict-" "$work/dpkg.log" || { cat "$work/dpkg.log"; fail "dpkg -i: unexpected error"; }
dpkg_r --force-depends --configure vmod-opentracing >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg --configure"; }
dpkg-query --admindir="$root/var/lib/dpkg" -W -f '${Status}' vmod-opentracing | grep -q "install ok installed" ||
    fail "not installed in the staging root"
cmp -s vcl/opentracing.vcl "$root/$debian_vcl" || fail "dpkg did not install /$debian_vcl"
run_vtc "$root/$debian_so" -p vmod_path="$root/$(dirname "$debian_so")" -p vcl_path="$root/$(dirname "$debian_vcl")"
dpkg_r -r vmod-opentracing >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -r"; }
no_files "$root/usr" || fail "dpkg -r left $(find "$root/usr" -type f)"
ok "deb: dpkg refuses it without the Varnish ABI, installs it with --force-depends, varnishd runs the bare import from Debian's paths, dpkg -r removes it"

# 5. the machine's own dpkg, on request
[ "${INSTALL_TEST_SYSTEM_DPKG:-0}" = 1 ] || exit 0
if dpkg-query -W vmod-opentracing >/dev/null 2>&1 || [ -e "/$debian_so" ] || [ -e "/$debian_vcl" ]; then
    fail "system dpkg round trip: vmod-opentracing is already installed here"
fi
cleanup+=("dpkg --log=/dev/null -r vmod-opentracing >/dev/null 2>&1")
dpkg --force-depends -i "$deb" >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "system dpkg -i"; }
run_vtc "/$debian_so" -p vmod_path="/$(dirname "$debian_so")" -p vcl_path="/$(dirname "$debian_vcl")"
dpkg -r vmod-opentracing >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "system dpkg -r"; }
cleanup=()
[ ! -e "/$debian_so" ] && [ ! -e "/$debian_vcl" ] || fail "system dpkg -r left files"
ok "deb: the system's dpkg -i --force-depends, varnishd on /$debian_so, dpkg -r removes it"
