#!/usr/bin/env bash
# Idempotent install of everything the copilot-lb e2e suite needs.
#
#   tests/e2e/install.sh [DIR]        (default DIR: $COPILOT_LB_E2E_DIR or <repo>/.e2e, git-ignored)
#
# Installs, from the npm registry and PyPI only, with exact pins committed next to this script:
#   DIR/npm/node_modules/@github/copilot                         CLI loader 1.0.102
#   DIR/npm/node_modules/@github/copilot-linux-x64/copilot       native CLI 1.0.102 (optional dep, pinned by the lock)
#   DIR/npm/node_modules/@github/copilot-sdk                     Node SDK 1.0.14
#     (pins: tests/e2e/npm/package.json + tests/e2e/npm/package-lock.json)
#   DIR/venv                                                     Python venv: github-copilot-sdk 1.0.27 + pytest
#     (pins: tests/e2e/requirements.txt)
#   DIR/cache                                                    COPILOT_CACHE_HOME, pre-warmed: the CLI unpacks
#                                                                ~235 MB here on its first start
#   DIR/env.sh                                                   exports COPILOT_LB_E2E_DIR, COPILOT_BIN, COPILOT_E2E_PY
#
# Runs non-interactively (CI=true, no stdin). A second run with unchanged pins is a fast no-op.
set -euo pipefail

CLI_VERSION=1.0.102
NODE_SDK_VERSION=1.0.14
PY_SDK_VERSION=1.0.27

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DIR="${1:-${COPILOT_LB_E2E_DIR:-$REPO/.e2e}}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
say() { echo "[e2e-install] $*"; }
exec </dev/null
export CI="${CI:-true}" npm_config_yes=true npm_config_fund=false npm_config_audit=false \
       npm_config_update_notifier=false PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# One install at a time per DIR.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$DIR/.install.lock"
  flock 9
fi

NPM_DIR="$DIR/npm"
BIN="$NPM_DIR/node_modules/@github/copilot-linux-x64/copilot"
VENV="$DIR/venv"
CACHE="$DIR/cache"
PKG_DIR="$CACHE/pkg/linux-x64/$CLI_VERSION"

pins_hash() {
  cat "$HERE/npm/package.json" "$HERE/npm/package-lock.json" "$HERE/requirements.txt" "$HERE/install.sh" \
    | sha256sum | cut -d' ' -f1
}
STAMP="$DIR/.install-stamp"
WANT="$(pins_hash)"

# ---- fast path -------------------------------------------------------------------------
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$BIN" ] && [ -x "$VENV/bin/python" ] \
   && [ -d "$PKG_DIR" ] && [ -f "$DIR/env.sh" ]; then
  say "up to date in $DIR (CLI $CLI_VERSION, Node SDK $NODE_SDK_VERSION, Python SDK $PY_SDK_VERSION)"
  exit 0
fi
rm -f "$STAMP"

for tool in node npm python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "e2e install: '$tool' not found on PATH" >&2; exit 1; }
done

# ---- CLI + Node SDK from npm -----------------------------------------------------------
have_ver() { node -e "process.stdout.write(require('$1/package.json').version)" 2>/dev/null || true; }
need_npm=0
[ -x "$BIN" ] || need_npm=1
[ "$(have_ver "$NPM_DIR/node_modules/@github/copilot")" = "$CLI_VERSION" ] || need_npm=1
[ "$(have_ver "$NPM_DIR/node_modules/@github/copilot-linux-x64")" = "$CLI_VERSION" ] || need_npm=1
[ "$(have_ver "$NPM_DIR/node_modules/@github/copilot-sdk")" = "$NODE_SDK_VERSION" ] || need_npm=1
cmp -s "$HERE/npm/package-lock.json" "$NPM_DIR/package-lock.json.pinned" 2>/dev/null || need_npm=1
if [ "$need_npm" = 1 ]; then
  mkdir -p "$NPM_DIR"
  cp "$HERE/npm/package.json" "$NPM_DIR/package.json"
  cp "$HERE/npm/package-lock.json" "$NPM_DIR/package-lock.json"
  # `npm ci` rejects this lock (npm leaves some other-platform optional packages of the SDK
  # out of it), so use `npm install`, which still installs exactly the lock's pinned versions.
  say "npm install (@github/copilot $CLI_VERSION, @github/copilot-sdk $NODE_SDK_VERSION) in $NPM_DIR"
  (cd "$NPM_DIR" && npm install --no-audit --no-fund --loglevel=error)
  cp "$HERE/npm/package-lock.json" "$NPM_DIR/package-lock.json.pinned"
else
  say "npm packages already installed"
fi
[ -x "$BIN" ] || { echo "e2e install: copilot binary missing at $BIN (is this linux-x64?)" >&2; exit 1; }
for spec in "@github/copilot:$CLI_VERSION" "@github/copilot-linux-x64:$CLI_VERSION" "@github/copilot-sdk:$NODE_SDK_VERSION"; do
  name="${spec%:*}"; want="${spec##*:}"
  got="$(have_ver "$NPM_DIR/node_modules/$name")"
  [ "$got" = "$want" ] || { echo "e2e install: $name is '$got', want $want" >&2; exit 1; }
done

# ---- Python venv ---------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating venv $VENV"
  python3 -m venv "$VENV"
fi
if ! cmp -s "$HERE/requirements.txt" "$VENV/requirements.installed.txt" 2>/dev/null; then
  say "pip install -r tests/e2e/requirements.txt (github-copilot-sdk $PY_SDK_VERSION + pytest)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$HERE/requirements.txt"
  cp "$HERE/requirements.txt" "$VENV/requirements.installed.txt"
else
  say "Python packages already installed"
fi
"$VENV/bin/python" - <<EOF
import importlib.metadata as m
import copilot, pytest  # noqa: F401
v = m.version("github-copilot-sdk")
assert v == "$PY_SDK_VERSION", f"github-copilot-sdk is {v}, want $PY_SDK_VERSION"
print("[e2e-install] Python SDK ok:", v, "pytest", m.version("pytest"))
EOF

# ---- pre-warm the CLI package cache --------------------------------------------------------
# The native launcher unpacks ~235 MB into \$COPILOT_CACHE_HOME/pkg/linux-x64/<ver> on its first
# start. Do it once here so parallel backends in the tests never race on the first unpack.
mkdir -p "$CACHE" "$DIR/home-install"
got="$(env -i PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 HOME="$DIR/home-install" \
        COPILOT_HOME="$DIR/home-install/.copilot" COPILOT_CACHE_HOME="$CACHE" COPILOT_AUTO_UPDATE=false \
        NO_COLOR=1 "$BIN" --version 2>&1 | head -1 || true)"
case "$got" in
  *"$CLI_VERSION"*) say "CLI ok: $got" ;;
  *) echo "e2e install: unexpected 'copilot --version' output: $got" >&2; exit 1 ;;
esac
[ -d "$PKG_DIR" ] || { echo "e2e install: CLI package cache not found at $PKG_DIR after --version" >&2; exit 1; }

cat >"$DIR/env.sh" <<EOF
# source me: paths of the copilot-lb e2e install
export COPILOT_LB_E2E_DIR="$DIR"
export COPILOT_BIN="$BIN"
export COPILOT_E2E_PY="$VENV/bin/python"
EOF
echo "$WANT" >"$STAMP"
say "done: $DIR"
