"""The simulated Asterisk's calls and channels: what one channel carries (the
fields every AMI event repeats), what a finished call reports, and the handle a
test holds on a live call. Figures as the real PBX computes them (billsec)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.sim.asterisk import AsteriskSimulator

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
