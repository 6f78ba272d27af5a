#!/usr/bin/env bash
# Soak (issue #10): builds the release copilot-lb, then N clients create, use and delete
# sessions through it (three fake CLIs behind it) for M minutes while its RSS, fds and
# threads are sampled every 10 s; prints the report, writes benches/results/soak.{md,json}.
#
#   bash scripts/soak.sh                      # 30 minutes, 500 clients
#   bash scripts/soak.sh 10 200               # 10 minutes, 200 clients
#   bash scripts/soak.sh 30 500 --think-ms 4000 --warmup-s 300   # extra args go to the run
#
# Exit status: non-zero if a check failed (errors, RSS outside ±5 % after warm-up, fds or
# threads not back to baseline, connections/links/sessions left). COPILOT_LB_BIN overrides
# the binary, CHAOS_OUT the output directory.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
minutes="${1:-30}"
clients="${2:-500}"
[ $# -gt 0 ] && shift
[ $# -gt 0 ] && shift
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release --bin copilot-lb || exit 2
cargo bench --bench chaos --no-run || exit 2
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
export COPILOT_LB_BIN="${COPILOT_LB_BIN:-$target_dir/release/copilot-lb}"
out="${CHAOS_OUT:-benches/results}"
mkdir -p "$out"
bound=$(( (minutes + 10) * 60 ))
timeout "$bound" cargo bench --bench chaos -- soak --minutes "$minutes" --clients "$clients" \
    --out "$out/soak.json" "$@" | tee "$out/soak.md"
exit "${PIPESTATUS[0]}"
