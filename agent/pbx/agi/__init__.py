"""FastAGI, sans-IO: the request, commands and replies of one gate connection.

The asyncio server around it lives in :mod:`agent.pbx.asterisk`.
"""

from agent.pbx.agi._protocol import (
    MAX_LINE,
    MAX_REQUEST,
    MAX_USAGE,
    AgiEvent,
    AgiHangup,
    AgiReply,
    AgiRequest,
    AgiState,
    CommandError,
    ConnectionClosed,
    FastAgiConnection,
    ParseFailed,
    format_command,
    parse_reply,
    quote_arg,
)

__all__ = [
    "MAX_LINE",
    "MAX_REQUEST",
    "MAX_USAGE",
    "AgiEvent",
    "AgiHangup",
    "AgiReply",
    "AgiRequest",
    "AgiState",
    "CommandError",
    "ConnectionClosed",
    "FastAgiConnection",
    "ParseFailed",
    "format_command",
    "parse_reply",
    "quote_arg",
]
