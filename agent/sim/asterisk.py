"""A simulated Asterisk on loopback: the calls, as the real PBX runs them.

Built from the recordings in ``tests/fixtures/asterisk`` (Asterisk 20, chan_sip:
the same event names, fields and order for answered (01, 02), busy (03),
no-answer (03b), ``Hangup`` action (04), ``AbsoluteTimeout`` expiry (05: no event
marks it, just ``SoftHangupRequest`` and ``Hangup``) and the FastAGI gate (06,
06b, 06d)) and ``tests/fixtures/asterisk22`` (Asterisk 22.10.1, PJSIP, the
shipped config). ``Cdr`` ``BillableSeconds`` is computed like Asterisk's
``cdr_object_get_billsec``.

With ``gate=True`` a call runs the SHIPPED dialplan (config/asterisk/
extensions.conf, read by agent/sim/asterisk_dialplan.py): emergency numbers go
straight to the trunk; any other number asks the FastAGI gate at
``agi_address`` and goes on only if ``CALLGATE_RESULT`` is exactly ``ALLOW`` and
``CALLGATE_MAX_SECONDS`` a positive number, else ``Hangup(21)`` (nothing
listening means ``AGISTATUS=FAILURE`` and so a refusal); then
``TIMEOUT(absolute)`` and the file's own Dial line, which fails as Asterisk 22
fails it when it is a form the PBX cannot dial (``SIP/…``: cause 66, 503;
``PJSIP/endpoint/number``: cause 3, 404).

The AMI server half (sessions, eventfilter, actions) is agent/sim/asterisk_ami.py;
channels and call results are agent/sim/asterisk_channels.py; trace files are
read by agent/sim/traces.py.

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
from datetime import UTC, datetime

from agent.pbx import ami
from agent.sim.asterisk_ami import BANNER, SHIPPED_EVENTFILTER, AmiServer, EventFilter
from agent.sim.asterisk_channels import (
    CAUSE_TEXT,
    CallResult,
    SimCall,
    SimChannel,
    _stamp,
    cdr_billsec,
)
from agent.sim.asterisk_dialplan import DialResult, ShippedDialplan
from agent.sim.traces import TraceChunk, read_trace, received_stream

__all__ = ["BANNER", "SHIPPED_EVENTFILTER", "AsteriskSimulator", "CallResult", "EventFilter",
           "SimCall", "SimChannel", "TraceChunk", "cdr_billsec", "read_trace",
           "received_stream"]

AGI_VERSION = "20.20.1"


class AsteriskSimulator(AmiServer):
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
        dialplan: ShippedDialplan | None = None,
    ) -> None:
        """``cdr``: where the Cdr event goes relative to the caller's Hangup
        ("before", "after"; the traces show both), or None for no cdr_manager.
        ``initiatedseconds``: cdr.conf's option of that name (see :func:`cdr_billsec`).
        ``dialplan_events``: also write the VarSet/Newexten noise of the traces.
        ``eventfilter``: the AMI user's manager.conf ``eventfilter`` lines
        (:data:`SHIPPED_EVENTFILTER` is the one callgate ships); none by default.
        ``dialplan``: the gated calls' dialplan; by default the shipped
        config/asterisk/extensions.conf, read now (its Dial line and emergency
        numbers are run as Asterisk 22 runs them, agent/sim/asterisk_dialplan.py)."""
        self.username = username
        self.secret = secret
        self.agi_address = agi_address
        self.auth_fail_delay = auth_fail_delay
        self.action_delay = 0.0
        self.cdr = cdr
        self.timestampevents = timestampevents
        self.dialplan_events = dialplan_events
        self.agi_timeout = agi_timeout
        self.initiatedseconds = initiatedseconds
        self.eventfilter = EventFilter(eventfilter)
        self.dialplan = dialplan or ShippedDialplan.load()
        self._server: asyncio.Server | None = None
        self._port = 0
        self._sessions = set()
        self._calls: dict[str, SimCall] = {}
        self._channels: dict[str, SimChannel] = {}  # by name
        self._seq = itertools.count(0x26)
        self._epoch = int(time.time())
        self.actions: list[ami.Message] = []  # every action received, for tests
        self.failed_dials: list[DialResult] = []  # Dial()s Asterisk could not start
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
        tech: str = "SIP",
        caller_num: str,
        caller_name: str,
        context: str,
        exten: str,
        accountcode: str = "",
    ) -> SimChannel:
        seq = next(self._seq)
        uid = f"{self._epoch}.{seq}"
        ch = SimChannel(
            name=f"{tech}/{prefix}-{seq:08x}",
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
        if gate and self.dialplan.route(destination) is None:
            raise ValueError(f"no extension of [callgate-outbound] matches {destination!r}: "
                             "Asterisk answers 404 and creates no channel")
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
        emergency = gate and self.dialplan.route(ch.exten) == "emergency"
        if emergency:
            # exten => 112,1,Goto(callgate-emergency,...): no AGI, no limit.
            self._newexten(ch, "Goto", f"callgate-emergency,{ch.exten},1")
        elif gate:
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
        # Set(TIMEOUT(absolute)=limit), then the shipped Dial line. The limit is
        # the channel's absolute timeout, the one AMI AbsoluteTimeout replaces,
        # so the meter can extend it; Dial's L() could not be extended.
        if limit:
            self._newexten(ch, "Set", f"TIMEOUT(absolute)={limit}")
            call.set_timeout(limit)
        if gate:
            dial = self.dialplan.dial(ch.exten, ch.variables)
        else:  # the no-AGI lab dialplan of the Asterisk 20 traces (01)
            dial = DialResult(f"SIP/uas/{ch.exten},{dial_timeout:g}", True, "uas",
                              f"uas/{ch.exten}", dial_timeout)
        dial_data = dial.dial_data
        self._newexten(ch, "Dial", dial_data)
        if not dial.ok:
            return self._dial_failed(call, dial, agi_status)
        callee = self._new_channel(
            dial.endpoint,
            ch.uniqueid,
            tech=dial_data.split("/", 1)[0],
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
        self.emit("DialBegin", ch.fields() + callee.dest_fields()
                  + [("DialString", dial.dial_string)])
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

    def _dial_failed(self, call: SimCall, dial: DialResult, agi_status: str) -> CallResult:
        """A Dial() Asterisk cannot even start (asterisk_dialplan.py): no callee
        channel, no CDR row, the caller ends with the failure's cause at once
        (tests/fixtures/asterisk22/26-*, 27-*)."""
        ch = call.caller
        self.failed_dials.append(dial)
        self._newexten(ch, "Hangup", "")
        self.emit("SoftHangupRequest", [*ch.fields(), ("Cause", str(dial.cause))])
        end = time.time()
        self._hangup_event(ch, dial.cause)
        return CallResult(ch.uniqueid, None, datetime.fromtimestamp(end, UTC), 0, dial.cause,
                          "dial_failed", agi_status, dict(ch.variables))

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
