"""The gate sockets' listener under overload (issue 21, session 8): a connection's
wait in the kernel's accept queue is read at accept, counts against its decision
budget, and, once late connections keep coming, sheds them before any stream
exists; an overload refusal writes no log line of its own.

The late arrivals are made by blocking the event loop (``time.sleep``) while a
plain socket connects: the kernel completes the handshake and queues the
connection, and the gate accepts it when the loop runs again, as it would on a
loop with more work than CPU.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time
from pathlib import Path

import pytest
import structlog

from agent.calls import CallInfo
from agent.gate.decision import Decision, Reason
from agent.pbx._listener import (
    AGE_SHARE,
    LATE_SPELL,
    GateListener,
    queue_age,
    tcp_info_option,
)
from tests.test_gate_overload import agi_request, fastagi, gatekeeper, late_call, untouched


async def late_exchange(address: tuple[str, int], request: bytes,
                        blocked: float) -> dict[str, str]:
    """Connect and send the FastAGI request while the loop is blocked ``blocked``
    seconds, then play Asterisk's side: the variables the gate set ({}: it reset or
    closed the socket having set none, so the dialplan refuses)."""
    sock = socket.create_connection(address)  # the kernel's handshake; not yet accepted
    sock.sendall(request)
    time.sleep(blocked)  # the gate's loop is busy: the connection waits in the queue
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    got: dict[str, str] = {}
    try:
        while True:
            try:
                line = await reader.readline()
            except ConnectionResetError:
                return got
            if not line:
                return got
            words = line.decode().split()
            if words[:2] == ["SET", "VARIABLE"]:
                got[words[2]] = words[3].strip('"')
            writer.write(b"200 result=1\n")
    finally:
        writer.close()


def test_the_late_state_needs_a_spell_of_late_arrivals_and_ends_when_one_is_fresh() -> None:
    async def unused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise AssertionError("never served here")

    listener = GateListener(unused, limit=1024, max_pending=1024, budget=0.4)
    limit, spell = AGE_SHARE * 0.4, LATE_SPELL * 0.4
    assert not listener.too_late(limit, 10.0)  # at the limit: served
    assert not listener.too_late(limit + 0.01, 10.0)  # late, but the first: a stall?
    assert not listener.too_late(limit + 0.2, 10.0 + spell / 2)
    assert listener.too_late(limit + 0.01, 10.001 + spell)  # late for a whole spell: shed
    assert not listener.too_late(limit * 0.9, 10.001 + spell)  # under the limit: served
    assert listener.too_late(limit + 0.01, 10.002 + spell)  # ... and the queue still stands
    assert not listener.too_late(limit / 4, 11.0)  # a fresh one: the queue drained
    assert not listener.too_late(limit + 0.01, 11.0 + spell / 2)  # a new spell begins



def test_the_late_state_ends_after_a_quiet_spell() -> None:
    """An overload that ends with its last late connections (none accepted fresh
    after them: the load just stopped) leaves no late state behind: a burst behind
    one stall minutes later begins a new spell and is served, not shed at once."""
    async def unused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise AssertionError("never served here")

    listener = GateListener(unused, limit=1024, max_pending=1024, budget=0.4)
    limit, spell = AGE_SHARE * 0.4, LATE_SPELL * 0.4
    assert not listener.too_late(limit + 0.01, 10.0)
    assert listener.too_late(limit + 0.01, 10.001 + spell)  # overload: shed
    # ... the load stops; ten minutes later a burst queues behind one stall:
    assert not listener.too_late(limit + 0.01, 610.0)
    assert not listener.too_late(limit + 0.01, 610.0 + spell / 2)
    assert listener.too_late(limit + 0.01, 610.001 + spell)  # it keeps coming: shed


def test_the_queue_age_is_read_on_linux_only() -> None:
    """Linux's struct tcp_info gives its times in milliseconds; FreeBSD has TCP_INFO
    too, with the same layout, but tcpi_last_data_recv in microseconds: read as
    milliseconds every connection would look 1000x older and be shed once the late
    spell passed. Elsewhere no age is read (0.0: nothing is shed for its age)."""
    assert tcp_info_option("linux") == getattr(socket, "TCP_INFO", None)
    for platform in ("freebsd14", "darwin", "openbsd7", "win32"):
        assert tcp_info_option(platform) is None


@pytest.mark.skipif(tcp_info_option(sys.platform) is None, reason="TCP_INFO is read on Linux")
def test_the_queue_age_is_since_the_peer_was_last_heard() -> None:
    """The younger of tcpi_last_data_recv and tcpi_last_ack_recv: before the 2017 fix
    "tcp: initialize icsk_ack.lrcvtime at session start time" (Linux 4.11; only some
    distribution kernels have it backported) a passive connection that has received
    no data yet, as the ESL gate's, reports tcpi_last_data_recv from a receive time
    of 0, about its jiffies since boot: read as its age, every FreeSWITCH call would
    look hours old, its budget spent before it is read, and be refused or shed."""
    class Sock:
        def __init__(self, data_ms: int, ack_ms: int) -> None:
            self.raw = bytes(8) + struct.pack("13I", *([0] * 11), data_ms, ack_ms)

        def getsockopt(self, level: int, option: int, size: int) -> bytes:
            return self.raw[:size]

    class Transport(asyncio.BaseTransport):
        def __init__(self, sock: Sock) -> None:
            super().__init__()
            self.sock = sock

        def get_extra_info(self, name: str, default: object = None) -> object:
            return self.sock if name == "socket" else default

    assert queue_age(Transport(Sock(3_600_000, 12))) == 0.012  # never received data
    assert queue_age(Transport(Sock(300, 300))) == 0.3  # its request: both the same

async def test_queue_age_is_the_wait_in_the_accept_queue() -> None:
    ages: list[float] = []
    made = asyncio.Event()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            ages.append(queue_age(transport))
            made.set()

    server = await asyncio.get_running_loop().create_server(Probe, "127.0.0.1", 0)
    address = server.sockets[0].getsockname()[:2]
    try:
        fresh = socket.create_connection(address)
        await asyncio.wait_for(made.wait(), 5)
        made.clear()
        queued = socket.create_connection(address)
        time.sleep(0.3)  # the loop cannot accept meanwhile
        await asyncio.wait_for(made.wait(), 5)
    finally:
        server.close()
    fresh.close()
    queued.close()
    assert ages[0] < 0.1
    assert 0.25 <= ages[1] < 1.0


async def test_the_budget_runs_from_the_arrival_in_the_accept_queue(tmp_path: Path) -> None:
    # 0.45 s in the accept queue, gatekeeper budget 0.4: refused as overloaded before
    # the ledger, although the gate itself answered at once once it accepted.
    async with gatekeeper(tmp_path, budget=0.4) as (gate, ledger), fastagi(gate) as adapter:
        assert adapter.fastagi_address is not None and adapter.listener is not None
        async with asyncio.timeout(5):
            got = await late_exchange(adapter.fastagi_address, agi_request(), 0.45)
        assert got == {"CALLGATE_MAX_SECONDS": "0", "CALLGATE_REASON": "overloaded",
                       "CALLGATE_RESULT": "DENY"}
        assert adapter.listener.shed == 0  # the first late one is served (a stall?)
        await untouched(ledger)


async def test_late_connections_that_keep_coming_are_shed_unread(tmp_path: Path) -> None:
    seen: list[CallInfo] = []

    async def allow(call: CallInfo) -> Decision:
        seen.append(call)
        return Decision(True, Reason.ALLOWED, "ok", account="acme", max_seconds=60)

    async with fastagi(allow) as adapter:  # budget 0.5: late past 0.25 s, for 0.25 s
        address, listener = adapter.fastagi_address, adapter.listener
        assert address is not None and listener is not None
        async with asyncio.timeout(5):
            first = await late_exchange(address, agi_request(), 0.3)
            second = await late_exchange(address, agi_request(), 0.3)
            assert first["CALLGATE_RESULT"] == "ALLOW"  # late, but the spell just began
            assert second == {}  # late 0.3 s after the first: shed, the DENY stands
            assert (listener.shed, listener.shed_late) == (1, 1)
            assert len(seen) == 1  # the shed one never reached the gate
            fresh = await late_exchange(address, agi_request(), 0.0)
        assert fresh["CALLGATE_RESULT"] == "ALLOW"  # and a fresh one ends the spell
        assert listener.too_late(listener.age_limit + 0.01, 0.0) is False


async def test_an_overload_refusal_logs_no_line_of_its_own(tmp_path: Path) -> None:
    async with gatekeeper(tmp_path, budget=0.45) as (gate, ledger):
        with structlog.testing.capture_logs() as logs:
            for i in range(5):
                decision = await gate(late_call(f"late-{i}", late_by=0.5))
                assert decision.reason is Reason.OVERLOADED and not decision.allow
        events = [entry["event"] for entry in logs]
        assert "gate.decision" not in events
        assert events == ["gate.overloaded"]  # summed: one warning a second
        await untouched(ledger)
