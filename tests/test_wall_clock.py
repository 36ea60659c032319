"""The wall clock the daemon's meter sleeps on never wakes before the moment asked.

uvloop's timers have 1 ms resolution on a clock cached per loop turn, so a
plain ``asyncio.sleep(delay)`` there returns up to a millisecond early by the
wall clock (measured: every time, for 3.3 ms sleeps). The meter then reads the
wall clock to cut a call at its paid boundary or to judge the PBX's limit, and
must find that moment reached.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

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
