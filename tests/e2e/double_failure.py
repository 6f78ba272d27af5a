"""The double-failure scenario (issue #10 finding 2), shared by test_double_failure.py and
measure_double_failure.py. Not a test module itself.

Three real CLIs share one session-state directory; the proxy runs with
`sessions.shared_storage: true` and `failover: reassign`. One Python SDK client holds 12
sessions, 4 on each backend (ids picked with `copilot-lb route`, placement checked with the
admin API), each with one finished turn. Then two of the CLIs get SIGKILL back to back, and
50 ms later the same client calls send_and_wait on every session at once. A session counts as
answered when its reply is the fake model's RECALL answer naming the first turn (the model that
served the second turn saw the history). The clock starts at the first SIGKILL.

The floor (`run_direct_round`): the same recovery without the proxy, done by hand as an ideal
proxy would: SDK clients straight to each CLI, the same kill, then the survivor's client
resumes the 8 orphaned sessions and sends on all 12 at once. Its slowest answer is what the
surviving CLI itself needs for 8 resumes and 12 turns on this machine, so what the proxy adds is
the difference, measured in the same run.
"""
from __future__ import annotations

import asyncio
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import harness
from sdkutil import close_client, connected, echo, new_client, recall, reply_text, session_kwargs

N_BACKENDS = 3
PER_BACKEND = 4                 # 12 sessions
SETTLE_S = 0.05                 # kill -> the concurrent sends
DEADLINE_S = 1.0                # issue #10's target: the slowest answer, measured from the kill
# What the test asserts: over the rounds, the median of (slowest answer through the proxy -
# slowest answer of the direct floor round with the same survivor) is at most this. The
# absolute figure depends on how fast this machine runs 8 resumes and 12 turns on one real CLI
# (the floor: 1.25-1.4 s on a quiet 2-core VM, more on a busy CI runner), so it is reported,
# not asserted; a median keeps one noisy round from deciding.
PROXY_BUDGET_S = 0.4
SEND_TIMEOUT_S = 10.0           # bound on each send_and_wait (a miss is recorded, not waited out)
SETUP_TIMEOUT_S = 30.0


def write_config(path: Path, backends: list[harness.Backend]) -> None:
    # Placement by rendezvous home only (no bounded-load spill): the 12 concurrent creates of a
    # round then land 4/4/4 exactly as pick_ids chose them, so every round has 4 sessions that
    # stay and 8 that move, as the issue describes (with spill, a round could hold 2/5/5 and
    # leave 10 resumes queued on one CLI).
    path.write_text("backends:\n" + "".join(f"  - address: {b.addr}\n" for b in backends)
                    + "sessions:\n  shared_storage: true\n  failover: reassign\n"
                    + "balancing:\n  bounded_load: 1000\n"
                    + "health:\n  interval: 500ms\n  timeout: 1s\n  rise: 2\n  fall: 3\n")


def start(run_dir: Path) -> harness.Cluster:
    """Fake model + three CLIs sharing session-state + the proxy with the config above."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = harness.start_fake_model(run_dir)
    backends: list[harness.Backend] = []
    try:
        backends = harness.start_backends(N_BACKENDS, run_dir, shared_state=True)
        cfg = run_dir / "copilot-lb.yaml"
        write_config(cfg, backends)
        proxy = harness.start_proxy([], run_dir, extra_args=["--config", str(cfg)])
    except Exception:
        for b in backends:
            b.stop()
        model.stop()
        raise
    cluster = harness.Cluster(run_dir=run_dir, model=model, backends=backends, proxy=proxy, direct=False)
    cluster.config_path = cfg  # type: ignore[attr-defined]
    cluster.wait_backends_up([b.addr for b in backends])
    return cluster


def pick_ids(cluster: harness.Cluster, tag: str, per_backend: int = PER_BACKEND) -> list[str]:
    """Session ids whose rendezvous home (`copilot-lb route`) is each backend `per_backend` times."""
    want = {b.addr: [] for b in cluster.backends}
    for n in range(400):
        if all(len(v) == per_backend for v in want.values()):
            break
        sid = f"df-{tag}-{n}"
        out = subprocess.run([str(harness.proxy_bin()), "route", "--config", str(cluster.config_path), sid],
                             capture_output=True, text=True, check=True, timeout=10).stdout
        home = out.splitlines()[0].split()[1]
        if len(want[home]) < per_backend:
            want[home].append(sid)
    assert all(len(v) == per_backend for v in want.values()), want
    return [sid for ids in want.values() for sid in ids]


@dataclass
class Outcome:
    sid: str
    before: str                   # backend address before the kill
    elapsed_s: float              # first SIGKILL -> send_and_wait returned or raised
    answer: str | None = None
    expected: str = ""
    code: int | None = None       # JSON-RPC error code, if it raised one
    error: str | None = None
    after: str | None = None      # backend address afterwards (admin API)

    @property
    def answered(self) -> bool:
        return self.error is None and self.answer == self.expected


@dataclass
class RoundResult:
    n: int
    killed: list[str]
    kill_spread_us: float
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return sum(o.answered for o in self.outcomes)

    @property
    def slowest_s(self) -> float:
        return max(o.elapsed_s for o in self.outcomes)

    @property
    def unmoved_slowest_s(self) -> float:
        """Slowest answer among the sessions on the surviving backend (no failover: the CLI's
        own turn time under this load, a baseline for slowest_s)."""
        return max((o.elapsed_s for o in self.outcomes if o.before not in self.killed), default=0.0)

    @property
    def within_target(self) -> bool:
        """The issue's absolute target: every answer within DEADLINE_S of the kill."""
        return self.slowest_s <= DEADLINE_S

    @property
    def passed(self) -> bool:
        """Every session answered with its history (the time is judged over all rounds,
        against the floor: `proxy_overhead_ok`)."""
        return self.answered == len(self.outcomes)

    def codes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes:
            if not o.answered:
                k = (str(o.code) if o.code is not None
                     else "wrong answer" if o.error is None else o.error.split(":", 1)[0])
                out[k] = out.get(k, 0) + 1
        return out

    def summary(self, details: bool = True) -> str:
        line = (f"run {self.n}: {self.answered}/{len(self.outcomes)} answered, slowest "
                f"{self.slowest_s * 1000:.0f} ms after the kill (target {DEADLINE_S * 1000:.0f} ms: "
                f"{'met' if self.within_target else 'missed'}; unmoved sessions "
                f"{self.unmoved_slowest_s * 1000:.0f} ms), killed "
                f"{' + '.join(self.killed)} within {self.kill_spread_us:.0f} us, errors {self.codes() or 'none'}"
                f" -> {'PASS' if self.passed else 'FAIL'}")
        if not details:
            return line
        rows = []
        for o in sorted(self.outcomes, key=lambda o: o.elapsed_s):
            what = "ok" if o.answered else (f"error {o.code}: {o.error}" if o.error else f"answer {o.answer!r}")
            rows.append(f"    {o.sid} {o.before} -> {o.after}: {o.elapsed_s * 1000:.0f} ms {what}")
        return "\n".join([line] + rows)


def error_code(e: BaseException) -> int | None:
    code = getattr(e, "code", None)
    if isinstance(code, int):
        return code
    m = re.search(r"-320\d\d", str(e))
    return int(m.group(0)) if m else None


async def run_round(cluster: harness.Cluster, n: int, tag: str) -> RoundResult:
    """One scenario run on a cluster whose three backends are up. Kills all backends but
    backend n % 3. Raises only if the setup (before the kill) goes wrong."""
    ids = pick_ids(cluster, f"{tag}-{n}")
    async with connected(cluster.client_url, fast_close=True) as client:
        async def first_turn(sid: str):
            s = await client.create_session(session_id=sid, **session_kwargs(cluster))
            p = f"first turn {sid}"
            ev = await s.send_and_wait(p, timeout=SETUP_TIMEOUT_S)
            assert reply_text(ev) == echo(p), reply_text(ev)
            return s
        sessions = dict(zip(ids, await asyncio.gather(*(first_turn(sid) for sid in ids))))
        before = cluster.placements()
        spread = {b.addr: sorted(sid for sid in ids if before.get(sid) == b.addr) for b in cluster.backends}
        assert all(len(v) == PER_BACKEND for v in spread.values()), spread

        survivor = n % len(cluster.backends)
        victims = [i for i in range(len(cluster.backends)) if i != survivor]
        killed = [cluster.backends[i].addr for i in victims]
        t_kill, t_last = cluster.kill_backends(victims)
        await asyncio.sleep(max(0.0, t_kill + SETTLE_S - time.perf_counter()))

        async def second_turn(sid: str) -> Outcome:
            o = Outcome(sid=sid, before=before[sid], elapsed_s=0.0, expected=recall(f"first turn {sid}"))
            try:
                ev = await sessions[sid].send_and_wait(f"RECALL after the double crash {sid}",
                                                       timeout=SEND_TIMEOUT_S)
                o.answer = reply_text(ev)
            except Exception as e:  # noqa: BLE001  (recorded: the point is to count them)
                o.code, o.error = error_code(e), f"{type(e).__name__}: {e}"
            o.elapsed_s = time.perf_counter() - t_kill
            return o
        outcomes = await asyncio.gather(*(second_turn(sid) for sid in ids))
        after = cluster.placements()
        for o in outcomes:
            o.after = after.get(o.sid)
    return RoundResult(n=n, killed=killed, kill_spread_us=(t_last - t_kill) * 1e6, outcomes=list(outcomes))


async def run_direct_round(cluster: harness.Cluster, n: int, tag: str) -> RoundResult:
    """The floor for round `n` (same survivor): the same sessions, kill and sends with no proxy.
    One SDK client per CLI creates 4 sessions there and takes their first turn; after the kill,
    the survivor's client resumes the 8 orphaned sessions and sends, each right after its resume,
    while the 4 sessions it already holds send at once: what a zero-cost proxy would do."""
    survivor = n % len(cluster.backends)
    victims = [i for i in range(len(cluster.backends)) if i != survivor]
    ids = {i: [f"df-direct-{tag}-{n}-{i}-{k}" for k in range(PER_BACKEND)]
           for i in range(len(cluster.backends))}
    clients = {i: new_client(b.url) for i, b in enumerate(cluster.backends)}
    try:
        await asyncio.gather(*(c.start() for c in clients.values()))

        async def first_turn(i: int, sid: str):
            s = await clients[i].create_session(session_id=sid, **session_kwargs(cluster))
            p = f"first turn {sid}"
            ev = await s.send_and_wait(p, timeout=SETUP_TIMEOUT_S)
            assert reply_text(ev) == echo(p), reply_text(ev)
            return sid, s
        held = dict(await asyncio.gather(*(first_turn(i, sid) for i, v in ids.items() for sid in v)))
        t_kill, t_last = cluster.kill_backends(victims)
        await asyncio.sleep(max(0.0, t_kill + SETTLE_S - time.perf_counter()))
        home = cluster.backends[survivor].addr

        async def second_turn(i: int, sid: str) -> Outcome:
            before = cluster.backends[i].addr
            o = Outcome(sid=sid, before=before, elapsed_s=0.0, expected=recall(f"first turn {sid}"))
            try:
                s = held[sid]
                if i != survivor:
                    s = await clients[survivor].resume_session(sid, **session_kwargs(cluster))
                ev = await s.send_and_wait(f"RECALL after the double crash {sid}", timeout=SEND_TIMEOUT_S)
                o.answer = reply_text(ev)
            except Exception as e:  # noqa: BLE001
                o.code, o.error = error_code(e), f"{type(e).__name__}: {e}"
            o.elapsed_s = time.perf_counter() - t_kill
            o.after = home
            return o
        outcomes = await asyncio.gather(*(second_turn(i, sid) for i, v in ids.items() for sid in v))
    finally:
        await asyncio.gather(*(close_client(c, fast=True) for c in clients.values()))
    return RoundResult(n=n, killed=[cluster.backends[i].addr for i in victims],
                       kill_spread_us=(t_last - t_kill) * 1e6, outcomes=list(outcomes))


def overhead_s(proxied: list[RoundResult], floor: list[RoundResult]) -> float:
    """Median over paired rounds of (slowest through the proxy - slowest of the floor)."""
    d = sorted(p.slowest_s - f.slowest_s for p, f in zip(proxied, floor))
    m = len(d) // 2
    return d[m] if len(d) % 2 else (d[m - 1] + d[m]) / 2


def restore(cluster: harness.Cluster) -> None:
    """Restart the killed CLIs (same ports and homes) and wait until the proxy sees all up."""
    cluster.restart_dead_backends()
    cluster.wait_backends_up([b.addr for b in cluster.backends])
