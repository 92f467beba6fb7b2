# Sourced by scripts/test-deploy.sh and scripts/test-fleet.sh: their
# messages, bounded waits and a compose project of their own. Set NAME
# (the prefix of every line they print) before sourcing.
#
#   say MSG          a line on stderr
#   skip WHY         "NAME: SKIPPED: WHY" and exit 0
#   require_docker   skip unless a Docker engine and docker-compose answer
#   ok MSG / fail MSG   count a passed check / stop with a failed one
#   deadline SECS WHAT CMD...   run CMD until it succeeds, at most SECS
#   compose_project PREFIX FILE   a temp dir ($work) and a project name
#                    ($project) of its own; `compose ARGS` runs
#                    docker-compose on it; on exit everything carrying the
#                    project's label is removed, with the services' last
#                    log lines when a step ($step) failed
#   compose_down_leaves_nothing   `down -v`, then a check (counted) that
#                    no container, network or volume of the project is left
# shellcheck shell=bash

say() { printf '%s: %s\n' "$NAME" "$*" >&2; }
skip() { echo "$NAME: SKIPPED: $*"; exit 0; }

require_docker() {
    command -v docker >/dev/null 2>&1 || skip "no docker client on PATH"
    docker info >/dev/null 2>&1 || skip "no Docker engine answers (docker info failed)"
    command -v docker-compose >/dev/null 2>&1 || skip "docker-compose is missing (make deps installs it)"
}

passed=0 step=""
ok() { passed=$((passed + 1)); say "ok: $*"; }
fail() {
    say "FAILED: $*"
    exit 1
}

# A command with a bound (seconds), its output kept for the error.
deadline() {
    local secs=$1 what=$2
    shift 2
    local end=$(($(date +%s) + secs))
    until "$@" >"$work/last.out" 2>&1; do
        [ "$(date +%s)" -lt "$end" ] || fail "$what within ${secs}s: $(tail -n 5 "$work/last.out")"
        sleep 1
    done
}

compose_project() {
    work=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
    project="${1//-/}$$$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
    compose_file=$2
    trap compose_cleanup EXIT
    trap 'exit 130' INT TERM
}

compose() { docker-compose -p "$project" -f "$compose_file" "$@"; }

compose_cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "$rc" -ne 0 ] && [ -n "$step" ]; then
        say "failed during: $step; the services' last log lines:"
        compose logs --no-color --tail 15 2>&1 | sed 's/^/  /' >&2 || true
    fi
    compose down -v --remove-orphans --timeout 10 >/dev/null 2>&1 || true
    # Belt and braces: whatever still carries the project's label.
    docker ps -aq --filter "label=com.docker.compose.project=$project" | xargs -r docker rm -f >/dev/null 2>&1 || true
    docker network ls -q --filter "label=com.docker.compose.project=$project" | xargs -r docker network rm >/dev/null 2>&1 || true
    docker volume ls -q --filter "label=com.docker.compose.project=$project" | xargs -r docker volume rm -f >/dev/null 2>&1 || true
    rm -rf "$work"
    [ "$rc" -ne 0 ] && echo "$NAME: $passed passed, 1 failed"
    exit "$rc"
}

compose_down_leaves_nothing() {
    step="docker-compose down"
    compose down -v --timeout 20 >"$work/down.log" 2>&1 || fail "docker-compose down -v: $(tail -n 5 "$work/down.log")"
    local left
    left=$(
        docker ps -aq --filter "label=com.docker.compose.project=$project"
        docker network ls -q --filter "label=com.docker.compose.project=$project"
        docker volume ls -q --filter "label=com.docker.compose.project=$project"
    )
    [ -z "$left" ] || fail "left behind by down -v: $left"
    ok "docker-compose down -v left no container, network or volume"
    step=""
}
