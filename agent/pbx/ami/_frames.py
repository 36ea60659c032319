"""AMI framing: bytes from the manager socket in, whole messages out (sans-IO).

Wire format, as recorded from Asterisk 20.20.1 (``traces/asterisk/README.md``):
the server first writes one banner line ``Asterisk Call Manager/9.0.0\\r\\n``;
after that every message is ``Key: Value`` lines ended by ``\\r\\n`` and the
message by an empty line (``\\r\\n\\r\\n``). Keys repeat (``Variable:`` in
``Status`` events, trace 07), and a value may be empty (``AccountCode: ``).

Guarantees, because this parser faces a socket: work is O(n) in the bytes
received (each byte is searched for the terminator once, consumed bytes are
compacted away in bulk), and memory is bounded: a message longer than
:data:`MAX_MESSAGE` or holding a line longer than :data:`MAX_LINE` is refused
with a :class:`ParseFailed` event and skipped up to the next terminator, so the
stream resynchronises instead of the buffer growing without limit.

Headers are decoded only when asked for: the event name comes from the first
line, so an event the caller ignores (``VarSet``, ``Newexten``) costs one
``find`` and one slice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

MAX_MESSAGE = 65536
"""Bytes in one message. The largest in the traces is a 764-byte ``Status`` event."""
MAX_LINE = 8192
"""Bytes in one header line."""

_TERMINATOR = b"\r\n\r\n"
_BANNER_PREFIX = "Asterisk Call Manager/"


class ParserState(Enum):
    """Where the reader is in the stream (trace 07b: the banner is always first)."""

    AWAIT_BANNER = "await_banner"
    MESSAGES = "messages"
    SKIPPING = "skipping"  # discarding an oversize message up to its terminator
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Banner:
    """``Asterisk Call Manager/<version>``: the first line the server writes."""

    version: str


@dataclass(frozen=True, slots=True)
class ParseFailed:
    """Bytes that could not be framed; already skipped, the stream goes on."""

    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the stream (``receive_data(b"")`` or ``None``)."""

    unparsed: int = 0  # bytes of an unfinished message that were lost


class Message:
    """One AMI message: a ``Response:`` or an ``Event:`` and its headers.

    ``kind`` and ``name`` come from the first line; the headers are split on
    first access. Values are decoded as UTF-8 (``replace``): framing happens on
    bytes first, so a multi-byte character is never cut at a TCP read boundary.
    """

    __slots__ = ("_fields", "_multi", "kind", "name", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        first, _, _ = text.partition("\r\n")
        key, _, value = first.partition(":")
        self.kind = key.strip().lower()  # "event" | "response" | other
        self.name = value.strip()
        self._fields: dict[str, str] | None = None
        self._multi: dict[str, list[str]] | None = None

    @classmethod
    def build(cls, kind: str, name: str, fields: list[tuple[str, str]]) -> Message:
        """A message from parts (simulator, tests); ``kind`` is ``Event``/``Response``."""
        lines = [f"{kind}: {name}", *(f"{k}: {v}" for k, v in fields)]
        return cls("\r\n".join(lines))

    def _parse(self) -> dict[str, str]:
        fields: dict[str, str] = {}
        multi: dict[str, list[str]] | None = None
        for line in self.text.split("\r\n"):
            key, sep, value = line.partition(":")
            if not sep:
                # Not a header (old ``Response: Follows`` bodies); kept whole.
                key, value = "", line
            elif value.startswith(" "):
                value = value[1:]
            if key in fields:
                if multi is None:
                    multi = {}
                multi.setdefault(key, [fields[key]]).append(value)
            else:
                fields[key] = value
        self._fields = fields
        self._multi = multi
        return fields

    @property
    def fields(self) -> dict[str, str]:
        """First value of each header."""
        return self._fields if self._fields is not None else self._parse()

    def get(self, key: str, default: str = "") -> str:
        return self.fields.get(key, default)

    def __getitem__(self, key: str) -> str:
        return self.fields[key]

    def __contains__(self, key: object) -> bool:
        return key in self.fields

    def getall(self, key: str) -> list[str]:
        """Every value of a repeated header, in order (``Variable:`` in ``Status``)."""
        fields = self.fields
        if self._multi and key in self._multi:
            return list(self._multi[key])
        return [fields[key]] if key in fields else []

    @property
    def action_id(self) -> str:
        # A substring test first: most events carry no ActionID, and this keeps
        # them from being split into headers just to find that out.
        if "ActionID:" not in self.text:
            return ""
        return self.get("ActionID")

    def to_bytes(self) -> bytes:
        return self.text.encode("utf-8") + _TERMINATOR

    def __repr__(self) -> str:
        return f"Message({self.kind}={self.name!r}, {len(self.text)} chars)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Message) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


AmiEvent = Banner | Message | ParseFailed | ConnectionClosed


class AmiParser:
    """Incremental AMI reader: ``receive_data(bytes)``, then ``next_event()``.

    ``next_event()`` returns ``None`` when it needs more data. End of stream is
    ``receive_data(b"")`` (or ``None``) and becomes :class:`ConnectionClosed`.
    """

    def __init__(
        self, *, expect_banner: bool = True, kinds: tuple[str, ...] = ("event", "response")
    ) -> None:
        """``kinds``: the first-line keys accepted; a server reads ``("action",)``."""
        self._kinds = kinds
        self._buf = bytearray()
        self._start = 0  # consumed prefix of _buf, compacted in bulk
        self._scan = 0  # where the terminator search resumes (O(n) overall)
        self._eof = False
        self.state = ParserState.AWAIT_BANNER if expect_banner else ParserState.MESSAGES

    def receive_data(self, data: bytes | None) -> None:
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("receive_data after end of stream")
        self._buf += data

    def events(self) -> Iterator[AmiEvent]:
        while (event := self.next_event()) is not None:
            yield event

    def next_event(self) -> AmiEvent | None:
        if self.state is ParserState.CLOSED:
            return None
        if self.state is ParserState.AWAIT_BANNER:
            return self._banner()
        buf = self._buf
        while True:
            scan_from = max(self._scan, self._start)
            end = buf.find(_TERMINATOR, scan_from)
            if end < 0:
                pending = len(buf) - self._start
                if self.state is ParserState.SKIPPING:
                    # Keep only a possible partial terminator.
                    self._start = max(self._start, len(buf) - 3)
                    self._scan = self._start
                    self._compact()
                elif pending > MAX_MESSAGE:
                    self.state = ParserState.SKIPPING
                    self._start = len(buf) - 3
                    self._scan = self._start
                    self._compact()
                    return ParseFailed(f"message longer than {MAX_MESSAGE} bytes; skipped")
                else:
                    self._scan = max(self._start, len(buf) - 3)
                return self._end_of_data(pending)
            chunk = bytes(buf[self._start : end])
            self._start = end + 4
            self._scan = self._start
            self._compact()
            if self.state is ParserState.SKIPPING:
                self.state = ParserState.MESSAGES
                continue
            if not chunk.strip(b"\r\n"):
                continue  # stray blank lines between messages
            if len(chunk) > MAX_MESSAGE:
                return ParseFailed(f"message longer than {MAX_MESSAGE} bytes; skipped")
            if len(chunk) > MAX_LINE and max(map(len, chunk.split(b"\r\n"))) > MAX_LINE:
                return ParseFailed(f"header line longer than {MAX_LINE} bytes; message skipped")
            # Asterisk sometimes ends a message with a lone CRLF before the
            # blank line of the next; leading CRLFs are dropped for that.
            text = chunk.lstrip(b"\r\n").decode("utf-8", "replace")
            message = Message(text)
            if message.kind not in self._kinds:
                return ParseFailed(f"not an AMI message: {text[:60]!r}")
            return message

    def _banner(self) -> AmiEvent | None:
        buf = self._buf
        end = buf.find(b"\r\n", self._start)
        if end < 0:
            if len(buf) - self._start > MAX_LINE:
                self.state = ParserState.MESSAGES
                self._start = len(buf)
                self._compact()
                return ParseFailed("no AMI banner line")
            return self._end_of_data(len(buf) - self._start)
        line = bytes(buf[self._start : end]).decode("utf-8", "replace")
        self._start = end + 2
        self._scan = self._start
        self.state = ParserState.MESSAGES
        if not line.startswith(_BANNER_PREFIX):
            return ParseFailed(f"not an Asterisk manager banner: {line[:60]!r}")
        return Banner(line[len(_BANNER_PREFIX) :].strip())

    def _end_of_data(self, pending: int) -> AmiEvent | None:
        if not self._eof:
            return None
        unparsed = 0 if self.state is ParserState.SKIPPING else pending
        self.state = ParserState.CLOSED
        return ConnectionClosed(unparsed=max(0, unparsed))

    def _compact(self) -> None:
        if self._start > 65536 and self._start * 2 > len(self._buf):
            del self._buf[: self._start]
            self._scan -= self._start
            self._start = 0
