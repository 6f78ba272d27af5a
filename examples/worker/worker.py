#!/usr/bin/env python3
"""The backend-services guide's "Background worker" pattern (Python SDK), through copilot-lb.

    COPILOT_CLI_URL=127.0.0.1:4321 python examples/worker/worker.py jobs.jsonl > results.jsonl

Reads jobs, one JSON object per line ({"id": "42", "prompt": "..."}) from the file given (or
stdin), and processes them with ONE shared CopilotClient: each job gets its own session
`job-<id>`, sends the prompt, waits for the reply, saves the result, and disconnects the
session (the guide's "clean up after job completes"). Writes one JSON line per job to stdout:
{"id": "42", "sessionId": "job-42", "content": "...", "ms": 812} or {"id": ..., "error": "..."}.
Exit status 0 only if every job succeeded.

Environment:
  COPILOT_CLI_URL            copilot-lb address host:port (default 127.0.0.1:4321)
  COPILOT_CONNECTION_TOKEN   token for `connect`, if the proxy's tenants require one
  WORKER_CONCURRENCY         jobs in flight at once (default 4)
  WORKER_DELETE_SESSIONS     1: delete each job's session after saving its result
  COPILOT_MODEL              model id; unset: the CLI's default model
  COPILOT_PROVIDER_BASE_URL  BYOK: your own model endpoint (then also COPILOT_PROVIDER_TYPE
                             [openai], COPILOT_PROVIDER_API_KEY, COPILOT_PROVIDER_WIRE_API)
  COPILOT_SEND_TIMEOUT_S     per-job wait for the reply (default 120)
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time

from copilot import CopilotClient, RuntimeConnection
from copilot.session import PermissionHandler

# SDK 1.0.27 logs a traceback when a CLI lacks session.sendAndWait (it falls back by itself).
logging.getLogger("copilot").setLevel(logging.CRITICAL)


def env(name: str, default: str | None = None) -> str | None:
    v = os.environ.get(name, "").strip()
    return v or default


def session_options() -> dict:
    """create_session / resume_session options (a BYOK provider must be given on both)."""
    opts: dict = {"on_permission_request": PermissionHandler.approve_all}
    if env("COPILOT_MODEL"):
        opts["model"] = env("COPILOT_MODEL")
    if env("COPILOT_PROVIDER_BASE_URL"):
        provider = {"type": env("COPILOT_PROVIDER_TYPE", "openai"), "base_url": env("COPILOT_PROVIDER_BASE_URL")}
        if env("COPILOT_PROVIDER_API_KEY"):
            provider["api_key"] = env("COPILOT_PROVIDER_API_KEY")
        if env("COPILOT_PROVIDER_WIRE_API"):
            provider["wire_api"] = env("COPILOT_PROVIDER_WIRE_API")
        opts["provider"] = provider
    return opts


JOB_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def read_jobs(stream) -> list[dict]:
    jobs = []
    for n, line in enumerate(stream, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        job = json.loads(line)
        job["id"] = str(job.get("id", ""))
        if not JOB_ID.match(job["id"]) or not isinstance(job.get("prompt"), str):
            raise SystemExit(f"line {n}: a job needs an id ([A-Za-z0-9_.-]{{1,64}}) and a prompt")
        jobs.append(job)
    return jobs


async def process_job(client: CopilotClient, job: dict, timeout_s: float, delete: bool) -> dict:
    session_id = f"job-{job['id']}"
    t0 = time.perf_counter()
    session = await client.create_session(session_id=session_id, **session_options())
    try:
        response = await session.send_and_wait(job["prompt"], timeout=timeout_s)
        content = None if response is None else getattr(response.data, "content", None)
    finally:
        await session.disconnect()  # clean up after the job completes
    if delete:
        await client.delete_session(session_id)
    return {"id": job["id"], "sessionId": session_id, "content": content,
            "ms": round((time.perf_counter() - t0) * 1000)}


def save_result(result: dict) -> None:
    # A real worker writes to its database or queue; this one prints a JSON line.
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


async def main() -> int:
    src = open(sys.argv[1], encoding="utf-8") if len(sys.argv) > 1 and sys.argv[1] != "-" else sys.stdin
    with src:
        jobs = read_jobs(src)
    url = env("COPILOT_CLI_URL", "127.0.0.1:4321")
    concurrency = max(1, int(env("WORKER_CONCURRENCY", "4")))
    timeout_s = float(env("COPILOT_SEND_TIMEOUT_S", "120"))
    delete = env("WORKER_DELETE_SESSIONS") == "1"

    client = CopilotClient(connection=RuntimeConnection.for_uri(url, connection_token=env("COPILOT_CONNECTION_TOKEN")))
    await client.start()
    slots = asyncio.Semaphore(concurrency)
    failed = 0

    async def one(job: dict) -> None:
        nonlocal failed
        async with slots:
            try:
                result = await process_job(client, job, timeout_s, delete)
            except Exception as e:  # noqa: BLE001  (one bad job must not stop the others)
                failed += 1
                result = {"id": job["id"], "sessionId": f"job-{job['id']}", "error": f"{type(e).__name__}: {e}"}
            save_result(result)

    try:
        await asyncio.gather(*(one(j) for j in jobs))
    finally:
        try:
            await asyncio.wait_for(client.stop(), 15)
        except Exception:  # noqa: BLE001
            await client.force_stop()
    print(f"worker: {len(jobs) - failed}/{len(jobs)} job(s) done via {url}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
