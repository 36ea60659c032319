"""The gate's listening socket, with a bound on the connections in flight.

Both gates (FastAGI, the ESL outbound socket) serve one connection per call.
Under overload the event loop falls behind, the kernel's accept queue fills and
overflows, and the PBX's connection attempts are dropped and retried a second
later or more: far past the decision budget, with no answer at all. So past
``max_pending`` connections in flight a new one is closed at once, unread:
accepting and closing it costs a few tens of microseconds where reading and
answering it costs a few hundred, and the loop keeps up with the accept queue.

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

DEFAULT_MAX_PENDING = 256
"""Gate connections in flight past which new ones are shed. Below saturation a
few dozen are in flight (calls/s x latency: 600/s x 50 ms = 30); the gatekeeper's
queue holds at most what it can decide within the budget, a few hundred at most
on the SQLite ledger. 256 is only reached when the loop itself is behind."""

SHED_LOG_EVERY = 1.0  # seconds: shed connections are summed into one warning per second

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class _Counted(asyncio.StreamReaderProtocol):
    """A served connection, in ``live`` from creation until its connection is lost."""

    def __init__(self, reader: asyncio.StreamReader, handler: Handler,
                 live: weakref.WeakSet[_Counted]) -> None:
        super().__init__(reader, handler)
        self._live = live
        live.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._live.discard(self)
        super().connection_lost(exc)


class _Shed(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both abort().
        cast(asyncio.Transport, transport).abort()


class GateListener:
    """A protocol factory for ``loop.create_server``: serves with ``handler`` (as
    ``asyncio.start_server`` would) up to ``max_pending`` connections at once,
    and sheds the rest."""

    def __init__(self, handler: Handler, *, limit: int, max_pending: int) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending}")
        self.handler = handler
        self.limit = limit
        self.max_pending = max_pending
        # Weak: a protocol whose transport could not be made is dropped, never leaked.
        self._live: weakref.WeakSet[_Counted] = weakref.WeakSet()
        self.shed = 0  # connections closed unread, since start
        self._unlogged = 0
        self._logged = 0.0

    @property
    def pending(self) -> int:
        """Connections accepted and not yet closed."""
        return len(self._live)

    def __call__(self) -> asyncio.Protocol:
        loop = asyncio.get_running_loop()
        if len(self._live) >= self.max_pending:
            self.shed += 1
            self._unlogged += 1
            now = loop.time()
            if now - self._logged >= SHED_LOG_EVERY:
                log.warning("gate.shed", connections=self._unlogged, pending=len(self._live),
                            max_pending=self.max_pending)
                self._logged, self._unlogged = now, 0
            return _Shed()
        return _Counted(asyncio.StreamReader(limit=self.limit, loop=loop), self.handler,
                        self._live)
