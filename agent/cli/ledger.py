"""``callgate ledger …``: finance staff's commands (top-up, fines, refunds, statements).

Every refusal — an amount that is not a positive exact sum, an account the
policy does not know, a reused reference, a first top-up below the policy's
minimum, a refund while calls are in progress — is exit 2 with one line on
stderr, raised before or instead of the ledger write, so nothing is written.
The rules themselves are :mod:`agent.finance`'s, shared with the web console;
this module only parses arguments and prints. ``--json`` prints one object with
amounts as strings. Dates are days in the account's timezone (the policy's).
Each posting records the login name of whoever ran the command as its operator.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import os
import sys
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from agent import finance
from agent.cli.common import UsageError, ledger_url, load_policy, now, print_json
from agent.ledger import Ledger, LedgerError, PostingKind, open_ledger
from agent.money import CURRENCY, format_amount


def register(sub: Any) -> None:
    ledger = sub.add_parser("ledger", help="top up, fine, refund; balances and statements")
    commands = ledger.add_subparsers(dest="ledger_command", required=True,
                                     parser_class=type(ledger))

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

    adjust = commands.add_parser("adjust", help="correct a balance by a signed amount")
    adjust.add_argument("account")
    adjust.add_argument("amount", help="signed amount, e.g. -12.50 or 3")
    adjust.add_argument("--ref", required=True)
    adjust.add_argument("--reason", required=True, help="why (kept with the posting)")
    adjust.add_argument("--json", action="store_true")
    adjust.set_defaults(func=_adjust)

    balance = commands.add_parser("balance", help="balances: posted, held, available")
    balance.add_argument("account", nargs="?")
    balance.add_argument("--json", action="store_true")
    balance.set_defaults(func=_balance)

    history = commands.add_parser("history", help="an account's postings")
    history.add_argument("account")
    history.add_argument("--since", help="DATE (YYYY-MM-DD, the account's timezone) or ISO time")
    history.add_argument("--json", action="store_true")
    history.set_defaults(func=_history)

    statement = commands.add_parser(
        "statement", help="calls and postings of a period, with totals that add up")
    statement.add_argument("account")
    statement.add_argument("--from", dest="start", required=True, help="first day, YYYY-MM-DD")
    statement.add_argument("--to", dest="end", required=True,
                           help="last day, YYYY-MM-DD (included)")
    output = statement.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true")
    output.add_argument("--json", action="store_true")
    statement.set_defaults(func=_statement)


# -- shared helpers ------------------------------------------------------------------
def _policy_account(args: argparse.Namespace, account: str) -> tuple[Any, ZoneInfo]:
    """The loaded policy and the account's timezone; an account it lacks is refused."""
    policy = load_policy(args)
    return policy, finance.policy_zone(policy, account)


class _Opened:
    """``async with _Opened(args) as ledger``: ledger errors become one-line usage errors."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.url = ledger_url(args)
        self.ledger: Ledger | None = None

    async def __aenter__(self) -> Ledger:
        try:
            self.ledger = await open_ledger(self.url)
        except LedgerError as exc:
            raise UsageError(str(exc)) from None
        return self.ledger

    async def __aexit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if self.ledger is not None:
            await self.ledger.close()
        if isinstance(exc, LedgerError):
            raise UsageError(str(exc)) from None


def _money(amount: Decimal) -> str:
    return format_amount(amount)


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: set[int]) -> str:
    """Aligned columns; the columns in ``right`` (amounts, counts) right-aligned."""
    rows = [list(r) for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


# -- finance commands ------------------------------------------------------------------
async def _finance(args: argparse.Namespace, kind: PostingKind) -> int:
    # Everything the user wrote is checked before the ledger is even opened.
    note = args.reason if kind in (PostingKind.PENALTY, PostingKind.ADJUSTMENT) else args.note
    req = finance.request(kind, args.account, getattr(args, "amount", None), args.ref, note)
    policy, _ = _policy_account(args, args.account)
    async with _Opened(args) as ledger:
        result = await finance.post(ledger, policy, req, at=now(), operator=_login())
    if args.json:
        print_json(finance.result_json(result))
        return 0
    posting, balance = result.posting, result.balance
    print(f"{args.account}: {finance.VERBS[kind]} {_money(posting.amount)} {CURRENCY} "
          f"(ref {posting.ref})"
          + (" — already recorded, nothing new written" if result.replayed else ""))
    print(f"  balance {_money(balance.posted)}  held {_money(balance.held)}  "
          f"available {_money(balance.available)}" + ("  (closed)" if balance.closed else ""))
    return 0


def _login() -> str:
    """Who runs the command, recorded as the posting's operator."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (a bare container)
        return f"uid:{os.getuid()}"


async def _topup(args: argparse.Namespace) -> int:
    return await _finance(args, PostingKind.TOPUP)


async def _penalty(args: argparse.Namespace) -> int:
    return await _finance(args, PostingKind.PENALTY)


async def _refund(args: argparse.Namespace) -> int:
    return await _finance(args, PostingKind.REFUND)


async def _adjust(args: argparse.Namespace) -> int:
    return await _finance(args, PostingKind.ADJUSTMENT)


# -- reading commands --------------------------------------------------------------------
async def _balance(args: argparse.Namespace) -> int:
    async with _Opened(args) as ledger:
        if args.account:
            balances = [await ledger.balance(args.account)]
        else:
            balances = await ledger.balances()
    if args.json:
        if args.account:
            print_json(finance.balance_json(balances[0]))
        else:
            print_json({"accounts": [finance.balance_json(b) for b in balances]})
        return 0
    if not balances:
        print("no accounts in the ledger yet")
        return 0
    rows = [[b.account, _money(b.posted), _money(b.held), _money(b.available),
             "closed" if b.closed else "open"] for b in balances]
    print(_table(["ACCOUNT", "BALANCE", "HELD", "AVAILABLE", "STATUS"], rows, {1, 2, 3}))
    return 0


async def _history(args: argparse.Namespace) -> int:
    _, zone = _policy_account(args, args.account)
    since = finance.since(args.since, zone) if args.since else None
    async with _Opened(args) as ledger:
        postings = await ledger.history(args.account, since)
    if args.json:
        print_json({"account": args.account, "timezone": str(zone),
                    "postings": [finance.posting_json(p) for p in postings]})
        return 0
    rows = [[finance.local(p.at, zone), p.kind.value, _money(p.amount), p.ref, p.note]
            for p in postings]
    print(f"{args.account}: {len(postings)} posting(s), times in {zone}")
    if rows:
        print(_table(["TIME", "KIND", "AMOUNT", "REF", "NOTE"], rows, {2}))
    return 0


# -- statement ----------------------------------------------------------------------------
async def _statement(args: argparse.Namespace) -> int:
    policy = load_policy(args)
    finance.policy_zone(policy, args.account)
    finance.period(args.start, args.end)
    async with _Opened(args) as ledger:
        statement = await finance.statement(ledger, policy, args.account, args.start, args.end)
    if args.json:
        print_json(finance.statement_json(statement))
    elif args.csv:
        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerows(finance.csv_rows(statement))
    else:
        _statement_text(statement)
    return 0


def _statement_text(s: finance.Statement) -> None:
    print(f"Statement for {s.account}, {s.first_day} to {s.last_day} "
          f"(times in {s.zone}, amounts in {CURRENCY})")
    print()
    print(f"Calls: {len(s.calls)}")
    if s.calls:
        rows = [[finance.local(c.answered_at, s.zone) if c.answered_at else "-", c.caller, c.callee,
                 str(c.billsec), str(c.billed_seconds), _money(c.amount),
                 "cut off" if c.cut_off else "", ",".join(c.flags)] for c in s.calls]
        print(_table(["ANSWERED", "CALLER", "CALLEE", "BILLSEC", "BILLED", "AMOUNT",
                      "CUT-OFF", "FLAGS"], rows, {3, 4, 5}))
    print()
    print(f"Other postings: {len(s.postings)}")
    if s.postings:
        rows = [[finance.local(p.at, s.zone), p.kind.value, _money(p.amount), p.ref, p.note]
                for p in s.postings]
        print(_table(["TIME", "KIND", "AMOUNT", "REF", "NOTE"], rows, {2}))
    print()
    t = s.totals
    rows = [
        ["opening balance", _money(s.opening)],
        ["+ top-ups", _money(t["topup"])],
        ["- calls", _money(t["calls"])],
        ["- penalties", _money(t["penalty"])],
        ["- refunds", _money(t["refund"])],
        ["± adjustments", _money(t["adjustment"])],
        ["closing balance", _money(s.closing)],
    ]
    print(_table(["TOTALS", "AMOUNT"], rows, {1}))
