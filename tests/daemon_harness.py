"""Run the real ``callgate run`` process against the PBX simulators (shared by the e2e tests).

Besides starting the agent and the simulators: :class:`Agent` (a running agent
whose JSON log lines are collected as they come, to wait on), :class:`TcpProxy`
(a loopback proxy a test can take down and bring back, to make one agent lose
its ledger or broker without touching the shared servers) and
:func:`money_problems` (the five money invariants checked against the
simulator's own figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent.rating import Tariff, rate
from agent.sim.asterisk import SHIPPED_EVENTFILTER, AsteriskSimulator
from agent.sim.freeswitch import FreeswitchSimulator

POLICY = """\
version: 1
prepaid: {first_topup_minimum: "0.10"}
tariffs:
  quick: {rate: "0.13", increment: 2, minimum: 2}
defaults:
  tariff: quick
  calling_hours: [{days: all, windows: [{start: "00:00", end: "24:00"}]}]
accounts:
  acme: {name: ACME, caller_ids: ["02158880000"]}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp: Path, kind: str, pbx_port: int, gate_port: int, secret: str, *,
                 ledger: str = "sqlite:ledger.db", node: str = "t1", policy: str = POLICY,
                 extra: str = "") -> Path:
    """agent.yaml (and policy.yaml) in ``tmp``; ``extra`` is appended as more top-level keys."""
    (tmp / "policy.yaml").write_text(policy)
    if kind == "asterisk":
        pbx = (f"  kind: asterisk\n  ami: {{port: {pbx_port}, secret: {secret}}}\n"
               f"  fastagi: {{listen: '127.0.0.1:{gate_port}'}}\n")
    else:
        pbx = (f"  kind: freeswitch\n  esl: {{port: {pbx_port}, password: {secret}}}\n"
               f"  outbound_socket: {{listen: '127.0.0.1:{gate_port}'}}\n")
    path = tmp / "agent.yaml"
    path.write_text(f"node: {node}\npolicy: policy.yaml\nledger: '{ledger}'\n"
                    f"pbx:\n{pbx}meter: {{lead_seconds: 1}}\nlog: {{format: json, level: info}}\n"
                    + extra)
    return path


async def start_agent(config: Path) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    for name in ("CALLGATE_CONFIG", "CALLGATE_POLICY", "CALLGATE_LEDGER"):
        env.pop(name, None)  # run takes them over the agent config's policy and ledger
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "-c", str(config), "run",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


async def read_until(proc: asyncio.subprocess.Process, needle: str, seen: list[str],
                     timeout: float = 15) -> str:
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                raise AssertionError(f"agent exited before {needle!r}:\n{''.join(seen)}")
            seen.append(line)
            if needle in line:
                return line


@contextlib.asynccontextmanager
async def simulator(kind: str, secret: str, gate_port: int, *,
                    shipped_eventfilter: bool = False) -> AsyncIterator[object]:
    """The simulator of ``kind``; ``shipped_eventfilter``: Asterisk sends only what
    config/asterisk/manager.conf's eventfilter lets through, as in service."""
    if kind == "asterisk":
        sim = AsteriskSimulator("callgate", secret, ("127.0.0.1", gate_port),
                                auth_fail_delay=0.05,
                                eventfilter=[SHIPPED_EVENTFILTER] if shipped_eventfilter else ())
        async with sim:
            yield sim
    else:
        fs = FreeswitchSimulator(secret, ("127.0.0.1", gate_port))
        async with fs:
            yield fs


def sim_port(sim: object) -> int:
    address = getattr(sim, "ami_address", None) or sim.esl_address  # type: ignore[attr-defined]
    return int(address[1])


# -- watching the daemon process from outside (tests/test_hostile.py, bench/soak.py) ------


def open_fds(pid: int) -> int:
    """File descriptors the process holds now (sockets, the ledger's files, pipes)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    """Resident set size (``VmRSS`` in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process used so far (/proc/<pid>/stat fields 14, 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def scrape_metrics(port: int, timeout: float = 10) -> dict[str, float]:
    """``GET /metrics`` from the daemon: ``{"name{labels}": value}`` for every sample."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            data = await reader.read(-1)
        finally:
            writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    if " 200 " not in head.split("\r\n", 1)[0]:
        raise AssertionError(f"/metrics answered {head!r}")
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def drain_output(proc: asyncio.subprocess.Process, seen: list[str]) -> None:
    """Keep reading the agent's log lines into ``seen`` (a full pipe would stall it)."""
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        seen.append(line.decode())


class Agent:
    """A running ``callgate run``; its JSON log lines are collected as they come.

    ``async with Agent(config) as agent:`` starts it and kills it (SIGKILL) on
    the way out if it still runs; :meth:`wait_for` waits for a log event.
    """

    def __init__(self, config: Path) -> None:
        self.config = config
        self.lines: list[dict[str, Any]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Agent:
        self.proc = await start_agent(self.config)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode("utf-8", "replace").rstrip("\n")
            try:
                entry = json.loads(text)
            except ValueError:
                entry = None
            self.lines.append(entry if isinstance(entry, dict) else {"event": text, "raw": True})
            self._changed.set()
        self._changed.set()

    def matching(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == event
                and all(line.get(k) == v for k, v in fields.items())]

    async def wait_for(self, event: str, *, count: int = 1, timeout: float = 15,
                       **fields: Any) -> dict[str, Any]:
        """The ``count``-th log line (since start) of ``event`` with these fields."""
        assert self._reader is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    found = self.matching(event, **fields)
                    if len(found) >= count:
                        return found[count - 1]
                    if self._reader.done():
                        raise AssertionError(f"the agent exited before {event} {fields}:\n"
                                             + self.tail())
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"no {count} x {event} {fields} within {timeout} s:\n"
                                 + self.tail()) from None

    def tail(self, n: int = 40) -> str:
        return "\n".join(json.dumps(line) for line in self.lines[-n:])

    def crashes(self) -> list[dict[str, Any]]:
        """Lines that show a bug rather than a fault handled: tracebacks, failed components."""
        fatal = {"meter.call_failed", "meter.event_failed", "daemon.component_failed"}
        return [line for line in self.lines
                if line.get("event") in fatal
                or ("exception" in line and line.get("level") in ("error", "critical"))
                or (line.get("raw") and "Traceback" in line["event"])]

    async def kill(self) -> None:
        """SIGKILL (if still running): nothing is flushed, nothing is settled."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)

    async def stop(self, timeout: float = 15) -> int:
        """SIGTERM, and the exit status."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout)


class TcpProxy:
    """A loopback TCP proxy to ``target``, to cut one agent off a shared server.

    ``down()`` closes the listener and cuts every connection (new ones are
    refused, as from a stopped server); ``up()`` listens again on the same port.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> TcpProxy:
        await self.up()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.down()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._writers.update(pair)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                for w in pair:
                    w.transport.abort()
                    self._writers.discard(w)

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


def service_or_skip(port: int, what: str) -> None:
    """Skip when a shared local service is down (fail under ``CI=true``: CI must not skip)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return
    except OSError:
        message = f"{what} is not reachable at 127.0.0.1:{port}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI requires it)", pytrace=False)
        pytest.skip(message)


async def _cdr_of(ledger: Any, account: str, call_id: str) -> Any:
    start, end = datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)
    for cdr in await ledger.cdrs(account, start, end):
        if cdr.call_id == call_id:
            return cdr
    return None


async def money_problems(ledger: Any, results: Mapping[str, Any], grace: int = 2) -> list[str]:
    """The five money invariants, against the simulator's own figures.

    ``results``: call id -> the simulator's ``CallResult`` of every call placed
    (``answered_at`` and ``billsec`` are the PBX's truth). Empty when all hold:

    1. every ended answered call is charged exactly ``rate(billsec)``, once; up to
       ``grace`` s past the paid boundary may go unbilled (flag ``grace``); a call
       whose end the agent never heard is charged what it paid for (flag
       ``billsec_assumed_paid``), and one whose answer it never knew nothing
       (flag ``outcome_unknown``), as the meter documents;
    2. no call talked beyond its paid seconds + grace (the PBX-side deadline);
    3. no hold overdrew its account (the postings replayed in order);
    4. the postings sum to the balances (``ledger.audit()``);
    5. nothing is left held or live once every call has ended.
    """
    problems: list[str] = []
    accounts: set[str] = set()
    for call_id, result in results.items():
        record = await ledger.get_call(call_id)
        if record is None:
            if result.answered_at is not None:
                problems.append(f"{call_id}: talked {result.billsec} s, unknown to the ledger")
            continue
        accounts.add(record.account)
        cdr = await _cdr_of(ledger, record.account, call_id)
        if cdr is None:
            problems.append(f"{call_id}: ended on the PBX, never settled (orphan)")
            continue
        tariff = Tariff(record.tariff_name, record.rate, record.increment, record.minimum)
        paid, billsec = record.paid_seconds, result.billsec
        if billsec > paid + grace:
            problems.append(f"{call_id}: talked {billsec} s, paid {paid} s (+{grace} grace)")
        if "outcome_unknown" in cdr.flags:
            expected = Decimal(0)
        elif "billsec_assumed_paid" in cdr.flags:
            expected = rate(tariff, paid)
        elif result.answered_at is None:
            expected = Decimal(0)
        else:
            expected = rate(tariff, min(billsec, paid) if "grace" in cdr.flags else billsec)
            if cdr.billsec != billsec and "billsec_from_times" not in cdr.flags:
                problems.append(f"{call_id}: CDR billsec {cdr.billsec}, the PBX says {billsec}")
        if cdr.amount != expected:
            problems.append(f"{call_id}: charged {cdr.amount}, expected {expected} "
                            f"(PBX billsec {billsec}, paid {paid} s, flags {cdr.flags})")
    for balance in await ledger.balances():
        posted = held = Decimal(0)
        charged: dict[str | None, list[Decimal]] = defaultdict(list)
        for p in await ledger.history(balance.account):
            kind = p.kind.value
            if kind in ("topup", "adjustment"):
                posted += p.amount
            elif kind in ("penalty", "refund"):
                posted -= p.amount
            elif kind == "hold":
                held += p.amount
                if posted - held < 0:
                    problems.append(f"{balance.account}: hold {p.key} overdrew to {posted - held}")
            elif kind == "charge":
                posted -= p.amount
                held -= p.amount
                charged[p.call_id].append(p.amount)
            elif kind == "release":
                held -= p.amount
        problems += [f"{call_id}: charged {len(amounts)} times {amounts}"
                     for call_id, amounts in charged.items() if len(amounts) > 1]
        if balance.held != 0:
            problems.append(f"{balance.account}: {balance.held} still held")
    problems += await ledger.audit()
    left = [c.call_id for c in await ledger.live_calls()]
    if left:
        problems.append(f"live calls left in the ledger: {left}")
    return problems
