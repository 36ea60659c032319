"""The event loop the agent runs on: uvloop where it is installed, else asyncio's own.

uvloop (libuv under the asyncio API, by the authors of asyncpg) does the
agent's socket work in C: at 2,000 calls/s the gate over FastAGI through the
SQLite ledger answered with p99 12-17 ms on it and 26-119 ms on the standard
loop, measured in one run each way (bench/RESULTS.md, session 3). The agent
is plain asyncio and runs unchanged on either loop; the tests run on the loop
the daemon runs on. ``CALLGATE_EVENT_LOOP=asyncio`` in the environment selects
the standard loop (an operator's way back that needs no reinstall);
``daemon.started`` logs the loop in use.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
ENV = "CALLGATE_EVENT_LOOP"
CHOICES = ("uvloop", "asyncio")


class LoopChoiceError(ValueError):
    """The environment names a loop callgate does not know."""


uvloop: Any
try:
    import uvloop
except ImportError:  # pragma: no cover - a platform without uvloop wheels
    uvloop = None


def loop_name() -> str:
    """The loop the agent runs on: the environment's choice, else uvloop if installed."""
    wanted = os.environ.get(ENV, "").strip().lower()
    if wanted and wanted not in CHOICES:
        raise LoopChoiceError(f"{ENV}={wanted!r}: choose one of {', '.join(CHOICES)}")
    if wanted == "uvloop" and uvloop is None:
        raise LoopChoiceError(f"{ENV}=uvloop, but uvloop is not installed "
                              "(pip install uvloop, or choose asyncio)")
    if wanted == "asyncio" or uvloop is None:
        return "asyncio"
    return "uvloop"


def running_loop_name() -> str:
    """The kind of the loop this coroutine runs on, whoever chose it."""
    module = type(asyncio.get_running_loop()).__module__.split(".")[0]
    return "uvloop" if module == "uvloop" else "asyncio"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    return uvloop.new_event_loop if loop_name() == "uvloop" else asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the agent's loop."""
    try:
        factory = loop_factory()
    except LoopChoiceError:
        main.close()  # never awaited: no "coroutine was never awaited" warning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
