"""The caps through the gatekeeper and a real ledger (both backends).

decide() takes counts; which attempts fall in a cap's period is the ledger's
count over the window the gatekeeper asks for: a calendar day starts at local
midnight, a rolling period is the last N seconds, and only allowed attempts
count.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent.gate.decision import Reason
from agent.gatekeeper import Gatekeeper
from agent.meter.clock import SimClock
from tests.gate_helpers import BASE, call, local, policy_from


def gatekeeper(ledger: Any, tmp_path: Path, caps: str, now: datetime) -> Gatekeeper:
    policy = policy_from(tmp_path, BASE.replace("accounts:", f"defaults:\n{caps}accounts:")
                         .replace("max_concurrent_calls: 2", "max_concurrent_calls: 50"))
    return Gatekeeper(ledger=ledger, policy=lambda: policy, clock=SimClock(now), node="n1",
                      budget=5)


async def test_callee_cap_counts_the_local_calendar_day(ledger: Any, tmp_path: Path) -> None:
    now = local("2026-11-24T10:00")
    gate = gatekeeper(ledger, tmp_path, "  callee_cap: {max_attempts: 2, period: day}\n", now)
    await ledger.topup("acme", Decimal("10"), ref="t1", at=now - timedelta(days=2))
    number = "13800138000"
    for at in (local("2026-11-23T23:59:59"), local("2026-11-23T23:59:59")):
        await ledger.record_attempt("acme", number, at, True, "allowed")  # yesterday
    await ledger.record_attempt("acme", number, local("2026-11-24T00:00:00"), True, "allowed")
    await ledger.record_attempt("acme", number, local("2026-11-24T08:00:00"), False,
                                "outside_hours")  # refused: not counted
    await ledger.record_attempt("acme", "13900000000", local("2026-11-24T08:00:00"), True,
                                "allowed")  # another number
    first = await gate(replace(call(number), call_id="c1"))
    assert first.allow, first.message  # 1 of 2 today
    second = await gate(replace(call(number), call_id="c2"))
    assert second.reason is Reason.FREQUENCY_CAP  # c1 was the second of the day
    assert (await gate(replace(call("13900000000"), call_id="c3"))).allow


async def test_rate_cap_is_a_rolling_period(ledger: Any, tmp_path: Path) -> None:
    now = local("2026-11-24T10:00")
    gate = gatekeeper(ledger, tmp_path, "  rate_cap: {max_attempts: 3, period: 10m}\n", now)
    await ledger.topup("acme", Decimal("10"), ref="t1", at=now - timedelta(days=1))
    for minutes, number in ((11, "13900000001"), (2, "13900000002"), (1, "13900000003")):
        await ledger.record_attempt("acme", number, now - timedelta(minutes=minutes), True,
                                    "allowed")
    first = await gate(replace(call("13900000004"), call_id="c1"))
    assert first.allow, first.message  # 2 in the last 10 minutes; 11 minutes ago is out
    second = await gate(replace(call("13900000005"), call_id="c2"))
    assert second.reason is Reason.RATE_CAP
    assert second.message == "acme made 3 attempts (at most 3 per 600 s)"
