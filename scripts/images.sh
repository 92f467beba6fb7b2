#!/usr/bin/env bash
# `make images`: every qvirt container image, built here with no registry.
#
#   qvirt-debian:KEY  a Debian root filesystem (debootstrap --variant=minbase
#                     plus QEMU and the qvirt-qemu user), imported with
#                     `docker import`: the base of the images that need
#                     QEMU or a shell. Its tarball is cached under
#                     target/deploy/rootfs/, keyed by its inputs.
#   qvirt-vmm, qvirt-supervisor, qvirt-hookexec   FROM qvirt-debian:KEY
#   qvirt-eventbus, qvirt-agentd, qvirt-gateway   FROM scratch
#   qvirt-host    FROM qvirt-debian:KEY: a whole fleet host in one container
#                 (supervisor, eventbus, hookexec, agentd and their init,
#                 deploy/fleet/qvirt-host-init; see docs/FLEET.md)
#   qvirt-nats    FROM scratch: the pinned nats-server of .tools/bin
#
# Each image holds its service's binaries and qvirtctl (its health check)
# in /usr/local/bin (qvirt-nats: nats-server alone). The binaries
# (QVIRT_BINARIES):
#   release (default)  the workspace's release binaries, statically linked
#                      (glibc, crt-static), built on the host with --locked
#                      into target/static (the tree `make static-ga` uses);
#   debug              the debug binaries `make test` has already built
#                      (target/debug), with the shared libraries they load
#                      copied beside them on scratch: what `make test` uses
#                      to test the deployment without a second build.
# Debug info is stripped from the copies. Each image is tagged with the
# hash of its inputs (files, base, Dockerfile), so a rerun rebuilds only
# what changed; the tag `latest` (what deploy/docker-compose.yml runs by
# default) is moved to the current build and older builds are removed.
#
# Environment (all optional):
#   QVIRT_BINARIES     release | debug (see above)
#   QVIRT_SKIP_BUILD=1 use the binaries as they are (no cargo build)
#   QVIRT_IMAGES       which images, by name without `qvirt-` (default:
#                      all eight)
#   DEBIAN_SUITE       the rootfs's suite (default: this host's Debian
#                      codename, else bookworm)
#   DEBIAN_MIRROR      debootstrap's mirror (default: debootstrap's own)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
triple=$(rustc -vV | sed -n 's/^host: //p')
cache="$here/target/deploy"
host_suite=$( (. /etc/os-release 2>/dev/null && [ "${ID:-}" = debian ] && echo "${VERSION_CODENAME:-}") || true)
suite="${DEBIAN_SUITE:-${host_suite:-bookworm}}"
mirror="${DEBIAN_MIRROR:-}"
mode="${QVIRT_BINARIES:-release}"
# What the Debian image holds beyond minbase: QEMU (and, through its
# dependencies, its firmware).
debian_packages=(qemu-system-x86)
QEMU_USER=qvirt-qemu
# Debian's libvirt-qemu uid, a fixed number so that files QEMU owns keep
# their owner across image rebuilds.
QEMU_UID=64055

say() { printf 'images: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }
sha() { sha256sum | cut -c1-16; }

command -v docker >/dev/null || die "no docker client on PATH"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer (docker info failed)"
mkdir -p "$cache/rootfs"

# --- the Debian root filesystem -----------------------------------------------
rootfs_key() {
    {
        echo "suite=$suite variant=minbase packages=${debian_packages[*]}"
        echo "user=$QEMU_USER uid=$QEMU_UID"
        sed -n '/^# --- the Debian root filesystem/,/^# --- end rootfs/p' "$0"
    } | sha
}

build_rootfs() {
    local tarball=$1 work include
    command -v debootstrap >/dev/null || die "debootstrap missing: run \`make deps\` (as root)"
    [ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
    work=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$work"' RETURN
    say "debootstrap $suite (minbase + ${debian_packages[*]}): the first time takes minutes"
    include=$(IFS=,; echo "${debian_packages[*]}")
    debootstrap --variant=minbase --include="$include" "$suite" "$work/root" ${mirror:+"$mirror"} \
        >"$work/debootstrap.log" 2>&1 || {
        tail -n 20 "$work/debootstrap.log" >&2
        die "debootstrap failed"
    }
    chroot "$work/root" groupadd --system --gid "$QEMU_UID" "$QEMU_USER"
    chroot "$work/root" useradd --system --uid "$QEMU_UID" --gid "$QEMU_UID" --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin "$QEMU_USER" 2>/dev/null
    # What a container never needs: package caches, lists, docs.
    rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"* \
        "$work/root/usr/share/doc" "$work/root/usr/share/man" "$work/root/usr/share/info" \
        "$work/root/var/log/"*
    tar --numeric-owner -C "$work/root" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
}
# --- end rootfs

rkey=$(rootfs_key)
tarball="$cache/rootfs/debian-$suite-$rkey.tar"
[ -f "$tarball" ] || build_rootfs "$tarball"
# Older root filesystems go.
find "$cache/rootfs" -maxdepth 1 -name 'debian-*.tar' ! -path "$tarball" -delete

# --- the binaries --------------------------------------------------------------
packages=(qvirt-supervisor qvirt-hookexec qvirt-eventbus qvirt-agentd qvirt-gateway qvirtctl)
pkg_args=()
for p in "${packages[@]}"; do pkg_args+=(-p "$p"); done
case "$mode" in
release)
    bin_dir="$here/target/static/$triple/release"
    if [ "${QVIRT_SKIP_BUILD:-0}" != 1 ]; then
        say "release binaries (static, --locked) into target/static"
        # RUSTFLAGS reach only the --target build, not build scripts.
        RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked \
            --target "$triple" --target-dir "$here/target/static" "${pkg_args[@]}" --bins
    fi
    ;;
debug)
    bin_dir="$here/target/debug"
    if [ "${QVIRT_SKIP_BUILD:-0}" != 1 ]; then
        # The very build `make build-debug` makes (the whole workspace: a
        # subset would unify features differently and rebuild crates).
        cargo build --locked --workspace --bins
    fi
    ;;
*) die "QVIRT_BINARIES must be release or debug, not $mode" ;;
esac
for b in qvirt-vmm qvirt-supervisor qvirt-hookexec qvirt-eventbus qvirt-agentd qvirt-gateway qvirtctl; do
    [ -x "$bin_dir/$b" ] || die "no $bin_dir/$b (build it, or unset QVIRT_SKIP_BUILD)"
done
is_static() {
    case "$(ldd "$1" 2>&1)" in
    *"not a dynamic executable"* | *"statically linked"*) return 0 ;;
    *) return 1 ;;
    esac
}

nats_server="$here/.tools/bin/nats-server"
# Lay out an image's files under DIR as they go into the image: the
# binaries in usr/local/bin, and for a dynamically linked binary on
# scratch the libraries it loads, at the paths ldd names.
layout() {
    local dir=$1 kind=$2 b lib
    shift 2
    mkdir -p "$dir/usr/local/bin"
    for b in "$@"; do
        case "$b" in
        nats-server)
            [ -x "$nats_server" ] || die "no $nats_server: run \`make deps\`"
            is_static "$nats_server" || die "$nats_server is dynamically linked"
            cp "$nats_server" "$dir/usr/local/bin/nats-server"
            continue
            ;;
        qvirt-host-init)
            install -m 0755 "$here/deploy/fleet/qvirt-host-init" "$dir/usr/local/bin/"
            continue
            ;;
        esac
        strip --strip-debug -o "$dir/usr/local/bin/$b" "$bin_dir/$b"
        if ! is_static "$bin_dir/$b"; then
            [ "$mode" = debug ] || die "$bin_dir/$b is dynamically linked"
            [ "$kind" = scratch ] || continue
            for lib in $(ldd "$bin_dir/$b" | grep -o '/[^ ]*'); do
                mkdir -p "$dir$(dirname "$lib")"
                cp -L "$lib" "$dir$lib"
            done
        fi
    done
}

# --- the images ----------------------------------------------------------------
base="qvirt-debian:$rkey"
if ! docker image inspect "$base" >/dev/null 2>&1; then
    say "docker import $base"
    docker import --message "qvirt Debian $suite minbase + ${debian_packages[*]}" \
        "$tarball" "$base" >/dev/null
fi
base_id=$(docker image inspect --format '{{.Id}}' "$base")
docker image ls --format '{{.Repository}}:{{.Tag}}' qvirt-debian | grep -vx "$base" |
    xargs -r docker rmi >/dev/null 2>&1 || true

# name -> kind (debian: needs QEMU or a shell; scratch: neither)
declare -A kind=(
    [vmm]=debian [supervisor]=debian [hookexec]=debian
    [eventbus]=scratch [agentd]=scratch [gateway]=scratch
    [host]=debian [nats]=scratch
)
# name -> what goes into usr/local/bin (default: qvirt-NAME and qvirtctl)
declare -A contents=(
    [host]="qvirt-host-init qvirt-supervisor qvirt-eventbus qvirt-hookexec qvirt-agentd qvirtctl"
    [nats]="nats-server"
)
wanted=${QVIRT_IMAGES:-vmm supervisor hookexec eventbus agentd gateway host nats}
built=0 kept=0
for name in $wanted; do
    k=${kind[$name]:-}
    [ -n "$k" ] || die "unknown image $name"
    dockerfile="$here/deploy/build/Dockerfile.$k"
    ctx="$cache/ctx/$name"
    rm -rf "$ctx" && mkdir -p "$ctx"
    # shellcheck disable=SC2086 # a list of names
    layout "$ctx" "$k" ${contents[$name]:-qvirt-$name qvirtctl}
    from=""
    [ "$k" = debian ] && from=$base_id
    tag=$({
        echo "$k $from"
        cat "$dockerfile"
        tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$ctx" -c . | sha256sum
    } | sha)
    image="qvirt-$name:$tag"
    if docker image inspect "$image" >/dev/null 2>&1; then
        kept=$((kept + 1))
    else
        say "building $image ($k, $mode binaries)"
        docker build -q -f "$dockerfile" --build-arg "BASE=$base" -t "$image" "$ctx" \
            >"$cache/build.log" 2>&1 || {
            cat "$cache/build.log" >&2
            die "docker build of $image failed"
        }
        built=$((built + 1))
    fi
    rm -rf "$ctx"
    docker tag "$image" "qvirt-$name:latest"
    # Earlier builds of this image go (kept if a container still uses one).
    docker image ls --format '{{.Repository}}:{{.Tag}}' "qvirt-$name" |
        grep -E "^qvirt-$name:[0-9a-f]{16}\$" | grep -vx "$image" |
        xargs -r docker rmi >/dev/null 2>&1 || true
    echo "$image"
done
say "$built built, $kept unchanged ($mode binaries; tagged :latest too)"
