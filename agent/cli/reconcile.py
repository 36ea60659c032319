"""``callgate ledger reconcile``: the PBX's own CDR file against the ledger, for finance.

Reads a CDR CSV file (``--asterisk-cdr FILE`` or ``--freeswitch-cdr FILE``, a
standard layout or ``--columns``), matches every answered outbound call of the
period with the ledger (:mod:`agent.cdr.reconcile`) and prints one line per
call that is not simply equal (``--all``: every call), as text, ``--csv`` or
``--json``. Exit status 1 when anything is left unexplained, 0 otherwise, 2 for
bad usage (an unreadable file, a layout that reads none of its rows).

``--apply`` posts the corrections of provisionally settled calls from their
CDR rows (the ledger's ``correct_call``: once per call, so running it again
writes nothing) and nothing else; the report then shows them corrected.
``applied`` counts only calls a correction was posted for; a provisional call
the PBX's billsec agrees with is ``confirmed`` (its billsec recorded, nothing
posted); one the ledger refuses (closed account, above ``max_posting``) is
listed with why.

The file is read line by line and only rows within :data:`MARGIN` of the
period are kept: memory follows the period's calls, not the file's history.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent.calls import CallInfo, Direction
from agent.cdr.follow import MAX_LINE, file_lines
from agent.cdr.follow import Line as FileLine
from agent.cdr.formats import PRESETS, CdrFormatError, CdrRow, Layout, parse_row, preset
from agent.cdr.reconcile import Kind, Line, reconcile, summary
from agent.cdr.settle import Outcome, apply_row, is_provisional, merge_rows
from agent.cli.common import (
    UsageError,
    agent_config,
    open_store,
    operator_name,
    print_json,
    try_policy,
)
from agent.days import day_start, parse_period
from agent.ledger import CallRecord, Cdr, Ledger, LedgerError
from agent.money import CURRENCY, fixed, format_amount


def register(commands: Any) -> None:
    """Add ``reconcile`` to the ``ledger`` command group."""
    p = commands.add_parser(
        "reconcile", help="match the PBX's CDR file with the ledger; --apply corrects")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--asterisk-cdr", metavar="FILE",
                        help="Asterisk CDR CSV (default layout asterisk-custom)")
    source.add_argument("--freeswitch-cdr", metavar="FILE",
                        help="FreeSWITCH mod_cdr_csv file (default layout freeswitch-csv)")
    p.add_argument("--from", dest="start", required=True, help="first day, YYYY-MM-DD")
    p.add_argument("--to", dest="end", required=True, help="last day, YYYY-MM-DD (included)")
    p.add_argument("--format", choices=sorted(PRESETS),
                   help="the file's standard layout (see README: CDR layouts)")
    p.add_argument("--columns", help="the file's columns, comma-separated, replacing the "
                                     "layout's (role or PBX variable names)")
    p.add_argument("--timezone", default="UTC",
                   help="zone of the days and of CDR times written without one (default UTC)")
    p.add_argument("--node", help="only the ledger's calls of this node (default: the agent "
                                  "config's node, if there is a config; else every node)")
    p.add_argument("--outbound-context", action="append", default=None, metavar="CONTEXT",
                   help="a row is outbound when its context is one of these (default: "
                        "pbx.outbound_contexts; else a row with an accountcode)")
    p.add_argument("--apply", action="store_true",
                   help="post the corrections of provisionally settled calls (idempotent)")
    p.add_argument("--all", action="store_true", help="also list the equal calls")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true")
    output.add_argument("--json", action="store_true")
    p.set_defaults(func=_reconcile)


def _zone(name: str) -> tzinfo:
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise UsageError(f"--timezone {name!r} is not a known timezone") from None


def _layout(args: argparse.Namespace, zone: tzinfo) -> tuple[Path, Layout]:
    if args.asterisk_cdr:
        path, name = Path(args.asterisk_cdr), args.format or "asterisk-custom"
        pbx = "asterisk"
    else:
        path, name = Path(args.freeswitch_cdr), args.format or "freeswitch-csv"
        pbx = "freeswitch"
    if PRESETS[name][0] != pbx:
        raise UsageError(f"--format {name} is not a {pbx} layout")
    columns = [c for c in args.columns.split(",")] if args.columns else None
    try:
        return path, preset(name, timezone=zone, columns=columns)
    except CdrFormatError as exc:
        raise UsageError(str(exc)) from None


# A period's rows are kept within this margin of it, so that the rows of one call
# (Asterisk writes a second one for the Hangup after a failed Dial) merge whole.
MARGIN = timedelta(days=1)
ERRORS_KEPT = 100  # unreadable rows listed one by one; the rest are counted


@dataclass
class Reading:
    """What a pass over a CDR file keeps: the rows near the period, merged per call, and
    the unreadable rows (the first :data:`ERRORS_KEPT` listed, every one counted)."""

    rows: list[CdrRow] = field(default_factory=list)
    parsed: int = 0  # rows of the whole file that parse
    unreadable: int = 0
    errors: list[str] = field(default_factory=list)

    def damaged(self, error: str) -> None:
        self.unreadable += 1
        if len(self.errors) < ERRORS_KEPT:
            self.errors.append(error)


def read_rows(path: Path, layout: Layout, start: datetime, end: datetime) -> Reading:
    """The rows of the file filed within :data:`MARGIN` of ``[start, end)``, read line by
    line: memory grows with the period's calls, not with the file (months of history).
    A file with rows none of which parse is a usage error."""
    reading = Reading()
    first, last = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)
    low = start - MARGIN if start - first > MARGIN else first  # --from 0001-01-01
    high = end + MARGIN if last - end > MARGIN else last

    def near(lines: Iterable[FileLine]) -> Iterator[CdrRow]:
        for line in lines:
            if line.too_long:
                reading.damaged(f"{path} line {line.number}: longer than {MAX_LINE} bytes, "
                                "no CDR row")
                continue
            if not line.text.strip():
                continue
            try:
                row = parse_row(line.text, layout, line=line.number, source=str(path))
            except CdrFormatError as exc:
                reading.damaged(str(exc))
                continue
            reading.parsed += 1
            if row.when is not None and low <= row.when < high:
                yield row

    try:
        with open(path, "rb") as handle:
            reading.rows = merge_rows(near(file_lines(handle)))
    except OSError as exc:
        raise UsageError(f"cannot read CDR file {path}: {exc.strerror or exc}") from None
    if reading.errors and not reading.parsed:
        raise UsageError(f"{reading.errors[0]} (is the layout right? --format, --columns)")
    return reading


def _outbound_rule(args: argparse.Namespace) -> Callable[[CdrRow], bool]:
    """Which rows are outbound calls the ledger should know.

    The context names, when given (``--outbound-context``, else the config's
    ``pbx.outbound_contexts``); otherwise a row with an accountcode, or one whose
    caller is an account of the policy (its accountcode, endpoint or caller-ID
    prefix, or one of its registered caller IDs).
    """
    contexts = args.outbound_context
    config = agent_config(args)
    if contexts is None and config is not None:
        contexts = list(config.spec.pbx.outbound_contexts)
    policy = _policy_or_none(args)

    def outbound(row: CdrRow) -> bool:
        if contexts:
            return row.context in contexts
        if row.accountcode:
            return True
        return policy is not None and _account_of(policy, row) is not None

    return outbound


def _account_of(policy: Any, row: CdrRow) -> Any:
    info = CallInfo(call_id=row.call_id, direction=Direction.OUTBOUND, caller_id=row.caller,
                    destination=row.destination, accountcode=row.accountcode,
                    context=row.context)
    account = policy.match_account(info)
    if account is None and row.caller:
        account = next((a for a in policy.accounts.values()
                        if a.owns_caller_id(row.caller)), None)
    return account


def _policy_or_none(args: argparse.Namespace) -> Any:
    """The policy when one is configured and valid (it rates calls the ledger lacks)."""
    return try_policy(args)


def _unmatched_rater(args: argparse.Namespace) -> Callable[[CdrRow], Decimal | None]:
    policy = _policy_or_none(args)

    def rated(row: CdrRow) -> Decimal | None:
        account = _account_of(policy, row) if policy is not None else None
        if account is None:
            return None
        from agent.rating import rate

        tariff = account.tariff.for_destination(account.normalize(row.destination))
        return rate(tariff, row.billsec)

    return rated


async def _reconcile(args: argparse.Namespace) -> int:
    zone = _zone(args.timezone)
    first, last = parse_period(args.start, args.end)
    assert first is not None and last is not None  # both are required options
    start, end = day_start(first, zone), day_start(last + timedelta(days=1), zone)
    path, layout = _layout(args, zone)
    reading = read_rows(path, layout, start, end)
    merged = reading.rows
    outbound = _outbound_rule(args)
    rater = _unmatched_rater(args)
    node = args.node
    if node is None:  # the node whose PBX wrote the file: the agent config's, if any
        config = agent_config(args)
        node = config.node if config is not None else None

    def in_period(row: CdrRow) -> bool:
        when = row.when
        return when is not None and start <= when < end

    operator = operator_name(args) if args.apply else ""
    ledger = await open_store(args)  # an existing ledger only
    applied: list[str] = []  # calls a correction posting was made for
    confirmed: list[str] = []  # provisional calls charged right already: billsec recorded
    refused: list[dict[str, str]] = []  # corrections the ledger would not take, and why
    try:
        lines, rows_by_id = await _match(ledger, merged, start, end, node, in_period,
                                         outbound, rater)
        if args.apply:
            for line in lines:
                row = rows_by_id.get(line.call_id)
                if row is None or line.matched_by != "call_id":
                    continue
                cdr = await ledger.call_cdr(line.call_id)
                if cdr is None or cdr.pbx_billsec is not None or not is_provisional(cdr):
                    continue
                result = await apply_row(ledger, row, source=str(path), operator=operator)
                if result.outcome is Outcome.CORRECTED and result.cdr is not None:
                    # A provisional charge that was right already: the PBX billsec is
                    # recorded, nothing is posted, and it is no correction to count.
                    (applied if result.cdr.correction else confirmed).append(line.call_id)
                elif result.outcome in (Outcome.REFUSED, Outcome.CONFLICT):
                    refused.append({"call_id": line.call_id, "why": result.why})
            if applied or confirmed:
                lines, rows_by_id = await _match(ledger, merged, start, end, node, in_period,
                                                 outbound, rater)
    except LedgerError as exc:
        raise UsageError(str(exc)) from None
    finally:
        await ledger.close()
    shown = lines if args.all else [x for x in lines if x.kind is not Kind.EQUAL]
    counts = summary(lines)
    unexplained = sum(1 for x in lines if x.unexplained) + reading.unreadable
    report = {"file": str(path), "layout": layout.name, "from": first.isoformat(),
              "to": last.isoformat(), "timezone": args.timezone, "currency": CURRENCY,
              "rows": reading.parsed, "calls": len(lines), "counts": counts,
              "unreadable_rows": reading.errors,
              "unreadable_not_listed": reading.unreadable - len(reading.errors),
              "applied": applied, "confirmed": confirmed, "refused": refused,
              "unexplained": unexplained}
    if args.json:
        print_json({**report, "lines": [_line_json(x) for x in shown]})
    elif args.csv:
        _csv(shown)
    else:
        _text(report, shown, zone)
    if args.json or args.csv:
        for error in reading.errors:
            print(f"callgate: unreadable CDR row: {error}", file=sys.stderr)
        if report["unreadable_not_listed"]:
            print(f"callgate: and {report['unreadable_not_listed']} more unreadable CDR "
                  "row(s)", file=sys.stderr)
    return 1 if unexplained else 0


async def _match(
    ledger: Ledger, rows: list[CdrRow], start: datetime, end: datetime, node: str | None,
    in_period: Callable[[CdrRow], bool], outbound: Callable[[CdrRow], bool],
    rater: Callable[[CdrRow], Decimal | None],
) -> tuple[list[Line], dict[str, CdrRow]]:
    period: list[Cdr] = []
    for balance in await ledger.balances():
        period.extend(await ledger.cdrs(balance.account, start, end))
    if node:
        period = [c for c in period if c.node == node]
    records: dict[str, CallRecord] = {}
    cdrs: dict[str, Cdr] = {c.call_id: c for c in period}
    for call_id in {*(r.call_id for r in rows if in_period(r)), *cdrs}:
        record = await ledger.get_call(call_id)
        if record is None or (node and record.node != node):
            continue
        records[call_id] = record
        if call_id not in cdrs:
            cdr = await ledger.call_cdr(call_id)
            if cdr is not None:
                cdrs[call_id] = cdr
    lines = reconcile(rows, records, cdrs, period, in_period=in_period, outbound=outbound,
                      unmatched_amount=rater)
    return lines, {r.call_id: r for r in rows}


def _money(amount: Decimal | None) -> str:
    return "-" if amount is None else format_amount(amount)


def _exact(amount: Decimal | None) -> str | None:
    """An amount as JSON and CSV carry it, as every other command's: the minor unit's
    places (``0.1300``, ``-0.1300``), exact when finer (:func:`agent.money.fixed`)."""
    return None if amount is None else fixed(amount)


def _line_json(x: Line) -> dict[str, Any]:
    return {"kind": x.kind.value, "unexplained": x.unexplained, "call_id": x.call_id,
            "account": x.account, "caller": x.caller, "callee": x.callee,
            "answered_at": x.answered_at, "pbx_billsec": x.pbx_billsec,
            "ledger_billsec": x.ledger_billsec, "pbx_amount": _exact(x.pbx_amount),
            "ledger_amount": _exact(x.ledger_amount), "difference": _exact(x.difference),
            "flags": list(x.flags), "matched_by": x.matched_by, "note": x.note}


HEADERS = ["KIND", "CALL", "ACCOUNT", "CALLEE", "ANSWERED", "PBX BILLSEC", "LEDGER BILLSEC",
           "PBX AMOUNT", "LEDGER AMOUNT", "NOTE"]


def _cells(x: Line, zone: tzinfo) -> list[str]:
    answered = x.answered_at.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S") \
        if x.answered_at else "-"
    return [x.kind.value, x.call_id, x.account or "-", x.callee or "-", answered,
            "-" if x.pbx_billsec is None else str(x.pbx_billsec),
            "-" if x.ledger_billsec is None else str(x.ledger_billsec),
            _money(x.pbx_amount), _money(x.ledger_amount),
            x.note + (" (matched by number)" if x.matched_by == "number" else "")]


def _csv(lines: list[Line]) -> None:
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(["kind", "unexplained", "call_id", "account", "caller", "callee",
                  "answered_at", "pbx_billsec", "ledger_billsec", "pbx_amount",
                  "ledger_amount", "difference", "flags", "matched_by", "note"])
    for x in lines:
        out.writerow([x.kind.value, "yes" if x.unexplained else "no", x.call_id, x.account,
                      x.caller, x.callee, x.answered_at.isoformat() if x.answered_at else "",
                      "" if x.pbx_billsec is None else x.pbx_billsec,
                      "" if x.ledger_billsec is None else x.ledger_billsec,
                      _exact(x.pbx_amount) or "", _exact(x.ledger_amount) or "",
                      _exact(x.difference) or "",
                      ",".join(x.flags), x.matched_by, x.note])


def _text(report: dict[str, Any], lines: list[Line], zone: tzinfo) -> None:
    from agent.cli.ledger import _table

    print(f"Reconciliation of {report['file']} ({report['layout']}) with the ledger, "
          f"{report['from']} to {report['to']} (times in {report['timezone']}, "
          f"amounts in {CURRENCY})")
    counts = report["counts"]
    print(f"{report['calls']} call(s): " + ", ".join(
        f"{n} {kind}" for kind, n in counts.items() if n))
    if report["applied"]:
        print(f"applied {len(report['applied'])} correction(s) from the PBX's CDR")
    if report["confirmed"]:
        print(f"recorded the PBX billsec of {len(report['confirmed'])} provisional call(s) "
              "charged right already (nothing posted)")
    for item in report["refused"]:
        print(f"not applied to {item['call_id']}: {item['why']}")
    for error in report["unreadable_rows"]:
        print(f"unreadable row: {error}")
    if report["unreadable_not_listed"]:
        print(f"and {report['unreadable_not_listed']} more unreadable row(s)")
    if lines:
        print()
        print(_table(HEADERS, [_cells(x, zone) for x in lines], {5, 6, 7, 8}))
    print()
    if report["unexplained"]:
        print(f"{report['unexplained']} unexplained line(s)")
    else:
        print("nothing unexplained")
