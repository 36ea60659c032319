"""Month-end: ``ledger report``, ``ledger flagged``, ``ledger balance --at`` on BOTH backends.

A ledger is built by a known sequence of top-ups, calls, a fine, an
adjustment and a refund over November 2026; every figure below is worked out
by hand from that sequence and checked to the cent.
"""

from __future__ import annotations

import csv
import io
import json
import re
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from agent import eventloop
from agent.cli import main
from agent.ledger import CallRecord, Cdr, open_ledger

POLICY = """\
version: 1
prepaid:
  first_topup_minimum: 100
accounts:
  acme:
    name: ACME Trading
    timezone: Asia/Shanghai
    caller_ids: ["02158880000"]
  beta:
    name: Beta & Sons
    timezone: UTC
    caller_ids: ["02158880001"]
"""
SHANGHAI = ZoneInfo("Asia/Shanghai")


def sh(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=SHANGHAI).astimezone(UTC)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


async def _call(lg: Any, account: str, call_id: str, answered: datetime | None, ended: datetime,
                billsec: int, billed: int, amount: str, holds: int, *, cut: bool = False,
                flags: tuple[str, ...] = ()) -> None:
    caller = "02158880000" if account == "acme" else "02158880001"
    start = answered or ended
    await lg.admit_call(CallRecord(call_id, account, "pbx-1", caller, "13800138000", "standard",
                                   D("0.13"), 60, 60, start), None)
    if answered is not None:
        await lg.answer_call(call_id, answered)
    for step in range(holds):
        assert await lg.hold(call_id, step, D("0.13"), 60 * (step + 1), start)
    await lg.settle_call(Cdr(call_id, account, caller, "13800138000", answered, ended, billsec,
                             billed, D(amount), "NORMAL_CLEARING", cut_off=cut, flags=flags))


async def seed(lg: Any) -> None:
    # acme, days in Shanghai. c1 ends 00:01 on 1 November there: 31 October in UTC.
    await lg.topup("acme", D("100"), ref="B0", at=sh("2026-10-31T12:00:00"))
    await _call(lg, "acme", "c1", sh("2026-11-01T00:00:10"), sh("2026-11-01T00:01:10"),
                60, 60, "0.13", 1)
    await lg.topup("acme", D("50"), ref="B1", at=sh("2026-11-03T09:00:00"))
    await _call(lg, "acme", "c2", sh("2026-11-15T10:00:00"), sh("2026-11-15T10:02:01"),
                121, 180, "0.39", 3, flags=("billsec_from_times",))
    await _call(lg, "acme", "c3", sh("2026-11-30T23:58:00"), sh("2026-11-30T23:59:59"),
                119, 120, "0.26", 2, cut=True, flags=("vanished",))
    await _call(lg, "acme", "c4", sh("2026-11-30T23:59:30"), sh("2026-12-01T00:00:00"),
                30, 60, "0.13", 1)
    # Written after the calls (a fine would leave nothing to hold), dated within the month:
    # the views order by time, not by when a row was written.
    await lg.penalty("acme", D("1000"), ref="12321-9", at=sh("2026-11-20T08:00:00"),
                     note="complaint")
    await lg.adjust("acme", D("-2.50"), ref="ADJ-1", at=sh("2026-11-25T12:00:00"),
                    note="duplicate top-up fee")
    # beta, days in UTC: a call forgiven its grace (no look needed), one of unknown outcome,
    # then the balance refunded and the account closed.
    await lg.topup("beta", D("200"), ref="BB0", at=utc("2026-11-10T09:00:00"))
    await _call(lg, "beta", "b1", utc("2026-11-11T09:00:00"), utc("2026-11-11T09:01:01"),
                61, 60, "0.13", 1, flags=("grace",))
    await _call(lg, "beta", "b2", None, utc("2026-11-12T09:00:00"), 0, 0, "0", 1,
                flags=("outcome_unknown",))
    await lg.refund("beta", ref="PAYOUT-1", at=utc("2026-11-28T09:00:00"), note="contract end")
    # delta: not in the policy (no name, UTC), no movement in November.
    await lg.topup("delta", D("10"), ref="DD0", at=utc("2026-10-01T00:00:00"))
    # gamma: opened after the period; not in November's report.
    await lg.topup("gamma", D("10"), ref="GG0", at=utc("2026-12-05T00:00:00"))


@pytest.fixture
def cli(tmp_path: Path, ledger_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Any:
    """``callgate`` against a seeded ledger (one run per backend) and the policy above."""
    for name in ("CALLGATE_CONFIG", "CALLGATE_POLICY", "CALLGATE_LEDGER"):
        monkeypatch.delenv(name, raising=False)
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent(POLICY))

    async def build() -> None:
        lg = await open_ledger(ledger_url)
        try:
            await seed(lg)
        finally:
            await lg.close()

    eventloop.run(build())

    def run(*argv: str, policy_path: Path = policy) -> tuple[int, str, str]:
        code = main(["--policy", str(policy_path), "--ledger", ledger_url, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    run.tmp = tmp_path  # type: ignore[attr-defined]
    return run


NOVEMBER = ("--from", "2026-11-01", "--to", "2026-11-30")


def refused(result: tuple[int, str, str], fragment: str) -> None:
    code, out, err = result
    assert code == 2 and out == "", (code, out, err)
    assert err.count("\n") == 1 and fragment in err, err


# -- ledger report ---------------------------------------------------------------------------
def test_report_json_per_account_and_totals_to_the_cent(cli: Any) -> None:
    code, out, err = cli("ledger", "report", *NOVEMBER, "--json")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert (doc["from"], doc["to"], doc["currency"]) == ("2026-11-01", "2026-11-30", "CNY")
    rows = {a["account"]: a for a in doc["accounts"]}
    assert list(rows) == ["acme", "beta", "delta"]  # gamma did not exist yet
    figures = ("opening", "topups", "calls", "billed_seconds", "calls_amount", "penalties",
               "refunds", "adjustments", "corrections", "closing")

    def row(name: str) -> tuple[Any, ...]:
        return tuple(rows[name][f] if isinstance(rows[name][f], int) else D(rows[name][f])
                     for f in figures)

    # Every amount signed by its effect on the balance: closing = opening + the columns.
    assert row("acme") == (D("100"), D("50"), 3, 360, D("-0.78"), D("-1000"), D("0"),
                           D("-2.50"), D("0"), D("-853.28"))
    assert row("beta") == (D("0"), D("200"), 2, 60, D("-0.13"), D("0"), D("-199.87"), D("0"),
                           D("0"), D("0"))
    assert row("delta") == (D("10"), D("0"), 0, 0, D("0"), D("0"), D("0"), D("0"), D("0"),
                            D("10"))
    assert (rows["acme"]["name"], rows["acme"]["timezone"]) == ("ACME Trading", "Asia/Shanghai")
    assert (rows["delta"]["name"], rows["delta"]["timezone"]) == (None, "UTC")
    # Shanghai's 1 November starts at 16:00 UTC on 31 October.
    assert rows["acme"]["start"] == "2026-10-31T16:00:00+00:00"
    t = {f: v if isinstance(v, int) else D(v) for f, v in doc["totals"].items()}
    assert t == {"opening": D("110"), "topups": D("250"), "calls": 5, "billed_seconds": 420,
                 "calls_amount": D("-0.91"), "penalties": D("-1000"), "refunds": D("-199.87"),
                 "adjustments": D("-2.50"), "corrections": D("0"), "closing": D("-843.28")}
    assert (t["opening"] + t["topups"] + t["calls_amount"] + t["penalties"] + t["refunds"]
            + t["adjustments"] + t["corrections"]) == t["closing"]


def test_report_text_shows_names_and_a_total_row(cli: Any) -> None:
    code, out, err = cli("ledger", "report", *NOVEMBER)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == ("Ledger report 2026-11-01 to 2026-11-30 "
                        "(days in Asia/Shanghai, UTC; amounts in CNY)")
    assert lines[1].split() == ["ACCOUNT", "NAME", "OPENING", "TOP-UPS", "CALLS", "BILLED", "S",
                                "CALL", "AMOUNT", "PENALTIES", "REFUNDS", "ADJUSTMENTS",
                                "CORRECTIONS", "CLOSING"]
    assert lines[2].split() == ["acme", "ACME", "Trading", "100.00", "50.00", "3", "360",
                                "-0.78", "-1000.00", "0.00", "-2.50", "0.00", "-853.28"]
    assert lines[3].split() == ["beta", "Beta", "&", "Sons", "0.00", "200.00", "2", "60",
                                "-0.13", "0.00", "-199.87", "0.00", "0.00", "0.00"]
    assert lines[4].split() == ["delta", "10.00", "0.00", "0", "0", "0.00", "0.00", "0.00",
                                "0.00", "0.00", "10.00"]
    assert lines[5].split() == ["TOTAL", "110.00", "250.00", "5", "420", "-0.91", "-1000.00",
                                "-199.87", "-2.50", "0.00", "-843.28"]
    assert lines[-1] == ("opening 110.00 + top-ups 250.00 + calls -0.91 + penalties -1000.00 + "
                         "refunds -199.87 + adjustments -2.50 + corrections 0.00 = closing "
                         "-843.28")


def test_report_csv_is_time_ordered_and_each_account_adds_up(cli: Any) -> None:
    code, out, err = cli("ledger", "report", *NOVEMBER, "--csv")
    assert (code, err) == (0, "")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["time", "account", "name", "currency", "type", "amount", "balance",
                             "reference", "caller", "callee", "billsec", "billed_seconds",
                             "flags", "note"]
    times = [datetime.fromisoformat(r["time"]) for r in rows]
    assert times == sorted(times)
    assert {r["currency"] for r in rows} == {"CNY"}
    by_account: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_account.setdefault(r["account"], []).append(r)
    assert [r["type"] for r in by_account["acme"]] == [
        "opening", "call", "topup", "call", "penalty", "adjustment", "call", "closing"]
    assert [r["reference"] for r in by_account["acme"][1:-1]] == [
        "c1", "B1", "c2", "12321-9", "ADJ-1", "c3"]
    assert [r["type"] for r in by_account["beta"]] == [
        "opening", "topup", "call", "call", "refund", "closing"]
    assert [r["type"] for r in by_account["delta"]] == ["opening", "closing"]
    for account, own in by_account.items():
        opening, closing = D(own[0]["balance"]), D(own[-1]["balance"])
        running = opening
        for r in own[1:-1]:
            running += D(r["amount"])
            assert D(r["balance"]) == running, (account, r)
        assert running == closing, account
    acme = by_account["acme"]
    assert D(acme[-1]["balance"]) == D("-853.28") and acme[0]["name"] == "ACME Trading"
    assert acme[1]["time"] == "2026-10-31T16:01:10Z"  # c1's end: Shanghai's 1 November
    assert (acme[4]["billsec"], acme[4]["flags"]) == ("", "")
    assert (acme[3]["billsec"], acme[3]["flags"]) == ("121", "billsec_from_times")
    assert acme[4]["note"] == "complaint"
    assert D(by_account["beta"][-2]["amount"]) == D("-199.87")


def test_report_without_a_loadable_policy_still_works_in_utc(cli: Any) -> None:
    broken = cli.tmp / "broken.yaml"
    broken.write_text("version: 1\naccounts: [\n")
    code, out, err = cli("ledger", "report", *NOVEMBER, "--json", policy_path=broken)
    assert code == 0
    assert err.count("\n") == 1 and err.startswith("note: no customer names") and "UTC" in err
    rows = {a["account"]: a for a in json.loads(out)["accounts"]}
    assert {a["name"] for a in rows.values()} == {None}
    # In UTC, c1 (ended 16:01 UTC on 31 October) belongs to October and c4 (ended 16:00 UTC
    # on 30 November) to November: c2, c3, c4.
    assert (D(rows["acme"]["opening"]), rows["acme"]["calls"]) == (D("99.87"), 3)
    assert D(rows["acme"]["closing"]) == D("-853.41")
    code, out, _ = cli("ledger", "report", *NOVEMBER, "--json", "--tz", "Asia/Shanghai",
                       policy_path=broken)
    assert D({a["account"]: a for a in json.loads(out)["accounts"]}["acme"]["closing"]) == \
        D("-853.28")


def test_report_refuses_bad_periods_and_zones(cli: Any) -> None:
    refused(cli("ledger", "report", "--from", "2026-12-01", "--to", "2026-11-30"),
            "before --from")
    refused(cli("ledger", "report", "--from", "1/11/2026", "--to", "2026-11-30"), "not a date")
    refused(cli("ledger", "report", *NOVEMBER, "--tz", "Mars/Olympus"), "not a timezone")
    refused(cli("ledger", "report", *NOVEMBER, "--csv", "--json"), "not allowed with")


def test_a_period_before_any_account_is_empty(cli: Any) -> None:
    code, out, _ = cli("ledger", "report", "--from", "2020-01-01", "--to", "2020-01-31")
    assert code == 0 and "no accounts in the ledger for this period" in out
    code, out, _ = cli("ledger", "report", "--from", "2020-01-01", "--to", "2020-01-31", "--json")
    assert json.loads(out)["totals"]["closing"] == "0.0000"


# -- ledger flagged --------------------------------------------------------------------------
def test_flagged_lists_the_calls_that_need_a_look(cli: Any) -> None:
    code, out, err = cli("ledger", "flagged", *NOVEMBER, "--json")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    # b1's "grace" is routine and is not listed; c4 ended in December.
    assert [(c["call_id"], c["flags"]) for c in doc["calls"]] == [
        ("b2", ["outcome_unknown"]), ("c2", ["billsec_from_times"]), ("c3", ["vanished"])]
    assert doc["count"] == 3 and doc["calls"][0]["name"] == "Beta & Sons"
    assert D(doc["calls"][2]["amount"]) == D("-0.26")  # signed by its effect
    code, out, _ = cli("ledger", "flagged", *NOVEMBER)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "Calls that need a look, 2026-11-01 to 2026-11-30: 3"
    assert "c3" in lines[4] and "acme (ACME Trading)" in lines[4] and "2026-11-30 23:59:59" in \
        lines[4]
    assert any(line.startswith("  vanished: ") for line in lines)
    code, out, _ = cli("ledger", "flagged", *NOVEMBER, "--account", "acme", "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["call_id"], r["flags"], r["amount"]) for r in rows] == [
        ("c2", "billsec_from_times", "-0.3900"), ("c3", "vanished", "-0.2600")]


# -- ledger balance --at ---------------------------------------------------------------------
def test_balance_at_a_day_is_that_days_closing_balance(cli: Any) -> None:
    code, out, err = cli("ledger", "balance", "acme", "--at", "2026-11-15", "--json")
    assert (code, err) == (0, "")
    b = json.loads(out)
    # 100 - 0.13 (c1) + 50 - 0.39 (c2): c2 ended at 10:02 on the 15th in Shanghai.
    assert (D(b["posted"]), D(b["held"]), D(b["available"])) == (D("149.48"), 0, D("149.48"))
    assert b["name"] == "ACME Trading" and b["at"] == "2026-11-15T15:59:59.999999+00:00"
    # The day's end equals the report's closing for a period ending that day.
    code, out, _ = cli("ledger", "balance", "acme", "--at", "2026-11-30", "--json")
    assert D(json.loads(out)["posted"]) == D("-853.28")
    # An ISO time: the balance after every posting at or before it.
    code, out, _ = cli("ledger", "balance", "acme", "--at", "2026-11-15T10:02:00+08:00", "--json")
    assert D(json.loads(out)["posted"]) == D("149.87")
    code, out, _ = cli("ledger", "balance", "--at", "2026-11-30")
    lines = out.splitlines()
    assert lines[0] == "Balances as of 2026-11-30 (amounts in CNY)"
    # c4 was talking at midnight: its hold of 0.13 was open then.
    assert lines[2].split()[:2] == ["acme", "ACME"] and lines[2].split()[-4:] == [
        "-853.28", "0.13", "-853.41", "open"]
    assert lines[3].split()[-4:] == ["0.00", "0.00", "0.00", "closed"]  # beta refunded
    assert [line.split()[0] for line in lines[2:]] == ["acme", "beta", "delta"]  # no gamma yet


def test_balance_at_refusals(cli: Any) -> None:
    refused(cli("ledger", "balance", "acme", "--at", "yesterday"), "neither a date")
    refused(cli("ledger", "balance", "nobody", "--at", "2026-11-30"), "nobody")


# -- the statement agrees with the report ----------------------------------------------------
def test_the_statement_and_the_report_agree_line_by_line(cli: Any) -> None:
    """acme's statement (with its running balance) and its rows of the report: same figures."""
    code, out, _ = cli("ledger", "statement", "acme", *NOVEMBER, "--json")
    assert code == 0
    statement = json.loads(out)
    assert statement["name"] == "ACME Trading"
    code, out, _ = cli("ledger", "report", *NOVEMBER, "--json")
    acme = next(a for a in json.loads(out)["accounts"] if a["account"] == "acme")
    assert (D(statement["opening"]), D(statement["closing"])) == (D(acme["opening"]),
                                                                   D(acme["closing"]))
    assert D(statement["totals"]["calls"]) == D(acme["calls_amount"])
    assert [c["balance"] for c in statement["calls"]] == ["99.8700", "149.4800", "-853.2800"]
    code, out, _ = cli("ledger", "statement", "acme", *NOVEMBER, "--csv")
    statement_rows = list(csv.DictReader(io.StringIO(out)))
    code, out, _ = cli("ledger", "report", *NOVEMBER, "--csv")
    report_rows = [r for r in csv.DictReader(io.StringIO(out)) if r["account"] == "acme"]
    assert [(r["type"], D(r["amount"] or 0), D(r["balance"])) for r in statement_rows[1:-1]] == [
        (r["type"], D(r["amount"]), D(r["balance"])) for r in report_rows[1:-1]]
    code, out, _ = cli("ledger", "balance", "--json")
    names = {b["account"]: b["name"] for b in json.loads(out)["accounts"]}
    assert names == {"acme": "ACME Trading", "beta": "Beta & Sons", "delta": None,
                     "gamma": None}


def test_flagged_refuses_an_account_the_ledger_does_not_have(cli: Any) -> None:
    refused(cli("ledger", "flagged", *NOVEMBER, "--account", "acmee"),
            "the ledger has no account 'acmee'")
    refused(cli("ledger", "flagged", *NOVEMBER, "--account", ""), "no account ''")
    code, out, _ = cli("ledger", "flagged", *NOVEMBER, "--account", "delta", "--json")
    assert code == 0 and json.loads(out)["count"] == 0  # known, nothing to look at


# -- one amount format in JSON and CSV -------------------------------------------------------
AMOUNT_KEYS = {"opening", "closing", "topups", "calls_amount", "penalties", "refunds",
               "adjustments", "corrections", "amount", "balance", "posted", "held",
               "available", "correction", "final_amount", "topup", "penalty", "refund",
               "adjustment", "calls"}
FIXED = re.compile(r"-?[0-9]+\.[0-9]{4}")


def _amounts(doc: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _amounts(v, k)
    elif isinstance(doc, list):
        for v in doc:
            yield from _amounts(v, key)
    elif key in AMOUNT_KEYS and not (key == "calls" and isinstance(doc, int)):
        yield key, doc


def test_every_json_and_csv_amount_is_the_ledgers_fixed_point_string(cli: Any) -> None:
    """Not "0" for a sum of nothing beside "0.0000" and "-0.13" read from the ledger."""
    seen: list[tuple[str, Any]] = []
    for argv in [("ledger", "report", *NOVEMBER), ("ledger", "report", "--from", "2020-01-01",
                                                   "--to", "2020-01-31"),
                 ("ledger", "flagged", *NOVEMBER), ("ledger", "balance"),
                 ("ledger", "balance", "beta"), ("ledger", "balance", "--at", "2026-11-30"),
                 ("ledger", "balance", "delta", "--at", "2026-11-30"),
                 ("ledger", "statement", "acme", *NOVEMBER),
                 ("ledger", "statement", "beta", *NOVEMBER),
                 ("ledger", "statement", "delta", *NOVEMBER), ("ledger", "history", "beta")]:
        code, out, err = cli(*argv, "--json")
        assert (code, err) == (0, ""), (argv, err)
        found = list(_amounts(json.loads(out)))
        assert found or argv[1] == "report", argv
        bad = [(k, v) for k, v in found if v is not None and not FIXED.fullmatch(v)]
        assert bad == [], (argv, bad)
        seen += found
    assert ("closing", "0.0000") in seen and ("refunds", "0.0000") in seen
    for argv in [("ledger", "report", *NOVEMBER), ("ledger", "flagged", *NOVEMBER),
                 ("ledger", "statement", "acme", *NOVEMBER),
                 ("ledger", "statement", "delta", *NOVEMBER)]:
        code, out, err = cli(*argv, "--csv")
        assert (code, err) == (0, ""), (argv, err)
        for row in csv.DictReader(io.StringIO(out)):
            for key in ("amount", "balance"):
                assert row.get(key) in (None, "") or FIXED.fullmatch(row[key]), (argv, row)
