#!/usr/bin/env bash
# The README's first command: a working copilot-lb stack on this machine.
#
#   bash scripts/up.sh [copilot-lb serve flags...]     e.g. --listen 127.0.0.1:4400
#
# 1. builds copilot-lb (release; skipped when COPILOT_LB_BIN names a binary),
# 2. uses the `copilot` on PATH, or installs the pinned Copilot CLI (@github/copilot 1.0.102)
#    from the npm registry into <repo>/.copilot-lb/cli (once),
# 3. runs `copilot-lb serve --config <repo>/config/copilot-lb.yaml` (COPILOT_LB_CONFIG
#    overrides): 127.0.0.1:4321 in front of a managed pool of three CLIs whose state lives in
#    ./.copilot-lb/pool (relative to the current directory).
# Needs cargo, node/npm and python3 (for the SDK); nothing else.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLI_VERSION=1.0.102

say() { echo "[up] $*" >&2; }

if [ -z "${COPILOT_GITHUB_TOKEN:-}${GH_TOKEN:-}${GITHUB_TOKEN:-}" ]; then
  cat >&2 <<'EOF'
[up] No model credentials: COPILOT_GITHUB_TOKEN is not set.
[up]   For GitHub-hosted models:  export COPILOT_GITHUB_TOKEN=<a GitHub token with Copilot access>
[up]                              and run this again (the CLIs are given only the variables in
[up]                              managed.env_pass: COPILOT_GITHUB_TOKEN, GH_TOKEN, GITHUB_TOKEN).
[up]   Or bring your own key from the SDK: create sessions with
[up]     provider={"type": "openai", "base_url": "https://api.openai.com/v1", "api_key": "sk-..."}
[up]   Without either, the stack starts and sessions are created, but turns fail to authenticate.
EOF
fi

BIN="${COPILOT_LB_BIN:-}"
if [ -z "$BIN" ]; then
  command -v cargo >/dev/null 2>&1 || { say "cargo not found on PATH (https://rustup.rs)"; exit 1; }
  say "building copilot-lb (cargo build --release)"
  cargo build --release --quiet --manifest-path "$REPO/Cargo.toml" --bin copilot-lb
  BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/copilot-lb"
fi
[ -x "$BIN" ] || { say "copilot-lb binary not executable: $BIN"; exit 1; }

if ! command -v copilot >/dev/null 2>&1; then
  CLI_DIR="$REPO/.copilot-lb/cli"
  case "$(uname -m)" in
    x86_64|amd64) ARCH=x64 ;;
    aarch64|arm64) ARCH=arm64 ;;
    *) ARCH="$(uname -m)" ;;
  esac
  NATIVE="$CLI_DIR/node_modules/@github/copilot-linux-$ARCH/copilot"
  LOADER="$CLI_DIR/node_modules/.bin/copilot"
  if [ ! -x "$NATIVE" ] && [ ! -x "$LOADER" ]; then
    for tool in node npm; do
      command -v "$tool" >/dev/null 2>&1 || { say "'$tool' not found on PATH: install Node.js 22+ (the CLI is an npm package)"; exit 1; }
    done
    say "installing the Copilot CLI $CLI_VERSION from the npm registry into $CLI_DIR"
    mkdir -p "$CLI_DIR"
    (cd "$CLI_DIR" && CI=true npm install --no-audit --no-fund --loglevel=error --no-save \
        "@github/copilot@$CLI_VERSION" </dev/null >&2)
  fi
  # The native binary when npm installed it (one process per CLI); else npm's loader.
  mkdir -p "$CLI_DIR/bin"
  if [ -x "$NATIVE" ]; then
    ln -sf "$NATIVE" "$CLI_DIR/bin/copilot"
  else
    ln -sf "$LOADER" "$CLI_DIR/bin/copilot"
  fi
  export PATH="$CLI_DIR/bin:$PATH"
fi
# The CLI unpacks its runtime (~235 MB, under HOME or COPILOT_CACHE_HOME) on its first start:
# do that once here, so three CLIs starting together never race on it.
say "Copilot CLI: $(command -v copilot) ($(COPILOT_AUTO_UPDATE=false copilot --version </dev/null 2>&1 | sed -n 1p))"

CONFIG="${COPILOT_LB_CONFIG:-$REPO/config/copilot-lb.yaml}"
say "serving: copilot-lb serve --config $CONFIG $*"
say "SDK apps: cliUrl = the config's listener (127.0.0.1:4321 unless --listen says otherwise); stop with Ctrl-C"
exec "$BIN" serve --config "$CONFIG" "$@"
