"""The pure finance views (agent.ledger.report): corrections, disagreements, and properties."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from enum import StrEnum
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.ledger import Cdr, Posting, PostingKind
from agent.ledger.report import (
    ReportError,
    account_report,
    balance_at,
    flagged,
    movement,
    totals,
)

T0 = datetime(2026, 11, 1, tzinfo=UTC)
END = datetime(2026, 12, 1, tzinfo=UTC)


class _Kind(StrEnum):
    """The kind PBX CDR reconciliation posts (the ledger's enum gains it with that work)."""

    CORRECTION = "correction"


def posting(i: int, kind: Any, amount: str, at: datetime, call_id: str | None = None,
            ref: str = "") -> Posting:
    return Posting(i, "acme", kind, D(amount), at, ref or f"r{i}", f"{kind}:{i}", call_id)


def cdr(call_id: str, ended: datetime, amount: str, flags: tuple[str, ...] = (),
        billed: int = 60) -> Cdr:
    return Cdr(call_id, "acme", "0215", "138", ended - timedelta(seconds=30), ended, 30, billed,
               D(amount), "NORMAL_CLEARING", flags=flags)


def test_a_correction_is_signed_listed_and_counted() -> None:
    history = [
        posting(1, PostingKind.TOPUP, "100", T0 - timedelta(days=1)),
        posting(2, PostingKind.HOLD, "0.13", T0 + timedelta(hours=1), "c1"),
        posting(3, PostingKind.CHARGE, "0.13", T0 + timedelta(hours=2), "c1"),
        # Signed like a charge, dated the call's end: the PBX's CDR says c1 talked two
        # increments more; c9 was charged one too many.
        posting(4, _Kind.CORRECTION, "0.26", T0 + timedelta(hours=2), "c1", "correction:c1"),
        posting(5, _Kind.CORRECTION, "-0.13", T0 + timedelta(days=3), "c9", "correction:c9"),
    ]
    cdrs = [cdr("c1", T0 + timedelta(hours=2), "0.13")]
    r = account_report("acme", T0, END, history, cdrs)
    assert (r.opening, r.calls_amount, r.corrections, r.closing) == (
        D("100"), D("-0.13"), D("-0.13"), D("99.74"))
    assert r.check() == r.closing
    assert [(x.kind, x.amount, x.balance) for x in r.lines] == [
        ("call", D("-0.13"), D("99.87")), ("correction", D("-0.26"), D("99.61")),
        ("correction", D("0.13"), D("99.74"))]
    looks = flagged("acme", T0, END, history, cdrs)
    assert [(f.call_id, f.flags, f.amount) for f in looks] == [
        ("c1", ("correction",), D("-0.26")), ("c9", ("correction",), D("0.13"))]
    assert movement(history[3]) == D("-0.26")


def test_calls_that_disagree_with_their_charges_are_refused() -> None:
    history = [posting(1, PostingKind.TOPUP, "100", T0),
               posting(2, PostingKind.CHARGE, "0.13", T0 + timedelta(hours=2), "c1")]
    with pytest.raises(ReportError, match=r"cost 0\.26 by their CDRs but 0\.13 was charged"):
        account_report("acme", T0, END, history, [cdr("c1", T0 + timedelta(hours=2), "0.26")])


def test_only_review_flags_are_listed() -> None:
    cdrs = [cdr("a", T0 + timedelta(hours=1), "0.13", ("grace", "adopted")),
            cdr("b", T0 + timedelta(hours=2), "0", ("outcome_unknown",)),
            cdr("c", END, "0.13", ("vanished",))]  # the period is [start, end)
    assert [(f.call_id, f.flags) for f in flagged("acme", T0, END, [], cdrs)] == [
        ("b", ("outcome_unknown",))]


def test_balance_at_counts_postings_at_or_before_the_moment() -> None:
    history = [posting(1, PostingKind.TOPUP, "100", T0),
               posting(2, PostingKind.HOLD, "0.26", T0 + timedelta(hours=1), "c1"),
               posting(3, PostingKind.CHARGE, "0.13", T0 + timedelta(hours=2), "c1"),
               posting(4, PostingKind.RELEASE, "0.13", T0 + timedelta(hours=2), "c1")]
    assert balance_at("acme", history, T0 - timedelta(seconds=1)) is None
    mid = balance_at("acme", history, T0 + timedelta(hours=1))
    assert mid is not None and (mid.posted, mid.held, mid.available) == (
        D("100"), D("0.26"), D("99.74"))
    after = balance_at("acme", history, T0 + timedelta(hours=2))
    assert after is not None and (after.posted, after.held) == (D("99.87"), D("0"))


_KINDS = [PostingKind.TOPUP, PostingKind.PENALTY, PostingKind.REFUND, PostingKind.ADJUSTMENT,
          _Kind.CORRECTION, "call"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_KINDS), st.integers(-50_000, 50_000),
                          st.integers(0, 90 * 24 * 60)), max_size=40),
       st.integers(0, 60 * 24 * 60), st.integers(1, 40 * 24 * 60))
def test_every_period_adds_up_to_the_cent(events: list[tuple[Any, int, int]], start_min: int,
                                          length_min: int) -> None:
    """opening + the period's movements = closing = the balance at the period's end, and
    the running balance of the lines ends at the closing; for any postings and period."""
    base = T0 - timedelta(days=30)
    history: list[Posting] = []
    cdrs: list[Cdr] = []
    for i, (kind, cents, minute) in enumerate(events, start=1):
        at = base + timedelta(minutes=minute)
        amount = D(cents) / 100
        if kind == "call":
            call_id = f"c{i}"
            cdrs.append(cdr(call_id, at, str(abs(amount))))
            history.append(posting(i, PostingKind.CHARGE, str(abs(amount)), at, call_id))
        elif kind in (PostingKind.ADJUSTMENT, _Kind.CORRECTION):
            history.append(posting(i, kind, str(amount), at))
        else:
            history.append(posting(i, kind, str(abs(amount)), at))
    start = base + timedelta(minutes=start_min)
    end = start + timedelta(minutes=length_min)
    r = account_report("acme", start, end, history, cdrs)
    assert r.check() == r.closing
    assert r.closing == sum((movement(p) for p in history if p.at < end), D(0))
    at_end = balance_at("acme", history, end - timedelta(microseconds=1))
    assert r.closing == (at_end.posted if at_end else D(0))
    assert (r.lines[-1].balance if r.lines else r.opening) == r.closing
    grand = totals([r, r])
    assert grand["closing"] == 2 * r.closing and grand["calls"] == 2 * r.calls
