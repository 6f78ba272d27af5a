"""Small helpers around the real Python Copilot SDK (github-copilot-sdk 1.0.27) for the e2e tests."""
from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager

from copilot import CopilotClient, RuntimeConnection
from copilot.session import PermissionHandler

import harness

logging.getLogger("copilot").setLevel(logging.CRITICAL)

MODEL = harness.MODEL_NAME
STOP_TIMEOUT_S = 15


def new_client(url: str, token: str | None = None) -> CopilotClient:
    """One CopilotClient = one TCP connection to `url` ("127.0.0.1:PORT")."""
    return CopilotClient(connection=RuntimeConnection.for_uri(url, connection_token=token))


async def close_client(client: CopilotClient, fast: bool = False) -> None:
    """stop() (graceful; ~1 s, a client-side reader-thread join), or force_stop() when `fast`
    (or when stop() hangs/fails). Against an external server neither sends an RPC: the SDK just
    closes the TCP connection."""
    try:
        if fast:
            raise RuntimeError("fast close")
        await asyncio.wait_for(client.stop(), STOP_TIMEOUT_S)
    except Exception:  # noqa: BLE001
        try:
            await asyncio.wait_for(client.force_stop(), STOP_TIMEOUT_S)
        except Exception:  # noqa: BLE001
            pass


@asynccontextmanager
async def connected(url: str, token: str | None = None, fast_close: bool = False):
    client = new_client(url, token)
    await client.start()
    try:
        yield client
    finally:
        await close_client(client, fast=fast_close)


def model_kwargs(model: harness.FakeModel, tools=None, **extra) -> dict:
    """session_kwargs for a test that holds the fake model itself rather than a Cluster."""
    class _Holder:
        def provider(self) -> dict:
            return model.provider()
    return session_kwargs(_Holder(), tools, **extra)


def session_kwargs(cluster: harness.Cluster, tools=None, **extra) -> dict:
    """create_session / resume_session kwargs: BYOK fake model (needed on create AND resume)."""
    kw = dict(model=MODEL, provider=cluster.provider(), on_permission_request=PermissionHandler.approve_all)
    if tools:
        kw["tools"] = tools
    kw.update(extra)
    return kw


def reply_text(event) -> str | None:
    return None if event is None else getattr(event.data, "content", None)


def echo(prompt: str) -> str:
    return "ECHO: " + prompt.upper()


def recall(*earlier_prompts: str) -> str:
    """The fake model's answer to a prompt starting with RECALL after `earlier_prompts`."""
    return "RECALL: " + " | ".join(earlier_prompts)


def user_messages(events) -> list[str]:
    return [getattr(e.data, "content", None) or "" for e in events
            if getattr(getattr(e, "type", None), "value", "") == "user.message"]


async def list_ids(client: CopilotClient) -> set[str]:
    return {m.session_id for m in await client.list_sessions()}


async def ids_per_backend(cluster: harness.Cluster) -> dict[int, set[str]]:
    """Ask every backend DIRECTLY (own connection, bypassing the proxy) which sessions it holds."""
    async def one(b: harness.Backend):
        async with connected(b.url, fast_close=True) as c:
            return b.index, await list_ids(c)
    pairs = await asyncio.gather(*(one(b) for b in cluster.backends if b.alive()))
    return dict(pairs)


def owners(per_backend: dict[int, set[str]], sid: str) -> list[int]:
    return sorted(i for i, ids in per_backend.items() if sid in ids)


def model_requests_with(cluster: harness.Cluster, text: str) -> list[dict]:
    """Chat requests the fake model received whose messages mention `text`."""
    return [r for r in cluster.model.chat_requests()
            if text in json.dumps((r.get("body") or {}).get("messages"))]
