#!/usr/bin/env bash
# Runs every benchmark; each prints its figure beside the reference it is
# measured against in the same run (see docs/ARCHITECTURE.md, "Benchmarks").
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --workspace
