"""Load generation shared by the gate benchmarks: open loop (a rate), closed loop (N callers).

Also the gate they put the load on when it goes through the ledger
(:func:`ledger_gate`: the production Gatekeeper on a fresh SQLite file) and
the hang-ups that free its lines again (:class:`HangUps`).

``one_call`` is a zero-argument coroutine factory that performs one gate
exchange and returns its latency in seconds; it raises OSError or
ConnectionError on failure, which is counted as an error, not a latency.

CPU is counted per call offered on both sides: ``client_cpu_ms`` by the load
generator's process, ``server_cpu_ms`` by the server's (:func:`client_figures`,
every thread of it: the SQLite worker too). Their sum says how many cores a
rate needs (:func:`cores_note`), which no latency figure on a shared machine
does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import _leanload

from agent import eventloop
from agent.calls import CallInfo
from agent.gate.decision import Decision
from agent.gate.policy import load_policy
from agent.gatekeeper import Gatekeeper
from agent.ledger import Cdr, open_ledger
from agent.meter.clock import WallClock

OneCall = Callable[[], Awaitable[float]]

CLIENT_CPUS: set[int] | None = None
"""The cores the load generator's process is pinned to (:func:`pin`); None: not pinned."""


def pin(spec: str) -> str:
    """``--pin SERVER/CLIENT`` (e.g. ``0/1``): this process (the gate: its loop and
    every thread it starts later, the SQLite worker too) on the SERVER cores, the load
    generator's process on the CLIENT cores, so neither takes CPU from the other and
    the gate's figures are those of the cores it was given. Call it before the gate
    starts any thread. Returns a line saying what was pinned where."""
    if not spec:
        return "not pinned: the gate and the load generator share every core"
    global CLIENT_CPUS
    server, _, client = spec.partition("/")
    server_cpus = {int(c) for c in server.split(",")}
    CLIENT_CPUS = {int(c) for c in client.split(",")} if client else None
    os.sched_setaffinity(0, server_cpus)
    return (f"pinned: the gate on cores {sorted(server_cpus)}, the load generator on "
            f"{sorted(CLIENT_CPUS) if CLIENT_CPUS else 'any'}")


async def open_loop(one_call: OneCall, rate: float, seconds: float) -> dict[str, object]:
    """Start calls at a fixed rate, whatever the latency (the load a PBX offers)."""
    loop = asyncio.get_running_loop()
    cpu = time.process_time()
    start = loop.time()
    tasks = []
    n = int(rate * seconds)
    for i in range(n):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one_call()))
    lat = await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = loop.time() - start
    return summarize([x for x in lat if isinstance(x, float)], n, elapsed,
                     time.process_time() - cpu)


async def closed_loop(one_call: OneCall, concurrency: int, seconds: float) -> dict[str, object]:
    """``concurrency`` callers, each starting its next call when the last one ends (saturation)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    lat: list[float] = []
    errors = 0

    async def caller() -> None:
        nonlocal errors
        while loop.time() < end:
            try:
                lat.append(await one_call())
            except (OSError, ConnectionError):
                errors += 1

    cpu = time.process_time()
    start = loop.time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return summarize(lat, len(lat) + errors, loop.time() - start, time.process_time() - cpu)


def summarize(lat: list[float], attempted: int, elapsed: float,
              cpu_seconds: float) -> dict[str, object]:
    lat.sort()
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return {"calls": len(lat), "errors": attempted - len(lat),
            "calls_per_s": round(len(lat) / elapsed, 1),
            "p50_ms": round(q[49] * 1000, 3), "p99_ms": round(q[98] * 1000, 3),
            "client_cpu_ms": round(cpu_seconds * 1000 / max(attempted, 1), 4)}


Answer = tuple[float, bool, str]
"""One gate exchange as the caller saw it: latency in seconds, allowed, the reason set."""


async def open_loop_answers(one_call: Callable[[], Awaitable[Answer]], rate: float,
                            seconds: float) -> dict[str, object]:
    """Offer ``rate`` calls/s on a fixed schedule and count every answer, refusals too.

    What an overload run needs: ``served_per_s`` (allowed calls per second of the
    run), the latency of *every* answer (``p99_ms``: what each caller waited,
    allowed or refused) and of the allowed ones (``served_p99_ms``), the refusals
    by reason, and ``errors`` (no answer at all: a connection refused or dropped).
    """
    loop = asyncio.get_running_loop()
    cpu = time.process_time()
    lags: list[float] = []
    done = False

    async def lag_monitor() -> None:  # this process's own lateness, part of every latency
        while not done:
            t = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - t - 0.01)

    monitor = asyncio.ensure_future(lag_monitor())
    start = loop.time()
    tasks = []
    n = int(rate * seconds)
    for i in range(n):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one_call()))
    got = await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = loop.time() - start
    done = True
    await monitor
    answers = [x for x in got if isinstance(x, tuple)]
    every = sorted(lat for lat, _, _ in answers)
    served = sorted(lat for lat, ok, _ in answers if ok)
    refused: dict[str, int] = {}
    for _, ok, reason in answers:
        if not ok:
            refused[reason] = refused.get(reason, 0) + 1

    def pct(lat: list[float], p: int) -> float:
        if len(lat) < 2:
            return float("nan")
        return round(statistics.quantiles(lat, n=100)[p - 1] * 1000, 3)

    return {"offered_per_s": rate, "offered": n, "answered": len(answers),
            "errors": n - len(answers), "served": len(served),
            "served_per_s": round(len(served) / elapsed, 1),
            "p50_ms": pct(every, 50), "p99_ms": pct(every, 99),
            "max_ms": round(every[-1] * 1000, 3) if every else float("nan"),
            "served_p99_ms": pct(served, 99), "refused": refused,
            "client_lag_p99_ms": pct(sorted(lags), 99),
            "client_cpu_ms": round((time.process_time() - cpu) * 1000 / max(n, 1), 4)}


def overload_figures(saturation: dict[str, object], loads: dict[str, dict[str, object]],
                     budget_ms: float) -> dict[str, object]:
    """The overload target, as ratios within one run: at each multiple of the saturation
    rate offered, served/s over the saturation's calls/s (target >= 0.9) and the p99 of
    every answer over the decision budget (target <= 1), with no caller unanswered."""
    sat = float(str(saturation["calls_per_s"]))
    out: dict[str, object] = {"sat_calls_per_s": sat, "sat_p99_ms": saturation["p99_ms"],
                              "budget_ms": budget_ms}
    met = True
    for label, res in loads.items():
        served = float(str(res["served_per_s"])) / sat if sat else 0.0
        p99 = float(str(res["p99_ms"])) / budget_ms
        out[f"{label}_offered_per_s"] = res["offered_per_s"]
        # What the generator actually offered, and how late it started calls: a
        # generator that cannot offer the load measures nothing.
        out[f"{label}_offered_achieved_per_s"] = res.get("offered_achieved_per_s")
        out[f"{label}_launch_lag_p99_ms"] = res.get("launch_lag_p99_ms")
        out[f"{label}_served_per_s"] = res["served_per_s"]
        out[f"{label}_served_vs_sat"] = round(served, 3)
        out[f"{label}_p50_ms"] = res["p50_ms"]
        out[f"{label}_p99_ms"] = res["p99_ms"]
        out[f"{label}_p99_vs_budget"] = round(p99, 3)
        out[f"{label}_errors"] = res["errors"]
        out[f"{label}_client_lag_p99_ms"] = res["client_lag_p99_ms"]
        out[f"{label}_refused"] = res["refused"]
        out[f"{label}_server_cpu_ms"] = res.get("server_cpu_ms")
        out[f"{label}_client_cpu_ms"] = res.get("client_cpu_ms")
        for key, value in res.items():
            if key.startswith("gate_"):
                out[f"{label}_{key}"] = value
        met = met and served >= 0.9 and p99 <= 1.0 and res["errors"] == 0
    out["overload_target_met"] = met
    return out


def overload_lines(figures: dict[str, object], labels: list[str]) -> str:
    lines = [f"saturation through the ledger: {figures['sat_calls_per_s']} calls/s "
             f"(p99 {figures['sat_p99_ms']} ms); budget {figures['budget_ms']:g} ms"]
    for label in labels:
        lines.append(
            f"  offered {label} = {figures[f'{label}_offered_per_s']:g}/s "
            f"(achieved {figures.get(f'{label}_offered_achieved_per_s')}/s, launches late "
            f"p99 {figures.get(f'{label}_launch_lag_p99_ms')} ms): served "
            f"{figures[f'{label}_served_per_s']}/s = {figures[f'{label}_served_vs_sat']}x "
            f"saturation; every answer p50 {figures[f'{label}_p50_ms']} ms p99 "
            f"{figures[f'{label}_p99_ms']} ms = {figures[f'{label}_p99_vs_budget']}x budget; "
            f"unanswered {figures[f'{label}_errors']}; refused {figures[f'{label}_refused']}; "
            f"load generator's own lag p99 {figures[f'{label}_client_lag_p99_ms']} ms")
        seen = {k[len(label) + 1:]: v for k, v in figures.items()
                if k.startswith(f"{label}_gate_")}
        if seen:
            lines.append(f"    the gate's side: {seen}")
    lines.append("target (served >= 0.9x saturation, p99 <= budget, none unanswered): "
                 + ("met" if figures["overload_target_met"] else "missed"))
    return "\n".join(lines)


FIGURES = ("calls_per_s", "p50_ms", "p99_ms", "errors", "server_cpu_ms", "client_cpu_ms")
"""The figures of one load that a gate bench's JSON line carries."""


async def client_figures(script: str, *args: str) -> dict[str, object]:
    """Run ``script --client ARGS`` (the load generator, its own process) and return
    the figures it prints, with the CPU this process (the server) spent per call
    offered while it ran."""
    cpu = time.process_time()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, script, "--client", *args, stdout=asyncio.subprocess.PIPE)
    if CLIENT_CPUS is not None:
        # Before it has done anything that matters: the interpreter is still starting.
        os.sched_setaffinity(proc.pid, CLIENT_CPUS)
    out, _ = await proc.communicate()
    result: dict[str, object] = json.loads(out.decode().strip().splitlines()[-1])
    offered = int(str(result["offered"])) if "offered" in result else (
        int(str(result["calls"])) + int(str(result["errors"])))
    result["server_cpu_ms"] = round((time.process_time() - cpu) * 1000 / max(offered, 1), 4)
    return result


def cores_needed(result: dict[str, object], rate: float = 2000.0) -> float:
    """Cores the server and the load generator together need for ``rate`` calls/s, at
    the CPU per call they spent in ``result``."""
    per_call_ms = float(str(result["server_cpu_ms"])) + float(str(result["client_cpu_ms"]))
    return round(per_call_ms * rate / 1000, 2)


def cores_note(results: dict[str, dict[str, object]], rate: float = 2000.0) -> str:
    """One line per load: CPU per call on each side, and the cores ``rate`` would need."""
    lines = [f"CPU per call offered (server + load generator) and the cores {rate:,.0f}"
             f" calls/s would need at that cost; this machine has {os.cpu_count()}:"]
    for key, res in results.items():
        if "server_cpu_ms" in res:
            lines.append(f"  {key:22s} {res['server_cpu_ms']:.3f} + {res['client_cpu_ms']:.3f}"
                         f" ms -> {cores_needed(res, rate):.2f} cores")
    return "\n".join(lines)


def target_verdicts(results: dict[str, dict[str, object]], rate: float = 2000.0,
                    p99_ms: float = 5.0) -> dict[str, object]:
    """The gate target (``rate`` calls/s at p99 <= ``p99_ms``) for the adapter with a
    trivial gate ("socket") and with the real one ("ledger"): every call offered at
    that rate completed, allowed (a refusal counts as an error), within the p99.

    Completion, not calls/s, is the throughput test: the open loop offers the rate
    on a fixed schedule, and a gate that falls behind shows in the latencies.
    """

    def met(key: str) -> bool | None:
        res = results.get(key)
        if res is None:
            return None  # that rate was not offered in this run
        return (res["errors"] == 0 and int(str(res["calls"])) > 0
                and float(str(res["p99_ms"])) <= p99_ms)

    socket, ledger = met(f"adapter_{rate:g}"), met(f"ledger_{rate:g}")
    return {"target_met_socket": socket, "target_met_ledger": ledger,
            "target_met": None if socket is None or ledger is None else socket and ledger}


def verdict_word(met: object) -> str:
    return "not measured" if met is None else "met" if met else "missed"


class HangUps:
    """Admitted calls settled at zero ``delay`` seconds on, as a hang-up before the
    answer would be, so rented lines and held units free up during a gate bench."""

    def __init__(self, ledger: Any, delay: float = 0.2) -> None:
        self.ledger = ledger
        self.delay = delay
        self._tasks: set[asyncio.Task[None]] = set()

    def later(self, call: CallInfo, account: str) -> None:
        task = asyncio.ensure_future(self._hang_up(call, account))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _hang_up(self, call: CallInfo, account: str) -> None:
        await asyncio.sleep(self.delay)
        await self.ledger.settle_call(Cdr(call.call_id, account, call.caller_id,
                                          call.destination, None, datetime.now(UTC), 0, 0,
                                          Decimal(0), "NO_ANSWER"))

    async def wait(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)



# Both recorded requests carry accountcode ``acme``, the account's id (FastAGI trace
# 06, ESL trace 06a), and caller 2001 (the ESL bench's calls present it instead
# of the recording's "sipp"); calling hours all day, so the time does not matter.
LEDGER_POLICY = """version: 1
defaults:
  calling_hours: [{days: all, windows: [{start: '00:00', end: '24:00'}]}]
  max_concurrent_calls: 100000
accounts:
  acme: {name: ACME, caller_ids: ["2001"]}
"""


@contextlib.asynccontextmanager
async def ledger_gate(tmp: Path) -> AsyncIterator[Callable[[CallInfo], Awaitable[Decision]]]:
    """The production gate on a fresh SQLite ledger; each admitted call hangs up 0.2 s on.

    A refusal goes back to the PBX side as one (the load generator counts it as
    an error: the load is sized to be admitted), and the ledger is audited when
    the bench is over.
    """
    (tmp / "policy.yaml").write_text(LEDGER_POLICY)
    policy = load_policy(tmp / "policy.yaml")
    ledger = await open_ledger(f"sqlite:///{tmp / 'ledger.db'}")
    await ledger.topup("acme", Decimal("1000000"), ref="bench", at=datetime.now(UTC))
    gatekeeper = Gatekeeper(ledger=ledger, policy=lambda: policy, clock=WallClock(),
                            node="bench")
    hangups = HangUps(ledger)

    async def gate(call: CallInfo) -> Decision:
        decision = await gatekeeper(call)
        if decision.allow:
            hangups.later(call, "acme")
        return decision

    gate.gatekeeper = gatekeeper  # type: ignore[attr-defined]  # for gate_view

    try:
        yield gate
    finally:
        await hangups.wait()
        problems = await ledger.audit()
        await ledger.close()
        if problems:
            raise AssertionError(f"ledger audit after the bench: {problems[:3]}")


@contextlib.asynccontextmanager
async def gate_view(listener: Any, gatekeeper: Any) -> AsyncIterator[dict[str, object]]:
    """What the gate's side saw during a load, sampled every 10 ms: its loop's
    lateness, the connections in flight, the listener's shed count, the requests
    waiting for a ledger slot and the slot's mean service time. The dict is filled
    when the block ends."""
    loop = asyncio.get_running_loop()
    out: dict[str, object] = {}
    lags: list[float] = []
    pending: list[int] = []
    waiting: list[int] = []
    service: list[float] = []
    shed0 = listener.shed if listener is not None else 0
    refused0 = gatekeeper.slots.refused if gatekeeper is not None else 0
    done = False

    async def sample() -> None:
        while not done:
            t = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - t - 0.01)
            if listener is not None:
                pending.append(listener.pending)
            if gatekeeper is not None:
                waiting.append(len(gatekeeper.slots.waiting))
                service.append(gatekeeper.slots.service)

    task = asyncio.ensure_future(sample())
    try:
        yield out
    finally:
        done = True
        await task

        def p(xs: list[float], q: int) -> float:
            return round(statistics.quantiles(sorted(xs), n=100)[q - 1], 4) if len(xs) > 1 \
                else float("nan")

        out["gate_loop_lag_p50_ms"] = round(p(lags, 50) * 1000, 1)
        out["gate_loop_lag_p99_ms"] = round(p(lags, 99) * 1000, 1)
        if listener is not None:
            out["gate_pending_max"] = max(pending, default=0)
            out["gate_shed"] = listener.shed - shed0
        if gatekeeper is not None:
            out["gate_waiting_max"] = max(waiting, default=0)
            out["gate_service_p50_ms"] = round(p(service, 50) * 1000, 1)
            out["gate_slots_refused"] = gatekeeper.slots.refused - refused0


def run_client(mode: str, peer: _leanload.PeerType, host: str, port: int,
               payload: Callable[[], bytes], value: float, seconds: float,
               exchange: Callable[[], Awaitable[Answer]],
               one_call: OneCall) -> dict[str, object]:
    """One load generator process of a socket gate bench (ESL or FastAGI), by mode:
    the lean Protocol generator (``lean-answers`` open loop, ``lean-closed``), or the
    stream one (``answers`` open loop counting every answer, ``rate`` open loop of
    allowed calls, else a closed loop of ``value`` callers)."""
    if mode == "lean-answers":
        return eventloop.run(_leanload.open_loop(peer, host, port, payload, value, seconds))
    if mode == "lean-closed":
        return eventloop.run(_leanload.closed_loop(peer, host, port, payload, int(value),
                                                   seconds))
    if mode == "answers":
        return eventloop.run(open_loop_answers(exchange, value, seconds))
    if mode == "rate":
        return eventloop.run(open_loop(one_call, value, seconds))
    return eventloop.run(closed_loop(one_call, int(value), seconds))


def add_overload_args(ap: argparse.ArgumentParser) -> None:
    """The overload options the socket gate benches share (``--overload``, ``--pin``,
    ``--generator``)."""
    ap.add_argument("--overload", default="",
                    help="only the overload run: saturation through the ledger, then these "
                         "multiples of it offered, e.g. 2,5")
    ap.add_argument("--pin", default="",
                    help="SERVER/CLIENT cores, e.g. 0/1: the gate's process on one, the load "
                         "generator's on the other (default: not pinned)")
    ap.add_argument("--generator", choices=("lean", "streams"), default="lean",
                    help="--overload's load generator: lean (Protocols, bench/_leanload.py) "
                         "or streams (the asyncio-streams one of session 7)")


def run_overload(bench: str, args: argparse.Namespace,
                 overload_bench: Callable[..., Awaitable[dict[str, object]]]) -> None:
    """A socket gate bench's ``--overload`` run: the figures, then its JSON line."""
    multiples = [float(x) for x in args.overload.split(",")]
    over = eventloop.run(overload_bench(args.seconds, args.concurrency, multiples,
                                        args.generator))
    print(overload_lines(over, [f"{m:g}x" for m in multiples]))
    print(json.dumps({"bench": bench, "mode": "overload", "seconds": args.seconds,
                      "concurrency": args.concurrency, "pin": args.pin or None,
                      "generator": args.generator,
                      "loadavg_1m": round(os.getloadavg()[0], 2), **over}))
