"""Two of three backends crash at once (issue #10 finding 2), real CLI + real Python SDK.

Three CLIs share session storage (`sessions.shared_storage: true`, `failover: reassign`). One
client holds 12 sessions, 4 on each backend (checked with the admin API), each with one finished
turn. `kill -9` two CLIs back to back (both signals within a millisecond), wait 50 ms, then
send_and_wait on all 12 sessions at once through the same client. Every session must answer,
the answer must show the model saw turn 1 (the fake model's RECALL reply lists the earlier user
turns). Five runs (a different survivor each time; the killed CLIs are restarted in between),
every one 12/12.

Time: each run is paired with a floor run, the same kill and recovery done by SDK clients
straight to the CLIs (the survivor's client resumes the 8 orphaned sessions itself), and the
median over the pairs of (slowest through the proxy - slowest of the floor) must be at most
df.PROXY_BUDGET_S. The issue's absolute target, every answer within 1 s of the kill, is
reported by measure_double_failure.py, not asserted: on a 2-core machine the floor alone takes
1.25-1.4 s (and about twice that on a loaded CI runner).

The scenario lives in double_failure.py (shared with measure_double_failure.py).
"""
from __future__ import annotations

import uuid

import pytest

import double_failure as df
import harness
from conftest import run

pytestmark = pytest.mark.e2e

ROUNDS = 5


@pytest.fixture(scope="module")
def double_ha(e2e_install, tmp_path_factory, request):
    if harness.direct_mode():
        pytest.skip("failover needs the proxy")
    cluster = df.start(tmp_path_factory.mktemp("double-failure"))
    request.addfinalizer(cluster.stop)
    return cluster


def test_two_backends_killed_at_once_every_session_answers_with_history(double_ha):
    c = double_ha
    tag = uuid.uuid4().hex[:8]
    results, floor = [], []
    for n in range(ROUNDS):
        if n:
            df.restore(c)
        r = run(df.run_round(c, n, tag), timeout=60)
        results.append(r)
        print(r.summary(details=not r.passed), flush=True)
        df.restore(c)
        f = run(df.run_direct_round(c, n, tag), timeout=60)
        floor.append(f)
        print("  floor (direct, no proxy): " + f.summary(details=False), flush=True)
    report = "\n".join(r.summary() for r in results)
    assert all(r.passed for r in results), (
        f"{sum(not r.passed for r in results)}/{ROUNDS} runs failed "
        f"(answered {', '.join(f'{r.answered}/{len(r.outcomes)}' for r in results)}):\n{report}")
    overhead = df.overhead_s(results, floor)
    assert overhead <= df.PROXY_BUDGET_S, (
        f"the proxy added {overhead * 1000:.0f} ms (median) over the direct floor "
        f"(budget {df.PROXY_BUDGET_S * 1000:.0f}):\n{report}\nfloor:\n"
        + "\n".join(f.summary(details=False) for f in floor))
