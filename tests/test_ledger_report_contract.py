"""The month-end views against each backend's own balances (the ``ledger`` fixture: both).

A seeded pseudo-random mix of top-ups, calls (with holds), fines, adjustments,
a refund and a reopen, over three months and three accounts: whatever the mix,
the report's closing balance is the balance the store keeps, consecutive
periods chain (one's closing is the next one's opening), and the balance at a
moment is what the store said at that moment.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any

import pytest

from agent.ledger import CallRecord, Cdr
from agent.ledger.report import account_report, balance_at, totals

T0 = datetime(2026, 9, 1, tzinfo=UTC)
ACCOUNTS = ("acme", "beta", "gamma")


async def _build(ledger: Any, seed: int) -> dict[str, list[tuple[datetime, D, D]]]:
    """Run the mix; per account, (moment, posted, held) snapshots the store reported."""
    rng = random.Random(seed)
    snapshots: dict[str, list[tuple[datetime, D, D]]] = {a: [] for a in ACCOUNTS}
    at = T0
    for a in ACCOUNTS:
        await ledger.topup(a, D("50"), ref=f"first-{a}", at=at)
    for step in range(60):
        at += timedelta(hours=rng.randint(1, 40))
        account = rng.choice(ACCOUNTS)
        roll = rng.random()
        balance = await ledger.balance(account)
        if balance.closed:
            await ledger.reopen(account, ref=f"re{step}", at=at, note="back")
        elif roll < 0.15:
            await ledger.topup(account, D(rng.randint(1, 4000)) / 100, ref=f"t{step}", at=at)
        elif roll < 0.22:
            await ledger.penalty(account, D(rng.randint(1, 900)) / 100, ref=f"p{step}", at=at)
        elif roll < 0.28:
            await ledger.adjust(account, D(rng.randint(-500, 500) or 1) / 100, ref=f"a{step}",
                                at=at)
        elif roll < 0.30 and balance.available >= 0:
            await ledger.refund(account, ref=f"r{step}", at=at)
        else:
            call_id = f"c{step}"
            await ledger.admit_call(CallRecord(call_id, account, "n1", "0215", "138", "std",
                                               D("0.13"), 60, 60, at), None)
            await ledger.answer_call(call_id, at)
            holds = 0
            for i in range(rng.randint(1, 4)):
                if await ledger.hold(call_id, i, D("0.13"), 60 * (i + 1), at):
                    holds += 1
            ended = at + timedelta(seconds=60 * holds)
            await ledger.settle_call(Cdr(call_id, account, "0215", "138", at, ended, 60 * holds,
                                         60 * holds, D("0.13") * holds, "NORMAL_CLEARING"))
            at = ended
        after = await ledger.balance(account)
        snapshots[account].append((at, after.posted, after.held))
    return snapshots


@pytest.mark.parametrize("seed", [1, 2])
async def test_reports_agree_with_the_stores_balances(ledger: Any, seed: int) -> None:
    snapshots = await _build(ledger, seed)
    october = (datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))
    everything = (T0, datetime(2027, 1, 1, tzinfo=UTC))
    reports = []
    for account in ACCOUNTS:
        history = await ledger.history(account)
        whole = account_report(account, *everything,
                               history, await ledger.cdrs(account, *everything))
        assert whole.closing == (await ledger.balance(account)).posted
        assert whole.check() == whole.closing
        # Consecutive periods chain, to the cent.
        september = account_report(account, T0, october[0], history,
                                   await ledger.cdrs(account, T0, october[0]))
        octo = account_report(account, *october, history, await ledger.cdrs(account, *october))
        assert september.closing == octo.opening
        reports.append(octo)
        # The balance at each moment is what the store said then.
        for at, posted, held in snapshots[account]:
            then = balance_at(account, history, at)
            assert then is not None and (then.posted, then.held) == (posted, held), at
    grand = totals(reports)
    assert grand["closing"] == sum((r.closing for r in reports), D(0))
    movements = [grand[f] for f in ("topups", "calls_amount", "penalties", "refunds",
                                     "adjustments", "corrections")]
    assert grand["opening"] + sum(movements, D(0)) == grand["closing"]
