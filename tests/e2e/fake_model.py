#!/usr/bin/env python3
"""Deterministic fake OpenAI-compatible model for the copilot-lb e2e suite (stdlib only).

Loopback only. Routes:
  GET  /v1/models  (/models)                 one model, "fake-echo-1"
  POST /v1/chat/completions (/chat/completions)
         "stream": true  -> SSE chunks, ends with "data: [DONE]"
         otherwise       -> one chat.completion JSON object
  GET  /__fake/requests                      JSON list of every request received (method, path, headers, body)
  POST /__fake/reset                         forget the recorded requests
  GET  /__fake/health                        {"ok": true}

Reply rule: "ECHO: " + the last user message's text, upper-cased. The Copilot CLI wraps the
prompt in context blocks such as <current_datetime>...</current_datetime> and reminders; every
balanced <tag ...>...</tag> block is removed before echoing.

Tool calls: if the last user text contains `CALL_TOOL <name> <json-args>` and no tool result
follows it yet, the reply is one tool call to <name> with those arguments; once the tool
result is in the conversation the reply is "TOOL RESULT: <result text>".

History: if the last user text starts with `RECALL`, the reply is "RECALL: " + the earlier user
texts of the conversation joined by " | " (what the model was shown of the history).

    fake_model.py --host 127.0.0.1 --port 0 [--log FILE] [--delay-ms N] [--port-file FILE]
Prints "fake_model listening on http://127.0.0.1:<port>/v1" once ready.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL_ID = "fake-echo-1"
_TAG_BLOCK = re.compile(r"<([A-Za-z_][\w.-]*)(?:\s[^>]*)?>.*?</\1\s*>", re.S)
_CALL_TOOL = re.compile(r"CALL_TOOL\s+(\S+)\s*(\{.*\})?", re.S)


class State:
    def __init__(self, log_path: str | None, delay_ms: int, verbose: bool):
        self.lock = threading.Lock()
        self.seen: list[dict] = []
        self.log_path = log_path
        self.delay_ms = delay_ms
        self.verbose = verbose

    def record(self, rec: dict) -> None:
        with self.lock:
            self.seen.append(rec)
            if self.log_path:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.seen)

    def reset(self) -> None:
        with self.lock:
            self.seen.clear()


STATE: State | None = None


def content_text(content) -> str:
    """Text of an OpenAI message `content` (string or list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
                out.append(part.get("text") or "")
        return "\n".join(out)
    return str(content)


def user_text(raw: str) -> str:
    """The user's own prompt: remove the CLI's <tag>...</tag> context blocks."""
    prev = None
    text = raw
    while prev != text:  # nested blocks
        prev = text
        text = _TAG_BLOCK.sub("", text)
    text = text.strip()
    return text if text else raw.strip()


def plan_reply(messages: list[dict]) -> dict:
    """{"text": str} or {"tool": (name, json_args)} for a chat `messages` list."""
    idx = -1
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], dict) and messages[i].get("role") == "user":
            idx = i
            break
    user = user_text(content_text(messages[idx].get("content"))) if idx >= 0 else ""
    tool_results = [m for m in messages[idx + 1:] if isinstance(m, dict) and m.get("role") == "tool"]
    if tool_results:
        return {"text": "TOOL RESULT: " + content_text(tool_results[-1].get("content"))}
    if user.startswith("RECALL"):
        earlier = [user_text(content_text(m.get("content"))) for m in messages[:idx]
                   if isinstance(m, dict) and m.get("role") == "user"]
        return {"text": "RECALL: " + " | ".join(earlier)}
    m = _CALL_TOOL.search(user)
    if m:
        return {"tool": (m.group(1), m.group(2) or "{}")}
    return {"text": "ECHO: " + user.upper()}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "copilot-lb-fake-model/1"

    def log_message(self, fmt, *args):
        if STATE and STATE.verbose:
            sys.stderr.write("fake_model: " + (fmt % args) + "\n")

    # ---- plumbing ---------------------------------------------------------------------
    def _record(self, body) -> None:
        STATE.record({
            "t": time.time(),
            "method": self.command,
            "path": self.path,
            "headers": {k: v for k, v in self.headers.items() if k.lower() != "content-length"},
            "body": body,
        })

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n > 0 else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return {"_raw": raw.decode("utf-8", "replace")}

    def _send_json(self, code: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse_begin(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _sse(self, obj) -> None:
        payload = obj if isinstance(obj, str) else json.dumps(obj)
        self.wfile.write(f"data: {payload}\n\n".encode())
        self.wfile.flush()

    # ---- routes -----------------------------------------------------------------------
    def do_GET(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/__fake/requests":
            return self._send_json(200, STATE.snapshot())
        if path == "/__fake/health":
            return self._send_json(200, {"ok": True})
        self._record(None)
        if path in ("/v1/models", "/models"):
            return self._send_json(200, {"object": "list", "data": [
                {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "copilot-lb-e2e"}]})
        return self._send_json(404, {"error": {"message": f"no route GET {path}"}})

    def do_POST(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        body = self._body() or {}
        if path == "/__fake/reset":
            STATE.reset()
            return self._send_json(200, {"ok": True})
        self._record(body)
        if STATE.delay_ms:
            time.sleep(STATE.delay_ms / 1000.0)
        if path.endswith("/chat/completions"):
            return self._chat(body)
        return self._send_json(404, {"error": {"message": f"no route POST {path}"}})

    def _chat(self, body: dict) -> None:
        plan = plan_reply(body.get("messages") or [])
        model = body.get("model") or MODEL_ID
        cid = "chatcmpl-" + uuid.uuid4().hex[:16]
        created = int(time.time())
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        tool_call = None
        if "tool" in plan:
            name, args = plan["tool"]
            tool_call = {"id": "call_" + uuid.uuid4().hex[:12], "type": "function",
                         "function": {"name": name, "arguments": args}}
        if not body.get("stream"):
            if tool_call:
                msg = {"role": "assistant", "content": None, "tool_calls": [tool_call]}
                finish = "tool_calls"
            else:
                msg = {"role": "assistant", "content": plan["text"]}
                finish = "stop"
            return self._send_json(200, {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": msg, "finish_reason": finish}], "usage": usage})

        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        self._sse_begin()
        self._sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]})
        if tool_call:
            self._sse({**base, "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, **tool_call}]},
                                            "finish_reason": None}]})
            finish = "tool_calls"
        else:
            text = plan["text"]
            step = max(1, (len(text) + 2) // 3)  # a few deltas
            for i in range(0, len(text), step):
                self._sse({**base, "choices": [{"index": 0, "delta": {"content": text[i:i + step]},
                                                "finish_reason": None}]})
            finish = "stop"
        self._sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            self._sse({**base, "choices": [], "usage": usage})
        self._sse("[DONE]")


def main() -> None:
    global STATE
    ap = argparse.ArgumentParser(description="deterministic fake OpenAI-compatible model (loopback only)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--log", default=None, help="append every request here as one JSON line")
    ap.add_argument("--port-file", default=None, help="write the bound port here once listening")
    ap.add_argument("--delay-ms", type=int, default=0, help="sleep this long before answering each POST")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    if not a.host.startswith("127."):
        sys.exit("fake_model: only 127.x loopback addresses are allowed")
    STATE = State(a.log, a.delay_ms, a.verbose)
    srv = ThreadingHTTPServer((a.host, a.port), Handler)
    srv.daemon_threads = True
    port = srv.server_address[1]
    if a.port_file:
        with open(a.port_file, "w") as f:
            f.write(str(port))
    print(f"fake_model listening on http://{a.host}:{port}/v1", flush=True)
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()


if __name__ == "__main__":
    main()
