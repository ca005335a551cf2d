# vmod-opentracing: `make test` builds and runs every test, `make demo` shows traced requests.
# Every target finds (or builds) the Varnish it needs through scripts/varnish.sh.

SHELL := /bin/bash
VARNISH_ENV = eval "$$(bash scripts/varnish.sh --env)"
CARGO_TEST = $(if $(shell command -v cargo-nextest),nextest run --no-fail-fast,test --no-fail-fast)
# nextest ends a test that hangs (.config/nextest.toml); plain `cargo test` has no such limit, so
# without nextest the whole run is bounded instead (45 minutes: CI allows 90 for everything).
TEST_LIMIT = $(if $(shell command -v cargo-nextest),,timeout --foreground 2700)

.PHONY: all varnish env deps build release bench test test-unit test-vtc test-e2e demo check-vcl stats clean \
	install uninstall deb test-install

all: build

## Varnish >= 7.5 with development files (installed or built once, then reused).
varnish:
	@bash scripts/varnish.sh

## Print the shell exports pointing at the Varnish in use: eval "$(make -s env)"
env:
	@bash scripts/varnish.sh --env

## Tools the demo and the tests run besides Varnish (python3 for the demo backend).
deps: varnish
	@bash scripts/deps.sh

## The VMOD (debug build, target/debug/libvmod_opentracing.so), its API.md, and the test OTLP
## receiver (target/debug/otlp-receiver, tools/otlp-receiver).
build: varnish
	@$(VARNISH_ENV) && cargo build --workspace

## The optimised, stripped VMOD (target/release/libvmod_opentracing.so).
release: varnish
	@$(VARNISH_ENV) && cargo build --release --workspace

## Overhead against plain Varnish with wrk: one after another (bench/run.py), then side by side
## on one CPU (bench/paired.py); results in bench/results/.
bench: varnish release
	@bash scripts/deps.sh bench
	@$(VARNISH_ENV) && python3 bench/run.py
	@$(VARNISH_ENV) && python3 bench/paired.py

## Everything: Rust unit tests, end-to-end tests against real varnishd, every .vtc suite.
test: deps build
	@$(VARNISH_ENV) && $(TEST_LIMIT) cargo $(CARGO_TEST) --workspace
	@$(VARNISH_ENV) && bash scripts/run-vtc.sh
	@$(VARNISH_ENV) && bash scripts/check-vcl.sh
	@$(VARNISH_ENV) && bash scripts/test-install.sh
	@python3 tests/tools/collector_check.py

test-unit: build
	@$(VARNISH_ENV) && $(TEST_LIMIT) cargo $(CARGO_TEST) --lib

test-e2e: deps build
	@$(VARNISH_ENV) && $(TEST_LIMIT) cargo $(CARGO_TEST) --test e2e

test-vtc: build
	@$(VARNISH_ENV) && bash scripts/run-vtc.sh $(VTC)

## make install, make uninstall and make deb, each checked with varnishd and a bare
## `import opentracing;` (scripts/test-install.sh).
test-install: deps
	@$(VARNISH_ENV) && bash scripts/test-install.sh

## Every example VCL and README snippet compiles (varnishd -C).
check-vcl: build
	@$(VARNISH_ENV) && bash scripts/check-vcl.sh

## Start varnishd + a demo backend, send a few requests, print the traces, stop everything.
demo: deps build
	@$(VARNISH_ENV) && bash scripts/demo.sh

## The module's counters of a running varnishd (N=<instance name or workdir> for a non-default one).
stats: varnish
	@$(VARNISH_ENV) && varnishstat -1 -f 'OPENTRACING.*' $(if $(N),-n $(N))

# Passed on to scripts/install.sh; empty means its default (see there).
INSTALL_VARS = DESTDIR="$(DESTDIR)" PREFIX="$(PREFIX)" VMODDIR="$(VMODDIR)" VCLDIR="$(VCLDIR)" \
	DOCDIR="$(DOCDIR)" STRIP="$(STRIP)"

## Install the stripped release module into the Varnish's vmoddir, opentracing.vcl into its vcldir,
## README/API/LICENSE into $(PREFIX)/share/doc/vmod-opentracing (defaults from pkg-config
## varnishapi). Overrides: DESTDIR, PREFIX, VMODDIR, VCLDIR, DOCDIR, STRIP=0 (keep symbols).
install: varnish
	@$(VARNISH_ENV) && cargo build --release && $(INSTALL_VARS) bash scripts/install.sh install

## Remove what `make install` installed (same variables).
uninstall: varnish
	@$(VARNISH_ENV) && $(INSTALL_VARS) bash scripts/install.sh uninstall

## Debian package in target/debian/ (cargo-deb, installed once at a pinned version), depending on
## the ABI of the Varnish it is built against; DEB_ARGS are passed to cargo-deb.
deb: deps
	@$(VARNISH_ENV) && bash scripts/deb.sh $(DEB_ARGS)

clean:
	cargo clean
	rm -rf demo-output
