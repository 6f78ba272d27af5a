"""The routing allow-list end to end: the real CLI 1.0.102 behind copilot-lb with two tenants.

  * a method not in the routing table is refused by the proxy (-32601) with the setting that
    forwards it, and never reaches the CLI;
  * methods listed in `routing.allow_global` reach the CLI and the CLI answers them;
  * a session named in a secondary field (`inheritPlanBaseFromSessionId`, an id array) must be
    the caller's: another tenant's is refused (-32012), a prefix of one is refused (-32602),
    while the same calls naming the caller's own sessions are answered by the CLI.
"""
from __future__ import annotations

import uuid

import pytest

import harness
from conftest import run
from rawrpc import RawClient
from sdkutil import connected, model_kwargs

pytestmark = pytest.mark.e2e

NONCE = uuid.uuid4().hex[:8]
TOKENS = {"a": f"tok-a-{NONCE}", "b": f"tok-b-{NONCE}"}


@pytest.fixture(scope="module")
def edge(e2e_install, tmp_path_factory, request):
    if harness.direct_mode():
        pytest.skip("routing scenarios need the proxy")
    run_dir = tmp_path_factory.mktemp("routing")
    model = harness.start_fake_model(run_dir)
    backends = harness.start_backends(1, run_dir)
    cfg = run_dir / "lb.yaml"
    cfg.write_text(f"""
tenants:
  - name: a
    token_hashes: ["{harness.hash_token(TOKENS['a'])}"]
  - name: b
    token_hashes: ["{harness.hash_token(TOKENS['b'])}"]
routing:
  allow_global: [user.settings.get, lbtest.notACliMethod]
""")
    proxy = harness.start_proxy(backends, run_dir, extra_args=["--config", str(cfg)])

    def fin():
        proxy.stop()
        for b in backends:
            b.stop()
        model.stop()
    request.addfinalizer(fin)
    return {"proxy": proxy, "backend": backends[0], "model": model, "run_dir": run_dir}


def proxy_refusal(reply: dict) -> dict:
    err = reply.get("error") or {}
    assert (err.get("data") or {}).get("source") == "copilot-lb", reply
    return err


def from_cli(reply: dict) -> bool:
    return ((reply.get("error") or {}).get("data") or {}).get("source") != "copilot-lb"


def test_unclassified_methods_are_refused_naming_the_setting(edge):
    async def go():
        c = await RawClient.open(edge["proxy"].addr, token=TOKENS["a"])
        try:
            for method, params in [("models.futureList", {}), ("session.futureThing", {"sessionId": "x"})]:
                err = proxy_refusal(await c.call(method, params))
                assert err["code"] == -32601, err
                assert "routing.allow_global" in err["message"] and "routing.allow_session" in err["message"], err
            # A host-state method the table refuses by default, not listed in this config.
            err = proxy_refusal(await c.call("account.getCurrentAuth", {}))
            assert err["code"] == -32601 and "routing.allow_global" in err["message"], err
            # Refused on purpose: no setting forwards it.
            target = edge["run_dir"] / "written-by-the-cli.json"
            err = proxy_refusal(await c.call("persistence.writeRawJsonLocked",
                                             {"path": str(target), "dataJson": "{}"}))
            assert err["code"] == -32601 and "internal" in err["message"], err
            assert not target.exists(), "the CLI wrote a file for a refused call"
        finally:
            c.abort()
    run(go())


def test_methods_allowed_by_the_setting_reach_the_cli(edge):
    async def go():
        c = await RawClient.open(edge["proxy"].addr, token=TOKENS["a"])
        try:
            r = await c.call("user.settings.get", {})
            assert "result" in r, r
            # Not a method the CLI has: forwarded all the same, so the CLI's own answer.
            r = await c.call("lbtest.notACliMethod", {})
            assert "error" in r and from_cli(r), r
            assert r["error"]["code"] == -32601, r
        finally:
            c.abort()
    run(go())


def test_a_secondary_session_field_must_name_the_callers_own_session(edge):
    a_sid, b_sid = str(uuid.uuid4()), f"b-{NONCE}"

    async def go():
        kw = model_kwargs(edge["model"])
        async with connected(edge["proxy"].addr, token=TOKENS["a"]) as ca, \
                connected(edge["proxy"].addr, token=TOKENS["b"]) as cb:
            await ca.create_session(session_id=a_sid, **kw)
            await cb.create_session(session_id=b_sid, **kw)
            raw = await RawClient.open(edge["proxy"].addr, token=TOKENS["b"])
            try:
                # b's own sessions: the CLI answers.
                own = await raw.call("session.mode.set", {"sessionId": b_sid, "mode": "plan",
                                                          "inheritPlanBaseFromSessionId": b_sid})
                assert from_cli(own), own
                own = await raw.call("sessions.getClientMetadata", {"sessionIds": [b_sid]})
                assert "result" in own, own
                # a's session in a field other than params.sessionId: refused.
                for method, params in [
                    ("session.mode.set", {"sessionId": b_sid, "mode": "plan",
                                          "inheritPlanBaseFromSessionId": a_sid}),
                    ("sessions.getClientMetadata", {"sessionIds": [b_sid, a_sid]}),
                    ("sessions.transferRemoteControl", {"toSessionId": b_sid, "expectedFromSessionId": a_sid}),
                ]:
                    err = proxy_refusal(await raw.call(method, params))
                    assert err["code"] == -32012 and a_sid in err["message"], (method, err)
                # A prefix the CLI would resolve to a's session: refused before the CLI.
                err = proxy_refusal(await raw.call("session.mode.set", {
                    "sessionId": b_sid, "mode": "plan", "inheritPlanBaseFromSessionId": a_sid[:8]}))
                assert err["code"] == -32602, err
            finally:
                raw.abort()
    run(go())
