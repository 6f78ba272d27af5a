#!/usr/bin/env bash
# Reproduces the whole benchmark table in one go (< 15 minutes on a 2-core machine):
#   1. setup (HAProxy 2.6 from Debian; real CLI + Python SDK for the stall measurement),
#   2. criterion micro-benchmarks (quick mode),
#   3. the side-by-side load run: direct / copilot-lb / copilot-lb mTLS / HAProxy
#      → benches/results/loadgen.md, latency.svg, loadgen.json,
#   4. the real Python SDK's ping round trip direct / HAProxy / copilot-lb
#      → benches/results/sdk_ping.md.
# BENCH_SKIP_SDK=1 skips step 4 (and the SDK install); BENCH_SKIP_MICRO=1 skips step 2.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
bash scripts/bench/setup.sh
# 10,000 idle connections: the loadgen, the fake and HAProxy each hold one or two fds apiece.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "RLIMIT_NOFILE: $(ulimit -n)"
mkdir -p benches/results
cargo build --release --bin copilot-lb
if [ "${BENCH_SKIP_MICRO:-0}" != "1" ]; then
    cargo bench --bench micro -- --quick --noplot 2>&1 | tee benches/results/micro.txt
fi
timeout 900 cargo bench --bench loadgen
if [ "${BENCH_SKIP_SDK:-0}" != "1" ]; then
    COPILOT_LB_BIN="$PWD/target/release/copilot-lb" timeout 300 .e2e/venv/bin/python scripts/bench/sdk_ping.py
fi
echo "results in benches/results/"
