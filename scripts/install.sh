#!/usr/bin/env bash
# Installs (or removes) the VMOD, the VCL include and the documentation, for the Varnish that
# pkg-config finds (varnishapi.pc): `make install` and `make uninstall` run this script.
#
# Usage: scripts/install.sh install|uninstall
#
# Settings, from the environment (the Makefile passes `make install VAR=value` on), all optional:
#   DESTDIR  staging root put in front of every path below (packagers); nothing else changes
#   PREFIX   default: the Varnish's own prefix (pkg-config --variable=prefix varnishapi)
#   VMODDIR  default: the Varnish's vmoddir, with PREFIX as its prefix; with the default PREFIX this
#            is exactly varnishd's built-in vmod_path, so a bare `import opentracing;` finds it
#   VCLDIR   default: the Varnish's vcldir, with PREFIX as its prefix (on varnishd's vcl_path);
#            .pc files without vcldir (older Varnish): <pkgdatadir>/vcl, Varnish's own default
#   DOCDIR   default: $PREFIX/share/doc/vmod-opentracing
#   SO       the module, default target/release/libvmod_opentracing.so (`make install` builds it)
#   STRIP    0 keeps the module's symbols and debug info; otherwise the program to strip with
#            (default strip, run as dh_strip does: --strip-unneeded, no .comment/.note sections)
set -euo pipefail
cd "$(dirname "$0")/.."

action="${1:-}"
case "$action" in install | uninstall) ;; *) echo "usage: $0 install|uninstall" >&2; exit 2 ;; esac

pc() { pkg-config --define-variable=prefix="$PREFIX" --variable="$1" varnishapi; }

pkg-config --exists varnishapi || { echo "install.sh: pkg-config finds no varnishapi" >&2; exit 1; }
PREFIX="${PREFIX:-$(pkg-config --variable=prefix varnishapi)}"
VMODDIR="${VMODDIR:-$(pc vmoddir)}"
VCLDIR="${VCLDIR:-$(pc vcldir)}"
VCLDIR="${VCLDIR:-$(pc pkgdatadir)/vcl}"
DOCDIR="${DOCDIR:-$PREFIX/share/doc/vmod-opentracing}"
SO="${SO:-target/release/libvmod_opentracing.so}"
STRIP="${STRIP:-strip}"
DESTDIR="${DESTDIR:-}"
[ -n "$VMODDIR" ] || { echo "install.sh: varnishapi.pc has no vmoddir: set VMODDIR" >&2; exit 1; }

docs=(README.md API.md LICENSE)

# install -m MODE SRC DEST, through a temporary file renamed into place: a varnishd loading the
# module at that moment sees the old file or the new one, never half of one.
put() {
    local mode="$1" src="$2" dest="$DESTDIR$3" tmp
    install -d "$(dirname "$dest")"
    tmp="$(dirname "$dest")/.$(basename "$dest").tmp$$"
    install -m "$mode" "$src" "$tmp"
    if [ "$4" = strip ] && [ "$STRIP" != 0 ]; then
        "$STRIP" --strip-unneeded --remove-section=.comment --remove-section=.note "$tmp"
    fi
    mv -f "$tmp" "$dest"
    echo "installed $dest"
}

remove() {
    local dest="$DESTDIR$1"
    if [ -e "$dest" ]; then rm -f "$dest"; echo "removed $dest"; fi
}

if [ "$action" = install ]; then
    [ -f "$SO" ] || { echo "install.sh: $SO is missing: run 'make release' first" >&2; exit 1; }
    put 0644 "$SO" "$VMODDIR/libvmod_opentracing.so" strip
    put 0644 vcl/opentracing.vcl "$VCLDIR/opentracing.vcl" -
    for f in "${docs[@]}"; do put 0644 "$f" "$DOCDIR/$f" -; done
else
    remove "$VMODDIR/libvmod_opentracing.so"
    remove "$VCLDIR/opentracing.vcl"
    for f in "${docs[@]}"; do remove "$DOCDIR/$f"; done
    # Only our own folder goes; vmoddir and vcldir belong to Varnish.
    [ ! -d "$DESTDIR$DOCDIR" ] || rmdir --ignore-fail-on-non-empty "$DESTDIR$DOCDIR"
fi
