"""The ledger rules both backends share: keys, amount checks, settlement and audit (pure).

The SQLite and PostgreSQL backends differ only in how they lock and talk to
their store; every decision about money is made here, once, so the two cannot
drift apart. Amounts here are integers of the store's minor unit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from agent.ledger.model import (
    AccountClosed,
    CallRecord,
    CallStatus,
    Cdr,
    IdempotencyConflict,
    Posting,
    PostingKind,
    RefusedOperation,
)
from agent.money import format_amount
from agent.rating import Tariff, rate

SCHEMA_VERSION = 9
FINANCE_KINDS = (
    PostingKind.TOPUP,
    PostingKind.PENALTY,
    PostingKind.REFUND,
    PostingKind.ADJUSTMENT,
    PostingKind.REOPEN,
)
# Every running total (an account's posted balance and its held amount) stays within
# +-BALANCE_LIMIT minor units, checked before the write. With posted and held both in
# range, every expression the stores evaluate on them (posted - held, posted + a
# posting) fits a signed 64-bit integer: SQLite never turns one into a REAL, and
# PostgreSQL's BIGINT never overflows. The balance is then always exactly the sum of
# its postings. 10**18 units is 10**14 CNY at the default minor unit.
BALANCE_LIMIT = 10**18
# The default largest single posting (top-up, penalty, adjustment) in the currency;
# ``?max_posting=`` in the ledger URL changes it.
DEFAULT_MAX_POSTING = Decimal(10_000_000)
OPERATOR_LIMIT = 64
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


# -- idempotency keys ---------------------------------------------------------
def finance_key(kind: PostingKind, ref: str) -> str:
    return f"{kind.value}:{ref}"


def hold_key(call_id: str, step: int) -> str:
    return f"hold:{call_id}:{step}"


def charge_key(call_id: str) -> str:
    return f"charge:{call_id}"


def release_key(call_id: str) -> str:
    return f"release:{call_id}"


def correction_key(call_id: str) -> str:
    return f"correction:{call_id}"


# -- input checks -------------------------------------------------------------
REF_LIMIT = 128
NOTE_LIMIT = 1000


def check_ref(ref: str) -> str:
    if not ref or not ref.strip():
        raise RefusedOperation("a reference (--ref) is required and must not be blank")
    if len(ref) > REF_LIMIT or not ref.isprintable():
        raise RefusedOperation(
            f"a reference (--ref) must be printable and at most {REF_LIMIT} characters "
            f"(got {len(ref)})"
        )
    return ref


def check_time(at: datetime, what: str = "time") -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{what} {at.isoformat()} must be timezone-aware")
    return at.astimezone(UTC)


def to_units(amount: Decimal, unit: Decimal, *, what: str = "amount") -> int:
    """Decimal -> integer minor units; more places than the store's unit is refused."""
    if not isinstance(amount, Decimal) or not amount.is_finite():
        raise RefusedOperation(f"{what} {amount!r} must be a finite Decimal")
    units = amount / unit
    if units != units.to_integral_value():
        raise RefusedOperation(
            f"{what} {amount} has more decimal places than the ledger's minor unit {unit}"
        )
    return int(units)


def check_operator(operator: str) -> str:
    """Who made a posting: a short printable name (blank for the agent's own postings)."""
    if len(operator) > OPERATOR_LIMIT or not operator.isprintable() or operator != operator.strip():
        raise RefusedOperation(
            f"operator name {operator[:OPERATOR_LIMIT]!r} must be printable, without leading "
            f"or trailing blanks, and at most {OPERATOR_LIMIT} characters"
        )
    return operator


def check_posting_size(units: int, max_units: int, unit: Decimal, *, what: str = "amount"
                       ) -> None:
    if abs(units) > max_units:
        raise RefusedOperation(
            f"{what} {show(abs(units), unit)} is above the ledger's maximum posting of "
            f"{show(max_units, unit)} (max_posting in the ledger URL)"
        )


def check_total(account: str, posted: int, unit: Decimal) -> None:
    """Refuse a write that would take a running total beyond :data:`BALANCE_LIMIT`."""
    if abs(posted) > BALANCE_LIMIT:
        raise RefusedOperation(
            f"this would take the balance of account {account!r} to {show(posted, unit)}, "
            f"beyond the ledger's limit of {show(BALANCE_LIMIT, unit)}"
        )


def positive_units(amount: Decimal, unit: Decimal, *, what: str = "amount") -> int:
    units = to_units(amount, unit, what=what)
    if units <= 0:
        raise RefusedOperation(f"{what} {amount} must be greater than zero")
    return units


def from_units(units: int, unit: Decimal) -> Decimal:
    return (Decimal(units) * unit).quantize(unit)


def show(units: int, unit: Decimal) -> str:
    return format_amount(from_units(units, unit))


# -- time in storage ----------------------------------------------------------
def to_micros(at: datetime) -> int:
    """SQLite keeps times as integer microseconds since the epoch, UTC."""
    return (check_time(at) - EPOCH) // MICROSECOND


def from_micros(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


# -- finance replays ----------------------------------------------------------
def finance_replay_matches(
    kind: PostingKind, stored_amount: int, stored_note: str, amount: int | None, note: str
) -> bool:
    """Is a finance posting with an already used reference the same request again?

    A refund's amount is computed by the ledger, so its content is only its note.
    """
    if kind in (PostingKind.REFUND, PostingKind.REOPEN):
        return stored_note == note
    return stored_amount == amount and stored_note == note


def finance_conflict(
    kind: PostingKind, account: str, ref: str, stored_amount: int, unit: Decimal
) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"reference {ref!r} was already used for a {kind.value} of "
        f"{show(stored_amount, unit)} on account {account!r} with other content; "
        "use a new reference"
    )


def posted_delta(kind: PostingKind, units: int) -> int:
    """How a posting of ``units`` moves the account's posted balance."""
    if kind in (PostingKind.TOPUP, PostingKind.ADJUSTMENT):
        return units
    if kind in (PostingKind.PENALTY, PostingKind.REFUND, PostingKind.CHARGE,
                PostingKind.CORRECTION):
        return -units  # a correction is signed like a charge
    return 0  # holds and releases move only the held amount


def held_delta(kind: PostingKind, units: int) -> int:
    if kind is PostingKind.HOLD:
        return units
    if kind in (PostingKind.CHARGE, PostingKind.RELEASE):
        return -units
    return 0


def refund_units(account: str, posted: int, held: int, live_calls: int, unit: Decimal) -> int:
    """What a refund pays out: the available balance, once no call is in progress."""
    if live_calls:
        raise RefusedOperation(
            f"account {account!r} has {live_calls} call(s) in progress; "
            "refund after they end"
        )
    available = posted - held
    if available < 0:
        raise RefusedOperation(
            f"account {account!r} has a negative balance ({show(available, unit)}); "
            "a negative balance cannot be refunded"
        )
    return available


def first_topup_check(account: str, units: int, minimum: int, unit: Decimal) -> None:
    if units < minimum:
        raise RefusedOperation(
            f"the first top-up of account {account!r} must be at least "
            f"{show(minimum, unit)} (got {show(units, unit)})"
        )


def closed_error(account: str) -> AccountClosed:
    return AccountClosed(f"account {account!r} is closed (refunded); it takes no new business")


def closed_finance_error(account: str, kind: PostingKind) -> AccountClosed:
    return AccountClosed(
        f"account {account!r} is closed (refunded); a {kind.value} needs it open again: "
        "callgate ledger reopen"
    )


def lifecycle(account: str, kind: PostingKind, closed: bool) -> bool:
    """The account lifecycle: is it closed after a finance posting of ``kind``?

    open --refund--> closed --reopen--> open. A closed account takes no posting
    but a reopen (a replay of an earlier request is answered before this check);
    an open account has nothing to reopen.
    """
    if kind is PostingKind.REOPEN:
        if not closed:
            raise RefusedOperation(f"account {account!r} is open; there is nothing to reopen")
        return False
    if closed:
        raise closed_finance_error(account, kind)
    return kind is PostingKind.REFUND


def unknown_call(call_id: str) -> RefusedOperation:
    return RefusedOperation(f"the ledger has no call {call_id!r}")


def readmit(call: CallRecord, account: str, status: str) -> bool:
    """An admission for a call id the ledger already has: a replay, or a mistake."""
    if account != call.account:
        raise IdempotencyConflict(
            f"call {call.call_id!r} is already admitted for account {account!r}"
        )
    if status == CallStatus.ENDED:
        raise RefusedOperation(f"call {call.call_id!r} has already ended")
    return True


# -- settlement ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Settlement:
    charge: int
    release: int
    capped: bool


def check_call_amount(amount: int) -> None:
    if amount < 0:
        raise RefusedOperation("a call's amount must not be negative")


def settle_plan(held: int, amount: int) -> Settlement:
    """Charge ``amount`` from the call's open holds and release the rest.

    A call can never be charged more than its holds: the excess is dropped and
    the CDR flagged ``capped`` (invariant 3; the meter is meant to prevent it).
    """
    check_call_amount(amount)
    charge = min(amount, held)
    return Settlement(charge=charge, release=held - charge, capped=amount > held)


def cdr_fingerprint(cdr: Cdr) -> str:
    """The content of a settlement request, to tell a replay from a conflict."""
    return json.dumps(
        [
            cdr.call_id,
            cdr.account,
            cdr.caller,
            cdr.callee,
            cdr.answered_at and check_time(cdr.answered_at).isoformat(),
            check_time(cdr.ended_at).isoformat(),
            cdr.billsec,
            cdr.billed_seconds,
            str(cdr.amount.normalize()),
            cdr.cause,
            cdr.cut_off,
            list(cdr.flags),
            cdr.node,
        ],
        separators=(",", ":"),
    )


def settle_conflict(call_id: str) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"call {call_id!r} was already settled with a different CDR"
    )


# -- corrections from the PBX's own CDR ----------------------------------------
def rated_units(rate_units: int, increment: int, minimum: int, billsec: int,
                unit: Decimal) -> int:
    """What ``billsec`` of talk costs under a call's stored tariff, in minor units."""
    tariff = Tariff("stored", from_units(rate_units, unit), increment, minimum)
    return to_units(rate(tariff, billsec), unit, what="rated amount")


def correction_units(settled: int, rate_units: int, increment: int, minimum: int,
                     pbx_billsec: int, unit: Decimal, *, call_id: str = "",
                     max_posting: Decimal = DEFAULT_MAX_POSTING) -> int:
    """The signed correction that brings a settled charge to the PBX billsec's rating.

    It is bounded like a finance posting (``max_posting``): a CDR is input from
    outside, and no row, however damaged, moves more money than a clerk could by
    hand; a larger one is refused, for finance to look at (reconcile lists it).
    """
    if pbx_billsec < 0:
        raise RefusedOperation("a PBX billsec must not be negative")
    delta = rated_units(rate_units, increment, minimum, pbx_billsec, unit) - settled
    check_posting_size(delta, to_units(max_posting, unit, what="max_posting"), unit,
                       what=f"the correction of call {call_id!r} from the PBX's CDR")
    return delta


def correction_conflict(call_id: str, recorded: int, billsec: int) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"call {call_id!r} was already corrected from a PBX CDR with billsec {recorded}, "
        f"not {billsec}"
    )


def closed_correction_error(account: str, call_id: str) -> AccountClosed:
    return AccountClosed(
        f"account {account!r} is closed (refunded); the correction of call {call_id!r} "
        "needs it open again: callgate ledger reopen, then ledger reconcile --apply"
    )


def not_settled(call_id: str) -> RefusedOperation:
    return RefusedOperation(f"call {call_id!r} is not settled yet; correct it after it ends")


# -- audit --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StoredAccount:
    account: str
    posted: int
    held: int
    closed: bool


@dataclass(frozen=True, slots=True)
class StoredCall:
    call_id: str
    account: str
    ended: bool
    held: int
    cdr_amount: int | None  # None until settled
    cdr_correction: int = 0  # the CDR's correction (signed), 0 if none


def audit(
    accounts: Iterable[StoredAccount],
    account_sums: Mapping[tuple[str, str], int],
    calls: Iterable[StoredCall],
    call_sums: Mapping[tuple[str, str], int],
    unit: Decimal,
) -> list[str]:
    """Compare the stored balances with what the postings say they must be.

    ``account_sums`` maps (account, kind) and ``call_sums`` (call_id, kind) to the
    sum of those postings' amounts.
    """
    problems: list[str] = []
    posted_of: dict[str, int] = {}
    held_of: dict[str, int] = {}
    for (a, k), v in account_sums.items():
        posted_of[a] = posted_of.get(a, 0) + posted_delta(PostingKind(k), v)
        held_of[a] = held_of.get(a, 0) + held_delta(PostingKind(k), v)
    call_held_of: dict[str, int] = {}
    for (c, k), v in call_sums.items():
        call_held_of[c] = call_held_of.get(c, 0) + held_delta(PostingKind(k), v)
    known = set()
    for acc in accounts:
        known.add(acc.account)
        posted, held = posted_of.get(acc.account, 0), held_of.get(acc.account, 0)
        if posted != acc.posted:
            problems.append(
                f"account {acc.account!r}: posted balance {show(acc.posted, unit)} "
                f"but its postings sum to {show(posted, unit)}"
            )
        if held != acc.held:
            problems.append(
                f"account {acc.account!r}: held {show(acc.held, unit)} "
                f"but its holds sum to {show(held, unit)}"
            )
        if acc.held < 0:
            problems.append(f"account {acc.account!r}: negative held amount")
        if acc.closed and (acc.account, PostingKind.REFUND.value) not in account_sums:
            problems.append(f"account {acc.account!r}: closed without a refund posting")
    for a in sorted(set(posted_of) - known):
        problems.append(f"postings for account {a!r}, which does not exist")
    for call in calls:
        held = call_held_of.get(call.call_id, 0)
        if held != call.held:
            problems.append(
                f"call {call.call_id!r}: held {show(call.held, unit)} "
                f"but its postings leave {show(held, unit)} open"
            )
        if call.ended and call.held:
            problems.append(f"call {call.call_id!r}: ended with a hold still open")
        if call.ended and call.cdr_amount is None:
            problems.append(f"call {call.call_id!r}: ended without a CDR")
        charged = call_sums.get((call.call_id, PostingKind.CHARGE.value), 0)
        if call.cdr_amount is not None and call.cdr_amount != charged:
            problems.append(
                f"call {call.call_id!r}: CDR amount {show(call.cdr_amount, unit)} "
                f"but charged {show(charged, unit)}"
            )
        corrected = call_sums.get((call.call_id, PostingKind.CORRECTION.value), 0)
        if corrected != call.cdr_correction:
            problems.append(
                f"call {call.call_id!r}: CDR correction {show(call.cdr_correction, unit)} "
                f"but its correction postings sum to {show(corrected, unit)}"
            )
    return problems


class FinanceFront:
    """The finance operations as both backends expose them: checked input, then ``_finance``.

    A backend provides ``unit`` (the minor unit), ``max_posting`` (the largest
    single posting, in the currency) and ``_finance(kind, account, units, ref,
    at, note, first_minimum=0, operator="")``, which does the storage work.
    ``operator`` names who made the posting (recorded with it; blank for the
    agent's own postings).
    """

    unit: Decimal
    max_posting: Decimal = DEFAULT_MAX_POSTING

    async def _finance(
        self, kind: PostingKind, account: str, units: int | None, ref: str, at: datetime,
        note: str, first_minimum: int = 0, operator: str = "",
    ) -> Posting:
        raise NotImplementedError

    def _sized(self, amount: Decimal, *, signed: bool = False) -> int:
        units = to_units(amount, self.unit) if signed else positive_units(amount, self.unit)
        if signed and units == 0:
            raise RefusedOperation("an adjustment must not be zero (it is signed: -5 or 5)")
        check_posting_size(units, to_units(self.max_posting, self.unit, what="max_posting"),
                           self.unit)
        return units

    async def topup(
        self, account: str, amount: Decimal, *, ref: str, at: datetime,
        first_minimum: Decimal = Decimal(0), note: str = "", operator: str = "",
    ) -> Posting:
        units = self._sized(amount)
        minimum = to_units(first_minimum, self.unit, what="first top-up minimum")
        return await self._finance(PostingKind.TOPUP, account, units, ref, at, note, minimum,
                                   check_operator(operator))

    async def penalty(
        self, account: str, amount: Decimal, *, ref: str, at: datetime, note: str = "",
        operator: str = "",
    ) -> Posting:
        units = self._sized(amount)
        return await self._finance(PostingKind.PENALTY, account, units, ref, at, note,
                                   operator=check_operator(operator))

    async def refund(self, account: str, *, ref: str, at: datetime, note: str = "",
                     operator: str = "") -> Posting:
        return await self._finance(PostingKind.REFUND, account, None, ref, at, note,
                                   operator=check_operator(operator))

    async def reopen(self, account: str, *, ref: str, at: datetime, note: str = "",
                     operator: str = "") -> Posting:
        """Open a closed (refunded) account again: a posting of zero that records who and why."""
        return await self._finance(PostingKind.REOPEN, account, 0, ref, at, note,
                                   operator=check_operator(operator))

    async def adjust(
        self, account: str, amount: Decimal, *, ref: str, at: datetime, note: str = "",
        operator: str = "",
    ) -> Posting:
        units = self._sized(amount, signed=True)
        return await self._finance(PostingKind.ADJUSTMENT, account, units, ref, at, note,
                                   operator=check_operator(operator))
