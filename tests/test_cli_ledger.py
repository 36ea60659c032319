"""``callgate ledger …`` via ``agent.cli.main``: output, exit codes, nothing written on refusal."""

from __future__ import annotations

import csv
import io
import itertools
import json
import textwrap
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from agent import eventloop
from agent.cli import main
from agent.ledger import CallRecord, Cdr, open_ledger

SHANGHAI = ZoneInfo("Asia/Shanghai")
POLICY = """\
version: 1
prepaid:
  first_topup_minimum: 100
accounts:
  acme:
    name: ACME
    caller_ids: ["02158880000"]
  beta:
    name: Beta
    caller_ids: ["02158880001"]
"""


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    for name in ("CALLGATE_CONFIG", "CALLGATE_POLICY", "CALLGATE_LEDGER"):
        monkeypatch.delenv(name, raising=False)
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent(POLICY))
    url = f"sqlite://{tmp_path}/ledger.db"

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["--policy", str(policy), "--ledger", url, "--operator", "clerk", *argv])
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


def postings(cli: Any, account: str = "acme") -> list[dict[str, Any]]:
    code, out, _ = cli("ledger", "history", account, "--json")
    return json.loads(out)["postings"] if code == 0 else []


def local(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=SHANGHAI).astimezone(UTC)


def refused(result: tuple[int, str, str], fragment: str) -> None:
    code, out, err = result
    assert code == 2, (out, err)
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("callgate: error: "), err
    assert fragment in err, err


# -- top-ups ---------------------------------------------------------------------------------
def test_topup_and_balance(cli: Any) -> None:
    code, out, err = cli("ledger", "topup", "acme", "100", "--ref", "BANK-1", "--note", "wire")
    assert (code, err) == (0, "")
    assert "acme: topped up 100.00 CNY (ref BANK-1, by clerk)" in out
    code, out, _ = cli("ledger", "balance", "acme", "--json")
    assert json.loads(out) == {"account": "acme", "name": "ACME", "posted": "100.0000",
                               "held": "0.0000", "available": "100.0000", "closed": False}
    code, out, _ = cli("ledger", "balance")
    assert out.splitlines() == [
        "ACCOUNT  NAME  BALANCE  HELD  AVAILABLE  STATUS",
        "acme     ACME   100.00  0.00     100.00  open",
    ]


def test_the_first_topup_must_meet_the_policy_minimum(cli: Any) -> None:
    refused(cli("ledger", "topup", "acme", "99.99", "--ref", "B1"), "at least 100.00")
    refused(cli("ledger", "balance", "acme"), "no account 'acme'")
    assert cli("ledger", "topup", "acme", "100", "--ref", "B1")[0] == 0
    assert cli("ledger", "topup", "acme", "0.01", "--ref", "B2")[0] == 0


@pytest.mark.parametrize(
    ("amount", "fragment"),
    [("-5", "must not be negative"), ("0", "greater than zero"), ("abc", "not a number"),
     ("1.00001", "more decimal places"), ("nan", "not a number"), ("", "not a number")],
)
def test_bad_amounts_exit_2_and_write_nothing(cli: Any, amount: str, fragment: str) -> None:
    assert cli("ledger", "topup", "acme", "100", "--ref", "B1")[0] == 0
    refused(cli("ledger", "topup", "acme", amount, "--ref", "B2"), fragment)
    refused(cli("ledger", "penalty", "acme", amount, "--ref", "P1"), fragment)
    assert len(postings(cli)) == 1


def test_unknown_accounts_are_refused(cli: Any) -> None:
    refused(cli("ledger", "topup", "ghost", "100", "--ref", "B1"),
            "unknown account 'ghost': not in the ledger, and the policy has: acme, beta")
    refused(cli("ledger", "history", "ghost"), "no account 'ghost'")
    refused(cli("ledger", "penalty", "beta", "5", "--ref", "P1"), "no account 'beta'")


def test_a_reused_reference(cli: Any) -> None:
    assert cli("ledger", "topup", "acme", "100", "--ref", "B1")[0] == 0
    code, out, _ = cli("ledger", "topup", "acme", "100", "--ref", "B1")
    assert code == 0 and "already recorded, nothing new written" in out
    code, out, _ = cli("ledger", "topup", "acme", "100", "--ref", "B1", "--json")
    assert json.loads(out)["replayed"] is True
    refused(cli("ledger", "topup", "acme", "200", "--ref", "B1"), "'B1' was already used")
    refused(cli("ledger", "topup", "acme", "200", "--ref", " "), "--ref must not be blank")
    assert [p["amount"] for p in postings(cli)] == ["100.0000"]


# -- penalties, adjustments, refunds -------------------------------------------------------------
def test_penalty_adjust_and_refund(cli: Any) -> None:
    assert cli("ledger", "topup", "acme", "1200", "--ref", "B1")[0] == 0
    code, out, _ = cli("ledger", "penalty", "acme", "1000", "--ref", "12321-7",
                       "--reason", "complaint 12321-7", "--json")
    assert code == 0
    posted = json.loads(out)
    assert (posted["kind"], posted["amount"], posted["note"]) == (
        "penalty", "-1000.0000", "complaint 12321-7")
    assert posted["operator"] == "clerk"
    assert posted["balance"]["available"] == "200.0000"
    assert cli("ledger", "adjust", "acme", "-0.5", "--ref", "A1", "--reason", "typo")[0] == 0
    refused(cli("ledger", "adjust", "acme", "1", "--ref", "A2"), "--reason")
    code, out, _ = cli("ledger", "refund", "acme", "--ref", "PAYOUT-1")
    assert code == 0 and "refunded -199.50 CNY" in out and "(closed)" in out
    refused(cli("ledger", "topup", "acme", "100", "--ref", "B2"), "closed")
    code, out, _ = cli("ledger", "balance")
    assert "closed" in out


def test_a_negative_balance_cannot_be_refunded(cli: Any) -> None:
    assert cli("ledger", "topup", "acme", "100", "--ref", "B1")[0] == 0
    assert cli("ledger", "penalty", "acme", "1000", "--ref", "P1")[0] == 0
    refused(cli("ledger", "refund", "acme", "--ref", "R1"), "negative balance (-900.00)")


def test_refund_waits_for_calls_in_progress(cli: Any) -> None:
    assert cli("ledger", "topup", "acme", "100", "--ref", "B1")[0] == 0
    at = local("2026-11-20T10:00:00")
    record = CallRecord("c1", "acme", "pbx-1", "02158880000", "13800138000", "standard",
                        D("0.13"), 60, 60, at)
    ledger_do(cli.url, lambda lg: lg.admit_call(record, None))
    refused(cli("ledger", "refund", "acme", "--ref", "R1"), "1 call(s) in progress")
    assert len(postings(cli)) == 1
    ledger_do(cli.url, lambda lg: lg.settle_call(
        Cdr("c1", "acme", "02158880000", "13800138000", None, at, 0, 0, D(0), "NO_ANSWER")))
    assert cli("ledger", "refund", "acme", "--ref", "R1")[0] == 0


# -- reading ------------------------------------------------------------------------------------
def test_history_since_a_local_day(cli: Any) -> None:
    async def seed(lg: Any) -> None:
        await lg.topup("acme", D("100"), ref="B1", at=local("2026-11-01T23:59:59"))
        await lg.topup("acme", D("5"), ref="B2", at=local("2026-11-02T00:00:00"))

    ledger_do(cli.url, seed)
    code, out, _ = cli("ledger", "history", "acme", "--since", "2026-11-02")
    assert code == 0
    assert out.splitlines()[1:] == [
        "TIME                 KIND   AMOUNT  REF  OPERATOR  NOTE",
        "2026-11-02 00:00:00  topup    5.00  B2   -",
    ]
    refused(cli("ledger", "history", "acme", "--since", "yesterday"), "neither a date")


def test_no_policy_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("CALLGATE_CONFIG", "CALLGATE_POLICY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("agent.cli.common.DEFAULT_CONFIG", tmp_path / "absent.yaml")
    url = f"sqlite://{tmp_path}/l.db"
    code = main(["--ledger", url, "ledger", "topup", "acme", "100", "--ref", "B1"])
    assert code == 2
    assert "no ledger at" in capsys.readouterr().err
    assert not (tmp_path / "l.db").exists()
    assert main(["--ledger", url, "ledger", "init"]) == 0
    capsys.readouterr()
    # A new account's first top-up needs the policy (its minimum, and a typo check).
    code = main(["--ledger", url, "ledger", "topup", "acme", "100", "--ref", "B1"])
    assert code == 2
    assert "no policy given" in capsys.readouterr().err
    assert ledger_do(url, lambda lg: lg.balances()) == []


def test_an_unusable_ledger_is_one_line(cli: Any, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--ledger", f"sqlite://{tmp_path}/missing/l.db", "ledger", "balance"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err


# -- statements ---------------------------------------------------------------------------------
def seed_month(url: str) -> None:
    """November in Shanghai: a top-up, three calls (one cut off), a fine, one call after."""

    async def seed(lg: Any) -> None:
        await lg.topup("acme", D("100"), ref="B0", at=local("2026-10-31T12:00:00"))
        await lg.topup("acme", D("50"), ref="B1", at=local("2026-11-03T09:00:00"))
        calls = [  # id, answered, ended, billsec, billed, amount, holds, cut off
            ("c1", "2026-11-01T00:00:10", "2026-11-01T00:01:10", 60, 60, "0.13", 1, False),
            ("c2", "2026-11-15T10:00:00", "2026-11-15T10:02:01", 121, 180, "0.39", 3, False),
            ("c3", "2026-11-30T23:58:00", "2026-11-30T23:59:59", 119, 120, "0.26", 2, True),
            ("c4", "2026-11-30T23:59:30", "2026-12-01T00:00:00", 30, 60, "0.13", 1, False),
        ]
        for call_id, answered, ended, billsec, billed, amount, holds, cut in calls:
            record = CallRecord(call_id, "acme", "pbx-1", "02158880000", "13800138000",
                                "standard", D("0.13"), 60, 60, local(answered))
            await lg.admit_call(record, None)
            await lg.answer_call(call_id, local(answered))
            for step in range(holds):
                assert await lg.hold(call_id, step, D("0.13"), 60 * (step + 1), local(answered))
            await lg.settle_call(Cdr(call_id, "acme", "02158880000", "13800138000",
                                     local(answered), local(ended), billsec, billed, D(amount),
                                     "NORMAL_CLEARING", cut_off=cut))
        await lg.penalty("acme", D("1000"), ref="12321-9", at=local("2026-11-20T08:00:00"),
                         note="complaint")

    ledger_do(url, seed)


def test_statement_text_adds_up(cli: Any) -> None:
    seed_month(cli.url)
    code, out, err = cli("ledger", "statement", "acme", "--from", "2026-11-01",
                         "--to", "2026-11-30")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == ("Statement for acme (ACME), 2026-11-01 to 2026-11-30 "
                        "(times in Asia/Shanghai, amounts in CNY)")
    assert "Calls: 3" in lines
    calls = lines[lines.index("Calls: 3") + 1:lines.index("Calls: 3") + 5]
    # BALANCE: the balance after the line, in time order with the other postings (the
    # top-up of 11-03 and the fine of 11-20 sit between these calls).
    assert calls == [
        "ANSWERED             CALLER       CALLEE       BILLSEC  BILLED  AMOUNT  BALANCE  CUT-OFF"
        "  FLAGS",
        "2026-11-01 00:00:10  02158880000  13800138000       60      60   -0.13    99.87",
        "2026-11-15 10:00:00  02158880000  13800138000      121     180   -0.39   149.48",
        "2026-11-30 23:58:00  02158880000  13800138000      119     120   -0.26  -850.78  cut off",
    ]
    others = lines[lines.index("Other postings: 2") + 1:lines.index("Other postings: 2") + 4]
    assert others[0].split()[1:5] == ["KIND", "AMOUNT", "BALANCE", "REF"]
    assert [line.split()[2:6] for line in others[1:]] == [
        ["topup", "50.00", "149.87", "B1"], ["penalty", "-1000.00", "-850.52", "12321-9"]]
    totals = lines[lines.index("TOTALS             AMOUNT"):]
    assert totals == [
        "TOTALS             AMOUNT",
        "opening balance    100.00",
        "top-ups             50.00",
        "calls               -0.78",
        "penalties        -1000.00",
        "refunds              0.00",
        "adjustments          0.00",
        "closing balance   -850.78",
    ]


def test_statement_csv_rows_sum_to_the_closing_balance(cli: Any) -> None:
    seed_month(cli.url)
    code, out, _ = cli("ledger", "statement", "acme", "--from", "2026-11-01",
                       "--to", "2026-11-30", "--csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["type"] for r in rows] == ["opening", "call", "topup", "call", "penalty", "call",
                                         "closing"]  # time order
    movements = sum(D(r["amount"]) for r in rows[:-1])
    assert movements == D(rows[-1]["amount"]) == D("-850.78")
    assert rows[5]["cut_off"] == "yes" and rows[1]["reference"] == "c1"
    # The running balance: each row's balance is the previous one plus its amount.
    for before, row in itertools.pairwise(rows[:-1]):
        assert D(row["balance"]) == D(before["balance"]) + D(row["amount"])
    assert [D(r["balance"]) for r in rows] == [D("100"), D("99.87"), D("149.87"), D("149.48"),
                                               D("-850.52"), D("-850.78"), D("-850.78")]


def test_statement_json_and_the_inclusive_last_day(cli: Any) -> None:
    seed_month(cli.url)
    code, out, _ = cli("ledger", "statement", "acme", "--from", "2026-12-01",
                       "--to", "2026-12-01", "--json")
    assert code == 0
    december = json.loads(out)
    assert [c["call_id"] for c in december["calls"]] == ["c4"]
    assert december["opening"] == "-850.7800"
    assert december["closing"] == "-850.9100"
    assert december["totals"]["calls"] == "-0.1300"
    assert december["calls"][0]["amount"] == "-0.1300"
    refused(cli("ledger", "statement", "acme", "--from", "2026-12-02", "--to", "2026-12-01"),
            "before --from")
    refused(cli("ledger", "statement", "acme", "--from", "12/01/2026", "--to", "2026-12-01"),
            "not a date")


def test_statement_other_postings_are_in_time_order(cli: Any) -> None:
    """A posting written after one it precedes (here a fine recorded late) is listed
    before it, in the text, the JSON and the CSV."""

    async def seed(lg: Any) -> None:
        await lg.topup("acme", D("100"), ref="B0", at=local("2026-11-01T09:00:00"))
        await lg.topup("acme", D("50"), ref="B1", at=local("2026-11-20T09:00:00"))
        await lg.penalty("acme", D("10"), ref="F1", at=local("2026-11-10T09:00:00"))
        await lg.adjust("acme", D("-1"), ref="A1", at=local("2026-11-05T09:00:00"), note="fee")

    ledger_do(cli.url, seed)
    period = ("--from", "2026-11-01", "--to", "2026-11-30")
    code, out, err = cli("ledger", "statement", "acme", *period)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    head = lines.index("Other postings: 4")
    assert [line.split()[2:6] for line in lines[head + 2:head + 6]] == [
        ["topup", "100.00", "100.00", "B0"], ["adjustment", "-1.00", "99.00", "A1"],
        ["penalty", "-10.00", "89.00", "F1"], ["topup", "50.00", "139.00", "B1"]]
    code, out, _ = cli("ledger", "statement", "acme", *period, "--json")
    assert [p["ref"] for p in json.loads(out)["postings"]] == ["B0", "A1", "F1", "B1"]
    code, out, _ = cli("ledger", "statement", "acme", *period, "--csv")
    assert [r["reference"] for r in csv.DictReader(io.StringIO(out))][1:-1] == [
        "B0", "A1", "F1", "B1"]


# -- careless input: blanks, typos, a note that breaks a listing -------------------------------
def test_blank_or_mistyped_names_are_refused_not_read_as_not_given(cli: Any) -> None:
    assert cli("ledger", "topup", "acme", "100", "--ref", "B1")[0] == 0
    refused(cli("ledger", "balance", ""), "no account ''")  # not every account's balance
    refused(cli("ledger", "balance", "", "--at", "2026-12-01"), "no account ''")
    refused(cli("calls", "--account", "acmee"), "no account 'acmee'")  # not "no live calls"
    for argv in (("ledger", "history", "acme"), ("ledger", "statement", "acme"),
                 ("ledger", "balance", "acme", "--at", "2026-12-01"),
                 ("ledger", "report", "--from", "2026-12-01", "--to", "2026-12-01"),
                 ("ledger", "flagged", "--from", "2026-12-01", "--to", "2026-12-01")):
        for blank in ("", " "):  # not silently the account's own zone
            code, out, err = cli(*argv, "--tz", blank)
            assert (code, out) == (2, "") and "--tz" in err and err.count("\n") == 1, (argv, err)


def test_a_note_must_be_one_printable_line_and_an_adjustment_needs_a_reason(cli: Any) -> None:
    assert cli("ledger", "topup", "acme", "100", "--ref", "B1")[0] == 0
    refused(cli("ledger", "topup", "acme", "5", "--ref", "B2", "--note", "paid\nin cash"),
            "must be one line of printable text")
    refused(cli("ledger", "penalty", "acme", "5", "--ref", "P1", "--reason", "a\x1b[2Jb"),
            "must be one line of printable text")
    for blank in ("", "  "):
        refused(cli("ledger", "adjust", "acme", "5", "--ref", "A1", "--reason", blank),
                "an adjustment needs a reason")
    assert [p["ref"] for p in postings(cli)] == ["B1"]  # nothing written
    assert cli("ledger", "topup", "acme", "5", "--ref", "B3", "--note", "电汇 7")[0] == 0


def test_a_statement_from_a_future_day_names_the_default_to(cli: Any) -> None:
    assert cli("ledger", "topup", "acme", "100", "--ref", "B1")[0] == 0
    refused(cli("ledger", "statement", "acme", "--from", "9998-01-01"),
            "--from 9998-01-01 is after today (")


def test_a_stored_multi_line_note_is_shown_on_one_line(cli: Any) -> None:
    """Written before notes were checked (or by another tool): escaped, not a broken table."""
    async def seed(lg: Any) -> None:
        await lg.topup("acme", D("100"), ref="B1", at=local("2026-11-01T09:00:00"),
                       note="paid\nin cash \x1b[2J")

    ledger_do(cli.url, seed)
    code, out, _ = cli("ledger", "history", "acme")
    assert code == 0 and len(out.splitlines()) == 3  # title, header, one posting
    assert out.splitlines()[2].endswith("paid\\nin cash \\x1b[2J") and "\x1b" not in out
    code, out, _ = cli("ledger", "statement", "acme", "--from", "2026-11-01", "--to", "2026-11-30")
    assert "paid\\nin cash" in out and "\x1b" not in out
