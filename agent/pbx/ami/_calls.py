"""AMI events to normalized calls (sans-IO): the Asterisk side of agent/calls.py.

Rules, each from the Asterisk 20 traces (``traces/asterisk/README.md``):

- A call is its originating channel: the ``Newchannel`` whose ``Uniqueid``
  equals its ``Linkedid``. Every other leg carries that ``Linkedid``; the call
  id is that value (01: caller ``1795557311.26``, callee ``.27`` with
  ``Linkedid: 1795557311.26``).
- ``CallRequested`` is emitted once the account is known: at ``Newchannel`` when
  the peer sets the accountcode (06, ``AccountCode: acme``), at the first
  ``NewAccountCode`` when the dialplan sets it (01), at ``DialBegin`` when it is
  never set (08, inbound trunk), and in any case before the call's end.
- Answer is the originating channel's ``DialEnd`` with ``DialStatus: ANSWER``,
  or the ``BridgeEnter`` that brings the bridge to two channels (01: both land
  within 1 ms). The time is the event's ``Timestamp`` header
  (``timestampevents=yes``) or else the time it was received.
- ``Rename`` of the originating channel changes the name commands go to.
- End is the originating channel's ``Hangup`` (``Cause``, ``Cause-txt``).
  Who ended an answered call is the ``HangupRequest`` before it: a party's
  hang-up raises one on its own channel, either leg (01 caller, 02 callee, and
  06b, 06c, 07, 08), before any ``Hangup`` or ``Cdr``; an AMI ``Hangup`` or an
  ``AbsoluteTimeout`` expiry raises only ``SoftHangupRequest`` (04, 05), as
  does any end the PBX makes itself (a media timeout, say). "Not known" is said
  for an unanswered call (03, 03b and 06 raise none either), for a call adopted
  from a listing (its ``HangupRequest`` may have come while the link was down),
  and until this AMI session has shown one ``HangupRequest``: till then their
  absence cannot be told from an ``eventfilter`` that drops them.
  ``billsec`` is the sum of ``BillableSeconds`` of the ``Cdr`` events whose
  ``UniqueID`` is the call; the Cdr comes before, between or after the Hangups
  (04 / 01 / 05), so an answered call's end waits up to ``cdr_wait`` for one,
  then is computed from the answer and hang-up times, rounded up to the started
  second. An unanswered call ends at once with ``billsec`` 0 (03: both Cdr
  events say ``BillableSeconds: 0``).

The tracker is fed messages with the time they were received and returns the
events to hand on; it never waits itself: :meth:`CallTracker.expire` is called
by the I/O layer at :meth:`CallTracker.next_expiry`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from agent.calls import (
    ActiveCall,
    CallAnswered,
    CallEnded,
    CallEvent,
    CallInfo,
    CallRequested,
    Direction,
    HangupCause,
)
from agent.pbx.ami._frames import Message

_NOTHING: tuple[CallEvent, ...] = ()
_UNKNOWN = "<unknown>"  # Asterisk's spelling of an absent caller ID (trace 01)


def _text(value: str) -> str:
    return "" if value == _UNKNOWN else value


def cause_name(code: int | None, text: str) -> str:
    """``Cause-txt`` as a Q.850-style name: ``Normal Clearing`` -> ``NORMAL_CLEARING``."""
    name = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").upper()
    if name:
        return name
    if code is not None and code in HangupCause._value2member_map_:
        return HangupCause(code).name
    return "UNKNOWN"


def event_time(msg: Message, received_at: datetime) -> datetime:
    """PBX time of an event: ``Timestamp: 1795557391.335862`` when present."""
    if "\r\nTimestamp:" in msg.text:
        try:
            return datetime.fromtimestamp(float(msg.get("Timestamp")), UTC)
        except (ValueError, OverflowError):
            pass
    return received_at


def parse_duration(value: str) -> timedelta:
    """``CoreShowChannel`` ``Duration: 00:00:12`` (HH:MM:SS, trace 07)."""
    try:
        h, m, s = (int(part) for part in value.split(":"))
    except ValueError:
        return timedelta(0)
    return timedelta(hours=h, minutes=m, seconds=s)


@dataclass(slots=True)
class _Call:
    info: CallInfo
    created_at: datetime
    requested: bool = False
    answered_at: datetime | None = None
    answer_unknown: bool = False  # adopted while Up, answer time not learnt
    billsec: int | None = None  # sum of Cdr BillableSeconds seen so far
    ended_at: datetime | None = None
    cause: str = ""
    cause_code: int | None = None
    expires: datetime | None = None
    party_hung_up: bool = False  # a HangupRequest on one of its channels
    adopted: bool = False  # from a CoreShowChannels listing, not seen from its start


class CallTracker:
    def __init__(
        self,
        *,
        outbound_contexts: Iterable[str] = (),
        watch_only_contexts: Iterable[str] = (),
        cdr_wait: float = 2.0,
    ) -> None:
        self.outbound_contexts = frozenset(outbound_contexts)
        self.watch_only_contexts = frozenset(watch_only_contexts)
        self.cdr_wait = timedelta(seconds=cdr_wait)
        self._live: dict[str, _Call] = {}
        self._waiting: dict[str, _Call] = {}  # hung up, waiting for a Cdr; expiry order
        # HangupRequest events reach us (the AMI user's filter lets them through):
        # only then does a call ended without one say the PBX ended it.
        self.sees_hangup_requests = False
        self._handlers = {
            "Newchannel": self._newchannel,
            "NewAccountCode": self._newaccountcode,
            "DialBegin": self._dialbegin,
            "DialEnd": self._dialend,
            "BridgeEnter": self._bridgeenter,
            "Hangup": self._hangup,
            "HangupRequest": self._hangup_request,
            "Cdr": self._cdr,
            "Rename": self._rename,
        }

    # -- queries --------------------------------------------------------
    def channel_of(self, call_id: str) -> str | None:
        call = self._live.get(call_id)
        return call.info.endpoint if call else None

    def call_info(self, call_id: str) -> CallInfo | None:
        call = self._live.get(call_id)
        return call.info if call else None

    def answered_at(self, call_id: str) -> datetime | None:
        """The answer time of a live call, when the events (or a listing) told it."""
        call = self._live.get(call_id)
        return call.answered_at if call else None

    def live_calls(self) -> list[ActiveCall]:
        return [ActiveCall(c.info, c.answered_at, c.created_at) for c in self._live.values()]

    def direction(self, context: str, accountcode: str, gated: bool = False) -> Direction:
        if context in self.watch_only_contexts:
            return Direction.OUTBOUND
        if self.outbound_contexts:
            return Direction.OUTBOUND if context in self.outbound_contexts else Direction.INBOUND
        return Direction.OUTBOUND if accountcode or gated else Direction.INBOUND

    def mark_gated(self, call_id: str) -> None:
        """The call asked the FastAGI gate, so it is outbound whatever its account."""
        call = self._live.get(call_id)
        if call and not self.outbound_contexts:
            call.info = replace(call.info, direction=Direction.OUTBOUND)

    # -- input ----------------------------------------------------------
    def feed(self, msg: Message, received_at: datetime) -> Sequence[CallEvent]:
        if msg.kind != "event":
            return _NOTHING
        handler = self._handlers.get(msg.name)
        if handler is None:
            return _NOTHING
        return handler(msg, received_at)

    def next_expiry(self) -> datetime | None:
        for call in self._waiting.values():
            return call.expires
        return None

    def expire(self, now: datetime) -> list[CallEvent]:
        """End the hung-up calls whose Cdr did not come within ``cdr_wait``."""
        out: list[CallEvent] = []
        while self._waiting:
            call_id, call = next(iter(self._waiting.items()))
            if call.expires is not None and call.expires > now:
                break
            del self._waiting[call_id]
            out.append(self._ended(call, billsec=None))
        return out

    def flush(self) -> list[CallEvent]:
        """End every call still waiting for a Cdr (the connection is going away)."""
        out: list[CallEvent] = [self._ended(call, billsec=None) for call in self._waiting.values()]
        self._waiting.clear()
        return out

    def adopt(
        self,
        channels: Sequence[Message],
        answer_times: Mapping[str, datetime | None],
        now: datetime,
    ) -> tuple[ActiveCall, ...]:
        """Restart from a ``CoreShowChannels`` list: the originating channels are the calls.

        ``answer_times`` maps call ids of Up channels to their answer time
        (``Getvar CDR(answer,u)``), ``None`` where it could not be read.
        """
        self._live.clear()
        self.sees_hangup_requests = False  # a new session: its filter is not yet shown
        for item in channels:
            uid = item.get("Uniqueid")
            if not uid or uid != item.get("Linkedid"):
                continue
            info = self._info(item)
            call = _Call(
                info=info,
                created_at=now - parse_duration(item.get("Duration")),
                requested=True,
                adopted=True,
            )
            if item.get("ChannelState") == "6":
                call.answered_at = answer_times.get(uid)
                call.answer_unknown = call.answered_at is None
            self._live[uid] = call
        return tuple(self.live_calls())

    # -- handlers -------------------------------------------------------
    def _info(self, msg: Message, gated: bool = False) -> CallInfo:
        context = msg.get("Context")
        accountcode = msg.get("AccountCode")
        return CallInfo(
            call_id=msg.get("Uniqueid"),
            direction=self.direction(context, accountcode, gated),
            caller_id=_text(msg.get("CallerIDNum")),
            destination=msg.get("Exten"),
            accountcode=accountcode,
            endpoint=msg.get("Channel"),
            context=context,
            caller_name=_text(msg.get("CallerIDName")),
        )

    def _request(self, call: _Call, at: datetime) -> list[CallEvent]:
        if call.requested:
            return []
        call.requested = True
        return [CallRequested(call.info, at)]

    def _newchannel(self, msg: Message, now: datetime) -> Sequence[CallEvent]:
        uid = msg.get("Uniqueid")
        if uid != msg.get("Linkedid") or uid in self._live or uid in self._waiting:
            return _NOTHING
        info = self._info(msg)
        at = event_time(msg, now)
        call = _Call(info=info, created_at=at)
        self._live[uid] = call
        inbound_by_context = bool(self.outbound_contexts) and info.direction is Direction.INBOUND
        if info.accountcode or inbound_by_context:
            return self._request(call, at)
        return _NOTHING

    def _newaccountcode(self, msg: Message, now: datetime) -> Sequence[CallEvent]:
        call = self._live.get(msg.get("Uniqueid"))
        if call is None:
            return _NOTHING
        accountcode = msg.get("AccountCode")
        direction = self.direction(call.info.context, accountcode)
        if call.info.direction is Direction.OUTBOUND:
            direction = Direction.OUTBOUND  # gated or decided earlier
        call.info = replace(call.info, accountcode=accountcode, direction=direction)
        return self._request(call, event_time(msg, now))

    def _dialbegin(self, msg: Message, now: datetime) -> Sequence[CallEvent]:
        call = self._live.get(msg.get("Uniqueid"))
        if call is None or call.requested:
            return _NOTHING
        return self._request(call, event_time(msg, now))

    def _answered(self, call: _Call, at: datetime) -> list[CallEvent]:
        out: list[CallEvent] = self._request(call, at)
        call.answered_at = at
        call.answer_unknown = False
        out.append(CallAnswered(call.info.call_id, at, call.info))
        return out

    def _dialend(self, msg: Message, now: datetime) -> Sequence[CallEvent]:
        call = self._live.get(msg.get("Linkedid"))
        if call is None or call.answered_at is not None or msg.get("DialStatus") != "ANSWER":
            return _NOTHING
        return self._answered(call, event_time(msg, now))

    def _bridgeenter(self, msg: Message, now: datetime) -> Sequence[CallEvent]:
        call = self._live.get(msg.get("Linkedid"))
        if call is None or call.answered_at is not None:
            return _NOTHING
        try:
            if int(msg.get("BridgeNumChannels", "0")) < 2:
                return _NOTHING
        except ValueError:
            return _NOTHING
        return self._answered(call, event_time(msg, now))

    def _hangup(self, msg: Message, now: datetime) -> Sequence[CallEvent]:
        call = self._live.pop(msg.get("Uniqueid"), None)
        if call is None:
            return _NOTHING
        at = event_time(msg, now)
        out = self._request(call, at)
        try:
            call.cause_code = int(msg.get("Cause"))
        except ValueError:
            call.cause_code = None
        call.cause = cause_name(call.cause_code, msg.get("Cause-txt"))
        call.ended_at = at
        if call.billsec is not None:
            out.append(self._ended(call, call.billsec))
        elif call.answered_at is None and not call.answer_unknown:
            out.append(self._ended(call, 0))
        else:
            call.expires = now + self.cdr_wait
            self._waiting[call.info.call_id] = call
        return out

    def _hangup_request(self, msg: Message, now: datetime) -> Sequence[CallEvent]:
        self.sees_hangup_requests = True
        call = self._live.get(msg.get("Linkedid"))  # either leg carries the call's id
        if call is not None:
            call.party_hung_up = True
        return _NOTHING

    def _rename(self, msg: Message, now: datetime) -> Sequence[CallEvent]:
        # A masquerade (transfer, pickup) renames the channel; commands must
        # follow the new name (Asterisk 20 Rename event: snapshot + Newname).
        call = self._live.get(msg.get("Uniqueid"))
        if call is not None and msg.get("Newname"):
            call.info = replace(call.info, endpoint=msg.get("Newname"))
        return _NOTHING

    def _cdr(self, msg: Message, now: datetime) -> Sequence[CallEvent]:
        uid = msg.get("UniqueID")  # sic: the Cdr event spells it so (trace 01)
        try:
            billsec = int(msg.get("BillableSeconds"))
        except ValueError:
            return _NOTHING
        waiting = self._waiting.pop(uid, None)
        if waiting is not None:
            return [self._ended(waiting, (waiting.billsec or 0) + billsec)]
        call = self._live.get(uid)
        if call is not None:
            call.billsec = (call.billsec or 0) + billsec
        return _NOTHING

    def _ended(self, call: _Call, billsec: int | None) -> CallEnded:
        assert call.ended_at is not None
        if billsec is None:
            if call.answered_at is not None:
                talk = (call.ended_at - call.answered_at).total_seconds()
                billsec = max(0, math.ceil(talk))
            elif not call.answer_unknown:
                billsec = 0
        return CallEnded(
            call_id=call.info.call_id,
            ended_at=call.ended_at,
            cause=call.cause,
            cause_code=call.cause_code,
            billsec=billsec,
            answered_at=call.answered_at,
            call=call.info,
            by_party=self._by_party(call),
        )

    def _by_party(self, call: _Call) -> bool | None:
        if call.answered_at is None and not call.answer_unknown:
            return None  # nobody talked: who ended it changes no charge
        if call.party_hung_up:
            return True
        if call.adopted or not self.sees_hangup_requests:
            return None
        return False
