"""The Asterisk adapter: FastAGI gate, AMI metering and control.

Three jobs, one object (:class:`AsteriskAdapter`, an :class:`agent.calls.PbxControl`):

* **Gate** (FastAGI): the dialplan's ``AGI(agi://127.0.0.1:4573/gate)``
  connects here; we read the request within a timeout, ask ``gate`` within the
  decision budget, and set ``CALLGATE_MAX_SECONDS``, ``CALLGATE_REASON`` and
  last ``CALLGATE_RESULT``, checking each ``200 result=1``, then close the
  socket ourselves (Asterisk never does, trace 06d). The shipped dialplan
  dials only when ``CALLGATE_RESULT`` is exactly ``ALLOW`` (config/asterisk).
* **Metering** (AMI): log in, list the live channels with ``CoreShowChannels``
  before trusting any event, then turn events into :mod:`agent.calls` events
  (:class:`agent.pbx.ami.CallTracker`). A slow Asterisk is told from a dead
  one (:mod:`agent.pbx.liveness`): a ``Ping`` or action answered late makes
  the link *slow* (actions fail, the link and its events stay); only no byte
  at all for ``dead_after`` while a ``Pong`` is due, or the kernel (end of
  stream, TCP user timeout), counts it as dead; it is then reopened with
  exponential backoff.
* **Control**: ``AbsoluteTimeout`` for the PBX-side deadline (a later one
  replaces the earlier, DESIGN.md facts), ``Hangup`` with a numeric cause.
  An action in flight when the connection drops fails with :class:`PbxError`
  and is never re-sent by us after the reconnect: the caller (the meter)
  decides, knowing the fresh ``PbxConnected`` list.

The protocol code is sans-IO (agent/pbx/ami, agent/pbx/agi); this module only
moves bytes, keeps time and reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import structlog

from agent.calls import (
    ActiveCall,
    CallEvent,
    CallGone,
    CallInfo,
    CallRequested,
    Direction,
    EventSink,
    GateFunc,
    HangupCause,
    PbxConnected,
    PbxDisconnected,
    PbxError,
)
from agent.gate.decision import Decision, Reason
from agent.pbx import agi, ami
from agent.pbx._listener import BACKLOG, DEFAULT_MAX_PENDING, GateListener, arrived_at
from agent.pbx.liveness import DOWN, SLOW, UP, CommandTimer, LinkHealth, is_dead, keepalive

log = structlog.get_logger(__name__)

AMI_EVENT_CLASSES = "call,cdr,system"
"""``Events:`` sent with Login: the classes the tracker reads (``Privilege: call,all``,
``cdr,all``; trace 01). ``dialplan`` (VarSet, Newexten), ``security`` and ``agi``
events, most of the traffic in the traces, are then never sent to us."""
NO_SUCH_CHANNEL = "No such channel"  # Getvar/Hangup on a gone channel (trace 07)
READ_SIZE = 65536
MAX_BUFFERED = 100_000
"""Events held back between login and the end of CoreShowChannels (bounded:
past it the session is dropped and started again, not grown without end)."""


def now_utc() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class AsteriskSettings:
    ami_host: str = "127.0.0.1"
    ami_port: int = 5038
    username: str = "callgate"
    secret: str = ""
    fastagi_listen: tuple[str, int] | None = ("127.0.0.1", 4573)  # None = no inline gate
    decision_budget: float = 0.5  # seconds; past it the gate answers DENY ledger_unavailable
    watch_only_contexts: frozenset[str] = frozenset()  # decided from AMI events
    outbound_contexts: frozenset[str] = frozenset()  # empty = any call with an accountcode / AGI
    ping_interval: float = 10.0
    ping_timeout: float = 5.0  # also the limit for any AMI action's reply (doubled while slow)
    command_timeout_max: float | None = None  # backed off up to this (None: dead_after)
    dead_after: float = 30.0  # no byte at all for this long while a Pong is due = dead
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    cdr_wait: float = 2.0  # wait for a Cdr after Hangup before computing billsec
    fastagi_read_timeout: float = 5.0  # for the request headers and each reply
    gate_max_pending: int = DEFAULT_MAX_PENDING  # ceiling of the in-flight bound (_listener)

    def timeout_ceiling(self) -> float:
        return self.dead_after if self.command_timeout_max is None else self.command_timeout_max


class AmiLoginRefused(PbxError):
    """Asterisk refused the username/secret: retrying cannot help, so run() stops."""


class _SessionLost(Exception):
    """The AMI connection ended (EOF, garbage banner, no Pong)."""


@dataclass
class _Pending:
    name: str
    future: asyncio.Future[tuple[ami.Message, list[ami.Message]]]
    listing: bool = False
    items: list[ami.Message] = field(default_factory=list)


class _AmiSession:
    """One connected AMI socket: writes actions, matches replies by ActionID."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_event: Callable[[ami.Message], None],
        health: LinkHealth | None = None,
        timer: CommandTimer | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.health = health or LinkHealth()
        self.timer = timer or CommandTimer(5.0, 30.0)
        self.last_rx = asyncio.get_running_loop().time()
        self.parser = ami.AmiParser()
        self.on_event = on_event
        self.banner: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self.closed_reason = ""

    async def read_loop(self) -> str:
        """Read until EOF; returns why the stream ended."""
        while True:
            data = await self.reader.read(READ_SIZE)
            self.last_rx = asyncio.get_running_loop().time()
            self.parser.receive_data(data)
            for event in self.parser.events():
                if isinstance(event, ami.Message):
                    self._dispatch(event)
                elif isinstance(event, ami.Banner):
                    if not self.banner.done():
                        self.banner.set_result(event.version)
                elif isinstance(event, ami.ParseFailed):
                    if not self.banner.done():
                        raise _SessionLost(f"not an Asterisk manager port: {event.reason}")
                    log.warning("ami.parse_failed", reason=event.reason)
                elif isinstance(event, ami.ConnectionClosed):
                    return "AMI connection closed by Asterisk"
            if not data:
                return "AMI connection closed by Asterisk"

    def _dispatch(self, msg: ami.Message) -> None:
        action_id = msg.action_id
        pending = self._pending.get(action_id) if action_id else None
        if pending is None:
            if msg.kind == "event":
                self.on_event(msg)
            return
        if msg.kind == "response":
            if msg.get("EventList") == "start":
                pending.listing = True
                pending.items = [msg]
                return
            self._finish(action_id, msg, [])
        elif pending.listing:
            if msg.get("EventList") == "Complete":
                self._finish(action_id, pending.items[0], pending.items[1:])
            else:
                pending.items.append(msg)

    def _finish(self, action_id: str, response: ami.Message, items: list[ami.Message]) -> None:
        pending = self._pending.pop(action_id)
        if not pending.future.done():
            pending.future.set_result((response, items))

    async def action(
        self, name: str, fields: Mapping[str, str | int] | None, timeout: float | None = None
    ) -> tuple[ami.Message, list[ami.Message]]:
        """Send one action; its response (and list items). PbxError if the link drops
        or no reply comes within ``timeout`` (default: the backed-off command timeout);
        a late reply is dropped. The link itself is never closed here."""
        timeout = self.timer.current if timeout is None else timeout
        if self.closed_reason:
            raise PbxError(f"AMI {name} not sent: {self.closed_reason}")
        action_id = f"callgate-{next(self._ids)}"
        future: asyncio.Future[tuple[ami.Message, list[ami.Message]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[action_id] = _Pending(name, future)
        self.writer.write(ami.format_action(name, action_id, fields))
        try:
            async with asyncio.timeout(None if math.isinf(timeout) else timeout):
                reply = await future
        except TimeoutError:
            self.late(name, timeout)
            raise PbxError(f"AMI {name}: no reply within {timeout:g} s (Asterisk slow; "
                           "the link is kept)") from None
        finally:
            self._pending.pop(action_id, None)
        self.timer.answered()
        if self.health.state == SLOW:
            self.health.state = UP
            log.info("ami.caught_up")
        return reply

    def late(self, name: str, timeout: float) -> None:
        """A reply missed its timeout: the PBX is slow (not dead: see _ping)."""
        self.health.command_timeouts += 1
        self.timer.missed()
        if self.health.state == UP:
            self.health.state = SLOW
        silent = asyncio.get_running_loop().time() - self.last_rx
        log.warning("ami.slow", action=name, timeout=timeout, silent_seconds=round(silent, 1),
                    next_timeout=self.timer.current)

    def close(self, reason: str) -> None:
        if self.closed_reason:
            return
        self.closed_reason = reason
        for pending in self._pending.values():
            if not pending.future.done():
                # Not re-sent after a reconnect: the caller decides (issue 5).
                pending.future.set_exception(
                    PbxError(f"AMI {pending.name} lost: {reason}; not retried")
                )
        self._pending.clear()
        self.writer.close()


def _ended_why(task: asyncio.Task[str]) -> str:
    if task.cancelled():
        return "AMI session stopped"
    exc = task.exception()
    return str(exc) if exc else task.result()


def _destination(request: agi.AgiRequest) -> str:
    dnid = request.get("dnid")
    if dnid and dnid != "unknown":
        return dnid
    return request.get("extension")


def call_from_agi(request: agi.AgiRequest, tracker: ami.CallTracker) -> CallInfo:
    """The gate request from FastAGI headers (trace 06: agi_uniqueid, agi_dnid, ...)."""
    context = request.get("context")
    if tracker.outbound_contexts or tracker.watch_only_contexts:
        direction = tracker.direction(context, request.get("accountcode"), gated=True)
    else:
        direction = Direction.OUTBOUND  # it asked the outbound gate
    caller = request.get("callerid")
    name = request.get("calleridname")
    return CallInfo(
        call_id=request.get("uniqueid"),
        direction=direction,
        caller_id="" if caller == "unknown" else caller,
        destination=_destination(request),
        accountcode=request.get("accountcode"),
        endpoint=request.get("channel"),
        context=context,
        caller_name="" if name == "unknown" else name,
    )


def gate_variables(decision: Decision) -> list[tuple[str, str]]:
    """The channel variables for a decision, ``CALLGATE_RESULT`` last.

    Last, so a connection that dies midway leaves no ``ALLOW`` without its
    limit: the shipped dialplan refuses an ALLOW without a positive
    ``CALLGATE_MAX_SECONDS``.
    """
    seconds = ""
    if decision.allow and decision.max_seconds is not None:
        seconds = str(decision.max_seconds)
    elif not decision.allow:
        seconds = "0"
    return [
        ("CALLGATE_MAX_SECONDS", seconds),
        ("CALLGATE_REASON", decision.reason.value),
        ("CALLGATE_RESULT", decision.result),
    ]


def ami_cause(cause: HangupCause) -> int:
    """Asterisk takes the numeric Q.850 cause; it has no ALLOTTED_TIMEOUT (602)."""
    return 16 if cause is HangupCause.ALLOTTED_TIMEOUT else int(cause)


def deadline_seconds(at: datetime, now: datetime) -> int:
    """``AbsoluteTimeout`` seconds: rounded down, so the PBX never ends later than ``at``."""
    return math.floor((at - now).total_seconds())


class AsteriskAdapter:
    """Implements :class:`agent.calls.PbxControl` for one Asterisk."""

    def __init__(
        self,
        settings: AsteriskSettings,
        gate: GateFunc,
        sink: EventSink,
        *,
        clock: Callable[[], datetime] = now_utc,
    ) -> None:
        self.settings = settings
        self.gate = gate
        self.sink = sink
        self.clock = clock
        self.tracker = ami.CallTracker(
            outbound_contexts=settings.outbound_contexts,
            watch_only_contexts=settings.watch_only_contexts,
            cdr_wait=settings.cdr_wait,
        )
        self._session: _AmiSession | None = None
        self._trusted = False  # events are buffered until CoreShowChannels is in
        self._buffer: list[tuple[ami.Message, datetime]] = []
        self._server: asyncio.Server | None = None
        self.listener: GateListener | None = None  # the FastAGI socket's, once run() binds it
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connected_changed = asyncio.Event()
        self.sessions = 0  # completed logins, for tests and health
        self.health = LinkHealth()  # the AMI link: up / slow / down (metrics, /status)
        self._timer = CommandTimer(settings.ping_timeout, settings.timeout_ceiling())
        self._expiry_changed = asyncio.Event()  # a call now waits for its Cdr

    # -- public ----------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._session is not None and self._trusted

    @property
    def fastagi_address(self) -> tuple[str, int] | None:
        if self._server is None or not self._server.sockets:
            return None
        host, port = self._server.sockets[0].getsockname()[:2]
        return (host, port)

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Until the AMI is logged in and the live calls are listed (tests, daemon start)."""
        async with asyncio.timeout(timeout):
            while not self.connected:
                self._connected_changed.clear()
                await self._connected_changed.wait()

    async def run(self) -> None:
        """Serve FastAGI and keep the AMI connected until cancelled.

        Raises :class:`AmiLoginRefused` on a wrong username/secret.
        """
        if self.settings.fastagi_listen is not None:
            host, port = self.settings.fastagi_listen
            # A burst of calls must not overflow the accept queue (a dropped SYN
            # costs the caller a 1 s retransmit): _listener.BACKLOG, as for the ESL gate.
            # Past the in-flight bound (at most gate_max_pending) new ones are closed
            # unread (agent/pbx/_listener.py): the dialplan refuses them at once.
            self.listener = GateListener(self._serve_agi, limit=READ_SIZE,
                                         max_pending=self.settings.gate_max_pending,
                                         budget=self.settings.decision_budget)
            self._server = await asyncio.get_running_loop().create_server(
                self.listener, host, port, backlog=BACKLOG
            )
        try:
            await self._ami_forever()
        finally:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def hangup(self, call_id: str, cause: HangupCause) -> None:
        channel = self._channel(call_id, "Hangup")
        await self._command("Hangup", {"Channel": channel, "Cause": ami_cause(cause)}, call_id)

    async def set_deadline(self, call_id: str, at: datetime) -> None:
        channel = self._channel(call_id, "AbsoluteTimeout")
        seconds = deadline_seconds(at, self.clock())
        if seconds < 1:
            # "Timeout: 0" is refused by Asterisk and keeps the old deadline
            # (DESIGN.md facts): a deadline already due is a hang-up now.
            await self.hangup(call_id, HangupCause.ALLOTTED_TIMEOUT)
            return
        await self._command("AbsoluteTimeout", {"Channel": channel, "Timeout": seconds}, call_id)

    async def active_calls(self) -> list[ActiveCall]:
        session = self._require_session("CoreShowChannels")
        if self.health.state == SLOW:
            # A drowning PBX is not asked for its whole channel list as well.
            raise PbxError("Asterisk is answering late; the live calls are listed later")
        items, answers = await self._list_channels(session)
        probe = ami.CallTracker(
            outbound_contexts=self.settings.outbound_contexts,
            watch_only_contexts=self.settings.watch_only_contexts,
        )
        return list(probe.adopt(items, answers, self.clock()))

    # -- AMI ---------------------------------------------------------------
    def _require_session(self, what: str) -> _AmiSession:
        if self._session is None or not self._trusted:
            raise PbxError(f"AMI not connected to {self._where()}; {what} not sent")
        return self._session

    def _where(self) -> str:
        return f"{self.settings.ami_host}:{self.settings.ami_port}"

    def _channel(self, call_id: str, what: str) -> str:
        self._require_session(what)
        channel = self.tracker.channel_of(call_id)
        if channel is None:
            raise CallGone(f"call {call_id} is not live on the PBX; {what} not sent")
        return channel

    async def _command(
        self, name: str, fields: Mapping[str, str | int], call_id: str
    ) -> ami.Message:
        session = self._require_session(name)
        response, _ = await session.action(name, fields)
        if response.name == "Success":
            return response
        message = response.get("Message")
        if message == NO_SUCH_CHANNEL:
            raise CallGone(f"call {call_id}: {name}: {message}")
        raise PbxError(f"AMI {name} for call {call_id} refused: {message}")

    async def _ami_forever(self) -> None:
        delay = self.settings.reconnect_min
        while True:
            reason = ""
            try:
                await self._ami_session()
            except AmiLoginRefused:
                raise
            except (OSError, TimeoutError, PbxError, _SessionLost) as exc:
                reason = str(exc) or type(exc).__name__
            was_trusted = self._trusted
            self._session = None
            self._trusted = False
            self.health.state = DOWN
            self._connected_changed.set()
            if was_trusted:
                self.health.reconnects += 1
                delay = self.settings.reconnect_min
                for event in self.tracker.flush():
                    self._emit(event)
                self._emit(PbxDisconnected(reason))
                log.warning("ami.disconnected", reason=reason, host=self._where())
            else:
                log.warning("ami.connect_failed", reason=reason, host=self._where(), retry=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.reconnect_max)

    async def _ami_session(self) -> None:
        s = self.settings
        async with asyncio.timeout(s.ping_timeout):
            reader, writer = await asyncio.open_connection(s.ami_host, s.ami_port, limit=READ_SIZE)
        session = _AmiSession(reader, writer, self._on_message, self.health, self._timer)
        keepalive(writer.get_extra_info("socket"), s.dead_after)
        self._buffer = []
        reading = asyncio.create_task(self._read(session))
        # Actions waiting for a reply fail at once when the stream ends, not
        # at their timeout (they are never re-sent, see module docstring).
        reading.add_done_callback(lambda task: session.close(_ended_why(task)))
        try:
            async with asyncio.timeout(s.ping_timeout):
                await asyncio.wait({reading, session.banner}, return_when="FIRST_COMPLETED")
            if not session.banner.done():
                reading.result()  # raises why the stream ended
                raise _SessionLost("AMI closed before its banner")
            # A wrong secret answers after about 1 s (trace 07b), inside ping_timeout.
            response, _ = await session.action(
                "Login",
                {"Username": s.username, "Secret": s.secret, "Events": AMI_EVENT_CLASSES},
                max(s.ping_timeout, 2.0),
            )
            if response.name != "Success":
                raise AmiLoginRefused(
                    f"AMI login refused for user {s.username!r} at {self._where()}: "
                    f"{response.get('Message') or response.name}"
                )
            self._session = session
            items, answers = await self._list_channels(session)
            calls = self.tracker.adopt(items, answers, self.clock())
            self._trusted = True
            self.health.state = UP
            self.sessions += 1
            self._emit(PbxConnected(calls))
            buffered, self._buffer = self._buffer, []
            for msg, received_at in buffered:
                self._feed(msg, received_at)
            self._connected_changed.set()
            log.info("ami.connected", host=self._where(), live_calls=len(calls))
            pinging = asyncio.create_task(self._ping(session))
            expiring = asyncio.create_task(self._expire())
            try:
                done, _ = await asyncio.wait(
                    {reading, pinging, expiring}, return_when="FIRST_COMPLETED"
                )
                for task in done:
                    task.result()
                raise _SessionLost("AMI connection ended")
            finally:
                pinging.cancel()
                expiring.cancel()
        finally:
            reading.cancel()
            session.close(session.closed_reason or "AMI session ended")

    async def _read(self, session: _AmiSession) -> str:
        reason = await session.read_loop()
        raise _SessionLost(reason)

    async def _ping(self, session: _AmiSession) -> None:
        """A ``Ping`` every ``ping_interval``. A late ``Pong`` makes the link slow;
        the session is lost only when nothing at all (no event, no reply) has
        come for ``dead_after`` while the Pong is due (:mod:`agent.pbx.liveness`)."""
        s = self.settings
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(s.ping_interval)
            sent = loop.time()
            pong = asyncio.ensure_future(session.action("Ping", None, math.inf))
            try:
                wait = s.ping_timeout
                while True:
                    done, _ = await asyncio.wait({pong}, timeout=wait)
                    if done:
                        pong.result()  # PbxError when the link dropped meanwhile
                        break
                    now = loop.time()
                    if is_dead(now, session.last_rx, sent, s.dead_after):
                        raise _SessionLost(
                            f"no byte from Asterisk for {s.dead_after:g} s and no Pong: "
                            "AMI connection presumed dead")
                    if wait == s.ping_timeout:
                        session.late("Ping", s.ping_timeout)
                    wait = max(0.05, min(s.ping_timeout, s.dead_after - (now - session.last_rx)))
            except PbxError:
                raise _SessionLost(session.closed_reason or "AMI connection lost") from None
            finally:
                pong.cancel()

    async def _expire(self) -> None:
        """End hung-up calls whose Cdr did not come in time: one timer, armed for
        the earliest such call (none while no call waits)."""
        while True:
            due = self.tracker.next_expiry()
            self._expiry_changed.clear()
            if due is None:
                await self._expiry_changed.wait()
                continue
            delay = (due - self.clock()).total_seconds()
            if delay > 0:
                # capped: a clock far from the PBX's must not park a waiting call
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(delay, max(self.settings.cdr_wait, 0.05))):
                        await self._expiry_changed.wait()
                continue
            for event in self.tracker.expire(self.clock()):
                self._emit(event)

    async def _list_channels(
        self, session: _AmiSession
    ) -> tuple[list[ami.Message], dict[str, datetime | None]]:
        response, items = await session.action("CoreShowChannels", None)
        if response.name != "Success":
            raise PbxError(f"AMI CoreShowChannels refused: {response.get('Message')}")
        channels = [m for m in items if m.name == "CoreShowChannel"]
        up = [
            m
            for m in channels
            if m.get("Uniqueid") == m.get("Linkedid") and m.get("ChannelState") == "6"
        ]

        async def answer_time(item: ami.Message) -> datetime | None:
            # CDR(answer,u): the answer time as epoch seconds, free of the
            # PBX's time zone (func_cdr "u" option); "0"/empty = not answered.
            fields = {"Channel": item.get("Channel"), "Variable": "CDR(answer,u)"}
            reply, _ = await session.action("Getvar", fields)
            try:
                value = float(reply.get("Value") or 0)
            except ValueError:
                return None
            return datetime.fromtimestamp(value, UTC) if value > 0 else None

        # Only channels whose answer the events did not tell are asked (after a
        # reconnect to a restarted Asterisk: all; in a periodic listing: next to none).
        answers = {m.get("Uniqueid"): self.tracker.answered_at(m.get("Uniqueid")) for m in up}
        ask = [m for m in up if answers[m.get("Uniqueid")] is None]
        times = await asyncio.gather(*(answer_time(m) for m in ask))
        answers.update({m.get("Uniqueid"): t for m, t in zip(ask, times, strict=True)})
        return channels, answers

    def _on_message(self, msg: ami.Message) -> None:
        now = self.clock()
        if not self._trusted:
            if len(self._buffer) >= MAX_BUFFERED:
                raise _SessionLost(
                    f"more than {MAX_BUFFERED} events while listing the live calls"
                )
            self._buffer.append((msg, now))
            return
        self._feed(msg, now)

    def _feed(self, msg: ami.Message, received_at: datetime) -> None:
        idle = self.tracker.next_expiry() is None
        for event in self.tracker.feed(msg, received_at):
            self._emit(event)
        if idle and self.tracker.next_expiry() is not None:
            self._expiry_changed.set()  # calls join the wait in expiry order

    def _emit(self, event: CallEvent) -> None:
        try:
            self.sink(event)
        except Exception:
            log.exception("sink.failed", kind=type(event).__name__)
        if (
            isinstance(event, CallRequested)
            and event.call.context in self.settings.watch_only_contexts
        ):
            self._spawn(self._watch_only(event.call))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch_only(self, call: CallInfo) -> None:
        decision = await self.decide(call)
        log.info(
            "gate.watch_only",
            call_id=call.call_id,
            result=decision.result,
            reason=decision.reason.value,
            account=call.accountcode,
        )
        if decision.allow:
            return
        try:
            await self.hangup(call.call_id, decision.hangup_cause)
        except CallGone:
            pass
        except PbxError as exc:
            log.error("gate.watch_only_hangup_failed", call_id=call.call_id, error=str(exc))

    # -- gate ------------------------------------------------------------
    async def decide(self, call: CallInfo) -> Decision:
        """The gate's answer within the budget, counted from the connection's arrival
        (``call.received_at``); refused (fail closed) past it."""
        budget = self.settings.decision_budget
        loop = asyncio.get_running_loop()
        arrived = loop.time() if call.received_at is None else call.received_at
        try:
            async with asyncio.timeout_at(arrived + budget):
                return await self.gate(call)
        except TimeoutError:
            log.warning("gate.over_budget", call_id=call.call_id, account=call.accountcode,
                        budget=budget)
            return Decision(False, Reason.LEDGER_UNAVAILABLE, f"no decision within {budget:g} s")
        except Exception as exc:
            log.exception("gate.failed", call_id=call.call_id)
            return Decision(False, Reason.LEDGER_UNAVAILABLE, f"gate failed: {exc}")

    async def _serve_agi(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._gate_connection(reader, writer)
        except (OSError, TimeoutError) as exc:
            log.warning("fastagi.connection_failed", error=str(exc) or type(exc).__name__)
        except asyncio.CancelledError:
            # Shutdown. Returning (not re-raising) because Python 3.11's
            # streams callback logs a bogus error for a cancelled handler.
            pass
        except Exception:
            # A bug here must cost one call (refused: no ALLOW was set), be
            # logged with its call, and never reach the loop's handler.
            log.exception("fastagi.handler_failed")
        finally:
            # Asterisk keeps the socket open after HANGUP (trace 06d): we close.
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _next_agi_event(
        self, conn: agi.FastAgiConnection, reader: asyncio.StreamReader
    ) -> agi.AgiEvent:
        async with asyncio.timeout(self.settings.fastagi_read_timeout):
            while True:
                event = conn.next_event()
                if event is not None:
                    return event
                conn.receive_data(await reader.read(READ_SIZE))

    async def _gate_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # The decision budget runs from the connection's arrival in the accept queue
        # (the listener read its age): time the request spent reaching us is time the
        # dialplan is already waiting (issue 21).
        received = arrived_at(reader)
        conn = agi.FastAgiConnection()
        request = await self._next_agi_event(conn, reader)
        if not isinstance(request, agi.AgiRequest):
            log.warning("fastagi.bad_request", got=repr(request))
            return
        if not request.get("uniqueid"):
            log.warning("fastagi.bad_request", reason="no agi_uniqueid", script=request.script)
            return
        call = replace(call_from_agi(request, self.tracker), received_at=received)
        self.tracker.mark_gated(call.call_id)
        # Not logged here: the gatekeeper logs every decision it makes
        # ("gate.decision"), self.decide() the refusals it makes itself (over
        # budget, gate failed).
        decision = await self.decide(call)
        for name, value in gate_variables(decision):
            writer.write(conn.send_command("SET VARIABLE", name, value))
            while True:
                reply = await self._next_agi_event(conn, reader)
                if not isinstance(reply, agi.AgiHangup):
                    break
                # The channel hung up; its reply still follows (trace 06d order).
            if not (isinstance(reply, agi.AgiReply) and reply.ok and reply.result == "1"):
                log.warning(
                    "fastagi.set_variable_failed",
                    call_id=call.call_id,
                    variable=name,
                    reply=repr(reply),
                )
                return
