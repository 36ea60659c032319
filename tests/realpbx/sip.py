"""sipp for the real-PBX tier: the carrier's UAS (:class:`Trunk`), one caller per call
(:class:`Caller`), and sipp's own message trace read back as timed SIP messages
(the SIP side of every timing assertion)."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.realpbx.tools import Ports, Procs, Tools

SCENARIOS = Path(__file__).resolve().parent / "sipp"


# --------------------------------------------------------------------------- sipp


@dataclass
class SipMessage:
    at: float  # epoch seconds, sipp's own clock
    sent: bool
    first_line: str
    text: str


# "----------------------------------------------- 2026-12-03 09:30:00.123456"
# then "UDP message sent (612 bytes):" or "UDP message received [405] bytes :"
_TRACE_HEAD = re.compile(
    r"^-{20,} (\d{4}-\d\d-\d\d[ \t]\d\d:\d\d:\d\d\.\d+)(?:[ \t]+(\d+\.\d+))?\s*\n"
    r"(\w+) message (sent|received)[^\n]*\n\n", re.M)


def parse_sipp_trace(text: str) -> list[SipMessage]:
    """sipp's ``-trace_msg`` file as messages with their times."""
    heads = list(_TRACE_HEAD.finditer(text))
    out = []
    for i, m in enumerate(heads):
        body = text[m.end(): heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        if m.group(2):
            at = float(m.group(2))
        else:
            stamp = re.sub(r"[ \t]", " ", m.group(1))
            at = time.mktime(time.strptime(stamp.split(".")[0], "%Y-%m-%d %H:%M:%S"))
            at += float("0." + stamp.split(".")[1])
        first = body.strip().splitlines()[0] if body.strip() else ""
        out.append(SipMessage(at, m.group(4) == "sent", first, body))
    return out


@dataclass
class CallTrace:
    """What the caller's sipp saw of one call."""

    status: int | None  # the final answer to the INVITE (200, 403, ...)
    invite_at: float | None
    answered_at: float | None  # the 200 OK
    bye_at: float | None  # the first BYE, either direction
    bye_from_pbx: bool | None
    sip_call_id: str
    exit_code: int
    messages: list[SipMessage] = field(repr=False, default_factory=list)

    @property
    def talked(self) -> float | None:
        if self.answered_at is None or self.bye_at is None:
            return None
        return self.bye_at - self.answered_at


def _sip_call_id(messages: list[SipMessage]) -> str:
    for msg in messages:
        m = re.search(r"^Call-ID:\s*(\S+)", msg.text, re.M | re.I)
        if m:
            return m.group(1)
    return ""


class Sipp:
    """One sipp process (a UAS as the carrier, or one caller)."""

    def __init__(self, tools: Tools, procs: Procs, ports: Ports, workdir: Path, name: str,
                 scenario: Path, argv: list[str], *, port: int | None = None) -> None:
        assert tools.sipp is not None
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or ports.one()
        self.messages_file = self.dir / "messages.log"
        self.errors_file = self.dir / "errors.log"
        media = ports.block(4)
        self.argv = [str(tools.sipp.path), *argv, "-sf", str(scenario),
                     "-i", "127.0.0.1", "-mi", "127.0.0.1", "-p", str(self.port),
                     "-mp", str(media), "-cp", str(ports.one()), "-nostdin",
                     "-trace_msg", "-message_file", str(self.messages_file),
                     "-trace_err", "-error_file", str(self.errors_file)]
        self.proc = procs.start(self.argv, env=tools.sipp.env(), cwd=self.dir,
                                stdout=self.dir / "stdout.log")
        self.procs = procs

    def messages(self) -> list[SipMessage]:
        try:
            return parse_sipp_trace(self.messages_file.read_text(errors="replace"))
        except FileNotFoundError:
            return []

    def wait(self, timeout: float = 90) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            Procs.stop(self.proc)
            raise AssertionError(f"sipp did not finish in {timeout:g} s: {self.argv}") from exc

    def stop(self) -> None:
        Procs.stop(self.proc)

    def log_tail(self) -> str:
        parts = []
        for f in (self.dir / "stdout.log", self.errors_file):
            with contextlib.suppress(FileNotFoundError):
                parts.append(f"{f.name}: " + f.read_text(errors="replace")[-1500:])
        return "\n".join(parts)


class Trunk(Sipp):
    """The carrier: a sipp UAS the PBX's trunk points at."""

    def invites(self) -> int:
        return sum(1 for m in self.messages() if not m.sent and m.first_line.startswith("INVITE"))

    def invite_times(self) -> list[float]:
        return [m.at for m in self.messages() if not m.sent and m.first_line.startswith("INVITE")]


class Caller(Sipp):
    """One sipp UAC call."""

    def wait(self, timeout: float = 90) -> CallTrace:  # type: ignore[override]
        code = super().wait(timeout)
        return self.trace(code)

    def trace(self, code: int = -1) -> CallTrace:
        msgs = self.messages()
        status = answered = invite = bye = None
        bye_from_pbx = None
        for m in msgs:
            if m.sent and m.first_line.startswith("INVITE") and invite is None:
                invite = m.at
            if not m.sent and m.first_line.startswith("SIP/2.0"):
                cseq = re.search(r"^CSeq:\s*\d+\s+(\w+)", m.text, re.M | re.I)
                code_ = int(m.first_line.split()[1])
                if cseq and cseq.group(1) == "INVITE" and code_ >= 200 and status is None:
                    status = code_
                    if code_ == 200:
                        answered = m.at
            if m.first_line.startswith("BYE") and bye is None:
                bye = m.at
                bye_from_pbx = not m.sent
        return CallTrace(status, invite, answered, bye, bye_from_pbx, _sip_call_id(msgs), code,
                         msgs)

    def answered(self) -> float | None:
        return self.trace().answered_at


def uac_scenario(workdir: Path, hold: float) -> Path:
    path = workdir / f"uac_{int(hold * 1000)}.xml"
    if not path.exists():
        text = (SCENARIOS / "uac.xml").read_text().replace("HOLD_MS", str(int(hold * 1000)))
        path.write_text(text)
    return path
