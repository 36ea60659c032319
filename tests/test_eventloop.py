"""The event loop the agent runs on (agent.eventloop): uvloop, or asyncio's by choice."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from agent import eventloop
from agent.cli import main


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


async def test_the_tests_run_on_the_loop_the_daemon_runs_on() -> None:
    # Whatever CALLGATE_EVENT_LOOP says for this run (unset: uvloop where installed).
    assert eventloop.running_loop_name() == eventloop.loop_name()
    if not os.environ.get(eventloop.ENV) and eventloop.uvloop is not None:
        assert eventloop.running_loop_name() == "uvloop"


def test_uvloop_asked_for_but_missing_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eventloop, "uvloop", None)
    monkeypatch.setenv(eventloop.ENV, "uvloop")
    with pytest.raises(eventloop.LoopChoiceError, match="uvloop is not installed"):
        eventloop.loop_name()
    monkeypatch.delenv(eventloop.ENV)
    assert eventloop.loop_name() == "asyncio"  # not asked for: the standard loop


def test_the_environment_selects_asyncios_own_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "asyncio")
    assert eventloop.loop_name() == "asyncio"
    assert eventloop.run(_loop_type()).__module__.startswith("asyncio")
    monkeypatch.setenv(eventloop.ENV, " UVLOOP ")
    if eventloop.uvloop is not None:
        assert eventloop.run(_loop_type()).__module__.startswith("uvloop")


def test_an_unknown_loop_is_refused_with_its_name_before_anything_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(eventloop.ENV, "tokio")
    ledger = tmp_path / "ledger.db"
    code = main(["--ledger", f"sqlite://{ledger}", "calls"])
    err = capsys.readouterr().err
    assert code == 2
    assert "CALLGATE_EVENT_LOOP='tokio'" in err and "uvloop, asyncio" in err
    assert not ledger.exists()  # the command never ran
