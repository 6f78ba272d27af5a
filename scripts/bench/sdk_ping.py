"""The real SDK's 40 ms stall: the Python SDK's ping() and get_status() round trips against a
real headless Copilot CLI directly, through HAProxy 2.6 (TCP mode) and through copilot-lb.

The SDK writes a frame's Content-Length header and its body in two writes without
TCP_NODELAY, so against a peer that delays its ACK the body waits ~40 ms. `ping` is answered
by copilot-lb itself; `status.get` (get_status) is forwarded to the CLI.

Usage: .e2e/venv/bin/python scripts/bench/sdk_ping.py [--n 30] [--out benches/results/sdk_ping.md]
Needs: tests/e2e/install.sh (real CLI + Python SDK), COPILOT_LB_BIN (default target/release),
haproxy on PATH (scripts/bench/setup.sh). Everything listens on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
os.environ.setdefault("COPILOT_LB_BIN", str(REPO / "target" / "release" / "copilot-lb"))

import harness  # noqa: E402
from copilot import CopilotClient, RuntimeConnection  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    i = max(1, min(len(xs), int(-(-q * len(xs) // 1)))) - 1
    return xs[i]


async def measure(url: str, n: int, budget_s: float) -> dict[str, list[float]]:
    client = CopilotClient(connection=RuntimeConnection.for_uri(url))
    await asyncio.wait_for(client.start(), 30)
    out: dict[str, list[float]] = {"ping": [], "get_status": []}
    try:
        for _ in range(3):  # warm-up
            await asyncio.wait_for(client.ping("warm"), 10)
            await asyncio.wait_for(client.get_status(), 10)
        deadline = time.monotonic() + budget_s
        for _ in range(n):
            if time.monotonic() > deadline:
                break
            t = time.perf_counter()
            await asyncio.wait_for(client.ping("x"), 10)
            out["ping"].append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            await asyncio.wait_for(client.get_status(), 10)
            out["get_status"].append((time.perf_counter() - t) * 1000)
    finally:
        await asyncio.wait_for(client.stop(), 15)
    return out


def start_haproxy(backend_addr: str, run_dir: Path) -> tuple[harness.Proc, str, str]:
    binary = shutil.which("haproxy")
    if not binary:
        raise RuntimeError("haproxy not on PATH: run scripts/bench/setup.sh")
    version = subprocess.run([binary, "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    port = harness.free_port()
    cfg = run_dir / "haproxy.cfg"
    cfg.write_text(f"""global
    maxconn 1000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server cli {backend_addr}
""")
    p = harness.Proc("haproxy", [binary, "-db", "-f", str(cfg)], env=dict(os.environ), cwd=run_dir,
                     log_path=run_dir / "haproxy.log")
    p.wait_port(port, 20)
    return p, f"127.0.0.1:{port}", version


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--budget", type=float, default=30.0, help="seconds per path at most")
    ap.add_argument("--out", default=str(REPO / "benches" / "results" / "sdk_ping.md"))
    a = ap.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="copilot-lb-sdk-ping-"))
    try:
        backends = harness.start_backends(1, run_dir)
        b = backends[0]
        hap, hap_url, hap_version = start_haproxy(b.addr, run_dir)
        proxy = harness.start_proxy(backends, run_dir, admin=False, env_extra={"RUST_LOG": "warn"})
        time.sleep(1.0)  # let the proxy's first health probe confirm the backend
        paths = [("direct", b.addr), ("HAProxy", hap_url), ("copilot-lb", proxy.url)]
        res = {}
        for name, url in paths:
            res[name] = await measure(url, a.n, a.budget)
            print(f"{name}: ping p50 {statistics.median(res[name]['ping']):.2f} ms, "
                  f"get_status p50 {statistics.median(res[name]['get_status']):.2f} ms", flush=True)
    finally:
        harness.stop_all()
    py_sdk = subprocess.run([sys.executable, "-m", "pip", "show", "github-copilot-sdk"],
                            capture_output=True, text=True).stdout
    sdk_ver = next((l.split(":", 1)[1].strip() for l in py_sdk.splitlines() if l.startswith("Version")), "?")
    lines = [f"Python SDK {sdk_ver}, real Copilot CLI (tests/e2e/install.sh), {hap_version.split(' - ')[0]}; "
             f"{a.n} calls per path after 3 warm-up calls, ms. Ratio against direct in the same run.",
             "", "| path | ping p50 | ping p99 | ping ×direct (p50) | get_status p50 | get_status p99 | get_status ×direct (p50) |",
             "|---|---|---|---|---|---|---|"]
    d = res["direct"]
    for name, _ in paths:
        r = res[name]
        lines.append(f"| {name} | {statistics.median(r['ping']):.2f} | {pct(r['ping'], .99):.2f} | "
                     f"{statistics.median(r['ping']) / statistics.median(d['ping']):.3f}× | "
                     f"{statistics.median(r['get_status']):.2f} | {pct(r['get_status'], .99):.2f} | "
                     f"{statistics.median(r['get_status']) / statistics.median(d['get_status']):.3f}× |")
    ratio = statistics.median(res["copilot-lb"]["ping"]) / statistics.median(d["ping"])
    lines += ["", f"Target: SDK ping through copilot-lb ≤ 1/20 of direct: {ratio:.3f}× → "
              f"{'met' if ratio <= 0.05 else '**missed**'}.",
              "`ping` is answered by copilot-lb itself; `get_status` (`status.get`) is forwarded to the CLI."]
    text = "\n".join(lines) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
