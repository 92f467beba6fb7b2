# qvirt: the two commands a user needs are `make run` and `make test`.
# Everything else here is what those two are made of.

CARGO ?= cargo
TOOLS := $(CURDIR)/.tools/bin
export PATH := $(TOOLS):$(PATH)
# Where integration tests find the binaries (`make test` builds them first).
export QVIRT_BIN_DIR ?= $(CURDIR)/target/debug

.PHONY: all deps bench-deps build build-debug run test bench lint fmt clean static-ga proto-baseline fuzz images test-deploy test-fleet

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
## (it prints how long after `make run` began the demo guest's agent
## answered: RUN_T0 is taken when make reads this file, before the build)
run: RUN_T0 := $(shell date +%s%N)
run: deps build
	@QVIRT_RUN_T0=$(RUN_T0) QVIRT_BIN_DIR=$(CURDIR)/target/release bash scripts/run.sh

## test: every unit and integration test, against the real binaries
test: deps build-debug static-ga
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi
	@QVIRT_BINARIES=debug bash scripts/test-deploy.sh
	@QVIRT_BINARIES=debug bash scripts/test-fleet.sh

## images: the container images, built here with no registry: static
## release binaries (target/static) on scratch, or on a Debian rootfs made
## with debootstrap and `docker import`ed; rebuilt only when inputs change
images: deps
	@bash scripts/images.sh

## test-deploy: deploy/docker-compose.yml end to end (images, up, a guest,
## supervisor restart, down -v); SKIPPED when no Docker engine answers.
## On its own it builds the release images users get; `make test` runs it
## on the debug binaries it already built (QVIRT_BINARIES=debug)
test-deploy: deps static-ga
	@bash scripts/test-deploy.sh

## test-fleet: deploy/fleet/docker-compose.yml (3 NATS, 3 hosts, 2
## gateways) through its scenarios (integration-tests/tests/fleet_deploy.rs);
## SKIPPED when no Docker engine answers. Like test-deploy: release images
## on its own, the debug binaries under `make test`
test-fleet: deps static-ga
	@bash scripts/test-fleet.sh

## bench: performance figures, each beside its reference measured in the same run
## (nginx and python3-libvirt: bench-deps installs those)
bench: deps bench-deps build static-ga
	@bash scripts/bench.sh

## bench-deps: what only `make bench` needs (nginx, python3-libvirt)
bench-deps:
	@bash scripts/bench-deps.sh

## static-ga: a statically linked qvirt-ga (glibc, crt-static) in its own
## target dir, target/static/<host>/release/qvirt-ga, checked to need no
## dynamic loader
HOST_TRIPLE := $(shell rustc -vV 2>/dev/null | sed -n 's/^host: //p')
STATIC_GA := $(CURDIR)/target/static/$(HOST_TRIPLE)/release/qvirt-ga
static-ga:
	RUSTFLAGS='-C target-feature=+crt-static' $(CARGO) build --release --locked \
		--target $(HOST_TRIPLE) --target-dir $(CURDIR)/target/static -p qvirt-ga --bin qvirt-ga
	@out=$$(ldd $(STATIC_GA) 2>&1); \
	case "$$out" in \
	*"not a dynamic executable"*|*"statically linked"*) echo "$(STATIC_GA): static ($$out)";; \
	*) echo "$(STATIC_GA) is dynamically linked:"; echo "$$out"; exit 1;; \
	esac
	$(STATIC_GA) -V

## lint: formatting, clippy (warnings are errors), and the protobuf gate:
## buf lint, and buf breaking against the committed v1 baseline
lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(TOOLS)/buf lint
	$(TOOLS)/buf breaking --against proto/baseline.binpb

## proto-baseline: accept the current protos as the API baseline (a
## deliberate, reviewed act: it is what lets a breaking change through)
proto-baseline: deps
	$(TOOLS)/buf build --exclude-source-info -o proto/baseline.binpb

## fuzz: run each fuzz target (fuzz/) for FUZZ_SECS seconds (default 60)
FUZZ_SECS ?= 60
FUZZ_TARGETS ?= qga_stream qmp_reader domain_yaml event_filter hook_output
fuzz: deps
	@bash scripts/fuzz.sh $(FUZZ_SECS) $(FUZZ_TARGETS)

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf .tools .run
