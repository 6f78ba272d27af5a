#!/bin/sh
# Entry point of the Copilot CLI backend image (docker/cli.Dockerfile):
#   copilot --headless --host $COPILOT_HOST --port $COPILOT_PORT --no-auto-update [ARGS...]
# Secrets may be given as files (Docker/Kubernetes secrets): *_FILE variables are read into
# COPILOT_CONNECTION_TOKEN / COPILOT_GITHUB_TOKEN (trailing newlines dropped). Without a connection
# token the CLI would accept any client, so this refuses to start unless
# COPILOT_ALLOW_NO_CONNECTION_TOKEN=1.
set -eu

from_file() {  # from_file VAR: VAR_FILE -> VAR
  eval "file=\${$1_FILE:-}"
  eval "val=\${$1:-}"
  if [ -z "$val" ] && [ -n "$file" ]; then
    [ -r "$file" ] || { echo "copilot-cli: $1_FILE=$file is not readable" >&2; exit 1; }
    val="$(cat "$file")"
    export "$1=$val"
  fi
}
from_file COPILOT_CONNECTION_TOKEN
from_file COPILOT_GITHUB_TOKEN
[ -n "${COPILOT_GITHUB_TOKEN:-}" ] || unset COPILOT_GITHUB_TOKEN

if [ -z "${COPILOT_CONNECTION_TOKEN:-}" ] && [ "${COPILOT_ALLOW_NO_CONNECTION_TOKEN:-0}" != 1 ]; then
  echo "copilot-cli: set COPILOT_CONNECTION_TOKEN or COPILOT_CONNECTION_TOKEN_FILE (the token copilot-lb sends)," >&2
  echo "             or COPILOT_ALLOW_NO_CONNECTION_TOKEN=1 to run without one" >&2
  exit 1
fi

mkdir -p "${COPILOT_HOME:?}/session-state"
exec copilot --headless --host "${COPILOT_HOST:-0.0.0.0}" --port "${COPILOT_PORT:-4321}" --no-auto-update "$@"
