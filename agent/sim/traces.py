"""Recorded PBX traces (tests/fixtures/asterisk/README.md "File format"): read a
trace file by its byte counts, or get back the exact byte stream the PBX sent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class TraceChunk:
    """One marker of a recorded trace: ``<<<`` received, ``>>>`` sent, ``---`` note."""

    direction: str  # "<<<" | ">>>" | "---"
    offset: float  # seconds since the recording started
    payload: bytes  # byte-exact for <<< and >>>; the note's text for ---


def read_trace(path: str | Path) -> list[TraceChunk]:
    """Parse a recorded trace file by its byte counts (payloads hold CRLF and LF)."""
    data = Path(path).read_bytes()
    chunks: list[TraceChunk] = []
    pos = 0
    while pos < len(data):
        eol = data.index(b"\n", pos)
        line = data[pos:eol]
        pos = eol + 1
        marker = line[:4]
        if marker not in (b"#<<<", b"#>>>", b"#---"):
            continue  # a "# " header comment
        parts = line.split(b" ", 3)
        offset = float(parts[2].lstrip(b"+"))
        if marker == b"#---":
            chunks.append(TraceChunk("---", offset, parts[3] if len(parts) > 3 else b""))
            continue
        size = int(parts[3].split(b" ")[0])
        chunks.append(TraceChunk(marker[1:].decode(), offset, data[pos : pos + size]))
        pos += size
    return chunks


def received_stream(path: str | Path) -> bytes:
    """The exact bytes Asterisk sent in a trace (all ``<<<`` payloads joined)."""
    return b"".join(c.payload for c in read_trace(path) if c.direction == "<<<")
