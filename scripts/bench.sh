#!/usr/bin/env bash
# Runs every benchmark against release builds; each prints its figures
# beside the reference measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
export QVIRT_BIN_DIR="$PWD/target/release"
cargo bench -p qvirt-integration-tests --bench eventbus
cargo bench -p qvirt-integration-tests --bench supervisor
cargo bench -p qvirt-integration-tests --bench gateway
cargo bench -p qvirt-integration-tests --bench libvirt
cargo bench -p qvirt-integration-tests --bench cli
cargo bench -p qvirt-integration-tests --bench fleet
cargo bench -p qvirt-eventbus
cargo bench -p qvirt-agentd --bench ping
cargo bench -p qvirt-ga --bench vs_qemu_ga
cargo bench -p qvirt-hookexec --bench run
