#!/usr/bin/env bash
# copilot-lb-healthcheck [PATH] [HOST:PORT]
#
# GET PATH (default /livez) from the copilot-lb admin API at HOST:PORT (default
# $COPILOT_LB_ADMIN, else 127.0.0.1:9464); exit 0 on HTTP 200, 1 otherwise. Pure bash (/dev/tcp)
# plus coreutils `timeout`, because the runtime image has no curl or wget. Used by the image's
# HEALTHCHECK and by the Kubernetes exec probes of the sidecar (whose admin API is loopback-only).
set -u
path="${1:-/livez}"
addr="${2:-${COPILOT_LB_ADMIN:-127.0.0.1:9464}}"
host="${addr%:*}"
port="${addr##*:}"
host="${host#[}"; host="${host%]}"
limit="${COPILOT_LB_HEALTHCHECK_TIMEOUT:-3}"

exec timeout "$limit" bash -c '
  exec 3<>"/dev/tcp/$1/$2" || exit 1
  printf "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" "$3" "$4" >&3 || exit 1
  IFS= read -r status <&3 || exit 1
  status="${status%$'"'"'\r'"'"'}"
  case "$status" in
    "HTTP/1."?" 200"*) exit 0 ;;
    *) echo "copilot-lb-healthcheck: $3: ${status:-no answer}" >&2; exit 1 ;;
  esac
' copilot-lb-healthcheck "$host" "$port" "$path" "$addr"
