"""Finance reaches every account the ledger has, whatever the policy says; the account
lifecycle (open -> closed by a refund -> reopened); the operator on every posting; and the
small consistencies of the CLI (signs, zones, --version, exit codes)."""

from __future__ import annotations

import csv
import io
import json
import textwrap
import tomllib
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.ledger import CallRecord
from tests.test_cli_ledger import ledger_do

ROOT = Path(__file__).resolve().parent.parent
POLICY = """\
version: 1
prepaid: {first_topup_minimum: 100}
accounts:
  acme: {name: ACME, caller_ids: ["02158880000"], timezone: Asia/Shanghai}
  beta: {name: Beta, caller_ids: ["02158880001"], timezone: Asia/Shanghai}
"""


class Cli:
    def __init__(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.policy = tmp_path / "policy.yaml"
        self.policy.write_text(textwrap.dedent(POLICY))
        self.url = f"sqlite://{tmp_path}/ledger.db"
        self.capsys = capsys

    def __call__(self, *argv: str, operator: str | None = "clerk") -> tuple[int, str, str]:
        who = ["--operator", operator] if operator is not None else []
        code = main(["--policy", str(self.policy), "--ledger", self.url, *who, *argv])
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *argv: str, **kw: Any) -> str:
        code, out, err = self(*argv, **kw)
        assert (code, err) == (0, ""), err
        return out

    def refused(self, fragment: str, *argv: str, **kw: Any) -> str:
        code, out, err = self(*argv, **kw)
        assert (code, out) == (2, ""), (out, err)
        assert err.count("\n") == 1 and fragment in err, err
        return err

    def postings(self, account: str) -> list[dict[str, Any]]:
        return list(json.loads(self.ok("ledger", "history", account, "--json"))["postings"])


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Cli:
    for name in ("CALLGATE_CONFIG", "CALLGATE_POLICY", "CALLGATE_LEDGER", "SUDO_USER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("agent.cli.common.DEFAULT_CONFIG", tmp_path / "absent.yaml")
    c = Cli(tmp_path, capsys)
    c.ok("ledger", "init")
    return c


# -- defect 4: accounts that left the policy; an invalid policy -------------------------------
def test_finance_reaches_an_account_removed_from_the_policy(cli: Cli) -> None:
    cli.ok("ledger", "topup", "beta", "100", "--ref", "B1")
    cli.policy.write_text(textwrap.dedent(POLICY).split("  beta:")[0])  # beta leaves
    assert "beta" in cli.ok("ledger", "balance", "beta")
    history = cli.ok("ledger", "history", "beta")
    assert "times in UTC" in history and "topup" in history
    assert "times in Asia/Shanghai" in cli.ok("ledger", "history", "beta", "--tz",
                                              "Asia/Shanghai")
    assert "Statement for beta" in cli.ok("ledger", "statement", "beta")
    cli.ok("ledger", "penalty", "beta", "0.26", "--ref", "P1")
    cli.ok("ledger", "topup", "beta", "1", "--ref", "B2")  # no minimum: it exists
    out = cli.ok("ledger", "refund", "beta", "--ref", "R1")
    assert "refunded -100.74 CNY" in out and "(closed)" in out
    # A name neither the ledger nor the policy knows is still a typo.
    cli.refused("unknown account 'betta': not in the ledger", "ledger", "topup", "betta",
                "100", "--ref", "B9")


def test_an_invalid_policy_does_not_block_finance(cli: Cli) -> None:
    cli.ok("ledger", "topup", "acme", "100", "--ref", "B1")
    cli.policy.write_text("version: 1\naccounts: [this is not a mapping\n")
    cli.ok("ledger", "topup", "acme", "5", "--ref", "B2")
    cli.ok("ledger", "penalty", "acme", "1", "--ref", "P1")
    cli.ok("ledger", "adjust", "acme", "-1", "--ref", "A1", "--reason", "r")
    cli.ok("ledger", "history", "acme")
    cli.ok("ledger", "statement", "acme", "--json")
    cli.ok("ledger", "balance")
    cli.ok("ledger", "refund", "acme", "--ref", "R1")
    # Only a new account's first top-up needs the policy.
    err = cli.refused("policy", "ledger", "topup", "beta", "100", "--ref", "B3")
    assert "invalid" in err


# -- defect 4: the lifecycle -----------------------------------------------------------------
def test_a_closed_account_takes_nothing_until_reopened(cli: Cli) -> None:
    cli.ok("ledger", "topup", "acme", "100", "--ref", "B1")
    cli.ok("ledger", "refund", "acme", "--ref", "R1")
    before = cli.postings("acme")
    for command in (["penalty", "acme", "5", "--ref", "P1"],
                    ["adjust", "acme", "5", "--ref", "A1", "--reason", "r"],
                    ["topup", "acme", "5", "--ref", "B2"],
                    ["refund", "acme", "--ref", "R2"]):
        cli.refused("is closed (refunded)", "ledger", *command)
        cli.refused("callgate ledger reopen", "ledger", *command)
    assert cli.postings("acme") == before
    # A replay of the refund that closed it is still answered, not refused.
    assert "already recorded" in cli.ok("ledger", "refund", "acme", "--ref", "R1")
    out = cli.ok("ledger", "reopen", "acme", "--ref", "O1", "--note", "customer returned")
    assert "acme: reopened (ref O1, by clerk)" in out and "(closed)" not in out
    assert "already recorded" in cli.ok("ledger", "reopen", "acme", "--ref", "O1",
                                        "--note", "customer returned")
    cli.refused("nothing to reopen", "ledger", "reopen", "acme", "--ref", "O2")
    cli.ok("ledger", "topup", "acme", "5", "--ref", "B2")
    assert json.loads(cli.ok("ledger", "balance", "acme", "--json"))["posted"] == "5.0000"
    kinds = [p["kind"] for p in cli.postings("acme")]
    assert kinds == ["topup", "refund", "reopen", "topup"]
    ledger_do(cli.url, _audit_clean)


async def _audit_clean(lg: Any) -> None:
    assert await lg.audit() == []


# -- defect 4: the operator -------------------------------------------------------------------
def test_every_posting_records_its_operator(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    cli.ok("ledger", "topup", "acme", "100", "--ref", "B1", operator="alice")
    monkeypatch.setenv("LOGNAME", "bob")
    monkeypatch.setenv("USER", "bob")
    cli.ok("ledger", "penalty", "acme", "5", "--ref", "P1", operator=None)
    monkeypatch.setenv("SUDO_USER", "carol")  # sudo -u callgate callgate …: the person
    cli.ok("ledger", "adjust", "acme", "1", "--ref", "A1", "--reason", "r", operator=None)
    assert [p["operator"] for p in cli.postings("acme")] == ["alice", "bob", "carol"]
    text = cli.ok("ledger", "history", "acme")
    assert "OPERATOR" in text and "alice" in text and "carol" in text
    rows = list(csv.DictReader(io.StringIO(cli.ok("ledger", "statement", "acme", "--csv"))))
    assert [r["operator"] for r in rows if r["type"] != "opening" and r["type"] != "closing"
            ] == ["alice", "bob", "carol"]
    cli.refused("--operator", "ledger", "topup", "acme", "1", "--ref", "B2", operator=" ")
    cli.refused("--operator", "ledger", "topup", "acme", "1", "--ref", "B2", operator="x" * 65)


# -- defect 7: small consistencies ------------------------------------------------------------
def test_penalties_and_refunds_carry_the_same_sign_everywhere(cli: Cli) -> None:
    cli.ok("ledger", "topup", "acme", "100", "--ref", "B1")
    cli.ok("ledger", "penalty", "acme", "5", "--ref", "P1")
    cli.ok("ledger", "refund", "acme", "--ref", "R1")
    signs = {p["kind"]: p["amount"] for p in cli.postings("acme")}
    assert signs == {"topup": "100.0000", "penalty": "-5.0000", "refund": "-95.0000"}
    statement = json.loads(cli.ok("ledger", "statement", "acme", "--json"))
    assert {p["kind"]: p["amount"] for p in statement["postings"]} == signs
    assert statement["totals"]["penalty"] == "-5.0000"
    rows = list(csv.DictReader(io.StringIO(cli.ok("ledger", "statement", "acme", "--csv"))))
    assert {r["type"]: D(r["amount"]) for r in rows if r["type"] in signs} == {
        k: D(v) for k, v in signs.items()}
    text = cli.ok("ledger", "history", "acme")
    assert "-5.00" in text and "-95.00" in text
    lines = cli.ok("ledger", "statement", "acme").splitlines()
    assert any(line.startswith("penalties") and line.endswith("-5.00") for line in lines)


def test_adjust_zero_says_what_a_signed_amount_needs(cli: Cli) -> None:
    cli.ok("ledger", "topup", "acme", "100", "--ref", "B1")
    err = cli.refused("must not be zero", "ledger", "adjust", "acme", "0", "--ref", "A1",
                      "--reason", "r")
    assert "greater than zero" not in err


def test_statement_without_dates_covers_the_account_to_today(cli: Cli) -> None:
    cli.ok("ledger", "topup", "acme", "100", "--ref", "B1")
    out = cli.ok("ledger", "statement", "acme")
    today = datetime.now(UTC).astimezone().date()
    assert "Statement for acme" in out and "closing balance" in out
    assert str(today.year) in out.splitlines()[0]


def test_the_demo_prints_the_commands_it_runs() -> None:
    from agent.demo import _shown

    base = ["--ledger", "sqlite:///tmp/x/ledger.db", "--policy", "/tmp/x/policy.yaml"]
    assert _shown(base, "ledger", "statement", "acme") == (
        "callgate --ledger sqlite:///tmp/x/ledger.db --policy /tmp/x/policy.yaml "
        "ledger statement acme")
    source = (ROOT / "agent" / "demo.py").read_text()
    assert '_say(f"callgate ledger statement' not in source


def test_calls_shows_times_in_the_accounts_zone(cli: Cli) -> None:
    cli.ok("ledger", "topup", "acme", "100", "--ref", "B1")
    answered = datetime(2026, 11, 20, 1, 30, tzinfo=UTC)  # 09:30 in Shanghai
    record = CallRecord("c1", "acme", "pbx-1", "02158880000", "13800138000", "standard",
                        D("0.13"), 60, 60, answered)

    async def seed(lg: Any) -> None:
        await lg.admit_call(record, None)
        await lg.answer_call("c1", answered)

    ledger_do(cli.url, seed)
    out = cli.ok("calls")
    assert "09:30:00 CST" in out


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from agent import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"callgate {__version__}\n"


def test_policy_check_on_a_bad_agent_config_exits_1(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CALLGATE_POLICY", raising=False)
    config = tmp_path / "agent.yaml"
    config.write_text("node: pbx-1\npbx: {kind: asterisk}\nbogus: 1\n")
    assert main(["-c", str(config), "policy", "check"]) == 1
    err = capsys.readouterr().err
    assert "bogus" in err and "Traceback" not in err


def test_the_license_is_an_spdx_string_not_a_table() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert isinstance(project["license"], str)


def test_every_agent_config_key_is_documented() -> None:
    from agent.config import AgentSpec

    readme = (ROOT / "README.md").read_text()
    missing = [key for key in AgentSpec.model_fields if f"`{key}" not in readme]
    assert missing == []


def test_huge_or_strange_text_is_refused_short_and_writes_nothing(cli: Cli) -> None:
    cli.ok("ledger", "topup", "acme", "100", "--ref", "B1")
    before = cli.postings("acme")
    for argv in (["topup", "acme", "1", "--ref", "R" * 10_000],
                 ["topup", "acme", "1", "--ref", "tab\there"],
                 ["topup", "a" * 10_000, "1", "--ref", "B2"],
                 ["penalty", "acme", "1", "--ref", "P1", "--reason", "n" * 5000]):
        err = cli.refused("", "ledger", *argv)
        assert len(err) < 300, err
    assert cli.postings("acme") == before
