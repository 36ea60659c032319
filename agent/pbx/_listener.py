"""The gate's listening socket, with a bound on the connections in flight.

Both gates (FastAGI, the ESL outbound socket) serve one connection per call.
Under overload the event loop falls behind, the kernel's accept queue fills and
overflows, and the PBX's connection attempts are dropped and retried a second
later or more: far past the decision budget, with no answer at all. So past a
bound on the connections in flight a new one is closed at once, unread:
accepting and closing it costs a few tens of microseconds where reading and
answering it costs a few hundred, and the loop keeps up with the accept queue.

The bound is sized from the decision budget by Little's law: the gate answers
``rate`` connections a second (measured, refusals included), so ``rate x
budget`` connections in flight are answered within the budget on average; more
only make every one of them later (each needs several turns of the loop, and a
turn grows with the connections in it). The rate measured includes the peer's
own turns, so a slow PBX lowers the bound too: its calls would be late anyway.
(Half the budget was tried: bench/gate_esl.py --overload then shed so much that
2x the saturation rate served 0.33x of it, RESULTS.md session 7.) It never
falls below ``MIN_PENDING`` (a burst after a quiet spell is served while the
rate is measured) nor exceeds ``max_pending``.

The count does not see the kernel's accept queue. A loop with more work than
CPU accepts late, and the connections wait there unseen: offered twice its
saturation, the ESL gate pinned to one core held at most 231 connections (under
the bound) while up to ~940 waited in the accept queue, and every call was
answered with a p99 of 2.5 to 5.7x the budget, none refused (RESULTS.md,
session 8). So each connection's age is read when it is accepted: the kernel
stamps the handshake's last ACK, and ``TCP_INFO`` gives the milliseconds since
(:func:`queue_age`). A connection that already spent ``AGE_SHARE`` of the budget
in the queue is shed, and the decision budget of one that is served runs from
its arrival in the queue, not from the accept (:func:`arrived_at`): from the
moment the PBX connected, as issue 21 asks. (Only once late connections have
kept coming for ``LATE_SPELL`` of the budget: a burst behind one stall is not
overload.) Shedding the oldest drains the queue at the cost of an accept and a
reset each, and the calls behind them are served while they still can be.

Both checks run before any StreamReader, StreamWriter or Task exists: the
count in the protocol factory, the age in ``connection_made``; a shed
connection is reset (``abort``) and costs no log line of its own.

A connection closed unread is refused by the shipped dialplans, which dial
only when the gate set ``ALLOW`` (``CALLGATE_RESULT`` / ``callgate_result``
stays ``DENY``, no reason set); it is counted and logged here (one warning a
second), since it never reaches the gatekeeper. Below the bound every
connection is read and answered, and the gatekeeper's own deadline refuses
late ones as ``overloaded`` (agent/gate/overload.py).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import weakref
from collections.abc import Awaitable, Callable
from typing import cast

import structlog

log = structlog.get_logger("callgate.gate")

DEFAULT_MAX_PENDING = 1024
"""The bound's ceiling, whatever the measured rate: 2,000 calls/s x 0.5 s."""

MIN_PENDING = 256
"""The bound's floor. Silent and garbage peers count as in flight until their
read timeout, and must never shed real calls: tests/test_hostile.py holds 200
hostile connections open while real calls go through (with a floor of 32 those
calls waited for the silent peers to time out). At the rates this machine
measures (under 600 calls/s x 0.5 s) the floor is the bound."""

AGE_SHARE = 0.5
"""A connection that waited in the accept queue longer than this share of the decision
budget (250 ms of 0.5 s) is shed at accept: under overload the queue is where the
budget goes, and one that old would be served late or refused by the gatekeeper
(``overloaded``) after the full cost of reading it. Half, not less: a burst on a
busy machine (tests/test_asterisk_adapter.py places 200 calls at once) queues
for a moment without being overload, and the served calls still have half the
budget for their decision (under 100 ms at 5x the saturation, session 8)."""

LATE_SPELL = 0.5
"""Late connections are shed only once they have kept coming for this share of the
budget (250 ms of 0.5 s): a standing queue, overload, and not a burst queued
behind one stall of the loop. tests/test_asterisk_adapter.py places 200 calls at
once from a simulator in the gate's own loop: up to ~100 of them are accepted
250 to 360 ms old, over up to ~150 ms, and are served (the gatekeeper's
deadline, counted from each one's arrival, still holds for them). The late
state ends when a connection is accepted younger than half the limit: the
queue has drained; or when none came late for a whole budget: the overload
stopped with its last late ones, and a burst after the quiet spell is a new one."""

BACKLOG = 4096
"""The listening socket's accept queue (the kernel caps it at net.core.somaxconn,
4096 by default since Linux 5.4). A full queue drops the PBX's SYN, which it
resends 1 s later: far past the budget. Deep is safe since the age check sheds
what waited too long, so the depth never becomes wait: offered 5x its saturation
with 1024 the ESL gate's p99 was 2.3x the budget, from those retransmits."""

RATE_WINDOW = 1.0  # seconds over which answered connections are counted
SHED_LOG_EVERY = 1.0  # seconds: shed connections are summed into one warning per second

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def tcp_info_option(platform: str) -> int | None:
    """The TCP_INFO option where its times are read as milliseconds (Linux); None
    elsewhere, where no age is read. FreeBSD has TCP_INFO and the same layout, but
    its tcpi_last_data_recv counts microseconds: a 1 ms wait would read as 1 s."""
    return getattr(socket, "TCP_INFO", None) if platform.startswith("linux") else None


_TCP_INFO = tcp_info_option(sys.platform)
_TCP_INFO_TIMES = struct.Struct("8x13I")  # struct tcp_info up to tcpi_last_ack_recv


def queue_age(transport: asyncio.BaseTransport) -> float:
    """Seconds since the kernel last heard from this just-accepted connection's peer:
    its handshake's final ACK (the ESL peer sends nothing first) or its request (a
    FastAGI peer writes at once), so, at accept, about the time it waited in the
    accept queue. Millisecond resolution (the younger of ``tcpi_last_ack_recv`` and
    ``tcpi_last_data_recv``: kernels before 4.11 report the latter from 0, i.e. hours,
    on a connection that has received no data); 0.0 where TCP_INFO cannot be read."""
    sock = transport.get_extra_info("socket")
    if sock is None or _TCP_INFO is None:
        return 0.0
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_TIMES.size)
        times = _TCP_INFO_TIMES.unpack_from(raw)
    except (OSError, struct.error):
        return 0.0
    return float(min(times[11], times[12])) / 1000  # last_data_recv, last_ack_recv (ms)


class _Reader(asyncio.StreamReader):
    arrived: float | None = None  # loop time the connection reached the accept queue


def arrived_at(reader: asyncio.StreamReader) -> float:
    """Loop time the PBX's connection arrived (in the kernel's accept queue), for a
    reader the listener made; otherwise now."""
    arrived = getattr(reader, "arrived", None)
    return asyncio.get_running_loop().time() if arrived is None else float(arrived)


class _Counted(asyncio.StreamReaderProtocol):
    """A served connection, in ``live`` from creation until its connection is lost."""

    def __init__(self, reader: asyncio.StreamReader, handler: Handler,
                 listener: GateListener) -> None:
        super().__init__(reader, handler)
        self._listener = listener
        listener._live.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener._done(self)
        super().connection_lost(exc)


class _Gate(asyncio.Protocol):
    """A connection under the count bound, until ``connection_made`` reads its age:
    reset if it is already too old (:data:`AGE_SHARE`), else handed to its served
    protocol (``transport.set_protocol``), which only then gets its stream, writer
    and task, and takes every later callback directly."""

    __slots__ = ("_listener",)

    def __init__(self, listener: GateListener) -> None:
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listener = self._listener
        loop = asyncio.get_running_loop()
        age = queue_age(transport)
        if listener.too_late(age, loop.time()):
            # uvloop's transports are not asyncio.Transport subclasses; both abort().
            cast(asyncio.Transport, transport).abort()
            listener._shed("late", age)
            return
        reader = _Reader(limit=listener.limit, loop=loop)
        reader.arrived = loop.time() - age
        served = _Counted(reader, listener.handler, listener)
        transport.set_protocol(served)
        served.connection_made(transport)


class _Shed(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both abort().
        cast(asyncio.Transport, transport).abort()


class GateListener:
    """A protocol factory for ``loop.create_server``: serves with ``handler`` (as
    ``asyncio.start_server`` would) up to ``max_pending`` connections at once,
    and sheds the rest."""

    def __init__(self, handler: Handler, *, limit: int, max_pending: int,
                 budget: float) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending}")
        self.handler = handler
        self.limit = limit
        self.max_pending = max_pending
        self.budget = budget
        # Weak: a protocol whose transport could not be made is dropped, never leaked.
        self._live: weakref.WeakSet[_Counted] = weakref.WeakSet()
        self.shed = 0  # connections closed unread, since start
        self.shed_late = 0  # of which: waited longer than age_limit in the accept queue
        self.age_limit = AGE_SHARE * budget
        self.late_spell = LATE_SPELL * budget
        self._late_since: float | None = None  # loop time late connections began (too_late)
        self._late_last = 0.0  # loop time of the last late connection (too_late)
        self._oldest = 0.0  # the oldest shed for its age since the last gate.shed warning
        self.rate = 0.0  # connections answered per second, over the last RATE_WINDOW
        self._answered = 0
        self._window = 0.0
        self._unlogged = 0
        self._logged = 0.0

    @property
    def pending(self) -> int:
        """Connections accepted and not yet closed."""
        return len(self._live)

    @property
    def bound(self) -> int:
        """Connections in flight past which new ones are shed (see the module docstring)."""
        return min(self.max_pending, max(MIN_PENDING, int(self.rate * self.budget)))

    def _done(self, protocol: _Counted) -> None:
        self._live.discard(protocol)
        now = asyncio.get_running_loop().time()
        self._answered += 1
        if now - self._window >= RATE_WINDOW:
            self.rate = self._answered / (now - self._window) if self._window else 0.0
            self._window, self._answered = now, 0

    def too_late(self, age: float, now: float) -> bool:
        """Whether a connection accepted ``age`` seconds after it arrived is shed (see
        AGE_SHARE and LATE_SPELL); updates the late state."""
        if age <= self.age_limit:
            if age < self.age_limit / 2:
                self._late_since = None
            return False
        if self._late_since is None or now - self._late_last > self.budget:
            # A first late one, or the first after a whole budget without any: the
            # queue that made the last ones is gone (a standing queue makes them
            # continually), so this is a new spell, not the old one's tail.
            self._late_since = now
        self._late_last = now
        return now - self._late_since >= self.late_spell

    def _shed(self, why: str, age: float = 0.0) -> None:
        self.shed += 1
        if why == "late":
            self.shed_late += 1
            self._oldest = max(self._oldest, age)
        self._unlogged += 1
        now = asyncio.get_running_loop().time()
        if now - self._logged >= SHED_LOG_EVERY:
            log.warning("gate.shed", connections=self._unlogged, pending=len(self._live),
                        bound=self.bound, late=self.shed_late,
                        oldest_ms=round(self._oldest * 1000), answered_per_s=round(self.rate, 1))
            self._logged, self._unlogged, self._oldest = now, 0, 0.0

    def __call__(self) -> asyncio.Protocol:
        if len(self._live) >= self.bound:
            self._shed("pending")
            return _Shed()
        return _Gate(self)
