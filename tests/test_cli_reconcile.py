"""``callgate ledger reconcile``: a PBX CDR file against the ledger, every kind of line."""

from __future__ import annotations

import csv
import io
import json
import shutil
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path
from typing import Any

from agent.ledger import CallRecord, Cdr
from tests import test_cli_ledger
from tests.test_cdr_source import fs_row
from tests.test_cli_ledger import ledger_do, postings, refused

cli = test_cli_ledger.cli  # the fixture: callgate's main() on a fresh policy and ledger

DAY = datetime(2026, 12, 3, 2, 0, tzinfo=UTC)
FIXTURES = Path(__file__).parent / "fixtures" / "cdr"


def t(seconds: float) -> datetime:
    return DAY + timedelta(seconds=seconds)


def seed(url: str, calls: list[tuple[str, float, int, str, tuple[str, ...]]]) -> None:
    """Settle calls: (id, answered at, billsec, amount, flags); holds cover the amount."""

    async def go(lg: Any) -> None:
        await lg.topup("acme", D("100"), ref="T0", at=DAY - timedelta(days=1))
        for call_id, answered, billsec, amount, flags in calls:
            record = CallRecord(call_id, "acme", "pbx-1", "02158880000", "13800138000",
                                "standard", D("0.13"), 60, 60, t(answered - 3))
            await lg.admit_call(record, None)
            await lg.answer_call(call_id, t(answered))
            steps = max(1, int(D(amount) / D("0.13")))
            for step in range(1, steps + 1):
                assert await lg.hold(call_id, step, D("0.13"), 60 * step, t(answered))
            billed = 60 * int(D(amount) / D("0.13"))
            await lg.settle_call(Cdr(call_id, "acme", "02158880000", "13800138000",
                                     t(answered), t(answered + billsec), billsec, billed,
                                     D(amount), "NORMAL_CLEARING", flags=flags))

    ledger_do(url, go)


MIXED = [
    ("eq", 10, 40, "0.13", ()),
    ("prov", 100, 120, "0.26", ("ended_while_away", "billsec_assumed_paid")),
    ("diff", 200, 40, "0.13", ()),
    ("grace", 300, 61, "0.13", ("grace",)),
    ("nopbx", 400, 30, "0.13", ()),
    ("ledger-x", 500, 30, "0.13", ()),
]


def mixed_file(tmp_path: Path) -> Path:
    path = tmp_path / "Master.csv"
    path.write_text(
        fs_row("eq", 40, t(10), t(50))
        + fs_row("prov", 58, t(100), t(158))
        + fs_row("diff", 70, t(200), t(270))
        + fs_row("grace", 61, t(300), t(361))
        + fs_row("escaped", 95, t(600), t(695), accountcode="acme")
        + fs_row("busy", 0, None, t(700), accountcode="acme")
        + fs_row("fs-other-leg", 30, t(501), t(531)))  # ledger-x, by number and time
    return path


def reconcile(cli: Any, path: Path, *extra: str) -> tuple[int, str, str]:
    return cli("ledger", "reconcile", "--freeswitch-cdr", str(path), "--from", "2026-12-03",
               "--to", "2026-12-03", *extra)


def test_every_kind_of_line_and_exit_1(cli: Any, tmp_path: Path) -> None:
    seed(cli.url, MIXED)
    code, out, err = reconcile(cli, mixed_file(tmp_path), "--json")
    assert (code, err) == (1, "")
    report = json.loads(out)
    assert report["counts"] == {
        "missing_in_ledger": 1, "charged_differently": 1, "needs_correction": 1,
        "not_settled": 0, "missing_in_pbx": 1, "explained": 1, "corrected": 0, "equal": 2}
    lines = {x["call_id"]: x for x in report["lines"]}
    assert next(iter(lines)) == "escaped"  # the most serious first
    escaped = lines["escaped"]
    assert (escaped["kind"], escaped["pbx_billsec"], escaped["pbx_amount"],
            escaped["ledger_amount"]) == ("missing_in_ledger", 95, "0.2600", None)
    diff = lines["diff"]
    assert (diff["pbx_billsec"], diff["ledger_billsec"], diff["pbx_amount"],
            diff["ledger_amount"], diff["difference"]) == (70, 40, "0.2600", "0.1300", "-0.1300")
    prov = lines["prov"]
    assert (prov["kind"], prov["pbx_amount"], prov["ledger_amount"]) == (
        "needs_correction", "0.1300", "0.2600")
    assert lines["grace"]["kind"] == "explained" and "grace" in lines["grace"]["note"]
    assert (lines["nopbx"]["kind"], lines["nopbx"]["ledger_amount"]) == ("missing_in_pbx", "0.1300")
    assert "eq" not in lines and report["unexplained"] == 4
    code, out, _ = reconcile(cli, mixed_file(tmp_path), "--json", "--all")
    matched = {x["call_id"]: x for x in json.loads(out)["lines"]}["ledger-x"]
    assert (matched["kind"], matched["matched_by"]) == ("equal", "number")


def test_text_report_names_each_line(cli: Any, tmp_path: Path) -> None:
    seed(cli.url, MIXED)
    code, out, err = reconcile(cli, mixed_file(tmp_path))
    assert (code, err) == (1, "")
    lines = out.splitlines()
    assert lines[0].startswith("Reconciliation of ") and "freeswitch-csv" in lines[0]
    assert lines[1] == ("7 call(s): 1 missing_in_ledger, 1 charged_differently, "
                        "1 needs_correction, 1 missing_in_pbx, 1 explained, 2 equal")
    table = lines[lines.index("") + 1:]
    assert table[0].split()[:3] == ["KIND", "CALL", "ACCOUNT"]
    assert table[1].split()[:3] == ["missing_in_ledger", "escaped", "acme"]
    assert lines[-1] == "4 unexplained line(s)"


def test_csv_report(cli: Any, tmp_path: Path) -> None:
    seed(cli.url, MIXED)
    code, out, _ = reconcile(cli, mixed_file(tmp_path), "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 1
    assert [(r["kind"], r["call_id"], r["unexplained"]) for r in rows][:3] == [
        ("missing_in_ledger", "escaped", "yes"), ("charged_differently", "diff", "yes"),
        ("needs_correction", "prov", "yes")]
    assert rows[1]["difference"] == "-0.1300"


def test_apply_corrects_only_provisional_calls_and_is_idempotent(
        cli: Any, tmp_path: Path) -> None:
    seed(cli.url, MIXED)
    path = mixed_file(tmp_path)
    code, out, _ = reconcile(cli, path, "--json", "--apply")
    report = json.loads(out)
    assert code == 1  # the other lines stay unexplained: --apply fixes nothing else
    assert report["applied"] == ["prov"]
    assert (report["counts"]["corrected"], report["counts"]["needs_correction"]) == (1, 0)
    corrections = [p for p in postings(cli) if p["kind"] == "correction"]
    # Shown by its effect on the balance: 0.13 given back; --apply names who applied it.
    assert [(p["call_id"], p["amount"]) for p in corrections] == [("prov", "0.1300")]
    assert corrections[0]["operator"]
    assert "PBX CDR billsec 58" in corrections[0]["note"]
    code, out, _ = reconcile(cli, path, "--json", "--apply")
    assert json.loads(out)["applied"] == []
    assert [p for p in postings(cli) if p["kind"] == "correction"] == corrections
    code, out, _ = cli("ledger", "statement", "acme", "--from", "2026-12-03", "--to",
                       "2026-12-03", "--json")
    statement = json.loads(out)
    prov = {c["call_id"]: c for c in statement["calls"]}["prov"]
    # The call as settled, its PBX billsec, and the correction (by its effect on the balance)
    assert (prov["pbx_billsec"], prov["amount"], prov["correction"], prov["final_amount"]) == (
        58, "-0.2600", "0.1300", "-0.1300")
    [line] = [p for p in statement["postings"] if p["kind"] == "correction"]
    assert (line["ref"], line["amount"]) == ("prov", "0.1300")
    assert statement["totals"]["correction"] == "0.1300"
    code, out, _ = cli("ledger", "statement", "acme", "--from", "2026-12-03", "--to",
                       "2026-12-03")
    lines = out.splitlines()
    header = next(x for x in lines if x.startswith("ANSWERED"))
    assert header.split()[3:6] == ["BILLSEC", "PBX", "BILLSEC"]
    row = next(x for x in lines if " 120 " in x)  # the provisional billsec, then the PBX's
    assert row.split()[4:8] == ["120", "58", "120", "-0.26"], row
    assert row.endswith("ended_while_away,billsec_assumed_paid,pbx_billsec=58,corrected +0.13")
    assert any(x.split()[2:4] == ["correction", "0.13"] for x in lines), out
    assert next(x for x in lines if x.startswith("corrections")).split() == [
        "corrections", "0.13"]


def test_a_day_that_agrees_exits_0(cli: Any, tmp_path: Path) -> None:
    seed(cli.url, [("eq", 10, 40, "0.13", ()),
                   ("prov", 100, 120, "0.26", ("ended_while_away", "billsec_assumed_paid"))])
    path = tmp_path / "Master.csv"
    path.write_text(fs_row("eq", 40, t(10), t(50)) + fs_row("prov", 58, t(100), t(158))
                    + fs_row("inbound", 300, t(900), t(1200), caller="13900139000",
                             destination="02158880000"))  # no account's: inbound
    code, _, _ = reconcile(cli, path)
    assert code == 1
    code, out, err = reconcile(cli, path, "--apply")
    assert (code, err) == (0, "")
    assert out.splitlines()[-1] == "nothing unexplained"
    code, out, _ = reconcile(cli, path)
    assert code == 0 and "1 corrected, 1 equal" in out


def test_the_recorded_asterisk_rows_reconcile(cli: Any, tmp_path: Path) -> None:
    """The real cdr_custom file: one answered call (metered live), a busy and an unanswered."""
    answered = datetime(2026, 12, 3, 9, 12, 52, 916726, tzinfo=UTC)

    async def go(lg: Any) -> None:
        await lg.topup("acme", D("100"), ref="T0", at=answered - timedelta(days=1))
        for call_id in ("1796289172.0", "1796289177.2", "1796289179.4"):
            record = CallRecord(call_id, "acme", "pbx-1", "1000", "555", "standard",
                                D("0.13"), 60, 60, answered - timedelta(seconds=1))
            await lg.admit_call(record, None)
            assert await lg.hold(call_id, 1, D("0.13"), 60, answered)
        await lg.answer_call("1796289172.0", answered)
        await lg.settle_call(Cdr("1796289172.0", "acme", "1000", "555", answered,
                                 answered + timedelta(seconds=2), 2, 60, D("0.13"),
                                 "NORMAL_CLEARING"))
        for call_id in ("1796289177.2", "1796289179.4"):
            await lg.settle_call(Cdr(call_id, "acme", "1000", "555", None,
                                     answered + timedelta(seconds=9), 0, 0, D(0), "BUSY"))

    ledger_do(cli.url, go)
    path = tmp_path / "Master.csv"
    shutil.copy(FIXTURES / "asterisk-cdr_custom.csv", path)
    code, out, err = cli("ledger", "reconcile", "--asterisk-cdr", str(path), "--from",
                         "2026-12-03", "--to", "2026-12-03", "--json", "--all")
    report = json.loads(out)
    assert (code, err, report["counts"]["equal"], report["unexplained"]) == (0, "", 1, 0)
    code, out, _ = cli("ledger", "reconcile", "--asterisk-cdr",
                       str(FIXTURES / "asterisk-cdr_csv.csv"), "--format", "asterisk-csv",
                       "--from", "2026-12-03", "--to", "2026-12-03", "--json")
    assert code == 0 and json.loads(out)["rows"] == 5


def test_usage_errors_are_one_line(cli: Any, tmp_path: Path) -> None:
    refused(reconcile(cli, tmp_path / "missing.csv"), "cannot read CDR file")
    path = tmp_path / "ast.csv"
    shutil.copy(FIXTURES / "asterisk-cdr_custom.csv", path)
    refused(reconcile(cli, path), "is the layout right?")
    refused(cli("ledger", "reconcile", "--asterisk-cdr", str(path), "--format",
                "freeswitch-csv", "--from", "2026-12-03", "--to", "2026-12-03"),
            "not a asterisk layout")
    refused(cli("ledger", "reconcile", "--asterisk-cdr", str(path), "--from", "2026-12-04",
                "--to", "2026-12-03"), "before --from")
    refused(cli("ledger", "reconcile", "--asterisk-cdr", str(path), "--columns", "a,b",
                "--from", "2026-12-03", "--to", "2026-12-03"), "no 'call_id'")
    refused(reconcile(cli, path, "--timezone", "Nowhere/City"), "not a known timezone")


def test_an_unreadable_row_is_reported_and_unexplained(cli: Any, tmp_path: Path) -> None:
    seed(cli.url, [("eq", 10, 40, "0.13", ())])
    path = tmp_path / "Master.csv"
    path.write_text(fs_row("eq", 40, t(10), t(50)) + "half a row\n")
    code, out, _ = reconcile(cli, path)
    assert code == 1
    assert "unreadable row: " in out and "line 2: 1 columns" in out


def test_apply_on_a_closed_account_says_why_and_stays_unexplained(
        cli: Any, tmp_path: Path) -> None:
    seed(cli.url, [("prov", 100, 120, "0.26", ("ended_while_away", "billsec_assumed_paid"))])

    async def close(lg: Any) -> None:
        await lg.refund("acme", ref="R1", at=t(3600))

    ledger_do(cli.url, close)
    path = tmp_path / "Master.csv"
    path.write_text(fs_row("prov", 58, t(100), t(158)))
    code, out, _ = reconcile(cli, path, "--apply")
    assert code == 1
    assert "not applied to prov: account 'acme' is closed (refunded)" in out
    assert [p for p in postings(cli) if p["kind"] == "correction"] == []


def test_the_month_end_report_and_flagged_list_show_the_correction(
        cli: Any, tmp_path: Path) -> None:
    seed(cli.url, MIXED)
    reconcile(cli, mixed_file(tmp_path), "--apply")
    code, out, err = cli("ledger", "report", "--from", "2026-12-03", "--to", "2026-12-03",
                         "--json")
    assert (code, err) == (0, ""), err
    report = json.loads(out)
    [acme] = [a for a in report["accounts"] if a["account"] == "acme"]
    assert D(acme["corrections"]) == D("0.13")
    code, out, _ = cli("ledger", "flagged", "--from", "2026-12-03", "--to", "2026-12-03",
                       "--json")
    assert code == 0 and '"correction"' in out and '"prov"' in out


def test_damaged_rows_are_listed_and_the_others_reconciled(cli: Any, tmp_path: Path) -> None:
    from tests.test_cdr_source import DAMAGED

    seed(cli.url, [("eq", 10, 40, "0.13", ()),
                   ("prov", 100, 120, "0.26", ("ended_while_away", "billsec_assumed_paid"))])
    path = tmp_path / "Master.csv"
    path.write_text(fs_row("eq", 40, t(10), t(50)) + "".join(f"{x}\n" for x in DAMAGED)
                    + "x" * 100_000 + "\n"  # no CDR row: longer than a line may be
                    + fs_row("prov", 58, t(100), t(158)))
    code, out, err = reconcile(cli, path, "--json", "--apply")
    assert code == 1 and "Traceback" not in err
    report = json.loads(out)
    assert report["applied"] == ["prov"] and report["rows"] == 2
    assert report["counts"]["equal"] == 1 and report["counts"]["corrected"] == 1
    assert report["unexplained"] == len(DAMAGED) + 1
    unreadable = report["unreadable_rows"]
    assert [u.split(": ")[0] for u in unreadable] == [
        f"{path} line {n}" for n in range(2, len(DAMAGED) + 3)]
    assert "longer than 65536 bytes" in unreadable[-1]
    assert all(len(u) < len(str(path)) + 200 for u in unreadable), unreadable
    assert err.count("callgate: unreadable CDR row: ") == len(DAMAGED) + 1


def test_many_unreadable_rows_are_counted_and_the_first_listed(
        cli: Any, tmp_path: Path) -> None:
    seed(cli.url, [("eq", 10, 40, "0.13", ())])
    path = tmp_path / "Master.csv"
    path.write_text(fs_row("eq", 40, t(10), t(50)) + "garbage\n" * 150)
    code, out, _ = reconcile(cli, path, "--json")
    report = json.loads(out)
    assert code == 1 and report["unexplained"] == 150
    assert (len(report["unreadable_rows"]), report["unreadable_not_listed"]) == (100, 50)
    code, out, _ = reconcile(cli, path)
    assert "and 50 more unreadable row(s)" in out


def test_only_the_rows_near_the_period_are_kept(tmp_path: Path) -> None:
    """Reading streams the file: months of history cost no memory beyond the period's rows."""
    from agent.cdr.formats import preset
    from agent.cli.reconcile import read_rows

    path = tmp_path / "Master.csv"
    with open(path, "w") as out:
        for day in range(-40, 40):  # 80 days, one call each
            at_ = DAY + timedelta(days=day)
            out.write(fs_row(f"day{day}", 30, at_, at_ + timedelta(seconds=30)))
    reading = read_rows(path, preset("freeswitch-csv"), DAY.replace(hour=0),
                        DAY.replace(hour=0) + timedelta(days=1))
    assert reading.parsed == 80
    assert [r.call_id for r in reading.rows] == ["day-1", "day0", "day1"]  # with its margin
    # The margin stops at the calendar's ends.
    everything = read_rows(path, preset("freeswitch-csv"), datetime.min.replace(tzinfo=UTC),
                           datetime.max.replace(tzinfo=UTC))
    assert len(everything.rows) == 80


def test_apply_counts_no_zero_correction(cli: Any, tmp_path: Path) -> None:
    """A provisional charge the PBX's billsec agrees with: its billsec is recorded, nothing
    is posted, and it is not reported as a correction applied."""
    seed(cli.url, [("right", 100, 120, "0.26", ("ended_while_away", "billsec_assumed_paid")),
                   ("prov", 200, 120, "0.26", ("ended_while_away", "billsec_assumed_paid"))])
    path = tmp_path / "Master.csv"
    path.write_text(fs_row("right", 100, t(100), t(200)) + fs_row("prov", 58, t(200), t(258)))
    code, out, _ = reconcile(cli, path, "--apply", "--json")
    report = json.loads(out)
    assert code == 0
    assert (report["applied"], report["confirmed"]) == (["prov"], ["right"])
    assert [p["ref"] for p in postings(cli) if p["kind"] == "correction"] == ["prov"]
    code, out, _ = reconcile(cli, path, "--apply")  # again: nothing new, nothing counted
    assert code == 0 and "applied" not in out and "recorded the PBX billsec" not in out


def test_a_correction_above_max_posting_is_refused_and_stays_unexplained(
        cli: Any, tmp_path: Path) -> None:
    seed(cli.url, [("prov", 100, 120, "0.26", ("ended_while_away", "billsec_assumed_paid"))])
    path = tmp_path / "Master.csv"
    path.write_text(fs_row("prov", 6000, t(100), t(6100)))  # 100 minutes: +12.74
    code, out, _ = cli("--ledger", f"{cli.url}?max_posting=10", "ledger", "reconcile",
                       "--freeswitch-cdr", str(path), "--from", "2026-12-03", "--to",
                       "2026-12-03", "--apply")
    assert code == 1
    assert ("not applied to prov: the correction of call 'prov' from the PBX's CDR 12.74 is "
            "above the ledger's maximum posting of 10.00") in out
    assert "needs_correction" in out
    assert [p for p in postings(cli) if p["kind"] == "correction"] == []


def test_a_period_from_the_calendar_start(cli: Any, tmp_path: Path) -> None:
    """The earliest day every command accepts works; before it, one line and exit 2."""
    seed(cli.url, [("eq", 10, 40, "0.13", ())])
    path = tmp_path / "Master.csv"
    path.write_text(fs_row("eq", 40, t(10), t(50)))
    code, out, err = cli("ledger", "reconcile", "--freeswitch-cdr", str(path), "--from",
                         "1900-01-01", "--to", "2026-12-03", "--json")
    assert (code, err) == (0, "") and json.loads(out)["counts"]["equal"] == 1
    code, out, err = cli("ledger", "reconcile", "--freeswitch-cdr", str(path), "--from",
                         "0001-01-01", "--to", "2026-12-03", "--json")
    assert (code, out) == (2, "") and err.count("\n") == 1 and "1900-01-01" in err
