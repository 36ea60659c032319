"""FreeSWITCH channel events and listings to :mod:`agent.calls`: pure, no I/O.

What the inbound ESL link subscribes to and filters (:func:`subscription`), the
event -> call-event translation (:class:`CallTracker`), and the live-call list
built from ``show channels as json`` plus what the events already told
(:meth:`CallTracker.listing`), so a periodic listing costs one command, not one
``uuid_dump`` per live call. The asyncio shell is :mod:`agent.pbx.freeswitch`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from agent.calls import (
    ActiveCall,
    CallAnswered,
    CallEnded,
    CallEvent,
    CallInfo,
    CallRequested,
    Direction,
    PbxError,
)
from agent.pbx.esl import EslEvent, Headers, commands, is_number

# The channel events the tracker reads: the A-leg's answer and its end
# (CHANNEL_HANGUP_COMPLETE has the cause and billsec, trace 01b; CHANNEL_HANGUP
# adds nothing; the A-leg's CHANNEL_ANSWER carries its answer time, so
# CHANNEL_BRIDGE, which follows it, is not needed), HEARTBEAT so a silent link
# is noticed, BACKGROUND_JOB for bgapi replies (04b). CHANNEL_CREATE only for
# watch-only contexts, which are decided when the channel appears.
SUBSCRIBED_EVENTS = (
    "CHANNEL_ANSWER",
    "CHANNEL_HANGUP_COMPLETE",
    "HEARTBEAT",
    "BACKGROUND_JOB",
)
WATCH_ONLY_EVENTS = ("CHANNEL_CREATE",)
# ESL filters (mod_event_socket: an event passes when any filter matches it):
# only A-legs (``Call-Direction: inbound``), plus the two events that are not
# about a channel. Every B-leg event (half of the ~7 KB channel events) is then
# never serialised by FreeSWITCH nor read by us.
EVENT_FILTERS = (
    ("Call-Direction", "inbound"),
    ("Event-Name", "HEARTBEAT"),
    ("Event-Name", "BACKGROUND_JOB"),
)
# `show channels` callstates of a channel not answered yet (switch_channel.c
# callstate names); any other state may be answered and is looked at closer.
UNANSWERED_STATES = frozenset({"DOWN", "DIALING", "RINGING", "EARLY", "RING_WAIT"})
ENDED_MEMORY = 10_000  # ended call ids remembered: `show channels` lags behind (07)


class Contexts(Protocol):
    """The two settings the translation reads (FreeswitchSettings has them)."""

    @property
    def outbound_contexts(self) -> frozenset[str]: ...

    @property
    def watch_only_contexts(self) -> frozenset[str]: ...


def subscription(settings: Contexts) -> list[bytes]:
    """The commands that subscribe to what the tracker reads, and nothing else."""
    names = SUBSCRIBED_EVENTS + (WATCH_ONLY_EVENTS if settings.watch_only_contexts else ())
    return [commands.events(names)] + [commands.filter_add(h, v) for h, v in EVENT_FILTERS]


def usec_to_datetime(value: str | None) -> datetime | None:
    """FreeSWITCH µs epoch (``Caller-Channel-Answered-Time``) to UTC; ``0`` = never."""
    if not value or not is_number(value) or value == "0":
        return None
    try:
        return datetime.fromtimestamp(int(value) / 1_000_000, UTC)
    except (OverflowError, ValueError, OSError):  # garbage, not a time
        return None


def is_a_leg(headers: Headers) -> bool:
    """The originating leg: ``Call-Direction: inbound`` (the B-leg toward the
    callee is ``outbound`` with ``Other-Leg-Unique-ID`` = the A-leg, trace 01b)."""
    return headers.get("Call-Direction") == "inbound"


def direction_of(headers: Headers, settings: Contexts) -> Direction:
    """Outbound when the A-leg is in a configured outbound (or watch-only)
    context; with none configured, when it carries an accountcode (set by the
    outbound dialplan; absent on CHANNEL_CREATE, trace 01b) or a gate result."""
    context = headers.get("Caller-Context", "")
    if settings.outbound_contexts or settings.watch_only_contexts:
        gated = context in settings.outbound_contexts or context in settings.watch_only_contexts
        return Direction.OUTBOUND if gated else Direction.INBOUND
    if headers.get("variable_accountcode") or "variable_callgate_result" in headers:
        return Direction.OUTBOUND
    return Direction.INBOUND


def call_info(headers: Headers, settings: Contexts,
              direction: Direction | None = None) -> CallInfo:
    """CallInfo from a channel event, ``uuid_dump`` or the outbound ``connect`` reply.

    The destination is ``variable_callgate_dest`` when the dialplan set it (the
    number without the routing prefix, trace 06a), else ``Caller-Destination-Number``.
    """
    return CallInfo(
        call_id=headers.get("Unique-ID", ""),
        direction=direction or direction_of(headers, settings),
        caller_id=headers.get("Caller-Caller-ID-Number", ""),
        destination=headers.get("variable_callgate_dest")
        or headers.get("Caller-Destination-Number", ""),
        accountcode=headers.get("variable_accountcode", ""),
        endpoint=headers.get("Channel-Name", ""),
        context=headers.get("Caller-Context", ""),
        caller_name=headers.get("Caller-Caller-ID-Name", ""),
    )


def _int(value: str | None) -> int | None:
    return int(value) if value and is_number(value) else None


def parse_show_channels(body: bytes) -> list[dict[str, str]]:
    """Rows of ``show channels as json``; ``{"row_count": 0}`` has no rows (07)."""
    try:
        obj = json.loads(body.decode("utf-8", "replace"))
    except ValueError as exc:
        raise PbxError(f"FreeSWITCH sent unreadable `show channels as json`: {exc}") from exc
    rows = obj.get("rows", []) if isinstance(obj, dict) else []
    return [r for r in rows if isinstance(r, dict)]


def row_call(row: dict[str, str], settings: Contexts) -> ActiveCall:
    """A not-yet-answered A-leg from its ``show channels`` row (trace 07's columns)."""
    headers = {"Unique-ID": row.get("uuid", ""), "Caller-Context": row.get("context", ""),
               "Caller-Caller-ID-Number": row.get("cid_num", ""),
               "Caller-Caller-ID-Name": row.get("cid_name", ""),
               "Caller-Destination-Number": row.get("dest", ""),
               "Channel-Name": row.get("name", ""),
               "variable_accountcode": row.get("accountcode", "")}
    created = row.get("created_epoch", "")
    return ActiveCall(call=call_info(headers, settings),
                      created_at=datetime.fromtimestamp(int(created), UTC)
                      if is_number(created) else None)


@dataclass(frozen=True)
class Listing:
    """``show channels`` read against the tracker: the calls known from events
    and from the rows, and the uuids that need a ``uuid_dump`` (answered, but
    their answer not seen: only after a (re)connect, or if the reply overtook
    the event)."""

    calls: list[ActiveCall]
    to_dump: list[str]


class CallTracker:
    """ESL channel events in, :mod:`agent.calls` events out. Pure and bounded.

    State is one small entry per answered live A-leg (its call info and answer
    time, so a listing needs no ``uuid_dump`` for it), dropped at its
    CHANNEL_HANGUP_COMPLETE or by :meth:`reset` after a reconnect, and the last
    ``ENDED_MEMORY`` ended ids (``show channels`` still lists them for a while).
    """

    def __init__(self, settings: Contexts,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.settings = settings
        self.clock = clock  # only for an event without its own timestamp (the adapter's)
        self._answered: dict[str, ActiveCall] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()

    def reset(self) -> None:
        """Forget everything: at each (re)connect, before the subscription."""
        self._answered = {}
        self._ended = OrderedDict()

    def mark_answered(self, calls: Iterable[ActiveCall]) -> None:
        """Calls the PBX listed as answered: their answer is not reported again."""
        for call in calls:
            if call.answered_at is not None and call.call.call_id not in self._ended:
                self._answered[call.call.call_id] = call

    def listing(self, rows: list[dict[str, str]]) -> Listing:
        """The live A-legs of a ``show channels`` listing, as far as known without
        asking FreeSWITCH again."""
        calls: list[ActiveCall] = []
        to_dump: list[str] = []
        for row in rows:
            uuid = row.get("uuid")
            if row.get("direction") != "inbound" or not uuid or uuid in self._ended:
                continue
            known = self._answered.get(uuid)
            if known is not None:
                calls.append(known)
            elif row.get("callstate", "") in UNANSWERED_STATES:
                calls.append(row_call(row, self.settings))
            else:
                to_dump.append(uuid)
        return Listing(calls, to_dump)

    def _end(self, call_id: str) -> None:
        self._answered.pop(call_id, None)
        self._ended[call_id] = None
        if len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)

    def feed(self, event: EslEvent) -> list[CallEvent]:
        name = event.name
        h = event.headers
        if name not in ("CHANNEL_CREATE", "CHANNEL_ANSWER", "CHANNEL_BRIDGE",
                        "CHANNEL_HANGUP_COMPLETE") or not is_a_leg(h):
            return []
        call_id = h.get("Unique-ID", "")
        if not call_id:
            return []
        if name == "CHANNEL_CREATE":
            at = usec_to_datetime(h.get("Event-Date-Timestamp")) or self.clock()
            return [CallRequested(call_info(h, self.settings), at)]
        if name == "CHANNEL_HANGUP_COMPLETE":
            self._end(call_id)
            ended = usec_to_datetime(h.get("Caller-Channel-Hangup-Time"))
            ended = ended or usec_to_datetime(h.get("Event-Date-Timestamp")) or self.clock()
            return [CallEnded(
                call_id=call_id,
                ended_at=ended,
                cause=h.get("Hangup-Cause", ""),
                cause_code=_int(h.get("variable_hangup_cause_q850")),
                billsec=_int(h.get("variable_billsec")),
                answered_at=usec_to_datetime(h.get("Caller-Channel-Answered-Time")),
                call=call_info(h, self.settings),
            )]
        # CHANNEL_ANSWER (or CHANNEL_BRIDGE, from a subscriber that still asks
        # for it) of the A-leg: the first one with an answer time is the answer.
        # B-leg answers ~20 ms earlier are ignored so the time matches the
        # A-leg's billsec (trace 01b).
        answered_at = usec_to_datetime(h.get("Caller-Channel-Answered-Time"))
        if answered_at is None or call_id in self._answered or call_id in self._ended:
            return []
        call = call_info(h, self.settings)
        self._answered[call_id] = ActiveCall(
            call=call, answered_at=answered_at,
            created_at=usec_to_datetime(h.get("Caller-Channel-Created-Time")))
        return [CallAnswered(call_id, answered_at, call)]
