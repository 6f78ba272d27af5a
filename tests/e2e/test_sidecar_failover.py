"""The session-aware sidecar (issue #14), real CLIs and the real Python SDK:

    app (one CopilotClient) -> sidecar copilot-lb (backends: two edges, `edge: true`)
        -> two edge copilot-lb replicas sharing one real redis-server -> three real CLIs
           sharing session state

  * an edge killed with -9: the same client object's next send_and_wait on every session
    answers with its history (the app's connection never closed: an SDK cannot reconnect);
  * a rolling restart of both edges (SIGTERM one, start it again on the same port, then the
    other) while the app takes turns in a loop: zero failed requests, every answer with the
    history so far (the edge tells the sidecar to move before it closes: copilotLb.goaway).

Timings (kill -> next answer, per session) are printed; measure_sidecar.py repeats them.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import harness
from conftest import run
from sdkutil import connected, echo, recall, reply_text, session_kwargs

pytestmark = pytest.mark.e2e

NONCE = uuid.uuid4().hex[:8]
TENANT_TOKEN = f"sidecar-tok-{NONCE}"
SEND_TIMEOUT_S = 60
N_SESSIONS = 4


def token_hash(tok: str) -> str:
    return "sha256:" + hashlib.sha256(tok.encode()).hexdigest()


@dataclass
class Lb:
    """One copilot-lb process (an edge or the sidecar) with its own config and ports."""
    name: str
    run_dir: Path
    config: str
    port: int
    admin_port: int
    env_extra: dict = field(default_factory=dict)
    proc: harness.Proc | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "Lb":
        return self.spawn().wait_ready(timeout)

    def spawn(self) -> "Lb":
        """Starts the process. From the main thread only: harness.Proc sets PR_SET_PDEATHSIG,
        which fires when the spawning *thread* exits (an asyncio.to_thread worker would kill it)."""
        cfg = self.run_dir / f"{self.name}.yaml"
        cfg.write_text(self.config)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(self.run_dir),
               "RUST_BACKTRACE": "1", "RUST_LOG": os.environ.get("COPILOT_LB_E2E_RUST_LOG", "info,copilot_lb=debug"),
               **self.env_extra}
        self.proc = harness.Proc(self.name, [str(harness.proxy_bin()), "serve", "--config", str(cfg)],
                                 env=env, cwd=self.run_dir, log_path=self.run_dir / f"{self.name}.log")
        return self

    def wait_ready(self, timeout: float = 30.0) -> "Lb":
        self.proc.wait_port(self.port, timeout)
        self.proc.wait_port(self.admin_port, timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready:\n{self.proc.tail()}")
            time.sleep(0.05)

    def admin(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=10) as r:
            return json.load(r)

    def placements(self) -> dict[str, str]:
        return {s["session_id"]: s["backend"] for s in self.admin("/api/sessions?limit=10000")["sessions"]}

    def states(self) -> dict[str, str]:
        return {b["name"]: b["state"] for b in self.admin("/api/backends")["backends"]}

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None:
            self.proc.stop(timeout)


@dataclass
class Stack(harness.Cluster):
    redis: harness.Redis | None = None
    edges: list[Lb] = field(default_factory=list)
    sidecar: Lb | None = None

    def kwargs(self) -> dict:
        return session_kwargs(self)

    def log_tails(self, lines: int = 40) -> str:
        out = [f"==== {p.name} ====\n{p.proc.tail(lines * 2) if p.proc else '<not started>'}"
               for p in [*self.edges, self.sidecar] if p is not None]
        for b in self.backends:
            out.append(f"==== backend{b.index + 1} {b.addr} alive={b.alive()} ====\n{b.proc.tail(lines // 2)}")
        return "\n".join(out)

    def stop(self) -> None:
        for p in [self.sidecar, *self.edges]:
            if p is not None:
                p.stop(5)
        if self.redis is not None:
            self.redis.stop()
        super().stop()


def edge_config(stack: Stack, port: int, admin_port: int) -> str:
    lines = ["listeners:", f"  - listen: 127.0.0.1:{port}", "admin:", f"  listen: 127.0.0.1:{admin_port}",
             "backends:"]
    for b in stack.backends:
        lines += [f"  - name: cli-{b.index + 1}", f"    address: {b.addr}"]
    lines += ["tenants:", "  - name: team-a", f"    token_hashes: [\"{token_hash(TENANT_TOKEN)}\"]",
              "sessions:", "  shared_storage: true", "  failover: reassign",
              "health:", "  interval: 500ms", "  timeout: 1s", "  rise: 2", "  fall: 3",
              "limits:", "  shutdown_timeout: 20s",
              "state:", "  kind: redis", f"  url: \"{stack.redis.url}\"", f"  key_prefix: \"sc{NONCE}:\"",
              "  sync_interval: 500ms"]
    return "\n".join(lines) + "\n"


def sidecar_config(stack: Stack, port: int, admin_port: int) -> str:
    # What config/sidecar.yaml does, minus mTLS (loopback test; the token is the tenant's).
    lines = ["listeners:", f"  - listen: 127.0.0.1:{port}", "admin:", f"  listen: 127.0.0.1:{admin_port}",
             "backends:"]
    for e in stack.edges:
        lines += [f"  - name: {e.name}", f"    address: {e.url}", "    edge: true",
                  "    token_env: COPILOT_LB_TENANT_TOKEN"]
    lines += ["sessions:", "  shared_storage: true", "  failover: reassign",
              "health:", "  interval: 200ms", "  timeout: 1s", "  rise: 2", "  fall: 2",
              "state:", "  kind: memory"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def stack(e2e_install, tmp_path_factory, request) -> Stack:
    if harness.direct_mode():
        pytest.skip("the sidecar needs the proxy")
    run_dir = tmp_path_factory.mktemp("sidecar-failover")
    model = harness.start_fake_model(run_dir)
    s = Stack(run_dir=run_dir, model=model, backends=[], proxy=None, direct=False)
    request.addfinalizer(s.stop)
    s.backends = harness.start_backends(3, run_dir, shared_state=True)
    s.redis = harness.start_redis(run_dir)
    for i in range(2):
        port, admin_port = harness.free_port(), harness.free_port()
        e = Lb(name=f"edge-{i + 1}", run_dir=run_dir, config="", port=port, admin_port=admin_port)
        e.config = edge_config(s, port, admin_port)
        s.edges.append(e.start())
    port, admin_port = harness.free_port(), harness.free_port()
    s.sidecar = Lb(name="sidecar", run_dir=run_dir, config="", port=port, admin_port=admin_port,
                   env_extra={"COPILOT_LB_TENANT_TOKEN": TENANT_TOKEN})
    s.sidecar.config = sidecar_config(s, port, admin_port)
    s.sidecar.start()
    wait_edges_up(s, timeout=30)
    return s


def wait_edges_up(s: Stack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while set(s.sidecar.states().values()) != {"up"}:
        if time.monotonic() > deadline:
            raise AssertionError(f"the sidecar does not see both edges up: {s.sidecar.states()}")
        time.sleep(0.1)


async def open_sessions(client, s: Stack, tag: str) -> dict[str, tuple[object, list[str]]]:
    """N_SESSIONS sessions with one finished turn each: sid -> (session, prompts so far)."""
    async def one(n: int):
        sid = f"sc-{tag}-{NONCE}-{n}"
        sess = await client.create_session(session_id=sid, **s.kwargs())
        p = f"first turn {sid}"
        ev = await sess.send_and_wait(p, timeout=SEND_TIMEOUT_S)
        assert reply_text(ev) == echo(p), reply_text(ev)
        return sid, (sess, [p])
    return dict(await asyncio.gather(*(one(n) for n in range(N_SESSIONS))))


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
