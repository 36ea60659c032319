"""The FastAGI gate over real loopback sockets, against raw clients and the simulator.

Covers the panoramisk failure modes (issue 5) against our server: a silent
client does not freeze the others, the async ``HANGUP`` line does not put
replies out of step, a UTF-8 name split across TCP reads arrives whole; plus
the decision budget, half and garbage requests, and fail-closed dialplan.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest
from structlog.testing import capture_logs

from agent.calls import CallEvent, CallInfo, Direction
from agent.gate.decision import Decision, Reason
from agent.pbx.asterisk import AsteriskAdapter, AsteriskSettings
from agent.sim.asterisk import AsteriskSimulator, SimChannel

SECRET = "test-secret"
ALLOW = Decision(True, Reason.ALLOWED, "ok", account="acme", max_seconds=120)


class Gate:
    """A gate function that records its calls; ``answer`` may be a coroutine."""

    def __init__(self, answer: Decision | Callable[[CallInfo], Awaitable[Decision]]) -> None:
        self.answer = answer
        self.calls: list[CallInfo] = []

    async def __call__(self, call: CallInfo) -> Decision:
        self.calls.append(call)
        if isinstance(self.answer, Decision):
            return self.answer
        return await self.answer(call)


@contextlib.asynccontextmanager
async def adapter_with_sim(
    gate: Gate, **overrides: object
) -> AsyncIterator[tuple[AsteriskAdapter, AsteriskSimulator, list[CallEvent]]]:
    async with AsteriskSimulator("callgate", SECRET, auth_fail_delay=0.05) as sim:
        settings = AsteriskSettings(
            ami_port=sim.ami_address[1], secret=SECRET, fastagi_listen=("127.0.0.1", 0),
            cdr_wait=0.3,
        )  # fmt: skip
        settings = replace(settings, **overrides)  # type: ignore[arg-type]
        events: list[CallEvent] = []
        adapter = AsteriskAdapter(settings, gate, events.append)
        task = asyncio.create_task(adapter.run())
        try:
            await adapter.wait_connected(5)
            sim.agi_address = adapter.fastagi_address
            yield adapter, sim, events
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def request_bytes(sim: AsteriskSimulator, name: str = "Alice", uid: str = "1795557357.38") -> bytes:
    ch = SimChannel("SIP/internal-00000026", uid, uid, "2001", name, "from-internal", "1006",
                    accountcode="acme")  # fmt: skip
    return sim.agi_request(ch)


async def fake_asterisk(
    address: tuple[str, int], request: bytes, *, reply: bytes = b"200 result=1\n"
) -> list[str]:
    """Write a request, answer every command with ``reply``; the commands received."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(request)
    commands = []
    while line := await reader.readline():
        commands.append(line.decode())
        writer.write(reply)
    writer.close()
    return commands


async def test_deny_sets_the_three_variables_result_last_and_closes() -> None:
    deny = Decision(False, Reason.OUTSIDE_HOURS, "closed", account="acme")
    async with asyncio.timeout(10), adapter_with_sim(Gate(deny)) as (adapter, sim, _):
        assert adapter.fastagi_address is not None
        commands = await fake_asterisk(adapter.fastagi_address, request_bytes(sim))
    # Reading until EOF returned: the server closed the socket itself (trace 06d).
    assert commands == [
        "SET VARIABLE CALLGATE_MAX_SECONDS 0\n",
        "SET VARIABLE CALLGATE_REASON outside_hours\n",
        "SET VARIABLE CALLGATE_RESULT DENY\n",
    ]


async def test_request_headers_become_the_call_info() -> None:
    gate = Gate(ALLOW)
    async with asyncio.timeout(10), adapter_with_sim(gate) as (adapter, sim, _):
        assert adapter.fastagi_address is not None
        commands = await fake_asterisk(adapter.fastagi_address, request_bytes(sim))
    assert commands[0] == "SET VARIABLE CALLGATE_MAX_SECONDS 120\n"
    assert commands[-1] == "SET VARIABLE CALLGATE_RESULT ALLOW\n"
    assert gate.calls == [CallInfo(
        call_id="1795557357.38", direction=Direction.OUTBOUND, caller_id="2001",
        destination="1006", accountcode="acme", endpoint="SIP/internal-00000026",
        context="from-internal", caller_name="Alice",
    )]  # fmt: skip


async def test_a_failed_reply_stops_before_result_is_set() -> None:
    async with asyncio.timeout(10), adapter_with_sim(Gate(ALLOW)) as (adapter, sim, _):
        assert adapter.fastagi_address is not None
        commands = await fake_asterisk(
            adapter.fastagi_address, request_bytes(sim), reply=b"200 result=0\n"
        )
    assert len(commands) == 1 and "CALLGATE_RESULT" not in commands[0]


async def test_silent_clients_do_not_block_other_calls() -> None:
    # panoramisk: one connection that sends nothing froze the whole loop.
    async with (
        asyncio.timeout(10),
        adapter_with_sim(Gate(ALLOW), fastagi_read_timeout=30.0) as (adapter, sim, _),
    ):
        address = adapter.fastagi_address
        assert address is not None
        silent = [await asyncio.open_connection(*address) for _ in range(20)]
        half = await asyncio.open_connection(*address)
        half[1].write(request_bytes(sim)[:40])  # a request cut short, left hanging
        results = await asyncio.gather(
            *(fake_asterisk(address, request_bytes(sim, uid=f"1.{i}")) for i in range(10))
        )
        assert all(r[-1] == "SET VARIABLE CALLGATE_RESULT ALLOW\n" for r in results)
        for _, writer in [*silent, half]:
            writer.close()


async def test_silent_client_is_closed_after_the_read_timeout() -> None:
    gate = Gate(ALLOW)
    async with asyncio.timeout(10), adapter_with_sim(gate, fastagi_read_timeout=0.2) as (
        adapter, _, _,
    ):  # fmt: skip
        assert adapter.fastagi_address is not None
        reader, writer = await asyncio.open_connection(*adapter.fastagi_address)
        assert await reader.read() == b""  # closed by the server, nothing sent
        writer.close()
    assert gate.calls == []


async def test_half_request_then_eof_decides_nothing() -> None:
    gate = Gate(ALLOW)
    async with asyncio.timeout(10), adapter_with_sim(gate) as (adapter, sim, _):
        assert adapter.fastagi_address is not None
        reader, writer = await asyncio.open_connection(*adapter.fastagi_address)
        writer.write(request_bytes(sim)[:-1])  # no final empty line
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
    assert gate.calls == []


@pytest.mark.parametrize("garbage", [b"\x16\x03\x01\x02\x00" * 50, b"GET / HTTP/1.1\r\n\r\n",
                                     b"agi_x: " + b"A" * 20000])  # fmt: skip
async def test_garbage_and_oversize_requests_are_closed_undecided(garbage: bytes) -> None:
    gate = Gate(ALLOW)
    with capture_logs() as logs:
        async with asyncio.timeout(10), adapter_with_sim(gate) as (adapter, _, _):
            assert adapter.fastagi_address is not None
            reader, writer = await asyncio.open_connection(*adapter.fastagi_address)
            writer.write(garbage)
            assert await reader.read() == b""
            writer.close()
    assert gate.calls == []
    assert "fastagi.bad_request" in [entry["event"] for entry in logs]
    assert "fastagi.handler_failed" not in [entry["event"] for entry in logs]


async def test_async_hangup_line_does_not_desync_the_replies() -> None:
    # panoramisk took the unsolicited HANGUP for the next command's reply.
    async with asyncio.timeout(10), adapter_with_sim(Gate(ALLOW)) as (adapter, sim, _):
        assert adapter.fastagi_address is not None
        reader, writer = await asyncio.open_connection(*adapter.fastagi_address)
        writer.write(request_bytes(sim))
        first = await reader.readline()
        writer.write(b"200 result=1\nHANGUP\n")  # reply, then the channel hangs up (06d)
        second = await reader.readline()
        writer.write(b"200 result=1\n")
        third = await reader.readline()
        writer.write(b"200 result=1\n")
        assert await reader.read() == b""
        writer.close()
    assert b"CALLGATE_MAX_SECONDS" in first and b"CALLGATE_REASON" in second
    assert third == b"SET VARIABLE CALLGATE_RESULT ALLOW\n"


async def test_utf8_caller_name_split_across_reads() -> None:
    # panoramisk decoded each TCP read alone and lost characters cut in two.
    gate = Gate(ALLOW)
    async with asyncio.timeout(10), adapter_with_sim(gate) as (adapter, sim, _):
        assert adapter.fastagi_address is not None
        raw = request_bytes(sim, name="王小明")
        cut = raw.index("小".encode()) + 2
        reader, writer = await asyncio.open_connection(*adapter.fastagi_address)
        writer.write(raw[:cut])
        await writer.drain()
        await asyncio.sleep(0.05)  # two TCP segments, two reads
        writer.write(raw[cut:])
        while await reader.readline():
            writer.write(b"200 result=1\n")
        writer.close()
    assert [c.caller_name for c in gate.calls] == ["王小明"]


async def test_slow_gate_is_refused_within_the_budget() -> None:
    async def slow(call: CallInfo) -> Decision:
        await asyncio.sleep(30)
        return ALLOW

    async with asyncio.timeout(10), adapter_with_sim(Gate(slow), decision_budget=0.1) as (
        adapter, sim, _,
    ):  # fmt: skip
        assert adapter.fastagi_address is not None
        commands = await fake_asterisk(adapter.fastagi_address, request_bytes(sim))
    assert commands[1:] == [
        "SET VARIABLE CALLGATE_REASON ledger_unavailable\n",
        "SET VARIABLE CALLGATE_RESULT DENY\n",
    ]


async def test_failing_gate_is_refused() -> None:
    async def broken(call: CallInfo) -> Decision:
        raise RuntimeError("database on fire")

    async with asyncio.timeout(10), adapter_with_sim(Gate(broken)) as (adapter, sim, _):
        assert adapter.fastagi_address is not None
        commands = await fake_asterisk(adapter.fastagi_address, request_bytes(sim))
    assert commands[-1] == "SET VARIABLE CALLGATE_RESULT DENY\n"


async def test_simulated_dialplan_allow_dials_and_deny_rejects() -> None:
    decisions = {"13800138000": ALLOW,
                 "95555": Decision(False, Reason.DESTINATION_NOT_ALLOWED, "no")}  # fmt: skip

    async def by_destination(call: CallInfo) -> Decision:
        return decisions[call.destination]

    async with asyncio.timeout(10), adapter_with_sim(Gate(by_destination)) as (_, sim, _):
        allowed = await sim.place_call(destination="13800138000", talk_seconds=0.2)
        denied = await sim.place_call(destination="95555")
        a, d = await allowed.ended(), await denied.ended()
    assert a.answered_at is not None and a.variables["CALLGATE_RESULT"] == "ALLOW"
    assert a.agi_status == "SUCCESS"
    assert (d.ended_by, d.cause, d.answered_at) == ("denied", 21, None)
    assert d.variables["CALLGATE_REASON"] == "destination_not_allowed"


async def test_gate_unreachable_means_refused_with_the_shipped_dialplan() -> None:
    async with asyncio.timeout(10), AsteriskSimulator("callgate", SECRET) as sim:
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        sim.agi_address = probe.sockets[0].getsockname()[:2]
        probe.close()
        await probe.wait_closed()  # nothing listens there now
        call = await sim.place_call(talk_seconds=1)
        result = await call.ended()
    # Trace 06c: AGISTATUS=FAILURE and a DENY-only check would dial; ours refuses.
    assert (result.agi_status, result.ended_by, result.cause) == ("FAILURE", "denied", 21)


async def test_allow_without_a_limit_is_refused_by_the_dialplan() -> None:
    unlimited = Decision(True, Reason.ALLOWED, "ok", account="acme", max_seconds=None)
    async with asyncio.timeout(10), adapter_with_sim(Gate(unlimited)) as (_, sim, _):
        result = await (await sim.place_call(talk_seconds=1)).ended()
    assert result.variables["CALLGATE_MAX_SECONDS"] == ""
    assert result.ended_by == "denied"


async def test_dial_limit_from_max_seconds_ends_the_talk() -> None:
    short = Decision(True, Reason.ALLOWED, "ok", account="acme", max_seconds=1)
    async with asyncio.timeout(10), adapter_with_sim(Gate(short)) as (_, sim, _):
        result = await (await sim.place_call(talk_seconds=None)).ended()
    # TIMEOUT(absolute) counts from the moment the call was allowed (ring included).
    assert result.ended_by == "deadline" and result.by_deadline
    assert result.billsec <= 1


async def test_the_meter_can_extend_the_dialplan_limit_with_absolutetimeout() -> None:
    """The limit is the channel's absolute timeout, so AbsoluteTimeout replaces it.

    Dial's L() would end the call at 1 s whatever the meter does: every call
    would end after its first paid increment.
    """
    from datetime import timedelta

    short = Decision(True, Reason.ALLOWED, "ok", account="acme", max_seconds=1)
    async with asyncio.timeout(10), adapter_with_sim(Gate(short)) as (adapter, sim, _):
        call = await sim.place_call(talk_seconds=None)
        await call.answered.wait()
        await adapter.set_deadline(call.call_id, adapter.clock() + timedelta(seconds=3))
        result = await call.ended()
    assert result.ended_by == "deadline" and 2 <= result.billsec <= 3
