#!/usr/bin/env bash
# Install the Node examples' dependencies (Express 5 + @github/copilot-sdk, pinned by
# examples/package-lock.json) from the npm registry.
#
#   examples/install.sh            in place: examples/node_modules (git-ignored)
#   examples/install.sh DIR        into DIR: copies package.json, the lock, express-api/ and health/
#                                  there first (the e2e tests use <repo>/.e2e/examples)
#
# Idempotent: a second run with an unchanged lock and sources does nothing. Python examples need
# only `pip install -r examples/requirements.txt`.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR="${1:-$HERE}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
exec </dev/null
export CI="${CI:-true}" npm_config_yes=true npm_config_fund=false npm_config_audit=false \
       npm_config_update_notifier=false
command -v npm >/dev/null || { echo "examples/install.sh: npm not found on PATH" >&2; exit 1; }

if [ "$DIR" != "$HERE" ]; then
  mkdir -p "$DIR/express-api" "$DIR/health"
  cp "$HERE/package.json" "$HERE/package-lock.json" "$DIR/"
  cp "$HERE/express-api/server.mjs" "$DIR/express-api/"
  cp "$HERE/health/health.mjs" "$DIR/health/"
fi
stamp="$DIR/node_modules/.copilot-lb-examples.lock"
if [ -f "$stamp" ] && cmp -s "$HERE/package-lock.json" "$stamp" \
   && [ -f "$DIR/node_modules/express/package.json" ] && [ -f "$DIR/node_modules/@github/copilot-sdk/package.json" ]; then
  echo "[examples-install] up to date in $DIR"
  exit 0
fi
# `npm install` rather than `npm ci`: npm leaves some other-platform optional packages of the SDK
# out of the lock, which `npm ci` rejects; `npm install` still installs the lock's exact versions.
echo "[examples-install] npm install (express, @github/copilot-sdk) in $DIR"
(cd "$DIR" && npm install --no-audit --no-fund --loglevel=error)
node -e '
  const need = { express: "5.3.0", "@github/copilot-sdk": "1.0.14" };
  for (const [n, v] of Object.entries(need)) {
    const got = require(process.argv[1] + "/node_modules/" + n + "/package.json").version;
    if (got !== v) { console.error(`examples/install.sh: ${n} is ${got}, want ${v}`); process.exit(1); }
  }' "$DIR"
cp "$HERE/package-lock.json" "$stamp"
echo "[examples-install] done: $DIR"
