"""Real PBXs in the test loop: start Asterisk or FreeSWITCH with the shipped config,
run the real ``callgate run`` beside it, and place SIP calls with sipp.

Where the PBXs come from (:func:`locate_tools`): the prebuilt bundle beside the
repository (``<repo>/../pbx`` or ``<repo>/../shared/pbx``), or whatever the
environment names:

=========================== =================================================
``CALLGATE_PBX_BUNDLE``     a bundle directory (``asterisk/``, ``freeswitch/``,
                            ``sipp/``, as the default one)
``CALLGATE_ASTERISK``       an installed ``asterisk`` binary; its modules dir in
                            ``CALLGATE_ASTERISK_MODULES`` (default
                            ``/usr/lib/asterisk/modules``)
``CALLGATE_FREESWITCH``     an installed ``freeswitch`` binary; its modules dir in
                            ``CALLGATE_FREESWITCH_MODULES`` (default
                            ``/usr/lib/freeswitch/mod``)
``CALLGATE_SIPP``           an installed ``sipp`` binary
=========================== =================================================

A PBX that cannot be found skips the test with one line; under ``CI=true`` it
fails it (:func:`require`).

The API, top to bottom (every process is started in its own process group and
stopped by :meth:`Procs.stop_all`, which the fixtures call even when a test fails):

* ``with running_pbx("asterisk"|"freeswitch", **options) as (pbx, procs, ports,
  workdir):`` boots one PBX in a short fresh dir under /tmp and stops every
  process the block started when it ends. The module fixture ``tier`` in
  conftest.py uses it once per PBX kind and starts the agent beside it.
* ``pbx`` (:class:`Asterisk` / :class:`FreeSwitch`) was built from the
  repository's SHIPPED files (``config/asterisk``, ``config/freeswitch``),
  changed only in ports, trunk and secrets. ``pbx.cdr_rows()`` reads the PBX's
  own CDR file (Asterisk ``cdr_custom`` / FreeSWITCH ``mod_cdr_csv``, with exact
  answer/end times); ``pbx.wait_cdr(predicate)`` waits for a row;
  ``pbx.caller(account)`` is the SIP From user the PBX maps to that account;
  ``pbx.stop()`` / ``pbx.start()`` restart the PBX; Asterisk ``pbx.cli(cmd)``,
  FreeSWITCH ``pbx.api(cmd)``. Options: Asterisk ``dial_line`` (replace the
  shipped Dial line), ``extra_dialplan``, ``extra_endpoints``; FreeSWITCH
  ``first_extensions`` (before the shipped ones), ``extra_dialplan``.
* ``agent = Agent(workdir, pbx, procs, policy=policy_yaml(...))`` (the ledger is
  created at once): ``agent.topup(account, "1.00")``, ``agent.start()`` (waits
  for ``daemon.ready``), ``agent.kill()`` (SIGKILL), ``agent.stop()`` (SIGTERM,
  returns the exit status), ``agent.restart()``, ``agent.lines()`` /
  ``agent.wait_log(event, **fields)`` (its JSON log), ``agent.charges(account)``
  (call id -> amount charged, from the ledger through the ``callgate`` CLI),
  ``agent.charge_count(account, call_id)``, ``agent.balance(account)``,
  ``agent.wait_settled(account, call_id)``.
* ``uas = pbx.trunk("answer"|"busy"|"noanswer", calls=N)``: a sipp UAS as the
  carrier (the answering one never hangs up itself); ``uas.invites()`` counts
  the INVITEs it got.
* ``caller = pbx.call(number, account=..., hold=seconds)``: a sipp UAC that calls
  ``number`` and hangs up ``hold`` s after the answer unless the PBX hangs up
  first; ``caller.answered()`` polls for the answer; ``caller.wait()`` returns a
  :class:`CallTrace` (final status, INVITE, answer and BYE times from sipp's own
  message trace, who sent the BYE, the SIP Call-ID).
* ``tariff_charge(billsec, increment, rate)`` is the expected charge.

The call id of the agent and the ledger is the PBX's own: Asterisk's uniqueid,
FreeSWITCH's uuid, the first column of both CDR files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

from tests.realpbx.pbx import Asterisk, CdrRow, FreeSwitch, Pbx, tariff_charge
from tests.realpbx.sip import Caller, CallTrace, Trunk
from tests.realpbx.tools import (
    BOOT_TIMEOUT,
    Ports,
    Procs,
    locate_tools,
    require,
    short_workdir,
    wait_until,
)

__all__ = ["Agent", "Asterisk", "CallTrace", "Caller", "CdrRow", "FreeSwitch", "Pbx", "Ports",
           "Procs", "Trunk", "locate_tools", "policy_yaml", "require", "running_pbx",
           "tariff_charge", "wait_until", "window_excluding_now"]


# --------------------------------------------------------------------------- the agent


def policy_yaml(*, increment: int = 3, rate: str = "0.13", night_window: tuple[str, str],
                max_concurrent: int = 2) -> str:
    """A compressed-tariff policy with the accounts the tier uses.

    ``night`` may only call inside ``night_window`` (a window that excludes now);
    ``capped`` has ``max_concurrent`` lines; every other account calls any time."""
    accounts = "".join(
        f"  {acc}: {{name: {acc}, match: {{accountcodes: [{acc}], caller_id_prefixes: "
        f"['{num}']}}, caller_ids: ['02158880000', '{num}']"
        + (f", calling_hours: [{{days: all, windows: [{{start: '{night_window[0]}', "
           f"end: '{night_window[1]}'}}]}}]" if acc == "night" else "")
        + (f", max_concurrent_calls: {max_concurrent}" if acc == "capped" else "")
        + "}\n" for acc, num in FreeSwitch.CALLERS.items())
    return (
        "version: 1\ncurrency: CNY\nprepaid: {first_topup_minimum: '0.01'}\n"
        f"tariffs:\n  quick: {{rate: '{rate}', increment: {increment}, minimum: {increment}}}\n"
        "defaults:\n  timezone: UTC\n  tariff: quick\n"
        "  calling_hours: [{days: all, windows: [{start: '00:00', end: '24:00'}]}]\n"
        "  callee_cap: {max_attempts: 1000, period: day}\n"
        "  rate_cap: {max_attempts: 10000, period: 1h}\n"
        f"accounts:\n{accounts}")


def window_excluding_now() -> tuple[str, str]:
    """A one-hour UTC window that does not contain the present minute (or the next 2 h)."""
    hour = (time.gmtime().tm_hour + 3) % 24
    return f"{hour:02d}:00", f"{hour:02d}:59"


class Agent:
    """The real ``callgate run`` (the venv's ``callgate`` executable) for one PBX."""

    def __init__(self, workdir: Path, pbx: Pbx, procs: Procs, *, policy: str,
                 grace: int = 2, lead: int = 1) -> None:
        self.dir = workdir / "agent"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pbx = pbx
        self.procs = procs
        self.exe = str(Path(sys.executable).parent / "callgate")
        self.config = self.dir / "agent.yaml"
        (self.dir / "policy.yaml").write_text(policy)
        self.grace = grace
        self.config.write_text(
            "node: realpbx\npolicy: policy.yaml\nledger: 'sqlite:ledger.db'\n"
            f"pbx:\n{pbx.agent_pbx_yaml()}"
            f"meter: {{grace_seconds: {grace}, lead_seconds: {lead}}}\n"
            "log: {format: json, level: info}\n")
        self.log = self.dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0
        self.cli("ledger", "init")  # only `run` and `ledger init` create a ledger

    def cli(self, *args: str, check: bool = True) -> str:
        res = subprocess.run([self.exe, "-c", str(self.config), *args], capture_output=True,
                             timeout=60, check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"callgate {' '.join(args)}: exit {res.returncode}: "
                                 f"{res.stdout.decode()}{res.stderr.decode()}")
        return res.stdout.decode()

    def topup(self, account: str, amount: str) -> None:
        self.cli("ledger", "topup", account, amount, "--ref", f"t-{account}-{time.time_ns()}")

    def start(self, timeout: float = BOOT_TIMEOUT) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        self.proc = self.procs.start([self.exe, "-c", str(self.config), "run"], env=env,
                                     cwd=self.dir, stdout=self.log)
        self.wait_log("daemon.ready", timeout)

    def kill(self) -> None:
        """SIGKILL: no settlement, no goodbye."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self.proc = None
        return code

    def restart(self) -> None:
        if self.proc is not None:
            self.stop()
        self.start()

    def lines(self) -> list[dict[str, object]]:
        """The JSON log lines of the current process (since its start)."""
        try:
            data = self.log.read_bytes()[self._offset:]
        except FileNotFoundError:
            return []
        out = []
        for raw in data.decode(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(raw))
        return out

    def wait_log(self, event: str, timeout: float = 20, **fields: object) -> dict[str, object]:
        def found() -> dict[str, object] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent exited ({self.proc.returncode}) before {event}:\n"
                                     + self.log_tail())
            for line in self.lines():
                if line.get("event") == event and all(line.get(k) == v
                                                       for k, v in fields.items()):
                    return line
            return None
        return wait_until(f"agent log {event} {fields}", found, timeout)  # type: ignore[no-any-return]

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def postings(self, account: str) -> list[dict[str, object]]:
        return json.loads(self.cli("ledger", "history", account, "--json"))["postings"]  # type: ignore[no-any-return]

    def charges(self, account: str) -> dict[str, Decimal]:
        """Call id -> total charged to it (the ledger's ``charge`` postings)."""
        out: dict[str, Decimal] = {}
        for p in self.postings(account):
            if p["kind"] == "charge":
                cid = str(p["call_id"])
                out[cid] = out.get(cid, Decimal(0)) + abs(Decimal(str(p["amount"])))
        return out

    def charge_count(self, account: str, call_id: str) -> int:
        return sum(1 for p in self.postings(account)
                   if p["kind"] == "charge" and p["call_id"] == call_id)

    def balance(self, account: str) -> dict[str, Decimal]:
        data = json.loads(self.cli("ledger", "balance", account, "--json"))
        return {k: Decimal(data[k]) for k in ("posted", "held", "available")}

    def wait_settled(self, account: str, call_id: str, timeout: float = 20) -> Decimal:
        """The call's charge once the ledger has settled it (no hold left)."""
        def settled() -> Decimal | None:
            charges = self.charges(account)
            if call_id in charges and self.balance(account)["held"] == 0:
                return charges[call_id]
            return None
        return wait_until(f"settlement of {call_id}", settled, timeout, every=0.3)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- fixtures


@contextlib.contextmanager
def running_pbx(kind: str, **kwargs: object) -> Iterator[tuple[Pbx, Procs, Ports, Path]]:
    """Boot one PBX (kind) in a fresh short work dir; stop everything afterwards."""
    tools = require(kind)
    workdir = short_workdir(kind[:2])
    procs = Procs()
    ports = Ports()
    cls = Asterisk if kind == "asterisk" else FreeSwitch
    pbx = cls(tools, workdir, ports, procs, **kwargs)  # type: ignore[arg-type]
    try:
        pbx.start()
        yield pbx, procs, ports, workdir
    finally:
        procs.stop_all()
        if os.environ.get("CALLGATE_REALPBX_KEEP") != "1":
            shutil.rmtree(workdir, ignore_errors=True)
