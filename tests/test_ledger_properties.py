"""Property tests: any sequence of ledger operations keeps the money invariants.

For random sequences of top-ups, penalties, adjustments, refunds, admissions,
holds, settlements and replays of earlier operations, after every step:

- each balance equals what its postings sum to, and the independent model;
- a hold that succeeded left the available balance at or above zero, and one
  that was refused was refused because the balance could not cover it;
- a replay of an operation that succeeded returns the original result and
  writes nothing;
and at the end ``audit()`` finds nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import eventloop
from agent.ledger import (
    CallRecord,
    CallStatus,
    Cdr,
    LedgerError,
    Posting,
    PostingKind,
    RefusedOperation,
    open_ledger,
)

T0 = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
ACCOUNTS = 2
CALLS = 3
_examples = itertools.count()


@dataclass(frozen=True)
class Op:
    name: str
    account: int = 0
    call: int = 0
    step: int = 0
    amount: D = D(0)
    replay: int = 0


account_no = st.integers(0, ACCOUNTS - 1)
call_no = st.integers(0, CALLS - 1)
OPS = {
    "topup": st.builds(Op, st.just("topup"), account_no, amount=st.sampled_from(
        [D("0.13"), D("0.26"), D("1"), D("100"), D("0.0001")])),
    "penalty": st.builds(Op, st.just("penalty"), account_no,
                         amount=st.sampled_from([D("0.5"), D("1000")])),
    "adjust": st.builds(Op, st.just("adjust"), account_no,
                        amount=st.sampled_from([D("-5"), D("0.13"), D("-0.0001")])),
    "refund": st.builds(Op, st.just("refund"), account_no),
    "admit": st.builds(Op, st.just("admit"), account_no, call_no),
    "hold": st.builds(Op, st.just("hold"), call=call_no, step=st.integers(0, 3),
                      amount=st.sampled_from([D("0.13"), D("0.26"), D("1")])),
    "settle": st.builds(Op, st.just("settle"), call=call_no,
                        amount=st.sampled_from([D(0), D("0.13"), D("0.39")])),
    "replay": st.builds(Op, st.just("replay"), replay=st.integers(0, 1000)),
}
# Calls are where the money moves: holds weigh most, refunds (which end an
# account's story) least.
# (Hypothesis leans towards the first choice when it simplifies, so that is a hold.)
WEIGHTS = {"hold": 6, "admit": 3, "settle": 3, "replay": 3, "topup": 2, "penalty": 1,
           "adjust": 1, "refund": 1}
ops = st.sampled_from([n for n, w in WEIGHTS.items() for _ in range(w)]).flatmap(OPS.__getitem__)


def posted_effect(p: Posting) -> D:
    sign = {PostingKind.TOPUP: 1, PostingKind.ADJUSTMENT: 1, PostingKind.PENALTY: -1,
            PostingKind.REFUND: -1, PostingKind.CHARGE: -1}.get(p.kind, 0)
    return sign * p.amount


def held_effect(p: Posting) -> D:
    sign = {PostingKind.HOLD: 1, PostingKind.CHARGE: -1, PostingKind.RELEASE: -1}.get(p.kind, 0)
    return sign * p.amount


class Scenario:
    def __init__(self, ledger: Any, prefix: str) -> None:
        self.ledger = ledger
        self.prefix = prefix
        self.posted: dict[str, D] = {}  # the model: what each account's posted must be
        self.done: list[tuple[Op, Any]] = []  # operations that succeeded, and their result

    def account(self, n: int) -> str:
        return f"{self.prefix}a{n}"

    def call_id(self, n: int) -> str:
        return f"{self.prefix}c{n}"

    async def postings_count(self) -> int:
        total = 0
        for account in self.posted:
            total += len(await self.ledger.history(account))
        return total

    async def apply(self, op: Op, i: int) -> Any:
        ledger, at = self.ledger, T0 + timedelta(seconds=i)
        account = self.account(op.account)
        if op.name == "topup":
            return await ledger.topup(account, op.amount, ref=f"t{i}", at=at)
        if op.name == "penalty":
            return await ledger.penalty(account, op.amount, ref=f"p{i}", at=at)
        if op.name == "adjust":
            return await ledger.adjust(account, op.amount, ref=f"j{i}", at=at)
        if op.name == "refund":
            return await ledger.refund(account, ref=f"r{i}", at=at)
        call_id = self.call_id(op.call)
        if op.name == "admit":
            record = CallRecord(call_id, account, "n", "021", "138", "std", D("0.13"), 60, 60, at)
            return await ledger.admit_call(record, 3)
        if op.name == "hold":
            return await ledger.hold(call_id, op.step, op.amount, 60 * (op.step + 1), at)
        assert op.name == "settle"
        record = await ledger.get_call(call_id)
        owner = record.account if record else account
        cdr = Cdr(call_id, owner, "021", "138", None, at, 0, 0, op.amount, "NORMAL_CLEARING")
        return await ledger.settle_call(cdr)

    async def step(self, op: Op, i: int) -> None:
        if op.name == "replay":
            await self.replay(op)
            return
        before = await self.hold_state(op)
        try:
            result = await self.apply(op, i)
        except LedgerError:
            return
        if op.name == "hold":
            assert before is not None
            after = await self.hold_state(op)
            assert after is not None
            if after[1] > before[1]:  # a new hold was written: it fitted the balance
                assert result is True and after[0] == before[0] - op.amount >= 0
            elif result is False:
                assert before[0] < op.amount and after == before
            # else: the same (call, step) again, answered from the stored hold
        self.model(op, result)
        if result is False:  # refused for want of money (or lines): not a success to replay
            return
        # A replay re-sends the same request: remember the step index its refs came from.
        self.done.append((Op(op.name, op.account, op.call, op.step, op.amount, replay=i), result))

    async def hold_state(self, op: Op) -> tuple[D, int] | None:
        """(available balance, holds taken) of the account and call a hold is for."""
        if op.name != "hold":
            return None
        call = await self.ledger.get_call(self.call_id(op.call))
        if call is None:
            return None
        return (await self.ledger.balance(call.account)).available, call.steps

    def model(self, op: Op, result: Any) -> None:
        if isinstance(result, Posting):
            self.posted[result.account] = self.posted.get(result.account, D(0)) + \
                posted_effect(result)
        elif isinstance(result, Cdr):
            self.posted[result.account] -= result.amount

    async def replay(self, op: Op) -> None:
        if not self.done:
            return
        original, result = self.done[op.replay % len(self.done)]
        count = await self.postings_count()
        try:
            again = await self.apply(original, original.replay)
        except RefusedOperation:
            # Only an admission may be refused on replay: its call has since ended.
            assert original.name == "admit"
            call = await self.ledger.get_call(self.call_id(original.call))
            assert call is not None and call.status is CallStatus.ENDED
            again = result
        assert again == result, (original, result, again)
        assert await self.postings_count() == count

    async def check_balances(self) -> None:
        for account, posted in self.posted.items():
            balance = await self.ledger.balance(account)
            history = await self.ledger.history(account)
            assert balance.posted == sum((posted_effect(p) for p in history), D(0)) == posted
            assert balance.held == sum((held_effect(p) for p in history), D(0))
            assert balance.held >= 0


async def run(ledger: Any, sequence: list[Op]) -> None:
    scenario = Scenario(ledger, f"x{next(_examples)}-")
    # Every example starts with two funded accounts (one rich, one for a few
    # increments), so the calls in it have money to fight over.
    preamble = [Op("topup", 0, amount=D("100")), Op("topup", 1, amount=D("0.39"))]
    for i, op in enumerate([*preamble, *sequence]):
        await scenario.step(op, i)
        await scenario.check_balances()
    assert await ledger.audit() == []


class LoopThread:
    """An event loop in its own thread, with one ledger open on it for all examples.

    Hypothesis drives a sync test function; the ledger (an asyncpg pool, or the
    SQLite worker's futures) belongs to the loop it was opened on.
    """

    def __init__(self, url: str) -> None:
        self.loop = eventloop.loop_factory()()  # the daemon's loop
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.ledger = self.call(open_ledger(url))

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def close(self) -> None:
        self.call(self.ledger.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def runner(ledger_url: str) -> Iterator[LoopThread]:
    thread = LoopThread(ledger_url)
    try:
        yield thread
    finally:
        thread.close()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sequence=st.lists(ops, min_size=15, max_size=50))
def test_any_sequence_keeps_the_invariants(runner: LoopThread, sequence: list[Op]) -> None:
    # Examples share the store; each uses its own account and call names.
    runner.call(run(runner.ledger, sequence))
