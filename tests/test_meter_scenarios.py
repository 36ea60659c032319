"""The meter, one behaviour at a time, on a simulated clock with the real SQLite ledger."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from agent.meter.meter import MeterSettings
from agent.sim.memory import ENDS
from tests.meter_harness import Harness, policy_text

START = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai


@pytest.fixture
async def h(tmp_path):
    harness = await Harness(tmp_path, START).start()
    yield harness
    await harness.stop()


async def balance(h, account="a0"):
    return (await h.ledger.balance(account)).available


async def test_call_is_charged_per_started_increment_while_it_runs(h):
    await h.topup("a0", "10")
    _, call = await h.dial(talk=150, ring=2)
    await h.advance(2 + 56)   # step 2 is reserved 5 s before the first boundary
    record = await h.ledger.get_call(call.info.call_id)
    assert record.steps == 2 and record.paid_seconds == 120 and record.held == Decimal("0.26")
    await h.advance(200)
    cdr = await h.cdr(call.info.call_id)
    assert (cdr.billsec, cdr.billed_seconds, cdr.amount) == (150, 180, Decimal("0.39"))
    assert not cdr.cut_off and call.ended_by == "party"
    assert await balance(h) == Decimal("9.61")
    await h.check_invariants()


async def test_call_is_cut_at_the_end_of_the_last_paid_increment(h):
    await h.topup("a0", "0.26")
    decision, call = await h.dial(talk=600, ring=1)
    assert decision.max_seconds == 60  # the PBX-side limit is what is already paid
    await h.advance(1000)
    cdr = await h.cdr(call.info.call_id)
    assert call.billsec == 120 and call.ended_by == "hangup"  # the meter cut, not the PBX
    assert cdr.cut_off and cdr.amount == Decimal("0.26")
    assert await balance(h) == Decimal("0")
    stages = [p["stage"] for t, p in h.published if t == "cutoff"]
    assert stages == ["planned", "executed"]
    await h.check_invariants()


async def test_topup_during_a_call_extends_it_at_the_next_boundary(h):
    await h.topup("a0", "0.26")
    _, call = await h.dial(talk=200, ring=1)
    await h.advance(100)
    await h.topup("a0", "1.00")
    await h.advance(300)
    cdr = await h.cdr(call.info.call_id)
    assert call.ended_by == "party" and cdr.amount == Decimal("0.52") and not cdr.cut_off
    await h.check_invariants()


async def test_penalty_that_empties_the_balance_ends_calls_at_their_paid_boundary(h):
    await h.topup("a0", "100")
    _, call = await h.dial(talk=3600, ring=1)
    await h.advance(200)  # 4 increments paid by now (t=1..241)
    await h.penalty("a0", "1000")
    await h.advance(600)
    cdr = await h.cdr(call.info.call_id)
    assert call.billsec == 240 and cdr.amount == Decimal("0.52") and cdr.cut_off
    assert await balance(h) == Decimal("100") - Decimal("0.52") - Decimal("1000")
    refused, _ = await h.dial(talk=10)
    assert refused.reason.value == "insufficient_balance"
    await h.check_invariants()


async def test_the_first_unit_is_reserved_at_setup_so_a_second_call_cannot_spend_it(h):
    await h.topup("a0", "0.13")
    first, call1 = await h.dial(talk=30, ring=5)
    assert first.allow and (await h.ledger.balance("a0")).held == Decimal("0.13")
    second, _ = await h.dial(talk=30, ring=6)
    assert not second.allow and second.reason.value == "insufficient_balance"
    await h.advance(120)
    assert call1.billsec == 30 and (await h.cdr(call1.info.call_id)).amount == Decimal("0.13")
    await h.check_invariants()


async def test_unanswered_call_releases_its_setup_reservation(h):
    await h.topup("a0", "1")
    _, call = await h.dial(talk=None, ring=20)
    await h.advance(60)
    cdr = await h.cdr(call.info.call_id)
    assert cdr.amount == 0 and cdr.billsec == 0 and call.cause == "NO_ANSWER"
    assert await balance(h) == Decimal("1")
    await h.check_invariants()


async def test_unseen_call_that_cannot_pay_its_first_unit_is_hung_up_at_once(h):
    await h.topup("a0", "0.13")
    await h.penalty("a0", "0.13")
    _, call = await h.dial(talk=30, ring=1, gated=False)
    await h.advance(60)
    assert call.ended_by == "hangup" and call.billsec == 0
    cdr = await h.cdr(call.info.call_id)
    assert cdr.amount == 0 and cdr.cut_off
    await h.check_invariants()


async def test_duplicate_and_replayed_events_never_charge_twice(h):
    await h.topup("a0", "10")
    _, call = await h.dial(talk=70, ring=1)
    await h.advance(100)
    from agent.calls import CallAnswered, CallEnded
    ended = CallEnded(call.info.call_id, call.ended_at, "NORMAL_CLEARING", billsec=70,
                      answered_at=call.answered_at, call=call.info)
    for _ in range(3):
        h.meter.on_event(CallAnswered(call.info.call_id, call.answered_at, call.info))
        h.meter.on_event(ended)
    await h.advance(100)
    assert await balance(h) == Decimal("9.74")
    await h.check_invariants()


async def test_hangup_before_answer_was_processed_still_charges_exactly(h):
    await h.topup("a0", "10")
    from agent.calls import CallAnswered
    deliver = h.pbx.sink
    # The answer event is lost: the meter first hears of the call at its end.
    h.pbx.sink = lambda e: None if isinstance(e, CallAnswered) else deliver(e)
    _, call = await h.dial(talk=95, ring=1)
    await h.advance(200)
    cdr = await h.cdr(call.info.call_id)
    assert cdr.billsec == 95 and cdr.amount == Decimal("0.26")
    await h.check_invariants()


async def test_window_close_with_cut_ends_calls_at_the_close(tmp_path):
    text = policy_text(extra_defaults="  at_window_end: cut\n").replace(
        '"00:00", end: "24:00"', '"08:00", end: "19:30"')
    start = datetime(2026, 11, 24, 11, 28, 0, tzinfo=UTC)  # 19:28 in Shanghai
    h = await Harness(tmp_path, start, text).start()
    try:
        await h.topup("a0", "100")
        _, call = await h.dial(talk=3600, ring=30)  # answered 19:28:30
        await h.advance(600)
        cdr = await h.cdr(call.info.call_id)
        assert call.billsec == 90  # ended at 19:30:00 exactly
        assert cdr.cut_off and cdr.amount == Decimal("0.26")  # the started increment is paid
        await h.check_invariants()
    finally:
        await h.stop()


async def test_agent_killed_mid_call_pbx_deadline_ends_it_and_restart_settles(h):
    await h.topup("a0", "10")
    _, long_call = await h.dial(talk=3000, ring=1)
    _, short_call = await h.dial(talk=50, ring=1)
    await h.advance(30)
    await h.kill_agent()
    await h.clock.advance(400)  # nobody meters: the PBX deadline (paid + grace) ends the long one
    assert short_call.ended_by == "party" and short_call.billsec == 50
    assert long_call.ended_by == "deadline" and long_call.billsec == 62
    await h.restart_agent()
    await h.advance(10)
    cdr = await h.cdr(long_call.info.call_id)
    assert "ended_while_away" in cdr.flags and cdr.amount == Decimal("0.13")
    short = await h.cdr(short_call.info.call_id)
    assert short.amount == Decimal("0.13") and "ended_while_away" in short.flags
    await h.check_invariants()


async def test_restart_adopts_calls_still_up_and_meters_them_on(h):
    await h.topup("a0", "10")
    _, call = await h.dial(talk=500, ring=1)
    await h.advance(30)
    await h.kill_agent()
    await h.clock.advance(20)
    await h.restart_agent()  # t=51: the call is up; step 2 due at t=56
    await h.advance(1000)
    cdr = await h.cdr(call.info.call_id)
    assert call.ended_by == "party" and cdr.billsec == 500 and cdr.amount == Decimal("1.17")
    await h.check_invariants()


async def test_restart_frees_at_once_a_call_it_did_not_admit_that_ended_meanwhile(h):
    # Allowed (first unit held) and ringing when the agent died; answered and ended
    # while nobody watched. A call admitted before this meter started cannot be newer
    # than the PBX's list at start, so not listed means gone: its hold and its line
    # are freed at once, not once admitted_timeout (30 s) has passed.
    await h.topup("a0", "10")
    _, call = await h.dial(talk=10, ring=5)
    await h.advance(1)
    await h.kill_agent()
    await h.clock.advance(20)
    assert call.ended_by == "party"
    await h.restart_agent()  # t=21: admitted 21 s ago
    # Settled at this simulated instant (the clock does not move); the settle's
    # write may still be on its way to the ledger thread when the meter first
    # looks idle, so wait for its CDR, on the wall clock, for a bounded time.
    async with asyncio.timeout(5):
        while (cdr := await h.cdr(call.info.call_id)) is None:
            await asyncio.sleep(0.01)
    assert h.clock.now() == START + timedelta(seconds=21)
    assert (await h.ledger.balance("a0")).held == 0
    assert await h.ledger.live_calls() == []
    assert "outcome_unknown" in cdr.flags and cdr.amount == 0
    await h.check_invariants()


async def test_unseen_answered_call_is_metered_from_its_elapsed_time(h):
    await h.topup("a0", "10")
    _, call = await h.dial(talk=130, ring=1, gated=False)
    await h.advance(300)
    cdr = await h.cdr(call.info.call_id)
    assert "unseen" in cdr.flags and cdr.amount == Decimal("0.39")
    await h.check_invariants()


async def test_unseen_call_with_policy_cut_is_hung_up(tmp_path):
    h = await Harness(tmp_path, START, settings=MeterSettings(unseen_calls="cut")).start()
    try:
        await h.topup("a0", "10")
        _, call = await h.dial(talk=130, ring=1, gated=False)
        await h.advance(300)
        assert call.ended_by == "hangup" and call.billsec == 0
        await h.check_invariants()
    finally:
        await h.stop()


async def test_pbx_disconnect_loses_the_hangup_and_reconcile_settles(h):
    await h.topup("a0", "10")
    _, call = await h.dial(talk=100, ring=1)
    await h.advance(50)
    h.pbx.disconnect()
    await h.clock.advance(100)  # step 2 cannot extend the PBX deadline: nothing is held
    assert call.ended_by == "deadline" and call.billsec == 62  # the PBX held the line
    h.pbx.reconnect()
    await h.advance(10)
    cdr = await h.cdr(call.info.call_id)  # its hang-up event was lost with the link
    assert cdr is not None and "vanished" in cdr.flags and "pbx_unreachable" in cdr.flags
    assert cdr.amount == Decimal("0.13")  # the paid 60 s; the 2 s of grace are free
    await h.check_invariants()


async def test_reconnect_frees_at_once_a_call_allowed_and_gone_while_the_link_was_down(h):
    # The gate works without the event link: a call is allowed, answered and ended
    # while it is down, and none of its events arrive. At the reconnect it is young
    # (admitted 10 s ago, under admitted_timeout), so the meter lists the PBX again:
    # not listed after the admission means gone. Hold and line are freed at once.
    await h.topup("a0", "10")
    h.pbx.disconnect()
    _, call = await h.dial(talk=5, ring=1)
    await h.clock.advance(10)
    assert call.ended_by == "party"
    h.pbx.reconnect()
    await h.meter.wait_idle()
    assert (await h.ledger.balance("a0")).held == 0
    assert await h.ledger.live_calls() == []
    await h.check_invariants()


async def test_suspending_the_account_ends_calls_at_the_paid_boundary(h, tmp_path):
    await h.topup("a0", "10")
    _, call = await h.dial(talk=1000, ring=1)
    await h.advance(70)
    from agent.gate.policy import load_policy
    path = tmp_path / "p2.yaml"
    path.write_text(policy_text().replace("{name: A0,", "{name: A0, status: suspended,"))
    h.policy = load_policy(path)
    await h.advance(500)
    assert call.billsec == 120 and call.ended_by == "hangup"
    await h.check_invariants()


async def test_warning_hook_fires_before_a_cut_off(tmp_path):
    warned: list[tuple[str, int, datetime]] = []
    h = await Harness(tmp_path, START, settings=MeterSettings(warning_seconds=10)).start()

    async def hook(call_id: str, seconds: int) -> None:
        warned.append((call_id, seconds, h.clock.now()))

    h.meter.warning_hook = hook
    try:
        await h.topup("a0", "0.26")
        _, call = await h.dial(talk=600, ring=1)
        await h.advance(300)
        assert call.billsec == 120 and call.ended_by == "hangup"
        assert [(w[0], w[1]) for w in warned] == [(call.info.call_id, 10)]
        assert (call.answered_at + timedelta(seconds=110)) == warned[0][2]
        await h.check_invariants()
    finally:
        await h.stop()


async def test_a_late_hang_up_event_wins_over_vanished(tmp_path):
    """The adapter may deliver a hang-up seconds after the PBX stopped listing the call
    (Asterisk: waiting for the Cdr; a busy meter: a long queue). It must be settled from
    that event's billsec, not as 'vanished' at the paid amount."""
    import asyncio

    from agent.calls import CallEnded

    h = await Harness(tmp_path, START, settings=MeterSettings(reconcile_interval=1)).start()
    late: list[asyncio.Task[None]] = []

    def delay_ends(event, deliver) -> None:
        if isinstance(event, CallEnded):
            async def later() -> None:
                await h.clock.sleep_until(h.clock.now() + timedelta(seconds=4.5))
                deliver(event)
            late.append(asyncio.ensure_future(later()))
        else:
            deliver(event)

    h.event_filter = delay_ends
    try:
        await h.topup("a0", "10")
        _, call = await h.dial(talk=65, ring=1)
        await h.advance(120)
        cdr = await h.cdr(call.info.call_id)
        assert "vanished" not in cdr.flags, cdr.flags
        assert cdr.billsec == 65 and cdr.amount == Decimal("0.26")
        await h.check_invariants()
    finally:
        await h.stop()


async def test_an_event_that_fails_is_logged_and_metering_goes_on(h, monkeypatch):
    """One bad event costs that event, never the meter's loop (and its log line renders)."""
    from structlog.testing import capture_logs

    handle = h.meter._handle
    failed: list[object] = []

    async def fail_once(event):
        if not failed:
            failed.append(event)
            raise RuntimeError("boom")
        await handle(event)

    monkeypatch.setattr(h.meter, "_handle", fail_once)
    await h.topup("a0", "10")
    # A meter loop that died would leave advance() waiting for it forever.
    async with asyncio.timeout(10):
        with capture_logs() as logs:
            h.pbx.reconnect()  # this PbxConnected is the event that fails
            _, call = await h.dial(talk=30, ring=1)
            await h.advance(60)
    assert failed and [e for e in logs if e["event"] == "meter.event_failed"]
    cdr = await h.cdr(call.info.call_id)
    assert cdr.billsec == 30 and cdr.amount == Decimal("0.13")
    await h.check_invariants()


async def test_a_publisher_that_fails_never_stops_a_cut_off(h):
    """The cut-off is published just before the hang-up: a failing publisher must
    cost the event, not the hang-up (talk beyond the paid time)."""
    from structlog.testing import capture_logs

    class Broken(list):
        def append(self, item):
            raise RuntimeError("publisher bug")

    h.published = Broken()
    await h.topup("a0", "0.26")
    with capture_logs() as logs:
        _, call = await h.dial(talk=600, ring=1)
        await h.advance(1000)
    assert call.billsec == 120 and call.ended_by == "hangup"  # the meter cut, on time
    cdr = await h.cdr(call.info.call_id)
    assert cdr.cut_off and cdr.amount == Decimal("0.26")
    assert {e.get("topic") for e in logs if e["event"] == "meter.publish_failed"} >= {
        "call/start", "cutoff", "call/end"}
    await h.check_invariants()


async def test_every_sleeper_on_a_call_wakes_when_it_ends(h):
    """The call's own task and an absence check may sleep on one call at once;
    its end must wake both at once, not one now and the other at its deadline."""
    from agent.meter.meter import LiveCall
    from agent.rating import Tariff

    live = LiveCall("c-sleepers", "a0", "02100000000", "13800000000",
                    Tariff("std", Decimal("0.13")), START)
    far = h.clock.now() + timedelta(hours=1)
    sleepers = [asyncio.ensure_future(h.meter._sleep_or_end(live, far)) for _ in range(2)]
    await asyncio.sleep(0)
    assert len(live.sleepers) == 2
    live.end(None)
    async with asyncio.timeout(1):  # the simulated clock never moves here
        assert await asyncio.gather(*sleepers) == [True, True]
    assert live.sleepers == set()


async def test_a_sleeping_call_task_cancelled_at_shutdown_stays_cancelled(h):
    from agent.meter.meter import LiveCall
    from agent.rating import Tariff

    live = LiveCall("c-shutdown", "a0", "02100000000", "13800000000",
                    Tariff("std", Decimal("0.13")), START)
    task = asyncio.ensure_future(h.meter._sleep_or_end(live, h.clock.now() + timedelta(hours=1)))
    await asyncio.sleep(0)
    task.cancel()
    live.end(None)  # ended meanwhile: the cancellation still wins
    with pytest.raises(asyncio.CancelledError):
        await task


async def _call_with_a_late_meter(h, *, talk: float, until: float):
    """A call the meter is late for: its first ledger write (the answered status) is
    held back, as by a slow disk, until ``until`` s after dialling, so nothing is
    reserved before the call ends. Returns the PBX's call and the settled CDR."""
    release = asyncio.Event()
    answer_call = h.ledger.answer_call

    async def slow_answer_call(*args, **kwargs):
        await release.wait()
        return await answer_call(*args, **kwargs)

    h.ledger.answer_call = slow_answer_call
    h.clock.settle = None  # the meter is busy on purpose: advance without waiting for it
    _, call = await h.dial(talk=talk, ring=1)
    await h.clock.advance(until)
    release.set()
    h.clock.settle = h.meter.wait_idle
    await h.advance(1)
    return call, await h.cdr(call.info.call_id)


END_STYLES = list(ENDS)


@pytest.mark.parametrize("ends", END_STYLES)
async def test_a_started_increment_the_meter_was_late_for_is_charged(h, ends):
    h.pbx.ends = ends
    await h.topup("a0", "10")
    # The party hangs up 1 s into the increment the meter never held.
    call, cdr = await _call_with_a_late_meter(h, talk=61, until=70)
    assert call.ended_by == "party" and call.billsec == 61
    assert (cdr.billsec, cdr.billed_seconds, cdr.amount) == (61, 120, Decimal("0.26"))
    assert "reserved_at_settle" in cdr.flags and "grace" not in cdr.flags
    assert await balance(h) == Decimal("9.74")
    await h.check_invariants()


async def test_a_late_increment_the_balance_cannot_pay_is_forgiven_inside_the_grace(h):
    await h.topup("a0", "0.13")  # the first unit, held by the gate, and nothing more
    _, cdr = await _call_with_a_late_meter(h, talk=61, until=70)
    assert (cdr.billsec, cdr.amount) == (61, Decimal("0.13")) and "grace" in cdr.flags
    assert await balance(h) == Decimal("0")  # never below zero through a call
    await h.check_invariants()


async def test_talk_past_a_cut_off_inside_the_grace_is_not_billed(h, tmp_path, monkeypatch):
    """A planned cut-off whose hang-up got lost: the party talks on 1 s into the
    grace. The balance could pay another increment, but the meter had refused it."""
    from agent.gate.policy import load_policy

    async def hangup_lost(call_id, cause):
        h.pbx.commands.append(("hangup-lost", call_id))

    monkeypatch.setattr(h.pbx, "hangup", hangup_lost)
    await h.topup("a0", "10")
    _, call = await h.dial(talk=121, ring=1)
    await h.advance(70)  # step 2 held: paid 120 s
    path = tmp_path / "p2.yaml"
    path.write_text(policy_text().replace("{name: A0,", "{name: A0, status: suspended,"))
    h.policy = load_policy(path)
    await h.advance(200)
    assert ("hangup-lost", call.info.call_id) in h.pbx.commands
    assert call.ended_by == "party" and call.billsec == 121
    cdr = await h.cdr(call.info.call_id)
    assert cdr.cut_off and cdr.amount == Decimal("0.26") and "grace" in cdr.flags
    await h.check_invariants()


@pytest.mark.parametrize("ends", ["freeswitch", "asterisk"])
async def test_a_call_the_pbx_deadline_ended_is_not_charged_its_grace(h, ends):
    """The meter was late and the PBX's own deadline (paid + grace) ended the call: it
    was cut, so it is not also charged the increment it never got. FreeSWITCH says
    ALLOTTED_TIMEOUT; Asterisk says cause 16 with no party's HangupRequest."""
    h.pbx.ends = ends
    await h.topup("a0", "10")
    call, cdr = await _call_with_a_late_meter(h, talk=600, until=100)
    assert call.ended_by == "deadline" and call.billsec == 62
    assert cdr.amount == Decimal("0.13") and "grace" in cdr.flags and cdr.cut_off
    assert await balance(h) == Decimal("9.87")
    await h.check_invariants()


async def test_an_asterisk_deadline_end_is_charged_when_the_agent_cannot_tell_it(h):
    """Without HangupRequest events (an older eventfilter) an Asterisk deadline end
    looks like a hang-up: the increment the call started is charged, never lost."""
    h.pbx.ends = "asterisk-unfiltered"
    await h.topup("a0", "10")
    call, cdr = await _call_with_a_late_meter(h, talk=600, until=100)
    assert call.ended_by == "deadline" and call.billsec == 62
    assert cdr.amount == Decimal("0.26") and "reserved_at_settle" in cdr.flags
    assert "grace" not in cdr.flags
    await h.check_invariants()
