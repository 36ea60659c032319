"""Asterisk Manager Interface, sans-IO: framing, actions, and calls from events.

Bytes in (:class:`AmiParser`), :class:`Message` objects out, bytes for actions
(:func:`format_action`), and :class:`CallTracker` turning the call events into
the normalized events of :mod:`agent.calls`. No sockets here; the asyncio
client lives in :mod:`agent.pbx.asterisk`.
"""

from agent.pbx.ami._actions import ActionError, format_action
from agent.pbx.ami._calls import CallTracker, cause_name, event_time, parse_duration
from agent.pbx.ami._frames import (
    MAX_LINE,
    MAX_MESSAGE,
    AmiEvent,
    AmiParser,
    Banner,
    ConnectionClosed,
    Message,
    ParseFailed,
    ParserState,
)

__all__ = [
    "MAX_LINE",
    "MAX_MESSAGE",
    "ActionError",
    "AmiEvent",
    "AmiParser",
    "Banner",
    "CallTracker",
    "ConnectionClosed",
    "Message",
    "ParseFailed",
    "ParserState",
    "cause_name",
    "event_time",
    "format_action",
    "parse_duration",
]
