"""``callgate policy check|explain``: exit codes, located errors, JSON shape."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from agent.cli import main

EXAMPLE = Path(__file__).parent.parent / "config" / "policy.yaml"


def test_check_valid_policy_prints_summary(capsys):
    assert main(["policy", "check", str(EXAMPLE)]) == 0
    assert "is valid: 1 accounts" in capsys.readouterr().out


def test_check_invalid_policy_exits_1_with_located_errors(tmp_path, capsys):
    bad = tmp_path / "p.yaml"
    bad.write_text("version: 1\ndefaults:\n  destinations: {deny: [0900]}\n")
    assert main(["policy", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:3: defaults.destinations.deny[0]: must be a quoted string" in err


def test_check_json(tmp_path, capsys):
    bad = tmp_path / "p.yaml"
    bad.write_text("version: 1\nbogus: 1\n")
    assert main(["policy", "check", str(bad), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["valid"] is False and out["errors"][0]["line"] == 2


def test_check_uses_the_environment_when_no_path(monkeypatch, capsys):
    monkeypatch.setenv("CALLGATE_POLICY", str(EXAMPLE))
    assert main(["policy", "check"]) == 0


def test_explain_json_has_the_contract_fields(capsys, tmp_path):
    code = main(["--policy", str(EXAMPLE), "--ledger", f"sqlite:///{tmp_path / 'x.db'}",
                 "policy", "explain", "--account", "acme",
                 "--to", "13800138000", "--at", "2026-11-24T19:29:59", "--balance", "0.26",
                 "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["allow"] is True and out["reason"] == "allowed"
    # one name, one meaning: the limit armed now, what the balance pays, (finish: no close)
    assert out["max_seconds"] == 60 and out["paid_seconds"] == 120 and out["until_close"] is None
    assert out["attempts"]["read"] is False and "no ledger at" in out["attempts"]["note"]
    assert Decimal(out["tariff"]["rate"]) == Decimal("0.13") and out["tariff"]["increment"] == 60
    assert [c["rule"] for c in out["checks"]][-1] == "balance"


def test_explain_human_output_shows_failed_rule(capsys):
    code = main(["--policy", str(EXAMPLE), "policy", "explain", "--account", "acme",
                 "--to", "13800138000", "--at", "2026-11-24T19:30:00", "--balance", "10"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("DENY  reason=outside_hours")
    assert "FAIL  calling_hours" in out


def test_explain_bad_input_exits_2(capsys):
    base = ["--policy", str(EXAMPLE), "policy", "explain", "--to", "138"]
    assert main([*base, "--account", "nobody", "--balance", "1"]) == 2
    assert "unknown account 'nobody'" in capsys.readouterr().err
    assert main([*base, "--account", "acme", "--balance", "abc"]) == 2
    assert "not a number" in capsys.readouterr().err
    assert main([*base, "--account", "acme", "--balance", "1", "--at", "noon"]) == 2
    assert "nor an ISO time" in capsys.readouterr().err


def test_no_policy_anywhere_is_a_usage_error(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("CALLGATE_POLICY", raising=False)
    monkeypatch.delenv("CALLGATE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["policy", "explain", "--account", "a", "--to", "1"]) == 2
    assert "no policy given" in capsys.readouterr().err


async def _ledger_with_attempts(path: Path, at: str, n: int) -> None:
    from datetime import datetime

    from agent.ledger import open_ledger

    ledger = await open_ledger(f"sqlite:///{path}")
    try:
        when = datetime.fromisoformat(at)
        await ledger.topup("acme", Decimal("100"), ref="t1", at=when)
        for i in range(n):
            await ledger.record_attempt("acme", "13800138000", when.replace(minute=i), True,
                                        "allowed")
    finally:
        await ledger.close()


async def test_explain_reads_the_caps_attempts_from_the_ledger(tmp_path, capsys):
    db = tmp_path / "ledger.db"
    await _ledger_with_attempts(db, "2026-11-24T09:00:00+08:00", 2)
    base = ["--policy", str(EXAMPLE), "--ledger", f"sqlite:///{db}", "policy", "explain",
            "--account", "acme", "--at", "2026-11-24T09:30:00", "--json"]
    import asyncio

    # main() runs its own event loop: call it from a thread
    code = await asyncio.to_thread(main, [*base, "--to", "13800138000"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["reason"] == "frequency_cap"  # 2 per calendar day
    assert out["attempts"] == {"read": True, "account": 2, "callee": 2,
                               "note": out["attempts"]["note"]}
    # another number is not capped; --balance still reads the attempts
    code = await asyncio.to_thread(main, [*base, "--to", "13900000000", "--balance", "5"])
    out = json.loads(capsys.readouterr().out)
    assert out["reason"] == "allowed" and out["attempts"]["account"] == 2


def test_explain_without_a_ledger_says_so_and_creates_nothing(tmp_path, capsys):
    db = tmp_path / "none.db"
    base = ["--policy", str(EXAMPLE), "--ledger", f"sqlite:///{db}", "policy", "explain",
            "--account", "acme", "--to", "13800138000", "--at", "2026-11-24T11:00:00"]
    assert main(base) == 2
    assert "no ledger at" in capsys.readouterr().err
    assert main([*base, "--balance", "5"]) == 0
    out = capsys.readouterr().out
    assert "attempts not read (no ledger at" in out and "paid_seconds 2280 s" in out
    assert not db.exists()


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--live-calls=-5"], "--live-calls '-5' must be a whole number from 0 to 1000000"),
    (["--live-calls", "99999999999999999999999"], "must be a whole number from 0"),
    (["--live-calls", "٣"], "must be a whole number from 0"),
    (["--from", ""], "--from must not be blank"),
    (["--from", " "], "--from must not be blank"),
])
def test_explain_refuses_careless_options(capsys, extra, fragment):
    base = ["--policy", str(EXAMPLE), "policy", "explain", "--to", "138", "--account", "acme",
            "--balance", "1"]
    assert main([*base, *extra]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and fragment in err, err


@pytest.mark.parametrize("option", ["-c", "--config", "--policy", "--ledger"])
def test_a_blank_path_or_url_option_is_refused(capsys, monkeypatch, option):
    # Not read as "not given": that would fall back to the environment or agent.yaml.
    monkeypatch.setenv("CALLGATE_POLICY", str(EXAMPLE))
    assert main([option, "", "policy", "check"]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"callgate: error: {option if option != '-c' else '--config'} "
                              "must not be blank\n")
