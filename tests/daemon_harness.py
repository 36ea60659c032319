"""Run the real ``callgate run`` process against the PBX simulators (shared by the e2e tests)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from agent.sim.asterisk import AsteriskSimulator
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


def write_config(tmp: Path, kind: str, pbx_port: int, gate_port: int, secret: str) -> Path:
    (tmp / "policy.yaml").write_text(POLICY)
    if kind == "asterisk":
        pbx = (f"  kind: asterisk\n  ami: {{port: {pbx_port}, secret: {secret}}}\n"
               f"  fastagi: {{listen: '127.0.0.1:{gate_port}'}}\n")
    else:
        pbx = (f"  kind: freeswitch\n  esl: {{port: {pbx_port}, password: {secret}}}\n"
               f"  outbound_socket: {{listen: '127.0.0.1:{gate_port}'}}\n")
    path = tmp / "agent.yaml"
    path.write_text(f"node: t1\npolicy: policy.yaml\nledger: sqlite:ledger.db\n"
                    f"pbx:\n{pbx}meter: {{lead_seconds: 1}}\nlog: {{format: json, level: info}}\n")
    return path


async def start_agent(config: Path) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
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
async def simulator(kind: str, secret: str, gate_port: int) -> AsyncIterator[object]:
    if kind == "asterisk":
        sim = AsteriskSimulator("callgate", secret, ("127.0.0.1", gate_port),
                                auth_fail_delay=0.05)
        async with sim:
            yield sim
    else:
        fs = FreeswitchSimulator(secret, ("127.0.0.1", gate_port))
        async with fs:
            yield fs


def sim_port(sim: object) -> int:
    address = getattr(sim, "ami_address", None) or sim.esl_address  # type: ignore[attr-defined]
    return int(address[1])
