"""The running daemon's policy watcher against random bad edits of a valid policy.

A real ``callgate run`` (with the Asterisk simulator) is fed, one SIGHUP at a
time, mutations of a valid policy: impossible dates, wrong types, deep nesting,
huge lines, binary bytes. Whatever the file holds the daemon keeps running,
refuses what the in-process loader refuses (logged and located) and keeps the
last good policy, which a gated call shows at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Coroutine
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.calls import CallInfo, Direction
from agent.gate.decide import decide
from agent.gate.decision import AccountState
from agent.gate.policy import Policy, load_policy
from agent.yamlfile import ConfigError
from tests.daemon_harness import POLICY, free_port, sim_port, simulator, write_config

# The harness policy with a DNC number: the final call shows which policy is in force.
GOOD = POLICY.replace("  calling_hours:",
                      '  do_not_call: {numbers: ["13800138009"]}\n  calling_hours:')
KEYS = ["version", "prepaid", "tariffs", "quick", "rate", "defaults", "tariff",
        "calling_hours", "accounts", "acme", "name", "caller_ids", "do_not_call"]


class LoopThread:
    """An event loop in a thread, for the simulator, driven from a synchronous test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Daemon:
    """``callgate run`` as a subprocess; its JSON log lines collected by a thread."""

    def __init__(self, config: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "-c", str(config), "run"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self.lines: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            text = raw.decode("utf-8", "replace")
            try:
                entry = json.loads(text)
            except ValueError:
                entry = {"event": text}
            with self.changed:
                self.lines.append(entry if isinstance(entry, dict) else {"event": text})
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def count(self, *events: str) -> int:
        return sum(1 for line in self.lines if line.get("event") in events)

    def wait(self, events: tuple[str, ...], count: int, timeout: float = 30) -> dict[str, Any]:
        with self.changed:
            ok = self.changed.wait_for(
                lambda: self.count(*events) >= count or self.proc.poll() is not None, timeout)
            found = [line for line in self.lines if line.get("event") in events]
            assert ok and len(found) >= count, (
                f"no {events} #{count}; exit {self.proc.poll()}; last lines:\n"
                + "\n".join(json.dumps(x)[:300] for x in self.lines[-15:]))
            return found[count - 1]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


# -- mutations of the good policy --------------------------------------------------------

def _insert(text: str, line: str) -> str:
    return text.replace("defaults:\n", "defaults:\n" + line + "\n", 1)


bad_dates = st.builds(
    lambda y, m, d: _insert(GOOD, f"  closed_dates: [{y:04d}-{m:02d}-{d:02d}]"),
    st.integers(1, 9999), st.integers(0, 99), st.integers(0, 99))

any_value = st.one_of(
    st.integers(), st.booleans(), st.none(), st.just("[1, [2, {a: b}]]"), st.just("{x: 1}"),
    st.text(alphabet="abc:{}[]-&*!|>'\"#%@` \t", max_size=30), st.just("2026-02-30"))


@st.composite
def bad_types(draw: Any) -> str:
    lines = GOOD.splitlines()
    index = draw(st.integers(0, len(lines) - 1))
    line = lines[index]
    indent = line[: len(line) - len(line.lstrip())]
    key = line.strip().split(":", 1)[0] or "x"
    lines[index] = f"{indent}{key}: {draw(any_value)}"
    return "\n".join(lines) + "\n"


nesting = st.builds(
    lambda depth, kind: "version: 1\naccounts: " + (
        "[" * depth + "]" * depth if kind else "{a: " * depth + "1" + "}" * depth) + "\n",
    st.integers(20, 20_000), st.booleans())

huge_lines = st.builds(
    lambda size, where, char: _insert(GOOD, f"  {where}: {char * size}"),
    st.integers(10_000, 600_000), st.sampled_from(["timezone", "tariff", "junk", "name"]),
    st.sampled_from(["A", "9", "é", "["]))


@st.composite
def binary_bytes(draw: Any) -> bytes:
    data = GOOD.encode()
    at = draw(st.integers(0, len(data)))
    return data[:at] + draw(st.binary(min_size=1, max_size=64)) + data[at:]


mutations = st.one_of(bad_dates, bad_types(), nesting, huge_lines, binary_bytes())


def oracle(path: Path) -> Policy | None:
    try:
        return load_policy(path)
    except ConfigError:
        return None


@pytest.fixture(scope="module")
def running(tmp_path_factory: Any) -> Any:
    tmp = tmp_path_factory.mktemp("watch")
    loop = LoopThread()
    gate_port = free_port()
    cm = simulator("asterisk", "s3cret", gate_port)
    sim = loop.run(cm.__aenter__())
    config = write_config(tmp, "asterisk", sim_port(sim), gate_port, "s3cret", policy=GOOD)
    loop.run(_topup(tmp / "ledger.db"))
    daemon = Daemon(config)
    try:
        daemon.wait(("daemon.ready",), 1)
        yield tmp, loop, sim, daemon, {"good": GOOD.encode(), "reloads": 0}
    finally:
        rc = daemon.stop()
        loop.run(cm.__aexit__(None, None, None))
        loop.close()
        assert rc == 0, "the daemon did not stop cleanly"


async def _topup(db: Path) -> None:
    from agent.ledger import open_ledger

    ledger = await open_ledger(f"sqlite:///{db}")
    try:
        await ledger.topup("acme", Decimal("100"), ref="t1", at=datetime.now(UTC))
    finally:
        await ledger.close()


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(mutated=mutations)
def test_bad_edits_never_stop_the_daemon_and_the_last_good_policy_stays(
        running: Any, mutated: str | bytes) -> None:
    tmp, _, _, daemon, state = running
    path = tmp / "policy.yaml"
    data = mutated.encode() if isinstance(mutated, str) else mutated
    path.write_bytes(data)
    expected = oracle(path)
    state["reloads"] += 1
    daemon.proc.send_signal(signal.SIGHUP)
    outcome = daemon.wait(("policy.reloaded", "policy.kept_old"), state["reloads"], timeout=60)
    assert daemon.proc.poll() is None, "the daemon stopped"
    assert not [x for x in daemon.lines if x.get("event") == "daemon.component_failed"]
    if expected is None:
        assert outcome["event"] == "policy.kept_old"
        refused = [x for x in daemon.lines if x.get("event") == "policy.reload_refused"]
        assert refused and len(refused[-1]["error"]) < 600  # one clipped line
    else:
        assert outcome["event"] == "policy.reloaded"
        state["good"] = data


def test_the_policy_in_force_is_the_last_good_one(running: Any) -> None:
    tmp, loop, sim, daemon, state = running
    assert daemon.proc.poll() is None
    good_file = tmp / "last_good.yaml"
    good_file.write_bytes(state["good"])
    policy = load_policy(good_file)
    for destination in ("13800138000", "13800138009"):  # the second is on the DNC list
        before = daemon.count("gate.decision")
        loop.run(sim.place_call(caller="02158880000", destination=destination,
                                accountcode="acme", talk_seconds=0.2))
        line = daemon.wait(("gate.decision",), before + 1)
        request = CallInfo("x", Direction.OUTBOUND, "02158880000", destination, "acme")
        want = decide(policy, AccountState(balance=Decimal("100")), request, datetime.now(UTC))
        assert line["reason"] == want.reason.value, (destination, line)


async def test_a_refused_policy_at_start_is_one_line_and_exit_1(tmp_path: Path) -> None:
    from tests.daemon_harness import start_agent

    config = write_config(tmp_path, "asterisk", free_port(), free_port(), "x",
                          policy=_insert(GOOD, "  closed_dates: [2026-13-01, 2026-02-30]"))
    proc = await start_agent(config)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    last = out.decode().strip().splitlines()[-1]
    assert last.startswith("callgate: cannot start: policy refused: ")
    assert "policy.yaml:6: defaults.closed_dates[0]:" in last and "1 more problem" in last
    assert b"Traceback" not in out


# -- the watcher in process: what is published, and that it survives anything ------------

def _daemon_in_process(tmp_path: Path) -> Any:
    from agent.config import load_agent_config
    from agent.daemon import Daemon

    config = write_config(tmp_path, "asterisk", free_port(), free_port(), "x", policy=GOOD)
    daemon = Daemon(load_agent_config(config))
    daemon.policy = load_policy(tmp_path / "policy.yaml")
    published: list[tuple[str, dict[str, Any]]] = []
    daemon._publish = lambda topic, payload: published.append((topic, payload))  # type: ignore[method-assign]
    return daemon, published


async def test_a_refused_reload_is_published_and_the_old_policy_stays(tmp_path: Path) -> None:
    daemon, published = _daemon_in_process(tmp_path)
    old = daemon.policy
    (tmp_path / "policy.yaml").write_text(_insert(GOOD, "  closed_dates: [2026-02-30]"))
    assert daemon.reload_policy("SIGHUP") is False
    assert daemon.policy is old
    topic, payload = published[-1]
    assert topic == "policy/reload" and payload["ok"] is False
    assert "defaults.closed_dates[0]" in payload["errors"][0]


async def test_an_unforeseen_failure_is_refused_too(tmp_path: Path, monkeypatch: Any) -> None:
    import agent.daemon as daemon_module

    daemon, published = _daemon_in_process(tmp_path)
    old = daemon.policy

    def boom(path: Path) -> None:
        raise KeyError("unforeseen")

    monkeypatch.setattr(daemon_module, "load_policy", boom)
    assert await daemon.reload_policy_off_loop("SIGHUP") is False
    assert daemon.policy is old and published[-1][1]["ok"] is False
    assert "KeyError" in published[-1][1]["errors"][0]


async def test_the_watch_loop_survives_a_failing_round(tmp_path: Path, monkeypatch: Any) -> None:
    import agent.daemon as daemon_module

    daemon, _published = _daemon_in_process(tmp_path)
    monkeypatch.setattr(daemon_module, "POLICY_POLL_SECONDS", 0.01)
    calls = {"n": 0}

    def flaky(files: list[Path]) -> Any:
        calls["n"] += 1
        raise RuntimeError("stat failed in an unforeseen way")

    monkeypatch.setattr(daemon_module, "_stamp", flaky)
    watcher = asyncio.create_task(daemon._watch_policy())
    await asyncio.sleep(0.3)
    assert not watcher.done() and calls["n"] > 3  # still watching after many failures
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)


async def test_a_bad_file_name_does_not_blind_the_watcher(tmp_path: Path) -> None:
    import agent.daemon as daemon_module

    daemon, _published = _daemon_in_process(tmp_path)
    (tmp_path / "policy.yaml").write_text(
        GOOD.replace("  calling_hours:", '  do_not_call: {files: ["a\\0b"]}\n  calling_hours:', 1)
        .replace('  do_not_call: {numbers: ["13800138009"]}\n', ""))
    assert daemon.reload_policy("file changed") is False
    daemon_module._stamp(daemon._policy_files)  # must not raise: the watcher would go blind
    (tmp_path / "policy.yaml").write_text(GOOD)
    assert daemon.reload_policy("file changed") is True
