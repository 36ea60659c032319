"""Following the CDR file a PBX appends to: new complete lines, once, across rotation and restarts.

The reading position is the file's identity (device + inode) and a byte
offset just past the last complete line read. It is kept in a small JSON state
file, written atomically (temporary file, fsync, rename) by whoever applied
the lines, *after* applying them: a crash in between reads those lines again,
which is harmless because applying a CDR is idempotent per call in the ledger
(a row is never read twice into money). Rows that could not be applied yet
(their call is still being settled) are kept in the state file too, so a
restart does not lose them.

What the follower survives:

- a partial last line (the PBX is mid-write): it is left for the next read;
- rotation by rename (``logrotate``, FreeSWITCH's ``rotate-on-hup``): the old
  file, still open, is read to its end before the new file is read from 0;
- rotation by truncation (``copytruncate``): a file shorter than the offset
  is read again from 0;
- restarts: the position is read back; a different file at the path (it was
  rotated while the agent was down) is read from 0, and the lines the old file
  got after the last read are left to ``callgate ledger reconcile`` over it
  (logged). The very first start (no saved state) begins after the last
  complete line of a file that already exists: its history is for
  ``callgate ledger reconcile --apply``.

Reading is synchronous and bounded (at most ``max_bytes`` per call); the
daemon runs it in a worker thread. :func:`file_lines` reads a whole CDR file
(``callgate ledger reconcile``) line by line in the same bounded way.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog

log = structlog.get_logger("callgate.cdr")

MAX_LINE = 64 * 1024  # a line longer than this is not a CDR row: skipped


@dataclass
class FollowState:
    """Where reading stands, and the rows read but not applied yet."""

    device: int = 0
    inode: int = 0
    offset: int = 0
    # Lines read but not applied yet (their call was not settled yet, or applying failed):
    # (the line, first seen in epoch s, its line number in the file or 0 if not known)
    pending: list[tuple[str, float, int]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "inode": self.inode, "offset": self.offset,
                "pending": [list(entry) for entry in self.pending]}

    @classmethod
    def from_json(cls, data: Any) -> FollowState:
        if not isinstance(data, dict):
            raise ValueError("not an object")
        # [line, seen] (an older state) or [line, seen, number]
        pending = [(str(t), float(s), int(n[0]) if n else 0)
                   for t, s, *n in data.get("pending", [])]
        return cls(int(data["device"]), int(data["inode"]), int(data["offset"]), pending)


def load_state(path: Path) -> FollowState:
    """The saved state, or a fresh one (a missing or unreadable file is logged, not fatal)."""
    try:
        return FollowState.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return FollowState()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("cdr.state_unreadable", path=str(path), error=str(exc))
        return FollowState()


def save_state(path: Path, state: FollowState) -> None:
    """Write the state atomically: a crash leaves the old state or the new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as out:
        json.dump(state.to_json(), out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def split_lines(data: bytes) -> tuple[list[bytes], int]:
    """The complete lines of ``data`` (without their newline) and how many bytes they took."""
    end = data.rfind(b"\n")
    if end < 0:
        return [], 0
    return data[:end].split(b"\n"), end + 1


def _after_last_line(handle: IO[bytes], size: int, chunk: int = 65536) -> int:
    """The offset just past the file's last newline (0 if it has none)."""
    end = size
    while end > 0:
        start = max(0, end - chunk)
        handle.seek(start)
        found = handle.read(end - start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


@dataclass(frozen=True, slots=True)
class Line:
    text: str
    number: int  # 1-based line number in its file, when known (0: not known)
    too_long: bool = False  # longer than MAX_LINE bytes: no CDR row (``text`` is empty)


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").rstrip("\r")


def file_lines(handle: IO[bytes]) -> Iterator[Line]:
    """Every line of an open file, numbered from 1, holding at most :data:`MAX_LINE`
    bytes at a time: a longer line is yielded ``too_long`` (its rest read and dropped).
    A last line without its newline is yielded too."""
    number = 0
    while raw := handle.readline(MAX_LINE + 1):
        number += 1
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            while (rest := handle.readline(MAX_LINE + 1)) and not rest.endswith(b"\n"):
                pass
            yield Line("", number, too_long=True)
            continue
        yield Line(_decode(raw.removesuffix(b"\n")), number)


class CdrFollower:
    """Reads the new complete lines of ``path``, from where ``state`` says it stands."""

    def __init__(self, path: Path, state: FollowState, *, max_bytes: int = 1 << 20,
                 from_end: bool = False) -> None:
        self.path = path
        self.state = state
        self.max_bytes = max_bytes
        # A first start (no saved state) on a file that exists: begin after its last
        # complete line, not with its history (that is for `ledger reconcile`).
        self.from_end = from_end
        self._file: IO[bytes] | None = None
        self._line_no: int | None = None  # lines of the current file read (None: resumed mid-file)
        self._resumed = False
        self._skipping = False  # in the middle of a line too long to be a row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open_current(self) -> bool:
        """Open the file at the path; place the offset per the saved state."""
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 - kept open across reads
        except FileNotFoundError:
            self.from_end = False  # a file the PBX creates later is read from its start
            return False
        st = os.fstat(handle.fileno())
        state = self.state
        if (st.st_dev, st.st_ino) == (state.device, state.inode) and state.inode:
            if st.st_size < state.offset:
                log.warning("cdr.file_truncated", path=str(self.path), offset=state.offset,
                            size=st.st_size)
                state.offset = 0
        else:
            if state.inode and not self._resumed:
                log.warning("cdr.file_replaced_while_away", path=str(self.path),
                            note="rows the old file got after the last read are not read; "
                                 "run `callgate ledger reconcile` over the rotated file")
            state.device, state.inode, state.offset = st.st_dev, st.st_ino, 0
            if self.from_end and not self._resumed:
                state.offset = _after_last_line(handle, st.st_size)
                log.info("cdr.following_from_end", path=str(self.path), offset=state.offset)
        self._line_no = 0 if state.offset == 0 else None
        self._file = handle
        self._resumed = True
        return True

    def _rotated(self) -> bool:
        """Has the path been given to another file (or removed) since we opened ours?"""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False  # removed, not recreated yet: keep reading the open file
        return (st.st_dev, st.st_ino) != (self.state.device, self.state.inode)

    def _truncated(self) -> bool:
        assert self._file is not None
        return os.fstat(self._file.fileno()).st_size < self.state.offset

    def read(self) -> list[Line]:
        """The complete lines added since the last read (bounded by ``max_bytes``)."""
        if self._file is None and not self._open_current():
            return []
        assert self._file is not None
        if self._truncated():
            log.warning("cdr.file_truncated", path=str(self.path), offset=self.state.offset)
            self.state.offset = 0
            self._line_no = 0
        lines = self._read_open()
        if len(lines) == 0 and self._rotated():
            # Drained: the old file ends here (a partial line left in it was never
            # finished by the PBX). The new file is read from its start.
            leftover = os.fstat(self._file.fileno()).st_size - self.state.offset
            if leftover:
                log.warning("cdr.partial_line_dropped", path=str(self.path), bytes=leftover)
            log.info("cdr.file_rotated", path=str(self.path))
            self.close()
            self.state.inode = 0  # whatever is at the path now is new to us
            if self._open_current():
                lines = self._read_open()
        return lines

    def _read_open(self) -> list[Line]:
        assert self._file is not None
        self._file.seek(self.state.offset)
        data = self._file.read(self.max_bytes)
        raw, used = split_lines(data)
        if not raw and len(data) >= self.max_bytes:
            # One line longer than the read window: skip to its end, it is no CDR row.
            if not self._skipping:
                log.warning("cdr.line_too_long", path=str(self.path), offset=self.state.offset)
            self._skipping = True
            self.state.offset += len(data)
            return []
        self.state.offset += used
        ended_skip = self._skipping and bool(raw)  # raw[0] is the end of the skipped line
        self._skipping = self._skipping and not raw
        out = []
        for k, chunk in enumerate(raw):
            if self._line_no is not None:
                self._line_no += 1
            if (k == 0 and ended_skip) or len(chunk) > MAX_LINE:
                # No CDR row: reported (file and line) by the reader, never parsed.
                out.append(Line("", self._line_no or 0, too_long=True))
                continue
            out.append(Line(_decode(chunk), self._line_no or 0))
        return out
