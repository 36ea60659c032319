"""The wall clock the daemon's meter sleeps on never wakes before the moment asked.

uvloop's timers have 1 ms resolution on a clock cached per loop turn, so a
plain ``asyncio.sleep(delay)`` there returns up to a millisecond early by the
wall clock (measured: every time, for 3.3 ms sleeps). The meter then reads the
wall clock to cut a call at its paid boundary or to judge the PBX's limit, and
must find that moment reached.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.meter.clock import WallClock


async def test_sleep_until_never_returns_before_its_moment() -> None:
    clock = WallClock()
    early = []
    for n in range(60):
        when = datetime.now(UTC) + timedelta(microseconds=1_300 + 97 * n)
        await clock.sleep_until(when)
        woke = clock.now()
        if woke < when:
            early.append((when - woke).total_seconds())
    assert early == []


async def test_sleep_until_a_past_moment_returns_at_once() -> None:
    clock = WallClock()
    before = datetime.now(UTC)
    await clock.sleep_until(before - timedelta(seconds=5))
    assert (datetime.now(UTC) - before).total_seconds() < 0.5



def test_a_sleeper_completed_early_wakes_and_frees_its_timer() -> None:
    """The meter wakes a call's sleeper at the call's end by completing it."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        sleeper = WallClock().sleep_until(datetime.now(UTC) + timedelta(seconds=60))
        assert _armed(loop) == 1
        started = time.monotonic()
        loop.call_later(0.01, sleeper.set_result, None)
        await sleeper
        assert time.monotonic() - started < 5
        await asyncio.sleep(0)
        assert _armed(loop) == 0

    _on_asyncio_loop(scenario())


def test_cancelled_sleepers_free_their_timers() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        clock = WallClock()
        sleepers = [clock.sleep_until(datetime.now(UTC) + timedelta(seconds=60))
                    for _ in range(5)]
        assert _armed(loop) == 5
        for sleeper in sleepers:
            sleeper.cancel()
        await asyncio.sleep(0)  # done callbacks run on the next loop turn
        assert _armed(loop) == 0

    _on_asyncio_loop(scenario())


def _on_asyncio_loop(scenario: Coroutine[Any, Any, None]) -> None:
    """asyncio's own loop lists its timers (uvloop's are inside libuv); the sleeper
    is plain asyncio and behaves alike on both."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scenario)
    finally:
        loop.close()


def _armed(loop: asyncio.AbstractEventLoop) -> int:
    return sum(1 for handle in loop._scheduled  # type: ignore[attr-defined]
               if not handle.cancelled())
