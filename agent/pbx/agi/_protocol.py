"""FastAGI, server side, sans-IO: request headers in, commands out, replies in.

Wire format, from the Asterisk 20 traces (``06-fastagi-deny.agi.txt``,
``06b``, ``06d``): Asterisk connects and writes ``agi_<name>: <value>`` lines,
each ended by a bare ``\\n``, then one empty line. The server then writes one
command per line (``SET VARIABLE CALLGATE_RESULT DENY``) and Asterisk answers
each with one reply line (``200 result=1``, ``200 result=1 (ALLOW)`` for GET
VARIABLE). When the channel hangs up, Asterisk writes an unsolicited
``HANGUP`` line (06d) that is *not* the reply to any command; it is reported
as :class:`AgiHangup` so replies stay in step. Asterisk never closes the
socket itself (06d waited 10 s): the server must.

Bounds, because anything on the network can connect: the request is at most
:data:`MAX_REQUEST` bytes, a line at most :data:`MAX_LINE` and a ``520-`` usage
text at most :data:`MAX_USAGE`; more is a
:class:`ParseFailed` and the connection is done. Lines are split on bytes and
decoded whole, so a UTF-8 caller name cut between two TCP reads decodes right.
A request that ends before its empty line is never reported (nothing may be
decided on half a request).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum

MAX_REQUEST = 16384
"""Bytes of request headers; the traces' requests are about 500 bytes."""
MAX_LINE = 4096
"""Bytes in one line (request header or reply)."""
MAX_USAGE = 16384
"""Characters of a multi-line ``520-`` reply's usage text (res_agi.c's longest
usage texts are about 2 KB); without a bound a peer that never sends the
closing ``520 `` line would grow it for as long as it writes."""


class AgiState(Enum):
    """AGI "Communication" in the Asterisk docs: the environment, then commands."""

    HEADERS = "headers"
    COMMANDS = "commands"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class AgiRequest:
    """The request environment: ``agi_`` headers (prefix dropped) and arguments."""

    headers: Mapping[str, str]
    args: tuple[str, ...] = ()

    def get(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)

    @property
    def script(self) -> str:
        """``gate`` for ``agi://127.0.0.1:4573/gate`` (``agi_network_script``)."""
        return self.headers.get("network_script", "")


@dataclass(frozen=True, slots=True)
class AgiReply:
    """One reply line: ``200 result=1 (ALLOW)`` -> code 200, result "1", data "ALLOW"."""

    code: int
    result: str = ""
    data: str = ""
    text: str = ""
    usage: tuple[str, ...] = field(default=())  # the body of a 520- multi-line reply

    @property
    def ok(self) -> bool:
        return self.code == 200


@dataclass(frozen=True, slots=True)
class AgiHangup:
    """Asterisk's unsolicited ``HANGUP`` line: the channel hung up (trace 06d)."""


@dataclass(frozen=True, slots=True)
class ParseFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """End of stream; ``complete`` is False when it cut a request or a reply short."""

    complete: bool = True


AgiEvent = AgiRequest | AgiReply | AgiHangup | ParseFailed | ConnectionClosed

_REPLY = re.compile(r"(\d{3})([ -])(.*)")
_RESULT = re.compile(r"result=(\S*)(?:\s+\((.*)\))?")
_BARE = re.compile(r'[^\s"\\]+')


class CommandError(ValueError):
    """A command argument that cannot be sent (a line break would start a new command)."""


def quote_arg(arg: str) -> str:
    """One command argument as Asterisk's AGI argument parser reads it.

    Bare when it has no space, quote or backslash; else double-quoted with
    ``\\`` escapes (``parse_args`` in res_agi.c honours both).
    """
    if "\n" in arg or "\r" in arg or "\0" in arg:
        raise CommandError(f"AGI argument may not contain a line break: {arg!r}")
    if _BARE.fullmatch(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_command(*words: str) -> bytes:
    """``format_command("SET VARIABLE", "CALLGATE_RESULT", "DENY")`` -> the line's bytes.

    The first word is the command itself and written as is.
    """
    if not words:
        raise CommandError("empty AGI command")
    command = quote_arg(words[0]) if '"' in words[0] else words[0]
    if "\n" in command or "\r" in command:
        raise CommandError(f"AGI command may not contain a line break: {command!r}")
    return (" ".join([command, *(quote_arg(w) for w in words[1:])]) + "\n").encode("utf-8")


def parse_reply(line: str) -> AgiReply | AgiHangup | ParseFailed:
    if line == "HANGUP":
        return AgiHangup()
    m = _REPLY.fullmatch(line)
    if m is None:
        return ParseFailed(f"not an AGI reply: {line[:60]!r}")
    code = int(m.group(1))
    rest = m.group(3)
    r = _RESULT.match(rest)
    if r is None:
        return AgiReply(code, text=line)
    return AgiReply(code, r.group(1), r.group(2) or "", line)


class FastAgiConnection:
    """The server end of one FastAGI connection.

    ``receive_data(bytes)`` (``b""``/``None`` at end of stream), then
    ``next_event()`` until it returns ``None``. The first event is the
    :class:`AgiRequest`; after it, one :class:`AgiReply` per command sent, with
    :class:`AgiHangup` possibly in between.
    """

    def __init__(self) -> None:
        self.state = AgiState.HEADERS
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._headers: dict[str, str] = {}
        self._usage: list[str] | None = None  # inside a 520- reply
        self._usage_code = 0
        self._usage_size = 0

    def receive_data(self, data: bytes | None) -> None:
        if not data:
            self._eof = True
            return
        if self.state is AgiState.CLOSED:
            return  # refused or ended: nothing more is read, so nothing is kept
        self._buf += data

    def send_command(self, *words: str) -> bytes:
        if self.state is not AgiState.COMMANDS:
            raise CommandError(f"cannot send a command in state {self.state.value}")
        return format_command(*words)

    def events(self) -> Iterator[AgiEvent]:
        while (event := self.next_event()) is not None:
            yield event

    def _line(self) -> str | ParseFailed | None:
        end = self._buf.find(b"\n", self._pos)
        if end < 0:
            if len(self._buf) - self._pos > MAX_LINE:
                return ParseFailed(f"AGI line longer than {MAX_LINE} bytes")
            return None
        raw = bytes(self._buf[self._pos : end])
        self._pos = end + 1
        if self._pos > 4096 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        if len(raw) > MAX_LINE:
            return ParseFailed(f"AGI line longer than {MAX_LINE} bytes")
        return raw.rstrip(b"\r").decode("utf-8", "replace")

    def _headers_block(self) -> AgiEvent | None:
        """The whole request at once when its empty line is in: one decode,
        one split (a request is ~25 lines; per-line parsing cost 4x more)."""
        buf = self._buf
        # A request with no header lines at all is just its empty line.
        empty = buf.startswith(b"\n", self._pos)
        end = self._pos - 1 if empty else buf.find(b"\n\n", self._pos)
        if end < 0:
            pending = len(buf) - self._pos
            if pending > MAX_REQUEST:
                self.state = AgiState.CLOSED
                return ParseFailed(f"AGI request longer than {MAX_REQUEST} bytes")
            last_line = pending - (buf.rfind(b"\n", self._pos) + 1 - self._pos)
            if last_line > MAX_LINE:
                self.state = AgiState.CLOSED
                return ParseFailed(f"AGI line longer than {MAX_LINE} bytes")
            head = buf[self._pos : self._pos + 4]
            if len(head) == 4 and head != b"agi_":
                # Fail fast on what is not AGI (a TLS hello, a port scan) rather
                # than wait for an empty line that may never come.
                self.state = AgiState.CLOSED
                return ParseFailed(f"not an AGI request header: {bytes(head)!r}...")
            return None
        block = bytes(buf[self._pos : max(self._pos, end)])
        self._pos = end + 2
        if len(block) + 2 > MAX_REQUEST:
            self.state = AgiState.CLOSED
            return ParseFailed(f"AGI request longer than {MAX_REQUEST} bytes")
        lines = block.split(b"\n") if block else []
        if len(block) > MAX_LINE and max(map(len, lines)) > MAX_LINE:
            self.state = AgiState.CLOSED
            return ParseFailed(f"AGI line longer than {MAX_LINE} bytes")
        for line in block.decode("utf-8", "replace").split("\n"):
            line = line.rstrip("\r")
            key, sep, value = line.partition(": ")
            if not sep and line.endswith(":"):
                key, sep, value = line[:-1], ":", ""
            if not sep or not key.startswith("agi_"):
                self.state = AgiState.CLOSED
                return ParseFailed(f"not an AGI request header: {line[:60]!r}")
            self._headers[key[4:]] = value
        self.state = AgiState.COMMANDS
        return self._request()

    def next_event(self) -> AgiEvent | None:
        if self.state is AgiState.HEADERS:
            event = self._headers_block()
            if event is not None:
                return event
            if self._eof:
                self.state = AgiState.CLOSED
                return ConnectionClosed(complete=False)
            return None
        while self.state is not AgiState.CLOSED:
            line = self._line()
            if line is None:
                if self._eof:
                    complete = self.state is AgiState.COMMANDS and self._pos == len(self._buf)
                    self.state = AgiState.CLOSED
                    return ConnectionClosed(complete=complete and self._usage is None)
                return None
            if isinstance(line, ParseFailed):
                self.state = AgiState.CLOSED
                return line
            event = self._reply_line(line)
            if event is not None:
                return event
        return None

    def _reply_line(self, line: str) -> AgiEvent | None:
        # 520 replies span lines: "520-Invalid command syntax.  Proper usage
        # follows:", the usage text, then "520 End of proper usage." (res_agi.c).
        if self._usage is not None:
            if line.startswith(f"{self._usage_code} "):
                usage, self._usage = tuple(self._usage), None
                return AgiReply(self._usage_code, text=line, usage=usage)
            self._usage.append(line)
            self._usage_size += len(line) + 1
            if self._usage_size > MAX_USAGE:
                self.state = AgiState.CLOSED
                return ParseFailed(f"AGI 520 usage text longer than {MAX_USAGE} characters")
            return None
        m = _REPLY.fullmatch(line)
        if m is not None and m.group(2) == "-":
            self._usage = []
            self._usage_size = 0
            self._usage_code = int(m.group(1))
            return None
        return parse_reply(line)

    def _request(self) -> AgiRequest:
        args = []
        n = 1
        while f"arg_{n}" in self._headers:
            args.append(self._headers[f"arg_{n}"])
            n += 1
        return AgiRequest(dict(self._headers), tuple(args))
