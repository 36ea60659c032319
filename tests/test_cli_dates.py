"""Every day and time a command takes (--from, --to, --at, --since) is read by the one
set of parsers in agent.days: at the ends of the calendar it is refused with one line
(exit 2), never an OverflowError ("internal error", exit 1)."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import eventloop
from agent.cli import build_parser, main
from agent.days import (
    FIRST_DAY,
    LAST_DAY,
    DayError,
    day_start,
    parse_day,
    parse_instant,
    parse_period,
)
from agent.ledger import open_ledger

# The zones furthest from UTC either way: a day there begins 14 h before, 12 h after UTC.
EAST, WEST = ZoneInfo("Pacific/Kiritimati"), ZoneInfo("Etc/GMT+12")
ZONES = [EAST, WEST, ZoneInfo("Asia/Shanghai"), ZoneInfo("America/St_Johns"), UTC]
POLICY = """\
version: 1
prepaid:
  first_topup_minimum: 100
  complaint_penalty: 10
accounts:
  east:
    name: East
    timezone: Pacific/Kiritimati
    caller_ids: ["02158880000"]
  west:
    name: West
    timezone: Etc/GMT+12
    caller_ids: ["02158880001"]
"""
DATE_DESTS = {"start", "end", "at", "since"}

# Every command that takes a day or a time, with what it needs besides; ACCOUNT is
# replaced by the account under test, CDR by an (empty) PBX CDR file.
COMMANDS: dict[tuple[str, ...], list[str]] = {
    ("ledger", "balance"): ["ACCOUNT"],
    ("ledger", "history"): ["ACCOUNT"],
    ("ledger", "statement"): ["ACCOUNT"],
    ("ledger", "report"): [],
    ("ledger", "flagged"): ["--account", "ACCOUNT"],
    ("ledger", "reconcile"): ["--freeswitch-cdr", "CDR"],
    ("complaint", "add"): ["--account", "ACCOUNT", "--callee", "13800138000",
                           "--ticket", "12321-1"],
    ("complaint", "list"): ["--account", "ACCOUNT"],
    ("policy", "explain"): ["--account", "ACCOUNT", "--to", "13800138000", "--balance", "5"],
}
# The day options; the others (--at, --since) also take an ISO time.
OPTIONS = {"start": "--from", "end": "--to", "at": "--at", "since": "--since"}
# Where both ends of a period are required, the other end given with a value in range.
REQUIRED_PAIR = {("ledger", "report"), ("ledger", "flagged"), ("ledger", "reconcile")}


def _date_options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
                  ) -> Iterator[tuple[tuple[str, ...], str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _date_options(sub, (*path, name))
        elif action.option_strings and (
                action.dest in DATE_DESTS
                or any(w in (action.help or "") for w in ("YYYY-MM-DD", "ISO time"))):
            yield path, action.dest


CASES = sorted(_date_options(build_parser()))


def test_the_table_covers_every_date_option_of_every_command() -> None:
    # A new --from/--to/--at/--since (or an option whose help speaks of a date) must be
    # added to COMMANDS, and so is checked below.
    assert {p for p, _ in CASES} == set(COMMANDS)
    assert {dest for _, dest in CASES} <= DATE_DESTS
    assert len(CASES) == 14


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Any:
    for name in ("CALLGATE_CONFIG", "CALLGATE_POLICY", "CALLGATE_LEDGER"):
        monkeypatch.delenv(name, raising=False)
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent(POLICY))
    (tmp_path / "Master.csv").write_text("")
    url = f"sqlite://{tmp_path}/ledger.db"

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["--policy", str(policy), "--ledger", url, "--operator", "clerk", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    assert run("ledger", "init")[0] == 0

    async def seed() -> None:
        ledger = await open_ledger(url)
        try:
            for account in ("east", "west"):
                await ledger.topup(account, D(100), ref="T1",
                                   at=datetime(2026, 11, 1, tzinfo=UTC))
        finally:
            await ledger.close()

    eventloop.run(seed())
    run.cdr = str(tmp_path / "Master.csv")  # type: ignore[attr-defined]
    return run


def _argv(cli: Any, path: tuple[str, ...], dest: str, value: str, account: str) -> list[str]:
    extra = [cli.cdr if a == "CDR" else account if a == "ACCOUNT" else a
             for a in COMMANDS[path]]
    argv = [*path, *extra, OPTIONS[dest], value]
    if path in REQUIRED_PAIR:
        argv += ["--to", "2026-12-31"] if dest == "start" else ["--from", "2026-01-01"]
    return argv


OUT_OF_RANGE = ["0001-01-01", "9999-12-31", "1899-12-31", "9999-01-01"]
OUT_OF_RANGE_TIMES = ["0001-01-01T00:00", "9999-12-31T23:59:59", "0001-01-01T00:00+14:00",
                      "9999-12-31T23:59-12:00", "1899-12-31T23:59:59"]


@pytest.mark.parametrize(("path", "dest"), CASES, ids=lambda x: "-".join(x) if
                         isinstance(x, tuple) else x)
@pytest.mark.parametrize("account", ["east", "west"])
def test_calendar_ends_are_refused_in_one_line(cli: Any, path: tuple[str, ...], dest: str,
                                               account: str) -> None:
    values = OUT_OF_RANGE + (OUT_OF_RANGE_TIMES if dest in ("at", "since") else [])
    for value in values:
        code, out, err = cli(*_argv(cli, path, dest, value, account))
        assert (code, out) == (2, ""), (value, out, err)
        assert err.count("\n") == 1, err
        assert f"out of range: days and times must be from {FIRST_DAY} to {LAST_DAY}" in err


@pytest.mark.parametrize(("path", "dest"), CASES, ids=lambda x: "-".join(x) if
                         isinstance(x, tuple) else x)
@pytest.mark.parametrize("account", ["east", "west"])
def test_the_first_and_last_days_in_range_work(cli: Any, path: tuple[str, ...], dest: str,
                                               account: str) -> None:
    values = [str(FIRST_DAY), str(LAST_DAY)]
    if dest in ("at", "since"):
        values += [f"{FIRST_DAY}T00:00", f"{LAST_DAY}T23:59:59", f"{FIRST_DAY}T00:00+14:00",
                   f"{LAST_DAY}T23:59:59-12:00"]
    # --to defaults to today, --from to the first posting (2026-11-01) where they may be left out
    periods = {*REQUIRED_PAIR, ("ledger", "statement")}
    for n, value in enumerate(values):
        argv = _argv(cli, path, dest, value, account)
        if path == ("complaint", "add"):
            argv[argv.index("12321-1")] = f"12321-{n}"
        code, _, err = cli(*argv)
        late, early = value.startswith(str(LAST_DAY)), value.startswith(str(FIRST_DAY))
        if path == ("complaint", "add") and late:
            assert code == 2 and "in the future" in err, err
        elif path == ("ledger", "statement") and dest == "start" and late:
            assert code == 2 and "is after today (" in err, err  # the default --to
        elif path in periods and ((dest == "start" and late) or (dest == "end" and early)):
            assert code == 2 and "is before --from" in err, err
        else:
            assert (code, err) == (0, ""), (value, err)


@pytest.mark.parametrize("value", ["", " ", "2026-13-01", "yesterday", "2026-11-24T25:00",
                                   "x" * 500])
def test_a_blank_or_malformed_day_is_refused_not_ignored(cli: Any, value: str) -> None:
    for path, dest in CASES:
        code, out, err = cli(*_argv(cli, path, dest, value, "east"))
        assert (code, out) == (2, ""), (path, dest, value, out, err)
        assert err.count("\n") == 1 and len(err) < 300, err


# -- the parsers alone: whatever they return, the commands' arithmetic cannot overflow ----
def _commands_arithmetic(at: datetime) -> None:
    """What the commands do with an instant: show it in any zone, look back a cap's
    period (at most 366 days), ahead the calling hours' horizon (8 days)."""
    for zone in ZONES:
        at.astimezone(zone)
        (at - timedelta(days=367)).astimezone(zone)
        (at + timedelta(days=9)).astimezone(zone)


@given(st.dates(), st.sampled_from(ZONES))
def test_a_day_is_refused_or_safe(day: date, zone: Any) -> None:
    try:
        parsed = parse_day(day.isoformat(), "--to")
    except DayError as exc:
        assert not FIRST_DAY <= day <= LAST_DAY and "out of range" in str(exc)
        return
    assert parsed == day
    _commands_arithmetic(day_start(parsed, zone))
    _commands_arithmetic(day_start(parsed + timedelta(days=1), zone))


@given(st.datetimes(), st.sampled_from(ZONES), st.booleans(),
       st.one_of(st.none(), st.integers(-23 * 60 - 59, 23 * 60 + 59)))
def test_an_instant_is_refused_or_safe(moment: datetime, zone: Any, day_end: bool,
                                       offset: int | None) -> None:
    if offset is not None:
        from datetime import timezone
        moment = moment.replace(tzinfo=timezone(timedelta(minutes=offset)))
    for text in (moment.isoformat(), moment.date().isoformat()):
        try:
            at = parse_instant(text, zone, "--at", day_end=day_end)
        except DayError as exc:
            assert not FIRST_DAY <= moment.date() <= LAST_DAY and "out of range" in str(exc)
            continue
        assert at.tzinfo is not None and at.utcoffset() == timedelta(0)
        _commands_arithmetic(at)


def test_a_day_is_its_last_instant_with_day_end() -> None:
    assert parse_instant("2026-11-24", EAST, "--at", day_end=True) == \
        datetime(2026, 11, 24, 9, 59, 59, 999999, tzinfo=UTC)
    assert parse_instant("2026-11-24", EAST, "--since") == datetime(2026, 11, 23, 10, tzinfo=UTC)
    assert parse_instant("2026-11-24T09:30", WEST, "--at") == \
        datetime(2026, 11, 24, 21, 30, tzinfo=UTC)
    assert parse_instant("2026-11-24T09:30+08:00", WEST, "--at") == \
        datetime(2026, 11, 24, 1, 30, tzinfo=UTC)


def test_a_period_is_in_order() -> None:
    assert parse_period(None, None) == (None, None)
    assert parse_period("2026-11-01", "2026-11-01") == (date(2026, 11, 1), date(2026, 11, 1))
    with pytest.raises(DayError, match="--to 2026-10-31 is before --from 2026-11-01"):
        parse_period("2026-11-01", "2026-10-31")
    with pytest.raises(DayError, match="--from '' is not a date"):
        parse_period("", None)


def test_the_web_consoles_periods_are_read_the_same_way() -> None:
    """finance's readers (the API's query parameters) are the same parsers: the same line."""
    from agent import finance

    for call in (lambda: finance.report_days("0001-01-01", "2026-11-30"),
                 lambda: finance.day("9999-12-31", "--to"),
                 lambda: finance.since("0001-01-01T00:00", EAST)):
        with pytest.raises(finance.Refused, match="out of range: days and times must be from"):
            call()
    assert finance.report_days("1900-01-01", "9998-12-31") == (FIRST_DAY, LAST_DAY)
