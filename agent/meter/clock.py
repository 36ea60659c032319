"""Clocks for the meter: the wall clock in production, a simulated clock in tests.

The meter never reads time itself; it asks its clock. :class:`SimClock` lets
tests run hours of calls in milliseconds: time moves only when the test calls
:meth:`SimClock.advance_to`, which wakes the sleepers due by then, in order.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...

    def sleep_until(self, when: datetime) -> asyncio.Future[None]:
        """A future done at ``when``; the wait is registered when this is called.

        Whoever holds it may complete it earlier (``set_result(None)``) to wake
        the sleeper, or cancel it to drop the wait.
        """
        ...


class WallClock:
    """Aware UTC wall time; sleeps on the event loop."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def sleep_until(self, when: datetime) -> asyncio.Future[None]:
        """A future done at ``when``, never before; cancelling it cancels its timer.

        A bare future and a loop timer, not a task: at 10,000 live calls the
        meter holds one per call, and a task with its coroutines was about ten
        objects more for each full garbage collection to walk.
        """
        loop = asyncio.get_running_loop()
        sleep = _WallSleep(loop, when)
        sleep.arm()
        return sleep.future


class _WallSleep:
    """One sleeper: re-armed if a timer fires early (a loop's timers may, by up to
    their resolution: uvloop's is 1 ms, on a clock cached per loop turn), so a
    caller that then reads the wall clock finds its moment reached."""

    __slots__ = ("future", "handle", "loop", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, when: datetime) -> None:
        self.loop = loop
        self.when = when
        self.future: asyncio.Future[None] = loop.create_future()
        self.handle: asyncio.TimerHandle | None = None
        self.future.add_done_callback(self._done)

    def arm(self) -> None:
        if self.future.done():
            return
        delay = (self.when - datetime.now(UTC)).total_seconds()
        if delay > 0:
            self.handle = self.loop.call_later(delay, self.arm)
        else:
            self.handle = None
            self.future.set_result(None)

    def _done(self, _: asyncio.Future[None]) -> None:
        if self.handle is not None:  # cancelled before its time: free the timer now
            self.handle.cancel()
            self.handle = None


class SimClock:
    """A clock that moves only when told to; deterministic for a given schedule."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        # Awaited after each batch of wake-ups, so work the sleepers started (a
        # ledger write on a worker thread) finishes before time moves on.
        self.settle: Callable[[], Awaitable[None]] | None = None
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        return self._now

    def sleep_until(self, when: datetime) -> asyncio.Future[None]:
        # Registered now, not when first awaited: advance_to must see every sleeper
        # that exists by the time it looks for the next wake-up.
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if when <= self._now:
            future.set_result(None)
        else:
            heapq.heappush(self._sleepers, (when, next(self._seq), future))
        return future

    def next_wakeup(self) -> datetime | None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)  # cancelled sleepers
        return self._sleepers[0][0] if self._sleepers else None

    async def advance_to(self, when: datetime) -> None:
        """Move time forward to ``when``, waking each sleeper at its own time in order."""
        await self._quiesce()
        while True:
            due = self.next_wakeup()
            if due is None or due > when:
                break
            self._now = max(self._now, due)
            while self._sleepers and self._sleepers[0][0] <= self._now:
                _, _, future = heapq.heappop(self._sleepers)
                if not future.done():
                    future.set_result(None)
            await self._quiesce()
        self._now = max(self._now, when)

    async def _quiesce(self) -> None:
        for _ in range(3):  # let ready tasks run up to their next await
            await asyncio.sleep(0)
        if self.settle is not None:
            await self.settle()

    async def advance(self, seconds: float) -> None:
        await self.advance_to(self._now + timedelta(seconds=seconds))
