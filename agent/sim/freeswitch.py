"""A FreeSWITCH stand-in on loopback: inbound ESL server and outbound-socket client.

It behaves like the FreeSWITCH 1.10.12 recorded in ``shared/traces/freeswitch``
as far as callgate can tell: the ``auth/request`` greeting and auth replies
(a wrong password gets ``-ERR invalid``, a disconnect notice and EOF, trace 07),
percent-encoded ``text/event-plain`` channel events with the fields of traces
01b-05, ``api``/``bgapi`` replies (BACKGROUND_JOB by ``Job-UUID``), the
scheduler (``sched_hangup``, ``sched_api`` groups, ``sched_del``),
``show channels as json`` lagging a second behind hang-ups, and the outbound
socket (``connect`` reply, ``sendmsg`` execute ``set``/``hangup``, ``resume``,
``linger``, ``exit``).

With ``gate=True`` a call runs the shipped fail-closed dialplan
(config/freeswitch/dialplan/default/00_callgate.xml), hunted in the file's own
order (:func:`hunt`): a number that matches ``callgate_emergency`` is bridged at
once, with no socket and no limit; one that ``callgate_outbound`` takes (every
other, as shipped) gets preset ``callgate_result=DENY``, ``socket <gate> async
full``, then re-hunt; only ``ALLOW`` with a positive ``callgate_max_seconds``
bridges, with ``sched_hangup +max ALLOTTED_TIMEOUT`` armed at that moment;
anything else is hung up with ``CALL_REJECTED`` (no extension at all:
``NO_ROUTE_DESTINATION``).

Time is real loop time. One task per call, events encoded once and written to
every subscriber, so a few thousand concurrent calls are fine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

CORE_UUID = "13dc3736-70af-42d6-82c5-a46b3649c4d3"  # as in the traces
SHIPPED_DIALPLAN = (Path(__file__).resolve().parents[2] / "config" / "freeswitch" / "dialplan"
                    / "default" / "00_callgate.xml")


def read_hunt_order(path: Path = SHIPPED_DIALPLAN) -> tuple[tuple[str, re.Pattern[str]], ...]:
    """The dialplan file's extensions in hunt order: (name, its first condition's
    ``destination_number`` expression). FreeSWITCH runs the first extension whose
    condition matches; an extension whose first condition is on another field is
    left out (the shipped file has none)."""
    order = []
    for ext in ET.parse(path).getroot().iter("extension"):
        cond = ext.find("condition")
        if cond is not None and cond.get("field") == "destination_number":
            order.append((ext.get("name", ""), re.compile(cond.get("expression", ""))))
    return tuple(order)


def hunt(destination: str,
         order: tuple[tuple[str, re.Pattern[str]], ...] | None = None) -> str | None:
    """The name of the extension the shipped dialplan runs for ``destination``
    (None: no extension matches, FreeSWITCH ends the call NO_ROUTE_DESTINATION)."""
    for name, expression in read_hunt_order() if order is None else order:
        if expression.search(destination):
            return name
    return None


def fs_billsec(answered_us: int, hangup_us: int) -> int:
    """FreeSWITCH 1.10.12's ``billsec``: the hang-up's whole epoch second minus the
    answer's (switch_channel.c), not the talk time floored or rounded: 1.32 s of
    talk gave 2, 2.14 s gave 3, 2.54 s gave 3 (measured by the real-PBX tier).
    Always floor(talk) or ceil(talk)."""
    if not answered_us:
        return 0
    return hangup_us // 1_000_000 - answered_us // 1_000_000
DISCONNECT_BODY = b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
Q850 = {"NORMAL_CLEARING": 16, "USER_BUSY": 17, "NO_ANSWER": 19, "CALL_REJECTED": 21,
        "OUTGOING_CALL_BARRED": 52, "NORMAL_TEMPORARY_FAILURE": 41, "ALLOTTED_TIMEOUT": 602,
        "ORIGINATOR_CANCEL": 487, "SYSTEM_SHUTDOWN": 503}
MAX_COMMAND_BYTES = 64 * 1024


def encode(value: str) -> str:
    """Percent-encode like FreeSWITCH: ``/`` and ``,`` stay (README, event bodies)."""
    return quote(value, safe="/,")


def _now_us() -> int:
    return time.time_ns() // 1000


def _block(headers: Sequence[tuple[str, str]]) -> bytes:
    return "".join(f"{k}: {v}\n" for k, v in headers).encode()


Pairs = Sequence[tuple[str, str]]


def _reply(text: str, extra: Pairs = ()) -> bytes:
    return _block([("Content-Type", "command/reply"), ("Reply-Text", text), *extra]) + b"\n"


def _api_response(body: str) -> bytes:
    data = body.encode()
    return f"Content-Type: api/response\nContent-Length: {len(data)}\n\n".encode() + data


def _disconnect(extra: Pairs = ()) -> bytes:
    return (_block([("Content-Type", "text/disconnect-notice"), *extra,
                    ("Content-Length", str(len(DISCONNECT_BODY)))]) + b"\n" + DISCONNECT_BODY)


@dataclass
class SimChannel:
    uuid: str
    leg: Literal["A", "B"]
    caller: str
    destination: str
    context: str
    name: str
    other: str = ""
    created_us: int = field(default_factory=_now_us)
    answered_us: int = 0
    hangup_us: int = 0
    cause: str = ""
    by_scheduler: bool = False  # hung up by a scheduled task, not by a command or a party
    variables: dict[str, str] = field(default_factory=dict)
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def call_state(self) -> str:
        if self.hangup_us:
            return "HANGUP"
        return "ACTIVE" if self.answered_us else ("RINGING" if self.leg == "A" else "DOWN")


@dataclass(frozen=True)
class CallResult:
    """What a placed call came to, by the simulator's own clock."""

    call_id: str
    answered_at: datetime | None
    ended_at: datetime
    billsec: int
    cause: str
    by_deadline: bool  # ended by a scheduled task (sched_hangup/sched_api), not by uuid_kill
    gate_result: str  # callgate_result at the end ("" when not gated)
    bridged: bool


class CallHandle:
    def __init__(self, a_leg: SimChannel) -> None:
        self.a_leg = a_leg
        self.call_id = a_leg.uuid
        self._done: asyncio.Future[CallResult] = asyncio.get_running_loop().create_future()
        self.bridged = False

    async def ended(self) -> CallResult:
        return await asyncio.shield(self._done)

    def _finish(self) -> None:
        if self._done.done():
            return
        a = self.a_leg
        answered = a.answered_us
        self._done.set_result(CallResult(
            call_id=a.uuid,
            answered_at=datetime.fromtimestamp(answered / 1e6, UTC) if answered else None,
            ended_at=datetime.fromtimestamp(a.hangup_us / 1e6, UTC),
            billsec=fs_billsec(answered, a.hangup_us),
            cause=a.cause,
            by_deadline=a.by_scheduler,
            gate_result=a.variables.get("callgate_result", ""),
            bridged=self.bridged,
        ))


class _EslServerConn:
    """One inbound ESL client (a callgate adapter, or a test)."""

    def __init__(self, sim: FreeswitchSimulator, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.sim = sim
        self.reader = reader
        self.writer = writer
        self.authed = False
        self.events: set[str] = set()
        self.closed = False
        self.frozen = False  # half-open: reads nothing, sends nothing, never closes
        self.filters: list[tuple[str, str]] = []  # `filter` (an event passes if any matches)

    def wants(self, name: str, headers: list[tuple[str, str]]) -> bool:
        """mod_event_socket: subscribed, and with filters, one of them matches."""
        if self.closed or (name not in self.events and "ALL" not in self.events):
            return False
        return not self.filters or any(pair in self.filters for pair in headers)

    def write(self, data: bytes) -> None:
        if not self.closed and not self.frozen and not self.writer.is_closing():
            self.writer.write(data)

    def close(self) -> None:
        self.closed = True
        self.writer.close()

    async def serve(self) -> None:
        self.write(b"Content-Type: auth/request\n\n")
        buf = b""
        try:
            while not self.closed:
                data = await self.reader.read(65536)
                if not data:
                    return
                if self.frozen:
                    continue
                buf += data
                while b"\n\n" in buf:
                    cmd, buf = buf.split(b"\n\n", 1)
                    await self.handle(cmd.decode("utf-8", "replace"))
                if len(buf) > MAX_COMMAND_BYTES:
                    return
        except OSError:
            return
        finally:
            self.close()

    async def handle(self, block: str) -> None:
        line, *rest = block.split("\n")
        word, _, arg = line.strip().partition(" ")
        if not self.authed:
            if word == "auth":
                if arg == self.sim.password:
                    self.authed = True
                    self.write(_reply("+OK accepted"))
                else:  # trace 07, conn badauth
                    self.write(_reply("-ERR invalid"))
                    self.write(_disconnect())
                    self.close()
            else:  # trace 07, conn noauth
                self.write(_reply("-ERR command not found"))
            return
        if word == "event":
            fmt, _, names = arg.partition(" ")
            if fmt != "plain":
                self.write(_reply("-ERR only plain events in the simulator"))
                return
            self.events |= set(names.split())
            self.write(_reply("+OK event listener enabled plain"))
        elif word == "noevents":
            self.events.clear()
            self.write(_reply("+OK no longer listening for events"))
        elif word == "filter":
            header, _, value = arg.partition(" ")
            if header == "delete":
                header, _, value = value.partition(" ")
                self.filters = [] if header == "all" else [
                    f for f in self.filters if f != (header, value) and (value or f[0] != header)]
                self.write(_reply(f"+OK filter deleted. [{header}][{value}]"))
            elif not value:
                self.write(_reply("-ERR invalid syntax"))  # trace 07
            else:
                self.filters.append((header, value))
                self.write(_reply(f"+OK filter added. [{header}]=[{value}]"))
        elif word == "api":
            if self.sim.command_delay > 0:
                # A drowning FreeSWITCH: replies late, in order; events still flow.
                await asyncio.sleep(self.sim.command_delay)
            self.write(_api_response(self.sim.api(arg)))
        elif word == "bgapi":
            headers = dict(r.split(": ", 1) for r in rest if ": " in r)
            job = headers.get("Job-UUID") or str(uuidlib.uuid4())
            self.write(_reply(f"+OK Job-UUID: {job}", [("Job-UUID", job)]))
            self.sim.background_job(job, arg)
        elif word == "exit":
            self.write(_reply("+OK bye"))
            self.write(_disconnect())
            self.close()
        else:
            self.write(_reply("-ERR command not found"))


class FreeswitchSimulator:
    """``async with FreeswitchSimulator(password, outbound_address=...) as sim``."""

    def __init__(self, password: str = "ClueCon",
                 outbound_address: tuple[str, int] | None = None, *,
                 show_channels_lag: float = 1.0, answer_skew: float = 0.02,
                 heartbeat_interval: float = 20.0, socket_timeout: float = 5.0,
                 scheduler_poll: float = 0.5) -> None:
        self.password = password
        self.outbound_address = outbound_address
        self.show_channels_lag = show_channels_lag  # `show channels` lists dead ones (07)
        self.answer_skew = answer_skew  # B-leg answers ~20 ms before the A-leg (01b)
        self.heartbeat_interval = heartbeat_interval
        self.socket_timeout = socket_timeout  # the sim bounds a silent gate; FreeSWITCH waits
        self.scheduler_poll = scheduler_poll
        self.hunt_order = read_hunt_order()  # the shipped dialplan, read now
        self.command_delay = 0.0  # > 0: every api reply this late (an overloaded PBX)
        self.esl_address: tuple[str, int] = ("127.0.0.1", 0)
        self.channels: dict[str, SimChannel] = {}
        self._listed: dict[str, SimChannel] = {}  # what `show channels` still shows
        self._handles: dict[str, CallHandle] = {}
        self._conns: set[_EslServerConn] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # task id -> (group, runtime in whole epoch seconds, action), as switch_scheduler.c
        self._sched: dict[int, tuple[str, int, Callable[[], object]]] = {}
        self._sched_ids = itertools.count(1)
        self._in_scheduler = False  # a scheduled task is running (its hang-ups are by_scheduler)
        self._seq = itertools.count(1000)
        # api/bgapi commands received from ESL clients, for tests (bounded for long demos)
        self.api_log: deque[str] = deque(maxlen=10_000)

    async def __aenter__(self) -> FreeswitchSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1",
                                                  self.esl_address[1], backlog=1024)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.esl_address = (host, port)
        self._spawn(self._heartbeats())
        self._spawn(self._scheduler())

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.drop_esl_connections()
        self._sched.clear()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- controls -------------------------------------------------------------

    def live_calls(self) -> list[str]:
        """A-leg uuids of calls still up."""
        return [c.uuid for c in self.channels.values() if c.leg == "A"]

    def drop_esl_connections(self) -> None:
        """Cut every inbound ESL connection (calls go on)."""
        for conn in list(self._conns):
            conn.close()

    def freeze_esl_connections(self) -> None:
        """Make every current ESL connection half-open: silent, but never closed
        (a dead host or a dropped NAT entry). New connections work normally."""
        for conn in self._conns:
            conn.frozen = True

    async def restart(self) -> None:
        """As if FreeSWITCH restarted: connections cut, every call gone without events."""
        if self._server is not None:
            self._server.close()
        self.drop_esl_connections()
        for chan in list(self.channels.values()):
            chan.hangup_us = chan.hangup_us or _now_us()
            chan.cause = chan.cause or "SYSTEM_SHUTDOWN"
            chan.hung_up.set()
            if chan.uuid in self._handles:
                self._handles.pop(chan.uuid)._finish()
        self.channels.clear()
        self._listed.clear()
        self._sched.clear()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1",
                                                  self.esl_address[1], backlog=1024)

    async def place_call(
        self, caller: str = "1000", destination: str = "15550100", *,
        accountcode: str | None = "acme",
        outcome: Literal["answer", "busy", "noanswer"] = "answer",
        ring_seconds: float = 0.05, talk_seconds: float | None = None,
        hangup_by: Literal["caller", "callee"] = "caller", gate: bool = True,
        context: str = "default", dialplan: Literal["callgate", "naive"] = "callgate",
    ) -> CallHandle:
        """Start a call from a SIP phone; returns at once with its handle.

        ``dialplan="naive"`` runs ``socket ... async full`` then ``bridge``, the
        dialplan of the traces, which bridges whenever the gate did not hang the
        call up (06d, 06e); ``"callgate"`` is config/freeswitch's fail-closed one.
        """
        a = SimChannel(str(uuidlib.uuid4()), "A", caller, destination, context,
                       f"sofia/internal/{caller}@127.0.0.1:5261")
        self.channels[a.uuid] = self._listed[a.uuid] = a
        handle = CallHandle(a)
        self._handles[a.uuid] = handle
        self._emit("CHANNEL_CREATE", a)
        self._spawn(self._run_call(handle, accountcode, outcome, ring_seconds, talk_seconds,
                                   hangup_by, gate, dialplan == "naive"))
        return handle

    # -- call flow ------------------------------------------------------------

    async def _run_call(self, handle: CallHandle, accountcode: str | None, outcome: str,
                        ring: float, talk: float | None, hangup_by: str, gate: bool,
                        naive: bool = False) -> None:
        a = handle.a_leg
        try:
            if accountcode:
                a.variables["accountcode"] = accountcode
            a.variables["callgate_dest"] = a.destination
            route = hunt(a.destination, self.hunt_order) if gate and not naive else None
            if gate and not naive and route == "callgate_emergency":
                pass  # straight to the trunk, no limit
            elif gate and not naive and route != "callgate_outbound":
                # no extension (404), or a dialled "callgate_check": nothing set, refused
                self.hangup(a, "NO_ROUTE_DESTINATION" if route is None else "CALL_REJECTED")
                return
            elif gate and naive:
                await self._outbound_socket(a)
                if a.hangup_us:
                    return
            elif gate:
                a.variables["callgate_result"] = "DENY"  # fail closed: preset
                a.variables.pop("callgate_max_seconds", None)  # `set callgate_max_seconds=`
                await self._outbound_socket(a)
                if a.hangup_us:
                    return
                # transfer -> callgate_check: the two conditions of 00_callgate.xml
                max_s = a.variables.get("callgate_max_seconds", "")
                if not (re.search(r"^ALLOW$", a.variables.get("callgate_result", ""))
                        and re.search(r"^[1-9][0-9]*$", max_s)):
                    self.hangup(a, "CALL_REJECTED")  # anti-action
                    return
                self._schedule(f"+{max_s}", a.uuid,
                               lambda: self._api(f"uuid_kill {a.uuid} ALLOTTED_TIMEOUT"))
            await self._bridge(handle, outcome, ring, talk, hangup_by)
        finally:
            if not a.hangup_us:
                self.hangup(a, "NORMAL_CLEARING")

    async def _bridge(self, handle: CallHandle, outcome: str, ring: float,
                      talk: float | None, hangup_by: str) -> None:
        a = handle.a_leg
        b = SimChannel(str(uuidlib.uuid4()), "B", a.caller, a.destination, a.context,
                       f"sofia/external/{a.destination}@127.0.0.1:5290", other=a.uuid)
        self.channels[b.uuid] = self._listed[b.uuid] = b
        a.other = b.uuid
        self._emit("CHANNEL_CREATE", b)
        if await _wait(a.hung_up, ring):  # caller gave up while ringing
            self.hangup(b, "ORIGINATOR_CANCEL")
            return
        if outcome == "busy":  # trace 03a: both legs USER_BUSY
            self.hangup(b, "USER_BUSY")
            self.hangup(a, "USER_BUSY")
            return
        if outcome == "noanswer":  # trace 03b: B NO_ANSWER, A NORMAL_CLEARING
            self.hangup(b, "NO_ANSWER")
            self.hangup(a, "NORMAL_CLEARING")
            return
        b.answered_us = _now_us()
        self._emit("CHANNEL_ANSWER", b)
        if self.answer_skew and await _wait(a.hung_up, self.answer_skew):
            self.hangup(b, "NORMAL_CLEARING")
            return
        a.answered_us = _now_us()
        handle.bridged = True
        self._emit("CHANNEL_ANSWER", a)
        self._emit("CHANNEL_BRIDGE", a, [("Bridge-A-Unique-ID", a.uuid),
                                         ("Bridge-B-Unique-ID", b.uuid)])
        ended = await _wait(a.hung_up, talk)
        if ended or b.hangup_us:
            if not b.hangup_us:
                self.hangup(b, "NORMAL_CLEARING")
            return
        if hangup_by == "callee":  # trace 02: B-leg first
            self.hangup(b, "NORMAL_CLEARING")
            self.hangup(a, "NORMAL_CLEARING")
        else:
            self.hangup(a, "NORMAL_CLEARING")
            self.hangup(b, "NORMAL_CLEARING")

    def hangup(self, chan: SimChannel, cause: str) -> None:
        """Hang a channel up; once bridged, the other leg follows with
        NORMAL_CLEARING (trace 05). Before answer the legs end separately (03a/03b)."""
        if chan.hangup_us:
            return
        chan.hangup_us = _now_us()
        chan.cause = cause
        self.channels.pop(chan.uuid, None)
        chan.hung_up.set()
        self._emit("CHANNEL_HANGUP_COMPLETE", chan)
        loop = asyncio.get_running_loop()
        loop.call_later(self.show_channels_lag, self._listed.pop, chan.uuid, None)
        # Scheduled tasks outlive the channel, as in FreeSWITCH: they fire later
        # and find no channel (uuid_kill answers -ERR No such channel!).
        if chan.leg == "A":
            handle = self._handles.pop(chan.uuid, None)
            if handle is not None:
                handle._finish()
        if chan.answered_us and chan.other and chan.other in self.channels:
            self.hangup(self.channels[chan.other], "NORMAL_CLEARING")

    # -- outbound socket (the gate) ----------------------------------------------

    async def _outbound_socket(self, a: SimChannel) -> None:
        """``socket <addr> async full``: refused or failing -> the dialplan goes on (06e)."""
        if self.outbound_address is None:
            return
        try:
            reader, writer = await asyncio.open_connection(*self.outbound_address)
        except OSError:
            return  # "Socket Error: Connection refused", trace 06e
        buf = b""
        try:
            async with asyncio.timeout(self.socket_timeout):
                while True:
                    while b"\n\n" not in buf:
                        data = await reader.read(65536)
                        if not data:
                            return  # closed without resume: dialplan goes on (06d)
                        buf += data
                        if len(buf) > MAX_COMMAND_BYTES:
                            return
                    block, buf = buf.split(b"\n\n", 1)
                    if self._outbound_command(a, block.decode("utf-8", "replace"), writer):
                        return
        except (TimeoutError, OSError):
            return
        finally:
            writer.close()

    def _outbound_command(self, a: SimChannel, block: str,
                          writer: asyncio.StreamWriter) -> bool:
        """One command on the outbound socket; True when the session is over."""
        line, *rest = block.split("\n")
        word, _, arg = line.strip().partition(" ")
        headers = dict(r.split(": ", 1) for r in rest if ": " in r)
        if word == "connect":  # trace 06a: ~170 encoded headers, Content-Type last
            head = self._channel_headers("CHANNEL_DATA", a)
            writer.write(_block([*head, ("Content-Type", "command/reply"),
                                 ("Reply-Text", "%2BOK%0A"), ("Socket-Mode", "async"),
                                 ("Control", "full")]) + b"\n")
        elif word == "myevents":
            writer.write(_reply("+OK Events Enabled"))
        elif word == "linger":
            writer.write(_reply(f"+OK will linger {arg} seconds" if arg else "+OK will linger"))
        elif word == "resume":
            writer.write(_reply("+OK"))
        elif word == "sendmsg":
            command = headers.get("call-command")
            if command == "execute":
                app = headers.get("execute-app-name", "")
                app_arg = headers.get("execute-app-arg", "")
                writer.write(_reply("+OK"))
                if app == "set" and "=" in app_arg:
                    name, _, value = app_arg.partition("=")
                    a.variables[name] = value
                elif app == "hangup":
                    self.hangup(a, app_arg or "NORMAL_CLEARING")
                    writer.write(_disconnect([("Controlled-Session-UUID", a.uuid),
                                              ("Content-Disposition", "disconnect")]))
                    return True
            elif command == "hangup":
                writer.write(_reply("+OK"))
                self.hangup(a, headers.get("hangup-cause", "NORMAL_CLEARING"))
                return True
            else:
                writer.write(_reply("-ERR invalid command"))
        elif word == "exit":
            writer.write(_reply("+OK bye"))
            writer.write(_disconnect([("Controlled-Session-UUID", a.uuid),
                                      ("Content-Disposition", "disconnect")]))
            return True
        else:
            writer.write(_reply("-ERR command not found"))
        return False

    # -- API ------------------------------------------------------------------

    def api(self, cmdline: str) -> str:
        """One API command from a client, logged in :attr:`api_log`."""
        self.api_log.append(cmdline)
        return self._api(cmdline)

    def _api(self, cmdline: str) -> str:
        """One API command's output (trace 07 for the exact texts)."""
        cmd, _, arg = cmdline.strip().partition(" ")
        args = arg.split()
        if cmd == "status":
            return (f"UP 0 years, 0 days\nFreeSWITCH (Version 1.10.12-release callgate-sim) "
                    f"is ready\n{len(self.channels)} session(s)\n")
        if cmd == "show" and arg == "channels as json":
            rows = [self._row(c) for c in self._listed.values()]
            if not rows:
                return '{"row_count": 0}\n'
            return json.dumps({"row_count": len(rows), "rows": rows}, separators=(",", ":"))
        if cmd in ("uuid_kill", "uuid_dump", "uuid_getvar", "uuid_exists", "uuid_setvar"):
            chan = self.channels.get(args[0]) if args else None
            if cmd == "uuid_exists":
                return "true" if chan else "false"
            if chan is None:
                return "-ERR No such channel!\n"
            if cmd == "uuid_kill":
                chan.by_scheduler = chan.by_scheduler or (self._in_scheduler and not chan.hangup_us)
                self.hangup(chan, args[1] if len(args) > 1 else "NORMAL_CLEARING")
                return "+OK\n"
            if cmd == "uuid_dump":
                return _block(self._channel_headers("CHANNEL_DATA", chan)).decode()
            if cmd == "uuid_setvar" and len(args) >= 2:
                chan.variables[args[1]] = " ".join(args[2:])
                return "+OK\n"
            return chan.variables.get(args[1], "_undef_") if len(args) > 1 else "_undef_"
        if cmd == "sched_hangup":  # sched_hangup +N <uuid> [cause], trace 05
            if len(args) < 2 or args[1] not in self.channels:
                return "-ERR No such channel!\n"
            cause = args[2] if len(args) > 2 else "ALLOTTED_TIMEOUT"
            target = args[1]
            self._schedule(args[0], target, lambda: self._api(f"uuid_kill {target} {cause}"))
            return "+OK\n"
        if cmd == "sched_api":  # sched_api +N <group> <command...>
            if len(args) < 3:
                return "-ERR Invalid syntax\n"
            command = " ".join(args[2:])
            task_id = self._schedule(args[0], args[1], lambda: self._api(command))
            return f"+OK Added: {task_id}\n"
        if cmd == "sched_del":
            if not args:
                return "-ERR Invalid syntax\n"
            n = 0
            for gid, (group, _, _) in list(self._sched.items()):
                if group == args[0] or str(gid) == args[0]:
                    del self._sched[gid]
                    n += 1
            return f"+OK Deleted: {n}\n"
        return f"-ERR {cmd} Command not found!\n"

    def background_job(self, job: str, cmdline: str) -> None:
        output = self.api(cmdline)  # FreeSWITCH runs it in a thread; here at once
        cmd, _, arg = cmdline.partition(" ")
        self._broadcast("BACKGROUND_JOB", [
            ("Job-UUID", job), ("Job-Command", cmd), ("Job-Command-Arg", encode(arg)),
        ], body=output.encode())

    def _schedule(self, when: str, group: str, action: Callable[[], object]) -> int:
        """Add a task like FreeSWITCH's scheduler: ``+N`` is N whole seconds after
        the current *epoch second* (so up to 1 s early), a bare number is an
        absolute epoch second; tasks run at the first poll at or after that
        second (polled every ``scheduler_poll`` s, 0.5 in switch_scheduler.c)."""
        now = int(time.time())
        runtime = now + int(when[1:]) if when[:1] in "+@" else int(when)
        task_id = next(self._sched_ids)
        self._sched[task_id] = (group, runtime, action)
        return task_id

    async def _scheduler(self) -> None:
        while True:
            await asyncio.sleep(self.scheduler_poll)
            now = int(time.time())
            for task_id, (_, runtime, action) in list(self._sched.items()):
                if runtime <= now and self._sched.pop(task_id, None) is not None:
                    self._in_scheduler = True
                    try:
                        action()
                    finally:
                        self._in_scheduler = False

    # -- events ---------------------------------------------------------------

    def _row(self, c: SimChannel) -> dict[str, str]:
        return {"uuid": c.uuid, "direction": "inbound" if c.leg == "A" else "outbound",
                "created": datetime.fromtimestamp(c.created_us / 1e6, UTC).strftime(
                    "%Y-%m-%d %H:%M:%S"),
                "created_epoch": str(c.created_us // 1_000_000), "name": c.name,
                "state": "CS_EXECUTE", "cid_name": c.caller, "cid_num": c.caller,
                "dest": c.destination, "context": c.context,
                "accountcode": c.variables.get("accountcode", "") if c.leg == "A" else "",
                "callstate": c.call_state, "call_uuid": c.uuid if c.leg == "A" else c.other}

    def _channel_headers(self, name: str, c: SimChannel,
                         extra: Pairs = ()) -> list[tuple[str, str]]:
        now = _now_us()
        direction = "inbound" if c.leg == "A" else "outbound"
        h = [
            ("Event-Name", name), ("Core-UUID", CORE_UUID),
            ("FreeSWITCH-Hostname", "sim"), ("FreeSWITCH-Switchname", "sim"),
            ("Event-Date-Timestamp", str(now)),
            ("Event-Sequence", str(next(self._seq))),
        ]
        if name == "CHANNEL_HANGUP_COMPLETE":  # it carries Hangup-Cause twice (01b)
            h.append(("Hangup-Cause", c.cause))
        h += [
            *extra,
            ("Channel-State", "CS_EXECUTE" if not c.hangup_us else "CS_REPORTING"),
            ("Channel-Call-State", c.call_state),
            ("Channel-Name", encode(c.name)), ("Unique-ID", c.uuid),
            ("Call-Direction", direction), ("Presence-Call-Direction", direction),
            ("Answer-State", "answered" if c.answered_us else "ringing"),
        ]
        if c.hangup_us:
            h.append(("Hangup-Cause", c.cause))
        h += [
            ("Caller-Direction", direction), ("Caller-Username", encode(c.caller)),
            ("Caller-Caller-ID-Name", encode(c.caller)),
            ("Caller-Caller-ID-Number", encode(c.caller)),
            ("Caller-Network-Addr", "127.0.0.1"),
            ("Caller-Destination-Number", encode(c.destination)),
            ("Caller-Unique-ID", c.uuid), ("Caller-Source", "mod_sofia"),
            ("Caller-Context", encode(c.context)),
            ("Caller-Channel-Name", encode(c.name)),
            ("Caller-Channel-Created-Time", str(c.created_us)),
            ("Caller-Channel-Answered-Time", str(c.answered_us)),
            ("Caller-Channel-Hangup-Time", str(c.hangup_us)),
        ]
        if c.other:
            h.append(("Other-Leg-Unique-ID", c.other))
        h += [("variable_direction", direction), ("variable_uuid", c.uuid),
              ("variable_channel_name", encode(c.name))]
        if c.leg == "A":  # the B-leg never inherits the dialplan's variables (01b)
            h += [(f"variable_{k}", encode(v)) for k, v in c.variables.items()]
        if name == "CHANNEL_HANGUP_COMPLETE":
            billmsec = (c.hangup_us - c.answered_us) // 1000 if c.answered_us else 0
            h += [("variable_hangup_cause", c.cause),
                  ("variable_hangup_cause_q850", str(Q850.get(c.cause, 16))),
                  ("variable_answer_epoch", str(c.answered_us // 1_000_000)),
                  ("variable_end_epoch", str(c.hangup_us // 1_000_000)),
                  ("variable_billsec", str(fs_billsec(c.answered_us, c.hangup_us))),
                  ("variable_billmsec", str(billmsec))]
        return h

    def _emit(self, name: str, chan: SimChannel,
              extra: Pairs = ()) -> None:
        self._broadcast(name, self._channel_headers(name, chan, extra))

    def _broadcast(self, name: str, headers: list[tuple[str, str]], body: bytes = b"") -> None:
        if headers[0][0] != "Event-Name":
            headers = [("Event-Name", name), ("Core-UUID", CORE_UUID),
                       ("Event-Date-Timestamp", str(_now_us())), *headers]
        targets = [c for c in self._conns if c.wants(name, headers)]
        if not targets:
            return
        if body:
            headers = [*headers, ("Content-Length", str(len(body)))]
        payload = _block(headers) + b"\n" + body
        frame = (f"Content-Length: {len(payload)}\nContent-Type: text/event-plain\n\n"
                 .encode() + payload)
        for conn in targets:
            conn.write(frame)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            self._broadcast("HEARTBEAT", [("Event-Info", "System%20Ready")])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _EslServerConn(self, reader, writer)
        self._conns.add(conn)
        try:
            await conn.serve()
        finally:
            self._conns.discard(conn)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


@dataclass(frozen=True)
class TraceChunk:
    """One message of a recorded trace: ``#@ <time> +<s> <conn> <SEND|RECV> <N>``."""

    at: str
    conn: str
    direction: Literal["SEND", "RECV"]
    data: bytes


def read_trace(path: str | Path) -> list[TraceChunk]:
    """Read a ``shared/traces/freeswitch`` file: by byte count, never by looking
    for the next marker (README there, "File format")."""
    raw = Path(path).read_bytes()
    chunks: list[TraceChunk] = []
    pos = 0
    while pos < len(raw):
        end = raw.index(b"\n", pos)
        line = raw[pos:end]
        pos = end + 1
        if line.startswith(b"#@ "):
            _, at, _, conn, direction, n = line.decode().split()
            if direction not in ("SEND", "RECV"):
                raise ValueError(f"{path}: bad marker {line!r}")
            chunks.append(TraceChunk(at, conn, direction, raw[pos : pos + int(n)]))  # type: ignore[arg-type]
            pos += int(n) + 1  # the data, then one "\n" that is not part of it
    return chunks


def trace_stream(path: str | Path, conn: str = "inbound", direction: str = "RECV") -> bytes:
    """The exact TCP byte stream of one side of one connection."""
    return b"".join(c.data for c in read_trace(path)
                    if c.conn == conn and c.direction == direction)


async def _wait(event: asyncio.Event, seconds: float | None) -> bool:
    """Wait up to ``seconds`` (None = forever) for ``event``; True if it was set.

    Timed by the wall clock the CDR's billsec is computed from: a loop timer
    may fire early by up to its resolution (uvloop: 1 ms), which would make
    3 s of talk billsec 2.
    """
    if event.is_set() or seconds is None:
        await event.wait()
        return True
    due = time.time() + seconds
    while (left := due - time.time()) > 0:
        try:
            async with asyncio.timeout(left):
                await event.wait()
            return True
        except TimeoutError:
            continue
    return event.is_set()
