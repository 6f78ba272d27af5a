#!/usr/bin/env bash
# Fuzz the codec and the envelope parser with cargo-fuzz (libFuzzer). Not part of the default
# test run. Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# cargo-fuzz needs nightly flags; the stable toolchain allows them with RUSTC_BOOTSTRAP.
for t in codec envelope; do
  echo "=== fuzz $t for ${secs}s ==="
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" -- -max_total_time="$secs"
done
