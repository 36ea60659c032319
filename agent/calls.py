"""Normalized calls: the events adapters emit and the commands the meter gives.

This module is the whole of what the layers above ``agent/pbx/`` know about a
PBX. An Asterisk or FreeSWITCH adapter turns its wire protocol into these
events and implements :class:`PbxControl`; nothing above it knows which PBX it
talks to.

Identity: a call is identified by its *originating* channel: the Asterisk
caller channel's ``Uniqueid`` (which is the call's ``Linkedid``) or the
FreeSWITCH A-leg ``Unique-ID``. The FastAGI ``agi_uniqueid`` and the outbound
socket's ``Unique-ID`` are the same ids, so a gate decision and the metered call
meet on one key.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from agent.gate.decision import Decision


class Direction(StrEnum):
    OUTBOUND = "outbound"
    INBOUND = "inbound"


class HangupCause(IntEnum):
    """Q.850 causes callgate uses; adapters map them to their PBX's spelling.

    FreeSWITCH names are the member names; Asterisk takes the numeric value.
    ``ALLOTTED_TIMEOUT`` is FreeSWITCH's own (602); Asterisk has no such Q.850
    cause, and its adapter sends 16 (normal clearing) for it.
    """

    UNSPECIFIED = 0
    NORMAL_CLEARING = 16
    USER_BUSY = 17
    NO_ANSWER = 19
    CALL_REJECTED = 21
    FACILITY_REJECTED = 29
    NORMAL_TEMPORARY_FAILURE = 41
    OUTGOING_CALL_BARRED = 52
    ALLOTTED_TIMEOUT = 602


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What is known of a call at setup: enough to match an account and decide."""

    call_id: str
    direction: Direction
    caller_id: str
    destination: str
    accountcode: str = ""
    endpoint: str = ""  # Asterisk channel name / FreeSWITCH channel name
    context: str = ""
    caller_name: str = ""
    # When the PBX's gate connection arrived (the event loop's clock): the decision
    # budget runs from here, not from when the gatekeeper got to it (issue 21).
    # None: not from a gate socket (watch-only, tests); the budget starts at the gate.
    received_at: float | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class CallRequested:
    """A new call was seen at setup (watch-only mode, or any new channel)."""

    call: CallInfo
    at: datetime


@dataclass(frozen=True, slots=True)
class CallAnswered:
    """The far end answered; ``answered_at`` is the PBX's own answer time."""

    call_id: str
    answered_at: datetime
    call: CallInfo | None = None


@dataclass(frozen=True, slots=True)
class CallEnded:
    """The originating channel hung up.

    ``billsec`` is the PBX's own figure (Asterisk ``Cdr`` ``BillableSeconds``,
    FreeSWITCH ``variable_billsec``) when it has one; ``None`` when the adapter
    could not get it. ``answered_at`` is repeated here because an end may be
    the first thing the meter hears of a call (after a restart).

    ``by_party`` (answered calls): True when a party hung up, False when the
    PBX ended the call itself (its deadline, a manager's ``Hangup`` command, a
    media timeout), None when the adapter cannot tell. Asterisk tells by
    ``HangupRequest``: a party's BYE raises one on its channel (traces 01, 02,
    06b, 06c, 07, 08); an AMI ``Hangup`` and an ``AbsoluteTimeout`` expiry raise
    only ``SoftHangupRequest`` (04, 05). FreeSWITCH says None: its deadline is
    the cause ``ALLOTTED_TIMEOUT``.
    """

    call_id: str
    ended_at: datetime
    cause: str
    cause_code: int | None = None
    billsec: int | None = None
    answered_at: datetime | None = None
    call: CallInfo | None = None
    by_party: bool | None = None


@dataclass(frozen=True, slots=True)
class ActiveCall:
    """One live call as the PBX lists it (``CoreShowChannels``, ``show channels``)."""

    call: CallInfo
    answered_at: datetime | None = None
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class PbxConnected:
    """The adapter (re)connected and listed the PBX's live calls before any event."""

    calls: tuple[ActiveCall, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class PbxDisconnected:
    reason: str = ""


CallEvent = CallRequested | CallAnswered | CallEnded | PbxConnected | PbxDisconnected
EventSink = Callable[[CallEvent], None]
"""Adapters hand every event to a sink; it must not block (the meter queues)."""

GateFunc = Callable[[CallInfo], Awaitable["Decision"]]
"""What inline gates (FastAGI, ESL outbound socket) call to decide a call."""


class PbxError(Exception):
    """A PBX command failed or the PBX is unreachable; the message says which."""


class CallGone(PbxError):
    """The PBX no longer has the call (it ended); not retried."""


class PbxControl(Protocol):
    """The commands the meter gives a PBX. Implemented by each adapter."""

    async def hangup(self, call_id: str, cause: HangupCause) -> None:
        """End the call now with ``cause``; :class:`CallGone` if it already ended."""
        ...

    async def set_deadline(self, call_id: str, at: datetime) -> None:
        """Make the PBX itself end the call at ``at`` (replacing any earlier deadline)."""
        ...

    async def active_calls(self) -> list[ActiveCall]:
        """The PBX's live calls now."""
        ...
