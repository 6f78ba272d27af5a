"""pytest fixtures for the copilot-lb e2e suite (real Copilot CLI servers + real SDKs).

Select with `-m e2e`. Run everything through tests/e2e/run.sh, which installs the pinned CLI and
SDKs into <repo>/.e2e and uses that venv's python.

  COPILOT_LB_E2E_DIRECT=1   no proxy: clients connect straight to backend 1 (validates the suite)
  COPILOT_LB_BIN=PATH       proxy binary (default <repo>/target/debug/copilot-lb)
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

# Each test must finish within this (the task budget is <= 120 s per test).
TEST_TIMEOUT_S = int(os.environ.get("COPILOT_LB_E2E_TEST_TIMEOUT", "120"))

_LIVE_CLUSTERS: list[harness.Cluster] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test against real Copilot CLI servers")
    # The Python SDK first tries `session.sendAndWait`, which CLI 1.0.102 answers with -32601, then
    # falls back to session.send + wait for session.idle; it logs a warning traceback each time.
    logging.getLogger("copilot").setLevel(logging.CRITICAL)
    harness.install_signal_handlers()


def pytest_unconfigure(config):
    harness.stop_all()


def run(coro, timeout: float = TEST_TIMEOUT_S - 10):
    """Run one coroutine on a fresh event loop with a hard timeout."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


class _Watchdog(Exception):
    pass


@pytest.fixture(autouse=True)
def _per_test_watchdog():
    """SIGALRM after TEST_TIMEOUT_S: the test fails instead of hanging (and cleanup still runs)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise _Watchdog(f"e2e test exceeded {TEST_TIMEOUT_S} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TEST_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="session")
def e2e_install():
    if not harness.COPILOT_BIN.exists():
        pytest.fail(f"Copilot CLI not installed at {harness.COPILOT_BIN}: run tests/e2e/install.sh")
    return harness.E2E_DIR


def _make_cluster(tmp_path_factory, request, name: str, **kw) -> harness.Cluster:
    run_dir = tmp_path_factory.mktemp(name)
    cluster = harness.start_cluster(run_dir, **kw)
    _LIVE_CLUSTERS.append(cluster)

    def fin():
        try:
            cluster.stop()
        finally:
            if cluster in _LIVE_CLUSTERS:
                _LIVE_CLUSTERS.remove(cluster)
    request.addfinalizer(fin)
    mode = "DIRECT (no proxy, clients -> backend1)" if cluster.direct else f"proxy {cluster.proxy.addr}"
    print(f"\n[e2e] cluster {name}: model {cluster.model.base_url}, backends "
          f"{[b.addr for b in cluster.backends]} (start {[round(b.start_s, 2) for b in cluster.backends]} s), "
          f"{mode}, run dir {run_dir}", flush=True)
    return cluster


@pytest.fixture(scope="module")
def cluster(e2e_install, tmp_path_factory, request) -> harness.Cluster:
    """Fake model + 3 CLI backends sharing NOTHING (separate COPILOT_HOME) + the proxy.

    Clients use `cluster.client_url` (the proxy; backend 1 in COPILOT_LB_E2E_DIRECT=1 mode)."""
    return _make_cluster(tmp_path_factory, request, "cluster", n_backends=3, shared_state=False)


@pytest.fixture(scope="module")
def shared_cluster(e2e_install, tmp_path_factory, request) -> harness.Cluster:
    """Like `cluster`, but the backends' session-state dirs are one shared directory."""
    return _make_cluster(tmp_path_factory, request, "shared", n_backends=3, shared_state=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    funcargs = getattr(item, "funcargs", {}) or {}
    clusters = [v for v in funcargs.values() if isinstance(v, harness.Cluster)] or list(_LIVE_CLUSTERS)
    for c in clusters:
        rep.sections.append((f"e2e logs ({c.run_dir})", c.log_tails()))
