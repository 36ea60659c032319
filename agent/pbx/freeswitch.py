"""The FreeSWITCH adapter: ESL outbound-socket gate, inbound ESL metering and control.

Three jobs, one object (:class:`FreeswitchAdapter`, an :class:`agent.calls.PbxControl`):

* **Gate** (outbound socket): the dialplan's ``socket 127.0.0.1:8084 async full``
  connects here; we send ``connect``, read the channel data, ask ``gate`` within
  the decision budget, set ``callgate_result`` / ``callgate_reason`` /
  ``callgate_max_seconds`` and hang a refused call up with its cause (traces
  06a-06d). The shipped dialplan re-checks ``callgate_result`` after the socket,
  so a gate that is down or silent refuses the call (config/freeswitch/README.md).
* **Metering** (inbound ESL): authenticate, subscribe to the few channel events
  we need, list live calls after every (re)connect, and turn A-leg events into
  :mod:`agent.calls` events for the sink.
* **Control**: ``uuid_kill`` to cut a call; ``sched_api`` groups for a PBX-side
  deadline that is replaced without a gap (DESIGN.md, verified facts).

The event -> call-event translation (:class:`CallTracker`) is pure; the asyncio
shell around it only moves bytes, times out and reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import uuid as uuidlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import structlog

from agent.calls import (
    ActiveCall,
    CallAnswered,
    CallEnded,
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
from agent.pbx._listener import DEFAULT_MAX_PENDING, GateListener
from agent.pbx.esl import (
    ApiResponse,
    AuthRequest,
    ChannelData,
    CommandReply,
    ConnectionClosed,
    DisconnectNotice,
    EncodedHeaders,
    EslEvent,
    EslParser,
    HeaderBlock,
    Headers,
    ParseError,
    commands,
    is_number,
)

log = structlog.get_logger("callgate.freeswitch")

# The channel events the tracker reads (CHANNEL_HANGUP is not needed:
# HANGUP_COMPLETE has the cause and billsec, trace 01b), HEARTBEAT so a silent
# link is noticed, BACKGROUND_JOB for bgapi replies (04b).
SUBSCRIBED_EVENTS = (
    "CHANNEL_CREATE",
    "CHANNEL_ANSWER",
    "CHANNEL_BRIDGE",
    "CHANNEL_HANGUP_COMPLETE",
    "HEARTBEAT",
    "BACKGROUND_JOB",
)
NO_SUCH_CHANNEL = "-ERR No such channel!"  # uuid_kill / uuid_getvar on a dead uuid (07)
COMMAND_TIMEOUT = 5.0  # seconds for one api reply before the link counts as dead
LIST_PIPELINE = 100  # uuid_dump commands in flight while listing live calls
GATE_IO_TIMEOUT = 2.0  # seconds for the connect reply / command replies on the gate socket


class EslAuthError(PbxError):
    """FreeSWITCH refused the ESL password: retrying cannot help, so run() stops."""


def now_utc() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class FreeswitchSettings:
    esl_host: str = "127.0.0.1"
    esl_port: int = 8021
    password: str = ""
    outbound_listen: tuple[str, int] | None = ("127.0.0.1", 8084)  # None = no inline gate
    decision_budget: float = 0.5  # seconds; past it the gate answers DENY ledger_unavailable
    gate_max_pending: int = DEFAULT_MAX_PENDING  # ceiling of the in-flight bound (_listener)
    watch_only_contexts: frozenset[str] = frozenset()  # decided from CHANNEL_CREATE
    outbound_contexts: frozenset[str] = frozenset()  # empty = any A-leg with an accountcode
    heartbeat_timeout: float = 45.0  # HEARTBEAT comes every 20 s (README "Subscriptions")
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0


# --------------------------------------------------------------------------
# Pure translation: ESL headers -> agent.calls
# --------------------------------------------------------------------------


def usec_to_datetime(value: str | None) -> datetime | None:
    """FreeSWITCH µs epoch (``Caller-Channel-Answered-Time``) to UTC; ``0`` = never."""
    if not value or not is_number(value) or value == "0":
        return None
    try:
        return datetime.fromtimestamp(int(value) / 1_000_000, UTC)
    except (OverflowError, ValueError, OSError):  # garbage, not a time
        return None


def is_a_leg(headers: Headers) -> bool:
    """The originating leg: ``Call-Direction: inbound`` (the B-leg toward the
    callee is ``outbound`` with ``Other-Leg-Unique-ID`` = the A-leg, trace 01b)."""
    return headers.get("Call-Direction") == "inbound"


def direction_of(headers: Headers, settings: FreeswitchSettings) -> Direction:
    """Outbound when the A-leg is in a configured outbound (or watch-only)
    context; with none configured, when it carries an accountcode (set by the
    outbound dialplan; absent on CHANNEL_CREATE, trace 01b) or a gate result."""
    context = headers.get("Caller-Context", "")
    if settings.outbound_contexts or settings.watch_only_contexts:
        gated = context in settings.outbound_contexts or context in settings.watch_only_contexts
        return Direction.OUTBOUND if gated else Direction.INBOUND
    if headers.get("variable_accountcode") or "variable_callgate_result" in headers:
        return Direction.OUTBOUND
    return Direction.INBOUND


def call_info(
    headers: Headers, settings: FreeswitchSettings, direction: Direction | None = None
) -> CallInfo:
    """CallInfo from a channel event, ``uuid_dump`` or the outbound ``connect`` reply.

    The destination is ``variable_callgate_dest`` when the dialplan set it (the
    number without the routing prefix, trace 06a), else ``Caller-Destination-Number``.
    """
    return CallInfo(
        call_id=headers.get("Unique-ID", ""),
        direction=direction or direction_of(headers, settings),
        caller_id=headers.get("Caller-Caller-ID-Number", ""),
        destination=headers.get("variable_callgate_dest")
        or headers.get("Caller-Destination-Number", ""),
        accountcode=headers.get("variable_accountcode", ""),
        endpoint=headers.get("Channel-Name", ""),
        context=headers.get("Caller-Context", ""),
        caller_name=headers.get("Caller-Caller-ID-Name", ""),
    )


def _int(value: str | None) -> int | None:
    return int(value) if value and is_number(value) else None


class CallTracker:
    """ESL channel events in, :mod:`agent.calls` events out. Pure and bounded.

    State is one small entry per live A-leg, dropped at its
    CHANNEL_HANGUP_COMPLETE or by :meth:`reset` after a reconnect.
    """

    def __init__(self, settings: FreeswitchSettings) -> None:
        self.settings = settings
        self._answered: set[str] = set()

    def reset(self) -> None:
        """Forget everything: at each (re)connect, before the subscription."""
        self._answered = set()

    def mark_answered(self, call_ids: set[str]) -> None:
        """Calls the PBX listed as answered: their answer is not reported again."""
        self._answered |= call_ids

    def feed(self, event: EslEvent) -> list[CallEvent]:
        name = event.name
        h = event.headers
        if name not in ("CHANNEL_CREATE", "CHANNEL_ANSWER", "CHANNEL_BRIDGE",
                        "CHANNEL_HANGUP_COMPLETE") or not is_a_leg(h):
            return []
        call_id = h.get("Unique-ID", "")
        if not call_id:
            return []
        if name == "CHANNEL_CREATE":
            at = usec_to_datetime(h.get("Event-Date-Timestamp")) or now_utc()
            return [CallRequested(call_info(h, self.settings), at)]
        if name == "CHANNEL_HANGUP_COMPLETE":
            self._answered.discard(call_id)
            ended = usec_to_datetime(h.get("Caller-Channel-Hangup-Time"))
            ended = ended or usec_to_datetime(h.get("Event-Date-Timestamp")) or now_utc()
            return [CallEnded(
                call_id=call_id,
                ended_at=ended,
                cause=h.get("Hangup-Cause", ""),
                cause_code=_int(h.get("variable_hangup_cause_q850")),
                billsec=_int(h.get("variable_billsec")),
                answered_at=usec_to_datetime(h.get("Caller-Channel-Answered-Time")),
                call=call_info(h, self.settings),
            )]
        # CHANNEL_ANSWER or CHANNEL_BRIDGE of the A-leg: the first one with an
        # answer time is the answer. B-leg answers ~20 ms earlier are ignored so
        # the time matches the A-leg's billsec (trace 01b).
        answered_at = usec_to_datetime(h.get("Caller-Channel-Answered-Time"))
        if answered_at is None or call_id in self._answered:
            return []
        self._answered.add(call_id)
        return [CallAnswered(call_id, answered_at, call_info(h, self.settings))]


# switch_scheduler.c: a `+N` task runs at epoch second floor(now) + N, found by a
# thread that polls every 0.5 s. So it fires up to 0.5 s after that second.
SCHEDULER_POLL = 0.5
# Our clock to FreeSWITCH adding the task (one loopback round trip); if a second
# boundary passes in between, FreeSWITCH counts from the next second.
SEND_MARGIN = 0.25


def deadline_seconds(now: datetime, at: datetime) -> int:
    """The ``N`` of ``sched_api +N`` so that the task fires no later than ``at``.

    For ``N >= 1`` the task fires by ``s + N + SCHEDULER_POLL`` where ``s`` is
    FreeSWITCH's epoch second when it adds the task, at most
    ``floor(now + SEND_MARGIN)``. (``+0`` is due at once and runs at the next
    poll, up to 0.5 s after *now*: the caller kills at once instead.)
    Rounding down costs up to ~1.75 s of paid time, never an unpaid second.
    """
    second = math.floor(now.timestamp() + SEND_MARGIN)
    return math.floor(at.timestamp() - SCHEDULER_POLL - second)


def parse_show_channels(body: bytes) -> list[dict[str, str]]:
    """Rows of ``show channels as json``; ``{"row_count": 0}`` has no rows (07)."""
    try:
        obj = json.loads(body.decode("utf-8", "replace"))
    except ValueError as exc:
        raise PbxError(f"FreeSWITCH sent unreadable `show channels as json`: {exc}") from exc
    rows = obj.get("rows", []) if isinstance(obj, dict) else []
    return [r for r in rows if isinstance(r, dict)]


def gate_commands(decision: Decision) -> bytes:
    """What the gate writes once it has decided (traces 06a, 06b).

    Variables first (the dialplan's check extension reads them), then a
    refused call is hung up with its cause, an allowed one resumed; ``exit``
    closes the socket either way.
    """
    max_seconds = "" if decision.max_seconds is None else str(decision.max_seconds)
    out = [
        commands.sendmsg_execute("set", f"callgate_result={decision.result}"),
        commands.sendmsg_execute("set", f"callgate_reason={decision.reason.value}"),
        commands.sendmsg_execute("set", f"callgate_max_seconds={max_seconds}"),
    ]
    if decision.allow:
        out.append(commands.command("resume"))
    else:
        out.append(commands.sendmsg_execute("hangup", decision.hangup_cause.name))
    out.append(commands.command("exit"))
    return b"".join(out)


GATE_REPLIES = 5  # one command/reply per command written by gate_commands()


def over_budget(budget: float) -> Decision:
    return Decision(False, Reason.LEDGER_UNAVAILABLE,
                    f"no decision within the {budget:g} s budget (fail closed)")


# --------------------------------------------------------------------------
# asyncio shell
# --------------------------------------------------------------------------


class _EslLink:
    """One authenticated inbound ESL connection: commands with FIFO replies,
    bgapi jobs by Job-UUID, events to a callback."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_event: Callable[[EslEvent], None]) -> None:
        self.reader = reader
        self.writer = writer
        self.on_event = on_event
        self.parser = EslParser()
        self.pending: deque[tuple[str, asyncio.Future[CommandReply | ApiResponse]]] = deque()
        self.jobs: dict[str, asyncio.Future[bytes]] = {}
        self.last_rx = asyncio.get_running_loop().time()
        self.closed_reason = ""
        self._greeting: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def read_loop(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                self.last_rx = asyncio.get_running_loop().time()
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
            _, fut = self.pending.popleft()
            if not fut.done():
                fut.set_result(frame)
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
            cmd, fut = self.pending.popleft()
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

    async def send(self, label: str, data: bytes,
                   timeout: float = COMMAND_TIMEOUT) -> CommandReply | ApiResponse:
        if self.writer.is_closing():
            raise PbxError(f"ESL link is down; `{label}` not sent")
        fut: asyncio.Future[CommandReply | ApiResponse] = (
            asyncio.get_running_loop().create_future())
        self.pending.append((label, fut))
        self.writer.write(data)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            self.close(f"FreeSWITCH did not answer `{label}` within {timeout:g} s")
            raise PbxError(f"FreeSWITCH did not answer `{label}` within {timeout:g} s") from None

    async def api(self, cmd: str, timeout: float = COMMAND_TIMEOUT) -> ApiResponse:
        reply = await self.send(f"api {cmd}", commands.api(cmd), timeout)
        if not isinstance(reply, ApiResponse):
            raise PbxError(f"`api {cmd}` got {reply.reply_text!r} instead of an api/response")
        return reply

    async def bgapi(self, cmd: str, timeout: float = COMMAND_TIMEOUT) -> bytes:
        job = str(uuidlib.uuid4())
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.jobs[job] = fut
        try:
            reply = await self.send(f"bgapi {cmd}", commands.bgapi(cmd, job), timeout)
            if not isinstance(reply, CommandReply) or not reply.ok:
                raise PbxError(f"`bgapi {cmd}` refused: {reply!r}")
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise PbxError(f"no BACKGROUND_JOB for `bgapi {cmd}` within {timeout:g} s") from None
        finally:
            self.jobs.pop(job, None)

    def close(self, reason: str) -> None:
        self.closed_reason = self.closed_reason or reason
        self.writer.close()


class FreeswitchAdapter:
    """FreeSWITCH as a :class:`~agent.calls.PbxControl`, plus the inline gate."""

    def __init__(self, settings: FreeswitchSettings, gate: GateFunc, sink: EventSink, *,
                 clock: Callable[[], datetime] = now_utc) -> None:
        self.settings = settings
        self.gate = gate
        self.sink = sink
        self.clock = clock
        self.tracker = CallTracker(settings)
        self._link: _EslLink | None = None
        self._connected = False
        self._held: list[CallEvent] | None = None  # events seen while listing calls
        self._deadline_group: dict[str, str] = {}  # call id -> armed sched_api group
        self._deadline_step: dict[str, int] = {}
        self._outbound_address: tuple[str, int] | None = None
        self._listening = asyncio.Event()
        self._connected_event = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.gate_connections = 0  # gate sockets served (for metrics)
        self.listener: GateListener | None = None  # the gate socket's, once run() binds it

    # -- public surface -------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def outbound_address(self) -> tuple[str, int] | None:
        return self._outbound_address

    async def wait_connected(self) -> None:
        """Until the inbound link is up and live calls were listed."""
        await self._connected_event.wait()

    async def wait_listening(self) -> None:
        """Until the outbound-socket gate is bound (see :attr:`outbound_address`)."""
        await self._listening.wait()

    async def run(self) -> None:
        """Serve the gate and keep inbound ESL connected until cancelled.

        Raises :class:`EslAuthError` when FreeSWITCH refuses the password.
        """
        server: asyncio.Server | None = None
        if self.settings.password == "ClueCon":
            log.warning("freeswitch.default_esl_password",
                        hint="set your own password in event_socket.conf.xml and agent.yaml")
        try:
            if self.settings.outbound_listen is not None:
                host, port = self.settings.outbound_listen
                # Past the in-flight bound (at most gate_max_pending) new ones are closed
                # unread (agent/pbx/_listener.py): the dialplan refuses them at once.
                self.listener = GateListener(self._serve_gate, limit=64 * 1024,
                                             max_pending=self.settings.gate_max_pending,
                                             budget=self.settings.decision_budget)
                server = await asyncio.get_running_loop().create_server(
                    self.listener, host, port, backlog=1024)
                sock = server.sockets[0].getsockname()
                self._outbound_address = (sock[0], sock[1])
                self._listening.set()
                log.info("freeswitch.gate_listening", address=f"{sock[0]}:{sock[1]}")
            await self._inbound_forever()
        finally:
            if server is not None:
                server.close()
            for task in list(self._tasks):
                task.cancel()

    async def hangup(self, call_id: str, cause: HangupCause) -> None:
        await self._kill(call_id, cause.name)

    async def set_deadline(self, call_id: str, at: datetime) -> None:
        """Arm ``uuid_kill <uuid> ALLOTTED_TIMEOUT`` no later than ``at``, then
        delete the previous one (see :func:`deadline_seconds` for the rounding).

        ``sched_hangup`` cannot be replaced (a second one adds a task; the
        earliest wins), so each step is a ``sched_api`` in its own group and the
        previous group is deleted only after the new one is armed: no gap
        (DESIGN.md, verified facts). The first step also deletes the
        dialplan's ``sched_hangup`` (its group is the channel uuid).
        """
        seconds = deadline_seconds(self.clock(), at)
        if seconds < 1:
            # Too close for the whole-second scheduler: +0 is due at once but
            # waits for the next poll, up to 0.5 s from now, maybe past `at`.
            with contextlib.suppress(CallGone):
                await self._kill(call_id, HangupCause.ALLOTTED_TIMEOUT.name)
            return
        step = self._deadline_step.get(call_id, 0) + 1
        self._deadline_step[call_id] = step
        group = f"callgate_{call_id}_{step}"
        previous = self._deadline_group.get(call_id, call_id)
        reply = await self._api(
            f"sched_api +{seconds} {group} uuid_kill {call_id} ALLOTTED_TIMEOUT")
        if not reply.text.startswith("+OK"):
            raise PbxError(f"sched_api for {call_id} refused: {reply.text.strip()}")
        if self._deadline_step.get(call_id) != step:
            # The call ended while this task was being armed (its end popped the
            # step): the task would fire at a channel that is gone. Delete it too.
            await self._api(f"sched_del {group}")
        else:
            self._deadline_group[call_id] = group
        await self._api(f"sched_del {previous}")

    async def active_calls(self) -> list[ActiveCall]:
        link = self._require_link()
        return await self._list_calls(link)

    async def bgapi(self, cmd: str) -> str:
        """Run an API command in the background; its output via BACKGROUND_JOB."""
        link = self._require_link()
        return (await link.bgapi(cmd)).decode("utf-8", "replace")

    # -- control --------------------------------------------------------------

    def _require_link(self) -> _EslLink:
        if self._link is None or not self._connected:
            raise PbxError("not connected to FreeSWITCH ESL")
        return self._link

    async def _api(self, cmd: str) -> ApiResponse:
        return await self._require_link().api(cmd)

    async def _kill(self, call_id: str, cause: str) -> None:
        reply = await self._api(f"uuid_kill {call_id} {cause}")
        text = reply.text.strip()
        if text.startswith(NO_SUCH_CHANNEL):
            raise CallGone(f"FreeSWITCH has no channel {call_id}")
        if not text.startswith("+OK"):
            raise PbxError(f"uuid_kill {call_id} {cause} failed: {text}")

    async def _list_calls(self, link: _EslLink) -> list[ActiveCall]:
        """Live A-legs: ``show channels as json``, then ``uuid_dump`` of each.

        The channel list lags the events by about a second (README, "API reply
        bodies"): a channel that just ended is still listed, but ``uuid_dump``
        answers ``-ERR No such channel!`` for it, so it is dropped here. The
        dump also has the answer time, which the list lacks.
        """
        rows = parse_show_channels((await link.api("show channels as json")).body)
        uuids = [r["uuid"] for r in rows if r.get("direction") == "inbound" and r.get("uuid")]
        dumps: list[ApiResponse] = []
        for i in range(0, len(uuids), LIST_PIPELINE):
            # Replies come back in command order, so a batch can be in flight at once.
            dumps += await asyncio.gather(*(link.api(f"uuid_dump {u}")
                                            for u in uuids[i : i + LIST_PIPELINE]))
        calls: list[ActiveCall] = []
        for dump in dumps:
            if not dump.ok:  # listed but already gone: "-ERR No such channel!"
                continue
            headers = EncodedHeaders(HeaderBlock(dump.text))
            calls.append(ActiveCall(
                call=call_info(headers, self.settings),
                answered_at=usec_to_datetime(headers.get("Caller-Channel-Answered-Time")),
                created_at=usec_to_datetime(headers.get("Caller-Channel-Created-Time")),
            ))
        return calls

    # -- inbound ESL ----------------------------------------------------------

    async def _inbound_forever(self) -> None:
        delay = self.settings.reconnect_min
        while True:
            was_up = False
            try:
                was_up = await self._session()
            except EslAuthError:
                raise
            except (OSError, PbxError, TimeoutError) as exc:
                log.warning("freeswitch.esl_down", error=str(exc))
            if was_up:
                delay = self.settings.reconnect_min
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.reconnect_max)

    async def _session(self) -> bool:
        s = self.settings
        async with asyncio.timeout(COMMAND_TIMEOUT):
            reader, writer = await asyncio.open_connection(s.esl_host, s.esl_port)
        link = _EslLink(reader, writer, self._on_event)
        reader_task = asyncio.create_task(link.read_loop())
        up = False
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                await link.greeting()
            reply = await link.send("auth", commands.auth(s.password))
            if not isinstance(reply, CommandReply) or not reply.ok:
                text = reply.reply_text if isinstance(reply, CommandReply) else repr(reply)
                raise EslAuthError(
                    f"FreeSWITCH at {s.esl_host}:{s.esl_port} refused the ESL password "
                    f"({text}); give pbx.esl the password of event_socket.conf.xml")
            self.tracker.reset()
            reply = await link.send("event", commands.events(SUBSCRIBED_EVENTS))
            if not isinstance(reply, CommandReply) or not reply.ok:
                raise PbxError(f"FreeSWITCH refused the event subscription: {reply!r}")
            self._link = link
            self._held = []  # events from here on wait until the calls are listed
            self._connected = True  # commands may flow while listing
            calls = await self._list_calls(link)
            held, self._held = self._held, None
            ended = {e.call_id for e in held if isinstance(e, CallEnded)}
            self.tracker.mark_answered({c.call.call_id for c in calls
                                        if c.answered_at is not None} - ended)
            self._deliver(PbxConnected(tuple(calls)))
            for event in held:
                self._deliver(event)
            up = True
            self._connected_event.set()
            log.info("freeswitch.esl_connected", calls=len(calls))
            watchdog = asyncio.create_task(self._watchdog(link))
            try:
                await reader_task
            finally:
                watchdog.cancel()
            return up
        finally:
            self._connected = False
            self._connected_event.clear()
            self._held = None
            if self._link is link:
                self._link = None
            link.close("session ended")
            reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader_task
            link.fail_all(link.closed_reason or "ESL link closed")
            if up:
                self._deliver(PbxDisconnected(link.closed_reason or "ESL link closed"))

    async def _watchdog(self, link: _EslLink) -> None:
        """Half-open links send nothing: ping with ``api status`` after silence."""
        loop = asyncio.get_running_loop()
        timeout = self.settings.heartbeat_timeout
        while True:
            await asyncio.sleep(min(5.0, timeout / 3))
            if loop.time() - link.last_rx < timeout:
                continue
            try:
                await link.api("status", timeout=min(5.0, timeout))
            except PbxError:
                link.close(f"no traffic for {timeout:g} s and no reply to `api status`")
                return

    def _on_event(self, event: EslEvent) -> None:
        for call_event in self.tracker.feed(event):
            if isinstance(call_event, CallEnded):
                self._deadline_step.pop(call_event.call_id, None)
                group = self._deadline_group.pop(call_event.call_id, None)
                if group is not None:
                    # The last deadline outlives the channel; left armed, it fires
                    # later as `-ERR No such channel!` (seen on 1.10.12).
                    self._spawn(self._delete_deadline(call_event.call_id, group))
            if (isinstance(call_event, CallRequested)
                    and call_event.call.context in self.settings.watch_only_contexts):
                self._spawn(self._watch_only(call_event.call))
            if self._held is not None:
                self._held.append(call_event)
            else:
                self._deliver(call_event)

    def _deliver(self, event: CallEvent) -> None:
        """Hand an event to the sink; a failing sink must not stop metering of other calls."""
        try:
            self.sink(event)
        except Exception:
            log.exception("freeswitch.sink_failed", kind=type(event).__name__)

    async def _watch_only(self, call: CallInfo) -> None:
        decision = await self._decide(call)
        log.info("freeswitch.watch_only", call_id=call.call_id, account=call.accountcode,
                 result=decision.result,
                 reason=decision.reason.value)
        if decision.allow:
            return
        try:
            await self._kill(call.call_id, decision.hangup_cause.name)
        except PbxError as exc:
            log.warning("freeswitch.watch_only_kill_failed", call_id=call.call_id,
                        account=call.accountcode,
                        error=str(exc))

    async def _delete_deadline(self, call_id: str, group: str) -> None:
        try:
            await self._api(f"sched_del {group}")
        except PbxError as exc:  # the link is down: the task fires harmlessly later
            log.info("freeswitch.deadline_not_deleted", call_id=call_id, group=group,
                     error=str(exc))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _decide(self, call: CallInfo) -> Decision:
        budget = self.settings.decision_budget
        loop = asyncio.get_running_loop()
        arrived = loop.time() if call.received_at is None else call.received_at
        try:
            async with asyncio.timeout_at(arrived + budget):  # from the connection's arrival
                return await self.gate(call)
        except TimeoutError:
            log.warning("freeswitch.gate_over_budget", call_id=call.call_id,
                        account=call.accountcode, budget=budget)
            return over_budget(budget)
        except Exception as exc:  # the gate must answer; any failure refuses the call
            log.exception("freeswitch.gate_failed", call_id=call.call_id,
                          account=call.accountcode)
            return Decision(False, Reason.LEDGER_UNAVAILABLE, f"gate failed: {exc}")

    # -- outbound socket gate -------------------------------------------------

    async def _serve_gate(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        """One outbound-socket session: bounded in bytes (parser limits) and time
        (``GATE_IO_TIMEOUT`` for each exchange, the decision budget between), so
        a silent or garbage peer only ever holds its own connection."""
        self.gate_connections += 1
        parser = EslParser()
        loop = asyncio.get_running_loop()
        # The decision budget runs from here: the `connect` exchange is spent from
        # it, as the dialplan is already waiting (issue 21).
        received = loop.time()
        call: CallInfo | None = None
        try:
            async with asyncio.timeout(GATE_IO_TIMEOUT) as io_deadline:
                writer.write(CONNECT)
                data = await _read_frames(reader, parser, 1, ChannelData)
                channel = data[0]
                assert isinstance(channel, ChannelData)
                if not channel.ok:
                    raise PbxError(f"connect refused: {channel.headers.get('Reply-Text')!r}")
                call = replace(call_info(channel.headers, self.settings, Direction.OUTBOUND),
                               received_at=received)
                if not call.call_id:
                    # Every real connect reply names its channel (trace 06a); one
                    # that does not is not a call, and nothing may be admitted for it.
                    raise PbxError("connect reply without a Unique-ID; not a call")
                io_deadline.reschedule(None)  # the decision has its own budget
                decision = await self._decide(call)
                writer.write(gate_commands(decision))
                io_deadline.reschedule(loop.time() + GATE_IO_TIMEOUT)
                replies = await _read_frames(reader, parser, GATE_REPLIES, CommandReply)
            # A refused channel is hung up by FreeSWITCH, which may close the
            # socket before it answers `exit`: four replies are enough then.
            if len(replies) < GATE_REPLIES - 1 or not all(
                    isinstance(r, CommandReply) and r.ok for r in replies):
                raise PbxError(f"gate commands not all accepted: {replies!r}"[:300])
            log.debug("freeswitch.gate", call_id=call.call_id, account=call.accountcode,
                      result=decision.result,
                      reason=decision.reason.value)
        except (TimeoutError, OSError, PbxError) as exc:
            log.warning("freeswitch.gate_socket_failed", error=str(exc) or type(exc).__name__,
                        call_id=call.call_id if call else None,
                        account=call.accountcode if call else None)
        finally:
            writer.close()


CONNECT = commands.command("connect")


async def _read_frames(reader: asyncio.StreamReader, parser: EslParser, count: int,
                       kind: type) -> list[object]:
    """Read until ``count`` frames of ``kind`` arrived; events in between are
    skipped (the gate does not subscribe, but a peer may send them)."""
    got: list[object] = []
    while len(got) < count:
        for frame in parser.events():
            if isinstance(frame, kind):
                got.append(frame)
            elif isinstance(frame, ConnectionClosed):
                if kind is CommandReply:
                    return got
                raise PbxError("peer closed the gate socket before the channel data")
            elif isinstance(frame, ParseError):
                raise PbxError(f"garbage on the gate socket: {frame.reason}")
        if len(got) >= count:
            break
        parser.receive_data(await reader.read(65536))
    return got


__all__ = [
    "SUBSCRIBED_EVENTS",
    "CallTracker",
    "EslAuthError",
    "FreeswitchAdapter",
    "FreeswitchSettings",
    "call_info",
    "gate_commands",
]
