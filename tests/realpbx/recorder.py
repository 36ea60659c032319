"""A loopback TCP proxy that records both directions in the trace format of
tests/fixtures/asterisk/README.md (``#<<<`` bytes from the PBX, ``#>>>`` bytes to it,
``#---`` notes; payloads byte-exact, AMI split into whole messages).

Put it between the agent and Asterisk's AMI (``upstream`` = the PBX) or between
Asterisk and the agent's FastAGI server (``upstream`` = the agent, ``pbx_is_client``)."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path


class Recorder:
    def __init__(self, upstream: tuple[str, int], path: Path, header: list[str], *,
                 pbx_is_client: bool = False, split_ami: bool = True) -> None:
        self.upstream = upstream
        self.path = path
        self.header = header
        self.pbx_is_client = pbx_is_client
        self.split_ami = split_ami
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        self.start = time.time()
        self.chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _marker(self, kind: str, rest: str) -> bytes:
        now = time.time()
        stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="microseconds")
        return f"#{kind} {stamp} +{now - self.start:.6f} {rest}\n".encode()

    def note(self, text: str) -> None:
        with self._lock:
            self.chunks.append(self._marker("---", text))

    def _record(self, from_pbx: bool, data: bytes, pending: dict[bool, bytes]) -> None:
        kind = "<<<" if from_pbx else ">>>"
        if not (self.split_ami and from_pbx):
            with self._lock:
                self.chunks.append(self._marker(kind, f"{len(data)} bytes") + data)
            return
        buf = pending.get(from_pbx, b"") + data
        out = []
        while True:
            if buf.startswith(b"Asterisk Call Manager/") and b"\r\n" in buf:
                end = buf.index(b"\r\n") + 2
            elif b"\r\n\r\n" in buf:
                end = buf.index(b"\r\n\r\n") + 4
            else:
                break
            out.append(buf[:end])
            buf = buf[end:]
        pending[from_pbx] = buf
        with self._lock:
            for msg in out:
                self.chunks.append(self._marker(kind, f"{len(msg)} bytes") + msg)

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError as exc:
            self.note(f"upstream {self.upstream} refused: {exc}")
            client.close()
            return
        self.note("connect")
        pending: dict[bool, bytes] = {}
        # client -> upstream and back; which side is the PBX depends on the proxy
        socks = {client: upstream, upstream: client}
        from_pbx_side = client if self.pbx_is_client else upstream
        try:
            while True:
                ready, _, _ = select.select(list(socks), [], [], 0.5)
                if self._stop:
                    return
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        self.note("EOF from " + ("PBX" if s is from_pbx_side else "callgate"))
                        return
                    self._record(s is from_pbx_side, data, pending)
                    socks[s].sendall(data)
        except OSError as exc:
            self.note(f"connection error: {exc}")
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.close()

    def save(self) -> None:
        with self._lock:
            body = b"".join(self.chunks)
        head = "".join(f"# {line}\n" for line in self.header).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(head + body)

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.listener.close()
