# qvirt: the two commands a user needs are `make run` and `make test`.
# Everything else here is what those two are made of.

CARGO ?= cargo
TOOLS := $(CURDIR)/.tools/bin
export PATH := $(TOOLS):$(PATH)
# Where integration tests find the binaries (`make test` builds them first).
export QVIRT_BIN_DIR ?= $(CURDIR)/target/debug

.PHONY: all deps build build-debug run test bench lint fmt clean

all: build

## deps: install what is missing (Debian packages as root, grpcurl into .tools/bin)
deps:
	@bash scripts/deps.sh

## build: release binaries in target/release
build:
	$(CARGO) build --release --workspace --bins

build-debug:
	$(CARGO) build --workspace --bins

## run: build and start the whole stack on loopback; Ctrl-C stops it
run: deps build
	@bash scripts/run.sh

## test: every unit and integration test, against the real binaries
test: deps build-debug
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

## bench: performance figures, each beside its reference measured in the same run
bench: deps build
	@bash scripts/bench.sh

## lint: formatting and clippy, warnings are errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf .tools .run
