"""What each compliance write does, step by step, once for both backends (pure).

A write is a *plan*: a generator that asks its store one question or one
change at a time (``found = yield store.complaint(ticket)``) and makes every
decision itself: input checks, replay or conflict, a closed account, whether
the fine was already posted, whether the account is now due for suspension.
A backend supplies only a :class:`Store` (its SQL, one method a step) and runs
the plan inside one of its transactions:

- SQLite's store answers at once, so a plan runs with :func:`run_sync` in the
  writer thread (one ``BEGIN IMMEDIATE``);
- PostgreSQL's store returns awaitables, which :func:`run_async` awaits in
  turn inside one transaction.

Either way the whole plan commits or nothing does. The store's methods take and
return the types of :mod:`agent.ledger.compliance` (times as aware datetimes,
fines as integer minor units going in); converting to and from its columns is
the store's job. :class:`ComplianceFront` is the public half both ledgers
inherit: it checks the input, builds the plan and hands it to the backend's
``_transact``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol, TypeVar

from agent.ledger import _rules as rules
from agent.ledger import compliance as c
from agent.ledger.model import (
    AccountClosed,
    IdempotencyConflict,
    PostingKind,
    RefusedOperation,
    UnknownAccount,
)

T = TypeVar("T")
Plan = Generator[Any, Any, T]


class Store(Protocol):
    """One backend's steps, each its own SQL. SQLite returns the answers; PostgreSQL
    returns awaitables of them (hence ``Any``)."""

    def lock_dnc(self) -> Any:
        """Serialise writes to the DNC change log until the transaction ends."""

    def complaint(self, ticket: str, *, for_update: bool = False) -> Any:
        """-> Complaint | None"""

    def account_closed(self, account: str) -> Any:
        """-> bool | None (None: the ledger has no such account); locks the row."""

    def insert_complaint(self, new: NewComplaint) -> Any:
        """-> Complaint"""

    def mark_withdrawn(self, ticket: str, at: datetime, operator: str, note: str) -> Any:
        """-> Complaint"""

    def posting_exists(self, account: str, key: str) -> Any:
        """-> bool"""

    def post(self, account: str, kind: PostingKind, units: int, at: datetime, ref: str,
             key: str, note: str, operator: str) -> Any:
        """Insert the posting and move the account's posted balance by it."""

    def count_complaints(self, account: str, after: datetime, until: datetime) -> Any:
        """-> int: standing complaints with ``after < at <= until``"""

    def insert_suspension(self, account: str, reason: str, operator: str,
                          at: datetime) -> Any:
        """-> Suspension | None (None: the account is suspended already)"""

    def suspension(self, account: str) -> Any:
        """-> Suspension | None"""

    def delete_suspension(self, account: str) -> Any:
        """-> bool (False: it was not suspended)"""

    def log_account(self, account: str, action: str, reason: str, operator: str,
                    at: datetime) -> Any: ...

    def dnc_entry(self, account: str, number: str) -> Any:
        """-> DncEntry | None"""

    def log_dnc(self, account: str, number: str, added: bool, reason: str, operator: str,
                at: datetime) -> Any:
        """-> int: the change's ``seq``"""

    def insert_dnc(self, account: str, number: str, reason: str, operator: str,
                   at: datetime, seq: int) -> Any:
        """-> DncEntry"""

    def delete_dnc(self, account: str, number: str) -> Any:
        """-> bool (False: there was no such entry)"""


def run_sync(plan: Plan[T]) -> T:
    """Run a plan against a store that answers at once (SQLite's writer thread)."""
    answer: Any = None
    try:
        while True:
            answer = plan.send(answer)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def run_async(plan: Plan[T]) -> T:
    """Run a plan against a store whose steps are awaitables (PostgreSQL)."""
    answer: Any = None
    try:
        while True:
            answer = await plan.send(answer)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


# -- checked requests -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NewComplaint:
    ticket: str
    account: str
    callee: str
    at: datetime  # UTC; the time recorded when the request named none
    at_given: bool  # False: "now", so a retry matches the stored time whatever it is
    units: int  # the fine in minor units (0: none)
    operator: str
    note: str
    recorded_at: datetime  # UTC
    suspend: c.SuspendRule | None


def new_complaint(*, account: str, callee: str, ticket: str, at: datetime | None,
                  fine: Decimal, operator: str, note: str, recorded_at: datetime,
                  suspend: c.SuspendRule | None, unit: Decimal) -> NewComplaint:
    c.check_ticket(ticket)
    c.check_note(note)
    rules.check_operator(c.check_text(operator, "an operator"))
    c.check_number(callee)
    recorded = rules.check_time(recorded_at)
    units = rules.to_units(fine, unit, what="complaint fine")
    if units < 0:
        raise RefusedOperation("a complaint fine must not be negative")
    return NewComplaint(ticket, account, callee,
                        recorded if at is None else rules.check_time(at), at is not None,
                        units, operator, note, recorded, suspend)


def complaint_replay(stored: c.Complaint, new: NewComplaint) -> None:
    """The same ticket again: a replay if it says the same, else a conflict."""
    same_time = stored.at == new.at or not new.at_given
    if (stored.account, stored.callee, stored.note) != (new.account, new.callee, new.note) \
            or not same_time:
        raise IdempotencyConflict(
            f"ticket {stored.ticket!r} is already recorded for account {stored.account!r}, "
            f"callee {stored.callee} at {stored.at.isoformat()} with other content; "
            "a ticket is recorded once"
        )


def open_account(account: str, closed: bool | None, *, needed: bool, what: str) -> None:
    """A complaint's account: closed (refunded) is refused; missing only if it is fined."""
    if closed is None and needed:
        raise UnknownAccount(f"the ledger has no account {account!r} to fine")
    if closed:
        raise AccountClosed(
            f"account {account!r} is closed (refunded); {what} needs it open again: "
            "callgate ledger reopen"
        )


def due_suspension(rule: c.SuspendRule | None, standing: int) -> str | None:
    """The reason to suspend the account now, or None."""
    if rule is None or not rule.due(standing):
        return None
    return rule.describe(standing)


# -- the plans --------------------------------------------------------------------------
def add_complaint(store: Store, new: NewComplaint) -> Plan[c.ComplaintOutcome]:
    # The DNC lock first (lock order: dnc, account); it also serialises two nodes
    # recording the same ticket at once.
    yield store.lock_dnc()
    stored = yield store.complaint(new.ticket)
    if stored is not None:
        complaint_replay(stored, new)
        # Nothing written, but the state reported is today's (withdrawals and
        # suspensions since count), never the defaults a caller would read as
        # "not suspended".
        standing = 0
        if new.suspend is not None:
            standing = yield store.count_complaints(stored.account,
                                                    stored.at - new.suspend.period, stored.at)
        current = yield store.suspension(stored.account)
        return c.ComplaintOutcome(stored, False, int(standing), current is not None)
    closed = yield store.account_closed(new.account)
    open_account(new.account, closed, needed=bool(new.units), what="a complaint")
    complaint = yield store.insert_complaint(new)
    if new.units:
        ref = c.penalty_ref(new.ticket)
        yield from _post_once(store, new.account, PostingKind.PENALTY, new.units, new.at, ref,
                              f"complaint {new.ticket}", new.operator)
    yield from _dnc_add(store, new.account, new.callee, f"complaint {new.ticket}",
                        new.operator, new.at)
    standing, newly = 0, False
    if new.suspend is not None:
        standing = yield store.count_complaints(new.account, new.at - new.suspend.period,
                                                new.at)
        why = due_suspension(new.suspend, standing)
        if why is not None:
            newly = (yield from _suspend(store, new.account, why, new.operator,
                                         new.recorded_at)) is None
    suspended = newly or (yield store.suspension(new.account)) is not None
    return c.ComplaintOutcome(complaint, True, int(standing), suspended, newly)


def withdraw_complaint(store: Store, ticket: str, operator: str, at: datetime, note: str,
                       unit: Decimal) -> Plan[tuple[c.Complaint, bool]]:
    stored = yield store.complaint(ticket, for_update=True)
    if stored is None:
        raise RefusedOperation(f"the ledger has no complaint {ticket!r}")
    if stored.withdrawn:
        return stored, False
    closed = yield store.account_closed(stored.account)
    open_account(stored.account, closed, needed=False, what="withdrawing a complaint")
    units = rules.to_units(stored.fine, unit, what="complaint fine")
    if units:
        yield from _post_once(store, stored.account, PostingKind.ADJUSTMENT, units, at,
                              c.reversal_ref(ticket), f"complaint {ticket} withdrawn", operator)
    withdrawn = yield store.mark_withdrawn(ticket, at, operator, note)
    return withdrawn, True


def suspend(store: Store, account: str, reason: str, operator: str,
            at: datetime) -> Plan[tuple[c.Suspension, bool]]:
    existing = yield from _suspend(store, account, reason, operator, at)
    if existing is not None:
        return existing, False
    return c.Suspension(account, reason, operator, at), True


def resume(store: Store, account: str, operator: str, at: datetime, note: str) -> Plan[bool]:
    if not (yield store.delete_suspension(account)):
        return False
    yield store.log_account(account, "resume", note, operator, at)
    return True


def dnc_add(store: Store, account: str, number: str, reason: str, operator: str,
            at: datetime) -> Plan[tuple[c.DncEntry, bool]]:
    yield store.lock_dnc()
    return (yield from _dnc_add(store, account, number, reason, operator, at))


def dnc_remove(store: Store, account: str, number: str, reason: str, operator: str,
               at: datetime) -> Plan[bool]:
    yield store.lock_dnc()
    if not (yield store.delete_dnc(account, number)):
        return False
    yield store.log_dnc(account, number, False, reason, operator, at)
    return True


def _post_once(store: Store, account: str, kind: PostingKind, units: int, at: datetime,
               ref: str, note: str, operator: str) -> Plan[None]:
    """A posting keyed by its reference: written at most once (invariants 1 and 2)."""
    key = rules.finance_key(kind, ref)
    if not (yield store.posting_exists(account, key)):
        yield store.post(account, kind, units, at, ref, key, note, operator)


def _dnc_add(store: Store, account: str, number: str, reason: str, operator: str,
             at: datetime) -> Plan[tuple[c.DncEntry, bool]]:
    """Add an entry and log the change (the caller holds the DNC lock); a no-op if listed."""
    entry = yield store.dnc_entry(account, number)
    if entry is not None:
        return entry, False
    seq = yield store.log_dnc(account, number, True, reason, operator, at)
    return (yield store.insert_dnc(account, number, reason, operator, at, seq)), True


def _suspend(store: Store, account: str, reason: str, operator: str,
             at: datetime) -> Plan[c.Suspension | None]:
    """Suspend and log it; the standing suspension instead when there is one."""
    if (yield store.insert_suspension(account, reason, operator, at)) is None:
        return (yield store.suspension(account))  # type: ignore[no-any-return]
    yield store.log_account(account, "suspend", reason, operator, at)
    return None


# -- the public half of both ledgers ----------------------------------------------------
class ComplianceFront:
    """The compliance writes as both backends expose them: checked input, then a plan.

    A backend provides ``unit`` and ``_transact(plan_of)``, which opens one
    transaction, makes its :class:`Store` on it, and runs ``plan_of(store)``.
    """

    unit: Decimal

    async def _transact(self, plan_of: Callable[[Store], Plan[T]]) -> T:
        raise NotImplementedError

    async def add_complaint(
        self, *, account: str, callee: str, ticket: str, at: datetime | None, fine: Decimal,
        operator: str, note: str = "", recorded_at: datetime,
        suspend: c.SuspendRule | None = None,
    ) -> c.ComplaintOutcome:
        """``at=None``: the complaint is dated when recorded, and a retry is a replay."""
        new = new_complaint(account=account, callee=callee, ticket=ticket, at=at, fine=fine,
                            operator=operator, note=note, recorded_at=recorded_at,
                            suspend=suspend, unit=self.unit)
        return await self._transact(lambda store: add_complaint(store, new))

    async def withdraw_complaint(
        self, ticket: str, *, operator: str, at: datetime, note: str = ""
    ) -> tuple[c.Complaint, bool]:
        c.check_note(note)
        rules.check_operator(c.check_text(operator, "an operator"))
        when, unit = rules.check_time(at), self.unit
        return await self._transact(
            lambda store: withdraw_complaint(store, ticket, operator, when, note, unit))

    async def suspend(
        self, account: str, *, reason: str, operator: str, at: datetime
    ) -> tuple[c.Suspension, bool]:
        c.check_text(reason, "a reason")
        rules.check_operator(c.check_text(operator, "an operator"))
        when = rules.check_time(at)
        return await self._transact(
            lambda store: suspend(store, account, reason, operator, when))

    async def resume(
        self, account: str, *, operator: str, at: datetime, note: str = ""
    ) -> bool:
        c.check_note(note)
        rules.check_operator(c.check_text(operator, "an operator"))
        when = rules.check_time(at)
        return await self._transact(lambda store: resume(store, account, operator, when, note))

    async def dnc_add(
        self, account: str, number: str, *, reason: str, operator: str, at: datetime
    ) -> tuple[c.DncEntry, bool]:
        c.check_number(number)
        c.check_text(reason, "a reason")
        rules.check_operator(c.check_text(operator, "an operator"))
        when = rules.check_time(at)
        return await self._transact(
            lambda store: dnc_add(store, account, number, reason, operator, when))

    async def dnc_remove(
        self, account: str, number: str, *, operator: str, at: datetime, reason: str = ""
    ) -> bool:
        c.check_note(reason, "a reason")
        rules.check_operator(c.check_text(operator, "an operator"))
        when = rules.check_time(at)
        return await self._transact(
            lambda store: dnc_remove(store, account, number, reason, operator, when))
