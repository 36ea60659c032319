"""Finance's month-end commands: ``ledger report``, ``ledger flagged``, ``ledger balance --at``.

They only read the ledger (see :mod:`agent.ledger.report`). The policy is used
for two things and is optional: customer names beside account ids, and each
account's timezone (a day is a day in the account's own timezone, as in its
statement). When the policy cannot be loaded, finance still gets its figures:
one note on stderr, days in UTC (or ``--tz``), no names.
"""

from __future__ import annotations

import argparse
import csv
import sys
from datetime import date
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent.cli.common import (
    OpenedLedger,
    UsageError,
    load_policy,
    print_json,
)
from agent.cli.ledger import _table  # one table layout for every listing
from agent.days import parse_instant, parse_period
from agent.finance import (
    REPORT_COLUMNS,
    Directory,
    directory_of,
    gather,
    report_csv_rows,
    report_json,
)
from agent.finance import utc as _utc
from agent.ledger.report import (
    REVIEW_FLAGS,
    AccountReport,
    Flagged,
    balance_at,
    totals,
)
from agent.money import CURRENCY, clip, fixed, format_amount


def register(commands: Any) -> None:
    """Add ``report`` and ``flagged`` to ``callgate ledger``."""
    report = commands.add_parser(
        "report", help="all accounts over a period: opening, movements, closing, totals")
    _period_arguments(report)
    output = report.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true",
                        help="one row per balance movement, all accounts, in time order")
    output.add_argument("--json", action="store_true")
    report.set_defaults(func=_report)

    look = commands.add_parser("flagged", help="the calls of a period that need a look")
    _period_arguments(look)
    look.add_argument("--account", help="only this account")
    output = look.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true")
    output.add_argument("--json", action="store_true")
    look.set_defaults(func=_flagged)


def _period_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="start", required=True, help="first day, YYYY-MM-DD")
    parser.add_argument("--to", dest="end", required=True, help="last day, YYYY-MM-DD (included)")
    parser.add_argument("--tz", help="read the days in this timezone for every account "
                                     "(default: each account's own, from the policy)")


# -- the policy, when there is one ---------------------------------------------------------
def directory(args: argparse.Namespace, *, quiet: bool = False) -> Directory:
    """The policy's names and zones; a policy that cannot be loaded is a note, not an error."""
    tz = getattr(args, "tz", None)
    override = None
    if tz is not None:  # blank too: refused below, not read as "not given"
        try:
            override = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise UsageError(f"--tz {clip(tz)!r} is not a timezone (use an IANA name such as "
                             "'Asia/Shanghai' or 'UTC')") from None
    try:
        policy = load_policy(args)
    except UsageError as exc:
        if not quiet:
            first = str(exc).splitlines()[0].rstrip(":")
            print(f"note: no customer names or account timezones ({first}); days are read in "
                  f"{override or 'UTC'}", file=sys.stderr)
        return Directory({}, {}, override or ZoneInfo("UTC"), override is not None)
    return directory_of(policy, override)


def account_names(args: argparse.Namespace) -> dict[str, str]:
    """Customer names for the balance table (silently none without a loadable policy)."""
    return directory(args, quiet=True).names


# -- periods -------------------------------------------------------------------------------
def _days(args: argparse.Namespace) -> tuple[date, date]:
    first, last = parse_period(args.start, args.end)
    assert first is not None and last is not None  # both options are required
    return first, last


def _money(amount: Decimal) -> str:
    return format_amount(amount)


async def _gather(args: argparse.Namespace, d: Directory, first: date, last: date,
                  only: str | None = None) -> list[tuple[AccountReport, list[Flagged]]]:
    async with OpenedLedger(args) as ledger:
        if only is not None:
            await ledger.balance(only)  # an account the ledger does not have is refused
        return await gather(ledger, d, first, last, only)


# -- ledger report -------------------------------------------------------------------------
def _cell(value: Decimal | int) -> str:
    return _money(value) if isinstance(value, Decimal) else str(value)


async def _report(args: argparse.Namespace) -> int:
    first, last = _days(args)
    d = directory(args)
    reports = [r for r, _ in await _gather(args, d, first, last)]
    grand = totals(reports)
    if args.json:
        print_json(report_json(reports, grand, d, first, last))
    elif args.csv:
        _report_csv(reports, d)
    else:
        _report_text(reports, grand, d, first, last)
    return 0


def _report_text(reports: list[AccountReport], grand: dict[str, Decimal | int], d: Directory,
                 first: date, last: date) -> None:
    zones = sorted({str(d.zone(r.account)) for r in reports}) or [str(d.fallback)]
    print(f"Ledger report {first} to {last} (days in {', '.join(zones)}; "
          f"amounts in {CURRENCY})")
    if not reports:
        print("no accounts in the ledger for this period")
        return
    rows = [[r.account, d.name(r.account), *(_cell(getattr(r, f)) for f, _ in REPORT_COLUMNS)]
            for r in reports]
    rows.append(["TOTAL", "", *(_cell(grand[f]) for f, _ in REPORT_COLUMNS)])
    print(_table(["ACCOUNT", "NAME", *(h for _, h in REPORT_COLUMNS)], rows,
                 set(range(2, 2 + len(REPORT_COLUMNS)))))
    print()
    parts = " + ".join(f"{label} {_money(Decimal(grand[f]))}" for f, label in (
        ("topups", "top-ups"), ("calls_amount", "calls"), ("penalties", "penalties"),
        ("refunds", "refunds"), ("adjustments", "adjustments"), ("corrections", "corrections")))
    print(f"opening {_money(Decimal(grand['opening']))} + {parts} = closing "
          f"{_money(Decimal(grand['closing']))}")


def _report_csv(reports: list[AccountReport], d: Directory) -> None:
    csv.writer(sys.stdout, lineterminator="\n").writerows(report_csv_rows(reports, d))


# -- ledger flagged ------------------------------------------------------------------------
async def _flagged(args: argparse.Namespace) -> int:
    first, last = _days(args)
    d = directory(args)
    items = [f for _, fs in await _gather(args, d, first, last, args.account) for f in fs]
    items.sort(key=lambda f: (f.at, f.account, f.call_id))
    if args.json:
        print_json({"from": first.isoformat(), "to": last.isoformat(), "currency": CURRENCY,
                    "count": len(items), "calls": [_flagged_json(f, d) for f in items],
                    "flags": REVIEW_FLAGS})
        return 0
    if args.csv:
        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(["time", "account", "name", "call_id", "type", "flags", "amount",
                      "billsec", "caller", "callee", "note"])
        for f in items:
            out.writerow([_utc(f.at), f.account, d.name(f.account), f.call_id, f.kind,
                          ",".join(f.flags), fixed(f.amount),
                          "" if f.billsec is None else f.billsec,
                          f.cdr.caller if f.cdr else "", f.cdr.callee if f.cdr else "", f.note])
        return 0
    print(f"Calls that need a look, {first} to {last}: {len(items)}")
    if items:
        rows = [[f.at.astimezone(d.zone(f.account)).strftime("%Y-%m-%d %H:%M:%S"),
                 d.label(f.account), f.call_id, ",".join(f.flags), _money(f.amount),
                 "" if f.billsec is None else str(f.billsec)] for f in items]
        print(_table(["TIME", "ACCOUNT", "CALL", "FLAGS", "AMOUNT", "BILLSEC"], rows, {4, 5}))
        print()
        for flag in sorted({x for f in items for x in f.flags}):
            print(f"  {flag}: {REVIEW_FLAGS.get(flag, 'a call re-rated from the PBX CDR')}")
    return 0


def _flagged_json(f: Flagged, d: Directory) -> dict[str, Any]:
    return {"at": f.at, "account": f.account, "name": d.name(f.account) or None,
            "call_id": f.call_id, "type": f.kind, "flags": list(f.flags), "amount": f.amount,
            "billsec": f.billsec, "caller": f.cdr.caller if f.cdr else None,
            "callee": f.cdr.callee if f.cdr else None, "note": f.note}


# -- ledger balance --at -------------------------------------------------------------------
async def balance_as_of(args: argparse.Namespace) -> int:
    """``callgate ledger balance [ACCOUNT] --at TIME``."""
    d = directory(args, quiet=True)
    # A date is the end of that day (its closing balance); an ISO time is that instant.
    parse_instant(args.at, d.fallback, "--at")  # a bad --at is refused before the ledger
    rows = []
    async with OpenedLedger(args) as ledger:
        accounts = ([args.account] if args.account is not None
                    else [b.account for b in await ledger.balances()])
        for account in accounts:
            at = parse_instant(args.at, d.zone(account), "--at", day_end=True)
            found = balance_at(account, await ledger.history(account), at)
            if found is not None:
                rows.append(found)
    if args.json:
        entries = [{"account": b.account, "name": d.name(b.account) or None, "at": b.at,
                    "posted": b.posted, "held": b.held, "available": b.available,
                    "closed": b.closed} for b in rows]
        if args.account is not None:
            print_json(entries[0] if entries else {"account": args.account, "at": None,
                                                   "posted": None, "note": "no postings yet"})
        else:
            print_json({"at": args.at, "accounts": entries})
        return 0
    if not rows:
        print(f"no postings at or before {args.at}")
        return 0
    print(f"Balances as of {args.at} (amounts in {CURRENCY})")
    table = [[b.account, d.name(b.account), _utc(b.at), _money(b.posted), _money(b.held),
              _money(b.available), "closed" if b.closed else "open"] for b in rows]
    print(_table(["ACCOUNT", "NAME", "AT (UTC)", "BALANCE", "HELD", "AVAILABLE", "STATUS"],
                 table, {3, 4, 5}))
    return 0
