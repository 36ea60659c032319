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

A connection closed unread is refused by the shipped dialplans, which dial
only when the gate set ``ALLOW`` (``CALLGATE_RESULT`` / ``callgate_result``
stays ``DENY``, no reason set); it is counted and logged here (one warning a
second), since it never reaches the gatekeeper. Below the bound every
connection is read and answered, and the gatekeeper's own deadline refuses
late ones as ``overloaded`` (agent/gate/overload.py).
"""

from __future__ import annotations

import asyncio
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

RATE_WINDOW = 1.0  # seconds over which answered connections are counted
SHED_LOG_EVERY = 1.0  # seconds: shed connections are summed into one warning per second

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


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

    def __call__(self) -> asyncio.Protocol:
        loop = asyncio.get_running_loop()
        if len(self._live) >= self.bound:
            self.shed += 1
            self._unlogged += 1
            now = loop.time()
            if now - self._logged >= SHED_LOG_EVERY:
                log.warning("gate.shed", connections=self._unlogged, pending=len(self._live),
                            bound=self.bound, answered_per_s=round(self.rate, 1))
                self._logged, self._unlogged = now, 0
            return _Shed()
        return _Counted(asyncio.StreamReader(limit=self.limit, loop=loop), self.handler, self)
