"""``callgate complaint|dnc|account …`` via ``agent.cli.main``: output, exit codes, MQTT."""

from __future__ import annotations

import json
import textwrap
import uuid
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest

from agent import eventloop
from agent.cli import main
from agent.ledger import PostingKind, open_ledger
from tests.test_mqtt import mosquitto, subscribed  # noqa: F401  (mosquitto: a fixture)

POLICY = """\
version: 1
prepaid:
  first_topup_minimum: 100
  complaint_penalty: 1000
complaints: {suspend_after: 2, period: 30d}
accounts:
  acme:
    name: ACME
    caller_ids: ["02158880000"]
  beta:
    name: Beta
    caller_ids: ["02158880001"]
"""


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Any:
    for name in ("CALLGATE_CONFIG", "CALLGATE_POLICY", "CALLGATE_LEDGER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOGNAME", "alice")
    monkeypatch.setenv("USER", "alice")
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent(POLICY))
    url = f"sqlite://{tmp_path}/ledger.db"

    def run(*argv: str, config: Path | None = None) -> tuple[int, str, str]:
        head = ["-c", str(config)] if config else []
        code = main([*head, "--policy", str(policy), "--ledger", url, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    assert run("ledger", "init")[0] == 0
    run.url = url  # type: ignore[attr-defined]
    return run


def ledger_do(url: str, fn: Any) -> Any:
    async def go() -> Any:
        ledger = await open_ledger(url)
        try:
            return await fn(ledger)
        finally:
            await ledger.close()

    return eventloop.run(go())


def test_complaint_add_fines_once_lists_dnc_and_suspends(cli: Any) -> None:
    assert cli("ledger", "topup", "acme", "3000", "--ref", "p1")[0] == 0
    code, out, err = cli("complaint", "add", "--account", "acme", "--callee", "+8613800138000",
                         "--ticket", "12321-1", "--at", "2026-11-24T10:00", "--note", "rude")
    assert (code, err) == (0, "")
    assert out.splitlines() == ["complaint 12321-1: acme, callee 13800138000, fined 1000.00 "
                                "CNY; 13800138000 is on acme's do-not-call list"]
    code, out, _ = cli("complaint", "add", "--account", "acme", "--callee", "13800138000",
                       "--ticket", "12321-1", "--at", "2026-11-24T10:00", "--note", "rude")
    assert code == 0 and "already recorded" in out
    code, _, err = cli("complaint", "add", "--account", "acme", "--callee", "13900139000",
                       "--ticket", "12321-1", "--at", "2026-11-24T10:00")
    assert code == 2 and err.count("\n") == 1 and "already recorded" in err
    code, out, _ = cli("--operator", "bob", "complaint", "add", "--account", "acme",
                       "--callee", "13900139000", "--ticket", "12321-2", "--json")
    result = json.loads(out)
    assert code == 0 and result["suspended"] and result["operator"] == "bob"
    history = ledger_do(cli.url, lambda lg: lg.history("acme"))
    assert [p.amount for p in history if p.kind is PostingKind.PENALTY] == [D("1000")] * 2
    code, out, _ = cli("dnc", "list", "--account", "acme", "--json")
    entries = json.loads(out)["entries"]
    assert [(e["number"], e["operator"]) for e in entries] == [("13800138000", "alice"),
                                                               ("13900139000", "bob")]
    code, out, _ = cli("account", "status", "acme")
    assert out.startswith("acme: suspended: 2 complaints within 30 days")
    code, out, _ = cli("complaint", "list", "--account", "acme", "--from", "2026-11-24",
                       "--to", "2026-11-24")
    assert code == 0 and "12321-1" in out and "12321-2" not in out  # 12321-2 is today
    code, out, _ = cli("complaint", "show", "12321-1", "--json")
    assert json.loads(out)["note"] == "rude"


def test_withdraw_reverses_the_fine(cli: Any) -> None:
    cli("ledger", "topup", "acme", "1500", "--ref", "p1")
    cli("complaint", "add", "--account", "acme", "--callee", "13800138000", "--ticket", "T")
    code, out, _ = cli("--operator", "fin", "complaint", "withdraw", "T", "--note", "error")
    assert code == 0 and "1000.00 CNY credited back to acme" in out
    assert "already withdrawn" in cli("complaint", "withdraw", "T")[1]
    assert ledger_do(cli.url, lambda lg: lg.balance("acme")).posted == D("1500")
    code, out, _ = cli("complaint", "show", "T")
    assert "withdrawn" in out and "by fin: error" in out


@pytest.mark.parametrize("argv", [
    ("complaint", "add", "--account", "ghost", "--callee", "138", "--ticket", "T"),
    ("complaint", "add", "--account", "acme", "--callee", "12ab", "--ticket", "T"),
    ("complaint", "add", "--account", "acme", "--callee", "138", "--ticket", " "),
    ("complaint", "add", "--account", "acme", "--callee", "138", "--ticket", "T",
     "--at", "yesterday"),
    ("complaint", "add", "--account", "acme", "--callee", "138", "--ticket", "T"),  # no topup
    ("complaint", "withdraw", "nope"),
    ("complaint", "show", "nope"),
    ("dnc", "add", "138"),  # neither --account nor --all
    ("dnc", "add", "138", "--account", "acme"),  # no --reason
    ("dnc", "add", "13x", "--account", "acme", "--reason", "r"),
    ("dnc", "add", "138", "--account", "ghost", "--reason", "r"),
    ("account", "suspend", "acme", "--reason", ""),
    ("account", "suspend", "ghost", "--reason", "r"),
    ("--operator", " ", "account", "suspend", "acme", "--reason", "r"),
    ("complaint", "add", "--account", "acme", "--callee", "138", "--ticket", "T" * 200),
    ("complaint", "add", "--account", "acme", "--callee", "138", "--ticket", "T\x1b[2J"),
    ("dnc", "add", "138", "--account", "acme", "--reason", "r" * 1001),
    ("account", "suspend", "acme", "--reason", "r" * 1001),
    # numbers are ASCII digits, and a number has digits ('+' was stored as '00')
    ("dnc", "add", "¹²³", "--account", "acme", "--reason", "r"),
    ("dnc", "add", "١٣٨٠٠١٣٨٠٠٠", "--all", "--reason", "r"),
    ("dnc", "add", "+", "--all", "--reason", "r"),
    ("dnc", "add", "00", "--account", "acme", "--reason", "r"),
    ("complaint", "add", "--account", "acme", "--callee", "１３８００１３８０００",
     "--ticket", "T"),
    # free text is one line
    ("dnc", "add", "138", "--account", "acme", "--reason", "two\nlines"),
    ("account", "suspend", "acme", "--reason", "a\x1b[2Jb"),
])
def test_refusals_are_one_line_exit_2_nothing_written(cli: Any, argv: tuple[str, ...]) -> None:
    code, out, err = cli(*argv)
    assert code == 2 and out == "" and err.count("\n") == 1, (out, err)
    assert err.startswith("callgate: error: ")
    assert ledger_do(cli.url, lambda lg: lg.dnc_list()) == []
    assert ledger_do(cli.url, lambda lg: lg.complaints()) == []
    assert ledger_do(cli.url, lambda lg: lg.suspension("acme")) is None


def test_dnc_add_remove_list_for_an_account_and_for_everyone(cli: Any) -> None:
    code, out, _ = cli("dnc", "add", "+8613800138000", "--account", "acme", "--reason", "asked")
    assert code == 0 and "13800138000 is on the do-not-call list of acme" in out
    assert "already" in cli("dnc", "add", "13800138000", "--account", "acme", "--reason",
                            "x")[1]
    cli("--operator", "reg", "dnc", "add", "0086 13900139000".replace(" ", ""), "--all",
        "--reason", "regulator")
    code, out, _ = cli("dnc", "list")
    lines = out.splitlines()
    assert lines[0].split() == ["FOR", "NUMBER", "ADDED", "(UTC)", "OPERATOR", "REASON"]
    assert any("everyone" in line and "13900139000" in line and "reg" in line
               for line in lines)
    assert json.loads(cli("dnc", "list", "--all", "--json")[1])["entries"][0]["account"] \
        is None
    code, out, _ = cli("dnc", "remove", "13800138000", "--account", "acme")
    assert code == 0 and "removed" in out
    assert "was not on" in cli("dnc", "remove", "13800138000", "--account", "acme")[1]
    changes = ledger_do(cli.url, lambda lg: lg.dnc_changes(0))
    assert [(c.number, c.added) for c in changes] == [
        ("13800138000", True), ("13900139000", True), ("13800138000", False)]


def test_account_suspend_resume_with_the_operator(cli: Any) -> None:
    assert cli("account", "suspend", "acme", "--reason", "audit")[0] == 0
    assert "already suspended" in cli("account", "suspend", "acme", "--reason", "x")[1]
    code, out, _ = cli("--operator", "fin", "account", "resume", "acme", "--note", "ok")
    assert code == 0 and out == "acme resumed\n"
    assert "was not suspended" in cli("account", "resume", "acme")[1]
    status = json.loads(cli("account", "status", "acme", "--json")[1])
    assert not status["suspended"]
    assert [(h["action"], h["operator"]) for h in status["history"]] == [
        ("suspend", "alice"), ("resume", "fin")]


def test_policy_explain_shows_the_live_dnc_and_the_suspension(cli: Any) -> None:
    cli("ledger", "topup", "acme", "100", "--ref", "p1")
    cli("dnc", "add", "13800138000", "--account", "acme", "--reason", "asked")
    code, out, _ = cli("policy", "explain", "--account", "acme", "--to", "13800138000",
                       "--at", "2026-11-24T10:00", "--json")
    result = json.loads(out)
    assert result["reason"] == "do_not_call"
    assert result["checks"][-1]["rule"] == "live_do_not_call"
    cli("account", "suspend", "acme", "--reason", "audit")
    code, out, _ = cli("policy", "explain", "--account", "acme", "--to", "13900139000",
                       "--at", "2026-11-24T10:00")
    assert code == 0
    assert out.startswith("DENY  reason=suspended  account acme is suspended (audit)")


@pytest.mark.usefixtures("mosquitto")
async def test_complaint_add_publishes_a_complaint_event(cli: Any, tmp_path: Path) -> None:
    prefix = f"callgate-test-{uuid.uuid4().hex[:12]}"
    config = tmp_path / "agent.yaml"
    config.write_text(f"node: ops-shell\npbx: {{kind: asterisk}}\n"
                      f"mqtt: {{url: 'mqtt://127.0.0.1:1883', topic_prefix: {prefix}}}\n")
    async with subscribed(prefix) as subscriber:
        def record() -> tuple[int, str, str]:
            cli("ledger", "topup", "acme", "1000", "--ref", "p1")
            return cli("complaint", "add", "--account", "acme", "--callee", "13800138000",
                       "--ticket", "T-mqtt", config=config)

        import asyncio

        code, _, err = await asyncio.to_thread(record)
        assert (code, err) == (0, "")
        (message,) = await subscriber.wait_for(1)
    assert str(message.topic) == f"{prefix}/ops-shell/complaint"
    payload = json.loads(bytes(message.payload))  # type: ignore[arg-type]
    assert (payload["action"], payload["ticket"], payload["fine"], payload["callee"]) == (
        "added", "T-mqtt", "1000.0000", "13800138000")


def test_a_note_with_a_newline_is_refused_and_nothing_written(cli: Any) -> None:
    cli("ledger", "topup", "acme", "3000", "--ref", "p1")
    code, out, err = cli("complaint", "add", "--account", "acme", "--callee", "13800138000",
                         "--ticket", "T", "--note", "line one\nline two")
    assert (code, out) == (2, "") and err.count("\n") == 1 and "one line" in err
    assert ledger_do(cli.url, lambda lg: lg.complaints()) == []
    cli("complaint", "add", "--account", "acme", "--callee", "13800138000", "--ticket", "T")
    code, out, err = cli("complaint", "withdraw", "T", "--note", "a\rb")
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert not ledger_do(cli.url, lambda lg: lg.complaint("T")).withdrawn


def test_a_closed_account_takes_no_complaint_and_no_withdrawal(cli: Any) -> None:
    cli("ledger", "topup", "acme", "3000", "--ref", "p1")
    cli("complaint", "add", "--account", "acme", "--callee", "13800138000", "--ticket", "T1")
    assert cli("ledger", "refund", "acme", "--ref", "r1")[0] == 0
    for argv in (("complaint", "add", "--account", "acme", "--callee", "13900139000",
                  "--ticket", "T2"),
                 ("complaint", "withdraw", "T1")):
        code, out, err = cli(*argv)
        assert (code, out) == (2, "") and err.count("\n") == 1 and "closed" in err, err
    assert [c.ticket for c in ledger_do(cli.url, lambda lg: lg.complaints())] == ["T1"]
    assert not ledger_do(cli.url, lambda lg: lg.complaint("T1")).withdrawn


def test_the_same_command_again_without_at_is_a_replay(cli: Any) -> None:
    cli("ledger", "topup", "acme", "3000", "--ref", "p1")
    argv = ("complaint", "add", "--account", "acme", "--callee", "13800138000",
            "--ticket", "12321-7", "--note", "rude")
    assert cli(*argv)[0] == 0
    code, out, err = cli(*argv, "--json")
    assert (code, err) == (0, "") and json.loads(out)["created"] is False
    assert ledger_do(cli.url, lambda lg: lg.balance("acme")).posted == D("2000")


def test_show_and_withdraw_strip_the_ticket_as_add_does(cli: Any) -> None:
    cli("ledger", "topup", "acme", "3000", "--ref", "p1")
    cli("complaint", "add", "--account", "acme", "--callee", "13800138000",
        "--ticket", " 12321-8 ")
    code, out, _ = cli("complaint", "show", "12321-8 ", "--json")
    assert code == 0 and json.loads(out)["ticket"] == "12321-8"
    code, out, _ = cli("complaint", "withdraw", " 12321-8")
    assert code == 0 and "withdrawn" in out
    code, _, err = cli("complaint", "show", "  ")
    assert code == 2 and err.count("\n") == 1


def test_list_times_name_their_zone(cli: Any) -> None:
    cli("ledger", "topup", "acme", "3000", "--ref", "p1")
    cli("complaint", "add", "--account", "acme", "--callee", "13800138000", "--ticket", "T",
        "--at", "2026-11-24T10:00")
    out = cli("complaint", "list", "--account", "acme")[1]
    assert "AT (Asia/Shanghai)" in out.splitlines()[0] and "2026-11-24 10:00:00" in out
    out = cli("complaint", "list")[1]
    assert "AT (UTC)" in out.splitlines()[0] and "2026-11-24 02:00:00" in out
    assert "ADDED (Asia/Shanghai)" in cli("dnc", "list", "--account", "acme")[1]
    assert "ADDED (UTC)" in cli("dnc", "list")[1]


@pytest.mark.usefixtures("mosquitto")
async def test_json_output_is_only_json_when_an_event_is_published(
        cli: Any, tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("node: ops-shell\npbx: {kind: asterisk}\n"
                      f"mqtt: {{url: 'mqtt://127.0.0.1:1883', topic_prefix: "
                      f"callgate-test-{uuid.uuid4().hex[:12]}}}\n")

    def record() -> list[tuple[int, str, str]]:
        cli("ledger", "topup", "acme", "1000", "--ref", "p1")
        return [cli("complaint", "add", "--account", "acme", "--callee", "13800138000",
                    "--ticket", "T-json", "--json", config=config),
                cli("complaint", "withdraw", "T-json", "--json", config=config),
                cli("account", "suspend", "acme", "--reason", "r", "--json", config=config),
                cli("account", "resume", "acme", "--json", config=config)]

    import asyncio

    for code, out, err in await asyncio.to_thread(record):
        assert (code, err) == (0, "")
        assert out.count("\n") == 1 and isinstance(json.loads(out), dict), out
