#!/usr/bin/env bash
# Installs what the Rust test suite needs beyond cargo: redis-server from Debian (the session
# registry's Redis store is tested against a real one, started by the tests on loopback).
# Root or sudo, non-interactive, idempotent; a system instance Debian may start is stopped.
set -euo pipefail
if ! command -v redis-server >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get install -y -q redis-server >/dev/null 2>&1 || {
        $SUDO apt-get update -q
        $SUDO apt-get install -y -q redis-server
    }
    if command -v service >/dev/null 2>&1; then $SUDO service redis-server stop >/dev/null 2>&1 || true; fi
fi
redis-server --version
