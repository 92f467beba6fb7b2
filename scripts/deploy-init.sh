#!/usr/bin/env bash
# Prepares a docker-compose deployment's host files (docs/DEPLOY.md):
#   CONFIG_DIR/internal-token   the internal plane's shared secret (0600)
#   CONFIG_DIR/gateway.yaml     the gateway's tokens (hashes only)
#   CONFIG_DIR/token-rw         a read-write bearer token for you (0600)
#   CONFIG_DIR/token-ro         a read-only one
#   CONFIG_DIR/tls/             empty: TLS material goes here
#   IMAGES_DIR/                 kernels, initrds and disks for guests
# Tokens are made by the gateway image itself (`qvirt-gateway token new`),
# so run `make images` first. Existing files are kept: run it again
# safely; remove a file to have it made anew.
#
# Usage: scripts/deploy-init.sh [CONFIG_DIR [IMAGES_DIR]]
#   (defaults: deploy/config and deploy/images, what
#   deploy/docker-compose.yml mounts unless QVIRT_CONFIG_DIR and
#   QVIRT_IMAGES_DIR say otherwise)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
config=${1:-$here/deploy/config}
images=${2:-$here/deploy/images}
image=qvirt-gateway:${QVIRT_IMAGE_TAG:-latest}
say() { printf 'deploy-init: %s\n' "$*" >&2; }

docker image inspect "$image" >/dev/null 2>&1 || { say "no image $image: run \`make images\` first"; exit 1; }
umask 077
mkdir -p "$config/tls" "$images"
# QEMU runs as an unprivileged user in the vmm container and opens the
# guests' kernels and disks by path.
chmod 0755 "$images"
if [ ! -s "$config/internal-token" ]; then
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$config/internal-token"
    say "made $config/internal-token"
fi
if [ ! -s "$config/gateway.yaml" ]; then
    docker run --rm --network none "$image" qvirt-gateway token new --name admin --role read-write \
        2>/dev/null >"$config/rw.out"
    docker run --rm --network none "$image" qvirt-gateway token new --name reader --role read-only \
        2>/dev/null >"$config/ro.out"
    {
        echo "# The gateway's bearer tokens (their hashes). Add more with"
        echo "#   docker run --rm qvirt-gateway qvirt-gateway token new --name NAME --role ROLE"
        echo "# then: docker-compose -f deploy/docker-compose.yml kill -s HUP gateway"
        echo "tokens:"
        tail -n +2 "$config/rw.out"
        tail -n +2 "$config/ro.out"
    } >"$config/gateway.yaml"
    head -n 1 "$config/rw.out" >"$config/token-rw"
    head -n 1 "$config/ro.out" >"$config/token-ro"
    rm -f "$config/rw.out" "$config/ro.out"
    say "made $config/gateway.yaml with two tokens: $config/token-rw (admin, read-write), $config/token-ro (reader, read-only)"
fi
say "ready: docker-compose -f deploy/docker-compose.yml up -d"
