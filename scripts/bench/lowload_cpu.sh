#!/usr/bin/env bash
# Where low-load latency goes: one client doing test.echo 16 B round trips on a raw socket,
# through copilot-lb and through HAProxy (TCP mode) in front of the same fake CLI. Prints,
# per round trip, each proxy's syscalls (strace -c -f, which follows every thread) and its user and kernel
# CPU (/proc/PID/stat before and after). 127.0.0.1 only; every step bounded by `timeout`.
#
#   bash scripts/bench/lowload_cpu.sh [ROUND_TRIPS]    (default 50000; strace gets 5000)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
N="${1:-50000}"
bash scripts/bench/setup.sh >/dev/null
command -v strace >/dev/null || { echo "lowload_cpu: strace is not installed" >&2; exit 2; }
cargo build --release -q --bin copilot-lb -p copilot-lb
cargo build --release -q --bin fake-cli -p copilot-lb-test-support
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
fake=$(port); lb=$(port); admin=$(port); hap=$(port)
# The fake CLI exits when its stdin closes: keep a pipe open for it.
mkfifo "$dir/stdin"
sleep 3600 > "$dir/stdin" & pids+=($!)
target/release/fake-cli --port "$fake" < "$dir/stdin" > "$dir/fake.log" 2>&1 & pids+=($!)
cat > "$dir/lb.yaml" <<YAML
listeners:
  - listen: 127.0.0.1:$lb
admin:
  listen: 127.0.0.1:$admin
backends:
  - address: 127.0.0.1:$fake
log:
  level: warn
routing:
  allow_global: [test.echo]
YAML
(cd "$dir" && exec "$OLDPWD/target/release/copilot-lb" serve --config lb.yaml > lb.log 2>&1) & pids+=($!)
lb_pid=$!
cat > "$dir/hap.cfg" <<CFG
global
    nbthread 2
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend fe
    bind 127.0.0.1:$hap
    default_backend be
backend be
    server fake 127.0.0.1:$fake
CFG
haproxy -db -f "$dir/hap.cfg" > "$dir/hap.log" 2>&1 & pids+=($!)
hap_pid=$!
cat > "$dir/client.py" <<'PY'
import json, socket, sys
port, n, hello = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
s = socket.create_connection(("127.0.0.1", port), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = b""
def call(i, method, params):
    global buf
    body = json.dumps({"jsonrpc": "2.0", "id": i, "method": method, "params": params}).encode()
    s.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
    while True:
        h = buf.find(b"\r\n\r\n")
        if h >= 0:
            n = int(buf[:h].split(b":")[1])
            if len(buf) >= h + 4 + n:
                out, buf = buf[h + 4:h + 4 + n], buf[h + 4 + n:]
                if b'"error"' in out:
                    sys.exit(f"error reply: {out[:200]!r}")
                return
        more = s.recv(65536)
        if not more:
            sys.exit("connection closed")
        buf += more
# copilot-lb answers `connect` itself; HAProxy passes bytes, and the fake CLI needs none.
if hello:
    call(0, "connect", {})
for i in range(1, n + 1):
    call(i, "test.echo", {"data": "x" * 16})
PY
for p in "$fake" "$lb" "$hap"; do
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$p") 2>/dev/null && break; sleep 0.1; done
done
cpu() { awk '{print $14, $15}' "/proc/$1/stat"; }
tick_us=$((1000000 / $(getconf CLK_TCK)))
for name in copilot-lb haproxy; do
    if [ "$name" = copilot-lb ]; then pid=$lb_pid; p=$lb; hello=1; else pid=$hap_pid; p=$hap; hello=0; fi
    timeout 120 strace -qq -c -f -p "$pid" -o "$dir/$name.strace" &
    st=$!
    sleep 1
    timeout 120 python3 "$dir/client.py" "$p" 5000 "$hello"
    sleep 0.5
    kill -INT "$st" 2>/dev/null || true
    wait "$st" 2>/dev/null || true
    echo "== $name: syscalls per round trip (strace -c, 5000 round trips)"
    awk '$NF ~ /^(epoll_wait|sendto|recvfrom|clock_gettime|read|write|writev|sendmsg|recvmsg)$/ {
        err = (NF == 6) ? $5 : 0; printf "   %-14s %.2f  (errors %d)\n", $NF, $4 / 5000, err }' "$dir/$name.strace"
    read -r u0 s0 < <(cpu "$pid")
    timeout 600 python3 "$dir/client.py" "$p" "$N" "$hello"
    read -r u1 s1 < <(cpu "$pid")
    echo "== $name: CPU per round trip over $N round trips: user $(( (u1 - u0) * tick_us / N )) µs, kernel $(( (s1 - s0) * tick_us / N )) µs"
done
