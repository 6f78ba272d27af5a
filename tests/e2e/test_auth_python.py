"""The auth layer end to end: real CLI (with COPILOT_CONNECTION_TOKEN) and the real Python SDK.

  SDK --plain TCP, loopback--> copilot-lb sidecar --mTLS--> copilot-lb edge --token--> CLI

Tenants team-a and team-b are known by client-certificate identity (SPIFFE URI SAN) AND a
connect token. The CLI's token lives only in the edge's environment.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid

import pytest

import harness
from certs import make_pki
from conftest import run
from sdkutil import connected, echo, new_client, reply_text, session_kwargs

pytestmark = pytest.mark.e2e

NONCE = uuid.uuid4().hex[:8]
CLI_TOKEN = f"cli-secret-{NONCE}"
TOKENS = {"team-a": f"tok-a-{NONCE}", "team-b": f"tok-b-{NONCE}"}


def start_lb(run_dir, name: str, config: str, env_extra: dict | None = None, port: int | None = None):
    path = run_dir / f"{name}.yaml"
    path.write_text(config)
    listen = port or harness.free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(run_dir),
           "RUST_LOG": "debug"}
    env.update(env_extra or {})
    proc = harness.Proc(name, [str(harness.proxy_bin()), "serve", "--config", str(path),
                               "--listen", f"127.0.0.1:{listen}",
                               "--state-path", str(run_dir / f"{name}.redb")],
                        env=env, cwd=run_dir, log_path=run_dir / f"{name}.log")
    proc.wait_port(listen, 30)
    return proc, listen


@pytest.fixture(scope="module")
def authed(e2e_install, tmp_path_factory, request):
    if harness.direct_mode():
        pytest.skip("auth scenarios need the proxy")
    run_dir = tmp_path_factory.mktemp("auth")
    pki = make_pki(run_dir / "pki")
    model = harness.start_fake_model(run_dir)
    backends = harness.start_backends(1, run_dir, token=CLI_TOKEN)
    procs = []

    def fin():
        for p in procs:
            p.stop()
        for b in backends:
            b.stop()
        model.stop()
    request.addfinalizer(fin)

    edge_cfg = f"""
listeners:
  - listen: 127.0.0.1:0
    tls:
      cert: {pki['edge_crt']}
      key: {pki['edge_key']}
      client_auth: required
      client_ca: {pki['ca']}
backends:
  - name: cli-1
    address: {backends[0].addr}
    token_env: CLI_TOKEN
tenants:
  - name: team-a
    identities: ["spiffe://test/team-a"]
    token_hashes: ["{harness.hash_token(TOKENS['team-a'])}"]
  - name: team-b
    identities: ["spiffe://test/team-b"]
    token_hashes: ["{harness.hash_token(TOKENS['team-b'])}"]
"""
    edge, edge_port = start_lb(run_dir, "edge", edge_cfg, {"CLI_TOKEN": CLI_TOKEN})
    procs.append(edge)
    sidecars = {}
    for who in ("team-a", "team-b", "rogue"):
        cfg = f"""
listeners:
  - listen: 127.0.0.1:0
    mode: tcp
    upstream:
      address: 127.0.0.1:{edge_port}
      tls:
        ca: {pki['ca']}
        cert: {pki[f'{who}_crt']}
        key: {pki[f'{who}_key']}
        server_name: localhost
"""
        p, port = start_lb(run_dir, f"sidecar-{who}", cfg)
        procs.append(p)
        sidecars[who] = f"127.0.0.1:{port}"
    return {"run_dir": run_dir, "model": model, "backend": backends[0], "edge": edge,
            "edge_addr": f"127.0.0.1:{edge_port}", "sidecars": sidecars}


def kwargs(a):
    class C:  # sdkutil.session_kwargs wants a cluster with provider()
        def provider(self):
            return a["model"].provider()
    return session_kwargs(C())


def test_prompt_through_sidecar_and_edge(authed):
    async def go():
        async with connected(authed["sidecars"]["team-a"], token=TOKENS["team-a"]) as client:
            s = await client.create_session(session_id=f"team-a-{NONCE}", **kwargs(authed))
            ev = await s.send_and_wait("hello through mtls", timeout=60)
            assert reply_text(ev) == echo("hello through mtls")
    run(go())
    log = authed["edge"].tail(400)
    for secret in (CLI_TOKEN, TOKENS["team-a"], "fake-key"):
        assert secret not in log, f"secret {secret!r} leaked into the edge log"


def test_direct_cli_without_token_is_refused(authed):
    async def go():
        client = new_client(authed["backend"].addr)
        with pytest.raises(Exception) as err:
            await client.start()
        assert "AUTHENTICATION_FAILED" in str(err.value) or "-32002" in str(err.value)
        try:
            await client.force_stop()
        except Exception:  # noqa: BLE001
            pass
    run(go())


def test_wrong_token_and_wrong_certificate_are_refused(authed):
    async def go():
        # Right certificate (team-a), wrong token.
        client = new_client(authed["sidecars"]["team-a"], token="not-the-token")
        with pytest.raises(Exception) as err:
            await client.start()
        assert "AUTHENTICATION_FAILED" in str(err.value)
        await client.force_stop()
        # team-b's token from team-a's certificate.
        client = new_client(authed["sidecars"]["team-a"], token=TOKENS["team-b"])
        with pytest.raises(Exception):
            await client.start()
        await client.force_stop()
        # A certificate from another CA never completes the handshake.
        client = new_client(authed["sidecars"]["rogue"], token=TOKENS["team-a"])
        with pytest.raises(Exception):
            await asyncio.wait_for(client.start(), 15)
        await client.force_stop()
    run(go())
    # No certificate at all: plain TCP to the TLS edge is dropped.
    with socket.create_connection(("127.0.0.1", int(authed["edge_addr"].split(":")[1])), timeout=5) as s:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {}}).encode()
        s.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        s.settimeout(5)
        try:
            data = s.recv(65536)
        except (ConnectionResetError, socket.timeout):
            data = b""
        assert b"pong" not in data


class Raw:
    """A bare JSON-RPC client (for calls the SDK will not make on a foreign session)."""

    def __init__(self, addr: str):
        host, port = addr.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buf = b""
        self.notes: list[dict] = []
        self.n = 0

    def send(self, method: str, params: dict) -> dict:
        self.n += 1
        rid = f"raw-{self.n}"
        body = json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}).encode()
        self.sock.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.time() + 30
        while time.time() < deadline:
            msg = self.read()
            if msg.get("id") == rid:
                return msg
            self.notes.append(msg)
        raise TimeoutError(method)

    def read(self, timeout: float = 30) -> dict:
        self.sock.settimeout(timeout)
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        head, rest = self.buf.split(b"\r\n\r\n", 1)
        n = int(head.split(b":")[1])
        while len(rest) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            rest += chunk
        self.buf = rest[n:]
        return json.loads(rest[:n])

    def drain(self, seconds: float) -> None:
        end = time.time() + seconds
        while time.time() < end:
            try:
                self.notes.append(self.read(timeout=max(0.05, end - time.time())))
            except (socket.timeout, TimeoutError):
                break

    def close(self):
        self.sock.close()


def test_second_tenant_cannot_touch_first_tenants_session(authed):
    sid = f"team-a-private-{NONCE}"
    spy = Raw(authed["sidecars"]["team-b"])
    assert "result" in spy.send("connect", {"token": TOKENS["team-b"]})

    async def owner_turn():
        async with connected(authed["sidecars"]["team-a"], token=TOKENS["team-a"]) as client:
            s = await client.create_session(session_id=sid, **kwargs(authed))
            ev = await s.send_and_wait("secret plans", timeout=60)
            assert reply_text(ev) == echo("secret plans")
            await s.disconnect()
    run(owner_turn())

    async def intruder():
        async with connected(authed["sidecars"]["team-b"], token=TOKENS["team-b"]) as client:
            with pytest.raises(Exception) as err:
                await client.resume_session(sid, **kwargs(authed))
            assert "another tenant" in str(err.value) or "-32012" in str(err.value)
            assert sid not in {m.session_id for m in await client.list_sessions()}
            with pytest.raises(Exception):
                await client.delete_session(sid)
    run(intruder())

    for method, params in [("session.send", {"sessionId": sid, "prompt": "leak it"}),
                           ("session.getMessages", {"sessionId": sid}),
                           ("session.delete", {"sessionId": sid}),
                           ("session.resume", {"sessionId": sid})]:
        r = spy.send(method, params)
        assert r.get("error", {}).get("code") == -32012, (method, r)
    spy.drain(0.5)
    leaked = [n for n in spy.notes if sid in json.dumps(n)]
    assert not leaked, f"team-b received notifications about team-a's session: {leaked[:2]}"
    spy.close()

    # The owner still has it, history intact.
    async def owner_again():
        async with connected(authed["sidecars"]["team-a"], token=TOKENS["team-a"]) as client:
            s = await client.resume_session(sid, **kwargs(authed))
            events = await s.get_events()
            assert any("secret plans" in (getattr(e.data, "content", "") or "") for e in events)
            await s.disconnect()
    run(owner_again())
