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
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from agent.cli.common import (
    OpenedLedger,
    UsageError,
    account_zone,
    load_policy,
    now,
    operator_name,
    print_json,
)
from agent.ledger import Balance, Cdr, Posting, PostingKind, UnknownAccount
from agent.money import CURRENCY, AmountError, clip, format_amount, parse_amount

_Opened = OpenedLedger  # this module's earlier name for it
ACCOUNT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # the policy's account ids

# The kinds finance posts; MONEY_KINDS move the balance and have a statement total.
MONEY_KINDS = (PostingKind.TOPUP, PostingKind.PENALTY, PostingKind.REFUND,
               PostingKind.ADJUSTMENT)
FINANCE_KINDS = (*MONEY_KINDS, PostingKind.REOPEN)
# A statement also lists the corrections from the PBX's CDR (posted by the agent or by
# `ledger reconcile --apply`), each with its own line and total.
STATEMENT_KINDS = (*FINANCE_KINDS, PostingKind.CORRECTION)


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
def _amount(text: str, *, signed: bool = False) -> Decimal:
    try:
        return parse_amount(text, allow_negative=signed)
    except AmountError as exc:
        raise UsageError(str(exc)) from None


def _check_text(args: argparse.Namespace) -> None:
    """Account, reference and note as finance typed them: sane before the ledger opens."""
    from agent.ledger._rules import NOTE_LIMIT, REF_LIMIT

    if not ACCOUNT_ID.fullmatch(args.account):
        raise UsageError(f"{clip(args.account)!r} is not an account id (letters, digits, "
                         "'_', '.', '-'; at most 64)")
    if not args.ref.strip():
        raise UsageError("--ref must not be blank")
    if len(args.ref) > REF_LIMIT or not args.ref.isprintable():
        raise UsageError(f"--ref {clip(args.ref)!r} must be printable and at most "
                         f"{REF_LIMIT} characters")
    note = getattr(args, "note", None) or getattr(args, "reason", None) or ""
    if len(note) > NOTE_LIMIT:
        raise UsageError(f"the note/reason is {len(note)} characters; at most {NOTE_LIMIT}")


def _posting_json(p: Posting) -> dict[str, Any]:
    return {"id": p.id, "account": p.account, "kind": p.kind.value, "amount": signed(p),
            "at": p.at, "ref": p.ref, "key": p.key, "call_id": p.call_id, "note": p.note,
            "operator": p.operator}


def _balance_json(b: Balance) -> dict[str, Any]:
    return {"account": b.account, "posted": b.posted, "held": b.held,
            "available": b.available, "closed": b.closed}


def _money(amount: Decimal) -> str:
    return format_amount(amount)


def signed(p: Posting) -> Decimal:
    """A posting's amount as every output shows it: signed by its effect on the balance.

    Holds and releases do not move the balance; they are shown as they are (history).
    """
    if p.kind in (PostingKind.HOLD, PostingKind.RELEASE):
        return p.amount
    return balance_effect(p)


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


def _local(at: datetime, zone: tzinfo) -> str:
    return at.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")


# -- finance commands ------------------------------------------------------------------
async def _finance(args: argparse.Namespace, kind: PostingKind) -> int:
    # Everything the user wrote is checked before the ledger is even opened.
    amount = None
    if kind in (PostingKind.TOPUP, PostingKind.PENALTY, PostingKind.ADJUSTMENT):
        amount = _amount(args.amount, signed=kind is PostingKind.ADJUSTMENT)
    _check_text(args)
    operator = operator_name(args)
    at = now()
    async with OpenedLedger(args) as ledger:
        if kind is PostingKind.TOPUP:
            assert amount is not None
            minimum = await _first_topup_minimum(args, ledger, args.account)
            posting = await ledger.topup(
                args.account, amount, ref=args.ref, at=at, note=args.note,
                first_minimum=minimum, operator=operator,
            )
        elif kind is PostingKind.PENALTY:
            assert amount is not None
            posting = await ledger.penalty(
                args.account, amount, ref=args.ref, at=at, note=args.reason, operator=operator)
        elif kind is PostingKind.ADJUSTMENT:
            assert amount is not None
            posting = await ledger.adjust(
                args.account, amount, ref=args.ref, at=at, note=args.reason, operator=operator)
        elif kind is PostingKind.REOPEN:
            posting = await ledger.reopen(
                args.account, ref=args.ref, at=at, note=args.note, operator=operator)
        else:
            posting = await ledger.refund(
                args.account, ref=args.ref, at=at, note=args.note, operator=operator)
        balance = await ledger.balance(args.account)
    replayed = posting.at != at  # the same request was recorded before: nothing new written
    if args.json:
        print_json({**_posting_json(posting), "replayed": replayed,
                    "balance": _balance_json(balance)})
        return 0
    verb = {PostingKind.TOPUP: "topped up", PostingKind.PENALTY: "fined",
            PostingKind.REFUND: "refunded", PostingKind.ADJUSTMENT: "adjusted",
            PostingKind.REOPEN: "reopened"}[kind]
    shown = "" if kind is PostingKind.REOPEN else f" {_money(signed(posting))} {CURRENCY}"
    print(f"{args.account}: {verb}{shown} (ref {posting.ref}, by {posting.operator or '-'})"
          + (" — already recorded, nothing new written" if replayed else ""))
    print(f"  balance {_money(balance.posted)}  held {_money(balance.held)}  "
          f"available {_money(balance.available)}" + ("  (closed)" if balance.closed else ""))
    return 0


async def _first_topup_minimum(args: argparse.Namespace, ledger: Any, account: str) -> Decimal:
    """The policy's first top-up minimum for an account the ledger does not have yet.

    An account the ledger has needs no policy (it may have left it). A new one
    must be in a valid policy: that is what catches a mistyped account name.
    """
    try:
        await ledger.balance(account)
    except UnknownAccount:
        pass
    else:
        return Decimal(0)
    policy = load_policy(args)
    if account not in policy.accounts:
        known = ", ".join(sorted(policy.accounts)) or "none"
        raise UsageError(f"unknown account {clip(account)!r}: not in the ledger, and "
                         f"the policy has: {clip(known, 200)}")
    return policy.prepaid.first_topup_minimum


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

    if args.at:
        return await balance_as_of(args)
    names = account_names(args)
    async with OpenedLedger(args) as ledger:
        if args.account:
            balances = [await ledger.balance(args.account)]
        else:
            balances = await ledger.balances()
    if args.json:
        named = [{**_balance_json(b), "name": names.get(b.account)} for b in balances]
        print_json(named[0] if args.account else {"accounts": named})
        return 0
    if not balances:
        print("no accounts in the ledger yet")
        return 0
    rows = [[b.account, names.get(b.account, ""), _money(b.posted), _money(b.held),
             _money(b.available), "closed" if b.closed else "open"] for b in balances]
    print(_table(["ACCOUNT", "NAME", "BALANCE", "HELD", "AVAILABLE", "STATUS"], rows, {2, 3, 4}))
    return 0


def _day(text: str, what: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a date (YYYY-MM-DD)") from None


def _start_of(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def _since(text: str, zone: ZoneInfo) -> datetime:
    if len(text) == 10:
        return _start_of(_day(text, "--since"), zone)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since {text!r} is neither a date nor an ISO time") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=zone)).astimezone(UTC)


async def _history(args: argparse.Namespace) -> int:
    zone = account_zone(args, args.account, args.tz)
    since = _since(args.since, zone) if args.since else None
    async with OpenedLedger(args) as ledger:
        postings = await ledger.history(args.account, since)
    if args.json:
        print_json({"account": args.account, "timezone": str(zone),
                    "postings": [_posting_json(p) for p in postings]})
        return 0
    rows = [[_local(p.at, zone), p.kind.value, _money(signed(p)), p.ref, p.operator or "-",
             p.note] for p in postings]
    print(f"{args.account}: {len(postings)} posting(s), times in {zone}")
    if rows:
        print(_table(["TIME", "KIND", "AMOUNT", "REF", "OPERATOR", "NOTE"], rows, {2}))
    return 0


# -- statement ----------------------------------------------------------------------------
def balance_effect(p: Posting) -> Decimal:
    """How a posting moves the account's balance (holds and releases do not)."""
    if p.kind in (PostingKind.TOPUP, PostingKind.ADJUSTMENT):
        return p.amount
    if p.kind in (PostingKind.PENALTY, PostingKind.REFUND, PostingKind.CHARGE,
                  PostingKind.CORRECTION):  # a correction is signed like a charge
        return -p.amount
    return Decimal(0)


@dataclass(frozen=True)
class Statement:
    account: str
    zone: ZoneInfo
    first_day: date
    last_day: date
    opening: Decimal
    calls: list[Cdr]
    postings: list[Posting]  # finance postings of the period
    totals: dict[str, Decimal]
    closing: Decimal
    running: dict[str, Decimal] = field(default_factory=dict)  # "call:ID"/"KIND:REF" -> after
    name: str = ""  # the customer's name, from the policy


def build_statement(
    account: str, zone: ZoneInfo, first_day: date, last_day: date,
    history: list[Posting], cdrs: list[Cdr],
) -> Statement:
    """The period's lines and totals; closing = opening + the period's movements, exactly."""
    start, end = _start_of(first_day, zone), _start_of(last_day + timedelta(days=1), zone)
    opening = sum((balance_effect(p) for p in history if p.at < start), Decimal(0))
    period = [p for p in history if start <= p.at < end]
    finance = [p for p in period if p.kind in STATEMENT_KINDS]
    # Every total is signed by its effect on the balance: closing = opening + their sum.
    totals = {kind.value: sum((balance_effect(p) for p in finance if p.kind is kind),
                              Decimal(0)) for kind in (*MONEY_KINDS, PostingKind.CORRECTION)}
    totals["calls"] = -sum((c.amount for c in cdrs), Decimal(0))
    closing = opening + sum(totals.values(), Decimal(0))
    # Each call is charged in one posting dated its CDR's end, so the postings of the
    # period must give the same closing balance; if not, the store needs an audit.
    from_postings = opening + sum((balance_effect(p) for p in period), Decimal(0))
    if closing != from_postings:
        raise UsageError(
            f"the statement does not add up ({_money(closing)} from the CDRs, "
            f"{_money(from_postings)} from the postings); run an audit of the ledger"
        )
    from agent.ledger.report import ReportError, account_report

    try:
        lines = account_report(account, start, end, history, cdrs).lines
    except ReportError as exc:
        raise UsageError(str(exc)) from None
    running = {(f"call:{x.reference}" if x.kind == "call" else f"{x.kind}:{x.reference}"):
               x.balance for x in lines}
    return Statement(account, zone, first_day, last_day, opening, cdrs, finance, totals,
                     closing, running)


async def _statement(args: argparse.Namespace) -> int:
    zone = account_zone(args, args.account, args.tz)
    async with OpenedLedger(args) as ledger:
        history = await ledger.history(args.account)
        first_day = (_day(args.start, "--from") if args.start
                     else (history[0].at.astimezone(zone).date() if history
                           else now().astimezone(zone).date()))
        last_day = _day(args.end, "--to") if args.end else now().astimezone(zone).date()
        if last_day < first_day:
            raise UsageError(f"--to {last_day} is before --from {first_day}")
        start = _start_of(first_day, zone)
        end = _start_of(last_day + timedelta(days=1), zone)
        cdrs = await ledger.cdrs(args.account, start, end)
    statement = build_statement(args.account, zone, first_day, last_day, history, cdrs)
    from agent.cli.report import account_names

    statement = replace(statement, name=account_names(args).get(args.account, ""))
    if args.json:
        print_json(_statement_json(statement))
    elif args.csv:
        _statement_csv(statement)
    else:
        _statement_text(statement)
    return 0


def _cdr_json(c: Cdr) -> dict[str, Any]:
    return {"call_id": c.call_id, "caller": c.caller, "callee": c.callee,
            "answered_at": c.answered_at, "ended_at": c.ended_at, "billsec": c.billsec,
            "billed_seconds": c.billed_seconds, "amount": -c.amount, "cut_off": c.cut_off,
            "cause": c.cause, "flags": list(c.flags), "pbx_billsec": c.pbx_billsec,
            # its correction from the PBX's CDR (also a posting line), and the two together
            "correction": -c.correction, "final_amount": -c.charged}


def _statement_json(s: Statement) -> dict[str, Any]:
    return {"account": s.account, "name": s.name or None, "timezone": str(s.zone),
            "from": s.first_day.isoformat(),
            "to": s.last_day.isoformat(), "currency": CURRENCY, "opening": s.opening,
            "calls": [{**_cdr_json(c), "balance": s.running.get(f"call:{c.call_id}")}
                      for c in s.calls],
            "postings": [{**_posting_json(p), "balance": s.running.get(f"{p.kind.value}:{p.ref}")}
                         for p in s.postings],
            "totals": s.totals, "closing": s.closing}


def _statement_text(s: Statement) -> None:
    who = f"{s.account} ({s.name})" if s.name else s.account
    print(f"Statement for {who}, {s.first_day} to {s.last_day} "
          f"(times in {s.zone}, amounts in {CURRENCY})")
    print()
    print(f"Calls: {len(s.calls)}")
    if s.calls:
        # The PBX's billsec is shown once a call of the period was settled from its CDR.
        pbx = any(c.pbx_billsec is not None for c in s.calls)
        rows = [[_local(c.answered_at, s.zone) if c.answered_at else "-", c.caller, c.callee,
                 str(c.billsec),
                 *(["-" if c.pbx_billsec is None else str(c.pbx_billsec)] if pbx else []),
                 str(c.billed_seconds), _money(-c.amount),
                 _money(s.running[f"call:{c.call_id}"]),
                 "cut off" if c.cut_off else "", _flags(c)] for c in s.calls]
        headers = ["ANSWERED", "CALLER", "CALLEE", "BILLSEC", *(["PBX BILLSEC"] if pbx else []),
                   "BILLED", "AMOUNT", "BALANCE", "CUT-OFF", "FLAGS"]
        print(_table(headers, rows, {3, 4, 5, 6, 7} if pbx else {3, 4, 5, 6}))
    print()
    print(f"Other postings: {len(s.postings)}")
    if s.postings:
        rows = [[_local(p.at, s.zone), p.kind.value, _money(signed(p)),
                 _balance_after(s, p), p.ref, p.operator or "-", p.note] for p in s.postings]
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


def _flags(c: Cdr) -> str:
    """The CDR's flags; a call settled from the PBX's CDR says so (its correction, if any,
    is a posting line of its own)."""
    flags = list(c.flags)
    if c.pbx_billsec is not None:
        effect = -c.correction
        flags.append(f"pbx_billsec={c.pbx_billsec}")
        flags.append(f"corrected {'+' if effect > 0 else ''}{_money(effect)}" if effect
                     else "pbx_cdr_confirmed")
    return ",".join(flags)


def _balance_after(s: Statement, p: Posting) -> str:
    """The running balance after a posting; a reopen (zero, no money) shows none."""
    after = s.running.get(f"{p.kind.value}:{p.ref}")
    return "" if after is None else _money(after)


def _statement_csv(s: Statement) -> None:
    """One row per movement in time order (a call at its end) with its signed effect and the
    balance after it: opening + rows = closing."""
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(["type", "time", "caller", "callee", "billsec", "billed_seconds",
                  "amount", "cut_off", "reference", "note", "operator", "balance"])
    out.writerow(["opening", _local(_start_of(s.first_day, s.zone), s.zone), "", "", "", "",
                  str(s.opening), "", "", "", "", str(s.opening)])
    rows: list[tuple[datetime, int, list[Any]]] = []
    for c in s.calls:
        rows.append((c.ended_at, 0, [
            "call", _local(c.answered_at or c.ended_at, s.zone), c.caller, c.callee, c.billsec,
            c.billed_seconds, str(-c.amount), "yes" if c.cut_off else "no", c.call_id,
            _flags(c), "", str(s.running.get(f"call:{c.call_id}", ""))]))
    for p in s.postings:
        after = s.running.get(f"{p.kind.value}:{p.ref}")
        rows.append((p.at, p.id, [
            p.kind.value, _local(p.at, s.zone), "", "", "", "", str(signed(p)), "", p.ref,
            p.note, p.operator, "" if after is None else str(after)]))
    for *_, row in sorted(rows, key=lambda r: (r[0], r[1])):
        out.writerow(row)
    end = _start_of(s.last_day + timedelta(days=1), s.zone)
    out.writerow(["closing", _local(end, s.zone), "", "", "", "", str(s.closing), "", "", "",
                  "", str(s.closing)])
