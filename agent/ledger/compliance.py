"""Compliance records in the ledger: complaints, live do-not-call entries, suspensions.

Types and the checks of what may be stored (pure; the CLI and the web console
call the same checks on what was typed). What each write does, step by step,
is :mod:`agent.ledger._compliance_rules`, shared by both backends; their
storage work (only SQL) is in :mod:`agent.ledger._sqlite_compliance` and
:mod:`agent.ledger._pg_compliance`.

What can never happen:

1. A complaint's fine is posted at most once per ticket: the ticket is the
   complaint's key and the penalty's reference (``complaint:<ticket>``); the same
   ticket again with the same content is a replay (nothing posted), with other
   content an :class:`~agent.ledger.model.IdempotencyConflict`. A request that
   names no time of its own (``at=None``: "now") matches the stored one
   whatever its time, so a retry is a replay.
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

import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from agent.gate.dnc import MAX_DIGITS, is_key_number
from agent.ledger._rules import NOTE_LIMIT, REF_LIMIT
from agent.ledger.model import RefusedOperation
from agent.money import clip

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
    # Not withdrawn, within the policy's period up to the complaint's time (0
    # without a ``complaints`` rule); on a replay counted again, as it stands now.
    complaints_in_period: int = 0
    suspended: bool = False  # the account is suspended now (after this request)
    newly_suspended: bool = False  # this complaint suspended it (never on a replay)


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
    """A number as the ledger keeps it: ASCII digits only, at most MAX_DIGITS.

    Each backend calls this one function before it writes a number, so a
    ``¹²³`` can never reach the change log every node's sync reads.
    """
    if not is_key_number(number):
        raise RefusedOperation(f"{clip(number)!r} is not a phone number (digits 0-9 only, at "
                               f"most {MAX_DIGITS})")
    return number


def check_text(value: str, what: str) -> str:
    if not value or not value.strip():
        raise RefusedOperation(f"{what} is required and must not be blank")
    return check_note(value, what)


def _breaks_a_line(ch: str) -> bool:
    """Control and format characters, line and paragraph separators: a newline would
    split a list's row or a log line, an escape sequence would repaint the terminal."""
    category = unicodedata.category(ch)
    return category[0] == "C" or category in ("Zl", "Zp")


def check_note(value: str, what: str = "a note") -> str:
    """Free text kept with a record (a note, a reason): one line, at most NOTE_LIMIT."""
    if len(value) > NOTE_LIMIT:
        raise RefusedOperation(f"{what} is {len(value)} characters; at most {NOTE_LIMIT}")
    bad = next((ch for ch in value if _breaks_a_line(ch)), None)
    if bad is not None:
        raise RefusedOperation(f"{what} must be one line of text: it holds {bad!r}")
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


def typed_ticket(text: str) -> str:
    """A ticket as someone typed it (CLI, web): blanks around it dropped, then checked,
    so ``add``, ``show`` and ``withdraw`` name the same complaint for the same text."""
    ticket = text.strip()
    if not ticket:
        raise RefusedOperation("a ticket is required and must not be blank")
    return check_ticket(ticket)
