#!/usr/bin/env python3
"""Faults under load against the REAL Copilot CLI and the real Python SDK through copilot-lb
(issue #10; the fake-CLI version with 1,000 sessions is `benches/chaos.rs`).

    bash tests/e2e/install.sh && cargo build --release
    COPILOT_LB_BIN=target/release/copilot-lb .e2e/venv/bin/python tests/e2e/chaos_real.py \
        [--sessions 20] [--clients 4] [--think 1.0] [--out report.json]

Three real CLI servers share one session-state directory (harness.start_backends
shared_state=True), a local fake model answers every turn, copilot-lb runs with
`sessions.shared_storage: true` (failover reassign) and health 1s / 500ms / fall 3 / rise 2.
`--sessions` sessions spread over `--clients` CopilotClient connections take turns
(`send_and_wait`, up to 4 attempts each) while a schedule hits the backend holding the most
sessions: kill -9 and restart, SIGSTOP past the health timeout then SIGCONT, a flap (kill -9 and
restart twice in a row), and, with no client traffic, kill -9 and restart before the idle
sessions' next turn.

Report: turns sent, answered, errors by JSON-RPC code (or exception type), turns without an
answer by their deadline, sessions lost (the session cannot take a turn at the end, or its
history lacks an acknowledged turn), late executions (a turn the client was told failed, run
after a later turn had run: two backends acting on one session), p99 before/during/after each
fault, copilot-lb CPU while a backend is down. Exit 1 if an invariant fails. Everything is
bounded: a deadline per turn, a fixed schedule, bounded waits.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from sdkutil import echo, new_client, close_client, reply_text  # noqa: E402
from copilot._jsonrpc import JsonRpcError  # noqa: E402
from copilot.session import PermissionHandler  # noqa: E402

NAMES = ["cli-1", "cli-2", "cli-3"]
ATTEMPTS = 4
CLK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK


def admin(url: str, path: str):
    with urllib.request.urlopen(url + path, timeout=5) as r:
        return json.load(r)


def state(url: str, name: str) -> str | None:
    try:
        for b in admin(url, "/api/backends")["backends"]:
            if b["name"] == name:
                return b["state"]
    except OSError:
        return None
    return None


async def await_state(url: str, name: str, want: str, limit: float) -> float | None:
    t = time.monotonic()
    while time.monotonic() - t < limit:
        if await asyncio.to_thread(state, url, name) == want:
            return time.monotonic() - t
        await asyncio.sleep(0.05)
    return None


def placements(url: str) -> dict[str, str]:
    return {s["session_id"]: s["backend"] for s in admin(url, "/api/sessions?limit=10000")["sessions"]}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(-(-q * len(xs) // 1)) - 1))]


class Run:
    def __init__(self, a):
        self.a = a
        self.t0 = time.monotonic()
        self.stop = False
        self.paused = False
        self.sent = 0
        self.answered = 0
        self.unanswered = 0
        self.errors: dict[str, int] = {}
        self.first_error: dict[str, str] = {}
        self.samples: list[tuple[float, float, bool]] = []  # (start s, latency ms, ok)
        self.turns_ok = 0
        self.turns_failed = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def error(self, key: str, msg: str) -> None:
        self.errors[key] = self.errors.get(key, 0) + 1
        self.first_error.setdefault(key, f"at {self.now():.1f} s: {msg[:200]}")


class Sess:
    def __init__(self, sid: str, s):
        self.sid = sid
        self.s = s
        self.sent: list[str] = []
        self.acked: list[str] = []
        self.failed: list[str] = []
        self.last_err = ""
        self.lost: str | None = None


async def turn(run: Run, se: Sess, n: str) -> bool:
    for attempt in range(1, ATTEMPTS + 1):
        prompt = f"{se.sid} turn {n} attempt {attempt}"
        se.sent.append(prompt)
        start = run.now()
        run.sent += 1
        ok = False
        try:
            ev = await se.s.send_and_wait(prompt, timeout=run.a.deadline)
            run.answered += 1
            if reply_text(ev) == echo(prompt):
                ok = True
            else:
                se.last_err = f"wrong reply {reply_text(ev)!r}"
                run.error("wrong-reply", se.last_err)
        except TimeoutError as e:
            run.unanswered += 1
            se.last_err = f"no answer within {run.a.deadline} s"
            run.error("deadline", str(e))
        except JsonRpcError as e:
            run.answered += 1
            se.last_err = f"{e.code} {e.message}"
            run.error(str(e.code), e.message)
        except Exception as e:  # noqa: BLE001  (the SDK raises plain Exception for session.error)
            run.answered += 1
            se.last_err = f"{type(e).__name__}: {e}"
            key = "session.error" if "Session error" in str(e) or "BACKEND_LOST" in str(e) else type(e).__name__
            run.error(key, str(e))
        run.samples.append((start, (run.now() - start) * 1000, ok))
        if ok:
            se.acked.append(prompt)
            run.turns_ok += 1
            return True
        se.failed.append(prompt)
        await asyncio.sleep(0.3 * attempt)
    run.turns_failed += 1
    return False


async def worker(run: Run, se: Sess) -> None:
    n = 0
    last_ok = True
    while not run.stop:
        if run.paused:
            await asyncio.sleep(0.1)
            continue
        await asyncio.sleep(run.a.think * random.uniform(0.5, 1.5))
        if run.stop or run.paused:
            continue
        n += 1
        last_ok = await turn(run, se, str(n))
    if not last_ok:
        se.last_err = "its last turn failed: " + se.last_err


async def history(run: Run, se: Sess) -> tuple[int, list[str]]:
    """(failed attempts in the history, late ones); sets se.lost if an acked turn is missing."""
    events = None
    for attempt in range(1, ATTEMPTS + 1):
        try:
            events = await se.s.get_events()
            break
        except Exception as e:  # noqa: BLE001
            se.last_err = f"get_events: {e}"
            await asyncio.sleep(0.3 * attempt)
    if events is None:
        se.lost = se.last_err
        return 0, []
    order = [getattr(e.data, "content", "") or "" for e in events
             if getattr(getattr(e, "type", None), "value", "") == "user.message"]
    seen = set(order)
    missing = [p for p in se.acked if p not in seen]
    if missing:
        se.lost = f"{len(missing)} of {len(se.acked)} acknowledged turns missing from its history"
    seq = {p: i for i, p in enumerate(se.sent)}
    failed = set(se.failed)
    executed, late, newest = 0, [], -1
    for p in order:
        i = seq.get(p)
        if i is None:
            continue
        if p in failed:
            executed += 1
            if newest > i:
                late.append(p)
        newest = max(newest, i)
    return executed, late


def window(run: Run, a: float, b: float) -> dict:
    inside = [s for s in run.samples if a <= s[0] < b]
    lat = [s[1] for s in inside]
    return {"from_s": round(a, 2), "to_s": round(b, 2), "turns": len(inside),
            "failed": sum(1 for s in inside if not s[2]),
            "p50_ms": round(pct(lat, 0.5), 1), "p99_ms": round(pct(lat, 0.99), 1),
            "max_ms": round(max(lat), 1) if lat else 0.0}


async def main(a) -> int:
    run_dir = Path(tempfile.mkdtemp(prefix="copilot-lb-chaos-real-"))
    print(f"chaos-real: run dir {run_dir}", flush=True)
    model = harness.start_fake_model(run_dir)
    backends = harness.start_backends(3, run_dir, shared_state=True)
    cfg = run_dir / "copilot-lb.yaml"
    cfg.write_text("backends:\n" + "".join(f"  - name: {n}\n    address: {b.addr}\n" for n, b in zip(NAMES, backends))
                   + "sessions:\n  shared_storage: true\n  failover: reassign\n"
                   + "health:\n  interval: 1s\n  timeout: 500ms\n  rise: 2\n  fall: 3\n")
    proxy = harness.start_proxy([], run_dir, extra_args=["--config", str(cfg)])
    lb_pid = proxy.proc.pid
    url = proxy.admin_url
    for n in NAMES:
        await await_state(url, n, "up", 30)
    kw = dict(model=harness.MODEL_NAME, provider=model.provider(),
              on_permission_request=PermissionHandler.approve_all)
    run = Run(a)
    report: dict = {"setup": f"{a.sessions} sessions over {a.clients} SDK clients, a turn every {a.think} s "
                             f"(x0.5-1.5), deadline {a.deadline} s, 3 real CLI 1.0.102 sharing session state, "
                             "health 1s/500ms/fall 3/rise 2", "faults": []}
    clients = []
    tasks = []
    failed_invariants: list[str] = []
    cpu_start = cpu_s(lb_pid)
    try:
        for _ in range(a.clients):
            c = new_client(proxy.url)
            await c.start()
            clients.append(c)
        sessions: list[Sess] = []
        for i in range(a.sessions):
            sid = f"chaos-real-{os.getpid()}-{i}"
            s = await clients[i % len(clients)].create_session(session_id=sid, **kw)
            sessions.append(Sess(sid, s))
        print(f"chaos-real: {len(sessions)} sessions created at {run.now():.1f} s", flush=True)
        tasks = [asyncio.create_task(worker(run, se)) for se in sessions]
        await asyncio.sleep(a.window)

        def victim() -> int:
            # The backend holding the most sessions (every fault should hit some).
            counts = {n: 0 for n in NAMES}
            for b in placements(url).values():
                if b in counts:
                    counts[b] += 1
            return NAMES.index(max(NAMES, key=lambda n: counts[n]))

        for kind in ["kill", "stall", "flap", "kill", "stall"]:
            i = await asyncio.to_thread(victim)
            name = NAMES[i]
            on_victim = sum(1 for b in (await asyncio.to_thread(placements, url)).values() if b == name)
            b0 = run.now()
            c0 = cpu_s(lb_pid)
            await asyncio.sleep(a.window)
            rec = {"fault": "", "victim_sessions": on_victim,
                   "lb_cpu_before": round((cpu_s(lb_pid) - c0) / (run.now() - b0), 3)}
            f0 = run.now()
            print(f"chaos-real: [{f0:6.1f} s] {kind} {name} ({on_victim} sessions there)", flush=True)
            if kind in ("kill", "stall"):
                if kind == "kill":
                    rec["fault"] = f"kill -9 {name}, restart after {a.outage:.0f} s"
                    backends[i].kill9()
                else:
                    rec["fault"] = f"SIGSTOP {name} {a.outage:.0f} s, SIGCONT"
                    os.killpg(backends[i].proc.pid, signal.SIGSTOP)
                d = await await_state(url, name, "down", a.outage)
                rec["detect_ms"] = None if d is None else round(d * 1000)
                cd, td = cpu_s(lb_pid), run.now()
                rest = a.outage - (run.now() - f0)
                if rest > 0:
                    await asyncio.sleep(rest)
                rec["lb_cpu_down"] = round((cpu_s(lb_pid) - cd) / max(run.now() - td, 1e-9), 3) if d is not None else None
                t_end = run.now()
                if kind == "kill":
                    backends[i] = await asyncio.to_thread(harness.restart_backend, backends[i], run_dir)
                else:
                    os.killpg(backends[i].proc.pid, signal.SIGCONT)
            else:
                rec["fault"] = f"flap {name}: 2 x (kill -9, restart at once)"
                for _ in range(2):
                    backends[i].kill9()
                    backends[i] = await asyncio.to_thread(harness.restart_backend, backends[i], run_dir)
                    await asyncio.sleep(1.0)
                t_end = run.now()
            r = await await_state(url, name, "up", 60)
            rec["recover_ms"] = None if r is None else round(r * 1000)
            rec["backend_restart_s"] = round(run.now() - t_end, 2)
            a0 = run.now()
            await asyncio.sleep(a.window)
            rec["before"] = window(run, b0, f0)
            rec["during"] = window(run, f0, a0)
            rec["after"] = window(run, a0, run.now())
            print(f"chaos-real:   detect {rec.get('detect_ms')} ms recover {rec['recover_ms']} ms p99 before/during/after "
                  f"{rec['before']['p99_ms']}/{rec['during']['p99_ms']}/{rec['after']['p99_ms']} ms, failed during "
                  f"{rec['during']['failed']}/{rec['during']['turns']}, lb cpu down {rec.get('lb_cpu_down')}", flush=True)
            report["faults"].append(rec)

        # Idle: no client traffic; CPU with all up, then kill -9 and restart before the next turn.
        run.paused = True
        await asyncio.sleep(max(a.deadline / 4, 3))
        c0, t0 = cpu_s(lb_pid), run.now()
        await asyncio.sleep(a.window)
        report["idle_cpu_all_up"] = round((cpu_s(lb_pid) - c0) / (run.now() - t0), 3)
        i = await asyncio.to_thread(victim)
        name = NAMES[i]
        report["idle_victim_sessions"] = sum(1 for b in (await asyncio.to_thread(placements, url)).values() if b == name)
        print(f"chaos-real: [{run.now():6.1f} s] idle: kill -9 {name} ({report['idle_victim_sessions']} sessions), "
              "restart before their next turn", flush=True)
        backends[i].kill9()
        await await_state(url, name, "down", 15)
        c0, t0 = cpu_s(lb_pid), run.now()
        await asyncio.sleep(a.window)
        report["idle_cpu_one_down"] = round((cpu_s(lb_pid) - c0) / (run.now() - t0), 3)
        backends[i] = await asyncio.to_thread(harness.restart_backend, backends[i], run_dir)
        await await_state(url, name, "up", 60)
        failed_before = run.turns_failed
        idle_mark = run.now()
        run.paused = False
        await asyncio.sleep(a.window * 2)
        run.stop = True
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True),
                               timeout=a.deadline * ATTEMPTS * 2 + 30)
        report["turns_failed_after_idle_restart"] = run.turns_failed - failed_before
        report["after_idle_restart"] = window(run, idle_mark, run.now())

        # Final: every session takes one more turn and its history holds every acked turn.
        lost, late, executed = [], [], 0
        for se in sessions:
            if not await turn(run, se, "final"):
                se.lost = f"final turn failed: {se.last_err}"
            else:
                ex, lt = await history(run, se)
                executed += ex
                late += lt
            if se.lost:
                lost.append(f"{se.sid}: {se.lost}")
        place = await asyncio.to_thread(placements, url)
    finally:
        run.stop = True
        for t in tasks:
            t.cancel()
        for c in clients:
            await close_client(c, fast=True)
        metrics = ""
        try:
            with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
                metrics = r.read().decode()
        except OSError:
            pass
        cpu_total = cpu_s(lb_pid) - cpu_start
        proxy.stop()
        for b in backends:
            b.stop()
        model.stop()

    report.update({
        "sent": run.sent, "answered": run.answered, "unanswered": run.unanswered,
        "errors": run.errors, "first_error": run.first_error,
        "turns_ok": run.turns_ok, "turns_failed": run.turns_failed,
        "sessions": len(sessions), "sessions_lost": len(lost), "lost_examples": lost[:10],
        "failed_attempts_executed": executed, "late_executions": len(late), "late_examples": late[:10],
        "placed_on": {n: sum(1 for b in place.values() if b == n) for n in NAMES},
        "lb_cpu_total_s": round(cpu_total, 2), "wall_s": round(run.now(), 1),
        "metrics": {k: sum(float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines()
                           if l.startswith(k) and not l.startswith("#") and (l[len(k):len(k) + 1] in ("{", " ")))
                    for k in ["copilot_lb_failovers_total", "copilot_lb_failover_failures_total",
                              "copilot_lb_health_probe_failures_total", "copilot_lb_passive_failures_total"]},
    })
    if run.unanswered:
        failed_invariants.append(f"{run.unanswered} turns without an answer by their {a.deadline} s deadline")
    if lost:
        failed_invariants.append(f"{len(lost)} sessions lost")
    # Reported, not an invariant: attempts answered -32011 ("may not have completed and may be
    # retried") that a frozen backend ran after SIGCONT; closing copilot-lb's connection cannot
    # take back bytes already in a stopped process's socket buffer (docs/chaos.md).
    if report["idle_cpu_one_down"] > a.max_down_cpu:
        failed_invariants.append(f"copilot-lb used {report['idle_cpu_one_down']} cores idle with one backend down "
                                 f"(limit {a.max_down_cpu}; {report['idle_cpu_all_up']} with all up)")
    report["failed"] = failed_invariants
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2))
    print(render(report))
    return 1 if failed_invariants else 0


def render(r: dict) -> str:
    out = [f"chaos-real run: {r['setup']}", "",
           f"turns sent {r['sent']}, answered {r['answered']}, without an answer by the deadline {r['unanswered']}",
           f"errors: {r['errors']}"]
    out += [f"  first {k}: {v}" for k, v in r["first_error"].items()]
    out += [f"turns acknowledged {r['turns_ok']}, failed after {ATTEMPTS} attempts {r['turns_failed']}; failed attempts "
            f"the CLI ran anyway {r['failed_attempts_executed']}, after a later turn {r['late_executions']} {r['late_examples']}",
            f"sessions {r['sessions']}, lost {r['sessions_lost']} {r['lost_examples']}",
            f"idle phase: {r['idle_victim_sessions']} sessions on the backend killed and restarted while idle; turns that "
            f"then failed for good {r['turns_failed_after_idle_restart']}",
            "", "| fault | sessions on victim | detect ms | recover ms | p99 before | p99 during | p99 after | max during | "
            "failed / turns during | lb CPU before | lb CPU while down |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in r["faults"]:
        out.append(f"| {f['fault']} | {f['victim_sessions']} | {f.get('detect_ms', '–')} | {f['recover_ms']} | "
                   f"{f['before']['p99_ms']} ms | {f['during']['p99_ms']} ms | {f['after']['p99_ms']} ms | "
                   f"{f['during']['max_ms']} ms | {f['during']['failed']} / {f['during']['turns']} | {f['lb_cpu_before']} | "
                   f"{f.get('lb_cpu_down', '–')} |")
    out += ["", f"copilot-lb CPU without client traffic: {r['idle_cpu_all_up']} cores all up, {r['idle_cpu_one_down']} "
                f"with one killed; {r['lb_cpu_total_s']} CPU-s over {r['wall_s']} s",
            f"metrics: {r['metrics']}", ""]
    if r["failed"]:
        out.append("INVARIANTS FAILED:")
        out += [f"  - {f}" for f in r["failed"]]
    else:
        out.append("INVARIANTS: all held")
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--think", type=float, default=1.0, help="mean seconds between two turns of a session")
    ap.add_argument("--deadline", type=float, default=60.0, help="seconds a send_and_wait may take")
    ap.add_argument("--outage", type=float, default=8.0, help="seconds a killed/stopped backend stays so")
    ap.add_argument("--window", type=float, default=6.0, help="seconds of traffic before/after each fault")
    ap.add_argument("--max-down-cpu", type=float, default=0.15)
    ap.add_argument("--out", default="")
    import logging
    logging.getLogger("copilot").setLevel(logging.CRITICAL)
    sys.exit(asyncio.run(main(ap.parse_args())))
