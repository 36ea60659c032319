"""The simulated Asterisk's AMI server: sessions, login and event classes, the
manager.conf ``eventfilter`` as Asterisk applies it, and the actions callgate
sends (``CoreShowChannels``, ``Getvar``, ``Hangup``, ``AbsoluteTimeout``, ``Ping``),
answered as in the recorded traces. :class:`AmiServer` is the half of
:class:`~agent.sim.asterisk.AsteriskSimulator` that talks AMI; the calls
themselves (the dialplan script) are in agent/sim/asterisk.py."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterable

from agent.pbx import ami
from agent.sim.asterisk_channels import SimCall, SimChannel, _stamp

BANNER = b"Asterisk Call Manager/9.0.0\r\n"  # trace 01, first chunk


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


class AmiServer:
    """AMI sessions of the simulator (mixed into AsteriskSimulator, which sets these)."""

    username: str
    secret: str
    auth_fail_delay: float
    action_delay: float  # > 0: every action answered this late (an overloaded PBX)
    timestampevents: bool
    eventfilter: EventFilter
    actions: list[ami.Message]
    logins: int
    _sessions: set[_AmiClientSession]
    _calls: dict[str, SimCall]
    _channels: dict[str, SimChannel]

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
                    if not isinstance(msg, ami.Message):
                        continue
                    if self.action_delay > 0 and session.logged_in:
                        # Replies late, in order; events still flow meanwhile.
                        await asyncio.sleep(self.action_delay)
                    if not await self._action(session, msg):
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
