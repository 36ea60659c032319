"""The FreeSWITCH adapter against the simulator over real loopback sockets.

Every test is bounded (``asyncio.timeout``) and uses ephemeral ports. Durations
are a few hundred ms; the assertions are about what happened (causes, billsec,
which deadline fired), never about how fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
from agent.pbx.freeswitch import EslAuthError, FreeswitchAdapter, FreeswitchSettings
from agent.sim.freeswitch import FreeswitchSimulator

PASSWORD = "not-ClueCon-4711"


async def allow_all(call: CallInfo) -> Decision:
    return Decision(True, Reason.ALLOWED, "ok", account="acme", max_seconds=60)


@dataclass
class Rig:
    sim: FreeswitchSimulator
    adapter: FreeswitchAdapter
    events: list[CallEvent] = field(default_factory=list)
    asked: list[CallInfo] = field(default_factory=list)

    def of(self, kind: type, call_id: str | None = None) -> list:
        return [e for e in self.events if isinstance(e, kind)
                and (call_id is None or getattr(e, "call_id", None) == call_id)]

    async def until(self, pred: Callable[[], bool], timeout: float = 3.0) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                await asyncio.sleep(0.01)


@asynccontextmanager
async def rig(gate: Callable[[CallInfo], Awaitable[Decision]] = allow_all, *,
              inline_gate: bool = True, **settings: object) -> AsyncIterator[Rig]:
    async with FreeswitchSimulator(PASSWORD, show_channels_lag=1.0) as sim:
        events: list[CallEvent] = []
        asked: list[CallInfo] = []

        async def recording_gate(call: CallInfo) -> Decision:
            asked.append(call)
            return await gate(call)

        opts: dict[str, object] = dict(esl_port=sim.esl_address[1], password=PASSWORD,
                                       outbound_listen=("127.0.0.1", 0) if inline_gate else None,
                                       reconnect_min=0.05, reconnect_max=0.2)
        opts.update(settings)
        adapter = FreeswitchAdapter(FreeswitchSettings(**opts),  # type: ignore[arg-type]
                                    recording_gate, events.append)
        task = asyncio.create_task(adapter.run())
        try:
            async with asyncio.timeout(3):
                await adapter.wait_connected()
                if inline_gate:
                    await adapter.wait_listening()
            sim.outbound_address = adapter.outbound_address
            yield Rig(sim, adapter, events, asked)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


async def test_answered_call_gives_answer_and_end_with_billsec() -> None:
    async with asyncio.timeout(10), rig() as r:
        h = await r.sim.place_call("2001", "15550101", talk_seconds=1.2)
        result = await h.ended()
        await r.until(lambda: bool(r.of(CallEnded, h.call_id)))
        # 1.2 s of talk: billsec 1 or 2, FreeSWITCH's whole-epoch-second difference
        assert result.bridged and result.cause == "NORMAL_CLEARING" and result.billsec in (1, 2)
        # no CHANNEL_CREATE without watch-only contexts: nothing reads it
        assert r.of(CallRequested) == []
        (ans,) = r.of(CallAnswered, h.call_id)
        (end,) = r.of(CallEnded, h.call_id)
        assert ans.answered_at == result.answered_at
        assert ans.call.accountcode == "acme" and ans.call.direction is Direction.OUTBOUND
        assert (end.billsec, end.cause, end.cause_code) == (result.billsec, "NORMAL_CLEARING", 16)
        assert end.answered_at == result.answered_at and end.ended_at == result.ended_at
        assert r.asked[0].call_id == h.call_id and r.asked[0].destination == "15550101"
        assert r.events.index(ans) < r.events.index(end)


@pytest.mark.parametrize(("outcome", "cause"), [("busy", "USER_BUSY"),
                                                ("noanswer", "NORMAL_CLEARING")])
async def test_unanswered_calls_end_without_answer(outcome: str, cause: str) -> None:
    async with asyncio.timeout(10), rig() as r:
        h = await r.sim.place_call(outcome=outcome)  # type: ignore[arg-type]
        await h.ended()
        await r.until(lambda: bool(r.of(CallEnded, h.call_id)))
        (end,) = r.of(CallEnded, h.call_id)
        assert (end.cause, end.billsec, end.answered_at) == (cause, 0, None)
        assert r.of(CallAnswered, h.call_id) == []


async def test_callee_hangup() -> None:
    async with asyncio.timeout(10), rig() as r:
        h = await r.sim.place_call(talk_seconds=0.3, hangup_by="callee")
        await h.ended()
        await r.until(lambda: bool(r.of(CallEnded, h.call_id)))
        assert r.of(CallEnded, h.call_id)[0].cause == "NORMAL_CLEARING"


async def test_set_deadline_replaces_the_previous_one_without_a_gap() -> None:
    async with asyncio.timeout(15), rig() as r:
        h = await r.sim.place_call(talk_seconds=None)
        await r.until(lambda: bool(r.of(CallAnswered, h.call_id)))
        clock = r.adapter.clock
        first = clock() + timedelta(seconds=2)
        # the first step replaces the dialplan's sched_hangup (+60) ...
        await r.adapter.set_deadline(h.call_id, first)
        # ... and a later deadline replaces the earlier one
        second = clock() + timedelta(seconds=4.5)
        await r.adapter.set_deadline(h.call_id, second)
        result = await h.ended()
        assert result.by_deadline and result.cause == "ALLOTTED_TIMEOUT"
        assert first < result.ended_at <= second  # outlived the first, never past the second
        steps = [c for c in r.sim.api_log if c.startswith(("sched_api", "sched_del"))]
        assert steps[0].startswith("sched_api +")
        assert steps[0].endswith(f" callgate_{h.call_id}_1 uuid_kill {h.call_id} ALLOTTED_TIMEOUT")
        assert steps[1] == f"sched_del {h.call_id}"  # the dialplan's sched_hangup group
        assert f" callgate_{h.call_id}_2 uuid_kill " in steps[2]
        assert steps[3] == f"sched_del callgate_{h.call_id}_1"
        await r.until(lambda: bool(r.of(CallEnded, h.call_id)))
        assert r.of(CallEnded, h.call_id)[0].cause == "ALLOTTED_TIMEOUT"


async def test_the_last_deadline_task_is_deleted_when_the_call_ends() -> None:
    """Left armed, it would fire later at a dead uuid (`-ERR No such channel!`);
    the real FreeSWITCH 1.10.12 showed it in `show tasks` (tests/realpbx)."""
    async with asyncio.timeout(10), rig() as r:
        h = await r.sim.place_call(talk_seconds=1.0)
        await r.until(lambda: bool(r.of(CallAnswered, h.call_id)))
        await r.adapter.set_deadline(h.call_id, r.adapter.clock() + timedelta(seconds=30))
        await h.ended()
        await r.until(lambda: bool(r.of(CallEnded, h.call_id)))
        await r.until(lambda: not [g for g, _, _ in r.sim._sched.values()
                                   if h.call_id in g])
        assert f"sched_del callgate_{h.call_id}_1" in r.sim.api_log


async def test_an_earlier_deadline_also_replaces_and_a_near_one_kills_now() -> None:
    async with asyncio.timeout(15), rig() as r:
        h = await r.sim.place_call(talk_seconds=None)
        await r.until(lambda: bool(r.of(CallAnswered, h.call_id)))
        now = r.adapter.clock()
        await r.adapter.set_deadline(h.call_id, now + timedelta(seconds=30))
        soon = now + timedelta(seconds=2)
        await r.adapter.set_deadline(h.call_id, soon)
        result = await h.ended()
        assert result.cause == "ALLOTTED_TIMEOUT" and result.ended_at <= soon
        h2 = await r.sim.place_call(talk_seconds=None)
        await r.until(lambda: bool(r.of(CallAnswered, h2.call_id)))
        near = r.adapter.clock() + timedelta(seconds=0.4)
        await r.adapter.set_deadline(h2.call_id, near)
        result = await h2.ended()
        assert result.cause == "ALLOTTED_TIMEOUT" and result.ended_at <= near


@settings(max_examples=300, deadline=None)
@given(now=st.floats(1.7e9, 1.8e9), span=st.floats(0.0, 200.0),
       delay=st.floats(0.0, 0.25), poll_phase=st.floats(0.0, 0.5))
def test_deadline_rounding_is_never_late_for_freeswitchs_scheduler(
        now: float, span: float, delay: float, poll_phase: float) -> None:
    """Model switch_scheduler.c: FreeSWITCH adds the task ``delay`` after our
    clock read (at most SEND_MARGIN) with runtime = its epoch second + N; a
    thread polling every 0.5 s (any phase) runs it at the first poll at or
    after both that second and the moment it was added."""
    from datetime import UTC, datetime

    from agent.pbx.freeswitch import SCHEDULER_POLL, deadline_seconds

    n = deadline_seconds(datetime.fromtimestamp(now, UTC),
                         datetime.fromtimestamp(now + span, UTC))
    if n < 1:
        assert span < 2.5  # set_deadline kills at once: only when `at` is that close
        return
    added = now + delay
    due = max(int(added) + n, added)
    polls_before = math.ceil((due - poll_phase) / SCHEDULER_POLL)
    fired = poll_phase + polls_before * SCHEDULER_POLL
    assert due <= fired <= now + span + 1e-6  # never after `at`
    assert now + span - fired < 2.5  # and not absurdly early


async def test_hangup_and_call_gone() -> None:
    async with asyncio.timeout(10), rig() as r:
        h = await r.sim.place_call(talk_seconds=None)
        await r.until(lambda: bool(r.of(CallAnswered, h.call_id)))
        await r.adapter.hangup(h.call_id, HangupCause.NORMAL_CLEARING)
        assert (await h.ended()).cause == "NORMAL_CLEARING"
        with pytest.raises(CallGone):
            await r.adapter.hangup(h.call_id, HangupCause.NORMAL_CLEARING)
        assert (await r.adapter.bgapi(f"uuid_kill {h.call_id}")) == "-ERR No such channel!\n"


async def test_the_agents_cut_off_is_told_apart_from_the_pbx_deadline() -> None:
    """Both end with ALLOTTED_TIMEOUT; only a scheduled task counts as the deadline."""
    async with asyncio.timeout(10), rig() as r:
        h = await r.sim.place_call(talk_seconds=None)
        await r.until(lambda: bool(r.of(CallAnswered, h.call_id)))
        await r.adapter.hangup(h.call_id, HangupCause.ALLOTTED_TIMEOUT)
        result = await h.ended()
        assert result.cause == "ALLOTTED_TIMEOUT" and not result.by_deadline


async def test_reconnect_lists_live_calls_not_the_recently_dead() -> None:
    async with asyncio.timeout(15), rig() as r:
        live = await r.sim.place_call(talk_seconds=None)
        gone = await r.sim.place_call(talk_seconds=None)
        await r.until(lambda: bool(r.of(CallAnswered, live.call_id))
                      and bool(r.of(CallAnswered, gone.call_id)))
        r.sim.drop_esl_connections()
        await r.until(lambda: bool(r.of(PbxDisconnected)))
        # the call ends while the link is down; `show channels` still lists it
        r.sim.hangup(r.sim.channels[gone.call_id], "NORMAL_CLEARING")
        await r.until(lambda: len(r.of(PbxConnected)) == 2)
        (_, again) = r.of(PbxConnected)
        assert [c.call.call_id for c in again.calls] == [live.call_id]
        listed = again.calls[0]
        assert listed.answered_at == (r.of(CallAnswered, live.call_id)[0].answered_at)
        assert listed.call.accountcode == "acme"
        # a command that was in flight is not replayed: the next one works
        await r.adapter.hangup(live.call_id, HangupCause.NORMAL_CLEARING)
        await live.ended()


async def test_pbx_restart_with_calls_gone() -> None:
    async with asyncio.timeout(15), rig() as r:
        h = await r.sim.place_call(talk_seconds=None)
        await r.until(lambda: bool(r.of(CallAnswered, h.call_id)))
        assert [c.call.call_id for c in await r.adapter.active_calls()] == [h.call_id]
        await r.sim.restart()
        await r.until(lambda: len(r.of(PbxConnected)) == 2)
        assert r.of(PbxConnected)[-1].calls == ()
        assert r.adapter.connected


async def test_commands_while_disconnected_raise() -> None:
    async with asyncio.timeout(10), rig() as r:
        await r.sim.stop()  # the PBX is gone and does not come back
        await r.until(lambda: not r.adapter.connected)
        with pytest.raises(PbxError):
            await r.adapter.hangup("any", HangupCause.NORMAL_CLEARING)


async def test_wrong_password_is_a_clear_error() -> None:
    async with asyncio.timeout(5), FreeswitchSimulator(PASSWORD) as sim:
        adapter = FreeswitchAdapter(
            FreeswitchSettings(esl_port=sim.esl_address[1], password="ClueCon",
                               outbound_listen=None), allow_all, lambda e: None)
        with pytest.raises(EslAuthError, match=r"refused the ESL password \(-ERR invalid\)"):
            await adapter.run()


async def test_gate_deny_hangs_up_with_the_cause_and_sets_variables() -> None:
    async def deny(call: CallInfo) -> Decision:
        return Decision(False, Reason.OUTSIDE_HOURS, "closed", account="acme")

    async with asyncio.timeout(10), rig(deny) as r:
        h = await r.sim.place_call(destination="15550199")
        result = await h.ended()
        assert (result.cause, result.bridged, result.gate_result) == (
            "OUTGOING_CALL_BARRED", False, "DENY")
        assert h.a_leg.variables["callgate_reason"] == "outside_hours"
        await r.until(lambda: bool(r.of(CallEnded, h.call_id)))
        assert r.of(CallEnded, h.call_id)[0].cause_code == 52


async def test_gate_allow_bridges_with_the_pbx_side_limit() -> None:
    async def short(call: CallInfo) -> Decision:
        return Decision(True, Reason.ALLOWED, "ok", account="acme", max_seconds=1)

    async with asyncio.timeout(10), rig(short) as r:
        h = await r.sim.place_call(talk_seconds=None)
        result = await h.ended()  # nobody hangs up: the dialplan's sched_hangup does
        assert result.bridged and result.gate_result == "ALLOW"
        assert result.cause == "ALLOTTED_TIMEOUT" and result.billsec <= 1
        assert h.a_leg.variables["callgate_max_seconds"] == "1"


async def test_fails_closed_when_the_gate_is_down() -> None:
    """06e: with nothing listening, the obvious dialplan bridges. Ours refuses."""
    with socket.socket() as s:  # a port that is certainly closed
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()
    async with asyncio.timeout(10), FreeswitchSimulator(PASSWORD, dead) as sim:
        result = await (await sim.place_call(talk_seconds=1)).ended()
        assert (result.cause, result.bridged, result.gate_result) == (
            "CALL_REJECTED", False, "DENY")
        ungated = await (await sim.place_call(talk_seconds=0.1, gate=False)).ended()
        assert ungated.bridged  # the direct extension, for contrast


@pytest.mark.parametrize("mode", ["slow", "raises"])
async def test_gate_over_budget_or_broken_refuses(mode: str) -> None:
    async def bad(call: CallInfo) -> Decision:
        if mode == "raises":
            raise RuntimeError("ledger exploded")
        await asyncio.sleep(5)
        raise AssertionError("not reached")

    async with asyncio.timeout(10), rig(bad, decision_budget=0.2) as r:
        result = await (await r.sim.place_call()).ended()
        assert (result.cause, result.gate_result) == ("NORMAL_TEMPORARY_FAILURE", "DENY")


async def test_silent_and_garbage_gate_peers_do_not_block_others() -> None:
    async with asyncio.timeout(10), rig() as r:
        assert r.adapter.outbound_address is not None
        silent = await asyncio.open_connection(*r.adapter.outbound_address)
        garbage = await asyncio.open_connection(*r.adapter.outbound_address)
        garbage[1].write(b"\xff" * 70_000 + b"\n\n")
        result = await (await r.sim.place_call(talk_seconds=0.1)).ended()
        assert result.bridged and result.gate_result == "ALLOW"
        assert await asyncio.wait_for(garbage[0].read(), 3) in (b"connect\n\n", b"")
        assert await asyncio.wait_for(silent[0].read(), 3) == b"connect\n\n"  # then closed
        for _, w in (silent, garbage):
            w.close()


async def test_watch_only_kills_refused_new_channels() -> None:
    async def by_destination(call: CallInfo) -> Decision:
        if call.destination.startswith("1555"):
            return Decision(True, Reason.ALLOWED, "ok", max_seconds=60)
        return Decision(False, Reason.DESTINATION_NOT_ALLOWED, "no")

    async with asyncio.timeout(10), rig(by_destination, inline_gate=False,
                                        watch_only_contexts=frozenset({"sales"})) as r:
        refused = await r.sim.place_call(destination="0099", context="sales",
                                         ring_seconds=0.5, gate=False)
        allowed = await r.sim.place_call(destination="15550101", context="sales",
                                         talk_seconds=0.2, gate=False)
        other = await r.sim.place_call(destination="0099", context="default",
                                       talk_seconds=0.2, gate=False)
        assert (await refused.ended()).cause == "OUTGOING_CALL_BARRED"
        assert (await allowed.ended()).bridged and (await other.ended()).bridged
        assert [c.destination for c in r.asked] == ["0099", "15550101"]
        assert all(c.direction is Direction.OUTBOUND for c in r.asked)


async def test_half_open_link_is_detected_by_the_status_ping() -> None:
    async with asyncio.timeout(10), rig(heartbeat_timeout=0.5, dead_after=1.0) as r:
        h = await r.sim.place_call(talk_seconds=None)
        await r.until(lambda: bool(r.of(CallAnswered, h.call_id)))
        r.sim.freeze_esl_connections()
        await r.until(lambda: bool(r.of(PbxDisconnected)), timeout=5)
        assert "api status" in r.of(PbxDisconnected)[0].reason
        assert "no byte" in r.of(PbxDisconnected)[0].reason
        await r.until(lambda: len(r.of(PbxConnected)) == 2, timeout=5)
        assert [c.call.call_id for c in r.of(PbxConnected)[-1].calls] == [h.call_id]


async def test_a_failing_sink_does_not_stop_metering() -> None:
    async with asyncio.timeout(10), rig() as r:
        good = r.adapter.sink

        def flaky(event: CallEvent) -> None:
            if isinstance(event, CallRequested):
                raise RuntimeError("meter bug")
            good(event)

        r.adapter.sink = flaky
        h = await r.sim.place_call(talk_seconds=0.1)
        await h.ended()
        await r.until(lambda: bool(r.of(CallEnded, h.call_id)))
        assert r.adapter.connected


async def test_a_command_in_flight_when_the_link_drops_fails_and_is_not_replayed() -> None:
    async with asyncio.timeout(10), rig() as r:
        h = await r.sim.place_call(talk_seconds=None)
        await r.until(lambda: bool(r.of(CallAnswered, h.call_id)))
        r.sim.freeze_esl_connections()  # the kill is written but never answered
        kill = asyncio.create_task(r.adapter.hangup(h.call_id, HangupCause.NORMAL_CLEARING))
        await asyncio.sleep(0.1)
        r.sim.drop_esl_connections()
        with pytest.raises(PbxError, match="not replayed"):
            await kill
        await r.until(lambda: len(r.of(PbxConnected)) == 2)
        assert h.call_id in r.sim.live_calls()  # nothing re-sent the kill behind our back
        assert [c.call.call_id for c in r.of(PbxConnected)[-1].calls] == [h.call_id]


async def test_many_concurrent_gated_calls() -> None:
    async with asyncio.timeout(30), rig() as r:
        handles = [await r.sim.place_call(f"2{i:03d}", f"1555{i:04d}", talk_seconds=0.5,
                                          ring_seconds=0.1)
                   for i in range(200)]
        results = await asyncio.gather(*(h.ended() for h in handles))
        assert all(x.bridged and x.cause == "NORMAL_CLEARING" for x in results)
        await r.until(lambda: len(r.of(CallEnded)) == 200, timeout=10)
        assert len(r.of(CallAnswered)) == 200 and len(r.asked) == 200
        assert {e.call_id for e in r.of(CallEnded)} == {h.call_id for h in handles}


async def _fake_gate(commands_to_send: bytes) -> tuple[asyncio.Server, tuple[str, int]]:
    """An outbound-socket peer that sends ``connect``, reads the channel data,
    writes ``commands_to_send`` and closes without ``resume`` or ``exit`` (06d)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"connect\n\n")
        buf = b""
        while b"Control: full\n\n" not in buf:
            data = await reader.read(65536)
            if not data:
                break
            buf += data
        writer.write(commands_to_send)
        await writer.drain()
        await asyncio.sleep(0.05)  # let the replies come back, then just close
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[:2]


def _set(var: str) -> bytes:
    return (f"sendmsg\ncall-command: execute\nexecute-app-name: set\n"
            f"execute-app-arg: {var}\n\n").encode()


async def test_the_naive_dialplan_fails_open_and_ours_does_not() -> None:
    """The traces' dialplan (socket, then bridge) bridges when the gate is down
    (06e) or closes without a verdict (06d); config/freeswitch's refuses both."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()
    silent, silent_addr = await _fake_gate(b"")
    allow, allow_addr = await _fake_gate(_set("callgate_result=ALLOW")
                                         + _set("callgate_max_seconds=5"))
    try:
        async with asyncio.timeout(15), FreeswitchSimulator(PASSWORD) as sim:
            outcomes = {}
            for name, addr in (("down", dead), ("silent", silent_addr), ("allow", allow_addr)):
                sim.outbound_address = addr
                for dialplan in ("naive", "callgate"):
                    h = await sim.place_call(talk_seconds=0.1, dialplan=dialplan)  # type: ignore[arg-type]
                    outcomes[name, dialplan] = (await h.ended()).bridged
        assert outcomes == {
            ("down", "naive"): True, ("down", "callgate"): False,
            ("silent", "naive"): True, ("silent", "callgate"): False,
            ("allow", "naive"): True, ("allow", "callgate"): True,  # 06d: ALLOW then close
        }
    finally:
        silent.close()
        allow.close()


def test_billsec_is_the_difference_of_whole_epoch_seconds() -> None:
    """What the real FreeSWITCH 1.10.12 wrote (CDR billsec vs its own µs times, tier):
    not the talk time floored (1.32 s gave 2) nor rounded (2.14 s gave 3)."""
    from agent.sim.freeswitch import fs_billsec
    for answered, ended, billsec in ((1_796_291_000_900_000, 1_796_291_002_220_000, 2),
                                     (1_796_291_000_860_000, 1_796_291_003_000_000, 3),
                                     (1_796_291_000_100_000, 1_796_291_002_640_000, 2),
                                     (0, 1_796_291_002_640_000, 0)):
        assert fs_billsec(answered, ended) == billsec


async def test_emergency_numbers_bypass_the_gate_in_the_shipped_dialplan() -> None:
    """The simulator reads the emergency extension of the shipped 00_callgate.xml."""
    async def refuse(call: CallInfo) -> Decision:
        return Decision(False, Reason.INSUFFICIENT_BALANCE, "no money")

    async with asyncio.timeout(10), rig(refuse) as r:
        emergency = await (await r.sim.place_call(destination="119", talk_seconds=0.3)).ended()
        ordinary = await (await r.sim.place_call(destination="13800138000")).ended()
    assert emergency.bridged and emergency.answered_at is not None
    assert [c.destination for c in r.asked] == ["13800138000"], "119 asked the gate"
    assert not ordinary.bridged


async def test_a_slow_freeswitch_keeps_its_link_and_is_not_relisted() -> None:
    """Commands answered late while events still flow (a drowning PBX): the
    command fails, the link stays, nothing is listed again; the late replies are
    matched to their commands, and the link is up again once replies are timely."""
    async with asyncio.timeout(20), rig(command_timeout=0.2, dead_after=1.5) as r:
        h = await r.sim.place_call(talk_seconds=None)
        await r.until(lambda: bool(r.of(CallAnswered, h.call_id)))
        listings = r.sim.api_log.count("show channels as json")
        r.sim.command_delay = 0.5
        with pytest.raises(PbxError, match="link is kept"):
            await r.adapter.set_deadline(h.call_id, r.adapter.clock() + timedelta(seconds=30))
        assert r.adapter.health.state == "slow" and r.adapter.connected
        loop = asyncio.get_running_loop()
        slow_since = loop.time()
        while loop.time() - slow_since < 2.0:  # past dead_after: only silence counts
            with contextlib.suppress(PbxError):  # the timeout backs off: some get through
                await r.adapter.set_deadline(h.call_id, r.adapter.clock() + timedelta(seconds=30))
        assert r.adapter.connected
        r.adapter.health.state = "slow"  # (a timely reply may have cleared it meanwhile)
        with pytest.raises(PbxError, match="answering late"):
            await r.adapter.active_calls()  # a drowning PBX is not asked for its list
        other = await r.sim.place_call(talk_seconds=0.1)  # events keep flowing
        await r.until(lambda: bool(r.of(CallEnded, other.call_id)), timeout=5)
        r.sim.command_delay = 0.0
        await r.until(lambda: r.adapter.health.state == "up", timeout=5)
        await r.adapter.hangup(h.call_id, HangupCause.NORMAL_CLEARING)  # in order again
        await r.until(lambda: bool(r.of(CallEnded, h.call_id)))
        assert r.of(PbxDisconnected) == [] and len(r.of(PbxConnected)) == 1
        assert r.sim.api_log.count("show channels as json") == listings
        health = r.adapter.health
        assert health.reconnects == 0 and health.command_timeouts >= 1
        assert health.late_replies >= 1


async def test_a_dead_freeswitch_is_reconnected_promptly() -> None:
    """No byte at all while a reply is due: dead after dead_after, then listed anew."""
    async with asyncio.timeout(20), rig(command_timeout=0.2, dead_after=0.6,
                                        heartbeat_timeout=5) as r:
        h = await r.sim.place_call(talk_seconds=None)
        await r.until(lambda: bool(r.of(CallAnswered, h.call_id)))
        r.sim.freeze_esl_connections()
        loop = asyncio.get_running_loop()
        frozen_at = loop.time()
        with pytest.raises(PbxError):
            await r.adapter.hangup(h.call_id, HangupCause.NORMAL_CLEARING)
        await r.until(lambda: len(r.of(PbxConnected)) == 2, timeout=5)
        assert loop.time() - frozen_at < 0.6 + 1.0  # dead_after + the watchdog's step + slack
        assert "no byte" in r.of(PbxDisconnected)[0].reason
        assert r.adapter.health.reconnects == 1 and r.adapter.health.state == "up"
        assert [c.call.call_id for c in r.of(PbxConnected)[-1].calls] == [h.call_id]


async def test_the_slow_and_dead_limits_come_from_agent_yaml(tmp_path: Path) -> None:
    """pbx.command_timeout_seconds / command_timeout_max_seconds / dead_after_seconds
    reach the ESL link: a frozen FreeSWITCH fails a command after 1 s (not 5) and is
    dead after 2 s (not 30)."""
    (tmp_path / "agent.yaml").write_text(
        "node: n1\npbx:\n  kind: freeswitch\n  esl: {password: x}\n"
        "  command_timeout_seconds: 1\n  command_timeout_max_seconds: 4\n"
        "  dead_after_seconds: 2\n")
    s = adapter_settings(load_agent_config(tmp_path / "agent.yaml"))
    assert isinstance(s, FreeswitchSettings)
    async with asyncio.timeout(20), rig(command_timeout=s.command_timeout,
                                        command_timeout_max=s.command_timeout_max,
                                        dead_after=s.dead_after, heartbeat_timeout=5) as r:
        link = r.adapter._link
        assert link is not None and (link.timer.base, link.timer.ceiling) == (1, 4)
        h = await r.sim.place_call(talk_seconds=None)
        await r.until(lambda: bool(r.of(CallAnswered, h.call_id)))
        r.sim.freeze_esl_connections()
        loop = asyncio.get_running_loop()
        frozen_at = loop.time()
        with pytest.raises(PbxError, match="within 1 s"):
            await r.adapter.hangup(h.call_id, HangupCause.NORMAL_CLEARING)
        assert 0.9 <= loop.time() - frozen_at < 1.9
        await r.until(lambda: len(r.of(PbxConnected)) == 2, timeout=6)
        assert 2.0 <= loop.time() - frozen_at < 2.0 + 1.5  # dead_after + the watchdog's step
        assert "no byte from FreeSWITCH for 2 s" in r.of(PbxDisconnected)[0].reason
