"""Compliance actions as typed: the checks behind ``callgate complaint|dnc|account`` and the web.

The CLI (agent/cli/complaint.py, dnc.py, account.py) and the finance console
(agent/web) both call these, so an account, a callee, a ticket, a time or a
reason is accepted or refused the same way, with the same one-line message,
wherever it was typed. A refusal is :class:`~agent.finance.Refused` (the CLI's
exit 2, an HTTP 400; :class:`~agent.finance.NotFound`, an account the policy
lacks, a 404), raised before the ledger is written. What the ledger refuses
itself (a ticket or number it cannot store, a ticket reused with other content)
is a :class:`~agent.ledger.LedgerError` the caller maps the same way.

Compliance actions act on accounts the gate knows: the policy is required
(unlike finance postings, which work from the ledger alone). Pure: the policy
and the clock are passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from agent.days import DayError, parse_instant
from agent.finance import NotFound, Refused
from agent.gate.dnc import dnc_number
from agent.gate.numbers import Normalizer
from agent.ledger import LedgerError
from agent.ledger.compliance import (
    GLOBAL,
    Complaint,
    DncEntry,
    SuspendRule,
    check_note,
    typed_ticket,
)
from agent.money import clip

T = TypeVar("T")


def checked(what: str, check: Callable[..., T], *args: Any) -> T:
    """A shared rule's refusal of what was typed (ValueError, a ledger refusal) as a
    refusal naming the option: one line, before the ledger is written."""
    try:
        return check(*args)
    except (ValueError, LedgerError) as exc:
        raise Refused(f"{what}: {exc}") from None


def policy_account(policy: Any, account: str) -> ZoneInfo:
    """The account's timezone; an account the policy lacks is refused."""
    entry = policy.accounts.get(account)
    if entry is None:
        known = ", ".join(sorted(policy.accounts)) or "none"
        raise NotFound(f"unknown account {clip(account)!r} (the policy has: {clip(known)})")
    zone: ZoneInfo = entry.hours.timezone
    return zone


def at_time(text: str | None, zone: ZoneInfo, now: datetime) -> datetime | None:
    """``--at`` in UTC: an ISO time or a day (naive: in the account's zone), inside the
    calendar range every command accepts, not in the future; None without it (the ledger
    dates the complaint when it records it: a retry is a replay). Blank is refused."""
    if text is None:
        return None
    try:
        at = parse_instant(text, zone, "--at")
    except DayError as exc:
        raise Refused(str(exc)) from None
    if at > now + timedelta(minutes=5):
        raise Refused(f"--at {clip(text)} is in the future")
    return at


def not_blank(text: str, what: str) -> str:
    if not text.strip():
        raise Refused(f"{what} must not be blank")
    return text


def one_line(text: str, what: str) -> str:
    """A note or reason as typed: the ledger's rule (one line, at most its limit), with the
    ledger's message, but refused as bad input (exit 2, HTTP 400) before the ledger is
    written, so the API answers it as it answers every other malformed field."""
    try:
        return check_note(text, what)
    except LedgerError as exc:
        raise Refused(str(exc)) from None


@dataclass(frozen=True)
class ComplaintRequest:
    """A checked ``complaint add``: what the ledger's ``add_complaint`` is given."""

    account: str
    callee: str  # normalised with the account's number rules
    ticket: str
    at: datetime | None  # None: when the ledger records it
    note: str
    fine: Decimal  # the policy's prepaid.complaint_penalty
    suspend: SuspendRule | None  # the policy's complaints: {suspend_after, period}


def complaint(policy: Any, account: str, callee: str, ticket: str, at: str | None,
              note: str, now: datetime) -> ComplaintRequest:
    """Check a complaint as typed, in the CLI's order: ticket, account, callee, time."""
    typed = checked("--ticket", typed_ticket, ticket)
    zone = policy_account(policy, account)
    number = checked("--callee", dnc_number, callee, policy.accounts[account].normalize)
    return ComplaintRequest(account, number, typed, at_time(at, zone, now),
                            one_line(note, "a note"),
                            policy.prepaid.complaint_penalty, policy.complaints)


def dnc_target(policy: Any, account: str | None, number: str) -> tuple[str, str]:
    """(account, or GLOBAL for everyone when ``account`` is None; the normalised number)."""
    if account is None:
        scope, normalize = GLOBAL, policy.normalize or Normalizer()
    else:
        policy_account(policy, account)
        scope, normalize = account, policy.accounts[account].normalize
    return scope, checked("number", dnc_number, number, normalize)


# -- one JSON shape for the CLI's --json and the API ---------------------------------------
def complaint_json(c: Complaint) -> dict[str, Any]:
    return {"ticket": c.ticket, "account": c.account, "callee": c.callee, "at": c.at,
            "fine": c.fine, "operator": c.operator, "note": c.note,
            "recorded_at": c.recorded_at, "withdrawn": c.withdrawn,
            "withdrawn_at": c.withdrawn_at, "withdrawn_by": c.withdrawn_by,
            "withdraw_note": c.withdraw_note}


def entry_json(e: DncEntry) -> dict[str, Any]:
    return {"account": e.account or None, "number": e.number, "reason": e.reason,
            "operator": e.operator, "added_at": e.added_at, "seq": e.seq}
