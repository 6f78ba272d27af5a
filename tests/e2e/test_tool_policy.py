"""Host access as a tenant policy, end to end: the real CLI, the real Python SDK, the fake model
scripted to call the shell tool.

Tenant `locked` has no `allow_shell`: whatever its client asks for, its sessions are created
without the CLI's shell tools, so the agent's `bash` call is refused by the CLI itself, and
`session.shell.exec` is refused by the proxy. Tenant `shell` has `allow_shell: true`: the same
prompt runs the command.
"""
from __future__ import annotations

import json
import uuid

import pytest

import harness
from conftest import run
from sdkutil import connected, reply_text, session_kwargs
from test_auth_python import start_lb

pytestmark = pytest.mark.e2e

NONCE = uuid.uuid4().hex[:8]
TOKENS = {"locked": f"tok-locked-{NONCE}", "shell": f"tok-shell-{NONCE}"}
# The shell computes 42, so the answer cannot come from an echo of the prompt.
def prompt(tag: str) -> str:
    return 'CALL_TOOL bash {"command": "echo SHELL_$((6*7))", "description": "%s"}' % tag


@pytest.fixture(scope="module")
def policed(e2e_install, tmp_path_factory, request):
    if harness.direct_mode():
        pytest.skip("the tool policy is the proxy's")
    run_dir = tmp_path_factory.mktemp("tools")
    model = harness.start_fake_model(run_dir)
    backends = harness.start_backends(1, run_dir)
    procs = []

    def fin():
        for p in procs:
            p.stop()
        for b in backends:
            b.stop()
        model.stop()
    request.addfinalizer(fin)
    cfg = f"""
listeners:
  - listen: 127.0.0.1:0
backends:
  - name: cli-1
    address: {backends[0].addr}
tenants:
  - name: locked
    token_hashes: ["{harness.hash_token(TOKENS['locked'])}"]
  - name: shell
    token_hashes: ["{harness.hash_token(TOKENS['shell'])}"]
    allow_shell: true
"""
    lb, port = start_lb(run_dir, "lb", cfg)
    procs.append(lb)
    return {"model": model, "url": f"127.0.0.1:{port}", "lb": lb}


def kwargs(p, **extra):
    class C:  # sdkutil.session_kwargs wants a cluster with provider()
        def provider(self):
            return p["model"].provider()
    return session_kwargs(C(), **extra)


def offered_tools(p, marker: str) -> list[str]:
    reqs = [r for r in p["model"].chat_requests()
            if marker in json.dumps((r.get("body") or {}).get("messages"))]
    assert reqs, f"the model never saw {marker!r}"
    return sorted(t["function"]["name"] for t in reqs[0]["body"].get("tools", []))


def test_a_tenant_without_allow_shell_cannot_make_its_agent_run_a_shell_command(policed):
    async def go():
        async with connected(policed["url"], token=TOKENS["locked"]) as client:
            # The client asks for bash explicitly, with the precedence that would let its allow
            # list override any deny list: the proxy narrows it anyway.
            s = await client.create_session(
                session_id=f"locked-{NONCE}",
                **kwargs(policed, available_tools=["bash", "view", "grep"]))
            ev = await s.send_and_wait(prompt(f"locked-{NONCE}"), timeout=60)
            text = reply_text(ev) or ""
            assert "SHELL_42" not in text, text
            assert "Tool 'bash' does not exist" in text, text
            tools = offered_tools(policed, f"locked-{NONCE}")
            assert "bash" not in tools and "read_bash" not in tools, tools
            assert "view" in tools, tools
            # Nor may the client run it itself.
            with pytest.raises(Exception) as err:
                await client._client.request(
                    "session.shell.exec", {"sessionId": s.session_id, "command": "echo SHELL_$((6*7))"})
            assert "-32601" in str(err.value) and "tenants[].allow_shell" in str(err.value), str(err.value)
    run(go())


def test_a_tenant_with_allow_shell_runs_the_same_command(policed):
    async def go():
        async with connected(policed["url"], token=TOKENS["shell"]) as client:
            s = await client.create_session(session_id=f"shell-{NONCE}", **kwargs(policed))
            ev = await s.send_and_wait(prompt(f"shell-{NONCE}"), timeout=60)
            text = reply_text(ev) or ""
            assert text.startswith("TOOL RESULT:") and "SHELL_42" in text, text
            assert "bash" in offered_tools(policed, f"shell-{NONCE}")
    run(go())
