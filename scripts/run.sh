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
services=(
    "qvirt-eventbus 50053 --metrics-listen 127.0.0.1:9153"
    "qvirt-hookexec 50054 --hooks-dir $run_dir/hooks"
    "qvirt-supervisor 50052 --state-dir $run_dir/state --run-dir $run_dir/run --eventbus http://127.0.0.1:50053 --hookexec http://127.0.0.1:50054 --agentd http://127.0.0.1:50055"
    "qvirt-agentd 50055 --supervisor http://127.0.0.1:50052"
    "qvirt-gateway 50051"
)

pids=()
stop() {
    trap - INT TERM EXIT
    echo
    echo "stopping qvirt..."
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
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

cat <<'EOF2'
qvirt is running (logs in .run/):
  gateway     127.0.0.1:50051   (the public endpoint)
  supervisor  127.0.0.1:50052
  event bus   127.0.0.1:50053
  hook exec   127.0.0.1:50054   (hooks: executables in .run/hooks/qemu, .run/hooks/qemu.d/)
  agentd      127.0.0.1:50055
  bus metrics http://127.0.0.1:9153/metrics

Talk to it with grpcurl (installed in .tools/bin by make deps):
  .tools/bin/grpcurl -plaintext 127.0.0.1:50051 list
  .tools/bin/grpcurl -plaintext 127.0.0.1:50052 describe qvirt.v1.Supervisor
  .tools/bin/grpcurl -plaintext 127.0.0.1:50051 grpc.health.v1.Health/Check
  .tools/bin/grpcurl -plaintext -d '{"spec_yaml": "name: demo\naccel: tcg\n"}' \
      127.0.0.1:50052 qvirt.v1.Supervisor/DefineDomain
  .tools/bin/grpcurl -plaintext -d '{"domain": "demo"}' 127.0.0.1:50052 qvirt.v1.Supervisor/StartDomain
  .tools/bin/grpcurl -plaintext -d '{}' 127.0.0.1:50053 qvirt.v1.EventBus/SubscribeMonitorEvents

Press Ctrl-C to stop.
EOF2

# Runs until a signal, or until any service dies.
wait -n "${pids[@]}" || true
echo "a qvirt service exited; see the logs in .run/" >&2
exit 1
