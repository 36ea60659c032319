"""Errors a user can cause are one clear line: a port in use (metrics, FastAGI, ESL
outbound socket), an output pipe closed early (``… | head``), a 10 MB line in a
do-not-call file (cut to a readable length in the error, the log and the MQTT event)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.cli import main
from agent.config import load_agent_config
from agent.ledger import open_ledger
from tests.daemon_harness import POLICY, free_port, sim_port, simulator, start_agent, write_config

NOISE = ("Traceback", "Task was destroyed", "Event loop is closed", "Exception ignored")


@pytest.fixture
def taken() -> Iterator[int]:
    """A loopback port something else is listening on."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def _clean_exit(out: bytes, needle: str) -> str:
    text = out.decode()
    for noise in NOISE:
        assert noise not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("callgate: cannot start: ") and needle in last, text[-3000:]
    return last


async def test_metrics_port_in_use_is_one_line(tmp_path: Path, taken: int) -> None:
    config = write_config(tmp_path, "asterisk", free_port(), free_port(), "x",
                          extra=f"metrics: {{listen: '127.0.0.1:{taken}'}}\n")
    proc = await start_agent(config)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    _clean_exit(out, f"metrics.listen 127.0.0.1:{taken}: Address already in use")
    assert len(out.decode().splitlines()) < 10


@pytest.mark.parametrize(("kind", "key"), [("asterisk", "pbx.fastagi.listen"),
                                           ("freeswitch", "pbx.outbound_socket.listen")])
async def test_gate_port_in_use_is_one_line_with_the_pbx_up(tmp_path: Path, taken: int,
                                                            kind: str, key: str) -> None:
    async with simulator(kind, "s3cret", free_port()) as sim:
        config = write_config(tmp_path, kind, sim_port(sim), taken, "s3cret")
        proc = await start_agent(config)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    _clean_exit(out, f"{key} 127.0.0.1:{taken}: Address already in use")


async def _many_postings(url: str, n: int) -> None:
    ledger = await open_ledger(url)
    try:
        at = datetime(2026, 11, 20, tzinfo=UTC)
        await ledger.topup("acme", D(100), ref="B0", at=at)
        await asyncio.gather(*(ledger.topup("acme", D("0.01"), ref=f"B{i}", at=at,
                                            note="x" * 40) for i in range(1, n)))
    finally:
        await ledger.close()


async def test_a_closed_output_pipe_ends_quietly(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/ledger.db"
    await _many_postings(url, 1500)  # ~150 kB of history: more than a pipe holds
    (tmp_path / "policy.yaml").write_text(POLICY)
    script = (f"{sys.executable} -m agent --policy {tmp_path}/policy.yaml --ledger {url} "
              "ledger history acme | head -n 2")
    proc = await asyncio.create_subprocess_shell(
        f"set -o pipefail; {script}", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        executable="/bin/bash")
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert len(out.decode().splitlines()) == 2
    assert err.decode() == ""
    assert proc.returncode == 141  # what `set -o pipefail` reports for a SIGPIPE'd writer


def _policy_with_dnc(tmp_path: Path, line: str) -> Path:
    (tmp_path / "dnc.txt").write_text(f"13800138000\n{line}\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.replace(
        "defaults:\n", "defaults:\n  do_not_call: {files: [dnc.txt]}\n"))
    return policy


def test_a_huge_dnc_line_is_cut_in_the_error(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    policy = _policy_with_dnc(tmp_path, "9" * 10_000_000)
    assert main(["policy", "check", str(policy)]) == 1
    err = capsys.readouterr().err
    assert len(err) < 500 and "dnc.txt" in err and "10000000 characters" in err, err[:500]


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        self.events.append((topic, payload))


def test_a_huge_dnc_line_is_cut_in_the_log_and_the_event(tmp_path: Path) -> None:
    from agent.daemon import Daemon

    config = write_config(tmp_path, "asterisk", free_port(), free_port(), "x")
    daemon = Daemon(load_agent_config(config))
    daemon.publisher = _Recorder()
    _policy_with_dnc(tmp_path, "x" * 10_000_000)
    with capture_logs() as logs:
        assert daemon.reload_policy("test") is False
    ((topic, payload),) = daemon.publisher.events
    assert topic == "policy/reload" and payload["ok"] is False
    assert all(len(e) < 500 for e in payload["errors"]), [len(e) for e in payload["errors"]]
    assert all(len(str(entry)) < 1000 for entry in logs)
