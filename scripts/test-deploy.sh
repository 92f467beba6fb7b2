#!/usr/bin/env bash
# `make test-deploy`: the docker-compose deployment, for real. Builds the
# images (`make images`), brings deploy/docker-compose.yml up under a
# project name of its own, waits until every container is healthy, and
# then, through the published gateway port only, with qvirtctl:
#   - defines and boots the test guest (Debian kernel, busybox, qvirt-ga);
#   - its agent answers guest-ping;
#   - monitor events stream on the read-write token and are refused
#     (PERMISSION_DENIED) on the read-only one;
#   - `docker-compose restart supervisor`: the guest's QEMU is the same
#     process (pid and start time in the vmm container unchanged), the
#     domain is running, its agent answers, monitor events still flow and
#     the new supervisor controls it (suspend, resume, destroy);
#   - `docker-compose down -v` leaves no container, network or volume of
#     the project behind.
# Without a Docker engine it prints SKIPPED and why, and exits 0. Whatever
# happens, the project's containers, networks and volumes are removed.
#
# Environment: QVIRT_BINARIES, QVIRT_SKIP_BUILD (see scripts/images.sh);
# `make test` runs this with QVIRT_BINARIES=debug: the deployment tested
# with the binaries the rest of `make test` built and tested, with no
# second (release) build.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
NAME=test-deploy
# shellcheck source=scripts/compose-test-lib.sh
. "$here/scripts/compose-test-lib.sh"
require_docker

t0=$(date +%s)

triple=$(rustc -vV | sed -n 's/^host: //p')
static="$here/target/static/$triple/release"
# The host's qvirtctl: from the same build as the images.
case "${QVIRT_BINARIES:-release}" in
debug) bin="$here/target/debug" ;;
*) bin="$static" ;;
esac

# --- images and the test guest -------------------------------------------------
step=images
bash scripts/images.sh >/dev/null
t_images=$(($(date +%s) - t0))
make -s static-ga >/dev/null
guest_out="$here/target/test-guest"
rc=0
bash scripts/build-test-guest.sh "$guest_out" "$static/qvirt-ga" >/dev/null || rc=$?
[ "$rc" -eq 77 ] && skip "the test guest cannot be built here (its Debian packages cannot be fetched)"
[ "$rc" -eq 0 ] || fail "building the test guest"

# --- a deployment of its own --------------------------------------------------
compose_project qvirt-deploy "$here/deploy/docker-compose.yml"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$work/hooks"
chmod 0755 "$work"
# The host files as a user makes them (internal secret, tokens, dirs).
bash scripts/deploy-init.sh "$work/config" "$work/images" 2>"$work/init.log" ||
    fail "deploy-init: $(cat "$work/init.log")"
install -m 0644 "$guest_out/vmlinux" "$guest_out/initramfs" "$work/images/"
# The containers read these as root; the files stay private on the host.
export QVIRT_CONFIG_DIR="$work/config" QVIRT_HOOKS_DIR="$work/hooks" QVIRT_IMAGES_DIR="$work/images"
export QVIRT_GATEWAY_PUBLISH="127.0.0.1:$port"
ctl() { "$bin/qvirtctl" --connect "http://127.0.0.1:$port" --token-file "$work/config/token-rw" "$@"; }
ctl_ro() { "$bin/qvirtctl" --connect "http://127.0.0.1:$port" --token-file "$work/config/token-ro" "$@"; }

step="docker-compose up"
t_up0=$(date +%s)
compose up -d >"$work/up.log" 2>&1 || fail "docker-compose up: $(tail -n 5 "$work/up.log")"
all_healthy() {
    local ids id status n=0
    ids=$(compose ps -q)
    for id in $ids; do
        status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id")
        [ "$status" = healthy ] || { echo "$id: $status"; return 1; }
        n=$((n + 1))
    done
    [ "$n" -eq 6 ] || { echo "$n containers"; return 1; }
}
deadline 240 "all six containers healthy" all_healthy
t_up=$(($(date +%s) - t_up0))
ok "docker-compose up: 6 containers healthy in ${t_up}s"

# Only the gateway publishes a port.
published=$(for id in $(compose ps -q); do docker port "$id"; done | sort -u)
[ "$published" = "50051/tcp -> 127.0.0.1:$port" ] || fail "published ports: $published"
ok "only the gateway is published ($published)"

# --- the guest --------------------------------------------------------------------
step="guest boot"
cat >"$work/guest.yaml" <<EOF
name: deploy-guest
memory_mib: 128
vcpus: 1
machine: q35
accel: tcg
kernel: /var/lib/qvirt-images/vmlinux
initrd: /var/lib/qvirt-images/initramfs
cmdline: "console=ttyS0 panic=-1 mitigations=off tsc_early_khz=2600000 no_timer_check"
agent: true
EOF
ctl define "$work/guest.yaml" >/dev/null || fail "define"
ctl start deploy-guest >/dev/null || fail "start"
t_boot0=$(date +%s)
ping_agent() { ctl qemu-agent-command deploy-guest '{"execute":"guest-ping"}'; }
deadline 180 "the guest's agent answering guest-ping" ping_agent
ok "guest booted; its agent answered after $(($(date +%s) - t_boot0))s"

qemu_pid=$(ctl dominfo deploy-guest | sed -n 's/^PID: *//p')
[ -n "$qemu_pid" ] || fail "no PID in dominfo"
vmm=$(compose ps -q vmm)
# QEMU's start time (stat field 22) as the vmm container sees it.
start_time() { docker exec "$vmm" sh -c "sed 's/.*) //' /proc/$qemu_pid/stat | cut -d' ' -f20"; }
started=$(start_time)
cmd=$(docker exec "$vmm" cat "/proc/$qemu_pid/cmdline" | tr '\0' ' ')
case "$cmd" in *qemu-system-x86_64*deploy-guest*) ;; *) fail "pid $qemu_pid in vmm is not the guest's QEMU: $cmd" ;; esac
# Its parent (stat field 4) is the launcher, pid 1 of the vmm container,
# not the supervisor (whose container shares that pid namespace).
parent=$(docker exec "$vmm" sh -c "sed 's/.*) //' /proc/$qemu_pid/stat | cut -d' ' -f2")
[ "$parent" = 1 ] || fail "QEMU's parent is pid $parent, not the launcher (pid 1 of vmm)"
ok "QEMU (pid $qemu_pid) is the launcher's child in the vmm container"

# Monitor events: read-write streams them, read-only is refused.
step="monitor events"
events_flow() {
    local out="$work/events.$1"
    ctl qemu-monitor-event --domain deploy-guest --loop --timeout 60 --json >"$out" 2>&1 &
    local listener=$!
    # Until the subscription is in place: poll with a suspend/resume pair
    # until both events were seen (each round is harmless to the guest).
    local end=$(($(date +%s) + 60)) seen=""
    while [ "$(date +%s)" -lt "$end" ]; do
        ctl suspend deploy-guest >/dev/null && ctl resume deploy-guest >/dev/null || true
        if grep -q '"STOP"' "$out" && grep -q '"RESUME"' "$out"; then seen=1; break; fi
        sleep 1
    done
    kill "$listener" 2>/dev/null || true
    wait "$listener" 2>/dev/null || true
    [ -n "$seen" ] || { cat "$out" >&2; return 1; }
}
events_flow before || fail "STOP and RESUME monitor events on the read-write token"
ok "monitor events stream on the read-write token"
rc=0
ctl_ro qemu-monitor-event --domain deploy-guest --timeout 5 >"$work/ro-events.out" 2>&1 || rc=$?
[ "$rc" -ne 0 ] && grep -q PERMISSION_DENIED "$work/ro-events.out" ||
    fail "read-only monitor events not refused: rc=$rc $(cat "$work/ro-events.out")"
ok "monitor events refused on the read-only token (PERMISSION_DENIED)"

# --- restart the supervisor's container -----------------------------------------
step="supervisor restart"
sup=$(compose ps -q supervisor)
before=$(docker inspect -f '{{.State.StartedAt}}' "$sup")
t_restart0=$(date +%s)
compose restart supervisor >"$work/restart.log" 2>&1 || fail "docker-compose restart supervisor: $(cat "$work/restart.log")"
after=$(docker inspect -f '{{.State.StartedAt}}' "$sup")
[ "$before" != "$after" ] || fail "the supervisor container did not restart"
deadline 120 "all containers healthy after the restart" all_healthy
running() { [ "$(ctl domstate deploy-guest)" = running ] || { ctl domstate deploy-guest; return 1; }; }
deadline 60 "the domain running after the restart" running
ok "supervisor container restarted (${before} -> ${after}); stack healthy in $(($(date +%s) - t_restart0))s"

[ "$(ctl dominfo deploy-guest | sed -n 's/^PID: *//p')" = "$qemu_pid" ] || fail "the domain's pid changed"
[ "$(start_time)" = "$started" ] || fail "QEMU pid $qemu_pid is not the same process (start time changed)"
ok "the guest's QEMU is the same process (pid $qemu_pid, start time $started)"
deadline 60 "the agent answering after the restart" ping_agent
ok "the guest's agent answers after the restart"
events_flow after || fail "monitor events after the restart"
ok "monitor events still flow and the guest is controllable (suspend/resume)"

ctl destroy deploy-guest >/dev/null || fail "destroy"
gone() { ! docker exec "$vmm" test -e "/proc/$qemu_pid/cmdline" || ! docker exec "$vmm" grep -q deploy-guest "/proc/$qemu_pid/cmdline"; }
deadline 30 "QEMU gone after destroy" gone
ctl undefine deploy-guest >/dev/null || fail "undefine"
ok "destroyed and undefined by the new supervisor"

# --- down -v ------------------------------------------------------------------------
compose_down_leaves_nothing

say "timings: images ${t_images}s (${QVIRT_BINARIES:-release} binaries, incl. their build), whole run $(($(date +%s) - t0))s"
echo "test-deploy: $passed passed, 0 failed"
