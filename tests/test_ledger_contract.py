"""The ledger contract, run against every backend (the ``ledger`` fixture is parametrized).

Each test states one rule of agent/ledger/model.py or of issue 3 and checks
both what is returned and what was (or was not) written.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal as D
from typing import Any

import pytest

from agent.ledger import (
    AccountClosed,
    CallRecord,
    CallStatus,
    Cdr,
    IdempotencyConflict,
    PostingKind,
    RefusedOperation,
    UnknownAccount,
)

T0 = datetime(2026, 3, 2, 1, 0, 0, 123456, tzinfo=UTC)
RATE = D("0.13")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def call(call_id: str, account: str = "acme", **kw: Any) -> CallRecord:
    fields: dict[str, Any] = dict(
        call_id=call_id, account=account, node="pbx-1", caller="02150001000",
        callee="13800138000", tariff_name="standard", rate=RATE, increment=60, minimum=60,
        admitted_at=T0,
    )
    fields.update(kw)
    return CallRecord(**fields)


def cdr(call_id: str, amount: str, account: str = "acme", **kw: Any) -> Cdr:
    fields: dict[str, Any] = dict(
        call_id=call_id, account=account, caller="02150001000", callee="13800138000",
        answered_at=at(5), ended_at=at(65), billsec=60, billed_seconds=60, amount=D(amount),
        cause="NORMAL_CLEARING",
    )
    fields.update(kw)
    return Cdr(**fields)


async def funded(ledger: Any, amount: str = "100", account: str = "acme") -> None:
    await ledger.topup(account, D(amount), ref=f"fund-{account}", at=T0)


async def answered(ledger: Any, call_id: str, account: str = "acme") -> None:
    assert await ledger.admit_call(call(call_id, account), None)
    await ledger.answer_call(call_id, at(5))


# -- top-ups and accounts ---------------------------------------------------------
async def test_first_topup_creates_the_account(ledger: Any) -> None:
    posting = await ledger.topup("acme", D("100"), ref="T1", at=T0, first_minimum=D("100"),
                                 note="wire 123")
    assert (posting.kind, posting.amount, posting.ref, posting.note) == (
        PostingKind.TOPUP, D("100"), "T1", "wire 123")
    assert posting.key == "topup:T1"
    assert posting.at == T0 and posting.at.tzinfo is not None
    balance = await ledger.balance("acme")
    assert (balance.posted, balance.held, balance.available, balance.closed) == (
        D("100"), D(0), D("100"), False)
    assert [b.account for b in await ledger.balances()] == ["acme"]


async def test_first_topup_below_minimum_is_refused_and_writes_nothing(ledger: Any) -> None:
    with pytest.raises(RefusedOperation, match=r"at least 100\.00"):
        await ledger.topup("acme", D("99.99"), ref="T1", at=T0, first_minimum=D("100"))
    with pytest.raises(UnknownAccount):
        await ledger.balance("acme")
    assert await ledger.balances() == []


async def test_the_minimum_applies_only_to_the_first_topup(ledger: Any) -> None:
    await ledger.topup("acme", D("100"), ref="T1", at=T0, first_minimum=D("100"))
    await ledger.topup("acme", D("0.01"), ref="T2", at=T0, first_minimum=D("100"))
    assert (await ledger.balance("acme")).posted == D("100.01")


@pytest.mark.parametrize("amount", ["0", "-1", "0.00001"])
async def test_bad_amounts_are_refused(ledger: Any, amount: str) -> None:
    with pytest.raises(RefusedOperation):
        await ledger.topup("acme", D(amount), ref="T1", at=T0)
    await funded(ledger)
    with pytest.raises(RefusedOperation):
        await ledger.penalty("acme", D(amount), ref="P1", at=T0)
    assert len(await ledger.history("acme")) == 1


async def test_operations_on_unknown_accounts(ledger: Any) -> None:
    with pytest.raises(UnknownAccount):
        await ledger.penalty("ghost", D("1"), ref="P", at=T0)
    with pytest.raises(UnknownAccount):
        await ledger.adjust("ghost", D("1"), ref="A", at=T0)
    with pytest.raises(UnknownAccount):
        await ledger.refund("ghost", ref="R", at=T0)
    with pytest.raises(UnknownAccount):
        await ledger.balance("ghost")
    with pytest.raises(UnknownAccount):
        await ledger.history("ghost")
    with pytest.raises(UnknownAccount):
        await ledger.admit_call(call("c1", "ghost"), None)
    assert await ledger.balances() == []


async def test_a_blank_reference_is_refused(ledger: Any) -> None:
    with pytest.raises(RefusedOperation, match="reference"):
        await ledger.topup("acme", D("100"), ref=" ", at=T0)
    assert await ledger.balances() == []


# -- idempotency of finance postings ------------------------------------------------
async def test_replaying_a_topup_returns_the_original_and_writes_nothing(ledger: Any) -> None:
    first = await ledger.topup("acme", D("100"), ref="T1", at=T0, note="n")
    again = await ledger.topup("acme", D("100.0000"), ref="T1", at=at(60), note="n")
    assert again == first
    assert (await ledger.balance("acme")).posted == D("100")
    assert len(await ledger.history("acme")) == 1


@pytest.mark.parametrize("change", [{"amount": D("200")}, {"note": "other"}])
async def test_reusing_a_reference_with_other_content_conflicts(
    ledger: Any, change: dict[str, Any]
) -> None:
    await ledger.topup("acme", D("100"), ref="T1", at=T0, note="n")
    request: dict[str, Any] = {"amount": D("100"), "note": "n"} | change
    with pytest.raises(IdempotencyConflict, match="T1"):
        await ledger.topup("acme", request["amount"], ref="T1", at=T0, note=request["note"])
    assert (await ledger.balance("acme")).posted == D("100")


async def test_references_are_per_kind_and_per_account(ledger: Any) -> None:
    await ledger.topup("acme", D("100"), ref="X", at=T0)
    await ledger.topup("beta", D("100"), ref="X", at=T0)
    await ledger.penalty("acme", D("10"), ref="X", at=T0)
    assert (await ledger.balance("acme")).posted == D("90")
    assert (await ledger.balance("beta")).posted == D("100")


# -- penalties, adjustments ------------------------------------------------------------
async def test_a_penalty_may_take_the_balance_below_zero(ledger: Any) -> None:
    await funded(ledger)
    posting = await ledger.penalty("acme", D("1000"), ref="12321-1", at=T0, note="complaint")
    assert (posting.kind, posting.amount) == (PostingKind.PENALTY, D("1000"))
    assert (await ledger.balance("acme")).available == D("-900")
    assert await ledger.penalty("acme", D("1000"), ref="12321-1", at=at(1), note="complaint") \
        == posting


async def test_adjustments_are_signed(ledger: Any) -> None:
    await funded(ledger)
    down = await ledger.adjust("acme", D("-150.5"), ref="A1", at=T0, note="correction")
    assert down.amount == D("-150.5")
    await ledger.adjust("acme", D("0.5"), ref="A2", at=T0)
    assert (await ledger.balance("acme")).posted == D("-50")
    with pytest.raises(RefusedOperation):
        await ledger.adjust("acme", D("0"), ref="A3", at=T0)
    with pytest.raises(IdempotencyConflict):
        await ledger.adjust("acme", D("150.5"), ref="A1", at=T0, note="correction")


# -- refunds --------------------------------------------------------------------------
async def test_refund_pays_out_the_available_balance_and_closes(ledger: Any) -> None:
    await funded(ledger, "123.45")
    await ledger.penalty("acme", D("23.40"), ref="P1", at=T0)
    refund = await ledger.refund("acme", ref="R1", at=at(10))
    assert (refund.kind, refund.amount) == (PostingKind.REFUND, D("100.05"))
    balance = await ledger.balance("acme")
    assert (balance.posted, balance.closed) == (D(0), True)
    assert await ledger.refund("acme", ref="R1", at=at(20)) == refund
    with pytest.raises(AccountClosed, match="closed"):
        await ledger.topup("acme", D("100"), ref="T9", at=T0)
    with pytest.raises(AccountClosed):
        await ledger.refund("acme", ref="R2", at=T0)
    with pytest.raises(AccountClosed):
        await ledger.admit_call(call("c1"), None)
    assert len(await ledger.history("acme")) == 3


async def test_refund_of_an_empty_account_pays_zero(ledger: Any) -> None:
    await funded(ledger)
    await ledger.penalty("acme", D("100"), ref="P1", at=T0)
    assert (await ledger.refund("acme", ref="R1", at=T0)).amount == D(0)
    assert (await ledger.balance("acme")).closed


async def test_a_negative_balance_cannot_be_refunded(ledger: Any) -> None:
    await funded(ledger)
    await ledger.penalty("acme", D("1000"), ref="P1", at=T0)
    with pytest.raises(RefusedOperation, match="negative"):
        await ledger.refund("acme", ref="R1", at=T0)
    assert not (await ledger.balance("acme")).closed


async def test_refund_is_refused_while_calls_are_in_progress(ledger: Any) -> None:
    await funded(ledger)
    await answered(ledger, "c1")
    assert await ledger.hold("c1", 0, RATE, 60, at(5))
    with pytest.raises(RefusedOperation, match="in progress"):
        await ledger.refund("acme", ref="R1", at=T0)
    await ledger.settle_call(cdr("c1", "0.13"))
    assert (await ledger.refund("acme", ref="R1", at=at(70))).amount == D("99.87")


# -- admission --------------------------------------------------------------------------
async def test_admission_counts_live_calls_against_the_limit(ledger: Any) -> None:
    await funded(ledger)
    assert await ledger.admit_call(call("c1"), 2)
    assert await ledger.admit_call(call("c2"), 2)
    assert not await ledger.admit_call(call("c3"), 2)
    assert await ledger.get_call("c3") is None
    assert await ledger.admit_call(call("c1"), 2)  # a replay of a live call
    await ledger.settle_call(cdr("c1", "0", answered_at=None, billsec=0, billed_seconds=0))
    assert await ledger.admit_call(call("c3"), 2)
    assert await ledger.admit_call(call("c4"), None)
    assert [c.call_id for c in await ledger.live_calls("acme")] == ["c2", "c3", "c4"]


async def test_limits_are_per_account(ledger: Any) -> None:
    await funded(ledger, account="acme")
    await funded(ledger, account="beta")
    assert await ledger.admit_call(call("a1", "acme"), 1)
    assert await ledger.admit_call(call("b1", "beta"), 1)
    assert [c.call_id for c in await ledger.live_calls("beta")] == ["b1"]
    assert {c.call_id for c in await ledger.live_calls()} == {"a1", "b1"}


async def test_readmitting_an_ended_or_foreign_call_is_refused(ledger: Any) -> None:
    await funded(ledger, account="acme")
    await funded(ledger, account="beta")
    await ledger.admit_call(call("c1"), None)
    with pytest.raises(IdempotencyConflict):
        await ledger.admit_call(call("c1", "beta"), None)
    await ledger.settle_call(cdr("c1", "0", answered_at=None, billsec=0, billed_seconds=0))
    with pytest.raises(RefusedOperation, match="ended"):
        await ledger.admit_call(call("c1"), None)


async def test_answer_sets_the_status_once(ledger: Any) -> None:
    await funded(ledger)
    await ledger.admit_call(call("c1"), None)
    record = await ledger.get_call("c1")
    assert record == call("c1")
    first = await ledger.answer_call("c1", at(5))
    assert (first.status, first.answered_at) == (CallStatus.ANSWERED, at(5))
    again = await ledger.answer_call("c1", at(9))
    assert again == first
    with pytest.raises(RefusedOperation):
        await ledger.answer_call("nope", at(5))


# -- holds --------------------------------------------------------------------------------
async def test_a_hold_reserves_and_records_paid_time(ledger: Any) -> None:
    await funded(ledger, "0.26")
    await answered(ledger, "c1")
    assert await ledger.hold("c1", 0, RATE, 60, at(5))
    assert await ledger.hold("c1", 1, RATE, 120, at(65))
    record = await ledger.get_call("c1")
    assert (record.held, record.paid_seconds, record.steps) == (D("0.26"), 120, 2)
    balance = await ledger.balance("acme")
    assert (balance.posted, balance.held, balance.available) == (D("0.26"), D("0.26"), D(0))
    holds = [p for p in await ledger.history("acme") if p.kind is PostingKind.HOLD]
    assert [(h.key, h.call_id, h.amount) for h in holds] == [
        ("hold:c1:0", "c1", RATE), ("hold:c1:1", "c1", RATE)]


async def test_a_hold_the_balance_cannot_cover_writes_nothing(ledger: Any) -> None:
    await funded(ledger, "0.2")
    await answered(ledger, "c1")
    assert await ledger.hold("c1", 0, RATE, 60, at(5))
    assert not await ledger.hold("c1", 1, RATE, 120, at(65))
    record = await ledger.get_call("c1")
    assert (record.held, record.paid_seconds, record.steps) == (RATE, 60, 1)
    assert (await ledger.balance("acme")).available == D("0.07")
    assert len(await ledger.history("acme")) == 2


async def test_a_replayed_hold_returns_true_and_writes_nothing(ledger: Any) -> None:
    await funded(ledger, "0.13")
    await answered(ledger, "c1")
    assert await ledger.hold("c1", 0, RATE, 60, at(5))
    # The balance is now fully held, yet the replay succeeds: it is the same hold.
    assert await ledger.hold("c1", 0, RATE, 60, at(6))
    assert (await ledger.balance("acme")).held == RATE
    with pytest.raises(IdempotencyConflict):
        await ledger.hold("c1", 0, D("0.26"), 120, at(6))


async def test_holds_on_unknown_or_settled_calls_are_refused(ledger: Any) -> None:
    await funded(ledger)
    with pytest.raises(RefusedOperation):
        await ledger.hold("nope", 0, RATE, 60, at(5))
    await answered(ledger, "c1")
    await ledger.settle_call(cdr("c1", "0", billsec=0, billed_seconds=0))
    with pytest.raises(RefusedOperation, match="settled"):
        await ledger.hold("c1", 0, RATE, 60, at(70))
    with pytest.raises(RefusedOperation):
        await ledger.hold("c1", 1, D(0), 60, at(70))


async def test_a_penalty_below_zero_stops_new_holds(ledger: Any) -> None:
    await funded(ledger)
    await ledger.penalty("acme", D("1000"), ref="P1", at=T0)
    await answered(ledger, "c1")
    assert not await ledger.hold("c1", 0, RATE, 60, at(5))


# -- settlement ----------------------------------------------------------------------------
async def test_settle_charges_the_amount_and_releases_the_rest(ledger: Any) -> None:
    await funded(ledger)
    await answered(ledger, "c1")
    for step in range(3):
        assert await ledger.hold("c1", step, RATE, 60 * (step + 1), at(5 + 60 * step))
    stored = await ledger.settle_call(cdr("c1", "0.26", billsec=100, billed_seconds=120,
                                          cut_off=True, node="pbx-1"))
    assert (stored.amount, stored.flags, stored.cut_off) == (D("0.26"), (), True)
    balance = await ledger.balance("acme")
    assert (balance.posted, balance.held) == (D("99.74"), D(0))
    record = await ledger.get_call("c1")
    assert (record.status, record.held) == (CallStatus.ENDED, D(0))
    kinds = [(p.kind, p.amount, p.at) for p in (await ledger.history("acme"))[-2:]]
    assert kinds == [(PostingKind.CHARGE, D("0.26"), at(65)),
                     (PostingKind.RELEASE, D("0.13"), at(65))]
    assert await ledger.live_calls() == []
    assert await ledger.audit() == []


async def test_settling_again_returns_the_stored_cdr(ledger: Any) -> None:
    await funded(ledger)
    await answered(ledger, "c1")
    await ledger.hold("c1", 0, RATE, 60, at(5))
    first = await ledger.settle_call(cdr("c1", "0.13"))
    assert await ledger.settle_call(cdr("c1", "0.13")) == first
    with pytest.raises(IdempotencyConflict):
        await ledger.settle_call(cdr("c1", "0.13", billsec=59))
    assert (await ledger.balance("acme")).posted == D("99.87")
    assert len(await ledger.history("acme")) == 3


async def test_a_charge_above_the_holds_is_capped_and_flagged(ledger: Any) -> None:
    await funded(ledger)
    await answered(ledger, "c1")
    await ledger.hold("c1", 0, RATE, 60, at(5))
    stored = await ledger.settle_call(cdr("c1", "0.39", billed_seconds=180, flags=("adopted",)))
    assert (stored.amount, stored.flags) == (RATE, ("adopted", "capped"))
    assert (await ledger.balance("acme")).posted == D("99.87")
    assert await ledger.settle_call(cdr("c1", "0.39", billed_seconds=180,
                                        flags=("adopted",))) == stored
    assert await ledger.audit() == []


async def test_settling_an_unknown_or_foreign_call_is_refused(ledger: Any) -> None:
    await funded(ledger, account="acme")
    await funded(ledger, account="beta")
    with pytest.raises(RefusedOperation):
        await ledger.settle_call(cdr("nope", "0"))
    await answered(ledger, "c1")
    with pytest.raises(RefusedOperation, match="belongs to"):
        await ledger.settle_call(cdr("c1", "0", account="beta"))
    assert (await ledger.get_call("c1")).status is CallStatus.ANSWERED


async def test_cdrs_are_listed_by_end_time_half_open(ledger: Any) -> None:
    await funded(ledger)
    for n in range(3):
        await answered(ledger, f"c{n}")
        await ledger.hold(f"c{n}", 0, RATE, 60, at(5))
        await ledger.settle_call(cdr(f"c{n}", "0.13", ended_at=at(100 * (n + 1))))
    listed = await ledger.cdrs("acme", at(100), at(300))
    assert [c.call_id for c in listed] == ["c0", "c1"]
    assert listed[0].ended_at == at(100) and listed[0].answered_at == at(5)
    assert await ledger.cdrs("beta", at(0), at(1000)) == []


# -- history and times -----------------------------------------------------------------------
async def test_history_since_and_exact_times(ledger: Any) -> None:
    await ledger.topup("acme", D("100"), ref="T1", at=T0)
    later = T0 + timedelta(hours=1, microseconds=1)
    shanghai = timezone(timedelta(hours=8))
    await ledger.topup("acme", D("1.2345"), ref="T2", at=later.astimezone(shanghai))
    since = await ledger.history("acme", since=later)
    assert [(p.ref, p.amount, p.at) for p in since] == [("T2", D("1.2345"), later)]
    assert since[0].at.utcoffset() == timedelta(0)
    with pytest.raises(ValueError, match="timezone"):
        await ledger.topup("acme", D("1"), ref="T3", at=datetime(2026, 1, 1))


# -- attempts -----------------------------------------------------------------------------------
async def test_attempts_log(ledger: Any) -> None:
    await ledger.record_attempt("acme", "13800138000", at(0), True, "")
    await ledger.record_attempt("acme", "13800138000", at(10), False, "frequency_cap")
    await ledger.record_attempt("acme", "13900139000", at(20), True, "")
    await ledger.record_attempt("beta", "13800138000", at(30), True, "")
    assert await ledger.attempts("acme", at(0)) == [at(0), at(20)]
    assert await ledger.attempts("acme", at(1)) == [at(20)]
    assert await ledger.attempts("acme", at(0), "13800138000") == [at(0)]
    assert await ledger.prune_attempts(at(20)) == 2
    assert await ledger.attempts("acme", at(0)) == [at(20)]
    assert await ledger.attempts("beta", at(0)) == [at(30)]


async def test_everything_survives_a_reopen(ledger_url: str) -> None:
    from agent.ledger import open_ledger

    first = await open_ledger(ledger_url)
    await first.topup("acme", D("100"), ref="T1", at=T0)
    await first.admit_call(call("c1"), None)
    await first.hold("c1", 0, RATE, 60, at(5))
    await first.record_attempt("acme", "13800138000", at(0), True, "")
    await first.close()
    second = await open_ledger(ledger_url)
    try:
        assert (await second.balance("acme")).available == D("99.87")
        assert (await second.get_call("c1")).held == RATE
        assert await second.attempts("acme", at(0)) == [at(0)]
        assert await second.audit() == []
    finally:
        await second.close()


# -- the gate's two operations: one read and one write per decision -----------------


async def test_account_state_reads_everything_the_gate_needs_at_once(ledger: Any) -> None:
    from agent.ledger import Admission

    empty = await ledger.account_state("acme", account_since=T0, callee_since=T0,
                                       destination="13800138000")
    assert not empty.known and empty.available == 0 and empty.live_calls == 0
    await funded(ledger, "10")
    assert await ledger.admit_and_hold(call("c1"), None, RATE, 60,
                                       reason="allowed") is Admission.ADMITTED
    await ledger.record_attempt("acme", "13900000000", at(1), True, "allowed")
    await ledger.record_attempt("acme", "13800138000", at(2), False, "do_not_call")
    state = await ledger.account_state("acme", account_since=T0, callee_since=T0,
                                       destination="13800138000")
    assert state.known and not state.closed
    assert state.available == D("9.87") and state.live_calls == 1
    # allowed attempts only; the callee list only for that destination
    assert state.account_attempts == 2  # T0 and at(1)
    assert state.callee_attempts == 1  # T0
    later = await ledger.account_state("acme", account_since=at(1))
    assert later.account_attempts == 1 and later.callee_attempts == 0


async def test_admit_and_hold_is_one_all_or_nothing_write(ledger: Any) -> None:
    from agent.ledger import Admission

    await funded(ledger, "0.20")
    assert await ledger.admit_and_hold(call("c1"), 5, RATE, 60,
                                       reason="allowed") is Admission.ADMITTED
    record = await ledger.get_call("c1")
    assert record.steps == 1 and record.held == RATE and record.paid_seconds == 60
    # 0.07 left: the first unit cannot be held, so the call is not admitted at all
    assert await ledger.admit_and_hold(call("c2"), 5, RATE, 60,
                                       reason="allowed") is Admission.NO_FUNDS
    assert await ledger.get_call("c2") is None
    # the line limit is checked in the same transaction
    await ledger.topup("acme", D("1"), ref="more", at=T0)
    assert await ledger.admit_and_hold(call("c3"), 1, RATE, 60,
                                       reason="allowed") is Admission.LINES_BUSY
    assert await ledger.get_call("c3") is None
    balance = await ledger.balance("acme")
    assert balance.held == RATE and await ledger.audit() == []
    state = await ledger.account_state("acme", account_since=T0)
    assert state.account_attempts == 1  # the refusals are logged, not counted as allowed


async def test_admit_and_hold_on_a_closed_account_is_refused(ledger: Any) -> None:
    await funded(ledger, "1")
    await ledger.refund("acme", ref="bye", at=T0)
    with pytest.raises(AccountClosed):
        await ledger.admit_and_hold(call("c1"), None, RATE, 60, reason="allowed")



async def test_admit_and_hold_replayed_holds_once(ledger: Any) -> None:
    """A gate that retries after a lost reply: the same call admitted once, held once."""
    from agent.ledger import Admission

    await funded(ledger, "1")
    first = await ledger.admit_and_hold(call("c1"), 5, RATE, 60, reason="allowed")
    again = await ledger.admit_and_hold(call("c1"), 5, RATE, 60, reason="allowed")
    assert first is again is Admission.ADMITTED
    record = await ledger.get_call("c1")
    assert (record.steps, record.held, record.paid_seconds) == (1, RATE, 60)
    assert record.status.value == "admitted" and record.admitted_at == T0
    balance = await ledger.balance("acme")
    assert balance.held == RATE and balance.available == D("1") - RATE
    holds = [p for p in await ledger.history("acme") if p.kind.value == "hold"]
    assert [(p.amount, p.ref, p.at) for p in holds] == [(RATE, "c1", T0)]
    assert await ledger.audit() == []


async def test_racing_admissions_respect_the_line_cap_and_the_balance(ledger: Any) -> None:
    import asyncio

    from agent.ledger import Admission

    await funded(ledger, "0.65")  # five first increments
    lines = await asyncio.gather(*(
        ledger.admit_and_hold(call(f"l{i}"), 3, RATE, 60, reason="allowed")
        for i in range(12)))
    assert lines.count(Admission.ADMITTED) == 3
    assert lines.count(Admission.LINES_BUSY) == 9
    money = await asyncio.gather(*(
        ledger.admit_and_hold(call(f"m{i}"), None, RATE, 60, reason="allowed")
        for i in range(12)))
    assert money.count(Admission.ADMITTED) == 2  # 0.65 - 3 x 0.13 = 0.26 left
    assert money.count(Admission.NO_FUNDS) == 10
    balance = await ledger.balance("acme")
    assert balance.available == 0 and balance.held == D("0.65")
    assert await ledger.audit() == []
