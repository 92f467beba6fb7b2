#!/usr/bin/env bash
# Starts the whole qvirt stack on loopback with default configs (the
# binaries from `make build`), waits until every service reports SERVING,
# prints how to talk to it, and stops everything on Ctrl-C / SIGTERM.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
bin="${QVIRT_BIN_DIR:-$here/target/release}"
run_dir="$here/.run"
grpcurl="$here/.tools/bin/grpcurl"
mkdir -p "$run_dir"

# binary, port, extra flags (the supervisor publishes to the bus, runs its
# hooks through the hook executor, shuts guests down through agentd when
# asked to use the agent, and keeps its state under .run/; the hooks
# directory is .run/hooks; agentd finds agent sockets through the
# supervisor)
mkdir -p "$run_dir/hooks"
# The supervisor's image root: QEMU runs as the unprivileged qvirt-qemu
# (when this runs as root) and opens kernel, initrd and disks by path, so
# they must be where that user can reach them; a checkout under /root is
# not. Removed on exit.
images=$(mktemp -d "${TMPDIR:-/tmp}/qvirt-images.XXXXXX")
chmod 0755 "$images"
# The internal plane's shared secret (EventIngest, the hook executor): a fresh
# random one per run, readable by this user only.
token="$run_dir/internal-token"
rm -f "$token"
(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$token")
services=(
    "qvirt-eventbus 50053 --metrics-listen 127.0.0.1:9153 --internal-token-file $token"
    "qvirt-hookexec 50054 --hooks-dir $run_dir/hooks --internal-token-file $token"
    "qvirt-supervisor 50052 --state-dir $run_dir/state --run-dir $run_dir/run --image-root $images --eventbus http://127.0.0.1:50053 --hookexec http://127.0.0.1:50054 --agentd http://127.0.0.1:50055 --internal-token-file $token"
    "qvirt-agentd 50055 --supervisor http://127.0.0.1:50052"
    "qvirt-gateway 50051 --config $run_dir/gateway.yaml"
)

# The gateway's development tokens, fresh each run: one read-write, one
# read-only. Its config holds only their hashes; the tokens are printed
# below and kept in .run/ (readable by this user only).
(
    umask 077
    "$bin/qvirt-gateway" token new --name dev-rw --role read-write 2>/dev/null >"$run_dir/token-rw.out"
    "$bin/qvirt-gateway" token new --name dev-ro --role read-only 2>/dev/null >"$run_dir/token-ro.out"
    {
        echo "# Written by scripts/run.sh: development only (plaintext on loopback)."
        echo "supervisor: http://127.0.0.1:50052"
        echo "eventbus: http://127.0.0.1:50053"
        echo "agentd: http://127.0.0.1:50055"
        echo "internal_token_file: '$token'"
        echo "audit_file: '$run_dir/audit.log'"
        echo "rw_socket: {path: '$run_dir/gateway.sock'}"
        echo "ro_socket: {path: '$run_dir/gateway-ro.sock'}"
        echo "tokens:"
        tail -n +2 "$run_dir/token-rw.out"
        tail -n +2 "$run_dir/token-ro.out"
    } >"$run_dir/gateway.yaml"
    head -n 1 "$run_dir/token-rw.out" >"$run_dir/token-rw"
    head -n 1 "$run_dir/token-ro.out" >"$run_dir/token-ro"
    rm -f "$run_dir/token-rw.out" "$run_dir/token-ro.out"
)
rw_token=$(cat "$run_dir/token-rw")
ro_token=$(cat "$run_dir/token-ro")

pids=()
demo=""
demo_started=""
stop() {
    trap - INT TERM EXIT
    echo
    echo "stopping qvirt..."
    # The supervisor leaves guests running when it stops (it re-attaches
    # on its next start); the demo guest goes with this script.
    if [ -n "$demo" ]; then
        "$grpcurl" -plaintext -max-time 10 -d '{"domain": "demo"}' \
            127.0.0.1:50052 qvirt.v1.Supervisor/DestroyDomain >/dev/null 2>&1 || true
    fi
    # In the reverse of the start order, each gone before the next is
    # asked: the supervisor runs its daemon shutdown hook through the hook
    # executor and publishes to the bus, so those two stop after it.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        pid=${pids[i]}
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$images"
}
trap stop EXIT
trap 'stop; exit 0' INT TERM

for entry in "${services[@]}"; do
    set -- $entry
    name=$1 port=$2
    shift 2
    # Own session: Ctrl-C reaches this script, which stops the services in
    # order, rather than every service at once.
    setsid "$bin/$name" --listen "127.0.0.1:$port" "$@" 2>"$run_dir/$name.log" &
    pids+=("$!")
done

for entry in "${services[@]}"; do
    set -- $entry
    name=$1 port=$2
    ok=""
    for _ in $(seq 150); do
        if "$grpcurl" -plaintext -max-time 1 "127.0.0.1:$port" grpc.health.v1.Health/Check 2>/dev/null \
            | grep -q SERVING; then
            ok=1
            break
        fi
        sleep 0.1
    done
    if [ -z "$ok" ]; then
        echo "$name did not come up on 127.0.0.1:$port; its log ($run_dir/$name.log):" >&2
        tail -n 20 "$run_dir/$name.log" >&2
        exit 1
    fi
done

# The demo guest: a tiny Linux (Debian's kernel, a busybox initramfs) whose
# agent is the static qvirt-ga, booted under TCG with `agent: true`. The
# stack runs without it if it cannot be built.
start_demo() {
    local image="$here/target/test-guest" ga request
    echo "building the demo guest (the first time downloads ~70 MB of Debian packages)..."
    if ! make -s -C "$here" static-ga >"$run_dir/guest-build.log" 2>&1 ||
        ! bash "$here/scripts/build-test-guest.sh" "$image" \
            "$here/target/static/$(rustc -vV | sed -n 's/^host: //p')/release/qvirt-ga" \
            >>"$run_dir/guest-build.log" 2>&1; then
        echo "no demo guest: building it failed ($run_dir/guest-build.log):" >&2
        tail -n 3 "$run_dir/guest-build.log" >&2
        return 0
    fi
    install -m 0644 "$image/vmlinux" "$image/initramfs" "$images/"
    # JSON strings are YAML strings: paths with any characters stay intact.
    # The serial log goes in the domain's own dir, STATE_DIR/serial/demo/.
    request=$(python3 - "$images" "$run_dir" <<'PY'
import json, sys
image, run = sys.argv[1], sys.argv[2]
q = json.dumps
spec = "\n".join([
    "name: demo", "memory_mib: 128", "vcpus: 1", "machine: q35", "accel: tcg",
    "kernel: " + q(image + "/vmlinux"), "initrd: " + q(image + "/initramfs"),
    "cmdline: " + q("console=ttyS0 panic=-1 mitigations=off tsc_early_khz=2600000 no_timer_check"),
    "agent: true", "serial_log: " + q(run + "/state/serial/demo/console.log"), "",
])
print(json.dumps({"spec_yaml": spec, "allow_update": True}))
PY
)
    if ! "$grpcurl" -plaintext -max-time 10 -d "$request" 127.0.0.1:50052 \
        qvirt.v1.Supervisor/DefineDomain >"$run_dir/demo-define.log" 2>&1; then
        echo "no demo guest: DefineDomain failed ($run_dir/demo-define.log)" >&2
        return 0
    fi
    # From here on, stopping destroys it (also a demo left running by an
    # earlier run that was killed, which the supervisor re-attached).
    demo=1
    "$grpcurl" -plaintext -max-time 10 -d '{"domain": "demo"}' 127.0.0.1:50052 \
        qvirt.v1.Supervisor/DestroyDomain >/dev/null 2>&1 || true
    if "$grpcurl" -plaintext -max-time 60 -d '{"domain": "demo"}' 127.0.0.1:50052 \
        qvirt.v1.Supervisor/StartDomain >"$run_dir/demo-start.log" 2>&1; then
        demo_started=1
    else
        echo "no demo guest: StartDomain failed ($run_dir/demo-start.log)" >&2
    fi
}
start_demo

cat <<EOF2
qvirt is running (logs in .run/):
  gateway     127.0.0.1:50051   (the public endpoint; also unix sockets .run/gateway.sock, read-write,
                                 and .run/gateway-ro.sock, read-only; audit log .run/audit.log)
  supervisor  127.0.0.1:50052   \
  event bus   127.0.0.1:50053    | backends: reach them through the gateway
  hook exec   127.0.0.1:50054    | (hooks: executables in .run/hooks/qemu, .run/hooks/qemu.d/)
  agentd      127.0.0.1:50055   /
  bus metrics http://127.0.0.1:9153/metrics

Development tokens (plaintext on loopback: for development only; also in .run/token-rw, .run/token-ro):
  RW=$rw_token
  RO=$ro_token

Talk to it through the gateway with grpcurl (installed in .tools/bin by make deps):
  G=.tools/bin/grpcurl RW=\$(cat .run/token-rw) RO=\$(cat .run/token-ro)
  \$G -plaintext 127.0.0.1:50051 list
  \$G -plaintext 127.0.0.1:50051 describe qvirt.v1.Supervisor
  \$G -plaintext 127.0.0.1:50051 grpc.health.v1.Health/Check
  \$G -plaintext -H "authorization: Bearer \$RO" 127.0.0.1:50051 qvirt.v1.Supervisor/ListDomains
  \$G -plaintext -H "authorization: Bearer \$RW" -d '{"spec_yaml": "name: vm1\\naccel: tcg\\n"}' \\
      127.0.0.1:50051 qvirt.v1.Supervisor/DefineDomain
  \$G -plaintext -H "authorization: Bearer \$RW" -d '{"domain": "vm1"}' 127.0.0.1:50051 qvirt.v1.Supervisor/StartDomain
  \$G -plaintext -H "authorization: Bearer \$RO" -d '{}' 127.0.0.1:50051 qvirt.v1.EventBus/SubscribeDomainEvents
  \$G -plaintext -H "authorization: Bearer \$RW" -d '{}' 127.0.0.1:50051 qvirt.v1.EventBus/SubscribeMonitorEvents
  (the read-only token gets PERMISSION_DENIED for StartDomain and SubscribeMonitorEvents)
  \$G -plaintext -unix -authority localhost .run/gateway-ro.sock qvirt.v1.Supervisor/ListDomains
EOF2
if [ -n "$demo_started" ]; then
    cat <<'EOF2'

The demo guest "demo" is booting (TCG, ~3 s to its agent; console in
.run/state/serial/demo/console.log); its agent is qvirt-ga, reached through agentd:
  $G -plaintext -H "authorization: Bearer $RO" -d '{"domain": "demo"}' 127.0.0.1:50051 qvirt.v1.Supervisor/GetDomain
  $G -plaintext -H "authorization: Bearer $RO" -d '{"domain": "demo"}' 127.0.0.1:50051 qvirt.v1.GuestAgent/GetOsInfo
  $G -plaintext -H "authorization: Bearer $RW" -d '{"domain": "demo", "path": "/bin/busybox", "args": ["uname", "-a"], "capture_output": true, "wait": true}' \
      127.0.0.1:50051 qvirt.v1.GuestAgent/Exec
  $G -plaintext -H "authorization: Bearer $RW" -d '{"domain": "demo", "mode": "SHUTDOWN_MODE_AGENT", "timeout": "30s"}' \
      127.0.0.1:50051 qvirt.v1.Supervisor/ShutdownDomain
EOF2
fi
echo
echo "Press Ctrl-C to stop."

# Runs until a signal, or until any service dies.
wait -n "${pids[@]}" || true
echo "a qvirt service exited; see the logs in .run/" >&2
exit 1
