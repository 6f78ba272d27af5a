"""The session-aware sidecar stack (issue #14), shared by test_sidecar_failover.py and
measure_sidecar.py. Not a test module itself.

    app (one CopilotClient) -> sidecar copilot-lb (backends: two edges, `edge: true`)
        -> two edge copilot-lb replicas sharing one real redis-server -> three real CLIs
           sharing session state

`start_stack(run_dir)` starts all of it (fake model, CLIs, redis, edges, sidecar) and returns a
`Stack` whose `stop()` stops everything; `pipe_config` is the old byte-pipe sidecar
(`mode: tcp`) that measure_sidecar.py runs beside it for comparison.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import harness
from sdkutil import echo, reply_text, session_kwargs

NONCE = uuid.uuid4().hex[:8]
TENANT_TOKEN = f"sidecar-tok-{NONCE}"
SEND_TIMEOUT_S = 60
N_SESSIONS = 4


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

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=10) as r:
            return r.read().decode("utf-8", "replace")

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
    extra: list[Lb] = field(default_factory=list)   # e.g. measure_sidecar.py's byte pipe

    def kwargs(self) -> dict:
        return session_kwargs(self)

    def log_tails(self, lines: int = 40) -> str:
        out = [f"==== {p.name} ====\n{p.proc.tail(lines * 2) if p.proc else '<not started>'}"
               for p in [*self.edges, self.sidecar, *self.extra] if p is not None]
        for b in self.backends:
            out.append(f"==== backend{b.index + 1} {b.addr} alive={b.alive()} ====\n{b.proc.tail(lines // 2)}")
        return "\n".join(out)

    def stop(self) -> None:
        for p in [*self.extra, self.sidecar, *self.edges]:
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
    lines += ["tenants:", "  - name: team-a", f"    token_hashes: [\"{harness.hash_token(TENANT_TOKEN)}\"]",
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


def pipe_config(edge: Lb, port: int, admin_port: int) -> str:
    # The old sidecar: bytes passed through to one edge (plain TCP here, mTLS in
    # config/sidecar.yaml); the app sends the tenant token in its own `connect`.
    lines = ["listeners:", "  - name: pipe", f"    listen: 127.0.0.1:{port}", "    mode: tcp",
             "    upstream:", f"      address: {edge.url}",
             "admin:", f"  listen: 127.0.0.1:{admin_port}"]
    return "\n".join(lines) + "\n"


def start_stack(run_dir: Path) -> Stack:
    """Fake model + three CLIs sharing session state + redis + two edges + the sidecar, all
    ready and the sidecar seeing both edges up. On failure, whatever started is stopped."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = harness.start_fake_model(run_dir)
    s = Stack(run_dir=run_dir, model=model, backends=[], proxy=None, direct=False)
    try:
        s.backends = harness.start_backends(3, run_dir, shared_state=True)
        s.redis = harness.start_redis(run_dir)
        for i in range(2):
            port, admin_port = harness.free_port(), harness.free_port()
            e = Lb(name=f"edge-{i + 1}", run_dir=run_dir, config="", port=port, admin_port=admin_port)
            e.config = edge_config(s, port, admin_port)
            s.edges.append(e)
            e.start()
        port, admin_port = harness.free_port(), harness.free_port()
        s.sidecar = Lb(name="sidecar", run_dir=run_dir, config="", port=port, admin_port=admin_port,
                       env_extra={"COPILOT_LB_TENANT_TOKEN": TENANT_TOKEN})
        s.sidecar.config = sidecar_config(s, port, admin_port)
        s.sidecar.start()
        wait_edges_up(s, timeout=30)
        return s
    except BaseException:
        s.stop()
        raise


def wait_edges_up(s: Stack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while set(s.sidecar.states().values()) != {"up"}:
        if time.monotonic() > deadline:
            raise AssertionError(f"the sidecar does not see both edges up: {s.sidecar.states()}")
        time.sleep(0.1)


async def open_sessions(client, s: Stack, tag: str, n_sessions: int = N_SESSIONS,
                        timeout: float = SEND_TIMEOUT_S) -> dict[str, tuple[object, list[str]]]:
    """n_sessions sessions with one finished turn each: sid -> (session, prompts so far)."""
    async def one(n: int):
        sid = f"sc-{tag}-{NONCE}-{n}"
        sess = await client.create_session(session_id=sid, **s.kwargs())
        p = f"first turn {sid}"
        ev = await sess.send_and_wait(p, timeout=timeout)
        if reply_text(ev) != echo(p):
            raise AssertionError(f"{sid}: first turn answered {reply_text(ev)!r}")
        return sid, (sess, [p])
    return dict(await asyncio.gather(*(one(n) for n in range(n_sessions))))
