#!/usr/bin/env bash
# Run the copilot-lb end-to-end suite (real Copilot CLI servers + real Python/Node SDKs).
#
#   tests/e2e/run.sh [extra pytest args...]
#
#   COPILOT_LB_E2E_DIRECT=1   no proxy: clients talk to backend 1 directly (no cargo build)
#   COPILOT_LB_BIN=PATH       use this proxy binary (no cargo build)
#   COPILOT_LB_E2E_DIR=DIR    install dir (default <repo>/.e2e)
# Otherwise builds the proxy with `cargo build` (debug) and uses target/debug/copilot-lb.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
export COPILOT_LB_E2E_DIR="${COPILOT_LB_E2E_DIR:-$REPO/.e2e}"

bash "$HERE/install.sh" "$COPILOT_LB_E2E_DIR" </dev/null

case "${COPILOT_LB_E2E_DIRECT:-}" in
  ""|0|false|no)
    if [ -z "${COPILOT_LB_BIN:-}" ]; then
      echo "[e2e] cargo build (debug) of copilot-lb"
      (cd "$REPO" && cargo build --bin copilot-lb)
      export COPILOT_LB_BIN="$REPO/target/debug/copilot-lb"
    fi
    [ -x "$COPILOT_LB_BIN" ] || { echo "[e2e] proxy binary not executable: $COPILOT_LB_BIN" >&2; exit 1; }
    echo "[e2e] proxy: $COPILOT_LB_BIN"
    ;;
  *) echo "[e2e] DIRECT mode: no proxy, clients connect to backend 1" ;;
esac

export PYTHONDONTWRITEBYTECODE=1
cd "$REPO"
exec "$COPILOT_LB_E2E_DIR/venv/bin/python" -m pytest tests/e2e -m e2e -q -p no:cacheprovider "$@" </dev/null
