"""Read-only finance views over either ledger backend: period reports, balances at a time, flags.

Everything here reads through the :class:`~agent.ledger.model.Ledger` contract
(``balances``, ``history``, ``cdrs``), so SQLite and PostgreSQL give the same
answers by construction; the arithmetic is pure and exact (``Decimal``).

How a posting moves an account's balance (:func:`movement`): top-ups and
adjustments add (adjustments are signed), charges, penalties and refunds take
away, holds and releases move only the held amount. A ``correction`` (a call
brought to the rating of the PBX's own CDR, posted at the call's end) is signed
like a charge: positive charges more, negative gives back.

A period is ``[start, end)`` in UTC; the caller turns days into instants in
the account's timezone. Calls belong to the period their CDR *ended* in, and
each call's charge is posted at that same instant, so the calls' amounts of a
period equal its charge postings (checked: :class:`ReportError` otherwise).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from agent.ledger.model import Cdr, Ledger, Posting, PostingKind

CORRECTION = "correction"  # the kind name PBX CDR reconciliation posts

#: CDR flags that send finance to look at a call, and what each means.
REVIEW_FLAGS: dict[str, str] = {
    "outcome_unknown": "the agent never learned whether the call was answered; not charged: "
                       "check the PBX's CDR",
    "billsec_assumed_paid": "the end was never heard; charged the paid time: check the PBX's CDR",
    "billsec_from_times": "billsec estimated from the answer and end times",
    "ended_while_away": "ended while the agent was not running; charged from the ledger's record",
    "vanished": "disappeared from the PBX without a hang-up event",
    "unseen": "an answered call the gate never admitted",
    "pbx_unreachable": "the PBX could not be told the call's deadline",
    "unpaid": "talk the balance could not pay was forgiven",
    "reserved_at_settle": "talk past the holds was charged at settlement",
    "capped": "charged less than rated: the holds did not cover it",
}


class ReportError(Exception):
    """The ledger's figures do not agree with each other; the message says where."""


def movement(p: Posting) -> Decimal:
    """How a posting moves the account's (posted) balance."""
    kind = p.kind.value
    if kind in (PostingKind.TOPUP, PostingKind.ADJUSTMENT):
        return p.amount
    if kind in (PostingKind.PENALTY, PostingKind.REFUND, PostingKind.CHARGE, CORRECTION):
        return -p.amount
    return Decimal(0)


def held_movement(p: Posting) -> Decimal:
    kind = p.kind.value
    if kind == PostingKind.HOLD:
        return p.amount
    if kind in (PostingKind.CHARGE, PostingKind.RELEASE):
        return -p.amount
    return Decimal(0)


# -- balance at a time -------------------------------------------------------------------
@dataclass(frozen=True)
class BalanceAt:
    account: str
    at: datetime
    posted: Decimal
    held: Decimal
    closed: bool  # refunded at or before ``at`` (and not reopened since)

    @property
    def available(self) -> Decimal:
        return self.posted - self.held


def balance_at(account: str, history: Iterable[Posting], at: datetime) -> BalanceAt | None:
    """The balance after every posting at or before ``at``; None if the account had none yet."""
    posted = held = Decimal(0)
    closed = seen = False
    for p in history:
        if p.at > at:
            continue
        seen = True
        posted += movement(p)
        held += held_movement(p)
        if p.kind.value == PostingKind.REFUND:
            closed = True
        elif p.kind.value == "reopen":  # a closed account opened again (a posting of zero)
            closed = False
    return BalanceAt(account, at, posted, held, closed) if seen else None


# -- the period report -------------------------------------------------------------------
@dataclass(frozen=True)
class Line:
    """One balance movement of a period: a call (from its CDR) or a finance posting."""

    account: str
    at: datetime
    kind: str  # "call", "topup", "penalty", "refund", "adjustment", "correction"
    amount: Decimal  # signed effect on the balance
    balance: Decimal  # the account's balance after this line
    reference: str  # the call id or the posting's reference
    note: str = ""
    cdr: Cdr | None = None


@dataclass(frozen=True)
class AccountReport:
    """One account's period. Every amount is signed by its effect on the balance (top-ups
    positive; calls, penalties and refunds negative; adjustments and corrections either),
    so closing = opening + the sum of the columns."""

    account: str
    start: datetime
    end: datetime
    opening: Decimal
    topups: Decimal
    calls: int
    billed_seconds: int
    calls_amount: Decimal  # the calls as settled (negative: they cost)
    penalties: Decimal
    refunds: Decimal
    adjustments: Decimal
    corrections: Decimal  # from the PBX's CDR: negative charged more, positive gave back
    closing: Decimal
    lines: list[Line] = field(default_factory=list)

    def check(self) -> Decimal:
        """opening + movements; equal to ``closing`` to the cent, or the report is wrong."""
        return (self.opening + self.topups + self.calls_amount + self.penalties + self.refunds
                + self.adjustments + self.corrections)


TOTAL_FIELDS = ("opening", "topups", "calls", "billed_seconds", "calls_amount", "penalties",
                "refunds", "adjustments", "corrections", "closing")


def totals(reports: Iterable[AccountReport]) -> dict[str, Decimal | int]:
    """The grand totals: each column summed over the accounts (they add up as each row does)."""
    out: dict[str, Decimal | int] = {
        f: (0 if f in ("calls", "billed_seconds") else Decimal(0)) for f in TOTAL_FIELDS}
    for r in reports:
        for f in TOTAL_FIELDS:
            out[f] += getattr(r, f)
    return out


def account_report(account: str, start: datetime, end: datetime, history: list[Posting],
                   cdrs: list[Cdr]) -> AccountReport:
    """One account's period from all its postings and the CDRs that ended in the period."""
    opening = sum((movement(p) for p in history if p.at < start), Decimal(0))
    period = [p for p in history if start <= p.at < end]
    sums = {k: sum((movement(p) for p in period if p.kind.value == k), Decimal(0))
            for k in ("topup", "penalty", "refund", "adjustment", CORRECTION, "charge")}
    calls = [c for c in cdrs if start <= c.ended_at < end]
    calls_amount = -sum((c.amount for c in calls), Decimal(0))
    if calls_amount != sums["charge"]:
        raise ReportError(
            f"account {account!r}: the calls of the period cost {-calls_amount} by their CDRs "
            f"but {-sums['charge']} was charged; run an audit of the ledger")
    # The lines: calls at their end, finance postings at their time; ties by posting order.
    events: list[tuple[datetime, int, str, Decimal, str, str, Cdr | None]] = []
    for c in calls:
        events.append((c.ended_at, 0, "call", -c.amount, c.call_id, ",".join(c.flags), c))
    for i, p in enumerate(period, start=1):
        if p.kind.value in ("topup", "penalty", "refund", "adjustment", CORRECTION):
            events.append((p.at, i, p.kind.value, movement(p), p.ref, p.note, None))
    events.sort(key=lambda e: (e[0], e[1]))
    running = opening
    lines = []
    for at, _, kind, amount, reference, note, cdr in events:
        running += amount
        lines.append(Line(account, at, kind, amount, running, reference, note, cdr))
    closing = opening + sum((movement(p) for p in period), Decimal(0))
    report = AccountReport(
        account=account, start=start, end=end, opening=opening, topups=sums["topup"],
        calls=len(calls), billed_seconds=sum(c.billed_seconds for c in calls),
        calls_amount=calls_amount, penalties=sums["penalty"], refunds=sums["refund"],
        adjustments=sums["adjustment"], corrections=sums[CORRECTION], closing=closing,
        lines=lines)
    if report.check() != closing or running != closing:
        raise ReportError(f"account {account!r}: the period's movements do not add up to its "
                          f"closing balance {closing}; run an audit of the ledger")
    return report


async def build_report(ledger: Ledger, periods: dict[str, tuple[datetime, datetime]] | None,
                       default: tuple[datetime, datetime]) -> list[AccountReport]:
    """Every account in the ledger, each over its own period (``periods``) or ``default``."""
    reports = []
    for balance in await ledger.balances():
        start, end = (periods or {}).get(balance.account, default)
        history = await ledger.history(balance.account)
        if not history or min(p.at for p in history) >= end:
            continue  # the account did not exist yet
        cdrs = await ledger.cdrs(balance.account, start, end)
        reports.append(account_report(balance.account, start, end, history, cdrs))
    return reports


# -- calls that need a look --------------------------------------------------------------
@dataclass(frozen=True)
class Flagged:
    account: str
    at: datetime  # the call's end, or the correction's time
    call_id: str
    kind: str  # "call" or "correction"
    flags: tuple[str, ...]  # the review flags (a correction: ("correction",))
    amount: Decimal  # signed by its effect on the balance (a call's cost is negative)
    billsec: int | None
    cdr: Cdr | None = None
    note: str = ""


def flagged(account: str, start: datetime, end: datetime, history: list[Posting],
            cdrs: list[Cdr]) -> list[Flagged]:
    """The period's calls with a review flag, and its corrections, in time order."""
    out = []
    for c in cdrs:
        if start <= c.ended_at < end:
            review = tuple(f for f in c.flags if f in REVIEW_FLAGS)
            if review:
                out.append(Flagged(account, c.ended_at, c.call_id, "call", review, -c.amount,
                                   c.billsec, c))
    for p in history:
        if p.kind.value == CORRECTION and start <= p.at < end:
            out.append(Flagged(account, p.at, p.call_id or p.ref, CORRECTION, (CORRECTION,),
                               movement(p), None, None, p.note))
    out.sort(key=lambda f: (f.at, f.call_id))
    return out
