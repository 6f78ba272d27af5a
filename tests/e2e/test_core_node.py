"""Core e2e scenario with the real Node SDK (@github/copilot-sdk 1.0.14), via tests/e2e/node/core.mjs."""
from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

import harness
from conftest import run
from sdkutil import ids_per_backend, owners

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parent / "node" / "core.mjs"


def test_node_sdk_core(cluster):
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found on PATH")
    nonce = uuid.uuid4().hex[:8]
    argv = [node, str(SCRIPT), "--url", cluster.client_url, "--model-url", cluster.model.base_url,
            "--e2e-dir", str(harness.E2E_DIR), "--nonce", nonce, "--sessions", "4"]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=100,
                              start_new_session=True)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"node script timed out after 100 s; output so far:\n{e.stdout}\n{e.stderr}")
    print(proc.stdout)
    if proc.stderr.strip():
        print("--- stderr ---\n" + proc.stderr[-4000:])
    lines = proc.stdout.splitlines()
    fails = [ln for ln in lines if ln.startswith("FAIL")]
    assert proc.returncode == 0 and not fails, f"node core.mjs rc={proc.returncode}: {fails}"
    assert any(ln.startswith("PASS overall") for ln in lines)
    result = json.loads(next(ln for ln in lines if ln.startswith("RESULT "))[len("RESULT "):])
    # deleted through the proxy => gone from every backend
    per_backend = run(ids_per_backend(cluster))
    leftovers = {sid: owners(per_backend, sid) for sid in result["ids"] if owners(per_backend, sid)}
    assert not leftovers, f"node sessions still on backends after delete: {leftovers}"
