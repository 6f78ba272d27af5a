#!/usr/bin/env python3
"""The backend-services guide's health check pattern (Python SDK get_status), through copilot-lb.

    COPILOT_CLI_URL=127.0.0.1:4321 python examples/health/health.py             one check: exit 0 or 1
    COPILOT_CLI_URL=127.0.0.1:4321 python examples/health/health.py --every 30  forever, every 30 s

Prints one JSON line per check: {"ok": true, "version": "1.0.102", "protocolVersion": 3, "ms": 5}.
Usable as a Kubernetes exec probe or a cron/monitoring check of the whole path app -> proxy -> CLI.
Env: COPILOT_CLI_URL (default 127.0.0.1:4321), COPILOT_CONNECTION_TOKEN, COPILOT_HEALTH_TIMEOUT_S (5).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time

from copilot import CopilotClient, RuntimeConnection

logging.getLogger("copilot").setLevel(logging.CRITICAL)


def new_client() -> CopilotClient:
    url = os.environ.get("COPILOT_CLI_URL", "").strip() or "127.0.0.1:4321"
    token = os.environ.get("COPILOT_CONNECTION_TOKEN", "").strip() or None
    return CopilotClient(connection=RuntimeConnection.for_uri(url, connection_token=token))


async def check_cli_health(client: CopilotClient, timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        status = await asyncio.wait_for(client.get_status(), timeout)
        ok = status is not None and bool(status.version)
        return {"ok": ok, "version": status.version, "protocolVersion": status.protocol_version,
                "ms": round((time.perf_counter() - t0) * 1000)}
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "ms": round((time.perf_counter() - t0) * 1000)}


async def close(client: CopilotClient, timeout: float) -> None:
    try:
        await asyncio.wait_for(client.stop(), timeout)
    except Exception:  # noqa: BLE001
        try:
            await asyncio.wait_for(client.force_stop(), timeout)
        except Exception:  # noqa: BLE001
            pass


async def once(timeout: float) -> dict:
    client = new_client()
    try:
        await asyncio.wait_for(client.start(), timeout)
    except Exception as e:  # noqa: BLE001
        await close(client, timeout)
        return {"ok": False, "error": f"connect: {type(e).__name__}: {e}"}
    try:
        return await check_cli_health(client, timeout)
    finally:
        await close(client, timeout)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=float, default=0, help="check every N seconds, forever")
    args = ap.parse_args()
    timeout = float(os.environ.get("COPILOT_HEALTH_TIMEOUT_S", "5"))
    if args.every <= 0:
        r = await once(timeout)
        print(json.dumps(r), flush=True)
        return 0 if r["ok"] else 1
    while True:  # a fresh connection per check: also notices a proxy that stopped accepting
        print(json.dumps(await once(timeout)), flush=True)
        await asyncio.sleep(args.every)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
