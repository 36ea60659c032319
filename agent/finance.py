"""Finance actions and statements: the one set of rules behind the CLI and the web console.

``callgate ledger …`` and the HTTP API / web pages both call these functions, so
an amount, a reference, an account or a period is accepted or refused the same
way, with the same one-line message, wherever it was typed. A refusal is
:class:`Refused` (the CLI's exit status 2, an HTTP 4xx), raised before the
ledger write, so nothing is written; what the ledger itself refuses (a reused
reference, a first top-up below the minimum, a refund while calls are up, a
posting on a closed account) is a :class:`~agent.ledger.LedgerError` the
caller maps the same way.

The ledger's accounts are finance's, whatever the policy says today: every
action but a new account's first top-up (which needs the policy's minimum, and
is what catches a mistyped account name) works from the ledger alone. The
policy is therefore passed as a callable, asked only when needed. Every amount
shown (JSON, CSV) is signed by its effect on the balance, and carried in JSON and
CSV as the ledger's fixed-point string (:func:`agent.money.fixed`: ``-0.1300``).

A finance posting is idempotent by its reference: :func:`post` tells a replay
(the same request again: the original posting comes back, nothing is written)
from a new posting by the time the ledger recorded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from agent import days
from agent.ledger import Balance, Cdr, Ledger, Posting, PostingKind, UnknownAccount
from agent.money import CURRENCY, AmountError, clip, fixed, format_amount, parse_amount

# The kinds finance posts; MONEY_KINDS move the balance and have a statement total.
MONEY_KINDS = (PostingKind.TOPUP, PostingKind.PENALTY, PostingKind.REFUND,
               PostingKind.ADJUSTMENT)
FINANCE_KINDS = (*MONEY_KINDS, PostingKind.REOPEN)
# A statement also lists the corrections from the PBX's CDR (posted by the agent or by
# `ledger reconcile --apply`), each with its own line and total.
STATEMENT_KINDS = (*FINANCE_KINDS, PostingKind.CORRECTION)
PolicySource = Callable[[], Any]  # the policy, loaded (and checked) only when asked
ACCOUNT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # the policy's account ids


class Refused(Exception):
    """Input the rules refuse: one line for the user, nothing written."""


class NotFound(Refused):
    """A refusal naming something that does not exist (an account nobody knows)."""


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


def zone(policy: Any | None, account: str, named: str | None = None) -> ZoneInfo:
    """The timezone an account's days and times are shown in.

    ``named`` (``--tz``) when given; else the account's zone in the policy; else
    (an account no longer in the policy, or no valid policy) UTC, which the
    output names.
    """
    if named:
        try:
            return ZoneInfo(named)
        except (KeyError, ValueError, OSError):  # ZoneInfoNotFoundError is a KeyError
            raise Refused(f"--tz {clip(named)!r} is not an IANA timezone "
                          "(e.g. Asia/Shanghai)") from None
    entry = policy.accounts.get(account) if policy is not None else None
    found: ZoneInfo = entry.hours.timezone if entry is not None else ZoneInfo("UTC")
    return found


def day(text: str, what: str) -> date:
    """A day typed by a person (:func:`agent.days.parse_day`: the CLI's reading too)."""
    try:
        return days.parse_day(text, what)
    except days.DayError as exc:
        raise Refused(str(exc)) from None


def start_of(when: date, where: ZoneInfo) -> datetime:
    return days.day_start(when, where)


def since(text: str, where: ZoneInfo) -> datetime:
    try:
        return days.parse_instant(text, where, "--since")
    except days.DayError as exc:
        raise Refused(str(exc)) from None


# -- finance postings ------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """One checked finance action: everything the user wrote, before the ledger is opened."""

    kind: PostingKind
    account: str
    amount: Decimal | None  # None for a refund (the ledger pays out what is available), reopen
    ref: str
    note: str = ""


def request(kind: PostingKind, account: str, amount_text: str | None, ref: str,
            note: str = "") -> Request:
    """Check a finance action as typed; :class:`Refused` names the first thing wrong.

    The amount first, then the account id, the reference and the note: sane
    before the ledger is opened.
    """
    from agent.ledger._rules import NOTE_LIMIT, REF_LIMIT

    if kind not in FINANCE_KINDS:
        raise Refused(f"{kind.value} is not a finance action")
    value = None
    if kind in (PostingKind.TOPUP, PostingKind.PENALTY, PostingKind.ADJUSTMENT):
        value = amount(amount_text or "", signed=kind is PostingKind.ADJUSTMENT)
    if not ACCOUNT_ID.fullmatch(account):
        raise Refused(f"{clip(account)!r} is not an account id (letters, digits, "
                      "'_', '.', '-'; at most 64)")
    # Blanks around a reference are dropped (as around a complaint's ticket): a pasted
    # "BANK-42 " and a retried "BANK-42" are the same posting, never two.
    ref = reference(ref).strip()
    if len(ref) > REF_LIMIT or not ref.isprintable():
        raise Refused(f"--ref {clip(ref)!r} must be printable and at most "
                      f"{REF_LIMIT} characters")
    if len(note) > NOTE_LIMIT:
        raise Refused(f"the note/reason is {len(note)} characters; at most {NOTE_LIMIT}")
    if not note.isprintable():  # a newline or a control character breaks every listing
        raise Refused(f"the note/reason {clip(note)!r} must be one line of printable text")
    if kind is PostingKind.ADJUSTMENT and not note.strip():
        raise Refused("an adjustment needs a reason (--reason): say why the balance changes")
    return Request(kind, account, value, ref, note)


async def first_topup_minimum(ledger: Ledger, account: str, policy: PolicySource) -> Decimal:
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
    loaded = policy()
    if account not in loaded.accounts:
        known = ", ".join(sorted(loaded.accounts)) or "none"
        raise NotFound(f"unknown account {clip(account)!r}: not in the ledger, and "
                       f"the policy has: {clip(known, 200)}")
    minimum: Decimal = loaded.prepaid.first_topup_minimum
    return minimum


@dataclass(frozen=True)
class Result:
    posting: Posting
    balance: Balance
    replayed: bool  # the same request was recorded before: nothing new written


async def post(ledger: Ledger, req: Request, *, at: datetime, operator: str,
               policy: PolicySource) -> Result:
    """Write one checked request and read the balance after it."""
    a, ref, note = req.account, req.ref, req.note
    if req.kind is PostingKind.TOPUP:
        assert req.amount is not None
        minimum = await first_topup_minimum(ledger, a, policy)
        posting = await ledger.topup(a, req.amount, ref=ref, at=at, note=note,
                                     first_minimum=minimum, operator=operator)
    elif req.kind is PostingKind.PENALTY:
        assert req.amount is not None
        posting = await ledger.penalty(a, req.amount, ref=ref, at=at, note=note,
                                       operator=operator)
    elif req.kind is PostingKind.ADJUSTMENT:
        assert req.amount is not None
        posting = await ledger.adjust(a, req.amount, ref=ref, at=at, note=note,
                                      operator=operator)
    elif req.kind is PostingKind.REOPEN:
        posting = await ledger.reopen(a, ref=ref, at=at, note=note, operator=operator)
    else:
        posting = await ledger.refund(a, ref=ref, at=at, note=note, operator=operator)
    balance = await ledger.balance(a)
    return Result(posting, balance, replayed=posting.at != at)


VERBS = {PostingKind.TOPUP: "topped up", PostingKind.PENALTY: "fined",
         PostingKind.REFUND: "refunded", PostingKind.ADJUSTMENT: "adjusted",
         PostingKind.REOPEN: "reopened"}


def summary(r: Result) -> str:
    """One line on what a posting did, e.g. ``topped up 100.00 CNY (ref B1, by anna)``."""
    p = r.posting
    shown = "" if p.kind is PostingKind.REOPEN else f" {format_amount(signed(p))} {CURRENCY}"
    return (f"{VERBS[p.kind]}{shown} (ref {p.ref}, by {p.operator or '-'})"
            + (" — already recorded, nothing new written" if r.replayed else ""))


# -- statements --------------------------------------------------------------------------
def balance_effect(p: Posting) -> Decimal:
    """How a posting moves the account's balance (holds and releases do not)."""
    if p.kind in (PostingKind.TOPUP, PostingKind.ADJUSTMENT):
        return p.amount
    if p.kind in (PostingKind.PENALTY, PostingKind.REFUND, PostingKind.CHARGE,
                  PostingKind.CORRECTION):  # a correction is signed like a charge
        return -p.amount
    return Decimal(0)


def signed(p: Posting) -> Decimal:
    """A posting's amount as every output shows it: signed by its effect on the balance.

    Holds and releases do not move the balance; they are shown as they are (history).
    """
    if p.kind in (PostingKind.HOLD, PostingKind.RELEASE):
        return p.amount
    return balance_effect(p)


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
    account: str, where: ZoneInfo, first_day: date, last_day: date,
    history: list[Posting], cdrs: list[Cdr],
) -> Statement:
    """The period's lines and totals; closing = opening + the period's movements, exactly."""
    start, end = start_of(first_day, where), start_of(last_day + timedelta(days=1), where)
    opening = sum((balance_effect(p) for p in history if p.at < start), Decimal(0))
    in_period = [p for p in history if start <= p.at < end]
    # In time order: a posting may be written after one it precedes (a correction from a
    # late CDR, a back-dated top-up), and the ledger's history is in the order written.
    finance = sorted((p for p in in_period if p.kind in STATEMENT_KINDS),
                     key=lambda p: (p.at, p.id))
    # Every total is signed by its effect on the balance: closing = opening + their sum.
    totals = {kind.value: sum((balance_effect(p) for p in finance if p.kind is kind),
                              Decimal(0)) for kind in (*MONEY_KINDS, PostingKind.CORRECTION)}
    totals["calls"] = -sum((c.amount for c in cdrs), Decimal(0))
    closing = opening + sum(totals.values(), Decimal(0))
    # Each call is charged in one posting dated its CDR's end, so the postings of the
    # period must give the same closing balance; if not, the store needs an audit.
    from_postings = opening + sum((balance_effect(p) for p in in_period), Decimal(0))
    if closing != from_postings:
        raise Refused(
            f"the statement does not add up ({format_amount(closing)} from the CDRs, "
            f"{format_amount(from_postings)} from the postings); run an audit of the ledger"
        )
    from agent.ledger.report import ReportError, account_report

    try:
        lines = account_report(account, start, end, history, cdrs).lines
    except ReportError as exc:
        raise Refused(str(exc)) from None
    running = {(f"call:{x.reference}" if x.kind == "call" else f"{x.kind}:{x.reference}"):
               x.balance for x in lines}
    return Statement(account, where, first_day, last_day, opening, cdrs, finance, totals,
                     closing, running)


async def statement(ledger: Ledger, account: str, where: ZoneInfo, start: str | None,
                    end: str | None, today: datetime, name: str = "") -> Statement:
    """Read and build a statement; the period defaults to the first posting until today."""
    history = await ledger.history(account)
    first_day = (day(start, "--from") if start
                 else (history[0].at.astimezone(where).date() if history
                       else today.astimezone(where).date()))
    last_day = day(end, "--to") if end else today.astimezone(where).date()
    if last_day < first_day:
        raise Refused(f"--to {last_day} is before --from {first_day}")
    cdrs = await ledger.cdrs(account, start_of(first_day, where),
                             start_of(last_day + timedelta(days=1), where))
    return replace(build_statement(account, where, first_day, last_day, history, cdrs),
                   name=name)


def local(at: datetime, where: ZoneInfo) -> str:
    return at.astimezone(where).strftime("%Y-%m-%d %H:%M:%S")


CSV_HEADER = ("type", "time", "caller", "callee", "billsec", "billed_seconds", "amount",
              "cut_off", "reference", "note", "operator", "balance")


def balance_after(s: Statement, p: Posting) -> Decimal | None:
    """The running balance after a posting; a reopen (zero, no money) has none."""
    return s.running.get(f"{p.kind.value}:{p.ref}")


def csv_rows(s: Statement) -> Iterator[list[Any]]:
    """One row per movement in time order (a call at its end) with its signed effect and the
    balance after it: opening + rows = closing."""
    yield list(CSV_HEADER)
    yield ["opening", local(start_of(s.first_day, s.zone), s.zone), "", "", "", "",
           fixed(s.opening), "", "", "", "", fixed(s.opening)]
    rows: list[tuple[datetime, int, list[Any]]] = []
    for c in s.calls:
        rows.append((c.ended_at, 0, [
            "call", local(c.answered_at or c.ended_at, s.zone), c.caller, c.callee, c.billsec,
            c.billed_seconds, fixed(-c.amount), "yes" if c.cut_off else "no", c.call_id,
            call_flags(c), "", _fixed_or_blank(s.running.get(f"call:{c.call_id}"))]))
    for p in s.postings:
        after = balance_after(s, p)
        rows.append((p.at, p.id, [
            p.kind.value, local(p.at, s.zone), "", "", "", "", fixed(signed(p)), "", p.ref,
            p.note, p.operator, _fixed_or_blank(after)]))
    for *_, row in sorted(rows, key=lambda r: (r[0], r[1])):
        yield row
    end = start_of(s.last_day + timedelta(days=1), s.zone)
    yield ["closing", local(end, s.zone), "", "", "", "", fixed(s.closing), "", "", "", "",
           fixed(s.closing)]


def _fixed_or_blank(amount: Decimal | None) -> str:
    return "" if amount is None else fixed(amount)


# -- one JSON shape for the CLI's --json and the API ---------------------------------------
def posting_json(p: Posting) -> dict[str, Any]:
    return {"id": p.id, "account": p.account, "kind": p.kind.value, "amount": signed(p),
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
            "billed_seconds": c.billed_seconds, "amount": -c.amount, "cut_off": c.cut_off,
            "cause": c.cause, "flags": list(c.flags), "pbx_billsec": c.pbx_billsec,
            # its correction from the PBX's CDR (also a posting line), and the two together
            "correction": -c.correction, "final_amount": -c.charged}


def call_flags(c: Cdr) -> str:
    """The CDR's flags; a call settled from the PBX's CDR says so (its correction, if any,
    is a posting line of its own)."""
    flags = list(c.flags)
    if c.pbx_billsec is not None:
        effect = -c.correction
        flags.append(f"pbx_billsec={c.pbx_billsec}")
        flags.append(f"corrected {'+' if effect > 0 else ''}{format_amount(effect)}" if effect
                     else "pbx_cdr_confirmed")
    return ",".join(flags)


def statement_json(s: Statement) -> dict[str, Any]:
    return {"account": s.account, "name": s.name or None, "timezone": str(s.zone),
            "from": s.first_day.isoformat(),
            "to": s.last_day.isoformat(), "currency": CURRENCY, "opening": s.opening,
            "calls": [{**cdr_json(c), "balance": s.running.get(f"call:{c.call_id}")}
                      for c in s.calls],
            "postings": [{**posting_json(p), "balance": balance_after(s, p)}
                         for p in s.postings],
            "totals": s.totals, "closing": s.closing}


# -- month-end: every account over a period (``callgate ledger report``) --------------------
@dataclass(frozen=True)
class Directory:
    """Names and timezones of the policy's accounts ({} and UTC when there is no policy)."""

    names: dict[str, str]
    zones: dict[str, ZoneInfo]
    fallback: ZoneInfo
    override: bool = False

    def name(self, account: str) -> str:
        return self.names.get(account, "")

    def zone(self, account: str) -> ZoneInfo:
        return self.fallback if self.override else self.zones.get(account, self.fallback)

    def label(self, account: str) -> str:
        name = self.name(account)
        return f"{account} ({name})" if name else account


def directory_of(policy: Any | None, override: ZoneInfo | None = None) -> Directory:
    if policy is None:
        return Directory({}, {}, override or ZoneInfo("UTC"), override is not None)
    names = {a: p.name for a, p in policy.accounts.items()}
    zones = {a: p.hours.timezone for a, p in policy.accounts.items()}
    return Directory(names, zones, override or ZoneInfo("UTC"), override is not None)


def report_days(start: str, end: str) -> tuple[date, date]:
    """A report's first and last day (both required, included)."""
    try:
        first, last = days.parse_period(start, end)
    except days.DayError as exc:
        raise Refused(str(exc)) from None
    assert first is not None and last is not None
    return first, last


async def gather(ledger: Ledger, d: Directory, first: date, last: date,
                 only: str | None = None) -> list[tuple[Any, list[Any]]]:
    """Each ledger account's report and flagged calls for the period, in its own zone."""
    from agent.ledger.report import ReportError, account_report, flagged

    out = []
    for b in await ledger.balances():
        if only is not None and b.account != only:
            continue
        where = d.zone(b.account)
        start, end = start_of(first, where), start_of(last + timedelta(days=1), where)
        history = await ledger.history(b.account)
        if not history or min(p.at for p in history) >= end:
            continue  # the account did not exist yet in this period
        cdrs = await ledger.cdrs(b.account, start, end)
        try:
            report = account_report(b.account, start, end, history, cdrs)
        except ReportError as exc:
            raise Refused(str(exc)) from None
        out.append((report, flagged(b.account, start, end, history, cdrs)))
    return out


REPORT_COLUMNS = [("opening", "OPENING"), ("topups", "TOP-UPS"), ("calls", "CALLS"),
                  ("billed_seconds", "BILLED S"), ("calls_amount", "CALL AMOUNT"),
                  ("penalties", "PENALTIES"), ("refunds", "REFUNDS"),
                  ("adjustments", "ADJUSTMENTS"), ("corrections", "CORRECTIONS"),
                  ("closing", "CLOSING")]


def report_json(reports: list[Any], grand: dict[str, Decimal | int], d: Directory,
                first: date, last: date) -> dict[str, Any]:
    return {
        "from": first.isoformat(), "to": last.isoformat(), "currency": CURRENCY,
        "accounts": [{"account": r.account, "name": d.name(r.account) or None,
                      "timezone": str(d.zone(r.account)), "start": r.start, "end": r.end,
                      **{f: getattr(r, f) for f, _ in REPORT_COLUMNS}} for r in reports],
        "totals": grand,
    }


def utc(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


REPORT_CSV_HEADER = ["time", "account", "name", "currency", "type", "amount", "balance",
                     "reference", "caller", "callee", "billsec", "billed_seconds", "flags",
                     "note"]


def report_csv_rows(reports: list[Any], d: Directory) -> list[list[str]]:
    """Per account an ``opening`` row, one row per movement, a ``closing`` row; time order.

    ``amount`` is the signed effect on the balance, ``balance`` the account's
    balance after the row, so per account: opening + amounts = closing.
    """
    money = fixed  # JSON's and every CSV's amount format
    rows: list[tuple[datetime, int, str, list[str]]] = []
    for r in reports:
        name = d.name(r.account)
        rows.append((r.start, 0, r.account, [utc(r.start), r.account, name, CURRENCY, "opening",
                                             "", money(r.opening), "", "", "", "", "", "", ""]))
        for i, line in enumerate(r.lines, start=1):
            c = line.cdr
            rows.append((line.at, i, r.account, [
                utc(line.at), r.account, name, CURRENCY, line.kind, money(line.amount),
                money(line.balance), line.reference, c.caller if c else "",
                c.callee if c else "", str(c.billsec) if c else "",
                str(c.billed_seconds) if c else "", ",".join(c.flags) if c else "",
                "" if c else line.note]))
        rows.append((r.end, len(r.lines) + 1, r.account, [
            utc(r.end), r.account, name, CURRENCY, "closing", "", money(r.closing), "", "", "",
            "", "", "", ""]))
    rows.sort(key=lambda row: (row[0], row[2], row[1]))
    return [REPORT_CSV_HEADER, *(cells for *_, cells in rows)]
