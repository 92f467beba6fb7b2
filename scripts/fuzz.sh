#!/usr/bin/env bash
# Runs each coverage-guided fuzz target (fuzz/fuzz_targets) for SECS
# seconds with libFuzzer, through cargo fuzz (installed into .tools if
# missing). Usage: scripts/fuzz.sh SECS TARGET...
# A crash or hang stops the run and leaves its input in
# fuzz/artifacts/TARGET/; turn it into a regression test beside the code.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:?usage: fuzz.sh SECS TARGET...}
shift
tools="$PWD/.tools"
export PATH="$tools/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz 0.13.2 into .tools/bin"
  cargo install --locked --quiet --root "$tools" cargo-fuzz --version 0.13.2
fi
for target in "$@"; do
  echo "fuzz: $target for ${secs}s"
  # --sanitizer none: the stable toolchain has no sanitizers; the targets
  # are safe Rust, so what is looked for is panics, hangs and memory
  # blow-ups, which libFuzzer reports itself (-timeout, -rss_limit_mb).
  # The corpus grows in fuzz/corpus/TARGET (not kept in git); the
  # committed seeds in fuzz/seeds/TARGET give it valid inputs to start from.
  corpus="fuzz/corpus/$target"
  mkdir -p "$corpus"
  seeds=()
  [ -d "fuzz/seeds/$target" ] && seeds=("fuzz/seeds/$target")
  cargo fuzz run --fuzz-dir fuzz --sanitizer none "$target" "$corpus" "${seeds[@]}" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
