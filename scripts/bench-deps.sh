#!/usr/bin/env bash
# Installs what `make bench` needs beyond `make deps`, and nothing else;
# does nothing when everything is already there (idempotent). `make test`
# never needs these.
#
#   - nginx-core: Debian's nginx with the HTTP/2 and gRPC proxy modules,
#     the reverse proxy the gateway bench measures beside qvirt-gateway
#     (run from a private config and prefix, never as a system service).
#   - python3-libvirt: the libvirt bench drives a private libvirtd through
#     its API (benches/libvirt/helper.py) beside qvirt. libvirt itself is
#     installed by `make deps` (scripts/deps.sh): the tests need it too.
#
# As root it installs; otherwise it prints the exact command and fails.
set -euo pipefail

say() { printf 'bench-deps: %s\n' "$*" >&2; }

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-core)
/usr/bin/python3 -c 'import libvirt, libvirt_qemu' >/dev/null 2>&1 || need+=(python3-libvirt)

[ "${#need[@]}" -eq 0 ] && exit 0
cmd=(apt-get install -y -q --no-install-recommends "${need[@]}")
if [ "$(id -u)" -ne 0 ]; then
    say "missing: ${need[*]}; run as root:"
    say "  apt-get update && ${cmd[*]}"
    exit 1
fi
say "installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
"${cmd[@]}" >/dev/null
