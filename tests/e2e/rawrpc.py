"""A bare asyncio JSON-RPC client for the e2e suite (Content-Length framing, one TCP connection).

For protocol details the SDK hides or times too loosely: the exact reply of a call, every
notification a connection receives, and writing a pre-built request the instant something
else happens (the SDK does several milliseconds of local setup before it sends a request).

    c = await RawClient.open("127.0.0.1:PORT")      # TCP connect + the `connect` handshake
    reply = await c.call("status.get", {})           # the whole reply frame (result or error)
    rid, frame = c.request("session.resume", {...})  # build now ...
    await c.write(frame)                             # ... send later
    reply = await c.until_reply(rid, 30)
    note = await c.wait_for(lambda m: m.get("method") == "session.event", 2)
    c.abort()

Every read is bounded; every frame read is kept in `c.seen` with its time.perf_counter().
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Callable

CONNECT_PARAMS = {"supportedTaskKinds": ["agent", "client", "shell"]}  # what the SDKs send


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.r, self.w = reader, writer
        self.n = 0
        self.seen: list[tuple[float, dict]] = []

    @classmethod
    async def open(cls, addr: str, *, token: str | None = None, handshake: bool = True,
                   timeout: float = 10.0) -> "RawClient":
        host, port = addr.rsplit(":", 1)
        r, w = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
        c = cls(r, w)
        if handshake:
            params = dict(CONNECT_PARAMS, **({"token": token} if token else {}))
            reply = await c.call("connect", params, timeout)
            if "result" not in reply:
                c.abort()
                raise RuntimeError(f"connect refused by {addr}: {reply}")
        return c

    def request(self, method: str, params: dict) -> tuple[str, bytes]:
        """A request frame and its id, not sent yet."""
        self.n += 1
        rid = f"raw-{self.n}"
        body = json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}).encode()
        return rid, b"Content-Length: %d\r\n\r\n" % len(body) + body

    async def write(self, frame: bytes) -> None:
        self.w.write(frame)
        await self.w.drain()

    async def read(self, timeout: float) -> dict:
        """The next frame (raises asyncio.TimeoutError, EOFError when the peer closed)."""
        async def one() -> dict:
            length = None
            while True:
                line = await self.r.readline()
                if not line:
                    raise EOFError("connection closed")
                line = line.strip()
                if not line:
                    if length is not None:
                        break
                    continue
                name, _, value = line.decode("ascii", "replace").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            return json.loads(await self.r.readexactly(length))
        msg = await asyncio.wait_for(one(), max(0.001, timeout))
        self.seen.append((time.perf_counter(), msg))
        return msg

    async def until_reply(self, rid: str, timeout: float) -> dict:
        """Reads (keeping every notification in `seen`) until the reply to `rid`."""
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.read(deadline - time.monotonic())
            if msg.get("id") == rid and "method" not in msg:
                return msg

    async def call(self, method: str, params: dict, timeout: float = 30.0) -> dict:
        rid, frame = self.request(method, params)
        await self.write(frame)
        return await self.until_reply(rid, timeout)

    def find(self, pred: Callable[[dict], bool]) -> dict | None:
        return next((m for _, m in self.seen if pred(m)), None)

    async def wait_for(self, pred: Callable[[dict], bool], timeout: float) -> dict | None:
        """The first frame (already seen or read within `timeout`) matching `pred`, else None."""
        deadline = time.monotonic() + timeout
        while (hit := self.find(pred)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                await self.read(left)
            except (asyncio.TimeoutError, EOFError):
                return self.find(pred)
        return hit

    def abort(self) -> None:
        """Close the socket at once."""
        try:
            self.w.transport.abort()
        except Exception:  # noqa: BLE001
            pass


def session_event(sid: str, event_type: str) -> Callable[[dict], bool]:
    """Matches a `session.event` notification of `event_type` for session `sid`."""
    def pred(m: dict) -> bool:
        p = m.get("params") or {}
        return (m.get("method") == "session.event" and p.get("sessionId") == sid
                and (p.get("event") or {}).get("type") == event_type)
    return pred
