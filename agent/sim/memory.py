"""An in-process PBX on an injected clock, for the meter's simulation tests and benchmark.

It keeps the semantics the meter relies on from the real PBXs, without
sockets: ``set_deadline`` replaces the previous deadline (Asterisk
``AbsoluteTimeout``; our FreeSWITCH adapter gets the same from ``sched_api``
groups), a deadline or a ``hangup`` ends the call at once with a hang-up
event, ``billsec`` is whole seconds from answer truncated (Asterisk's
``cdr_object_get_billsec``), and the dialplan's own limit (``max_seconds``
from the gate) is armed the moment the call is allowed, as the shipped
dialplans do (Asterisk ``TIMEOUT(absolute)``, FreeSWITCH ``sched_hangup``):
ring time counts against it. It can lose events (a PBX connection that
dropped) and list its live calls. The truth it records per call (answered,
ended, billsec, who ended it) is what the invariants are checked against.

Its hang-up events speak FreeSWITCH by default (a deadline's cause is
``ALLOTTED_TIMEOUT``, who hung up is not said); ``ends="asterisk"`` makes them
speak as the Asterisk adapter does: a deadline's cause is ``NORMAL_CLEARING``
(16, trace 05) and an answered call's ``by_party`` says who ended it, or
``ends="asterisk-unfiltered"`` for an Asterisk whose ``HangupRequest`` events
never reach the agent (the deadline's cause 16, ``by_party`` None).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from agent.calls import (
    ActiveCall,
    CallAnswered,
    CallEnded,
    CallGone,
    CallInfo,
    EventSink,
    HangupCause,
    PbxConnected,
    PbxDisconnected,
    PbxError,
)
from agent.meter.clock import Clock

ENDS = ("freeswitch", "asterisk", "asterisk-unfiltered")


@dataclass(eq=False)
class SimCall:
    info: CallInfo
    answered_at: datetime | None = None
    talk_seconds: float | None = None  # how long the parties would talk if nobody cut
    deadline: datetime | None = None
    ended_at: datetime | None = None
    billsec: int = 0
    cause: str = ""
    ended_by: str = ""  # "party", "deadline", "hangup"
    deadlines_set: int = 0
    _sleeper: asyncio.Future[None] | None = None  # what its life waits on now

    def _wake(self) -> None:
        """Something changed (a deadline set, the call ended): re-examine it now."""
        if self._sleeper is not None and not self._sleeper.done():
            self._sleeper.set_result(None)


class MemoryPbx:
    """Implements :class:`~agent.calls.PbxControl`; events go to ``sink`` while connected."""

    def __init__(self, clock: Clock, sink: EventSink | None = None,
                 ends: str = "freeswitch") -> None:
        self.clock = clock
        self.sink = sink
        self.ends = ends
        self.connected = True
        self.calls: dict[str, SimCall] = {}
        self.commands: list[tuple[str, str]] = []
        self.lost_events = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def ends(self) -> str:
        """Whose hang-up events it speaks: see the module docstring."""
        return self._ends

    @ends.setter
    def ends(self, ends: str) -> None:
        if ends not in ENDS:
            raise ValueError(f"ends={ends!r}: one of {', '.join(ENDS)}")
        self._ends = ends

    # -- PbxControl ---------------------------------------------------------------
    async def hangup(self, call_id: str, cause: HangupCause) -> None:
        self._require_connection()
        call = self._live(call_id)
        self.commands.append(("hangup", call_id))
        self._end(call, cause.name, "hangup")

    async def set_deadline(self, call_id: str, at: datetime) -> None:
        self._require_connection()
        call = self._live(call_id)
        self.commands.append(("deadline", call_id))
        # The adapters round the delay down to whole seconds: never later than asked.
        now = self.clock.now()
        whole = math.floor(max(0.0, (at - now).total_seconds()))
        call.deadline = now + timedelta(seconds=whole)
        call.deadlines_set += 1
        call._wake()

    async def active_calls(self) -> list[ActiveCall]:
        self._require_connection()
        return [ActiveCall(c.info, c.answered_at) for c in self.calls.values()
                if c.ended_at is None]

    # -- driving the simulation ---------------------------------------------------
    def place(self, info: CallInfo, *, ring_seconds: float, talk_seconds: float | None,
              max_seconds: int | None = None) -> SimCall:
        """Start a call that is answered after ``ring_seconds`` (None talk = never answered)."""
        call = SimCall(info, talk_seconds=talk_seconds)
        self.calls[info.call_id] = call
        start = self.clock.now()  # now, not when the task first runs
        task = asyncio.ensure_future(self._life(call, start, ring_seconds, max_seconds))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return call

    def disconnect(self, *, noticed: bool = True) -> None:
        """Drop the link; an adapter notices (EOF, ping timeout) unless ``noticed`` is False."""
        if noticed:
            self._emit(PbxDisconnected("connection lost"))
        self.connected = False

    def reconnect(self) -> None:
        self.connected = True
        self._emit(PbxConnected(tuple(ActiveCall(c.info, c.answered_at)
                                      for c in self.calls.values() if c.ended_at is None)))

    async def _life(self, call: SimCall, start: datetime, ring_seconds: float,
                    max_seconds: int | None) -> None:
        if max_seconds is not None:  # the dialplan's limit, armed when the gate allowed it
            call.deadline = start + timedelta(seconds=max_seconds)
        ring_end = start + timedelta(seconds=ring_seconds)
        await self._wait(call, ring_end if call.deadline is None else min(ring_end,
                                                                          call.deadline))
        if call.ended_at is not None:
            return
        if self.clock.now() < ring_end:  # the limit ran out while it rang
            self._end(call, "ALLOTTED_TIMEOUT", "deadline")
            return
        if call.talk_seconds is None:
            self._end(call, "NO_ANSWER", "party")
            return
        call.answered_at = self.clock.now()
        self._emit(CallAnswered(call.info.call_id, call.answered_at, call.info))
        natural_end = call.answered_at + timedelta(seconds=call.talk_seconds)
        while call.ended_at is None:
            if call.deadline is not None and self.clock.now() >= call.deadline:
                self._end(call, "ALLOTTED_TIMEOUT", "deadline")
                return
            until = natural_end if call.deadline is None else min(natural_end, call.deadline)
            await self._wait(call, until)
            if call.ended_at is not None:
                return
            now = self.clock.now()
            if call.deadline is not None and now >= call.deadline:
                self._end(call, "ALLOTTED_TIMEOUT", "deadline")
            elif now >= natural_end:
                self._end(call, "NORMAL_CLEARING", "party")

    async def _wait(self, call: SimCall, until: datetime) -> None:
        sleeper = call._sleeper = self.clock.sleep_until(until)
        try:
            await sleeper
        finally:
            call._sleeper = None
            sleeper.cancel()

    def _end(self, call: SimCall, cause: str, by: str) -> None:
        if call.ended_at is not None:
            return
        now = self.clock.now()
        call.ended_at, call.cause, call.ended_by = now, cause, by
        if call.answered_at is not None:
            call.billsec = int((now - call.answered_at).total_seconds())
        call._wake()
        by_party = None
        if self.ends != "freeswitch" and cause == HangupCause.ALLOTTED_TIMEOUT.name:
            cause = HangupCause.NORMAL_CLEARING.name  # Asterisk ends a deadline with 16 (05)
        if self.ends == "asterisk" and call.answered_at is not None:
            by_party = by == "party"
        self._emit(CallEnded(call.info.call_id, now, cause, billsec=call.billsec,
                             answered_at=call.answered_at, call=call.info, by_party=by_party))

    def _emit(self, event: object) -> None:
        if self.connected and self.sink is not None:
            self.sink(event)  # type: ignore[arg-type]
        else:
            self.lost_events += 1

    def _live(self, call_id: str) -> SimCall:
        call = self.calls.get(call_id)
        if call is None or call.ended_at is not None:
            raise CallGone(f"no such channel: {call_id}")
        return call

    def _require_connection(self) -> None:
        if not self.connected:
            raise PbxError("PBX connection lost")
