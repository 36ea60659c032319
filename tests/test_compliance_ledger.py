"""The compliance records' contract, on both ledger backends.

Complaint fines are idempotent by ticket; a withdrawal reverses a fine with a
posting; a complaint puts its callee on the live do-not-call list in the same
transaction; N complaints in the policy's period suspend the account; the DNC
change log is ordered and complete; the gate's single read carries the
suspension and the cps / caller-ID counts.
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any

import pytest

from agent.gate.dnc import number_key
from agent.ledger import (
    AccountClosed,
    IdempotencyConflict,
    PostingKind,
    RefusedOperation,
    UnknownAccount,
)
from agent.ledger.compliance import GLOBAL, SuspendRule
from tests.test_ledger_storage import _pg_exec

T0 = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
FINE = D("1000")
RULE = SuspendRule(3, timedelta(days=30))


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def complain(ledger: Any, ticket: str, *, account: str = "acme",
                   callee: str = "13800138000", when: datetime = T0, note: str = "",
                   suspend: SuspendRule | None = RULE) -> Any:
    return await ledger.add_complaint(account=account, callee=callee, ticket=ticket, at=when,
                                      fine=FINE, operator="ops1", note=note,
                                      recorded_at=when + timedelta(hours=1), suspend=suspend)


async def test_a_complaint_fines_once_per_ticket(ledger: Any) -> None:
    await ledger.topup("acme", D("1500"), ref="t1", at=T0 - timedelta(days=1))
    first = await complain(ledger, "12321-0001", note="harassment")
    assert first.created and first.complaint.fine == FINE
    again = await complain(ledger, "12321-0001", note="harassment")
    assert not again.created and again.complaint == first.complaint
    assert (await ledger.balance("acme")).posted == D("500")
    penalties = [p for p in await ledger.history("acme") if p.kind is PostingKind.PENALTY]
    assert [(p.amount, p.ref) for p in penalties] == [(FINE, "complaint:12321-0001")]
    with pytest.raises(IdempotencyConflict):
        await complain(ledger, "12321-0001", callee="13900139000")
    with pytest.raises(IdempotencyConflict):
        await complain(ledger, "12321-0001", note="something else")
    assert (await ledger.balance("acme")).posted == D("500")
    assert await ledger.audit() == []


async def test_concurrent_replays_of_one_ticket_fine_once(ledger: Any) -> None:
    await ledger.topup("acme", D("100"), ref="t1", at=T0 - timedelta(days=1))
    outcomes = await asyncio.gather(*(complain(ledger, "T-race") for _ in range(8)))
    assert sum(o.created for o in outcomes) == 1
    assert (await ledger.balance("acme")).posted == D("-900")  # a fine may go below zero


async def test_withdrawal_reverses_the_fine_with_a_posting(ledger: Any) -> None:
    await ledger.topup("acme", D("1500"), ref="t1", at=T0 - timedelta(days=1))
    await complain(ledger, "T1")
    withdrawn, changed = await ledger.withdraw_complaint("T1", operator="fin2", at=at(7200),
                                                         note="caller withdrew")
    assert changed and withdrawn.withdrawn and withdrawn.withdrawn_by == "fin2"
    again, changed = await ledger.withdraw_complaint("T1", operator="fin2", at=at(9000))
    assert not changed and again.withdrawn_at == withdrawn.withdrawn_at
    kinds = [(p.kind, p.amount, p.ref) for p in await ledger.history("acme")]
    assert kinds[-2:] == [(PostingKind.PENALTY, FINE, "complaint:T1"),
                          (PostingKind.ADJUSTMENT, FINE, "complaint-withdrawn:T1")]
    assert (await ledger.balance("acme")).posted == D("1500")
    assert await ledger.audit() == []
    # the same ticket again after withdrawal is still the same complaint: no new fine
    assert not (await complain(ledger, "T1")).created
    with pytest.raises(RefusedOperation):
        await ledger.withdraw_complaint("nope", operator="fin2", at=at(1))


async def test_a_fine_needs_an_account_in_the_ledger(ledger: Any) -> None:
    with pytest.raises(UnknownAccount):
        await complain(ledger, "T1", account="ghost")
    assert await ledger.complaint("T1") is None  # nothing written
    assert await ledger.dnc_list() == []


async def test_a_complaint_puts_the_callee_on_the_live_list_at_once(ledger: Any) -> None:
    await ledger.topup("acme", D("100"), ref="t1", at=T0 - timedelta(days=1))
    await complain(ledger, "T1", callee="13800138000")
    (entry,) = await ledger.dnc_list("acme")
    assert (entry.number, entry.reason, entry.operator) == ("13800138000", "complaint T1",
                                                            "ops1")
    changes = await ledger.dnc_changes(0)
    assert [(c.account, c.number, c.added) for c in changes] == [
        ("acme", "13800138000", True)]
    assert [e.account for e in await ledger.dnc_lookup("acme", "13800138000")] == ["acme"]


async def test_suspension_after_n_complaints_in_the_period(ledger: Any) -> None:
    await ledger.topup("acme", D("5000"), ref="t1", at=T0 - timedelta(days=90))
    old = await complain(ledger, "old", when=T0 - timedelta(days=30))  # exactly 30 d: out
    assert not old.suspended
    a = await complain(ledger, "A", when=at(0), callee="13800000001")
    b = await complain(ledger, "B", when=at(60), callee="13800000002")
    assert (a.complaints_in_period, b.complaints_in_period) == (1, 2)
    assert not b.suspended and await ledger.suspension("acme") is None
    c = await complain(ledger, "C", when=at(120), callee="13800000003")
    assert c.suspended and c.newly_suspended and c.complaints_in_period == 3
    suspension = await ledger.suspension("acme")
    assert suspension is not None and suspension.operator == "ops1"
    assert "3 complaints within 30 days" in suspension.reason
    d = await complain(ledger, "D", when=at(180), callee="13800000004")
    # Already suspended: no second suspension, and the outcome says it is suspended.
    assert d.suspended and not d.newly_suspended
    state = await ledger.account_state("acme")
    assert state.suspended == suspension.reason
    assert await ledger.resume("acme", operator="fin1", at=at(300), note="paid")
    assert (await ledger.account_state("acme")).suspended is None
    events = await ledger.account_events("acme")
    assert [(e.action, e.operator) for e in events] == [("suspend", "ops1"), ("resume", "fin1")]


async def test_withdrawn_complaints_do_not_count_towards_suspension(ledger: Any) -> None:
    await ledger.topup("acme", D("5000"), ref="t1", at=T0 - timedelta(days=1))
    await complain(ledger, "A", when=at(0))
    await complain(ledger, "B", when=at(1))
    await ledger.withdraw_complaint("A", operator="fin", at=at(2))
    c = await complain(ledger, "C", when=at(3))
    assert c.complaints_in_period == 2 and not c.suspended


async def test_suspend_and_resume_are_recorded_with_the_operator(ledger: Any) -> None:
    s, changed = await ledger.suspend("acme", reason="contract review", operator="ops1",
                                      at=T0)
    assert changed and s.reason == "contract review"
    s2, changed = await ledger.suspend("acme", reason="again", operator="ops2", at=at(1))
    assert not changed and s2 == s
    assert (await ledger.account_state("acme")).suspended == "contract review"
    assert await ledger.resume("acme", operator="ops3", at=at(2))
    assert not await ledger.resume("acme", operator="ops3", at=at(3))
    assert [(e.action, e.operator, e.reason) for e in await ledger.account_events("acme")] == [
        ("suspend", "ops1", "contract review"), ("resume", "ops3", "")]
    with pytest.raises(RefusedOperation):
        await ledger.suspend("acme", reason=" ", operator="ops1", at=T0)


async def test_dnc_entries_and_their_ordered_change_log(ledger: Any) -> None:
    e1, added = await ledger.dnc_add("acme", "13800000001", reason="asked", operator="o",
                                     at=T0)
    assert added
    _, added = await ledger.dnc_add("acme", "13800000001", reason="twice", operator="o",
                                    at=at(1))
    assert not added  # nothing logged for a no-op
    await ledger.dnc_add(GLOBAL, "13800000002", reason="regulator", operator="o", at=at(2))
    assert await ledger.dnc_remove("acme", "13800000001", operator="o", at=at(3))
    assert not await ledger.dnc_remove("acme", "13800000001", operator="o", at=at(4))
    changes = await ledger.dnc_changes(0)
    assert [(c.account, c.number, c.added) for c in changes] == [
        ("acme", "13800000001", True), (GLOBAL, "13800000002", True),
        ("acme", "13800000001", False)]
    assert [c.seq for c in changes] == sorted({c.seq for c in changes})
    assert await ledger.dnc_changes(changes[-1].seq) == []
    assert [c.number for c in await ledger.dnc_changes(changes[0].seq, limit=1)] == [
        "13800000002"]
    seq, keys = await ledger.dnc_snapshot()
    assert seq == changes[-1].seq
    assert {a: list(k) for a, k in keys.items()} == {GLOBAL: [number_key("13800000002")]}
    assert [(e.account, e.number) for e in await ledger.dnc_list()] == [
        (GLOBAL, "13800000002")]
    assert [e.account for e in await ledger.dnc_lookup("beta", "13800000002")] == [GLOBAL]
    with pytest.raises(RefusedOperation):
        await ledger.dnc_add("acme", "12ab", reason="x", operator="o", at=T0)
    assert e1.seq == changes[0].seq


async def test_the_gate_read_counts_cps_and_caller_attempts(ledger: Any) -> None:
    await ledger.topup("acme", D("100"), ref="t1", at=T0 - timedelta(days=1))
    for seconds, caller, allowed in ((-3600, "02158880000", True),  # exactly an hour ago
                                     (-3601, "02158880000", True),  # out of the hour
                                     (-1, "02158880000", True),
                                     (-0.5, "02158880001", True),
                                     (-0.2, "02158880000", False)):  # refused: not counted
        await ledger.record_attempt("acme", "13800000009", at(seconds), allowed, "x", caller)
    state = await ledger.account_state(
        "acme", cps_since=at(-1), caller="02158880000", caller_hour_since=at(-3600),
        caller_day_since=at(-7200))
    assert (state.cps_attempts, state.caller_hour_attempts, state.caller_day_attempts) == (
        2, 2, 3)
    none = await ledger.account_state("acme")
    assert (none.cps_attempts, none.caller_hour_attempts, none.suspended) == (0, 0, None)


# -- reviewer findings (session 6): each fails without its fix --------------------------
@pytest.mark.parametrize("number", ["¹²³", "١٣٨٠٠١٣٨٠٠٠", "１３８", "13８", "", "+138"])
async def test_numbers_are_ascii_digits_only(ledger: Any, number: str) -> None:
    await ledger.topup("acme", D("100"), ref="t1", at=T0 - timedelta(days=1))
    with pytest.raises(RefusedOperation, match="digits 0-9 only"):
        await ledger.dnc_add("acme", number, reason="x", operator="o", at=T0)
    with pytest.raises(RefusedOperation, match="digits 0-9 only"):
        await complain(ledger, "T1", callee=number)
    assert await ledger.dnc_changes(0) == [] and await ledger.complaints() == []


@pytest.mark.parametrize("text", ["two\nlines", "cr\r", "tab\there", "\x1b[2J", "ls\u2028",
                                  "rtl\u202eevil"])
async def test_free_text_is_one_line(ledger: Any, text: str) -> None:
    await ledger.topup("acme", D("100"), ref="t1", at=T0 - timedelta(days=1))
    attempts = [
        lambda: complain(ledger, "T1", note=text),
        lambda: ledger.dnc_add("acme", "13800138000", reason=text, operator="o", at=T0),
        lambda: ledger.dnc_remove("acme", "13800138000", reason=text, operator="o", at=T0),
        lambda: ledger.suspend("acme", reason=text, operator="o", at=T0),
        lambda: ledger.resume("acme", note=text, operator="o", at=T0),
    ]
    for attempt in attempts:
        with pytest.raises(RefusedOperation, match="one line"):
            await attempt()
    assert await ledger.complaints() == [] and await ledger.dnc_changes(0) == []
    assert await ledger.account_events("acme") == []
    await complain(ledger, "T2", note="投诉 12321\u3000已核实")  # CJK and a full-width space
    with pytest.raises(RefusedOperation, match="one line"):
        await ledger.withdraw_complaint("T2", operator="o", at=at(1), note=text)
    assert not (await ledger.complaint("T2")).withdrawn


async def test_a_closed_account_takes_no_complaint_and_no_withdrawal(ledger: Any) -> None:
    await ledger.topup("acme", D("1500"), ref="t1", at=T0 - timedelta(days=1))
    await complain(ledger, "T1")
    await ledger.refund("acme", ref="r1", at=at(10))
    before = await ledger.history("acme")
    with pytest.raises(AccountClosed, match="closed"):
        await complain(ledger, "T2", callee="13900139000")
    with pytest.raises(AccountClosed, match="closed"):
        await ledger.withdraw_complaint("T1", operator="fin", at=at(20))
    assert not (await complain(ledger, "T1")).created  # a replay is still answered
    assert await ledger.history("acme") == before
    assert await ledger.complaint("T2") is None
    assert not (await ledger.complaint("T1")).withdrawn
    assert [e.number for e in await ledger.dnc_list("acme")] == ["13800138000"]


async def test_a_retry_without_a_time_is_a_replay(ledger: Any) -> None:
    await ledger.topup("acme", D("1500"), ref="t1", at=T0 - timedelta(days=1))

    async def now_complaint(recorded: datetime) -> Any:
        return await ledger.add_complaint(account="acme", callee="13800138000", ticket="T1",
                                          at=None, fine=FINE, operator="ops1",
                                          recorded_at=recorded)

    first = await now_complaint(at(0))
    assert first.created and first.complaint.at == at(0)
    again = await now_complaint(at(30))  # the operator ran the same command again
    assert not again.created and again.complaint == first.complaint
    with pytest.raises(IdempotencyConflict):  # a time of its own must still match
        await complain(ledger, "T1", when=at(30))
    assert (await ledger.balance("acme")).posted == D("500")


async def test_a_bad_number_left_in_an_old_ledger_does_not_stop_the_snapshot(
        ledger: Any, ledger_url: str) -> None:
    await ledger.dnc_add("acme", "13800138000", reason="x", operator="o", at=T0)
    rows = ("INSERT INTO dnc (account, number, reason, operator, added_at, seq)"
            " VALUES ('acme', '¹²³', 'old', 'o', {t}, 98)",
            "INSERT INTO dnc (account, number, reason, operator, added_at, seq)"
            " VALUES ('acme', '١٢٣٤٥', 'old', 'o', {t}, 99)")
    if ledger_url.startswith("sqlite"):
        conn = sqlite3.connect(ledger_url.removeprefix("sqlite://"), isolation_level=None)
        for row in rows:
            conn.execute(row.format(t=0))
        conn.close()
    else:
        await _pg_exec(ledger_url, *(row.format(t="now()") for row in rows))
    _, keys = await ledger.dnc_snapshot()
    assert list(keys["acme"]) == [number_key("13800138000")]
