#!/usr/bin/env bash
# `make test-fleet`: the fleet deployment, deploy/fleet/docker-compose.yml,
# for real: 3 NATS servers (a JetStream cluster, R3), 3 qvirt hosts (QEMU
# under TCG, the test guest), 2 gateways. Builds the images (`make
# images`) and the test guest, brings the fleet up under a project name
# of its own with each gateway on a free loopback port, waits until every
# container is healthy, then runs the scenarios of
# integration-tests/tests/fleet_deploy.rs one after the other against that
# one project, in this order (each asserts what a client sees through the
# gateways, and leaves the fleet whole for the next):
#   s1  six guests defined without a host spread over the three hosts;
#       both gateways list them with their hosts; started, each guest's
#       agent answers through a gateway;
#   s2  guests on every host suspended and resumed under a monitor-event
#       (REGEX, read-write token) and a domain-event (read-only token)
#       subscriber per gateway: every event once, with its host;
#   s3  a NATS server (the stream's leader) killed during a burst of
#       10,000 events: each gateway's subscriber gets every event once,
#       in each host's order;
#   s5  a gateway killed under a streaming client: it resumes at the
#       other gateway with its cursor, no gap, no duplicate;
#   s4  a host cut off the network for 20 s while its guests change
#       state: unreachable within the heartbeat TTL (listing, host event),
#       then the events of the cut, once, in order, and current domains;
#   s6  a host's container killed: its domains stale, the others' guests
#       unaffected; started again, the fleet list is current.
# Then `docker-compose down -v` must leave nothing of the project.
# Without a Docker engine it prints SKIPPED and why, and exits 0. Whatever
# happens, the project's containers, networks and volumes are removed.
#
# Environment: QVIRT_BINARIES, QVIRT_SKIP_BUILD (see scripts/images.sh);
# `make test` runs this with QVIRT_BINARIES=debug after test-deploy,
# sharing its images and caches. QVIRT_FLEET_SCENARIOS: which scenarios
# (default: all that run today, in order).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
NAME=test-fleet
# shellcheck source=scripts/compose-test-lib.sh
. "$here/scripts/compose-test-lib.sh"
require_docker

# The scenarios, in the order they run: the guests of s1 serve s2, s4 and
# s6; the damage comes last, the worst (a host's guests lost) at the end.
scenarios=${QVIRT_FLEET_SCENARIOS:-s1 s2 s3 s5 s4 s6}

t0=$(date +%s)

# --- images, the test guest, the scenario driver -------------------------------
step=images
bash scripts/images.sh >/dev/null
t_images=$(($(date +%s) - t0))
make -s static-ga >/dev/null
triple=$(rustc -vV | sed -n 's/^host: //p')
guest_out="$here/target/test-guest"
rc=0
bash scripts/build-test-guest.sh "$guest_out" "$here/target/static/$triple/release/qvirt-ga" >/dev/null || rc=$?
[ "$rc" -eq 77 ] && skip "the test guest cannot be built here (its Debian packages cannot be fetched)"
[ "$rc" -eq 0 ] || fail "building the test guest"
step="building the scenario driver"
# One scenario: nextest (its default run leaves this binary out), or
# cargo test where nextest is missing (the tests are #[ignore]d there).
if cargo nextest --version >/dev/null 2>&1; then
    driver_build=(cargo nextest run --locked -p qvirt-integration-tests --test fleet_deploy --no-run)
    scenario() {
        cargo nextest run --locked -p qvirt-integration-tests --test fleet_deploy \
            --ignore-default-filter --run-ignored only --test-threads 1 \
            --success-output immediate -E "test(/^test_${1}_/)"
    }
else
    driver_build=(cargo test --locked -p qvirt-integration-tests --test fleet_deploy --no-run)
    scenario() {
        cargo test --locked -p qvirt-integration-tests --test fleet_deploy -- \
            --ignored --nocapture --test-threads 1 "test_${1}_"
    }
fi
"${driver_build[@]}" >/dev/null 2>&1 || "${driver_build[@]}" || fail "building fleet_deploy"

# --- a fleet of its own ----------------------------------------------------------
compose_project qvirt-fleet "$here/deploy/fleet/docker-compose.yml"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
gw1_port=$(free_port)
gw2_port=$(free_port)
chmod 0755 "$work"
bash scripts/fleet-init.sh "$work/config" "$work/images" 2>"$work/init.log" ||
    fail "fleet-init: $(cat "$work/init.log")"
install -m 0644 "$guest_out/vmlinux" "$guest_out/initramfs" "$work/images/"
export QVIRT_CONFIG_DIR="$work/config" QVIRT_IMAGES_DIR="$work/images"
export QVIRT_GW1_PUBLISH="127.0.0.1:$gw1_port" QVIRT_GW2_PUBLISH="127.0.0.1:$gw2_port"

step="docker-compose up"
t_up0=$(date +%s)
compose up -d >"$work/up.log" 2>&1 || fail "docker-compose up: $(tail -n 5 "$work/up.log")"
services=10
all_healthy() {
    local ids id status n=0
    ids=$(compose ps -q)
    for id in $ids; do
        status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id")
        case "$status" in healthy | running) ;; *) echo "$id: $status"; return 1 ;; esac
        n=$((n + 1))
    done
    [ "$n" -eq "$services" ] || { echo "$n containers"; return 1; }
}
deadline 300 "all $services containers healthy" all_healthy
ok "docker-compose up: $services containers healthy in $(($(date +%s) - t_up0))s"

published=$(for id in $(compose ps -q); do docker port "$id"; done | sort -u | tr '\n' ' ')
want=$(printf '50051/tcp -> 127.0.0.1:%s\n' "$gw1_port" "$gw2_port" | sort -u | tr '\n' ' ')
[ "$published" = "$want" ] || fail "published ports: $published (want $want)"
ok "only the two gateways are published ($published)"

# --- the scenarios ------------------------------------------------------------------
export QVIRT_FLEET_PROJECT="$project" QVIRT_FLEET_CONFIG="$work/config"
export QVIRT_FLEET_GW1="http://127.0.0.1:$gw1_port" QVIRT_FLEET_GW2="http://127.0.0.1:$gw2_port"
export QVIRT_FLEET_IMAGES=/var/lib/qvirt-images
for s in $scenarios; do
    step="scenario $s"
    t_s=$(date +%s)
    scenario "$s" >"$work/$s.log" 2>&1 || {
        sed 's/^/  /' "$work/$s.log" | tail -n 60 >&2
        fail "scenario $s"
    }
    # Exactly one test ran and passed (a filter matching none passes too).
    grep -q ' 1 passed' "$work/$s.log" || {
        cat "$work/$s.log" >&2
        fail "scenario $s ran no test"
    }
    # What the scenario noted on the way (what it killed, when).
    sed -n 's/.*fleet-note: /  /p' "$work/$s.log" >&2
    ok "scenario $s: $(grep -m1 -o "test_${s}_[a-z0-9_]*" "$work/$s.log") in $(($(date +%s) - t_s))s"
done

# --- down -v ------------------------------------------------------------------------
compose_down_leaves_nothing

say "timings: images ${t_images}s (${QVIRT_BINARIES:-release} binaries), whole run $(($(date +%s) - t0))s"
echo "test-fleet: $passed passed, 0 failed"
