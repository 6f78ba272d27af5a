"""A fleet of copilot-lb replicas on one Redis (issue 13), with the real CLI and the real Python SDK.

  SDK (tenant token) --> copilot-lb replica 1 ┐                 ┌--> CLI 1 ┐
  SDK (tenant token) --> copilot-lb replica 2 ┼-- Redis record --┼--> CLI 2 ┼-- one shared session-state
                          (replica 3 later)   ┘                 └--> CLI 3 ┘

Every replica has the same backends, tenants and `state: {kind: redis}`; each test starts its own
redis-server (loopback, temp dir, no persistence) and its own replicas, while one pool of three
real CLIs (sharing one session-state directory) and the fake model serve the whole module. Every
test uses its own session ids.

1. off-home: a session replica 1 placed off its rendezvous home is used and deleted through replica 2;
2. one live owner: one session open through two replicas at once lives on one CLI; one history;
3. tenant ownership across replicas and across a replica restart (kill -9);
4. a replica killed with -9: a new client through another replica resumes, history intact;
5. Redis stalled (SIGSTOP) and restarted empty while sessions are in use;
6. the session's CLI killed with -9 while two replicas have it open: both follow one move;
7. a create refused during a stall leaves no record;
8. caps across replicas: a tenant's and a backend's max_sessions count every replica's sessions.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import harness
from conftest import run
from rawrpc import RawClient
from sdkutil import close_client, connected, echo, list_ids, new_client, recall, reply_text, user_messages
from copilot.session import PermissionHandler

pytestmark = pytest.mark.e2e

NONCE = uuid.uuid4().hex[:8]
TOKENS = {"team-a": f"fleet-tok-a-{NONCE}", "team-b": f"fleet-tok-b-{NONCE}"}
PREFIX = "e2e:"
SEND_TIMEOUT_S = 60
FOREIGN = -32012        # another tenant's session (or no record of it)
UNAVAILABLE = -32011    # retryable: no backend, or the registry cannot answer
SESSION_LIMIT = -32013  # a tenant's or a backend's max_sessions
SYNC_INTERVAL_MS = 500  # state.sync_interval of every replica: live counts are exchanged this often


# ---------------------------------------------------------------------------------------
# the CLI pool (module) and the replicas (per test)
# ---------------------------------------------------------------------------------------
@dataclass
class Pool:
    run_dir: Path
    model: harness.FakeModel
    backends: list[harness.Backend]

    def names(self) -> list[str]:
        return [f"cli-{b.index + 1}" for b in self.backends]

    def backend(self, name: str) -> harness.Backend:
        return self.backends[int(name.split("-")[1]) - 1]

    def kwargs(self) -> dict:
        """create_session / resume_session kwargs: the BYOK fake model (needed on create AND resume)."""
        return dict(model=harness.MODEL_NAME, provider=self.model.provider(),
                    on_permission_request=PermissionHandler.approve_all)


@pytest.fixture(scope="module")
def pool(e2e_install, tmp_path_factory, request) -> Pool:
    if harness.direct_mode():
        pytest.skip("fleet scenarios need the proxy")
    run_dir = tmp_path_factory.mktemp("fleet-pool")
    model = harness.start_fake_model(run_dir)
    try:
        backends = harness.start_backends(3, run_dir, shared_state=True)
    except Exception:
        model.stop()
        raise
    p = Pool(run_dir=run_dir, model=model, backends=backends)

    def fin():
        for b in reversed(p.backends):
            b.stop()
        model.stop()
    request.addfinalizer(fin)
    print(f"\n[e2e] fleet pool: model {model.base_url}, backends {[b.addr for b in backends]} "
          f"(start {[round(b.start_s, 2) for b in backends]} s), run dir {run_dir}", flush=True)
    return p


def replica_config(pool: Pool, redis: harness.Redis, port: int, admin_port: int, drain=(),
                   tenant_caps=None, backend_caps=None) -> str:
    lines = [
        "listeners:",
        f"  - listen: 127.0.0.1:{port}",
        "admin:",
        f"  listen: 127.0.0.1:{admin_port}",
        "backends:",
    ]
    for name, b in zip(pool.names(), pool.backends):
        lines += [f"  - name: {name}", f"    address: {b.addr}"]
        if name in drain:
            lines.append("    drain: true")
        if name in (backend_caps or {}):
            lines.append(f"    max_sessions: {backend_caps[name]}")
    lines += ["tenants:"]
    for tenant, tok in TOKENS.items():
        lines += [f"  - name: {tenant}", f"    token_hashes: [\"{harness.hash_token(tok)}\"]"]
        if tenant in (tenant_caps or {}):
            lines.append(f"    max_sessions: {tenant_caps[tenant]}")
    lines += [
        "sessions:",
        "  shared_storage: true",
        "  failover: reassign",
        "health:",
        "  interval: 500ms",
        "  timeout: 1s",
        "  rise: 2",
        "  fall: 3",
        "state:",
        "  kind: redis",
        f"  url: \"{redis.url}\"",
        f"  key_prefix: \"{PREFIX}\"",
        f"  sync_interval: {SYNC_INTERVAL_MS}ms",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Replica:
    name: str
    run_dir: Path
    config_path: Path
    port: int
    admin_port: int
    proc: harness.Proc | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "Replica":
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(self.run_dir),
               "RUST_BACKTRACE": "1",
               "RUST_LOG": os.environ.get("COPILOT_LB_E2E_RUST_LOG", "info,copilot_lb=debug")}
        self.proc = harness.Proc(self.name, [str(harness.proxy_bin()), "serve", "--config", str(self.config_path)],
                                 env=env, cwd=self.run_dir, log_path=self.run_dir / f"{self.name}.log")
        try:
            self.proc.wait_port(self.port, timeout)
            self.proc.wait_port(self.admin_port, timeout)
            self.wait_ready(timeout)
        except Exception:
            self.proc.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.proc.tail()}")
            time.sleep(0.05)

    def kill9(self) -> None:
        self.proc.kill9()

    def restart(self) -> "Replica":
        """Start again with the same config (same ports)."""
        if self.proc is not None:
            self.proc.stop()
        return self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def admin(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=10) as r:
            return json.load(r)

    def sessions(self) -> dict[str, dict]:
        return {s["session_id"]: s for s in self.admin("/api/sessions?limit=10000")["sessions"]}

    def placement(self, sid: str) -> str | None:
        s = self.sessions().get(sid)
        return s["backend"] if s else None

    def tail(self, lines: int = 80) -> str:
        return self.proc.tail(lines) if self.proc else "<not started>"


@dataclass
class Fleet(harness.Cluster):
    """One test's Redis and replicas in front of the module's CLI pool (a Cluster, so a failing
    test gets every log tail attached by conftest)."""
    pool: Pool | None = None
    redis: harness.Redis | None = None
    replicas: list[Replica] = field(default_factory=list)

    def replica(self, name: str, drain=(), **caps) -> Replica:
        port, admin_port = harness.free_port(), harness.free_port()
        cfg = self.run_dir / f"{name}.yaml"
        cfg.write_text(replica_config(self.pool, self.redis, port, admin_port, drain, **caps))
        r = Replica(name=name, run_dir=self.run_dir, config_path=cfg, port=port, admin_port=admin_port)
        self.replicas.append(r)
        return r.start()

    def record(self, sid: str) -> dict[str, str]:
        return self.redis.hgetall(f"{PREFIX}s:{sid}")

    def log_tails(self, lines: int = 40) -> str:
        out = [f"==== {r.name} ({r.run_dir / (r.name + '.log')}) ====\n{r.tail(lines * 2)}" for r in self.replicas]
        if self.redis is not None:
            out.append(f"==== redis :{self.redis.port} keys ====\n"
                       + (str(self.redis.keys(PREFIX + "*")) if self.redis.ping() else "<not answering>"))
        for b in self.backends:
            out.append(f"==== backend{b.index + 1} {b.addr} alive={b.alive()} ====\n{b.proc.tail(lines // 2)}"
                       f"\n-- CLI log-dir tail {b.cli_log_tail(lines // 2)}")
        return "\n".join(out)

    def stop(self) -> None:
        for r in reversed(self.replicas):
            r.stop()
        if self.redis is not None:
            self.redis.stop()


@pytest.fixture
def fleet(pool, tmp_path, request) -> Fleet:
    redis = harness.start_redis(tmp_path)
    f = Fleet(run_dir=tmp_path, model=pool.model, backends=pool.backends, proxy=None, direct=False,
              pool=pool, redis=redis)
    request.addfinalizer(f.stop)
    return f


def route(config_path: Path, sid: str) -> list[str]:
    """Backend names in `sid`'s rendezvous order (`copilot-lb route`)."""
    out = subprocess.run([str(harness.proxy_bin()), "route", "--config", str(config_path), sid],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return [line.split()[1] for line in out.splitlines() if line.strip()]


def sid_homed(config_path: Path, stem: str, want_home=None, avoid_home=None) -> tuple[str, str]:
    """A fresh session id (and its home) whose rendezvous home is / is not the given backend."""
    for n in range(200):
        sid = f"{stem}-{n}-{NONCE}"
        home = route(config_path, sid)[0]
        if (want_home is None or home == want_home) and (avoid_home is None or home != avoid_home):
            return sid, home
    raise AssertionError(f"no id {stem}-N-{NONCE} with home {want_home!r} / not {avoid_home!r}")


def cli_log_lines(b: harness.Backend, sid: str) -> list[str]:
    """Lines of every file in the CLI's own log dir that name `sid`."""
    out = []
    for p in sorted((b.state_dir / "logs").glob("*")):
        out += [line for line in p.read_text("utf-8", "replace").splitlines() if sid in line]
    return out


def assert_only_cli(pool: Pool, sid: str, placed: str) -> None:
    """Only the CLI the record names ever handled `sid` (the CLI logs "Created session: ID" and
    "Resumed session: ID"; a second live owner, or a call sent to the wrong CLI, shows up there)."""
    mine = cli_log_lines(pool.backend(placed), sid)
    assert any(f"session: {sid}" in line for line in mine), f"{placed}'s CLI log never names {sid}"
    others = {n: cli_log_lines(pool.backend(n), sid) for n in pool.names() if n != placed}
    seen = {n: lines[:3] for n, lines in others.items() if lines}
    assert not seen, f"{sid} (recorded on {placed}) was handled by other CLIs too: {seen}"


def wire_create(pool: Pool, sid: str) -> dict:
    """`session.create` params as the SDK puts them on the wire (BYOK fake model)."""
    p = pool.model.provider()
    return {"sessionId": sid, "model": harness.MODEL_NAME,
            "provider": {"type": p["type"], "baseUrl": p["base_url"], "apiKey": p["api_key"],
                         "wireApi": p["wire_api"]}}


def error_code(reply: dict) -> int | None:
    return (reply.get("error") or {}).get("code")


def poll(pred, timeout: float, what: str, interval: float = 0.05):
    """pred() until truthy (returned) or the deadline (AssertionError naming `what`)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last value {v!r})")
        time.sleep(interval)


async def apoll(pred, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last value {v!r})")
        await asyncio.sleep(interval)


async def listed_everywhere(pool: Pool, sid: str) -> dict[str, bool]:
    """Whether each CLI (asked directly, bypassing every replica) lists `sid`."""
    out = {}
    for name, b in zip(pool.names(), pool.backends):
        async with connected(b.url, fast_close=True) as c:
            out[name] = sid in await list_ids(c)
    return out


async def refused_to(addr: str, tenant: str, sid: str) -> dict:
    """Tenant `tenant` through `addr` (raw JSON-RPC): resume, read, write and delete of `sid`
    must all be refused with -32012, and `sid` must not be in its session list."""
    c = await RawClient.open(addr, token=TOKENS[tenant])
    try:
        replies = {}
        for method, params in [("session.resume", {"sessionId": sid}),
                               ("session.getMessages", {"sessionId": sid}),
                               ("session.send", {"sessionId": sid, "prompt": f"intruder {NONCE}"}),
                               ("session.delete", {"sessionId": sid})]:
            replies[method] = await c.call(method, params, 30)
        listed = await c.call("session.list", {}, 30)
    finally:
        c.abort()
    for method, r in replies.items():
        assert error_code(r) == FOREIGN, f"{tenant} via {addr}: {method} {sid} not refused: {r}"
    assert "result" in listed, listed
    assert sid not in json.dumps(listed["result"]), f"{tenant} via {addr} lists {sid}"
    return replies


# ---------------------------------------------------------------------------------------
# 1. off-home placement used and deleted through the other replica
# ---------------------------------------------------------------------------------------
def test_fleet_off_home_session_used_and_deleted_through_other_replica(fleet):
    f, pool = fleet, fleet.pool
    plain = f.run_dir / "plain.yaml"  # the ranking is the same for every replica
    plain.write_text(replica_config(pool, f.redis, 1, 2))
    sid = f"fleet-offhome-{NONCE}"
    ranking = route(plain, sid)
    home = ranking[0]
    r1 = f.replica("replica1", drain=[home])  # replica 1 must place it off home
    r2 = f.replica("replica2")
    turn1 = f"offhome turn one {NONCE}"

    async def go():
        async with connected(r1.url, token=TOKENS["team-a"]) as c1:
            s = await c1.create_session(session_id=sid, **pool.kwargs())
            ev = await s.send_and_wait(turn1, timeout=SEND_TIMEOUT_S)
            assert reply_text(ev) == echo(turn1)
            placed = r1.placement(sid)
            await s.disconnect()
        assert placed and placed != home, f"replica 1 placed {sid} on {placed}, home {home} (drained there)"
        rec = f.record(sid)
        assert rec.get("o") == "team-a" and rec.get("b") == placed, f"record {rec}, replica 1 placed on {placed}"

        async with connected(r2.url, token=TOKENS["team-a"]) as c2:
            s = await c2.resume_session(sid, **pool.kwargs())
            history = user_messages(await s.get_events())
            assert any(turn1 in u for u in history), f"turn 1 missing through replica 2: {history}"
            ask = f"RECALL offhome {NONCE}"
            ev = await s.send_and_wait(ask, timeout=SEND_TIMEOUT_S)
            assert reply_text(ev) == recall(turn1), reply_text(ev)
            assert r2.placement(sid) == placed, \
                f"replica 2 routes {sid} to {r2.placement(sid)}, the record says {placed} (home {home})"
            await s.disconnect()
            await c2.delete_session(sid)
            listed2 = await list_ids(c2)
        assert sid not in listed2, "deleted session still listed through replica 2"
        async with connected(r1.url, token=TOKENS["team-a"]) as c1:
            assert sid not in await list_ids(c1), "deleted session still listed through replica 1"
        everywhere = await listed_everywhere(pool, sid)
        assert not any(everywhere.values()), f"deleted session still listed by CLIs {everywhere}"
        return placed

    placed = run(go())
    assert_only_cli(pool, sid, placed)
    assert not (pool.run_dir / "shared-session-state" / sid).exists(), "session-state dir survived the delete"
    assert f.record(sid) == {}, f"record survived the delete: {f.record(sid)}"
    poll(lambda: sid not in r1.sessions(), 5, f"replica 1 forgetting deleted {sid}")
    print(f"[e2e] off-home: home {home}, placed on {placed}, used and deleted through replica 2")


# ---------------------------------------------------------------------------------------
# 2. one live owner across replicas (shared storage): one CLI, one history
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["home", "off-home"])
def test_fleet_one_live_owner_one_history(fleet, where):
    f, pool = fleet, fleet.pool
    drained = "cli-1"
    r1 = f.replica("replica1", drain=[drained])
    r2 = f.replica("replica2")
    if where == "home":
        sid, home = sid_homed(r2.config_path, "fleet-owner1-home", avoid_home=drained)
    else:
        sid, home = sid_homed(r2.config_path, "fleet-owner1-off", want_home=drained)
    t1, t2, t3 = (f"one owner {where} turn {n} {NONCE}" for n in (1, 2, 3))

    async def go():
        c1 = new_client(r1.url, TOKENS["team-a"])
        c2 = new_client(r2.url, TOKENS["team-a"])
        try:
            await c1.start()
            await c2.start()
            s1 = await c1.create_session(session_id=sid, **pool.kwargs())
            assert reply_text(await s1.send_and_wait(t1, timeout=SEND_TIMEOUT_S)) == echo(t1)
            placed = r1.placement(sid)
            if where == "home":
                assert placed == home, f"{sid}: home {home}, replica 1 placed it on {placed}"
            else:
                assert placed and placed != home, f"{sid}: home {home} drained on replica 1, placed on {placed}"
            # The same tenant opens it through replica 2 while replica 1's client still holds it.
            s2 = await c2.resume_session(sid, **pool.kwargs())
            assert reply_text(await s2.send_and_wait(t2, timeout=SEND_TIMEOUT_S)) == echo(t2)
            assert reply_text(await s1.send_and_wait(t3, timeout=SEND_TIMEOUT_S)) == echo(t3)
            p1, p2 = r1.sessions().get(sid), r2.sessions().get(sid)
            rec = f.record(sid)
            assert p1 and p2, f"replica sessions: 1 {p1}, 2 {p2}"
            assert p1["backend"] == p2["backend"] == rec.get("b") == placed, \
                f"two owners: replica 1 -> {p1['backend']}, replica 2 -> {p2['backend']}, record {rec}"
            assert p1["live_connections"] >= 1 and p2["live_connections"] >= 1, (p1, p2)
            # One history: each client's model request sees every turn, in order.
            ask1 = f"RECALL via replica 1 {where} {NONCE}"
            r_1 = reply_text(await s1.send_and_wait(ask1, timeout=SEND_TIMEOUT_S))
            assert r_1 == recall(t1, t2, t3), f"replica 1's client sees a forked history: {r_1}"
            ask2 = f"RECALL via replica 2 {where} {NONCE}"
            r_2 = reply_text(await s2.send_and_wait(ask2, timeout=SEND_TIMEOUT_S))
            assert r_2 == recall(t1, t2, t3, ask1), f"replica 2's client sees a forked history: {r_2}"
            prompts = [t1, t2, t3, ask1, ask2]
            for n, s in ((1, s1), (2, s2)):
                users = user_messages(await s.get_events())
                seen = [p for u in users for p in prompts if p in u]
                assert seen == prompts, f"history read through replica {n}: {seen} (all user messages {users})"
            await s1.disconnect()
            await s2.disconnect()
            return placed
        finally:
            await close_client(c1, fast=True)
            await close_client(c2, fast=True)

    placed = run(go())
    assert_only_cli(pool, sid, placed)
    print(f"[e2e] one owner ({where}): home {home}, on {placed} through both replicas")


# ---------------------------------------------------------------------------------------
# 3. tenant ownership across replicas and across a replica restart
# ---------------------------------------------------------------------------------------
def test_fleet_tenant_ownership_across_replicas_and_restart(fleet):
    f, pool = fleet, fleet.pool
    r1 = f.replica("replica1")
    r2 = f.replica("replica2")
    sid = f"fleet-tenant-{NONCE}"
    turn1 = f"tenant a private {NONCE}"

    async def create():
        async with connected(r1.url, token=TOKENS["team-a"]) as c:
            s = await c.create_session(session_id=sid, **pool.kwargs())
            assert reply_text(await s.send_and_wait(turn1, timeout=SEND_TIMEOUT_S)) == echo(turn1)
            await s.disconnect()
    run(create())
    assert f.record(sid).get("o") == "team-a", f.record(sid)

    run(refused_to(r2.url, "team-b", sid))   # replica 2 never saw it
    r1.kill9()
    r1.restart()
    run(refused_to(r1.url, "team-b", sid))   # the restarted replica 1 (empty cache)
    assert f.record(sid).get("o") == "team-a", f"B changed the record: {f.record(sid)}"

    async def owner_again():
        async with connected(r1.url, token=TOKENS["team-a"]) as c:
            s = await c.resume_session(sid, **pool.kwargs())
            ask = f"RECALL tenant {NONCE}"
            got = reply_text(await s.send_and_wait(ask, timeout=SEND_TIMEOUT_S))
            await s.disconnect()
            return got
    assert run(owner_again()) == recall(turn1)
    assert_only_cli(pool, sid, f.record(sid)["b"])
    assert pool.model.chat_requests() and not [
        r for r in pool.model.chat_requests() if f"intruder {NONCE}" in json.dumps(r.get("body"))], \
        "tenant B's prompt reached the model"


# ---------------------------------------------------------------------------------------
# 4. a replica killed with -9; the session continues through another one
# ---------------------------------------------------------------------------------------
def test_fleet_replica_kill9_session_continues_through_another(fleet):
    f, pool = fleet, fleet.pool
    r1 = f.replica("replica1")
    r2 = f.replica("replica2")
    sid = f"fleet-crash-{NONCE}"
    turn1 = f"before the replica dies {NONCE}"

    async def go():
        c1 = new_client(r1.url, TOKENS["team-a"])
        try:
            await c1.start()
            s1 = await c1.create_session(session_id=sid, **pool.kwargs())
            assert reply_text(await s1.send_and_wait(turn1, timeout=SEND_TIMEOUT_S)) == echo(turn1)
            placed = r1.placement(sid)
            r1.kill9()  # replica 1's client keeps its (now dead) connection; a NEW client goes to replica 2
            t0 = time.perf_counter()
            async with connected(r2.url, token=TOKENS["team-a"]) as c2:
                s2 = await c2.resume_session(sid, **pool.kwargs())
                history = user_messages(await s2.get_events())
                ask = f"RECALL after the crash {NONCE}"
                got = reply_text(await s2.send_and_wait(ask, timeout=SEND_TIMEOUT_S))
                took = time.perf_counter() - t0
                assert any(turn1 in u for u in history), f"history lost: {history}"
                assert got == recall(turn1), got
                assert r2.placement(sid) == placed == f.record(sid).get("b"), \
                    (r2.placement(sid), placed, f.record(sid))
                await s2.disconnect()
            return took, placed
        finally:
            await close_client(c1, fast=True)

    took, placed = run(go())
    assert_only_cli(pool, sid, placed)
    print(f"[e2e] replica kill -9 -> new client's resume + turn through replica 2: {took * 1000:.0f} ms")


# ---------------------------------------------------------------------------------------
# 5. Redis stalled, then restarted empty, while sessions are in use
# ---------------------------------------------------------------------------------------
def test_fleet_redis_stalled_then_restarted_empty(fleet):
    f, pool = fleet, fleet.pool
    r1 = f.replica("replica1")
    r2 = f.replica("replica2")
    sid_open = f"fleet-stall-open-{NONCE}"      # open through replica 1 the whole time
    sid_unseen = f"fleet-stall-unseen-{NONCE}"  # created through replica 2; replica 1 never loaded it
    sid_idle = f"fleet-stall-idle-{NONCE}"      # created through replica 2; nobody holds it later
    sid_new = f"fleet-stall-new-{NONCE}"        # a create during the stall (refused), retried after
    key = lambda sid: f"{PREFIX}s:{sid}"  # noqa: E731
    t_open, t_unseen, t_idle = (f"stall {n} turn one {NONCE}" for n in ("open", "unseen", "idle"))
    timings = {}

    async def go():
        c1 = new_client(r1.url, TOKENS["team-a"])
        c3 = None
        try:
            await c1.start()
            s_open = await c1.create_session(session_id=sid_open, **pool.kwargs())
            assert reply_text(await s_open.send_and_wait(t_open, timeout=SEND_TIMEOUT_S)) == echo(t_open)
            async with connected(r2.url, token=TOKENS["team-a"]) as c2:
                for sid, t in ((sid_unseen, t_unseen), (sid_idle, t_idle)):
                    s = await c2.create_session(session_id=sid, **pool.kwargs())
                    assert reply_text(await s.send_and_wait(t, timeout=SEND_TIMEOUT_S)) == echo(t)
                    await s.disconnect()
            assert sid_unseen not in r1.sessions(), "replica 1 already knows the session it must not"
            assert f.record(sid_unseen).get("o") == "team-a"

            p = f"during the stall {NONCE}"

            async def turn():  # a session replica 1 holds keeps answering
                t0 = time.perf_counter()
                ev = await s_open.send_and_wait(p, timeout=30)
                timings["turn_during_stall_s"] = time.perf_counter() - t0
                return reply_text(ev)

            async def refusals():  # what needs the record fails closed, retryable, within seconds
                raw = await RawClient.open(r1.url, token=TOKENS["team-a"])
                try:
                    t0 = time.perf_counter()
                    resume = await raw.call("session.resume", {"sessionId": sid_unseen}, 15)
                    timings["refusal_s"] = time.perf_counter() - t0
                    create = await raw.call("session.create", wire_create(pool, sid_new), 15)
                    return resume, create
                finally:
                    raw.abort()

            f.redis.pause()
            try:
                answer, (resume, create) = await asyncio.gather(turn(), refusals())
                reg = r1.admin("/api/registry")
            finally:
                f.redis.resume()
            assert answer == echo(p), answer
            assert error_code(resume) == UNAVAILABLE, f"resume of an unseen session during the stall: {resume}"
            assert (resume["error"].get("data") or {}).get("retryable") is True, resume
            assert timings["refusal_s"] < 5, f"refusal took {timings['refusal_s']:.1f} s"
            # README: new sessions are refused during the outage too (retryable).
            assert error_code(create) == UNAVAILABLE, f"create during the stall: {create}"
            assert (create["error"].get("data") or {}).get("retryable") is True, create
            assert reg.get("up") is False, f"replica 1 reports the stalled registry as {reg}"

            # After SIGCONT the same resume works (a retryable refusal may still come first).
            deadline = time.monotonic() + 15
            t0 = time.perf_counter()
            while True:
                c3 = new_client(r1.url, TOKENS["team-a"])
                await c3.start()
                try:
                    s_unseen = await c3.resume_session(sid_unseen, **pool.kwargs())
                    break
                except Exception as e:  # noqa: BLE001
                    assert str(UNAVAILABLE) in str(e), f"resume after the stall: {e}"
                    await close_client(c3, fast=True)
                    c3 = None
                    assert time.monotonic() < deadline, f"resume still refused 15 s after SIGCONT: {e}"
                    await asyncio.sleep(0.2)
            timings["recovered_s"] = time.perf_counter() - t0
            ask = f"RECALL unseen {NONCE}"
            assert reply_text(await s_unseen.send_and_wait(ask, timeout=SEND_TIMEOUT_S)) == recall(t_unseen)
            placed = {sid_open: r1.placement(sid_open), sid_unseen: r1.placement(sid_unseen)}
            # The refused create never reached a CLI; retried (through the other replica), it works.
            # (Its record may exist already: Redis runs the insert it had queued when it resumes.)
            assert not any((await listed_everywhere(pool, sid_new)).values()), "refused create reached a CLI"
            async with connected(r2.url, token=TOKENS["team-a"]) as c5:
                s5 = await c5.create_session(session_id=sid_new, **pool.kwargs())
                t_new = f"created after the stall {NONCE}"
                assert reply_text(await s5.send_and_wait(t_new, timeout=SEND_TIMEOUT_S)) == echo(t_new)
                new_on = r2.placement(sid_new)
                await s5.disconnect()
            rec = f.record(sid_new)
            assert rec.get("o") == "team-a" and rec.get("b") == new_on, f"{sid_new}: record {rec}, on {new_on}"

            # Redis comes back empty: the replicas re-assert what their clients hold.
            f.redis.restart_empty()
            t0 = time.perf_counter()
            await apoll(lambda: all(f.redis.command("EXISTS", key(s)) for s in placed), 10,
                        "held sessions re-asserted after Redis restarted empty")
            timings["reasserted_s"] = time.perf_counter() - t0
            for sid, backend in placed.items():
                rec = f.record(sid)
                assert rec.get("o") == "team-a" and rec.get("b") == backend, f"{sid}: re-asserted as {rec}"

            # A replica that never saw anything, started after the restart.
            r3 = f.replica("replica3")
            await refused_to(r3.url, "team-b", sid_open)
            # Unheld when Redis lost it: unknown now, so nobody's (never claimable by B).
            c = await RawClient.open(r3.url, token=TOKENS["team-b"])
            try:
                reply = await c.call("session.resume", {"sessionId": sid_idle}, 30)
            finally:
                c.abort()
            assert error_code(reply) == FOREIGN, f"B's resume of A's unheld session after the restart: {reply}"
            # The owner still has the held one through the new replica, one history.
            async with connected(r3.url, token=TOKENS["team-a"]) as c4:
                s4 = await c4.resume_session(sid_open, **pool.kwargs())
                ask = f"RECALL open {NONCE}"
                got = reply_text(await s4.send_and_wait(ask, timeout=SEND_TIMEOUT_S))
                assert got == recall(t_open, p), got
                assert r3.placement(sid_open) == placed[sid_open]
                await s4.disconnect()
            ev = await s_open.send_and_wait(f"still here {NONCE}", timeout=SEND_TIMEOUT_S)
            assert reply_text(ev) == echo(f"still here {NONCE}")
        finally:
            await close_client(c1, fast=True)
            if c3 is not None:
                await close_client(c3, fast=True)
        return placed, new_on

    placed, new_on = run(go())
    for sid, backend in list(placed.items()) + [(sid_new, new_on)]:
        assert_only_cli(pool, sid, backend)
    print("[e2e] redis outage: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items()))
    assert timings["reasserted_s"] < 2.5, f"re-assertion took {timings['reasserted_s']:.1f} s (sync_interval 500ms)"


# ---------------------------------------------------------------------------------------
# 6. the session's CLI dies while two replicas have it open: one move, one history
# ---------------------------------------------------------------------------------------
def test_fleet_backend_kill9_with_session_open_through_two_replicas(fleet):
    f, pool = fleet, fleet.pool
    sid = f"fleet-failover-{NONCE}"
    plain = f.run_dir / "plain.yaml"
    plain.write_text(replica_config(pool, f.redis, 1, 2))
    ranking = route(plain, sid)
    # Replica 1 drains the session's second choice: left alone, the two replicas would move it
    # to different CLIs (replica 1 to the third choice, replica 2 to the second).
    r1 = f.replica("replica1", drain=[ranking[1]])
    r2 = f.replica("replica2")
    t1, t2, t3, t4 = (f"failover turn {n} {NONCE}" for n in (1, 2, 3, 4))
    killed = None

    async def go():
        nonlocal killed
        c1, c2 = new_client(r1.url, TOKENS["team-a"]), new_client(r2.url, TOKENS["team-a"])
        try:
            await c1.start()
            await c2.start()
            s1 = await c1.create_session(session_id=sid, **pool.kwargs())
            assert reply_text(await s1.send_and_wait(t1, timeout=SEND_TIMEOUT_S)) == echo(t1)
            s2 = await c2.resume_session(sid, **pool.kwargs())
            assert reply_text(await s2.send_and_wait(t2, timeout=SEND_TIMEOUT_S)) == echo(t2)
            before = f.record(sid).get("b")
            assert before == ranking[0], f"{sid} placed on {before}, home {ranking[0]}"
            assert r1.placement(sid) == r2.placement(sid) == before, (r1.placement(sid), r2.placement(sid), before)
            killed = before
            pool.backend(before).kill9()
            # Both clients go on; both replicas end up on the one backend the record names.
            assert reply_text(await s1.send_and_wait(t3, timeout=SEND_TIMEOUT_S)) == echo(t3)
            assert reply_text(await s2.send_and_wait(t4, timeout=SEND_TIMEOUT_S)) == echo(t4)
            after = f.record(sid).get("b")
            assert after and after != before, f"record still on the dead {before}: {f.record(sid)}"
            assert r1.placement(sid) == r2.placement(sid) == after, \
                f"replica 1 -> {r1.placement(sid)}, replica 2 -> {r2.placement(sid)}, record -> {after}"
            ask1, ask2 = f"RECALL failover 1 {NONCE}", f"RECALL failover 2 {NONCE}"
            got1 = reply_text(await s1.send_and_wait(ask1, timeout=SEND_TIMEOUT_S))
            assert got1 == recall(t1, t2, t3, t4), f"replica 1's client after the move: {got1}"
            got2 = reply_text(await s2.send_and_wait(ask2, timeout=SEND_TIMEOUT_S))
            assert got2 == recall(t1, t2, t3, t4, ask1), f"replica 2's client after the move: {got2}"
            await s1.disconnect()
            await s2.disconnect()
            return before, after
        finally:
            await close_client(c1, fast=True)
            await close_client(c2, fast=True)

    try:
        before, after = run(go())
    finally:
        if killed is not None:  # the module's pool gets its CLI back for any later test
            i = int(killed.split("-")[1]) - 1
            pool.backends[i] = harness.restart_backend(pool.backends[i], pool.run_dir)
    others = [n for n in pool.names() if n not in (before, after)]
    for n in others:
        assert not cli_log_lines(pool.backend(n), sid), f"{sid} moved {before} -> {after} but {n} handled it too"
    print(f"[e2e] backend kill -9 with two replicas: {before} -> {after} (ranking {ranking}, "
          f"{ranking[1]} drained on replica 1), one history")


# ---------------------------------------------------------------------------------------
# 7. a create refused during a stall must not leave a record behind (known bug, see reason)
# ---------------------------------------------------------------------------------------
def test_fleet_create_refused_during_stall_leaves_no_record(fleet):
    f, pool = fleet, fleet.pool
    r1 = f.replica("replica1")
    sid = f"fleet-ghost-{NONCE}"

    async def refused_create():
        raw = await RawClient.open(r1.url, token=TOKENS["team-a"])
        try:
            # A replica that has created a session before (its connection to Redis is up and
            # Redis has the insert script cached), as in any fleet that has been serving.
            warm = await raw.call("session.create", wire_create(pool, f"{sid}-warm"), 30)
            assert "result" in warm, warm
            f.redis.pause()
            try:
                return await raw.call("session.create", wire_create(pool, sid), 15)
            finally:
                f.redis.resume()
        finally:
            raw.abort()

    reply = run(refused_create())
    assert error_code(reply) == UNAVAILABLE and reply["error"]["data"]["retryable"] is True, reply
    # A command on a connection made after SIGCONT is answered only after Redis has run what
    # was already queued on older connections (one event loop; those were readable first).
    assert f.redis.ping()
    assert not any(run(listed_everywhere(pool, sid)).values()), "the refused create reached a CLI"

    def consistent():
        rec = f.record(sid)
        return not rec or any(run(listed_everywhere(pool, sid)).values())
    # The replica undoes a create it could not confirm (retried until Redis answers).
    poll(consistent, 5, f"{sid}: refused create left the record {f.record(sid)} with no CLI session",
         interval=0.25)


# ---------------------------------------------------------------------------------------
# 8. caps across replicas: max_sessions of a tenant and of a backend hold fleet-wide
# ---------------------------------------------------------------------------------------
def test_fleet_caps_across_replicas(fleet):
    """team-a may hold 2 live sessions and cli-1 may hold 1, counted over both replicas.

    The slack, as the README states it: each replica publishes its live counts and reads the
    others' once per state.sync_interval, so a session made live through the other replica
    within the last interval or two is not yet counted. The test sets the interval short
    (500 ms) and waits it out (SETTLE, three intervals) after each session it makes live
    before asking the other replica; without that wait a burst could pass a cap by that much.
    """
    f, pool = fleet, fleet.pool
    caps = dict(tenant_caps={"team-a": 2}, backend_caps={"cli-1": 1})
    r1 = f.replica("replica1", **caps)
    r2 = f.replica("replica2", **caps)
    settle = 3 * SYNC_INTERVAL_MS / 1000
    # Homes chosen so that bounded load never moves a session onto cli-1 by itself.
    a1, _ = sid_homed(r1.config_path, "fleet-cap-a1", want_home="cli-2")
    a2, _ = sid_homed(r1.config_path, "fleet-cap-a2", want_home="cli-3")
    a3, a4, a5 = (f"fleet-cap-a{n}-{NONCE}" for n in (3, 4, 5))
    b1, _ = sid_homed(r1.config_path, "fleet-cap-b1", want_home="cli-1")
    b2, _ = sid_homed(r1.config_path, "fleet-cap-b2", want_home="cli-1")

    def fleet_sessions(r: Replica, backend: str) -> int:
        return {b["name"]: b["fleet_sessions"] for b in r.admin("/api/backends")["backends"]}[backend]

    async def raw_create(r: Replica, tenant: str, sid: str) -> dict:
        c = await RawClient.open(r.url, token=TOKENS[tenant])
        try:
            return await c.call("session.create", wire_create(pool, sid), 30)
        finally:
            c.abort()

    async def go():
        ca1, ca2 = new_client(r1.url, TOKENS["team-a"]), new_client(r2.url, TOKENS["team-a"])
        cb1, cb2 = new_client(r1.url, TOKENS["team-b"]), new_client(r2.url, TOKENS["team-b"])
        try:
            for c in (ca1, ca2, cb1, cb2):
                await c.start()
            # team-a: one live session through each replica, the second after the first is counted.
            s_a1 = await ca1.create_session(session_id=a1, **pool.kwargs())
            await asyncio.sleep(settle)
            s_a2 = await ca2.create_session(session_id=a2, **pool.kwargs())
            t = f"cap turn {NONCE}"
            assert reply_text(await s_a2.send_and_wait(t, timeout=SEND_TIMEOUT_S)) == echo(t)
            await asyncio.sleep(settle)
            # At its cap fleet-wide, though each replica holds one: refused through either.
            refused = {r.name: await raw_create(r, "team-a", sid) for r, sid in ((r1, a3), (r2, a4))}
            for name, reply in refused.items():
                assert error_code(reply) == SESSION_LIMIT, f"team-a's third session through {name}: {reply}"
                assert (reply["error"].get("data") or {}).get("retryable") is True, reply
            listed = {sid: await listed_everywhere(pool, sid) for sid in (a3, a4)}
            assert not any(v for l in listed.values() for v in l.values()), f"a refused create reached a CLI: {listed}"

            # cli-1 (max_sessions 1) holds b1, live through replica 1; replica 2 places b2, whose
            # home is cli-1 too, elsewhere.
            s_b1 = await cb1.create_session(session_id=b1, **pool.kwargs())
            assert r1.placement(b1) == "cli-1", f"{b1} (home cli-1, empty) placed on {r1.placement(b1)}"
            await asyncio.sleep(settle)
            assert fleet_sessions(r2, "cli-1") == 1, r2.admin("/api/backends")
            s_b2 = await cb2.create_session(session_id=b2, **pool.kwargs())
            placed_b2 = r2.placement(b2)
            assert placed_b2 and placed_b2 != "cli-1", f"{b2} placed on the full cli-1 through replica 2"
            assert f.record(b2).get("b") == placed_b2, f.record(b2)
            t = f"cap b2 turn {NONCE}"
            assert reply_text(await s_b2.send_and_wait(t, timeout=SEND_TIMEOUT_S)) == echo(t)

            # A slot freed through replica 2 is usable through replica 1 once counted.
            await s_a2.disconnect()
            await asyncio.sleep(settle)
            s_a5 = await ca1.create_session(session_id=a5, **pool.kwargs())
            t = f"cap after a slot freed {NONCE}"
            assert reply_text(await s_a5.send_and_wait(t, timeout=SEND_TIMEOUT_S)) == echo(t)
            for s in (s_a1, s_a5, s_b1, s_b2):
                await s.disconnect()
            return placed_b2
        finally:
            for c in (ca1, ca2, cb1, cb2):
                await close_client(c, fast=True)

    placed_b2 = run(go())
    assert_only_cli(pool, b2, placed_b2)
    print(f"[e2e] caps across replicas: team-a refused its third session through both replicas; "
          f"{b2} (home cli-1, full) placed on {placed_b2}; slack waited out: {settle:.1f} s per step "
          f"(sync_interval {SYNC_INTERVAL_MS} ms)")
