"""The backend-services guide's own patterns (examples/), run through copilot-lb against the
`cluster` fixture: the fake model + 3 real Copilot CLI servers that share NOTHING + the proxy.

  * examples/express-api/server.mjs (Node SDK, Express 5): one shared CopilotClient, POST /chat
    creates or resumes `user-<userId>` per request. Several users at once, several requests each.
  * examples/worker/worker.py (Python SDK): a session per job, disconnect after.
  * examples/health/health.py and health.mjs, and the Express app's GET /healthz (getStatus).

Every answer is checked against the fake model's rule "ECHO: <prompt upper-cased>". Because the
backends share nothing, a user's later requests only succeed (and only see the earlier turns)
if the proxy routes the resume to the backend that holds the session.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import harness
from conftest import run
from sdkutil import connected, echo, ids_per_backend, owners, session_kwargs, user_messages

pytestmark = pytest.mark.e2e

EXAMPLES = harness.REPO / "examples"
NONCE = uuid.uuid4().hex[:8]
N_USERS = 6
N_REQUESTS = 3
N_JOBS = 8
HTTP_TIMEOUT_S = 60


def example_env(cluster: harness.Cluster, **extra) -> dict:
    """What a deployment sets: the proxy URL, plus BYOK settings for the local fake model."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(cluster.run_dir),
        "PYTHONUNBUFFERED": "1",
        "COPILOT_CLI_URL": cluster.client_url,
        "COPILOT_MODEL": harness.MODEL_NAME,
        "COPILOT_PROVIDER_TYPE": "openai",
        "COPILOT_PROVIDER_BASE_URL": cluster.model.base_url,
        "COPILOT_PROVIDER_API_KEY": "fake-key",
        "COPILOT_PROVIDER_WIRE_API": "completions",
        "COPILOT_SEND_TIMEOUT_MS": "60000",
        "COPILOT_SEND_TIMEOUT_S": "60",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="session")
def node_examples(e2e_install) -> Path:
    """examples/install.sh into <e2e dir>/examples (Express 5 + Node SDK from the npm registry)."""
    if shutil.which("node") is None:
        pytest.fail("node not found on PATH")
    dest = harness.E2E_DIR / "examples"
    try:
        p = subprocess.run(["bash", str(EXAMPLES / "install.sh"), str(dest)], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("examples/install.sh took more than 300 s")
    assert p.returncode == 0, f"examples/install.sh failed:\n{p.stdout}\n{p.stderr}"
    return dest


def post_json(url: str, body: dict, timeout: float = HTTP_TIMEOUT_S) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def get_json(url: str, timeout: float = 30) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def run_example(argv: list[str], env: dict, cwd: Path, timeout: float, stdin: str | None = None):
    try:
        return subprocess.run([str(a) for a in argv], env=env, cwd=str(cwd), input=stdin,
                              stdin=None if stdin is not None else subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{argv} timed out after {timeout} s:\n{e.stdout}\n{e.stderr}")


def test_express_api_concurrent_users(cluster, node_examples):
    port = harness.free_port()
    app = harness.Proc("express-api", ["node", node_examples / "express-api" / "server.mjs"],
                       env=example_env(cluster, HOST=harness.LOOPBACK, PORT=port),
                       cwd=node_examples, log_path=cluster.run_dir / "express-api.log")
    try:
        app.wait_port(port, 30)
        base = f"http://{harness.LOOPBACK}:{port}"

        # bad input is refused before any session is touched
        assert post_json(f"{base}/chat", {"userId": "../x", "message": "hi"})[0] == 400
        assert post_json(f"{base}/chat", {"userId": "u", "message": ""})[0] == 400

        users = [f"u{n}-{NONCE}" for n in range(N_USERS)]
        msg = {u: [f"express {u} turn {k}" for k in range(N_REQUESTS)] for u in users}

        def user_flow(u: str) -> list[tuple[int, dict]]:
            return [post_json(f"{base}/chat", {"userId": u, "message": m}) for m in msg[u]]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=N_USERS) as pool:
            results = dict(zip(users, pool.map(user_flow, users)))
        elapsed = time.perf_counter() - t0
        print(f"\n[e2e] express-api: {N_USERS} users x {N_REQUESTS} requests in {elapsed:.2f} s")

        problems = []
        for u in users:
            for k, (status, body) in enumerate(results[u]):
                want = {"sessionId": f"user-{u}", "resumed": k > 0, "content": echo(msg[u][k])}
                if status != 200 or body != want:
                    problems.append(f"{u} turn {k}: HTTP {status} {body!r}, want {want!r}")
        assert not problems, "wrong answers:\n" + "\n".join(problems) + f"\n--- app log ---\n{app.tail()}"

        # one session per user, on exactly one backend, holding every turn in order
        per_backend = run(ids_per_backend(cluster))
        placement = {u: owners(per_backend, f"user-{u}") for u in users}
        assert all(len(v) == 1 for v in placement.values()), f"sessions not on exactly one backend: {placement}"

        async def histories():
            out = {}
            async with connected(cluster.client_url) as c:
                for u in users:
                    s = await c.resume_session(f"user-{u}", **session_kwargs(cluster))
                    out[u] = [m for m in user_messages(await s.get_events()) if "express " in m]
                    await s.disconnect()
            return out
        hist = run(histories())
        for u in users:
            got = [next((m for m in msg[u] if m in h), h) for h in hist[u]]
            assert got == msg[u], f"history of user-{u}: {hist[u]!r}"

        # the guide's health check, through the app
        status, body = get_json(f"{base}/healthz")
        assert status == 200 and body.get("ok") is True and body.get("version"), body

        # graceful stop on SIGTERM
        app._signal_group(15)
        app.popen.wait(timeout=15)
        assert app.popen.returncode == 0, f"express-api exit {app.popen.returncode}\n{app.tail()}"
    finally:
        app.stop()


def test_worker_session_per_job(cluster):
    jobs = [{"id": f"w{n}-{NONCE}", "prompt": f"worker job {n} nonce {NONCE}"} for n in range(N_JOBS)]
    stdin = "".join(json.dumps(j) + "\n" for j in jobs)
    p = run_example([sys.executable, EXAMPLES / "worker" / "worker.py"],
                    example_env(cluster, WORKER_CONCURRENCY=4), cluster.run_dir, timeout=90, stdin=stdin)
    print(p.stderr[-2000:])
    assert p.returncode == 0, f"worker rc={p.returncode}\n{p.stdout}\n{p.stderr[-4000:]}"
    results = {r["id"]: r for r in map(json.loads, p.stdout.splitlines())}
    assert set(results) == {j["id"] for j in jobs}
    wrong = {j["id"]: results[j["id"]] for j in jobs
             if results[j["id"]].get("content") != echo(j["prompt"])
             or results[j["id"]].get("sessionId") != f"job-{j['id']}"}
    assert not wrong, f"wrong worker results: {wrong}"
    # disconnected, not deleted: each job's session stays on exactly one backend
    per_backend = run(ids_per_backend(cluster))
    placement = {j["id"]: owners(per_backend, f"job-{j['id']}") for j in jobs}
    assert all(len(v) == 1 for v in placement.values()), placement
    assert len({v[0] for v in placement.values()}) > 1, f"all jobs on one backend: {placement}"

    # WORKER_DELETE_SESSIONS=1: the session is gone afterwards, from every backend
    job = {"id": f"wdel-{NONCE}", "prompt": f"worker delete nonce {NONCE}"}
    p = run_example([sys.executable, EXAMPLES / "worker" / "worker.py", "-"],
                    example_env(cluster, WORKER_DELETE_SESSIONS=1), cluster.run_dir, timeout=60,
                    stdin=json.dumps(job) + "\n")
    assert p.returncode == 0, p.stderr[-4000:]
    assert json.loads(p.stdout)["content"] == echo(job["prompt"])
    assert not owners(run(ids_per_backend(cluster)), f"job-{job['id']}")


def test_health_examples(cluster, node_examples):
    env = example_env(cluster)
    p = run_example([sys.executable, EXAMPLES / "health" / "health.py"], env, cluster.run_dir, timeout=30)
    assert p.returncode == 0, f"health.py: {p.stdout} {p.stderr[-2000:]}"
    r = json.loads(p.stdout)
    assert r["ok"] is True and r["version"] and r["protocolVersion"], r

    p = run_example(["node", node_examples / "health" / "health.mjs"], env, node_examples, timeout=30)
    assert p.returncode == 0, f"health.mjs: {p.stdout} {p.stderr[-2000:]}"
    r = json.loads(p.stdout)
    assert r["ok"] is True and r["version"] and r["protocolVersion"], r

    # nothing listening: both report unhealthy, promptly
    dead = f"{harness.LOOPBACK}:{harness.free_port()}"
    for argv, cwd in (([sys.executable, EXAMPLES / "health" / "health.py"], cluster.run_dir),
                      (["node", node_examples / "health" / "health.mjs"], node_examples)):
        t0 = time.monotonic()
        p = run_example(argv, example_env(cluster, COPILOT_CLI_URL=dead, COPILOT_HEALTH_TIMEOUT_S=3,
                                          COPILOT_HEALTH_TIMEOUT_MS=3000), cwd, timeout=30)
        assert p.returncode == 1, f"{argv[-1]} against {dead}: rc={p.returncode} {p.stdout} {p.stderr[-1000:]}"
        assert json.loads(p.stdout.strip().splitlines()[-1])["ok"] is False
        assert time.monotonic() - t0 < 20
