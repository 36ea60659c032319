"""Meter under load: thousands of concurrent answered calls cut off on the wall clock.

Runs the real gatekeeper and meter against the in-process PBX and the real
SQLite ledger (WAL, synchronous=FULL) on the wall clock. Calls of 100 accounts
share each account's balance, which runs out part-way, so most calls end by a
cut-off at a paid boundary. Reports cut-off lateness (the PBX's hang-up time
minus the planned cut time) p50/p99/max, CPU seconds per 1,000 calls, peak RSS,
and the garbage collector's full collections (how many, the longest pause: each
stops the loop, so it bounds the lateness of a cut-off due meanwhile). Time is
compressed with a 10 s increment.
Targets (issue 4): p99 lateness <= 250 ms; <= 200 MB RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import resource
import statistics
import tempfile
import time
from collections import Counter
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

from agent import eventloop
from agent.calls import CallInfo, Direction
from agent.gate.policy import load_policy
from agent.gatekeeper import Gatekeeper
from agent.ledger import open_ledger
from agent.meter.clock import WallClock
from agent.meter.meter import Meter, MeterSettings
from agent.sim.memory import MemoryPbx

ACCOUNTS = 100


def policy_yaml(calls: int) -> str:
    per_account = calls // ACCOUNTS + 1
    lines = [
        "version: 1",
        'prepaid: {first_topup_minimum: "0.01"}',
        "tariffs:",
        '  fast: {rate: "0.01", increment: 10, minimum: 10}',
        "defaults:",
        "  tariff: fast",
        "  calling_hours: [{days: all, windows: [{start: '00:00', end: '24:00'}]}]",
        f"  max_concurrent_calls: {per_account}",
        '  low_balance_warning: "0"',
        "accounts:",
    ]
    lines += [f'  a{i}: {{name: A{i}, caller_ids: ["021{i:08d}"]}}' for i in range(ACCOUNTS)]
    return "\n".join(lines) + "\n"


class FullCollections:
    """Times the garbage collector's full (generation 2) collections: each pauses
    the whole loop, and every cut-off due meanwhile is that much late."""

    def __init__(self) -> None:
        self.pauses_ms: list[float] = []
        self._started = 0.0

    def __enter__(self) -> FullCollections:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses_ms.append((time.perf_counter() - self._started) * 1000)


async def run(calls: int, ramp: float, seed: int) -> dict[str, object]:
    with FullCollections() as collections:
        figures = await _run(calls, ramp, seed)
    figures["gc_full_collections"] = len(collections.pauses_ms)
    figures["gc_longest_full_ms"] = round(max(collections.pauses_ms, default=0.0), 1)
    return figures


async def _run(calls: int, ramp: float, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "policy.yaml"
        path.write_text(policy_yaml(calls))
        policy = load_policy(path)
        ledger = await open_ledger(f"sqlite:///{tmp}/ledger.db")
        clock = WallClock()
        pbx = MemoryPbx(clock)
        planned: dict[str, datetime] = {}

        def publish(topic: str, payload: dict) -> None:
            # "planned" carries the paid boundary; "warning" and "executed" follow it.
            if topic == "cutoff" and payload.get("stage") == "planned":
                planned[payload["call_id"]] = datetime.fromisoformat(payload["at"])

        meter = Meter(ledger=ledger, pbx=pbx, policy=lambda: policy, clock=clock, node="b",
                      settings=MeterSettings(lead_seconds=3), publish=publish)
        gate = Gatekeeper(ledger=ledger, policy=lambda: policy, clock=clock, node="b",
                          budget=30)
        pbx.sink = meter.on_event
        task = asyncio.create_task(meter.run())
        pbx.reconnect()
        per_account = calls // ACCOUNTS
        for i in range(ACCOUNTS):  # about 3 increments per call on average
            await ledger.topup(f"a{i}", Decimal("0.01") * per_account * 3, ref=f"t{i}",
                               at=clock.now())
        cpu0, wall0 = time.process_time(), time.perf_counter()
        placed = 0
        interval = ramp / calls
        start = time.perf_counter()
        for n in range(calls):
            account = n % ACCOUNTS
            info = CallInfo(f"c{n}", Direction.OUTBOUND, f"021{account:08d}",
                            f"13{rng.randrange(10**9):09d}", f"a{account}")
            decision = await gate(info)
            if decision.allow:
                pbx.place(info, ring_seconds=rng.uniform(0.5, 2), talk_seconds=600,
                          max_seconds=decision.max_seconds)
                placed += 1
            delay = start + (n + 1) * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        peak_live = 0
        while any(c.ended_at is None for c in pbx.calls.values()):
            peak_live = max(peak_live, sum(1 for c in pbx.calls.values()
                                           if c.answered_at and c.ended_at is None))
            await asyncio.sleep(0.5)
        await meter.wait_idle()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        late = []
        for call_id, cut_at in planned.items():
            call = pbx.calls.get(call_id)
            if call is not None and call.ended_by == "hangup" and call.ended_at is not None:
                late.append((call.ended_at - cut_at) / timedelta(milliseconds=1))
        ended_by = Counter(c.ended_by for c in pbx.calls.values())
        problems = await ledger.audit()
        held = sum((b.held for b in await ledger.balances()), Decimal(0))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await ledger.close()
    late.sort()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    p99 = late[min(len(late) - 1, int(len(late) * 0.99))] if late else None
    return {
        "bench": "meter",
        "calls": calls,
        "placed": placed,
        "peak_live_calls": peak_live,
        "cutoffs": len(late),
        "ended_by": dict(ended_by),
        "late_ms_p50": round(statistics.median(late), 1) if late else None,
        "late_ms_p99": round(p99, 1) if p99 is not None else None,
        "late_ms_max": round(late[-1], 1) if late else None,
        "cpu_seconds_per_1000_calls": round(cpu / max(1, placed) * 1000, 3),
        "cpu_share_of_one_core": round(cpu / wall, 3),
        "wall_seconds": round(wall, 1),
        "peak_rss_mb": round(rss_mb, 1),
        "audit_problems": len(problems),
        "held_after": str(held),
        "target_met": bool(p99 is not None and p99 <= 250 and rss_mb <= 200
                           and not problems and held == 0),
    }


def main() -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--ramp", type=float, default=10.0, help="seconds to place all calls")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    figures = eventloop.run(run(args.calls, args.ramp, args.seed))
    print(f"{figures['placed']} calls placed, peak {figures['peak_live_calls']} live, "
          f"{figures['cutoffs']} cut off at their paid boundary")
    print(f"cut-off lateness p50 {figures['late_ms_p50']} ms, p99 {figures['late_ms_p99']} ms, "
          f"max {figures['late_ms_max']} ms")
    print(f"CPU {figures['cpu_seconds_per_1000_calls']} s per 1,000 calls "
          f"({figures['cpu_share_of_one_core']:.0%} of one core), peak RSS "
          f"{figures['peak_rss_mb']} MB; ledger audit problems {figures['audit_problems']}")
    print(f"{figures['gc_full_collections']} full garbage collections, the longest "
          f"{figures['gc_longest_full_ms']} ms")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
