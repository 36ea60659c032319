"""Load generation shared by the gate benchmarks: open loop (a rate), closed loop (N callers).

``one_call`` is a zero-argument coroutine factory that performs one gate
exchange and returns its latency in seconds; it raises OSError or
ConnectionError on failure, which is counted as an error, not a latency.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from agent.calls import CallInfo
from agent.ledger import Cdr

OneCall = Callable[[], Awaitable[float]]


async def open_loop(one_call: OneCall, rate: float, seconds: float) -> dict[str, object]:
    """Start calls at a fixed rate, whatever the latency (the load a PBX offers)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    n = int(rate * seconds)
    for i in range(n):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one_call()))
    lat = await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = loop.time() - start
    return summarize([x for x in lat if isinstance(x, float)], n, elapsed)


async def closed_loop(one_call: OneCall, concurrency: int, seconds: float) -> dict[str, object]:
    """``concurrency`` callers, each starting its next call when the last one ends (saturation)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    lat: list[float] = []
    errors = 0

    async def caller() -> None:
        nonlocal errors
        while loop.time() < end:
            try:
                lat.append(await one_call())
            except (OSError, ConnectionError):
                errors += 1

    start = loop.time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return summarize(lat, len(lat) + errors, loop.time() - start)


def summarize(lat: list[float], attempted: int, elapsed: float) -> dict[str, object]:
    lat.sort()
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return {"calls": len(lat), "errors": attempted - len(lat),
            "calls_per_s": round(len(lat) / elapsed, 1),
            "p50_ms": round(q[49] * 1000, 3), "p99_ms": round(q[98] * 1000, 3)}


class HangUps:
    """Admitted calls settled at zero ``delay`` seconds on, as a hang-up before the
    answer would be, so rented lines and held units free up during a gate bench."""

    def __init__(self, ledger: Any, delay: float = 0.2) -> None:
        self.ledger = ledger
        self.delay = delay
        self._tasks: set[asyncio.Task[None]] = set()

    def later(self, call: CallInfo, account: str) -> None:
        task = asyncio.ensure_future(self._hang_up(call, account))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _hang_up(self, call: CallInfo, account: str) -> None:
        await asyncio.sleep(self.delay)
        await self.ledger.settle_call(Cdr(call.call_id, account, call.caller_id,
                                          call.destination, None, datetime.now(UTC), 0, 0,
                                          Decimal(0), "NO_ANSWER"))

    async def wait(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)

