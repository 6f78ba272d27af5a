"""Core e2e scenarios with the real Python SDK through copilot-lb (or backend 1 in DIRECT mode).

The `cluster` fixture: fake model + 3 real Copilot CLI servers that share NOTHING (separate
COPILOT_HOME each), so a resume only works if the proxy routes it to the backend that created
the session.
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest
from pydantic import BaseModel

import harness
from conftest import run
from copilot.tools import define_tool
from sdkutil import (connected, echo, ids_per_backend, list_ids, model_requests_with, owners,
                     reply_text, session_kwargs, user_messages)

pytestmark = pytest.mark.e2e

NONCE = uuid.uuid4().hex[:8]
N_SESSIONS = 24
BATCH = 8
SEND_TIMEOUT_S = 60


def core_id(n: int) -> str:
    return f"e2e-core-{n}-{NONCE}"


def core_prompt(n: int) -> str:
    return f"core prompt {n} nonce {NONCE}"


# ---------------------------------------------------------------------------------------------
# module fixture: ONE client creates N_SESSIONS sessions and sends one prompt in each
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def core(cluster):
    result = {"ids": [core_id(n) for n in range(N_SESSIONS)], "replies": {}, "errors": {}}

    async def one(client, n):
        sid = core_id(n)
        s = await client.create_session(session_id=sid, **session_kwargs(cluster))
        assert s.session_id == sid, f"create returned {s.session_id!r}"
        ev = await s.send_and_wait(core_prompt(n), timeout=SEND_TIMEOUT_S)
        await s.disconnect()
        return reply_text(ev)

    async def go():
        t0 = time.perf_counter()
        async with connected(cluster.client_url) as client:
            for start in range(0, N_SESSIONS, BATCH):
                ns = list(range(start, min(N_SESSIONS, start + BATCH)))
                outs = await asyncio.gather(*(one(client, n) for n in ns), return_exceptions=True)
                for n, out in zip(ns, outs):
                    if isinstance(out, BaseException):
                        result["errors"][core_id(n)] = f"{type(out).__name__}: {out}"
                    else:
                        result["replies"][core_id(n)] = out
            result["elapsed_s"] = time.perf_counter() - t0

    run(go())
    print(f"\n[e2e] created+prompted {N_SESSIONS} sessions on one connection in "
          f"{result['elapsed_s']:.2f} s (batches of {BATCH})")
    return result


def test_one_client_many_sessions(core):
    assert not core["errors"], f"session errors: {core['errors']}"
    assert len(core["replies"]) == N_SESSIONS
    wrong = {sid: got for n, sid in enumerate(core["ids"])
             if (got := core["replies"][sid]) != echo(core_prompt(n))}
    assert not wrong, f"unexpected replies: {wrong}"


def test_sessions_spread_over_backends(cluster, core):
    per_backend = run(ids_per_backend(cluster))
    placement = {sid: owners(per_backend, sid) for sid in core["ids"]}
    bad = {sid: o for sid, o in placement.items() if len(o) != 1}
    assert not bad, f"sessions not on exactly one backend (sid -> backend indexes): {bad}"
    counts = {f"backend{i + 1}": sum(1 for o in placement.values() if o == [i]) for i in per_backend}
    print(f"\n[e2e] placement of {N_SESSIONS} sessions: {counts}")
    if cluster.direct:
        pytest.skip(f"DIRECT mode (no proxy): spread over backends not applicable; placement {counts}")
    used = [k for k, v in counts.items() if v > 0]
    assert len(used) >= 2, f"all sessions landed on one backend: {counts}"


class LookupParams(BaseModel):
    key: str


def test_client_side_tool_call(cluster):
    calls: list[str] = []

    def lookup(params: LookupParams, invocation) -> str:
        calls.append(params.key)
        return f"value-for-{params.key}"

    tool = define_tool("e2e_lookup", description="Look up a value by key", handler=lookup,
                       params_type=LookupParams, defer="never")
    sid = f"e2e-core-tool-{NONCE}"
    key = f"k-{NONCE}"

    async def go():
        async with connected(cluster.client_url) as client:
            s = await client.create_session(session_id=sid, **session_kwargs(cluster, tools=[tool]))
            ev = await s.send_and_wait(f'CALL_TOOL e2e_lookup {{"key": "{key}"}}', timeout=SEND_TIMEOUT_S)
            await s.disconnect()
            return reply_text(ev)

    got = run(go())
    assert got == f"TOOL RESULT: value-for-{key}"
    assert calls == [key], f"tool handler calls: {calls}"


def test_list_sessions_through_proxy(cluster, core):
    async def go():
        async with connected(cluster.client_url) as client:
            return await list_ids(client)
    listed = run(go())
    missing = sorted(set(core["ids"]) - listed)
    assert not missing, f"{len(missing)} created session(s) missing from list_sessions(): {missing}"


def test_resume_from_new_connection(cluster, core):
    n = N_SESSIONS - 1  # the last one created
    sid, p1 = core_id(n), core_prompt(n)
    p2 = f"second turn for {n} nonce {NONCE}"
    before = run(ids_per_backend(cluster))
    owner = owners(before, sid)
    assert len(owner) == 1, f"{sid} before resume is on backends {owner}"

    async def go():
        async with connected(cluster.client_url) as client:  # a NEW connection
            s = await client.resume_session(sid, **session_kwargs(cluster))  # provider again
            assert s.session_id == sid
            history = user_messages(await s.get_events())
            ev = await s.send_and_wait(p2, timeout=SEND_TIMEOUT_S)
            await s.disconnect()
            return history, reply_text(ev)

    history, reply2 = run(go())
    assert any(p1 in u for u in history), f"turn 1 user message not in history after resume: {history}"
    assert reply2 == echo(p2)
    reqs = model_requests_with(cluster, p2)
    assert reqs, "fake model never saw turn 2"
    assert any(p1 in str(r["body"]["messages"]) for r in reqs), \
        "model request for turn 2 did not carry turn 1 (history not restored)"
    after = run(ids_per_backend(cluster))
    assert owners(after, sid) == owner, f"{sid} moved: before {owner}, after {owners(after, sid)}"
    on_disk = [b.index for b in cluster.backends if sid in b.session_dirs()]
    assert on_disk == owner, f"session-state/{sid} found on backends {on_disk}, expected {owner}"


def test_delete_session(cluster, core):
    n = 0
    sid = core_id(n)
    assert len(owners(run(ids_per_backend(cluster)), sid)) == 1

    async def go():
        async with connected(cluster.client_url) as client:  # NEW connection, session not attached
            await client.delete_session(sid)
            listed = await list_ids(client)
            try:
                s = await client.resume_session(sid, **session_kwargs(cluster))
                await s.disconnect()
                resumed = True
            except Exception:  # noqa: BLE001  (-32603 Session not found)
                resumed = False
            return listed, resumed

    listed, resumed = run(go())
    assert sid not in listed, "deleted session still in list_sessions() through the proxy"
    assert not resumed, "resume_session() of a deleted session succeeded"
    per_backend = run(ids_per_backend(cluster))
    assert owners(per_backend, sid) == [], f"deleted session still listed by backends {owners(per_backend, sid)}"
    # the other sessions are untouched
    others = [core_id(k) for k in range(1, N_SESSIONS)]
    assert all(len(owners(per_backend, o)) == 1 for o in others)


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_event_loops_with_busy_polling(cluster, tmp_path):
    """A proxy with two event loops and `busy_poll` serves the real SDK, and stops spinning
    once traffic stops (it would burn a core per loop otherwise)."""
    if cluster.direct:
        pytest.skip("proxy configuration test")
    cfg = tmp_path / "busy.yaml"
    cfg.write_text("runtime:\n  threads: 2\n  busy_poll: 200us\n")
    px = harness.start_proxy(cluster.backends, tmp_path, extra_args=["--config", str(cfg)])
    try:
        assert "event loops started" in px.tail(200) and "threads=2" in px.tail(200), px.tail(50)

        async def go():
            async with connected(px.url) as client:
                replies = {}
                for i in range(4):
                    sid = f"e2e-busy-{i}-{NONCE}"
                    s = await client.create_session(session_id=sid, **session_kwargs(cluster))
                    p = f"busy poll prompt {i} nonce {NONCE}"
                    ev = await s.send_and_wait(p, timeout=SEND_TIMEOUT_S)
                    replies[p] = reply_text(ev)
                    await s.disconnect()
                return replies

        for prompt, reply in run(go()).items():
            assert reply == echo(prompt)
        time.sleep(0.5)
        before = _cpu_seconds(px.proc.pid)
        time.sleep(2.0)
        idle = _cpu_seconds(px.proc.pid) - before
        assert idle < 0.4, f"proxy used {idle:.2f} s of CPU in 2 s without traffic"
    finally:
        px.proc.stop()
