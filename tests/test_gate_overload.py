"""Graceful overload (issue 21): the budget runs from the PBX's connection, late work
is refused as ``overloaded`` before it touches the ledger, and the gate sockets shed
connections past their bound.

Unit tests drive :class:`agent.gate.overload.Slots` with plain numbers for time
(the clock is whatever the caller passes); the integration tests run both gates
over loopback sockets, through the real Gatekeeper on a SQLite ledger, and check
the ledger afterwards: no call admitted, nothing held, no attempt logged for a
request refused as late.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.calls import CallInfo, Direction, HangupCause
from agent.gate.decision import Decision, Reason
from agent.gate.overload import HEADROOM, Slots, Verdict
from agent.gate.policy import load_policy
from agent.gatekeeper import Gatekeeper
from agent.ledger import Ledger, open_ledger
from agent.meter.clock import WallClock
from agent.pbx.asterisk import AsteriskAdapter, AsteriskSettings
from agent.pbx.freeswitch import FreeswitchAdapter, FreeswitchSettings
from agent.sim import asterisk as sim_asterisk
from agent.sim import freeswitch as sim_freeswitch

FIXTURES = Path(__file__).parent / "fixtures"
POLICY = """version: 1
prepaid: {{fail_mode: {mode}, fail_open_max_seconds: 90}}
defaults:
  calling_hours: [{{days: all, windows: [{{start: '00:00', end: '24:00'}}]}}]
accounts:
  acme: {{name: ACME, caller_ids: ["2001"]}}
"""

# -- the pure core: slots, queue, deadlines -------------------------------------


def test_free_slots_start_then_requests_queue_then_late_ones_are_refused() -> None:
    slots = Slots(2)
    assert slots.arrive(0.0, 0.45) == (Verdict.START, None)
    assert slots.arrive(0.0, 0.45) == (Verdict.START, None)
    verdict, waiter = slots.arrive(0.0, 0.45)
    assert verdict is Verdict.WAIT and waiter is not None and list(slots.waiting) == [waiter]
    # Its deadline already passed when it got to us: refused at once.
    assert slots.arrive(1.0, 0.45) == (Verdict.REFUSE, None)
    assert (slots.busy, slots.refused) == (2, 1)


def test_the_measured_service_time_bounds_the_queue() -> None:
    slots = Slots(2, busy=2, service=0.1)
    # Each round of 2 takes 0.1 s: places 0-1 wait 0.1, 2-3 wait 0.2, ... and each then
    # needs twice the mean (HEADROOM) of ledger time left: a 0.45 s budget admits waits
    # up to 0.25 s (2 rounds).
    verdicts = [slots.arrive(0.0, 0.45)[0] for _ in range(6)]
    assert verdicts == [Verdict.WAIT] * 4 + [Verdict.REFUSE] * 2
    # A longer budget, a longer queue; the bound follows the budget, not a fixed length.
    assert slots.arrive(0.0, 1.0)[0] is Verdict.WAIT


def test_release_hands_the_slot_to_the_oldest_waiter_that_can_still_finish() -> None:
    slots = Slots(1)
    assert slots.arrive(0.0, 10.0)[0] is Verdict.START
    _, late = slots.arrive(0.0, 0.3)
    _, fine = slots.arrive(0.0, 10.0)
    # 0.25 s of ledger work: the first waiter's 0.3 s deadline cannot take another 0.25.
    started, refused = slots.release(0.25, 0.25)
    assert (started, refused) == ([fine], [late])
    assert (slots.busy, slots.service, slots.refused) == (1, 0.25, 1)
    slots.release(0.35, 0.05)  # the mean moves toward the newest time
    assert slots.busy == 0 and 0.05 < slots.service < 0.25


def test_a_stale_mean_never_keeps_a_free_slot_idle() -> None:
    # One slow moment left a mean longer than the budget; with nothing in flight the
    # next request still runs (or the mean could never come down again).
    slots = Slots(4, service=2.0)
    assert slots.arrive(100.0, 100.45)[0] is Verdict.START
    started, refused = slots.release(100.01, 0.01)
    assert (started, refused) == ([], [])
    assert slots.service < 2.0


def test_a_waiter_gives_up_in_time_to_be_answered_and_leaves_the_queue() -> None:
    slots = Slots(1, busy=1, service=0.1)
    _, waiter = slots.arrive(0.0, 0.45)
    assert waiter is not None
    assert slots.give_up_at(waiter) == pytest.approx(0.45 - HEADROOM * 0.1)
    slots.leave(waiter)
    slots.leave(waiter)  # twice (timed out after being passed over): counted once
    assert not slots.waiting and slots.refused == 1
    assert slots.release(0.4, None) == ([], [])  # handed back unused: the mean stays
    assert (slots.busy, slots.service) == (0, 0.1)


def test_slots_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Slots(0)


@given(st.lists(st.tuples(st.sampled_from(["arrive", "release", "leave"]),
                          st.floats(0, 1), st.floats(0, 1)), max_size=60),
       st.integers(1, 4))
def test_slots_never_overbook_and_account_for_every_request(
        ops: list[tuple[str, float, float]], n: int) -> None:
    slots = Slots(n)
    now = 0.0
    started = queued = refused = 0
    for op, dt, budget in ops:
        now += dt
        if op == "arrive":
            verdict, _ = slots.arrive(now, now + budget)
            started += verdict is Verdict.START
            queued += verdict is Verdict.WAIT
            refused += verdict is Verdict.REFUSE
        elif op == "release" and slots.busy:
            more, passed = slots.release(now, dt)
            started += len(more)
            queued -= len(more) + len(passed)
            refused += len(passed)
        elif op == "leave" and slots.waiting:
            slots.leave(slots.waiting[0])
            queued -= 1
            refused += 1
        assert 0 <= slots.busy <= n
        assert len(slots.waiting) == queued
        assert slots.refused == refused
        assert slots.busy <= started
        assert all(w.deadline > now - 2 for w in slots.waiting)


# -- the gatekeeper on a real ledger --------------------------------------------


class SlowLedger:
    """The SQLite ledger, with account reads that wait until ``open`` is set."""

    def __init__(self, inner: Ledger) -> None:
        self.inner = inner
        self.open = asyncio.Event()
        self.reads = 0

    async def account_state(self, account: str, **kw: Any) -> Any:
        self.reads += 1
        await self.open.wait()
        return await self.inner.account_state(account, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextlib.asynccontextmanager
async def gatekeeper(tmp_path: Path, mode: str = "closed", *, slow: bool = False,
                     **kw: Any) -> AsyncIterator[tuple[Gatekeeper, Ledger]]:
    (tmp_path / "policy.yaml").write_text(POLICY.format(mode=mode))
    policy = load_policy(tmp_path / "policy.yaml")
    ledger = await open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    await ledger.topup("acme", Decimal("100"), ref="t", at=datetime.now(UTC))
    used: Any = SlowLedger(ledger) if slow else ledger
    try:
        yield Gatekeeper(ledger=used, policy=lambda: policy, clock=WallClock(), node="t",
                         **kw), ledger
    finally:
        if slow:
            used.open.set()
        await ledger.close()


async def untouched(ledger: Ledger) -> None:
    """Nothing admitted, held, charged or counted: the refusals never reached it."""
    assert await ledger.live_calls() == []
    (balance,) = [b for b in await ledger.balances() if b.account == "acme"]
    assert (balance.posted, balance.held) == (Decimal("100"), Decimal(0))
    assert await ledger.attempts("acme", datetime.now(UTC) - timedelta(hours=1)) == []
    assert await ledger.audit() == []


def late_call(call_id: str, *, late_by: float) -> CallInfo:
    arrived = asyncio.get_running_loop().time() - late_by
    return CallInfo(call_id, Direction.OUTBOUND, "2001", "13800138000", "acme",
                    received_at=arrived)


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_a_request_past_its_budget_is_answered_at_once_by_the_fail_mode(
        tmp_path: Path, mode: str) -> None:
    async with gatekeeper(tmp_path, mode, budget=0.45) as (gate, ledger):
        decision = await gate(late_call("late-1", late_by=0.5))
        assert decision.reason is Reason.OVERLOADED and decision.account == "acme"
        if mode == "closed":
            assert not decision.allow and decision.max_seconds is None
            assert decision.hangup_cause is HangupCause.NORMAL_TEMPORARY_FAILURE
            assert "overloaded" in decision.message and "fail closed" in decision.message
        else:  # allowed unmetered for fail_open_max_seconds, as when the ledger is down
            assert decision.allow and decision.max_seconds == 90
            assert "fails open" in decision.message
        await untouched(ledger)
        # In time, the same call is decided through the ledger as ever.
        ok = await gate(late_call("on-time", late_by=0.0))
        assert (ok.allow, ok.reason) == (True, Reason.ALLOWED)


async def test_queued_requests_give_up_within_their_budget_and_never_hold(
        tmp_path: Path) -> None:
    async with gatekeeper(tmp_path, slow=True, budget=0.3, slots=1) as (gate, ledger):
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.ensure_future(gate(late_call("in-the-slot", late_by=0.0)))
        await asyncio.sleep(0)
        queued = [asyncio.ensure_future(gate(late_call(f"queued-{i}", late_by=0.0)))
                  for i in range(3)]
        async with asyncio.timeout(5):
            answers = await asyncio.gather(first, *queued)
        took = loop.time() - started
        assert [d.reason for d in answers] == [Reason.LEDGER_UNAVAILABLE] + [
            Reason.OVERLOADED] * 3
        assert not any(d.allow for d in answers)
        assert took < 0.3 + 0.25  # every one answered by its deadline (plus loop slack)
        assert gate.ledger.reads == 1  # type: ignore[attr-defined]
        assert (gate.slots.busy, len(gate.slots.waiting)) == (0, 0)
        await untouched(ledger)


async def test_a_cancelled_waiter_leaves_the_queue_and_its_slot_goes_on(
        tmp_path: Path) -> None:
    async with gatekeeper(tmp_path, slow=True, budget=5.0, slots=1) as (gate, ledger):
        first = asyncio.ensure_future(gate(late_call("first", late_by=0.0)))
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(gate(late_call("gone", late_by=0.0)))
        last = asyncio.ensure_future(gate(late_call("last", late_by=0.0)))
        await asyncio.sleep(0.01)
        assert len(gate.slots.waiting) == 2
        gone.cancel()
        await asyncio.sleep(0)
        assert len(gate.slots.waiting) == 1
        gate.ledger.open.set()  # type: ignore[attr-defined]
        async with asyncio.timeout(5):
            a, b = await asyncio.gather(first, last)
        assert (a.allow, b.allow) == (True, True)
        assert (gate.slots.busy, len(gate.slots.waiting)) == (0, 0)
        assert sorted(c.call_id for c in await ledger.live_calls()) == ["first", "last"]


# -- both gates over real sockets -------------------------------------------------


def agi_request() -> bytes:
    out = b""
    for chunk in sim_asterisk.read_trace(FIXTURES / "asterisk" / "06-fastagi-deny.agi.txt"):
        if chunk.direction == "<<<":
            out += chunk.payload
            if chunk.payload == b"\n":
                return out
    raise AssertionError("no request in the trace")


async def agi_exchange(address: tuple[str, int], request: bytes) -> dict[str, str]:
    """Asterisk's side of one FastAGI session: the variables the gate set ({}: it
    closed or reset the socket having set none: AGI() fails, the dialplan refuses)."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(request)
        got: dict[str, str] = {}
        while True:
            try:
                line = await reader.readline()
            except ConnectionResetError:  # shed with the request unread: a reset
                assert not got
                return got
            if not line:
                break
            words = line.decode().split()
            if words[:2] == ["SET", "VARIABLE"]:
                got[words[2]] = words[3].strip('"')
            writer.write(b"200 result=1\n")
        return got
    finally:
        writer.close()


def esl_reply() -> bytes:
    trace = sim_freeswitch.read_trace(
        FIXTURES / "freeswitch" / "06a-outbound-socket-reject.esl.txt")
    return next(c.data for c in trace if c.conn == "outbound" and c.direction == "RECV")


async def esl_exchange(address: tuple[str, int], reply: bytes) -> dict[str, str]:
    """FreeSWITCH's side of one outbound-socket session: the variables the gate set."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        got: dict[str, str] = {}
        buf = b""
        while True:
            while b"\n\n" not in buf:
                data = await reader.read(65536)
                if not data:
                    return got
                buf += data
            block, buf = buf.split(b"\n\n", 1)
            if block.startswith(b"connect"):
                writer.write(reply)
            elif block.startswith(b"exit"):
                return got
            else:
                for line in block.decode().splitlines():
                    if line.startswith("execute-app-arg: callgate_"):
                        name, _, value = line.split(": ", 1)[1].partition("=")
                        got[name] = value
                writer.write(b"Content-Type: command/reply\nReply-Text: +OK\n\n")
    finally:
        writer.close()


def loop_blocked_first(gate: Callable[[CallInfo], Awaitable[Decision]],
                       seconds: float) -> Callable[[CallInfo], Awaitable[Decision]]:
    """The gate, reached only after the event loop was busy ``seconds`` with other
    work since the connection arrived (what overload does to every request)."""

    async def blocked(call: CallInfo) -> Decision:
        time.sleep(seconds)  # blocks the loop, as other calls' work would
        return await gate(call)

    return blocked


@contextlib.asynccontextmanager
async def fastagi(gate: Callable[[CallInfo], Awaitable[Decision]],
                  **kw: Any) -> AsyncIterator[AsteriskAdapter]:
    async with sim_asterisk.AsteriskSimulator("callgate", "s") as sim:
        settings = AsteriskSettings(ami_port=sim.ami_address[1], secret="s",
                                    fastagi_listen=("127.0.0.1", 0), decision_budget=0.5, **kw)
        adapter = AsteriskAdapter(settings, gate, lambda e: None)
        task = asyncio.create_task(adapter.run())
        try:
            await adapter.wait_connected(5)
            yield adapter
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def esl(gate: Callable[[CallInfo], Awaitable[Decision]]) -> AsyncIterator[
        FreeswitchAdapter]:
    async with sim_freeswitch.FreeswitchSimulator("s") as sim:
        adapter = FreeswitchAdapter(
            FreeswitchSettings(esl_port=sim.esl_address[1], password="s",
                               outbound_listen=("127.0.0.1", 0), decision_budget=0.5),
            gate, lambda e: None)
        task = asyncio.create_task(adapter.run())
        try:
            async with asyncio.timeout(5):
                await adapter.wait_listening()
            yield adapter
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_fastagi_late_request_is_refused_at_once_and_holds_nothing(
        tmp_path: Path) -> None:
    async with gatekeeper(tmp_path, budget=0.4) as (gate, ledger), \
            fastagi(loop_blocked_first(gate, 0.45)) as adapter:
        assert adapter.fastagi_address is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(5):
            got = await agi_exchange(adapter.fastagi_address, agi_request())
        took = loop.time() - started
        assert got == {"CALLGATE_MAX_SECONDS": "0", "CALLGATE_REASON": "overloaded",
                       "CALLGATE_RESULT": "DENY"}
        assert took < 0.45 + 0.3  # the blocked loop, then an answer at once
        await untouched(ledger)


async def test_esl_late_request_is_refused_at_once_and_holds_nothing(tmp_path: Path) -> None:
    async with gatekeeper(tmp_path, budget=0.4) as (gate, ledger), \
            esl(loop_blocked_first(gate, 0.45)) as adapter:
        assert adapter.outbound_address is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(5):
            got = await esl_exchange(adapter.outbound_address, esl_reply())
        took = loop.time() - started
        assert got == {"callgate_result": "DENY", "callgate_reason": "overloaded",
                       "callgate_max_seconds": ""}
        assert took < 0.45 + 0.3
        await untouched(ledger)


async def test_fastagi_requests_beyond_the_slots_are_answered_within_the_budget(
        tmp_path: Path) -> None:
    # The ledger hangs: one request holds the only slot until its deadline
    # (ledger_unavailable), the others are refused as overloaded, all in budget.
    async with gatekeeper(tmp_path, slow=True, budget=0.4, slots=1) as (gate, ledger), \
            fastagi(gate) as adapter:
        assert adapter.fastagi_address is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(5):
            answers = await asyncio.gather(*(agi_exchange(adapter.fastagi_address,
                                                          agi_request()) for _ in range(4)))
        took = loop.time() - started
        reasons = sorted(a["CALLGATE_REASON"] for a in answers)
        assert reasons == ["ledger_unavailable"] + ["overloaded"] * 3
        assert {a["CALLGATE_RESULT"] for a in answers} == {"DENY"}
        assert took < 0.5 + 0.3
        await untouched(ledger)


async def test_connections_past_the_bound_are_closed_unread_and_service_goes_on() -> None:
    async def allow(call: CallInfo) -> Decision:
        return Decision(True, Reason.ALLOWED, "ok", account="acme", max_seconds=60)

    async with fastagi(allow, gate_max_pending=1, fastagi_read_timeout=5.0) as adapter:
        assert adapter.fastagi_address is not None and adapter.listener is not None
        silent = await asyncio.open_connection(*adapter.fastagi_address)  # holds the one place
        async with asyncio.timeout(5):
            while adapter.listener.pending < 1:
                await asyncio.sleep(0.01)
            shed = await agi_exchange(adapter.fastagi_address, agi_request())
            assert shed == {}  # closed unread: the dialplan's DENY stands
            assert adapter.listener.shed == 1
            silent[1].close()
            while adapter.listener.pending:
                await asyncio.sleep(0.01)
            served = await agi_exchange(adapter.fastagi_address, agi_request())
        assert served["CALLGATE_RESULT"] == "ALLOW"
