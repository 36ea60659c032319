"""Compliance records in the ledger: complaints, live do-not-call entries, suspensions.

Types and the rules both backends share (pure); the storage work is in
:mod:`agent.ledger._sqlite_compliance` and :mod:`agent.ledger._pg_compliance`.

What can never happen:

1. A complaint's fine is posted at most once per ticket: the ticket is the
   complaint's key and the penalty's reference (``complaint:<ticket>``); the same
   ticket again with the same content is a replay (nothing posted), with other
   content an :class:`~agent.ledger.model.IdempotencyConflict`.
2. A withdrawn complaint's fine is reversed by a posting (a positive
   adjustment, reference ``complaint-withdrawn:<ticket>``), never by deleting one.
3. Recording a complaint puts its callee on the account's live do-not-call list
   in the same transaction, so no node can call that number once the complaint
   is committed and its in-memory copy has caught up.
4. Every change to the live do-not-call list gets the next number of one
   ordered change log (``seq``), committed in that order (PostgreSQL serialises
   these writes with a transaction-scoped advisory lock; SQLite has one writer),
   so a node that has applied every change up to ``seq`` has exactly the list.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from agent.gate.dnc import MAX_DIGITS
from agent.ledger._rules import NOTE_LIMIT, REF_LIMIT
from agent.ledger.model import IdempotencyConflict, RefusedOperation

GLOBAL = ""  # the account of a do-not-call entry that applies to every account
DNC_LOCK = 0x63670064_6E63  # advisory lock id serialising DNC writes (PostgreSQL)


def penalty_ref(ticket: str) -> str:
    return f"complaint:{ticket}"


def reversal_ref(ticket: str) -> str:
    return f"complaint-withdrawn:{ticket}"


@dataclass(frozen=True, slots=True)
class Complaint:
    ticket: str
    account: str
    callee: str
    at: datetime  # when the complained-of call or complaint happened
    fine: Decimal  # the penalty posted (0: none)
    operator: str
    note: str
    recorded_at: datetime
    withdrawn_at: datetime | None = None
    withdrawn_by: str | None = None
    withdraw_note: str = ""

    @property
    def withdrawn(self) -> bool:
        return self.withdrawn_at is not None


@dataclass(frozen=True, slots=True)
class ComplaintOutcome:
    complaint: Complaint
    created: bool  # False: the same ticket again (a replay: nothing written)
    complaints_in_period: int = 0  # not withdrawn, within the policy's period
    suspended: bool = False  # this complaint suspended the account


@dataclass(frozen=True, slots=True)
class SuspendRule:
    """``complaints: {suspend_after: N, period: 30d}`` of the policy."""

    suspend_after: int
    period: timedelta

    def due(self, complaints_in_period: int) -> bool:
        return complaints_in_period >= self.suspend_after

    def describe(self, count: int) -> str:
        days = self.period / timedelta(days=1)
        span = f"{days:g} days" if days >= 1 else f"{int(self.period.total_seconds())} s"
        return f"{count} complaints within {span} (policy: suspend after {self.suspend_after})"


@dataclass(frozen=True, slots=True)
class DncEntry:
    account: str  # GLOBAL ("") for everyone
    number: str
    reason: str
    operator: str
    added_at: datetime
    seq: int


@dataclass(frozen=True, slots=True)
class DncChange:
    seq: int
    account: str
    number: str
    added: bool  # False: removed


@dataclass(frozen=True, slots=True)
class Suspension:
    account: str
    reason: str
    operator: str
    at: datetime


@dataclass(frozen=True, slots=True)
class AccountEvent:
    """One line of an account's suspend/resume history."""

    account: str
    action: str  # "suspend" | "resume"
    reason: str
    operator: str
    at: datetime


def check_number(number: str) -> str:
    if not number.isdigit() or len(number) > MAX_DIGITS:
        raise RefusedOperation(f"{number!r} is not a phone number (digits only, at most "
                               f"{MAX_DIGITS})")
    return number


def check_text(value: str, what: str) -> str:
    if not value or not value.strip():
        raise RefusedOperation(f"{what} is required and must not be blank")
    return check_note(value, what)


def check_note(value: str, what: str = "a note") -> str:
    if len(value) > NOTE_LIMIT:
        raise RefusedOperation(f"{what} is {len(value)} characters; at most {NOTE_LIMIT}")
    return value


# A ticket becomes a posting reference ("complaint-withdrawn:<ticket>"), so it must
# fit a reference with that prefix.
TICKET_LIMIT = REF_LIMIT - len("complaint-withdrawn:")


def check_ticket(ticket: str) -> str:
    check_text(ticket, "a ticket")
    if len(ticket) > TICKET_LIMIT or not ticket.isprintable() or ticket != ticket.strip():
        raise RefusedOperation(f"ticket {ticket[:TICKET_LIMIT]!r} must be printable, without "
                               f"leading or trailing blanks, at most {TICKET_LIMIT} characters")
    return ticket


def complaint_replay(stored: Complaint, account: str, callee: str, at: datetime,
                     note: str) -> None:
    """The same ticket again: a replay if it says the same, else a conflict."""
    if (stored.account, stored.callee, stored.at, stored.note) != (account, callee, at, note):
        raise IdempotencyConflict(
            f"ticket {stored.ticket!r} is already recorded for account {stored.account!r}, "
            f"callee {stored.callee} at {stored.at.isoformat()} with other content; "
            "a ticket is recorded once"
        )
