# lowport: `make demo` runs the demo server under lowport, `make test` runs every test.
# Both do their own set-up; as root they also install what is missing from Debian's packages.

CARGO ?= cargo
DEMO_PORT ?= 8080

.PHONY: all build release setup demo test lint bench clean

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

test: setup build
	$(CARGO) test --workspace

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
