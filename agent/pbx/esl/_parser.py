"""The sans-IO ESL reader: bytes in, typed frames out; bounded and O(n).

Framing (traces/freeswitch README, "Message framing"): a header block ended by
``\\n\\n``; when it has ``Content-Length``, exactly that many body bytes follow.
The parser never sees a socket. Guarantees, because it faces a network peer:

* Work is linear in the bytes received: the blank-line search resumes where the
  last one stopped, and consumed bytes are dropped in amortised O(1).
* Memory is bounded: a header block longer than ``max_header_bytes`` or a body
  longer than ``max_body_bytes`` is reported as a :class:`ParseError` and
  skipped (an oversize body is counted away, never buffered).
* Nothing raises on bad input: a malformed frame becomes a ``ParseError`` event
  and the stream resynchronises at the next frame boundary; invalid UTF-8 is
  replaced, never fatal.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

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
    LogData,
    ParseError,
    UnknownFrame,
)

# The largest header block in the traces is the outbound connect reply, ~6.1 KB
# (06a); 64 KiB leaves room for long channel variables.
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
# `show channels as json` is ~1 KB per channel (07): 16 MiB lists ~15,000.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024


def is_number(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts ``"²"``, which ``int()`` refuses."""
    return text.isascii() and text.isdigit()


def parse_event_plain(body: bytes) -> EslEvent | ParseError:
    """Decode a ``text/event-plain`` body: encoded header lines, blank line,
    then an optional event body of the event's own ``Content-Length`` (04b)."""
    if body.endswith(b"\n\n") and b"Content-Length: " not in body:
        # The usual event: no body of its own, so its headers end at the final
        # blank line. (Searching for the first "\n\n" is ~4x slower than this
        # check: the newline-rich text defeats the substring search's skips.)
        head, rest = body[:-2], b""
    else:
        head, _, rest = body.partition(b"\n\n")
    raw = HeaderBlock(head.decode("utf-8", "replace"))
    name = raw.get("Event-Name")
    if not name:
        return ParseError("text/event-plain without Event-Name")
    event_body = b""
    length = raw.get("Content-Length")
    if length is not None:
        if not is_number(length):
            return ParseError(f"event {name}: bad Content-Length {length!r}")
        event_body = rest[: int(length)]
    return EslEvent(name, EncodedHeaders(raw), event_body)


def parse_event_json(body: bytes) -> EslEvent | ParseError:
    """Decode a ``text/event-json`` body: one JSON object, the event body in ``_body``."""
    try:
        obj = json.loads(body.decode("utf-8", "replace"))
    except ValueError as exc:
        return ParseError(f"text/event-json: {exc}")
    if not isinstance(obj, dict) or not isinstance(obj.get("Event-Name"), str):
        return ParseError("text/event-json without Event-Name")
    event_body = obj.pop("_body", "")
    headers = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in obj.items()}
    # JSON values are plain text, not percent-encoded: a plain dict, no EncodedHeaders
    return EslEvent(obj["Event-Name"], headers, str(event_body).encode())


def _frame(headers: HeaderBlock, body: bytes) -> Frame:
    content_type = headers.get("Content-Type", "")
    if content_type == "text/event-plain":
        return parse_event_plain(body)
    if content_type == "command/reply":
        if "Event-Name" in headers:  # outbound `connect` reply (06a)
            return ChannelData(EncodedHeaders(headers))
        return CommandReply(headers.get("Reply-Text", ""), headers)
    if content_type == "api/response":
        return ApiResponse(body)
    if content_type == "auth/request":
        return AuthRequest()
    if content_type == "text/disconnect-notice":
        return DisconnectNotice(headers, body)
    if content_type == "text/event-json":
        return parse_event_json(body)
    if content_type == "log/data":
        return LogData(headers, body)
    return UnknownFrame(content_type, headers, body)


class EslParser:
    """Feed bytes with :meth:`receive_data`; take frames with :meth:`next_event`.

    ``next_event()`` returns ``None`` when it needs more data. After end of
    stream it returns one :class:`ConnectionClosed` and then ``None`` forever.
    """

    def __init__(
        self,
        *,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self._buf = bytearray()
        self._pos = 0  # start of unconsumed data in _buf
        self._scan = 0  # where the next blank-line search resumes
        self._headers: HeaderBlock | None = None  # block waiting for its body
        self._body_len = 0
        self._skip = 0  # bytes of an oversize body still to discard
        self._skip_headers = False  # discarding an oversize header block
        self._eof = False
        self._closed_reported = False

    def receive_data(self, data: bytes | None) -> None:
        """Add bytes from the socket; ``b""`` or ``None`` means end of stream
        (anything after it is ignored)."""
        if self._eof:
            return
        if not data:
            self._eof = True
            return
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._scan -= self._pos
            self._pos = 0
        if self._skip and self._pos == len(self._buf):
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        self._buf += data

    def events(self) -> Iterator[Frame]:
        """Every frame available now."""
        while (frame := self.next_event()) is not None:
            yield frame

    def next_event(self) -> Frame | None:
        while True:
            if self._skip:
                avail = len(self._buf) - self._pos
                n = min(self._skip, avail)
                self._skip -= n
                self._pos += n
                self._scan = self._pos
                if self._skip:
                    return self._end_or_wait()
            if self._headers is not None:
                end = self._pos + self._body_len
                if len(self._buf) < end:
                    return self._end_or_wait()
                body = bytes(self._buf[self._pos : end])
                headers, self._headers = self._headers, None
                self._pos = self._scan = end
                return _frame(headers, body)
            # Skip stray newlines between frames (none in the traces; cheap resync).
            while (
                not self._skip_headers
                and self._pos < len(self._buf)
                and self._buf[self._pos] == 0x0A
            ):
                self._pos += 1
            self._scan = max(self._scan, self._pos)
            idx = self._buf.find(b"\n\n", max(self._scan - 1, self._pos))
            if idx < 0:
                self._scan = len(self._buf)
                if self._scan - self._pos > self.max_header_bytes:
                    # Drop what we have, keep discarding until the block ends.
                    self._pos = self._scan = len(self._buf) - 1
                    if not self._skip_headers:
                        self._skip_headers = True
                        return ParseError(
                            f"header block over {self.max_header_bytes} bytes; skipped"
                        )
                return self._end_or_wait()
            block = self._buf[self._pos : idx]
            self._pos = self._scan = idx + 2
            if self._skip_headers:
                self._skip_headers = False
                continue
            if len(block) > self.max_header_bytes:
                return ParseError(f"header block over {self.max_header_bytes} bytes; skipped")
            headers = HeaderBlock(block.decode("utf-8", "replace"))
            length = headers.get("Content-Length")
            if length is None:
                return _frame(headers, b"")
            if not is_number(length):
                return ParseError(f"bad Content-Length {length!r}; frame skipped")
            n = int(length)
            if n > self.max_body_bytes:
                self._skip = n
                return ParseError(f"body of {n} bytes over {self.max_body_bytes}; skipped")
            self._headers, self._body_len = headers, n

    def _end_or_wait(self) -> Frame | None:
        if not self._eof or self._closed_reported:
            return None
        self._closed_reported = True
        partial = len(self._buf) - self._pos
        self._buf.clear()
        self._pos = self._scan = 0
        return ConnectionClosed(partial)
