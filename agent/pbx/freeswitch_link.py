"""One authenticated inbound ESL connection: commands with FIFO replies, bgapi
jobs by Job-UUID, events to a callback, and the slow-or-dead verdict
(:mod:`agent.pbx.liveness`).

FreeSWITCH answers commands on one connection in the order they were sent, so
a command that timed out keeps its place in the queue: its late reply is
matched to it and dropped, never to the next command. A late reply makes the
link *slow*, not dead; only silence (no byte at all for ``dead_after`` while a
reply is due) or the kernel (end of stream, reset, TCP user timeout) ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid as uuidlib
from collections import deque
from collections.abc import Callable

import structlog

from agent.calls import PbxError
from agent.pbx.esl import (
    ApiResponse,
    AuthRequest,
    CommandReply,
    ConnectionClosed,
    DisconnectNotice,
    EslEvent,
    EslParser,
    ParseError,
    commands,
)
from agent.pbx.liveness import SLOW, UP, CommandTimer, LinkHealth, is_dead, keepalive

log = structlog.get_logger("callgate.freeswitch")

Reply = CommandReply | ApiResponse


class PbxSlow(PbxError):
    """No reply within the command timeout, but the link is alive: not re-sent."""


class EslLink:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_event: Callable[[EslEvent], None], *, health: LinkHealth | None = None,
                 timer: CommandTimer | None = None, dead_after: float = 30.0) -> None:
        self.reader = reader
        self.writer = writer
        self.on_event = on_event
        self.health = health or LinkHealth()
        self.timer = timer or CommandTimer(5.0, dead_after)
        self.dead_after = dead_after
        self.parser = EslParser()
        # (label, reply future, sent at): in command order, timed-out ones included
        self.pending: deque[tuple[str, asyncio.Future[Reply], float]] = deque()
        self.jobs: dict[str, asyncio.Future[bytes]] = {}
        self.loop = asyncio.get_running_loop()
        self.last_rx = self.loop.time()
        self.closed_reason = ""
        self._greeting: asyncio.Future[None] = self.loop.create_future()
        keepalive(writer.get_extra_info("socket"), dead_after)

    async def read_loop(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                self.last_rx = self.loop.time()
                self.parser.receive_data(data)
                for frame in self.parser.events():
                    if isinstance(frame, ConnectionClosed):
                        self.closed_reason = self.closed_reason or "FreeSWITCH closed the ESL link"
                        return
                    self._dispatch(frame)
                if not data:
                    return
        except OSError as exc:
            self.closed_reason = f"ESL read failed: {exc}"
        finally:
            self.fail_all(self.closed_reason or "ESL link closed")

    def _dispatch(self, frame: object) -> None:
        if isinstance(frame, EslEvent):
            if frame.name == "BACKGROUND_JOB":
                job = self.jobs.pop(frame.headers.get("Job-UUID", ""), None)
                if job is not None and not job.done():
                    job.set_result(frame.body)
                return
            self.on_event(frame)
        elif isinstance(frame, CommandReply | ApiResponse):
            if not self.pending:
                log.warning("esl.unexpected_reply", frame=repr(frame)[:200])
                return
            label, fut, _ = self.pending.popleft()
            if fut.done():  # its command timed out: the PBX is catching up
                self.health.late_replies += 1
                log.info("esl.late_reply", command=label)
            else:
                fut.set_result(frame)
                self.timer.answered()
            if self.health.state == SLOW and not any(f.done() for _, f, _ in self.pending):
                self.health.state = UP
                log.info("freeswitch.esl_caught_up")
        elif isinstance(frame, AuthRequest):
            if not self._greeting.done():
                self._greeting.set_result(None)
        elif isinstance(frame, DisconnectNotice):
            self.closed_reason = "FreeSWITCH sent a disconnect notice"
        elif isinstance(frame, ParseError):
            log.warning("esl.parse_error", reason=frame.reason)

    def fail_all(self, reason: str) -> None:
        err = PbxError(f"{reason}; the command is not replayed (reconcile instead)")
        while self.pending:
            cmd, fut, _ = self.pending.popleft()
            if not fut.done():
                fut.set_exception(PbxError(f"{reason} while waiting for `{cmd}`; not replayed"))
        for job in self.jobs.values():
            if not job.done():
                job.set_exception(err)
        self.jobs.clear()
        if not self._greeting.done():
            self._greeting.set_exception(PbxError(f"{reason} before the auth/request greeting"))

    async def greeting(self) -> None:
        await self._greeting

    def awaiting_since(self) -> float | None:
        """When the oldest reply still due was asked for (timed-out ones too)."""
        return self.pending[0][2] if self.pending else None

    def dead(self, now: float) -> bool:
        return is_dead(now, self.last_rx, self.awaiting_since(), self.dead_after)

    async def send(self, label: str, data: bytes, timeout: float | None = None) -> Reply:
        if self.writer.is_closing():
            raise PbxError(f"ESL link is down; `{label}` not sent")
        timeout = self.timer.current if timeout is None else timeout
        fut: asyncio.Future[Reply] = self.loop.create_future()
        self.pending.append((label, fut, self.loop.time()))
        self.writer.write(data)
        try:
            async with asyncio.timeout(timeout):
                return await fut  # a timeout cancels fut; its entry keeps its place
        except TimeoutError:
            self.health.command_timeouts += 1
            self.timer.missed()
            if self.health.state == UP:
                self.health.state = SLOW
            silent = self.loop.time() - self.last_rx
            log.warning("freeswitch.esl_slow", command=label, timeout=timeout,
                        silent_seconds=round(silent, 1), next_timeout=self.timer.current)
            raise PbxSlow(f"FreeSWITCH did not answer `{label}` within {timeout:g} s "
                          f"(the link is kept: last byte {silent:.1f} s ago)") from None

    async def api(self, cmd: str, timeout: float | None = None) -> ApiResponse:
        reply = await self.send(f"api {cmd}", commands.api(cmd), timeout)
        if not isinstance(reply, ApiResponse):
            raise PbxError(f"`api {cmd}` got {reply.reply_text!r} instead of an api/response")
        return reply

    async def bgapi(self, cmd: str, timeout: float | None = None) -> bytes:
        job = str(uuidlib.uuid4())
        fut: asyncio.Future[bytes] = self.loop.create_future()
        self.jobs[job] = fut
        timeout = self.timer.current if timeout is None else timeout
        try:
            reply = await self.send(f"bgapi {cmd}", commands.bgapi(cmd, job), timeout)
            if not isinstance(reply, CommandReply) or not reply.ok:
                raise PbxError(f"`bgapi {cmd}` refused: {reply!r}")
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise PbxSlow(f"no BACKGROUND_JOB for `bgapi {cmd}` within {timeout:g} s") from None
        finally:
            self.jobs.pop(job, None)

    async def watch(self, heartbeat_timeout: float) -> None:
        """Until the link is dead: silent for ``dead_after`` while a reply is due.
        An idle link (no byte for ``heartbeat_timeout``; HEARTBEAT comes every
        20 s) is probed with ``api status``, whose reply is then due."""
        step = max(0.05, min(5.0, self.dead_after / 4, heartbeat_timeout / 3))
        probe: asyncio.Task[object] | None = None
        try:
            while True:
                await asyncio.sleep(step)
                now = self.loop.time()
                if self.dead(now):
                    label = self.pending[0][0] if self.pending else "?"
                    self.close(f"no byte from FreeSWITCH for {self.dead_after:g} s while "
                               f"waiting for `{label}`: the link is dead")
                    return
                if now - self.last_rx >= heartbeat_timeout and (probe is None or probe.done()):
                    probe = asyncio.create_task(self._probe())
        finally:
            if probe is not None:
                probe.cancel()

    async def _probe(self) -> None:
        with contextlib.suppress(PbxError):
            await self.api("status", timeout=self.dead_after)

    def close(self, reason: str) -> None:
        self.closed_reason = self.closed_reason or reason
        self.writer.close()
