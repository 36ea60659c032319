"""The ledger's contract: its types, its errors and the interface both backends keep.

Five money invariants, checked by the contract tests and the meter's simulation:

1. Every ended answered call is charged exactly its rated amount, once
   (idempotency keys: a replayed event never charges twice).
2. No call talks beyond what its holds paid for (the meter reserves first,
   then extends the PBX deadline).
3. No balance goes below zero through calls: a hold succeeds only if the
   available balance covers it, checked and written atomically. Only
   penalties, negative adjustments and a CDR correction (talk the PBX says
   happened while the agent could not meter it) may take a balance below zero.
4. The postings sum to the balances: ``posted`` = top-ups − charges −
   penalties − refunds ± adjustments − corrections; ``held`` = holds −
   charged − released.
5. No hold stays open for a call that has ended: settling a call charges and
   releases all of its holds in one transaction.

Bounds: a finance posting is at most the store's ``max_posting``, and every
running total stays within ``_rules.BALANCE_LIMIT`` minor units, so both stores
compute in exact 64-bit integers and invariant 4 holds to the last unit.

Account lifecycle: an account exists from its first top-up; a refund pays out
its available balance and closes it; a closed account takes no call and no
posting until a ``reopen`` (a posting of zero) opens it again. Every finance
posting records its ``operator`` (blank for the agent's own postings).

Amounts are :class:`~decimal.Decimal` in this API and integers of the minor
unit in storage. Times are timezone-aware UTC datetimes passed in by the
caller (the clock is injected; the ledger never reads the wall clock for
business data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from array import array

    from agent.ledger.compliance import (
        AccountEvent,
        Complaint,
        ComplaintOutcome,
        DncChange,
        DncEntry,
        SuspendRule,
        Suspension,
    )


class LedgerError(Exception):
    """Base of every ledger error; the message is meant for the user."""


class LedgerUnavailable(LedgerError):
    """The store could not be reached or stayed locked past the timeout."""


class UnknownAccount(LedgerError):
    pass


class AccountClosed(LedgerError):
    pass


class IdempotencyConflict(LedgerError):
    """An idempotency key (or reference) was reused with different content."""


class RefusedOperation(LedgerError):
    """A well-formed request the rules refuse (first top-up below the minimum,
    refund while calls are in progress, an unknown call, …)."""


class PostingKind(StrEnum):
    TOPUP = "topup"
    HOLD = "hold"
    RELEASE = "release"
    CHARGE = "charge"
    PENALTY = "penalty"
    REFUND = "refund"
    ADJUSTMENT = "adjustment"
    REOPEN = "reopen"  # amount 0: a closed (refunded) account opened again
    # A call's charge brought to the PBX's own CDR after a provisional settlement.
    # Signed like a charge: positive takes more from the balance, negative gives back.
    CORRECTION = "correction"


@dataclass(frozen=True, slots=True)
class Posting:
    id: int
    account: str
    kind: PostingKind
    amount: Decimal  # positive; the kind gives the sign (adjustments are signed)
    at: datetime
    ref: str
    key: str
    call_id: str | None = None
    note: str = ""
    operator: str = ""  # who made it (finance postings); blank for the agent's own


@dataclass(frozen=True, slots=True)
class Balance:
    account: str
    posted: Decimal  # top-ups − charges − penalties − refunds ± adjustments
    held: Decimal  # open holds
    closed: bool = False

    @property
    def available(self) -> Decimal:
        return self.posted - self.held


class CallStatus(StrEnum):
    ADMITTED = "admitted"  # allowed by the gate, not answered yet
    ANSWERED = "answered"
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class CallRecord:
    """A call the ledger knows: admitted by the gate, metered, or ended."""

    call_id: str
    account: str
    node: str
    caller: str
    callee: str
    tariff_name: str
    rate: Decimal
    increment: int
    minimum: int
    admitted_at: datetime
    answered_at: datetime | None = None
    paid_seconds: int = 0  # talk time the call's holds pay for
    held: Decimal = Decimal(0)  # sum of its holds still open
    steps: int = 0  # holds taken so far
    status: CallStatus = CallStatus.ADMITTED


@dataclass(frozen=True, slots=True)
class Cdr:
    """The settled record of one call (a statement line)."""

    call_id: str
    account: str
    caller: str
    callee: str
    answered_at: datetime | None
    ended_at: datetime
    billsec: int
    billed_seconds: int
    amount: Decimal
    cause: str
    cut_off: bool = False
    flags: tuple[str, ...] = field(default_factory=tuple)
    node: str = ""
    # From the PBX's own CDR, after a provisional settlement (see ``correct_call``):
    # its billsec, and the signed correction that brought the charge to its rating.
    pbx_billsec: int | None = None
    correction: Decimal = Decimal(0)

    @property
    def charged(self) -> Decimal:
        """What the call costs in the end: the settled charge plus its CDR correction."""
        return self.amount + self.correction


class Admission(StrEnum):
    """What :meth:`Ledger.admit_and_hold` did with a call the gate allowed."""

    ADMITTED = "admitted"  # row written, first unit held, attempt logged
    LINES_BUSY = "lines_busy"  # the account's live calls are at max_live: nothing held
    NO_FUNDS = "no_funds"  # the first unit could not be held: nothing admitted


@dataclass(frozen=True, slots=True)
class AccountSnapshot:
    """Everything the gate reads about an account, in one read (see ``account_state``)."""

    available: Decimal
    closed: bool
    live_calls: int
    account_attempts: int = 0  # allowed attempts since account_since, to any number
    callee_attempts: int = 0  # allowed attempts since callee_since, to the destination
    known: bool = True  # False: no top-up yet (available 0)
    cps_attempts: int = 0  # allowed attempts since cps_since, to any number
    caller_hour_attempts: int = 0  # allowed attempts since caller_hour_since, from caller
    caller_day_attempts: int = 0  # allowed attempts since caller_day_since, from caller
    suspended: str | None = None  # why, while suspended in the ledger (complaints, ops)


class Ledger(Protocol):
    """Both backends (SQLite, PostgreSQL) implement exactly this."""

    async def close(self) -> None: ...

    # -- finance --------------------------------------------------------------
    async def topup(
        self, account: str, amount: Decimal, *, ref: str, at: datetime,
        first_minimum: Decimal = Decimal(0), note: str = "", operator: str = "",
    ) -> Posting: ...
    async def penalty(
        self, account: str, amount: Decimal, *, ref: str, at: datetime, note: str = "",
        operator: str = "",
    ) -> Posting: ...
    async def refund(self, account: str, *, ref: str, at: datetime, note: str = "",
                     operator: str = "") -> Posting: ...
    async def reopen(self, account: str, *, ref: str, at: datetime, note: str = "",
                     operator: str = "") -> Posting: ...
    async def adjust(
        self, account: str, amount: Decimal, *, ref: str, at: datetime, note: str = "",
        operator: str = "",
    ) -> Posting: ...
    async def balance(self, account: str) -> Balance: ...
    async def balances(self) -> list[Balance]: ...
    async def history(self, account: str, since: datetime | None = None) -> list[Posting]: ...

    # -- the gate: one read, one write per decision ---------------------------
    async def account_state(
        self, account: str, *, account_since: datetime | None = None,
        callee_since: datetime | None = None, destination: str | None = None,
        cps_since: datetime | None = None, caller: str | None = None,
        caller_hour_since: datetime | None = None, caller_day_since: datetime | None = None,
    ) -> AccountSnapshot: ...
    async def admit_and_hold(
        self, call: CallRecord, max_live: int | None, amount: Decimal, paid_seconds: int,
        *, reason: str, caller_key: str | None = None,
    ) -> Admission:
        """``caller_key``: the caller ID as the caller-ID cap counts it (normalised);
        default ``call.caller``."""
        ...

    # -- calls (the meter) ----------------------------------------------------
    async def admit_call(self, call: CallRecord, max_live: int | None) -> bool: ...
    async def answer_call(self, call_id: str, answered_at: datetime) -> CallRecord: ...
    async def hold(
        self, call_id: str, step: int, amount: Decimal, paid_seconds: int, at: datetime
    ) -> bool: ...
    async def settle_call(self, cdr: Cdr) -> Cdr: ...
    async def get_call(self, call_id: str) -> CallRecord | None: ...
    async def live_calls(self, account: str | None = None) -> list[CallRecord]: ...
    async def cdrs(self, account: str, start: datetime, end: datetime) -> list[Cdr]: ...

    # -- corrections from the PBX's own CDR -------------------------------------
    async def call_cdr(self, call_id: str) -> Cdr | None:
        """The settled record of one call (with any correction), or None if not settled."""
        ...
    async def correct_call(self, call_id: str, pbx_billsec: int, *, note: str = "",
                           operator: str = "") -> Cdr:
        """Bring a settled call's charge to the rating of the PBX's ``pbx_billsec``.

        The settlement stays as it was; one ``correction`` posting (dated the
        call's end, so it falls in the call's statement period) carries the
        difference, and the CDR records ``pbx_billsec``. Once per call: the same
        billsec again is a replay (nothing new written), another one an
        :class:`IdempotencyConflict`. A call not settled yet is refused.
        ``operator``: who applied it (``reconcile --apply``); blank for the agent.
        """
        ...

    # -- attempts (frequency and rate caps) -----------------------------------
    async def record_attempt(
        self, account: str, destination: str, at: datetime, allowed: bool, reason: str,
        caller: str = "",
    ) -> None: ...
    async def attempts(
        self, account: str, since: datetime, destination: str | None = None
    ) -> list[datetime]: ...
    async def prune_attempts(self, before: datetime) -> int: ...

    # -- compliance (agent/ledger/compliance.py) --------------------------------
    async def add_complaint(
        self, *, account: str, callee: str, ticket: str, at: datetime | None, fine: Decimal,
        operator: str, note: str = "", recorded_at: datetime,
        suspend: SuspendRule | None = None,
    ) -> ComplaintOutcome: ...
    async def withdraw_complaint(
        self, ticket: str, *, operator: str, at: datetime, note: str = ""
    ) -> tuple[Complaint, bool]: ...
    async def complaints(
        self, account: str | None = None, start: datetime | None = None,
        end: datetime | None = None,
    ) -> list[Complaint]: ...
    async def complaint(self, ticket: str) -> Complaint | None: ...
    async def suspend(
        self, account: str, *, reason: str, operator: str, at: datetime
    ) -> tuple[Suspension, bool]: ...
    async def resume(
        self, account: str, *, operator: str, at: datetime, note: str = ""
    ) -> bool: ...
    async def suspension(self, account: str) -> Suspension | None: ...
    async def account_events(self, account: str) -> list[AccountEvent]: ...
    async def dnc_add(
        self, account: str, number: str, *, reason: str, operator: str, at: datetime
    ) -> tuple[DncEntry, bool]: ...
    async def dnc_remove(
        self, account: str, number: str, *, operator: str, at: datetime, reason: str = ""
    ) -> bool: ...
    async def dnc_list(self, account: str | None = None) -> list[DncEntry]: ...
    async def dnc_lookup(self, account: str, number: str) -> list[DncEntry]:
        """The entries naming this number for this account or for everyone."""
        ...
    async def dnc_snapshot(self) -> tuple[int, dict[str, array[int]]]:
        """The whole live list as sorted keys per account (see agent.gate.dnc) and the
        change number it is complete up to, read in one consistent snapshot."""
        ...
    async def dnc_changes(self, after: int, limit: int = 10_000) -> list[DncChange]: ...

    # -- consistency ----------------------------------------------------------
    async def audit(self) -> list[str]:
        """Recompute balances and call holds from the postings; the discrepancies
        found (empty when the store is consistent). Invariants 4 and 5 above."""
        ...
