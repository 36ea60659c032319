"""Sans-IO Event Socket (ESL): FreeSWITCH's control protocol, bytes in, frames out.

Shape of h11/wsproto: :class:`EslParser` takes bytes with ``receive_data()``
and hands typed frames from ``next_event()`` / ``events()``; the functions of
``esl.commands`` return the bytes of each command. No sockets here:
the asyncio code lives in :mod:`agent.pbx.freeswitch` and :mod:`agent.sim.freeswitch`.
Every decoding rule cites the FreeSWITCH 1.10.12 traces in ``shared/traces/freeswitch``.
"""

from agent.pbx.esl import _commands as commands
from agent.pbx.esl._commands import CommandError
from agent.pbx.esl._frames import (
    ApiResponse,
    AuthRequest,
    ChannelData,
    CommandReply,
    ConnectionClosed,
    DisconnectNotice,
    EncodedHeaders,
    EslEvent,
    Frame,
    HeaderBlock,
    Headers,
    LogData,
    ParseError,
    UnknownFrame,
    percent_decode,
    split_header_lines,
)
from agent.pbx.esl._parser import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
    EslParser,
    is_number,
    parse_event_json,
    parse_event_plain,
)

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_HEADER_BYTES",
    "ApiResponse",
    "AuthRequest",
    "ChannelData",
    "CommandError",
    "CommandReply",
    "ConnectionClosed",
    "DisconnectNotice",
    "EncodedHeaders",
    "EslEvent",
    "EslParser",
    "Frame",
    "HeaderBlock",
    "Headers",
    "LogData",
    "ParseError",
    "UnknownFrame",
    "commands",
    "is_number",
    "parse_event_json",
    "parse_event_plain",
    "percent_decode",
    "split_header_lines",
]
