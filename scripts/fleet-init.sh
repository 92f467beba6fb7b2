#!/usr/bin/env bash
# Prepares the host files of the fleet deployment, deploy/fleet/
# (docs/FLEET.md, "The fleet in containers"):
#   CONFIG_DIR/internal-token      the internal plane's shared secret (0600)
#   CONFIG_DIR/nats-token          the token every NATS client presents (0600)
#   CONFIG_DIR/nats.conf           the NATS servers' config: JetStream, the
#                                  cluster, the client token and the routes'
#                                  password (0600)
#   CONFIG_DIR/gateway.yaml        the gateways' tokens (hashes only)
#   CONFIG_DIR/token-rw, token-ro  a read-write and a read-only bearer token
#   CONFIG_DIR/gateway-bus.yaml    the fleet bus beside each gateway
#   CONFIG_DIR/HOST/*.yaml         one dir per host: eventbus, hookexec,
#                                  supervisor and agentd configs
#   CONFIG_DIR/hooks/              empty: the hosts' hook scripts
#   IMAGES_DIR/                    kernels, initrds and disks for guests
# Secret and tokens are made as scripts/deploy-init.sh makes them (it is
# run for them, so run `make images` first). Existing files are kept:
# run it again safely, e.g. after adding a host to QVIRT_FLEET_HOSTS.
#
# Usage: scripts/fleet-init.sh [CONFIG_DIR [IMAGES_DIR]]
#   (defaults: deploy/fleet/config and deploy/fleet/images, what
#   deploy/fleet/docker-compose.yml mounts unless QVIRT_CONFIG_DIR and
#   QVIRT_IMAGES_DIR say otherwise)
# Environment:
#   QVIRT_FLEET_HOSTS  the hosts (default "host1 host2 host3"): each one's
#                      id, compose service and DNS name
#   QVIRT_FLEET_NATS   the NATS servers (default
#                      "nats://nats1:4222 nats://nats2:4222 nats://nats3:4222")
#   QVIRT_FLEET_REPLICAS  stream and bucket replicas (default 3)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
config=${1:-$here/deploy/fleet/config}
images=${2:-$here/deploy/fleet/images}
hosts=${QVIRT_FLEET_HOSTS:-host1 host2 host3}
nats=${QVIRT_FLEET_NATS:-nats://nats1:4222 nats://nats2:4222 nats://nats3:4222}
replicas=${QVIRT_FLEET_REPLICAS:-3}
say() { printf 'fleet-init: %s\n' "$*" >&2; }

bash "$here/scripts/deploy-init.sh" "$config" "$images" 2>/dev/null ||
    { say "deploy-init.sh failed (run \`make images\` first)"; exit 1; }
umask 077
mkdir -p "$config/hooks"
chmod 0755 "$config/hooks"
urls="[$(echo "$nats" | sed 's/ \+/, /g')]"
secret() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

# Writes FILE from stdin unless it exists.
keep_or_write() {
    if [ -s "$1" ]; then
        cat >/dev/null
    else
        cat >"$1"
        say "made $1"
    fi
}

# NATS: clients present nats-token; the servers' routes to each other a
# password of their own, known only to nats.conf. Without them anyone on
# the fleet network could read every event, or announce a host of its own
# and be sent the internal secret by the gateways.
if [ ! -s "$config/nats-token" ]; then
    secret >"$config/nats-token"
    say "made $config/nats-token"
fi
if [ ! -s "$config/nats.conf" ]; then
    token=$(cat "$config/nats-token")
    route_pw=$(secret)
    # Each server's routes listen on 6222 of the host its client URL names.
    routes=$(for u in $nats; do
        hp=${u#*://}
        printf '"nats://route:%s@%s:6222", ' "$route_pw" "${hp%:*}"
    done | sed 's/, $//')
    cat >"$config/nats.conf" <<EOF
# The fleet's NATS servers (each started with --name; made by
# scripts/fleet-init.sh). Secret: keep it 0600.
port: 4222
jetstream {
  store_dir: /data
}
authorization {
  token: "$token"
}
cluster {
  name: qvirt
  listen: 0.0.0.0:6222
  authorization {
    user: route
    password: "$route_pw"
  }
  routes: [$routes]
}
EOF
    say "made $config/nats.conf"
fi
grep -qF "token: \"$(cat "$config/nats-token")\"" "$config/nats.conf" ||
    say "warning: $config/nats.conf does not hold the token of $config/nats-token: clients will be refused (remove nats.conf to make it again)"

# Configs from before NATS asked for a token: add it to their nats: or
# fleet: section, after its urls.
add_nats_token() {
    [ -s "$1" ] && grep -q '^\(fleet\|nats\):' "$1" || return 0
    grep -q '^  token_file:' "$1" && return 0
    sed -i '/^\(fleet\|nats\):/,/^[^ ]/ s|^  urls: .*|&\n  token_file: /etc/qvirt/nats-token|' "$1"
    if grep -q '^  token_file:' "$1"; then
        say "added token_file to $1"
    else
        say "warning: $1 has no token_file and no '  urls: [...]' line to add it after: add it by hand"
    fi
}
add_nats_token "$config/gateway.yaml"
add_nats_token "$config/gateway-bus.yaml"
for h in $hosts; do
    add_nats_token "$config/$h/eventbus.yaml"
    add_nats_token "$config/$h/supervisor.yaml"
done

# The gateways' own config is deploy-init's token file plus the registry.
if ! grep -q '^fleet:' "$config/gateway.yaml"; then
    {
        echo "# Fleet mode: the hosts' supervisors and agent services from the"
        echo "# registry (the fleet bus beside each gateway is its --eventbus)."
        echo "fleet:"
        echo "  urls: $urls"
        echo "  token_file: /etc/qvirt/nats-token"
    } >>"$config/gateway.yaml"
    say "added the fleet section to $config/gateway.yaml"
fi

keep_or_write "$config/gateway-bus.yaml" <<EOF
# The fleet bus beside each gateway: it holds no events and serves every
# subscription from the stream.
listen: 0.0.0.0:50053
log_format: json
internal_token_file: /etc/qvirt/internal-token
fleet:
  urls: $urls
  token_file: /etc/qvirt/nats-token
EOF

for h in $hosts; do
    case "$h" in *[!A-Za-z0-9-]* | "" | -*) say "host id $h: use letters, digits and '-'"; exit 2 ;; esac
    mkdir -p "$config/$h"
    keep_or_write "$config/$h/eventbus.yaml" <<EOF
# $h's event bus: serves the host's supervisor and forwards every event
# to the fleet's stream (outbox in the state volume).
listen: 0.0.0.0:50053
log_format: json
internal_token_file: /etc/qvirt/internal-token
nats:
  urls: $urls
  token_file: /etc/qvirt/nats-token
  replicas: $replicas
  host: $h
  outbox_dir: /var/lib/qvirt/eventbus/outbox
EOF
    keep_or_write "$config/$h/hookexec.yaml" <<EOF
listen: 127.0.0.1:50054
log_format: json
hooks_dir: /etc/qvirt/hooks
internal_token_file: /etc/qvirt/internal-token
EOF
    # A host's agent service serves only holders of the internal secret:
    # an agentd.yaml from before it did would refuse the gateways.
    if [ -s "$config/$h/agentd.yaml" ] && ! grep -q '^internal_token_file:' "$config/$h/agentd.yaml"; then
        echo "internal_token_file: /etc/qvirt/internal-token" >>"$config/$h/agentd.yaml"
        say "added internal_token_file to $config/$h/agentd.yaml"
    fi
    keep_or_write "$config/$h/agentd.yaml" <<EOF
listen: 0.0.0.0:50055
log_format: json
supervisor: http://127.0.0.1:50052
internal_token_file: /etc/qvirt/internal-token
EOF
    keep_or_write "$config/$h/supervisor.yaml" <<EOF
# $h's supervisor: QEMU runs as its child in this container.
listen: 0.0.0.0:50052
log_format: json
node_name: $h
state_dir: /var/lib/qvirt
run_dir: /run/qvirt
image_roots: [/var/lib/qvirt-images]
eventbus: http://127.0.0.1:50053
hookexec: http://127.0.0.1:50054
agentd: http://127.0.0.1:50055
internal_token_file: /etc/qvirt/internal-token
# The fleet registry: this host's record (heartbeat every ttl/3) and its
# domains, mirrored for the gateways.
fleet:
  urls: $urls
  token_file: /etc/qvirt/nats-token
  replicas: $replicas
  supervisor_url: http://$h:50052
  agentd_url: http://$h:50055
  heartbeat_ttl_secs: 15
EOF
done
say "ready: docker-compose -f deploy/fleet/docker-compose.yml up -d"
