"""The managed pool with the real CLI 1.0.102 and the real Python SDK: copilot-lb starts three
`copilot --headless` servers itself (no harness backends), each with its own fresh token.

* the README's first command (scripts/up.sh, with the binary prebuilt and the CLI on PATH):
  the first lines say what to set without COPILOT_GITHUB_TOKEN, and an SDK session through the
  pool gets the offline model's answer;
* kill -9 of the CLI holding a session: the pool restarts it, and the session continues
  (failed over with its history, the same client object);
* rolling restart under a steady stream of turns from several sessions: every CLI is renewed,
  zero requests fail, and every answer is right.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

import harness
from conftest import run
from sdkutil import connected, echo, reply_text, session_kwargs

pytestmark = pytest.mark.e2e

NONCE = uuid.uuid4().hex[:8]
SEND_TIMEOUT_S = 60


def admin(url: str, path: str, method: str = "GET", timeout: float = 10) -> dict:
    req = urllib.request.Request(url + path, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def backends(url: str) -> list[dict]:
    try:
        return admin(url, "/api/backends")["backends"]
    except (OSError, urllib.error.URLError):
        return []


def wait_all_up(url: str, n: int, timeout: float = 60, restarts: int | None = None) -> list[dict]:
    deadline = time.monotonic() + timeout
    b: list[dict] = []
    while time.monotonic() < deadline:
        b = backends(url)
        if len(b) == n and all(x["state"] == "up" and x["managed"] and x["managed"]["cli_pid"] > 0
                               and (restarts is None or x["managed"]["restarts"] >= restarts) for x in b):
            return b
        time.sleep(0.1)
    raise AssertionError(f"managed pool not up within {timeout} s: {b}")


def placement(url: str, sid: str) -> str | None:
    for s in admin(url, "/api/sessions?limit=10000")["sessions"]:
        if s["session_id"] == sid:
            return s["backend"]
    return None


class Pool:
    """copilot-lb with a managed pool of real CLIs, started like an operator would."""

    def __init__(self, run_dir: Path, model: harness.FakeModel, proc: harness.Proc, port: int, admin_port: int):
        self.run_dir, self.model, self.proc = run_dir, model, proc
        self.url = f"{harness.LOOPBACK}:{port}"
        self.admin_url = f"http://{harness.LOOPBACK}:{admin_port}"

    def provider(self) -> dict:
        return self.model.provider()

    def stop(self) -> None:
        self.proc.stop(timeout=15)
        self.model.stop()


def pool_config(run_dir: Path, port: int, admin_port: int) -> Path:
    cfg = run_dir / "copilot-lb.yaml"
    cfg.write_text(f"""listeners: [{{listen: "{harness.LOOPBACK}:{port}"}}]
admin: {{listen: "{harness.LOOPBACK}:{admin_port}"}}
state: {{path: "{run_dir / 'state.redb'}"}}
health: {{interval: 500ms, timeout: 1s, rise: 2, fall: 3}}
managed:
  count: 3
  command: "{harness.COPILOT_BIN}"
  home: "{run_dir / 'pool'}"
  env_pass: [COPILOT_CACHE_HOME]
  drain_timeout: 30s
""")
    return cfg


def lb_env(run_dir: Path) -> dict:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(run_dir),
            "COPILOT_CACHE_HOME": str(harness.CACHE_DIR), "RUST_LOG": "info"}


@pytest.fixture(scope="module")
def pool(e2e_install, tmp_path_factory, request):
    if harness.direct_mode():
        pytest.skip("the managed pool is the proxy's")
    run_dir = tmp_path_factory.mktemp("managed")
    model = harness.start_fake_model(run_dir)
    port, admin_port = harness.free_port(), harness.free_port()
    cfg = pool_config(run_dir, port, admin_port)
    proc = harness.Proc("copilot-lb", [str(harness.proxy_bin()), "serve", "--config", str(cfg)],
                        env=lb_env(run_dir), cwd=run_dir, log_path=run_dir / "copilot-lb.log")
    p = Pool(run_dir, model, proc, port, admin_port)
    request.addfinalizer(p.stop)
    proc.wait_port(port, 30)
    wait_all_up(p.admin_url, 3)
    return p


def test_readme_first_command_serves_a_managed_pool(e2e_install, tmp_path_factory):
    """scripts/up.sh from a fresh working directory, as the README says (the build and the
    npm install it would do are skipped: COPILOT_LB_BIN names the binary, the CLI is on PATH)."""
    if harness.direct_mode():
        pytest.skip("needs the proxy")
    run_dir = tmp_path_factory.mktemp("first-command")
    model = harness.start_fake_model(run_dir)
    port, admin_port = harness.free_port(), harness.free_port()
    env = lb_env(run_dir)
    env["PATH"] = f"{harness.COPILOT_BIN.parent}:{env['PATH']}"
    env["COPILOT_LB_BIN"] = str(harness.proxy_bin())
    # The repo's config/copilot-lb.yaml as is; only what would clash with other runs on this
    # machine is overridden on the command line.
    argv = ["bash", str(harness.REPO / "scripts" / "up.sh"), "--listen", f"{harness.LOOPBACK}:{port}",
            "--admin", f"{harness.LOOPBACK}:{admin_port}", "--state-path", str(run_dir / "state.redb")]
    proc = harness.Proc("up.sh", argv, env=env, cwd=run_dir, log_path=run_dir / "up.log")
    try:
        proc.wait_port(port, 30)
        head = proc.log_path.read_text().splitlines()[:3]
        assert "COPILOT_GITHUB_TOKEN is not set" in head[0], head
        assert "export COPILOT_GITHUB_TOKEN=" in head[1], head
        url = f"http://{harness.LOOPBACK}:{admin_port}"
        b = wait_all_up(url, 3)
        assert [x["name"] for x in b] == ["cli-1", "cli-2", "cli-3"]
        # The pool lives under the working directory, one session-state shared by all.
        assert (run_dir / ".copilot-lb" / "pool" / "session-state").is_dir()
        assert (run_dir / ".copilot-lb" / "pool" / "cli-1" / "session-state").is_symlink()
        log = proc.log_path.read_text()
        assert "no model credentials are set for the CLIs" in log

        async def go():
            # The README's Quick start, with the offline model as BYOK provider.
            from copilot import CopilotClient, RuntimeConnection
            from copilot.session import PermissionHandler
            client = CopilotClient(connection=RuntimeConnection.for_uri(f"{harness.LOOPBACK}:{port}"))
            await client.start()
            try:
                session = await client.create_session(model=harness.MODEL_NAME, provider=model.provider(),
                                                      on_permission_request=PermissionHandler.approve_all)
                reply = await session.send_and_wait("hello from the readme", timeout=SEND_TIMEOUT_S)
                assert reply.data.content == echo("hello from the readme")
            finally:
                await client.stop()

        run(go())
    finally:
        proc.stop(timeout=15)
        model.stop()
    # A clean stop took every CLI with it.
    assert not [p for p in harness.running_procs() if p is proc]
    left = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if str(run_dir / ".copilot-lb" / "pool") in cmd:
            left.append((d.name, cmd[:200]))
    assert not left, f"CLIs left running: {left}"


def test_sdk_session_through_the_pool_and_tokens_stay_inside(pool):
    async def go():
        async with connected(pool.url) as client:
            s = await client.create_session(session_id=f"mp-{NONCE}", **session_kwargs(pool))
            ev = await s.send_and_wait("through the pool", timeout=SEND_TIMEOUT_S)
            assert reply_text(ev) == echo("through the pool")
    run(go())
    b = backends(pool.admin_url)
    # Each CLI requires its own token, which nothing but the proxy holds: a direct client
    # without it is refused by the CLI.
    addr = b[0]["address"]
    with socket_client(addr) as (send, recv):
        send({"jsonrpc": "2.0", "id": 1, "method": "connect", "params": {}})
        reply = recv()
        assert "error" in reply, reply
    text = json.dumps(b) + (pool.run_dir / "copilot-lb.log").read_text()
    assert "COPILOT_CONNECTION_TOKEN=" not in text


class socket_client:
    """A minimal Content-Length framed JSON-RPC client (one request, one reply)."""

    def __init__(self, addr: str):
        import socket
        host, port = addr.rsplit(":", 1)
        self.s = socket.create_connection((host, int(port)), timeout=10)

    def __enter__(self):
        def send(obj):
            body = json.dumps(obj).encode()
            self.s.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)

        def recv():
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += self.s.recv(65536)
            head, rest = buf.split(b"\r\n\r\n", 1)
            n = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
            while len(rest) < n:
                rest += self.s.recv(65536)
            return json.loads(rest[:n])
        return send, recv

    def __exit__(self, *exc):
        self.s.close()


def test_kill9_of_a_managed_cli_restarts_it_and_the_session_continues(pool):
    async def go():
        async with connected(pool.url) as client:
            sid = f"mp-kill-{NONCE}"
            s = await client.create_session(session_id=sid, **session_kwargs(pool))
            ev = await s.send_and_wait("before the crash", timeout=SEND_TIMEOUT_S)
            assert reply_text(ev) == echo("before the crash")
            where = placement(pool.admin_url, sid)
            victim = next(b for b in backends(pool.admin_url) if b["name"] == where)
            os.kill(victim["managed"]["cli_pid"], signal.SIGKILL)
            # As a crash is seen by the proxy: its guardian reports the exit and the pool
            # marks the backend down (a request written before that is lost with the CLI,
            # retryable -32011, as with any backend: see test_ha_python).
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                b = next(x for x in backends(pool.admin_url) if x["name"] == where)
                if b["state"] != "up" or b["managed"]["restarts"] >= 1:
                    break
                await asyncio.sleep(0.02)
            ev = await s.send_and_wait("after the crash", timeout=SEND_TIMEOUT_S)
            assert reply_text(ev) == echo("after the crash")
            assert placement(pool.admin_url, sid) != where, "the session should have moved"
            # The pool brought the killed CLI back (a new process, a new token).
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                b = next(x for x in backends(pool.admin_url) if x["name"] == where)
                if b["state"] == "up" and b["managed"]["restarts"] >= 1 and b["managed"]["cli_pid"] > 0:
                    break
                await asyncio.sleep(0.1)
            assert b["state"] == "up" and b["managed"]["cli_pid"] != victim["managed"]["cli_pid"], b
            ev = await s.send_and_wait("still here", timeout=SEND_TIMEOUT_S)
            assert reply_text(ev) == echo("still here")
    run(go())


def test_rolling_restart_under_steady_turns_fails_nothing(pool):
    before = wait_all_up(pool.admin_url, 3)
    outcome: dict = {}

    def restart():
        try:
            outcome["report"] = admin(pool.admin_url, "/api/backends/restart", "POST", timeout=90)
        except Exception as e:  # noqa: BLE001
            outcome["error"] = repr(e)

    async def go():
        async with connected(pool.url) as client:
            sessions = []
            for n in range(6):
                s = await client.create_session(session_id=f"mp-roll-{n}-{NONCE}", **session_kwargs(pool))
                await s.send_and_wait(f"warm {n}", timeout=SEND_TIMEOUT_S)
                sessions.append(s)
            stop = asyncio.Event()
            counts = {"ok": 0, "failed": []}

            async def stream(n, s):
                i = 0
                while not stop.is_set():
                    prompt = f"turn {i} of {n}"
                    try:
                        ev = await s.send_and_wait(prompt, timeout=SEND_TIMEOUT_S)
                        if reply_text(ev) == echo(prompt):
                            counts["ok"] += 1
                        else:
                            counts["failed"].append((n, i, reply_text(ev)))
                    except Exception as e:  # noqa: BLE001
                        counts["failed"].append((n, i, repr(e)))
                    i += 1

            tasks = [asyncio.create_task(stream(n, s)) for n, s in enumerate(sessions)]
            await asyncio.sleep(1.0)
            t = threading.Thread(target=restart, daemon=True)
            t.start()
            while t.is_alive():
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*tasks)
            return counts

    counts = run(go())
    assert "error" not in outcome, outcome
    report = outcome["report"]["restarted"]
    assert sorted(r["name"] for r in report) == ["cli-1", "cli-2", "cli-3"], report
    assert not any(r["drain_timed_out"] for r in report), report
    assert counts["failed"] == [], counts["failed"]
    assert counts["ok"] >= 20, counts
    after = wait_all_up(pool.admin_url, 3)
    for a, b in zip(before, after):
        assert b["managed"]["restarts"] == a["managed"]["restarts"] + 1, (a, b)
        assert b["managed"]["cli_pid"] != a["managed"]["cli_pid"]
    print(f"rolling restart: {counts['ok']} turns answered, 0 failed; "
          + ", ".join(f"{r['name']} {r['took_ms']} ms ({r['sessions_moved']} sessions)" for r in report))
