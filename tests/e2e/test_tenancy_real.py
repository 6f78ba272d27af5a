"""Issue #12's four confirmed holes, replayed against the real CLI 1.0.102 behind copilot-lb.

Two real CLIs sharing session state (as `config/edge.yaml` runs them), the CLIs' connection
token held by the proxy only, and three tenants: a (the victim), b (the attacker, no
session_patterns) and c (max_sessions: 3). Each test is the attack the issue describes:

  * prefix ids: b opens a's UUID session by an upper-case 8-hex prefix (which the CLI resolves
    to a's full id), by `sessions.open` and by `session.resume`: refused (-32602) before the
    CLI; afterwards a still resumes its own session, with its history;
  * forks: a forks its session; the fork is a's (b sees it in neither `session.list` nor
    `session.getLastId`, and b's resume of it is refused -32012), and a resumes the fork with
    the history it forked;
  * unknown means claimable: a session created straight on the CLI (bypassing the proxy, with
    the CLI's token) belongs to nobody: hidden from b's list and refused to b;
  * caps: c creates 3, detaches (its connection closes), creates 3 more, and resuming the first
    three is refused (-32013) instead of making 6 live.
"""
from __future__ import annotations

import uuid

import pytest

import harness
from conftest import run
from rawrpc import RawClient
from sdkutil import connected, echo, list_ids, model_kwargs, recall, reply_text

pytestmark = pytest.mark.e2e

NONCE = uuid.uuid4().hex[:8]
TOKENS = {t: f"tok-{t}-{NONCE}" for t in ("a", "b", "c")}
CLI_TOKEN = f"cli-{NONCE}"


@pytest.fixture(scope="module")
def edge(e2e_install, tmp_path_factory, request):
    if harness.direct_mode():
        pytest.skip("tenant isolation needs the proxy")
    run_dir = tmp_path_factory.mktemp("tenancy-real")
    model = harness.start_fake_model(run_dir)
    backends = harness.start_backends(2, run_dir, shared_state=True, token=CLI_TOKEN)
    cfg = run_dir / "lb.yaml"
    cfg.write_text("backends:\n" + "".join(f"  - address: {b.addr}\n    token_env: E2E_CLI_TOKEN\n" for b in backends)
                   + "sessions:\n  shared_storage: true\n  failover: reassign\n"
                   + f"""tenants:
  - name: a
    token_hashes: ["{harness.hash_token(TOKENS['a'])}"]
  - name: b
    token_hashes: ["{harness.hash_token(TOKENS['b'])}"]
  - name: c
    token_hashes: ["{harness.hash_token(TOKENS['c'])}"]
    max_sessions: 3
""")
    proxy = harness.start_proxy([], run_dir, extra_args=["--config", str(cfg)],
                                env_extra={"E2E_CLI_TOKEN": CLI_TOKEN})

    def fin():
        proxy.stop()
        for b in backends:
            b.stop()
        model.stop()
    request.addfinalizer(fin)
    return {"proxy": proxy, "backends": backends, "kw": model_kwargs(model)}


def proxy_refusal(reply: dict) -> dict:
    err = reply.get("error") or {}
    assert (err.get("data") or {}).get("source") == "copilot-lb", reply
    return err


async def one_turn(client, sid: str, kw: dict, prompt: str):
    s = await client.create_session(session_id=sid, **kw)
    ev = await s.send_and_wait(prompt, timeout=30)
    assert reply_text(ev) == echo(prompt), reply_text(ev)
    return s


def test_a_uuid_prefix_opens_nobody_elses_session(edge):
    sid, first = str(uuid.uuid4()), "the victim's first turn"
    addr, kw = edge["proxy"].addr, edge["kw"]

    async def go():
        async with connected(addr, token=TOKENS["a"], fast_close=True) as ca:
            await one_turn(ca, sid, kw, first)
        raw = await RawClient.open(addr, token=TOKENS["b"])
        try:
            for alias in (sid[:8].upper(), sid[:8], sid.upper()):
                for method, params in (("sessions.open", {"kind": "resume", "sessionId": alias}),
                                       ("session.resume", {"sessionId": alias})):
                    reply = await raw.call(method, params)
                    err = proxy_refusal(reply)
                    assert err["code"] == -32602, (method, alias, reply)
                    assert sid not in str(reply), f"the reply names the victim's session: {reply}"
        finally:
            raw.abort()
        # The victim is not locked out of its own session, and its history is intact.
        async with connected(addr, token=TOKENS["a"], fast_close=True) as ca:
            s = await ca.resume_session(sid, **kw)
            ev = await s.send_and_wait("RECALL after the prefix attempt", timeout=30)
            assert reply_text(ev) == recall(first), reply_text(ev)
    run(go(), timeout=120)


def test_a_fork_belongs_to_the_tenant_that_forked_it(edge):
    src, first = f"fork-src-{NONCE}", "turn before the fork"
    addr, kw = edge["proxy"].addr, edge["kw"]

    async def go():
        async with connected(addr, token=TOKENS["a"], fast_close=True) as ca:
            await one_turn(ca, src, kw, first)
            raw_a = await RawClient.open(addr, token=TOKENS["a"])
            try:
                reply = await raw_a.call("sessions.fork", {"sessionId": src})
                assert "result" in reply, reply
                fork = reply["result"]["sessionId"]
                assert fork and fork != src, reply
            finally:
                raw_a.abort()
            assert fork in await list_ids(ca), "the fork is missing from its owner's list"
        async with connected(addr, token=TOKENS["b"], fast_close=True) as cb:
            assert fork not in await list_ids(cb), "another tenant lists the fork"
            raw_b = await RawClient.open(addr, token=TOKENS["b"])
            try:
                last = await raw_b.call("session.getLastId", {})
                assert fork not in str(last) and src not in str(last), last
                for method, params in (("session.resume", {"sessionId": fork}),
                                       ("sessions.open", {"kind": "resume", "sessionId": fork})):
                    err = proxy_refusal(await raw_b.call(method, params))
                    assert err["code"] == -32012, (method, err)
            finally:
                raw_b.abort()
        async with connected(addr, token=TOKENS["a"], fast_close=True) as ca:
            s = await ca.resume_session(fork, **kw)
            ev = await s.send_and_wait("RECALL in the fork", timeout=30)
            assert reply_text(ev) == recall(first), reply_text(ev)
    run(go(), timeout=120)


def test_a_session_the_proxy_never_saw_belongs_to_nobody(edge):
    sid, first = f"direct-{NONCE}", "made behind the proxy's back"
    addr, kw = edge["proxy"].addr, edge["kw"]
    b0 = edge["backends"][0]

    async def go():
        # Straight to the CLI with its token: the proxy has no record of this session.
        async with connected(b0.url, token=CLI_TOKEN, fast_close=True) as direct:
            await one_turn(direct, sid, kw, first)
        async with connected(addr, token=TOKENS["b"], fast_close=True) as cb:
            assert sid not in await list_ids(cb), "an unknown session is listed to a tenant"
        raw = await RawClient.open(addr, token=TOKENS["b"])
        try:
            for method, params in (("session.resume", {"sessionId": sid}),
                                   ("sessions.open", {"kind": "resume", "sessionId": sid}),
                                   ("session.create", {"sessionId": sid}),
                                   ("session.delete", {"sessionId": sid})):
                err = proxy_refusal(await raw.call(method, params))
                assert err["code"] == -32012, (method, err)
        finally:
            raw.abort()
    run(go(), timeout=120)


def test_the_session_cap_holds_across_detach_and_resume(edge):
    ids = [f"cap-{NONCE}-{n}" for n in range(6)]
    addr, kw = edge["proxy"].addr, edge["kw"]

    async def go():
        async with connected(addr, token=TOKENS["c"], fast_close=True) as c1:
            for sid in ids[:3]:
                await one_turn(c1, sid, kw, f"turn {sid}")
        # c1 closed: its three sessions are detached, no longer live.
        raw = await RawClient.open(addr, token=TOKENS["c"])
        try:
            for sid in ids[3:]:
                reply = await raw.call("session.create", dict(sessionId=sid, **_raw_create(kw)))
                assert "result" in reply, reply
            reply = await raw.call("session.create", dict(sessionId=f"cap-{NONCE}-over", **_raw_create(kw)))
            assert proxy_refusal(reply)["code"] == -32013, reply
            for sid in ids[:3]:
                for method, params in (("session.resume", {"sessionId": sid, **_raw_create(kw)}),
                                       ("sessions.open", {"kind": "resume", "sessionId": sid})):
                    reply = await raw.call(method, params)
                    assert proxy_refusal(reply)["code"] == -32013, (method, sid, reply)
            # Detaching one makes room for exactly one old one.
            assert "result" in await raw.call("session.detach", {"sessionId": ids[5]})
            reply = await raw.call("session.resume", {"sessionId": ids[0], **_raw_create(kw)})
            assert "result" in reply, reply
            reply = await raw.call("session.resume", {"sessionId": ids[1], **_raw_create(kw)})
            assert proxy_refusal(reply)["code"] == -32013, reply
        finally:
            raw.abort()
    run(go(), timeout=120)


def _raw_create(kw: dict) -> dict:
    """The create/resume params a raw client sends for the fake model (what the SDK sends)."""
    p = kw["provider"]
    return {"model": kw["model"], "provider": {k: v for k, v in {
        "type": p.get("type"), "baseUrl": p.get("base_url"), "apiKey": p.get("api_key"),
        "wireApi": p.get("wire_api"),
    }.items() if v is not None}}
