"""The session-aware sidecar (issue #14), real CLIs and the real Python SDK:

    app (one CopilotClient) -> sidecar copilot-lb (backends: two edges, `edge: true`)
        -> two edge copilot-lb replicas sharing one real redis-server -> three real CLIs
           sharing session state

  * an edge killed with -9: the same client object's next send_and_wait on every session
    answers with its history (the app's connection never closed: an SDK cannot reconnect);
  * a rolling restart of both edges (SIGTERM one, start it again on the same port, then the
    other) while the app takes turns in a loop: zero failed requests, every answer with the
    history so far (the edge tells the sidecar to move before it closes: copilotLb.goaway).

The stack is built by sidecar_stack.py. Timings (kill -> next answer, per session) are printed;
measure_sidecar.py repeats them and measures what the sidecar adds over the byte pipe.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest

import harness
from conftest import run
from sdkutil import connected, echo, recall, reply_text
from sidecar_stack import N_SESSIONS, NONCE, SEND_TIMEOUT_S, Stack, open_sessions, start_stack, wait_edges_up

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(e2e_install, tmp_path_factory, request) -> Stack:
    if harness.direct_mode():
        pytest.skip("the sidecar needs the proxy")
    s = start_stack(tmp_path_factory.mktemp("sidecar-failover"))
    request.addfinalizer(s.stop)
    return s


def test_an_edge_killed_under_the_sidecar_moves_every_session_with_its_history(stack):
    s = stack

    async def go():
        async with connected(s.sidecar.url, fast_close=True) as client:
            held = await open_sessions(client, s, "kill")
            placed = s.sidecar.placements()
            by_edge = {e.name: [sid for sid in held if placed.get(sid) == e.name] for e in s.edges}
            victim = max(s.edges, key=lambda e: len(by_edge[e.name]))
            assert by_edge[victim.name], by_edge
            t_kill = time.perf_counter()
            victim.proc.kill9()

            async def next_turn(sid: str) -> float:
                sess, prompts = held[sid]
                ask = f"RECALL after the edge died {sid}"
                ev = await sess.send_and_wait(ask, timeout=SEND_TIMEOUT_S)
                assert reply_text(ev) == recall(*prompts), (sid, reply_text(ev))
                prompts.append(ask)
                return time.perf_counter() - t_kill
            took = await asyncio.gather(*(next_turn(sid) for sid in held))
            moved = [sid for sid in by_edge[victim.name]]
            print(f"\n[e2e] edge {victim.name} killed: {len(moved)} of {len(held)} sessions moved; "
                  f"kill -> answer {', '.join(f'{t * 1000:.0f}' for t in sorted(took))} ms", flush=True)
            after = s.sidecar.placements()
            assert all(after.get(sid) != victim.name for sid in moved), after
            # The same client object still works for new sessions too.
            more = await client.create_session(session_id=f"sc-after-{NONCE}", **s.kwargs())
            ev = await more.send_and_wait("after the kill", timeout=SEND_TIMEOUT_S)
            assert reply_text(ev) == echo("after the kill")
        victim.start()
        wait_edges_up(s, timeout=30)
    run(go(), timeout=240)


def test_a_rolling_restart_of_both_edges_fails_no_request(stack):
    s = stack
    stop = asyncio.Event()
    failures: list[str] = []
    turns = {"n": 0}

    async def go():
        async with connected(s.sidecar.url, fast_close=True) as client:
            held = await open_sessions(client, s, "roll")

            async def loop(sid: str):
                sess, prompts = held[sid]
                k = 0
                while not stop.is_set():
                    k += 1
                    ask = f"RECALL turn {k} of {sid}"
                    try:
                        ev = await sess.send_and_wait(ask, timeout=SEND_TIMEOUT_S)
                        if reply_text(ev) != recall(*prompts):
                            failures.append(f"{sid} turn {k}: {reply_text(ev)!r}")
                    except Exception as e:  # noqa: BLE001 (counted: the point is zero)
                        failures.append(f"{sid} turn {k}: {type(e).__name__}: {e}")
                    prompts.append(ask)
                    turns["n"] += 1
            loops = [asyncio.create_task(loop(sid)) for sid in held]
            try:
                await asyncio.sleep(1.0)
                for e in s.edges:
                    t0 = time.monotonic()
                    await asyncio.to_thread(e.stop, 30)   # SIGTERM: goaway, drain, exit
                    took = time.monotonic() - t0
                    await asyncio.sleep(0.5)               # turns run on the other edge alone
                    e.spawn()
                    await asyncio.to_thread(e.wait_ready)
                    await asyncio.to_thread(wait_edges_up, s, 30)
                    print(f"\n[e2e] {e.name} restarted (SIGTERM -> exit {took:.2f} s)", flush=True)
                await asyncio.sleep(1.0)
            finally:
                stop.set()
                await asyncio.gather(*loops)
        assert turns["n"] >= 3 * N_SESSIONS, turns
        assert not failures, f"{len(failures)} of {turns['n']} turns failed:\n" + "\n".join(failures)
        print(f"[e2e] rolling restart: {turns['n']} turns, 0 failed", flush=True)
    run(go(), timeout=300)


def test_node_sdk_client_survives_an_edge_kill_through_the_sidecar(stack):
    """The same scenario with the real Node SDK (tests/e2e/node/sidecar.mjs): one client
    object, sessions with history, an edge killed -9 between its turns."""
    import shutil
    import subprocess
    import threading

    s = stack
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found on PATH")
    script = Path(__file__).resolve().parent / "node" / "sidecar.mjs"
    argv = [node, str(script), "--url", s.sidecar.url, "--model-url", s.model.base_url,
            "--e2e-dir", str(harness.E2E_DIR), "--nonce", uuid.uuid4().hex[:8], "--sessions", str(N_SESSIONS)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for ln in proc.stdout:
            lines.append(ln.rstrip("\n"))
            if ln.startswith("READY"):
                ready.set()
        ready.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(90) and any(ln.startswith("READY") for ln in lines), "\n".join(lines)
        ids = json.loads(next(ln for ln in lines if ln.startswith("READY"))[len("READY "):])
        placed = s.sidecar.placements()
        victim = max(s.edges, key=lambda e: sum(placed.get(sid) == e.name for sid in ids))
        assert any(placed.get(sid) == victim.name for sid in ids), placed
        victim.proc.kill9()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
    print("\n".join(lines))
    assert proc.returncode == 0 and not [ln for ln in lines if ln.startswith("FAIL")], \
        "\n".join(lines) + "\n--- stderr ---\n" + proc.stderr.read()[-4000:]
    victim.start()
    wait_edges_up(s, timeout=30)
