"""A simulated Asterisk 20 on loopback: AMI server, FastAGI client, recorded traces.

Built from the recordings in ``traces/asterisk`` (README there): the same
banner, login replies (a wrong secret answers ``Authentication failed`` after a
delay and closes, 07b), the same event names, fields and order for answered
(01, 02), busy (03), no-answer (03b), ``Hangup`` action (04),
``AbsoluteTimeout`` expiry (05: no event marks it, just ``SoftHangupRequest``
and ``Hangup``), the FastAGI gate (06, 06b, 06d) and ``CoreShowChannels`` /
``Getvar`` / ``Ping`` replies (07). ``Cdr`` ``BillableSeconds`` is truncated
like Asterisk's ``cdr_object_get_billsec``.

With ``gate=True`` a call runs the shipped dialplan (config/asterisk/
extensions.conf): FastAGI request to ``agi_address``; the call goes on only if
``CALLGATE_RESULT`` is exactly ``ALLOW`` and ``CALLGATE_MAX_SECONDS`` is a
positive number, else ``Hangup(21)``; nothing listening means
``AGISTATUS=FAILURE`` and so a refusal. It then dials with ``L()`` = that many
seconds of talk, in place from the moment the call is allowed.

Time is the event loop's real time. Used by the tests, ``make demo`` and the
benchmarks; it holds thousands of concurrent calls (one task per call).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import shlex
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from agent.pbx import ami

BANNER = b"Asterisk Call Manager/9.0.0\r\n"  # trace 01, first chunk
AGI_VERSION = "20.20.1"
CAUSE_TEXT = {
    0: "Unknown",
    16: "Normal Clearing",
    17: "User busy",
    19: "No user responding",
    21: "Call Rejected",
    29: "Facility rejected",
    41: "Temporary failure",
    52: "Outgoing call barred",
}
STATE_DESC = {0: "Down", 4: "Ring", 5: "Ringing", 6: "Up"}
# Event class of each event the simulator writes (the Privilege header, traces).
DIALPLAN_EVENTS = frozenset({"VarSet", "Newexten"})


def _stamp(t: float) -> str:
    """Cdr time format (trace 01: ``2026-11-24 21:55:11``); the sim's PBX clock is UTC."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def cdr_billsec(answered: float | None, end: float, initiatedseconds: bool = False) -> int:
    """Asterisk's ``cdr_object_get_billsec`` (main/cdr.c): whole milliseconds of
    talk, truncated to seconds; with ``initiatedseconds = yes`` a remainder of
    500 ms or more counts one more second (half up, not a ceiling)."""
    if answered is None:
        return 0
    ms = int((end - answered) * 1000)
    if initiatedseconds and ms % 1000 >= 500:
        return ms // 1000 + 1
    return ms // 1000


@dataclass
class SimChannel:
    name: str
    uniqueid: str
    linkedid: str
    caller_num: str
    caller_name: str
    context: str
    exten: str
    accountcode: str = ""
    connected_num: str = "<unknown>"
    connected_name: str = "<unknown>"
    state: int = 0
    priority: int = 1
    application: str = ""
    appdata: str = ""
    created: float = field(default_factory=time.time)
    answered: float | None = None
    bridge: str = ""
    variables: dict[str, str] = field(default_factory=dict)

    def fields(self) -> list[tuple[str, str]]:
        """The channel snapshot block every channel event carries (trace 01)."""
        return [
            ("Channel", self.name),
            ("ChannelState", str(self.state)),
            ("ChannelStateDesc", STATE_DESC.get(self.state, "Unknown")),
            ("CallerIDNum", self.caller_num),
            ("CallerIDName", self.caller_name),
            ("ConnectedLineNum", self.connected_num),
            ("ConnectedLineName", self.connected_name),
            ("Language", "en"),
            ("AccountCode", self.accountcode),
            ("Context", self.context),
            ("Exten", self.exten),
            ("Priority", str(self.priority)),
            ("Uniqueid", self.uniqueid),
            ("Linkedid", self.linkedid),
        ]

    def dest_fields(self) -> list[tuple[str, str]]:
        return [("Dest" + k, v) for k, v in self.fields()]


@dataclass(frozen=True)
class CallResult:
    """What the simulated PBX says about a finished call."""

    call_id: str
    answered_at: datetime | None
    ended_at: datetime
    billsec: int
    cause: int
    ended_by: str  # caller | callee | ami | deadline | limit | busy | noanswer | denied | restart
    agi_status: str = ""  # SUCCESS | FAILURE | HANGUP | "" (no gate)
    variables: dict[str, str] = field(default_factory=dict)

    @property
    def by_deadline(self) -> bool:
        """Ended by the PBX-side limit (TIMEOUT(absolute), extended by AbsoluteTimeout)."""
        return self.ended_by in ("deadline", "limit")


class SimCall:
    """A call placed on the simulator; ``await call.ended()`` for its figures."""

    def __init__(self, sim: AsteriskSimulator, caller: SimChannel) -> None:
        self.sim = sim
        self.caller = caller
        self.callee: SimChannel | None = None
        self.answered = asyncio.Event()
        self._end: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        self._result: asyncio.Future[CallResult] = asyncio.get_running_loop().create_future()
        self._timeout: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.destination = caller.exten

    @property
    def call_id(self) -> str:
        return self.caller.uniqueid

    @property
    def channel(self) -> str:
        return self.caller.name

    def request_end(self, by: str, cause: int = 16) -> None:
        if not self._end.done():
            self._end.set_result((by, cause))

    def hangup(self, by: str = "caller") -> None:
        """The caller or the callee hangs up (a SIP BYE)."""
        self.request_end(by)

    def set_timeout(self, seconds: float) -> None:
        """AbsoluteTimeout: a later one replaces the earlier (DESIGN.md facts).

        Due by the wall clock the CDR is timed with: a loop timer may fire early
        by up to its resolution (uvloop: 1 ms), which would end a 2 s limit at
        billsec 1; Asterisk's scheduler does not.
        """
        if self._timeout is not None:
            self._timeout.cancel()
        loop = asyncio.get_running_loop()
        due = time.time() + seconds

        def expire() -> None:
            left = due - time.time()
            if left > 0:
                self._timeout = loop.call_later(left, expire)
            else:
                self.request_end("deadline", 16)

        self._timeout = loop.call_later(seconds, expire)

    async def ended(self) -> CallResult:
        return await asyncio.shield(self._result)

    def result_nowait(self) -> CallResult | None:
        return self._result.result() if self._result.done() else None


class _AmiClientSession:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.logged_in = False
        self.classes: frozenset[str] | None = frozenset()  # None = all; before login: none
        self.stalled = False

    def wants(self, privilege: str) -> bool:
        if not self.logged_in or self.stalled:
            return False
        if self.classes is None:
            return True
        return any(c in self.classes for c in privilege.split(","))


SHIPPED_EVENTFILTER = (
    r"^Event: (Newchannel|NewAccountCode|DialBegin|DialEnd|BridgeEnter|Rename|Hangup"
    r"|HangupRequest|Cdr|FullyBooted)[^A-Za-z]"
)
"""The ``eventfilter`` of config/asterisk/manager.conf (a test keeps the two equal)."""


class EventFilter:
    """manager.conf ``eventfilter`` lines of one AMI user, as Asterisk applies them.

    Each is a regex searched in the whole event text; one starting with ``!``
    blocks what it matches. With any allowing filter an event must match one
    of them, and then no blocking one. Only events go through it: the replies
    to an action (CoreShowChannel items, FullyBooted at login) do not.
    """

    def __init__(self, lines: Iterable[str]) -> None:
        lines = list(lines)
        self.allow = [re.compile(line.encode()) for line in lines if not line.startswith("!")]
        self.block = [re.compile(line[1:].encode()) for line in lines if line.startswith("!")]

    def passes(self, event: bytes) -> bool:
        if self.allow and not any(r.search(event) for r in self.allow):
            return False
        return not any(r.search(event) for r in self.block)


class AsteriskSimulator:
    """``async with AsteriskSimulator("callgate", "secret") as sim:`` then ``sim.ami_address``."""

    def __init__(
        self,
        username: str = "callgate",
        secret: str = "callgate-secret",
        agi_address: tuple[str, int] | None = None,
        *,
        auth_fail_delay: float = 1.0,
        cdr: str | None = "after",
        timestampevents: bool = False,
        dialplan_events: bool = True,
        agi_timeout: float = 10.0,
        initiatedseconds: bool = False,
        eventfilter: Iterable[str] = (),
    ) -> None:
        """``cdr``: where the Cdr event goes relative to the caller's Hangup
        ("before", "after"; the traces show both), or None for no cdr_manager.
        ``initiatedseconds``: cdr.conf's option of that name (see :func:`cdr_billsec`).
        ``dialplan_events``: also write the VarSet/Newexten noise of the traces.
        ``eventfilter``: the AMI user's manager.conf ``eventfilter`` lines
        (:data:`SHIPPED_EVENTFILTER` is the one callgate ships); none by default."""
        self.username = username
        self.secret = secret
        self.agi_address = agi_address
        self.auth_fail_delay = auth_fail_delay
        self.cdr = cdr
        self.timestampevents = timestampevents
        self.dialplan_events = dialplan_events
        self.agi_timeout = agi_timeout
        self.initiatedseconds = initiatedseconds
        self.eventfilter = EventFilter(eventfilter)
        self._server: asyncio.Server | None = None
        self._port = 0
        self._sessions: set[_AmiClientSession] = set()
        self._calls: dict[str, SimCall] = {}
        self._channels: dict[str, SimChannel] = {}  # by name
        self._seq = itertools.count(0x26)
        self._epoch = int(time.time())
        self.actions: list[ami.Message] = []  # every action received, for tests
        self.logins = 0

    # -- lifecycle ----------------------------------------------------------
    async def __aenter__(self) -> AsteriskSimulator:
        await self._listen()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._serve_ami, "127.0.0.1", self._port, reuse_address=True
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for call in list(self._calls.values()):
            if call.task is not None:
                call.task.cancel()
        tasks = [c.task for c in self._calls.values() if c.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._calls.clear()
        await self._stop_ami()

    async def _stop_ami(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.drop_ami_connections()

    @property
    def ami_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self._port)

    def drop_ami_connections(self) -> None:
        """Close every AMI connection at once (calls go on)."""
        for session in list(self._sessions):
            session.writer.transport.abort()
        self._sessions.clear()

    def stall_ami_connections(self) -> None:
        """Half-open: current AMI connections stay open but nothing more is read or written."""
        for session in self._sessions:
            session.stalled = True

    async def restart(self, keep_calls: bool = False) -> None:
        """Stop and start the AMI listener on the same port; ``keep_calls=False``
        drops every call without events, as an Asterisk restart does."""
        await self._stop_ami()
        if not keep_calls:
            end = time.time()
            for call in list(self._calls.values()):
                # The PBX's own figures for a call it dropped: its talk ended now.
                ch = call.caller
                if not call._result.done():
                    call._result.set_result(CallResult(
                        ch.uniqueid,
                        datetime.fromtimestamp(ch.answered, UTC) if ch.answered else None,
                        datetime.fromtimestamp(end, UTC),
                        cdr_billsec(ch.answered, end, self.initiatedseconds),
                        0,
                        "restart",
                        variables=dict(ch.variables),
                    ))
                if call.task is not None:
                    call.task.cancel()
            self._calls.clear()
            self._channels.clear()
        await self._listen()

    def live_calls(self) -> list[SimCall]:
        return list(self._calls.values())

    def call(self, call_id: str) -> SimCall:
        return self._calls[call_id]

    # -- events -------------------------------------------------------------
    def emit(self, name: str, fields: list[tuple[str, str]], privilege: str = "call,all") -> None:
        if not self._sessions:
            return
        head = [("Privilege", privilege)]
        if self.timestampevents:
            head.append(("Timestamp", f"{time.time():.6f}"))
        data = ami.Message.build("Event", name, head + fields).to_bytes()
        if not self.eventfilter.passes(data):
            return
        for session in self._sessions:
            if session.wants(privilege):
                session.writer.write(data)

    def _dialplan(self, name: str, ch: SimChannel, extra: list[tuple[str, str]]) -> None:
        if self.dialplan_events:
            self.emit(name, ch.fields() + extra, "dialplan,all")

    def _newexten(self, ch: SimChannel, app: str, data: str) -> None:
        ch.application, ch.appdata = app, data
        self._dialplan(
            "Newexten", ch, [("Extension", ch.exten), ("Application", app), ("AppData", data)]
        )
        ch.priority += 1

    def _new_channel(
        self,
        prefix: str,
        linkedid: str | None,
        *,
        caller_num: str,
        caller_name: str,
        context: str,
        exten: str,
        accountcode: str = "",
    ) -> SimChannel:
        seq = next(self._seq)
        uid = f"{self._epoch}.{seq}"
        ch = SimChannel(
            name=f"SIP/{prefix}-{seq:08x}",
            uniqueid=uid,
            linkedid=linkedid or uid,
            caller_num=caller_num,
            caller_name=caller_name,
            context=context,
            exten=exten,
            accountcode=accountcode,
        )
        self._channels[ch.name] = ch
        self.emit("Newchannel", ch.fields())
        return ch

    def _state(self, ch: SimChannel, state: int) -> None:
        ch.state = state
        self.emit("Newstate", ch.fields())

    def _hangup_event(self, ch: SimChannel, cause: int) -> None:
        self._channels.pop(ch.name, None)
        self.emit(
            "Hangup",
            [*ch.fields(), ("Cause", str(cause)), ("Cause-txt", CAUSE_TEXT.get(cause, "Unknown"))],
        )

    def _cdr_event(
        self,
        call: SimCall,
        end: float,
        last_app: str,
        last_data: str,
        disposition: str,
        dest: SimChannel | None,
    ) -> int:
        ch = call.caller
        billsec = cdr_billsec(ch.answered, end, self.initiatedseconds)
        self.emit(
            "Cdr",
            [
                ("AccountCode", ch.accountcode),
                ("Source", ch.caller_num),
                ("Destination", call.destination),
                ("DestinationContext", ch.context),
                ("CallerID", f'"{ch.caller_name}" <{ch.caller_num}>'),
                ("Channel", ch.name),
                ("DestinationChannel", dest.name if dest else ""),
                ("LastApplication", last_app),
                ("LastData", last_data),
                ("StartTime", _stamp(ch.created)),
                ("AnswerTime", _stamp(ch.answered) if ch.answered is not None else ""),
                ("EndTime", _stamp(end)),
                ("Duration", str(int(end - ch.created))),
                ("BillableSeconds", str(billsec)),
                ("Disposition", disposition),
                ("AMAFlags", "DOCUMENTATION"),
                ("UniqueID", ch.uniqueid),
                ("UserField", ""),
            ],
            "cdr,all",
        )
        return billsec

    # -- calls ----------------------------------------------------------------
    async def place_call(
        self,
        caller: str = "2001",
        destination: str = "13800138000",
        accountcode: str = "acme",
        outcome: str = "answer",
        ring_seconds: float = 0.0,
        talk_seconds: float | None = None,
        hangup_by: str = "caller",
        gate: bool = True,
        caller_name: str = "Alice",
        context: str | None = None,
        dial_timeout: float = 60.0,
        cdr: str | bool | None = True,
    ) -> SimCall:
        """Start a call and return at once; ``await call.ended()`` for the figures.

        ``outcome``: answer | busy | noanswer (rings ``dial_timeout``).
        ``talk_seconds=None`` talks until hung up (``call.hangup()``), an AMI
        ``Hangup``, an ``AbsoluteTimeout`` or the gate's limit. ``cdr=True``
        uses the simulator's Cdr placement, a string or None overrides it.
        """
        if outcome not in ("answer", "busy", "noanswer"):
            raise ValueError(f"outcome must be answer, busy or noanswer, not {outcome!r}")
        if hangup_by not in ("caller", "callee"):
            raise ValueError(f"hangup_by must be caller or callee, not {hangup_by!r}")
        if context is None:
            context = "from-internal" if gate else "from-internal-noagi"
        prefix = "internal" if gate else "internal-noagi"
        # A gated peer carries its accountcode from sip.conf (trace 06); the
        # no-AGI dialplan sets it with Set(CHANNEL(accountcode)) (trace 01).
        ch = self._new_channel(
            prefix,
            None,
            caller_num=caller,
            caller_name=caller_name,
            context=context,
            exten=destination,
            accountcode=accountcode if gate else "",
        )
        call = SimCall(self, ch)
        self._calls[ch.uniqueid] = call
        cdr_mode = self.cdr if cdr is True else (None if cdr is False else cdr)
        call.task = asyncio.create_task(
            self._run_call(
                call,
                accountcode,
                outcome,
                ring_seconds,
                talk_seconds,
                hangup_by,
                gate,
                dial_timeout,
                cdr_mode,
            )
        )
        return call

    async def _run_call(
        self,
        call: SimCall,
        accountcode: str,
        outcome: str,
        ring: float,
        talk: float | None,
        hangup_by: str,
        gate: bool,
        dial_timeout: float,
        cdr_mode: str | None,
    ) -> None:
        ch = call.caller
        try:
            result = await self._script(
                call, accountcode, outcome, ring, talk, hangup_by, gate, dial_timeout, cdr_mode
            )
        except BaseException as exc:
            if not call._result.done():
                call._result.set_exception(
                    exc if isinstance(exc, Exception) else RuntimeError("call dropped")
                )
            raise
        finally:
            self._calls.pop(ch.uniqueid, None)
            if call._timeout is not None:
                call._timeout.cancel()
        call._result.set_result(result)

    async def _wait_end(self, call: SimCall, seconds: float | None) -> tuple[str, int] | None:
        """Wait ``seconds`` (None: forever) or until something ends the call.

        Timed by the wall clock the CDR is timed with, as :meth:`SimCall.set_timeout`:
        a loop timer firing early (uvloop: up to 1 ms) would make 3 s of talk
        billsec 2.
        """
        if seconds is None or call._end.done():
            return await asyncio.shield(call._end)
        due = time.time() + seconds
        while (left := due - time.time()) > 0:
            try:
                async with asyncio.timeout(left):
                    return await asyncio.shield(call._end)
            except TimeoutError:
                continue
        return None

    async def _script(
        self,
        call: SimCall,
        accountcode: str,
        outcome: str,
        ring: float,
        talk: float | None,
        hangup_by: str,
        gate: bool,
        dial_timeout: float,
        cdr_mode: str | None,
    ) -> CallResult:
        ch = call.caller
        self._dialplan("VarSet", ch, [("Variable", "SIPCALLID"), ("Value", f"{ch.uniqueid}@sim")])
        self._state(ch, 4)
        self._newexten(ch, "NoOp", f"callgate outbound {ch.caller_num} -> {ch.exten}")
        agi_status = ""
        limit: int | None = None
        if gate:
            # Set(CALLGATE_RESULT=DENY), Set(CALLGATE_MAX_SECONDS=): fail closed.
            ch.variables.update(CALLGATE_RESULT="DENY", CALLGATE_MAX_SECONDS="")
            self._newexten(ch, "AGI", "agi://127.0.0.1:4573/gate")
            agi_status = await self._agi(call)
            ch.variables["AGISTATUS"] = agi_status
            self._dialplan("VarSet", ch, [("Variable", "AGISTATUS"), ("Value", agi_status)])
            allowed, limit = self._dialplan_check(ch.variables)
            if agi_status == "HANGUP" or not allowed:
                # Hangup(21) from the dialplan, or the AGI HANGUP command (06d: cause 0).
                cause = 0 if agi_status == "HANGUP" else 21
                self._newexten(ch, "Hangup", str(cause))
                self.emit("SoftHangupRequest", [*ch.fields(), ("Cause", "16")])
                end = time.time()
                if cdr_mode == "before":
                    self._cdr_event(call, end, "Hangup", str(cause), "NO ANSWER", None)
                self._hangup_event(ch, cause)
                if cdr_mode == "after":
                    self._cdr_event(call, end, "Hangup", str(cause), "NO ANSWER", None)
                return CallResult(
                    ch.uniqueid,
                    None,
                    datetime.fromtimestamp(end, UTC),
                    0,
                    cause,
                    "denied",
                    agi_status,
                    dict(ch.variables),
                )
        elif accountcode:
            ch.accountcode = accountcode
            self.emit("NewAccountCode", [*ch.fields(), ("OldAccountCode", "")])
        # Set(TIMEOUT(absolute)=limit), then Dial(SIP/uas/${EXTEN},dial_timeout).
        # The limit is the channel's absolute timeout, the one AMI AbsoluteTimeout
        # replaces, so the meter can extend it; Dial's L() could not be extended.
        if limit:
            self._newexten(ch, "Set", f"TIMEOUT(absolute)={limit}")
            call.set_timeout(limit)
        dial_data = f"SIP/uas/{ch.exten},{dial_timeout:g}"
        self._newexten(ch, "Dial", dial_data)
        callee = self._new_channel(
            "uas",
            ch.uniqueid,
            caller_num="<unknown>",
            caller_name="<unknown>",
            context="from-trunk",
            exten="s",
        )
        call.callee = callee
        callee.caller_num, callee.exten = ch.exten, ch.exten
        callee.connected_num, callee.connected_name = ch.caller_num, ch.caller_name
        callee.accountcode = ch.accountcode
        callee.application, callee.appdata = "AppDial", "(Outgoing Line)"
        self.emit(
            "NewCallerid",
            [*callee.fields(), ("CID-CallingPres", "0 (Presentation Allowed, Not Screened)")],
        )
        self.emit("NewAccountCode", [*callee.fields(), ("OldAccountCode", "")])
        self.emit("NewConnectedLine", callee.fields())
        dial = [("DialString", f"uas/{ch.exten}")]
        self.emit("DialBegin", ch.fields() + callee.dest_fields() + dial)
        if outcome == "busy":
            self.emit("DialEnd", ch.fields() + callee.dest_fields() + [("DialStatus", "BUSY")])
            return self._failed(call, callee, 17, "BUSY", "busy", dial_data, cdr_mode, agi_status)
        self._state(callee, 5)
        self.emit("DialState", ch.fields() + callee.dest_fields() + [("DialStatus", "RINGING")])
        wait = dial_timeout if outcome == "noanswer" else min(ring, dial_timeout)
        stop = await self._wait_end(call, wait)
        if stop is not None or outcome == "noanswer" or ring >= dial_timeout:
            status = "CANCEL" if stop is not None else "NOANSWER"
            self.emit("DialEnd", ch.fields() + callee.dest_fields() + [("DialStatus", status)])
            by = stop[0] if stop else "noanswer"
            cause = stop[1] if stop else 16
            return self._failed(
                call, callee, cause, "NO ANSWER", by, dial_data, cdr_mode, agi_status
            )
        # Answer: callee Up, DialEnd ANSWER, caller Up, bridge (trace 01, ~1 ms).
        self._state(callee, 6)
        self.emit("DialEnd", ch.fields() + callee.dest_fields() + [("DialStatus", "ANSWER")])
        ch.answered = callee.answered = time.time()
        self._state(ch, 6)
        bridge = f"{ch.uniqueid}-bridge"
        ch.bridge = callee.bridge = bridge
        self.emit("BridgeCreate", self._bridge_fields(bridge, 0))
        self.emit("BridgeEnter", self._bridge_fields(bridge, 1) + callee.fields())
        self.emit("BridgeEnter", self._bridge_fields(bridge, 2) + ch.fields())
        call.answered.set()
        stop = await self._wait_end(call, talk)
        by, cause = stop if stop is not None else (hangup_by, 16)
        end = time.time()
        if by == "callee":
            self.emit("HangupRequest", [*callee.fields(), ("Cause", "16")])
            self.emit("BridgeLeave", self._bridge_fields(bridge, 1) + callee.fields())
            self._hangup_event(callee, 16)
            self.emit("BridgeLeave", self._bridge_fields(bridge, 0) + ch.fields())
            self.emit("BridgeDestroy", self._bridge_fields(bridge, 0))
        else:
            if by == "caller":
                self.emit("HangupRequest", [*ch.fields(), ("Cause", "16")])
            self.emit("BridgeLeave", self._bridge_fields(bridge, 1) + ch.fields())
            self.emit("BridgeLeave", self._bridge_fields(bridge, 0) + callee.fields())
            self.emit("BridgeDestroy", self._bridge_fields(bridge, 0))
        self.emit("SoftHangupRequest", [*ch.fields(), ("Cause", "16")])
        billsec = cdr_billsec(ch.answered, end, self.initiatedseconds)
        if cdr_mode == "before":
            self._cdr_event(call, end, "Dial", dial_data, "ANSWERED", callee)
        self._hangup_event(ch, cause)
        if by != "callee":
            self._hangup_event(callee, 16)
        if cdr_mode == "after":
            self._cdr_event(call, end, "Dial", dial_data, "ANSWERED", callee)
        return CallResult(
            ch.uniqueid,
            datetime.fromtimestamp(ch.answered, UTC),
            datetime.fromtimestamp(end, UTC),
            billsec,
            cause,
            by,
            agi_status,
            dict(ch.variables),
        )

    def _failed(
        self,
        call: SimCall,
        callee: SimChannel,
        cause: int,
        disposition: str,
        by: str,
        dial_data: str,
        cdr_mode: str | None,
        agi_status: str,
    ) -> CallResult:
        """Busy / no answer / ended while ringing (03, 03b): two Cdr records."""
        ch = call.caller
        self._hangup_event(callee, 17 if cause == 17 else 16)
        self.emit("SoftHangupRequest", [*ch.fields(), ("Cause", "16")])
        end = time.time()
        if cdr_mode == "before":
            self._cdr_event(call, end, "Dial", dial_data, disposition, callee)
        self._hangup_event(ch, cause)
        if cdr_mode is not None:
            if cdr_mode == "after":
                self._cdr_event(call, end, "Dial", dial_data, disposition, callee)
            self._cdr_event(call, end, "Hangup", "", disposition, None)
        return CallResult(
            ch.uniqueid,
            None,
            datetime.fromtimestamp(end, UTC),
            0,
            cause,
            by,
            agi_status,
            dict(ch.variables),
        )

    @staticmethod
    def _bridge_fields(bridge: str, count: int) -> list[tuple[str, str]]:
        return [
            ("BridgeUniqueid", bridge),
            ("BridgeType", "basic"),
            ("BridgeTechnology", "simple_bridge"),
            ("BridgeCreator", "<unknown>"),
            ("BridgeName", "<unknown>"),
            ("BridgeNumChannels", str(count)),
            ("BridgeVideoSourceMode", "none"),
        ]

    @staticmethod
    def _dialplan_check(variables: dict[str, str]) -> tuple[bool, int | None]:
        """The shipped dialplan: go on only on exactly ALLOW with a positive limit."""
        if variables.get("CALLGATE_RESULT") != "ALLOW":
            return False, None
        seconds = variables.get("CALLGATE_MAX_SECONDS", "")
        if re.fullmatch(r"[1-9][0-9]*", seconds) is None:  # REGEX("^[1-9][0-9]*$" ...)
            return False, None
        return True, int(seconds)

    # -- FastAGI client ---------------------------------------------------------
    def agi_request(self, ch: SimChannel) -> bytes:
        """The request headers Asterisk 20 writes (trace 06-fastagi-deny.agi.txt)."""
        host, port = self.agi_address or ("127.0.0.1", 4573)
        headers = [
            ("network", "yes"),
            ("network_script", "gate"),
            ("request", f"agi://{host}:{port}/gate"),
            ("channel", ch.name),
            ("language", "en"),
            ("type", "SIP"),
            ("uniqueid", ch.uniqueid),
            ("version", AGI_VERSION),
            ("callerid", ch.caller_num),
            ("calleridname", ch.caller_name),
            ("callingpres", "0"),
            ("callingani2", "0"),
            ("callington", "0"),
            ("callingtns", "0"),
            ("dnid", ch.exten),
            ("rdnis", "unknown"),
            ("context", ch.context),
            ("extension", ch.exten),
            ("priority", str(ch.priority)),
            ("enhanced", "0.0"),
            ("accountcode", ch.accountcode),
            ("threadid", "140030151648960"),
        ]
        return "".join(f"agi_{k}: {v}\n" for k, v in headers).encode("utf-8") + b"\n"

    async def _agi(self, call: SimCall) -> str:
        """Run AGI(agi://.../gate): SUCCESS, FAILURE (no listener) or HANGUP (06d)."""
        ch = call.caller
        if self.agi_address is None:
            return "FAILURE"
        try:
            async with asyncio.timeout(self.agi_timeout):
                reader, writer = await asyncio.open_connection(*self.agi_address)
        except (OSError, TimeoutError):
            return "FAILURE"  # trace 06c: no AGIExec events, AGISTATUS=FAILURE
        status = "SUCCESS"
        try:
            writer.write(self.agi_request(ch))
            async with asyncio.timeout(self.agi_timeout):
                while line := await reader.readline():
                    words = shlex.split(line.decode("utf-8", "replace"))
                    reply, hung_up = self._agi_command(ch, words)
                    writer.write(reply)
                    if hung_up:
                        status = "HANGUP"
                        writer.write(b"HANGUP\n")  # unsolicited (06d)
        except (OSError, TimeoutError, ValueError):
            status = "FAILURE" if status == "SUCCESS" else status
        finally:
            writer.close()
        return status

    def _agi_command(self, ch: SimChannel, words: list[str]) -> tuple[bytes, bool]:
        upper = [w.upper() for w in words[:2]]
        if upper == ["SET", "VARIABLE"] and len(words) >= 4:
            ch.variables[words[2]] = words[3]
            self._dialplan("VarSet", ch, [("Variable", words[2]), ("Value", words[3])])
            return b"200 result=1\n", False
        if upper == ["GET", "VARIABLE"] and len(words) >= 3:
            if words[2] in ch.variables:
                return f"200 result=1 ({ch.variables[words[2]]})\n".encode(), False
            return b"200 result=0\n", False
        if upper[:1] == ["HANGUP"]:
            return b"200 result=1\n", True
        return b"510 Invalid or unknown command\n", False

    # -- AMI server -------------------------------------------------------------
    async def _serve_ami(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = _AmiClientSession(writer)
        self._sessions.add(session)
        parser = ami.AmiParser(expect_banner=False, kinds=("action",))
        writer.write(BANNER)
        try:
            while data := await reader.read(65536):
                if session.stalled:
                    continue
                parser.receive_data(data)
                for msg in parser.events():
                    if isinstance(msg, ami.Message) and not await self._action(session, msg):
                        return
        except (OSError, asyncio.CancelledError):
            # A cancelled connection handler makes Python 3.11's streams
            # callback log a bogus error; ending normally is what we want.
            pass
        finally:
            self._sessions.discard(session)
            writer.close()

    def _reply(
        self,
        session: _AmiClientSession,
        action_id: str,
        response: str,
        fields: Iterable[tuple[str, str]] = (),
    ) -> None:
        head = [("ActionID", action_id)] if action_id else []
        session.writer.write(
            ami.Message.build("Response", response, head + list(fields)).to_bytes()
        )

    def _event_to(
        self, session: _AmiClientSession, name: str, fields: list[tuple[str, str]]
    ) -> None:
        session.writer.write(ami.Message.build("Event", name, fields).to_bytes())

    async def _action(self, session: _AmiClientSession, msg: ami.Message) -> bool:
        """Answer one action; False closes the connection."""
        self.actions.append(msg)
        name = msg.name.lower()
        aid = msg.get("ActionID")
        if name == "login":
            if msg.get("Username") != self.username or msg.get("Secret") != self.secret:
                await asyncio.sleep(self.auth_fail_delay)  # 07b: ~1 s, then close
                self._reply(session, aid, "Error", [("Message", "Authentication failed")])
                return False
            session.logged_in = True
            self.logins += 1
            session.classes = _event_classes(msg.get("Events", "on"))
            self._reply(session, aid, "Success", [("Message", "Authentication accepted")])
            if session.wants("system,all"):
                self._event_to(
                    session,
                    "FullyBooted",
                    [
                        ("Privilege", "system,all"),
                        ("Uptime", "303"),
                        ("LastReload", "303"),
                        ("Status", "Fully Booted"),
                    ],
                )
            return True
        if not session.logged_in:
            self._reply(session, aid, "Error", [("Message", "Permission denied")])
            return True
        if name == "ping":
            self._reply(
                session, aid, "Success", [("Ping", "Pong"), ("Timestamp", f"{time.time():.6f}")]
            )
        elif name == "logoff":
            self._reply(session, aid, "Goodbye", [("Message", "Thanks for all the fish.")])
            return False
        elif name == "events":
            mask = msg.get("EventMask", "on")
            session.classes = _event_classes(mask)
            self._reply(
                session,
                aid,
                "Success",
                [("Events", "Off" if session.classes == frozenset() else "On")],
            )
        elif name == "coreshowchannels":
            self._core_show_channels(session, aid)
        elif name == "getvar":
            self._getvar(session, aid, msg.get("Channel"), msg.get("Variable"))
        elif name == "hangup":
            call = self._call_by_channel(msg.get("Channel"))
            if call is None:
                self._reply(session, aid, "Error", [("Message", "No such channel")])
            else:
                cause = msg.get("Cause") or "16"
                call.request_end("ami", int(cause) if cause.isdigit() else 16)
                self._reply(session, aid, "Success", [("Message", "Channel Hungup")])
        elif name == "absolutetimeout":
            call = self._call_by_channel(msg.get("Channel"))
            timeout = msg.get("Timeout")
            if call is None:
                self._reply(session, aid, "Error", [("Message", "No such channel")])
            elif not timeout.isdigit() or int(timeout) == 0:
                self._reply(session, aid, "Error", [("Message", "No timeout specified")])
            else:
                call.set_timeout(int(timeout))
                self._reply(session, aid, "Success", [("Message", "Timeout Set")])
        else:
            self._reply(
                session,
                aid,
                "Error",
                [
                    (
                        "Message",
                        (
                            f"Invalid/unknown command: {msg.name}. "
                            "Use Action: ListCommands to show available commands."
                        ),
                    )
                ],
            )
        return True

    def _call_by_channel(self, name: str) -> SimCall | None:
        ch = self._channels.get(name)
        if ch is None:
            return None
        return self._calls.get(ch.linkedid)

    def _core_show_channels(self, session: _AmiClientSession, aid: str) -> None:
        self._reply(
            session, aid, "Success", [("EventList", "start"), ("Message", "Channels will follow")]
        )
        now = time.time()
        channels = list(self._channels.values())
        for ch in channels:
            seconds = int(now - ch.created)
            duration = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
            self._event_to(
                session,
                "CoreShowChannel",
                [
                    ("ActionID", aid),
                    *ch.fields(),
                    ("Application", ch.application),
                    ("ApplicationData", ch.appdata),
                    ("Duration", duration),
                    ("BridgeId", ch.bridge),
                ],
            )
        self._event_to(
            session,
            "CoreShowChannelsComplete",
            [("ActionID", aid), ("EventList", "Complete"), ("ListItems", str(len(channels)))],
        )

    def _getvar(self, session: _AmiClientSession, aid: str, channel: str, variable: str) -> None:
        if not channel:
            self._reply(session, aid, "Success", [("Variable", variable), ("Value", "")])
            return
        ch = self._channels.get(channel)
        if ch is None:
            self._reply(session, aid, "Error", [("Message", "No such channel")])
            return
        if variable in ("CDR(answer,u)", "CDR(answer)"):
            caller = self._channels.get(ch.name)
            answered = caller.answered if caller else None
            if variable.endswith(",u)"):
                value = f"{answered:.6f}" if answered else "0.000000"
            else:
                value = _stamp(answered) if answered else ""
        elif variable == "CDR(billsec)":
            value = str(int(time.time() - ch.answered)) if ch.answered else "0"
        else:
            value = ch.variables.get(variable, "")
        self._reply(session, aid, "Success", [("Variable", variable), ("Value", value)])


def _event_classes(mask: str) -> frozenset[str] | None:
    """Login/Events ``Events:`` value: on (all), off (none) or a class list."""
    mask = mask.strip().lower()
    if mask in ("on", "yes", "true", ""):
        return None
    if mask in ("off", "no", "false"):
        return frozenset()
    return frozenset(part.strip() for part in mask.split(",") if part.strip())


# ---------------------------------------------------------------------------
# Recorded traces (traces/asterisk/README.md "File format")


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
