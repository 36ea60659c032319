"""``correct_call``: a provisional settlement brought to the PBX's own CDR, on both backends."""

from __future__ import annotations

from decimal import Decimal as D
from typing import Any

import pytest

from agent.ledger import IdempotencyConflict, PostingKind, RefusedOperation
from tests.test_ledger_contract import T0, answered, at, call, cdr, funded


async def settled_provisionally(ledger: Any, call_id: str, steps: int = 2) -> None:
    """A call that held ``steps`` increments and was settled at what was paid."""
    await answered(ledger, call_id)
    for step in range(1, steps + 1):
        assert await ledger.hold(call_id, step, D("0.13"), 60 * step, at(5 + 60 * (step - 1)))
    await ledger.settle_call(cdr(call_id, str(D("0.13") * steps), billsec=60 * steps,
                                 billed_seconds=60 * steps, answered_at=at(5),
                                 ended_at=at(200),
                                 flags=("ended_while_away", "billsec_assumed_paid")))


async def test_a_correction_gives_back_what_the_pbx_did_not_talk(ledger: Any) -> None:
    await funded(ledger)
    await settled_provisionally(ledger, "c1")  # charged 0.26 for "120 s"
    corrected = await ledger.correct_call("c1", 58, note="PBX CDR billsec 58")
    assert (corrected.pbx_billsec, corrected.amount, corrected.correction, corrected.charged) == (
        58, D("0.26"), D("-0.13"), D("0.13"))
    assert corrected.billsec == 120  # the provisional settlement stays as it was
    balance = await ledger.balance("acme")
    assert (balance.posted, balance.held) == (D("99.87"), D(0))
    postings = [p for p in await ledger.history("acme") if p.kind is PostingKind.CORRECTION]
    assert [(p.amount, p.call_id, p.key, p.at, p.note) for p in postings] == [
        (D("-0.13"), "c1", "correction:c1", at(200), "PBX CDR billsec 58")]
    assert await ledger.call_cdr("c1") == corrected
    assert await ledger.audit() == []


async def test_a_correction_charges_talk_the_agent_did_not_see(ledger: Any) -> None:
    await funded(ledger)
    await settled_provisionally(ledger, "c1", steps=1)  # charged 0.13 for "60 s"
    corrected = await ledger.correct_call("c1", 61)
    assert (corrected.correction, corrected.charged) == (D("0.13"), D("0.26"))
    assert (await ledger.balance("acme")).posted == D("99.74")
    assert await ledger.audit() == []


async def test_a_correction_may_take_the_balance_below_zero(ledger: Any) -> None:
    await funded(ledger, "0.13")
    await settled_provisionally(ledger, "c1", steps=1)
    corrected = await ledger.correct_call("c1", 600)  # ten increments the agent never saw
    assert corrected.charged == D("1.30")
    assert (await ledger.balance("acme")).posted == D("-1.17")
    assert await ledger.audit() == []


async def test_an_equal_cdr_records_the_billsec_and_posts_nothing(ledger: Any) -> None:
    await funded(ledger)
    await settled_provisionally(ledger, "c1")
    corrected = await ledger.correct_call("c1", 101)
    assert (corrected.pbx_billsec, corrected.correction) == (101, D(0))
    assert not [p for p in await ledger.history("acme") if p.kind is PostingKind.CORRECTION]
    assert await ledger.audit() == []


async def test_a_correction_is_once_per_call(ledger: Any) -> None:
    await funded(ledger)
    await settled_provisionally(ledger, "c1")
    first = await ledger.correct_call("c1", 58)
    assert await ledger.correct_call("c1", 58) == first  # a replay: nothing new written
    with pytest.raises(IdempotencyConflict, match="billsec 58, not 59"):
        await ledger.correct_call("c1", 59)
    postings = [p for p in await ledger.history("acme") if p.kind is PostingKind.CORRECTION]
    assert len(postings) == 1
    assert (await ledger.balance("acme")).posted == D("99.87")


async def test_unknown_unsettled_and_bad_calls_are_refused(ledger: Any) -> None:
    await funded(ledger)
    with pytest.raises(RefusedOperation, match="no call 'nope'"):
        await ledger.correct_call("nope", 10)
    await answered(ledger, "live")
    with pytest.raises(RefusedOperation, match="not settled yet"):
        await ledger.correct_call("live", 10)
    await settled_provisionally(ledger, "c1")
    with pytest.raises(RefusedOperation, match="negative"):
        await ledger.correct_call("c1", -1)
    assert (await ledger.call_cdr("c1")).pbx_billsec is None  # type: ignore[union-attr]
    assert await ledger.call_cdr("live") is None


async def test_an_unanswered_outcome_unknown_call_is_charged_from_the_cdr(ledger: Any) -> None:
    """Admitted with its first unit held, gone while nobody watched: settled at 0."""
    await funded(ledger)
    assert await ledger.admit_and_hold(call("c1"), None, D("0.13"), 60,
                                       reason="allowed") == "admitted"
    await ledger.settle_call(cdr("c1", "0", billsec=0, billed_seconds=0, answered_at=None,
                                 flags=("ended_while_away", "outcome_unknown")))
    corrected = await ledger.correct_call("c1", 45)
    assert corrected.charged == D("0.13")
    assert (await ledger.balance("acme")).available == D("99.87")
    assert await ledger.audit() == []


async def test_corrections_survive_a_reopen_and_show_in_the_period(ledger_url: str) -> None:
    from agent.ledger import open_ledger

    ledger = await open_ledger(ledger_url)
    try:
        await funded(ledger)
        await settled_provisionally(ledger, "c1")
        await ledger.correct_call("c1", 58)
    finally:
        await ledger.close()
    ledger = await open_ledger(ledger_url)
    try:
        [listed] = await ledger.cdrs("acme", T0, at(300))
        assert (listed.pbx_billsec, listed.correction, listed.charged) == (
            58, D("-0.13"), D("0.13"))
        assert await ledger.audit() == []
    finally:
        await ledger.close()


async def test_a_closed_account_takes_no_correction_until_reopened(ledger: Any) -> None:
    from agent.ledger import AccountClosed

    await funded(ledger)
    await settled_provisionally(ledger, "c1")
    await ledger.refund("acme", ref="R1", at=at(300))
    with pytest.raises(AccountClosed, match="reopen, then ledger reconcile --apply"):
        await ledger.correct_call("c1", 58)
    assert (await ledger.call_cdr("c1")).pbx_billsec is None  # type: ignore[union-attr]
    await ledger.reopen("acme", ref="O1", at=at(400), note="PBX CDR correction")
    assert (await ledger.correct_call("c1", 58)).charged == D("0.13")
    assert (await ledger.balance("acme")).posted == D("0.13")  # given back, to refund again
    assert await ledger.audit() == []


async def test_an_equal_cdr_is_recorded_even_on_a_closed_account(ledger: Any) -> None:
    await funded(ledger)
    await settled_provisionally(ledger, "c1")
    await ledger.refund("acme", ref="R1", at=at(300))
    assert (await ledger.correct_call("c1", 101)).pbx_billsec == 101  # nothing posted


async def test_a_correction_is_bounded_like_a_finance_posting(ledger: Any) -> None:
    """A CDR is outside input: no row moves more than max_posting (a clerk's bound)."""
    await funded(ledger)
    await settled_provisionally(ledger, "c1", steps=1)  # charged 0.13
    ledger.max_posting = D("1")
    with pytest.raises(RefusedOperation, match=r"the correction of call 'c1' from the PBX's "
                                               r"CDR 1\.17 is above the ledger's maximum"):
        await ledger.correct_call("c1", 600)  # 1.30: +1.17
    assert (await ledger.call_cdr("c1")).pbx_billsec is None
    assert (await ledger.balance("acme")).posted == D("99.87")
    corrected = await ledger.correct_call("c1", 480)  # 1.04: +0.91, within the bound
    assert corrected.correction == D("0.91")
    assert await ledger.audit() == []
