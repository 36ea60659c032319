"""``callgate config check`` and ``run``: what they read, and the notes they give."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from tests.daemon_harness import POLICY, free_port, write_config


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CALLGATE_CONFIG", "CALLGATE_POLICY", "CALLGATE_LEDGER"):
        monkeypatch.delenv(name, raising=False)


def _check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object]]:
    code = main([*argv, "config", "check", "--json"])
    out, err = capsys.readouterr()
    assert err == ""
    return code, json.loads(out)


@pytest.mark.parametrize("make", ["directory", "fifo"])
def test_config_check_notes_a_cdr_file_that_is_not_a_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], make: str) -> None:
    config = write_config(tmp_path, "asterisk", free_port(), free_port(), "s",
                          extra="cdr: {file: cdr/Master.csv}\n")
    (tmp_path / "cdr").mkdir()
    target = tmp_path / "cdr" / "Master.csv"
    if make == "directory":
        target.mkdir()  # a careless `mkdir -p /var/log/asterisk/cdr-csv/Master.csv`
        expected = f"cdr.file: {target} is a directory; name the PBX's CDR file in it"
    else:
        os.mkfifo(target)
        expected = f"cdr.file: {target} is not a regular file"
    code, doc = _check(capsys, "-c", str(config))
    assert code == 0 and doc["problems"] == []
    assert any(str(n).startswith(expected) for n in doc["notes"]), doc["notes"]  # type: ignore[attr-defined]


def test_config_check_takes_policy_and_ledger_options_over_the_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, "asterisk", free_port(), free_port(), "s")
    broken = tmp_path / "other-policy.yaml"
    broken.write_text("version: 1\naccounts: {acme: {}}\n")
    code, doc = _check(capsys, "-c", str(config))
    assert code == 0, doc
    code, doc = _check(capsys, "-c", str(config), "--policy", str(broken))
    assert code == 1 and any("policy refused" in str(p) for p in doc["problems"])  # type: ignore[attr-defined]
    assert f"policy: {broken} (from --policy; {config} names {tmp_path / 'policy.yaml'})" in \
        doc["notes"]  # type: ignore[operator]
    good = tmp_path / "good.yaml"
    good.write_text(POLICY)
    elsewhere = f"sqlite://{tmp_path}/elsewhere.db"
    code, doc = _check(capsys, "-c", str(config), "--policy", str(good), "--ledger", elsewhere)
    assert code == 0
    notes = [str(n) for n in doc["notes"]]  # type: ignore[attr-defined]
    assert any(n.startswith(f"ledger: {elsewhere} (from --ledger;") for n in notes), notes
    assert any(n.startswith(f"ledger: none yet at {tmp_path}/elsewhere.db") for n in notes), notes


def test_config_check_takes_the_environment_too(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path, "asterisk", free_port(), free_port(), "s")
    broken = tmp_path / "other-policy.yaml"
    broken.write_text("version: 1\naccounts: {acme: {}}\n")
    monkeypatch.setenv("CALLGATE_POLICY", str(broken))
    code, doc = _check(capsys, "-c", str(config))
    assert code == 1 and any("(from CALLGATE_POLICY;" in str(n) for n in doc["notes"])  # type: ignore[attr-defined]


def test_run_takes_the_policy_option_over_the_config(tmp_path: Path) -> None:
    """Not silently the config's policy: the refused one named with --policy stops the start."""
    config = write_config(tmp_path, "asterisk", free_port(), free_port(), "s")
    broken = tmp_path / "other-policy.yaml"
    broken.write_text("version: 1\naccounts: {acme: {}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLGATE_")}
    proc = subprocess.run([sys.executable, "-m", "agent", "-c", str(config), "--policy",
                           str(broken), "run"], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "cannot start: policy refused" in proc.stderr and str(broken) in proc.stderr
