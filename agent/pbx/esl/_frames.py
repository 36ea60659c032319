"""Typed ESL frames, and the percent-decoding of header values.

Every message on an ESL socket is a header block ended by a blank line,
optionally followed by exactly ``Content-Length`` body bytes (traces/freeswitch
README, "Message framing"). The frame types below are what that framing
carries, told apart by ``Content-Type``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

Headers = Mapping[str, str]


def percent_decode(value: str) -> str:
    """Decode an ESL header value: percent-decoding only, ``+`` stays ``+``.

    Event bodies and the outbound ``connect`` reply encode space as ``%20`` and
    ``+`` as ``%2B`` (traces/freeswitch README, "Bodies of text/event-plain"),
    so form-decoding (``+`` -> space) would be wrong.
    """
    return unquote(value, errors="replace") if "%" in value else value


def split_header_lines(text: str) -> dict[str, str]:
    """``Name: value`` lines to a dict; the first of a repeated name wins."""
    headers: dict[str, str] = {}
    for line in text.split("\n"):
        name, sep, value = line.partition(": ")
        if sep and name not in headers:
            headers[name] = value
        elif not sep and line.endswith(":") and line[:-1] not in headers:
            headers[line[:-1]] = ""  # "Name:" with an empty value
    return headers


class HeaderBlock(Mapping[str, str]):
    """``Name: value`` lines, looked up in place; split in full only if iterated.

    A channel event has 100-200 header lines (trace 01b) and a reader needs a
    dozen, often one (``Call-Direction`` to skip a B-leg): a lookup is one
    ``str.find`` over the block, where splitting every line costs ~20x more.
    Lines cannot contain a newline, so ``"\n" + name + ": "`` marks a header
    exactly; the first occurrence of a repeated name wins (``Hangup-Cause``
    appears twice in CHANNEL_HANGUP_COMPLETE, trace 01b, with the same value).
    """

    __slots__ = ("_split", "_text")

    def __init__(self, text: str) -> None:
        self._text = "\n" + text if not text.startswith("\n") else text
        self._split: dict[str, str] | None = None

    def _find(self, name: str) -> str | None:
        text = self._text
        key = f"\n{name}: "
        start = text.find(key)
        if start < 0:  # maybe "Name:" with nothing after it
            bare = f"\n{name}:"
            return "" if text.endswith(bare) or f"{bare}\n" in text else None
        start += len(key)
        end = text.find("\n", start)
        return text[start:] if end < 0 else text[start:end]

    def __getitem__(self, name: str) -> str:
        value = self._find(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._find(name) is not None

    def _lines(self) -> dict[str, str]:
        if self._split is None:
            self._split = split_header_lines(self._text[1:])
        return self._split

    def __iter__(self) -> Iterator[str]:
        return iter(self._lines())

    def __len__(self) -> int:
        return len(self._lines())

    def __repr__(self) -> str:
        return f"HeaderBlock({len(self._text)} chars)"


class EncodedHeaders(Mapping[str, str]):
    """Header lines whose values are percent-encoded, decoded on access.

    Channel events carry ~100-200 headers of which an adapter reads a dozen;
    decoding lazily keeps the parser's cost per event close to framing.
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: Mapping[str, str]) -> None:
        self._raw = raw

    def __getitem__(self, name: str) -> str:
        return percent_decode(self._raw[name])

    def get_raw(self, name: str) -> str | None:
        return self._raw.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __contains__(self, name: object) -> bool:
        return name in self._raw

    def __repr__(self) -> str:
        return f"EncodedHeaders({self._raw!r})"


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """``Content-Type: auth/request``: the inbound greeting; answer with ``auth``."""


@dataclass(frozen=True, slots=True)
class CommandReply:
    """``command/reply``: ``Reply-Text`` is ``+OK ...`` or ``-ERR ...``."""

    reply_text: str
    headers: Headers = field(repr=False)

    @property
    def ok(self) -> bool:
        return self.reply_text.startswith("+OK")

    @property
    def job_uuid(self) -> str | None:
        """Set on a ``bgapi`` reply (trace 04b)."""
        return self.headers.get("Job-UUID")


@dataclass(frozen=True, slots=True)
class ChannelData:
    """The outbound socket's reply to ``connect``: ~170 percent-encoded headers.

    It is a ``command/reply`` whose ``Reply-Text`` is itself URL-encoded
    (``%2BOK%0A``) and whose ``Content-Type`` is not first (trace 06a).
    """

    headers: EncodedHeaders = field(repr=False)

    @property
    def ok(self) -> bool:
        return self.headers.get("Reply-Text", "").startswith("+OK")


@dataclass(frozen=True, slots=True)
class ApiResponse:
    """``api/response``: the command's output as the body (``+OK\\n``, ``true``...)."""

    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return not self.body.startswith(b"-ERR")


@dataclass(frozen=True, slots=True)
class EslEvent:
    """One event (``text/event-plain`` or ``text/event-json``).

    ``headers`` are the event's own headers; ``body`` is the event body when it
    has one (BACKGROUND_JOB carries the job's output there, trace 04b).
    """

    name: str
    headers: Headers = field(repr=False)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class DisconnectNotice:
    """``text/disconnect-notice``; on outbound sockets ``Content-Disposition``
    says ``disconnect`` or ``linger`` (trace 06a)."""

    headers: Headers = field(repr=False)
    body: bytes = b""

    @property
    def linger(self) -> bool:
        return self.headers.get("Content-Disposition") == "linger"


@dataclass(frozen=True, slots=True)
class LogData:
    """``log/data``: a log line forwarded after ``log <level>``."""

    headers: Headers = field(repr=False)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class UnknownFrame:
    """A well-framed message with a ``Content-Type`` this parser does not know."""

    content_type: str
    headers: Headers = field(repr=False)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class ParseError:
    """A frame that could not be read; the parser skipped it and resynchronised."""

    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """End of stream (``receive_data(b"")`` or ``None``); ``partial`` bytes were lost."""

    partial: int = 0


Frame = (
    AuthRequest
    | CommandReply
    | ChannelData
    | ApiResponse
    | EslEvent
    | DisconnectNotice
    | LogData
    | UnknownFrame
    | ParseError
    | ConnectionClosed
)
