"""Finance actions and statements, the one set of rules behind the CLI and the web console.

``callgate ledger …`` and the HTTP API / web pages both call these functions, so
an amount, a reference, an account or a period is accepted or refused the same
way, with the same one-line message, wherever it was typed. A refusal is
:class:`Refused` (the CLI's exit status 2, an HTTP 4xx), raised before the
ledger write, so nothing is written; what the ledger itself refuses (a reused
reference, a first top-up below the minimum, a refund while calls are up) is a
:class:`~agent.ledger.LedgerError` the caller maps the same way.

A finance posting is idempotent by its reference: :func:`post` tells a replay
(the same request again: the original posting comes back, nothing is written)
from a new posting by the time the ledger recorded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from agent.ledger import Balance, Cdr, Ledger, Posting, PostingKind
from agent.money import CURRENCY, AmountError, format_amount, parse_amount

FINANCE_KINDS = (PostingKind.TOPUP, PostingKind.PENALTY, PostingKind.REFUND,
                 PostingKind.ADJUSTMENT)


class Refused(Exception):
    """Input the rules refuse: one line for the user, nothing written."""


class NotFound(Refused):
    """A refusal naming something that does not exist (an account the policy lacks)."""


# -- the checks ------------------------------------------------------------------------
def amount(text: str, *, signed: bool = False) -> Decimal:
    """A positive exact amount (signed, non-zero, for an adjustment)."""
    try:
        return parse_amount(text, allow_negative=signed)
    except AmountError as exc:
        raise Refused(str(exc)) from None


def reference(ref: str) -> str:
    if not ref.strip():
        raise Refused("--ref must not be blank")
    return ref


def policy_zone(policy: Any, account: str) -> ZoneInfo:
    """The account's timezone from the policy; an account the policy lacks is refused."""
    entry = policy.accounts.get(account)
    if entry is None:
        known = ", ".join(sorted(policy.accounts)) or "none"
        raise NotFound(f"unknown account {account!r} (the policy has: {known})")
    zone: ZoneInfo = entry.hours.timezone
    return zone


def day(text: str, what: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise Refused(f"{what} {text!r} is not a date (YYYY-MM-DD)") from None


def period(start: str, end: str) -> tuple[date, date]:
    """The first and last day (included) of a statement; ``--to`` before ``--from`` refused."""
    first_day, last_day = day(start, "--from"), day(end, "--to")
    if last_day < first_day:
        raise Refused(f"--to {last_day} is before --from {first_day}")
    return first_day, last_day


def start_of(when: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(when, time(0), tzinfo=zone).astimezone(UTC)


def since(text: str, zone: ZoneInfo) -> datetime:
    if len(text) == 10:
        return start_of(day(text, "--since"), zone)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise Refused(f"--since {text!r} is neither a date nor an ISO time") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=zone)).astimezone(UTC)


# -- finance postings ------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """One checked finance action: everything the user wrote, before the ledger is opened."""

    kind: PostingKind
    account: str
    amount: Decimal | None  # None for a refund: the ledger pays out what is available
    ref: str
    note: str = ""


def request(kind: PostingKind, account: str, amount_text: str | None, ref: str,
            note: str = "") -> Request:
    """Check a finance action as typed; :class:`Refused` names the first thing wrong."""
    if kind not in FINANCE_KINDS:
        raise Refused(f"{kind.value} is not a finance action")
    value = None
    if kind is not PostingKind.REFUND:
        value = amount(amount_text or "", signed=kind is PostingKind.ADJUSTMENT)
    reference(ref)
    if kind is PostingKind.ADJUSTMENT and not note.strip():
        raise Refused("an adjustment needs a reason (--reason)")
    return Request(kind, account, value, ref, note)


@dataclass(frozen=True)
class Result:
    posting: Posting
    balance: Balance
    replayed: bool  # the same request was recorded before: nothing new written


async def post(ledger: Ledger, policy: Any, req: Request, *, at: datetime,
               operator: str = "") -> Result:
    """Write one checked request (the account must be the policy's) and read the balance."""
    policy_zone(policy, req.account)
    if req.kind is PostingKind.TOPUP:
        assert req.amount is not None
        posting = await ledger.topup(
            req.account, req.amount, ref=req.ref, at=at, note=req.note, operator=operator,
            first_minimum=policy.prepaid.first_topup_minimum)
    elif req.kind is PostingKind.PENALTY:
        assert req.amount is not None
        posting = await ledger.penalty(req.account, req.amount, ref=req.ref, at=at,
                                       note=req.note, operator=operator)
    elif req.kind is PostingKind.ADJUSTMENT:
        assert req.amount is not None
        posting = await ledger.adjust(req.account, req.amount, ref=req.ref, at=at,
                                      note=req.note, operator=operator)
    else:
        posting = await ledger.refund(req.account, ref=req.ref, at=at, note=req.note,
                                      operator=operator)
    balance = await ledger.balance(req.account)
    return Result(posting, balance, replayed=posting.at != at)


VERBS = {PostingKind.TOPUP: "topped up", PostingKind.PENALTY: "fined",
         PostingKind.REFUND: "refunded", PostingKind.ADJUSTMENT: "adjusted"}


# -- statements --------------------------------------------------------------------------
def balance_effect(p: Posting) -> Decimal:
    """How a posting moves the account's balance (holds and releases do not)."""
    if p.kind in (PostingKind.TOPUP, PostingKind.ADJUSTMENT):
        return p.amount
    if p.kind in (PostingKind.PENALTY, PostingKind.REFUND, PostingKind.CHARGE):
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


def build_statement(
    account: str, zone: ZoneInfo, first_day: date, last_day: date,
    history: list[Posting], cdrs: list[Cdr],
) -> Statement:
    """The period's lines and totals; closing = opening + the period's movements, exactly."""
    start, end = start_of(first_day, zone), start_of(last_day + timedelta(days=1), zone)
    opening = sum((balance_effect(p) for p in history if p.at < start), Decimal(0))
    in_period = [p for p in history if start <= p.at < end]
    finance = [p for p in in_period if p.kind in FINANCE_KINDS]
    totals = {kind.value: sum((p.amount for p in finance if p.kind is kind), Decimal(0))
              for kind in FINANCE_KINDS}
    totals["calls"] = sum((c.amount for c in cdrs), Decimal(0))
    closing = (opening + totals["topup"] - totals["penalty"] - totals["refund"]
               + totals["adjustment"] - totals["calls"])
    # Each call is charged in one posting dated its CDR's end, so the postings of the
    # period must give the same closing balance; if not, the store needs an audit.
    from_postings = opening + sum((balance_effect(p) for p in in_period), Decimal(0))
    if closing != from_postings:
        raise Refused(
            f"the statement does not add up ({format_amount(closing)} from the CDRs, "
            f"{format_amount(from_postings)} from the postings); run an audit of the ledger"
        )
    return Statement(account, zone, first_day, last_day, opening, cdrs, finance, totals,
                     closing)


async def statement(ledger: Ledger, policy: Any, account: str, start: str,
                    end: str) -> Statement:
    """Check the account and the period, read them and build the statement."""
    zone = policy_zone(policy, account)
    first_day, last_day = period(start, end)
    history = await ledger.history(account)
    cdrs = await ledger.cdrs(account, start_of(first_day, zone),
                             start_of(last_day + timedelta(days=1), zone))
    return build_statement(account, zone, first_day, last_day, history, cdrs)


def local(at: datetime, zone: ZoneInfo) -> str:
    return at.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")


CSV_HEADER = ("type", "time", "caller", "callee", "billsec", "billed_seconds", "amount",
              "cut_off", "reference", "note")


def csv_rows(s: Statement) -> Iterator[list[Any]]:
    """One row per movement with its signed effect: opening + rows = closing."""
    yield list(CSV_HEADER)
    yield ["opening", local(start_of(s.first_day, s.zone), s.zone), "", "", "", "",
           str(s.opening), "", "", ""]
    for c in s.calls:
        yield ["call", local(c.answered_at or c.ended_at, s.zone), c.caller, c.callee,
               c.billsec, c.billed_seconds, str(-c.amount), "yes" if c.cut_off else "no",
               c.call_id, ",".join(c.flags)]
    for p in s.postings:
        yield [p.kind.value, local(p.at, s.zone), "", "", "", "", str(balance_effect(p)),
               "", p.ref, p.note]
    end = start_of(s.last_day + timedelta(days=1), s.zone)
    yield ["closing", local(end, s.zone), "", "", "", "", str(s.closing), "", "", ""]


# -- one JSON shape for the CLI's --json and the API ---------------------------------------
def posting_json(p: Posting) -> dict[str, Any]:
    return {"id": p.id, "account": p.account, "kind": p.kind.value, "amount": p.amount,
            "at": p.at, "ref": p.ref, "key": p.key, "call_id": p.call_id, "note": p.note,
            "operator": p.operator}


def balance_json(b: Balance) -> dict[str, Any]:
    return {"account": b.account, "posted": b.posted, "held": b.held,
            "available": b.available, "closed": b.closed}


def result_json(r: Result) -> dict[str, Any]:
    return {**posting_json(r.posting), "replayed": r.replayed,
            "balance": balance_json(r.balance)}


def cdr_json(c: Cdr) -> dict[str, Any]:
    return {"call_id": c.call_id, "caller": c.caller, "callee": c.callee,
            "answered_at": c.answered_at, "ended_at": c.ended_at, "billsec": c.billsec,
            "billed_seconds": c.billed_seconds, "amount": c.amount, "cut_off": c.cut_off,
            "cause": c.cause, "flags": list(c.flags)}


def statement_json(s: Statement) -> dict[str, Any]:
    return {"account": s.account, "timezone": str(s.zone), "from": s.first_day.isoformat(),
            "to": s.last_day.isoformat(), "currency": CURRENCY, "opening": s.opening,
            "calls": [cdr_json(c) for c in s.calls],
            "postings": [posting_json(p) for p in s.postings],
            "totals": s.totals, "closing": s.closing}
