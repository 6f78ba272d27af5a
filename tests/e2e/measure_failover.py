#!/usr/bin/env python3
"""Measure failover time with the real CLI and SDK: kill -9 the backend holding a session,
then time the same client's next send_and_wait on that session (kill -> success).

    bash tests/e2e/install.sh && cargo build --release
    COPILOT_LB_BIN=target/release/copilot-lb .e2e/venv/bin/python tests/e2e/measure_failover.py --runs 20

Three backends share one session-state directory; the proxy runs with
sessions.shared_storage: true and health interval 500ms / fall 3. Prints every run and
p50/p99/max. Bounded: --runs (default 20) and a 60 s timeout per send.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from sdkutil import connected, echo, reply_text  # noqa: E402
from copilot.session import PermissionHandler  # noqa: E402


def placement(admin_url: str, sid: str) -> str | None:
    with urllib.request.urlopen(admin_url + "/api/sessions?limit=100000", timeout=10) as r:
        for s in json.load(r)["sessions"]:
            if s["session_id"] == sid:
                return s["backend"]
    return None


def healthy(admin_url: str, addr: str) -> bool:
    with urllib.request.urlopen(admin_url + "/api/backends", timeout=10) as r:
        return any(b["name"] == addr and b["state"] == "up" for b in json.load(r)["backends"])


async def main(runs: int) -> int:
    run_dir = Path(tempfile.mkdtemp(prefix="copilot-lb-failover-"))
    model = harness.start_fake_model(run_dir)
    backends = harness.start_backends(3, run_dir, shared_state=True)
    cfg = run_dir / "copilot-lb.yaml"
    cfg.write_text("backends:\n" + "".join(f"  - address: {b.addr}\n" for b in backends)
                   + "sessions:\n  shared_storage: true\nhealth:\n  interval: 500ms\n  timeout: 1s\n  rise: 2\n  fall: 3\n")
    proxy = harness.start_proxy([], run_dir, extra_args=["--config", str(cfg)])
    kw = dict(model=harness.MODEL_NAME, provider=model.provider(), on_permission_request=PermissionHandler.approve_all)
    times = []
    try:
        async with connected(proxy.url) as client:
            for i in range(runs):
                sid = f"failover-{i}-{int(time.time())}"
                s = await client.create_session(session_id=sid, **kw)
                ev = await s.send_and_wait(f"turn one {i}", timeout=60)
                assert reply_text(ev) == echo(f"turn one {i}")
                victim_addr = placement(proxy.admin_url, sid)
                victim = next(b for b in backends if b.addr == victim_addr)
                victim.kill9()
                t0 = time.perf_counter()
                ev = await s.send_and_wait(f"turn two {i}", timeout=60)
                dt = time.perf_counter() - t0
                assert reply_text(ev) == echo(f"turn two {i}"), reply_text(ev)
                moved_to = placement(proxy.admin_url, sid)
                assert moved_to != victim_addr
                times.append(dt)
                print(f"run {i + 1}/{runs}: {victim_addr} killed -> answered by {moved_to} in {dt * 1000:.0f} ms", flush=True)
                await s.disconnect()
                backends[victim.index] = harness.restart_backend(victim, run_dir)
                deadline = time.time() + 30
                while not healthy(proxy.admin_url, victim_addr) and time.time() < deadline:
                    await asyncio.sleep(0.1)
    finally:
        proxy.stop()
        for b in backends:
            b.stop()
        model.stop()
    ms = sorted(t * 1000 for t in times)
    p = lambda q: ms[min(len(ms) - 1, int(round(q * (len(ms) - 1))))]  # noqa: E731
    print(f"failover (kill -9 -> next successful send_and_wait), {len(ms)} runs: "
          f"p50 {p(0.5):.0f} ms, p99 {p(0.99):.0f} ms, max {ms[-1]:.0f} ms, mean {statistics.mean(ms):.0f} ms")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args()
    import logging
    logging.getLogger("copilot").setLevel(logging.CRITICAL)
    sys.exit(asyncio.run(main(a.runs)))
