"""Property test, on both backends: complaint fines stay idempotent by ticket.

For random sequences of complaints (a few tickets, some repeated with the same
or other content, with and without a time of their own), withdrawals, refunds
and reopenings, every outcome matches a small model:

- a ticket is recorded once; the same content again (a retry without a time
  matches any) is a replay that writes nothing, other content a conflict;
- a fine is posted once per ticket and reversed at most once, by a posting;
- a closed (refunded) account takes no new complaint and no withdrawal, but
  still answers a replay;
and the balance equals the model's after every step, ``audit()`` finds nothing.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal as D
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.ledger import AccountClosed, IdempotencyConflict, PostingKind, RefusedOperation
from tests import test_ledger_properties as props
from tests.test_ledger_properties import T0, LoopThread

runner = props.runner  # the fixture: one ledger per backend on its own loop thread

FINE = D("1000")
CALLEES = ("13800138000", "13900139000")
NOTES = ("", "rude")
_examples = itertools.count()


@dataclass(frozen=True)
class Op:
    name: str
    ticket: int = 0
    callee: int = 0
    note: int = 0
    at: int | None = None  # minutes after T0; None: no time of its own


ticket_no = st.integers(0, 2)
ops = st.one_of(
    st.builds(Op, st.just("add"), ticket_no, st.integers(0, 1), st.integers(0, 1),
              st.one_of(st.none(), st.integers(0, 1))),
    st.builds(Op, st.just("withdraw"), ticket_no),
    st.builds(Op, st.just("refund")),
    st.builds(Op, st.just("reopen")),
)


@dataclass
class Stored:
    callee: int
    note: int
    at: datetime
    withdrawn: bool = False


async def run(ledger: Any, sequence: list[Op]) -> None:
    n = next(_examples)
    account = f"c{n}"
    tickets: dict[int, Stored] = {}
    posted, closed = D(500), False
    await ledger.topup(account, D(500), ref=f"{account}-t", at=T0 - timedelta(days=1))
    for i, op in enumerate(sequence):
        now = T0 + timedelta(hours=1, seconds=i)
        ticket = f"{account}-T{op.ticket}"
        if op.name == "add":
            at = None if op.at is None else T0 + timedelta(minutes=op.at)
            stored = tickets.get(op.ticket)
            if stored is not None:
                same = (stored.callee, stored.note) == (op.callee, op.note) and (
                    at is None or at == stored.at)
                expected: Any = "replay" if same else IdempotencyConflict
            else:
                expected = AccountClosed if closed else "created"
            call = ledger.add_complaint(account=account, callee=CALLEES[op.callee],
                                        ticket=ticket, at=at, fine=FINE, operator="ops",
                                        note=NOTES[op.note], recorded_at=now)
            if expected == "created":
                assert (await call).created
                tickets[op.ticket] = Stored(op.callee, op.note, at or now)
                posted -= FINE
            elif expected == "replay":
                outcome = await call
                assert not outcome.created and outcome.complaint.at == stored.at  # type: ignore[union-attr]
            else:
                try:
                    await call
                except expected:
                    pass
                else:
                    raise AssertionError(f"{op} was not refused ({expected.__name__})")
        elif op.name == "withdraw":
            stored = tickets.get(op.ticket)
            try:
                _, changed = await ledger.withdraw_complaint(ticket, operator="fin", at=now)
            except RefusedOperation:
                assert stored is None
            except AccountClosed:
                assert stored is not None and not stored.withdrawn and closed
            else:
                assert stored is not None and changed is not stored.withdrawn
                if changed:
                    stored.withdrawn, posted = True, posted + FINE
        elif op.name == "refund":
            try:
                await ledger.refund(account, ref=f"{account}-r{i}", at=now)
            except (RefusedOperation, AccountClosed):
                assert closed or posted < 0
            else:
                assert not closed and posted >= 0
                posted, closed = D(0), True
        else:
            try:
                await ledger.reopen(account, ref=f"{account}-o{i}", at=now)
            except RefusedOperation:
                assert not closed
            else:
                assert closed
                closed = False
        assert (await ledger.balance(account)).posted == posted, op
    history = await ledger.history(account)
    for number, stored in tickets.items():
        refs = [p.ref for p in history if p.kind in (PostingKind.PENALTY,
                                                    PostingKind.ADJUSTMENT)]
        assert refs.count(f"complaint:{account}-T{number}") == 1
        assert refs.count(f"complaint-withdrawn:{account}-T{number}") == int(stored.withdrawn)
    assert await ledger.audit() == []


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sequence=st.lists(ops, min_size=5, max_size=25))
def test_complaint_fines_stay_idempotent_by_ticket(runner: LoopThread,
                                                   sequence: list[Op]) -> None:
    runner.call(run(runner.ledger, sequence))
