"""The FreeSWITCH adapter: ESL outbound-socket gate, inbound ESL metering and control.

Three jobs, one object (:class:`FreeswitchAdapter`, an :class:`agent.calls.PbxControl`):

* **Gate** (outbound socket): the dialplan's ``socket 127.0.0.1:8084 async full``
  connects here; we send ``connect``, read the channel data, ask ``gate`` within
  the decision budget, set ``callgate_result`` / ``callgate_reason`` /
  ``callgate_max_seconds`` and hang a refused call up with its cause (traces
  06a-06d). The shipped dialplan re-checks ``callgate_result`` after the socket,
  so a gate that is down or silent refuses the call (config/freeswitch/README.md).
* **Metering** (inbound ESL): authenticate, subscribe to the A-leg's answer and
  end only (an ESL filter drops every B-leg event), list live calls after every
  (re)connect, and turn those events into :mod:`agent.calls` events for the sink.
* **Control**: ``uuid_kill`` to cut a call; ``sched_api`` groups for a PBX-side
  deadline that is replaced without a gap (DESIGN.md, verified facts).

The event -> call-event translation and what to subscribe to live in
:mod:`agent.pbx.freeswitch_calls` (pure); the inbound connection itself, with
its slow-or-dead verdict, in :mod:`agent.pbx.freeswitch_link`. This module is
the shell: it serves the gate, keeps the link up and reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import structlog

from agent.calls import (
    ActiveCall,
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
from agent.pbx._listener import BACKLOG, DEFAULT_MAX_PENDING, GateListener, arrived_at
from agent.pbx.esl import (
    ApiResponse,
    ChannelData,
    CommandReply,
    ConnectionClosed,
    EncodedHeaders,
    EslEvent,
    EslParser,
    HeaderBlock,
    ParseError,
    commands,
)
from agent.pbx.freeswitch_calls import (
    EVENT_FILTERS,
    SUBSCRIBED_EVENTS,
    CallTracker,
    call_info,
    parse_show_channels,
    subscription,
    usec_to_datetime,
)
from agent.pbx.freeswitch_link import EslLink, PbxSlow
from agent.pbx.liveness import DOWN, SLOW, UP, CommandTimer, LinkHealth

log = structlog.get_logger("callgate.freeswitch")

NO_SUCH_CHANNEL = "-ERR No such channel!"  # uuid_kill / uuid_getvar on a dead uuid (07)
COMMAND_TIMEOUT = 5.0  # seconds for a reply before a command fails (doubled while slow)
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
    command_timeout: float = COMMAND_TIMEOUT  # a command fails after it; the link stays
    command_timeout_max: float | None = None  # backed off up to this (None: dead_after)
    dead_after: float = 30.0  # no byte at all for this long while a reply is due = dead
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0

    def timeout_ceiling(self) -> float:
        return self.dead_after if self.command_timeout_max is None else self.command_timeout_max


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


class FreeswitchAdapter:
    """FreeSWITCH as a :class:`~agent.calls.PbxControl`, plus the inline gate."""

    def __init__(self, settings: FreeswitchSettings, gate: GateFunc, sink: EventSink, *,
                 clock: Callable[[], datetime] = now_utc) -> None:
        self.settings = settings
        self.gate = gate
        self.sink = sink
        self.clock = clock
        self.tracker = CallTracker(settings, clock)
        self._link: EslLink | None = None
        self._connected = False
        self._held: list[CallEvent] | None = None  # events seen while listing calls
        self._deadline_group: dict[str, str] = {}  # call id -> armed sched_api group
        self._deadline_step: dict[str, int] = {}
        self._outbound_address: tuple[str, int] | None = None
        self._listening = asyncio.Event()
        self._connected_event = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.gate_connections = 0  # gate sockets served (for metrics)
        self.health = LinkHealth()  # the inbound link: up / slow / down (metrics, /status)
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
                    self.listener, host, port, backlog=BACKLOG)
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
        if self.health.state == SLOW:
            # A drowning PBX is not asked for its whole channel list as well.
            raise PbxSlow("FreeSWITCH is answering late; the live calls are listed later")
        return await self._list_calls(link)

    async def bgapi(self, cmd: str) -> str:
        """Run an API command in the background; its output via BACKGROUND_JOB."""
        link = self._require_link()
        return (await link.bgapi(cmd)).decode("utf-8", "replace")

    # -- control --------------------------------------------------------------

    def _require_link(self) -> EslLink:
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

    async def _list_calls(self, link: EslLink) -> list[ActiveCall]:
        """Live A-legs: ``show channels as json``, read against what the events
        told (:meth:`CallTracker.listing`); ``uuid_dump`` only for an answered
        channel whose answer was not seen (after a (re)connect, every one).

        The channel list lags the events by about a second (README, "API reply
        bodies"): a channel that just ended is still listed; the tracker knows
        it ended, and ``uuid_dump`` answers ``-ERR No such channel!`` for it.
        """
        rows = parse_show_channels((await link.api("show channels as json")).body)
        listing = self.tracker.listing(rows)
        dumps: list[ApiResponse] = []
        for i in range(0, len(listing.to_dump), LIST_PIPELINE):
            # Replies come back in command order, so a batch can be in flight at once.
            dumps += await asyncio.gather(*(link.api(f"uuid_dump {u}")
                                            for u in listing.to_dump[i : i + LIST_PIPELINE]))
        calls = list(listing.calls)
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
        async with asyncio.timeout(s.command_timeout):
            reader, writer = await asyncio.open_connection(s.esl_host, s.esl_port)
        link = EslLink(reader, writer, self._on_event, health=self.health,
                       timer=CommandTimer(s.command_timeout, s.timeout_ceiling()),
                       dead_after=s.dead_after)
        reader_task = asyncio.create_task(link.read_loop())
        up = False
        try:
            async with asyncio.timeout(s.command_timeout):
                await link.greeting()
            reply = await link.send("auth", commands.auth(s.password))
            if not isinstance(reply, CommandReply) or not reply.ok:
                text = reply.reply_text if isinstance(reply, CommandReply) else repr(reply)
                raise EslAuthError(
                    f"FreeSWITCH at {s.esl_host}:{s.esl_port} refused the ESL password "
                    f"({text}); give pbx.esl the password of event_socket.conf.xml")
            self.tracker.reset()
            for cmd in subscription(s):
                reply = await link.send(cmd.decode().strip(), cmd)
                if not isinstance(reply, CommandReply) or not reply.ok:
                    raise PbxError(f"FreeSWITCH refused `{cmd.decode().strip()}`: {reply!r}")
            self._link = link
            self._held = []  # events from here on wait until the calls are listed
            self._connected = True  # commands may flow while listing
            self.health.state = UP
            calls = await self._list_calls(link)
            held, self._held = self._held, None
            # the tracker saw the held events already: a call that ended is not marked
            self.tracker.mark_answered(calls)
            self._deliver(PbxConnected(tuple(calls)))
            for event in held:
                self._deliver(event)
            up = True
            self._connected_event.set()
            log.info("freeswitch.esl_connected", calls=len(calls))
            watchdog = asyncio.create_task(link.watch(s.heartbeat_timeout))
            try:
                await asyncio.wait({reader_task, watchdog}, return_when="FIRST_COMPLETED")
            finally:
                watchdog.cancel()
            return up
        finally:
            self._connected = False
            self._connected_event.clear()
            self._held = None
            self.health.state = DOWN
            if self._link is link:
                self._link = None
            link.close("session ended")
            reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader_task
            link.fail_all(link.closed_reason or "ESL link closed")
            if up:
                self.health.reconnects += 1
                self._deliver(PbxDisconnected(link.closed_reason or "ESL link closed"))

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
        # The decision budget runs from the connection's arrival in the accept queue
        # (the listener read its age): that wait and the `connect` exchange are spent
        # from it, as the dialplan is already waiting (issue 21).
        received = arrived_at(reader)
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
    "EVENT_FILTERS",
    "SUBSCRIBED_EVENTS",
    "CallTracker",
    "EslAuthError",
    "FreeswitchAdapter",
    "FreeswitchSettings",
    "call_info",
    "gate_commands",
    "parse_show_channels",
]
