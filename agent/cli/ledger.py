"""``callgate ledger …``: finance staff's commands (top-up, fines, refunds, statements).

Every refusal — an amount that is not a plain exact sum, an account nobody
knows, a reused reference, a first top-up below the policy's minimum, a refund
while calls are in progress, a posting on a closed account — is a
:class:`UsageError` (exit 2, one line on stderr) raised before or instead of
the ledger write, so nothing is written. Only ``ledger init`` creates a ledger.

The ledger's accounts are finance's, whatever the policy says today: every
command but a new account's first top-up (which needs the policy's minimum)
works from the ledger alone, for an account removed from the policy and with an
invalid policy file. Each posting records its operator (``--operator``,
default the invoking user). Amounts are parsed by
:func:`agent.money.parse_amount`; every amount shown (text, JSON, CSV) is
signed by its effect on the balance. Dates are days in the account's timezone
(the policy's; ``--tz``; else UTC).

The rules themselves are :mod:`agent.finance`'s, shared with the web console;
this module parses arguments, opens the ledger and prints.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from agent import finance
from agent.cli.common import (
    OpenedLedger,
    UsageError,
    account_zone,
    load_policy,
    now,
    operator_name,
    print_json,
)
from agent.days import parse_instant, parse_period
from agent.finance import (
    FINANCE_KINDS,
    MONEY_KINDS,
    STATEMENT_KINDS,
    Statement,
    balance_effect,
    build_statement,
    signed,
)
from agent.ledger import PostingKind
from agent.money import CURRENCY, format_amount

_Opened = OpenedLedger  # this module's earlier name for it
# Helpers other command modules (complaint, dnc) import from here; the rules are finance's.
_day = finance.day
_local = finance.local
_start_of = finance.start_of
__all__ = ["FINANCE_KINDS", "MONEY_KINDS", "STATEMENT_KINDS", "Statement", "balance_effect",
           "build_statement", "register", "signed"]


def register(sub: Any) -> None:
    ledger = sub.add_parser("ledger", help="top up, fine, refund; balances and statements")
    commands = ledger.add_subparsers(dest="ledger_command", required=True,
                                     parser_class=type(ledger))

    init = commands.add_parser(
        "init", help="create the ledger (the only command besides run that may)")
    init.add_argument("--json", action="store_true")
    init.set_defaults(func=_init)

    topup = commands.add_parser("topup", help="credit a prepaid top-up")
    topup.add_argument("account")
    topup.add_argument("amount", help=f"amount in {CURRENCY}, e.g. 100 or 250.50")
    topup.add_argument("--ref", required=True, help="payment reference (idempotency key)")
    topup.add_argument("--note", default="", help="free text kept with the posting")
    topup.add_argument("--json", action="store_true")
    topup.set_defaults(func=_topup)

    penalty = commands.add_parser("penalty", help="post a fine (may take the balance below 0)")
    penalty.add_argument("account")
    penalty.add_argument("amount")
    penalty.add_argument("--ref", required=True, help="complaint reference (idempotency key)")
    penalty.add_argument("--reason", default="", help="why, e.g. the 12321 complaint number")
    penalty.add_argument("--json", action="store_true")
    penalty.set_defaults(func=_penalty)

    refund = commands.add_parser(
        "refund", help="pay out the available balance and close the account")
    refund.add_argument("account")
    refund.add_argument("--ref", required=True, help="payout reference (idempotency key)")
    refund.add_argument("--note", default="")
    refund.add_argument("--json", action="store_true")
    refund.set_defaults(func=_refund)

    reopen = commands.add_parser(
        "reopen", help="open a closed (refunded) account again, e.g. a returning customer")
    reopen.add_argument("account")
    reopen.add_argument("--ref", required=True, help="reference (idempotency key)")
    reopen.add_argument("--note", default="", help="why (kept with the posting)")
    reopen.add_argument("--json", action="store_true")
    reopen.set_defaults(func=_reopen)

    adjust = commands.add_parser("adjust", help="correct a balance by a signed amount")
    adjust.add_argument("account")
    adjust.add_argument("amount", help="signed amount, e.g. -12.50 or 3")
    adjust.add_argument("--ref", required=True)
    adjust.add_argument("--reason", required=True, help="why (kept with the posting)")
    adjust.add_argument("--json", action="store_true")
    adjust.set_defaults(func=_adjust)

    balance = commands.add_parser("balance", help="balances: posted, held, available")
    balance.add_argument("account", nargs="?")
    balance.add_argument("--at", help="as of a day's end (YYYY-MM-DD, the account's timezone) "
                                      "or an ISO time")
    balance.add_argument("--tz", help="with --at: read the day in this IANA zone "
                                      "(default: the account's)")
    balance.add_argument("--json", action="store_true")
    balance.set_defaults(func=_balance)

    history = commands.add_parser("history", help="an account's postings")
    history.add_argument("account")
    history.add_argument("--since", help="DATE (YYYY-MM-DD, the account's timezone) or ISO time")
    history.add_argument("--tz", help="show times in this IANA zone (default: the account's)")
    history.add_argument("--json", action="store_true")
    history.set_defaults(func=_history)

    statement = commands.add_parser(
        "statement", help="calls and postings of a period, with totals that add up")
    statement.add_argument("account")
    statement.add_argument("--from", dest="start",
                           help="first day, YYYY-MM-DD (default: the account's first posting)")
    statement.add_argument("--to", dest="end",
                           help="last day, YYYY-MM-DD, included (default: today)")
    statement.add_argument("--tz", help="days and times in this IANA zone "
                                        "(default: the account's)")
    output = statement.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true")
    output.add_argument("--json", action="store_true")
    statement.set_defaults(func=_statement)

    from agent.cli import report  # month-end views over every account: their own module

    report.register(commands)

    from agent.cli import reconcile  # its own module: the PBX's CDR against the ledger

    reconcile.register(commands)


# -- shared helpers ------------------------------------------------------------------
def _money(amount: Decimal) -> str:
    return format_amount(amount)


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: set[int]) -> str:
    """Aligned columns; the columns in ``right`` (amounts, counts) right-aligned.

    A cell is shown on one line whatever it holds: a newline or an escape sequence
    in a note written before notes were checked (or by another tool) is shown
    escaped (``\\n``), so it can neither break the table nor drive the terminal.
    """
    rows = [[_one_line(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _one_line(cell: str) -> str:
    if cell.isprintable():
        return cell
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in cell)


# -- finance commands ------------------------------------------------------------------
async def _finance(args: argparse.Namespace, kind: PostingKind) -> int:
    # Everything the user wrote is checked before the ledger is even opened.
    note = args.reason if kind in (PostingKind.PENALTY, PostingKind.ADJUSTMENT) else args.note
    req = finance.request(kind, args.account, getattr(args, "amount", None), args.ref, note)
    operator = operator_name(args)
    async with OpenedLedger(args) as ledger:
        result = await finance.post(ledger, req, at=now(), operator=operator,
                                    policy=lambda: load_policy(args))
    if args.json:
        print_json(finance.result_json(result))
        return 0
    balance = result.balance
    print(f"{args.account}: {finance.summary(result)}")
    print(f"  balance {_money(balance.posted)}  held {_money(balance.held)}  "
          f"available {_money(balance.available)}" + ("  (closed)" if balance.closed else ""))
    return 0


async def _topup(args: argparse.Namespace) -> int:
    return await _finance(args, PostingKind.TOPUP)


async def _penalty(args: argparse.Namespace) -> int:
    return await _finance(args, PostingKind.PENALTY)


async def _refund(args: argparse.Namespace) -> int:
    return await _finance(args, PostingKind.REFUND)


async def _adjust(args: argparse.Namespace) -> int:
    return await _finance(args, PostingKind.ADJUSTMENT)


async def _reopen(args: argparse.Namespace) -> int:
    return await _finance(args, PostingKind.REOPEN)


async def _init(args: argparse.Namespace) -> int:
    async with OpenedLedger(args, create=True) as ledger:
        created = bool(getattr(ledger, "created", False))
        where = str(getattr(ledger, "path", "") or getattr(ledger, "where", ""))
        unit = ledger.unit  # type: ignore[attr-defined]
    if args.json:
        print_json({"ledger": where, "created": created, "minor_unit": unit})
    elif created:
        print(f"created the ledger at {where} (minor unit {unit})")
    else:
        print(f"the ledger at {where} already exists (minor unit {unit}); nothing changed")
    return 0


# -- reading commands --------------------------------------------------------------------
async def _balance(args: argparse.Namespace) -> int:
    from agent.cli.report import account_names, balance_as_of

    if args.at is not None:
        return await balance_as_of(args)
    names = account_names(args)
    async with OpenedLedger(args) as ledger:
        if args.account is not None:
            balances = [await ledger.balance(args.account)]
        else:
            balances = await ledger.balances()
    if args.json:
        named = [{**finance.balance_json(b), "name": names.get(b.account)} for b in balances]
        print_json(named[0] if args.account is not None else {"accounts": named})
        return 0
    if not balances:
        print("no accounts in the ledger yet")
        return 0
    rows = [[b.account, names.get(b.account, ""), _money(b.posted), _money(b.held),
             _money(b.available), "closed" if b.closed else "open"] for b in balances]
    print(_table(["ACCOUNT", "NAME", "BALANCE", "HELD", "AVAILABLE", "STATUS"], rows, {2, 3, 4}))
    return 0


async def _history(args: argparse.Namespace) -> int:
    zone = account_zone(args, args.account, args.tz)
    since = None if args.since is None else parse_instant(args.since, zone, "--since")
    async with OpenedLedger(args) as ledger:
        postings = await ledger.history(args.account, since)
    if args.json:
        print_json({"account": args.account, "timezone": str(zone),
                    "postings": [finance.posting_json(p) for p in postings]})
        return 0
    rows = [[finance.local(p.at, zone), p.kind.value, _money(signed(p)), p.ref, p.operator or "-",
             p.note] for p in postings]
    print(f"{args.account}: {len(postings)} posting(s), times in {zone}")
    if rows:
        print(_table(["TIME", "KIND", "AMOUNT", "REF", "OPERATOR", "NOTE"], rows, {2}))
    return 0


# -- statement ----------------------------------------------------------------------------
async def _statement(args: argparse.Namespace) -> int:
    from agent.cli.report import account_names

    first, last = parse_period(args.start, args.end)  # refused before the ledger is opened
    zone = account_zone(args, args.account, args.tz)
    today = now().astimezone(zone).date()
    if first is not None and last is None and first > today:
        raise UsageError(f"--from {first} is after today ({today} in {zone}), the default "
                         "--to")
    name = account_names(args).get(args.account, "")
    async with OpenedLedger(args) as ledger:
        statement = await finance.statement(ledger, args.account, zone, args.start, args.end,
                                            now(), name)
    if args.json:
        print_json(finance.statement_json(statement))
    elif args.csv:
        csv.writer(sys.stdout, lineterminator="\n").writerows(finance.csv_rows(statement))
    else:
        _statement_text(statement)
    return 0


def _statement_text(s: Statement) -> None:
    who = f"{s.account} ({s.name})" if s.name else s.account
    print(f"Statement for {who}, {s.first_day} to {s.last_day} "
          f"(times in {s.zone}, amounts in {CURRENCY})")
    print()
    print(f"Calls: {len(s.calls)}")
    if s.calls:
        # The PBX's billsec is shown once a call of the period was settled from its CDR.
        pbx = any(c.pbx_billsec is not None for c in s.calls)
        rows = [[finance.local(c.answered_at, s.zone) if c.answered_at else "-", c.caller, c.callee,
                 str(c.billsec),
                 *(["-" if c.pbx_billsec is None else str(c.pbx_billsec)] if pbx else []),
                 str(c.billed_seconds), _money(-c.amount),
                 _money(s.running[f"call:{c.call_id}"]),
                 "cut off" if c.cut_off else "", finance.call_flags(c)] for c in s.calls]
        headers = ["ANSWERED", "CALLER", "CALLEE", "BILLSEC", *(["PBX BILLSEC"] if pbx else []),
                   "BILLED", "AMOUNT", "BALANCE", "CUT-OFF", "FLAGS"]
        print(_table(headers, rows, {3, 4, 5, 6, 7} if pbx else {3, 4, 5, 6}))
    print()
    print(f"Other postings: {len(s.postings)}")
    if s.postings:
        rows = [[finance.local(p.at, s.zone), p.kind.value, _money(signed(p)),
                 _after(s, p), p.ref, p.operator or "-", p.note] for p in s.postings]
        print(_table(["TIME", "KIND", "AMOUNT", "BALANCE", "REF", "OPERATOR", "NOTE"], rows,
                     {2, 3}))
    print()
    t = s.totals
    rows = [
        ["opening balance", _money(s.opening)],
        ["top-ups", _money(t["topup"])],
        ["calls", _money(t["calls"])],
        ["penalties", _money(t["penalty"])],
        ["refunds", _money(t["refund"])],
        ["adjustments", _money(t["adjustment"])],
        *([["corrections", _money(t["correction"])]]
          if any(p.kind is PostingKind.CORRECTION for p in s.postings) else []),
        ["closing balance", _money(s.closing)],
    ]
    print(_table(["TOTALS", "AMOUNT"], rows, {1}))


def _after(s: Statement, p: Any) -> str:
    after = finance.balance_after(s, p)
    return "" if after is None else _money(after)
