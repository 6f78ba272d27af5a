#!/usr/bin/env bash
# The status page's browser test: builds copilot-lb and the fake CLI (debug), then drives
# Debian's chromium with playwright-core (both installed by scripts/install-test-deps.sh).
#   bash tests/browser/run.sh            # COPILOT_LB_BIN / FAKE_CLI_BIN override the builds
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
[ -f tests/browser/node_modules/playwright-core/package.json ] && [ -x /usr/bin/chromium ] || {
    echo "playwright-core or chromium missing: run scripts/install-test-deps.sh" >&2
    exit 2
}
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
if [ -z "${COPILOT_LB_BIN:-}" ]; then
    cargo build --bin copilot-lb
    export COPILOT_LB_BIN="$target_dir/debug/copilot-lb"
fi
if [ -z "${FAKE_CLI_BIN:-}" ]; then
    cargo build -p copilot-lb-test-support --bin fake-cli
    export FAKE_CLI_BIN="$target_dir/debug/fake-cli"
fi
timeout --kill-after=10 120 node --test --test-concurrency=1 tests/browser/status_page.test.mjs
