# lowport: `make demo` runs the demo server under lowport, `make test` runs every test, `make stress`
# the stress scenarios (a few minutes).
# They do their own set-up; as root they also install what is missing from Debian's packages.

CARGO ?= cargo
# Where `make install` puts lowport, its man pages and completions; ~/.local needs no root.
PREFIX ?= $(HOME)/.local
DEMO_PORT ?= 8080

.PHONY: all build release setup demo test stress lint bench install clean

all: build

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --workspace --release

# Packages and the test user with subordinate ids (root only; otherwise it names what is missing).
setup:
	@scripts/setup.sh

demo: setup build
	@DEMO_PORT=$(DEMO_PORT) scripts/demo.sh target/debug

# A test that cannot run here (a missing tool, no IPv6...) returns early and the harness says "ok";
# it names itself in $(SKIPPED_LIST), listed at the end. The status is cargo test's.
SKIPPED_LIST = $(CURDIR)/target/skipped-tests.txt
test: setup build
	@mkdir -p "$(CURDIR)/target" && rm -f "$(SKIPPED_LIST)"
	@echo "$(CARGO) test --workspace"
	@LOWPORT_SKIPPED="$(SKIPPED_LIST)" $(CARGO) test --workspace; status=$$?; \
	if [ -s "$(SKIPPED_LIST)" ]; then \
		echo; echo "SKIPPED (these tests did not run):"; sed 's/^/  /' "$(SKIPPED_LIST)"; \
	fi; \
	exit $$status

# The stress scenarios of tests/tests/stress.rs (10,000 idle connections, lazy clients, a UDP flood,
# clients that reset, the server killed mid-transfer), one at a time, each printing a `stress:` line
# of figures. They are #[ignore]d, so `make test` skips them. CI runs this after `make test`.
stress: setup release
	$(CARGO) test --release -p lowport-tests --test stress -- --ignored --test-threads=1 --nocapture

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Benchmarks against direct loopback, rootlesskit and pasta; writes docs/benchmarks.md and .png.
# As root it installs the peers from Debian's packages. Not part of `test` or CI.
# `make bench BENCH_QUICK=1` is a short smoke run, written under target/bench/ instead; BENCH_ONLY=proxy,startup
# runs only those rows (see scripts/bench/bench.py).
BENCH_PYTHON ?= $(shell [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || echo python3)
bench: release
	@BENCH_QUICK=$(BENCH_QUICK) BENCH_ONLY=$(BENCH_ONLY) $(BENCH_PYTHON) scripts/bench/bench.py

# The binary, the man pages (lowport(1), and lowport-run(1) and one per other subcommand) and bash, zsh and fish completions, all
# generated from the clap definitions by lowport-docs, and the AppArmor profile of contrib/apparmor (for Ubuntu 23.10
# and later; `lowport doctor` prints the root command that installs it when it is needed). `make install PREFIX=~/.local` needs no root.
install: release
	target/release/lowport-docs target/share
	install -D -m 755 target/release/lowport "$(PREFIX)/bin/lowport"
	install -d "$(PREFIX)/share/man/man1"
	install -m 644 target/share/man1/*.1 "$(PREFIX)/share/man/man1/"
	install -D -m 644 target/share/completions/lowport.bash "$(PREFIX)/share/bash-completion/completions/lowport"
	install -D -m 644 target/share/completions/_lowport "$(PREFIX)/share/zsh/site-functions/_lowport"
	install -D -m 644 target/share/completions/lowport.fish "$(PREFIX)/share/fish/vendor_completions.d/lowport.fish"
	install -D -m 644 contrib/apparmor/lowport "$(PREFIX)/share/lowport/apparmor/lowport"
	@echo "installed: $(PREFIX)/bin/lowport, its man pages in $(PREFIX)/share/man/man1, completions for bash, zsh and fish under $(PREFIX)/share, the AppArmor profile in $(PREFIX)/share/lowport/apparmor (lowport doctor says when it is needed)"

clean:
	$(CARGO) clean
