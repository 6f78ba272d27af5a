#!/usr/bin/env bash
# Installs what the test suite needs beyond cargo: redis-server from Debian (the session
# registry's Redis store is tested against a real one, started by the tests on loopback),
# Debian's chromium and the pinned playwright-core from npm (the status page's browser test,
# tests/browser/). Root or sudo, non-interactive, idempotent; a system instance Debian may start
# is stopped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
# One `apt-get update` at most, and only when an install from the current lists fails.
apt_install() {
    $SUDO apt-get install -y -q "$@" >/dev/null 2>&1 || {
        $SUDO apt-get update -q
        $SUDO apt-get install -y -q "$@"
    }
}
if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server
    if command -v service >/dev/null 2>&1; then $SUDO service redis-server stop >/dev/null 2>&1 || true; fi
fi
redis-server --version
# The browser test drives Debian's build (playwright cannot download its own browsers here).
if [ ! -x /usr/bin/chromium ]; then
    apt_install chromium
fi
# (Debian's wrapper script may print a harmless shell warning on stderr.)
/usr/bin/chromium --version 2>/dev/null
# playwright-core only (no browser download), exact version from the committed lock file.
want="$(node -p 'require("./tests/browser/package.json").dependencies["playwright-core"]')"
have="$(node -p 'try { require("./tests/browser/node_modules/playwright-core/package.json").version } catch { "" }')"
if [ "$want" != "$have" ]; then
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "playwright-core $(node -p 'require("./tests/browser/node_modules/playwright-core/package.json").version')"
