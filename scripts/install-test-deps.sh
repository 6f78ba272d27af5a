#!/usr/bin/env bash
# Installs what the test suite needs beyond cargo, from Debian: redis-server (the session
# registry's Redis store is tested against a real one, started by the tests on loopback; the
# same binary runs the Sentinel tests' sentinel with --sentinel, and their fixture reads
# replication state with redis-cli, from redis-tools, which redis-server depends on),
# promtool from the `prometheus` package (deploy/prometheus/ rules are checked and unit-tested
# with it) and chromium, plus the pinned playwright-core from npm (the status page's browser
# test, tests/browser/). Root or sudo, non-interactive, idempotent; system instances Debian may
# start are stopped (the tests start their own redis; nothing needs a Prometheus server).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
UPDATED=""
# Waits (bounded) for another apt/dpkg run to finish instead of failing on its lock.
APT=(apt-get -o DPkg::Lock::Timeout=300 -y -q)
# apt_install PACKAGE [FLAGS]: tries the cached lists first, runs `apt-get update` once if that
# fails.
apt_install() {
    $SUDO "${APT[@]}" install "$@" >/dev/null 2>&1 || {
        [ -n "$UPDATED" ] || { $SUDO "${APT[@]}" update; UPDATED=1; }
        $SUDO "${APT[@]}" install "$@"
    }
}
stop_service() {
    if command -v service >/dev/null 2>&1; then $SUDO service "$1" stop >/dev/null 2>&1 || true; fi
}
if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server
    stop_service redis-server
fi
if ! command -v promtool >/dev/null 2>&1; then
    # Without recommends: prometheus-node-exporter would be one more daemon on the machine.
    apt_install prometheus --no-install-recommends
    stop_service prometheus
fi
if ! command -v redis-cli >/dev/null 2>&1; then
    apt_install redis-tools
fi
redis-server --version
redis-cli --version
promtool --version 2>&1 | sed -n 1p  # not head: an early exit could SIGPIPE promtool under pipefail
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
