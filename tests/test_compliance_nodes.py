"""Two nodes on one PostgreSQL ledger: a live DNC entry, a complaint and a suspension
made anywhere are in force on both within a second, with no DNC read per decision."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent.compliance.dnc_sync import DncSync
from agent.gate.decision import Reason
from agent.gatekeeper import Gatekeeper
from agent.ledger import open_ledger
from agent.ledger.compliance import GLOBAL
from agent.meter.clock import WallClock
from tests.gate_helpers import BASE, call, policy_from

pytestmark = pytest.mark.postgres

ALL_DAY = '  calling_hours: [{days: all, windows: [{start: "00:00", end: "24:00"}]}]\n'


class _Counting:
    """The ledger with every call counted by method name."""

    def __init__(self, ledger: Any) -> None:
        self._ledger, self.calls = ledger, Counter[str]()

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._ledger, name)
        if not callable(target):
            return target

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return await target(*args, **kwargs)

        return counted


async def _until_refused(gates: list[Gatekeeper], number: str, reason: Reason,
                         limit: float = 1.0) -> float:
    """Seconds until a call to ``number`` is refused for ``reason`` on every gate."""
    started = time.monotonic()
    pending = set(range(len(gates)))
    n = 0
    while pending:
        for i in sorted(pending):
            n += 1
            d = await gates[i](replace(call(number), call_id=f"probe-{i}-{n}"))
            if d.reason is reason:
                pending.discard(i)
        elapsed = time.monotonic() - started
        assert elapsed < limit, f"{sorted(pending)} still allow {number} after {elapsed:.2f} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_a_live_dnc_add_refuses_on_every_node_within_a_second(pg_url: str,
                                                                    tmp_path: Path) -> None:
    policy = policy_from(tmp_path, BASE.replace("accounts:", f"defaults:\n{ALL_DAY}accounts:")
                         .replace("max_concurrent_calls: 2", "max_concurrent_calls: 1000"))
    ops = await open_ledger(pg_url)  # the operator's CLI, a third process in real life
    nodes = [await open_ledger(pg_url), await open_ledger(pg_url)]
    clock = WallClock()
    await ops.topup("acme", Decimal("1000"), ref="t", at=clock.now() - timedelta(days=1))
    syncs = [DncSync(n) for n in nodes]
    counted = [_Counting(n) for n in nodes]
    gates = []
    for i, (sync, ledger) in enumerate(zip(syncs, counted, strict=True)):
        await sync.load()
        gates.append(Gatekeeper(ledger=ledger, policy=lambda: policy, clock=clock,  # type: ignore[arg-type]
                                node=f"node{i}", budget=5, live_dnc=sync.live))
    tasks = [asyncio.create_task(s.run()) for s in syncs]
    try:
        assert (await gates[0](replace(call("13800138000"), call_id="before"))).allow
        await ops.dnc_add("acme", "13800138000", reason="asked", operator="ops1",
                          at=clock.now())
        took = await _until_refused(gates, "13800138000", Reason.DO_NOT_CALL)
        await ops.dnc_add(GLOBAL, "13900139000", reason="regulator", operator="ops1",
                          at=clock.now())
        await _until_refused(gates, "13900139000", Reason.DO_NOT_CALL)
        # a complaint on node 0's side lists its callee for node 1 too
        await ops.add_complaint(account="acme", callee="13700137000", ticket="T1",
                                at=clock.now(), fine=Decimal("1000"), operator="ops1",
                                recorded_at=clock.now())
        await _until_refused(gates, "13700137000", Reason.DO_NOT_CALL)
        # removal is live too
        assert await ops.dnc_remove("acme", "13800138000", operator="ops1", at=clock.now())
        started = time.monotonic()
        while syncs[1].live.listed("acme", "13800138000"):
            assert time.monotonic() - started < 1.0
            await asyncio.sleep(0.02)
        # a suspension is read with the balance: the next call anywhere is refused
        await ops.suspend("acme", reason="review", operator="ops1", at=clock.now())
        for i, gate in enumerate(gates):
            d = await gate(replace(call("13600136000"), call_id=f"susp-{i}"))
            assert d.reason is Reason.SUSPENDED
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ledger in (*nodes, ops):
            await ledger.close()
    assert took < 1.0
    for c in counted:  # the gate never asked the ledger about do-not-call
        assert not [name for name in c.calls if name.startswith("dnc")], c.calls
        assert c.calls["account_state"] >= 5
