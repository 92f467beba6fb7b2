#!/usr/bin/env bash
# Starts the whole qvirt stack on loopback with default configs (the
# binaries `make build` just built), boots the demo guest, waits for its
# agent, prints how to talk to it (qvirtctl first, grpcurl second), and
# stops everything on Ctrl-C / SIGTERM.
#
# Environment (all optional):
#   QVIRT_BIN_DIR       the binaries (default target/release; never
#                       target/debug: `make run` builds release ones)
#   QVIRT_RUN_DIR       state, logs, tokens, sockets (default .run)
#   QVIRT_PORT_BASE     the gateway's port; the backends take the next
#                       four (default 50051: 50052-50055)
#   QVIRT_METRICS_PORT  the bus's /metrics port (default 9153)
#   QVIRT_DEMO          0: no demo guest (default 1)
#   QVIRT_DEMO_IMAGE    a directory holding the demo's vmlinux and
#                       initramfs (default: built into target/test-guest)
#   QVIRT_RUN_T0        when the user asked (ns since the epoch; `make run`
#                       sets it before its build check): the times printed
#                       count from it (default: this script's start)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
bin="${QVIRT_BIN_DIR:-$here/target/release}"
run_dir="${QVIRT_RUN_DIR:-$here/.run}"
base="${QVIRT_PORT_BASE:-50051}"
metrics_port="${QVIRT_METRICS_PORT:-9153}"
want_demo="${QVIRT_DEMO:-1}"
demo_image="${QVIRT_DEMO_IMAGE:-}"
t0="${QVIRT_RUN_T0:-$(date +%s%N)}"
case "$t0" in '' | *[!0-9]*) t0=$(date +%s%N) ;; esac
if [ -n "${QVIRT_RUN_T0:-}" ]; then since_what="\`make run\` began"; else since_what="run.sh began"; fi
# Seconds since t0, one decimal.
elapsed() {
    local ms=$((($(date +%s%N) - t0) / 1000000))
    printf '%d.%d s' $((ms / 1000)) $((ms % 1000 / 100))
}

gw_port=$base sup_port=$((base + 1)) bus_port=$((base + 2))
hook_port=$((base + 3)) agentd_port=$((base + 4))
gw_addr="127.0.0.1:$gw_port"

for b in qvirt-eventbus qvirt-hookexec qvirt-supervisor qvirt-agentd qvirt-gateway qvirtctl; do
    if [ ! -x "$bin/$b" ]; then
        echo "run.sh: no $bin/$b: build the binaries first (\`make build\` puts them in target/release)" >&2
        exit 1
    fi
done
mkdir -p "$run_dir"
run_dir=$(cd "$run_dir" && pwd)
# How paths are shown in the tour: relative to the checkout when inside it.
show() { case "$1" in "$here"/*) echo "${1#"$here"/}" ;; *) echo "$1" ;; esac; }
run_show=$(show "$run_dir")
bin_show=$(show "$bin")

# qvirtctl on the gateway's read-write unix socket: this script's own
# calls need no token.
ctl() { "$bin/qvirtctl" --connect "unix:$run_dir/gateway.sock" "$@"; }

mkdir -p "$run_dir/hooks"
# The supervisor's image root: QEMU runs as the unprivileged qvirt-qemu
# (when this runs as root) and opens kernel, initrd and disks by path, so
# they must be where that user can reach them; a checkout under /root is
# not. Removed on exit.
images=$(mktemp -d "${TMPDIR:-/tmp}/qvirt-images.XXXXXX")
chmod 0755 "$images"
# The internal plane's shared secret: every backend serves only callers
# that present it (the gateway, and the backends calling each other). A
# fresh random one per run, readable by this user only.
token="$run_dir/internal-token"
rm -f "$token"
(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$token")
services=(
    "qvirt-eventbus $bus_port --metrics-listen 127.0.0.1:$metrics_port --internal-token-file $token"
    "qvirt-hookexec $hook_port --hooks-dir $run_dir/hooks --internal-token-file $token"
    "qvirt-supervisor $sup_port --state-dir $run_dir/state --run-dir $run_dir/run --image-root $images --eventbus http://127.0.0.1:$bus_port --hookexec http://127.0.0.1:$hook_port --agentd http://127.0.0.1:$agentd_port --internal-token-file $token"
    "qvirt-agentd $agentd_port --supervisor http://127.0.0.1:$sup_port --internal-token-file $token"
    "qvirt-gateway $gw_port --config $run_dir/gateway.yaml"
)

# The gateway's development tokens, fresh each run: one read-write, one
# read-only. Its config holds only their hashes; the tokens are printed
# below and kept in the run dir (readable by this user only).
(
    umask 077
    "$bin/qvirt-gateway" token new --name dev-rw --role read-write 2>/dev/null >"$run_dir/token-rw.out"
    "$bin/qvirt-gateway" token new --name dev-ro --role read-only 2>/dev/null >"$run_dir/token-ro.out"
    {
        echo "# Written by scripts/run.sh: development only (plaintext on loopback)."
        echo "supervisor: http://127.0.0.1:$sup_port"
        echo "eventbus: http://127.0.0.1:$bus_port"
        echo "agentd: http://127.0.0.1:$agentd_port"
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
names=()
gateway_up=""
demo=""
stop() {
    trap - INT TERM EXIT
    echo
    if [ -n "$gateway_up" ]; then
        # Guests keep running when qvirt stops, as libvirt's do (the
        # supervisor re-attaches them when it starts again); the demo
        # guest goes with this script. Say which, and how to end them.
        local others=() n pid
        while IFS= read -r n; do
            [ -n "$n" ] && [ "$n" != demo ] && others+=("$n")
        done < <(ctl list --name 2>/dev/null || true)
        if [ ${#others[@]} -gt 0 ]; then
            echo "These guests keep running after qvirt stops (the supervisor re-attaches them at its next start):"
            for n in "${others[@]}"; do
                pid=$(ctl dominfo "$n" 2>/dev/null | sed -n 's/^PID: *//p')
                echo "  $n (QEMU pid ${pid:-?})"
            done
            echo "To destroy them: run \`make run\` again and \`qvirtctl destroy NAME\`, or now:"
            for n in "${others[@]}"; do
                pid=$(ctl dominfo "$n" 2>/dev/null | sed -n 's/^PID: *//p')
                [ -n "$pid" ] && echo "  kill $pid    # $n"
            done
        fi
        if [ -n "$demo" ]; then
            ctl destroy demo >/dev/null 2>&1 || true
        fi
    fi
    echo "stopping qvirt..."
    # In the reverse of the start order, each gone before the next is
    # asked: the gateway first (no new calls), then agentd, then the
    # supervisor, which runs its daemon shutdown hook through the hook
    # executor and publishes to the bus: those two stop after it.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        pid=${pids[i]}
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "${names[i]} did not stop in 10 s: killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    wait 2>/dev/null || true
    rm -rf "$images"
}
trap stop EXIT
trap 'stop; exit 0' INT TERM

# One at a time, each SERVING before the next starts: the supervisor runs
# its daemon `start` hook through the hook executor and publishes to the
# bus as it comes up, so those two are up first.
for entry in "${services[@]}"; do
    set -- $entry
    name=$1 port=$2
    shift 2
    # Own session: Ctrl-C reaches this script, which stops the services in
    # order, rather than every service at once. Logs go to files (no
    # colour codes: services colour only a terminal).
    setsid "$bin/$name" --listen "127.0.0.1:$port" "$@" 2>"$run_dir/$name.log" &
    pids+=("$!")
    names+=("$name")
    ok=""
    for _ in $(seq 300); do
        if "$bin/qvirtctl" --connect "http://127.0.0.1:$port" health >/dev/null 2>&1; then
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
gateway_up=1
stack_up=$(elapsed)

# The demo guest: a tiny Linux (Debian's kernel, a busybox initramfs) whose
# agent is the static qvirt-ga, booted under TCG with `agent: true`. The
# stack runs without it if it cannot be built.
demo_agent=""
start_demo() {
    local image="$demo_image" request since
    if [ -z "$image" ]; then
        image="$here/target/test-guest"
        echo "building the demo guest (the first time downloads ~70 MB of Debian packages)..."
        if ! make -s -C "$here" static-ga >"$run_dir/guest-build.log" 2>&1 ||
            ! bash "$here/scripts/build-test-guest.sh" "$image" \
                "$here/target/static/$(rustc -vV | sed -n 's/^host: //p')/release/qvirt-ga" \
                >>"$run_dir/guest-build.log" 2>&1; then
            echo "no demo guest: building it failed ($run_dir/guest-build.log):" >&2
            tail -n 3 "$run_dir/guest-build.log" >&2
            return 0
        fi
    fi
    install -m 0644 "$image/vmlinux" "$image/initramfs" "$images/"
    # JSON strings are YAML strings: paths with any characters stay intact.
    # The serial log goes in the domain's own dir, STATE_DIR/serial/demo/.
    python3 - "$images" "$run_dir" >"$run_dir/demo.yaml" <<'PY'
import json, sys
image, run = sys.argv[1], sys.argv[2]
q = json.dumps
print("\n".join([
    "name: demo", "memory_mib: 128", "vcpus: 1", "machine: q35", "accel: tcg",
    "kernel: " + q(image + "/vmlinux"), "initrd: " + q(image + "/initramfs"),
    "cmdline: " + q("console=ttyS0 panic=-1 mitigations=off tsc_early_khz=2600000 no_timer_check"),
    "agent: true", "serial_log: " + q(run + "/state/serial/demo/console.log"),
]))
PY
    if ! ctl define "$run_dir/demo.yaml" >"$run_dir/demo-define.log" 2>&1; then
        echo "no demo guest: $(cat "$run_dir/demo-define.log")" >&2
        return 0
    fi
    # From here on, stopping destroys it (also a demo left running by an
    # earlier run that was killed, which the supervisor re-attached).
    demo=1
    ctl destroy demo >/dev/null 2>&1 || true
    if ! ctl start demo >"$run_dir/demo-start.log" 2>&1; then
        echo "no demo guest: $(cat "$run_dir/demo-start.log")" >&2
        return 0
    fi
    # Until its agent answers (TCG: a few seconds).
    for _ in $(seq 240); do
        if ctl qemu-agent-command demo --timeout 2 '{"execute": "guest-ping"}' >/dev/null 2>&1; then
            demo_agent=$(elapsed)
            return 0
        fi
        sleep 0.25
    done
    echo "the demo guest's agent did not answer within 60 s (console: $run_show/state/serial/demo/console.log)" >&2
}
if [ "$want_demo" != 0 ]; then
    start_demo
fi

cat <<EOF
qvirt is running (logs in $run_show/):
  gateway     $gw_addr   the public endpoint; also unix sockets $run_show/gateway.sock (read-write)
                              and $run_show/gateway-ro.sock (read-only); audit log $run_show/audit.log
  supervisor  127.0.0.1:$sup_port   \\
  event bus   127.0.0.1:$bus_port    | backends: reach them through the gateway
  hook exec   127.0.0.1:$hook_port    | (hooks: executables in $run_show/hooks/qemu, $run_show/hooks/qemu.d/)
  agentd      127.0.0.1:$agentd_port   /
  bus metrics http://127.0.0.1:$metrics_port/metrics

Development tokens (plaintext on loopback: for development only; also in $run_show/token-rw, $run_show/token-ro):
  RW=$rw_token
  RO=$ro_token
EOF
if [ -n "$demo_agent" ]; then
    echo
    echo "The demo guest \"demo\" is running (TCG; console in $run_show/state/serial/demo/console.log);"
    echo "its agent (qvirt-ga) answered $demo_agent after $since_what (the services were serving at $stack_up)."
fi
cat <<EOF

With qvirtctl, virsh's commands through the gateway (qvirtctl --help):
  export PATH="\$PWD/$bin_show:\$PATH" QVIRT_URL=$gw_addr QVIRT_TOKEN_FILE=$run_show/token-rw
  qvirtctl list --all
  qvirtctl dominfo demo
  qvirtctl event --all --loop --timestamp      # lifecycle events, until Ctrl-C
  qvirtctl qemu-monitor-event --domain demo --event '^(stop|resume)\$' --regex --no-case --loop
  qvirtctl suspend demo; qvirtctl resume demo  # (from another terminal: STOP, RESUME above)
  qvirtctl qemu-monitor-command demo --pretty '{"execute": "query-status"}'
  qvirtctl guest-exec demo -- uname -a
  qvirtctl guestinfo demo --os --hostname
  QVIRT_TOKEN_FILE=$run_show/token-ro qvirtctl qemu-monitor-event --loop   # refused: read-only
  qvirtctl define guest.yaml && qvirtctl start guest                   # your own (README.md)

With grpcurl ($(show "$here/.tools/bin/grpcurl"); the gateway serves reflection):
  G=$(show "$here/.tools/bin/grpcurl") RW=\$(cat $run_show/token-rw) RO=\$(cat $run_show/token-ro)
  \$G -plaintext $gw_addr list
  \$G -plaintext -H "authorization: Bearer \$RO" $gw_addr qvirt.v1.Supervisor/ListDomains
  \$G -plaintext -H "authorization: Bearer \$RO" -d '{"domain": "demo"}' $gw_addr qvirt.v1.Supervisor/GetDomain
  \$G -plaintext -H "authorization: Bearer \$RW" -d '{"domain": "demo", "event": "^(stop|resume)\$",
      "flags": ["MONITOR_EVENT_FILTER_FLAG_REGEX", "MONITOR_EVENT_FILTER_FLAG_NOCASE"]}' \\
      $gw_addr qvirt.v1.EventBus/SubscribeMonitorEvents
  \$G -plaintext -H "authorization: Bearer \$RW" -d '{"domain": "demo", "command_json": "{\\"execute\\": \\"query-status\\"}"}' \\
      $gw_addr qvirt.v1.Supervisor/MonitorCommand
  \$G -plaintext -H "authorization: Bearer \$RW" -d '{"domain": "demo", "path": "uname", "args": ["-a"], "capture_output": true, "wait": true}' \\
      $gw_addr qvirt.v1.GuestAgent/Exec
  \$G -plaintext -H "authorization: Bearer \$RO" -d '{}' $gw_addr qvirt.v1.EventBus/SubscribeMonitorEvents   # PERMISSION_DENIED

Press Ctrl-C to stop.
EOF

# Runs until a signal, or until any service dies.
wait -n "${pids[@]}" || true
echo "a qvirt service exited; see the logs in $run_show/" >&2
exit 1
