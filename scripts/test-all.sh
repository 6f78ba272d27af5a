#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit + property + integration tests, and the
# end-to-end suite with the real Copilot CLI and SDKs (installed by tests/e2e/install.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
step() { echo; echo "=== $* ==="; }

step "cargo fmt --check"
cargo fmt --all -- --check

# --workspace: the fixtures crate (crates/test-support) is linted and tested too; without it
# cargo covers only the root package.
step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "test dependencies (redis-server, promtool, chromium, playwright-core)"
bash scripts/install-test-deps.sh

step "deploy/: Prometheus rules and Grafana dashboard (promtool check + test rules)"
bash scripts/check-deploy.sh
# In-process test proxies each get an embedded registry file here (tests/common).
rm -rf "${TMPDIR:-/tmp}/copilot-lb-test-state"

step "cargo test (unit, property, integration)"
cargo test --workspace --all-targets

step "status page in a real browser (Debian's chromium driven by playwright-core)"
bash tests/browser/run.sh

step "end-to-end: real Copilot CLI + Python and Node SDKs through copilot-lb"
cargo build --bin copilot-lb
COPILOT_LB_BIN="$PWD/target/debug/copilot-lb" bash tests/e2e/run.sh

echo
echo "all test stages passed"
