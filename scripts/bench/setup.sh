#!/usr/bin/env bash
# Installs what the benchmarks need beyond cargo: HAProxy 2.6 from Debian (TCP-mode baseline)
# and, for the SDK stall measurement, the real Copilot CLI + Python SDK (tests/e2e/install.sh).
# Root, non-interactive. Idempotent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if ! command -v haproxy >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get install -y haproxy >/dev/null 2>&1 || {
        $SUDO apt-get update -q
        $SUDO apt-get install -y -q haproxy
    }
    # Debian's package may start a system instance; the benchmarks run their own.
    if command -v service >/dev/null 2>&1; then $SUDO service haproxy stop >/dev/null 2>&1 || true; fi
fi
# sed reads to the end: `head -1` could exit first and SIGPIPE haproxy, which pipefail makes fatal.
haproxy -v | sed -n 1p
if [ "${BENCH_SKIP_SDK:-0}" != "1" ] && [ ! -x .e2e/venv/bin/python ]; then
    bash tests/e2e/install.sh
fi
