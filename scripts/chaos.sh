#!/usr/bin/env bash
# Faults under load (issue #10): builds the release copilot-lb and runs the chaos scenarios,
# printing each report and writing it to benches/results/.
#
#   bash scripts/chaos.sh            # the fake-CLI run: 1,000 sessions / 50 connections,
#                                    # kill -9, SIGSTOP, flap, partition (benches/chaos.rs)
#   bash scripts/chaos.sh real       # the shorter run against 3 real Copilot CLIs + Python SDK
#                                    # (tests/e2e/chaos_real.py; needs tests/e2e/install.sh)
#   bash scripts/chaos.sh all        # both
#   bash scripts/chaos.sh fake --sessions 200 --think-ms 2000   # extra args go to the run
#
# Exit status: non-zero if an invariant failed in any run (the report lists which).
# Environment: COPILOT_LB_BIN (default: the release build), COPILOT_LB_E2E_DIR (default .e2e),
# CHAOS_OUT (default benches/results).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode="${1:-fake}"
[ $# -gt 0 ] && shift
if [ "$mode" = all ] && [ $# -gt 0 ]; then
    echo "chaos.sh: extra arguments only with 'fake' or 'real'" >&2
    exit 2
fi
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release --bin copilot-lb || exit 2
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
export COPILOT_LB_BIN="${COPILOT_LB_BIN:-$target_dir/release/copilot-lb}"
out="${CHAOS_OUT:-benches/results}"
mkdir -p "$out"
rc=0
if [ "$mode" = fake ] || [ "$mode" = all ]; then
    cargo bench --bench chaos --no-run || exit 2
    timeout 1800 cargo bench --bench chaos -- chaos --out "$out/chaos.json" "$@" | tee "$out/chaos.md"
    r=${PIPESTATUS[0]}; [ "$r" -ne 0 ] && rc=$r
fi
if [ "$mode" = real ] || [ "$mode" = all ]; then
    e2e="${COPILOT_LB_E2E_DIR:-$PWD/.e2e}"
    [ -x "$e2e/venv/bin/python" ] || bash tests/e2e/install.sh || exit 2
    COPILOT_LB_E2E_DIR="$e2e" timeout 1200 "$e2e/venv/bin/python" tests/e2e/chaos_real.py \
        --out "$out/chaos-real.json" "$@" | tee "$out/chaos-real.md"
    r=${PIPESTATUS[0]}; [ "$r" -ne 0 ] && rc=$r
fi
exit "$rc"
