"""``callgate status``: the board and its verdict (pure), and the command over a real daemon."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent import __version__
from agent.cli import main
from agent.ledger import open_ledger
from agent.status import KEEP_MINUTES, StatusBoard, verdict
from tests.daemon_harness import (
    Agent,
    free_port,
    scrape_metrics,
    sim_port,
    simulator,
    write_config,
)

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parent.parent


# -- the board and the verdict (pure) ----------------------------------------------------------
def test_recent_counts_cover_their_windows_and_old_minutes_are_dropped() -> None:
    board = StatusBoard(T0, "9.9", "n1")
    board.decision(T0 - timedelta(minutes=16), "ALLOW", "allowed")  # out of every window
    board.decision(T0 - timedelta(minutes=10), "ALLOW", "allowed")
    board.decision(T0 - timedelta(minutes=3), "DENY", "insufficient_balance")
    board.decision(T0, "ALLOW", "allowed")
    board.decision(T0, "DENY", "ledger_unavailable")
    board.cutoff(T0 - timedelta(seconds=30), "balance", late=True)
    recent = board.recent(T0)
    assert recent["1m"] == {"decisions": 2, "allowed": 1, "refused": {"ledger_unavailable": 1},
                            "cutoffs": {"balance": 1}, "late_cutoffs": 1}
    assert recent["5m"]["refused"] == {"insufficient_balance": 1, "ledger_unavailable": 1}
    assert recent["15m"]["decisions"] == 4
    later = T0 + timedelta(minutes=KEEP_MINUTES)
    board.decision(later + timedelta(minutes=1), "ALLOW", "allowed")  # prunes the old minutes
    assert len(board._minutes) == 1
    assert board.recent(later + timedelta(minutes=1))["15m"]["decisions"] == 1


def _healthy() -> dict[str, Any]:
    return {"ready": True, "accepting": True, "pbx": {"connected": True},
            "ledger": {"reachable": True}, "mqtt": {"connected": True, "depth": 0},
            "policy": {"loaded_at": T0.isoformat()}, "last_refused_reload": None}


def test_verdict_names_each_problem() -> None:
    assert verdict(_healthy()) == ("healthy", [])
    doc = _healthy() | {"pbx": {"connected": False},
                        "ledger": {"reachable": False, "error": "database is locked"},
                        "mqtt": {"connected": False, "depth": 12}}
    state, problems = verdict(doc)
    assert state == "degraded"
    assert problems == ["PBX not connected", "ledger not reachable: database is locked",
                        "MQTT broker not connected (12 event(s) waiting)"]
    assert verdict(_healthy() | {"mqtt": None}) == ("healthy", [])  # MQTT not configured
    # A refused reload degrades until a later load succeeds.
    refused = {"at": (T0 + timedelta(seconds=5)).isoformat(), "error_count": 1}
    assert verdict(_healthy() | {"last_refused_reload": refused})[0] == "degraded"
    fixed = {"loaded_at": (T0 + timedelta(seconds=9)).isoformat()}
    assert verdict(_healthy() | {"last_refused_reload": refused, "policy": fixed})[0] == "healthy"


# -- the command without a daemon --------------------------------------------------------------
def _config(tmp: Path, metrics_port: int | None) -> Path:
    path = write_config(tmp, "asterisk", free_port(), free_port(), "s",
                        extra=f"metrics: {{listen: '127.0.0.1:{metrics_port}'}}\n"
                        if metrics_port else "")
    return path


def test_no_daemon_is_down_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    config = _config(tmp_path, port)
    assert main(["-c", str(config), "status"]) == 2
    out, err = capsys.readouterr()
    assert err == "" and out.count("\n") == 1
    assert out.startswith(f"down: no callgate daemon answering on 127.0.0.1:{port} (")
    assert main(["-c", str(config), "status", "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["state"] == "down" and doc["listener"] == f"127.0.0.1:{port}"


def test_listen_names_the_listener_without_a_config(capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    port = free_port()
    assert main(["status", "--listen", f"127.0.0.1:{port}"]) == 2
    assert capsys.readouterr().out.startswith(f"down: no callgate daemon answering on "
                                              f"127.0.0.1:{port}")
    assert main(["status", "--listen", "localhost"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not HOST:PORT" in err


@pytest.mark.parametrize("timeout", ["nan", "NaN", "inf", "-inf", "0", "-1", "1e9", "abc", ""])
def test_a_timeout_that_is_not_a_sane_number_of_seconds_is_bad_usage(
        timeout: str, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens: a timeout taken would report "down" on stdout
    assert main(["status", "--listen", f"127.0.0.1:{port}", f"--timeout={timeout}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"callgate: error: --timeout {timeout!r} "), err


def test_status_needs_the_metrics_listener(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, None)
    assert main(["-c", str(config), "status"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no 'metrics:' section" in err


# -- over a real daemon --------------------------------------------------------------------------
@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory any local user can read (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="callgate-status-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _as_other_user() -> dict[str, Any] | None:
    """How to run the CLI as an unprivileged user from here (root only), else None."""
    if os.geteuid() != 0:
        return None  # we are not root already: running as ourselves proves the point
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return None
    system = shutil.which("python3", path="/usr/bin")
    if system is None:
        return None
    version = subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    if version != str(tuple(sys.version_info[:2])):
        return None
    site = next(p for p in sys.path if p.endswith("site-packages"))
    return {"user": "nobody", "exe": system,
            "env": {"PYTHONPATH": f"{REPO}:{site}", "PATH": "/usr/bin:/bin", "HOME": "/tmp"}}


async def _status(config: Path, *extra: str, other: dict[str, Any] | None = None
                  ) -> tuple[int, str]:
    """``callgate -c CONFIG status`` in a separate process (a second shell)."""
    exe = other["exe"] if other else sys.executable
    env = other["env"] if other else {**os.environ}
    done = await asyncio.to_thread(
        subprocess.run, [exe, "-m", "agent", "-c", str(config), "status", *extra], cwd="/tmp",
        env=env, user=other["user"] if other else None, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, timeout=30)
    return done.returncode, done.stdout.decode()


async def test_status_of_a_running_daemon_then_a_refused_reload_then_down(
        shared_dir: Path) -> None:
    gate_port, metrics_port = free_port(), free_port()
    async with simulator("asterisk", "s", gate_port) as sim:
        config = write_config(shared_dir, "asterisk", sim_port(sim), gate_port, "s",
                              extra=f"metrics: {{listen: '127.0.0.1:{metrics_port}'}}\n")
        for f in shared_dir.iterdir():
            f.chmod(0o644)
        ledger = await open_ledger(f"sqlite://{shared_dir / 'ledger.db'}")
        await ledger.topup("acme", Decimal("5"), ref="t1", at=datetime.now(UTC))
        await ledger.close()
        async with Agent(config) as agent:
            started = await agent.wait_for("daemon.started")
            assert started["version"] == __version__
            await agent.wait_for("daemon.ready")
            call = await sim.place_call(caller="02158880000", destination="13800138000",
                                        accountcode="acme", talk_seconds=1)
            await asyncio.wait_for(call.ended(), 15)
            await agent.wait_for("meter.settled", call_id=call.call_id)

            code, out = await _status(config, "--json")
            assert code == 0, out
            doc = json.loads(out)
            assert (doc["state"], doc["problems"], doc["version"]) == ("healthy", [], __version__)
            assert doc["pbx"] == {"kind": "asterisk", "connected": True, "state": "up",
                                  "command_timeouts": 0, "late_replies": 0, "reconnects": 0}
            assert doc["ledger"]["reachable"] is True
            policy = doc["policy"]
            assert policy["file"] == str(shared_dir / "policy.yaml") and policy["accounts"] == 1
            import hashlib
            assert policy["sha256"] == hashlib.sha256(
                (shared_dir / "policy.yaml").read_bytes()).hexdigest()
            assert doc["recent"]["5m"]["allowed"] == 1 and doc["mqtt"] is None
            assert doc["live_calls"] == {"total": 0, "by_account": {}}

            samples = await scrape_metrics(metrics_port)
            assert samples[f'callgate_build_info{{version="{__version__}"}}'] == 1
            assert samples["callgate_start_time_seconds"] > 0
            assert samples['callgate_account_live_calls{account="acme"}'] == 0
            assert samples['callgate_account_low_balance_line{account="acme"}'] == 20  # default
            assert samples["callgate_policy_last_reload_ok"] == 1
            # Read from the ledger at start (5 topped up) and every 10 s after (the 1 s call
            # at 0.13 per 2 s increment leaves 4.87).
            assert samples['callgate_account_available_balance{account="acme"}'] in (5.0, 4.87)

            code, out = await _status(config)
            assert code == 0, out
            assert out.startswith(f"healthy: callgate {__version__} on node t1")
            code, out = await _status(config, "--listen", f"127.0.0.1:{metrics_port}")
            assert code == 0 and out.startswith("healthy:"), out
            assert "pbx         asterisk: connected" in out

            other = _as_other_user()
            if other is not None:  # the same answer for an unprivileged user
                code, out = await _status(config, other=other)
                assert code == 0 and out.startswith("healthy:"), out

            # A broken policy on disk: refused with its located error, the old one kept.
            (shared_dir / "policy.yaml").write_text(
                (shared_dir / "policy.yaml").read_text().replace("name: ACME", "name: [ACME"))
            await agent.wait_for("policy.reload_refused", timeout=20)
            code, out = await _status(config)
            assert code == 1, out
            assert out.startswith("degraded:")
            assert "policy on disk was refused" in out
            assert "policy.yaml" in out.split("refused     reload at", 1)[1]
            code, out = await _status(config, "--json")
            refused = json.loads(out)["last_refused_reload"]
            assert refused["error_count"] >= 1 and "policy.yaml:" in refused["errors"][0]
            assert await agent.stop() == 0
        code, out = await _status(config)
        assert code == 2 and out.startswith("down: ") and out.count("\n") == 1


async def test_a_lost_pbx_link_is_degraded(tmp_path: Path) -> None:
    gate_port, metrics_port = free_port(), free_port()
    sim_cm = simulator("asterisk", "s", gate_port)
    sim = await sim_cm.__aenter__()
    try:
        config = write_config(tmp_path, "asterisk", sim_port(sim), gate_port, "s",
                              extra=f"metrics: {{listen: '127.0.0.1:{metrics_port}'}}\n")
        async with Agent(config) as agent:
            await agent.wait_for("daemon.ready")
            assert (await _status(config))[0] == 0
            await sim_cm.__aexit__(None, None, None)  # the PBX goes away
            sim_cm = None
            for _ in range(50):
                code, out = await _status(config, "--json")
                if code == 1:
                    break
                await asyncio.sleep(0.2)
            doc = json.loads(out)
            assert (code, doc["state"], doc["pbx"]["connected"]) == (1, "degraded", False), out
            assert "PBX not connected" in doc["problems"]
            assert doc["ledger"]["reachable"] is True  # the rest still answers
    finally:
        if sim_cm is not None:
            await sim_cm.__aexit__(None, None, None)


# -- what the daemon records from its own events -------------------------------------------
def test_the_daemon_counts_executed_cutoffs_and_balance_refusals(tmp_path: Path) -> None:
    from agent.calls import CallInfo, Direction
    from agent.config import load_agent_config
    from agent.daemon import Daemon
    from agent.gate.decision import Decision, Reason
    from agent.meter.clock import WallClock
    from agent.metrics import Metrics

    class Fixed(WallClock):
        def now(self) -> datetime:
            return T0

    config = load_agent_config(_config(tmp_path, None))
    daemon = Daemon(config, clock=Fixed())
    daemon.metrics = metrics = Metrics()
    metrics.watch_accounts({"acme": Decimal("20")})
    daemon._publish("cutoff", {"stage": "planned", "reason": "balance"})  # not counted
    daemon._publish("cutoff", {"stage": "executed", "reason": "balance", "late_ms": 400})
    daemon._publish("cutoff", {"stage": "executed", "reason": "window_end", "late_ms": 2500})
    call = CallInfo("c1", Direction.OUTBOUND, "02158880000", "13800138000")
    daemon._on_decision(call, Decision(False, Reason.INSUFFICIENT_BALANCE, "", "acme"), 0.001)
    daemon._on_decision(call, Decision(True, Reason.ALLOWED, "", "acme"), 0.001)
    text = metrics.exposition().decode()
    assert 'callgate_cutoffs_total{reason="balance"} 1.0' in text
    assert 'callgate_cutoffs_total{reason="window_end"} 1.0' in text
    assert "callgate_late_cutoffs_total 1.0" in text  # 2.5 s late; the grace is 2 s
    assert "callgate_cutoff_lateness_seconds_count 2.0" in text
    assert ('callgate_account_refusals_total{account="acme",reason="insufficient_balance"} 1.0'
            in text)
    recent = daemon.board.recent(T0)["1m"]
    assert recent == {"decisions": 2, "allowed": 1, "refused": {"insufficient_balance": 1},
                      "cutoffs": {"balance": 1, "window_end": 1}, "late_cutoffs": 1}


def test_a_slow_pbx_degrades_and_says_the_link_is_kept() -> None:
    slow = _healthy() | {"pbx": {"connected": True, "state": "slow", "command_timeouts": 7}}
    state, problems = verdict(slow)
    assert state == "degraded"
    assert problems == ["the PBX answers commands late (link kept, not reconnected; "
                        "7 command timeouts so far)"]
    up = _healthy() | {"pbx": {"connected": True, "state": "up", "command_timeouts": 7}}
    assert verdict(up) == ("healthy", [])
