"""Property: whatever the mix of settlements, CDR arrivals and replays, every call ends
charged exactly ``rate(pbx_billsec)`` and the postings sum to the balances (both backends).

Each example is a few calls, each settled once, the way the meter does it: live
from the PBX's billsec, or provisionally (charged what was paid: ended while the
agent was away, vanished, or with an unknown outcome and charged nothing). Its
PBX CDR row arrives one to three times (replays), at random moments: before the
call is settled (the row then waits, as the CDR source keeps it pending and
retries after each settlement), or after; the rows are applied through
``apply_row``, the path the daemon's source and ``reconcile --apply`` share.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cdr.formats import CdrRow
from agent.cdr.settle import Outcome, apply_row
from agent.ledger import CallRecord, Cdr, PostingKind
from agent.rating import Tariff, rate
from tests import test_ledger_properties
from tests.test_ledger_properties import LoopThread

runner = test_ledger_properties.runner  # the fixture: one ledger per backend on its own loop

T0 = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
TARIFFS = [Tariff("contract", D("0.13"), 60, 60), Tariff("six", D("0.05"), 6, 30),
           Tariff("second", D("0.0010"), 1, 0)]
SETTLEMENTS = ("live", "assumed_paid", "vanished", "outcome_unknown")
_examples = itertools.count()


@dataclass(frozen=True)
class CallPlan:
    tariff: int
    pbx_billsec: int
    settlement: str
    paid_units: int  # increments the meter held before it lost sight of the call
    arrivals: int  # how often its CDR row is delivered


calls = st.builds(CallPlan, st.integers(0, len(TARIFFS) - 1), st.integers(0, 400),
                  st.sampled_from(SETTLEMENTS), st.integers(1, 6), st.integers(1, 3))


@st.composite
def scenarios(draw: Any) -> tuple[list[CallPlan], list[tuple[str, int]]]:
    plans = draw(st.lists(calls, min_size=1, max_size=6))
    events = [("settle", i) for i in range(len(plans))]
    events += [("cdr", i) for i, p in enumerate(plans) for _ in range(p.arrivals)]
    return plans, draw(st.permutations(events))


def units_for(tariff: Tariff, seconds: int) -> int:
    return max(1, math.ceil(seconds / tariff.increment))


def record_of(call_id: str, account: str, plan: CallPlan) -> CallRecord:
    tariff = TARIFFS[plan.tariff]
    return CallRecord(call_id, account, "n1", "02158880000", "13800138000", tariff.name,
                      tariff.rate, tariff.increment, tariff.minimum, T0)


async def settle(ledger: Any, call_id: str, account: str, plan: CallPlan) -> None:
    tariff = TARIFFS[plan.tariff]
    answered = T0 + timedelta(seconds=5)
    record = record_of(call_id, account, plan)
    if plan.settlement == "outcome_unknown":  # never seen answered: nothing charged
        assert await ledger.hold(call_id, 1, tariff.first_unit_cost, tariff.first_unit_seconds,
                                 T0)
        await ledger.settle_call(Cdr(call_id, account, record.caller, record.callee, None,
                                     T0 + timedelta(seconds=600), 0, 0, D(0), "UNKNOWN",
                                     flags=("ended_while_away", "outcome_unknown")))
        return
    await ledger.answer_call(call_id, answered)
    if plan.settlement == "live":
        billsec, flags = plan.pbx_billsec, ()
        held_units = units_for(tariff, max(billsec, tariff.minimum))
    else:
        held_units = max(plan.paid_units, units_for(tariff, tariff.minimum))
        billsec = held_units * tariff.increment
        flags = (("ended_while_away", "billsec_assumed_paid") if plan.settlement ==
                 "assumed_paid" else ("vanished", "billsec_assumed_paid"))
    for step in range(1, held_units + 1):
        assert await ledger.hold(call_id, step, tariff.rate, step * tariff.increment, answered)
    amount = rate(tariff, billsec)
    await ledger.settle_call(Cdr(call_id, account, record.caller, record.callee, answered,
                                 answered + timedelta(seconds=billsec), billsec,
                                 0 if not billsec else max(billsec, tariff.minimum), amount,
                                 "NORMAL_CLEARING", flags=flags))


async def run(ledger: Any, plans: list[CallPlan], events: list[tuple[str, int]]) -> None:
    n = next(_examples)
    account = f"p{n}"
    await ledger.topup(account, D("1000"), ref=f"fund-{n}", at=T0)
    call_ids = [f"p{n}-c{i}" for i in range(len(plans))]
    rows = [CdrRow(call_ids[i], p.pbx_billsec,
                   answer=T0 + timedelta(seconds=5) if p.pbx_billsec else None)
            for i, p in enumerate(plans)]
    pending: set[int] = set()
    for i, plan in enumerate(plans):  # admitted at setup: before any CDR of theirs can exist
        await ledger.admit_call(record_of(call_ids[i], account, plan), None)

    async def deliver(i: int) -> None:
        result = await apply_row(ledger, rows[i])
        assert result.outcome is not Outcome.CONFLICT, result
        if result.outcome is Outcome.PENDING:
            pending.add(i)
        else:
            pending.discard(i)

    for kind, i in events:
        if kind == "settle":
            await settle(ledger, call_ids[i], account, plans[i])
            for waiting in sorted(pending):  # the source's next poll retries its pending rows
                await deliver(waiting)
        else:
            await deliver(i)
    assert not pending
    total = D(0)
    for i, plan in enumerate(plans):
        cdr = await ledger.call_cdr(call_ids[i])
        expected = rate(TARIFFS[plan.tariff], plan.pbx_billsec)
        assert cdr.charged == expected, (plan, cdr)
        if plan.settlement != "live":
            assert cdr.pbx_billsec == plan.pbx_billsec
        total += cdr.charged
    corrections = [p for p in await ledger.history(account) if p.kind is PostingKind.CORRECTION]
    assert len({p.call_id for p in corrections}) == len(corrections)  # at most one per call
    balance = await ledger.balance(account)
    assert (balance.posted, balance.held) == (D("1000") - total, D(0))
    assert await ledger.audit() == []


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(scenario=scenarios())
def test_every_call_converges_to_the_pbx_billsec(
        runner: LoopThread, scenario: tuple[list[CallPlan], list[tuple[str, int]]]) -> None:
    plans, events = scenario
    runner.call(run(runner.ledger, plans, events))
