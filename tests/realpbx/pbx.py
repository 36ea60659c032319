"""The two PBXs of the real-PBX tier, started from the repository's SHIPPED config
(config/asterisk, config/freeswitch) changed only in ports, trunk and secrets, and
their own CDR files read back (:class:`CdrRow`)."""

from __future__ import annotations

import csv
import math
import re
import socket
import subprocess
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import ClassVar

from tests.realpbx.sip import SCENARIOS, Caller, Trunk, uac_scenario
from tests.realpbx.tools import BOOT_TIMEOUT, REPO, Binary, Ports, Procs, Tools, wait_until

SHIPPED = REPO / "config"


# --------------------------------------------------------------------------- CDRs


@dataclass
class CdrRow:
    """One row of the PBX's own CDR file (the columns both PBXs have)."""

    call_id: str  # Asterisk uniqueid / FreeSWITCH uuid: the agent's call id
    accountcode: str
    src: str
    dst: str
    context: str
    disposition: str  # Asterisk ANSWERED/BUSY/NO ANSWER/FAILED; FreeSWITCH hangup cause
    start: float
    answer: float | None
    end: float
    duration: int
    billsec: int
    raw: list[str]


def tariff_charge(billsec: int, increment: int, rate: str, minimum: int = 0) -> Decimal:
    """ceil(billsec / increment) x rate, the minimum applied to an answered call."""
    if billsec <= 0:
        return Decimal("0")
    return Decimal(math.ceil(max(billsec, minimum) / increment)) * Decimal(rate)


def _float(value: str) -> float | None:
    try:
        f = float(value)
    except ValueError:
        return None
    return f if f > 0 else None


# --------------------------------------------------------------------------- the PBXs


class Pbx:
    kind = ""
    name = ""

    def __init__(self, tools: Tools, workdir: Path, ports: Ports, procs: Procs, *,
                 secret: str = "s3cret-for-tests") -> None:
        self.tools = tools
        self.workdir = workdir
        self.ports = ports
        self.procs = procs
        self.secret = secret
        self.sip_port = ports.one()
        self.trunk_port = ports.one()
        self.control_port = ports.one()  # AMI / ESL
        self.gate_port = ports.one()  # FastAGI / outbound socket
        # where the dialplan sends the gate request / where the agent finds AMI or
        # ESL: the ports above, unless a recorder sits in between (record_traces.py)
        self.dialplan_gate_port = self.gate_port
        self.agent_control_port = self.control_port
        self.confdir = workdir / "conf"
        self.proc: subprocess.Popen[bytes] | None = None
        self._calls = 0

    # -- to be provided by each PBX
    RUNDIR = ""  # the PBX's own work dir, under workdir
    WORK_DIRS: tuple[str, ...] = ()  # made under the run dir before the start
    LOG = ""  # its log file, relative to the run dir
    CDR_FILE = ""  # its CDR file, relative to the run dir
    # CdrRow field -> CSV column (call_id .. context are columns 0-4 in both)
    CDR_COLUMNS: ClassVar[dict[str, int]] = {}
    BOOT_POLL = 0.5

    def config_files(self) -> dict[str, str]:
        """Config file (relative to confdir) -> its text."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """Anything else to write before the start (after the config and work dirs)."""

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _binary(self) -> Binary:
        raise NotImplementedError

    def _booted(self) -> bool:
        """Ready for calls (the process is known to be alive)."""
        raise NotImplementedError

    def caller(self, account: str) -> str:
        raise NotImplementedError

    def agent_pbx_yaml(self) -> str:
        raise NotImplementedError

    # -- shared
    @property
    def rundir(self) -> Path:
        return self.workdir / self.RUNDIR

    def start(self) -> None:
        """Write the config and the work dirs, start the PBX, wait until it takes calls."""
        for name, text in self.config_files().items():
            (self.confdir / name).parent.mkdir(parents=True, exist_ok=True)
            (self.confdir / name).write_text(text)
        for d in self.WORK_DIRS:
            (self.rundir / d).mkdir(parents=True, exist_ok=True)
        self._prepare()
        self.proc = self.procs.start(self._argv(), env=self._binary().env(), cwd=self.rundir,
                                     stdout=self.rundir / "console.log")
        try:
            wait_until(f"{self.name} to boot", self._alive_and_booted, BOOT_TIMEOUT,
                       every=self.BOOT_POLL)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None

    def _alive_and_booted(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}")
        return self._booted()

    def cdr_rows(self) -> list[CdrRow]:
        """The rows of the PBX's own CDR file (none yet: [])."""
        try:
            text = (self.rundir / self.CDR_FILE).read_text()
        except FileNotFoundError:
            return []
        col = self.CDR_COLUMNS
        rows = []
        for r in csv.reader(text.splitlines()):
            if len(r) <= max(col.values()):
                continue
            rows.append(CdrRow(call_id=r[0], accountcode=r[1], src=r[2], dst=r[3], context=r[4],
                               disposition=r[col["disposition"]],
                               start=float(r[col["start"]] or 0),
                               answer=_float(r[col["answer"]]), end=float(r[col["end"]] or 0),
                               duration=int(r[col["duration"]] or 0),
                               billsec=int(r[col["billsec"]] or 0), raw=r))
        return rows

    def messages(self) -> str:
        """The PBX's log so far."""
        try:
            return (self.rundir / self.LOG).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.messages()[-chars:] or f"(no {Path(self.LOG).name})"

    def stop(self) -> None:
        if self.proc is not None:
            Procs.stop(self.proc, timeout=15)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def trunk(self, kind: str = "answer", calls: int = 1, timeout: float = 120) -> Trunk:
        """A sipp UAS on the trunk's port: answer / busy / noanswer, ``calls`` calls."""
        assert self.tools.sipp is not None
        self._calls += 1
        return Trunk(self.tools, self.procs, self.ports, self.workdir,
                     f"trunk{self._calls}-{kind}", SCENARIOS / f"uas_{kind}.xml",
                     ["-m", str(calls), "-timeout", f"{int(timeout)}s"],
                     port=self.trunk_port)

    def call(self, number: str, *, account: str = "acme", hold: float = 3.0,
             timeout: float = 60) -> Caller:
        """Place one call (returns at once; ``.wait()`` for the :class:`CallTrace`)."""
        self._calls += 1
        name = f"call{self._calls}-{number}"
        return Caller(self.tools, self.procs, self.ports, self.workdir, name,
                      uac_scenario(self.workdir, hold),
                      [f"127.0.0.1:{self.sip_port}", "-s", number, "-key", "from_user",
                       self.caller(account), "-m", "1", "-timeout", f"{int(timeout)}s",
                       "-timeout_error"])

    def cdr_for(self, call_id: str) -> CdrRow | None:
        return next((r for r in self.cdr_rows() if r.call_id == call_id), None)

    def wait_cdr(self, predicate, timeout: float = 15) -> CdrRow:  # type: ignore[no-untyped-def]
        return wait_until("the PBX's CDR row",  # type: ignore[no-any-return]
                          lambda: next((r for r in self.cdr_rows() if predicate(r)), None),
                          timeout)


def _shipped(path: str) -> str:
    return (SHIPPED / path).read_text()


def _replace_once(text: str, old: str, new: str, where: str) -> str:
    """A documented variable in a shipped file; fail loudly when the file no longer has it."""
    if text.count(old) != 1:
        raise AssertionError(f"shipped {where}: expected exactly one {old!r} to set "
                             f"for the test (found {text.count(old)})")
    return text.replace(old, new)


def _set_conf_value(text: str, key: str, value: str, where: str) -> str:
    """``key = value`` in an Asterisk .conf file (first occurrence)."""
    pattern = re.compile(rf"^({re.escape(key)}\s*=\s*)[^\n]*$", re.M)
    if not pattern.search(text):
        raise AssertionError(f"shipped {where}: no `{key} = ...` line to set for the test")
    return pattern.sub(lambda m: m.group(1) + value, text, count=1)


class Asterisk(Pbx):
    """Asterisk (PJSIP) with config/asterisk's extensions.conf, manager.conf, cdr.conf
    and cdr_manager.conf; the bundle's examples for the rest (logger, modules,
    cdr_custom); a generated pjsip.conf (callers per account, the ``carrier`` trunk)."""

    kind = "asterisk"
    name = "Asterisk"
    RUNDIR = "ast"
    WORK_DIRS = ("run", "log/cdr-csv", "log/cdr-custom", "spool", "lib/keys", "lib/agi-bin",
                 "cache", "tmp", "data/sounds", "data/moh", "data/keys")
    LOG = "log/messages.log"
    CDR_FILE = "log/cdr-custom/Master.csv"
    CDR_COLUMNS: ClassVar[dict[str, int]] = {
        "disposition": 8, "start": 9, "answer": 10, "end": 11, "duration": 12, "billsec": 13}
    BOOT_POLL = 0.3
    ACCOUNTS = ("acme", "night", "broke", "capped", "cut", "killed", "dropped", "spare",
                "spare2", "spare3")

    def __init__(self, *args, extra_dialplan: str = "",  # type: ignore[no-untyped-def]
                 dial_line: str | None = None, extra_endpoints: dict[str, str] | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rtp = self.ports.block(100)
        self.extra_dialplan = extra_dialplan
        self.dial_line = dial_line  # replaces the shipped Dial(...) (to reproduce old ones)
        # more callers: endpoint name -> its context (e.g. one that skips the gate)
        self.extra_endpoints = extra_endpoints or {}

    def caller(self, account: str) -> str:
        return account  # the PJSIP endpoint name = the From user = accountcode (or extra)

    def config_files(self) -> dict[str, str]:
        ex = self.tools.examples / "asterisk"  # type: ignore[operator]
        ext = _shipped("asterisk/extensions.conf")
        if self.dial_line is not None:
            ext = re.sub(r"(?m)^( same => n,)Dial\(PJSIP/\$\{EXTEN\}@[^\n]*$",
                         lambda m: m.group(1) + self.dial_line, ext, count=1)  # type: ignore[operator]
        ext = _set_conf_value(ext, "CALLGATE_AGI",
                              f"agi://127.0.0.1:{self.dialplan_gate_port}/gate", "extensions.conf")
        mgr = _shipped("asterisk/manager.conf")
        mgr = _set_conf_value(mgr, "port", str(self.control_port), "manager.conf")
        mgr = _set_conf_value(mgr, "secret", self.secret, "manager.conf")
        endpoints = "".join(
            f"\n[{acc}]\ntype = endpoint\ntransport = transport-udp\n"
            f"context = callgate-outbound\ndisallow = all\nallow = ulaw,alaw\n"
            f"direct_media = no\nrtp_symmetric = yes\naccountcode = {acc}\n"
            f"callerid = \"{acc}\" <02158880000>\n" for acc in self.ACCOUNTS)
        endpoints += "".join(
            f"\n[{name}]\ntype = endpoint\ntransport = transport-udp\ncontext = {context}\n"
            "disallow = all\nallow = ulaw,alaw\ndirect_media = no\nrtp_symmetric = yes\n"
            for name, context in self.extra_endpoints.items())
        pjsip = (
            "[global]\ntype = global\nendpoint_identifier_order = username,ip\n"
            "user_agent = Asterisk-callgate-test\n\n"
            f"[transport-udp]\ntype = transport\nprotocol = udp\n"
            f"bind = 127.0.0.1:{self.sip_port}\n" + endpoints +
            "\n[carrier]\ntype = endpoint\ntransport = transport-udp\ncontext = from-trunk\n"
            "disallow = all\nallow = ulaw,alaw\ndirect_media = no\naors = carrier\n"
            f"\n[carrier]\ntype = aor\ncontact = sip:127.0.0.1:{self.trunk_port}\n")
        modules = "[modules]\nautoload = yes\nnoload = cdr_csv.so\n"
        return {
            "asterisk.conf": (ex / "asterisk.conf").read_text(),
            "modules.conf": modules,
            "logger.conf": (ex / "logger.conf").read_text(),
            "cdr_custom.conf": (_shipped("asterisk/cdr_custom.conf")
                                if (SHIPPED / "asterisk/cdr_custom.conf").exists()
                                else (ex / "cdr_custom.conf").read_text()),
            "rtp.conf": f"[general]\nrtpstart = {self.rtp}\nrtpend = {self.rtp + 99}\n",
            "pjsip.conf": pjsip,
            "manager.conf": mgr,
            "cdr.conf": _shipped("asterisk/cdr.conf"),
            "cdr_manager.conf": _shipped("asterisk/cdr_manager.conf"),
            "extensions.conf": ("[general]\nstatic = yes\nwriteprotect = yes\n\n" + ext +
                                "\n[from-trunk]\nexten => _X.,1,Hangup(21)\n" +
                                self.extra_dialplan),
        }

    def _prepare(self) -> None:
        assert self.tools.asterisk is not None
        if len(str(self.rundir / "run/asterisk.ctl")) > 100:
            raise AssertionError(f"Asterisk work dir too long for its socket: {self.rundir}")
        w = self.rundir
        options = (self.confdir / "asterisk.conf").read_text()
        options = re.sub(r"(?ms)^\[directories\].*?(?=^\[|\Z)", "", options)
        (w / "asterisk.conf").write_text(
            "[directories]\n"
            f"astetcdir => {self.confdir}\nastmoddir => {self.tools.asterisk.modules}\n"
            f"astvarlibdir => {w}/lib\nastdbdir => {w}/lib\nastkeydir => {w}/lib\n"
            f"astagidir => {w}/lib/agi-bin\nastdatadir => {w}/data\n"
            f"astspooldir => {w}/spool\nastrundir => {w}/run\nastlogdir => {w}/log\n"
            f"astcachedir => {w}/cache\n\n" + options)

    def _binary(self) -> Binary:
        assert self.tools.asterisk is not None
        return self.tools.asterisk

    def _argv(self) -> list[str]:
        return [str(self._binary().path), "-C", str(self.rundir / "asterisk.conf"), "-f"]

    def _booted(self) -> bool:
        out = self.cli("core waitfullybooted", timeout=10)
        return "fully booted" in out.lower()

    def cli(self, command: str, timeout: float = 15) -> str:
        """``asterisk -rx`` on this instance."""
        assert self.tools.asterisk is not None
        res = subprocess.run(
            [str(self.tools.asterisk.path), "-C", str(self.rundir / "asterisk.conf"),
             "-rx", command], env=self.tools.asterisk.env(), capture_output=True,
            timeout=timeout, check=False)
        return res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")

    def agent_pbx_yaml(self) -> str:
        return (f"  kind: asterisk\n  ami: {{host: 127.0.0.1, port: {self.agent_control_port}, "
                f"username: callgate, secret: {self.secret}}}\n"
                f"  fastagi: {{listen: '127.0.0.1:{self.gate_port}'}}\n")

    def ami_sessions(self) -> list[tuple[str, str]]:
        """``manager show connected``: (username, fd) of each AMI session."""
        out = self.cli("manager show connected")
        sessions = []
        for line in out.splitlines():
            parts = line.split()
            # "callgate 127.0.0.1 1733... 36 1 ..." (Username IP Start Elapsed FileDes ...)
            if len(parts) >= 5 and parts[0] == "callgate":
                sessions.append((parts[0], parts[4]))
        return sessions


class FreeSwitch(Pbx):
    """FreeSWITCH with config/freeswitch's dialplan and event_socket.conf.xml merged
    into the bundle's one-file example (its sofia profile, gateway renamed ``carrier``)."""

    kind = "freeswitch"
    name = "FreeSWITCH"
    RUNDIR = "fs"
    # each one is also a command-line option: -log DIR, -db DIR, ...
    WORK_DIRS = ("log", "db", "run", "temp", "storage", "cache", "recordings", "sounds",
                 "grammar", "certs", "scripts", "htdocs")
    LOG = "log/freeswitch.log"
    CDR_FILE = "log/cdr-csv/Master.csv"
    CDR_COLUMNS: ClassVar[dict[str, int]] = {
        "start": 5, "answer": 6, "end": 7, "duration": 8, "billsec": 9, "disposition": 10}
    # callers are told apart by caller ID: the From user is the number the account owns
    CALLERS: ClassVar[dict[str, str]] = {
        "acme": "02158880000", "night": "02158880001", "broke": "02158880002",
        "capped": "02158880003", "cut": "02158880004", "killed": "02158880005",
        "dropped": "02158880006", "spare": "02158880007", "spare2": "02158880008",
        "spare3": "02158880009"}

    def __init__(self, *args, extra_dialplan: str = "",  # type: ignore[no-untyped-def]
                 first_extensions: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rtp = self.ports.block(100)
        self.extra_dialplan = extra_dialplan
        self.first_extensions = first_extensions  # context default, before the shipped files

    def caller(self, account: str) -> str:
        return self.CALLERS[account]

    def config_files(self) -> dict[str, str]:
        xml = (self.tools.examples / "freeswitch/freeswitch.xml").read_text()  # type: ignore[operator]
        for old, new in ((r"sip_port=\d+", f"sip_port={self.sip_port}"),
                         (r"uas_port=\d+", f"uas_port={self.trunk_port}"),
                         (r"esl_port=\d+", f"esl_port={self.control_port}"),
                         (r'"rtp-start-port" value="\d+"', f'"rtp-start-port" value="{self.rtp}"'),
                         (r'"rtp-end-port" value="\d+"',
                          f'"rtp-end-port" value="{self.rtp + 99}"'),
                         (r'<gateway name="uas">', '<gateway name="carrier">')):
            xml, n = re.subn(old, new, xml, count=1)
            assert n == 1, f"the bundle's freeswitch.xml has no {old!r}"
        # the example's dialplan context -> the shipped dialplan files
        context = ('<context name="default">\n' + self.first_extensions +
                   '      <X-PRE-PROCESS cmd="include" data="dialplan/default/*.xml"/>\n'
                   '    </context>' + self.extra_dialplan)
        # the shipped cdr_csv.conf.xml in place of the example's (same columns)
        shipped_cdr = SHIPPED / "freeswitch/autoload_configs/cdr_csv.conf.xml"
        if shipped_cdr.exists():
            block = re.search(r'(?s)<configuration name="cdr_csv\.conf".*?</configuration>',
                              shipped_cdr.read_text())
            assert block, "shipped cdr_csv.conf.xml has no cdr_csv.conf configuration"
            xml, n = re.subn(r'(?s)<configuration name="cdr_csv\.conf".*?</configuration>',
                             lambda _: block.group(0), xml, count=1)
            assert n == 1, "the bundle's freeswitch.xml has no cdr_csv.conf"
        xml, n = re.subn(r'(?s)<context name="default">.*?</context>', lambda _: context,
                         xml, count=1)
        assert n == 1
        esl = _shipped("freeswitch/autoload_configs/event_socket.conf.xml")
        esl = re.sub(r'(name="listen-port" value=")\d+', rf"\g<1>{self.control_port}", esl)
        esl = re.sub(r'(name="password" value=")[^"]*', rf"\g<1>{self.secret}", esl)
        files = {"freeswitch.xml": xml, "autoload_configs/event_socket.conf.xml": esl}
        for f in sorted((SHIPPED / "freeswitch/dialplan/default").glob("*.xml")):
            text = f.read_text()
            text = _replace_once(text, "127.0.0.1:8084 async full",
                                 f"127.0.0.1:{self.dialplan_gate_port} async full", f.name)
            files[f"dialplan/default/{f.name}"] = text
        return files

    def _binary(self) -> Binary:
        assert self.tools.freeswitch is not None
        return self.tools.freeswitch

    def _argv(self) -> list[str]:
        w = self.rundir
        args = [str(self._binary().path), "-nf", "-nc", "-nonat", "-base", str(w),
                "-conf", str(self.confdir), "-mod", str(self._binary().modules)]
        for d in self.WORK_DIRS:
            args += [f"-{d}", str(w / d)]
        return args

    def _booted(self) -> bool:
        return "RUNNING" in self.api("sofia status")  # the sofia profile

    def api(self, command: str, timeout: float = 10) -> str:
        """One ``api`` command over a fresh ESL connection (its reply body)."""
        with socket.create_connection(("127.0.0.1", self.control_port), timeout=timeout) as s:
            f = s.makefile("rb")

            def frame() -> tuple[dict[str, str], bytes]:
                headers: dict[str, str] = {}
                while True:
                    line = f.readline()
                    if not line:
                        raise ConnectionError("ESL closed")
                    line = line.rstrip(b"\n")
                    if not line:
                        if headers:
                            break
                        continue
                    k, _, v = line.decode().partition(":")
                    headers[k.strip()] = v.strip()
                body = f.read(int(headers["Content-Length"])) if "Content-Length" in headers \
                    else b""
                return headers, body

            frame()  # auth/request
            s.sendall(f"auth {self.secret}\n\n".encode())
            h, _ = frame()
            if not h.get("Reply-Text", "").startswith("+OK"):
                raise ConnectionError(f"ESL auth: {h}")
            s.sendall(f"api {command}\n\n".encode())
            while True:
                h, body = frame()
                if h.get("Content-Type") == "api/response":
                    return body.decode(errors="replace")

    def agent_pbx_yaml(self) -> str:
        return (f"  kind: freeswitch\n  esl: {{host: 127.0.0.1, port: {self.agent_control_port}, "
                f"password: {self.secret}}}\n"
                f"  outbound_socket: {{listen: '127.0.0.1:{self.gate_port}'}}\n"
                "  outbound_contexts: [default]\n")
