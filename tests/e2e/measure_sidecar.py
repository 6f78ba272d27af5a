#!/usr/bin/env python3
"""Measure the session-aware sidecar (issue #14) with the real CLI and Python SDK, on the stack of
sidecar_stack.py (app -> sidecar -> two edges sharing redis -> three CLIs sharing session state):

    bash tests/e2e/install.sh && cargo build --release
    COPILOT_LB_BIN=target/release/copilot-lb .e2e/venv/bin/python tests/e2e/measure_sidecar.py --rounds 10

1. Failover, --rounds times: one SDK client through the sidecar holds --sessions sessions with
   one finished turn each; a timed turn on all of them at once (the normal turn, for scale);
   then kill -9 of the edge holding most of them and, at once, the next send_and_wait on every
   session. Measured per moved session: kill -> its answer (with its history). The killed edge
   is started again between rounds and the sidecar must see both edges up.
2. Latency, in the same run: three raw JSON-RPC connections (rawrpc.py, no SDK in the way),
   each sending `status.get` (the edge forwards it to a CLI), sequentially, --requests times,
   interleaved one request per path per cycle with the order rotated every cycle (drift and
   position effects cancel): the session-aware sidecar; a second sidecar process in the old
   byte-pipe mode (`mode: tcp`, plain TCP to the same edge; the app sends the tenant token);
   and a direct connection to that edge (with the token), the baseline. Prints p50/p99 per
   path, what each sidecar adds over direct, and the CPU seconds each copilot-lb process used
   during this phase (/proc/<pid>/stat utime+stime, 10 ms ticks: hence the many requests; the
   session-aware sidecar's figure includes its health probes of both edges, 200 ms apart).
   The copilot-lb processes log at info here (COPILOT_LB_E2E_RUST_LOG overrides).

The last line is a summary meant for the README. Exit status 1 if any request failed (an error,
a timeout or an answer without the history). Bounded: --rounds (default 10), --requests
(default 5000), 30 s per send, 180 s per failover round, 300 s for the latency phase, 30 s per
setup step.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import sidecar_stack as sc  # noqa: E402
from rawrpc import RawClient  # noqa: E402
from sdkutil import connected, recall, reply_text  # noqa: E402

SEND_TIMEOUT_S = 30.0
ROUND_TIMEOUT_S = 180.0
LATENCY_TIMEOUT_S = 300.0
CALL_TIMEOUT_S = 10.0
WARMUP = 50
PROBE = 100   # status.get calls that show which edge the sidecar's connection uses


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); nan for no samples."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def ms(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x * 1000:.0f}"


def us(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x * 1e6:.0f}"


def dus(x: float) -> str:
    """A signed difference in microseconds."""
    return "n/a" if math.isnan(x) else f"{x * 1e6:+.0f}"


# ---------------------------------------------------------------------------------------
# 1. failover
# ---------------------------------------------------------------------------------------
@dataclass
class Round:
    n: int
    victim: str = ""
    normal_s: list[float] = field(default_factory=list)    # a turn on every session at once
    moved_s: list[float] = field(default_factory=list)     # kill -> answer, sessions on the victim
    stayed_s: list[float] = field(default_factory=list)    # kill -> answer, the others
    failures: list[str] = field(default_factory=list)


async def failover_round(s: sc.Stack, n: int, tag: str, n_sessions: int) -> Round:
    r = Round(n)
    async with connected(s.sidecar.url, fast_close=True) as client:
        held = await sc.open_sessions(client, s, f"m{tag}r{n}", n_sessions, SEND_TIMEOUT_S)

        async def turn(sid: str, ask: str, t0: float) -> float | None:
            sess, prompts = held[sid]
            try:
                ev = await sess.send_and_wait(ask, timeout=SEND_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 (counted: the point is zero)
                r.failures.append(f"round {n} {sid}: {type(e).__name__}: {e}")
                return None
            took = time.perf_counter() - t0
            if reply_text(ev) != recall(*prompts):
                r.failures.append(f"round {n} {sid}: {reply_text(ev)!r}")
                return None
            prompts.append(ask)
            return took

        t0 = time.perf_counter()
        normal = await asyncio.gather(*(turn(sid, f"RECALL before the kill {sid}", t0) for sid in held))
        r.normal_s = [t for t in normal if t is not None]
        placed = s.sidecar.placements()
        by_edge = {e.name: [sid for sid in held if placed.get(sid) == e.name] for e in s.edges}
        victim = max(s.edges, key=lambda e: len(by_edge[e.name]))
        r.victim = victim.name
        if not by_edge[victim.name]:
            r.failures.append(f"round {n}: no session placed on an edge: {placed}")
            return r
        t_kill = time.perf_counter()
        victim.proc.kill9()
        after = await asyncio.gather(*(turn(sid, f"RECALL after the edge died {sid}", t_kill) for sid in held))
        for sid, t in zip(held, after):
            if t is not None:
                (r.moved_s if sid in by_edge[victim.name] else r.stayed_s).append(t)
        now = s.sidecar.placements()
        stuck = [sid for sid in by_edge[victim.name] if now.get(sid) == victim.name]
        if stuck:
            r.failures.append(f"round {n}: still placed on the dead {victim.name}: {stuck}")
    return r


def restore(s: sc.Stack) -> None:
    """Start every dead edge again (from this, the main thread) until the sidecar sees both up."""
    for e in s.edges:
        if e.proc is None or not e.proc.alive():
            e.start(30)
    sc.wait_edges_up(s, timeout=30)


# ---------------------------------------------------------------------------------------
# 2. latency
# ---------------------------------------------------------------------------------------
def cpu_s(pid: int) -> float:
    """utime + stime of `pid` in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) ": field 3 onwards
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def requests_total(lb: sc.Lb) -> float:
    """Every client request the process counted (copilot_lb_requests_total, all labels)."""
    total = 0.0
    for line in lb.metrics().splitlines():
        m = re.match(r"copilot_lb_requests_total(\{[^}]*\})?\s+([0-9.eE+-]+)", line)
        if m:
            total += float(m.group(2))
    return total


async def timed_call(c: RawClient, what: str, failures: list[str]) -> float | None:
    t0 = time.perf_counter()
    try:
        reply = await c.call("status.get", {}, CALL_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001
        failures.append(f"{what}: {type(e).__name__}: {e}")
        return None
    dt = time.perf_counter() - t0
    if "result" not in reply:
        failures.append(f"{what}: {reply}")
        return None
    return dt


async def which_edge(s: sc.Stack, failures: list[str]) -> tuple[RawClient, sc.Lb | None]:
    """Opens the sidecar path and finds the edge its requests go to (the pipe and the direct
    path then use the same edge, so the three differ only by what sits in front of it)."""
    side = await RawClient.open(s.sidecar.url)     # no token: the sidecar adds the tenant's
    before = {e.name: requests_total(e) for e in s.edges}
    for i in range(PROBE):
        await timed_call(side, f"probe {i}", failures)
    delta = {e.name: requests_total(e) - before[e.name] for e in s.edges}
    edge = max(s.edges, key=lambda e: delta[e.name])
    if delta[edge.name] < PROBE:
        failures.append(f"cannot tell which edge serves the sidecar's connection: {delta}")
        return side, None
    return side, edge


async def latency(paths: dict[str, RawClient], n: int, lbs: list[sc.Lb]
                  ) -> tuple[dict[str, list[float]], dict[str, float], float, list[str]]:
    failures: list[str] = []
    names = list(paths)
    for i in range(WARMUP):
        for name in names:
            await timed_call(paths[name], f"{name} warmup {i}", failures)
    cpu0 = {lb.name: cpu_s(lb.proc.pid) for lb in lbs}
    t0 = time.perf_counter()
    out: dict[str, list[float]] = {name: [] for name in names}
    for i in range(n):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            dt = await timed_call(paths[name], f"{name} request {i}", failures)
            if dt is not None:
                out[name].append(dt)
        if len(failures) > 20:   # something is broken: stop early, it is reported anyway
            break
    wall = time.perf_counter() - t0
    cpu = {lb.name: cpu_s(lb.proc.pid) - cpu0[lb.name] for lb in lbs}
    return out, cpu, wall, failures


async def latency_phase(s: sc.Stack, n: int) -> dict:
    """Returns what the summary needs; starts the byte pipe (in this thread: the main one)."""
    failures: list[str] = []
    side, edge = await which_edge(s, failures)
    res: dict = {"failures": failures, "edge": edge.name if edge else None}
    clients = [side]
    try:
        if edge is None:
            return res
        port, admin_port = harness.free_port(), harness.free_port()
        pipe = sc.Lb(name="pipe", run_dir=s.run_dir, config=sc.pipe_config(edge, port, admin_port),
                     port=port, admin_port=admin_port)
        s.extra.append(pipe)
        pipe.start(30)
        direct = await RawClient.open(edge.url, token=sc.TENANT_TOKEN)
        clients.append(direct)
        piped = await RawClient.open(pipe.url, token=sc.TENANT_TOKEN)
        clients.append(piped)
        paths = {"direct": direct, "pipe": piped, "sidecar": side}
        lbs = [*s.edges, s.sidecar, pipe]
        out, cpu, wall, f = await latency(paths, n, lbs)
        failures += f
        res.update(samples=out, cpu=cpu, wall=wall, pids={lb.name: lb.proc.pid for lb in lbs})
        return res
    finally:
        for c in clients:
            c.abort()


# ---------------------------------------------------------------------------------------
def main(rounds: int, n_sessions: int, n_requests: int, verbose: bool, keep: bool) -> int:
    if not harness.COPILOT_BIN.exists():
        print(f"Copilot CLI not installed at {harness.COPILOT_BIN}: run tests/e2e/install.sh", file=sys.stderr)
        return 2
    if not harness.proxy_bin().exists():
        print(f"copilot-lb binary not found at {harness.proxy_bin()}: set COPILOT_LB_BIN", file=sys.stderr)
        return 2
    run_dir = Path(tempfile.mkdtemp(prefix="copilot-lb-sidecar-"))
    tag = f"{int(time.time()) % 100000}"
    results: list[Round] = []
    lat: dict = {"failures": []}
    s = sc.start_stack(run_dir)
    try:
        for n in range(rounds):
            if n:
                restore(s)
            try:
                r = asyncio.run(asyncio.wait_for(failover_round(s, n, tag, n_sessions), ROUND_TIMEOUT_S))
            except Exception as e:  # noqa: BLE001 (a round that cannot finish is a failure, reported)
                r = Round(n, failures=[f"round {n}: {type(e).__name__}: {e}"])
            results.append(r)
            print(f"round {n + 1}/{rounds}: {r.victim or '?'} killed, {len(r.moved_s)} sessions moved: "
                  f"kill -> answer {', '.join(ms(t) for t in sorted(r.moved_s)) or '-'} ms "
                  f"(sessions that stayed {', '.join(ms(t) for t in sorted(r.stayed_s)) or '-'} ms; "
                  f"a normal turn on all at once {', '.join(ms(t) for t in sorted(r.normal_s)) or '-'} ms); "
                  f"{len(r.failures)} failed", flush=True)
            for f in r.failures if verbose or r.failures else []:
                print(f"  FAIL {f}", flush=True)
        restore(s)
        try:
            lat = asyncio.run(asyncio.wait_for(latency_phase(s, n_requests), LATENCY_TIMEOUT_S))
        except Exception as e:  # noqa: BLE001
            lat = {"failures": [f"latency phase: {type(e).__name__}: {e}"]}
    except BaseException:
        print(s.log_tails(), file=sys.stderr)
        raise
    finally:
        if any(r.failures for r in results) or lat["failures"]:
            keep = True
        s.stop()
        if keep:
            print(f"logs kept in {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)

    moved = [t for r in results for t in r.moved_s]
    stayed = [t for r in results for t in r.stayed_s]
    normal = [t for r in results for t in r.normal_s]
    fo_failed = sum(len(r.failures) for r in results)
    print(f"failover, {len(results)} rounds x {n_sessions} sessions: kill -9 -> next answer on a moved "
          f"session (n={len(moved)}) p50 {ms(pct(moved, 50))} ms, p99 {ms(pct(moved, 99))} ms, "
          f"max {ms(max(moved, default=math.nan))} ms; sessions that stayed (n={len(stayed)}) "
          f"p50 {ms(pct(stayed, 50))} ms; a normal turn (all sessions at once) p50 {ms(pct(normal, 50))} ms, "
          f"p99 {ms(pct(normal, 99))} ms; {fo_failed} failed requests", flush=True)

    for f in lat["failures"][:20]:
        print(f"  FAIL {f}", flush=True)
    fo_line = (f"edge kill -9 -> next answer on each moved session p50 {ms(pct(moved, 50))} ms / "
               f"p99 {ms(pct(moved, 99))} ms / max {ms(max(moved, default=math.nan))} ms "
               f"({len(moved)} sessions over {len(results)} rounds; a normal turn p50 {ms(pct(normal, 50))} ms)")
    if "samples" not in lat:
        print(f"latency phase did not run: {lat['failures'][:1]}")
        print(f"SUMMARY sidecar: {fo_line}; latency not measured; "
              f"{fo_failed + len(lat['failures'])} failed requests", flush=True)
        return 1
    smp, cpu, wall = lat["samples"], lat["cpu"], lat["wall"]
    p = {k: (pct(v, 50), pct(v, 99)) for k, v in smp.items()}
    for k in ("direct", "pipe", "sidecar"):
        v = smp[k]
        print(f"latency {k:8s} (status.get via {lat['edge']}, n={len(v)}): p50 {us(p[k][0])} us, "
              f"p99 {us(p[k][1])} us, mean {us(sum(v) / len(v) if v else math.nan)} us", flush=True)
    add = {k: (p[k][0] - p["direct"][0], p[k][1] - p["direct"][1]) for k in ("pipe", "sidecar")}
    ratio = {k: p[k][0] / p["direct"][0] for k in ("pipe", "sidecar")}
    total = sum(len(v) for v in smp.values())
    per_req = {"sidecar": cpu["sidecar"] / max(1, len(smp["sidecar"])),
               "pipe": cpu["pipe"] / max(1, len(smp["pipe"])),
               "edge": cpu[lat["edge"]] / max(1, total)}
    print(f"CPU during the latency phase ({wall:.1f} s, {total} requests): "
          + ", ".join(f"{name} {c:.2f} s" for name, c in cpu.items())
          + f"; per request: session-aware sidecar {us(per_req['sidecar'])} us, pipe {us(per_req['pipe'])} us, "
          f"{lat['edge']} (all three paths) {us(per_req['edge'])} us", flush=True)
    failed = fo_failed + len(lat["failures"])
    print(f"SUMMARY sidecar: {fo_line}; status.get latency (n={len(smp['direct'])} per path, interleaved) "
          f"direct to the edge p50 {us(p['direct'][0])} us / p99 {us(p['direct'][1])} us, "
          f"byte pipe {us(p['pipe'][0])} / {us(p['pipe'][1])} us "
          f"({dus(add['pipe'][0])} / {dus(add['pipe'][1])} us, x{ratio['pipe']:.2f} p50), "
          f"session-aware sidecar {us(p['sidecar'][0])} / {us(p['sidecar'][1])} us "
          f"({dus(add['sidecar'][0])} / {dus(add['sidecar'][1])} us, x{ratio['sidecar']:.2f} p50); "
          f"CPU per request {us(per_req['sidecar'])} us in the session-aware sidecar, "
          f"{us(per_req['pipe'])} us in the pipe, {us(per_req['edge'])} us in the edge; {failed} failed requests", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10, help="failover rounds (default 10)")
    ap.add_argument("--sessions", type=int, default=sc.N_SESSIONS, help="sessions per round")
    ap.add_argument("--requests", type=int, default=5000, help="status.get calls per path (default 5000)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every failure")
    ap.add_argument("--keep", action="store_true", help="keep the run dir (logs)")
    a = ap.parse_args()
    if a.rounds < 1 or a.sessions < 1 or a.requests < 1:
        ap.error("--rounds, --sessions and --requests must be at least 1")
    logging.getLogger("copilot").setLevel(logging.CRITICAL)
    # info, not the suite's debug: a debug line per frame would be part of what is measured.
    os.environ.setdefault("COPILOT_LB_E2E_RUST_LOG", "info")
    harness.install_signal_handlers()
    sys.exit(main(a.rounds, a.sessions, a.requests, a.verbose, a.keep))
