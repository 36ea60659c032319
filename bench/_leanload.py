"""A lean load generator for the gate sockets: asyncio Protocols on uvloop, no streams.

The stream-based generator (``_loadgen.open_loop_answers``: a StreamReader,
StreamWriter and Task per call) could not offer 5x the gate's saturation on
this machine: at ~5,000 connections/s its own loop lag p99 reached 717 ms
(RESULTS.md, session 7), and that lag was in every latency it reported. Here
each call is one Protocol object driven by the loop's callbacks; the only
coroutine per call is ``create_connection`` itself.

It plays the PBX's side of one gate exchange (:class:`Peer` subclasses: the
ESL outbound socket, FastAGI), open loop (:func:`open_loop`: arrivals on a
fixed schedule, every answer counted, refusals too) or closed loop
(:func:`closed_loop`: N callers back to back, only allowed calls count).

Honesty: an open-loop call's latency counts from its *scheduled* arrival, so a
generator that falls behind its schedule cannot hide it (its lateness is in
every figure); ``offered_per_s`` is the rate it actually started connections
at, and ``launch_lag_p99_ms`` / ``client_lag_p99_ms`` say how late it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable

Answer = tuple[float, bool, str]


class Peer(asyncio.Protocol):
    """One gate exchange; ``done(answer or None)`` is called once (None: no answer,
    e.g. a connection refused or a protocol violation)."""

    def __init__(self, payload: bytes, t0: float, done: Callable[[Answer | None], None]) -> None:
        self.payload = payload
        self.t0 = t0  # perf_counter of the scheduled arrival
        self._done = done
        self.finished = False
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.allowed = False
        self.reason = ""
        self.got_any = False

    def finish(self, answer: Answer | None) -> None:
        if not self.finished:
            self.finished = True
            self._done(answer)
        if self.transport is not None:
            self.transport.close()

    def answer(self, reason: str | None = None) -> Answer:
        return (time.perf_counter() - self.t0, self.allowed,
                self.reason if reason is None else reason)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]


class EslPeer(Peer):
    """FreeSWITCH's side of ``socket ... async full`` (bench/gate_esl.py ``exchange``)."""

    OK = b"Content-Type: command/reply\nReply-Text: +OK\n\n"
    BYE = (b"Content-Type: command/reply\nReply-Text: +OK bye\n\n"
           b"Content-Type: text/disconnect-notice\nContent-Length: 67\n\n"
           b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.got_any = True
        self.buf += data
        while b"\n\n" in self.buf and not self.finished:
            block, self.buf = self.buf.split(b"\n\n", 1)
            word = block.split(b"\n", 1)[0].split(b" ", 1)[0]
            if word == b"connect":
                self.transport.write(self.payload)
            elif word == b"exit":
                self.transport.write(self.BYE)
                self.finish(self.answer())
            else:
                self.allowed |= b"callgate_result=ALLOW" in block
                if b"callgate_reason=" in block:
                    self.reason = block.split(b"callgate_reason=", 1)[1].split(
                        b"\n", 1)[0].decode()
                self.transport.write(self.OK)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.finished:
            return
        if not self.got_any:
            # Closed (or reset) having set nothing: the dialplan's DENY stands.
            self.finish(self.answer("closed" if exc is None else "reset"))
        else:
            self.finish(None)  # closed mid-exchange: no answer


class AgiPeer(Peer):
    """Asterisk's side of ``AGI(agi://...)`` (bench/gate_fastagi.py ``exchange``)."""

    OK = b"200 result=1\n"

    def __init__(self, payload: bytes, t0: float, done: Callable[[Answer | None], None]) -> None:
        super().__init__(payload, t0, done)
        self.commands = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.write(self.payload)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            self.commands += 1
            self.allowed |= line.startswith(b"SET VARIABLE CALLGATE_RESULT") and b"ALLOW" in line
            if line.startswith(b"SET VARIABLE CALLGATE_REASON "):
                self.reason = line.split()[3].decode().strip('"')
            self.transport.write(self.OK)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.finished:
            return
        if self.commands == 0:
            self.finish(self.answer("closed" if exc is None else "reset"))
        elif self.commands == 3 and exc is None:
            self.finish(self.answer())
        else:
            self.finish(None)

    def eof_received(self) -> bool | None:
        self.connection_lost(None)
        return None


PeerType = type[Peer]


def _pct(values: list[float], p: int) -> float:
    if len(values) < 2:
        return float("nan")
    return round(statistics.quantiles(sorted(values), n=100)[p - 1] * 1000, 3)


def _launch(loop: asyncio.AbstractEventLoop, peer: PeerType, host: str, port: int,
            payload: bytes, t0: float, done: Callable[[Answer | None], None]) -> None:
    """Open one connection; a failure to connect is no answer."""
    task = loop.create_task(loop.create_connection(lambda: peer(payload, t0, done), host, port))

    def connected(t: asyncio.Task[object]) -> None:
        if t.cancelled():
            done(None)
        elif isinstance(t.exception(), ConnectionResetError):
            # Shed at once (accepted, then reset) before this loop saw the connect
            # complete: the PBX's AGI()/socket fails and its dialplan refuses.
            done((time.perf_counter() - t0, False, "reset"))
        elif t.exception() is not None:
            done(None)

    task.add_done_callback(connected)


async def _lag_monitor(loop: asyncio.AbstractEventLoop, lags: list[float],
                       stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(0.01)
        lags.append(loop.time() - t - 0.01)


async def open_loop(peer: PeerType, host: str, port: int, payload: Callable[[], bytes],
                    rate: float, seconds: float, drain: float = 30.0) -> dict[str, object]:
    """Offer ``rate`` calls/s for ``seconds`` on a fixed schedule; every answer counts.
    The figures are those of ``_loadgen.open_loop_answers`` plus the rate actually
    offered and how late the launches were."""
    loop = asyncio.get_running_loop()
    cpu = time.process_time()
    n = int(rate * seconds)
    answers: list[Answer] = []
    errors = 0
    finished = 0
    all_done = asyncio.Event()
    launch_lags: list[float] = []
    lags: list[float] = []
    stop = asyncio.Event()

    def done(answer: Answer | None) -> None:
        nonlocal errors, finished
        finished += 1
        if answer is None:
            errors += 1
        else:
            answers.append(answer)
        if finished == n:
            all_done.set()

    monitor = loop.create_task(_lag_monitor(loop, lags, stop))
    start_perf = time.perf_counter() + 0.02
    i = 0
    while i < n:
        now = time.perf_counter()
        while i < n and start_perf + i / rate <= now:
            sched = start_perf + i / rate
            launch_lags.append(now - sched)
            _launch(loop, peer, host, port, payload(), sched, done)
            i += 1
        if i < n:
            await asyncio.sleep(max(0.0, start_perf + i / rate - time.perf_counter()))
    last_launch = time.perf_counter()
    offered_elapsed = last_launch - start_perf
    if n:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_done.wait(), drain)
    elapsed = time.perf_counter() - start_perf
    stop.set()
    await monitor
    every = [a[0] for a in answers]
    served = [a[0] for a in answers if a[1]]
    refused: dict[str, int] = {}
    for _, ok, reason in answers:
        if not ok:
            refused[reason] = refused.get(reason, 0) + 1
    return {"generator": "lean", "offered_per_s": rate, "offered": n,
            "offered_achieved_per_s": round(n / offered_elapsed, 1) if offered_elapsed else rate,
            "answered": len(answers), "errors": n - len(answers),
            "served": len(served), "served_per_s": round(len(served) / elapsed, 1),
            "p50_ms": _pct(every, 50), "p99_ms": _pct(every, 99),
            "max_ms": round(max(every) * 1000, 3) if every else float("nan"),
            "served_p99_ms": _pct(served, 99), "refused": refused,
            "launch_lag_p99_ms": _pct(launch_lags, 99),
            "client_lag_p99_ms": _pct(lags, 99),
            "client_cpu_ms": round((time.process_time() - cpu) * 1000 / max(n, 1), 4)}


async def closed_loop(peer: PeerType, host: str, port: int, payload: Callable[[], bytes],
                      concurrency: int, seconds: float) -> dict[str, object]:
    """``concurrency`` callers back to back for ``seconds`` (saturation); only allowed
    calls count as calls, anything else is an error (as ``_loadgen.closed_loop``)."""
    loop = asyncio.get_running_loop()
    cpu = time.process_time()
    lat: list[float] = []
    errors = 0
    live = 0
    all_done = asyncio.Event()
    start = time.perf_counter()
    end = start + seconds

    def call() -> None:
        nonlocal live
        live += 1
        _launch(loop, peer, host, port, payload(), time.perf_counter(), done)

    def done(answer: Answer | None) -> None:
        nonlocal errors, live
        live -= 1
        if answer is not None and answer[1]:
            lat.append(answer[0])
        else:
            errors += 1
        if time.perf_counter() < end:
            loop.call_soon(call)
        elif live == 0:
            all_done.set()

    for _ in range(concurrency):
        call()
    await asyncio.wait_for(all_done.wait(), seconds + 30)
    elapsed = time.perf_counter() - start
    attempted = len(lat) + errors
    return {"generator": "lean", "calls": len(lat), "errors": errors,
            "calls_per_s": round(len(lat) / elapsed, 1),
            "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
            "client_cpu_ms": round((time.process_time() - cpu) * 1000 / max(attempted, 1), 4)}
