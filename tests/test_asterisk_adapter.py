"""The Asterisk adapter's AMI side against the simulator over real loopback sockets.

Metering events with the PBX's figures, commands (AbsoluteTimeout, Hangup),
reconnection with the live calls, a wrong secret, a half-open connection
detected by Ping, and no action replayed after a reconnect (issue 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.calls import (
    CallAnswered,
    CallEnded,
    CallEvent,
    CallGone,
    CallInfo,
    CallRequested,
    Direction,
    HangupCause,
    PbxConnected,
    PbxDisconnected,
    PbxError,
)
from agent.config import load_agent_config
from agent.daemon import adapter_settings
from agent.gate.decision import Decision, Reason
from agent.pbx.asterisk import (
    AmiLoginRefused,
    AsteriskAdapter,
    AsteriskSettings,
    deadline_seconds,
)
from agent.sim.asterisk import SHIPPED_EVENTFILTER, AsteriskSimulator, EventFilter, cdr_billsec

SECRET = "test-secret"
ALLOW = Decision(True, Reason.ALLOWED, "ok", account="acme", max_seconds=600)


async def allow(call: CallInfo) -> Decision:
    return ALLOW


def settings_for(sim: AsteriskSimulator, **overrides: object) -> AsteriskSettings:
    base = AsteriskSettings(
        ami_port=sim.ami_address[1], secret=SECRET, fastagi_listen=("127.0.0.1", 0),
        cdr_wait=0.3, reconnect_min=0.05, reconnect_max=0.2,
    )  # fmt: skip
    return replace(base, **overrides)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(
    sim: AsteriskSimulator, gate: object = allow, **overrides: object
) -> AsyncIterator[tuple[AsteriskAdapter, list[CallEvent]]]:
    events: list[CallEvent] = []
    adapter = AsteriskAdapter(settings_for(sim, **overrides), gate, events.append)  # type: ignore[arg-type]
    task = asyncio.create_task(adapter.run())
    try:
        await adapter.wait_connected(5)
        sim.agi_address = adapter.fastagi_address
        yield adapter, events
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def harness(
    gate: object = allow,
    *,
    sim_options: dict[str, object] | None = None,
    timeout: float = 15.0,
    **overrides: object,
) -> AsyncIterator[tuple[AsteriskSimulator, AsteriskAdapter, list[CallEvent]]]:
    """A simulator and an adapter connected to it, the whole bounded by ``timeout``."""
    async with (
        asyncio.timeout(timeout),
        AsteriskSimulator("callgate", SECRET, **sim_options or {}) as sim,  # type: ignore[arg-type]
        running(sim, gate, **overrides) as (adapter, events),
    ):
        yield sim, adapter, events


async def until(predicate: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


def of(events: list[CallEvent], kind: type, call_id: str | None = None) -> list[Any]:
    return [e for e in events if isinstance(e, kind)
            and (call_id is None or getattr(e, "call_id", None) == call_id)]  # fmt: skip


@pytest.mark.parametrize("cdr", ["before", "after", None])
async def test_answered_call_gives_answer_and_end_with_the_pbx_billsec(cdr: str | None) -> None:
    async with harness(sim_options={"cdr": cdr}) as (sim, _, events):
        call = await sim.place_call(ring_seconds=0.05, talk_seconds=1.3)
        result = await call.ended()
        await until(lambda: of(events, CallEnded))
    assert isinstance(events[0], PbxConnected) and events[0].calls == ()
    (requested,) = of(events, CallRequested)
    (answered,) = of(events, CallAnswered)
    (ended,) = of(events, CallEnded)
    assert requested.call.call_id == answered.call_id == ended.call_id == call.call_id
    assert requested.call.accountcode == "acme" and requested.call.direction is Direction.OUTBOUND
    assert result.answered_at is not None
    assert abs((answered.answered_at - result.answered_at).total_seconds()) < 0.5
    assert (ended.cause, ended.cause_code) == ("NORMAL_CLEARING", 16)
    if cdr is None:  # no cdr_manager: from the times, rounded up (1.3 s -> 2)
        assert ended.billsec == 2
    else:  # the Cdr's truncated BillableSeconds
        assert ended.billsec == result.billsec == 1


@pytest.mark.parametrize("hangup_by", ["caller", "callee"])
async def test_who_hangs_up_does_not_change_the_end(hangup_by: str) -> None:
    async with harness() as (sim, _, events):
        call = await sim.place_call(talk_seconds=None, hangup_by=hangup_by)
        await call.answered.wait()
        call.hangup(hangup_by)
        result = await call.ended()
        await until(lambda: of(events, CallEnded))
    assert result.ended_by == hangup_by
    assert of(events, CallEnded)[0].billsec == 0


@pytest.mark.parametrize(("outcome", "cause"), [("busy", "USER_BUSY"),
                                                ("noanswer", "NORMAL_CLEARING")])  # fmt: skip
async def test_unanswered_calls_end_at_once_with_zero_billsec(outcome: str, cause: str) -> None:
    async with harness(cdr_wait=30.0) as (sim, _, events):
        call = await sim.place_call(outcome=outcome, dial_timeout=0.2, gate=False)
        await call.ended()
        await until(lambda: of(events, CallEnded))  # long before cdr_wait
    assert of(events, CallAnswered) == []
    (ended,) = of(events, CallEnded)
    assert (ended.billsec, ended.cause, ended.answered_at) == (0, cause, None)


async def test_set_deadline_makes_the_pbx_end_the_call() -> None:
    async with harness() as (sim, adapter, events):
        call = await sim.place_call(talk_seconds=None)
        await call.answered.wait()
        await until(lambda: of(events, CallAnswered))
        # A far deadline, then a nearer one: the later action replaces it.
        now = datetime.now(UTC)
        await adapter.set_deadline(call.call_id, now + timedelta(seconds=60))
        await adapter.set_deadline(call.call_id, now + timedelta(seconds=1.9))
        result = await call.ended()
    timeouts = [a for a in sim.actions if a.name == "AbsoluteTimeout"]
    assert [a.get("Timeout") for a in timeouts] == ["59", "1"]  # rounded down
    assert result.ended_by == "deadline" and result.by_deadline


async def test_a_deadline_already_due_hangs_up_instead() -> None:
    async with harness() as (sim, adapter, events):
        call = await sim.place_call(talk_seconds=None)
        await until(lambda: of(events, CallAnswered))
        await adapter.set_deadline(call.call_id, datetime.now(UTC) + timedelta(seconds=0.5))
        result = await call.ended()
    # "Timeout: 0" would be refused and keep the old deadline (DESIGN.md facts).
    assert [a.name for a in sim.actions if a.name in ("AbsoluteTimeout", "Hangup")] == ["Hangup"]
    assert result.ended_by == "ami" and result.cause == 16


def test_deadline_seconds_never_later_than_the_deadline() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert deadline_seconds(now + timedelta(seconds=60.999), now) == 60
    assert deadline_seconds(now + timedelta(seconds=0.2), now) == 0
    assert deadline_seconds(now - timedelta(seconds=3), now) == -3


async def test_hangup_with_cause_and_call_gone_afterwards() -> None:
    async with harness() as (sim, adapter, events):
        call = await sim.place_call(talk_seconds=None)
        await until(lambda: of(events, CallAnswered))
        await adapter.hangup(call.call_id, HangupCause.OUTGOING_CALL_BARRED)
        result = await call.ended()
        await until(lambda: of(events, CallEnded))
        with pytest.raises(CallGone):
            await adapter.hangup(call.call_id, HangupCause.NORMAL_CLEARING)
        with pytest.raises(CallGone):
            await adapter.set_deadline("no-such-call", datetime.now(UTC))
    assert (result.ended_by, result.cause) == ("ami", 52)
    assert of(events, CallEnded)[0].cause_code == 52
    hangups = [a for a in sim.actions if a.name == "Hangup"]
    assert [a.get("Cause") for a in hangups] == ["52"]


async def test_allotted_timeout_is_sent_as_normal_clearing() -> None:
    async with harness() as (sim, adapter, events):
        call = await sim.place_call(talk_seconds=None)
        await until(lambda: of(events, CallAnswered))
        await adapter.hangup(call.call_id, HangupCause.ALLOTTED_TIMEOUT)
        assert (await call.ended()).cause == 16


async def test_pbx_says_no_such_channel_is_call_gone() -> None:
    async with harness() as (sim, adapter, events):
        call = await sim.place_call(talk_seconds=None)
        await until(lambda: of(events, CallAnswered))
        sim._channels.pop(call.channel)  # gone on the PBX, the event not yet seen
        with pytest.raises(CallGone, match="No such channel"):
            await adapter.hangup(call.call_id, HangupCause.NORMAL_CLEARING)


async def test_reconnect_lists_the_live_calls_before_any_event() -> None:
    async with harness() as (sim, adapter, events):
        call = await sim.place_call(talk_seconds=None)
        ringing = await sim.place_call(ring_seconds=30, talk_seconds=None)
        await until(lambda: of(events, CallAnswered))
        answered_at = of(events, CallAnswered)[0].answered_at
        sim.drop_ami_connections()
        await until(lambda: adapter.sessions == 2)
        assert adapter.connected
        call.hangup("caller")  # ended after the reconnect: seen and metered
        await until(lambda: of(events, CallEnded))
        listed = [e for e in events if isinstance(e, PbxConnected)][1]
        assert of(events, PbxDisconnected)
        assert {c.call.call_id for c in listed.calls} == {call.call_id, ringing.call_id}
        by_id = {c.call.call_id: c for c in listed.calls}
        answered = by_id[call.call_id].answered_at
        assert answered is not None  # from Getvar CDR(answer,u)
        assert abs((answered - answered_at).total_seconds()) < 0.01
        assert by_id[ringing.call_id].answered_at is None
        assert by_id[call.call_id].call.accountcode == "acme"
        assert sorted(c.call.call_id for c in await adapter.active_calls()) == [
            ringing.call_id]  # fmt: skip
    disconnected = events.index(of(events, PbxDisconnected)[0])
    assert isinstance(events[disconnected + 1], PbxConnected)


async def test_restart_without_calls_reports_an_empty_list() -> None:
    async with harness() as (sim, adapter, events):
        await sim.place_call(talk_seconds=None)
        await until(lambda: of(events, CallAnswered))
        await sim.restart(keep_calls=False)
        await until(lambda: adapter.sessions == 2)
    assert [e.calls for e in events if isinstance(e, PbxConnected)][1] == ()


async def test_commands_while_disconnected_fail_clearly() -> None:
    async with harness(reconnect_min=5.0, reconnect_max=5.0) as (sim, adapter, events):
        call = await sim.place_call(talk_seconds=None)
        await until(lambda: of(events, CallAnswered))
        sim.drop_ami_connections()
        await until(lambda: not adapter.connected)
        with pytest.raises(PbxError, match="not connected"):
            await adapter.hangup(call.call_id, HangupCause.NORMAL_CLEARING)


async def test_wrong_secret_is_a_clear_error_not_a_retry_loop() -> None:
    async with (
        asyncio.timeout(15),
        AsteriskSimulator("callgate", "right", auth_fail_delay=0.05) as sim,
    ):
        adapter = AsteriskAdapter(settings_for(sim, secret="wrong"), allow, lambda e: None)
        refused = r"AMI login refused for user 'callgate'.*Authentication failed"
        with pytest.raises(AmiLoginRefused, match=refused):
            await adapter.run()
    assert sim.logins == 0 and len([a for a in sim.actions if a.name == "Login"]) == 1


async def test_nothing_listening_keeps_retrying_with_backoff() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    settings = AsteriskSettings(ami_port=port, fastagi_listen=None, reconnect_min=0.01,
                                reconnect_max=0.05)  # fmt: skip
    adapter = AsteriskAdapter(settings, allow, lambda e: None)
    task = asyncio.create_task(adapter.run())
    await asyncio.sleep(0.3)
    assert not task.done() and not adapter.connected  # still trying, not crashed
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_half_open_connection_is_detected_by_ping_timeout() -> None:
    # panoramisk's pings never timed out, so a dead link went unnoticed.
    async with harness(ping_interval=0.1, ping_timeout=0.2, dead_after=0.6) as (
            sim, adapter, events):
        sim.stall_ami_connections()  # open, but nothing comes back
        await until(lambda: adapter.sessions == 2)
        call = await sim.place_call(talk_seconds=0.1)
        await call.ended()
        await until(lambda: of(events, CallEnded))
    (lost,) = of(events, PbxDisconnected)
    assert "Pong" in lost.reason and "no byte" in lost.reason


async def test_action_lost_with_the_connection_is_not_replayed() -> None:
    async with harness(ping_interval=60.0) as (sim, adapter, events):
        call = await sim.place_call(talk_seconds=None)
        await until(lambda: of(events, CallAnswered))
        sim.stall_ami_connections()
        pending = asyncio.create_task(adapter.hangup(call.call_id, HangupCause.NORMAL_CLEARING))
        await asyncio.sleep(0.05)
        sim.drop_ami_connections()
        with pytest.raises(PbxError, match="not retried"):
            await pending
        await until(lambda: adapter.sessions == 2)
        await asyncio.sleep(0.1)
        assert [a.name for a in sim.actions if a.name == "Hangup"] == []
        assert call.result_nowait() is None  # the call is still up
        call.hangup()


async def test_watch_only_context_is_decided_from_events_and_hung_up() -> None:
    refuse = Decision(False, Reason.OUTSIDE_HOURS, "closed", account="acme")
    seen: list[CallInfo] = []

    async def gate(call: CallInfo) -> Decision:
        seen.append(call)
        return refuse if call.destination == "1001" else ALLOW

    watch = frozenset({"from-internal-noagi"})
    async with harness(gate, watch_only_contexts=watch) as (sim, _, _events):
        refused = await sim.place_call(destination="1001", gate=False, ring_seconds=0.5,
                                       talk_seconds=5)  # fmt: skip
        allowed = await sim.place_call(destination="1002", gate=False, talk_seconds=0.2)
        r, a = await refused.ended(), await allowed.ended()
    assert (r.ended_by, r.cause, r.answered_at) == ("ami", 52, None)
    assert a.ended_by == "caller"
    assert {c.destination for c in seen} == {"1001", "1002"}
    assert all(c.accountcode == "acme" and c.direction is Direction.OUTBOUND for c in seen)


async def test_inbound_context_is_not_outbound() -> None:
    async with harness(outbound_contexts=frozenset({"from-internal"})) as (sim, _, events):
        call = await sim.place_call(context="from-trunk", accountcode="", gate=False,
                                    talk_seconds=0.1)  # fmt: skip
        await call.ended()
        await until(lambda: of(events, CallEnded))
    assert of(events, CallRequested)[0].call.direction is Direction.INBOUND


async def test_many_concurrent_gated_calls() -> None:
    async with harness(timeout=30) as (sim, _, events):
        calls = [await sim.place_call(caller=str(2000 + i), talk_seconds=0.5)
                 for i in range(200)]  # fmt: skip
        results = await asyncio.gather(*(c.ended() for c in calls))
        await until(lambda: len(of(events, CallEnded)) == 200)
    assert all(r.ended_by == "caller" for r in results)
    assert len({e.call_id for e in of(events, CallAnswered)}) == 200


def test_sim_billsec_follows_asterisk_rounding() -> None:
    assert cdr_billsec(None, 10.0) == 0
    assert cdr_billsec(100.0, 160.999) == 60  # truncated by default
    assert cdr_billsec(100.0, 160.499, initiatedseconds=True) == 60
    assert cdr_billsec(100.0, 160.5, initiatedseconds=True) == 61


async def test_a_failing_sink_does_not_stop_the_event_stream() -> None:
    seen: list[CallEvent] = []

    def sink(event: CallEvent) -> None:
        seen.append(event)
        if isinstance(event, CallRequested):
            raise RuntimeError("meter bug")

    async with asyncio.timeout(15), AsteriskSimulator("callgate", SECRET) as sim:
        adapter = AsteriskAdapter(settings_for(sim), allow, sink)
        task = asyncio.create_task(adapter.run())
        await adapter.wait_connected(5)
        sim.agi_address = adapter.fastagi_address
        await (await sim.place_call(talk_seconds=0.1)).ended()
        await until(lambda: of(seen, CallEnded))
        assert adapter.connected and adapter.sessions == 1
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_with_timestampevents_times_are_the_pbx_clock_not_ours() -> None:
    skewed = datetime(2001, 1, 1, tzinfo=UTC)  # the agent's clock, far off
    events: list[CallEvent] = []
    async with asyncio.timeout(15), AsteriskSimulator("callgate", SECRET,
                                                      timestampevents=True) as sim:  # fmt: skip
        adapter = AsteriskAdapter(settings_for(sim), allow, events.append, clock=lambda: skewed)
        task = asyncio.create_task(adapter.run())
        await adapter.wait_connected(5)
        sim.agi_address = adapter.fastagi_address
        result = await (await sim.place_call(talk_seconds=0.2)).ended()
        await until(lambda: of(events, CallEnded))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    (answered,) = of(events, CallAnswered)
    (ended,) = of(events, CallEnded)
    assert result.answered_at is not None
    assert abs((answered.answered_at - result.answered_at).total_seconds()) < 0.05
    assert abs((ended.ended_at - result.ended_at).total_seconds()) < 0.05


def test_the_simulator_ships_the_eventfilter_of_manager_conf() -> None:
    text = (Path(__file__).parent.parent / "config" / "asterisk" / "manager.conf").read_text()
    assert re.findall(r"^eventfilter = (.*)$", text, re.M) == [SHIPPED_EVENTFILTER]


def test_eventfilter_allows_then_blocks_as_asterisk_does() -> None:
    shipped = EventFilter([SHIPPED_EVENTFILTER])
    assert shipped.passes(b"Event: Hangup\r\nPrivilege: call,all\r\n\r\n")
    assert shipped.passes(b"Event: HangupRequest\r\nPrivilege: call,all\r\n\r\n")
    assert not shipped.passes(b"Event: SoftHangupRequest\r\nPrivilege: call,all\r\n\r\n")
    assert not shipped.passes(b"Event: HangupHandlerPush\r\nPrivilege: dialplan,all\r\n\r\n")
    assert not shipped.passes(b"Event: Newstate\r\nChannel: Hangup\r\n\r\n")  # anchored
    both = EventFilter(["^Event: (Hangup|Cdr)\r", "!Channel: Local/"])
    assert both.passes(b"Event: Cdr\r\nChannel: PJSIP/a\r\n\r\n")
    assert not both.passes(b"Event: Cdr\r\nChannel: Local/a\r\n\r\n")
    assert EventFilter([]).passes(b"Event: VarSet\r\n\r\n")
    assert not EventFilter(["!^Event: VarSet"]).passes(b"Event: VarSet\r\n\r\n")


@pytest.mark.parametrize("cdr", ["before", "after"])
async def test_the_adapter_meters_on_the_shipped_eventfilter_stream(cdr: str) -> None:
    """What a PBX set up by the README sends is enough: gate, answer, end, billsec."""
    options = {"cdr": cdr, "eventfilter": [SHIPPED_EVENTFILTER]}
    async with harness(sim_options=options) as (sim, adapter, events):
        call = await sim.place_call(ring_seconds=0.05, talk_seconds=1.3)
        deadline_call = await sim.place_call(ring_seconds=0.05, talk_seconds=30)
        cut_call = await sim.place_call(ring_seconds=0.05, talk_seconds=30)
        await until(lambda: of(events, CallAnswered, deadline_call.call_id)
                    and of(events, CallAnswered, cut_call.call_id))
        await adapter.set_deadline(deadline_call.call_id,
                                   datetime.now(UTC) + timedelta(seconds=2.5))
        result = await call.ended()
        await until(lambda: of(events, CallEnded, call.call_id))
        await adapter.hangup(cut_call.call_id, HangupCause.NORMAL_CLEARING)
        await deadline_call.ended()
        await until(lambda: len(of(events, CallEnded)) == 3)
    (ended,) = of(events, CallEnded, call.call_id)
    assert [e for e in of(events, CallRequested) if e.call.call_id == call.call_id]
    assert of(events, CallAnswered, call.call_id)
    assert ended.billsec == result.billsec == 1
    sent = {m.name for m in sim.actions}
    assert "AbsoluteTimeout" in sent
    # Who ended each call: the party (its HangupRequest passes the filter), the
    # PBX's deadline and a manager's Hangup (neither raises one, traces 04, 05).
    assert ended.by_party is True
    assert of(events, CallEnded, deadline_call.call_id)[0].by_party is False
    assert of(events, CallEnded, cut_call.call_id)[0].by_party is False


async def test_a_slow_asterisk_keeps_its_link_and_is_not_relisted() -> None:
    """Actions and Pongs answered late while events still flow: actions fail,
    the session stays (no second login, no second CoreShowChannels)."""
    async with harness(ping_interval=0.1, ping_timeout=0.2, dead_after=1.0) as (
            sim, adapter, events):
        call = await sim.place_call(talk_seconds=None)
        await until(lambda: of(events, CallAnswered))
        listings = sum(1 for m in sim.actions if m.name == "CoreShowChannels")
        sim.action_delay = 0.4
        with pytest.raises(PbxError, match="link is kept"):
            await adapter.set_deadline(call.call_id, adapter.clock() + timedelta(seconds=30))
        assert adapter.health.state == "slow" and adapter.connected
        loop = asyncio.get_running_loop()
        slow_since = loop.time()
        while loop.time() - slow_since < 1.5:  # past dead_after: only silence counts
            with contextlib.suppress(PbxError):  # the timeout backs off: some get through
                await adapter.set_deadline(call.call_id, adapter.clock() + timedelta(seconds=30))
        assert adapter.connected
        adapter.health.state = "slow"  # (a timely reply may have cleared it meanwhile)
        with pytest.raises(PbxError, match="answering late"):
            await adapter.active_calls()
        other = await sim.place_call(talk_seconds=0.1)  # events keep flowing
        await until(lambda: of(events, CallEnded, other.call_id))
        sim.action_delay = 0.0
        await until(lambda: adapter.health.state == "up")
        assert of(events, PbxDisconnected) == [] and adapter.sessions == 1
        assert sum(1 for m in sim.actions if m.name == "CoreShowChannels") == listings
        assert adapter.health.reconnects == 0 and adapter.health.command_timeouts >= 3


async def test_a_dead_asterisk_is_reconnected_promptly() -> None:
    async with harness(ping_interval=0.1, ping_timeout=0.2, dead_after=0.5) as (
            sim, adapter, events):
        loop = asyncio.get_running_loop()
        stalled_at = loop.time()
        sim.stall_ami_connections()  # open, but nothing comes back
        await until(lambda: adapter.sessions == 2)
        # the next Ping (0.1) + dead_after (0.5) + a reconnect (0.05..) + slack
        assert loop.time() - stalled_at < 1.5
        assert "no byte" in of(events, PbxDisconnected)[0].reason
        assert adapter.health.reconnects == 1 and adapter.health.state == "up"


async def test_the_slow_and_dead_limits_come_from_agent_yaml(tmp_path: Path) -> None:
    """pbx.command_timeout_seconds / command_timeout_max_seconds / dead_after_seconds
    reach the AMI link: a stalled Asterisk fails an action after 1 s (not 5) and is
    dead after 2 s (not 30)."""
    (tmp_path / "agent.yaml").write_text(
        "node: n1\npbx:\n  kind: asterisk\n  ami: {secret: x}\n"
        "  command_timeout_seconds: 1\n  command_timeout_max_seconds: 4\n"
        "  dead_after_seconds: 2\n")
    s = adapter_settings(load_agent_config(tmp_path / "agent.yaml"))
    assert isinstance(s, AsteriskSettings)
    async with harness(ping_interval=0.1, ping_timeout=s.ping_timeout,
                       command_timeout_max=s.command_timeout_max, dead_after=s.dead_after) as (
            sim, adapter, events):
        assert (adapter._timer.base, adapter._timer.ceiling) == (1, 4)
        call = await sim.place_call(talk_seconds=None)
        await until(lambda: of(events, CallAnswered))
        loop = asyncio.get_running_loop()
        stalled_at = loop.time()
        sim.stall_ami_connections()  # open, but nothing comes back
        with pytest.raises(PbxError, match="within 1 s"):
            await adapter.set_deadline(call.call_id, adapter.clock() + timedelta(seconds=30))
        assert 0.9 <= loop.time() - stalled_at < 1.9
        await until(lambda: adapter.sessions == 2)
        # dead_after (2) after the last byte, + a reconnect (0.05..) + slack
        assert 2.0 <= loop.time() - stalled_at < 2.0 + 1.0
        assert "no byte from Asterisk for 2 s" in of(events, PbxDisconnected)[0].reason
        await adapter.hangup(call.call_id, HangupCause.NORMAL_CLEARING)  # the new link works
        await call.ended()
